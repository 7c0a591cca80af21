//! Columns of the simplest types as their raw buffers: the lean encoding of a worker call's
//! arguments and results, used instead of an Arrow IPC stream when the column's type is in
//! [`RAW_TYPES`] (numbers, dates, booleans, strings and binaries). It carries no schema and
//! no flatbuffer: a 16-byte header, the buffers' lengths, the buffers.
//!
//! | bytes | what |
//! |-------|------|
//! | 8     | `u8` type tag (its row in [`RAW_TYPES`]), `u8` 1 when a validity bitmap follows, 6 zero bytes |
//! | 8     | `u64` rows |
//! | 8 × n | `u64` length of each buffer: the validity bitmap if present, then the type's buffers (values; or offsets then data) |
//! | …     | each buffer, zeros to a multiple of 8 after it |
//!
//! The sender writes each buffer from the array's first row (a sliced array's validity and
//! booleans shifted to bit 0, its offsets rebased to 0). The reader trusts nothing: the tag must
//! name a type of the table (and the declared one, when the reader knows it), the rows those the
//! call asks for, each buffer's length exactly what the rows take (the data of strings at most
//! what is left), every buffer within the column and nothing after the last one; the array is
//! then built with the full validation every result gets (`ffi::build_validated`: arrow's, with
//! the UTF-8 of a string column checked over its whole data at once, several times faster than
//! arrow's value by value), its buffers used where they lie.

use std::ops::Range;

use datafusion::arrow::array::{Array, ArrayData, ArrayRef, AsArray, make_array};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::ArrowNativeType;
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use super::protocol::{Sink, put};

/// How a type's values lie in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One buffer of this many bytes per row.
    Fixed(usize),
    /// One bitmap of a bit per row.
    Bits,
    /// `i32` offsets (rows + 1), then the data.
    Offsets32,
    /// `i64` offsets (rows + 1), then the data.
    Offsets64,
}

impl Layout {
    /// The buffers after the validity bitmap.
    fn buffers(self) -> usize {
        match self {
            Layout::Fixed(_) | Layout::Bits => 1,
            Layout::Offsets32 | Layout::Offsets64 => 2,
        }
    }
}

/// The types a column crosses raw, with their layouts; the tag of a type is its index here.
const RAW_TYPES: [(DataType, Layout); 23] = [
    (DataType::Int8, Layout::Fixed(1)),
    (DataType::Int16, Layout::Fixed(2)),
    (DataType::Int32, Layout::Fixed(4)),
    (DataType::Int64, Layout::Fixed(8)),
    (DataType::UInt8, Layout::Fixed(1)),
    (DataType::UInt16, Layout::Fixed(2)),
    (DataType::UInt32, Layout::Fixed(4)),
    (DataType::UInt64, Layout::Fixed(8)),
    (DataType::Float16, Layout::Fixed(2)),
    (DataType::Float32, Layout::Fixed(4)),
    (DataType::Float64, Layout::Fixed(8)),
    (DataType::Date32, Layout::Fixed(4)),
    (DataType::Date64, Layout::Fixed(8)),
    (DataType::Time64(TimeUnit::Microsecond), Layout::Fixed(8)),
    (DataType::Time64(TimeUnit::Nanosecond), Layout::Fixed(8)),
    (
        DataType::Timestamp(TimeUnit::Microsecond, None),
        Layout::Fixed(8),
    ),
    (
        DataType::Timestamp(TimeUnit::Nanosecond, None),
        Layout::Fixed(8),
    ),
    (DataType::Duration(TimeUnit::Microsecond), Layout::Fixed(8)),
    (DataType::Boolean, Layout::Bits),
    (DataType::Utf8, Layout::Offsets32),
    (DataType::Binary, Layout::Offsets32),
    (DataType::LargeUtf8, Layout::Offsets64),
    (DataType::LargeBinary, Layout::Offsets64),
];

/// The tag of `t`, when a column of it crosses raw.
pub(crate) fn tag_of(t: &DataType) -> Option<u8> {
    RAW_TYPES
        .iter()
        .position(|(raw, _)| raw == t)
        .map(|i| i as u8)
}

/// The most buffers of a column: validity, offsets, data.
const MAX_BUFFERS: usize = 3;

/// Bytes of a bitmap of `bits` bits.
fn bitmap_len(bits: usize) -> usize {
    bits.div_ceil(8)
}

/// Zeros after a buffer of `len` bytes, to a multiple of 8 (within the column: a column starts
/// aligned).
fn pad_to_8<S: Sink>(out: &mut S, len: usize) -> Result<(), String> {
    put(out, &[0u8; 8][..(8 - len % 8) % 8])
}

/// One buffer of a column to write: bytes as they lie, or offsets to rebase to 0.
enum Part<'a> {
    Bytes(&'a [u8]),
    Rebased32(&'a [i32]),
    Rebased64(&'a [i64]),
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Part::Bytes(b) => b.len(),
            Part::Rebased32(o) => o.len() * 4,
            Part::Rebased64(o) => o.len() * 8,
        }
    }

    fn write<S: Sink>(&self, out: &mut S) -> Result<(), String> {
        /// Appends `offsets` less the first, each as `to_bytes` gives it, in chunks.
        fn rebased<S: Sink, O: Copy, const W: usize>(
            out: &mut S,
            offsets: &[O],
            to_bytes: impl Fn(O, O) -> [u8; W],
        ) -> Result<(), String> {
            let Some(&first) = offsets.first() else {
                return Ok(());
            };
            let mut chunk = Vec::with_capacity(512 * W);
            for piece in offsets.chunks(512) {
                chunk.clear();
                for &o in piece {
                    chunk.extend_from_slice(&to_bytes(o, first));
                }
                put(out, &chunk)?;
            }
            Ok(())
        }
        match self {
            Part::Bytes(b) => put(out, b),
            Part::Rebased32(o) => rebased(out, o, |o, first| o.wrapping_sub(first).to_le_bytes()),
            Part::Rebased64(o) => rebased(out, o, |o, first| o.wrapping_sub(first).to_le_bytes()),
        }
    }
}

/// `len` bytes of `buffer` from `at`, or why the array does not hold them.
fn bytes_of(buffer: &Buffer, at: usize, len: usize) -> Result<&[u8], String> {
    at.checked_add(len)
        .and_then(|end| buffer.as_slice().get(at..end))
        .ok_or_else(|| "an array whose buffers are shorter than its rows".to_string())
}

/// The offsets and data of a string or binary column of `rows` rows: its offsets (rows + 1) as
/// they lie or to rebase (`rebase`), and the range of its data they point into. `empty` stands
/// for an empty array's offsets when its buffer has none (arrow allows that).
fn offset_parts<'a, O: ArrowNativeType + Into<i64>>(
    data: &'a ArrayData,
    rows: usize,
    empty: &'static [O],
    rebase: fn(&'a [O]) -> Part<'a>,
) -> Result<[Part<'a>; 2], String> {
    let width = std::mem::size_of::<O>();
    let offsets = match data.buffer::<O>(0).get(..=rows) {
        Some(offsets) => offsets,
        None if rows == 0 => empty,
        None => return Err("a string column with fewer offsets than rows".to_string()),
    };
    let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
        return Err("a string column without offsets".to_string());
    };
    let (first, last) = (first.into(), last.into());
    let (Ok(from), Ok(to)) = (usize::try_from(first), usize::try_from(last)) else {
        return Err("a string column with negative offsets".to_string());
    };
    let buffers = data.buffers();
    let offsets_part = match bytes_of(
        &buffers[0],
        data.offset() * width,
        std::mem::size_of_val(offsets),
    ) {
        Ok(bytes) if first == 0 => Part::Bytes(bytes),
        _ => rebase(offsets),
    };
    let len = to.checked_sub(from).ok_or("string offsets out of order")?;
    Ok([offsets_part, Part::Bytes(bytes_of(&buffers[1], from, len)?)])
}

/// Appends `array` raw; `Ok(false)` (nothing written) when its type does not cross raw.
pub(crate) fn put_array<S: Sink>(out: &mut S, array: &ArrayRef) -> Result<bool, String> {
    let Some(tag) = tag_of(array.data_type()) else {
        return Ok(false);
    };
    let layout = RAW_TYPES[tag as usize].1;
    let rows = array.len();
    let validity = array
        .nulls()
        .filter(|n| n.null_count() > 0)
        .map(|n| n.inner().sliced());
    let data = array.to_data();
    let buffers = data.buffers();
    if buffers.len() != layout.buffers() {
        return Err(format!(
            "an array of {} with {} buffers",
            data.data_type(),
            buffers.len()
        ));
    }
    let bits;
    let mut parts: Vec<Part<'_>> = Vec::with_capacity(MAX_BUFFERS);
    if let Some(v) = &validity {
        parts.push(Part::Bytes(bytes_of(v, 0, bitmap_len(rows))?));
    }
    match layout {
        Layout::Fixed(width) => {
            parts.push(Part::Bytes(bytes_of(
                &buffers[0],
                data.offset() * width,
                rows * width,
            )?));
        }
        Layout::Bits => {
            bits = array.as_boolean().values().sliced();
            parts.push(Part::Bytes(bytes_of(&bits, 0, bitmap_len(rows))?));
        }
        Layout::Offsets32 => parts.extend(offset_parts(&data, rows, &[0i32], Part::Rebased32)?),
        Layout::Offsets64 => parts.extend(offset_parts(&data, rows, &[0i64], Part::Rebased64)?),
    }
    put(out, &[tag, u8::from(validity.is_some()), 0, 0, 0, 0, 0, 0])?;
    put(out, &(rows as u64).to_le_bytes())?;
    for part in &parts {
        put(out, &(part.len() as u64).to_le_bytes())?;
    }
    for part in &parts {
        part.write(out)?;
        pad_to_8(out, part.len())?;
    }
    Ok(true)
}

/// Reads `u64`s off the front of the column.
fn u64_at(bytes: &[u8], at: usize) -> Result<u64, String> {
    bytes
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("the column ends at byte {} of its header", bytes.len()))
}

/// Decodes a raw column of `rows` rows (and of `declared` type, when the reader knows it) from
/// `column`, its buffers used in place.
pub(crate) fn decode_array(
    column: &Buffer,
    declared: Option<&DataType>,
    rows: usize,
) -> Result<ArrayRef, String> {
    let bytes = column.as_slice();
    let head = bytes
        .get(..16)
        .ok_or("a raw column shorter than its header")?;
    let (data_type, layout) = RAW_TYPES
        .get(head[0] as usize)
        .ok_or_else(|| format!("unknown raw column type tag {}", head[0]))?;
    if let Some(declared) = declared
        && data_type != declared
    {
        return Err(format!(
            "a result of type {data_type} where {declared} was declared"
        ));
    }
    let has_validity = match head[1] {
        0 => false,
        1 => true,
        other => return Err(format!("a validity flag of {other}")),
    };
    if head[2..8] != [0; 6] {
        return Err("a raw column header with nonzero padding".to_string());
    }
    let claimed = u64_at(bytes, 8)?;
    if claimed != rows as u64 {
        return Err(format!("a column of {claimed} rows for a call over {rows}"));
    }
    let n = usize::from(has_validity) + layout.buffers();
    let mut at = 16 + 8 * n;
    // What each buffer must hold; `None`: at most what is left (the data of strings).
    let exact = |i: usize| -> Result<Option<usize>, String> {
        let rows_take = |width: usize| {
            rows.checked_mul(width)
                .ok_or_else(|| format!("{rows} rows of {data_type} take more than memory"))
        };
        if has_validity && i == 0 {
            return Ok(Some(bitmap_len(rows)));
        }
        Ok(match (layout, i - usize::from(has_validity)) {
            (Layout::Fixed(width), _) => Some(rows_take(*width)?),
            (Layout::Bits, _) => Some(bitmap_len(rows)),
            (Layout::Offsets32, 0) => Some(rows_take(4)?.saturating_add(4)),
            (Layout::Offsets64, 0) => Some(rows_take(8)?.saturating_add(8)),
            _ => None,
        })
    };
    let mut ranges: [Range<usize>; MAX_BUFFERS] = Default::default();
    for (i, range) in ranges.iter_mut().enumerate().take(n) {
        let len = usize::try_from(u64_at(bytes, 16 + 8 * i)?)
            .map_err(|_| "a buffer longer than memory".to_string())?;
        if let Some(exact) = exact(i)?
            && len != exact
        {
            return Err(format!(
                "buffer {i} of {len} bytes where {rows} rows of {data_type} take {exact}"
            ));
        }
        let end = at
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "buffer {i} of {len} bytes at {at} past the end of the {}-byte column",
                    bytes.len()
                )
            })?;
        *range = at..end;
        at = end.next_multiple_of(8);
        match bytes.get(end..at) {
            Some(padding) if padding.iter().all(|&b| b == 0) => {}
            Some(_) => return Err(format!("nonzero padding after buffer {i}")),
            None => {
                return Err(format!(
                    "the column ends inside the padding after buffer {i}"
                ));
            }
        }
    }
    if at != bytes.len() {
        return Err(format!(
            "{} bytes after the last buffer of a raw column",
            bytes.len() - at
        ));
    }
    let buffer = |i: usize| column.slice_with_length(ranges[i].start, ranges[i].len());
    let validity = has_validity.then(|| buffer(0));
    let first = usize::from(has_validity);
    let mut builder = ArrayData::builder(data_type.clone())
        .len(rows)
        .align_buffers(true);
    if let Some(validity) = validity {
        builder = builder.null_bit_buffer(Some(validity));
    }
    for i in first..n {
        builder = builder.add_buffer(buffer(i));
    }
    let data = crate::ffi::build_validated(builder)?;
    Ok(make_array(data))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        BinaryArray, BooleanArray, Date32Array, Float64Array, Int8Array, Int64Array,
        LargeStringArray, StringArray, TimestampMicrosecondArray, UInt16Array,
    };

    use super::*;

    fn encoded(array: &ArrayRef) -> Buffer {
        let mut out = Vec::new();
        assert!(put_array(&mut out, array).unwrap(), "{}", array.data_type());
        assert_eq!(out.len() % 8, 0);
        Buffer::from(out)
    }

    /// Arrays of every layout, with and without NULLs, whole and sliced at odd offsets.
    fn samples() -> Vec<ArrayRef> {
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter(
                (0..40).map(|i| (i % 3 != 0).then_some(i * 1000)),
            )),
            Arc::new(Int64Array::from_iter_values(0..40)),
            Arc::new(Int8Array::from_iter(
                (0..40).map(|i| (i % 5 != 0).then_some(i as i8)),
            )),
            Arc::new(UInt16Array::from_iter_values(0..40)),
            Arc::new(Float64Array::from_iter(
                (0..40).map(|i| (i % 2 == 0).then_some(i as f64 / 3.0)),
            )),
            Arc::new(Date32Array::from_iter_values(0..40)),
            Arc::new(TimestampMicrosecondArray::from_iter_values(0..40)),
            Arc::new(BooleanArray::from_iter(
                (0..40).map(|i| (i % 7 != 0).then_some(i % 3 == 0)),
            )),
            Arc::new(StringArray::from_iter(
                (0..40).map(|i| (i % 4 != 1).then(|| format!("value {i} é"))),
            )),
            Arc::new(LargeStringArray::from_iter_values(
                (0..40).map(|i| "x".repeat(i)),
            )),
            Arc::new(BinaryArray::from_iter(
                (0..40).map(|i| (i % 6 != 0).then(|| vec![i as u8; i % 5])),
            )),
        ];
        // An empty string column whose offsets buffer is empty (arrow allows it).
        let no_offsets = ArrayData::builder(DataType::Utf8)
            .len(0)
            .add_buffer(Buffer::from_vec(Vec::<i32>::new()))
            .add_buffer(Buffer::from_vec(Vec::<u8>::new()))
            .build()
            .unwrap();
        let mut all = vec![make_array(no_offsets)];
        for a in arrays {
            all.push(a.slice(3, 29));
            all.push(a.slice(8, 1));
            all.push(a.slice(40, 0));
            all.push(a);
        }
        all
    }

    #[test]
    fn every_layout_round_trips_whole_sliced_and_empty() {
        for array in samples() {
            let column = encoded(&array);
            let back = decode_array(&column, Some(array.data_type()), array.len()).unwrap();
            assert_eq!(back.to_data(), array.to_data(), "{}", array.data_type());
            let untyped = decode_array(&column, None, array.len()).unwrap();
            assert_eq!(untyped.data_type(), array.data_type());
        }
    }

    /// Every type of the table, through both directions of the protocol (a call's argument
    /// column, constant too, and a result), with NULLs, whole and sliced at an odd offset.
    #[test]
    fn every_type_of_the_table_crosses_raw_both_ways() {
        use datafusion::arrow::compute::cast;

        use crate::call_path::CallPath;
        use crate::isolation::protocol::{
            HEADER, Reply, decode_call, decode_reply, encode_call, encode_result,
        };
        let ints: ArrayRef = Arc::new(Int64Array::from_iter(
            (0..45).map(|i| (i % 4 != 2).then_some(i * 37 - 300)),
        ));
        let texts: ArrayRef = Arc::new(StringArray::from_iter(
            (0..45).map(|i| (i % 4 != 2).then(|| format!("v{i}"))),
        ));
        for (data_type, _) in &RAW_TYPES {
            let source = if matches!(
                data_type,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary
            ) {
                &texts
            } else {
                &ints
            };
            let whole = cast(source, data_type).unwrap_or_else(|e| panic!("{data_type}: {e}"));
            assert_eq!(whole.data_type(), data_type);
            assert!(whole.null_count() > 0, "{data_type}");
            for array in [Arc::clone(&whole), whole.slice(5, 33)] {
                let rows = array.len();
                let args = [(Arc::clone(&array), false), (array.slice(3, 1), true)];
                let mut out = Vec::new();
                encode_call(&mut out, 0, CallPath::Batch, None, &args, rows).unwrap();
                let call = decode_call(&Buffer::from(out[HEADER..].to_vec())).unwrap();
                for ((sent, _), (got, constant)) in args.iter().zip(&call.args) {
                    assert_eq!(
                        got.to_data(),
                        sent.to_data(),
                        "{data_type}, constant {constant}"
                    );
                }
                out.clear();
                encode_result(&mut out, &array).unwrap();
                assert_eq!(out[HEADER + 1], 1, "{data_type} crosses raw (encoding 1)");
                let body = Buffer::from(out[HEADER..].to_vec());
                match decode_reply(&body, Some((data_type, rows))).unwrap() {
                    Reply::Result(got) => assert_eq!(got.to_data(), array.to_data(), "{data_type}"),
                    other => panic!("{data_type}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn other_types_are_left_to_ipc() {
        let views: ArrayRef = Arc::new(datafusion::arrow::array::StringViewArray::from(vec!["a"]));
        let mut out = Vec::new();
        assert!(!put_array(&mut out, &views).unwrap());
        assert!(out.is_empty());
        assert_eq!(
            tag_of(&DataType::Timestamp(
                TimeUnit::Microsecond,
                Some("UTC".into())
            )),
            None
        );
    }

    #[test]
    fn forged_columns_are_refused() {
        let strings: ArrayRef = Arc::new(StringArray::from(vec![Some("ab"), None, Some("cde")]));
        let good = encoded(&strings).to_vec();
        let refused = |bytes: Vec<u8>, rows: usize, t: &DataType| {
            decode_array(&Buffer::from(bytes), Some(t), rows).unwrap_err()
        };
        let utf8 = &DataType::Utf8;
        // Another type than declared, an unknown tag, rows other than the call's.
        assert!(refused(good.clone(), 3, &DataType::Binary).contains("where Binary was declared"));
        let mut b = good.clone();
        b[0] = 200;
        assert!(refused(b, 3, utf8).contains("unknown raw column type tag 200"));
        assert!(refused(good.clone(), 4, utf8).contains("3 rows for a call over 4"));
        // Lengths: a bitmap too short, offsets too long, data past the column, huge.
        for (field, value, says) in [
            (16, 0u64, "buffer 0 of 0 bytes"),
            (24, 20, "buffer 1 of 20 bytes"),
            (32, 1 << 20, "past the end"),
            (32, u64::MAX, "past the end"),
        ] {
            let mut b = good.clone();
            b[field..field + 8].copy_from_slice(&value.to_le_bytes());
            let e = refused(b, 3, utf8);
            assert!(e.contains(says), "{e}");
        }
        // Offsets out of order or past the data, bytes that are not UTF-8: arrow's validation.
        let offsets_at = 16 + 24 + 8;
        let mut b = good.clone();
        b[offsets_at + 4..offsets_at + 8].copy_from_slice(&100i32.to_le_bytes());
        let e = refused(b, 3, utf8);
        assert!(e.contains("not monotonically increasing"), "{e}");
        let mut b = good.clone();
        b[offsets_at + 12..offsets_at + 16].copy_from_slice(&100i32.to_le_bytes());
        let e = refused(b, 3, utf8);
        assert!(
            e.contains("Last offset 100 of Utf8 is larger than values length 5"),
            "{e}"
        );
        let mut b = good.clone();
        let data_at = offsets_at + 16;
        b[data_at] = 0xff;
        assert!(refused(b, 3, utf8).contains("invalid UTF-8"));
        // Valid UTF-8 as a whole, but an offset inside a character.
        let split: ArrayRef = Arc::new(StringArray::from(vec!["é", "", "é"]));
        let mut b = encoded(&split).to_vec();
        b[32 + 4..32 + 8].copy_from_slice(&1i32.to_le_bytes());
        let e = refused(b, 3, utf8);
        assert!(e.contains("splits a UTF-8 character"), "{e}");
        // A long column: each check holds past the first values.
        let long: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..5000).map(|i| format!("v{i}é")),
        ));
        let mut b = encoded(&long).to_vec();
        let offsets_at = 16 + 16;
        let at = offsets_at + 4 * 4000;
        b[at..at + 4].copy_from_slice(&0i32.to_le_bytes());
        let e = refused(b, 5000, utf8);
        assert!(e.contains("not monotonically increasing"), "{e}");
        // Trailing bytes, a truncated column, nonzero padding, a bad validity flag.
        let mut b = good.clone();
        b.extend_from_slice(&[0; 8]);
        assert!(refused(b, 3, utf8).contains("after the last buffer"));
        let e = refused(good[..good.len() - 8].to_vec(), 3, utf8);
        assert!(e.contains("past the end"), "{e}");
        let mut b = good.clone();
        b[5] = 1;
        assert!(refused(b, 3, utf8).contains("nonzero padding"));
        // The data "abcde" (5 bytes) is padded with 3 zeros: a byte there, or a column cut
        // inside them.
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] = 7;
        assert!(refused(b, 3, utf8).contains("nonzero padding after buffer 2"));
        let e = refused(good[..good.len() - 2].to_vec(), 3, utf8);
        assert!(e.contains("ends inside the padding after buffer 2"), "{e}");
        let mut b = good;
        b[1] = 2;
        assert!(refused(b, 3, utf8).contains("validity flag of 2"));
        assert!(refused(vec![0; 7], 3, utf8).contains("shorter than its header"));
    }
}
