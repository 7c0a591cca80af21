//! udfsql's plugin functions on Apache Ballista: queries planned on a client run on executors in
//! other processes (and machines), each loading the library the client planned with from its own
//! plugin directories, pinned by its SHA-256 digest.
//!
//! * [`PluginSpec`] is what a plan carries for a plugin function: SQL name, library file name,
//!   digest, function, ABI, signature, volatility, call path and isolation.
//! * [`PluginLogicalCodec`] / [`PluginPhysicalCodec`] write and read it, and hand everything else
//!   to the codecs they wrap (Ballista's by default).
//! * [`Resolver`] turns a spec back into a function on a node: executors load and check it
//!   ([`Role::Evaluate`]); the scheduler plans with the carried signature ([`Role::Plan`]) and
//!   never maps plugin code.
//! * [`connect`] is the client: a [`SessionContext`](datafusion::prelude::SessionContext) on a
//!   cluster with udfsql installed.
//! * [`scheduler`] and [`executor`] run Ballista's scheduler and executor with these codecs (the
//!   `udfsql-scheduler` and `udfsql-executor` programs); [`LocalCluster`] starts them as processes
//!   on 127.0.0.1 (tests, benchmarks, trying it on one machine).
#![forbid(unsafe_code)]

mod aggregate;
pub mod cache;
mod client;
mod codec;
pub mod executor;
pub mod fuzz;
pub mod local;
mod resolve;
pub mod scheduler;
mod spec;

pub use aggregate::RemotePluginUdaf;
pub use client::{CONNECT_TIMEOUT, connect, session};
pub use codec::{PluginLogicalCodec, PluginPhysicalCodec};
pub use local::{ClusterOptions, ExecutorSpec, LocalCluster};
pub use resolve::{
    DEFAULT_FAILURE_TTL, DEFAULT_FUNCTION_CACHE, IsolationFloor, RemotePluginUdf, Resolver, Role,
};
pub use spec::{AggregateSpec, IsolationSpec, MAGIC, MAX_SPEC_BYTES, PluginSpec};

/// Logs to standard error, filtered by `$RUST_LOG` if set, else by `default` (`info`, ...).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// A [`PluginLoader`](udf_engine::PluginLoader) for `dirs`, each checked under udfsql's rules
/// for plugin directories; the error names the directory.
pub fn loader_for(dirs: &[std::path::PathBuf]) -> anyhow::Result<udf_engine::PluginLoader> {
    let mut loader = udf_engine::PluginLoader::new();
    for dir in dirs {
        loader = loader.with_plugin_dir(dir)?;
    }
    Ok(loader)
}

/// Runs a daemon's main future on a multi-threaded runtime (with Ballista's 32 MiB thread
/// stacks, for deep plans); an error is printed with its causes and the exit status is 1.
fn run_daemon(
    name: &str,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(32 * 1024 * 1024)
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the tokio runtime")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default dispositions end the process.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
