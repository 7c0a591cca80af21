//! Turning a [`PluginSpec`] back into a function on a node: the executor loads the library from
//! its own plugin directories, pinned by the client's digest; the scheduler only plans with the
//! signature the client sent and never maps plugin code.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use parking_lot::Mutex;
use udf_engine::{FileIdentity, LoadError, PluginLoader, PluginUdf, Sha256Digest, WorkerLimits};

use crate::cache::{FailureCache, Lru};
use crate::spec::{IsolationSpec, PluginSpec};

/// How many loaded functions (each with its worker pool, if isolated) a node keeps by default,
/// and how many file digests a scheduler keeps.
pub const DEFAULT_FUNCTION_CACHE: usize = 64;

/// How long a node remembers by default that a function could not be loaded.
pub const DEFAULT_FAILURE_TTL: Duration = Duration::from_secs(10);

/// What an executor insists on, whatever a plan asks: a plan can make isolation stricter, never
/// looser.
///
/// * With `isolate`, every plugin function runs in worker processes, also one the plan (its
///   client) runs in-process.
/// * Every isolated function runs with limits no looser than `limits`: the shorter call time
///   limit, the smaller memory limit (a plan asking for none gets the floor's), the fewer
///   workers (`limits.workers` of `None` means the node's number of CPUs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationFloor {
    /// Isolate every function, whatever the plan says.
    pub isolate: bool,
    /// The loosest limits a plan may ask for.
    pub limits: WorkerLimits,
}

impl IsolationFloor {
    /// The limits a function whose plan asks for `asked` runs with (`None`: in-process), on a
    /// node with `target_partitions` CPUs.
    pub fn limits_for(
        &self,
        asked: Option<&IsolationSpec>,
        target_partitions: usize,
    ) -> Option<WorkerLimits> {
        let floor = &self.limits;
        let most_workers = floor.workers.unwrap_or(target_partitions).max(1);
        let Some(asked) = asked else {
            return self.isolate.then(|| floor.clone());
        };
        Some(WorkerLimits {
            call_timeout: Duration::from_millis(asked.call_timeout_ms.max(1))
                .min(floor.call_timeout),
            memory_mib: match (asked.memory_mib, floor.memory_mib) {
                (Some(a), Some(f)) => Some(a.min(f)),
                (a, None) => a,
                (None, f) => f,
            },
            workers: match asked.workers {
                Some(a) => Some(a.min(most_workers)),
                None => floor.workers,
            },
            worker_program: floor.worker_program.clone(),
        })
    }
}

/// A file as the scheduler last hashed it: a digest is reused only for the same path naming the
/// same file, unchanged (the engine's [`FileIdentity`]: device, inode, size, modification and
/// change times).
type HashedFile = (PathBuf, FileIdentity);

/// What a node keeps between decodes, each bounded.
#[derive(Debug)]
pub(crate) struct Caches {
    /// Functions loaded (executors), most recently used kept.
    loaded: Lru<PluginSpec, Arc<ScalarUDF>>,
    /// Aggregate functions loaded (executors), most recently used kept.
    pub(crate) aggregates: Lru<PluginSpec, Arc<datafusion::logical_expr::AggregateUDF>>,
    /// Why a function could not be loaded, for a short time.
    failed: FailureCache<PluginSpec>,
    /// Digests of the files the scheduler checked.
    digests: Lru<HashedFile, Sha256Digest>,
}

impl Caches {
    fn new(capacity: usize, failure_ttl: Duration) -> Caches {
        Caches {
            loaded: Lru::new(capacity),
            aggregates: Lru::new(capacity),
            failed: FailureCache::new(capacity, failure_ttl),
            digests: Lru::new(capacity),
        }
    }
}

/// What a node does with the plugin functions of the plans it decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Load every function from the plugin directories, pinned by the plan's digest (executors,
    /// and clients). A function that cannot be loaded becomes one that fails its query with the
    /// reason when it is called, so that decoding a task never fails: Ballista drops an executor
    /// whose pushed task cannot be decoded, rather than failing the query.
    Evaluate,
    /// Plan with the signature the plan carries, without loading anything (the scheduler): a
    /// scheduler never runs plugin code, so no plugin can crash or slow it.
    Plan,
}

/// Resolves the plugin functions of decoded plans for one node.
#[derive(Debug)]
pub struct Resolver {
    node: String,
    pub(crate) role: Role,
    pub(crate) loader: Arc<PluginLoader>,
    pub(crate) target_partitions: usize,
    /// What this node insists on (executors); `None`: the plan decides (clients).
    pub(crate) floor: Option<IsolationFloor>,
    /// Functions loaded, failures and digests, by spec and file: a plan is decoded once per task,
    /// a library is hashed and mapped once while it stays in the cache.
    pub(crate) caches: Mutex<Caches>,
}

impl Resolver {
    /// A resolver for the node described by `node` (named in errors: "executor 7f3a… at
    /// 10.0.0.5:50052"), loading from `loader`'s plugin directories.
    pub fn new(node: impl Into<String>, role: Role, loader: Arc<PluginLoader>) -> Resolver {
        let target_partitions = std::thread::available_parallelism().map_or(1, |n| n.get());
        Resolver {
            node: node.into(),
            role,
            loader,
            target_partitions,
            floor: None,
            caches: Mutex::new(Caches::new(DEFAULT_FUNCTION_CACHE, DEFAULT_FAILURE_TTL)),
        }
    }

    /// The resolver with `floor` applied to every function it loads.
    pub fn with_floor(mut self, floor: IsolationFloor) -> Resolver {
        self.floor = Some(floor);
        self
    }

    /// The resolver keeping at most `capacity` loaded functions (with their worker pools; the
    /// least recently used is dropped first) and as many file digests, and remembering a
    /// failure to load for `failure_ttl`.
    pub fn with_cache(self, capacity: usize, failure_ttl: Duration) -> Resolver {
        *self.caches.lock() = Caches::new(capacity, failure_ttl);
        self
    }

    /// The number of loaded functions held, and of failures remembered (some may have expired).
    pub fn cached(&self) -> (usize, usize) {
        let caches = self.caches.lock();
        (
            caches.loaded.len() + caches.aggregates.len(),
            caches.failed.len(),
        )
    }

    /// The node this resolver names in its errors.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The function `spec` describes, as this node runs it.
    pub fn resolve(&self, spec: &PluginSpec) -> Result<Arc<ScalarUDF>> {
        if self.role == Role::Plan {
            if !self.loader.plugin_dirs().is_empty() {
                self.check_file(spec).map_err(|reason| {
                    DataFusionError::Plan(format!(
                        "plugin function {} cannot run on {}: {reason}",
                        spec.sql_name, self.node
                    ))
                })?;
            }
            return Ok(Arc::new(
                RemotePluginUdf::new(spec.clone(), None)?.into_scalar_udf(),
            ));
        }
        let remembered = {
            let mut caches = self.caches.lock();
            if let Some(udf) = caches.loaded.get(spec) {
                return Ok(Arc::clone(udf));
            }
            caches.failed.get(spec, Instant::now())
        };
        let message = match remembered {
            Some(message) => message,
            // Loaded outside the lock: hashing, mapping and starting workers take a while, and
            // a slow load must not hold up the decoding of other tasks.
            None => match self.load(spec) {
                Ok(udf) => {
                    let udf = Arc::new(udf.into_scalar_udf());
                    let evicted = self
                        .caches
                        .lock()
                        .loaded
                        .insert(spec.clone(), Arc::clone(&udf));
                    if let Some((old, _)) = evicted {
                        tracing::debug!(
                            function = %old.sql_name,
                            library = %old.library,
                            "plugin function dropped from the cache (least recently used)"
                        );
                    }
                    return Ok(udf);
                }
                Err(reason) => {
                    let message = format!(
                        "plugin function {} cannot run on {}: {reason}",
                        crate::spec::shorten(&spec.sql_name),
                        self.node
                    );
                    tracing::warn!(
                        function = %crate::spec::shorten(&spec.sql_name),
                        library = %crate::spec::shorten(&spec.library),
                        "{message}"
                    );
                    self.caches
                        .lock()
                        .failed
                        .insert(spec.clone(), message.clone(), Instant::now());
                    message
                }
            },
        };
        Ok(Arc::new(
            RemotePluginUdf::new(spec.clone(), Some(message))?.into_scalar_udf(),
        ))
    }

    /// The library file `spec` names in the plugin directories (under udfsql's rules for them),
    /// and the pin.
    pub(crate) fn find(
        &self,
        spec: &PluginSpec,
    ) -> std::result::Result<(PathBuf, Sha256Digest), String> {
        let file = Path::new(&spec.library);
        let is_file_name = file.file_name().is_some_and(|n| n == file.as_os_str());
        if !is_file_name {
            return Err(format!(
                "the plan names library {:?}, which is not a file name",
                spec.library
            ));
        }
        let pin = Sha256Digest::from_str(&spec.sha256)
            .map_err(|e| format!("the plan's digest of {} is not valid: {e}", spec.library))?;
        let dirs = self.loader.plugin_dirs();
        if dirs.is_empty() {
            return Err(format!(
                "it has no plugin directory (start it with --plugin-dir DIR holding {})",
                spec.library
            ));
        }
        if !dirs.iter().any(|d| d.join(file).exists()) {
            return Err(format!(
                "library {} is not in its plugin directories ({}); copy the client's file \
                 (SHA-256 {}) there",
                spec.library,
                display_dirs(dirs),
                spec.sha256
            ));
        }
        let path = self
            .loader
            .resolve_sql_path(&spec.library)
            .map_err(|e| e.to_string())?;
        Ok((path, pin))
    }

    /// Checks, without loading it, that the library `spec` names is in the plugin directories
    /// with the client's digest.
    ///
    /// Only a regular file is opened, without blocking (a FIFO or device in the directory is
    /// refused, never waited on), and its digest is kept for as long as the file keeps its
    /// path, device, inode, size, modification and change times.
    pub(crate) fn check_file(&self, spec: &PluginSpec) -> std::result::Result<(), String> {
        let (path, pin) = self.find(spec)?;
        let file = udf_engine::open_regular_file(&path).map_err(|e| e.to_string())?;
        let metadata = file
            .metadata()
            .map_err(|e| format!("cannot read its library {}: {e}", path.display()))?;
        let identity = (path.clone(), FileIdentity::of(&metadata));
        let known = self.caches.lock().digests.get(&identity).copied();
        let actual = match known {
            Some(digest) => digest,
            None => {
                let digest = Sha256Digest::of_reader(&file)
                    .map_err(|e| format!("cannot read its library {}: {e}", path.display()))?;
                self.caches.lock().digests.insert(identity, digest);
                digest
            }
        };
        if actual != pin {
            return Err(mismatch(&path, &actual, spec));
        }
        Ok(())
    }

    /// Loads `spec`'s library from the plugin directories with its digest as the pin, and checks
    /// that the function is the one the client planned with.
    fn load(&self, spec: &PluginSpec) -> std::result::Result<PluginUdf, String> {
        let library = self.load_library(spec)?;
        let found = library.path().to_path_buf();
        let function = library.function_named(&spec.function).ok_or_else(|| {
            format!(
                "library {} has no function {}",
                found.display(),
                spec.function
            )
        })?;
        same_as_planned(&library, function.signature().to_string(), spec)?;
        let volatility = spec.volatility().map_err(|e| e.to_string())?;
        let call_path = spec.call_path().map_err(|e| e.to_string())?;
        let mut udf =
            PluginUdf::new(&spec.sql_name, function, volatility).with_call_path(call_path);
        if udf.call_path() != call_path {
            return Err(format!(
                "library {} has no batch entrypoint for {}, but the client calls it per batch",
                found.display(),
                spec.function
            ));
        }
        match (udf.async_limits().is_some(), spec.async_limits()) {
            (true, Some(limits)) => udf = udf.with_async_limits(limits),
            (false, None) => {}
            (is_async, _) => {
                return Err(format!(
                    "library {} declares {} {}, but the client planned it as {}",
                    found.display(),
                    if is_async {
                        "an asynchronous"
                    } else {
                        "a synchronous"
                    },
                    spec.function,
                    if is_async {
                        "synchronous"
                    } else {
                        "asynchronous"
                    },
                ));
            }
        }
        let limits = match &self.floor {
            Some(floor) => floor.limits_for(spec.isolation.as_ref(), self.target_partitions),
            None => spec.worker_limits(),
        };
        if let Some(limits) = limits {
            let pool = udf_engine::isolation::pool_for(&library, &limits, self.target_partitions)
                .map_err(|reason| format!("cannot start its isolated workers: {reason}"))?;
            udf = udf.with_worker_pool(pool);
        }
        tracing::info!(
            function = %spec.sql_name,
            library = %found.display(),
            sha256 = %spec.sha256,
            isolation = udf.isolation_mode(),
            "loaded plugin function for a distributed plan"
        );
        Ok(udf)
    }
}

impl Resolver {
    /// The library `spec` names, from the plugin directories, pinned by the client's digest.
    pub(crate) fn load_library(
        &self,
        spec: &PluginSpec,
    ) -> std::result::Result<Arc<udf_engine::PluginLibrary>, String> {
        let (path, pin) = self.find(spec)?;
        self.loader
            .load_pinned(&path, Some(&pin))
            .map_err(|e| match e {
                LoadError::DigestMismatch { path, actual, .. } => mismatch(&path, &actual, spec),
                other => other.to_string(),
            })
    }
}

/// Whether the function `library` declares as `signature` (its text) is the one the client
/// planned with (the same text, the same ABI).
pub(crate) fn same_as_planned(
    library: &udf_engine::PluginLibrary,
    signature: String,
    spec: &PluginSpec,
) -> std::result::Result<(), String> {
    if signature != spec.signature || library.abi().to_string() != spec.abi {
        return Err(format!(
            "library {} declares {signature} (ABI {}), but the client planned with {} (ABI {})",
            library.path().display(),
            library.abi(),
            spec.signature,
            spec.abi
        ));
    }
    Ok(())
}

/// The error for a library whose digest is not the client's.
fn mismatch(path: &Path, actual: &Sha256Digest, spec: &PluginSpec) -> String {
    format!(
        "its library {} has SHA-256 {actual}, but the client planned with SHA-256 {}; every \
         node needs the same file as the client",
        path.display(),
        spec.sha256
    )
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A plugin function known by its [`PluginSpec`] only: on the scheduler, which plans with the
/// carried signature and passes the spec on, and on an executor that could not load it, where a
/// call fails with the reason.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RemotePluginUdf {
    spec: PluginSpec,
    signature: Signature,
    return_type: DataType,
    unavailable: Option<String>,
}

impl RemotePluginUdf {
    fn new(spec: PluginSpec, unavailable: Option<String>) -> Result<RemotePluginUdf> {
        let return_type = spec.return_data_type()?;
        let volatility = spec.volatility()?;
        let signature = if spec.arguments == 0 {
            Signature::nullary(volatility)
        } else if spec.asynchronous.is_some() {
            // DataFusion's wrapper of asynchronous UDFs does not pass `coerce_types` on: any
            // types, as the client coerced them.
            Signature::any(spec.arguments, volatility)
        } else {
            Signature::user_defined(volatility)
        };
        Ok(RemotePluginUdf {
            spec,
            signature,
            return_type,
            unavailable,
        })
    }

    /// What the plan says about the function.
    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    /// As a DataFusion UDF: through DataFusion's async UDF machinery when the function is
    /// asynchronous (so that the plan keeps its `AsyncFuncExec`), remembered for [`Self::of`].
    pub fn into_scalar_udf(self) -> ScalarUDF {
        if self.spec.asynchronous.is_none() {
            return ScalarUDF::new_from_impl(self);
        }
        let udf = Arc::new(self);
        let mut known = REMOTE_ASYNC.lock();
        known.retain(|w| w.strong_count() > 0);
        known.push(Arc::downgrade(&udf));
        drop(known);
        AsyncScalarUDF::new(udf).into_scalar_udf()
    }

    /// The remote plugin function `udf` is, if it is one: itself, or the one inside DataFusion's
    /// wrapper of an asynchronous function (which does not give it back: found here by the
    /// address of the signature the wrapper hands out, its inner UDF's own field).
    pub fn of(udf: &ScalarUDF) -> Option<RemoteRef<'_>> {
        if let Some(remote) = udf.inner().downcast_ref::<RemotePluginUdf>() {
            return Some(RemoteRef::Borrowed(remote));
        }
        udf.inner().downcast_ref::<AsyncScalarUDF>()?;
        let signature = udf.signature();
        REMOTE_ASYNC
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|r| std::ptr::eq(&r.signature, signature))
            .map(RemoteRef::Shared)
    }
}

/// The asynchronous remote plugin UDFs made so far (weakly), for [`RemotePluginUdf::of`].
static REMOTE_ASYNC: Mutex<Vec<std::sync::Weak<RemotePluginUdf>>> = Mutex::new(Vec::new());

/// A remote plugin UDF found behind a registered UDF.
#[derive(Debug)]
pub enum RemoteRef<'a> {
    /// A synchronous one.
    Borrowed(&'a RemotePluginUdf),
    /// An asynchronous one, out of DataFusion's wrapper.
    Shared(Arc<RemotePluginUdf>),
}

impl std::ops::Deref for RemoteRef<'_> {
    type Target = RemotePluginUdf;

    fn deref(&self) -> &RemotePluginUdf {
        match self {
            RemoteRef::Borrowed(r) => r,
            RemoteRef::Shared(r) => r,
        }
    }
}

#[async_trait::async_trait]
impl AsyncScalarUDFImpl for RemotePluginUdf {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.invoke_with_args(args)
    }
}

impl ScalarUDFImpl for RemotePluginUdf {
    fn name(&self) -> &str {
        &self.spec.sql_name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.return_type.clone())
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            self.name(),
            self.return_type.clone(),
            true,
        )))
    }

    /// The client coerced the arguments when it planned; they arrive as the function takes them.
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        if arg_types.len() != self.spec.arguments {
            return Err(DataFusionError::Plan(format!(
                "plugin function {} takes {} arguments, the plan passes {}",
                self.spec.sql_name,
                self.spec.arguments,
                arg_types.len()
            )));
        }
        Ok(arg_types.to_vec())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(DataFusionError::Execution(
            self.unavailable.clone().unwrap_or_else(|| {
                format!(
                    "plugin function {} ({}) is evaluated by executors, not where the plan is \
                     only scheduled",
                    self.spec.sql_name, self.spec.library
                )
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(isolate: bool, memory_mib: Option<u64>, workers: Option<usize>) -> IsolationFloor {
        IsolationFloor {
            isolate,
            limits: WorkerLimits {
                call_timeout: Duration::from_secs(5),
                memory_mib,
                workers,
                worker_program: None,
            },
        }
    }

    fn asked(
        call_timeout_ms: u64,
        memory_mib: Option<u64>,
        workers: Option<usize>,
    ) -> IsolationSpec {
        IsolationSpec {
            call_timeout_ms,
            memory_mib,
            workers,
        }
    }

    #[test]
    fn an_isolating_floor_isolates_a_plan_that_does_not() {
        let limits = floor(true, Some(300), None).limits_for(None, 8).unwrap();
        assert_eq!(limits, floor(true, Some(300), None).limits);
        // Without --isolate, the plan's in-process stays in-process.
        assert_eq!(floor(false, Some(300), None).limits_for(None, 8), None);
    }

    #[test]
    fn a_plan_cannot_loosen_the_limits() {
        let f = floor(false, Some(300), Some(2));
        // Looser in every way: no memory limit, a longer time limit, more workers.
        let limits = f
            .limits_for(Some(&asked(3_600_000, None, Some(64))), 8)
            .unwrap();
        assert_eq!(limits.call_timeout, Duration::from_secs(5));
        assert_eq!(limits.memory_mib, Some(300));
        assert_eq!(limits.workers, Some(2));
        let limits = f
            .limits_for(Some(&asked(1, Some(100_000), None)), 8)
            .unwrap();
        assert_eq!(limits.memory_mib, Some(300));
        assert_eq!(limits.workers, Some(2));
    }

    #[test]
    fn a_plan_can_tighten_the_limits() {
        let f = floor(true, Some(300), None);
        let limits = f
            .limits_for(Some(&asked(250, Some(64), Some(1))), 8)
            .unwrap();
        assert_eq!(limits.call_timeout, Duration::from_millis(250));
        assert_eq!(limits.memory_mib, Some(64));
        assert_eq!(limits.workers, Some(1));
        // Workers are capped at the node's CPUs when the floor names no number.
        let limits = f
            .limits_for(Some(&asked(250, Some(64), Some(99))), 8)
            .unwrap();
        assert_eq!(limits.workers, Some(8));
        // A floor without a memory limit keeps the plan's.
        let open = floor(true, None, None);
        let limits = open
            .limits_for(Some(&asked(250, Some(64), None)), 8)
            .unwrap();
        assert_eq!(limits.memory_mib, Some(64));
    }
}
