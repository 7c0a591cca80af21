//! Asynchronous functions (ABI 2.3) for `#[udf(async)]`: the start entrypoint's wrapper
//! ([`start`]), the cancel entrypoint ([`cancel`]) and the library's unload hook
//! ([`udfsql_unload`]), over a Tokio runtime inside the plugin ([`runtime`], with the `async`
//! feature).
//!
//! A call's rows run concurrently inside the call: one future per row (the function's own
//! future, after its arguments are read as the batch path reads them, NULLs under the STRICT
//! rule giving NULL without a call), joined, and the results assembled in row order into one
//! array of the declared type, handed to the host's completion from a thread of the runtime.
//! The host bounds the calls in flight and splits batches into calls of `chunk_rows` rows (1 by
//! default, so by default one row is one call and the host's limit is the number of rows
//! awaited at once).

use std::future::Future;
use std::sync::Arc;

use super::*;
use crate::export::batch::{self, ArrayRef, BytesPerRow, Column};
use crate::v2::{UdfAsyncFunction, UdfCompletion};

#[cfg(feature = "async")]
mod runtime;

/// An asynchronous function's entry, by the function's name, in the library's third distributed
/// slice: the manifest's `async_functions` array is laid out from it, parallel to
/// [`FUNCTIONS`], when the library has any.
#[derive(Debug)]
pub struct ExportedAsync {
    /// The function's name, as in its [`ExportedFunction`].
    pub name: &'static str,
    /// Its start and cancel entrypoints and the limits it asks for.
    pub function: UdfAsyncFunction,
}

// SAFETY: holds function pointers and numbers only, never written after construction.
unsafe impl Sync for ExportedAsync {}

impl ExportedAsync {
    /// The entry of an asynchronous function started by `start`, cancelled by this module's
    /// [`cancel`]; `max_in_flight` and `chunk_rows` 0 let the host choose.
    pub const fn new(
        name: &'static str,
        start: crate::v2::AsyncStart,
        max_in_flight: u32,
        chunk_rows: u32,
    ) -> ExportedAsync {
        ExportedAsync {
            name,
            function: UdfAsyncFunction {
                start: Some(start),
                cancel: Some(cancel),
                max_in_flight,
                chunk_rows,
            },
        }
    }
}

impl ExportedFunction {
    /// The descriptor of an asynchronous function over Arrow types (`#[udf(async,
    /// vectorized)]`): its types in its [`ExportedArrowTypes`](super::ExportedArrowTypes)
    /// entry, every argument taking NULLs, the result possibly NULL.
    pub const fn asynchronous_arrow(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        volatility: u32,
    ) -> ExportedFunction {
        ExportedFunction::descriptor(
            name,
            arg_types,
            arg_nullable,
            crate::v2::TYPE_ARROW,
            true,
            volatility,
            None,
            None,
        )
    }

    /// The descriptor of an asynchronous function: no row or batch entrypoint (the host calls
    /// the start entrypoint of its [`ExportedAsync`] entry).
    pub const fn asynchronous(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        return_type: UdfType,
        return_nullable: bool,
        volatility: u32,
    ) -> ExportedFunction {
        ExportedFunction::descriptor(
            name,
            arg_types,
            arg_nullable,
            return_type.tag(),
            return_nullable,
            volatility,
            None,
            None,
        )
    }
}

/// Every `#[udf(async)]` function of the library (a subset of [`FUNCTIONS`], by name).
#[linkme::distributed_slice]
pub static ASYNC_FUNCTIONS: [ExportedAsync];

/// Implemented when udf-abi is built with its `async` feature, which `#[udf(async)]` needs.
#[diagnostic::on_unimplemented(
    message = "`#[udf(async)]` needs udf-abi's `async` feature",
    label = "udf-abi is built without its `async` feature",
    note = "in the plugin's Cargo.toml: udf-abi = {{ ..., features = [\"async\"] }}"
)]
pub trait AsyncFeature {}

#[cfg(feature = "async")]
impl AsyncFeature for () {}

/// A compile-time check the generated code makes: fails to compile without the `async` feature,
/// with a message that says so.
pub const fn require_async_feature<T: AsyncFeature>() {}

/// The result type a call's column must have: a tagged type (row-by-row `#[udf(async)]`) or an
/// Arrow type (`#[udf(async, vectorized)]`).
#[derive(Debug, Clone)]
pub enum Declared {
    /// A tagged type.
    Tagged(UdfType),
    /// An Arrow type.
    Arrow(arrow_schema::DataType),
}

/// A call's future: the assembled result column, or the error that fails the call.
pub type CallFuture = std::pin::Pin<Box<dyn Future<Output = Result<ArrayRef, String>> + Send>>;

/// The body of every generated start entrypoint: imports the arguments (of the declared
/// `arg_types`, as the batch path does), makes the call's future (`row(columns, i)` for every
/// row `i`, joined, assembled in row order into the declared `return_type`), hands it to the
/// library's runtime and returns; the outcome goes to `completion` exactly once, from a thread
/// of the runtime. An error here (bad arguments, the runtime cannot start) returns
/// [`status::ERROR`] with the message, and the completion is never called.
///
/// # Safety
///
/// The pointers must satisfy [`AsyncStart`](crate::v2::AsyncStart)'s contract: `args_len`
/// arrays (moved in), schemas and flags, and `error` valid for writes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn start<R, F, Fut>(
    args: *mut FFI_ArrowArray,
    schemas: *const FFI_ArrowSchema,
    is_scalar: *const u8,
    args_len: usize,
    arg_types: &'static [UdfType],
    return_type: UdfType,
    num_rows: usize,
    completion: UdfCompletion,
    call: u64,
    error: *mut UdfOwnedBytes,
    bytes_per_row: &'static BytesPerRow,
    row: F,
) -> i32
where
    R: IntoUdfResult + Send + 'static,
    F: Fn(Arc<Vec<Column>>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<R>, String>> + Send + 'static,
{
    let prepare = || {
        // SAFETY: the caller's promise, passed on.
        let columns = Arc::new(unsafe {
            batch::import_columns(args, schemas, is_scalar, args_len, arg_types, num_rows)
        }?);
        let future = call_future(columns, num_rows, return_type, bytes_per_row, row);
        Ok((
            Box::pin(future) as CallFuture,
            Declared::Tagged(return_type),
        ))
    };
    // SAFETY: the caller's promise, passed on.
    unsafe { start_with(error, completion, call, prepare) }
}

/// What both start entrypoints share: the checks of what the host passed, `prepare` (which
/// imports the arguments and makes the call's future) inside `catch_unwind`, and the future
/// handed to the library's runtime; an error at any step returns `ERROR` with the message, and
/// the completion is then never called.
///
/// # Safety
///
/// `error` must be null or valid for writes.
unsafe fn start_with(
    error: *mut UdfOwnedBytes,
    completion: UdfCompletion,
    call: u64,
    prepare: impl FnOnce() -> Result<(CallFuture, Declared), String>,
) -> i32 {
    if error.is_null() {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let prepared = catch_unwind(AssertUnwindSafe(|| {
        if completion.complete.is_none() {
            return Err("the host passed no completion function".to_string());
        }
        prepare()
    }));
    let (future, declared) = match prepared {
        Ok(Ok(prepared)) => prepared,
        // SAFETY: `error` is non-null (checked above) and valid for writes (the caller's
        // promise).
        Ok(Err(message)) => return unsafe { write_error(error, message) },
        // SAFETY: as above.
        Err(panic) => return unsafe { write_error(error, panicked(panic)) },
    };
    match submit(call, future, completion, declared) {
        Ok(()) => status::OK,
        // SAFETY: as above.
        Err(message) => unsafe { write_error(error, message) },
    }
}

/// The body of every start entrypoint `#[udf(async, vectorized)]` generates: imports the
/// arguments (of the Arrow types `types` declares, constants repeated to the call's rows), makes
/// the call's future (`f(columns, rows)`, its result checked against the declared type and the
/// rows) and hands it to the library's runtime; as [`start`] otherwise.
///
/// # Safety
///
/// As for [`start`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn start_vectorized<F, Fut>(
    args: *mut FFI_ArrowArray,
    is_scalar: *const u8,
    args_len: usize,
    num_rows: usize,
    completion: UdfCompletion,
    call: u64,
    error: *mut UdfOwnedBytes,
    types: fn() -> crate::export::arrow::DeclaredTypes,
    f: F,
) -> i32
where
    F: FnOnce(Arc<Vec<ArrayRef>>, usize) -> Fut + Send + 'static,
    Fut: Future<Output = Result<ArrayRef, String>> + Send + 'static,
{
    let prepare = || {
        let (arg_types, return_type) = types()?;
        // SAFETY: the caller's promise, passed on.
        let columns = Arc::new(unsafe {
            crate::export::arrow::import_columns(args, is_scalar, args_len, num_rows, arg_types)
        }?);
        let t = return_type.clone();
        let future: CallFuture = Box::pin(async move {
            let array = f(columns, num_rows).await?;
            crate::export::arrow::check_result(&array, &t, num_rows)?;
            Ok(array)
        });
        Ok((future, Declared::Arrow(return_type)))
    };
    // SAFETY: the caller's promise, passed on.
    unsafe { start_with(error, completion, call, prepare) }
}

/// The future of one call: every row's future at once, then the column in row order.
async fn call_future<R, F, Fut>(
    columns: Arc<Vec<Column>>,
    rows: usize,
    return_type: UdfType,
    bytes_per_row: &'static BytesPerRow,
    row: F,
) -> Result<ArrayRef, String>
where
    R: IntoUdfResult,
    F: Fn(Arc<Vec<Column>>, usize) -> Fut,
    Fut: Future<Output = Result<Option<R>, String>>,
{
    let results = join_rows((0..rows).map(|i| row(Arc::clone(&columns), i))).await;
    drop(columns);
    let mut results = results.into_iter();
    batch::rows(
        &[],
        rows,
        return_type,
        bytes_per_row,
        |_, _, out| match results.next() {
            Some(Ok(Some(value))) => batch::append(out, value),
            Some(Ok(None)) => {
                out.append_null();
                Ok(())
            }
            Some(Err(message)) => Err(message),
            None => Err("a row without a result".to_string()),
        },
    )
}

#[cfg(feature = "async")]
use runtime::{join_rows, submit};

#[cfg(not(feature = "async"))]
async fn join_rows<T>(_: impl Iterator<Item = T>) -> Vec<T::Output>
where
    T: Future,
{
    Vec::new()
}

#[cfg(not(feature = "async"))]
fn submit(_: u64, _: CallFuture, _: UdfCompletion, _: Declared) -> Result<(), String> {
    Err("udf-abi was built without its `async` feature".to_string())
}

/// The cancel entrypoint of every `#[udf(async)]` function: asks the runtime to stop call
/// `call` (its future is dropped, and the call completes with an error). Never blocks on the
/// call; a call that already completed is not found and nothing happens.
///
/// # Safety
///
/// None beyond the ABI's: any thread, any number.
pub unsafe extern "C" fn cancel(call: u64) {
    #[cfg(feature = "async")]
    runtime::cancel(call);
    #[cfg(not(feature = "async"))]
    let _ = call;
}

/// The unload hook of a library with `#[udf(async)]` functions: stops the runtime and returns
/// when none of its threads runs any more.
///
/// # Safety
///
/// Called by the host once, after every call of the library completed, right before `dlclose`.
#[cfg(feature = "async")]
pub unsafe extern "C" fn udfsql_unload() {
    runtime::stop();
}

/// The result column exported for the host: of the declared type `t`, checked here (an array of
/// another type would be read by the host through a schema that does not describe it).
fn export(array: ArrayRef, t: &Declared) -> Result<(FFI_ArrowArray, FFI_ArrowSchema), String> {
    match t {
        Declared::Tagged(t) => {
            let declared = batch::arrow_type(*t);
            if *array.data_type() != declared {
                return Err(format!(
                    "{}: the result is of type {}, {declared} declared",
                    batch::MISMATCH,
                    array.data_type()
                ));
            }
            Ok((batch::export_result(array, *t), batch::result_schema(*t)))
        }
        // `start_vectorized`'s future checked the type and the rows.
        Declared::Arrow(t) => {
            let schema = FFI_ArrowSchema::try_from(t).map_err(|e| e.to_string())?;
            Ok((FFI_ArrowArray::new(&array.to_data()), schema))
        }
    }
}

/// Hands an outcome to the host's completion: the column (of the declared type `t`, moved to
/// the host), or the error message (`RETRY` for a [`Retryable`](crate::Retryable) one).
#[cfg_attr(not(feature = "async"), allow(dead_code))]
fn complete(completion: UdfCompletion, result: Result<ArrayRef, String>, t: Declared) {
    let Some(complete) = completion.complete else {
        return;
    };
    match result.and_then(|array| export(array, &t)) {
        Ok((mut out, mut out_schema)) => {
            // SAFETY: the host's completion, called once for this call with the context it
            // gave; `out` and `out_schema` are valid arrays it moves out (what it leaves is
            // released when they drop here).
            unsafe {
                complete(
                    completion.context,
                    status::OK,
                    &mut out,
                    &mut out_schema,
                    UdfOwnedBytes::EMPTY,
                )
            };
        }
        Err(message) => {
            let (message, retryable) = super::take_retry_mark(message);
            let status = if retryable {
                status::RETRY
            } else {
                status::ERROR
            };
            // SAFETY: as above; the message is released by the host through `release_bytes`.
            unsafe {
                complete(
                    completion.context,
                    status,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    owned_bytes(message.into_bytes()),
                )
            };
        }
    }
}

#[cfg(all(test, feature = "async"))]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use arrow_array::{Array, Int64Array};

    use super::*;

    /// A call's column, or its error.
    type Outcome = Result<Vec<Option<i64>>, String>;

    /// What the test completion received, by the call's context.
    static OUTCOMES: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record(
        context: *mut std::ffi::c_void,
        status: i32,
        out: *mut FFI_ArrowArray,
        out_schema: *mut FFI_ArrowSchema,
        error: UdfOwnedBytes,
    ) {
        let outcome = if status == status::OK {
            // SAFETY: on OK the plugin passes a valid array and schema, moved to us.
            let (array, schema) = unsafe {
                (
                    FFI_ArrowArray::from_raw(out),
                    FFI_ArrowSchema::from_raw(out_schema),
                )
            };
            // SAFETY: as above.
            let data = unsafe { arrow_array::ffi::from_ffi(array, &schema) }.unwrap();
            let array = Int64Array::from(data);
            Ok(array.iter().collect())
        } else {
            // SAFETY: on ERROR the message is bytes made by `owned_bytes`, released once.
            let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
            Err(String::from_utf8(bytes).unwrap())
        };
        OUTCOMES.lock().unwrap().push((context as usize, outcome));
    }

    fn outcome(context: usize) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut outcomes = OUTCOMES.lock().unwrap();
            if let Some(i) = outcomes.iter().position(|(c, _)| *c == context) {
                let (_, outcome) = outcomes.remove(i);
                assert!(
                    !outcomes.iter().any(|(c, _)| *c == context),
                    "completed once"
                );
                return outcome;
            }
            drop(outcomes);
            assert!(Instant::now() < deadline, "call {context} completed");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    static KINDS: [UdfType; 1] = [UdfType::Int64];
    static BYTES: BytesPerRow = BytesPerRow::new(0);

    /// Starts call `context` of a function over one `BIGINT` column whose row future is `row`.
    fn start_call<Fut>(
        context: usize,
        values: &[Option<i64>],
        row: fn(Arc<Vec<Column>>, usize) -> Fut,
    ) -> Result<(), String>
    where
        Fut: Future<Output = Result<Option<i64>, String>> + Send + 'static,
    {
        let array = Int64Array::from(values.to_vec());
        let mut ffi = FFI_ArrowArray::new(&array.to_data());
        let schema = FFI_ArrowSchema::try_from(arrow_schema::DataType::Int64).unwrap();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: one valid array, schema and flag; `error` valid for writes.
        let status = unsafe {
            start(
                &mut ffi,
                &schema,
                &0u8,
                1,
                &KINDS,
                UdfType::Int64,
                values.len(),
                UdfCompletion {
                    context: context as *mut std::ffi::c_void,
                    complete: Some(record),
                },
                context as u64,
                &mut error,
                &BYTES,
                row,
            )
        };
        if status == status::OK {
            Ok(())
        } else {
            // SAFETY: bytes made by `owned_bytes`, released once.
            let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
            Err(String::from_utf8(bytes).unwrap())
        }
    }

    fn read(columns: &[Column], row: usize) -> Result<Option<i64>, String> {
        <i64 as batch::BatchArg>::read(&columns[0], row)
    }

    /// One test: the runtime is the library's, shared by the calls (the unload at the end stops
    /// it, and a later start would start it again).
    #[test]
    fn calls_complete_once_in_row_order_with_errors_panics_and_cancels() {
        // Rows finish in reverse order; the column is in row order; NULL gives NULL.
        start_call(
            1,
            &[Some(1), None, Some(3), Some(4)],
            |cols, row| async move {
                let Some(x) = read(&cols, row)? else {
                    return Ok(None);
                };
                tokio::time::sleep(Duration::from_millis(40 - 10 * row as u64)).await;
                Ok(Some(x * 10))
            },
        )
        .unwrap();
        assert_eq!(outcome(1), Ok(vec![Some(10), None, Some(30), Some(40)]));

        // A row's error fails the call.
        start_call(2, &[Some(1), Some(2)], |cols, row| async move {
            match read(&cols, row)? {
                Some(2) => Err("no 2 here".to_string()),
                x => Ok(x),
            }
        })
        .unwrap();
        assert_eq!(outcome(2), Err("no 2 here".to_string()));

        // A panic in a row's future is an error with its message and location.
        start_call(3, &[Some(1)], |_, _| async move {
            tokio::task::yield_now().await;
            panic!("the future broke")
        })
        .unwrap();
        let error = outcome(3).unwrap_err();
        assert!(
            error.starts_with("panicked: the future broke (at ")
                && error.contains("async_fn/mod.rs:"),
            "{error}"
        );

        // Cancel: the future is dropped and the call completes with an error, promptly.
        let started = Instant::now();
        start_call(4, &[Some(1)], |_, _| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(Some(1))
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: any thread, any number.
        unsafe { cancel(4) };
        assert_eq!(outcome(4), Err("cancelled".to_string()));
        assert!(started.elapsed() < Duration::from_secs(10));
        // A cancel of a call that completed (or never was) does nothing.
        // SAFETY: as above.
        unsafe { cancel(4) };
        // SAFETY: as above.
        unsafe { cancel(12345) };

        // Arguments are checked before the call starts: a start error, no completion.
        let error = start_call(5, &[], |_, _| async move { Ok(None) });
        assert!(error.is_ok(), "zero rows is a call");
        assert_eq!(outcome(5), Ok(vec![]));

        // The unload hook stops the runtime: no thread of it is left.
        // SAFETY: every call above completed.
        unsafe { udfsql_unload() };
        let runtime_threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == "udf-async")
            .count();
        assert_eq!(runtime_threads, 0);
        // Started again on demand.
        start_call(6, &[Some(7)], |cols, row| async move { read(&cols, row) }).unwrap();
        assert_eq!(outcome(6), Ok(vec![Some(7)]));
        // SAFETY: the call completed.
        unsafe { udfsql_unload() };
    }
}
