//! Asynchronous functions (ABI 2.3): starting a call, the completion the plugin calls from any
//! thread, and cancel.
//!
//! The plugin gets, as the completion's `context`, the host's number for the call (never a
//! pointer): [`complete`] looks the number up in [`CALLS`] and takes the call's slot out, so a
//! second completion, or one for a number never started, finds nothing and is released unread.
//! A slot holds its library, so a library is never unmapped (and its unload hook never runs)
//! while one of its calls is outstanding, also after the query that made the call gave up on it;
//! and the library is never dropped on the plugin's thread inside the completion (the outcome
//! carries it to the caller, or to a reaper thread): the last reference there would run the
//! unload hook on a thread of the library and unmap the code it runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use tokio::sync::oneshot;
use udf_abi::v2::{self, ReleaseBytes, UdfCompletion, UdfOwnedBytes};

use super::library::{AsyncEntrypoints, Entrypoints, PluginLibrary};
use super::scalar::{PluginFunction, check_status, take_v2_bytes};
use crate::error::CallError;

/// The host's default for an asynchronous function's calls in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// The host's default for the rows of one asynchronous call.
pub const DEFAULT_CHUNK_ROWS: usize = 1;

/// What a library declares for an asynchronous function (0 = the host's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncDefaults {
    /// The most calls in flight the library asks for.
    pub max_in_flight: u32,
    /// The most rows per call the library asks for.
    pub chunk_rows: u32,
}

/// What a completion carried, moved out of the plugin's structs, with the call's library (last,
/// so that it drops after the arrays whose release callbacks it holds mapped).
struct Outcome {
    status: i32,
    out: FFI_ArrowArray,
    out_schema: FFI_ArrowSchema,
    message: Result<Option<String>, CallError>,
    library: Arc<PluginLibrary>,
}

/// Drops `library` on a host thread: never on the plugin's thread that is completing a call,
/// where the last reference would run the library's unload hook (which waits for the library's
/// threads, that one included) and unmap the code that thread is running.
fn reap(library: Arc<PluginLibrary>) {
    // The reference itself is moved to the reaper, never a clone: the reaper may drop what it
    // receives at once, and a clone kept here would then be the last reference.
    super::library::on_a_host_thread(Box::new(move || drop(library)));
}

/// An outstanding call: where its outcome goes, and its library, held until it completes.
struct Slot {
    sender: oneshot::Sender<Outcome>,
    release: ReleaseBytes,
    library: Arc<PluginLibrary>,
}

/// Every outstanding call of the process, by number.
static CALLS: LazyLock<Mutex<HashMap<u64, Slot>>> = LazyLock::new(Default::default);
/// The next call number (0 is never used).
static NEXT_CALL: AtomicU64 = AtomicU64::new(1);
/// Completions for no outstanding call (a second completion, or a number never started).
static STRAY_COMPLETIONS: AtomicU64 = AtomicU64::new(0);

/// The number of completions so far for no outstanding call: a plugin that completed a call twice,
/// or completed a call number it was never given. Their arrays were released unread.
pub fn stray_completions() -> u64 {
    STRAY_COMPLETIONS.load(Ordering::Relaxed)
}

/// The number of calls started and not completed yet, in this process.
pub fn outstanding_calls() -> usize {
    CALLS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// The completion function every asynchronous call gets (see the module documentation).
///
/// # Safety
///
/// Called by plugin code, which ABI 2.3 requires to pass `out` and `out_schema` null or pointing
/// at C Data Interface structs it hands over, and `error` bytes made by its `release_bytes`.
unsafe extern "C" fn complete(
    context: *mut std::ffi::c_void,
    status: i32,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: UdfOwnedBytes,
) {
    // Take the structs over first (C Data Interface move semantics), so that they are released
    // whatever follows.
    let out = if out.is_null() {
        FFI_ArrowArray::empty()
    } else {
        // SAFETY: non-null, and ABI 2.3 says it points at an array moved to the host; the
        // plugin's struct is left released (an empty struct).
        unsafe { std::ptr::replace(out, FFI_ArrowArray::empty()) }
    };
    let out_schema = if out_schema.is_null() {
        FFI_ArrowSchema::empty()
    } else {
        // SAFETY: as for `out`.
        unsafe { std::ptr::replace(out_schema, FFI_ArrowSchema::empty()) }
    };
    let id = context as usize as u64;
    let slot = CALLS.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    let Some(slot) = slot else {
        // Released here (their release callbacks are the plugin's, which is running). An error
        // message cannot be given back: which library made it is not known.
        STRAY_COMPLETIONS.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            call = id,
            "a plugin completed an asynchronous call that is not outstanding"
        );
        drop((out, out_schema));
        return;
    };
    let message = (!error.ptr.is_null() || error.len > 0)
        .then(|| take_v2_bytes(error, slot.release, &slot.library))
        .transpose()
        .map(|bytes| bytes.map(|b| String::from_utf8_lossy(b.as_bytes()).into_owned()));
    let outcome = Outcome {
        status,
        out,
        out_schema,
        message,
        library: slot.library,
    };
    // The library travels with the outcome to the caller, which drops it on a host thread. When
    // the caller gave up on the call (its query was cancelled or timed out), the outcome comes
    // back here: its arrays are released now (their callbacks are this plugin's, which is
    // running), and the library goes to a host thread.
    if let Err(outcome) = slot.sender.send(outcome) {
        let Outcome {
            out,
            out_schema,
            message,
            library,
            ..
        } = outcome;
        drop((out, out_schema, message));
        reap(library);
    }
}

/// A started asynchronous call: [`finish`](Self::finish) waits for its outcome. Dropped before
/// it completed (a cancelled query, a time limit), it asks the plugin to stop early; the
/// outcome, whenever it comes, is released unread.
pub struct PendingCall {
    id: u64,
    receiver: Option<oneshot::Receiver<Outcome>>,
    cancel: Option<v2::AsyncCancel>,
    /// Holds the library while the caller may still call `cancel`.
    _library: Arc<PluginLibrary>,
}

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCall")
            .field("id", &self.id)
            .field("finished", &self.receiver.is_none())
            .finish_non_exhaustive()
    }
}

impl PendingCall {
    /// The host's number for the call.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the call's outcome and checks it as a batch result of `function` over `args`.
    pub async fn finish(
        mut self,
        function: &PluginFunction,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<ArrayRef, CallError> {
        // The receiver stays in `self` while waiting: if this future is dropped (the query
        // gave up on the call), `Drop` sees the call unfinished and cancels it.
        let Some(receiver) = self.receiver.as_mut() else {
            return Err(CallError::HostBug(
                "an asynchronous call finished twice".into(),
            ));
        };
        let outcome = receiver.await;
        self.receiver = None;
        let outcome = outcome.map_err(|_| {
            CallError::HostBug("an asynchronous call's slot went away without an outcome".into())
        })?;
        match outcome.status {
            v2::status::OK => {
                function.import_batch_result(outcome.out, outcome.out_schema, args, num_rows)
            }
            v2::status::ERROR => Err(match outcome.message? {
                Some(message) => CallError::Plugin(message),
                None => CallError::NullErrorMessage,
            }),
            v2::status::RETRY => Err(match outcome.message? {
                Some(message) => CallError::Retryable(message),
                None => CallError::NullErrorMessage,
            }),
            other => Err(CallError::InvalidStatus(other)),
        }
    }

    /// Asks the plugin to stop the call early (it still completes it).
    pub fn cancel(&self) {
        if let Some(cancel) = self.cancel {
            // SAFETY: ABI 2.3 declares `cancel` as `void (uint64_t)`, callable from any thread at
            // any time; `_library` keeps it mapped.
            unsafe { cancel(self.id) };
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if self.receiver.is_some() {
            // Not finished: the query gave up on the call.
            self.cancel();
        }
    }
}

impl PluginFunction {
    fn async_entrypoints(&self) -> Option<(AsyncEntrypoints, ReleaseBytes)> {
        match &self.library().entrypoints {
            Entrypoints::V2 {
                asyncs, release, ..
            } => asyncs[self.index()].map(|a| (a, *release)),
            Entrypoints::V1(_) => None,
        }
    }

    /// What the library declares for this function if it is asynchronous (ABI 2.3).
    pub fn async_defaults(&self) -> Option<AsyncDefaults> {
        self.async_entrypoints().map(|(a, _)| AsyncDefaults {
            max_in_flight: a.max_in_flight,
            chunk_rows: a.chunk_rows,
        })
    }

    /// Starts one asynchronous call over `args` (`num_rows` rows; arguments as for
    /// [`call_batch`](Self::call_batch)). The plugin computes it in the background and reports
    /// through the completion; [`PendingCall::finish`] waits for that.
    pub fn start_async(
        &self,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<PendingCall, CallError> {
        let Some((entry, release)) = self.async_entrypoints() else {
            return Err(CallError::HostBug(
                "start_async on a function that is not asynchronous".into(),
            ));
        };
        let mut call = self.export_arguments(args, num_rows)?;
        let id = NEXT_CALL.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let library = Arc::clone(self.library());
        // The slot exists before the plugin can complete (also from inside `start`).
        CALLS.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Slot {
                sender,
                release,
                library: Arc::clone(&library),
            },
        );
        let completion = UdfCompletion {
            context: id as usize as *mut std::ffi::c_void,
            complete: Some(complete),
        };
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: `start` belongs to the library, alive while `library` is held. The arrays,
        // schemas and flags are valid C Data Interface structs of the declared types and row
        // counts (checked by `export_arguments`), alive and unmoved during the call (the plugin
        // may move the arrays out); `error` is valid for writes.
        let status = unsafe {
            (entry.start)(
                call.arrays.as_mut_slice().as_mut_ptr(),
                call.schemas(),
                call.scalar_flags.as_slice().as_ptr(),
                args.len(),
                num_rows,
                completion,
                id,
                &mut error,
            )
        };
        drop(call);
        if status == v2::status::OK {
            return Ok(PendingCall {
                id,
                receiver: Some(receiver),
                cancel: entry.cancel,
                _library: library,
            });
        }
        // Not started: the plugin must not complete it; a completion that comes anyway is a
        // stray one. The status and message read as a batch call's are.
        CALLS.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        Err(check_status(status, error, release, &library)
            .err()
            .unwrap_or_else(|| CallError::HostBug("a start that failed with status OK".into())))
    }
}
