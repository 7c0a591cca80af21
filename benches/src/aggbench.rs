//! Aggregate functions (issue 27) at operator level: the stats plugin's `#[udaf]` `my_sum`
//! (udfsql ABI 2.4, in-process) against DataFusion's builtin `sum` and against the same
//! aggregate written as an ordinary DataFusion `AggregateUDFImpl` behind `datafusion-ffi`'s
//! `FFI_AggregateUDF` (`my_sum_dffi`, `benches/dffi-peer`).
//!
//! * **GROUP BY**: `SELECT g, f(x) FROM t GROUP BY g` over 4,194,304 rows (batches of 8192, two
//!   partitions) with 10 and with 1,000,000 groups: the `elapsed_compute` of every
//!   `AggregateExec` of the plan (partial and final phases) summed, from `EXPLAIN ANALYZE`.
//! * `my_sum_vec`: the same sum in the SDK's expert form (`GroupsAggregate`: a column at a
//!   time over vectors of sums and counts), through the same ABI.
//! * The same `my_sum` isolated (`my_sum_iso`: accumulators in worker processes, one per
//!   partition) in the GROUP BY cases.
//! * **Sliding window**: `SELECT f(x) OVER (ORDER BY i ROWS BETWEEN 100 PRECEDING AND CURRENT
//!   ROW)` over 1,048,576 rows: the `elapsed_compute` of the `BoundedWindowAggExec`.
//!
//! The variants run back to back in every round, in a rotating order; each ratio is the median
//! of the per-round ratios to the builtin, with its range. Before timing, every variant's answer
//! is checked against the builtin's.
//!
//! `cargo run --release -p udf-benches --bin aggbench [-- --rounds N]` (default 7).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::opbench::{explain_analyze, median, parse_duration};

/// Rows of the GROUP BY table.
const GROUP_ROWS: usize = 1 << 22;
/// Rows of the window table.
const WINDOW_ROWS: usize = 1 << 20;
const BATCH: usize = 8192;

/// `t(i, g, x)`: `g` = a scrambled row number modulo `groups`, `x` small integers.
fn table(rows: usize, groups: u64, partitions: usize) -> Result<MemTable> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("i", DataType::Int64, false),
        Field::new("g", DataType::Int64, false),
        Field::new("x", DataType::Int64, true),
    ]));
    let mut parts = vec![Vec::new(); partitions];
    for (k, start) in (0..rows).step_by(BATCH).enumerate() {
        let n = BATCH.min(rows - start);
        let ids = (start..start + n).map(|v| v as u64);
        let i = Int64Array::from_iter_values(ids.clone().map(|v| v as i64));
        let g = Int64Array::from_iter_values(
            ids.clone()
                .map(|v| (v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % groups)
                .map(|v| v as i64),
        );
        let x = Int64Array::from_iter(ids.map(|v| (v % 97 != 0).then_some((v % 1000) as i64)));
        let columns: Vec<ArrayRef> = vec![Arc::new(i), Arc::new(g), Arc::new(x)];
        parts[k % partitions].push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
    }
    MemTable::try_new(schema, parts)
}

fn session(table: MemTable, partitions: usize) -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_batch_size(BATCH);
    let ctx = SessionContext::new_with_config(config);
    ctx.register_table("t", Arc::new(table))?;
    let library = udf_engine::PluginLibrary::load(crate::built("udf-plugin-stats"))
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    udf_engine::register_aggregates(&ctx, &library);
    crate::dffi::register_aggregates(&ctx);
    // The same aggregate isolated: its accumulators in worker processes (one per partition).
    let limits = udf_engine::WorkerLimits {
        workers: Some(partitions),
        ..udf_engine::WorkerLimits::default()
    };
    let pool = udf_engine::isolation::pool_for(&library, &limits, partitions)
        .map_err(DataFusionError::Execution)?;
    let my_sum = library
        .aggregate_named("my_sum")
        .ok_or_else(|| DataFusionError::Execution("no my_sum in the stats library".into()))?;
    udf_engine::register_udaf(
        &ctx,
        udf_engine::PluginUdaf::new("my_sum_iso", my_sum).with_worker_pool(pool),
    );
    Ok(ctx)
}

/// The summed `elapsed_compute` of every line of `plan` that starts with `operator`, in ns.
fn elapsed_of(plan: &str, operator: &str) -> Result<f64> {
    let mut total = None;
    for line in plan
        .lines()
        .filter(|l| l.trim_start().starts_with(operator))
    {
        let value = line
            .split_once("elapsed_compute=")
            .and_then(|(_, rest)| parse_duration(rest.split([',', ']']).next().unwrap_or("")))
            .ok_or_else(|| DataFusionError::Execution(format!("no elapsed_compute in {line}")))?;
        *total.get_or_insert(0.0) += value;
    }
    total.ok_or_else(|| DataFusionError::Execution(format!("no {operator} in:\n{plan}")))
}

/// The aggregate variants, the builtin first; the isolated one last.
const VARIANTS: [&str; 5] = ["sum", "my_sum", "my_sum_vec", "my_sum_dffi", "my_sum_iso"];

struct Case {
    title: String,
    ctx: SessionContext,
    sql: fn(&str) -> String,
    operator: &'static str,
    target: &'static str,
    /// How many of [`VARIANTS`] it measures (a sliding window calls the accumulator per row:
    /// isolated, that is a round trip to the worker per row, not measured).
    variants: usize,
}

async fn check(case: &Case) -> Result<()> {
    let builtin = case.ctx.sql(&(case.sql)("sum")).await?.collect().await?;
    for f in &VARIANTS[1..case.variants] {
        let other = case.ctx.sql(&(case.sql)(f)).await?.collect().await?;
        let a = datafusion::arrow::compute::concat_batches(&builtin[0].schema(), &builtin)?;
        let b = datafusion::arrow::compute::concat_batches(&other[0].schema(), &other)?;
        if a.columns() != b.columns() {
            return Err(DataFusionError::Execution(format!(
                "{}: {f} differs from sum",
                case.title
            )));
        }
    }
    Ok(())
}

fn range(values: &[f64]) -> String {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

pub fn main() {
    let mut rounds = 7usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            _ => {
                eprintln!("usage: aggbench [--rounds N]");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = runtime.block_on(run(rounds)) {
        eprintln!("aggbench: {e}");
        std::process::exit(1);
    }
}

async fn run(rounds: usize) -> Result<()> {
    let mut cases = Vec::new();
    for (groups, target) in [(10, "≤ 1.3×"), (1_000_000, "≤ 1.5×")] {
        cases.push(Case {
            title: format!("GROUP BY, {groups} groups, {GROUP_ROWS} rows, 2 partitions"),
            ctx: session(table(GROUP_ROWS, groups, 2)?, 2)?,
            sql: |f| format!("SELECT g, {f}(x) AS s FROM t GROUP BY g ORDER BY g"),
            operator: "AggregateExec",
            target,
            variants: VARIANTS.len(),
        });
    }
    cases.push(Case {
        title: format!("sliding window, 101 rows, {WINDOW_ROWS} rows"),
        ctx: session(table(WINDOW_ROWS, 1, 1)?, 1)?,
        sql: |f| {
            format!(
                "SELECT {f}(x) OVER (ORDER BY i ROWS BETWEEN 100 PRECEDING AND CURRENT ROW) AS s \
                 FROM t"
            )
        },
        operator: "BoundedWindowAggExec",
        target: "(none set)",
        variants: 4,
    });
    println!("# aggbench: {rounds} rounds, release build\n");
    for case in &cases {
        check(case).await?;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); case.variants];
        for round in 0..rounds {
            for k in 0..case.variants {
                let v = (round + k) % case.variants;
                let plan = explain_analyze(&case.ctx, &(case.sql)(VARIANTS[v])).await?;
                samples[v].push(elapsed_of(&plan, case.operator)?);
            }
        }
        println!("## {} (`{}` elapsed_compute)\n", case.title, case.operator);
        println!("| aggregate | median ms | ratio to sum (median, range) | target |");
        println!("|---|---:|---:|---|");
        for (v, name) in VARIANTS.iter().enumerate().take(case.variants) {
            let ratios: Vec<f64> = samples[v]
                .iter()
                .zip(&samples[0])
                .map(|(a, b)| a / b)
                .collect();
            let target = if *name == "my_sum" { case.target } else { "" };
            println!(
                "| `{name}` | {:.2} | {:.2}× ({}) | {target} |",
                median(&samples[v]).unwrap_or(f64::NAN) / 1e6,
                median(&ratios).unwrap_or(f64::NAN),
                range(&ratios)
            );
        }
        println!();
    }
    Ok(())
}
