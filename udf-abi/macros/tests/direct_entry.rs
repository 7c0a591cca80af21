//! The batch entrypoints `#[udf]` generates for functions over primitives, called as the host
//! calls them (through this test binary's own `udfsql_manifest`): a batch of columns, with or
//! without NULLs (or a column beside a constant that is not NULL), is answered by the direct
//! entry, which leaves the argument arrays in place for the host to release (and the rows with a
//! NULL argument to the host to mask); a unary function's constant or a NULL constant by the
//! generic path, which takes them. Both answer the same. The functions are named like the generated code's own
//! variables (`n`, `error`, `args`, `out`), which must not shadow them.

use std::sync::Arc;

use udf_abi::arrow_array::cast::AsArray;
use udf_abi::arrow_array::ffi::from_ffi;
use udf_abi::arrow_array::types::{Float64Type, Int64Type};
use udf_abi::arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray, make_array,
};
use udf_abi::udf;
use udf_abi::v2::{FFI_ArrowArray, FFI_ArrowSchema, UdfFunction, UdfOwnedBytes, status};

#[udf]
fn n(x: i64) -> i64 {
    x.wrapping_mul(x)
}

#[udf]
fn error(a: f64, b: f64) -> f64 {
    a.hypot(b)
}

#[udf]
fn args(x: i32) -> bool {
    x % 3 == 0
}

#[udf]
fn out(s: &str) -> String {
    format!("{s}!")
}

/// This binary's function `name`, as the host finds it in the manifest.
fn function(name: &str) -> &'static UdfFunction {
    // SAFETY: the manifest this binary exports (the generated code's), valid for the process.
    let manifest = unsafe { &*udf_abi::export::udfsql_manifest() };
    (0..manifest.functions_len)
        .map(|i| {
            // SAFETY: `functions_len` descriptors.
            unsafe { &*manifest.functions.add(i) }
        })
        .find(|f| {
            // SAFETY: a descriptor's name is `len` bytes of static memory.
            let bytes = unsafe { std::slice::from_raw_parts(f.name.ptr, f.name.len) };
            bytes == name.as_bytes()
        })
        .unwrap_or_else(|| panic!("no function {name}"))
}

/// One batch call of `name` over `inputs` (array, constant flag) for `rows` rows: the result
/// (or the error message) and, per argument, whether the entry left it in place.
fn call(
    name: &str,
    inputs: &[(ArrayRef, bool)],
    rows: usize,
) -> (Result<ArrayRef, String>, Vec<bool>) {
    let entry = function(name).call_batch.expect("a batch entrypoint");
    let mut arrays: Vec<FFI_ArrowArray> = inputs
        .iter()
        .map(|(a, _)| FFI_ArrowArray::new(&a.to_data()))
        .collect();
    let schemas: Vec<FFI_ArrowSchema> = inputs
        .iter()
        .map(|(a, _)| FFI_ArrowSchema::try_from(a.data_type()).unwrap())
        .collect();
    let flags: Vec<u8> = inputs.iter().map(|&(_, s)| u8::from(s)).collect();
    let mut result = FFI_ArrowArray::empty();
    let mut result_schema = FFI_ArrowSchema::empty();
    let mut error = UdfOwnedBytes::EMPTY;
    // SAFETY: one valid array, schema and flag per argument, alive for the call; the outputs are
    // valid for writes.
    let code = unsafe {
        entry(
            arrays.as_mut_ptr(),
            schemas.as_ptr(),
            flags.as_ptr(),
            inputs.len(),
            rows,
            &mut result,
            &mut result_schema,
            &mut error,
        )
    };
    let in_place = arrays.iter().map(|a| a.release.is_some()).collect();
    if code == status::OK {
        // SAFETY: the entry exported a valid array and its schema.
        let data = unsafe { from_ffi(result, &result_schema) }.unwrap();
        data.validate_full().unwrap();
        return (Ok(make_array(data)), in_place);
    }
    // SAFETY: an error message made of a `Vec<u8>`'s parts, taken back once.
    let bytes = unsafe { Vec::from_raw_parts(error.ptr, error.len, error.capacity) };
    (Err(String::from_utf8(bytes).unwrap()), in_place)
}

#[test]
fn columns_are_answered_in_place_and_constants_are_taken() {
    let xs: ArrayRef = Arc::new(Int64Array::from(vec![3, -4, 5, i64::MAX]));
    let (out, in_place) = call("n", &[(Arc::clone(&xs), false)], 4);
    let out = out.unwrap();
    assert_eq!(
        out.as_primitive::<Int64Type>().values().to_vec(),
        vec![9, 16, 25, i64::MAX.wrapping_mul(i64::MAX)]
    );
    assert_eq!(
        in_place,
        [true],
        "the direct entry leaves the argument to the host"
    );

    // With NULLs: the direct entry too. The result has no bitmap: the host masks the rows where
    // an argument is NULL, whatever their slots hold.
    let with_nulls = Int64Array::from(vec![Some(3), None, Some(5)]);
    let (out, in_place) = call("n", &[(Arc::new(with_nulls.clone()), false)], 3);
    let out = out.unwrap();
    assert_eq!(out.null_count(), 0);
    assert_eq!(
        out.as_primitive::<Int64Type>().values().to_vec(),
        [9, 0, 25]
    );
    assert_eq!(in_place, [true], "the direct entry leaves the argument");

    // A unary function's constant: the generic path (it computes it once).
    let (out, in_place) = call("n", &[(Arc::new(Int64Array::from(vec![7])), true)], 3);
    assert_eq!(
        out.unwrap().as_primitive::<Int64Type>().values().to_vec(),
        [49; 3]
    );
    assert_eq!(in_place, [false]);
}

#[test]
fn two_arguments_a_constant_and_booleans_go_the_same_ways() {
    let a: ArrayRef = Arc::new(Float64Array::from(vec![3.0, 6.0, 0.5]));
    let b: ArrayRef = Arc::new(Float64Array::from(vec![4.0, 8.0, 1.2]));
    let hypot = |out: Result<ArrayRef, String>| -> Vec<f64> {
        out.unwrap().as_primitive::<Float64Type>().values().to_vec()
    };
    let (out, in_place) = call(
        "error",
        &[(Arc::clone(&a), false), (Arc::clone(&b), false)],
        3,
    );
    assert_eq!(hypot(out), [5.0, 10.0, 0.5f64.hypot(1.2)]);
    assert_eq!(in_place, [true, true]);
    // A NULL constant: the generic path (every row NULL, the function never called).
    let null: ArrayRef = Arc::new(Float64Array::from(vec![None::<f64>]));
    let (out, in_place) = call("error", &[(Arc::clone(&a), false), (null, true)], 3);
    assert_eq!(out.unwrap().null_count(), 3);
    assert_eq!(in_place, [false, false]);
    let four: ArrayRef = Arc::new(Float64Array::from(vec![4.0]));
    let (out, in_place) = call(
        "error",
        &[(Arc::clone(&a), false), (Arc::clone(&four), true)],
        3,
    );
    assert_eq!(hypot(out), [5.0, 6.0f64.hypot(4.0), 0.5f64.hypot(4.0)]);
    assert_eq!(in_place, [true, true]);
    let (out, in_place) = call("error", &[(four, true), (a, false)], 3);
    assert_eq!(
        hypot(out),
        [4.0f64.hypot(3.0), 4.0f64.hypot(6.0), 4.0f64.hypot(0.5)]
    );
    assert_eq!(in_place, [true, true]);

    let ints: ArrayRef = Arc::new(Int32Array::from((0..70).collect::<Vec<i32>>()));
    let (out, in_place) = call("args", &[(ints, false)], 70);
    let expected: BooleanArray = (0..70).map(|i| Some(i % 3 == 0)).collect();
    assert_eq!(out.unwrap().as_boolean(), &expected);
    assert_eq!(in_place, [true]);

    // A string function has no direct entry: the generic path, which takes its argument.
    let strings: ArrayRef = Arc::new(StringArray::from(vec!["a", "bc"]));
    let (out, in_place) = call("out", &[(strings, false)], 2);
    let out = out.unwrap();
    assert_eq!(
        out.as_string::<i32>().iter().collect::<Vec<_>>(),
        [Some("a!"), Some("bc!")]
    );
    assert_eq!(in_place, [false]);
}

/// How many times `counted` ran.
static COUNTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[udf(volatility = "volatile")]
fn counted(x: i64) -> i64 {
    COUNTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    x + 1
}

#[test]
fn a_volatile_function_runs_once_per_row_without_nulls() {
    // 200 rows, NULL in every seventh: `counted` runs at the 171 others exactly.
    let xs: ArrayRef = Arc::new(Int64Array::from(
        (0..200)
            .map(|i| (i % 7 != 0).then_some(i))
            .collect::<Vec<_>>(),
    ));
    let before = COUNTED.load(std::sync::atomic::Ordering::SeqCst);
    let (out, in_place) = call("counted", &[(Arc::clone(&xs), false)], 200);
    assert_eq!(in_place, [true], "the direct entry");
    assert_eq!(
        COUNTED.load(std::sync::atomic::Ordering::SeqCst) - before,
        171
    );
    let out = out.unwrap();
    let out = out.as_primitive::<Int64Type>();
    for i in (0..200).filter(|i| i % 7 != 0) {
        assert_eq!(out.value(i), i as i64 + 1, "row {i}");
    }
}

#[test]
fn a_panic_on_the_direct_entry_is_the_calls_error() {
    #[udf]
    fn picky(x: i64) -> i64 {
        assert!(x != 2, "two is not allowed");
        x
    }
    let xs: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
    let (out, in_place) = call("picky", &[(xs, false)], 3);
    let message = out.unwrap_err();
    assert!(
        message.starts_with("panicked: two is not allowed (at "),
        "{message}"
    );
    assert_eq!(in_place, [true]);
}
