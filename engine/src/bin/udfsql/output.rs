//! Printing query results as a table, CSV or JSON lines.

use std::io::Write;

use anyhow::Result;
use datafusion::arrow::array::Array;
use datafusion::arrow::record_batch::RecordBatch;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table with borders.
    Table,
    /// CSV with a header line; NULL is an empty field, the empty string is `""` (as PostgreSQL's
    /// `COPY ... CSV` writes them).
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
        Format::Csv => write_csv(out, batches)?,
        Format::Json => {
            let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(&mut *out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
        }
    }
    Ok(())
}

/// CSV in the PostgreSQL convention: NULL is an empty field and the empty string is `""`, so the
/// two stay distinguishable (arrow's CSV writer quotes a lone NULL field as `""`).
fn write_csv(out: &mut dyn Write, batches: &[RecordBatch]) -> Result<()> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let schema = first.schema();
    if schema.fields().is_empty() {
        return Ok(());
    }
    let header: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| csv_field(f.name()))
        .collect();
    writeln!(out, "{}", header.join(","))?;
    let options = FormatOptions::default();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<Result<Vec<_>, _>>()?;
        // Logical nulls: a `NullArray` has no validity buffer but is all NULL.
        let nulls: Vec<_> = batch.columns().iter().map(|c| c.logical_nulls()).collect();
        for row in 0..batch.num_rows() {
            let mut line = String::new();
            for (i, (f, nulls)) in formatters.iter().zip(&nulls).enumerate() {
                if i > 0 {
                    line.push(',');
                }
                if !nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                    line.push_str(&csv_field(&f.value(row).to_string()));
                }
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn csv_field(value: &str) -> String {
    if value.is_empty() || value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// The first `max` rows of `batches`.
pub fn first_rows(batches: &[RecordBatch], max: usize) -> Vec<RecordBatch> {
    let mut left = max;
    let mut out = Vec::new();
    for batch in batches {
        if left == 0 {
            break;
        }
        let take = left.min(batch.num_rows());
        out.push(batch.slice(0, take));
        left -= take;
    }
    out
}
