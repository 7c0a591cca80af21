//! Fixtures for udfsql's integration tests: the example plugin libraries and the `udfsql` binary
//! (built by running cargo from the test itself), C libraries compiled with the system C compiler,
//! and small query helpers.
//!
//! `cargo test --workspace` does not produce `cdylib` files, so the first test that needs one runs
//! `cargo build --workspace --lib --bins --tests --examples` into the same target directory: building the
//! test targets too makes cargo resolve the same features as `cargo test` (dev-dependencies
//! included), so the build reuses the test build's artifacts instead of compiling a second set.
#![forbid(unsafe_code)]

pub mod http_server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits inside the workspace")
        .to_path_buf()
}

/// `target/<profile>` of the running test binary (`target/debug/deps/<test>` → `target/debug`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    deps.parent().expect("deps has a parent").to_path_buf()
}

/// Runs `cargo build --workspace --lib --bins --tests --examples` once per test binary and returns
/// `target/<profile>`.
pub fn build_workspace() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let target = profile.parent().expect("target dir").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args([
                "build",
                "--workspace",
                "--lib",
                "--bins",
                "--tests",
                "--examples",
                "--target-dir",
            ])
            .arg(&target);
        if profile.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
        profile
    })
}

/// The path of the example plugin package `udf-plugin-<name>`, built if needed.
pub fn plugin(name: &str) -> PathBuf {
    let file = format!(
        "{}udf_plugin_{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let path = build_workspace().join(file);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The `udfsql` binary, built if needed.
pub fn udfsql() -> PathBuf {
    build_workspace().join(format!("udfsql{}", std::env::consts::EXE_SUFFIX))
}

/// A directory holding only the example plugin libraries (copies), for `--plugin-dir` tests.
pub fn example_plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fixture_dir().join("example-plugins");
        std::fs::create_dir_all(&dir).expect("create plugin dir");
        set_mode(&dir, 0o755);
        for name in EXAMPLE_PLUGINS {
            let src = plugin(name);
            let dst = dir.join(src.file_name().expect("file name"));
            copy_atomically(&src, &dst);
        }
        dir
    })
}

/// The example plugin packages (without the `udf-plugin-` prefix): `repeat` is the hand-written
/// v1 seed example, the others use `#[udf]` (ABI v2); `toolbox` has many functions;
/// `arrow-types` has `#[udf(vectorized)]` functions over Arrow types (ABI 2.2, batch only).
pub const EXAMPLE_PLUGINS: [&str; 10] = [
    "repeat",
    "square",
    "safe-div",
    "hypot",
    "str-len",
    "is-even",
    "choose",
    "toolbox",
    "arrow-types",
    "stats",
];

/// `target/udf-fixtures`: where tests put the libraries they make.
pub fn fixture_dir() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .expect("target dir")
        .join("udf-fixtures");
    std::fs::create_dir_all(&dir).expect("create fixture dir");
    // Plugin directories must not be writable by others, whatever the umask.
    set_mode(&dir, 0o755);
    dir
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// This process's effective user id (from `/proc/self`, which it owns).
pub fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}

/// The SHA-256 digest of `path` as printed by coreutils' `sha256sum` (an independent check of the
/// engine's digest).
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8(out.stdout).expect("utf-8")[..64].to_string()
}

fn copy_atomically(src: &Path, dst: &Path) {
    // Copy then rename, so that a library another test has loaded is never rewritten in place.
    let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(src, &tmp).expect("copy library");
    set_mode(&tmp, 0o755);
    std::fs::rename(&tmp, dst).expect("rename library");
}

/// Compiles `tests/fixtures/c/<source>` with `defines` into a shared library named `name`,
/// once per test binary, with the system C compiler (`$CC`, default `cc`).
pub fn c_library(name: &str, source: &str, defines: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let root = workspace_root();
    let out = fixture_dir().join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let mut cmd = Command::new(&cc);
    cmd.args([
        "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-std=c11",
    ])
    .arg("-I")
    .arg(root.join("udf-abi/include"));
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    cmd.arg(root.join("tests/fixtures/c").join(source))
        .arg("-o")
        .arg(&tmp);
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        output.status.success(),
        "compiling {source} with {defines:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&tmp, &out).expect("rename library");
    built.insert(name.to_string(), out.clone());
    out
}

/// A v1 library from `misbehaving.c` compiled with `-D<case>`.
pub fn misbehaving(case: &str) -> PathBuf {
    c_library(
        &format!("misbehaving_{}", case.to_lowercase()),
        "misbehaving.c",
        &[case],
    )
}

/// A v2 library from `misbehaving_v2.c` compiled with `-D<case>`.
pub fn misbehaving_v2(case: &str) -> PathBuf {
    c_library(
        &format!("misbehaving_v2_{}", case.to_lowercase()),
        "misbehaving_v2.c",
        &[case],
    )
}

/// Runs `sql` and collects the batches.
pub async fn query(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<Vec<RecordBatch>> {
    ctx.sql(sql).await?.collect().await
}

/// Runs `sql` and returns its result as the lines of an aligned table.
pub async fn table(ctx: &SessionContext, sql: &str) -> Vec<String> {
    let batches = query(ctx, sql)
        .await
        .unwrap_or_else(|e| panic!("query failed: {sql}: {e}"));
    pretty_format_batches(&batches)
        .expect("format")
        .to_string()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `sql`, expects it to fail, and returns the error message.
pub async fn query_error(ctx: &SessionContext, sql: &str) -> String {
    match query(ctx, sql).await {
        Ok(batches) => panic!("expected an error from {sql}, got {batches:?}"),
        Err(e) => e.to_string(),
    }
}

/// Runs `sql` and returns its rows, each value formatted as text (`NULL` for SQL NULL).
pub async fn rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
    let batches = query(ctx, sql)
        .await
        .unwrap_or_else(|e| panic!("query failed: {sql}: {e}"));
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in &batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for row in 0..batch.num_rows() {
            out.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect(),
            );
        }
    }
    out
}

/// `rows` for literal expectations: `vec![vec!["a", "1"]]` style.
pub fn expect(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| r.iter().map(|v| v.to_string()).collect())
        .collect()
}

/// An ABI v2 library from `faulty.c` compiled with `-D<case>` (`NULL_WRITE`, `ABORT`, ...):
/// `fault(BIGINT) -> BIGINT` misbehaves as the case says, `ok(BIGINT) -> BIGINT` returns x + 1.
pub fn faulty(case: &str) -> PathBuf {
    c_library(
        &format!("faulty_{}", case.to_lowercase()),
        "faulty.c",
        &[case],
    )
}

/// The `udfsql-worker` binary (isolated plugin functions run in it), built if needed.
pub fn udfsql_worker() -> PathBuf {
    build_workspace().join(format!("udfsql-worker{}", std::env::consts::EXE_SUFFIX))
}

/// The HTTP service started on 127.0.0.1:0 inside the test process, stopped with [`stop`].
///
/// [`stop`]: TestServer::stop
#[derive(Debug)]
pub struct TestServer {
    addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// Starts the service with `config`.
    pub async fn start(config: udf_service::Config) -> TestServer {
        let state = udf_service::AppState::new(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(udf_service::serve(
            listener,
            udf_service::router(state),
            async move {
                // The sender is dropped or sends: either way, shut down.
                rx.await.ok();
            },
        ));
        TestServer {
            addr,
            shutdown: Some(tx),
            task,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Shuts down gracefully (within 10 s) and checks the server ended without an error.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The server may have stopped already; then there is no receiver, which is fine.
            tx.send(()).ok();
        }
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.task)
            .await
            .expect("graceful shutdown finishes")
            .unwrap();
        result.unwrap();
    }
}
