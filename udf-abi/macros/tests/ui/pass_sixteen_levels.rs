// 16 levels (a struct holding 15 nested lists) is the most a type string may nest, and compiles.
use udf_abi::{UdfStruct, udf};

#[derive(UdfStruct)]
struct Deepest {
    x: Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<i64>>>>>>>>>>>>>>>,
}

#[udf]
fn deepest(d: Deepest) -> i64 {
    d.x.len() as i64
}

fn main() {}
