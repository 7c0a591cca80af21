//! The library's Tokio runtime for `#[udf(async)]` calls, and the dispatcher thread that owns
//! it.
//!
//! The host's threads only ever touch plain data here: a queue of jobs under a `Mutex`, a
//! `Condvar`, and the map of abort handles. Everything that belongs to Tokio (spawning, waking a
//! task to abort it, the runtime's own threads) happens on the dispatcher thread or the
//! runtime's threads, which the library starts itself. That is the point: Tokio keeps per-thread
//! state in thread-locals with destructors, and a thread-local destructor of this library
//! registered on a host thread would make the C library keep the library mapped after `dlclose`
//! until that host thread exits. For the same reason the dispatcher is started with
//! `pthread_create`, not `std::thread::spawn` (whose spawn hooks live in a thread-local of the
//! spawning thread).
//!
//! The unload hook queues a stop, joins the dispatcher, which drops the runtime (joining its
//! threads) before it returns, and frees the queue's and the map's memory (statics of a library
//! are unmapped with it; what they point at would leak at every unload).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{AbortHandle, AbortRegistration, Abortable};

use super::{CallFuture, Declared, complete};
use std::panic::AssertUnwindSafe;

use crate::export::panicked;
use crate::v2::UdfCompletion;

/// A completion to call from a thread of the runtime.
struct Completion(UdfCompletion);

// SAFETY: the ABI lets the plugin call the completion from any thread; its context is the host's
// number for the call, passed back unchanged and never dereferenced here.
unsafe impl Send for Completion {}

/// A call handed to the dispatcher.
struct Started {
    call: u64,
    future: CallFuture,
    registration: AbortRegistration,
    completion: Completion,
    return_type: Declared,
}

enum Job {
    Start(Started),
    Cancel(u64),
    Stop,
}

struct Shared {
    queue: VecDeque<Job>,
    /// The abort handles of the calls started and not completed, by the host's call number.
    calls: BTreeMap<u64, AbortHandle>,
    /// The dispatcher thread, while it runs.
    thread: Option<libc::pthread_t>,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared {
    queue: VecDeque::new(),
    calls: BTreeMap::new(),
    thread: None,
});
static WAKE: Condvar = Condvar::new();

/// The shared state; a panic while it was held (none is expected: nothing in the critical
/// sections panics) leaves it usable.
fn shared() -> MutexGuard<'static, Shared> {
    SHARED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Queues call `call`'s future, starting the dispatcher if it does not run.
pub(super) fn submit(
    call: u64,
    future: CallFuture,
    completion: UdfCompletion,
    return_type: Declared,
) -> Result<(), String> {
    let mut shared = shared();
    if shared.thread.is_none() {
        shared.thread = Some(start_dispatcher()?);
    }
    let (handle, registration) = AbortHandle::new_pair();
    shared.calls.insert(call, handle);
    shared.queue.push_back(Job::Start(Started {
        call,
        future,
        registration,
        completion: Completion(completion),
        return_type,
    }));
    WAKE.notify_one();
    Ok(())
}

/// Queues a cancel of call `call` (the dispatcher aborts it, if it still runs).
pub(super) fn cancel(call: u64) {
    let mut shared = shared();
    if shared.thread.is_some() && shared.calls.contains_key(&call) {
        shared.queue.push_back(Job::Cancel(call));
        WAKE.notify_one();
    }
}

/// Stops the dispatcher and the runtime; returns when their threads have ended.
pub(super) fn stop() {
    let thread = {
        let mut shared = shared();
        let thread = shared.thread.take();
        if thread.is_some() {
            shared.queue.push_back(Job::Stop);
            WAKE.notify_one();
        }
        thread
    };
    if let Some(thread) = thread {
        // SAFETY: a thread started by `start_dispatcher`, joinable, and joined once (taken out
        // of the shared state above).
        unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
    }
    let mut shared = shared();
    shared.queue = VecDeque::new();
    shared.calls = BTreeMap::new();
}

fn start_dispatcher() -> Result<libc::pthread_t, String> {
    let mut thread = std::mem::MaybeUninit::<libc::pthread_t>::uninit();
    // SAFETY: `thread` is valid for writes; default attributes; `dispatcher` has the signature
    // `pthread_create` expects and takes no argument.
    let rc = unsafe {
        libc::pthread_create(
            thread.as_mut_ptr(),
            std::ptr::null(),
            dispatcher,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot start the library's thread for asynchronous calls: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    // SAFETY: `pthread_create` succeeded, so it wrote the thread's id.
    Ok(unsafe { thread.assume_init() })
}

extern "C" fn dispatcher(_: *mut libc::c_void) -> *mut libc::c_void {
    // Nothing below is expected to panic; if it did, the unwind must not leave this function.
    let _ = std::panic::catch_unwind(run);
    std::ptr::null_mut()
}

/// The runtime's worker threads: few, since the calls wait on I/O.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4))
}

fn run() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .thread_name("udf-async")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the library's async runtime: {e}"));
    loop {
        let job = {
            let mut shared = shared();
            loop {
                if let Some(job) = shared.queue.pop_front() {
                    break job;
                }
                shared = WAKE.wait(shared).unwrap_or_else(PoisonError::into_inner);
            }
        };
        match job {
            Job::Start(started) => match &runtime {
                Ok(runtime) => {
                    runtime.spawn(run_call(started));
                }
                Err(message) => finish(
                    started.call,
                    started.completion,
                    Err(message.clone()),
                    started.return_type,
                ),
            },
            Job::Cancel(call) => {
                if let Some(handle) = shared().calls.get(&call) {
                    handle.abort();
                }
            }
            Job::Stop => break,
        }
    }
    // Joins the runtime's threads (no call is outstanding: the host unloads only after every
    // call completed).
    drop(runtime);
}

/// Runs one call's future to its end (or its abort), then completes it.
fn run_call(started: Started) -> impl Future<Output = ()> + Send {
    let Started {
        call,
        future,
        registration,
        completion,
        return_type,
    } = started;
    async move {
        let outcome = AssertUnwindSafe(Abortable::new(future, registration))
            .catch_unwind()
            .await;
        let result = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_aborted)) => Err("cancelled".to_string()),
            Err(panic) => Err(panicked(panic)),
        };
        finish(call, completion, result, return_type);
    }
}

fn finish(
    call: u64,
    completion: Completion,
    result: Result<arrow_array::ArrayRef, String>,
    return_type: Declared,
) {
    shared().calls.remove(&call);
    complete(completion.0, result, return_type);
}

/// Awaits every row's future at once; their outputs in row order.
pub(super) async fn join_rows<T: Future>(rows: impl Iterator<Item = T>) -> Vec<T::Output> {
    futures_util::future::join_all(rows).await
}
