use udf_abi::udf;

#[udf(max_in_flight = 4)]
fn f(x: i64) -> i64 {
    x
}

fn main() {}
