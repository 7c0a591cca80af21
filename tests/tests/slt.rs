//! Runs every `sql/**/*.slt` file with sqllogictest, each against a fresh `SessionContext` whose
//! plugin directory holds the example plugins (files load functions with `CREATE FUNCTION`).
//!
//! ```text
//! cargo test -p udf-tests --test slt                   # all files
//! cargo test -p udf-tests --test slt -- types          # files whose path contains "types"
//! cargo test -p udf-tests --test slt -- --complete     # rewrite expected output
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::error::DataFusionError;
use datafusion::prelude::{SessionConfig, SessionContext};
use sqllogictest::{DBOutput, DefaultColumnType};
use udf_engine::PluginLoader;

struct Db {
    ctx: SessionContext,
}

impl Db {
    fn new() -> Result<Db, DataFusionError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_target_partitions(2);
        let ctx = SessionContext::new_with_config(config);
        let loader = PluginLoader::new()
            .with_plugin_dir(udf_tests::example_plugin_dir())
            .map_err(DataFusionError::IoError)?;
        udf_engine::install(&ctx, Arc::new(loader))?;
        Ok(Db { ctx })
    }
}

fn column_type(t: &DataType) -> DefaultColumnType {
    if t.is_integer() {
        DefaultColumnType::Integer
    } else if t.is_floating() || t.is_decimal() {
        DefaultColumnType::FloatingPoint
    } else if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        DefaultColumnType::Text
    } else {
        DefaultColumnType::Any
    }
}

#[async_trait]
impl sqllogictest::AsyncDB for Db {
    type Error = DataFusionError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DataFusionError> {
        let df = self.ctx.sql(sql).await?;
        let schema = df.schema().as_arrow().clone();
        let batches = df.collect().await?;
        if schema.fields().is_empty() {
            return Ok(DBOutput::StatementComplete(0));
        }
        let types = schema
            .fields()
            .iter()
            .map(|f| column_type(f.data_type()))
            .collect();
        if is_explain(&schema) {
            return Ok(DBOutput::Rows {
                types,
                rows: explain_rows(&batches)?,
            });
        }
        let options = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        for batch in &batches {
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()?;
            for row in 0..batch.num_rows() {
                let values = formatters
                    .iter()
                    .zip(batch.columns())
                    .map(|(f, column)| {
                        let text = f.value(row).to_string();
                        // An empty string must not vanish between the separators.
                        let is_string = matches!(
                            column.data_type(),
                            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                        );
                        if is_string && column.is_valid(row) && text.is_empty() {
                            "(empty)".to_string()
                        } else {
                            text
                        }
                    })
                    .collect();
                rows.push(values);
            }
        }
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "udfsql"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn is_explain(schema: &datafusion::arrow::datatypes::Schema) -> bool {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    names == ["plan_type", "plan"]
}

/// EXPLAIN output one line per row, as DataFusion's own runner writes it: the plan type, then
/// each plan line numbered, with `--` for each level of indentation (whitespace would be
/// normalised away).
fn explain_rows(
    batches: &[datafusion::arrow::record_batch::RecordBatch],
) -> Result<Vec<Vec<String>>, DataFusionError> {
    use datafusion::arrow::array::AsArray;
    let mut rows = Vec::new();
    for batch in batches {
        let types = batch.column(0).as_string::<i32>();
        let plans = batch.column(1).as_string::<i32>();
        for i in 0..batch.num_rows() {
            rows.push(vec![types.value(i).to_string()]);
            for (n, line) in plans
                .value(i)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .enumerate()
            {
                let trimmed = line.trim_start();
                let depth = (line.len() - trimmed.len()) / 2;
                rows.push(vec![format!(
                    "{:02}){}{}",
                    n + 1,
                    "--".repeat(depth),
                    trimmed.trim_end()
                )]);
            }
        }
    }
    Ok(rows)
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            slt_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let complete = args.iter().any(|a| a == "--complete");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();

    let root = udf_tests::workspace_root().join("sql");
    let mut files = Vec::new();
    if let Err(e) = slt_files(&root, &mut files) {
        eprintln!("cannot list {}: {e}", root.display());
        return ExitCode::FAILURE;
    }
    files.sort();
    files.retain(|f| {
        filters.is_empty()
            || filters
                .iter()
                .any(|p| f.to_string_lossy().contains(p.as_str()))
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file
            .strip_prefix(udf_tests::workspace_root())
            .unwrap_or(file);
        let result: Result<(), String> = runtime.block_on(async {
            let mut runner = sqllogictest::Runner::new(|| async { Db::new() });
            if complete {
                runner
                    .update_test_file(
                        file,
                        " ",
                        sqllogictest::default_validator,
                        sqllogictest::default_normalizer,
                        sqllogictest::strict_column_validator,
                    )
                    .await
                    .map_err(|e| e.to_string())
            } else {
                runner.with_column_validator(sqllogictest::strict_column_validator);
                runner
                    .run_file_async(file)
                    .await
                    .map_err(|e| e.display(true).to_string())
            }
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok     {}", name.display());
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {}\n{e}", name.display());
            }
        }
    }
    if files.is_empty() {
        println!("no .slt file matched");
        return ExitCode::FAILURE;
    }
    println!("sqllogictest: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
