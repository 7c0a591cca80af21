//! One query's answer, streamed: the query runs as a task of its own that encodes each record
//! batch as it arrives (in chunks of about [`CHUNK_BYTES`]) and hands the chunks to the HTTP
//! response through a channel of one chunk. Nothing collects the whole result.
//!
//! The task owns the query's stream and its deadline; the query's concurrency permit is shared
//! by the task and the response. The query ends (its stream dropped, which cancels it) when its
//! answer has been handed on, when the client goes away (the response body is dropped and aborts
//! the task) or when the time limit passes. The permit is given back when the response ends
//! (the body is dropped, before its last bytes are flushed), when the client goes away, or when
//! the time limit passes, whichever comes first: a client that stops reading holds neither a
//! permit nor a running query past the time limit.
//!
//! Limits: the rows and the bytes handed to the response are counted. Passing
//! [`Limits::max_rows`] or [`Limits::max_bytes`] before anything was sent answers 413 with a JSON
//! error; after, the answer ends with the error in its last element: for JSON a final
//! `{"error": "..."}` element of the array (still well-formed JSON); for Arrow IPC, after the last
//! whole record batch message that fits, a second *schema* message (no fields) whose metadata
//! holds the error under [`ARROW_ERROR_KEY`], and no end-of-stream marker. A schema after the
//! first message is invalid in an IPC stream, so every reader fails there instead of taking a
//! shorter result for the whole (arrow-rs: "Expected a record batch, but found a schema"); a
//! client that wants the reason decodes that message. The time limit, a failing plugin or the
//! memory pool after the answer started end it the same way. Only a broken task (a panic) aborts
//! the HTTP body instead.

use std::sync::{Arc, Mutex, PoisonError};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;
use udf_engine::CallCancel;

use crate::{ARROW_ERROR_KEY, ARROW_STREAM, ApiError, ErrorBody, OutputFormat, request_options};

/// About how many bytes one chunk of the answer holds: batches are cut into slices whose encoding
/// is about this size (a single row larger than this is one chunk of its own).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The most rows one slice of a batch may have.
const MAX_ROWS_PER_CHUNK: usize = 8192;

/// The rows of the first slice, before the encoded size of a row is known.
const FIRST_CHUNK_ROWS: usize = 64;

/// What one answer may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The most rows.
    pub max_rows: u64,
    /// The most bytes handed to the response (the error element of a failed JSON answer aside).
    pub max_bytes: u64,
    /// When the query, its whole answer included, must be done.
    pub deadline: Instant,
    /// The time limit the deadline comes from, for the error.
    pub time_limit: std::time::Duration,
}

/// How a streamed answer ends, once its chunks are handed on.
#[derive(Debug)]
enum Tail {
    /// The last bytes: `]` of a JSON array (maybe after an error element), the IPC
    /// end-of-stream marker or the IPC error message.
    Bytes(Bytes),
    /// The body is aborted (an error the answer cannot carry).
    Abort(String),
}

/// A query's concurrency permit, given back by whoever is done first: the response (when it is
/// dropped) or the query's task (at the time limit).
#[derive(Debug, Clone)]
pub(crate) struct SharedPermit(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl SharedPermit {
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> SharedPermit {
        SharedPermit(Arc::new(Mutex::new(Some(permit))))
    }

    pub(crate) fn release(&self) {
        let permit = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(permit);
    }
}

/// Stops a query whose answer is not done when the request or its response ends: aborts its task
/// (dropping its stream), cancels its isolated plugin calls, and gives its permit back at once.
#[derive(Debug)]
pub(crate) struct QueryGuard {
    pub(crate) task: tokio::task::AbortHandle,
    pub(crate) cancel: CallCancel,
    /// Set by the task when the query has ended (its answer handed on or failed).
    pub(crate) ended: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) permit: SharedPermit,
}

impl Drop for QueryGuard {
    fn drop(&mut self) {
        self.permit.release();
        self.task.abort();
        if !self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            self.cancel.cancel();
        }
    }
}

/// Runs `sql` in `ctx` and answers it as `format` within `limits`, holding `permit` while the
/// query runs. Errors found before anything was sent are status answers (400, 408, 413, 500).
pub(crate) async fn answer(
    ctx: SessionContext,
    compile: Option<crate::run::CompileStatement>,
    sql: String,
    format: OutputFormat,
    limits: Limits,
    cancel: CallCancel,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let (chunks_tx, mut chunks) = mpsc::channel(1);
    let (tail_tx, tail) = oneshot::channel();
    let permit = SharedPermit::new(permit);
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::spawn(produce(
        ctx,
        compile,
        sql,
        Ending {
            format,
            limits,
            cancel: cancel.clone(),
            ended: Arc::clone(&ended),
            permit: permit.clone(),
        },
        chunks_tx,
        tail_tx,
    ));
    // Ends the query if this request is dropped (the client went away) or answered with an error
    // status; with a streamed answer, it moves into the response body, which ends the query when
    // the body is dropped.
    let guard = QueryGuard {
        task: task.abort_handle(),
        cancel,
        ended,
        permit,
    };
    let first = match tokio::time::timeout_at(limits.deadline, chunks.recv()).await {
        Err(_) => return Err(ApiError::Timeout(limits.time_limit)),
        Ok(None) => {
            return Err(ApiError::Internal(
                "the query task ended without an answer".to_string(),
            ));
        }
        Ok(Some(Err(e))) => return Err(e),
        Ok(Some(Ok(first))) => first,
    };
    let body = BodyState {
        first: Some(first),
        chunks,
        tail: Some(tail),
        _guard: guard,
    };
    let stream = futures::stream::unfold(body, BodyState::next);
    let content_type = match format {
        OutputFormat::Json => "application/json",
        OutputFormat::Arrow => ARROW_STREAM,
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The response body: the first chunk, the rest as the task hands them on, then the tail.
struct BodyState {
    first: Option<Bytes>,
    chunks: mpsc::Receiver<Result<Bytes, ApiError>>,
    tail: Option<oneshot::Receiver<Tail>>,
    _guard: QueryGuard,
}

impl BodyState {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, BodyState)> {
        if let Some(first) = self.first.take() {
            return Some((Ok(first), self));
        }
        match self.chunks.recv().await {
            Some(Ok(chunk)) => return Some((Ok(chunk), self)),
            // The task sends errors as chunks once the answer started; this is a broken promise.
            Some(Err(e)) => {
                self.tail = None;
                return Some((Err(std::io::Error::other(e.to_string())), self));
            }
            None => {}
        }
        let tail = self.tail.take()?;
        let item = match tail.await {
            Ok(Tail::Bytes(bytes)) if bytes.is_empty() => return None,
            Ok(Tail::Bytes(bytes)) => Ok(bytes),
            Ok(Tail::Abort(message)) => Err(std::io::Error::other(message)),
            Err(_) => Err(std::io::Error::other(
                "the query task ended without finishing the answer",
            )),
        };
        Some((item, self))
    }
}

/// What the query's task needs besides the query and the channels.
struct Ending {
    format: OutputFormat,
    limits: Limits,
    cancel: CallCancel,
    ended: Arc<std::sync::atomic::AtomicBool>,
    permit: SharedPermit,
}

/// The query's task: runs the query, hands the chunks on, and ends the answer.
async fn produce(
    ctx: SessionContext,
    compile: Option<crate::run::CompileStatement>,
    sql: String,
    ending: Ending,
    chunks: mpsc::Sender<Result<Bytes, ApiError>>,
    tail: oneshot::Sender<Tail>,
) {
    let Ending {
        format,
        limits,
        cancel,
        ended,
        permit,
    } = ending;
    let reservation =
        MemoryConsumer::new("udfsql-service answer").register(&ctx.runtime_env().memory_pool);
    let mut answer = Answer {
        format,
        limits,
        chunks: &chunks,
        reservation,
        started: false,
        prefix: Vec::new(),
        arrow: None,
        rows: 0,
        bytes: 0,
        rows_per_chunk: FIRST_CHUNK_ROWS,
    };
    let outcome =
        match tokio::time::timeout_at(limits.deadline, answer.run(&ctx, compile, &sql)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                cancel.cancel();
                Err(ApiError::Timeout(limits.time_limit))
            }
        };
    // The query's stream is dropped by now: whatever happens below, the query no longer runs.
    ended.store(true, std::sync::atomic::Ordering::SeqCst);
    let ending = match outcome {
        Ok(()) => answer.finish(),
        Err(e) => Err(e),
    };
    match ending {
        Ok(last) => {
            tail.send(Tail::Bytes(last)).ok();
        }
        Err(e) if !answer.started => {
            // Nothing was sent, so the channel is empty and the answer is a status: 413, 408...
            chunks.try_send(Err(e)).ok();
        }
        Err(e) => {
            tracing::warn!(error = %e, "answer ended by an error after it started");
            tail.send(answer.error_tail(&e)).ok();
        }
    }
    drop(answer);
    drop(chunks);
    // The permit covers the answer until the response ends (the body, when dropped, gives it
    // back) or the time limit passes, whichever comes first.
    tokio::time::sleep_until(limits.deadline).await;
    permit.release();
}

/// The state of one answer while its chunks are encoded and counted.
struct Answer<'a> {
    format: OutputFormat,
    limits: Limits,
    chunks: &'a mpsc::Sender<Result<Bytes, ApiError>>,
    /// The bytes of the chunk last handed on, in the query's memory pool.
    reservation: MemoryReservation,
    /// Whether a chunk was sent (then errors end the answer instead of being a status).
    started: bool,
    /// The start of the answer (`[`, the IPC schema message), sent with the first chunk.
    prefix: Vec<u8>,
    arrow: Option<StreamWriter<Vec<u8>>>,
    /// Rows and bytes handed on so far.
    rows: u64,
    bytes: u64,
    /// The rows of the next slice, from the encoded size of the last one.
    rows_per_chunk: usize,
}

impl Answer<'_> {
    async fn run(
        &mut self,
        ctx: &SessionContext,
        compile: Option<crate::run::CompileStatement>,
        sql: &str,
    ) -> Result<(), ApiError> {
        if let Some((shared, statement)) = compile {
            // Into the shared session, which every later request starts from; no columns.
            udf_engine::execute_statement(&shared, statement).await?;
            self.begin(&Arc::new(datafusion::arrow::datatypes::Schema::empty()))?;
            return Ok(());
        }
        let df = ctx.sql_with_options(sql, request_options()).await?;
        let mut stream = df.execute_stream().await?;
        self.begin(&stream.schema())?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let fit = self.limits.max_rows.saturating_sub(self.rows);
            if batch.num_rows() as u64 > fit {
                let error = ApiError::ResultTooLarge(format!(
                    "the result has more than {} rows, the most this service answers \
                     (max-result-rows); add a LIMIT or narrow the query",
                    self.limits.max_rows
                ));
                if self.started {
                    // usize: `fit` is below this batch's row count.
                    self.send_batch(&batch.slice(0, fit as usize)).await?;
                }
                return Err(error);
            }
            self.send_batch(&batch).await?;
        }
        Ok(())
    }

    /// The answer's start, from the query's schema.
    fn begin(&mut self, schema: &SchemaRef) -> Result<(), ApiError> {
        match self.format {
            OutputFormat::Json => self.prefix = b"[".to_vec(),
            OutputFormat::Arrow => {
                let mut writer = StreamWriter::try_new(Vec::new(), schema).map_err(internal)?;
                self.prefix = std::mem::take(writer.get_mut());
                self.arrow = Some(writer);
            }
        }
        Ok(())
    }

    /// Encodes `batch` slice by slice and hands each slice's chunk on.
    async fn send_batch(&mut self, batch: &RecordBatch) -> Result<(), ApiError> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let rows = self.rows_per_chunk.min(batch.num_rows() - offset);
            let chunk = self.encode(&batch.slice(offset, rows))?;
            self.rows_per_chunk = (CHUNK_BYTES.saturating_mul(rows) / chunk.len().max(1))
                .clamp(1, MAX_ROWS_PER_CHUNK);
            self.send(chunk, rows).await?;
            offset += rows;
        }
        Ok(())
    }

    fn encode(&mut self, slice: &RecordBatch) -> Result<Vec<u8>, ApiError> {
        match self.format {
            OutputFormat::Json => {
                let text = udf_engine::json::json_array(std::slice::from_ref(slice)).map_err(
                    |e| match e {
                        udf_engine::json::JsonError::Undisplayable {
                            column,
                            data_type,
                            row,
                            source,
                        } => ApiError::Query(format!(
                            "cannot answer as JSON: {}",
                            udf_engine::json::JsonError::Undisplayable {
                                column,
                                data_type,
                                // `row` counts from 1 within the slice.
                                row: row + self.rows as usize,
                                source,
                            }
                        )),
                        other => ApiError::Internal(other.to_string()),
                    },
                )?;
                // `[{...},{...}]\n` without the brackets, after a comma if rows came before.
                let inner = text
                    .strip_prefix(b"[")
                    .and_then(|t| t.strip_suffix(b"]\n"))
                    .ok_or_else(|| {
                        ApiError::Internal("the JSON writer did not write an array".to_string())
                    })?;
                let mut chunk = Vec::with_capacity(inner.len() + 1);
                if self.rows > 0 {
                    chunk.push(b',');
                }
                chunk.extend_from_slice(inner);
                Ok(chunk)
            }
            OutputFormat::Arrow => {
                let writer = self.arrow.as_mut().ok_or_else(|| {
                    ApiError::Internal("the Arrow IPC writer was not started".to_string())
                })?;
                writer.write(slice).map_err(internal)?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }

    /// Counts `chunk` (with the answer's start, if nothing was sent yet) against the limits and
    /// the memory pool, then hands it on.
    async fn send(&mut self, chunk: Vec<u8>, rows: usize) -> Result<(), ApiError> {
        let chunk = if self.started {
            chunk
        } else {
            let mut first = std::mem::take(&mut self.prefix);
            first.extend_from_slice(&chunk);
            first
        };
        if self.bytes + chunk.len() as u64 > self.limits.max_bytes {
            return Err(ApiError::ResultTooLarge(format!(
                "the result is larger than {} bytes as {}, the most this service answers \
                 (max-result-bytes); add a LIMIT or narrow the query",
                self.limits.max_bytes,
                self.format.name()
            )));
        }
        self.reservation.try_resize(chunk.len())?;
        self.bytes += chunk.len() as u64;
        self.rows += rows as u64;
        self.chunks
            .send(Ok(Bytes::from(chunk)))
            .await
            .map_err(|_| ApiError::Internal("the client went away".to_string()))?;
        self.started = true;
        Ok(())
    }

    /// The end of an answer that succeeded. An answer without rows sends its start first.
    fn finish(&mut self) -> Result<Bytes, ApiError> {
        let last = match self.format {
            OutputFormat::Json => b"]\n".to_vec(),
            OutputFormat::Arrow => {
                let writer = self.arrow.as_mut().ok_or_else(|| {
                    ApiError::Internal("the Arrow IPC writer was not started".to_string())
                })?;
                writer.finish().map_err(internal)?;
                std::mem::take(writer.get_mut())
            }
        };
        if self.started {
            return Ok(Bytes::from(last));
        }
        let mut whole = std::mem::take(&mut self.prefix);
        whole.extend_from_slice(&last);
        self.started = true;
        // The channel is empty (nothing was sent): the whole answer goes as its first chunk.
        self.chunks
            .try_send(Ok(Bytes::from(whole)))
            .map_err(|_| ApiError::Internal("the client went away".to_string()))?;
        Ok(Bytes::new())
    }

    /// How an answer that started ends on `error`.
    fn error_tail(&self, error: &ApiError) -> Tail {
        match self.format {
            OutputFormat::Json => {
                let mut last = Vec::new();
                if self.rows > 0 {
                    last.push(b',');
                }
                let element = serde_json::to_vec(&ErrorBody {
                    error: error.to_string(),
                })
                .unwrap_or_else(|_| br#"{"error":"the answer failed"}"#.to_vec());
                last.extend_from_slice(&element);
                last.extend_from_slice(b"]\n");
                Tail::Bytes(Bytes::from(last))
            }
            OutputFormat::Arrow => {
                let schema = datafusion::arrow::datatypes::Schema::new_with_metadata(
                    datafusion::arrow::datatypes::Fields::empty(),
                    [(ARROW_ERROR_KEY.to_string(), error.to_string())].into(),
                );
                match StreamWriter::try_new(Vec::new(), &schema) {
                    Ok(mut writer) => Tail::Bytes(Bytes::from(std::mem::take(writer.get_mut()))),
                    // Without the message, the body is aborted: never a clean-looking end.
                    Err(e) => Tail::Abort(format!("{error} (and cannot encode it: {e})")),
                }
            }
        }
    }
}

fn internal(e: datafusion::arrow::error::ArrowError) -> ApiError {
    ApiError::Internal(e.to_string())
}
