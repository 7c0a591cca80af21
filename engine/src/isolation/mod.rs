//! Process isolation: a library's functions evaluated by a pool of worker processes, so that a
//! plugin that crashes, exits, hangs or eats memory fails its call, not the host.
//!
//! * [`Isolation`] says how a library runs: in the host ([`Isolation::InProcess`]) or in
//!   workers ([`Isolation::Process`]) with [`WorkerLimits`].
//! * Workers are the `udfsql-worker` program (found next to the running program, or configured)
//!   that maps the same file, pinned by the digest the host computed, and answers one request
//!   per batch with the host's own call code (see `worker`); requests and replies cross in
//!   shared memory, with the channel as a doorbell (see `shared`).
//! * [`WorkerPool`]s are shared by every isolated function of a library with the same limits;
//!   the last function dropped kills and reaps its workers.
//! * [`CallCancel`] cancels the isolated calls of one query at once.
//!
//! What isolation does not cover: the library is also loaded by the host, which reads its
//! metadata (and runs its initialisers) to plan queries; only function calls run in workers.

pub(crate) mod aggregate;
mod cancel;
mod pool;
mod protocol;
mod raw;
mod shared;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

pub use cancel::CallCancel;
pub use pool::{Fault, WorkerPool, live_worker_pids};
#[doc(hidden)]
pub use protocol::{CodecCost, FuzzReport, column_codec_cost, fuzz_worker_replies};
pub use worker::worker_main;

use crate::ffi::PluginLibrary;
use pool::WorkerSpec;

/// How a library's functions are evaluated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// In the host process (fastest; a crash in the plugin is a crash of the host).
    #[default]
    InProcess,
    /// In worker processes with these limits.
    Process(WorkerLimits),
}

impl Isolation {
    /// Process isolation with the default limits.
    pub fn process() -> Isolation {
        Isolation::Process(WorkerLimits::default())
    }

    /// `process` or `none`, as `plugin_functions` shows it.
    pub fn mode_name(&self) -> &'static str {
        match self {
            Isolation::InProcess => "none",
            Isolation::Process(_) => "process",
        }
    }
}

/// The limits of isolated workers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerLimits {
    /// The longest one call (one batch) may run; past it the worker is killed and the call
    /// fails. Default 30 s.
    pub call_timeout: Duration,
    /// Each worker's address-space limit (`RLIMIT_AS`), in MiB; `None` for no limit. Default
    /// 1024 MiB.
    pub memory_mib: Option<u64>,
    /// The most workers per library; `None` for the session's `target_partitions`.
    pub workers: Option<usize>,
    /// The worker program; `None` to look for `udfsql-worker` next to the running program (or
    /// `$UDFSQL_WORKER`).
    pub worker_program: Option<PathBuf>,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        WorkerLimits {
            call_timeout: Duration::from_secs(30),
            memory_mib: Some(1024),
            workers: None,
            worker_program: None,
        }
    }
}

impl WorkerLimits {
    /// The limits from command-line values, as `udfsql` and `udfsql-server` take them:
    /// `--call-timeout SECS` (above 0), `--worker-memory MIB` (0 for no limit), `--workers N`
    /// (at least 1). The error names the flag.
    pub fn from_flags(
        call_timeout_secs: f64,
        worker_memory_mib: u64,
        workers: Option<usize>,
    ) -> Result<WorkerLimits, String> {
        let call_timeout = Duration::try_from_secs_f64(call_timeout_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                format!("--call-timeout {call_timeout_secs}: expected seconds above 0")
            })?;
        if workers == Some(0) {
            return Err("--workers 0: expected at least one worker".to_string());
        }
        Ok(WorkerLimits {
            call_timeout,
            memory_mib: (worker_memory_mib > 0).then_some(worker_memory_mib),
            workers,
            worker_program: None,
        })
    }
}

/// The pool for `library` under `limits`, shared with every other function of the library that
/// has the same limits; `target_partitions` sizes it when `limits.workers` is `None`. A new pool
/// starts its first worker and waits until it is ready (a few milliseconds: see BENCHMARKS.md).
/// Fails when the worker program cannot be found or the worker cannot load the library.
pub fn pool_for(
    library: &Arc<PluginLibrary>,
    limits: &WorkerLimits,
    target_partitions: usize,
) -> Result<Arc<WorkerPool>, String> {
    if limits.call_timeout.is_zero() {
        return Err("the call time limit must be above zero".to_string());
    }
    if limits.memory_mib == Some(0) || limits.workers == Some(0) {
        return Err("the worker memory limit and the number of workers must be above zero".into());
    }
    let spec = WorkerSpec {
        program: pool::find_worker_program(limits.worker_program.as_deref())?,
        library: library.path().to_path_buf(),
        sha256: *library.sha256(),
        functions: library.functions().len(),
        call_timeout: limits.call_timeout,
        memory_mib: limits.memory_mib,
        size: limits.workers.unwrap_or(target_partitions).max(1),
        configured_workers: limits.workers,
    };
    static POOLS: OnceLock<Mutex<HashMap<WorkerSpec, Weak<WorkerPool>>>> = OnceLock::new();
    let pool = {
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pools.retain(|_, pool| pool.strong_count() > 0);
        if let Some(pool) = pools.get(&spec).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let pool = Arc::new(WorkerPool::new(spec.clone()));
        pools.insert(spec, Arc::downgrade(&pool));
        pool
    };
    // Outside the registry's lock: a worker takes milliseconds to start. On failure the pool is
    // dropped (and its registry entry with it).
    pool.start_first().map_err(|fault| fault.reason())?;
    Ok(pool)
}

/// Runs `wait` (a wait on a worker process) where tokio allows it to block: on a multi-threaded
/// runtime the worker thread hands its other tasks to another thread meanwhile, so a long
/// isolated call does not starve timers, signals or other queries.
pub(crate) fn blocking<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}
