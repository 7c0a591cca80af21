//! The messages between the host and a worker process.
//!
//! Every message is a frame: the magic bytes `udfw`, a little-endian `u32` body length, then the
//! body, whose first byte is its kind. Arrays cross as columns (one per argument, one for the
//! result): raw buffers when the type is one of the simple ones `raw` lists (numbers, dates,
//! booleans, strings, binaries: no schema, no flatbuffer), else Arrow IPC streams of one column;
//! an encoding byte says which. One call is one request and one reply, whatever the number of
//! rows. The ready message (and an error before it) crosses the channel; the setup message
//! carries the two shared regions; calls and replies are written into those regions (see
//! `shared`), encoded in place through a [`Sink`].
//!
//! | kind | direction      | where   | body after the kind byte                                   |
//! |------|----------------|---------|-------------------------------------------------------------|
//! | `H`  | worker → host  | channel | `u32` number of functions: the library loaded, the worker is ready |
//! | `M`  | host → worker  | channel | nothing; the input and output regions attached (`SCM_RIGHTS`) |
//! | `C`  | host → worker  | input region | `u32` function, `u8` path (0 row, 1 batch), `u64` rows, `u16` n, n × (`u8` constant flag, `u8` encoding (0 IPC, 1 raw), 2 zero bytes, `u32` length, the column, zeros to a multiple of 8) |
//! | `R`  | worker → host  | output region | `u8` encoding (0 IPC, 1 raw), 6 zero bytes, the result column |
//! | `E`  | worker → host  | either  | UTF-8 message: the call (or the load) failed the way it fails in-process |
//! | `A`  | host → worker  | input region | an aggregate request (ABI 2.4, [`AggregateOp`]): `u8` op, 3 zero bytes, `u32` function or accumulator, then per op: feed: `u8` feed kind, `u8` has groups, `u8` has filter, 5 zero bytes, `u64` rows, `u64` total groups, `u16` n, 6 zero bytes, rows × `u64` group numbers, rows filter bytes and zeros to a multiple of 8, n columns as a call's arguments; emit: `u8` state, `u8` mode, 6 zero bytes, `u64` first |
//! | `K`  | worker → host  | output region | 7 zero bytes, `u64`: an accumulator's number (create), its size in bytes (feed), 0 (destroy) |
//!
//! The header of a call is 16 bytes, so every column starts at a multiple of 8 in the body and
//! its buffers are used where they lie, without a copy.
//!
//! Everything a worker sends is untrusted (the plugin shares its process and can write to the
//! channel). Before arrow's decoder sees an IPC stream, [`decode_array`] walks its messages
//! itself: the continuation marker and metadata length of each, the flatbuffer (verified), a
//! body that fits in what is left, exactly one schema then one record batch then the end marker;
//! the schema's field tree shaped like the expected type (so its size is the declared type's, not
//! the message's), no dictionary, and the converted type equal to the declared one *before* the
//! batch is decoded; no body compression (an LZ4 or ZSTD buffer says its own uncompressed size,
//! which nothing bounds), the declared number of rows, and every field node, buffer and variadic
//! buffer count within the body. A raw column is checked as `raw` says (its type tag, rows,
//! every buffer's length and place, then the full validation of a plugin's result). Allocations
//! are then bounded by the frame, and a frame by what the call can return ([`max_reply_len`]).
//! The host then checks the decoded result with the in-process rules
//! (`PluginFunction::check_received_result`). [`fuzz_worker_replies`] throws
//! mutated replies at the decoder.

use std::io::Write;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::ipc::{self, MessageHeader, MetadataVersion, root_as_message};

use crate::async_udf::AsyncLimits;
use crate::call_path::CallPath;
use crate::ffi::shm::RegionWriter;
use crate::types::arrow::MAX_DEPTH;
use crate::types::fuzz::Rng;

use super::raw;

/// The kind byte of a ready message.
pub(crate) const READY: u8 = b'H';
/// The kind byte of a call request.
pub(crate) const CALL: u8 = b'C';
/// The kind byte of a result.
pub(crate) const RESULT: u8 = b'R';
/// The kind byte of an error.
pub(crate) const ERROR: u8 = b'E';
/// The kind byte of an aggregate request.
pub(crate) const AGGREGATE: u8 = b'A';
/// The kind byte of an acknowledgement carrying a number.
pub(crate) const ACK: u8 = b'K';

/// The largest frame either side accepts (a result column over 2 GiB is refused in-process too).
pub(crate) const MAX_FRAME: usize = i32::MAX as usize;

/// The longest error message a worker sends (longer ones are cut), in bytes.
const MAX_ERROR_MESSAGE: usize = 64 * 1024;

/// The largest body of a message that is not a result: an error (kind byte and message) or a
/// ready message.
pub(crate) const MAX_ERROR_BODY: usize = 1 + MAX_ERROR_MESSAGE;

/// The most rows one call may ask for (a column's 32-bit offsets hold no more).
const MAX_CALL_ROWS: usize = i32::MAX as usize;

/// The most fields a stream's schema may have when no declared type shapes it (a call's
/// arguments), and how deep they may nest.
const MAX_STREAM_FIELDS: usize = 64 * 1024;
const MAX_STREAM_DEPTH: usize = MAX_DEPTH + 2;

/// The first bytes of every frame: a stray write into the channel is caught at once.
pub(crate) const MAGIC: [u8; 4] = *b"udfw";
/// The frame header: magic and body length.
pub(crate) const HEADER: usize = 8;

/// Where a frame is encoded: a byte vector (the channel, tests), or a shared region (calls and
/// replies, written in place).
pub(crate) trait Sink: Write {
    /// Starts over, empty.
    fn reset(&mut self);
    /// Bytes written so far.
    fn written(&self) -> usize;
    /// Overwrites bytes written before, at `at`.
    fn patch(&mut self, at: usize, bytes: &[u8]) -> Result<(), String>;
}

impl Sink for Vec<u8> {
    fn reset(&mut self) {
        self.clear();
    }
    fn written(&self) -> usize {
        self.len()
    }
    fn patch(&mut self, at: usize, bytes: &[u8]) -> Result<(), String> {
        self.get_mut(at..at + bytes.len())
            .ok_or("a patch past what was written")?
            .copy_from_slice(bytes);
        Ok(())
    }
}

impl Sink for RegionWriter<'_> {
    fn reset(&mut self) {
        RegionWriter::reset(self);
    }
    fn written(&self) -> usize {
        RegionWriter::written(self)
    }
    fn patch(&mut self, at: usize, bytes: &[u8]) -> Result<(), String> {
        RegionWriter::patch(self, at, bytes).map_err(|e| e.to_string())
    }
}

/// Appends `bytes` to a frame.
pub(super) fn put<S: Sink>(out: &mut S, bytes: &[u8]) -> Result<(), String> {
    out.write_all(bytes)
        .map_err(|e| format!("cannot write a message: {e}"))
}

/// Starts a frame of `kind` in `out` (cleared); [`finish_frame`] writes its length.
pub(crate) fn start_frame<S: Sink>(out: &mut S, kind: u8) -> Result<(), String> {
    out.reset();
    put(out, &MAGIC)?;
    put(out, &[0, 0, 0, 0, kind])
}

/// Writes the length of the frame in `out`.
pub(crate) fn finish_frame<S: Sink>(out: &mut S) -> Result<(), String> {
    let body = out.written() - HEADER;
    if body > MAX_FRAME {
        return Err(format!("a message of {body} bytes is over the 2 GiB limit"));
    }
    out.patch(4, &(body as u32).to_le_bytes())
}

/// The body length in a frame header, or why the header is not one.
pub(crate) fn body_len(header: &[u8; HEADER]) -> Result<usize, String> {
    if header[..4] != MAGIC {
        return Err(format!("a message starts with {:02x?}", &header[..]));
    }
    let len = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(format!("a message of {len} bytes"));
    }
    Ok(len)
}

/// Pads the frame in `out` so that the next byte of its body starts at a multiple of 8, where
/// IPC buffers can be used in place.
fn pad_to_8<S: Sink>(out: &mut S) -> Result<(), String> {
    let body = out.written() - HEADER;
    put(out, &[0u8; 8][..(8 - body % 8) % 8])
}

/// Appends `array` as an IPC stream of one column.
fn put_array<S: Sink>(out: &mut S, array: &ArrayRef) -> Result<(), ArrowError> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "v",
        array.data_type().clone(),
        true,
    )]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::clone(array)])?;
    let mut writer = StreamWriter::try_new(&mut *out, &schema)?;
    writer.write(&batch)?;
    writer.finish()
}

/// How a column is encoded: the byte after a call column's flag, and after a result's kind.
const IPC: u8 = 0;
const RAW: u8 = 1;

/// Appends `array` raw when its type allows ([`raw`]), else as an IPC stream; the encoding used.
fn put_any_array<S: Sink>(out: &mut S, array: &ArrayRef) -> Result<u8, String> {
    if raw::put_array(out, array)? {
        return Ok(RAW);
    }
    put_array(out, array).map_err(|e| e.to_string())?;
    Ok(IPC)
}

/// Decodes a column encoded as `encoding` says.
fn decode_any_array(encoding: u8, column: &Buffer, expect: Expect<'_>) -> Result<ArrayRef, String> {
    match encoding {
        IPC => decode_array(column, expect),
        RAW => raw::decode_array(column, expect.data_type, expect.rows),
        other => Err(format!("unknown column encoding {other}")),
    }
}

/// One column of a request: a flag byte, the encoding byte, 2 zero bytes, the `u32` length of
/// the column (raw or an IPC stream), the column, zeros to a multiple of 8.
fn put_column<S: Sink>(out: &mut S, flag: u8, array: &ArrayRef) -> Result<(), String> {
    let encoding_at = out.written() + 1;
    put(out, &[flag, 0, 0, 0])?;
    let at = out.written();
    put(out, &[0; 4])?;
    let encoding = put_any_array(out, array)?;
    let len = out.written() - at - 4;
    out.patch(at, &(len as u32).to_le_bytes())?;
    out.patch(encoding_at, &[encoding])?;
    pad_to_8(out)
}

/// The next column of a request (see [`put_column`]) of `rows` rows: its flag byte and array.
fn take_column(
    cursor: &mut Cursor<'_>,
    body: &Buffer,
    rows_of: impl Fn(u8) -> usize,
) -> Result<(u8, ArrayRef), String> {
    let bytes = body.as_slice();
    let flag = cursor.u8()?;
    let encoding = cursor.u8()?;
    if cursor.take(2)? != [0, 0] {
        return Err("a column header with nonzero padding".to_string());
    }
    let len = cursor.u32()? as usize;
    let start = bytes.len() - cursor.0.len();
    cursor.take(len)?;
    let end = start + len;
    cursor.take((8 - end % 8) % 8)?;
    let expect = Expect {
        data_type: None,
        rows: rows_of(flag),
    };
    let array = decode_any_array(encoding, &body.slice_with_length(start, len), expect)?;
    Ok((flag, array))
}

/// A call request for `function` over `args` (arrays with their "one value for every row"
/// flags) and `rows` rows.
pub(crate) fn encode_call<S: Sink>(
    out: &mut S,
    function: usize,
    path: CallPath,
    asynchronous: Option<&AsyncLimits>,
    args: &[(ArrayRef, bool)],
    rows: usize,
) -> Result<(), String> {
    start_frame(out, CALL)?;
    put(out, &(function as u32).to_le_bytes())?;
    match asynchronous {
        // An asynchronous function's calls, made by the worker with these limits.
        Some(limits) => {
            put(out, &[ASYNC_PATH])?;
            put(out, &(limits.max_in_flight as u32).to_le_bytes())?;
            put(out, &(limits.chunk_rows as u32).to_le_bytes())?;
            let ms = u64::try_from(limits.call_timeout.as_millis()).unwrap_or(u64::MAX);
            put(out, &ms.to_le_bytes())?;
            put(out, &limits.retries.to_le_bytes())?;
        }
        None => put(
            out,
            &[match path {
                CallPath::Row => 0,
                CallPath::Batch => 1,
            }],
        )?,
    }
    put(out, &(rows as u64).to_le_bytes())?;
    put(out, &(args.len() as u16).to_le_bytes())?;
    for (i, (array, constant)) in args.iter().enumerate() {
        put_column(out, u8::from(*constant), array)
            .map_err(|e| format!("argument {}: {e}", i + 1))?;
    }
    finish_frame(out)
}

/// The path byte of a call of an asynchronous function (its limits follow).
const ASYNC_PATH: u8 = 2;

/// A decoded call request.
#[derive(Debug)]
pub(crate) struct Call {
    pub function: usize,
    pub path: CallPath,
    /// The limits of an asynchronous function's calls (the worker makes them).
    pub asynchronous: Option<AsyncLimits>,
    pub rows: usize,
    pub args: Vec<(ArrayRef, bool)>,
}

/// Reads fixed-size fields off the front of a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "message ends early: {n} bytes expected, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Decodes a call request body (after the kind byte). `body` is one buffer; the arrays decoded
/// from it share it.
pub(crate) fn decode_call(body: &Buffer) -> Result<Call, String> {
    let bytes = body.as_slice();
    let mut cursor = Cursor(&bytes[1..]);
    let function = cursor.u32()? as usize;
    let mut asynchronous = None;
    let path = match cursor.u8()? {
        0 => CallPath::Row,
        1 => CallPath::Batch,
        ASYNC_PATH => {
            let max_in_flight = cursor.u32()? as usize;
            let chunk_rows = cursor.u32()? as usize;
            let ms = cursor.u64()?;
            let retries = cursor.u32()?;
            // Brought within the bounds every caller gets.
            asynchronous = Some(
                AsyncLimits::new(
                    max_in_flight,
                    chunk_rows,
                    std::time::Duration::from_millis(ms),
                )
                .with_retries(retries),
            );
            CallPath::Batch
        }
        other => return Err(format!("unknown call path {other}")),
    };
    let rows = usize::try_from(cursor.u64()?)
        .ok()
        .filter(|&rows| rows <= MAX_CALL_ROWS)
        .ok_or("a call over more rows than a column holds")?;
    let n = cursor.u16()?;
    let mut args = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (flag, array) = take_column(&mut cursor, body, |flag| if flag != 0 { 1 } else { rows })
            .map_err(|e| format!("argument {}: {e}", i + 1))?;
        args.push((array, flag != 0));
    }
    Ok(Call {
        function,
        path,
        asynchronous,
        rows,
        args,
    })
}

/// What an IPC stream must hold: one record batch of one column, of `rows` rows and, when the
/// caller knows it, of type `data_type`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    pub data_type: Option<&'a DataType>,
    pub rows: usize,
}

/// The continuation marker before every IPC message's metadata length.
const CONTINUATION: [u8; 4] = [0xff; 4];

/// One message of an IPC stream: where it lies in the stream (marker to end of body), its
/// metadata (verified) and its body length.
struct IpcMessage<'a> {
    span: Range<usize>,
    message: ipc::Message<'a>,
    body_len: usize,
}

/// Splits an IPC stream into its schema and record batch messages, checking the framing of
/// each (marker, metadata length, a flatbuffer arrow's verifier accepts, a body within what is
/// left), their kinds and order, and the end-of-stream marker with nothing after it.
fn split_stream(bytes: &[u8]) -> Result<[IpcMessage<'_>; 2], String> {
    let mut cursor = Cursor(bytes);
    let mut messages = Vec::with_capacity(2);
    loop {
        let start = bytes.len() - cursor.0.len();
        let at = |e: String| format!("IPC message at byte {start}: {e}");
        if cursor.take(4).map_err(at)? != CONTINUATION {
            return Err(at("no continuation marker".to_string()));
        }
        let meta_len = cursor.u32().map_err(at)? as usize;
        if meta_len == 0 {
            break;
        }
        if messages.len() == 2 {
            return Err(at("more than a schema and one record batch".to_string()));
        }
        let meta = cursor.take(meta_len).map_err(at)?;
        let message = root_as_message(meta)
            .map_err(|e| at(format!("its metadata is not a valid flatbuffer: {e}")))?;
        if message.version() != MetadataVersion::V5 {
            return Err(at(format!(
                "metadata version {:?} (the workers write V5)",
                message.version()
            )));
        }
        let left = cursor.0.len();
        let body_len = usize::try_from(message.bodyLength())
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| {
                at(format!(
                    "a body of {} bytes where {left} are left",
                    message.bodyLength()
                ))
            })?;
        cursor.take(body_len).map_err(at)?;
        let wanted = if messages.is_empty() {
            MessageHeader::Schema
        } else {
            MessageHeader::RecordBatch
        };
        let header = message.header_type();
        if header != wanted {
            return Err(at(if header == MessageHeader::DictionaryBatch {
                "a dictionary batch, but no declared type is dictionary-encoded".to_string()
            } else {
                format!("a {header:?} message where a {wanted:?} belongs")
            }));
        }
        messages.push(IpcMessage {
            span: start..bytes.len() - cursor.0.len(),
            message,
            body_len,
        });
    }
    if !cursor.0.is_empty() {
        return Err(format!(
            "{} bytes after the end of the IPC stream",
            cursor.0.len()
        ));
    }
    <[IpcMessage<'_>; 2]>::try_from(messages).map_err(|found| {
        if found.is_empty() {
            "an IPC stream without a schema".to_string()
        } else {
            "an IPC stream without a record batch".to_string()
        }
    })
}

/// What a schema's flatbuffer makes arrow allocate, counted as arrow will expand it (a
/// flatbuffer may point many times at one table): fields, and bytes of names, metadata and
/// time zones, which may not come to more than the message holds.
struct SchemaSize {
    fields: usize,
    max_fields: usize,
    bytes: usize,
    max_bytes: usize,
}

impl SchemaSize {
    fn add_bytes(&mut self, n: usize) -> Result<(), String> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.max_bytes {
            return Err(format!(
                "a schema whose names and metadata come to more than its {}-byte message",
                self.max_bytes
            ));
        }
        Ok(())
    }
}

/// The fields of a type (itself included): what its schema has.
fn field_count(t: &DataType) -> usize {
    match t {
        DataType::List(item) | DataType::LargeList(item) => 1 + field_count(item.data_type()),
        DataType::Struct(fields) => {
            1 + fields
                .iter()
                .map(|f| field_count(f.data_type()))
                .sum::<usize>()
        }
        _ => 1,
    }
}

/// Converts a schema field to an Arrow field as arrow's `fb_to_schema` does, for the types that
/// cross the channel only, and without its panics: an unknown or malformed type, a dictionary,
/// a missing child, more fields or bytes than `size` allows is an error.
fn ipc_field(field: ipc::Field<'_>, depth: usize, size: &mut SchemaSize) -> Result<Field, String> {
    use ipc::Type;
    size.fields += 1;
    if depth > MAX_STREAM_DEPTH || size.fields > size.max_fields {
        return Err(format!(
            "a schema with more than {} fields or nested deeper than {MAX_STREAM_DEPTH} levels",
            size.max_fields
        ));
    }
    if field.dictionary().is_some() {
        return Err("a dictionary-encoded column, but no declared type is one".to_string());
    }
    let name = field.name().unwrap_or_default();
    size.add_bytes(name.len())?;
    let mut metadata = std::collections::HashMap::new();
    for kv in field.custom_metadata().into_iter().flatten() {
        if let (Some(k), Some(v)) = (kv.key(), kv.value()) {
            size.add_bytes(k.len().saturating_add(v.len()))?;
            metadata.insert(k.to_string(), v.to_string());
        }
    }
    let missing = || {
        format!(
            "a {:?} column without its type parameters",
            field.type_type()
        )
    };
    let children = field.children();
    let n_children = children.map_or(0, |c| c.len());
    let nested = matches!(
        field.type_type(),
        Type::List | Type::LargeList | Type::Struct_
    );
    if !nested && n_children > 0 {
        return Err(format!(
            "a {:?} column with {n_children} children",
            field.type_type()
        ));
    }
    let child = |i: usize, size: &mut SchemaSize| -> Result<Field, String> {
        match children {
            Some(c) if i < c.len() => ipc_field(c.get(i), depth + 1, size),
            _ => Err(format!(
                "a {:?} column without its child",
                field.type_type()
            )),
        }
    };
    use datafusion::arrow::datatypes::{IntervalUnit, TimeUnit};
    let unit = |u: ipc::TimeUnit| match u {
        ipc::TimeUnit::SECOND => Ok(TimeUnit::Second),
        ipc::TimeUnit::MILLISECOND => Ok(TimeUnit::Millisecond),
        ipc::TimeUnit::MICROSECOND => Ok(TimeUnit::Microsecond),
        ipc::TimeUnit::NANOSECOND => Ok(TimeUnit::Nanosecond),
        other => Err(format!("an unknown time unit {other:?}")),
    };
    let data_type = match field.type_type() {
        Type::Bool => DataType::Boolean,
        Type::Int => {
            let int = field.type_as_int().ok_or_else(missing)?;
            match (int.bitWidth(), int.is_signed()) {
                (8, true) => DataType::Int8,
                (8, false) => DataType::UInt8,
                (16, true) => DataType::Int16,
                (16, false) => DataType::UInt16,
                (32, true) => DataType::Int32,
                (32, false) => DataType::UInt32,
                (64, true) => DataType::Int64,
                (64, false) => DataType::UInt64,
                (bits, _) => return Err(format!("an integer column of {bits} bits")),
            }
        }
        Type::FloatingPoint => match field
            .type_as_floating_point()
            .ok_or_else(missing)?
            .precision()
        {
            ipc::Precision::SINGLE => DataType::Float32,
            ipc::Precision::DOUBLE => DataType::Float64,
            other => return Err(format!("a floating-point column of precision {other:?}")),
        },
        Type::Utf8 => DataType::Utf8,
        Type::LargeUtf8 => DataType::LargeUtf8,
        Type::Utf8View => DataType::Utf8View,
        Type::Binary => DataType::Binary,
        Type::LargeBinary => DataType::LargeBinary,
        Type::BinaryView => DataType::BinaryView,
        Type::Decimal => {
            let decimal = field.type_as_decimal().ok_or_else(missing)?;
            let precision = u8::try_from(decimal.precision())
                .ok()
                .filter(|p| (1..=38).contains(p));
            let scale = i8::try_from(decimal.scale()).ok();
            match (decimal.bitWidth(), precision, scale) {
                (128, Some(p), Some(s)) => DataType::Decimal128(p, s),
                (bits, _, _) => {
                    return Err(format!(
                        "a decimal column of {bits} bits, precision {} and scale {}",
                        decimal.precision(),
                        decimal.scale()
                    ));
                }
            }
        }
        Type::Date => match field.type_as_date().ok_or_else(missing)?.unit() {
            ipc::DateUnit::DAY => DataType::Date32,
            ipc::DateUnit::MILLISECOND => DataType::Date64,
            other => return Err(format!("a date column of unit {other:?}")),
        },
        Type::Time => {
            let time = field.type_as_time().ok_or_else(missing)?;
            match (time.bitWidth(), unit(time.unit())?) {
                (32, u @ (TimeUnit::Second | TimeUnit::Millisecond)) => DataType::Time32(u),
                (64, u @ (TimeUnit::Microsecond | TimeUnit::Nanosecond)) => DataType::Time64(u),
                (bits, u) => return Err(format!("a time column of {bits} bits in {u:?}")),
            }
        }
        Type::Timestamp => {
            let timestamp = field.type_as_timestamp().ok_or_else(missing)?;
            let zone = timestamp.timezone();
            size.add_bytes(zone.map_or(0, str::len))?;
            DataType::Timestamp(unit(timestamp.unit())?, zone.map(Into::into))
        }
        Type::Duration => {
            DataType::Duration(unit(field.type_as_duration().ok_or_else(missing)?.unit())?)
        }
        Type::Interval => match field.type_as_interval().ok_or_else(missing)?.unit() {
            ipc::IntervalUnit::YEAR_MONTH => DataType::Interval(IntervalUnit::YearMonth),
            ipc::IntervalUnit::DAY_TIME => DataType::Interval(IntervalUnit::DayTime),
            ipc::IntervalUnit::MONTH_DAY_NANO => DataType::Interval(IntervalUnit::MonthDayNano),
            other => return Err(format!("an interval column of unit {other:?}")),
        },
        Type::List | Type::LargeList => {
            if n_children != 1 {
                return Err(format!("a list column with {n_children} children"));
            }
            let item = Arc::new(child(0, size)?);
            if field.type_type() == Type::List {
                DataType::List(item)
            } else {
                DataType::LargeList(item)
            }
        }
        Type::Struct_ => {
            if n_children == 0 {
                return Err("a struct column without fields".to_string());
            }
            let fields = (0..n_children)
                .map(|i| child(i, size))
                .collect::<Result<Vec<_>, _>>()?;
            DataType::Struct(fields.into())
        }
        other => {
            return Err(format!(
                "a column of IPC type {other:?}, which never crosses the channel"
            ));
        }
    };
    Ok(Field::new(name, data_type, field.nullable()).with_metadata(metadata))
}

/// Checks a schema message and converts its one column before arrow does (arrow's conversion
/// panics on malformed types and expands shared tables): little-endian, one column, at most
/// `max_fields` fields, names and metadata no larger than the message.
fn check_schema(message: &IpcMessage<'_>, max_fields: usize) -> Result<Field, String> {
    let schema = message
        .message
        .header_as_schema()
        .ok_or("a schema message without its schema")?;
    if schema.endianness() != ipc::Endianness::Little {
        return Err("a big-endian schema".to_string());
    }
    let fields = schema.fields().ok_or("a schema without fields")?;
    if fields.len() != 1 {
        return Err(format!(
            "a schema of {} columns instead of one",
            fields.len()
        ));
    }
    let mut size = SchemaSize {
        fields: 0,
        max_fields,
        bytes: 0,
        max_bytes: message.span.len(),
    };
    for kv in schema.custom_metadata().into_iter().flatten() {
        size.add_bytes(
            kv.key()
                .map_or(0, str::len)
                .saturating_add(kv.value().map_or(0, str::len)),
        )?;
    }
    ipc_field(fields.get(0), 0, &mut size)
}

/// How many field nodes, buffers and view columns an IPC record batch of `t` has.
#[derive(Debug, Default)]
struct BatchLayout {
    nodes: usize,
    buffers: usize,
    views: usize,
}

impl BatchLayout {
    fn add(&mut self, t: &DataType) -> Result<(), String> {
        self.nodes += 1;
        match t {
            DataType::Utf8 | DataType::Binary | DataType::LargeUtf8 | DataType::LargeBinary => {
                self.buffers += 3;
            }
            DataType::Utf8View | DataType::BinaryView => {
                self.buffers += 2;
                self.views += 1;
            }
            DataType::List(item) | DataType::LargeList(item) => {
                self.buffers += 2;
                self.add(item.data_type())?;
            }
            DataType::FixedSizeList(item, _) => {
                self.buffers += 1;
                self.add(item.data_type())?;
            }
            DataType::Struct(fields) => {
                self.buffers += 1;
                for field in fields {
                    self.add(field.data_type())?;
                }
            }
            t if t.is_primitive()
                || matches!(t, DataType::Boolean | DataType::FixedSizeBinary(_)) =>
            {
                self.buffers += 2;
            }
            other => {
                return Err(format!(
                    "a column of type {other}, which never crosses the channel"
                ));
            }
        }
        Ok(())
    }
}

/// The field nodes (length, null count) and buffer lengths of a record batch, visited in the
/// order arrow reads them, with the type that owns them.
struct NodeWalk {
    nodes: Vec<(i64, i64)>,
    buffers: Vec<i64>,
    variadic: Vec<i64>,
    node: usize,
    buffer: usize,
    view: usize,
    /// The most rows any node may have: a value takes at least a bit of the body.
    most_rows: usize,
}

impl NodeWalk {
    /// Checks the node of `t` (and its children's): a length no value could fill is refused,
    /// and a node with NULLs needs a validity bitmap of its length (arrow asserts that before it
    /// validates anything). The counts were checked to match `t`'s layout.
    fn visit(&mut self, t: &DataType) -> Result<(), String> {
        let (length, nulls) = self.nodes[self.node];
        let validity = self.buffers[self.buffer];
        let at = self.node;
        self.node += 1;
        let length = usize::try_from(length)
            .ok()
            .filter(|&l| l <= self.most_rows)
            .ok_or_else(|| format!("field node {at} claims {length} rows"))?;
        if nulls > 0 && usize::try_from(validity).map_or(true, |v| v.saturating_mul(8) < length) {
            return Err(format!(
                "field node {at} has {nulls} NULLs in {length} rows but a {validity}-byte validity bitmap"
            ));
        }
        // The element width of the buffer after the validity bitmap, if it has elements wider
        // than a byte (arrow views a buffer as elements and asserts that it holds whole ones),
        // and the number of buffers.
        let (width, count) = match t {
            DataType::Utf8 | DataType::Binary => (4, 3),
            DataType::LargeUtf8 | DataType::LargeBinary => (8, 3),
            DataType::Utf8View | DataType::BinaryView => {
                self.view += 1;
                let data = usize::try_from(self.variadic[self.view - 1]).unwrap_or(0);
                (16, 2 + data)
            }
            DataType::List(_) => (4, 2),
            DataType::LargeList(_) => (8, 2),
            DataType::FixedSizeList(..) | DataType::Struct(_) => (1, 1),
            t => (t.primitive_width().unwrap_or(1), 2),
        };
        if count > 1 {
            let len = self.buffers[self.buffer + 1];
            if usize::try_from(len).map_or(true, |len| !len.is_multiple_of(width)) {
                return Err(format!(
                    "buffer {} of {len} bytes holds {width}-byte values",
                    self.buffer + 1
                ));
            }
        }
        self.buffer += count;
        match t {
            DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
                self.visit(item.data_type())
            }
            DataType::Struct(fields) => fields.iter().try_for_each(|f| self.visit(f.data_type())),
            _ => Ok(()),
        }
    }
}

/// Checks a record batch message against the column type `t` and `rows` before arrow decodes
/// it: no compression, `rows` rows, the field nodes and buffers of `t`'s layout, every buffer
/// within the body, variadic buffer counts for exactly the view columns.
fn check_batch(message: &IpcMessage<'_>, t: &DataType, rows: usize) -> Result<(), String> {
    let batch = message
        .message
        .header_as_record_batch()
        .ok_or("a record batch message without its record batch")?;
    if let Some(compression) = batch.compression() {
        return Err(format!(
            "a record batch with {:?} body compression: compressed IPC bodies are refused (each \
             buffer states its own uncompressed size, which nothing bounds)",
            compression.codec()
        ));
    }
    if usize::try_from(batch.length()).ok() != Some(rows) {
        return Err(format!(
            "a record batch of {} rows for a call over {rows}",
            batch.length()
        ));
    }
    let mut layout = BatchLayout::default();
    layout.add(t)?;
    let nodes = batch.nodes().ok_or("a record batch without field nodes")?;
    if nodes.len() != layout.nodes {
        return Err(format!(
            "a record batch with {} field nodes where a {t} column has {}",
            nodes.len(),
            layout.nodes
        ));
    }
    for (i, node) in nodes.iter().enumerate() {
        if node.length() < 0 || node.null_count() < 0 || node.null_count() > node.length() {
            return Err(format!(
                "field node {i} has length {} and null count {}",
                node.length(),
                node.null_count()
            ));
        }
    }
    let variadic = batch.variadicBufferCounts();
    let counts = variadic.map_or(0, |v| v.len());
    if counts != layout.views {
        return Err(format!(
            "a record batch with {counts} variadic buffer counts where a {t} column has {} view \
             columns",
            layout.views
        ));
    }
    let buffers = batch.buffers().ok_or("a record batch without buffers")?;
    let mut expected = layout.buffers;
    for count in variadic.into_iter().flat_map(|counts| counts.iter()) {
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= buffers.len())
            .ok_or_else(|| format!("a variadic buffer count of {count}"))?;
        expected += count;
    }
    if buffers.len() != expected {
        return Err(format!(
            "a record batch with {} buffers where a {t} column has {expected}",
            buffers.len()
        ));
    }
    let mut walk = NodeWalk {
        nodes: nodes.iter().map(|n| (n.length(), n.null_count())).collect(),
        buffers: buffers.iter().map(|b| b.length()).collect(),
        variadic: variadic
            .into_iter()
            .flat_map(|counts| counts.iter())
            .collect(),
        node: 0,
        buffer: 0,
        view: 0,
        most_rows: rows.max(message.body_len.saturating_mul(8)),
    };
    walk.visit(t)?;
    for (i, buffer) in buffers.iter().enumerate() {
        let fits = usize::try_from(buffer.offset())
            .ok()
            .zip(usize::try_from(buffer.length()).ok())
            .filter(|(offset, _)| offset.is_multiple_of(8))
            .and_then(|(offset, len)| offset.checked_add(len))
            .is_some_and(|end| end <= message.body_len);
        if !fits {
            return Err(format!(
                "buffer {i} at {} of {} bytes is not 8-aligned within the {}-byte body",
                buffer.offset(),
                buffer.length(),
                message.body_len
            ));
        }
    }
    Ok(())
}

/// Decodes an IPC stream that must hold exactly one batch of one column as `expect` says, after
/// checking its messages ([`split_stream`], [`check_schema`], [`check_batch`]) so that what
/// arrow allocates is bounded by the stream.
pub(crate) fn decode_array(stream: &Buffer, expect: Expect<'_>) -> Result<ArrayRef, String> {
    let [schema, batch] = split_stream(stream.as_slice())?;
    let max_fields = expect.data_type.map_or(MAX_STREAM_FIELDS, field_count);
    let column = check_schema(&schema, max_fields)?;
    let column_type = column.data_type();
    if let Some(declared) = expect.data_type
        && column_type != declared
    {
        return Err(format!(
            "a result of type {column_type} where {declared} was declared"
        ));
    }
    check_batch(&batch, column_type, expect.rows)?;
    let mut decoder = StreamDecoder::new();
    let mut buffer = stream.clone();
    let mut decoded = None;
    while !buffer.is_empty() {
        let before = buffer.len();
        if let Some(b) = decoder.decode(&mut buffer).map_err(|e| e.to_string())? {
            if decoded.is_some() {
                return Err("more than one record batch".to_string());
            }
            decoded = Some(b);
        }
        if buffer.len() == before {
            return Err("the IPC stream makes no progress".to_string());
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    let decoded = decoded.ok_or("no record batch")?;
    if decoded.num_columns() != 1 {
        return Err(format!("{} columns instead of one", decoded.num_columns()));
    }
    let array = Arc::clone(decoded.column(0));
    if array.len() != expect.rows {
        return Err(format!(
            "a column of {} rows for a call over {}",
            array.len(),
            expect.rows
        ));
    }
    Ok(array)
}

/// The largest reply body a call expecting `expect` (the declared type and rows) may receive:
/// for a type whose rows have a fixed size (numbers, dates, decimals, booleans, structs of
/// them) what an honest encoding of the rows takes, with room for the IPC framing; for strings,
/// binaries and lists the frame limit. Without a call (a worker starting) an error or ready
/// message. Never less than an error message.
pub(crate) fn max_reply_len(expect: Option<(&DataType, usize)>) -> usize {
    /// Bytes per row of a fixed-size type, a validity byte per level (generous: it is a bit).
    fn fixed_row_bytes(t: &DataType) -> Option<usize> {
        match t {
            DataType::Boolean => Some(2),
            DataType::Struct(fields) => fields
                .iter()
                .map(|f| fixed_row_bytes(f.data_type()))
                .sum::<Option<usize>>()
                .map(|sum| sum + 1),
            t => t.primitive_width().map(|w| w + 1),
        }
    }
    /// Fields in the type: each costs schema and batch metadata and buffer padding.
    fn fields(t: &DataType) -> usize {
        match t {
            DataType::Struct(fields) => 1 + fields.iter().map(|f| fields_of(f)).sum::<usize>(),
            DataType::List(item) | DataType::LargeList(item) => 1 + fields_of(item),
            _ => 1,
        }
    }
    fn fields_of(f: &Field) -> usize {
        fields(f.data_type())
    }
    let Some((t, rows)) = expect else {
        return MAX_ERROR_BODY;
    };
    let Some(per_row) = fixed_row_bytes(t) else {
        return MAX_FRAME;
    };
    rows.saturating_mul(per_row)
        .saturating_add(fields(t).saturating_mul(8 * 1024))
        .saturating_add(64 * 1024)
        .clamp(MAX_ERROR_BODY, MAX_FRAME)
}

/// A result frame.
pub(crate) fn encode_result<S: Sink>(out: &mut S, array: &ArrayRef) -> Result<(), String> {
    start_frame(out, RESULT)?;
    let encoding_at = out.written();
    pad_to_8(out)?;
    let encoding =
        put_any_array(out, array).map_err(|e| format!("cannot encode the result: {e}"))?;
    out.patch(encoding_at, &[encoding])?;
    finish_frame(out)
}

/// An error frame.
pub(crate) fn encode_error<S: Sink>(out: &mut S, message: &str) -> Result<(), String> {
    start_frame(out, ERROR)?;
    // Messages are short; cut one that is not, on a character boundary.
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    put(out, &message.as_bytes()[..end])?;
    finish_frame(out)
}

/// A ready frame.
pub(crate) fn encode_ready<S: Sink>(out: &mut S, functions: usize) -> Result<(), String> {
    start_frame(out, READY)?;
    put(out, &(functions as u32).to_le_bytes())?;
    finish_frame(out)
}

/// An acknowledgement frame carrying `value`.
pub(crate) fn encode_ack<S: Sink>(out: &mut S, value: u64) -> Result<(), String> {
    start_frame(out, ACK)?;
    put(out, &[0; 7])?;
    put(out, &value.to_le_bytes())?;
    finish_frame(out)
}

/// What an aggregate request asks of a worker (ABI 2.4): its accumulators live in the worker,
/// numbered by it.
#[derive(Debug)]
pub(crate) enum AggregateOp {
    /// A new accumulator of aggregate `function`; acknowledged with its number.
    Create { function: usize },
    /// Rows (or partial states) into accumulator `acc`; acknowledged with its size.
    Feed {
        acc: u32,
        feed: crate::ffi::aggregate::Feed,
        rows: usize,
        groups: Option<Vec<usize>>,
        filter: Option<datafusion::arrow::array::BooleanArray>,
        total_groups: usize,
        columns: Vec<ArrayRef>,
    },
    /// Results (or partial states) of accumulator `acc`; answered with a result.
    Emit {
        acc: u32,
        state: bool,
        emit: crate::ffi::aggregate::Emit,
    },
    /// Frees accumulator `acc`; acknowledged.
    Destroy { acc: u32 },
}

/// The most groups one aggregate request may name (the group numbers are `u64` on the wire).
const MAX_GROUPS: usize = i32::MAX as usize;

/// An aggregate request frame.
pub(crate) fn encode_aggregate<S: Sink>(out: &mut S, op: &AggregateOp) -> Result<(), String> {
    use crate::ffi::aggregate::{Emit, Feed};
    start_frame(out, AGGREGATE)?;
    match op {
        AggregateOp::Create { function } => {
            put(out, &[0, 0, 0, 0])?;
            put(out, &(*function as u32).to_le_bytes())?;
        }
        AggregateOp::Feed {
            acc,
            feed,
            rows,
            groups,
            filter,
            total_groups,
            columns,
        } => {
            put(out, &[1, 0, 0, 0])?;
            put(out, &acc.to_le_bytes())?;
            let kind = match feed {
                Feed::Update => 0,
                Feed::Retract => 1,
                Feed::Merge => 2,
            };
            put(
                out,
                &[
                    kind,
                    u8::from(groups.is_some()),
                    u8::from(filter.is_some()),
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
            )?;
            put(out, &(*rows as u64).to_le_bytes())?;
            put(out, &(*total_groups as u64).to_le_bytes())?;
            put(out, &(columns.len() as u16).to_le_bytes())?;
            put(out, &[0; 6])?;
            // Group numbers and streams start at a multiple of 8 in the body.
            pad_to_8(out)?;
            if let Some(groups) = groups {
                for &g in groups.iter().take(*rows) {
                    put(out, &(g as u64).to_le_bytes())?;
                }
            }
            if let Some(filter) = filter {
                use datafusion::arrow::array::Array;
                let bytes: Vec<u8> = (0..*rows)
                    .map(|i| u8::from(filter.is_valid(i) && filter.value(i)))
                    .collect();
                put(out, &bytes)?;
                pad_to_8(out)?;
            }
            for (i, column) in columns.iter().enumerate() {
                put_column(out, 0, column).map_err(|e| format!("column {}: {e}", i + 1))?;
            }
        }
        AggregateOp::Emit { acc, state, emit } => {
            put(out, &[2, 0, 0, 0])?;
            put(out, &acc.to_le_bytes())?;
            let (mode, first) = match emit {
                Emit::Peek => (0, 0),
                Emit::TakeAll => (1, 0),
                Emit::TakeFirst(n) => (2, *n),
            };
            put(out, &[u8::from(*state), mode, 0, 0, 0, 0, 0, 0])?;
            put(out, &(first as u64).to_le_bytes())?;
        }
        AggregateOp::Destroy { acc } => {
            put(out, &[3, 0, 0, 0])?;
            put(out, &acc.to_le_bytes())?;
        }
    }
    finish_frame(out)
}

/// Decodes an aggregate request body (the worker's side: the host is trusted, but nothing read
/// here can make the worker read out of bounds or allocate more than the body holds).
pub(crate) fn decode_aggregate(body: &Buffer) -> Result<AggregateOp, String> {
    use crate::ffi::aggregate::{Emit, Feed};
    let bytes = body.as_slice();
    let mut cursor = Cursor(&bytes[1..]);
    let op = cursor.u8()?;
    cursor.take(3)?;
    let number = cursor.u32()?;
    match op {
        0 => Ok(AggregateOp::Create {
            function: number as usize,
        }),
        1 => {
            let head = cursor.take(8)?;
            let feed = match head[0] {
                0 => Feed::Update,
                1 => Feed::Retract,
                2 => Feed::Merge,
                other => return Err(format!("unknown feed kind {other}")),
            };
            let (has_groups, has_filter) = (head[1] != 0, head[2] != 0);
            let rows = usize::try_from(cursor.u64()?)
                .ok()
                .filter(|&r| r <= MAX_CALL_ROWS)
                .ok_or("an aggregate request over more rows than a column holds")?;
            let total_groups = usize::try_from(cursor.u64()?)
                .ok()
                .filter(|&g| g <= MAX_GROUPS)
                .ok_or("an aggregate request over too many groups")?;
            let n = cursor.u16()?;
            cursor.take(6)?;
            let at = bytes.len() - cursor.0.len();
            cursor.take((8 - at % 8) % 8)?;
            let groups = if has_groups {
                let raw = cursor.take(rows.checked_mul(8).ok_or("too many group numbers")?)?;
                let groups: Vec<usize> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                    .collect();
                if groups.iter().any(|&g| g >= total_groups) {
                    return Err("a group number not below the total".to_string());
                }
                Some(groups)
            } else {
                None
            };
            let filter = if has_filter {
                let raw = cursor.take(rows)?;
                let at = bytes.len() - cursor.0.len();
                cursor.take((8 - at % 8) % 8)?;
                Some(datafusion::arrow::array::BooleanArray::from_iter(
                    raw.iter().map(|&b| Some(b != 0)),
                ))
            } else {
                None
            };
            let mut columns = Vec::with_capacity(
                usize::from(n).min(udf_abi::v2::MAX_STATE_FIELDS.max(udf_abi::MAX_ARGS)),
            );
            for i in 0..n {
                let (_, array) = take_column(&mut cursor, body, |_| rows)
                    .map_err(|e| format!("column {}: {e}", i + 1))?;
                columns.push(array);
            }
            Ok(AggregateOp::Feed {
                acc: number,
                feed,
                rows,
                groups,
                filter,
                total_groups,
                columns,
            })
        }
        2 => {
            let head = cursor.take(8)?;
            let first = usize::try_from(cursor.u64()?).map_err(|e| e.to_string())?;
            let emit = match head[1] {
                0 => Emit::Peek,
                1 => Emit::TakeAll,
                2 => Emit::TakeFirst(first),
                other => return Err(format!("unknown emit mode {other}")),
            };
            Ok(AggregateOp::Emit {
                acc: number,
                state: head[0] != 0,
                emit,
            })
        }
        3 => Ok(AggregateOp::Destroy { acc: number }),
        other => Err(format!("unknown aggregate request {other}")),
    }
}

/// What a worker answered.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The library is loaded; it has this many functions.
    Ready(usize),
    /// The result column.
    Result(ArrayRef),
    /// The call or the load failed, with the message the in-process path gives.
    Error(String),
    /// An aggregate request done, with its number (see [`ACK`]).
    Ack(u64),
}

/// Decodes a reply body and checks a result against what the call must return: `data_type`
/// and `rows` rows. Never panics, whatever the bytes.
pub(crate) fn decode_reply(
    body: &Buffer,
    expect: Option<(&DataType, usize)>,
) -> Result<Reply, String> {
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| decode_reply_inner(body, expect)));
    decoded.unwrap_or_else(|_| Err("decoding it panicked".to_string()))
}

fn decode_reply_inner(body: &Buffer, expect: Option<(&DataType, usize)>) -> Result<Reply, String> {
    let bytes = body.as_slice();
    match bytes.first() {
        Some(&READY) => {
            let mut cursor = Cursor(&bytes[1..]);
            let n = cursor.u32()? as usize;
            if !cursor.0.is_empty() {
                return Err("trailing bytes after a ready message".to_string());
            }
            Ok(Reply::Ready(n))
        }
        Some(&ERROR) => Ok(Reply::Error(
            String::from_utf8_lossy(&bytes[1..]).into_owned(),
        )),
        Some(&ACK) => {
            if bytes.len() != 16 || bytes[1..8] != [0; 7] {
                return Err("an acknowledgement that is not 16 bytes".to_string());
            }
            Ok(Reply::Ack(u64::from_le_bytes(
                bytes[8..16].try_into().expect("8 bytes"),
            )))
        }
        Some(&RESULT) => {
            if bytes.len() < 8 || bytes[2..8] != [0; 6] {
                return Err("a result message without its padding".to_string());
            }
            let (data_type, rows) = expect.ok_or("a result where none was asked for")?;
            let array = decode_any_array(
                bytes[1],
                &body.slice(8),
                Expect {
                    data_type: Some(data_type),
                    rows,
                },
            )?;
            if array.data_type() != data_type {
                return Err(format!(
                    "a result of type {} where {data_type} was declared",
                    array.data_type()
                ));
            }
            Ok(Reply::Result(array))
        }
        Some(other) => Err(format!("unknown message kind 0x{other:02x}")),
        None => Err("an empty message".to_string()),
    }
}

/// What [`fuzz_worker_replies`] saw.
#[doc(hidden)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuzzReport {
    /// Mutated inputs decoded.
    pub cases: usize,
    /// Inputs refused (a malformed reply, or a result the rules refuse).
    pub refused: usize,
    /// Results accepted: each was of the declared type and rows, valid, and passed the rules.
    pub accepted: usize,
    /// Of those, the results that crossed raw.
    pub accepted_raw: usize,
    /// Inputs that decoded as another kind of message (an error or ready message).
    pub other_replies: usize,
    /// Call requests decoded (the worker's side).
    pub calls_accepted: usize,
    /// Decodings that panicked (caught here; must be 0).
    pub panics: usize,
    /// Accepted results not of the declared shape, or invalid (must be 0).
    pub wrong_shape: usize,
    /// The largest input, in bytes.
    pub largest_input: usize,
    /// The first failures (panics and wrong shapes), described.
    pub failures: Vec<String>,
}

impl FuzzReport {
    /// No panic and no accepted result of the wrong shape.
    pub fn clean(&self) -> bool {
        self.panics == 0 && self.wrong_shape == 0
    }
}

/// One valid input of the fuzzer and what decoding it is checked against.
struct Seed {
    body: Vec<u8>,
    /// For a result: the declared type, rows, and whether the function may return NULL.
    result: Option<(DataType, usize, bool)>,
}

/// The reply body (after the frame header) of `array` written with `options`.
fn result_body(
    array: &ArrayRef,
    options: datafusion::arrow::ipc::writer::IpcWriteOptions,
) -> Result<Vec<u8>, String> {
    let mut out = vec![RESULT, 0, 0, 0, 0, 0, 0, 0];
    let schema = Arc::new(Schema::new(vec![Field::new(
        "v",
        array.data_type().clone(),
        true,
    )]));
    let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::clone(array)])
        .map_err(|e| e.to_string())?;
    let mut writer = StreamWriter::try_new_with_options(&mut out, &schema, options)
        .map_err(|e| e.to_string())?;
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    Ok(out)
}

/// The fuzzer's valid inputs: results of many types (NULLs, nesting, views, decimals) as IPC
/// streams, the same with LZ4 and ZSTD body compression and dictionary encoding (which must be
/// refused), the simple ones also raw (whole and sliced), and call requests (raw and IPC
/// columns).
fn fuzz_seeds() -> Vec<Seed> {
    use datafusion::arrow::array::{
        Array, BooleanArray, Decimal128Array, DictionaryArray, Float64Array, Int32Array,
        Int64Array, LargeListArray, ListArray, StringArray, StringViewArray, StructArray,
        TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::Int32Type;
    use datafusion::arrow::ipc::CompressionType;
    use datafusion::arrow::ipc::writer::IpcWriteOptions;
    let ints: ArrayRef = Arc::new(Int64Array::from(
        (0..20)
            .map(|i| (i % 3 != 0).then_some(i * 1000))
            .collect::<Vec<_>>(),
    ));
    let strings: ArrayRef = Arc::new(StringArray::from(
        (0..20)
            .map(|i| (i % 4 != 1).then(|| format!("value {i} é")))
            .collect::<Vec<_>>(),
    ));
    let views: ArrayRef = Arc::new(StringViewArray::from(vec![
        Some("short"),
        None,
        Some("a string longer than twelve bytes, in a data buffer"),
        Some(""),
    ]));
    let bools: ArrayRef = Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]));
    let decimals: ArrayRef = Arc::new(
        Decimal128Array::from(vec![Some(12345), None, Some(-99999)])
            .with_precision_and_scale(5, 2)
            .expect("DECIMAL(5,2)"),
    );
    let lists: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
        Some(vec![Some(1), None, Some(3)]),
        None,
        Some(vec![]),
        Some(vec![Some(7)]),
    ]));
    let structs: ArrayRef = Arc::new(StructArray::from(vec![
        (
            Arc::new(Field::new("a", DataType::Utf8, true)),
            Arc::new(StringArray::from(vec![Some("x"), None, Some("zz")])) as ArrayRef,
        ),
        (
            Arc::new(Field::new("b", DataType::Float64, true)),
            Arc::new(Float64Array::from(vec![Some(1.5), Some(2.5), None])) as ArrayRef,
        ),
    ]));
    let nested: ArrayRef = {
        let inner = Arc::new(StructArray::from(vec![(
            Arc::new(Field::new("d", DataType::Decimal128(13, 2), true)),
            Arc::new(
                Decimal128Array::from(vec![Some(1), Some(250), None])
                    .with_precision_and_scale(13, 2)
                    .expect("DECIMAL(13,2)"),
            ) as ArrayRef,
        )]));
        let field = Arc::new(Field::new("item", inner.data_type().clone(), true));
        Arc::new(LargeListArray::new(
            field,
            datafusion::arrow::buffer::OffsetBuffer::new(vec![0i64, 2, 2, 3].into()),
            inner,
            None,
        ))
    };
    let times: ArrayRef =
        Arc::new(TimestampMicrosecondArray::from(vec![Some(1), None]).with_timezone("UTC"));
    let ints32: ArrayRef = Arc::new(Int32Array::from(vec![5, -5, 0, i32::MAX]));
    let plain = [
        ints, strings, views, bools, decimals, lists, structs, nested, times, ints32,
    ];
    let mut seeds = Vec::new();
    for (i, array) in plain.iter().enumerate() {
        let shape = (array.data_type().clone(), array.len(), i % 2 == 0);
        for compression in [
            None,
            Some(CompressionType::LZ4_FRAME),
            Some(CompressionType::ZSTD),
        ] {
            let Ok(options) = IpcWriteOptions::default().try_with_compression(compression) else {
                continue;
            };
            if let Ok(body) = result_body(array, options) {
                seeds.push(Seed {
                    body,
                    result: Some(shape.clone()),
                });
            }
        }
        // The same result as a worker writes it: raw where the type allows (sliced too).
        for array in [Arc::clone(array), array.slice(1, array.len() - 2)] {
            let mut out = Vec::new();
            if encode_result(&mut out, &array).is_ok() && out[HEADER + 1] == RAW {
                seeds.push(Seed {
                    body: out[HEADER..].to_vec(),
                    result: Some((array.data_type().clone(), array.len(), i % 2 == 0)),
                });
            }
        }
    }
    // Dictionary-encoded, declared as its value type.
    let dictionary: ArrayRef = Arc::new(
        vec![Some("a"), None, Some("b"), Some("a")]
            .into_iter()
            .collect::<DictionaryArray<Int32Type>>(),
    );
    if let Ok(body) = result_body(&dictionary, IpcWriteOptions::default()) {
        seeds.push(Seed {
            body,
            result: Some((DataType::Utf8, 4, true)),
        });
    }
    // Call requests, as the worker reads them.
    for args in [
        vec![
            (Arc::clone(&plain[0]), false),
            (Arc::clone(&plain[9]), true),
        ],
        vec![(Arc::clone(&plain[1]).slice(3, 10), false)],
        vec![
            (Arc::clone(&plain[6]), false),
            (Arc::clone(&plain[2]).slice(0, 1), true),
        ],
    ] {
        let rows = args[0].0.len();
        let mut out = Vec::new();
        if encode_call(&mut out, 1, CallPath::Batch, None, &args, rows).is_ok() {
            seeds.push(Seed {
                body: out[HEADER..].to_vec(),
                result: None,
            });
        }
    }
    seeds
}

/// Length-like values written over fields by the fuzzer: zero, one, signs, the 64 TiB of the
/// LZ4 attack, limits of 32 and 64 bits.
const FUZZ_LENGTHS: [u64; 10] = [
    0,
    1,
    8,
    0xffff_ffff,
    0x7fff_ffff,
    0x8000_0000,
    64 << 40,
    u64::MAX,
    i64::MAX as u64,
    1 << 33,
];

/// Mutates `input`: bit flips, bytes set, truncation, a splice from `other`, a length-like
/// field rewritten, a range repeated; one to three of them.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = bytes.len();
        match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(len);
                    if let Some(b) = bytes.get_mut(at) {
                        *b ^= 1 << rng.below(8);
                    }
                }
            }
            1 => {
                let at = rng.below(len);
                if let Some(b) = bytes.get_mut(at) {
                    *b = [0, 0xff, 0x7f, 0x80, rng.next_u64() as u8][rng.below(5)];
                }
            }
            2 => bytes.truncate(rng.below(len + 1)),
            3 => {
                let from = rng.below(other.len());
                let n = rng.below(other.len() - from.min(other.len()) + 1).min(256);
                let at = rng.below(len + 1);
                let end = (at + rng.below(64)).min(len);
                bytes.splice(at..end, other[from..from + n].iter().copied());
            }
            4 => {
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                let slots = len / width;
                let at = rng.below(slots) * width;
                let mut value = FUZZ_LENGTHS[rng.below(FUZZ_LENGTHS.len())];
                if rng.below(4) == 0 {
                    value = value.wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                }
                if at + width <= len {
                    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
                }
            }
            _ => {
                let from = rng.below(len);
                let n = rng.below(len - from.min(len) + 1).min(512);
                let copy = bytes[from..from + n].to_vec();
                let at = rng.below(len + 1);
                bytes.splice(at..at, copy);
            }
        }
    }
    bytes
}

/// Throws `cases` mutations of valid worker replies and call requests (see [`fuzz_seeds`]) at
/// the decoders, the host's result rules included, with a fixed `seed`. Each input must be
/// refused, or decode as a result of the declared type and rows that is valid and passes the
/// rules; nothing may panic. An allocation the bytes could inflate beyond what they hold would
/// abort the process (run it under an address-space limit to catch smaller ones).
#[doc(hidden)]
pub fn fuzz_worker_replies(seed: u64, cases: usize) -> FuzzReport {
    use crate::ffi::FunctionSignature;
    use crate::types::ValueType;
    let seeds = fuzz_seeds();
    let mut report = FuzzReport::default();
    let mut rng = Rng::new(seed);
    fn fail(report: &mut FuzzReport, what: String) {
        if report.failures.len() < 20 {
            report.failures.push(what);
        }
    }
    for case in 0..cases {
        let seed_input = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())].body;
        // One case in eight runs a valid input unchanged.
        let bytes = if case % 8 == 0 {
            seed_input.body.clone()
        } else {
            mutate(&mut rng, &seed_input.body, other)
        };
        report.cases += 1;
        report.largest_input = report.largest_input.max(bytes.len());
        if bytes.is_empty() {
            report.refused += 1;
            continue;
        }
        let body = Buffer::from(bytes);
        match &seed_input.result {
            Some((data_type, rows, nullable)) => {
                let signature = FunctionSignature {
                    name: "fuzzed".to_string(),
                    arg_types: Vec::new(),
                    arg_nullable: Vec::new(),
                    return_type: ValueType::Arrow(data_type.clone()),
                    return_nullable: *nullable,
                    volatility: None,
                };
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let reply = decode_reply_inner(&body, Some((data_type, *rows)))?;
                    if let Reply::Result(array) = &reply {
                        signature
                            .check_received_result(array, &[], *rows)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(reply)
                }));
                match outcome {
                    Err(_) => {
                        report.panics += 1;
                        fail(
                            &mut report,
                            format!("case {case}: decoding a reply panicked"),
                        );
                    }
                    Ok(Err(_)) => report.refused += 1,
                    Ok(Ok(Reply::Result(array))) => {
                        let valid = array.to_data().validate_full().is_ok();
                        if array.data_type() == data_type && array.len() == *rows && valid {
                            report.accepted += 1;
                            report.accepted_raw += usize::from(body.as_slice()[1] == RAW);
                        } else {
                            report.wrong_shape += 1;
                            fail(
                                &mut report,
                                format!(
                                    "case {case}: accepted a {} of {} rows (valid: {valid}) for {data_type} × {rows}",
                                    array.data_type(),
                                    array.len()
                                ),
                            );
                        }
                    }
                    Ok(Ok(_)) => report.other_replies += 1,
                }
            }
            None => {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    if body.as_slice().first() != Some(&CALL) {
                        return Err("not a call".to_string());
                    }
                    decode_call(&body)
                }));
                match outcome {
                    Err(_) => {
                        report.panics += 1;
                        fail(
                            &mut report,
                            format!("case {case}: decoding a call panicked"),
                        );
                    }
                    Ok(Err(_)) => report.refused += 1,
                    Ok(Ok(call)) => {
                        let sane = call.args.iter().all(|(a, constant)| {
                            a.len() == if *constant { 1 } else { call.rows }
                                && a.to_data().validate_full().is_ok()
                        });
                        if sane {
                            report.calls_accepted += 1;
                        } else {
                            report.wrong_shape += 1;
                            fail(
                                &mut report,
                                format!(
                                    "case {case}: accepted a call with arguments of the wrong shape"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};

    fn body(frame: &[u8]) -> Buffer {
        let len = body_len(frame[..HEADER].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - HEADER);
        Buffer::from(frame[HEADER..].to_vec())
    }

    #[test]
    fn a_call_round_trips_with_constants_and_sliced_arrays() {
        let strings: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            None,
            Some("héllo"),
            Some("x"),
        ]));
        let sliced = strings.slice(1, 3);
        let constant: ArrayRef = Arc::new(Int64Array::from(vec![3]));
        let mut out = Vec::new();
        encode_call(
            &mut out,
            7,
            CallPath::Batch,
            None,
            &[(sliced.clone(), false), (constant.clone(), true)],
            3,
        )
        .unwrap();
        let call = decode_call(&body(&out)).unwrap();
        assert_eq!(
            (call.function, call.path, call.rows),
            (7, CallPath::Batch, 3)
        );
        assert_eq!(call.args.len(), 2);
        assert_eq!(&call.args[0].0, &sliced);
        assert!(!call.args[0].1);
        assert_eq!(&call.args[1].0, &constant);
        assert!(call.args[1].1);
    }

    #[test]
    fn results_are_checked_against_the_declared_type_and_rows() {
        let array: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let mut out = Vec::new();
        encode_result(&mut out, &array).unwrap();
        let b = body(&out);
        assert!(matches!(
            decode_reply(&b, Some((&DataType::Int64, 2))),
            Ok(Reply::Result(a)) if a.as_ref() == array.as_ref()
        ));
        let wrong_type = decode_reply(&b, Some((&DataType::Utf8, 2))).unwrap_err();
        assert!(wrong_type.contains("declared"), "{wrong_type}");
        let wrong_rows = decode_reply(&b, Some((&DataType::Int64, 3))).unwrap_err();
        assert!(wrong_rows.contains("2 rows"), "{wrong_rows}");
    }

    #[test]
    fn garbage_never_panics() {
        let array: ArrayRef = Arc::new(StringArray::from(vec!["abc"; 20]));
        let mut out = Vec::new();
        encode_result(&mut out, &array).unwrap();
        let good = out[HEADER..].to_vec();
        // Every truncation and a byte flipped at any position: an error or a valid reply of
        // the declared shape, never a panic. (arrow-ipc's decoder itself panics on some damaged
        // schemas, e.g. an unknown type id: `decode_reply` turns that into an error.)
        let mut inputs: Vec<Vec<u8>> = (0..good.len()).map(|cut| good[..cut].to_vec()).collect();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            inputs.push(bad);
        }
        let mut errors = 0;
        for input in inputs {
            match decode_reply(&Buffer::from(input), Some((&DataType::Utf8, 20))) {
                Ok(Reply::Result(a)) => assert_eq!(a.len(), 20),
                Ok(other) => panic!("a damaged result decoded as {other:?}"),
                Err(_) => errors += 1,
            }
        }
        assert!(
            errors > good.len() / 2,
            "only {errors} damaged inputs refused"
        );
        assert!(decode_reply(&Buffer::from(vec![b'Z', 1, 2]), None).is_err());
        assert!(decode_reply(&Buffer::from(Vec::<u8>::new()), None).is_err());
    }

    /// Writes `value` over the 8-byte uncompressed length that starts every non-empty buffer of
    /// the record batch in a result body compressed with LZ4 or ZSTD; returns how many.
    fn patch_uncompressed_lengths(body: &mut [u8], value: u64) -> usize {
        let stream = &body[8..];
        let [_, batch] = split_stream(stream).unwrap();
        let body_start = 8 + batch.span.end - batch.body_len;
        let record = batch.message.header_as_record_batch().unwrap();
        assert!(record.compression().is_some());
        let at: Vec<usize> = record
            .buffers()
            .unwrap()
            .iter()
            .filter(|b| b.length() >= 8)
            .map(|b| body_start + b.offset() as usize)
            .collect();
        for &at in &at {
            body[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        at.len()
    }

    #[test]
    fn compressed_results_are_refused_before_anything_is_decompressed() {
        use datafusion::arrow::ipc::CompressionType;
        use datafusion::arrow::ipc::writer::IpcWriteOptions;
        let array: ArrayRef = Arc::new(Int64Array::from((0..1000).collect::<Vec<i64>>()));
        for codec in [CompressionType::LZ4_FRAME, CompressionType::ZSTD] {
            let options = IpcWriteOptions::default()
                .try_with_compression(Some(codec))
                .unwrap();
            let mut body = result_body(&array, options).unwrap();
            // 64 TiB: arrow would allocate that before any check of ours ran.
            assert!(patch_uncompressed_lengths(&mut body, 64 << 40) > 0);
            let e = decode_reply(&Buffer::from(body), Some((&DataType::Int64, 1000))).unwrap_err();
            assert!(e.contains("compression") && e.contains("refused"), "{e}");
        }
    }

    #[test]
    fn dictionaries_and_other_types_are_refused_before_the_batch_is_decoded() {
        use datafusion::arrow::array::DictionaryArray;
        use datafusion::arrow::datatypes::Int32Type;
        use datafusion::arrow::ipc::writer::IpcWriteOptions;
        let dictionary: ArrayRef = Arc::new(
            vec![Some("a"), None, Some("b")]
                .into_iter()
                .collect::<DictionaryArray<Int32Type>>(),
        );
        let dictionary = result_body(&dictionary, IpcWriteOptions::default()).unwrap();
        let e = decode_reply(&Buffer::from(dictionary), Some((&DataType::Utf8, 3))).unwrap_err();
        assert!(e.contains("dictionar"), "{e}");
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["a", "b"]));
        let mut out = Vec::new();
        encode_result(&mut out, &strings).unwrap();
        let e = decode_reply(&body(&out), Some((&DataType::Int64, 2))).unwrap_err();
        assert_eq!(e, "a result of type Utf8 where Int64 was declared");
        // A struct whose schema has more fields than the declared one.
        let e = decode_reply(
            &body(&out),
            Some((
                &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                2,
            )),
        )
        .unwrap_err();
        assert!(
            e.contains("list column with 0 children") || e.contains("where"),
            "{e}"
        );
        // Rows are checked on the batch header, before the batch is decoded.
        let e = decode_reply(&body(&out), Some((&DataType::Utf8, 5))).unwrap_err();
        assert!(e.contains("2 rows for a call over 5"), "{e}");
    }

    #[test]
    fn a_reply_is_bounded_by_what_the_call_returns() {
        let small = max_reply_len(Some((&DataType::Int64, 3)));
        assert!((MAX_ERROR_BODY..MAX_ERROR_BODY + 128 * 1024).contains(&small));
        let array: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX; 100_000]));
        let mut out = Vec::new();
        encode_result(&mut out, &array).unwrap();
        assert!(out.len() - HEADER <= max_reply_len(Some((&DataType::Int64, 100_000))));
        assert_eq!(max_reply_len(Some((&DataType::Utf8, 3))), MAX_FRAME);
        assert_eq!(max_reply_len(None), MAX_ERROR_BODY);
    }

    #[test]
    fn mutated_replies_and_calls_are_refused_or_sound() {
        for seed in [0x5eed_2024, 7, 120, 0xdead_beef, 4, 1] {
            let report = fuzz_worker_replies(seed, 20_000);
            assert!(report.clean(), "seed {seed}: {report:#?}");
            assert_eq!(report.cases, 20_000);
            assert!(
                report.accepted > 500 && report.refused > 5000,
                "{report:#?}"
            );
            assert!(report.accepted_raw > 100, "{report:#?}");
            assert!(report.calls_accepted > 50, "{report:#?}");
        }
    }
}

/// What encoding and decoding one column costs, each encoding, for [`column_codec_cost`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecCost {
    /// Encoding into a buffer with room, µs (median).
    pub encode_us: f64,
    /// Decoding with every check of a reply, µs (median).
    pub decode_us: f64,
}

/// What a column of `column` costs to encode (into a buffer with room, as into a region) and to
/// decode with every check a reply gets (declared type and rows known), raw and as an IPC
/// stream: `[raw, ipc]`, medians of `rounds` (isobench reports it).
#[doc(hidden)]
pub fn column_codec_cost(column: &ArrayRef, rounds: usize) -> Result<[CodecCost; 2], String> {
    use std::time::Instant;
    let expect = Expect {
        data_type: Some(column.data_type()),
        rows: column.len(),
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut costs = [CodecCost {
        encode_us: f64::NAN,
        decode_us: f64::NAN,
    }; 2];
    for (i, encoding) in [RAW, IPC].into_iter().enumerate() {
        let mut out = Vec::with_capacity(column.get_array_memory_size() + 64 * 1024);
        let (mut encode, mut decode) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            out.clear();
            let start = Instant::now();
            if encoding == RAW {
                if !raw::put_array(&mut out, column)? {
                    return Err(format!("{} does not cross raw", column.data_type()));
                }
            } else {
                put_array(&mut out, column).map_err(|e| e.to_string())?;
            }
            encode.push(start.elapsed().as_secs_f64() * 1e6);
            let bytes = Buffer::from(out.clone());
            let start = Instant::now();
            let decoded = decode_any_array(encoding, &bytes, expect)?;
            decode.push(start.elapsed().as_secs_f64() * 1e6);
            if decoded.to_data() != column.to_data() {
                return Err("the column did not round-trip".to_string());
            }
        }
        costs[i] = CodecCost {
            encode_us: median(encode),
            decode_us: median(decode),
        };
    }
    Ok(costs)
}
