//! The long run of the randomised decoder tests: every decoder of untrusted bytes — worker frames
//! and IPC replies, ABI 2.2 type strings, v2 manifests, Ballista plugin specs — fed byte-level
//! mutations of valid inputs from many seeds. `cargo test` runs each with one fixed seed in
//! bounded time; this runs them for longer and prints the figures BENCHMARKS.md reports.
//!
//! ```text
//! cargo run -p udf-benches --bin fuzzsoak -- [SEEDS] [CASES_PER_SEED] [SPEC_CASES_PER_SEED]
//! ```
//!
//! Defaults: 20 seeds (1..=20) × 20,000 cases per decoder, and a tenth of that for the Ballista
//! specs (each spec case also plans with the decoded spec: about 5 ms in a debug build). Exits with status 1 on any failure (a
//! panic, a case over its deadline, an accepted input of the wrong shape, an error that does not
//! name what it is about), printing the first ones.
#![forbid(unsafe_code)]

use std::time::Instant;

/// Totals of one decoder over every seed.
#[derive(Default)]
struct Totals {
    cases: u64,
    accepted: u64,
    refused: u64,
    failures: Vec<String>,
}

/// The totals of one seed of the engine's type-string or manifest run.
fn engine_totals(
    run: Result<udf_engine::types::fuzz::Report, udf_engine::types::fuzz::Failure>,
) -> Totals {
    match run {
        Ok(r) => Totals {
            cases: r.cases,
            accepted: r.accepted,
            refused: r.refused,
            failures: Vec::new(),
        },
        Err(failure) => Totals {
            failures: vec![failure],
            ..Totals::default()
        },
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seeds: u64 = args
        .next()
        .map_or(20, |s| s.parse().expect("SEEDS: a number"));
    let per_seed: u64 = args
        .next()
        .map_or(20_000, |s| s.parse().expect("CASES_PER_SEED: a number"));
    let spec_cases: u64 = args.next().map_or(per_seed / 10, |s| {
        s.parse().expect("SPEC_CASES_PER_SEED: a number")
    });
    let mut all_clean = true;
    let decoders: [(&str, &dyn Fn(u64) -> Totals); 4] = [
        ("worker frames and IPC replies", &|seed| {
            let r = udf_engine::isolation::fuzz_worker_replies(seed, per_seed as usize);
            let clean = r.clean();
            Totals {
                cases: r.cases as u64,
                accepted: (r.accepted + r.other_replies + r.calls_accepted) as u64,
                refused: r.refused as u64,
                failures: if clean { Vec::new() } else { r.failures },
            }
        }),
        ("ABI 2.2 type strings", &|seed| {
            engine_totals(udf_engine::types::fuzz::type_strings(seed, per_seed))
        }),
        ("v2 manifests", &|seed| {
            engine_totals(udf_engine::types::fuzz::manifests(seed, per_seed))
        }),
        ("Ballista plugin specs", &|seed| {
            let r = udf_distributed::fuzz::fuzz_plugin_specs(seed, spec_cases as usize);
            Totals {
                cases: r.cases as u64,
                accepted: r.decoded as u64,
                refused: (r.refused + r.not_specs) as u64,
                failures: r.failures,
            }
        }),
    ];
    println!("| decoder | seeds | cases | accepted | refused | failures | seconds |");
    println!("|---|---|---|---|---|---|---|");
    for (name, run) in decoders {
        let started = Instant::now();
        let mut totals = Totals::default();
        for seed in 1..=seeds {
            let t = run(seed);
            totals.cases += t.cases;
            totals.accepted += t.accepted;
            totals.refused += t.refused;
            totals.failures.extend(t.failures);
        }
        println!(
            "| {name} | {seeds} | {} | {} | {} | {} | {:.1} |",
            totals.cases,
            totals.accepted,
            totals.refused,
            totals.failures.len(),
            started.elapsed().as_secs_f64()
        );
        for failure in totals.failures.iter().take(5) {
            eprintln!("{name}: {failure}");
        }
        all_clean &= totals.failures.is_empty() && totals.cases > 0;
    }
    if !all_clean {
        std::process::exit(1);
    }
}
