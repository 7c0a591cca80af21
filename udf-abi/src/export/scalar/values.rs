//! The runtime of row-by-row `#[udf]` functions with Arrow types (ABI 2.2): each Rust type says
//! its Arrow type ([`ArrowType`]), how to read one row of an argument column ([`ArrowArg`]) and how
//! to build a result column ([`ArrowResult`]). The generated batch entrypoint reads each row,
//! skips rows where an argument that is not an `Option` is NULL (the STRICT rule, as everywhere),
//! calls the function and builds the column (see `call_vectorized`).
//!
//! NULLs at every level: `Option<T>` takes them; a NULL list element, struct field or list where
//! the Rust type has no `Option` is an error naming it (never a silent default).

use std::fmt::Display;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Date32Type, Decimal128Type, DurationMicrosecondType,
    DurationMillisecondType, DurationNanosecondType, DurationSecondType, Float32Type, Float64Type,
    Int8Type, Int16Type, Int32Type, Int64Type, IntervalMonthDayNanoType, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, GenericListArray, OffsetSizeTrait, PrimitiveArray,
    StringArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, IntervalUnit, TimeUnit};

use crate::types::{
    Decimal, DurationMicrosecond, DurationMillisecond, DurationNanosecond, DurationSecond,
    IntervalMonthDayNano, LargeList, TimeZone, TimestampMicrosecond, TimestampMillisecond,
    TimestampNanosecond, TimestampSecond,
};
use crate::v2::{Date, Timestamp};

/// A Rust type's Arrow type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a type a #[udf] function can take or return",
    label = "unsupported type",
    note = "supported: bool, i8..i64, u8..u64, f32, f64, &str, String, &[u8], Vec<u8>, \
            udf_abi::Date, udf_abi::Timestamp, the types of udf_abi::types (Decimal<P, S>, \
            timestamps, durations, intervals, LargeList<T>), Vec<T> lists, \
            #[derive(UdfStruct)] structs, and Option<T> of these"
)]
pub trait ArrowType {
    /// The Arrow type of a column of values of this type.
    fn data_type() -> DataType;
    /// Whether the type takes NULL (`Option<T>`).
    const NULLABLE: bool = false;
    /// How many lists and structs nest in the type (0 for a primitive): at most
    /// [`MAX_DEPTH`](crate::type_string::MAX_DEPTH), checked at compile time by `#[udf]` and
    /// `#[derive(UdfStruct)]`. A type that contains itself has no depth: the compiler reports
    /// the cycle in evaluating it.
    const DEPTH: usize = 0;
}

/// The largest of `depths` (for `#[derive(UdfStruct)]`'s [`ArrowType::DEPTH`]).
pub const fn deepest(depths: &[usize]) -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < depths.len() {
        if depths[i] > max {
            max = depths[i];
        }
        i += 1;
    }
    max
}

thread_local! {
    /// How many `#[derive(UdfStruct)]` types are being described on this thread, nested.
    static DESCRIBING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Why the types being described cannot be (the first problem found).
    static UNDESCRIBABLE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Support for `#[derive(UdfStruct)]`: the struct type of the Rust type `name`, from `fields`,
/// with a bound on nesting that holds at run time too (a hand-written [`ArrowType`] can lead
/// back into a struct the compiler's check did not see through): past
/// [`MAX_DEPTH`](crate::type_string::MAX_DEPTH) levels the fields are not described, the
/// problem is recorded for [`declared`] and `DataType::Null` stands in.
pub fn struct_type_of(
    name: &'static str,
    fields: impl FnOnce() -> Vec<(&'static str, DataType)>,
) -> DataType {
    let depth = DESCRIBING.with(|d| d.get());
    if depth >= crate::type_string::MAX_DEPTH {
        UNDESCRIBABLE.with(|u| {
            u.borrow_mut().get_or_insert_with(|| {
                format!(
                    "the Rust type `{name}` nests more than {} levels deep (does it contain \
                     itself?)",
                    crate::type_string::MAX_DEPTH
                )
            });
        });
        return DataType::Null;
    }
    DESCRIBING.with(|d| d.set(depth + 1));
    let t = struct_type(fields());
    DESCRIBING.with(|d| d.set(depth));
    t
}

/// The declared types of a row-by-row `#[udf]` function with Arrow types, described by
/// `describe` (its argument and result types' [`ArrowType::data_type`]), or why they cannot be.
pub fn declared(
    describe: impl FnOnce() -> (Vec<DataType>, DataType),
) -> super::arrow::DeclaredTypes {
    UNDESCRIBABLE.with(|u| u.borrow_mut().take());
    let described = describe();
    match UNDESCRIBABLE.with(|u| u.borrow_mut().take()) {
        Some(problem) => Err(problem),
        None => Ok(described),
    }
}

/// A Rust type read from one row of an argument column (of exactly its Arrow type).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a type a #[udf] function can take",
    label = "unsupported argument type"
)]
pub trait ArrowArg<'a>: ArrowType + Sized {
    /// Row `row`: `Ok(None)` for a NULL (an `Option<T>` reads it as `Ok(Some(None))`).
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String>;
}

/// A Rust type whose values make a result column.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a type a #[udf] function can return",
    label = "unsupported result type"
)]
pub trait ArrowResult: ArrowType + Sized {
    /// The column of `values` (`None`: a NULL row).
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String>;
}

/// What a function returns: a value, or `Result<value, E: Display>`.
pub trait IntoArrowRow {
    /// The value type.
    type Value: ArrowResult;
    /// The value, or the error's message.
    fn into_row(self) -> Result<Self::Value, String>;
}

impl<T: ArrowResult> IntoArrowRow for T {
    type Value = T;
    fn into_row(self) -> Result<T, String> {
        Ok(self)
    }
}

impl<T: ArrowResult, E: Display> IntoArrowRow for Result<T, E> {
    type Value = T;
    fn into_row(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Types that may be list elements: every type except `u8` (a `Vec<u8>` is SQL binary; a list of
/// `TINYINT UNSIGNED` is `Vec<Option<u8>>`).
pub trait ListElement {}

fn wrong_type(array: &ArrayRef, wanted: &DataType) -> String {
    format!(
        "expected an array of type {wanted}, got {}",
        array.data_type()
    )
}

/// The row of a primitive column.
fn primitive<T: ArrowPrimitiveType>(
    array: &ArrayRef,
    row: usize,
    data_type: impl FnOnce() -> DataType,
) -> Result<Option<T::Native>, String> {
    let a = array
        .as_primitive_opt::<T>()
        .ok_or_else(|| wrong_type(array, &data_type()))?;
    Ok(a.is_valid(row).then(|| a.value(row)))
}

macro_rules! primitives {
    ($($rust:ty => $arrow:ty, $data_type:expr, |$v:ident| $to:expr, |$n:ident| $from:expr;)*) => {$(
        impl ArrowType for $rust {
            fn data_type() -> DataType {
                $data_type
            }
        }

        impl<'a> ArrowArg<'a> for $rust {
            fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
                Ok(primitive::<$arrow>(array, row, <$rust as ArrowType>::data_type)?
                    .map(|$n| $from))
            }
        }

        impl ArrowResult for $rust {
            fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
                let array: PrimitiveArray<$arrow> =
                    values.into_iter().map(|v| v.map(|$v| $to)).collect();
                let array = array.with_data_type(<$rust as ArrowType>::data_type());
                Ok(Arc::new(array))
            }
        }
    )*};
}

primitives! {
    i8 => Int8Type, DataType::Int8, |v| v, |n| n;
    i16 => Int16Type, DataType::Int16, |v| v, |n| n;
    i32 => Int32Type, DataType::Int32, |v| v, |n| n;
    i64 => Int64Type, DataType::Int64, |v| v, |n| n;
    u8 => UInt8Type, DataType::UInt8, |v| v, |n| n;
    u16 => UInt16Type, DataType::UInt16, |v| v, |n| n;
    u32 => UInt32Type, DataType::UInt32, |v| v, |n| n;
    u64 => UInt64Type, DataType::UInt64, |v| v, |n| n;
    f32 => Float32Type, DataType::Float32, |v| v, |n| n;
    f64 => Float64Type, DataType::Float64, |v| v, |n| n;
    Date => Date32Type, DataType::Date32, |v| v.days_since_epoch, |n| Date { days_since_epoch: n };
    Timestamp => TimestampMicrosecondType,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        |v| v.micros_since_epoch, |n| Timestamp { micros_since_epoch: n };
    DurationSecond => DurationSecondType, DataType::Duration(TimeUnit::Second), |v| v.0, |n| DurationSecond(n);
    DurationMillisecond => DurationMillisecondType, DataType::Duration(TimeUnit::Millisecond), |v| v.0, |n| DurationMillisecond(n);
    DurationMicrosecond => DurationMicrosecondType, DataType::Duration(TimeUnit::Microsecond), |v| v.0, |n| DurationMicrosecond(n);
    DurationNanosecond => DurationNanosecondType, DataType::Duration(TimeUnit::Nanosecond), |v| v.0, |n| DurationNanosecond(n);
    IntervalMonthDayNano => IntervalMonthDayNanoType, DataType::Interval(IntervalUnit::MonthDayNano), |v| v, |n| n;
}

macro_rules! timestamps {
    ($($rust:ident => $arrow:ty, $unit:expr;)*) => {$(
        impl<Z: TimeZone> ArrowType for $rust<Z> {
            fn data_type() -> DataType {
                DataType::Timestamp($unit, Z::NAME.map(Into::into))
            }
        }

        impl<'a, Z: TimeZone> ArrowArg<'a> for $rust<Z> {
            fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
                Ok(primitive::<$arrow>(array, row, <Self as ArrowType>::data_type)?
                    .map($rust::new))
            }
        }

        impl<Z: TimeZone> ArrowResult for $rust<Z> {
            fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
                let array: PrimitiveArray<$arrow> =
                    values.into_iter().map(|v| v.map(|v| v.0)).collect();
                Ok(Arc::new(array.with_timezone_opt(Z::NAME)))
            }
        }

        impl<Z: TimeZone> ListElement for $rust<Z> {}
    )*};
}

timestamps! {
    TimestampSecond => TimestampSecondType, TimeUnit::Second;
    TimestampMillisecond => TimestampMillisecondType, TimeUnit::Millisecond;
    TimestampMicrosecond => TimestampMicrosecondType, TimeUnit::Microsecond;
    TimestampNanosecond => TimestampNanosecondType, TimeUnit::Nanosecond;
}

macro_rules! list_elements {
    ($($t:ty),*) => {$(impl ListElement for $t {})*};
}

list_elements!(
    i8,
    i16,
    i32,
    i64,
    u16,
    u32,
    u64,
    f32,
    f64,
    bool,
    String,
    Date,
    Timestamp,
    DurationSecond,
    DurationMillisecond,
    DurationMicrosecond,
    DurationNanosecond,
    IntervalMonthDayNano,
    &str,
    &[u8]
);
impl<T> ListElement for Option<T> {}
impl<T> ListElement for Vec<T> {}
impl<T> ListElement for LargeList<T> {}
impl<const P: u8, const S: i8> ListElement for Decimal<P, S> {}

impl<const P: u8, const S: i8> ArrowType for Decimal<P, S> {
    fn data_type() -> DataType {
        DataType::Decimal128(P, S)
    }
}

impl<'a, const P: u8, const S: i8> ArrowArg<'a> for Decimal<P, S> {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        Ok(primitive::<Decimal128Type>(array, row, Self::data_type)?.map(Decimal))
    }
}

impl<const P: u8, const S: i8> ArrowResult for Decimal<P, S> {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        if let Some((row, v)) = values.iter().enumerate().find_map(|(i, v)| {
            v.filter(|v| !(-Self::MAX..=Self::MAX).contains(&v.0))
                .map(|v| (i, v))
        }) {
            return Err(format!(
                "row {row}: {} (unscaled) has more than the {P} digits of DECIMAL({P},{S})",
                v.0
            ));
        }
        let array: PrimitiveArray<Decimal128Type> =
            values.into_iter().map(|v| v.map(|v| v.0)).collect();
        array
            .with_precision_and_scale(P, S)
            .map(|a| Arc::new(a) as ArrayRef)
            .map_err(|e| e.to_string())
    }
}

impl ArrowType for bool {
    fn data_type() -> DataType {
        DataType::Boolean
    }
}

impl<'a> ArrowArg<'a> for bool {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        let a = array
            .as_boolean_opt()
            .ok_or_else(|| wrong_type(array, &DataType::Boolean))?;
        Ok(a.is_valid(row).then(|| a.value(row)))
    }
}

impl ArrowResult for bool {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        Ok(Arc::new(BooleanArray::from(values)))
    }
}

impl ArrowType for String {
    fn data_type() -> DataType {
        DataType::Utf8
    }
}

impl ArrowType for &str {
    fn data_type() -> DataType {
        DataType::Utf8
    }
}

impl<'a> ArrowArg<'a> for &'a str {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        let a = array
            .as_string_opt::<i32>()
            .ok_or_else(|| wrong_type(array, &DataType::Utf8))?;
        Ok(a.is_valid(row).then(|| a.value(row)))
    }
}

impl<'a> ArrowArg<'a> for String {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        Ok(<&str as ArrowArg>::read(array, row)?.map(str::to_string))
    }
}

impl ArrowResult for String {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        Ok(Arc::new(StringArray::from(values)))
    }
}

impl ArrowType for Vec<u8> {
    fn data_type() -> DataType {
        DataType::Binary
    }
}

impl ArrowType for &[u8] {
    fn data_type() -> DataType {
        DataType::Binary
    }
}

impl<'a> ArrowArg<'a> for &'a [u8] {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        let a = array
            .as_binary_opt::<i32>()
            .ok_or_else(|| wrong_type(array, &DataType::Binary))?;
        Ok(a.is_valid(row).then(|| a.value(row)))
    }
}

impl<'a> ArrowArg<'a> for Vec<u8> {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        Ok(<&[u8] as ArrowArg>::read(array, row)?.map(<[u8]>::to_vec))
    }
}

impl ArrowResult for Vec<u8> {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        Ok(Arc::new(BinaryArray::from_iter(values)))
    }
}

impl<T: ArrowType> ArrowType for Option<T> {
    fn data_type() -> DataType {
        T::data_type()
    }
    const NULLABLE: bool = true;
    const DEPTH: usize = T::DEPTH;
}

impl<'a, T: ArrowArg<'a>> ArrowArg<'a> for Option<T> {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        T::read(array, row).map(Some)
    }
}

impl<T: ArrowResult> ArrowResult for Option<T> {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        T::to_array(values.into_iter().map(Option::flatten).collect())
    }
}

/// A value read where a NULL needs an `Option` in the Rust type: an error naming `what`.
pub fn required<T: ArrowType>(value: Option<T>, what: &dyn Fn() -> String) -> Result<T, String> {
    value.ok_or_else(|| {
        format!(
            "{} is NULL, but its Rust type has no Option (take Option<..> to receive NULLs)",
            what()
        )
    })
}

/// The elements of list row `row`.
fn list_elements<'a, O: OffsetSizeTrait, T: ArrowArg<'a>>(
    array: &'a ArrayRef,
    row: usize,
    data_type: impl FnOnce() -> DataType,
) -> Result<Option<Vec<T>>, String> {
    let list: &'a GenericListArray<O> = array
        .as_list_opt::<O>()
        .ok_or_else(|| wrong_type(array, &data_type()))?;
    if list.is_null(row) {
        return Ok(None);
    }
    let offsets = list.value_offsets();
    let (start, end) = (offsets[row].as_usize(), offsets[row + 1].as_usize());
    let values = list.values();
    (start..end)
        .map(|i| {
            required(T::read(values, i)?, &|| {
                format!("list element {}", i - start + 1)
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// The list column of `values`.
fn list_array<O: OffsetSizeTrait, T: ArrowResult>(
    values: Vec<Option<Vec<T>>>,
) -> Result<ArrayRef, String> {
    let nulls = NullBuffer::from_iter(values.iter().map(Option::is_some));
    let lengths: Vec<usize> = values
        .iter()
        .map(|v| v.as_ref().map_or(0, Vec::len))
        .collect();
    let elements: Vec<Option<T>> = values.into_iter().flatten().flatten().map(Some).collect();
    let child = T::to_array(elements)?;
    let field = Arc::new(Field::new("item", T::data_type(), true));
    let nulls = Some(nulls).filter(|n| n.null_count() > 0);
    GenericListArray::<O>::try_new(field, OffsetBuffer::from_lengths(lengths), child, nulls)
        .map(|a| Arc::new(a) as ArrayRef)
        .map_err(|e| e.to_string())
}

impl<T: ArrowType + ListElement> ArrowType for Vec<T> {
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", T::data_type(), true)))
    }
    const DEPTH: usize = T::DEPTH + 1;
}

impl<'a, T: ArrowArg<'a> + ListElement> ArrowArg<'a> for Vec<T> {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        list_elements::<i32, T>(array, row, Self::data_type)
    }
}

impl<T: ArrowResult + ListElement> ArrowResult for Vec<T> {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        list_array::<i32, T>(values)
    }
}

impl<T: ArrowType> ArrowType for LargeList<T> {
    fn data_type() -> DataType {
        DataType::LargeList(Arc::new(Field::new("item", T::data_type(), true)))
    }
    const DEPTH: usize = T::DEPTH + 1;
}

impl<'a, T: ArrowArg<'a>> ArrowArg<'a> for LargeList<T> {
    fn read(array: &'a ArrayRef, row: usize) -> Result<Option<Self>, String> {
        Ok(list_elements::<i64, T>(array, row, Self::data_type)?.map(LargeList))
    }
}

impl<T: ArrowResult> ArrowResult for LargeList<T> {
    fn to_array(values: Vec<Option<Self>>) -> Result<ArrayRef, String> {
        list_array::<i64, T>(values.into_iter().map(|v| v.map(|l| l.0)).collect())
    }
}

/// Support for `#[derive(UdfStruct)]`: the struct column of `array`, checked.
pub fn struct_column(
    array: &ArrayRef,
    data_type: impl FnOnce() -> DataType,
) -> Result<&arrow_array::StructArray, String> {
    array
        .as_struct_opt()
        .ok_or_else(|| wrong_type(array, &data_type()))
}

/// Support for `#[derive(UdfStruct)]`: the struct column of `children` (one per field, in order)
/// with NULL rows where `valid` is false.
pub fn struct_array(
    data_type: DataType,
    children: Vec<ArrayRef>,
    valid: Vec<bool>,
) -> Result<ArrayRef, String> {
    let DataType::Struct(fields) = data_type else {
        return Err(format!("{data_type} is not a struct type"));
    };
    let nulls = Some(NullBuffer::from(valid)).filter(|n| n.null_count() > 0);
    arrow_array::StructArray::try_new(fields, children, nulls)
        .map(|a| Arc::new(a) as ArrayRef)
        .map_err(|e| e.to_string())
}

/// Support for `#[derive(UdfStruct)]`: a struct type of `fields` (name, type), every field
/// nullable.
pub fn struct_type(fields: Vec<(&str, DataType)>) -> DataType {
    DataType::Struct(
        fields
            .into_iter()
            .map(|(name, t)| Field::new(name, t, true))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: ArrowResult + for<'a> ArrowArg<'a> + PartialEq + std::fmt::Debug + Clone>(
        values: Vec<Option<T>>,
    ) {
        let array = T::to_array(values.clone()).unwrap();
        assert_eq!(array.data_type(), &T::data_type());
        let back: Vec<Option<T>> = (0..array.len())
            .map(|i| T::read(&array, i).unwrap())
            .collect();
        assert_eq!(back, values);
    }

    #[test]
    fn values_round_trip_through_columns() {
        round_trip(vec![Some(-3i8), None, Some(i8::MAX)]);
        round_trip(vec![Some(u32::MAX), None]);
        round_trip(vec![Some(Decimal::<12, 2>(1234)), None]);
        round_trip(vec![
            Some(TimestampMillisecond::<crate::types::Utc>::new(5)),
            None,
        ]);
        round_trip(vec![Some(vec![Some(1i64), None]), None, Some(vec![])]);
        round_trip(vec![Some(LargeList(vec!["a".to_string()])), None]);
        round_trip(vec![Some(vec![vec![1.5f64]]), Some(vec![])]);
        // A NULL row of an `Option<T>` column reads as `Some(None)`: the NULL is the value.
        round_trip(vec![Some(Some(2u16)), Some(None)]);
    }

    #[test]
    fn nulls_without_an_option_are_named_errors() {
        let array = Vec::<Option<i64>>::to_array(vec![Some(vec![Some(1), None])]).unwrap();
        let e = <Vec<i64> as ArrowArg>::read(&array, 0).unwrap_err();
        assert!(e.contains("list element 2 is NULL"), "{e}");
        let too_big = Decimal::<3, 0>::to_array(vec![Some(Decimal(1000))]).unwrap_err();
        assert!(too_big.contains("more than the 3 digits"), "{too_big}");
    }
}
