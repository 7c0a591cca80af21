//! Plugin aggregate functions in DataFusion: [`PluginUdaf`] is an `AggregateUDFImpl` whose
//! accumulators are the plugin's (ABI 2.4). GROUP BY runs through DataFusion's fast path, a
//! grouped accumulator that updates many groups per call; aggregation without groups, and
//! window frames, through a one-group accumulator (with `retract` for frames that slide).
//! Partial states are the plugin's declared state fields, so they travel between partitions as
//! ordinary columns.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, new_empty_array};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result, ScalarValue, not_impl_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature,
};

use crate::error::CallError;
use crate::ffi::aggregate::{Emit, Feed, PluginAccumulator, PluginAggregate};
use crate::isolation::WorkerPool;
use crate::isolation::aggregate::IsolatedAccumulator;

/// An accumulator of a plugin aggregate, in this process or in a worker process.
trait Accumulate: Send + Sync + std::fmt::Debug {
    fn feed(
        &mut self,
        feed: Feed,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> std::result::Result<(), CallError>;
    fn emit(&mut self, state: bool, emit: Emit) -> std::result::Result<ArrayRef, CallError>;
    fn size(&self) -> usize;
}

impl Accumulate for PluginAccumulator {
    fn feed(
        &mut self,
        feed: Feed,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> std::result::Result<(), CallError> {
        PluginAccumulator::feed(self, feed, columns, group_indices, filter, total_groups)
    }
    fn emit(&mut self, state: bool, emit: Emit) -> std::result::Result<ArrayRef, CallError> {
        PluginAccumulator::emit(self, state, emit)
    }
    fn size(&self) -> usize {
        PluginAccumulator::size(self)
    }
}

impl Accumulate for IsolatedAccumulator {
    fn feed(
        &mut self,
        feed: Feed,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> std::result::Result<(), CallError> {
        IsolatedAccumulator::feed(self, feed, columns, group_indices, filter, total_groups)
    }
    fn emit(&mut self, state: bool, emit: Emit) -> std::result::Result<ArrayRef, CallError> {
        IsolatedAccumulator::emit(self, state, emit)
    }
    fn size(&self) -> usize {
        IsolatedAccumulator::size(self)
    }
}

/// A plugin aggregate function under its SQL name.
#[derive(Debug, Clone)]
pub struct PluginUdaf {
    sql_name: String,
    function: PluginAggregate,
    signature: Signature,
    /// The workers that run its accumulators (process isolation), or none: in this process.
    pool: Option<Arc<WorkerPool>>,
    /// The Rust body it was compiled from (`CREATE FUNCTION ... LANGUAGE rust`), if it was.
    rust_source: Option<Arc<str>>,
}

impl PluginUdaf {
    /// The function `function` of a loaded library, called `sql_name` in SQL.
    pub fn new(sql_name: impl Into<String>, function: PluginAggregate) -> PluginUdaf {
        let volatility = function.signature().volatility.volatility();
        PluginUdaf {
            sql_name: sql_name.into(),
            function,
            signature: Signature::user_defined(volatility),
            pool: None,
            rust_source: None,
        }
    }

    /// The same aggregate, recorded as compiled from the Rust body `source`.
    pub fn with_rust_source(mut self, source: impl Into<Arc<str>>) -> PluginUdaf {
        self.rust_source = Some(source.into());
        self
    }

    /// The Rust body the aggregate was compiled from, if it was written in SQL.
    pub fn rust_source(&self) -> Option<&str> {
        self.rust_source.as_deref()
    }

    /// The aggregate with its accumulators in `pool`'s worker processes (of its library).
    pub fn with_worker_pool(mut self, pool: Arc<WorkerPool>) -> PluginUdaf {
        self.pool = Some(pool);
        self
    }

    /// The pool its accumulators run in, when isolated.
    pub fn worker_pool(&self) -> Option<&Arc<WorkerPool>> {
        self.pool.as_ref()
    }

    /// The plugin function.
    pub fn function(&self) -> &PluginAggregate {
        &self.function
    }

    /// As a DataFusion aggregate function.
    pub fn into_aggregate_udf(self) -> AggregateUDF {
        AggregateUDF::new_from_impl(self)
    }

    fn sql_signature(&self) -> String {
        self.function.signature().display_as(&self.sql_name)
    }

    fn call_error(&self, e: CallError) -> DataFusionError {
        DataFusionError::Execution(format!(
            "plugin aggregate {} (library {}) failed: {e}",
            self.sql_name,
            self.function.library().path().display()
        ))
    }

    fn new_accumulator(&self) -> Result<Box<dyn Accumulate>> {
        match &self.pool {
            Some(pool) => IsolatedAccumulator::create(pool, &self.function)
                .map(|acc| Box::new(acc) as Box<dyn Accumulate>),
            None => self
                .function
                .accumulator()
                .map(|acc| Box::new(acc) as Box<dyn Accumulate>),
        }
        .map_err(|e| self.call_error(e))
    }
}

impl PartialEq for PluginUdaf {
    fn eq(&self, other: &Self) -> bool {
        self.sql_name == other.sql_name
            && Arc::ptr_eq(self.function.library(), other.function.library())
            && self.function.signature() == other.function.signature()
            && self.pool.as_ref().map(Arc::as_ptr) == other.pool.as_ref().map(Arc::as_ptr)
    }
}

impl Eq for PluginUdaf {}

impl Hash for PluginUdaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sql_name.hash(state);
        self.function.library().path().hash(state);
        self.function.signature().hash(state);
    }
}

impl AggregateUDFImpl for PluginUdaf {
    fn name(&self) -> &str {
        &self.sql_name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.function.signature().return_type.clone())
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let params: Vec<crate::types::ValueType> = (self.function.signature().arg_types.iter())
            .map(|t| crate::types::ValueType::Arrow(t.clone()))
            .collect();
        crate::types::coerce_arguments(
            &format!("aggregate {}", self.sql_signature()),
            &params,
            arg_types,
        )
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let signature = self.function.signature();
        Ok(call_state_fields(
            args.name,
            args.is_distinct,
            &signature.arg_types,
            signature.state_fields.iter().map(|f| f.as_ref()),
        ))
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.is_distinct {
            return Ok(Box::new(Distinct {
                udaf: self.clone(),
                rows: std::collections::HashSet::new(),
                bytes: 0,
            }));
        }
        let mut acc = self.new_accumulator()?;
        // One group, there from the start: an aggregate of no rows still has its value.
        acc.feed(Feed::Update, &self.empty_arguments(), Some(&[]), None, 1)
            .map_err(|e| self.call_error(e))?;
        Ok(Box::new(OneGroup {
            udaf: self.clone(),
            acc,
        }))
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        !args.is_distinct
    }

    /// A plugin aggregate sees no ordering (the ABI passes it none): an `ORDER BY` inside the
    /// call is dropped, not passed as extra arguments.
    fn order_sensitivity(&self) -> datafusion::logical_expr::utils::AggregateOrderSensitivity {
        datafusion::logical_expr::utils::AggregateOrderSensitivity::Insensitive
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        if args.is_distinct {
            return not_impl_err!(
                "plugin aggregate {}: DISTINCT runs in one group",
                self.sql_name
            );
        }
        let acc = self.new_accumulator()?;
        Ok(Box::new(ManyGroups {
            udaf: self.clone(),
            acc,
        }))
    }
}

impl PluginUdaf {
    /// Zero-row columns of the argument types.
    fn empty_arguments(&self) -> Vec<ArrayRef> {
        self.function
            .signature()
            .arg_types
            .iter()
            .map(new_empty_array)
            .collect()
    }
}

/// The grouped accumulator (GROUP BY).
struct ManyGroups {
    udaf: PluginUdaf,
    acc: Box<dyn Accumulate>,
}

impl std::fmt::Debug for ManyGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManyGroups")
            .field("acc", &self.acc)
            .finish()
    }
}

fn emit_of(emit_to: EmitTo) -> Emit {
    match emit_to {
        EmitTo::All => Emit::TakeAll,
        EmitTo::First(n) => Emit::TakeFirst(n),
    }
}

/// The columns of a struct array of partial states.
fn state_columns(state: ArrayRef) -> Vec<ArrayRef> {
    state.as_struct().columns().to_vec()
}

impl GroupsAccumulator for ManyGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.acc
            .feed(
                Feed::Update,
                values,
                Some(group_indices),
                opt_filter,
                total_num_groups,
            )
            .map_err(|e| self.udaf.call_error(e))
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.acc
            .emit(false, emit_of(emit_to))
            .map_err(|e| self.udaf.call_error(e))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.acc
            .emit(true, emit_of(emit_to))
            .map(state_columns)
            .map_err(|e| self.udaf.call_error(e))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.acc
            .feed(
                Feed::Merge,
                values,
                Some(group_indices),
                None,
                total_num_groups,
            )
            .map_err(|e| self.udaf.call_error(e))
    }

    /// Each row as its own group, through a fresh accumulator of the plugin. Correct but not
    /// cheap, so not offered to DataFusion's skipping of partial aggregation
    /// (`supports_convert_to_state` stays false).
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let groups: Vec<usize> = (0..rows).collect();
        let mut acc = self.udaf.new_accumulator()?;
        acc.feed(Feed::Update, values, Some(&groups), opt_filter, rows)
            .and_then(|()| acc.emit(true, Emit::TakeAll))
            .map(state_columns)
            .map_err(|e| self.udaf.call_error(e))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.acc.size()
    }
}

/// The one-group accumulator (no GROUP BY, window frames).
struct OneGroup {
    udaf: PluginUdaf,
    acc: Box<dyn Accumulate>,
}

impl std::fmt::Debug for OneGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneGroup").field("acc", &self.acc).finish()
    }
}

impl OneGroup {
    fn feed(&mut self, feed: Feed, values: &[ArrayRef]) -> Result<()> {
        self.acc
            .feed(feed, values, None, None, 1)
            .map_err(|e| self.udaf.call_error(e))
    }
}

impl Accumulator for OneGroup {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.feed(Feed::Update, values)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let result = self
            .acc
            .emit(false, Emit::Peek)
            .map_err(|e| self.udaf.call_error(e))?;
        ScalarValue::try_from_array(&result, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.acc.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let state = self
            .acc
            .emit(true, Emit::Peek)
            .map_err(|e| self.udaf.call_error(e))?;
        state_columns(state)
            .iter()
            .map(|c| ScalarValue::try_from_array(c, 0))
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.feed(Feed::Merge, states)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.feed(Feed::Retract, values)
    }

    fn supports_retract_batch(&self) -> bool {
        self.udaf.function.signature().retracts
    }
}

/// `f(DISTINCT ...)`: the distinct argument rows are kept in the host (the partial state is
/// one list per argument), and the plugin's accumulator sees each once when the value is asked.
struct Distinct {
    udaf: PluginUdaf,
    rows: std::collections::HashSet<Vec<ScalarValue>>,
    /// The bytes of the values in `rows`, kept as they are inserted (DataFusion asks for the
    /// size after every batch).
    bytes: usize,
}

impl std::fmt::Debug for Distinct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distinct")
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl Distinct {
    /// The distinct rows as columns of the argument types.
    fn columns(&self) -> Result<Vec<ArrayRef>> {
        let types = &self.udaf.function.signature().arg_types;
        types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if self.rows.is_empty() {
                    return Ok(new_empty_array(t));
                }
                ScalarValue::iter_to_array(self.rows.iter().map(|r| r[i].clone()))
            })
            .collect()
    }
}

impl Accumulator for Distinct {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = values.first().map_or(0, |v| v.len());
        for row in 0..rows {
            let key = values
                .iter()
                .map(|v| ScalarValue::try_from_array(v, row))
                .collect::<Result<Vec<_>>>()?;
            let bytes: usize = key.iter().map(ScalarValue::size).sum();
            if self.rows.insert(key) {
                self.bytes += bytes;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mut acc = self.udaf.new_accumulator()?;
        let columns = self.columns()?;
        let result = if self.rows.is_empty() || columns.is_empty() {
            acc.feed(Feed::Update, &columns, Some(&[]), None, 1)
        } else {
            acc.feed(Feed::Update, &columns, None, None, 1)
        }
        .and_then(|()| acc.emit(false, Emit::Peek))
        .map_err(|e| self.udaf.call_error(e))?;
        ScalarValue::try_from_array(&result, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.bytes
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.columns()?
            .into_iter()
            .map(|column| {
                let list = datafusion::common::utils::SingleRowListArrayBuilder::new(column)
                    .with_nullable(true)
                    .build_list_scalar();
                Ok(list)
            })
            .collect()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists: Vec<_> = states.iter().map(|s| s.as_list::<i32>()).collect();
        let rows = lists.first().map_or(0, |l| l.len());
        for row in 0..rows {
            if lists.iter().any(|l| l.is_null(row)) {
                continue;
            }
            let items: Vec<ArrayRef> = lists.iter().map(|l| l.value(row)).collect();
            let n = items.first().map_or(0, |i| i.len());
            if items.iter().any(|i| i.len() != n) {
                return datafusion::common::internal_err!(
                    "the DISTINCT state of {} has lists of different lengths",
                    self.udaf.sql_name
                );
            }
            self.update_batch(&items)?;
        }
        Ok(())
    }
}

/// The state columns of one call `call` (DataFusion's name of the call) of a plugin aggregate:
/// its state fields named after the call, as DataFusion's own aggregates name theirs (so two
/// calls of one function in a query have distinct state columns), or with `DISTINCT` the
/// distinct argument rows seen so far, one list per argument of `arg_types`. The one naming of
/// every place that plans plugin aggregates (here and the Ballista scheduler).
pub fn call_state_fields<'a>(
    call: &str,
    distinct: bool,
    arg_types: &[DataType],
    state: impl IntoIterator<Item = &'a Field>,
) -> Vec<FieldRef> {
    if distinct {
        return arg_types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let item = Arc::new(Field::new("item", t.clone(), true));
                Arc::new(Field::new(
                    format!("{call}[distinct_{i}]"),
                    DataType::List(item),
                    true,
                ))
            })
            .collect();
    }
    state
        .into_iter()
        .map(|f| {
            Arc::new(Field::new(
                format!("{call}[{}]", f.name()),
                f.data_type().clone(),
                true,
            ))
        })
        .collect()
}

/// Whether `udaf` is a plugin aggregate, and which.
pub fn plugin_udaf_of(udaf: &AggregateUDF) -> Option<&PluginUdaf> {
    udaf.inner().downcast_ref::<PluginUdaf>()
}
