//! Writes the two ABI v1 exports (`plugin_metadata`, `plugin_entrypoint`) for a plain Rust
//! function, so that the example plugins stay short. The `repeat` plugin shows the same exports
//! written out by hand.
//!
//! ```
//! udf_plugin_seed_kit::seed_plugin! {
//!     fn square(x: i64) -> Result<i64, String> { Ok(x.wrapping_mul(x)) }
//! }
//! ```
//!
//! The generated entrypoint checks the argument count and types, catches panics and turns every
//! failure into a `PluginResult::Err` message; nothing unwinds across the boundary.

use std::ffi::{CStr, CString, c_char};

pub use udf_abi::{PluginMetadata, PluginResult, PluginType, PluginValue};

/// A Rust type that can be a v1 argument.
pub trait SeedArg<'a>: Sized {
    /// The ABI type this Rust type stands for.
    const TYPE: PluginType;
    /// Reads the value, or says why it cannot.
    fn from_value(value: &'a PluginValue) -> Result<Self, String>;
}

/// A Rust type that can be a v1 result.
pub trait SeedReturn {
    /// The ABI type this Rust type stands for.
    const TYPE: PluginType;
    /// Converts into a value the host takes ownership of.
    fn into_value(self) -> Result<PluginValue, String>;
}

macro_rules! primitive {
    ($rust:ty, $variant:ident) => {
        impl SeedArg<'_> for $rust {
            const TYPE: PluginType = PluginType::$variant;
            fn from_value(value: &PluginValue) -> Result<Self, String> {
                match *value {
                    PluginValue::$variant(v) => Ok(v),
                    _ => Err(concat!("expected ", stringify!($variant)).to_string()),
                }
            }
        }
        impl SeedReturn for $rust {
            const TYPE: PluginType = PluginType::$variant;
            fn into_value(self) -> Result<PluginValue, String> {
                Ok(PluginValue::$variant(self))
            }
        }
    };
}
primitive!(bool, Bool);
primitive!(i64, Int);
primitive!(u64, UInt);
primitive!(f64, Double);

impl<'a> SeedArg<'a> for &'a str {
    const TYPE: PluginType = PluginType::String;
    fn from_value(value: &'a PluginValue) -> Result<Self, String> {
        match *value {
            PluginValue::String(ptr) if !ptr.is_null() => {
                // SAFETY: the host passes a NUL-terminated string that stays alive for the whole
                // call, and the borrow `'a` does not outlive the `args` slice of that call.
                let cstr = unsafe { CStr::from_ptr(ptr) };
                cstr.to_str()
                    .map_err(|_| "expected valid UTF-8".to_string())
            }
            PluginValue::String(_) => Err("null string pointer".to_string()),
            _ => Err("expected String".to_string()),
        }
    }
}

impl SeedReturn for String {
    const TYPE: PluginType = PluginType::String;
    fn into_value(self) -> Result<PluginValue, String> {
        let s = CString::new(self).map_err(|_| "result contains a NUL byte".to_string())?;
        Ok(PluginValue::String(s.into_raw() as *const c_char))
    }
}

/// An error result whose message the host frees.
pub fn error_result(message: &str) -> PluginResult {
    let message = message.split('\0').next().unwrap_or_default();
    match CString::new(message) {
        Ok(m) => PluginResult::Err(m.into_raw()),
        Err(_) => PluginResult::Err(std::ptr::null_mut()),
    }
}

/// Views the entrypoint's arguments as a slice after checking the count.
///
/// # Safety
///
/// `args` must point at `len` initialised values that stay valid for `'a` (the host's promise).
pub unsafe fn args<'a>(
    args: *const PluginValue,
    len: usize,
    expected: usize,
) -> Result<&'a [PluginValue], String> {
    if len != expected {
        return Err(format!("expected {expected} arguments, got {len}"));
    }
    if len == 0 {
        return Ok(&[]);
    }
    if args.is_null() {
        return Err("null argument array".to_string());
    }
    // SAFETY: non-null, and the caller promises `len` valid values.
    Ok(unsafe { std::slice::from_raw_parts(args, len) })
}

/// Runs `body`, turning its error or panic into a [`PluginResult::Err`].
pub fn run<R: SeedReturn>(body: impl FnOnce() -> Result<R, String>) -> PluginResult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(value)) => match value.into_value() {
            Ok(v) => PluginResult::Ok(v),
            Err(e) => error_result(&e),
        },
        Ok(Err(e)) => error_result(&e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            error_result(&format!("panicked: {msg}"))
        }
    }
}

/// Exports one function as an ABI v1 plugin. See the crate docs.
#[macro_export]
macro_rules! seed_plugin {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> Result<$ret:ty, String> $body:block) => {
        fn $name($($arg: $ty),*) -> Result<$ret, String> $body

        static ARG_TYPES: &[$crate::PluginType] = &[$(<$ty as $crate::SeedArg>::TYPE),*];
        static NAME: &::std::ffi::CStr = match ::std::ffi::CStr::from_bytes_with_nul(
            concat!(stringify!($name), "\0").as_bytes(),
        ) {
            Ok(name) => name,
            Err(_) => panic!("function name contains a NUL byte"),
        };

        /// ABI v1 metadata: every pointer points at static data.
        #[unsafe(no_mangle)]
        pub extern "C" fn plugin_metadata() -> $crate::PluginMetadata {
            $crate::PluginMetadata {
                name: NAME.as_ptr(),
                arg_types: ARG_TYPES.as_ptr(),
                arg_types_len: ARG_TYPES.len(),
                return_type: <$ret as $crate::SeedReturn>::TYPE,
            }
        }

        /// ABI v1 row entrypoint.
        ///
        /// # Safety
        ///
        /// `args` points at `args_len` values valid for the duration of the call.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn plugin_entrypoint(
            args: *const $crate::PluginValue,
            args_len: usize,
        ) -> $crate::PluginResult {
            $crate::run(|| {
                // SAFETY: the host's promise, forwarded from this function's contract.
                let args = unsafe { $crate::args(args, args_len, ARG_TYPES.len()) }?;
                let mut _next = args.iter().enumerate();
                $(
                    let $arg: $ty = {
                        let (i, v) = _next.next().ok_or("missing argument")?;
                        <$ty as $crate::SeedArg>::from_value(v)
                            .map_err(|e| format!("arg{i} is invalid: {e}"))?
                    };
                )*
                $name($($arg),*)
            })
        }
    };
}
