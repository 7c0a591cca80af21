//! Aggregate functions at operator level: see `udf_benches::aggbench`.
//! `cargo run --release -p udf-benches --bin aggbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::aggbench::main();
}
