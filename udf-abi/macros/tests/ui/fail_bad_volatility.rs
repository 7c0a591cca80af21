use udf_abi::udf;

#[udf(volatility = "sometimes")]
fn f(x: i64) -> i64 {
    x
}

fn main() {}
