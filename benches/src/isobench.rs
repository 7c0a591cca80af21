//! What process isolation costs, measured three ways on the benchmark table (1,048,576 rows in
//! batches of 8192):
//!
//! 1. **Operator level**: `EXPLAIN ANALYZE` `elapsed_compute` of the `ProjectionExec` calling
//!    `repeat(name, 3)`: toolbox's `repeat_text` through the batch path in-process and isolated
//!    (one worker), and the v1 `repeat` (row only: the worker runs the row loop) in-process and
//!    isolated. One partition.
//! 2. **New pool**: registering an isolated function in a new session (the pool starts its first
//!    worker and waits for it: spawn, digest of the library, `dlopen`), then the session's first
//!    query over a 4-row table, against the same query once warm.
//! 3. **Partitions**: wall time of `SELECT repeat(name, 3)` over the whole table, isolated (pool
//!    of 2 workers) and in-process, with 1 and with 2 partitions.
//!
//! `cargo run --release -p udf-benches --bin isobench [-- --rounds N]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use udf_engine::{PluginLibrary, PluginUdf, WorkerLimits};

use crate::opbench::{explain_analyze, median, projection_elapsed_compute, query};
use crate::{plugin, session};

fn limits(workers: usize) -> WorkerLimits {
    WorkerLimits {
        workers: Some(workers),
        ..WorkerLimits::default()
    }
}

/// Registers `function` of `library` as `sql` in `ctx`, isolated with `limits` if given.
fn register(
    ctx: &SessionContext,
    library: &Arc<PluginLibrary>,
    function: &str,
    sql: &str,
    isolation: Option<&WorkerLimits>,
) {
    let f = library.function_named(function).expect("function");
    let mut udf = PluginUdf::new(sql, f, Volatility::Immutable);
    if let Some(limits) = isolation {
        let pool = udf_engine::isolation::pool_for(library, limits, 1).expect("worker program");
        udf = udf.with_worker_pool(pool);
    }
    ctx.register_udf(ScalarUDF::new_from_impl(udf));
}

async fn operator_level(rounds: usize) {
    let ctx = session(1);
    let toolbox = PluginLibrary::load(plugin("toolbox")).expect("toolbox");
    let v1 = PluginLibrary::load(plugin("repeat")).expect("repeat");
    register(&ctx, &toolbox, "repeat_text", "rep_batch", None);
    register(
        &ctx,
        &toolbox,
        "repeat_text",
        "rep_batch_iso",
        Some(&limits(1)),
    );
    register(&ctx, &v1, "repeat", "rep_v1", None);
    register(&ctx, &v1, "repeat", "rep_v1_iso", Some(&limits(1)));
    let variants = [
        ("batch in-process", "rep_batch(name, 3)"),
        ("batch isolated", "rep_batch_iso(name, 3)"),
        ("v1 row in-process", "rep_v1(name, 3)"),
        ("v1 row isolated", "rep_v1_iso(name, 3)"),
    ];
    // Warm up (starts the workers), then alternate the variants in every round.
    for (_, expr) in variants {
        explain_analyze(&ctx, &query(expr)).await.expect("warm-up");
    }
    let mut samples = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (_, expr)) in variants.iter().enumerate() {
            let plan = explain_analyze(&ctx, &query(expr)).await.expect("query");
            samples[i].push(projection_elapsed_compute(&plan).expect("metric"));
        }
    }
    let ms = |i: usize| median(&samples[i]).expect("samples") / 1e6;
    println!("operator level, elapsed_compute of ProjectionExec, 1 partition, median of {rounds}:");
    for (i, (label, expr)) in variants.iter().enumerate() {
        println!("  {label:<18} {expr:<24} {:>9.2} ms", ms(i));
    }
    println!(
        "  isolated / in-process: batch {:.2}x (+{:.1} µs per batch), v1 row {:.2}x",
        ms(1) / ms(0),
        (ms(1) - ms(0)) * 1e3 / (crate::ROWS / crate::BATCH) as f64,
        ms(3) / ms(2)
    );
}

async fn cold_pool(rounds: usize) {
    let toolbox = PluginLibrary::load(plugin("toolbox")).expect("toolbox");
    let sql = "SELECT rep(name, 3) FROM (VALUES ('a'), ('bb'), ('ccc'), ('dddd')) AS v(name)";
    // Registering creates the pool, which starts its first worker and waits for it; then the
    // session's first query, and its later (warm) queries.
    let (mut register_ms, mut first, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let ctx = SessionContext::new();
        let t = Instant::now();
        // A new pool every round: the last one went with the previous session.
        register(&ctx, &toolbox, "repeat_text", "rep", Some(&limits(1)));
        register_ms.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        ctx.sql(sql)
            .await
            .expect("plan")
            .collect()
            .await
            .expect("cold");
        first.push(t.elapsed().as_secs_f64());
        let mut w = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            ctx.sql(sql)
                .await
                .expect("plan")
                .collect()
                .await
                .expect("warm");
            w.push(t.elapsed().as_secs_f64());
        }
        warm.push(median(&w).expect("samples"));
        drop(ctx);
        assert!(
            wait_no_workers(Duration::from_secs(5)),
            "workers left after the session was dropped"
        );
    }
    let ms = |v: &[f64]| median(v).unwrap() * 1e3;
    let w = ms(&warm);
    println!("new pool, 4-row query, medians of {rounds}:");
    println!(
        "  registration (pool + first worker) {:.3} ms; first query {:.3} ms (+{:.3} ms over warm); warm {w:.3} ms",
        ms(&register_ms),
        ms(&first),
        ms(&first) - w
    );
}

fn wait_no_workers(limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if udf_engine::live_worker_pids().is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

async fn partitions(rounds: usize) {
    let toolbox = PluginLibrary::load(plugin("toolbox")).expect("toolbox");
    // [isolated, in-process] × [1, 2 partitions]
    let mut walls = [[0.0; 2]; 2];
    for (p, parts) in [1, 2].into_iter().enumerate() {
        let ctx = session(parts);
        register(&ctx, &toolbox, "repeat_text", "rep_iso", Some(&limits(2)));
        register(&ctx, &toolbox, "repeat_text", "rep_local", None);
        for (v, expr) in ["rep_iso(name, 3)", "rep_local(name, 3)"]
            .into_iter()
            .enumerate()
        {
            let sql = query(expr);
            ctx.sql(&sql)
                .await
                .unwrap()
                .collect()
                .await
                .expect("warm-up");
            let mut w = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                let batches = ctx.sql(&sql).await.unwrap().collect().await.expect("query");
                w.push(t.elapsed().as_secs_f64());
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                assert_eq!(rows, crate::ROWS);
            }
            walls[v][p] = median(&w).unwrap();
        }
    }
    println!("partitions, wall time of the whole query, median of {rounds}:");
    for (v, label) in ["isolated (pool of 2)", "in-process"]
        .into_iter()
        .enumerate()
    {
        println!(
            "  {label:<21} 1 partition {:.1} ms, 2 partitions {:.1} ms: {:.2}x faster",
            walls[v][0] * 1e3,
            walls[v][1] * 1e3,
            walls[v][0] / walls[v][1]
        );
    }
}

/// Runs the three measurements.
pub fn main() {
    let mut rounds = 9;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--rounds" {
            rounds = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--rounds N");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        operator_level(rounds).await;
        cold_pool(rounds * 3).await;
        partitions(rounds).await;
    });
}
