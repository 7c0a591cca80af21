//! Mapping between the ABI's value types ([`UdfType`]) and Arrow [`DataType`]s, and the coercion
//! rules that decide which SQL argument types a plugin parameter accepts.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use udf_abi::v2::UdfType;

/// The time zone of `Timestamp` values.
pub const TIMESTAMP_TZ: &str = "UTC";

/// The Arrow type a plugin type is exchanged as: Bool→Boolean, Int→Int64, UInt→UInt64,
/// Double→Float64, String→Utf8, Int32→Int32, Float32→Float32, Binary→Binary, Date→Date32,
/// Timestamp→Timestamp(µs, UTC).
pub fn arrow_type(t: UdfType) -> DataType {
    match t {
        UdfType::Bool => DataType::Boolean,
        UdfType::Int64 => DataType::Int64,
        UdfType::UInt64 => DataType::UInt64,
        UdfType::Float64 => DataType::Float64,
        UdfType::Utf8 => DataType::Utf8,
        UdfType::Int32 => DataType::Int32,
        UdfType::Float32 => DataType::Float32,
        UdfType::Binary => DataType::Binary,
        UdfType::Date32 => DataType::Date32,
        UdfType::TimestampMicros => {
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(TIMESTAMP_TZ)))
        }
    }
}

/// The Arrow C Data Interface format string of [`arrow_type`]`(t)`: what a batch result's schema
/// must say.
pub fn c_format(t: UdfType) -> &'static str {
    match t {
        UdfType::Bool => "b",
        UdfType::Int64 => "l",
        UdfType::UInt64 => "L",
        UdfType::Float64 => "g",
        UdfType::Utf8 => "u",
        UdfType::Int32 => "i",
        UdfType::Float32 => "f",
        UdfType::Binary => "z",
        UdfType::Date32 => "tdD",
        UdfType::TimestampMicros => "tsu:UTC",
    }
}

/// The plugin type an Arrow type belongs to, for checking declared DDL types: the string types
/// are `String`, the binary types `Binary`, every timestamp `Timestamp`, else the exact match.
pub fn family(t: &DataType) -> Option<UdfType> {
    use DataType::*;
    Some(match t {
        Boolean => UdfType::Bool,
        Int64 => UdfType::Int64,
        UInt64 => UdfType::UInt64,
        Float64 => UdfType::Float64,
        Utf8 | LargeUtf8 | Utf8View => UdfType::Utf8,
        Int32 => UdfType::Int32,
        Float32 => UdfType::Float32,
        Binary | LargeBinary | BinaryView => UdfType::Binary,
        Date32 => UdfType::Date32,
        Timestamp(_, _) => UdfType::TimestampMicros,
        _ => return None,
    })
}

/// Whether an array of type `t` is read for `param` without a cast.
pub fn is_readable(t: &DataType, param: UdfType) -> bool {
    match param {
        UdfType::Utf8 => matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        UdfType::Binary => matches!(
            t,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
        ),
        _ => *t == arrow_type(param),
    }
}

/// What a SQL argument of type `actual` is cast to before it is passed as `param`, or `None`
/// when the argument is refused.
///
/// * `String` takes `Utf8`, `LargeUtf8` and `Utf8View` as they are (no copy); never numbers.
/// * `Binary` takes the binary types as they are.
/// * `Int`, `Int32`, `UInt` take every integer type (a value out of range is a cast error; a
///   negative value for `UInt` too), so a literal `3` works everywhere.
/// * `Double`, `Float32` take every integer, float and decimal type.
/// * `Bool` takes `Boolean` only.
/// * `Date` takes dates, timestamps and strings (`'2024-05-01'`); `Timestamp` takes timestamps of
///   any unit and zone, dates and strings.
/// * `NULL` literals and dictionary-encoded columns are accepted as their value type.
pub fn coerce_argument(param: UdfType, actual: &DataType) -> Option<DataType> {
    use DataType::*;
    match actual {
        Null => return Some(arrow_type(param)),
        Dictionary(_, value) => return coerce_argument(param, value),
        _ => {}
    }
    if is_readable(actual, param) {
        return Some(actual.clone());
    }
    let integer = actual.is_integer();
    let number = integer || actual.is_floating() || actual.is_decimal();
    let string = matches!(actual, Utf8 | LargeUtf8 | Utf8View);
    let temporal = matches!(actual, Date32 | Date64 | Timestamp(_, _));
    let accepted = match param {
        UdfType::Bool | UdfType::Utf8 => false,
        UdfType::Binary => matches!(actual, FixedSizeBinary(_)),
        UdfType::Int64 | UdfType::Int32 | UdfType::UInt64 => integer,
        UdfType::Float64 | UdfType::Float32 => number,
        UdfType::Date32 | UdfType::TimestampMicros => temporal || string,
    };
    accepted.then(|| arrow_type(param))
}

/// A short description of what a parameter accepts, for error messages.
pub fn accepted_types(param: UdfType) -> &'static str {
    match param {
        UdfType::Bool => "BOOLEAN",
        UdfType::Int64 | UdfType::Int32 => "an integer (TINYINT..BIGINT, unsigned included)",
        UdfType::UInt64 => "an integer (TINYINT..BIGINT, unsigned included; negatives fail)",
        UdfType::Float64 | UdfType::Float32 => "a number (integer, float or decimal)",
        UdfType::Utf8 => "a string (VARCHAR, LargeUtf8 or Utf8View)",
        UdfType::Binary => "binary (BYTEA, LargeBinary or BinaryView)",
        UdfType::Date32 => "a DATE (or a timestamp or a string to cast)",
        UdfType::TimestampMicros => "a TIMESTAMP (or a date or a string to cast)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_types_belong_to_their_family() {
        for t in UdfType::ALL {
            assert_eq!(family(&arrow_type(t)), Some(t));
            assert!(is_readable(&arrow_type(t), t));
        }
        assert_eq!(family(&DataType::Int16), None);
    }

    #[test]
    fn c_formats_are_what_arrow_exports() {
        use datafusion::arrow::ffi::FFI_ArrowSchema;
        for t in UdfType::ALL {
            let schema = FFI_ArrowSchema::try_from(&arrow_type(t)).unwrap();
            assert_eq!(schema.format(), c_format(t), "{t}");
        }
    }

    #[test]
    fn strings_are_not_copied_and_numbers_are_refused() {
        for t in [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View] {
            assert_eq!(coerce_argument(UdfType::Utf8, &t), Some(t));
        }
        assert_eq!(coerce_argument(UdfType::Utf8, &DataType::Int64), None);
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        assert_eq!(coerce_argument(UdfType::Utf8, &dict), Some(DataType::Utf8));
    }

    #[test]
    fn integers_widen_and_floats_are_refused_for_integer_parameters() {
        for t in [
            DataType::Int8,
            DataType::Int32,
            DataType::UInt16,
            DataType::UInt64,
        ] {
            assert_eq!(coerce_argument(UdfType::Int64, &t), Some(DataType::Int64));
            assert_eq!(coerce_argument(UdfType::UInt64, &t), Some(DataType::UInt64));
        }
        assert_eq!(
            coerce_argument(UdfType::Int32, &DataType::Int64),
            Some(DataType::Int32)
        );
        assert_eq!(coerce_argument(UdfType::Int64, &DataType::Float64), None);
        assert_eq!(coerce_argument(UdfType::UInt64, &DataType::Utf8), None);
    }

    #[test]
    fn doubles_take_every_number_and_bools_only_booleans() {
        for t in [
            DataType::Int32,
            DataType::Float32,
            DataType::Decimal128(10, 2),
        ] {
            assert_eq!(
                coerce_argument(UdfType::Float64, &t),
                Some(DataType::Float64)
            );
        }
        assert_eq!(
            coerce_argument(UdfType::Bool, &DataType::Boolean),
            Some(DataType::Boolean)
        );
        assert_eq!(coerce_argument(UdfType::Bool, &DataType::Int64), None);
        assert_eq!(
            coerce_argument(UdfType::Bool, &DataType::Null),
            Some(DataType::Boolean)
        );
    }

    #[test]
    fn dates_and_timestamps_take_temporal_values_and_strings() {
        let ts = arrow_type(UdfType::TimestampMicros);
        let nanos = DataType::Timestamp(TimeUnit::Nanosecond, None);
        assert_eq!(
            coerce_argument(UdfType::TimestampMicros, &nanos),
            Some(ts.clone())
        );
        assert_eq!(
            coerce_argument(UdfType::TimestampMicros, &DataType::Utf8),
            Some(ts)
        );
        assert_eq!(
            coerce_argument(UdfType::Date32, &nanos),
            Some(DataType::Date32)
        );
        assert_eq!(coerce_argument(UdfType::Date32, &DataType::Int64), None);
        assert_eq!(coerce_argument(UdfType::Binary, &DataType::Utf8), None);
    }
}
