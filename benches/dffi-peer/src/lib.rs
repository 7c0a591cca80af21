//! The peer of `udf-plugins/plain` in the benchmarks: the same bodies (`sq`, `bang`, `rev`,
//! `shout_plain`) as ordinary DataFusion `ScalarUDFImpl`s, exported through DataFusion's own FFI
//! (`datafusion-ffi` 55: `FFI_ScalarUDF`) instead of udfsql's ABI. The host (`udf-benches`)
//! loads this library with `dlopen`, turns each `FFI_ScalarUDF` into a `ForeignScalarUDF` and
//! registers it as `<f>_dffi` beside the `_static`, `_batch` and `_row` variants.
//!
//! The loops are those of the host's statics (`udf_benches::plain`): a vectorised kernel for the
//! primitive `sq`, a row loop into a `StringBuilder` sized from the previous batch's bytes per
//! row for the strings; so the difference to `<f>_static` is what `datafusion-ffi`'s boundary
//! adds (Arrow C data interface export and import of the arguments and the result, the
//! configuration options converted on every call).
//!
//! Exports (each `extern "C" fn() -> FFI_ScalarUDF`, a new value the caller owns and drops):
//! `udfsql_dffi_sq`, `udfsql_dffi_bang`, `udfsql_dffi_rev`, `udfsql_dffi_shout_plain`; the
//! aggregate `udfsql_dffi_agg_my_sum` (`extern "C" fn() -> FFI_AggregateUDF`), the twin of the
//! stats plugin's `my_sum`; and
//! `udfsql_dffi_version`, the major version of `datafusion-ffi` this library was built with.
#![deny(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion_ffi::udaf::FFI_AggregateUDF;
use datafusion_ffi::udf::FFI_ScalarUDF;

// The plugin bodies, exactly as in `udf-plugins/plain/src/lib.rs` (`sq` wrapping, as the host's
// `square_static`: the same code in release, no overflow check in debug).

/// `x * x`.
fn sq(x: i64) -> i64 {
    x.wrapping_mul(x)
}

/// The string and `"!!"`.
fn bang(s: &str) -> String {
    format!("{s}!!")
}

/// The characters in reverse order.
fn rev(s: &str) -> String {
    s.chars().rev().collect()
}

/// Upper case.
fn shout_plain(s: &str) -> String {
    s.to_uppercase()
}

/// Which body a [`Peer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Sq,
    Bang,
    Rev,
    ShoutPlain,
}

impl Kind {
    fn slot(self) -> &'static AtomicUsize {
        // One "bytes per row of the last batch" per function, as `#[udf]` keeps one per function.
        static SLOTS: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];
        &SLOTS[self as usize]
    }
}

/// One of the bodies as a DataFusion scalar UDF.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Peer {
    name: &'static str,
    kind: Kind,
    signature: Signature,
}

impl Peer {
    fn udf(name: &'static str, kind: Kind) -> FFI_ScalarUDF {
        let input = match kind {
            Kind::Sq => DataType::Int64,
            _ => DataType::Utf8,
        };
        let peer = Peer {
            name,
            kind,
            signature: Signature::exact(vec![input], Volatility::Immutable),
        };
        FFI_ScalarUDF::from(Arc::new(ScalarUDF::new_from_impl(peer)))
    }
}

/// The capacity `#[udf]`'s row loop reserves: 16 bytes per row at first, then the last batch's
/// bytes per row plus an eighth, at most 16 MiB.
fn capacity(rows: usize, slot: &AtomicUsize) -> usize {
    let per_row = match slot.load(Relaxed) {
        0 => 16,
        n => n.saturating_add(n / 8).saturating_add(1),
    };
    rows.saturating_mul(per_row).min(16 << 20)
}

/// Runs `f` on every row of `s` into a string array (NULL in, NULL out; the author's error is
/// the query's error): `udf_benches::plain::utf8_rows`, unchanged.
fn utf8_rows<R: AsRef<str>>(
    s: &StringArray,
    slot: &AtomicUsize,
    mut f: impl FnMut(usize, &str) -> Result<Option<R>, String>,
) -> Result<ArrayRef> {
    let rows = s.len();
    let mut b = StringBuilder::with_capacity(rows, capacity(rows, slot));
    for i in 0..rows {
        if s.is_null(i) {
            b.append_null();
            continue;
        }
        match f(i, s.value(i)) {
            Ok(Some(v)) => b.append_value(v),
            Ok(None) => b.append_null(),
            Err(e) => return exec_err!("{e}"),
        }
    }
    if rows > 0 {
        slot.store(b.values_slice().len().div_ceil(rows), Relaxed);
    }
    Ok(Arc::new(b.finish()))
}

impl ScalarUDFImpl for Peer {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            Kind::Sq => DataType::Int64,
            _ => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(input) = arrays.first() else {
            return exec_err!("{}: no argument", self.name);
        };
        let slot = self.kind.slot();
        let out: ArrayRef = match self.kind {
            Kind::Sq => Arc::new(input.as_primitive::<Int64Type>().unary::<_, Int64Type>(sq)),
            Kind::Bang => utf8_rows(input.as_string::<i32>(), slot, |_, s| Ok(Some(bang(s))))?,
            Kind::Rev => utf8_rows(input.as_string::<i32>(), slot, |_, s| Ok(Some(rev(s))))?,
            Kind::ShoutPlain => utf8_rows(input.as_string::<i32>(), slot, |_, s| {
                Ok(Some(shout_plain(s)))
            })?,
        };
        if out.len() != args.number_rows {
            return exec_err!("{}: wrong length", self.name);
        }
        Ok(ColumnarValue::Array(out))
    }
}

/// The major version of `datafusion-ffi` this library was built with; the host refuses the
/// library unless it equals its own.
// SAFETY (of the unmangled symbol): the name is unique to this library and the function has the
// signature the host declares for it.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_version() -> u64 {
    datafusion_ffi::version()
}

/// `sq_dffi(x: Int64) -> Int64`.
// SAFETY (of the unmangled symbol): as for `udfsql_dffi_version`; the host declares it as
// `extern "C" fn() -> FFI_ScalarUDF` of the same `datafusion-ffi` major version.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_sq() -> FFI_ScalarUDF {
    Peer::udf("sq_dffi", Kind::Sq)
}

/// `bang_dffi(s: Utf8) -> Utf8`.
// SAFETY (of the unmangled symbol): as for `udfsql_dffi_sq`.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_bang() -> FFI_ScalarUDF {
    Peer::udf("bang_dffi", Kind::Bang)
}

/// `rev_dffi(s: Utf8) -> Utf8`.
// SAFETY (of the unmangled symbol): as for `udfsql_dffi_sq`.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_rev() -> FFI_ScalarUDF {
    Peer::udf("rev_dffi", Kind::Rev)
}

/// `shout_plain_dffi(s: Utf8) -> Utf8`.
// SAFETY (of the unmangled symbol): as for `udfsql_dffi_sq`.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_shout_plain() -> FFI_ScalarUDF {
    Peer::udf("shout_plain_dffi", Kind::ShoutPlain)
}

/// The twin of the stats plugin's `my_sum` as an ordinary DataFusion aggregate: one `i64` and a
/// row count per group in a grouped accumulator (and a one-group accumulator for no GROUP BY).
#[derive(Debug, PartialEq, Eq, Hash)]
struct MySum {
    signature: Signature,
}

/// Sums and row counts per group.
#[derive(Debug, Default)]
struct MySumGroups {
    sums: Vec<i64>,
    rows: Vec<u64>,
}

impl MySumGroups {
    fn add(
        &mut self,
        values: &ArrayRef,
        groups: &[usize],
        filter: Option<&BooleanArray>,
        total: usize,
    ) -> Result<()> {
        self.sums.resize(total, 0);
        self.rows.resize(total, 0);
        let values = values.as_primitive::<Int64Type>();
        for (row, &g) in groups.iter().enumerate() {
            if values.is_null(row) || filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                continue;
            }
            self.sums[g] = self.sums[g].wrapping_add(values.value(row));
            self.rows[g] += 1;
        }
        Ok(())
    }

    fn take(&mut self, emit_to: EmitTo) -> Int64Array {
        let sums = emit_to.take_needed(&mut self.sums);
        let rows = emit_to.take_needed(&mut self.rows);
        sums.into_iter()
            .zip(rows)
            .map(|(s, r)| (r > 0).then_some(s))
            .collect()
    }
}

impl GroupsAccumulator for MySumGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        groups: &[usize],
        filter: Option<&BooleanArray>,
        total: usize,
    ) -> Result<()> {
        self.add(&values[0], groups, filter, total)
    }
    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        Ok(Arc::new(self.take(emit_to)))
    }
    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![Arc::new(self.take(emit_to))])
    }
    fn merge_batch(&mut self, values: &[ArrayRef], groups: &[usize], total: usize) -> Result<()> {
        self.add(&values[0], groups, None, total)
    }
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let mut one = MySumGroups::default();
        let groups: Vec<usize> = (0..values[0].len()).collect();
        one.add(&values[0], &groups, filter, groups.len())?;
        Ok(vec![Arc::new(one.take(EmitTo::All))])
    }
    fn size(&self) -> usize {
        self.sums.capacity() * 8 + self.rows.capacity() * 8
    }
}

/// The one-group accumulator.
#[derive(Debug, Default)]
struct MySumOne(MySumGroups);

impl Accumulator for MySumOne {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let groups = vec![0; values[0].len()];
        self.0.add(&values[0], &groups, None, 1)
    }
    fn evaluate(&mut self) -> Result<ScalarValue> {
        let rows = self.0.rows.first().copied().unwrap_or(0);
        Ok(ScalarValue::Int64((rows > 0).then(|| self.0.sums[0])))
    }
    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.0.size()
    }
    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }
    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let values = values[0].as_primitive::<Int64Type>();
        self.0.sums.resize(1, 0);
        self.0.rows.resize(1, 0);
        for row in 0..values.len() {
            if values.is_valid(row) {
                self.0.sums[0] = self.0.sums[0].wrapping_sub(values.value(row));
                self.0.rows[0] -= 1;
            }
        }
        Ok(())
    }
    fn supports_retract_batch(&self) -> bool {
        true
    }
}

impl AggregateUDFImpl for MySum {
    fn name(&self) -> &str {
        "my_sum_dffi"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(MySumOne::default()))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[sum]", args.name),
            DataType::Int64,
            true,
        ))])
    }
    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(MySumGroups::default()))
    }
}

/// `my_sum_dffi(x: Int64) -> Int64`, an `FFI_AggregateUDF`.
// SAFETY (of the unmangled symbol): as for `udfsql_dffi_sq`; the host declares it as
// `extern "C" fn() -> FFI_AggregateUDF` of the same `datafusion-ffi` major version.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn udfsql_dffi_agg_my_sum() -> FFI_AggregateUDF {
    let udaf = MySum {
        signature: Signature::exact(vec![DataType::Int64], Volatility::Immutable),
    };
    FFI_AggregateUDF::from(Arc::new(AggregateUDF::new_from_impl(udaf)))
}
