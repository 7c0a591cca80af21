//! The plugin boundary against every result a plugin can write (`batch_misbehaving.c`: one
//! function per misbehaviour, each with a row and a batch entrypoint), through both call paths:
//! the same answer, or the same class of error, and never a panic or an abort. Also: what holds a
//! library mapped (observed in `/proc/self/maps`), stale images of a replaced file, files that
//! are not regular, DDL names and concurrent CREATE, and functions registered VOLATILE.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use udf_engine::{
    CallErrorKind, CallPath, LoadError, PluginFunction, PluginLibrary, PluginLoader, PluginUdf,
};
use udf_tests::{c_library, fixture_dir, query, query_error, rows, set_mode};

fn corpus() -> PathBuf {
    c_library("batch_misbehaving", "batch_misbehaving.c", &[])
}

/// What both paths must do for one function of the corpus.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Both paths answer exactly this (one value per input row, `NULL` for NULL).
    Answer(&'static [&'static str]),
    /// Both paths fail with this class of error.
    Both(CallErrorKind),
    /// The row path answers correctly (as `ok_int` / `ok_str` do); the batch result breaks the C
    /// Data Interface and must fail with this class.
    BatchOnly(CallErrorKind),
}

use CallErrorKind::{InvalidResult, Plugin, UndeclaredNull, WrongType};
use Expect::{Answer, BatchOnly, Both};

const INTS: [Option<i64>; 4] = [Some(1), None, Some(3), Some(-4)];
const INT_ANSWER: &[&str] = &["2", "NULL", "6", "-8"];
const STRS: [Option<&str>; 4] = [Some("one"), None, Some("três"), Some("")];
const STR_ANSWER: &[&str] = &["one", "NULL", "três", ""];

const CASES: &[(&str, Expect)] = &[
    ("ok_int", Answer(INT_ANSWER)),
    ("schema_untouched", BatchOnly(InvalidResult)),
    ("schema_released", BatchOnly(InvalidResult)),
    ("format_not_utf8", BatchOnly(InvalidResult)),
    ("format_too_long", BatchOnly(InvalidResult)),
    ("format_wrong_type", BatchOnly(WrongType)),
    ("format_nested", BatchOnly(WrongType)),
    ("schema_dictionary", BatchOnly(InvalidResult)),
    ("schema_children", BatchOnly(InvalidResult)),
    ("array_released", BatchOnly(InvalidResult)),
    ("buffers_null", BatchOnly(InvalidResult)),
    ("negative_offset", BatchOnly(InvalidResult)),
    ("huge_offset", BatchOnly(InvalidResult)),
    ("negative_length", BatchOnly(InvalidResult)),
    ("wrong_length", BatchOnly(InvalidResult)),
    ("three_buffers", BatchOnly(InvalidResult)),
    ("one_buffer", BatchOnly(InvalidResult)),
    ("children_null", BatchOnly(InvalidResult)),
    ("array_dictionary", BatchOnly(InvalidResult)),
    ("null_count_wrong", BatchOnly(InvalidResult)),
    ("null_count_no_bitmap", BatchOnly(InvalidResult)),
    ("null_count_too_big", BatchOnly(InvalidResult)),
    ("null_count_negative", BatchOnly(InvalidResult)),
    // Not a misbehaviour: a null count of -1 ("not computed"), counted from the bitmap.
    ("null_count_unknown", Answer(INT_ANSWER)),
    ("data_buffer_null", BatchOnly(InvalidResult)),
    ("misaligned", BatchOnly(InvalidResult)),
    ("undeclared_null", Both(UndeclaredNull)),
    ("undeclared_null_nullable_arg", Both(UndeclaredNull)),
    ("strict_garbage", Answer(INT_ANSWER)),
    ("error_message", Both(Plugin)),
    ("error_null_message", Both(Plugin)),
    ("bad_status", Both(InvalidResult)),
    ("ok_with_message", Answer(INT_ANSWER)),
    ("ok_str", Answer(STR_ANSWER)),
    ("str_invalid_utf8", Both(InvalidResult)),
    ("str_offsets_decreasing", BatchOnly(InvalidResult)),
    ("str_negative_offset", BatchOnly(InvalidResult)),
    ("str_null_count_wrong", BatchOnly(InvalidResult)),
    ("str_offsets_misaligned", BatchOnly(InvalidResult)),
    ("str_two_buffers", BatchOnly(InvalidResult)),
    ("str_wrong_format", BatchOnly(WrongType)),
    ("str_split_char", BatchOnly(InvalidResult)),
    ("str_value_untouched", Answer(&["", "NULL", "", ""])),
    // Not a misbehaviour: a correct result starting one slot into its buffers.
    ("offset_one", Answer(INT_ANSWER)),
];

fn is_str(f: &PluginFunction) -> bool {
    f.signature().arg_types[0] == udf_abi::v2::UdfType::Utf8.into()
}

fn input(f: &PluginFunction) -> ArrayRef {
    if is_str(f) {
        Arc::new(StringArray::from(STRS.to_vec()))
    } else {
        Arc::new(Int64Array::from(INTS.to_vec()))
    }
}

/// One path's answer, rendered row by row.
fn rendered(f: &PluginFunction, result: ArrayRef) -> Vec<String> {
    (0..result.len())
        .map(|i| {
            if result.is_null(i) {
                "NULL".to_string()
            } else if is_str(f) {
                result.as_string::<i32>().value(i).to_string()
            } else {
                result.as_primitive::<Int64Type>().value(i).to_string()
            }
        })
        .collect()
}

/// The row path as the host runs it: rows with a NULL in an argument that does not take NULLs
/// are NULL without a call.
fn row_path(f: &PluginFunction) -> Result<Vec<String>, CallErrorKind> {
    let result = f
        .call_rows(&[(input(f), false)], INTS.len())
        .map_err(|e| e.kind())?;
    Ok(rendered(f, result))
}

fn batch_path(f: &PluginFunction) -> Result<Vec<String>, CallErrorKind> {
    let result = f
        .call_batch(&[(input(f), false)], INTS.len())
        .map_err(|e| e.kind())?;
    Ok(rendered(f, result))
}

/// The one value of a nullary function that returns an Int64, through the row path.
fn nullary_int(f: &PluginFunction) -> i64 {
    let result = f.call_rows(&[], 1).unwrap();
    result.as_primitive::<Int64Type>().value(0)
}

/// Every function of the corpus through both paths of the engine's API: the same answer or the
/// same class of error, as the table says; and every result array the plugin made is released.
#[test]
fn every_misbehaving_batch_result_is_an_error_of_the_same_class_as_on_the_row_path() {
    let library = PluginLibrary::load(corpus()).unwrap();
    let live = library.function_named("live_arrays").unwrap();
    let live_arrays = || nullary_int(&live);
    let before = live_arrays();
    assert!(CASES.len() >= 40, "the corpus has {} cases", CASES.len());
    for &(name, expect) in CASES {
        let f = library
            .function_named(name)
            .unwrap_or_else(|| panic!("{name} is in the library"));
        let (row, batch) = (row_path(&f), batch_path(&f));
        let correct = if is_str(&f) { STR_ANSWER } else { INT_ANSWER };
        let owned = |v: &[&str]| Ok(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        match expect {
            Answer(values) => {
                assert_eq!(row, owned(values), "{name}: row path");
                assert_eq!(batch, owned(values), "{name}: batch path");
            }
            Both(kind) => {
                assert_eq!(row, Err(kind), "{name}: row path");
                assert_eq!(batch, Err(kind), "{name}: batch path");
            }
            BatchOnly(kind) => {
                assert_eq!(row, owned(correct), "{name}: row path");
                assert_eq!(batch, Err(kind), "{name}: batch path");
            }
        }
    }
    assert_eq!(
        live_arrays(),
        before,
        "every result array is released, refused or not"
    );
}

/// The same corpus through SQL, each function registered once per call path in one session:
/// equal answers, errors naming the function and the library on both paths, and the session
/// answers the next query.
#[tokio::test]
async fn through_sql_both_paths_answer_alike_and_the_session_lives_on() {
    let library = PluginLibrary::load(corpus()).unwrap();
    let ctx = SessionContext::new();
    let schema = Arc::new(Schema::new(vec![
        Field::new("x", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(Int64Array::from(INTS.to_vec())),
            Arc::new(StringArray::from(STRS.to_vec())),
        ],
    )
    .unwrap();
    ctx.register_table(
        "t",
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
    )
    .unwrap();
    for &(name, expect) in CASES {
        let f = library.function_named(name).unwrap();
        for path in [CallPath::Row, CallPath::Batch] {
            let udf = PluginUdf::new(format!("{name}_{path}"), f.clone(), Volatility::Immutable)
                .with_call_path(path);
            ctx.register_udf(ScalarUDF::new_from_impl(udf));
        }
        let column = if is_str(&f) { "s" } else { "x" };
        let sql = |path: &str| format!("SELECT {name}_{path}({column}) FROM t");
        let (row, batch) = (
            query(&ctx, &sql("row")).await,
            query(&ctx, &sql("batch")).await,
        );
        let failed_well = |result: &datafusion::error::Result<Vec<RecordBatch>>, path: &str| {
            let e = result.as_ref().expect_err(name).to_string();
            assert!(
                e.contains(&format!("plugin function {name}_{path} ("))
                    && e.contains("batch_misbehaving"),
                "{name} ({path}): {e}"
            );
        };
        match expect {
            Answer(_) => assert_eq!(
                rows(&ctx, &sql("row")).await,
                rows(&ctx, &sql("batch")).await,
                "{name}"
            ),
            Both(_) => {
                failed_well(&row, "row");
                failed_well(&batch, "batch");
            }
            BatchOnly(_) => {
                assert!(row.is_ok(), "{name}: {row:?}");
                failed_well(&batch, "batch");
            }
        }
        // The session is alive and correct after every case.
        assert_eq!(
            rows(&ctx, "SELECT ok_int_batch(x) FROM t").await,
            rows(&ctx, "SELECT ok_int_row(x) FROM t").await
        );
    }
    let e = query_error(&ctx, "SELECT error_message_batch(x) FROM t").await;
    assert!(e.contains("refused by the plugin"), "{e}");
}

/// Whether `/proc/self/maps` maps `path`: the file itself (also after it was unlinked), or the
/// sealed in-memory copy the engine maps, `/memfd:<path> (deleted)`.
fn mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = path.to_str().unwrap();
    maps.lines().any(|line| {
        let name = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        name == path
            || name == format!("{path} (deleted)")
            || name == format!("/memfd:{path} (deleted)")
    })
}

/// A private copy of a fixture library under a name no other test uses, so that its mapping
/// belongs to this test alone.
fn private_copy(src: &Path, name: &str) -> PathBuf {
    let dir = fixture_dir().join(format!("boundary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    let dst = dir.join(name);
    copy_by_rename(src, &dst);
    dst
}

/// Copies `src` beside `dst`, then renames the copy over `dst`: a new file at `dst` in one step,
/// as an upgrade is installed.
fn copy_by_rename(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

#[test]
fn row_results_are_copied_and_handed_back_at_once() {
    let path = private_copy(&corpus(), "libbytes_lifetime.so");
    let library = PluginLibrary::load(&path).unwrap();
    let function = library.function_named("ok_str").unwrap();
    let input: ArrayRef = Arc::new(StringArray::from(vec!["kept", "also kept"]));
    let result = function.call_rows(&[(input, false)], 2).unwrap();
    drop(function);
    drop(library);
    // The row path copies each string into the host's column and gives the plugin's bytes back
    // through its `release_bytes` during the call, so nothing of the result needs the library.
    assert!(!mapped(&path), "no row result holds the library");
    let strings = result.as_string::<i32>();
    assert_eq!((strings.value(0), strings.value(1)), ("kept", "also kept"));
}

#[test]
fn batch_results_keep_their_library_mapped_and_no_longer() {
    let path = private_copy(&corpus(), "libarray_lifetime.so");
    let library = PluginLibrary::load(&path).unwrap();
    let function = library.function_named("ok_int").unwrap();
    let input: ArrayRef = Arc::new(Int64Array::from(vec![5, 6]));
    let result = function.call_batch(&[(input, false)], 2).unwrap();
    drop(function);
    drop(library);
    assert!(
        mapped(&path),
        "the array's release callback holds the library"
    );
    assert_eq!(result.as_primitive::<Int64Type>().values(), &[10, 12]);
    drop(result); // released through the plugin's callback, which is still mapped
    assert!(!mapped(&path), "unmapped once the last array is gone");
}

fn version_of(library: &Arc<PluginLibrary>) -> i64 {
    nullary_int(&library.function_named("version").unwrap())
}

/// Writes `src`'s bytes over `path` in place (same inode, no truncation: truncating a mapped file
/// would also discard the relocated pages of every image mapped from it).
fn overwrite_in_place(path: &Path, src: &Path) {
    use std::io::Write;
    let bytes = std::fs::read(src).unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        bytes.len() as u64,
        "the two builds have one size"
    );
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all(&bytes).unwrap();
}

/// glibc hands back a still-mapped image for the same path: a new file there is refused (renamed
/// over, or rewritten in place) while the old image lives, and a renamed-over one loads once the
/// old image is unmapped.
#[test]
fn a_replaced_library_is_refused_while_its_old_image_is_mapped() {
    let v1 = c_library("version_probe_1", "version_probe.c", &["VERSION=1"]);
    let v2 = c_library("version_probe_2", "version_probe.c", &["VERSION=2"]);
    for in_place in [false, true] {
        let path = private_copy(&v1, &format!("libversion_{in_place}.so"));
        let old = PluginLibrary::load(&path).unwrap();
        assert_eq!(version_of(&old), 1);
        if in_place {
            overwrite_in_place(&path, &v2);
        } else {
            let tmp = path.with_extension("new");
            std::fs::copy(&v2, &tmp).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        let refused = PluginLibrary::load(&path).unwrap_err();
        assert!(
            matches!(refused, LoadError::StaleImage { .. }),
            "in place: {in_place}: {refused}"
        );
        let message = refused.to_string();
        assert!(message.contains("still mapped"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        if in_place {
            // Rewriting a mapped library in place changes the pages of the running image (the
            // kernel shares the file's page cache with every private mapping not yet written
            // to), so the old image must not run while the file holds other bytes; the host's
            // part is to refuse the new load, done above. Put the original bytes back before the
            // old image runs again (replace libraries by renaming a new file over the old one).
            overwrite_in_place(&path, &v1);
        }
        assert_eq!(version_of(&old), 1, "the old image still answers");
        drop(old);
        assert!(
            !mapped(&path),
            "in place: {in_place}: the old image is unmapped"
        );
        if in_place {
            overwrite_in_place(&path, &v2);
        }
        let new = PluginLibrary::load(&path).unwrap();
        assert_eq!(
            version_of(&new),
            2,
            "in place: {in_place}: the new file's code runs"
        );
    }
}

/// A loader unloads a library nothing uses any more, and maps the file's new version on the next
/// CREATE FUNCTION.
#[tokio::test]
async fn drop_function_unmaps_and_create_maps_the_new_file() {
    let (ctx, dir) = session_with_plugin_dir("ddl");
    let path = dir.join("libversion.so");
    let create = "CREATE FUNCTION v() RETURNS BIGINT LANGUAGE plugin AS 'libversion.so'";
    query(&ctx, create).await.unwrap();
    assert_eq!(rows(&ctx, "SELECT v()").await, vec![vec!["1".to_string()]]);
    let canonical = path.canonicalize().unwrap();
    assert!(mapped(&canonical));
    query(&ctx, "DROP FUNCTION v").await.unwrap();
    assert!(!mapped(&canonical), "DROP FUNCTION unloads the library");
    put_version(&path, 2);
    query(&ctx, create).await.unwrap();
    assert_eq!(rows(&ctx, "SELECT v()").await, vec![vec!["2".to_string()]]);
}

/// A FIFO named as a library is refused before it is opened (opening it would block), and the
/// next CREATE FUNCTION works.
#[tokio::test]
async fn a_fifo_is_refused_without_blocking_later_loads() {
    let (ctx, dir) = session_with_plugin_dir("fifo");
    let fifo = dir.join("libfifo.so");
    if fifo.symlink_metadata().is_ok() {
        std::fs::remove_file(&fifo).unwrap();
    }
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let within = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(20), query(&ctx, sql))
                .await
                .unwrap_or_else(|_| panic!("{sql} blocked"))
        }
    };
    let e = within("CREATE FUNCTION f() RETURNS BIGINT LANGUAGE plugin AS 'libfifo.so'")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a regular file") && e.contains("FIFO"),
        "{e}"
    );
    within("CREATE FUNCTION v() RETURNS BIGINT LANGUAGE plugin AS 'libversion.so'")
        .await
        .unwrap();
    // And through the trusted API.
    let e = PluginLibrary::load(&fifo).unwrap_err();
    assert!(matches!(e, LoadError::NotARegularFile { .. }), "{e}");
}

/// Puts version `version` of the probe library at `path` ([`copy_by_rename`]).
fn put_version(path: &Path, version: u32) {
    let define = format!("VERSION={version}");
    let name = format!("version_probe_{version}");
    copy_by_rename(&c_library(&name, "version_probe.c", &[&define]), path);
}

/// A session whose plugin directory `target/udf-fixtures/boundary-<name>-<pid>` holds version 1
/// of the probe library as `libversion.so`, with plugin DDL installed.
fn session_with_plugin_dir(name: &str) -> (SessionContext, PathBuf) {
    let dir = fixture_dir().join(format!("boundary-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    let path = dir.join("libversion.so");
    // Always version 1, also where an earlier run with the same pid left a replaced one.
    put_version(&path, 1);
    let ctx = SessionContext::new();
    udf_engine::install(
        &ctx,
        Arc::new(PluginLoader::new().with_plugin_dir(&dir).unwrap()),
    )
    .unwrap();
    (ctx, dir)
}

async fn run(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<Vec<RecordBatch>> {
    udf_engine::sql(ctx, sql).await?.collect().await
}

/// Quoted names keep their case and unquoted ones are lower-cased, in CREATE, DROP and calls.
#[tokio::test]
async fn create_and_drop_follow_the_identifier_rules_of_calls() {
    let (ctx, _) = session_with_plugin_dir("names");
    let lib = "LANGUAGE plugin AS 'libversion.so'";
    run(
        &ctx,
        &format!("CREATE FUNCTION \"MyF\"() RETURNS BIGINT {lib}"),
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT \"MyF\"()").await,
        vec![vec!["1".to_string()]]
    );
    assert!(
        query(&ctx, "SELECT myf()").await.is_err(),
        "myf is another name"
    );
    run(&ctx, "DROP FUNCTION \"MyF\"").await.unwrap();
    assert!(query(&ctx, "SELECT \"MyF\"()").await.is_err(), "dropped");

    run(&ctx, &format!("CREATE FUNCTION MyG() RETURNS BIGINT {lib}"))
        .await
        .unwrap();
    assert_eq!(
        rows(&ctx, "SELECT MYG()").await,
        vec![vec!["1".to_string()]]
    );
    let e = run(&ctx, "DROP FUNCTION \"MyG\"")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such function"), "{e}");
    run(&ctx, "DROP FUNCTION MyG").await.unwrap();
    assert!(query(&ctx, "SELECT myg()").await.is_err(), "dropped");
    run(&ctx, "DROP FUNCTION IF EXISTS MyG").await.unwrap();
}

/// Two CREATE FUNCTION of one name without OR REPLACE, at the same time: exactly one succeeds,
/// through DataFusion's own `ctx.sql` (the factory) and through `udf_engine::sql`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_name_are_atomic() {
    let (ctx, _) = session_with_plugin_dir("race");
    for through_engine in [false, true] {
        for round in 0..10 {
            let create = "CREATE FUNCTION race() RETURNS BIGINT LANGUAGE plugin AS 'libversion.so'";
            let attempts: Vec<_> = (0..4)
                .map(|_| {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if through_engine {
                            run(&ctx, create).await.is_ok()
                        } else {
                            query(&ctx, create).await.is_ok()
                        }
                    })
                })
                .collect();
            let mut succeeded = 0;
            for a in attempts {
                succeeded += usize::from(a.await.unwrap());
            }
            assert_eq!(succeeded, 1, "engine: {through_engine}, round {round}");
            run(&ctx, "DROP FUNCTION race").await.unwrap();
        }
    }
}

/// A function registered VOLATILE is computed for every row on both paths, also for a constant
/// argument, even when the library declares it immutable (`counter` lies); registered IMMUTABLE,
/// a constant call is computed once.
#[tokio::test]
async fn functions_registered_volatile_run_once_per_row_on_both_paths() {
    let library = PluginLibrary::load(corpus()).unwrap();
    let counter = library.function_named("counter").unwrap();
    let ctx = SessionContext::new();
    for volatility in [Volatility::Volatile, Volatility::Immutable] {
        for path in [CallPath::Row, CallPath::Batch] {
            let name = format!("counter_{volatility:?}_{path}").to_lowercase();
            ctx.register_udf(ScalarUDF::new_from_impl(
                PluginUdf::new(&name, counter.clone(), volatility).with_call_path(path),
            ));
            let distinct = rows(
                &ctx,
                &format!("SELECT count(DISTINCT {name}(1)) FROM generate_series(1, 100)"),
            )
            .await;
            let expected = if volatility == Volatility::Volatile {
                "100"
            } else {
                "1"
            };
            assert_eq!(distinct, vec![vec![expected.to_string()]], "{name}");
        }
    }
}

/// A library written with `#[udf]` (Rust, its own copy of `std` and arrow) is really unmapped
/// once nothing holds it, after calls on both paths and a panic on several threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udf_library_is_unmapped_after_its_last_function_is_dropped() {
    let path = private_copy(&udf_tests::plugin("toolbox"), "libtoolbox_unload.so");
    {
        let library = PluginLibrary::load(&path).unwrap();
        let ctx = SessionContext::new();
        for (name, path_kind) in [("shout", CallPath::Row), ("boom", CallPath::Batch)] {
            let f = library.function_named(name).unwrap();
            ctx.register_udf(ScalarUDF::new_from_impl(
                PluginUdf::new(format!("{name}_x"), f, Volatility::Immutable)
                    .with_call_path(path_kind),
            ));
        }
        for _ in 0..4 {
            let shouted = rows(&ctx, "SELECT shout_x('a') FROM generate_series(1, 3)").await;
            assert_eq!(shouted.len(), 3);
            let e = query_error(
                &ctx,
                "SELECT boom_x(CAST(value AS VARCHAR)) FROM generate_series(1, 3)",
            )
            .await;
            assert!(e.contains("panicked"), "{e}");
        }
        let batch_fn = library.function_named("shout").unwrap();
        let input: ArrayRef = Arc::new(StringArray::from(vec!["x"]));
        let out = batch_fn.call_batch(&[(input, false)], 1).unwrap();
        assert_eq!(out.as_string::<i32>().value(0), "X!");
        assert!(mapped(&path));
    }
    // A failed query's other partitions are torn down by DataFusion's tasks, which may drop
    // their plan (and so the function) a moment after the error reached the caller.
    assert!(
        unmapped_within(&path, Duration::from_secs(10)),
        "a #[udf] library stays mapped after its last user is gone"
    );
}

/// Polls `/proc/self/maps` until `path` is no longer mapped, for at most `limit`.
fn unmapped_within(path: &Path, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while mapped(path) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}
