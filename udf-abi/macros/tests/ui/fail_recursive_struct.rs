// A struct that contains itself has no finite Arrow type: a compile error naming it (before, it
// compiled and describing its type recursed forever inside `udfsql_manifest`, in the host).
use udf_abi::{UdfStruct, udf};

#[derive(UdfStruct)]
struct Tree {
    label: String,
    kids: Vec<Tree>,
}

#[udf]
fn size(t: Tree) -> i64 {
    1 + t.kids.len() as i64
}

fn main() {}
