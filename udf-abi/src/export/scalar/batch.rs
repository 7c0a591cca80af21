//! The batch entrypoint's runtime: import the argument arrays, run the row loop inside the
//! plugin (or a vectorised kernel for primitive functions), export the result.

use std::sync::Arc;

pub use arrow_array::ArrayRef;
use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder, Int32Builder,
    Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Date32Type, Float32Type, Float64Type, Int32Type, Int64Type,
    TimestampMicrosecondType, UInt64Type,
};
use std::ffi::{CStr, c_void};
use std::ptr::NonNull;

use arrow_array::ffi::{from_ffi, from_ffi_and_data_type};
use arrow_array::{Array, BooleanArray, PrimitiveArray, make_array};
use arrow_buffer::{BooleanBuffer, BooleanBufferBuilder, Buffer, NullBuffer, ScalarBuffer};
use arrow_schema::{DataType, TimeUnit};

use super::*;

pub(crate) const MISMATCH: &str = "result type does not match the output column";

/// One imported argument column, downcast once per batch (not per row); `scalar` columns
/// have one row standing for all.
#[derive(Debug)]
pub struct Column {
    array: ArrayRef,
    typed: Typed,
    scalar: bool,
}

/// The column's array as its concrete type.
#[derive(Debug)]
enum Typed {
    Bool(arrow_array::BooleanArray),
    Int32(arrow_array::Int32Array),
    Int64(arrow_array::Int64Array),
    UInt64(arrow_array::UInt64Array),
    Float32(arrow_array::Float32Array),
    Float64(arrow_array::Float64Array),
    Date32(arrow_array::Date32Array),
    Timestamp(arrow_array::TimestampMicrosecondArray),
    Utf8(arrow_array::StringArray),
    LargeUtf8(arrow_array::LargeStringArray),
    Utf8View(arrow_array::StringViewArray),
    Binary(arrow_array::BinaryArray),
    LargeBinary(arrow_array::LargeBinaryArray),
    BinaryView(arrow_array::BinaryViewArray),
    Other,
}

impl Column {
    fn new(array: ArrayRef, scalar: bool) -> Column {
        let a = &array;
        let typed = match a.data_type() {
            DataType::Boolean => Typed::Bool(a.as_boolean().clone()),
            DataType::Int32 => Typed::Int32(a.as_primitive::<Int32Type>().clone()),
            DataType::Int64 => Typed::Int64(a.as_primitive::<Int64Type>().clone()),
            DataType::UInt64 => Typed::UInt64(a.as_primitive::<UInt64Type>().clone()),
            DataType::Float32 => Typed::Float32(a.as_primitive::<Float32Type>().clone()),
            DataType::Float64 => Typed::Float64(a.as_primitive::<Float64Type>().clone()),
            DataType::Date32 => Typed::Date32(a.as_primitive::<Date32Type>().clone()),
            DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, _) => {
                Typed::Timestamp(a.as_primitive::<TimestampMicrosecondType>().clone())
            }
            DataType::Utf8 => Typed::Utf8(a.as_string::<i32>().clone()),
            DataType::LargeUtf8 => Typed::LargeUtf8(a.as_string::<i64>().clone()),
            DataType::Utf8View => Typed::Utf8View(a.as_string_view().clone()),
            DataType::Binary => Typed::Binary(a.as_binary::<i32>().clone()),
            DataType::LargeBinary => Typed::LargeBinary(a.as_binary::<i64>().clone()),
            DataType::BinaryView => Typed::BinaryView(a.as_binary_view().clone()),
            _ => Typed::Other,
        };
        Column {
            array,
            typed,
            scalar,
        }
    }

    #[inline]
    fn index(&self, row: usize) -> usize {
        if self.scalar { 0 } else { row }
    }
}

/// A Rust argument type read from a column.
pub trait BatchArg<'a>: Sized {
    /// Row `row`: `Ok(None)` means SQL NULL for an argument that does not take NULLs (the
    /// row's result is NULL without a call).
    fn read(column: &'a Column, row: usize) -> Result<Option<Self>, String>;
}

fn type_error(column: &Column, wanted: &str) -> String {
    format!(
        "expected {wanted}, got an array of type {}",
        column.array.data_type()
    )
}

macro_rules! typed_arg {
    ($rust:ty, $variant:ident, $wrap:expr) => {
        impl BatchArg<'_> for $rust {
            #[inline]
            fn read(column: &Column, row: usize) -> Result<Option<Self>, String> {
                let Typed::$variant(array) = &column.typed else {
                    return Err(type_error(column, stringify!($rust)));
                };
                let i = column.index(row);
                Ok(if array.is_null(i) {
                    None
                } else {
                    Some($wrap(array.value(i)))
                })
            }
        }
    };
}
typed_arg!(bool, Bool, |v| v);
typed_arg!(i32, Int32, |v| v);
typed_arg!(i64, Int64, |v| v);
typed_arg!(u64, UInt64, |v| v);
typed_arg!(f32, Float32, |v| v);
typed_arg!(f64, Float64, |v| v);
typed_arg!(Date, Date32, |days_since_epoch| Date { days_since_epoch });
typed_arg!(Timestamp, Timestamp, |micros_since_epoch| Timestamp {
    micros_since_epoch
});

/// A borrowed argument from any of three Arrow layouts (offsets, large offsets, views).
macro_rules! borrowed_arg {
    ($rust:ty, [$($variant:ident),+], $wanted:literal) => {
        impl<'a> BatchArg<'a> for $rust {
            #[inline]
            fn read(column: &'a Column, row: usize) -> Result<Option<Self>, String> {
                let i = column.index(row);
                Ok(match &column.typed {
                    $(Typed::$variant(a) => (!a.is_null(i)).then(|| a.value(i)),)+
                    _ => return Err(type_error(column, $wanted)),
                })
            }
        }
    };
}
borrowed_arg!(&'a str, [Utf8, LargeUtf8, Utf8View], "a string");
borrowed_arg!(&'a [u8], [Binary, LargeBinary, BinaryView], "binary");

impl BatchArg<'_> for String {
    #[inline]
    fn read(column: &Column, row: usize) -> Result<Option<Self>, String> {
        Ok(<&str>::read(column, row)?.map(str::to_string))
    }
}

impl BatchArg<'_> for Vec<u8> {
    #[inline]
    fn read(column: &Column, row: usize) -> Result<Option<Self>, String> {
        Ok(<&[u8]>::read(column, row)?.map(<[u8]>::to_vec))
    }
}

impl<'a, T: BatchArg<'a>> BatchArg<'a> for Option<T> {
    #[inline]
    fn read(column: &'a Column, row: usize) -> Result<Option<Self>, String> {
        Ok(Some(T::read(column, row)?))
    }
}

/// The result column under construction.
#[derive(Debug)]
pub enum Output {
    /// Boolean.
    Bool(BooleanBuilder),
    /// Int64.
    Int64(Int64Builder),
    /// UInt64.
    UInt64(UInt64Builder),
    /// Float64.
    Float64(Float64Builder),
    /// Utf8.
    Utf8(StringBuilder),
    /// Int32.
    Int32(Int32Builder),
    /// Float32.
    Float32(Float32Builder),
    /// Binary.
    Binary(BinaryBuilder),
    /// Date32.
    Date32(Date32Builder),
    /// Timestamp(µs, UTC).
    TimestampMicros(TimestampMicrosecondBuilder),
}

impl Output {
    pub(crate) fn new(t: UdfType, rows: usize, bytes: usize) -> Output {
        match t {
            UdfType::Bool => Output::Bool(BooleanBuilder::with_capacity(rows)),
            UdfType::Int64 => Output::Int64(Int64Builder::with_capacity(rows)),
            UdfType::UInt64 => Output::UInt64(UInt64Builder::with_capacity(rows)),
            UdfType::Float64 => Output::Float64(Float64Builder::with_capacity(rows)),
            UdfType::Utf8 => Output::Utf8(StringBuilder::with_capacity(rows, bytes)),
            UdfType::Int32 => Output::Int32(Int32Builder::with_capacity(rows)),
            UdfType::Float32 => Output::Float32(Float32Builder::with_capacity(rows)),
            UdfType::Binary => Output::Binary(BinaryBuilder::with_capacity(rows, bytes)),
            UdfType::Date32 => Output::Date32(Date32Builder::with_capacity(rows)),
            UdfType::TimestampMicros => Output::TimestampMicros(
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"),
            ),
        }
    }

    /// The bytes written so far to a string or binary output.
    pub(crate) fn value_bytes(&self) -> Option<usize> {
        match self {
            Output::Utf8(b) => Some(b.values_slice().len()),
            Output::Binary(b) => Some(b.values_slice().len()),
            _ => None,
        }
    }

    /// Appends NULL.
    pub fn append_null(&mut self) {
        match self {
            Output::Bool(b) => b.append_null(),
            Output::Int64(b) => b.append_null(),
            Output::UInt64(b) => b.append_null(),
            Output::Float64(b) => b.append_null(),
            Output::Utf8(b) => b.append_null(),
            Output::Int32(b) => b.append_null(),
            Output::Float32(b) => b.append_null(),
            Output::Binary(b) => b.append_null(),
            Output::Date32(b) => b.append_null(),
            Output::TimestampMicros(b) => b.append_null(),
        }
    }

    pub(crate) fn finish(self) -> ArrayRef {
        match self {
            Output::Bool(mut b) => Arc::new(b.finish()),
            Output::Int64(mut b) => Arc::new(b.finish()),
            Output::UInt64(mut b) => Arc::new(b.finish()),
            Output::Float64(mut b) => Arc::new(b.finish()),
            Output::Utf8(mut b) => Arc::new(b.finish()),
            Output::Int32(mut b) => Arc::new(b.finish()),
            Output::Float32(mut b) => Arc::new(b.finish()),
            Output::Binary(mut b) => Arc::new(b.finish()),
            Output::Date32(mut b) => Arc::new(b.finish()),
            Output::TimestampMicros(mut b) => Arc::new(b.finish()),
        }
    }
}

/// Appends a function's return (value, `Option`, or `Result`) to the output.
#[inline]
pub fn append<R: IntoUdfResult>(out: &mut Output, result: R) -> Result<(), String> {
    result.into_udf_result()?.append_to(out)
}

/// Appends what an output-parameter function wrote into `buffer` (unless it failed).
#[inline]
pub fn append_written<R: IntoUnitResult>(
    out: &mut Output,
    done: R,
    buffer: &str,
) -> Result<(), String> {
    done.into_unit_result()?;
    match out {
        Output::Utf8(b) => {
            b.append_value(buffer);
            Ok(())
        }
        _ => Err(MISMATCH.to_string()),
    }
}

/// A primitive Rust type with an Arrow primitive type, for the vectorised kernels.
pub trait Native: arrow_buffer::ArrowNativeType + Send + Sync + 'static {
    /// The Arrow type.
    type Arrow: ArrowPrimitiveType<Native = Self>;
    /// The ABI type.
    const TYPE: UdfType;
}
impl Native for i32 {
    type Arrow = Int32Type;
    const TYPE: UdfType = UdfType::Int32;
}
impl Native for i64 {
    type Arrow = Int64Type;
    const TYPE: UdfType = UdfType::Int64;
}
impl Native for u64 {
    type Arrow = UInt64Type;
    const TYPE: UdfType = UdfType::UInt64;
}
impl Native for f32 {
    type Arrow = Float32Type;
    const TYPE: UdfType = UdfType::Float32;
}
impl Native for f64 {
    type Arrow = Float64Type;
    const TYPE: UdfType = UdfType::Float64;
}

/// The column as a primitive array of `rows` rows (a scalar keeps its one row).
fn primitive<A: Native>(column: &Column, rows: usize) -> Result<PrimitiveArray<A::Arrow>, String> {
    let array = column
        .array
        .as_primitive_opt::<A::Arrow>()
        .ok_or_else(|| type_error(column, std::any::type_name::<A>()))?;
    Ok(if !column.scalar && array.len() > rows {
        array.slice(0, rows)
    } else {
        array.clone()
    })
}

/// The NULLs of a column, if it has any.
fn some_nulls<T: ArrowPrimitiveType>(a: &PrimitiveArray<T>) -> Option<&NullBuffer> {
    a.nulls().filter(|n| n.null_count() > 0)
}

/// `f` over every valid row of `a`. Without NULLs, a loop over every slot without branches,
/// which the compiler vectorises; with NULLs, `f` runs at the valid indices only (a NULL
/// slot holds whatever value was there, e.g. after a filter) and NULL slots hold zero.
fn map_valid<A: Native, R: Native>(
    a: &PrimitiveArray<A::Arrow>,
    f: impl Fn(A) -> R,
) -> PrimitiveArray<R::Arrow> {
    let Some(nulls) = some_nulls(a) else {
        return a.unary(f);
    };
    let values = a.values();
    let mut out = vec![R::default(); a.len()];
    for i in nulls.valid_indices() {
        out[i] = f(values[i]);
    }
    PrimitiveArray::new(out.into(), Some(nulls.clone()))
}

/// [`map_valid`] for a boolean-valued `f`.
fn map_valid_bool<A: Native>(a: &PrimitiveArray<A::Arrow>, f: impl Fn(A) -> bool) -> BooleanArray {
    let Some(nulls) = some_nulls(a) else {
        return BooleanArray::from_unary(a, f);
    };
    let values = a.values();
    let mut bits = BooleanBufferBuilder::new(a.len());
    bits.append_n(a.len(), false);
    for i in nulls.valid_indices() {
        if f(values[i]) {
            bits.set_bit(i, true);
        }
    }
    BooleanArray::new(bits.finish(), Some(nulls.clone()))
}

/// `f` over the rows of two columns of one length where both are valid; see [`map_valid`].
fn map_valid2<A: Native, B: Native, R: Native>(
    a: &PrimitiveArray<A::Arrow>,
    b: &PrimitiveArray<B::Arrow>,
    f: impl Fn(A, B) -> R,
) -> PrimitiveArray<R::Arrow> {
    let (x, y) = (a.values(), b.values());
    let nulls = NullBuffer::union(a.nulls(), b.nulls());
    match nulls.as_ref().filter(|n| n.null_count() > 0) {
        None => {
            let values: Vec<R> = x.iter().zip(y.iter()).map(|(&x, &y)| f(x, y)).collect();
            PrimitiveArray::new(values.into(), nulls)
        }
        Some(valid) => {
            let mut out = vec![R::default(); a.len()];
            for i in valid.valid_indices() {
                out[i] = f(x[i], y[i]);
            }
            PrimitiveArray::new(out.into(), Some(valid.clone()))
        }
    }
}

/// The result of constant arguments for `rows` rows: `f` called once for an immutable
/// function, else once per row (a volatile function may answer differently every call; a
/// stable one is not promised to be pure either).
fn constant<R: Native>(
    rows: usize,
    immutable: bool,
    f: impl Fn() -> R,
) -> PrimitiveArray<R::Arrow> {
    if immutable {
        match rows {
            0 => PrimitiveArray::new_null(0),
            _ => PrimitiveArray::from_value(f(), rows),
        }
    } else {
        let values: Vec<R> = (0..rows).map(|_| f()).collect();
        PrimitiveArray::new(values.into(), None)
    }
}

/// `f` over one primitive column; see [`map_valid`]. A constant argument (`scalar`) is
/// computed once when `immutable`, else once per row; a NULL constant gives NULLs without
/// a call.
pub fn unary<A: Native, R: Native>(
    columns: &[Column],
    rows: usize,
    immutable: bool,
    f: impl Fn(A) -> R,
) -> Result<ArrayRef, String> {
    let a = primitive::<A>(&columns[0], rows)?;
    if columns[0].scalar {
        if a.is_null(0) {
            return Ok(Arc::new(PrimitiveArray::<R::Arrow>::new_null(rows)));
        }
        let x = a.value(0);
        return Ok(Arc::new(constant::<R>(rows, immutable, || f(x))));
    }
    Ok(Arc::new(map_valid::<A, R>(&a, f)))
}

/// A boolean-valued `f` over one primitive column; see [`unary`].
pub fn unary_bool<A: Native>(
    columns: &[Column],
    rows: usize,
    immutable: bool,
    f: impl Fn(A) -> bool,
) -> Result<ArrayRef, String> {
    let a = primitive::<A>(&columns[0], rows)?;
    if columns[0].scalar {
        if a.is_null(0) {
            return Ok(Arc::new(BooleanArray::new_null(rows)));
        }
        let x = a.value(0);
        let bits = if immutable {
            let v = rows > 0 && f(x);
            BooleanBuffer::collect_bool(rows, |_| v)
        } else {
            BooleanBuffer::collect_bool(rows, |_| f(x))
        };
        return Ok(Arc::new(BooleanArray::new(bits, None)));
    }
    Ok(Arc::new(map_valid_bool::<A>(&a, f)))
}

/// `f` over two primitive columns, either of which may be a constant; see [`unary`].
pub fn binary<A: Native, B: Native, R: Native>(
    columns: &[Column],
    rows: usize,
    immutable: bool,
    f: impl Fn(A, B) -> R,
) -> Result<ArrayRef, String> {
    let a = primitive::<A>(&columns[0], rows)?;
    let b = primitive::<B>(&columns[1], rows)?;
    let null_constant = (columns[0].scalar && a.is_null(0)) || (columns[1].scalar && b.is_null(0));
    if null_constant {
        return Ok(Arc::new(PrimitiveArray::<R::Arrow>::new_null(rows)));
    }
    let array = match (columns[0].scalar, columns[1].scalar) {
        (false, false) => map_valid2::<A, B, R>(&a, &b, f),
        (false, true) => {
            let y = b.value(0);
            map_valid::<A, R>(&a, |x| f(x, y))
        }
        (true, false) => {
            let x = a.value(0);
            map_valid::<B, R>(&b, |y| f(x, y))
        }
        (true, true) => {
            let (x, y) = (a.value(0), b.value(0));
            constant::<R>(rows, immutable, || f(x, y))
        }
    };
    Ok(Arc::new(array))
}

/// A whole-batch evaluation: columns and row count in, result array out.
pub type Kernel<'a> = dyn Fn(&[Column], usize) -> Result<ArrayRef, String> + 'a;

/// Bytes per row that a function's last batch wrote to its string or binary output (one per
/// function, in the generated code): the next batch allocates that much up front, instead of
/// growing (allocating, copying and freeing) the buffer while its row loop runs.
pub type BytesPerRow = std::sync::atomic::AtomicUsize;

/// The row loop inside the plugin: `row(columns, i, out)` appends row `i`'s result.
pub fn rows(
    columns: &[Column],
    rows: usize,
    return_type: UdfType,
    bytes_per_row: &BytesPerRow,
    mut row: impl FnMut(&[Column], usize, &mut Output) -> Result<(), String>,
) -> Result<ArrayRef, String> {
    use std::sync::atomic::Ordering::Relaxed;
    // 16 bytes per row to start with; then what the last batch needed, plus an eighth.
    let per_row = match bytes_per_row.load(Relaxed) {
        0 => 16,
        n => n.saturating_add(n / 8).saturating_add(1),
    };
    // At most 16 MiB up front: a batch of huge values must not make the next one reserve
    // (and, failing, abort on) an absurd amount.
    const MAX_UP_FRONT: usize = 16 << 20;
    let bytes = rows.saturating_mul(per_row).min(MAX_UP_FRONT);
    let mut out = Output::new(return_type, rows, bytes);
    for i in 0..rows {
        row(columns, i, &mut out)?;
    }
    if let Some(bytes) = out.value_bytes()
        && rows > 0
    {
        bytes_per_row.store(bytes.div_ceil(rows), Relaxed);
    }
    Ok(out.finish())
}

/// The C Data Interface format of `t`'s Arrow type: what the host's schema of an argument of
/// the declared type says, and what the result schema says.
pub(super) fn c_format(t: UdfType) -> &'static CStr {
    match t {
        UdfType::Bool => c"b",
        UdfType::Int64 => c"l",
        UdfType::UInt64 => c"L",
        UdfType::Float64 => c"g",
        UdfType::Utf8 => c"u",
        UdfType::Int32 => c"i",
        UdfType::Float32 => c"f",
        UdfType::Binary => c"z",
        UdfType::Date32 => c"tdD",
        UdfType::TimestampMicros => c"tsu:UTC",
    }
}

/// The Arrow type of `t` (`Timestamp` is microseconds in UTC). Built per call, not cached in a
/// static: a plugin can be unloaded, and a `Timestamp`'s time zone (an allocation) kept in one
/// of its statics would leak at every `dlclose`.
pub(crate) fn arrow_type(t: UdfType) -> DataType {
    match t {
        UdfType::Bool => DataType::Boolean,
        UdfType::Int64 => DataType::Int64,
        UdfType::UInt64 => DataType::UInt64,
        UdfType::Float64 => DataType::Float64,
        UdfType::Utf8 => DataType::Utf8,
        UdfType::Int32 => DataType::Int32,
        UdfType::Float32 => DataType::Float32,
        UdfType::Binary => DataType::Binary,
        UdfType::Date32 => DataType::Date32,
        UdfType::TimestampMicros => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
    }
}

/// Imports one argument array. When the host's schema says the declared type (the format
/// string compared byte for byte, and no dictionary), the array is imported with that type
/// without parsing the schema (a fixed-width one straight into its array, [`import_fixed`]);
/// any other layout the host may pass (`LargeUtf8`, `Utf8View`, ...) is imported as its schema
/// describes it.
///
/// # Safety
///
/// `array` must be a valid array described by `schema`, as the host exports them.
unsafe fn import_argument(
    array: FFI_ArrowArray,
    schema: &FFI_ArrowSchema,
    declared: UdfType,
) -> Result<ArrayRef, arrow_schema::ArrowError> {
    let canonical = !schema.format.is_null()
        && schema.dictionary.is_null()
        // SAFETY: non-null, and a schema's format is a NUL-terminated string that lives as
        // long as the schema, which the host lends for the call.
        && unsafe { format_is(schema.format, c_format(declared)) };
    if !canonical {
        // SAFETY: the host exports valid arrays described by their schemas.
        return Ok(make_array(unsafe { from_ffi(array, schema) }?));
    }
    // In each arm, the host's array is valid and of the type its schema describes, which is
    // exactly `declared`'s (same format, no dictionary): the arm's type.
    let fixed = match declared {
        // SAFETY: a valid array of Int64 (above).
        UdfType::Int64 => unsafe { import_fixed::<Int64Type>(array) },
        // SAFETY: a valid array of UInt64 (above).
        UdfType::UInt64 => unsafe { import_fixed::<UInt64Type>(array) },
        // SAFETY: a valid array of Float64 (above).
        UdfType::Float64 => unsafe { import_fixed::<Float64Type>(array) },
        // SAFETY: a valid array of Int32 (above).
        UdfType::Int32 => unsafe { import_fixed::<Int32Type>(array) },
        // SAFETY: a valid array of Float32 (above).
        UdfType::Float32 => unsafe { import_fixed::<Float32Type>(array) },
        // SAFETY: a valid array of Date32 (above).
        UdfType::Date32 => unsafe { import_fixed::<Date32Type>(array) },
        _ => Err(array),
    };
    match fixed {
        Ok(imported) => Ok(imported),
        // SAFETY: as above.
        Err(array) => Ok(make_array(unsafe {
            from_ffi_and_data_type(array, arrow_type(declared))
        }?)),
    }
}

/// The fields of an array in the plain layout of a fixed-width type of `N`s.
pub(super) struct PlainLayout<N> {
    /// The validity bitmap, or null.
    pub validity: *const u8,
    /// The values buffer: non-null and aligned for `N`.
    pub values: NonNull<N>,
    pub length: usize,
    pub offset: usize,
}

/// `array`'s fields when they are the plain layout of a fixed-width array of `N`s: length and
/// offset not negative, two buffers (the validity bitmap, possibly null, and the values, non-null
/// and aligned for `N`), no children; `None` for anything else. Nothing is read but the struct
/// and its two buffer pointers. Shared by the importer of fixed-width arguments
/// ([`import_fixed`]) and the direct entry, which reads such arguments in place.
///
/// # Safety
///
/// `array` must be a valid array as the host exports it (`buffers` points at `n_buffers`
/// pointers).
pub(super) unsafe fn plain_layout<N>(array: &FFI_ArrowArray) -> Option<PlainLayout<N>> {
    let (Ok(length), Ok(offset)) = (usize::try_from(array.length), usize::try_from(array.offset))
    else {
        return None;
    };
    if array.n_buffers != 2 || array.buffers.is_null() || array.n_children != 0 {
        return None;
    }
    let pointers = array.buffers.cast::<*const u8>();
    // SAFETY: `buffers` points at `n_buffers` (two) buffer pointers of the valid array.
    let (validity, values) = unsafe { (*pointers, *pointers.add(1)) };
    let values = NonNull::new(values.cast_mut().cast::<N>())?;
    values.is_aligned().then_some(PlainLayout {
        validity,
        values,
        length,
        offset,
    })
}

/// Whether the NUL-terminated string at `format` is `expected`, compared byte by byte up to the
/// first difference (no `strlen` over a string of unknown length first).
///
/// # Safety
///
/// `format` must point at a NUL-terminated string.
pub(super) unsafe fn format_is(format: *const std::ffi::c_char, expected: &CStr) -> bool {
    for (i, &byte) in expected.to_bytes_with_nul().iter().enumerate() {
        // SAFETY: the bytes before `i` matched `expected`'s, none of which is NUL, so the
        // string's terminator is at `i` or after: `i` is within it.
        if unsafe { format.add(i).cast::<u8>().read() } != byte {
            return false;
        }
    }
    true
}

/// Imports an argument of a fixed-width type `T` straight into its array: the host's two
/// buffers wrapped as they are, owned by the moved C array (whose release, the host's callback,
/// runs when the last of them drops). arrow's importer does the same through `ArrayData`,
/// `make_array` and two dozen functions whose code and data a call must bring back into the
/// caches: in a query, between two batches, they have left them, and that was a good share of a
/// batch call's fixed cost (BENCHMARKS.md). The array is given back, untouched, when its fields are
/// not the plain layout expected (then arrow's importer takes it: a buffer that is null or not
/// aligned for `T`, a negative length or offset, another buffer count, children).
///
/// # Safety
///
/// `array` must be a valid, unreleased array of `T`'s Arrow type.
unsafe fn import_fixed<T: ArrowPrimitiveType>(
    array: FFI_ArrowArray,
) -> Result<ArrayRef, FFI_ArrowArray> {
    // SAFETY: a valid array (this function's contract).
    let Some(plain) = (unsafe { plain_layout::<T::Native>(&array) }) else {
        return Err(array);
    };
    let (validity, values, len, offset) =
        (plain.validity, plain.values, plain.length, plain.offset);
    let null_count = array.null_count;
    let end = offset + len;
    let owner = Arc::new(array);
    // SAFETY: the values buffer of a valid array holds its `offset + length` values and lives
    // until the array is released, which `owner` delays until every buffer made from it drops.
    let values = unsafe {
        Buffer::from_custom_allocation(
            values.cast(),
            end * std::mem::size_of::<T::Native>(),
            owner.clone(),
        )
    };
    let nulls = match NonNull::new(validity.cast_mut()) {
        Some(validity) if null_count != 0 => {
            // SAFETY: a non-null validity bitmap holds a bit for each of the `offset + length`
            // slots and lives as long as the values (above).
            let bits = unsafe { Buffer::from_custom_allocation(validity, end.div_ceil(8), owner) };
            let bits = BooleanBuffer::new(bits, offset, len);
            Some(match usize::try_from(null_count) {
                // SAFETY: the host's null count is that of its bitmap (the C Data Interface's
                // promise, as arrow's importer takes it too).
                Ok(count) => unsafe { NullBuffer::new_unchecked(bits, count) },
                // -1: not computed; counted here.
                Err(_) => NullBuffer::new(bits),
            })
        }
        // No bitmap, or one without a NULL: all valid.
        _ => None,
    };
    Ok(Arc::new(PrimitiveArray::<T>::new(
        ScalarBuffer::new(values, offset, len),
        nulls,
    )))
}

/// The result schema: the declared type's format, from static memory, so exporting it
/// allocates nothing and its release callback only marks it released.
pub(crate) fn result_schema(t: UdfType) -> FFI_ArrowSchema {
    FFI_ArrowSchema {
        format: c_format(t).as_ptr(),
        name: std::ptr::null(),
        metadata: std::ptr::null(),
        flags: 0,
        n_children: 0,
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: Some(release_result_schema),
        private_data: std::ptr::null_mut(),
    }
}

/// The release callback of [`result_schema`]: nothing is owned, so it marks the schema
/// released.
///
/// # Safety
///
/// `schema` must be null or point at a schema made by [`result_schema`].
unsafe extern "C" fn release_result_schema(schema: *mut FFI_ArrowSchema) {
    if schema.is_null() {
        return;
    }
    // SAFETY: non-null, and the consumer passes the schema it releases, valid for writes.
    unsafe { (*schema).release = None };
}

/// What an array exported by [`export_result`] owns: the array itself (so its buffers) and
/// the C array of buffer pointers that `FFI_ArrowArray::buffers` points at.
struct ExportedResult {
    _array: ArrayRef,
    buffers: [*const c_void; 3],
}

/// The data buffers of a result of type `t` (the validity bitmap aside) and the offset that
/// applies to them, read without building an `ArrayData`; `None` if `array` is not of `t`'s
/// Arrow type.
fn data_buffers(array: &ArrayRef, t: UdfType) -> Option<(usize, [*const c_void; 2], i64)> {
    fn primitive<T: ArrowPrimitiveType>(
        array: &ArrayRef,
    ) -> Option<(usize, [*const c_void; 2], i64)> {
        let values = array.as_primitive_opt::<T>()?.values().inner().as_ptr();
        // A primitive array's values buffer starts at its first value: offset 0.
        Some((0, [values.cast(), std::ptr::null()], 1))
    }
    match t {
        UdfType::Bool => {
            // Boolean values are bits, sliced by a bit offset.
            let values = array.as_boolean_opt()?.values();
            let bits = values.inner().as_ptr().cast();
            Some((values.offset(), [bits, std::ptr::null()], 1))
        }
        UdfType::Int64 => primitive::<Int64Type>(array),
        UdfType::UInt64 => primitive::<UInt64Type>(array),
        UdfType::Float64 => primitive::<Float64Type>(array),
        UdfType::Int32 => primitive::<Int32Type>(array),
        UdfType::Float32 => primitive::<Float32Type>(array),
        UdfType::Date32 => primitive::<Date32Type>(array),
        UdfType::TimestampMicros => primitive::<TimestampMicrosecondType>(array),
        UdfType::Utf8 => {
            let a = array.as_string_opt::<i32>()?;
            let offsets = a.offsets().inner().inner().as_ptr().cast();
            Some((0, [offsets, a.values().as_ptr().cast()], 2))
        }
        UdfType::Binary => {
            let a = array.as_binary_opt::<i32>()?;
            let offsets = a.offsets().inner().inner().as_ptr().cast();
            Some((0, [offsets, a.values().as_ptr().cast()], 2))
        }
    }
}

/// Exports the result array, of the declared type `t`, with one allocation (arrow's exporter
/// makes four): the array and its buffer pointers in one box. A validity bitmap whose bit
/// offset differs from the values' (a NULL mask shared with a sliced argument) goes through
/// arrow's exporter, which realigns it.
pub(crate) fn export_result(array: ArrayRef, t: UdfType) -> FFI_ArrowArray {
    let Some((offset, [first, second], data_buffers)) = data_buffers(&array, t) else {
        return FFI_ArrowArray::new(&array.to_data());
    };
    let validity = match array.nulls() {
        None => std::ptr::null(),
        Some(nulls) if nulls.offset() == offset => nulls.buffer().as_ptr().cast(),
        Some(_) => return FFI_ArrowArray::new(&array.to_data()),
    };
    let (length, null_count) = (array.len() as i64, array.null_count() as i64);
    let private = Box::into_raw(Box::new(ExportedResult {
        _array: array,
        buffers: [validity, first, second],
    }));
    // SAFETY: `private` comes from `Box::into_raw` just above: valid, and owned by the
    // exported array until its release callback takes it back.
    let buffers = unsafe { (&raw mut (*private).buffers).cast::<*const c_void>() };
    FFI_ArrowArray {
        length,
        null_count,
        offset: offset as i64,
        n_buffers: 1 + data_buffers,
        n_children: 0,
        buffers,
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: Some(release_result),
        private_data: private.cast(),
    }
}

/// The release callback of [`export_result`]: drops the array (its buffers) and the pointers.
///
/// # Safety
///
/// `array` must be null or point at an array made by [`export_result`], released once.
unsafe extern "C" fn release_result(array: *mut FFI_ArrowArray) {
    if array.is_null() {
        return;
    }
    // SAFETY: non-null, and the consumer passes the array it releases, valid for reads and
    // writes.
    let array = unsafe { &mut *array };
    if !array.private_data.is_null() {
        // SAFETY: `private_data` was set by `export_result` from `Box::into_raw` of an
        // `ExportedResult`, and is taken back once: it is cleared below.
        drop(unsafe { Box::from_raw(array.private_data.cast::<ExportedResult>()) });
    }
    array.private_data = std::ptr::null_mut();
    array.release = None;
}

/// Imports the argument arrays of a batch or asynchronous call (of the declared `arg_types`),
/// each checked to have `num_rows` rows (one for a scalar).
///
/// # Safety
///
/// `args`, `schemas` and `is_scalar` must hold `args_len` valid arrays, schemas and flags, as
/// the host passes them to a [`BatchEntrypoint`](crate::v2::BatchEntrypoint); the arrays are
/// moved out.
pub(crate) unsafe fn import_columns(
    args: *mut FFI_ArrowArray,
    schemas: *const FFI_ArrowSchema,
    is_scalar: *const u8,
    args_len: usize,
    arg_types: &[UdfType],
    num_rows: usize,
) -> Result<Vec<Column>, String> {
    let expected = arg_types.len();
    if args_len != expected {
        return Err(format!("expected {expected} arguments, got {args_len}"));
    }
    if args_len > 0 && (args.is_null() || schemas.is_null() || is_scalar.is_null()) {
        return Err("null argument arrays".to_string());
    }
    let mut columns = Vec::with_capacity(args_len);
    for (i, &declared) in arg_types.iter().enumerate() {
        // SAFETY: `i < args_len`, and the host passes that many arrays, schemas and
        // flags. `from_raw` moves the array out, leaving a released one behind, which is
        // the C Data Interface's move semantics the ABI prescribes.
        let (array, schema, scalar) = unsafe {
            (
                FFI_ArrowArray::from_raw(args.add(i)),
                &*schemas.add(i),
                *is_scalar.add(i) != 0,
            )
        };
        // SAFETY: the host exports valid arrays described by these schemas.
        let array = unsafe { import_argument(array, schema, declared) }
            .map_err(|e| format!("argument {}: {e}", i + 1))?;
        let enough = if scalar {
            !array.is_empty()
        } else {
            array.len() >= num_rows
        };
        if !enough {
            return Err(format!(
                "argument {} has {} rows, {num_rows} expected",
                i + 1,
                array.len()
            ));
        }
        columns.push(Column::new(array, scalar));
    }
    Ok(columns)
}

/// The body of every generated batch entrypoint: imports the arguments (of the declared
/// `arg_types`), runs `fast` (a vectorised kernel, if the function has one) or else `slow`
/// (the row loop) inside `catch_unwind`, and exports the result (of the declared
/// `return_type`) or writes the error.
///
/// # Safety
///
/// The pointers must satisfy [`BatchEntrypoint`](crate::v2::BatchEntrypoint)'s contract:
/// `args_len` arrays, schemas and flags, and `out` and `error` valid for writes.
#[allow(clippy::too_many_arguments)]
pub unsafe fn call_batch(
    args: *mut FFI_ArrowArray,
    schemas: *const FFI_ArrowSchema,
    is_scalar: *const u8,
    args_len: usize,
    arg_types: &[UdfType],
    return_type: UdfType,
    num_rows: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
    fast: Option<&Kernel<'_>>,
    slow: &Kernel<'_>,
) -> i32 {
    if out.is_null() || out_schema.is_null() || error.is_null() {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller's promise, passed on.
        let columns =
            unsafe { import_columns(args, schemas, is_scalar, args_len, arg_types, num_rows) }?;
        // The kernel calls the function on valid rows only, as the row loop does, so a
        // panic in it is the function's panic, reported like one in the row loop (never
        // retried there, which would call the function again on the rows before it).
        let array = match fast {
            Some(fast) => fast(&columns, num_rows)?,
            None => slow(&columns, num_rows)?,
        };
        // The schema says the declared type, so the array must be of it.
        let declared = arrow_type(return_type);
        if *array.data_type() != declared {
            return Err(format!(
                "{MISMATCH}: the result is of type {}, {declared} declared",
                array.data_type()
            ));
        }
        Ok((
            export_result(array, return_type),
            result_schema(return_type),
        ))
    }));
    // SAFETY: the caller's promise: `out`, `out_schema` and `error` are non-null and valid for
    // writes.
    unsafe { super::write_batch_outcome(result, out, out_schema, error) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use arrow_array::Int64Array;

    use super::*;

    #[test]
    fn formats_and_schemas_are_arrows() {
        for t in UdfType::ALL {
            let exported = FFI_ArrowSchema::try_from(&arrow_type(t)).unwrap();
            assert_eq!(exported.format(), c_format(t).to_str().unwrap(), "{t:?}");
            let schema = result_schema(t);
            assert_eq!(DataType::try_from(&schema).unwrap(), arrow_type(t));
            assert_eq!(
                (schema.n_children, schema.dictionary),
                (0, std::ptr::null_mut())
            );
            // Released by dropping it: the callback marks it released, nothing to free.
            let mut schema = schema;
            // SAFETY: a schema made by `result_schema`, released once.
            unsafe { release_result_schema(&mut schema) };
            assert!(schema.release.is_none());
        }
    }

    #[test]
    fn results_export_as_the_same_arrays() {
        use arrow_array::{
            BinaryArray, Date32Array, Float32Array, Float64Array, Int32Array, StringArray,
            TimestampMicrosecondArray, UInt64Array,
        };
        let ints = Int64Array::from(vec![Some(1), None, Some(3), Some(4), None]);
        let bools = BooleanArray::from(vec![Some(true), None, Some(false), Some(true), None]);
        let strings = StringArray::from(vec![Some("a"), None, Some("é"), Some(""), Some("z")]);
        let cases: Vec<(ArrayRef, UdfType)> = vec![
            (Arc::new(ints.clone()), UdfType::Int64),
            // NULLs at a bit offset: arrow's exporter realigns them.
            (Arc::new(ints.slice(1, 3)), UdfType::Int64),
            (
                Arc::new(Int64Array::from(vec![5, 6, 7]).slice(1, 2)),
                UdfType::Int64,
            ),
            (Arc::new(bools.clone()), UdfType::Bool),
            // Values and NULLs at the same bit offset: exported with that offset.
            (Arc::new(bools.slice(1, 3)), UdfType::Bool),
            (Arc::new(strings.clone()), UdfType::Utf8),
            (Arc::new(strings.slice(2, 3)), UdfType::Utf8),
            (
                Arc::new(BinaryArray::from(vec![Some(&b"ab"[..]), None, Some(b"")])),
                UdfType::Binary,
            ),
            (
                Arc::new(Int32Array::from(vec![Some(-1), None])),
                UdfType::Int32,
            ),
            (
                Arc::new(UInt64Array::from(vec![u64::MAX, 0])),
                UdfType::UInt64,
            ),
            (
                Arc::new(Float32Array::from(vec![1.5, -0.0])),
                UdfType::Float32,
            ),
            (
                Arc::new(Float64Array::from(vec![Some(2.5), None])),
                UdfType::Float64,
            ),
            (
                Arc::new(Date32Array::from(vec![19_000, -1])),
                UdfType::Date32,
            ),
            (
                Arc::new(TimestampMicrosecondArray::from(vec![Some(1), None]).with_timezone("UTC")),
                UdfType::TimestampMicros,
            ),
            (
                Arc::new(Int64Array::from(Vec::<i64>::new())),
                UdfType::Int64,
            ),
            (
                Arc::new(StringArray::from(Vec::<&str>::new())),
                UdfType::Utf8,
            ),
        ];
        for (array, t) in cases {
            let exported = export_result(Arc::clone(&array), t);
            let expected = array.to_data();
            drop(array);
            // SAFETY: `export_result` exports a valid array of `t`'s type.
            let data = unsafe { from_ffi_and_data_type(exported, arrow_type(t)) }.unwrap();
            data.validate_full().unwrap();
            assert_eq!(data, expected, "{t:?}");
        }
    }

    #[test]
    fn arguments_of_the_declared_type_and_of_other_layouts_are_imported() {
        let strings: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["a", "bc"]));
        let large: ArrayRef = Arc::new(arrow_array::LargeStringArray::from(vec!["a", "bc"]));
        for array in [strings, large] {
            let data = array.to_data();
            let schema = FFI_ArrowSchema::try_from(data.data_type()).unwrap();
            // SAFETY: a valid array described by its schema.
            let imported =
                unsafe { import_argument(FFI_ArrowArray::new(&data), &schema, UdfType::Utf8) }
                    .unwrap();
            assert_eq!(imported.to_data(), data);
        }
        // A schema that says another type than the declared one is imported as it says
        // (the reader then refuses it).
        let ints = Int64Array::from(vec![1]).into_data();
        let schema = FFI_ArrowSchema::try_from(ints.data_type()).unwrap();
        // SAFETY: a valid array described by its schema.
        let imported =
            unsafe { import_argument(FFI_ArrowArray::new(&ints), &schema, UdfType::Float64) }
                .unwrap();
        assert_eq!(imported.data_type(), &DataType::Int64);
    }

    fn repeat_rows(input: &Column, n: usize, hint: &BytesPerRow, times: usize) -> ArrayRef {
        rows(
            std::slice::from_ref(input),
            n,
            UdfType::Utf8,
            hint,
            |cols, i, out| {
                let s = <&str as BatchArg>::read(&cols[0], i)?.unwrap_or_default();
                append(out, s.repeat(times))
            },
        )
        .unwrap()
    }

    #[test]
    fn string_outputs_are_sized_from_the_last_batch() {
        let hint = BytesPerRow::new(0);
        let input = Column::new(
            Arc::new(arrow_array::StringArray::from(vec!["abc"; 10])),
            false,
        );
        let out = repeat_rows(&input, 10, &hint, 7);
        assert_eq!(out.as_string::<i32>().value(9), "abc".repeat(7));
        assert_eq!(hint.load(Relaxed), 21, "bytes per row of that batch");
        // Smaller values next time: the hint follows, results are unaffected.
        let out = repeat_rows(&input, 10, &hint, 1);
        assert_eq!(out.as_string::<i32>().value(0), "abc");
        assert_eq!(hint.load(Relaxed), 3);
        // A huge hint is capped (16 MiB up front), not reserved: this must not abort.
        hint.store(usize::MAX / 2, Relaxed);
        let out = repeat_rows(&input, 10, &hint, 2);
        assert_eq!(out.len(), 10);
        assert_eq!(hint.load(Relaxed), 6);
    }

    #[test]
    fn primitive_outputs_leave_the_hint_alone() {
        let hint = BytesPerRow::new(5);
        let input = Column::new(Arc::new(arrow_array::Int64Array::from(vec![1, 2])), false);
        let out = rows(
            std::slice::from_ref(&input),
            2,
            UdfType::Int64,
            &hint,
            |cols, i, out| {
                let v = <i64 as BatchArg>::read(&cols[0], i)?.unwrap_or_default();
                append(out, v * 2)
            },
        )
        .unwrap();
        assert_eq!(out.as_primitive::<Int64Type>().values(), &[2, 4]);
        assert_eq!(hint.load(Relaxed), 5);
    }

    /// A value the kernels must never pass to the function: it only sits in NULL slots.
    const SENTINEL: i64 = -7_777_777;

    /// An Int64 column whose NULL slots hold [`SENTINEL`] (as after a filter or take).
    fn with_nulls(values: &[Option<i64>]) -> Int64Array {
        let raw: Vec<i64> = values.iter().map(|v| v.unwrap_or(SENTINEL)).collect();
        let valid: Vec<bool> = values.iter().map(Option::is_some).collect();
        Int64Array::new(raw.into(), Some(NullBuffer::from(valid)))
    }

    fn column(array: Int64Array) -> Column {
        Column::new(Arc::new(array), false)
    }

    fn scalar(value: Option<i64>) -> Column {
        Column::new(Arc::new(Int64Array::from(vec![value])), true)
    }

    /// A function that records every argument it is called with.
    struct Recorder(std::cell::RefCell<Vec<i64>>);

    impl Recorder {
        fn new() -> Recorder {
            Recorder(std::cell::RefCell::new(Vec::new()))
        }
        fn saw(&self, x: i64) -> i64 {
            self.0.borrow_mut().push(x);
            x
        }
        fn calls(&self) -> Vec<i64> {
            self.0.borrow().clone()
        }
    }

    fn ints(out: &ArrayRef) -> Vec<Option<i64>> {
        out.as_primitive::<Int64Type>().iter().collect()
    }

    #[test]
    fn unary_calls_the_function_on_valid_rows_only() {
        let calls = Recorder::new();
        let input = column(with_nulls(&[Some(1), None, Some(3), None]));
        let out = unary::<i64, i64>(&[input], 4, true, |x| calls.saw(x) * 10).unwrap();
        assert_eq!(ints(&out), [Some(10), None, Some(30), None]);
        assert_eq!(calls.calls(), [1, 3]);
        // NULL slots of the result hold zero, not the function of a placeholder.
        assert_eq!(out.as_primitive::<Int64Type>().values()[1], 0);

        // A sliced column (an offset into its buffers) and a longer one than the batch.
        let calls = Recorder::new();
        let sliced = with_nulls(&[Some(9), Some(1), None, Some(3), Some(4)]).slice(1, 4);
        let out = unary::<i64, i64>(&[column(sliced)], 3, true, |x| calls.saw(x) + 1).unwrap();
        assert_eq!(ints(&out), [Some(2), None, Some(4)]);
        assert_eq!(calls.calls(), [1, 3]);

        // Without NULLs (a bitmap without unset bits included): every row, vectorised.
        for array in [
            Int64Array::from(vec![5, 6]),
            Int64Array::new(vec![5, 6].into(), Some(NullBuffer::new_valid(2))),
        ] {
            let calls = Recorder::new();
            let out = unary::<i64, i64>(&[column(array)], 2, true, |x| calls.saw(x)).unwrap();
            assert_eq!(ints(&out), [Some(5), Some(6)]);
            assert_eq!(calls.calls(), [5, 6]);
        }

        // All NULL: no call.
        let calls = Recorder::new();
        let input = column(with_nulls(&[None, None]));
        let out = unary::<i64, i64>(&[input], 2, true, |x| calls.saw(x)).unwrap();
        assert_eq!(ints(&out), [None, None]);
        assert!(calls.calls().is_empty());
    }

    #[test]
    fn unary_bool_calls_the_function_on_valid_rows_only() {
        let calls = Recorder::new();
        let input = column(with_nulls(&[Some(2), None, Some(3)]));
        let out = unary_bool::<i64>(&[input], 3, true, |x| calls.saw(x) % 2 == 0).unwrap();
        let out: Vec<Option<bool>> = out.as_boolean().iter().collect();
        assert_eq!(out, [Some(true), None, Some(false)]);
        assert_eq!(calls.calls(), [2, 3]);
    }

    #[test]
    fn binary_calls_the_function_where_both_arguments_are_valid() {
        let add = |calls: &Recorder, x: i64, y: i64| calls.saw(x) + calls.saw(y);
        // Two columns, NULLs in different rows of each.
        let calls = Recorder::new();
        let a = column(with_nulls(&[Some(1), None, Some(3), Some(4)]));
        let b = column(with_nulls(&[Some(10), Some(20), None, Some(40)]));
        let out = binary::<i64, i64, i64>(&[a, b], 4, true, |x, y| add(&calls, x, y)).unwrap();
        assert_eq!(ints(&out), [Some(11), None, None, Some(44)]);
        assert_eq!(calls.calls(), [1, 10, 4, 40]);

        // A column and a constant, either way round.
        let calls = Recorder::new();
        let a = column(with_nulls(&[Some(1), None, Some(3)]));
        let out =
            binary::<i64, i64, i64>(&[a, scalar(Some(100))], 3, true, |x, y| add(&calls, x, y))
                .unwrap();
        assert_eq!(ints(&out), [Some(101), None, Some(103)]);
        assert_eq!(calls.calls(), [1, 100, 3, 100]);
        let calls = Recorder::new();
        let b = column(with_nulls(&[None, Some(2)]));
        let out =
            binary::<i64, i64, i64>(&[scalar(Some(100)), b], 2, true, |x, y| add(&calls, x, y))
                .unwrap();
        assert_eq!(ints(&out), [None, Some(102)]);
        assert_eq!(calls.calls(), [100, 2]);

        // A NULL constant: every row NULL, no call.
        for (a, b) in [
            (scalar(None), column(with_nulls(&[Some(1), Some(2)]))),
            (column(with_nulls(&[Some(1), Some(2)])), scalar(None)),
            (scalar(None), scalar(Some(1))),
        ] {
            let calls = Recorder::new();
            let out = binary::<i64, i64, i64>(&[a, b], 2, false, |x, y| add(&calls, x, y)).unwrap();
            assert_eq!(ints(&out), [None, None]);
            assert!(calls.calls().is_empty());
        }

        // Columns longer than the batch, without NULLs: the vectorised loop, `rows` rows.
        let calls = Recorder::new();
        let a = column(Int64Array::from(vec![1, 2, 3]));
        let b = column(with_nulls(&[Some(1), Some(1)]));
        let out = binary::<i64, i64, i64>(&[a, b], 2, true, |x, y| add(&calls, x, y)).unwrap();
        assert_eq!(ints(&out), [Some(2), Some(3)]);
    }

    #[test]
    fn constants_are_computed_once_only_for_immutable_functions() {
        let counter = std::cell::Cell::new(0);
        let next = |x: i64| {
            counter.set(counter.get() + 1);
            x + counter.get()
        };
        // Immutable: once, the value repeated.
        let out = unary::<i64, i64>(&[scalar(Some(0))], 4, true, next).unwrap();
        assert_eq!(ints(&out), [Some(1); 4]);
        assert_eq!(counter.get(), 1);
        // Stable or volatile: once per row.
        counter.set(0);
        let out = unary::<i64, i64>(&[scalar(Some(0))], 4, false, next).unwrap();
        assert_eq!(ints(&out), [Some(1), Some(2), Some(3), Some(4)]);
        counter.set(0);
        let out =
            binary::<i64, i64, i64>(&[scalar(Some(0)), scalar(Some(10))], 3, false, |x, y| {
                next(x) + y
            })
            .unwrap();
        assert_eq!(ints(&out), [Some(11), Some(12), Some(13)]);
        counter.set(0);
        let out = binary::<i64, i64, i64>(&[scalar(Some(0)), scalar(Some(10))], 3, true, |x, y| {
            next(x) + y
        })
        .unwrap();
        assert_eq!(ints(&out), [Some(11); 3]);
        assert_eq!(counter.get(), 1);
        counter.set(0);
        let odd = |x: i64| next(x) % 2 == 1;
        let out = unary_bool::<i64>(&[scalar(Some(0))], 3, false, odd).unwrap();
        let out: Vec<Option<bool>> = out.as_boolean().iter().collect();
        assert_eq!(out, [Some(true), Some(false), Some(true)]);
        counter.set(0);
        let out = unary_bool::<i64>(&[scalar(Some(0))], 3, true, odd).unwrap();
        let out: Vec<Option<bool>> = out.as_boolean().iter().collect();
        assert_eq!(out, [Some(true); 3]);
        assert_eq!(counter.get(), 1);
        // No rows, no call.
        counter.set(0);
        for immutable in [true, false] {
            let out = unary::<i64, i64>(&[scalar(Some(0))], 0, immutable, next).unwrap();
            assert_eq!(out.len(), 0);
        }
        assert_eq!(counter.get(), 0);
    }

    /// Calls [`call_batch`] with one Int64 argument; the error message on failure.
    fn batch_of(
        input: &Int64Array,
        fast: Option<&Kernel<'_>>,
        slow: &Kernel<'_>,
    ) -> Result<ArrayRef, String> {
        let data = input.to_data();
        let mut args = [FFI_ArrowArray::new(&data)];
        let schemas = [FFI_ArrowSchema::try_from(data.data_type()).unwrap()];
        let flags = [0u8];
        let mut out = FFI_ArrowArray::empty();
        let mut out_schema = FFI_ArrowSchema::empty();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: one valid array, schema and flag; `out`, `out_schema` and `error` are
        // valid for writes.
        let status = unsafe {
            call_batch(
                args.as_mut_ptr(),
                schemas.as_ptr(),
                flags.as_ptr(),
                1,
                &[UdfType::Int64],
                UdfType::Int64,
                input.len(),
                &mut out,
                &mut out_schema,
                &mut error,
                fast,
                slow,
            )
        };
        if status == status::OK {
            // SAFETY: `call_batch` exported a valid array and its schema into them.
            let data = unsafe { arrow_array::ffi::from_ffi(out, &out_schema) }.unwrap();
            return Ok(make_array(data));
        }
        assert!(!error.ptr.is_null());
        // SAFETY: `call_batch` wrote bytes made by `owned_bytes` (a `Vec<u8>`'s parts),
        // which this takes back once.
        let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
        Err(String::from_utf8(bytes).unwrap())
    }

    #[test]
    fn a_panic_in_a_kernel_is_the_error_without_a_second_run_of_the_row_loop() {
        let slow_calls = std::cell::Cell::new(0);
        let slow = |_: &[Column], _: usize| -> Result<ArrayRef, String> {
            slow_calls.set(slow_calls.get() + 1);
            Err("the row loop ran".to_string())
        };
        let fast = |c: &[Column], n: usize| {
            unary::<i64, i64>(c, n, true, |x| {
                assert_ne!(x, 2, "two is not allowed");
                x
            })
        };
        let error = batch_of(&Int64Array::from(vec![1, 2, 3]), Some(&fast), &slow).unwrap_err();
        assert_eq!(slow_calls.get(), 0, "no fallback to the row loop");
        assert!(
            error.starts_with("panicked: assertion `left != right` failed: two is not allowed; left: 2; right: 2 (at "),
            "{error}"
        );
        assert!(error.ends_with(')') && !error.contains('\n'), "{error}");
        assert!(
            error.contains("udf-abi/src/export/scalar/batch.rs:"),
            "{error}"
        );

        // The sentinel under a NULL bit is never seen: no panic, NULL there.
        let out = batch_of(&with_nulls(&[Some(1), None, Some(3)]), Some(&fast), &slow);
        let out = out.unwrap();
        assert_eq!(ints(&out), [Some(1), None, Some(3)]);
        assert_eq!(slow_calls.get(), 0);
    }
}
