//! What each protocol of `udfsql-server` costs: see `udf_benches::protobench`.
//! `cargo build --release -p udf-protocols --bin udfsql-server && cargo run --release -p
//! udf-benches --bin protobench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::protobench::main();
}
