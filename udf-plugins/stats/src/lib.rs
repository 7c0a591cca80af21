//! Aggregate functions written with `#[udaf]`, the way an ordinary author writes them: a struct
//! that is one group's state, and the five methods of [`Aggregate`].
//!
//! * `my_sum(BIGINT) -> BIGINT`: the sum, NULL for no rows; the twin of the builtin `sum` in the
//!   benchmarks, and usable in sliding window frames (it retracts).
//! * `geo_mean(DOUBLE) -> DOUBLE`: the geometric mean of the positive values.
//! * `median_exact(DOUBLE) -> DOUBLE`: the exact median; the state is the list of values.
//! * `hll_count(VARCHAR) -> BIGINT`: the number of distinct values, estimated by HyperLogLog
//!   with 4096 registers (a standard error of about 1.6%); the state is the registers.

use udf_abi::aggregate::Aggregate;
use udf_abi::udaf;

/// The sum of the non-NULL values.
#[derive(Default)]
struct MySum {
    sum: i64,
    rows: u64,
}

#[udaf(name = "my_sum")]
impl Aggregate for MySum {
    type Input = i64;
    type State = Option<i64>;
    type Output = Option<i64>;
    const RETRACTS: bool = true;

    fn update(&mut self, x: i64) {
        self.sum = self.sum.wrapping_add(x);
        self.rows += 1;
    }
    fn retract(&mut self, x: i64) {
        self.sum = self.sum.wrapping_sub(x);
        self.rows -= 1;
    }
    fn merge(&mut self, state: Option<i64>) {
        if let Some(sum) = state {
            self.sum = self.sum.wrapping_add(sum);
            self.rows += 1;
        }
    }
    fn state(&self) -> Option<i64> {
        (self.rows > 0).then_some(self.sum)
    }
    fn finish(&self) -> Option<i64> {
        self.state()
    }
}

/// The geometric mean of the positive values (others are skipped).
#[derive(Default)]
struct GeoMean {
    log_sum: f64,
    count: u64,
}

#[udaf]
impl Aggregate for GeoMean {
    type Input = f64;
    type State = (f64, u64);
    type Output = Option<f64>;

    fn update(&mut self, x: f64) {
        if x > 0.0 {
            self.log_sum += x.ln();
            self.count += 1;
        }
    }
    fn merge(&mut self, (log_sum, count): (f64, u64)) {
        self.log_sum += log_sum;
        self.count += count;
    }
    fn state(&self) -> (f64, u64) {
        (self.log_sum, self.count)
    }
    fn finish(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.log_sum / self.count as f64).exp())
    }
}

/// The exact median: every value is kept.
#[derive(Default)]
struct MedianExact {
    values: Vec<f64>,
}

#[udaf]
impl Aggregate for MedianExact {
    type Input = f64;
    type State = Vec<f64>;
    type Output = Option<f64>;

    fn update(&mut self, x: f64) {
        self.values.push(x);
    }
    fn merge(&mut self, values: Vec<f64>) {
        self.values.extend(values);
    }
    fn state(&self) -> Vec<f64> {
        self.values.clone()
    }
    fn finish(&self) -> Option<f64> {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(sorted[n / 2]),
            _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
        }
    }
    fn heap_size(&self) -> usize {
        self.values.capacity() * std::mem::size_of::<f64>()
    }
}

/// log2 of the number of HyperLogLog registers.
const PRECISION: u32 = 12;
/// The number of registers.
const REGISTERS: usize = 1 << PRECISION;

/// HyperLogLog over the values' bytes: registers allocated at the first value.
#[derive(Default)]
struct HllCount {
    registers: Vec<u8>,
}

/// A 64-bit hash of `bytes` (8 bytes at a time, then murmur3's finaliser).
fn hash(bytes: &[u8]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3_u64 ^ (bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        h = (h ^ word)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(31);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

impl HllCount {
    fn registers(&mut self) -> &mut [u8] {
        if self.registers.is_empty() {
            self.registers = vec![0; REGISTERS];
        }
        &mut self.registers
    }
}

#[udaf]
impl Aggregate for HllCount {
    type Input = String;
    type State = Vec<u8>;
    type Output = i64;

    fn update(&mut self, value: String) {
        let h = hash(value.as_bytes());
        let index = (h >> (64 - PRECISION)) as usize;
        let rank = ((h << PRECISION) | (1 << (PRECISION - 1))).leading_zeros() as u8 + 1;
        let register = &mut self.registers()[index];
        *register = (*register).max(rank);
    }
    fn merge(&mut self, other: Vec<u8>) {
        if other.len() != REGISTERS {
            // An empty group's state (no registers yet) adds nothing.
            return;
        }
        for (mine, theirs) in self.registers().iter_mut().zip(other) {
            *mine = (*mine).max(theirs);
        }
    }
    fn state(&self) -> Vec<u8> {
        self.registers.clone()
    }
    fn finish(&self) -> i64 {
        if self.registers.is_empty() {
            return 0;
        }
        let m = REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let sum: f64 = self
            .registers
            .iter()
            .map(|&r| 2f64.powi(-i32::from(r)))
            .sum();
        let estimate = alpha * m * m / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        let estimate = if estimate <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            estimate
        };
        estimate.round() as i64
    }
    fn heap_size(&self) -> usize {
        self.registers.capacity()
    }
}
