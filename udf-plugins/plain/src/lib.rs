//! `#[udf]` functions written the way an ordinary author writes them: each returns a value it
//! allocates itself (no `&mut String` output parameter). The benchmarks (`udf-benches`) compare
//! them with builtins and with the same bodies compiled into the host (`udf_benches::plain`);
//! keep the two copies identical.

use udf_abi::udf;

/// `x * x`: a plain primitive function (the batch path runs the generated kernel).
#[udf]
fn sq(x: i64) -> i64 {
    x * x
}

/// The string and `"!!"`: one exact allocation per row.
#[udf]
fn bang(s: &str) -> String {
    format!("{s}!!")
}

/// The characters in reverse order: a `String` grown by `collect`.
#[udf]
fn rev(s: &str) -> String {
    s.chars().rev().collect()
}

/// Upper case.
#[udf]
fn shout_plain(s: &str) -> String {
    s.to_uppercase()
}

/// The characters in reverse order, NULL for the empty string.
#[udf]
fn maybe_rev(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.chars().rev().collect())
    }
}

/// The bytes in reverse order.
#[udf]
fn rev_bytes(b: &[u8]) -> Vec<u8> {
    b.iter().rev().copied().collect()
}

/// The characters in reverse order, an error for a string containing a NUL character.
#[udf]
fn checked_rev(s: &str) -> Result<String, String> {
    if s.contains('\u{0}') {
        Err("the string contains a NUL character".to_string())
    } else {
        Ok(s.chars().rev().collect())
    }
}

/// `x * x` as an asynchronous function (`#[udf(async)]`), the way an ordinary author writes
/// one: asyncbench measures what a call costs when it waits for nothing.
#[udf(async)]
async fn sq_async(x: i64) -> i64 {
    x * x
}
