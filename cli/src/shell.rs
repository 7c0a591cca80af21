//! A udfsql session: the DataFusion context with plugins, the output settings, and the execution
//! of SQL text and meta commands. Shared by `-c`, `-f`, piped stdin and the interactive REPL.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::DFParser;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::{FutureExt, StreamExt};
use udf_engine::PluginLoader;

use crate::output::{self, Format};
use crate::split::{is_blank_in, split_statements_in};

/// What happens to a long-running statement when Ctrl-C arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Ctrl-C cancels the running statement (interactive mode).
    Cancel,
    /// The default signal disposition (non-interactive mode).
    Default,
}

/// What a meta command asks the caller to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    Quit,
}

pub struct Shell {
    pub ctx: SessionContext,
    loader: Arc<PluginLoader>,
    pub format: Format,
    pub timing: bool,
    /// Rows shown per result in table format; `None` shows all.
    pub max_rows: Option<usize>,
    /// Expanded display (`\x`): table results as one block of `column | value` lines per row.
    pub expanded: bool,
    /// Where results go (`\o FILE`); `None` is the caller's output (the terminal).
    redirect: std::cell::RefCell<Option<(PathBuf, std::fs::File)>>,
    /// Scripts being run by `\i`, innermost last (a script that includes itself is refused).
    including: Vec<PathBuf>,
    /// The live progress line of long statements (`\progress`; shown only on a terminal).
    pub progress: bool,
    /// Whether queries run on a Ballista cluster (no progress line there).
    distributed: bool,
    /// SIGINT, listened to from the start in interactive mode (so that a Ctrl-C just as a
    /// statement starts cannot take the default action and end udfsql).
    sigint: Option<tokio::sync::Mutex<tokio::signal::unix::Signal>>,
    runtime: tokio::runtime::Runtime,
}

/// How deep `\i` scripts may include each other.
const MAX_INCLUDE_DEPTH: usize = 16;

pub const HELP: &str = "\
Statements end with ';' and may span lines. Meta commands:
  \\?              this help
  \\q              quit (or Ctrl-D)
  \\df             plugin functions: SQL name, kind, signature, library, ABI, isolation,
                  language (plugin, or rust when written in SQL)
  \\d              tables;  \\d NAME  columns of table NAME
  \\load FILE      load a plugin library and register its functions
  \\format F       output format: table, csv or json
  \\timing [on|off] show row count and elapsed time after each statement
  \\maxrows N      rows shown per result in table format (0 = all)
  \\x [on|off]     expanded display: one `column | value` line per column, a block per row
  \\o [FILE]       send results to FILE (truncated); \\o alone: back to the terminal
  \\i FILE         run the SQL and meta commands of FILE
  \\progress [on|off] a live progress line on stderr for statements over a second
Ctrl-C cancels a running statement. Plugins from SQL:
  CREATE [OR REPLACE] FUNCTION name(VARCHAR, BIGINT UNSIGNED) RETURNS VARCHAR
      LANGUAGE plugin AS 'libfile.so';      -- relative to a --plugin-dir
      ... AS 'libfile.so#isolation=process'  -- evaluated in worker processes
  CREATE FUNCTION name(a BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ a * 2 $$;
                                            -- compiled (udfsql --allow-compile)
  DROP FUNCTION [IF EXISTS] name;
  SELECT * FROM plugin_functions;  SHOW FUNCTIONS;";

impl Shell {
    /// A session with plugins from `loader`; with `cluster` (`df://HOST:PORT`), queries run on
    /// that Ballista cluster (the scheduler must answer a first query).
    pub fn new(
        loader: PluginLoader,
        format: Format,
        interrupt: Interrupt,
        cluster: Option<&str>,
    ) -> Result<Shell> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        let config = SessionConfig::new().with_information_schema(true);
        let loader = Arc::new(loader);
        let ctx = match cluster {
            Some(url) => {
                runtime.block_on(udf_distributed::connect(url, config, Arc::clone(&loader)))?
            }
            None => {
                let ctx = SessionContext::new_with_config(config);
                udf_engine::install(&ctx, Arc::clone(&loader))?;
                ctx
            }
        };
        let sigint = match interrupt {
            Interrupt::Cancel => Some(tokio::sync::Mutex::new(
                runtime
                    .block_on(async {
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                    })
                    .context("cannot listen for Ctrl-C")?,
            )),
            Interrupt::Default => None,
        };
        Ok(Shell {
            ctx,
            loader,
            format,
            timing: false,
            max_rows: None,
            expanded: false,
            redirect: std::cell::RefCell::new(None),
            including: Vec::new(),
            progress: false,
            distributed: cluster.is_some(),
            sigint,
            runtime,
        })
    }

    /// Loads a library (trusted: any path) and registers its functions under their own names.
    pub fn load_library(&self, path: &Path) -> Result<()> {
        let library = self.loader.load(path)?;
        for r in udf_engine::register_library_with(&self.ctx, &library, self.loader.isolation())? {
            if r.replaced {
                eprintln!(
                    "note: plugin function {} from {} replaces the existing function of that name",
                    r.sql_name,
                    r.library.display()
                );
            }
        }
        Ok(())
    }

    /// Starts running `sql` (one statement) in the background and returns at once; `done` gets
    /// its error, if any. Used for the demo's compiled function, which may take a minute to build
    /// the first time: the shell is usable meanwhile and the function appears when built.
    pub fn run_in_background(
        &self,
        sql: &str,
        done: impl FnOnce(Option<String>) + Send + 'static,
    ) -> Result<()> {
        let mut statements = DFParser::parse_sql_with_dialect(sql, self.dialect().as_ref())?;
        let statement = statements
            .pop_front()
            .context("run_in_background takes one statement")?;
        let ctx = self.ctx.clone();
        self.runtime.spawn(async move {
            let result = udf_engine::execute_statement(&ctx, statement).await;
            done(result.err().map(|e| report(&anyhow::Error::new(e))));
        });
        Ok(())
    }

    /// Creates the demo table `t`.
    pub fn create_demo_table(&self) -> Result<()> {
        let sql = "CREATE TABLE t (name VARCHAR, x BIGINT, d DOUBLE, flag BOOLEAN) AS VALUES \
                   ('cool', 1, 1.5, true), ('udf', 2, -2.25, false), ('sql', 3, 0.0, true), \
                   ('héllo', -4, 3.0, false), (NULL, NULL, NULL, NULL)";
        self.run_sql(sql, &mut std::io::sink())
            .context("cannot create the demo table")?;
        Ok(())
    }

    /// Runs every statement of `sql` in turn, printing results to `out` and errors to stderr; an
    /// error does not stop the statements after it. Returns whether all succeeded.
    pub fn run_sql(&self, sql: &str, out: &mut dyn Write) -> Result<bool> {
        let dialect = self.dialect();
        let split = split_statements_in(sql, dialect.as_ref());
        let mut pieces = split.statements;
        if split.unterminated.is_none() {
            pieces.push(split.rest);
        }
        let mut ok = true;
        for piece in pieces
            .into_iter()
            .filter(|p| !is_blank_in(p, dialect.as_ref()))
        {
            let statements = match DFParser::parse_sql_with_dialect(piece, dialect.as_ref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    ok = false;
                    continue;
                }
            };
            for statement in statements {
                let started = Instant::now();
                match self.runtime.block_on(self.execute(statement)) {
                    Ok((schema, batches)) => {
                        ok &= self.print(out, &schema, &batches, started.elapsed())?;
                    }
                    Err(e) => {
                        eprintln!("error: {}", report(&e));
                        ok = false;
                    }
                }
            }
        }
        if let Some(unterminated) = split.unterminated {
            // The statements before it ran; the rest is not a statement (yet).
            eprintln!("error: {unterminated}");
            ok = false;
        }
        Ok(ok)
    }

    /// Runs one statement: the columns of its result (known also when there are no rows, when
    /// DataFusion may return no batch at all) and its batches.
    async fn execute(
        &self,
        statement: datafusion::sql::parser::Statement,
    ) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        // Isolated calls of this statement stop when this token is cancelled (Ctrl-C below).
        let cancel = udf_engine::CallCancel::new();
        cancel.install(self.ctx.state_ref().write().config_mut());
        let ctx = self.ctx.clone();
        let terminal = self.progress && std::io::stderr().is_terminal();
        let progress = terminal && !self.distributed;
        let compile_status = self
            .loader
            .compile_options()
            .and_then(|o| o.status.clone())
            .filter(|_| is_create_function(&statement));
        let compile_line = compile_status.clone().filter(|_| terminal);
        let work = async move {
            // The line of a function being compiled, for as long as the statement runs.
            let _line = compile_line.map(crate::progress::Progress::compiling);
            // Plugin DDL names follow DataFusion's identifier rules (quoted keep their case).
            let df = udf_engine::execute_statement(&ctx, statement).await?;
            drop(_line);
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            if !progress {
                return Ok::<_, DataFusionError>((schema, df.collect().await?));
            }
            // The batches are counted as they come, for the progress line.
            let plan = df.create_physical_plan().await?;
            let rows = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let _line = crate::progress::Progress::start(&plan, Arc::clone(&rows));
            let mut stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx())?;
            let mut batches = Vec::new();
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                rows.fetch_add(batch.num_rows(), std::sync::atomic::Ordering::Relaxed);
                batches.push(batch);
            }
            Ok((schema, batches))
        };
        let result = self.run_cancellable(work, cancel).await;
        if let Some(outcome) = compile_status.and_then(|s| s.take_outcome())
            && result.is_ok()
        {
            eprintln!("{}", compile_note(&outcome));
        }
        result
    }

    /// Runs a statement's `work`; in interactive mode Ctrl-C cancels it (and `cancel`).
    async fn run_cancellable<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = std::result::Result<T, DataFusionError>>
        + Send
        + 'static,
        cancel: udf_engine::CallCancel,
    ) -> Result<T> {
        let Some(sigint) = &self.sigint else {
            return Ok(work.await?);
        };
        let mut sigint = sigint.lock().await;
        // A Ctrl-C from before this statement (at the prompt) is not for it.
        while sigint.recv().now_or_never().is_some() {}
        // The statement runs as a task of its own, so that Ctrl-C is seen even while it waits
        // inside a plugin call; Ctrl-C cancels its isolated calls (their workers are killed at
        // once) and aborts the task. (An in-process plugin call cannot be interrupted: its task
        // ends when the call returns.)
        let mut task = tokio::spawn(work);
        tokio::select! {
            joined = &mut task => Ok(joined.context("the statement's task failed")??),
            _ = sigint.recv() => {
                cancel.cancel();
                task.abort();
                bail!("statement cancelled (Ctrl-C)")
            }
        }
    }

    /// Prints a statement's result. A result that cannot be rendered (a value arrow cannot
    /// display) prints `error: ...` on stderr and nothing on `out`, and gives `false`; only a
    /// failure to write `out` is an `Err`.
    fn print(
        &self,
        out: &mut dyn Write,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        elapsed: Duration,
    ) -> Result<bool> {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        let limit = match (self.format, self.max_rows) {
            (Format::Table, Some(max)) if rows > max => Some(max),
            _ => None,
        };
        let shown;
        let batches = match limit {
            Some(max) => {
                shown = output::first_rows(batches, max);
                &shown[..]
            }
            None => batches,
        };
        let rendered = if self.expanded && self.format == Format::Table {
            output::expanded(schema, batches)
        } else {
            output::render(self.format, schema, batches)
        };
        let mut redirect = self.redirect.borrow_mut();
        let out: &mut dyn Write = match redirect.as_mut() {
            Some((_, file)) => file,
            None => out,
        };
        let text = match rendered {
            Ok(text) => text,
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(false);
            }
        };
        out.write_all(&text)?;
        if let Some(max) = limit {
            writeln!(
                out,
                "({rows} rows, first {max} shown; \\maxrows 0 shows all)"
            )?;
        }
        if self.timing {
            if schema.fields().is_empty() {
                writeln!(out, "OK. Took {:.3} seconds.", elapsed.as_secs_f64())?;
            } else {
                let noun = if rows == 1 { "row" } else { "rows" };
                writeln!(
                    out,
                    "{rows} {noun}. Took {:.3} seconds.",
                    elapsed.as_secs_f64()
                )?;
            }
        }
        out.flush()?;
        Ok(true)
    }

    /// Runs a meta command (a line starting with `\`).
    pub fn meta(&mut self, line: &str, out: &mut dyn Write) -> Result<Next> {
        let mut words = line.trim().trim_end_matches(';').split_whitespace();
        let command = words.next().unwrap_or_default();
        let arg = words.collect::<Vec<_>>().join(" ");
        match command {
            "\\q" | "\\quit" => return Ok(Next::Quit),
            "\\?" | "\\h" | "\\help" => writeln!(out, "{HELP}")?,
            "\\timing" => {
                self.timing = match arg.as_str() {
                    "" => !self.timing,
                    "on" => true,
                    "off" => false,
                    other => bail!("\\timing takes on or off, not '{other}'"),
                };
                writeln!(out, "Timing is {}.", if self.timing { "on" } else { "off" })?;
            }
            "\\format" => {
                use clap::ValueEnum;
                self.format = Format::from_str(&arg, true).map_err(|_| {
                    anyhow::anyhow!("\\format takes table, csv or json, not '{arg}'")
                })?;
            }
            "\\maxrows" => {
                let n: usize = arg
                    .parse()
                    .map_err(|_| anyhow::anyhow!("\\maxrows takes a number, not '{arg}'"))?;
                self.max_rows = (n > 0).then_some(n);
            }
            "\\load" => {
                if arg.is_empty() {
                    bail!("\\load takes the path of a plugin library");
                }
                self.load_library(&PathBuf::from(&arg))?;
            }
            "\\df" => {
                let sql = "SELECT name, kind, signature, library, abi, volatility, call_path, isolation, \
                           language FROM plugin_functions";
                self.run_sql(sql, out)?;
            }
            "\\d" if arg.is_empty() => {
                let sql = "SELECT table_name, table_type FROM information_schema.tables \
                           WHERE table_schema NOT IN ('information_schema') ORDER BY table_name";
                self.run_sql(sql, out)?;
            }
            "\\d" => {
                self.run_sql(&format!("DESCRIBE {arg}"), out)?;
            }
            "\\progress" => {
                self.progress = match arg.as_str() {
                    "" => !self.progress,
                    "on" => true,
                    "off" => false,
                    other => bail!("\\progress takes on or off, not '{other}'"),
                };
                writeln!(
                    out,
                    "Progress is {}.",
                    if self.progress { "on" } else { "off" }
                )?;
            }
            "\\x" => {
                self.expanded = match arg.as_str() {
                    "" => !self.expanded,
                    "on" => true,
                    "off" => false,
                    other => bail!("\\x takes on or off, not '{other}'"),
                };
                writeln!(
                    out,
                    "Expanded display is {}.",
                    if self.expanded { "on" } else { "off" }
                )?;
            }
            "\\o" => {
                if arg.is_empty() {
                    self.redirect.borrow_mut().take();
                } else {
                    let path = PathBuf::from(&arg);
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("\\o: cannot write {}", path.display()))?;
                    *self.redirect.borrow_mut() = Some((path, file));
                }
            }
            "\\i" => {
                if arg.is_empty() {
                    bail!("\\i takes the path of a SQL file");
                }
                let path = PathBuf::from(&arg);
                let canonical = std::fs::canonicalize(&path)
                    .with_context(|| format!("\\i: cannot read {}", path.display()))?;
                if self.including.contains(&canonical) || self.including.len() >= MAX_INCLUDE_DEPTH
                {
                    bail!(
                        "\\i {}: the file is already being run (\\i nests at most {MAX_INCLUDE_DEPTH} files, and never a file within itself)",
                        path.display()
                    );
                }
                let text = std::fs::read_to_string(&canonical)
                    .with_context(|| format!("\\i: cannot read {}", path.display()))?;
                self.including.push(canonical);
                let ran = self.run_script(&text, out);
                self.including.pop();
                if !ran? {
                    bail!("\\i {}: a statement of the file failed", path.display());
                }
            }
            other => bail!("unknown command {other}; \\? lists the commands"),
        }
        Ok(Next::Continue)
    }

    /// Runs a script: SQL statements, and meta commands on lines of their own (a meta command runs
    /// after the SQL before it; `\q` ends the script). Returns whether everything succeeded.
    pub fn run_script(&mut self, text: &str, out: &mut dyn Write) -> Result<bool> {
        let mut ok = true;
        let mut sql = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with('\\') {
                if !sql.trim().is_empty() {
                    ok &= self.run_sql(&sql, out)?;
                }
                sql.clear();
                match self.meta(line, out) {
                    Ok(Next::Quit) => return Ok(ok),
                    Ok(Next::Continue) => {}
                    Err(e) => {
                        eprintln!("error: {}", report(&e));
                        ok = false;
                    }
                }
                continue;
            }
            sql.push_str(line);
            sql.push('\n');
        }
        if !sql.trim().is_empty() {
            ok &= self.run_sql(&sql, out)?;
        }
        Ok(ok)
    }

    /// The SQL dialect the session is configured with (`datafusion.sql_parser.dialect`, `SET`
    /// changes it): statements are split and parsed in it.
    pub fn dialect(&self) -> Box<dyn datafusion::sql::sqlparser::dialect::Dialect> {
        let name = self
            .ctx
            .state()
            .config()
            .options()
            .sql_parser
            .dialect
            .to_string();
        datafusion::sql::sqlparser::dialect::dialect_from_str(&name)
            .unwrap_or_else(|| Box::new(GenericDialect {}))
    }

    /// The SQL names of the session's plugin functions, lower case (for highlighting).
    pub fn plugin_function_names(&self) -> std::collections::HashSet<String> {
        udf_engine::plugin_functions(&self.ctx)
            .into_iter()
            .map(|f| f.sql_name.to_lowercase())
            .collect()
    }

    /// The names completion offers: tables and functions of the session.
    pub fn completion_words(&self) -> Vec<String> {
        let state = self.ctx.state();
        let mut words: Vec<String> = state.scalar_functions().keys().cloned().collect();
        words.extend(state.aggregate_functions().keys().cloned());
        if let Some(catalog) = self.ctx.catalog("datafusion")
            && let Some(schema) = catalog.schema("public")
        {
            words.extend(schema.table_names());
        }
        words.sort();
        words.dedup();
        words
    }
}

/// Whether `statement` is a `CREATE FUNCTION`.
fn is_create_function(statement: &datafusion::sql::parser::Statement) -> bool {
    matches!(
        statement,
        datafusion::sql::parser::Statement::Statement(s)
            if matches!(**s, datafusion::sql::sqlparser::ast::Statement::CreateFunction(_))
    )
}

/// The note after a function written in SQL was created: compiled now, or from the cache.
fn compile_note(outcome: &udf_engine::compile::Outcome) -> String {
    let how = if outcome.cached {
        "from the compile cache"
    } else {
        "compiled"
    };
    format!(
        "note: {} {how} in {:.2} s ({})",
        outcome.function,
        outcome.elapsed.as_secs_f64(),
        outcome.library.display()
    )
}

/// One line for an error and its causes, without the repetitions DataFusion's wrapping produces
/// (`External error: X` whose source is `X` again).
pub fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let text = text.strip_prefix("External error: ").unwrap_or(&text);
        if line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}
