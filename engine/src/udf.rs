//! [`PluginUdf`]: a plugin function as a DataFusion [`ScalarUDFImpl`].
//!
//! Types are resolved once at planning time from the library's metadata; the invoke loop walks
//! the rows of a batch, skips rows with a `NULL` argument (the STRICT rule), calls the plugin
//! through [`PluginFunction::call_row`] and appends to an Arrow builder.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BinaryViewArray, BooleanArray,
    BooleanBuilder, Date32Array, Date32Builder, Float32Array, Float32Builder, Float64Array,
    Float64Builder, Int32Array, Int32Builder, Int64Array, Int64Builder, LargeBinaryArray,
    LargeStringArray, StringArray, StringBuilder, StringViewArray, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Field, FieldRef, Float32Type, Float64Type, Int32Type, Int64Type,
    TimestampMicrosecondType, UInt64Type,
};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err, internal_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use udf_abi::v2::UdfType;

use crate::ffi::{ArgRef, DeclaredVolatility, PluginFunction, Returned, RowScratch};
use crate::types::{TIMESTAMP_TZ, accepted_types, arrow_type, coerce_argument, is_readable};

/// A plugin function registered with DataFusion under a SQL name.
///
/// Holds a [`PluginFunction`], and through it an `Arc` of the library: the library stays loaded
/// as long as this UDF is registered or used by a running query.
#[derive(Debug)]
pub struct PluginUdf {
    sql_name: String,
    function: PluginFunction,
    signature: Signature,
    return_type: DataType,
    call_path: CallPath,
}

/// How a plugin function is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallPath {
    /// Once per row, through the row entrypoint.
    Row,
    /// Once per batch, through the batch entrypoint (Arrow C Data Interface).
    Batch,
}

impl std::fmt::Display for CallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CallPath::Row => "row",
            CallPath::Batch => "batch",
        })
    }
}

impl PluginUdf {
    /// The volatility a function declares (v2), or [`Volatility::Immutable`] for v1 functions,
    /// whose metadata cannot say.
    pub fn declared_volatility(function: &PluginFunction) -> Volatility {
        match function.signature().volatility {
            None | Some(DeclaredVolatility::Immutable) => Volatility::Immutable,
            Some(DeclaredVolatility::Stable) => Volatility::Stable,
            Some(DeclaredVolatility::Volatile) => Volatility::Volatile,
        }
    }

    /// Wraps `function` under `sql_name` with the given volatility (see
    /// [`declared_volatility`](Self::declared_volatility)).
    pub fn new(
        sql_name: impl Into<String>,
        function: PluginFunction,
        volatility: Volatility,
    ) -> Self {
        let sig = function.signature();
        let signature = if sig.arg_types.is_empty() {
            Signature::nullary(volatility)
        } else {
            Signature::user_defined(volatility)
        };
        let return_type = arrow_type(sig.return_type);
        let call_path = if function.has_batch() {
            CallPath::Batch
        } else {
            CallPath::Row
        };
        PluginUdf {
            sql_name: sql_name.into(),
            function,
            signature,
            return_type,
            call_path,
        }
    }

    /// The same function called through `path`; a function without a batch entrypoint stays on
    /// the row path. (The batch path is the default when the library has one; the row path is
    /// kept for comparison and benchmarks.)
    pub fn with_call_path(mut self, path: CallPath) -> Self {
        self.call_path = if self.function.has_batch() {
            path
        } else {
            CallPath::Row
        };
        self
    }

    /// How the function is called.
    pub fn call_path(&self) -> CallPath {
        self.call_path
    }

    /// The volatility the function was registered with.
    pub fn volatility(&self) -> Volatility {
        self.signature.volatility
    }

    /// The plugin function behind this UDF.
    pub fn function(&self) -> &PluginFunction {
        &self.function
    }

    fn sql_signature(&self) -> String {
        self.function.signature().display_as(&self.sql_name)
    }

    fn call_error(&self, e: crate::error::CallError) -> DataFusionError {
        DataFusionError::Execution(format!(
            "plugin function {} ({}): {e}",
            self.sql_name,
            self.function.library().path().display()
        ))
    }
}

impl PartialEq for PluginUdf {
    fn eq(&self, other: &Self) -> bool {
        self.sql_name == other.sql_name
            && Arc::ptr_eq(self.function.library(), other.function.library())
            && self.function.signature() == other.function.signature()
            && self.signature == other.signature
    }
}

impl Eq for PluginUdf {}

impl Hash for PluginUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sql_name.hash(state);
        self.function.library().path().hash(state);
        self.function.signature().hash(state);
    }
}

impl ScalarUDFImpl for PluginUdf {
    fn name(&self) -> &str {
        &self.sql_name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.return_type.clone())
    }

    fn return_field_from_args(&self, _args: ReturnFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            self.name(),
            self.return_type.clone(),
            true,
        )))
    }

    fn is_strict(&self) -> bool {
        self.function.signature().is_strict()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let params = &self.function.signature().arg_types;
        if arg_types.len() != params.len() {
            return plan_err!(
                "function {} takes {} argument{}, got {}",
                self.sql_signature(),
                params.len(),
                if params.len() == 1 { "" } else { "s" },
                arg_types.len()
            );
        }
        params
            .iter()
            .zip(arg_types)
            .enumerate()
            .map(
                |(i, (&param, actual))| match coerce_argument(param, actual) {
                    Some(t) => Ok(t),
                    None => plan_err!(
                        "function {}: argument {} has type {actual}, expected {}",
                        self.sql_signature(),
                        i + 1,
                        accepted_types(param)
                    ),
                },
            )
            .collect()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let signature = self.function.signature();
        let params = &signature.arg_types;
        if args.args.len() != params.len() {
            return exec_err!(
                "function {} called with {} arguments",
                self.sql_signature(),
                args.args.len()
            );
        }
        // All-scalar arguments give one scalar result, unless the function is volatile: then
        // every row gets its own call (`random()`-like functions, nullary ones included).
        let all_scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)))
            && self.signature.volatility != Volatility::Volatile;
        let rows = if all_scalar { 1 } else { args.number_rows };
        if self.call_path == CallPath::Batch {
            return self.invoke_batch(&args.args, rows, all_scalar);
        }

        let columns = args
            .args
            .iter()
            .zip(params)
            .map(|(value, &param)| Column::new(value, param))
            .collect::<Result<Vec<_>>>()?;
        let readers: Vec<Reader<'_>> = columns.iter().map(Column::reader).collect();
        let takes_null = &signature.arg_nullable;

        let mut out = Output::new(signature.return_type, rows);
        let mut scratch = RowScratch::default();
        let mut row_args: Vec<ArgRef<'_>> = Vec::with_capacity(readers.len());
        for row in 0..rows {
            row_args.clear();
            for (reader, &nullable) in readers.iter().zip(takes_null) {
                match reader.get(row) {
                    Some(v) => row_args.push(v),
                    None if nullable => row_args.push(ArgRef::Null),
                    // The STRICT rule: a NULL argument means a NULL result, without a call.
                    None => break,
                }
            }
            if row_args.len() < readers.len() {
                out.append_null();
                continue;
            }
            let value = self
                .function
                .call_row(&mut scratch, &row_args)
                .map_err(|e| self.call_error(e))?;
            out.append(value)?;
        }
        let array = out.finish();
        result_value(array, all_scalar)
    }
}

impl PluginUdf {
    /// The batch path: every argument as an array (a scalar as a one-row array flagged as such,
    /// never expanded), one call for the whole batch.
    fn invoke_batch(
        &self,
        args: &[ColumnarValue],
        rows: usize,
        all_scalar: bool,
    ) -> Result<ColumnarValue> {
        let params = &self.function.signature().arg_types;
        // A function registered VOLATILE must be computed for every row, also where its
        // arguments are constants and the plugin (which may declare it immutable) would compute
        // them once: its constant arguments cross as whole columns.
        let expand = self.signature.volatility == Volatility::Volatile;
        let arrays = args
            .iter()
            .zip(params)
            .map(|(value, &param)| {
                Ok(match value {
                    ColumnarValue::Array(array) => (expected_array(array, param)?, false),
                    ColumnarValue::Scalar(scalar) if expand => (
                        readable_scalar(scalar, param)?.to_array_of_size(rows)?,
                        false,
                    ),
                    ColumnarValue::Scalar(scalar) => {
                        (readable_scalar(scalar, param)?.to_array_of_size(1)?, true)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let array = self
            .function
            .call_batch(&arrays, rows)
            .map_err(|e| self.call_error(e))?;
        result_value(array, all_scalar)
    }
}

/// The result of a call: one scalar when every argument was a scalar, else the array.
fn result_value(array: ArrayRef, all_scalar: bool) -> Result<ColumnarValue> {
    if all_scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
            &array, 0,
        )?))
    } else {
        Ok(ColumnarValue::Array(array))
    }
}

/// A scalar argument in a type the plugin reads, cast when it is not one already.
fn readable_scalar(scalar: &ScalarValue, param: UdfType) -> Result<ScalarValue> {
    if is_readable(&scalar.data_type(), param) {
        Ok(scalar.clone())
    } else {
        Ok(scalar.cast_to(&arrow_type(param))?)
    }
}

/// One argument of a batch: an array in a type [`Reader`] handles, or a scalar converted once.
enum Column {
    Array(ArrayRef),
    Scalar(ScalarValue),
}

impl Column {
    fn new(value: &ColumnarValue, param: UdfType) -> Result<Column> {
        Ok(match value {
            ColumnarValue::Array(array) => Column::Array(expected_array(array, param)?),
            ColumnarValue::Scalar(scalar) => Column::Scalar(readable_scalar(scalar, param)?),
        })
    }

    fn reader(&self) -> Reader<'_> {
        match self {
            Column::Scalar(s) => Reader::Scalar(scalar_arg(s)),
            Column::Array(a) => match a.data_type() {
                DataType::Boolean => Reader::Bool(a.as_boolean()),
                DataType::Int64 => Reader::Int(a.as_primitive::<Int64Type>()),
                DataType::UInt64 => Reader::UInt(a.as_primitive::<UInt64Type>()),
                DataType::Float64 => Reader::Double(a.as_primitive::<Float64Type>()),
                DataType::Int32 => Reader::Int32(a.as_primitive::<Int32Type>()),
                DataType::Float32 => Reader::Float32(a.as_primitive::<Float32Type>()),
                DataType::Date32 => Reader::Date32(a.as_primitive::<Date32Type>()),
                DataType::Timestamp(_, _) => {
                    Reader::Timestamp(a.as_primitive::<TimestampMicrosecondType>())
                }
                DataType::Utf8 => Reader::Utf8(a.as_string::<i32>()),
                DataType::LargeUtf8 => Reader::LargeUtf8(a.as_string::<i64>()),
                DataType::Utf8View => Reader::Utf8View(a.as_string_view()),
                DataType::Binary => Reader::Binary(a.as_binary::<i32>()),
                DataType::LargeBinary => Reader::LargeBinary(a.as_binary::<i64>()),
                // `expected_array` leaves no other type.
                _ => Reader::BinaryView(a.as_binary_view()),
            },
        }
    }
}

/// The array as a type [`Reader`] handles; planning coerces arguments already, so the cast is a
/// fallback for callers that invoke the UDF directly.
fn expected_array(array: &ArrayRef, param: UdfType) -> Result<ArrayRef> {
    if is_readable(array.data_type(), param) {
        return Ok(Arc::clone(array));
    }
    Ok(datafusion::arrow::compute::cast(array, &arrow_type(param))?)
}

fn scalar_arg(s: &ScalarValue) -> Option<ArgRef<'_>> {
    match s {
        ScalarValue::Boolean(v) => v.map(ArgRef::Bool),
        ScalarValue::Int64(v) => v.map(ArgRef::Int),
        ScalarValue::UInt64(v) => v.map(ArgRef::UInt),
        ScalarValue::Float64(v) => v.map(ArgRef::Double),
        ScalarValue::Int32(v) => v.map(ArgRef::Int32),
        ScalarValue::Float32(v) => v.map(ArgRef::Float32),
        ScalarValue::Date32(v) => v.map(ArgRef::Date32),
        ScalarValue::TimestampMicrosecond(v, _) => v.map(ArgRef::Timestamp),
        ScalarValue::Utf8(v) | ScalarValue::LargeUtf8(v) | ScalarValue::Utf8View(v) => {
            v.as_deref().map(ArgRef::Str)
        }
        ScalarValue::Binary(v) | ScalarValue::LargeBinary(v) | ScalarValue::BinaryView(v) => {
            v.as_deref().map(ArgRef::Bytes)
        }
        _ => None,
    }
}

/// Reads one argument of one row; `None` is SQL `NULL`.
enum Reader<'a> {
    Scalar(Option<ArgRef<'a>>),
    Bool(&'a BooleanArray),
    Int(&'a Int64Array),
    UInt(&'a UInt64Array),
    Double(&'a Float64Array),
    Int32(&'a Int32Array),
    Float32(&'a Float32Array),
    Date32(&'a Date32Array),
    Timestamp(&'a TimestampMicrosecondArray),
    Utf8(&'a StringArray),
    LargeUtf8(&'a LargeStringArray),
    Utf8View(&'a StringViewArray),
    Binary(&'a BinaryArray),
    LargeBinary(&'a LargeBinaryArray),
    BinaryView(&'a BinaryViewArray),
}

impl<'a> Reader<'a> {
    #[inline]
    fn get(&self, row: usize) -> Option<ArgRef<'a>> {
        macro_rules! read {
            ($array:expr, $variant:ident) => {
                if $array.is_null(row) {
                    None
                } else {
                    Some(ArgRef::$variant($array.value(row)))
                }
            };
        }
        match self {
            Reader::Scalar(v) => *v,
            Reader::Bool(a) => read!(a, Bool),
            Reader::Int(a) => read!(a, Int),
            Reader::UInt(a) => read!(a, UInt),
            Reader::Double(a) => read!(a, Double),
            Reader::Int32(a) => read!(a, Int32),
            Reader::Float32(a) => read!(a, Float32),
            Reader::Date32(a) => read!(a, Date32),
            Reader::Timestamp(a) => read!(a, Timestamp),
            Reader::Utf8(a) => read!(a, Str),
            Reader::LargeUtf8(a) => read!(a, Str),
            Reader::Utf8View(a) => read!(a, Str),
            Reader::Binary(a) => read!(a, Bytes),
            Reader::LargeBinary(a) => read!(a, Bytes),
            Reader::BinaryView(a) => read!(a, Bytes),
        }
    }
}

/// The result column under construction.
enum Output {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    UInt(UInt64Builder),
    Double(Float64Builder),
    Str(StringBuilder),
    Int32(Int32Builder),
    Float32(Float32Builder),
    Bytes(BinaryBuilder),
    Date32(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
}

impl Output {
    fn new(t: UdfType, rows: usize) -> Output {
        match t {
            UdfType::Bool => Output::Bool(BooleanBuilder::with_capacity(rows)),
            UdfType::Int64 => Output::Int(Int64Builder::with_capacity(rows)),
            UdfType::UInt64 => Output::UInt(UInt64Builder::with_capacity(rows)),
            UdfType::Float64 => Output::Double(Float64Builder::with_capacity(rows)),
            UdfType::Utf8 => Output::Str(StringBuilder::with_capacity(rows, rows * 8)),
            UdfType::Int32 => Output::Int32(Int32Builder::with_capacity(rows)),
            UdfType::Float32 => Output::Float32(Float32Builder::with_capacity(rows)),
            UdfType::Binary => Output::Bytes(BinaryBuilder::with_capacity(rows, rows * 8)),
            UdfType::Date32 => Output::Date32(Date32Builder::with_capacity(rows)),
            UdfType::TimestampMicros => Output::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone(TIMESTAMP_TZ),
            ),
        }
    }

    fn append_null(&mut self) {
        match self {
            Output::Bool(b) => b.append_null(),
            Output::Int(b) => b.append_null(),
            Output::UInt(b) => b.append_null(),
            Output::Double(b) => b.append_null(),
            Output::Str(b) => b.append_null(),
            Output::Int32(b) => b.append_null(),
            Output::Float32(b) => b.append_null(),
            Output::Bytes(b) => b.append_null(),
            Output::Date32(b) => b.append_null(),
            Output::Timestamp(b) => b.append_null(),
        }
    }

    /// Appends a value. `call_row` checks it against the declared return type, so a mismatch
    /// here is a host bug, reported as an internal error rather than hidden.
    fn append(&mut self, value: Returned) -> Result<()> {
        match (self, value) {
            (out, Returned::Null) => out.append_null(),
            (Output::Bool(b), Returned::Bool(v)) => b.append_value(v),
            (Output::Int(b), Returned::Int(v)) => b.append_value(v),
            (Output::UInt(b), Returned::UInt(v)) => b.append_value(v),
            (Output::Double(b), Returned::Double(v)) => b.append_value(v),
            (Output::Int32(b), Returned::Int32(v)) => b.append_value(v),
            (Output::Float32(b), Returned::Float32(v)) => b.append_value(v),
            (Output::Date32(b), Returned::Date32(v)) => b.append_value(v),
            (Output::Timestamp(b), Returned::Timestamp(v)) => b.append_value(v),
            // The plugin's bytes are copied, then handed back to it when `s` drops.
            (Output::Str(b), Returned::Str(s)) => b.append_value(s.as_str()),
            (Output::Bytes(b), Returned::Bytes(s)) => b.append_value(s.as_bytes()),
            _ => return internal_err!("plugin result does not match the output column"),
        }
        Ok(())
    }

    fn finish(self) -> ArrayRef {
        match self {
            Output::Bool(mut b) => Arc::new(b.finish()),
            Output::Int(mut b) => Arc::new(b.finish()),
            Output::UInt(mut b) => Arc::new(b.finish()),
            Output::Double(mut b) => Arc::new(b.finish()),
            Output::Str(mut b) => Arc::new(b.finish()),
            Output::Int32(mut b) => Arc::new(b.finish()),
            Output::Float32(mut b) => Arc::new(b.finish()),
            Output::Bytes(mut b) => Arc::new(b.finish()),
            Output::Date32(mut b) => Arc::new(b.finish()),
            Output::Timestamp(mut b) => Arc::new(b.finish()),
        }
    }
}
