use std::fmt::Write;

use udf_abi::udf;

#[udf]
fn greet(name: &str, out: &mut String) {
    out.push_str("hello ");
    out.push_str(name);
}

#[udf]
fn unit(n: i64, out: &mut String) -> () {
    let _ = write!(out, "{n}");
}

#[udf(name = "checked_greet")]
fn fallible(name: Option<&str>, times: u64, out: &mut String) -> Result<(), String> {
    let name = name.ok_or("no name")?;
    for _ in 0..times {
        out.push_str(name);
    }
    Ok(())
}

#[udf]
fn nothing_in(out: &mut String) {
    out.push('x');
}

fn main() {}
