//! ABI v1 example plugin: str_len(String) -> UInt, the number of Unicode characters

udf_plugin_seed_kit::seed_plugin! {
    fn str_len(s: &str) -> Result<u64, String> {
        Ok(s.chars().count() as u64)
    }
}
