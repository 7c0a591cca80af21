use udf_abi::udf;

#[udf]
fn f(out: &mut String, n: i64) {
    out.push_str(&n.to_string());
}

fn main() {}
