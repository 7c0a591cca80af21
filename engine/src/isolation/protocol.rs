//! The messages between the host and a worker process.
//!
//! Every message is a frame: the magic bytes `udfw`, a little-endian `u32` body length, then the
//! body, whose first byte is its kind. Arrays cross as Arrow IPC streams of one column (one per argument, one for the
//! result); one call is one request and one reply, whatever the number of rows.
//!
//! | kind | direction      | body after the kind byte                                          |
//! |------|----------------|--------------------------------------------------------------------|
//! | `H`  | worker → host  | `u32` number of functions: the library loaded, the worker is ready |
//! | `C`  | host → worker  | `u32` function, `u8` path (0 row, 1 batch), `u64` rows, `u16` n, n × (`u8` constant flag, 3 zero bytes, `u32` length, IPC stream, zeros to a multiple of 8) |
//! | `R`  | worker → host  | 7 zero bytes, IPC stream of the result column                      |
//!
//! The header of a call is 16 bytes, so every IPC stream starts at a multiple of 8 in the body
//! and its buffers are used where they lie, without a copy.
//! | `E`  | worker → host  | UTF-8 message: the call (or the load) failed the way it fails in-process |
//!
//! Everything a worker sends is untrusted (the plugin shares its process and can write to the
//! channel): [`decode_reply`] checks every length and decodes with Arrow's full validation.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::arrow::ipc::writer::StreamWriter;

use crate::udf::CallPath;

/// The kind byte of a ready message.
pub(crate) const READY: u8 = b'H';
/// The kind byte of a call request.
pub(crate) const CALL: u8 = b'C';
/// The kind byte of a result.
pub(crate) const RESULT: u8 = b'R';
/// The kind byte of an error.
pub(crate) const ERROR: u8 = b'E';

/// The largest frame either side accepts (a result column over 2 GiB is refused in-process too).
pub(crate) const MAX_FRAME: usize = i32::MAX as usize;

/// The first bytes of every frame: a stray write into the channel is caught at once.
pub(crate) const MAGIC: [u8; 4] = *b"udfw";
/// The frame header: magic and body length.
pub(crate) const HEADER: usize = 8;

/// Starts a frame of `kind` in `out` (cleared); [`finish_frame`] writes its length.
pub(crate) fn start_frame(out: &mut Vec<u8>, kind: u8) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
}

/// Writes the length of the frame in `out`.
pub(crate) fn finish_frame(out: &mut [u8]) -> Result<(), String> {
    let body = out.len() - HEADER;
    if body > MAX_FRAME {
        return Err(format!("a message of {body} bytes is over the 2 GiB limit"));
    }
    out[4..HEADER].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(())
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
fn pad_to_8(out: &mut Vec<u8>) {
    let body = out.len() - HEADER;
    out.resize(out.len() + (8 - body % 8) % 8, 0);
}

/// Appends `array` as an IPC stream of one column.
fn put_array(out: &mut Vec<u8>, array: &ArrayRef) -> Result<(), ArrowError> {
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

/// A call request for `function` over `args` (arrays with their "one value for every row"
/// flags) and `rows` rows.
pub(crate) fn encode_call(
    out: &mut Vec<u8>,
    function: usize,
    path: CallPath,
    args: &[(ArrayRef, bool)],
    rows: usize,
) -> Result<(), String> {
    start_frame(out, CALL);
    out.extend_from_slice(&(function as u32).to_le_bytes());
    out.push(match path {
        CallPath::Row => 0,
        CallPath::Batch => 1,
    });
    out.extend_from_slice(&(rows as u64).to_le_bytes());
    out.extend_from_slice(&(args.len() as u16).to_le_bytes());
    for (i, (array, constant)) in args.iter().enumerate() {
        out.extend_from_slice(&[u8::from(*constant), 0, 0, 0]);
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        put_array(out, array).map_err(|e| format!("argument {}: {e}", i + 1))?;
        let len = out.len() - at - 4;
        out[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        pad_to_8(out);
    }
    finish_frame(out)
}

/// A decoded call request.
#[derive(Debug)]
pub(crate) struct Call {
    pub function: usize,
    pub path: CallPath,
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
    let path = match cursor.u8()? {
        0 => CallPath::Row,
        1 => CallPath::Batch,
        other => return Err(format!("unknown call path {other}")),
    };
    let rows = usize::try_from(cursor.u64()?).map_err(|e| e.to_string())?;
    let n = cursor.u16()?;
    let mut args = Vec::with_capacity(n as usize);
    for i in 0..n {
        let constant = cursor.u8()? != 0;
        cursor.take(3)?;
        let len = cursor.u32()? as usize;
        let start = bytes.len() - cursor.0.len();
        cursor.take(len)?;
        let end = start + len;
        cursor.take((8 - end % 8) % 8)?;
        let array = decode_array(&body.slice_with_length(start, len))
            .map_err(|e| format!("argument {}: {e}", i + 1))?;
        args.push((array, constant));
    }
    Ok(Call {
        function,
        path,
        rows,
        args,
    })
}

/// Decodes an IPC stream that must hold exactly one batch of one column.
pub(crate) fn decode_array(stream: &Buffer) -> Result<ArrayRef, String> {
    let mut decoder = StreamDecoder::new();
    let mut buffer = stream.clone();
    let mut batch = None;
    while !buffer.is_empty() {
        let before = buffer.len();
        if let Some(b) = decoder.decode(&mut buffer).map_err(|e| e.to_string())? {
            if batch.is_some() {
                return Err("more than one record batch".to_string());
            }
            batch = Some(b);
        }
        if buffer.len() == before {
            return Err("the IPC stream makes no progress".to_string());
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    let batch = batch.ok_or("no record batch")?;
    if batch.num_columns() != 1 {
        return Err(format!("{} columns instead of one", batch.num_columns()));
    }
    Ok(Arc::clone(batch.column(0)))
}

/// A result frame.
pub(crate) fn encode_result(out: &mut Vec<u8>, array: &ArrayRef) -> Result<(), String> {
    start_frame(out, RESULT);
    pad_to_8(out);
    put_array(out, array).map_err(|e| format!("cannot encode the result: {e}"))?;
    finish_frame(out)
}

/// An error frame.
pub(crate) fn encode_error(out: &mut Vec<u8>, message: &str) {
    start_frame(out, ERROR);
    // Messages are short; cut one that is not, on a character boundary.
    let mut end = message.len().min(64 * 1024);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&message.as_bytes()[..end]);
    finish_frame(out).expect("an error message is far below the frame limit");
}

/// A ready frame.
pub(crate) fn encode_ready(out: &mut Vec<u8>, functions: usize) {
    start_frame(out, READY);
    out.extend_from_slice(&(functions as u32).to_le_bytes());
    finish_frame(out).expect("five bytes");
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
        Some(&RESULT) => {
            if bytes.len() < 8 || bytes[1..8] != [0; 7] {
                return Err("a result message without its padding".to_string());
            }
            let array = decode_array(&body.slice(8))?;
            if let Some((data_type, rows)) = expect {
                if array.data_type() != data_type {
                    return Err(format!(
                        "a result of type {} where {data_type} was declared",
                        array.data_type()
                    ));
                }
                if array.len() != rows {
                    return Err(format!(
                        "a result of {} rows for a call over {rows}",
                        array.len()
                    ));
                }
            }
            Ok(Reply::Result(array))
        }
        Some(other) => Err(format!("unknown message kind 0x{other:02x}")),
        None => Err("an empty message".to_string()),
    }
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
}
