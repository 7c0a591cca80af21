//! What process isolation costs: see `udf_benches::isobench`.
//! `cargo run --release -p udf-benches --bin isobench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::isobench::main();
}
