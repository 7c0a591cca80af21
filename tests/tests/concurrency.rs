//! 16 concurrent queries on a multi-threaded runtime call plugin functions while another task
//! creates, replaces and drops functions (and so loads and unloads libraries): every answer is
//! correct or a clean "no such function" error, and nothing crashes.

use std::sync::Arc;

use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::PluginLoader;
use udf_tests::{example_plugin_dir, query};

const SQ: i64 = 20_000 * 20_001 * 40_001 / 6; // sum of squares 1..=20000

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queries_stay_correct_while_functions_churn() {
    let config = SessionConfig::new()
        .with_target_partitions(4)
        .with_batch_size(1024);
    let ctx = SessionContext::new_with_config(config);
    let loader = Arc::new(
        PluginLoader::new()
            .with_plugin_dir(example_plugin_dir())
            .unwrap(),
    );
    udf_engine::install(&ctx, Arc::clone(&loader)).unwrap();
    query(
        &ctx,
        "CREATE FUNCTION sq(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'",
    )
    .await
    .unwrap();
    query(
        &ctx,
        "CREATE FUNCTION churn(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'",
    )
    .await
    .unwrap();

    let churner = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let (lib, ret) = if i % 2 == 0 {
                    ("libudf_plugin_is_even.so", "BOOLEAN")
                } else {
                    ("libudf_plugin_square.so", "BIGINT")
                };
                query(&ctx, &format!(
                    "CREATE OR REPLACE FUNCTION churn(BIGINT) RETURNS {ret} LANGUAGE plugin AS '{lib}'"
                ))
                .await
                .unwrap();
                if i % 3 == 0 {
                    query(&ctx, "DROP FUNCTION churn").await.unwrap();
                    // Re-creating loads the library again when the last user dropped it.
                    query(&ctx, "CREATE FUNCTION churn(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_toolbox.so#epoch_micros'")
                        .await
                        .expect_err("a Timestamp function does not fit BIGINT");
                    query(&ctx, "CREATE FUNCTION churn(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'")
                        .await
                        .unwrap();
                }
                tokio::task::yield_now().await;
            }
        })
    };

    let mut workers = Vec::new();
    for w in 0..16 {
        let ctx = ctx.clone();
        workers.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..8 {
                let stable = query(&ctx, "SELECT sum(sq(value)) AS s FROM generate_series(1, 20000)")
                    .await
                    .unwrap();
                let s = stable[0]
                    .column(0)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .unwrap()
                    .value(0);
                assert_eq!(s, SQ, "worker {w} round {i}");
                // `churn` may be square, is_even or briefly absent; never a wrong answer.
                match query(&ctx, "SELECT count(*) AS c FROM generate_series(1, 5000) WHERE CAST(churn(value) AS VARCHAR) IN ('true', '4', '9')").await {
                    Ok(batches) => {
                        let c = batches[0]
                            .column(0)
                            .as_any()
                            .downcast_ref::<datafusion::arrow::array::Int64Array>()
                            .unwrap()
                            .value(0);
                        // is_even: 2500 even values; square: 2 and 3 give 4 and 9.
                        assert!(c == 2500 || c == 2, "worker {w}: count {c}");
                    }
                    Err(e) => {
                        let e = e.to_string();
                        assert!(e.contains("churn"), "worker {w}: {e}");
                    }
                }
                ok += 1;
            }
            ok
        }));
    }
    let mut done = 0;
    for worker in workers {
        done += worker.await.expect("a worker panicked");
    }
    churner.await.expect("the churning task panicked");
    assert_eq!(done, 16 * 8);
    query(&ctx, "DROP FUNCTION churn").await.unwrap();
    query(&ctx, "DROP FUNCTION sq").await.unwrap();
    // A query's partitions are torn down by DataFusion's tasks, which may drop their plan (and
    // so the function and its library) a moment after the answer reached the caller.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while loader.loaded_libraries() != 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        loader.loaded_libraries(),
        0,
        "every library is released once unused"
    );
}
