//! The PostgreSQL wire protocol over the service's session (pgwire).
//!
//! * Simple and extended query protocol: every statement is planned and run through
//!   [`AppState::prepare`] / [`AppState::run`], so the HTTP API's statement policy (queries
//!   only) and limits (concurrency, time, memory, result rows and bytes, isolation) hold here.
//!   Statements are first rewritten by `datafusion-pg-catalog`'s PostgreSQL compatibility
//!   parser (what `psql` and GUI tools send to `pg_catalog`), and `pg_catalog` is installed in
//!   the session, so `\d` and the catalog queries of connecting tools are answered.
//! * The session-setting statements tools send at connect (`SET`, `RESET`, `BEGIN`, `COMMIT`,
//!   `ROLLBACK`, `DISCARD`, `DEALLOCATE`) are accepted and change nothing: the server's session
//!   is shared and read-only. `SHOW` answers the server's parameters.
//! * Errors are PostgreSQL error responses with a SQLSTATE: `38000` (external routine exception)
//!   when a plugin function failed, `57014` when the time limit passed or the client cancelled,
//!   `54000` past a result limit, `53300` when the server runs its most queries, `42000` for other
//!   refused or failing statements.
//! * A cancel request (the protocol's own, on a second connection with the key the server gave)
//!   stops the running query: its stream is dropped and its isolated calls are cancelled.
//! * Authentication: SCRAM-SHA-256 against the users file, or none (loopback only: checked by
//!   the program). TLS when an identity is given (clients ask with `SSLRequest`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ParamValues;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use futures::{Sink, Stream, StreamExt};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::ScramAuth;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, PgWireServerHandlers, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use udf_service::{ApiError, AppState, Prepared, Running};

use crate::auth::{SCRAM_ITERATIONS, TlsIdentity, Users};

/// The most connections served at once; more are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// How the PostgreSQL server runs.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Who may connect.
    pub users: Users,
    /// TLS, when given.
    pub tls: Option<TlsIdentity>,
    /// The most connections at once.
    pub max_connections: usize,
}

/// Installs `pg_catalog` (and the functions PostgreSQL tools call) into the service's session.
pub fn install_pg_catalog(state: &AppState) -> anyhow::Result<()> {
    let ctx = state.context();
    let catalog = ctx
        .state()
        .config()
        .options()
        .catalog
        .default_catalog
        .clone();
    datafusion_pg_catalog::setup_pg_catalog(
        ctx,
        &catalog,
        datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|e| anyhow::anyhow!("cannot install pg_catalog: {e}"))?;
    crate::pg_proc::install(ctx, &catalog)
}

/// Serves the PostgreSQL protocol on `listener` until `shutdown` completes.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    options: PgOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = match &options.tls {
        Some(identity) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            identity.rustls_config()?,
        ))),
        None => None,
    };
    let handlers = Arc::new(Handlers::new(state, &options)?);
    let connections = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (socket, addr) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL server: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(%addr, max = options.max_connections, "PostgreSQL server: too many connections, closing");
            drop(socket);
            continue;
        };
        let handlers = Arc::clone(&handlers);
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = pgwire::tokio::process_socket(socket, tls, handlers).await {
                tracing::debug!(%addr, error = %e, "PostgreSQL connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// The handlers of every connection.
struct Handlers {
    session: Arc<Session>,
    users: Users,
    manager: Arc<ConnectionManager>,
    cancel: Arc<DefaultCancelHandler>,
}

impl Handlers {
    fn new(state: AppState, options: &PgOptions) -> anyhow::Result<Handlers> {
        let manager = Arc::new(ConnectionManager::new());
        Ok(Handlers {
            session: Arc::new(Session {
                parser: Arc::new(Parser {
                    state: state.clone(),
                    sql: PostgresCompatibilityParser::new(),
                }),
                state,
            }),
            users: options.users.clone(),
            cancel: Arc::new(DefaultCancelHandler::new(Arc::clone(&manager))),
            manager,
        })
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.session)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.session)
    }

    /// A new handler for each connection: pgwire's SASL handler keeps the exchange's state in
    /// itself, so one shared by connections would mix their exchanges.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let manager = Arc::clone(&self.manager);
        Arc::new(if self.users.is_open() {
            Startup::Open(OpenStartup { manager })
        } else {
            let mut scram = ScramAuth::new(Arc::new(UsersSource(self.users.clone())));
            scram.set_iterations(SCRAM_ITERATIONS);
            Startup::Scram(Box::new(
                SASLAuthStartupHandler::new(Arc::new(parameters()))
                    .with_scram(scram)
                    .with_connection_manager(manager),
            ))
        })
    }

    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        Arc::clone(&self.cancel)
    }
}

/// The server parameters sent at connect (`server_version` and the like).
fn parameters() -> DefaultServerParameterProvider {
    DefaultServerParameterProvider::default()
}

/// Authentication: none, or SCRAM-SHA-256.
enum Startup {
    Open(OpenStartup),
    Scram(Box<SASLAuthStartupHandler<DefaultServerParameterProvider>>),
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(h) => h.on_startup(client, message).await,
            Startup::Scram(h) => h.on_startup(client, message).await,
        }
    }
}

/// No authentication; registers the connection for cancel requests.
struct OpenStartup {
    manager: Arc<ConnectionManager>,
}

impl NoopStartupHandler for OpenStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(Arc::clone(&self.manager))
    }
}

/// The users file as SCRAM's password source.
#[derive(Debug)]
struct UsersSource(Users);

#[async_trait]
impl AuthSource for UsersSource {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let name = login.user().unwrap_or_default();
        match self.0.get(name) {
            Some(user) => Ok(Password::new(
                Some(user.salt.clone()),
                user.salted_password.clone(),
            )),
            // An unknown user goes through the exchange with a password nobody knows and a salt
            // as stable as a real user's, so that the answers do not tell which users exist.
            None => {
                let salt = self.0.decoy_salt(name);
                let secret = crate::auth::random_bytes::<32>()
                    .map_err(|e| PgWireError::ApiError(e.into()))?;
                Ok(Password::new(Some(salt), secret.to_vec()))
            }
        }
    }
}

/// A statement as parsed: the SQL to run, or a session command answered here.
#[derive(Debug, Clone)]
pub(crate) enum Statement {
    /// A query, planned: its SQL (after the compatibility rewrite) and what it answers.
    Query { sql: String, prepared: Prepared },
    /// `SET`, `BEGIN`, … : accepted, changes nothing; the command tag to answer.
    Accepted(&'static str),
    /// `SHOW name`.
    Show(String),
}

/// The session commands answered without running anything, by first keyword: the tag answered.
const ACCEPTED: &[(&str, &str)] = &[
    ("SET", "SET"),
    ("RESET", "RESET"),
    ("BEGIN", "BEGIN"),
    ("START", "START TRANSACTION"),
    ("COMMIT", "COMMIT"),
    ("END", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("ABORT", "ROLLBACK"),
    ("DISCARD", "DISCARD ALL"),
    ("DEALLOCATE", "DEALLOCATE"),
];

/// The parameters `SHOW` answers.
fn show_value(name: &str) -> Option<String> {
    let value = match name.to_ascii_lowercase().as_str() {
        "server_version" => "16.6",
        "server_encoding" | "client_encoding" => "UTF8",
        "standard_conforming_strings" => "on",
        "datestyle" => "ISO, MDY",
        "timezone" => "UTC",
        "transaction_isolation" | "default_transaction_isolation" => "read committed",
        "transaction_read_only" | "default_transaction_read_only" => "on",
        "search_path" => "public",
        "integer_datetimes" => "on",
        "max_identifier_length" => "63",
        "application_name" => "",
        "is_superuser" => "off",
        _ => return None,
    };
    Some(value.to_string())
}

/// The first keyword of `sql`, upper-cased.
fn first_keyword(sql: &str) -> String {
    sql.trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// Parses PostgreSQL-flavoured SQL into statements, planned as the service allows.
struct Parser {
    state: AppState,
    sql: PostgresCompatibilityParser,
}

impl Parser {
    /// The statements of `text` (none for an empty query).
    async fn statements(&self, text: &str) -> PgWireResult<Vec<Statement>> {
        let parsed = self
            .sql
            .parse(text)
            .map_err(|e| user_error("42601", format!("syntax error: {e}")))?;
        let mut statements = Vec::with_capacity(parsed.len());
        for statement in parsed {
            let sql = statement.to_string();
            statements.push(self.statement(sql).await?);
        }
        Ok(statements)
    }

    async fn statement(&self, sql: String) -> PgWireResult<Statement> {
        let keyword = first_keyword(&sql);
        if let Some((_, tag)) = ACCEPTED.iter().find(|(k, _)| *k == keyword) {
            return Ok(Statement::Accepted(tag));
        }
        if keyword == "SHOW" {
            let name = sql.trim_start()[4..].trim().trim_end_matches(';').trim();
            return Ok(Statement::Show(name.to_string()));
        }
        let prepared = self.state.prepare(&sql).await.map_err(pg_error)?;
        Ok(Statement::Query { sql, prepared })
    }
}

#[async_trait]
impl QueryParser for Parser {
    type Statement = Statement;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Statement>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut statements = self.statements(sql).await?;
        match statements.len() {
            0 => Ok(None),
            1 => Ok(statements.pop()),
            n => Err(user_error(
                "42601",
                format!("cannot insert multiple commands into a prepared statement ({n} found)"),
            )),
        }
    }

    fn get_parameter_types(&self, statement: &Statement) -> PgWireResult<Vec<Type>> {
        match statement {
            Statement::Query { prepared, .. } => parameter_wire_types(prepared),
            _ => Ok(Vec::new()),
        }
    }

    fn get_result_schema(
        &self,
        statement: &Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match statement {
            Statement::Query { prepared, .. } => arrow_schema_to_pg_fields(
                &prepared.schema,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            ),
            Statement::Show(name) => Ok(show_fields(name, column_format)),
            Statement::Accepted(_) => Ok(Vec::new()),
        }
    }
}

/// The types a statement's parameters are described with (and decoded as, when the client did
/// not name them). PostgreSQL has no unsigned integers: a parameter that stands for one is
/// described as the signed type that holds every value clients usually send (`int8` for
/// `UInt64`), and the function's own coercion casts it (a negative value is the function's
/// error), instead of `numeric`, which integer bindings of drivers refuse.
fn parameter_wire_types(prepared: &Prepared) -> PgWireResult<Vec<Type>> {
    prepared
        .parameters
        .iter()
        .map(|t| match t {
            Some(DataType::UInt64 | DataType::UInt32) => Ok(Type::INT8),
            Some(DataType::UInt16) => Ok(Type::INT4),
            Some(DataType::UInt8) => Ok(Type::INT2),
            Some(t) => into_pg_type(t),
            None => Ok(Type::UNKNOWN),
        })
        .collect()
}

fn show_fields(name: &str, format: Option<&Format>) -> Vec<FieldInfo> {
    let format = format.map_or(pgwire::api::results::FieldFormat::Text, |f| f.format_for(0));
    vec![FieldInfo::new(
        name.to_ascii_lowercase(),
        None,
        None,
        Type::TEXT,
        format,
    )]
}

/// Runs statements for one connection.
struct Session {
    state: AppState,
    parser: Arc<Parser>,
}

impl Session {
    /// Answers `statement` with `params`, rows encoded as `format`.
    async fn answer<C>(
        &self,
        client: &C,
        statement: &Statement,
        params: Option<ParamValues>,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo,
    {
        match statement {
            Statement::Accepted(tag) => Ok(Response::Execution(Tag::new(tag))),
            Statement::Show(name) => {
                let value = show_value(name).ok_or_else(|| {
                    user_error(
                        "42704",
                        format!("unrecognized configuration parameter \"{name}\""),
                    )
                })?;
                let fields = Arc::new(show_fields(name, Some(format)));
                let mut encoder = DataRowEncoder::new(Arc::clone(&fields));
                encoder.encode_field(&Some(value))?;
                let row = encoder.take_row();
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    futures::stream::iter([Ok(row)]),
                )))
            }
            Statement::Query { sql, .. } => {
                // pgwire stops the query while it plans and computes its first batch (it drops
                // this future on a cancel request); the rows that follow listen themselves.
                let running = self.state.run(sql, params).await;
                let running = running.map_err(pg_error)?;
                let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                let fields = Arc::new(arrow_schema_to_pg_fields(
                    &running.schema(),
                    format,
                    Some(options),
                )?);
                let handle = client.session_extensions().get::<Arc<ConnectionHandle>>();
                let rows = Rows {
                    fields: Arc::clone(&fields),
                    running: Some(running),
                    batch: None,
                    listen: handle.map(|handle| {
                        Box::pin(listen(Arc::clone(&handle)))
                            as Pin<Box<dyn Future<Output = CancelReceiver> + Send>>
                    }),
                    cancelled: None,
                };
                Ok(Response::Query(QueryResponse::new(fields, rows)))
            }
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Session {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = self.parser.statements(query).await?;
        if statements.is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        let mut responses = Vec::with_capacity(statements.len());
        for statement in &statements {
            match self
                .answer(client, statement, None, &Format::UnifiedText)
                .await
            {
                Ok(response) => responses.push(response),
                Err(e) => {
                    responses.push(Response::Error(Box::new(error_info(e))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Session {
    type Statement = Statement;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        Arc::clone(&self.parser)
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Statement>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: std::fmt::Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = &portal.statement.statement;
        let params = match statement {
            Statement::Query { prepared, .. } if portal.parameter_len() > 0 => {
                let inferred: Vec<Option<&DataType>> =
                    prepared.parameters.iter().map(Option::as_ref).collect();
                let wire = parameter_wire_types(prepared)?;
                let wire: Vec<Option<&Type>> = wire.iter().map(Some).collect();
                Some(
                    arrow_pg::datatypes::df::deserialize_parameters_with_server_types(
                        portal, &inferred, &wire,
                    )?,
                )
            }
            _ => None,
        };
        self.answer(client, statement, params, &portal.result_column_format)
            .await
    }
}

/// What fires when a cancel request names this connection.
type CancelReceiver = futures::channel::oneshot::Receiver<()>;

/// Installs a cancel receiver of the rows' own in the connection's handle.
async fn listen(handle: Arc<ConnectionHandle>) -> CancelReceiver {
    handle.start_query().await
}

/// The rows of a running query, encoded batch by batch; a cancel request ends them with an error
/// (and drops the query).
///
/// pgwire listens for cancel requests only until the handler has answered (before the rows are
/// sent), so the rows listen again: on their first poll they install a receiver of their own in
/// the connection's handle (a cancel request in between those two is lost, as PostgreSQL's
/// cancel is best effort too).
struct Rows {
    fields: Arc<Vec<FieldInfo>>,
    running: Option<Running>,
    batch: Option<Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send>>,
    listen: Option<Pin<Box<dyn Future<Output = CancelReceiver> + Send>>>,
    cancelled: Option<CancelReceiver>,
}

impl Rows {
    fn end(&mut self) {
        self.running = None;
        self.batch = None;
        self.listen = None;
        self.cancelled = None;
    }
}

impl Stream for Rows {
    type Item = PgWireResult<DataRow>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(listen) = self.listen.as_mut()
            && let Poll::Ready(receiver) = listen.as_mut().poll(cx)
        {
            self.listen = None;
            self.cancelled = Some(receiver);
        }
        if let Some(cancelled) = self.cancelled.as_mut()
            && let Poll::Ready(fired) = Pin::new(cancelled).poll(cx)
        {
            self.cancelled = None;
            if fired.is_ok() {
                self.end();
                return Poll::Ready(Some(Err(cancelled_error())));
            }
        }
        loop {
            if let Some(batch) = self.batch.as_mut() {
                match batch.next() {
                    Some(row) => return Poll::Ready(Some(row)),
                    None => self.batch = None,
                }
            }
            let Some(running) = self.running.as_mut() else {
                return Poll::Ready(None);
            };
            match running.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.end();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.end();
                    return Poll::Ready(Some(Err(pg_error(e))));
                }
                Poll::Ready(Some(Ok(batch))) => self.batch = Some(encode(&self.fields, batch)),
            }
        }
    }
}

fn encode(
    fields: &Arc<Vec<FieldInfo>>,
    batch: RecordBatch,
) -> Box<dyn Iterator<Item = PgWireResult<DataRow>> + Send> {
    encode_recordbatch(Arc::clone(fields), batch)
}

/// A PostgreSQL error response.
fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message,
    )))
}

fn cancelled_error() -> PgWireError {
    user_error(
        "57014",
        "canceling statement due to user request".to_string(),
    )
}

/// The service's error as a PostgreSQL error response with its SQLSTATE.
fn pg_error(e: ApiError) -> PgWireError {
    let message = e.to_string();
    let code = match &e {
        ApiError::Timeout(_) => "57014",
        ApiError::ResultTooLarge(_) => "54000",
        ApiError::Busy(_) => "53300",
        ApiError::Internal(_) => "XX000",
        ApiError::BadRequest(_) | ApiError::Body(..) => "22023",
        ApiError::Query(m) if is_plugin_error(m) => "38000",
        ApiError::Query(_) => "42000",
    };
    user_error(code, message)
}

/// Whether an error message comes from a plugin function (the engine's errors name the plugin
/// library or the worker).
fn is_plugin_error(message: &str) -> bool {
    ["plugin", "worker"].iter().any(|w| message.contains(w))
}

/// The error info of an error, for a response in a list.
fn error_info(e: PgWireError) -> ErrorInfo {
    match e {
        PgWireError::UserError(info) => *info,
        other => ErrorInfo::new("ERROR".to_string(), "XX000".to_string(), other.to_string()),
    }
}
