//! Scalar functions: the Rust types a `#[udf]` function takes and returns and how they map to
//! ABI values ([`UdfArgType`], [`FromUdfValue`], [`UdfReturnType`]), the row entrypoint's wrapper
//! ([`call_row`]), the batch entrypoint's runtime ([`batch`], and [`direct`] for primitive
//! columns), Arrow-typed functions ([`arrow`],
//! [`values`]).

use super::*;

pub mod arrow;
pub mod batch;
pub mod direct;
pub mod values;

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

#[inline]
fn value(v: UdfScalar) -> UdfValue {
    UdfValue {
        is_null: 0,
        value: v,
    }
}

#[inline]
fn not_null(v: &UdfValue) -> Result<&UdfScalar, String> {
    if v.is_null != 0 {
        Err(unexpected_null())
    } else {
        Ok(&v.value)
    }
}

#[cold]
#[inline(never)]
fn unexpected_null() -> String {
    "unexpected NULL for an argument that does not take NULLs".to_string()
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
            #[inline]
            fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
                // SAFETY: the host writes the member of the declared type, which is this one.
                let raw = unsafe { not_null(v)?.$field };
                Ok($from(raw))
            }
        }
        impl UdfReturnType for $rust {
            const TYPE: UdfType = UdfType::$udf;
            #[inline]
            fn into_udf_value(self) -> Result<UdfValue, String> {
                Ok(value(UdfScalar {
                    $field: $into(self),
                }))
            }
            #[inline]
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
    #[inline]
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
    #[inline]
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            boolean: self as u8,
        }))
    }
    #[inline]
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

#[inline]
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
    #[inline]
    fn from_udf_value(v: &'a UdfValue) -> Result<Self, String> {
        std::str::from_utf8(borrowed_bytes(v)?).map_err(|e| format!("invalid UTF-8: {e}"))
    }
}
impl UdfArgType for String {
    const TYPE: UdfType = UdfType::Utf8;
}
impl FromUdfValue<'_> for String {
    #[inline]
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        <&str>::from_udf_value(v).map(str::to_string)
    }
}
impl UdfReturnType for String {
    const TYPE: UdfType = UdfType::Utf8;
    #[inline]
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
    #[inline]
    fn from_udf_value(v: &'a UdfValue) -> Result<Self, String> {
        borrowed_bytes(v)
    }
}
impl UdfArgType for Vec<u8> {
    const TYPE: UdfType = UdfType::Binary;
}
impl FromUdfValue<'_> for Vec<u8> {
    #[inline]
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        borrowed_bytes(v).map(<[u8]>::to_vec)
    }
}
impl UdfReturnType for Vec<u8> {
    const TYPE: UdfType = UdfType::Binary;
    #[inline]
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

/// The body of every generated row entrypoint: checks the argument count, runs `body` inside
/// `catch_unwind`, and writes the result or the error (a panic becomes an error carrying its
/// message).
///
/// # Safety
///
/// `args` must point at `args_len` values valid for the call (or be anything when `args_len` is
/// 0); `out` and `error` must be valid for writes. The host guarantees all three.
#[inline]
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
        let args: &[UdfValue] = if args_len == 0 {
            &[]
        } else if args.is_null() {
            return Err("null argument array".to_string());
        } else {
            // SAFETY: the caller promises `args_len` valid values.
            unsafe { std::slice::from_raw_parts(args, args_len) }
        };
        body(args)
    }));
    let message = match result {
        Ok(Ok(v)) => {
            // SAFETY: `out` is non-null and valid for writes (the caller's promise).
            unsafe { out.write(v) };
            return status::OK;
        }
        Ok(Err(message)) => message,
        Err(panic) => panicked(panic),
    };
    // SAFETY: `error` is non-null and valid for writes (the caller's promise).
    unsafe { write_error(error, message) }
}

/// Writes what a batch entrypoint's body produced: the result array and schema (handed to the
/// host, status OK), or the error — the body's message, or a panic's — (status ERROR).
///
/// # Safety
///
/// `out`, `out_schema` and `error` must be non-null and valid for writes.
pub(in crate::export) unsafe fn write_batch_outcome(
    result: std::thread::Result<Result<(FFI_ArrowArray, FFI_ArrowSchema), String>>,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
) -> i32 {
    let message = match result {
        Ok(Ok((array, schema))) => {
            // SAFETY: the caller's promise; the host takes both over and releases them.
            unsafe {
                out.write(array);
                out_schema.write(schema);
            }
            return status::OK;
        }
        Ok(Err(message)) => message,
        Err(panic) => panicked(panic),
    };
    // SAFETY: the caller's promise.
    unsafe { write_error(error, message) }
}
