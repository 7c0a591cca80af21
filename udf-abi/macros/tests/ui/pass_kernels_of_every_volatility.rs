//! The vectorised kernels are generated for every volatility (the declared one decides whether a
//! constant argument may be computed once).
use std::sync::atomic::{AtomicI64, Ordering};

use udf_abi::udf;

static CALLS: AtomicI64 = AtomicI64::new(0);

#[udf(volatility = "volatile")]
fn tick(x: i64) -> i64 {
    x + CALLS.fetch_add(1, Ordering::Relaxed)
}

#[udf(volatility = "stable")]
fn stable_sum(a: f64, b: f64) -> f64 {
    a + b
}

#[udf(volatility = "volatile")]
fn coin(x: i32) -> bool {
    (x as i64 + CALLS.fetch_add(1, Ordering::Relaxed)) % 2 == 0
}

#[udf(volatility = "immutable")]
fn twice(x: u64) -> u64 {
    x.wrapping_mul(2)
}

fn main() {}
