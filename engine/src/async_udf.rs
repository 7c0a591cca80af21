//! Asynchronous plugin functions (ABI 2.3) in DataFusion: a [`PluginUdf`] whose function is
//! asynchronous is registered through DataFusion's async UDF machinery (`AsyncScalarUDF`,
//! planned into `AsyncFuncExec` for projections and filters), and evaluates a batch as calls of
//! at most `chunk_rows` rows, at most `max_in_flight` of them started and not completed at once
//! for the function (across queries and partitions), each within the call's time limit, results
//! assembled in row order.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::compute::concat;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Volatility,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use crate::ffi::PluginFunction;
use crate::ffi::async_fn::{AsyncDefaults, DEFAULT_CHUNK_ROWS, DEFAULT_MAX_IN_FLIGHT};
use crate::udf::PluginUdf;

/// The host's default time limit for one asynchronous call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The most calls in flight a function may have, whoever asks (the library, SQL, the API).
pub const MAX_IN_FLIGHT: usize = 65_536;
/// The most rows per call, whoever asks.
pub const MAX_CHUNK_ROWS: usize = 1 << 20;
/// The longest call time limit, whoever asks: a day.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The most times a call that failed temporarily (`RETRY`) is started again, whoever asks.
pub const MAX_RETRIES: u32 = 10;
/// The wait before the first retry of a call; it doubles for each next one, up to
/// [`MAX_RETRY_WAIT`].
pub const FIRST_RETRY_WAIT: Duration = Duration::from_millis(20);
/// The longest wait before a retry.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(1);

/// How many chunk futures of one batch exist at once, per call in flight: completed calls wait
/// in this window for the calls before them (results are assembled in row order).
const ORDER_WINDOW: usize = 4;

/// How the host runs an asynchronous function's calls.
#[derive(Debug, Clone)]
pub struct AsyncLimits {
    /// The most calls started and not completed at once, for this function.
    pub max_in_flight: usize,
    /// The most rows per call.
    pub chunk_rows: usize,
    /// The time limit of one call; past it the query fails and the plugin is asked to cancel.
    pub call_timeout: Duration,
    /// How many times a call that failed temporarily (completed with `RETRY`) is started
    /// again, after 20 ms, 40 ms, ... (at most 1 s) without holding its in-flight permit; 0 by
    /// default: a temporary failure fails the query like any error.
    pub retries: u32,
    /// `max_in_flight` permits, shared by every query and partition using the function.
    pub(crate) permits: Arc<Semaphore>,
}

impl AsyncLimits {
    /// The library's defaults where it declares them, else the host's.
    pub fn from_defaults(defaults: AsyncDefaults) -> AsyncLimits {
        let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
        AsyncLimits::new(
            or(defaults.max_in_flight, DEFAULT_MAX_IN_FLIGHT),
            or(defaults.chunk_rows, DEFAULT_CHUNK_ROWS),
            DEFAULT_CALL_TIMEOUT,
        )
    }

    /// Limits with these values, each brought within 1 ..= [`MAX_IN_FLIGHT`],
    /// [`MAX_CHUNK_ROWS`] and 1 ms ..= [`MAX_CALL_TIMEOUT`] (a library's manifest may say any
    /// `u32`).
    pub fn new(max_in_flight: usize, chunk_rows: usize, call_timeout: Duration) -> AsyncLimits {
        let max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT);
        AsyncLimits {
            max_in_flight,
            chunk_rows: chunk_rows.clamp(1, MAX_CHUNK_ROWS),
            call_timeout: call_timeout.clamp(Duration::from_millis(1), MAX_CALL_TIMEOUT),
            retries: 0,
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// The same limits with `retries` retries of temporary failures (at most [`MAX_RETRIES`]).
    pub fn with_retries(mut self, retries: u32) -> AsyncLimits {
        self.retries = retries.min(MAX_RETRIES);
        self
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for PluginUdf {
    fn ideal_batch_size(&self) -> Option<usize> {
        None
    }

    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let Some(limits) = self.async_limits() else {
            return Err(DataFusionError::Internal(format!(
                "{} is not an asynchronous function",
                self.sql_name()
            )));
        };
        let all_scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)))
            && self.volatility() != Volatility::Volatile;
        let rows = if all_scalar { 1 } else { args.number_rows };
        // Asynchronous calls get whole columns: constants expanded, so that every chunk is a
        // slice of the same arrays.
        let arrays = self.argument_arrays(&args.args, rows, true)?;
        let function = self.function();
        let array = match self.worker_pool() {
            // Isolated: the worker makes the calls, with the same limits, and answers the whole
            // batch (a worker's call time limit bounds the batch).
            Some(pool) => {
                let cancel = crate::isolation::CallCancel::of(&args.config_options);
                pool.call_async(
                    function,
                    &arrays,
                    rows,
                    self.declared_return_type(),
                    limits,
                    cancel,
                )
                .map_err(|fault| {
                    DataFusionError::Execution(
                        fault.describe(self.sql_name(), function.library().path()),
                    )
                })?
            }
            None => call_in_chunks(function, &arrays, rows, self.declared_return_type(), limits)
                .await
                .map_err(|failure| {
                    DataFusionError::Execution(format!(
                        "plugin function {} ({}), {failure}",
                        self.sql_name(),
                        function.library().path().display(),
                    ))
                })?,
        };
        if all_scalar {
            // Constant arguments: one call, its value repeated to the batch's rows.
            // DataFusion's `AsyncFuncExec` turns a scalar result into a one-row column, which
            // would not match the batch.
            let value = datafusion::common::ScalarValue::try_from_array(&array, 0)?;
            return Ok(ColumnarValue::Array(
                value.to_array_of_size(args.number_rows)?,
            ));
        }
        Ok(ColumnarValue::Array(array))
    }
}

/// Why an asynchronous call of a batch failed: the rows of the call, and what happened.
#[derive(Debug)]
pub(crate) struct ChunkFailure {
    offset: usize,
    len: usize,
    what: ChunkError,
}

#[derive(Debug)]
enum ChunkError {
    Call(crate::error::CallError),
    Timeout(Duration),
    Limit(String),
    Assemble(String),
    /// Still a temporary failure after this many retries.
    GaveUp(String, u32),
}

impl std::fmt::Display for ChunkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (start, end) = (self.offset, self.offset + self.len);
        match &self.what {
            ChunkError::Call(e) => write!(f, "rows {start}..{end}: {e}"),
            ChunkError::Timeout(limit) => write!(
                f,
                "rows {start}..{end} did not complete within the call's time limit of {} ms",
                limit.as_millis()
            ),
            ChunkError::Limit(e) => write!(f, "rows {start}..{end}: in-flight limit: {e}"),
            ChunkError::Assemble(e) => write!(f, "rows {start}..{end}: cannot assemble: {e}"),
            ChunkError::GaveUp(e, 0) => write!(
                f,
                "rows {start}..{end}: {e} (a temporary failure; the function has no retries: \
                 #retries=N)"
            ),
            ChunkError::GaveUp(e, n) => write!(
                f,
                "rows {start}..{end}: {e} (a temporary failure, still after {n} {})",
                if *n == 1 { "retry" } else { "retries" }
            ),
        }
    }
}

/// Evaluates `function` (asynchronous) over `rows` rows of `arrays` as `limits` says: calls of
/// at most `chunk_rows` rows, at most `max_in_flight` of them started and not completed at once
/// (the permits, shared by everything that uses `limits`), each within the call time limit,
/// the results in row order. In-process, and in a worker process for an isolated function.
pub(crate) async fn call_in_chunks(
    function: &PluginFunction,
    arrays: &[(ArrayRef, bool)],
    rows: usize,
    return_type: &DataType,
    limits: &AsyncLimits,
) -> std::result::Result<ArrayRef, ChunkFailure> {
    let chunks: Vec<(usize, usize)> = (0..rows)
        .step_by(limits.chunk_rows)
        .map(|start| (start, limits.chunk_rows.min(rows - start)))
        .collect();
    let results: Vec<ArrayRef> = futures::stream::iter(chunks)
        .map(|(offset, len)| call_chunk(function, arrays, offset, len, limits))
        // The permits bound the calls in flight; the window of chunk futures is wider, so that
        // calls that completed early (waiting for the ones before them, to keep row order) do
        // not keep the next calls from starting.
        .buffered(limits.max_in_flight.saturating_mul(ORDER_WINDOW))
        .try_collect()
        .await?;
    let fail = |what| ChunkFailure {
        offset: 0,
        len: rows,
        what,
    };
    match results.as_slice() {
        [] => Ok(datafusion::arrow::array::new_empty_array(return_type)),
        [one] => Ok(Arc::clone(one)),
        many => {
            let parts: Vec<&dyn Array> = many.iter().map(|a| a.as_ref()).collect();
            concat(&parts).map_err(|e| fail(ChunkError::Assemble(e.to_string())))
        }
    }
}

/// One call over rows `offset..offset + len`, within the in-flight limit and the time limit.
async fn call_chunk(
    function: &PluginFunction,
    arrays: &[(ArrayRef, bool)],
    offset: usize,
    len: usize,
    limits: &AsyncLimits,
) -> std::result::Result<ArrayRef, ChunkFailure> {
    let fail = |what| ChunkFailure { offset, len, what };
    let chunk: Vec<(ArrayRef, bool)> = arrays
        .iter()
        .map(|(a, scalar)| (a.slice(offset, len), *scalar))
        .collect();
    let mut wait = FIRST_RETRY_WAIT;
    for attempt in 0.. {
        let permit = limits
            .permits
            .acquire()
            .await
            .map_err(|e| fail(ChunkError::Limit(e.to_string())))?;
        let pending = function
            .start_async(&chunk, len)
            .map_err(|e| fail(ChunkError::Call(e)))?;
        let outcome =
            tokio::time::timeout(limits.call_timeout, pending.finish(function, &chunk, len)).await;
        drop(permit);
        match outcome {
            Ok(Ok(array)) => return Ok(array),
            Ok(Err(crate::error::CallError::Retryable(message))) => {
                if attempt >= limits.retries {
                    return Err(fail(ChunkError::GaveUp(message, limits.retries)));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
            Ok(Err(e)) => return Err(fail(ChunkError::Call(e))),
            // Dropping the pending call asked the plugin to cancel it.
            Err(_) => return Err(fail(ChunkError::Timeout(limits.call_timeout))),
        }
    }
    unreachable!("the loop returns")
}

/// The asynchronous plugin UDFs registered so far (weakly): DataFusion's `AsyncScalarUDF` does
/// not give its inner UDF back, so `plugin_functions` and `EXPLAIN` find a plugin UDF behind it
/// here, by the address of the signature it hands out (its inner UDF's own field).
static ASYNC_UDFS: Mutex<Vec<Weak<PluginUdf>>> = Mutex::new(Vec::new());

/// `udf` through DataFusion's async UDF machinery, remembered for [`plugin_udf_of`].
pub(crate) fn async_scalar_udf(udf: PluginUdf) -> ScalarUDF {
    let udf = Arc::new(udf);
    let mut known = ASYNC_UDFS.lock().unwrap_or_else(|e| e.into_inner());
    known.retain(|w| w.strong_count() > 0);
    known.push(Arc::downgrade(&udf));
    drop(known);
    AsyncScalarUDF::new(udf).into_scalar_udf()
}

/// A plugin UDF behind a registered scalar UDF: itself, or the one inside DataFusion's wrapper
/// of an asynchronous function.
#[derive(Debug)]
pub enum PluginUdfRef<'a> {
    /// A synchronous plugin UDF.
    Borrowed(&'a PluginUdf),
    /// An asynchronous one.
    Shared(Arc<PluginUdf>),
}

impl std::ops::Deref for PluginUdfRef<'_> {
    type Target = PluginUdf;

    fn deref(&self) -> &PluginUdf {
        match self {
            PluginUdfRef::Borrowed(udf) => udf,
            PluginUdfRef::Shared(udf) => udf,
        }
    }
}

/// The plugin UDF `udf` is, if it is one (synchronous or asynchronous).
pub fn plugin_udf_of(udf: &ScalarUDF) -> Option<PluginUdfRef<'_>> {
    if let Some(plugin) = udf.inner().downcast_ref::<PluginUdf>() {
        return Some(PluginUdfRef::Borrowed(plugin));
    }
    udf.inner().downcast_ref::<AsyncScalarUDF>()?;
    let signature = udf.signature();
    ASYNC_UDFS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .find(|p| std::ptr::eq(ScalarUDFImpl::signature(p.as_ref()), signature))
        .map(PluginUdfRef::Shared)
}
