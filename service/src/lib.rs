//! An HTTP service that answers SQL with plugin functions: the udfsql engine embedded in a
//! ordinary Rust service (axum on tokio).
//!
//! * `POST /query` — the SQL as the body (`text/plain`) or as JSON `{"sql": "..."}`; answers the
//!   rows as a JSON array of objects, or as an Arrow IPC stream with `?format=arrow` (or
//!   `Accept: application/vnd.apache.arrow.stream`).
//! * `GET /functions` — the plugin functions and their signatures.
//! * `GET /health` — `{"status": "ok"}`.
//!
//! Plugins are loaded at start-up only. Requests cannot load a library: DDL, DML and other
//! statements are refused for requests (DataFusion `SQLOptions`), and SQL loading is switched off
//! in the engine as well. Every request runs with a time limit and its own memory pool, over one
//! shared session (its catalog and functions).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use udf_engine::{CallCancel, Isolation, PluginLoader, WorkerLimits};

/// The media type of Arrow IPC streams.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

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

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directories whose shared libraries are loaded at start-up.
    pub plugin_dirs: Vec<PathBuf>,
    /// Tables to register: name and CSV, Parquet or NDJSON file (by extension).
    pub tables: Vec<(String, PathBuf)>,
    /// The answer format when a request does not choose.
    pub format: OutputFormat,
    /// The longest a query may run.
    pub time_limit: Duration,
    /// The memory one query may use (DataFusion memory pool), in bytes.
    pub memory_limit: usize,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// How the plugin libraries run: in worker processes (the default, with
    /// [`WorkerLimits::default`]) or in the service's process.
    pub isolation: Isolation,
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
        }
    }
}

/// The shared state: one session with the plugins and tables, and the limits.
#[derive(Clone)]
pub struct AppState {
    ctx: SessionContext,
    config: Arc<Config>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("session", &self.ctx.session_id())
            .field("config", &self.config)
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
        let ctx = SessionContext::new();
        let mut loader = PluginLoader::new()
            .disable_sql_loading()
            .with_isolation(config.isolation.clone());
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
    /// Something broke in the service.
    #[error("{0}")]
    Internal(String),
}

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
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
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
    let body = body.map_err(|r| ApiError::Body(r.status(), r.body_text()))?;
    let sql = sql_of(&headers, &body)?;
    let format = format_of(&state, &params, &headers);
    let cancel = CallCancel::new();
    let ctx = state.request_context(&cancel)?;
    let started = Instant::now();
    let limit = state.config.time_limit;
    // The query runs as a task of its own, so that the time limit fires even while the query
    // waits inside a plugin call; when the limit passes or the client goes away (this future is
    // dropped), the guard aborts the task and cancels its isolated calls (their workers are
    // killed at once).
    let task = tokio::spawn(async move {
        let df = ctx.sql_with_options(&sql, request_options()).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok::<_, DataFusionError>((schema, batches))
    });
    let _stop = StopOnDrop {
        task: task.abort_handle(),
        cancel,
    };
    let (schema, batches) = tokio::time::timeout(limit, task)
        .await
        .map_err(|_| ApiError::Timeout(limit))?
        .map_err(|e| ApiError::Internal(format!("the query task failed: {e}")))??;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    tracing::debug!(rows, elapsed = ?started.elapsed(), "query answered");
    match format {
        OutputFormat::Json => json_rows(&batches),
        OutputFormat::Arrow => arrow_stream(&schema, &batches),
    }
}

/// Stops a query that has not finished when the request ends: aborts its task and cancels its
/// isolated plugin calls (a no-op for a query that finished).
struct StopOnDrop {
    task: tokio::task::AbortHandle,
    cancel: CallCancel,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.task.is_finished() {
            self.task.abort();
            self.cancel.cancel();
        }
    }
}

/// The rows as one JSON array ([`udf_engine::json`]): a value arrow cannot display (a timestamp
/// outside the range of calendar dates) makes the query fail (400) instead of answering error
/// text as data.
fn json_rows(batches: &[RecordBatch]) -> Result<Response, ApiError> {
    let body = udf_engine::json::json_array(batches).map_err(|e| match e {
        udf_engine::json::JsonError::Undisplayable { .. } => {
            ApiError::Query(format!("cannot answer as JSON: {e}"))
        }
        other => ApiError::Internal(other.to_string()),
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn arrow_stream(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
) -> Result<Response, ApiError> {
    let internal = |e: datafusion::arrow::error::ArrowError| ApiError::Internal(e.to_string());
    let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
        .map_err(internal)?;
    for batch in batches {
        writer.write(batch).map_err(internal)?;
    }
    writer.finish().map_err(internal)?;
    let body = writer.into_inner().map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, ARROW_STREAM)], body).into_response())
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
