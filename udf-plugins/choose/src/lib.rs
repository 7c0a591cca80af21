//! ABI v1 example plugin: choose(Bool, String, String) -> String, the second argument when the first is true, else the third

udf_plugin_seed_kit::seed_plugin! {
    fn choose(cond: bool, if_true: &str, if_false: &str) -> Result<String, String> {
        Ok(if cond { if_true } else { if_false }.to_string())
    }
}
