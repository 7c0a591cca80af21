use udf_abi::udf;

#[udf(returns = "d:12,2")]
fn f(x: i64) -> i64 {
    x
}

fn main() {}
