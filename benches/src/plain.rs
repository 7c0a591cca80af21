//! The "static" variants of the plugins written the ordinary way: the bodies of
//! `udf-plugins/plain` (and of the seed-contract `repeat` in `udf-plugins/repeat`), copied here
//! unchanged and compiled into the host as ordinary ScalarUDFs. They run the row loop the
//! `#[udf]` batch code runs (an Arrow builder sized from the bytes per row of the function's
//! previous batch, one append per row of the value the author's code returned), so the
//! difference to a plugin's `_batch` variant is what the boundary adds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Int64Type, UInt64Type};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

// The plugin bodies, exactly as in `udf-plugins/plain/src/lib.rs`.

/// `x * x`.
pub fn sq(x: i64) -> i64 {
    x * x
}

/// The string and `"!!"`.
pub fn bang(s: &str) -> String {
    format!("{s}!!")
}

/// The characters in reverse order.
pub fn rev(s: &str) -> String {
    s.chars().rev().collect()
}

/// Upper case.
pub fn shout_plain(s: &str) -> String {
    s.to_uppercase()
}

/// The characters in reverse order, NULL for the empty string.
pub fn maybe_rev(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.chars().rev().collect())
    }
}

/// The bytes in reverse order.
pub fn rev_bytes(b: &[u8]) -> Vec<u8> {
    b.iter().rev().copied().collect()
}

/// The characters in reverse order, an error for a string containing a NUL character.
pub fn checked_rev(s: &str) -> Result<String, String> {
    if s.contains('\u{0}') {
        Err("the string contains a NUL character".to_string())
    } else {
        Ok(s.chars().rev().collect())
    }
}

/// `repeat_impl` of the seed-contract plugin `udf-plugins/repeat`.
pub fn v1_repeat(input: &str, count: u64) -> Result<String, String> {
    let count = usize::try_from(count).map_err(|_| format!("count {count} is too large"))?;
    match input.len().checked_mul(count) {
        Some(len) if len <= isize::MAX as usize / 2 => Ok(input.repeat(count)),
        _ => Err(format!(
            "result of repeating {} bytes {count} times is too large",
            input.len()
        )),
    }
}

/// Which body a [`PlainStatic`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlainKind {
    /// [`sq`]
    Sq,
    /// [`bang`]
    Bang,
    /// [`rev`]
    Rev,
    /// [`shout_plain`]
    ShoutPlain,
    /// [`maybe_rev`]
    MaybeRev,
    /// [`rev_bytes`]
    RevBytes,
    /// [`checked_rev`]
    CheckedRev,
    /// [`v1_repeat`]
    V1Repeat,
}

impl PlainKind {
    /// Every kind, with the SQL name of its static UDF.
    pub const ALL: [(PlainKind, &'static str); 8] = [
        (PlainKind::Sq, "sq_static"),
        (PlainKind::Bang, "bang_static"),
        (PlainKind::Rev, "rev_static"),
        (PlainKind::ShoutPlain, "shout_plain_static"),
        (PlainKind::MaybeRev, "maybe_rev_static"),
        (PlainKind::RevBytes, "rev_bytes_static"),
        (PlainKind::CheckedRev, "checked_rev_static"),
        (PlainKind::V1Repeat, "v1_repeat_static"),
    ];

    fn slot(self) -> &'static AtomicUsize {
        // One "bytes per row of the last batch" per function, as `#[udf]` keeps one per function.
        static SLOTS: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];
        &SLOTS[self as usize]
    }
}

/// A plain body compiled into the host as an ordinary ScalarUDF.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PlainStatic {
    name: String,
    kind: PlainKind,
    signature: Signature,
}

impl PlainStatic {
    /// The UDF `name` running `kind`'s body.
    pub fn new(name: &str, kind: PlainKind) -> PlainStatic {
        let types = match kind {
            PlainKind::Sq => vec![DataType::Int64],
            PlainKind::RevBytes => vec![DataType::Binary],
            PlainKind::V1Repeat => vec![DataType::Utf8, DataType::UInt64],
            _ => vec![DataType::Utf8],
        };
        PlainStatic {
            name: name.to_string(),
            kind,
            signature: Signature::exact(types, Volatility::Immutable),
        }
    }
}

/// The capacity `#[udf]`'s row loop reserves: 16 bytes per row at first, then the last batch's
/// bytes per row plus an eighth, at most 16 MiB.
fn capacity(rows: usize, slot: &AtomicUsize) -> usize {
    let per_row = match slot.load(Relaxed) {
        0 => 16,
        n => n.saturating_add(n / 8).saturating_add(1),
    };
    rows.saturating_mul(per_row).min(16 << 20)
}

/// Runs `f` on every row of `s` into a string array (NULL in, NULL out; the author's error is
/// the query's error).
fn utf8_rows<R: AsRef<str>>(
    s: &StringArray,
    slot: &AtomicUsize,
    mut f: impl FnMut(usize, &str) -> Result<Option<R>, String>,
) -> Result<ArrayRef> {
    let rows = s.len();
    let mut b = StringBuilder::with_capacity(rows, capacity(rows, slot));
    for i in 0..rows {
        if s.is_null(i) {
            b.append_null();
            continue;
        }
        match f(i, s.value(i)) {
            Ok(Some(v)) => b.append_value(v),
            Ok(None) => b.append_null(),
            Err(e) => return exec_err!("{e}"),
        }
    }
    if rows > 0 {
        slot.store(b.values_slice().len().div_ceil(rows), Relaxed);
    }
    Ok(Arc::new(b.finish()))
}

/// [`utf8_rows`] for binary input and output.
fn binary_rows<R: AsRef<[u8]>>(
    s: &BinaryArray,
    slot: &AtomicUsize,
    mut f: impl FnMut(&[u8]) -> R,
) -> Result<ArrayRef> {
    let rows = s.len();
    let mut b = BinaryBuilder::with_capacity(rows, capacity(rows, slot));
    for i in 0..rows {
        if s.is_null(i) {
            b.append_null();
        } else {
            b.append_value(f(s.value(i)));
        }
    }
    if rows > 0 {
        slot.store(b.values_slice().len().div_ceil(rows), Relaxed);
    }
    Ok(Arc::new(b.finish()))
}

impl ScalarUDFImpl for PlainStatic {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            PlainKind::Sq => DataType::Int64,
            PlainKind::RevBytes => DataType::Binary,
            _ => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let slot = self.kind.slot();
        let out: ArrayRef = match self.kind {
            // `#[udf]` gives a primitive function a vectorised kernel; so does this.
            PlainKind::Sq => Arc::new(
                arrays[0]
                    .as_primitive::<Int64Type>()
                    .unary::<_, Int64Type>(sq),
            ),
            PlainKind::RevBytes => binary_rows(arrays[0].as_binary::<i32>(), slot, rev_bytes)?,
            PlainKind::V1Repeat => {
                let n = arrays[1].as_primitive::<UInt64Type>();
                utf8_rows(arrays[0].as_string::<i32>(), slot, |i, s| {
                    if n.is_null(i) {
                        Ok(None)
                    } else {
                        v1_repeat(s, n.value(i)).map(Some)
                    }
                })?
            }
            kind => {
                let s = arrays[0].as_string::<i32>();
                match kind {
                    PlainKind::Bang => utf8_rows(s, slot, |_, s| Ok(Some(bang(s))))?,
                    PlainKind::Rev => utf8_rows(s, slot, |_, s| Ok(Some(rev(s))))?,
                    PlainKind::ShoutPlain => utf8_rows(s, slot, |_, s| Ok(Some(shout_plain(s))))?,
                    PlainKind::MaybeRev => utf8_rows(s, slot, |_, s| Ok(maybe_rev(s)))?,
                    PlainKind::CheckedRev => utf8_rows(s, slot, |_, s| checked_rev(s).map(Some))?,
                    _ => unreachable!("handled above"),
                }
            }
        };
        if out.len() != args.number_rows {
            return exec_err!("static {}: wrong length", self.name);
        }
        Ok(ColumnarValue::Array(out))
    }
}
