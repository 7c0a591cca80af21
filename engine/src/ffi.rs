//! The one module of the host that touches raw pointers and foreign code.
//!
//! [`PluginLibrary`] owns a `dlopen`ed library and its validated metadata; [`PluginFunction`]
//! calls one of its functions with safe, typed arguments ([`ArgRef`]) and returns safe, typed
//! values ([`Returned`]). Everything a plugin hands back is read through layout-identical "raw"
//! mirrors of the `udf-abi` types, so that a tag or a `bool` byte the ABI does not define is an
//! error instead of undefined behaviour.
//!
//! What the host cannot defend against: a plugin that crashes, corrupts memory, returns dangling
//! pointers, or never terminates a returned string. See the README's Safety section.

use std::ffi::{CStr, c_char};
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use udf_abi::{MAX_ARGS, PluginMetadata, PluginResult, PluginType, PluginValue};

use crate::error::{CallError, LoadError, MetadataError, TypePosition};

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

/// The ABI a library was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Abi {
    /// The seed contract: one function, row at a time, `plugin_metadata` / `plugin_entrypoint`.
    V1,
}

impl std::fmt::Display for Abi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abi::V1 => f.write_str("v1"),
        }
    }
}

/// The validated signature of one function of a library.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionSignature {
    /// The name the library gives the function.
    pub name: String,
    /// Argument types, in order.
    pub arg_types: Vec<PluginType>,
    /// The return type.
    pub return_type: PluginType,
}

impl std::fmt::Display for FunctionSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, t) in self.arg_types.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{t}")?;
        }
        write!(f, ") -> {}", self.return_type)
    }
}

/// A loaded plugin library with validated metadata.
///
/// The library stays loaded as long as this value lives; every registered UDF holds an
/// `Arc<PluginLibrary>`, so a library is unloaded only after the last function using it is gone
/// and no running query holds it.
pub struct PluginLibrary {
    path: PathBuf,
    abi: Abi,
    functions: Vec<FunctionSignature>,
    entrypoint: EntrypointFn,
    // Declared last: dropped (dlclose) after everything that points into it.
    _library: dlopen2::raw::Library,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("abi", &self.abi)
            .field("functions", &self.functions)
            .finish_non_exhaustive()
    }
}

impl PluginLibrary {
    /// Loads the shared library at `path`, resolves its symbols and validates its metadata.
    ///
    /// The path is made absolute first, so a bare file name never searches the system's library
    /// directories. Symbols are bound immediately (`RTLD_NOW`): a library with an unresolved
    /// dependency fails here rather than at its first call.
    ///
    /// Loading runs the library's initialisers: load only code you trust.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<PluginLibrary>, LoadError> {
        let given = path.as_ref();
        let path = std::fs::canonicalize(given).map_err(|source| LoadError::NotFound {
            path: given.to_path_buf(),
            source,
        })?;
        let library =
            dlopen2::raw::Library::open_with_flags(&path, Some(libc::RTLD_NOW | libc::RTLD_LOCAL))
                .map_err(|e| LoadError::Open {
                    path: path.clone(),
                    message: dl_message(e),
                })?;

        // SAFETY: `plugin_metadata` is declared by the v1 ABI as `PluginMetadata (void)`; we read
        // the answer through `RawMetadata`, which has the same layout and accepts any tag.
        let metadata: MetadataFn = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) }
            .map_err(|e| missing_symbol(&path, udf_abi::SYMBOL_METADATA, e))?;
        // SAFETY: `plugin_entrypoint` is declared by the v1 ABI with exactly this signature; the
        // result is read through `RawResult`, which accepts any tag.
        let entrypoint: EntrypointFn = unsafe { library.symbol(udf_abi::SYMBOL_ENTRYPOINT) }
            .map_err(|e| missing_symbol(&path, udf_abi::SYMBOL_ENTRYPOINT, e))?;

        // SAFETY: the function pointer comes from the library, which is alive; the v1 ABI says it
        // takes no arguments.
        let raw = unsafe { metadata() };
        let signature = validate_metadata(&raw).map_err(|reason| LoadError::InvalidMetadata {
            path: path.clone(),
            symbol: udf_abi::SYMBOL_METADATA,
            reason,
        })?;

        Ok(Arc::new(PluginLibrary {
            path,
            abi: Abi::V1,
            functions: vec![signature],
            entrypoint,
            _library: library,
        }))
    }

    /// The canonical path the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ABI the library speaks.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// The functions the library provides.
    pub fn functions(&self) -> &[FunctionSignature] {
        &self.functions
    }

    /// A callable handle to function `index` of [`functions`](Self::functions).
    pub fn function(self: &Arc<Self>, index: usize) -> Option<PluginFunction> {
        (index < self.functions.len()).then(|| PluginFunction {
            library: Arc::clone(self),
            index,
        })
    }
}

fn dl_message(e: dlopen2::Error) -> String {
    match e {
        dlopen2::Error::OpeningLibraryError(io) | dlopen2::Error::SymbolGettingError(io) => {
            io.to_string()
        }
        other => other.to_string(),
    }
}

fn missing_symbol(path: &Path, symbol: &'static str, e: dlopen2::Error) -> LoadError {
    LoadError::MissingSymbol {
        path: path.to_path_buf(),
        symbol,
        message: dl_message(e),
    }
}

/// Reads a NUL-terminated name of at most [`MAX_NAME_LEN`] bytes.
fn read_name(ptr: *const c_char) -> Result<String, MetadataError> {
    if ptr.is_null() {
        return Err(MetadataError::NullName);
    }
    // SAFETY: non-null; the ABI says it points at a NUL-terminated string in the library's static
    // data. `strnlen` reads at most MAX_NAME_LEN + 1 bytes, so a missing NUL is an error rather
    // than an unbounded read.
    let len = unsafe { libc::strnlen(ptr, MAX_NAME_LEN + 1) };
    if len > MAX_NAME_LEN {
        return Err(MetadataError::NameTooLong { max: MAX_NAME_LEN });
    }
    // SAFETY: `len` bytes before the NUL were just measured.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    if bytes.is_empty() {
        return Err(MetadataError::EmptyName);
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| MetadataError::NonUtf8Name {
        bytes: e.into_bytes(),
    })
}

fn validate_metadata(raw: &RawMetadata) -> Result<FunctionSignature, MetadataError> {
    let name = read_name(raw.name)?;
    let len = raw.arg_types_len;
    if len > MAX_ARGS {
        return Err(MetadataError::TooManyArgs {
            function: name,
            len,
            max: MAX_ARGS,
        });
    }
    let tags: &[u32] = if len == 0 {
        &[]
    } else if raw.arg_types.is_null() {
        return Err(MetadataError::NullArgTypes {
            function: name,
            len,
        });
    } else {
        // SAFETY: non-null, at most MAX_ARGS entries, and the ABI says it points at
        // `arg_types_len` C enum values (u32-sized) in the library's static data.
        unsafe { std::slice::from_raw_parts(raw.arg_types, len) }
    };
    let arg_types = tags
        .iter()
        .enumerate()
        .map(|(i, &tag)| {
            PluginType::from_tag(tag).ok_or_else(|| MetadataError::UnknownTypeTag {
                function: name.clone(),
                position: TypePosition::Argument(i),
                tag,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let return_type =
        PluginType::from_tag(raw.return_type).ok_or_else(|| MetadataError::UnknownTypeTag {
            function: name.clone(),
            position: TypePosition::Return,
            tag: raw.return_type,
        })?;
    Ok(FunctionSignature {
        name,
        arg_types,
        return_type,
    })
}

/// One argument value for a row call, borrowed from the caller's arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgRef<'a> {
    /// A `Bool` argument.
    Bool(bool),
    /// An `Int` argument.
    Int(i64),
    /// A `UInt` argument.
    UInt(u64),
    /// A `Double` argument.
    Double(f64),
    /// A `String` argument; copied NUL-terminated into the call's scratch buffer.
    Str(&'a str),
}

impl ArgRef<'_> {
    fn plugin_type(&self) -> PluginType {
        match self {
            ArgRef::Bool(_) => PluginType::Bool,
            ArgRef::Int(_) => PluginType::Int,
            ArgRef::UInt(_) => PluginType::UInt,
            ArgRef::Double(_) => PluginType::Double,
            ArgRef::Str(_) => PluginType::String,
        }
    }
}

/// A string returned by a plugin. Owned by the host; freed with `free()` on drop, as ABI v1
/// prescribes.
pub struct PluginString {
    ptr: *mut c_char,
    len: usize,
}

impl PluginString {
    /// The string, checked to be UTF-8 when it was received.
    pub fn as_str(&self) -> &str {
        // SAFETY: `ptr` points at `len` bytes owned by this value, validated as UTF-8 in `take`.
        unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr.cast(), self.len))
        }
    }

    /// Takes ownership of a plugin-returned string, validating it.
    ///
    /// # Safety
    ///
    /// `ptr` must be null or a NUL-terminated string allocated with `malloc` that nobody else
    /// frees.
    unsafe fn take(ptr: *const c_char) -> Result<PluginString, CallError> {
        if ptr.is_null() {
            return Err(CallError::NullString);
        }
        // SAFETY: non-null and NUL-terminated per the caller's promise.
        let len = unsafe { CStr::from_ptr(ptr) }.to_bytes().len();
        // From here on `owned` frees the string, on the error path too.
        let owned = PluginString {
            ptr: ptr.cast_mut(),
            len,
        };
        // SAFETY: `len` bytes were just measured.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
        std::str::from_utf8(bytes).map_err(CallError::InvalidUtf8)?;
        Ok(owned)
    }
}

impl std::fmt::Debug for PluginString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Drop for PluginString {
    fn drop(&mut self) {
        // SAFETY: ABI v1 hands returned strings to the host, allocated with malloc; we own it
        // and free it exactly once.
        unsafe { libc::free(self.ptr.cast()) }
    }
}

/// A value returned by one call.
#[derive(Debug)]
pub enum Returned {
    /// A `Bool` result.
    Bool(bool),
    /// An `Int` result.
    Int(i64),
    /// A `UInt` result.
    UInt(u64),
    /// A `Double` result.
    Double(f64),
    /// A `String` result, freed when dropped.
    Str(PluginString),
}

/// Reusable per-batch memory for row calls: the NUL-terminated copies of string arguments and
/// the argument array. Reusing it means no heap allocation per row once it has grown.
#[derive(Debug, Default)]
pub struct RowScratch {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    values: Vec<PluginValue>,
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
    /// The function's signature from the library's metadata.
    pub fn signature(&self) -> &FunctionSignature {
        &self.library.functions[self.index]
    }

    /// The library the function comes from.
    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Calls the function for one row. `args` must match the declared types (checked).
    pub fn call_row(
        &self,
        scratch: &mut RowScratch,
        args: &[ArgRef<'_>],
    ) -> Result<Returned, CallError> {
        let signature = self.signature();
        if args.len() != signature.arg_types.len() {
            return Err(CallError::ArgumentCount {
                expected: signature.arg_types.len(),
                found: args.len(),
            });
        }
        // First copy every string (the buffer may move while it grows), then take pointers.
        scratch.bytes.clear();
        scratch.offsets.clear();
        for (index, (arg, &expected)) in args.iter().zip(&signature.arg_types).enumerate() {
            if arg.plugin_type() != expected {
                return Err(CallError::ArgumentType {
                    index,
                    expected,
                    found: arg.plugin_type(),
                });
            }
            if let ArgRef::Str(s) = arg {
                if s.as_bytes().contains(&0) {
                    return Err(CallError::InteriorNul { index });
                }
                scratch.offsets.push(scratch.bytes.len());
                scratch.bytes.extend_from_slice(s.as_bytes());
                scratch.bytes.push(0);
            }
        }
        scratch.values.clear();
        let base = scratch.bytes.as_ptr();
        let mut offsets = scratch.offsets.iter();
        for arg in args {
            scratch.values.push(match *arg {
                ArgRef::Bool(b) => PluginValue::Bool(b),
                ArgRef::Int(i) => PluginValue::Int(i),
                ArgRef::UInt(u) => PluginValue::UInt(u),
                ArgRef::Double(d) => PluginValue::Double(d),
                ArgRef::Str(_) => {
                    let offset = offsets.next().copied().unwrap_or_default();
                    // `wrapping_add` keeps this safe code; the offset is within `bytes`.
                    PluginValue::String(base.wrapping_add(offset).cast())
                }
            });
        }

        // SAFETY: the entrypoint belongs to `self.library`, which is alive (we hold an Arc).
        // `values` holds exactly the declared number of arguments, each of the declared type;
        // string pointers point into `scratch.bytes`, NUL-terminated without interior NULs, and
        // neither buffer is touched until the call returns.
        let raw =
            unsafe { (self.library.entrypoint)(scratch.values.as_ptr(), scratch.values.len()) };
        // SAFETY: `raw` came from the entrypoint of this function, per the v1 contract.
        unsafe { self.convert_result(raw) }
    }

    /// Reads a result, taking ownership of any string or message in it.
    ///
    /// # Safety
    ///
    /// `raw` must have been returned by this function's entrypoint.
    unsafe fn convert_result(&self, raw: RawResult) -> Result<Returned, CallError> {
        let expected = self.signature().return_type;
        match raw.tag {
            RESULT_OK => {
                // SAFETY: the tag says `Ok`, so the `ok` member is the active one.
                let value = unsafe { raw.payload.ok };
                let found = PluginType::from_tag(value.tag);
                if found != Some(expected) {
                    return Err(CallError::ReturnType {
                        expected,
                        found: found
                            .map_or_else(|| format!("tag {}", value.tag), |t| t.to_string()),
                    });
                }
                // The tag equals the declared type, so that member of the union is the active
                // one; a string is handed to the host per ABI v1 and taken over exactly once.
                Ok(match expected {
                    PluginType::Bool => {
                        // SAFETY: the tag is Bool, so `boolean` is active (read as a byte).
                        match unsafe { value.payload.boolean } {
                            0 => Returned::Bool(false),
                            1 => Returned::Bool(true),
                            byte => return Err(CallError::InvalidBool(byte)),
                        }
                    }
                    // SAFETY: the tag is Int, so `int` is active.
                    PluginType::Int => Returned::Int(unsafe { value.payload.int }),
                    // SAFETY: the tag is UInt, so `uint` is active.
                    PluginType::UInt => Returned::UInt(unsafe { value.payload.uint }),
                    // SAFETY: the tag is Double, so `double` is active.
                    PluginType::Double => Returned::Double(unsafe { value.payload.double }),
                    PluginType::String => {
                        // SAFETY: the tag is String, so `string` is active; ABI v1 hands it to
                        // the host (malloc'ed, NUL-terminated) and we take it over once.
                        Returned::Str(unsafe { PluginString::take(value.payload.string) }?)
                    }
                })
            }
            RESULT_ERR => {
                // SAFETY: the tag says `Err`, so `err` is the active member.
                let message = unsafe { raw.payload.err };
                if message.is_null() {
                    return Err(CallError::NullErrorMessage);
                }
                // SAFETY: a non-null message is a malloc'ed NUL-terminated string handed to us.
                let text = unsafe { CStr::from_ptr(message) }
                    .to_string_lossy()
                    .into_owned();
                // SAFETY: we own the message and free it exactly once, after copying it.
                unsafe { libc::free(message.cast()) };
                Err(CallError::Plugin(text))
            }
            tag => Err(CallError::InvalidResultTag(tag)),
        }
    }
}
