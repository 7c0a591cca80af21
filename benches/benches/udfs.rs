//! Plugin functions against DataFusion's builtins on 1,048,576 rows.
//!
//! `cargo bench -p udf-benches` (full) or `UDF_BENCH_QUICK=1 cargo bench -p udf-benches` (a few
//! minutes). Each SQL case is a full `ctx.sql(..).collect()`; each `kernel/` case calls the UDF's
//! `invoke_with_args` on one 8192-row batch.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use datafusion::prelude::SessionContext;
use udf_benches::{BATCH, ROWS, batches, literal_u64, plugin, session};
use udf_engine::PluginLibrary;

fn quick() -> bool {
    std::env::var_os("UDF_BENCH_QUICK").is_some()
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, rows: usize) {
    group.throughput(Throughput::Elements(rows as u64));
    if quick() {
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
    } else {
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(6));
    }
}

fn run(rt: &tokio::runtime::Runtime, ctx: &SessionContext, sql: &str) {
    let batches = rt.block_on(async { ctx.sql(sql).await.unwrap().collect().await.unwrap() });
    std::hint::black_box(batches);
}

fn sql_cases(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = session(2);
    let cases: [(&str, &[(&str, String)]); 4] = [
        (
            "repeat",
            &[
                ("builtin", "SELECT repeat(name, 3) FROM t".into()),
                ("row", "SELECT repeat_row(name, 3) FROM t".into()),
                ("batch", "SELECT repeat_batch(name, 3) FROM t".into()),
                (
                    "static",
                    "SELECT repeat_static(name, arrow_cast(3, 'UInt64')) FROM t".into(),
                ),
            ],
        ),
        (
            "square",
            &[
                ("builtin", "SELECT x * x FROM t".into()),
                ("row", "SELECT square_row(x) FROM t".into()),
                ("batch", "SELECT square_batch(x) FROM t".into()),
                ("static", "SELECT square_static(x) FROM t".into()),
            ],
        ),
        (
            "hypot",
            &[
                ("builtin", "SELECT sqrt(d * d + d * d) FROM t".into()),
                ("row", "SELECT hypot_row(d, d) FROM t".into()),
                ("batch", "SELECT hypot_batch(d, d) FROM t".into()),
                ("static", "SELECT hypot_static(d, d) FROM t".into()),
            ],
        ),
        (
            "is_even_where",
            &[
                ("builtin", "SELECT count(*) FROM t WHERE x % 2 = 0".into()),
                ("row", "SELECT count(*) FROM t WHERE is_even_row(x)".into()),
                (
                    "batch",
                    "SELECT count(*) FROM t WHERE is_even_batch(x)".into(),
                ),
                (
                    "static",
                    "SELECT count(*) FROM t WHERE is_even_static(x)".into(),
                ),
            ],
        ),
    ];
    for (name, variants) in cases {
        let mut group = c.benchmark_group(format!("sql/{name}"));
        configure(&mut group, ROWS);
        for (variant, sql) in variants {
            group.bench_function(*variant, |b| b.iter(|| run(&rt, &ctx, sql)));
        }
        group.finish();
    }

    // Scaling: the batch path on one and on two partitions (no global lock on the call path).
    let one = session(1);
    let mut group = c.benchmark_group("sql/partitions");
    configure(&mut group, ROWS);
    // The same queries with the builtins: how far this machine and DataFusion scale at all.
    for (case, sql) in [
        ("hypot_batch", "SELECT hypot_batch(d, d) FROM t"),
        ("hypot_builtin", "SELECT sqrt(d * d + d * d) FROM t"),
        ("repeat_batch", "SELECT repeat_batch(name, 3) FROM t"),
        ("repeat_builtin", "SELECT repeat(name, 3) FROM t"),
    ] {
        for (partitions, session) in [(1, &one), (2, &ctx)] {
            group.bench_function(format!("{case}/{partitions}"), |b| {
                b.iter(|| run(&rt, session, sql))
            });
        }
    }
    group.finish();
}

fn kernel_cases(c: &mut Criterion) {
    let ctx = session(1);
    let batch = &batches()[0];
    let name = batch.column(0).clone();
    let x = batch.column(1).clone();
    let d = batch.column(2).clone();
    let call = |f: &str, args: Vec<ColumnarValue>, arg_types: Vec<DataType>, ret: DataType| {
        let udf = ctx.udf(f).unwrap();
        let args = ScalarFunctionArgs {
            args,
            arg_fields: arg_types
                .into_iter()
                .enumerate()
                .map(|(i, t)| Arc::new(Field::new(format!("a{i}"), t, true)))
                .collect(),
            number_rows: BATCH,
            return_field: Arc::new(Field::new(f, ret, true)),
            config_options: Arc::new(Default::default()),
        };
        std::hint::black_box(udf.invoke_with_args(args).unwrap());
    };
    let mut group = c.benchmark_group("kernel");
    configure(&mut group, BATCH);
    for f in ["square_row", "square_batch", "square_static"] {
        group.bench_function(f, |b| {
            b.iter(|| {
                call(
                    f,
                    vec![ColumnarValue::Array(x.clone())],
                    vec![DataType::Int64],
                    DataType::Int64,
                )
            })
        });
    }
    for f in ["hypot_row", "hypot_batch", "hypot_static"] {
        group.bench_function(f, |b| {
            b.iter(|| {
                call(
                    f,
                    vec![
                        ColumnarValue::Array(d.clone()),
                        ColumnarValue::Array(d.clone()),
                    ],
                    vec![DataType::Float64, DataType::Float64],
                    DataType::Float64,
                )
            })
        });
    }
    for f in ["is_even_row", "is_even_batch", "is_even_static"] {
        group.bench_function(f, |b| {
            b.iter(|| {
                call(
                    f,
                    vec![ColumnarValue::Array(x.clone())],
                    vec![DataType::Int64],
                    DataType::Boolean,
                )
            })
        });
    }
    for f in ["repeat_row", "repeat_batch", "repeat_static"] {
        group.bench_function(f, |b| {
            b.iter(|| {
                call(
                    f,
                    vec![ColumnarValue::Array(name.clone()), literal_u64(3)],
                    vec![DataType::Utf8, DataType::UInt64],
                    DataType::Utf8,
                )
            })
        });
    }
    group.finish();
}

/// The fixed cost of one batch call: `PluginFunction::call_batch` straight, no DataFusion, on
/// 1-row arrays (where nearly all of the time is the per-call cost: exporting and importing over
/// the C Data Interface, the result checks, the NULL rules) and on one 8192-row batch.
fn fixed_cost(c: &mut Criterion) {
    let lib = PluginLibrary::load(plugin("plain")).expect("load plain plugin");
    let sq = lib.function_named("sq").expect("sq");
    let rev = lib.function_named("rev").expect("rev");
    assert!(sq.has_batch() && rev.has_batch());
    let one: ArrayRef = Arc::new(Int64Array::from(vec![7]));
    let full = batches()[0].column(1).clone();
    assert_eq!(full.len(), BATCH);
    let word: ArrayRef = Arc::new(StringArray::from(vec!["hello"]));
    let mut group = c.benchmark_group("fixed_cost");
    configure(&mut group, 1);
    let cases = [
        ("sq/1", &sq, &one),
        ("sq/8192", &sq, &full),
        ("rev/1", &rev, &word),
    ];
    for (name, f, array) in cases {
        let args = [(array.clone(), false)];
        let rows = array.len();
        group.bench_function(name, |b| {
            b.iter(|| std::hint::black_box(f.call_batch(&args, rows).expect("call_batch")))
        });
    }
    group.finish();
}

criterion_group!(benches, sql_cases, kernel_cases, fixed_cost);
criterion_main!(benches);
