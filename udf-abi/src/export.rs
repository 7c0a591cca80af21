//! Runtime support for the code `#[udf]` generates; not for direct use.
//!
//! This is the plugin side's one module with `unsafe` code: the two exported ABI v2 symbols, the
//! release function, and the row-call wrapper that turns raw arguments into safe values and
//! catches panics. Everything else a plugin author sees is safe Rust.
#![allow(unsafe_code)]
#![doc(hidden)]

use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

pub use linkme;

use crate::v2::{
    BatchEntrypoint, Date, FFI_ArrowArray, FFI_ArrowSchema, RowEntrypoint, Timestamp,
    UdfAbiVersion, UdfBytes, UdfFunction, UdfManifest, UdfOwnedBytes, UdfScalar, UdfType, UdfValue,
    status,
};

/// A function descriptor in the library's distributed slice.
#[repr(transparent)]
#[derive(Debug)]
pub struct ExportedFunction(pub UdfFunction);

// SAFETY: the descriptor only points at immutable statics (name, type arrays) and functions; it is
// never written after construction, so sharing it between threads is sound.
unsafe impl Sync for ExportedFunction {}

impl ExportedFunction {
    /// A descriptor over static data.
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        return_type: UdfType,
        return_nullable: bool,
        volatility: u32,
        call_row: RowEntrypoint,
        call_batch: BatchEntrypoint,
    ) -> ExportedFunction {
        ExportedFunction(UdfFunction {
            name: UdfBytes {
                ptr: name.as_ptr(),
                len: name.len(),
            },
            arg_types: arg_types.as_ptr(),
            arg_nullable: arg_nullable.as_ptr(),
            args_len: arg_types.len(),
            return_type: return_type.tag(),
            return_nullable: return_nullable as u8,
            volatility,
            call_row: Some(call_row),
            call_batch: Some(call_batch),
        })
    }
}

/// Every `#[udf]` function of the library.
#[linkme::distributed_slice]
pub static FUNCTIONS: [ExportedFunction];

struct Manifest(UdfManifest);
// SAFETY: built once from immutable statics and never written afterwards.
unsafe impl Sync for Manifest {}
// SAFETY: as above; the pointers refer to statics that live as long as the library.
unsafe impl Send for Manifest {}

/// The ABI v2 handshake.
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_abi_version() -> UdfAbiVersion {
    UdfAbiVersion::CURRENT
}

/// The ABI v2 manifest: every `#[udf]` function linked into this library.
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_manifest() -> *const UdfManifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    let manifest = MANIFEST.get_or_init(|| {
        Manifest(UdfManifest {
            size: std::mem::size_of::<UdfManifest>(),
            // `ExportedFunction` is `repr(transparent)` over `UdfFunction`.
            functions: FUNCTIONS.as_ptr().cast::<UdfFunction>(),
            functions_len: FUNCTIONS.len(),
            release_bytes: Some(release_bytes),
        })
    });
    &manifest.0
}

/// Gives bytes to the host: a `Vec`'s parts, released by [`release_bytes`].
pub fn owned_bytes(bytes: Vec<u8>) -> UdfOwnedBytes {
    let mut bytes = std::mem::ManuallyDrop::new(bytes);
    UdfOwnedBytes {
        ptr: bytes.as_mut_ptr(),
        len: bytes.len(),
        capacity: bytes.capacity(),
    }
}

/// Releases bytes made by [`owned_bytes`], when the host hands them back.
///
/// # Safety
///
/// `bytes` must come from [`owned_bytes`] in this library and be released once.
pub unsafe extern "C" fn release_bytes(bytes: UdfOwnedBytes) {
    if bytes.ptr.is_null() {
        return;
    }
    // SAFETY: the parts of a Vec<u8> made by `owned_bytes`, handed back exactly once.
    drop(unsafe { Vec::from_raw_parts(bytes.ptr, bytes.len, bytes.capacity) });
}

/// What a Rust argument type is in the ABI.
pub trait UdfArgType {
    /// The ABI type.
    const TYPE: UdfType;
    /// Whether the argument receives NULLs (`Option<T>`).
    const NULLABLE: bool = false;
}

/// Reads a Rust argument from a value of its declared type.
pub trait FromUdfValue<'a>: Sized + UdfArgType {
    /// Converts; an error message names what was wrong.
    fn from_udf_value(value: &'a UdfValue) -> Result<Self, String>;
}

/// What a Rust result type is in the ABI.
pub trait UdfReturnType {
    /// The ABI type.
    const TYPE: UdfType;
    /// Whether the function may return NULL (`Option<T>`).
    const NULLABLE: bool = false;
    /// Converts into a value handed to the host.
    fn into_udf_value(self) -> Result<UdfValue, String>;
    /// Appends to a batch result column of type [`Self::TYPE`].
    fn append_to(self, out: &mut batch::Output) -> Result<(), String>;
}

/// A function's return: a value, or `Result<value, E: Display>`.
pub trait IntoUdfResult {
    /// The value type.
    type Value: UdfReturnType;
    /// The value, or the error message.
    fn into_udf_result(self) -> Result<Self::Value, String>;
}

impl<T: UdfReturnType> IntoUdfResult for T {
    type Value = T;
    fn into_udf_result(self) -> Result<T, String> {
        Ok(self)
    }
}

impl<T: UdfReturnType, E: Display> IntoUdfResult for Result<T, E> {
    type Value = T;
    fn into_udf_result(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

fn value(v: UdfScalar) -> UdfValue {
    UdfValue {
        is_null: 0,
        value: v,
    }
}

fn not_null(v: &UdfValue) -> Result<&UdfScalar, String> {
    if v.is_null != 0 {
        Err("unexpected NULL for an argument that does not take NULLs".to_string())
    } else {
        Ok(&v.value)
    }
}

/// The trait impls of a fixed-width type: `$rust` travels as the union member `$field` and is
/// built in an `Output::$out` builder; `$from`/`$into` convert between `$rust` and the member's
/// type (the identity for the primitives, the field of `Date` and `Timestamp`).
macro_rules! scalar {
    ($rust:ty, $udf:ident, $out:ident, $field:ident) => {
        scalar!($rust, $udf, $out, $field, |v| v, |v| v);
    };
    ($rust:ty, $udf:ident, $out:ident, $field:ident, $from:expr, $into:expr) => {
        impl UdfArgType for $rust {
            const TYPE: UdfType = UdfType::$udf;
        }
        impl FromUdfValue<'_> for $rust {
            fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
                // SAFETY: the host writes the member of the declared type, which is this one.
                let raw = unsafe { not_null(v)?.$field };
                Ok($from(raw))
            }
        }
        impl UdfReturnType for $rust {
            const TYPE: UdfType = UdfType::$udf;
            fn into_udf_value(self) -> Result<UdfValue, String> {
                Ok(value(UdfScalar {
                    $field: $into(self),
                }))
            }
            fn append_to(self, out: &mut batch::Output) -> Result<(), String> {
                match out {
                    batch::Output::$out(b) => {
                        b.append_value($into(self));
                        Ok(())
                    }
                    _ => Err(batch::MISMATCH.to_string()),
                }
            }
        }
    };
}
scalar!(i32, Int32, Int32, int32);
scalar!(i64, Int64, Int64, int64);
scalar!(u64, UInt64, UInt64, uint64);
scalar!(f32, Float32, Float32, float32);
scalar!(f64, Float64, Float64, float64);
scalar!(
    Date,
    Date32,
    Date32,
    int32,
    |days_since_epoch| Date { days_since_epoch },
    |d: Date| d.days_since_epoch
);
scalar!(
    Timestamp,
    TimestampMicros,
    TimestampMicros,
    int64,
    |micros_since_epoch| Timestamp { micros_since_epoch },
    |t: Timestamp| t.micros_since_epoch
);

impl UdfArgType for bool {
    const TYPE: UdfType = UdfType::Bool;
}
impl FromUdfValue<'_> for bool {
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        // SAFETY: the declared type is Bool, so `boolean` is the member the host wrote.
        match unsafe { not_null(v)?.boolean } {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("invalid boolean byte {b}")),
        }
    }
}
impl UdfReturnType for bool {
    const TYPE: UdfType = UdfType::Bool;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            boolean: self as u8,
        }))
    }
    fn append_to(self, out: &mut batch::Output) -> Result<(), String> {
        match out {
            batch::Output::Bool(b) => {
                b.append_value(self);
                Ok(())
            }
            _ => Err(batch::MISMATCH.to_string()),
        }
    }
}

fn borrowed_bytes(v: &UdfValue) -> Result<&[u8], String> {
    // SAFETY: the declared type is Utf8 or Binary, whose member is `bytes`.
    let bytes = unsafe { not_null(v)?.bytes };
    if bytes.len == 0 {
        return Ok(&[]);
    }
    if bytes.ptr.is_null() {
        return Err("null byte pointer".to_string());
    }
    // SAFETY: the host passes `len` readable bytes that stay valid and unchanged for the call,
    // and the returned borrow is tied to the argument array of that call.
    Ok(unsafe { std::slice::from_raw_parts(bytes.ptr, bytes.len) })
}

impl UdfArgType for &str {
    const TYPE: UdfType = UdfType::Utf8;
}
impl<'a> FromUdfValue<'a> for &'a str {
    fn from_udf_value(v: &'a UdfValue) -> Result<Self, String> {
        std::str::from_utf8(borrowed_bytes(v)?).map_err(|e| format!("invalid UTF-8: {e}"))
    }
}
impl UdfArgType for String {
    const TYPE: UdfType = UdfType::Utf8;
}
impl FromUdfValue<'_> for String {
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        <&str>::from_udf_value(v).map(str::to_string)
    }
}
impl UdfReturnType for String {
    const TYPE: UdfType = UdfType::Utf8;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            owned: owned_bytes(self.into_bytes()),
        }))
    }
    fn append_to(self, out: &mut batch::Output) -> Result<(), String> {
        match out {
            batch::Output::Utf8(b) => {
                b.append_value(self);
                Ok(())
            }
            _ => Err(batch::MISMATCH.to_string()),
        }
    }
}
impl UdfArgType for &[u8] {
    const TYPE: UdfType = UdfType::Binary;
}
impl<'a> FromUdfValue<'a> for &'a [u8] {
    fn from_udf_value(v: &'a UdfValue) -> Result<Self, String> {
        borrowed_bytes(v)
    }
}
impl UdfArgType for Vec<u8> {
    const TYPE: UdfType = UdfType::Binary;
}
impl FromUdfValue<'_> for Vec<u8> {
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        borrowed_bytes(v).map(<[u8]>::to_vec)
    }
}
impl UdfReturnType for Vec<u8> {
    const TYPE: UdfType = UdfType::Binary;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            owned: owned_bytes(self),
        }))
    }
    fn append_to(self, out: &mut batch::Output) -> Result<(), String> {
        match out {
            batch::Output::Binary(b) => {
                b.append_value(self);
                Ok(())
            }
            _ => Err(batch::MISMATCH.to_string()),
        }
    }
}

impl<T: UdfArgType> UdfArgType for Option<T> {
    const TYPE: UdfType = T::TYPE;
    const NULLABLE: bool = true;
}
impl<'a, T: FromUdfValue<'a>> FromUdfValue<'a> for Option<T> {
    fn from_udf_value(v: &'a UdfValue) -> Result<Self, String> {
        if v.is_null != 0 {
            Ok(None)
        } else {
            T::from_udf_value(v).map(Some)
        }
    }
}
impl<T: UdfReturnType> UdfReturnType for Option<T> {
    const TYPE: UdfType = T::TYPE;
    const NULLABLE: bool = true;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        match self {
            None => Ok(UdfValue::NULL),
            Some(v) => v.into_udf_value(),
        }
    }
    fn append_to(self, out: &mut batch::Output) -> Result<(), String> {
        match self {
            None => {
                out.append_null();
                Ok(())
            }
            Some(v) => v.append_to(out),
        }
    }
}

/// Converts a function's return into the value for the host.
pub fn finish<R: IntoUdfResult>(result: R) -> Result<UdfValue, String> {
    result.into_udf_result()?.into_udf_value()
}

/// What an output-parameter function returns: nothing, or `Result<(), E>`.
pub trait IntoUnitResult {
    /// `Ok(())`, or the error message.
    fn into_unit_result(self) -> Result<(), String>;
}

impl IntoUnitResult for () {
    fn into_unit_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display> IntoUnitResult for Result<(), E> {
    fn into_unit_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// The result of an output-parameter function on the row path: `buffer`, unless it failed.
pub fn written<R: IntoUnitResult>(done: R, buffer: String) -> Result<String, String> {
    done.into_unit_result().map(|()| buffer)
}

/// Wraps an argument conversion error with the argument's position.
pub fn argument_error(index: usize, error: String) -> String {
    format!("argument {}: {error}", index + 1)
}

thread_local! {
    static PANIC_LOCATION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Replaces this library's panic hook (the plugin has its own copy of `std`, so the host's hook
/// is untouched) with one that only remembers where the panic happened: the panic becomes a SQL
/// error carrying message and location, instead of a backtrace on the host's stderr per row.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            PANIC_LOCATION.with(|p| *p.borrow_mut() = location);
        }));
    });
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    match PANIC_LOCATION.with(|p| p.borrow_mut().take()) {
        Some(location) => format!("{message} (at {location})"),
        None => message,
    }
}

/// The body of every generated row entrypoint: checks the argument count, runs `body` inside
/// `catch_unwind`, and writes the result or the error (a panic becomes an error carrying its
/// message).
///
/// # Safety
///
/// `args` must point at `args_len` values valid for the call (or be anything when `args_len` is
/// 0); `out` and `error` must be valid for writes. The host guarantees all three.
pub unsafe fn call_row(
    args: *const UdfValue,
    args_len: usize,
    expected: usize,
    out: *mut UdfValue,
    error: *mut UdfOwnedBytes,
    body: impl FnOnce(&[UdfValue]) -> Result<UdfValue, String>,
) -> i32 {
    if out.is_null() || error.is_null() {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        if args_len != expected {
            return Err(format!("expected {expected} arguments, got {args_len}"));
        }
        let args: &[UdfValue] = if args_len == 0 || args.is_null() {
            &[]
        } else {
            // SAFETY: the caller promises `args_len` valid values.
            unsafe { std::slice::from_raw_parts(args, args_len) }
        };
        if args.len() != expected {
            return Err("null argument array".to_string());
        }
        body(args)
    }));
    let message = match result {
        Ok(Ok(v)) => {
            // SAFETY: `out` is non-null and valid for writes (the caller's promise).
            unsafe { out.write(v) };
            return status::OK;
        }
        Ok(Err(message)) => message,
        Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
    };
    // SAFETY: `error` is non-null and valid for writes (the caller's promise).
    unsafe { error.write(owned_bytes(message.into_bytes())) };
    status::ERROR
}

pub mod batch {
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
    use arrow_array::{Array, PrimitiveArray, make_array};
    use arrow_buffer::NullBuffer;
    use arrow_schema::DataType;

    use super::*;

    pub(super) const MISMATCH: &str = "result type does not match the output column";

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
        fn new(t: UdfType, rows: usize, bytes: usize) -> Output {
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
        fn value_bytes(&self) -> Option<usize> {
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

        fn finish(self) -> ArrayRef {
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
    }
    impl Native for i32 {
        type Arrow = Int32Type;
    }
    impl Native for i64 {
        type Arrow = Int64Type;
    }
    impl Native for u64 {
        type Arrow = UInt64Type;
    }
    impl Native for f32 {
        type Arrow = Float32Type;
    }
    impl Native for f64 {
        type Arrow = Float64Type;
    }

    fn primitive<A: Native>(column: &Column) -> Result<&PrimitiveArray<A::Arrow>, String> {
        column
            .array
            .as_primitive_opt::<A::Arrow>()
            .ok_or_else(|| type_error(column, std::any::type_name::<A>()))
    }

    /// `f` over one primitive column with no row loop: the compiler can vectorise it. NULL slots
    /// are computed too and masked by the validity bitmap, so `f` must be total (a panic falls
    /// back to the row loop, which calls `f` on valid rows only).
    pub fn unary<A: Native, R: Native>(
        columns: &[Column],
        rows: usize,
        f: impl Fn(A) -> R,
    ) -> Result<ArrayRef, String> {
        let a = primitive::<A>(&columns[0])?;
        if columns[0].scalar {
            let v = if a.is_null(0) {
                None
            } else {
                Some(f(a.value(0)))
            };
            return Ok(Arc::new(PrimitiveArray::<R::Arrow>::from_iter(
                std::iter::repeat_n(v, rows),
            )));
        }
        Ok(Arc::new(a.unary::<_, R::Arrow>(f)))
    }

    /// A boolean-valued `f` over one primitive column with no row loop; see [`unary`].
    pub fn unary_bool<A: Native>(
        columns: &[Column],
        rows: usize,
        f: impl Fn(A) -> bool,
    ) -> Result<ArrayRef, String> {
        let a = primitive::<A>(&columns[0])?;
        if columns[0].scalar {
            let v = if a.is_null(0) {
                None
            } else {
                Some(f(a.value(0)))
            };
            return Ok(Arc::new(arrow_array::BooleanArray::from(vec![v; rows])));
        }
        Ok(Arc::new(arrow_array::BooleanArray::from_unary(a, f)))
    }

    /// `f` over two primitive columns (either may be a scalar) with no row loop; see [`unary`].
    pub fn binary<A: Native, B: Native, R: Native>(
        columns: &[Column],
        rows: usize,
        f: impl Fn(A, B) -> R,
    ) -> Result<ArrayRef, String> {
        let a = primitive::<A>(&columns[0])?;
        let b = primitive::<B>(&columns[1])?;
        match (columns[0].scalar, columns[1].scalar) {
            (false, false) => {
                let nulls = NullBuffer::union(a.nulls(), b.nulls());
                let values: Vec<R> = a
                    .values()
                    .iter()
                    .zip(b.values().iter())
                    .map(|(&x, &y)| f(x, y))
                    .collect();
                Ok(Arc::new(PrimitiveArray::<R::Arrow>::new(
                    values.into(),
                    nulls,
                )))
            }
            (false, true) => {
                if b.is_null(0) {
                    return Ok(Arc::new(PrimitiveArray::<R::Arrow>::new_null(rows)));
                }
                let y = b.value(0);
                Ok(Arc::new(a.unary::<_, R::Arrow>(|x| f(x, y))))
            }
            (true, false) => {
                if a.is_null(0) {
                    return Ok(Arc::new(PrimitiveArray::<R::Arrow>::new_null(rows)));
                }
                let x = a.value(0);
                Ok(Arc::new(b.unary::<_, R::Arrow>(|y| f(x, y))))
            }
            (true, true) => {
                let v = (!a.is_null(0) && !b.is_null(0)).then(|| f(a.value(0), b.value(0)));
                Ok(Arc::new(PrimitiveArray::<R::Arrow>::from_iter(
                    std::iter::repeat_n(v, rows),
                )))
            }
        }
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

    /// The body of every generated batch entrypoint: imports the arguments, runs `fast` (a
    /// vectorised kernel, if the function has one) or else `slow` (the row loop) inside
    /// `catch_unwind`, and exports the result or writes the error.
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
        expected: usize,
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
            if args_len != expected {
                return Err(format!("expected {expected} arguments, got {args_len}"));
            }
            if args_len > 0 && (args.is_null() || schemas.is_null() || is_scalar.is_null()) {
                return Err("null argument arrays".to_string());
            }
            let mut columns = Vec::with_capacity(args_len);
            for i in 0..args_len {
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
                let data = unsafe { arrow_array::ffi::from_ffi(array, schema) }
                    .map_err(|e| format!("argument {}: {e}", i + 1))?;
                let array = make_array(data);
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
            let fast_result = fast.map(|fast| {
                catch_unwind(AssertUnwindSafe(|| fast(&columns, num_rows)))
                    .unwrap_or_else(|_| Err(String::new()))
            });
            let array = match fast_result {
                Some(Ok(array)) => array,
                // No kernel, or it panicked on a NULL slot's placeholder value: the row loop.
                _ => slow(&columns, num_rows)?,
            };
            let schema = FFI_ArrowSchema::try_from(array.data_type())
                .map_err(|e| format!("cannot export the result's type: {e}"))?;
            Ok((array, schema))
        }));
        let message = match result {
            Ok(Ok((array, schema))) => {
                // SAFETY: `out` and `out_schema` are non-null and valid for writes (the caller's
                // promise); the host takes both over and releases them.
                unsafe {
                    out.write(FFI_ArrowArray::new(&array.to_data()));
                    out_schema.write(schema);
                }
                return status::OK;
            }
            Ok(Err(message)) => message,
            Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
        };
        // SAFETY: `error` is non-null and valid for writes (the caller's promise).
        unsafe { error.write(owned_bytes(message.into_bytes())) };
        status::ERROR
    }

    #[cfg(test)]
    mod tests {
        use std::sync::atomic::Ordering::Relaxed;

        use super::*;

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
    }
}
