//! Randomised tests of the plugin spec decoder, the part of a node that reads bytes any client
//! can write: [`fuzz_plugin_specs`] decodes byte-level mutations of valid specs (bit flips,
//! truncations, splices, huge numbers, deep nesting, huge strings, bytes that are not UTF-8)
//! from a seed, as the scheduler would, and reports every case that panicked, took too long,
//! or was refused without saying what was wrong.
//!
//! `cargo test` runs it with a fixed seed and a bounded number of cases; a soak binary can call it
//! with any seed and many more.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udf_engine::PluginLoader;
use udf_engine::types::fuzz::Rng;

use crate::resolve::{Resolver, Role};
use crate::spec::{IsolationSpec, MAGIC, MAX_SPEC_BYTES, PluginSpec};

/// The longest one case may take before it counts as a hang.
pub const CASE_DEADLINE: Duration = Duration::from_secs(2);

/// The name the decoder is given for every case (as a plan gives it the UDF's name).
const NAME: &str = "fuzzed_fn";

/// The longest error a refusal may give: the bytes may be 64 KiB, the error quotes only a part.
const MAX_ERROR_LEN: usize = 2048;

/// What a run of [`fuzz_plugin_specs`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuzzReport {
    /// Cases run.
    pub cases: usize,
    /// Cases decoded into a spec (and resolved for planning).
    pub decoded: usize,
    /// Cases refused with an error.
    pub refused: usize,
    /// Cases that were not specs at all (the magic was damaged).
    pub not_specs: usize,
    /// The longest case.
    pub slowest: Duration,
    /// Every failure: a panic, a case over [`CASE_DEADLINE`], an error that does not name the
    /// function, or a decoded spec that does not survive a round trip. Each names its case.
    pub failures: Vec<String>,
}

/// Valid specs of several shapes, encoded.
fn seeds() -> Vec<Vec<u8>> {
    let base = PluginSpec {
        sql_name: "my_repeat".into(),
        library: "libudf_plugin_repeat.so".into(),
        sha256: "0123456789abcdef".repeat(4),
        function: "repeat".into(),
        abi: "v1".into(),
        signature: "repeat(String, UInt) -> String".into(),
        arguments: 2,
        volatility: "stable".into(),
        call_path: "row".into(),
        return_type: "u".into(),
        isolation: None,
        asynchronous: None,
        aggregate: None,
    };
    let variants = [
        base.clone(),
        PluginSpec {
            isolation: Some(IsolationSpec {
                call_timeout_ms: 30_000,
                memory_mib: Some(1024),
                workers: Some(4),
            }),
            ..base.clone()
        },
        PluginSpec {
            sql_name: "pairs".into(),
            function: "pairs".into(),
            abi: "v2.2".into(),
            signature: "pairs(Int64) -> List(Int64)".into(),
            arguments: 1,
            volatility: "immutable".into(),
            call_path: "batch".into(),
            return_type: "+l<l>".into(),
            isolation: Some(IsolationSpec {
                call_timeout_ms: 1,
                memory_mib: None,
                workers: None,
            }),
            ..base.clone()
        },
        PluginSpec {
            sql_name: "next_id".into(),
            function: "next_id".into(),
            signature: "next_id() -> Int64".into(),
            arguments: 0,
            volatility: "volatile".into(),
            return_type: "d:12,2".into(),
            ..base.clone()
        },
        PluginSpec {
            sql_name: "http_get".into(),
            function: "http_get".into(),
            abi: "v2.3".into(),
            signature: "http_get(String) -> String".into(),
            arguments: 1,
            call_path: "batch".into(),
            asynchronous: Some(crate::spec::AsyncSpec {
                max_in_flight: 64,
                chunk_rows: 1,
                call_timeout_ms: 30_000,
                retries: 3,
            }),
            ..base.clone()
        },
        PluginSpec {
            sql_name: "geo_mean".into(),
            function: "geo_mean".into(),
            abi: "v2.4".into(),
            signature:
                "geo_mean(DOUBLE) -> DOUBLE [aggregate; state: s0 DOUBLE, s1 BIGINT UNSIGNED]"
                    .into(),
            arguments: 1,
            call_path: "batch".into(),
            return_type: "g".into(),
            aggregate: Some(crate::spec::AggregateSpec {
                state_names: vec!["s0".into(), "s1".into()],
                state_types: vec!["g".into(), "+l<L>".into()],
            }),
            ..base.clone()
        },
        PluginSpec {
            return_type: "Struct(\"x\": Float64, \"y\": Float64)".into(),
            ..base
        },
    ];
    variants
        .iter()
        .map(|spec| {
            let mut buf = Vec::new();
            spec.encode(&mut buf).expect("a valid spec encodes");
            buf
        })
        .collect()
}

/// Positions in `bytes` just after a `:` (where a JSON value starts), or anywhere if none.
fn value_start(rng: &mut Rng, bytes: &[u8]) -> usize {
    let colons: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b':')
        .map(|(i, _)| i + 1)
        .collect();
    if colons.is_empty() {
        rng.below(bytes.len() + 1)
    } else {
        *rng.pick(&colons)
    }
}

/// The end of the JSON value starting at `start` (a string, a number, a literal), roughly:
/// enough for replacing it.
fn value_end(bytes: &[u8], start: usize) -> usize {
    let mut i = start;
    if bytes.get(i) == Some(&b'"') {
        i += 1;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        return (i + 1).min(bytes.len());
    }
    while i < bytes.len() && !matches!(bytes[i], b',' | b'}' | b']') {
        i += 1;
    }
    i
}

/// One mutation of `input` (with `other` for splices); the name says which, for the report.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> (&'static str, Vec<u8>) {
    let mut bytes = input.to_vec();
    if bytes.is_empty() {
        return ("empty", bytes);
    }
    let kind = rng.below(12);
    let name = match kind {
        0 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            "bit flips"
        }
        1 => {
            let i = rng.below(bytes.len());
            bytes[i] = *rng.pick(&[0u8, 0xff, 0x80, b'"', b'\\', b'{', b'[', b'}', b'9', b'-']);
            "byte set"
        }
        2 => {
            bytes.truncate(rng.below(bytes.len() + 1));
            "truncation"
        }
        3 => {
            let (from, len) = (rng.below(other.len()), rng.below(64) + 1);
            let chunk = &other[from..(from + len).min(other.len())];
            let at = rng.below(bytes.len() + 1);
            bytes.splice(at..at, chunk.iter().copied());
            "splice"
        }
        4 => {
            let start = value_start(rng, &bytes);
            let end = value_end(&bytes, start);
            let huge: Vec<u8> = match rng.below(6) {
                0 => b"18446744073709551616".to_vec(),
                1 => b"-1".to_vec(),
                2 => b"1e999999".to_vec(),
                3 => std::iter::once(b'9')
                    .chain(std::iter::repeat_n(b'0', 400 + rng.below(4000)))
                    .collect(),
                4 => b"0.5".to_vec(),
                _ => b"9223372036854775807".to_vec(),
            };
            bytes.splice(start..end, huge);
            "huge number"
        }
        5 => {
            let start = value_start(rng, &bytes);
            let depth = *rng.pick(&[5usize, 100, 10_000, 60_000, 1_000_000]);
            let open = *rng.pick(b"[{");
            let nest: Vec<u8> = std::iter::repeat_n(open, depth).collect();
            bytes.splice(start..start, nest);
            "deep nesting"
        }
        6 => {
            let start = value_start(rng, &bytes);
            let end = value_end(&bytes, start);
            let len = *rng.pick(&[300usize, 5_000, 60_000, 70_000, 2_000_000]);
            let fill = *rng.pick(b"a(</\\");
            let mut huge = vec![b'"'];
            huge.extend(std::iter::repeat_n(fill, len));
            huge.push(b'"');
            bytes.splice(start..end, huge);
            "huge string"
        }
        7 => {
            // A string value that is not valid UTF-8, or escapes that decode to odd characters.
            let start = value_start(rng, &bytes);
            let end = value_end(&bytes, start);
            let odd: &[u8] = rng.pick::<&[u8]>(&[
                b"\"\xff\xfe\"".as_slice(),
                b"\"\\u0000\"",
                b"\"\\ud800\"",
                b"\"a/b\"",
                b"\"\"",
                b"\"..\"",
                b"null",
                b"{}",
                b"[]",
                b"true",
            ]);
            bytes.splice(start..end, odd.iter().copied());
            "odd value"
        }
        8 => {
            // A duplicated or unknown key.
            let at = bytes.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
            let key: &[u8] = rng.pick::<&[u8]>(&[
                b"\"sql_name\":\"again\",".as_slice(),
                b"\"extra\":1,",
                b"\"isolation\":{\"call_timeout_ms\":5,\"nested\":[1,2]},",
            ]);
            bytes.splice(at..at, key.iter().copied());
            "extra key"
        }
        9 => {
            // Damage to the magic: no longer a spec, or one with a wrong version.
            let i = rng.below(MAGIC.len().min(bytes.len()));
            bytes[i] = bytes[i].wrapping_add(1 + rng.below(200) as u8);
            "magic"
        }
        10 => {
            let len = rng.below(MAX_SPEC_BYTES * 2);
            let mut out = MAGIC.to_vec();
            out.extend((0..len).map(|_| rng.next_u64() as u8));
            bytes = out;
            "random bytes"
        }
        _ => {
            // Several mutations at once.
            let (_, once) = mutate(rng, input, other);
            let (_, twice) = mutate(rng, &once, other);
            bytes = twice;
            "several"
        }
    };
    (name, bytes)
}

/// Decodes `cases` mutations of valid specs generated from `seed` as a scheduler would (the
/// decoder, then planning with the decoded spec), and reports what happened. Never panics; a
/// panic inside a case is a failure in the report.
pub fn fuzz_plugin_specs(seed: u64, cases: usize) -> FuzzReport {
    let seeds = seeds();
    let planner = Resolver::new("fuzz scheduler", Role::Plan, Arc::new(PluginLoader::new()));
    let mut rng = Rng::new(seed);
    let mut report = FuzzReport::default();
    for case in 0..cases {
        let input = rng.pick(&seeds).clone();
        let other = rng.pick(&seeds).clone();
        let (kind, bytes) = mutate(&mut rng, &input, &other);
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check_case(&planner, &bytes)));
        let took = started.elapsed();
        report.cases += 1;
        report.slowest = report.slowest.max(took);
        let describe = |what: String| {
            format!(
                "seed {seed} case {case} ({kind}, {} bytes): {what}",
                bytes.len()
            )
        };
        match outcome {
            Err(_) => report.failures.push(describe("panicked".to_string())),
            Ok(Err(problem)) => report.failures.push(describe(problem)),
            Ok(Ok(Outcome::Decoded)) => report.decoded += 1,
            Ok(Ok(Outcome::Refused)) => report.refused += 1,
            Ok(Ok(Outcome::NotASpec)) => report.not_specs += 1,
        }
        if took > CASE_DEADLINE {
            report
                .failures
                .push(describe(format!("took {took:?}, over {CASE_DEADLINE:?}")));
        }
    }
    report
}

enum Outcome {
    Decoded,
    Refused,
    NotASpec,
}

/// One case: what the decoder did with `bytes`, or what was wrong with what it did.
fn check_case(planner: &Resolver, bytes: &[u8]) -> Result<Outcome, String> {
    match PluginSpec::decode(NAME, bytes) {
        Ok(None) if bytes.starts_with(MAGIC) => Err("a spec was taken for another payload".into()),
        Ok(None) => Ok(Outcome::NotASpec),
        Err(e) => {
            // Named by the plan's UDF name before the spec is read, by the spec's SQL name
            // after; either way "plugin function NAME: reason".
            let message = e.to_string();
            let reason = message
                .split_once("plugin function ")
                .and_then(|(_, rest)| rest.split_once(": "))
                .map(|(_, reason)| reason)
                .unwrap_or_default();
            if reason.len() < 10 {
                return Err(format!("refused without naming the function: {message}"));
            }
            if message.len() > MAX_ERROR_LEN {
                return Err(format!(
                    "an error of {} bytes: {}...",
                    message.len(),
                    &message[..message.floor_char_boundary(200)]
                ));
            }
            Ok(Outcome::Refused)
        }
        Ok(Some(spec)) => {
            if bytes.len() > MAX_SPEC_BYTES {
                return Err(format!(
                    "a spec of {} bytes was read, over {MAX_SPEC_BYTES}",
                    bytes.len()
                ));
            }
            let mut again = Vec::new();
            spec.encode(&mut again).map_err(|e| e.to_string())?;
            match PluginSpec::decode(NAME, &again) {
                Ok(Some(back)) if back == spec => {}
                other => return Err(format!("no round trip: {spec:?} came back as {other:?}")),
            }
            // Planning with it (what the scheduler does next) either works or fails cleanly.
            if let Err(e) = planner.resolve(&spec)
                && !e.to_string().contains("plugin function")
            {
                return Err(format!("planning failed without naming the function: {e}"));
            }
            Ok(Outcome::Decoded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed seed of `cargo test`; a soak run takes others.
    const SEED: u64 = 0x5eed_0024_0007;

    #[test]
    fn mutated_specs_never_panic_hang_or_go_unexplained() {
        let started = Instant::now();
        let report = fuzz_plugin_specs(SEED, 2000);
        eprintln!("{report:?} in {:?}", started.elapsed());
        assert!(report.failures.is_empty(), "{:#?}", report.failures);
        assert_eq!(report.cases, 2000);
        // The mutations reach every outcome: some still decode, most are refused, some are not
        // specs at all.
        assert!(report.decoded > 50, "{report:?}");
        assert!(report.refused > 700, "{report:?}");
        assert!(report.not_specs > 10, "{report:?}");
        assert!(report.slowest < CASE_DEADLINE, "{report:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let a = fuzz_plugin_specs(7, 200);
        let b = fuzz_plugin_specs(7, 200);
        assert_eq!(
            (a.cases, a.decoded, a.refused, a.not_specs),
            (b.cases, b.decoded, b.refused, b.not_specs)
        );
    }
}
