//! Randomised checks of the host's decoders of what a library declares: ABI 2.2 Arrow type
//! strings ([`type_strings`]) and v2 manifests ([`manifests`]). Valid inputs are mutated byte
//! by byte and field by field with a seeded generator, and each result is checked: the decoder
//! never panics, never reads outside what the manifest's own counts allow, answers every input
//! (no hang: each case is one bounded parse), and its refusals name what they are about.
//!
//! `cargo test` runs a fixed seed for a bounded number of cases (the tests below); a soak run
//! calls the same functions with other seeds and more cases:
//!
//! ```no_run
//! let report = udf_engine::types::fuzz::type_strings(7, 1_000_000).unwrap();
//! let report = udf_engine::types::fuzz::manifests(7, 100_000).unwrap();
//! println!("{report:?}");
//! ```
//!
//! Manifest mutations stay memory-safe for a reader of a C struct: they change counts, tags,
//! flags, versions, sizes and which of the fixture's own buffers a pointer names (or null), never
//! a pointer into memory the fixture does not own; counts beyond a buffer are only ever larger
//! than the ABI's bounds, which the reader refuses before it reads.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Fields, IntervalUnit, TimeUnit};
use udf_abi::v2;

/// What a run did: cases run, and how many inputs the decoder accepted and refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Cases run.
    pub cases: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs it refused with an error.
    pub refused: u64,
}

/// A failed case: the seed, the case number and what went wrong (with the input).
pub type Failure = String;

/// A small, fast, seedable generator (SplitMix64): the same seed gives the same cases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`, or 0 when `n` is 0 (a mutation may empty what it then indexes).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `1 / n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const ZONES: [Option<&str>; 6] = [
    None,
    Some("UTC"),
    Some("+05:30"),
    Some("-08"),
    Some("Europe/Paris"),
    Some("America/New_York"),
];

/// A random valid Arrow type of the ABI, nested at most `depth` more levels.
fn random_type(rng: &mut Rng, depth: usize) -> DataType {
    let unit = *rng.pick(&[
        TimeUnit::Second,
        TimeUnit::Millisecond,
        TimeUnit::Microsecond,
        TimeUnit::Nanosecond,
    ]);
    let nested = depth > 0 && rng.one_in(3);
    if nested {
        return match rng.below(3) {
            0 => DataType::List(Arc::new(Field::new(
                "item",
                random_type(rng, depth - 1),
                true,
            ))),
            1 => DataType::LargeList(Arc::new(Field::new(
                "item",
                random_type(rng, depth - 1),
                true,
            ))),
            _ => {
                let n = 1 + rng.below(4);
                let fields: Vec<Field> = (0..n)
                    .map(|i| {
                        let name = match rng.below(4) {
                            0 => format!("f{i}"),
                            1 => format!("é{i}"),
                            2 => format!("a b{i}"),
                            _ => format!("{}{i}", "n".repeat(1 + rng.below(40))),
                        };
                        Field::new(name, random_type(rng, depth - 1), true)
                    })
                    .collect();
                DataType::Struct(Fields::from(fields))
            }
        };
    }
    match rng.below(26) {
        0 => DataType::Boolean,
        1 => DataType::Int8,
        2 => DataType::UInt8,
        3 => DataType::Int16,
        4 => DataType::UInt16,
        5 => DataType::Int32,
        6 => DataType::UInt32,
        7 => DataType::Int64,
        8 => DataType::UInt64,
        9 => DataType::Float32,
        10 => DataType::Float64,
        11 => DataType::Utf8,
        12 => DataType::LargeUtf8,
        13 => DataType::Utf8View,
        14 => DataType::Binary,
        15 => DataType::LargeBinary,
        16 => DataType::Date32,
        17 => DataType::Duration(unit),
        18 => DataType::Interval(IntervalUnit::MonthDayNano),
        19..=21 => {
            let p = 1 + rng.below(38) as u8;
            let s = rng.below(usize::from(p) + 1) as i8;
            DataType::Decimal128(p, s)
        }
        _ => DataType::Timestamp(unit, rng.pick(&ZONES).map(Arc::from)),
    }
}

/// A random valid type string.
pub(crate) fn random_type_string(rng: &mut Rng) -> String {
    let depth = 1 + rng.below(4);
    let t = random_type(rng, depth);
    super::arrow::type_string(&t).unwrap_or_else(|| "l".to_string())
}

/// Bytes that mean something in type strings, to insert.
const ALPHABET: &[u8] = b"+lLsSuUvzZcCiIfgbdtDnmpw<>:;,0123456789-/ _\xc3\xa9\xff\x00";

/// One to four byte-level mutations of `bytes`, kept under `max` bytes.
pub(crate) fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, max: usize) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                bytes[i] = *rng.pick(ALPHABET);
            }
            2 => {
                let i = rng.below(len + 1);
                bytes.insert(i, *rng.pick(ALPHABET));
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(8));
                bytes.drain(i..i + n);
            }
            4 if len > 0 => {
                // Duplicate a piece (deeper nesting, repeated fields).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                let piece: Vec<u8> = bytes[i..i + n].to_vec();
                let at = rng.below(len + 1);
                bytes.splice(at..at, piece);
            }
            5 => bytes.truncate(rng.below(len + 1)),
            6 if rng.one_in(8) => {
                // Very deep nesting, or very long.
                let n = 10 + rng.below(40);
                let mut deep = b"+l<".repeat(n);
                deep.extend_from_slice(bytes);
                deep.extend(std::iter::repeat_n(b'>', n));
                *bytes = deep;
            }
            7 if rng.one_in(16) => {
                bytes.extend(std::iter::repeat_n(b'x', 4096));
            }
            _ => {
                let i = rng.below(len + 1);
                let s = random_type_string(rng);
                bytes.splice(i..i, s.into_bytes());
            }
        }
    }
    bytes.truncate(max);
}

/// `parse` on `text` inside `catch_unwind`, with the checks every answer must pass.
fn check_type_string(text: &str) -> Result<bool, String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let parsed = super::arrow::parse(text);
        if let Ok(t) = &parsed {
            // An accepted type has a type string that parses back to it, and a SQL name.
            let again = super::arrow::type_string(t)
                .ok_or_else(|| format!("{t} was accepted but has no type string"))?;
            let back = super::arrow::parse(&again)
                .map_err(|e| format!("{t}: its type string `{again}` is refused: {e}"))?;
            if &back != t {
                return Err(format!("`{again}` parses to {back}, not {t}"));
            }
            let _name = super::arrow::sql_name(t);
        }
        Ok(parsed)
    }));
    match outcome {
        Err(_) => Err(format!("parse panicked on {text:?}")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Ok(_))) => Ok(true),
        Ok(Ok(Err(e))) if e.is_empty() => Err(format!("an empty error for {text:?}")),
        Ok(Ok(Err(_))) => Ok(false),
    }
}

/// `cases` mutated type strings from `seed`, each parsed by the host's parser (with its zone
/// check): never a panic, every refusal a message, every accepted type round-trips.
pub fn type_strings(seed: u64, cases: u64) -> Result<Report, Failure> {
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    for case in 0..cases {
        let mut bytes = random_type_string(&mut rng).into_bytes();
        mutate(&mut rng, &mut bytes, 2 * v2::MAX_TYPE_STRING_LEN);
        report.cases += 1;
        // The host reads a type string as UTF-8 first; what is not UTF-8 is refused there.
        let Ok(text) = std::str::from_utf8(&bytes) else {
            report.refused += 1;
            continue;
        };
        match check_type_string(text) {
            Ok(true) => report.accepted += 1,
            Ok(false) => report.refused += 1,
            Err(e) => return Err(format!("seed {seed}, case {case}: {e}")),
        }
    }
    Ok(report)
}

/// `cases` manifests from `seed`: valid ones of up to 6 functions with tagged and Arrow types,
/// each with one to six field mutations, read by the host's manifest reader: never a panic,
/// never a read outside the fixture's buffers, every refusal about a function names it.
pub fn manifests(seed: u64, cases: u64) -> Result<Report, Failure> {
    crate::ffi::fuzz_manifests(seed, cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed `cargo test` runs (a soak run uses others).
    const SEED: u64 = 0x5EED_2024;

    #[test]
    fn mutated_type_strings_never_panic_and_round_trip() {
        let report = type_strings(SEED, 100_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, 100_000);
        // Both outcomes are exercised.
        assert!(report.accepted > 1_000, "{report:?}");
        assert!(report.refused > 1_000, "{report:?}");
    }

    #[test]
    fn mutated_manifests_never_panic_and_name_the_function() {
        let report = manifests(SEED, 20_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cases, 20_000);
        assert!(report.accepted > 100, "{report:?}");
        assert!(report.refused > 1_000, "{report:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        assert_eq!(type_strings(3, 500), type_strings(3, 500));
        assert_eq!(manifests(3, 300), manifests(3, 300));
    }
}
