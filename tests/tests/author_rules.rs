//! The rules a `#[udf]` author can rely on, checked through both call paths of a real plugin
//! library (the toolbox's fixtures `strict_probe*`, which count a call with a sentinel value and
//! panic, and `jitter*`, volatile counters):
//!
//! * the function is never called on a row where an argument it does not take as `Option` is
//!   NULL, not even by the vectorised kernels of the batch path, whatever value sits in the NULL
//!   slot's value buffer;
//! * a stable or volatile function is called once per row, also when its arguments are
//!   constants (an immutable one with constant arguments is still folded);
//! * a panic is an SQL error with the panic's message on one line and its location.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, UInt64Array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use udf_engine::{CallPath, PluginFunction, PluginLibrary, PluginUdf};
use udf_tests::{plugin, query, query_error, rows, udfsql};

/// The value the toolbox's `strict_probe*` functions panic on. The tests put it only into the
/// value slots of NULL rows.
const SENTINEL: i64 = -7_777_777;

const PATHS: [CallPath; 2] = [CallPath::Row, CallPath::Batch];

/// Held by the tests that read or change the toolbox's count of sentinel calls (the tests of
/// this file run in parallel, in one process, on one mapping of the library).
static SENTINEL_COUNT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How many times the `strict_probe` functions have been called with the sentinel.
fn sentinel_calls() -> u64 {
    let f = toolbox_function("strict_probe_sentinel_calls");
    let out = f.call_batch(&[], 1).unwrap();
    out.as_any().downcast_ref::<UInt64Array>().unwrap().value(0)
}

/// The toolbox library, loaded once and kept for the whole test binary, so that its counters
/// (statics in the library) live as long as the tests.
fn toolbox() -> &'static Arc<PluginLibrary> {
    static LIBRARY: OnceLock<Arc<PluginLibrary>> = OnceLock::new();
    LIBRARY.get_or_init(|| PluginLibrary::load(plugin("toolbox")).unwrap())
}

fn toolbox_function(name: &str) -> PluginFunction {
    toolbox()
        .function_named(name)
        .unwrap_or_else(|| panic!("the toolbox has no function {name}"))
}

/// An Int64 column whose NULL rows hold [`SENTINEL`] in the values buffer, as a column can after
/// a filter or a take (arrow does not define what a NULL slot holds).
fn sentinel_nulls(values: &[Option<i64>]) -> Int64Array {
    let raw: Vec<i64> = values.iter().map(|v| v.unwrap_or(SENTINEL)).collect();
    let valid: Vec<bool> = values.iter().map(Option::is_some).collect();
    Int64Array::new(raw.into(), Some(NullBuffer::from(valid)))
}

/// A session with every toolbox function registered with its declared volatility on `path`,
/// a table `probe(x, y)` whose NULL slots hold the sentinel, and a table `t1000(n)`.
fn session(path: CallPath) -> SessionContext {
    let ctx = SessionContext::new();
    let library = toolbox();
    for i in 0..library.functions().len() {
        let f = library.function(i).unwrap();
        let name = f.signature().name.clone();
        let volatility = PluginUdf::declared_volatility(&f);
        let udf = PluginUdf::new(name, f, volatility).with_call_path(path);
        assert_eq!(udf.call_path(), path);
        ctx.register_udf(ScalarUDF::new_from_impl(udf));
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("x", DataType::Int64, true),
        Field::new("y", DataType::Int64, true),
    ]));
    let x = sentinel_nulls(&[Some(1), None, Some(3), Some(4), None]);
    let y = sentinel_nulls(&[Some(10), Some(20), None, Some(40), Some(50)]);
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(x), Arc::new(y)]).unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.register_table("probe", Arc::new(table)).unwrap();
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let n = Int64Array::from_iter_values(0..1000);
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(n)]).unwrap();
    let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.register_table("t1000", Arc::new(table)).unwrap();
    ctx
}

fn column(values: &[Option<&str>]) -> Vec<Vec<String>> {
    values
        .iter()
        .map(|v| vec![v.unwrap_or("NULL").to_string()])
        .collect()
}

#[tokio::test]
async fn the_sentinel_reaches_the_plugin_functions_in_null_slots() {
    // The premise of the tests below: a projection over `probe` hands the functions the arrays
    // as built, sentinel values under the NULL bits included.
    let ctx = session(CallPath::Batch);
    let batches = query(&ctx, "SELECT x, y FROM probe").await.unwrap();
    let x = batches[0].column(0).as_primitive::<Int64Type>();
    assert!(x.is_null(1));
    assert_eq!(x.values()[1], SENTINEL);
    // And a valid sentinel is counted, and makes the probe panic (so the probe would notice).
    let _count = SENTINEL_COUNT.lock().await;
    for path in PATHS {
        let ctx = session(path);
        let before = sentinel_calls();
        let e = query_error(
            &ctx,
            &format!("SELECT strict_probe(v) FROM (VALUES ({SENTINEL})) t(v)"),
        )
        .await;
        assert!(
            e.contains("panicked: called with -7777777"),
            "{path:?}: {e}"
        );
        assert_eq!(sentinel_calls(), before + 1, "{path:?}");
    }
}

#[tokio::test]
async fn functions_are_never_called_on_null_rows_in_sql() {
    let _count = SENTINEL_COUNT.lock().await;
    let before = sentinel_calls();
    for path in PATHS {
        let ctx = session(path);
        let cases: [(&str, &[Option<&str>]); 7] = [
            (
                "strict_probe(x)",
                &[Some("1"), None, Some("3"), Some("4"), None],
            ),
            (
                "strict_probe_odd(x)",
                &[Some("true"), None, Some("true"), Some("false"), None],
            ),
            (
                "strict_probe_sum(x, y)",
                &[Some("11"), None, None, Some("44"), None],
            ),
            (
                "strict_probe_sum(x, 5)",
                &[Some("6"), None, Some("8"), Some("9"), None],
            ),
            (
                "strict_probe_sum(5, y)",
                &[Some("15"), Some("25"), None, Some("45"), Some("55")],
            ),
            ("strict_probe_sum(x, NULL)", &[None; 5]),
            (
                "strict_probe(y)",
                &[Some("10"), Some("20"), None, Some("40"), Some("50")],
            ),
        ];
        for (call, expected) in cases {
            let sql = format!("SELECT {call} FROM probe");
            assert_eq!(rows(&ctx, &sql).await, column(expected), "{path:?}: {sql}");
        }
        // After a filter, too (the filtered arrays keep their NULL slots' values).
        assert_eq!(
            rows(
                &ctx,
                "SELECT strict_probe_sum(x, y) FROM probe WHERE x IS NULL OR x > 2"
            )
            .await,
            column(&[None, None, Some("44"), None]),
            "{path:?}"
        );
    }
    // Not even a call whose panic was caught and hidden.
    assert_eq!(
        sentinel_calls(),
        before,
        "calls with the sentinel of a NULL slot"
    );
}

/// The batch entrypoint called directly, with each argument as an array or as a constant
/// (a one-row array flagged as a scalar), whichever the host chooses.
#[test]
fn batch_kernels_skip_null_slots_with_array_and_constant_arguments() {
    let _count = SENTINEL_COUNT.blocking_lock();
    let before = sentinel_calls();
    let x: ArrayRef = Arc::new(sentinel_nulls(&[Some(1), None, Some(3), None]));
    let y: ArrayRef = Arc::new(sentinel_nulls(&[None, Some(2), Some(5), Some(7)]));
    let five: ArrayRef = Arc::new(Int64Array::from(vec![5]));
    let null: ArrayRef = Arc::new(Int64Array::from(vec![None::<i64>]));
    let ints = |a: ArrayRef| -> Vec<Option<i64>> { a.as_primitive::<Int64Type>().iter().collect() };

    let probe = toolbox_function("strict_probe");
    let out = probe.call_batch(&[(x.clone(), false)], 4).unwrap();
    assert_eq!(ints(out), [Some(1), None, Some(3), None]);

    let odd = toolbox_function("strict_probe_odd");
    let out = odd.call_batch(&[(x.clone(), false)], 4).unwrap();
    let out: &BooleanArray = out.as_boolean();
    assert_eq!(
        out.iter().collect::<Vec<_>>(),
        [Some(true), None, Some(true), None]
    );

    let sum = toolbox_function("strict_probe_sum");
    type Args<'a> = &'a [(ArrayRef, bool)];
    let cases: [(Args<'_>, [Option<i64>; 4]); 5] = [
        (
            &[(x.clone(), false), (y.clone(), false)],
            [None, None, Some(8), None],
        ),
        (
            &[(x.clone(), false), (five.clone(), true)],
            [Some(6), None, Some(8), None],
        ),
        (
            &[(five.clone(), true), (y.clone(), false)],
            [None, Some(7), Some(10), Some(12)],
        ),
        (&[(null.clone(), true), (y.clone(), false)], [None; 4]),
        (&[(x.clone(), false), (null.clone(), true)], [None; 4]),
    ];
    for (args, expected) in cases {
        let out = sum
            .call_batch(args, 4)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(ints(out), expected, "{args:?}");
    }
    assert_eq!(
        sentinel_calls(),
        before,
        "calls with the sentinel of a NULL slot"
    );
}

fn distinct(rows: &[Vec<String>]) -> usize {
    rows.iter().map(|r| &r[0]).collect::<HashSet<_>>().len()
}

#[tokio::test]
async fn volatile_functions_are_called_once_per_row_even_for_constants() {
    for path in PATHS {
        let ctx = session(path);
        for call in [
            "jitter(1)",
            "jitter_sum(1, 2)",
            "jitter_sum(n, 2)",
            "jitter(n - n)",
        ] {
            let sql = format!("SELECT {call} FROM t1000");
            let values = rows(&ctx, &sql).await;
            assert_eq!(values.len(), 1000);
            // The counter grows by one on every call (of any thread), so every row differs.
            assert_eq!(distinct(&values), 1000, "{path:?}: {sql}");
        }
    }
}

#[test]
fn volatile_kernels_compute_constant_arguments_for_every_row() {
    // The batch entrypoint given constants (one-row arrays flagged as scalars) for 1000 rows:
    // the generated code knows the function is volatile and calls it for every row.
    let one: ArrayRef = Arc::new(Int64Array::from(vec![1]));
    let ints = |a: ArrayRef| -> HashSet<i64> {
        a.as_primitive::<Int64Type>()
            .iter()
            .map(Option::unwrap)
            .collect()
    };
    let jitter = toolbox_function("jitter");
    let out = jitter.call_batch(&[(one.clone(), true)], 1000).unwrap();
    assert_eq!(out.len(), 1000);
    assert_eq!(ints(out).len(), 1000);
    let jitter_sum = toolbox_function("jitter_sum");
    let out = jitter_sum
        .call_batch(&[(one.clone(), true), (one.clone(), true)], 1000)
        .unwrap();
    assert_eq!(ints(out).len(), 1000);
    // An immutable function given a constant: one value for every row.
    let probe = toolbox_function("strict_probe");
    let out = probe.call_batch(&[(one, true)], 1000).unwrap();
    assert_eq!(out.len(), 1000);
    assert_eq!(ints(out), HashSet::from([1]));
    // next_id (no argument) on the batch path: a value per row.
    let next_id = toolbox_function("next_id");
    let out = next_id.call_batch(&[], 100).unwrap();
    let ids: HashSet<u64> = out
        .as_any()
        .downcast_ref::<UInt64Array>()
        .unwrap()
        .iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(ids.len(), 100);
}

#[tokio::test]
async fn immutable_functions_with_constant_arguments_are_still_folded() {
    // `jitter` registered IMMUTABLE (overriding its declaration): DataFusion evaluates the
    // call once, when it plans the query, and every row gets that value.
    for path in PATHS {
        let ctx = session(path);
        let udf = PluginUdf::new(
            "jitter_fixed",
            toolbox_function("jitter"),
            Volatility::Immutable,
        )
        .with_call_path(path);
        ctx.register_udf(ScalarUDF::new_from_impl(udf));
        let values = rows(&ctx, "SELECT jitter_fixed(1) FROM t1000").await;
        assert_eq!(values.len(), 1000);
        assert_eq!(distinct(&values), 1, "{path:?}");
        let plan = rows(&ctx, "EXPLAIN SELECT jitter_fixed(1) FROM t1000").await;
        assert!(
            format!("{plan:?}").contains("Projection: Int64("),
            "folded into a literal: {plan:?}"
        );
        // Declared volatile: not folded.
        let plan = rows(&ctx, "EXPLAIN SELECT jitter(1) FROM t1000").await;
        assert!(format!("{plan:?}").contains("jitter(Int64(1))"), "{plan:?}");
    }
}

/// `message` is one line ending in ` (at <file>:<line>:<column>)` with `<file>` ending in
/// `file_suffix`.
fn assert_panic_location(message: &str, file_suffix: &str) {
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "one line: {message:?}"
    );
    let at = message
        .rfind(" (at ")
        .unwrap_or_else(|| panic!("no location in {message:?}"));
    let location = message[at + 5..]
        .strip_suffix(')')
        .unwrap_or_else(|| panic!("does not end with ')': {message:?}"));
    let mut parts = location.rsplitn(3, ':');
    let column = parts.next().unwrap();
    let line = parts.next().unwrap_or_default();
    let file = parts.next().unwrap_or_default();
    assert!(
        column.parse::<u32>().is_ok() && line.parse::<u32>().is_ok(),
        "line and column: {message:?}"
    );
    assert!(file.ends_with(file_suffix), "file: {message:?}");
}

#[tokio::test]
async fn a_panic_is_an_error_with_its_message_and_location_on_one_line() {
    let _count = SENTINEL_COUNT.lock().await;
    let mut messages = Vec::new();
    for path in PATHS {
        let ctx = session(path);
        let e = query_error(&ctx, "SELECT boom(s) FROM (VALUES ('kaboom')) t(s)").await;
        assert!(e.contains("panicked: boom: kaboom (at "), "{path:?}: {e}");
        assert_panic_location(&e, "udf-plugins/toolbox/src/lib.rs");
        // A panic in a vectorised kernel: the same error as in the row loop, and the function
        // is not called again (by a retry in the row loop).
        let before = sentinel_calls();
        let e = query_error(
            &ctx,
            &format!("SELECT strict_probe_sum(v, 1) FROM (VALUES (1), ({SENTINEL})) t(v)"),
        )
        .await;
        assert_panic_location(&e, "udf-plugins/toolbox/src/lib.rs");
        assert_eq!(sentinel_calls(), before + 1, "{path:?}: called once");
        let panicked = e.find("panicked: ").expect("panicked");
        messages.push(e[panicked..].to_string());
        // A message with line breaks of its own is joined into one line.
        let e = query_error(&ctx, "SELECT boom(s) FROM (VALUES ('one\ntwo\n')) t(s)").await;
        assert!(e.contains("panicked: boom: one; two (at "), "{path:?}: {e}");
        assert_panic_location(&e, "udf-plugins/toolbox/src/lib.rs");
    }
    assert_eq!(messages[0], messages[1], "row and batch path");
    assert!(
        messages[0].starts_with(
            "panicked: called with -7777777, a value tests put only in NULL slots (at "
        ),
        "{}",
        messages[0]
    );
}

#[test]
fn the_shell_prints_a_panic_on_one_line() {
    let out = Command::new(udfsql())
        .args(["--demo", "-c", "SELECT boom('kaboom')"])
        .env_remove("UDFSQL_LOG")
        .output()
        .expect("run udfsql");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains("panicked: boom: kaboom (at "), "{stderr}");
    assert_panic_location(line, "udf-plugins/toolbox/src/lib.rs");
}

/// A C program that loads a library with `dlopen`, has a thread panic in `boom` (row and batch
/// entrypoints) and call `next_id`'s batch entrypoint, then `dlclose`s the library while that
/// thread is still alive, and exits 0 if the library is no longer mapped. (A thread-local with a
/// destructor in the plugin's runtime makes glibc keep the library mapped.)
const DLCLOSE_PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include "udf_abi.h"

static const UdfManifest *manifest;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int done = 0, quit = 0, failed = 0;

static const UdfFunction *function(const char *name) {
    for (size_t i = 0; i < manifest->functions_len; i++) {
        const UdfFunction *f = &manifest->functions[i];
        if (f->name.len == strlen(name) && memcmp(f->name.ptr, name, f->name.len) == 0) return f;
    }
    return NULL;
}

static void release_schema(struct ArrowSchema *s) { s->release = NULL; }
static void release_array(struct ArrowArray *a) { a->release = NULL; }

static void expect_panic(int32_t status, UdfOwnedBytes error, const char *path) {
    printf("%s: status %d: %.*s\n", path, status, (int)error.len, (const char *)error.ptr);
    if (status != UDF_STATUS_ERROR || error.ptr == NULL
        || !memmem(error.ptr, error.len, "panicked: boom: x", 17)) failed = 1;
    manifest->release_bytes(error);
}

static void *worker(void *unused) {
    (void)unused;
    const UdfFunction *boom = function("boom"), *next_id = function("next_id");
    if (boom == NULL || next_id == NULL) { failed = 1; goto out; }
    /* A panic on the row path. */
    UdfValue arg;
    memset(&arg, 0, sizeof arg);
    arg.value.bytes.ptr = (const uint8_t *)"x";
    arg.value.bytes.len = 1;
    UdfValue value;
    UdfOwnedBytes error = {0};
    expect_panic(boom->call_row(&arg, 1, &value, &error), error, "row");
    /* A panic on the batch path: boom over a one-row utf8 array. */
    static const int32_t offsets[2] = {0, 1};
    const void *buffers[3] = {NULL, offsets, "x"};
    struct ArrowArray array = {1, 0, 0, 3, 0, buffers, NULL, NULL, release_array, NULL};
    struct ArrowSchema schema = {"u", "", NULL, 2, 0, NULL, NULL, release_schema, NULL};
    uint8_t scalar = 0;
    struct ArrowArray out;
    struct ArrowSchema out_schema;
    UdfOwnedBytes batch_error = {0};
    int32_t status = boom->call_batch(&array, &schema, &scalar, 1, 1, &out, &out_schema,
                                      &batch_error);
    expect_panic(status, batch_error, "batch");
    /* A batch that succeeds; its result is released (plugin code) before dlclose. */
    UdfOwnedBytes ids_error = {0};
    status = next_id->call_batch(NULL, NULL, NULL, 0, 3, &out, &out_schema, &ids_error);
    printf("next_id batch: status %d, %lld rows\n", status, (long long)out.length);
    if (status != UDF_STATUS_OK || out.length != 3) failed = 1;
    else { out.release(&out); out_schema.release(&out_schema); }
out:
    pthread_mutex_lock(&lock);
    done = 1;
    pthread_cond_broadcast(&cond);
    while (!quit) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static int mapped(const char *path) {
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[8192];
    int n = 0;
    while (maps && fgets(line, sizeof line, maps)) if (strstr(line, path)) n++;
    if (maps) fclose(maps);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 2) return 3;
    void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!library) { printf("dlopen: %s\n", dlerror()); return 3; }
    const UdfManifest *(*get)(void) = (const UdfManifest *(*)(void))dlsym(library, "udfsql_manifest");
    if (!get) return 3;
    manifest = get();
    pthread_t thread;
    pthread_create(&thread, NULL, worker, NULL);
    pthread_mutex_lock(&lock);
    while (!done) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    int before = mapped(argv[1]);
    dlclose(library);
    int after = mapped(argv[1]);
    printf("mappings before dlclose: %d, after (the thread that panicked still running): %d\n",
           before, after);
    pthread_mutex_lock(&lock);
    quit = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    pthread_join(thread, NULL);
    if (failed) return 4;
    return before > 0 && after == 0 ? 0 : 2;
}
"#;

#[test]
fn a_panic_leaves_nothing_that_keeps_the_library_mapped_after_dlclose() {
    let dir = udf_tests::fixture_dir();
    let source = dir.join("author_rules_dlclose.c");
    std::fs::write(&source, DLCLOSE_PROGRAM).unwrap();
    let program = dir.join("author_rules_dlclose");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let compiled = Command::new(&cc)
        .args(["-O1", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-I"])
        .arg(udf_tests::workspace_root().join("udf-abi/include"))
        .arg(&source)
        .arg("-o")
        .arg(&program)
        .args(["-ldl", "-lpthread"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        compiled.status.success(),
        "{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    // A copy under a name of its own: no other test has it mapped.
    let copy = dir.join(format!("libauthor_rules_toolbox_{}.so", std::process::id()));
    std::fs::copy(plugin("toolbox"), &copy).unwrap();
    let run = Command::new(&program).arg(&copy).output().unwrap();
    let _ = std::fs::remove_file(&copy);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{:?}\n{stdout}", run.status);
    assert!(
        stdout.contains("(at udf-plugins/toolbox/src/lib.rs:"),
        "{stdout}"
    );
}
