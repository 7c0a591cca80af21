//! The peer: the plain plugin's functions exported through DataFusion's own FFI
//! (`benches/dffi-peer`, `datafusion-ffi`'s `FFI_ScalarUDF`), loaded with `dlopen` and
//! registered as `ForeignScalarUDF`s: `sq_dffi`, `bang_dffi`, `rev_dffi`, `shout_plain_dffi`.
//! The only `unsafe` of the benches: resolving the library's symbols and calling them.

use std::sync::{Arc, OnceLock};

use datafusion::logical_expr::{ScalarUDF, ScalarUDFImpl};
use datafusion::prelude::SessionContext;
use datafusion_ffi::udf::FFI_ScalarUDF;
use dlopen2::raw::Library;

use crate::built;

/// `udfsql_dffi_version`: the `datafusion-ffi` major version the library was built with.
type VersionFn = extern "C" fn() -> u64;
/// `udfsql_dffi_<f>`: a new `FFI_ScalarUDF`, owned by the caller.
type UdfFn = extern "C" fn() -> FFI_ScalarUDF;

/// The functions the peer exports, by the suffix of their symbol `udfsql_dffi_<f>`; each is
/// registered under the name the library gives it, `<f>_dffi`.
pub const FUNCTIONS: [&str; 4] = ["sq", "bang", "rev", "shout_plain"];

/// The peer library, opened once and never closed: every `ForeignScalarUDF` made from it calls
/// function pointers into it (and its `Drop` calls the library's `release`), and the sessions
/// that hold them live as long as the benchmark, so the handle lives in a static.
fn library() -> &'static Library {
    static LIBRARY: OnceLock<Library> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let path = built("udf-bench-dffi-peer");
        let library =
            Library::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        // SAFETY: `udfsql_dffi_version` is defined by `benches/dffi-peer` (built by
        // `built` from this workspace just now) as `extern "C" fn() -> u64`, the type given.
        let version: VersionFn = unsafe { library.symbol("udfsql_dffi_version") }
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            version(),
            datafusion_ffi::version(),
            "{} was built with another datafusion-ffi major version",
            path.display()
        );
        library
    })
}

/// Registers the peer's functions in `ctx`.
pub fn register(ctx: &SessionContext) {
    let library = library();
    for f in FUNCTIONS {
        let symbol = format!("udfsql_dffi_{f}");
        // SAFETY: the peer defines each `udfsql_dffi_<f>` as `extern "C" fn() -> FFI_ScalarUDF`
        // with the `datafusion-ffi` major version checked in `library` (the same crate version,
        // from this workspace's lock file), the type given; the library stays mapped for the
        // rest of the process (a static), so the pointer stays valid.
        let make: UdfFn =
            unsafe { library.symbol(&symbol) }.unwrap_or_else(|e| panic!("{symbol}: {e}"));
        // `datafusion-ffi` 55: an `FFI_ScalarUDF` from another library becomes a
        // `ForeignScalarUDF` (one from this binary would be unwrapped to its inner impl).
        let udf: Arc<dyn ScalarUDFImpl> = make().into();
        let udf = ScalarUDF::new_from_shared_impl(udf);
        assert_eq!(udf.name(), format!("{f}_dffi"), "{symbol}'s name");
        ctx.register_udf(udf);
    }
}

/// `udfsql_dffi_agg_<f>`: a new `FFI_AggregateUDF`, owned by the caller.
type UdafFn = extern "C" fn() -> datafusion_ffi::udaf::FFI_AggregateUDF;

/// Registers the peer's aggregate `my_sum_dffi` in `ctx`.
pub fn register_aggregates(ctx: &SessionContext) {
    use datafusion::logical_expr::{AggregateUDF, AggregateUDFImpl};
    let library = library();
    // SAFETY: the peer defines `udfsql_dffi_agg_my_sum` as
    // `extern "C" fn() -> FFI_AggregateUDF` of this `datafusion-ffi` version (checked by
    // `library`); the library is never closed.
    let make: UdafFn = unsafe { library.symbol("udfsql_dffi_agg_my_sum") }
        .unwrap_or_else(|e| panic!("udfsql_dffi_agg_my_sum: {e}"));
    let ffi = make();
    let udaf: Arc<dyn AggregateUDFImpl> = (&ffi).into();
    let udaf = AggregateUDF::new_from_shared_impl(udaf);
    assert_eq!(udaf.name(), "my_sum_dffi");
    ctx.register_udaf(udaf);
}
