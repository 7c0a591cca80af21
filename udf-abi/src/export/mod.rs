//! Runtime support for the code `#[udf]` generates; not for direct use.
//!
//! This is the plugin side's one module with `unsafe` code: the two exported ABI v2 symbols and
//! the manifest they describe ([`manifest`]), the release function, panics turned into errors
//! (here, shared by every function kind), and per function kind the wrappers that turn raw
//! arguments into safe values ([`scalar`]: the row and batch entrypoints; [`aggregate`]: the
//! accumulators of `#[udaf]`; [`async_fn`]: `#[udf(async)]`). Everything else a
//! plugin author sees is safe Rust.
#![allow(unsafe_code)]
#![doc(hidden)]

use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

pub use linkme;

use crate::v2::{
    BatchEntrypoint, Date, FFI_ArrowArray, FFI_ArrowSchema, MAX_AGGREGATES, RowEntrypoint,
    Timestamp, UdfAbiVersion, UdfAggregateFunction, UdfArrowTypes, UdfAsyncFunction, UdfBytes,
    UdfFunction, UdfManifest, UdfOwnedBytes, UdfScalar, UdfType, UdfValue, status,
};

pub mod aggregate;
pub mod async_fn;
pub mod manifest;
pub mod scalar;

// The paths `#[udf]`'s generated code uses, kept where they were before scalar functions got
// their own module.
pub use manifest::{udfsql_abi_version, udfsql_manifest};
pub use scalar::{
    FromUdfValue, IntoUdfResult, IntoUnitResult, UdfArgType, UdfReturnType, argument_error, arrow,
    batch, call_row, direct, finish, values, written,
};

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
        ExportedFunction::descriptor(
            name,
            arg_types,
            arg_nullable,
            return_type.tag(),
            return_nullable,
            volatility,
            Some(call_row),
            Some(call_batch),
        )
    }

    /// The one place a descriptor is laid out, for every function kind: `name` and the type
    /// arrays are statics of the library, taken apart into pointers and lengths.
    #[allow(clippy::too_many_arguments)]
    pub(crate) const fn descriptor(
        name: &'static str,
        arg_types: &'static [u32],
        arg_nullable: &'static [u8],
        return_type: u32,
        return_nullable: bool,
        volatility: u32,
        call_row: Option<RowEntrypoint>,
        call_batch: Option<BatchEntrypoint>,
    ) -> ExportedFunction {
        ExportedFunction(UdfFunction {
            name: UdfBytes {
                ptr: name.as_ptr(),
                len: name.len(),
            },
            arg_types: arg_types.as_ptr(),
            arg_nullable: arg_nullable.as_ptr(),
            args_len: arg_types.len(),
            return_type,
            return_nullable: return_nullable as u8,
            volatility,
            call_row,
            call_batch,
        })
    }
}

/// Every `#[udf]` function of the library.
#[linkme::distributed_slice]
pub static FUNCTIONS: [ExportedFunction];

/// Every `#[udf(vectorized)]` function's Arrow types (a subset of [`FUNCTIONS`], by name).
#[linkme::distributed_slice]
pub static ARROW_TYPES: [ExportedArrowTypes];

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

/// What [`Retryable`](crate::Retryable)'s `Display` starts with: the SDK completes an
/// asynchronous call whose error message starts with it with `RETRY` (and removes it).
pub const RETRY_MARK: &str = "\u{1}udf-retry\u{1}";

/// `message` without the retry marker, and whether it had one.
pub(crate) fn take_retry_mark(message: String) -> (String, bool) {
    match message.strip_prefix(RETRY_MARK) {
        Some(rest) => (rest.to_string(), true),
        None => (message, false),
    }
}

/// Hands an error message to the host through `error`, and returns the ERROR status.
///
/// # Safety
///
/// `error` must be non-null and valid for writes.
#[cold]
#[inline(never)]
unsafe fn write_error(error: *mut UdfOwnedBytes, message: String) -> i32 {
    // A synchronous call has no retries: a retryable error is an ordinary one.
    let (message, _) = take_retry_mark(message);
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
    fn a_retryable_error_of_a_synchronous_call_is_an_ordinary_error() {
        let mut out = UdfValue::NULL;
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: no arguments; `out` and `error` are valid for writes.
        let status = unsafe {
            call_row(std::ptr::null(), 0, 0, &mut out, &mut error, |_| {
                Err::<UdfValue, String>(crate::Retryable("busy").to_string())
            })
        };
        assert_eq!(status, status::ERROR);
        // SAFETY: bytes made by `owned_bytes`, taken back once.
        let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
        assert_eq!(String::from_utf8(bytes).unwrap(), "busy");
        assert_eq!(
            take_retry_mark(crate::Retryable(7).to_string()),
            ("7".to_string(), true)
        );
        assert_eq!(take_retry_mark("7".into()), ("7".to_string(), false));
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
