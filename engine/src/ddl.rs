//! Plugins from SQL: `CREATE [OR REPLACE] FUNCTION ... LANGUAGE plugin AS 'lib.so'` through
//! DataFusion's [`FunctionFactory`], loading through a [`PluginLoader`] (confined to configured
//! plugin directories, one loaded library shared by all functions created from it), and `DROP
//! FUNCTION`.

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::context::{FunctionFactory, RegisterFunction, SessionState};
use datafusion::logical_expr::{AggregateUDF, CreateFunction, Expr, ScalarUDF};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;

use crate::error::LoadError;
use crate::ffi::{FunctionSignature, PluginFunction, PluginLibrary};
use crate::isolation::WorkerPool;
use crate::loader::PluginLoader;
use crate::trust::{DigestParseError, InsecurePath, Sha256Digest};
use crate::types::{ValueType, family};
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
    /// The library, its directory or a directory above it could be written by other users.
    #[error("refusing to load plugin library {library} from SQL: {problem}")]
    Insecure {
        /// The library.
        library: PathBuf,
        /// Which file or directory is at fault, and why.
        problem: InsecurePath,
    },
    /// `AS '...'` is malformed.
    #[error("CREATE FUNCTION {function}: AS '{target}': {reason}")]
    BadTarget {
        /// The SQL name.
        function: String,
        /// What was written.
        target: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The library itself could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The statement could not finish: the blocking load task or the registration failed.
    #[error("CREATE FUNCTION could not finish: {0}")]
    Interrupted(String),
    /// `LANGUAGE rust` in a session that does not compile.
    #[error(
        "CREATE FUNCTION {function} LANGUAGE rust: compiling functions from SQL is off in this \
         session (start udfsql with --allow-compile, or give the engine's PluginLoader \
         CompileOptions); compiled code runs as native code with this process's rights"
    )]
    CompileDisabled {
        /// The SQL name.
        function: String,
    },
    /// A function written in SQL did not compile.
    #[error(transparent)]
    Compile(#[from] crate::compile::CompileError),
    /// `LANGUAGE` is missing or not `plugin` or `rust`.
    #[error(
        "CREATE FUNCTION {function}: unsupported language {language}; write LANGUAGE plugin AS 'library' or LANGUAGE rust AS $$ body $$"
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
///
/// Installed with [`install`], it registers the function itself, in the live session state and
/// under the same write lock as the check that the name is free, so two concurrent `CREATE
/// FUNCTION f` without `OR REPLACE` cannot both succeed. The library is hashed and mapped on a
/// blocking thread, not on the async executor.
#[derive(Debug)]
pub struct PluginFunctionFactory {
    loader: Arc<PluginLoader>,
    session: Option<Weak<RwLock<SessionState>>>,
}

/// How the name of a `CREATE FUNCTION` statement becomes the registered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameRule {
    /// DataFusion's plan no longer says whether the name was quoted: lower-case it (as for an
    /// unquoted name) when the session normalises identifiers.
    Normalize,
    /// [`execute_statement`] normalised it already from the parsed statement (quoted names keep
    /// their case).
    Exact,
}

impl PluginFunctionFactory {
    /// A factory that loads through `loader`.
    pub fn new(loader: Arc<PluginLoader>) -> Self {
        PluginFunctionFactory {
            loader,
            session: None,
        }
    }

    /// Creates the function of `stmt` and registers it in the session, atomically with the check
    /// that its name is free (unless `OR REPLACE`).
    async fn create_and_register(
        &self,
        state: &SessionState,
        stmt: &CreateFunction,
        rule: NameRule,
        live: Option<Arc<RwLock<SessionState>>>,
        body_at: Option<(u64, u64)>,
    ) -> Result<Created, DdlError> {
        let prepared = self.prepare(state, stmt, rule, body_at)?;
        let taken = |state: &SessionState, name: &str| {
            state.scalar_functions().contains_key(name)
                || state.aggregate_functions().contains_key(name)
        };
        if !stmt.or_replace && taken(state, &prepared.name) {
            return Err(DdlError::AlreadyExists {
                function: prepared.name,
            });
        }
        let loader = Arc::clone(&self.loader);
        let target = prepared.target.clone();
        let isolation = self.loader.isolation_for(prepared.target.isolate);
        let partitions = state.config().target_partitions();
        let source = prepared.source.clone();
        let load = move || -> Result<_, DdlError> {
            let library = match (&source, loader.compile_options()) {
                (Some(function), Some(options)) => {
                    let compiled = crate::compile::compile(options, function)?;
                    tracing::info!(
                        function = %function.name,
                        library = %compiled.library.display(),
                        cached = compiled.cached,
                        "compiled function written in SQL"
                    );
                    loader.load_pinned(&compiled.library, Some(&compiled.sha256))?
                }
                (Some(function), None) => {
                    return Err(DdlError::CompileDisabled {
                        function: function.name.clone(),
                    });
                }
                (None, _) => loader.load_from_sql(&target.path, target.sha256.as_ref())?,
            };
            let pool = crate::register::worker_pool(&library, &isolation, partitions)?;
            Ok((library, pool))
        };
        // Hashing, `dlopen` and starting an isolated library's first worker block: keep them off
        // the async executor's threads.
        let (library, pool) = match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle
                .spawn_blocking(load)
                .await
                .map_err(|e| DdlError::Interrupted(e.to_string()))??,
            Err(_) => load()?,
        };
        let created = match pick_function(
            &library,
            &prepared.name,
            prepared.target.function.as_deref(),
        ) {
            Ok(_) => Created::Scalar(Arc::new(
                prepared.finish(stmt, &library, pool)?.into_scalar_udf(),
            )),
            Err(no_scalar) => {
                let wanted = prepared.target.function.as_deref();
                let Some(aggregate) = pick_aggregate(&library, &prepared.name, wanted) else {
                    return Err(no_scalar);
                };
                Created::Aggregate(Arc::new(
                    prepared
                        .finish_aggregate(stmt, aggregate, pool)?
                        .into_aggregate_udf(),
                ))
            }
        };
        if let Some(live) = live.or_else(|| self.session.as_ref().and_then(Weak::upgrade)) {
            let mut state = live.write();
            if !stmt.or_replace && taken(&state, created.name()) {
                return Err(DdlError::AlreadyExists {
                    function: created.name().to_string(),
                });
            }
            let interrupted = |e: DataFusionError| DdlError::Interrupted(e.to_string());
            // One function per name: OR REPLACE of a scalar function by an aggregate (or back)
            // removes the other kind.
            match &created {
                Created::Scalar(udf) => {
                    state.deregister_udaf(udf.name()).map_err(interrupted)?;
                    state.register_udf(Arc::clone(udf)).map_err(interrupted)?;
                }
                Created::Aggregate(udaf) => {
                    state.deregister_udf(udaf.name()).map_err(interrupted)?;
                    state.register_udaf(Arc::clone(udaf)).map_err(interrupted)?;
                }
            }
        }
        Ok(created)
    }

    /// Everything that needs no file access: the name, the language, the target.
    fn prepare(
        &self,
        state: &SessionState,
        stmt: &CreateFunction,
        rule: NameRule,
        body_at: Option<(u64, u64)>,
    ) -> Result<Prepared, DdlError> {
        let name = if rule == NameRule::Normalize
            && state.config_options().sql_parser.enable_ident_normalization
        {
            // As DataFusion normalises unquoted identifiers in calls.
            stmt.name.to_ascii_lowercase()
        } else {
            stmt.name.clone()
        };
        match &stmt.params.language {
            Some(lang) if lang.value.eq_ignore_ascii_case("plugin") => {}
            Some(lang) if lang.value.eq_ignore_ascii_case("rust") => {
                return self.prepare_rust(stmt, name, body_at);
            }
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
            )) => LibraryTarget::parse(p).map_err(|reason| DdlError::BadTarget {
                function: name.clone(),
                target: p.clone(),
                reason,
            })?,
            _ => return Err(DdlError::MissingLibrary { function: name }),
        };
        Ok(Prepared {
            name,
            target,
            source: None,
        })
    }

    /// `LANGUAGE rust AS $$ body $$`: the function to compile, loaded from the library it becomes.
    fn prepare_rust(
        &self,
        stmt: &CreateFunction,
        name: String,
        body_at: Option<(u64, u64)>,
    ) -> Result<Prepared, DdlError> {
        if self.loader.compile_options().is_none() {
            return Err(DdlError::CompileDisabled { function: name });
        }
        let declaration = |reason: String| {
            DdlError::Compile(crate::compile::CompileError::Declaration {
                function: name.clone(),
                reason,
            })
        };
        let body = match &stmt.params.function_body {
            Some(Expr::Literal(
                ScalarValue::Utf8(Some(b))
                | ScalarValue::LargeUtf8(Some(b))
                | ScalarValue::Utf8View(Some(b)),
                _,
            )) => b.clone(),
            _ => return Err(declaration("expected AS $$ body $$ (a string)".into())),
        };
        let Some(return_type) = stmt.return_type.clone() else {
            return Err(declaration("RETURNS type is required".into()));
        };
        let mut args = Vec::new();
        for (i, arg) in stmt.args.iter().flatten().enumerate() {
            let Some(arg_name) = &arg.name else {
                return Err(declaration(format!(
                    "parameter {} needs a name (the body refers to it)",
                    i + 1
                )));
            };
            if arg.default_expr.is_some() {
                return Err(declaration(format!(
                    "parameter {} cannot have a default",
                    arg_name.value
                )));
            }
            args.push((arg_name.value.clone(), arg.data_type.clone()));
        }
        // Option lines at the top of the body: `#isolation=process`, as after a library path.
        let (options, code, skipped_lines) = crate::compile::split_options(&body);
        let mut target = LibraryTarget::new(String::new());
        for line in &options {
            let parsed = LibraryTarget::parse(&format!("body{line}"))
                .map_err(|reason| declaration(format!("the option line `{line}`: {reason}")))?;
            if parsed.function.is_some() || parsed.sha256.is_some() {
                return Err(declaration(format!(
                    "the option line `{line}`: a function written in SQL takes only options \
                     (isolation=process|none), not a function name or a digest"
                )));
            }
            target
                .merge_options(&parsed)
                .map_err(|reason| declaration(format!("the option line `{line}`: {reason}")))?;
        }
        target.function = Some(name.clone());
        Ok(Prepared {
            source: Some(crate::compile::RustFunction {
                name: name.clone(),
                args,
                return_type,
                body: code.to_string(),
                body_at,
                skipped_lines,
            }),
            name,
            target,
        })
    }
}

/// A `CREATE FUNCTION` statement checked up to loading its library.
struct Prepared {
    name: String,
    target: LibraryTarget,
    /// The function to compile (`LANGUAGE rust`), instead of a library path.
    source: Option<crate::compile::RustFunction>,
}

impl Prepared {
    fn finish(
        self,
        stmt: &CreateFunction,
        library: &Arc<PluginLibrary>,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<PluginUdf, DdlError> {
        let Prepared {
            name,
            target,
            source,
        } = self;
        let function = pick_function(library, &name, target.function.as_deref())?;
        check_declared_types(&name, stmt, &function)?;
        let volatility = stmt
            .params
            .behavior
            .unwrap_or_else(|| PluginUdf::declared_volatility(&function));
        tracing::info!(
            function = %name,
            signature = %function.signature(),
            library = %library.path().display(),
            sha256 = %library.sha256(),
            pinned = target.sha256.is_some(),
            isolated = pool.is_some(),
            "CREATE FUNCTION from plugin library"
        );
        let mut udf = PluginUdf::new(name.clone(), function, volatility);
        if let Some(source) = source {
            udf = udf.with_rust_source(source.body);
        }
        if target.max_in_flight.is_some()
            || target.chunk_rows.is_some()
            || target.call_timeout.is_some()
            || target.retries.is_some()
        {
            let Some(limits) = udf.async_limits().cloned() else {
                return Err(DdlError::BadTarget {
                    function: name,
                    target: stmt_target(stmt),
                    reason: "max_in_flight, chunk_rows, call_timeout and retries apply to \
                             asynchronous functions only, and this function is synchronous"
                        .to_string(),
                });
            };
            udf = udf.with_async_limits(
                crate::AsyncLimits::new(
                    target.max_in_flight.unwrap_or(limits.max_in_flight),
                    target.chunk_rows.unwrap_or(limits.chunk_rows),
                    target.call_timeout.unwrap_or(limits.call_timeout),
                )
                .with_retries(target.retries.unwrap_or(limits.retries)),
            );
        }
        Ok(match pool {
            Some(pool) => udf.with_worker_pool(pool),
            None => udf,
        })
    }

    /// The aggregate function of `CREATE FUNCTION ... AS 'lib.so#aggregate'` (ABI 2.4).
    fn finish_aggregate(
        self,
        stmt: &CreateFunction,
        function: crate::ffi::aggregate::PluginAggregate,
        pool: Option<Arc<WorkerPool>>,
    ) -> Result<crate::udaf::PluginUdaf, DdlError> {
        let Prepared {
            name,
            target,
            source,
        } = self;
        let refuse = |reason: &str| DdlError::BadTarget {
            function: name.clone(),
            target: stmt_target(stmt),
            reason: reason.to_string(),
        };
        if target.max_in_flight.is_some()
            || target.chunk_rows.is_some()
            || target.call_timeout.is_some()
            || target.retries.is_some()
        {
            return Err(refuse(
                "max_in_flight, chunk_rows, call_timeout and retries apply to asynchronous \
                 functions only, and this is an aggregate function",
            ));
        }
        let sig = function.signature();
        let args_ok = stmt.args.as_ref().is_none_or(|args| {
            args.len() == sig.arg_types.len()
                && args
                    .iter()
                    .zip(&sig.arg_types)
                    .all(|(a, t)| crate::types::arrow::declared_matches(&a.data_type, t))
        });
        let return_ok = stmt
            .return_type
            .as_ref()
            .is_none_or(|t| crate::types::arrow::declared_matches(t, &sig.return_type));
        if !(args_ok && return_ok) {
            return Err(refuse(&format!(
                "the declared types differ from the library's aggregate {}",
                sig.display_as(&sig.name)
            )));
        }
        tracing::info!(
            function = %name,
            signature = %sig,
            library = %function.library().path().display(),
            pinned = target.sha256.is_some(),
            isolated = pool.is_some(),
            "CREATE FUNCTION (aggregate) from plugin library"
        );
        let mut udaf = crate::udaf::PluginUdaf::new(name, function);
        if let Some(source) = source {
            udaf = udaf.with_rust_source(source.body);
        }
        Ok(match pool {
            Some(pool) => udaf.with_worker_pool(pool),
            None => udaf,
        })
    }
}

/// What `CREATE FUNCTION ... LANGUAGE plugin` made.
#[derive(Debug, Clone)]
enum Created {
    Scalar(Arc<ScalarUDF>),
    Aggregate(Arc<AggregateUDF>),
}

impl Created {
    fn name(&self) -> &str {
        match self {
            Created::Scalar(udf) => udf.name(),
            Created::Aggregate(udaf) => udaf.name(),
        }
    }
}

/// The aggregate `wanted` (or, without it, the library's only function when it is an aggregate,
/// else the one called `sql_name`).
fn pick_aggregate(
    library: &Arc<PluginLibrary>,
    sql_name: &str,
    wanted: Option<&str>,
) -> Option<crate::ffi::aggregate::PluginAggregate> {
    let aggregates = library.aggregates();
    let index = match wanted {
        Some(name) => aggregates.iter().position(|a| a.name == name),
        None if aggregates.len() == 1 && library.functions().is_empty() => Some(0),
        None => aggregates.iter().position(|a| a.name == sql_name),
    }?;
    library.aggregate(index)
}

/// What `AS '...'` names: a library, then optionally, each after a `#`, one of its functions and a
/// SHA-256 pin and an isolation mode, in any order: `'libtoolbox.so#add_days'`,
/// `'libtoolbox.so#add_days#sha256=9f86d0…'`, `'librepeat.so#sha256=9f86d0…'`,
/// `'librepeat.so#isolation=process'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryTarget {
    /// The library path as written.
    pub path: String,
    /// The function's name inside the library, if given.
    pub function: Option<String>,
    /// The pinned SHA-256 digest of the library file, if given.
    pub sha256: Option<Sha256Digest>,
    /// `#isolation=process` (`Some(true)`) or `#isolation=none` (`Some(false)`), if given.
    pub isolate: Option<bool>,
    /// `#max_in_flight=N` (asynchronous functions): the most calls started and not completed.
    pub max_in_flight: Option<usize>,
    /// `#chunk_rows=N` (asynchronous functions): the most rows per call.
    pub chunk_rows: Option<usize>,
    /// `#call_timeout=250ms` or `=30s` (asynchronous functions): the time limit of one call.
    pub call_timeout: Option<std::time::Duration>,
    /// `#retries=N` (asynchronous functions): how many times a call that failed temporarily is
    /// started again (0 to 10).
    pub retries: Option<u32>,
}

/// A count option between 1 and `max`.
fn count_option(key: &str, value: &str, max: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "{key}={value}: expected a whole number from 1 to {max}"
        )),
    }
}

/// `250ms` or `30s`, from 1 ms to a day.
fn duration_option(key: &str, value: &str) -> Result<std::time::Duration, String> {
    let lower = value.to_ascii_lowercase();
    let parsed = if let Some(ms) = lower.strip_suffix("ms") {
        ms.parse::<u64>().ok().map(std::time::Duration::from_millis)
    } else if let Some(secs) = lower.strip_suffix('s') {
        secs.parse::<u64>().ok().map(std::time::Duration::from_secs)
    } else {
        None
    };
    match parsed {
        Some(d) if !d.is_zero() && d <= crate::async_udf::MAX_CALL_TIMEOUT => Ok(d),
        _ => Err(format!(
            "{key}={value}: expected a time from 1ms to 86400s, with its unit (250ms, 30s)"
        )),
    }
}

impl LibraryTarget {
    /// The library at `path` with no option given.
    pub fn new(path: String) -> LibraryTarget {
        LibraryTarget {
            path,
            function: None,
            sha256: None,
            isolate: None,
            max_in_flight: None,
            chunk_rows: None,
            call_timeout: None,
            retries: None,
        }
    }

    /// Takes the options given in `other` (isolation and the asynchronous limits); an option
    /// given in both is an error.
    fn merge_options(&mut self, other: &LibraryTarget) -> Result<(), String> {
        fn take<T: Clone>(
            mine: &mut Option<T>,
            theirs: &Option<T>,
            key: &str,
        ) -> Result<(), String> {
            match (mine.is_some(), theirs) {
                (true, Some(_)) => Err(format!("{key} is given twice")),
                (_, Some(v)) => {
                    *mine = Some(v.clone());
                    Ok(())
                }
                (_, None) => Ok(()),
            }
        }
        take(&mut self.isolate, &other.isolate, "isolation")?;
        take(
            &mut self.max_in_flight,
            &other.max_in_flight,
            "max_in_flight",
        )?;
        take(&mut self.chunk_rows, &other.chunk_rows, "chunk_rows")?;
        take(&mut self.call_timeout, &other.call_timeout, "call_timeout")?;
        take(&mut self.retries, &other.retries, "retries")
    }

    /// Parses `path[#function][#sha256=HEX][#isolation=process|none]`; the error says what is
    /// wrong.
    pub fn parse(text: &str) -> Result<LibraryTarget, String> {
        let mut parts = text.split('#');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err("no library path before '#'".to_string());
        }
        let mut target = LibraryTarget::new(path.to_string());
        for part in parts {
            if let Some((key, value)) = part.split_once('=') {
                if key.eq_ignore_ascii_case("isolation") {
                    if target.isolate.is_some() {
                        return Err("isolation is given twice".to_string());
                    }
                    target.isolate = Some(match value.to_ascii_lowercase().as_str() {
                        "process" => true,
                        "none" => false,
                        _ => {
                            return Err(format!(
                                "isolation={value}: write isolation=process or isolation=none"
                            ));
                        }
                    });
                    continue;
                }
                let twice = |k: &str| Err(format!("{k} is given twice"));
                match key.to_ascii_lowercase().as_str() {
                    "max_in_flight" if target.max_in_flight.is_some() => return twice(key),
                    "max_in_flight" => {
                        target.max_in_flight =
                            Some(count_option(key, value, crate::async_udf::MAX_IN_FLIGHT)?);
                        continue;
                    }
                    "chunk_rows" if target.chunk_rows.is_some() => return twice(key),
                    "chunk_rows" => {
                        target.chunk_rows =
                            Some(count_option(key, value, crate::async_udf::MAX_CHUNK_ROWS)?);
                        continue;
                    }
                    "call_timeout" if target.call_timeout.is_some() => return twice(key),
                    "call_timeout" => {
                        target.call_timeout = Some(duration_option(key, value)?);
                        continue;
                    }
                    "retries" if target.retries.is_some() => return twice(key),
                    "retries" => {
                        let max = crate::async_udf::MAX_RETRIES;
                        target.retries =
                            Some(value.parse::<u32>().ok().filter(|n| *n <= max).ok_or_else(
                                || {
                                    format!(
                                        "{key}={value}: expected a whole number from 0 to {max}"
                                    )
                                },
                            )?);
                        continue;
                    }
                    _ => {}
                }
                if !key.eq_ignore_ascii_case("sha256") {
                    return Err(format!(
                        "unknown option '{key}' (after '#' come a function name, sha256=<digest>, \
                         isolation=process|none, and for asynchronous functions max_in_flight=N, \
                         chunk_rows=N, call_timeout=250ms|30s and retries=N)"
                    ));
                }
                if target.sha256.is_some() {
                    return Err("sha256 is given twice".to_string());
                }
                target.sha256 = Some(value.parse().map_err(|e: DigestParseError| e.to_string())?);
            } else if part.is_empty() {
                return Err("empty name after '#'".to_string());
            } else if let Some(first) = &target.function {
                return Err(format!("two function names: '{first}' and '{part}'"));
            } else {
                target.function = Some(part.to_string());
            }
        }
        Ok(target)
    }
}

/// The text of `AS '...'` in `stmt`, for error messages.
fn stmt_target(stmt: &CreateFunction) -> String {
    match &stmt.params.function_body {
        Some(Expr::Literal(
            ScalarValue::Utf8(Some(p))
            | ScalarValue::LargeUtf8(Some(p))
            | ScalarValue::Utf8View(Some(p)),
            _,
        )) => p.clone(),
        _ => String::new(),
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
                .chain(library.aggregates().iter().map(|a| a.to_string()))
                .collect::<Vec<_>>()
                .join("; "),
        })
}

/// Whether a declared SQL type stands for `param`: VARCHAR/TEXT for String, BYTEA for Binary,
/// any TIMESTAMP for Timestamp, else the canonical Arrow type; for an Arrow type (ABI 2.2), that
/// type (see [`crate::types::arrow::declared_matches`]).
fn declared_matches(declared: &DataType, param: &ValueType) -> bool {
    match param {
        ValueType::Tag(t) => family(declared) == Some(*t),
        ValueType::Arrow(t) => crate::types::arrow::declared_matches(declared, t),
    }
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
                    .all(|(a, p)| declared_matches(&a.data_type, p))
        }
    };
    let return_ok = stmt
        .return_type
        .as_ref()
        .is_none_or(|t| declared_matches(t, &sig.return_type));
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
        let created = self
            .create_and_register(state, &statement, NameRule::Normalize, None, None)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        // DataFusion registers it (again: the same function) when this returns.
        Ok(match created {
            Created::Scalar(udf) => RegisterFunction::Scalar(udf),
            Created::Aggregate(udaf) => RegisterFunction::Aggregate(udaf),
        })
    }
}

/// Installs plugin DDL in `ctx`: `CREATE FUNCTION ... LANGUAGE plugin` through `loader`, the
/// `plugin_functions` table that lists the session's plugin functions, and the plugin line of
/// `EXPLAIN` ([`install_explain`](crate::install_explain)).
pub fn install(ctx: &SessionContext, loader: Arc<PluginLoader>) -> Result<()> {
    crate::explain::install_explain(ctx);
    crate::async_plan::install(ctx);
    let factory = Arc::new(PluginFunctionFactory {
        loader,
        session: Some(Arc::downgrade(&ctx.state_ref())),
    });
    {
        let state = ctx.state_ref();
        let mut state = state.write();
        state.set_function_factory(Arc::clone(&factory) as Arc<dyn FunctionFactory>);
        state.config_mut().set_extension(factory);
    }
    crate::catalog::register_plugin_functions_table(ctx)
}

/// Runs SQL text (one statement) in `ctx` like [`SessionContext::sql`], with
/// [`execute_statement`]'s rules for plugin DDL.
pub async fn sql(ctx: &SessionContext, sql: &str) -> Result<DataFrame> {
    let state = ctx.state();
    let dialect = state.config_options().sql_parser.dialect;
    let statement = state.sql_to_statement(sql, &dialect)?;
    execute_statement(ctx, statement).await
}

/// Runs one parsed statement in `ctx` like [`SessionContext::sql`] does, except that the names in
/// `CREATE FUNCTION` and `DROP FUNCTION` follow DataFusion's rules for identifiers in calls: a
/// quoted name keeps its case, an unquoted one is lower-cased (when the session normalises
/// identifiers). DataFusion's own plan of these statements keeps only the text of the name, so
/// through `SessionContext::sql` a quoted `CREATE FUNCTION "MyF"` is lower-cased and `DROP
/// FUNCTION MyF` looks for `MyF`; udfsql runs every statement through this function.
///
/// `DROP FUNCTION f` of a function that does not exist is an error naming it (`IF EXISTS` ignores
/// it).
pub async fn execute_statement(ctx: &SessionContext, statement: DfStatement) -> Result<DataFrame> {
    use datafusion::logical_expr::{DdlStatement, LogicalPlan, LogicalPlanBuilder};
    use datafusion::sql::sqlparser::ast::Statement;

    let state = ctx.state();
    let normalize = state.config_options().sql_parser.enable_ident_normalization;
    let mut statement = statement;
    let mut names_normalized = false;
    let mut body_at = None;
    if let DfStatement::Statement(inner) = &mut statement {
        match inner.as_mut() {
            Statement::CreateFunction(create) => {
                normalize_name(&mut create.name, normalize);
                names_normalized = true;
                body_at = dollar_body_start(create);
            }
            Statement::DropFunction(drop) => {
                for desc in &mut drop.func_desc {
                    normalize_name(&mut desc.name, normalize);
                }
            }
            _ => {}
        }
    }
    let plan = state.statement_to_plan(statement).await?;
    match &plan {
        LogicalPlan::Ddl(DdlStatement::CreateFunction(create)) if names_normalized => {
            let factory = state
                .config()
                .get_extension::<PluginFunctionFactory>()
                .filter(|_| {
                    create.params.language.as_ref().is_some_and(|l| {
                        l.value.eq_ignore_ascii_case("plugin")
                            || l.value.eq_ignore_ascii_case("rust")
                    })
                });
            if let Some(factory) = factory {
                factory
                    .create_and_register(
                        &state,
                        create,
                        NameRule::Exact,
                        Some(ctx.state_ref()),
                        body_at,
                    )
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                return Ok(DataFrame::new(
                    state,
                    LogicalPlanBuilder::empty(false).build()?,
                ));
            }
        }
        LogicalPlan::Ddl(DdlStatement::DropFunction(drop)) if !drop.if_exists => {
            let exists = state.scalar_functions().contains_key(&drop.name)
                || state.aggregate_functions().contains_key(&drop.name)
                || state.window_functions().contains_key(&drop.name);
            if !exists {
                return Err(DataFusionError::Execution(format!(
                    "DROP FUNCTION {}: no such function (DROP FUNCTION IF EXISTS ignores this)",
                    drop.name
                )));
            }
        }
        _ => {}
    }
    ctx.execute_logical_plan(plan).await
}

/// Where the body of `AS $$ body $$` (or `$tag$ body $tag$`) starts in the statement: line and
/// column, 1-based, of its first character; `None` for another body or without a position.
fn dollar_body_start(
    create: &datafusion::sql::sqlparser::ast::CreateFunction,
) -> Option<(u64, u64)> {
    use datafusion::sql::sqlparser::ast::{CreateFunctionBody, Expr as SqlExpr, Value};
    let body = match create.function_body.as_ref()? {
        CreateFunctionBody::AsBeforeOptions { body, .. }
        | CreateFunctionBody::AsAfterOptions(body) => body,
        _ => return None,
    };
    let SqlExpr::Value(value) = body else {
        return None;
    };
    let Value::DollarQuotedString(quoted) = &value.value else {
        return None;
    };
    let start = value.span.start;
    if start.line == 0 {
        return None;
    }
    // `$` + tag + `$` before the body.
    let opening = 2 + quoted.tag.as_ref().map_or(0, |t| t.chars().count() as u64);
    Some((start.line, start.column + opening))
}

/// Lower-cases the unquoted parts of a name, as DataFusion does for identifiers in calls.
fn normalize_name(name: &mut datafusion::sql::sqlparser::ast::ObjectName, normalize: bool) {
    use datafusion::sql::sqlparser::ast::ObjectNamePart;
    if !normalize {
        return;
    }
    for part in &mut name.0 {
        let ObjectNamePart::Identifier(ident) = part else {
            continue;
        };
        if ident.quote_style.is_none() {
            ident.value = ident.value.to_ascii_lowercase();
        }
        // The planner reads only the value; mark it quoted so nothing lower-cases it again.
        ident.quote_style = Some('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn asynchronous_options_parse_with_units_and_bounds() {
        let t = LibraryTarget::parse(
            "lib.so#call_timeout=250ms#f#MAX_IN_FLIGHT=256#chunk_rows=8#isolation=none",
        )
        .unwrap();
        assert_eq!(t.function.as_deref(), Some("f"));
        assert_eq!(t.max_in_flight, Some(256));
        assert_eq!(t.chunk_rows, Some(8));
        assert_eq!(t.call_timeout, Some(std::time::Duration::from_millis(250)));
        let t = LibraryTarget::parse("lib.so#call_timeout=30s").unwrap();
        assert_eq!(t.call_timeout, Some(std::time::Duration::from_secs(30)));
        assert_eq!(t.max_in_flight, None);
        assert_eq!(t.retries, None);
        for (n, want) in [("0", Some(0)), ("3", Some(3)), ("10", Some(10))] {
            let t = LibraryTarget::parse(&format!("lib.so#retries={n}")).unwrap();
            assert_eq!(t.retries, want);
        }
        for bad in ["lib.so#retries=11", "lib.so#retries=-1", "lib.so#retries=x"] {
            let e = LibraryTarget::parse(bad).unwrap_err();
            assert!(
                e.contains("expected a whole number from 0 to 10"),
                "{bad}: {e}"
            );
        }
        let e = LibraryTarget::parse("lib.so#retries=1#retries=2").unwrap_err();
        assert!(e.contains("given twice"), "{e}");
    }

    #[test]
    fn targets_parse_in_any_order() {
        let t = LibraryTarget::parse("lib.so").unwrap();
        assert_eq!(
            (t.path.as_str(), t.function, t.sha256),
            ("lib.so", None, None)
        );
        let t = LibraryTarget::parse("dir/lib.so#add_days").unwrap();
        assert_eq!(t.path, "dir/lib.so");
        assert_eq!(t.function.as_deref(), Some("add_days"));
        let pin: Sha256Digest = HEX.parse().unwrap();
        for text in [
            format!("lib.so#f#sha256={HEX}"),
            format!("lib.so#SHA256={HEX}#f"),
        ] {
            let t = LibraryTarget::parse(&text).unwrap();
            assert_eq!(t.function.as_deref(), Some("f"), "{text}");
            assert_eq!(t.sha256, Some(pin), "{text}");
        }
        let t = LibraryTarget::parse(&format!("lib.so#sha256={HEX}")).unwrap();
        assert_eq!((t.function, t.sha256), (None, Some(pin)));
    }

    #[test]
    fn malformed_targets_say_what_is_wrong() {
        for (text, expected) in [
            ("#f".to_string(), "no library path"),
            ("lib.so#".to_string(), "empty name"),
            ("lib.so#f#g".to_string(), "two function names: 'f' and 'g'"),
            ("lib.so#md5=00".to_string(), "unknown option 'md5'"),
            ("lib.so#sha256=abc".to_string(), "got 3 characters"),
            (
                format!("lib.so#sha256={HEX}#sha256={HEX}"),
                "sha256 is given twice",
            ),
            ("lib.so#max_in_flight=0".to_string(), "from 1 to 65536"),
            ("lib.so#max_in_flight=65537".to_string(), "from 1 to 65536"),
            (
                "lib.so#chunk_rows=x".to_string(),
                "chunk_rows=x: expected a whole number",
            ),
            ("lib.so#call_timeout=30".to_string(), "with its unit"),
            ("lib.so#call_timeout=0ms".to_string(), "from 1ms to 86400s"),
            (
                "lib.so#call_timeout=86401s".to_string(),
                "from 1ms to 86400s",
            ),
            (
                "lib.so#max_in_flight=2#max_in_flight=3".to_string(),
                "max_in_flight is given twice",
            ),
        ] {
            let e = LibraryTarget::parse(&text).unwrap_err();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }
}
