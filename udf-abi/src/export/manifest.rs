//! The library's manifest: the two exported ABI v2 symbols (`udfsql_abi_version`,
//! `udfsql_manifest`), built once from the functions `#[udf]` registered in [`super::FUNCTIONS`]
//! and [`super::ARROW_TYPES`], in static storage.

use super::*;

struct Manifest(UdfManifest);
// SAFETY: built once from immutable statics and never written afterwards.
unsafe impl Sync for Manifest {}
// SAFETY: as above; the pointers refer to statics that live as long as the library.
unsafe impl Send for Manifest {}

/// The manifest's `arrow_types` array: static storage (no heap allocation, which a library's
/// statics would leak every time the host unloads it), one entry per function, written once.
struct ArrowTypesStorage(std::cell::UnsafeCell<[UdfArrowTypes; crate::MAX_FUNCTIONS]>);

// SAFETY: written only inside `udfsql_manifest`'s `OnceLock` initialisation (once, before any
// reader can see the manifest that points at it) and only read afterwards.
unsafe impl Sync for ArrowTypesStorage {}

static ARROW_TYPES_STORAGE: ArrowTypesStorage = ArrowTypesStorage(std::cell::UnsafeCell::new(
    [NO_ARROW_TYPES; crate::MAX_FUNCTIONS],
));

/// The manifest's `async_functions` array: static storage as `ARROW_TYPES_STORAGE`.
struct AsyncStorage(std::cell::UnsafeCell<[UdfAsyncFunction; crate::MAX_FUNCTIONS]>);

// SAFETY: as for `ArrowTypesStorage`: written once inside the manifest's `OnceLock`
// initialisation, read only afterwards.
unsafe impl Sync for AsyncStorage {}

/// A synchronous function's entry.
const SYNCHRONOUS: UdfAsyncFunction = UdfAsyncFunction {
    start: None,
    cancel: None,
    max_in_flight: 0,
    chunk_rows: 0,
};

static ASYNC_STORAGE: AsyncStorage = AsyncStorage(std::cell::UnsafeCell::new(
    [SYNCHRONOUS; crate::MAX_FUNCTIONS],
));

/// The manifest's `async_functions` (null when no function is asynchronous), laid out parallel
/// to [`FUNCTIONS`] from [`ASYNC_FUNCTIONS`](super::async_fn::ASYNC_FUNCTIONS).
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn async_functions() -> *const UdfAsyncFunction {
    use super::async_fn::ASYNC_FUNCTIONS;
    if ASYNC_FUNCTIONS.is_empty() {
        return std::ptr::null();
    }
    // SAFETY: the caller's promise: nothing else reads or writes the storage now.
    let storage = unsafe { &mut *ASYNC_STORAGE.0.get() };
    for (slot, function) in storage.iter_mut().zip(FUNCTIONS.iter()) {
        let name = name_bytes(function.0.name);
        if let Some(entry) = ASYNC_FUNCTIONS.iter().find(|a| a.name.as_bytes() == name) {
            *slot = entry.function;
        }
    }
    ASYNC_STORAGE
        .0
        .get()
        .cast::<UdfAsyncFunction>()
        .cast_const()
}

/// The unload hook: the one that stops the runtime of `#[udf(async)]` functions, when the
/// library has any.
fn unload_hook() -> Option<crate::v2::UnloadHook> {
    #[cfg(feature = "async")]
    if !super::async_fn::ASYNC_FUNCTIONS.is_empty() {
        return Some(super::async_fn::udfsql_unload);
    }
    None
}

/// Bytes for the type strings computed from Rust types, and the pointer arrays of their
/// arguments: static storage, written once with the manifest (as `ARROW_TYPES_STORAGE`).
pub const COMPUTED_BYTES: usize = 1 << 16;
/// The most argument type-string pointers the computed storage holds, for all functions.
pub const COMPUTED_POINTERS: usize = 1 << 13;
/// Bytes for the messages of functions whose types could not be declared (type strings that
/// start with `!`, which the host reports as the reason it refuses the function).
const MESSAGE_BYTES: usize = 1 << 14;
/// The longest message, in bytes.
const MAX_MESSAGE_LEN: usize = 1024;

struct ComputedStorage {
    bytes: std::cell::UnsafeCell<[u8; COMPUTED_BYTES]>,
    pointers: std::cell::UnsafeCell<[*const std::ffi::c_char; COMPUTED_POINTERS]>,
    messages: std::cell::UnsafeCell<[u8; MESSAGE_BYTES]>,
}

// SAFETY: as for `ArrowTypesStorage`: written once inside the manifest's `OnceLock`
// initialisation, read only afterwards.
unsafe impl Sync for ComputedStorage {}

static COMPUTED_STORAGE: ComputedStorage = ComputedStorage {
    bytes: std::cell::UnsafeCell::new([0; COMPUTED_BYTES]),
    pointers: std::cell::UnsafeCell::new([std::ptr::null(); COMPUTED_POINTERS]),
    messages: std::cell::UnsafeCell::new([0; MESSAGE_BYTES]),
};

/// The message when the message storage itself is full.
const MESSAGES_FULL: &std::ffi::CStr = c"!udf-abi could not declare this function's Arrow types, \
    and its static storage for the reasons (16384 bytes) is full too";

/// How much of the computed storage the functions before the current one took.
#[derive(Debug, Default)]
struct Used {
    bytes: usize,
    pointers: usize,
    messages: usize,
}

/// Writes the type strings of `compute`'s types into the computed storage after what `used`
/// says is taken; the error says why they cannot be declared (a type with no type string, a
/// type the Rust types cannot describe, the storage full).
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn computed_types(
    compute: fn() -> arrow::DeclaredTypes,
    used: &mut Used,
) -> Result<UdfArrowTypes, String> {
    // `compute` is the generated code over the Rust types' `data_type()`s; a panic there must
    // not unwind out of `udfsql_manifest`.
    let (args, ret) = catch_unwind(compute)
        .unwrap_or_else(|_| Err("describing the Rust types panicked".to_string()))?;
    let mut strings = Vec::with_capacity(args.len() + 1);
    for (i, t) in args.iter().chain([&ret]).enumerate() {
        let what = if i < args.len() {
            format!("argument {}", i + 1)
        } else {
            "the result".to_string()
        };
        let s = crate::type_string::type_string(t)
            .ok_or_else(|| format!("{what} has the Arrow type {t}, which has no type string"))?;
        if s.as_bytes().contains(&0) {
            return Err(format!("the type string of {what} holds a NUL byte"));
        }
        strings.push(s);
    }
    let needed: usize = strings.iter().map(|s| s.len() + 1).sum();
    if used.bytes + needed > COMPUTED_BYTES || used.pointers + args.len() > COMPUTED_POINTERS {
        return Err(format!(
            "udf-abi's static storage for the Arrow type strings of row-by-row #[udf] functions \
             is full: it holds {COMPUTED_BYTES} bytes of type strings and {COMPUTED_POINTERS} \
             argument pointers for the whole library; the functions before this one take {} \
             bytes and {} pointers, and this one needs {needed} bytes and {} pointers (split the \
             library, or use #[udf(vectorized)] with constant type strings)",
            used.bytes,
            used.pointers,
            args.len()
        ));
    }
    // SAFETY: the caller's promise: nothing else reads or writes the storage now.
    let (bytes, pointers) = unsafe {
        (
            &mut *COMPUTED_STORAGE.bytes.get(),
            &mut *COMPUTED_STORAGE.pointers.get(),
        )
    };
    let mut pointer_of = Vec::with_capacity(strings.len());
    for s in &strings {
        let start = used.bytes;
        bytes[start..start + s.len()].copy_from_slice(s.as_bytes());
        bytes[start + s.len()] = 0;
        used.bytes += s.len() + 1;
        pointer_of.push(bytes[start..].as_ptr().cast::<std::ffi::c_char>());
    }
    let return_format = pointer_of.pop().ok_or("no result type")?;
    let first = used.pointers;
    pointers[first..first + pointer_of.len()].copy_from_slice(&pointer_of);
    used.pointers += pointer_of.len();
    Ok(UdfArrowTypes {
        arg_formats: pointers[first..].as_ptr(),
        return_format,
    })
}

/// The Arrow types of a function whose types could not be declared: its result's type string
/// is `!` and `message` (the host refuses the function with it), its arguments have none.
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn undeclared(message: &str, used: &mut Used) -> UdfArrowTypes {
    let mut end = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let text = message[..end].replace('\0', " ");
    let needed = text.len() + 2;
    let return_format = if used.messages + needed > MESSAGE_BYTES {
        MESSAGES_FULL.as_ptr()
    } else {
        // SAFETY: the caller's promise: nothing else reads or writes the storage now.
        let messages = unsafe { &mut *COMPUTED_STORAGE.messages.get() };
        let start = used.messages;
        messages[start] = b'!';
        messages[start + 1..start + 1 + text.len()].copy_from_slice(text.as_bytes());
        messages[start + 1 + text.len()] = 0;
        used.messages += needed;
        messages[start..].as_ptr().cast::<std::ffi::c_char>()
    };
    UdfArrowTypes {
        arg_formats: std::ptr::null(),
        return_format,
    }
}

/// The manifest's `aggregates` array: static storage as `ARROW_TYPES_STORAGE`.
struct AggregateStorage(std::cell::UnsafeCell<[UdfAggregateFunction; MAX_AGGREGATES]>);

// SAFETY: as for `ArrowTypesStorage`: written once inside the manifest's `OnceLock`
// initialisation, read only afterwards.
unsafe impl Sync for AggregateStorage {}

const NO_AGGREGATE: UdfAggregateFunction = UdfAggregateFunction {
    name: UdfBytes {
        ptr: std::ptr::null(),
        len: 0,
    },
    arg_formats: std::ptr::null(),
    args_len: 0,
    state_names: std::ptr::null(),
    state_formats: std::ptr::null(),
    state_len: 0,
    return_format: std::ptr::null(),
    volatility: crate::v2::volatility::IMMUTABLE,
    flags: 0,
    create: None,
    update: None,
    merge: None,
    retract: None,
    evaluate: None,
    state: None,
    size: None,
    destroy: None,
};

static AGGREGATE_STORAGE: AggregateStorage =
    AggregateStorage(std::cell::UnsafeCell::new([NO_AGGREGATE; MAX_AGGREGATES]));

/// Writes `strings` as NUL-terminated strings into the computed storage and their pointers
/// into its pointer array, after what `used` says is taken; returns the first pointer's place.
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn store_strings(
    strings: &[String],
    used: &mut Used,
) -> Result<*const *const std::ffi::c_char, String> {
    if let Some(s) = strings.iter().find(|s| s.as_bytes().contains(&0)) {
        return Err(format!("the type string or name {s:?} holds a NUL byte"));
    }
    let needed: usize = strings.iter().map(|s| s.len() + 1).sum();
    if used.bytes + needed > COMPUTED_BYTES || used.pointers + strings.len() > COMPUTED_POINTERS {
        return Err(format!(
            "udf-abi's static storage for type strings ({COMPUTED_BYTES} bytes, \
             {COMPUTED_POINTERS} pointers for the whole library) is full (split the library)"
        ));
    }
    // SAFETY: the caller's promise: nothing else reads or writes the storage now.
    let (bytes, pointers) = unsafe {
        (
            &mut *COMPUTED_STORAGE.bytes.get(),
            &mut *COMPUTED_STORAGE.pointers.get(),
        )
    };
    let first = used.pointers;
    for s in strings {
        let start = used.bytes;
        bytes[start..start + s.len()].copy_from_slice(s.as_bytes());
        bytes[start + s.len()] = 0;
        used.bytes += s.len() + 1;
        pointers[used.pointers] = bytes[start..].as_ptr().cast::<std::ffi::c_char>();
        used.pointers += 1;
    }
    Ok(pointers[first..].as_ptr())
}

/// The manifest entry of one `#[udaf]` function.
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn aggregate_entry(
    function: &super::aggregate::ExportedAggregate,
    used: &mut Used,
) -> UdfAggregateFunction {
    let name = UdfBytes {
        ptr: function.name.as_ptr(),
        len: function.name.len(),
    };
    let mut declared = || -> Result<UdfAggregateFunction, String> {
        let types = catch_unwind(function.types)
            .map_err(|_| "describing the Rust types panicked".to_string())?;
        let format = |what: String, t: &arrow_schema::DataType| {
            crate::type_string::type_string(t)
                .ok_or_else(|| format!("{what} has the Arrow type {t}, which has no type string"))
        };
        let args = (types.args.iter().enumerate())
            .map(|(i, t)| format(format!("argument {}", i + 1), t))
            .collect::<Result<Vec<_>, _>>()?;
        let state = (types.state.iter().enumerate())
            .map(|(i, t)| format(format!("state field s{i}"), t))
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<String> = (0..state.len()).map(|i| format!("s{i}")).collect();
        let output = format("the result".to_string(), &types.output)?;
        // SAFETY: the caller's promise, passed on.
        let (arg_formats, state_names, state_formats, return_format) = unsafe {
            (
                store_strings(&args, used)?,
                store_strings(&names, used)?,
                store_strings(&state, used)?,
                *store_strings(&[output], used)?,
            )
        };
        Ok(UdfAggregateFunction {
            name,
            arg_formats,
            args_len: args.len(),
            state_names,
            state_formats,
            state_len: state.len(),
            return_format,
            volatility: crate::v2::volatility::IMMUTABLE,
            flags: 0,
            create: Some(function.create),
            update: Some(function.update),
            merge: Some(function.merge),
            retract: function.retract,
            evaluate: Some(function.evaluate),
            state: Some(function.state),
            size: Some(function.size),
            destroy: Some(function.destroy),
        })
    };
    match declared() {
        Ok(entry) => entry,
        Err(message) => UdfAggregateFunction {
            name,
            // SAFETY: the caller's promise, passed on.
            return_format: unsafe { undeclared(&message, used) }.return_format,
            ..NO_AGGREGATE
        },
    }
}

/// The manifest's `aggregates` and `aggregates_len`.
///
/// # Safety
///
/// Only inside the manifest's `OnceLock` initialisation (the storage's one writer).
unsafe fn aggregates(used: &mut Used) -> (*const UdfAggregateFunction, usize) {
    use super::aggregate::AGGREGATES;
    if AGGREGATES.is_empty() {
        return (std::ptr::null(), 0);
    }
    // SAFETY: the caller's promise: nothing else reads or writes the storage now.
    let storage = unsafe { &mut *AGGREGATE_STORAGE.0.get() };
    for (slot, function) in storage.iter_mut().zip(AGGREGATES.iter()) {
        // SAFETY: the caller's promise, passed on.
        *slot = unsafe { aggregate_entry(function, used) };
    }
    if AGGREGATES.len() > MAX_AGGREGATES {
        let message = format!(
            "the library has {} aggregate functions, more than the {MAX_AGGREGATES} of ABI 2.4",
            AGGREGATES.len()
        );
        // SAFETY: the caller's promise, passed on.
        storage[MAX_AGGREGATES - 1].return_format =
            unsafe { undeclared(&message, used) }.return_format;
    }
    (
        AGGREGATE_STORAGE
            .0
            .get()
            .cast::<UdfAggregateFunction>()
            .cast_const(),
        AGGREGATES.len().min(MAX_AGGREGATES),
    )
}

/// The ABI v2 handshake.
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_abi_version() -> UdfAbiVersion {
    UdfAbiVersion::CURRENT
}

/// The ABI v2 manifest: every `#[udf]` function linked into this library.
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_manifest() -> *const UdfManifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    let manifest = MANIFEST.get_or_init(|| {
        let mut used = Used::default();
        let arrow_types = if ARROW_TYPES.is_empty() {
            std::ptr::null()
        } else {
            // SAFETY: the one write, inside the `OnceLock` initialisation: nothing reads the
            // storage before the manifest that points at it is published.
            let storage = unsafe { &mut *ARROW_TYPES_STORAGE.0.get() };
            for (slot, function) in storage.iter_mut().zip(FUNCTIONS.iter()) {
                let name = name_bytes(function.0.name);
                let Some(arrow) = ARROW_TYPES.iter().find(|a| a.name.as_bytes() == name) else {
                    continue;
                };
                let Some(compute) = arrow.compute else {
                    *slot = arrow.types;
                    continue;
                };
                // SAFETY: inside the `OnceLock` initialisation, the storage's one writer.
                *slot = match unsafe { computed_types(compute, &mut used) } {
                    Ok(types) => types,
                    // SAFETY: as above.
                    Err(message) => unsafe { undeclared(&message, &mut used) },
                };
            }
            ARROW_TYPES_STORAGE
                .0
                .get()
                .cast::<UdfArrowTypes>()
                .cast_const()
        };
        // SAFETY: inside the `OnceLock` initialisation, the storage's one writer.
        let (aggregates, aggregates_len) = unsafe { aggregates(&mut used) };
        Manifest(UdfManifest {
            size: std::mem::size_of::<UdfManifest>(),
            // `ExportedFunction` is `repr(transparent)` over `UdfFunction`.
            functions: FUNCTIONS.as_ptr().cast::<UdfFunction>(),
            functions_len: FUNCTIONS.len(),
            release_bytes: Some(release_bytes),
            arrow_types,
            // SAFETY: inside the `OnceLock` initialisation, the storage's one writer.
            async_functions: unsafe { async_functions() },
            unload: unload_hook(),
            aggregates,
            aggregates_len,
        })
    });
    &manifest.0
}

/// The bytes of a function name of this library (a `&'static str` taken apart).
fn name_bytes(name: UdfBytes) -> &'static [u8] {
    // SAFETY: every `ExportedFunction`'s name is a `&'static str` of this library, taken apart
    // by `ExportedFunction::new` / `vectorized` into this pointer and length.
    unsafe { std::slice::from_raw_parts(name.ptr, name.len) }
}
