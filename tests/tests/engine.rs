//! The engine with real libraries through dlopen: the example plugins, a C plugin built against
//! `udf_abi.h`, and deliberately broken libraries.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int32Array, Int64Array, LargeStringArray, RecordBatch,
    StringArray, StringViewArray, UInt8Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{
    LoadError, MetadataError, PluginLibrary, SessionContextExt, TypePosition, register_plugin,
};
use udf_tests::{
    EXAMPLE_PLUGINS, c_library, expect, misbehaving, plugin, query, query_error, rows, table,
};

fn ctx_with(plugins: &[&str]) -> SessionContext {
    let ctx = SessionContext::new();
    for p in plugins {
        ctx.register_plugin(plugin(p)).expect("load example plugin");
    }
    ctx
}

fn ctx_with_all() -> SessionContext {
    ctx_with(&EXAMPLE_PLUGINS)
}

#[tokio::test]
async fn seed_example_repeats_strings_and_keeps_nulls() {
    let ctx = ctx_with(&["repeat"]);
    assert_eq!(
        table(
            &ctx,
            "SELECT repeat(name, 3) AS r FROM (VALUES ('cool'), (NULL), ('')) AS t(name)"
        )
        .await,
        [
            "+--------------+",
            "| r            |",
            "+--------------+",
            "| coolcoolcool |",
            "|              |",
            "|              |",
            "+--------------+",
        ]
    );
    let batches = query(
        &ctx,
        "SELECT repeat(name, 3) AS r FROM (VALUES ('cool'), (NULL)) AS t(name)",
    )
    .await
    .unwrap();
    let r = batches[0].column(0).as_string::<i32>();
    assert!(
        r.is_valid(0) && r.is_null(1),
        "NULL in, NULL out; '' is not NULL"
    );
}

#[tokio::test]
async fn replacing_a_builtin_is_reported() {
    let ctx = SessionContext::new();
    let regs = register_plugin(&ctx, plugin("repeat")).unwrap();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].sql_name, "repeat");
    assert!(regs[0].replaced, "DataFusion has a builtin repeat");
    assert_eq!(
        regs[0].signature.to_string(),
        "repeat(String, UInt) -> String"
    );
    let regs = register_plugin(&ctx, plugin("square")).unwrap();
    assert!(!regs[0].replaced);
}

#[tokio::test]
async fn every_example_function_on_columns_and_literals() {
    let ctx = ctx_with_all();
    let sql = "SELECT square(x), safe_div(x, 2), hypot(d, 4), str_len(s), is_even(x), \
               choose(x > 1, s, 'small') \
               FROM (VALUES (1, 3.0, 'héllo'), (-3, 0.0, ''), (4, -3.0, 'ab')) AS t(x, d, s)";
    assert_eq!(
        rows(&ctx, sql).await,
        expect(&[
            &["1", "0", "5.0", "5", "false", "small"],
            &["9", "-1", "4.0", "0", "false", "small"],
            &["16", "2", "5.0", "2", "true", "ab"],
        ])
    );
    // All-literal calls: constant-folded at planning time, evaluated once.
    assert_eq!(
        rows(
            &ctx,
            "SELECT square(-7), safe_div(7, -2), hypot(3, 4), str_len('日本'), is_even(0), \
             choose(false, 'x', 'y'), repeat('ab', 0)"
        )
        .await,
        expect(&[&["49", "-3", "5.0", "2", "true", "y", ""]])
    );
}

#[tokio::test]
async fn boundary_values_cross_unchanged() {
    let ctx = ctx_with_all();
    assert_eq!(
        rows(
            &ctx,
            "SELECT square(-9223372036854775808), safe_div(9223372036854775807, 1), \
             safe_div(-9223372036854775808, 1), hypot(arrow_cast('NaN', 'Float64'), 0), \
             hypot(arrow_cast('-inf', 'Float64'), 1), hypot(-0.0, -0.0), \
             str_len(repeat('é', 100000))"
        )
        .await,
        expect(&[&[
            "0",
            "9223372036854775807",
            "-9223372036854775808",
            "NaN",
            "inf",
            "0.0",
            "100000"
        ]])
    );
    // u64::MAX reaches the plugin unchanged; repeat refuses it rather than aborting on OOM.
    let e = query_error(
        &ctx,
        "SELECT repeat('x', arrow_cast('18446744073709551615', 'UInt64'))",
    )
    .await;
    assert!(
        e.contains("repeating 1 bytes 18446744073709551615 times is too large"),
        "{e}"
    );
}

#[tokio::test]
async fn a_null_argument_skips_the_call() {
    let ctx = SessionContext::new();
    ctx.register_plugin(misbehaving("COUNT_CALLS")).unwrap();
    // `calls` returns how often it was called: NULL rows must not count.
    assert_eq!(
        rows(
            &ctx,
            "SELECT calls(x) FROM (VALUES (1), (NULL), (3), (NULL), (5)) AS t(x)"
        )
        .await,
        expect(&[&["1"], &["NULL"], &["2"], &["NULL"], &["3"]])
    );
    let ctx = ctx_with_all();
    assert_eq!(
        rows(
            &ctx,
            "SELECT choose(NULL, 'a', 'b'), safe_div(1, NULL), repeat(NULL, 2), hypot(NULL, NULL)"
        )
        .await,
        expect(&[&["NULL", "NULL", "NULL", "NULL"]])
    );
}

fn typed_table() -> (Arc<Schema>, RecordBatch) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("utf8", DataType::Utf8, true),
        Field::new("large", DataType::LargeUtf8, true),
        Field::new("view", DataType::Utf8View, true),
        Field::new("i32", DataType::Int32, true),
        Field::new("f32", DataType::Float32, true),
        Field::new("u8", DataType::UInt8, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![Some("ab"), None])),
        Arc::new(LargeStringArray::from(vec![Some("cd"), Some("e")])),
        Arc::new(StringViewArray::from(vec![
            Some("a string longer than twelve bytes"),
            Some("f"),
        ])),
        Arc::new(Int32Array::from(vec![Some(-5), Some(6)])),
        Arc::new(Float32Array::from(vec![Some(12.0), None])),
        Arc::new(UInt8Array::from(vec![Some(2), Some(3)])),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    (schema, batch)
}

#[tokio::test]
async fn argument_types_are_coerced_as_users_expect() {
    let ctx = ctx_with_all();
    let (schema, batch) = typed_table();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT repeat(utf8, 2), repeat(large, u8), repeat(view, 1), square(i32), \
             hypot(f32, i32), str_len(view), safe_div(i32, u8), is_even(u8) FROM t"
        )
        .await,
        expect(&[
            &[
                "abab",
                "cdcd",
                "a string longer than twelve bytes",
                "25",
                "13.0",
                "33",
                "-2",
                "true"
            ],
            &["NULL", "eee", "f", "36", "NULL", "1", "2", "false"],
        ])
    );
    // A Utf8View column passes through without a cast to Utf8 in the plan.
    let plan = rows(&ctx, "EXPLAIN SELECT str_len(view) FROM t").await;
    let text = format!("{plan:?}");
    assert!(text.contains("str_len(view"), "{text}");
    assert!(!text.contains("CAST(view"), "{text}");
}

#[tokio::test]
async fn refused_argument_types_and_arity_name_the_function() {
    let ctx = ctx_with_all();
    let e = query_error(&ctx, "SELECT repeat(12, 2)").await;
    assert!(
        e.contains("repeat(String, UInt) -> String: argument 1 has type Int64"),
        "{e}"
    );
    let e = query_error(&ctx, "SELECT square(1.5)").await;
    assert!(
        e.contains("square(Int) -> Int: argument 1 has type Float64"),
        "{e}"
    );
    let e = query_error(&ctx, "SELECT is_even(true)").await;
    assert!(e.contains("argument 1 has type Boolean"), "{e}");
    let e = query_error(&ctx, "SELECT choose(1, 'a', 'b')").await;
    assert!(e.contains("expected BOOLEAN"), "{e}");
    let e = query_error(&ctx, "SELECT hypot(1)").await;
    assert!(
        e.contains("hypot(Double, Double) -> Double takes 2 arguments, got 1"),
        "{e}"
    );
    // A negative count for an unsigned parameter is a cast error, not a wrapped huge number.
    let e = query_error(&ctx, "SELECT repeat(s, n) FROM (VALUES ('a', -1)) t(s, n)").await;
    assert!(e.contains("Can't cast value -1 to type UInt64"), "{e}");
}

#[tokio::test]
async fn plugin_errors_become_sql_errors_naming_the_function() {
    let ctx = ctx_with_all();
    let e = query_error(&ctx, "SELECT safe_div(x, 0) FROM (VALUES (7)) t(x)").await;
    assert!(e.contains("plugin function safe_div ("), "{e}");
    assert!(e.contains("libudf_plugin_safe_div"), "{e}");
    assert!(e.contains("division by zero: 7 / 0"), "{e}");
    let e = query_error(&ctx, "SELECT safe_div(-9223372036854775808, -1)").await;
    assert!(e.contains("integer overflow"), "{e}");
    // The session goes on after an error.
    assert_eq!(rows(&ctx, "SELECT safe_div(8, 2)").await, expect(&[&["4"]]));
}

#[tokio::test]
async fn a_string_with_a_nul_byte_is_an_error_for_v1_and_data_for_v2() {
    let ctx = ctx_with_all();
    // ABI v1 strings are NUL-terminated: an interior NUL cannot cross.
    let e = query_error(
        &ctx,
        "SELECT repeat(s, 2) FROM (VALUES (concat('a', chr(0), 'b'))) t(s)",
    )
    .await;
    assert!(e.contains("plugin function repeat"), "{e}");
    assert!(e.contains("argument 1 contains a NUL byte"), "{e}");
    // ABI v2 strings are pointer + length: the NUL is an ordinary character.
    assert_eq!(
        rows(
            &ctx,
            "SELECT str_len(s) FROM (VALUES (concat('a', chr(0), 'b'))) t(s)"
        )
        .await,
        expect(&[&["3"]])
    );
}

#[tokio::test]
async fn empty_input_gives_empty_output() {
    let ctx = ctx_with_all();
    assert!(
        rows(
            &ctx,
            "SELECT repeat(s, 2) FROM (VALUES ('a')) t(s) WHERE false"
        )
        .await
        .is_empty()
    );
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
    let empty = RecordBatch::new_empty(schema.clone());
    ctx.register_table(
        "e",
        Arc::new(MemTable::try_new(schema, vec![vec![empty]]).unwrap()),
    )
    .unwrap();
    assert!(rows(&ctx, "SELECT square(x) FROM e").await.is_empty());
}

#[tokio::test]
async fn many_batches_and_partitions_give_the_reference_results() {
    let config = SessionConfig::new()
        .with_target_partitions(4)
        .with_batch_size(1000);
    let ctx = SessionContext::new_with_config(config);
    for p in EXAMPLE_PLUGINS {
        ctx.register_plugin(plugin(p)).unwrap();
    }
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
    let mut partitions = Vec::new();
    let mut next = 0i64;
    for _ in 0..4 {
        let mut batches = Vec::new();
        for _ in 0..5 {
            let values: Vec<Option<i64>> = (0..2500)
                .map(|_| {
                    next += 1;
                    (next % 7 != 0).then_some(next - 20_000)
                })
                .collect();
            let array: ArrayRef = Arc::new(Int64Array::from(values));
            batches.push(RecordBatch::try_new(schema.clone(), vec![array]).unwrap());
        }
        partitions.push(batches);
    }
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, partitions).unwrap()),
    )
    .unwrap();
    let got = rows(
        &ctx,
        "SELECT count(*), count(square(x)), sum(square(x) - x * x),          sum(CASE WHEN is_even(x) = (x % 2 = 0) THEN 1 ELSE 0 END) FROM t",
    )
    .await;
    let non_null = (1..=50_000).filter(|n| n % 7 != 0).count();
    assert_eq!(
        got,
        expect(&[&["50000", &non_null.to_string(), "0", &non_null.to_string()]])
    );
}

/// The UDF invoked directly: all-scalar arguments give a scalar; a scalar beside an array is used
/// as it is for every row.
#[tokio::test]
async fn scalars_stay_scalars() {
    let ctx = ctx_with(&["repeat"]);
    let udf = ctx.udf("repeat").unwrap();
    let field = Arc::new(Field::new("r", DataType::Utf8, true));
    let args = |args: Vec<ColumnarValue>, number_rows| ScalarFunctionArgs {
        arg_fields: vec![
            Arc::new(Field::new("s", DataType::Utf8, true)),
            Arc::new(Field::new("n", DataType::UInt64, true)),
        ],
        args,
        number_rows,
        return_field: field.clone(),
        config_options: Arc::new(Default::default()),
    };
    let out = udf
        .invoke_with_args(args(
            vec![
                ColumnarValue::Scalar(ScalarValue::Utf8(Some("ab".into()))),
                ColumnarValue::Scalar(ScalarValue::UInt64(Some(2))),
            ],
            1000,
        ))
        .unwrap();
    match out {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(s))) => assert_eq!(s, "abab"),
        other => panic!("expected a Utf8 scalar, got {other:?}"),
    }
    let out = udf
        .invoke_with_args(args(
            vec![
                ColumnarValue::Array(Arc::new(StringArray::from(vec![
                    Some("a"),
                    None,
                    Some("c"),
                ]))),
                ColumnarValue::Scalar(ScalarValue::UInt64(Some(3))),
            ],
            3,
        ))
        .unwrap();
    let ColumnarValue::Array(array) = out else {
        panic!("expected an array")
    };
    let array = array.as_string::<i32>();
    assert_eq!(
        array.iter().collect::<Vec<_>>(),
        [Some("aaa"), None, Some("ccc")]
    );
}

#[tokio::test]
async fn the_library_stays_loaded_while_its_function_is_registered() {
    let ctx = SessionContext::new();
    // A private copy: a process holds one library per path, and the other tests of this binary
    // load the example's path concurrently.
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("libsquare_private.so");
    std::fs::copy(plugin("square"), &private).unwrap();
    let library = PluginLibrary::load(&private).unwrap();
    udf_engine::register_library(&ctx, &library);
    let weak = Arc::downgrade(&library);
    drop(library);
    assert!(
        weak.upgrade().is_some(),
        "the registered UDF holds the library"
    );
    assert_eq!(rows(&ctx, "SELECT square(12)").await, expect(&[&["144"]]));
    ctx.deregister_udf("square");
    assert!(
        weak.upgrade().is_none(),
        "deregistering releases the library"
    );
}

#[tokio::test]
async fn a_c_plugin_built_against_the_header_runs() {
    let path = c_library("c_concat", "c_plugin.c", &[]);
    let ctx = SessionContext::new();
    let regs = ctx.register_plugin(&path).unwrap();
    assert_eq!(
        regs[0].signature.to_string(),
        "c_concat(String, Bool, String) -> String"
    );
    assert_eq!(
        rows(
            &ctx,
            "SELECT c_concat(a, b, c) FROM (VALUES ('héllo', true, 'wörld'), ('a', false, 'b'), \
             (NULL, true, 'x')) t(a, b, c)"
        )
        .await,
        expect(&[&["héllo wörld"], &["ab"], &["NULL"]])
    );
    let e = query_error(&ctx, "SELECT c_concat(a, true, a) FROM (VALUES ('')) t(a)").await;
    assert!(e.contains("c_concat: both strings are empty"), "{e}");
}

fn load_error(path: std::path::PathBuf) -> LoadError {
    match PluginLibrary::load(&path) {
        Ok(lib) => panic!("{} loaded: {lib:?}", path.display()),
        Err(e) => {
            assert!(
                e.to_string()
                    .contains(&*path.file_name().unwrap().to_string_lossy()),
                "error names the library: {e}"
            );
            e
        }
    }
}

fn metadata_error(case: &str) -> MetadataError {
    match load_error(misbehaving(case)) {
        LoadError::InvalidMetadata { reason, symbol, .. } => {
            assert_eq!(symbol, "plugin_metadata");
            reason
        }
        other => panic!("{case}: expected invalid metadata, got {other}"),
    }
}

#[test]
fn malformed_metadata_is_refused_with_the_reason() {
    assert_eq!(metadata_error("NULL_NAME"), MetadataError::NullName);
    assert_eq!(metadata_error("EMPTY_NAME"), MetadataError::EmptyName);
    assert!(matches!(
        metadata_error("BAD_UTF8_NAME"),
        MetadataError::NonUtf8Name { .. }
    ));
    assert_eq!(
        metadata_error("NULL_ARG_TYPES"),
        MetadataError::NullArgTypes {
            function: "broken".into(),
            len: 2
        }
    );
    assert_eq!(
        metadata_error("TOO_MANY_ARGS"),
        MetadataError::TooManyArgs {
            function: "broken".into(),
            len: 1_000_000,
            max: 64
        }
    );
    assert_eq!(
        metadata_error("UNKNOWN_ARG_TAG"),
        MetadataError::UnknownTypeTag {
            function: "broken".into(),
            position: TypePosition::Argument(1),
            tag: 77,
            max: 4
        }
    );
    assert_eq!(
        metadata_error("UNKNOWN_RETURN_TAG"),
        MetadataError::UnknownTypeTag {
            function: "broken".into(),
            position: TypePosition::Return,
            tag: 9,
            max: 4
        }
    );
}

#[test]
fn missing_symbols_are_named() {
    for (case, symbol) in [
        ("NO_ENTRYPOINT", "plugin_entrypoint"),
        ("NO_METADATA", "plugin_metadata"),
    ] {
        match load_error(misbehaving(case)) {
            LoadError::MissingSymbol { symbol: s, .. } => assert_eq!(s, symbol),
            other => panic!("{case}: {other}"),
        }
    }
}

#[test]
fn files_that_are_not_libraries_are_refused() {
    let dir = udf_tests::fixture_dir();
    let text = dir.join("not_a_library.so");
    std::fs::write(&text, "this is not an ELF file\n").unwrap();
    assert!(matches!(load_error(text), LoadError::Open { .. }));

    let real = std::fs::read(plugin("square")).unwrap();
    let truncated = dir.join("truncated.so");
    std::fs::write(&truncated, &real[..real.len().min(300)]).unwrap();
    assert!(matches!(load_error(truncated), LoadError::Open { .. }));

    let missing = dir.join("no_such_library.so");
    assert!(matches!(load_error(missing), LoadError::NotFound { .. }));
}

#[tokio::test]
async fn misbehaving_results_are_errors_not_crashes() {
    for (case, message) in [
        (
            "WRONG_RETURN_TYPE",
            "returned a value of type Double, the function declares Int",
        ),
        (
            "WRONG_RETURN_TYPE_STRING",
            "returned a value of type String, the function declares Int",
        ),
        ("UNKNOWN_VALUE_TAG", "returned a value of type tag 12"),
        ("NULL_STRING", "returned a null string pointer"),
        ("INVALID_UTF8", "not valid UTF-8"),
        ("NULL_ERROR", "error without a message"),
        ("BAD_RESULT_TAG", "invalid PluginResult tag 5"),
        ("BAD_BOOL", "invalid Bool byte 0x07"),
    ] {
        let ctx = SessionContext::new();
        ctx.register_plugin(misbehaving(case)).unwrap();
        for sql in [
            "SELECT broken(1)",
            "SELECT broken(x) FROM (VALUES (1), (2)) t(x)",
        ] {
            let e = query_error(&ctx, sql).await;
            assert!(e.contains("plugin function broken ("), "{case}: {e}");
            assert!(e.contains(message), "{case}: {e}");
        }
    }
}
