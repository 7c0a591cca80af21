//! The fixed cost of one batch call with cold caches: `PluginFunction::call_batch` of the plain
//! plugin's `sq` (no DataFusion) against the same kernel compiled into the host, each call
//! preceded by writing 32 MiB (which evicts the caches and the TLB, as the rest of a query does
//! between two batches), on 1 row, on one 8192-row batch and on one with NULLs (the table's
//! `xn`, one row in ten NULL); medians of 3000 calls each (`COLDCALL_WARM=1`: without the
//! eviction, warm caches).
//! `cargo run --release -p udf-benches --bin coldcall [LIBRARY FUNCTION]` (another library's
//! `BIGINT -> BIGINT` function in place of `sq`, e.g. one written in C, to compare).
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, AsArray, Int64Array};
use datafusion::arrow::datatypes::Int64Type;
use udf_benches::{batches, plugin};
use udf_engine::PluginLibrary;

const CALLS: usize = 3000;

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_nanos() as f64
}

fn main() {
    let mut given = std::env::args().skip(1);
    let (path, name) = match (given.next(), given.next()) {
        (Some(path), Some(name)) => (path.into(), name),
        _ => (plugin("plain"), "sq".to_string()),
    };
    let library = PluginLibrary::load(&path).expect("load the library");
    let sq = library.function_named(&name).expect("the function");
    let one: ArrayRef = Arc::new(Int64Array::from(vec![7]));
    let full = batches()[0].column(1).clone();
    let with_nulls = batches()[0].column(4).clone();
    let mut junk = vec![1u64; 4 << 20];
    // `COLDCALL_WARM=1`: no eviction, the caches warm from call to call.
    let warm = std::env::var("COLDCALL_WARM").is_ok_and(|v| v == "1");
    let mut evict = || {
        if warm {
            return;
        }
        for i in (0..junk.len()).step_by(8) {
            junk[i] = junk[i].wrapping_add(1);
        }
        black_box(&junk);
    };
    println!("| rows | batch call (ns) | kernel in the host (ns) | difference (ns) |");
    println!("|---:|---:|---:|---:|");
    for array in [&one, &full, &with_nulls] {
        let args = [(Arc::clone(array), false)];
        let rows = array.len();
        let (mut batch, mut host) = (Vec::new(), Vec::new());
        for _ in 0..CALLS {
            evict();
            let started = Instant::now();
            black_box(sq.call_batch(&args, rows).expect("sq"));
            batch.push(started.elapsed());
            evict();
            let started = Instant::now();
            let out: ArrayRef = Arc::new(
                array
                    .as_primitive::<Int64Type>()
                    .unary::<_, Int64Type>(|x| x.wrapping_mul(x)),
            );
            black_box(out);
            host.push(started.elapsed());
        }
        let (batch, host) = (median(batch), median(host));
        let rows = match array.null_count() {
            0 => rows.to_string(),
            n => format!("{rows} ({n} NULL)"),
        };
        println!("| {rows} | {batch:.0} | {host:.0} | {:.0} |", batch - host);
    }
}
