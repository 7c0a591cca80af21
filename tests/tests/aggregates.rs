//! Plugin aggregate functions (ABI 2.4) in-process: the example library `udf-plugins/stats`
//! (`#[udaf]`) against DataFusion's builtins over random inputs, partitionings and batch sizes,
//! with GROUP BY of low and high cardinality, FILTER, windows with sliding frames, and the
//! errors for what is not supported.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::PluginLibrary;
use udf_tests::{plugin, query_error, rows};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `t(i, g, x, d, s)`: `i` the row number, `g` one of `groups` groups, `x` a BIGINT with NULLs
/// (some extreme), `d` a DOUBLE, `s` a string; split into batches of `batch` rows.
fn table(rng: &mut Rng, rows: usize, groups: u64, batch: usize) -> MemTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("i", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
        Field::new("x", DataType::Int64, true),
        Field::new("d", DataType::Float64, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = batch.min(rows - start);
        let i = Int64Array::from_iter_values((start..start + n).map(|v| v as i64));
        let g = Int64Array::from_iter_values((0..n).map(|_| rng.below(groups.max(1)) as i64));
        let x = Int64Array::from_iter((0..n).map(|_| match rng.below(20) {
            0 => None,
            1 => Some(i64::MAX - rng.below(3) as i64),
            _ => Some(rng.below(2001) as i64 - 1000),
        }));
        let d = Float64Array::from_iter((0..n).map(|_| match rng.below(10) {
            0 => None,
            _ => Some((rng.below(10_000) as f64) / 100.0 + 0.01),
        }));
        let s = StringArray::from_iter((0..n).map(|_| match rng.below(10) {
            0 => None,
            _ => Some(format!("v{}", rng.below(500))),
        }));
        let columns: Vec<Arc<dyn datafusion::arrow::array::Array>> = vec![
            Arc::new(i),
            Arc::new(g),
            Arc::new(x),
            Arc::new(d),
            Arc::new(s),
        ];
        batches.push(RecordBatch::try_new(Arc::clone(&schema), columns).unwrap());
        start += n;
    }
    // Spread the batches over up to four partitions.
    let mut partitions = vec![Vec::new(); 4.min(batches.len().max(1))];
    for (k, b) in batches.into_iter().enumerate() {
        let p = k % partitions.len();
        partitions[p].push(b);
    }
    MemTable::try_new(schema, partitions).unwrap()
}

fn session(partitions: usize, batch_size: usize) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_batch_size(batch_size);
    let ctx = SessionContext::new_with_config(config);
    let library = PluginLibrary::load(plugin("stats")).expect("load the stats plugin");
    let mut names = udf_engine::register_aggregates(&ctx, &library);
    names.sort();
    assert_eq!(
        names,
        [
            "geo_mean",
            "hll_count",
            "median_exact",
            "my_sum",
            "my_sum_vec"
        ]
        .map(String::from),
        "the library's aggregates"
    );
    ctx
}

#[tokio::test]
async fn my_sum_equals_builtin_sum_on_random_inputs_partitionings_and_groupings() {
    let mut rng = Rng(0x5EED_2026_1203);
    for case in 0..24 {
        let n_rows = [0, 1, 5, 300, 5000][case % 5];
        let groups = [1, 7, 1000, 100_000][rng.below(4) as usize];
        let partitions = 1 + rng.below(4) as usize;
        let batch = [1, 37, 1024, 8192][rng.below(4) as usize];
        let ctx = session(partitions, batch);
        ctx.register_table("t", Arc::new(table(&mut rng, n_rows, groups, batch)))
            .unwrap();
        let what = format!(
            "case {case}: {n_rows} rows, {groups} groups, {partitions} partitions, batches of {batch}"
        );
        for sql in [
            "SELECT g, my_sum(x), sum(x) FROM t GROUP BY g ORDER BY g",
            "SELECT g, my_sum_vec(x), sum(x) FROM t GROUP BY g ORDER BY g",
            "SELECT my_sum(x), sum(x) FROM t",
            "SELECT my_sum_vec(x) FILTER (WHERE d > 30), sum(x) FILTER (WHERE d > 30) FROM t",
            "SELECT g, my_sum(x) FILTER (WHERE x > 0), sum(x) FILTER (WHERE x > 0) FROM t GROUP BY g ORDER BY g",
            "SELECT g % 3, my_sum(x + 1), sum(x + 1) FROM t WHERE d > 10 GROUP BY g % 3 ORDER BY 1",
            "SELECT g % 5, my_sum(DISTINCT x % 7), sum(DISTINCT x % 7) FROM t GROUP BY g % 5 ORDER BY 1",
        ] {
            let result = rows(&ctx, sql).await;
            for row in &result {
                let n = row.len();
                assert_eq!(row[n - 2], row[n - 1], "{what}: {sql}: {row:?}");
            }
            if sql.contains("GROUP BY g ORDER") {
                let groups_seen = rows(&ctx, "SELECT count(DISTINCT g) FROM t").await;
                let expected: usize = groups_seen[0][0].parse().unwrap();
                assert_eq!(result.len(), expected, "{what}: {sql}: one row per group");
            }
        }
    }
}

#[tokio::test]
async fn empty_and_all_null_inputs_give_null_and_one_row_without_group_by() {
    let ctx = session(2, 8192);
    ctx.sql("CREATE TABLE e (x BIGINT, d DOUBLE, s VARCHAR)")
        .await
        .unwrap();
    ctx.sql("CREATE TABLE n (x BIGINT, d DOUBLE, s VARCHAR) AS VALUES (NULL, NULL, NULL), (NULL, NULL, NULL)")
        .await
        .unwrap();
    for t in ["e", "n"] {
        let sql = format!(
            "SELECT my_sum(x), sum(x), geo_mean(d), median_exact(d), median(d), hll_count(s) FROM {t}"
        );
        assert_eq!(
            rows(&ctx, &sql).await,
            vec![vec!["NULL", "NULL", "NULL", "NULL", "NULL", "0"]],
            "{t}"
        );
        let grouped = format!("SELECT x, my_sum(x) FROM {t} GROUP BY x");
        let expected: Vec<Vec<String>> = if t == "e" {
            vec![]
        } else {
            vec![vec!["NULL".into(), "NULL".into()]]
        };
        assert_eq!(rows(&ctx, &grouped).await, expected, "{t}");
    }
}

#[tokio::test]
async fn geo_mean_median_and_hll_agree_with_builtins() {
    let mut rng = Rng(42);
    let ctx = session(3, 512);
    ctx.register_table("t", Arc::new(table(&mut rng, 20_000, 13, 512)))
        .unwrap();
    let result = rows(
        &ctx,
        "SELECT g, geo_mean(d), exp(avg(ln(d))), median_exact(d), median(d), hll_count(s), \
         count(DISTINCT s) FROM t GROUP BY g ORDER BY g",
    )
    .await;
    assert_eq!(result.len(), 13);
    for row in &result {
        let f = |i: usize| row[i].parse::<f64>().unwrap();
        assert!((f(1) - f(2)).abs() <= 1e-9 * f(2), "geo_mean {row:?}");
        assert_eq!(row[3], row[4], "median_exact equals median: {row:?}");
        let (estimate, exact) = (f(5), f(6));
        assert!(
            (estimate - exact).abs() <= 0.05 * exact,
            "hll_count within 5%: {row:?}"
        );
    }
    // A large number of distinct values, across partitions (states merged).
    ctx.sql(
        "CREATE TABLE big AS SELECT CAST(value AS VARCHAR) AS s FROM generate_series(1, 200000)",
    )
    .await
    .unwrap();
    let estimate: f64 = rows(&ctx, "SELECT hll_count(s) FROM big").await[0][0]
        .parse()
        .unwrap();
    assert!(
        (estimate - 200_000.0).abs() <= 0.05 * 200_000.0,
        "hll_count of 200000 distinct values: {estimate}"
    );
}

#[tokio::test]
async fn window_frames_slide_with_retract_and_refuse_without_it() {
    let mut rng = Rng(7);
    let ctx = session(2, 100);
    ctx.register_table("t", Arc::new(table(&mut rng, 3000, 5, 100)))
        .unwrap();
    for frame in [
        "ROWS BETWEEN 2 PRECEDING AND CURRENT ROW",
        "ROWS BETWEEN 10 PRECEDING AND 5 FOLLOWING",
        "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW",
        "RANGE BETWEEN 3 PRECEDING AND 3 FOLLOWING",
    ] {
        let sql = format!(
            "SELECT i, my_sum(x) OVER (PARTITION BY g ORDER BY i {frame}), \
             my_sum_vec(x) OVER (PARTITION BY g ORDER BY i {frame}), \
             sum(x) OVER (PARTITION BY g ORDER BY i {frame}) FROM t ORDER BY i"
        );
        let result = rows(&ctx, &sql).await;
        assert_eq!(result.len(), 3000, "{frame}");
        for row in &result {
            assert_eq!(row[1], row[3], "{frame}: {row:?}");
            assert_eq!(row[2], row[3], "{frame}: {row:?}");
        }
    }
    // A growing frame needs no retract.
    let growing = rows(
        &ctx,
        "SELECT i, median_exact(d) OVER (ORDER BY i ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW), \
         median(d) OVER (ORDER BY i ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM t \
         WHERE i < 300 ORDER BY i",
    )
    .await;
    assert_eq!(growing.len(), 300);
    for row in &growing {
        assert_eq!(row[1], row[2], "{row:?}");
    }
    // A sliding frame over an aggregate without retract: a clear error.
    let error = query_error(
        &ctx,
        "SELECT geo_mean(d) OVER (ORDER BY i ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) FROM t",
    )
    .await;
    assert!(
        error.contains("geo_mean") || error.contains("retract"),
        "{error}"
    );
}

#[tokio::test]
async fn unsupported_uses_and_bad_arguments_are_clear_errors() {
    let ctx = session(2, 8192);
    ctx.sql("CREATE TABLE t (x BIGINT, s VARCHAR) AS VALUES (1, 'a'), (2, 'b'), (2, 'b')")
        .await
        .unwrap();
    // DISTINCT: over one column DataFusion's optimizer groups by it first; over two the host
    // keeps the distinct rows and the plugin aggregates each once.
    for sql in [
        "SELECT my_sum(DISTINCT x) FROM t",
        "SELECT my_sum(DISTINCT x), hll_count(DISTINCT s) FROM t",
        "SELECT my_sum(DISTINCT x), hll_count(DISTINCT s), my_sum(x) FROM t",
    ] {
        let builtin = sql
            .replace("my_sum", "sum")
            .replace("hll_count(DISTINCT s)", "count(DISTINCT s)");
        assert_eq!(rows(&ctx, sql).await, rows(&ctx, &builtin).await, "{sql}");
    }
    let error = query_error(&ctx, "SELECT my_sum(s) FROM t").await;
    assert!(
        error.contains("my_sum") && error.contains("argument 1"),
        "{error}"
    );
    let error = query_error(&ctx, "SELECT my_sum(x, x) FROM t").await;
    assert!(
        error.contains("my_sum") && error.contains("1 argument"),
        "{error}"
    );
    // The session goes on.
    assert_eq!(
        rows(&ctx, "SELECT my_sum(x), hll_count(s) FROM t").await,
        vec![vec!["5", "2"]]
    );
    // Casts of the same family are accepted (INT into BIGINT).
    assert_eq!(
        rows(&ctx, "SELECT my_sum(CAST(x AS INT)) FROM t").await,
        vec![vec!["5"]]
    );
}

/// The C example `tests/fixtures/c/aggregates.c`, as it is (`None`) or misbehaving in one way.
fn c_aggregates(case: Option<&str>) -> std::path::PathBuf {
    match case {
        None => udf_tests::c_library("aggregates", "aggregates.c", &[]),
        Some(case) => udf_tests::c_library(
            &format!("aggregates_{}", case.to_lowercase()),
            "aggregates.c",
            &[case],
        ),
    }
}

/// A session with the C library's `c_sum` (and `t` as in `table`).
fn c_session(case: Option<&str>, partitions: usize, batch: usize) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_batch_size(batch);
    let ctx = SessionContext::new_with_config(config);
    let library = PluginLibrary::load(c_aggregates(case)).expect("load the C aggregate");
    assert!(
        library.functions().is_empty(),
        "a library of aggregates only"
    );
    assert_eq!(
        udf_engine::register_aggregates(&ctx, &library),
        vec!["c_sum".to_string()]
    );
    ctx
}

#[tokio::test]
async fn a_c_aggregate_equals_builtin_sum_grouped_merged_and_windowed() {
    let mut rng = Rng(99);
    for (partitions, batch, groups) in [(1, 8192, 1), (3, 37, 50), (4, 1000, 100_000)] {
        let ctx = c_session(None, partitions, batch);
        ctx.register_table("t", Arc::new(table(&mut rng, 4000, groups, batch)))
            .unwrap();
        for sql in [
            "SELECT g, c_sum(x), sum(x) FROM t GROUP BY g ORDER BY g",
            "SELECT c_sum(x), sum(x) FROM t",
            "SELECT g % 4, c_sum(x) FILTER (WHERE d < 50), sum(x) FILTER (WHERE d < 50) FROM t GROUP BY g % 4 ORDER BY 1",
            "SELECT i, c_sum(x) OVER (PARTITION BY g % 3 ORDER BY i ROWS BETWEEN 4 PRECEDING AND 1 FOLLOWING), \
             sum(x) OVER (PARTITION BY g % 3 ORDER BY i ROWS BETWEEN 4 PRECEDING AND 1 FOLLOWING) FROM t ORDER BY i",
        ] {
            let result = rows(&ctx, sql).await;
            assert!(!result.is_empty(), "{sql}");
            for row in &result {
                let n = row.len();
                assert_eq!(
                    row[n - 2],
                    row[n - 1],
                    "{partitions}/{batch}/{groups}: {sql}: {row:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn what_a_c_aggregate_returns_is_checked_and_errors_name_the_function() {
    // Results and states that do not match what the function declares fail the query with an
    // error naming the function and the library; the session goes on.
    for (case, grouped_only, expected) in [
        ("SHORT_STATE", true, "rows"),
        ("SHORT_RESULT", false, "rows"),
        ("WRONG_TYPE", false, "type"),
        ("NULL_BUFFER", false, "null"),
        ("ONE_FIELD", true, "field"),
        ("RELEASED", false, "released"),
        ("UPDATE_ERROR", false, "c_sum refuses these rows"),
        ("CREATE_NULL", false, "cannot create an accumulator today"),
    ] {
        let ctx = c_session(Some(case), 2, 64);
        ctx.sql("CREATE TABLE t AS SELECT value AS x, value % 5 AS g FROM generate_series(1, 500)")
            .await
            .unwrap();
        // Two partitions and GROUP BY: partial states cross to the final phase.
        let sql = if grouped_only {
            "SELECT g, c_sum(x) FROM t GROUP BY g"
        } else {
            "SELECT g, c_sum(x) FROM t GROUP BY g ORDER BY g"
        };
        let error = query_error(&ctx, sql).await;
        assert!(
            error.contains("c_sum")
                && error.contains("aggregates_")
                && error.to_lowercase().contains(expected),
            "{case}: {error}"
        );
        assert_eq!(
            rows(&ctx, "SELECT count(*) FROM t").await,
            vec![vec!["500"]],
            "{case}"
        );
    }
}

#[tokio::test]
async fn an_accumulator_that_lies_about_its_size_meets_the_memory_limit() {
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(64 << 20)))
        .build_arc()
        .unwrap();
    let ctx =
        SessionContext::new_with_config_rt(SessionConfig::new().with_target_partitions(2), runtime);
    let library = PluginLibrary::load(c_aggregates(Some("HUGE_SIZE"))).unwrap();
    udf_engine::register_aggregates(&ctx, &library);
    ctx.sql("CREATE TABLE t AS SELECT value AS x, value % 5 AS g FROM generate_series(1, 500)")
        .await
        .unwrap();
    let error = query_error(&ctx, "SELECT g, c_sum(x) FROM t GROUP BY g").await;
    assert!(
        error.contains("Resources exhausted") || error.contains("memory"),
        "{error}"
    );
    assert_eq!(
        rows(&ctx, "SELECT sum(x) FROM t").await,
        vec![vec!["125250"]]
    );
}

#[tokio::test]
async fn malformed_aggregate_entries_are_refused_at_load_naming_what_is_wrong() {
    for (case, expected) in [
        ("NULL_EVALUATE", "evaluate entrypoint is null"),
        ("BAD_STATE_TYPE", "state field rows"),
        ("NO_STATE", "0 state fields"),
    ] {
        let error = PluginLibrary::load(c_aggregates(Some(case)))
            .expect_err(case)
            .to_string();
        assert!(
            error.contains("c_sum") && error.contains(expected),
            "{case}: {error}"
        );
    }
}

/// Process isolation for the pool of a library (one or two workers).
fn isolation(workers: usize) -> udf_engine::Isolation {
    udf_engine::Isolation::Process(udf_engine::WorkerLimits {
        call_timeout: std::time::Duration::from_secs(30),
        memory_mib: None,
        workers: Some(workers),
        worker_program: Some(udf_tests::udfsql_worker()),
    })
}

/// Whether a live worker process of this process maps a file named like `path`'s.
fn a_worker_maps(path: &std::path::Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    udf_engine::live_worker_pids().iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .is_ok_and(|maps| maps.lines().any(|l| l.contains(&name)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_aggregates_answer_as_in_process_with_their_state_in_workers() {
    let mut rng = Rng(2024);
    let config = SessionConfig::new()
        .with_target_partitions(3)
        .with_batch_size(256);
    let ctx = SessionContext::new_with_config(config);
    let library = PluginLibrary::load(plugin("stats")).unwrap();
    udf_engine::register_library_with(&ctx, &library, &isolation(2)).unwrap();
    udf_engine::register_plugin_functions_table(&ctx).unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT DISTINCT kind, isolation FROM plugin_functions"
        )
        .await,
        vec![vec!["aggregate", "process"]]
    );
    ctx.register_table("t", Arc::new(table(&mut rng, 3000, 40, 256)))
        .unwrap();
    for sql in [
        "SELECT g, my_sum(x), sum(x) FROM t GROUP BY g ORDER BY g",
        "SELECT my_sum(x) FILTER (WHERE d > 20), sum(x) FILTER (WHERE d > 20) FROM t",
        "SELECT g % 4, median_exact(d), median(d) FROM t GROUP BY g % 4 ORDER BY 1",
        "SELECT g % 3, my_sum(DISTINCT x % 5), sum(DISTINCT x % 5) FROM t GROUP BY g % 3 ORDER BY 1",
        "SELECT i, my_sum(x) OVER (ORDER BY i ROWS BETWEEN 3 PRECEDING AND CURRENT ROW), \
         sum(x) OVER (ORDER BY i ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) FROM t ORDER BY i",
    ] {
        let result = rows(&ctx, sql).await;
        assert!(!result.is_empty(), "{sql}");
        for row in &result {
            let n = row.len();
            assert_eq!(row[n - 2], row[n - 1], "{sql}: {row:?}");
        }
    }
    assert!(
        a_worker_maps(&plugin("stats")),
        "a worker process holds the stats library"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_an_isolated_accumulator_fails_the_query_and_the_host_lives() {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
    let library = PluginLibrary::load(c_aggregates(Some("CRASH_ON_13"))).unwrap();
    udf_engine::register_library_with(&ctx, &library, &isolation(1)).unwrap();
    ctx.sql("CREATE TABLE t AS SELECT value AS x, value % 3 AS g FROM generate_series(1, 20)")
        .await
        .unwrap();
    let error = query_error(&ctx, "SELECT g, c_sum(x) FROM t GROUP BY g").await;
    assert!(
        error.contains("c_sum") && error.contains("SIGABRT"),
        "the worker's death by SIGABRT is the query's error: {error}"
    );
    // The host goes on, with a new worker.
    assert_eq!(
        rows(&ctx, "SELECT c_sum(x) FROM t WHERE x <> 13").await,
        vec![vec!["197"]]
    );
}

/// The `spill_count` of every `AggregateExec` line of an `EXPLAIN ANALYZE` text, summed.
fn spills(plan: &[Vec<String>]) -> usize {
    plan.iter()
        .flat_map(|row| row.iter())
        .flat_map(|cell| cell.lines())
        .filter(|line| line.trim_start().starts_with("AggregateExec"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("spill_count=")?;
            rest.split([',', ']']).next()?.trim().parse::<usize>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouping_under_a_memory_limit_spills_the_plugin_states_and_still_equals_sum() {
    use datafusion::execution::memory_pool::FairSpillPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(FairSpillPool::new(4 << 20)))
        .build_arc()
        .unwrap();
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(4096);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let library = PluginLibrary::load(plugin("stats")).unwrap();
    udf_engine::register_aggregates(&ctx, &library);
    ctx.sql(
        "CREATE TABLE t AS SELECT value AS x, (value * 7919) % 100003 AS g \
         FROM generate_series(1, 400000)",
    )
    .await
    .unwrap();
    let plan = rows(
        &ctx,
        "EXPLAIN ANALYZE SELECT g, my_sum(x) FROM t GROUP BY g",
    )
    .await;
    assert!(
        spills(&plan) > 0,
        "the aggregation spilled (the plugin's states written out and merged back): {plan:?}"
    );
    // Sorted here: a sort under this limit would need more memory than the aggregation.
    let mut mine = rows(&ctx, "SELECT g, my_sum(x) FROM t GROUP BY g").await;
    let mut builtin = rows(&ctx, "SELECT g, sum(x) FROM t GROUP BY g").await;
    mine.sort();
    builtin.sort();
    assert_eq!(mine.len(), 100_003);
    assert_eq!(mine, builtin);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// `t(g, x)` from `rows`, cut into batches of `batch` rows dealt over `partitions`.
    fn table_of(rows: &[(u8, Option<i64>)], partitions: usize, batch: usize) -> MemTable {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Int64, false),
            Field::new("x", DataType::Int64, true),
        ]));
        let mut parts = vec![Vec::new(); partitions];
        for (k, chunk) in rows.chunks(batch.max(1)).enumerate() {
            let g = Int64Array::from_iter_values(chunk.iter().map(|(g, _)| i64::from(*g)));
            let x = Int64Array::from_iter(chunk.iter().map(|(_, x)| *x));
            let columns: Vec<Arc<dyn datafusion::arrow::array::Array>> =
                vec![Arc::new(g), Arc::new(x)];
            parts[k % partitions].push(RecordBatch::try_new(Arc::clone(&schema), columns).unwrap());
        }
        MemTable::try_new(schema, parts).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

        /// `my_sum` and `my_sum_vec` equal the builtin `sum` and a reference computed here, per
        /// group and in total, whatever the values (NULLs, extremes), groups, partitions and
        /// batch sizes.
        #[test]
        fn my_sum_equals_builtin_sum(
            rows in prop::collection::vec(
                (0u8..12, prop::option::weighted(0.85, prop_oneof![any::<i64>(), -1000i64..1000])),
                0..600,
            ),
            partitions in 1usize..=4,
            batch in prop_oneof![Just(1usize), Just(7), Just(64), Just(1024)],
        ) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let ctx = session(partitions, batch);
            ctx.register_table("t", Arc::new(table_of(&rows, partitions, batch))).unwrap();
            let grouped = runtime.block_on(rows_of(
                &ctx,
                "SELECT g, my_sum(x), my_sum_vec(x), sum(x) FROM t GROUP BY g ORDER BY g",
            ));
            let mut reference: std::collections::BTreeMap<i64, Option<i64>> = Default::default();
            for (g, x) in &rows {
                let entry = reference.entry(i64::from(*g)).or_insert(None);
                if let Some(x) = x {
                    *entry = Some(entry.unwrap_or(0).wrapping_add(*x));
                }
            }
            let expected: Vec<Vec<String>> = reference
                .iter()
                .map(|(g, s)| {
                    let s = s.map_or("NULL".to_string(), |v| v.to_string());
                    vec![g.to_string(), s.clone(), s.clone(), s]
                })
                .collect();
            prop_assert_eq!(grouped, expected);
            let total = runtime.block_on(rows_of(&ctx, "SELECT my_sum(x), my_sum_vec(x), sum(x) FROM t"));
            prop_assert_eq!(&total[0][0], &total[0][2]);
            prop_assert_eq!(&total[0][1], &total[0][2]);
        }
    }

    async fn rows_of(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
        rows(ctx, sql).await
    }
}
