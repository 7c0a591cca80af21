//! `EXPLAIN` shows how each plugin function of the query is called: a query planner that wraps
//! the session's own and appends a `plugin functions:` line to the physical plan of an EXPLAIN.
//!
//! DataFusion prints a scalar function in a plan by its name only, so the call path (row or
//! batch), the library and its ABI would otherwise be invisible there.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::Result;
use datafusion::common::display::{PlanType, StringifiedPlan};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::explain::ExplainExec;
use datafusion::prelude::SessionContext;

/// A [`QueryPlanner`] that plans through `inner` and, for `EXPLAIN`, appends to the final
/// physical plan a line for every plugin function of the query, with its call path, library and
/// ABI:
///
/// ```text
/// plugin functions:
///   my_repeat: row path, libudf_plugin_repeat.so (ABI v1)
///   square: batch path, libudf_plugin_square.so (ABI v2.2)
/// ```
#[derive(Debug)]
pub struct PluginQueryPlanner {
    inner: Arc<dyn QueryPlanner + Send + Sync>,
}

impl PluginQueryPlanner {
    /// Wraps the planner the session used so far.
    pub fn new(inner: Arc<dyn QueryPlanner + Send + Sync>) -> Self {
        PluginQueryPlanner { inner }
    }
}

#[async_trait]
impl QueryPlanner for PluginQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self
            .inner
            .create_physical_plan(logical_plan, session_state)
            .await?;
        let LogicalPlan::Explain(explain) = logical_plan else {
            return Ok(plan);
        };
        let Some(exec) = plan.downcast_ref::<ExplainExec>() else {
            return Ok(plan);
        };
        let Some(line) = plugin_calls_line(&explain.plan)? else {
            return Ok(plan);
        };
        let plans = exec
            .stringified_plans()
            .iter()
            .map(|p| match p.plan_type {
                PlanType::FinalPhysicalPlan => {
                    let sep = if p.plan.ends_with('\n') { "" } else { "\n" };
                    StringifiedPlan::new(p.plan_type.clone(), format!("{}{sep}{line}", p.plan))
                }
                _ => p.clone(),
            })
            .collect();
        Ok(Arc::new(ExplainExec::new(
            exec.schema(),
            plans,
            exec.verbose(),
        )))
    }
}

/// `plugin functions:` and a line for each plugin function `plan` calls (subqueries included), or
/// `None` when it calls none.
pub fn plugin_calls_line(plan: &LogicalPlan) -> Result<Option<String>> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    plan.apply_with_subqueries(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                let udaf = match e {
                    Expr::AggregateFunction(f) => Some(f.func.as_ref()),
                    Expr::WindowFunction(w) => match &w.fun {
                        datafusion::logical_expr::WindowFunctionDefinition::AggregateUDF(f) => {
                            Some(f.as_ref())
                        }
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(udaf) = udaf.and_then(crate::udaf::plugin_udaf_of) {
                    use datafusion::logical_expr::AggregateUDFImpl;
                    found.insert(udaf.name().to_string(), aggregate_line(udaf));
                }
                if let Expr::ScalarFunction(f) = e
                    && let Some(udf) = crate::async_udf::plugin_udf_of(&f.func)
                {
                    let library = udf.function().library();
                    let file = library.path().file_name().map_or_else(
                        || library.path().display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    let isolation = isolation_text(udf.worker_pool());
                    found.insert(
                        f.func.name().to_string(),
                        format!(
                            "{} path{isolation}, {file} (ABI {})",
                            udf.path_name(),
                            library.abi()
                        ),
                    );
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    })?;
    if found.is_empty() {
        return Ok(None);
    }
    let calls: Vec<String> = found
        .into_iter()
        .map(|(name, how)| format!("  {name}: {how}"))
        .collect();
    Ok(Some(format!("plugin functions:\n{}\n", calls.join("\n"))))
}

/// `, isolated in worker processes (pool of N, call time limit T s)`, or nothing in-process.
fn isolation_text(pool: Option<&Arc<crate::isolation::WorkerPool>>) -> String {
    match pool {
        Some(pool) => format!(
            ", isolated in worker processes (pool of {}, call time limit {} s)",
            pool.size(),
            pool.call_timeout().as_secs_f64()
        ),
        None => String::new(),
    }
}

/// How a plugin aggregate is called: `aggregate, isolated ..., lib.so (ABI v2.4)`.
fn aggregate_line(udaf: &crate::udaf::PluginUdaf) -> String {
    let library = udaf.function().library();
    let file = library.path().file_name().map_or_else(
        || library.path().display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let isolation = isolation_text(udaf.worker_pool());
    format!(
        "aggregate{isolation}{}, {file} (ABI {})",
        if udaf.function().signature().retracts {
            " (retracts)"
        } else {
            ""
        },
        library.abi()
    )
}

/// Makes `ctx`'s EXPLAIN show plugin calls (see [`PluginQueryPlanner`]), keeping the planner
/// and everything else the session had (the session's state is rebuilt around the new planner).
pub fn install_explain(ctx: &SessionContext) {
    let state_ref = ctx.state_ref();
    let mut state = state_ref.write();
    let current: &dyn std::any::Any = state.query_planner().as_ref();
    if current.is::<PluginQueryPlanner>() {
        return;
    }
    let planner = Arc::new(PluginQueryPlanner::new(Arc::clone(state.query_planner())));
    let session_id = state.session_id().to_string();
    *state = SessionStateBuilder::new_from_existing(state.clone())
        .with_session_id(session_id)
        .with_query_planner(planner)
        .build();
}
