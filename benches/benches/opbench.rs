//! The `opbench` binary as a bench target, so that `cargo bench -p udf-benches --bench opbench`
//! runs it with the `bench` profile and the criterion benches' build (no second release build of
//! DataFusion). See `udf_benches::opbench`.
#![forbid(unsafe_code)]

fn main() {
    udf_benches::opbench::main();
}
