//! The seed contract's example plugin, written by hand exactly to ABI v1:
//! `repeat(String, UInt) -> String`, e.g. `repeat('cool', 3)` = `'coolcoolcool'`.
//!
//! This file is what a plugin author writes without any help from udfsql: two `extern "C"`
//! functions over the `#[repr(C)]` types of `udf-abi`. It differs from the blog post's version
//! where that one could panic across the boundary (`CString::new(..).unwrap()` outside
//! `catch_unwind`), and in how it allocates what it returns: the contract says the host frees
//! returned strings and error messages with `free()`, so they are allocated with `malloc`
//! (`CString::into_raw` would use Rust's global allocator, which is `malloc` only by default).

use std::ffi::{CStr, c_char};
use std::panic::catch_unwind;

use udf_abi::{PluginMetadata, PluginResult, PluginType, PluginValue};

static ARG_TYPES: [PluginType; 2] = [PluginType::String, PluginType::UInt];

/// Describes the one function of this library. Every pointer points at static data.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_metadata() -> PluginMetadata {
    PluginMetadata {
        name: c"repeat".as_ptr(),
        arg_types: ARG_TYPES.as_ptr(),
        arg_types_len: ARG_TYPES.len(),
        return_type: PluginType::String,
    }
}

fn repeat_impl(input: &str, count: u64) -> Result<String, String> {
    let count = usize::try_from(count).map_err(|_| format!("count {count} is too large"))?;
    // Refuse results that could not be allocated instead of aborting on out-of-memory.
    match input.len().checked_mul(count) {
        Some(len) if len <= isize::MAX as usize / 2 => Ok(input.repeat(count)),
        _ => Err(format!(
            "result of repeating {} bytes {count} times is too large",
            input.len()
        )),
    }
}

/// A NUL-terminated copy of `bytes` (which contain no NUL) in memory from `malloc`, for the host
/// to `free()`; null if `malloc` fails.
fn malloc_c_string(bytes: &[u8]) -> *mut c_char {
    let Some(size) = bytes.len().checked_add(1) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `malloc` may be called with any size; the result is checked for null below.
    let ptr = unsafe { libc::malloc(size) }.cast::<u8>();
    if ptr.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `ptr` is a fresh allocation of `bytes.len() + 1` bytes, so it cannot overlap
    // `bytes`, and both the copy and the terminating NUL stay inside it.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len());
        ptr.add(bytes.len()).write(0);
    }
    ptr.cast::<c_char>()
}

fn plugin_error(message: &str) -> PluginResult {
    // A message with an interior NUL byte is cut there rather than lost. If `malloc` fails the
    // message is null, which the host reports as an error without a message.
    let message = message.split('\0').next().unwrap_or_default();
    PluginResult::Err(malloc_c_string(message.as_bytes()))
}

/// Evaluates `repeat` for one row.
///
/// # Safety
///
/// `args` points at `args_len` values that are valid for the duration of the call; a
/// `PluginValue::String` points at a NUL-terminated string. The host guarantees both.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugin_entrypoint(
    args: *const PluginValue,
    args_len: usize,
) -> PluginResult {
    if args.is_null() || args_len != 2 {
        return plugin_error("repeat expects 2 arguments");
    }
    // SAFETY: the host passes `args_len` (checked: 2) valid values.
    let args = unsafe { std::slice::from_raw_parts(args, args_len) };
    let PluginValue::String(string) = args[0] else {
        return plugin_error("arg0 is invalid; expected String");
    };
    let PluginValue::UInt(count) = args[1] else {
        return plugin_error("arg1 is invalid; expected UInt");
    };
    if string.is_null() {
        return plugin_error("arg0 is a null pointer");
    }
    // SAFETY: the host passes a NUL-terminated string that it keeps alive during the call.
    let Ok(string) = unsafe { CStr::from_ptr(string) }.to_str() else {
        return plugin_error("arg0 is invalid; expected valid UTF-8 string");
    };
    match catch_unwind(|| repeat_impl(string, count)) {
        Ok(Ok(value)) if value.contains('\0') => plugin_error("result contains a NUL byte"),
        Ok(Ok(value)) => match malloc_c_string(value.as_bytes()) {
            ptr if ptr.is_null() => plugin_error("out of memory for the result"),
            ptr => PluginResult::Ok(PluginValue::String(ptr.cast_const())),
        },
        Ok(Err(message)) => plugin_error(&message),
        Err(_) => plugin_error("function panicked"),
    }
}
