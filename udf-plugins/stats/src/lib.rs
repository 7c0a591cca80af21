//! Aggregate functions written with `#[udaf]`, the way an ordinary author writes them: a struct
//! that is one group's state, and the five methods of [`Aggregate`].
//!
//! * `my_sum(BIGINT) -> BIGINT`: the sum, NULL for no rows; the twin of the builtin `sum` in the
//!   benchmarks, and usable in sliding window frames (it retracts).
//! * `geo_mean(DOUBLE) -> DOUBLE`: the geometric mean of the positive values.
//! * `median_exact(DOUBLE) -> DOUBLE`: the exact median; the state is the list of values.
//! * `hll_count(VARCHAR) -> BIGINT`: the number of distinct values, estimated by HyperLogLog
//!   with 4096 registers (a standard error of about 1.6%); the state is the registers.
//! * `my_sum_vec(BIGINT) -> BIGINT`: `my_sum` in the expert form ([`GroupsAggregate`]): the sums
//!   and row counts of every group in two vectors, updated a column at a time.

use std::sync::Arc;

use udf_abi::aggregate::{Aggregate, Emit, GroupsAggregate, Rows, emitted_groups};
use udf_abi::arrow_array::cast::AsArray;
use udf_abi::arrow_array::types::Int64Type;
use udf_abi::arrow_array::{Array, ArrayRef, Int64Array, UInt64Array};
use udf_abi::arrow_schema::DataType;
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

/// `my_sum` written in the expert form: every group's sum and row count in two vectors.
#[derive(Default)]
struct MySumVec {
    sums: Vec<i64>,
    rows: Vec<u64>,
}

impl MySumVec {
    /// Adds (`sign` 1) or removes (-1) the values of `column` per `rows`; `counts` are the rows
    /// each value stands for (a merge's partial states), or one each.
    fn add(
        &mut self,
        column: &ArrayRef,
        counts: Option<&ArrayRef>,
        rows: Rows<'_>,
        sign: i64,
    ) -> Result<(), String> {
        if self.sums.len() < rows.total_groups {
            self.sums.resize(rows.total_groups, 0);
            self.rows.resize(rows.total_groups, 0);
        }
        let values = column
            .as_primitive_opt::<Int64Type>()
            .ok_or("a BIGINT column expected")?;
        let counts = match counts {
            Some(c) => Some(
                c.as_primitive_opt::<udf_abi::arrow_array::types::UInt64Type>()
                    .ok_or("a row count column expected")?,
            ),
            None => None,
        };
        let raw = values.values();
        for row in 0..rows.len {
            if values.is_null(row) || rows.filter.is_some_and(|f| f[row] == 0) {
                continue;
            }
            let g = rows.groups.map_or(0, |g| g[row]);
            self.sums[g] = self.sums[g].wrapping_add(sign.wrapping_mul(raw[row]));
            let n = counts.map_or(1, |c| c.value(row));
            self.rows[g] = if sign > 0 {
                self.rows[g] + n
            } else {
                self.rows[g] - n
            };
        }
        Ok(())
    }

    /// The first `n` groups' sums (NULL without rows) and row counts, dropped unless peeking.
    fn take(&mut self, emit: Emit) -> Result<(Int64Array, UInt64Array), String> {
        let n = emitted_groups(emit, self.sums.len())?;
        let sums: Int64Array = self.sums[..n]
            .iter()
            .zip(&self.rows[..n])
            .map(|(&s, &r)| (r > 0).then_some(s))
            .collect();
        let rows = UInt64Array::from(self.rows[..n].to_vec());
        if emit != Emit::Peek {
            self.sums.drain(..n);
            self.rows.drain(..n);
        }
        Ok((sums, rows))
    }
}

#[udaf(name = "my_sum_vec")]
impl GroupsAggregate for MySumVec {
    fn arg_types() -> Vec<DataType> {
        vec![DataType::Int64]
    }
    fn state_types() -> Vec<DataType> {
        vec![DataType::Int64, DataType::UInt64]
    }
    fn return_type() -> DataType {
        DataType::Int64
    }
    const RETRACTS: bool = true;

    fn update(&mut self, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        self.add(&columns[0], None, rows, 1)
    }
    fn retract(&mut self, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        self.add(&columns[0], None, rows, -1)
    }
    fn merge(&mut self, states: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        self.add(&states[0], Some(&states[1]), rows, 1)
    }
    fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        Ok(Arc::new(self.take(emit)?.0))
    }
    fn state(&mut self, emit: Emit) -> Result<Vec<ArrayRef>, String> {
        let (sums, rows) = self.take(emit)?;
        Ok(vec![Arc::new(sums), Arc::new(rows)])
    }
    fn size(&self) -> usize {
        (self.sums.capacity() + self.rows.capacity()) * 8
    }
}
