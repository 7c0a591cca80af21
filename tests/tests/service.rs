//! The HTTP service started on 127.0.0.1:0 in-process, driven with real HTTP requests.

use std::time::Duration;

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
    assert_eq!(square["abi"], "v2.2");
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
    let server = Server::start(|c| {
        c.max_body = 4096;
        c.time_limit = Duration::from_millis(300);
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

    // Too slow: cancelled at the time limit.
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_from_eight_clients() {
    let server = Server::start(|_| {}).await;
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
