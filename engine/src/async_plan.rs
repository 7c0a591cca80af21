//! Where DataFusion cannot evaluate an asynchronous function, a plan that moves it where it can.
//!
//! DataFusion 55 runs asynchronous UDFs (`AsyncFuncExec`) in projections, filters and aggregate
//! arguments; anywhere else (a `GROUP BY` key, an `ORDER BY` key, a window function) the call is
//! made directly and fails with "Internal error: async functions should not be called
//! directly". This optimizer rule, which runs after DataFusion's own, computes such calls in a
//! projection below the node, under the name the expression had (so the node's output keeps its
//! names), and refers to that column instead:
//!
//! * `Sort`: `ORDER BY f(x)` → sort by the projected column, then project the input's columns
//!   again (the sort's output is unchanged);
//! * `Aggregate`: `GROUP BY f(x)` → group by the projected column;
//! * `Window`: `OVER (ORDER BY f(x))`, `sum(f(x)) OVER (...)` → the window over the projected
//!   column, then the window's own columns projected again.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result};
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, Projection, Sort, SortExpr, Window};
use datafusion::optimizer::optimizer::ApplyOrder;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::prelude::SessionContext;

/// The rule's name (also how [`install`] finds it).
const NAME: &str = "udfsql_async_placement";

/// Adds the rule to `ctx` once.
pub(crate) fn install(ctx: &SessionContext) {
    let installed = ctx
        .state_ref()
        .read()
        .optimizers()
        .iter()
        .any(|r| r.name() == NAME);
    if !installed {
        ctx.add_optimizer_rule(Arc::new(AsyncPlacement));
    }
}

/// The rule, for sessions built without [`install`] (a Ballista scheduler's).
pub fn async_placement_rule() -> Arc<dyn OptimizerRule + Send + Sync> {
    Arc::new(AsyncPlacement)
}

#[derive(Debug)]
struct AsyncPlacement;

/// Whether `e` is a call of an asynchronous UDF.
fn is_async_call(e: &Expr) -> bool {
    matches!(e, Expr::ScalarFunction(f) if f.func.inner().downcast_ref::<AsyncScalarUDF>().is_some())
}

/// The asynchronous calls in `exprs`, outermost ones, each once (by name).
fn async_calls<'a>(exprs: impl IntoIterator<Item = &'a Expr>) -> Result<Vec<Expr>> {
    let mut calls = Vec::new();
    let mut seen = HashSet::new();
    for expr in exprs {
        expr.apply(|e| {
            if is_async_call(e) {
                if seen.insert(e.schema_name().to_string()) {
                    calls.push(e.clone());
                }
                return Ok(TreeNodeRecursion::Jump);
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
    }
    Ok(calls)
}

/// `input` with `calls` computed as columns named like the calls, after its own columns.
fn project_calls(input: Arc<LogicalPlan>, calls: &[Expr]) -> Result<LogicalPlan> {
    let mut exprs: Vec<Expr> = input
        .schema()
        .columns()
        .into_iter()
        .map(Expr::Column)
        .collect();
    exprs.extend(
        calls
            .iter()
            .map(|call| call.clone().alias(call.schema_name().to_string())),
    );
    Ok(LogicalPlan::Projection(Projection::try_new(exprs, input)?))
}

/// `expr` with its asynchronous calls replaced by the columns [`project_calls`] made.
fn refer_to_columns(expr: Expr) -> Result<Expr> {
    expr.transform_down(|e| {
        if is_async_call(&e) {
            let column = Expr::Column(Column::from_name(e.schema_name().to_string()));
            return Ok(Transformed::new(column, true, TreeNodeRecursion::Jump));
        }
        Ok(Transformed::no(e))
    })
    .map(|t| t.data)
}

impl OptimizerRule for AsyncPlacement {
    fn name(&self) -> &str {
        NAME
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        match plan {
            LogicalPlan::Sort(sort) => {
                let calls = async_calls(sort.expr.iter().map(|s| &s.expr))?;
                if calls.is_empty() {
                    return Ok(Transformed::no(LogicalPlan::Sort(sort)));
                }
                let output: Vec<Expr> = sort
                    .input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let input = project_calls(Arc::clone(&sort.input), &calls)?;
                let expr = sort
                    .expr
                    .into_iter()
                    .map(|s| {
                        Ok(SortExpr {
                            expr: refer_to_columns(s.expr)?,
                            ..s
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let sorted = LogicalPlan::Sort(Sort {
                    expr,
                    input: Arc::new(input),
                    fetch: sort.fetch,
                });
                let restored = Projection::try_new(output, Arc::new(sorted))?;
                Ok(Transformed::yes(LogicalPlan::Projection(restored)))
            }
            LogicalPlan::Aggregate(aggregate) => {
                let calls = async_calls(&aggregate.group_expr)?;
                if calls.is_empty() {
                    return Ok(Transformed::no(LogicalPlan::Aggregate(aggregate)));
                }
                let input = project_calls(Arc::clone(&aggregate.input), &calls)?;
                let group_expr = aggregate
                    .group_expr
                    .into_iter()
                    .map(refer_to_columns)
                    .collect::<Result<Vec<_>>>()?;
                let rewritten =
                    Aggregate::try_new(Arc::new(input), group_expr, aggregate.aggr_expr)?;
                Ok(Transformed::yes(LogicalPlan::Aggregate(rewritten)))
            }
            LogicalPlan::Window(window) => {
                let calls = async_calls(&window.window_expr)?;
                if calls.is_empty() {
                    return Ok(Transformed::no(LogicalPlan::Window(window)));
                }
                let output: Vec<Expr> = window
                    .schema
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let input = project_calls(Arc::clone(&window.input), &calls)?;
                let window_expr = window
                    .window_expr
                    .into_iter()
                    .map(refer_to_columns)
                    .collect::<Result<Vec<_>>>()?;
                // The window expressions keep their names: a projected call's column is named
                // like the call, and a column prints as its name.
                let rewritten = Window::try_new(window_expr, Arc::new(input))?;
                let restored =
                    Projection::try_new(output, Arc::new(LogicalPlan::Window(rewritten)))?;
                Ok(Transformed::yes(LogicalPlan::Projection(restored)))
            }
            other => Ok(Transformed::no(other)),
        }
    }
}
