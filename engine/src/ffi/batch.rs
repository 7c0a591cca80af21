//! Batch calls over the Arrow C Data Interface: export the arguments, call the plugin, and check
//! the raw `ArrowArray` / `ArrowSchema` the plugin wrote **before** arrow reads them.
//!
//! arrow's importer trusts the producer: it asserts, unwraps and dereferences whatever the structs
//! say. So every field a plugin fills is checked here first (release callbacks, the format string,
//! buffer count, pointers and alignment, children, dictionary, length, offset, null count, and
//! the offsets of string and binary results), then arrow imports the array with the declared type
//! (the plugin's schema is only compared, never parsed by arrow), then arrow's full validation runs
//! (nulls included), then the host applies the NULL rules of the row path. The import and the
//! validation run inside `catch_unwind` as a last guard: a panic there is a host bug, reported as
//! an error that says so.
//!
//! The result array's `release` callback is plugin code, so it is wrapped in one that holds an
//! `Arc` of the library until it has run: the library stays mapped exactly as long as any array it
//! produced is alive, and no longer.

use std::ffi::{CStr, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayData, ArrayRef, BooleanArray, make_array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi_and_data_type};
use udf_abi::v2::{UdfOwnedBytes, UdfType};

use super::{Entrypoints, FunctionSignature, PluginFunction, PluginLibrary, check_status};
use crate::error::CallError;
use crate::types::{arrow_type, c_format, is_readable};

/// The longest result format string read, in bytes (the longest valid one is `tsu:UTC`).
const MAX_FORMAT_LEN: usize = 64;

impl PluginFunction {
    /// Calls the batch entrypoint over whole columns: `args` are the argument arrays (of types
    /// the plugin reads: the declared type's canonical Arrow type, or another string/binary
    /// layout) with a flag for length-1 arrays that stand for every row.
    ///
    /// The result is checked field by field before it is imported (see the module
    /// documentation), then fully validated, and the row path's NULL rules are applied: a row
    /// with a NULL in an argument that does not take NULLs is NULL whatever the plugin wrote, and
    /// a NULL anywhere else is an error unless the function may return NULL.
    pub fn call_batch(
        &self,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<ArrayRef, CallError> {
        let (entrypoint, release) = match &self.library.entrypoints {
            Entrypoints::V2 {
                release, batches, ..
            } => match batches[self.index] {
                Some(entrypoint) => (entrypoint, *release),
                None => return Err(CallError::NoBatchEntrypoint),
            },
            Entrypoints::V1(_) => return Err(CallError::NoBatchEntrypoint),
        };
        let signature = self.signature();
        if args.len() != signature.arg_types.len() {
            return Err(CallError::ArgumentCount {
                expected: signature.arg_types.len(),
                found: args.len(),
            });
        }
        let mut arrays = Vec::with_capacity(args.len());
        let mut scalar_flags = Vec::with_capacity(args.len());
        let mut canonical = true;
        for (index, ((array, scalar), &param)) in args.iter().zip(&signature.arg_types).enumerate()
        {
            // The ABI promises the plugin arrays of the declared type, of `num_rows` rows (one
            // for a scalar).
            if !is_readable(array.data_type(), param) {
                return Err(CallError::ArgumentType {
                    index,
                    expected: param,
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
            canonical &= *array.data_type() == arrow_type(param);
            arrays.push(FFI_ArrowArray::new(&array.to_data()));
            scalar_flags.push(u8::from(*scalar));
        }
        // The schemas of the declared types were exported when the library was loaded; other
        // string and binary layouts (LargeUtf8, Utf8View, ...) are exported for this call.
        let exported;
        let schemas: &[FFI_ArrowSchema] = match &self.library.arg_schemas[self.index] {
            Some(cached) if canonical => &cached.0,
            _ => {
                exported = args
                    .iter()
                    .map(|(array, _)| FFI_ArrowSchema::try_from(array.data_type()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| CallError::HostBug(format!("cannot export an argument: {e}")))?;
                &exported
            }
        };
        let mut out = FFI_ArrowArray::empty();
        let mut out_schema = FFI_ArrowSchema::empty();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the entrypoint belongs to `self.library`, alive while we hold the Arc. The
        // arrays, schemas and flags are `args.len()` valid C Data Interface structs of the
        // declared types and row counts (checked above); the plugin may move the arrays out (it
        // leaves released ones, which drop as no-ops; arrays it left in place are released when
        // `arrays` drops); `out`, `out_schema` and `error` are valid for writes.
        let status = unsafe {
            entrypoint(
                arrays.as_mut_ptr(),
                schemas.as_ptr(),
                scalar_flags.as_ptr(),
                args.len(),
                num_rows,
                &mut out,
                &mut out_schema,
                &mut error,
            )
        };
        drop(arrays);
        // From here on, `out` and `out_schema` are released (through the plugin's callbacks) on
        // every return path, while `self` still holds the library.
        check_status(status, error, release, &self.library)?;
        let return_type = signature.return_type;
        check_result_schema(&out_schema, return_type)?;
        drop(out_schema);
        check_result_array(&out, return_type, num_rows)?;
        hold_library(&mut out, &self.library);
        let expected = arrow_type(return_type);
        let imported = catch_unwind(AssertUnwindSafe(move || {
            // SAFETY: `out` is an unreleased array whose every field was checked above against
            // the layout of `expected` (buffer count, non-null and aligned buffers, no children or
            // dictionary, offsets in order); what cannot be checked is that each buffer is as long
            // as the layout says (the C Data Interface carries no buffer sizes).
            let data = unsafe { from_ffi_and_data_type(out, expected) }
                .map_err(|e| CallError::InvalidResult(format!("cannot import the array: {e}")))?;
            validate_result(&data).map_err(CallError::InvalidResult)?;
            Ok::<_, CallError>(data)
        }));
        let data = match imported {
            Ok(data) => data?,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(CallError::HostBug(format!(
                    "importing the batch result panicked: {message}"
                )));
            }
        };
        apply_null_rules(make_array(data), args, signature)
    }
}

/// An invalid batch result, described.
fn invalid(what: impl Into<String>) -> CallError {
    CallError::InvalidResult(what.into())
}

/// Checks the result schema: filled in, not released, and exactly the declared type's format with
/// no children and no dictionary. Its name and metadata are never read.
fn check_result_schema(schema: &FFI_ArrowSchema, declared: UdfType) -> Result<(), CallError> {
    if schema.release.is_none() {
        return Err(invalid(
            "the result schema has no release callback (not filled in, or already released)",
        ));
    }
    let format = read_format(schema.format)?;
    let expected = c_format(declared);
    if format != expected {
        return Err(CallError::ResultType {
            declared,
            expected_format: expected,
            found_format: format,
        });
    }
    if schema.n_children != 0 {
        return Err(invalid(format!(
            "the result schema has {} children, a {declared} has none",
            schema.n_children
        )));
    }
    if !schema.dictionary.is_null() {
        return Err(invalid(
            "the result schema has a dictionary, but the function declares no dictionary type",
        ));
    }
    Ok(())
}

/// The format string of a schema, read with a bound.
fn read_format(format: *const c_char) -> Result<String, CallError> {
    if format.is_null() {
        return Err(invalid("the result schema's format is a null pointer"));
    }
    // SAFETY: non-null; the C Data Interface says it is a NUL-terminated string owned by the
    // schema, which is alive. `strnlen` reads at most MAX_FORMAT_LEN + 1 bytes.
    let len = unsafe { libc::strnlen(format, MAX_FORMAT_LEN + 1) };
    if len > MAX_FORMAT_LEN {
        return Err(invalid(format!(
            "the result schema's format is not NUL-terminated within {MAX_FORMAT_LEN} bytes"
        )));
    }
    // SAFETY: `len` bytes before the NUL were just measured.
    let bytes = unsafe { CStr::from_ptr(format) }.to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        invalid(format!(
            "the result schema's format is not UTF-8 (bytes {:?})",
            e.as_bytes()
        ))
    })
}

/// The buffers an array of `t` has in the C Data Interface, and the alignment each needs.
fn layout(t: UdfType) -> &'static [usize] {
    // Validity bitmap first (any alignment), then the type's buffers.
    match t {
        UdfType::Bool => &[1, 1],
        UdfType::Int32 | UdfType::Float32 | UdfType::Date32 => &[1, 4],
        UdfType::Int64 | UdfType::UInt64 | UdfType::Float64 | UdfType::TimestampMicros => &[1, 8],
        // Validity, i32 offsets, value bytes.
        UdfType::Utf8 | UdfType::Binary => &[1, 4, 1],
    }
}

/// Checks every field of the result array before arrow reads it.
fn check_result_array(
    array: &FFI_ArrowArray,
    declared: UdfType,
    num_rows: usize,
) -> Result<(), CallError> {
    if array.release.is_none() {
        return Err(invalid(
            "the result array has no release callback (not filled in, or already released)",
        ));
    }
    if usize::try_from(array.length).ok() != Some(num_rows) {
        return Err(invalid(format!(
            "the result has {} rows, {num_rows} expected",
            array.length
        )));
    }
    let Ok(offset) = usize::try_from(array.offset) else {
        return Err(invalid(format!(
            "the result array's offset is negative ({})",
            array.offset
        )));
    };
    if offset
        .checked_add(num_rows)
        .is_none_or(|end| end > i32::MAX as usize)
    {
        return Err(invalid(format!(
            "the result array's offset {offset} plus its {num_rows} rows is out of range"
        )));
    }
    if array.null_count < -1 || array.null_count > array.length {
        return Err(invalid(format!(
            "the result array's null_count {} is not in -1..={}",
            array.null_count, array.length
        )));
    }
    if array.n_children != 0 {
        return Err(invalid(format!(
            "the result array has {} children, a {declared} has none",
            array.n_children
        )));
    }
    if !array.dictionary.is_null() {
        return Err(invalid("the result array has a dictionary"));
    }
    let layout = layout(declared);
    if usize::try_from(array.n_buffers).ok() != Some(layout.len()) {
        return Err(invalid(format!(
            "the result array has {} buffers, a {declared} array has {}",
            array.n_buffers,
            layout.len()
        )));
    }
    if array.buffers.is_null() {
        return Err(invalid(
            "the result array's buffers pointer is null, but it has buffers",
        ));
    }
    let mut pointers = [std::ptr::null::<c_void>(); 3];
    for (i, pointer) in pointers.iter_mut().enumerate().take(layout.len()) {
        // SAFETY: non-null, and the C Data Interface says it points at `n_buffers` pointers,
        // which was checked to be `layout.len()`; the read is unaligned-tolerant.
        *pointer = unsafe {
            array
                .buffers
                .cast::<*const c_void>()
                .add(i)
                .read_unaligned()
        };
    }
    if pointers[0].is_null() && array.null_count > 0 {
        return Err(invalid(format!(
            "the result array has {} NULLs but no validity bitmap",
            array.null_count
        )));
    }
    for (i, (&pointer, &align)) in pointers.iter().zip(layout).enumerate().skip(1) {
        if pointer.is_null() {
            return Err(invalid(format!(
                "the result array's buffer {i} is a null pointer"
            )));
        }
        if !(pointer as usize).is_multiple_of(align) {
            return Err(invalid(format!(
                "the result array's buffer {i} is not aligned to {align} bytes"
            )));
        }
    }
    if matches!(declared, UdfType::Utf8 | UdfType::Binary) {
        // arrow reads offset `end` to size the values buffer, and validation reads the window
        // `offset..=end`: all of them must be non-negative and in order.
        // SAFETY: non-null and aligned for i32 (checked above); the C Data Interface says the
        // offsets buffer of a string or binary array holds `offset + length + 1` offsets.
        let offsets = unsafe {
            std::slice::from_raw_parts(pointers[1].cast::<i32>().add(offset), num_rows + 1)
        };
        let decreasing = offsets
            .iter()
            .zip(&offsets[1..])
            .fold(false, |bad, (a, b)| bad | (a > b));
        if offsets[0] < 0 || decreasing {
            return Err(invalid(
                "the result's offsets are negative or not monotonically increasing",
            ));
        }
    }
    Ok(())
}

/// The schemas of a function's declared argument types, exported once when its library is
/// loaded and lent to every batch call (the ABI lends them for the call: the plugin reads them
/// and never releases or changes them).
pub(super) struct ArgSchemas(Box<[FFI_ArrowSchema]>);

// SAFETY: the schemas are never written after `ArgSchemas::new` and only ever passed to plugins
// as `const` pointers (the ABI borrows them read-only for a call), so sharing them between
// threads shares immutable data; they are released once, when the library drops.
unsafe impl Sync for ArgSchemas {}

impl ArgSchemas {
    /// The canonical schemas of `signature`'s arguments; `None` if one cannot be exported.
    pub(super) fn new(signature: &FunctionSignature) -> Option<ArgSchemas> {
        signature
            .arg_types
            .iter()
            .map(|&t| FFI_ArrowSchema::try_from(&arrow_type(t)).ok())
            .collect::<Option<Vec<_>>>()
            .map(|schemas| ArgSchemas(schemas.into_boxed_slice()))
    }
}

/// What a result array's `release` callback needs: the plugin's callback and private data, and
/// the library that callback lives in.
struct HeldRelease {
    release: unsafe extern "C" fn(*mut FFI_ArrowArray),
    private_data: *mut c_void,
    _library: Arc<PluginLibrary>,
}

/// Makes `array` hold an `Arc` of `library` until it is released: its `release` callback becomes
/// [`release_holding_library`], which calls the plugin's own and then lets the library go.
fn hold_library(array: &mut FFI_ArrowArray, library: &Arc<PluginLibrary>) {
    let Some(release) = array.release else {
        return;
    };
    let held = Box::new(HeldRelease {
        release,
        private_data: array.private_data,
        _library: Arc::clone(library),
    });
    array.private_data = Box::into_raw(held).cast();
    array.release = Some(release_holding_library);
}

/// The `release` callback installed by [`hold_library`].
///
/// # Safety
///
/// `array` must be an array prepared by [`hold_library`] and not yet released (arrow calls it
/// exactly once, when the last buffer of the imported array drops).
unsafe extern "C" fn release_holding_library(array: *mut FFI_ArrowArray) {
    if array.is_null() {
        return;
    }
    // SAFETY: the caller passes the array being released, valid for reads and writes.
    let array = unsafe { &mut *array };
    if array.private_data.is_null() {
        array.release = None;
        return;
    }
    // SAFETY: `private_data` was set by `hold_library` from `Box::into_raw` and is taken back
    // exactly once, here.
    let held = unsafe { Box::from_raw(array.private_data.cast::<HeldRelease>()) };
    array.private_data = held.private_data;
    array.release = Some(held.release);
    // SAFETY: the plugin's own callback, with the struct as the plugin filled it; the library is
    // mapped (`held` holds it) until after the call.
    unsafe { (held.release)(array) };
    array.release = None;
    // Last: this may unmap the library whose callback just returned.
    drop(held);
}

/// The row path's NULL rules, applied to a batch result.
///
/// * STRICT: a row with a NULL in an argument that does not take NULLs is NULL, whatever the
///   plugin wrote there (the row path never calls the plugin for it).
/// * A function declared never to return NULL must not return NULL in any other row (the row path
///   refuses the same result), whether or not a nullable argument is NULL there.
fn apply_null_rules(
    result: ArrayRef,
    args: &[(ArrayRef, bool)],
    signature: &FunctionSignature,
) -> Result<ArrayRef, CallError> {
    let len = result.len();
    let mut strict = Vec::new();
    for ((array, scalar), &takes_null) in args.iter().zip(&signature.arg_nullable) {
        if takes_null {
            continue;
        }
        if *scalar {
            if array.is_null(0) {
                return Ok(datafusion::arrow::array::new_null_array(
                    result.data_type(),
                    len,
                ));
            }
        } else if let Some(nulls) = array.logical_nulls().filter(|n| n.null_count() > 0) {
            strict.push(nulls);
        }
    }
    // Rows where some argument that does not take NULLs is NULL.
    let strict = NullBuffer::union_many(strict.iter().map(Some));
    if !signature.return_nullable
        && let Some(result_nulls) = result.logical_nulls().filter(|n| n.null_count() > 0)
    {
        let unexplained = match &strict {
            None => result_nulls.null_count(),
            Some(strict) => (strict.inner() & &!result_nulls.inner()).count_set_bits(),
        };
        if unexplained > 0 {
            return Err(CallError::UndeclaredNulls { rows: unexplained });
        }
    }
    let Some(strict) = strict else {
        return Ok(result);
    };
    let mask = BooleanArray::new(!strict.inner(), None);
    datafusion::arrow::compute::nullif(&result, &mask)
        .map_err(|e| CallError::HostBug(format!("cannot apply the STRICT NULL mask: {e}")))
}

/// Full validation of a batch result. For `Utf8` it checks the structure and the NULLs as arrow
/// does, and then the UTF-8 of the whole values buffer at once plus a char boundary at every
/// offset, which is equivalent to arrow's per-value check and several times faster on long
/// columns.
fn validate_result(data: &ArrayData) -> Result<(), String> {
    if *data.data_type() != datafusion::arrow::datatypes::DataType::Utf8 {
        return data.validate_full().map_err(|e| e.to_string());
    }
    data.validate().map_err(|e| e.to_string())?;
    data.validate_nulls().map_err(|e| e.to_string())?;
    let buffers = data.buffers();
    let offsets: &[i32] = buffers[0].typed_data::<i32>();
    let offsets = &offsets[data.offset()..data.offset() + data.len() + 1];
    let values = buffers[1].as_slice();
    // Branch-free folds: these run over every offset of every batch, and LLVM vectorises them.
    let decreasing = offsets[..data.len()]
        .iter()
        .zip(&offsets[1..])
        .fold(false, |bad, (a, b)| bad | (a > b));
    if offsets[0] < 0 || decreasing {
        return Err("offsets are not monotonically increasing".to_string());
    }
    let (first, last) = (offsets[0] as usize, offsets[data.len()] as usize);
    if last > values.len() {
        return Err(format!(
            "offset {last} is beyond the {} bytes of values",
            values.len()
        ));
    }
    let values = &values[first..last];
    // ASCII (the common case, and checked about twice as fast as UTF-8) is valid UTF-8 in which
    // every offset is a character boundary.
    if values.is_ascii() {
        return Ok(());
    }
    let text = std::str::from_utf8(values).map_err(|e| format!("invalid UTF-8: {e}"))?;
    let split = offsets.iter().fold(false, |bad, &o| {
        bad | !text.is_char_boundary(o as usize - first)
    });
    if split {
        return Err("an offset splits a UTF-8 character".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::ArrayData;
    use datafusion::arrow::buffer::Buffer;
    use datafusion::arrow::datatypes::DataType;

    use super::*;

    fn utf8(offsets: &[i32], values: &[u8]) -> ArrayData {
        let builder = ArrayData::builder(DataType::Utf8)
            .len(offsets.len() - 1)
            .add_buffer(Buffer::from_slice_ref(offsets))
            .add_buffer(Buffer::from_slice_ref(values));
        // SAFETY: the point is to build arrays that may be invalid; `validate_result` must only
        // read within the buffers, which hold `len + 1` offsets and the given values.
        unsafe { builder.build_unchecked() }
    }

    #[test]
    fn string_results_are_validated_like_arrow_does() {
        assert!(validate_result(&utf8(&[0, 1, 3], "aé".as_bytes())).is_ok());
        assert!(validate_result(&utf8(&[0, 0], b"")).is_ok());
        let bad_utf8 = validate_result(&utf8(&[0, 2], b"a\xff")).unwrap_err();
        assert!(bad_utf8.contains("invalid UTF-8"), "{bad_utf8}");
        let split = validate_result(&utf8(&[0, 2, 3], "aé".as_bytes())).unwrap_err();
        assert!(split.contains("splits a UTF-8 character"), "{split}");
        assert!(validate_result(&utf8(&[0, 3, 1], b"abc")).is_err());
        assert!(validate_result(&utf8(&[0, 2, 1, 3], b"abc")).is_err());
        assert!(validate_result(&utf8(&[-1, 3], b"abc")).is_err());
        // ASCII values take the short path; a NUL byte is valid UTF-8.
        assert!(validate_result(&utf8(&[0, 1, 3], b"a\0c")).is_ok());
        assert!(validate_result(&utf8(&[0, 9], b"abc")).is_err());
    }

    #[test]
    fn string_results_with_a_wrong_null_count_are_refused() {
        let data = ArrayData::builder(DataType::Utf8)
            .len(2)
            .add_buffer(Buffer::from_slice_ref([0i32, 1, 2]))
            .add_buffer(Buffer::from_slice_ref(b"ab"))
            .null_bit_buffer(Some(Buffer::from_slice_ref([0b11u8])))
            .null_count(1);
        // SAFETY: deliberately inconsistent null count; only validated, never read as values.
        let data = unsafe { data.build_unchecked() };
        let e = validate_result(&data).unwrap_err();
        assert!(e.contains("null"), "{e}");
    }
}
