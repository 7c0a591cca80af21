//! A nested-type case (lists) against the nearest builtins; see `udf_benches::nestedbench`.
//! `cargo run --release -p udf-benches --bin nestedbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::nestedbench::main();
}
