//! ABI v1 example plugin: square(Int) -> Int, wrapping on overflow like two's complement hardware

udf_plugin_seed_kit::seed_plugin! {
    fn square(x: i64) -> Result<i64, String> {
        Ok(x.wrapping_mul(x))
    }
}
