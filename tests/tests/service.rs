//! The HTTP service started on 127.0.0.1:0 in-process (and as the `udfsql-server` program),
//! driven with real HTTP requests.

use std::io::BufRead;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use udf_service::{AppState, Config};
use udf_tests::{TestServer, example_plugin_dir};

/// The service over the example plugins and a `people` CSV table; the table's directory lives
/// as long as the server.
struct Server {
    inner: TestServer,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(configure: impl FnOnce(&mut Config)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("people.csv");
        std::fs::write(&csv, "name,age\nann,34\nbob,27\n").unwrap();
        let mut config = Config {
            plugin_dirs: vec![example_plugin_dir().to_path_buf()],
            tables: vec![("people".to_string(), csv)],
            ..Config::default()
        };
        configure(&mut config);
        Server {
            inner: TestServer::start(config).await,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        self.inner.url(path)
    }

    async fn stop(self) {
        self.inner.stop().await;
    }
}

async fn post_sql(client: &reqwest::Client, server: &Server, sql: &str) -> (u16, Value) {
    let response = client
        .post(server.url("/query"))
        .header("content-type", "text/plain")
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_functions_and_queries() {
    let server = Server::start(|_| {}).await;
    let client = reqwest::Client::new();

    let health: Value = client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok"}));

    let functions: Value = client
        .get(server.url("/functions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let square = functions
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "square")
        .expect("square is served");
    assert_eq!(square["signature"], "square(Int) -> Int");
    assert_eq!(square["abi"], format!("v2.{}", udf_abi::v2::ABI_MINOR));
    assert!(
        square["library"]
            .as_str()
            .unwrap()
            .ends_with("libudf_plugin_square.so")
    );

    // SQL as text.
    let (status, rows) = post_sql(
        &client,
        &server,
        "SELECT name, square(age) AS sq FROM people ORDER BY name",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        rows,
        json!([{"name": "ann", "sq": 1156}, {"name": "bob", "sq": 729}])
    );

    // SQL as JSON.
    let response = client
        .post(server.url("/query"))
        .json(&json!({"sql": "SELECT repeat('ab', 2) AS r, safe_div(7, 2) AS d, coalesce_len(NULL) AS c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let rows: Value = response.json().await.unwrap();
    assert_eq!(rows, json!([{"r": "abab", "d": 3, "c": -1}]));

    // No rows.
    let (status, rows) = post_sql(&client, &server, "SELECT * FROM people WHERE age > 100").await;
    assert_eq!((status, rows), (200, json!([])));
    server.stop().await;
}

/// Functions written in SQL over the service: refused like all DDL, unless the administrator's
/// compile option is set; then created in the shared session (every later request sees them),
/// evaluated isolated like the service's plugins, and dropped; no other DDL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_written_in_sql_only_with_the_admin_option() {
    let create = "CREATE FUNCTION http_twice(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x * 2 $$";
    let client = reqwest::Client::new();
    let server = Server::start(|_| {}).await;
    let (status, error) = post_sql(&client, &server, create).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("DDL"), "{error}");
    server.stop().await;

    let sdk = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../udf-abi");
    let mut options = udf_engine::compile::CompileOptions::new(
        std::fs::canonicalize(sdk).unwrap(),
        udf_tests::fixture_dir().join("compiled"),
    );
    options.offline = true;
    let server = Server::start(|config| {
        config.compile = Some(options);
        // A cold cache builds the SDK's dependencies first.
        config.time_limit = Duration::from_secs(300);
    })
    .await;
    let (status, answer) = post_sql(&client, &server, create).await;
    assert_eq!((status, answer), (200, json!([])));
    let (status, rows) = post_sql(
        &client,
        &server,
        "SELECT http_twice(age) AS t, isolation, language FROM people, plugin_functions \
         WHERE plugin_functions.name = 'http_twice' ORDER BY t",
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(
        rows,
        json!([
            {"t": 54, "isolation": "process", "language": "rust"},
            {"t": 68, "isolation": "process", "language": "rust"}
        ])
    );
    // Only that DDL: no library loaded from SQL, no drop of a plugin's function, no table.
    for (sql, part) in [
        (
            "CREATE FUNCTION r2(s VARCHAR, n BIGINT UNSIGNED) RETURNS VARCHAR LANGUAGE plugin \
             AS 'libudf_plugin_repeat.so'",
            "DDL",
        ),
        ("DROP FUNCTION repeat", "only functions written in SQL"),
        ("CREATE TABLE x AS VALUES (1)", "DDL"),
    ] {
        let (status, error) = post_sql(&client, &server, sql).await;
        assert_eq!(status, 400, "{sql}: {error}");
        assert!(error.to_string().contains(part), "{sql}: {error}");
    }
    let (status, rows) = post_sql(&client, &server, "SELECT repeat('a', 2) AS r").await;
    assert_eq!((status, rows), (200, json!([{"r": "aa"}])));
    // A compile error is the request's error, with the body's position.
    let (status, error) = post_sql(
        &client,
        &server,
        "CREATE FUNCTION http_bad(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\nx + \"a\"\n$$",
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("line 2, column"), "{error}");
    let (status, answer) = post_sql(&client, &server, "DROP FUNCTION http_twice").await;
    assert_eq!((status, answer), (200, json!([])));
    let (status, error) = post_sql(&client, &server, "SELECT http_twice(1)").await;
    assert_eq!(status, 400, "{error}");
    server.stop().await;
}

/// The plugin directory's aggregates (ABI 2.4) are served too, with the service's default
/// process isolation: listed with their kind, their accumulators in worker processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_are_served_isolated() {
    let server = Server::start(|_| {}).await;
    let client = reqwest::Client::new();
    let functions: Value = client
        .get(server.url("/functions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let my_sum = functions
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "my_sum")
        .expect("my_sum is served");
    assert_eq!(my_sum["kind"], "aggregate");
    assert_eq!(my_sum["isolation"], "process");
    let (status, rows) = post_sql(
        &client,
        &server,
        "SELECT my_sum(age) AS s, median_exact(CAST(age AS DOUBLE)) AS m, sum(age) AS b FROM people",
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows, json!([{"s": 61, "m": 30.5, "b": 61}]));
    let (status, rows) = post_sql(
        &client,
        &server,
        "SELECT name, my_sum(age) OVER (ORDER BY name ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS w \
         FROM people ORDER BY name",
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(
        rows,
        json!([{"name": "ann", "w": 34}, {"name": "bob", "w": 61}])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_ipc_stream_output() {
    let server = Server::start(|_| {}).await;
    let client = reqwest::Client::new();
    let body = client
        .post(server.url("/query?format=arrow"))
        .body("SELECT square(value) AS s FROM generate_series(1, 1000)")
        .send()
        .await
        .unwrap();
    assert_eq!(body.headers()["content-type"], udf_service::ARROW_STREAM);
    let bytes = body.bytes().await.unwrap();
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .unwrap();
    let mut sum = 0i64;
    for batch in reader {
        let batch = batch.unwrap();
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap();
        sum += column.values().iter().sum::<i64>();
    }
    assert_eq!(sum, (1..=1000i64).map(|v| v * v).sum::<i64>());
    // The Accept header chooses the same.
    let response = client
        .post(server.url("/query"))
        .header("accept", udf_service::ARROW_STREAM)
        .body("SELECT 1 AS one")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        udf_service::ARROW_STREAM
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_right_status() {
    // The time limit is checked on a server of its own (below): here a loaded machine taking
    // longer over a debug build's query must not turn another error into a timeout.
    let server = Server::start(|c| {
        c.max_body = 4096;
        c.time_limit = Duration::from_secs(60);
        c.memory_limit = 1024 * 1024;
    })
    .await;
    let client = reqwest::Client::new();
    let error = |v: &Value| v["error"].as_str().unwrap().to_string();

    let (status, body) = post_sql(
        &client,
        &server,
        "SELECT safe_div(x, 0) FROM (VALUES (1)) t(x)",
    )
    .await;
    assert_eq!(status, 400);
    assert!(error(&body).contains("division by zero: 1 / 0"), "{body}");

    let (status, body) = post_sql(&client, &server, "SELEC 1").await;
    assert_eq!(status, 400);
    assert!(error(&body).contains("SELEC"), "{body}");

    // Requests cannot load libraries or change anything.
    for sql in [
        "CREATE FUNCTION f(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'",
        "DROP FUNCTION square",
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO '/tmp/udfsql-service-test.csv'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let (status, body) = post_sql(&client, &server, sql).await;
        assert_eq!(status, 400, "{sql}: {body}");
        assert!(error(&body).contains("not supported"), "{sql}: {body}");
    }
    let (_, body) = post_sql(&client, &server, "SELECT square(3) AS s").await;
    assert_eq!(body, json!([{"s": 9}]), "square is still there");

    // Too large.
    let response = client
        .post(server.url("/query"))
        .body(format!("SELECT '{}'", "x".repeat(10_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);

    // Bad JSON.
    let response = client
        .post(server.url("/query"))
        .header("content-type", "application/json")
        .body("{\"query\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);

    // Too big for the memory pool.
    let (status, body) = post_sql(
        &client,
        &server,
        "SELECT value, repeat('x', 200) AS s FROM generate_series(1, 200000) ORDER BY s DESC, value DESC",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error(&body).to_lowercase().contains("resources exhausted"),
        "{body}"
    );
    server.stop().await;

    // Too slow: cancelled at the time limit.
    let server = Server::start(|c| c.time_limit = Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let (status, body) = post_sql(
        &client,
        &server,
        "SELECT count(*) FROM generate_series(1, 100000000000) g WHERE square(value) > 0",
    )
    .await;
    assert_eq!(status, 408, "{body}");
    assert!(error(&body).contains("time limit"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_from_eight_clients() {
    let server = Server::start(|c| c.max_concurrent_queries = 8).await;
    let url = server.url("/query");
    let mut clients = Vec::new();
    for c in 0..8i64 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..25i64 {
                let x = c * 1000 + i;
                let response = client
                    .post(&url)
                    .body(format!("SELECT square({x}) AS s, repeat('ab', {}) AS r, str_len(repeat('é', {i})) AS n", i % 4))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200);
                let rows: Value = response.json().await.unwrap();
                assert_eq!(
                    rows,
                    json!([{"s": x * x, "r": "ab".repeat((i % 4) as usize), "n": i}]),
                    "client {c} request {i}"
                );
            }
            25
        }));
    }
    let mut answered = 0;
    for client in clients {
        answered += client.await.unwrap();
    }
    assert_eq!(answered, 200);
    server.stop().await;
}

/// The service applies udfsql's trust rules to every library of `--plugin-dir`: a library its
/// group could have written refuses the start-up, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_writable_library_in_the_plugin_dir_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    udf_tests::set_mode(&plugins, 0o755);
    let library = plugins.join("libudf_plugin_square.so");
    std::fs::copy(udf_tests::plugin("square"), &library).unwrap();
    udf_tests::set_mode(&library, 0o664);
    let config = || Config {
        plugin_dirs: vec![plugins.clone()],
        ..Config::default()
    };
    let error = AppState::new(config()).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!(
            "{} is writable by its group (mode 0664)",
            library.display()
        )),
        "{message}"
    );

    // The same directory with the library fixed serves it.
    udf_tests::set_mode(&library, 0o644);
    let state = AppState::new(config()).await.unwrap();
    let names: Vec<String> = udf_engine::plugin_functions(state.context())
        .into_iter()
        .map(|f| f.sql_name)
        .collect();
    assert_eq!(names, ["square"]);
}

/// A value arrow cannot display as text (a timestamp outside chrono's range) is a query error in
/// JSON answers, never error text inside the JSON; the Arrow stream carries it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undisplayable_value_is_an_error_not_json_data() {
    let server = Server::start(|_| {}).await;
    let client = reqwest::Client::new();
    let sql = "SELECT arrow_cast(9223372036854775807, 'Timestamp(Second, None)') AS ts";
    let (status, body) = post_sql(&client, &server, sql).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(
            "cannot answer as JSON: cannot display the value in row 1 of column ts (Timestamp(s))"
        ),
        "{error}"
    );
    let response = client
        .post(server.url("/query?format=arrow"))
        .body(sql)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    server.stop().await;
}

/// The `udfsql-server` program on 127.0.0.1 (port chosen by the system), killed when dropped.
struct ServerProcess {
    child: std::process::Child,
    addr: String,
}

impl ServerProcess {
    fn start(args: &[&str]) -> ServerProcess {
        let program = udf_tests::build_workspace().join("udfsql-server");
        let mut child = std::process::Command::new(&program)
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .env("UDFSQL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log for the address, then keeps draining it so that the server never blocks
        // on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("127.0.0.1:")
                    && line.contains("listening")
                    && let Some(tx) = tx.take()
                {
                    let addr: String = line[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    tx.send(addr).ok();
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(e) => {
                child.kill().ok();
                child.wait().ok();
                panic!("udfsql-server did not say where it listens within 30 s: {e}");
            }
        };
        ServerProcess { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// (VmRSS, VmHWM) of the server in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc/PID/status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from the server's status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// Reads `response`'s body chunk by chunk: the bytes received and the transfer error that ended
/// it, if any.
async fn read_body(mut response: reqwest::Response) -> (Vec<u8>, Option<String>) {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return (body, None),
            Err(e) => return (body, Some(format!("{e:?}"))),
        }
    }
}

/// An Arrow IPC answer as a client sees it.
#[derive(Debug, PartialEq)]
struct ArrowAnswer {
    /// The `(column 0, column 1)` Int64 values of the batches arrow's StreamReader read.
    rows: Vec<(i64, Option<i64>)>,
    /// The StreamReader's error, if it stopped at one.
    reader_error: Option<String>,
    /// The [`udf_service::ARROW_ERROR_KEY`] of a schema message after the first.
    error: Option<String>,
    /// Whether the stream ends with the end-of-stream marker.
    end_marker: bool,
}

fn arrow_answer(bytes: &[u8]) -> ArrowAnswer {
    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::ipc;
    let reader = ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .expect("an Arrow IPC stream");
    let mut rows = Vec::new();
    let mut reader_error = None;
    for batch in reader {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                reader_error = Some(e.to_string());
                break;
            }
        };
        let first = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("column 0 is Int64");
        let second = (batch.num_columns() > 1).then(|| {
            batch
                .column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("column 1 is Int64")
                .clone()
        });
        for row in 0..batch.num_rows() {
            rows.push((first.value(row), second.as_ref().map(|c| c.value(row))));
        }
    }
    // The messages one by one: continuation marker, metadata length, metadata, body.
    let mut error = None;
    let mut end_marker = false;
    let mut at = 0;
    while at < bytes.len() {
        assert_eq!(
            bytes[at..at + 4],
            [0xff; 4],
            "a continuation marker at {at}"
        );
        let length = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if length == 0 {
            end_marker = true;
            assert_eq!(at + 8, bytes.len(), "bytes after the end-of-stream marker");
            break;
        }
        let message = ipc::root_as_message(&bytes[at + 8..at + 8 + length]).expect("a message");
        if at > 0
            && let Some(schema) = message.header_as_schema()
        {
            let schema = ipc::convert::fb_to_schema(schema);
            error = schema.metadata().get(udf_service::ARROW_ERROR_KEY).cloned();
        }
        at += 8 + length + message.bodyLength() as usize;
    }
    ArrowAnswer {
        rows,
        reader_error,
        error,
        end_marker,
    }
}

/// A client asks the `udfsql-server` program, with its default limits, for five billion rows:
/// the answer comes at once, streamed, ends with the limit's error, and the server's memory
/// stays small. As JSON and as Arrow IPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_billion_rows_are_refused_promptly_in_bounded_memory() {
    let server = ServerProcess::start(&["--plugin-dir", &example_plugin_dir().to_string_lossy()]);
    let client = reqwest::Client::new();
    let (_, start_hwm) = server.memory_kib();
    let sql = "SELECT * FROM generate_series(1, 5000000000)";
    let default_rows = udf_service::DEFAULT_MAX_RESULT_ROWS as usize;

    let started = Instant::now();
    let response = client
        .post(server.url("/query"))
        .body(sql)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    let elapsed = started.elapsed();
    assert_eq!(transfer_error, None);
    let rows: Vec<Value> = serde_json::from_slice(&body).expect("the answer is a JSON array");
    assert_eq!(rows.len(), default_rows + 1);
    // Distinct rows of the series (their order depends on the partitions' interleaving).
    let values: std::collections::HashSet<i64> = rows[..default_rows]
        .iter()
        .map(|row| {
            assert_eq!(row.as_object().map(|o| o.len()), Some(1), "{row}");
            row["value"].as_i64().unwrap_or_else(|| panic!("{row}"))
        })
        .collect();
    assert_eq!(values.len(), default_rows);
    assert!(values.iter().all(|v| (1..=5_000_000_000).contains(v)));
    let last = rows.last().unwrap();
    let error = last["error"]
        .as_str()
        .expect("the last element is the error");
    assert_eq!(last.as_object().unwrap().len(), 1, "{last}");
    assert!(
        error.contains(&format!("more than {default_rows} rows"))
            && error.contains("max-result-rows"),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");

    // As Arrow IPC: the batches up to the limit, then the error that every reader fails on.
    let response = client
        .post(server.url("/query?format=arrow"))
        .body(sql)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    let answer = arrow_answer(&body);
    assert!(!answer.end_marker);
    assert_eq!(answer.rows.len(), default_rows);
    let values: std::collections::HashSet<i64> = answer.rows.iter().map(|r| r.0).collect();
    assert_eq!(values.len(), default_rows);
    assert!(values.iter().all(|v| (1..=5_000_000_000).contains(v)));
    assert!(
        answer
            .error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("more than {default_rows} rows"))),
        "{:?}",
        answer.error
    );
    assert!(answer.reader_error.is_some());
    assert!(started.elapsed() < Duration::from_secs(40));

    // The result was never held: the server's peak grew by far less than one million rows as
    // JSON (about 17 MB), let alone five billion.
    let (rss, hwm) = server.memory_kib();
    assert!(
        hwm < start_hwm + 64 * 1024,
        "the server's peak memory grew from {start_hwm} KiB to {hwm} KiB (now {rss} KiB)"
    );

    // It still answers.
    let (status, body) = post_sql_to(&client, &server.url("/query"), "SELECT square(4) AS s").await;
    assert_eq!((status, body), (200, json!([{"s": 16}])));
}

async fn post_sql_to(client: &reqwest::Client, url: &str, sql: &str) -> (u16, Value) {
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

/// `{"v": i, "sq": i * i, "s": "row \"i\""}` for `i` in `1..=n`: what the JSON test query answers.
/// The rows of an answer cut at a limit: `n` distinct rows of the query over `generate_series`,
/// each consistent (`sq` = `v`², `s` names `v`). Which rows come first depends on how the
/// partitions' batches interleave, so the order and the values are not fixed.
fn assert_cut_json_rows(rows: &[Value], n: usize) {
    assert_eq!(rows.len(), n);
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let v = row["v"].as_i64().unwrap_or_else(|| panic!("{row}"));
        assert_eq!(
            row,
            &json!({"v": v, "sq": v * v, "s": format!("row \"{v}\"")})
        );
        assert!(seen.insert(v), "row {v} twice");
    }
}

/// The Arrow twin of [`assert_cut_json_rows`].
fn assert_cut_arrow_rows(rows: &[(i64, Option<i64>)], n: usize) {
    assert_eq!(rows.len(), n);
    let mut seen = std::collections::HashSet::new();
    for &(v, sq) in rows {
        assert_eq!(sq, Some(v * v), "row {v}");
        assert!(seen.insert(v), "row {v} twice");
    }
}

fn expected_json_rows(n: i64) -> Vec<Value> {
    (1..=n)
        .map(|i| json!({"v": i, "sq": i * i, "s": format!("row \"{i}\"")}))
        .collect()
}

/// A mid-sized JSON answer streams whole and equal to its rows; past `max_result_rows` the array
/// holds exactly that many rows and then the error, and stays valid JSON; past
/// `max_result_bytes`, the same for bytes. Limits passed before anything was sent are 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_stream_and_end_with_the_limit_error() {
    let server = Server::start(|c| {
        c.max_result_rows = 20_000;
        c.max_result_bytes = 4 * 1024 * 1024;
    })
    .await;
    let client = reqwest::Client::new();
    let url = server.url("/query");
    let query = |n: u64| {
        format!(
            "SELECT value AS v, square(value) AS sq, concat('row \"', value, '\"') AS s \
             FROM generate_series(1, {n}) ORDER BY v"
        )
    };

    // Exactly at the limit: all rows, several batches and many chunks.
    let (status, body) = post_sql_to(&client, &url, &query(20_000)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, Value::Array(expected_json_rows(20_000)));

    // Past it: the rows that fit, then the error as the last element.
    let response = client
        .post(&url)
        .body(
            "SELECT value AS v, square(value) AS sq, concat('row \"', value, '\"') AS s \
             FROM generate_series(1, 5000000000)",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    let mut rows: Vec<Value> = serde_json::from_slice(&body).expect("valid JSON");
    let last = rows.pop().unwrap();
    assert_cut_json_rows(&rows, 20_000);
    let error = last["error"].as_str().unwrap_or_else(|| panic!("{last}"));
    assert!(error.contains("more than 20000 rows"), "{error}");

    // Past the bytes limit: whole chunks within it, then the error.
    let response = client
        .post(&url)
        .body("SELECT lpad('', 1000, 'x') AS s FROM generate_series(1, 15000)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    let mut rows: Vec<Value> = serde_json::from_slice(&body).expect("valid JSON");
    let last = rows.pop().unwrap();
    let error = last["error"].as_str().unwrap_or_else(|| panic!("{last}"));
    assert!(
        error.contains(&format!("larger than {} bytes as JSON", 4 * 1024 * 1024))
            && error.contains("max-result-bytes"),
        "{error}"
    );
    let row = json!({"s": "x".repeat(1000)});
    assert!(!rows.is_empty() && rows.iter().all(|r| r == &row));
    let tail = serde_json::to_vec(&last).unwrap().len() + 3;
    assert!(
        body.len() - tail <= 4 * 1024 * 1024,
        "{} bytes before the error",
        body.len() - tail
    );
    server.stop().await;

    // Limits passed by the first batch: nothing was sent, so the answer is a 413.
    let server = Server::start(|c| {
        c.max_result_rows = 1000;
        c.max_result_bytes = 100_000;
    })
    .await;
    let url = server.url("/query");
    let (status, body) = post_sql_to(
        &client,
        &url,
        "SELECT * FROM generate_series(1, 5000000000)",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("more than 1000 rows"),
        "{body}"
    );
    let (status, body) = post_sql_to(&client, &url, "SELECT lpad('', 200000, 'x') AS s").await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("larger than 100000 bytes as JSON"),
        "{body}"
    );
    // Within the limits, and no rows at all.
    let (status, body) = post_sql_to(&client, &url, "SELECT * FROM generate_series(1, 1000)").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().map(Vec::len), Some(1000));
    let (status, body) = post_sql_to(
        &client,
        &url,
        "SELECT * FROM generate_series(1, 10) WHERE value > 10",
    )
    .await;
    assert_eq!((status, body), (200, json!([])));
    server.stop().await;
}

/// A streamed Arrow IPC answer decodes with arrow's StreamReader; past the limit it holds exactly
/// the rows that fit, then a schema message carrying the error (on which the reader fails) and
/// no end-of-stream marker; a limit passed by the first batch is a 413 with a JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_answers_stream_and_are_cut_at_the_limit() {
    let server = Server::start(|c| c.max_result_rows = 20_000).await;
    let client = reqwest::Client::new();
    let url = server.url("/query?format=arrow");

    let response = client
        .post(&url)
        .body("SELECT value AS v, square(value) AS sq FROM generate_series(1, 20000) ORDER BY v")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    let expected: Vec<(i64, Option<i64>)> = (1..=20_000).map(|i| (i, Some(i * i))).collect();
    assert_eq!(
        arrow_answer(&body),
        ArrowAnswer {
            rows: expected,
            reader_error: None,
            error: None,
            end_marker: true
        }
    );

    let response = client
        .post(&url)
        .body("SELECT value AS v, square(value) AS sq FROM generate_series(1, 5000000000)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    let answer = arrow_answer(&body);
    assert_cut_arrow_rows(&answer.rows, 20_000);
    assert!(!answer.end_marker);
    assert_eq!(
        answer.reader_error.as_deref(),
        Some("Ipc error: Expected a record batch, but found a schema")
    );
    let error = answer.error.expect("the error message");
    assert!(
        error.contains("more than 20000 rows") && error.contains("max-result-rows"),
        "{error}"
    );

    // An answer of no rows: the schema and the end-of-stream marker.
    let response = client
        .post(&url)
        .body("SELECT value AS v FROM generate_series(1, 10) WHERE value > 10")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (body, transfer_error) = read_body(response).await;
    assert_eq!(transfer_error, None);
    assert_eq!(
        arrow_answer(&body),
        ArrowAnswer {
            rows: Vec::new(),
            reader_error: None,
            error: None,
            end_marker: true
        }
    );
    server.stop().await;

    let server = Server::start(|c| c.max_result_rows = 1000).await;
    let response = client
        .post(server.url("/query?format=arrow"))
        .body("SELECT * FROM generate_series(1, 5000000000)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("more than 1000 rows"),
        "{body}"
    );
    server.stop().await;
}

/// Starts a query that streams rows without end and returns once its answer has started; its
/// client does not read, so the query holds its place.
async fn start_endless_answer(url: &str) -> reqwest::Response {
    // A client of its own: its own connection.
    let response = reqwest::Client::new()
        .post(url)
        .body("SELECT value FROM generate_series(1, 9000000000000000000)")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response
}

/// Whether `response` is the refusal of a query over the concurrency limit.
fn refused(response: &reqwest::Response) -> bool {
    response.status().as_u16() == 503
        && response.headers().get("retry-after").map(|v| v.as_bytes()) == Some(b"1")
}

/// Asks `SELECT 1` every `pause` until it is answered (every answer before must be the
/// concurrency refusal), failing with `why` once `deadline` has passed; the answer's rows.
async fn answered_before(
    client: &reqwest::Client,
    url: &str,
    deadline: Instant,
    pause: Duration,
    why: &str,
) -> Value {
    loop {
        let response = client
            .post(url)
            .body("SELECT 1 AS one")
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 200 {
            return response.json::<Value>().await.unwrap();
        }
        assert!(refused(&response), "{:?}", response.status());
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(pause).await;
    }
}

/// A query over `max_concurrent_queries` is answered 503 with `Retry-After` at once; a place is
/// given back when a client goes away mid-answer, and when the time limit passes for a client
/// that stopped reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_the_concurrency_limit_are_refused_at_once() {
    let time_limit = Duration::from_secs(6);
    let server = Server::start(|c| {
        c.max_concurrent_queries = 2;
        c.max_result_rows = u64::MAX;
        c.max_result_bytes = u64::MAX;
        c.time_limit = time_limit;
    })
    .await;
    let url = server.url("/query");
    let client = reqwest::Client::new();

    let a = start_endless_answer(&url).await;
    let b_started = Instant::now();
    let b = start_endless_answer(&url).await;
    let asked = Instant::now();
    let response = client
        .post(&url)
        .body("SELECT 1 AS one")
        .send()
        .await
        .unwrap();
    assert!(refused(&response), "{:?}", response.status());
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("max-concurrent-queries"),
        "{body}"
    );

    // A's client goes away mid-answer: its place is free again well before the time limit.
    drop(a);
    let answered = answered_before(
        &client,
        &url,
        Instant::now() + Duration::from_secs(3),
        Duration::from_millis(50),
        "the place of a client that went away was not given back",
    )
    .await;
    assert_eq!(answered, json!([{"one": 1}]));

    // C takes the free place; B's client still holds its connection but does not read: its place
    // comes back at its time limit, not before.
    let c = start_endless_answer(&url).await;
    let answered = answered_before(
        &client,
        &url,
        b_started + time_limit + Duration::from_secs(4),
        Duration::from_millis(100),
        "the place of a client that stopped reading was not given back at the time limit",
    )
    .await;
    assert_eq!(answered, json!([{"one": 1}]));
    assert!(
        b_started.elapsed() >= time_limit - Duration::from_millis(500),
        "a place came back after {:?}, before B's time limit",
        b_started.elapsed()
    );
    drop(b);
    drop(c);
    server.stop().await;
}

/// An asynchronous function (`udf-plugins/http`) served with the service's defaults (process
/// isolation: the worker makes the calls): answers from a local HTTP server, in row order, and
/// an error naming the function and the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_functions_are_served_isolated() {
    let web = udf_tests::http_server::Server::start().await;
    let plugins = tempfile::Builder::new()
        .prefix("service-async-")
        .tempdir_in(udf_tests::fixture_dir())
        .unwrap();
    udf_tests::set_mode(plugins.path(), 0o755);
    let library = udf_tests::plugin("http");
    let copy = plugins.path().join(library.file_name().unwrap());
    std::fs::copy(&library, &copy).unwrap();
    udf_tests::set_mode(&copy, 0o644);
    let dir = plugins.path().to_path_buf();
    let server = Server::start(|config| config.plugin_dirs = vec![dir]).await;
    let client = reqwest::Client::new();
    let sql = format!(
        "SELECT v, http_get('{}' || v || '?delay_ms=30') AS body FROM (VALUES ('a'), ('b'), \
         ('c'), ('d')) AS t(v) ORDER BY v",
        web.url("/echo/")
    );
    let (status, rows) = post_sql(&client, &server, &sql).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(
        rows,
        json!([
            {"v": "a", "body": "a"},
            {"v": "b", "body": "b"},
            {"v": "c", "body": "c"},
            {"v": "d", "body": "d"}
        ])
    );
    assert!(
        web.seen
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
    let missing = web.url("/status/404");
    let (status, error) =
        post_sql(&client, &server, &format!("SELECT http_get('{missing}')")).await;
    assert_ne!(status, 200);
    let message = error.to_string();
    assert!(
        message.contains("http_get") && message.contains("HTTP 404"),
        "{message}"
    );
    server.stop().await;
}
