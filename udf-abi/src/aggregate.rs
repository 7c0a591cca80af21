//! Aggregate functions for Rust authors (ABI 2.4): a type implementing [`Aggregate`] is the
//! state of one group; `#[udaf]` on the `impl` exports it, and the SDK keeps one value per group
//! and runs DataFusion's grouped accumulator protocol over it (update, merge, evaluate, state,
//! emit of the first N groups, retract for sliding window frames).
//!
//! ```
//! use udf_abi::aggregate::Aggregate;
//! use udf_abi::udaf;
//!
//! /// The geometric mean of the positive values.
//! #[derive(Default)]
//! struct GeoMean {
//!     log_sum: f64,
//!     count: u64,
//! }
//!
//! #[udaf(name = "geo_mean")]
//! impl Aggregate for GeoMean {
//!     type Input = f64;
//!     type State = (f64, u64);
//!     type Output = Option<f64>;
//!
//!     fn update(&mut self, x: f64) {
//!         if x > 0.0 {
//!             self.log_sum += x.ln();
//!             self.count += 1;
//!         }
//!     }
//!     fn merge(&mut self, (log_sum, count): (f64, u64)) {
//!         self.log_sum += log_sum;
//!         self.count += count;
//!     }
//!     fn state(&self) -> (f64, u64) {
//!         (self.log_sum, self.count)
//!     }
//!     fn finish(&self) -> Option<f64> {
//!         (self.count > 0).then(|| (self.log_sum / self.count as f64).exp())
//!     }
//! }
//! ```
//!
//! **Expert form**: [`GroupsAggregate`] is the whole accumulator over Arrow columns (every group
//! at once, as DataFusion's own grouped accumulators are written): `#[udaf]` on an `impl
//! GroupsAggregate for Type` exports it the same way. Use it when a per-row call is too slow or
//! the state is better kept column-wise.
//!
//! Values map to Arrow as for `#[udf]`: `bool`, `i32`, `i64`, `u64`, `f32`, `f64`, `String`
//! (Utf8), `Vec<u8>` (Binary), `Vec<T>` (a List of `T`); `Option<T>` receives and gives NULLs.
//! An input of a type that is not an `Option` skips rows where it is NULL (as SQL's `sum`
//! does); a tuple `(A, B)` is a function of two arguments and `()` one of none.

use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, BooleanBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, GenericListArray, PrimitiveArray, StructArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Fields};

/// The state of one group of an aggregate function. `Default` is the empty group.
pub trait Aggregate: Default + Send + 'static {
    /// The arguments: one value, a tuple of values, or `()`.
    type Input: AggArgs;
    /// The partial state of a group, as it travels between partitions and machines: one value
    /// or a tuple (its fields become Arrow columns `s0`, `s1`, ...).
    type State: AggState;
    /// The result. An `Option` gives NULL (e.g. for a group without rows).
    type Output: AggValue;
    /// Whether [`retract`](Self::retract) is implemented: then the function runs in sliding
    /// window frames (`ROWS BETWEEN 2 PRECEDING AND CURRENT ROW`).
    const RETRACTS: bool = false;

    /// Adds one row.
    fn update(&mut self, input: Self::Input);
    /// Adds another group's partial state.
    fn merge(&mut self, state: Self::State);
    /// This group's partial state.
    fn state(&self) -> Self::State;
    /// This group's result.
    fn finish(&self) -> Self::Output;
    /// Removes one row an earlier [`update`](Self::update) added (set [`RETRACTS`](Self::RETRACTS)).
    fn retract(&mut self, input: Self::Input) {
        let _ = input;
        panic!("this aggregate function cannot remove rows (it does not implement retract)");
    }
    /// The heap bytes this group holds beyond `size_of::<Self>()` (a `Vec`'s capacity, say),
    /// for the host's memory accounting; 0 by default.
    fn heap_size(&self) -> usize {
        0
    }
}

/// A Rust type with an Arrow counterpart, read from and written to Arrow columns.
pub trait AggValue: Sized + 'static {
    /// A typed view of a column.
    type Column<'a>;
    /// The Arrow type.
    fn data_type() -> DataType;
    /// The typed view, or `None` when `array` is not of [`data_type`](Self::data_type).
    fn column(array: &dyn Array) -> Option<Self::Column<'_>>;
    /// The value at `row`; `None` for NULL (an `Option` type reads `Some(None)`).
    fn get(column: &Self::Column<'_>, row: usize) -> Option<Self>;
    /// A column of these values, NULL where `None`.
    fn build(values: Vec<Option<Self>>) -> ArrayRef;
}

macro_rules! primitive_value {
    ($($t:ty => $arrow:ty, $dt:expr;)*) => {$(
        impl AggValue for $t {
            type Column<'a> = &'a PrimitiveArray<$arrow>;
            fn data_type() -> DataType {
                $dt
            }
            fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
                array.as_primitive_opt::<$arrow>()
            }
            #[inline]
            fn get(column: &Self::Column<'_>, row: usize) -> Option<Self> {
                if column.is_null(row) {
                    None
                } else {
                    Some(column.value(row))
                }
            }
            fn build(values: Vec<Option<Self>>) -> ArrayRef {
                Arc::new(PrimitiveArray::<$arrow>::from(values))
            }
        }
    )*};
}

primitive_value! {
    i32 => Int32Type, DataType::Int32;
    i64 => Int64Type, DataType::Int64;
    u64 => UInt64Type, DataType::UInt64;
    f32 => Float32Type, DataType::Float32;
    f64 => Float64Type, DataType::Float64;
}

impl AggValue for bool {
    type Column<'a> = &'a arrow_array::BooleanArray;
    fn data_type() -> DataType {
        DataType::Boolean
    }
    fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
        array.as_boolean_opt()
    }
    fn get(column: &Self::Column<'_>, row: usize) -> Option<Self> {
        (!column.is_null(row)).then(|| column.value(row))
    }
    fn build(values: Vec<Option<Self>>) -> ArrayRef {
        let mut builder = BooleanBuilder::with_capacity(values.len());
        builder.extend(values);
        Arc::new(builder.finish())
    }
}

impl AggValue for String {
    type Column<'a> = &'a arrow_array::StringArray;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
        array.as_string_opt::<i32>()
    }
    fn get(column: &Self::Column<'_>, row: usize) -> Option<Self> {
        (!column.is_null(row)).then(|| column.value(row).to_string())
    }
    fn build(values: Vec<Option<Self>>) -> ArrayRef {
        let mut builder = StringBuilder::with_capacity(values.len(), 0);
        builder.extend(values);
        Arc::new(builder.finish())
    }
}

/// Binary values (`Vec<u8>` is Arrow `Binary`, not a list of bytes).
impl AggValue for Vec<u8> {
    type Column<'a> = &'a arrow_array::BinaryArray;
    fn data_type() -> DataType {
        DataType::Binary
    }
    fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
        array.as_binary_opt::<i32>()
    }
    fn get(column: &Self::Column<'_>, row: usize) -> Option<Self> {
        (!column.is_null(row)).then(|| column.value(row).to_vec())
    }
    fn build(values: Vec<Option<Self>>) -> ArrayRef {
        let mut builder = BinaryBuilder::with_capacity(values.len(), 0);
        builder.extend(values);
        Arc::new(builder.finish())
    }
}

/// A list: Arrow `List` of `T` (items nullable). NULL items are skipped when read into a
/// `Vec<T>`; read a `Vec<Option<T>>` to see them.
impl<T: AggValue + ListItem> AggValue for Vec<T> {
    type Column<'a> = (&'a GenericListArray<i32>, T::Column<'a>);
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", T::data_type(), true)))
    }
    fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
        let list = array.as_list_opt::<i32>()?;
        let items = T::column(list.values().as_ref())?;
        Some((list, items))
    }
    fn get((list, items): &Self::Column<'_>, row: usize) -> Option<Self> {
        if list.is_null(row) {
            return None;
        }
        let offsets = list.value_offsets();
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        Some((start..end).filter_map(|i| T::get(items, i)).collect())
    }
    fn build(values: Vec<Option<Self>>) -> ArrayRef {
        let nulls = NullBuffer::from_iter(values.iter().map(Option::is_some));
        let lengths: Vec<usize> = values
            .iter()
            .map(|v| v.as_ref().map_or(0, Vec::len))
            .collect();
        let items: Vec<Option<T>> = values.into_iter().flatten().flatten().map(Some).collect();
        let field = Arc::new(Field::new("item", T::data_type(), true));
        Arc::new(GenericListArray::<i32>::new(
            field,
            OffsetBuffer::from_lengths(lengths),
            T::build(items),
            (nulls.null_count() > 0).then_some(nulls),
        ))
    }
}

/// The item types of a `Vec<T>` list (every [`AggValue`] but `u8`, whose `Vec` is `Binary`).
pub trait ListItem {}
impl ListItem for bool {}
impl ListItem for i32 {}
impl ListItem for i64 {}
impl ListItem for u64 {}
impl ListItem for f32 {}
impl ListItem for f64 {}
impl ListItem for String {}
impl<T: AggValue> ListItem for Option<T> {}
impl<T> ListItem for Vec<T> where Vec<T>: AggValue {}

impl<T: AggValue> AggValue for Option<T> {
    type Column<'a> = T::Column<'a>;
    fn data_type() -> DataType {
        T::data_type()
    }
    fn column(array: &dyn Array) -> Option<Self::Column<'_>> {
        T::column(array)
    }
    #[inline]
    fn get(column: &Self::Column<'_>, row: usize) -> Option<Self> {
        Some(T::get(column, row))
    }
    fn build(values: Vec<Option<Self>>) -> ArrayRef {
        T::build(values.into_iter().map(Option::flatten).collect())
    }
}

/// The arguments of an aggregate function: one [`AggValue`], a tuple of them, or `()`.
pub trait AggArgs: Sized + 'static {
    /// Typed views of the columns.
    type Columns<'a>;
    /// The Arrow types, in order.
    fn data_types() -> Vec<DataType>;
    /// The typed views, or which column is not of its type.
    fn columns(arrays: &[ArrayRef]) -> Result<Self::Columns<'_>, String>;
    /// The row's values, or `None` when the row is skipped (a NULL where no `Option` takes it).
    fn get(columns: &Self::Columns<'_>, row: usize) -> Option<Self>;
}

fn typed<T: AggValue>(arrays: &[ArrayRef], i: usize) -> Result<T::Column<'_>, String> {
    let array = arrays
        .get(i)
        .ok_or_else(|| format!("expected {} columns, got {}", i + 1, arrays.len()))?;
    T::column(array.as_ref()).ok_or_else(|| {
        format!(
            "column {} is of type {}, {} expected",
            i + 1,
            array.data_type(),
            T::data_type()
        )
    })
}

impl<T: AggValue> AggArgs for T {
    type Columns<'a> = T::Column<'a>;
    fn data_types() -> Vec<DataType> {
        vec![T::data_type()]
    }
    fn columns(arrays: &[ArrayRef]) -> Result<Self::Columns<'_>, String> {
        typed::<T>(arrays, 0)
    }
    #[inline]
    fn get(columns: &Self::Columns<'_>, row: usize) -> Option<Self> {
        T::get(columns, row)
    }
}

impl AggArgs for () {
    type Columns<'a> = ();
    fn data_types() -> Vec<DataType> {
        Vec::new()
    }
    fn columns(_: &[ArrayRef]) -> Result<(), String> {
        Ok(())
    }
    fn get(_: &(), _: usize) -> Option<()> {
        Some(())
    }
}

macro_rules! tuple_args {
    ($(($($t:ident $i:tt),+))*) => {$(
        impl<$($t: AggValue),+> AggArgs for ($($t,)+) {
            type Columns<'a> = ($($t::Column<'a>,)+);
            fn data_types() -> Vec<DataType> {
                vec![$($t::data_type()),+]
            }
            fn columns(arrays: &[ArrayRef]) -> Result<Self::Columns<'_>, String> {
                Ok(($(typed::<$t>(arrays, $i)?,)+))
            }
            #[inline]
            fn get(columns: &Self::Columns<'_>, row: usize) -> Option<Self> {
                Some(($($t::get(&columns.$i, row)?,)+))
            }
        }

        impl<$($t: AggValue),+> AggState for ($($t,)+) {
            fn build(states: Vec<Self>) -> Vec<ArrayRef> {
                let mut columns = ($(Vec::<Option<$t>>::with_capacity(states.len()),)+);
                for state in states {
                    $(columns.$i.push(Some(state.$i));)+
                }
                vec![$($t::build(columns.$i)),+]
            }
        }
    )*};
}

/// The partial state of a group: one [`AggValue`] or a tuple of them.
pub trait AggState: AggArgs {
    /// The state columns of these states, in field order.
    fn build(states: Vec<Self>) -> Vec<ArrayRef>;
}

impl<T: AggValue> AggState for T {
    fn build(states: Vec<Self>) -> Vec<ArrayRef> {
        vec![T::build(states.into_iter().map(Some).collect())]
    }
}

tuple_args! {
    (A 0)
    (A 0, B 1)
    (A 0, B 1, C 2)
    (A 0, B 1, C 2, D 3)
    (A 0, B 1, C 2, D 3, E 4)
}

/// The state fields of `S`: `s0`, `s1`, ..., every one nullable.
pub fn state_fields<S: AggState>() -> Fields {
    S::data_types()
        .into_iter()
        .enumerate()
        .map(|(i, t)| Field::new(format!("s{i}"), t, true))
        .collect()
}

/// Which rows of a call count, and in which group.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The number of rows.
    pub len: usize,
    /// Each row's group, or `None`: every row is in group 0.
    pub groups: Option<&'a [usize]>,
    /// Per row 1 when it counts, or `None`: every row counts.
    pub filter: Option<&'a [u8]>,
    /// The number of groups after the call.
    pub total_groups: usize,
}

/// What an update does with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// [`Aggregate::update`].
    Update,
    /// [`Aggregate::retract`].
    Retract,
    /// [`Aggregate::merge`] (the columns are state fields).
    Merge,
}

/// Which groups an emit hands over, and whether they are dropped (ABI 2.4's `emit` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Every group, kept.
    Peek,
    /// Every group, dropped.
    TakeAll,
    /// The first N groups, dropped.
    TakeFirst(usize),
}

/// The expert form of an aggregate: one value of this type is a whole accumulator, holding the
/// state of every group, fed and emitted as Arrow columns (see the module documentation).
pub trait GroupsAggregate: Default + Send + 'static {
    /// The argument types.
    fn arg_types() -> Vec<DataType>;
    /// The state fields' types (named `s0`, `s1`, ...).
    fn state_types() -> Vec<DataType>;
    /// The result type.
    fn return_type() -> DataType;
    /// Whether [`retract`](Self::retract) is implemented (sliding window frames).
    const RETRACTS: bool = false;
    /// Adds rows: `columns` of [`arg_types`](Self::arg_types), `rows` says which rows count and
    /// in which groups (the number of groups only grows between emits).
    fn update(&mut self, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String>;
    /// Removes rows an earlier update added.
    fn retract(&mut self, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        let _ = (columns, rows);
        Err("this aggregate function cannot remove rows".to_string())
    }
    /// Adds partial states: `states` of [`state_types`](Self::state_types).
    fn merge(&mut self, states: &[ArrayRef], rows: Rows<'_>) -> Result<(), String>;
    /// The results of the groups `emit` covers (dropping them unless it peeks).
    fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String>;
    /// The partial states of the groups `emit` covers, one column per state field.
    fn state(&mut self, emit: Emit) -> Result<Vec<ArrayRef>, String>;
    /// The bytes the accumulator holds.
    fn size(&self) -> usize;
}

/// The number of groups an emit covers out of `groups`, or why it cannot.
pub fn emitted_groups(emit: Emit, groups: usize) -> Result<usize, String> {
    match emit {
        Emit::Peek | Emit::TakeAll => Ok(groups),
        Emit::TakeFirst(n) if n <= groups => Ok(n),
        Emit::TakeFirst(n) => Err(format!("cannot emit {n} of {groups} groups")),
    }
}

/// One accumulator as the entrypoints drive it: the SDK's [`Groups`] of a per-group
/// [`Aggregate`], or an expert [`GroupsAggregate`] (wrapped in [`Vectorized`]).
pub trait GroupedState: Default + Send + 'static {
    /// Whether rows can be removed.
    const RETRACTS: bool;
    /// The Arrow types: arguments, state fields, result.
    fn types() -> (Vec<DataType>, Vec<DataType>, DataType);
    /// Update, retract or merge.
    fn feed(&mut self, feed: Feed, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String>;
    /// Results.
    fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String>;
    /// Partial states, as a struct array of the state fields.
    fn state(&mut self, emit: Emit) -> Result<ArrayRef, String>;
    /// Bytes held.
    fn size(&self) -> usize;
}

impl<A: Aggregate> GroupedState for Groups<A> {
    const RETRACTS: bool = A::RETRACTS;
    fn types() -> (Vec<DataType>, Vec<DataType>, DataType) {
        (
            A::Input::data_types(),
            A::State::data_types(),
            <A::Output as AggValue>::data_type(),
        )
    }
    fn feed(&mut self, feed: Feed, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        Groups::feed(self, feed, columns, rows)
    }
    fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        Groups::evaluate(self, emit)
    }
    fn state(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        Groups::state(self, emit)
    }
    fn size(&self) -> usize {
        Groups::size(self)
    }
}

/// An expert [`GroupsAggregate`] as the entrypoints drive it: the checks every accumulator
/// gets (column counts and rows, emits within the groups), the state as a struct array.
#[derive(Debug, Default)]
pub struct Vectorized<G> {
    inner: G,
}

impl<G: GroupsAggregate> GroupedState for Vectorized<G> {
    const RETRACTS: bool = G::RETRACTS;
    fn types() -> (Vec<DataType>, Vec<DataType>, DataType) {
        (G::arg_types(), G::state_types(), G::return_type())
    }
    fn feed(&mut self, feed: Feed, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        let declared = match feed {
            Feed::Merge => G::state_types(),
            Feed::Update | Feed::Retract => G::arg_types(),
        };
        if columns.len() != declared.len() {
            return Err(format!(
                "expected {} columns, got {}",
                declared.len(),
                columns.len()
            ));
        }
        for (i, (c, t)) in columns.iter().zip(&declared).enumerate() {
            if c.data_type() != t || c.len() < rows.len {
                return Err(format!(
                    "column {} is {} of {} rows, {t} of {} expected",
                    i + 1,
                    c.data_type(),
                    c.len(),
                    rows.len
                ));
            }
        }
        if rows
            .groups
            .is_some_and(|g| g.len() < rows.len || g.iter().any(|&i| i >= rows.total_groups))
            || rows.filter.is_some_and(|f| f.len() < rows.len)
        {
            return Err("group numbers or filter flags that do not fit the rows".to_string());
        }
        match feed {
            Feed::Update => self.inner.update(columns, rows),
            Feed::Retract => self.inner.retract(columns, rows),
            Feed::Merge => self.inner.merge(columns, rows),
        }
    }
    fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        self.inner.evaluate(emit)
    }
    fn state(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        let columns = self.inner.state(emit)?;
        let len = columns.first().map_or(0, |c| c.len());
        let fields: Fields = G::state_types()
            .into_iter()
            .enumerate()
            .map(|(i, t)| Field::new(format!("s{i}"), t, true))
            .collect();
        StructArray::try_new_with_length(fields, columns, None, len)
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| format!("cannot build the state: {e}"))
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// One accumulator: the state of every group, and the bytes their heaps hold.
#[derive(Debug)]
pub struct Groups<A: Aggregate> {
    groups: Vec<A>,
    heap: usize,
}

impl<A: Aggregate> Default for Groups<A> {
    fn default() -> Self {
        Groups {
            groups: Vec::new(),
            heap: 0,
        }
    }
}

impl<A: Aggregate> Groups<A> {
    /// Feeds the rows of `columns` (arguments, or state fields for [`Feed::Merge`]).
    pub fn feed(&mut self, feed: Feed, columns: &[ArrayRef], rows: Rows<'_>) -> Result<(), String> {
        for (i, c) in columns.iter().enumerate() {
            if c.len() < rows.len {
                return Err(format!(
                    "column {} has {} rows, {} expected",
                    i + 1,
                    c.len(),
                    rows.len
                ));
            }
        }
        if rows.groups.is_some_and(|g| g.len() < rows.len)
            || rows.filter.is_some_and(|f| f.len() < rows.len)
        {
            return Err("fewer group numbers or filter flags than rows".to_string());
        }
        if rows.total_groups > self.groups.len() {
            self.groups.resize_with(rows.total_groups, A::default);
        }
        match feed {
            Feed::Update => self.rows::<A::Input>(columns, rows, A::update),
            Feed::Retract => self.rows::<A::Input>(columns, rows, A::retract),
            Feed::Merge => self.rows::<A::State>(columns, rows, A::merge),
        }
    }

    #[inline]
    fn rows<I: AggArgs>(
        &mut self,
        columns: &[ArrayRef],
        rows: Rows<'_>,
        apply: impl Fn(&mut A, I),
    ) -> Result<(), String> {
        let typed = I::columns(columns)?;
        let count = self.groups.len();
        for row in 0..rows.len {
            if rows.filter.is_some_and(|f| f[row] == 0) {
                continue;
            }
            let group = rows.groups.map_or(0, |g| g[row]);
            let Some(state) = self.groups.get_mut(group) else {
                return Err(format!("group {group} of row {row} is not below {count}"));
            };
            let Some(input) = I::get(&typed, row) else {
                continue;
            };
            let before = state.heap_size();
            apply(state, input);
            self.heap = (self.heap + state.heap_size()).saturating_sub(before);
        }
        Ok(())
    }

    /// The groups an emit covers, taken out of the accumulator unless it peeks.
    fn emitted<R>(&mut self, emit: Emit, each: impl Fn(&A) -> R) -> Result<Vec<R>, String> {
        let n = match emit {
            Emit::Peek => return Ok(self.groups.iter().map(each).collect()),
            Emit::TakeAll => self.groups.len(),
            Emit::TakeFirst(n) if n <= self.groups.len() => n,
            Emit::TakeFirst(n) => {
                return Err(format!("cannot emit {n} of {} groups", self.groups.len()));
            }
        };
        let taken: Vec<A> = self.groups.drain(..n).collect();
        let freed: usize = taken.iter().map(A::heap_size).sum();
        self.heap = self.heap.saturating_sub(freed);
        Ok(taken.iter().map(each).collect())
    }

    /// The results of the groups `emit` covers.
    pub fn evaluate(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        let values = self.emitted(emit, |a| Some(a.finish()))?;
        Ok(<A::Output as AggValue>::build(values))
    }

    /// The partial states of the groups `emit` covers, as a struct array of the state fields.
    pub fn state(&mut self, emit: Emit) -> Result<ArrayRef, String> {
        let states = self.emitted(emit, A::state)?;
        let len = states.len();
        let columns = A::State::build(states);
        let fields = state_fields::<A::State>();
        StructArray::try_new_with_length(fields, columns, None, len)
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| format!("cannot build the state: {e}"))
    }

    /// The bytes this accumulator holds.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.groups.capacity() * std::mem::size_of::<A>() + self.heap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Sum(i64);

    impl Aggregate for Sum {
        type Input = i64;
        type State = i64;
        type Output = i64;
        const RETRACTS: bool = true;
        fn update(&mut self, x: i64) {
            self.0 += x;
        }
        fn retract(&mut self, x: i64) {
            self.0 -= x;
        }
        fn merge(&mut self, s: i64) {
            self.0 += s;
        }
        fn state(&self) -> i64 {
            self.0
        }
        fn finish(&self) -> i64 {
            self.0
        }
    }

    #[test]
    fn groups_update_merge_and_emit_the_first_n() {
        let mut acc = Groups::<Sum>::default();
        let values: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![
            Some(1),
            None,
            Some(3),
            Some(4),
        ]));
        let rows = Rows {
            len: 4,
            groups: Some(&[0, 1, 1, 2]),
            filter: Some(&[1, 1, 1, 0]),
            total_groups: 3,
        };
        acc.feed(Feed::Update, &[values], rows).unwrap();
        let state = acc.state(Emit::Peek).unwrap();
        let state = state
            .as_struct()
            .column(0)
            .as_primitive::<Int64Type>()
            .clone();
        assert_eq!(state.values().to_vec(), vec![1, 3, 0]);
        let mut other = Groups::<Sum>::default();
        let merged: ArrayRef = Arc::new(state);
        other
            .feed(
                Feed::Merge,
                &[merged],
                Rows {
                    len: 3,
                    groups: Some(&[1, 1, 0]),
                    filter: None,
                    total_groups: 2,
                },
            )
            .unwrap();
        let first = other.evaluate(Emit::TakeFirst(1)).unwrap();
        assert_eq!(first.as_primitive::<Int64Type>().values().to_vec(), vec![0]);
        let rest = other.evaluate(Emit::TakeAll).unwrap();
        assert_eq!(rest.as_primitive::<Int64Type>().values().to_vec(), vec![4]);
        assert!(other.evaluate(Emit::TakeFirst(1)).is_err());
        let bad = Rows {
            len: 1,
            groups: Some(&[7]),
            filter: None,
            total_groups: 1,
        };
        let one: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1]));
        assert!(
            acc.feed(Feed::Update, &[one], bad)
                .unwrap_err()
                .contains("group 7")
        );
    }

    #[test]
    fn lists_and_options_round_trip() {
        let values = vec![Some(vec![1.5, 2.5]), None, Some(vec![])];
        let array = <Vec<f64> as AggValue>::build(values.clone());
        let column = <Vec<f64> as AggValue>::column(array.as_ref()).unwrap();
        let back: Vec<Option<Vec<f64>>> = (0..3)
            .map(|i| <Vec<f64> as AggValue>::get(&column, i))
            .collect();
        assert_eq!(back, values);
        let array = <Option<String> as AggValue>::build(vec![Some(Some("a".into())), Some(None)]);
        assert_eq!(array.null_count(), 1);
        assert_eq!(
            <(i64, Option<f64>)>::data_types(),
            vec![DataType::Int64, DataType::Float64]
        );
    }
}
