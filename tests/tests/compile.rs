//! Functions written in SQL: `CREATE FUNCTION ... LANGUAGE rust AS $$ body $$` compiled with this
//! machine's cargo (offline, release, against the workspace's `udf-abi`) into a cache shared by
//! the test run (`target/udf-fixtures/compiled`), loaded pinned and called from SQL.
//!
//! One test, in order: the first compilation builds the SDK's dependencies into the shared
//! target directory (a minute or two), and the time-limit case needs them built already.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use udf_engine::PluginLoader;
use udf_engine::compile::{CompileError, CompileOptions, RustFunction, compile};
use udf_tests::{expect, query, query_error, rows};

fn options() -> CompileOptions {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../udf-abi");
    let cache = udf_tests::fixture_dir().join("compiled");
    let mut options = CompileOptions::new(std::fs::canonicalize(sdk).unwrap(), cache);
    options.offline = true;
    options
}

fn session(options: Option<CompileOptions>) -> SessionContext {
    let ctx = SessionContext::new();
    let mut loader = PluginLoader::new();
    if let Some(options) = options {
        loader = loader.with_compile(options);
    }
    udf_engine::install(&ctx, Arc::new(loader)).unwrap();
    ctx
}

/// A string no earlier run compiled, so that a body containing it is compiled now.
fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}_{}", std::process::id(), t.as_nanos())
}

const TWICE: &str = "CREATE FUNCTION twice_text(s VARCHAR, n BIGINT) RETURNS VARCHAR LANGUAGE rust \
                     AS $$\n    let mut out = String::new();\n    for _ in 0..n * 2 {\n        \
                     out.push_str(s);\n    }\n    out\n$$";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_written_in_sql_compile_load_and_cache() {
    // Off unless enabled, with the reason and the flag.
    let off = session(None);
    let e = query_error(&off, TWICE).await;
    assert!(
        e.contains("twice_text") && e.contains("--allow-compile"),
        "{e}"
    );

    // A scalar function over its declared parameters; NULL in, NULL out.
    let ctx = session(Some(options()));
    query(&ctx, TWICE).await.unwrap();
    assert_eq!(
        rows(&ctx, "SELECT twice_text('ab', 2), twice_text(NULL, 2)").await,
        expect(&[&["abababab", "NULL"]])
    );
    let listed = rows(
        &ctx,
        "SELECT name, signature, library_function FROM plugin_functions",
    )
    .await;
    assert_eq!(
        listed,
        expect(&[&[
            "twice_text",
            "twice_text(String, Int) -> String",
            "twice_text"
        ]])
    );
    let library = rows(&ctx, "SELECT library FROM plugin_functions").await[0][0].clone();
    assert!(
        library.starts_with(options().cache_dir.to_str().unwrap()),
        "{library}"
    );

    // A fallible function written whole: its error names it; a NULL-taking one.
    query(
        &ctx,
        "CREATE FUNCTION safe_div(a BIGINT, b BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\n\
         fn safe_div(a: i64, b: i64) -> Result<i64, String> {\n    \
         a.checked_div(b).ok_or_else(|| format!(\"cannot divide {a} by {b}\"))\n}\n$$",
    )
    .await
    .unwrap();
    assert_eq!(rows(&ctx, "SELECT safe_div(7, 2)").await, expect(&[&["3"]]));
    let e = query_error(&ctx, "SELECT safe_div(7, 0)").await;
    assert!(
        e.contains("safe_div") && e.contains("cannot divide 7 by 0"),
        "{e}"
    );
    query(
        &ctx,
        "CREATE FUNCTION or_zero(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\n\
         fn or_zero(x: Option<i64>) -> i64 { x.unwrap_or(0) }\n$$",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT or_zero(NULL), or_zero(5)").await,
        expect(&[&["0", "5"]])
    );
    // A dependency declared in the body (itoa is in the workspace's lock file, so offline).
    query(
        &ctx,
        "CREATE FUNCTION fmt_int(x BIGINT) RETURNS VARCHAR LANGUAGE rust AS $$\n\
         /* [dependencies]\nitoa = \"1\"\n*/\n\
         let mut buffer = itoa::Buffer::new();\nbuffer.format(x).to_string()\n$$",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT fmt_int(-12345)").await,
        expect(&[&["-12345"]])
    );
    // Arrow types: a vectorized function over arrow-rs arrays, DECIMAL(12,2) in, DECIMAL(13,2)
    // out, written whole with its imports.
    query(
        &ctx,
        "CREATE FUNCTION cents_sql(price DECIMAL(12,2), cents BIGINT) RETURNS DECIMAL(13,2) \
         LANGUAGE rust AS $$\n\
         use udf_abi::arrow_array::{Decimal128Array, Int64Array};\n\
         #[udf(vectorized, returns = \"d:13,2\")]\n\
         fn cents_sql(#[arrow(\"d:12,2\")] price: &Decimal128Array, cents: &Int64Array) \
         -> Result<Decimal128Array, String> {\n\
             price.iter().zip(cents.iter())\n\
                 .map(|(p, c)| Some(p? + i128::from(c?)))\n\
                 .collect::<Decimal128Array>()\n\
                 .with_precision_and_scale(13, 2).map_err(|e| e.to_string())\n\
         }\n$$",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT cents_sql(CAST(12.34 AS DECIMAL(12,2)), 66), \
             cents_sql(CAST(NULL AS DECIMAL(12,2)), 1), arrow_typeof(cents_sql(1.00, 1))"
        )
        .await,
        expect(&[&["13.00", "NULL", "Decimal128(13, 2)"]])
    );

    // Option lines at the top of the body: `#isolation=process` evaluates the compiled
    // function in worker processes. One that aborts kills its worker only: the query fails,
    // the session answers on.
    query(
        &ctx,
        "CREATE FUNCTION fragile(x BIGINT) RETURNS BIGINT VOLATILE LANGUAGE rust AS $$\n\
         #isolation=process\n\
         if x < 0 { std::process::abort() }\n\
         x + 100\n$$",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT fragile(1), isolation, language, volatility FROM plugin_functions \
             WHERE name = 'fragile'"
        )
        .await,
        expect(&[&["101", "process", "rust", "volatile"]])
    );
    let e = query_error(&ctx, "SELECT fragile(-1)").await;
    assert!(e.contains("fragile") && e.contains("worker"), "{e}");
    assert_eq!(rows(&ctx, "SELECT fragile(2)").await, expect(&[&["102"]]));
    assert_eq!(
        rows(
            &ctx,
            "SELECT name, language FROM plugin_functions WHERE name IN ('fmt_int', 'or_zero') \
             ORDER BY name"
        )
        .await,
        expect(&[&["fmt_int", "rust"], &["or_zero", "rust"]])
    );
    // An option that is not one, or a library's (a digest), is refused with the line; errors
    // below option lines are at the body's real lines.
    let pin = format!("#sha256={}", "ab".repeat(32));
    for (option, part) in [
        ("#isolation=maybe", "isolation=maybe"),
        (pin.as_str(), "only options"),
        ("#isolation=none#isolation=process", "given twice"),
    ] {
        let e = query_error(
            &ctx,
            &format!(
                "CREATE FUNCTION opt(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\n{option}\nx $$"
            ),
        )
        .await;
        assert!(
            e.contains("opt") && e.contains(option) && e.contains(part),
            "{option}: {e}"
        );
    }
    let e = query_error(
        &ctx,
        "CREATE FUNCTION opt(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\n#isolation=none\n\n  x * \"a\" $$",
    )
    .await;
    assert!(e.contains("body line 4, column 5"), "{e}");

    // A declared type that differs from the function written whole: refused at load.
    let e = query_error(
        &ctx,
        "CREATE FUNCTION wrong(x VARCHAR) RETURNS BIGINT LANGUAGE rust AS $$\n\
         fn wrong(x: i64) -> i64 { x }\n$$",
    )
    .await;
    assert!(e.contains("wrong") && e.contains("declared"), "{e}");

    // A compile error at the body's line and column, with rustc's message.
    let e = query_error(
        &ctx,
        "CREATE FUNCTION broken(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$\n    let y = 1;\n    x + \"a\"\n$$",
    )
    .await;
    assert!(
        e.contains("broken") && e.contains("does not compile"),
        "{e}"
    );
    assert!(e.contains("body line 3, column"), "{e}");
    assert!(e.contains("E0277"), "{e}");
    // Through the engine's statement path (the shell's), also at the statement's line and
    // column: the body starts after `$$` on line 2 here.
    let e = udf_engine::sql(
        &ctx,
        "CREATE FUNCTION broken2(x BIGINT)\nRETURNS BIGINT LANGUAGE rust AS $$ let y: i64 = \"no\";\n    x + y\n$$",
    )
    .await
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("line 2, column ") && e.contains("of the statement (body line 1, column "),
        "{e}"
    );

    // OR REPLACE with another body: the new code answers (a new library file, no stale image).
    query(
        &ctx,
        "CREATE OR REPLACE FUNCTION twice_text(s VARCHAR, n BIGINT) RETURNS VARCHAR LANGUAGE rust \
         AS $$ format!(\"{s}:{n}\") $$",
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT twice_text('ab', 2)").await,
        expect(&[&["ab:2"]])
    );
    let replaced = rows(
        &ctx,
        "SELECT library FROM plugin_functions WHERE name = 'twice_text'",
    )
    .await;
    assert_ne!(replaced[0][0], library);
    query(&ctx, "DROP FUNCTION twice_text").await.unwrap();
    assert!(
        query_error(&ctx, "SELECT twice_text('a', 1)")
            .await
            .contains("twice_text")
    );

    // The cache survives a new session (a restart): with a cargo that cannot run, the same
    // statement still succeeds, so no build ran.
    let mut no_cargo = options();
    no_cargo.cargo = PathBuf::from("/bin/false");
    let restarted = session(Some(no_cargo.clone()));
    query(&restarted, TWICE).await.unwrap();
    assert_eq!(
        rows(&restarted, "SELECT twice_text('x', 1)").await,
        expect(&[&["xx"]])
    );
    // ... and a body not in the cache does need it.
    let e = query_error(
        &restarted,
        &format!(
            "CREATE FUNCTION fresh(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x /* {} */ $$",
            nonce()
        ),
    )
    .await;
    assert!(
        e.contains("fresh") && e.contains("cargo build failed"),
        "{e}"
    );

    // Concurrent compilations of one new body: one build, both get the library.
    let function = RustFunction {
        name: "plus_one".into(),
        args: vec![("x".into(), DataType::Int64)],
        return_type: DataType::Int64,
        body: format!("x + 1 // {}", nonce()),
        body_at: None,
        skipped_lines: 0,
    };
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let function = function.clone();
            std::thread::spawn(move || compile(&options(), &function).unwrap())
        })
        .collect();
    let compiled: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(compiled[0].library, compiled[1].library);
    let built = compiled.iter().filter(|c| !c.cached).count();
    assert_eq!(built, 1, "{compiled:?}");

    // A body the compiler does not finish is stopped at the time limit.
    let mut short = options();
    short.time_limit = Duration::from_secs(5);
    let endless = RustFunction {
        name: "endless".into(),
        args: vec![("x".into(), DataType::Int64)],
        return_type: DataType::Int64,
        body: format!(
            "#[allow(long_running_const_eval)]\nconst N: u64 = {{ let mut i = 0u64; loop {{ i = i.wrapping_add(1); if i == u64::MAX {{ break i; }} }} }};\n\
             #[udf]\nfn endless(x: i64) -> i64 {{ x + N as i64 }} // {}",
            nonce()
        ),
        body_at: None,
        skipped_lines: 0,
    };
    let started = Instant::now();
    match compile(&short, &endless) {
        Err(CompileError::TimedOut { function, limit }) => {
            assert_eq!(function, "endless");
            assert_eq!(limit, Duration::from_secs(5));
        }
        other => panic!("expected the time limit, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}
