use udf_abi::types::{Decimal, LargeList, TimestampMillisecond, Utc};
use udf_abi::{UdfStruct, udf};

// Types beyond the tagged ones make a function with Arrow types (ABI 2.2), row by row.
#[udf]
fn f(x: i64) -> u32 {
    x as u32
}

#[udf]
fn len(x: Vec<i64>) -> i64 {
    x.len() as i64
}

#[derive(UdfStruct)]
struct Item {
    name: String,
    price: Option<Decimal<12, 2>>,
    tags: Vec<Option<String>>,
}

#[udf(name = "cheapest", volatility = "stable")]
fn cheapest(items: Vec<Item>, _at: TimestampMillisecond<Utc>) -> Result<Option<Item>, String> {
    Ok(items.into_iter().min_by_key(|i| i.price.map(|p| p.0)))
}

#[udf]
fn names(items: Option<LargeList<Option<&str>>>) -> Vec<Option<String>> {
    items
        .map(|l| l.0.into_iter().map(|n| n.map(str::to_string)).collect())
        .unwrap_or_default()
}

fn main() {}
