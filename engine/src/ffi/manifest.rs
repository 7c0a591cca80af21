//! What a library declares, read into [`FunctionSignature`]s: the v2 manifest (bounded reads of
//! every entry, validated in [`super::metadata`]) and the randomised manifests of the fuzz tests.

use std::mem::size_of;

use udf_abi::v2::{self, UdfAbiVersion, UdfFunction, UdfManifest};

use super::library::{Abi, AsyncEntrypoints, Entrypoints};
use super::metadata::{self, validate_function};
use crate::error::MetadataError;
use crate::types::ValueType;

/// The most functions a v2 manifest may list.
pub const MAX_FUNCTIONS: usize = udf_abi::MAX_FUNCTIONS;

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

impl DeclaredVolatility {
    /// The ABI's volatility tags, the declared volatilities and DataFusion's, in one table.
    const TABLE: [(
        u32,
        DeclaredVolatility,
        datafusion::logical_expr::Volatility,
    ); 3] = [
        (
            v2::volatility::IMMUTABLE,
            DeclaredVolatility::Immutable,
            datafusion::logical_expr::Volatility::Immutable,
        ),
        (
            v2::volatility::STABLE,
            DeclaredVolatility::Stable,
            datafusion::logical_expr::Volatility::Stable,
        ),
        (
            v2::volatility::VOLATILE,
            DeclaredVolatility::Volatile,
            datafusion::logical_expr::Volatility::Volatile,
        ),
    ];

    /// The volatility an ABI tag declares, or `None` for a tag the ABI does not define.
    pub fn from_tag(tag: u32) -> Option<DeclaredVolatility> {
        Self::TABLE
            .iter()
            .find(|(t, ..)| *t == tag)
            .map(|(_, d, _)| *d)
    }

    /// DataFusion's volatility of the same name.
    pub fn volatility(self) -> datafusion::logical_expr::Volatility {
        Self::TABLE
            .iter()
            .find(|(_, d, _)| *d == self)
            .map_or(datafusion::logical_expr::Volatility::Volatile, |(.., v)| *v)
    }
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

    /// The argument types as SQL names them: `["VARCHAR", "BIGINT UNSIGNED"]`.
    pub fn sql_arguments(&self) -> Vec<String> {
        self.arg_types
            .iter()
            .map(|t| crate::types::arrow::sql_name(&t.arrow_type()))
            .collect()
    }

    /// The result type as SQL names it.
    pub fn sql_result(&self) -> String {
        crate::types::arrow::sql_name(&self.return_type.arrow_type())
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
pub(super) unsafe fn read_manifest(
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
    let holds = |end: usize| manifest.size >= end && readable >= end;
    let arrow_types = if found.minor >= 2 && holds(v2::MANIFEST_SIZE_2_2) {
        manifest.arrow_types
    } else {
        std::ptr::null()
    };
    // `async_functions` and `unload` exist from ABI 2.3 on, in a manifest long enough to hold
    // them.
    let (async_functions, unload) = if found.minor >= 3 && holds(v2::MANIFEST_SIZE_2_3) {
        (manifest.async_functions, manifest.unload)
    } else {
        (std::ptr::null(), None)
    };
    // `aggregates` exists from ABI 2.4 on, in a manifest long enough to hold it.
    let (aggregates, aggregates_len) = if found.minor >= 4 && holds(size_of::<UdfManifest>()) {
        (manifest.aggregates, manifest.aggregates_len)
    } else {
        (std::ptr::null(), 0)
    };
    let release = manifest.release_bytes.ok_or(MetadataError::NullRelease)?;
    let len = manifest.functions_len;
    if len == 0 && aggregates_len == 0 {
        if has_v1() {
            return Ok(None);
        }
        return Err(MetadataError::NoFunctions);
    }
    // SAFETY: the caller's promise (ABI 2.4) that `aggregates` holds `aggregates_len` entries,
    // which `read_aggregates` bounds before reading.
    let aggregates = unsafe { super::aggregate::read_aggregates(aggregates, aggregates_len) }?;
    let entries: &[UdfFunction] = if len == 0 {
        &[]
    } else if manifest.functions.is_null() {
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
    let mut asyncs = Vec::with_capacity(len);
    for (i, entry) in entries.iter().enumerate() {
        let asynchronous = if async_functions.is_null() {
            None
        } else {
            // SAFETY: non-null, and the caller promises (ABI 2.3) that `async_functions` holds
            // `functions_len` (bounded above) entries parallel to `functions`; `UdfAsyncFunction`
            // is two optional function pointers and two integers, valid for any bits.
            let entry = unsafe { async_functions.add(i).read() };
            entry.start.map(|start| AsyncEntrypoints {
                start,
                cancel: entry.cancel,
                max_in_flight: entry.max_in_flight,
                chunk_rows: entry.chunk_rows,
            })
        };
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
        let has_batch = batch.is_some() || asynchronous.is_some();
        let (signature, row) = validate_function(entry, &arrow, has_batch, found.minor)?;
        // An asynchronous function is called only through `start`: whatever its row and batch
        // entries say is never called.
        let (row, batch) = if asynchronous.is_some() {
            (None, None)
        } else {
            (row, batch)
        };
        batches.push(batch);
        asyncs.push(asynchronous);
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
    if let Some(a) = aggregates
        .iter()
        .find(|a| functions.iter().any(|f| f.name == a.signature().name))
    {
        return Err(MetadataError::DuplicateName {
            function: a.signature().name.clone(),
        });
    }
    Ok(Some((
        Abi::V2 { minor: found.minor },
        functions,
        Entrypoints::V2 {
            release,
            rows,
            batches,
            asyncs,
            unload,
            aggregates,
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
pub(super) unsafe fn check_manifest(
    found: UdfAbiVersion,
    manifest: *const UdfManifest,
) -> Result<Vec<FunctionSignature>, MetadataError> {
    // SAFETY: the caller's promise, passed on.
    unsafe { read_manifest(found, manifest, &|| false) }
        .map(|v2| v2.map(|(_, functions, _)| functions).unwrap_or_default())
}
