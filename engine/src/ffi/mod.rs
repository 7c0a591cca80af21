//! The one module of the host that touches raw pointers and foreign code, one submodule per
//! concern:
//!
//! * [`library`]: loading a library (`dlopen` of a sealed copy, `images`), the ABI handshake and
//!   [`PluginLibrary`];
//! * [`manifest`]: reading what a library declares (v1 metadata, the v2 manifest, validated in
//!   `metadata`) into [`FunctionSignature`]s;
//! * [`scalar`]: calling a scalar function ([`PluginFunction`]) over Arrow arrays, row by row
//!   (`scalar::rows`) or a batch at a time (`scalar::batch`), with the rules every result passes
//!   (`scalar::arrow_result`). Later function kinds get their own module beside it;
//! * [`aggregate`]: aggregate functions (ABI 2.4): reading their entries, one accumulator of
//!   the plugin behind a safe interface;
//! * [`async_fn`]: asynchronous functions (ABI 2.3): starting a call, the completion a plugin
//!   calls from any thread, cancel;
//! * `shm` and `descriptors`: the shared memory and file descriptors of process isolation.
//!
//! Everything a v1 plugin hands back is read through layout-identical "raw" mirrors of the
//! `udf-abi` enums (below), so that a tag or a `bool` byte the ABI does not define is an error
//! instead of undefined behaviour; the v2 types have no Rust enums in them and are read as they
//! are.
//!
//! What the host cannot defend against: a plugin that crashes, corrupts memory, returns dangling
//! pointers, or never terminates a returned string. See the README's Safety section.

use std::ffi::c_char;
use std::mem::{align_of, offset_of, size_of};

use udf_abi::{PluginMetadata, PluginResult, PluginType, PluginValue};

pub mod aggregate;
pub mod async_fn;
pub(crate) mod descriptors;
mod images;
mod library;
mod manifest;
mod metadata;
mod scalar;
pub(crate) mod shm;

pub use images::FileIdentity;
pub(crate) use library::effective_uid;
pub use library::{Abi, PluginLibrary, open_regular_file};
pub(crate) use manifest::fuzz_manifests;
pub use manifest::{DeclaredVolatility, FunctionSignature, MAX_FUNCTIONS};
pub use scalar::PluginFunction;
pub(crate) use scalar::build_validated;

/// The value rules every result meets (arrow's full validation, decimal precision at every
/// level), for an array that came from a worker process.
pub(crate) fn check_received_array(
    array: &datafusion::arrow::array::ArrayRef,
) -> Result<(), crate::error::CallError> {
    scalar::batch::check_result_data(&array.to_data())
}

/// The longest function name read from metadata, in bytes (without the NUL).
pub const MAX_NAME_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Raw mirrors of the ABI types. A `#[repr(C)]` enum with fields is laid out as a `#[repr(C)]`
// struct of an `int` tag and a `#[repr(C)]` union of the variants (RFC 2195), so these have the
// same layout, and reading them is defined for every tag and byte a plugin may write.

#[repr(C)]
#[derive(Clone, Copy)]
union RawPayload {
    boolean: u8,
    int: i64,
    uint: u64,
    double: f64,
    string: *const c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawValue {
    tag: u32,
    payload: RawPayload,
}

#[repr(C)]
#[derive(Clone, Copy)]
union RawResultPayload {
    ok: RawValue,
    err: *mut c_char,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawResult {
    tag: u32,
    payload: RawResultPayload,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawMetadata {
    name: *const c_char,
    arg_types: *const u32,
    arg_types_len: usize,
    return_type: u32,
}

const _: () = {
    assert!(size_of::<RawValue>() == size_of::<PluginValue>());
    assert!(align_of::<RawValue>() == align_of::<PluginValue>());
    assert!(size_of::<RawResult>() == size_of::<PluginResult>());
    assert!(align_of::<RawResult>() == align_of::<PluginResult>());
    assert!(size_of::<RawMetadata>() == size_of::<PluginMetadata>());
    assert!(align_of::<RawMetadata>() == align_of::<PluginMetadata>());
    assert!(offset_of!(RawMetadata, return_type) == offset_of!(PluginMetadata, return_type));
    assert!(size_of::<PluginType>() == size_of::<u32>());
};

const RESULT_OK: u32 = 0;
const RESULT_ERR: u32 = 1;

type MetadataFn = unsafe extern "C" fn() -> RawMetadata;
type EntrypointFn = unsafe extern "C" fn(*const PluginValue, usize) -> RawResult;
