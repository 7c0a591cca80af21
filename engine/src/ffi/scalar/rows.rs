//! The row path over a whole batch: the row entrypoint (ABI v1 or v2) called once per row, with
//! loops compiled per result type and arguments laid out column by column.
//!
//! Nothing in the per-row loop matches on a type. Each argument column is typed once per batch;
//! the argument values of a chunk of rows are written column by column into one reused array of
//! `PluginValue`s (v1) or `UdfValue`s (v2), a tight loop per column; then each row's slice of it
//! is passed to the entrypoint, and the result is checked with one comparison (tag and status)
//! and written straight into the output buffers of the declared type ([`Sink`], one
//! implementation per result type, chosen once per batch). String results are copied into one
//! values buffer sized from the function's previous batch and handed back to the plugin at once.
//!
//! The rules are the row path's as before: a row with a NULL in an argument that does not take
//! NULLs is NULL without a call (STRICT); v1 strings are NUL-terminated copies and an interior
//! NUL is an error for the first row that would pass it; any result that is not exactly the
//! declared type is an error, reported by the same checks as always (see `convert_v1_result` and
//! `check_status`).

use std::ffi::CStr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use datafusion::arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BooleanArray, BooleanBufferBuilder,
    GenericByteArray, GenericByteViewArray, PrimitiveArray, new_null_array,
};
use datafusion::arrow::buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use datafusion::arrow::datatypes::{
    ArrowNativeType, BinaryType, ByteArrayType, ByteViewType, DataType, Date32Type, Float32Type,
    Float64Type, GenericStringType, Int32Type, Int64Type, TimestampMicrosecondType, UInt64Type,
};
use udf_abi::PluginValue;
use udf_abi::v2::{
    self, ReleaseBytes, RowEntrypoint, UdfBytes, UdfOwnedBytes, UdfScalar, UdfType, UdfValue,
};

use super::{Entrypoints, PluginFunction, check_status};
use crate::error::CallError;
use crate::ffi::{EntrypointFn, RESULT_OK, RawPayload, RawResult};
use crate::types::{TIMESTAMP_TZ, arrow_type};

/// Rows whose arguments are laid out at once: small enough that the argument array stays in
/// the first-level cache (256 rows × 2 arguments × 32 bytes = 16 KiB for v2).
const CHUNK: usize = 256;

/// String and binary results reserved up front at most, whatever the previous batch needed.
const MAX_UP_FRONT: usize = 16 << 20;

impl PluginFunction {
    /// Calls the row entrypoint for each of `num_rows` rows: `args` are the argument arrays (of
    /// types the plugin reads, as for [`call_batch`](Self::call_batch)) with a flag for length-1
    /// arrays that stand for every row. Returns the result column of the declared type.
    ///
    /// A row with a NULL in an argument that does not take NULLs is NULL and the plugin is not
    /// called for it; every other row is one call, in row order; the first error ends the batch.
    pub fn call_rows(
        &self,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<ArrayRef, CallError> {
        let signature = self.signature();
        super::check_arguments(signature, args, num_rows)?;
        // Arrow types (ABI 2.2) cross on the batch path only.
        if signature.has_arrow_types() {
            return Err(CallError::NoRowEntrypoint);
        }
        let Some(return_type) = signature.return_type.tag() else {
            return Err(CallError::NoRowEntrypoint);
        };
        let strict = match super::strict_rows(signature, args) {
            super::Strict::AllNull => {
                return Ok(new_null_array(&arrow_type(return_type), num_rows));
            }
            super::Strict::Rows(rows) => rows,
        };
        let columns = args
            .iter()
            .zip(&signature.arg_nullable)
            .map(|((array, scalar), &takes_null)| Column::new(array, *scalar, takes_null))
            .collect::<Result<Vec<_>, _>>()?;
        let call = Call {
            function: self,
            columns: &columns,
            rows: num_rows,
            strict: strict.as_ref(),
        };
        match return_type {
            UdfType::Bool => call.run::<BoolSink>(),
            UdfType::Int64 => call.run::<PrimitiveSink<Int64Type>>(),
            UdfType::UInt64 => call.run::<PrimitiveSink<UInt64Type>>(),
            UdfType::Float64 => call.run::<PrimitiveSink<Float64Type>>(),
            UdfType::Int32 => call.run::<PrimitiveSink<Int32Type>>(),
            UdfType::Float32 => call.run::<PrimitiveSink<Float32Type>>(),
            UdfType::Date32 => call.run::<PrimitiveSink<Date32Type>>(),
            UdfType::TimestampMicros => call.run::<PrimitiveSink<TimestampMicrosecondType>>(),
            UdfType::Utf8 => call.run::<BytesSink<true>>(),
            UdfType::Binary => call.run::<BytesSink<false>>(),
        }
    }
}

/// One batch of row calls.
struct Call<'a> {
    function: &'a PluginFunction,
    columns: &'a [Column<'a>],
    rows: usize,
    /// The rows not to call (STRICT), if any.
    strict: Option<&'a NullBuffer>,
}

impl Call<'_> {
    fn called(&self, row: usize) -> bool {
        self.strict.is_none_or(|s| s.is_valid(row))
    }

    fn run<S: Sink>(&self) -> Result<ArrayRef, CallError> {
        let library = &self.function.library;
        let hint = &library.row_bytes_per_row[self.function.index];
        let mut sink = S::new(self.rows, hint.load(Relaxed));
        match &library.entrypoints {
            Entrypoints::V1(entrypoint) => self.rows_v1(*entrypoint, &mut sink)?,
            Entrypoints::V2 { release, rows, .. } => match rows[self.function.index] {
                Some(entrypoint) => self.rows_v2(entrypoint, *release, &mut sink)?,
                None => return Err(CallError::NoRowEntrypoint),
            },
        }
        if let Some(bytes) = sink.value_bytes()
            && self.rows > 0
        {
            hint.store(bytes.div_ceil(self.rows), Relaxed);
        }
        sink.finish(self.strict)
    }

    fn rows_v2<S: Sink>(
        &self,
        entrypoint: RowEntrypoint,
        release: ReleaseBytes,
        sink: &mut S,
    ) -> Result<(), CallError> {
        let n = self.columns.len();
        let returns_null = self.function.signature().return_nullable;
        let library = &self.function.library;
        let mut slots = vec![UdfValue::NULL; CHUNK.min(self.rows) * n];
        let mut start = 0;
        while start < self.rows {
            let end = (start + CHUNK).min(self.rows);
            let slots = &mut slots[..(end - start) * n];
            for (i, column) in self.columns.iter().enumerate() {
                column.fill_v2(slots, n, i, start..end);
            }
            for (k, row) in (start..end).enumerate() {
                if !self.called(row) {
                    sink.push_placeholder();
                    continue;
                }
                // Every byte of the value is initialised (the largest member, `owned`, spans the
                // whole union), so a plugin that sets `is_null = 0` without writing a value makes
                // the host read zeros, never uninitialised memory.
                let mut out = UdfValue {
                    is_null: 1,
                    value: UdfScalar {
                        owned: UdfOwnedBytes::EMPTY,
                    },
                };
                let mut error = UdfOwnedBytes::EMPTY;
                let args = slots.as_ptr().wrapping_add(k * n);
                // SAFETY: the entrypoint belongs to the function's library, alive while `self`
                // borrows the function (which holds an Arc of it). `args` points at this row's
                // `n` values inside `slots`, each of the declared type and nullability (written
                // by `fill_v2` from arrays of the declared types; NULL only where the argument
                // takes NULLs); string and binary values borrow from the argument arrays, which
                // outlive the call. `out` and `error` are valid for writes.
                let status = unsafe { entrypoint(args, n, &mut out, &mut error) };
                if status != v2::status::OK || !error.ptr.is_null() {
                    check_status(status, error, release, library)?;
                }
                if out.is_null != 0 {
                    if !returns_null {
                        return Err(CallError::UnexpectedNull);
                    }
                    sink.push_null();
                    continue;
                }
                // SAFETY: the plugin wrote the member of the declared return type (the sink's
                // type); string and binary results are owned bytes handed to the host, released
                // through this library's `release_bytes`.
                unsafe { sink.push_v2(out.value, release) }?;
            }
            start = end;
        }
        Ok(())
    }

    fn rows_v1<S: Sink>(&self, entrypoint: EntrypointFn, sink: &mut S) -> Result<(), CallError> {
        let n = self.columns.len();
        let expected = self
            .function
            .signature()
            .return_type
            .tag()
            .map_or(u32::MAX, UdfType::tag);
        let mut slots = vec![PluginValue::Bool(false); CHUNK.min(self.rows) * n];
        let mut bytes = Vec::new();
        let mut strings = Vec::new();
        let mut start = 0;
        while start < self.rows {
            let end = (start + CHUNK).min(self.rows);
            let slots = &mut slots[..(end - start) * n];
            bytes.clear();
            strings.clear();
            // The first (row, argument) whose string has a NUL byte: the rows before it are
            // called, then it is the error, as if the rows were called one by one.
            let mut first_nul: Option<(usize, usize)> = None;
            for (i, column) in self.columns.iter().enumerate() {
                if let Some(bad) =
                    column.fill_v1(self, slots, n, i, start..end, &mut bytes, &mut strings)?
                {
                    first_nul = first_nul.min(Some(bad)).or(Some(bad));
                }
            }
            // Pointers last: `bytes` no longer grows.
            let base = bytes.as_ptr();
            for &(slot, offset) in &strings {
                slots[slot] = PluginValue::String(base.wrapping_add(offset).cast());
            }
            let called_end = first_nul.map_or(end, |(row, _)| row);
            for (k, row) in (start..called_end).enumerate() {
                if !self.called(row) {
                    sink.push_placeholder();
                    continue;
                }
                let args = slots.as_ptr().wrapping_add(k * n);
                // SAFETY: the entrypoint belongs to the function's library, alive while `self`
                // borrows the function. `args` points at this row's `n` values inside `slots`,
                // each of the declared type; string pointers point into `bytes`,
                // NUL-terminated without interior NULs, and neither buffer changes until the
                // call returns.
                let raw = unsafe { entrypoint(args, n) };
                // SAFETY: `ok` is read only when the tag says it is the active member.
                if raw.tag == RESULT_OK && unsafe { raw.payload.ok.tag } == expected {
                    // SAFETY: the value's tag is the declared type, so that member of the payload
                    // is active; a string is handed to the host per ABI v1 and taken over once.
                    unsafe { sink.push_v1(raw.payload.ok.payload) }?;
                } else {
                    return Err(self.v1_error(raw));
                }
            }
            if let Some((_, index)) = first_nul {
                return Err(CallError::InteriorNul { index });
            }
            start = end;
        }
        Ok(())
    }

    /// The error for a v1 result that is not an `Ok` of the declared type.
    #[cold]
    fn v1_error(&self, raw: RawResult) -> CallError {
        // SAFETY: `raw` was returned by this function's v1 entrypoint.
        unsafe { self.function.v1_result_error(raw) }
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments

/// One argument column, typed once per batch.
struct Column<'a> {
    values: Values<'a>,
    /// A length-1 array standing for every row.
    scalar: bool,
    /// Its NULLs, when the argument takes NULLs (v2) and has some.
    nulls: Option<NullBuffer>,
}

enum Values<'a> {
    Bool(&'a BooleanArray),
    Int64(&'a [i64]),
    UInt64(&'a [u64]),
    Float64(&'a [f64]),
    Int32(&'a [i32]),
    Float32(&'a [f32]),
    Utf8(&'a GenericByteArray<GenericStringType<i32>>),
    LargeUtf8(&'a GenericByteArray<GenericStringType<i64>>),
    Utf8View(&'a GenericByteViewArray<datafusion::arrow::datatypes::StringViewType>),
    Binary(&'a GenericByteArray<BinaryType>),
    LargeBinary(&'a GenericByteArray<datafusion::arrow::datatypes::LargeBinaryType>),
    BinaryView(&'a GenericByteViewArray<datafusion::arrow::datatypes::BinaryViewType>),
}

impl<'a> Column<'a> {
    fn new(array: &'a ArrayRef, scalar: bool, takes_null: bool) -> Result<Column<'a>, CallError> {
        let values = match array.data_type() {
            DataType::Boolean => Values::Bool(array.as_boolean()),
            DataType::Int64 => Values::Int64(array.as_primitive::<Int64Type>().values()),
            DataType::UInt64 => Values::UInt64(array.as_primitive::<UInt64Type>().values()),
            DataType::Float64 => Values::Float64(array.as_primitive::<Float64Type>().values()),
            DataType::Int32 => Values::Int32(array.as_primitive::<Int32Type>().values()),
            DataType::Float32 => Values::Float32(array.as_primitive::<Float32Type>().values()),
            DataType::Date32 => Values::Int32(array.as_primitive::<Date32Type>().values()),
            DataType::Timestamp(_, _) => {
                Values::Int64(array.as_primitive::<TimestampMicrosecondType>().values())
            }
            DataType::Utf8 => Values::Utf8(array.as_string::<i32>()),
            DataType::LargeUtf8 => Values::LargeUtf8(array.as_string::<i64>()),
            DataType::Utf8View => Values::Utf8View(array.as_string_view()),
            DataType::Binary => Values::Binary(array.as_binary::<i32>()),
            DataType::LargeBinary => Values::LargeBinary(array.as_binary::<i64>()),
            DataType::BinaryView => Values::BinaryView(array.as_binary_view()),
            other => {
                return Err(CallError::HostBug(format!(
                    "row call with an argument of type {other}"
                )));
            }
        };
        let nulls = if takes_null {
            array.logical_nulls().filter(|n| n.null_count() > 0)
        } else {
            None
        };
        Ok(Column {
            values,
            scalar,
            nulls,
        })
    }

    /// Writes argument `i` of rows `rows` into `slots` (`n` values per row).
    fn fill_v2(&self, slots: &mut [UdfValue], n: usize, i: usize, rows: Range<usize>) {
        let scalar = self.scalar;
        match self.values {
            Values::Bool(a) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                boolean: u8::from(a.value(r)),
            }),
            Values::Int64(v) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                int64: v[r],
            }),
            Values::UInt64(v) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                uint64: v[r],
            }),
            Values::Float64(v) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                float64: v[r],
            }),
            Values::Int32(v) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                int32: v[r],
            }),
            Values::Float32(v) => fill(slots, n, i, rows.clone(), scalar, |r| UdfScalar {
                float32: v[r],
            }),
            Values::Utf8(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
            Values::LargeUtf8(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
            Values::Utf8View(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
            Values::Binary(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
            Values::LargeBinary(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
            Values::BinaryView(a) => fill_bytes(slots, n, i, rows.clone(), scalar, a),
        }
        if let Some(nulls) = &self.nulls {
            for (slot, row) in slots.chunks_exact_mut(n).zip(rows) {
                if nulls.is_null(if scalar { 0 } else { row }) {
                    slot[i] = UdfValue::NULL;
                }
            }
        }
    }

    /// Writes argument `i` of rows `rows` into `slots` (`n` values per row) for a v1 call.
    /// Strings are copied NUL-terminated into `bytes`, and `(slot, offset)` is recorded in
    /// `strings` for the pointer to be set once `bytes` stops growing. Returns the first called
    /// row whose string has a NUL byte, with `i`.
    #[allow(clippy::too_many_arguments)]
    fn fill_v1(
        &self,
        call: &Call<'_>,
        slots: &mut [PluginValue],
        n: usize,
        i: usize,
        rows: Range<usize>,
        bytes: &mut Vec<u8>,
        strings: &mut Vec<(usize, usize)>,
    ) -> Result<Option<(usize, usize)>, CallError> {
        let scalar = self.scalar;
        match self.values {
            Values::Bool(a) => fill(slots, n, i, rows, scalar, |r| PluginValue::Bool(a.value(r))),
            Values::Int64(v) => fill(slots, n, i, rows, scalar, |r| PluginValue::Int(v[r])),
            Values::UInt64(v) => fill(slots, n, i, rows, scalar, |r| PluginValue::UInt(v[r])),
            Values::Float64(v) => fill(slots, n, i, rows, scalar, |r| PluginValue::Double(v[r])),
            Values::Utf8(a) => {
                return Ok(copy_strings(call, n, i, rows, scalar, a, bytes, strings));
            }
            Values::LargeUtf8(a) => {
                return Ok(copy_strings(call, n, i, rows, scalar, a, bytes, strings));
            }
            Values::Utf8View(a) => {
                return Ok(copy_strings(call, n, i, rows, scalar, a, bytes, strings));
            }
            _ => {
                return Err(CallError::HostBug(
                    "a v1 function with an argument type v1 does not have".into(),
                ));
            }
        }
        Ok(None)
    }
}

/// Writes `value(row)` (or `value(0)` for a scalar) as argument `i` of each row of the chunk.
fn fill<T: Copy, V: IntoSlot<T>>(
    slots: &mut [T],
    n: usize,
    i: usize,
    rows: Range<usize>,
    scalar: bool,
    value: impl Fn(usize) -> V,
) {
    if scalar {
        let v = value(0).into_slot();
        for slot in slots.chunks_exact_mut(n) {
            slot[i] = v;
        }
    } else {
        for (slot, row) in slots.chunks_exact_mut(n).zip(rows) {
            slot[i] = value(row).into_slot();
        }
    }
}

/// A value as an argument slot: a v2 scalar becomes a non-NULL `UdfValue`.
trait IntoSlot<T> {
    fn into_slot(self) -> T;
}

impl IntoSlot<UdfValue> for UdfScalar {
    fn into_slot(self) -> UdfValue {
        UdfValue {
            is_null: 0,
            value: self,
        }
    }
}

impl IntoSlot<PluginValue> for PluginValue {
    fn into_slot(self) -> PluginValue {
        self
    }
}

/// Byte rows of a string or binary array, borrowed.
trait ByteRows {
    fn row(&self, row: usize) -> &[u8];
}

impl<T: ByteArrayType> ByteRows for GenericByteArray<T> {
    fn row(&self, row: usize) -> &[u8] {
        let offsets = self.value_offsets();
        let (start, end) = (offsets[row].as_usize(), offsets[row + 1].as_usize());
        &self.value_data()[start..end]
    }
}

impl<T: ByteViewType + ?Sized> ByteRows for GenericByteViewArray<T> {
    fn row(&self, row: usize) -> &[u8] {
        self.value(row).as_ref()
    }
}

fn fill_bytes(
    slots: &mut [UdfValue],
    n: usize,
    i: usize,
    rows: Range<usize>,
    scalar: bool,
    array: &impl ByteRows,
) {
    fill(slots, n, i, rows, scalar, |r| {
        let b = array.row(r);
        UdfScalar {
            bytes: UdfBytes {
                ptr: b.as_ptr(),
                len: b.len(),
            },
        }
    })
}

/// v1 string arguments: NUL-terminated copies of the called rows' strings; see
/// [`Column::fill_v1`].
#[allow(clippy::too_many_arguments)]
fn copy_strings(
    call: &Call<'_>,
    n: usize,
    i: usize,
    rows: Range<usize>,
    scalar: bool,
    array: &impl ByteRows,
    bytes: &mut Vec<u8>,
    strings: &mut Vec<(usize, usize)>,
) -> Option<(usize, usize)> {
    if scalar {
        let s = array.row(0);
        if s.contains(&0) {
            return rows.clone().find(|&r| call.called(r)).map(|r| (r, i));
        }
        let offset = bytes.len();
        bytes.extend_from_slice(s);
        bytes.push(0);
        strings.extend((0..rows.len()).map(|k| (k * n + i, offset)));
        return None;
    }
    let start = rows.start;
    for row in rows {
        if !call.called(row) {
            continue;
        }
        let s = array.row(row);
        if s.contains(&0) {
            return Some((row, i));
        }
        strings.push(((row - start) * n + i, bytes.len()));
        bytes.extend_from_slice(s);
        bytes.push(0);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Results

/// A result column under construction, of one declared return type.
trait Sink: Sized {
    /// For `rows` rows; `bytes_per_row` is what the function's last batch wrote per row (0 if
    /// none).
    fn new(rows: usize, bytes_per_row: usize) -> Self;
    /// A row the plugin is not called for (STRICT): NULL through the mask at `finish`.
    fn push_placeholder(&mut self);
    /// A NULL the plugin returned.
    fn push_null(&mut self);
    /// Appends a v1 result.
    ///
    /// # Safety
    ///
    /// `payload` is the payload of a v1 `Ok` value whose tag is the sink's type (a string:
    /// malloc'ed, NUL-terminated or null, handed to the host).
    unsafe fn push_v1(&mut self, payload: RawPayload) -> Result<(), CallError>;
    /// Appends a (non-NULL) v2 result.
    ///
    /// # Safety
    ///
    /// The plugin wrote the member of the sink's type into `value`; string and binary results
    /// are bytes handed to the host, given back through `release`.
    unsafe fn push_v2(&mut self, value: UdfScalar, release: ReleaseBytes) -> Result<(), CallError>;
    /// Bytes written to a string or binary column.
    fn value_bytes(&self) -> Option<usize> {
        None
    }
    /// The array; rows NULL in `strict` are NULL.
    fn finish(self, strict: Option<&NullBuffer>) -> Result<ArrayRef, CallError>;
}

/// The NULLs the plugin returned, materialised at the first one.
#[derive(Default)]
struct PluginNulls {
    rows: usize,
    bits: Option<BooleanBufferBuilder>,
}

impl PluginNulls {
    #[inline]
    fn valid(&mut self) {
        if let Some(bits) = &mut self.bits {
            bits.append(true);
        }
        self.rows += 1;
    }

    #[cold]
    fn null(&mut self) {
        let rows = self.rows;
        let bits = self.bits.get_or_insert_with(|| {
            let mut bits = BooleanBufferBuilder::new(rows + 1);
            bits.append_n(rows, true);
            bits
        });
        bits.append(false);
        self.rows += 1;
    }

    fn finish(self, strict: Option<&NullBuffer>) -> Option<NullBuffer> {
        let plugin = self.bits.map(|mut b| NullBuffer::new(b.finish()));
        NullBuffer::union(strict, plugin.as_ref())
    }
}

/// How a primitive result is read from the ABI's value types.
trait NativeResult: ArrowPrimitiveType + Sized {
    /// # Safety
    ///
    /// The payload's member for this type is active.
    unsafe fn v1(payload: RawPayload) -> Result<Self::Native, CallError>;
    /// # Safety
    ///
    /// The scalar's member for this type is active.
    unsafe fn v2(value: UdfScalar) -> Self::Native;
    fn array(array: PrimitiveArray<Self>) -> ArrayRef {
        Arc::new(array)
    }
}

fn not_v1() -> CallError {
    CallError::HostBug("a v1 function with a result type v1 does not have".into())
}

macro_rules! native_result {
    ($t:ty, v1: $v1:ident, v2: $v2:ident) => {
        impl NativeResult for $t {
            unsafe fn v1(payload: RawPayload) -> Result<Self::Native, CallError> {
                // SAFETY: the caller's promise: this member is active.
                Ok(unsafe { payload.$v1 })
            }
            unsafe fn v2(value: UdfScalar) -> Self::Native {
                // SAFETY: the caller's promise: this member is active.
                unsafe { value.$v2 }
            }
        }
    };
    ($t:ty, v2: $v2:ident) => {
        impl NativeResult for $t {
            unsafe fn v1(_: RawPayload) -> Result<Self::Native, CallError> {
                Err(not_v1())
            }
            unsafe fn v2(value: UdfScalar) -> Self::Native {
                // SAFETY: the caller's promise: this member is active.
                unsafe { value.$v2 }
            }
        }
    };
}

native_result!(Int64Type, v1: int, v2: int64);
native_result!(UInt64Type, v1: uint, v2: uint64);
native_result!(Float64Type, v1: double, v2: float64);
native_result!(Int32Type, v2: int32);
native_result!(Float32Type, v2: float32);
native_result!(Date32Type, v2: int32);

impl NativeResult for TimestampMicrosecondType {
    unsafe fn v1(_: RawPayload) -> Result<i64, CallError> {
        Err(not_v1())
    }
    unsafe fn v2(value: UdfScalar) -> i64 {
        // SAFETY: the caller's promise: `int64` is active.
        unsafe { value.int64 }
    }
    fn array(array: PrimitiveArray<Self>) -> ArrayRef {
        Arc::new(array.with_timezone(TIMESTAMP_TZ))
    }
}

struct PrimitiveSink<T: NativeResult> {
    values: Vec<T::Native>,
    nulls: PluginNulls,
}

impl<T: NativeResult> Sink for PrimitiveSink<T> {
    fn new(rows: usize, _: usize) -> Self {
        PrimitiveSink {
            values: Vec::with_capacity(rows),
            nulls: PluginNulls::default(),
        }
    }

    fn push_placeholder(&mut self) {
        self.values.push(T::Native::default());
        self.nulls.valid();
    }

    fn push_null(&mut self) {
        self.values.push(T::Native::default());
        self.nulls.null();
    }

    unsafe fn push_v1(&mut self, payload: RawPayload) -> Result<(), CallError> {
        // SAFETY: forwarded from the caller.
        self.values.push(unsafe { T::v1(payload) }?);
        self.nulls.valid();
        Ok(())
    }

    unsafe fn push_v2(&mut self, value: UdfScalar, _: ReleaseBytes) -> Result<(), CallError> {
        // SAFETY: forwarded from the caller.
        self.values.push(unsafe { T::v2(value) });
        self.nulls.valid();
        Ok(())
    }

    fn finish(self, strict: Option<&NullBuffer>) -> Result<ArrayRef, CallError> {
        let nulls = self.nulls.finish(strict);
        Ok(T::array(PrimitiveArray::new(
            ScalarBuffer::from(self.values),
            nulls,
        )))
    }
}

struct BoolSink {
    values: BooleanBufferBuilder,
    nulls: PluginNulls,
}

impl BoolSink {
    fn push_byte(&mut self, byte: u8) -> Result<(), CallError> {
        match byte {
            0 | 1 => {
                self.values.append(byte == 1);
                self.nulls.valid();
                Ok(())
            }
            byte => Err(CallError::InvalidBool(byte)),
        }
    }
}

impl Sink for BoolSink {
    fn new(rows: usize, _: usize) -> Self {
        BoolSink {
            values: BooleanBufferBuilder::new(rows),
            nulls: PluginNulls::default(),
        }
    }

    fn push_placeholder(&mut self) {
        self.values.append(false);
        self.nulls.valid();
    }

    fn push_null(&mut self) {
        self.values.append(false);
        self.nulls.null();
    }

    unsafe fn push_v1(&mut self, payload: RawPayload) -> Result<(), CallError> {
        // SAFETY: the caller's promise: `boolean` is active (read as a byte).
        self.push_byte(unsafe { payload.boolean })
    }

    unsafe fn push_v2(&mut self, value: UdfScalar, _: ReleaseBytes) -> Result<(), CallError> {
        // SAFETY: the caller's promise: `boolean` is active.
        self.push_byte(unsafe { value.boolean })
    }

    fn finish(mut self, strict: Option<&NullBuffer>) -> Result<ArrayRef, CallError> {
        let nulls = self.nulls.finish(strict);
        Ok(Arc::new(BooleanArray::new(self.values.finish(), nulls)))
    }
}

/// A string (`UTF8`) or binary result column: offsets and one values buffer the plugin's bytes
/// are copied into.
struct BytesSink<const UTF8: bool> {
    offsets: Vec<i32>,
    values: Vec<u8>,
    nulls: PluginNulls,
}

impl<const UTF8: bool> BytesSink<UTF8> {
    /// Appends `bytes` (checked to be UTF-8 for a string column).
    fn append(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        if UTF8 {
            std::str::from_utf8(bytes).map_err(CallError::InvalidUtf8)?;
        }
        let end = self
            .values
            .len()
            .checked_add(bytes.len())
            .and_then(|end| i32::try_from(end).ok())
            .ok_or(CallError::ResultTooLarge)?;
        self.values.extend_from_slice(bytes);
        self.offsets.push(end);
        self.nulls.valid();
        Ok(())
    }

    fn repeat_offset(&mut self) {
        let last = self.offsets.last().copied().unwrap_or_default();
        self.offsets.push(last);
    }
}

impl<const UTF8: bool> Sink for BytesSink<UTF8> {
    fn new(rows: usize, bytes_per_row: usize) -> Self {
        let per_row = match bytes_per_row {
            0 => 16,
            n => n.saturating_add(n / 8).saturating_add(1),
        };
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        BytesSink {
            offsets,
            values: Vec::with_capacity(rows.saturating_mul(per_row).min(MAX_UP_FRONT)),
            nulls: PluginNulls::default(),
        }
    }

    fn push_placeholder(&mut self) {
        self.repeat_offset();
        self.nulls.valid();
    }

    fn push_null(&mut self) {
        self.repeat_offset();
        self.nulls.null();
    }

    unsafe fn push_v1(&mut self, payload: RawPayload) -> Result<(), CallError> {
        if !UTF8 {
            return Err(not_v1());
        }
        // SAFETY: the caller's promise: `string` is active.
        let ptr = unsafe { payload.string };
        if ptr.is_null() {
            return Err(CallError::NullString);
        }
        // SAFETY: a non-null v1 string result is NUL-terminated, malloc'ed and handed to the
        // host; it is read here, then freed exactly once below, on every path.
        let appended = self.append(unsafe { CStr::from_ptr(ptr) }.to_bytes());
        // SAFETY: as above: the host owns the string and frees it once, after copying it.
        unsafe { libc::free(ptr.cast_mut().cast()) };
        appended
    }

    unsafe fn push_v2(&mut self, value: UdfScalar, release: ReleaseBytes) -> Result<(), CallError> {
        // SAFETY: the caller's promise: `owned` is active.
        let owned = unsafe { value.owned };
        if owned.ptr.is_null() && owned.len > 0 {
            // Nothing valid to release: it is left alone rather than handed back as null.
            return Err(CallError::NullBytes(owned.len));
        }
        let bytes: &[u8] = if owned.len == 0 {
            &[]
        } else {
            // SAFETY: the plugin handed over `len` bytes at the non-null `ptr`; they stay valid
            // until released below.
            unsafe { std::slice::from_raw_parts(owned.ptr, owned.len) }
        };
        let appended = self.append(bytes);
        // SAFETY: bytes the plugin handed over go back through its own `release_bytes` exactly
        // once, with the parts it gave; the library is mapped (the caller holds it).
        unsafe { release(owned) };
        appended
    }

    fn value_bytes(&self) -> Option<usize> {
        Some(self.values.len())
    }

    fn finish(self, strict: Option<&NullBuffer>) -> Result<ArrayRef, CallError> {
        let nulls = self.nulls.finish(strict);
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        let values = Buffer::from_vec(self.values);
        Ok(if UTF8 {
            // SAFETY: the offsets start at 0 and never decrease (each is the values' length
            // after an append), the last equals the values' length, and every value appended
            // was checked to be UTF-8, so every offset is a character boundary.
            Arc::new(unsafe {
                GenericByteArray::<GenericStringType<i32>>::new_unchecked(offsets, values, nulls)
            })
        } else {
            Arc::new(GenericByteArray::<BinaryType>::new(offsets, values, nulls))
        })
    }
}
