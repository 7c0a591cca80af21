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
//! The result array's `release` callback is plugin code, so the imported buffers are owned by one
//! allocation that holds the plugin's array and an `Arc` of the library ([`PluginArray`]): when
//! the last buffer drops, the plugin's callback runs and then the library is let go. The library
//! stays mapped exactly as long as any array it produced is alive, and no longer.
//!
//! The per-call cost is kept to what the checks need: the argument structs live on the stack (up
//! to [`INLINE_ARGS`] arguments), argument schemas are exported once (per function for the
//! declared types, per process for the other string and binary layouts), an argument array is
//! exported with one allocation and a result imported with one besides arrow's buffers, and the
//! NULL rules return at once when no argument and no result row is NULL.

use std::ffi::{CStr, c_void};
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayData, ArrayRef, AsArray, BooleanArray, PrimitiveArray, make_array,
};
use datafusion::arrow::buffer::{BooleanBuffer, Buffer, MutableBuffer, NullBuffer, ScalarBuffer};
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, BinaryType, ByteArrayType, DataType, Date32Type, Float32Type, Float64Type,
    Int32Type, Int64Type, LargeBinaryType, LargeUtf8Type, TimeUnit, TimestampMicrosecondType,
    UInt64Type, Utf8Type,
};
use datafusion::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use udf_abi::v2::{UdfOwnedBytes, UdfType};

use super::{Entrypoints, FunctionSignature, PluginFunction, PluginLibrary, check_status};
use crate::error::CallError;
use crate::ffi::library::releasing_for_a_plugin;
use crate::types::{ValueType, arrow_type, c_format};

/// The longest result format string read, in bytes (the longest valid one is `tsu:UTC`).
const MAX_FORMAT_LEN: usize = 64;

/// Arguments whose C structs a batch call keeps on the stack; more go to the heap. Three: the
/// structs of eight made the stack a call writes and copies (the arrays and schemas move with
/// the call's state) about 1.3 KB, some 50 more cache lines to bring back at every call of a
/// query (callgrind's cache simulation, `coldcall`), for functions that rarely take more.
const INLINE_ARGS: usize = 3;

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
        let mut call = self.export_arguments(args, num_rows)?;
        let mut out = FFI_ArrowArray::empty();
        let mut out_schema = FFI_ArrowSchema::empty();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the entrypoint belongs to `self.library`, alive while we hold the Arc. The
        // arrays, schemas and flags are `args.len()` valid C Data Interface structs of the
        // declared types and row counts (checked by `export_arguments`), and stay alive and
        // unmoved during the call; the plugin may move the arrays out (it leaves released ones,
        // which drop as no-ops; arrays it left in place are released when `call` drops); `out`,
        // `out_schema` and `error` are valid for writes.
        let status = unsafe {
            entrypoint(
                call.arrays.as_mut_slice().as_mut_ptr(),
                call.schemas(),
                call.scalar_flags.as_slice().as_ptr(),
                args.len(),
                num_rows,
                &mut out,
                &mut out_schema,
                &mut error,
            )
        };
        drop(call);
        // From here on, `out` and `out_schema` are released (through the plugin's callbacks) on
        // every return path, while `self` still holds the library.
        check_status(status, error, release, &self.library)?;
        self.import_batch_result(out, out_schema, args, num_rows)
    }

    /// The C structs of a batch call's arguments (see [`ExportedArguments`]), after checking
    /// the arguments against the signature.
    pub(in crate::ffi) fn export_arguments<'a>(
        &'a self,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<ExportedArguments<'a>, CallError> {
        let signature = self.signature();
        // The ABI promises the plugin arrays of the declared types, of `num_rows` rows (one for
        // a scalar).
        super::check_arguments(signature, args, num_rows)?;
        let mut arrays = Slots::<FFI_ArrowArray>::new(args.len());
        let mut scalar_flags = Slots::<u8>::new(args.len());
        let mut canonical = true;
        let slots = arrays
            .as_mut_slice()
            .iter_mut()
            .zip(scalar_flags.as_mut_slice());
        for (((array, scalar), param), (slot, flag)) in
            args.iter().zip(&signature.arg_types).zip(slots)
        {
            canonical &= match param {
                ValueType::Tag(t) => array.data_type() == declared_type(*t),
                ValueType::Arrow(t) => array.data_type() == t,
            };
            *slot = export_argument(array);
            *flag = u8::from(*scalar);
        }
        // The schemas of the declared types were exported when the library was loaded, those of
        // the other string and binary layouts (LargeUtf8, Utf8View, ...) once per process: the
        // plugin gets them, or bitwise copies of them that are never released.
        let schemas = match &self.library.arg_schemas[self.index] {
            Some(cached) if canonical => Schemas::Cached(cached.0.as_ptr()),
            Some(cached) => Schemas::Copies(lent_schemas(args, &cached.0)),
            None => Schemas::Owned(
                args.iter()
                    .map(|(array, _)| FFI_ArrowSchema::try_from(array.data_type()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| CallError::HostBug(format!("cannot export an argument: {e}")))?,
            ),
        };
        let exported = ExportedArguments {
            arrays,
            scalar_flags,
            schemas,
            _function: std::marker::PhantomData,
        };
        Ok(exported)
    }

    /// Checks and imports what a batch call (or an asynchronous call's completion) handed over
    /// as its result, and applies the NULL rules (see [`call_batch`](Self::call_batch)).
    /// `out` and `out_schema` are released on every path.
    pub(in crate::ffi) fn import_batch_result(
        &self,
        out: FFI_ArrowArray,
        out_schema: FFI_ArrowSchema,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<ArrayRef, CallError> {
        let signature = self.signature();
        let return_type = match &signature.return_type {
            ValueType::Tag(t) => *t,
            ValueType::Arrow(declared) => {
                let library = Arc::clone(&self.library);
                let data = super::arrow_result::import_result(
                    out, out_schema, declared, num_rows, library,
                )?;
                return apply_null_rules(make_array(data), args, signature);
            }
        };
        check_result_schema(&out_schema, return_type)?;
        drop(out_schema);
        let buffers = check_result_array(&out, return_type, num_rows)?;
        let library = Arc::clone(&self.library);
        // In both arms: `out` is an unreleased array whose every field was checked above
        // against the layout of the declared type (buffer count, non-null and aligned buffers,
        // no children or dictionary, offsets in order), and `buffers` are its buffer pointers;
        // what cannot be checked is that each buffer is as long as the layout says (the C Data
        // Interface carries no buffer sizes).
        let imported = catch_unwind(AssertUnwindSafe(move || {
            match fixed_importer(return_type) {
                // SAFETY: the checked array above, of the importer's type (`return_type`).
                Some(import) => unsafe { import(out, buffers, num_rows, library) },
                None => {
                    // SAFETY: the checked array above, of `return_type`.
                    let data =
                        unsafe { import_result(out, buffers, return_type, num_rows, library) };
                    check_result_data(&data)?;
                    Ok(make_array(data))
                }
            }
        }));
        let array = match imported {
            Ok(array) => array?,
            Err(panic) => {
                return Err(CallError::HostBug(format!(
                    "importing the batch result panicked: {}",
                    panic_text(&panic)
                )));
            }
        };
        apply_null_rules(array, args, signature)
    }
}

/// The C structs of one batch call's arguments: the arrays (moved to the plugin during the
/// call; those it leaves in place are released when this drops), the scalar flags, and the
/// schemas, valid while this lives (pointers into it are taken at the call, never before a move).
pub(in crate::ffi) struct ExportedArguments<'a> {
    pub(in crate::ffi) arrays: Slots<FFI_ArrowArray>,
    pub(in crate::ffi) scalar_flags: Slots<u8>,
    schemas: Schemas,
    /// The cached schemas belong to the function's library.
    _function: std::marker::PhantomData<&'a PluginFunction>,
}

/// Where a call's argument schemas are.
// The copies stay inline on purpose: no allocation per call for the usual argument counts.
#[allow(clippy::large_enum_variant)]
enum Schemas {
    /// The library's schemas of the declared types, exported when it was loaded.
    Cached(*const FFI_ArrowSchema),
    /// Bitwise copies of them and of the process's schemas of other string and binary layouts
    /// (never released).
    Copies(Slots<ManuallyDrop<FFI_ArrowSchema>>),
    /// Exported for this call.
    Owned(Vec<FFI_ArrowSchema>),
}

impl ExportedArguments<'_> {
    /// The schemas, one per argument: valid while `self` is neither moved nor dropped.
    pub(in crate::ffi) fn schemas(&self) -> *const FFI_ArrowSchema {
        match &self.schemas {
            Schemas::Cached(schemas) => *schemas,
            // `ManuallyDrop` is `repr(transparent)`: the same layout as the schemas.
            Schemas::Copies(copies) => copies.as_slice().as_ptr().cast(),
            Schemas::Owned(owned) => owned.as_ptr(),
        }
    }
}

/// The message of a caught panic.
pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// A value that fills a slot before it is written: a released (empty) struct, or zero.
pub(in crate::ffi) trait Empty {
    const EMPTY: Self;
}

impl Empty for u8 {
    const EMPTY: u8 = 0;
}

impl Empty for FFI_ArrowArray {
    /// `FFI_ArrowArray::empty()`, as a constant: released, so dropping it does nothing.
    const EMPTY: FFI_ArrowArray = FFI_ArrowArray {
        length: 0,
        null_count: 0,
        offset: 0,
        n_buffers: 0,
        n_children: 0,
        buffers: std::ptr::null_mut(),
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: None,
        private_data: std::ptr::null_mut(),
    };
}

impl Empty for ManuallyDrop<FFI_ArrowSchema> {
    /// `FFI_ArrowSchema::empty()`, as a constant (released, and never dropped anyway).
    const EMPTY: ManuallyDrop<FFI_ArrowSchema> = ManuallyDrop::new(FFI_ArrowSchema {
        format: std::ptr::null(),
        name: std::ptr::null(),
        metadata: std::ptr::null(),
        flags: 0,
        n_children: 0,
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: None,
        private_data: std::ptr::null_mut(),
    });
}

/// Up to [`INLINE_ARGS`] values on the stack, more on the heap: the per-call argument structs,
/// without an allocation for the usual argument counts.
pub(in crate::ffi) enum Slots<T> {
    Inline([T; INLINE_ARGS], usize),
    Heap(Vec<T>),
}

impl<T: Empty> Slots<T> {
    /// `len` empty slots.
    fn new(len: usize) -> Slots<T> {
        if len <= INLINE_ARGS {
            Slots::Inline([const { T::EMPTY }; INLINE_ARGS], len)
        } else {
            Slots::Heap((0..len).map(|_| T::EMPTY).collect())
        }
    }

    pub(in crate::ffi) fn as_slice(&self) -> &[T] {
        match self {
            Slots::Inline(values, len) => &values[..*len],
            Slots::Heap(values) => values,
        }
    }

    pub(in crate::ffi) fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Slots::Inline(values, len) => &mut values[..*len],
            Slots::Heap(values) => values,
        }
    }
}

/// The Arrow type a plugin type is exchanged as ([`arrow_type`]), built once per process (a
/// `Timestamp`'s time zone is an allocation).
fn declared_type(t: UdfType) -> &'static DataType {
    static TYPES: OnceLock<[DataType; UdfType::ALL.len()]> = OnceLock::new();
    &TYPES.get_or_init(|| UdfType::ALL.map(arrow_type))[t.tag() as usize]
}

/// Schemas exported once and never released: only ever lent read-only to plugins.
struct StaticSchemas([Option<FFI_ArrowSchema>; 4]);

// SAFETY: the schemas are never written after they are exported and only ever passed to plugins
// as `const` pointers (the ABI lends them read-only for a call), so sharing them between threads
// shares immutable data.
unsafe impl Sync for StaticSchemas {}

/// The schema of a string or binary layout other than the declared type's (`LargeUtf8`,
/// `Utf8View`, `LargeBinary`, `BinaryView`), exported once per process.
fn layout_schema(t: &DataType) -> Option<&'static FFI_ArrowSchema> {
    const LAYOUTS: [DataType; 4] = [
        DataType::LargeUtf8,
        DataType::Utf8View,
        DataType::LargeBinary,
        DataType::BinaryView,
    ];
    static SCHEMAS: OnceLock<StaticSchemas> = OnceLock::new();
    let index = LAYOUTS.iter().position(|l| l == t)?;
    let schemas =
        SCHEMAS.get_or_init(|| StaticSchemas(LAYOUTS.map(|t| FFI_ArrowSchema::try_from(&t).ok())));
    schemas.0[index].as_ref()
}

/// The schemas of a call with arguments in other layouts than the declared ones: for each
/// argument, a bitwise copy of its declared type's schema (from `declared`) or of its layout's.
fn lent_schemas(
    args: &[(ArrayRef, bool)],
    declared: &[FFI_ArrowSchema],
) -> Slots<ManuallyDrop<FFI_ArrowSchema>> {
    let mut copies = Slots::<ManuallyDrop<FFI_ArrowSchema>>::new(args.len());
    let slots = copies.as_mut_slice().iter_mut();
    for (((array, _), declared), slot) in args.iter().zip(declared).zip(slots) {
        let schema = match layout_schema(array.data_type()) {
            Some(schema) => schema,
            None => declared,
        };
        // SAFETY: a bitwise copy of a schema that stays alive and unreleased for longer than
        // the call (the library holds the declared ones, a static the others); the copy is
        // `ManuallyDrop`, so it never runs the release callback, and the plugin only reads it.
        *slot = ManuallyDrop::new(unsafe { std::ptr::read(schema) });
    }
    copies
}

/// What an argument array exported by [`export_argument`] owns: the array (so its buffers) and
/// the C array of buffer pointers that `FFI_ArrowArray::buffers` points at.
struct ExportedArgument {
    _array: ArrayRef,
    buffers: [*const c_void; 3],
}

/// The data buffers of an argument (the validity bitmap aside) and the offset that applies to
/// them, read without building an `ArrayData`; `None` for layouts left to arrow's exporter
/// (views, and anything that is not a plain primitive, boolean, string or binary array).
fn data_buffers(array: &ArrayRef) -> Option<(usize, [*const c_void; 2], i64)> {
    fn primitive<T: ArrowPrimitiveType>(
        array: &ArrayRef,
    ) -> Option<(usize, [*const c_void; 2], i64)> {
        let values = array.as_primitive_opt::<T>()?.values().inner().as_ptr();
        // A primitive array's values buffer starts at its first value: offset 0.
        Some((0, [values.cast(), std::ptr::null()], 1))
    }
    fn bytes<T: ByteArrayType>(array: &ArrayRef) -> Option<(usize, [*const c_void; 2], i64)> {
        let a = array.as_bytes_opt::<T>()?;
        // The offsets buffer starts at the first row's offset: offset 0.
        let offsets = a.offsets().inner().inner().as_ptr().cast();
        Some((0, [offsets, a.values().as_ptr().cast()], 2))
    }
    match array.data_type() {
        DataType::Boolean => {
            // Boolean values are bits, sliced by a bit offset.
            let values = array.as_boolean_opt()?.values();
            let bits = values.inner().as_ptr().cast();
            Some((values.offset(), [bits, std::ptr::null()], 1))
        }
        DataType::Int32 => primitive::<Int32Type>(array),
        DataType::Int64 => primitive::<Int64Type>(array),
        DataType::UInt64 => primitive::<UInt64Type>(array),
        DataType::Float32 => primitive::<Float32Type>(array),
        DataType::Float64 => primitive::<Float64Type>(array),
        DataType::Date32 => primitive::<Date32Type>(array),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            primitive::<TimestampMicrosecondType>(array)
        }
        DataType::Utf8 => bytes::<Utf8Type>(array),
        DataType::LargeUtf8 => bytes::<LargeUtf8Type>(array),
        DataType::Binary => bytes::<BinaryType>(array),
        DataType::LargeBinary => bytes::<LargeBinaryType>(array),
        _ => None,
    }
}

/// Exports an argument array with one allocation (arrow's exporter makes four): the array and
/// its buffer pointers in one box, released by [`release_argument`]. Views, and a validity
/// bitmap whose bit offset differs from the values' (a sliced array), go through arrow's
/// exporter.
fn export_argument(array: &ArrayRef) -> FFI_ArrowArray {
    let Some((offset, [first, second], data_buffers)) = data_buffers(array) else {
        return export_for_a_plugin(&array.to_data());
    };
    let validity = match array.nulls() {
        None => std::ptr::null(),
        Some(nulls) if nulls.offset() == offset => nulls.buffer().as_ptr().cast(),
        Some(_) => return export_for_a_plugin(&array.to_data()),
    };
    let (length, null_count) = (array.len() as i64, array.null_count() as i64);
    let private = Box::into_raw(Box::new(ExportedArgument {
        _array: Arc::clone(array),
        buffers: [validity, first, second],
    }));
    // SAFETY: `private` comes from `Box::into_raw` just above: valid, and owned by the exported
    // array until its release callback takes it back.
    let buffers = unsafe { (&raw mut (*private).buffers).cast::<*const c_void>() };
    FFI_ArrowArray {
        length,
        null_count,
        offset: offset as i64,
        n_buffers: 1 + data_buffers,
        n_children: 0,
        buffers,
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: Some(release_argument),
        private_data: private.cast(),
    }
}

/// The release callback of [`export_argument`]: drops the array (its buffers) and the pointers.
/// Host code: it may run after the call, on any thread, when a plugin kept the array (or a
/// buffer of it) in its result.
///
/// # Safety
///
/// `array` must be null or point at an array made by [`export_argument`], released once.
unsafe extern "C" fn release_argument(array: *mut FFI_ArrowArray) {
    // SAFETY: per this function's contract, `export_argument` boxed an `ExportedArgument`.
    unsafe { release_boxed::<ExportedArgument>(array) }
}

/// What the host's release callbacks for arguments do: take back the `Box<T>` in
/// `private_data` and drop it inside [`releasing_for_a_plugin`], then mark the array released.
///
/// # Safety
///
/// `array` must be null or point at an array whose `private_data` is null or comes from
/// `Box::into_raw` of a `T`, released once.
unsafe fn release_boxed<T>(array: *mut FFI_ArrowArray) {
    if array.is_null() {
        return;
    }
    // SAFETY: non-null, and the plugin passes the array it releases, valid for reads and writes.
    let array = unsafe { &mut *array };
    if !array.private_data.is_null() {
        // SAFETY: per the contract, from `Box::into_raw` of a `T`, taken back once: it is
        // cleared below.
        let boxed = unsafe { Box::from_raw(array.private_data.cast::<T>()) };
        releasing_for_a_plugin(|| drop(boxed));
    }
    array.private_data = std::ptr::null_mut();
    array.release = None;
}

/// `data` exported by arrow's exporter, behind a release callback of the host
/// ([`release_for_a_plugin`]) that runs arrow's inside [`releasing_for_a_plugin`]: what a plugin
/// releases on its own thread never unloads a library there. (A child array the plugin moves
/// out and releases apart goes through arrow's callback alone.)
pub(in crate::ffi) fn export_for_a_plugin(data: &ArrayData) -> FFI_ArrowArray {
    let inner = Box::new(FFI_ArrowArray::new(data));
    FFI_ArrowArray {
        length: inner.length,
        null_count: inner.null_count,
        offset: inner.offset,
        n_buffers: inner.n_buffers,
        n_children: inner.n_children,
        // Owned by `inner`'s private data, which lives as long as this array (in `private_data`).
        buffers: inner.buffers,
        children: inner.children,
        dictionary: inner.dictionary,
        release: Some(release_for_a_plugin),
        private_data: Box::into_raw(inner).cast(),
    }
}

/// The release callback of [`export_for_a_plugin`]: releases arrow's array (dropping it runs
/// arrow's callback) inside [`releasing_for_a_plugin`].
///
/// # Safety
///
/// `array` must be null or point at an array made by [`export_for_a_plugin`], released once.
unsafe extern "C" fn release_for_a_plugin(array: *mut FFI_ArrowArray) {
    // SAFETY: per this function's contract, `export_for_a_plugin` boxed arrow's array.
    unsafe { release_boxed::<FFI_ArrowArray>(array) }
}

/// A result array the plugin exported, owning the buffers imported from it: dropping it calls
/// the plugin's `release` callback (the array field drops first), then lets the library go
/// (which may unmap it, so never before).
struct PluginArray {
    // Fields drop in declaration order: the array (its release callback) first.
    _array: FFI_ArrowArray,
    _library: Arc<PluginLibrary>,
}

/// Imports a checked result array of the declared type `t` with the buffer pointers
/// [`check_result_array`] read, as arrow's importer would (the same buffer lengths), but with
/// one owner that holds the library as well (see [`PluginArray`]).
///
/// # Safety
///
/// `out` must have passed [`check_result_array`] for `t` and `num_rows`, which returned
/// `buffers`, and its buffers must be as long as `t`'s layout says.
unsafe fn import_result(
    out: FFI_ArrowArray,
    buffers: [*const c_void; 3],
    t: UdfType,
    num_rows: usize,
    library: Arc<PluginLibrary>,
) -> ArrayData {
    let offset = out.offset as usize;
    let null_count = usize::try_from(out.null_count).ok();
    // Checked: `offset + num_rows` does not overflow (it is at most i32::MAX).
    let end = offset + num_rows;
    let owner = Arc::new(PluginArray {
        _array: out,
        _library: library,
    });
    // SAFETY: each buffer is the plugin's, of the layout's length (this function's contract).
    let buffer =
        |pointer: *const c_void, len: usize| unsafe { plugin_buffer(pointer, len, &owner) };
    let validity = (!buffers[0].is_null()).then(|| buffer(buffers[0], end.div_ceil(8)));
    let data = match t {
        UdfType::Bool => vec![buffer(buffers[1], end.div_ceil(8))],
        UdfType::Int32 | UdfType::Float32 | UdfType::Date32 => vec![buffer(buffers[1], end * 4)],
        UdfType::Int64 | UdfType::UInt64 | UdfType::Float64 | UdfType::TimestampMicros => {
            vec![buffer(buffers[1], end * 8)]
        }
        UdfType::Utf8 | UdfType::Binary => {
            // The values run up to the last offset of the window (checked non-negative), as
            // arrow's importer reads it; no values for no rows.
            let values = if num_rows == 0 {
                0
            } else {
                // SAFETY: the offsets buffer is non-null, aligned for i32 and holds
                // `offset + num_rows + 1` offsets (checked, and the C Data Interface's promise).
                let last = unsafe { buffers[1].cast::<i32>().add(end).read() };
                last as usize
            };
            vec![
                buffer(buffers[1], (end + 1) * 4),
                buffer(buffers[2], values),
            ]
        }
    };
    // SAFETY: the layout of `t`'s Arrow type: the validity bitmap and data buffers it has, of
    // the lengths its `offset + num_rows` slots need. Nothing reads the values before
    // `validate_result` has validated them.
    unsafe {
        ArrayData::new_unchecked(
            declared_type(t).clone(),
            num_rows,
            null_count,
            validity,
            offset,
            data,
            Vec::new(),
        )
    }
}

/// A buffer of a plugin's result array, owned by `owner` (an empty one for no bytes: its
/// pointer may be anything then).
///
/// # Safety
///
/// `pointer` must be valid for `len` bytes for as long as `owner`'s array is not released.
unsafe fn plugin_buffer(pointer: *const c_void, len: usize, owner: &Arc<PluginArray>) -> Buffer {
    match NonNull::new(pointer.cast_mut().cast::<u8>()) {
        // SAFETY: the plugin's buffer, valid for `len` bytes for as long as its array is not
        // released, which `owner` keeps from happening until every buffer made from it drops.
        Some(pointer) if len > 0 => unsafe {
            Buffer::from_custom_allocation(pointer, len, owner.clone())
        },
        // An empty buffer may have any pointer: nothing is read through it.
        _ => MutableBuffer::new(0).into(),
    }
}

/// Imports a checked result of a fixed-width type.
type FixedImporter = unsafe fn(
    FFI_ArrowArray,
    [*const c_void; 3],
    usize,
    Arc<PluginLibrary>,
) -> Result<ArrayRef, CallError>;

/// The importer of results of type `t` that go straight into their array ([`import_fixed`]);
/// `None` for the types that go through `ArrayData` and arrow's full validation.
fn fixed_importer(t: UdfType) -> Option<FixedImporter> {
    Some(match t {
        UdfType::Int64 => import_fixed::<Int64Type>,
        UdfType::UInt64 => import_fixed::<UInt64Type>,
        UdfType::Float64 => import_fixed::<Float64Type>,
        UdfType::Int32 => import_fixed::<Int32Type>,
        UdfType::Float32 => import_fixed::<Float32Type>,
        UdfType::Date32 => import_fixed::<Date32Type>,
        UdfType::Bool | UdfType::Utf8 | UdfType::Binary | UdfType::TimestampMicros => return None,
    })
}

/// Imports a checked result of the fixed-width type `T` straight into its array, without
/// `ArrayData`, `make_array` and arrow's generic validation, whose code and data a batch call in
/// a query must bring back into the caches each time (a good share of the path's fixed cost:
/// see BENCHMARKS.md). It makes the checks arrow's full validation makes of such an array: the
/// buffers are the layout's lengths from the checked offset and length (and aligned, checked
/// before), and a null count the plugin gives must be its bitmap's (counted here); a bitmap
/// without a NULL is dropped, as arrow does.
///
/// # Safety
///
/// As [`import_result`]'s, for `T`'s type.
unsafe fn import_fixed<T: ArrowPrimitiveType>(
    out: FFI_ArrowArray,
    buffers: [*const c_void; 3],
    num_rows: usize,
    library: Arc<PluginLibrary>,
) -> Result<ArrayRef, CallError> {
    let offset = out.offset as usize;
    let declared_nulls = usize::try_from(out.null_count).ok();
    // Checked: `offset + num_rows` does not overflow (it is at most i32::MAX).
    let end = offset + num_rows;
    let owner = Arc::new(PluginArray {
        _array: out,
        _library: library,
    });
    let width = std::mem::size_of::<T::Native>();
    // SAFETY: the values buffer of the checked array, of the layout's length.
    let values = unsafe { plugin_buffer(buffers[1], end * width, &owner) };
    let nulls = if buffers[0].is_null() {
        None
    } else {
        // SAFETY: the validity bitmap of the checked array, a bit per slot.
        let bits = unsafe { plugin_buffer(buffers[0], end.div_ceil(8), &owner) };
        let nulls = NullBuffer::new(BooleanBuffer::new(bits, offset, num_rows));
        if let Some(declared) = declared_nulls
            && declared != nulls.null_count()
        {
            return Err(invalid(format!(
                "null_count value ({declared}) doesn't match actual number of nulls in array ({})",
                nulls.null_count()
            )));
        }
        Some(nulls).filter(|n| n.null_count() > 0)
    };
    Ok(Arc::new(PrimitiveArray::<T>::new(
        ScalarBuffer::new(values, offset, num_rows),
        nulls,
    )))
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
    let format = format_bytes(schema)?;
    let expected = c_format(declared);
    if format != expected.as_bytes() {
        let found_format = String::from_utf8(format.to_vec()).map_err(|e| {
            invalid(format!(
                "the result schema's format is not UTF-8 (bytes {:?})",
                e.as_bytes()
            ))
        })?;
        return Err(CallError::ResultType {
            declared: declared.into(),
            expected_format: expected.to_string(),
            found_format,
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

/// The bytes of a schema's format string (without the NUL), read with a bound.
fn format_bytes(schema: &FFI_ArrowSchema) -> Result<&[u8], CallError> {
    let format = schema.format;
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
    // SAFETY: `len` bytes before the NUL were just measured; they live as long as the schema,
    // which the returned slice borrows.
    Ok(unsafe { CStr::from_ptr(format) }.to_bytes())
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

/// Checks every field of the result array before arrow reads it; returns its buffer pointers
/// (validity first, null where a layout has fewer buffers).
fn check_result_array(
    array: &FFI_ArrowArray,
    declared: UdfType,
    num_rows: usize,
) -> Result<[*const c_void; 3], CallError> {
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
    Ok(pointers)
}

/// The schemas of a function's declared argument types, exported once when its library is
/// loaded and lent to every batch call (the ABI lends them for the call: the plugin reads them
/// and never releases or changes them).
pub(in crate::ffi) struct ArgSchemas(Box<[FFI_ArrowSchema]>);

// SAFETY: the schemas are never written after `ArgSchemas::new` and only ever passed to plugins
// as `const` pointers (the ABI borrows them read-only for a call), so sharing them between
// threads shares immutable data; they are released once, when the library drops.
unsafe impl Sync for ArgSchemas {}

impl ArgSchemas {
    /// The canonical schemas of `signature`'s arguments; `None` if one cannot be exported.
    pub(in crate::ffi) fn new(signature: &FunctionSignature) -> Option<ArgSchemas> {
        signature
            .arg_types
            .iter()
            .map(|t| FFI_ArrowSchema::try_from(&t.arrow_type()).ok())
            .collect::<Option<Vec<_>>>()
            .map(|schemas| ArgSchemas(schemas.into_boxed_slice()))
    }

    /// The schemas of `types`; `None` if one cannot be exported.
    pub(in crate::ffi) fn of_types<'a>(
        types: impl IntoIterator<Item = &'a DataType>,
    ) -> Option<ArgSchemas> {
        types
            .into_iter()
            .map(|t| FFI_ArrowSchema::try_from(t).ok())
            .collect::<Option<Vec<_>>>()
            .map(|schemas| ArgSchemas(schemas.into_boxed_slice()))
    }

    /// The first schema, lent for a call (the ABI's `arg_schemas`).
    pub(in crate::ffi) fn as_ptr(&self) -> *const FFI_ArrowSchema {
        self.0.as_ptr()
    }
}

/// What the NULL rules ask of a result (see [`null_rules`]).
enum NullRules {
    /// The result stands as it is.
    Keep,
    /// A constant argument that does not take NULLs is NULL: every row is NULL.
    AllNull,
    /// The rows whose valid bit is clear have a NULL in an argument that does not take NULLs:
    /// they are NULL (STRICT).
    Mask(NullBuffer),
}

/// The row path's NULL rules, read off a result and its arguments; the one place they are
/// written, for both paths and for results an isolated worker sends:
///
/// * STRICT: a row with a NULL in an argument that does not take NULLs is NULL (the row path
///   never calls the plugin for it; a batch result is masked there, whatever the plugin wrote).
/// * A function declared never to return NULL must not return NULL in any other row (the row path
///   refuses the same result), whether or not a nullable argument is NULL there.
fn null_rules(
    result: &ArrayRef,
    args: &[(ArrayRef, bool)],
    signature: &FunctionSignature,
) -> Result<NullRules, CallError> {
    // Nothing to do without a NULL in sight (the usual case): no argument and no result row is
    // NULL.
    if result.logical_null_count() == 0 && args.iter().all(|(a, _)| a.logical_null_count() == 0) {
        return Ok(NullRules::Keep);
    }
    let strict = match super::strict_rows(signature, args) {
        super::Strict::AllNull => return Ok(NullRules::AllNull),
        super::Strict::Rows(rows) => rows,
    };
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
    Ok(strict.map_or(NullRules::Keep, NullRules::Mask))
}

/// The NULL rules applied to a batch result the plugin just returned: STRICT rows become NULL.
fn apply_null_rules(
    result: ArrayRef,
    args: &[(ArrayRef, bool)],
    signature: &FunctionSignature,
) -> Result<ArrayRef, CallError> {
    match null_rules(&result, args, signature)? {
        NullRules::Keep => Ok(result),
        NullRules::AllNull => Ok(datafusion::arrow::array::new_null_array(
            result.data_type(),
            result.len(),
        )),
        NullRules::Mask(strict) => {
            let mask = BooleanArray::new(!strict.inner(), None);
            datafusion::arrow::compute::nullif(&result, &mask)
                .map_err(|e| CallError::HostBug(format!("cannot apply the STRICT NULL mask: {e}")))
        }
    }
}

/// The NULL rules checked on a finished result (one an isolated worker sent, which it made
/// with [`apply_null_rules`] or the row path): besides the rule on undeclared NULLs, every
/// STRICT row must already be NULL; nothing is masked here.
fn check_null_rules(
    result: &ArrayRef,
    args: &[(ArrayRef, bool)],
    signature: &FunctionSignature,
) -> Result<(), CallError> {
    let not_null = |row: usize| {
        invalid(format!(
            "row {row} is not NULL, but an argument that does not take NULLs is NULL there \
             (the function is STRICT: that row is NULL)"
        ))
    };
    match null_rules(result, args, signature)? {
        NullRules::Keep => Ok(()),
        NullRules::AllNull => match (0..result.len()).find(|&row| !result.is_null(row)) {
            Some(row) => Err(not_null(row)),
            None => Ok(()),
        },
        NullRules::Mask(strict) => {
            let valid = result.logical_nulls().map_or_else(
                || datafusion::arrow::buffer::BooleanBuffer::new_set(result.len()),
                |n| n.inner().clone(),
            );
            let forced = &!strict.inner() & &valid;
            match forced.set_indices().next() {
                Some(row) => Err(not_null(row)),
                None => Ok(()),
            }
        }
    }
}

/// The value rules every result meets, whichever path made it: arrow's full validation (with a
/// faster, equivalent UTF-8 check for `Utf8`), then decimal precision at every level.
pub(in crate::ffi) fn check_result_data(data: &ArrayData) -> Result<(), CallError> {
    validate_result(data).map_err(CallError::InvalidResult)?;
    super::arrow_result::check_decimals(data)
}

/// An array built from `builder` and validated as every result is ([`validate_result`]: arrow's
/// full validation, with the faster equivalent UTF-8 check for `Utf8`) instead of by arrow's
/// `build`, whose value-by-value UTF-8 check costs several times more on long columns. For
/// columns a worker sent (`isolation::raw`); why not, when the buffers do not make a valid array.
pub(crate) fn build_validated(
    builder: datafusion::arrow::array::ArrayDataBuilder,
) -> Result<ArrayData, String> {
    // SAFETY: `build_unchecked` only assembles the data (of the buffers it reads the validity
    // bitmap alone, after a length check that panics); nothing reads the values before
    // `validate_result`, which checks all that arrow's `build` would, and the data is dropped
    // unread when it fails.
    let data = unsafe { builder.build_unchecked() };
    validate_result(&data)?;
    Ok(data)
}

impl FunctionSignature {
    /// Checks a result an isolated worker sent for a call of this function over `args` and
    /// `num_rows` rows with the rules the in-process paths apply to what a plugin returns: the
    /// declared type, the row count, arrow's full validation, decimal precision at every level
    /// (list items and struct fields too), and the NULL rules (no NULL where the function
    /// never returns one; NULL in every STRICT row). The worker runs the same code before it
    /// answers, so an honest worker's result always passes: a result that fails was forged.
    pub(crate) fn check_received_result(
        &self,
        result: &ArrayRef,
        args: &[(ArrayRef, bool)],
        num_rows: usize,
    ) -> Result<(), CallError> {
        let signature = self;
        let declared = signature.return_type.arrow_type();
        if result.data_type() != &declared {
            return Err(CallError::ResultType {
                expected_format: crate::types::arrow::type_string(&declared).unwrap_or_default(),
                found_format: crate::types::arrow::type_string(result.data_type())
                    .unwrap_or_else(|| result.data_type().to_string()),
                declared: signature.return_type.clone(),
            });
        }
        if result.len() != num_rows {
            return Err(invalid(format!(
                "the result has {} rows, {num_rows} expected",
                result.len()
            )));
        }
        check_result_data(&result.to_data())?;
        check_null_rules(result, args, signature)
    }
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

    /// Arrays of every layout `export_argument` handles itself, sliced too, and some it leaves to
    /// arrow's exporter (views, NULLs at another bit offset than the values).
    fn arguments() -> Vec<ArrayRef> {
        use datafusion::arrow::array::{
            BinaryArray, Date32Array, Float32Array, Float64Array, Int32Array, Int64Array,
            LargeBinaryArray, LargeStringArray, StringArray, StringViewArray,
            TimestampMicrosecondArray, UInt64Array,
        };
        let ints = Int64Array::from(vec![Some(1), None, Some(3), Some(4), None]);
        let bools = BooleanArray::from(vec![Some(true), None, Some(false), Some(true), None]);
        let strings = StringArray::from(vec![Some("a"), None, Some("héllo"), Some(""), Some("z")]);
        vec![
            Arc::new(ints.clone()),
            Arc::new(ints.slice(1, 3)),
            Arc::new(ints.slice(2, 2)),
            Arc::new(Int64Array::from(vec![5, 6, 7]).slice(1, 2)),
            Arc::new(bools.clone()),
            Arc::new(bools.slice(1, 3)),
            Arc::new(BooleanArray::from(vec![true, false, true]).slice(1, 2)),
            Arc::new(strings.clone()),
            Arc::new(strings.slice(1, 3)),
            Arc::new(StringArray::from(vec!["x", "yz", "w"]).slice(1, 2)),
            Arc::new(LargeStringArray::from(vec![Some("x"), None, Some("yz")])),
            Arc::new(StringViewArray::from(vec![
                Some("x"),
                None,
                Some("a string longer than twelve bytes"),
            ])),
            Arc::new(BinaryArray::from(vec![Some(&b"ab"[..]), None, Some(b"")])),
            // A child array: arrow's exporter, behind the host's callback.
            Arc::new(datafusion::arrow::array::ListArray::from_iter_primitive::<
                datafusion::arrow::datatypes::Float64Type,
                _,
                _,
            >(vec![
                Some(vec![Some(1.5), None]),
                None,
                Some(vec![]),
            ])),
            Arc::new(LargeBinaryArray::from(vec![&b"ab"[..], b"c"]).slice(1, 1)),
            Arc::new(Int32Array::from(vec![Some(-1), None])),
            Arc::new(UInt64Array::from(vec![u64::MAX, 0])),
            Arc::new(Float32Array::from(vec![1.5, f32::NAN])),
            Arc::new(Float64Array::from(vec![Some(2.5), None])),
            Arc::new(Date32Array::from(vec![19_000, -1])),
            Arc::new(TimestampMicrosecondArray::from(vec![Some(1), None]).with_timezone("UTC")),
            Arc::new(Int64Array::from(Vec::<i64>::new())),
            Arc::new(StringArray::from(Vec::<&str>::new())),
        ]
    }

    #[test]
    fn exported_arguments_import_as_the_same_arrays() {
        for array in arguments() {
            let exported = export_argument(&array);
            assert!(exported.release.is_some());
            // SAFETY: `export_argument` exports a valid array of `array`'s type.
            let data = unsafe {
                datafusion::arrow::ffi::from_ffi_and_data_type(exported, array.data_type().clone())
            }
            .unwrap();
            data.validate_full().unwrap();
            assert_eq!(data, array.to_data(), "{array:?}");
            // The import shares the buffers: they outlive the original array.
            let imported = make_array(data);
            let expected = array.to_data();
            drop(array);
            assert_eq!(imported.to_data(), expected);
        }
    }

    /// Memory whose owner notes, when dropped, whether that happened inside
    /// `releasing_for_a_plugin`.
    struct Probed {
        values: Vec<i64>,
        released_inside: Arc<std::sync::atomic::AtomicU8>,
    }

    impl Drop for Probed {
        fn drop(&mut self) {
            let inside = crate::ffi::library::releasing_now();
            self.released_inside
                .store(1 + u8::from(inside), std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn arguments_are_released_inside_releasing_for_a_plugin_on_both_exports() {
        use datafusion::arrow::array::Int64Array;
        use datafusion::arrow::buffer::ScalarBuffer;
        // 0: not dropped yet, 1: dropped outside, 2: dropped inside.
        for through_arrow in [false, true] {
            let released_inside = Arc::new(std::sync::atomic::AtomicU8::new(0));
            let owner = Arc::new(Probed {
                values: vec![1, 2, 3],
                released_inside: Arc::clone(&released_inside),
            });
            let ptr = NonNull::new(owner.values.as_ptr().cast_mut().cast::<u8>()).unwrap();
            // SAFETY: `ptr` points at the 3 values `owner` keeps alive as long as the buffer.
            let buffer = unsafe { Buffer::from_custom_allocation(ptr, 3 * 8, owner) };
            let array: ArrayRef = Arc::new(Int64Array::new(ScalarBuffer::new(buffer, 0, 3), None));
            let exported = if through_arrow {
                export_for_a_plugin(&array.to_data())
            } else {
                export_argument(&array)
            };
            drop(array);
            let state = || released_inside.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(state(), 0, "the export holds the memory");
            // The plugin's release: the host's callback.
            drop(exported);
            assert_eq!(
                state(),
                2,
                "released inside (through arrow: {through_arrow})"
            );
            assert!(
                !crate::ffi::library::releasing_now(),
                "the flag is restored"
            );
        }
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
    fn a_wide_decimal_is_named_by_row_list_item_and_field() {
        use datafusion::arrow::array::{Decimal128Array, ListArray, StructArray};
        use datafusion::arrow::buffer::OffsetBuffer;
        use datafusion::arrow::datatypes::Field;
        let decimals = |values: Vec<Option<i128>>| -> ArrayRef {
            Arc::new(
                Decimal128Array::from(values)
                    .with_precision_and_scale(5, 2)
                    .unwrap(),
            )
        };
        let error = |array: ArrayRef| check_result_data(&array.to_data()).unwrap_err().to_string();
        // A top-level value: the row, as before.
        let e = error(decimals(vec![Some(1), Some(100_000)]));
        assert!(e.contains("row 1 holds 100000 (unscaled), which has more than the 5 digits of the declared DECIMAL(5,2)"), "{e}");
        // A list item: rows [1.00], [] (empty), [2.00, 1000.00]: item 1 of row 2.
        let item = Arc::new(Field::new("item", DataType::Decimal128(5, 2), true));
        let list: ArrayRef = Arc::new(ListArray::new(
            Arc::clone(&item),
            OffsetBuffer::new(vec![0, 1, 1, 3].into()),
            decimals(vec![Some(100), Some(200), Some(100_000)]),
            None,
        ));
        let e = error(Arc::clone(&list));
        assert!(e.contains("list item 1 of row 2 holds 100000"), "{e}");
        // Sliced: the same value is item 1 of row 1.
        let e = error(list.slice(1, 2));
        assert!(e.contains("list item 1 of row 1 holds 100000"), "{e}");
        // A struct field inside a list item.
        let point = StructArray::from(vec![(
            Arc::new(Field::new("d", DataType::Decimal128(5, 2), true)),
            decimals(vec![Some(1), Some(2), Some(-100_000)]),
        )]);
        let field = Arc::new(Field::new("item", point.data_type().clone(), true));
        let nested: ArrayRef = Arc::new(ListArray::new(
            field,
            OffsetBuffer::new(vec![0, 2, 3].into()),
            Arc::new(point),
            None,
        ));
        let e = error(nested);
        assert!(
            e.contains("field \"d\" of list item 0 of row 1 holds -100000"),
            "{e}"
        );
        // A value no row reaches is not looked at.
        let e = check_result_data(&list.slice(0, 2).to_data());
        assert!(e.is_ok(), "{e:?}");
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
