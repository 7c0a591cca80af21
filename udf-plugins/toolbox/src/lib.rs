//! ABI v2 example: one library exporting many functions that together use every supported type,
//! NULL-taking and NULL-returning functions, errors, a panic, volatile functions, and fixtures for
//! the tests of the rules the generated code keeps (`strict_probe*`, `jitter*`).

use std::sync::atomic::{AtomicU64, Ordering};

use udf_abi::{Date, Timestamp, udf};

/// `INT + INT`, an error on overflow.
#[udf]
fn add_i32(a: i32, b: i32) -> Result<i32, String> {
    a.checked_add(b)
        .ok_or_else(|| format!("integer overflow: {a} + {b}"))
}

/// Half of a `REAL`.
#[udf]
fn half_f32(x: f32) -> f32 {
    x / 2.0
}

/// Logical negation.
#[udf]
fn negate(b: bool) -> bool {
    !b
}

/// The number of bytes of a binary value.
#[udf]
fn byte_len(bytes: &[u8]) -> i64 {
    bytes.len() as i64
}

/// The bytes in reverse order.
#[udf]
fn reverse_bytes(bytes: Vec<u8>) -> Vec<u8> {
    bytes.into_iter().rev().collect()
}

/// Lower-case hexadecimal of a binary value.
#[udf]
fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Upper-cases a string (takes an owned `String`).
#[udf]
fn shout(s: String) -> String {
    s.to_uppercase() + "!"
}

/// `date + n days`, an error outside the `DATE` range.
#[udf]
fn add_days(d: Date, days: i32) -> Result<Date, String> {
    d.days_since_epoch
        .checked_add(days)
        .map(|days_since_epoch| Date { days_since_epoch })
        .ok_or_else(|| "date out of range".to_string())
}

/// ISO weekday of a date: 1 = Monday .. 7 = Sunday.
#[udf]
fn iso_weekday(d: Date) -> i32 {
    // 1970-01-01 was a Thursday (4).
    (d.days_since_epoch + 3).rem_euclid(7) + 1
}

/// The year of a date.
#[udf]
fn year_of(d: Date) -> i32 {
    d.to_ymd().0
}

/// `timestamp + seconds`, an error on overflow.
#[udf]
fn add_seconds(t: Timestamp, seconds: i64) -> Result<Timestamp, String> {
    seconds
        .checked_mul(1_000_000)
        .and_then(|us| t.micros_since_epoch.checked_add(us))
        .map(|micros_since_epoch| Timestamp { micros_since_epoch })
        .ok_or_else(|| "timestamp out of range".to_string())
}

/// Microseconds since the epoch of a timestamp.
#[udf]
fn epoch_micros(t: Timestamp) -> i64 {
    t.micros_since_epoch
}

/// Sees NULLs: the length of a string, or -1 for NULL; NULL for the empty string.
#[udf]
fn coalesce_len(s: Option<&str>) -> Option<i64> {
    match s {
        None => Some(-1),
        Some("") => None,
        Some(s) => Some(s.chars().count() as i64),
    }
}

/// NULL for the empty string, the string otherwise.
#[udf]
fn null_if_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Panics with the given message (to show that a panic becomes a SQL error).
#[udf]
fn boom(message: &str) -> i64 {
    panic!("boom: {message}")
}

/// A volatile function: a different number on every call (never constant-folded).
#[udf(name = "next_id", volatility = "volatile")]
fn counter() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Byte length of a string in UTF-8 (strings cross as pointer + length, NUL bytes included).
#[udf]
fn utf8_len(s: &str) -> u64 {
    s.len() as u64
}

/// `repeat` as an ABI v2 function (the seed's v1 `repeat` is in its own library): the string
/// `n` times, an error when the result cannot be allocated. It writes into the output
/// buffer `#[udf]` hands it, which is reused from row to row: no allocation per row.
#[udf]
fn repeat_text(s: &str, n: u64, out: &mut String) -> Result<(), String> {
    let too_large = || {
        format!(
            "result of repeating {} bytes {n} times is too large",
            s.len()
        )
    };
    let count = usize::try_from(n).map_err(|_| format!("count {n} is too large"))?;
    let len = s.len().checked_mul(count).ok_or_else(too_large)?;
    // try_reserve: an allocation that fails is an error for this call, not an abort of the host.
    out.try_reserve(len).map_err(|_| too_large())?;
    for _ in 0..count {
        out.push_str(s);
    }
    Ok(())
}

/// The value the `strict_probe` functions refuse (they count the call, then panic): tests put it
/// only into the value slots of NULL rows, where a function that does not take NULLs must never
/// be called.
const STRICT_PROBE_SENTINEL: i64 = -7_777_777;

/// How many times a `strict_probe` function was called with the sentinel.
static STRICT_PROBE_SENTINEL_CALLS: AtomicU64 = AtomicU64::new(0);

fn probe(x: i64) -> i64 {
    if x == STRICT_PROBE_SENTINEL {
        STRICT_PROBE_SENTINEL_CALLS.fetch_add(1, Ordering::SeqCst);
        panic!("called with {STRICT_PROBE_SENTINEL}, a value tests put only in NULL slots");
    }
    x
}

/// Test fixture: how many times the `strict_probe` functions have been called with the
/// sentinel -7777777 since the library was loaded.
#[udf(volatility = "volatile")]
fn strict_probe_sentinel_calls() -> u64 {
    STRICT_PROBE_SENTINEL_CALLS.load(Ordering::SeqCst)
}

/// Test fixture (a vectorised kernel of one argument): `x`, panicking on the sentinel
/// -7777777.
#[udf]
fn strict_probe(x: i64) -> i64 {
    probe(x)
}

/// Test fixture (a vectorised kernel of two arguments): `a + b` (wrapping), panicking when
/// either argument is the sentinel -7777777.
#[udf]
fn strict_probe_sum(a: i64, b: i64) -> i64 {
    probe(a).wrapping_add(probe(b))
}

/// Test fixture (a vectorised boolean kernel): whether `x` is odd, panicking on the sentinel
/// -7777777.
#[udf]
fn strict_probe_odd(x: i64) -> bool {
    probe(x) % 2 != 0
}

/// A volatile function of an argument: `x` plus a counter that grows by one on every call, so
/// `jitter(1)` differs from row to row (the generated code calls it once per row, even for a
/// constant argument).
#[udf(volatility = "volatile")]
fn jitter(x: i64) -> i64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    x.wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed) as i64)
}

/// `jitter` of two arguments: `a + b` plus a counter that grows by one on every call.
#[udf(volatility = "volatile")]
fn jitter_sum(a: i64, b: i64) -> i64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    a.wrapping_add(b)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed) as i64)
}

/// Five arguments of four types, the last taking NULLs: more than a batch call keeps on the
/// host's stack (its argument structs then live on the heap). `a|b|s|d|e`, a NULL `e` as `-`.
#[udf]
fn describe5(a: i64, b: f64, s: &str, d: i32, e: Option<i64>) -> String {
    let e = e.map_or_else(|| "-".to_string(), |e| e.to_string());
    format!("{a}|{b}|{s}|{d}|{e}")
}
