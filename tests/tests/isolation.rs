//! Process isolation (issue 14): plugin functions evaluated by `udfsql-worker` processes, so that
//! a plugin that segfaults, aborts, exits, hangs, eats memory or scribbles on its descriptors
//! becomes a query error naming the function and the library, and the host answers the next
//! query.
//!
//! The fixtures are `faulty.c` compiled once per misbehaviour ([`udf_tests::faulty`]): each
//! exports `fault(BIGINT)`, which misbehaves, and `ok(BIGINT)`, which returns x + 1. They are run
//!
//! * isolated through `udfsql --isolate` (one test per fixture), and *not* isolated in a child
//!   `udfsql` to show that they take the process down;
//! * isolated from SQL (`AS 'lib.so#isolation=process'`), from the API
//!   ([`udf_engine::register_plugin_with`]) and through the HTTP service, whose default is
//!   isolation;
//! * with containment checked in `/proc`: a worker has an empty environment, only its channel
//!   (fd 3), `/dev/null` as 0 and 1 and a pipe to the host as 2, its own process group, is
//!   reaped (no zombies), and dies with its host (`PR_SET_PDEATHSIG`);
//! * and the misbehaving-result corpus of `boundary.rs` gives the same answers and the same error
//!   texts isolated as in-process.
//!
//! Every `udfsql` child runs with core dumps off (`ulimit -c 0`, inherited by its workers), so
//! that the crashes these tests cause leave no core files behind. The tests that start workers
//! inside this test process take [`IN_PROCESS_WORKERS`] so that one test's `/proc` checks never
//! see another test's workers dying on purpose.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::SessionContext;
use serde_json::{Value, json};
use udf_engine::{CallPath, Isolation, PluginUdf, WorkerLimits};
use udf_service::Config;
use udf_tests::{
    TestServer, c_library, expect, faulty, fixture_dir, query, rows, set_mode, sha256sum, udfsql,
    udfsql_worker,
};

// Linux signal numbers (the same on every architecture udfsql builds for).
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;
const SIGSEGV: i32 = 11;

/// How long a bounded wait polls before the test fails: generous, for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// The command name (`/proc/PID/comm`) of a worker process.
const WORKER_COMM: &str = "udfsql-worker";

/// Held by every test that starts workers inside this test process.
static IN_PROCESS_WORKERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Helpers: the udfsql binary, /proc, bounded waits.
// ---------------------------------------------------------------------------------------------

/// `udfsql ARGS...` with core dumps off. `sh` execs udfsql, so the child's pid and exit status
/// are udfsql's own.
fn udfsql_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -c 0 && exec \"$0\" \"$@\"")
        .arg(udfsql())
        .args(args)
        .env_remove("UDFSQL_LOG");
    cmd
}

fn run(args: &[&str]) -> Output {
    udfsql_command(args)
        .stdin(Stdio::null())
        .output()
        .expect("run udfsql")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of udfsql's stderr that report a failed statement.
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The canonical path of a library, as error messages name it.
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", path.display()))
}

/// Polls `probe` every 20 ms until it returns `Ok`, for at most `limit`; then panics saying what
/// was awaited and what the last probe saw (its `Err`).
fn wait_for<T>(limit: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(found) => return found,
            Err(seen) => assert!(
                start.elapsed() < limit,
                "gave up after {limit:?} waiting for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_for`] for async tests: sleeps without blocking a runtime thread (the engine may need
/// it to reap its workers).
async fn wait_for_async<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(found) => return found,
            Err(seen) => assert!(
                start.elapsed() < limit,
                "gave up after {limit:?} waiting for {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Ok(())` if `items` is empty, else `Err` listing them.
fn none_of<T: std::fmt::Debug>(items: Vec<T>) -> Result<(), String> {
    if items.is_empty() {
        Ok(())
    } else {
        Err(format!("{items:?}"))
    }
}

/// The fields of `/proc/PID/stat` the tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    pgrp: u32,
}

/// `/proc/PID/stat`, or `None` when there is no such process.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let mut fields = text[close + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        ppid,
        pgrp,
    })
}

/// The children of process `parent` (all its threads'), from `/proc/PID/task/*/children`.
fn children_of(parent: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

/// The zombie worker processes whose parent is this test process.
fn zombie_workers() -> Vec<(u32, Stat)> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(s) = stat(pid)
            && s.ppid == me
            && s.state == 'Z'
            && s.comm == WORKER_COMM
        {
            zombies.push((pid, s));
        }
    }
    zombies
}

/// Whether `pid` is a worker of this process that still exists, alive or as a zombie (a pid
/// reused by an unrelated process does not count).
fn still_our_worker(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.ppid == std::process::id() && s.comm == WORKER_COMM)
}

/// Containment of one live worker of this test process, read from `/proc`.
fn assert_contained(pid: u32) {
    let s = stat(pid).unwrap_or_else(|| panic!("worker {pid} is listed but has no /proc entry"));
    assert_ne!(
        s.state, 'Z',
        "worker {pid} is listed as live but is a zombie"
    );
    assert_eq!(s.comm, WORKER_COMM, "worker {pid} runs the worker binary");
    assert_eq!(
        s.ppid,
        std::process::id(),
        "worker {pid} is a child of its host"
    );
    assert_eq!(s.pgrp, pid, "worker {pid} leads its own process group");

    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/environ: {e}"));
    assert!(
        environ.is_empty(),
        "worker {pid} has an environment: {:?}",
        String::from_utf8_lossy(&environ)
    );

    let fd_dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<u32> = std::fs::read_dir(&fd_dir)
        .unwrap_or_else(|e| panic!("read {fd_dir}: {e}"))
        .map(|e| {
            e.expect("fd entry")
                .file_name()
                .to_str()
                .and_then(|n| n.parse().ok())
                .expect("numeric fd")
        })
        .collect();
    fds.sort_unstable();
    let targets: Vec<String> = fds
        .iter()
        .map(|fd| {
            std::fs::read_link(format!("{fd_dir}/{fd}"))
                .map(|t| t.display().to_string())
                .unwrap_or_else(|e| format!("<{e}>"))
        })
        .collect();
    assert_eq!(
        fds,
        [0, 1, 2, 3, 4, 5],
        "worker {pid} holds exactly 0, 1, 2, its channel and its two shared regions: {targets:?}"
    );
    assert_eq!(
        targets[4..],
        ["/memfd:udfsql-in (deleted)", "/memfd:udfsql-out (deleted)"],
        "worker {pid}: fds 4 and 5 are the shared regions its host sent"
    );
    for (fd, target) in targets.iter().enumerate().take(2) {
        assert_eq!(target, "/dev/null", "worker {pid}: fd {fd} is /dev/null");
    }
    assert!(
        targets[2].starts_with("pipe:["),
        "worker {pid}: fd 2 is the pipe whose end the host keeps for errors, not {}",
        targets[2]
    );
    assert!(
        targets[3].starts_with("socket:["),
        "worker {pid}: fd 3 is its channel socket, not {}",
        targets[3]
    );
}

/// A fresh plugin directory under `target/udf-fixtures` (mode 0755) holding a copy of each
/// `(source, file name)`; removed when the handle is dropped.
fn plugin_dir_with(libraries: &[(&Path, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("isolation-")
        .tempdir_in(fixture_dir())
        .expect("create a plugin directory");
    set_mode(dir.path(), 0o755);
    for (src, name) in libraries {
        let dst = dir.path().join(name);
        std::fs::copy(src, &dst).expect("copy library");
        set_mode(&dst, 0o755);
    }
    dir
}

/// Isolation as the in-process tests use it: the given call time limit, the worker binary of
/// this build (the test binary lives in `target/<profile>/deps`, not next to it).
fn isolated(call_timeout: Duration) -> Isolation {
    Isolation::Process(WorkerLimits {
        call_timeout,
        worker_program: Some(udfsql_worker()),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Every fixture isolated through `udfsql --isolate`.
// ---------------------------------------------------------------------------------------------

/// `udfsql --isolate --call-timeout SECS EXTRA... --plugin <fixture> --format csv
/// -c "SELECT fault(1) AS x" -c "SELECT ok(41) AS y"`, with how long it took.
fn isolated_run(case: &str, call_timeout: u64, extra: &[&str]) -> (Output, PathBuf, Duration) {
    let library = faulty(case);
    let binary = udfsql(); // built before the clock starts
    assert!(binary.exists());
    let timeout = call_timeout.to_string();
    let mut args = vec!["--isolate", "--call-timeout", timeout.as_str()];
    args.extend_from_slice(extra);
    let lib = display(&library);
    args.extend_from_slice(&[
        "--plugin",
        &lib,
        "--format",
        "csv",
        "-c",
        "SELECT fault(1) AS x",
        "-c",
        "SELECT ok(41) AS y",
    ]);
    let start = Instant::now();
    let output = run(&args);
    (output, canonical(&library), start.elapsed())
}

/// The run of a fixture whose `fault(1)` fails: udfsql exits with status 1 on its own (not killed
/// by a signal), reports exactly one failed statement, naming the function and the library, and
/// the next statement answers. Returns udfsql's stderr (the error may span lines) and how long
/// the run took.
fn fault_is_an_error(case: &str, call_timeout: u64, extra: &[&str]) -> (String, Duration) {
    let (o, library, elapsed) = isolated_run(case, call_timeout, extra);
    assert_eq!(
        o.status.signal(),
        None,
        "{case}: udfsql itself was killed by a signal; stderr:\n{}",
        stderr(&o)
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{case}: a failed statement makes the exit status 1; stderr:\n{}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o),
        "y\n42\n",
        "{case}: the failed statement prints nothing and the next one answers; stderr:\n{}",
        stderr(&o)
    );
    let errors = error_lines(&o);
    assert_eq!(
        errors.len(),
        1,
        "{case}: exactly one statement fails: {}",
        stderr(&o)
    );
    let named = format!("plugin function fault ({})", display(&library));
    assert!(
        errors[0].contains(&named),
        "{case}: the error names the function and the library ({named}): {}",
        errors[0]
    );
    (stderr(&o), elapsed)
}

/// A fixture whose worker dies of `signal`: `... crashed: SIGxxx`, and a hint at the memory limit.
/// Returns the error line.
fn crashed(case: &str, signals: &[&str], extra: &[&str]) -> String {
    let (error, _) = fault_is_an_error(case, 60, extra);
    let library = display(&canonical(&faulty(case)));
    assert!(
        signals
            .iter()
            .any(|s| error.contains(&format!("plugin function fault ({library}) crashed: {s}"))),
        "{case}: the worker crashed with one of {signals:?}: {error}"
    );
    assert!(
        error.contains("memory limit"),
        "{case}: a crash of this kind mentions the memory limit: {error}"
    );
    error
}

#[test]
fn isolated_null_write_is_a_sigsegv_error_and_the_next_statement_answers() {
    let error = crashed("NULL_WRITE", &["SIGSEGV"], &[]);
    assert!(
        !error.contains("stderr"),
        "it wrote nothing to stderr: {error}"
    );
}

/// ABORT writes a line to stderr before it aborts: the error quotes it.
#[test]
fn isolated_abort_is_a_sigabrt_error_that_quotes_its_last_stderr_line() {
    let error = crashed("ABORT", &["SIGABRT"], &[]);
    assert!(
        error.contains(r#"its stderr ended with: "faulty: giving up""#),
        "{error}"
    );
}

#[test]
fn isolated_sigkill_on_itself_is_a_sigkill_error_and_the_next_statement_answers() {
    crashed("SIGKILL_SELF", &["SIGKILL"], &["--workers", "2"]);
}

/// malloc(64 GiB) fails under the worker's address-space limit and the plugin aborts; with a
/// cgroup limit instead, the kernel's OOM killer sends SIGKILL while it writes.
#[test]
fn isolated_64_gib_allocation_dies_at_the_worker_memory_limit() {
    crashed(
        "ALLOC_64G",
        &["SIGABRT", "SIGKILL"],
        &["--worker-memory", "1024"],
    );
}

#[test]
fn isolated_exit_0_during_the_call_is_an_error_and_the_next_statement_answers() {
    let (error, _) = fault_is_an_error("EXIT0", 60, &[]);
    let library = display(&canonical(&faulty("EXIT0")));
    let expected = format!(
        "plugin function fault ({library}): its worker process exited with status 0 during the call"
    );
    assert!(error.contains(&expected), "{error}");
}

#[test]
fn isolated_infinite_loop_is_killed_at_the_call_time_limit() {
    let (error, elapsed) = fault_is_an_error("INFINITE_LOOP", 1, &[]);
    assert!(error.contains("call time limit of 1 s"), "{error}");
    assert!(error.contains("was killed"), "{error}");
    assert!(
        elapsed < PATIENCE,
        "the call is given up after its 1 s limit, not {elapsed:?}"
    );
}

/// The plugin closes fd 3, the worker's channel, and returns: the worker cannot answer and exits
/// on its own with a non-zero status.
#[test]
fn isolated_closed_channel_is_an_exit_with_an_error_status() {
    let (error, _) = fault_is_an_error("CLOSE_CHANNEL", 60, &[]);
    assert!(error.contains("exited with status"), "{error}");
    assert!(
        !error.contains("exited with status 0 "),
        "the worker reports its broken channel with a non-zero status: {error}"
    );
}

#[test]
fn isolated_garbage_on_the_channel_is_a_malformed_reply() {
    let (error, _) = fault_is_an_error("GARBAGE_CHANNEL", 60, &[]);
    assert!(error.contains("malformed reply"), "{error}");
}

/// The plugin forks (the child sleeps 30 s holding the channel socket, as a daemon would) and
/// exits: the host learns of its worker's exit from the process itself (a pidfd), not from the
/// socket's end of file, so the error comes at once and is not a call time-out.
#[test]
fn isolated_fork_and_exit_is_noticed_without_waiting_for_the_forked_child() {
    let (error, elapsed) = fault_is_an_error("FORK_EXIT", 60, &[]);
    assert!(error.contains("exited with status 0"), "{error}");
    assert!(!error.contains("call time limit"), "{error}");
    assert!(
        elapsed < Duration::from_secs(25),
        "the exit is noticed before the forked child (30 s) lets the socket go: {elapsed:?}"
    );
}

/// Garbage written to the worker's stdout (/dev/null) and stderr (a pipe the host reads only for
/// error messages): both statements answer and udfsql's own output is clean.
#[test]
fn isolated_garbage_on_stdout_and_stderr_stays_out_of_the_output() {
    let (o, _, _) = isolated_run("GARBAGE_STDIO", 60, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "x\n2\ny\n42\n", "stderr:\n{}", stderr(&o));
    assert!(error_lines(&o).is_empty(), "{}", stderr(&o));
    let marker = b"GARBAGE-FROM-FAULTY-PLUGIN";
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "the plugin's garbage reached udfsql's {name}"
        );
        assert!(
            std::str::from_utf8(bytes).is_ok(),
            "udfsql's {name} is not UTF-8 text"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The contrast: the same fixtures loaded in-process take udfsql down.
// ---------------------------------------------------------------------------------------------

#[test]
fn not_isolated_the_same_fixtures_kill_udfsql() {
    for (case, signal) in [("NULL_WRITE", SIGSEGV), ("ABORT", SIGABRT)] {
        let library = display(&faulty(case));
        let o = run(&[
            "--plugin",
            &library,
            "--format",
            "csv",
            "-c",
            "SELECT fault(1) AS x",
            "-c",
            "SELECT ok(41) AS y",
        ]);
        assert_eq!(
            o.status.signal(),
            Some(signal),
            "{case} in-process kills udfsql with signal {signal}: {:?}; stderr:\n{}",
            o.status,
            stderr(&o)
        );
        assert!(
            !stdout(&o).contains("42"),
            "{case}: nothing runs after the crash"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Isolation chosen from SQL.
// ---------------------------------------------------------------------------------------------

/// `AS 'lib.so#fn#isolation=process'` (also with a SHA-256 pin) isolates one function; the
/// directory's own load at start-up (no `--isolate`) and `#isolation=none` are in-process;
/// `plugin_functions` and `EXPLAIN` show the mode.
#[test]
fn isolation_chosen_in_create_function() {
    let abort = faulty("ABORT");
    let dir = plugin_dir_with(&[(&abort, "libfaulty_abort.so")]);
    let library = canonical(&dir.path().join("libfaulty_abort.so"));
    let digest = sha256sum(&library);
    let create_fault = format!(
        "CREATE FUNCTION sql_fault(BIGINT) RETURNS BIGINT LANGUAGE plugin \
         AS 'libfaulty_abort.so#fault#isolation=process#sha256={digest}'"
    );
    let o = run(&[
        "--plugin-dir",
        &display(dir.path()),
        "--format",
        "csv",
        "-c",
        &create_fault,
        "-c",
        "CREATE FUNCTION sql_ok(BIGINT) RETURNS BIGINT LANGUAGE plugin \
         AS 'libfaulty_abort.so#ok#isolation=process'",
        "-c",
        "CREATE FUNCTION sql_inline(BIGINT) RETURNS BIGINT LANGUAGE plugin \
         AS 'libfaulty_abort.so#isolation=none#ok'",
        "-c",
        "SELECT sql_fault(1) AS x",
        "-c",
        "SELECT sql_ok(41) AS y",
        "-c",
        "SELECT name, isolation FROM plugin_functions ORDER BY name",
        "-c",
        "EXPLAIN SELECT sql_ok(41)",
    ]);
    assert_eq!(o.status.signal(), None, "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let errors = error_lines(&o);
    assert_eq!(
        errors.len(),
        1,
        "only SELECT sql_fault fails: {}",
        stderr(&o)
    );
    let expected = format!(
        "plugin function sql_fault ({}) crashed: SIGABRT",
        display(&library)
    );
    assert!(errors[0].contains(&expected), "{}", errors[0]);
    assert!(stderr(&o).contains("memory limit"), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("y\n42\n"),
        "the next query answers: {out}\nstderr:\n{}",
        stderr(&o)
    );
    assert!(
        out.contains(
            "name,isolation\nfault,none\nok,none\nsql_fault,process\nsql_inline,none\nsql_ok,process\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("isolated"),
        "EXPLAIN shows the isolated call: {out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Isolation from the API, and containment observed in /proc.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_isolated_faults_are_errors_workers_are_replaced_contained_and_reaped() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    // The service and corpus tests, if they ran first, dropped their pools: no workers remain.
    wait_for_async(PATIENCE, "the workers of earlier tests to be gone", || {
        none_of(udf_engine::live_worker_pids())
    })
    .await;
    for case in ["SIGKILL_SELF", "INFINITE_LOOP"] {
        let library = faulty(case);
        let ctx = SessionContext::new();
        let registered =
            udf_engine::register_plugin_with(&ctx, &library, &isolated(Duration::from_secs(1)))
                .unwrap_or_else(|e| panic!("{case}: register isolated: {e}"));
        let names: BTreeSet<_> = registered.iter().map(|r| r.sql_name.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["fault", "ok"]), "{case}");

        // Before: the pool answers.
        assert_eq!(rows(&ctx, "SELECT ok(1) AS v").await, expect(&[&["2"]]));

        // The fault is an error naming the function, the library and what happened, within a
        // bounded time.
        let start = Instant::now();
        let error = match query(&ctx, "SELECT fault(1) AS v").await {
            Ok(batches) => panic!("{case}: fault(1) answered {batches:?}"),
            Err(e) => e.to_string(),
        };
        let elapsed = start.elapsed();
        let named = format!("plugin function fault ({})", display(&canonical(&library)));
        assert!(error.contains(&named), "{case}: {error}");
        match case {
            "SIGKILL_SELF" => {
                assert!(
                    error.contains(&format!("{named} crashed: SIGKILL")),
                    "{error}"
                );
                assert!(error.contains("memory limit"), "{error}");
            }
            _ => {
                assert!(error.contains("call time limit of 1 s"), "{error}");
                assert!(error.contains("was killed"), "{error}");
            }
        }
        assert!(elapsed < PATIENCE, "{case}: the fault took {elapsed:?}");

        // After: the pool replaced the worker; one row and many batches both answer.
        assert_eq!(rows(&ctx, "SELECT ok(1) AS v").await, expect(&[&["2"]]));
        assert_eq!(
            rows(
                &ctx,
                "SELECT sum(ok(value)) AS s FROM generate_series(1, 10000)"
            )
            .await,
            expect(&[&["50015000"]]),
            "{case}"
        );

        // Containment of every live worker, once each has its shared regions (a replacement
        // started in the background is listed from its start, before its host sends them).
        let live = udf_engine::live_worker_pids();
        assert!(!live.is_empty(), "{case}: the pool has live workers");
        wait_for_async(PATIENCE, "every live worker to hold its regions", || {
            let starting: Vec<u32> = live
                .iter()
                .copied()
                .filter(|pid| std::fs::metadata(format!("/proc/{pid}/fd/5")).is_err())
                .collect();
            none_of(starting)
        })
        .await;
        for &pid in &live {
            assert_contained(pid);
        }

        // The dead worker was reaped: no zombie children.
        wait_for_async(Duration::from_secs(10), "no zombie workers", || {
            none_of(zombie_workers())
        })
        .await;

        // Dropping the session (the pool's last user) kills and reaps its workers.
        drop(registered);
        drop(ctx);
        wait_for_async(
            PATIENCE,
            "the dropped pool's workers to be gone and reaped",
            || {
                none_of(
                    live.iter()
                        .filter_map(|&pid| stat(pid).map(|s| (pid, s)))
                        .filter(|(pid, _)| still_our_worker(*pid))
                        .collect(),
                )
            },
        )
        .await;
        let still_listed: Vec<u32> = udf_engine::live_worker_pids()
            .into_iter()
            .filter(|pid| live.contains(pid))
            .collect();
        assert!(
            still_listed.is_empty(),
            "{case}: dropped workers are still listed: {still_listed:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Workers die with their host.
// ---------------------------------------------------------------------------------------------

/// A child process, killed and reaped if the test fails while it runs.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// udfsql is SIGKILLed while its worker loops inside a call: the worker gets SIGKILL from the
/// kernel (PR_SET_PDEATHSIG) instead of spinning on as an orphan.
#[test]
fn workers_die_with_a_killed_host() {
    let library = display(&faulty("INFINITE_LOOP"));
    let mut host = Reaped(
        udfsql_command(&[
            "--isolate",
            "--call-timeout",
            "60",
            "--plugin",
            &library,
            "-c",
            "SELECT fault(1)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn udfsql"),
    );
    let host_pid = host.0.id();
    // A worker counts once it runs the worker binary (after exec: its death signal is set).
    let workers: Vec<u32> = wait_for(PATIENCE, "udfsql to start a worker", || {
        if let Ok(Some(status)) = host.0.try_wait() {
            panic!("udfsql ended before a worker appeared: {status:?}");
        }
        let children = children_of(host_pid);
        let found: Vec<u32> = children
            .iter()
            .copied()
            .filter(|&pid| stat(pid).is_some_and(|s| s.comm == WORKER_COMM))
            .collect();
        if found.is_empty() {
            Err(format!("children of udfsql: {children:?}"))
        } else {
            Ok(found)
        }
    });
    host.0.kill().expect("SIGKILL udfsql");
    let status = host.0.wait().expect("wait for udfsql");
    assert_eq!(status.signal(), Some(SIGKILL), "{status:?}");
    // Gone, or a zombie whose new parent (PID 1 of a container, say) does not reap.
    wait_for(PATIENCE, "the orphaned workers to die", || {
        none_of(
            workers
                .iter()
                .filter_map(|&pid| stat(pid).map(|s| (pid, s)))
                .filter(|(_, s)| s.comm == WORKER_COMM && s.state != 'Z')
                .collect(),
        )
    });
}

// ---------------------------------------------------------------------------------------------
// 6. The HTTP service, isolated by default.
// ---------------------------------------------------------------------------------------------

struct Server {
    inner: TestServer,
    /// The plugin directory, removed after the server stopped.
    dir: tempfile::TempDir,
}

impl Server {
    /// A service whose plugin directory holds only `library` (as `file_name`).
    async fn start(library: &Path, file_name: &str) -> Server {
        Server::start_with(library, file_name, |_| {}).await
    }

    /// [`start`](Self::start), with `configure` applied to the configuration.
    async fn start_with(
        library: &Path,
        file_name: &str,
        configure: impl FnOnce(&mut Config),
    ) -> Server {
        let dir = plugin_dir_with(&[(library, file_name)]);
        let mut config = Config {
            plugin_dirs: vec![dir.path().to_path_buf()],
            isolation: isolated(WorkerLimits::default().call_timeout),
            ..Config::default()
        };
        configure(&mut config);
        Server {
            inner: TestServer::start(config).await,
            dir,
        }
    }

    fn url(&self, path: &str) -> String {
        self.inner.url(path)
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

async fn post_sql(client: &reqwest::Client, url: &str, sql: &str) -> (u16, Value) {
    let response = client
        .post(url)
        .header("content-type", "text/plain")
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Eight clients at once, each asking `ok(i)`: all answered, correctly.
async fn eight_clients_answered(server: &Server, round: &str) {
    let url = server.url("/query");
    let clients: Vec<_> = (0..8i64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                post_sql(&client, &url, &format!("SELECT ok({i}) AS v")).await
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (status, body) = client.await.unwrap();
        assert_eq!(
            (status, body),
            (200, json!([{"v": i + 1}])),
            "{round}: client {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_answers_a_crash_with_json_and_keeps_serving_eight_clients() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    for (case, signal) in [
        ("ABORT", "SIGABRT"),
        ("SIGKILL_SELF", "SIGKILL"),
        ("NULL_WRITE", "SIGSEGV"),
    ] {
        let file_name = format!("libfaulty_{}.so", case.to_lowercase());
        let server = Server::start(&faulty(case), &file_name).await;
        let library = canonical(&server.dir.path().join(&file_name));
        let client = reqwest::Client::new();
        let query = server.url("/query");
        for round in ["first", "second"] {
            let (status, body) = post_sql(&client, &query, "SELECT fault(1) AS v").await;
            assert_eq!(status, 400, "{case} {round}: {body}");
            let error = body["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{case} {round}: no error text: {body}"));
            let expected = format!(
                "plugin function fault ({}) crashed: {signal}",
                display(&library)
            );
            assert!(error.contains(&expected), "{case} {round}: {error}");
            eight_clients_answered(&server, &format!("{case} {round}")).await;
        }
        let health: Value = client
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health, json!({"status": "ok"}), "{case}");
        server.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// 7. The misbehaving-result corpus, isolated and in-process.
// ---------------------------------------------------------------------------------------------

fn corpus() -> PathBuf {
    c_library("batch_misbehaving", "batch_misbehaving.c", &[])
}

const INTS: [Option<i64>; 4] = [Some(1), None, Some(3), Some(-4)];
const STRS: [Option<&str>; 4] = [Some("one"), None, Some("três"), Some("")];

/// A session with `boundary.rs`'s table `t(x BIGINT, s VARCHAR)` and the corpus registered.
fn corpus_session(
    isolation: &Isolation,
    label: &str,
) -> (SessionContext, Vec<udf_engine::Registration>) {
    let ctx = SessionContext::new();
    let schema = Arc::new(Schema::new(vec![
        Field::new("x", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(INTS.to_vec())),
            Arc::new(StringArray::from(STRS.to_vec())),
        ],
    )
    .unwrap();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    let registered = udf_engine::register_plugin_with(&ctx, corpus().as_path(), isolation)
        .unwrap_or_else(|e| panic!("register the corpus {label}: {e}"));
    // Every function also as `<name>_row`: the row path, in the same pool when isolated.
    for f in &registered {
        let udf = ctx.udf(&f.sql_name).unwrap();
        let plugin = udf.inner().downcast_ref::<PluginUdf>().unwrap();
        let mut row = PluginUdf::new(
            format!("{}_row", f.sql_name),
            plugin.function().clone(),
            plugin.volatility(),
        )
        .with_call_path(CallPath::Row);
        if let Some(pool) = plugin.worker_pool() {
            row = row.with_worker_pool(Arc::clone(pool));
        }
        assert_eq!(row.isolation_mode(), isolation.mode_name());
        udf_engine::register_udf(&ctx, row);
    }
    (ctx, registered)
}

/// A query's whole outcome: the table it answers, or its error text.
async fn outcome(ctx: &SessionContext, sql: &str) -> Result<String, String> {
    match query(ctx, sql).await {
        Ok(batches) => Ok(pretty_format_batches(&batches).expect("format").to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Every one-argument function of the corpus (all but the call counter, whose count is per
/// process) answers the same table, or fails with the same error text, isolated and in-process;
/// the isolated session answers after every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_misbehaving_corpus_answers_alike_isolated_and_in_process() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    let (local, local_functions) = corpus_session(&Isolation::InProcess, "in-process");
    let (remote, remote_functions) = corpus_session(&isolated(Duration::from_secs(30)), "isolated");
    let names = |r: &[udf_engine::Registration]| -> Vec<String> {
        r.iter().map(|f| f.sql_name.clone()).collect()
    };
    assert_eq!(names(&local_functions), names(&remote_functions));

    let (mut answers, mut errors) = (0, 0);
    for f in &local_functions {
        if f.signature.arg_types.len() != 1 || f.sql_name == "counter" {
            continue;
        }
        let column = if f.signature.arg_types[0] == udf_abi::v2::UdfType::Utf8.into() {
            "s"
        } else {
            "x"
        };
        for name in [f.sql_name.clone(), format!("{}_row", f.sql_name)] {
            let sql = format!("SELECT {name}({column}) AS r FROM t");
            let expected = outcome(&local, &sql).await;
            let got = outcome(&remote, &sql).await;
            assert_eq!(got, expected, "{name}: isolated vs in-process");
            match expected {
                Ok(_) => answers += 1,
                Err(_) => errors += 1,
            }
        }
        assert_eq!(
            outcome(&remote, "SELECT ok_int(x) AS r FROM t").await,
            outcome(&local, "SELECT ok_int(x) AS r FROM t").await,
            "the isolated session answers after {}",
            f.sql_name
        );
    }
    assert!(
        answers >= 10 && errors >= 30,
        "the corpus was run on both paths: {answers} answers, {errors} errors"
    );
}

/// The v1 (seed contract, row only) misbehaving results: the worker runs the row loop and the
/// error texts are the in-process ones, for a constant and a column argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_v1_results_fail_alike_isolated_and_in_process() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    for case in [
        "WRONG_RETURN_TYPE",
        "WRONG_RETURN_TYPE_STRING",
        "UNKNOWN_VALUE_TAG",
        "NULL_STRING",
        "INVALID_UTF8",
        "NULL_ERROR",
        "BAD_RESULT_TAG",
        "BAD_BOOL",
    ] {
        let library = udf_tests::misbehaving(case);
        let local = SessionContext::new();
        let remote = SessionContext::new();
        udf_engine::register_plugin_with(&local, &library, &Isolation::InProcess).unwrap();
        udf_engine::register_plugin_with(&remote, &library, &isolated(Duration::from_secs(30)))
            .unwrap();
        for sql in [
            "SELECT broken(1)",
            "SELECT broken(x) FROM (VALUES (1), (2)) t(x)",
        ] {
            let expected = outcome(&local, sql).await;
            assert!(expected.is_err(), "{case}: {sql} answered in-process");
            assert_eq!(outcome(&remote, sql).await, expected, "{case}: {sql}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Cancellation: Ctrl-C in the REPL and the service's time limit stop a running isolated call
//    at once (the call time limit is far away), kill its worker, and the next query answers.
// ---------------------------------------------------------------------------------------------

/// The workers among the children of `parent` that are alive (not zombies).
fn live_workers_of(parent: u32) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|&pid| stat(pid).is_some_and(|s| s.comm == WORKER_COMM && s.state != 'Z'))
        .collect()
}

#[test]
fn ctrl_c_in_the_repl_cancels_a_running_isolated_call_and_kills_its_worker() {
    ctrl_c_cancels_a_running_isolated_call(false);
}

/// The same with udfsql (and so its workers) allowed one CPU (`taskset`): its pool is crowded
/// from the first call, so the host waits for the looping call asleep on the doorbell from the
/// start, and Ctrl-C must still reach it there.
#[test]
fn ctrl_c_reaches_a_crowded_pools_sleeping_host() {
    ctrl_c_cancels_a_running_isolated_call(true);
}

/// Ctrl-C in a udfsql session (in a pseudo-terminal) while an isolated call loops: the statement
/// is cancelled, its worker killed and reaped by udfsql, and the next statement answers. With
/// `one_cpu`, udfsql runs under `taskset` on one CPU. Each run is told apart from the other's
/// among this process's children by its call time limit.
fn ctrl_c_cancels_a_running_isolated_call(one_cpu: bool) {
    let library = display(&faulty("INFINITE_LOOP"));
    let dir = tempfile::tempdir().unwrap();
    let timeout = if one_cpu { "601" } else { "600" };
    // The CPU this thread runs on: one the test process may use.
    let cpu = rustix::thread::sched_getcpu().to_string();
    let mut cmd = if one_cpu {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &cpu]).arg(udfsql());
        cmd
    } else {
        Command::new(udfsql())
    };
    cmd.args(["--isolate", "--call-timeout", timeout, "--plugin", &library])
        .env("UDFSQL_HISTORY", dir.path().join("history"))
        .env("TERM", "dumb");
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).expect("spawn in a pty");
    p.exp_string("udfsql> ").unwrap();
    // This test's udfsql among this process's children: the only one with that call time limit
    // (`taskset` execs udfsql: same process).
    let host = wait_for(PATIENCE, "the udfsql process", || {
        let found: Vec<u32> = children_of(std::process::id())
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == timeout.as_bytes()))
            })
            .collect();
        match found.as_slice() {
            [pid] => Ok(*pid),
            other => Err(format!("{other:?}")),
        }
    });
    if one_cpu {
        let status = std::fs::read_to_string(format!("/proc/{host}/status")).unwrap();
        assert!(
            status.lines().any(|l| l
                .split_whitespace()
                .eq(["Cpus_allowed_list:", cpu.as_str()])),
            "udfsql runs on CPU {cpu} only: {status}"
        );
    }
    p.send_line("SELECT fault(1);").unwrap();
    // Running: the looping worker is on the CPU ('R'); an idle one sleeps reading its channel.
    let busy = wait_for(PATIENCE, "a worker running the call", || {
        let found: Vec<u32> = live_workers_of(host)
            .into_iter()
            .filter(|&pid| stat(pid).is_some_and(|s| s.state == 'R'))
            .collect();
        if found.is_empty() {
            Err("no worker yet".to_string())
        } else {
            Ok(found)
        }
    });
    let sent = Instant::now();
    p.send_control('c').unwrap();
    p.exp_string("statement cancelled (Ctrl-C)").unwrap();
    // Killed and reaped by udfsql: neither alive nor a zombie child of udfsql.
    wait_for(PATIENCE, "the cancelled worker to be reaped", || {
        none_of(
            busy.iter()
                .copied()
                .filter(|&pid| stat(pid).is_some_and(|s| s.ppid == host))
                .collect(),
        )
    });
    assert!(
        sent.elapsed() < PATIENCE,
        "cancelling took {:?}",
        sent.elapsed()
    );
    p.send_line("SELECT ok(41) AS answer;").unwrap();
    p.exp_string("| 42     |").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_time_limit_cancels_a_running_isolated_call_and_kills_its_worker() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    let server = Server::start_with(&faulty("INFINITE_LOOP"), "libfaulty_loop.so", |c| {
        c.time_limit = Duration::from_millis(500);
        c.isolation = isolated(Duration::from_secs(600));
    })
    .await;
    let client = reqwest::Client::new();
    let query = server.url("/query");
    // Four requests at once, more than the runtime's two threads: each is answered at its time
    // limit, none waits for another's stuck call.
    let started = Instant::now();
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let (client, query) = (client.clone(), query.clone());
            tokio::spawn(async move { post_sql(&client, &query, "SELECT fault(1) AS v").await })
        })
        .collect();
    // The pool's two workers, both looping in a call by now or soon.
    let busy = wait_for_async(PATIENCE, "two workers", || {
        let pids = udf_engine::live_worker_pids();
        if pids.len() >= 2 {
            Ok(pids)
        } else {
            Err(format!("{pids:?}"))
        }
    })
    .await;
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 408, "{body}");
    }
    assert!(
        started.elapsed() < PATIENCE,
        "answered after {:?}",
        started.elapsed()
    );
    // The workers of the cancelled calls were killed and reaped (the pool starts new ones).
    wait_for_async(PATIENCE, "the cancelled workers to be gone", || {
        none_of(
            busy.iter()
                .copied()
                .filter(|&pid| stat(pid).is_some())
                .collect(),
        )
    })
    .await;
    // A worker killed a moment ago is a zombie until its killer's `wait` returns: none may stay.
    wait_for_async(PATIENCE, "no zombie workers", || none_of(zombie_workers())).await;
    eight_clients_answered(&server, "after the time limit").await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Concurrency: the partitions of one query call distinct workers at the same time.
// ---------------------------------------------------------------------------------------------

/// Two partitions, each one batch; `fault` of the SLOW fixture sleeps 300 ms per call and returns
/// the time it started. With a pool of two, the two calls overlap: the second starts before the
/// first has finished (a pool that served calls one at a time, or a lock held during a call,
/// would start them 300 ms apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_of_a_query_use_distinct_workers_at_once() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    wait_for_async(PATIENCE, "no workers left by other tests", || {
        none_of(udf_engine::live_worker_pids())
    })
    .await;
    let config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
    let ctx = SessionContext::new_with_config(config);
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let partition = |v: i64| {
        vec![
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(vec![v]))],
            )
            .unwrap(),
        ]
    };
    let table = MemTable::try_new(Arc::clone(&schema), vec![partition(1), partition(2)]).unwrap();
    ctx.register_table("two", Arc::new(table)).unwrap();
    let limits = Isolation::Process(WorkerLimits {
        workers: Some(2),
        worker_program: Some(udfsql_worker()),
        ..Default::default()
    });
    udf_engine::register_plugin_with(&ctx, faulty("SLOW"), &limits).unwrap();
    let started = || async {
        let started: Vec<i64> = rows(&ctx, "SELECT fault(x) AS t FROM two ORDER BY t")
            .await
            .iter()
            .map(|row| row[0].parse().unwrap())
            .collect();
        assert_eq!(started.len(), 2);
        started
    };
    // The first query starts the pool's second worker for the second partition (its start, in
    // a debug build on a loaded machine, is not what is measured here).
    started().await;
    let workers = udf_engine::live_worker_pids();
    assert_eq!(workers.len(), 2, "workers: {workers:?}");
    let started = started().await;
    assert!(
        started[1] - started[0] < 250,
        "the second call started {} ms after the first, which sleeps 300 ms",
        started[1] - started[0]
    );
    assert_eq!(
        udf_engine::live_worker_pids(),
        workers,
        "the same two workers"
    );
    drop(ctx);
    wait_for_async(PATIENCE, "the pool's workers to be reaped", || {
        none_of(udf_engine::live_worker_pids())
    })
    .await;
}

/// The CPU time the calling thread has run so far (`/proc/thread-self/schedstat`, in ns).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("read schedstat");
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no run time in schedstat: {text:?}"));
    Duration::from_nanos(ns)
}

/// For a test that starts workers and runs its queries on its own thread: the serial lock
/// ([`IN_PROCESS_WORKERS`]), once no worker of another test is left, and a current-thread
/// runtime (the whole query runs on the calling thread, whose counters the test reads).
fn alone_on_this_thread() -> (
    tokio::sync::MutexGuard<'static, ()>,
    tokio::runtime::Runtime,
) {
    let serial = IN_PROCESS_WORKERS.blocking_lock();
    wait_for(PATIENCE, "no workers left by other tests", || {
        none_of(udf_engine::live_worker_pids())
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (serial, runtime)
}

/// How long process `pid`'s main thread has waited on a run queue for a CPU so far (the second
/// field of `/proc/PID/schedstat`).
fn run_delay(pid: u32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).expect("read schedstat");
    let ns = text
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no run delay in schedstat: {text:?}"));
    Duration::from_nanos(ns)
}

/// How often the calling thread has blocked so far (`voluntary_ctxt_switches` in
/// `/proc/thread-self/status`; a spin, even one that yields the CPU, does not count).
fn thread_blocked() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/status").expect("read status");
    text.lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no voluntary_ctxt_switches in {text}"))
}

/// A crowded pool's host does not spin: where the pool's busy calls keep more threads running
/// than the process may use CPUs (two per call: host and worker), the host waits for each reply
/// asleep at once. Observed on the calling thread's blocking waits (a current-thread runtime runs
/// the query on it), calls of ~20 µs (the SLEEPS fixture), one per one-row batch: through a pool
/// made while the thread could use one CPU (one busy call is already crowded), the thread blocks
/// for nearly every call; through a pool made while it could use all of the machine's (two or
/// more), it spins for them and blocks for fewer than half as often — observed when the machine
/// is calm enough for its worker to get a CPU in time (a try within 5 s, see below). The answers
/// are the same. An aggregate's requests through a crowded pool are waited for asleep too. And
/// the crowded host's sleep still ends at the call time limit: a call that hangs is killed with
/// its worker, and the next statement answers.
#[test]
fn a_crowded_pools_host_waits_asleep_instead_of_spinning() {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
    let (_serial, runtime) = alone_on_this_thread();
    let session_of = |library: PathBuf, call_timeout: Duration| {
        let config = datafusion::prelude::SessionConfig::new().with_target_partitions(1);
        let ctx = SessionContext::new_with_config(config);
        // Each its own pool (pools are shared by library and limits: no other test of this
        // binary may use these limits, or it could find the pool made while pinned).
        let limits = Isolation::Process(WorkerLimits {
            workers: Some(1),
            call_timeout,
            worker_program: Some(udfsql_worker()),
            ..Default::default()
        });
        udf_engine::register_plugin_with(&ctx, library, &limits).unwrap();
        ctx
    };
    let session = |call_timeout| session_of(faulty("SLEEPS"), call_timeout);
    // Made first, unpinned: it also starts the thread that spawns every worker, which must not
    // inherit the pin below.
    let roomy = session(Duration::from_secs(7));
    let [roomy_worker] = udf_engine::live_worker_pids()[..] else {
        panic!("one worker: {:?}", udf_engine::live_worker_pids());
    };
    /// Puts the thread's own CPUs back when dropped, also when the test fails while pinned.
    struct Unpin(CpuSet);
    impl Drop for Unpin {
        fn drop(&mut self) {
            sched_setaffinity(None, &self.0).expect("unpin the thread");
        }
    }
    let unpin = Unpin(sched_getaffinity(None).expect("sched_getaffinity"));
    let mut one = CpuSet::new();
    one.set(sched_getcpu());
    sched_setaffinity(None, &one).expect("pin the thread to one CPU");
    let crowded = session(Duration::from_secs(2));
    let [crowded_worker] = udf_engine::live_worker_pids()
        .into_iter()
        .filter(|&pid| pid != roomy_worker)
        .collect::<Vec<_>>()[..]
    else {
        panic!("two workers: {:?}", udf_engine::live_worker_pids());
    };
    // An aggregate's pool too (its accumulator's worker is taken once per request).
    let crowded_sums = session_of(udf_tests::plugin("stats"), Duration::from_secs(2));
    drop(unpin);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());

    const CALLS: usize = 200;
    const SLEEP: i64 = 20;
    /// A worker that waited less than this for a CPU over the calls had one when it needed it.
    const CALM: Duration = Duration::from_millis(40);
    for ctx in [&crowded, &roomy, &crowded_sums] {
        one_row_batches(ctx, "t", &[SLEEP; CALLS]);
    }
    let run = |ctx: &SessionContext| {
        let answers: Vec<i64> = runtime
            .block_on(rows(ctx, "SELECT fault(x) FROM t"))
            .iter()
            .map(|row| row[0].parse().unwrap())
            .collect();
        assert_eq!(answers, vec![SLEEP + 1; CALLS]);
    };
    // Warm: the plans' code paths run, the hosts learn how long calls take.
    run(&crowded);
    run(&roomy);
    let blocked = |ctx: &SessionContext| -> u64 {
        let before = thread_blocked();
        run(ctx);
        thread_blocked() - before
    };
    let crowded_blocks = blocked(&crowded);
    assert!(
        crowded_blocks >= CALLS as u64 * 9 / 10,
        "{CALLS} calls through a crowded pool blocked the waiting thread {crowded_blocks} times: \
         the host spun for replies"
    );
    // `my_sum` over the same batches: one update request per batch, each waited for asleep
    // (bar the few a quick worker answers before its host lies down: half is far from a spin,
    // 3 blocks measured with the aggregate path's crowding off).
    let sum = |ctx: &SessionContext| {
        let got = runtime.block_on(rows(ctx, "SELECT my_sum(x) FROM t"));
        assert_eq!(got, vec![vec![(SLEEP * CALLS as i64).to_string()]]);
    };
    sum(&crowded_sums);
    let before = thread_blocked();
    sum(&crowded_sums);
    let aggregate_blocks = thread_blocked() - before;
    assert!(
        aggregate_blocks >= CALLS as u64 / 2,
        "an aggregate over {CALLS} batches through a crowded pool blocked the waiting thread \
         {aggregate_blocks} times: the host spun for replies"
    );
    if cpus >= 2 {
        // A spin catches replies only while the worker gets a CPU in time. How long it waited
        // for one (its run-queue delay, `/proc/PID/schedstat`) tells a calm try from one on a
        // machine loaded by other work (measured here: 0–6 ms over the 200 calls calm or beside
        // one busy process, 10–14 ms with a host that never spins, whose worker waits behind its
        // woken host, 218–352 ms beside two busy processes). Tries for up to 5 s, a pause
        // between them, until the spin shows; it must show if any try was calm.
        let caught = |blocks: u64| blocks < crowded_blocks / 2;
        let trying = Instant::now();
        let mut tries = Vec::new();
        loop {
            let before = run_delay(roomy_worker);
            let blocks = blocked(&roomy);
            tries.push((blocks, run_delay(roomy_worker) - before));
            if caught(blocks) || trying.elapsed() > Duration::from_secs(5) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let calm = tries.iter().any(|&(_, waited)| waited < CALM);
        assert!(
            tries.iter().any(|&(blocks, _)| caught(blocks)) || !calm,
            "{CALLS} calls through a pool with room blocked the waiting thread (times, and its \
             worker's wait for a CPU, in each try) {tries:?}, through a crowded one \
             {crowded_blocks}: the host did not spin"
        );
        eprintln!(
            "blocked: crowded {crowded_blocks}, crowded aggregate {aggregate_blocks}; with room (blocks, the worker's wait for a CPU) \
             {tries:?}{}",
            if calm {
                ""
            } else {
                ": loaded throughout, the spin was not observed"
            }
        );
    }

    // A call that hangs (`x` = -1) through the crowded pool: the host, asleep on the doorbell,
    // wakes at the time limit and kills the worker.
    one_row_batches(&crowded, "hangs", &[SLEEP, SLEEP, -1]);
    a_hang_is_killed_at_the_time_limit(&runtime, &crowded, crowded_worker, "2 s");
    assert_eq!(
        runtime.block_on(rows(&crowded, "SELECT fault(x) FROM hangs LIMIT 1")),
        vec![vec![(SLEEP + 1).to_string()]]
    );
    drop((roomy, crowded, crowded_sums));
    wait_for(PATIENCE, "the pools' workers to be reaped", || {
        none_of(udf_engine::live_worker_pids())
    });
}

/// Runs `fault(x)` of the SLEEPS fixture over the table `hangs` of `ctx`, whose last call hangs:
/// the statement fails at the call time limit (`limit`, as the error says it) naming the function
/// and its library, well within [`PATIENCE`], and `worker` is killed and reaped.
fn a_hang_is_killed_at_the_time_limit(
    runtime: &tokio::runtime::Runtime,
    ctx: &SessionContext,
    worker: u32,
    limit: &str,
) {
    let started = Instant::now();
    let error = runtime
        .block_on(query(ctx, "SELECT fault(x) FROM hangs"))
        .expect_err("the last call hangs")
        .to_string();
    let library = display(&canonical(&faulty("SLEEPS")));
    assert!(
        error.contains(&format!("plugin function fault ({library})"))
            && error.contains(&format!("call time limit of {limit}"))
            && error.contains("was killed"),
        "{error}"
    );
    assert!(
        started.elapsed() < PATIENCE,
        "given up after {:?}",
        started.elapsed()
    );
    wait_for(PATIENCE, "the hung worker to be killed and reaped", || {
        if still_our_worker(worker) {
            Err(format!("{:?}", stat(worker)))
        } else {
            Ok(())
        }
    });
}

/// A one-partition table `name` of one-row batches, `x` taking `values` in order.
fn one_row_batches(ctx: &SessionContext, name: &str, values: &[i64]) {
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let batches = values
        .iter()
        .map(|&v| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(vec![v]))],
            )
            .unwrap()
        })
        .collect();
    let table = MemTable::try_new(schema, vec![batches]).unwrap();
    ctx.register_table(name, Arc::new(table)).unwrap();
}

/// How the host waits for calls of every length, one call per one-row batch (`fault` of the SLEEPS
/// fixture sleeps `x` µs): calls too long to spin through (5 ms) are slept through, not spun
/// through — observed on the calling thread's CPU time (a current-thread runtime runs the whole
/// query on this thread): 40 of them cost it less than a quarter of their 200 ms more than 40
/// instant calls, where a host spinning while it waits would add about all of it. Every answer
/// is right whatever the wait took: instant calls (spun for), 5 ms ones (napped through), 0.3 ms
/// ones right after them (the napping host is rung awake), 25 ms ones (too long to nap for).
/// And a call that hangs after a run of napped ones is killed at the time limit, with its
/// worker, and the next statement answers.
#[test]
fn a_host_sleeps_through_long_isolated_calls_answers_each_and_still_meets_the_time_limit() {
    let (_serial, runtime) = alone_on_this_thread();
    let config = datafusion::prelude::SessionConfig::new().with_target_partitions(1);
    let ctx = SessionContext::new_with_config(config);
    let limits = Isolation::Process(WorkerLimits {
        workers: Some(1),
        call_timeout: Duration::from_secs(1),
        worker_program: Some(udfsql_worker()),
        ..Default::default()
    });
    udf_engine::register_plugin_with(&ctx, faulty("SLEEPS"), &limits).unwrap();
    let answers = |sql: &str| -> Vec<i64> {
        runtime
            .block_on(rows(&ctx, sql))
            .iter()
            .map(|row| row[0].parse().unwrap())
            .collect()
    };

    const CALLS: usize = 40;
    const SLEEP: i64 = 5_000;
    one_row_batches(&ctx, "long", &[SLEEP; CALLS]);
    // Warm: the worker started, the plan's code paths run once.
    assert_eq!(answers("SELECT ok(x) FROM long"), vec![SLEEP + 1; CALLS]);
    let before = thread_cpu();
    assert_eq!(answers("SELECT ok(x) FROM long"), vec![SLEEP + 1; CALLS]);
    let instant = thread_cpu() - before;
    let before = thread_cpu();
    assert_eq!(answers("SELECT fault(x) FROM long"), vec![SLEEP + 1; CALLS]);
    let slept = thread_cpu() - before;
    let asleep = Duration::from_micros(SLEEP as u64) * CALLS as u32;
    assert!(
        slept.saturating_sub(instant) < asleep / 4,
        "{CALLS} calls of {SLEEP} µs cost the waiting thread {slept:?} of CPU, {CALLS} instant \
         ones {instant:?}: it spun through much of the {asleep:?} the calls slept"
    );

    let mut mixed = vec![SLEEP; 10];
    mixed.extend([300; 10]);
    mixed.extend([SLEEP; 5]);
    mixed.extend([25_000; 3]);
    mixed.extend([0; 5]);
    mixed.extend([SLEEP; 5]);
    one_row_batches(&ctx, "mixed", &mixed);
    let expected: Vec<i64> = mixed.iter().map(|x| x + 1).collect();
    assert_eq!(answers("SELECT fault(x) FROM mixed"), expected);

    let mut hangs = vec![SLEEP; 10];
    hangs.push(-1);
    one_row_batches(&ctx, "hangs", &hangs);
    let [worker] = udf_engine::live_worker_pids()[..] else {
        panic!("one worker: {:?}", udf_engine::live_worker_pids());
    };
    a_hang_is_killed_at_the_time_limit(&runtime, &ctx, worker, "1 s");
    assert_eq!(answers("SELECT ok(x) FROM hangs LIMIT 1"), vec![SLEEP + 1]);
    drop(ctx);
    wait_for(PATIENCE, "the pool's workers to be reaped", || {
        none_of(udf_engine::live_worker_pids())
    });
}

// ---------------------------------------------------------------------------------------------
// 10. A library whose workers cannot run is refused when it is registered, naming why.
// ---------------------------------------------------------------------------------------------

#[test]
fn registering_fails_at_once_when_the_worker_cannot_run() {
    // `/bin/false` is started as a worker and listed live until it is reaped: another test's
    // count of its own workers must not see it.
    let _serial = IN_PROCESS_WORKERS.blocking_lock();
    let library = udf_tests::plugin("square");
    for (program, expected) in [
        (
            "/no/such/udfsql-worker",
            "worker program /no/such/udfsql-worker",
        ),
        (
            "/bin/false",
            "cannot start a worker process: the worker exited with status 1 before it was ready",
        ),
    ] {
        let ctx = SessionContext::new();
        let isolation = Isolation::Process(WorkerLimits {
            worker_program: Some(PathBuf::from(program)),
            ..Default::default()
        });
        let error = udf_engine::register_plugin_with(&ctx, &library, &isolation)
            .expect_err("the worker cannot run")
            .to_string();
        assert!(
            error.contains(&format!(
                "plugin library {} cannot be isolated",
                display(&canonical(&library))
            )) && error.contains(expected),
            "{program}: {error}"
        );
        assert!(
            ctx.udf("square").is_err(),
            "{program}: nothing is registered"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 11. A worker killed from outside between calls is replaced before the next call.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_killed_from_outside_is_replaced_before_the_next_call() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    wait_for_async(PATIENCE, "no workers left by other tests", || {
        none_of(udf_engine::live_worker_pids())
    })
    .await;
    let ctx = SessionContext::new();
    let limits = Isolation::Process(WorkerLimits {
        workers: Some(1),
        worker_program: Some(udfsql_worker()),
        ..Default::default()
    });
    udf_engine::register_plugin_with(&ctx, faulty("SLOW"), &limits).unwrap();
    assert_eq!(rows(&ctx, "SELECT ok(1) AS v").await, expect(&[&["2"]]));
    let [idle] = udf_engine::live_worker_pids()[..] else {
        panic!("one worker: {:?}", udf_engine::live_worker_pids());
    };
    let status = Command::new("kill")
        .args(["-KILL", &idle.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    // Dead, not yet reaped: the pool notices at the next call (its pidfd is readable).
    wait_for(PATIENCE, "the idle worker to die", || match stat(idle) {
        Some(s) if s.state != 'Z' => Err(format!("{s:?}")),
        _ => Ok(()),
    });
    assert_eq!(rows(&ctx, "SELECT ok(41) AS v").await, expect(&[&["42"]]));
    let now = udf_engine::live_worker_pids();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], idle, "a new worker answered");
    assert!(!still_our_worker(idle), "the killed worker was reaped");
}

// ---------------------------------------------------------------------------------------------
// 12. Primitive kernels answer in a worker as in-process, on the direct entry and the generic path.
// ---------------------------------------------------------------------------------------------

/// `#[udf]` functions over primitives run in the worker through the same batch entrypoint: over
/// columns without NULLs and a column beside a constant (its direct entry, which reads the
/// arguments where the worker decoded them, in its input region) and over columns with NULLs
/// (the generic path): the same answers as in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitive_kernels_answer_in_a_worker_as_in_process() {
    let _serial = IN_PROCESS_WORKERS.lock().await;
    let isolated = SessionContext::new();
    let in_process = SessionContext::new();
    let limits = Isolation::Process(WorkerLimits {
        workers: Some(1),
        worker_program: Some(udfsql_worker()),
        ..Default::default()
    });
    for name in ["square", "hypot", "is-even"] {
        udf_engine::register_plugin_with(&isolated, udf_tests::plugin(name), &limits).unwrap();
        udf_engine::register_plugin_with(
            &in_process,
            udf_tests::plugin(name),
            &Isolation::InProcess,
        )
        .unwrap();
    }
    let table = "(SELECT value AS x, CAST(value AS DOUBLE) / 3 AS y, \
                 CASE WHEN value % 7 = 0 THEN NULL ELSE value END AS n FROM generate_series(-3000, 3000))";
    let sql = format!(
        "SELECT square(x), is_even(x), hypot(y, y), hypot(y, 2.5), hypot(2.5, y), \
         square(n), is_even(n), hypot(y, n) FROM {table} ORDER BY x"
    );
    let expected = rows(&in_process, &sql).await;
    assert_eq!(expected.len(), 6001);
    assert_eq!(expected[0][0], "9000000");
    assert_eq!(rows(&isolated, &sql).await, expected);
}
