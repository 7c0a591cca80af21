//! An HTTP service that answers SQL with plugin functions: the udfsql engine embedded in a
//! ordinary Rust service (axum on tokio).
//!
//! * `POST /query` — the SQL as the body (`text/plain`) or as JSON `{"sql": "..."}`; answers the
//!   rows as a JSON array of objects, or as an Arrow IPC stream with `?format=arrow` (or
//!   `Accept: application/vnd.apache.arrow.stream`). The answer is streamed: each batch is
//!   written as it arrives, never the whole result in memory.
//! * `GET /functions` — the plugin functions and their signatures.
//! * `GET /health` — `{"status": "ok"}`.
//!
//! Plugins are loaded at start-up only. Requests cannot load a library: DDL, DML and other
//! statements are refused for requests (DataFusion `SQLOptions`), and SQL loading is switched off
//! in the engine as well. The one exception is the administrator's [`Config::compile`]: then
//! `CREATE [OR REPLACE] FUNCTION ... LANGUAGE rust` and `DROP FUNCTION` of such functions run
//! (compiled into the shared session). Every request runs with a time limit and its own memory pool, over one
//! shared session (its catalog and functions).
//!
//! Limits of the answers ([`Config`]):
//! * [`Config::max_concurrent_queries`]: a query over it is answered at once with 503 and
//!   `Retry-After: 1`. A query holds its place until its answer has ended (or the client went
//!   away, or the time limit passed).
//! * [`Config::time_limit`] covers the whole query, its streamed answer included.
//! * [`Config::max_result_rows`] and [`Config::max_result_bytes`]: passed before anything was
//!   sent, the answer is 413 with a JSON error; passed later, a JSON answer ends with a last
//!   element `{"error": "..."}` (the array stays well-formed JSON) and an Arrow IPC answer ends,
//!   after its last whole record batch, with a second schema message (no fields) whose metadata
//!   holds the error under [`ARROW_ERROR_KEY`], without the end-of-stream marker: every IPC
//!   reader fails on it, never takes a shorter result for the whole. The query is cancelled at
//!   once in both cases; time limit, memory pool and plugin errors after the answer started end
//!   it the same way.
//! * What the service buffers of an answer is one chunk of about 64 KiB being encoded and one
//!   handed on (a single row larger than that is a chunk of its own), counted in the bytes limit
//!   and reserved in the query's memory pool.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use udf_engine::{CallCancel, Isolation, PluginLoader, WorkerLimits};

mod answer;
mod run;

pub use answer::CHUNK_BYTES;
pub use run::{MAX_PARAMETERS, Prepared, Running, number_question_marks};

/// The media type of Arrow IPC streams.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// The schema metadata key of the error message that ends an Arrow IPC answer which failed after
/// it started: the answer's last message is then a schema (no fields) with this key, which every
/// IPC reader refuses (a stream has one schema, first).
pub const ARROW_ERROR_KEY: &str = "udfsql.error";

/// How the service answers queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// A JSON array of row objects.
    #[default]
    Json,
    /// An Arrow IPC stream.
    Arrow,
}

impl OutputFormat {
    /// `JSON` or `Arrow IPC`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Json => "JSON",
            OutputFormat::Arrow => "Arrow IPC",
        }
    }
}

/// The default of [`Config::max_result_rows`]: one million rows.
pub const DEFAULT_MAX_RESULT_ROWS: u64 = 1_000_000;

/// The default of [`Config::max_result_bytes`]: 128 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 128 * 1024 * 1024;

/// The default of [`Config::max_concurrent_queries`]: twice the CPUs, at least 8.
pub fn default_max_concurrent_queries() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    cpus.saturating_mul(2).max(8)
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directories whose shared libraries are loaded at start-up.
    pub plugin_dirs: Vec<PathBuf>,
    /// Tables to register: name and CSV, Parquet or NDJSON file (by extension).
    pub tables: Vec<(String, PathBuf)>,
    /// The answer format when a request does not choose.
    pub format: OutputFormat,
    /// The longest a query may run, its streamed answer included.
    pub time_limit: Duration,
    /// The memory one query may use (DataFusion memory pool), in bytes.
    pub memory_limit: usize,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// How the plugin libraries run: in worker processes (the default, with
    /// [`WorkerLimits::default`]) or in the service's process.
    pub isolation: Isolation,
    /// The most rows one answer may hold ([`DEFAULT_MAX_RESULT_ROWS`]).
    pub max_result_rows: u64,
    /// The most bytes one answer may hold as sent, JSON or Arrow IPC
    /// ([`DEFAULT_MAX_RESULT_BYTES`]).
    pub max_result_bytes: u64,
    /// The most queries running at once; more are answered 503 with `Retry-After`
    /// ([`default_max_concurrent_queries`]).
    pub max_concurrent_queries: usize,
    /// The administrator's option that lets requests create functions written in SQL (`CREATE
    /// [OR REPLACE] FUNCTION ... LANGUAGE rust`, compiled with these options, shared by every
    /// client) and drop them; `None` (the default): refused like all DDL. Any client that can
    /// send a query can then run native code as the service's user: enable it only where every
    /// client is trusted (the PostgreSQL and Flight SQL servers' users file, a private network).
    pub compile: Option<udf_engine::compile::CompileOptions>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plugin_dirs: Vec::new(),
            tables: Vec::new(),
            format: OutputFormat::Json,
            time_limit: Duration::from_secs(30),
            memory_limit: 512 * 1024 * 1024,
            max_body: 1024 * 1024,
            isolation: Isolation::Process(WorkerLimits::default()),
            max_result_rows: DEFAULT_MAX_RESULT_ROWS,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_concurrent_queries: default_max_concurrent_queries(),
            compile: None,
        }
    }
}

/// The shared state: one session with the plugins and tables, and the limits.
#[derive(Clone)]
pub struct AppState {
    ctx: SessionContext,
    config: Arc<Config>,
    /// One permit per query running.
    queries: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("session", &self.ctx.session_id())
            .field("config", &self.config)
            .field("free_query_permits", &self.queries.available_permits())
            .finish()
    }
}

impl AppState {
    /// Loads the plugins and tables of `config` into a new session.
    ///
    /// Every plugin directory is checked as `udfsql --plugin-dir` checks it
    /// ([`udf_engine::trusted_libraries_in`]): the canonical directory, the directories above it
    /// and each library must not be writable by other users, and a symlinked library must stay
    /// inside its directory. One refused library refuses the start-up, naming the file.
    pub async fn new(config: Config) -> anyhow::Result<AppState> {
        if config.max_concurrent_queries == 0 {
            anyhow::bail!("max_concurrent_queries must be at least 1");
        }
        if config.max_concurrent_queries > tokio::sync::Semaphore::MAX_PERMITS {
            anyhow::bail!(
                "max_concurrent_queries must be at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            );
        }
        if config.max_result_bytes < 16 {
            anyhow::bail!("max_result_bytes must be at least 16 (the answer of no rows)");
        }
        let ctx = SessionContext::new();
        let mut loader = PluginLoader::new()
            .disable_sql_loading()
            .with_isolation(config.isolation.clone());
        if let Some(options) = &config.compile {
            loader = loader.with_compile(options.clone());
        }
        let mut libraries = Vec::new();
        for dir in &config.plugin_dirs {
            libraries.extend(udf_engine::trusted_libraries_in(dir)?);
            loader = loader.with_plugin_dir(dir)?;
        }
        let loader = Arc::new(loader);
        udf_engine::install(&ctx, Arc::clone(&loader))?;
        for file in &libraries {
            let library = loader.load(file)?;
            for r in udf_engine::register_library_with(&ctx, &library, &config.isolation)? {
                tracing::info!(function = %r.sql_name, library = %r.library.display(), isolated = r.isolated, "serving plugin function");
            }
        }
        for (name, path) in &config.tables {
            register_table(&ctx, name, path).await?;
        }
        Ok(AppState {
            ctx,
            queries: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_queries)),
            config: Arc::new(config),
        })
    }

    /// The shared session.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// A session for one query: the shared catalog and functions with a memory pool of its own,
    /// and `cancel` to stop its isolated plugin calls.
    fn request_context(&self, cancel: &CallCancel) -> Result<SessionContext, ApiError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.config.memory_limit, 1.0)
            .build_arc()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut state = SessionStateBuilder::new_from_existing(self.ctx.state())
            .with_runtime_env(runtime)
            .build();
        cancel.install(state.config_mut());
        Ok(SessionContext::new_with_state(state))
    }
}

async fn register_table(ctx: &SessionContext, name: &str, path: &Path) -> anyhow::Result<()> {
    let location = path
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("table file {} is not UTF-8", path.display()))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => {
            ctx.register_csv(name, location, CsvReadOptions::new())
                .await?
        }
        Some("parquet") => {
            ctx.register_parquet(name, location, ParquetReadOptions::default())
                .await?
        }
        Some("json" | "ndjson") => {
            ctx.register_json(name, location, JsonReadOptions::default())
                .await?
        }
        _ => anyhow::bail!(
            "table {name}: {} is not a .csv, .parquet, .json or .ndjson file",
            path.display()
        ),
    }
    Ok(())
}

/// The service's routes over `state`.
pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body;
    Router::new()
        .route("/query", post(query))
        .route("/functions", get(functions))
        .route("/health", get(health))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The SQL or a plugin failed (HTTP 400).
    #[error("{0}")]
    Query(String),
    /// The request itself is unusable (bad JSON, not UTF-8).
    #[error("{0}")]
    BadRequest(String),
    /// The body was refused (e.g. too large: 413).
    #[error("{1}")]
    Body(StatusCode, String),
    /// The query ran past the time limit (HTTP 408).
    #[error("the query ran longer than the time limit of {0:?} and was cancelled")]
    Timeout(Duration),
    /// The answer passed the rows or bytes limit before anything was sent (HTTP 413).
    #[error("{0}")]
    ResultTooLarge(String),
    /// As many queries as allowed are running (HTTP 503 with `Retry-After`).
    #[error(
        "the service is running its most queries at once ({0}, max-concurrent-queries); retry later"
    )]
    Busy(usize),
    /// Something broke in the service.
    #[error("{0}")]
    Internal(String),
}

/// The `Retry-After` of a 503 answer, in seconds.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Query(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Body(status, _) => *status,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::ResultTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        if let ApiError::Busy(_) = self {
            (status, [(header::RETRY_AFTER, RETRY_AFTER_SECS)], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

impl From<DataFusionError> for ApiError {
    fn from(e: DataFusionError) -> Self {
        ApiError::Query(e.to_string())
    }
}

#[derive(Deserialize)]
struct QueryBody {
    sql: String,
}

#[derive(Deserialize, Default)]
struct QueryParams {
    format: Option<OutputFormat>,
}

fn sql_of(headers: &HeaderMap, body: &[u8]) -> Result<String, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        let parsed: QueryBody = serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!("expected JSON {{\"sql\": \"...\"}}: {e}"))
        })?;
        Ok(parsed.sql)
    } else {
        String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::BadRequest("the SQL text is not UTF-8".to_string()))
    }
}

fn format_of(state: &AppState, params: &QueryParams, headers: &HeaderMap) -> OutputFormat {
    if let Some(f) = params.format {
        return f;
    }
    let wants_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(ARROW_STREAM));
    if wants_arrow {
        OutputFormat::Arrow
    } else {
        state.config.format
    }
}

/// What requests may run: queries only. No DDL (so no CREATE FUNCTION), no DML (no COPY TO), no
/// SET and other statements.
fn request_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

async fn query(
    State(state): State<AppState>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // At once: a query over the limit waits for nothing.
    let permit = Arc::clone(&state.queries)
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy(state.config.max_concurrent_queries))?;
    let body = body.map_err(|r| ApiError::Body(r.status(), r.body_text()))?;
    let sql = sql_of(&headers, &body)?;
    let format = format_of(&state, &params, &headers);
    let cancel = CallCancel::new();
    let ctx = state.request_context(&cancel)?;
    let limits = answer::Limits {
        max_rows: state.config.max_result_rows,
        max_bytes: state.config.max_result_bytes,
        deadline: tokio::time::Instant::now() + state.config.time_limit,
        time_limit: state.config.time_limit,
    };
    // The query runs as a task of its own, so that the time limit fires even while the query
    // waits inside a plugin call; when the limit passes or the client goes away, the task ends
    // and its isolated calls are cancelled (their workers are killed at once).
    let compile = state.compile_request(&sql)?;
    answer::answer(ctx, compile, sql, format, limits, cancel, permit).await
}

async fn functions(State(state): State<AppState>) -> Response {
    #[derive(Serialize)]
    struct Function {
        name: String,
        signature: String,
        library: String,
        abi: String,
        volatility: String,
        isolation: String,
        kind: String,
    }
    let list: Vec<Function> = udf_engine::plugin_functions(&state.ctx)
        .into_iter()
        .map(|f| Function {
            name: f.sql_name,
            signature: f.signature,
            library: f.library,
            abi: f.abi,
            volatility: f.volatility,
            isolation: f.isolation,
            kind: f.kind,
        })
        .collect();
    Json(list).into_response()
}

async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
