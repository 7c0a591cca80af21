//! ABI v2 example plugin: str_len(String) -> UInt, the number of Unicode characters

use udf_abi::udf;

#[udf]
fn str_len(s: &str) -> u64 {
    s.chars().count() as u64
}
