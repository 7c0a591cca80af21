use udf_abi::arrow_array::{Decimal128Array, Int64Array};
use udf_abi::udf;

// A decimal's precision and scale are not in its array type: the parameter needs #[arrow("...")].
#[udf(vectorized)]
fn total(price: &Decimal128Array) -> Int64Array {
    Int64Array::from(vec![0; price.len()])
}

fn main() {}
