use std::sync::Arc;

use udf_abi::arrow_array::{Array, ArrayRef, Decimal128Array, Int64Array, ListArray, StringArray};
use udf_abi::udf;

#[udf(vectorized)]
fn plus_one(x: &Int64Array) -> Int64Array {
    x.iter().map(|v| v.map(|v| v + 1)).collect()
}

#[udf(vectorized, name = "cents", volatility = "stable", returns = "d:12,2")]
fn to_cents(#[arrow("d:12,2")] x: &Decimal128Array, s: &StringArray) -> Result<Decimal128Array, String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    Ok(x.clone())
}

#[udf(vectorized, returns = "+l<l>")]
fn same(#[arrow("+l<l>")] x: &ListArray) -> ArrayRef {
    Arc::new(x.clone())
}

fn main() {}
