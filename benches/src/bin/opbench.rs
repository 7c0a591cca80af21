//! Operator-level measurements (`EXPLAIN ANALYZE` `elapsed_compute`), wall time and peak RSS of
//! every variant of every case; see `udf_benches::opbench`.
//! `cargo run --release -p udf-benches --bin opbench`, or with the criterion benches' build:
//! `cargo bench -p udf-benches --bench opbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::opbench::main();
}
