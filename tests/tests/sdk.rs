//! ABI v2 and the `#[udf]` SDK: every supported type through SQL, NULL-taking and NULL-returning
//! functions, errors and panics, volatility, multi-function libraries, a C plugin written against
//! the v2 header, and libraries that get the v2 contract wrong.

use std::sync::Arc;

use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{Abi, LoadError, MetadataError, PluginLibrary, PluginLoader, SessionContextExt};
use udf_tests::{
    c_library, example_plugin_dir, expect, misbehaving_v2, plugin, query, query_error, rows,
};

fn toolbox() -> SessionContext {
    let ctx = SessionContext::new();
    ctx.register_plugin(plugin("toolbox")).unwrap();
    ctx
}

#[test]
fn one_library_exports_every_udf_function() {
    let library = PluginLibrary::load(plugin("toolbox")).unwrap();
    assert_eq!(
        library.abi(),
        Abi::V2 {
            minor: udf_abi::v2::ABI_MINOR
        }
    );
    let mut names: Vec<&str> = library
        .functions()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "add_days",
            "add_i32",
            "add_seconds",
            "boom",
            "byte_len",
            "coalesce_len",
            "describe5",
            "epoch_micros",
            "half_f32",
            "hex_bytes",
            "iso_weekday",
            "jitter",
            "jitter_sum",
            "negate",
            "next_id",
            "null_if_empty",
            "repeat_text",
            "reverse_bytes",
            "shout",
            "strict_probe",
            "strict_probe_odd",
            "strict_probe_sentinel_calls",
            "strict_probe_sum",
            "utf8_len",
            "year_of"
        ]
    );
    let sig = |n: &str| {
        library
            .functions()
            .iter()
            .find(|f| f.name == n)
            .unwrap()
            .to_string()
    };
    assert_eq!(sig("add_days"), "add_days(Date, Int32) -> Date");
    assert_eq!(sig("coalesce_len"), "coalesce_len(String?) -> Int?");
    assert_eq!(sig("null_if_empty"), "null_if_empty(String) -> String?");
    assert_eq!(sig("reverse_bytes"), "reverse_bytes(Binary) -> Binary");
    assert_eq!(
        sig("add_seconds"),
        "add_seconds(Timestamp, Int) -> Timestamp"
    );
    assert_eq!(sig("half_f32"), "half_f32(Float32) -> Float32");
}

#[tokio::test]
async fn every_type_in_and_out() {
    let ctx = toolbox();
    assert_eq!(
        rows(
            &ctx,
            "SELECT add_i32(2147483646, 1), half_f32(arrow_cast(3, 'Float32')), negate(false), \
             byte_len(X'00ff10'), hex_bytes(reverse_bytes(X'0a0b0c')), shout('héllo'), utf8_len('é')"
        )
        .await,
        expect(&[&["2147483647", "1.5", "true", "3", "0c0b0a", "HÉLLO!", "2"]])
    );
    assert_eq!(
        rows(
            &ctx,
            "SELECT add_days(DATE '2024-02-28', 1), add_days(DATE '1970-01-01', -1), \
             iso_weekday(DATE '2026-11-24'), year_of(DATE '1600-02-29'), \
             add_seconds(TIMESTAMP '1969-12-31 23:59:59', 2), epoch_micros(TIMESTAMP '1970-01-01 00:00:01.5')"
        )
        .await,
        expect(&[&[
            "2024-02-29",
            "1969-12-31",
            "2",
            "1600",
            "1970-01-01T00:00:01Z",
            "1500000"
        ]])
    );
    // Arrow types of the results.
    assert_eq!(
        rows(
            &ctx,
            "SELECT arrow_typeof(add_i32(1, 1)), arrow_typeof(half_f32(1)), arrow_typeof(reverse_bytes(X'00')), \
             arrow_typeof(add_days(DATE '2000-01-01', 1)), arrow_typeof(add_seconds(TIMESTAMP '2000-01-01 00:00:00', 1))"
        )
        .await,
        expect(&[&["Int32", "Float32", "Binary", "Date32", "Timestamp(µs, \"UTC\")"]])
    );
    // Columns of every type, many rows.
    assert_eq!(
        rows(
            &ctx,
            "SELECT sum(add_i32(arrow_cast(value, 'Int32'), 1)), count(DISTINCT hex_bytes(reverse_bytes(arrow_cast(arrow_cast(value, 'Utf8'), 'Binary')))), \
             max(add_days(arrow_cast(arrow_cast(value, 'Int32'), 'Date32'), 1)) FROM generate_series(1, 3000)"
        )
        .await,
        expect(&[&["4504500", "3000", "1978-03-21"]])
    );
}

/// A function of five arguments, more than the host keeps inline for a batch call: its arrays,
/// flags and schemas (the declared ones, and copies when a string column comes as `Utf8View`)
/// go on the heap. Answers with NULLs in STRICT and NULL-taking arguments, with a constant, and
/// with the string in either layout.
#[tokio::test]
async fn five_arguments_cross_as_any_other_call() {
    let ctx = toolbox();
    query(
        &ctx,
        "CREATE TABLE five (a BIGINT, b DOUBLE, s VARCHAR, d INT, e BIGINT) AS VALUES \
         (1, 0.5, 'x', 7, 10), (2, 1.5, 'yé', 8, NULL), (NULL, 2.5, 'z', 9, 11), (4, 3.5, NULL, 10, 12)",
    )
    .await
    .unwrap();
    let expected = expect(&[&["1|0.5|x|7|10"], &["2|1.5|yé|8|-"], &["NULL"], &["NULL"]]);
    for s in [
        "s",
        "arrow_cast(s, 'Utf8View')",
        "arrow_cast(s, 'LargeUtf8')",
    ] {
        let sql = format!("SELECT describe5(a, b, {s}, d, e) FROM five ORDER BY b");
        assert_eq!(rows(&ctx, &sql).await, expected, "{s}");
    }
    assert_eq!(
        rows(
            &ctx,
            "SELECT describe5(a, 9.25, 'k', d, NULL) FROM five WHERE a = 4"
        )
        .await,
        expect(&[&["4|9.25|k|10|-"]])
    );
}

#[tokio::test]
async fn option_arguments_see_nulls_and_option_results_may_be_null() {
    let ctx = toolbox();
    assert_eq!(
        rows(
            &ctx,
            "SELECT coalesce_len(s), null_if_empty(s), shout(s) FROM (VALUES ('ab'), (''), (NULL)) t(s)"
        )
        .await,
        expect(&[
            &["2", "ab", "AB!"],
            &["NULL", "NULL", "!"],
            // coalesce_len takes NULL (-1); the STRICT functions give NULL without a call.
            &["-1", "NULL", "NULL"],
        ])
    );
}

#[tokio::test]
async fn errors_and_panics_are_sql_errors_with_their_messages() {
    let ctx = toolbox();
    let e = query_error(&ctx, "SELECT add_i32(x, 1) FROM (VALUES (2147483647)) t(x)").await;
    assert!(e.contains("plugin function add_i32"), "{e}");
    assert!(e.contains("integer overflow: 2147483647 + 1"), "{e}");
    let e = query_error(&ctx, "SELECT boom(s) FROM (VALUES ('kaboom')) t(s)").await;
    assert!(e.contains("plugin function boom"), "{e}");
    assert!(e.contains("panicked: boom: kaboom"), "{e}");
    assert!(
        e.contains("toolbox/src/lib.rs"),
        "the panic location is kept: {e}"
    );
    // The library is still usable after a panic.
    assert_eq!(rows(&ctx, "SELECT add_i32(1, 2)").await, expect(&[&["3"]]));
}

#[tokio::test]
async fn volatile_functions_are_not_folded() {
    let ctx = toolbox();
    let plan = rows(&ctx, "EXPLAIN SELECT next_id()").await;
    assert!(format!("{plan:?}").contains("next_id()"), "{plan:?}");
    let ids = rows(&ctx, "SELECT next_id() AS id FROM generate_series(1, 5)").await;
    let mut ids: Vec<String> = ids.into_iter().map(|r| r[0].clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "a new value per row: {ids:?}");
    // An immutable function with constant arguments is folded into a literal.
    let plan = rows(&ctx, "EXPLAIN SELECT add_i32(1, 2)").await;
    assert!(
        format!("{plan:?}").contains("Projection: Int32(3) AS"),
        "{plan:?}"
    );
}

#[tokio::test]
async fn v1_and_v2_libraries_load_side_by_side() {
    let ctx = SessionContext::new();
    udf_engine::install(&ctx, Arc::new(PluginLoader::new())).unwrap();
    ctx.register_plugin(plugin("repeat")).unwrap();
    ctx.register_plugin(plugin("square")).unwrap();
    assert_eq!(
        rows(&ctx, "SELECT name, abi FROM plugin_functions ORDER BY name").await,
        expect(&[
            &["repeat", "v1"],
            &["square", &format!("v2.{}", udf_abi::v2::ABI_MINOR)]
        ])
    );
    assert_eq!(
        rows(&ctx, "SELECT repeat('ab', square(2))").await,
        expect(&[&["abababab"]])
    );
}

#[tokio::test]
async fn ddl_picks_one_function_of_a_library() {
    let ctx = SessionContext::new_with_config(SessionConfig::new());
    let loader = PluginLoader::new()
        .with_plugin_dir(example_plugin_dir())
        .unwrap();
    udf_engine::install(&ctx, Arc::new(loader)).unwrap();
    query(
        &ctx,
        "CREATE FUNCTION next_day(DATE, INT) RETURNS DATE LANGUAGE plugin AS 'libudf_plugin_toolbox.so#add_days'",
    )
    .await
    .unwrap();
    // Without `#`, the SQL name picks the function of the same name.
    query(&ctx, "CREATE FUNCTION shout(VARCHAR) RETURNS VARCHAR LANGUAGE plugin AS 'libudf_plugin_toolbox.so'")
        .await
        .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT next_day(DATE '2024-12-31', 1), shout('a')").await,
        expect(&[&["2025-01-01", "A!"]])
    );
    assert_eq!(
        rows(
            &ctx,
            "SELECT name, library_function FROM plugin_functions ORDER BY name"
        )
        .await,
        expect(&[&["next_day", "add_days"], &["shout", "shout"]])
    );
    let e = query_error(
        &ctx,
        "CREATE FUNCTION nope(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_toolbox.so'",
    )
    .await;
    assert!(
        e.contains("has no function named nope (pick one with AS 'library#function')"),
        "{e}"
    );
    assert!(
        e.contains("add_days(Date, Int32) -> Date"),
        "the error lists what there is: {e}"
    );
    let e = query_error(&ctx, "CREATE FUNCTION f(DATE) RETURNS DATE LANGUAGE plugin AS 'libudf_plugin_toolbox.so#add_days'").await;
    assert!(e.contains("provides add_days(Date, Int32) -> Date"), "{e}");
    // Binary and timestamp declarations.
    query(&ctx, "CREATE FUNCTION rb(BYTEA) RETURNS BYTEA LANGUAGE plugin AS 'libudf_plugin_toolbox.so#reverse_bytes'")
        .await
        .unwrap();
    query(&ctx, "CREATE FUNCTION later(TIMESTAMP, BIGINT) RETURNS TIMESTAMP LANGUAGE plugin AS 'libudf_plugin_toolbox.so#add_seconds'")
        .await
        .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT rb(X'0102'), later(TIMESTAMP '2000-01-01 00:00:00', 60)"
        )
        .await,
        expect(&[&["0201", "2000-01-01T00:01:00Z"]])
    );
    // Declared volatility comes from the library unless the statement says otherwise.
    query(&ctx, "CREATE FUNCTION nid() RETURNS BIGINT UNSIGNED LANGUAGE plugin AS 'libudf_plugin_toolbox.so#next_id'")
        .await
        .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT volatility FROM plugin_functions WHERE name = 'nid'"
        )
        .await,
        expect(&[&["volatile"]])
    );
}

#[tokio::test]
async fn a_c_plugin_against_the_v2_header() {
    let ctx = SessionContext::new();
    let regs = ctx
        .register_plugin(c_library("c_plugin_v2", "c_plugin_v2.c", &[]))
        .unwrap();
    let sigs: Vec<String> = regs.iter().map(|r| r.signature.to_string()).collect();
    assert_eq!(
        sigs,
        [
            "c_clamp(Int, Int, Int) -> Int",
            "c_upper(String?) -> String?"
        ]
    );
    assert_eq!(
        rows(
            &ctx,
            "SELECT c_clamp(x, 0, 10), c_upper(s) FROM (VALUES (-5, 'abc'), (50, NULL), (3, ''), (7, 'a\u{0}b')) t(x, s)"
        )
        .await,
        expect(&[&["0", "ABC"], &["10", "<null>"], &["3", "NULL"], &["7", "A\u{0}B"]])
    );
    let e = query_error(&ctx, "SELECT c_clamp(1, 5, 0)").await;
    assert!(e.contains("c_clamp: low bound is above high bound"), "{e}");
}

fn v2_load_error(case: &str) -> LoadError {
    let path = misbehaving_v2(case);
    match PluginLibrary::load(&path) {
        Ok(lib) => panic!("{case} loaded: {lib:?}"),
        Err(e) => {
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                e.to_string().contains(&file),
                "{case}: the error names the library: {e}"
            );
            e
        }
    }
}

fn v2_metadata_error(case: &str) -> MetadataError {
    match v2_load_error(case) {
        LoadError::InvalidMetadata { reason, symbol, .. } => {
            assert_eq!(symbol, "udfsql_manifest");
            reason
        }
        other => panic!("{case}: {other}"),
    }
}

#[test]
fn a_library_for_another_major_is_refused_naming_both_versions() {
    match v2_load_error("MAJOR_3") {
        LoadError::AbiMismatch {
            found_major,
            found_minor,
            expected_major,
            ..
        } => assert_eq!((found_major, found_minor, expected_major), (3, 1, 2)),
        other => panic!("{other}"),
    }
    let text = v2_load_error("MAJOR_3").to_string();
    assert!(
        text.contains("ABI v3.1") && text.contains("ABI v2.x"),
        "{text}"
    );
}

#[test]
fn bad_manifests_are_refused_with_the_reason() {
    assert_eq!(
        v2_metadata_error("DUPLICATE_NAMES"),
        MetadataError::DuplicateName {
            function: "broken".into()
        }
    );
    // A 2.2 function may leave one entrypoint null, not both: the refusal says both are.
    let both_null = v2_metadata_error("NULL_ENTRYPOINT");
    assert_eq!(
        both_null,
        MetadataError::NoEntrypoint {
            function: "broken".into()
        }
    );
    assert!(
        both_null
            .to_string()
            .contains("row and batch entrypoints (call_row and call_batch) are both null"),
        "{both_null}"
    );
    assert!(matches!(
        v2_metadata_error("UNKNOWN_TYPE"),
        MetadataError::UnknownTypeTag {
            tag: 42,
            max: 9,
            ..
        }
    ));
    assert_eq!(
        v2_metadata_error("NULL_MANIFEST"),
        MetadataError::NullManifest
    );
    assert_eq!(
        v2_metadata_error("NULL_RELEASE"),
        MetadataError::NullRelease
    );
    assert_eq!(
        v2_metadata_error("NO_FUNCTIONS"),
        MetadataError::NoFunctions
    );
    assert!(matches!(
        v2_metadata_error("SMALL_MANIFEST"),
        MetadataError::ManifestTooSmall {
            found: 8,
            expected: 32
        }
    ));
    assert!(matches!(
        v2_metadata_error("BAD_FLAG"),
        MetadataError::InvalidField {
            field: "arg_nullable",
            value: 9,
            ..
        }
    ));
    assert!(matches!(
        v2_metadata_error("BAD_VOLATILITY"),
        MetadataError::InvalidField {
            field: "volatility",
            value: 17,
            ..
        }
    ));
    assert!(matches!(
        v2_metadata_error("NULL_FUNCTIONS"),
        MetadataError::BadFunctionList { len: 2, .. }
    ));
    match v2_load_error("NO_MANIFEST") {
        LoadError::MissingSymbol { symbol, .. } => assert_eq!(symbol, "udfsql_manifest"),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn misbehaving_v2_results_are_errors_and_every_result_is_released() {
    for (case, message) in [
        (
            "RETURNS_NULL",
            "returned NULL, but the function is declared never to return NULL",
        ),
        ("BAD_STATUS", "invalid status code 7"),
        ("NULL_ERROR", "error without a message"),
        ("NULL_BYTES", "returned 5 bytes at a null pointer"),
        ("INVALID_UTF8", "not valid UTF-8"),
        ("ERROR_MESSAGE", "broken: this row is not allowed"),
    ] {
        let ctx = SessionContext::new();
        ctx.register_plugin(misbehaving_v2(case)).unwrap();
        let e = query_error(&ctx, "SELECT broken(x) FROM (VALUES (1), (2)) t(x)").await;
        assert!(e.contains("plugin function broken ("), "{case}: {e}");
        assert!(e.contains(message), "{case}: {e}");
    }
    // A well-behaved library: every string result goes back to the plugin's release_bytes. The
    // counter lives in the library, which stays loaded across sessions: compare before and after.
    let released = |ctx: SessionContext| async move {
        rows(&ctx, "SELECT released()").await[0][0]
            .parse::<i64>()
            .unwrap()
    };
    let ctx = SessionContext::new();
    ctx.register_plugin(misbehaving_v2("NONE")).unwrap();
    let before = released(ctx.clone()).await;
    let n = rows(
        &ctx,
        "SELECT count(broken(value)) FROM generate_series(1, 2500)",
    )
    .await;
    assert_eq!(n, expect(&[&["2500"]]));
    assert_eq!(released(ctx.clone()).await - before, 2500);
    // Error messages are released too: per failing call, the plugin releases its own scratch
    // result and the host releases the message.
    let ctx = SessionContext::new();
    ctx.register_plugin(misbehaving_v2("ERROR_MESSAGE"))
        .unwrap();
    let before = released(ctx.clone()).await;
    query_error(&ctx, "SELECT broken(value) FROM generate_series(7, 7)").await;
    assert_eq!(released(ctx.clone()).await - before, 2);
}

fn batch_library(case: &str) -> std::path::PathBuf {
    c_library(
        &format!("batch_v2_{}", case.to_lowercase()),
        "batch_v2.c",
        &[case],
    )
}

/// A C library with a batch entrypoint: a correct one, one that leaves its arguments for the host
/// to release, and ones whose results are wrong in every way the host can check.
#[tokio::test]
async fn batch_results_are_validated() {
    for case in ["BATCH_OK", "BATCH_NOT_TAKEN"] {
        let ctx = SessionContext::new();
        ctx.register_plugin(batch_library(case)).unwrap();
        assert_eq!(
            rows(&ctx, "SELECT twice(x) FROM (VALUES (1), (NULL), (-3)) t(x)").await,
            expect(&[&["2"], &["NULL"], &["-6"]]),
            "{case}"
        );
        assert_eq!(
            rows(
                &ctx,
                "SELECT sum(twice(value)) FROM generate_series(1, 20000)"
            )
            .await,
            expect(&[&["400020000"]]),
            "{case}"
        );
    }
    for (case, message) in [
        ("BATCH_WRONG_LENGTH", "the result has 4 rows, 3 expected"),
        (
            "BATCH_WRONG_TYPE",
            "a batch of Arrow format \"i\", the function declares Int (Arrow format \"l\")",
        ),
        (
            "BATCH_NULL_RELEASE",
            "the result array has no release callback",
        ),
        (
            "BATCH_UNDECLARED_NULLS",
            "returned NULL in 1 row(s), but the function is declared never to return NULL",
        ),
        ("BATCH_ERROR", "twice: batch refused"),
    ] {
        let ctx = SessionContext::new();
        ctx.register_plugin(batch_library(case)).unwrap();
        let e = query_error(&ctx, "SELECT twice(x) FROM (VALUES (1), (2), (3)) t(x)").await;
        assert!(e.contains("plugin function twice ("), "{case}: {e}");
        assert!(e.contains(message), "{case}: {e}");
        // The session goes on.
        assert_eq!(rows(&ctx, "SELECT 1").await, expect(&[&["1"]]));
    }
    // Every result array is released by the host (through the plugin's callback).
    let ctx = SessionContext::new();
    ctx.register_plugin(batch_library("BATCH_OK")).unwrap();
    let before: i64 = rows(&ctx, "SELECT released_arrays()").await[0][0]
        .parse()
        .unwrap();
    let batches = query(&ctx, "SELECT twice(value) FROM generate_series(1, 20000)")
        .await
        .unwrap();
    let made = batches.len() as i64;
    drop(batches);
    let after: i64 = rows(&ctx, "SELECT released_arrays()").await[0][0]
        .parse()
        .unwrap();
    assert!(
        after - before >= made,
        "{before} -> {after}, {made} batches"
    );
}

/// A library from `manifest_edges.c` built with `-D<define>`.
fn manifest_edges(name: &str, define: &str) -> std::path::PathBuf {
    c_library(
        &format!("manifest_edges_{name}"),
        "manifest_edges.c",
        &[define],
    )
}

fn edges_metadata_error(name: &str, define: &str) -> (MetadataError, String) {
    let path = manifest_edges(name, define);
    match PluginLibrary::load(&path) {
        Ok(_) => panic!("{define}: loaded"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            match e {
                LoadError::InvalidMetadata { reason, .. } => (reason, text),
                other => panic!("{define}: {other}"),
            }
        }
    }
}

/// A library of a later minor (99) whose manifest has a field appended after 2.2's, and an
/// `arrow_types` pointer that faults when read: none of its functions declares an Arrow type,
/// so the host reads nothing it does not know, and the library loads and works (it used to
/// take the host down with SIGSEGV at load).
#[tokio::test]
async fn a_future_minor_library_loads_when_it_uses_nothing_unknown() {
    let library = PluginLibrary::load(manifest_edges("future_minor", "FUTURE_MINOR")).unwrap();
    assert_eq!(library.abi(), Abi::V2 { minor: 99 });
    let names: Vec<&str> = library
        .functions()
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["plus_one", "twice"]);
    let ctx = SessionContext::new();
    ctx.register_plugin(manifest_edges("future_minor", "FUTURE_MINOR"))
        .unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT plus_one(x), twice(x) FROM (VALUES (1), (20)) AS t(x) ORDER BY x"
        )
        .await,
        expect(&[&["2", "2"], &["21", "40"]])
    );
}

/// The same later minor with a valid `arrow_types`: a function over an Arrow type string reads
/// it and works.
#[tokio::test]
async fn a_future_minor_library_with_arrow_types_works() {
    let path = manifest_edges("future_minor_arrow", "FUTURE_MINOR_ARROW");
    let library = PluginLibrary::load(&path).unwrap();
    assert_eq!(library.abi(), Abi::V2 { minor: 99 });
    let ctx = SessionContext::new();
    ctx.register_plugin(&path).unwrap();
    assert_eq!(
        rows(
            &ctx,
            "SELECT c_id(x), plus_one(x) FROM (VALUES (7), (NULL)) AS t(x) ORDER BY x"
        )
        .await,
        expect(&[&["7", "8"], &["NULL", "NULL"]])
    );
}

/// Time zones are checked at load, as arrow reads them when it computes: a zone it does not
/// know (or 300 bytes of one) is refused naming the library, the function and the position,
/// instead of loading and failing every query with `Invalid timezone`.
#[tokio::test]
async fn time_zones_are_validated_at_load() {
    for (name, define, shown) in [
        ("zone_unknown", "ZONE=\"tsu:Not/AZone\"", "`Not/AZone`"),
        ("zone_offset_bad", "ZONE=\"tsm:+25:00\"", "`+25:00`"),
        ("zone_long", "LONG_ZONE", "(300 bytes)"),
    ] {
        let (reason, text) = edges_metadata_error(name, define);
        match &reason {
            MetadataError::BadTypeString {
                function, reason, ..
            } => {
                assert_eq!(function, "c_id");
                assert!(reason.contains("time zone"), "{reason}");
                assert!(reason.contains(shown), "{reason}");
            }
            other => panic!("{define}: {other}"),
        }
        // The argument comes first; the library and function are named in the message.
        assert!(text.contains("function `c_id`: argument 1"), "{text}");
    }
    // Zones arrow knows: an offset and an IANA name, as arguments and results.
    for (name, define, zone) in [
        ("zone_offset", "ZONE=\"tsu:+05:30\"", "+05:30"),
        ("zone_named", "ZONE=\"tsu:Europe/Paris\"", "+01:00"),
    ] {
        let ctx = SessionContext::new();
        ctx.register_plugin(manifest_edges(name, define)).unwrap();
        let got = rows(
            &ctx,
            "SELECT c_id(CAST(x AS TIMESTAMP)) FROM (VALUES ('2024-01-01T00:00:00Z')) AS t(x)",
        )
        .await;
        assert_eq!(got.len(), 1);
        assert!(got[0][0].contains(zone), "{define}: {got:?}");
    }
}

/// A type string that starts with `!` is the library's reason for not declaring its types (what
/// `udf-abi` writes when its static storage is full): the refusal is that reason.
#[test]
fn a_library_message_in_place_of_a_type_is_the_refusal() {
    let (reason, text) = edges_metadata_error("library_message", "LIBRARY_MESSAGE");
    assert_eq!(
        reason,
        MetadataError::UndeclaredTypes {
            function: "c_id".into(),
            message: "udf-abi could not declare this: a test message".into(),
        }
    );
    assert!(
        text.contains("function `c_id`: the library could not declare its Arrow types"),
        "{text}"
    );
}

#[test]
fn a_function_without_any_entrypoint_says_both_are_null() {
    let (reason, _) = edges_metadata_error("both_null", "BOTH_NULL");
    assert_eq!(
        reason,
        MetadataError::NoEntrypoint {
            function: "neither".into()
        }
    );
}
