// Two structs that contain each other (through a list and an Option): the compiler reports the
// cycle in their depth, naming both.
use udf_abi::UdfStruct;
use udf_abi::types::LargeList;

#[derive(UdfStruct)]
struct Folder {
    name: String,
    files: Vec<File>,
}

#[derive(UdfStruct)]
struct File {
    name: String,
    parent: Option<LargeList<Folder>>,
}

fn main() {}
