//! `udfsql-server`: SQL with plugin functions over HTTP (the `udf_service` crate), and with
//! `--pg-addr` / `--flight-addr` over the PostgreSQL wire protocol and Arrow Flight SQL (the
//! `udf_protocols` crate), all over one session with one set of limits.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use udf_engine::{Isolation, WorkerLimits};
use udf_protocols::{TlsIdentity, Users};
use udf_service::{AppState, Config, OutputFormat};

/// Serve SQL with plugin functions over HTTP (POST /query, GET /functions, GET /health), and
/// optionally over the PostgreSQL wire protocol and Arrow Flight SQL.
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
    /// Also serve the PostgreSQL wire protocol on HOST:PORT (psql, JDBC, psycopg, ...).
    #[arg(long, value_name = "HOST:PORT")]
    pg_addr: Option<SocketAddr>,
    /// Also serve Arrow Flight SQL on HOST:PORT (ADBC, JDBC Flight SQL, arrow-flight clients).
    #[arg(long, value_name = "HOST:PORT")]
    flight_addr: Option<SocketAddr>,
    /// Users of the PostgreSQL (SCRAM-SHA-256) and Flight SQL (basic, then bearer token)
    /// servers: one `name:password` per line, mode 600. Without it, those servers authenticate
    /// nobody and must listen on a loopback address.
    #[arg(long, value_name = "FILE")]
    users_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the PostgreSQL and Flight SQL servers; with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the PostgreSQL and Flight SQL servers; with --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Most PostgreSQL connections at once; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = udf_protocols::pg::DEFAULT_MAX_CONNECTIONS)]
    pg_max_connections: usize,
    /// Administrator's option: let requests run `CREATE [OR REPLACE] FUNCTION ... LANGUAGE rust
    /// AS $$ body $$` (compiled with this machine's cargo, shared by every client) and `DROP
    /// FUNCTION` of such functions. Any client can then run native code as this server's user:
    /// only with trusted clients (a users file, a private network). Other DDL stays refused.
    #[arg(long)]
    allow_compile: bool,
    /// Where compiled functions are kept (default: $UDFSQL_CACHE_DIR, else
    /// $XDG_CACHE_HOME/udfsql/compiled, else ~/.cache/udfsql/compiled).
    #[arg(long, value_name = "DIR", requires = "allow_compile")]
    compile_cache: Option<PathBuf>,
    /// The udf-abi SDK compiled functions build against (default: $UDFSQL_SDK, else the
    /// udf-abi of the source tree this program was built from).
    #[arg(long, value_name = "DIR", requires = "allow_compile")]
    sdk: Option<PathBuf>,
    /// Compile with `cargo build --offline`.
    #[arg(long, requires = "allow_compile")]
    offline: bool,
    /// The longest one compilation may take, in seconds (the query's --time-limit-secs applies
    /// too: a CREATE over it fails, and the library built meanwhile is found in the cache next
    /// time).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    compile_timeout: u64,
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
        compile: if args.allow_compile {
            Some(
                udf_engine::compile::CompileOptions::from_flags(
                    args.sdk.as_deref(),
                    args.compile_cache.as_deref(),
                    args.offline,
                    args.compile_timeout,
                )
                .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        },
    };
    let users = match &args.users_file {
        Some(file) => Users::from_file(file)?,
        None => Users::open(),
    };
    for (flag, addr) in [
        ("--pg-addr", args.pg_addr),
        ("--flight-addr", args.flight_addr),
    ] {
        if let Some(addr) = addr
            && users.is_open()
            && !addr.ip().is_loopback()
        {
            anyhow::bail!(
                "{flag} {addr} is not a loopback address: give --users-file so that clients \
                 authenticate (and --tls-cert/--tls-key so that passwords are not sent in clear)"
            );
        }
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity::from_files(cert, key)?),
        _ => None,
    };
    let state = AppState::new(config).await?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.addr))?;
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({what})"))
    };
    let pg = match args.pg_addr {
        Some(addr) => Some(bind(addr, "--pg-addr").await?),
        None => None,
    };
    let flight = match args.flight_addr {
        Some(addr) => Some(bind(addr, "--flight-addr").await?),
        None => None,
    };
    tracing::info!(addr = %listener.local_addr()?, "udfsql-server listening");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut stop = stop.clone();
        async move {
            stop.wait_for(|s| *s).await.ok();
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(listener) = pg {
        udf_protocols::pg::install_pg_catalog(&state)?;
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), authentication = !users.is_open(), "PostgreSQL server listening");
        let options = udf_protocols::pg::PgOptions {
            users: users.clone(),
            tls: tls.clone(),
            max_connections: args.pg_max_connections,
        };
        servers.spawn(udf_protocols::pg::serve(
            state.clone(),
            listener,
            options,
            stopped(),
        ));
    }
    if let Some(listener) = flight {
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), authentication = !users.is_open(), "Flight SQL server listening");
        let server = udf_protocols::flight::FlightSqlServer::new(state.clone(), users.clone());
        servers.spawn(udf_protocols::flight::serve(
            server,
            listener,
            tls.clone(),
            stopped(),
        ));
    }
    let http_stopped = stopped();
    servers.spawn(async move {
        udf_service::serve(listener, udf_service::router(state), http_stopped).await?;
        Ok(())
    });
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down: finishing requests in flight");
            stop_tx.send(true).ok();
        }
        Some(ended) = servers.join_next() => {
            // A server that ends on its own failed: stop the others and say why.
            stop_tx.send(true).ok();
            ended.context("a server task panicked")??;
            anyhow::bail!("a server stopped on its own");
        }
    }
    while let Some(ended) = servers.join_next().await {
        ended.context("a server task panicked")??;
    }
    Ok(())
}
