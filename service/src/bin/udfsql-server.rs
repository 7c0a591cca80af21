//! `udfsql-server`: SQL with plugin functions over HTTP. See the `udf_service` crate docs.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use udf_engine::{Isolation, WorkerLimits};
use udf_service::{AppState, Config, OutputFormat};

/// Serve SQL with plugin functions over HTTP: POST /query, GET /functions, GET /health.
#[derive(Debug, Parser)]
#[command(name = "udfsql-server", version)]
struct Args {
    /// Load every shared library in DIR at start-up (repeatable). DIR, the directories above it
    /// and its libraries must not be writable by other users (as for udfsql). Requests cannot load
    /// libraries.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Register a CSV, Parquet or NDJSON file as a table (repeatable): NAME=FILE.
    #[arg(long = "table", value_name = "NAME=FILE", value_parser = parse_table)]
    tables: Vec<(String, PathBuf)>,
    /// Answer format when a request does not choose (`?format=` or an Accept header).
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    format: OutputFormat,
    /// Longest a query may run, in seconds: planning, execution and the whole streamed answer.
    #[arg(long, default_value_t = 30)]
    time_limit_secs: u64,
    /// Memory one query may use, in MiB.
    #[arg(long, default_value_t = 512)]
    memory_limit_mib: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_body: usize,
    /// Most rows one answer may hold. Answers are streamed; over the limit before anything was
    /// sent, the answer is 413 with a JSON error; after, a JSON array ends with a last element
    /// {"error": "..."} and an Arrow IPC stream ends with a second schema message (no fields)
    /// whose metadata "udfsql.error" holds the error, without the end-of-stream marker (IPC
    /// readers fail on it). The query is cancelled at once.
    #[arg(long, value_name = "ROWS", default_value_t = udf_service::DEFAULT_MAX_RESULT_ROWS)]
    max_result_rows: u64,
    /// Most bytes one answer may hold as sent (JSON text or Arrow IPC), counted chunk by chunk
    /// (about 64 KiB each); over it, as for --max-result-rows. Default: 128 MiB.
    #[arg(long, value_name = "BYTES", default_value_t = udf_service::DEFAULT_MAX_RESULT_BYTES)]
    max_result_bytes: u64,
    /// Most queries running at once; one more is answered at once with 503 and `Retry-After: 1`.
    /// A query counts until its answer has ended, its client went away or its time limit
    /// passed. Default: twice the CPUs, at least 8.
    #[arg(long, value_name = "N")]
    max_concurrent_queries: Option<usize>,
    /// Where plugin functions run: `process` evaluates them in worker processes (a plugin that
    /// crashes, exits, hangs or runs out of memory fails its request, not the service); `none`
    /// in the service's own process.
    #[arg(long, value_enum, default_value_t = IsolationArg::Process)]
    isolation: IsolationArg,
    /// Isolated calls: the longest one call (one batch) may run before its worker is killed, in
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    call_timeout: f64,
    /// Isolated calls: each worker's memory (address space) limit in MiB; 0 for none.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    worker_memory: u64,
    /// Isolated calls: worker processes per library (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IsolationArg {
    Process,
    None,
}

fn parse_table(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=FILE, got `{s}`"))?;
    if name.is_empty() || file.is_empty() {
        return Err(format!("expected NAME=FILE, got `{s}`"));
    }
    Ok((name.to_string(), PathBuf::from(file)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UDFSQL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let isolation = match args.isolation {
        IsolationArg::None => Isolation::InProcess,
        IsolationArg::Process => Isolation::Process(
            WorkerLimits::from_flags(args.call_timeout, args.worker_memory, args.workers)
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let config = Config {
        isolation,
        plugin_dirs: args.plugin_dirs,
        tables: args.tables,
        format: args.format,
        time_limit: Duration::from_secs(args.time_limit_secs),
        memory_limit: args.memory_limit_mib * 1024 * 1024,
        max_body: args.max_body,
        max_result_rows: args.max_result_rows,
        max_result_bytes: args.max_result_bytes,
        max_concurrent_queries: args
            .max_concurrent_queries
            .unwrap_or_else(udf_service::default_max_concurrent_queries),
    };
    let state = AppState::new(config).await?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    tracing::info!(addr = %listener.local_addr()?, "udfsql-server listening");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing requests in flight");
    };
    udf_service::serve(listener, udf_service::router(state), shutdown).await?;
    Ok(())
}
