//! Typed errors. Each one names what was wrong: the library path, the symbol, the function, the
//! argument.

use std::path::PathBuf;

use udf_abi::v2::UdfType;

use crate::types::ValueType;

/// Why a plugin library could not be loaded. Nothing is registered when loading fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file does not exist or cannot be resolved to an absolute path.
    #[error("plugin library {path}: {source}")]
    NotFound {
        /// The path as given.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The file could not be read (to compute its digest).
    #[error("plugin library {path} could not be read: {source}")]
    Read {
        /// The library's path.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The path names something other than a regular file (a directory, a FIFO, a device).
    #[error("plugin library {path} is not a regular file ({kind})")]
    NotARegularFile {
        /// The library's path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// An earlier version of the file is still mapped in this process, and the dynamic loader
    /// would hand back that old image instead of mapping the file (it matches by path).
    #[error(
        "plugin library {path} (SHA-256 {file}) cannot be loaded: an earlier version of that \
         file ({mapped}) is still mapped in this process, and the dynamic loader would \
         return the old code; drop every function that uses the old version first (or load the \
         new file under another path)"
    )]
    StaleImage {
        /// The library's path.
        path: PathBuf,
        /// What is known of the image still mapped (its digest, or its inode and path).
        mapped: String,
        /// The digest of the file on disk now.
        file: crate::trust::Sha256Digest,
    },
    /// The file was replaced between reading its digest and mapping it.
    #[error("plugin library {path} was replaced while it was being loaded; try again")]
    ChangedWhileLoading {
        /// The library's path.
        path: PathBuf,
    },
    /// The file's SHA-256 digest is not the pinned one.
    #[error(
        "plugin library {path} has SHA-256 {actual}, but {expected} was pinned; refusing to use it"
    )]
    DigestMismatch {
        /// The library's path.
        path: PathBuf,
        /// The pinned digest.
        expected: crate::trust::Sha256Digest,
        /// The digest of the file that was loaded.
        actual: crate::trust::Sha256Digest,
    },
    /// `dlopen` refused the file: not a shared library, a corrupt ELF, a missing dependency.
    #[error("plugin library {path} could not be opened: {message}")]
    Open {
        /// The library's path.
        path: PathBuf,
        /// The dynamic loader's message.
        message: String,
    },
    /// A required symbol is missing.
    #[error("plugin library {path} does not export the symbol `{symbol}`: {message}")]
    MissingSymbol {
        /// The library's path.
        path: PathBuf,
        /// The symbol that was looked up.
        symbol: &'static str,
        /// The dynamic loader's message.
        message: String,
    },
    /// A v2 library was built for another major version of the ABI.
    #[error(
        "plugin library {path} was built for udfsql ABI v{found_major}.{found_minor}; this host \
         supports ABI v{expected_major}.x (and v1 libraries)"
    )]
    AbiMismatch {
        /// The library's path.
        path: PathBuf,
        /// The library's major version.
        found_major: u32,
        /// The library's minor version.
        found_minor: u32,
        /// The host's major version.
        expected_major: u32,
    },
    /// The library was to be isolated, but its worker processes cannot run.
    #[error("plugin library {path} cannot be isolated: {reason}")]
    Isolation {
        /// The library's path.
        path: PathBuf,
        /// Why (the worker program is missing, a limit is zero).
        reason: String,
    },
    /// The library's metadata is malformed.
    #[error("plugin library {path}: invalid metadata from `{symbol}`: {reason}")]
    InvalidMetadata {
        /// The library's path.
        path: PathBuf,
        /// The symbol whose answer was invalid.
        symbol: &'static str,
        /// What is wrong with it.
        reason: MetadataError,
    },
}

impl LoadError {
    /// The path of the library the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            LoadError::NotFound { path, .. }
            | LoadError::Read { path, .. }
            | LoadError::ChangedWhileLoading { path }
            | LoadError::NotARegularFile { path, .. }
            | LoadError::StaleImage { path, .. }
            | LoadError::DigestMismatch { path, .. }
            | LoadError::Open { path, .. }
            | LoadError::MissingSymbol { path, .. }
            | LoadError::AbiMismatch { path, .. }
            | LoadError::Isolation { path, .. }
            | LoadError::InvalidMetadata { path, .. } => path,
        }
    }
}

/// What is wrong with a library's metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// `name` is a null pointer.
    #[error("the function name is a null pointer")]
    NullName,
    /// `name` has no NUL byte within the first [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) bytes.
    #[error("the function name is not NUL-terminated within {max} bytes")]
    NameTooLong {
        /// The limit.
        max: usize,
    },
    /// `name` is the empty string.
    #[error("the function name is empty")]
    EmptyName,
    /// `name` is not UTF-8.
    #[error("the function name is not valid UTF-8 (bytes {bytes:?})")]
    NonUtf8Name {
        /// The raw bytes of the name.
        bytes: Vec<u8>,
    },
    /// `arg_types` is null but `arg_types_len` is not 0.
    #[error("function `{function}`: arg_types is a null pointer but arg_types_len is {len}")]
    NullArgTypes {
        /// The function's name.
        function: String,
        /// The declared length.
        len: usize,
    },
    /// More arguments than [`udf_abi::MAX_ARGS`].
    #[error("function `{function}`: {len} arguments declared, at most {max} are allowed")]
    TooManyArgs {
        /// The function's name.
        function: String,
        /// The declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The manifest lists no function (and the library has no v1 symbols either).
    #[error("the manifest lists no functions")]
    NoFunctions,
    /// `udfsql_manifest` returned a null pointer.
    #[error("the manifest pointer is null")]
    NullManifest,
    /// The manifest is smaller than the ABI's.
    #[error("the manifest is {found} bytes, smaller than the {expected} bytes of ABI v2.0")]
    ManifestTooSmall {
        /// The size the library reports.
        found: usize,
        /// The size this host reads.
        expected: usize,
    },
    /// The manifest's `release_bytes` is null.
    #[error("the manifest's release_bytes function is null")]
    NullRelease,
    /// `functions` is null but `functions_len` is not 0, or there are absurdly many.
    #[error("the manifest lists {len} functions at {pointer}")]
    BadFunctionList {
        /// The declared length.
        len: usize,
        /// "a null pointer" or "more than the limit".
        pointer: &'static str,
    },
    /// Two functions share a name.
    #[error("function `{function}` is listed twice")]
    DuplicateName {
        /// The name.
        function: String,
    },
    /// A function's row entrypoint is null (before ABI 2.2, where it is required).
    #[error("function `{function}` has a null row entrypoint")]
    NullEntrypoint {
        /// The function's name.
        function: String,
    },
    /// A function of ABI 2.2 or later has neither a row nor a batch entrypoint.
    #[error(
        "function `{function}` has no entrypoint: its row and batch entrypoints (call_row and \
         call_batch) are both null"
    )]
    NoEntrypoint {
        /// The function's name.
        function: String,
    },
    /// A function whose Arrow types (ABI 2.2) the library could not declare: a type string that
    /// is the library's message (it starts with `!`), written by `udf-abi` when a Rust type
    /// cannot be described or its static storage for type strings is full.
    #[error("function `{function}`: the library could not declare its Arrow types: {message}")]
    UndeclaredTypes {
        /// The function's name.
        function: String,
        /// The library's message.
        message: String,
    },
    /// A function declares an Arrow type (ABI 2.2) but has no batch entrypoint, the only one
    /// that can pass it.
    #[error(
        "function `{function}` declares an Arrow type ({position}) but has no batch entrypoint \
         (call_batch is null)"
    )]
    ArrowTypeWithoutBatch {
        /// The function's name.
        function: String,
        /// The first argument, or the result, with an Arrow type.
        position: TypePosition,
    },
    /// An Arrow type string (ABI 2.2) that is missing, unexpected or malformed.
    #[error("function `{function}`: {position}: {reason}")]
    BadTypeString {
        /// The function's name.
        function: String,
        /// Which argument, or the return type.
        position: TypePosition,
        /// What is wrong.
        reason: String,
    },
    /// An aggregate function's entry (ABI 2.4) that is missing something or malformed.
    #[error("aggregate function `{function}`: {reason}")]
    BadAggregate {
        /// The function's name.
        function: String,
        /// What is wrong.
        reason: String,
    },
    /// A flag byte that is neither 0 nor 1, or an unknown volatility.
    #[error("function `{function}`: {field} has invalid value {value}")]
    InvalidField {
        /// The function's name.
        function: String,
        /// Which field.
        field: &'static str,
        /// The value read.
        value: u32,
    },
    /// A type tag that the ABI does not define.
    #[error(
        "function `{function}`: {position} has unknown type tag {tag} (valid tags are 0..={max})"
    )]
    UnknownTypeTag {
        /// The function's name.
        function: String,
        /// Which argument, or the return type.
        position: TypePosition,
        /// The tag that was read.
        tag: u32,
        /// The largest valid tag of the library's ABI.
        max: u32,
    },
}

/// Where in a signature a type sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypePosition {
    /// Argument `i` (0-based).
    Argument(usize),
    /// The return type.
    Return,
}

impl std::fmt::Display for TypePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypePosition::Argument(i) => write!(f, "argument {}", i + 1),
            TypePosition::Return => f.write_str("the return type"),
        }
    }
}

/// Why one call of a plugin function failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin returned `PluginResult::Err` with this message.
    #[error("{0}")]
    Plugin(String),
    /// An asynchronous call completed with `RETRY`: a temporary failure, with its message.
    #[error("{0} (a temporary failure)")]
    Retryable(String),
    /// The plugin returned an error without a message (a null pointer).
    #[error("the plugin reported an error without a message (null error pointer)")]
    NullErrorMessage,
    /// The plugin returned NULL from a function declared not to.
    #[error("the plugin returned NULL, but the function is declared never to return NULL")]
    UnexpectedNull,
    /// The function has no batch entrypoint (a v1 function, or a v2.0 library).
    #[error("the function has no batch entrypoint")]
    NoBatchEntrypoint,
    /// The function has no row entrypoint (an ABI 2.2 batch-only function, or one with Arrow
    /// types, which only the batch entrypoint passes).
    #[error("the function has no row entrypoint: it runs through its batch entrypoint only")]
    NoRowEntrypoint,
    /// The batch entrypoint's result is unusable: a field of the `ArrowArray` or `ArrowSchema`
    /// the C Data Interface does not allow for the declared type, or an array arrow's validation
    /// refuses (lengths, offsets, UTF-8, NULL counts).
    #[error("the plugin returned an invalid batch result: {0}")]
    InvalidResult(String),
    /// The batch result's Arrow format differs from the declared return type's.
    #[error(
        "the plugin returned a batch of Arrow format \"{found_format}\", the function declares \
         {declared} (Arrow format \"{expected_format}\")"
    )]
    ResultType {
        /// The declared return type.
        declared: ValueType,
        /// Its Arrow C Data Interface format (an ABI 2.2 type string for nested types).
        expected_format: String,
        /// The format the plugin wrote.
        found_format: String,
    },
    /// A batch result is NULL in rows where the row path would have called the function and
    /// refused a NULL (the function is declared never to return NULL).
    #[error(
        "the plugin returned NULL in {rows} row(s), but the function is declared never to return \
         NULL"
    )]
    UndeclaredNulls {
        /// How many rows.
        rows: usize,
    },
    /// An argument array does not have the rows the call needs.
    #[error("argument {} has {found} rows, {expected} expected", .index + 1)]
    ArgumentRows {
        /// The argument (0-based).
        index: usize,
        /// Rows needed.
        expected: usize,
        /// Rows given.
        found: usize,
    },
    /// A panic inside the host while it read a plugin's result: a bug in udfsql, reported
    /// rather than unwound.
    #[error("internal error in the udfsql host (please report it): {0}")]
    HostBug(String),
    /// The plugin's status code is neither OK nor ERROR.
    #[error("the plugin returned an invalid status code {0}")]
    InvalidStatus(i32),
    /// Returned bytes with a null pointer and a non-zero length.
    #[error("the plugin returned {0} bytes at a null pointer")]
    NullBytes(usize),
    /// A string argument contains a NUL byte, which the v1 ABI cannot carry.
    #[error("argument {} contains a NUL byte, which ABI v1 strings cannot carry", .index + 1)]
    InteriorNul {
        /// The argument (0-based).
        index: usize,
    },
    /// The host was asked to pass arguments that do not match the declared signature.
    #[error("argument {} is {found}, the function declares {expected}", .index + 1)]
    ArgumentType {
        /// The argument (0-based).
        index: usize,
        /// The declared type.
        expected: ValueType,
        /// What the host had.
        found: &'static str,
    },
    /// The number of arguments differs from the declared one.
    #[error("{found} arguments given, the function declares {expected}")]
    ArgumentCount {
        /// The declared count.
        expected: usize,
        /// The given count.
        found: usize,
    },
    /// The result's tag is neither `Ok` nor `Err`.
    #[error("the plugin returned an invalid PluginResult tag {0}")]
    InvalidResultTag(u32),
    /// The returned value's type differs from the declared return type.
    #[error("the plugin returned a value of type {found}, the function declares {expected}")]
    ReturnType {
        /// The declared type.
        expected: UdfType,
        /// The tag found, by name when the ABI defines it.
        found: String,
    },
    /// A returned `Bool` is neither 0 nor 1.
    #[error("the plugin returned an invalid Bool byte {0:#04x}")]
    InvalidBool(u8),
    /// A returned string is a null pointer.
    #[error("the plugin returned a null string pointer")]
    NullString,
    /// A returned string is not UTF-8.
    #[error("the plugin returned a string that is not valid UTF-8: {0}")]
    InvalidUtf8(std::str::Utf8Error),
    /// The string or binary results of one batch exceed what a column's 32-bit offsets hold.
    #[error("the results of one batch exceed 2 GiB, more than a string or binary column holds")]
    ResultTooLarge,
}

/// The class of a [`CallError`]: the row and batch paths must give the same class for the same
/// misbehaviour (tests compare them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallErrorKind {
    /// The plugin reported an error (its own message, or none).
    Plugin,
    /// A NULL result from a function declared never to return NULL.
    UndeclaredNull,
    /// A result of another type than declared.
    WrongType,
    /// A result that breaks the ABI in another way (status, pointers, bytes, buffers).
    InvalidResult,
    /// The host could not pass the arguments as the function declares them.
    Arguments,
    /// A bug in the host.
    HostBug,
}

impl CallError {
    /// The class of this error.
    pub fn kind(&self) -> CallErrorKind {
        match self {
            CallError::Plugin(_) | CallError::Retryable(_) | CallError::NullErrorMessage => {
                CallErrorKind::Plugin
            }
            CallError::UnexpectedNull | CallError::UndeclaredNulls { .. } => {
                CallErrorKind::UndeclaredNull
            }
            CallError::ReturnType { .. } | CallError::ResultType { .. } => CallErrorKind::WrongType,
            CallError::InvalidResult(_)
            | CallError::InvalidStatus(_)
            | CallError::NullBytes(_)
            | CallError::InvalidResultTag(_)
            | CallError::InvalidBool(_)
            | CallError::NullString
            | CallError::InvalidUtf8(_)
            | CallError::ResultTooLarge => CallErrorKind::InvalidResult,
            CallError::NoBatchEntrypoint
            | CallError::NoRowEntrypoint
            | CallError::InteriorNul { .. }
            | CallError::ArgumentType { .. }
            | CallError::ArgumentCount { .. }
            | CallError::ArgumentRows { .. } => CallErrorKind::Arguments,
            CallError::HostBug(_) => CallErrorKind::HostBug,
        }
    }
}
