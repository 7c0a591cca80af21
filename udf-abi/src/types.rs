//! Rust types for the Arrow types of ABI 2.2 in row-by-row `#[udf]` functions (beside the
//! primitives `i8`..`u64`, `f32`, `f64`, `bool`, `String`/`&str`, `Vec<u8>`/`&[u8]`, `Vec<T>` for
//! lists, `Option<T>` at every level, and `#[derive(UdfStruct)]` structs):
//!
//! | Rust | Arrow | SQL |
//! |---|---|---|
//! | [`Decimal<P, S>`] | `Decimal128(P, S)` | `DECIMAL(P,S)` |
//! | [`TimestampSecond<Z>`] .. [`TimestampNanosecond<Z>`] | `Timestamp(unit, zone)` | `TIMESTAMP(0..9) [WITH TIME ZONE]` |
//! | [`DurationSecond`] .. [`DurationNanosecond`] | `Duration(unit)` | — |
//! | [`IntervalMonthDayNano`] | `Interval(MonthDayNano)` | `INTERVAL` |
//! | `Vec<T>` / [`LargeList<T>`] | `List(T)` / `LargeList(T)` | `T[]` |
//!
//! A zone is a type implementing [`TimeZone`]: [`Naive`] (none, the default), [`Utc`], or one
//! declared with [`time_zone!`](crate::time_zone).
#![forbid(unsafe_code)]

use std::marker::PhantomData;

pub use arrow_buffer::IntervalMonthDayNano;

/// A `DECIMAL(P, S)` value: the unscaled integer (`12.34` in `DECIMAL(12,2)` is `Decimal(1234)`).
/// A result with more than `P` digits is an error of the call, not a wrong answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal<const P: u8, const S: i8>(pub i128);

impl<const P: u8, const S: i8> Decimal<P, S> {
    /// The largest unscaled value of `P` digits.
    pub const MAX: i128 = {
        let mut v: i128 = 1;
        let mut i = 0;
        while i < P {
            v *= 10;
            i += 1;
        }
        v - 1
    };

    /// The value, if it has at most `P` digits.
    pub fn checked(unscaled: i128) -> Option<Self> {
        (-Self::MAX..=Self::MAX)
            .contains(&unscaled)
            .then_some(Decimal(unscaled))
    }
}

/// The time zone of a timestamp type, as a type.
pub trait TimeZone: 'static {
    /// The zone's name (`"UTC"`, `"Europe/Paris"`, `"+02:00"`), or `None` for a timestamp
    /// without a zone.
    const NAME: Option<&'static str>;
}

/// No time zone: `TIMESTAMP` without `WITH TIME ZONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Naive;

impl TimeZone for Naive {
    const NAME: Option<&'static str> = None;
}

/// The zone `UTC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Utc;

impl TimeZone for Utc {
    const NAME: Option<&'static str> = Some("UTC");
}

/// Declares a time zone type: `udf_abi::time_zone!(Paris, "Europe/Paris");` then
/// `TimestampMillisecond<Paris>`.
#[macro_export]
macro_rules! time_zone {
    ($name:ident, $zone:literal) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name;
        impl $crate::types::TimeZone for $name {
            const NAME: ::std::option::Option<&'static str> = ::std::option::Option::Some($zone);
        }
    };
}

macro_rules! timestamps {
    ($($name:ident: $unit:literal),*) => {$(
        #[doc = concat!("A timestamp in ", $unit, " since 1970-01-01T00:00:00 (in zone `Z`).")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name<Z: TimeZone = Naive>(pub i64, pub PhantomData<Z>);

        impl<Z: TimeZone> $name<Z> {
            /// The timestamp `value` units after the epoch.
            pub const fn new(value: i64) -> Self {
                $name(value, PhantomData)
            }

            /// Units since the epoch.
            pub const fn value(self) -> i64 {
                self.0
            }
        }
    )*};
}

timestamps!(
    TimestampSecond: "seconds",
    TimestampMillisecond: "milliseconds",
    TimestampMicrosecond: "microseconds",
    TimestampNanosecond: "nanoseconds"
);

macro_rules! durations {
    ($($name:ident: $unit:literal),*) => {$(
        #[doc = concat!("A duration in ", $unit, ".")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub i64);
    )*};
}

durations!(
    DurationSecond: "seconds",
    DurationMillisecond: "milliseconds",
    DurationMicrosecond: "microseconds",
    DurationNanosecond: "nanoseconds"
);

/// A `LargeList` (64-bit offsets) of `T`; `Vec<T>` is a `List`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct LargeList<T>(pub Vec<T>);
