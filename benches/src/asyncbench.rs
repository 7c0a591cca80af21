//! What asynchronous functions buy and cost (issue 26), release build, one partition:
//!
//! 1. **I/O**: 2,000 rows, each a `GET` that the local HTTP server (axum, 127.0.0.1, in this
//!    process) answers after 20 ms. The example plugin's `http_get(url)` (`udf-plugins/http`,
//!    `#[udf(async)]`, one row per call) with 64 and with 256 calls in flight, against the same
//!    work through DataFusion's own async UDF path (`AsyncScalarUDFImpl` in the host, its default
//!    batching: the whole batch in one invocation) written two ways: awaiting the rows one after
//!    another (as DataFusion's documentation example does), and with the batch's rows awaited 64
//!    at a time (`buffered(64)`). Wall time of the whole query, median of the rounds; the
//!    sequential peer runs over the first 200 rows only and is scaled to 2,000 (40 s otherwise).
//!    Also `http_get` isolated: one worker process makes the calls.
//!    The server counts the requests in flight.
//! 2. **Cost per call, nothing to wait for**: 100,000 rows, one row per call: `now_double` (a C
//!    function that completes inside `start`, on the host's thread: what the host itself costs
//!    per call), `sq_async` (`udf-plugins/plain`, `#[udf(async)]`: the host, and the SDK's hop to
//!    the plugin's runtime and back), against the synchronous `sq` on the batch path. Also with
//!    1,024 rows per call.
//!
//! `cargo run --release -p udf-benches --bin asyncbench [-- --rounds N]` (default 3).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{Result, not_impl_err};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use udf_engine::{AsyncLimits, CallPath, PluginLibrary, PluginUdf};

use crate::opbench::median;
use crate::{plugin, profile_dir};

/// Rows of the I/O measurement, and the server's wait per request.
const IO_ROWS: i64 = 2000;
const LATENCY_MS: u64 = 20;
/// Rows of the sequential peer (scaled to [`IO_ROWS`]).
const SEQUENTIAL_ROWS: i64 = 200;
/// Rows of the per-call measurement.
const CALL_ROWS: i64 = 100_000;

/// What the server saw.
#[derive(Debug, Default)]
struct Seen {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Seen {
    fn take_max(&self) -> usize {
        self.max_in_flight.swap(0, SeqCst)
    }
}

struct InFlight(Arc<Seen>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// `GET /echo/TEXT?delay_ms=N`: `TEXT` after `N` ms.
async fn echo(
    axum::extract::State(seen): axum::extract::State<Arc<Seen>>,
    axum::extract::Path(text): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> String {
    let now = seen.in_flight.fetch_add(1, SeqCst) + 1;
    seen.max_in_flight.fetch_max(now, SeqCst);
    let _guard = InFlight(Arc::clone(&seen));
    let delay = query
        .as_deref()
        .and_then(|q| q.strip_prefix("delay_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    text
}

/// Starts the server; its base URL and its counters.
async fn start_server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/echo/{text}", axum::routing::get(echo))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, seen)
}

/// The peer: `GET url` through DataFusion's own async UDF path, in the host.
#[derive(Debug, PartialEq, Eq, Hash)]
struct HttpGetPeer {
    name: String,
    signature: Signature,
    /// Rows of a batch awaited at once (1: one after another).
    concurrency: usize,
}

fn peer_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    })
}

impl ScalarUDFImpl for HttpGetPeer {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> Result<ColumnarValue> {
        not_impl_err!("{} is asynchronous", self.name)
    }
}

#[async_trait]
impl AsyncScalarUDFImpl for HttpGetPeer {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let urls = args.args[0].to_array(args.number_rows)?;
        let urls = urls.as_string::<i32>();
        let get = |i: usize| {
            let url = urls.is_valid(i).then(|| urls.value(i).to_string());
            async move {
                let Some(url) = url else {
                    return Ok(None);
                };
                let text = peer_client()
                    .get(&url)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
                    .text()
                    .await
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                Ok::<_, datafusion::error::DataFusionError>(Some(text))
            }
        };
        let mut values = Vec::with_capacity(urls.len());
        if self.concurrency <= 1 {
            for i in 0..urls.len() {
                values.push(get(i).await?);
            }
        } else {
            let mut results = futures::stream::iter(0..urls.len())
                .map(get)
                .buffered(self.concurrency);
            while let Some(value) = results.next().await {
                values.push(value?);
            }
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(values))))
    }
}

fn register_peer(ctx: &SessionContext, name: &str, concurrency: usize) {
    let peer = HttpGetPeer {
        name: name.to_string(),
        signature: Signature::exact(vec![DataType::Utf8], Volatility::Volatile),
        concurrency,
    };
    ctx.register_udf(AsyncScalarUDF::new(Arc::new(peer)).into_scalar_udf());
}

/// Registers `function` of `library` as `sql`, asynchronous with `limits` (or synchronous on
/// the batch path when `None`).
fn register(
    ctx: &SessionContext,
    library: &Arc<PluginLibrary>,
    function: &str,
    sql: &str,
    limits: Option<AsyncLimits>,
) {
    let f = library.function_named(function).expect("function");
    let udf = PluginUdf::new(sql, f, Volatility::Volatile);
    let udf = match limits {
        Some(limits) => udf.with_async_limits(limits),
        None => udf.with_call_path(CallPath::Batch),
    };
    udf_engine::register_udf(ctx, udf);
}

fn session(batch: RecordBatch) -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    let schema = batch.schema();
    let rows = batch.num_rows();
    let batches = (0..rows)
        .step_by(8192)
        .map(|start| batch.slice(start, 8192.min(rows - start)))
        .collect();
    let table = MemTable::try_new(schema, vec![batches]).expect("table");
    ctx.register_table("t", Arc::new(table)).expect("register");
    ctx
}

/// Runs `sql`; its wall time and first column.
async fn timed(ctx: &SessionContext, sql: &str) -> (Duration, Vec<ArrayRef>) {
    let started = Instant::now();
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let elapsed = started.elapsed();
    (
        elapsed,
        batches.iter().map(|b| Arc::clone(b.column(0))).collect(),
    )
}

fn strings(columns: &[ArrayRef]) -> Vec<Option<String>> {
    columns
        .iter()
        .flat_map(|c| {
            let c = c.as_string::<i32>();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn ints(columns: &[ArrayRef]) -> Vec<i64> {
    columns
        .iter()
        .flat_map(|c| {
            c.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        })
        .collect()
}

/// `tests/fixtures/c/async_ops.c` built with the system's C compiler (`$CC` or `cc`), -O2.
fn c_async_ops() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let dir = profile_dir().join("asyncbench-fixtures");
    std::fs::create_dir_all(&dir).expect("create dir");
    let out = dir.join("libasync_ops.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(cc)
        .args(["-O2", "-std=c11", "-shared", "-fPIC", "-I"])
        .arg(root.join("udf-abi/include"))
        .arg(root.join("tests/fixtures/c/async_ops.c"))
        .arg("-o")
        .arg(&out)
        .arg("-lpthread")
        .status()
        .expect("run the C compiler");
    assert!(status.success(), "compiling async_ops.c failed");
    out
}

fn range(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{min:.3}–{max:.3}")
}

async fn io(rounds: usize) {
    let (base, seen) = start_server().await;
    let ids = Int64Array::from_iter_values(0..IO_ROWS);
    let urls: StringArray = (0..IO_ROWS)
        .map(|id| Some(format!("{base}/echo/{id}?delay_ms={LATENCY_MS}")))
        .collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("url", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(urls)]).expect("batch");
    let ctx = session(batch);
    let http = PluginLibrary::load(plugin("http")).expect("load the http plugin");
    let timeout = Duration::from_secs(120);
    register(
        &ctx,
        &http,
        "http_get",
        "get_64",
        Some(AsyncLimits::new(64, 1, timeout)),
    );
    register(
        &ctx,
        &http,
        "http_get",
        "get_256",
        Some(AsyncLimits::new(256, 1, timeout)),
    );
    // The same, isolated: one worker process makes the calls (pool of 1).
    let pool = udf_engine::isolation::pool_for(
        &http,
        &udf_engine::WorkerLimits {
            call_timeout: timeout,
            memory_mib: None,
            workers: Some(1),
            worker_program: None,
        },
        1,
    )
    .expect("a worker for the http plugin");
    let isolated = PluginUdf::new(
        "get_64_isolated",
        http.function_named("http_get").expect("http_get"),
        Volatility::Volatile,
    )
    .with_async_limits(AsyncLimits::new(64, 1, timeout))
    .with_worker_pool(pool);
    udf_engine::register_udf(&ctx, isolated);
    register_peer(&ctx, "df_sequential", 1);
    register_peer(&ctx, "df_buffered_64", 64);
    let want: Vec<Option<String>> = (0..IO_ROWS).map(|id| Some(id.to_string())).collect();
    let cases: [(&str, &str, i64); 5] = [
        ("udfsql `http_get`, 64 in flight", "get_64", IO_ROWS),
        (
            "udfsql `http_get`, 64 in flight, isolated (one worker process)",
            "get_64_isolated",
            IO_ROWS,
        ),
        ("udfsql `http_get`, 256 in flight", "get_256", IO_ROWS),
        (
            "DataFusion async UDF, rows one after another",
            "df_sequential",
            SEQUENTIAL_ROWS,
        ),
        (
            "DataFusion async UDF, `buffered(64)` in the batch",
            "df_buffered_64",
            IO_ROWS,
        ),
    ];
    println!(
        "I/O: {IO_ROWS} rows, each a GET answered after {LATENCY_MS} ms by a local server; wall \
         time of the query, one partition, median of {rounds} rounds (sequential peer: \
         {SEQUENTIAL_ROWS} rows, scaled to {IO_ROWS}); sequential = {IO_ROWS} × {LATENCY_MS} ms \
         = {:.1} s.",
        IO_ROWS as f64 * LATENCY_MS as f64 / 1000.0
    );
    println!();
    println!(
        "| function | wall time, s | range | × faster than sequential | most requests in flight at the server |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, function, rows) in cases {
        let sql = format!("SELECT {function}(url) FROM t WHERE id < {rows}");
        let mut times = Vec::new();
        let mut most = 0;
        for round in 0..rounds {
            seen.take_max();
            let (elapsed, columns) = timed(&ctx, &sql).await;
            most = most.max(seen.take_max());
            if round == 0 {
                assert_eq!(
                    strings(&columns),
                    want[..rows as usize],
                    "{function}'s answer"
                );
            }
            times.push(elapsed.as_secs_f64() * IO_ROWS as f64 / rows as f64);
        }
        let t = median(&times).expect("rounds");
        let sequential = IO_ROWS as f64 * LATENCY_MS as f64 / 1000.0;
        println!(
            "| {label} | {t:.3} | {} | {:.1}× | {most} |",
            range(&times),
            sequential / t
        );
    }
    println!();
}

async fn per_call(rounds: usize) {
    let x = Int64Array::from_iter_values(0..CALL_ROWS);
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(x)]).expect("batch");
    let ctx = session(batch);
    let c = PluginLibrary::load(c_async_ops()).expect("load async_ops");
    let plain = PluginLibrary::load(plugin("plain")).expect("load plain");
    let limits = |chunk| Some(AsyncLimits::new(64, chunk, Duration::from_secs(120)));
    register(&ctx, &c, "now_double", "now_1", limits(1));
    register(&ctx, &c, "now_double", "now_1024", limits(1024));
    register(&ctx, &plain, "sq_async", "sdk_1", limits(1));
    register(&ctx, &plain, "sq_async", "sdk_1024", limits(1024));
    register(&ctx, &plain, "sq", "sync_batch", None);
    let cases: [(&str, &str, usize, i64); 5] = [
        (
            "synchronous `sq`, batch path (reference)",
            "sync_batch",
            8192,
            0,
        ),
        ("C `now_double` (completes inside `start`)", "now_1", 1, 2),
        ("C `now_double`", "now_1024", 1024, 2),
        (
            "`#[udf(async)]` `sq_async` (the plugin's runtime)",
            "sdk_1",
            1,
            0,
        ),
        ("`#[udf(async)]` `sq_async`", "sdk_1024", 1024, 0),
    ];
    println!(
        "Cost per call with nothing to wait for: {CALL_ROWS} rows, 64 in flight, wall time of the \
         query per call (per row for the synchronous reference), median of {rounds} rounds, µs:"
    );
    println!();
    println!("| function | rows per call | µs per call | range | µs per row |");
    println!("|---|---:|---:|---:|---:|");
    for (label, function, chunk, factor) in cases {
        let sql = format!("SELECT {function}(x) FROM t");
        let calls = (CALL_ROWS as usize).div_ceil(chunk) as f64;
        let mut per_call = Vec::new();
        for round in 0..rounds + 1 {
            let (elapsed, columns) = timed(&ctx, &sql).await;
            if round == 0 {
                let got = ints(&columns);
                let want: Vec<i64> = (0..CALL_ROWS)
                    .map(|x| if factor == 0 { x * x } else { factor * x })
                    .collect();
                let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
                assert!(
                    got.len() == want.len() && first_wrong.is_none(),
                    "{function}'s answer: {} rows, first wrong at {first_wrong:?}",
                    got.len()
                );
                continue;
            }
            per_call.push(elapsed.as_secs_f64() * 1e6 / calls);
        }
        let t = median(&per_call).expect("rounds");
        println!(
            "| {label} | {chunk} | {t:.2} | {} | {:.3} |",
            range(&per_call),
            t * calls / CALL_ROWS as f64
        );
    }
    println!();
}

/// Runs both measurements.
pub fn main() {
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n: &usize| n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("asyncbench: --rounds takes a positive number");
                        std::process::exit(2)
                    });
            }
            _ => {
                eprintln!("usage: asyncbench [--rounds N]");
                std::process::exit(2)
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        io(rounds).await;
        per_call(rounds).await;
    });
    eprintln!(
        "asyncbench: {rounds} rounds took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
