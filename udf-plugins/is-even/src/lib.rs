//! ABI v2 example plugin: is_even(Int) -> Bool

use udf_abi::udf;

#[udf]
fn is_even(x: i64) -> bool {
    x % 2 == 0
}
