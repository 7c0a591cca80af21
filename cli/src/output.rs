//! Printing query results as a table, CSV or a JSON array.
//!
//! A result is rendered completely before any of it is written, and values are formatted with
//! arrow's fallible formatting (`FormatOptions::with_display_error(false)`): a value arrow cannot
//! display (a timestamp outside chrono's range, say) fails the statement with an error naming
//! the column and row, and never reaches the output as text.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table with borders.
    Table,
    /// CSV with a header line (also for no rows); NULL is an empty field, the empty string is
    /// `""` (as PostgreSQL's `COPY ... CSV` writes them).
    Csv,
    /// One JSON array of row objects (`[]` for no rows); NULL fields are omitted.
    Json,
}

/// Why a result could not be rendered. The statement fails; nothing of its result is printed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// arrow cannot display a value (e.g. a timestamp outside the range of calendar dates).
    #[error("cannot display the value in row {row} of column {column} ({data_type}): {source}")]
    Undisplayable {
        /// The column's name.
        column: String,
        /// The column's type.
        data_type: DataType,
        /// The row, counted from 1.
        row: usize,
        /// arrow's formatting error.
        source: ArrowError,
    },
    /// arrow refused to build the output (a type it cannot format, mismatched batches).
    #[error("cannot print the result: {0}")]
    Arrow(#[from] ArrowError),
}

/// The complete text of `batches` (whose columns are `schema`) in `format`. A result without
/// columns (DDL, `SET`) renders as nothing.
pub fn render(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, OutputError> {
    if schema.fields().is_empty() {
        return Ok(Vec::new());
    }
    match format {
        Format::Table => table(schema, batches),
        Format::Csv => csv(schema, batches),
        Format::Json => json(schema, batches),
    }
}

/// Expanded display (`\x`): each row as a block of `column | value` lines under a
/// `-[ RECORD n ]-` header, column names padded to the widest, NULL as an empty value (as psql).
pub fn expanded(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, OutputError> {
    if schema.fields().is_empty() {
        return Ok(Vec::new());
    }
    let width = schema
        .fields()
        .iter()
        .map(|f| f.name().chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let mut record = 0;
    for batch in batches {
        check_columns(schema, batch)?;
        let columns = display_text(schema, batch, record)?;
        for row in 0..batch.num_rows() {
            record += 1;
            out.push_str(&format!("-[ RECORD {record} ]-\n"));
            for (field, values) in schema.fields().iter().zip(&columns) {
                let value = values[row].as_deref().unwrap_or("");
                out.push_str(&format!("{:<width$} | {value}\n", field.name()));
            }
        }
    }
    if record == 0 {
        out.push_str("(0 rows)\n");
    }
    Ok(out.into_bytes())
}

/// The options every value is formatted with: errors are errors, not text.
fn format_options() -> FormatOptions<'static> {
    FormatOptions::new().with_display_error(false)
}

/// The display text of every value of `batch`, column by column; `None` for NULL. `first_row` is
/// the number of rows before this batch, for error messages.
fn display_text(
    schema: &Schema,
    batch: &RecordBatch,
    first_row: usize,
) -> Result<Vec<Vec<Option<String>>>, OutputError> {
    let options = format_options();
    batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| column_text(field, column, &options, first_row))
        .collect()
}

fn column_text(
    field: &Field,
    column: &ArrayRef,
    options: &FormatOptions<'_>,
    first_row: usize,
) -> Result<Vec<Option<String>>, OutputError> {
    let formatter = ArrayFormatter::try_new(column.as_ref(), options)?;
    // Logical nulls: a `NullArray` has no validity buffer but is all NULL.
    let nulls = column.logical_nulls();
    (0..column.len())
        .map(|row| {
            if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                return Ok(None);
            }
            formatter
                .value(row)
                .try_to_string()
                .map(Some)
                .map_err(|source| OutputError::Undisplayable {
                    column: field.name().clone(),
                    data_type: column.data_type().clone(),
                    row: first_row + row + 1,
                    source,
                })
        })
        .collect()
}

/// The number of columns of `batch`, checked against `schema`.
fn check_columns(schema: &Schema, batch: &RecordBatch) -> Result<(), OutputError> {
    if batch.num_columns() == schema.fields().len() {
        Ok(())
    } else {
        Err(OutputError::Arrow(ArrowError::SchemaError(format!(
            "a result batch has {} columns, its schema {}",
            batch.num_columns(),
            schema.fields().len()
        ))))
    }
}

/// An aligned table with a header, also when there are no rows. The values are formatted here
/// (fallibly) and the table is drawn from their text.
fn table(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, OutputError> {
    let text_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut text_batches = Vec::with_capacity(batches.len());
    let mut first_row = 0;
    for batch in batches {
        check_columns(schema, batch)?;
        let columns: Vec<ArrayRef> = display_text(schema, batch, first_row)?
            .into_iter()
            .map(|values| Arc::new(StringArray::from(values)) as ArrayRef)
            .collect();
        text_batches.push(RecordBatch::try_new(Arc::clone(&text_schema), columns)?);
        first_row += batch.num_rows();
    }
    let table = datafusion::arrow::util::pretty::pretty_format_batches_with_schema(
        text_schema,
        &text_batches,
    )?;
    Ok(format!("{table}\n").into_bytes())
}

/// CSV in the PostgreSQL convention: NULL is an empty field and the empty string is `""`, so the
/// two stay distinguishable (arrow's CSV writer quotes a lone NULL field as `""`). The header
/// line is written also when there are no rows.
fn csv(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, OutputError> {
    let mut out = String::new();
    let header: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| csv_field(f.name()))
        .collect();
    out.push_str(&header.join(","));
    out.push('\n');
    let mut first_row = 0;
    for batch in batches {
        check_columns(schema, batch)?;
        let columns = display_text(schema, batch, first_row)?;
        for row in 0..batch.num_rows() {
            for (i, column) in columns.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if let Some(value) = &column[row] {
                    out.push_str(&csv_field(value));
                }
            }
            out.push('\n');
        }
        first_row += batch.num_rows();
    }
    Ok(out.into_bytes())
}

fn csv_field(value: &str) -> String {
    if value.is_empty() || value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// One JSON array of row objects (`[]` when there are no rows): see [`udf_engine::json`].
fn json(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, OutputError> {
    for batch in batches {
        check_columns(schema, batch)?;
    }
    udf_engine::json::json_array(batches).map_err(|e| match e {
        udf_engine::json::JsonError::Undisplayable {
            column,
            data_type,
            row,
            source,
        } => OutputError::Undisplayable {
            column,
            data_type,
            row,
            source,
        },
        udf_engine::json::JsonError::Arrow(e) => OutputError::Arrow(e),
        other => OutputError::Arrow(ArrowError::ComputeError(other.to_string())),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, TimestampSecondArray};

    fn one_column(name: &str, array: ArrayRef) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new(
            name,
            array.data_type().clone(),
            true,
        )]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![array]).unwrap();
        (schema, batch)
    }

    fn text(format: Format, schema: &SchemaRef, batches: &[RecordBatch]) -> String {
        String::from_utf8(render(format, schema, batches).unwrap()).unwrap()
    }

    #[test]
    fn no_rows_still_has_a_header_or_an_empty_array() {
        let (schema, _) = one_column("a", Arc::new(Int64Array::from(vec![1])));
        assert_eq!(text(Format::Csv, &schema, &[]), "a\n");
        assert_eq!(text(Format::Json, &schema, &[]), "[]\n");
        assert_eq!(
            text(Format::Table, &schema, &[]),
            "+---+\n| a |\n+---+\n+---+\n"
        );
        let empty = RecordBatch::new_empty(Arc::clone(&schema));
        assert_eq!(
            text(Format::Csv, &schema, std::slice::from_ref(&empty)),
            "a\n"
        );
        assert_eq!(text(Format::Json, &schema, &[empty]), "[]\n");
    }

    #[test]
    fn expanded_display_is_one_block_per_row() {
        let (schema, batch) = one_column(
            "name",
            Arc::new(StringArray::from(vec![Some("a"), None])) as ArrayRef,
        );
        let text = String::from_utf8(expanded(&schema, &[batch]).unwrap()).unwrap();
        assert_eq!(text, "-[ RECORD 1 ]-\nname | a\n-[ RECORD 2 ]-\nname | \n");
        let (schema, empty) = one_column(
            "name",
            Arc::new(StringArray::from(Vec::<Option<&str>>::new())) as ArrayRef,
        );
        let text = String::from_utf8(expanded(&schema, &[empty]).unwrap()).unwrap();
        assert_eq!(text, "(0 rows)\n");
    }

    #[test]
    fn no_columns_print_nothing() {
        let schema = Arc::new(Schema::empty());
        for format in [Format::Table, Format::Csv, Format::Json] {
            assert_eq!(text(format, &schema, &[]), "");
        }
    }

    #[test]
    fn an_undisplayable_timestamp_is_an_error_in_every_format() {
        let (schema, batch) = one_column(
            "ts",
            Arc::new(TimestampSecondArray::from(vec![
                Some(0),
                None,
                Some(i64::MAX),
            ])),
        );
        for format in [Format::Table, Format::Csv, Format::Json] {
            let e = render(format, &schema, std::slice::from_ref(&batch)).unwrap_err();
            let message = e.to_string();
            assert!(
                message.starts_with(
                    "cannot display the value in row 3 of column ts (Timestamp(s)): Cast error: "
                ),
                "{format:?}: {message}"
            );
        }
        // The displayable rows alone are fine.
        let shown = batch.slice(0, 2);
        assert_eq!(
            text(Format::Json, &schema, std::slice::from_ref(&shown)),
            "[{\"ts\":\"1970-01-01T00:00:00\"},{}]\n"
        );
        assert_eq!(
            text(Format::Csv, &schema, &[shown]),
            "ts\n1970-01-01T00:00:00\n\n"
        );
    }
}
