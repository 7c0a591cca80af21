//! Arrow Flight SQL for `udfsql-server`: the service's session, statement policy and limits
//! behind the Flight SQL calls that JDBC/ADBC/`arrow-flight` clients use.
//!
//! What is served:
//!
//! * `Handshake` with `authorization: Basic base64(user:password)` (or a `BasicAuth` payload)
//!   answers a bearer token in the `authorization` response header (`Bearer <token>`) and in the
//!   response payload. Every other call carries `authorization: Bearer <token>` or the Basic
//!   credentials themselves, unless the server has no users configured.
//! * Statements (`CommandStatementQuery`): planned at `GetFlightInfo` (queries only), run at
//!   `DoGet` with the ticket the answer names (the ticket carries the SQL).
//! * Prepared statements: `CreatePreparedStatement`, parameters bound with `DoPut` (one row),
//!   run at `DoGet`, `ClosePreparedStatement`.
//! * Metadata: `GetSqlInfo`, `GetCatalogs`, `GetDbSchemas`, `GetTables` (with the filter patterns
//!   and, on request, each table's Arrow schema) and `GetTableTypes`.
//!
//! Updates, ingestion, Substrait plans, transactions and `DoExchange` are refused: the server is
//! read-only. Every store a client can grow (tokens, prepared statements) is bounded; the oldest
//! entries are evicted first.

// tonic's `Status` is the error of every Flight call; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow::record_batch::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{DoPutError, FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementSubstraitPlan, CommandStatementUpdate, DoPutPreparedStatementResult,
    ProstMessageExt, SqlInfo, SqlNullOrdering, SqlSupportedCaseSensitivity,
    SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    Action, BasicAuth, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::TableType;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use prost::bytes::Bytes;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use udf_service::{ApiError, AppState, Running};

use crate::auth::Users;

/// The longest SQL text accepted (statements, prepared statements, statement tickets): 1 MiB.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// The largest gRPC message the server decodes: 16 MiB.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The most bearer tokens alive at once; the oldest is evicted past it.
pub const MAX_TOKENS: usize = 10_000;

/// How long a bearer token is valid after its handshake.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The most prepared statements kept at once; the oldest is evicted past it.
pub const MAX_PREPARED_STATEMENTS: usize = 10_000;

/// The most bytes (SQL, schemas, bound parameter values, estimated) the prepared statements may
/// hold together; the oldest are evicted past it.
pub const MAX_PREPARED_BYTES: usize = 256 << 20;

/// The longest `authorization` header value accepted.
const MAX_AUTHORIZATION_BYTES: usize = 4096;

/// The most bytes the token store's entries (user names) may hold together.
const MAX_TOKEN_BYTES: usize = 64 << 20;

/// The longest catalog name, filter pattern or table type a metadata request may carry.
const MAX_FILTER_BYTES: usize = 1024;

/// The most table types a `GetTables` request may filter on.
const MAX_TABLE_TYPES: usize = 64;

/// The most ids a `GetSqlInfo` request may ask for.
const MAX_SQL_INFO_IDS: usize = 4096;

/// The most `FlightData` messages a `DoPut` binding parameters may send.
const MAX_PUT_MESSAGES: usize = 64;

/// The longest error message put in a `Status` (it travels in an HTTP/2 header).
const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

/// The bytes of randomness in a bearer token.
const TOKEN_RANDOM_BYTES: usize = 32;

/// The bytes of randomness in a prepared statement handle.
const HANDLE_RANDOM_BYTES: usize = 16;

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an accept error (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The most concurrent calls (HTTP/2 streams) one connection may have open.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// The table types the catalog can report, as Flight SQL names them.
const TABLE_TYPES: [&str; 3] = ["LOCAL TEMPORARY", "TABLE", "VIEW"];

/// The message of an `unauthenticated` answer to a call without credentials.
const AUTH_REQUIRED: &str = "authentication required: perform a Handshake with \
    `authorization: Basic base64(user:password)` and send the `authorization: Bearer <token>` it \
    answers (or send the Basic credentials on every call)";

/// The stream `DoGet` answers.
type DoGetStream = <FlightSqlServer as FlightService>::DoGetStream;

/// The stream `Handshake` answers.
type HandshakeStream = Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>;

/// Who made a call: the authenticated user, or `None` when the server has no users configured.
type Principal = Option<Arc<str>>;

/// The Arrow Flight SQL service over the shared [`AppState`].
pub struct FlightSqlServer {
    /// The session, statement policy and limits queries run under.
    state: AppState,
    /// The users allowed in (open when none are configured).
    users: Users,
    /// Bearer tokens handed out by `Handshake`.
    tokens: Mutex<BoundedMap<String, TokenEntry>>,
    /// Prepared statements by handle.
    prepared: Mutex<BoundedMap<Bytes, PreparedEntry>>,
    /// The answer to `GetSqlInfo`, built once (or why it could not be).
    sql_info: Result<SqlInfoData, String>,
}

impl std::fmt::Debug for FlightSqlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSqlServer")
            .field("state", &self.state)
            .field("open", &self.users.is_open())
            .field("tokens", &lock(&self.tokens).len())
            .field("prepared", &lock(&self.prepared).len())
            .finish_non_exhaustive()
    }
}

/// A live bearer token.
struct TokenEntry {
    /// The user the token was issued to.
    user: Arc<str>,
    /// When the token stops being accepted.
    expires: Instant,
}

/// A prepared statement: what was planned, who may use it, and the parameters bound to it.
#[derive(Clone)]
struct PreparedEntry {
    /// The principal that created it; only it may use or close it.
    owner: Principal,
    /// The SQL text.
    sql: Arc<str>,
    /// The result schema found at planning.
    schema: SchemaRef,
    /// The parameter types found at planning (`$1` first; `None` where none was inferred).
    parameters: Arc<Vec<Option<DataType>>>,
    /// The values bound by the last `DoPut`, one per parameter.
    bound: Option<Arc<Vec<ScalarValue>>>,
}

impl PreparedEntry {
    /// The bytes this entry is counted as in the store (an estimate of what it holds).
    fn cost(&self) -> usize {
        let fields = self.schema.fields().len() + self.parameters.len();
        let bound: usize = self
            .bound
            .as_ref()
            .map_or(0, |values| values.iter().map(ScalarValue::size).sum());
        256usize
            .saturating_add(self.sql.len())
            .saturating_add(fields.saturating_mul(64))
            .saturating_add(bound)
    }

    /// The parameter values to run with: `Ok(None)` when the statement takes none, an error
    /// when it takes some and none were bound.
    fn params(&self) -> Result<Option<ParamValues>, Status> {
        if self.parameters.is_empty() {
            return Ok(None);
        }
        match &self.bound {
            Some(values) => Ok(Some(ParamValues::from(values.as_ref().clone()))),
            None => Err(Status::failed_precondition(format!(
                "the prepared statement takes {} parameter(s); bind them with DoPut before \
                 executing it",
                self.parameters.len()
            ))),
        }
    }
}

impl FlightSqlServer {
    /// A Flight SQL service over `state`, letting in `users`.
    pub fn new(state: AppState, users: Users) -> Self {
        let sql_info = build_sql_info();
        if let Err(e) = &sql_info {
            tracing::error!(error = %e, "could not build the Flight SQL GetSqlInfo answer");
        }
        Self {
            state,
            users,
            tokens: Mutex::new(BoundedMap::new(MAX_TOKENS, MAX_TOKEN_BYTES)),
            prepared: Mutex::new(BoundedMap::new(MAX_PREPARED_STATEMENTS, MAX_PREPARED_BYTES)),
            sql_info,
        }
    }

    /// Who made a call with `metadata`: a bearer token from a handshake or Basic credentials,
    /// unless the server is open.
    fn authorize(&self, metadata: &MetadataMap) -> Result<Principal, Status> {
        if self.users.is_open() {
            return Ok(None);
        }
        let value = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated(AUTH_REQUIRED))?
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?;
        match parse_authorization(value)? {
            Credentials::Bearer(token) => self.check_token(token).map(Some),
            Credentials::Basic { user, password } => {
                if self.users.check(&user, &password) {
                    Ok(Some(Arc::from(user)))
                } else {
                    Err(Status::unauthenticated("invalid user name or password"))
                }
            }
        }
    }

    /// The user a live bearer `token` was issued to.
    fn check_token(&self, token: &str) -> Result<Arc<str>, Status> {
        let now = Instant::now();
        let mut tokens = lock(&self.tokens);
        let found = tokens
            .get(token)
            .map(|entry| (entry.expires > now, Arc::clone(&entry.user)));
        match found {
            Some((true, user)) => Ok(user),
            Some((false, _)) => {
                tokens.remove(token);
                Err(Status::unauthenticated(
                    "the bearer token has expired; perform a Handshake again",
                ))
            }
            None => Err(Status::unauthenticated(
                "unknown bearer token (expired, evicted, or issued by another server); perform \
                 a Handshake again",
            )),
        }
    }

    /// Issues a bearer token for `user`, evicting expired and, past [`MAX_TOKENS`], the oldest
    /// tokens.
    fn issue_token(&self, user: Arc<str>) -> Result<String, Status> {
        let token = random_hex::<TOKEN_RANDOM_BYTES>()?;
        if self.users.is_open() {
            // Tokens are not checked when no users are configured: nothing to remember.
            return Ok(token);
        }
        let now = Instant::now();
        let cost = 128usize.saturating_add(user.len());
        let entry = TokenEntry {
            user,
            expires: now + TOKEN_LIFETIME,
        };
        let mut tokens = lock(&self.tokens);
        tokens.evict_oldest_while(|entry| entry.expires <= now);
        tokens
            .insert(token.clone(), entry, cost)
            .map_err(|_| Status::resource_exhausted("the user name is too long to hold"))?;
        Ok(token)
    }

    /// The prepared statement `handle`, if `principal` created it.
    fn prepared(&self, handle: &[u8], principal: &Principal) -> Result<PreparedEntry, Status> {
        lock(&self.prepared)
            .get(handle)
            .filter(|entry| entry.owner == *principal)
            .cloned()
            .ok_or_else(unknown_handle)
    }

    /// The `GetSqlInfo` answer data.
    fn sql_info(&self) -> Result<&SqlInfoData, Status> {
        self.sql_info
            .as_ref()
            .map_err(|e| Status::internal(format!("the server's SqlInfo is unavailable: {e}")))
    }

    /// Runs `sql` with `params` and streams its batches as Flight data.
    async fn run(&self, sql: &str, params: Option<ParamValues>) -> Result<DoGetStream, Status> {
        let running = self.state.run(sql, params).await.map_err(api_status)?;
        Ok(stream_running(running))
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlServer {
    /// The gRPC service is this server itself (through arrow-flight's blanket implementation).
    type FlightService = FlightSqlServer;

    /// Checks Basic credentials (header, or a `BasicAuth` payload) and answers a bearer token.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<HandshakeStream>, Status> {
        let header = match request.metadata().get("authorization") {
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("the authorization header is not ASCII"))?
                    .to_string(),
            ),
            None => None,
        };
        let user: Arc<str> = if self.users.is_open() {
            let user = header
                .as_deref()
                .and_then(|value| match parse_authorization(value) {
                    Ok(Credentials::Basic { user, .. }) => Some(user),
                    _ => None,
                })
                .unwrap_or_else(|| "anonymous".to_string());
            Arc::from(user)
        } else {
            let (user, password) = match header.as_deref() {
                Some(value) => match parse_authorization(value)? {
                    Credentials::Basic { user, password } => (user, password),
                    Credentials::Bearer(_) => {
                        return Err(Status::unauthenticated(
                            "Handshake takes Basic credentials: `authorization: Basic \
                             base64(user:password)`",
                        ));
                    }
                },
                None => {
                    let first = request.into_inner().message().await?.ok_or_else(|| {
                        Status::unauthenticated(
                            "Handshake without credentials: send `authorization: Basic \
                             base64(user:password)`",
                        )
                    })?;
                    let auth = BasicAuth::decode(first.payload).map_err(|_| {
                        Status::unauthenticated(
                            "Handshake without credentials: send `authorization: Basic \
                             base64(user:password)`",
                        )
                    })?;
                    (auth.username, auth.password)
                }
            };
            if !self.users.check(&user, &password) {
                tracing::warn!(user = %user, "Flight SQL handshake refused: invalid credentials");
                return Err(Status::unauthenticated("invalid user name or password"));
            }
            Arc::from(user)
        };
        let token = self.issue_token(Arc::clone(&user))?;
        tracing::debug!(user = %user, "Flight SQL handshake");
        let header: AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("could not encode the bearer token as a header"))?;
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: Bytes::from(token.into_bytes()),
        };
        let stream: HandshakeStream = Box::pin(futures::stream::iter([Ok(answer)]));
        let mut response = Response::new(stream);
        response.metadata_mut().insert("authorization", header);
        Ok(response)
    }

    /// Plans a statement (queries only) and answers its schema and a ticket carrying the SQL.
    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        no_transaction(query.transaction_id.as_ref())?;
        check_sql(&query.query)?;
        let prepared = self.state.prepare(&query.query).await.map_err(api_status)?;
        if !prepared.parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "the statement takes {} parameter(s) ($1, ...); use a prepared statement and \
                 bind them",
                prepared.parameters.len()
            )));
        }
        let ticket = TicketStatementQuery {
            statement_handle: Bytes::from(query.query.into_bytes()),
        };
        let info = flight_info(
            &prepared.schema,
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )?;
        Ok(Response::new(info))
    }

    /// Answers the schema of a prepared statement and a ticket that runs it.
    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = self.authorize(request.metadata())?;
        let entry = self.prepared(&query.prepared_statement_handle, &principal)?;
        entry.params()?;
        let info = flight_info(
            &entry.schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )?;
        Ok(Response::new(info))
    }

    /// Answers the schema of the catalog list and a ticket for it.
    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        let info = flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    /// Answers the schema of the schema list and a ticket for it.
    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        check_filter("catalog", query.catalog.as_deref())?;
        check_filter(
            "db_schema_filter_pattern",
            query.db_schema_filter_pattern.as_deref(),
        )?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        let info = flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    /// Answers the schema of the table list (with or without table schemas) and a ticket for it.
    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        check_tables_request(&query)?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        let info = flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    /// Answers the schema of the table type list and a ticket for it.
    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        let info = flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    /// Answers the schema of the SqlInfo list and a ticket for it.
    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.authorize(request.metadata())?;
        check_sql_info_request(&query)?;
        let data = self.sql_info()?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder(data).schema();
        let info = flight_info(&schema, ticket, request.into_inner())?;
        Ok(Response::new(info))
    }

    /// Runs the statement the ticket carries.
    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let sql = sql_from_ticket(&ticket.statement_handle)?;
        tracing::debug!(sql_bytes = sql.len(), "Flight SQL statement");
        Ok(Response::new(self.run(sql, None).await?))
    }

    /// Runs a prepared statement with the parameters bound to it.
    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let principal = self.authorize(request.metadata())?;
        let entry = self.prepared(&query.prepared_statement_handle, &principal)?;
        let params = entry.params()?;
        tracing::debug!(sql_bytes = entry.sql.len(), "Flight SQL prepared statement");
        let running = self
            .state
            .run(&entry.sql, params)
            .await
            .map_err(api_status)?;
        Ok(Response::new(stream_as(running, Some(&entry.schema))))
    }

    /// Lists the session's catalogs.
    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        for catalog in self.state.context().catalog_names() {
            builder.append(catalog);
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(metadata_error)?;
        Ok(Response::new(one_batch(schema, batch)))
    }

    /// Lists the session's schemas, filtered as the request asks.
    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        check_filter("catalog", query.catalog.as_deref())?;
        check_filter(
            "db_schema_filter_pattern",
            query.db_schema_filter_pattern.as_deref(),
        )?;
        let catalog_filter = query.catalog.clone();
        let ctx = self.state.context();
        let mut builder = query.into_builder();
        for catalog_name in ctx.catalog_names() {
            if catalog_filter.as_ref().is_some_and(|c| *c != catalog_name) {
                continue;
            }
            let Some(catalog) = ctx.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                builder.append(&catalog_name, &schema_name);
            }
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(metadata_error)?;
        Ok(Response::new(one_batch(schema, batch)))
    }

    /// Lists the session's tables (with their Arrow schemas on request), filtered as the
    /// request asks.
    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        check_tables_request(&query)?;
        let catalog_filter = query.catalog.clone();
        let ctx = self.state.context();
        let mut builder = query.into_builder();
        for catalog_name in ctx.catalog_names() {
            if catalog_filter.as_ref().is_some_and(|c| *c != catalog_name) {
                continue;
            }
            let Some(catalog) = ctx.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else {
                    continue;
                };
                for table_name in schema.table_names() {
                    let table = match schema.table(&table_name).await {
                        Ok(Some(table)) => table,
                        Ok(None) => continue,
                        Err(e) => {
                            tracing::debug!(
                                table = %table_name,
                                error = %e,
                                "GetTables: skipping a table that does not open"
                            );
                            continue;
                        }
                    };
                    builder
                        .append(
                            &catalog_name,
                            &schema_name,
                            &table_name,
                            table_type_name(table.table_type()),
                            &table.schema(),
                        )
                        .map_err(metadata_error)?;
                }
            }
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(metadata_error)?;
        Ok(Response::new(one_batch(schema, batch)))
    }

    /// Lists the table types the catalog reports.
    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        let mut builder = query.into_builder();
        for table_type in TABLE_TYPES {
            builder.append(table_type);
        }
        let schema = builder.schema();
        let batch = builder.build().map_err(metadata_error)?;
        Ok(Response::new(one_batch(schema, batch)))
    }

    /// Answers the SqlInfo entries asked for (all when none are named).
    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.authorize(request.metadata())?;
        check_sql_info_request(&query)?;
        let data = self.sql_info()?;
        let schema = data.schema();
        let batch = query.into_builder(data).build().map_err(metadata_error)?;
        Ok(Response::new(one_batch(schema, batch)))
    }

    /// Refuses a `DoPut` without a command.
    async fn do_put_error_callback(
        &self,
        _request: Request<PeekableFlightDataStream>,
        error: DoPutError,
    ) -> Result<Response<<Self as FlightService>::DoPutStream>, Status> {
        Err(Status::invalid_argument(format!("DoPut: {error}")))
    }

    /// Refuses updates: the server is read-only.
    async fn do_put_statement_update(
        &self,
        _query: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "DoPut CommandStatementUpdate: this server is read-only; only queries are served",
        ))
    }

    /// Refuses bulk ingestion: the server is read-only.
    async fn do_put_statement_ingest(
        &self,
        _query: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "DoPut CommandStatementIngest: this server is read-only; bulk ingestion is not served",
        ))
    }

    /// Refuses prepared updates: the server is read-only.
    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "DoPut CommandPreparedStatementUpdate: this server is read-only; only queries are \
             served",
        ))
    }

    /// Refuses Substrait plans.
    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(Status::unimplemented(
            "DoPut CommandStatementSubstraitPlan: Substrait plans are not served; send SQL",
        ))
    }

    /// Refuses Substrait plans.
    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented(
            "GetFlightInfo CommandStatementSubstraitPlan: Substrait plans are not served; send SQL",
        ))
    }

    /// Binds one row of parameter values to a prepared statement and answers its handle.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let principal = self.authorize(request.metadata())?;
        let handle = query.prepared_statement_handle;
        let entry = self.prepared(&handle, &principal)?;
        let data = request
            .into_inner()
            .take(MAX_PUT_MESSAGES + 1)
            .enumerate()
            .map(|(i, item)| {
                if i >= MAX_PUT_MESSAGES {
                    Err(FlightError::protocol(format!(
                        "more than {MAX_PUT_MESSAGES} messages of parameters"
                    )))
                } else {
                    item.map_err(FlightError::from)
                }
            });
        let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
        let mut row: Option<RecordBatch> = None;
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(put_error)?;
            if batch.num_rows() == 0 {
                continue;
            }
            if row.is_some() || batch.num_rows() > 1 {
                return Err(Status::invalid_argument(
                    "prepared queries bind one row of parameters at a time; got more than one",
                ));
            }
            row = Some(batch);
        }
        let values = match row {
            Some(batch) => parameter_values(&batch, &entry.parameters)?,
            None if entry.parameters.is_empty() => Vec::new(),
            None => {
                return Err(Status::invalid_argument(format!(
                    "expected one row of {} parameter value(s); got no rows",
                    entry.parameters.len()
                )));
            }
        };
        {
            let mut prepared = lock(&self.prepared);
            let mut entry = prepared
                .get(&handle[..])
                .filter(|entry| entry.owner == principal)
                .cloned()
                .ok_or_else(unknown_handle)?;
            entry.bound = Some(Arc::new(values));
            let cost = entry.cost();
            prepared.insert(handle.clone(), entry, cost).map_err(|_| {
                Status::resource_exhausted(format!(
                    "the bound parameter values are larger than the {MAX_PREPARED_BYTES} bytes \
                     prepared statements may hold"
                ))
            })?;
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle),
        })
    }

    /// Plans a query and keeps it under a new handle, answering its result and parameter
    /// schemas.
    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let principal = self.authorize(request.metadata())?;
        no_transaction(query.transaction_id.as_ref())?;
        check_sql(&query.query)?;
        // ADBC and JDBC drivers write parameters as `?`: numbered in order, as `$1`, `$2`, ...
        let sql = udf_service::number_question_marks(&query.query).map_err(api_status)?;
        let prepared = self.state.prepare(&sql).await.map_err(api_status)?;
        let parameter_schema = Schema::new(
            prepared
                .parameters
                .iter()
                .enumerate()
                .map(|(i, data_type)| {
                    Field::new(
                        format!("${}", i + 1),
                        data_type.clone().unwrap_or(DataType::Utf8),
                        true,
                    )
                })
                .collect::<Vec<_>>(),
        );
        let dataset_schema = schema_ipc(&prepared.schema)?;
        let parameter_schema = schema_ipc(&parameter_schema)?;
        let handle = Bytes::from(random_hex::<HANDLE_RANDOM_BYTES>()?.into_bytes());
        let entry = PreparedEntry {
            owner: principal,
            sql: Arc::from(sql),
            schema: prepared.schema,
            parameters: Arc::new(prepared.parameters),
            bound: None,
        };
        let cost = entry.cost();
        lock(&self.prepared)
            .insert(handle.clone(), entry, cost)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "the prepared statement is larger than the {MAX_PREPARED_BYTES} bytes \
                     prepared statements may hold"
                ))
            })?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle,
            dataset_schema,
            parameter_schema,
        })
    }

    /// Forgets a prepared statement (closing an unknown handle is not an error).
    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let principal = self.authorize(request.metadata())?;
        let handle = &query.prepared_statement_handle[..];
        let mut prepared = lock(&self.prepared);
        if prepared
            .get(handle)
            .is_some_and(|entry| entry.owner == principal)
        {
            prepared.remove(handle);
        }
        Ok(())
    }

    /// Refuses `DoExchange`.
    async fn do_exchange_fallback(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<<Self as FlightService>::DoExchangeStream>, Status> {
        Err(Status::unimplemented(
            "DoExchange is not served by this Flight SQL server",
        ))
    }

    /// Does nothing: the SqlInfo answer is fixed when the server is built.
    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Serves `server` on `listener` until `shutdown` completes (then lets the calls in flight
/// finish), with TLS when `tls` is `Some((certificate chain PEM, private key PEM))`.
pub async fn serve(
    server: FlightSqlServer,
    listener: tokio::net::TcpListener,
    tls: Option<crate::auth::TlsIdentity>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let address = listener.local_addr().ok();
    let service = FlightServiceServer::new(server).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut builder = Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    let with_tls = tls.is_some();
    if let Some(crate::auth::TlsIdentity {
        cert_pem: cert,
        key_pem: key,
    }) = tls
    {
        // rustls needs a process-wide crypto provider; an error means one is installed already.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        builder = builder
            .tls_config(config)
            .context("the Flight SQL server's TLS certificate or key is not usable")?;
    }
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = match listener.accept().await {
            Ok((stream, _peer)) => {
                // Small answers (metadata, errors) should not wait for Nagle's algorithm.
                stream.set_nodelay(true).ok();
                Ok(stream)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Flight SQL: accepting a connection failed");
                // Out of file descriptors and the like: do not spin on the error.
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                Err(e)
            }
        };
        Some((accepted, listener))
    });
    tracing::info!(address = ?address, tls = with_tls, "serving Arrow Flight SQL");
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("the Flight SQL server failed")?;
    Ok(())
}

/// The `GetSqlInfo` answer: what this server is and supports.
fn build_sql_info() -> Result<SqlInfoData, String> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "udfsql");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow IPC format version (Schema.fbs MetadataVersion V5).
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    builder.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
    builder.append(SqlInfo::SqlDdlCatalog, false);
    builder.append(SqlInfo::SqlDdlSchema, false);
    builder.append(SqlInfo::SqlDdlTable, false);
    builder.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    builder.append(SqlInfo::SqlAllTablesAreSelectable, true);
    builder.append(
        SqlInfo::SqlNullOrdering,
        SqlNullOrdering::SqlNullsSortedHigh as i32,
    );
    builder.append(SqlInfo::SqlSupportsColumnAliasing, true);
    builder.append(SqlInfo::SqlTransactionsSupported, false);
    builder.build().map_err(|e| e.to_string())
}

/// The gRPC status of a service error.
fn api_status(error: ApiError) -> Status {
    let message = bounded_message(error.to_string());
    match error {
        ApiError::Query(_) | ApiError::BadRequest(_) | ApiError::Body(..) => {
            Status::invalid_argument(message)
        }
        ApiError::Timeout(_) => Status::deadline_exceeded(message),
        ApiError::ResultTooLarge(_) => Status::resource_exhausted(message),
        ApiError::Busy(_) => Status::unavailable(message),
        ApiError::Internal(_) => Status::internal(message),
    }
}

/// `message` cut to [`MAX_STATUS_MESSAGE_BYTES`] (at a character boundary).
fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut end = MAX_STATUS_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(" [...]");
    }
    message
}

/// The status of an error building a metadata answer.
fn metadata_error(error: impl std::fmt::Display) -> Status {
    Status::internal(bounded_message(format!(
        "could not build the metadata answer: {error}"
    )))
}

/// The status of an error reading the parameters of a `DoPut`.
fn put_error(error: FlightError) -> Status {
    match error {
        FlightError::Tonic(status) => *status,
        other => Status::invalid_argument(bounded_message(format!(
            "could not read the parameter values: {other}"
        ))),
    }
}

/// The status of a prepared statement handle that is not (or no longer) known.
fn unknown_handle() -> Status {
    Status::not_found(
        "unknown prepared statement handle (closed, evicted, or created by another user); \
         prepare the statement again",
    )
}

/// Refuses a transaction id: the server has no transactions.
fn no_transaction(transaction_id: Option<&Bytes>) -> Result<(), Status> {
    match transaction_id {
        Some(_) => Err(Status::unimplemented(
            "transactions are not supported by this read-only server",
        )),
        None => Ok(()),
    }
}

/// Checks the size of a statement's SQL.
fn check_sql(sql: &str) -> Result<(), Status> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(Status::invalid_argument(format!(
            "the statement is {} bytes long; at most {MAX_SQL_BYTES} are accepted",
            sql.len()
        )));
    }
    if sql.trim().is_empty() {
        return Err(Status::invalid_argument("the statement is empty"));
    }
    Ok(())
}

/// The SQL a statement ticket carries.
fn sql_from_ticket(handle: &[u8]) -> Result<&str, Status> {
    if handle.len() > MAX_SQL_BYTES {
        return Err(Status::invalid_argument(format!(
            "the statement ticket is {} bytes long; at most {MAX_SQL_BYTES} are accepted",
            handle.len()
        )));
    }
    std::str::from_utf8(handle)
        .map_err(|_| Status::invalid_argument("the statement ticket is not UTF-8 SQL"))
}

/// Checks the length of a metadata request's catalog name or filter pattern.
fn check_filter(name: &str, value: Option<&str>) -> Result<(), Status> {
    match value {
        Some(value) if value.len() > MAX_FILTER_BYTES => Err(Status::invalid_argument(format!(
            "{name} is {} bytes long; at most {MAX_FILTER_BYTES} are accepted",
            value.len()
        ))),
        _ => Ok(()),
    }
}

/// Checks the filters of a `GetTables` request.
fn check_tables_request(query: &CommandGetTables) -> Result<(), Status> {
    check_filter("catalog", query.catalog.as_deref())?;
    check_filter(
        "db_schema_filter_pattern",
        query.db_schema_filter_pattern.as_deref(),
    )?;
    check_filter(
        "table_name_filter_pattern",
        query.table_name_filter_pattern.as_deref(),
    )?;
    if query.table_types.len() > MAX_TABLE_TYPES {
        return Err(Status::invalid_argument(format!(
            "{} table types asked for; at most {MAX_TABLE_TYPES} are accepted",
            query.table_types.len()
        )));
    }
    for table_type in &query.table_types {
        check_filter("a table type", Some(table_type.as_str()))?;
    }
    Ok(())
}

/// Checks the size of a `GetSqlInfo` request.
fn check_sql_info_request(query: &CommandGetSqlInfo) -> Result<(), Status> {
    if query.info.len() > MAX_SQL_INFO_IDS {
        return Err(Status::invalid_argument(format!(
            "{} SqlInfo ids asked for; at most {MAX_SQL_INFO_IDS} are accepted",
            query.info.len()
        )));
    }
    Ok(())
}

/// The Flight SQL name of a table type.
fn table_type_name(table_type: TableType) -> &'static str {
    match table_type {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// `schema` as an IPC message, as Flight SQL carries schemas.
fn schema_ipc(schema: &Schema) -> Result<Bytes, Status> {
    let options = IpcWriteOptions::default();
    let IpcMessage(bytes) = IpcMessage::try_from(SchemaAsIpc::new(schema, &options))
        .map_err(|e| Status::internal(format!("could not encode a schema: {e}")))?;
    Ok(bytes)
}

/// A `FlightInfo` with `schema` and one endpoint whose ticket is `ticket`, on this server.
fn flight_info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("could not encode the result schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor);
    Ok(info)
}

/// One record batch as a `DoGet` stream.
fn one_batch(schema: SchemaRef, batch: RecordBatch) -> DoGetStream {
    let data = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter([Ok::<_, FlightError>(batch)]))
        .map_err(Status::from);
    Box::pin(data)
}

/// A running query's batches as a `DoGet` stream; its errors end the stream as statuses, and
/// dropping the stream (the client went away) cancels the query.
fn stream_running(running: Running) -> DoGetStream {
    stream_as(running, None)
}

/// [`stream_running`], with the batches in `announced` (the schema a prepared statement
/// announced) when they differ from it only in nullability: bound values can make a column
/// that planning saw as nullable non-nullable, and clients (ADBC) refuse a stream whose schema
/// differs from the announced one.
fn stream_as(running: Running, announced: Option<&SchemaRef>) -> DoGetStream {
    let actual = running.schema();
    let schema = match announced {
        Some(announced)
            if announced.fields().len() == actual.fields().len()
                && announced
                    .fields()
                    .iter()
                    .zip(actual.fields())
                    .all(|(a, b)| {
                        a.name() == b.name()
                            && a.data_type() == b.data_type()
                            && (a.is_nullable() || !b.is_nullable())
                    }) =>
        {
            Arc::clone(announced)
        }
        _ => actual,
    };
    let target = Arc::clone(&schema);
    let batches = running.map(move |item| {
        item.map_err(|e| FlightError::Tonic(Box::new(api_status(e))))
            .and_then(|batch| {
                RecordBatch::try_new(Arc::clone(&target), batch.columns().to_vec())
                    .map_err(FlightError::Arrow)
            })
    });
    let data = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(Status::from);
    Box::pin(data)
}

/// The values of a one-row parameter batch, converted to the types planning inferred.
fn parameter_values(
    batch: &RecordBatch,
    types: &[Option<DataType>],
) -> Result<Vec<ScalarValue>, Status> {
    if batch.num_columns() != types.len() {
        return Err(Status::invalid_argument(format!(
            "the statement takes {} parameter(s); the bound batch has {} column(s)",
            types.len(),
            batch.num_columns()
        )));
    }
    batch
        .columns()
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (column, expected))| {
            let number = i + 1;
            let value = ScalarValue::try_from_array(column.as_ref(), 0).map_err(|e| {
                Status::invalid_argument(bounded_message(format!("parameter ${number}: {e}")))
            })?;
            match expected {
                Some(data_type) if value.data_type() != *data_type => {
                    value.cast_to(data_type).map_err(|e| {
                        Status::invalid_argument(bounded_message(format!(
                            "parameter ${number}: a {} value does not convert to {data_type}: {e}",
                            value.data_type()
                        )))
                    })
                }
                _ => Ok(value),
            }
        })
        .collect()
}

/// Credentials from an `authorization` header.
enum Credentials<'a> {
    /// `Bearer <token>`.
    Bearer(&'a str),
    /// `Basic base64(user:password)`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
}

/// Parses an `authorization` header value.
fn parse_authorization(value: &str) -> Result<Credentials<'_>, Status> {
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(Status::unauthenticated(format!(
            "the authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes"
        )));
    }
    let (scheme, rest) = value.trim().split_once(' ').ok_or_else(|| {
        Status::unauthenticated("the authorization header is not `<scheme> <credentials>`")
    })?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Credentials::Bearer(rest))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = decode_base64(rest)
            .ok_or_else(|| Status::unauthenticated("the Basic credentials are not valid base64"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::unauthenticated("the Basic credentials are not UTF-8"))?;
        let (user, password) = text.split_once(':').ok_or_else(|| {
            Status::unauthenticated("the Basic credentials are not `user:password`")
        })?;
        Ok(Credentials::Basic {
            user: user.to_string(),
            password: password.to_string(),
        })
    } else {
        Err(Status::unauthenticated(
            "unsupported authorization scheme: use `Bearer <token>` or `Basic <credentials>`",
        ))
    }
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional) of at most
/// [`MAX_AUTHORIZATION_BYTES`] characters; `None` when it is not valid.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let input = input.as_bytes();
    if input.len() > MAX_AUTHORIZATION_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3 + 3);
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    let mut padding = 0usize;
    for &c in input {
        if c == b'=' {
            padding += 1;
            continue;
        }
        if padding > 0 {
            return None;
        }
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            // At most 8 bits remain above `bits`: the byte just completed.
            out.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One character alone cannot end the input (6 bits make no byte); at most "==" pads.
    if bits >= 6 || padding > 2 {
        return None;
    }
    Some(out)
}

/// Lowercase hexadecimal of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    text
}

/// `N` random bytes from the kernel, hex-encoded.
fn random_hex<const N: usize>() -> Result<String, Status> {
    let buf = crate::auth::random_bytes::<N>().map_err(|e| Status::internal(format!("{e:#}")))?;
    Ok(hex(&buf))
}

/// Locks `mutex`, going on with the data if a holder panicked (every update here leaves the
/// data consistent).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A map that holds at most `max_entries` entries and `max_bytes` of their declared costs,
/// evicting the oldest insertions first.
struct BoundedMap<K, V> {
    /// The entries by key.
    entries: HashMap<K, Slot<V>>,
    /// Keys in insertion order, with the sequence number of the insertion; an item whose
    /// number no longer matches its entry's is stale and skipped.
    order: VecDeque<(K, u64)>,
    /// The next insertion's sequence number.
    next_seq: u64,
    /// The sum of the entries' costs.
    bytes: usize,
    /// The most entries held.
    max_entries: usize,
    /// The most bytes held.
    max_bytes: usize,
}

/// An entry of a [`BoundedMap`].
struct Slot<V> {
    /// The insertion's sequence number.
    seq: u64,
    /// The bytes the entry is counted as.
    cost: usize,
    /// The value.
    value: V,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// An empty map with the given bounds (at least one entry).
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    /// The number of entries.
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value under `key`.
    fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|slot| &slot.value)
    }

    /// Removes and answers the value under `key`.
    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.entries.remove(key)?;
        self.bytes = self.bytes.saturating_sub(slot.cost);
        Some(slot.value)
    }

    /// Puts `value` under `key` as the newest entry (replacing any there), evicting the oldest
    /// entries to stay within the bounds; gives `value` back when `cost` alone is past them.
    fn insert(&mut self, key: K, value: V, cost: usize) -> Result<(), V> {
        if cost > self.max_bytes {
            return Err(value);
        }
        self.remove(&key);
        while self.entries.len() >= self.max_entries
            || self.bytes.saturating_add(cost) > self.max_bytes
        {
            if !self.evict_oldest() {
                break;
            }
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.order.push_back((key.clone(), seq));
        self.entries.insert(key, Slot { seq, cost, value });
        self.bytes = self.bytes.saturating_add(cost);
        if self.order.len() > self.max_entries.saturating_mul(2) {
            let entries = &self.entries;
            self.order
                .retain(|(key, seq)| entries.get(key).is_some_and(|slot| slot.seq == *seq));
        }
        Ok(())
    }

    /// Removes the oldest entry; `false` when there was none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|slot| slot.seq == seq) {
                self.remove(&key);
                return true;
            }
        }
        false
    }

    /// Removes the oldest entries for as long as `expired` holds for them.
    fn evict_oldest_while(&mut self, mut expired: impl FnMut(&V) -> bool) {
        loop {
            let Some((key, seq)) = self.order.front().map(|(key, seq)| (key.clone(), *seq)) else {
                return;
            };
            let live = self
                .entries
                .get(&key)
                .filter(|slot| slot.seq == seq)
                .map(|slot| expired(&slot.value));
            match live {
                Some(false) => return,
                Some(true) => {
                    self.order.pop_front();
                    self.remove(&key);
                }
                None => {
                    self.order.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_and_unpadded_input() {
        assert_eq!(
            decode_base64("YWRtaW46cGFzc3dvcmQ=").as_deref(),
            Some(&b"admin:password"[..])
        );
        assert_eq!(decode_base64("").as_deref(), Some(&b""[..]));
        assert_eq!(decode_base64("Zg==").as_deref(), Some(&b"f"[..]));
        assert_eq!(decode_base64("Zg").as_deref(), Some(&b"f"[..]));
        assert_eq!(decode_base64("Zm8=").as_deref(), Some(&b"fo"[..]));
        assert_eq!(decode_base64("Zm9v").as_deref(), Some(&b"foo"[..]));
    }

    #[test]
    fn base64_refuses_invalid_input() {
        assert!(decode_base64("Z").is_none());
        assert!(decode_base64("Zm9v!").is_none());
        assert!(decode_base64("Zg=x").is_none());
        assert!(decode_base64("Zg===").is_none());
        assert!(decode_base64(&"A".repeat(MAX_AUTHORIZATION_BYTES + 4)).is_none());
    }

    #[test]
    fn authorization_headers_parse() {
        assert!(matches!(
            parse_authorization("Bearer abc"),
            Ok(Credentials::Bearer("abc"))
        ));
        match parse_authorization("basic YWRtaW46cDpx") {
            Ok(Credentials::Basic { user, password }) => {
                assert_eq!(user, "admin");
                assert_eq!(password, "p:q");
            }
            _ => panic!("Basic credentials did not parse"),
        }
        assert!(parse_authorization("Digest x").is_err());
        assert!(parse_authorization("Bearer").is_err());
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(random_hex::<16>().map(|h| h.len()).ok(), Some(32));
    }

    #[test]
    fn bounded_map_evicts_the_oldest() {
        let mut map = BoundedMap::new(2, 100);
        assert!(map.insert("a".to_string(), 1, 10).is_ok());
        assert!(map.insert("b".to_string(), 2, 10).is_ok());
        assert!(map.insert("c".to_string(), 3, 10).is_ok());
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("a"), None);
        assert_eq!(map.get("b"), Some(&2));
        // Replacing makes an entry the newest.
        assert!(map.insert("b".to_string(), 4, 10).is_ok());
        assert!(map.insert("d".to_string(), 5, 10).is_ok());
        assert_eq!(map.get("c"), None);
        assert_eq!(map.get("b"), Some(&4));
        assert_eq!(map.get("d"), Some(&5));
    }

    #[test]
    fn bounded_map_keeps_within_bytes() {
        let mut map = BoundedMap::new(100, 25);
        assert!(map.insert(1, "x", 10).is_ok());
        assert!(map.insert(2, "y", 10).is_ok());
        assert!(map.insert(3, "z", 10).is_ok());
        assert_eq!(map.get(&1), None);
        assert_eq!(map.len(), 2);
        assert_eq!(map.insert(4, "w", 26), Err("w"));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn bounded_map_evicts_expired_from_the_front() {
        let mut map = BoundedMap::new(10, 1000);
        for i in 0..5 {
            assert!(map.insert(i, i, 1).is_ok());
        }
        map.remove(&1);
        map.evict_oldest_while(|v| *v < 3);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&3), Some(&3));
    }

    #[test]
    fn bounded_map_order_stays_bounded() {
        let mut map = BoundedMap::new(4, 1000);
        for i in 0..1000 {
            assert!(map.insert(i % 3, i, 1).is_ok());
        }
        assert_eq!(map.len(), 3);
        assert!(map.order.len() <= 8);
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let message = bounded_message("é".repeat(MAX_STATUS_MESSAGE_BYTES));
        assert!(message.len() <= MAX_STATUS_MESSAGE_BYTES + 8);
        assert!(message.ends_with(" [...]"));
    }
}
