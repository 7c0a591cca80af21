//! Local execution against Apache Ballista: see `udf_benches::distbench`.
//! `cargo run --release -p udf-benches --bin distbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::distbench::main();
}
