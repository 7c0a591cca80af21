//! What each protocol of `udfsql-server` costs: the program started on 127.0.0.1 with the HTTP,
//! PostgreSQL and Flight SQL servers, asked by the client crates a user would use (reqwest,
//! tokio-postgres, arrow-flight's Flight SQL client), one after the other.
//!
//! * **Throughput**: a 1,000,000-row result (`n BIGINT`, `sq BIGINT` from the plugin `square`),
//!   read whole; median wall time of `--rounds` runs after one warm-up, as rows per second. HTTP
//!   as an Arrow IPC stream (read and decoded), PostgreSQL with the simple protocol (text rows,
//!   every value parsed) and the extended protocol (binary rows), Flight SQL (`GetFlightInfo` +
//!   `DoGet`, decoded batches).
//! * **Latency** of a one-row plugin query (`SELECT square(7)`, and `square($1)` with a
//!   parameter where the protocol has them), `--queries` sequential queries on one connection
//!   after 20 warm-up queries: p50 and p99.
//!
//! Plugins run in the server's process (`--isolation none`): what is measured is the protocol,
//! not the worker round trip (which isobench measures).
//!
//! `cargo build --release -p udf-protocols --bin udfsql-server && cargo run --release -p
//! udf-benches --bin protobench [-- --rounds N --queries Q]`.

use std::io::BufRead;
use std::time::{Duration, Instant};

use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::array::RecordBatch;
use futures::TryStreamExt;

use crate::{built, profile_dir};

/// The rows of the throughput query.
const ROWS: u64 = 1_000_000;

/// The throughput query.
fn big_query() -> String {
    format!("SELECT value AS n, square(value) AS sq FROM generate_series(1, {ROWS})")
}

/// The running server, killed when dropped.
struct Server {
    child: std::process::Child,
    http: String,
    pg: String,
    flight: String,
    _plugins: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn start() -> Server {
    let program = profile_dir().join("udfsql-server");
    assert!(
        program.exists(),
        "{} is missing: cargo build --release -p udf-protocols --bin udfsql-server",
        program.display()
    );
    let plugins = tempfile::tempdir().expect("tempdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(plugins.path(), std::fs::Permissions::from_mode(0o755)).ok();
        let library = built("udf-plugin-square");
        let copy = plugins.path().join(library.file_name().expect("name"));
        std::fs::copy(&library, &copy).expect("copy the plugin");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).ok();
    }
    let mut child = std::process::Command::new(&program)
        .args(["--addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
        .args(["--flight-addr", "127.0.0.1:0", "--isolation", "none"])
        .args(["--max-result-bytes", "1073741824", "--plugin-dir"])
        .arg(plugins.path())
        .env("UDFSQL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start udfsql-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut http, mut pg, mut flight) = (None, None, None);
    while http.is_none() || pg.is_none() || flight.is_none() {
        let line = lines.next().expect("the server's log ended").expect("log");
        let Some(at) = line.find("127.0.0.1:") else {
            continue;
        };
        let addr: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        if line.contains("PostgreSQL server listening") {
            pg = Some(addr);
        } else if line.contains("Flight SQL server listening") {
            flight = Some(addr);
        } else if line.contains("udfsql-server listening") {
            http = Some(addr);
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        http: http.unwrap_or_default(),
        pg: pg.unwrap_or_default(),
        flight: flight.unwrap_or_default(),
        _plugins: plugins,
    }
}

async fn pg_client(server: &Server) -> tokio_postgres::Client {
    let (host, port) = server.pg.rsplit_once(':').expect("host:port");
    let (client, connection) = tokio_postgres::Config::new()
        .host(host)
        .port(port.parse().expect("port"))
        .user("bench")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

async fn flight_client(server: &Server) -> FlightSqlServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.flight))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    FlightSqlServiceClient::new(channel)
}

async fn flight_rows(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> u64 {
    let info = client
        .execute(sql.to_string(), None)
        .await
        .expect("execute");
    let mut rows = 0;
    for endpoint in info.endpoint {
        let stream = client
            .do_get(endpoint.ticket.expect("ticket"))
            .await
            .expect("do_get");
        let batches: Vec<RecordBatch> = stream.try_collect().await.expect("batches");
        rows += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
    }
    rows
}

async fn http_arrow_rows(http: &reqwest::Client, server: &Server, sql: &str) -> u64 {
    let body = http
        .post(format!("http://{}/query?format=arrow", server.http))
        .body(sql.to_string())
        .send()
        .await
        .expect("POST")
        .bytes()
        .await
        .expect("body");
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)
            .expect("an Arrow IPC stream");
    reader.map(|b| b.expect("batch").num_rows() as u64).sum()
}

/// The median of `values` (sorted here).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `q` quantile of sorted `values`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints its tables.
pub fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |flag: &str, default: usize| -> usize {
        match args.iter().position(|a| a == flag) {
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} takes a number")),
            None => default,
        }
    };
    let rounds = number("--rounds", 5);
    let queries = number("--queries", 1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(rounds.max(1), queries.max(1)));
}

async fn run(rounds: usize, queries: usize) {
    let server = start();
    let http = reqwest::Client::new();
    let pg = pg_client(&server).await;
    let mut flight = flight_client(&server).await;
    let sql = big_query();

    println!("## Throughput: {ROWS} rows (n, square(n)), median of {rounds} after a warm-up\n");
    println!("| protocol | median s | rows/s | vs HTTP Arrow |");
    println!("|---|---:|---:|---:|");
    let mut http_median = 0.0;
    for protocol in [
        "HTTP Arrow IPC",
        "PostgreSQL simple (text)",
        "PostgreSQL extended (binary)",
        "Flight SQL",
    ] {
        let mut times = Vec::new();
        for round in 0..=rounds {
            let started = Instant::now();
            let rows = match protocol {
                "HTTP Arrow IPC" => http_arrow_rows(&http, &server, &sql).await,
                "PostgreSQL simple (text)" => {
                    let mut rows = 0u64;
                    let mut sum = 0i64;
                    for m in pg.simple_query(&sql).await.expect("simple query") {
                        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                            sum = sum.wrapping_add(
                                row.get(1).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0),
                            );
                            rows += 1;
                        }
                    }
                    std::hint::black_box(sum);
                    rows
                }
                "PostgreSQL extended (binary)" => {
                    let all = pg.query(&sql, &[]).await.expect("query");
                    let sum: i64 = all
                        .iter()
                        .map(|r| r.get::<_, i64>(1))
                        .fold(0, i64::wrapping_add);
                    std::hint::black_box(sum);
                    all.len() as u64
                }
                _ => flight_rows(&mut flight, &sql).await,
            };
            assert_eq!(rows, ROWS, "{protocol}");
            if round > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        let m = median(&mut times);
        if protocol == "HTTP Arrow IPC" {
            http_median = m;
        }
        println!(
            "| {protocol} | {m:.3} | {:.0} | {:.2}× |",
            ROWS as f64 / m,
            m / http_median
        );
    }

    println!("\n## Latency: one-row plugin query, {queries} sequential queries after 20 warm-up\n");
    println!("| protocol | query | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|");
    let statement = pg.prepare("SELECT square($1)").await.expect("prepare");
    for (protocol, query) in [
        ("HTTP (JSON)", "SELECT square(7)"),
        ("HTTP (Arrow IPC)", "SELECT square(7)"),
        ("PostgreSQL simple", "SELECT square(7)"),
        ("PostgreSQL extended, prepared", "SELECT square($1)"),
        ("Flight SQL (GetFlightInfo + DoGet)", "SELECT square(7)"),
    ] {
        let mut times = Vec::with_capacity(queries);
        for i in 0..queries + 20 {
            let started = Instant::now();
            match protocol {
                "HTTP (JSON)" => {
                    let text = http
                        .post(format!("http://{}/query", server.http))
                        .body(query)
                        .send()
                        .await
                        .expect("POST")
                        .text()
                        .await
                        .expect("body");
                    assert!(text.contains("49"), "{text}");
                }
                "HTTP (Arrow IPC)" => assert_eq!(http_arrow_rows(&http, &server, query).await, 1),
                "PostgreSQL simple" => {
                    let messages = pg.simple_query(query).await.expect("simple");
                    assert!(
                        messages
                            .iter()
                            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                    );
                }
                "PostgreSQL extended, prepared" => {
                    let rows = pg.query(&statement, &[&7i64]).await.expect("query");
                    assert_eq!(rows[0].get::<_, i64>(0), 49);
                }
                _ => assert_eq!(flight_rows(&mut flight, query).await, 1),
            }
            if i >= 20 {
                times.push(started.elapsed());
            }
        }
        times.sort();
        println!(
            "| {protocol} | `{query}` | {:.3} | {:.3} |",
            quantile(&times, 0.5).as_secs_f64() * 1e3,
            quantile(&times, 0.99).as_secs_f64() * 1e3
        );
    }
    drop(server);
}
