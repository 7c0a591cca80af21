//! Functions written in SQL: `CREATE FUNCTION ... LANGUAGE rust AS $$ body $$` compiled into an
//! ordinary udfsql plugin with the `#[udf]` SDK.
//!
//! * **The body.** Either the function's body over the declared parameters (an expression or
//!   statements ending in one, of the declared return type; NULL in gives NULL out, as for any
//!   strict `#[udf]` function), or, when it starts with `fn` or `#[`, whole Rust items with the
//!   function itself (`fn name(...) -> Option<T>` / `Result<T, String>` / Arrow types through
//!   `#[udf(vectorized)]`...), whose signature must then match the declared SQL types (checked at
//!   load, as for `LANGUAGE plugin`). Types map as `#[udf]` maps them: `BOOLEAN` `bool`, `INT`
//!   `i32`, `BIGINT` `i64`, `BIGINT UNSIGNED` `u64`, `REAL` `f32`, `DOUBLE` `f64`, `VARCHAR`
//!   `&str` (returns `String`), `BYTEA` `&[u8]` (returns `Vec<u8>`), `DATE` `udf_abi::Date`.
//! * **Dependencies**: one comment block in the body starting with `[dependencies]`
//!   (`/* [dependencies] regex = "1" */`), lines of Cargo's dependency table; no other table.
//! * **The crate** is generated in `<cache>/crates/<hash>/` and built with `cargo build
//!   --release` (with `--offline` when asked) into one target directory shared by every compiled
//!   function, so a second function reuses the SDK's dependencies. `<hash>` is the SHA-256 of
//!   everything that decides the library (the generated sources, the SDK's path and version, the
//!   toolchain's `rustc -vV`): the same function is never compiled twice, a changed body is a new
//!   library file (no stale image), and the library is loaded pinned to its digest.
//! * **Limits**: the build is killed after the time limit (its whole process group), its output
//!   is read up to a bound, and a library larger than the size limit is refused. Concurrent
//!   compilations of the same function wait on one lock file and build once; one process runs
//!   or waits for at most [`MAX_BUILDS`] builds at a time (they queue on cargo's lock of the
//!   shared target directory anyway) and refuses another at once, so that clients whose
//!   requests end before their builds do (the server's time limit) cannot pile up cargo
//!   processes or waiting threads.
//! * **Errors**: rustc's errors in the body, at the body's line and column.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::DataType;
use sha2::{Digest, Sha256};

use crate::trust::Sha256Digest;

/// How functions written in SQL are compiled.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The `udf-abi` crate (the SDK) the generated crates depend on.
    pub sdk: PathBuf,
    /// Where generated crates, the shared target directory and the libraries live.
    pub cache_dir: PathBuf,
    /// `cargo build --offline`: use only the dependencies already downloaded.
    pub offline: bool,
    /// The most time one build may take; it is killed after.
    pub time_limit: Duration,
    /// The largest library accepted.
    pub max_library_bytes: u64,
    /// The `cargo` program.
    pub cargo: PathBuf,
    /// Where a build reports how far it got (the shell's progress line), if anywhere.
    pub status: Option<CompileStatus>,
}

/// What a build is doing now, and what the last one gave: shared with whoever shows it (the
/// shell's progress line and its note after `CREATE FUNCTION`).
#[derive(Debug, Clone, Default)]
pub struct CompileStatus(Arc<Mutex<StatusState>>);

#[derive(Debug, Default)]
struct StatusState {
    now: String,
    last: Option<Outcome>,
}

/// How a function written in SQL got its library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The function.
    pub function: String,
    /// The library file.
    pub library: PathBuf,
    /// Whether it came from the cache (no build ran).
    pub cached: bool,
    /// How long finding or building it took.
    pub elapsed: Duration,
}

impl CompileStatus {
    /// A status nobody has written to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the running build is doing (`""` when none runs).
    pub fn now(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).now.clone()
    }

    /// The outcome of the last compilation that succeeded since the previous call, taken.
    pub fn take_outcome(&self) -> Option<Outcome> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).last.take()
    }

    fn set_now(&self, text: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).now = text;
    }

    fn finish(&self, outcome: Outcome) {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        state.now.clear();
        state.last = Some(outcome);
    }
}

/// The default build time limit.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(600);
/// The default largest library (256 MiB).
pub const DEFAULT_MAX_LIBRARY_BYTES: u64 = 256 << 20;
/// The most bytes of compiler output kept (the rest is read and dropped).
const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// The most builds one process runs or waits for at a time; a function that is not in the cache
/// while this many are is refused, naming the limit.
pub const MAX_BUILDS: usize = 4;

impl CompileOptions {
    /// Options with the defaults: the SDK at `sdk`, the cache at `cache_dir`, online, 10 minutes,
    /// 256 MiB, `cargo` from `$CARGO` or the `PATH`.
    pub fn new(sdk: impl Into<PathBuf>, cache_dir: impl Into<PathBuf>) -> Self {
        CompileOptions {
            sdk: sdk.into(),
            cache_dir: cache_dir.into(),
            offline: false,
            time_limit: DEFAULT_TIME_LIMIT,
            max_library_bytes: DEFAULT_MAX_LIBRARY_BYTES,
            cargo: std::env::var_os("CARGO")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("cargo")),
            status: None,
        }
    }

    /// The options of the `--allow-compile` flags of udfsql's programs: the SDK `sdk`, else
    /// `$UDFSQL_SDK`, else the `udf-abi` of the source tree this was built from (canonical, and
    /// it must exist); the cache `cache`, else [`default_cache_dir`](Self::default_cache_dir);
    /// `--offline`; the time limit in seconds. The error names the flag to give.
    pub fn from_flags(
        sdk: Option<&Path>,
        cache: Option<&Path>,
        offline: bool,
        time_limit_secs: u64,
    ) -> Result<CompileOptions, String> {
        let sdk = match (sdk, std::env::var_os("UDFSQL_SDK")) {
            (Some(dir), _) => dir.to_path_buf(),
            (None, Some(dir)) => PathBuf::from(dir),
            (None, None) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../udf-abi"),
        };
        let sdk = std::fs::canonicalize(&sdk).map_err(|e| {
            format!(
                "--allow-compile: the udf-abi SDK {}: {e} (give --sdk DIR)",
                sdk.display()
            )
        })?;
        let cache = match cache {
            Some(dir) => dir.to_path_buf(),
            None => Self::default_cache_dir().ok_or_else(|| {
                "--allow-compile: no cache directory (give --compile-cache DIR)".to_string()
            })?,
        };
        let mut options = CompileOptions::new(sdk, cache);
        options.offline = offline;
        options.time_limit = Duration::from_secs(time_limit_secs);
        Ok(options)
    }

    /// The cache directory of the current user: `$UDFSQL_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/udfsql/compiled`, else `~/.cache/udfsql/compiled`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("UDFSQL_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("udfsql").join("compiled"))
    }
}

/// A function written in SQL, as the statement declares it.
#[derive(Debug, Clone)]
pub struct RustFunction {
    /// The SQL name (also the Rust function's name).
    pub name: String,
    /// Parameter names and types.
    pub args: Vec<(String, DataType)>,
    /// The return type.
    pub return_type: DataType,
    /// The body between `$$`.
    pub body: String,
    /// Where the body starts in the statement (line and column, 1-based), when known: compile
    /// errors are then given at the statement's lines too.
    pub body_at: Option<(u64, u64)>,
    /// Lines of the written body before `body` (its option lines, see [`split_options`]):
    /// error positions count them.
    pub skipped_lines: usize,
}

/// The option lines at the top of a body (`#isolation=process`: a `#` not followed by `[` or
/// `!`, which no Rust item starts with), and the body after them with the count of lines before
/// it. A body without option lines is returned whole (and 0).
pub fn split_options(body: &str) -> (Vec<String>, &str, usize) {
    let mut options = Vec::new();
    let (mut offset, mut lines) = (0, 0);
    let mut kept = (0, 0);
    for line in body.split_inclusive('\n') {
        let text = line.trim();
        if text.starts_with('#') && !text.starts_with("#[") && !text.starts_with("#!") {
            options.push(text.to_string());
            offset += line.len();
            lines += 1;
            kept = (offset, lines);
        } else if text.is_empty() {
            offset += line.len();
            lines += 1;
        } else {
            break;
        }
    }
    if options.is_empty() {
        return (options, body, 0);
    }
    (options, &body[kept.0..], kept.1)
}

/// A compiled function's library.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The library file.
    pub library: PathBuf,
    /// Its SHA-256 digest (load it pinned).
    pub sha256: Sha256Digest,
    /// Whether it came from the cache (no build ran).
    pub cached: bool,
    /// The content hash naming it.
    pub hash: String,
}

/// Why a function written in SQL was not compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The statement cannot become a Rust function.
    #[error("CREATE FUNCTION {function} LANGUAGE rust: {reason}")]
    Declaration {
        /// The function.
        function: String,
        /// What is wrong.
        reason: String,
    },
    /// rustc refused the body.
    #[error("CREATE FUNCTION {function} LANGUAGE rust: the body does not compile:\n{errors}")]
    Rustc {
        /// The function.
        function: String,
        /// rustc's errors at the body's lines.
        errors: String,
    },
    /// The build took longer than its limit and was killed.
    #[error(
        "CREATE FUNCTION {function} LANGUAGE rust: the build took longer than {limit:?} and was stopped"
    )]
    TimedOut {
        /// The function.
        function: String,
        /// The limit.
        limit: Duration,
    },
    /// The build failed for another reason (cargo, dependencies, the file system).
    #[error("CREATE FUNCTION {function} LANGUAGE rust: {reason}")]
    Build {
        /// The function.
        function: String,
        /// What happened.
        reason: String,
    },
}

/// One SQL type's Rust types: as an argument, as a result.
const RUST_TYPES: &[(DataType, &str, &str)] = &[
    (DataType::Boolean, "bool", "bool"),
    (DataType::Int32, "i32", "i32"),
    (DataType::Int64, "i64", "i64"),
    (DataType::UInt64, "u64", "u64"),
    (DataType::Float32, "f32", "f32"),
    (DataType::Float64, "f64", "f64"),
    (DataType::Utf8, "&str", "String"),
    (DataType::Utf8View, "&str", "String"),
    (DataType::LargeUtf8, "&str", "String"),
    (DataType::Binary, "&[u8]", "Vec<u8>"),
    (DataType::BinaryView, "&[u8]", "Vec<u8>"),
    (DataType::LargeBinary, "&[u8]", "Vec<u8>"),
    (DataType::Date32, "::udf_abi::Date", "::udf_abi::Date"),
];

fn rust_type(function: &str, t: &DataType, argument: bool) -> Result<&'static str, CompileError> {
    RUST_TYPES
        .iter()
        .find(|(sql, _, _)| sql == t)
        .map(|(_, arg, ret)| if argument { *arg } else { *ret })
        .ok_or_else(|| CompileError::Declaration {
            function: function.to_string(),
            reason: format!(
                "{} has no Rust type in the body form; write the whole function (`fn {function}(...)`) \
                 with an Arrow type (`#[udf(vectorized)]`)",
                crate::types::arrow::sql_name(t)
            ),
        })
}

/// The generated crate.
#[derive(Debug)]
struct Generated {
    cargo_toml: String,
    lib_rs: String,
    /// Lines of `lib.rs` before the body's first line.
    body_offset: usize,
}

/// The `[dependencies]` lines of the body's dependency comment (any `/*` comment whose text starts
/// with `[dependencies]`; at most one), if any.
fn dependencies(function: &str, body: &str) -> Result<String, CompileError> {
    let mut tables = body.match_indices("/*").filter_map(|(start, _)| {
        body[start + 2..]
            .trim_start()
            .strip_prefix("[dependencies]")
    });
    let Some(table) = tables.next() else {
        return Ok(String::new());
    };
    if tables.next().is_some() {
        return Err(CompileError::Declaration {
            function: function.to_string(),
            reason: "two [dependencies] comments: write one".to_string(),
        });
    }
    let Some(end) = table.find("*/") else {
        return Err(CompileError::Declaration {
            function: function.to_string(),
            reason: "the [dependencies] comment is not closed".to_string(),
        });
    };
    let table = &table[..end];
    for line in table.lines() {
        if line.trim_start().starts_with('[') {
            return Err(CompileError::Declaration {
                function: function.to_string(),
                reason: format!(
                    "the dependency comment may hold only [dependencies] lines, not `{}`",
                    line.trim()
                ),
            });
        }
    }
    Ok(table.trim().to_string())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn generate(options: &CompileOptions, f: &RustFunction) -> Result<Generated, CompileError> {
    let declaration = |reason: String| CompileError::Declaration {
        function: f.name.clone(),
        reason,
    };
    if !is_identifier(&f.name) {
        return Err(declaration(
            "the name must be a Rust identifier (letters, digits, _)".into(),
        ));
    }
    let deps = dependencies(&f.name, &f.body)?;
    let sdk = options.sdk.display().to_string();
    if sdk.contains('"') || sdk.contains('\\') {
        return Err(declaration(format!(
            "the SDK path {sdk} cannot be written in Cargo.toml"
        )));
    }
    let cargo_toml = format!(
        "[package]\nname = \"udfsql-compiled\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
         publish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\npath = \"src/lib.rs\"\n\n\
         [dependencies]\nudf-abi = {{ path = \"{sdk}\" }}\n{deps}\n\n[workspace]\n\n\
         [profile.release]\npanic = \"unwind\"\n"
    );
    let mut lib_rs = String::from(
        "// Generated by udfsql from CREATE FUNCTION ... LANGUAGE rust.\n\
         #![allow(unused_imports, unused_braces, clippy::all)]\nuse udf_abi::*;\n",
    );
    let trimmed = f.body.trim_start();
    let items =
        trimmed.starts_with("fn ") || trimmed.starts_with("#[") || trimmed.starts_with("/*");
    let items = (items && !is_expression_after_comment(trimmed)) || defines(&f.body, &f.name);
    let body_offset;
    if items {
        if trimmed.starts_with("fn ") {
            lib_rs.push_str("#[udf]\n");
        }
        body_offset = lib_rs.lines().count();
        lib_rs.push_str(&f.body);
        lib_rs.push('\n');
    } else {
        let mut params = Vec::new();
        for (name, t) in &f.args {
            if !is_identifier(name) {
                return Err(declaration(format!(
                    "parameter {name:?} must be named with a Rust identifier"
                )));
            }
            params.push(format!("{name}: {}", rust_type(&f.name, t, true)?));
        }
        let ret = rust_type(&f.name, &f.return_type, false)?;
        let _ = writeln!(
            lib_rs,
            "#[udf]\nfn {}({}) -> {ret} {{",
            f.name,
            params.join(", ")
        );
        body_offset = lib_rs.lines().count();
        lib_rs.push_str(&f.body);
        lib_rs.push_str("\n}\n");
    }
    Ok(Generated {
        cargo_toml,
        lib_rs,
        body_offset,
    })
}

/// Whether `body` defines the function `name` itself (`fn name(` or `fn name<`), whatever comes
/// first (`use` lines, helper items): then it is written whole.
fn defines(body: &str, name: &str) -> bool {
    body.match_indices("fn ").any(|(at, _)| {
        let before = body[..at].chars().next_back();
        let rest = body[at + 3..].trim_start();
        before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            && rest.strip_prefix(name).is_some_and(|after| {
                after.trim_start().starts_with('(') || after.trim_start().starts_with('<')
            })
    })
}

/// Whether a body starting with a comment is an expression body (the comment holds only
/// dependencies and what follows is not an item).
fn is_expression_after_comment(body: &str) -> bool {
    let Some(rest) = body.strip_prefix("/*") else {
        return false;
    };
    let Some(end) = rest.find("*/") else {
        return false;
    };
    let after = rest[end + 2..].trim_start();
    !(after.starts_with("fn ") || after.starts_with("#["))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `rustc -vV` of the toolchain cargo uses.
fn toolchain(options: &CompileOptions) -> String {
    let rustc = options
        .cargo
        .parent()
        .map(|d| d.join("rustc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("rustc"));
    Command::new(rustc)
        .arg("-vV")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Compiles `f` (or finds it in the cache) and returns its library; records it as the library of
/// `f`'s name in the cache (for [`exported_library`]) and reports to the options' status.
pub fn compile(options: &CompileOptions, f: &RustFunction) -> Result<Compiled, CompileError> {
    let started = Instant::now();
    let result = build(options, f);
    match &result {
        Ok(compiled) => {
            if let Err(e) = record(&options.cache_dir, f, &compiled.library) {
                tracing::warn!(function = %f.name, error = %e, "cannot record the compiled function");
            }
            if let Some(status) = &options.status {
                status.finish(Outcome {
                    function: f.name.clone(),
                    library: compiled.library.clone(),
                    cached: compiled.cached,
                    elapsed: started.elapsed(),
                });
            }
        }
        Err(_) => {
            if let Some(status) = &options.status {
                status.set_now(String::new());
            }
        }
    }
    result
}

/// Where the library of the function last compiled under `name` is recorded.
fn record_path(cache_dir: &Path, name: &str) -> PathBuf {
    cache_dir.join("functions").join(name)
}

/// Records `library` as the one of the function `f` with its declaration (a temporary file
/// renamed into place): its file name, then `(a BIGINT, ...) RETURNS T`.
fn record(cache_dir: &Path, f: &RustFunction, library: &Path) -> std::io::Result<()> {
    let path = record_path(cache_dir, &f.name);
    let dir = cache_dir.join("functions");
    std::fs::create_dir_all(&dir)?;
    let file_name = library
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other("the library has no file name"))?;
    let partial = dir.join(format!(".{}.{}.partial", f.name, std::process::id()));
    std::fs::write(&partial, format!("{file_name}\n{}\n", declaration(f)))?;
    std::fs::rename(&partial, path)
}

/// `(a BIGINT, b VARCHAR) RETURNS VARCHAR`: the declaration of `f` in SQL.
fn declaration(f: &RustFunction) -> String {
    let args: Vec<String> = f
        .args
        .iter()
        .map(|(name, t)| format!("{name} {}", crate::types::arrow::sql_name(t)))
        .collect();
    format!(
        "({}) RETURNS {}",
        args.join(", "),
        crate::types::arrow::sql_name(&f.return_type)
    )
}

/// The most of a function's record read (a file name and a declaration are far shorter).
const MAX_RECORD_BYTES: u64 = 8192;

/// A compiled function as [`exported_library`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The library file in the cache.
    pub library: PathBuf,
    /// Its declaration in SQL: `(a BIGINT) RETURNS BIGINT`.
    pub declaration: String,
}

/// The library of the function last compiled (or found in the cache) under `name` in the cache
/// `cache_dir`, by any process, and its declaration: what `udfsql export-function` copies. The
/// error says what is missing. (The record is read as untrusted text: one file name without a
/// directory, and a bounded declaration.)
pub fn exported_library(cache_dir: &Path, name: &str) -> Result<Exported, String> {
    if !is_identifier(name) {
        return Err(format!("{name:?} is not the name of a compiled function"));
    }
    let path = record_path(cache_dir, name);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|file| file.take(MAX_RECORD_BYTES).read_to_string(&mut text))
        .map_err(|e| {
            format!(
                "no function {name} was compiled with the cache {} ({}: {e})",
                cache_dir.display(),
                path.display()
            )
        })?;
    let mut lines = text.lines();
    let file = lines.next().unwrap_or_default().trim();
    let declaration = lines.next().unwrap_or_default().trim().to_string();
    let valid = file.starts_with("libudfsql_compiled_")
        && file.ends_with(".so")
        && !file.contains('/')
        && file.len() < 128
        && declaration.starts_with('(')
        && declaration.len() < 4096
        && !declaration.contains(';');
    if !valid {
        return Err(format!(
            "{}: not a record of a compiled function",
            path.display()
        ));
    }
    let library = cache_dir.join("lib").join(file);
    if !library.is_file() {
        return Err(format!(
            "the library of {name}, {}, is no longer in the cache",
            library.display()
        ));
    }
    Ok(Exported {
        library,
        declaration,
    })
}

fn build(options: &CompileOptions, f: &RustFunction) -> Result<Compiled, CompileError> {
    let generated = generate(options, f)?;
    let build_err = |reason: String| CompileError::Build {
        function: f.name.clone(),
        reason,
    };
    let lock = std::fs::read_to_string(options.sdk.join("../Cargo.lock")).unwrap_or_default();
    let mut hasher = Sha256::new();
    for part in [
        generated.cargo_toml.as_str(),
        generated.lib_rs.as_str(),
        &options.sdk.display().to_string(),
        env!("CARGO_PKG_VERSION"),
        &toolchain(options),
        &lock,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let hash = hex(&hasher.finalize())[..32].to_string();
    let crate_name = format!("udfsql_compiled_{hash}");
    let cargo_toml = generated.cargo_toml.replace(
        "name = \"udfsql-compiled\"",
        &format!("name = \"{crate_name}\""),
    );

    let crates = options.cache_dir.join("crates");
    let libs = options.cache_dir.join("lib");
    for dir in [&crates, &libs] {
        std::fs::create_dir_all(dir).map_err(|e| build_err(format!("{}: {e}", dir.display())))?;
    }
    let library = libs.join(format!("lib{crate_name}.so"));
    // In the cache (libraries appear there whole, by rename): no build, no slot, no wait.
    if library.exists() {
        return finish(f, library, hash, true);
    }
    // A slot also for waiting on another build of the same function, so that requests for one
    // body cannot pile up waiting threads either.
    let Some(_slot) = BuildSlot::take() else {
        return Err(build_err(format!(
            "{MAX_BUILDS} compilations are running or waiting in this process already (the \
             most at a time); try again when one of them is done"
        )));
    };
    let lock_path = crates.join(format!("{hash}.lock"));
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| build_err(format!("{}: {e}", lock_path.display())))?;
    // One build per function at a time: the others wait here, then find the library.
    lock_file
        .lock()
        .map_err(|e| build_err(format!("cannot lock {}: {e}", lock_path.display())))?;
    if library.exists() {
        return finish(f, library, hash, true);
    }
    let dir = crates.join(&hash);
    std::fs::create_dir_all(dir.join("src")).map_err(|e| build_err(e.to_string()))?;
    std::fs::write(dir.join("Cargo.toml"), cargo_toml).map_err(|e| build_err(e.to_string()))?;
    std::fs::write(dir.join("src/lib.rs"), &generated.lib_rs)
        .map_err(|e| build_err(e.to_string()))?;
    if !lock.is_empty() {
        std::fs::write(dir.join("Cargo.lock"), &lock).map_err(|e| build_err(e.to_string()))?;
    }
    let target = options.cache_dir.join("target");
    let mut cmd = Command::new(&options.cargo);
    cmd.current_dir(&dir)
        .args(["build", "--release", "--lib", "--message-format=json"])
        .arg("--target-dir")
        .arg(&target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if options.offline {
        cmd.arg("--offline");
    }
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so that a build past its limit is stopped whole (rustc,
        // build scripts).
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| build_err(format!("cannot run {}: {e}", options.cargo.display())))?;
    let _running = Running::start(child.id());
    let status = options.status.clone();
    let what = format!("compiling {}", f.name);
    if let Some(status) = &status {
        status.set_now(format!("{what}: cargo build"));
    }
    let stdout = child.stdout.take().map(|out| {
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut kept = 0usize;
            let mut built = 0usize;
            for line in bounded_lines(BufReader::new(out), MAX_OUTPUT_BYTES) {
                if let Some(status) = &status
                    && let Some(name) = artifact_name(&line)
                {
                    built += 1;
                    status.set_now(format!("{what}: {built} crates built (last: {name})"));
                }
                if kept + line.len() <= MAX_OUTPUT_BYTES {
                    kept += line.len();
                    lines.push(line);
                }
            }
            lines
        })
    });
    let stderr = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let mut reader = err.take(MAX_OUTPUT_BYTES as u64);
            reader.read_to_end(&mut text).ok();
            // Drain the rest so cargo never blocks on a full pipe.
            std::io::copy(&mut reader.into_inner(), &mut std::io::sink()).ok();
            String::from_utf8_lossy(&text).into_owned()
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > options.time_limit => {
                kill_group(child.id());
                child.wait().ok();
                return Err(CompileError::TimedOut {
                    function: f.name.clone(),
                    limit: options.time_limit,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(build_err(format!("waiting for cargo: {e}"))),
        }
    };
    let messages = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let errors = rustc_errors(&messages, generated.body_offset, f.body_at, f.skipped_lines);
        if !errors.is_empty() {
            return Err(CompileError::Rustc {
                function: f.name.clone(),
                errors,
            });
        }
        let tail: String = stderr
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(build_err(format!("cargo build failed ({status}):\n{tail}")));
    }
    let built = messages
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| m["target"]["name"].as_str() == Some(crate_name.as_str()))
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|v| v.as_str().map(PathBuf::from))
        })
        .find(|p| p.extension().is_some_and(|e| e == "so"))
        .ok_or_else(|| build_err("cargo built no shared library".into()))?;
    let size = std::fs::metadata(&built)
        .map_err(|e| build_err(format!("{}: {e}", built.display())))?
        .len();
    if size > options.max_library_bytes {
        return Err(build_err(format!(
            "the library is {size} bytes, more than the limit of {}",
            options.max_library_bytes
        )));
    }
    // Into place under a temporary name, then renamed: a reader never sees half a library.
    let partial = libs.join(format!(".{crate_name}.partial"));
    std::fs::copy(&built, &partial).map_err(|e| build_err(e.to_string()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| build_err(e.to_string()))?;
    }
    std::fs::rename(&partial, &library).map_err(|e| build_err(e.to_string()))?;
    finish(f, library, hash, false)
}

fn finish(
    f: &RustFunction,
    library: PathBuf,
    hash: String,
    cached: bool,
) -> Result<Compiled, CompileError> {
    let bytes = std::fs::read(&library).map_err(|e| CompileError::Build {
        function: f.name.clone(),
        reason: format!("{}: {e}", library.display()),
    })?;
    let digest = hex(&Sha256::digest(&bytes));
    let sha256: Sha256Digest = digest.parse().map_err(|e| CompileError::Build {
        function: f.name.clone(),
        reason: format!("digest: {e}"),
    })?;
    Ok(Compiled {
        library,
        sha256,
        cached,
        hash,
    })
}

/// The lines of `reader` (until it ends or fails), each cut at `max_line` bytes: the rest of a
/// longer line is read and dropped, never held, so one line without an end cannot grow memory.
/// Bytes that are not UTF-8 are replaced.
fn bounded_lines(mut reader: impl BufRead, max_line: usize) -> impl Iterator<Item = String> {
    let mut buffer = Vec::new();
    std::iter::from_fn(move || {
        buffer.clear();
        let read = (&mut reader)
            .take(max_line as u64)
            .read_until(b'\n', &mut buffer)
            .ok()?;
        if read == 0 {
            return None;
        }
        if buffer.last() == Some(&b'\n') {
            buffer.pop();
        } else if read == max_line {
            // Cut: skip to the end of this line.
            reader.skip_until(b'\n').ok()?;
        }
        Some(String::from_utf8_lossy(&buffer).into_owned())
    })
}

/// The crate a cargo JSON message says was just built, if it says so.
fn artifact_name(line: &str) -> Option<String> {
    // Cheap test first: most lines are compiler messages.
    if !line.contains("\"compiler-artifact\"") {
        return None;
    }
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" {
        return None;
    }
    let target = message["target"]["name"].as_str()?;
    if target != "build-script-build" {
        return Some(target.to_string());
    }
    // A build script: its package's name, from `path+file:///…#name@1.0` (or `name 1.0 (…)`).
    let package = message["package_id"].as_str()?;
    let package = package.rsplit('#').next().unwrap_or(package);
    let name = package.split(['@', ' ']).next().unwrap_or(package);
    Some(format!("{name} (build script)"))
}

/// The builds this process runs now (at most [`MAX_BUILDS`]).
static BUILDS: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_BUILDS`] builds, given back when dropped.
struct BuildSlot;

impl BuildSlot {
    fn take() -> Option<BuildSlot> {
        BUILDS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_BUILDS).then_some(n + 1)
            })
            .ok()
            .map(|_| BuildSlot)
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        BUILDS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The process groups of the builds running now, for [`stop_running_builds`].
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A build in [`RUNNING`] until dropped.
struct Running(u32);

impl Running {
    fn start(pgid: u32) -> Running {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
        Running(pgid)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&p| p != self.0);
    }
}

/// Kills every build this process started that is still running (a program that exits while a
/// function compiles calls this, so that no cargo outlives it: builds run in process groups of
/// their own, which signals to the program do not reach).
pub fn stop_running_builds() {
    for pgid in RUNNING.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        kill_group(pgid);
    }
}

/// Kills the process group `pgid` (cargo and the compilers it started).
fn kill_group(pgid: u32) {
    Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok();
}

/// rustc's errors from cargo's JSON messages, each at its line and column in the body (lines of
/// `lib.rs` before the body: `body_offset`).
fn rustc_errors(
    messages: &[String],
    body_offset: usize,
    body_at: Option<(u64, u64)>,
    skipped_lines: usize,
) -> String {
    let mut out = String::new();
    for message in messages
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-message")
    {
        let m = &message["message"];
        if m["level"] != "error" {
            continue;
        }
        let text = m["message"].as_str().unwrap_or("error");
        if text.starts_with("aborting due to") {
            continue;
        }
        let code = m["code"]["code"]
            .as_str()
            .map(|c| format!("[{c}]"))
            .unwrap_or_default();
        let primary = m["spans"]
            .as_array()
            .and_then(|spans| spans.iter().find(|s| s["is_primary"] == true));
        let place = primary
            .and_then(|s| {
                let line = s["line_start"].as_u64()? as usize;
                let column = s["column_start"].as_u64()?;
                Some(if line > body_offset {
                    let n = (line - body_offset + skipped_lines) as u64;
                    match body_at {
                        Some((first_line, first_column)) => {
                            let (l, c) = if n == 1 {
                                (first_line, first_column + column - 1)
                            } else {
                                (first_line + n - 1, column)
                            };
                            format!(
                                "line {l}, column {c} of the statement (body line {n}, column {column})"
                            )
                        }
                        None => format!("body line {n}, column {column}"),
                    }
                } else {
                    format!("the declaration (generated line {line})")
                })
            })
            .unwrap_or_else(|| "no position".to_string());
        let label = primary
            .and_then(|s| s["label"].as_str())
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let _ = writeln!(out, "error{code} at {place}: {text}{label}");
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(body: &str) -> RustFunction {
        RustFunction {
            name: "twice".into(),
            args: vec![("x".into(), DataType::Int64)],
            return_type: DataType::Int64,
            body: body.into(),
            body_at: None,
            skipped_lines: 0,
        }
    }

    /// With every build slot taken, a function that is not in the cache is refused before cargo
    /// runs, naming the limit, and a cached one is still found; slots are given back.
    #[test]
    fn builds_past_the_limit_are_refused_at_once() {
        let cache = std::env::temp_dir().join(format!("udfsql-build-slots-{}", std::process::id()));
        let mut options = CompileOptions::new("/nonexistent-sdk", &cache);
        options.cargo = PathBuf::from("/bin/false");
        // A free slot: the build runs (and fails here, in cargo).
        let failed = compile(&options, &function("x * 2"))
            .unwrap_err()
            .to_string();
        assert!(
            failed.contains("twice") && failed.contains("cargo build failed"),
            "{failed}"
        );
        let hash = std::fs::read_dir(cache.join("crates"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| !n.ends_with(".lock"))
            .expect("the generated crate");

        let slots: Vec<BuildSlot> = std::iter::from_fn(BuildSlot::take).collect();
        assert_eq!(slots.len(), MAX_BUILDS);
        assert!(BuildSlot::take().is_none());
        let refused = compile(&options, &function("x * 2"))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("twice")
                && refused.contains(&format!("{MAX_BUILDS} compilations are running or waiting")),
            "{refused}"
        );
        // The same function, now in the cache: found without a build.
        let library = cache.join(format!("lib/libudfsql_compiled_{hash}.so"));
        std::fs::write(&library, b"a library").unwrap();
        let cached = compile(&options, &function("x * 2")).unwrap();
        assert!(cached.cached);
        assert_eq!(cached.library, library);
        drop(slots);
        assert_eq!(BUILDS.load(Ordering::SeqCst), 0, "every slot given back");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn expression_bodies_get_the_declared_signature() {
        let options = CompileOptions::new("/sdk", "/cache");
        let g = generate(&options, &function("x * 2")).unwrap();
        assert!(
            g.lib_rs
                .contains("#[udf]\nfn twice(x: i64) -> i64 {\nx * 2\n}")
        );
        assert_eq!(g.lib_rs.lines().nth(g.body_offset), Some("x * 2"));
        assert!(g.cargo_toml.contains("udf-abi = { path = \"/sdk\" }"));
    }

    #[test]
    fn item_bodies_are_kept_whole() {
        let options = CompileOptions::new("/sdk", "/cache");
        let body = "fn twice(x: Option<i64>) -> Option<i64> { x.map(|x| x * 2) }";
        let g = generate(&options, &function(body)).unwrap();
        assert!(g.lib_rs.contains(&format!("#[udf]\n{body}")));
        assert_eq!(g.lib_rs.lines().nth(g.body_offset), Some(body));
        // `use` lines first: still whole, since the body defines `twice` itself; a helper
        // `fn twice_more` or a call of `twice` in an expression body does not count.
        let body = "use std::fmt::Write;\n#[udf]\nfn twice(x: i64) -> i64 { x * 2 }";
        let g = generate(&options, &function(body)).unwrap();
        assert!(
            !g.lib_rs.contains("fn twice(x: i64) -> i64 {\nuse"),
            "{}",
            g.lib_rs
        );
        assert!(g.lib_rs.ends_with(&format!("{body}\n")));
        for expression in [
            "use std::ops::Mul;\nx.mul(2)",
            "if x > 9 { x } else { twice(x * 2) }",
        ] {
            let g = generate(&options, &function(expression)).unwrap();
            assert!(
                g.lib_rs.contains("fn twice(x: i64) -> i64 {\n"),
                "{}",
                g.lib_rs
            );
        }
    }

    #[test]
    fn dependency_comments_are_read_and_bounded() {
        let body = "/* [dependencies]\nitoa = \"1\"\n*/\nx * 2";
        assert_eq!(dependencies("f", body).unwrap(), "itoa = \"1\"");
        let g = generate(&CompileOptions::new("/sdk", "/c"), &function(body)).unwrap();
        assert!(g.cargo_toml.contains("itoa = \"1\""));
        assert!(g.lib_rs.contains("fn twice(x: i64) -> i64"));
        let sneaky = "/* [dependencies]\nitoa = \"1\"\n[build-dependencies]\nx = \"1\" */ x";
        assert!(dependencies("f", sneaky).is_err());
        assert!(dependencies("f", "/* [dependencies] x = \"1\"").is_err());
        // Not only the first comment; two tables refused.
        let later = "/* a note */\n/* [dependencies]\nitoa = \"1\"\n*/\nx * 2";
        assert_eq!(dependencies("f", later).unwrap(), "itoa = \"1\"");
        let twice = "/* [dependencies] a = \"1\" */ /* [dependencies] b = \"1\" */ x";
        let e = dependencies("f", twice).unwrap_err().to_string();
        assert!(e.contains("two [dependencies]"), "{e}");
        assert_eq!(dependencies("f", "/* just a comment */ x").unwrap(), "");
    }

    #[test]
    fn unsupported_types_and_names_are_refused_with_the_reason() {
        let options = CompileOptions::new("/sdk", "/c");
        let mut f = function("x");
        f.return_type = DataType::Int16;
        let e = generate(&options, &f).unwrap_err().to_string();
        assert!(e.contains("SMALLINT") && e.contains("twice"), "{e}");
        let mut f = function("x");
        f.name = "bad-name".into();
        assert!(generate(&options, &f).is_err());
        let mut f = function("x");
        f.args[0].0 = "x y".into();
        assert!(generate(&options, &f).is_err());
    }

    #[test]
    fn rustc_errors_point_into_the_body() {
        let message = serde_json::json!({
            "reason": "compiler-message",
            "message": {
                "level": "error",
                "message": "mismatched types",
                "code": {"code": "E0308"},
                "spans": [{"is_primary": true, "line_start": 7, "column_start": 5,
                           "label": "expected `i64`, found `&str`"}]
            }
        })
        .to_string();
        let text = rustc_errors(std::slice::from_ref(&message), 4, None, 0);
        assert_eq!(
            text,
            "error[E0308] at body line 3, column 5: mismatched types (expected `i64`, found `&str`)"
        );
        // The body starts at line 2, column 40 of the statement.
        let text = rustc_errors(std::slice::from_ref(&message), 4, Some((2, 40)), 0);
        assert!(
            text.starts_with(
                "error[E0308] at line 4, column 5 of the statement (body line 3, column 5)"
            ),
            "{text}"
        );
        let first = message.replace("\"line_start\":7", "\"line_start\":5");
        let text = rustc_errors(std::slice::from_ref(&first), 4, Some((2, 40)), 0);
        assert!(
            text.contains("line 2, column 44 of the statement (body line 1, column 5)"),
            "{text}"
        );
        // Two option lines were taken off the body: its first compiled line is body line 3.
        let text = rustc_errors(&[first], 4, Some((2, 40)), 2);
        assert!(
            text.contains("line 4, column 5 of the statement (body line 3, column 5)"),
            "{text}"
        );
    }

    #[test]
    fn function_records_are_read_as_untrusted_text() {
        let cache = std::env::temp_dir().join(format!("udfsql-records-{}", std::process::id()));
        std::fs::create_dir_all(cache.join("functions")).unwrap();
        std::fs::create_dir_all(cache.join("lib")).unwrap();
        let library = "libudfsql_compiled_ab.so";
        std::fs::write(cache.join("lib").join(library), b"x").unwrap();
        let write = |text: &str| std::fs::write(cache.join("functions/f"), text).unwrap();
        write(&format!("{library}\n(x BIGINT) RETURNS BIGINT\n"));
        let found = exported_library(&cache, "f").unwrap();
        assert_eq!(found.library, cache.join("lib").join(library));
        assert_eq!(found.declaration, "(x BIGINT) RETURNS BIGINT");
        // Another directory, another file, a statement smuggled in, a huge record.
        for bad in [
            "../../etc/passwd\n(x BIGINT) RETURNS BIGINT".to_string(),
            "libc.so\n(x BIGINT) RETURNS BIGINT".to_string(),
            format!("{library}\n(x BIGINT) RETURNS BIGINT; DROP TABLE t"),
            format!("{library}\n({})", "x".repeat(1 << 20)),
        ] {
            write(&bad);
            let e = exported_library(&cache, "f").unwrap_err();
            assert!(e.contains("not a record"), "{e}");
        }
        assert!(exported_library(&cache, "../f").is_err());
        assert!(
            exported_library(&cache, "g")
                .unwrap_err()
                .contains("no function g")
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn output_lines_are_cut_at_their_bound() {
        let long = "x".repeat(100);
        let input = format!("short\n{long}\nafter\n{long}");
        let lines: Vec<String> = bounded_lines(std::io::Cursor::new(input), 10).collect();
        assert_eq!(lines, ["short", "xxxxxxxxxx", "after", "xxxxxxxxxx"]);
        // A line of exactly the bound, and invalid UTF-8.
        let lines: Vec<String> =
            bounded_lines(std::io::Cursor::new(b"0123456789\n\xffz\n".to_vec()), 10).collect();
        assert_eq!(lines, ["0123456789", "\u{fffd}z"]);
    }

    #[test]
    fn built_crates_are_named_for_the_progress_line() {
        let artifact = |target: &str, package: &str| {
            serde_json::json!({"reason": "compiler-artifact", "package_id": package,
                               "target": {"name": target}})
            .to_string()
        };
        assert_eq!(
            artifact_name(&artifact("itoa", "registry+https://x#itoa@1.0.15")).as_deref(),
            Some("itoa")
        );
        assert_eq!(
            artifact_name(&artifact(
                "build-script-build",
                "registry+https://github.com/rust-lang/crates.io-index#proc-macro2@1.0.95"
            ))
            .as_deref(),
            Some("proc-macro2 (build script)")
        );
        assert_eq!(
            artifact_name(&artifact(
                "build-script-build",
                "libc 0.2.1 (registry+https://x)"
            ))
            .as_deref(),
            Some("libc (build script)")
        );
        assert_eq!(artifact_name("{\"reason\": \"compiler-message\"}"), None);
        assert_eq!(artifact_name("not json \"compiler-artifact\""), None);
    }

    #[test]
    fn option_lines_are_split_off_the_top_of_the_body() {
        let (options, rest, skipped) = split_options("\n  #isolation=process\n\n x * 2\n");
        assert_eq!(options, ["#isolation=process"]);
        assert_eq!(rest, "\n x * 2\n");
        assert_eq!(skipped, 2);
        // Attributes, inner attributes and bodies without options stay whole.
        for body in [
            "#[udf]\nfn f(x: i64) -> i64 { x }",
            "#![allow(unused)]\nx",
            "\n x",
            "",
        ] {
            assert_eq!(split_options(body), (Vec::new(), body, 0), "{body:?}");
        }
        // Only the top: a `#` line after code is the code's.
        let (options, rest, _) = split_options("#isolation=none\nx\n#isolation=process\n");
        assert_eq!(options, ["#isolation=none"]);
        assert_eq!(rest, "x\n#isolation=process\n");
    }
}
