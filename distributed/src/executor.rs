//! `udfsql-executor`: Ballista's executor with udfsql's codecs. It evaluates plugin functions by
//! loading each plan's library from its own plugin directories, pinned by the client's digest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use clap::Parser;

use crate::codec::{PluginLogicalCodec, PluginPhysicalCodec};
use udf_engine::WorkerLimits;

use crate::resolve::{IsolationFloor, Resolver, Role};
use crate::scheduler::Policy;

/// Ballista's executor with udfsql's plugin functions: the libraries that clients plan with are
/// loaded from --plugin-dir, and only when their SHA-256 digest is the client's.
///
/// Isolation is this executor's to decide, not the plan's: --isolate and the worker limits are a
/// floor. A plan may ask for stricter limits (they are kept) but never for less: a function the
/// plan runs in-process runs in workers under --isolate, and an isolated function runs with the
/// shorter call time limit, the smaller memory limit (a plan asking for none gets
/// --worker-memory) and the fewer workers of the plan's and this executor's.
#[derive(Debug, Parser)]
#[command(name = "udfsql-executor", version)]
pub struct Args {
    /// Directory holding the plugin libraries (repeatable). The same files as the clients'
    /// (same SHA-256); the directories and files must not be writable by other users.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Evaluate every plugin function in worker processes, whatever the plan says: a plugin
    /// that crashes, exits, hangs or runs out of memory fails its query, and the executor lives
    /// on. Without it, a function runs in-process when its client runs it in-process.
    #[arg(long)]
    pub isolate: bool,
    /// Isolated calls: the longest one call (one batch) may run before its worker is killed, in
    /// seconds. A plan asking for longer gets this.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub call_timeout: f64,
    /// Isolated calls: each worker's memory (address space) limit in MiB; 0 for none. A plan
    /// asking for more, or for no limit, gets this.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub worker_memory: u64,
    /// Isolated calls: the most worker processes per library (default: the number of CPUs). A
    /// plan asking for more gets this.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Loaded plugin functions kept (each with its worker processes, if isolated); past it the
    /// least recently used is dropped (its library unmapped, its workers ended, once no running
    /// task holds it) and loaded again when a plan needs it.
    #[arg(long, value_name = "N", default_value_t = crate::DEFAULT_FUNCTION_CACHE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub function_cache: usize,
    /// Seconds a failure to load a plugin function (a missing library, another digest) is
    /// remembered: tasks meeting it fail at once, without reading the file again; after it, the
    /// next task tries again (0: never remembered).
    #[arg(long, value_name = "SECS", default_value_t = crate::DEFAULT_FAILURE_TTL.as_secs_f64())]
    pub load_failure_ttl: f64,
    /// Scheduler host.
    #[arg(long, default_value = "localhost")]
    pub scheduler_host: String,
    /// Scheduler port.
    #[arg(long, default_value_t = 50050)]
    pub scheduler_port: u16,
    /// Seconds to keep trying to reach the scheduler at start (0: try once), so that executors
    /// may start before their scheduler.
    #[arg(long, default_value_t = 30)]
    pub scheduler_connect_timeout_seconds: u16,
    /// Local IP address to bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_host: String,
    /// Host name or IP address other nodes reach this executor at (default: its IP address as
    /// the scheduler sees it).
    #[arg(long)]
    pub external_host: Option<String>,
    /// Identifier for this executor (default: a new UUID).
    #[arg(long = "id")]
    pub executor_id: Option<String>,
    /// Arrow Flight port (shuffle data and results).
    #[arg(short = 'p', long, default_value_t = 50051)]
    pub bind_port: u16,
    /// gRPC port (tasks from the scheduler).
    #[arg(long, alias = "grpc-port", default_value_t = 50052)]
    pub bind_grpc_port: u16,
    /// Virtual cores advertised to the scheduler (0: the number of CPUs).
    #[arg(short = 'c', long, alias = "concurrent-tasks", default_value_t = 0)]
    pub vcores: usize,
    /// Task scheduling policy; the same as the scheduler's.
    #[arg(short = 's', long, value_enum, default_value_t = Policy::PushStaged)]
    pub task_scheduling_policy: Policy,
    /// Directory for shuffle files (default: a new temporary directory).
    #[arg(long)]
    pub work_dir: Option<String>,
    /// Seconds between heartbeats to the scheduler.
    #[arg(long, default_value_t = 60)]
    pub executor_heartbeat_interval_seconds: u64,
    /// Seconds a job's shuffle data is kept.
    #[arg(long, default_value_t = 604800)]
    pub job_data_ttl_seconds: u64,
    /// Seconds between clean-ups of old job data (0: never).
    #[arg(long, default_value_t = 0)]
    pub job_data_clean_up_interval_seconds: u64,
    /// Memory pool size in bytes shared by this executor's tasks (default: no limit).
    #[arg(long)]
    pub memory_pool_size: Option<u64>,
    /// Log filter when $RUST_LOG is not set.
    #[arg(long, default_value = "info")]
    pub log_level_setting: String,
}

/// Runs the executor until SIGTERM, Ctrl-C or the scheduler stops it.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    crate::init_logging(&args.log_level_setting);
    crate::run_daemon("udfsql-executor", run(args))
}

async fn run(args: Args) -> Result<()> {
    let loader = Arc::new(crate::loader_for(&args.plugin_dirs)?);
    if args.plugin_dirs.is_empty() {
        tracing::warn!("no --plugin-dir: queries that call plugin functions will fail here");
    }
    let mut config = ExecutorProcessConfig::default();
    if let Some(id) = args.executor_id {
        config.executor_id = id;
    }
    let host = args.external_host.clone().unwrap_or(args.bind_host.clone());
    let node = format!(
        "executor {} at {host}:{}",
        config.executor_id, args.bind_grpc_port
    );
    let limits = WorkerLimits::from_flags(args.call_timeout, args.worker_memory, args.workers)
        .map_err(anyhow::Error::msg)?;
    let failure_ttl = Duration::try_from_secs_f64(args.load_failure_ttl).map_err(|_| {
        anyhow::anyhow!(
            "--load-failure-ttl {}: expected seconds, 0 or more",
            args.load_failure_ttl
        )
    })?;
    tracing::info!(
        isolate = args.isolate,
        call_timeout = ?limits.call_timeout,
        worker_memory_mib = ?limits.memory_mib,
        workers = ?limits.workers,
        function_cache = args.function_cache,
        load_failure_ttl = ?failure_ttl,
        "isolation floor: plans may ask for stricter limits, never for less"
    );
    let resolver = Arc::new(
        Resolver::new(node, Role::Evaluate, loader)
            .with_floor(IsolationFloor {
                isolate: args.isolate,
                limits,
            })
            .with_cache(args.function_cache, failure_ttl),
    );
    config.bind_host = args.bind_host;
    config.external_host = args.external_host;
    config.port = args.bind_port;
    config.grpc_port = args.bind_grpc_port;
    config.scheduler_host = args.scheduler_host;
    config.scheduler_port = args.scheduler_port;
    wait_for_scheduler(
        &config.scheduler_host,
        config.scheduler_port,
        Duration::from_secs(args.scheduler_connect_timeout_seconds.into()),
    )
    .await?;
    // Reached: Ballista connects once (its own retry loop has no working time limit).
    config.scheduler_connect_timeout_seconds = 0;
    if args.vcores > 0 {
        config.vcores = args.vcores;
    }
    config.task_scheduling_policy = args.task_scheduling_policy.ballista();
    config.work_dir = args.work_dir;
    config.executor_heartbeat_interval_seconds = args.executor_heartbeat_interval_seconds;
    config.job_data_ttl_seconds = args.job_data_ttl_seconds;
    config.job_data_clean_up_interval_seconds = args.job_data_clean_up_interval_seconds;
    config.memory_pool_size = args.memory_pool_size;
    config.override_logical_codec = Some(Arc::new(PluginLogicalCodec::ballista(Arc::clone(
        &resolver,
    ))));
    config.override_physical_codec = Some(Arc::new(PluginPhysicalCodec::ballista(resolver)));
    config.override_function_registry = Some(Arc::new(function_registry()));
    tracing::info!(plugin_dirs = ?args.plugin_dirs, "udfsql-executor starting");
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}

/// Ballista's function registry plus DataFusion's nested functions (`make_array`, `array_sum`,
/// `cardinality`, ...), which Ballista 55's default leaves out: without them an executor cannot
/// decode a task whose plan builds a list (`[x, y]`), and fails it ("PhysicalExtensionCodec is
/// not provided for scalar function make_array").
fn function_registry() -> ballista_core::registry::BallistaFunctionRegistry {
    let mut registry = ballista_core::registry::BallistaFunctionRegistry::default();
    for f in datafusion::functions_nested::all_default_nested_functions() {
        for name in std::iter::once(f.name()).chain(f.aliases().iter().map(String::as_str)) {
            registry
                .scalar_functions
                .entry(name.to_string())
                .or_insert_with(|| Arc::clone(&f));
        }
    }
    registry
}

/// Waits until the scheduler's port accepts connections, trying every 200 ms for `patience`
/// (at least once).
async fn wait_for_scheduler(host: &str, port: u16, patience: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match tokio::net::TcpStream::connect((host, port)).await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() >= patience => {
                anyhow::bail!(
                    "cannot reach the scheduler at {host}:{port} (--scheduler-host, \
                     --scheduler-port) within {} s: {e}",
                    patience.as_secs()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
