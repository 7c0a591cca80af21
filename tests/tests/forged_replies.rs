//! Worker replies are untrusted bytes (issue 24, items 1 and 2; issue 25's shared regions): a
//! plugin runs inside its worker and can write its own answer where the worker answers, the
//! shared output region. The fixture `tests/fixtures/c/forge.c` does exactly that, as an
//! attacker would: it finds the regions in its `/proc/self/maps`, writes a reply frame the test
//! prepared (a file whose path is its first argument), publishes it as the reply, and waits to be
//! killed. Every forged reply must be a "malformed reply" error naming the function and the
//! library, the forging worker killed and replaced, and the next query answered:
//!
//! * an Arrow IPC reply whose LZ4 or ZSTD buffers claim 64 TiB uncompressed (it used to abort
//!   `udfsql --isolate` with `memory allocation of 70368744177664 bytes failed`);
//! * well-formed replies the in-process path refuses: a NULL from a v1 function, a value in a
//!   STRICT row, a decimal over its precision (also as a list item), a result of another type,
//!   a dictionary-encoded result;
//! * raw columns (the lean encoding of simple types) forged field by field: another type, other
//!   rows, an unknown tag or encoding, buffer lengths short or past the column, bytes after the
//!   last buffer, offsets backwards or past the data, data that is not UTF-8;
//! * replies that do not fit the region: a length past the region's end, a frame whose buffers
//!   lie past its own end (in bytes the region holds from elsewhere);
//! * a worker that overwrites its replies after publishing them, tries to shrink its regions, or
//!   grows them to 1 TiB;
//! * and mutated replies thrown at the decoder with a fixed seed, under an address-space limit
//!   (`udf_engine::isolation::fuzz_worker_replies`).
#![forbid(unsafe_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, ArrayRef, Decimal128Array, DictionaryArray, Int64Array, ListArray, RecordBatch,
    StringArray,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Schema};
use datafusion::arrow::ipc::CompressionType;
use datafusion::arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use udf_engine::{Isolation, WorkerLimits};
use udf_tests::{c_library, expect, fixture_dir, query, rows, udfsql, udfsql_worker};

/// Held by every test that starts workers in this process (their pids are compared).
static WORKERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`WORKERS`] once the workers of the test before are gone. A pool is shared by every
/// registration of the same library and limits while one is alive, and the test before can keep
/// its pool a moment past its end (its runtime still dropping the last query's tasks, which hold
/// the plan). A test that registered then would be served by the other test's workers: after
/// the scribbling test, by a worker that overwrites every reply (seen in CI, when [`Forging`]
/// still released the lock before its session: the raw-column test's first case refused for the
/// scribbler's 0xAB bytes instead of its own forgery).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let serial = WORKERS.lock().await;
    let limit = Duration::from_secs(20);
    let start = std::time::Instant::now();
    loop {
        let live = udf_engine::live_worker_pids();
        if live.is_empty() {
            return serial;
        }
        assert!(
            start.elapsed() < limit,
            "the workers of the test before are still alive after {limit:?}: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn forge_library() -> PathBuf {
    c_library("forge", "forge.c", &[])
}

fn forge_v1_library() -> PathBuf {
    c_library("forge_v1", "forge.c", &["V1"])
}

/// The IPC stream of a one-column batch holding `array`, as a worker writes it (or compressed).
fn ipc_stream(array: &ArrayRef, options: IpcWriteOptions) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "v",
        array.data_type().clone(),
        true,
    )]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::clone(array)]).unwrap();
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new_with_options(&mut out, &schema, options).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    drop(writer);
    out
}

/// A result frame around an IPC stream: `udfw`, the body length, `R`, 7 zero bytes, the stream.
fn result_frame(stream: &[u8]) -> Vec<u8> {
    let mut frame = b"udfw".to_vec();
    frame.extend_from_slice(&(8 + stream.len() as u32).to_le_bytes());
    frame.extend_from_slice(&[b'R', 0, 0, 0, 0, 0, 0, 0]);
    frame.extend_from_slice(stream);
    frame
}

/// Sets the 8-byte "uncompressed length" that starts every compressed buffer of the record
/// batch in `stream` to `claim`; returns how many buffers were patched. The offsets come from
/// the batch's own metadata, read with arrow's flatbuffer reader.
fn claim_uncompressed(stream: &mut [u8], claim: u64) -> usize {
    // Messages: 0xffffffff, metadata length, metadata, body. The schema first, then the batch.
    let message_at = |at: usize| -> (usize, usize) {
        let meta = u32::from_le_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
        (at + 8, meta)
    };
    let (schema_meta, schema_len) = message_at(0);
    let schema =
        datafusion::arrow::ipc::root_as_message(&stream[schema_meta..][..schema_len]).unwrap();
    let batch_at = schema_meta + schema_len + schema.bodyLength() as usize;
    let (batch_meta, batch_len) = message_at(batch_at);
    let message =
        datafusion::arrow::ipc::root_as_message(&stream[batch_meta..][..batch_len]).unwrap();
    let body = batch_meta + batch_len;
    let record = message.header_as_record_batch().unwrap();
    assert!(record.compression().is_some(), "the stream is compressed");
    let at: Vec<usize> = record
        .buffers()
        .unwrap()
        .iter()
        .filter(|b| b.length() >= 8)
        .map(|b| body + b.offset() as usize)
        .collect();
    for &at in &at {
        stream[at..at + 8].copy_from_slice(&claim.to_le_bytes());
    }
    at.len()
}

/// A file holding `bytes`, for the fixture to forge with: `target/udf-fixtures/forged-PID/name`.
fn frame_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = fixture_dir().join(format!("forged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// 64 TiB: what the reported attack claims, 70368744177664 bytes.
const SIXTY_FOUR_TIB: u64 = 64 << 40;

/// A reply whose compressed Int64 buffers claim 64 TiB once decompressed.
fn bomb_frame(codec: CompressionType, rows: usize) -> Vec<u8> {
    let array: ArrayRef = Arc::new(Int64Array::from(
        (0..rows as i64).map(|i| i * 7).collect::<Vec<_>>(),
    ));
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(codec))
        .expect("arrow-ipc is built with lz4 and zstd");
    let mut stream = ipc_stream(&array, options);
    assert!(claim_uncompressed(&mut stream, SIXTY_FOUR_TIB) > 0);
    result_frame(&stream)
}

fn canonical(path: &Path) -> String {
    path.canonicalize().unwrap().display().to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. The decompression bomb, against the real `udfsql --isolate`.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_compressed_reply_claiming_64_tib_is_a_malformed_reply_not_an_abort() {
    let library = forge_library();
    for (codec, name) in [
        (CompressionType::LZ4_FRAME, "lz4"),
        (CompressionType::ZSTD, "zstd"),
    ] {
        let file = frame_file(&format!("bomb-{name}.frame"), &bomb_frame(codec, 1));
        let forged = format!("SELECT forge('{}', 1) AS x", file.display());
        let output = Command::new("sh")
            .arg("-c")
            .arg("ulimit -c 0 && exec \"$0\" \"$@\"")
            .arg(udfsql())
            .args(["--isolate", "--call-timeout", "20", "--plugin"])
            .arg(&library)
            .args(["--format", "csv", "-c", &forged, "-c", "SELECT ok(41) AS y"])
            .env_remove("UDFSQL_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run udfsql");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.signal(),
            None,
            "{name}: udfsql was killed by a signal (the host aborted); stderr:\n{stderr}"
        );
        assert_eq!(output.status.code(), Some(1), "{name}: stderr:\n{stderr}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "y\n42\n",
            "{name}: the next statement answers with a new worker; stderr:\n{stderr}"
        );
        let named = format!("plugin function forge ({})", canonical(&library));
        assert!(
            stderr.contains(&named)
                && stderr.contains("malformed reply")
                && stderr.contains("compression")
                && stderr.contains("the worker was killed"),
            "{name}: {stderr}"
        );
        assert!(!stderr.contains("memory allocation"), "{name}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Well-formed forgeries, through the API in this process.
// ---------------------------------------------------------------------------------------------

/// A session with `t(x BIGINT)` = 1, NULL, 3 in one batch and one partition (one call of three
/// rows), and `u(x BIGINT)` = 1, 2, 3.
fn session() -> SessionContext {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    for (name, values) in [
        ("t", [Some(1), None, Some(3)]),
        ("u", [Some(1), Some(2), Some(3)]),
    ] {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from(values.to_vec()))],
        )
        .unwrap();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table(name, Arc::new(table)).unwrap();
    }
    ctx
}

fn isolated() -> Isolation {
    Isolation::Process(WorkerLimits {
        call_timeout: Duration::from_secs(20),
        worker_program: Some(udfsql_worker()),
        workers: Some(1),
        ..Default::default()
    })
}

/// A test's forge library registered isolated in a [`session`], with the lock every test that
/// starts workers holds (kept as long as the value). Fields drop in order: the lock goes last,
/// after the session and the registrations that hold the pool.
struct Forging {
    library: PathBuf,
    ctx: SessionContext,
    _registered: Vec<udf_engine::Registration>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Forging {
    async fn start() -> Forging {
        let serial = serial().await;
        let library = forge_library();
        let ctx = session();
        let registered = udf_engine::register_plugin_with(&ctx, &library, &isolated()).unwrap();
        Forging {
            _serial: serial,
            library,
            ctx,
            _registered: registered,
        }
    }
}

/// A query of the forge library that answers honestly over `t`, and its rows.
const OK_SQL: &str = "SELECT ok(x) AS v FROM t";
const OK_ROWS: &[&[&str]] = &[&["2"], &["NULL"], &["4"]];

/// The live worker of the pool (there is one: `workers: Some(1)`), waiting for a replacement to
/// start if needed.
async fn the_worker(ctx: &SessionContext, ok_sql: &str) -> u32 {
    // A call makes sure the pool's worker is up.
    assert!(!rows(ctx, ok_sql).await.is_empty());
    let live = udf_engine::live_worker_pids();
    assert_eq!(live.len(), 1, "one live worker: {live:?}");
    live[0]
}

/// Runs `sql` (which makes the fixture forge `frame`) and checks the refusal: a malformed reply
/// naming `function` and `library` and saying `says`; the forging worker killed and gone; the
/// next query (`ok_sql`, answering `ok_rows`) served by a new worker.
async fn refused(
    ctx: &SessionContext,
    library: &Path,
    function: &str,
    sql: &str,
    says: &str,
    ok_sql: &str,
    ok_rows: &[&[&str]],
) {
    let before = the_worker(ctx, ok_sql).await;
    let error = match query(ctx, sql).await {
        Ok(batches) => panic!("{function}: the forged reply was accepted: {batches:?}"),
        Err(e) => e.to_string(),
    };
    let named = format!("plugin function {function} ({})", canonical(library));
    assert!(
        error.contains(&named)
            && error.contains("malformed reply")
            && error.contains("the worker was killed"),
        "{function}: {error}"
    );
    assert!(error.contains(says), "{function}: `{says}` in: {error}");
    assert!(
        !udf_engine::live_worker_pids().contains(&before),
        "{function}: the forging worker {before} was killed and reaped"
    );
    assert_eq!(rows(ctx, ok_sql).await, expect(ok_rows), "{function}");
    let after = the_worker(ctx, ok_sql).await;
    assert_ne!(after, before, "{function}: a new worker answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_from_a_v1_function_is_refused() {
    let _serial = serial().await;
    let library = forge_v1_library();
    let ctx = session();
    let _registered = udf_engine::register_plugin_with(&ctx, &library, &isolated()).unwrap();
    // Well-formed, three rows of the declared BIGINT: but a v1 function never returns NULL.
    let reply: ArrayRef = Arc::new(Int64Array::from(vec![Some(2), None, Some(4)]));
    let file = frame_file(
        "v1-null.frame",
        &result_frame(&ipc_stream(&reply, IpcWriteOptions::default())),
    );
    let sql = format!("SELECT forge_v1('{}', x) AS v FROM u", file.display());
    // The v1 library's one function also answers normally when its file is missing.
    let ok_sql = "SELECT forge_v1('/nonexistent', x) AS v FROM u";
    refused(
        &ctx,
        &library,
        "forge_v1",
        &sql,
        "declared never to return NULL",
        ok_sql,
        &[&["2"], &["3"], &["4"]],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_values_the_in_process_rules_refuse_are_refused() {
    let forging = Forging::start().await;
    let (ctx, library) = (&forging.ctx, &forging.library);
    let (ok_sql, ok_rows) = (OK_SQL, OK_ROWS);
    // An honest isolated result with a STRICT row passes the host's rules.
    assert_eq!(rows(ctx, ok_sql).await, expect(ok_rows));

    let frame = |array: ArrayRef| result_frame(&ipc_stream(&array, IpcWriteOptions::default()));
    let decimals = |values: Vec<Option<i128>>| -> ArrayRef {
        Arc::new(
            Decimal128Array::from(values)
                .with_precision_and_scale(5, 2)
                .unwrap(),
        )
    };
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            // x is NULL in row 1 and does not take NULLs: that row is NULL, whatever was sent.
            "strict",
            "forge",
            frame(Arc::new(Int64Array::from(vec![2, 20, 4]))),
            "row 1 is not NULL, but an argument that does not take NULLs is NULL there",
        ),
        (
            // Row 1 is NULL (STRICT) in every forged decimal reply: only the precision is wrong.
            "decimal",
            "forge_dec",
            frame(decimals(vec![Some(1_234_567), None, Some(100)])),
            "row 0 holds 1234567 (unscaled), which has more than the 5 digits of the declared \
             DECIMAL(5,2)",
        ),
        (
            "decimal-list-item",
            "forge_dec_list",
            frame(Arc::new(ListArray::new(
                Arc::new(Field::new("item", DataType::Decimal128(5, 2), true)),
                OffsetBuffer::new(vec![0, 2, 2, 2].into()),
                decimals(vec![Some(200), Some(1_234_567)]),
                Some(NullBuffer::from(vec![true, false, true])),
            ))),
            "list item 1 of row 0 holds 1234567 (unscaled), which has more than the 5 digits",
        ),
        (
            "type",
            "forge",
            frame(Arc::new(StringArray::from(vec!["2", "3", "4"]))),
            "a result of type Utf8 where Int64 was declared",
        ),
        (
            "dictionary",
            "forge",
            frame(Arc::new(
                vec![Some("a"), None, Some("b")]
                    .into_iter()
                    .collect::<DictionaryArray<Int32Type>>(),
            )),
            "dictionar",
        ),
        (
            "rows",
            "forge",
            frame(Arc::new(Int64Array::from(vec![2, 3, 4, 5]))),
            "4 rows for a call over 3",
        ),
        (
            "lz4",
            "forge",
            bomb_frame(CompressionType::LZ4_FRAME, 3),
            "compression",
        ),
    ];
    for (name, function, bytes, says) in cases {
        let file = frame_file(&format!("{name}.frame"), &bytes);
        let sql = format!("SELECT {function}('{}', x) AS v FROM t", file.display());
        refused(ctx, library, function, &sql, says, ok_sql, ok_rows).await;
    }
}

/// A result frame of a raw column, written by hand as a forger would (the encoding the worker
/// uses for simple types): `R`, the encoding byte 1, 6 zero bytes; the column's header (type
/// tag, validity flag, 6 zero bytes, `u64` rows), the `u64` length of each buffer, the buffers
/// padded to 8.
fn raw_frame(tag: u8, validity_flag: u8, rows: u64, buffers: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![
        b'R',
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        tag,
        validity_flag,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&rows.to_le_bytes());
    for b in buffers {
        body.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    for b in buffers {
        body.extend_from_slice(b);
        body.resize(body.len().next_multiple_of(8), 0);
    }
    let mut frame = b"udfw".to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The raw column's type tags of BIGINT and VARCHAR (rows of the table in `raw`).
const RAW_INT64: u8 = 3;
const RAW_UTF8: u8 = 19;

fn le_bytes<const W: usize, T>(values: &[T], to: impl Fn(&T) -> [u8; W]) -> Vec<u8> {
    values.iter().flat_map(to).collect()
}

/// Raw columns, the lean encoding of simple types (issue 25): each field a forger controls is
/// checked before anything is built on it, and the result rules run on what is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raw_columns_are_refused() {
    let forging = Forging::start().await;
    let (ctx, library) = (&forging.ctx, &forging.library);
    let (ok_sql, ok_rows) = (OK_SQL, OK_ROWS);
    let ints = |v: &[i64]| le_bytes(v, |x| x.to_le_bytes());
    let offsets = |v: &[i32]| le_bytes(v, |x| x.to_le_bytes());
    // Row 1 NULL (bit 1 clear), as an honest worker answers for `t`.
    let validity: &[u8] = &[0b101];
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "raw-strict",
            "forge",
            raw_frame(RAW_INT64, 0, 3, &[&ints(&[2, 20, 4])]),
            "row 1 is not NULL, but an argument that does not take NULLs is NULL there",
        ),
        (
            "raw-type",
            "forge",
            raw_frame(RAW_UTF8, 0, 3, &[&offsets(&[0, 1, 2, 3]), b"234"]),
            "a result of type Utf8 where Int64 was declared",
        ),
        (
            "raw-rows",
            "forge",
            raw_frame(RAW_INT64, 1, 4, &[validity, &ints(&[2, 0, 4, 5])]),
            "4 rows for a call over 3",
        ),
        (
            "raw-tag",
            "forge",
            raw_frame(99, 1, 3, &[validity, &ints(&[2, 0, 4])]),
            "unknown raw column type tag 99",
        ),
        (
            "raw-short-values",
            "forge",
            raw_frame(RAW_INT64, 1, 3, &[validity, &ints(&[2, 0])]),
            "buffer 1 of 16 bytes where 3 rows of Int64 take 24",
        ),
        (
            "raw-validity-flag",
            "forge",
            raw_frame(RAW_INT64, 2, 3, &[validity, &ints(&[2, 0, 4])]),
            "a validity flag of 2",
        ),
        (
            "raw-offsets-past-data",
            "forge_text",
            raw_frame(RAW_UTF8, 1, 3, &[validity, &offsets(&[0, 1, 1, 90]), b"ac"]),
            "Last offset 90 of Utf8 is larger than values length 2",
        ),
        (
            "raw-offsets-backwards",
            "forge_text",
            raw_frame(RAW_UTF8, 1, 3, &[validity, &offsets(&[0, 2, 1, 2]), b"ac"]),
            "offsets are not monotonically increasing",
        ),
        (
            "raw-not-utf8",
            "forge_text",
            raw_frame(
                RAW_UTF8,
                1,
                3,
                &[validity, &offsets(&[0, 1, 1, 2]), &[0xc3, 0x28]],
            ),
            "invalid UTF-8",
        ),
    ];
    // A data length past the column (its bytes are zeros the region holds beyond the frame).
    let mut past = raw_frame(RAW_UTF8, 1, 3, &[validity, &offsets(&[0, 1, 1, 2]), b"ac"]);
    let data_len_at = 8 + 8 + 16 + 16;
    past[data_len_at..data_len_at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    // An encoding that is neither IPC nor raw; bytes after the last buffer.
    let mut encoding = raw_frame(RAW_INT64, 1, 3, &[validity, &ints(&[2, 0, 4])]);
    encoding[9] = 7;
    let mut trailing = raw_frame(RAW_INT64, 1, 3, &[validity, &ints(&[2, 0, 4])]);
    trailing.extend_from_slice(&[0; 8]);
    let body = u32::from_le_bytes(trailing[4..8].try_into().unwrap()) + 8;
    trailing[4..8].copy_from_slice(&body.to_le_bytes());
    let cases = cases.into_iter().chain([
        ("raw-data-past-column", "forge_text", past, "past the end"),
        (
            "raw-encoding",
            "forge",
            encoding,
            "unknown column encoding 7",
        ),
        (
            "raw-trailing",
            "forge",
            trailing,
            "8 bytes after the last buffer",
        ),
    ]);
    for (name, function, bytes, says) in cases {
        let file = frame_file(&format!("{name}.frame"), &bytes);
        let sql = format!("SELECT {function}('{}', x) AS v FROM t", file.display());
        refused(ctx, library, function, &sql, says, ok_sql, ok_rows).await;
    }
    // The same encoding, honest, is answered: the forger's own raw reply passes every check.
    let honest = raw_frame(RAW_INT64, 1, 3, &[validity, &ints(&[7, 0, 9])]);
    let file = frame_file("raw-honest.frame", &honest);
    let sql = format!("SELECT forge('{}', x) AS v FROM t", file.display());
    assert_eq!(rows(ctx, &sql).await, expect(&[&["7"], &["NULL"], &["9"]]));
}

// ---------------------------------------------------------------------------------------------
// 3. The shared regions (issue 25).
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_do_not_fit_the_shared_region_are_refused() {
    let forging = Forging::start().await;
    let (ctx, library) = (&forging.ctx, &forging.library);
    let (ok_sql, ok_rows) = (OK_SQL, OK_ROWS);
    let text: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("c")]));
    let honest = result_frame(&ipc_stream(&text, IpcWriteOptions::default()));
    // A header claiming 64 MiB (a VARCHAR result may be that long) in a region of 1 MiB.
    let mut past_region = honest.clone();
    past_region[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes());
    // A header 64 bytes short of the stream: the batch's buffers lie past the frame, in bytes
    // the region holds (written there by the forger, as another call's reply would be).
    let mut short = honest.clone();
    let body = u32::from_le_bytes(short[4..8].try_into().unwrap());
    short[4..8].copy_from_slice(&(body - 64).to_le_bytes());
    for (name, bytes, says) in [
        (
            "past-region",
            past_region,
            "past the end of the shared region",
        ),
        ("short", short, "a body of"),
    ] {
        let file = frame_file(&format!("{name}.frame"), &bytes);
        let sql = format!("SELECT forge_text('{}', x) AS v FROM t", file.display());
        refused(ctx, library, "forge_text", &sql, says, ok_sql, ok_rows).await;
    }
}

/// A worker whose plugin overwrites every reply right after the worker published it: each query
/// is answered right (the host copied the reply before the overwrite) or refused as malformed
/// (it copied the overwrite), never answered wrong, and the host serves the next query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_overwrites_its_replies_never_gives_a_wrong_answer() {
    let forging = Forging::start().await;
    let ctx = &forging.ctx;
    let (mut right, mut refused) = (0, 0);
    for _ in 0..20 {
        match query(ctx, "SELECT scribble(x) AS v FROM u").await {
            Ok(batches) => {
                assert_eq!(
                    int64_values(&batches),
                    [2, 3, 4],
                    "an answer is the right one"
                );
                right += 1;
            }
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("plugin function scribble") && e.contains("malformed reply"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "the overwrites were seen ({right} right answers)"
    );
    // The scribbling worker may still be alive (its last answers were copied in time): each of
    // its replies to another function is right or refused too, and once it is refused, the
    // next query is answered by a new worker.
    let ok_sql = "SELECT ok(x) AS v FROM u";
    let mut answered = false;
    for _ in 0..10 {
        match query(ctx, ok_sql).await {
            Ok(batches) => {
                assert_eq!(
                    int64_values(&batches),
                    [2, 3, 4],
                    "an answer is the right one"
                );
                answered = true;
                break;
            }
            Err(e) => assert!(e.to_string().contains("malformed reply"), "{e}"),
        }
    }
    assert!(answered, "ok(x) was refused ten times in a row");
}

/// The values of the first column of `batches`, an Int64 column without NULLs.
fn int64_values(batches: &[RecordBatch]) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let column = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            assert_eq!(column.null_count(), 0);
            column.values().to_vec()
        })
        .collect()
}

/// A worker that floods the channel with doorbell bytes (4096 where one per reply is rung): the
/// call is refused as malformed after one bounded read, not looped on, and the next query is
/// answered by a new worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_flooding_its_doorbell_is_refused() {
    let forging = Forging::start().await;
    let (ctx, library) = (&forging.ctx, &forging.library);
    refused(
        ctx,
        library,
        "flood_bells",
        "SELECT flood_bells(x) AS v FROM u",
        "doorbells on the channel",
        "SELECT ok(x) AS v FROM u",
        &[&["2"], &["3"], &["4"]],
    )
    .await;
}

/// This process's address space, in KiB (`VmSize`).
fn vm_size_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .expect("VmSize in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The regions are sealed against shrinking: a plugin's `ftruncate(fd, 0)` on them fails with
/// EPERM (the kernel's answer, returned by the function). Growing them to 1 TiB succeeds, and the
/// host maps no more of them than replies take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_shrink_its_regions_and_growing_them_costs_the_host_nothing() {
    let forging = Forging::start().await;
    let ctx = &forging.ctx;
    let eperm = libc::EPERM.to_string();
    assert_eq!(
        rows(ctx, "SELECT truncate_regions(x) AS v FROM u").await,
        expect(&[&[&eperm], &[&eperm], &[&eperm]])
    );
    let before = vm_size_kib();
    assert_eq!(
        rows(ctx, "SELECT grow_regions(x) AS v FROM u").await,
        expect(&[&["2"], &["3"], &["4"]])
    );
    assert_eq!(
        rows(ctx, "SELECT ok(x) AS v FROM u").await,
        expect(&[&["2"], &["3"], &["4"]])
    );
    let grown = vm_size_kib().saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "the host's address space grew by {grown} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Mutated replies, under an address-space limit.
// ---------------------------------------------------------------------------------------------

/// The environment variable that makes this test binary run the fuzzer itself (in the child
/// that the test below starts under `ulimit -v`).
const FUZZ_CHILD: &str = "UDF_FORGED_REPLIES_FUZZ_CHILD";

/// Address space for the fuzzing child, in KiB: the test binary and its libraries, with room for
/// honest decoding, but far less than one absurd allocation.
const FUZZ_ADDRESS_SPACE_KIB: u64 = 4 << 20;

#[test]
fn mutated_replies_are_refused_or_sound_under_a_memory_limit() {
    if std::env::var_os(FUZZ_CHILD).is_some() {
        let report = udf_engine::isolation::fuzz_worker_replies(0x00f0_29ed, 6000);
        println!("{report:?}");
        assert!(report.clean(), "{report:#?}");
        assert!(
            report.accepted > 100 && report.refused > 1000,
            "{report:#?}"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -c 0 && ulimit -v {FUZZ_ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(&exe)
        .args([
            "--exact",
            "mutated_replies_are_refused_or_sound_under_a_memory_limit",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(FUZZ_CHILD, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the fuzzing child failed ({:?}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("FuzzReport"), "{stdout}");
}
