//! The one module of the host that touches raw pointers and foreign code.
//!
//! [`PluginLibrary`] owns a `dlopen`ed library (ABI v1 or v2) and its validated metadata;
//! [`PluginFunction`] calls one of its functions over Arrow arrays, row by row (`rows`) or a
//! batch at a time (`batch`), and returns an Arrow array. Everything a v1 plugin hands back is read through
//! layout-identical "raw" mirrors of the `udf-abi` enums, so that a tag or a `bool` byte the ABI
//! does not define is an error instead of undefined behaviour; the v2 types have no Rust enums in
//! them and are read as they are.
//!
//! What the host cannot defend against: a plugin that crashes, corrupts memory, returns dangling
//! pointers, or never terminates a returned string. See the README's Safety section.

use std::ffi::{CStr, c_char};
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use udf_abi::v2::{
    self, BatchEntrypoint, ReleaseBytes, RowEntrypoint, UdfAbiVersion, UdfFunction, UdfManifest,
    UdfOwnedBytes, UdfType,
};
use udf_abi::{PluginMetadata, PluginResult, PluginType, PluginValue};

use crate::error::{CallError, LoadError, MetadataError};
use crate::trust::Sha256Digest;
use crate::types::ValueType;

mod arrow_result;
mod batch;
pub(crate) mod descriptors;
mod metadata;
pub(crate) mod shm;
use metadata::{validate_function, validate_metadata};
mod images;
pub use images::FileIdentity;
mod rows;

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
    pub arg_types: Vec<ValueType>,
    /// Per argument: whether it receives NULLs (v2 `Option<T>`); all false for v1.
    pub arg_nullable: Vec<bool>,
    /// The return type.
    pub return_type: ValueType,
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

    /// Whether an argument or the result has an Arrow type (ABI 2.2): such a function runs
    /// through its batch entrypoint only.
    pub fn has_arrow_types(&self) -> bool {
        self.arg_types
            .iter()
            .chain(std::iter::once(&self.return_type))
            .any(|t| t.tag().is_none())
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
        /// Per function: its row entrypoint; `None` for a function that runs in batches only.
        rows: Vec<Option<RowEntrypoint>>,
        batches: Vec<Option<BatchEntrypoint>>,
    },
}

/// A loaded plugin library with validated metadata.
///
/// The library stays loaded as long as this value lives, and is unloaded (`dlclose`) when it
/// drops. Everything that can call into the library holds an `Arc<PluginLibrary>`: every
/// registered UDF and running query (through [`PluginFunction`]), returned error messages
/// (`PluginBytes`), and every array a batch entrypoint produced (its `release` callback is
/// plugin code).
pub struct PluginLibrary {
    path: PathBuf,
    sha256: Sha256Digest,
    abi: Abi,
    functions: Vec<FunctionSignature>,
    entrypoints: Entrypoints,
    /// Per function: its arguments' canonical schemas, exported once for every batch call.
    arg_schemas: Vec<Option<batch::ArgSchemas>>,
    /// Per function: the bytes per row its last row-path batch wrote to a string or binary
    /// result, so that the next batch sizes its values buffer once.
    row_bytes_per_row: Box<[std::sync::atomic::AtomicUsize]>,
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
pub fn open_regular_file(path: &Path) -> Result<std::fs::File, LoadError> {
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
pub const MAX_FUNCTIONS: usize = udf_abi::MAX_FUNCTIONS;

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
    /// The file is opened once and copied into a sealed memory file; the digest is the copy's and
    /// `dlopen` maps that copy, so a file renamed over the path or rewritten in place during the
    /// load cannot run. A process holds one library per path: while it holds one, a load of the
    /// same path compares the file now there with it (device, inode, size, times; the digest when
    /// they differ) and gives the same library for the same bytes, and
    /// [`LoadError::StaleImage`] for other bytes (a fresh load once the old one is dropped).
    pub fn load_pinned(
        path: impl AsRef<Path>,
        pin: Option<&Sha256Digest>,
    ) -> Result<Arc<PluginLibrary>, LoadError> {
        let given = path.as_ref();
        let path = std::fs::canonicalize(given).map_err(|source| LoadError::NotFound {
            path: given.to_path_buf(),
            source,
        })?;
        // One open from hash to map (see `images`): the file is opened once and copied into a
        // sealed memory file; its digest is the copy's, and `dlopen` maps that copy.
        let read_error = |source: std::io::Error| LoadError::Read {
            path: path.clone(),
            source,
        };
        let file = open_regular_file(&path)?;
        let before = file.metadata().map_err(read_error)?;
        let identity = images::FileIdentity::of(&before);
        // The library this process holds for the path, if any: the file now at the path is
        // compared with it, so that a replaced file never gets the old code.
        let held = images::held(&path);
        if let Some((library, file_then)) = &held
            && *file_then == identity
        {
            crate::trust::check_pin(&path, pin, library.sha256())?;
            return Ok(Arc::clone(library));
        }
        let copy = images::SealedCopy::of(&path, &file)?;
        let after = file.metadata().map_err(read_error)?;
        if images::FileIdentity::of(&after) != identity {
            return Err(LoadError::ChangedWhileLoading { path });
        }
        drop(file);
        let sha256 = *copy.sha256();
        crate::trust::check_pin(&path, pin, &sha256)?;
        if let Some((library, _)) = held {
            if *library.sha256() == sha256 {
                images::refresh(&path, &library, identity);
                return Ok(library);
            }
            return Err(images::stale(&path, &library, &sha256));
        }
        let (library, mapped) = copy.map(&path, libc::RTLD_NOW | libc::RTLD_LOCAL)?;
        // SAFETY: `udfsql_abi_version` is declared by ABI v2 as `UdfAbiVersion (void)`, a struct
        // of plain integers that is valid for any bits.
        let version: Result<VersionFn, _> = unsafe { library.symbol(v2::SYMBOL_ABI_VERSION) };
        // Before any code of the library is called by the host: the image `dlopen` returned must
        // be the sealed copy that was hashed.
        // SAFETY: only the address is used, to find the mapping it lies in; never called here.
        let metadata: Result<MetadataFn, _> = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) };
        let probe = match (&version, &metadata) {
            (Ok(f), _) => Some(*f as usize),
            (_, Ok(f)) => Some(*f as usize),
            _ => None,
        };
        if let Some(address) = probe {
            mapped.check(&path, address)?;
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
        let row_bytes_per_row = functions
            .iter()
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect();
        let library = Arc::new(PluginLibrary {
            path: path.clone(),
            sha256,
            abi,
            functions,
            entrypoints,
            arg_schemas,
            row_bytes_per_row,
            _handle: library,
        });
        images::record(&path, library, identity)
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
        // Libraries of ABI 2.0 and 2.1 have the shorter manifest: read what the library has, up
        // to what this host knows, and leave the rest zero (a null `arrow_types`).
        if found.manifest_size < v2::MANIFEST_SIZE_2_0 {
            return Err(invalid(MetadataError::ManifestTooSmall {
                found: found.manifest_size,
                expected: v2::MANIFEST_SIZE_2_0,
            }));
        }
        // SAFETY: ABI v2 declares `udfsql_manifest` as `const UdfManifest *(void)`.
        let manifest: ManifestFn = unsafe { library.symbol(v2::SYMBOL_MANIFEST) }
            .map_err(|e| missing_symbol(path, v2::SYMBOL_MANIFEST, e))?;
        // SAFETY: resolved from the live library; takes no arguments.
        let manifest = unsafe { manifest() };
        let has_v1 = || {
            // SAFETY: only looked up, never called here; the type is irrelevant for a lookup.
            let v1: Result<MetadataFn, _> = unsafe { library.symbol(udf_abi::SYMBOL_METADATA) };
            v1.is_ok()
        };
        // SAFETY: `manifest` is what the library's `udfsql_manifest` returned, and `found` its
        // handshake: ABI v2 promises what `read_manifest` requires of them.
        unsafe { read_manifest(found, manifest, &has_v1) }.map_err(invalid)
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

/// A v2 library's functions, read from its manifest; `None` for a library whose manifest is
/// empty but which exports the v1 symbols (`has_v1`). Every field is read only where it is
/// needed: the ABI 2.2 `arrow_types` entry of a function only when one of its types is
/// [`v2::TYPE_ARROW`], so that a library of a later minor, whose manifest has fields this host
/// does not know, loads when none of its functions uses what it does not know.
///
/// # Safety
///
/// `manifest` is null, or points at `found.manifest_size` readable bytes laid out as ABI v2's
/// `UdfManifest` (of `found.minor`), whose pointers are valid as ABI v2 says: `functions` holds
/// `functions_len` entries, each pointing at the arrays its lengths say, and `arrow_types` holds
/// `functions_len` entries wherever a function declares a [`v2::TYPE_ARROW`] type (ABI 2.2).
/// Nothing else is assumed: every value (counts, tags, flags, sizes, versions) is checked before
/// it is used as a bound.
#[allow(clippy::type_complexity)]
unsafe fn read_manifest(
    found: UdfAbiVersion,
    manifest: *const UdfManifest,
    has_v1: &dyn Fn() -> bool,
) -> Result<Option<(Abi, Vec<FunctionSignature>, Entrypoints)>, MetadataError> {
    let least = v2::MANIFEST_SIZE_2_0;
    if found.manifest_size < least {
        return Err(MetadataError::ManifestTooSmall {
            found: found.manifest_size,
            expected: least,
        });
    }
    if manifest.is_null() {
        return Err(MetadataError::NullManifest);
    }
    let readable = found.manifest_size.min(size_of::<UdfManifest>());
    let mut prefix = std::mem::MaybeUninit::<UdfManifest>::zeroed();
    // SAFETY: non-null, and the caller promises `manifest_size` readable bytes, of which we copy
    // at most the `size_of::<UdfManifest>()` this host knows into a zeroed value. Every field of
    // `UdfManifest` (integers, raw pointers, an optional function pointer) is valid when zero and
    // for any bits.
    let manifest = unsafe {
        std::ptr::copy_nonoverlapping(
            manifest.cast::<u8>(),
            prefix.as_mut_ptr().cast::<u8>(),
            readable,
        );
        prefix.assume_init()
    };
    if manifest.size < least {
        return Err(MetadataError::ManifestTooSmall {
            found: manifest.size,
            expected: least,
        });
    }
    // `arrow_types` exists from ABI 2.2 on, in a manifest long enough to hold it. Its entries
    // are read below only for the functions that declare an Arrow type.
    let arrow_types = if found.minor >= 2
        && manifest.size >= size_of::<UdfManifest>()
        && readable == size_of::<UdfManifest>()
    {
        manifest.arrow_types
    } else {
        std::ptr::null()
    };
    let release = manifest.release_bytes.ok_or(MetadataError::NullRelease)?;
    let len = manifest.functions_len;
    if len == 0 {
        if has_v1() {
            return Ok(None);
        }
        return Err(MetadataError::NoFunctions);
    }
    let entries: &[UdfFunction] = if manifest.functions.is_null() {
        return Err(MetadataError::BadFunctionList {
            len,
            pointer: "a null pointer",
        });
    } else if len > MAX_FUNCTIONS {
        return Err(MetadataError::BadFunctionList {
            len,
            pointer: "more than the limit of 4096",
        });
    } else {
        // SAFETY: non-null, bounded, and the caller promises `functions_len` `UdfFunction`s;
        // the struct has no field with invalid bit patterns.
        unsafe { std::slice::from_raw_parts(manifest.functions, len) }
    };
    let mut functions = Vec::with_capacity(len);
    let mut rows = Vec::with_capacity(len);
    let mut batches = Vec::with_capacity(len);
    for (i, entry) in entries.iter().enumerate() {
        // Read only when the function's tags say it has an Arrow type.
        let arrow = || {
            (!arrow_types.is_null()).then(|| {
                // SAFETY: non-null, and the caller promises (ABI 2.2) that `arrow_types` holds
                // `functions_len` (bounded above) entries parallel to `functions` when a function
                // declares TYPE_ARROW, which is when this is called; `UdfArrowTypes` is two raw
                // pointers, valid for any bits.
                unsafe { arrow_types.add(i).read() }
            })
        };
        // `call_batch` is reserved (null) in ABI 2.0 and defined from 2.1 on.
        let batch = entry.call_batch.filter(|_| found.minor >= 1);
        let (signature, row) = validate_function(entry, &arrow, batch.is_some(), found.minor)?;
        batches.push(batch);
        if functions
            .iter()
            .any(|f: &FunctionSignature| f.name == signature.name)
        {
            return Err(MetadataError::DuplicateName {
                function: signature.name,
            });
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

/// [`crate::types::fuzz::manifests`]: manifests built in memory, read by [`read_manifest`].
pub(crate) fn fuzz_manifests(
    seed: u64,
    cases: u64,
) -> Result<crate::types::fuzz::Report, crate::types::fuzz::Failure> {
    metadata::manifest_fuzz::manifests(seed, cases)
}

/// The functions a manifest declares, or why it is refused: [`read_manifest`] for the
/// randomised tests of [`crate::types::fuzz`], which build manifests in memory.
///
/// # Safety
///
/// As for [`read_manifest`].
unsafe fn check_manifest(
    found: UdfAbiVersion,
    manifest: *const UdfManifest,
) -> Result<Vec<FunctionSignature>, MetadataError> {
    // SAFETY: the caller's promise, passed on.
    unsafe { read_manifest(found, manifest, &|| false) }
        .map(|v2| v2.map(|(_, functions, _)| functions).unwrap_or_default())
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
