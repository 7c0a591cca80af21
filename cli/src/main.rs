//! `udfsql`: run SQL over Apache DataFusion with user-defined functions loaded from shared
//! libraries, interactively or from `-c`, `-f` and standard input.
#![forbid(unsafe_code)]

mod highlight;
mod output;
mod progress;
mod repl;
mod shell;
mod split;

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use udf_engine::{Isolation, PluginLoader, WorkerLimits};

use output::Format;
use shell::{Interrupt, Shell};

/// Run SQL over Apache DataFusion with user-defined functions loaded from shared libraries.
///
/// Without -c or -f, reads SQL from standard input when it is piped, and starts the interactive
/// shell when it is a terminal.
#[derive(Debug, Parser)]
#[command(name = "udfsql", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Load the plugin library FILE and register its functions (repeatable; trusted: any path).
    #[arg(long = "plugin", value_name = "FILE")]
    plugins: Vec<PathBuf>,
    /// Load every shared library in DIR, and let CREATE FUNCTION load libraries from DIR
    /// (repeatable). SQL can load libraries only from these directories. DIR, the directories
    /// above it and its libraries must not be writable by other users.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Demo mode: load the example plugins built next to this binary (target/debug), allow
    /// CREATE FUNCTION from that directory, and create the demo table `t`. Interactively, with
    /// cargo and the udf-abi SDK present, also compile the function `exclaim` written in SQL (in
    /// the background, as --allow-compile --offline does; about a minute the first time).
    #[arg(long)]
    demo: bool,
    /// Evaluate the functions of the --plugin and --plugin-dir libraries (and of CREATE FUNCTION
    /// without `#isolation=`) in worker processes: a plugin that crashes, exits, hangs or runs
    /// out of memory fails its query, and udfsql lives on.
    #[arg(long)]
    isolate: bool,
    /// Let `CREATE FUNCTION name(a BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ a * 2 $$` compile
    /// functions written in SQL with this machine's cargo (off by default: compiled code is
    /// native code running with your rights; --isolate applies to it as to any plugin).
    #[arg(long)]
    allow_compile: bool,
    /// Where compiled functions are kept (default: $UDFSQL_CACHE_DIR, else
    /// $XDG_CACHE_HOME/udfsql/compiled, else ~/.cache/udfsql/compiled).
    #[arg(long, value_name = "DIR")]
    compile_cache: Option<PathBuf>,
    /// The udf-abi SDK compiled functions build against (default: $UDFSQL_SDK, else the
    /// udf-abi of the source tree this program was built from).
    #[arg(long, value_name = "DIR")]
    sdk: Option<PathBuf>,
    /// Compile functions with `cargo build --offline` (only dependencies already downloaded).
    #[arg(long)]
    offline: bool,
    /// The longest one compilation may take, in seconds; it is stopped after.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    compile_timeout: u64,
    /// Isolated calls: the longest one call (one batch) may run before its worker is killed, in
    /// seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    call_timeout: f64,
    /// Isolated calls: each worker's memory (address space) limit in MiB; 0 for none.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    worker_memory: u64,
    /// Isolated calls: worker processes per library (default: DataFusion's target_partitions,
    /// the number of CPUs).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Run queries on the Apache Ballista cluster whose scheduler is at URL (df://HOST:PORT):
    /// plugin functions are evaluated by its executors (udfsql-executor), which load the same
    /// libraries (same SHA-256) from their own plugin directories.
    #[arg(long, value_name = "URL")]
    ballista: Option<String>,
    /// Run SQL (one or more statements) and exit (repeatable; run in order, before -f).
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    commands: Vec<String>,
    /// Run the SQL statements in FILE and exit (repeatable).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Rows shown per result in table format (0 = all). Default: 40 interactively, all otherwise.
    #[arg(long, value_name = "N")]
    max_rows: Option<usize>,
    /// Print row count and elapsed time after each statement (default: on interactively).
    #[arg(long)]
    timing: Option<bool>,
    /// No live progress line for long statements (it is shown interactively, on a terminal).
    #[arg(long)]
    no_progress: bool,
    /// History file of the interactive shell (default: $UDFSQL_HISTORY, else
    /// $XDG_DATA_HOME/udfsql/history, else ~/.local/share/udfsql/history).
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the SHA-256 digest of each FILE (as sha256sum does), to pin a library in
    /// CREATE FUNCTION ... AS 'lib.so#sha256=<digest>'.
    Hash {
        /// Library files.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Copy the library of the function NAME, last compiled from SQL (CREATE FUNCTION ...
    /// LANGUAGE rust) with the compile cache, into DIR (an executor's or server's plugin
    /// directory), and print how to load it there.
    ExportFunction {
        /// The function's SQL name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The directory to copy it to (it must exist).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The compile cache (default: $UDFSQL_CACHE_DIR, else $XDG_CACHE_HOME/udfsql/compiled,
        /// else ~/.cache/udfsql/compiled).
        #[arg(long, value_name = "DIR")]
        compile_cache: Option<PathBuf>,
    },
}

/// `udfsql export-function NAME DIR`: copies the library under its own file name (a temporary
/// name, then renamed: a plugin directory never holds half a library), and prints its path,
/// digest and a `CREATE FUNCTION` that loads it from a plugin directory.
fn export_function(name: &str, dir: &Path, cache: Option<&Path>) -> Result<()> {
    let cache = match cache {
        Some(dir) => dir.to_path_buf(),
        None => udf_engine::compile::CompileOptions::default_cache_dir()
            .context("no compile cache directory (give --compile-cache DIR)")?,
    };
    let exported =
        udf_engine::compile::exported_library(&cache, name).map_err(anyhow::Error::msg)?;
    let library = &exported.library;
    if !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let file_name = library
        .file_name()
        .context("the compiled library has no file name")?;
    let target = dir.join(file_name);
    let partial = dir.join(format!(
        ".{}.{}.partial",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::copy(library, &partial)
        .with_context(|| format!("cannot copy {} to {}", library.display(), dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the mode of {}", partial.display()))?;
    }
    // The digest of the copy itself, before it takes its name (what the executors will pin).
    let digest = udf_engine::Sha256Digest::of_file(&partial)
        .with_context(|| format!("cannot read {}", partial.display()))?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("cannot rename {} into place", partial.display()))?;
    println!("{}", target.display());
    println!("sha256 {digest}");
    // OR REPLACE: a --plugin-dir session has registered the directory's functions already.
    println!(
        "CREATE OR REPLACE FUNCTION {name}{} LANGUAGE plugin AS '{}#{name}#sha256={digest}';",
        exported.declaration,
        file_name.to_string_lossy()
    );
    Ok(())
}

/// `udfsql hash FILE...`: one `<digest>  <path>` line per file; a file that cannot be read is
/// reported and makes the exit status non-zero, the others are still printed.
fn hash(files: &[PathBuf]) -> bool {
    let mut ok = true;
    for file in files {
        match udf_engine::Sha256Digest::of_file(file) {
            Ok(digest) => println!("{digest}  {}", file.display()),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", file.display());
                ok = false;
            }
        }
    }
    ok
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UDFSQL_LOG").unwrap_or_else(|_| {
                // Ballista's client also logs a failed job as an error; udfsql prints the
                // error it returns, once.
                tracing_subscriber::EnvFilter::new("error,ballista_core=off,ballista=off")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_target(false)
        .init();
    let args = Args::parse();
    match &args.command {
        Some(Command::Hash { files }) => {
            return if hash(files) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::ExportFunction {
            name,
            dir,
            compile_cache,
        }) => {
            return match export_function(name, dir, compile_cache.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: export-function {name}: {}", shell::report(&e));
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    let result = run(args);
    // A function still compiling (the demo's, in the background) is not left building.
    udf_engine::compile::stop_running_builds();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {}", shell::report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The directory of the running binary, where cargo puts the example plugins.
fn demo_plugin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the udfsql binary's path")?;
    Ok(exe
        .parent()
        .context("the udfsql binary has no parent directory")?
        .to_path_buf())
}

/// The example plugins among the libraries `found` in the demo directory `dir`.
fn example_plugins(dir: &Path, found: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let found: Vec<PathBuf> = found
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains("udf_plugin_"))
        })
        .collect();
    if found.is_empty() {
        anyhow::bail!(
            "no example plugins in {}; build them first with `cargo build --workspace`",
            dir.display()
        );
    }
    Ok(found)
}

/// How `--allow-compile` compiles functions written in SQL.
fn compile_options(args: &Args) -> Result<udf_engine::compile::CompileOptions> {
    let mut options = udf_engine::compile::CompileOptions::from_flags(
        args.sdk.as_deref(),
        args.compile_cache.as_deref(),
        args.offline,
        args.compile_timeout,
    )
    .map_err(anyhow::Error::msg)?;
    options.status = Some(udf_engine::compile::CompileStatus::new());
    Ok(options)
}

/// The demo's function written in SQL.
const DEMO_FUNCTION: &str = "CREATE FUNCTION exclaim(s VARCHAR) RETURNS VARCHAR LANGUAGE rust AS $$
    format!(\"{}!\", s.to_uppercase())
$$";

/// The compile options of the demo (as `--allow-compile --offline`: the SDK's dependencies are
/// those of this workspace, already downloaded), or why there are none: no cargo, no SDK.
fn demo_compile_options(
    args: &Args,
) -> std::result::Result<udf_engine::compile::CompileOptions, String> {
    let mut options = compile_options(args).map_err(|e| shell::report(&e))?;
    options.offline = true;
    let cargo = std::process::Command::new(&options.cargo)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !cargo.is_ok_and(|s| s.success()) {
        return Err(format!(
            "no cargo ({}) on this machine",
            options.cargo.display()
        ));
    }
    Ok(options)
}

fn run(args: Args) -> Result<bool> {
    let interactive =
        args.commands.is_empty() && args.files.is_empty() && std::io::stdin().is_terminal();

    let limits = WorkerLimits::from_flags(args.call_timeout, args.worker_memory, args.workers)
        .map_err(anyhow::Error::msg)?;
    let mut loader = PluginLoader::new().with_worker_limits(limits.clone());
    if args.isolate {
        loader = loader.with_isolation(Isolation::Process(limits));
    }
    // The demo compiles its function written in SQL in the interactive shell only, on this
    // machine (not on a Ballista cluster), when a toolchain is present.
    let demo_here = args.demo && interactive && args.ballista.is_none();
    let mut demo_compile = None;
    let options = if args.allow_compile {
        Some(compile_options(&args)?)
    } else if demo_here {
        match demo_compile_options(&args) {
            Ok(options) => Some(options),
            Err(reason) => {
                demo_compile = Some(Err(reason));
                None
            }
        }
    } else {
        None
    };
    if let Some(options) = options {
        loader = loader.with_compile(options);
        if demo_here {
            demo_compile = Some(Ok(()));
        }
    }
    let mut libraries = args.plugins.clone();
    let mut dirs = args.plugin_dirs.clone();
    if args.demo {
        dirs.push(demo_plugin_dir()?);
    }
    for dir in &dirs {
        // A plugin directory's libraries follow the rules CREATE FUNCTION applies to them: the
        // canonical directory and every directory above it, each canonical library file (a
        // symlink must stay inside the directory), regular files only.
        let found = udf_engine::trusted_libraries_in(dir)?;
        let found = if args.demo && !args.plugin_dirs.contains(dir) {
            example_plugins(dir, found)?
        } else {
            found
        };
        libraries.extend(found);
        loader = loader.with_plugin_dir(dir)?;
    }

    let interrupt = if interactive {
        Interrupt::Cancel
    } else {
        Interrupt::Default
    };
    let mut shell = Shell::new(loader, args.format, interrupt, args.ballista.as_deref())?;
    shell.timing = args.timing.unwrap_or(interactive);
    shell.progress = interactive && !args.no_progress;
    shell.max_rows = match args.max_rows {
        Some(0) => None,
        Some(n) => Some(n),
        None if interactive => Some(40),
        None => None,
    };
    for library in &libraries {
        shell.load_library(library)?;
    }
    if args.demo {
        shell.create_demo_table()?;
    }
    match demo_compile {
        Some(Ok(())) => {
            eprintln!(
                "demo: compiling exclaim(s VARCHAR), written in Rust in SQL, in the background \
                 (a minute the first time); then: SELECT exclaim(name) FROM t;"
            );
            shell.run_in_background(DEMO_FUNCTION, |error| {
                if let Some(error) = error {
                    eprintln!("\ndemo: exclaim was not created: {error}");
                }
            })?;
        }
        Some(Err(reason)) => {
            eprintln!("demo: no function compiled from SQL: {reason}");
        }
        None => {}
    }

    let stdout = std::io::stdout();
    if interactive {
        let history = args.history.or_else(repl::default_history_file);
        return repl::run(&mut shell, history);
    }
    let mut ok = true;
    for sql in &args.commands {
        ok &= shell.run_sql(sql, &mut stdout.lock())?;
    }
    for file in &args.files {
        let sql = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read SQL file {}", file.display()))?;
        ok &= shell.run_script(&sql, &mut stdout.lock())?;
    }
    if args.commands.is_empty() && args.files.is_empty() {
        let mut sql = String::new();
        std::io::stdin()
            .read_to_string(&mut sql)
            .context("cannot read SQL from standard input")?;
        ok &= shell.run_script(&sql, &mut stdout.lock())?;
    }
    Ok(ok)
}
