use udf_abi::{Date, Timestamp, udf};

#[udf]
fn scalars(a: bool, b: i32, c: i64, d: u64, e: f32, f: f64) -> f64 {
    let _ = (a, b, c, d, e);
    f
}

#[udf]
fn strings(a: &str, b: String, c: &[u8], d: Vec<u8>) -> String {
    format!("{a}{b}{}{}", c.len(), d.len())
}

#[udf(name = "dates", volatility = "stable")]
fn temporal(d: Date, t: Timestamp) -> Result<Option<Timestamp>, String> {
    let _ = d;
    Ok(Some(t))
}

#[udf(volatility = "volatile")]
fn nullable(a: Option<&str>, b: Option<i64>) -> Option<Vec<u8>> {
    let _ = b;
    a.map(|s| s.as_bytes().to_vec())
}

#[udf]
fn fallible(a: i64) -> Result<i64, std::fmt::Error> {
    Ok(a)
}

fn main() {}
