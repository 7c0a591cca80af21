//! Distributed execution on Apache Ballista (issue 15): a real `udfsql-scheduler` and two real
//! `udfsql-executor` processes on 127.0.0.1, each executor with its own plugin directory holding
//! copies of the example libraries. Plugin queries over a multi-file Parquet table and a CSV table
//! run on the cluster and give exactly the answers of the same queries run locally; the
//! executors map their own copies (seen in `/proc/PID/maps`); functions created on the client
//! with `CREATE FUNCTION` need no registration on executors; an executor whose copy differs, or
//! that lacks the library, fails the query with an error naming the executor, the file and the
//! digests; a plugin error reaches the client; and every process exits cleanly on SIGTERM.
//!
//! Executor `exec-b` is set up wrong on purpose for two libraries: its `libudf_plugin_hypot.so`
//! is another library's file, and it has no `libudf_plugin_choose.so`. Each executor runs one
//! task at a time (`--vcores 1`) and the scheduler hands tasks out round-robin, so a query over
//! the four Parquet files gives both executors tasks.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use std::time::{Duration, Instant};

use datafusion::prelude::{SessionConfig, SessionContext};
use udf_distributed::local::free_port;
use udf_distributed::{ClusterOptions, ExecutorSpec, LocalCluster};
use udf_engine::PluginLoader;
use udf_tests::{
    EXAMPLE_PLUGINS, expect, faulty, fixture_dir, plugin, query, query_error, rows, set_mode,
    sha256sum, udfsql,
};

/// Partitions the client plans with: more than there are files, so that the scan is split into
/// one partition per file.
const TARGET_PARTITIONS: usize = 8;

/// A plugin directory `dir` with copies of the example libraries.
fn plugin_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create plugin dir");
    set_mode(dir, 0o755);
    for name in EXAMPLE_PLUGINS {
        let src = plugin(name);
        let dst = dir.join(src.file_name().expect("file name"));
        std::fs::copy(&src, &dst).expect("copy library");
        set_mode(&dst, 0o644);
    }
    dir.to_path_buf()
}

fn library_file(name: &str) -> String {
    plugin(name)
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// The scheduler and two executors (`exec-a`, `exec-b`), each executor with its own copies of
/// the example libraries and one task slot.
fn start_cluster(root: &Path) -> LocalCluster {
    let executors: Vec<ExecutorSpec> = ["exec-a", "exec-b"]
        .iter()
        .map(|id| ExecutorSpec {
            id: id.to_string(),
            plugin_dir: plugin_dir(&root.join(format!("{id}-plugins"))),
            vcores: 1,
        })
        .collect();
    LocalCluster::start(udf_tests::build_workspace(), root, &executors)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Four Parquet files and two CSV files with NULLs in every column.
async fn write_data(root: &Path) -> (PathBuf, PathBuf) {
    let ctx = SessionContext::new();
    let (parquet, csv) = (root.join("parquet"), root.join("csv"));
    std::fs::create_dir_all(&parquet).expect("parquet dir");
    std::fs::create_dir_all(&csv).expect("csv dir");
    let rows_of = |from: usize, to: usize| {
        format!(
            "SELECT CASE WHEN v % 7 = 3 THEN NULL ELSE concat('n', CAST(v AS VARCHAR)) END AS name, \
                    CASE WHEN v % 11 = 5 THEN NULL ELSE CAST(v AS BIGINT) - 40 END AS x, \
                    CAST(v AS DOUBLE) / 4 AS d, \
                    CASE WHEN v % 13 = 0 THEN NULL ELSE v % 3 = 0 END AS flag \
             FROM (SELECT unnest(range({from}, {to})) AS v)"
        )
    };
    for part in 0..4 {
        let sql = format!(
            "COPY ({}) TO '{}/part{part}.parquet' STORED AS PARQUET",
            rows_of(part * 40, part * 40 + 40),
            parquet.display()
        );
        ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    }
    for part in 0..2 {
        let sql = format!(
            "COPY ({}) TO '{}/part{part}.csv' STORED AS CSV",
            rows_of(part * 30 + 10, part * 30 + 40),
            csv.display()
        );
        ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    }
    (parquet, csv)
}

fn table_ddl(parquet: &Path, csv: &Path) -> [String; 2] {
    [
        format!(
            "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}/'",
            parquet.display()
        ),
        format!(
            "CREATE EXTERNAL TABLE c STORED AS CSV LOCATION '{}/' OPTIONS ('format.has_header' 'true')",
            csv.display()
        ),
    ]
}

/// Registers every library of `dir` in `ctx` and creates the tables.
async fn prepare(ctx: &SessionContext, loader: &PluginLoader, dir: &Path, ddl: &[String]) {
    for path in udf_engine::trusted_libraries_in(dir).expect("plugin dir") {
        let library = loader.load(&path).expect("load library");
        udf_engine::register_library(ctx, &library);
    }
    for sql in ddl {
        ctx.sql(sql).await.unwrap().collect().await.unwrap();
    }
}

/// Queries whose distributed answers must equal the local ones (each ORDER BY is a total order of
/// the rows that can differ): the v1 row path (`repeat`), the
/// batch path, filters, an aggregate with a shuffle on a plugin expression, nullable arguments and
/// results, the CSV table, a join, a volatile nullary function, and Arrow-typed functions (lists,
/// decimals, structs).
const SAME_ANSWERS: &[&str] = &[
    "SELECT name, repeat(name, 3) AS r, square(x) AS s FROM p WHERE is_even(x) ORDER BY x, name",
    "SELECT shout(name) AS s, count(*) AS n, sum(x) AS total FROM p GROUP BY shout(name) ORDER BY s NULLS FIRST",
    "SELECT is_even(x) AS even, count(*) AS n, sum(square(x)) AS sq FROM p GROUP BY is_even(x) ORDER BY even NULLS FIRST",
    "SELECT x, coalesce_len(name) AS l, utf8_len(name) AS u, null_if_empty(name) AS e FROM p ORDER BY x NULLS FIRST, name NULLS FIRST",
    "SELECT name, str_len(name) AS l, safe_div(x, 3) AS q, negate(flag) AS nf FROM c ORDER BY x NULLS FIRST, name NULLS FIRST, nf NULLS FIRST",
    "SELECT a.name, square(a.x) AS s, repeat_text(b.name, 2) AS r FROM p a JOIN c b ON a.x = b.x WHERE is_even(a.x) ORDER BY a.name, a.x",
    "SELECT count(*) AS n FROM p a JOIN c b ON shout(a.name) = shout(b.name)",
    "SELECT count(next_id()) AS ids, count(*) AS n FROM p",
    // Arrow types (ABI 2.2): lists, decimals, structs in and out, vectorised and row by row.
    "SELECT x, pairs(x) AS pr, dec_double(CAST(x AS DECIMAL(12,2))) AS dd, \
            midpoint(named_struct('x', d, 'y', d), named_struct('x', 1.0, 'y', 2.0)) AS m, \
            list_total([d, d]) AS lt, sum_ints([x, NULL]) AS si \
     FROM p ORDER BY x NULLS FIRST, name NULLS FIRST, d",
    // Aggregates (ABI 2.4, udf-plugins/stats): partial states made on the executors, shuffled
    // as columns, merged in the final phase; GROUP BY of low and high cardinality, no GROUP BY,
    // FILTER, and a sliding window frame.
    "SELECT flag, my_sum(x) AS s, sum(x) AS b, median_exact(d) AS m, hll_count(name) AS h, \
            round(geo_mean(d), 9) AS g \
     FROM p GROUP BY flag ORDER BY flag NULLS FIRST",
    "SELECT x % 37 AS k, my_sum(x) AS s, median_exact(d) AS m, hll_count(name) AS h \
     FROM p GROUP BY x % 37 ORDER BY k NULLS FIRST",
    "SELECT my_sum(x) AS s, my_sum(x) FILTER (WHERE flag) AS f, median_exact(d) AS m FROM c",
    "SELECT d, my_sum(x) OVER (ORDER BY d ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS w \
     FROM p ORDER BY d",
];

/// The libraries mapped by process `pid` whose path is under `dir`.
fn mapped_under(pid: u32, dir: &Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut found: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        // The engine maps a sealed in-memory copy of each library, `/memfd:<path> (deleted)`.
        .map(|p| p.strip_prefix("/memfd:").unwrap_or(p))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The `udfsql-worker` children of process `pid`.
fn worker_children(pid: u32) -> usize {
    worker_pids(pid).len()
}

/// The process ids of the `udfsql-worker` children of process `pid`.
fn worker_pids(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if comm.ends_with("(udfsql-worker") && ppid == Some(&pid.to_string()) {
            found.extend(
                comm.split_once(' ')
                    .and_then(|(p, _)| p.parse::<u32>().ok()),
            );
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_queries_run_on_ballista_executors_as_locally() {
    let root = tempfile::Builder::new()
        .prefix("distributed-")
        .tempdir_in(fixture_dir())
        .expect("temp dir");
    set_mode(root.path(), 0o755);
    let root = root.path();
    let cluster = start_cluster(root);
    let executor_dirs: Vec<PathBuf> = ["exec-a", "exec-b"]
        .iter()
        .map(|id| root.join(format!("{id}-plugins")))
        .collect();
    let client_plugins = plugin_dir(&root.join("client-plugins"));
    let (parquet, csv) = write_data(root).await;
    let ddl = table_ddl(&parquet, &csv);

    // exec-b: another library under hypot's file name, and no choose library.
    let exec_b_plugins = executor_dirs[1].clone();
    let hypot = library_file("hypot");
    std::fs::copy(plugin("str-len"), exec_b_plugins.join(&hypot)).expect("replace hypot");
    std::fs::remove_file(exec_b_plugins.join(library_file("choose"))).expect("remove choose");

    let config = || SessionConfig::new().with_target_partitions(TARGET_PARTITIONS);
    let local_loader = Arc::new(
        PluginLoader::new()
            .with_plugin_dir(&client_plugins)
            .unwrap(),
    );
    let local = SessionContext::new_with_config(config());
    udf_engine::install(&local, Arc::clone(&local_loader)).unwrap();
    prepare(&local, &local_loader, &client_plugins, &ddl).await;
    let loader = Arc::new(
        PluginLoader::new()
            .with_plugin_dir(&client_plugins)
            .unwrap(),
    );
    let remote = udf_distributed::connect(&cluster.url, config(), Arc::clone(&loader))
        .await
        .expect("connect to the cluster");
    prepare(&remote, &loader, &client_plugins, &ddl).await;

    for sql in SAME_ANSWERS {
        let expected = rows(&local, sql).await;
        assert!(!expected.is_empty(), "{sql} gives no rows locally");
        assert_eq!(rows(&remote, sql).await, expected, "{sql}");
    }

    // Joins on plugin expressions with both sides hash-partitioned (shuffled by the plugin's
    // result) rather than one side collected.
    for ctx in [&local, &remote] {
        for setting in ["threshold", "threshold_rows"] {
            let sql = format!("SET datafusion.optimizer.hash_join_single_partition_{setting} = 0");
            ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        }
    }
    for sql in [
        "SELECT count(*) AS n FROM p a JOIN p b ON shout(a.name) = shout(b.name)",
        "SELECT a.name, square(b.x) AS s FROM p a JOIN c b ON repeat_text(a.name, 2) = repeat_text(b.name, 2) ORDER BY a.name, s",
    ] {
        let plan = rows(&remote, &format!("EXPLAIN {sql}")).await;
        let distributed = plan
            .iter()
            .find(|r| r[0] == "distributed_plan")
            .map(|r| r[1].clone())
            .unwrap_or_default();
        assert!(
            distributed.contains("partitioning=Hash"),
            "{sql} is not hash-partitioned on the cluster:\n{distributed}"
        );
        let expected = rows(&local, sql).await;
        assert!(!expected.is_empty());
        assert_eq!(rows(&remote, sql).await, expected, "{sql}");
    }

    // Each executor evaluated plugin functions from its own copies; none mapped the client's.
    for (executor, plugins) in cluster.executors.iter().zip(&executor_dirs) {
        let mapped = mapped_under(executor.pid(), plugins);
        let repeat = plugins.join(library_file("repeat")).display().to_string();
        assert!(
            mapped.contains(&repeat),
            "{} did not map {repeat}: {mapped:?}",
            executor.name
        );
        assert!(mapped_under(executor.pid(), &client_plugins).is_empty());
    }
    // The aggregates ran their accumulators on the executors, from their own copies.
    assert!(
        cluster
            .executors
            .iter()
            .zip(&executor_dirs)
            .any(|(executor, plugins)| {
                let stats = plugins.join(library_file("stats")).display().to_string();
                mapped_under(executor.pid(), plugins).contains(&stats)
            }),
        "no executor mapped the stats library"
    );
    // The scheduler never maps plugin code.
    assert!(mapped_under(cluster.scheduler.pid(), root).is_empty());

    // Functions created on the client, under another name and pinned, or isolated: nothing is
    // registered on the executors.
    let digest = sha256sum(&client_plugins.join(library_file("repeat")));
    let created = [
        format!(
            "CREATE FUNCTION my_rep(VARCHAR, BIGINT UNSIGNED) RETURNS VARCHAR LANGUAGE plugin \
             AS '{}#sha256={digest}'",
            library_file("repeat")
        ),
        format!(
            "CREATE FUNCTION iso_square(BIGINT) RETURNS BIGINT LANGUAGE plugin AS '{}#isolation=process'",
            library_file("square")
        ),
    ];
    for ctx in [&local, &remote] {
        for sql in &created {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        }
    }
    for sql in [
        "SELECT my_rep(name, 2) AS r, iso_square(x) AS s FROM p ORDER BY x NULLS FIRST, name NULLS FIRST",
        "SELECT name, isolation FROM plugin_functions WHERE name IN ('my_rep', 'iso_square') ORDER BY name",
    ] {
        assert_eq!(rows(&remote, sql).await, rows(&local, sql).await, "{sql}");
    }
    // An asynchronous function (`#[udf(async)]`, the http example) created on the client with
    // its limits: the plan carries them, the executors run its calls (AsyncFuncExec) against a
    // server here, and the answers are the local ones, in a projection and in a filter.
    let server = udf_tests::http_server::Server::start().await;
    for dir in executor_dirs.iter().chain([&client_plugins]) {
        let dst = dir.join(library_file("http"));
        std::fs::copy(plugin("http"), &dst).expect("copy the http library");
        set_mode(&dst, 0o644);
    }
    let create = format!(
        "CREATE FUNCTION get_url(VARCHAR) RETURNS VARCHAR LANGUAGE plugin \
         AS '{}#http_get#max_in_flight=3#chunk_rows=2#call_timeout=20s'",
        library_file("http")
    );
    for ctx in [&local, &remote] {
        ctx.sql(&create).await.unwrap().collect().await.unwrap();
    }
    let url = format!(
        "'{}' || CAST(x AS VARCHAR) || '?delay_ms=20'",
        server.url("/echo/n")
    );
    for sql in [
        format!("SELECT x, get_url({url}) AS f FROM p ORDER BY x NULLS FIRST, f NULLS FIRST"),
        format!("SELECT count(*) AS n FROM p WHERE get_url({url}) LIKE 'n%'"),
        // Where DataFusion does not run asynchronous calls itself: udfsql's optimizer rule (in
        // the scheduler's session too) computes them in a projection below.
        format!(
            "SELECT length(get_url({url})) AS k, count(*) AS n FROM p \
             GROUP BY length(get_url({url})) ORDER BY k NULLS FIRST"
        ),
        format!("SELECT x FROM p ORDER BY get_url({url}) DESC NULLS LAST, x LIMIT 5"),
    ] {
        let expected = rows(&local, &sql).await;
        assert!(!expected.is_empty(), "{sql}: {expected:?}");
        assert_eq!(rows(&remote, &sql).await, expected, "{sql}");
    }
    let plan = rows(&remote, &format!("EXPLAIN SELECT get_url({url}) FROM p")).await;
    let distributed = plan
        .iter()
        .find(|r| r[0] == "distributed_plan")
        .map(|r| r[1].clone())
        .unwrap_or_default();
    assert!(
        distributed.contains("AsyncFuncExec"),
        "the cluster runs the asynchronous calls in an AsyncFuncExec:\n{distributed}"
    );
    let most = server
        .seen
        .max_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2 * 3 * 2).contains(&most),
        "at most 3 calls of 2 rows in flight per executor (2 executors): {most}"
    );
    let http_maps: usize = cluster
        .executors
        .iter()
        .zip(&executor_dirs)
        .map(|(e, dir)| {
            let library = dir.join(library_file("http")).display().to_string();
            usize::from(mapped_under(e.pid(), dir).contains(&library))
        })
        .sum();
    assert!(http_maps > 0, "no executor mapped the http library");

    let isolated: usize = cluster
        .executors
        .iter()
        .map(|e| worker_children(e.pid()))
        .sum();
    assert!(isolated > 0, "no executor started udfsql-worker processes");

    // Errors: a plugin's own error, a library that differs on exec-b, one exec-b lacks.
    let e = query_error(&remote, "SELECT safe_div(x, 0) FROM p").await;
    assert!(e.contains("division by zero"), "{e}");
    let e = query_error(&remote, "SELECT hypot(d, d) FROM p").await;
    eprintln!("digest mismatch on exec-b: {e}");
    let client_digest = sha256sum(&client_plugins.join(&hypot));
    let exec_b_digest = sha256sum(&exec_b_plugins.join(&hypot));
    for part in [
        "plugin function hypot cannot run on executor exec-b",
        hypot.as_str(),
        &client_digest,
        &exec_b_digest,
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    let e = query_error(&remote, "SELECT choose(flag, name, 'x') FROM p").await;
    eprintln!("library missing on exec-b: {e}");
    for part in [
        "plugin function choose cannot run on executor exec-b",
        &format!(
            "library {} is not in its plugin directories",
            library_file("choose")
        ),
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // The cluster still answers.
    assert_eq!(
        rows(&remote, SAME_ANSWERS[0]).await,
        rows(&local, SAME_ANSWERS[0]).await
    );

    // udfsql --ballista, with -c and with -f, prints what udfsql prints locally.
    let script = root.join("script.sql");
    std::fs::write(
        &script,
        format!("{};\n{};\n{};\n", ddl[0], ddl[1], SAME_ANSWERS[1]),
    )
    .unwrap();
    let run = |ballista: bool, args: &[String]| {
        let mut cmd = Command::new(udfsql());
        cmd.arg("--plugin-dir")
            .arg(&client_plugins)
            .args(["--format", "csv"]);
        if ballista {
            cmd.args(["--ballista", &cluster.url]);
        }
        let out = cmd.args(args).output().expect("run udfsql");
        assert!(
            out.status.success(),
            "udfsql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let with_c: Vec<String> = ["-c", &ddl[0], "-c", SAME_ANSWERS[0]]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let with_f = vec!["-f".to_string(), script.display().to_string()];
    for args in [with_c, with_f] {
        let local_out = run(false, &args);
        assert!(local_out.lines().count() > 10, "{local_out}");
        assert_eq!(run(true, &args), local_out, "{args:?}");
    }

    // A function written in SQL on the cluster: compiled by the client (or found in its
    // cache); the executors load its library from their plugin directories, pinned, once
    // `udfsql export-function` has copied it there.
    let cache = fixture_dir().join("compiled");
    let create =
        "CREATE FUNCTION dist_affine(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x * 3 + 1 $$";
    let compiled: Vec<String> = [
        "--allow-compile",
        "--offline",
        "--compile-cache",
        cache.to_str().unwrap(),
        "-c",
        &ddl[0],
        "-c",
        create,
        "-c",
        "SELECT x, dist_affine(x) AS y FROM p ORDER BY x NULLS FIRST",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let local_out = run(false, &compiled);
    assert!(local_out.lines().count() > 10, "{local_out}");
    let before = Command::new(udfsql())
        .args(["--ballista", &cluster.url])
        .args(&compiled)
        .output()
        .expect("run udfsql");
    assert!(!before.status.success());
    let e = String::from_utf8_lossy(&before.stderr);
    assert!(
        e.contains("libudfsql_compiled_") && e.contains("not in its plugin directories"),
        "{e}"
    );
    for dir in &executor_dirs {
        let out = Command::new(udfsql())
            .args(["export-function", "dist_affine"])
            .arg(dir)
            .arg("--compile-cache")
            .arg(&cache)
            .output()
            .expect("run udfsql export-function");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The executors remember the failure for their --load-failure-ttl (10 s), then find it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(udfsql())
            .args(["--ballista", &cluster.url, "--format", "csv"])
            .arg("--plugin-dir")
            .arg(&client_plugins)
            .args(&compiled)
            .output()
            .expect("run udfsql");
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), local_out);
            break;
        }
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("not in its plugin directories"), "{e}");
        assert!(
            Instant::now() < deadline,
            "the executors never found it: {e}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // The embedding example (Ballista's `remote_with_state` + udfsql's codecs and install).
    let example = udf_tests::build_workspace().join("examples/ballista_client");
    let out = Command::new(&example)
        .arg(&cluster.url)
        .arg(&client_plugins)
        .arg(&parquet)
        .output()
        .expect("run the example");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    for row in rows(
        &local,
        "SELECT repeat(name, 2), square(x) FROM p WHERE x IS NOT NULL AND name IS NOT NULL ORDER BY x LIMIT 3",
    )
    .await
    {
        assert!(
            shown.contains(&format!("| {} | {} ", row[0], row[1])),
            "{row:?} not in:\n{shown}"
        );
    }

    // The interactive shell on the cluster, in a pseudo-terminal.
    let mut cmd = Command::new(udfsql());
    cmd.arg("--plugin-dir")
        .arg(&client_plugins)
        .args(["--ballista", &cluster.url])
        .env("UDFSQL_HISTORY", root.join("history"))
        .env("TERM", "dumb");
    let mut p = rexpect::session::spawn_command(cmd, Some(30_000)).expect("spawn in a pty");
    p.exp_string("udfsql> ").unwrap();
    p.send_line(&format!("{};", ddl[0])).unwrap();
    p.exp_string("udfsql> ").unwrap();
    p.send_line("SELECT sum(square(x)) AS total FROM p")
        .unwrap();
    p.exp_string("-> ").unwrap();
    p.send_line("WHERE is_even(x);").unwrap();
    let total = &rows(
        &local,
        "SELECT sum(square(x)) AS total FROM p WHERE is_even(x)",
    )
    .await[0][0];
    p.exp_string(&format!("| {total} |")).unwrap();
    p.exp_string("1 row.").unwrap();
    p.send_line("SELECT safe_div(x, 0) FROM p;").unwrap();
    p.exp_string("division by zero").unwrap();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();

    // In-memory tables (the demo table, CREATE TABLE ... AS VALUES, plugin_functions) exist only
    // in the client: a query reading only them runs there; one that also reads files is refused.
    let demo = vec![
        "--demo".to_string(),
        "-c".to_string(),
        "SELECT repeat(name, 2) AS r, square(x) AS s FROM t ORDER BY r".to_string(),
    ];
    assert_eq!(run(true, &demo), run(false, &demo));
    remote
        .sql("CREATE TABLE m AS VALUES (1)")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let e = query_error(&remote, "SELECT * FROM m JOIN p ON m.column1 = p.x").await;
    assert!(e.contains("m held in this client's memory"), "{e}");

    // A scheduler that is not there is a clear error at start.
    let nobody = format!("df://127.0.0.1:{}", free_port().unwrap());
    let out = Command::new(udfsql())
        .args(["--ballista", &nobody, "-c", "SELECT 1"])
        .output()
        .expect("run udfsql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("Ballista scheduler at {nobody}")),
        "{stderr}"
    );

    // Clean shutdown: executors first, then the scheduler, each on SIGTERM.
    drop(remote);
    let codes = cluster.shutdown().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(codes.len(), 3);
    for (name, code) in codes {
        assert_eq!(code, Some(0), "{name} exit status");
    }
}

/// The scheduler never maps plugin code. Without plugin directories it plans with the signature
/// the plan carries; with them (`udfsql-scheduler --plugin-dir`) it also checks, by hashing the
/// file, that the library is there with the client's digest.
#[test]
fn the_scheduler_checks_digests_without_loading() {
    use udf_distributed::{PluginSpec, Resolver, Role};

    let root = tempfile::Builder::new()
        .prefix("scheduler-")
        .tempdir_in(fixture_dir())
        .expect("temp dir");
    set_mode(root.path(), 0o755);
    let client = plugin_dir(&root.path().join("client"));
    let scheduler = root.path().join("scheduler");
    std::fs::create_dir_all(&scheduler).unwrap();
    set_mode(&scheduler, 0o755);
    let square = library_file("square");
    std::fs::copy(plugin("is-even"), scheduler.join(&square)).unwrap();

    let library = udf_engine::PluginLibrary::load(client.join(&square)).unwrap();
    let function = library.function_named("square").unwrap();
    let udf = udf_engine::PluginUdf::new(
        "my_square",
        function,
        datafusion::logical_expr::Volatility::Immutable,
    );
    let spec = PluginSpec::of(&udf).unwrap();
    assert_eq!(spec.library, square);
    assert_eq!(spec.sha256, sha256sum(&client.join(&square)));
    assert_eq!(spec.function, "square");

    // Without directories: planned with the carried signature, never evaluated here.
    let planner = Resolver::new("scheduler s1", Role::Plan, Arc::new(PluginLoader::new()));
    let remote = planner.resolve(&spec).unwrap();
    assert_eq!(remote.name(), "my_square");
    assert_eq!(
        remote.return_type(&[]).unwrap(),
        datafusion::arrow::datatypes::DataType::Int64
    );

    // With a directory whose file differs: refused, naming the scheduler and both digests.
    let loader = PluginLoader::new().with_plugin_dir(&scheduler).unwrap();
    let checking = Resolver::new("scheduler s1", Role::Plan, Arc::new(loader));
    let e = checking.resolve(&spec).unwrap_err().to_string();
    for part in [
        "plugin function my_square cannot run on scheduler s1",
        &spec.sha256,
        &sha256sum(&scheduler.join(&square)),
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    // With the same file: accepted, and the scheduler's copy was hashed, not mapped.
    std::fs::copy(client.join(&square), scheduler.join(&square)).unwrap();
    checking.resolve(&spec).unwrap();
    assert!(mapped_under(std::process::id(), &scheduler).is_empty());
}

/// An executor keeps trying to reach its scheduler for `--scheduler-connect-timeout-seconds`
/// (so it may start first), then exits with an error naming the address.
#[test]
fn an_executor_without_its_scheduler_stops_with_a_clear_error() {
    let port = free_port().unwrap();
    let executor = udf_tests::build_workspace().join("udfsql-executor");
    let start = std::time::Instant::now();
    let out = Command::new(executor)
        .args(["--bind-host", "127.0.0.1", "--scheduler-host", "127.0.0.1"])
        .args(["--scheduler-port", &port.to_string()])
        .args(["--bind-port", &free_port().unwrap().to_string()])
        .args(["--bind-grpc-port", &free_port().unwrap().to_string()])
        .args(["--scheduler-connect-timeout-seconds", "1"])
        .output()
        .expect("run udfsql-executor");
    let waited = start.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot reach the scheduler at 127.0.0.1:{port} (--scheduler-host, --scheduler-port) within 1 s"
        )),
        "{stderr}"
    );
    assert!(
        waited >= std::time::Duration::from_secs(1) && waited < std::time::Duration::from_secs(20),
        "{waited:?}"
    );
}

/// Runs `sql` on `ctx` with a time limit: a query that hangs (a node stuck on a FIFO, a lost
/// executor Ballista waits for) fails the test instead of stalling it.
async fn bounded(
    ctx: &SessionContext,
    sql: &str,
) -> datafusion::error::Result<Vec<datafusion::arrow::array::RecordBatch>> {
    const LIMIT: Duration = Duration::from_secs(60);
    tokio::time::timeout(LIMIT, query(ctx, sql))
        .await
        .unwrap_or_else(|_| panic!("{sql} did not finish within {LIMIT:?}: the cluster hangs"))
}

/// `mkfifo path`, mode 0644.
fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
    set_mode(path, 0o644);
}

/// The soft address-space limit of process `pid` (`Max address space` in /proc/PID/limits).
fn address_space_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address space line in:\n{limits}"))
        .to_string()
}

/// The plan does not decide isolation on an executor (issue 24, item 7). A real
/// `udfsql-executor --isolate --worker-memory 300` is sent plans written by a client that runs
/// its functions in-process, or isolated with no memory limit:
/// * a function that SIGKILLs its own process fails its query, while the executor stays up and
///   answers the next query: it ran in a worker, not in the executor;
/// * the executor's workers run under its 300 MiB address-space limit, not the plan's "none";
/// * a real `udfsql-scheduler --plugin-dir` holding a FIFO under a library's name refuses plans
///   calling that library within bounded time, naming the FIFO, instead of hanging in `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_isolates_whatever_the_plan_says_and_the_scheduler_never_blocks() {
    let root = tempfile::Builder::new()
        .prefix("floor-")
        .tempdir_in(fixture_dir())
        .expect("temp dir");
    set_mode(root.path(), 0o755);
    let root = root.path();
    let killer = faulty("SIGKILL_SELF");
    let killer_file = killer.file_name().expect("file name").to_owned();
    let dirs: Vec<PathBuf> = ["client", "executor", "scheduler"]
        .iter()
        .map(|name| {
            let dir = plugin_dir(&root.join(format!("{name}-plugins")));
            std::fs::copy(&killer, dir.join(&killer_file)).expect("copy faulty library");
            set_mode(&dir.join(&killer_file), 0o644);
            dir
        })
        .collect();
    let (client_plugins, executor_plugins, scheduler_plugins) = (&dirs[0], &dirs[1], &dirs[2]);
    // On the scheduler, is_even's library is a FIFO: opening it for reading would block until a
    // writer comes, which never happens.
    let is_even = scheduler_plugins.join(library_file("is-even"));
    std::fs::remove_file(&is_even).expect("remove is_even");
    mkfifo(&is_even);

    let options = ClusterOptions {
        scheduler_args: vec![
            "--plugin-dir".into(),
            scheduler_plugins.display().to_string(),
        ],
        executor_args: ["--isolate", "--worker-memory", "300", "--workers", "1"]
            .map(String::from)
            .to_vec(),
    };
    let executors = [ExecutorSpec {
        id: "exec-iso".to_string(),
        plugin_dir: executor_plugins.clone(),
        vcores: 2,
    }];
    let mut cluster =
        LocalCluster::start_with(udf_tests::build_workspace(), root, &executors, &options)
            .unwrap_or_else(|e| panic!("{e:#}"));
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("t.csv"), "x\n1\n2\n3\n").unwrap();

    // The client runs the faulty library in-process and square isolated with no memory limit:
    // that is what the plan says.
    let loader = Arc::new(PluginLoader::new().with_plugin_dir(client_plugins).unwrap());
    let remote = udf_distributed::connect(&cluster.url, SessionConfig::new(), Arc::clone(&loader))
        .await
        .expect("connect to the cluster");
    let faulty_lib = loader.load(client_plugins.join(&killer_file)).unwrap();
    udf_engine::register_library(&remote, &faulty_lib);
    let is_even_lib = loader
        .load(client_plugins.join(library_file("is-even")))
        .unwrap();
    udf_engine::register_library(&remote, &is_even_lib);
    let square_lib = loader
        .load(client_plugins.join(library_file("square")))
        .unwrap();
    let unlimited = udf_engine::Isolation::Process(udf_engine::WorkerLimits {
        memory_mib: None,
        workers: Some(1),
        ..Default::default()
    });
    udf_engine::register_library_with(&remote, &square_lib, &unlimited).unwrap();
    let ddl = format!(
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '{}/' OPTIONS ('format.has_header' 'true')",
        data.display()
    );
    remote.sql(&ddl).await.unwrap().collect().await.unwrap();
    let executor_pid = cluster.executors[0].pid();

    // Isolated with "no memory limit" in the plan: the executor's workers have its 300 MiB.
    assert_eq!(
        rows(&remote, "SELECT x, square(x) AS s FROM t ORDER BY x").await,
        expect(&[&["1", "1"], &["2", "4"], &["3", "9"]])
    );
    let workers = worker_pids(executor_pid);
    assert!(!workers.is_empty(), "the executor started no workers");
    for pid in &workers {
        assert_eq!(
            address_space_limit(*pid),
            (300u64 << 20).to_string(),
            "worker {pid} of the executor"
        );
    }

    // In-process in the plan: under --isolate it runs in a worker, which dies; the executor
    // does not.
    let start = Instant::now();
    let e = match bounded(&remote, "SELECT fault(x) FROM t").await {
        Ok(batches) => panic!("fault(x) answered {batches:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!("fault on an isolating executor: {e}");
    for part in ["plugin function fault", "crashed: SIGKILL"] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert!(
        cluster.executors[0].is_running().unwrap(),
        "the executor died:\n{}",
        cluster.executors[0].log_tail()
    );
    assert_eq!(
        rows(&remote, "SELECT x, ok(x) AS y FROM t ORDER BY x").await,
        expect(&[&["1", "2"], &["2", "3"], &["3", "4"]])
    );
    // The executor mapped the library (to read its metadata) but ran no call of it: the
    // process that crashed was a worker.
    assert_eq!(executor_pid, cluster.executors[0].pid());

    // The scheduler refuses the FIFO at once, naming it, and keeps answering.
    let start = Instant::now();
    let e = match bounded(&remote, "SELECT is_even(x) FROM t").await {
        Ok(batches) => panic!("is_even(x) answered {batches:?}"),
        Err(e) => e.to_string(),
    };
    eprintln!("a FIFO in the scheduler's plugin directory: {e}");
    for part in [
        "plugin function is_even cannot run on scheduler",
        &is_even.display().to_string(),
        "is not a regular file (a FIFO)",
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        rows(&remote, "SELECT sum(ok(x)) AS n FROM t").await,
        expect(&[&["9"]])
    );

    drop(remote);
    for (name, code) in cluster.shutdown().unwrap_or_else(|e| panic!("{e:#}")) {
        assert_eq!(code, Some(0), "{name} exit status");
    }
}

/// An executor's caches are bounded (issue 24, item 7): with room for one function, loading a
/// second drops the first and unmaps its library; a failure to load is remembered for the time
/// limit (the file is not read again), and a library copied into place afterwards is loaded
/// once the time is up.
#[test]
fn an_executor_keeps_few_functions_and_forgets_failures() {
    use datafusion::logical_expr::Volatility;
    use udf_distributed::{PluginSpec, RemotePluginUdf, Resolver, Role};
    use udf_engine::PluginUdf;

    let root = tempfile::Builder::new()
        .prefix("resolver-cache-")
        .tempdir_in(fixture_dir())
        .expect("temp dir");
    set_mode(root.path(), 0o755);
    let (client, executor) = (root.path().join("client"), root.path().join("executor"));
    for dir in [&client, &executor] {
        std::fs::create_dir_all(dir).unwrap();
        set_mode(dir, 0o755);
    }
    let libraries: Vec<PathBuf> = ["SLOW", "EXIT0", "ABORT"]
        .iter()
        .map(|case| faulty(case))
        .collect();
    let names: Vec<String> = libraries
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for (library, name) in libraries.iter().zip(&names) {
        std::fs::copy(library, client.join(name)).unwrap();
        set_mode(&client.join(name), 0o644);
    }
    // The executor has the first two; the third comes later.
    for name in &names[..2] {
        std::fs::copy(client.join(name), executor.join(name)).unwrap();
        set_mode(&executor.join(name), 0o644);
    }
    let specs: Vec<PluginSpec> = names
        .iter()
        .map(|name| {
            let library = udf_engine::PluginLibrary::load(client.join(name)).unwrap();
            let udf = PluginUdf::new(
                "ok",
                library.function_named("ok").unwrap(),
                Volatility::Volatile,
            );
            PluginSpec::of(&udf).unwrap()
        })
        .collect();

    let ttl = Duration::from_millis(400);
    let loader = PluginLoader::new().with_plugin_dir(&executor).unwrap();
    let resolver =
        Resolver::new("executor e1", Role::Evaluate, Arc::new(loader)).with_cache(1, ttl);
    let library_of = |udf: &datafusion::logical_expr::ScalarUDF| {
        udf.inner()
            .downcast_ref::<PluginUdf>()
            .map(|p| Arc::downgrade(p.function().library()))
    };

    let first = resolver.resolve(&specs[0]).unwrap();
    let first_library = library_of(&first).expect("loaded");
    let first_path = executor.join(&names[0]).display().to_string();
    assert_eq!(
        mapped_under(std::process::id(), &executor),
        vec![first_path.clone()]
    );
    // A hit returns the same function.
    assert!(Arc::ptr_eq(&first, &resolver.resolve(&specs[0]).unwrap()));
    drop(first);

    let second = resolver.resolve(&specs[1]).unwrap();
    assert!(library_of(&second).is_some(), "the second library loads");
    assert!(
        first_library.upgrade().is_none(),
        "the evicted function still holds its library"
    );
    assert_eq!(
        mapped_under(std::process::id(), &executor),
        vec![executor.join(&names[1]).display().to_string()],
        "the evicted library is still mapped"
    );
    assert_eq!(resolver.cached(), (1, 0));

    // The third library is missing: a function that fails when called, remembered.
    // Taken before the failure is remembered: while this says less than the time limit has
    // passed, so does the resolver's clock.
    let failed_at = Instant::now();
    let missing = resolver.resolve(&specs[2]).unwrap();
    assert!(missing.inner().downcast_ref::<RemotePluginUdf>().is_some());
    assert_eq!(resolver.cached(), (1, 1));
    std::fs::copy(client.join(&names[2]), executor.join(&names[2])).unwrap();
    set_mode(&executor.join(&names[2]), 0o644);
    // Within the time limit the failure stands (the file is not looked at again) ...
    let again = resolver.resolve(&specs[2]).unwrap();
    if failed_at.elapsed() < ttl {
        assert!(
            again.inner().downcast_ref::<RemotePluginUdf>().is_some(),
            "a remembered failure was tried again at once"
        );
    }
    // ... and after it the fixed library loads.
    std::thread::sleep(ttl);
    let fixed = resolver.resolve(&specs[2]).unwrap();
    assert!(
        library_of(&fixed).is_some(),
        "the fixed library is not loaded"
    );
    assert_eq!(resolver.cached().0, 1);
}
