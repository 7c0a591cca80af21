//! udfsql's engine: load user-defined scalar functions from shared libraries at run time and
//! make them callable from SQL in Apache DataFusion.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use datafusion::prelude::SessionContext;
//! use udf_engine::SessionContextExt;
//!
//! let ctx = SessionContext::new();
//! ctx.register_plugin("target/debug/libudf_plugin_repeat.so")?;
//! ctx.sql("SELECT repeat('cool', 3)").await?.show().await?;
//! # Ok(()) }
//! ```
//!
//! * [`PluginLibrary`] loads a library and validates its metadata (all `unsafe` lives in the
//!   private `ffi` module);
//! * [`PluginUdf`] is a plugin function as a DataFusion `ScalarUDFImpl`;
//! * [`register_plugin`] / [`SessionContextExt`] register a library's functions in a session.

#![deny(unsafe_code)]

mod async_plan;
pub use async_plan::async_placement_rule;
mod async_udf;
mod call_path;
mod catalog;
pub mod compile;
mod ddl;
mod error;
mod explain;
#[allow(unsafe_code)] // the one module of the host that touches raw pointers and foreign code
mod ffi;
pub mod isolation;
pub mod json;
mod loader;
mod plugin_dir;
mod register;
mod trust;
pub mod types;
mod udaf;
mod udf;

pub use async_udf::{
    AsyncLimits, DEFAULT_CALL_TIMEOUT, MAX_CALL_TIMEOUT, MAX_CHUNK_ROWS, MAX_IN_FLIGHT,
    MAX_RETRIES, PluginUdfRef, plugin_udf_of,
};
pub use call_path::CallPath;
pub use catalog::{
    PluginFunctionInfo, PluginFunctionsTable, plugin_aggregates_of, plugin_functions,
    plugin_functions_in, plugin_functions_of, register_plugin_functions_table,
};
pub use ddl::{DdlError, LibraryTarget, PluginFunctionFactory, execute_statement, install, sql};
pub use error::{CallError, CallErrorKind, LoadError, MetadataError, TypePosition};
pub use explain::{PluginQueryPlanner, install_explain, plugin_calls_line};
pub use ffi::aggregate::{
    AggregateSignature, Emit, Feed, MAX_AGGREGATES, PluginAccumulator, PluginAggregate,
};
pub use ffi::async_fn::{
    AsyncDefaults, DEFAULT_CHUNK_ROWS, DEFAULT_MAX_IN_FLIGHT, PendingCall, outstanding_calls,
    stray_completions,
};
pub use ffi::{
    Abi, DeclaredVolatility, FileIdentity, FunctionSignature, MAX_FUNCTIONS, MAX_NAME_LEN,
    PluginFunction, PluginLibrary, open_regular_file,
};
pub use isolation::{CallCancel, Isolation, WorkerLimits, WorkerPool, live_worker_pids};
pub use loader::PluginLoader;
pub use plugin_dir::{PluginDirError, trusted_libraries_in};
pub use register::{
    Registration, SessionContextExt, libraries_in, register_aggregates, register_function,
    register_library, register_library_with, register_plugin, register_plugin_with, register_udaf,
    register_udf,
};
pub use trust::{
    DigestParseError, InsecurePath, Sha256Digest, check_not_writable_by_others, judge,
};
pub use udaf::{PluginUdaf, call_state_fields, plugin_udaf_of};
pub use udf::PluginUdf;
