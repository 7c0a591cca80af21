use udf_abi::arrow_array::Int64Array;
use udf_abi::udf;

#[udf(vectorized)]
fn f(x: Int64Array) -> Int64Array {
    x
}

fn main() {}
