// 17 levels of lists in an argument, no struct involved.
use udf_abi::udf;

#[udf]
fn deep(x: Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<i64>>>>>>>>>>>>>>>>>) -> i64 {
    x.len() as i64
}

fn main() {}
