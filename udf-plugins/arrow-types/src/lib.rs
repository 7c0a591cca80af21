//! ABI 2.2 example: `#[udf(vectorized)]` functions over whole arrow-rs arrays, with Arrow types
//! declared by type strings — decimals, timestamps with units and zones, durations, intervals,
//! lists, structs — and an identity function per type (`id_<type>`), which the tests use to
//! round-trip every type through a plugin.

use std::sync::Arc;

use udf_abi::arrow_array::builder::{Float64Builder, Int64Builder};
use udf_abi::arrow_array::cast::AsArray;
use udf_abi::arrow_array::types::Float64Type;
use udf_abi::arrow_array::{
    Array, ArrayRef, Decimal128Array, Float64Array, Int64Array, ListArray, StringArray, StructArray,
};
use udf_abi::arrow_schema::{DataType, Field};
use udf_abi::udf;

/// `price + cents / 100` for a `DECIMAL(12,2)` price; the result is a `DECIMAL(13,2)` (one more
/// digit: the sum of two 12-digit values fits). NULL in, NULL out.
#[udf(vectorized, returns = "d:13,2")]
fn add_cents(
    #[arrow("d:12,2")] price: &Decimal128Array,
    cents: &Int64Array,
) -> Result<Decimal128Array, String> {
    let sums = price
        .iter()
        .zip(cents.iter())
        .map(|(p, c)| match (p, c) {
            (Some(p), Some(c)) => p
                .checked_add(i128::from(c))
                .map(Some)
                .ok_or_else(|| "add_cents: overflow".to_string()),
            _ => Ok(None),
        })
        .collect::<Result<Decimal128Array, String>>()?;
    sums.with_precision_and_scale(13, 2)
        .map_err(|e| e.to_string())
}

/// The sum of a list of doubles (NULL elements skipped; NULL for a NULL list), over the list's
/// offsets and values buffer at once. (Named `list_total`: DataFusion has a `list_sum`.)
#[udf(vectorized)]
fn list_total(#[arrow("+l<g>")] lists: &ListArray) -> Float64Array {
    let values = lists.values().as_primitive::<Float64Type>();
    let sums = lists.offsets().windows(2).map(|w| {
        (w[0] as usize..w[1] as usize)
            .filter(|&i| values.is_valid(i))
            .fold(0.0, |sum, i| sum + values.value(i))
    });
    Float64Array::new(sums.collect(), lists.nulls().cloned())
}

/// `list_total` written the ordinary way: one sliced array per row.
#[udf(vectorized)]
fn list_total_rows(#[arrow("+l<g>")] lists: &ListArray) -> Float64Array {
    let mut out = Float64Builder::with_capacity(lists.len());
    for list in lists.iter() {
        match list {
            Some(values) => out.append_value(
                values
                    .as_primitive::<Float64Type>()
                    .iter()
                    .flatten()
                    .fold(0.0, |a, b| a + b),
            ),
            None => out.append_null(),
        }
    }
    out.finish()
}

/// The number of elements of a list of doubles, computed from the offsets alone.
#[udf(vectorized)]
fn list_count(#[arrow("+l<g>")] lists: &ListArray) -> Int64Array {
    let lengths = lists.offsets().lengths().map(|l| l as i64);
    Int64Array::new(lengths.collect(), lists.nulls().cloned())
}

/// `[x, x * 10]` for each `x` (NULL for NULL): a list result.
#[udf(vectorized, returns = "+l<l>")]
fn pairs(x: &Int64Array) -> ListArray {
    let mut builder =
        udf_abi::arrow_array::builder::ListBuilder::new(Int64Builder::with_capacity(x.len() * 2));
    for v in x.iter() {
        match v {
            Some(v) => {
                builder.values().append_value(v);
                builder.values().append_value(v.wrapping_mul(10));
                builder.append(true);
            }
            None => builder.append(false),
        }
    }
    builder.finish()
}

/// A struct `{street, city}` from two strings (a NULL field stays NULL inside the struct).
#[udf(vectorized, returns = "+s<street:u;city:u>")]
fn address(street: &StringArray, city: &StringArray) -> StructArray {
    StructArray::from(vec![
        (
            Arc::new(Field::new("street", DataType::Utf8, true)),
            Arc::new(street.clone()) as ArrayRef,
        ),
        (
            Arc::new(Field::new("city", DataType::Utf8, true)),
            Arc::new(city.clone()) as ArrayRef,
        ),
    ])
}

/// The `city` field of an address struct.
#[udf(vectorized)]
fn city_of(#[arrow("+s<street:u;city:u>")] a: &StructArray) -> Result<StringArray, String> {
    let city = a.column_by_name("city").ok_or("no field city")?;
    let city = city.as_string::<i32>();
    // A NULL struct gives NULL, whatever its field holds.
    let nulls = udf_abi::arrow_buffer::NullBuffer::union(a.nulls(), city.nulls());
    Ok(StringArray::new(
        city.offsets().clone(),
        city.values().clone(),
        nulls,
    ))
}

/// One identity function per type string: `id_<name>(x) -> x`, the value unchanged.
macro_rules! identities {
    ($($name:ident: $format:tt),* $(,)?) => {$(
        #[doc = concat!("The identity on `", $format, "`.")]
        #[udf(vectorized, returns = $format)]
        fn $name(#[arrow($format)] x: &ArrayRef) -> ArrayRef {
            Arc::clone(x)
        }
    )*};
}

identities! {
    id_bool: "b",
    id_i8: "c",
    id_u8: "C",
    id_i16: "s",
    id_u16: "S",
    id_i32: "i",
    id_u32: "I",
    id_i64: "l",
    id_u64: "L",
    id_f32: "f",
    id_f64: "g",
    id_dec: "d:12,2",
    id_dec38: "d:38,10",
    id_utf8: "u",
    id_large_utf8: "U",
    id_utf8_view: "vu",
    id_binary: "z",
    id_large_binary: "Z",
    id_date: "tdD",
    id_ts_s: "tss:",
    id_ts_ms: "tsm:",
    id_ts_us: "tsu:",
    id_ts_ns: "tsn:",
    id_ts_us_utc: "tsu:UTC",
    id_ts_ms_paris: "tsm:Europe/Paris",
    id_dur_s: "tDs",
    id_dur_ms: "tDm",
    id_dur_us: "tDu",
    id_dur_ns: "tDn",
    id_interval: "tin",
    id_list_i64: "+l<l>",
    id_large_list_utf8: "+L<u>",
    id_list_list_f64: "+l<+l<g>>",
    id_struct: "+s<name:u;score:g;tags:+l<u>>",
}

// ---- Row by row: `#[udf]` over Rust types with Arrow types ------------------------------------

use udf_abi::types::{
    Decimal, DurationMicrosecond, DurationMillisecond, DurationNanosecond, DurationSecond,
    IntervalMonthDayNano, LargeList, TimestampMicrosecond, TimestampMillisecond,
    TimestampNanosecond, TimestampSecond, Utc,
};
use udf_abi::{Date, UdfStruct};

udf_abi::time_zone!(Paris, "Europe/Paris");

/// A point; `y` may be NULL.
#[derive(Debug, Clone, UdfStruct)]
pub struct Point {
    x: f64,
    y: Option<f64>,
}

/// Twice a `DECIMAL(12,2)`, as a `DECIMAL(13,2)`.
#[udf]
fn dec_double(x: Decimal<12, 2>) -> Decimal<13, 2> {
    Decimal(x.0 * 2)
}

/// `TINYINT + TINYINT`, NULL on overflow.
#[udf]
fn tiny_add(a: i8, b: i8) -> Option<i8> {
    a.checked_add(b)
}

/// The number of one bits of an `INT UNSIGNED`, as a `TINYINT UNSIGNED`.
#[udf]
fn ones(x: u32) -> u8 {
    x.count_ones() as u8
}

/// The sum of a `BIGINT[]`, NULL elements skipped; an error on overflow.
#[udf]
fn sum_ints(xs: Vec<Option<i64>>) -> Result<i64, String> {
    xs.into_iter()
        .flatten()
        .try_fold(0i64, |a, b| a.checked_add(b))
        .ok_or_else(|| "sum_ints: overflow".to_string())
}

/// The tags joined with commas; a NULL tag is an error (the element type has no `Option`).
#[udf]
fn join_tags(tags: Vec<&str>) -> String {
    tags.join(",")
}

/// The point halfway between two points (`y` NULL when either is).
#[udf]
fn midpoint(a: Point, b: Point) -> Point {
    Point {
        x: (a.x + b.x) / 2.0,
        y: a.y.zip(b.y).map(|(p, q)| (p + q) / 2.0),
    }
}

/// The milliseconds since the epoch of a timestamp in Paris.
#[udf]
fn paris_millis(t: TimestampMillisecond<Paris>) -> i64 {
    t.value()
}

/// A duration plus `n` milliseconds.
#[udf]
fn add_millis(d: DurationMillisecond, n: i64) -> DurationMillisecond {
    DurationMillisecond(d.0.saturating_add(n))
}

/// The months of an interval.
#[udf]
fn months_of(i: IntervalMonthDayNano) -> i32 {
    i.months
}

/// The non-NULL elements of a list of lists, flattened into a `LargeList`.
#[udf]
fn flatten_doubles(xs: Vec<Option<Vec<Option<f64>>>>) -> LargeList<f64> {
    LargeList(xs.into_iter().flatten().flatten().flatten().collect())
}

/// A row-by-row identity per type, `rid_<type>(x) -> x`, NULLs at every level: the tests
/// round-trip every type `#[udf]` has a Rust type for.
macro_rules! row_identities {
    ($($name:ident: $t:ty),* $(,)?) => {$(
        #[doc = concat!("The identity on `Option<", stringify!($t), ">`, row by row.")]
        #[udf]
        fn $name(x: Option<$t>) -> Option<$t> {
            x
        }
    )*};
}

/// A struct with a nested list, for `rid_struct`.
#[derive(Debug, Clone, UdfStruct)]
pub struct Scored {
    name: Option<String>,
    score: Option<f64>,
    tags: Option<Vec<Option<String>>>,
}

row_identities! {
    rid_bool: bool,
    rid_i8: i8,
    rid_u8: u8,
    rid_i16: i16,
    rid_u16: u16,
    rid_i32: i32,
    rid_u32: u32,
    rid_i64: i64,
    rid_u64: u64,
    rid_f32: f32,
    rid_f64: f64,
    rid_dec: Decimal<12, 2>,
    rid_dec38: Decimal<38, 10>,
    rid_utf8: String,
    rid_binary: Vec<u8>,
    rid_date: Date,
    rid_ts_s: TimestampSecond,
    rid_ts_ms: TimestampMillisecond,
    rid_ts_us: TimestampMicrosecond,
    rid_ts_ns: TimestampNanosecond,
    rid_ts_us_utc: TimestampMicrosecond<Utc>,
    rid_ts_ms_paris: TimestampMillisecond<Paris>,
    rid_dur_s: DurationSecond,
    rid_dur_ms: DurationMillisecond,
    rid_dur_us: DurationMicrosecond,
    rid_dur_ns: DurationNanosecond,
    rid_interval: IntervalMonthDayNano,
    rid_list_i64: Vec<Option<i64>>,
    rid_large_list_utf8: LargeList<Option<String>>,
    rid_list_list_f64: Vec<Option<Vec<Option<f64>>>>,
    rid_struct: Scored,
}
