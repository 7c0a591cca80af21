//! Registering a library's functions in a [`SessionContext`] the caller owns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::logical_expr::Volatility;
use datafusion::prelude::SessionContext;

use crate::error::LoadError;
use crate::ffi::{Abi, FunctionSignature, PluginLibrary};
use crate::isolation::{Isolation, WorkerPool};
use crate::udf::PluginUdf;

/// What registering one plugin function did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The SQL name the function is callable under.
    pub sql_name: String,
    /// The signature the library declares.
    pub signature: FunctionSignature,
    /// The library's canonical path.
    pub library: PathBuf,
    /// The library's ABI.
    pub abi: Abi,
    /// Whether a function of the same name (a DataFusion builtin such as `repeat`, or an earlier
    /// plugin) was replaced in this session.
    pub replaced: bool,
    /// Whether the function is evaluated by worker processes ([`Isolation::Process`]).
    pub isolated: bool,
}

/// Loads the library at `path` and registers every function it provides under its own name.
///
/// A function whose name equals an existing one (DataFusion's builtin `repeat`, say) replaces it
/// in this session; the [`Registration`] says so and a `tracing` warning is logged.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use datafusion::prelude::SessionContext;
///
/// let ctx = SessionContext::new();
/// for f in udf_engine::register_plugin(&ctx, "target/debug/libudf_plugin_repeat.so")? {
///     println!("registered {}", f.signature);
/// }
/// let batches = ctx.sql("SELECT repeat('ab', 3)").await?.collect().await?;
/// # Ok(()) }
/// ```
pub fn register_plugin(
    ctx: &SessionContext,
    path: impl AsRef<Path>,
) -> Result<Vec<Registration>, LoadError> {
    let library = PluginLibrary::load(path)?;
    Ok(register_library(ctx, &library))
}

/// Like [`register_plugin`], with the library's functions evaluated as `isolation` says: with
/// [`Isolation::Process`], by a pool of worker processes (sized to the session's
/// `target_partitions` unless the limits say otherwise).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use datafusion::prelude::SessionContext;
/// use udf_engine::Isolation;
///
/// let ctx = SessionContext::new();
/// udf_engine::register_plugin_with(&ctx, "target/debug/libudf_plugin_repeat.so", &Isolation::process())?;
/// ctx.sql("SELECT repeat('ab', 3)").await?.show().await?;
/// # Ok(()) }
/// ```
pub fn register_plugin_with(
    ctx: &SessionContext,
    path: impl AsRef<Path>,
    isolation: &Isolation,
) -> Result<Vec<Registration>, LoadError> {
    let library = PluginLibrary::load(path)?;
    register_library_with(ctx, &library, isolation)
}

/// Registers every function of an already loaded library under its own name.
pub fn register_library(ctx: &SessionContext, library: &Arc<PluginLibrary>) -> Vec<Registration> {
    register_aggregates(ctx, library);
    (0..library.functions().len())
        .filter_map(|i| library.function(i))
        .map(|function| {
            let name = function.signature().name.clone();
            let volatility = PluginUdf::declared_volatility(&function);
            register_function(ctx, &name, function, volatility)
        })
        .collect()
}

/// [`register_library`] with the functions evaluated as `isolation` says.
pub fn register_library_with(
    ctx: &SessionContext,
    library: &Arc<PluginLibrary>,
    isolation: &Isolation,
) -> Result<Vec<Registration>, LoadError> {
    let pool = worker_pool(library, isolation, ctx.copied_config().target_partitions())?;
    // Aggregates run their accumulators where the library's functions run: in this process, or
    // in the same pool's workers.
    register_aggregates_in(ctx, library, pool.as_ref());
    Ok((0..library.functions().len())
        .filter_map(|i| library.function(i))
        .map(|function| {
            let name = function.signature().name.clone();
            let volatility = PluginUdf::declared_volatility(&function);
            let mut udf = PluginUdf::new(name, function, volatility);
            if let Some(pool) = &pool {
                udf = udf.with_worker_pool(Arc::clone(pool));
            }
            register_udf(ctx, udf)
        })
        .collect())
}

/// The worker pool `isolation` asks for, if any.
pub(crate) fn worker_pool(
    library: &Arc<PluginLibrary>,
    isolation: &Isolation,
    target_partitions: usize,
) -> Result<Option<Arc<WorkerPool>>, LoadError> {
    match isolation {
        Isolation::InProcess => Ok(None),
        Isolation::Process(limits) => {
            crate::isolation::pool_for(library, limits, target_partitions)
                .map(Some)
                .map_err(|reason| LoadError::Isolation {
                    path: library.path().to_path_buf(),
                    reason,
                })
        }
    }
}

/// Registers one plugin function under `sql_name`, replacing any function of that name.
pub fn register_function(
    ctx: &SessionContext,
    sql_name: &str,
    function: crate::ffi::PluginFunction,
    volatility: Volatility,
) -> Registration {
    register_udf(ctx, PluginUdf::new(sql_name, function, volatility))
}

/// Registers a plugin UDF under its name, replacing any function of that name.
pub fn register_udf(ctx: &SessionContext, udf: PluginUdf) -> Registration {
    use datafusion::logical_expr::ScalarUDFImpl;
    let sql_name = udf.name().to_string();
    let sql_name = sql_name.as_str();
    let function = udf.function();
    let replaced = ctx
        .state_ref()
        .read()
        .scalar_functions()
        .contains_key(sql_name);
    let registration = Registration {
        sql_name: sql_name.to_string(),
        signature: function.signature().clone(),
        library: function.library().path().to_path_buf(),
        abi: function.library().abi(),
        replaced,
        isolated: udf.worker_pool().is_some(),
    };
    if replaced {
        tracing::warn!(
            function = sql_name,
            library = %registration.library.display(),
            "plugin function replaces an existing function of the same name in this session"
        );
    }
    tracing::info!(
        function = sql_name,
        signature = %registration.signature,
        library = %registration.library.display(),
        abi = %registration.abi,
        isolation = udf.isolation_mode(),
        "registered plugin function"
    );
    if udf.async_limits().is_some() {
        crate::async_plan::install(ctx);
    }
    ctx.register_udf(udf.into_scalar_udf());
    registration
}

/// Registration as methods on [`SessionContext`].
/// Registers every aggregate function of `library` (ABI 2.4) in `ctx` under its own name, in
/// this process; returns their names.
pub fn register_aggregates(ctx: &SessionContext, library: &Arc<PluginLibrary>) -> Vec<String> {
    register_aggregates_in(ctx, library, None)
}

/// Registers every aggregate of `library` with its accumulators in `pool` (isolated) or in this
/// process (`None`); returns their names.
fn register_aggregates_in(
    ctx: &SessionContext,
    library: &Arc<PluginLibrary>,
    pool: Option<&Arc<WorkerPool>>,
) -> Vec<String> {
    (0..library.aggregates().len())
        .filter_map(|i| library.aggregate(i))
        .map(|function| {
            let name = function.signature().name.clone();
            let mut udaf = crate::udaf::PluginUdaf::new(name.clone(), function);
            if let Some(pool) = pool {
                udaf = udaf.with_worker_pool(Arc::clone(pool));
            }
            register_udaf(ctx, udaf);
            name
        })
        .collect()
}

/// Registers one plugin aggregate function in `ctx`.
pub fn register_udaf(ctx: &SessionContext, udaf: crate::udaf::PluginUdaf) {
    use datafusion::logical_expr::AggregateUDFImpl;
    let replaced = ctx
        .state_ref()
        .read()
        .aggregate_functions()
        .contains_key(udaf.name());
    if replaced {
        tracing::warn!(
            function = udaf.name(),
            library = %udaf.function().library().path().display(),
            "plugin aggregate replaces an existing aggregate of the same name in this session"
        );
    }
    tracing::info!(
        function = udaf.name(),
        signature = %udaf.function().signature().display_as(udaf.name()),
        library = %udaf.function().library().path().display(),
        isolation = if udaf.worker_pool().is_some() { "process" } else { "none" },
        "registered plugin aggregate"
    );
    ctx.register_udaf(udaf.into_aggregate_udf());
}

pub trait SessionContextExt {
    /// See [`register_plugin`].
    fn register_plugin(&self, path: impl AsRef<Path>) -> Result<Vec<Registration>, LoadError>;
}

impl SessionContextExt for SessionContext {
    fn register_plugin(&self, path: impl AsRef<Path>) -> Result<Vec<Registration>, LoadError> {
        register_plugin(self, path)
    }
}

/// The shared libraries in `dir` (files ending in the platform's library suffix), sorted.
pub fn libraries_in(dir: impl AsRef<Path>) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir.as_ref())? {
        let path = entry?.path();
        let is_library = path
            .extension()
            .is_some_and(|e| e == std::env::consts::DLL_EXTENSION);
        if is_library && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}
