//! Plugin functions in `pg_catalog`, so that `psql`'s `\df` and the function listings of GUI
//! tools show them.
//!
//! `datafusion-pg-catalog`'s `pg_proc` is a static table of PostgreSQL's builtins. This module
//! wraps its `pg_catalog` schema so that `pg_proc` is that table plus one row per plugin function
//! of the session at the time of the query (scalar, async and aggregate; `prokind` `f` or `a`),
//! in the session's default schema (`public`), and adds the functions `\df` calls:
//! `pg_function_is_visible(oid)`, `pg_get_function_arguments(oid)`,
//! `pg_get_function_identity_arguments(oid)` and `pg_get_function_result(oid)` (argument and
//! result types as udfsql's SQL names them; NULL for the builtins' oids).
//! (`\df+` is not answered: it calls `array_to_string` on `proacl`, which this catalog keeps as
//! text.)
//!
//! A plugin function's oid is derived from its name and kind (stable across queries and
//! restarts), in a range above PostgreSQL's and `datafusion-pg-catalog`'s own oids.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int32Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{ColumnarValue, Expr, ScalarUDF, Volatility, create_udf};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::SessionContext;
use parking_lot::RwLock;
use udf_engine::PluginFunctionInfo;

/// The first oid given to plugin functions (PostgreSQL's own objects stay below 16384, and
/// `datafusion-pg-catalog` counts its tables' and schemas' oids up from there).
const FIRST_PLUGIN_OID: u32 = 0x4000_0000;
/// How many oids plugin functions may take.
const PLUGIN_OID_SPAN: u32 = 0x3FFF_FFFF;

/// PostgreSQL's oid of the `C` language (`pg_language`), which plugin functions are written in
/// as far as a catalog can tell.
const LANGUAGE_C: i32 = 13;
/// The bootstrap superuser's oid, owner of everything in this catalog.
const OWNER: i32 = 10;

/// Replaces the session's `pg_catalog` schema (installed by `datafusion-pg-catalog`) by one whose
/// `pg_proc` lists plugin functions too, and registers the functions `\df` calls.
pub fn install(ctx: &SessionContext, catalog: &str) -> anyhow::Result<()> {
    let catalog_provider = ctx
        .catalog(catalog)
        .ok_or_else(|| anyhow::anyhow!("catalog {catalog} not found"))?;
    let inner = catalog_provider
        .schema("pg_catalog")
        .ok_or_else(|| anyhow::anyhow!("pg_catalog is not installed in catalog {catalog}"))?;
    catalog_provider.register_schema(
        "pg_catalog",
        Arc::new(PgCatalogWithPlugins { inner }) as Arc<dyn SchemaProvider>,
    )?;
    let state = ctx.state_weak_ref();
    ctx.register_udf(is_visible_udf());
    ctx.register_udf(describe_udf(
        "pg_get_function_arguments",
        state.clone(),
        arguments_text,
    ));
    ctx.register_udf(describe_udf(
        "pg_get_function_identity_arguments",
        state.clone(),
        arguments_text,
    ));
    ctx.register_udf(describe_udf("pg_get_function_result", state, |info| {
        info.result.clone()
    }));
    Ok(())
}

fn arguments_text(info: &PluginFunctionInfo) -> String {
    info.arguments.join(", ")
}

/// The plugin functions of a session with their oids, sorted by name then kind.
fn plugin_rows(
    scalars: &std::collections::HashMap<String, Arc<ScalarUDF>>,
    aggregates: &std::collections::HashMap<String, Arc<datafusion::logical_expr::AggregateUDF>>,
) -> Vec<(i32, PluginFunctionInfo)> {
    let infos = udf_engine::plugin_functions_in(scalars, aggregates);
    let mut used = HashSet::new();
    infos
        .into_iter()
        .map(|info| {
            let key = format!("{}\0{}", info.sql_name, info.kind);
            let mut slot = fnv1a(key.as_bytes()) % PLUGIN_OID_SPAN;
            // Two functions whose hashes meet take the next free oids, in name order.
            while !used.insert(slot) {
                slot = (slot + 1) % PLUGIN_OID_SPAN;
            }
            ((FIRST_PLUGIN_OID + slot) as i32, info)
        })
        .collect()
}

/// FNV-1a (32 bits) of `bytes`.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn is_visible_udf() -> ScalarUDF {
    create_udf(
        "pg_function_is_visible",
        vec![DataType::Int32],
        DataType::Boolean,
        Volatility::Stable,
        Arc::new(|args: &[ColumnarValue]| {
            let oids = ColumnarValue::values_to_arrays(args)?;
            let n = oids.first().map_or(1, |a| a.len());
            // Every function of this catalog is in a schema on the search path.
            Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(vec![
                true;
                n
            ]))))
        }),
    )
}

/// A function of a function's oid answering `text(info)` for plugin functions and NULL for other
/// oids (PostgreSQL's builtins).
fn describe_udf(
    name: &str,
    state: Weak<RwLock<SessionState>>,
    text: fn(&PluginFunctionInfo) -> String,
) -> ScalarUDF {
    create_udf(
        name,
        vec![DataType::Int32],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(move |args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let Some(oids) = arrays.first() else {
                return exec_err!("expected one argument, a function's oid");
            };
            let oids = cast(oids, &DataType::Int32)?;
            let oids = oids
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| DataFusionError::Internal("oid is not Int32".into()))?;
            let rows = match state.upgrade() {
                Some(state) => {
                    let state = state.read();
                    plugin_rows(state.scalar_functions(), state.aggregate_functions())
                }
                None => Vec::new(),
            };
            let out: StringArray = oids
                .iter()
                .map(|oid| {
                    let oid = oid?;
                    rows.iter()
                        .find(|(o, _)| *o == oid)
                        .map(|(_, info)| text(info))
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `datafusion-pg-catalog`'s `pg_catalog` with plugin functions in `pg_proc`.
#[derive(Debug)]
struct PgCatalogWithPlugins {
    inner: Arc<dyn SchemaProvider>,
}

#[async_trait]
impl SchemaProvider for PgCatalogWithPlugins {
    fn table_names(&self) -> Vec<String> {
        self.inner.table_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let table = self.inner.table(name).await?;
        if !name.eq_ignore_ascii_case("pg_proc") {
            return Ok(table);
        }
        let (Some(builtins), Some(namespaces)) = (table, self.inner.table("pg_namespace").await?)
        else {
            return Ok(None);
        };
        Ok(Some(Arc::new(PgProcWithPlugins {
            builtins,
            namespaces,
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.inner.table_exist(name)
    }
}

/// `pg_proc`: the builtins' rows, then the plugin functions of the querying session.
#[derive(Debug)]
struct PgProcWithPlugins {
    builtins: Arc<dyn TableProvider>,
    namespaces: Arc<dyn TableProvider>,
}

impl PgProcWithPlugins {
    /// The oid `pg_namespace` gives the session's default schema.
    async fn default_schema_oid(&self, state: &dyn Session) -> Result<i32> {
        let schema = state.config_options().catalog.default_schema.clone();
        let plan = self.namespaces.scan(state, None, &[], None).await?;
        for batch in collect(plan, state.task_ctx()).await? {
            let (Some(oids), Some(names)) =
                (batch.column_by_name("oid"), batch.column_by_name("nspname"))
            else {
                return exec_err!("pg_namespace has no oid or nspname column");
            };
            let oids = cast(oids, &DataType::Int32)?;
            let oids = oids.as_any().downcast_ref::<Int32Array>();
            let names = cast(names, &DataType::Utf8)?;
            let names = names.as_any().downcast_ref::<StringArray>();
            let (Some(oids), Some(names)) = (oids, names) else {
                return exec_err!("pg_namespace's oid or nspname column has another type");
            };
            for i in 0..batch.num_rows() {
                if names.is_valid(i) && names.value(i) == schema && oids.is_valid(i) {
                    return Ok(oids.value(i));
                }
            }
        }
        exec_err!("schema {schema} is not in pg_namespace")
    }

    /// The plugin functions' rows, in `pg_proc`'s schema.
    fn plugin_batch(
        &self,
        rows: &[(i32, PluginFunctionInfo)],
        namespace: i32,
    ) -> Result<RecordBatch> {
        let schema = self.builtins.schema();
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let values = rows
                    .iter()
                    .map(|(oid, info)| pg_proc_value(field.name(), *oid, info, namespace))
                    .collect::<Vec<_>>();
                column(field.name(), field.data_type(), field.is_nullable(), values)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

/// One `pg_proc` value of a plugin function, by column; `None` for NULL.
fn pg_proc_value(
    column: &str,
    oid: i32,
    info: &PluginFunctionInfo,
    namespace: i32,
) -> Option<ScalarValue> {
    let int = |v: i32| Some(ScalarValue::Int32(Some(v)));
    let text = |v: &str| Some(ScalarValue::Utf8(Some(v.to_string())));
    let flag = |v: bool| Some(ScalarValue::Boolean(Some(v)));
    match column {
        "oid" => int(oid),
        "proname" => text(&info.sql_name),
        "pronamespace" => int(namespace),
        "proowner" => int(OWNER),
        "prolang" => int(LANGUAGE_C),
        "procost" => Some(ScalarValue::Float32(Some(1.0))),
        "prorows" | "provariadic" | "pronargdefaults" | "prorettype" => int(0),
        "prosupport" => text("-"),
        "prokind" => text(if info.kind == "aggregate" { "a" } else { "f" }),
        "prosecdef" | "proleakproof" | "proisstrict" | "proretset" => flag(false),
        "provolatile" => text(match info.volatility.as_str() {
            "immutable" => "i",
            "stable" => "s",
            _ => "v",
        }),
        // Whether a plugin function may run in parallel workers is not known: "unsafe".
        "proparallel" => text("u"),
        "pronargs" => int(i32::try_from(info.arguments.len()).unwrap_or(i32::MAX)),
        // Argument types have no PostgreSQL oids; pg_get_function_arguments names them.
        "proargtypes" => text(""),
        // PostgreSQL's rule: a C function's link symbol, another language's body.
        "prosrc" => text(info.source.as_deref().unwrap_or(&info.library_name)),
        "probin" => text(&info.library),
        _ => None,
    }
}

/// A column of `data_type` from `values` (a `None` is NULL, refused in a non-nullable column).
fn column(
    name: &str,
    data_type: &DataType,
    nullable: bool,
    values: Vec<Option<ScalarValue>>,
) -> Result<ArrayRef> {
    let null = ScalarValue::try_from(data_type)?;
    if values.iter().any(Option::is_none) && !nullable {
        return exec_err!("pg_proc: no value for the non-nullable column {name}");
    }
    if values.is_empty() {
        return null.to_array_of_size(0);
    }
    let array = ScalarValue::iter_to_array(
        values
            .into_iter()
            .map(|v| match v {
                Some(v) => v.cast_to(data_type),
                None => Ok(null.clone()),
            })
            .collect::<Result<Vec<_>>>()?,
    )?;
    Ok(array)
}

#[async_trait]
impl TableProvider for PgProcWithPlugins {
    fn schema(&self) -> SchemaRef {
        self.builtins.schema()
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
        let builtins = self.builtins.scan(state, projection, &[], None).await?;
        let rows = plugin_rows(state.scalar_functions(), state.aggregate_functions());
        if rows.is_empty() {
            return Ok(builtins);
        }
        let namespace = self.default_schema_oid(state).await?;
        let batch = self.plugin_batch(&rows, namespace)?;
        let plugins: Arc<dyn ExecutionPlan> =
            MemorySourceConfig::try_new_exec(&[vec![batch]], self.schema(), projection.cloned())?;
        UnionExec::try_new(vec![builtins, plugins])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_standard_hash() {
        // FNV-1a 32 of "a" is 0xe40c292c.
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }
}
