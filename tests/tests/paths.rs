//! The row path and the batch path give identical results, for every function of the example
//! libraries on the same typed data (errors included), and both agree with plain Rust reference
//! implementations on random data with random NULLs (proptest).

use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, Volatility};
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use proptest::prelude::*;
use udf_abi::v2::UdfType;
use udf_engine::{CallPath, PluginFunction, PluginLibrary, PluginUdf};
use udf_tests::{EXAMPLE_PLUGINS, plugin, query};

/// Every function of every v2 example library.
fn v2_functions() -> Vec<PluginFunction> {
    let mut out = Vec::new();
    for name in EXAMPLE_PLUGINS {
        let library = PluginLibrary::load(plugin(name)).unwrap();
        if library.abi() == udf_engine::Abi::V1 {
            continue;
        }
        for i in 0..library.functions().len() {
            out.push(library.function(i).unwrap());
        }
    }
    out
}

/// A column name of the typed table for each argument type.
fn column_for(t: UdfType) -> &'static str {
    match t {
        UdfType::Bool => "b",
        UdfType::Int64 => "i",
        UdfType::UInt64 => "u",
        UdfType::Float64 => "d",
        UdfType::Utf8 => "s",
        UdfType::Int32 => "i32",
        UdfType::Float32 => "f32",
        UdfType::Binary => "bin",
        UdfType::Date32 => "dt",
        UdfType::TimestampMicros => "ts",
    }
}

fn typed_table() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("b", DataType::Boolean, true),
        Field::new("i", DataType::Int64, true),
        Field::new("u", DataType::UInt64, true),
        Field::new("d", DataType::Float64, true),
        Field::new("s", DataType::Utf8, true),
        Field::new("i32", DataType::Int32, true),
        Field::new("f32", DataType::Float32, true),
        Field::new("bin", DataType::Binary, true),
        Field::new("dt", DataType::Date32, true),
        Field::new(
            "ts",
            DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ),
            true,
        ),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(BooleanArray::from(vec![
            Some(true),
            Some(false),
            None,
            Some(true),
            Some(false),
            Some(true),
        ])),
        Arc::new(Int64Array::from(vec![
            Some(7),
            Some(-2),
            None,
            Some(0),
            Some(i64::MAX),
            Some(i64::MIN),
        ])),
        Arc::new(UInt64Array::from(vec![
            Some(0),
            Some(3),
            Some(1),
            None,
            Some(2),
            Some(1),
        ])),
        Arc::new(Float64Array::from(vec![
            Some(1.5),
            Some(-0.0),
            Some(f64::NAN),
            None,
            Some(f64::INFINITY),
            Some(3.0),
        ])),
        Arc::new(StringArray::from(vec![
            Some("héllo"),
            Some(""),
            None,
            Some("a\u{0}b"),
            Some("日本"),
            Some("x"),
        ])),
        Arc::new(Int32Array::from(vec![
            Some(1),
            Some(i32::MAX),
            Some(-5),
            None,
            Some(0),
            Some(i32::MIN),
        ])),
        Arc::new(Float32Array::from(vec![
            Some(2.5),
            None,
            Some(-1.0),
            Some(0.0),
            Some(f32::NAN),
            Some(1e30),
        ])),
        Arc::new(BinaryArray::from(vec![
            Some(&b"\x00\x01"[..]),
            Some(&b""[..]),
            None,
            Some(&b"abc"[..]),
            Some(&b"\xff"[..]),
            Some(&b"z"[..]),
        ])),
        Arc::new(Date32Array::from(vec![
            Some(0),
            Some(-1),
            Some(19_000),
            None,
            Some(11_016),
            Some(-719_162),
        ])),
        Arc::new(
            TimestampMicrosecondArray::from(vec![
                Some(0),
                Some(-1),
                Some(1_700_000_000_000_000),
                None,
                Some(86_400_000_000),
                Some(i64::MAX),
            ])
            .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(schema, columns).unwrap()
}

/// Each function registered as `row_<name>` and `batch_<name>`, called on the typed table:
/// the two columns must be equal, or both calls fail with the same message.
#[tokio::test]
async fn every_v2_function_gives_the_same_result_on_both_paths() {
    let ctx = SessionContext::new();
    let batch = typed_table();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap();
    ctx.register_table("typed", Arc::new(table)).unwrap();
    let functions = v2_functions();
    assert!(
        functions.len() >= 20,
        "all example functions: {}",
        functions.len()
    );
    let mut compared = 0;
    for f in functions {
        let sig = f.signature().clone();
        assert!(f.has_batch(), "{} has a batch entrypoint", sig.name);
        if sig.has_arrow_types() {
            // Arrow types cross on the batch path only (tests/tests/arrow_types.rs).
            assert!(!f.has_row(), "{} has no row path", sig.name);
            continue;
        }
        for (prefix, path) in [("row_", CallPath::Row), ("batch_", CallPath::Batch)] {
            let udf = PluginUdf::new(
                format!("{prefix}{}", sig.name),
                f.clone(),
                Volatility::Immutable,
            )
            .with_call_path(path);
            assert_eq!(udf.call_path(), path);
            ctx.register_udf(ScalarUDF::new_from_impl(udf));
        }
        if sig.volatility == Some(udf_engine::DeclaredVolatility::Volatile) {
            continue; // next_id: a different value per call by design
        }
        let args: Vec<&str> = sig
            .arg_types
            .iter()
            .map(|t| column_for(t.tag().expect("toolbox has tagged types only")))
            .collect();
        let args = args.join(", ");
        let row = query(&ctx, &format!("SELECT row_{}({args}) FROM typed", sig.name)).await;
        let batch = query(
            &ctx,
            &format!("SELECT batch_{}({args}) FROM typed", sig.name),
        )
        .await;
        match (row, batch) {
            (Ok(r), Ok(b)) => {
                let r = datafusion::arrow::compute::concat_batches(&r[0].schema(), &r).unwrap();
                let b = datafusion::arrow::compute::concat_batches(&b[0].schema(), &b).unwrap();
                assert_eq!(r.column(0).as_ref(), b.column(0).as_ref(), "{}", sig.name);
                assert_eq!(r.num_rows(), 6);
            }
            (Err(r), Err(b)) => {
                let strip = |e: String| {
                    e.replace("row_", "")
                        .replace("batch_", "")
                        .replace("batch call: ", "")
                };
                assert_eq!(strip(r.to_string()), strip(b.to_string()), "{}", sig.name);
            }
            (r, b) => panic!("{}: row {r:?} but batch {b:?}", sig.name),
        }
        compared += 1;
    }
    assert!(compared >= 20);
}

struct Udfs {
    row: Vec<(String, ScalarUDF)>,
    batch: Vec<(String, ScalarUDF)>,
}

fn udfs() -> &'static Udfs {
    static UDFS: OnceLock<Udfs> = OnceLock::new();
    UDFS.get_or_init(|| {
        let mut row = Vec::new();
        let mut batch = Vec::new();
        for f in v2_functions() {
            let name = f.signature().name.clone();
            row.push((
                name.clone(),
                ScalarUDF::new_from_impl(
                    PluginUdf::new(&name, f.clone(), Volatility::Immutable)
                        .with_call_path(CallPath::Row),
                ),
            ));
            batch.push((
                name.clone(),
                ScalarUDF::new_from_impl(
                    PluginUdf::new(&name, f, Volatility::Immutable).with_call_path(CallPath::Batch),
                ),
            ));
        }
        Udfs { row, batch }
    })
}

/// Calls `name` on arrays through one path; an error becomes its message.
fn call(
    path: CallPath,
    name: &str,
    args: Vec<ArrayRef>,
    ret: DataType,
) -> Result<ArrayRef, String> {
    let rows = args.first().map_or(1, |a| a.len());
    let args = args.into_iter().map(ColumnarValue::Array).collect();
    call_values(path, name, args, rows, ret)
}

/// Calls `name` on arrays and constants, for `rows` rows, through one path; an error becomes
/// its message.
fn call_values(
    path: CallPath,
    name: &str,
    args: Vec<ColumnarValue>,
    rows: usize,
    ret: DataType,
) -> Result<ArrayRef, String> {
    let list = match path {
        CallPath::Row => &udfs().row,
        CallPath::Batch => &udfs().batch,
    };
    let udf = &list.iter().find(|(n, _)| n == name).unwrap().1;
    let args = ScalarFunctionArgs {
        arg_fields: args
            .iter()
            .enumerate()
            .map(|(i, a)| Arc::new(Field::new(format!("a{i}"), a.data_type(), true)))
            .collect(),
        args,
        number_rows: rows,
        return_field: Arc::new(Field::new(name, ret, true)),
        config_options: Arc::new(Default::default()),
    };
    match udf.invoke_with_args(args) {
        Ok(ColumnarValue::Array(a)) => Ok(a),
        Ok(ColumnarValue::Scalar(s)) => s.to_array_of_size(rows).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string().replace("batch call: ", "")),
    }
}

/// Both paths, checked against `expected` (or both failing alike).
fn check(name: &str, args: Vec<ArrayRef>, ret: DataType, expected: Result<ArrayRef, ()>) {
    let row = call(CallPath::Row, name, args.clone(), ret.clone());
    let batch = call(CallPath::Batch, name, args, ret);
    match expected {
        Ok(expected) => {
            let row = row.unwrap_or_else(|e| panic!("{name} row: {e}"));
            let batch = batch.unwrap_or_else(|e| panic!("{name} batch: {e}"));
            assert_eq!(row.as_ref(), expected.as_ref(), "{name} row path");
            assert_eq!(batch.as_ref(), expected.as_ref(), "{name} batch path");
        }
        Err(()) => {
            let (r, b) = (row.unwrap_err(), batch.unwrap_err());
            assert_eq!(r, b, "{name}: both paths fail with the same message");
        }
    }
}

/// Up to 700 rows: the row path lays out arguments 256 rows at a time, so batches cross those
/// chunks' boundaries with NULLs on either side.
fn opt<T: Arbitrary + Clone + 'static>() -> impl Strategy<Value = Vec<Option<T>>> {
    prop::collection::vec(prop::option::weighted(0.85, any::<T>()), 0..700)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn square_int64(xs in opt::<i64>()) {
        let expected: Int64Array = xs.iter().map(|x| x.map(|v| v.wrapping_mul(v))).collect();
        check("square", vec![Arc::new(Int64Array::from(xs))], DataType::Int64, Ok(Arc::new(expected)));
    }

    /// Columns without NULLs, whole or sliced, and a constant beside one: what the generated
    /// batch entry's direct path takes (`udf_abi::export::direct`), for a unary, a
    /// boolean-valued and a binary kernel.
    #[test]
    fn primitive_columns_without_nulls(
        xs in prop::collection::vec(any::<i64>(), 0..700),
        fs in prop::collection::vec((any::<f64>(), any::<f64>()), 0..700),
        halves in prop::collection::vec(any::<f32>(), 0..300),
        skip in 0usize..40,
    ) {
        let ints = Int64Array::from(xs.clone());
        let from = skip.min(xs.len());
        for (array, values) in [(ints.clone(), &xs[..]), (ints.slice(from, xs.len() - from), &xs[from..])] {
            let squares: Int64Array = values.iter().map(|v| Some(v.wrapping_mul(*v))).collect();
            check("square", vec![Arc::new(array.clone())], DataType::Int64, Ok(Arc::new(squares)));
            let even: BooleanArray = values.iter().map(|v| Some(v % 2 == 0)).collect();
            check("is_even", vec![Arc::new(array)], DataType::Boolean, Ok(Arc::new(even)));
        }
        let (a, b): (Vec<f64>, Vec<f64>) = fs.into_iter().unzip();
        let from = skip.min(a.len());
        let args: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from(a.clone()).slice(from, a.len() - from)),
            Arc::new(Float64Array::from(b.clone()).slice(from, a.len() - from)),
        ];
        let expected: Vec<u64> = a[from..].iter().zip(&b[from..]).map(|(x, y)| x.hypot(*y).to_bits()).collect();
        let bits = |a: &ArrayRef| -> Vec<u64> {
            let a = a.as_any().downcast_ref::<Float64Array>().unwrap();
            assert_eq!(a.null_count(), 0);
            a.values().iter().map(|v| v.to_bits()).collect()
        };
        prop_assert_eq!(bits(&call(CallPath::Row, "hypot", args.clone(), DataType::Float64).unwrap()), expected.clone());
        prop_assert_eq!(bits(&call(CallPath::Batch, "hypot", args, DataType::Float64).unwrap()), expected);
        // A constant beside a column, either way round (`hypot(x, 2.5)`, `hypot(2.5, x)`).
        let column: ArrayRef = Arc::new(Float64Array::from(a.clone()));
        let c = b.first().copied().unwrap_or(2.5);
        for constant_first in [false, true] {
            let (column, constant) = (
                ColumnarValue::Array(Arc::clone(&column)),
                ColumnarValue::Scalar(ScalarValue::Float64(Some(c))),
            );
            let args = if constant_first { vec![constant, column] } else { vec![column, constant] };
            let expected: Vec<u64> = a.iter().map(|x| if constant_first { c.hypot(*x) } else { x.hypot(c) }.to_bits()).collect();
            for path in [CallPath::Row, CallPath::Batch] {
                let out = call_values(path, "hypot", args.clone(), a.len(), DataType::Float64).unwrap();
                prop_assert_eq!(bits(&out), expected.clone());
            }
        }
        let expected: Vec<u32> = halves.iter().map(|x| (x / 2.0).to_bits()).collect();
        let args: Vec<ArrayRef> = vec![Arc::new(Float32Array::from(halves))];
        for path in [CallPath::Row, CallPath::Batch] {
            let out = call(path, "half_f32", args.clone(), DataType::Float32).unwrap();
            let out = out.as_any().downcast_ref::<Float32Array>().unwrap();
            prop_assert_eq!(out.null_count(), 0);
            let got: Vec<u32> = out.values().iter().map(|v| v.to_bits()).collect();
            prop_assert_eq!(&got, &expected);
        }
    }

    /// Columns with NULLs, whole or sliced (the bitmap then starts inside a byte), and a
    /// constant beside one, as the generated batch entry's direct path takes them (that it takes
    /// them and never computes a NULL row is checked in `udf_abi::export::direct`'s tests and
    /// `author_rules.rs`); both paths against Rust references.
    #[test]
    fn primitive_columns_with_nulls(
        xs in opt::<i64>(),
        fs in prop::collection::vec((prop::option::weighted(0.8, any::<f64>()), prop::option::weighted(0.8, any::<f64>())), 0..700),
        skip in 0usize..40,
        c in any::<f64>(),
    ) {
        let ints = Int64Array::from(xs.clone());
        let from = skip.min(xs.len());
        for (array, values) in [(ints.clone(), &xs[..]), (ints.slice(from, xs.len() - from), &xs[from..])] {
            let squares: Int64Array = values.iter().map(|v| v.map(|v| v.wrapping_mul(v))).collect();
            check("square", vec![Arc::new(array.clone())], DataType::Int64, Ok(Arc::new(squares)));
            let even: BooleanArray = values.iter().map(|v| v.map(|v| v % 2 == 0)).collect();
            check("is_even", vec![Arc::new(array)], DataType::Boolean, Ok(Arc::new(even)));
        }
        // NaN != NaN: compare bit patterns.
        let bits = |a: &ArrayRef| -> Vec<Option<u64>> {
            a.as_any().downcast_ref::<Float64Array>().unwrap().iter().map(|v| v.map(f64::to_bits)).collect()
        };
        let (a, b): (Vec<Option<f64>>, Vec<Option<f64>>) = fs.into_iter().unzip();
        let from = skip.min(a.len());
        // Two columns sliced at different rows: their bitmaps start at different bits.
        let to = a.len() - from;
        let args: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from(a.clone()).slice(from, to)),
            Arc::new(Float64Array::from(b.clone()).slice(0, to)),
        ];
        let expected: Vec<Option<u64>> = a[from..].iter().zip(&b[..to]).map(|(x, y)| Some(x.as_ref()?.hypot(*y.as_ref()?).to_bits())).collect();
        for path in [CallPath::Row, CallPath::Batch] {
            prop_assert_eq!(bits(&call(path, "hypot", args.clone(), DataType::Float64).unwrap()), expected.clone());
        }
        // A constant beside a column with NULLs, either way round.
        let column: ArrayRef = Arc::new(Float64Array::from(a.clone()).slice(from, to));
        for constant_first in [false, true] {
            let (column, constant) = (
                ColumnarValue::Array(Arc::clone(&column)),
                ColumnarValue::Scalar(ScalarValue::Float64(Some(c))),
            );
            let args = if constant_first { vec![constant, column] } else { vec![column, constant] };
            let expected: Vec<Option<u64>> = a[from..].iter().map(|x| x.map(|x| if constant_first { c.hypot(x) } else { x.hypot(c) }.to_bits())).collect();
            for path in [CallPath::Row, CallPath::Batch] {
                let out = call_values(path, "hypot", args.clone(), to, DataType::Float64).unwrap();
                prop_assert_eq!(bits(&out), expected.clone());
            }
        }
    }

    #[test]
    fn safe_div_int64_with_errors(pairs in prop::collection::vec((prop::option::weighted(0.9, any::<i64>()), prop::option::weighted(0.9, -3i64..3)), 0..700)) {
        let (a, b): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let fails = a.iter().zip(&b).any(|(x, y)| matches!((x, y), (Some(x), Some(y)) if *y == 0 || (*x == i64::MIN && *y == -1)));
        let expected: Int64Array = a.iter().zip(&b).map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => x.checked_div(*y),
            _ => None,
        }).collect();
        let args: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(a)), Arc::new(Int64Array::from(b))];
        check("safe_div", args, DataType::Int64, if fails { Err(()) } else { Ok(Arc::new(expected)) });
    }

    #[test]
    fn hypot_float64(a in opt::<f64>(), b in any::<f64>()) {
        let bs = vec![Some(b); a.len()];
        let expected: Float64Array = a.iter().map(|x| x.map(|v| v.hypot(b))).collect();
        let args: Vec<ArrayRef> = vec![Arc::new(Float64Array::from(a)), Arc::new(Float64Array::from(bs))];
        let row = call(CallPath::Row, "hypot", args.clone(), DataType::Float64).unwrap();
        let batch = call(CallPath::Batch, "hypot", args, DataType::Float64).unwrap();
        // NaN != NaN: compare bit patterns.
        let bits = |a: &ArrayRef| -> Vec<Option<u64>> {
            a.as_any().downcast_ref::<Float64Array>().unwrap().iter().map(|v| v.map(f64::to_bits)).collect()
        };
        let expected: ArrayRef = Arc::new(expected);
        prop_assert_eq!(bits(&row), bits(&expected));
        prop_assert_eq!(bits(&batch), bits(&expected));
    }

    #[test]
    fn strings_in_and_out(ss in opt::<String>(), n in 0u64..4) {
        let lens: UInt64Array = ss.iter().map(|s| s.as_ref().map(|s| s.chars().count() as u64)).collect();
        let strings = StringArray::from(ss.clone());
        check("str_len", vec![Arc::new(strings.clone())], DataType::UInt64, Ok(Arc::new(lens)));
        let shouted: StringArray = ss.iter().map(|s| s.as_ref().map(|s| s.to_uppercase() + "!")).collect();
        check("shout", vec![Arc::new(strings.clone())], DataType::Utf8, Ok(Arc::new(shouted)));
        let repeated: StringArray = ss.iter().map(|s| s.as_ref().map(|s| s.repeat(n as usize))).collect();
        let counts = UInt64Array::from(vec![n; ss.len()]);
        check("repeat_text", vec![Arc::new(strings.clone()), Arc::new(counts)], DataType::Utf8, Ok(Arc::new(repeated)));
        // NULL-aware: NULL in gives -1, "" gives NULL.
        let coalesced: Int64Array = ss.iter().map(|s| match s {
            None => Some(-1),
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s.chars().count() as i64),
        }).collect();
        check("coalesce_len", vec![Arc::new(strings)], DataType::Int64, Ok(Arc::new(coalesced)));
    }

    #[test]
    fn booleans_in_and_out(bs in opt::<bool>(), xs in any::<i64>()) {
        let negated: BooleanArray = bs.iter().map(|b| b.map(|b| !b)).collect();
        check("negate", vec![Arc::new(BooleanArray::from(bs.clone()))], DataType::Boolean, Ok(Arc::new(negated)));
        let ints = Int64Array::from(vec![Some(xs); bs.len()]);
        let even: BooleanArray = (0..bs.len()).map(|_| Some(xs % 2 == 0)).collect();
        check("is_even", vec![Arc::new(ints)], DataType::Boolean, Ok(Arc::new(even)));
    }

    #[test]
    fn int32_float32_binary(a in opt::<i32>(), f in opt::<f32>(), bytes in prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..12)), 0..100)) {
        let overflow = a.iter().any(|x| x.is_some_and(|x| x.checked_add(1).is_none()));
        let added: Int32Array = a.iter().map(|x| x.and_then(|x| x.checked_add(1))).collect();
        let ones = Int32Array::from(vec![Some(1); a.len()]);
        check("add_i32", vec![Arc::new(Int32Array::from(a)), Arc::new(ones)], DataType::Int32, if overflow { Err(()) } else { Ok(Arc::new(added)) });
        let halves: Float32Array = f.iter().map(|x| x.map(|x| x / 2.0)).collect();
        let row = call(CallPath::Row, "half_f32", vec![Arc::new(Float32Array::from(f.clone()))], DataType::Float32).unwrap();
        let batch = call(CallPath::Batch, "half_f32", vec![Arc::new(Float32Array::from(f))], DataType::Float32).unwrap();
        let bits = |a: &ArrayRef| -> Vec<Option<u32>> {
            a.as_any().downcast_ref::<Float32Array>().unwrap().iter().map(|v| v.map(f32::to_bits)).collect()
        };
        let halves: ArrayRef = Arc::new(halves);
        prop_assert_eq!(bits(&row), bits(&halves));
        prop_assert_eq!(bits(&batch), bits(&halves));
        let refs: Vec<Option<&[u8]>> = bytes.iter().map(|b| b.as_deref()).collect();
        let reversed: Vec<Option<Vec<u8>>> = bytes.iter().map(|b| b.as_ref().map(|b| b.iter().rev().copied().collect())).collect();
        let reversed: BinaryArray = reversed.iter().map(|b| b.as_deref()).collect();
        check("reverse_bytes", vec![Arc::new(BinaryArray::from(refs))], DataType::Binary, Ok(Arc::new(reversed)));
    }

    #[test]
    fn dates_and_timestamps(days in opt::<i32>(), micros in prop::collection::vec(prop::option::weighted(0.85, -4_000_000_000_000_000i64..4_000_000_000_000_000), 0..100)) {
        let overflow = days.iter().any(|d| d.is_some_and(|d| d.checked_add(1).is_none()));
        let next: Date32Array = days.iter().map(|d| d.and_then(|d| d.checked_add(1))).collect();
        let ones = Int32Array::from(vec![Some(1); days.len()]);
        check("add_days", vec![Arc::new(Date32Array::from(days)), Arc::new(ones)], DataType::Date32, if overflow { Err(()) } else { Ok(Arc::new(next)) });
        let ts = TimestampMicrosecondArray::from(micros.clone()).with_timezone("UTC");
        let back: Int64Array = micros.iter().copied().collect();
        check("epoch_micros", vec![Arc::new(ts.clone())], DataType::Int64, Ok(Arc::new(back)));
        let later: TimestampMicrosecondArray = TimestampMicrosecondArray::from(micros.iter().map(|m| m.map(|m| m + 60_000_000)).collect::<Vec<_>>()).with_timezone("UTC");
        let sixty = Int64Array::from(vec![Some(60); micros.len()]);
        let ret = DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
        check("add_seconds", vec![Arc::new(ts), Arc::new(sixty)], ret, Ok(Arc::new(later)));
    }
}

/// EXPLAIN names each plugin function's call path, library and ABI under the physical plan.
#[tokio::test]
async fn explain_shows_the_call_path_of_each_plugin_function() {
    let ctx = SessionContext::new();
    ctx.sql("CREATE TABLE n (x BIGINT) AS VALUES (1), (2)")
        .await
        .unwrap();
    let id = ctx.session_id();
    udf_engine::install_explain(&ctx);
    udf_engine::install_explain(&ctx); // a second install changes nothing
    assert_eq!(ctx.session_id(), id);
    assert_eq!(
        ctx.state().session_id(),
        id,
        "the state keeps its session id"
    );
    let library = PluginLibrary::load(plugin("square")).unwrap();
    let square = library.function(0).unwrap();
    for (name, path) in [("sq_row", CallPath::Row), ("sq_batch", CallPath::Batch)] {
        let udf = PluginUdf::new(name, square.clone(), Volatility::Immutable).with_call_path(path);
        ctx.register_udf(ScalarUDF::new_from_impl(udf));
    }

    let plan = |sql: String| {
        let ctx = ctx.clone();
        async move {
            let batches = query(&ctx, &sql).await.unwrap();
            datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string()
        }
    };
    let text =
        plan("EXPLAIN SELECT sq_row(x), sq_batch(x) + 1 FROM n WHERE sq_row(x) > 1".into()).await;
    let file = plugin("square")
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let m = udf_abi::v2::ABI_MINOR;
    let expected = format!(
        "plugin functions:\n  sq_batch: batch path, {file} (ABI v2.{m})\n  sq_row: row path, {file} (ABI v2.{m})"
    );
    // Each line sits in the plan column of the physical_plan row, in this order.
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('|').nth(2))
        .map(str::trim_end)
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let at = lines
        .iter()
        .position(|l| *l == "plugin functions:")
        .unwrap_or_else(|| panic!("no plugin line in:\n{text}"));
    assert_eq!(lines[at..at + 3].join("\n"), expected, "{text}");
    assert_eq!(text.matches("plugin functions:").count(), 1, "{text}");
    assert!(
        text.find("physical_plan").unwrap() < text.find("plugin functions:").unwrap(),
        "{text}"
    );

    // Subqueries count; queries without plugin functions get no line.
    let text = plan("EXPLAIN SELECT x FROM n WHERE x IN (SELECT sq_row(x) FROM n)".into()).await;
    assert!(text.contains("sq_row: row path"), "{text}");
    let text = plan("EXPLAIN SELECT x + 1 FROM n".into()).await;
    assert!(!text.contains("plugin functions"), "{text}");
}

/// The seed contract's row path over more rows than one argument chunk (256): NUL-terminated
/// copies of the strings, a constant argument, NULLs (the STRICT rule), a NUL byte under a NULL
/// slot (never read), and a NUL byte in a called row (the error that ABI v1 strings impose).
#[test]
fn v1_row_calls_cross_chunks_with_constants_nulls_and_nul_bytes() {
    use datafusion::arrow::buffer::{Buffer, NullBuffer, OffsetBuffer};
    use udf_engine::CallErrorKind;

    let library = PluginLibrary::load(plugin("repeat")).unwrap();
    let repeat = library.function_named("repeat").unwrap();
    assert_eq!(library.abi(), udf_engine::Abi::V1);
    let rows = 1000;
    // Row i holds "s{i}"; every 7th row is NULL, and its slot holds "\0" behind the NULL bit.
    let mut values = Vec::new();
    let mut offsets = vec![0i32];
    for i in 0..rows {
        if i % 7 == 3 {
            values.extend_from_slice(b"x\0y");
        } else {
            values.extend_from_slice(format!("s{i}").as_bytes());
        }
        offsets.push(values.len() as i32);
    }
    let valid: Vec<bool> = (0..rows).map(|i| i % 7 != 3).collect();
    let strings = StringArray::new(
        OffsetBuffer::new(offsets.into()),
        Buffer::from_vec(values),
        Some(NullBuffer::from(valid)),
    );
    let three: ArrayRef = Arc::new(UInt64Array::from(vec![3u64]));
    let result = repeat
        .call_rows(&[(Arc::new(strings.clone()), false), (three, true)], rows)
        .unwrap();
    let expected: StringArray = (0..rows)
        .map(|i| (i % 7 != 3).then(|| format!("s{i}").repeat(3)))
        .collect();
    assert_eq!(result.as_ref(), &expected as &dyn Array);

    // A NULL constant: every row is NULL, without a call.
    let null_count: ArrayRef = Arc::new(UInt64Array::from(vec![None::<u64>]));
    let result = repeat
        .call_rows(&[(Arc::new(strings), false), (null_count, true)], rows)
        .unwrap();
    assert_eq!(result.null_count(), rows);

    // A NUL byte in a row that is called, in the third chunk.
    let mut with_nul: Vec<Option<String>> = (0..rows).map(|i| Some(format!("s{i}"))).collect();
    with_nul[600] = Some("bad\0byte".to_string());
    let one: ArrayRef = Arc::new(UInt64Array::from(vec![1u64; rows]));
    let e = repeat
        .call_rows(
            &[(Arc::new(StringArray::from(with_nul)), false), (one, false)],
            rows,
        )
        .unwrap_err();
    assert_eq!(e.kind(), CallErrorKind::Arguments, "{e}");
    assert!(
        e.to_string().contains("argument 1 contains a NUL byte"),
        "{e}"
    );
}

/// Sliced arguments (non-zero offsets, as after a filter or a LIMIT) read the right rows on both
/// paths, across the row path's 256-row chunks.
#[test]
fn sliced_arguments_read_the_right_rows_on_both_paths() {
    let xs: Vec<Option<i64>> = (0..900)
        .map(|i| (i % 5 != 2).then_some(i as i64 - 400))
        .collect();
    let ss: Vec<Option<String>> = (0..900)
        .map(|i| (i % 7 != 3).then(|| format!("v{i}é")))
        .collect();
    let ints: ArrayRef = Arc::new(Int64Array::from(xs.clone()));
    let strings: ArrayRef = Arc::new(StringArray::from(ss.clone()));
    let (offset, len) = (37, 600);
    let squares: Int64Array = xs[offset..offset + len]
        .iter()
        .map(|x| x.map(|v| v.wrapping_mul(v)))
        .collect();
    check(
        "square",
        vec![ints.slice(offset, len)],
        DataType::Int64,
        Ok(Arc::new(squares)),
    );
    let lens: UInt64Array = ss[offset..offset + len]
        .iter()
        .map(|s| s.as_ref().map(|s| s.chars().count() as u64))
        .collect();
    check(
        "str_len",
        vec![strings.slice(offset, len)],
        DataType::UInt64,
        Ok(Arc::new(lens)),
    );
}
