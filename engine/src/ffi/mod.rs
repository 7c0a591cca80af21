//! The one module of the host that touches raw pointers and foreign code.
//!
//! [`PluginLibrary`] owns a `dlopen`ed library (ABI v1 or v2) and its validated metadata;
//! [`PluginFunction`] calls one of its functions with safe, typed arguments ([`ArgRef`]) and
//! returns safe, typed values ([`Returned`]). Everything a v1 plugin hands back is read through
//! layout-identical "raw" mirrors of the `udf-abi` enums, so that a tag or a `bool` byte the ABI
//! does not define is an error instead of undefined behaviour; the v2 types have no Rust enums in
//! them and are read as they are.
//!
//! What the host cannot defend against: a plugin that crashes, corrupts memory, returns dangling
//! pointers, or never terminates a returned string. See the README's Safety section.

use std::ffi::{CStr, c_char};
use std::mem::{align_of, offset_of, size_of};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use udf_abi::v2::{
    self, BatchEntrypoint, ReleaseBytes, RowEntrypoint, UdfAbiVersion, UdfBytes, UdfFunction,
    UdfManifest, UdfOwnedBytes, UdfScalar, UdfType, UdfValue,
};
use udf_abi::{MAX_ARGS, PluginMetadata, PluginResult, PluginType, PluginValue};

use crate::error::{CallError, LoadError, MetadataError, TypePosition};
use crate::trust::Sha256Digest;

mod batch;
mod images;

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
    /// The versioned ABI: `udfsql_abi_version` / `udfsql_manifest`.
    V2 {
        /// The library's minor version.
        minor: u32,
    },
}

impl std::fmt::Display for Abi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abi::V1 => f.write_str("v1"),
            Abi::V2 { minor } => write!(f, "v2.{minor}"),
        }
    }
}

/// The volatility a v2 function declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeclaredVolatility {
    /// Same result for the same arguments.
    Immutable,
    /// Same result within a query.
    Stable,
    /// May change on every call.
    Volatile,
}

/// The validated signature of one function of a library.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionSignature {
    /// The name the library gives the function.
    pub name: String,
    /// Argument types, in order.
    pub arg_types: Vec<UdfType>,
    /// Per argument: whether it receives NULLs (v2 `Option<T>`); all false for v1.
    pub arg_nullable: Vec<bool>,
    /// The return type.
    pub return_type: UdfType,
    /// Whether the function may return NULL.
    pub return_nullable: bool,
    /// The declared volatility (v2); `None` for v1, which cannot declare it.
    pub volatility: Option<DeclaredVolatility>,
}

impl FunctionSignature {
    /// The signature under another name, e.g. the SQL name: `my_repeat(String, UInt) -> String`.
    /// A `?` marks an argument that takes NULL or a result that may be NULL.
    pub fn display_as(&self, name: &str) -> String {
        let args: Vec<String> = self
            .arg_types
            .iter()
            .zip(&self.arg_nullable)
            .map(|(t, &n)| format!("{t}{}", if n { "?" } else { "" }))
            .collect();
        let ret = if self.return_nullable { "?" } else { "" };
        format!("{name}({}) -> {}{ret}", args.join(", "), self.return_type)
    }

    /// Whether a NULL argument always gives NULL without a call (no argument takes NULLs).
    pub fn is_strict(&self) -> bool {
        !self.arg_nullable.iter().any(|&n| n)
    }
}

impl std::fmt::Display for FunctionSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display_as(&self.name))
    }
}

enum Entrypoints {
    V1(EntrypointFn),
    V2 {
        release: ReleaseBytes,
        rows: Vec<RowEntrypoint>,
        batches: Vec<Option<BatchEntrypoint>>,
    },
}

/// A loaded plugin library with validated metadata.
///
/// The library stays loaded as long as this value lives, and is unloaded (`dlclose`) when it
/// drops. Everything that can call into the library holds an `Arc<PluginLibrary>`: every
/// registered UDF and running query (through [`PluginFunction`]), returned bytes
/// ([`PluginBytes`]), and every array a batch entrypoint produced (its `release` callback is
/// plugin code).
pub struct PluginLibrary {
    path: PathBuf,
    sha256: Sha256Digest,
    abi: Abi,
    functions: Vec<FunctionSignature>,
    entrypoints: Entrypoints,
    /// Per function: its arguments' canonical schemas, exported once for every batch call.
    arg_schemas: Vec<Option<batch::ArgSchemas>>,
    /// The `dlopen` handle: dropping it unloads the library, after the fields above.
    _handle: dlopen2::raw::Library,
}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("abi", &self.abi)
            .field("functions", &self.functions)
            .finish_non_exhaustive()
    }
}

/// The effective user id of this process (the trust policy compares file owners with it).
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail (POSIX).
    unsafe { libc::geteuid() }
}

/// Opens `path` for reading only if it is a regular file: a FIFO would block `open` (and every
/// later load waiting on it), a device or directory is never a library. The type is checked
/// before opening and again on the open handle, which is opened non-blocking.
fn open_regular_file(path: &Path) -> Result<std::fs::File, LoadError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let describe = |t: std::fs::FileType| -> Option<&'static str> {
        Some(if t.is_file() {
            return None;
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a file"
        })
    };
    let read_error = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let not_regular = |kind| LoadError::NotARegularFile {
        path: path.to_path_buf(),
        kind,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if let Some(kind) = describe(metadata.file_type()) {
        return Err(not_regular(kind));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if let Some(kind) = describe(metadata.file_type()) {
        return Err(not_regular(kind));
    }
    Ok(file)
}

/// The most functions a v2 manifest may list.
pub const MAX_FUNCTIONS: usize = 4096;

type VersionFn = unsafe extern "C" fn() -> UdfAbiVersion;
type ManifestFn = unsafe extern "C" fn() -> *const UdfManifest;

impl PluginLibrary {
    /// Loads the shared library at `path`, resolves its symbols and validates its metadata.
    ///
    /// A library exporting `udfsql_abi_version` is ABI v2: the handshake is checked before any
    /// other symbol is resolved, and a library built for another major version is refused. A
    /// library without it is a v1 (seed contract) library.
    ///
    /// The path is made absolute first, so a bare file name never searches the system's library
    /// directories. Symbols are bound immediately (`RTLD_NOW`): a library with an unresolved
    /// dependency fails here rather than at its first call.
    ///
    /// Loading runs the library's initialisers: load only code you trust.
    pub fn load(path: impl AsRef<Path>) -> Result<Arc<PluginLibrary>, LoadError> {
        Self::load_pinned(path, None)
    }

    /// Like [`load`](Self::load), but when `pin` is given the file's SHA-256 digest must equal it;
    /// it is checked before the library is mapped, so a library that differs never runs.
    ///
    /// The digest is computed from an open handle, and the path must still name that file after
    /// mapping. One case it cannot see: when this process has already mapped the same path
    /// (through another loader) and the file has been replaced since, the dynamic loader hands
    /// back the earlier mapping. [`PluginLoader`](crate::PluginLoader) shares one mapping per
    /// path and checks pins against the digest taken when it was mapped.
    pub fn load_pinned(
        path: impl AsRef<Path>,
        pin: Option<&Sha256Digest>,
    ) -> Result<Arc<PluginLibrary>, LoadError> {
        let given = path.as_ref();
        let path = std::fs::canonicalize(given).map_err(|source| LoadError::NotFound {
            path: given.to_path_buf(),
            source,
        })?;
        // The digest is of the file that is mapped: hash an open handle, and check after
        // `dlopen` that the path still names that same file.
        let read_error = |source: std::io::Error| LoadError::Read {
            path: path.clone(),
            source,
        };
        let file = open_regular_file(&path)?;
        let before = file.metadata().map_err(read_error)?;
        let sha256 = Sha256Digest::of_reader(&file).map_err(read_error)?;
        crate::trust::check_pin(&path, pin, &sha256)?;
        images::check_before_open(&path, &before, &sha256)?;
        let library =
            dlopen2::raw::Library::open_with_flags(&path, Some(libc::RTLD_NOW | libc::RTLD_LOCAL))
                .map_err(|e| LoadError::Open {
                    path: path.clone(),
                    message: dl_message(e),
                })?;
        let after = std::fs::metadata(&path).map_err(read_error)?;
        if (before.dev(), before.ino()) != (after.dev(), after.ino()) {
            return Err(LoadError::ChangedWhileLoading { path });
        }
        // SAFETY: `udfsql_abi_version` is declared by ABI v2 as `UdfAbiVersion (void)`, a struct
        // of plain integers that is valid for any bits.
        let version: Result<VersionFn, _> = unsafe { library.symbol(v2::SYMBOL_ABI_VERSION) };
        // Before any code of the library is called: the image `dlopen` returned must be the file
        // that was hashed (it returns an earlier image of the same path while one is mapped).
        // SAFETY: only the address is used, to find the mapping it lies in; never called here.
        let metadata: Result<MetadataFn, _> = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) };
        let probe = match (&version, &metadata) {
            (Ok(f), _) => Some(*f as usize),
            (_, Ok(f)) => Some(*f as usize),
            _ => None,
        };
        if let Some(address) = probe {
            images::check_after_open(&path, address, &before, &sha256)?;
        }
        let (abi, functions, entrypoints) = match version {
            Ok(version) => match Self::load_v2(&path, &library, version)? {
                Some(v2) => v2,
                None => Self::load_v1(&path, &library)?,
            },
            Err(_) => Self::load_v1(&path, &library)?,
        };
        tracing::info!(
            path = %path.display(),
            sha256 = %sha256,
            abi = %abi,
            functions = %functions
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            "loaded plugin library"
        );
        let arg_schemas = functions.iter().map(batch::ArgSchemas::new).collect();
        Ok(Arc::new(PluginLibrary {
            path,
            sha256,
            abi,
            functions,
            entrypoints,
            arg_schemas,
            _handle: library,
        }))
    }

    fn load_v1(
        path: &Path,
        library: &dlopen2::raw::Library,
    ) -> Result<(Abi, Vec<FunctionSignature>, Entrypoints), LoadError> {
        // SAFETY: `plugin_metadata` is declared by the v1 ABI as `PluginMetadata (void)`; we read
        // the answer through `RawMetadata`, which has the same layout and accepts any tag.
        let metadata: MetadataFn = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) }
            .map_err(|e| missing_symbol(path, udf_abi::SYMBOL_METADATA, e))?;
        // SAFETY: `plugin_entrypoint` is declared by the v1 ABI with exactly this signature; the
        // result is read through `RawResult`, which accepts any tag.
        let entrypoint: EntrypointFn = unsafe { library.symbol(udf_abi::SYMBOL_ENTRYPOINT) }
            .map_err(|e| missing_symbol(path, udf_abi::SYMBOL_ENTRYPOINT, e))?;
        // SAFETY: the function pointer comes from the library, which is alive; the v1 ABI says it
        // takes no arguments.
        let raw = unsafe { metadata() };
        let signature = validate_metadata(&raw).map_err(|reason| LoadError::InvalidMetadata {
            path: path.to_path_buf(),
            symbol: udf_abi::SYMBOL_METADATA,
            reason,
        })?;
        Ok((Abi::V1, vec![signature], Entrypoints::V1(entrypoint)))
    }

    /// Loads a v2 library; `None` for a library whose manifest is empty but which exports the v1
    /// symbols: a v1 plugin written against the `udf-abi` crate carries that crate's (empty) v2
    /// exports, and is loaded as v1.
    #[allow(clippy::type_complexity)]
    fn load_v2(
        path: &Path,
        library: &dlopen2::raw::Library,
        version: VersionFn,
    ) -> Result<Option<(Abi, Vec<FunctionSignature>, Entrypoints)>, LoadError> {
        // SAFETY: resolved from the live library; ABI v2 declares it as taking no arguments.
        let found = unsafe { version() };
        if found.major != v2::ABI_MAJOR {
            return Err(LoadError::AbiMismatch {
                path: path.to_path_buf(),
                found_major: found.major,
                found_minor: found.minor,
                expected_major: v2::ABI_MAJOR,
            });
        }
        let invalid = |reason| LoadError::InvalidMetadata {
            path: path.to_path_buf(),
            symbol: v2::SYMBOL_MANIFEST,
            reason,
        };
        let known = size_of::<UdfManifest>();
        if found.manifest_size < known {
            return Err(invalid(MetadataError::ManifestTooSmall {
                found: found.manifest_size,
                expected: known,
            }));
        }
        // SAFETY: ABI v2 declares `udfsql_manifest` as `const UdfManifest *(void)`.
        let manifest: ManifestFn = unsafe { library.symbol(v2::SYMBOL_MANIFEST) }
            .map_err(|e| missing_symbol(path, v2::SYMBOL_MANIFEST, e))?;
        // SAFETY: resolved from the live library; takes no arguments.
        let manifest = unsafe { manifest() };
        if manifest.is_null() {
            return Err(invalid(MetadataError::NullManifest));
        }
        // SAFETY: non-null, and the handshake says the manifest is at least `known` bytes; we read
        // only the ABI 2.0 prefix. `UdfManifest` has no field with invalid bit patterns.
        let manifest = unsafe { manifest.read() };
        if manifest.size < known {
            return Err(invalid(MetadataError::ManifestTooSmall {
                found: manifest.size,
                expected: known,
            }));
        }
        let release = manifest
            .release_bytes
            .ok_or_else(|| invalid(MetadataError::NullRelease))?;
        let len = manifest.functions_len;
        if len == 0 {
            // SAFETY: only looked up, never called here; the type is irrelevant for a lookup.
            let v1: Result<MetadataFn, _> = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) };
            if v1.is_ok() {
                return Ok(None);
            }
            return Err(invalid(MetadataError::NoFunctions));
        }
        let entries: &[UdfFunction] = if manifest.functions.is_null() {
            return Err(invalid(MetadataError::BadFunctionList {
                len,
                pointer: "a null pointer",
            }));
        } else if len > MAX_FUNCTIONS {
            return Err(invalid(MetadataError::BadFunctionList {
                len,
                pointer: "more than the limit of 4096",
            }));
        } else {
            // SAFETY: non-null, bounded, and ABI v2 says it points at `functions_len` static
            // `UdfFunction`s; the struct has no field with invalid bit patterns.
            unsafe { std::slice::from_raw_parts(manifest.functions, len) }
        };
        let mut functions = Vec::with_capacity(len);
        let mut rows = Vec::with_capacity(len);
        let mut batches = Vec::with_capacity(len);
        for entry in entries {
            let (signature, row) = validate_function(entry).map_err(invalid)?;
            // `call_batch` is reserved (null) in ABI 2.0 and defined from 2.1 on.
            batches.push(entry.call_batch.filter(|_| found.minor >= 1));
            if functions
                .iter()
                .any(|f: &FunctionSignature| f.name == signature.name)
            {
                return Err(invalid(MetadataError::DuplicateName {
                    function: signature.name,
                }));
            }
            functions.push(signature);
            rows.push(row);
        }
        Ok(Some((
            Abi::V2 { minor: found.minor },
            functions,
            Entrypoints::V2 {
                release,
                rows,
                batches,
            },
        )))
    }

    /// The canonical path the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SHA-256 digest of the file that was loaded.
    pub fn sha256(&self) -> &Sha256Digest {
        &self.sha256
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

    /// A callable handle to the function the library calls `name`.
    pub fn function_named(self: &Arc<Self>, name: &str) -> Option<PluginFunction> {
        let index = self.functions.iter().position(|f| f.name == name)?;
        self.function(index)
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

fn name_from_bytes(bytes: &[u8]) -> Result<String, MetadataError> {
    if bytes.is_empty() {
        return Err(MetadataError::EmptyName);
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| MetadataError::NonUtf8Name {
        bytes: e.into_bytes(),
    })
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
    name_from_bytes(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

fn type_from_tag(
    function: &str,
    position: TypePosition,
    tag: u32,
    max: UdfType,
) -> Result<UdfType, MetadataError> {
    UdfType::from_tag(tag)
        .filter(|t| t.tag() <= max.tag())
        .ok_or_else(|| MetadataError::UnknownTypeTag {
            function: function.to_string(),
            position,
            tag,
            max: max.tag(),
        })
}

/// Reads `len` u32 type tags (or nothing for `len == 0`), checking the pointer and the bound.
fn read_tags<'a>(function: &str, ptr: *const u32, len: usize) -> Result<&'a [u32], MetadataError> {
    if len > MAX_ARGS {
        return Err(MetadataError::TooManyArgs {
            function: function.to_string(),
            len,
            max: MAX_ARGS,
        });
    }
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(MetadataError::NullArgTypes {
            function: function.to_string(),
            len,
        });
    }
    // SAFETY: non-null, at most MAX_ARGS entries, and both ABIs say it points at `len` u32-sized
    // tags in the library's static data, which outlives the returned borrow's use here.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

fn validate_metadata(raw: &RawMetadata) -> Result<FunctionSignature, MetadataError> {
    let name = read_name(raw.name)?;
    let tags = read_tags(&name, raw.arg_types, raw.arg_types_len)?;
    let arg_types = tags
        .iter()
        .enumerate()
        .map(|(i, &tag)| type_from_tag(&name, TypePosition::Argument(i), tag, UdfType::Utf8))
        .collect::<Result<Vec<_>, _>>()?;
    let return_type = type_from_tag(&name, TypePosition::Return, raw.return_type, UdfType::Utf8)?;
    Ok(FunctionSignature {
        arg_nullable: vec![false; arg_types.len()],
        name,
        arg_types,
        return_type,
        return_nullable: false,
        volatility: None,
    })
}

fn flag(function: &str, field: &'static str, value: u8) -> Result<bool, MetadataError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(MetadataError::InvalidField {
            function: function.to_string(),
            field,
            value: value.into(),
        }),
    }
}

fn validate_function(
    entry: &UdfFunction,
) -> Result<(FunctionSignature, RowEntrypoint), MetadataError> {
    let UdfBytes { ptr, len } = entry.name;
    if ptr.is_null() {
        return Err(MetadataError::NullName);
    }
    if len > MAX_NAME_LEN {
        return Err(MetadataError::NameTooLong { max: MAX_NAME_LEN });
    }
    // SAFETY: non-null, bounded, and ABI v2 says the name is `len` bytes of static data.
    let name = name_from_bytes(unsafe { std::slice::from_raw_parts(ptr, len) })?;
    let tags = read_tags(&name, entry.arg_types, entry.args_len)?;
    let last = UdfType::TimestampMicros;
    let arg_types = tags
        .iter()
        .enumerate()
        .map(|(i, &tag)| type_from_tag(&name, TypePosition::Argument(i), tag, last))
        .collect::<Result<Vec<_>, _>>()?;
    let arg_nullable = if entry.arg_nullable.is_null() {
        vec![false; arg_types.len()]
    } else {
        // SAFETY: non-null, and ABI v2 says it points at `args_len` (checked ≤ MAX_ARGS) flags.
        let flags = unsafe { std::slice::from_raw_parts(entry.arg_nullable, arg_types.len()) };
        flags
            .iter()
            .map(|&f| flag(&name, "arg_nullable", f))
            .collect::<Result<Vec<_>, _>>()?
    };
    let return_type = type_from_tag(&name, TypePosition::Return, entry.return_type, last)?;
    let return_nullable = flag(&name, "return_nullable", entry.return_nullable)?;
    let volatility = match entry.volatility {
        v2::volatility::IMMUTABLE => DeclaredVolatility::Immutable,
        v2::volatility::STABLE => DeclaredVolatility::Stable,
        v2::volatility::VOLATILE => DeclaredVolatility::Volatile,
        other => {
            return Err(MetadataError::InvalidField {
                function: name,
                field: "volatility",
                value: other,
            });
        }
    };
    let Some(row) = entry.call_row else {
        return Err(MetadataError::NullEntrypoint { function: name });
    };
    Ok((
        FunctionSignature {
            name,
            arg_types,
            arg_nullable,
            return_type,
            return_nullable,
            volatility: Some(volatility),
        },
        row,
    ))
}

/// One argument value for a row call, borrowed from the caller's arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgRef<'a> {
    /// SQL NULL, for an argument that takes NULLs.
    Null,
    /// A `Bool` argument.
    Bool(bool),
    /// An `Int` (Int64) argument.
    Int(i64),
    /// A `UInt` (UInt64) argument.
    UInt(u64),
    /// A `Double` (Float64) argument.
    Double(f64),
    /// A `String` argument. v1 copies it NUL-terminated into the call's scratch buffer; v2 passes
    /// pointer and length without a copy.
    Str(&'a str),
    /// An `Int32` argument.
    Int32(i32),
    /// A `Float32` argument.
    Float32(f32),
    /// A `Binary` argument, passed without a copy.
    Bytes(&'a [u8]),
    /// A `Date` argument: days since 1970-01-01.
    Date32(i32),
    /// A `Timestamp` argument: microseconds since the epoch, UTC.
    Timestamp(i64),
}

impl ArgRef<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            ArgRef::Null => "NULL",
            ArgRef::Bool(_) => UdfType::Bool.name(),
            ArgRef::Int(_) => UdfType::Int64.name(),
            ArgRef::UInt(_) => UdfType::UInt64.name(),
            ArgRef::Double(_) => UdfType::Float64.name(),
            ArgRef::Str(_) => UdfType::Utf8.name(),
            ArgRef::Int32(_) => UdfType::Int32.name(),
            ArgRef::Float32(_) => UdfType::Float32.name(),
            ArgRef::Bytes(_) => UdfType::Binary.name(),
            ArgRef::Date32(_) => UdfType::Date32.name(),
            ArgRef::Timestamp(_) => UdfType::TimestampMicros.name(),
        }
    }

    /// The v2 value of this argument, if it has type `t` (NULL fits any type; the caller checks
    /// nullability).
    fn to_v2(self, t: UdfType) -> Option<UdfValue> {
        let scalar = match (self, t) {
            (ArgRef::Null, _) => return Some(UdfValue::NULL),
            (ArgRef::Bool(b), UdfType::Bool) => UdfScalar { boolean: b as u8 },
            (ArgRef::Int(v), UdfType::Int64) => UdfScalar { int64: v },
            (ArgRef::UInt(v), UdfType::UInt64) => UdfScalar { uint64: v },
            (ArgRef::Double(v), UdfType::Float64) => UdfScalar { float64: v },
            (ArgRef::Int32(v), UdfType::Int32) => UdfScalar { int32: v },
            (ArgRef::Float32(v), UdfType::Float32) => UdfScalar { float32: v },
            (ArgRef::Date32(v), UdfType::Date32) => UdfScalar { int32: v },
            (ArgRef::Timestamp(v), UdfType::TimestampMicros) => UdfScalar { int64: v },
            (ArgRef::Str(s), UdfType::Utf8) => UdfScalar {
                bytes: UdfBytes {
                    ptr: s.as_ptr(),
                    len: s.len(),
                },
            },
            (ArgRef::Bytes(b), UdfType::Binary) => UdfScalar {
                bytes: UdfBytes {
                    ptr: b.as_ptr(),
                    len: b.len(),
                },
            },
            _ => return None,
        };
        Some(UdfValue {
            is_null: 0,
            value: scalar,
        })
    }
}

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

    /// The bytes as a string; `Returned::Str` values were validated as UTF-8 on receipt.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
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
fn check_status(
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
fn take_v2_bytes(
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

/// A value returned by one call.
#[derive(Debug)]
pub enum Returned {
    /// SQL NULL (only from functions declared to return NULL).
    Null,
    /// A `Bool` result.
    Bool(bool),
    /// An `Int` result.
    Int(i64),
    /// A `UInt` result.
    UInt(u64),
    /// A `Double` result.
    Double(f64),
    /// A `String` result (valid UTF-8), handed back to the plugin when dropped.
    Str(PluginBytes),
    /// An `Int32` result.
    Int32(i32),
    /// A `Float32` result.
    Float32(f32),
    /// A `Binary` result, handed back to the plugin when dropped.
    Bytes(PluginBytes),
    /// A `Date` result: days since 1970-01-01.
    Date32(i32),
    /// A `Timestamp` result: microseconds since the epoch, UTC.
    Timestamp(i64),
}

/// Reusable per-batch memory for row calls: v1's NUL-terminated copies of string arguments and
/// the argument arrays. Reusing it means no heap allocation per row once it has grown.
#[derive(Debug, Default)]
pub struct RowScratch {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    values: Vec<PluginValue>,
    values_v2: Vec<UdfValue>,
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

    /// Whether the function has a batch (Arrow C Data Interface) entrypoint.
    pub fn has_batch(&self) -> bool {
        self.batch_entrypoint().is_some()
    }

    fn batch_entrypoint(&self) -> Option<BatchEntrypoint> {
        match &self.library.entrypoints {
            Entrypoints::V2 { batches, .. } => batches[self.index],
            Entrypoints::V1(_) => None,
        }
    }

    /// Calls the function for one row. `args` must match the declared types, and be
    /// [`ArgRef::Null`] only where the argument takes NULLs (checked).
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
        match &self.library.entrypoints {
            Entrypoints::V1(entrypoint) => self.call_v1(*entrypoint, scratch, args),
            Entrypoints::V2 { release, rows, .. } => {
                self.call_v2(rows[self.index], *release, scratch, args)
            }
        }
    }

    fn call_v1(
        &self,
        entrypoint: EntrypointFn,
        scratch: &mut RowScratch,
        args: &[ArgRef<'_>],
    ) -> Result<Returned, CallError> {
        let signature = self.signature();
        // First copy every string (the buffer may move while it grows), then take pointers.
        scratch.bytes.clear();
        scratch.offsets.clear();
        scratch.values.clear();
        for (index, (arg, &expected)) in args.iter().zip(&signature.arg_types).enumerate() {
            let mismatch = || CallError::ArgumentType {
                index,
                expected,
                found: arg.type_name(),
            };
            let value = match (*arg, expected) {
                (ArgRef::Bool(b), UdfType::Bool) => PluginValue::Bool(b),
                (ArgRef::Int(i), UdfType::Int64) => PluginValue::Int(i),
                (ArgRef::UInt(u), UdfType::UInt64) => PluginValue::UInt(u),
                (ArgRef::Double(d), UdfType::Float64) => PluginValue::Double(d),
                (ArgRef::Str(s), UdfType::Utf8) => {
                    if s.as_bytes().contains(&0) {
                        return Err(CallError::InteriorNul { index });
                    }
                    scratch.offsets.push(scratch.bytes.len());
                    scratch.bytes.extend_from_slice(s.as_bytes());
                    scratch.bytes.push(0);
                    // A placeholder; the pointer is set below, once `bytes` stops growing.
                    PluginValue::String(std::ptr::null())
                }
                _ => return Err(mismatch()),
            };
            scratch.values.push(value);
        }
        let base = scratch.bytes.as_ptr();
        let mut offsets = scratch.offsets.iter();
        for value in &mut scratch.values {
            if let PluginValue::String(ptr) = value {
                let offset = offsets.next().copied().unwrap_or_default();
                // `wrapping_add` keeps this safe code; the offset is within `bytes`.
                *ptr = base.wrapping_add(offset).cast();
            }
        }

        // SAFETY: the entrypoint belongs to `self.library`, which is alive (we hold an Arc).
        // `values` holds exactly the declared number of arguments, each of the declared type;
        // string pointers point into `scratch.bytes`, NUL-terminated without interior NULs, and
        // neither buffer is touched until the call returns.
        let raw = unsafe { entrypoint(scratch.values.as_ptr(), scratch.values.len()) };
        // SAFETY: `raw` came from the entrypoint of this function, per the v1 contract.
        unsafe { self.convert_v1_result(raw) }
    }

    /// Reads a v1 result, taking ownership of any string or message in it.
    ///
    /// # Safety
    ///
    /// `raw` must have been returned by this function's v1 entrypoint.
    unsafe fn convert_v1_result(&self, raw: RawResult) -> Result<Returned, CallError> {
        let expected = self.signature().return_type;
        match raw.tag {
            RESULT_OK => {
                // SAFETY: the tag says `Ok`, so the `ok` member is the active one.
                let value = unsafe { raw.payload.ok };
                let found = UdfType::from_tag(value.tag).filter(|t| t.tag() <= UdfType::Utf8.tag());
                if found != Some(expected) {
                    if found == Some(UdfType::Utf8) {
                        // SAFETY: the tag says String, so `string` is active: a malloc'ed string
                        // handed to the host, freed here (taking it checks for null) so that a
                        // result of the wrong type does not leak.
                        drop(unsafe { take_v1_string(value.payload.string) });
                    }
                    return Err(CallError::ReturnType {
                        expected,
                        found: found
                            .map_or_else(|| format!("tag {}", value.tag), |t| t.to_string()),
                    });
                }
                // The tag equals the declared type, so that member of the union is the active
                // one; a string is handed to the host per ABI v1 and taken over exactly once.
                Ok(match expected {
                    UdfType::Bool => {
                        // SAFETY: the tag is Bool, so `boolean` is active (read as a byte).
                        match unsafe { value.payload.boolean } {
                            0 => Returned::Bool(false),
                            1 => Returned::Bool(true),
                            byte => return Err(CallError::InvalidBool(byte)),
                        }
                    }
                    // SAFETY: the tag is Int, so `int` is active.
                    UdfType::Int64 => Returned::Int(unsafe { value.payload.int }),
                    // SAFETY: the tag is UInt, so `uint` is active.
                    UdfType::UInt64 => Returned::UInt(unsafe { value.payload.uint }),
                    // SAFETY: the tag is Double, so `double` is active.
                    UdfType::Float64 => Returned::Double(unsafe { value.payload.double }),
                    // SAFETY: the tag is String, so `string` is active; ABI v1 hands it to the
                    // host (malloc'ed, NUL-terminated) and we take it over once.
                    _ => Returned::Str(unsafe { take_v1_string(value.payload.string) }?),
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

    fn call_v2(
        &self,
        entrypoint: RowEntrypoint,
        release: ReleaseBytes,
        scratch: &mut RowScratch,
        args: &[ArgRef<'_>],
    ) -> Result<Returned, CallError> {
        let signature = self.signature();
        scratch.values_v2.clear();
        for (index, arg) in args.iter().enumerate() {
            let expected = signature.arg_types[index];
            let fits = !matches!(arg, ArgRef::Null) || signature.arg_nullable[index];
            let value = arg
                .to_v2(expected)
                .filter(|_| fits)
                .ok_or(CallError::ArgumentType {
                    index,
                    expected,
                    found: arg.type_name(),
                })?;
            scratch.values_v2.push(value);
        }
        // Every byte of the value is initialised (the largest member, `owned`, spans the whole
        // union), so a plugin that sets `is_null = 0` without writing a value makes the host
        // read zeros, never uninitialised memory.
        let mut out = UdfValue {
            is_null: 1,
            value: UdfScalar {
                owned: UdfOwnedBytes::EMPTY,
            },
        };
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the entrypoint belongs to `self.library`, alive while we hold the Arc. The
        // arguments match the declared types and nullability; string and binary arguments
        // borrow from `args`, which outlive the call; `out` and `error` are valid for writes.
        let status = unsafe {
            entrypoint(
                scratch.values_v2.as_ptr(),
                scratch.values_v2.len(),
                &mut out,
                &mut error,
            )
        };
        check_status(status, error, release, &self.library)?;
        if out.is_null != 0 {
            return if signature.return_nullable {
                Ok(Returned::Null)
            } else {
                Err(CallError::UnexpectedNull)
            };
        }
        let v = out.value;
        // SAFETY (every arm): the plugin wrote the member of the declared return type.
        Ok(match signature.return_type {
            // SAFETY: Bool results live in `boolean`.
            UdfType::Bool => match unsafe { v.boolean } {
                0 => Returned::Bool(false),
                1 => Returned::Bool(true),
                byte => return Err(CallError::InvalidBool(byte)),
            },
            // SAFETY: Int64 results live in `int64`.
            UdfType::Int64 => Returned::Int(unsafe { v.int64 }),
            // SAFETY: UInt64 results live in `uint64`.
            UdfType::UInt64 => Returned::UInt(unsafe { v.uint64 }),
            // SAFETY: Float64 results live in `float64`.
            UdfType::Float64 => Returned::Double(unsafe { v.float64 }),
            // SAFETY: Int32 results live in `int32`.
            UdfType::Int32 => Returned::Int32(unsafe { v.int32 }),
            // SAFETY: Float32 results live in `float32`.
            UdfType::Float32 => Returned::Float32(unsafe { v.float32 }),
            // SAFETY: Date32 results live in `int32`.
            UdfType::Date32 => Returned::Date32(unsafe { v.int32 }),
            // SAFETY: TimestampMicros results live in `int64`.
            UdfType::TimestampMicros => Returned::Timestamp(unsafe { v.int64 }),
            UdfType::Utf8 => {
                // SAFETY: Utf8 results are owned bytes handed to the host.
                let bytes = take_v2_bytes(unsafe { v.owned }, release, &self.library)?;
                std::str::from_utf8(bytes.as_bytes()).map_err(CallError::InvalidUtf8)?;
                Returned::Str(bytes)
            }
            UdfType::Binary => {
                // SAFETY: Binary results are owned bytes handed to the host.
                let bytes = take_v2_bytes(unsafe { v.owned }, release, &self.library)?;
                Returned::Bytes(bytes)
            }
        })
    }
}
