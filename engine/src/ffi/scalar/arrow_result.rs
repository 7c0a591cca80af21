//! Batch results of the Arrow types ABI 2.2 declares by type strings, nested ones included:
//! every field of the plugin's `ArrowSchema` and `ArrowArray` trees is checked against the
//! declared [`DataType`] **before** arrow's importer reads them (it asserts and dereferences what
//! the structs say), then arrow imports the array, then arrow's full validation and a decimal
//! precision check run.
//!
//! What is checked, at every level: the release callback, length (exact at the top; a child at
//! least as long as its parent's offsets or rows need), offset, null count, no dictionary, the
//! number of buffers and that each is non-null and aligned for its values, the number of children
//! and that each is there, the offsets of strings, binaries and lists (non-negative, in order,
//! the last within the child's length), and the sizes of a view array's data buffers. The schema
//! tree must describe the declared type (list items may have any name). What cannot be checked
//! is that each buffer is as long as its layout says: the C Data Interface carries no sizes.
//!
//! The imported array owns the plugin's array through a host-made parent whose `release` drops
//! the plugin's array (running the plugin's callback) and then the library's `Arc`, so the
//! library stays mapped exactly as long as any buffer of the result lives.

use std::ffi::{CStr, c_void};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayData, BufferSpec, layout};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{
    ArrowNativeType, DataType, Decimal128Type, DecimalType, Field, Fields,
};
use datafusion::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi_and_data_type};

use super::PluginLibrary;
use crate::error::CallError;
use crate::types::ValueType;
use crate::types::arrow::{MAX_DEPTH, MAX_FIELD_NAME_LEN, MAX_FIELDS, result_matches, type_string};

/// The longest format string read from a result schema, in bytes.
const MAX_FORMAT_LEN: usize = 256;

fn invalid(what: impl Into<String>) -> CallError {
    CallError::InvalidResult(what.into())
}

/// Where in the result a problem is: "the result" or "the result's child 2 of child 0".
fn at(path: &str) -> String {
    if path.is_empty() {
        "the result".to_string()
    } else {
        format!("the result's {path}")
    }
}

fn child_path(path: &str, i: usize) -> String {
    if path.is_empty() {
        format!("child {i}")
    } else {
        format!("child {i} of {path}")
    }
}

/// Reads a NUL-terminated string of a schema with a bound; `what` names it for errors.
fn bounded_str<'a>(
    pointer: *const std::ffi::c_char,
    max: usize,
    what: &str,
) -> Result<&'a str, CallError> {
    if pointer.is_null() {
        return Err(invalid(format!("{what} is a null pointer")));
    }
    // SAFETY: non-null; the C Data Interface says it is a NUL-terminated string owned by the
    // schema, which is alive while the caller holds it. `strnlen` reads at most `max + 1` bytes.
    let len = unsafe { libc::strnlen(pointer, max + 1) };
    if len > max {
        return Err(invalid(format!(
            "{what} is not NUL-terminated within {max} bytes"
        )));
    }
    // SAFETY: `len` bytes before the NUL were just measured.
    let bytes = unsafe { CStr::from_ptr(pointer) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|_| invalid(format!("{what} is not UTF-8 ({bytes:?})")))
}

/// The children of a schema or array: `n` non-null pointers, checked.
fn children<'a, T>(pointer: *mut *mut T, n: i64, what: &str) -> Result<Vec<&'a T>, CallError> {
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_FIELDS)
        .ok_or_else(|| invalid(format!("{what} has {n} children")))?;
    if n == 0 {
        return Ok(Vec::new());
    }
    if pointer.is_null() {
        return Err(invalid(format!(
            "{what} has {n} children but its children pointer is null"
        )));
    }
    (0..n)
        .map(|i| {
            // SAFETY: non-null, and the C Data Interface says it points at `n_children` (bounded
            // above) child pointers.
            let child = unsafe { pointer.add(i).read() };
            if child.is_null() {
                return Err(invalid(format!("{what}'s child {i} is a null pointer")));
            }
            // SAFETY: non-null; a child struct of the plugin's tree, alive while its parent is.
            Ok(unsafe { &*child })
        })
        .collect()
}

/// The type a result schema describes, read with bounds at every level.
fn schema_type(schema: &FFI_ArrowSchema, path: &str, depth: usize) -> Result<DataType, CallError> {
    if depth > MAX_DEPTH + 1 {
        return Err(invalid(format!(
            "{} nests deeper than {MAX_DEPTH} levels",
            at(path)
        )));
    }
    let what = format!("{} schema", at(path));
    if schema.release.is_none() {
        return Err(invalid(format!(
            "{what} has no release callback (not filled in, or already released)"
        )));
    }
    if !schema.dictionary.is_null() {
        return Err(invalid(format!(
            "{what} has a dictionary; a declared type is never dictionary-encoded"
        )));
    }
    let format = bounded_str(schema.format, MAX_FORMAT_LEN, &format!("{what}'s format"))?;
    let kids = children(schema.children, schema.n_children, &what)?;
    let child = |i: usize| schema_type(kids[i], &child_path(path, i), depth + 1);
    let one_child = |large: bool| -> Result<DataType, CallError> {
        if kids.len() != 1 {
            return Err(invalid(format!(
                "{what} is a list with {} children, a list has 1",
                kids.len()
            )));
        }
        let item = Arc::new(Field::new("item", child(0)?, true));
        Ok(if large {
            DataType::LargeList(item)
        } else {
            DataType::List(item)
        })
    };
    match format {
        "+l" => one_child(false),
        "+L" => one_child(true),
        "+s" => {
            let fields = kids
                .iter()
                .enumerate()
                .map(|(i, kid)| {
                    let name = bounded_str(
                        kid.name,
                        MAX_FIELD_NAME_LEN,
                        &format!("{what}'s field {i} name"),
                    )?;
                    Ok(Field::new(name, child(i)?, true))
                })
                .collect::<Result<Vec<_>, CallError>>()?;
            Ok(DataType::Struct(Fields::from(fields)))
        }
        primitive => {
            if !kids.is_empty() {
                return Err(invalid(format!(
                    "{what} has format \"{primitive}\" and {} children; it has none",
                    kids.len()
                )));
            }
            crate::types::arrow::parse(primitive).map_err(|_| {
                invalid(format!(
                    "{what} has format \"{primitive}\", which is not a type of the ABI"
                ))
            })
        }
    }
}

/// Reads `count` offsets of width `W` (i32 or i64) at `pointer[offset..]` and checks they are
/// non-negative and in order; returns the last one.
///
/// # Safety
///
/// `pointer` must be non-null, aligned for `W` and point at least `offset + count` offsets.
unsafe fn checked_offsets<W: Copy + Into<i64>>(
    pointer: *const c_void,
    offset: usize,
    count: usize,
    what: &str,
) -> Result<usize, CallError> {
    // SAFETY: the caller's promise.
    let offsets = unsafe { std::slice::from_raw_parts(pointer.cast::<W>().add(offset), count) };
    let mut previous = 0i64;
    for (i, &o) in offsets.iter().enumerate() {
        let o: i64 = o.into();
        if o < 0 || (i > 0 && o < previous) {
            return Err(invalid(format!(
                "{what}'s offsets are negative or not monotonically increasing"
            )));
        }
        previous = o;
    }
    usize::try_from(previous)
        .ok()
        .filter(|&last| last <= i32::MAX as usize * 2)
        .ok_or_else(|| invalid(format!("{what}'s last offset {previous} is out of range")))
}

/// Checks one array of the result tree against `t`: `rows` is the exact length at the top
/// (`exact`), or the least length a child needs.
fn check_array(
    array: &FFI_ArrowArray,
    t: &DataType,
    rows: usize,
    exact: bool,
    path: &str,
    depth: usize,
) -> Result<(), CallError> {
    let what = format!("{} array", at(path));
    if depth > MAX_DEPTH + 1 {
        return Err(invalid(format!("{what} nests too deep")));
    }
    if array.release.is_none() {
        return Err(invalid(format!(
            "{what} has no release callback (not filled in, or already released)"
        )));
    }
    let length = usize::try_from(array.length)
        .map_err(|_| invalid(format!("{what}'s length is negative ({})", array.length)))?;
    if (exact && length != rows) || length < rows {
        return Err(invalid(format!(
            "{what} has {length} rows, {}{rows} expected",
            if exact { "" } else { "at least " }
        )));
    }
    let offset = usize::try_from(array.offset)
        .map_err(|_| invalid(format!("{what}'s offset is negative ({})", array.offset)))?;
    let end = offset
        .checked_add(length)
        .filter(|&end| end <= i32::MAX as usize)
        .ok_or_else(|| {
            invalid(format!(
                "{what}'s offset {offset} plus its {length} rows is out of range"
            ))
        })?;
    if array.null_count < -1 || array.null_count > array.length {
        return Err(invalid(format!(
            "{what}'s null_count {} is not in -1..={}",
            array.null_count, array.length
        )));
    }
    if !array.dictionary.is_null() {
        return Err(invalid(format!("{what} has a dictionary")));
    }
    let spec = layout(t);
    let fixed = 1 + spec.buffers.len();
    let n_buffers = usize::try_from(array.n_buffers).unwrap_or(usize::MAX);
    let buffers_ok = if spec.variadic {
        (fixed + 1..=fixed + 1 + MAX_FIELDS).contains(&n_buffers)
    } else {
        n_buffers == fixed
    };
    if !buffers_ok {
        return Err(invalid(format!(
            "{what} has {} buffers, a {t} array has {}{fixed}",
            array.n_buffers,
            if spec.variadic { "more than " } else { "" }
        )));
    }
    if array.buffers.is_null() {
        return Err(invalid(format!(
            "{what}'s buffers pointer is null, but it has buffers"
        )));
    }
    let pointers: Vec<*const c_void> = (0..n_buffers)
        // SAFETY: non-null, and the C Data Interface says it points at `n_buffers` pointers.
        .map(|i| unsafe {
            array
                .buffers
                .cast::<*const c_void>()
                .add(i)
                .read_unaligned()
        })
        .collect();
    if pointers[0].is_null() && array.null_count > 0 {
        return Err(invalid(format!(
            "{what} has {} NULLs but no validity bitmap",
            array.null_count
        )));
    }
    for (i, &pointer) in pointers.iter().enumerate().skip(1) {
        if pointer.is_null() {
            return Err(invalid(format!("{what}'s buffer {i} is a null pointer")));
        }
        let align = match spec.buffers.get(i - 1) {
            Some(BufferSpec::FixedWidth { alignment, .. }) => *alignment,
            // Variadic data buffers are bytes; the last one holds i64 sizes.
            None if i == n_buffers - 1 => 8,
            _ => 1,
        };
        if !(pointer as usize).is_multiple_of(align) {
            return Err(invalid(format!(
                "{what}'s buffer {i} is not aligned to {align} bytes"
            )));
        }
    }
    // Offsets: strings and binaries (the values' length is the last offset), lists (the child's).
    let window = length + 1;
    let last = match t {
        DataType::Utf8 | DataType::Binary | DataType::List(_) => {
            // SAFETY: non-null and aligned for i32 (checked above); the C Data Interface says an
            // offsets buffer holds `offset + length + 1` offsets.
            Some(unsafe { checked_offsets::<i32>(pointers[1], offset, window, &what) }?)
        }
        DataType::LargeUtf8 | DataType::LargeBinary | DataType::LargeList(_) => {
            // SAFETY: as above, for i64 offsets (aligned to 8, checked above).
            Some(unsafe { checked_offsets::<i64>(pointers[1], offset, window, &what) }?)
        }
        _ => None,
    };
    if spec.variadic {
        let data_buffers = n_buffers - 3;
        // SAFETY: the last buffer is non-null and aligned for i64 (checked above) and, per the C
        // Data Interface, holds the sizes of the `n_buffers - 3` data buffers.
        let sizes = unsafe {
            std::slice::from_raw_parts(pointers[n_buffers - 1].cast::<i64>(), data_buffers)
        };
        if let Some(bad) = sizes.iter().find(|&&s| s < 0) {
            return Err(invalid(format!(
                "{what} says a data buffer has {bad} bytes"
            )));
        }
    }
    let kids = children(array.children, array.n_children, &what)?;
    let expected_children: Vec<(&DataType, usize)> = match t {
        DataType::List(item) | DataType::LargeList(item) => {
            vec![(item.data_type(), last.unwrap_or(0))]
        }
        DataType::Struct(fields) => fields.iter().map(|f| (f.data_type(), end)).collect(),
        _ => Vec::new(),
    };
    if kids.len() != expected_children.len() {
        return Err(invalid(format!(
            "{what} has {} children, a {} array has {}",
            kids.len(),
            crate::types::arrow::sql_name(t),
            expected_children.len()
        )));
    }
    for (i, (kid, (child_type, needed))) in kids.iter().zip(expected_children).enumerate() {
        check_array(
            kid,
            child_type,
            needed,
            false,
            &child_path(path, i),
            depth + 1,
        )?;
    }
    Ok(())
}

/// What the host's parent array owns: the plugin's array, then its library.
struct Held {
    // Fields drop in declaration order: the plugin's array (its release callback) first.
    _array: FFI_ArrowArray,
    _library: Arc<PluginLibrary>,
}

/// The release callback of the host's parent array: drops [`Held`] (the plugin's array, whose
/// release is plugin code, then the library).
///
/// # Safety
///
/// `array` must be null or an array made by [`hold`], released once.
unsafe extern "C" fn release_held(array: *mut FFI_ArrowArray) {
    if array.is_null() {
        return;
    }
    // SAFETY: non-null, and the importer passes the array it releases.
    let array = unsafe { &mut *array };
    if !array.private_data.is_null() {
        // SAFETY: set by `hold` from `Box::into_raw` of a `Held`, taken back once (cleared below).
        drop(unsafe { Box::from_raw(array.private_data.cast::<Held>()) });
    }
    array.private_data = std::ptr::null_mut();
    array.release = None;
}

/// A host-made array with the plugin's fields, owning the plugin's array and the library.
fn hold(array: FFI_ArrowArray, library: Arc<PluginLibrary>) -> FFI_ArrowArray {
    let (length, null_count, offset) = (array.length, array.null_count, array.offset);
    let (n_buffers, n_children) = (array.n_buffers, array.n_children);
    let (buffers, children, dictionary) = (array.buffers, array.children, array.dictionary);
    let held = Box::into_raw(Box::new(Held {
        _array: array,
        _library: library,
    }));
    FFI_ArrowArray {
        length,
        null_count,
        offset,
        n_buffers,
        n_children,
        // These point into the plugin's array, which `held` keeps unreleased until this array is.
        buffers,
        children,
        dictionary,
        release: Some(release_held),
        private_data: held.cast(),
    }
}

/// A decimal value over its declared precision: where it is, from the innermost level out
/// ("list item 2", "field \"price\"", then the row), and what it is.
struct WideDecimal {
    /// Its index in the array being looked at (0-based, from the array's offset).
    index: usize,
    /// The levels inside that element that lead to the value, innermost first.
    inside: Vec<String>,
    value: i128,
    data_type: DataType,
}

/// A buffer's values, when it is aligned for them and holds whole ones (`typed_data` asserts
/// both).
fn typed<T: ArrowNativeType>(buffer: &Buffer) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    let aligned = buffer.as_ptr().align_offset(std::mem::align_of::<T>()) == 0;
    (aligned && buffer.len().is_multiple_of(size)).then(|| buffer.typed_data::<T>())
}

/// The first decimal value over its declared precision among elements `start..start + len` of
/// `data` (counted from its offset; only the valid values, at every level those elements reach).
/// Windows are passed down rather than sliced: a struct's children line up with its elements from
/// its offset on, as arrow's `StructArray` reads them. Reads are bounded (`get`), so data that
/// escaped validation gives `None`, never a panic.
fn wide_decimal(data: &ArrayData, start: usize, len: usize) -> Option<WideDecimal> {
    let first = data.offset().checked_add(start)?;
    match data.data_type() {
        DataType::Decimal128(precision, _) => {
            let values = typed::<i128>(data.buffers().first()?)?;
            let values = values.get(first..first.checked_add(len)?)?;
            values.iter().enumerate().find_map(|(row, &v)| {
                let fits = Decimal128Type::validate_decimal_precision(v, *precision, 0).is_ok();
                (data.is_valid(start + row) && !fits).then(|| WideDecimal {
                    index: row,
                    inside: Vec::new(),
                    value: v,
                    data_type: data.data_type().clone(),
                })
            })
        }
        DataType::List(_) => {
            let offsets = typed::<i32>(data.buffers().first()?)?;
            wide_list_item(data, offsets.get(first..=first.checked_add(len)?)?)
        }
        DataType::LargeList(_) => {
            let offsets = typed::<i64>(data.buffers().first()?)?;
            wide_list_item(data, offsets.get(first..=first.checked_add(len)?)?)
        }
        DataType::Struct(fields) => {
            fields
                .iter()
                .zip(data.child_data())
                .find_map(|(field, child)| {
                    let mut wide = wide_decimal(child, first, len)?;
                    wide.inside.push(format!("field \"{}\"", field.name()));
                    Some(wide)
                })
        }
        _ => None,
    }
}

/// [`wide_decimal`] of the items a list's elements reach (`offsets`: one per element and one
/// more), located by element and item.
fn wide_list_item<O: Copy + TryInto<usize>>(
    data: &ArrayData,
    offsets: &[O],
) -> Option<WideDecimal> {
    let offsets: Vec<usize> = offsets
        .iter()
        .map(|&o| o.try_into().ok())
        .collect::<Option<_>>()?;
    let (first, last) = (*offsets.first()?, *offsets.last()?);
    let child = data.child_data().first()?;
    let mut wide = wide_decimal(child, first, last.checked_sub(first)?)?;
    let item = first + wide.index;
    // The element whose window `offsets[row]..offsets[row + 1]` holds the item.
    let row = offsets.partition_point(|&o| o <= item).saturating_sub(1);
    wide.inside
        .push(format!("list item {}", item - offsets[row]));
    wide.index = row;
    Some(wide)
}

/// Decimal values within their declared precision, at every level; the error says where the
/// first one that is not is: "row 3", "list item 1 of row 3", "field \"d\" of list item 0 of
/// row 2".
pub(super) fn check_decimals(data: &ArrayData) -> Result<(), CallError> {
    let Some(wide) = wide_decimal(data, 0, data.len()) else {
        return Ok(());
    };
    let DataType::Decimal128(precision, _) = wide.data_type else {
        return Ok(());
    };
    let mut place = String::new();
    for level in &wide.inside {
        place.push_str(level);
        place.push_str(" of ");
    }
    Err(invalid(format!(
        "{place}row {} holds {} (unscaled), which has more than the {precision} digits of the \
         declared {}",
        wide.index,
        wide.value,
        crate::types::arrow::sql_name(&wide.data_type)
    )))
}

/// Checks, imports and validates a result of the declared Arrow type `declared`. `out` and
/// `out_schema` are released on every path (through the plugin's callbacks).
pub(in crate::ffi) fn import_result(
    out: FFI_ArrowArray,
    out_schema: FFI_ArrowSchema,
    declared: &DataType,
    num_rows: usize,
    library: Arc<PluginLibrary>,
) -> Result<ArrayData, CallError> {
    let found = schema_type(&out_schema, "", 0)?;
    drop(out_schema);
    if !result_matches(declared, &found) {
        let expected_format = type_string(declared).unwrap_or_default();
        return Err(CallError::ResultType {
            declared: ValueType::Arrow(declared.clone()),
            expected_format,
            found_format: type_string(&found).unwrap_or_else(|| found.to_string()),
        });
    }
    check_array(&out, declared, num_rows, true, "", 0)?;
    let parent = hold(out, library);
    let declared = declared.clone();
    let imported = std::panic::catch_unwind(move || {
        // SAFETY: every field of the tree was checked against `declared` above (buffer counts,
        // non-null aligned buffers, children, offsets within their child's length), and `parent`
        // is an unreleased array that owns the plugin's; what cannot be checked is each buffer's
        // size, which the C Data Interface does not carry.
        let data = unsafe { from_ffi_and_data_type(parent, declared) }
            .map_err(|e| invalid(format!("arrow could not import it: {e}")))?;
        super::batch::check_result_data(&data)?;
        Ok::<_, CallError>(data)
    });
    match imported {
        Ok(result) => result,
        Err(panic) => Err(CallError::HostBug(format!(
            "importing the batch result panicked: {}",
            super::batch::panic_text(&panic)
        ))),
    }
}
