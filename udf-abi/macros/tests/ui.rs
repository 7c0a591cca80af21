//! Compile-time errors of `#[udf]`: each case in `ui/fail_*.rs` must fail with the error in the
//! `.stderr` file beside it (a `syn::Error` pointing at the problem), and `ui/pass_*.rs` must
//! compile. Regenerate the expected output with `TRYBUILD=overwrite` after a deliberate change.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
