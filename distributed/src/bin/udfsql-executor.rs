//! `udfsql-executor`: see [`udf_distributed::executor`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    udf_distributed::executor::main()
}
