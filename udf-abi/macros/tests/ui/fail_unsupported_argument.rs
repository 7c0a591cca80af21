use udf_abi::udf;

#[udf]
fn f(m: std::collections::HashMap<String, i64>) -> i64 {
    m.len() as i64
}

fn main() {}
