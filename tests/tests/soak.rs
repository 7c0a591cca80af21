//! Soak test (ignored by default: about a minute in a debug build): 10,000 queries through one
//! session — every example function on both call paths, errors, plugin panics, and functions
//! created and dropped all along (a library nothing else uses is unmapped and mapped again every
//! 50 queries, observed in /proc/self/maps). Every query's answer
//! must equal its first answer, and the process's peak RSS must stop growing.
//!
//! ```text
//! cargo test -p udf-tests --test soak -- --ignored --nocapture
//! ```
//!
//! `UDF_SOAK_QUERIES=N` changes the number of queries (default 10,000).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::PluginLoader;
use udf_tests::{example_plugin_dir, query};

const ROWS: usize = 8192;

/// The mix the soak cycles through.
const QUERIES: &[&str] = &[
    "SELECT sum(length(my_repeat(name, 3))) FROM t",
    "SELECT sum(square(x)) FROM t",
    "SELECT sum(safe_div(x, x % 7)) FROM t",
    "SELECT round(sum(hypot(d, d + 1)), 6) FROM t",
    "SELECT sum(str_len(name)) FROM t",
    "SELECT count(*) FROM t WHERE is_even(x)",
    "SELECT count(DISTINCT choose(is_even(x), name, 'odd')) FROM t",
    "SELECT sum(length(shout(name))), sum(byte_len(CAST(name AS BYTEA))) FROM t",
    "SELECT count(null_if_empty(substr(name, 1, x % 3))) FROM t",
    "SELECT sum(rowsq(x)) FROM t WHERE x < 4000",
    // Errors: a plugin's error, a plugin's panic, a call with wrong argument types.
    "SELECT safe_div(1, 0)",
    "SELECT boom(name) FROM t LIMIT 10",
    "SELECT square('not a number')",
];

fn table() -> MemTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("x", DataType::Int64, false),
        Field::new("d", DataType::Float64, false),
    ]));
    let name: StringArray = (0..ROWS)
        .map(|i| (i % 97 != 0).then(|| format!("name-{}", i * 7919 % 1000)))
        .collect();
    let x: Int64Array = (0..ROWS as i64).collect();
    let d: Float64Array = (0..ROWS).map(|i| i as f64 / 3.0).collect();
    let batches: Vec<RecordBatch> = (0..ROWS)
        .step_by(1024)
        .map(|start| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(name.slice(start, 1024)),
                    Arc::new(x.slice(start, 1024)),
                    Arc::new(d.slice(start, 1024)),
                ],
            )
            .unwrap()
        })
        .collect();
    MemTable::try_new(schema, vec![batches]).unwrap()
}

/// (VmRSS, VmHWM) of this process in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn answer(ctx: &SessionContext, sql: &str) -> String {
    match ctx.sql(sql).await {
        Ok(df) => match df.collect().await {
            Ok(batches) => pretty_format_batches(&batches).unwrap().to_string(),
            Err(e) => format!("error: {e}"),
        },
        Err(e) => format!("error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: 10,000 queries; run with --ignored (see the README)"]
async fn ten_thousand_queries_through_one_session_with_flat_peak_rss() {
    let total: usize = std::env::var("UDF_SOAK_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
    // The churned function's library is a private copy that nothing else uses, so that dropping
    // the function really unmaps it (checked in /proc/self/maps) and creating it maps it anew.
    let churn_dir = udf_tests::fixture_dir().join(format!("soak-churn-{}", std::process::id()));
    std::fs::create_dir_all(&churn_dir).unwrap();
    udf_tests::set_mode(&churn_dir, 0o755);
    let churn_library = churn_dir.join("libsoak_churn_square.so");
    std::fs::copy(udf_tests::plugin("square"), &churn_library).unwrap();
    let churn_library = churn_library.canonicalize().unwrap();
    let mapped = || {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let path = churn_library.to_str().unwrap();
        // The engine maps a sealed in-memory copy, `/memfd:<path> (deleted)`.
        let copy = format!("/memfd:{path} (deleted)");
        maps.lines()
            .any(|l| l.ends_with(path) || l.ends_with(&copy))
    };
    let loader = Arc::new(
        PluginLoader::new()
            .with_plugin_dir(example_plugin_dir())
            .unwrap()
            .with_plugin_dir(&churn_dir)
            .unwrap(),
    );
    udf_engine::install(&ctx, Arc::clone(&loader)).unwrap();
    ctx.register_table("t", Arc::new(table())).unwrap();
    let examples = udf_tests::workspace_root().join("sql/include/example_functions.slt.inc");
    let mut setup = std::fs::read_to_string(examples)
        .expect("example functions")
        .lines()
        .filter(|l| l.starts_with("CREATE FUNCTION"))
        .map(str::to_string)
        .collect::<Vec<_>>();
    for (name, sig) in [
        ("shout", "(VARCHAR) RETURNS VARCHAR"),
        ("byte_len", "(BYTEA) RETURNS BIGINT"),
        ("null_if_empty", "(VARCHAR) RETURNS VARCHAR"),
        ("boom", "(VARCHAR) RETURNS BIGINT"),
    ] {
        setup.push(format!(
            "CREATE FUNCTION {name}{sig} LANGUAGE plugin AS 'libudf_plugin_toolbox.so#{name}'"
        ));
    }
    for sql in &setup {
        query(&ctx, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    let create = "CREATE FUNCTION rowsq(BIGINT) RETURNS BIGINT LANGUAGE plugin \
                  AS 'libsoak_churn_square.so'";
    let mut churns = 0;
    let mut per_query: HashMap<&str, std::time::Duration> = HashMap::new();
    let mut churn_time = std::time::Duration::ZERO;
    let started = std::time::Instant::now();
    let mut first: HashMap<&str, String> = HashMap::new();
    let mut checkpoints = Vec::new();
    let mut executed = 0;
    while executed < total {
        // Every 50 queries the function `rowsq` is dropped and created again: its library is
        // unmapped (nothing else uses it) and mapped anew. Every statement must succeed.
        if executed % 50 == 0 {
            let churn_started = std::time::Instant::now();
            query(&ctx, "DROP FUNCTION IF EXISTS rowsq").await.unwrap();
            assert!(
                !mapped(),
                "query {executed}: DROP FUNCTION left the library mapped"
            );
            query(&ctx, create).await.unwrap();
            assert!(
                mapped(),
                "query {executed}: CREATE FUNCTION did not map the library"
            );
            churns += 1;
            churn_time += churn_started.elapsed();
        }
        let sql = QUERIES[executed % QUERIES.len()];
        let query_started = std::time::Instant::now();
        let got = answer(&ctx, sql).await;
        *per_query.entry(sql).or_default() += query_started.elapsed();
        let expected = first.entry(sql).or_insert_with(|| got.clone());
        assert_eq!(&got, expected, "query {executed}: {sql}");
        executed += 1;
        if executed % 1000 == 0 || executed == total {
            let (rss, hwm) = rss_kib();
            println!("after {executed:>6} queries: RSS {rss:>7} KiB, peak RSS {hwm:>7} KiB");
            checkpoints.push((executed, rss, hwm));
        }
    }

    // The answers were right, not merely stable: spot-check against the data.
    assert!(first[QUERIES[1]].contains(&(0..ROWS as i64).map(|x| x * x).sum::<i64>().to_string()));
    assert!(first[QUERIES[5]].contains(&(ROWS / 2).to_string()));
    assert!(
        first[QUERIES[10]].contains("division by zero"),
        "{}",
        first[QUERIES[10]]
    );
    assert!(
        first[QUERIES[11]].contains("panicked"),
        "{}",
        first[QUERIES[11]]
    );

    assert!(checkpoints.len() >= 2, "run at least 2,000 queries");
    for sql in QUERIES {
        let runs = total / QUERIES.len();
        println!(
            "{:>8.2} ms/query  {sql}",
            per_query[sql].as_secs_f64() * 1000.0 / runs.max(1) as f64
        );
    }
    println!(
        "{churns} times unmapped and mapped again, in {:.1} s of {:.1} s",
        churn_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(churns, total.div_ceil(50));
    // Flat: over the second half of the run, peak RSS grows by less than 2% (and 8 MiB).
    let half = checkpoints[checkpoints.len() / 2 - 1];
    let last = checkpoints[checkpoints.len() - 1];
    let growth = last.2.saturating_sub(half.2);
    println!(
        "peak RSS after {} queries: {} KiB; after {}: {} KiB (+{growth} KiB)",
        half.0, half.2, last.0, last.2
    );
    assert!(
        growth * 50 < half.2 && growth < 8 * 1024,
        "peak RSS still grows: {checkpoints:?}"
    );
}
