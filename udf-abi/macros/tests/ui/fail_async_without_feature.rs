// udf-abi is a dev-dependency here without its `async` feature.
use udf_abi::udf;

#[udf(async, max_in_flight = 16, chunk_rows = 4)]
async fn f(x: i64) -> i64 {
    x
}

fn main() {}
