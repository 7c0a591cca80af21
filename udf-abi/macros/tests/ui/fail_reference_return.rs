use udf_abi::udf;

#[udf]
fn f(s: &str) -> &str {
    s
}

fn main() {}
