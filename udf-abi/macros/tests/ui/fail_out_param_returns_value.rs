use udf_abi::udf;

#[udf]
fn f(n: i64, out: &mut String) -> String {
    out.push_str(&n.to_string());
    String::new()
}

fn main() {}
