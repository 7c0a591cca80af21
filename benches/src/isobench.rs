//! What process isolation costs (issues 14 and 25), measured three ways on the benchmark table
//! (1,048,576 rows in batches of 8192):
//!
//! 1. **Operator level**: `EXPLAIN ANALYZE` `elapsed_compute` of the `ProjectionExec` calling
//!    the function, in-process against the same function isolated (pool of 1 worker), one
//!    partition, the two back to back in every round (alternating which goes first): the plain
//!    plugin's `#[udf]` `sq` (`i64 -> i64`, `x * x`), `bang` and `rev` (`&str -> String`) on the
//!    batch path, toolbox's `repeat_text` on the batch path, and the v1 `repeat` (row only: the
//!    worker runs the row loop). Each ratio is the median over the rounds of the ratio within
//!    the round, printed next to issue 25's target and the figures the issue started from; the
//!    transport cost per batch is (isolated − in-process) / number of batches, also paired.
//!    Before timing, every isolated function's result is checked against the in-process one.
//!    After the table: the floor of any transport that computes on another CPU
//!    (`transport_floor`, and `string_floor` for `repeat`'s large string results), what one
//!    column costs in each encoding of the worker protocol
//!    (`codec_costs`), and what a thread spinning on one CPU costs work on the other
//!    (`neighbour_cost`).
//! 2. **New pool**: registering an isolated function in a new session (the pool starts its first
//!    worker and waits for it: spawn, digest of the library, `dlopen`), then the session's first
//!    query over a 4-row table, against the same query once warm.
//! 3. **Partitions**: wall time of `SELECT repeat(name, 3)` (toolbox `repeat_text`) over the
//!    whole table, isolated (pool of 2 workers) and in-process, with 1 and with 2 partitions, the
//!    four back to back in every round; the speedups 1 → 2 partitions are medians of the
//!    per-round speedups, and issue 25's criterion is
//!    (isolated speedup − 1) / (in-process speedup − 1) ≥ 0.9.
//!
//! `cargo run --release -p udf-benches --bin isobench [-- --rounds N] [--only ID]` (default 9
//! rounds; `--only sq` measures one function at operator level and nothing else, for profiling;
//! `--only partitions` the partition criterion and nothing else).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, ArrayRef};
use datafusion::arrow::compute::concat;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use udf_engine::{CallPath, PluginLibrary, PluginUdf, WorkerLimits};

use crate::opbench::{explain_analyze, median, projection_elapsed_compute, query};
use crate::{BATCH, ROWS, plugin, session};

fn limits(workers: usize) -> WorkerLimits {
    WorkerLimits {
        workers: Some(workers),
        ..WorkerLimits::default()
    }
}

/// Registers `function` of `library` as `sql` in `ctx`, called through `path`, isolated with
/// `limits` if given.
fn register(
    ctx: &SessionContext,
    library: &Arc<PluginLibrary>,
    function: &str,
    sql: &str,
    path: CallPath,
    isolation: Option<&WorkerLimits>,
) {
    let f = library.function_named(function).expect("function");
    let mut udf = PluginUdf::new(sql, f, Volatility::Immutable).with_call_path(path);
    assert_eq!(
        udf.call_path(),
        path,
        "{function} has no {path:?} entrypoint"
    );
    if let Some(limits) = isolation {
        let pool = udf_engine::isolation::pool_for(library, limits, 1).expect("worker program");
        udf = udf.with_worker_pool(pool);
    }
    ctx.register_udf(ScalarUDF::new_from_impl(udf));
}

/// One function measured in-process against itself isolated.
#[derive(Debug, Clone, Copy)]
struct Pair {
    /// Prefix of the SQL names: `<id>_local` (in-process) and `<id>_iso` (isolated).
    id: &'static str,
    /// What is measured, for the table.
    label: &'static str,
    /// The plugin package (`udf-plugin-<plugin>`).
    plugin: &'static str,
    /// The function's name in the library.
    function: &'static str,
    path: CallPath,
    /// The arguments, over the benchmark table's columns.
    args: &'static str,
    /// Issue 25's target for isolated / in-process.
    target: f64,
    /// isolated / in-process before issue 25's work.
    today: &'static str,
}

impl Pair {
    fn expr(&self, isolated: bool) -> String {
        let side = if isolated { "iso" } else { "local" };
        format!("{}_{side}{}", self.id, self.args)
    }
}

/// The operator-level pairs: issue 25's three kinds of function (and toolbox's tuned
/// `repeat_text`, the function of issue 14's measurements).
const PAIRS: [Pair; 5] = [
    Pair {
        id: "sq",
        label: "plain `#[udf]` `sq(i64) -> i64` (`x * x`), batch path",
        plugin: "plain",
        function: "sq",
        path: CallPath::Batch,
        args: "(x)",
        target: 1.3,
        today: "6.2–6.7× (issue 25)",
    },
    Pair {
        id: "bang",
        label: "plain `#[udf]` `bang(&str) -> String` (`format!`), batch path",
        plugin: "plain",
        function: "bang",
        path: CallPath::Batch,
        args: "(name)",
        target: 1.2,
        today: "1.9–2.5× (issue 25)",
    },
    Pair {
        id: "rev",
        label: "plain `#[udf]` `rev(&str) -> String` (`chars().rev()`), batch path",
        plugin: "plain",
        function: "rev",
        path: CallPath::Batch,
        args: "(name)",
        target: 1.2,
        today: "1.9–2.5× (issue 25)",
    },
    Pair {
        id: "repeat_text",
        label: "toolbox `repeat_text` (`&mut String` output), batch path",
        plugin: "toolbox",
        function: "repeat_text",
        path: CallPath::Batch,
        args: "(name, 3)",
        target: 1.2,
        today: "1.59–2.03× (issue 14)",
    },
    Pair {
        id: "v1_repeat",
        label: "seed-contract v1 `repeat`, row loop in the worker",
        plugin: "repeat",
        function: "repeat",
        path: CallPath::Row,
        args: "(name, 3)",
        target: 1.1,
        today: "1.5–1.6× (issue 25)",
    },
];

/// The whole result column of `SELECT <expr> AS y FROM t`, in one array.
async fn column(ctx: &SessionContext, expr: &str) -> ArrayRef {
    let batches = ctx
        .sql(&query(expr))
        .await
        .expect("plan")
        .collect()
        .await
        .expect("query");
    let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(0).as_ref()).collect();
    concat(&arrays).expect("concat")
}

/// `f(a[r], b[r])` for every round `r`.
fn per_round(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "one sample of each side per round");
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

/// `min–max` of `values`, each formatted by `f`.
fn range(values: &[f64], f: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "—".into();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", f(min), f(max))
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

async fn operator_level(rounds: usize, only: Option<&str>) {
    let pairs: Vec<Pair> = PAIRS
        .iter()
        .filter(|p| only.is_none_or(|id| p.id == id))
        .copied()
        .collect();
    // One partition, so that the rows come back in order for the check and one worker serves.
    let ctx = session(1);
    let isolated = limits(1);
    for pair in &pairs {
        let library = PluginLibrary::load(plugin(pair.plugin)).expect("load plugin");
        let local = format!("{}_local", pair.id);
        let iso = format!("{}_iso", pair.id);
        register(&ctx, &library, pair.function, &local, pair.path, None);
        register(
            &ctx,
            &library,
            pair.function,
            &iso,
            pair.path,
            Some(&isolated),
        );
    }
    // The check doubles as the warm-up (it starts the workers and sizes the output buffers).
    for pair in &pairs {
        let want = column(&ctx, &pair.expr(false)).await;
        let got = column(&ctx, &pair.expr(true)).await;
        assert!(
            got.as_ref() == want.as_ref(),
            "{}: the isolated result differs from the in-process one",
            pair.id
        );
    }
    // Per pair: elapsed_compute in nanoseconds, one sample per round of each side.
    let mut local = vec![Vec::with_capacity(rounds); pairs.len()];
    let mut iso = vec![Vec::with_capacity(rounds); pairs.len()];
    for round in 0..rounds {
        for (p, pair) in pairs.iter().enumerate() {
            // Back to back, alternating which side goes first.
            let first_isolated = round % 2 == 1;
            for isolated in [first_isolated, !first_isolated] {
                let plan = explain_analyze(&ctx, &query(&pair.expr(isolated)))
                    .await
                    .expect("query");
                let nanos = projection_elapsed_compute(&plan).expect("metric");
                if isolated {
                    iso[p].push(nanos);
                } else {
                    local[p].push(nanos);
                }
            }
        }
    }
    drop(ctx);

    let batches = ROWS / BATCH;
    println!(
        "Operator level: `elapsed_compute` of the ProjectionExec, 1 partition, isolated = pool of \
         1 worker; median of {rounds} rounds, ms; {ROWS} rows in {batches} batches of {BATCH}. \
         Ratios and transport: median over the rounds of the ratio or difference within the \
         round (in-process and isolated back to back, alternating which goes first); range: \
         min–max of the per-round ratios."
    );
    println!();
    println!(
        "| function | expression | in-process | isolated | isolated / in-process | range \
         | target | met | before | transport per batch |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|---:|---:|");
    for (p, pair) in pairs.iter().enumerate() {
        let ratios = per_round(&iso[p], &local[p], |i, l| i / l);
        let ratio = median(&ratios).expect("samples");
        let transport = median(&per_round(&iso[p], &local[p], |i, l| {
            (i - l) / batches as f64 / 1e3
        }))
        .expect("samples");
        println!(
            "| {} | `{}{}` | {:.2} | {:.2} | **{ratio:.2}×** | {} | ≤ {:.1}× | {} | {} \
             | {transport:+.1} µs |",
            pair.label,
            pair.function,
            pair.args,
            median(&local[p]).expect("samples") / 1e6,
            median(&iso[p]).expect("samples") / 1e6,
            range(&ratios, |r| format!("{r:.2}×")),
            pair.target,
            met(ratio <= pair.target),
            pair.today,
        );
    }
    println!();
    let (one, both, in_place) = transport_floor(rounds);
    println!(
        "The floor of a worker on another CPU, without a process, IPC or checks (`x * x` over \
         the same column in 8192-row batches, µs per batch, median of {rounds} rounds): one \
         thread {one:.1}; a second thread computing, arguments copied in and the result copied \
         out {both:.1} (+{:.1}, {:.2}×); the result read in place {in_place:.1} (+{:.1}, {:.2}×).",
        both - one,
        both / one,
        in_place - one,
        in_place / one
    );
    let (one, copies) = string_floor(rounds);
    println!(
        "The same floor for `repeat(name, 3)` (the table's names, results of ~330 KB per batch; \
         both sides build the result in fresh buffers and check its UTF-8, as udfsql's do; µs \
         per batch, median of {rounds} rounds): one thread {one:.1}; a second thread computing, \
         the names copied in, the result copied into the reply buffer and copied out again \
         (the copies udfsql's untrusted worker requires) {copies:.1} (+{:.1}, {:.2}×).",
        copies - one,
        copies / one,
    );
    println!();
    codec_costs(rounds);
    println!();
    let (alone, busy, yielding) = neighbour_cost(rounds);
    println!(
        "What a spinning side costs the other CPU (row-by-row string work, `format!` of 8192 \
         rows, µs per batch, median of {rounds} rounds, min–max): alone {}; while a second \
         thread busy-spins {}; while it spins by `sched_yield` {}.",
        range_and_median(&alone),
        range_and_median(&busy),
        range_and_median(&yielding)
    );
    println!();
}

/// Buffers for `repeat(s, 3)` of the strings of `offsets`/`bytes`, reserved at their final size
/// (as udfsql's batch runtime reserves its results from the batch's size).
fn reserved(offsets: &[i32], bytes: &[u8]) -> (Vec<i32>, Vec<u8>) {
    (
        Vec::with_capacity(offsets.len()),
        Vec::with_capacity(bytes.len() * 3),
    )
}

/// `repeat(s, 3)` of every string of `offsets`/`bytes` into `out` (cleared first).
fn repeat3(offsets: &[i32], bytes: &[u8], out: &mut (Vec<i32>, Vec<u8>)) {
    out.0.clear();
    out.1.clear();
    out.0.push(0);
    for w in offsets.windows(2) {
        let s = &bytes[w[0] as usize..w[1] as usize];
        for _ in 0..3 {
            out.1.extend_from_slice(s);
        }
        out.0.push(out.1.len() as i32);
    }
}

/// [`transport_floor`] for a function with large string results: `repeat(name, 3)` over the
/// benchmark table's names. (a) One thread: the result built in fresh buffers (as a plugin
/// builds it) and its UTF-8 checked (as the host checks every result). (b) A second thread
/// computing: the calling thread copies the batch's names into a buffer the other thread reads,
/// the other builds the result in fresh buffers and copies it into its reply buffer (a worker's
/// copy into the shared region), the calling thread copies it out (the host's copy of untrusted
/// memory) and checks the copy. Returns the medians over `rounds` of µs per batch.
fn string_floor(rounds: usize) -> (f64, f64) {
    use datafusion::arrow::array::AsArray;
    let names: Vec<(Vec<i32>, Vec<u8>)> = crate::batches()
        .iter()
        .map(|b| {
            let names = b.column(0).as_string::<i32>();
            let first = names.value_offsets()[0];
            let offsets = names.value_offsets().iter().map(|o| o - first).collect();
            (offsets, names.value_data()[first as usize..].to_vec())
        })
        .collect();
    let checked = |column: &(Vec<i32>, Vec<u8>)| {
        let text = std::str::from_utf8(&column.1).expect("UTF-8");
        text.len() as i64 + i64::from(column.0[column.0.len() / 2])
    };
    let empty = || (Vec::<i32>::new(), Vec::<u8>::new());
    let (request, reply) = (Slot::new(empty()), Slot::new(empty()));
    let calls = (rounds * names.len()) as u64;
    let worker = floor_worker(
        &request,
        &reply,
        calls,
        |args: &(Vec<i32>, Vec<u8>), result| {
            // Built in fresh buffers (the plugin's), then copied into the reply (the region).
            let mut fresh = reserved(&args.0, &args.1);
            repeat3(&args.0, &args.1, &mut fresh);
            result.0.clear();
            result.0.extend_from_slice(&fresh.0);
            result.1.clear();
            result.1.extend_from_slice(&fresh.1);
        },
    );
    let mut seq = 0;
    let mut across = || {
        let start = Instant::now();
        let mut checksum = 0i64;
        for (offsets, bytes) in &names {
            seq += 1;
            {
                let mut args = request.column.lock().expect("args");
                args.0.clear();
                args.0.extend_from_slice(offsets);
                args.1.clear();
                args.1.extend_from_slice(bytes);
            }
            request.seq.store(seq, Ordering::Release);
            reply.await_seq(seq);
            let copy = reply.column.lock().expect("result").clone();
            checksum = checksum.wrapping_add(checked(&copy));
        }
        std::hint::black_box(checksum);
        start.elapsed().as_secs_f64() * 1e6 / names.len() as f64
    };
    let copied: Vec<f64> = (0..rounds).map(|_| across()).collect();
    worker.join().expect("the floor's worker thread");
    // The one-thread rounds after the worker thread has ended: no thread spins beside them.
    let one: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let mut checksum = 0i64;
            for (offsets, bytes) in &names {
                let mut out = reserved(offsets, bytes);
                repeat3(offsets, bytes, &mut out);
                checksum = checksum.wrapping_add(checked(&out));
            }
            std::hint::black_box(checksum);
            start.elapsed().as_secs_f64() * 1e6 / names.len() as f64
        })
        .collect();
    let m = |v: &[f64]| median(v).expect("samples");
    (m(&one), m(&copied))
}

/// What one 8192-row column costs to encode and decode (with every check a reply gets) in the
/// two encodings of the worker protocol: raw buffers and an Arrow IPC stream. A call encodes
/// and decodes its arguments and its result once each.
fn codec_costs(rounds: usize) {
    use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
    let rows = 8192;
    let columns: [(&str, ArrayRef); 3] = [
        (
            "BIGINT",
            Arc::new(Int64Array::from_iter_values(0..rows as i64)),
        ),
        (
            "VARCHAR (names)",
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("name {}", i % 1000)),
            )),
        ),
        (
            "VARCHAR (names × 3, as `repeat` returns)",
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("name {}", i % 1000).repeat(3)),
            )),
        ),
    ];
    println!(
        "One 8192-row column through the worker protocol's two encodings (µs, median of {} \
         rounds; decoding with every check a reply gets):",
        rounds * 50
    );
    println!();
    println!("| column | raw encode | raw decode | IPC encode | IPC decode |");
    println!("|---|---:|---:|---:|---:|");
    for (name, column) in columns {
        match udf_engine::isolation::column_codec_cost(&column, rounds * 50) {
            Ok([raw, ipc]) => println!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                raw.encode_us, raw.decode_us, ipc.encode_us, ipc.decode_us
            ),
            Err(e) => println!("| {name} | failed: {e} | | | |"),
        }
    }
}

fn range_and_median(values: &[f64]) -> String {
    format!(
        "{:.1} ({})",
        median(values).expect("samples"),
        range(values, |v| format!("{v:.1}"))
    )
}

/// Whether a thread that spins on one CPU slows down the work on the other (on a VM whose two
/// vCPUs may share a physical core, it can): the same row-by-row work (`format!` per row, as the
/// `bang` plugin does) timed alone, while a second thread busy-spins (`spin_loop`, as a waiting
/// side does in its busy phase) and while it spins by `sched_yield`, the three interleaved in
/// every round. µs per 8192-row batch, one sample per round each.
fn neighbour_cost(rounds: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let batches = 32;
    let work = || {
        let start = Instant::now();
        let mut total = 0usize;
        for _ in 0..batches {
            for i in 0..BATCH {
                total += std::hint::black_box(format!("row {i}!")).len();
            }
        }
        std::hint::black_box(total);
        start.elapsed().as_secs_f64() * 1e6 / batches as f64
    };
    let with_neighbour = |yielding: bool| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let neighbour = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if yielding {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let micros = work();
        stop.store(true, Ordering::Relaxed);
        neighbour.join().expect("the spinning thread");
        micros
    };
    let (mut alone, mut busy, mut yielding) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        alone.push(work());
        busy.push(with_neighbour(false));
        yielding.push(with_neighbour(true));
    }
    (alone, busy, yielding)
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
        register(
            &ctx,
            &toolbox,
            "repeat_text",
            "rep",
            CallPath::Batch,
            Some(&limits(1)),
        );
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
    let ms = |v: &[f64]| median(v).expect("samples") * 1e3;
    let w = ms(&warm);
    println!("New pool (toolbox `repeat_text`, pool of 1), 4-row query, medians of {rounds}, ms:");
    println!();
    println!("| measure | ms |");
    println!("|---|---:|");
    println!(
        "| registration of an isolated function (new pool + first worker) | {:.3} |",
        ms(&register_ms)
    );
    println!(
        "| first query after registration | {:.3} (+{:.3} over warm) |",
        ms(&first),
        ms(&first) - w
    );
    println!("| warm 4-row query | {w:.3} |");
    println!();
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

/// Wall time of the whole query, in seconds; checks that it returned every row.
async fn wall(ctx: &SessionContext, sql: &str) -> f64 {
    let t = Instant::now();
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("query");
    let secs = t.elapsed().as_secs_f64();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, ROWS, "{sql}");
    secs
}

/// Below this in-process speedup − 1 the scaling criterion is noise divided by noise.
const MIN_IN_PROCESS_GAIN: f64 = 0.05;

async fn partitions(rounds: usize) {
    let toolbox = PluginLibrary::load(plugin("toolbox")).expect("toolbox");
    // Sessions with the table in 1 and in 2 partitions; both use the same pool of 2 workers
    // (the pool is shared by library and limits).
    let contexts = [session(1), session(2)];
    for ctx in &contexts {
        register(
            ctx,
            &toolbox,
            "repeat_text",
            "rep_iso",
            CallPath::Batch,
            Some(&limits(2)),
        );
        register(
            ctx,
            &toolbox,
            "repeat_text",
            "rep_local",
            CallPath::Batch,
            None,
        );
    }
    let sqls = [query("rep_iso(name, 3)"), query("rep_local(name, 3)")];
    // (variant: isolated / in-process, partitions: 1 / 2)
    let combos = [(0, 0), (0, 1), (1, 0), (1, 1)];
    // Warm up (the 2-partition query starts the pool's second worker).
    for &(v, p) in &combos {
        wall(&contexts[p], &sqls[v]).await;
    }
    // walls[v][p]: one wall time per round.
    let mut walls: [[Vec<f64>; 2]; 2] = Default::default();
    for round in 0..rounds {
        // The four back to back, starting each round at another one.
        for k in 0..combos.len() {
            let (v, p) = combos[(k + round) % combos.len()];
            let secs = wall(&contexts[p], &sqls[v]).await;
            walls[v][p].push(secs);
        }
    }
    drop(contexts);

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "Partitions: wall time of `SELECT repeat(name, 3) AS y FROM t` (toolbox `repeat_text`, \
         batch path), table in 1 and in 2 partitions, median of {rounds} rounds, ms; speedup: \
         median of the per-round speedups (the four queries back to back in every round); \
         {cpus} CPUs available."
    );
    println!();
    println!("| variant | 1 partition | 2 partitions | 1 → 2 partitions | range |");
    println!("|---|---:|---:|---:|---:|");
    let mut speedup = [0.0; 2];
    for (v, label) in ["isolated (pool of 2)", "in-process"]
        .into_iter()
        .enumerate()
    {
        let speedups = per_round(&walls[v][0], &walls[v][1], |one, two| one / two);
        speedup[v] = median(&speedups).expect("samples");
        println!(
            "| {label} | {:.1} | {:.1} | {:.2}× | {} |",
            median(&walls[v][0]).expect("samples") * 1e3,
            median(&walls[v][1]).expect("samples") * 1e3,
            speedup[v],
            range(&speedups, |s| format!("{s:.2}×")),
        );
    }
    println!();
    let [isolated, in_process] = speedup;
    let gain = in_process - 1.0;
    let criterion = if gain >= MIN_IN_PROCESS_GAIN {
        let c = (isolated - 1.0) / gain;
        format!("**{c:.2}** | ≥ 0.9 | {}", met(c >= 0.9))
    } else {
        format!(
            "— (in-process speeds up only {in_process:.2}×, below {:.2}×: not measurable) \
             | ≥ 0.9 | —",
            1.0 + MIN_IN_PROCESS_GAIN
        )
    };
    println!("| scaling criterion | value | target | met |");
    println!("|---|---:|---:|---|");
    println!("| (isolated speedup − 1) / (in-process speedup − 1) | {criterion} |");
    println!();
}

/// Runs the three measurements.
pub fn main() {
    let mut rounds = 9;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("isobench: --rounds takes a positive number");
                        std::process::exit(2)
                    });
            }
            "--only" => only = args.next(),
            _ => {
                eprintln!("usage: isobench [--rounds N] [--only ID|partitions]");
                std::process::exit(2)
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        if only.as_deref() == Some("partitions") {
            partitions(rounds).await;
            return;
        }
        operator_level(rounds, only.as_deref()).await;
        if only.is_none() {
            cold_pool(rounds * 3).await;
            partitions(rounds).await;
        }
    });
    eprintln!(
        "isobench: {rounds} rounds took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// One side's hand-off slot in the floors ([`transport_floor`], [`string_floor`]): a column and
/// the number of the call it holds.
struct Slot<T> {
    seq: AtomicU64,
    column: Mutex<T>,
}

impl<T> Slot<T> {
    fn new(column: T) -> Arc<Slot<T>> {
        Arc::new(Slot {
            seq: AtomicU64::new(0),
            column: Mutex::new(column),
        })
    }

    fn await_seq(&self, seq: u64) {
        while self.seq.load(Ordering::Acquire) != seq {
            std::hint::spin_loop();
        }
    }
}

/// The floors' second thread: answers `calls` requests, each as soon as it is published (by
/// spinning), with `answer(arguments, result)`.
fn floor_worker<A: Send + 'static, R: Send + 'static>(
    request: &Arc<Slot<A>>,
    reply: &Arc<Slot<R>>,
    calls: u64,
    answer: impl Fn(&A, &mut R) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (request, reply) = (Arc::clone(request), Arc::clone(reply));
    std::thread::spawn(move || {
        for seq in 1..=calls {
            request.await_seq(seq);
            {
                let args = request.column.lock().expect("args");
                let mut result = reply.column.lock().expect("result");
                answer(&args, &mut result);
            }
            reply.seq.store(seq, Ordering::Release);
        }
    })
}

/// The floor of any transport that runs the function on another CPU, measured on this machine
/// without a worker process, IPC or checks: `x * x` over the benchmark table's `x` column, one
/// 8192-row batch at a time, (a) in one thread, and (b) with a second thread computing, the
/// calling thread copying each batch into a buffer the other thread reads (the arguments must
/// be copied into memory the worker can see), spinning until the other thread has written the
/// result into its own buffer, and copying the result out (the untrusted worker's memory cannot
/// be handed to the query). Returns the medians over `rounds` of µs per batch: (one thread,
/// two threads with both copies, two threads reading the result in place).
fn transport_floor(rounds: usize) -> (f64, f64, f64) {
    let source: Vec<i64> = (0..ROWS as i64).map(|i| i % 1000 - 500).collect();
    let batches = ROWS / BATCH;
    let square = |x: &[i64], out: &mut [i64]| {
        for (o, v) in out.iter_mut().zip(x) {
            *o = v.wrapping_mul(*v);
        }
    };
    let (request, reply) = (Slot::new(vec![0; BATCH]), Slot::new(vec![0; BATCH]));
    let calls = (rounds * 2 * batches) as u64;
    let worker = floor_worker(&request, &reply, calls, move |args: &Vec<i64>, result| {
        square(args, result)
    });
    let mut seq = 0;
    let mut across = |copy_out: bool| {
        let start = Instant::now();
        let mut checksum = 0i64;
        for chunk in source.chunks(BATCH) {
            seq += 1;
            request.column.lock().expect("args").copy_from_slice(chunk);
            request.seq.store(seq, Ordering::Release);
            reply.await_seq(seq);
            let result = reply.column.lock().expect("result");
            if copy_out {
                let owned: Vec<i64> = result.clone();
                checksum = checksum.wrapping_add(owned[seq as usize % BATCH]);
            } else {
                checksum = checksum.wrapping_add(result[seq as usize % BATCH]);
            }
        }
        std::hint::black_box(checksum);
        start.elapsed().as_secs_f64() * 1e6 / batches as f64
    };
    let (mut both, mut in_place) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        both.push(across(true));
        in_place.push(across(false));
    }
    worker.join().expect("the floor's worker thread");
    // The one-thread rounds after the worker thread has ended: no thread spins beside them.
    let one: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let mut checksum = 0i64;
            for chunk in source.chunks(BATCH) {
                let mut out = vec![0i64; BATCH];
                square(chunk, &mut out);
                checksum = checksum.wrapping_add(out[chunk.len() / 2]);
            }
            std::hint::black_box(checksum);
            start.elapsed().as_secs_f64() * 1e6 / batches as f64
        })
        .collect();
    let m = |v: &[f64]| median(v).expect("samples");
    (m(&one), m(&both), m(&in_place))
}
