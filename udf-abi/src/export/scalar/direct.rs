//! The direct batch entry of `#[udf]` functions over primitives (`fn(i64) -> i64`,
//! `fn(f64, f64) -> f64`, `fn(i32) -> bool`, ...): when every argument is a column of the
//! declared type (with or without NULLs) or, for two arguments, one is a constant that is not
//! NULL, as the host passes most batches, the function runs over the host's buffers where they
//! are and its results go out in one buffer, with nothing of the generic path between
//! ([`batch::call_batch`](super::batch::call_batch): arrow arrays for the arguments, `Column`s,
//! the kernel's dispatch, an `ArrayRef` for the result, the check of its type).
//!
//! Why: in a query, between two batches of one operator, the rest of the query evicts the caches,
//! so a call's fixed cost is the code and data it brings back, not its instructions. Measured with
//! cold caches (`coldcall`, BENCHMARKS.md), the generic path cost about 7 µs more than the same
//! batch computed by C code written straight to the ABI. Every other case (a unary function's
//! constant argument or two constants, which an immutable function computes once there, a NULL
//! constant, a layout of another type, a null pointer) returns `None` before anything is read or
//! written, and the generic path takes the call, with all its rules.
//!
//! NULLs: the function is never called on what a NULL slot holds (any bytes, e.g. after a
//! filter, on which the function could panic). The result carries no validity bitmap: the ABI has
//! the host mask the rows where an argument is NULL whatever the plugin writes (`udf_abi.h`,
//! `UdfBatchEntrypoint`), which it does in any case when an argument has NULLs, so the plugin
//! does not build a bitmap the host builds again. Those rows' result slots hold the type's zero.
//! The rows are computed 64 at a time: straight through where none is NULL, else the valid ones
//! one by one (found by their bits). Computing a chunk with NULLs without a branch (each NULL
//! row's arguments replaced by a valid row's, for immutable functions) was tried and measured
//! slower in queries (BENCHMARKS.md).
//!
//! The arguments are left in place (the ABI lets the plugin do so: the host releases what is left
//! after the call), so nothing here calls back into the host.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::batch::{Native, c_format, format_is, plain_layout, result_schema};
use super::{install_quiet_panic_hook, write_batch_outcome};
use crate::v2::{FFI_ArrowArray, FFI_ArrowSchema, UdfOwnedBytes, UdfType};

/// An argument the direct entry reads: a column, or a constant's value.
enum Arg<'a, A> {
    Column(Column<'a, A>),
    Constant(A),
}

impl<'a, A> Arg<'a, A> {
    /// A column; `None` for a constant (which the unary entries leave to the generic path: it
    /// computes an immutable function's constant once).
    fn column(self) -> Option<Column<'a, A>> {
        match self {
            Arg::Column(column) => Some(column),
            Arg::Constant(_) => None,
        }
    }
}

/// A column's values for the batch's rows, and its validity bits when it may have NULLs.
struct Column<'a, A> {
    values: &'a [A],
    valid: Option<Bits<'a>>,
}

/// A validity bitmap: row `i`'s bit is bit `offset + i` of `bytes`, least significant first
/// (Arrow's order); `bytes` holds the bits of every row of the batch.
struct Bits<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Bits<'_> {
    /// The bits of rows `start..start + n` (`n` in 1..=64) as a word, row `start` in bit 0.
    fn word(&self, start: usize, n: usize) -> u64 {
        let first = self.offset + start;
        let (byte, shift) = (first / 8, first % 8);
        // The bytes that hold the `n` bits: at most nine.
        let held = &self.bytes[byte..(first + n).div_ceil(8)];
        let mut le = [0u8; 16];
        le[..held.len()].copy_from_slice(held);
        let low = u64::from_le_bytes(le[..8].try_into().expect("eight bytes"));
        let word = match shift {
            0 => low,
            _ => (low >> shift) | (u64::from(le[8]) << (64 - shift)),
        };
        word & full(n)
    }
}

/// The word of `n` (1..=64) valid rows.
fn full(n: usize) -> u64 {
    u64::MAX >> (64 - n)
}

/// The validity of rows `start..start + n` of a column: its bits, or all set without a bitmap.
fn valid_word(bits: Option<&Bits<'_>>, start: usize, n: usize) -> u64 {
    bits.map_or(full(n), |bits| bits.word(start, n))
}

/// `row(i)` for every row `i` whose bit in `valid` is set, and the type's zero for the others
/// (rows the host masks), 64 rows at a time: `chunk(start, out)` computes a chunk without NULLs
/// straight through (a loop the compiler can vectorise); in the others, the valid rows are
/// visited bit by bit.
fn masked<R: Native>(
    rows: usize,
    valid: impl Fn(usize, usize) -> u64,
    chunk: impl Fn(usize, &mut [R]),
    row: impl Fn(usize) -> R,
) -> Vec<R> {
    let mut out = vec![R::default(); rows];
    for (start, out) in (0..).step_by(64).zip(out.chunks_mut(64)) {
        let mut word = valid(start, out.len());
        if word == full(out.len()) {
            chunk(start, out);
        } else {
            while word != 0 {
                let bit = word.trailing_zeros() as usize;
                out[bit] = row(start + bit);
                word &= word - 1;
            }
        }
    }
    out
}

/// One call of a batch entrypoint: its arguments, as the host passed them (the generated
/// entrypoint fills it in from its parameters).
#[derive(Debug)]
pub struct RawCall {
    pub args: *const FFI_ArrowArray,
    pub schemas: *const FFI_ArrowSchema,
    pub is_scalar: *const u8,
    pub args_len: usize,
    pub num_rows: usize,
    pub out: *mut FFI_ArrowArray,
    pub out_schema: *mut FFI_ArrowSchema,
    pub error: *mut UdfOwnedBytes,
}

impl RawCall {
    /// Whether the direct entry of a function of `expected` arguments can read this call: that
    /// many arguments, and no pointer it reads or writes null.
    #[inline]
    fn usable(&self, expected: usize) -> bool {
        self.args_len == expected
            && !self.args.is_null()
            && !self.schemas.is_null()
            && !self.is_scalar.is_null()
            && !self.out.is_null()
            && !self.out_schema.is_null()
            && !self.error.is_null()
    }

    /// Argument `i` when it is of type `A` in the plain layout (two buffers, the values' one
    /// non-null and aligned, no children) with the rows it must have: a column's first
    /// `num_rows` values and their validity bits (when it has a bitmap and a null count other
    /// than 0: -1, not computed, included), or a constant's value when it is not NULL. `None`
    /// for anything else.
    ///
    /// # Safety
    ///
    /// The call's pointers must hold more than `i` valid arrays, schemas and flags, as the host
    /// passes them to a batch entrypoint, alive and unchanged while the slices live.
    unsafe fn argument<A: Native>(&self, i: usize) -> Option<Arg<'_, A>> {
        // SAFETY: the caller's promise: `i` is in range of the three arrays. The array is only
        // read (it stays in place; the host releases it after the call).
        let (array, schema, scalar) = unsafe {
            (
                &*self.args.add(i),
                &*self.schemas.add(i),
                *self.is_scalar.add(i) != 0,
            )
        };
        if array.release.is_none() || schema.format.is_null() {
            return None;
        }
        // SAFETY: non-null, and a schema's format is a NUL-terminated string that lives as long
        // as the schema, which the host lends for the call.
        if !unsafe { format_is(schema.format, c_format(A::TYPE)) } || !schema.dictionary.is_null() {
            return None;
        }
        // SAFETY: a valid array (the caller's promise).
        let plain = unsafe { plain_layout::<A>(array) }?;
        // A constant has one row standing for all.
        let rows = if scalar { 1 } else { self.num_rows };
        let may_have_nulls = !plain.validity.is_null() && array.null_count != 0;
        // Too few rows; or a constant that may be NULL (the generic path answers NULL for
        // every row without calling the function).
        if plain.length < rows || (scalar && may_have_nulls) {
            return None;
        }
        // SAFETY: the values buffer of a valid array holds `offset + length` values, of which
        // these are `rows` (at most `length`) from `offset`, alive for the call.
        let values =
            unsafe { std::slice::from_raw_parts(plain.values.as_ptr().add(plain.offset), rows) };
        if scalar {
            return Some(Arg::Constant(values[0]));
        }
        let valid = may_have_nulls.then(|| Bits {
            // SAFETY: the validity buffer of a valid array holds a bit for each of its
            // `offset + length` slots, in whole bytes: these are the bytes of the first
            // `offset + rows` (`rows` at most `length`), alive for the call.
            bytes: unsafe {
                std::slice::from_raw_parts(plain.validity, (plain.offset + rows).div_ceil(8))
            },
            offset: plain.offset,
        });
        Some(Arg::Column(Column { values, valid }))
    }

    /// Runs `compute` (the function over the rows, inside `catch_unwind`: a panic is the call's
    /// error) and writes its result, of type `t`, or the error.
    ///
    /// # Safety
    ///
    /// `out`, `out_schema` and `error` must be valid for writes (non-null: checked by `usable`).
    unsafe fn finish<T>(&self, t: UdfType, compute: impl FnOnce() -> Vec<T>) -> i32 {
        install_quiet_panic_hook();
        let rows = self.num_rows;
        let result = catch_unwind(AssertUnwindSafe(|| {
            Ok((export(compute(), rows), result_schema(t)))
        }));
        // SAFETY: the caller's promise.
        unsafe { write_batch_outcome(result, self.out, self.out_schema, self.error) }
    }
}

/// What a result exported by [`export`] owns: its values, and the C array of buffer pointers
/// that `FFI_ArrowArray::buffers` points at.
struct DirectResult<T> {
    _values: Vec<T>,
    buffers: [*const c_void; 2],
}

/// Exports `values` (the layout of the declared result type, `rows` rows, offset 0) as the
/// result array, without a validity bitmap (see the module documentation on NULLs).
fn export<T>(values: Vec<T>, rows: usize) -> FFI_ArrowArray {
    let pointer = values.as_ptr().cast();
    let private = Box::into_raw(Box::new(DirectResult {
        _values: values,
        buffers: [std::ptr::null(), pointer],
    }));
    // SAFETY: `private` comes from `Box::into_raw` just above: valid, and owned by the exported
    // array until its release callback takes it back.
    let buffers = unsafe { (&raw mut (*private).buffers).cast::<*const c_void>() };
    FFI_ArrowArray {
        length: rows as i64,
        null_count: 0,
        offset: 0,
        n_buffers: 2,
        n_children: 0,
        buffers,
        children: std::ptr::null_mut(),
        dictionary: std::ptr::null_mut(),
        release: Some(release::<T>),
        private_data: private.cast(),
    }
}

/// The release callback of [`export`].
///
/// # Safety
///
/// `array` must be null or point at an array made by [`export`] of `T`s, released once.
unsafe extern "C" fn release<T>(array: *mut FFI_ArrowArray) {
    if array.is_null() {
        return;
    }
    // SAFETY: non-null, and the consumer passes the array it releases, valid for reads and
    // writes.
    let array = unsafe { &mut *array };
    if !array.private_data.is_null() {
        // SAFETY: `private_data` was set by `export` from `Box::into_raw` of a
        // `DirectResult<T>`, and is taken back once: it is cleared below.
        drop(unsafe { Box::from_raw(array.private_data.cast::<DirectResult<T>>()) });
    }
    array.private_data = std::ptr::null_mut();
    array.release = None;
}

/// The direct entry of a function of one primitive argument returning a primitive: the call's
/// status if it took the call, `None` (nothing read or written) for the generic path.
///
/// # Safety
///
/// `call`'s pointers must satisfy [`BatchEntrypoint`](crate::v2::BatchEntrypoint)'s contract.
#[inline]
pub unsafe fn unary<A: Native, R: Native>(call: &RawCall, f: impl Fn(A) -> R) -> Option<i32> {
    if !call.usable(1) {
        return None;
    }
    // SAFETY: the contract: one argument's structs, alive and unchanged for the call.
    let a = unsafe { call.argument::<A>(0) }?.column()?;
    let compute = || match &a.valid {
        None => a.values.iter().map(|&x| f(x)).collect::<Vec<R>>(),
        Some(bits) => masked(
            a.values.len(),
            |s, n| bits.word(s, n),
            |s, out| {
                for (o, &x) in out.iter_mut().zip(&a.values[s..]) {
                    *o = f(x);
                }
            },
            |i| f(a.values[i]),
        ),
    };
    // SAFETY: the contract: the outputs are valid for writes.
    Some(unsafe { call.finish(R::TYPE, compute) })
}

/// The direct entry of a boolean-valued function of one primitive argument; see [`unary`].
///
/// # Safety
///
/// As for [`unary`].
#[inline]
pub unsafe fn unary_bool<A: Native>(call: &RawCall, f: impl Fn(A) -> bool) -> Option<i32> {
    if !call.usable(1) {
        return None;
    }
    // SAFETY: as in `unary`.
    let a = unsafe { call.argument::<A>(0) }?.column()?;
    // The bits, least significant first, 64 rows to a word written little-endian: Arrow's
    // bitmap layout. A NULL row's bit is 0.
    let compute = || {
        let mut words = Vec::with_capacity(a.values.len().div_ceil(64));
        for (start, chunk) in (0..).step_by(64).zip(a.values.chunks(64)) {
            let valid = valid_word(a.valid.as_ref(), start, chunk.len());
            let mut word = 0u64;
            if valid == full(chunk.len()) {
                for (bit, &x) in chunk.iter().enumerate() {
                    word |= u64::from(f(x)) << bit;
                }
            } else {
                let mut rest = valid;
                while rest != 0 {
                    let bit = rest.trailing_zeros() as usize;
                    word |= u64::from(f(chunk[bit])) << bit;
                    rest &= rest - 1;
                }
            }
            words.push(word.to_le());
        }
        words
    };
    // SAFETY: as in `unary`.
    Some(unsafe { call.finish(UdfType::Bool, compute) })
}

/// The direct entry of a function of two primitive arguments returning a primitive: two columns,
/// or a column and a constant that is not NULL; see [`unary`].
///
/// # Safety
///
/// As for [`unary`].
#[inline]
pub unsafe fn binary<A: Native, B: Native, R: Native>(
    call: &RawCall,
    f: impl Fn(A, B) -> R,
) -> Option<i32> {
    if !call.usable(2) {
        return None;
    }
    // SAFETY: the contract: two arguments' structs, alive and unchanged for the call.
    let (a, b) = unsafe { (call.argument::<A>(0)?, call.argument::<B>(1)?) };
    let rows = call.num_rows;
    // A column beside a constant is computed row by row as two columns are (as the generic
    // path does); two constants are left to the generic path (an immutable function's
    // constant result is computed once there).
    match (a, b) {
        (Arg::Column(a), Arg::Column(b)) => {
            let compute = || match (&a.valid, &b.valid) {
                (None, None) => a
                    .values
                    .iter()
                    .zip(b.values)
                    .map(|(&x, &y)| f(x, y))
                    .collect::<Vec<R>>(),
                (va, vb) => masked(
                    rows,
                    |s, n| valid_word(va.as_ref(), s, n) & valid_word(vb.as_ref(), s, n),
                    |s, out| {
                        for (o, (&x, &y)) in
                            out.iter_mut().zip(a.values[s..].iter().zip(&b.values[s..]))
                        {
                            *o = f(x, y);
                        }
                    },
                    |i| f(a.values[i], b.values[i]),
                ),
            };
            // SAFETY: as in `unary`.
            Some(unsafe { call.finish(R::TYPE, compute) })
        }
        (Arg::Column(a), Arg::Constant(y)) => {
            let compute = || match &a.valid {
                None => a.values.iter().map(|&x| f(x, y)).collect::<Vec<R>>(),
                Some(bits) => masked(
                    rows,
                    |s, n| bits.word(s, n),
                    |s, out| {
                        for (o, &x) in out.iter_mut().zip(&a.values[s..]) {
                            *o = f(x, y);
                        }
                    },
                    |i| f(a.values[i], y),
                ),
            };
            // SAFETY: as in `unary`.
            Some(unsafe { call.finish(R::TYPE, compute) })
        }
        (Arg::Constant(x), Arg::Column(b)) => {
            let compute = || match &b.valid {
                None => b.values.iter().map(|&y| f(x, y)).collect::<Vec<R>>(),
                Some(bits) => masked(
                    rows,
                    |s, n| bits.word(s, n),
                    |s, out| {
                        for (o, &y) in out.iter_mut().zip(&b.values[s..]) {
                            *o = f(x, y);
                        }
                    },
                    |i| f(x, b.values[i]),
                ),
            };
            // SAFETY: as in `unary`.
            Some(unsafe { call.finish(R::TYPE, compute) })
        }
        (Arg::Constant(_), Arg::Constant(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::ffi::from_ffi;
    use arrow_array::{
        Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, UInt64Array,
        make_array,
    };
    use arrow_data::ArrayData;
    use arrow_schema::DataType;

    use super::super::batch::{Column, Kernel, call_batch};
    use super::*;
    use crate::v2::status;

    /// One batch call's C structs, as a host passes them.
    struct Call {
        args: Vec<FFI_ArrowArray>,
        schemas: Vec<FFI_ArrowSchema>,
        flags: Vec<u8>,
        out: FFI_ArrowArray,
        out_schema: FFI_ArrowSchema,
        error: UdfOwnedBytes,
    }

    impl Call {
        fn new(inputs: &[(ArrayRef, bool)]) -> Call {
            let data: Vec<_> = inputs.iter().map(|(a, s)| (a.to_data(), *s)).collect();
            Call::of_data(&data)
        }

        /// From array data, which may start at an offset into its buffers (an `ArrayRef` made
        /// from it would not: arrow slices the buffers instead).
        fn of_data(inputs: &[(ArrayData, bool)]) -> Call {
            Call {
                args: inputs.iter().map(|(a, _)| FFI_ArrowArray::new(a)).collect(),
                schemas: inputs
                    .iter()
                    .map(|(a, _)| FFI_ArrowSchema::try_from(a.data_type()).unwrap())
                    .collect(),
                flags: inputs.iter().map(|&(_, s)| u8::from(s)).collect(),
                out: FFI_ArrowArray::empty(),
                out_schema: FFI_ArrowSchema::empty(),
                error: UdfOwnedBytes::EMPTY,
            }
        }

        /// The call's pointers, as the generated entrypoint passes them on.
        fn raw(&mut self, args_len: usize, num_rows: usize) -> RawCall {
            RawCall {
                args: self.args.as_ptr(),
                schemas: self.schemas.as_ptr(),
                is_scalar: self.flags.as_ptr(),
                args_len,
                num_rows,
                out: &mut self.out,
                out_schema: &mut self.out_schema,
                error: &mut self.error,
            }
        }

        /// Whether the call left everything as it was: the arguments in place and unreleased,
        /// nothing written.
        fn untouched(&self) -> bool {
            self.args.iter().all(|a| a.release.is_some())
                && self.out.release.is_none()
                && self.out_schema.release.is_none()
                && self.error.ptr.is_null()
        }

        /// The result or the error message of a call that returned `status`.
        fn outcome(self, status: i32) -> Result<ArrayRef, String> {
            if status == status::OK {
                // SAFETY: the entry exported a valid array and its schema into them.
                let data = unsafe { from_ffi(self.out, &self.out_schema) }.unwrap();
                data.validate_full().unwrap();
                return Ok(make_array(data));
            }
            assert_eq!(status, status::ERROR);
            // SAFETY: the entry wrote bytes made by `owned_bytes` (a `Vec<u8>`'s parts), which
            // this takes back once.
            let bytes =
                unsafe { Vec::from_raw_parts(self.error.ptr, self.error.len, self.error.capacity) };
            Err(String::from_utf8(bytes).unwrap())
        }
    }

    /// An entry (direct or generic) over a call's structs.
    type Entry<'a> = dyn Fn(&mut Call, usize) -> Option<i32> + 'a;

    /// Calls `direct` and the generic path (`call_batch` with `kernel`) on the same inputs:
    /// both answer alike when the direct entry takes the call, and when it does not it has
    /// touched nothing. Returns whether it took the call.
    fn compare(
        inputs: &[(ArrayData, bool)],
        rows: usize,
        arg_types: &[UdfType],
        return_type: UdfType,
        direct: &Entry<'_>,
        kernel: &Kernel<'_>,
    ) -> bool {
        let mut call = Call::of_data(inputs);
        let taken = direct(&mut call, rows);
        let generic = || {
            let mut call = Call::of_data(inputs);
            let slow = |_: &[Column], _: usize| -> Result<ArrayRef, String> {
                Err("no row loop here".to_string())
            };
            // SAFETY: valid arrays, schemas and flags, one per argument; the outputs are valid
            // for writes.
            let status = unsafe {
                call_batch(
                    call.args.as_mut_ptr(),
                    call.schemas.as_ptr(),
                    call.flags.as_ptr(),
                    inputs.len(),
                    arg_types,
                    return_type,
                    rows,
                    &mut call.out,
                    &mut call.out_schema,
                    &mut call.error,
                    Some(kernel),
                    &slow,
                )
            };
            call.outcome(status)
        };
        match taken {
            Some(status) => {
                // The arguments stay in place: the host releases them.
                assert!(call.args.iter().all(|a| a.release.is_some()));
                let direct = call.outcome(status);
                let generic = generic();
                match (&direct, &generic) {
                    (Ok(d), Ok(g)) => {
                        // No bitmap: the rows with a NULL argument are the host's to mask.
                        assert_eq!(d.null_count(), 0, "{inputs:?}");
                        assert_eq!(
                            strict(d, inputs, rows),
                            strict(g, inputs, rows),
                            "{inputs:?}"
                        );
                    }
                    (Err(d), Err(g)) => {
                        // The same panic, reported from another line.
                        let cut = |e: &str| e.split(" (at ").next().unwrap().to_string();
                        assert_eq!(cut(d), cut(g));
                    }
                    _ => panic!("direct {direct:?} but generic {generic:?} for {inputs:?}"),
                }
                true
            }
            None => {
                assert!(call.untouched(), "{inputs:?}");
                generic().unwrap();
                false
            }
        }
    }

    /// `result` with the rows NULL where an argument is, as the host masks them (the ABI's
    /// STRICT rule; these functions take no NULLs).
    fn strict(result: &ArrayRef, inputs: &[(ArrayData, bool)], rows: usize) -> ArrayData {
        let mut nulls = result.logical_nulls();
        for (input, scalar) in inputs {
            let input = make_array(input.clone());
            let column = match scalar {
                true if input.is_null(0) => Some(arrow_buffer::NullBuffer::new_null(rows)),
                true => None,
                false => input.slice(0, rows).logical_nulls(),
            };
            nulls = arrow_buffer::NullBuffer::union(nulls.as_ref(), column.as_ref());
        }
        result
            .to_data()
            .into_builder()
            .nulls(nulls)
            .build()
            .unwrap()
    }

    /// [`compare`] for a function of one `BIGINT` column.
    fn compare_one(
        input: ArrayData,
        rows: usize,
        return_type: UdfType,
        direct: &Entry<'_>,
        kernel: &Kernel<'_>,
    ) -> bool {
        let inputs = [(input, false)];
        compare(
            &inputs,
            rows,
            &[UdfType::Int64],
            return_type,
            direct,
            kernel,
        )
    }

    fn sq(x: i64) -> i64 {
        x.wrapping_mul(x)
    }

    fn direct_sq(call: &mut Call, rows: usize) -> Option<i32> {
        // SAFETY: the structs of `call`, one per argument, valid; outputs valid for writes.
        unsafe { unary::<i64, i64>(&call.raw(call.args.len(), rows), sq) }
    }

    fn kernel_sq(c: &[Column], n: usize) -> Result<ArrayRef, String> {
        super::super::batch::unary::<i64, i64>(c, n, true, sq)
    }

    fn ints(values: &[Option<i64>]) -> ArrayRef {
        Arc::new(Int64Array::from(values.to_vec()))
    }

    fn data(inputs: &[(ArrayRef, bool)]) -> Vec<(ArrayData, bool)> {
        inputs.iter().map(|(a, s)| (a.to_data(), *s)).collect()
    }

    /// `len` values of type `t` starting `offset` values into `values`' buffer (and into
    /// `validity`'s bits, if given), as a host may export them.
    fn at_offset<T: arrow_buffer::ArrowNativeType>(
        t: DataType,
        values: &[T],
        validity: Option<&[bool]>,
        offset: usize,
        len: usize,
    ) -> ArrayData {
        let bits = validity.map(|v| arrow_buffer::BooleanBuffer::from(v.to_vec()).into_inner());
        ArrayData::builder(t)
            .len(len)
            .offset(offset)
            .add_buffer(arrow_buffer::Buffer::from_slice_ref(values))
            .null_bit_buffer(bits)
            .build()
            .unwrap()
    }

    #[test]
    fn plain_columns_are_taken_and_answer_as_the_generic_path() {
        let many: Vec<Option<i64>> = (0..100).map(|i| Some(i * 7 - 300)).collect();
        let long = ints(&many);
        let extreme = ints(&[Some(i64::MAX), Some(i64::MIN), Some(0), Some(-1)]);
        // A bitmap without a NULL (a count of 0): no NULLs, taken.
        let unmasked = Int64Array::new(
            vec![1, 2, 3].into(),
            Some(arrow_buffer::NullBuffer::new_valid(3)),
        );
        let raw: Vec<i64> = (0..100).map(|i| i * 7 - 300).collect();
        let taken: Vec<(ArrayData, usize)> = vec![
            (long.to_data(), 100),
            // Offsets: the values start into the buffer, by the array's offset or by a slice.
            (at_offset(DataType::Int64, &raw, None, 37, 41), 41),
            (at_offset(DataType::Int64, &raw, None, 99, 1), 1),
            (long.slice(37, 41).to_data(), 41),
            // More rows than the batch: the first `rows` are its.
            (long.to_data(), 5),
            (at_offset(DataType::Int64, &raw, None, 10, 50), 7),
            (extreme.to_data(), 4),
            (ints(&[]).to_data(), 0),
            (long.to_data(), 0),
            (unmasked.into_data(), 3),
        ];
        for (array, rows) in taken {
            let described = format!("{array:?}, {rows} rows");
            let took = compare_one(array, rows, UdfType::Int64, &direct_sq, &kernel_sq);
            assert!(took, "{described}");
        }
    }

    /// The value the probes below panic on; the tests put it only into NULL slots.
    const SENTINEL: i64 = -7_777_777;

    fn probe(x: i64) -> i64 {
        assert_ne!(x, SENTINEL, "a row with a NULL argument was computed");
        x.wrapping_mul(3)
    }

    /// Validity patterns of `len` slots: about one NULL in ten, half, all NULL, one NULL in
    /// each 64-row word, runs of 70.
    fn patterns(len: usize, seed: u64) -> Vec<Vec<bool>> {
        let mut state = seed | 1;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        vec![
            (0..len).map(|_| random() % 10 != 0).collect(),
            (0..len).map(|_| random() % 2 == 0).collect(),
            vec![false; len],
            (0..len).map(|i| i % 64 != 5).collect(),
            (0..len).map(|i| (i / 70) % 2 == 0).collect(),
        ]
    }

    /// Values for `valid`'s slots: the sentinel in the NULL ones.
    fn probed(valid: &[bool], scale: i64) -> Vec<i64> {
        (0..valid.len())
            .map(|i| match valid[i] {
                true => i as i64 * scale - 50,
                false => SENTINEL,
            })
            .collect()
    }

    #[test]
    fn columns_with_nulls_are_taken_and_no_null_row_is_computed() {
        let raw = |call: &mut Call, rows: usize| call.raw(call.args.len(), rows);
        let direct = |call: &mut Call, rows: usize| {
            // SAFETY: as in `direct_sq`.
            unsafe { unary::<i64, i64>(&raw(call, rows), probe) }
        };
        let kernel =
            |c: &[Column], n: usize| super::super::batch::unary::<i64, i64>(c, n, true, probe);
        let odd = |x: i64| probe(x) % 2 != 0;
        let direct_odd = |call: &mut Call, rows: usize| {
            // SAFETY: as in `direct_sq`.
            unsafe { unary_bool::<i64>(&raw(call, rows), odd) }
        };
        let kernel_odd =
            |c: &[Column], n: usize| super::super::batch::unary_bool::<i64>(c, n, true, odd);
        let sum = |x: i64, y: i64| probe(x).wrapping_add(probe(y));
        let direct_sum = |call: &mut Call, rows: usize| {
            // SAFETY: as in `direct_sq`.
            unsafe { binary::<i64, i64, i64>(&raw(call, rows), sum) }
        };
        let kernel_sum =
            |c: &[Column], n: usize| super::super::batch::binary::<i64, i64, i64>(c, n, true, sum);
        let five = ints(&[Some(5)]).to_data();
        let both = [UdfType::Int64, UdfType::Int64];
        let mut cases = 0;
        for rows in [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 197] {
            for offset in [0, 1, 3, 7, 8, 9, 63, 64] {
                // Two slots more than the batch: the column may be longer than the batch.
                let len = offset + rows + 2;
                let all = patterns(len, (rows * 131 + offset) as u64);
                for (p, valid) in all.iter().enumerate() {
                    let column = at_offset(
                        DataType::Int64,
                        &probed(valid, 7),
                        Some(valid),
                        offset,
                        rows + 2,
                    );
                    let what = format!("{rows} rows at {offset}, pattern {p}");
                    assert!(
                        compare_one(column.clone(), rows, UdfType::Int64, &direct, &kernel),
                        "{what}"
                    );
                    assert!(
                        compare_one(
                            column.clone(),
                            rows,
                            UdfType::Bool,
                            &direct_odd,
                            &kernel_odd
                        ),
                        "{what}"
                    );
                    // Beside another column (another pattern, at another offset), and beside a
                    // constant either way round.
                    let other_offset = (offset + 5) % 11;
                    let others = patterns(other_offset + rows + 1, (rows + offset) as u64);
                    let other_valid = &others[(p + 1) % others.len()];
                    let other = at_offset(
                        DataType::Int64,
                        &probed(other_valid, -3),
                        Some(other_valid),
                        other_offset,
                        rows + 1,
                    );
                    for inputs in [
                        vec![(column.clone(), false), (other.clone(), false)],
                        vec![(other, false), (column.clone(), false)],
                        vec![(column.clone(), false), (five.clone(), true)],
                        vec![(five.clone(), true), (column, false)],
                    ] {
                        let took = compare(
                            &inputs,
                            rows,
                            &both,
                            UdfType::Int64,
                            &direct_sum,
                            &kernel_sum,
                        );
                        assert!(took, "{what}: {inputs:?}");
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 12 * 8 * 5);
        // A null count not computed (-1) beside a bitmap: the bitmap says which rows are NULL.
        let valid = [true, false, true, true, false, true];
        let column = at_offset(DataType::Int64, &probed(&valid, 2), Some(&valid), 1, 5);
        let mut call = Call::of_data(&[(column.clone(), false)]);
        call.args[0].null_count = -1;
        let status = direct(&mut call, 5).expect("taken");
        let out = call.outcome(status).unwrap();
        assert_eq!(out.null_count(), 0);
        // Slots 1 to 5: `(2 * slot - 50) * 3` where valid.
        let expected = ints(&[None, Some(-138), Some(-132), None, Some(-120)]);
        assert_eq!(strict(&out, &[(column, false)], 5), expected.to_data());
    }

    #[test]
    fn every_other_call_is_left_to_the_generic_path_untouched() {
        let left: Vec<(Vec<(ArrayData, bool)>, usize)> = vec![
            // A constant, NULL or not.
            (data(&[(ints(&[Some(4)]), true)]), 5),
            (data(&[(ints(&[None]), true)]), 5),
        ];
        for (inputs, rows) in left {
            let took = compare(
                &inputs,
                rows,
                &[UdfType::Int64],
                UdfType::Int64,
                &direct_sq,
                &kernel_sq,
            );
            assert!(!took, "{inputs:?}");
        }
    }

    #[test]
    fn layouts_it_does_not_know_are_refused_before_anything_is_read() {
        let values = ints(&[Some(1), Some(2)]);
        // Another type's schema (an Int32 column where Int64 is declared).
        let mut call = Call::new(&[(Arc::new(Int32Array::from(vec![1, 2])), false)]);
        assert_eq!(direct_sq(&mut call, 2), None);
        assert!(call.untouched());
        // A null format, too few rows, a negative length or offset, three buffers, children:
        // each refused, nothing touched.
        type Forge = Box<dyn Fn(&mut Call)>;
        let forged: Vec<(&str, Forge)> = vec![
            (
                "null format",
                Box::new(|c: &mut Call| c.schemas[0] = FFI_ArrowSchema::empty()),
            ),
            ("short", Box::new(|c: &mut Call| c.args[0].length = 1)),
            (
                "negative length",
                Box::new(|c: &mut Call| c.args[0].length = -1),
            ),
            (
                "negative offset",
                Box::new(|c: &mut Call| c.args[0].offset = -1),
            ),
            (
                "three buffers",
                Box::new(|c: &mut Call| c.args[0].n_buffers = 3),
            ),
            (
                "children",
                Box::new(|c: &mut Call| c.args[0].n_children = 1),
            ),
        ];
        for (what, forge) in forged {
            let mut call = Call::new(&[(Arc::clone(&values), false)]);
            let saved = (
                call.args[0].length,
                call.args[0].offset,
                call.args[0].n_buffers,
            );
            forge(&mut call);
            assert_eq!(direct_sq(&mut call, 2), None, "{what}");
            assert!(call.untouched(), "{what}");
            // Put the fields back so the array releases what it owns.
            (
                call.args[0].length,
                call.args[0].offset,
                call.args[0].n_buffers,
            ) = saved;
            call.args[0].n_children = 0;
        }
        // Two arguments for a function of one.
        let mut call = Call::new(&[(Arc::clone(&values), false), (Arc::clone(&values), false)]);
        assert_eq!(direct_sq(&mut call, 2), None);
        assert!(call.untouched());
        // A released argument.
        let mut call = Call::new(&[(Arc::clone(&values), false)]);
        // SAFETY: the array made by `Call::new`, released once (dropping it now does nothing).
        unsafe { call.args[0].release.unwrap()(&mut call.args[0]) };
        assert_eq!(direct_sq(&mut call, 2), None);
        // The buffers: a null pointer array, a null or misaligned values buffer.
        let mut call = Call::new(&[(Arc::clone(&values), false)]);
        let buffers = call.args[0].buffers;
        call.args[0].buffers = std::ptr::null_mut();
        assert_eq!(direct_sq(&mut call, 2), None, "null buffers");
        call.args[0].buffers = buffers;
        // SAFETY: the array's two buffer pointers, owned by its private data; each forged
        // pointer is put back before the array is released.
        let slot = unsafe { buffers.add(1) };
        // SAFETY: as above.
        let original = unsafe { *slot };
        for (what, forged) in [
            ("null values", std::ptr::null()),
            (
                "misaligned values",
                original.cast::<u8>().wrapping_add(1).cast(),
            ),
        ] {
            // SAFETY: as above.
            unsafe { *slot = forged };
            assert_eq!(direct_sq(&mut call, 2), None, "{what}");
            assert!(call.untouched(), "{what}");
            // SAFETY: as above.
            unsafe { *slot = original };
        }
        // A dictionary on the schema.
        let mut dictionary = FFI_ArrowSchema::try_from(&DataType::Int64).unwrap();
        call.schemas[0].dictionary = &mut dictionary;
        assert_eq!(direct_sq(&mut call, 2), None, "dictionary");
        call.schemas[0].dictionary = std::ptr::null_mut();
        assert!(call.untouched());
        // Each null pointer among the entry's own.
        let nulls: [fn(&mut RawCall); 6] = [
            |r| r.args = std::ptr::null(),
            |r| r.schemas = std::ptr::null(),
            |r| r.is_scalar = std::ptr::null(),
            |r| r.out = std::ptr::null_mut(),
            |r| r.out_schema = std::ptr::null_mut(),
            |r| r.error = std::ptr::null_mut(),
        ];
        for (null, forge) in nulls.iter().enumerate() {
            let mut call = Call::new(&[(Arc::clone(&values), false)]);
            let mut raw = call.raw(1, 2);
            forge(&mut raw);
            // SAFETY: valid inputs, but for the one null pointer under test.
            let status = unsafe { unary::<i64, i64>(&raw, sq) };
            assert_eq!(status, None, "null pointer {null}");
            assert!(call.untouched(), "null pointer {null}");
        }
    }

    #[test]
    fn only_the_batchs_rows_are_computed_and_a_constant_is_its_first_row() {
        // A column longer than the batch: the rows past it are never passed to the function.
        let picky = |x: i64| -> i64 {
            assert!(x < 100, "a row past the batch was computed");
            x
        };
        let mut call = Call::new(&[(ints(&[Some(1), Some(2), Some(3), Some(100)]), false)]);
        // SAFETY: as in `direct_sq`.
        let status = unsafe { unary::<i64, i64>(&call.raw(1, 3), picky) };
        let out = call.outcome(status.expect("taken")).unwrap();
        assert_eq!(out.to_data(), ints(&[Some(1), Some(2), Some(3)]).to_data());
        // A unary function's constant, even one with as many rows as the batch: not taken.
        let mut call = Call::new(&[(ints(&[Some(5), Some(6), Some(7)]), true)]);
        assert_eq!(direct_sq(&mut call, 3), None);
        assert!(call.untouched());
    }

    #[test]
    fn a_panic_is_the_calls_error_and_the_arguments_stay_with_the_host() {
        let panics = |x: i64| -> i64 {
            assert_ne!(x, 2, "two is not allowed");
            x
        };
        let mut call = Call::new(&[(ints(&[Some(1), Some(2), Some(3)]), false)]);
        // SAFETY: as in `direct_sq`.
        let status = unsafe { unary::<i64, i64>(&call.raw(1, 3), panics) };
        assert_eq!(status, Some(status::ERROR));
        assert!(call.args[0].release.is_some() && call.out.release.is_none());
        let error = call.outcome(status.unwrap()).unwrap_err();
        assert!(
            error.starts_with("panicked: assertion `left != right` failed: two is not allowed"),
            "{error}"
        );
    }

    #[test]
    fn boolean_results_are_bits_in_arrows_order_for_every_length() {
        let direct = |call: &mut Call, rows: usize| {
            // SAFETY: as in `direct_sq`.
            unsafe { unary_bool::<i64>(&call.raw(call.args.len(), rows), |x| x % 3 == 0) }
        };
        let kernel = |c: &[Column], n: usize| {
            super::super::batch::unary_bool::<i64>(c, n, true, |x| x % 3 == 0)
        };
        let values: Vec<Option<i64>> = (0..200).map(|i| Some(i * 5 + 1)).collect();
        let raw: Vec<i64> = values.iter().map(|v| v.unwrap()).collect();
        let column = ints(&values);
        for rows in [0, 1, 7, 8, 9, 63, 64, 65, 128, 130, 197] {
            for offset in [0, 1, 3] {
                let input = at_offset(DataType::Int64, &raw, None, offset, rows);
                let took = compare_one(input, rows, UdfType::Bool, &direct, &kernel);
                assert!(took, "{rows} rows at {offset}");
            }
        }
        // And the bits are the function's, read back row by row.
        let mut call = Call::new(&[(Arc::clone(&column), false)]);
        let status = direct(&mut call, 200).unwrap();
        let out = call.outcome(status).unwrap();
        let out = out.as_any().downcast_ref::<BooleanArray>().unwrap();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(out.value(i), v.unwrap() % 3 == 0, "row {i}");
        }
    }

    #[test]
    fn two_arguments_are_taken_as_columns_or_a_column_and_a_constant() {
        let direct = |call: &mut Call, rows: usize| {
            // SAFETY: as in `direct_sq`.
            unsafe {
                binary::<f64, u64, f64>(&call.raw(call.args.len(), rows), |x, y| x * y as f64)
            }
        };
        let kernel = |c: &[Column], n: usize| {
            super::super::batch::binary::<f64, u64, f64>(c, n, true, |x, y| x * y as f64)
        };
        let x: ArrayRef = Arc::new(Float64Array::from(
            (0..50).map(|i| i as f64 / 4.0).collect::<Vec<_>>(),
        ));
        let y: ArrayRef = Arc::new(UInt64Array::from((0..50).collect::<Vec<u64>>()));
        let y_nulls: ArrayRef = Arc::new(UInt64Array::from(
            (0..50)
                .map(|i| (i % 7 != 0).then_some(i))
                .collect::<Vec<_>>(),
        ));
        let x_nulls: ArrayRef = Arc::new(Float64Array::from(
            (0..20)
                .map(|i| (i % 3 != 0).then_some(i as f64))
                .collect::<Vec<_>>(),
        ));
        let types = [UdfType::Float64, UdfType::UInt64];
        // (arguments, rows, taken)
        type Case = (Vec<(ArrayRef, bool)>, usize, bool);
        let cases: Vec<Case> = vec![
            (
                vec![(Arc::clone(&x), false), (Arc::clone(&y), false)],
                50,
                true,
            ),
            (
                vec![(x.slice(3, 20), false), (y.slice(10, 20), false)],
                20,
                true,
            ),
            (
                vec![(Arc::clone(&x), false), (Arc::clone(&y_nulls), false)],
                50,
                true,
            ),
            (
                vec![(x.slice(3, 20), false), (y_nulls.slice(9, 20), false)],
                20,
                true,
            ),
            // A column beside a constant, either way round: taken.
            (
                vec![(Arc::clone(&x), false), (y.slice(5, 1), true)],
                50,
                true,
            ),
            (
                vec![(x.slice(2, 1), true), (Arc::clone(&y), false)],
                50,
                true,
            ),
            (vec![(x.slice(2, 1), true), (y.slice(0, 0), false)], 0, true),
            // A constant of several rows stands for its first.
            (
                vec![(Arc::clone(&x), false), (y.slice(5, 10), true)],
                50,
                true,
            ),
            // A constant beside a column with NULLs: taken.
            (
                vec![(x.slice(2, 1), true), (Arc::clone(&y_nulls), false)],
                50,
                true,
            ),
            (
                vec![(x.slice(2, 1), true), (y_nulls.slice(1, 40), false)],
                40,
                true,
            ),
            // A NULL constant (beside a column with or without NULLs), two constants: not.
            (
                vec![(Arc::clone(&x), false), (y_nulls.slice(7, 1), true)],
                50,
                false,
            ),
            (
                vec![(Arc::clone(&x_nulls), false), (y_nulls.slice(7, 1), true)],
                20,
                false,
            ),
            (
                vec![(x.slice(2, 1), true), (y.slice(5, 1), true)],
                50,
                false,
            ),
        ];
        for (inputs, rows, expected) in cases {
            let took = compare(
                &data(&inputs),
                rows,
                &types,
                UdfType::Float64,
                &direct,
                &kernel,
            );
            assert_eq!(took, expected, "{inputs:?}");
        }
        // A constant at an offset into its buffer: its value is the one at the offset.
        let raw: Vec<u64> = (100..110).collect();
        let constant = at_offset(DataType::UInt64, &raw, None, 7, 1);
        let took = compare(
            &[(x.to_data(), false), (constant, true)],
            50,
            &types,
            UdfType::Float64,
            &direct,
            &kernel,
        );
        assert!(took);
        // The arguments the wrong way round: the first's schema is not the declared type's.
        let mut call = Call::new(&[(Arc::clone(&y), false), (Arc::clone(&x), false)]);
        assert_eq!(direct(&mut call, 50), None);
        assert!(call.untouched());
    }
}
