use udf_abi::udf;

#[udf(async)]
fn f(x: i64) -> i64 {
    x
}

fn main() {}
