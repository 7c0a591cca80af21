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
    UdfAbiVersion, UdfArrowTypes, UdfBytes, UdfFunction, UdfManifest, UdfOwnedBytes, UdfScalar,
    UdfType, UdfValue, status,
};

pub mod arrow;
pub mod values;

/// A function descriptor in the library's distributed slice.
#[repr(transparent)]
#[derive(Debug)]
pub struct ExportedFunction(pub UdfFunction);

// SAFETY: the descriptor only points at immutable statics (name, type arrays) and functions; it is
// never written after construction, so sharing it between threads is sound.
unsafe impl Sync for ExportedFunction {}

/// The Arrow types of one function (ABI 2.2), by the function's name, in the library's second
/// distributed slice: the manifest's `arrow_types` array is laid out from it, parallel to
/// [`FUNCTIONS`], when the library has any.
#[derive(Debug)]
pub struct ExportedArrowTypes {
    /// The function's name, as in its [`ExportedFunction`].
    pub name: &'static str,
    /// Its type strings, when they are constants (`#[udf(vectorized)]`).
    pub types: UdfArrowTypes,
    /// Its types, when the Rust types say them (row-by-row `#[udf]` with Arrow types): written
    /// as type strings into static storage when the manifest is built.
    pub compute: Option<fn() -> arrow::DeclaredTypes>,
}

// SAFETY: points at immutable statics (the type strings and their pointer arrays) only.
unsafe impl Sync for ExportedArrowTypes {}

/// No Arrow types: every type is a tag.
const NO_ARROW_TYPES: UdfArrowTypes = UdfArrowTypes {
    arg_formats: std::ptr::null(),
    return_format: std::ptr::null(),
};

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

/// Every `#[udf(vectorized)]` function's Arrow types (a subset of [`FUNCTIONS`], by name).
#[linkme::distributed_slice]
pub static ARROW_TYPES: [ExportedArrowTypes];

struct Manifest(UdfManifest);
// SAFETY: built once from immutable statics and never written afterwards.
unsafe impl Sync for Manifest {}
// SAFETY: as above; the pointers refer to statics that live as long as the library.
unsafe impl Send for Manifest {}

/// The manifest's `arrow_types` array: static storage (no heap allocation, which a library's
/// statics would leak every time the host unloads it), one entry per function, written once.
struct ArrowTypesStorage(std::cell::UnsafeCell<[UdfArrowTypes; crate::MAX_FUNCTIONS]>);

// SAFETY: written only inside `udfsql_manifest`'s `OnceLock` initialisation (once, before any
// reader can see the manifest that points at it) and only read afterwards.
unsafe impl Sync for ArrowTypesStorage {}

static ARROW_TYPES_STORAGE: ArrowTypesStorage = ArrowTypesStorage(std::cell::UnsafeCell::new(
    [NO_ARROW_TYPES; crate::MAX_FUNCTIONS],
));

/// Bytes for the type strings computed from Rust types, and the pointer arrays of their
/// arguments: static storage, written once with the manifest (as `ARROW_TYPES_STORAGE`).
pub const COMPUTED_BYTES: usize = 1 << 16;
/// The most argument type-string pointers the computed storage holds, for all functions.
pub const COMPUTED_POINTERS: usize = 1 << 13;
/// Bytes for the messages of functions whose types could not be declared (type strings that
/// start with `!`, which the host reports as the reason it refuses the function).
const MESSAGE_BYTES: usize = 1 << 14;
/// The longest message, in bytes.
const MAX_MESSAGE_LEN: usize = 1024;

struct ComputedStorage {
    bytes: std::cell::UnsafeCell<[u8; COMPUTED_BYTES]>,
    pointers: std::cell::UnsafeCell<[*const std::ffi::c_char; COMPUTED_POINTERS]>,
    messages: std::cell::UnsafeCell<[u8; MESSAGE_BYTES]>,
}

// SAFETY: as for `ArrowTypesStorage`: written once inside the manifest's `OnceLock`
// initialisation, read only afterwards.
unsafe impl Sync for ComputedStorage {}

static COMPUTED_STORAGE: ComputedStorage = ComputedStorage {
    bytes: std::cell::UnsafeCell::new([0; COMPUTED_BYTES]),
    pointers: std::cell::UnsafeCell::new([std::ptr::null(); COMPUTED_POINTERS]),
    messages: std::cell::UnsafeCell::new([0; MESSAGE_BYTES]),
};

/// The message when the message storage itself is full.
const MESSAGES_FULL: &std::ffi::CStr = c"!udf-abi could not declare this function's Arrow types, \
    and its static storage for the reasons (16384 bytes) is full too";

/// How much of the computed storage the functions before the current one took.
#[derive(Debug, Default)]
struct Used {
    bytes: usize,
    pointers: usize,
    messages: usize,
}

/// Writes the type strings of `compute`'s types into the computed storage after what `used`
/// says is taken; the error says why they cannot be declared (a type with no type string, a
/// type the Rust types cannot describe, the storage full).
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn computed_types(
    compute: fn() -> arrow::DeclaredTypes,
    used: &mut Used,
) -> Result<UdfArrowTypes, String> {
    // `compute` is the generated code over the Rust types' `data_type()`s; a panic there must
    // not unwind out of `udfsql_manifest`.
    let (args, ret) = catch_unwind(compute)
        .unwrap_or_else(|_| Err("describing the Rust types panicked".to_string()))?;
    let mut strings = Vec::with_capacity(args.len() + 1);
    for (i, t) in args.iter().chain([&ret]).enumerate() {
        let what = if i < args.len() {
            format!("argument {}", i + 1)
        } else {
            "the result".to_string()
        };
        let s = crate::type_string::type_string(t)
            .ok_or_else(|| format!("{what} has the Arrow type {t}, which has no type string"))?;
        if s.as_bytes().contains(&0) {
            return Err(format!("the type string of {what} holds a NUL byte"));
        }
        strings.push(s);
    }
    let needed: usize = strings.iter().map(|s| s.len() + 1).sum();
    if used.bytes + needed > COMPUTED_BYTES || used.pointers + args.len() > COMPUTED_POINTERS {
        return Err(format!(
            "udf-abi's static storage for the Arrow type strings of row-by-row #[udf] functions \
             is full: it holds {COMPUTED_BYTES} bytes of type strings and {COMPUTED_POINTERS} \
             argument pointers for the whole library; the functions before this one take {} \
             bytes and {} pointers, and this one needs {needed} bytes and {} pointers (split the \
             library, or use #[udf(vectorized)] with constant type strings)",
            used.bytes,
            used.pointers,
            args.len()
        ));
    }
    // SAFETY: the caller's promise: nothing else reads or writes the storage now.
    let (bytes, pointers) = unsafe {
        (
            &mut *COMPUTED_STORAGE.bytes.get(),
            &mut *COMPUTED_STORAGE.pointers.get(),
        )
    };
    let mut pointer_of = Vec::with_capacity(strings.len());
    for s in &strings {
        let start = used.bytes;
        bytes[start..start + s.len()].copy_from_slice(s.as_bytes());
        bytes[start + s.len()] = 0;
        used.bytes += s.len() + 1;
        pointer_of.push(bytes[start..].as_ptr().cast::<std::ffi::c_char>());
    }
    let return_format = pointer_of.pop().ok_or("no result type")?;
    let first = used.pointers;
    pointers[first..first + pointer_of.len()].copy_from_slice(&pointer_of);
    used.pointers += pointer_of.len();
    Ok(UdfArrowTypes {
        arg_formats: pointers[first..].as_ptr(),
        return_format,
    })
}

/// The Arrow types of a function whose types could not be declared: its result's type string
/// is `!` and `message` (the host refuses the function with it), its arguments have none.
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn undeclared(message: &str, used: &mut Used) -> UdfArrowTypes {
    let mut end = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let text = message[..end].replace('\0', " ");
    let needed = text.len() + 2;
    let return_format = if used.messages + needed > MESSAGE_BYTES {
        MESSAGES_FULL.as_ptr()
    } else {
        // SAFETY: the caller's promise: nothing else reads or writes the storage now.
        let messages = unsafe { &mut *COMPUTED_STORAGE.messages.get() };
        let start = used.messages;
        messages[start] = b'!';
        messages[start + 1..start + 1 + text.len()].copy_from_slice(text.as_bytes());
        messages[start + 1 + text.len()] = 0;
        used.messages += needed;
        messages[start..].as_ptr().cast::<std::ffi::c_char>()
    };
    UdfArrowTypes {
        arg_formats: std::ptr::null(),
        return_format,
    }
}

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
        let arrow_types = if ARROW_TYPES.is_empty() {
            std::ptr::null()
        } else {
            // SAFETY: the one write, inside the `OnceLock` initialisation: nothing reads the
            // storage before the manifest that points at it is published.
            let storage = unsafe { &mut *ARROW_TYPES_STORAGE.0.get() };
            let mut used = Used::default();
            for (slot, function) in storage.iter_mut().zip(FUNCTIONS.iter()) {
                let name = name_bytes(function.0.name);
                let Some(arrow) = ARROW_TYPES.iter().find(|a| a.name.as_bytes() == name) else {
                    continue;
                };
                let Some(compute) = arrow.compute else {
                    *slot = arrow.types;
                    continue;
                };
                // SAFETY: inside the `OnceLock` initialisation, the storage's one writer.
                *slot = match unsafe { computed_types(compute, &mut used) } {
                    Ok(types) => types,
                    // SAFETY: as above.
                    Err(message) => unsafe { undeclared(&message, &mut used) },
                };
            }
            ARROW_TYPES_STORAGE
                .0
                .get()
                .cast::<UdfArrowTypes>()
                .cast_const()
        };
        Manifest(UdfManifest {
            size: std::mem::size_of::<UdfManifest>(),
            // `ExportedFunction` is `repr(transparent)` over `UdfFunction`.
            functions: FUNCTIONS.as_ptr().cast::<UdfFunction>(),
            functions_len: FUNCTIONS.len(),
            release_bytes: Some(release_bytes),
            arrow_types,
        })
    });
    &manifest.0
}

/// The bytes of a function name of this library (a `&'static str` taken apart).
fn name_bytes(name: UdfBytes) -> &'static [u8] {
    // SAFETY: every `ExportedFunction`'s name is a `&'static str` of this library, taken apart
    // by `ExportedFunction::new` / `vectorized` into this pointer and length.
    unsafe { std::slice::from_raw_parts(name.ptr, name.len) }
}

/// Gives bytes to the host: a `Vec`'s parts, released by [`release_bytes`].
#[inline]
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

/// How many bytes of a panic's file name the error keeps (its end, which names the file).
const LOCATION_FILE_BYTES: usize = 192;

/// Where a panic happened, copied out of the panic hook's `Location` (whose file name is only
/// borrowed for the hook's call) into fixed storage: `Copy`, no heap, nothing to drop.
#[derive(Clone, Copy)]
struct PanicLocation {
    file: [u8; LOCATION_FILE_BYTES],
    file_len: usize,
    truncated: bool,
    line: u32,
    column: u32,
}

impl PanicLocation {
    fn new(file: &str, line: u32, column: u32) -> PanicLocation {
        // Keep the end of a long path, cut at a character boundary.
        let mut start = file.len().saturating_sub(LOCATION_FILE_BYTES);
        while !file.is_char_boundary(start) {
            start += 1;
        }
        let tail = &file.as_bytes()[start..];
        let mut bytes = [0; LOCATION_FILE_BYTES];
        bytes[..tail.len()].copy_from_slice(tail);
        PanicLocation {
            file: bytes,
            file_len: tail.len(),
            truncated: start > 0,
            line,
            column,
        }
    }
}

impl Display for PanicLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Whole characters of a `&str` were copied, so this is valid UTF-8.
        let file = std::str::from_utf8(&self.file[..self.file_len]).unwrap_or("?");
        let dots = if self.truncated { "..." } else { "" };
        // A file name is written as one line whatever it contains.
        write!(
            f,
            "{dots}{}:{}:{}",
            file.escape_debug(),
            self.line,
            self.column
        )
    }
}

thread_local! {
    /// Where this thread's last panic happened: set by the panic hook, taken by the
    /// `catch_unwind` that caught the panic. A `Copy` type with a `const` initialiser, so the
    /// thread-local needs no destructor and none is registered with the C library: a TLS
    /// destructor in the plugin's code would make glibc keep the library mapped after `dlclose`
    /// until every thread that ever panicked in it has exited.
    static PANIC_LOCATION: std::cell::Cell<Option<PanicLocation>> =
        const { std::cell::Cell::new(None) };
}

/// Whether [`install_quiet_panic_hook`] has run (completed) in this library.
static QUIET_PANIC_HOOK: std::sync::Once = std::sync::Once::new();

/// Replaces this library's panic hook (the plugin has its own copy of `std`, so the host's hook
/// is untouched) with one that only remembers where the panic happened: the panic becomes a SQL
/// error carrying message and location, instead of a backtrace on the host's stderr per row.
/// (Unlike std's default hook, it does not look up the thread's name, which would create a
/// `std::thread::current()` handle in a thread-local with a destructor.)
///
/// Runs on every row call: inlined into the entrypoint, its fast path is one atomic load.
#[inline]
fn install_quiet_panic_hook() {
    if !QUIET_PANIC_HOOK.is_completed() {
        install_quiet_panic_hook_once();
    }
}

#[cold]
#[inline(never)]
fn install_quiet_panic_hook_once() {
    QUIET_PANIC_HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| PanicLocation::new(l.file(), l.line(), l.column()));
            PANIC_LOCATION.with(|p| p.set(location));
        }));
    });
}

/// The error message of a caught panic: its message on one line, then ` (at file:line:col)`.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    let mut message = one_line(message);
    if message.is_empty() {
        message = "a panic without a message".to_string();
    }
    match PANIC_LOCATION.with(std::cell::Cell::take) {
        Some(location) => format!("{message} (at {location})"),
        None => message,
    }
}

/// `panicked: ` and the message of a caught panic (see [`panic_message`]).
#[cold]
#[inline(never)]
fn panicked(panic: Box<dyn std::any::Any + Send>) -> String {
    format!("panicked: {}", panic_message(panic.as_ref()))
}

/// Hands an error message to the host through `error`, and returns the ERROR status.
///
/// # Safety
///
/// `error` must be non-null and valid for writes.
#[cold]
#[inline(never)]
unsafe fn write_error(error: *mut UdfOwnedBytes, message: String) -> i32 {
    // SAFETY: the caller's promise.
    unsafe { error.write(owned_bytes(message.into_bytes())) };
    status::ERROR
}

/// `text` as one line: its lines trimmed and joined with `; ` (`assert_eq!` writes
/// `left: ...` and `right: ...` on lines of their own), any other control character a space.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let lines = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()));
    for line in lines.filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.extend(line.chars().map(|c| if c.is_control() { ' ' } else { c }));
    }
    out
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
unsafe fn write_batch_outcome(
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

pub mod batch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_locations_are_copied_into_fixed_storage() {
        let at = PanicLocation::new("src/lib.rs", 12, 5);
        assert_eq!(at.to_string(), "src/lib.rs:12:5");
        // A long path keeps its end, cut at a character boundary.
        let long = format!("{}é/src/lib.rs", "d/".repeat(200));
        let at = PanicLocation::new(&long, 1, 2).to_string();
        assert!(
            at.starts_with("...") && at.ends_with("é/src/lib.rs:1:2"),
            "{at}"
        );
        assert!(at.len() <= LOCATION_FILE_BYTES + 3 + 4, "{at}");
        let at = PanicLocation::new(&"é".repeat(200), 1, 2).to_string();
        assert!(at.starts_with("...é") && at.ends_with("é:1:2"), "{at}");
        // Control characters in a file name cannot break the line.
        assert_eq!(
            PanicLocation::new("a\nb.rs", 1, 1).to_string(),
            "a\\nb.rs:1:1"
        );
        // No destructor: the thread-local registers none with the C library.
        assert!(!std::mem::needs_drop::<
            std::cell::Cell<Option<PanicLocation>>,
        >());
    }

    #[test]
    fn panic_messages_are_one_line() {
        assert_eq!(one_line("boom: x"), "boom: x");
        assert_eq!(
            one_line("assertion `left == right` failed\n  left: 1\n right: 2\n"),
            "assertion `left == right` failed; left: 1; right: 2"
        );
        assert_eq!(one_line("a\r\nb\tc\u{7}"), "a; b c");
        assert_eq!(one_line("\n \n"), "");
    }

    #[test]
    fn a_panic_in_the_row_path_is_an_error_with_message_and_location() {
        let mut out = UdfValue::NULL;
        let mut error = UdfOwnedBytes::EMPTY;
        let line = line!() + 4;
        // SAFETY: no arguments; `out` and `error` are valid for writes.
        let status = unsafe {
            call_row(std::ptr::null(), 0, 0, &mut out, &mut error, |_| {
                panic!("first line\nsecond line")
            })
        };
        assert_eq!(status, status::ERROR);
        // SAFETY: `call_row` wrote bytes made by `owned_bytes`, taken back once.
        let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
        let message = String::from_utf8(bytes).unwrap();
        assert!(
            message.starts_with("panicked: first line; second line (at ")
                && message.ends_with(&format!("udf-abi/src/export/mod.rs:{line}:17)")),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }
}
