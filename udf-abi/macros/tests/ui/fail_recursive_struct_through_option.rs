// `Self` through `Option<Box<..>>`.
use udf_abi::UdfStruct;

#[derive(UdfStruct)]
struct Chain {
    value: i64,
    next: Option<Box<Self>>,
}

fn main() {}
