//! The client side: a [`SessionContext`] that plans with udfsql's plugin functions and runs its
//! queries on a Ballista cluster.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::catalog::Session;
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::MemTable;
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{PluginFunctionsTable, PluginLoader};

use crate::codec::{PluginLogicalCodec, PluginPhysicalCodec};
use crate::resolve::{Resolver, Role};

/// How long [`connect`] waits for the scheduler to answer its first query.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A session whose queries run on the Ballista cluster whose scheduler is at `url`
/// (`df://HOST:PORT`), with udfsql installed: `CREATE FUNCTION ... LANGUAGE plugin` through
/// `loader`, `plugin_functions`, and the codecs that carry plugin functions to the executors.
///
/// `config` is the session's configuration (Ballista's settings are added to it). Queries that
/// read only tables held in this process's memory (`plugin_functions`, `CREATE TABLE ... AS
/// VALUES`) are planned and run here, since no other node has them; every other query runs on
/// the cluster. The scheduler is asked one query (`SELECT 1`) before this returns, so a wrong
/// address or a scheduler that is down is an error here, naming the address.
pub async fn connect(
    url: &str,
    config: SessionConfig,
    loader: Arc<PluginLoader>,
) -> Result<SessionContext> {
    let ctx = session(url, config, loader).await?;
    let probe = async { ctx.sql("SELECT 1").await?.collect().await };
    match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok(ctx),
        Ok(Err(e)) => Err(DataFusionError::Execution(format!(
            "cannot run a query on the Ballista scheduler at {url}: {e}"
        ))),
        Err(_) => Err(DataFusionError::Execution(format!(
            "the Ballista scheduler at {url} did not answer within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// [`connect`] without the first query: nothing is sent to the scheduler until a query runs.
pub async fn session(
    url: &str,
    config: SessionConfig,
    loader: Arc<PluginLoader>,
) -> Result<SessionContext> {
    let resolver = Arc::new(Resolver::new(
        "the client",
        Role::Evaluate,
        Arc::clone(&loader),
    ));
    let config = config
        .upgrade_for_ballista()
        .with_ballista_logical_extension_codec(Arc::new(PluginLogicalCodec::ballista(Arc::clone(
            &resolver,
        ))))
        .with_ballista_physical_extension_codec(Arc::new(PluginPhysicalCodec::ballista(resolver)));
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    let ctx = SessionContext::remote_with_state(url, state).await?;
    {
        let state_ref = ctx.state_ref();
        let mut state = state_ref.write();
        let planner = Arc::new(LocalTablesPlanner {
            cluster: Arc::clone(state.query_planner()),
        });
        let session_id = state.session_id().to_string();
        *state = SessionStateBuilder::new_from_existing(state.clone())
            .with_session_id(session_id)
            .with_query_planner(planner)
            .build();
    }
    udf_engine::install(&ctx, loader)?;
    Ok(ctx)
}

/// Plans a query that reads only tables held in this process's memory here, and every other
/// query through the cluster's planner.
#[derive(Debug)]
struct LocalTablesPlanner {
    cluster: Arc<dyn QueryPlanner + Send + Sync>,
}

#[async_trait]
impl QueryPlanner for LocalTablesPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (mut local, mut other) = (Vec::new(), false);
        logical_plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let in_memory = source_as_provider(&scan.source)
                    .is_ok_and(|p| p.is::<PluginFunctionsTable>() || p.is::<MemTable>());
                if in_memory {
                    local.push(scan.table_name.to_string());
                } else {
                    other = true;
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        match (local.is_empty(), other) {
            (true, _) => {
                self.cluster
                    .create_physical_plan(logical_plan, session_state)
                    .await
            }
            (false, false) => {
                DefaultPhysicalPlanner::default()
                    .create_physical_plan(logical_plan, session_state)
                    .await
            }
            (false, true) => Err(DataFusionError::Plan(format!(
                "this query reads {} held in this client's memory together with tables the \
                 cluster reads; Ballista's executors cannot see in-memory tables: create {} from \
                 files (CREATE EXTERNAL TABLE) to join them on the cluster",
                local.join(", "),
                if local.len() == 1 { "it" } else { "them" }
            ))),
        }
    }
}
