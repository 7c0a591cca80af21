//! ABI v2 example plugin: square(Int) -> Int, wrapping on overflow like two's complement hardware

use udf_abi::udf;

#[udf]
fn square(x: i64) -> i64 {
    x.wrapping_mul(x)
}
