use udf_abi::udf;

#[udf]
fn f(x: i64) {
    let _ = x;
}

fn main() {}
