//! The host side: worker processes for one library, started on demand up to the pool's size,
//! each used by one call at a time.
//!
//! A call takes an idle worker (or starts one, or waits for one), writes one request into the
//! worker's shared input region and waits for the reply in its output region (see `shared`):
//! first spinning on the reply's sequence word for as long as the worker's replies took lately
//! (at most [`HOST_SPIN`], see [`AdaptiveSpin`]; after calls too long for that, asleep until
//! shortly before the reply usually comes, then spinning; not at all while the pool keeps more
//! sides busy than the process may use CPUs, see [`crowded`]), then in `poll` on the
//! channel (the worker's doorbell), the worker's pidfd (readable when the process ends, even if
//! a child it forked keeps the channel open), its stderr and the query's [`CallCancel`] event.
//! Only the `poll` wait hands the tokio thread's other work away (`block_in_place`); a fast
//! reply a host spins for costs no thread switch (a crowded host always sleeps, and is woken).
//! Whatever goes wrong — the
//! worker dies, answers garbage, runs past the call's time limit, or the query is cancelled —
//! the worker's process group is killed and the worker reaped before the error is returned; the
//! next call starts a new one. The pool's lock is held only to take or return a worker.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::DataType;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, kill_process_group, pidfd_open};

use super::WorkerLimits;
use super::cancel::CallCancel;
use super::protocol::{self, HEADER, Reply};
use super::shared::{AdaptiveSpin, BELL, HOST_SPIN, HostRegions, PreciseTimers, spin_until};
use crate::async_udf::AsyncLimits;
use crate::call_path::CallPath;
use crate::ffi::PluginFunction;
use crate::trust::Sha256Digest;

/// How long a worker that closed its channel gets to exit on its own before it is killed (so
/// that its own exit status, not our kill, is what the error reports).
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// How a call through a worker failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The plugin reported an error, or its result broke a rule: the message the in-process
    /// path gives. The worker lives on.
    Plugin(String),
    /// No worker could be started.
    Start(String),
    /// The worker could not load the library (the message of the load error).
    Load(String),
    /// The worker was killed by a signal.
    Crashed {
        /// The signal number.
        signal: i32,
        /// The worker's memory limit, in MiB.
        memory_mib: Option<u64>,
        /// The last line the worker wrote to its stderr, if any.
        stderr: Option<String>,
    },
    /// The worker exited during the call: its status, and the last line it wrote to stderr.
    Exited(i32, Option<String>),
    /// The worker sent something that is not a reply of the declared shape.
    Malformed(String),
    /// The call ran past the time limit; the worker was killed.
    TimedOut(Duration),
    /// The query was cancelled; the worker was killed.
    Cancelled,
}

impl Fault {
    /// What went wrong, without the function's name (for errors about a whole library, such as
    /// a pool whose first worker cannot start).
    pub fn reason(&self) -> String {
        match self {
            Fault::Plugin(message) => message.clone(),
            Fault::Start(message) => format!("cannot start a worker process: {message}"),
            Fault::Load(message) => {
                format!("the worker process could not load the library: {message}")
            }
            Fault::Crashed { signal, stderr, .. } => format!(
                "the worker process crashed: {}{}",
                signal_name(*signal),
                said(stderr)
            ),
            Fault::Exited(code, stderr) => {
                format!(
                    "the worker process exited with status {code}{}",
                    said(stderr)
                )
            }
            Fault::Malformed(detail) => {
                format!("the worker process sent a malformed reply ({detail})")
            }
            Fault::TimedOut(limit) => format!("no answer within {}", seconds(*limit)),
            Fault::Cancelled => "cancelled".to_string(),
        }
    }

    /// The error text for function `name` of `library`, in the in-process path's shape
    /// ("plugin function f (lib.so): ...").
    pub fn describe(&self, name: &str, library: &Path) -> String {
        let lib = library.display();
        match self {
            Fault::Plugin(message) => format!("plugin function {name} ({lib}): {message}"),
            Fault::Start(message) => format!(
                "plugin function {name} ({lib}): cannot start an isolated worker process: {message}"
            ),
            Fault::Load(message) => format!(
                "plugin function {name} ({lib}): the isolated worker process could not load the library: {message}"
            ),
            Fault::Crashed {
                signal,
                memory_mib,
                stderr,
            } => {
                let memory = match (signal_may_be_memory(*signal), memory_mib) {
                    (true, Some(mib)) => format!(
                        " (workers run with a memory limit of {mib} MiB; an allocation past it fails)"
                    ),
                    _ => String::new(),
                };
                format!(
                    "plugin function {name} ({lib}) crashed: {} in its isolated worker process{memory}{}; \
                     the session lives on and a new worker serves the next call",
                    signal_name(*signal),
                    said(stderr)
                )
            }
            Fault::Exited(code, stderr) => {
                let hint = if *code == i32::from(super::worker::EXIT_CHANNEL) {
                    " (its channel to the host broke: the plugin closed or used descriptor 3)"
                } else {
                    ""
                };
                format!(
                    "plugin function {name} ({lib}): its worker process exited with status {code} during the call{hint}{}",
                    said(stderr)
                )
            }
            Fault::Malformed(detail) => format!(
                "plugin function {name} ({lib}): its worker process sent a malformed reply ({detail}); the worker was killed"
            ),
            Fault::TimedOut(limit) => format!(
                "plugin function {name} ({lib}): the call ran past the call time limit of {}; its worker process was killed",
                seconds(*limit)
            ),
            Fault::Cancelled => format!(
                "plugin function {name} ({lib}): the call was cancelled; its worker process was killed"
            ),
        }
    }
}

/// `; its last words on stderr: "..."` for an error message, or nothing.
fn said(stderr: &Option<String>) -> String {
    match stderr {
        Some(line) => format!("; its stderr ended with: {line:?}"),
        None => String::new(),
    }
}

/// The most of a worker's stderr kept (the end of it).
const STDERR_TAIL: usize = 2048;

/// The last non-empty line of `tail`, lossy UTF-8, at most 300 characters.
fn last_line(tail: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(tail);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    let line: String = line.chars().filter(|c| !c.is_control()).collect();
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_string())
}

fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.3} s", d.as_secs_f64())
    }
}

fn signal_may_be_memory(signal: i32) -> bool {
    [libc::SIGSEGV, libc::SIGABRT, libc::SIGBUS, libc::SIGKILL].contains(&signal)
}

/// `SIGSEGV` for 11, and so on.
pub(crate) fn signal_name(signal: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGSYS, "SIGSYS"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == signal)
        .map_or_else(|| format!("signal {signal}"), |(_, name)| name.to_string())
}

/// What the pool starts its workers with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct WorkerSpec {
    pub program: PathBuf,
    pub library: PathBuf,
    pub sha256: Sha256Digest,
    /// How many functions the host saw in the library.
    pub functions: usize,
    pub call_timeout: Duration,
    pub memory_mib: Option<u64>,
    pub size: usize,
    /// The number of workers the limits asked for (`None`: sized to `target_partitions`).
    pub configured_workers: Option<usize>,
}

/// The worker processes of one library (with one set of limits).
#[derive(Debug)]
pub struct WorkerPool {
    spec: WorkerSpec,
    state: Mutex<PoolState>,
    available: Condvar,
    /// The CPUs this process may use (affinity and quota), as seen when the pool was made.
    cpus: usize,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: Vec<Worker>,
    /// Workers that exist: idle, busy, or starting.
    live: usize,
    /// The numbers of the workers that have started and not been discarded (idle or busy): an
    /// aggregate's accumulator lives in one of them.
    started: std::collections::BTreeSet<u64>,
}

/// Numbers workers, so that an aggregate request can go to the one holding its accumulator.
static NEXT_WORKER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl WorkerPool {
    pub(crate) fn new(spec: WorkerSpec) -> WorkerPool {
        WorkerPool {
            spec,
            state: Mutex::default(),
            available: Condvar::new(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The most workers this pool runs at once.
    pub fn size(&self) -> usize {
        self.spec.size
    }

    /// The per-call time limit.
    pub fn call_timeout(&self) -> Duration {
        self.spec.call_timeout
    }

    /// The limits the pool was made with (the worker program as found).
    pub fn limits(&self) -> WorkerLimits {
        WorkerLimits {
            call_timeout: self.spec.call_timeout,
            memory_mib: self.spec.memory_mib,
            workers: self.spec.configured_workers,
            worker_program: Some(self.spec.program.clone()),
        }
    }

    /// Calls `function` (of this pool's library) in a worker; the result has type `returns` and
    /// `rows` rows, and passes the rules the in-process paths apply
    /// (`FunctionSignature::check_received_result`), or the worker is killed as a forger.
    pub(crate) fn call(
        self: &Arc<Self>,
        function: &PluginFunction,
        path: CallPath,
        args: &[(ArrayRef, bool)],
        rows: usize,
        returns: &DataType,
        cancel: Option<&CallCancel>,
    ) -> Result<ArrayRef, Fault> {
        self.call_route(function, path, None, args, rows, returns, cancel)
    }

    /// Calls the asynchronous `function` over a whole batch in a worker, which makes the calls
    /// as `limits` says (chunks, calls in flight, each call's time limit) and answers the batch;
    /// the pool's call time limit bounds the whole batch.
    pub(crate) fn call_async(
        self: &Arc<Self>,
        function: &PluginFunction,
        args: &[(ArrayRef, bool)],
        rows: usize,
        returns: &DataType,
        limits: &AsyncLimits,
        cancel: Option<&CallCancel>,
    ) -> Result<ArrayRef, Fault> {
        self.call_route(
            function,
            CallPath::Batch,
            Some(limits),
            args,
            rows,
            returns,
            cancel,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn call_route(
        self: &Arc<Self>,
        function: &PluginFunction,
        path: CallPath,
        asynchronous: Option<&AsyncLimits>,
        args: &[(ArrayRef, bool)],
        rows: usize,
        returns: &DataType,
        cancel: Option<&CallCancel>,
    ) -> Result<ArrayRef, Fault> {
        let mut worker = self.checkout(cancel)?;
        let result = worker.call(
            &self.spec,
            function,
            path,
            asynchronous,
            args,
            rows,
            returns,
            cancel,
        );
        match result {
            Ok(array) => {
                self.checkin(worker);
                Ok(array)
            }
            Err(Fault::Plugin(message)) => {
                self.checkin(worker);
                Err(Fault::Plugin(message))
            }
            Err(fault) => {
                self.discard(worker);
                self.warm();
                Err(fault)
            }
        }
    }

    /// Sends an aggregate request (ABI 2.4) to worker `to`, the one holding the accumulator, or
    /// to any (`None`: creating one); the reply, and the number of the worker that answered.
    /// `expect` is the result an emit must return (type and rows), `None` for an
    /// acknowledgement. A worker that faults is discarded (its accumulators with it).
    pub(crate) fn aggregate(
        self: &Arc<Self>,
        to: Option<u64>,
        op: &super::protocol::AggregateOp,
        expect: Option<(&DataType, usize)>,
    ) -> Result<(u64, Reply), Fault> {
        let mut worker = match to {
            Some(id) => self.checkout_worker(id)?,
            None => self.checkout(None)?,
        };
        let id = worker.id;
        match worker.request(&self.spec, op, expect) {
            Ok(reply) => {
                self.checkin(worker);
                Ok((id, reply))
            }
            Err(Fault::Plugin(message)) => {
                self.checkin(worker);
                Err(Fault::Plugin(message))
            }
            Err(fault) => {
                self.discard(worker);
                self.warm();
                Err(fault)
            }
        }
    }

    /// Worker `id` once it is idle, or an error when it is gone.
    fn checkout_worker(&self, id: u64) -> Result<Worker, Fault> {
        let gone = || {
            Fault::Plugin(
                "the worker process holding this aggregate's state is gone (it faulted in an \
                 earlier request)"
                    .to_string(),
            )
        };
        let mut state = self.lock();
        loop {
            if let Some(i) = state.idle.iter().position(|w| w.id == id) {
                let mut worker = state.idle.swap_remove(i);
                if worker.is_alive() {
                    worker.crowded = state.crowded(self.cpus);
                    return Ok(worker);
                }
                state.live -= 1;
                state.started.remove(&id);
                drop(state);
                drop(worker);
                self.available.notify_one();
                return Err(gone());
            }
            if !state.started.contains(&id) {
                return Err(gone());
            }
            state = super::blocking(|| {
                self.available
                    .wait_timeout(state, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            });
        }
    }

    /// Starts the pool's first worker and waits until it is ready: a pool is created when a
    /// function is registered, which then fails at once if the worker cannot run (no program,
    /// a library the worker refuses), and the first query finds a worker waiting.
    pub(crate) fn start_first(&self) -> Result<(), Fault> {
        self.lock().live += 1;
        match Worker::start(&self.spec) {
            Ok(worker) => {
                self.checkin(worker);
                Ok(())
            }
            Err(fault) => {
                self.release_slot();
                Err(fault)
            }
        }
    }

    /// Starts a worker in the background when the pool has no idle one and room for one: after
    /// a fault replaced one, so that the next query does not wait for a worker to start.
    pub(crate) fn warm(self: &Arc<Self>) {
        {
            let mut state = self.lock();
            if !state.idle.is_empty() || state.live >= self.spec.size {
                return;
            }
            state.live += 1;
        }
        let pool = Arc::downgrade(self);
        let spec = self.spec.clone();
        let started = std::thread::Builder::new()
            .name("udfsql-worker-warm".into())
            .spawn(move || {
                let worker = Worker::start(&spec);
                // A pool dropped meanwhile: the worker is dropped (killed and reaped) here.
                let Some(pool) = pool.upgrade() else { return };
                match worker {
                    Ok(worker) => pool.checkin(worker),
                    Err(fault) => {
                        tracing::warn!(library = %spec.library.display(), ?fault, "cannot start a worker");
                        pool.release_slot();
                    }
                }
            });
        if started.is_err() {
            self.release_slot();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle live worker, a new one if the pool is not full, or the next one returned.
    fn checkout(&self, cancel: Option<&CallCancel>) -> Result<Worker, Fault> {
        let mut dead = Vec::new();
        let mut state = self.lock();
        loop {
            if cancel.is_some_and(CallCancel::is_cancelled) {
                return Err(Fault::Cancelled);
            }
            while let Some(mut worker) = state.idle.pop() {
                if worker.is_alive() {
                    worker.crowded = state.crowded(self.cpus);
                    drop(state);
                    drop(dead);
                    return Ok(worker);
                }
                // It died between calls (killed from outside, or a thread the plugin left
                // behind crashed it): replace it.
                state.live -= 1;
                state.started.remove(&worker.id);
                dead.push(worker);
            }
            if state.live < self.spec.size {
                state.live += 1;
                let crowded = state.crowded(self.cpus);
                drop(state);
                drop(dead);
                return super::blocking(|| Worker::start(&self.spec))
                    .map(|mut worker| {
                        worker.crowded = crowded;
                        worker
                    })
                    .inspect_err(|_| self.release_slot());
            }
            // Every worker is busy: wait for one, looking at the cancellation now and then.
            state = super::blocking(|| {
                self.available
                    .wait_timeout(state, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            });
        }
    }

    fn checkin(&self, worker: Worker) {
        let mut state = self.lock();
        state.started.insert(worker.id);
        state.idle.push(worker);
        drop(state);
        // Every waiter: one may wait for this very worker (an aggregate's).
        self.available.notify_all();
    }

    fn discard(&self, worker: Worker) {
        self.lock().started.remove(&worker.id);
        drop(worker);
        self.release_slot();
    }

    /// A worker that was counted as live is gone (or never started): make room, wake a waiter.
    fn release_slot(&self) {
        self.lock().live -= 1;
        self.available.notify_one();
    }
}

impl PoolState {
    /// Whether the workers checked out or starting make the pool [`crowded`] on `cpus` (those
    /// the pool starts in the background after a fault count too, though no call waits for them
    /// yet: for a moment the pool may count as crowded early).
    fn crowded(&self, cpus: usize) -> bool {
        crowded(self.live.saturating_sub(self.idle.len()), cpus)
    }
}

/// Whether `busy` calls of a pool keep more threads running than the process may use `cpus`:
/// each call has two sides, its host thread and its worker. Then a host waits for its reply
/// asleep, at once: spinning, even yielding, takes a CPU from a worker that has work (its own or
/// another call's). Measured (`isobench --only partitions`, BENCHMARKS.md): with two partitions
/// on two CPUs the isolated query took 22.8–27.2 ms with crowded hosts asleep, 24.2–31.6 ms
/// spinning. A worker keeps spinning for its next request in either case (measured slower
/// without). Calls of other pools, or other work of the process, are not counted. `cpus` is
/// what the thread that made the pool could use (its affinity and the process's CPU quota):
/// pools are shared, so the first registration decides for later sessions too. A crowded host's
/// waits include its wake-up, and count in its spin's mean as any wait does: once the pool has
/// room again, the first calls may nap rather than spin, until quick replies bring it down.
fn crowded(busy: usize, cpus: usize) -> bool {
    busy.saturating_mul(2) > cpus
}

/// The pids of the worker processes alive in this process (all pools).
pub fn live_worker_pids() -> Vec<u32> {
    live()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect()
}

fn live() -> &'static Mutex<BTreeSet<u32>> {
    static LIVE: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// One worker process and its channel.
#[derive(Debug)]
struct Worker {
    child: Child,
    pid: Pid,
    /// Non-blocking; every wait is a `poll` with the call's deadline. After the ready message
    /// it carries only doorbell bytes.
    channel: UnixStream,
    /// The shared regions calls and replies cross in.
    regions: HostRegions,
    /// How long a call spins for the reply before it sleeps: as long as this worker's replies
    /// took lately.
    spin: AdaptiveSpin,
    pidfd: OwnedFd,
    /// The read end of the worker's stderr (non-blocking), drained while calls wait.
    stderr: Option<OwnedFd>,
    /// The last [`STDERR_TAIL`] bytes read from it.
    stderr_tail: Vec<u8>,
    /// Set once the process has been reaped.
    status: Option<ExitStatus>,
    /// This worker's number in the process (see [`NEXT_WORKER`]).
    id: u64,
    /// Whether its pool was [`crowded`] when the current call took it: the call's host then waits
    /// asleep, without spinning or napping.
    crowded: bool,
}

/// Why waiting on a worker stopped.
enum Stop {
    Fault(Fault),
    /// The channel reached its end (or broke): the worker is gone or going.
    Closed,
}

impl From<Fault> for Stop {
    fn from(f: Fault) -> Stop {
        Stop::Fault(f)
    }
}

impl Worker {
    /// Starts a worker and waits until it has loaded the library.
    fn start(spec: &WorkerSpec) -> Result<Worker, Fault> {
        let (host, child_end) = UnixStream::pair()
            .map_err(|e| Fault::Start(format!("cannot create a socket pair: {e}")))?;
        let regions = HostRegions::create()
            .map_err(|e| Fault::Start(format!("cannot create the shared regions: {e}")))?;
        regions
            .send(&host)
            .map_err(|e| Fault::Start(format!("cannot send the shared regions: {e}")))?;
        let mut command = Command::new(&spec.program);
        command
            .env_clear()
            .arg("--parent")
            .arg(std::process::id().to_string());
        if let Some(mib) = spec.memory_mib {
            command.arg("--memory-mib").arg(mib.to_string());
        }
        command
            .arg(&spec.library)
            .arg(spec.sha256.to_string())
            .stdin(Stdio::from(OwnedFd::from(child_end)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C at the terminal does not reach it, and a fault kills
            // what it forked along with it.
            .process_group(0);
        let child =
            spawn(command).map_err(|e| Fault::Start(format!("{}: {e}", spec.program.display())))?;
        let mut child = child;
        let stderr = child.stderr.take().map(OwnedFd::from);
        let pid = Pid::from_child(&child);
        live()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(child.id());
        // From here on, dropping `worker` kills and reaps the process.
        let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = kill_process_group(pid, Signal::KILL);
                let _ = child.wait();
                live()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&child.id());
                return Err(Fault::Start(format!("pidfd_open: {e}")));
            }
        };
        let mut worker = Worker {
            child,
            pid,
            channel: host,
            regions,
            spin: AdaptiveSpin::new(HOST_SPIN),
            pidfd,
            stderr,
            stderr_tail: Vec::new(),
            status: None,
            id: NEXT_WORKER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            crowded: false,
        };
        worker
            .channel
            .set_nonblocking(true)
            .map_err(|e| Fault::Start(format!("cannot set up the channel: {e}")))?;
        if let Some(fd) = &worker.stderr {
            rustix::io::ioctl_fionbio(fd, true)
                .map_err(|e| Fault::Start(format!("cannot set up the worker's stderr: {e}")))?;
        }
        let ready_within = spec.call_timeout.max(Duration::from_secs(10));
        let deadline = Instant::now() + ready_within;
        match worker.read_reply(None, deadline, None, spec) {
            Ok(Reply::Ready(n)) if n == spec.functions => Ok(worker),
            Ok(Reply::Ready(n)) => Err(Fault::Load(format!(
                "the worker sees {n} functions where the host sees {}",
                spec.functions
            ))),
            Ok(Reply::Error(message)) => Err(Fault::Load(message)),
            Ok(Reply::Result(_) | Reply::Ack(_)) => {
                Err(Fault::Malformed("a result before any call".into()))
            }
            Err(Fault::Exited(code, stderr)) => Err(Fault::Start(format!(
                "the worker exited with status {code} before it was ready{}",
                said(&stderr)
            ))),
            Err(Fault::TimedOut(_)) => Err(Fault::Start(format!(
                "the worker was not ready within {} (loading the library took too long); it was killed",
                seconds(ready_within)
            ))),
            Err(fault) => Err(fault),
        }
    }

    fn is_alive(&mut self) -> bool {
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec::default())), Ok(0))
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        spec: &WorkerSpec,
        function: &PluginFunction,
        path: CallPath,
        asynchronous: Option<&AsyncLimits>,
        args: &[(ArrayRef, bool)],
        rows: usize,
        returns: &DataType,
        cancel: Option<&CallCancel>,
    ) -> Result<ArrayRef, Fault> {
        let deadline = Instant::now() + spec.call_timeout;
        self.regions
            .write_call(function.index(), path, asynchronous, args, rows)
            .map_err(|e| Fault::Plugin(format!("cannot send the arguments to the worker: {e}")))?;
        match self.exchange(spec, deadline, cancel, Some((returns, rows)))? {
            Reply::Result(array) => {
                // The rules run on the host too: the worker runs them before it answers, but a
                // plugin can write its own answer into the output region.
                let checked = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    function
                        .signature()
                        .check_received_result(&array, args, rows)
                }));
                match checked {
                    Ok(Ok(())) => Ok(array),
                    Ok(Err(e)) => {
                        Err(self.malformed(format!("a result the in-process path refuses: {e}")))
                    }
                    Err(_) => Err(self.malformed("checking its result panicked".to_string())),
                }
            }
            Reply::Error(message) => Err(Fault::Plugin(message)),
            Reply::Ready(_) => Err(self.malformed("a ready message in reply to a call".into())),
            Reply::Ack(_) => Err(self.malformed("an acknowledgement in reply to a call".into())),
        }
    }

    /// Sends an aggregate request and reads its reply: a result of `expect`'s type and rows, an
    /// acknowledgement (`expect` `None`), or the plugin's error.
    fn request(
        &mut self,
        spec: &WorkerSpec,
        op: &super::protocol::AggregateOp,
        expect: Option<(&DataType, usize)>,
    ) -> Result<Reply, Fault> {
        let deadline = Instant::now() + spec.call_timeout;
        self.regions
            .write_aggregate(op)
            .map_err(|e| Fault::Plugin(format!("cannot send the request to the worker: {e}")))?;
        let reply = self.exchange(spec, deadline, None, expect);
        match reply? {
            Reply::Error(message) => Err(Fault::Plugin(message)),
            Reply::Ready(_) => Err(self.malformed("a ready message in reply to a request".into())),
            Reply::Ack(_) if expect.is_some() => {
                Err(self.malformed("an acknowledgement where a result was asked for".into()))
            }
            reply => Ok(reply),
        }
    }

    /// Publishes the request written into the input region and reads the reply: a result of
    /// `expect`'s type and rows, or (`expect` `None`) an acknowledgement or error; whatever else
    /// kills the worker as a forger.
    fn exchange(
        &mut self,
        spec: &WorkerSpec,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        expect: Option<(&DataType, usize)>,
    ) -> Result<Reply, Fault> {
        let published = Instant::now();
        let seq = match self.regions.publish(&self.channel) {
            Ok(seq) => seq,
            Err(_) => return Err(self.gone(deadline, spec)),
        };
        match self
            .await_reply(seq, deadline, cancel, spec)
            .and_then(|()| self.drain_doorbell())
        {
            Ok(()) => {
                self.spin.record(published.elapsed());
                // Awake again: where, for the worker's spin for the next request (a host that
                // slept last said it was asleep).
                self.regions.whereabouts().awake();
            }
            Err(Stop::Fault(f)) => return Err(f),
            Err(Stop::Closed) => return Err(self.gone(deadline, spec)),
        }
        let reply = match self.regions.take_reply(expect) {
            Ok(body) => protocol::decode_reply(&body, expect),
            Err(e) => Err(e),
        };
        reply.map_err(|e| self.malformed(e))
    }

    /// Waits until the worker publishes the reply to request `seq`: spinning first (unless the
    /// pool is [`crowded`]), then asleep in `poll` (woken by the worker's doorbell) where tokio
    /// allows a thread to block.
    fn await_reply(
        &mut self,
        seq: u64,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<(), Stop> {
        let regions = &self.regions;
        let stop = || regions.replied(seq) || cancel.is_some_and(CallCancel::is_cancelled);
        let whereabouts = regions.whereabouts();
        let crowded = self.crowded;
        if !crowded
            && spin_until(self.spin.next(), || whereabouts.beside(), stop)
            && self.regions.replied(seq)
        {
            return Ok(());
        }
        whereabouts.asleep();
        super::blocking(|| {
            // A call too long to spin through: asleep until a little before it usually ends
            // (rung awake if it ends sooner), then spinning for the rest.
            if let Some(nap) = self.spin.nap().filter(|_| !crowded) {
                // A doorbell rung for an earlier call after its last drain would end the nap at
                // once: drained first, before the flag that lets the worker ring for this one.
                self.drain_doorbell()?;
                self.regions.set_sleeping(true);
                let woken = if self.regions.replied(seq) {
                    Ok(())
                } else {
                    let wake_at = (Instant::now() + nap).min(deadline);
                    // Awake on time, not up to the timer slack later (BENCHMARKS.md).
                    let _precise = PreciseTimers::new();
                    self.wait_until(PollFlags::IN, wake_at, deadline, cancel, spec)
                };
                self.regions.set_sleeping(false);
                woken?;
                self.drain_doorbell()?;
                let regions = &self.regions;
                let stop = || regions.replied(seq) || cancel.is_some_and(CallCancel::is_cancelled);
                let here = regions.whereabouts();
                if spin_until(self.spin.after_nap(), || here.beside(), stop) && regions.replied(seq)
                {
                    return Ok(());
                }
                here.asleep();
            }
            loop {
                self.regions.set_sleeping(true);
                if self.regions.replied(seq) {
                    self.regions.set_sleeping(false);
                    return Ok(());
                }
                let woken = self.wait(PollFlags::IN, deadline, cancel, spec);
                self.regions.set_sleeping(false);
                woken?;
                self.drain_doorbell()?;
                if self.regions.replied(seq) {
                    return Ok(());
                }
            }
        })
    }

    /// Reads the bytes waiting on the channel (one non-blocking read): doorbells, or garbage a
    /// plugin wrote there (then the worker is killed as a forger). Also run after every reply, so
    /// that a write to the channel fails the call it was made in. An honest worker rings at most
    /// once per reply, so a full buffer of doorbells is a flood, refused the same way: the host
    /// never loops on what a worker keeps writing.
    fn drain_doorbell(&mut self) -> Result<(), Stop> {
        let mut bells = [0u8; 256];
        let n = loop {
            match (&self.channel).read(&mut bells) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Stop::Closed),
            }
        };
        if n == 0 {
            return Err(Stop::Closed);
        }
        let fault = if let Some(&garbage) = bells[..n].iter().find(|&&b| b != BELL) {
            format!("a byte 0x{garbage:02x} on the channel, which carries only doorbells")
        } else if n == bells.len() {
            format!("{n} or more doorbells on the channel, where one per reply is rung")
        } else {
            return Ok(());
        };
        Err(Stop::Fault(self.malformed(fault)))
    }

    fn read_reply(
        &mut self,
        expect: Option<(&DataType, usize)>,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<Reply, Fault> {
        let mut header = [0u8; HEADER];
        let body = match self.read_exact(&mut header, deadline, cancel, spec) {
            Ok(()) => match protocol::body_len(&header) {
                Ok(len) if len > protocol::max_reply_len(expect) => {
                    return Err(self.malformed(match expect {
                        Some((t, rows)) => format!(
                            "a message of {len} bytes, more than a result of {rows} rows of {t} \
                             takes (at most {} bytes)",
                            protocol::max_reply_len(expect)
                        ),
                        None => format!(
                            "a message of {len} bytes before any call (at most {} bytes)",
                            protocol::MAX_ERROR_BODY
                        ),
                    }));
                }
                Ok(len) => self.read_body(len, deadline, cancel, spec),
                Err(e) => return Err(self.malformed(e)),
            },
            Err(stop) => Err(stop),
        };
        let body = match body {
            Ok(body) => body,
            Err(Stop::Fault(f)) => return Err(f),
            Err(Stop::Closed) => return Err(self.gone(deadline, spec)),
        };
        protocol::decode_reply(&body, expect).map_err(|e| self.malformed(e))
    }

    fn malformed(&mut self, detail: String) -> Fault {
        self.kill();
        Fault::Malformed(detail)
    }

    fn read_body(
        &mut self,
        len: usize,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<Buffer, Stop> {
        // Read straight into the spare capacity (no zeroing), grown with what arrives so that a
        // bogus length costs nothing until bytes back it.
        let mut body: Vec<u8> = Vec::new();
        self.drive(PollFlags::IN, deadline, cancel, spec, |channel| {
            if body.len() == body.capacity() {
                body.reserve_exact((len - body.len()).min(body.len().max(1 << 20)));
            }
            let n = rustix::io::read(channel, rustix::buffer::spare_capacity(&mut body))?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(body.len() >= len)
        })?;
        if body.len() > len {
            self.kill();
            return Err(Stop::Fault(Fault::Malformed(format!(
                "{} bytes past the end of a {len}-byte message",
                body.len() - len
            ))));
        }
        Ok(Buffer::from(body))
    }

    fn read_exact(
        &mut self,
        mut buf: &mut [u8],
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<(), Stop> {
        self.drive(PollFlags::IN, deadline, cancel, spec, |mut channel| {
            let n = channel.read(buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut std::mem::take(&mut buf)[n..];
            Ok(buf.is_empty())
        })
    }

    /// Runs `step` (one non-blocking read or write on the channel, `Ok(true)` when the transfer
    /// is complete) until it completes, waiting for `interest` whenever the channel would block.
    /// Any other error (the end of the channel, a reset) means the worker is gone.
    fn drive(
        &mut self,
        interest: PollFlags,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
        mut step: impl FnMut(&UnixStream) -> std::io::Result<bool>,
    ) -> Result<(), Stop> {
        loop {
            match step(&self.channel) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(interest, deadline, cancel, spec)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Stop::Closed),
            }
        }
    }

    /// Reads what the worker has written to stderr so far, keeping the end of it (so that a
    /// worker that writes a lot never blocks on a full pipe while a call waits).
    fn drain_stderr(&mut self) {
        let mut chunk = [0u8; 4096];
        while let Some(fd) = &self.stderr {
            match rustix::io::read(fd, &mut chunk) {
                Ok(0) => {
                    // Closed by the worker (and all it forked): stop polling it, or every poll
                    // would return at once with POLLHUP.
                    self.stderr = None;
                }
                Ok(n) => {
                    self.stderr_tail.extend_from_slice(&chunk[..n]);
                    let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                    self.stderr_tail.drain(..excess);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return,
            }
        }
    }

    /// Waits until the channel is ready for `interest`, or the worker ends, the deadline
    /// passes, or the query is cancelled.
    fn wait(
        &mut self,
        interest: PollFlags,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<(), Stop> {
        self.wait_until(interest, deadline, deadline, cancel, spec)
    }

    /// [`Worker::wait`], returning `Ok` also at `wake_at` (at or before the deadline).
    fn wait_until(
        &mut self,
        interest: PollFlags,
        wake_at: Instant,
        deadline: Instant,
        cancel: Option<&CallCancel>,
        spec: &WorkerSpec,
    ) -> Result<(), Stop> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.kill();
                return Err(Fault::TimedOut(spec.call_timeout).into());
            }
            if now >= wake_at {
                return Ok(());
            }
            let timeout = Timespec::try_from(wake_at - now).unwrap_or_default();
            let cancel_fd = cancel.and_then(CallCancel::event);
            let (ready_channel, ready_exit, ready_cancel, ready_stderr) = {
                let pidfd = self.pidfd.as_fd();
                let mut fds = [
                    PollFd::new(&self.channel, interest),
                    PollFd::from_borrowed_fd(pidfd, PollFlags::IN),
                    PollFd::from_borrowed_fd(
                        self.stderr.as_ref().map_or(pidfd, |fd| fd.as_fd()),
                        PollFlags::IN,
                    ),
                    PollFd::from_borrowed_fd(cancel_fd.unwrap_or(pidfd), PollFlags::IN),
                ];
                let n = if cancel_fd.is_some() { 4 } else { 3 };
                match poll(&mut fds[..n], Some(&timeout)) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => {
                        self.kill();
                        return Err(Fault::Malformed(format!("poll: {e}")).into());
                    }
                }
                (
                    !fds[0].revents().is_empty(),
                    !fds[1].revents().is_empty(),
                    n == 4 && !fds[3].revents().is_empty(),
                    self.stderr.is_some() && !fds[2].revents().is_empty(),
                )
            };
            if ready_stderr {
                self.drain_stderr();
            }
            if ready_cancel || cancel.is_some_and(CallCancel::is_cancelled) {
                self.kill();
                return Err(Fault::Cancelled.into());
            }
            if ready_exit {
                return Err(Stop::Closed);
            }
            if ready_channel {
                return Ok(());
            }
        }
    }

    /// The fault for a worker whose channel closed or whose process ended: its exit status,
    /// once it has exited (killed after a grace period if it keeps running without a channel).
    fn gone(&mut self, deadline: Instant, spec: &WorkerSpec) -> Fault {
        let grace = (Instant::now() + EXIT_GRACE).min(deadline);
        let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
        let remaining = grace.saturating_duration_since(Instant::now());
        let exited = matches!(
            poll(
                &mut fds,
                Some(&Timespec::try_from(remaining).unwrap_or_default())
            ),
            Ok(1)
        );
        if !exited {
            self.kill();
            return Fault::Malformed("it closed its channel and kept running".to_string());
        }
        let status = self.reap();
        self.drain_stderr();
        let stderr = last_line(&self.stderr_tail);
        match status {
            Some(status) => match (status.signal(), status.code()) {
                (Some(signal), _) => Fault::Crashed {
                    signal,
                    memory_mib: spec.memory_mib,
                    stderr,
                },
                (None, Some(code)) => Fault::Exited(code, stderr),
                _ => Fault::Exited(-1, stderr),
            },
            None => Fault::Malformed("its process cannot be waited for".to_string()),
        }
    }

    /// Kills the worker's process group (the worker and what it forked) and reaps the worker.
    fn kill(&mut self) {
        self.reap();
    }

    /// Kills the worker's process group and reaps the worker: its status is its own if it had
    /// exited already. (Until it is reaped its pid, the group's id, cannot be reused, so the kill
    /// reaches only the worker and what it forked.)
    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // The group may be gone already (ESRCH); nothing else can fail here.
            let _ = kill_process_group(self.pid, Signal::KILL);
            self.status = self.child.wait().ok();
            live()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.child.id());
        }
        self.status
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.channel.shutdown(std::net::Shutdown::Both);
        self.kill();
    }
}

/// Starts `command` from one long-lived thread. `PR_SET_PDEATHSIG` fires when the *thread* that
/// started the worker ends, not the process; tokio's blocking threads come and go, so workers are
/// always started from this thread, which lives as long as the process.
fn spawn(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("udfsql-worker-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the worker spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((command, tx))
        .map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the worker spawner thread is gone"))?
}

/// The `udfsql-worker` program: `configured`, else `$UDFSQL_WORKER`, else next to the running
/// program (or one directory up, for test binaries in `target/<profile>/deps`).
pub(crate) fn find_worker_program(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(program) = configured {
        return program
            .canonicalize()
            .map_err(|e| format!("worker program {}: {e}", program.display()));
    }
    if let Some(program) = std::env::var_os("UDFSQL_WORKER") {
        let program = PathBuf::from(program);
        return program
            .canonicalize()
            .map_err(|e| format!("worker program {} ($UDFSQL_WORKER): {e}", program.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let name = format!("udfsql-worker{}", std::env::consts::EXE_SUFFIX);
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(format!(
        "cannot find the {name} program next to {} (build it with `cargo build --bin udfsql-worker`, \
         or set $UDFSQL_WORKER)",
        exe.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::crowded;

    #[test]
    fn a_pool_is_crowded_when_its_calls_need_more_threads_than_there_are_cpus() {
        // (busy calls, CPUs, crowded): each call runs a host thread and a worker.
        for (busy, cpus, expected) in [
            (0, 1, false),
            (1, 1, true),
            (1, 2, false),
            (2, 2, true),
            (2, 4, false),
            (3, 4, true),
            (usize::MAX, 64, true),
        ] {
            assert_eq!(crowded(busy, cpus), expected, "{busy} busy on {cpus} CPUs");
        }
    }
}
