//! Asynchronous plugin functions (ABI 2.3), in-process: a C library (`tests/fixtures/c/
//! async_ops.c`) whose functions compute on their own threads and complete from there. Observed
//! at the plugin: how many calls were in flight, cancels received, result arrays released.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::Volatility;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{AsyncLimits, PluginLibrary, PluginUdf};
use udf_tests::c_library;

/// Whether a mapping of `path` is in this process.
fn mapped(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.contains(path))
}

/// The calls of these tests share the library's counters: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn library() -> Arc<PluginLibrary> {
    PluginLibrary::load(c_library("async_ops", "async_ops.c", &[])).expect("load async_ops")
}

/// A one-partition session with `t(x)` = 0..rows, and every function of `library` registered
/// (the asynchronous ones with `limits`, when given).
fn session(library: &Arc<PluginLibrary>, rows: i64, limits: Option<AsyncLimits>) -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let x = Int64Array::from_iter_values(0..rows);
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(x)]).unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.register_table("t", Arc::new(table)).unwrap();
    for (index, signature) in library.functions().iter().enumerate() {
        let function = library.function(index).unwrap();
        let mut udf = PluginUdf::new(&signature.name, function, Volatility::Volatile);
        if let Some(limits) = &limits {
            udf = udf.with_async_limits(limits.clone());
        }
        udf_engine::register_udf(&ctx, udf);
    }
    ctx
}

async fn column(ctx: &SessionContext, sql: &str) -> Result<Vec<i64>, String> {
    let batches = ctx
        .sql(sql)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(batches
        .iter()
        .flat_map(|b| {
            let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            assert_eq!(c.null_count(), 0);
            c.values().to_vec()
        })
        .collect())
}

async fn stat(ctx: &SessionContext, k: i64) -> i64 {
    column(ctx, &format!("SELECT async_stats({k})"))
        .await
        .unwrap()[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_come_back_in_row_order_with_the_in_flight_limit_reached_not_passed() {
    let _serial = SERIAL.lock().await;
    let library = library();
    assert!(
        library
            .function_named("slow_double")
            .unwrap()
            .async_defaults()
            .is_some()
    );
    assert!(
        library
            .function_named("async_stats")
            .unwrap()
            .async_defaults()
            .is_none()
    );
    for (limit, rows) in [(None, 300), (Some(8), 40)] {
        let limits = limit.map(|n| AsyncLimits::new(n, 1, Duration::from_secs(30)));
        let ctx = session(&library, rows, limits);
        stat(&ctx, 1).await;
        // Every call waits 100 ms on its own thread: far longer than starting the calls of one
        // wave takes, also on a loaded machine, so that the limit is reached.
        stat(&ctx, 5000 + 100).await;
        let got = column(&ctx, "SELECT slow_double(x) FROM t").await.unwrap();
        let want: Vec<i64> = (0..rows).map(|x| 2 * x).collect();
        assert_eq!(got, want, "results in row order");
        let most = stat(&ctx, 0).await;
        let expected = limit.unwrap_or(udf_engine::DEFAULT_MAX_IN_FLIGHT) as i64;
        assert_eq!(
            most, expected,
            "calls in flight at most, and reaching, the limit"
        );
        assert_eq!(stat(&ctx, 2).await, 0, "no call left in flight");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_rows_per_call_keep_row_order() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let ctx = session(
        &library,
        1000,
        Some(AsyncLimits::new(4, 37, Duration::from_secs(30))),
    );
    stat(&ctx, 5000).await;
    let got = column(&ctx, "SELECT slow_double(x) FROM t WHERE x % 3 <> 1")
        .await
        .unwrap();
    let want: Vec<i64> = (0..1000).filter(|x| x % 3 != 1).map(|x| 2 * x).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_function_the_library_and_the_rows_and_the_session_goes_on() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let ctx = session(&library, 3, None);
    stat(&ctx, 5000).await;
    let path = library.path().display().to_string();
    for (function, says) in [
        ("fail_rows", "lookup failed for 0"),
        ("start_refuses", "start_refuses: no capacity"),
        ("wrong_length", "the result has 2 rows, 1 expected"),
    ] {
        let e = column(&ctx, &format!("SELECT {function}(x) FROM t"))
            .await
            .unwrap_err();
        assert!(
            e.contains(&format!("plugin function {function}")) && e.contains(&path),
            "{e}"
        );
        assert!(e.contains("rows 0..1"), "{e}");
        assert!(e.contains(says), "{function}: {e}");
        let ok = column(&ctx, "SELECT slow_double(x) FROM t").await.unwrap();
        assert_eq!(ok, [0, 2, 4]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_never_completes_fails_at_its_time_limit_and_is_cancelled() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let ctx = session(
        &library,
        5,
        Some(AsyncLimits::new(64, 1, Duration::from_millis(200))),
    );
    stat(&ctx, 1).await;
    let e = column(&ctx, "SELECT never_complete(x) FROM t")
        .await
        .unwrap_err();
    assert!(
        e.contains("plugin function never_complete") && e.contains("time limit of 200 ms"),
        "{e}"
    );
    // The plugin heard of it: it was cancelled, and completed the call then.
    assert!(stat(&ctx, 3).await >= 1, "a cancel reached the plugin");
    assert_eq!(stat(&ctx, 2).await, 0, "the plugin holds no call any more");
    assert_eq!(
        udf_engine::outstanding_calls(),
        0,
        "the host holds no call any more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_completion_is_released_unread() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let ctx = session(&library, 10, None);
    stat(&ctx, 5000).await;
    stat(&ctx, 1).await;
    let stray = udf_engine::stray_completions();
    let got = column(&ctx, "SELECT complete_twice(x) FROM t")
        .await
        .unwrap();
    assert_eq!(
        got,
        (0..10).map(|x| 2 * x).collect::<Vec<_>>(),
        "the first completion counts"
    );
    // Each call completed twice; the second completions may still be arriving.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while udf_engine::stray_completions() < stray + 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(udf_engine::stray_completions() >= stray + 10);
    // Every array the plugin handed over was released: the 10 second ones unread, the 10 first
    // ones once the query's result was dropped.
    assert_eq!(stat(&ctx, 4).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unload_hook_runs_when_the_library_is_dropped_after_its_calls() {
    let _serial = SERIAL.lock().await;
    let marker =
        udf_tests::fixture_dir().join(format!("async_unload_{}.marker", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let path = c_library(
        "async_ops_marked",
        "async_ops.c",
        &[&format!("UNLOAD_MARKER=\"{}\"", marker.display())],
    );
    // Several rounds: the last reference to the library must be dropped on a host thread, never
    // inside a completion on the plugin's thread (where the unload hook would wait for itself).
    for round in 0..5 {
        let _ = std::fs::remove_file(&marker);
        {
            let library = PluginLibrary::load(&path).unwrap();
            let ctx = session(&library, 20, None);
            stat(&ctx, 5000 + round).await;
            let got = column(&ctx, "SELECT slow_double(x) FROM t").await.unwrap();
            assert_eq!(got.len(), 20);
            assert!(!marker.exists(), "not unloaded while in use");
        }
        assert!(
            marker.exists(),
            "round {round}: the unload hook ran when the library was dropped"
        );
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "unloaded\n");
}

/// A plugin may keep an argument array past the call and release it later on a thread of its own
/// (`keep_args` releases it 50 ms after completing). When the argument is a result of a function
/// of the same library (`batch_double`: the array is the library's memory, so it holds the
/// library) and nothing else holds the library any more, the last reference goes inside that
/// release, on the plugin's thread: the library must still be unloaded on a host thread (its
/// unload hook waits for the library's threads, that one included) and then unmapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_let_go_inside_a_plugins_release_of_its_argument_unloads_on_a_host_thread() {
    let _serial = SERIAL.lock().await;
    let marker = udf_tests::fixture_dir().join(format!("keep_args_{}.marker", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let path = c_library(
        "async_ops_kept",
        "async_ops.c",
        &[&format!("UNLOAD_MARKER=\"{}\"", marker.display())],
    );
    {
        let library = PluginLibrary::load(&path).unwrap();
        let ctx = session(&library, 20, None);
        let got = column(&ctx, "SELECT keep_args(batch_double(x)) FROM t")
            .await
            .unwrap();
        assert_eq!(got, (0..20).map(|x| 4 * x).collect::<Vec<_>>());
        assert!(!marker.exists(), "not unloaded while in use");
    }
    // The plugin's threads hold the arguments, and so the library, for 50 ms more.
    let shown = path.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (!marker.exists() || mapped(&shown)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(marker.exists(), "the unload hook ran (on a host thread)");
    assert!(!mapped(&shown), "{shown} is unmapped after its unload hook");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "unloaded\n");
}

/// Through the `udfsql` binary, as a user runs it: the library's functions loaded with
/// `--plugin`, and one created with `CREATE FUNCTION` from a plugin directory; both answer in
/// row order, in a filter too, and an error leaves the session running.
#[test]
fn the_shell_loads_and_creates_asynchronous_functions() {
    let library = c_library("async_ops", "async_ops.c", &[]);
    let dir = tempfile::Builder::new()
        .prefix("async-")
        .tempdir_in(udf_tests::fixture_dir())
        .unwrap();
    udf_tests::set_mode(dir.path(), 0o755);
    let copy = dir.path().join("libasync_ops.so");
    std::fs::copy(&library, &copy).unwrap();
    udf_tests::set_mode(&copy, 0o755);
    let out = std::process::Command::new(udf_tests::udfsql())
        .arg("--plugin")
        .arg(&library)
        .arg("--plugin-dir")
        .arg(dir.path())
        .args(["--format", "csv"])
        .args([
            "-c",
            "SELECT slow_double(v) AS d FROM (VALUES (1), (2), (3)) AS t(v)",
        ])
        .args(["-c", "SELECT fail_rows(v) FROM (VALUES (7)) AS t(v)"])
        .args([
            "-c",
            "CREATE FUNCTION twice_later(BIGINT) RETURNS BIGINT LANGUAGE plugin \
             AS 'libasync_ops.so#slow_double'",
        ])
        .args([
            "-c",
            "SELECT v, twice_later(v) AS d FROM (VALUES (5), (6), (7)) AS t(v) \
             WHERE twice_later(v) > 10 ORDER BY v",
        ])
        .args([
            "-c",
            "SELECT name, call_path FROM plugin_functions \
             WHERE name IN ('slow_double', 'twice_later', 'async_stats') ORDER BY name",
        ])
        .args([
            "-c",
            "EXPLAIN SELECT twice_later(v) FROM (VALUES (1)) AS t(v)",
        ])
        .args([
            "-c",
            "CREATE FUNCTION stuck(BIGINT) RETURNS BIGINT LANGUAGE plugin \
             AS 'libasync_ops.so#never_complete#call_timeout=300ms#max_in_flight=2#chunk_rows=4'",
        ])
        .args(["-c", "SELECT stuck(v) FROM (VALUES (1), (2)) AS t(v)"])
        .args([
            "-c",
            "CREATE FUNCTION stats_limited(BIGINT) RETURNS BIGINT LANGUAGE plugin \
             AS 'libasync_ops.so#async_stats#max_in_flight=2'",
        ])
        .args(["-c", "SELECT 'after' AS s"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("name,call_path\nasync_stats,row\nslow_double,async\ntwice_later,async\n"),
        "asynchronous functions are listed: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "twice_later: async path, libasync_ops.so (ABI v2.{})",
            udf_abi::v2::ABI_MINOR
        )),
        "EXPLAIN names the asynchronous path: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("d\n2\n4\n6\n"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("plugin function fail_rows") && stderr.contains("lookup failed for 7"),
        "{stderr}"
    );
    assert!(stdout.contains("v,d\n6,12\n7,14\n"), "{stdout}\n{stderr}");
    // Limits from SQL: the call time limit of `#call_timeout=` applies.
    assert!(
        stderr.contains("plugin function stuck") && stderr.contains("time limit of 300 ms"),
        "{stderr}"
    );
    // Async options on a synchronous function are refused, naming them; the session goes on.
    assert!(
        stderr.contains("CREATE FUNCTION stats_limited")
            && stderr.contains("apply to asynchronous functions only"),
        "{stderr}"
    );
    assert!(stdout.contains("s\nafter\n"), "{stdout}");
}

/// NULLs on the asynchronous path follow the STRICT rule as on the batch path: a row whose
/// argument (declared not to take NULL) is NULL is NULL, whatever the plugin computed there;
/// the other rows are computed, in chunks that are slices of the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_arguments_give_null_rows_in_every_chunk() {
    let _serial = SERIAL.lock().await;
    let library = library();
    for chunk in [1, 3, 64] {
        let ctx = session(
            &library,
            10,
            Some(AsyncLimits::new(4, chunk, Duration::from_secs(30))),
        );
        stat(&ctx, 5000).await;
        let batches = ctx
            .sql("SELECT slow_double(CASE WHEN x % 2 = 0 THEN x END) AS d FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let got: Vec<Option<i64>> = batches
            .iter()
            .flat_map(|b| {
                let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                c.iter().collect::<Vec<_>>()
            })
            .collect();
        let want: Vec<Option<i64>> = (0..10).map(|x| (x % 2 == 0).then_some(2 * x)).collect();
        assert_eq!(got, want, "chunks of {chunk} rows");
    }
}

/// The ABI lets a plugin complete a call inside `start`, on the host's thread (before `start`
/// returns): the host takes that outcome as any other, in chunks of every size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_completed_inside_start_is_taken() {
    let _serial = SERIAL.lock().await;
    let library = library();
    for chunk in [1, 7, 1000] {
        let limits = AsyncLimits::new(4, chunk, Duration::from_secs(30));
        let ctx = session(&library, 300, Some(limits));
        let got = column(&ctx, "SELECT now_double(x) FROM t").await.unwrap();
        assert_eq!(
            got,
            (0..300).map(|x| 2 * x).collect::<Vec<_>>(),
            "chunk {chunk}"
        );
    }
}

/// Asynchronous calls wherever SQL puts an expression: projections, filters and aggregate
/// arguments (DataFusion's `AsyncFuncExec`), and also `GROUP BY` keys, `ORDER BY` keys, window
/// functions, `HAVING`, joins and `CASE` (udfsql's optimizer rule computes the calls in a
/// projection below): every answer equals the same query with the builtin `2 * x`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_calls_work_in_every_clause() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let ctx = session(
        &library,
        40,
        Some(AsyncLimits::new(8, 3, Duration::from_secs(30))),
    );
    let queries = [
        "SELECT x, slow_double(x) AS d FROM t WHERE slow_double(x) % 3 = 0 ORDER BY x",
        "SELECT sum(slow_double(x)) AS s, max(slow_double(x) + 1) AS m FROM t",
        "SELECT slow_double(x) % 7 AS k, count(*) AS n FROM t GROUP BY slow_double(x) % 7 ORDER BY k",
        "SELECT x % 5 AS k, count(*) AS n FROM t GROUP BY x % 5 HAVING sum(slow_double(x)) > 150 ORDER BY k",
        "SELECT x FROM t ORDER BY slow_double(x) % 9 DESC, x LIMIT 7",
        "SELECT x, sum(x) OVER (ORDER BY slow_double(x) % 11, x) AS s FROM t ORDER BY x",
        "SELECT x, sum(slow_double(x)) OVER (PARTITION BY slow_double(x) % 4) AS s, \
         row_number() OVER (ORDER BY slow_double(x) DESC) AS r FROM t ORDER BY x",
        "SELECT a.x AS l, b.x AS r FROM t a JOIN t b ON slow_double(a.x) = b.x ORDER BY l",
        "SELECT x, CASE WHEN x > 20 THEN slow_double(x) ELSE -1 END AS c FROM t ORDER BY x",
        "SELECT DISTINCT slow_double(x) % 6 AS k FROM t ORDER BY k",
    ];
    for sql in queries {
        let reference = sql.replace("slow_double(", "(2 * ");
        let batches = |q: String| {
            let ctx = ctx.clone();
            async move {
                let frame = ctx.sql(&q).await.map_err(|e| format!("{q}: {e}"))?;
                let batches = frame.collect().await.map_err(|e| format!("{q}: {e}"))?;
                Ok::<_, String>(
                    datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                        .unwrap()
                        .to_string(),
                )
            }
        };
        let want = batches(reference).await.unwrap();
        let got = batches(sql.to_string()).await.unwrap();
        assert_eq!(got, want, "{sql}");
        assert!(want.lines().count() > 4, "{sql} gives rows: {want}");
    }
}

/// An isolated asynchronous function: the worker process makes the calls with the function's
/// limits (chunks, calls in flight, each call's time limit) and answers each batch; results
/// in row order, the limit observed in the worker (reached, not passed), a call past its time
/// limit fails naming it, and a plugin thread that aborts the worker fails the query while
/// the host lives and a new worker answers the next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_asynchronous_functions_run_their_calls_in_the_worker() {
    let _serial = SERIAL.lock().await;
    let library = library();
    let limits = udf_engine::WorkerLimits {
        call_timeout: Duration::from_secs(20),
        memory_mib: None,
        workers: Some(1),
        worker_program: Some(udf_tests::udfsql_worker()),
    };
    let pool = udf_engine::isolation::pool_for(&library, &limits, 1).unwrap();
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
    let x: Int64Array = (0..100).map(|v| (v % 9 != 4).then_some(v)).collect();
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(x)]).unwrap();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    for (name, async_limits) in [
        (
            "slow_double",
            AsyncLimits::new(8, 3, Duration::from_secs(10)),
        ),
        (
            "never_complete",
            AsyncLimits::new(2, 1, Duration::from_millis(300)),
        ),
        (
            "crash_async",
            AsyncLimits::new(2, 1, Duration::from_secs(10)),
        ),
        (
            "async_stats",
            AsyncLimits::new(1, 1, Duration::from_secs(1)),
        ),
    ] {
        let function = library.function_named(name).unwrap();
        let udf = PluginUdf::new(name, function, Volatility::Volatile)
            .with_async_limits(async_limits)
            .with_worker_pool(Arc::clone(&pool));
        assert_eq!(udf.isolation_mode(), "process");
        udf_engine::register_udf(&ctx, udf);
    }
    let query = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let batches = ctx
                .sql(sql)
                .await
                .map_err(|e| e.to_string())?
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<Vec<Option<i64>>, String>(
                batches
                    .iter()
                    .flat_map(|b| {
                        let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                        c.iter().collect::<Vec<_>>()
                    })
                    .collect(),
            )
        }
    };
    query("SELECT async_stats(1)").await.unwrap();
    query("SELECT async_stats(5100)").await.unwrap();
    let got = query("SELECT slow_double(x) FROM t").await.unwrap();
    let want: Vec<Option<i64>> = (0..100).map(|v| (v % 9 != 4).then_some(2 * v)).collect();
    assert_eq!(got, want, "row order and NULLs through the worker");
    assert_eq!(
        query("SELECT async_stats(0)").await.unwrap(),
        vec![Some(8)],
        "the worker had 8 calls in flight at most, and reached it"
    );
    let e = query("SELECT never_complete(x) FROM t").await.unwrap_err();
    assert!(
        e.contains("plugin function never_complete") && e.contains("time limit of 300 ms"),
        "{e}"
    );
    let before = udf_engine::isolation::live_worker_pids();
    let e = query("SELECT crash_async(x) FROM t").await.unwrap_err();
    assert!(
        e.contains("plugin function crash_async") && e.contains("SIGABRT"),
        "{e}"
    );
    let after_crash = udf_engine::isolation::live_worker_pids();
    assert!(
        before.iter().any(|pid| !after_crash.contains(pid)),
        "the crashed worker is gone: {before:?} -> {after_crash:?}"
    );
    let got = query("SELECT slow_double(x) FROM t WHERE x < 5")
        .await
        .unwrap();
    assert_eq!(got, vec![Some(0), Some(2), Some(4), Some(6)]);
}

/// The C example with a thread pool (`tests/fixtures/c/async_pool.c`): the library's own limits
/// are the defaults, its temporary failure is retried, NULL rows stay NULL, an error names the
/// value, and dropping the library joins its threads (the unload hook).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_thread_pool_example_answers_and_retries() {
    let _serial = SERIAL.lock().await;
    let library = PluginLibrary::load(c_library("async_pool", "async_pool.c", &[])).unwrap();
    let defaults = library
        .function_named("pool_lookup")
        .unwrap()
        .async_defaults()
        .unwrap();
    assert_eq!((defaults.max_in_flight, defaults.chunk_rows), (16, 8));
    let defaults = AsyncLimits::from_defaults(defaults);
    assert_eq!((defaults.max_in_flight, defaults.chunk_rows), (16, 8));
    let ctx = session(&library, 100, Some(defaults.with_retries(1)));
    let got = column(&ctx, "SELECT pool_lookup(x) FROM t").await.unwrap();
    assert_eq!(
        got,
        (0..100).map(|x| 10 * x).collect::<Vec<_>>(),
        "13 retried"
    );
    let batches = ctx
        .sql("SELECT pool_lookup(CASE WHEN x % 3 = 0 THEN NULL ELSE x END) AS v FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let values: Vec<Option<i64>> = batches
        .iter()
        .flat_map(|b| {
            let c = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            c.iter().collect::<Vec<_>>()
        })
        .collect();
    let want: Vec<Option<i64>> = (0..100).map(|x| (x % 3 != 0).then_some(10 * x)).collect();
    assert_eq!(values, want);
    let e = column(&ctx, "SELECT pool_lookup(x - 50) FROM t")
        .await
        .unwrap_err();
    assert!(
        e.contains("plugin function pool_lookup") && e.contains("no entry for -"),
        "{e}"
    );
    // Unmapped once dropped: the unload hook returned, so the pool's threads were joined.
    let path = library.path().to_string_lossy().into_owned();
    drop(ctx);
    drop(library);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while mapped(&path) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!mapped(&path), "{path} is unmapped after its unload hook");
}

/// An immutable asynchronous function (`sq_async` of the plain example, `#[udf(async)]`) with
/// constant arguments: called once per batch, its value on every row (DataFusion cannot fold
/// it at planning: the call stays in the plan), beside calls over a column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_arguments_of_an_immutable_asynchronous_function() {
    let _serial = SERIAL.lock().await;
    let plain = PluginLibrary::load(udf_tests::plugin("plain")).unwrap();
    let ctx = session(&plain, 0, None);
    let ctx = {
        // `session` registered plain's functions VOLATILE; this one immutable, as declared.
        let function = plain.function_named("sq_async").unwrap();
        udf_engine::register_udf(
            &ctx,
            PluginUdf::new("sq_async", function, Volatility::Immutable),
        );
        ctx
    };
    let sql = "SELECT sq_async(3) AS a, sq_async(x) AS b, sq_async(x) + sq_async(-2) AS c \
               FROM (VALUES (2), (5), (7)) AS t(x) ORDER BY x";
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    let want = "+---+----+----+\n\
                | a | b  | c  |\n\
                +---+----+----+\n\
                | 9 | 4  | 8  |\n\
                | 9 | 25 | 29 |\n\
                | 9 | 49 | 53 |\n\
                +---+----+----+";
    assert_eq!(text, want);
    let filtered = column(
        &ctx,
        "SELECT x FROM (VALUES (2), (5), (7)) AS t(x) WHERE sq_async(x) > sq_async(4) \
         ORDER BY sq_async(x) + sq_async(1)",
    )
    .await
    .unwrap();
    assert_eq!(filtered, vec![5, 7]);
}
