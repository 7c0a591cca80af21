//! `#[udf(async)]` (the Rust SDK's asynchronous functions) through the example plugin
//! `udf-plugins/http`, against a real HTTP server on 127.0.0.1 started by each test: answers in
//! row order with NULLs and errors, the in-flight limit seen by the server (reached, never
//! passed), time limits that close the requests at the server, and the library unmapped (its
//! runtime's threads gone) once dropped.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::Volatility;
use datafusion::prelude::{SessionConfig, SessionContext};
use tokio::net::TcpListener;
use udf_engine::{AsyncLimits, PluginLibrary, PluginUdf};
use udf_tests::http_server::Server;

/// One test at a time: the unload test looks at the process's threads and mappings.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn http_library() -> Arc<PluginLibrary> {
    PluginLibrary::load(udf_tests::plugin("http")).expect("load the http example plugin")
}

/// A one-partition session with `t(id, url)`: `rows` rows, `url(id)` for each (`None`: NULL),
/// and the library's functions registered with `limits` (the library's defaults if `None`).
fn session(
    library: &Arc<PluginLibrary>,
    rows: i64,
    url: impl Fn(i64) -> Option<String>,
    limits: Option<AsyncLimits>,
) -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("url", DataType::Utf8, true),
    ]));
    let ids = Int64Array::from_iter_values(0..rows);
    let urls: StringArray = (0..rows).map(&url).collect();
    let batch =
        RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids), Arc::new(urls)]).unwrap();
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

/// The first column of `sql`'s answer as text (`None` for NULL).
async fn strings(ctx: &SessionContext, sql: &str) -> Result<Vec<Option<String>>, String> {
    let batches = ctx
        .sql(sql)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in &batches {
        let column = datafusion::arrow::compute::cast(batch.column(0), &DataType::Utf8).unwrap();
        let column = column.as_string::<i32>();
        out.extend((0..column.len()).map(|i| column.is_valid(i).then(|| column.value(i).into())));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_in_row_order_with_nulls_and_the_server_sees_the_in_flight_limit() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    assert!(
        library
            .function_named("http_get")
            .unwrap()
            .async_defaults()
            .is_some(),
        "http_get is asynchronous"
    );
    let url = |id: i64| (id % 7 != 3).then(|| server.url(&format!("/echo/r{id}?delay_ms=600")));
    let limits = AsyncLimits::new(8, 1, Duration::from_secs(30));
    let ctx = session(&library, 64, url, Some(limits));
    let got = strings(&ctx, "SELECT http_get(url) FROM t").await.unwrap();
    let want: Vec<Option<String>> = (0..64)
        .map(|id| (id % 7 != 3).then(|| format!("r{id}")))
        .collect();
    assert_eq!(got, want, "answers in row order, NULL urls give NULL");
    let requests = server.seen.requests.load(SeqCst);
    assert_eq!(
        requests,
        want.iter().flatten().count(),
        "no request for a NULL"
    );
    assert_eq!(
        server.seen.max_in_flight.load(SeqCst),
        8,
        "the server saw the limit of 8 requests at once, reached and not passed"
    );

    // The host's default (64) with the library's defaults; chunks of 5 rows per call (the rows
    // of a call run concurrently in the plugin).
    let server = Server::start().await;
    let url = |id: i64| Some(server.url(&format!("/echo/d{id}?delay_ms=600")));
    let ctx = session(&library, 200, url, None);
    let got = strings(&ctx, "SELECT http_get(url) FROM t").await.unwrap();
    assert_eq!(
        got,
        (0..200)
            .map(|id| Some(format!("d{id}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(server.seen.max_in_flight.load(SeqCst), 64);
    let server = Server::start().await;
    let url = |id: i64| Some(server.url(&format!("/echo/c{id}?delay_ms=600")));
    let ctx = session(
        &library,
        40,
        url,
        Some(AsyncLimits::new(2, 5, Duration::from_secs(30))),
    );
    let got = strings(&ctx, "SELECT http_get(url) FROM t").await.unwrap();
    assert_eq!(
        got,
        (0..40).map(|id| Some(format!("c{id}"))).collect::<Vec<_>>()
    );
    assert_eq!(
        server.seen.max_in_flight.load(SeqCst),
        10,
        "2 calls of 5 rows, each row's request at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lookups_constants_and_filters() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let ctx = session(
        &library,
        6,
        |id| Some(server.url(&format!("/json/{id}"))),
        None,
    );
    let got = strings(&ctx, "SELECT http_get_json(url, '/name') FROM t")
        .await
        .unwrap();
    assert_eq!(
        got,
        (0..6)
            .map(|id| Some(format!("user-{id}")))
            .collect::<Vec<_>>()
    );
    let got = strings(
        &ctx,
        "SELECT http_get_json(url, '/address/city') || ':' || http_get_json(url, '/n') FROM t",
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        (0..6)
            .map(|id| Some(format!("c{id}:{}", id * 2)))
            .collect::<Vec<_>>()
    );
    // A pointer that finds nothing is NULL.
    let got = strings(&ctx, "SELECT http_get_json(url, '/nothing') FROM t")
        .await
        .unwrap();
    assert_eq!(got, vec![None; 6]);
    // In a filter, and with a constant argument.
    let got = strings(
        &ctx,
        "SELECT id FROM t WHERE http_get_json(url, '/name') IN ('user-2', 'user-5') ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(got, vec![Some("2".to_string()), Some("5".to_string())]);
    let constant = server.url("/echo/same");
    let got = strings(&ctx, &format!("SELECT http_get('{constant}') FROM t"))
        .await
        .unwrap();
    assert_eq!(got, vec![Some("same".to_string()); 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_function_and_the_url_and_the_session_goes_on() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let ctx = session(&library, 1, |_| None, None);
    for (path, expected) in [
        ("/status/404", "HTTP 404 Not Found".to_string()),
        ("/status/503", "HTTP 503 Service Unavailable".to_string()),
        ("/big", "over the 1048576-byte limit".to_string()),
        ("/bytes", "the body is not UTF-8".to_string()),
    ] {
        let url = server.url(path);
        let error = strings(&ctx, &format!("SELECT http_get('{url}') FROM t"))
            .await
            .unwrap_err();
        assert!(
            error.contains("plugin function http_get")
                && error.contains(&format!("GET {url}"))
                && error.contains(&expected),
            "{path}: {error}"
        );
    }
    let error = strings(
        &ctx,
        &format!(
            "SELECT http_get_json('{}', '/a') FROM t",
            server.url("/echo/x")
        ),
    )
    .await
    .unwrap_err();
    assert!(
        error.contains("http_get_json") && error.contains("not JSON"),
        "{error}"
    );
    // Nobody listens here: the connection is refused.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let error = strings(&ctx, &format!("SELECT http_get('{nowhere}') FROM t"))
        .await
        .unwrap_err();
    assert!(
        error.contains("http_get") && error.contains(&format!("GET {nowhere}")),
        "{error}"
    );
    let got = strings(
        &ctx,
        &format!("SELECT http_get('{}') FROM t", server.url("/echo/fine")),
    )
    .await
    .unwrap();
    assert_eq!(got, vec![Some("fine".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_time_limit_fails_and_its_request_is_closed_at_the_server() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let ctx = session(
        &library,
        4,
        |id| Some(server.url(&format!("/echo/{id}?delay_ms=20000"))),
        // Long enough for all four requests to reach the server first on a loaded machine.
        Some(AsyncLimits::new(8, 1, Duration::from_secs(2))),
    );
    let started = Instant::now();
    let error = strings(&ctx, "SELECT http_get(url) FROM t")
        .await
        .unwrap_err();
    assert!(
        error.contains("plugin function http_get") && error.contains("time limit of 2000 ms"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The cancel reached the plugin's futures: their requests are dropped, so the server sees
    // its clients go away long before the 20 s it would wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.seen.abandoned.load(SeqCst) < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.seen.abandoned.load(SeqCst),
        4,
        "every request of the cancelled calls was closed at the server (requests seen: {})",
        server.seen.requests.load(SeqCst)
    );
}

/// The threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Whether `/proc/self/maps` maps `path`: the file, or the sealed in-memory copy the engine
/// maps (`/memfd:PATH (deleted)`).
fn mapped(path: &std::path::Path) -> bool {
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| l.contains(&*path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_library_stops_its_runtime_and_is_unmapped() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    // A copy under a name of its own, so that no other library in the process is this file.
    let copy = udf_tests::fixture_dir().join(format!(
        "libudf_plugin_http_unload_{}.so",
        std::process::id()
    ));
    std::fs::copy(udf_tests::plugin("http"), &copy).unwrap();
    for round in 0..3 {
        {
            let library = PluginLibrary::load(&copy).unwrap();
            let ctx = session(
                &library,
                30,
                |id| Some(server.url(&format!("/echo/u{id}?delay_ms=5"))),
                None,
            );
            let got = strings(&ctx, "SELECT http_get(url) FROM t").await.unwrap();
            assert_eq!(got.len(), 30);
            assert!(mapped(&copy));
            assert!(
                threads_named("udf-async") > 0,
                "round {round}: the library's runtime runs"
            );
        }
        // The last reference may be dropped by a reaper thread just after the query.
        let deadline = Instant::now() + Duration::from_secs(10);
        while (mapped(&copy) || threads_named("udf-async") > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !mapped(&copy),
            "round {round}: the library is unmapped once dropped (no thread-local destructor \
             of it is left on a host thread)"
        );
        assert_eq!(
            threads_named("udf-async"),
            0,
            "round {round}: the runtime's threads ended"
        );
    }
    std::fs::remove_file(&copy).ok();
}

/// Temporary failures (`udf_abi::Retryable`: HTTP 503 here) are retried as the function's
/// `retries` say, and only those: the server counts the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failures_are_retried_as_many_times_as_allowed() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let limits =
        |retries| Some(AsyncLimits::new(4, 1, Duration::from_secs(30)).with_retries(retries));
    // Each row fails twice, then answers: three retries are enough.
    let ctx = session(
        &library,
        6,
        |id| Some(server.url(&format!("/flaky/a{id}?fail=2"))),
        limits(3),
    );
    let got = strings(&ctx, "SELECT http_get(url) FROM t").await.unwrap();
    assert_eq!(
        got,
        (0..6).map(|id| Some(format!("a{id}"))).collect::<Vec<_>>()
    );
    assert_eq!(server.seen.requests.load(SeqCst), 18, "3 attempts per row");
    // One retry is not enough: the error says so, with the last failure.
    let ctx = session(
        &library,
        1,
        |id| Some(server.url(&format!("/flaky/b{id}?fail=2"))),
        limits(1),
    );
    let error = strings(&ctx, "SELECT http_get(url) FROM t")
        .await
        .unwrap_err();
    assert!(
        error.contains("plugin function http_get")
            && error.contains("HTTP 503")
            && error.contains("still after 1 retry"),
        "{error}"
    );
    // Without retries (the default), a temporary failure fails at once, saying how to retry;
    // an error that is not temporary is never retried.
    let before = server.seen.requests.load(SeqCst);
    let ctx = session(
        &library,
        1,
        |id| Some(server.url(&format!("/flaky/c{id}?fail=1"))),
        None,
    );
    let error = strings(&ctx, "SELECT http_get(url) FROM t")
        .await
        .unwrap_err();
    assert!(error.contains("has no retries: #retries=N"), "{error}");
    let ctx = session(&library, 1, |_| Some(server.url("/status/404")), limits(5));
    let error = strings(&ctx, "SELECT http_get(url) FROM t")
        .await
        .unwrap_err();
    assert!(
        error.contains("HTTP 404") && !error.contains("retr"),
        "{error}"
    );
    assert_eq!(
        server.seen.requests.load(SeqCst),
        before + 2,
        "one attempt each"
    );
}

/// A query dropped by its caller (what Ctrl-C in the shell and the service's time limit do)
/// cancels its outstanding calls: the plugin's requests are closed at the server at once, long
/// before their answers would come, and the library can be dropped afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_query_closes_its_requests_at_the_server() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let ctx = session(
        &library,
        6,
        |id| Some(server.url(&format!("/echo/{id}?delay_ms=30000"))),
        Some(AsyncLimits::new(4, 1, Duration::from_secs(60))),
    );
    let started = Instant::now();
    // Dropped once the server has seen the 4 requests the in-flight limit lets start.
    let mut query = Box::pin(strings(&ctx, "SELECT http_get(url) FROM t"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.seen.requests.load(SeqCst) < 4 {
        tokio::select! {
            outcome = &mut query => panic!("the query ended before it was dropped: {outcome:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the server saw {} requests in 10 s",
            server.seen.requests.load(SeqCst)
        );
    }
    drop(query);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.seen.abandoned.load(SeqCst) < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.seen.abandoned.load(SeqCst),
        4,
        "the 4 requests in flight were closed (requests seen: {})",
        server.seen.requests.load(SeqCst)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        server.seen.requests.load(SeqCst),
        4,
        "no call started after the drop"
    );
}

/// The vectorised form (`#[udf(async, vectorized)]`, `http_status`): whole columns per call
/// (the library asks for 64 rows per call), the requests of a call sent at once, NULLs kept,
/// answers in row order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vectorised_form_takes_whole_columns() {
    let _serial = SERIAL.lock().await;
    let server = Server::start().await;
    let library = http_library();
    let function = library.function_named("http_status").unwrap();
    let defaults = function.async_defaults().unwrap();
    assert_eq!((defaults.max_in_flight, defaults.chunk_rows), (0, 64));
    let path = |id: i64| match id % 4 {
        0 => Some(format!("/echo/v{id}?delay_ms=600")),
        1 => Some("/status/404?delay_ms=600".to_string()),
        2 => Some("/status/503?delay_ms=600".to_string()),
        _ => None,
    };
    let ctx = session(&library, 100, |id| path(id).map(|p| server.url(&p)), None);
    let got = strings(&ctx, "SELECT http_status(url) FROM t")
        .await
        .unwrap();
    let want: Vec<Option<String>> = (0..100)
        .map(|id| match id % 4 {
            0 => Some("200".to_string()),
            1 => Some("404".to_string()),
            2 => Some("503".to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        server.seen.requests.load(SeqCst),
        75,
        "no request for a NULL"
    );
    assert_eq!(
        server.seen.max_in_flight.load(SeqCst),
        75,
        "two calls (64 + 36 rows), every request of both at once"
    );
}
