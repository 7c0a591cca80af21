//! `udfsql-worker`: evaluates the functions of one isolated plugin library for a udfsql host.
//! Started by the host, never by hand; see `udf_engine::isolation`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    udf_engine::isolation::worker_main()
}
