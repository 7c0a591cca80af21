// 17 levels of lists inside a struct: more than the 16 a type string may nest.
use udf_abi::UdfStruct;

#[derive(UdfStruct)]
struct Deep {
    x: Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<Vec<i64>>>>>>>>>>>>>>>>,
}

fn main() {}
