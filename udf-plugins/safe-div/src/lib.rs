//! ABI v2 example plugin: safe_div(Int, Int) -> Int, an error for division by zero or overflow

use udf_abi::udf;

#[udf]
fn safe_div(a: i64, b: i64) -> Result<i64, String> {
    if b == 0 {
        return Err(format!("division by zero: {a} / 0"));
    }
    a.checked_div(b)
        .ok_or_else(|| format!("integer overflow: {a} / {b}"))
}
