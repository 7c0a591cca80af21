//! Loading a library: the file opened once and copied into a sealed memory file (`images`),
//! `dlopen` of that copy, the ABI handshake (v1 seed contract or v2), and the manifest read into
//! [`FunctionSignature`]s (see [`super::manifest`]). [`PluginLibrary`] holds what was loaded.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use udf_abi::v2::{
    self, AsyncCancel, AsyncStart, BatchEntrypoint, ReleaseBytes, RowEntrypoint, UdfAbiVersion,
    UdfManifest, UnloadHook,
};

use super::manifest::{FunctionSignature, read_manifest};
use super::metadata::validate_metadata;
use super::scalar::{ArgSchemas, PluginFunction};
use super::{EntrypointFn, MetadataFn, images};
use crate::error::{LoadError, MetadataError};
use crate::trust::Sha256Digest;

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

pub(super) enum Entrypoints {
    V1(EntrypointFn),
    V2 {
        release: ReleaseBytes,
        /// Per function: its row entrypoint; `None` for a function that runs in batches only.
        rows: Vec<Option<RowEntrypoint>>,
        batches: Vec<Option<BatchEntrypoint>>,
        /// Per function: its asynchronous entrypoints (ABI 2.3); `None` for a synchronous one.
        asyncs: Vec<Option<AsyncEntrypoints>>,
        /// Called before the library is unmapped (ABI 2.3).
        unload: Option<UnloadHook>,
        /// ABI 2.4: the aggregate functions.
        aggregates: Vec<super::aggregate::LoadedAggregate>,
    },
}

/// An asynchronous function's entrypoints and defaults (ABI 2.3).
#[derive(Debug, Clone, Copy)]
pub(super) struct AsyncEntrypoints {
    pub(super) start: AsyncStart,
    pub(super) cancel: Option<AsyncCancel>,
    /// The library's default for calls in flight; 0 = the host's.
    pub(super) max_in_flight: u32,
    /// The library's default rows per call; 0 = the host's.
    pub(super) chunk_rows: u32,
}

/// A loaded plugin library with validated metadata.
///
/// The library stays loaded as long as this value lives, and is unloaded (`dlclose`) when it
/// drops. Everything that can call into the library holds an `Arc<PluginLibrary>`: every
/// registered UDF and running query (through [`PluginFunction`]), returned error messages
/// (`PluginBytes`), and every array a batch entrypoint produced (its `release` callback is
/// plugin code).
pub struct PluginLibrary {
    pub(super) path: PathBuf,
    sha256: Sha256Digest,
    abi: Abi,
    pub(super) functions: Vec<FunctionSignature>,
    pub(super) entrypoints: Entrypoints,
    /// Per function: its arguments' canonical schemas, exported once for every batch call.
    pub(super) arg_schemas: Vec<Option<ArgSchemas>>,
    /// Per function: the bytes per row its last row-path batch wrote to a string or binary
    /// result, so that the next batch sizes its values buffer once.
    pub(super) row_bytes_per_row: Box<[std::sync::atomic::AtomicUsize]>,
    /// The `dlopen` handle: dropping it unloads the library, after the fields above (taken by
    /// `drop` only).
    handle: Option<dlopen2::raw::Library>,
}

impl Drop for PluginLibrary {
    /// Runs the library's unload hook (ABI 2.3), then drops the handle, which unmaps it. Every
    /// call of the library holds the library (an outstanding asynchronous call too, until the
    /// plugin completes it), so when this runs no call is outstanding. When the last reference
    /// goes inside a host release callback a plugin called ([`releasing_for_a_plugin`]), perhaps
    /// on a thread of this very library, both happen on a host thread instead: the unload hook
    /// may wait for the library's threads, and the code that thread runs must stay mapped.
    fn drop(&mut self) {
        let unload = match &self.entrypoints {
            Entrypoints::V2 {
                unload: Some(unload),
                ..
            } => Some(*unload),
            _ => None,
        };
        let handle = self.handle.take();
        let finish = move || {
            if let Some(unload) = unload {
                // SAFETY: ABI 2.3 declares `unload` as `void (void)`, called once before the
                // library is unmapped; the library is still mapped (`handle` drops after this).
                unsafe { unload() };
            }
            drop(handle);
        };
        if RELEASING_FOR_A_PLUGIN.with(Cell::get) {
            on_a_host_thread(Box::new(finish));
        } else {
            finish();
        }
    }
}

thread_local! {
    /// Whether this thread runs a host release callback that plugin code called.
    static RELEASING_FOR_A_PLUGIN: Cell<bool> = const { Cell::new(false) };
}

/// Runs `release`, the work of a host release callback that a plugin calls (on any thread, its
/// own ones too: it may keep an argument array past the call): a library whose last reference
/// goes inside is unloaded and unmapped on a host thread ([`on_a_host_thread`]).
pub(crate) fn releasing_for_a_plugin<T>(release: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RELEASING_FOR_A_PLUGIN.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(RELEASING_FOR_A_PLUGIN.with(|flag| flag.replace(true)));
    release()
}

/// Whether this thread runs inside [`releasing_for_a_plugin`] now.
#[cfg(test)]
pub(crate) fn releasing_now() -> bool {
    RELEASING_FOR_A_PLUGIN.with(Cell::get)
}

/// Runs `job` on the host's reaper thread, one for the process, started on first use: what
/// must not run on a plugin's thread (a library's unload hook and unmapping). Without that
/// thread (it could not be started), `job` is leaked: a library left mapped is the safe failure.
pub(crate) fn on_a_host_thread(job: Box<dyn FnOnce() + Send>) {
    type Job = Box<dyn FnOnce() + Send>;
    static REAPER: LazyLock<Option<Mutex<std::sync::mpsc::Sender<Job>>>> = LazyLock::new(|| {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("udfsql-library-reaper".into())
            .spawn(move || receiver.into_iter().for_each(|job| job()))
            .ok()
            .map(|_| Mutex::new(sender))
    });
    // The job itself is moved to the reaper, never shared: what it drops is dropped there.
    let unsent = match REAPER.as_ref() {
        Some(sender) => sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .err()
            .map(|unsent| unsent.0),
        None => Some(job),
    };
    if let Some(job) = unsent {
        std::mem::forget(job);
    }
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
        let arg_schemas = functions.iter().map(ArgSchemas::new).collect();
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
            handle: Some(library),
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
        (index < self.functions.len()).then(|| PluginFunction::new(Arc::clone(self), index))
    }

    /// A callable handle to the function the library calls `name`.
    /// The library's aggregate functions (ABI 2.4), in manifest order.
    pub fn aggregates(&self) -> Vec<&super::aggregate::AggregateSignature> {
        match &self.entrypoints {
            Entrypoints::V2 { aggregates, .. } => {
                aggregates.iter().map(|a| a.signature()).collect()
            }
            Entrypoints::V1(_) => Vec::new(),
        }
    }

    /// Aggregate function `index` of the library.
    pub fn aggregate(self: &Arc<Self>, index: usize) -> Option<super::aggregate::PluginAggregate> {
        (index < self.aggregates().len())
            .then(|| super::aggregate::PluginAggregate::new(Arc::clone(self), index))
    }

    /// The aggregate function the library names `name`.
    pub fn aggregate_named(
        self: &Arc<Self>,
        name: &str,
    ) -> Option<super::aggregate::PluginAggregate> {
        let index = self.aggregates().iter().position(|a| a.name == name)?;
        self.aggregate(index)
    }

    pub fn function_named(self: &Arc<Self>, name: &str) -> Option<PluginFunction> {
        let index = self.functions.iter().position(|f| f.name == name)?;
        self.function(index)
    }
}

pub(super) fn dl_message(e: dlopen2::Error) -> String {
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
