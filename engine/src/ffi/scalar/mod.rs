//! Scalar functions: [`PluginFunction`] calls one function of a library over Arrow arrays, row
//! by row ([`rows`]) or a batch at a time ([`batch`]); [`arrow_result`] checks and imports what a
//! batch entrypoint returns. The rules shared by both paths live here: the arguments a call may
//! pass, the STRICT rule, and the ownership of bytes a plugin returns.

use std::ffi::{CStr, c_char};
use std::sync::Arc;

use udf_abi::v2::{self, BatchEntrypoint, ReleaseBytes, UdfOwnedBytes, UdfType};

use super::library::{Entrypoints, PluginLibrary};
use super::manifest::FunctionSignature;
use super::{RESULT_ERR, RESULT_OK, RawResult};
use crate::error::CallError;

pub(super) mod arrow_result;
pub(super) mod batch;
mod rows;

pub(crate) use batch::build_validated;
pub(super) use batch::{ArgSchemas, export_for_a_plugin};

/// How returned bytes go back to the plugin.
enum Release {
    /// ABI v1: the C library's `free()`.
    Free,
    /// ABI v2: the library's `release_bytes`, with the capacity it gave. The `Arc` keeps the
    /// library (and so `release`) mapped until the bytes are given back.
    Plugin {
        release: ReleaseBytes,
        capacity: usize,
        _library: Arc<PluginLibrary>,
    },
}

/// Bytes returned by a plugin (a string or binary result). Owned by the host until dropped, then
/// handed back to the plugin as its ABI prescribes. Validated as UTF-8 when it is a string.
///
/// Sound from safe code: a value of this type holds the library whose `release_bytes` frees it,
/// so it may outlive every function and registration of that library.
pub struct PluginBytes {
    ptr: *mut u8,
    len: usize,
    release: Release,
}

impl PluginBytes {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points at `len` bytes owned by this value until it drops (checked
        // non-null when `len > 0` on construction).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::fmt::Debug for PluginBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginBytes")
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PluginBytes {
    fn drop(&mut self) {
        match &self.release {
            // SAFETY: ABI v1 hands returned strings to the host, allocated with malloc; we own it
            // and free it exactly once (free(NULL) is a no-op).
            Release::Free => unsafe { libc::free(self.ptr.cast()) },
            Release::Plugin {
                release, capacity, ..
            } => {
                // SAFETY: ABI v2: bytes the plugin handed over are returned through its own
                // `release_bytes`, exactly once, with the parts it gave us; `_library` (dropped
                // after this) keeps that function mapped.
                unsafe {
                    release(UdfOwnedBytes {
                        ptr: self.ptr,
                        len: self.len,
                        capacity: *capacity,
                    })
                }
            }
        }
    }
}

/// Takes ownership of a v1 string result (malloc'ed, NUL-terminated), validating it.
///
/// # Safety
///
/// `ptr` must be null or a NUL-terminated string allocated with `malloc` that nobody else frees.
unsafe fn take_v1_string(ptr: *const c_char) -> Result<PluginBytes, CallError> {
    if ptr.is_null() {
        return Err(CallError::NullString);
    }
    // SAFETY: non-null and NUL-terminated per the caller's promise.
    let len = unsafe { CStr::from_ptr(ptr) }.to_bytes().len();
    // From here on `owned` frees the string, on the error path too.
    let owned = PluginBytes {
        ptr: ptr.cast_mut().cast(),
        len,
        release: Release::Free,
    };
    std::str::from_utf8(owned.as_bytes()).map_err(CallError::InvalidUtf8)?;
    Ok(owned)
}

/// Reads a v2 entrypoint's status and error message: `Ok` for OK (a message beside it is released
/// and ignored), the plugin's message for ERROR, and an error for any other status.
pub(in crate::ffi) fn check_status(
    status: i32,
    error: UdfOwnedBytes,
    release: ReleaseBytes,
    library: &Arc<PluginLibrary>,
) -> Result<(), CallError> {
    let message = (!error.ptr.is_null())
        .then(|| take_v2_bytes(error, release, library))
        .transpose();
    match status {
        v2::status::OK => Ok(()),
        v2::status::ERROR => Err(match message? {
            Some(message) => {
                CallError::Plugin(String::from_utf8_lossy(message.as_bytes()).into_owned())
            }
            None => CallError::NullErrorMessage,
        }),
        other => Err(CallError::InvalidStatus(other)),
    }
}

/// Takes ownership of v2 bytes, to be released through `release` of `library`.
pub(in crate::ffi) fn take_v2_bytes(
    bytes: UdfOwnedBytes,
    release: ReleaseBytes,
    library: &Arc<PluginLibrary>,
) -> Result<PluginBytes, CallError> {
    let owned = PluginBytes {
        ptr: bytes.ptr,
        len: bytes.len,
        release: Release::Plugin {
            release,
            capacity: bytes.capacity,
            _library: Arc::clone(library),
        },
    };
    if bytes.ptr.is_null() && bytes.len > 0 {
        // Nothing valid to release: forget it rather than hand a null pointer back.
        std::mem::forget(owned);
        return Err(CallError::NullBytes(bytes.len));
    }
    Ok(owned)
}

/// One function of a loaded library, callable row by row. Cheap to clone; keeps the library
/// loaded.
#[derive(Clone)]
pub struct PluginFunction {
    library: Arc<PluginLibrary>,
    index: usize,
}

impl std::fmt::Debug for PluginFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginFunction")
            .field("path", &self.library.path)
            .field("signature", self.signature())
            .finish()
    }
}

impl PluginFunction {
    pub(in crate::ffi) fn new(library: Arc<PluginLibrary>, index: usize) -> PluginFunction {
        PluginFunction { library, index }
    }

    /// The function's signature from the library's metadata.
    pub fn signature(&self) -> &FunctionSignature {
        &self.library.functions[self.index]
    }

    /// The function's position in its library's metadata.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The library the function comes from.
    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Whether the function has a batch (Arrow C Data Interface) entrypoint.
    pub fn has_batch(&self) -> bool {
        self.batch_entrypoint().is_some()
    }

    /// Whether the function has a row entrypoint it can be called through: not an ABI 2.2
    /// batch-only function, nor one with Arrow types.
    pub fn has_row(&self) -> bool {
        let listed = match &self.library.entrypoints {
            Entrypoints::V2 { rows, .. } => rows[self.index].is_some(),
            Entrypoints::V1(_) => true,
        };
        listed && !self.signature().has_arrow_types()
    }

    fn batch_entrypoint(&self) -> Option<BatchEntrypoint> {
        match &self.library.entrypoints {
            Entrypoints::V2 { batches, .. } => batches[self.index],
            Entrypoints::V1(_) => None,
        }
    }

    /// The error for a v1 result that is not an `Ok` value of the declared type, taking
    /// ownership of any string or message in it (freed here, so that nothing leaks).
    ///
    /// # Safety
    ///
    /// `raw` must have been returned by this function's v1 entrypoint.
    unsafe fn v1_result_error(&self, raw: RawResult) -> CallError {
        // A v1 function's types are all tags (ABI v1 has nothing else).
        let Some(expected) = self.signature().return_type.tag() else {
            return CallError::HostBug("a v1 function with an Arrow return type".into());
        };
        match raw.tag {
            RESULT_OK => {
                // SAFETY: the tag says `Ok`, so the `ok` member is the active one.
                let value = unsafe { raw.payload.ok };
                let found = UdfType::from_tag(value.tag).filter(|t| t.tag() <= UdfType::Utf8.tag());
                if found == Some(expected) {
                    return CallError::HostBug(
                        "a v1 result of the declared type was refused".into(),
                    );
                }
                if found == Some(UdfType::Utf8) {
                    // SAFETY: the tag says String, so `string` is active: a malloc'ed string
                    // handed to the host, freed here (taking it checks for null) so that a
                    // result of the wrong type does not leak.
                    drop(unsafe { take_v1_string(value.payload.string) });
                }
                CallError::ReturnType {
                    expected,
                    found: found.map_or_else(|| format!("tag {}", value.tag), |t| t.to_string()),
                }
            }
            RESULT_ERR => {
                // SAFETY: the tag says `Err`, so `err` is the active member.
                let message = unsafe { raw.payload.err };
                if message.is_null() {
                    return CallError::NullErrorMessage;
                }
                // SAFETY: a non-null message is a malloc'ed NUL-terminated string handed to us.
                let text = unsafe { CStr::from_ptr(message) }
                    .to_string_lossy()
                    .into_owned();
                // SAFETY: we own the message and free it exactly once, after copying it.
                unsafe { libc::free(message.cast()) };
                CallError::Plugin(text)
            }
            tag => CallError::InvalidResultTag(tag),
        }
    }
}

/// Checks call arguments against `signature`: their number, types the plugin reads (the
/// declared type's canonical Arrow type, or another string/binary layout), and `num_rows` rows
/// each (one for a scalar).
fn check_arguments(
    signature: &FunctionSignature,
    args: &[(datafusion::arrow::array::ArrayRef, bool)],
    num_rows: usize,
) -> Result<(), CallError> {
    if args.len() != signature.arg_types.len() {
        return Err(CallError::ArgumentCount {
            expected: signature.arg_types.len(),
            found: args.len(),
        });
    }
    for (index, ((array, scalar), param)) in args.iter().zip(&signature.arg_types).enumerate() {
        if !param.is_readable(array.data_type()) {
            return Err(CallError::ArgumentType {
                index,
                expected: param.clone(),
                found: "an array of another type",
            });
        }
        let rows = if *scalar { 1 } else { num_rows };
        if array.len() != rows {
            return Err(CallError::ArgumentRows {
                index,
                expected: rows,
                found: array.len(),
            });
        }
    }
    Ok(())
}

/// The rows the STRICT rule lets a function compute: a row with a NULL in an argument that does
/// not take NULLs is NULL without a call (the row path) or whatever the plugin wrote (the batch
/// path, which masks it).
enum Strict {
    /// A constant argument that does not take NULLs is NULL: every row is NULL.
    AllNull,
    /// The rows to compute as the valid bits; `None` when that is every row.
    Rows(Option<datafusion::arrow::buffer::NullBuffer>),
}

fn strict_rows(
    signature: &FunctionSignature,
    args: &[(datafusion::arrow::array::ArrayRef, bool)],
) -> Strict {
    let mut nulls = Vec::new();
    for ((array, scalar), &takes_null) in args.iter().zip(&signature.arg_nullable) {
        if takes_null {
            continue;
        }
        if *scalar {
            if array.is_null(0) {
                return Strict::AllNull;
            }
        } else if let Some(n) = array.logical_nulls().filter(|n| n.null_count() > 0) {
            nulls.push(n);
        }
    }
    Strict::Rows(datafusion::arrow::buffer::NullBuffer::union_many(
        nulls.iter().map(Some),
    ))
}
