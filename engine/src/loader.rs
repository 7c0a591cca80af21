//! [`PluginLoader`]: loads plugin libraries for a session (one [`PluginLibrary`] per file), and
//! decides which files SQL may load (the plugin directories and their trust policy) and how the
//! functions it creates run (isolation, worker limits).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::ddl::DdlError;
use crate::error::LoadError;
use crate::ffi::PluginLibrary;
use crate::isolation::{Isolation, WorkerLimits};
use crate::trust::{Sha256Digest, check_not_writable_by_others};

/// Loads plugin libraries, sharing one [`PluginLibrary`] per file, and decides which files SQL may
/// load.
///
/// * [`load`](Self::load) is for trusted callers (the command line, the embedding program): any
///   path.
/// * [`load_from_sql`](Self::load_from_sql) is what `CREATE FUNCTION` uses: a relative path is
///   looked up in the plugin directories, and the canonical result (after `..` and symlinks) must
///   lie inside one of them. The library file, and every directory from it up to `/`, must not be
///   writable by anyone but root and this process's user (see [`judge`](crate::judge)). Without
///   plugin directories, or after [`disable_sql_loading`](Self::disable_sql_loading), SQL cannot
///   load anything.
///
/// Both log every load (path, SHA-256, ABI, functions) through `tracing`, and both can check a
/// pinned SHA-256 digest ([`load_pinned`](Self::load_pinned), `AS 'lib.so#sha256=...'`).
#[derive(Debug, Default)]
pub struct PluginLoader {
    dirs: Vec<PathBuf>,
    sql_loading_disabled: bool,
    libraries: Mutex<HashMap<PathBuf, Weak<PluginLibrary>>>,
    isolation: Isolation,
    worker_limits: WorkerLimits,
    compile: Option<crate::compile::CompileOptions>,
}

impl PluginLoader {
    /// A loader with no plugin directory: SQL cannot load libraries until one is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory SQL may load libraries from. It must exist; it is canonicalised, and it
    /// must pass the permission rules (refused with the reason otherwise).
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
        if let Err(problem) = check_not_writable_by_others(&dir) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "plugin directory {}: {problem}; SQL could load code that other users wrote",
                    dir.display()
                ),
            ));
        }
        if !self.dirs.contains(&dir) {
            self.dirs.push(dir);
        }
        Ok(self)
    }

    /// How libraries are evaluated when nothing else is said: [`register_loaded`](Self::register_loaded)
    /// and `CREATE FUNCTION` without `#isolation=` use it. [`Isolation::Process`] also sets the
    /// limits SQL's `#isolation=process` uses.
    pub fn with_isolation(mut self, isolation: Isolation) -> Self {
        if let Isolation::Process(limits) = &isolation {
            self.worker_limits = limits.clone();
        }
        self.isolation = isolation;
        self
    }

    /// The limits of isolated workers (for `#isolation=process` in SQL, and the default mode if
    /// it is process isolation).
    pub fn with_worker_limits(mut self, limits: WorkerLimits) -> Self {
        if let Isolation::Process(l) = &mut self.isolation {
            *l = limits.clone();
        }
        self.worker_limits = limits;
        self
    }

    /// The default isolation.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// The isolation for a library whose statement says `isolate` (`#isolation=process` is
    /// `Some(true)`, `#isolation=none` `Some(false)`, nothing `None`: the default).
    pub fn isolation_for(&self, isolate: Option<bool>) -> Isolation {
        match isolate {
            None => self.isolation.clone(),
            Some(true) => Isolation::Process(self.worker_limits.clone()),
            Some(false) => Isolation::InProcess,
        }
    }

    /// Lets `CREATE FUNCTION ... LANGUAGE rust` compile functions written in SQL with `options`
    /// (off unless called: compiled code is native code with this process's rights).
    pub fn with_compile(mut self, options: crate::compile::CompileOptions) -> Self {
        self.compile = Some(options);
        self
    }

    /// How functions written in SQL are compiled, if they may be. (Independent of
    /// [`disable_sql_loading`](Self::disable_sql_loading): a server that loads no library from
    /// SQL may still compile functions written in SQL when its administrator says so.)
    pub fn compile_options(&self) -> Option<&crate::compile::CompileOptions> {
        self.compile.as_ref()
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

    /// Loads `path` (trusted: no directory check), reusing the library if it is loaded already and
    /// the file at `path` is still the one it was loaded from (see
    /// [`PluginLibrary::load_pinned`]).
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Arc<PluginLibrary>, LoadError> {
        self.load_pinned(path, None)
    }

    /// Like [`load`](Self::load), and refuses the library unless the SHA-256 digest of the file
    /// that was loaded equals `pin` (when given).
    pub fn load_pinned(
        &self,
        path: impl AsRef<Path>,
        pin: Option<&Sha256Digest>,
    ) -> Result<Arc<PluginLibrary>, LoadError> {
        let given = path.as_ref();
        let result = self.load_cached(given, pin);
        if let Err(e) = &result {
            tracing::warn!(path = %given.display(), error = %e, "plugin library refused");
        }
        result
    }

    fn load_cached(
        &self,
        given: &Path,
        pin: Option<&Sha256Digest>,
    ) -> Result<Arc<PluginLibrary>, LoadError> {
        let canonical = std::fs::canonicalize(given).map_err(|source| LoadError::NotFound {
            path: given.to_path_buf(),
            source,
        })?;
        // Every load goes through `PluginLibrary::load_pinned`, which shares the one library this
        // process holds for a path only when the file now at the path is the one it was made
        // from (and refuses other bytes while it is held): a cache here that did not look at the
        // file would run the old code of a replaced file. Hashing, `dlopen` and the library's
        // initialisers run without this lock.
        let library = PluginLibrary::load_pinned(&canonical, pin)?;
        let mut libraries = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
        libraries.retain(|_, weak| weak.strong_count() > 0);
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
        if let Err(problem) = check_not_writable_by_others(&resolved) {
            tracing::warn!(library = %resolved.display(), %problem, "plugin library refused");
            return Err(DdlError::Insecure {
                library: resolved,
                problem,
            });
        }
        Ok(resolved)
    }

    /// Loads a library named in SQL, under the policy described on [`PluginLoader`], checking
    /// `pin` when given.
    pub fn load_from_sql(
        &self,
        given: &str,
        pin: Option<&Sha256Digest>,
    ) -> Result<Arc<PluginLibrary>, DdlError> {
        let path = self.resolve_sql_path(given)?;
        Ok(self.load_pinned(path, pin)?)
    }

    /// The number of distinct libraries currently loaded through this loader.
    pub fn loaded_libraries(&self) -> usize {
        let libraries = self.libraries.lock().unwrap_or_else(|e| e.into_inner());
        libraries.values().filter(|w| w.strong_count() > 0).count()
    }
}
