//! Plugin aggregate functions (ABI 2.4) in distributed plans: a plan carries an aggregate as its
//! [`PluginSpec`] (with the state fields), the scheduler plans with it without loading
//! anything ([`RemotePluginUdaf`]), and executors load the library pinned by the client's digest
//! and run the accumulators; partial states travel between the phases as ordinary columns.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDF, AggregateUDFImpl, Signature};
use udf_engine::PluginUdaf;

use crate::resolve::{Resolver, Role, same_as_planned};
use crate::spec::PluginSpec;

/// A plugin aggregate known by its [`PluginSpec`] only: on the scheduler, and on an executor
/// that could not load it (an accumulator fails with the reason).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RemotePluginUdaf {
    spec: PluginSpec,
    signature: Signature,
    return_type: DataType,
    state: Vec<Field>,
    unavailable: Option<String>,
}

impl RemotePluginUdaf {
    fn new(spec: PluginSpec, unavailable: Option<String>) -> Result<RemotePluginUdaf> {
        let return_type = spec.return_data_type()?;
        let volatility = spec.volatility()?;
        let state = spec.state_fields()?;
        Ok(RemotePluginUdaf {
            signature: Signature::any(spec.arguments, volatility),
            spec,
            return_type,
            state,
            unavailable,
        })
    }

    /// What the plan says about the function.
    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    /// The remote plugin aggregate `udaf` is, if it is one.
    pub fn of(udaf: &AggregateUDF) -> Option<&RemotePluginUdaf> {
        udaf.inner().downcast_ref::<RemotePluginUdaf>()
    }
}

impl AggregateUDFImpl for RemotePluginUdaf {
    fn name(&self) -> &str {
        &self.spec.sql_name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.return_type.clone())
    }

    /// The same names as [`PluginUdaf`]'s, so that the phases planned here match the
    /// executors' accumulators.
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let arg_types: Vec<DataType> = args
            .input_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        Ok(udf_engine::call_state_fields(
            args.name,
            args.is_distinct,
            &arg_types,
            &self.state,
        ))
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        !args.is_distinct
    }

    /// As [`PluginUdaf`]'s: plugin aggregates see no ordering.
    fn order_sensitivity(&self) -> datafusion::logical_expr::utils::AggregateOrderSensitivity {
        datafusion::logical_expr::utils::AggregateOrderSensitivity::Insensitive
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Err(DataFusionError::Execution(self.unavailable.clone().unwrap_or_else(|| {
            format!(
                "plugin aggregate {} ({}) is evaluated by executors, not where the plan is only \
                 scheduled",
                self.spec.sql_name, self.spec.library
            )
        })))
    }
}

impl Resolver {
    /// The aggregate `spec` describes, as this node runs it: planned with the spec on the
    /// scheduler, loaded pinned on executors (or, when it cannot be, one that fails its query
    /// with the reason).
    pub fn resolve_aggregate(&self, spec: &PluginSpec) -> Result<Arc<AggregateUDF>> {
        if self.role == Role::Plan {
            if !self.loader.plugin_dirs().is_empty() {
                self.check_file(spec).map_err(|reason| {
                    DataFusionError::Plan(format!(
                        "plugin aggregate {} cannot run on {}: {reason}",
                        spec.sql_name,
                        self.node()
                    ))
                })?;
            }
            return Ok(Arc::new(AggregateUDF::new_from_impl(
                RemotePluginUdaf::new(spec.clone(), None)?,
            )));
        }
        if let Some(udaf) = self.caches.lock().aggregates.get(spec) {
            return Ok(Arc::clone(udaf));
        }
        // Loaded outside the lock, as scalar functions are; kept (bounded, least recently used
        // dropped first) so that a plan decoded per task maps the library once.
        match self.load_aggregate(spec) {
            Ok(udaf) => {
                let udaf = Arc::new(udaf.into_aggregate_udf());
                self.caches
                    .lock()
                    .aggregates
                    .insert(spec.clone(), Arc::clone(&udaf));
                Ok(udaf)
            }
            Err(reason) => {
                let message = format!(
                    "plugin aggregate {} cannot run on {}: {reason}",
                    crate::spec::shorten(&spec.sql_name),
                    self.node()
                );
                tracing::warn!(function = %crate::spec::shorten(&spec.sql_name), "{message}");
                Ok(Arc::new(AggregateUDF::new_from_impl(
                    RemotePluginUdaf::new(spec.clone(), Some(message))?,
                )))
            }
        }
    }

    /// Loads `spec`'s library pinned and checks that the aggregate is the one the client
    /// planned with.
    fn load_aggregate(&self, spec: &PluginSpec) -> std::result::Result<PluginUdaf, String> {
        let library = self.load_library(spec)?;
        let function = library.aggregate_named(&spec.function).ok_or_else(|| {
            format!(
                "library {} has no aggregate function {}",
                library.path().display(),
                spec.function
            )
        })?;
        same_as_planned(&library, function.signature().to_string(), spec)?;
        let udaf = PluginUdaf::new(&spec.sql_name, function);
        // Isolated as the plan asks, or as this executor insists (its workers then hold the
        // accumulators).
        let limits = match &self.floor {
            Some(floor) => floor.limits_for(spec.isolation.as_ref(), self.target_partitions),
            None => spec.worker_limits(),
        };
        Ok(match limits {
            Some(limits) => {
                let pool =
                    udf_engine::isolation::pool_for(&library, &limits, self.target_partitions)
                        .map_err(|reason| format!("cannot start its isolated workers: {reason}"))?;
                udaf.with_worker_pool(pool)
            }
            None => udaf,
        })
    }
}
