//! Query results as one JSON array of row objects, for udfsql's `--format json` and the HTTP
//! service alike.
//!
//! arrow's JSON writer escapes every string, but prints a value it cannot format (a timestamp
//! outside the range of calendar dates, say) as error text inside a JSON string. So every column
//! it formats as text is first formatted fallibly here, and a value that fails is an error naming
//! the column and the row: never error text as data.
#![forbid(unsafe_code)]

use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};

/// Why a result cannot be written as JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// arrow cannot display a value.
    #[error("cannot display the value in row {row} of column {column} ({data_type}): {source}")]
    Undisplayable {
        /// The column's name.
        column: String,
        /// The column's type.
        data_type: DataType,
        /// The row, counted from 1 over all batches.
        row: usize,
        /// arrow's formatting error.
        source: ArrowError,
    },
    /// arrow's writer failed.
    #[error("cannot write the result as JSON: {0}")]
    Arrow(#[from] ArrowError),
}

/// `batches` as one JSON array of row objects (`[]` for no rows; NULL fields are omitted),
/// followed by a newline.
pub fn json_array(batches: &[RecordBatch]) -> Result<Vec<u8>, JsonError> {
    let options = FormatOptions::new().with_display_error(false);
    let mut first_row = 0;
    for batch in batches {
        let schema = batch.schema();
        for (column, field) in batch.columns().iter().zip(schema.fields()) {
            if !written_as_text(column.data_type()) {
                continue;
            }
            let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
            let nulls = column.logical_nulls();
            for row in 0..column.len() {
                if nulls.as_ref().is_some_and(|n| n.is_null(row)) {
                    continue;
                }
                formatter.value(row).try_to_string().map_err(|source| {
                    JsonError::Undisplayable {
                        column: field.name().clone(),
                        data_type: column.data_type().clone(),
                        row: first_row + row + 1,
                        source,
                    }
                })?;
            }
        }
        first_row += batch.num_rows();
    }
    let mut writer = datafusion::arrow::json::ArrayWriter::new(Vec::new());
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    let mut out = writer.into_inner();
    if out.is_empty() {
        out.extend_from_slice(b"[]");
    }
    out.push(b'\n');
    Ok(out)
}

/// Whether arrow's JSON writer formats values of `data_type` through its display code (which can
/// fail), rather than writing numbers, booleans, strings or bytes directly. Unknown and nested
/// types count as formatted, so they are checked.
fn written_as_text(data_type: &DataType) -> bool {
    !matches!(
        data_type,
        DataType::Null
            | DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float16
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray, TimestampSecondArray};
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn strings_are_escaped_and_no_rows_is_an_empty_array() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec![Some("a\"b\n"), None])),
                Arc::new(Int64Array::from(vec![Some(1), Some(2)])),
            ],
        )
        .unwrap();
        let text = String::from_utf8(json_array(&[batch]).unwrap()).unwrap();
        assert_eq!(text, "[{\"s\":\"a\\\"b\\n\",\"n\":1},{\"n\":2}]\n");
        assert_eq!(json_array(&[]).unwrap(), b"[]\n");
    }

    #[test]
    fn an_undisplayable_timestamp_is_an_error_naming_column_and_row() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Second, None),
            true,
        )]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(TimestampSecondArray::from(vec![0, i64::MAX]))],
        )
        .unwrap();
        let e = json_array(&[batch]).unwrap_err().to_string();
        assert!(e.contains("row 2 of column ts"), "{e}");
    }
}
