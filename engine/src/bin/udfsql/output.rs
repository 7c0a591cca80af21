//! Printing query results as a table, CSV or JSON lines.

use std::io::Write;

use anyhow::Result;
use datafusion::arrow::record_batch::RecordBatch;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table with borders.
    Table,
    /// CSV with a header line; NULL is an empty field.
    Csv,
    /// One JSON object per row (JSON lines); NULL fields are omitted.
    Json,
}

/// Writes `batches` to `out` in `format`.
pub fn write_batches(out: &mut dyn Write, format: Format, batches: &[RecordBatch]) -> Result<()> {
    match format {
        Format::Table => {
            if batches.iter().all(|b| b.num_columns() == 0) {
                return Ok(());
            }
            let table = datafusion::arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(out, "{table}")?;
        }
        Format::Csv => {
            let Some(first) = batches.first() else {
                return Ok(());
            };
            if first.num_columns() == 0 {
                return Ok(());
            }
            let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut *out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
        }
    }
    Ok(())
}
