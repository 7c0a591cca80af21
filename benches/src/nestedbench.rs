//! A nested-type case against the nearest builtins: `#[udf(vectorized)]` functions of
//! `udf-plugins/arrow-types` over a `DOUBLE[]` column — `list_total(l)` (sum of the elements,
//! over the offsets) and `list_total_rows(l)` (the same written the ordinary way, one sliced array
//! per row) against DataFusion's `array_sum(l)`, and `list_count(l)` (number of elements) against
//! `cardinality(l)` — as `EXPLAIN ANALYZE` `elapsed_compute` of the `ProjectionExec` over
//! 1,048,576 rows (lists of 0 to 8 doubles, 5 % NULL lists, 10 % NULL elements) in 2 partitions,
//! median of `--rounds N` (default 7), and the wall time of the whole query.
//!
//! `cargo run --release -p udf-benches --bin nestedbench`.

use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Float64Array, ListArray, RecordBatch};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::Result;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::opbench::{explain_analyze, median, projection_elapsed_compute};
use crate::{BATCH, ROWS, plugin};

/// The cases: label, plugin expression, builtin expression.
const CASES: [(&str, &str, &str); 3] = [
    (
        "sum of a DOUBLE[] (offsets kernel)",
        "list_total(l)",
        "array_sum(l)",
    ),
    (
        "sum of a DOUBLE[] (a slice per row)",
        "list_total_rows(l)",
        "array_sum(l)",
    ),
    ("elements of a DOUBLE[]", "list_count(l)", "cardinality(l)"),
];

/// The benchmark table `n(l DOUBLE[])`, in `partitions` partitions of `BATCH`-row batches.
fn session(partitions: usize) -> Result<SessionContext> {
    let item = Arc::new(Field::new("item", DataType::Float64, true));
    let schema = Arc::new(Schema::new(vec![Field::new(
        "l",
        DataType::List(item.clone()),
        true,
    )]));
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut batches = Vec::new();
    for start in (0..ROWS).step_by(BATCH) {
        let rows = BATCH.min(ROWS - start);
        let lengths: Vec<usize> = (0..rows).map(|_| (next() % 9) as usize).collect();
        let total: usize = lengths.iter().sum();
        let values: Float64Array = (0..total)
            .map(|_| {
                let r = next();
                (r % 10 != 0).then(|| (r % 1000) as f64 / 8.0)
            })
            .collect();
        let valid: Vec<bool> = (0..rows).map(|_| next() % 20 != 0).collect();
        let list = ListArray::new(
            item.clone(),
            OffsetBuffer::from_lengths(lengths),
            Arc::new(values),
            Some(NullBuffer::from(valid)),
        );
        batches.push(RecordBatch::try_new(schema.clone(), vec![Arc::new(list)])?);
    }
    let per = batches.len().div_ceil(partitions);
    let parts: Vec<Vec<RecordBatch>> = batches.chunks(per).map(<[RecordBatch]>::to_vec).collect();
    let config = SessionConfig::new()
        .with_target_partitions(partitions)
        .with_batch_size(BATCH);
    let ctx = SessionContext::new_with_config(config);
    ctx.register_table("n", Arc::new(MemTable::try_new(schema, parts)?))?;
    udf_engine::register_plugin(&ctx, plugin("arrow-types"))
        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
    Ok(ctx)
}

/// `elapsed_compute` and wall time of `SELECT expr FROM n`, in nanoseconds, `rounds` times.
async fn measure(ctx: &SessionContext, expr: &str, rounds: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let sql = format!("SELECT {expr} AS y FROM n");
    let (mut op, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        op.push(projection_elapsed_compute(
            &explain_analyze(ctx, &sql).await?,
        )?);
        let start = Instant::now();
        let batches = ctx.sql(&sql).await?.collect().await?;
        wall.push(start.elapsed().as_nanos() as f64);
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, ROWS, "{sql}");
    }
    Ok((op, wall))
}

/// Checks that plugin and builtin agree on the rows where their definitions do: where the builtin
/// is not NULL (`array_sum` of a list without a non-NULL element is NULL, `list_total`'s 0).
async fn check(ctx: &SessionContext) -> Result<()> {
    for (label, plugin, builtin) in CASES {
        let sql = format!(
            "SELECT count(*) FROM n WHERE {builtin} IS NOT NULL AND \
             CAST({plugin} AS DOUBLE) IS DISTINCT FROM CAST({builtin} AS DOUBLE)"
        );
        let batches = ctx.sql(&sql).await?.collect().await?;
        let differ = datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string();
        assert!(
            differ.contains("| 0 "),
            "{label}: plugin and builtin differ:\n{differ}"
        );
    }
    Ok(())
}

fn ms(nanos: Option<f64>) -> String {
    nanos.map_or("-".into(), |n| format!("{:.2} ms", n / 1e6))
}

/// Runs the measurements and prints a Markdown table.
pub fn main() {
    let mut rounds = 7;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--rounds" {
            rounds = args
                .next()
                .and_then(|n| n.parse().ok())
                .expect("--rounds N");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let ctx = session(2).expect("session");
        check(&ctx).await.expect("check");
        println!(
            "{ROWS} rows of DOUBLE[] (0-8 elements), 2 partitions; median of {rounds} rounds\n"
        );
        println!("| case | builtin | elapsed_compute | plugin | elapsed_compute | ratio | wall builtin | wall plugin |");
        println!("|---|---|---|---|---|---|---|---|");
        for (label, plugin, builtin) in CASES {
            // Warm-up, then alternate so that both see the same machine state.
            measure(&ctx, builtin, 1).await.expect("warm-up");
            measure(&ctx, plugin, 1).await.expect("warm-up");
            let (b_op, b_wall) = measure(&ctx, builtin, rounds).await.expect(builtin);
            let (p_op, p_wall) = measure(&ctx, plugin, rounds).await.expect(plugin);
            let (b, p) = (median(&b_op), median(&p_op));
            let ratio = match (b, p) {
                (Some(b), Some(p)) if b > 0.0 => format!("{:.2}×", p / b),
                _ => "-".into(),
            };
            println!(
                "| {label} | `{builtin}` | {} | `{plugin}` | {} | {ratio} | {} | {} |",
                ms(b),
                ms(p),
                ms(median(&b_wall)),
                ms(median(&p_wall))
            );
        }
    });
}
