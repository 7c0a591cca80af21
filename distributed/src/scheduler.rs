//! `udfsql-scheduler`: Ballista's scheduler with udfsql's codecs.
//!
//! The scheduler decodes the client's logical plan, plans it and sends stages to executors; plugin
//! functions pass through it as the client described them. It never maps plugin code. With
//! `--plugin-dir`, it also checks that each plan's library is there with the client's digest
//! (reading the file, not loading it), so that a cluster missing a library fails the query before
//! any task runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::{SchedulerConfig, TaskDistributionPolicy};
use ballista_scheduler::scheduler_process::start_server;
use clap::Parser;

use crate::codec::{PluginLogicalCodec, PluginPhysicalCodec};
use crate::resolve::{Resolver, Role};

/// Ballista's scheduler with udfsql's plugin functions: plans that call them are sent on to
/// executors, which load the same libraries (`udfsql-executor --plugin-dir`).
#[derive(Debug, Parser)]
#[command(name = "udfsql-scheduler", version)]
pub struct Args {
    /// Local host name or IP address to bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_host: String,
    /// Host name or IP address executors and clients reach this scheduler at.
    #[arg(long, default_value = "localhost")]
    pub external_host: String,
    /// Scheduler bind port.
    #[arg(short = 'p', long, default_value_t = 50050)]
    pub bind_port: u16,
    /// Identifier for this scheduler (default: a new UUID).
    #[arg(long = "id")]
    pub scheduler_id: Option<String>,
    /// Namespace of the Ballista cluster.
    #[arg(short = 'n', long, default_value = "ballista")]
    pub namespace: String,
    /// Task scheduling policy; executors must use the same.
    #[arg(short = 's', long, value_enum, default_value_t = Policy::PushStaged)]
    pub scheduler_policy: Policy,
    /// How tasks are distributed to executor slots.
    #[arg(long, value_enum, default_value_t = Distribution::Bias)]
    pub task_distribution: Distribution,
    /// Seconds without a heartbeat after which an executor counts as dead.
    #[arg(long, default_value_t = 180)]
    pub executor_timeout_seconds: u64,
    /// Seconds after which a finished job's shuffle data is removed (0: never).
    #[arg(long, default_value_t = 300)]
    pub finished_job_data_clean_up_interval_seconds: u64,
    /// Optional: directories holding the plugin libraries. When given, each plan's libraries
    /// must be here with the client's SHA-256 digest (the files are hashed, never loaded). Only
    /// regular files are read, opened without blocking (a FIFO or device is refused, never
    /// waited on); a file's digest is kept while its path, device, inode, size and times stay
    /// the same.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Log filter when $RUST_LOG is not set.
    #[arg(long, default_value = "info")]
    pub log_level_setting: String,
}

/// Ballista's task scheduling policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Executors poll the scheduler for tasks.
    PullStaged,
    /// The scheduler pushes tasks to executors.
    PushStaged,
}

impl Policy {
    /// Ballista's value.
    pub fn ballista(self) -> ballista_core::config::TaskSchedulingPolicy {
        match self {
            Policy::PullStaged => ballista_core::config::TaskSchedulingPolicy::PullStaged,
            Policy::PushStaged => ballista_core::config::TaskSchedulingPolicy::PushStaged,
        }
    }
}

/// Ballista's task distribution policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Distribution {
    /// Fill each executor's free slots first.
    Bias,
    /// One task per executor in turn.
    RoundRobin,
}

/// Runs the scheduler until SIGTERM or Ctrl-C.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    crate::init_logging(&args.log_level_setting);
    crate::run_daemon("udfsql-scheduler", run(args))
}

async fn run(args: Args) -> Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.bind_host, args.bind_port)
        .parse()
        .with_context(|| {
            format!(
                "--bind-host {} --bind-port {}: not an address to listen on",
                args.bind_host, args.bind_port
            )
        })?;
    let loader = Arc::new(crate::loader_for(&args.plugin_dirs)?);
    let mut config = SchedulerConfig::default();
    if let Some(id) = args.scheduler_id {
        config.scheduler_id = id;
    }
    let node = format!(
        "scheduler {} at {}:{}",
        config.scheduler_id, args.external_host, args.bind_port
    );
    let resolver = Arc::new(Resolver::new(node, Role::Plan, loader));
    config.bind_host = args.bind_host;
    config.bind_port = args.bind_port;
    config.external_host = args.external_host;
    config.namespace = args.namespace;
    config.scheduling_policy = args.scheduler_policy.ballista();
    config.task_distribution = match args.task_distribution {
        Distribution::Bias => TaskDistributionPolicy::Bias,
        Distribution::RoundRobin => TaskDistributionPolicy::RoundRobin,
    };
    config.executor_timeout_seconds = args.executor_timeout_seconds;
    config.finished_job_data_clean_up_interval_seconds =
        args.finished_job_data_clean_up_interval_seconds;
    config.override_logical_codec = Some(Arc::new(PluginLogicalCodec::ballista(Arc::clone(
        &resolver,
    ))));
    config.override_physical_codec = Some(Arc::new(PluginPhysicalCodec::ballista(resolver)));
    // Ballista's session, with udfsql's rule that moves asynchronous calls out of GROUP BY,
    // ORDER BY and window expressions (the scheduler makes the physical plan).
    config.override_session_builder = Some(Arc::new(|session_config| {
        let state = ballista_core::utils::default_session_builder(session_config)?;
        Ok(
            datafusion::execution::SessionStateBuilder::new_from_existing(state)
                .with_optimizer_rule(udf_engine::async_placement_rule())
                .build(),
        )
    }));
    let cluster = BallistaCluster::new_from_config(&config).await?;
    tracing::info!(%addr, plugin_dirs = ?args.plugin_dirs, "udfsql-scheduler starting");
    tokio::select! {
        served = start_server(cluster, addr, Arc::new(config)) => {
            served.with_context(|| format!("the scheduler on {addr} stopped"))
        }
        signal = crate::shutdown_signal() => {
            tracing::info!("udfsql-scheduler stopping on {signal}");
            Ok(())
        }
    }
}
