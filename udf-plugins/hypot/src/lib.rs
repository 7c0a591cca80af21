//! ABI v2 example plugin: hypot(Double, Double) -> Double, the Euclidean norm sqrt(a*a + b*b)

use udf_abi::udf;

#[udf]
fn hypot(a: f64, b: f64) -> f64 {
    a.hypot(b)
}
