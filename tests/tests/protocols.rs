//! The `udfsql-server` program's PostgreSQL and Flight SQL servers, on 127.0.0.1 (ports chosen by
//! the system), asked by client crates written elsewhere: `tokio-postgres` (simple and extended
//! protocol, SCRAM, TLS through `tokio-postgres-rustls`, cancel requests) and arrow-flight's
//! Flight SQL client (handshake, statements, prepared statements with parameters, metadata).
//! Plugin functions run isolated (the server's default): a plugin that aborts fails its query
//! and the server answers the next one.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::FlightInfo;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetTables, SqlInfo};
use futures::TryStreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A directory with the example plugins and `faulty.c` built with `-DABORT` (`fault(BIGINT)`
/// aborts its process, `ok(BIGINT)` returns x + 1).
fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("protocols-")
        .tempdir_in(udf_tests::fixture_dir())
        .unwrap();
    udf_tests::set_mode(dir.path(), 0o755);
    let mut libraries: Vec<PathBuf> = std::fs::read_dir(udf_tests::example_plugin_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    libraries.push(udf_tests::faulty("ABORT"));
    for library in libraries {
        let copy = dir.path().join(library.file_name().unwrap());
        std::fs::copy(&library, &copy).unwrap();
        udf_tests::set_mode(&copy, 0o644);
    }
    dir
}

/// A users file (mode 600) with `alice:wonderland` and `bob:builder`.
fn users_file(dir: &Path) -> PathBuf {
    let file = dir.join("users");
    std::fs::write(&file, "# test users\nalice:wonderland\nbob:builder\n").unwrap();
    udf_tests::set_mode(&file, 0o600);
    file
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate file, key file, PEM).
fn certificate(dir: &Path) -> (PathBuf, PathBuf, String) {
    let key =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = key.cert.pem();
    let cert = dir.join("cert.pem");
    let private = dir.join("key.pem");
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&private, key.signing_key.serialize_pem()).unwrap();
    udf_tests::set_mode(&private, 0o600);
    (cert, private, cert_pem)
}

/// The program, killed when dropped, with the addresses its log names.
struct Server {
    child: std::process::Child,
    pg: Option<String>,
    flight: Option<String>,
    _plugins: tempfile::TempDir,
}

impl Server {
    /// Starts `udfsql-server` with the plugin directory, the PostgreSQL and Flight SQL servers on
    /// 127.0.0.1 and `args`.
    fn start(args: &[&str]) -> Server {
        let plugins = plugin_dir();
        let program = udf_tests::build_workspace().join("udfsql-server");
        let mut child = std::process::Command::new(&program)
            .args(["--addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0"])
            .args(["--flight-addr", "127.0.0.1:0", "--plugin-dir"])
            .arg(plugins.path())
            .args(args)
            .env("UDFSQL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                for (what, marker) in [
                    ("pg", "PostgreSQL server listening"),
                    ("flight", "Flight SQL server listening"),
                ] {
                    if line.contains(marker)
                        && let Some(at) = line.find("127.0.0.1:")
                    {
                        let addr: String = line[at..]
                            .chars()
                            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                            .collect();
                        tx.send((what, addr)).ok();
                    }
                }
            }
        });
        let (mut pg, mut flight) = (None, None);
        while pg.is_none() || flight.is_none() {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(("pg", addr)) => pg = Some(addr),
                Ok((_, addr)) => flight = Some(addr),
                Err(e) => {
                    child.kill().ok();
                    child.wait().ok();
                    panic!("udfsql-server did not say where it listens within 60 s: {e}");
                }
            }
        }
        Server {
            child,
            pg,
            flight,
            _plugins: plugins,
        }
    }

    fn pg_config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let (host, port) = self.pg.as_deref().unwrap().rsplit_once(':').unwrap();
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port.parse().unwrap())
            .user(user)
            .password(password)
            .dbname("udfsql")
            .connect_timeout(Duration::from_secs(10));
        config
    }

    async fn pg(&self, user: &str, password: &str) -> tokio_postgres::Client {
        let (client, connection) = self
            .pg_config(user, password)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
        tokio::spawn(connection);
        client
    }

    async fn flight(&self) -> FlightSqlServiceClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.flight.as_deref().unwrap()))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        FlightSqlServiceClient::new(channel)
    }

    /// Whether the program still runs.
    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A PostgreSQL error's SQLSTATE and message.
fn pg_error(e: &tokio_postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e:?}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// The rows of a simple query as text.
async fn simple(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The query psql 15 sends for `\df` (from `psql -E`).
const PSQL_DF: &str = r#"SELECT n.nspname as "Schema",
  p.proname as "Name",
  pg_catalog.pg_get_function_result(p.oid) as "Result data type",
  pg_catalog.pg_get_function_arguments(p.oid) as "Argument data types",
 CASE p.prokind
  WHEN 'a' THEN 'agg'
  WHEN 'w' THEN 'window'
  WHEN 'p' THEN 'proc'
  ELSE 'func'
 END as "Type"
FROM pg_catalog.pg_proc p
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE pg_catalog.pg_function_is_visible(p.oid)
      AND n.nspname <> 'pg_catalog'
      AND n.nspname <> 'information_schema'
ORDER BY 1, 2, 4;"#;

/// The query psql 15 sends for `\df repeat`.
const PSQL_DF_REPEAT: &str = r#"SELECT n.nspname as "Schema",
  p.proname as "Name",
  pg_catalog.pg_get_function_result(p.oid) as "Result data type",
  pg_catalog.pg_get_function_arguments(p.oid) as "Argument data types",
 CASE p.prokind
  WHEN 'a' THEN 'agg'
  WHEN 'w' THEN 'window'
  WHEN 'p' THEN 'proc'
  ELSE 'func'
 END as "Type"
FROM pg_catalog.pg_proc p
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname OPERATOR(pg_catalog.~) '^(repeat)$' COLLATE pg_catalog.default
  AND pg_catalog.pg_function_is_visible(p.oid)
ORDER BY 1, 2, 4;"#;

/// PostgreSQL: SCRAM, simple and extended protocol with parameters, the catalog, plugin errors
/// and an aborting isolated plugin as error responses on a connection that goes on, refused
/// statements, the result-rows limit, and 8 connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_clients_call_plugin_functions() {
    let secrets = tempfile::tempdir().unwrap();
    let users = users_file(secrets.path());
    let mut server = Server::start(&[
        "--users-file",
        users.to_str().unwrap(),
        "--max-result-rows",
        "1000",
    ]);
    let client = server.pg("alice", "wonderland").await;

    // Simple protocol.
    assert_eq!(
        simple(&client, "SELECT repeat('ab', 3) AS r").await,
        vec![vec![Some("ababab".to_string())]]
    );
    // Extended protocol with typed parameters.
    let rows = client
        .query("SELECT repeat($1, $2) AS r, $2 + 1 AS n", &[&"xy", &2i64])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>("r"), "xyxy");
    assert_eq!(rows[0].get::<_, i64>("n"), 3);
    // A prepared statement run several times with different values.
    let statement = client
        .prepare("SELECT repeat(v, $1) FROM (VALUES ('a'), ('b'), (NULL)) AS t(v) ORDER BY v")
        .await
        .unwrap();
    for times in [0i64, 1, 4] {
        let got: Vec<Option<String>> = client
            .query(&statement, &[&times])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let want: Vec<Option<String>> = vec![
            Some("a".repeat(times as usize)),
            Some("b".repeat(times as usize)),
            None,
        ];
        assert_eq!(got, want, "times = {times}");
    }
    // A NULL parameter: the function's NULL rule, not an error.
    let rows = client
        .query("SELECT repeat($1, 2) AS r", &[&None::<String>])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, Option<String>>(0), None);
    // The functions listing and pg_catalog.
    let names: Vec<String> = client
        .query("SELECT name FROM plugin_functions ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(names.iter().any(|n| n == "repeat"), "{names:?}");
    assert!(names.iter().any(|n| n == "fault"), "{names:?}");
    let tables = simple(
        &client,
        "SELECT relname FROM pg_catalog.pg_class WHERE relname = 'plugin_functions'",
    )
    .await;
    assert_eq!(tables, vec![vec![Some("plugin_functions".to_string())]]);
    // psql's `\df` (the query psql 15 sends, from `psql -E`): every plugin function once, in
    // the default schema, aggregates as "agg", with argument and result types.
    let expected: Vec<Vec<Option<String>>> = simple(
        &client,
        "SELECT 'public', name, CASE kind WHEN 'aggregate' THEN 'agg' ELSE 'func' END \
         FROM plugin_functions ORDER BY name",
    )
    .await;
    let listed = simple(&client, PSQL_DF).await;
    let mut names_kinds: Vec<Vec<Option<String>>> = listed
        .iter()
        .map(|row| vec![row[0].clone(), row[1].clone(), row[4].clone()])
        .collect();
    names_kinds.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(names_kinds, expected);
    assert!(expected.iter().any(|r| r[2].as_deref() == Some("agg")));
    let repeat: Vec<_> = listed
        .iter()
        .filter(|row| row[1].as_deref() == Some("repeat"))
        .collect();
    assert_eq!(repeat.len(), 1, "{listed:?}");
    let (result, arguments) = (repeat[0][2].clone(), repeat[0][3].clone());
    assert_eq!(result.as_deref(), Some("VARCHAR"), "{listed:?}");
    assert_eq!(arguments.as_deref(), Some("VARCHAR, BIGINT UNSIGNED"));
    // `\df repeat`: the pattern form lists PostgreSQL's builtin `repeat` (pg_catalog, types
    // not described) and the plugin's.
    let pattern = simple(&client, PSQL_DF_REPEAT).await;
    let schemas: Vec<_> = pattern.iter().map(|r| r[0].clone().unwrap()).collect();
    assert!(schemas.contains(&"public".to_string()), "{pattern:?}");
    assert!(pattern.iter().all(|r| r[1].as_deref() == Some("repeat")));
    // What tools send at connect.
    client
        .batch_execute("SET extra_float_digits = 3; SET application_name = 'test'; BEGIN; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        simple(&client, "SHOW server_version").await,
        vec![vec![Some("16.6".to_string())]]
    );

    // A plugin that aborts its (isolated) process: an error response naming the function; the
    // connection and the server go on.
    let e = client.query("SELECT fault(1)", &[]).await.unwrap_err();
    let (code, message) = pg_error(&e);
    assert_eq!(code, "38000", "{message}");
    assert!(message.contains("fault"), "{message}");
    assert!(server.alive());
    let rows = client.query("SELECT ok($1)", &[&41i64]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 42);

    // Other errors: unknown function, wrong argument type, DDL, the rows limit.
    let e = client
        .simple_query("SELECT no_such_fn(1)")
        .await
        .unwrap_err();
    assert!(pg_error(&e).1.contains("no_such_fn"), "{e:?}");
    let e = client
        .simple_query("CREATE TABLE t AS SELECT 1")
        .await
        .unwrap_err();
    let (code, message) = pg_error(&e);
    assert_eq!(code, "42000");
    assert!(message.to_lowercase().contains("ddl"), "{message}");
    let e = client
        .simple_query("CREATE FUNCTION f(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'x.so'")
        .await
        .unwrap_err();
    assert!(pg_error(&e).1.to_lowercase().contains("ddl"), "{e:?}");
    let e = client
        .query("SELECT value FROM generate_series(1, 5000)", &[])
        .await
        .unwrap_err();
    let (code, message) = pg_error(&e);
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("1000 rows"), "{message}");
    // Still usable.
    assert_eq!(
        simple(&client, "SELECT 1").await,
        vec![vec![Some("1".to_string())]]
    );

    // Authentication failures.
    for (user, password) in [
        ("alice", "Wonderland"),
        ("mallory", "wonderland"),
        ("bob", ""),
    ] {
        let e = server
            .pg_config(user, password)
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} connected with a wrong password"));
        let text = format!("{e:?}");
        assert!(
            text.contains("28P01") || text.to_lowercase().contains("password"),
            "{user}: {text}"
        );
    }
    // A failed exchange leaves nothing behind for the next connection.
    let again = server.pg("alice", "wonderland").await;
    assert_eq!(
        simple(&again, "SELECT ok(1)").await,
        vec![vec![Some("2".to_string())]]
    );

    // 8 connections at once, each with its own parameters.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8i64 {
        let config = server.pg_config("bob", "builder");
        tasks.spawn(async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            for round in 0..5i64 {
                let n = i * 10 + round;
                let rows = client
                    .query("SELECT repeat('z', $1) AS r, ok($1) AS k", &[&n])
                    .await
                    .unwrap();
                assert_eq!(rows[0].get::<_, String>(0), "z".repeat(n as usize));
                assert_eq!(rows[0].get::<_, i64>(1), n + 1);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert!(server.alive());
}

/// The CPU time process `pid` has used so far, in clock ticks of 10 ms (`utime` + `stime` of
/// `/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // After the command name (in parentheses): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = text[text.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A query that runs for a long time (no plugin: DataFusion counts a billion rows).
const LONG_QUERY: &str =
    "SELECT count(*) FROM generate_series(1, 2000000000) AS a(v) WHERE v % 7 = 3";

/// PostgreSQL: the protocol's cancel request stops a running query (57014, at once), and the
/// server's time limit stops another (57014, naming the limit); the connection goes on. No
/// authentication on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cancel_request_and_time_limit() {
    let server = Server::start(&["--time-limit-secs", "4"]);
    let client = server.pg("anyone", "").await;
    let cancel = client.cancel_token();
    let started = Instant::now();
    // Cancelled once the query runs: the server has spent 0.2 s of CPU beyond what it had (the
    // query is the only work it has), not after a guess at how long the query takes to start.
    let (pid, idle) = (server.child.id(), cpu_ticks(server.child.id()));
    let canceller = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while cpu_ticks(pid) < idle + 20 {
            assert!(
                Instant::now() < deadline,
                "the query did not run within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = client.query(LONG_QUERY, &[]).await.unwrap_err();
    canceller.await.unwrap();
    let (code, message) = pg_error(&e);
    assert_eq!(code, "57014", "{message}");
    assert!(message.contains("user request"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the cancel took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let e = client.simple_query(LONG_QUERY).await.unwrap_err();
    let (code, message) = pg_error(&e);
    assert_eq!(code, "57014", "{message}");
    assert!(message.contains("time limit"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        simple(&client, "SELECT repeat('q', 2)").await,
        vec![vec![Some("qq".to_string())]]
    );
}

/// TLS: the PostgreSQL server (SCRAM over TLS through `tokio-postgres-rustls`, the client
/// trusting only the test's certificate) and the Flight SQL server (tonic with the same
/// certificate); a client that does not trust the certificate cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_both_protocols() {
    let secrets = tempfile::tempdir().unwrap();
    let users = users_file(secrets.path());
    let (cert, key, cert_pem) = certificate(secrets.path());
    let server = Server::start(&[
        "--users-file",
        users.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = server.pg_config("alice", "wonderland");
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = client
        .query("SELECT repeat($1, 2)", &[&"tls"])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "tlstls");
    // Trusting nothing: the handshake fails.
    let untrusting = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut config = server.pg_config("alice", "wonderland");
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    assert!(
        config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(untrusting))
            .await
            .is_err()
    );

    // Flight SQL over TLS.
    let endpoint = Endpoint::from_shared(format!("https://{}", server.flight.as_deref().unwrap()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert_pem))
                .domain_name("localhost"),
        )
        .unwrap();
    let mut flight = FlightSqlServiceClient::new(endpoint.connect().await.unwrap());
    flight.handshake("bob", "builder").await.unwrap();
    let batches = statement(&mut flight, "SELECT repeat('ab', 2) AS r").await;
    assert_eq!(strings(&batches, 0), vec![Some("abab".to_string())]);
    // Plain text to a TLS port: no answer.
    let plain = Endpoint::from_shared(format!("http://{}", server.flight.as_deref().unwrap()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client = FlightSqlServiceClient::new(channel);
        assert!(client.handshake("bob", "builder").await.is_err());
    }
}

/// The record batches of a Flight SQL statement.
async fn statement(client: &mut FlightSqlServiceClient<Channel>, sql: &str) -> Vec<RecordBatch> {
    let info = client
        .execute(sql.to_string(), None)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    fetch(client, info)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The record batches of every endpoint of `info`.
async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> Result<Vec<RecordBatch>, String> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.expect("an endpoint with a ticket");
        let stream = client.do_get(ticket).await.map_err(|e| e.to_string())?;
        batches.extend(
            stream
                .try_collect::<Vec<_>>()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(batches)
}

/// Column `i` of `batches` as optional strings.
fn strings(batches: &[RecordBatch], i: usize) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for batch in batches {
        let column = arrow::compute::cast(batch.column(i), &DataType::Utf8).unwrap();
        let column = column.as_string::<i32>();
        out.extend(column.iter().map(|v| v.map(str::to_string)));
    }
    out
}

/// Flight SQL: basic then bearer authentication, statements with plugin functions, a prepared
/// statement with parameters run with two bindings, `GetSqlInfo`, catalogs, schemas and tables,
/// a plugin error and an aborting isolated plugin as errors (the server goes on), refused DDL,
/// the time limit, and calls without or with wrong credentials refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_clients_call_plugin_functions() {
    let secrets = tempfile::tempdir().unwrap();
    let users = users_file(secrets.path());
    let mut server = Server::start(&[
        "--users-file",
        users.to_str().unwrap(),
        "--time-limit-secs",
        "4",
    ]);
    // No credentials, wrong ones.
    let mut anonymous = server.flight().await;
    let e = anonymous
        .execute("SELECT 1".to_string(), None)
        .await
        .unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("authentication"),
        "{e}"
    );
    let e = anonymous
        .handshake("alice", "Wonderland")
        .await
        .unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("authentication"),
        "{e}"
    );
    anonymous.set_token("forged-token".to_string());
    let e = anonymous.get_catalogs().await.unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("authentication"),
        "{e}"
    );

    let mut client = server.flight().await;
    client.handshake("alice", "wonderland").await.unwrap();
    let batches = statement(
        &mut client,
        "SELECT repeat(v, 3) AS r FROM (VALUES ('a'), ('bc'), (NULL)) AS t(v) ORDER BY v",
    )
    .await;
    assert_eq!(
        strings(&batches, 0),
        vec![Some("aaa".to_string()), Some("bcbcbc".to_string()), None]
    );

    // A prepared statement with parameters, bound twice.
    let mut prepared = client
        .prepare("SELECT repeat($1, $2) AS r, ok($2) AS k".to_string(), None)
        .await
        .unwrap();
    let schema = prepared.dataset_schema().unwrap().clone();
    assert_eq!(schema.fields().len(), 2);
    assert_eq!(prepared.parameter_schema().unwrap().fields().len(), 2);
    for (text, times) in [("xy", 2i64), ("q", 5)] {
        let parameters = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("$1", DataType::Utf8, true),
                Field::new("$2", DataType::Int64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec![text])),
                Arc::new(Int64Array::from(vec![times])),
            ],
        )
        .unwrap();
        prepared.set_parameters(parameters).unwrap();
        let info = prepared.execute().await.unwrap();
        let batches = fetch(&mut client, info).await.unwrap();
        assert_eq!(
            strings(&batches, 0),
            vec![Some(text.repeat(times as usize))]
        );
        let k = batches[0]
            .column(1)
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(k.value(0), times + 1);
    }
    // Two rows of parameters for one execution: refused, naming the count.
    let two = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("$1", DataType::Utf8, true),
            Field::new("$2", DataType::Int64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(Int64Array::from(vec![1, 2])),
        ],
    )
    .unwrap();
    prepared.set_parameters(two).unwrap();
    let refused = match prepared.execute().await {
        Err(e) => e.to_string(),
        Ok(info) => fetch(&mut client, info).await.unwrap_err(),
    };
    assert!(refused.contains("row"), "{refused}");
    prepared.close().await.unwrap();
    // `?` parameters, as ADBC and JDBC drivers write them (a `?` in a string stays).
    let mut prepared = client
        .prepare("SELECT repeat(?, 2) || '?' AS r".to_string(), None)
        .await
        .unwrap();
    prepared
        .set_parameters(
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new("$1", DataType::Utf8, true)])),
                vec![Arc::new(StringArray::from(vec!["ok"]))],
            )
            .unwrap(),
        )
        .unwrap();
    let info = prepared.execute().await.unwrap();
    let batches = fetch(&mut client, info).await.unwrap();
    assert_eq!(strings(&batches, 0), vec![Some("okok?".to_string())]);
    prepared.close().await.unwrap();

    // Metadata.
    let info = client
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    let batches = fetch(&mut client, info).await.unwrap();
    assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
    let info = client.get_catalogs().await.unwrap();
    let catalogs = strings(&fetch(&mut client, info).await.unwrap(), 0);
    assert!(
        catalogs.contains(&Some("datafusion".to_string())),
        "{catalogs:?}"
    );
    let info = client
        .get_db_schemas(CommandGetDbSchemas {
            catalog: Some("datafusion".to_string()),
            db_schema_filter_pattern: None,
        })
        .await
        .unwrap();
    let schemas = strings(&fetch(&mut client, info).await.unwrap(), 1);
    assert!(schemas.contains(&Some("public".to_string())), "{schemas:?}");
    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: None,
            table_name_filter_pattern: Some("plugin%".to_string()),
            table_types: vec![],
            include_schema: true,
        })
        .await
        .unwrap();
    let tables = fetch(&mut client, info).await.unwrap();
    let names = strings(&tables, 2);
    assert!(
        names.contains(&Some("plugin_functions".to_string())),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| n.as_deref().is_some_and(|n| n.starts_with("plugin")))
    );
    assert!(tables[0].column(4).null_count() < tables[0].num_rows());

    // Errors: a plugin that aborts, refused DDL, the time limit; the server goes on.
    let e = client
        .execute("SELECT fault(1)".to_string(), None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let message = match e {
        // Planning succeeded: the error comes with the data.
        Ok(()) => {
            let info = client
                .execute("SELECT fault(1)".to_string(), None)
                .await
                .unwrap();
            fetch(&mut client, info).await.unwrap_err()
        }
        Err(message) => message,
    };
    assert!(message.contains("fault"), "{message}");
    assert!(server.alive());
    let batches = statement(&mut client, "SELECT ok(9) AS k").await;
    assert_eq!(strings(&batches, 0), vec![Some("10".to_string())]);
    let e = client
        .execute("CREATE TABLE t AS SELECT 1".to_string(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("ddl"), "{e}");
    let started = Instant::now();
    let info = client.execute(LONG_QUERY.to_string(), None).await.unwrap();
    let e = fetch(&mut client, info).await.unwrap_err();
    assert!(e.contains("time limit"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let batches = statement(&mut client, "SELECT repeat('ok', 1) AS r").await;
    assert_eq!(strings(&batches, 0), vec![Some("ok".to_string())]);
}

/// Without a users file, the servers must listen on loopback: the program refuses to start,
/// naming the flag.
#[test]
fn no_authentication_off_loopback_is_refused() {
    let program = udf_tests::build_workspace().join("udfsql-server");
    for flag in ["--pg-addr", "--flight-addr"] {
        let output = std::process::Command::new(&program)
            .args(["--addr", "127.0.0.1:0", flag, "0.0.0.0:0"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{flag}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("--users-file"),
            "{flag}: {stderr}"
        );
    }
}

/// `udfsql-server --allow-compile`: functions written in SQL created and dropped over the
/// PostgreSQL protocol and over Flight SQL, into the shared session (a function created by one
/// protocol is called through the other); other DDL stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_compile_option_over_postgres_and_flight() {
    let secrets = tempfile::tempdir().unwrap();
    let users = users_file(secrets.path());
    let cache = udf_tests::fixture_dir().join("compiled");
    let server = Server::start(&[
        "--users-file",
        users.to_str().unwrap(),
        "--allow-compile",
        "--offline",
        "--compile-cache",
        cache.to_str().unwrap(),
        // A cold cache builds the SDK's dependencies first.
        "--time-limit-secs",
        "300",
    ]);
    let client = server.pg("alice", "wonderland").await;
    assert!(
        simple(
            &client,
            "CREATE FUNCTION pg_twice(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x * 2 $$"
        )
        .await
        .is_empty()
    );
    assert_eq!(
        simple(&client, "SELECT pg_twice(21)").await,
        vec![vec![Some("42".to_string())]]
    );
    let e = client
        .simple_query("CREATE TABLE t AS VALUES (1)")
        .await
        .unwrap_err();
    assert!(pg_error(&e).1.contains("DDL"), "{e:?}");

    let mut flight = server.flight().await;
    flight.handshake("alice", "wonderland").await.unwrap();
    let batches = statement(
        &mut flight,
        "CREATE FUNCTION flight_inc(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x + 1 $$",
    )
    .await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    let batches = statement(&mut flight, "SELECT CAST(pg_twice(5) AS VARCHAR) AS r").await;
    assert_eq!(strings(&batches, 0), vec![Some("10".to_string())]);
    assert_eq!(
        simple(&client, "SELECT flight_inc(1)").await,
        vec![vec![Some("2".to_string())]]
    );

    // pg_proc keeps a compiled function's body as its source (PostgreSQL's rule for non-C
    // functions), a plugin's library function otherwise.
    assert_eq!(
        simple(
            &client,
            "SELECT proname, prosrc FROM pg_catalog.pg_proc \
             WHERE proname IN ('flight_inc', 'square') ORDER BY proname"
        )
        .await,
        vec![
            vec![Some("flight_inc".to_string()), Some(" x + 1 ".to_string())],
            vec![Some("square".to_string()), Some("square".to_string())],
        ]
    );

    simple(&client, "DROP FUNCTION pg_twice").await;
    let e = client.simple_query("SELECT pg_twice(1)").await.unwrap_err();
    assert!(pg_error(&e).1.contains("pg_twice"), "{e:?}");
    let e = client
        .simple_query("DROP FUNCTION repeat")
        .await
        .unwrap_err();
    assert!(
        pg_error(&e).1.contains("only functions written in SQL"),
        "{e:?}"
    );
}
