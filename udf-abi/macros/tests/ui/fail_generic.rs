use udf_abi::udf;

#[udf]
fn f<T: Into<i64>>(x: i64) -> i64 {
    x
}

fn main() {}
