//! The runtime of `#[udf(vectorized)]` functions (ABI 2.2): functions over whole arrow-rs arrays,
//! of any Arrow type a type string declares.
//!
//! The generated batch entrypoint imports each argument as the type its type string declares,
//! repeats a constant (one-row) argument to the batch's rows, downcasts each to the parameter's
//! array type, calls the function, checks the result's type and length and exports it. Only the
//! Arrow C Data Interface crosses: the plugin's arrow-rs (this crate's) is independent of the
//! host's.

use std::ffi::CStr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

pub use arrow_array::ArrayRef;
use arrow_array::ffi::from_ffi_and_data_type;
use arrow_array::types::{
    DurationMicrosecondType, DurationMillisecondType, DurationNanosecondType, DurationSecondType,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType,
};
use arrow_array::{
    Array, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array,
    Int8Array, Int16Array, Int32Array, Int64Array, IntervalMonthDayNanoArray, LargeBinaryArray,
    LargeListArray, LargeStringArray, ListArray, PrimitiveArray, StringArray, StringViewArray,
    StructArray, UInt8Array, UInt16Array, UInt32Array, UInt64Array, make_array,
};
use arrow_data::transform::MutableArrayData;
use arrow_schema::DataType;

use super::install_quiet_panic_hook;
use crate::v2::{FFI_ArrowArray, FFI_ArrowSchema, UdfOwnedBytes, status};

/// An arrow-rs array type a vectorised function takes or returns, with the type string of its
/// Arrow type when that type has no parameters (`None` for decimals, lists, structs, timestamps
/// with a zone and `ArrayRef`: those need `#[arrow("...")]` on the parameter or `returns = "..."`).
pub trait ArrowColumn: Sized + 'static {
    /// The type string, NUL-terminated, when the array type alone determines it.
    const FORMAT: Option<&'static CStr>;

    /// The argument as this array type, if it is one.
    fn downcast(array: &ArrayRef) -> Option<&Self>;

    /// The result as an array.
    fn into_array(self) -> ArrayRef;
}

macro_rules! columns {
    ($($array:ty => $format:expr),* $(,)?) => {$(
        impl ArrowColumn for $array {
            const FORMAT: Option<&'static CStr> = $format;

            fn downcast(array: &ArrayRef) -> Option<&Self> {
                array.as_any().downcast_ref::<Self>()
            }

            fn into_array(self) -> ArrayRef {
                Arc::new(self)
            }
        }
    )*};
}

columns! {
    BooleanArray => Some(c"b"),
    Int8Array => Some(c"c"),
    UInt8Array => Some(c"C"),
    Int16Array => Some(c"s"),
    UInt16Array => Some(c"S"),
    Int32Array => Some(c"i"),
    UInt32Array => Some(c"I"),
    Int64Array => Some(c"l"),
    UInt64Array => Some(c"L"),
    Float32Array => Some(c"f"),
    Float64Array => Some(c"g"),
    StringArray => Some(c"u"),
    LargeStringArray => Some(c"U"),
    StringViewArray => Some(c"vu"),
    BinaryArray => Some(c"z"),
    LargeBinaryArray => Some(c"Z"),
    Date32Array => Some(c"tdD"),
    IntervalMonthDayNanoArray => Some(c"tin"),
    PrimitiveArray<DurationSecondType> => Some(c"tDs"),
    PrimitiveArray<DurationMillisecondType> => Some(c"tDm"),
    PrimitiveArray<DurationMicrosecondType> => Some(c"tDu"),
    PrimitiveArray<DurationNanosecondType> => Some(c"tDn"),
    PrimitiveArray<TimestampSecondType> => None,
    PrimitiveArray<TimestampMillisecondType> => None,
    PrimitiveArray<TimestampMicrosecondType> => None,
    PrimitiveArray<TimestampNanosecondType> => None,
    Decimal128Array => None,
    ListArray => None,
    LargeListArray => None,
    StructArray => None,
}

impl ArrowColumn for ArrayRef {
    const FORMAT: Option<&'static CStr> = None;

    fn downcast(array: &ArrayRef) -> Option<&Self> {
        Some(array)
    }

    fn into_array(self) -> ArrayRef {
        self
    }
}

/// A vectorised function's result: an array, or `Result<array, E>` with a displayable error.
pub trait IntoArrayResult {
    /// The array type.
    type Array: ArrowColumn;
    /// The array, or the error's message.
    fn into_array_result(self) -> Result<ArrayRef, String>;
}

impl<A: ArrowColumn> IntoArrayResult for A {
    type Array = A;
    fn into_array_result(self) -> Result<ArrayRef, String> {
        Ok(self.into_array())
    }
}

impl<A: ArrowColumn, E: std::fmt::Display> IntoArrayResult for Result<A, E> {
    type Array = A;
    fn into_array_result(self) -> Result<ArrayRef, String> {
        self.map(ArrowColumn::into_array).map_err(|e| e.to_string())
    }
}

/// Argument `index` as the parameter's array type, or an error naming it.
pub fn argument<T: ArrowColumn>(columns: &[ArrayRef], index: usize) -> Result<&T, String> {
    T::downcast(&columns[index]).ok_or_else(|| {
        format!(
            "argument {}: the parameter's array type ({}) does not hold its declared type {}",
            index + 1,
            std::any::type_name::<T>(),
            columns[index].data_type()
        )
    })
}

/// The declared type of a type string (parsed per call: a plugin keeps no allocation in a static
/// that would leak when the host unloads it).
fn declared(format: &CStr) -> Result<DataType, String> {
    let text = format
        .to_str()
        .map_err(|_| "a type string is not UTF-8".to_string())?;
    crate::type_string::parse(text).map_err(|e| format!("type string `{text}`: {e}"))
}

/// A one-row array repeated to `rows` rows.
fn repeat(array: &ArrayRef, rows: usize) -> Result<ArrayRef, String> {
    let data = array.to_data();
    let mut out = MutableArrayData::new(vec![&data], false, rows);
    for _ in 0..rows {
        out.try_extend(0, 0, 1).map_err(|e| e.to_string())?;
    }
    Ok(make_array(out.freeze()))
}

/// A function's declared argument types and result type.
pub type DeclaredTypes = Result<(Vec<DataType>, DataType), String>;

/// Computes a function's result column from its argument columns and the number of rows.
pub type Kernel<'a> = dyn Fn(&[ArrayRef], usize) -> Result<ArrayRef, String> + 'a;

/// The declared types of a vectorised function, from its type strings.
pub fn declared_types(arg_formats: &[&CStr], return_format: &CStr) -> DeclaredTypes {
    let args = arg_formats
        .iter()
        .map(|f| declared(f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((args, declared(return_format)?))
}

/// Imports the argument arrays of a function with Arrow types (of the declared `arg_types`),
/// constants repeated to `num_rows` rows.
///
/// # Safety
///
/// `args` and `is_scalar` must hold `args_len` arrays and flags as the host passes them to a
/// [`BatchEntrypoint`](crate::v2::BatchEntrypoint), each array of its declared type; the arrays
/// are moved out.
pub(crate) unsafe fn import_columns(
    args: *mut FFI_ArrowArray,
    is_scalar: *const u8,
    args_len: usize,
    num_rows: usize,
    arg_types: Vec<DataType>,
) -> Result<Vec<ArrayRef>, String> {
    if args_len != arg_types.len() {
        return Err(format!(
            "expected {} arguments, got {args_len}",
            arg_types.len()
        ));
    }
    if args_len > 0 && (args.is_null() || is_scalar.is_null()) {
        return Err("null argument arrays".to_string());
    }
    let mut columns = Vec::with_capacity(args_len);
    for (i, t) in arg_types.into_iter().enumerate() {
        // SAFETY: `i < args_len`, and the host passes that many arrays and flags; `from_raw`
        // moves the array out (the C Data Interface's move semantics the ABI prescribes).
        let (array, scalar) = unsafe {
            (
                FFI_ArrowArray::from_raw(args.add(i)),
                *is_scalar.add(i) != 0,
            )
        };
        // SAFETY: ABI 2.2 says an argument of an Arrow type is an array of exactly that type.
        let data = unsafe { from_ffi_and_data_type(array, t) }
            .map_err(|e| format!("argument {}: {e}", i + 1))?;
        let array = make_array(data);
        let needed = if scalar { 1 } else { num_rows };
        if array.len() < needed {
            return Err(format!(
                "argument {} has {} rows, {needed} expected",
                i + 1,
                array.len()
            ));
        }
        columns.push(if scalar && num_rows != 1 {
            repeat(&array, num_rows).map_err(|e| format!("argument {}: {e}", i + 1))?
        } else {
            array.slice(0, num_rows)
        });
    }
    Ok(columns)
}

/// Whether a vectorised function's result is of its declared type `t` and has `num_rows` rows.
pub(crate) fn check_result(array: &ArrayRef, t: &DataType, num_rows: usize) -> Result<(), String> {
    if !array.data_type().equals_datatype(t) {
        return Err(format!(
            "the function returned an array of type {}, it declares {t}",
            array.data_type()
        ));
    }
    if array.len() != num_rows {
        return Err(format!(
            "the function returned {} rows for a batch of {num_rows}",
            array.len()
        ));
    }
    Ok(())
}

/// The body of every generated batch entrypoint of a function with Arrow types: `types` are its
/// declared argument and result types (`declared_types`, or the Rust types' `data_type()`s), and
/// `kernel` computes the result column from the argument columns and the number of rows.
///
/// # Safety
///
/// The pointers must satisfy [`BatchEntrypoint`](crate::v2::BatchEntrypoint)'s contract, and
/// `types` must be the types the function declares in the manifest.
#[allow(clippy::too_many_arguments)]
pub unsafe fn call_vectorized(
    args: *mut FFI_ArrowArray,
    is_scalar: *const u8,
    args_len: usize,
    num_rows: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
    types: &dyn Fn() -> DeclaredTypes,
    kernel: &Kernel<'_>,
) -> i32 {
    if out.is_null() || out_schema.is_null() || error.is_null() {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let (arg_types, return_type) = types()?;
        // SAFETY: the caller's promise, passed on.
        let columns = unsafe { import_columns(args, is_scalar, args_len, num_rows, arg_types) }?;
        let array = kernel(&columns, num_rows)?;
        let t = return_type;
        check_result(&array, &t, num_rows)?;
        let schema = FFI_ArrowSchema::try_from(&t).map_err(|e| e.to_string())?;
        Ok((FFI_ArrowArray::new(&array.to_data()), schema))
    }));
    // SAFETY: the caller's promise: `out`, `out_schema` and `error` are non-null and valid for
    // writes.
    unsafe { super::write_batch_outcome(result, out, out_schema, error) }
}

/// A type string's pointer in a static array of the manifest.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct TypeString(pub *const std::ffi::c_char);

// SAFETY: points at a `'static` C string literal, never written.
unsafe impl Sync for TypeString {}

impl TypeString {
    /// The pointer of `format`.
    pub const fn new(format: &'static CStr) -> TypeString {
        TypeString(format.as_ptr())
    }
}

/// `format`, or a compile-time error `message` when there is none (in the generated constants:
/// a parameter or result whose array type does not determine its Arrow type).
pub const fn required(format: Option<&'static CStr>, message: &'static str) -> &'static CStr {
    match format {
        Some(f) => f,
        None => panic!("{}", message),
    }
}

impl super::ExportedFunction {
    /// A vectorised function (ABI 2.2): every argument and the result declared by type strings
    /// (in its [`ExportedArrowTypes`](super::ExportedArrowTypes) entry), every argument taking
    /// NULLs and the result possibly NULL (the function sees whole arrays with their NULLs),
    /// evaluated through `call_batch` only.
    pub const fn vectorized(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        volatility: u32,
        call_batch: crate::v2::BatchEntrypoint,
    ) -> super::ExportedFunction {
        super::ExportedFunction::descriptor(
            name,
            arg_types,
            arg_nullable,
            crate::v2::TYPE_ARROW,
            true,
            volatility,
            None,
            Some(call_batch),
        )
    }
}

impl super::ExportedArrowTypes {
    /// The type strings of the function called `name`.
    pub const fn new(
        name: &'static str,
        arg_formats: &'static [TypeString],
        return_format: &'static TypeString,
    ) -> super::ExportedArrowTypes {
        super::ExportedArrowTypes {
            name,
            types: crate::v2::UdfArrowTypes {
                // `TypeString` is `repr(transparent)` over the pointer.
                arg_formats: arg_formats.as_ptr().cast(),
                return_format: return_format.0,
            },
            compute: None,
        }
    }

    /// The types of the function called `name`, computed from its Rust types when the manifest
    /// is built (row-by-row `#[udf]` functions with Arrow types).
    pub const fn computed(
        name: &'static str,
        compute: fn() -> DeclaredTypes,
    ) -> super::ExportedArrowTypes {
        super::ExportedArrowTypes {
            name,
            types: crate::v2::UdfArrowTypes {
                arg_formats: std::ptr::null(),
                return_format: std::ptr::null(),
            },
            compute: Some(compute),
        }
    }
}

impl super::ExportedFunction {
    /// A row-by-row `#[udf]` function with Arrow types (ABI 2.2): declared by type strings
    /// computed from its Rust types, evaluated through `call_batch` only (its row loop runs in
    /// the plugin).
    pub const fn arrow_rows(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        return_nullable: bool,
        volatility: u32,
        call_batch: crate::v2::BatchEntrypoint,
    ) -> super::ExportedFunction {
        let mut f = Self::vectorized(name, arg_types, arg_nullable, volatility, call_batch);
        f.0.return_nullable = return_nullable as u8;
        f
    }
}
