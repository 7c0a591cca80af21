use udf_abi::udf;

#[udf]
fn f(x: Vec<i64>) -> i64 {
    x.len() as i64
}

fn main() {}
