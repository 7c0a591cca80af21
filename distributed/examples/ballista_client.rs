//! Embedding udfsql's plugin functions in a program that queries a Ballista cluster, the long way
//! round (what `udf_distributed::connect` does for you): Ballista's own
//! `SessionContextExt::remote_with_state` with udfsql's codecs in the session configuration, then
//! udfsql's `install` for `CREATE FUNCTION ... LANGUAGE plugin` and `plugin_functions`.
//!
//! ```text
//! cargo run -p udf-distributed --example ballista_client -- df://HOST:50050 PLUGIN_DIR PARQUET_DIR
//! ```
//!
//! `PLUGIN_DIR` holds the libraries on this machine (each executor has the same files in its own
//! `--plugin-dir`); `PARQUET_DIR` is a directory of Parquet files with a string column `name` and
//! an integer column `x`, at the same path on every executor (or on shared storage).
#![forbid(unsafe_code)]

use std::sync::Arc;

use anyhow::{Context, Result};
use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_distributed::{PluginLogicalCodec, PluginPhysicalCodec, Resolver, Role};
use udf_engine::PluginLoader;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, plugin_dir, parquet_dir] = args.as_slice() else {
        anyhow::bail!("usage: ballista_client df://HOST:PORT PLUGIN_DIR PARQUET_DIR");
    };

    // Plugin functions cross to the cluster as their library's file name and SHA-256 digest.
    let loader = Arc::new(PluginLoader::new().with_plugin_dir(plugin_dir)?);
    let resolver = Arc::new(Resolver::new(
        "the client",
        Role::Evaluate,
        Arc::clone(&loader),
    ));
    let config = SessionConfig::new_with_ballista()
        .with_ballista_logical_extension_codec(Arc::new(PluginLogicalCodec::ballista(Arc::clone(
            &resolver,
        ))))
        .with_ballista_physical_extension_codec(Arc::new(PluginPhysicalCodec::ballista(resolver)));
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .build();
    let ctx = SessionContext::remote_with_state(url, state).await?;
    udf_engine::install(&ctx, loader)?;

    for sql in [
        "CREATE FUNCTION twice(VARCHAR, BIGINT UNSIGNED) RETURNS VARCHAR LANGUAGE plugin \
         AS 'libudf_plugin_repeat.so'"
            .to_string(),
        "CREATE FUNCTION square(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'"
            .to_string(),
        format!("CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{parquet_dir}/'"),
    ] {
        ctx.sql(&sql).await?.collect().await.with_context(|| sql.clone())?;
    }
    // Planned here, evaluated by the executors.
    ctx.sql("SELECT twice(name, 2) AS t, square(x) AS s FROM p WHERE x IS NOT NULL AND name IS NOT NULL ORDER BY x LIMIT 3")
        .await?
        .show()
        .await?;
    Ok(())
}
