//! Plugins from SQL: `CREATE [OR REPLACE] FUNCTION ... LANGUAGE plugin AS 'lib.so'` through
//! DataFusion's [`FunctionFactory`], confined to configured plugin directories, with a cache that
//! shares one loaded library between all functions created from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::execution::context::{FunctionFactory, RegisterFunction, SessionState};
use datafusion::logical_expr::{CreateFunction, Expr, ScalarUDF};
use datafusion::prelude::SessionContext;
use udf_abi::v2::UdfType;

use crate::error::LoadError;
use crate::ffi::{FunctionSignature, PluginFunction, PluginLibrary};
use crate::types::family;
use crate::udf::PluginUdf;

/// Why a `CREATE FUNCTION ... LANGUAGE plugin` statement was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DdlError {
    /// Loading from SQL is switched off for this session.
    #[error(
        "loading plugin libraries from SQL is disabled in this session{}",
        if *.no_dirs { ": no plugin directory is configured (start udfsql with --plugin-dir DIR, \
                        or give the engine's PluginLoader a plugin directory)" } else { "" }
    )]
    SqlLoadingDisabled {
        /// True when the reason is that no directory is configured.
        no_dirs: bool,
    },
    /// The path leaves the configured plugin directories (after resolving `..` and symlinks).
    #[error("plugin library '{given}' resolves to {resolved}, which is outside the plugin directories ({})", display_dirs(.dirs))]
    OutsidePluginDirs {
        /// The path as written in SQL.
        given: String,
        /// The canonical path it resolves to.
        resolved: PathBuf,
        /// The configured directories.
        dirs: Vec<PathBuf>,
    },
    /// No file of that name in any plugin directory.
    #[error("plugin library '{given}' not found in the plugin directories ({})", display_dirs(.dirs))]
    NotInPluginDirs {
        /// The path as written in SQL.
        given: String,
        /// The configured directories.
        dirs: Vec<PathBuf>,
    },
    /// The library itself could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `LANGUAGE` is missing or not `plugin`.
    #[error(
        "CREATE FUNCTION {function}: unsupported language {language}; write LANGUAGE plugin AS 'library'"
    )]
    Language {
        /// The SQL name.
        function: String,
        /// What was written.
        language: String,
    },
    /// The `AS` clause is missing or not a string literal.
    #[error("CREATE FUNCTION {function}: expected AS 'path/to/library' (a string literal)")]
    MissingLibrary {
        /// The SQL name.
        function: String,
    },
    /// A function of that name exists and `OR REPLACE` was not given.
    #[error("function {function} already exists; use CREATE OR REPLACE FUNCTION to replace it")]
    AlreadyExists {
        /// The SQL name.
        function: String,
    },
    /// The library has no function that fits.
    #[error(
        "library {library} has no function named {function} (pick one with AS 'library#function'); \
         it provides: {available}"
    )]
    NoSuchFunction {
        /// The SQL name.
        function: String,
        /// The library.
        library: PathBuf,
        /// Its functions' signatures.
        available: String,
    },
    /// The declared signature differs from the library's.
    #[error(
        "CREATE FUNCTION {function}: declared {declared} but library {library} provides {actual}"
    )]
    SignatureMismatch {
        /// The SQL name.
        function: String,
        /// What the statement declared.
        declared: String,
        /// What the library says.
        actual: Box<FunctionSignature>,
        /// The library.
        library: PathBuf,
    },
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Loads plugin libraries, sharing one [`PluginLibrary`] per file, and decides which files SQL may
/// load.
///
/// * [`load`](Self::load) is for trusted callers (the command line, the embedding program): any
///   path.
/// * [`load_from_sql`](Self::load_from_sql) is what `CREATE FUNCTION` uses: a relative path is
///   looked up in the plugin directories, and the canonical result (after `..` and symlinks) must
///   lie inside one of them. Without plugin directories, or after
///   [`disable_sql_loading`](Self::disable_sql_loading), SQL cannot load anything.
#[derive(Debug, Default)]
pub struct PluginLoader {
    dirs: Vec<PathBuf>,
    sql_loading_disabled: bool,
    libraries: Mutex<HashMap<PathBuf, Weak<PluginLibrary>>>,
}

impl PluginLoader {
    /// A loader with no plugin directory: SQL cannot load libraries until one is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory SQL may load libraries from. It must exist; it is canonicalised.
    pub fn with_plugin_dir(mut self, dir: impl AsRef<Path>) -> std::io::Result<Self> {
        let dir = std::fs::canonicalize(dir.as_ref()).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("plugin directory {}: {e}", dir.as_ref().display()),
            )
        })?;
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("plugin directory {} is not a directory", dir.display()),
            ));
        }
        if !self.dirs.contains(&dir) {
            self.dirs.push(dir);
        }
        Ok(self)
    }

    /// Refuses every load from SQL, whatever the directories.
    pub fn disable_sql_loading(mut self) -> Self {
        self.sql_loading_disabled = true;
        self
    }

    /// The canonical plugin directories.
    pub fn plugin_dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Loads `path` (trusted: no directory check), reusing the library if it is loaded already.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Arc<PluginLibrary>, LoadError> {
        let given = path.as_ref();
        let canonical = std::fs::canonicalize(given).map_err(|source| LoadError::NotFound {
            path: given.to_path_buf(),
            source,
        })?;
        let mut libraries = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(library) = libraries.get(&canonical).and_then(Weak::upgrade) {
            return Ok(library);
        }
        libraries.retain(|_, weak| weak.strong_count() > 0);
        let library = PluginLibrary::load(&canonical)?;
        libraries.insert(canonical, Arc::downgrade(&library));
        Ok(library)
    }

    /// Resolves a path written in SQL under the policy described on [`PluginLoader`].
    pub fn resolve_sql_path(&self, given: &str) -> Result<PathBuf, DdlError> {
        if self.sql_loading_disabled || self.dirs.is_empty() {
            return Err(DdlError::SqlLoadingDisabled {
                no_dirs: !self.sql_loading_disabled,
            });
        }
        let written = Path::new(given);
        let candidates: Vec<PathBuf> = if written.is_absolute() {
            vec![written.to_path_buf()]
        } else {
            self.dirs.iter().map(|d| d.join(written)).collect()
        };
        let Some(resolved) = candidates
            .iter()
            .find_map(|c| std::fs::canonicalize(c).ok())
        else {
            return Err(DdlError::NotInPluginDirs {
                given: given.to_string(),
                dirs: self.dirs.clone(),
            });
        };
        if !self.dirs.iter().any(|d| resolved.starts_with(d)) {
            return Err(DdlError::OutsidePluginDirs {
                given: given.to_string(),
                resolved,
                dirs: self.dirs.clone(),
            });
        }
        Ok(resolved)
    }

    /// Loads a library named in SQL, under the policy described on [`PluginLoader`].
    pub fn load_from_sql(&self, given: &str) -> Result<Arc<PluginLibrary>, DdlError> {
        let path = self.resolve_sql_path(given)?;
        Ok(self.load(path)?)
    }

    /// The number of distinct libraries currently loaded through this loader.
    pub fn loaded_libraries(&self) -> usize {
        let libraries = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
        libraries.values().filter(|w| w.strong_count() > 0).count()
    }
}

/// DataFusion's [`FunctionFactory`] for `CREATE FUNCTION ... LANGUAGE plugin`.
///
/// ```sql
/// CREATE FUNCTION my_repeat(VARCHAR, BIGINT UNSIGNED) RETURNS VARCHAR
///     LANGUAGE plugin AS 'libudf_plugin_repeat.so';
/// ```
///
/// The SQL name may differ from the library's. Argument and return types, when declared, must
/// match the library's signature. `IMMUTABLE` (the default), `STABLE` or `VOLATILE` set the
/// function's volatility.
#[derive(Debug)]
pub struct PluginFunctionFactory {
    loader: Arc<PluginLoader>,
}

impl PluginFunctionFactory {
    /// A factory that loads through `loader`.
    pub fn new(loader: Arc<PluginLoader>) -> Self {
        PluginFunctionFactory { loader }
    }

    fn create_udf(
        &self,
        state: &SessionState,
        stmt: &CreateFunction,
    ) -> Result<PluginUdf, DdlError> {
        // Calls are resolved with normalised (lower-case) identifiers; without this a function
        // created as `Sq` could only be called as `"Sq"`.
        let name = if state.config_options().sql_parser.enable_ident_normalization {
            stmt.name.to_lowercase()
        } else {
            stmt.name.clone()
        };
        match &stmt.params.language {
            Some(lang) if lang.value.eq_ignore_ascii_case("plugin") => {}
            other => {
                return Err(DdlError::Language {
                    function: name,
                    language: other
                        .as_ref()
                        .map_or_else(|| "(none)".to_string(), |l| l.value.clone()),
                });
            }
        }
        let target = match &stmt.params.function_body {
            Some(Expr::Literal(
                ScalarValue::Utf8(Some(p))
                | ScalarValue::LargeUtf8(Some(p))
                | ScalarValue::Utf8View(Some(p)),
                _,
            )) => LibraryTarget::parse(p),
            _ => return Err(DdlError::MissingLibrary { function: name }),
        };
        if !stmt.or_replace && state.scalar_functions().contains_key(&name) {
            return Err(DdlError::AlreadyExists { function: name });
        }
        let library = self.loader.load_from_sql(&target.path)?;
        let function = pick_function(&library, &name, target.function.as_deref())?;
        check_declared_types(&name, stmt, &function)?;
        let volatility = stmt
            .params
            .behavior
            .unwrap_or_else(|| PluginUdf::declared_volatility(&function));
        tracing::info!(
            function = %name,
            signature = %function.signature(),
            library = %library.path().display(),
            "CREATE FUNCTION from plugin library"
        );
        Ok(PluginUdf::new(name, function, volatility))
    }
}

/// What `AS '...'` names: a library, and optionally one of its functions after `#`
/// (`'libtoolbox.so#add_days'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryTarget {
    /// The library path as written.
    pub path: String,
    /// The function's name inside the library, if given.
    pub function: Option<String>,
}

impl LibraryTarget {
    /// Splits `lib.so#function`; a string without `#` names only the library.
    pub fn parse(text: &str) -> LibraryTarget {
        match text.rsplit_once('#') {
            Some((path, function)) if !function.is_empty() && !path.is_empty() => LibraryTarget {
                path: path.to_string(),
                function: Some(function.to_string()),
            },
            _ => LibraryTarget {
                path: text.to_string(),
                function: None,
            },
        }
    }
}

/// The function named after `#`; else the library's only function; else the one whose name
/// equals the SQL name.
fn pick_function(
    library: &Arc<PluginLibrary>,
    sql_name: &str,
    wanted: Option<&str>,
) -> Result<PluginFunction, DdlError> {
    let functions = library.functions();
    let index = match wanted {
        Some(name) => functions.iter().position(|f| f.name == name),
        None if functions.len() == 1 => Some(0),
        None => functions.iter().position(|f| f.name == sql_name),
    };
    index
        .and_then(|i| library.function(i))
        .ok_or_else(|| DdlError::NoSuchFunction {
            function: wanted.unwrap_or(sql_name).to_string(),
            library: library.path().to_path_buf(),
            available: functions
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        })
}

/// Whether a declared SQL type stands for `param`: VARCHAR/TEXT for String, BYTEA for Binary,
/// any TIMESTAMP for Timestamp, else the canonical Arrow type.
fn declared_matches(declared: &DataType, param: UdfType) -> bool {
    family(declared) == Some(param)
}

fn check_declared_types(
    name: &str,
    stmt: &CreateFunction,
    function: &PluginFunction,
) -> Result<(), DdlError> {
    let sig = function.signature();
    let args_ok = match &stmt.args {
        None => true,
        Some(args) => {
            args.len() == sig.arg_types.len()
                && args
                    .iter()
                    .zip(&sig.arg_types)
                    .all(|(a, &p)| declared_matches(&a.data_type, p))
        }
    };
    let return_ok = stmt
        .return_type
        .as_ref()
        .is_none_or(|t| declared_matches(t, sig.return_type));
    if args_ok && return_ok {
        return Ok(());
    }
    let args = stmt.args.as_ref().map_or_else(
        || "(any)".to_string(),
        |args| {
            let types: Vec<String> = args.iter().map(|a| a.data_type.to_string()).collect();
            format!("({})", types.join(", "))
        },
    );
    let ret = stmt
        .return_type
        .as_ref()
        .map_or_else(|| "(any)".to_string(), |t| t.to_string());
    Err(DdlError::SignatureMismatch {
        function: name.to_string(),
        declared: format!("{name}{args} RETURNS {ret}"),
        actual: Box::new(sig.clone()),
        library: function.library().path().to_path_buf(),
    })
}

#[async_trait]
impl FunctionFactory for PluginFunctionFactory {
    async fn create(
        &self,
        state: &SessionState,
        statement: CreateFunction,
    ) -> Result<RegisterFunction> {
        let udf = self
            .create_udf(state, &statement)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(RegisterFunction::Scalar(Arc::new(
            ScalarUDF::new_from_impl(udf),
        )))
    }
}

/// Installs plugin DDL in `ctx`: `CREATE FUNCTION ... LANGUAGE plugin` through `loader`, and the
/// `plugin_functions` table that lists the session's plugin functions.
pub fn install(ctx: &SessionContext, loader: Arc<PluginLoader>) -> Result<()> {
    ctx.state_ref()
        .write()
        .set_function_factory(Arc::new(PluginFunctionFactory::new(loader)));
    crate::catalog::register_plugin_functions_table(ctx)
}
