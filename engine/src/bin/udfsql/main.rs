//! `udfsql`: run SQL with plugin functions loaded from shared libraries.

mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use datafusion::prelude::SessionContext;

use output::Format;

/// Run SQL over Apache DataFusion with user-defined functions loaded from shared libraries.
#[derive(Debug, Parser)]
#[command(name = "udfsql", version)]
struct Args {
    /// Load the plugin library FILE (repeatable).
    #[arg(long = "plugin", value_name = "FILE")]
    plugins: Vec<PathBuf>,
    /// Load every shared library in DIR (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Run one SQL statement and print its result (repeatable; run in order).
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    commands: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UDFSQL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let ctx = SessionContext::new();
    load_plugins(&ctx, &args)?;
    let mut failed = false;
    let stdout = std::io::stdout();
    for sql in &args.commands {
        match execute(&ctx, sql).await {
            Ok(batches) => output::write_batches(&mut stdout.lock(), args.format, &batches)?,
            Err(e) => {
                eprintln!("error: {e:#}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn load_plugins(ctx: &SessionContext, args: &Args) -> Result<()> {
    let mut files = args.plugins.clone();
    for dir in &args.plugin_dirs {
        let found = udf_engine::libraries_in(dir)
            .with_context(|| format!("cannot read plugin directory {}", dir.display()))?;
        files.extend(found);
    }
    for file in files {
        for r in udf_engine::register_plugin(ctx, &file)? {
            if r.replaced {
                eprintln!(
                    "note: plugin function {} from {} replaces the existing function of that name",
                    r.sql_name,
                    r.library.display()
                );
            }
        }
    }
    Ok(())
}

async fn execute(
    ctx: &SessionContext,
    sql: &str,
) -> Result<Vec<datafusion::arrow::record_batch::RecordBatch>> {
    let df = ctx.sql(sql).await?;
    Ok(df.collect().await?)
}
