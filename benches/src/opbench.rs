//! Operator-level measurements: for each case and each variant of a function, `EXPLAIN ANALYZE
//! SELECT f(args) AS y FROM t` over the 1,048,576-row benchmark table, reading DataFusion's
//! `elapsed_compute` of the `ProjectionExec` that calls the function (CPU time summed over the
//! partitions); beside it the whole query's wall time (`ctx.sql(..).collect()`); and the peak RSS
//! a query adds, each variant in a child process of its own. The variants: the nearest builtin,
//! the plugin's body linked statically, the plugin's batch and row paths, and (for `sq`, `bang`,
//! `rev` and `shout_plain`) the same body exported through DataFusion's own FFI (`dffi`).
//!
//! Run by `cargo bench -p udf-benches --bench opbench` (the `bench` profile, sharing its build
//! with the criterion benches) or `cargo run --release -p udf-benches --bin opbench`. Options:
//! `--rounds N` (default 7), `--no-rss`, and any other word: only the cases whose id contains it
//! (`cargo bench ... --bench opbench -- rev`). `--rss CASE VARIANT` is the child mode.

use std::process::Command;
use std::time::Instant;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::{cast, concat};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result};
use datafusion::prelude::SessionContext;

use crate::{BATCH, ROWS, session};

/// The variants, in the order of the tables: `dffi` is the plain plugin's body exported through
/// DataFusion's own FFI (`datafusion-ffi`, see [`crate::dffi`]).
pub const VARIANTS: [&str; 5] = ["builtin", "static", "batch", "row", "dffi"];

/// One function and its variants: the SQL expression of each (`None`: the variant does not
/// exist, e.g. the batch path of an ABI v1 plugin).
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Short name, for the command line.
    pub id: &'static str,
    /// What is measured, for the table.
    pub label: &'static str,
    /// `builtin`, `static`, `batch`, `row`, `dffi`.
    pub exprs: [Option<&'static str>; 5],
}

/// The cases: the seed-contract plugins, the plain `#[udf]` functions, and the toolbox's tuned
/// `repeat_text`, each against the nearest builtin doing the same job.
pub const CASES: [Case; 11] = [
    Case {
        id: "seed_square",
        label: "seed-contract `square` (v1, row only)",
        exprs: [
            Some("x * x"),
            Some("square_static(x)"),
            None,
            Some("seed_square_row(x)"),
            None,
        ],
    },
    Case {
        id: "v1_repeat",
        label: "the project's v1 `repeat` (row only)",
        exprs: [
            Some("repeat(name, 3)"),
            Some("v1_repeat_static(name, arrow_cast(3, 'UInt64'))"),
            None,
            Some("v1_repeat_row(name, 3)"),
            None,
        ],
    },
    Case {
        id: "sq",
        label: "plain `sq(x: i64) -> i64`",
        exprs: [
            Some("x * x"),
            Some("sq_static(x)"),
            Some("sq_batch(x)"),
            Some("sq_row(x)"),
            Some("sq_dffi(x)"),
        ],
    },
    Case {
        id: "sqn",
        label: "plain `sq(x: i64) -> i64` over a column with NULLs (1 row in 10)",
        exprs: [
            Some("xn * xn"),
            Some("sq_static(xn)"),
            Some("sq_batch(xn)"),
            Some("sq_row(xn)"),
            Some("sq_dffi(xn)"),
        ],
    },
    Case {
        id: "bang",
        label: "plain `bang -> String` (`format!`)",
        exprs: [
            Some("concat(name, '!!')"),
            Some("bang_static(name)"),
            Some("bang_batch(name)"),
            Some("bang_row(name)"),
            Some("bang_dffi(name)"),
        ],
    },
    Case {
        id: "rev",
        label: "plain `rev -> String` (`chars().rev().collect()`)",
        exprs: [
            Some("reverse(name)"),
            Some("rev_static(name)"),
            Some("rev_batch(name)"),
            Some("rev_row(name)"),
            Some("rev_dffi(name)"),
        ],
    },
    Case {
        id: "shout_plain",
        label: "plain `shout_plain -> String` (`to_uppercase`)",
        exprs: [
            Some("upper(name)"),
            Some("shout_plain_static(name)"),
            Some("shout_plain_batch(name)"),
            Some("shout_plain_row(name)"),
            Some("shout_plain_dffi(name)"),
        ],
    },
    Case {
        id: "maybe_rev",
        label: "plain `maybe_rev -> Option<String>`",
        exprs: [
            Some("reverse(nullif(name, ''))"),
            Some("maybe_rev_static(name)"),
            Some("maybe_rev_batch(name)"),
            Some("maybe_rev_row(name)"),
            None,
        ],
    },
    Case {
        id: "rev_bytes",
        label: "plain `rev_bytes(&[u8]) -> Vec<u8>`",
        exprs: [
            // No builtin reverses a binary value; `reverse` of the same bytes as a string.
            Some("reverse(name)"),
            Some("rev_bytes_static(b)"),
            Some("rev_bytes_batch(b)"),
            Some("rev_bytes_row(b)"),
            None,
        ],
    },
    Case {
        id: "checked_rev",
        label: "plain `checked_rev -> Result<String, String>`",
        exprs: [
            Some("reverse(name)"),
            Some("checked_rev_static(name)"),
            Some("checked_rev_batch(name)"),
            Some("checked_rev_row(name)"),
            None,
        ],
    },
    Case {
        id: "repeat_text",
        label: "toolbox `repeat_text` (`&mut String` output)",
        exprs: [
            Some("repeat(name, 3)"),
            Some("repeat_static(name, arrow_cast(3, 'UInt64'))"),
            Some("repeat_batch(name, 3)"),
            Some("repeat_row(name, 3)"),
            None,
        ],
    },
];

/// The query of one variant.
pub fn query(expr: &str) -> String {
    format!("SELECT {expr} AS y FROM t")
}

/// A duration as DataFusion 55 prints it (`human_readable_duration`: `812ns`, `3.25µs`,
/// `12.34ms`, `1.05s`), in nanoseconds.
pub fn parse_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    // Longest suffixes first: "ms", "ns" and "µs" also end in "s".
    for (suffix, nanos) in [
        ("ns", 1.0),
        ("µs", 1e3),
        ("μs", 1e3),
        ("us", 1e3),
        ("ms", 1e6),
        ("s", 1e9),
    ] {
        if let Some(number) = text.strip_suffix(suffix) {
            return number
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(|v| v * nanos);
        }
    }
    None
}

/// The `elapsed_compute` of the one `ProjectionExec` in an `EXPLAIN ANALYZE` plan text, in
/// nanoseconds.
pub fn projection_elapsed_compute(plan: &str) -> Result<f64> {
    let mut found = None;
    for line in plan.lines() {
        if !line.trim_start().starts_with("ProjectionExec:") {
            continue;
        }
        if found.is_some() {
            return Err(DataFusionError::Execution(format!(
                "more than one ProjectionExec in:\n{plan}"
            )));
        }
        let value = line
            .split_once("elapsed_compute=")
            .map(|(_, rest)| {
                rest.split([',', ']'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .and_then(|v| parse_duration(&v));
        found =
            Some(value.ok_or_else(|| {
                DataFusionError::Execution(format!("no elapsed_compute in: {line}"))
            })?);
    }
    found.ok_or_else(|| DataFusionError::Execution(format!("no ProjectionExec in:\n{plan}")))
}

/// Runs `EXPLAIN ANALYZE` of `sql` and returns the text of its plan with metrics.
pub async fn explain_analyze(ctx: &SessionContext, sql: &str) -> Result<String> {
    let batches = ctx
        .sql(&format!("EXPLAIN ANALYZE {sql}"))
        .await?
        .collect()
        .await?;
    let mut text = String::new();
    for batch in &batches {
        let plan = cast(batch.column(batch.num_columns() - 1), &DataType::Utf8)?;
        let plan = plan.as_string::<i32>();
        for i in 0..plan.len() {
            if plan.is_valid(i) {
                text.push_str(plan.value(i));
                text.push('\n');
            }
        }
    }
    Ok(text)
}

/// Wall time of the whole query, in nanoseconds; checks that it returned every row.
async fn wall_time(ctx: &SessionContext, sql: &str) -> Result<f64> {
    let start = Instant::now();
    let batches = ctx.sql(sql).await?.collect().await?;
    let nanos = start.elapsed().as_nanos() as f64;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    if rows != ROWS {
        return Err(DataFusionError::Execution(format!(
            "{sql} returned {rows} rows"
        )));
    }
    drop(std::hint::black_box(batches));
    Ok(nanos)
}

pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Some(if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    })
}

/// `/proc/self/status` field `name` (e.g. `VmHWM`), in KiB.
fn status_kib(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// Child mode: one query of `case`'s `variant` in a fresh process; prints `rss_kib <peak RSS the
/// query added, KiB> <rows>`.
fn rss_child(case_id: &str, variant: &str) -> Result<()> {
    let case = CASES
        .iter()
        .find(|c| c.id == case_id)
        .ok_or_else(|| DataFusionError::Plan(format!("no case {case_id}")))?;
    let index = VARIANTS
        .iter()
        .position(|v| *v == variant)
        .ok_or_else(|| DataFusionError::Plan(format!("no variant {variant}")))?;
    let expr = case.exprs[index]
        .ok_or_else(|| DataFusionError::Plan(format!("{case_id} has no {variant}")))?;
    let rt = runtime()?;
    let ctx = session(2);
    rt.block_on(async {
        // DataFusion's one-time initialisation is not the function's.
        ctx.sql("SELECT x FROM t LIMIT 1").await?.collect().await?;
        // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+), so that the
        // table's generation does not hide the query's peak.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let start = if reset {
            status_kib("VmRSS")
        } else {
            status_kib("VmHWM")
        }
        .ok_or_else(|| DataFusionError::Execution("no /proc/self/status".into()))?;
        let batches = ctx.sql(&query(expr)).await?.collect().await?;
        let peak = status_kib("VmHWM")
            .ok_or_else(|| DataFusionError::Execution("no /proc/self/status".into()))?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        println!(
            "rss_kib {} {rows} {}",
            peak.saturating_sub(start),
            if reset { "reset" } else { "no-reset" }
        );
        drop(batches);
        Ok::<_, DataFusionError>(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DataFusionError::from)
}

/// Spawns `--rss` children for every variant of `case`; `None` where the variant does not exist
/// or the child failed (reported on stderr).
fn rss_of(case: &Case) -> [Option<u64>; 5] {
    let mut out = [None; 5];
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("opbench: no current_exe; skipping RSS");
        return out;
    };
    for (i, variant) in VARIANTS.iter().enumerate() {
        if case.exprs[i].is_none() {
            continue;
        }
        // The parent has built the plugins already.
        let output = Command::new(&exe)
            .args(["--rss", case.id, variant])
            .env("UDF_BENCH_PLUGINS_BUILT", "1")
            .output();
        match output {
            Ok(o) if o.status.success() => {
                let stdout = String::from_utf8_lossy(&o.stdout);
                let line = stdout.lines().find_map(|l| l.strip_prefix("rss_kib "));
                let mut words = line.unwrap_or_default().split_whitespace();
                out[i] = words.next().and_then(|w| w.parse().ok());
                if words.nth(1) == Some("no-reset") {
                    eprintln!(
                        "opbench: VmHWM could not be reset; {} {variant} is an upper bound",
                        case.id
                    );
                }
            }
            Ok(o) => eprintln!(
                "opbench: --rss {} {variant} failed: {}",
                case.id,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("opbench: cannot run {}: {e}", exe.display()),
        }
    }
    out
}

fn ms(nanos: Option<f64>) -> String {
    nanos.map_or("—".into(), |n| format!("{:.2}", n / 1e6))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

/// The median over rounds of `f(a[r], b[r])`: the variants of a case run back to back in every
/// round, so a slow phase of the machine (this VM has them: every variant, builtins included,
/// slows down together for several rounds) affects both sides of a ratio alike.
fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let values: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    median(&values)
}

/// The paired ratio `a / b` as a table cell.
fn paired_ratio(a: &[f64], b: &[f64]) -> String {
    paired(a, b, |x, y| x / y).map_or("—".into(), |r| format!("{r:.2}×"))
}

/// Checks, on a one-partition session (so that the rows come back in order), that every variant
/// of every case returns what the case's static variant returns (the builtin's result cast to
/// the same type).
async fn check(ctx: &SessionContext, cases: &[&Case]) -> Result<()> {
    for case in cases {
        let mut expected: Option<(&str, ArrayRef)> = None;
        // Static first: the reference.
        for i in [1, 0, 2, 3, 4] {
            let Some(expr) = case.exprs[i] else { continue };
            let batches = ctx.sql(&query(expr)).await?.collect().await?;
            let arrays: Vec<&dyn Array> = batches.iter().map(|b| b.column(0).as_ref()).collect();
            let array = concat(&arrays)?;
            match &expected {
                None => expected = Some((VARIANTS[i], array)),
                Some((reference, want)) => {
                    let got = cast(&array, want.data_type())?;
                    if got.as_ref() != want.as_ref() {
                        return Err(DataFusionError::Execution(format!(
                            "{}: `{expr}` ({}) differs from the {reference} variant",
                            case.id, VARIANTS[i]
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Measured medians of one case: operator level and wall time, per variant, in nanoseconds.
#[derive(Debug)]
struct Measured {
    op: [Vec<f64>; 5],
    wall: [Vec<f64>; 5],
}

/// The measurement: prints the markdown tables to stdout.
pub fn run(
    rounds: usize,
    filter: &[String],
    with_rss: bool,
    partitions: usize,
    samples: bool,
) -> Result<()> {
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.id.contains(f.as_str())))
        .collect();
    if cases.is_empty() {
        eprintln!("opbench: no case matches {filter:?}");
        return Ok(());
    }
    let rt = runtime()?;
    let ctx = session(partitions);
    let batches = ROWS / BATCH;
    let started = Instant::now();
    let mut measured: Vec<Measured> = cases
        .iter()
        .map(|_| Measured {
            op: Default::default(),
            wall: Default::default(),
        })
        .collect();
    rt.block_on(check(&session(1), &cases))?;
    rt.block_on(async {
        // One plan, to show what is parsed.
        let sample = explain_analyze(&ctx, &query("sq_batch(x)")).await?;
        if let Some(line) = sample.lines().find(|l| l.contains("ProjectionExec:")) {
            println!("Parsed line (sq_batch): `{}`\n", line.trim());
        }
        // Round 0 warms up (allocator, caches, each function's bytes-per-row sizing); not kept.
        for round in 0..=rounds {
            for (case, m) in cases.iter().zip(measured.iter_mut()) {
                let present: Vec<usize> = (0..VARIANTS.len())
                    .filter(|&i| case.exprs[i].is_some())
                    .collect();
                // Alternate the variants, starting each round at another one.
                for k in 0..present.len() {
                    let i = present[(k + round) % present.len()];
                    let sql = query(case.exprs[i].expect("present"));
                    let plan = explain_analyze(&ctx, &sql).await?;
                    let op = projection_elapsed_compute(&plan)?;
                    let wall = wall_time(&ctx, &sql).await?;
                    if round > 0 {
                        m.op[i].push(op);
                        m.wall[i].push(wall);
                    }
                }
            }
        }
        Ok::<_, DataFusionError>(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();

    println!(
        "Operator level: `elapsed_compute` of the ProjectionExec (summed over the {partitions} \
         partition(s)), median of {rounds} rounds, ms; {ROWS} rows in {batches} batches of \
         {BATCH}. Ratios and differences: median over the rounds of the ratio or difference \
         within the round."
    );
    println!();
    println!(
        "| case | builtin used | builtin | static | batch | row | dffi | static / builtin \
         | batch / builtin | batch / static | row / builtin | dffi / builtin | dffi / static \
         | (batch − static) per batch | (dffi − static) per batch | (row − static) per row |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, m) in cases.iter().zip(&measured) {
        let med: Vec<Option<f64>> = m.op.iter().map(|s| median(s)).collect();
        let [o_builtin, o_static, o_batch, o_row, o_dffi] = &m.op;
        let per_batch = |o: &[f64]| {
            paired(o, o_static, |b, s| (b - s) / batches as f64 / 1e3)
                .map_or("—".into(), |us| format!("{us:.2} µs"))
        };
        let per_row = paired(o_row, o_static, |r, s| (r - s) / ROWS as f64)
            .map_or("—".into(), |ns| format!("{ns:.1} ns"));
        println!(
            "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} \
             | {per_row} |",
            case.label,
            case.exprs[0].unwrap_or("—"),
            ms(med[0]),
            ms(med[1]),
            ms(med[2]),
            ms(med[3]),
            ms(med[4]),
            paired_ratio(o_static, o_builtin),
            paired_ratio(o_batch, o_builtin),
            paired_ratio(o_batch, o_static),
            paired_ratio(o_row, o_builtin),
            paired_ratio(o_dffi, o_builtin),
            paired_ratio(o_dffi, o_static),
            per_batch(o_batch),
            per_batch(o_dffi),
        );
    }

    println!();
    println!(
        "Whole query: wall time of `ctx.sql(..).collect()`, median of {rounds} rounds, ms; \
         ratios paired as above."
    );
    println!();
    println!(
        "| case | builtin | static | batch | row | dffi | batch / builtin | batch / static \
         | row / builtin | dffi / builtin | dffi / static |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, m) in cases.iter().zip(&measured) {
        let med: Vec<Option<f64>> = m.wall.iter().map(|s| median(s)).collect();
        let [builtin, stat, batch, row, dffi] = &m.wall;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case.label,
            ms(med[0]),
            ms(med[1]),
            ms(med[2]),
            ms(med[3]),
            ms(med[4]),
            paired_ratio(batch, builtin),
            paired_ratio(batch, stat),
            paired_ratio(row, builtin),
            paired_ratio(dffi, builtin),
            paired_ratio(dffi, stat),
        );
    }

    println!();
    println!("Spread of the operator-level samples (min–max, ms):");
    println!();
    println!("| case | builtin | static | batch | row | dffi |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (case, m) in cases.iter().zip(&measured) {
        let spread = |s: &Vec<f64>| {
            let min = s.iter().copied().fold(f64::INFINITY, f64::min);
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if s.is_empty() {
                "—".to_string()
            } else {
                format!("{:.2}–{:.2}", min / 1e6, max / 1e6)
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            case.id,
            spread(&m.op[0]),
            spread(&m.op[1]),
            spread(&m.op[2]),
            spread(&m.op[3]),
            spread(&m.op[4]),
        );
    }
    if samples {
        println!();
        println!("Operator-level samples in round order (ms):");
        println!();
        for (case, m) in cases.iter().zip(&measured) {
            for (i, variant) in VARIANTS.iter().enumerate() {
                if !m.op[i].is_empty() {
                    let list: Vec<String> =
                        m.op[i].iter().map(|n| format!("{:.1}", n / 1e6)).collect();
                    println!("    {} {variant}: {}", case.id, list.join(" "));
                }
            }
        }
    }
    eprintln!("opbench: timing took {elapsed:.0} s");
    // Free the parent's measurements before the children run (they are separate processes; this
    // only keeps the parent small).
    measured.clear();

    if with_rss {
        println!();
        println!(
            "Peak RSS a query adds (`SELECT f(args) AS y FROM t`, results collected; VmHWM after \
             minus VmRSS before, VmHWM reset first; one child process per variant), MiB."
        );
        println!();
        println!(
            "| case | builtin | static | batch | row | dffi | batch / builtin | row / builtin \
             | dffi / builtin |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for case in &cases {
            let kib = rss_of(case);
            let f = |k: Option<u64>| k.map(|k| k as f64);
            let mib =
                |k: Option<u64>| k.map_or("—".into(), |k| format!("{:.1}", k as f64 / 1024.0));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                case.label,
                mib(kib[0]),
                mib(kib[1]),
                mib(kib[2]),
                mib(kib[3]),
                mib(kib[4]),
                ratio(f(kib[2]), f(kib[0])),
                ratio(f(kib[3]), f(kib[0])),
                ratio(f(kib[4]), f(kib[0])),
            );
        }
    }
    Ok(())
}

/// Entry point of the `opbench` binary and bench target.
pub fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("--rss") {
        match (args.get(1), args.get(2)) {
            (Some(case), Some(variant)) => rss_child(case, variant),
            _ => Err(DataFusionError::Plan(
                "usage: opbench --rss CASE VARIANT".into(),
            )),
        }
    } else {
        let mut rounds = 7;
        let mut with_rss = true;
        let mut partitions = 2;
        let mut samples = false;
        let mut filter = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--rounds" => {
                    rounds = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| {
                            eprintln!("opbench: --rounds takes a positive number");
                            std::process::exit(2)
                        })
                }
                "--no-rss" => with_rss = false,
                "--samples" => samples = true,
                "--partitions" => {
                    partitions = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| {
                            eprintln!("opbench: --partitions takes a positive number");
                            std::process::exit(2)
                        })
                }
                // What `cargo bench` passes to a bench target.
                "--bench" => {}
                a if a.starts_with('-') => {
                    eprintln!(
                        "usage: opbench [--rounds N] [--no-rss] [CASE-FILTER...] | --rss CASE VARIANT"
                    );
                    std::process::exit(2)
                }
                _ => filter.push(arg),
            }
        }
        run(rounds, &filter, with_rss, partitions, samples)
    };
    if let Err(e) = result {
        eprintln!("opbench: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_datafusion_prints_them() {
        let nanos = |text| parse_duration(text).map(f64::round);
        assert_eq!(nanos("812ns"), Some(812.0));
        assert_eq!(nanos("3.25µs"), Some(3250.0));
        assert_eq!(nanos("12.34ms"), Some(12_340_000.0));
        assert_eq!(nanos("1.05s"), Some(1_050_000_000.0));
        assert_eq!(parse_duration("NOT RECORDED"), None);
        assert_eq!(parse_duration("ms"), None);
    }

    #[test]
    fn the_projection_line_is_found_and_read() {
        let plan = "ProjectionExec: expr=[sq_batch(x@1) as y], metrics=[output_rows=1048576, \
                    elapsed_compute=1.23ms, output_bytes=8.0 MB, output_batches=128]\n  \
                    DataSourceExec: partitions=2, metrics=[]\n";
        assert_eq!(
            projection_elapsed_compute(plan).unwrap().round(),
            1_230_000.0
        );
        assert!(projection_elapsed_compute("DataSourceExec: x").is_err());
        let two = format!("{plan}{plan}");
        assert!(projection_elapsed_compute(&two).is_err());
    }
}
