//! The C ABI between udfsql (the host) and plugin libraries.
//!
//! This crate is the contract: `#[repr(C)]` types, symbol names, the rules about who owns which
//! memory, and the runtime the `#[udf]` macro's code calls (its one `unsafe` module, `export`).
//! It depends on no DataFusion, only on arrow-rs's C Data Interface crates. The same layout is
//! written for C in `include/udf_abi.h`.
//!
//! # ABI v1: the seed contract
//!
//! A v1 plugin library exports exactly two functions with C linkage:
//!
//! ```c
//! PluginMetadata plugin_metadata(void);
//! PluginResult   plugin_entrypoint(const PluginValue *args, size_t args_len);
//! ```
//!
//! * [`plugin_metadata`](SYMBOL_METADATA) describes the one function the library provides: its
//!   name, argument types and return type. Every pointer in it must stay valid for as long as the
//!   library is loaded (point at static data).
//! * [`plugin_entrypoint`](SYMBOL_ENTRYPOINT) evaluates the function for one row.
//!
//! ## Ownership
//!
//! * **Arguments belong to the host.** The `args` array and every string it points to are valid
//!   only for the duration of the call. The plugin must not modify, free or keep them.
//! * **Returned strings and error messages are handed to the host**, which frees them with the C
//!   library's `free()`. A plugin must therefore allocate them with the C library's `malloc`
//!   (from Rust: `libc::malloc`, then copy the bytes and the NUL in, as the example plugin
//!   `udf-plugins/repeat` does). Not with [`std::ffi::CString::into_raw`]: that memory comes
//!   from Rust's global allocator, which is `malloc` only by default (a `#[global_allocator]`
//!   in the plugin or a dependency changes it) and must be given back with `CString::from_raw`.
//! * Strings are NUL-terminated UTF-8.
//!
//! ## Calling rules
//!
//! * The host validates the metadata before using it, and never calls the entrypoint with
//!   arguments that differ from the declared types or count.
//! * SQL `NULL`: a row where any argument is `NULL` yields `NULL` without calling the plugin (the
//!   `STRICT` rule of PostgreSQL and DuckDB's default).
//! * The entrypoint may be called from several threads at once: plugins must be thread-safe.
//! * The entrypoint must not unwind: a Rust plugin catches panics with
//!   [`std::panic::catch_unwind`] and reports them as [`PluginResult::Err`].
//!
//! # ABI v2 and the `#[udf]` macro
//!
//! [`v2`] is the versioned ABI: a handshake, a manifest of many functions, NULL-aware arguments,
//! more types, pointer + length strings, and memory released by the plugin that allocated it. A
//! plugin author writes plain Rust functions and lets [`udf`] write every export:
//!
//! ```
//! use udf_abi::udf;
//!
//! #[udf]
//! fn repeat(s: &str, n: u64) -> String {
//!     s.repeat(n as usize)
//! }
//!
//! #[udf(name = "safe_div")]
//! fn divide(a: i64, b: i64) -> Result<i64, String> {
//!     a.checked_div(b).ok_or_else(|| format!("cannot divide {a} by {b}"))
//! }
//! # fn main() {}
//! ```
//!
//! Supported argument and result types: `bool`, `i32`, `i64`, `u64`, `f32`, `f64`, `&str` /
//! `String`, `&[u8]` / `Vec<u8>` (SQL binary), [`Date`] (days since 1970-01-01, SQL `DATE`) and
//! [`Timestamp`] (microseconds since the epoch in UTC, SQL `TIMESTAMP`); `Option<T>` arguments
//! receive NULLs, `Option<T>` results may be NULL, `Result<T, E: Display>` errors and panics become
//! SQL errors. Options: `#[udf(name = "sql_name", volatility = "immutable" | "stable" |
//! "volatile")]`.
//!
//! What the generated code promises the author, on the row and the batch path alike:
//!
//! * The function is never called for a row where an argument that is not an `Option` is NULL,
//!   not even by the vectorised kernels of the batch path (a NULL slot's value is not a row).
//! * A stable or volatile function is called once per row, also for constant arguments; only an
//!   immutable function of constants may be computed once for a whole batch.
//! * A panic becomes the SQL error `panicked: <message> (at <file>:<line>:<column>)`, on one line,
//!   and the call is not retried.
//!
//! A string result may be written rather than returned: a last parameter `&mut String` is an
//! output buffer, cleared and reused from row to row (no allocation per row on the batch path);
//! the function then returns nothing or `Result<(), E>`:
//!
//! ```
//! use udf_abi::udf;
//!
//! #[udf]
//! fn shout(s: &str, out: &mut String) {
//!     out.push_str(&s.to_uppercase());
//!     out.push('!');
//! }
//! # fn main() {}
//! ```
//!
//! # Arrow types and vectorised functions (ABI 2.2)
//!
//! `#[udf(vectorized)]` exports a function over whole arrow-rs arrays, for every Arrow type an
//! ABI 2.2 type string declares (see [`v2::UdfArrowTypes`] and [`type_string`]): integers of
//! every width, `Decimal128`, timestamps in every unit with or without a zone, durations,
//! intervals, string and binary layouts, lists and structs. Where the array type does not say the
//! whole Arrow type, declare it: `#[arrow("...")]` on a parameter, `returns = "..."` for the
//! result.
//!
//! ```
//! use udf_abi::arrow_array::{Array, Decimal128Array, Int64Array, ListArray};
//! use udf_abi::udf;
//!
//! #[udf(vectorized, returns = "d:13,2")]
//! fn add_cents(
//!     #[arrow("d:12,2")] price: &Decimal128Array,
//!     cents: &Int64Array,
//! ) -> Result<Decimal128Array, String> {
//!     let sum: Decimal128Array = price
//!         .iter()
//!         .zip(cents.iter())
//!         .map(|(p, c)| Some(p? + i128::from(c?)))
//!         .collect();
//!     sum.with_precision_and_scale(13, 2).map_err(|e| e.to_string())
//! }
//!
//! #[udf(vectorized)]
//! fn list_count(#[arrow("+l<g>")] lists: &ListArray) -> Int64Array {
//!     Int64Array::new(
//!         lists.offsets().lengths().map(|l| l as i64).collect(),
//!         lists.nulls().cloned(),
//!     )
//! }
//! # fn main() {}
//! ```
//!
//! The function sees its arguments' NULLs (every argument takes NULLs; the result may be NULL),
//! constant arguments repeated to the batch's rows, and runs on the batch path only. Its arrays
//! are this crate's arrow-rs ([`arrow_array`], re-exported): only the C Data Interface crosses to
//! the host, whatever arrow-rs the host was built with.
#![deny(unsafe_code)]

pub mod aggregate;
pub mod export;
pub mod type_string;
pub mod types;
pub mod v2;

pub use udf_abi_macros::{UdfStruct, udaf, udf};
pub use v2::{Date, Timestamp};
/// The arrow-rs crates `#[udf(vectorized)]` functions are written with (the plugin's own copy:
/// only the Arrow C Data Interface crosses to the host, whatever arrow-rs the host uses).
pub use {arrow_array, arrow_buffer, arrow_schema};

use std::ffi::c_char;

/// The error of a `#[udf(async)]` function for a **temporary** failure (a timeout, a refused
/// connection, HTTP 503): the call completes with `RETRY`, and the host starts it again after a
/// short wait when the function's retries allow it (`#retries=N` from SQL; none by default),
/// else the query fails with the message. Use it as the error type, or convert into it:
///
/// ```text
/// #[udf(async)]
/// async fn lookup(key: &str) -> Result<String, Retryable<String>> { ... Err(Retryable(msg)) }
/// ```
///
/// Its `Display` starts with a marker the SDK recognises (and removes): format the inner error
/// (`.0`) for anything else. From a synchronous function it is an ordinary error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retryable<E>(pub E);

impl<E: std::fmt::Display> std::fmt::Display for Retryable<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", export::RETRY_MARK, self.0)
    }
}

/// Name of the v1 metadata symbol: `PluginMetadata plugin_metadata(void)`.
pub const SYMBOL_METADATA: &str = "plugin_metadata";
/// Name of the v1 row entrypoint symbol:
/// `PluginResult plugin_entrypoint(const PluginValue *args, size_t args_len)`.
pub const SYMBOL_ENTRYPOINT: &str = "plugin_entrypoint";
/// The largest number of arguments a host accepts in [`PluginMetadata::arg_types_len`].
pub const MAX_ARGS: usize = 64;

/// The most functions one v2 manifest may list (a host refuses more).
pub const MAX_FUNCTIONS: usize = 4096;

/// The type of an argument or of a return value.
///
/// `#[repr(C)]`: a C `enum`, i.e. an `int`-sized tag with the values 0 to 4 in this order. A host
/// must treat any other value read from a plugin as invalid metadata.
#[repr(C)]
#[derive(Debug, Copy, Clone, PartialEq, Eq, Hash)]
pub enum PluginType {
    /// `bool`; SQL `BOOLEAN`.
    Bool,
    /// `int64_t`; SQL `BIGINT`.
    Int,
    /// `uint64_t`; SQL `BIGINT UNSIGNED`.
    UInt,
    /// `double`; SQL `DOUBLE`.
    Double,
    /// NUL-terminated UTF-8 `const char *`; SQL `VARCHAR`.
    String,
}

impl PluginType {
    /// Every type, in tag order.
    pub const ALL: [PluginType; 5] = [
        PluginType::Bool,
        PluginType::Int,
        PluginType::UInt,
        PluginType::Double,
        PluginType::String,
    ];

    /// The C tag of this type.
    pub const fn tag(self) -> u32 {
        self as u32
    }

    /// The type with C tag `tag`, or `None` for a tag this ABI does not define.
    pub const fn from_tag(tag: u32) -> Option<PluginType> {
        match tag {
            0 => Some(PluginType::Bool),
            1 => Some(PluginType::Int),
            2 => Some(PluginType::UInt),
            3 => Some(PluginType::Double),
            4 => Some(PluginType::String),
            _ => None,
        }
    }

    /// The name used in signatures and error messages.
    pub const fn name(self) -> &'static str {
        match self {
            PluginType::Bool => "Bool",
            PluginType::Int => "Int",
            PluginType::UInt => "UInt",
            PluginType::Double => "Double",
            PluginType::String => "String",
        }
    }
}

impl std::fmt::Display for PluginType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value crossing the boundary: an argument (host to plugin) or a result (plugin to host).
///
/// `#[repr(C)]` enum with fields: in C a `struct { PluginType tag; union { ... } }` (16 bytes on
/// 64-bit targets). The variant must match the declared [`PluginType`].
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub enum PluginValue {
    /// A boolean. Only the bytes 0 and 1 are valid.
    Bool(bool),
    /// A signed 64-bit integer.
    Int(i64),
    /// An unsigned 64-bit integer.
    UInt(u64),
    /// A 64-bit float, any bit pattern (NaN and infinities included).
    Double(f64),
    /// A NUL-terminated UTF-8 string, never null.
    ///
    /// As an **argument** the string is owned by the host and valid only during the call. As a
    /// **result** it is handed to the host, which frees it with `free()`: allocate it with the C
    /// library's `malloc` (`libc::malloc` from Rust), not with `CString::into_raw`.
    String(*const c_char),
}

/// What a plugin says about its one function (v1). Returned by value from `plugin_metadata`.
///
/// All pointers must point at data that lives as long as the library is loaded (statics).
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct PluginMetadata {
    /// The function's SQL name: NUL-terminated UTF-8, not empty. Owned by the plugin (static).
    pub name: *const c_char,
    /// `arg_types_len` argument types. May be null only when `arg_types_len` is 0. Owned by the
    /// plugin (static).
    pub arg_types: *const PluginType,
    /// The number of arguments, at most [`MAX_ARGS`].
    pub arg_types_len: usize,
    /// The type of the result.
    pub return_type: PluginType,
}

/// The outcome of one call of `plugin_entrypoint`.
///
/// `#[repr(C)]` enum with fields: in C `struct { int tag; union { PluginValue ok; char *err; } }`.
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub enum PluginResult {
    /// The result. A string inside is handed to the host, which frees it with `free()`.
    Ok(PluginValue),
    /// A NUL-terminated UTF-8 error message, handed to the host, which frees it with `free()`
    /// after copying it into the SQL error. Allocate it with the C library's `malloc`
    /// (`libc::malloc` from Rust), not with `CString::into_raw`.
    Err(*mut c_char),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, size_of};

    #[test]
    fn tags_round_trip() {
        for t in PluginType::ALL {
            assert_eq!(PluginType::from_tag(t.tag()), Some(t));
        }
        assert_eq!(PluginType::from_tag(5), None);
        assert_eq!(PluginType::from_tag(u32::MAX), None);
    }

    #[test]
    fn layout_matches_the_c_header() {
        // The sizes `include/udf_abi.h` produces with a 64-bit C compiler; the C plugin test
        // checks the same numbers from the C side.
        if size_of::<usize>() == 8 {
            assert_eq!(size_of::<PluginType>(), 4);
            assert_eq!(size_of::<PluginValue>(), 16);
            assert_eq!(align_of::<PluginValue>(), 8);
            assert_eq!(size_of::<PluginMetadata>(), 32);
            assert_eq!(size_of::<PluginResult>(), 24);
        }
    }
}
