//! `udfsql-scheduler`: see [`udf_distributed::scheduler`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    udf_distributed::scheduler::main()
}
