//! What asynchronous functions buy and cost: see `udf_benches::asyncbench`.
//! `cargo run --release -p udf-benches --bin asyncbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::asyncbench::main();
}
