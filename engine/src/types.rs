//! Mapping between the ABI's [`PluginType`]s and Arrow [`DataType`]s, and the coercion rules that
//! decide which SQL argument types a plugin parameter accepts.

use datafusion::arrow::datatypes::DataType;
use udf_abi::PluginType;

/// The Arrow type a plugin type is exchanged as: Bool→Boolean, Int→Int64, UInt→UInt64,
/// Double→Float64, String→Utf8.
pub fn arrow_type(t: PluginType) -> DataType {
    match t {
        PluginType::Bool => DataType::Boolean,
        PluginType::Int => DataType::Int64,
        PluginType::UInt => DataType::UInt64,
        PluginType::Double => DataType::Float64,
        PluginType::String => DataType::Utf8,
    }
}

/// The plugin type whose canonical Arrow type is `t`, if any (the inverse of [`arrow_type`]).
pub fn plugin_type(t: &DataType) -> Option<PluginType> {
    PluginType::ALL.into_iter().find(|p| &arrow_type(*p) == t)
}

/// What a SQL argument of type `actual` is cast to before it is passed as `param`, or `None`
/// when the argument is refused.
///
/// * `String` takes `Utf8`, `LargeUtf8` and `Utf8View` as they are (no copy); never numbers.
/// * `Int` takes every integer type (an unsigned value above `i64::MAX` is a cast error).
/// * `UInt` takes every integer type, so a literal `3` works; a negative value is a cast error.
/// * `Double` takes every integer, float and decimal type.
/// * `Bool` takes `Boolean` only.
/// * `NULL` literals and dictionary-encoded columns are accepted as their value type.
pub fn coerce_argument(param: PluginType, actual: &DataType) -> Option<DataType> {
    use DataType::*;
    match actual {
        Null => return Some(arrow_type(param)),
        Dictionary(_, value) => return coerce_argument(param, value),
        _ => {}
    }
    let integer = actual.is_integer();
    match param {
        PluginType::Bool => matches!(actual, Boolean).then_some(Boolean),
        PluginType::Int => integer.then_some(Int64),
        PluginType::UInt => integer.then_some(UInt64),
        PluginType::Double => {
            (integer || actual.is_floating() || actual.is_decimal()).then_some(Float64)
        }
        PluginType::String => matches!(actual, Utf8 | LargeUtf8 | Utf8View).then(|| actual.clone()),
    }
}

/// A short description of what a parameter accepts, for error messages.
pub fn accepted_types(param: PluginType) -> &'static str {
    match param {
        PluginType::Bool => "BOOLEAN",
        PluginType::Int => "an integer (TINYINT..BIGINT, unsigned included)",
        PluginType::UInt => "an integer (TINYINT..BIGINT, unsigned included; negatives fail)",
        PluginType::Double => "a number (integer, float or decimal)",
        PluginType::String => "a string (VARCHAR, LargeUtf8 or Utf8View)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_types_round_trip() {
        for t in PluginType::ALL {
            assert_eq!(plugin_type(&arrow_type(t)), Some(t));
        }
        assert_eq!(plugin_type(&DataType::Int32), None);
    }

    #[test]
    fn strings_are_not_copied_and_numbers_are_refused() {
        for t in [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View] {
            assert_eq!(coerce_argument(PluginType::String, &t), Some(t));
        }
        assert_eq!(coerce_argument(PluginType::String, &DataType::Int64), None);
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        assert_eq!(
            coerce_argument(PluginType::String, &dict),
            Some(DataType::Utf8)
        );
    }

    #[test]
    fn integers_widen_and_floats_are_refused_for_integer_parameters() {
        for t in [
            DataType::Int8,
            DataType::Int32,
            DataType::UInt16,
            DataType::UInt64,
        ] {
            assert_eq!(coerce_argument(PluginType::Int, &t), Some(DataType::Int64));
            assert_eq!(
                coerce_argument(PluginType::UInt, &t),
                Some(DataType::UInt64)
            );
        }
        assert_eq!(coerce_argument(PluginType::Int, &DataType::Float64), None);
        assert_eq!(coerce_argument(PluginType::UInt, &DataType::Utf8), None);
    }

    #[test]
    fn doubles_take_every_number_and_bools_only_booleans() {
        for t in [
            DataType::Int32,
            DataType::Float32,
            DataType::Decimal128(10, 2),
        ] {
            assert_eq!(
                coerce_argument(PluginType::Double, &t),
                Some(DataType::Float64)
            );
        }
        assert_eq!(
            coerce_argument(PluginType::Bool, &DataType::Boolean),
            Some(DataType::Boolean)
        );
        assert_eq!(coerce_argument(PluginType::Bool, &DataType::Int64), None);
        assert_eq!(
            coerce_argument(PluginType::Bool, &DataType::Null),
            Some(DataType::Boolean)
        );
    }
}
