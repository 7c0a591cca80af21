//! Turning a [`PluginSpec`] back into a function on a node: the executor loads the library from
//! its own plugin directories, pinned by the client's digest; the scheduler only plans with the
//! signature the client sent and never maps plugin code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use parking_lot::Mutex;
use udf_engine::{LoadError, PluginLoader, PluginUdf, Sha256Digest};

use crate::spec::PluginSpec;

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
    role: Role,
    loader: Arc<PluginLoader>,
    target_partitions: usize,
    /// Functions loaded so far, by spec: a plan is decoded once per task, the library is hashed
    /// and mapped once. The libraries stay mapped for the life of the process.
    loaded: Mutex<HashMap<PluginSpec, Arc<ScalarUDF>>>,
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
            loaded: Mutex::new(HashMap::new()),
        }
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
            return Ok(Arc::new(ScalarUDF::new_from_impl(RemotePluginUdf::new(
                spec.clone(),
                None,
            )?)));
        }
        if let Some(udf) = self.loaded.lock().get(spec) {
            return Ok(Arc::clone(udf));
        }
        match self.load(spec) {
            Ok(udf) => {
                let udf = Arc::new(ScalarUDF::new_from_impl(udf));
                self.loaded.lock().insert(spec.clone(), Arc::clone(&udf));
                Ok(udf)
            }
            Err(reason) => {
                let message = format!(
                    "plugin function {} cannot run on {}: {reason}",
                    spec.sql_name, self.node
                );
                tracing::warn!(function = %spec.sql_name, library = %spec.library, "{message}");
                Ok(Arc::new(ScalarUDF::new_from_impl(RemotePluginUdf::new(
                    spec.clone(),
                    Some(message),
                )?)))
            }
        }
    }

    /// The library file `spec` names in the plugin directories (under udfsql's rules for them),
    /// and the pin.
    fn find(&self, spec: &PluginSpec) -> std::result::Result<(PathBuf, Sha256Digest), String> {
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
    fn check_file(&self, spec: &PluginSpec) -> std::result::Result<(), String> {
        let (path, pin) = self.find(spec)?;
        let actual = Sha256Digest::of_file(&path)
            .map_err(|e| format!("cannot read its library {}: {e}", path.display()))?;
        if actual != pin {
            return Err(mismatch(&path, &actual, spec));
        }
        Ok(())
    }

    /// Loads `spec`'s library from the plugin directories with its digest as the pin, and checks
    /// that the function is the one the client planned with.
    fn load(&self, spec: &PluginSpec) -> std::result::Result<PluginUdf, String> {
        let (path, pin) = self.find(spec)?;
        let library = self
            .loader
            .load_pinned(&path, Some(&pin))
            .map_err(|e| match e {
                LoadError::DigestMismatch { path, actual, .. } => mismatch(&path, &actual, spec),
                other => other.to_string(),
            })?;
        let found = library.path().to_path_buf();
        let function = library.function_named(&spec.function).ok_or_else(|| {
            format!(
                "library {} has no function {}",
                path.display(),
                spec.function
            )
        })?;
        let signature = function.signature().to_string();
        if signature != spec.signature || library.abi().to_string() != spec.abi {
            return Err(format!(
                "library {} declares {signature} (ABI {}), but the client planned with {} (ABI {})",
                found.display(),
                library.abi(),
                spec.signature,
                spec.abi
            ));
        }
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
        if let Some(limits) = spec.worker_limits() {
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
        let return_type = udf_abi::type_string::parse(&spec.return_type)
            .or_else(|_| DataType::from_str(&spec.return_type))
            .map_err(|e| {
                DataFusionError::Plan(format!(
                    "plugin function {}: the plan's return type {:?} cannot be read: {e}",
                    spec.sql_name, spec.return_type
                ))
            })?;
        let volatility = spec.volatility()?;
        let signature = if spec.arguments == 0 {
            Signature::nullary(volatility)
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
