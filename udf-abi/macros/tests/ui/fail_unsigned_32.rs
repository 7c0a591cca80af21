use udf_abi::udf;

#[udf]
fn f(x: i64) -> u32 {
    x as u32
}

fn main() {}
