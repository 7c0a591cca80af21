//! ABI v1 example plugin: is_even(Int) -> Bool

udf_plugin_seed_kit::seed_plugin! {
    fn is_even(x: i64) -> Result<bool, String> {
        Ok(x % 2 == 0)
    }
}
