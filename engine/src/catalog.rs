//! Listing the plugin functions of a session: [`plugin_functions`] for Rust callers and the
//! `plugin_functions` table for SQL (`SELECT * FROM plugin_functions`). Both read the session's
//! registered functions at the time of the call, so they are always current.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{AggregateUDF, Expr, ScalarUDF, Volatility};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

/// One plugin function registered in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFunctionInfo {
    /// The SQL name.
    pub sql_name: String,
    /// The signature, in plugin types, under the SQL name: `my_repeat(String, UInt) -> String`.
    pub signature: String,
    /// The argument types as SQL names them: `["VARCHAR", "BIGINT UNSIGNED"]`.
    pub arguments: Vec<String>,
    /// The result type as SQL names it.
    pub result: String,
    /// The function's name inside the library.
    pub library_name: String,
    /// The library's canonical path.
    pub library: String,
    /// The library's ABI (`v1`, ...).
    pub abi: String,
    /// `immutable`, `stable` or `volatile`.
    pub volatility: String,
    /// `batch` (Arrow C Data Interface, once per batch) or `row` (once per row).
    pub call_path: String,
    /// `process` (evaluated by worker processes) or `none` (in this process).
    pub isolation: String,
    /// `scalar`, `async` (ABI 2.3) or `aggregate` (ABI 2.4).
    pub kind: String,
    /// `rust` for a function written in SQL (`CREATE FUNCTION ... LANGUAGE rust`), `plugin` for
    /// one from a library.
    pub language: String,
    /// The Rust body of a function written in SQL.
    pub source: Option<String>,
}

fn language_of(source: Option<&str>) -> String {
    if source.is_some() { "rust" } else { "plugin" }.to_string()
}

fn volatility_name(v: Volatility) -> &'static str {
    match v {
        Volatility::Immutable => "immutable",
        Volatility::Stable => "stable",
        Volatility::Volatile => "volatile",
    }
}

/// The plugin functions among `functions` (a session's scalar functions), sorted by SQL name.
pub fn plugin_functions_of(functions: &HashMap<String, Arc<ScalarUDF>>) -> Vec<PluginFunctionInfo> {
    let mut out: Vec<PluginFunctionInfo> = functions
        .iter()
        .filter_map(|(name, udf)| {
            let plugin = crate::async_udf::plugin_udf_of(udf)?;
            let sig = plugin.function().signature();
            Some(PluginFunctionInfo {
                sql_name: name.clone(),
                signature: sig.display_as(name),
                arguments: sig.sql_arguments(),
                result: sig.sql_result(),
                library_name: sig.name.clone(),
                library: plugin.function().library().path().display().to_string(),
                abi: plugin.function().library().abi().to_string(),
                volatility: volatility_name(plugin.volatility()).to_string(),
                call_path: plugin.path_name(),
                isolation: plugin.isolation_mode().to_string(),
                kind: if plugin.async_limits().is_some() {
                    "async"
                } else {
                    "scalar"
                }
                .to_string(),
                language: language_of(plugin.rust_source()),
                source: plugin.rust_source().map(str::to_string),
            })
        })
        .collect();
    out.sort_by(|a, b| a.sql_name.cmp(&b.sql_name));
    out
}

/// The plugin aggregates among `functions` (a session's aggregate functions).
pub fn plugin_aggregates_of(
    functions: &HashMap<String, Arc<AggregateUDF>>,
) -> Vec<PluginFunctionInfo> {
    functions
        .iter()
        .filter_map(|(name, udaf)| {
            let plugin = crate::udaf::plugin_udaf_of(udaf)?;
            let sig = plugin.function().signature();
            let volatility = sig.volatility.volatility();
            Some(PluginFunctionInfo {
                sql_name: name.clone(),
                signature: sig.display_as(name),
                arguments: sig.sql_arguments(),
                result: sig.sql_result(),
                library_name: sig.name.clone(),
                library: plugin.function().library().path().display().to_string(),
                abi: plugin.function().library().abi().to_string(),
                volatility: volatility_name(volatility).to_string(),
                call_path: "batch".to_string(),
                isolation: if plugin.worker_pool().is_some() {
                    "process"
                } else {
                    "none"
                }
                .to_string(),
                kind: "aggregate".to_string(),
                language: language_of(plugin.rust_source()),
                source: plugin.rust_source().map(str::to_string),
            })
        })
        .collect()
}

/// The plugin functions of both maps (scalar and aggregate), sorted by SQL name.
pub fn plugin_functions_in(
    scalars: &HashMap<String, Arc<ScalarUDF>>,
    aggregates: &HashMap<String, Arc<AggregateUDF>>,
) -> Vec<PluginFunctionInfo> {
    let mut out = plugin_functions_of(scalars);
    out.extend(plugin_aggregates_of(aggregates));
    out.sort_by(|a, b| a.sql_name.cmp(&b.sql_name).then(a.kind.cmp(&b.kind)));
    out
}

/// The plugin functions registered in `ctx` (scalar and aggregate), sorted by SQL name.
pub fn plugin_functions(ctx: &SessionContext) -> Vec<PluginFunctionInfo> {
    let state = ctx.state_ref();
    let state = state.read();
    plugin_functions_in(state.scalar_functions(), state.aggregate_functions())
}

/// The `plugin_functions` table: one row per plugin function of the querying session.
#[derive(Debug)]
pub struct PluginFunctionsTable {
    schema: SchemaRef,
}

/// The columns of `plugin_functions`, each with its value in a [`PluginFunctionInfo`].
type Column = (&'static str, fn(&PluginFunctionInfo) -> &str);
const COLUMNS: &[Column] = &[
    ("name", |i| &i.sql_name),
    ("signature", |i| &i.signature),
    ("library_function", |i| &i.library_name),
    ("library", |i| &i.library),
    ("abi", |i| &i.abi),
    ("volatility", |i| &i.volatility),
    ("call_path", |i| &i.call_path),
    ("isolation", |i| &i.isolation),
    ("kind", |i| &i.kind),
    ("language", |i| &i.language),
];

impl PluginFunctionsTable {
    /// The table's columns: `name, signature, library_function, library, abi, volatility,
    /// call_path, isolation, kind, language`.
    pub fn new() -> Self {
        PluginFunctionsTable {
            schema: Arc::new(Schema::new(
                COLUMNS
                    .iter()
                    .map(|(name, _)| Field::new(*name, DataType::Utf8, false))
                    .collect::<Vec<_>>(),
            )),
        }
    }
}

impl Default for PluginFunctionsTable {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl TableProvider for PluginFunctionsTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let infos = plugin_functions_in(state.scalar_functions(), state.aggregate_functions());
        let batch = RecordBatch::try_new(
            Arc::clone(&self.schema),
            COLUMNS
                .iter()
                .map(|(_, value)| -> ArrayRef {
                    Arc::new(StringArray::from_iter_values(infos.iter().map(value)))
                })
                .collect(),
        )?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            Arc::clone(&self.schema),
            projection.cloned(),
        )?)
    }
}

/// Registers [`PluginFunctionsTable`] as `plugin_functions` in `ctx`'s default schema.
pub fn register_plugin_functions_table(ctx: &SessionContext) -> Result<()> {
    ctx.register_table("plugin_functions", Arc::new(PluginFunctionsTable::new()))?;
    Ok(())
}
