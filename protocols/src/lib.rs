//! `udfsql-server`'s wire protocols over the service's session: PostgreSQL ([`pg`], pgwire) and
//! Arrow Flight SQL ([`flight`]), with the users and TLS identity they share ([`auth`]).
//!
//! Both run every statement through [`udf_service::AppState::prepare`] and
//! [`udf_service::AppState::run`]: one session, one statement policy (queries only), one set of
//! limits (concurrency, time, memory, result rows and bytes) and the same process isolation as
//! the HTTP API.
#![forbid(unsafe_code)]

pub mod auth;
pub mod flight;
pub mod pg;
mod pg_proc;

pub use auth::{TlsIdentity, Users};
