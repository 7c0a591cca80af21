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
    Date, RowEntrypoint, Timestamp, UdfAbiVersion, UdfBytes, UdfFunction, UdfManifest,
    UdfOwnedBytes, UdfScalar, UdfType, UdfValue, status,
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
            call_batch: std::ptr::null(),
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

macro_rules! scalar {
    ($rust:ty, $udf:ident, $field:ident) => {
        impl UdfArgType for $rust {
            const TYPE: UdfType = UdfType::$udf;
        }
        impl FromUdfValue<'_> for $rust {
            fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
                // SAFETY: the host writes the member of the declared type, which is this one.
                Ok(unsafe { not_null(v)?.$field })
            }
        }
        impl UdfReturnType for $rust {
            const TYPE: UdfType = UdfType::$udf;
            fn into_udf_value(self) -> Result<UdfValue, String> {
                Ok(value(UdfScalar { $field: self }))
            }
        }
    };
}
scalar!(i32, Int32, int32);
scalar!(i64, Int64, int64);
scalar!(u64, UInt64, uint64);
scalar!(f32, Float32, float32);
scalar!(f64, Float64, float64);

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
}

impl UdfArgType for Date {
    const TYPE: UdfType = UdfType::Date32;
}
impl FromUdfValue<'_> for Date {
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        // SAFETY: the declared type is Date32, whose member is `int32`.
        let days = unsafe { not_null(v)?.int32 };
        Ok(Date {
            days_since_epoch: days,
        })
    }
}
impl UdfReturnType for Date {
    const TYPE: UdfType = UdfType::Date32;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            int32: self.days_since_epoch,
        }))
    }
}

impl UdfArgType for Timestamp {
    const TYPE: UdfType = UdfType::TimestampMicros;
}
impl FromUdfValue<'_> for Timestamp {
    fn from_udf_value(v: &UdfValue) -> Result<Self, String> {
        // SAFETY: the declared type is TimestampMicros, whose member is `int64`.
        let micros = unsafe { not_null(v)?.int64 };
        Ok(Timestamp {
            micros_since_epoch: micros,
        })
    }
}
impl UdfReturnType for Timestamp {
    const TYPE: UdfType = UdfType::TimestampMicros;
    fn into_udf_value(self) -> Result<UdfValue, String> {
        Ok(value(UdfScalar {
            int64: self.micros_since_epoch,
        }))
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
}

/// Converts a function's return into the value for the host.
pub fn finish<R: IntoUdfResult>(result: R) -> Result<UdfValue, String> {
    result.into_udf_result()?.into_udf_value()
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
