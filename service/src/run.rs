//! Queries for the other protocols (PostgreSQL wire, Flight SQL): the same session, statement
//! policy and limits as the HTTP answers, handed on as Arrow record batches instead of encoded
//! bytes.
//!
//! [`AppState::prepare`] plans a statement as requests may (queries only) and tells its result
//! schema and parameters; [`AppState::run`] runs one under the service's limits and answers a
//! [`Running`] stream of record batches:
//!
//! * the concurrency permit is taken at once ([`ApiError::Busy`] when none is free) and held
//!   until the stream is dropped or the time limit passes, whichever comes first;
//! * the query runs as a task of its own, one batch ahead of its reader, with its own memory pool;
//!   the time limit covers planning, running and reading, and fires even while a plugin call
//!   blocks (the stream answers [`ApiError::Timeout`] and the query's isolated calls are
//!   cancelled);
//! * rows and bytes (the Arrow buffers of the batches handed on) are counted: the batch that
//!   passes [`crate::Config::max_result_rows`] is cut to what fits and followed by
//!   [`ApiError::ResultTooLarge`]; one that passes [`crate::Config::max_result_bytes`] is not
//!   handed on, the error is;
//! * dropping the stream (the client went away, or cancelled) ends the query and cancels its
//!   isolated plugin calls.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::ParamValues;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use udf_engine::CallCancel;

use crate::answer::{QueryGuard, SharedPermit};
use crate::{ApiError, AppState, request_options};

/// The most parameters a statement may have (the PostgreSQL protocol's own bound).
pub const MAX_PARAMETERS: usize = u16::MAX as usize;

/// A statement planned as the service allows: what it answers and what it takes.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The result's schema.
    pub schema: SchemaRef,
    /// The types of `$1`, `$2`, … in order (`None` where DataFusion infers none).
    pub parameters: Vec<Option<DataType>>,
}

/// A running query's record batches; dropping it ends the query.
pub struct Running {
    schema: SchemaRef,
    batches: mpsc::Receiver<Result<RecordBatch, ApiError>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    time_limit: Duration,
    done: bool,
    _guard: QueryGuard,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("schema", &self.schema)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The schema of the batches.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

impl Stream for Running {
    type Item = Result<RecordBatch, ApiError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.batches.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.is_err() {
                    self.done = true;
                }
                return Poll::Ready(Some(item));
            }
            Poll::Ready(None) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(ApiError::Timeout(self.time_limit))));
        }
        Poll::Pending
    }
}

/// Gives parameters DataFusion left untyped the type of the function argument they stand for
/// (`repeat($1, $2)`: the function's declared types), as PostgreSQL does: asked for its
/// argument types with `NULL` for every argument, a function with fixed argument types (plugin
/// functions among them) answers them. Functions that answer nothing or another count are
/// skipped; a parameter used as two types keeps the first.
fn infer_from_functions(plan: &LogicalPlan, parameters: &mut [Option<DataType>]) {
    if parameters.iter().all(Option::is_some) {
        return;
    }
    let mut visit = |e: &Expr| {
        if let Expr::ScalarFunction(call) = e {
            let untyped = |a: &Expr| matches!(a, Expr::Placeholder(p) if p.field.is_none());
            if call.args.iter().any(untyped) {
                let nulls = vec![DataType::Null; call.args.len()];
                if let Ok(types) = call.func.coerce_types(&nulls)
                    && types.len() == call.args.len()
                {
                    for (arg, data_type) in call.args.iter().zip(types) {
                        if let Expr::Placeholder(p) = arg
                            && p.field.is_none()
                            && data_type != DataType::Null
                            && let Some(slot) = parameter_number(&p.id)
                                .and_then(|n| n.checked_sub(1))
                                .and_then(|i| parameters.get_mut(i))
                            && slot.is_none()
                        {
                            *slot = Some(data_type);
                        }
                    }
                }
            }
        }
        Ok::<_, DataFusionError>(TreeNodeRecursion::Continue)
    };
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| e.apply(&mut visit))?;
        Ok(TreeNodeRecursion::Continue)
    })
    .ok();
}

/// `sql` with its `?` parameters (as ADBC and JDBC drivers write them) numbered in order of
/// appearance: `$1`, `$2`, … Strings, quoted names and comments are left alone (the SQL
/// tokenizer tells them apart); SQL mixing `?` with `$N` is refused.
pub fn number_question_marks(sql: &str) -> Result<String, ApiError> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    if !sql.contains('?') {
        return Ok(sql.to_string());
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| ApiError::Query(format!("SQL error: {e}")))?;
    let is_question = |t: &Token| matches!(t, Token::Placeholder(p) if p == "?");
    if !tokens.iter().any(is_question) {
        return Ok(sql.to_string());
    }
    if tokens
        .iter()
        .any(|t| matches!(t, Token::Placeholder(p) if p.starts_with('$')))
    {
        return Err(ApiError::Query(
            "the statement mixes ? and $N parameters; use one kind".to_string(),
        ));
    }
    let mut next = 0usize;
    let mut out = String::with_capacity(sql.len() + 8);
    for token in &tokens {
        if is_question(token) {
            next += 1;
            if next > MAX_PARAMETERS {
                return Err(ApiError::Query(format!(
                    "the statement has more than {MAX_PARAMETERS} parameters"
                )));
            }
            out.push_str(&format!("${next}"));
        } else {
            out.push_str(&token.to_string());
        }
    }
    Ok(out)
}

/// What ordering `$N` names by number gives: `$1` first.
fn parameter_number(name: &str) -> Option<usize> {
    name.strip_prefix('$')?.parse().ok()
}

impl AppState {
    /// Plans `sql` as requests may (queries only: DDL, DML and other statements are refused) and
    /// tells its result schema and parameter types.
    pub async fn prepare(&self, sql: &str) -> Result<Prepared, ApiError> {
        if self.compile_statement(sql)?.is_some() {
            // Run by `run`; it answers no columns.
            return Ok(Prepared {
                schema: Arc::new(datafusion::arrow::datatypes::Schema::empty()),
                parameters: Vec::new(),
            });
        }
        let plan = self.ctx.state().create_logical_plan(sql).await?;
        request_options().verify_plan(&plan)?;
        let mut named: Vec<(usize, Option<DataType>)> = Vec::new();
        for (name, data_type) in plan.get_parameter_types()? {
            let number = parameter_number(&name).ok_or_else(|| {
                ApiError::Query(format!(
                    "parameter {name}: only positional parameters ($1, $2, ...) are supported"
                ))
            })?;
            named.push((number, data_type));
        }
        named.sort_by_key(|(n, _)| *n);
        let count = named.last().map_or(0, |(n, _)| *n);
        if count > MAX_PARAMETERS {
            return Err(ApiError::Query(format!(
                "the statement has {count} parameters; at most {MAX_PARAMETERS} are allowed"
            )));
        }
        let mut parameters = vec![None; count];
        for (number, data_type) in named {
            if number == 0 {
                return Err(ApiError::Query(
                    "parameter $0: parameters count from $1".to_string(),
                ));
            }
            parameters[number - 1] = data_type;
        }
        infer_from_functions(&plan, &mut parameters);
        Ok(Prepared {
            schema: Arc::new(plan.schema().as_arrow().clone()),
            parameters,
        })
    }

    /// The statement of `sql` when it is one the administrator's compile option lets requests
    /// run: one `CREATE [OR REPLACE] FUNCTION ... LANGUAGE rust`, or one `DROP FUNCTION` of
    /// functions written in SQL. `None` for anything else (planned as requests may: refused if
    /// it is DDL) and whenever the option is off.
    fn compile_statement(&self, sql: &str) -> Result<Option<DfStatement>, ApiError> {
        use datafusion::sql::sqlparser::ast::Statement;
        if self.config.compile.is_none() {
            return Ok(None);
        }
        let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
        let Ok(mut statements) = DFParser::parse_sql_with_dialect(sql, &dialect) else {
            // Planning reports the parse error.
            return Ok(None);
        };
        if statements.len() != 1 {
            return Ok(None);
        }
        let statement = statements.pop_front().expect("one statement");
        let DfStatement::Statement(inner) = &statement else {
            return Ok(None);
        };
        let allowed = match inner.as_ref() {
            Statement::CreateFunction(create) => create
                .language
                .as_ref()
                .is_some_and(|l| l.value.eq_ignore_ascii_case("rust")),
            Statement::DropFunction(drop) => {
                let compiled: Vec<String> = udf_engine::plugin_functions(&self.ctx)
                    .into_iter()
                    .filter(|f| f.language == "rust")
                    .map(|f| f.sql_name)
                    .collect();
                let refused = drop.func_desc.iter().find(|desc| {
                    let name = desc.name.to_string();
                    let unquoted = name.trim_matches('"');
                    !compiled
                        .iter()
                        .any(|c| c == unquoted || *c == name.to_lowercase())
                });
                if let Some(desc) = refused {
                    return Err(ApiError::Query(format!(
                        "DROP FUNCTION {}: requests may drop only functions written in SQL \
                         (LANGUAGE rust)",
                        desc.name
                    )));
                }
                true
            }
            _ => false,
        };
        Ok(allowed.then_some(statement))
    }

    /// The shared session and the statement of `sql` if it is one the compile option allows
    /// (see `compile_statement`).
    pub(crate) fn compile_request(&self, sql: &str) -> Result<Option<CompileStatement>, ApiError> {
        Ok(self
            .compile_statement(sql)?
            .map(|statement| (self.ctx.clone(), statement)))
    }

    /// Runs `sql` (with `params` for `$1`, `$2`, …) under the service's limits. Errors found
    /// before the first batch (planning, the first batch's own errors, the time limit) are
    /// answered here; later ones end the stream.
    pub async fn run(&self, sql: &str, params: Option<ParamValues>) -> Result<Running, ApiError> {
        let permit = Arc::clone(&self.queries)
            .try_acquire_owned()
            .map_err(|_| ApiError::Busy(self.config.max_concurrent_queries))?;
        let permit = SharedPermit::new(permit);
        let cancel = CallCancel::new();
        let ctx = self.request_context(&cancel)?;
        let time_limit = self.config.time_limit;
        let deadline = Instant::now() + time_limit;
        let ended = Arc::new(AtomicBool::new(false));
        let (batches_tx, batches) = mpsc::channel(1);
        let (schema_tx, schema_rx) = oneshot::channel();
        let compile = self.compile_request(sql)?;
        let task = tokio::spawn(feed(
            ctx,
            compile,
            sql.to_string(),
            params,
            Feed {
                max_rows: self.config.max_result_rows,
                max_bytes: self.config.max_result_bytes,
                deadline,
                time_limit,
                cancel: cancel.clone(),
                ended: Arc::clone(&ended),
                permit: permit.clone(),
            },
            schema_tx,
            batches_tx,
        ));
        let guard = QueryGuard {
            task: task.abort_handle(),
            cancel,
            ended,
            permit,
        };
        let schema = match tokio::time::timeout_at(deadline, schema_rx).await {
            Err(_) => return Err(ApiError::Timeout(time_limit)),
            Ok(Err(_)) => {
                return Err(ApiError::Internal(
                    "the query task ended without an answer".to_string(),
                ));
            }
            Ok(Ok(schema)) => schema?,
        };
        Ok(Running {
            schema,
            batches,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            time_limit,
            done: false,
            _guard: guard,
        })
    }
}

/// A statement the administrator's compile option lets requests run, with the shared session it
/// runs in.
pub(crate) type CompileStatement = (SessionContext, DfStatement);

/// The limits and hand-offs of one query's task.
struct Feed {
    max_rows: u64,
    max_bytes: u64,
    deadline: Instant,
    time_limit: Duration,
    cancel: CallCancel,
    ended: Arc<AtomicBool>,
    permit: SharedPermit,
}

/// The bytes of a batch as handed on: the Arrow buffers its rows use (a slice counts its part).
fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| {
            let data = c.to_data();
            data.get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size()) as u64
        })
        .sum()
}

/// The query's task: plans and runs it, hands its batches on within the limits.
async fn feed(
    ctx: SessionContext,
    compile: Option<CompileStatement>,
    sql: String,
    params: Option<ParamValues>,
    feed: Feed,
    schema_tx: oneshot::Sender<Result<SchemaRef, ApiError>>,
    batches: mpsc::Sender<Result<RecordBatch, ApiError>>,
) {
    let mut schema_tx = Some(schema_tx);
    let work = async {
        if let Some((shared, statement)) = compile {
            // Into the shared session, which every later request starts from; no columns.
            udf_engine::execute_statement(&shared, statement).await?;
            if let Some(tx) = schema_tx.take() {
                tx.send(Ok(Arc::new(datafusion::arrow::datatypes::Schema::empty())))
                    .ok();
            }
            return Ok(());
        }
        let mut df = ctx.sql_with_options(&sql, request_options()).await?;
        if let Some(params) = params {
            df = df.with_param_values(params)?;
        }
        let mut stream = df.execute_stream().await?;
        let schema = stream.schema();
        // The first batch's errors (most plugin errors) are answered before the stream starts.
        let mut pending = stream.next().await.transpose()?;
        if let Some(tx) = schema_tx.take() {
            tx.send(Ok(schema)).ok();
        }
        let (mut rows, mut bytes) = (0u64, 0u64);
        loop {
            let batch = match pending.take() {
                Some(batch) => batch,
                None => match stream.next().await {
                    Some(batch) => batch?,
                    None => break,
                },
            };
            let fit = feed.max_rows.saturating_sub(rows);
            let over_rows = batch.num_rows() as u64 > fit;
            // usize: `fit` is below this batch's row count when it is used.
            let batch = if over_rows {
                batch.slice(0, fit as usize)
            } else {
                batch
            };
            let size = batch_bytes(&batch);
            if bytes.saturating_add(size) > feed.max_bytes {
                return Err(ApiError::ResultTooLarge(format!(
                    "the result is larger than {} bytes of Arrow data, the most this service \
                     answers (max-result-bytes); add a LIMIT or narrow the query",
                    feed.max_bytes
                )));
            }
            bytes += size;
            rows += batch.num_rows() as u64;
            if batch.num_rows() > 0 && batches.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
            if over_rows {
                return Err(ApiError::ResultTooLarge(format!(
                    "the result has more than {} rows, the most this service answers \
                     (max-result-rows); add a LIMIT or narrow the query",
                    feed.max_rows
                )));
            }
        }
        Ok::<(), ApiError>(())
    };
    let outcome = match tokio::time::timeout_at(feed.deadline, work).await {
        Ok(outcome) => outcome,
        Err(_) => {
            feed.cancel.cancel();
            Err(ApiError::Timeout(feed.time_limit))
        }
    };
    feed.ended.store(true, Ordering::SeqCst);
    if let Err(e) = outcome {
        match schema_tx.take() {
            Some(tx) => {
                tx.send(Err(e)).ok();
            }
            None => {
                // Bounded: a reader that stopped reading does not hold the task past the limit.
                tokio::time::timeout_at(feed.deadline, batches.send(Err(e)))
                    .await
                    .ok();
            }
        }
    }
    drop(batches);
    tokio::time::sleep_until(feed.deadline).await;
    feed.permit.release();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_are_numbered_outside_strings_and_comments() {
        let number = |s: &str| number_question_marks(s).unwrap();
        assert_eq!(number("SELECT 1"), "SELECT 1");
        assert_eq!(number("SELECT ?, f(?)"), "SELECT $1, f($2)");
        assert_eq!(
            number("SELECT '?', \"a?\", ? -- why?\n/* ? */ + ?"),
            "SELECT '?', \"a?\", $1 -- why?\n/* ? */ + $2"
        );
        assert!(number_question_marks("SELECT ?, $1").is_err());
    }
}
