use udf_abi::udf;

#[udf(async)]
async fn f(x: &str, out: &mut String) {
    out.push_str(x)
}

fn main() {}
