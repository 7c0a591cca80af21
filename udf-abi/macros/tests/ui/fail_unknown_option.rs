use udf_abi::udf;

#[udf(strict = "yes")]
fn f(x: i64) -> i64 {
    x
}

fn main() {}
