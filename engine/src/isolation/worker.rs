//! The worker process: loads one library, pinned by the digest its host computed, and answers
//! call requests with the same [`PluginFunction::call_batch`] / [`call_rows`] code the host uses
//! in-process, so results and errors are the same in both modes. Requests and replies cross in
//! the two shared regions the host sends after the ready message (see `shared`); the channel is
//! then only a doorbell.
//!
//! Started by the host as `udfsql-worker --parent PID [--memory-mib N] LIBRARY SHA256` with the
//! channel on standard input, an empty environment and its own process group. Before it loads the
//! library it: moves the channel to descriptor 3 and closes every other inherited descriptor;
//! asks the kernel to kill it when its parent dies (`PR_SET_PDEATHSIG`) and checks the parent is
//! still the one that started it; sets `PR_SET_NO_NEW_PRIVS`; limits its address space
//! (`RLIMIT_AS`) and disables core dumps.
//!
//! [`call_rows`]: PluginFunction::call_rows

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use rustix::process::{Resource, Rlimit, Signal};

use super::protocol::{self, AGGREGATE, CALL};
use super::shared::WorkerRegions;
use crate::call_path::CallPath;
use crate::ffi::PluginLibrary;
use crate::ffi::descriptors::identity;
use crate::trust::Sha256Digest;

/// Exit status: the command line is wrong.
const EXIT_USAGE: u8 = 64;
/// Exit status: the host is gone or the set-up failed.
const EXIT_SETUP: u8 = 70;
/// Exit status: the channel failed (closed or broken by the plugin).
pub(crate) const EXIT_CHANNEL: u8 = 74;

/// Ends the worker after its channel failed. Exits at once: the plugin may have closed the
/// channel's descriptor, and dropping the stream would then close a descriptor it no longer owns
/// (which Rust's I/O safety checks turn into an abort).
fn channel_lost() -> ! {
    std::process::exit(EXIT_CHANNEL.into())
}

struct Options {
    parent: i32,
    memory_mib: Option<u64>,
    library: PathBuf,
    sha256: Sha256Digest,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut parent = None;
    let mut memory_mib = None;
    let mut positional = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--parent" => {
                let v = args.next().ok_or("--parent needs a PID")?;
                parent = Some(v.parse().map_err(|e| format!("--parent {v}: {e}"))?);
            }
            "--memory-mib" => {
                let v = args.next().ok_or("--memory-mib needs a number")?;
                memory_mib = Some(v.parse().map_err(|e| format!("--memory-mib {v}: {e}"))?);
            }
            other => positional.push(other.to_string()),
        }
    }
    let [library, sha256] = <[String; 2]>::try_from(positional)
        .map_err(|_| "expected LIBRARY and SHA256 after the options".to_string())?;
    Ok(Options {
        parent: parent.ok_or("--parent is required")?,
        memory_mib,
        library: PathBuf::from(library),
        sha256: sha256.parse().map_err(|e| format!("SHA256: {e}"))?,
    })
}

/// The worker's `main`. Not meant to be run by hand: it talks to its host on standard input.
pub fn worker_main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("udfsql-worker: {e}");
            eprintln!("usage: udfsql-worker --parent PID [--memory-mib N] LIBRARY SHA256");
            eprintln!("(started by udfsql for isolated plugin libraries; the channel is stdin)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut channel = match crate::ffi::descriptors::take_channel_from_stdin() {
        Ok(c) => c,
        Err(_) => return ExitCode::from(EXIT_SETUP),
    };
    let mut out = Vec::new();
    if let Err(e) = contain(&options) {
        // The host learns of the failure from the exit status if the message cannot be sent.
        if protocol::encode_error(&mut out, &format!("cannot set up the worker process: {e}"))
            .is_ok()
        {
            let _ = channel.write_all(&out);
        }
        return ExitCode::from(EXIT_SETUP);
    }
    let library = match PluginLibrary::load_pinned(&options.library, Some(&options.sha256)) {
        Ok(library) => library,
        Err(e) => {
            if protocol::encode_error(&mut out, &e.to_string()).is_ok() {
                let _ = channel.write_all(&out);
            }
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if protocol::encode_ready(&mut out, library.functions().len()).is_err()
        || channel.write_all(&out).is_err()
    {
        channel_lost();
    }
    serve(&library, &mut channel)
}

/// The containment the worker applies to itself before loading any plugin code.
fn contain(options: &Options) -> std::io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    // The parent may have died before the line above: then we were re-parented already.
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    if parent != options.parent {
        return Err(std::io::Error::other(format!(
            "the host (pid {}) is gone",
            options.parent
        )));
    }
    rustix::thread::set_no_new_privs(true)?;
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    if let Some(mib) = options.memory_mib {
        let bytes = mib.saturating_mul(1024 * 1024);
        rustix::process::setrlimit(
            Resource::As,
            Rlimit {
                current: Some(bytes),
                maximum: Some(bytes),
            },
        )?;
    }
    Ok(())
}

/// The calls of an asynchronous function over a batch, made here as the host would make them
/// in-process (`async_udf::call_in_chunks`: chunks, calls in flight, each call's time limit), on
/// a current-thread Tokio runtime of the worker's own (the plugin completes its calls from its
/// threads; the runtime only waits).
fn call_async(
    function: &crate::ffi::PluginFunction,
    args: &[(datafusion::arrow::array::ArrayRef, bool)],
    rows: usize,
    limits: &crate::async_udf::AsyncLimits,
) -> Result<datafusion::arrow::array::ArrayRef, String> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| format!("cannot start the worker's runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)?;
    let returns = function.signature().return_type.arrow_type();
    runtime
        .block_on(crate::async_udf::call_in_chunks(
            function, args, rows, &returns, limits,
        ))
        .map_err(|failure| failure.to_string())
}

/// Answers requests until the host closes the channel: each request is read from the input
/// region the host sent, and its reply written into the output region (see `shared`).
fn serve(library: &std::sync::Arc<PluginLibrary>, channel: &mut UnixStream) -> ExitCode {
    let functions: Vec<_> = (0..library.functions().len())
        .map(|i| library.function(i).expect("index within the library"))
        .collect();
    let mut aggregates = super::aggregate::WorkerAccumulators::new(library);
    let mut regions = match WorkerRegions::receive(channel) {
        Ok(regions) => regions,
        Err(_) => channel_lost(),
    };
    let channel_identity = identity(channel.as_fd());
    loop {
        let body = match regions.next_call(channel) {
            Ok(Some(body)) => body,
            Ok(None) => return ExitCode::SUCCESS,
            Err(_) => channel_lost(),
        };
        let mut out = regions.reply();
        let answered = match body.as_slice().first() {
            Some(&CALL) => protocol::decode_call(&body).and_then(|call| {
                let function = functions
                    .get(call.function)
                    .ok_or_else(|| format!("no function #{} in the library", call.function))?;
                let result = match (&call.asynchronous, call.path) {
                    (Some(limits), _) => call_async(function, &call.args, call.rows, limits),
                    (None, CallPath::Batch) => function
                        .call_batch(&call.args, call.rows)
                        .map_err(|e| e.to_string()),
                    (None, CallPath::Row) => function
                        .call_rows(&call.args, call.rows)
                        .map_err(|e| e.to_string()),
                };
                drop(call);
                match result {
                    Ok(array) => protocol::encode_result(&mut out, &array),
                    Err(e) => protocol::encode_error(&mut out, &e),
                }
            }),
            Some(&AGGREGATE) => {
                protocol::decode_aggregate(&body).and_then(|op| aggregates.answer(op, &mut out))
            }
            _ => Err("not a call request".to_string()),
        };
        drop(body);
        // The plugin may have closed (or replaced) the channel during the call: the worker
        // cannot be woken any more, so it ends now and the host reports its exit status.
        if identity(channel.as_fd()) != channel_identity {
            channel_lost();
        }
        if let Err(e) = answered {
            let refused =
                protocol::encode_error(&mut out, &format!("the worker refused the request: {e}"));
            if refused.is_err() {
                channel_lost();
            }
        }
        if regions.publish(channel).is_err() {
            channel_lost();
        }
    }
}
