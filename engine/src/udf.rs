//! [`PluginUdf`]: a plugin function as a DataFusion [`ScalarUDFImpl`].
//!
//! Types are resolved once at planning time from the library's metadata; each batch's arguments
//! become arrays of the declared types, passed to [`PluginFunction::call_batch`] (one call) or
//! [`PluginFunction::call_rows`] (one call per row, STRICT rows skipped), which return the result
//! column.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};

use crate::async_udf::AsyncLimits;
use crate::call_path::CallPath;
use crate::ffi::{DeclaredVolatility, PluginFunction};
use crate::isolation::{CallCancel, WorkerPool};
use crate::types::ValueType;

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
    /// The worker pool that evaluates the function, when it is isolated.
    pool: Option<Arc<WorkerPool>>,
    /// How the calls of an asynchronous function run; `None` for a synchronous one.
    async_limits: Option<AsyncLimits>,
    /// The Rust body it was compiled from (`CREATE FUNCTION ... LANGUAGE rust`), if it was.
    rust_source: Option<Arc<str>>,
}

impl PluginUdf {
    /// The volatility a function declares (v2), or [`Volatility::Immutable`] for v1 functions,
    /// whose metadata cannot say.
    pub fn declared_volatility(function: &PluginFunction) -> Volatility {
        function
            .signature()
            .volatility
            .map_or(Volatility::Immutable, DeclaredVolatility::volatility)
    }

    /// Wraps `function` under `sql_name` with the given volatility (see
    /// [`declared_volatility`](Self::declared_volatility)).
    pub fn new(
        sql_name: impl Into<String>,
        function: PluginFunction,
        volatility: Volatility,
    ) -> Self {
        let sig = function.signature();
        let async_limits = function.async_defaults().map(AsyncLimits::from_defaults);
        let signature = if sig.arg_types.is_empty() {
            Signature::nullary(volatility)
        } else if async_limits.is_some() {
            // DataFusion's wrapper of asynchronous UDFs does not pass `coerce_types` on: the
            // declared types are exact, and the planner casts to them where it can.
            Signature::exact(
                sig.arg_types.iter().map(|t| t.arrow_type()).collect(),
                volatility,
            )
        } else {
            Signature::user_defined(volatility)
        };
        let return_type = sig.return_type.arrow_type();
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
            pool: None,
            async_limits,
            rust_source: None,
        }
    }

    /// The same function, recorded as compiled from the Rust body `source`.
    pub fn with_rust_source(mut self, source: impl Into<Arc<str>>) -> Self {
        self.rust_source = Some(source.into());
        self
    }

    /// The Rust body the function was compiled from, if it was written in SQL.
    pub fn rust_source(&self) -> Option<&str> {
        self.rust_source.as_deref()
    }

    /// How an asynchronous function's calls run; `None` for a synchronous function.
    pub fn async_limits(&self) -> Option<&AsyncLimits> {
        self.async_limits.as_ref()
    }

    /// An asynchronous function with other limits (a synchronous one is returned unchanged).
    pub fn with_async_limits(mut self, limits: AsyncLimits) -> Self {
        if self.async_limits.is_some() {
            // Its own permits: the limit is per function.
            self.async_limits = Some(
                AsyncLimits::new(limits.max_in_flight, limits.chunk_rows, limits.call_timeout)
                    .with_retries(limits.retries),
            );
        }
        self
    }

    /// The name the function is registered under.
    pub fn sql_name(&self) -> &str {
        &self.sql_name
    }

    /// The UDF DataFusion registers: through DataFusion's async UDF machinery for an
    /// asynchronous function, as an ordinary scalar UDF otherwise.
    pub fn into_scalar_udf(self) -> ScalarUDF {
        if self.async_limits.is_some() {
            crate::async_udf::async_scalar_udf(self)
        } else {
            ScalarUDF::new_from_impl(self)
        }
    }

    /// The same function evaluated by `pool`'s worker processes (process isolation).
    pub fn with_worker_pool(mut self, pool: Arc<WorkerPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The worker pool of an isolated function.
    pub fn worker_pool(&self) -> Option<&Arc<WorkerPool>> {
        self.pool.as_ref()
    }

    /// `process` for an isolated function, `none` for one that runs in the host.
    pub fn isolation_mode(&self) -> &'static str {
        if self.pool.is_some() {
            "process"
        } else {
            "none"
        }
    }

    /// The same function called through `path`; a function without a batch entrypoint stays on
    /// the row path, and one without a row entrypoint (ABI 2.2 batch-only functions, and those
    /// with Arrow types) on the batch path. (The batch path is the default when the library has
    /// one; the row path is kept for comparison and benchmarks.)
    pub fn with_call_path(mut self, path: CallPath) -> Self {
        self.call_path = if !self.function.has_batch() {
            CallPath::Row
        } else if !self.function.has_row() {
            CallPath::Batch
        } else {
            path
        };
        self
    }

    /// How the function is called.
    pub fn call_path(&self) -> CallPath {
        self.call_path
    }

    /// How the function is called, as `plugin_functions` and `EXPLAIN` say it: `row`, `batch`,
    /// or `async` for an asynchronous function.
    pub fn path_name(&self) -> String {
        if self.async_limits.is_some() {
            "async".to_string()
        } else {
            self.call_path.to_string()
        }
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
            && self.pool.as_ref().map(Arc::as_ptr) == other.pool.as_ref().map(Arc::as_ptr)
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
        crate::types::coerce_arguments(
            &format!("function {}", self.sql_signature()),
            &self.function.signature().arg_types,
            arg_types,
        )
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
        let cancel = CallCancel::of(&args.config_options);
        self.invoke_arrays(&args.args, rows, all_scalar, cancel)
    }
}

impl PluginUdf {
    /// Calls the function over a batch: every argument as an array (a scalar as a one-row array
    /// flagged as such, never expanded, except as below), through the batch entrypoint (one call)
    /// or the row entrypoint (one call per row).
    fn invoke_arrays(
        &self,
        args: &[ColumnarValue],
        rows: usize,
        all_scalar: bool,
        cancel: Option<&CallCancel>,
    ) -> Result<ColumnarValue> {
        // A function registered VOLATILE must be computed for every row, also where its
        // arguments are constants and the plugin's batch code (which may declare it immutable)
        // would compute them once: on the batch path its constant arguments cross as whole
        // columns. (The row path calls it for every row anyway.)
        let expand =
            self.call_path == CallPath::Batch && self.signature.volatility == Volatility::Volatile;
        let arrays = self.argument_arrays(args, rows, expand)?;
        let array = match &self.pool {
            Some(pool) => pool
                .call(
                    &self.function,
                    self.call_path,
                    &arrays,
                    rows,
                    &self.return_type,
                    cancel,
                )
                .map_err(|fault| {
                    DataFusionError::Execution(
                        fault.describe(&self.sql_name, self.function.library().path()),
                    )
                })?,
            None => match self.call_path {
                CallPath::Batch => self.function.call_batch(&arrays, rows),
                CallPath::Row => self.function.call_rows(&arrays, rows),
            }
            .map_err(|e| self.call_error(e))?,
        };
        self.result_value(array, all_scalar)
    }

    /// Every argument as an array of a type the plugin reads: a scalar as a one-row array
    /// flagged as such, or as `rows` rows when `expand`.
    pub(crate) fn argument_arrays(
        &self,
        args: &[ColumnarValue],
        rows: usize,
        expand: bool,
    ) -> Result<Vec<(ArrayRef, bool)>> {
        let params = &self.function.signature().arg_types;
        args.iter()
            .zip(params)
            .map(|(value, param)| {
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
            .collect::<Result<Vec<_>>>()
    }

    /// The result of a call: one scalar when every argument was a scalar, else the array.
    pub(crate) fn result_value(&self, array: ArrayRef, all_scalar: bool) -> Result<ColumnarValue> {
        result_value(array, all_scalar)
    }

    /// The result type the function is declared with.
    pub(crate) fn declared_return_type(&self) -> &DataType {
        &self.return_type
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
fn readable_scalar(scalar: &ScalarValue, param: &ValueType) -> Result<ScalarValue> {
    if param.is_readable(&scalar.data_type()) {
        Ok(scalar.clone())
    } else {
        Ok(scalar.cast_to(&param.arrow_type())?)
    }
}

/// The array as a type the plugin reads; planning coerces arguments already, so the cast is a
/// fallback for callers that invoke the UDF directly.
fn expected_array(array: &ArrayRef, param: &ValueType) -> Result<ArrayRef> {
    if param.is_readable(array.data_type()) {
        return Ok(Arc::clone(array));
    }
    Ok(datafusion::arrow::compute::cast(
        array,
        &param.arrow_type(),
    )?)
}
