//! Arrow types declared by ABI 2.2 type strings: every type of the ABI into and out of a plugin
//! from SQL — through `#[udf(vectorized)]` (`udf-plugins/arrow-types`) and through C
//! (`tests/fixtures/c/arrow_types.c`) — on random arrays with NULLs at every level (proptest);
//! C functions over decimals, lists and structs; nested results that break the C Data Interface
//! (refused, named, the session goes on, every array released); metadata that is wrong; an ABI 2.1
//! library with the shorter manifest; coercion and its errors; the row path refused.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float32Array,
    Float64Array, Int8Array, Int16Array, Int32Array, Int64Array, IntervalMonthDayNanoArray,
    LargeBinaryArray, LargeListArray, LargeStringArray, ListArray, PrimitiveArray, RecordBatch,
    StringArray, StringViewArray, StructArray, UInt8Array, UInt16Array, UInt32Array, UInt64Array,
    new_empty_array,
};
use datafusion::arrow::buffer::{NullBuffer, OffsetBuffer};
use datafusion::arrow::compute::concat;
use datafusion::arrow::datatypes::{
    DataType, DurationMicrosecondType, DurationMillisecondType, DurationNanosecondType,
    DurationSecondType, Field, IntervalMonthDayNano, Schema, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use udf_engine::{
    Abi, CallError, CallPath, LoadError, PluginLibrary, PluginUdf, SessionContextExt,
};
use udf_tests::{c_library, plugin, query, query_error, rows};

fn c_types() -> PathBuf {
    c_library("arrow_types", "arrow_types.c", &[])
}

/// The types row-by-row `#[udf]` functions have a Rust type for (`rid_<suffix>`): all but the
/// large and view string layouts and large binary.
const ROW_TYPES: [&str; 31] = [
    "bool",
    "i8",
    "u8",
    "i16",
    "u16",
    "i32",
    "u32",
    "i64",
    "u64",
    "f32",
    "f64",
    "dec",
    "dec38",
    "utf8",
    "binary",
    "date",
    "ts_s",
    "ts_ms",
    "ts_us",
    "ts_ns",
    "ts_us_utc",
    "ts_ms_paris",
    "dur_s",
    "dur_ms",
    "dur_us",
    "dur_ns",
    "interval",
    "list_i64",
    "large_list_utf8",
    "list_list_f64",
    "struct",
];

/// Every type string of the ABI, with the suffix of its identity functions (`id_<suffix>` in the
/// Rust plugin's vectorised ones, `c_id_<suffix>` in the C one, `rid_<suffix>` in the Rust row by
/// row ones where `ROW_TYPES` has it).
const TYPES: [(&str, &str); 34] = [
    ("bool", "b"),
    ("i8", "c"),
    ("u8", "C"),
    ("i16", "s"),
    ("u16", "S"),
    ("i32", "i"),
    ("u32", "I"),
    ("i64", "l"),
    ("u64", "L"),
    ("f32", "f"),
    ("f64", "g"),
    ("dec", "d:12,2"),
    ("dec38", "d:38,10"),
    ("utf8", "u"),
    ("large_utf8", "U"),
    ("utf8_view", "vu"),
    ("binary", "z"),
    ("large_binary", "Z"),
    ("date", "tdD"),
    ("ts_s", "tss:"),
    ("ts_ms", "tsm:"),
    ("ts_us", "tsu:"),
    ("ts_ns", "tsn:"),
    ("ts_us_utc", "tsu:UTC"),
    ("ts_ms_paris", "tsm:Europe/Paris"),
    ("dur_s", "tDs"),
    ("dur_ms", "tDm"),
    ("dur_us", "tDu"),
    ("dur_ns", "tDn"),
    ("interval", "tin"),
    ("list_i64", "+l<l>"),
    ("large_list_utf8", "+L<u>"),
    ("list_list_f64", "+l<+l<g>>"),
    ("struct", "+s<name:u;score:g;tags:+l<u>>"),
];

// ---- random arrays of any type, NULLs at every level -----------------------------------------

/// SplitMix64: the arrays of a case follow from its proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// NULL with probability `percent` %.
    fn null(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Text with ASCII, multi-byte characters and NUL, 0 to 20 characters (views above 12 bytes are
/// not inlined).
fn text(rng: &mut Rng) -> String {
    const CHARS: [char; 8] = ['a', 'Z', ' ', 'é', '€', '😀', '\0', '7'];
    (0..rng.below(21))
        .map(|_| CHARS[rng.below(8) as usize])
        .collect()
}

fn options<T>(
    rng: &mut Rng,
    len: usize,
    nulls: u64,
    mut value: impl FnMut(&mut Rng) -> T,
) -> Vec<Option<T>> {
    (0..len)
        .map(|_| {
            if rng.null(nulls) {
                None
            } else {
                Some(value(rng))
            }
        })
        .collect()
}

fn validity(rng: &mut Rng, len: usize, nulls: u64) -> Option<NullBuffer> {
    let bits: Vec<bool> = (0..len).map(|_| !rng.null(nulls)).collect();
    Some(NullBuffer::from(bits)).filter(|n| n.null_count() > 0)
}

fn offsets(rng: &mut Rng, len: usize) -> Vec<usize> {
    (0..len).map(|_| rng.below(4) as usize).collect()
}

/// A random array of type `t` with `len` rows and about `nulls` % NULLs at every level.
fn random_array(t: &DataType, len: usize, nulls: u64, rng: &mut Rng) -> ArrayRef {
    let int = |rng: &mut Rng| rng.next() as i64;
    match t {
        DataType::Boolean => Arc::new(BooleanArray::from(options(rng, len, nulls, |r| {
            r.below(2) == 1
        }))),
        DataType::Int8 => Arc::new(Int8Array::from(options(rng, len, nulls, |r| {
            r.next() as i8
        }))),
        DataType::UInt8 => Arc::new(UInt8Array::from(options(rng, len, nulls, |r| {
            r.next() as u8
        }))),
        DataType::Int16 => Arc::new(Int16Array::from(options(rng, len, nulls, |r| {
            r.next() as i16
        }))),
        DataType::UInt16 => Arc::new(UInt16Array::from(options(rng, len, nulls, |r| {
            r.next() as u16
        }))),
        DataType::Int32 => Arc::new(Int32Array::from(options(rng, len, nulls, |r| {
            r.next() as i32
        }))),
        DataType::UInt32 => Arc::new(UInt32Array::from(options(rng, len, nulls, |r| {
            r.next() as u32
        }))),
        DataType::Int64 => Arc::new(Int64Array::from(options(rng, len, nulls, int))),
        DataType::UInt64 => Arc::new(UInt64Array::from(options(rng, len, nulls, |r| r.next()))),
        // Finite values (NaN is not equal to itself), negative zero and extremes included.
        DataType::Float32 => Arc::new(Float32Array::from(options(rng, len, nulls, |r| {
            [f32::MIN, -0.0, f32::MAX, (r.next() as i32) as f32 / 7.0][r.below(4) as usize]
        }))),
        DataType::Float64 => Arc::new(Float64Array::from(options(rng, len, nulls, |r| {
            [f64::MIN, -0.0, f64::MAX, (r.next() as i64) as f64 / 7.0][r.below(4) as usize]
        }))),
        DataType::Decimal128(p, s) => {
            let max = 10i128.pow(u32::from(*p)) - 1;
            let values = options(rng, len, nulls, |r| {
                let v = (i128::from(r.next()) << 64 | i128::from(r.next())) % (max + 1);
                [v, max, -max][r.below(3) as usize]
            });
            Arc::new(
                Decimal128Array::from(values)
                    .with_precision_and_scale(*p, *s)
                    .unwrap(),
            )
        }
        DataType::Utf8 => Arc::new(StringArray::from(options(rng, len, nulls, text))),
        DataType::LargeUtf8 => Arc::new(LargeStringArray::from(options(rng, len, nulls, text))),
        DataType::Utf8View => Arc::new(StringViewArray::from(options(rng, len, nulls, text))),
        DataType::Binary => {
            let values = options(rng, len, nulls, |r| text(r).into_bytes());
            Arc::new(BinaryArray::from_iter(values))
        }
        DataType::LargeBinary => {
            let values = options(rng, len, nulls, |r| text(r).into_bytes());
            Arc::new(LargeBinaryArray::from_iter(values))
        }
        DataType::Date32 => Arc::new(Date32Array::from(options(rng, len, nulls, |r| {
            r.below(200_000) as i32 - 100_000
        }))),
        DataType::Timestamp(unit, zone) => {
            let values = options(rng, len, nulls, |r| r.below(1 << 40) as i64 - (1 << 39));
            match unit {
                TimeUnit::Second => Arc::new(
                    PrimitiveArray::<TimestampSecondType>::from(values)
                        .with_timezone_opt(zone.clone()),
                ),
                TimeUnit::Millisecond => Arc::new(
                    PrimitiveArray::<TimestampMillisecondType>::from(values)
                        .with_timezone_opt(zone.clone()),
                ),
                TimeUnit::Microsecond => Arc::new(
                    PrimitiveArray::<TimestampMicrosecondType>::from(values)
                        .with_timezone_opt(zone.clone()),
                ),
                TimeUnit::Nanosecond => Arc::new(
                    PrimitiveArray::<TimestampNanosecondType>::from(values)
                        .with_timezone_opt(zone.clone()),
                ),
            }
        }
        DataType::Duration(unit) => {
            let values = options(rng, len, nulls, int);
            match unit {
                TimeUnit::Second => Arc::new(PrimitiveArray::<DurationSecondType>::from(values)),
                TimeUnit::Millisecond => {
                    Arc::new(PrimitiveArray::<DurationMillisecondType>::from(values))
                }
                TimeUnit::Microsecond => {
                    Arc::new(PrimitiveArray::<DurationMicrosecondType>::from(values))
                }
                TimeUnit::Nanosecond => {
                    Arc::new(PrimitiveArray::<DurationNanosecondType>::from(values))
                }
            }
        }
        DataType::Interval(_) => Arc::new(IntervalMonthDayNanoArray::from(options(
            rng,
            len,
            nulls,
            |r| IntervalMonthDayNano::new(r.next() as i32, r.next() as i32, r.next() as i64),
        ))),
        DataType::List(item) | DataType::LargeList(item) => {
            let lengths = offsets(rng, len);
            let values = random_array(item.data_type(), lengths.iter().sum(), nulls, rng);
            let nulls = validity(rng, len, nulls);
            if matches!(t, DataType::List(_)) {
                Arc::new(ListArray::new(
                    Arc::clone(item),
                    OffsetBuffer::from_lengths(lengths),
                    values,
                    nulls,
                ))
            } else {
                Arc::new(LargeListArray::new(
                    Arc::clone(item),
                    OffsetBuffer::from_lengths(lengths),
                    values,
                    nulls,
                ))
            }
        }
        DataType::Struct(fields) => {
            let children = fields
                .iter()
                .map(|f| random_array(f.data_type(), len, nulls, rng))
                .collect();
            let nulls = validity(rng, len, nulls);
            Arc::new(StructArray::new(fields.clone(), children, nulls))
        }
        other => panic!("no generator for {other}"),
    }
}

/// A session with the Rust and the C library of Arrow-typed functions.
fn session() -> SessionContext {
    let ctx = SessionContext::new();
    ctx.register_plugin(plugin("arrow-types")).unwrap();
    ctx.register_plugin(c_types()).unwrap();
    udf_engine::register_plugin_functions_table(&ctx).unwrap();
    ctx
}

/// `function(c)` over a table whose column `c` is `input` (in batches of `batch` rows): the
/// result column, concatenated.
async fn call_on_column(
    ctx: &SessionContext,
    function: &str,
    input: &ArrayRef,
    batch: usize,
) -> ArrayRef {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "c",
        input.data_type().clone(),
        true,
    )]));
    let batches: Vec<RecordBatch> = (0..input.len())
        .step_by(batch.max(1))
        .map(|start| {
            let n = batch.min(input.len() - start);
            RecordBatch::try_new(schema.clone(), vec![input.slice(start, n)]).unwrap()
        })
        .collect();
    let table = MemTable::try_new(schema, vec![batches]).unwrap();
    let name = format!("t_{function}");
    ctx.deregister_table(&name).unwrap();
    ctx.register_table(&name, Arc::new(table)).unwrap();
    let out = query(ctx, &format!("SELECT {function}(c) FROM {name}"))
        .await
        .unwrap_or_else(|e| panic!("{function}: {e}"));
    let columns: Vec<&dyn Array> = out.iter().map(|b| b.column(0).as_ref()).collect();
    if columns.is_empty() {
        return new_empty_array(input.data_type());
    }
    concat(&columns).unwrap()
}

/// For each type of the ABI, a random input of `len` rows (`nulls` percent NULL) and the
/// identity functions that must give it back: `id_<type>` (Rust, vectorised), `c_id_<type>` (C)
/// and, where the Rust row-by-row plugin has the type, `rid_<type>`.
fn identity_cases(len: usize, nulls: u64, rng: &mut Rng) -> Vec<(ArrayRef, Vec<String>)> {
    TYPES
        .iter()
        .map(|&(suffix, format)| {
            let t = udf_abi::type_string::parse(format).unwrap();
            let input = random_array(&t, len, nulls, rng);
            let mut functions = vec![format!("id_{suffix}"), format!("c_id_{suffix}")];
            if ROW_TYPES.contains(&suffix) {
                functions.push(format!("rid_{suffix}"));
            }
            (input, functions)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Every type, NULLs at every level, sliced into batches: `id_<type>` (Rust, vectorised),
    /// `rid_<type>` (Rust, `#[udf]` row by row) and `c_id_<type>` (C) give back exactly the input
    /// — type, values, NULLs — from SQL.
    #[test]
    fn every_type_round_trips_through_rust_and_c_identity_functions(
        seed in any::<u64>(),
        len in 0usize..40,
        nulls in prop_oneof![Just(0u64), Just(30u64), Just(100u64)],
        batch in 1usize..17,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let ctx = session();
        let mut rng = Rng(seed);
        for (input, functions) in identity_cases(len, nulls, &mut rng) {
            for function in functions {
                let output = runtime.block_on(call_on_column(&ctx, &function, &input, batch));
                prop_assert_eq!(output.data_type(), input.data_type(), "{}", function);
                prop_assert_eq!(&output.to_data(), &input.to_data(), "{}", function);
            }
        }
    }
}

#[tokio::test]
async fn c_functions_over_decimals_lists_and_structs_answer_with_nulls() {
    let ctx = session();
    let table = |rows: &[Vec<String>]| rows.iter().map(|r| r.join(" | ")).collect::<Vec<_>>();
    let got = rows(
        &ctx,
        "SELECT c_decimal_double(d), c_list_len(l), c_pairs(x), c_point(a, b) FROM (VALUES \
           (CAST(12.34 AS DECIMAL(12,2)), [1, 2, NULL], 3, 1.5, 2.5), \
           (NULL, NULL, NULL, NULL, 4.0), \
           (CAST(-0.01 AS DECIMAL(12,2)), [], -1, 0.0, NULL)) AS v(d, l, x, a, b)",
    )
    .await;
    assert_eq!(
        table(&got),
        [
            "24.68 | 3 | [3, 30] | {x: 1.5, y: 2.5}",
            "NULL | NULL | NULL | {x: NULL, y: 4.0}",
            "-0.02 | 0 | [-1, -10] | {x: 0.0, y: NULL}",
        ]
    );
    let signatures = rows(
        &ctx,
        "SELECT signature FROM plugin_functions WHERE name IN \
         ('c_decimal_double', 'c_list_len', 'c_pairs', 'c_point', 'add_cents', 'id_ts_ms_paris') \
         ORDER BY name",
    )
    .await;
    assert_eq!(
        table(&signatures),
        [
            "add_cents(DECIMAL(12,2)?, BIGINT?) -> DECIMAL(13,2)?",
            "c_decimal_double(DECIMAL(12,2)?) -> DECIMAL(13,2)?",
            "c_list_len(BIGINT[]?) -> Int?",
            "c_pairs(Int?) -> BIGINT[]?",
            "c_point(DOUBLE?, DOUBLE?) -> STRUCT<x DOUBLE, y DOUBLE>?",
            "id_ts_ms_paris(TIMESTAMP(3) WITH TIME ZONE 'Europe/Paris'?) -> TIMESTAMP(3) WITH TIME \
             ZONE 'Europe/Paris'?",
        ]
    );
}

#[tokio::test]
async fn rust_vectorised_functions_compute_over_whole_columns() {
    let ctx = session();
    let got = rows(
        &ctx,
        "SELECT add_cents(p, c), list_total(l), list_count(l), pairs(c), city_of(address(s, t)) \
         FROM (VALUES (CAST(1.00 AS DECIMAL(12,2)), 5, [1.5, NULL, 2.0], 'Main St', 'Paris'), \
                      (NULL, 7, NULL, NULL, NULL), \
                      (CAST(9999999999.99 AS DECIMAL(12,2)), -99, [], 'x', 'Oslo')) \
              AS v(p, c, l, s, t)",
    )
    .await;
    assert_eq!(
        got,
        [
            ["1.05", "3.5", "3", "[5, 50]", "Paris"],
            ["NULL", "NULL", "NULL", "[7, 70]", "NULL"],
            ["9999999999.00", "0.0", "0", "[-99, -990]", "Oslo"],
        ]
    );
    // A constant argument is repeated to the batch's rows for the function.
    let got = rows(&ctx, "SELECT pairs(2) FROM (VALUES (1), (2), (3)) AS v(x)").await;
    assert_eq!(got, [["[2, 20]"], ["[2, 20]"], ["[2, 20]"]]);
}

#[tokio::test]
async fn row_by_row_udf_functions_take_and_return_arrow_types() {
    let ctx = session();
    let got = rows(
        &ctx,
        "SELECT dec_double(d), tiny_add(a, b), ones(u), sum_ints(l), join_tags(t), \
                midpoint(named_struct('x', 1.0, 'y', y), named_struct('x', 3.0, 'y', 4.0)), \
                flatten_doubles([[1.5, NULL], NULL, [y]]) \
         FROM (VALUES (CAST(12.34 AS DECIMAL(12,2)), 100, 27, 4294967295, [1, NULL, 3], ['a', 'b'], 2.0), \
                      (NULL, 100, 28, 0, NULL, [], NULL)) \
              AS v(d, a, b, u, l, t, y)",
    )
    .await;
    assert_eq!(
        got,
        [
            [
                "24.68",
                "127",
                "32",
                "4",
                "a,b",
                "{x: 2.0, y: 3.0}",
                "[1.5, 2.0]"
            ],
            // STRICT: a NULL argument without Option gives NULL; an overflow gives the
            // function's NULL; a NULL field inside a struct is the struct's field.
            [
                "NULL",
                "NULL",
                "0",
                "NULL",
                "",
                "{x: 2.0, y: NULL}",
                "[1.5]"
            ],
        ]
    );
    // A NULL where the Rust type has no Option, below the top level, is an error naming it.
    let e = query_error(&ctx, "SELECT join_tags(['a', NULL])").await;
    assert!(
        e.contains("join_tags")
            && e.contains("argument 1: list element 2 is NULL, but its Rust type has no Option"),
        "{e}"
    );
    let e = query_error(
        &ctx,
        "SELECT midpoint(named_struct('x', NULL, 'y', 1.0), named_struct('x', 1.0, 'y', 1.0))",
    )
    .await;
    assert!(e.contains("argument 1: field x is NULL"), "{e}");
    let e = query_error(&ctx, "SELECT sum_ints([9223372036854775807, 1])").await;
    assert!(e.contains("sum_ints: overflow"), "{e}");
    let signatures = rows(
        &ctx,
        "SELECT signature FROM plugin_functions WHERE name IN ('dec_double', 'midpoint', 'flatten_doubles') ORDER BY name",
    )
    .await;
    assert_eq!(
        signatures,
        [
            ["dec_double(DECIMAL(12,2)) -> DECIMAL(13,2)"],
            ["flatten_doubles(DOUBLE[][]) -> LargeList(DOUBLE)"],
            [
                "midpoint(STRUCT<x DOUBLE, y DOUBLE>, STRUCT<x DOUBLE, y DOUBLE>) -> STRUCT<x DOUBLE, y DOUBLE>"
            ],
        ]
    );
}

#[tokio::test]
async fn arguments_are_cast_to_the_declared_type_and_others_are_refused_by_name() {
    let ctx = session();
    // Integers and floats cast to the declared DECIMAL(12,2); a dictionary-encoded string is
    // decoded; a list of integers casts to a list of doubles.
    let got = rows(
        &ctx,
        "SELECT add_cents(2, 1), add_cents(0.5, 0), id_utf8(arrow_cast('a', 'Dictionary(Int32, Utf8)')), \
         list_total([1, 2]), id_ts_us_utc('2024-05-01T00:00:00Z')",
    )
    .await;
    assert_eq!(got, [["2.01", "0.50", "a", "3.0", "2024-05-01T00:00:00Z"]]);
    let e = query_error(&ctx, "SELECT list_total('abc')").await;
    assert!(
        e.contains("list_total(DOUBLE[]?) -> DOUBLE?: argument 1 has type Utf8, expected DOUBLE[] (or a value of its kind that casts to it)"),
        "{e}"
    );
    let e = query_error(&ctx, "SELECT add_cents(true, 1)").await;
    assert!(
        e.contains("argument 1 has type Boolean, expected DECIMAL(12,2)"),
        "{e}"
    );
    // A value the declared type cannot hold is DataFusion's cast error.
    let e = query_error(&ctx, "SELECT add_cents(12345678901234, 1)").await;
    assert!(e.to_lowercase().contains("decimal"), "{e}");
}

/// Each `bad_*` function of the C fixture breaks one rule of a nested result.
const BAD_NESTED: [(&str, &str, &str); 13] = [
    (
        "bad_child_short",
        "x",
        "child 0 array has 5 rows, at least 6 expected",
    ),
    (
        "bad_offsets_decreasing",
        "x",
        "offsets are negative or not monotonically increasing",
    ),
    ("bad_child_null", "x", "child 0 is a null pointer"),
    (
        "bad_list_two_children",
        "x",
        "has 2 children, a BIGINT[] array has 1",
    ),
    (
        "bad_child_released",
        "x",
        "child 0 array has no release callback",
    ),
    (
        "bad_child_negative_len",
        "x",
        "child 0 array's length is negative (-5)",
    ),
    (
        "bad_struct_one_field",
        "a, b",
        "has 1 children, a STRUCT<x DOUBLE, y DOUBLE> array has 2",
    ),
    (
        "bad_struct_child_short",
        "a, b",
        "child 1 array has 2 rows, at least 3 expected",
    ),
    (
        "bad_schema_child_type",
        "a, b",
        "batch of Arrow format \"+s<x:g;y:l>\", the function declares STRUCT<x DOUBLE, y DOUBLE>",
    ),
    (
        "bad_schema_field_name",
        "a, b",
        "batch of Arrow format \"+s<x:g;z:g>\", the function declares",
    ),
    (
        "bad_schema_no_children",
        "a, b",
        "batch of Arrow format \"Struct()\", the function declares STRUCT<x DOUBLE, y DOUBLE>",
    ),
    (
        "bad_decimal_precision",
        "d",
        "has more than the 13 digits of the declared DECIMAL(13,2)",
    ),
    (
        "bad_decimal_format",
        "d",
        "batch of Arrow format \"d:12,2\", the function declares DECIMAL(13,2) (Arrow format \"d:13,2\")",
    ),
];

#[tokio::test]
async fn nested_results_that_break_the_interface_are_refused_and_released() {
    let ctx = session();
    ctx.sql(
        "CREATE TABLE t AS SELECT * FROM (VALUES \
           (1, 1.0, 2.0, CAST(1.00 AS DECIMAL(12,2))), \
           (2, 3.0, 4.0, CAST(2.00 AS DECIMAL(12,2))), \
           (3, 5.0, 6.0, CAST(3.00 AS DECIMAL(12,2)))) AS v(x, a, b, d)",
    )
    .await
    .unwrap();
    for (function, args, says) in BAD_NESTED {
        let e = query_error(&ctx, &format!("SELECT {function}({args}) FROM t")).await;
        assert!(
            e.contains(function) && e.contains(says),
            "{function}: the error should name it and say `{says}`: {e}"
        );
        assert!(!e.contains("internal error"), "{function}: {e}");
    }
    // The session goes on, and every array the plugin returned has been released.
    assert_eq!(
        rows(&ctx, "SELECT c_pairs(x) FROM t ORDER BY x").await,
        [["[1, 10]"], ["[2, 20]"], ["[3, 30]"]]
    );
    assert_eq!(rows(&ctx, "SELECT live_arrays()").await, [["0"]]);
}

#[test]
fn wrong_arrow_metadata_is_refused_naming_the_function_and_position() {
    for (define, says) in [
        (
            "META_BAD_STRING",
            "function `c_list_len`: argument 1: Arrow type string `+l<l`: expected `>`",
        ),
        (
            "META_MISSING_STRING",
            "function `c_list_len`: argument 1: has the type tag TYPE_ARROW but no Arrow type string",
        ),
        (
            "META_NO_BATCH",
            "function `c_point` declares an Arrow type (argument 1) but has no batch entrypoint",
        ),
        (
            "META_STRING_AND_TAG",
            "function `c_pairs`: argument 1: has both type tag 1 and an Arrow type string",
        ),
    ] {
        let path = c_library(
            &format!("arrow_types_{}", define.to_lowercase()),
            "arrow_types.c",
            &[define],
        );
        let e = PluginLibrary::load(&path).unwrap_err();
        assert!(
            matches!(e, LoadError::InvalidMetadata { .. }),
            "{define}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(says), "{define}: {text}");
        assert!(
            text.contains("arrow_types"),
            "{define}: names the library: {text}"
        );
    }
}

#[tokio::test]
async fn an_abi_2_1_library_with_the_shorter_manifest_keeps_loading() {
    let path = c_library("c_plugin_v2_abi_2_1", "c_plugin_v2.c", &["ABI_2_1"]);
    let library = PluginLibrary::load(&path).unwrap();
    assert_eq!(library.abi(), Abi::V2 { minor: 1 });
    let ctx = SessionContext::new();
    ctx.register_plugin(&path).unwrap();
    assert_eq!(rows(&ctx, "SELECT c_clamp(7, 1, 5)").await, [["5"]]);
    let current = PluginLibrary::load(plugin("arrow-types")).unwrap();
    assert_eq!(
        current.abi(),
        Abi::V2 {
            minor: udf_abi::v2::ABI_MINOR
        }
    );
}

/// A library built against ABI 2.3 (a manifest without 2.4's aggregates, ending where its
/// memory ends) loads and runs: the host reads no field the library's minor does not have.
#[tokio::test]
async fn an_abi_2_3_library_loads_without_its_manifest_being_read_past_its_end() {
    let path = c_library("c_plugin_v2_abi_2_3", "c_plugin_v2.c", &["ABI_2_3"]);
    let library = PluginLibrary::load(&path).unwrap();
    assert_eq!(library.abi(), Abi::V2 { minor: 3 });
    assert!(library.aggregates().is_empty());
    let ctx = SessionContext::new();
    ctx.register_plugin(&path).unwrap();
    assert_eq!(rows(&ctx, "SELECT c_clamp(7, 1, 5)").await, [["5"]]);
}

#[tokio::test]
async fn arrow_typed_functions_run_on_the_batch_path_only() {
    let library = PluginLibrary::load(plugin("arrow-types")).unwrap();
    let f = library.function_named("pairs").unwrap();
    assert!(f.has_batch() && !f.has_row());
    let udf =
        PluginUdf::new("pairs", f.clone(), Volatility::Immutable).with_call_path(CallPath::Row);
    assert_eq!(
        udf.call_path(),
        CallPath::Batch,
        "an Arrow function stays on the batch path"
    );
    let x: ArrayRef = Arc::new(Int64Array::from(vec![1]));
    assert_eq!(
        f.call_rows(&[(x.clone(), false)], 1).unwrap_err(),
        CallError::NoRowEntrypoint
    );
    let ctx = SessionContext::new();
    ctx.register_udf(ScalarUDF::new_from_impl(udf));
    assert_eq!(rows(&ctx, "SELECT pairs(4)").await, [["[4, 40]"]]);
}

/// The answer of `sql`, or its error text.
/// Every type through a worker process: each identity function, isolated, gives back exactly its
/// input — type, values, NULLs at every level — over columns whole and cut into batches (slices
/// of one array, so that most cross with an offset), empty, without NULLs and all NULL. The
/// simple types cross as raw columns, the others as Arrow IPC, each way, every reply checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_through_a_worker_process() {
    let isolation = udf_engine::Isolation::Process(udf_engine::WorkerLimits {
        worker_program: Some(udf_tests::udfsql_worker()),
        ..Default::default()
    });
    let ctx = SessionContext::new();
    udf_engine::register_plugin_with(&ctx, plugin("arrow-types"), &isolation).unwrap();
    udf_engine::register_plugin_with(&ctx, c_types(), &isolation).unwrap();
    let mut rng = Rng(0x150_1a7e);
    // (rows, percent NULL, rows per batch)
    for (len, nulls, batch) in [(37, 30, 16), (11, 0, 3), (6, 100, 6), (0, 0, 1)] {
        for (input, functions) in identity_cases(len, nulls, &mut rng) {
            for function in functions {
                let output = call_on_column(&ctx, &function, &input, batch).await;
                let case = format!("{function} over {len} rows, {nulls}% NULL, {batch} per batch");
                assert_eq!(output.data_type(), input.data_type(), "{case}");
                assert_eq!(output.to_data(), input.to_data(), "{case}");
            }
        }
    }
}

async fn outcome(ctx: &SessionContext, sql: &str) -> Result<Vec<Vec<String>>, String> {
    match query(ctx, sql).await {
        Ok(_) => Ok(rows(ctx, sql).await),
        Err(e) => Err(e.to_string()),
    }
}

/// Arrow-typed functions evaluated in worker processes (process isolation: arguments and
/// results cross as Arrow IPC) answer exactly as in-process — values, NULLs, nested types — and
/// the nested misbehaving corpus fails with the same errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_types_answer_alike_isolated_and_in_process() {
    let isolation = udf_engine::Isolation::Process(udf_engine::WorkerLimits {
        worker_program: Some(udf_tests::udfsql_worker()),
        ..Default::default()
    });
    let sessions = [udf_engine::Isolation::InProcess, isolation].map(|isolation| {
        let ctx = SessionContext::new();
        udf_engine::register_plugin_with(&ctx, plugin("arrow-types"), &isolation).unwrap();
        udf_engine::register_plugin_with(&ctx, c_types(), &isolation).unwrap();
        ctx
    });
    let values = "(VALUES (1, 1.5, 2.5, CAST(1.25 AS DECIMAL(12,2)), [1.0, NULL], 'a'), \
                  (NULL, NULL, 4.0, NULL, NULL, NULL), \
                  (3, 0.5, NULL, CAST(-2.00 AS DECIMAL(12,2)), [], 'c')) AS v(x, a, b, d, l, s)";
    let mut statements = vec![
        format!(
            "SELECT add_cents(d, x), list_total(l), pairs(x), address(s, s), \
             id_struct(named_struct('name', s, 'score', a, 'tags', [s])), dec_double(d), \
             midpoint(named_struct('x', coalesce(a, 0.0), 'y', b), named_struct('x', 1.0, 'y', a)), \
             flatten_doubles([l, NULL]), c_decimal_double(d), c_pairs(x), c_point(a, b) \
             FROM {values} ORDER BY x"
        ),
        format!("SELECT join_tags([s, NULL]) FROM {values}"),
    ];
    for (function, args, _) in BAD_NESTED {
        statements.push(format!("SELECT {function}({args}) FROM {values}"));
    }
    let (mut answers, mut errors) = (0, 0);
    for sql in &statements {
        let local = outcome(&sessions[0], sql).await;
        let isolated = outcome(&sessions[1], sql).await;
        assert_eq!(isolated, local, "{sql}");
        match local {
            Ok(_) => answers += 1,
            Err(_) => errors += 1,
        }
    }
    assert_eq!((answers, errors), (1, 14));
}
