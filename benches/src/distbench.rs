//! Local execution against Apache Ballista on this machine: a real `udfsql-scheduler` and two
//! `udfsql-executor` processes (one task slot each) on 127.0.0.1, and the same queries in a local
//! session with the same plugins, over the same Parquet files.
//!
//! Per query: the median wall time (`ctx.sql(..).collect()`, plan included) of `--rounds` runs
//! after one warm-up, locally (2 partitions) and through Ballista (the client plans with 2
//! partitions; the scan has one partition per file), and their ratio. Answers are compared, so a
//! distributed answer that differs fails the benchmark. The queries: plugin functions in a filter
//! and an aggregate, the same work with builtins (what Ballista costs without plugins), a
//! `GROUP BY` on a plugin expression (a shuffle between executors), the v1 row path, and a
//! one-row query (the fixed cost of a distributed job).
//!
//! `cargo run --release -p udf-benches --bin distbench [-- --rounds N --files F --rows R]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_distributed::{ExecutorSpec, LocalCluster};
use udf_engine::PluginLoader;

use crate::opbench::median;
use crate::{built, plugin, profile_dir};

/// The queries, with a label for the table.
const QUERIES: [(&str, &str); 6] = [
    (
        "plugins: filter + aggregate (`is_even`, `square`)",
        "SELECT count(*) AS n, sum(square(x)) AS s FROM p WHERE is_even(x)",
    ),
    (
        "builtins: the same work (`x % 2 = 0`, `x * x`)",
        "SELECT count(*) AS n, sum(x * x) AS s FROM p WHERE x % 2 = 0",
    ),
    (
        "plugin `GROUP BY shout(name)` (shuffle)",
        "SELECT shout(name) AS s, count(*) AS n FROM p GROUP BY shout(name) ORDER BY n DESC, s LIMIT 3",
    ),
    (
        "builtin `GROUP BY upper(name)` (shuffle)",
        "SELECT upper(name) AS s, count(*) AS n FROM p GROUP BY upper(name) ORDER BY n DESC, s LIMIT 3",
    ),
    (
        "v1 row path: `sum(str_len(repeat(name, 3)))`",
        "SELECT sum(str_len(repeat(name, 3))) AS total FROM p",
    ),
    (
        "one row: `square(x)` of a 1-row table",
        "SELECT square(x) FROM one",
    ),
];

struct Options {
    rounds: usize,
    files: usize,
    rows: usize,
}

fn options() -> Options {
    let mut o = Options {
        rounds: 7,
        files: 8,
        rows: 250_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--rounds" => o.rounds = value(),
            "--files" => o.files = value(),
            "--rows" => o.rows = value(),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o
}

/// The scheduler and two executors with one slot each, each executor with `plugins` copied into
/// its own directory.
fn cluster(root: &Path, plugins: &Path) -> LocalCluster {
    let executors: Vec<ExecutorSpec> = ["exec-a", "exec-b"]
        .iter()
        .map(|id| ExecutorSpec {
            id: id.to_string(),
            plugin_dir: copy_dir(plugins, &root.join(format!("{id}-plugins"))),
            vcores: 1,
        })
        .collect();
    LocalCluster::start(&profile_dir(), root, &executors).unwrap_or_else(|e| panic!("{e:#}"))
}

fn copy_dir(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
    to.to_path_buf()
}

async fn run(ctx: &SessionContext, sql: &str) -> (f64, String) {
    let start = Instant::now();
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let ms = start.elapsed().as_secs_f64() * 1e3;
    (
        ms,
        pretty_format_batches(&batches).expect("format").to_string(),
    )
}

async fn prepare(ctx: &SessionContext, loader: &PluginLoader, plugins: &Path, data: &Path) {
    for path in udf_engine::trusted_libraries_in(plugins).expect("plugins") {
        udf_engine::register_library(ctx, &loader.load(&path).expect("load"));
    }
    for sql in [
        format!(
            "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}/'",
            data.join("p").display()
        ),
        format!(
            "CREATE EXTERNAL TABLE one STORED AS PARQUET LOCATION '{}/'",
            data.join("one").display()
        ),
    ] {
        ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    }
}

async fn write_data(data: &Path, o: &Options) {
    let ctx = SessionContext::new();
    for file in 0..o.files {
        let (from, to) = (file * o.rows, (file + 1) * o.rows);
        let sql = format!(
            "COPY (SELECT concat('name', CAST(v % 1000 AS VARCHAR)) AS name, CAST(v AS BIGINT) AS x \
             FROM (SELECT unnest(range({from}, {to})) AS v)) TO '{}/part{file}.parquet' STORED AS PARQUET",
            data.join("p").display()
        );
        ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    }
    let sql = format!(
        "COPY (SELECT CAST(7 AS BIGINT) AS x) TO '{}/one.parquet' STORED AS PARQUET",
        data.join("one").display()
    );
    ctx.sql(&sql).await.unwrap().collect().await.unwrap();
}

/// Runs the benchmark and prints a Markdown table.
pub fn main() {
    let o = options();
    // Builds the plugins and the cluster programs with this profile.
    let plugins_built = [
        plugin("square"),
        plugin("is-even"),
        plugin("toolbox"),
        plugin("repeat"),
        built("udf-plugin-str-len"),
    ];
    let root = std::env::temp_dir().join(format!("udfsql-distbench-{}", std::process::id()));
    std::fs::create_dir_all(root.join("plugins")).expect("root");
    for lib in &plugins_built {
        std::fs::copy(
            lib,
            root.join("plugins").join(lib.file_name().expect("name")),
        )
        .expect("copy plugin");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        write_data(&root.join("data"), &o).await;
        let cluster = cluster(&root, &root.join("plugins"));
        let url = cluster.url.clone();
        let config = || SessionConfig::new().with_target_partitions(2);
        let loader = Arc::new(
            PluginLoader::new()
                .with_plugin_dir(root.join("plugins"))
                .expect("plugin dir"),
        );
        let local = SessionContext::new_with_config(config());
        prepare(&local, &loader, &root.join("plugins"), &root.join("data")).await;
        let remote = udf_distributed::connect(&url, config(), Arc::clone(&loader))
            .await
            .expect("connect");
        prepare(&remote, &loader, &root.join("plugins"), &root.join("data")).await;

        println!(
            "{} files x {} rows ({} rows), {} rounds; Ballista: 1 scheduler + 2 executors x 1 slot on this machine\n",
            o.files,
            o.rows,
            o.files * o.rows,
            o.rounds
        );
        println!("| query | local ms | Ballista ms | Ballista / local | Ballista - local ms |");
        println!("|---|---:|---:|---:|---:|");
        for (label, sql) in QUERIES {
            let (_, local_answer) = run(&local, sql).await;
            let (_, remote_answer) = run(&remote, sql).await;
            assert_eq!(remote_answer, local_answer, "{sql}");
            let (mut l, mut r) = (Vec::new(), Vec::new());
            for _ in 0..o.rounds {
                l.push(run(&local, sql).await.0);
                r.push(run(&remote, sql).await.0);
            }
            let (l, r) = (median(&l).expect("rounds"), median(&r).expect("rounds"));
            println!(
                "| {label} | {l:.1} | {r:.1} | {:.2} | {:+.1} |",
                r / l,
                r - l
            );
        }
        drop(remote);
        for (name, code) in cluster.shutdown().expect("shutdown") {
            assert_eq!(code, Some(0), "{name} exit status");
        }
    });
    std::fs::remove_dir_all(&root).ok();
}
