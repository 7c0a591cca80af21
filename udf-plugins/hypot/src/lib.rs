//! ABI v1 example plugin: hypot(Double, Double) -> Double, the Euclidean norm sqrt(a*a + b*b)

udf_plugin_seed_kit::seed_plugin! {
    fn hypot(a: f64, b: f64) -> Result<f64, String> {
        Ok(a.hypot(b))
    }
}
