//! A plugin written exactly to the seed contract (ABI v1), apart from the project: the types are
//! the blog post's, declared here rather than taken from `udf-abi`, and the two exported
//! functions are `plugin_metadata` and `plugin_entrypoint`. `seed_square(Int) -> Int` (x * x), wrapping on
//! overflow.
//!
//! No strings are involved, so nothing is allocated: a call reads one `PluginValue` and returns
//! one. On arguments that break the contract (which the host never passes) it returns an error
//! without a message (a null pointer), which the host reports as such; a message would have to be
//! allocated with `malloc` for the host to `free()`, and this plugin has no need of one.

use std::ffi::c_char;

/// The contract's value types.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum PluginType {
    /// `bool`.
    Bool,
    /// `i64`.
    Int,
    /// `u64`.
    UInt,
    /// `f64`.
    Double,
    /// A NUL-terminated string.
    String,
}

/// What `plugin_metadata` returns; every pointer points at static data.
#[repr(C)]
#[derive(Debug)]
pub struct PluginMetadata {
    /// The function's name, NUL-terminated.
    pub name: *const c_char,
    /// The argument types.
    pub arg_types: *const PluginType,
    /// How many argument types `arg_types` points at.
    pub arg_types_len: usize,
    /// The result type.
    pub return_type: PluginType,
}

/// One argument or result value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub enum PluginValue {
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float.
    Double(f64),
    /// A NUL-terminated string (an argument: owned by the host).
    String(*const c_char),
}

/// The result of one call.
#[repr(C)]
#[derive(Debug)]
pub enum PluginResult {
    /// The value.
    Ok(PluginValue),
    /// An error message from `malloc` for the host to `free()`, or null for none.
    Err(*mut c_char),
}

static ARG_TYPES: [PluginType; 1] = [PluginType::Int];

/// Describes the one function of this library.
#[unsafe(no_mangle)]
pub extern "C" fn plugin_metadata() -> PluginMetadata {
    PluginMetadata {
        name: c"seed_square".as_ptr(),
        arg_types: ARG_TYPES.as_ptr(),
        arg_types_len: ARG_TYPES.len(),
        return_type: PluginType::Int,
    }
}

/// Evaluates `square` for one row.
///
/// # Safety
///
/// `args` points at `args_len` values that are valid for the duration of the call (the host
/// guarantees it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn plugin_entrypoint(
    args: *const PluginValue,
    args_len: usize,
) -> PluginResult {
    if args.is_null() || args_len != 1 {
        return PluginResult::Err(std::ptr::null_mut());
    }
    // SAFETY: `args` is non-null and points at `args_len` (1) valid values, per the contract.
    match unsafe { *args } {
        PluginValue::Int(x) => PluginResult::Ok(PluginValue::Int(x.wrapping_mul(x))),
        _ => PluginResult::Err(std::ptr::null_mut()),
    }
}
