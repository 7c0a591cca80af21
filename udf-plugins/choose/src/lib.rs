//! ABI v2 example plugin: choose(Bool, String, String) -> String, the second argument when the first is true, else the third

use udf_abi::udf;

#[udf]
fn choose(cond: bool, if_true: &str, if_false: &str) -> String {
    if cond { if_true } else { if_false }.to_string()
}
