//! [`CallPath`]: which entrypoint of a scalar function a call goes through. Its own module, so
//! that the UDF (`udf`) and process isolation (`isolation`, which sends it to the worker) both
//! depend on it instead of on each other.

#![forbid(unsafe_code)]

/// How a plugin function is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallPath {
    /// Once per row, through the row entrypoint.
    Row,
    /// Once per batch, through the batch entrypoint (Arrow C Data Interface).
    Batch,
}

impl std::fmt::Display for CallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CallPath::Row => "row",
            CallPath::Batch => "batch",
        })
    }
}
