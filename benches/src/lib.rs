//! Shared setup of the benchmarks: the data, the plugin libraries (built in release by the bench
//! itself), sessions with each variant of a function registered under its own name, and the
//! "static" versions: the same Rust functions as ordinary, statically linked ScalarUDFs; and the
//! `datafusion-ffi` peer of the plain plugin (`dffi`).
#![deny(unsafe_code)]

pub mod aggbench;
pub mod asyncbench;
#[allow(unsafe_code)] // `dlopen` of the datafusion-ffi peer: its symbols, called with their types
pub mod dffi;
pub mod distbench;
pub mod isobench;
pub mod nestedbench;
pub mod opbench;
pub mod plain;
pub mod protobench;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
    StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{CallPath, PluginLibrary, PluginUdf};

/// Rows in the benchmark table.
pub const ROWS: usize = 1_048_576;
/// Rows per batch.
pub const BATCH: usize = 8192;

/// The table's batches: `name` (5–20 random ASCII letters), `x` (Int64), `d` (Float64), built
/// once with a fixed seed, `b` (Binary): the bytes of `name` (the same buffers, no copy), and
/// `xn`: `x` with NULL in about one row of ten (where `x` ends in 3 or -3).
pub fn batches() -> &'static [RecordBatch] {
    static DATA: OnceLock<Vec<RecordBatch>> = OnceLock::new();
    DATA.get_or_init(|| {
        let schema = schema();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            // xorshift64*: deterministic, good enough for benchmark data.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..ROWS / BATCH)
            .map(|_| {
                let mut names = StringBuilder::with_capacity(BATCH, BATCH * 13);
                let mut xs = Vec::with_capacity(BATCH);
                let mut ds = Vec::with_capacity(BATCH);
                for _ in 0..BATCH {
                    let len = 5 + (next() % 16) as usize;
                    let name: String = (0..len)
                        .map(|_| (b'a' + (next() % 26) as u8) as char)
                        .collect();
                    names.append_value(name);
                    xs.push((next() % 2_000_001) as i64 - 1_000_000);
                    ds.push((next() % 1_000_000) as f64 / 1000.0);
                }
                let names = names.finish();
                let bytes = BinaryArray::from(names.clone());
                let xn: Int64Array = xs
                    .iter()
                    .map(|&x| (x % 10).abs().ne(&3).then_some(x))
                    .collect();
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(names),
                    Arc::new(Int64Array::from(xs)),
                    Arc::new(Float64Array::from(ds)),
                    Arc::new(bytes),
                    Arc::new(xn),
                ];
                RecordBatch::try_new(schema.clone(), columns).expect("batch")
            })
            .collect()
    })
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("x", DataType::Int64, false),
        Field::new("d", DataType::Float64, false),
        Field::new("b", DataType::Binary, false),
        Field::new("xn", DataType::Int64, true),
    ]))
}

/// `target/<profile>` of the running binary: a bench or test target runs from
/// `target/<profile>/deps`, a `[[bin]]` (`cargo run --bin opbench`) from `target/<profile>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("target/<profile>");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>/deps")
    } else {
        dir
    }
    .to_path_buf()
}

/// Builds the plugin libraries with the bench's profile (release) once, and returns the path of
/// the library of package `package` (`lib<package>.so`, dashes as underscores).
pub fn built(package: &str) -> PathBuf {
    let name = package;
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let profile = profile_dir();
        // Set by a parent that built them already (opbench's `--rss` children).
        if std::env::var_os("UDF_BENCH_PLUGINS_BUILT").is_some() {
            return profile;
        }
        let target = profile.parent().expect("target").to_path_buf();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        // `udf-benches` itself (its library, built already) among the packages, so that the
        // features of the dependencies the `datafusion-ffi` peer shares with it (DataFusion, tokio,
        // ...) are unified the same way as for the running binary, whose build they reuse: built
        // alone, the peer would resolve other features and compile DataFusion a second time.
        cmd.current_dir(&root)
            .args(["build", "--lib", "-p", "udf-benches", "--target-dir"])
            .arg(&target);
        if profile.file_name().is_some_and(|n| n != "debug") {
            cmd.arg("--release");
        }
        for p in [
            "square",
            "hypot",
            "is-even",
            "toolbox",
            "plain",
            "seed-square",
            "repeat",
            "str-len",
            "arrow-types",
            "http",
            "stats",
        ] {
            cmd.args(["-p", &format!("udf-plugin-{p}")]);
        }
        // The datafusion-ffi peer is no udfsql plugin: its name keeps it out of the example
        // plugin directory (`libudf_plugin_*`).
        cmd.args(["-p", "udf-bench-dffi-peer"]);
        // The worker program of isolated functions (`isobench`).
        cmd.args(["-p", "udf-engine", "--bin", "udfsql-worker"]);
        // The cluster programs (`distbench`).
        cmd.args([
            "-p",
            "udf-distributed",
            "--bin",
            "udfsql-scheduler",
            "--bin",
            "udfsql-executor",
        ]);
        assert!(
            cmd.status().expect("cargo build").success(),
            "building the plugins failed"
        );
        profile
    });
    dir.join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ))
}

/// Builds the plugin libraries (see [`built`]) and returns the path of
/// `libudf_plugin_<name>.so`.
pub fn plugin(name: &str) -> PathBuf {
    built(&format!("udf-plugin-{name}"))
}

/// A session over the benchmark table `t` (in `target_partitions` partitions, so that the scan
/// itself runs on that many threads) with `target_partitions`, and each
/// plugin function registered twice: `<f>_row` (row ABI) and `<f>_batch` (batch ABI), plus the
/// static versions `square_static`, `hypot_static`, `is_even_static` and `repeat_static`.
///
/// Also the plugins written the ordinary way (`udf-plugins/plain`): `<f>_row`, `<f>_batch` and
/// `<f>_static` for `sq`, `bang`, `rev`, `shout_plain`, `maybe_rev`, `rev_bytes` and
/// `checked_rev`; and the seed-contract (ABI v1, row entrypoint only) plugins
/// `seed_square_row` (`udf-plugins/seed-square`) and `v1_repeat_row` (`udf-plugins/repeat`), with
/// `v1_repeat_static` (the static for `seed_square_row` is `square_static`); and the
/// `datafusion-ffi` peer (`benches/dffi-peer`, see [`dffi`]): `sq_dffi`, `bang_dffi`,
/// `rev_dffi` and `shout_plain_dffi`.
pub fn session(target_partitions: usize) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(target_partitions)
        .with_batch_size(BATCH);
    let ctx = SessionContext::new_with_config(config);
    let data = batches();
    let per = data.len().div_ceil(target_partitions);
    let partitions: Vec<Vec<RecordBatch>> = data.chunks(per).map(<[RecordBatch]>::to_vec).collect();
    let table = MemTable::try_new(schema(), partitions).expect("table");
    ctx.register_table("t", Arc::new(table))
        .expect("register t");
    for (library, function, sql) in [
        ("square", "square", "square"),
        ("hypot", "hypot", "hypot"),
        ("is-even", "is_even", "is_even"),
        ("toolbox", "repeat_text", "repeat"),
    ] {
        let lib = PluginLibrary::load(plugin(library)).expect("load plugin");
        let f = lib.function_named(function).expect("function");
        for (path, suffix) in [(CallPath::Row, "row"), (CallPath::Batch, "batch")] {
            let udf = PluginUdf::new(format!("{sql}_{suffix}"), f.clone(), Volatility::Immutable)
                .with_call_path(path);
            assert_eq!(udf.call_path(), path, "{function} has both entrypoints");
            ctx.register_udf(ScalarUDF::new_from_impl(udf));
        }
    }
    ctx.register_udf(ScalarUDF::new_from_impl(Static::new(
        "square_static",
        Kind::Square,
    )));
    ctx.register_udf(ScalarUDF::new_from_impl(Static::new(
        "hypot_static",
        Kind::Hypot,
    )));
    ctx.register_udf(ScalarUDF::new_from_impl(Static::new(
        "is_even_static",
        Kind::IsEven,
    )));
    ctx.register_udf(ScalarUDF::new_from_impl(Static::new(
        "repeat_static",
        Kind::Repeat,
    )));
    register_plain(&ctx);
    dffi::register(&ctx);
    ctx
}

/// The plain, seed-contract and static registrations described at [`session`].
fn register_plain(ctx: &SessionContext) {
    let lib = PluginLibrary::load(plugin("plain")).expect("load plain plugin");
    for function in [
        "sq",
        "bang",
        "rev",
        "shout_plain",
        "maybe_rev",
        "rev_bytes",
        "checked_rev",
    ] {
        let f = lib.function_named(function).expect("plain function");
        for (path, suffix) in [(CallPath::Row, "row"), (CallPath::Batch, "batch")] {
            let udf = PluginUdf::new(
                format!("{function}_{suffix}"),
                f.clone(),
                Volatility::Immutable,
            )
            .with_call_path(path);
            assert_eq!(udf.call_path(), path, "{function} has both entrypoints");
            ctx.register_udf(ScalarUDF::new_from_impl(udf));
        }
    }
    for (library, function, sql) in [
        ("seed-square", "seed_square", "seed_square_row"),
        ("repeat", "repeat", "v1_repeat_row"),
    ] {
        let lib = PluginLibrary::load(plugin(library)).expect("load v1 plugin");
        let f = lib.function_named(function).expect("v1 function");
        let udf = PluginUdf::new(sql, f, Volatility::Immutable);
        assert_eq!(
            udf.call_path(),
            CallPath::Row,
            "{library} is a v1 (row) plugin"
        );
        ctx.register_udf(ScalarUDF::new_from_impl(udf));
    }
    for (kind, name) in plain::PlainKind::ALL {
        ctx.register_udf(ScalarUDF::new_from_impl(plain::PlainStatic::new(
            name, kind,
        )));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Square,
    Hypot,
    IsEven,
    Repeat,
}

/// The plugins' functions compiled into the host as ordinary ScalarUDFs, written the way the
/// `#[udf]` batch code runs them (vectorised for primitives, a row loop for strings): the
/// difference to the `_batch` variants is the cost of loading dynamically.
/// `repeat_static`'s bytes per row of its last batch (what `#[udf]` keeps per function).
static REPEAT_BYTES_PER_ROW: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, PartialEq, Eq, Hash)]
struct Static {
    name: String,
    kind: Kind,
    signature: Signature,
}

impl Static {
    fn new(name: &str, kind: Kind) -> Static {
        let types = match kind {
            Kind::Square | Kind::IsEven => vec![DataType::Int64],
            Kind::Hypot => vec![DataType::Float64, DataType::Float64],
            Kind::Repeat => vec![DataType::Utf8, DataType::UInt64],
        };
        Static {
            name: name.to_string(),
            kind,
            signature: Signature::exact(types, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Static {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::Square => DataType::Int64,
            Kind::Hypot => DataType::Float64,
            Kind::IsEven => DataType::Boolean,
            Kind::Repeat => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let out: ArrayRef = match self.kind {
            Kind::Square => {
                let x = arrays[0].as_primitive::<Int64Type>();
                Arc::new(x.unary::<_, Int64Type>(|v| v.wrapping_mul(v)))
            }
            Kind::Hypot => {
                let a = arrays[0].as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                let b = arrays[1].as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                Arc::new(datafusion::arrow::compute::binary::<
                    _,
                    _,
                    _,
                    datafusion::arrow::datatypes::Float64Type,
                >(a, b, f64::hypot)?)
            }
            Kind::IsEven => {
                let x = arrays[0].as_primitive::<Int64Type>();
                Arc::new(datafusion::arrow::array::BooleanArray::from_unary(x, |v| {
                    v % 2 == 0
                }))
            }
            Kind::Repeat => {
                let s: &StringArray = arrays[0].as_string::<i32>();
                let n = arrays[1].as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
                // The plugin's loop and body (toolbox `repeat_text`, with `#[udf]`'s reused
                // output buffer and its bytes-per-row sizing), linked statically.
                let per_row = match REPEAT_BYTES_PER_ROW.load(Relaxed) {
                    0 => 16,
                    n => n + n / 8 + 1,
                };
                let mut b =
                    StringBuilder::with_capacity(s.len(), (s.len() * per_row).min(16 << 20));
                let mut buf = String::new();
                for i in 0..s.len() {
                    if s.is_null(i) || n.is_null(i) {
                        b.append_null();
                    } else {
                        buf.clear();
                        let (s, count) = (s.value(i), n.value(i) as usize);
                        let len = s.len().checked_mul(count).expect("size");
                        buf.try_reserve(len).expect("size");
                        for _ in 0..count {
                            buf.push_str(s);
                        }
                        b.append_value(&buf);
                    }
                }
                if !s.is_empty() {
                    REPEAT_BYTES_PER_ROW.store(b.values_slice().len().div_ceil(s.len()), Relaxed);
                }
                Arc::new(b.finish())
            }
        };
        if out.len() != args.number_rows {
            return exec_err!("static {}: wrong length", self.name);
        }
        Ok(ColumnarValue::Array(out))
    }
}

/// `ScalarValue` of a literal, for kernel-level calls.
pub fn literal_u64(v: u64) -> ColumnarValue {
    ColumnarValue::Scalar(ScalarValue::UInt64(Some(v)))
}
