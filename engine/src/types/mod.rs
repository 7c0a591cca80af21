//! The types of plugin arguments and results ([`ValueType`]): the ABI's tagged value types
//! ([`UdfType`], one row each in [`TYPES`]) and the Arrow types ABI 2.2 declares by type strings
//! ([`arrow`]); their Arrow [`DataType`]s, and the coercion rules that decide which SQL argument
//! types a plugin parameter accepts.

use std::sync::Arc;

pub mod arrow;
pub mod fuzz;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use udf_abi::v2::UdfType;

/// The time zone of `Timestamp` values.
pub const TIMESTAMP_TZ: &str = "UTC";

/// Which SQL argument types a parameter takes besides the ones it reads as they are (see
/// [`coerce_argument`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Casts {
    /// No other type.
    Nothing,
    /// `FixedSizeBinary`.
    FixedSizeBinary,
    /// Every integer type.
    Integers,
    /// Every integer, float and decimal type.
    Numbers,
    /// Dates, timestamps and strings.
    TemporalOrString,
}

/// Everything the host says about one plugin type, in one row: every function of this module
/// reads [`TYPES`], so a type is one entry.
struct TypeRow {
    /// The type (the row's index is its tag).
    udf: UdfType,
    /// The Arrow type values are exchanged as.
    arrow: fn() -> DataType,
    /// The Arrow C Data Interface format string of `arrow`.
    c_format: &'static str,
    /// Arrow types read as this type without a cast (`arrow` and its same-layout siblings).
    readable: fn(&DataType) -> bool,
    /// Arrow types of this type's family, for checking types declared in DDL.
    family: fn(&DataType) -> bool,
    /// The other argument types that are cast to `arrow`.
    casts: Casts,
    /// What a parameter of this type accepts, for error messages.
    accepted: &'static str,
}

fn timestamp_micros_utc() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(TIMESTAMP_TZ)))
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

const INTEGER: &str = "an integer (TINYINT..BIGINT, unsigned included)";
const NUMBER: &str = "a number (integer, float or decimal)";

/// The type of one argument or result of a plugin function.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// A tagged type (ABI 2.0/2.1 and v1): passed on the row and the batch path.
    Tag(UdfType),
    /// An Arrow type declared by an ABI 2.2 type string: passed on the batch path only, as an
    /// array of exactly this type.
    Arrow(DataType),
}

impl From<UdfType> for ValueType {
    fn from(t: UdfType) -> Self {
        ValueType::Tag(t)
    }
}

impl ValueType {
    /// The tagged type, or `None` for an Arrow type.
    pub fn tag(&self) -> Option<UdfType> {
        match self {
            ValueType::Tag(t) => Some(*t),
            ValueType::Arrow(_) => None,
        }
    }

    /// The Arrow type values of this type are exchanged as.
    pub fn arrow_type(&self) -> DataType {
        match self {
            ValueType::Tag(t) => arrow_type(*t),
            ValueType::Arrow(t) => t.clone(),
        }
    }

    /// Whether an array of type `t` is passed as it is (no cast).
    pub fn is_readable(&self, t: &DataType) -> bool {
        match self {
            ValueType::Tag(param) => is_readable(t, *param),
            ValueType::Arrow(declared) => t == declared,
        }
    }

    /// What a SQL argument of type `actual` is cast to, or `None` when it is refused (see
    /// [`coerce_argument`] and [`arrow::coerce`]).
    pub fn coerce(&self, actual: &DataType) -> Option<DataType> {
        match self {
            ValueType::Tag(param) => coerce_argument(*param, actual),
            ValueType::Arrow(declared) => arrow::coerce(declared, actual),
        }
    }

    /// What a parameter of this type accepts, for error messages.
    pub fn accepted(&self) -> String {
        match self {
            ValueType::Tag(param) => accepted_types(*param).to_string(),
            ValueType::Arrow(declared) => format!(
                "{} (or a value of its kind that casts to it)",
                arrow::sql_name(declared)
            ),
        }
    }

    /// The ABI 2.2 type string of an Arrow type; `None` for a tagged type.
    pub fn type_string(&self) -> Option<String> {
        match self {
            ValueType::Tag(_) => None,
            ValueType::Arrow(t) => arrow::type_string(t),
        }
    }
}

/// Tagged types show their ABI name (`Int`, `String`), Arrow types their SQL name (`BIGINT`,
/// `DECIMAL(12,2)`, `DOUBLE[]`).
impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueType::Tag(t) => write!(f, "{t}"),
            ValueType::Arrow(t) => f.write_str(&arrow::sql_name(t)),
        }
    }
}

/// The plugin types, in tag order.
const TYPES: [TypeRow; 10] = [
    TypeRow {
        udf: UdfType::Bool,
        arrow: || DataType::Boolean,
        c_format: "b",
        readable: |t| matches!(t, DataType::Boolean),
        family: |t| matches!(t, DataType::Boolean),
        casts: Casts::Nothing,
        accepted: "BOOLEAN",
    },
    TypeRow {
        udf: UdfType::Int64,
        arrow: || DataType::Int64,
        c_format: "l",
        readable: |t| matches!(t, DataType::Int64),
        family: |t| matches!(t, DataType::Int64),
        casts: Casts::Integers,
        accepted: INTEGER,
    },
    TypeRow {
        udf: UdfType::UInt64,
        arrow: || DataType::UInt64,
        c_format: "L",
        readable: |t| matches!(t, DataType::UInt64),
        family: |t| matches!(t, DataType::UInt64),
        casts: Casts::Integers,
        accepted: "an integer (TINYINT..BIGINT, unsigned included; negatives fail)",
    },
    TypeRow {
        udf: UdfType::Float64,
        arrow: || DataType::Float64,
        c_format: "g",
        readable: |t| matches!(t, DataType::Float64),
        family: |t| matches!(t, DataType::Float64),
        casts: Casts::Numbers,
        accepted: NUMBER,
    },
    TypeRow {
        udf: UdfType::Utf8,
        arrow: || DataType::Utf8,
        c_format: "u",
        readable: is_string,
        family: is_string,
        casts: Casts::Nothing,
        accepted: "a string (VARCHAR, LargeUtf8 or Utf8View)",
    },
    TypeRow {
        udf: UdfType::Int32,
        arrow: || DataType::Int32,
        c_format: "i",
        readable: |t| matches!(t, DataType::Int32),
        family: |t| matches!(t, DataType::Int32),
        casts: Casts::Integers,
        accepted: INTEGER,
    },
    TypeRow {
        udf: UdfType::Float32,
        arrow: || DataType::Float32,
        c_format: "f",
        readable: |t| matches!(t, DataType::Float32),
        family: |t| matches!(t, DataType::Float32),
        casts: Casts::Numbers,
        accepted: NUMBER,
    },
    TypeRow {
        udf: UdfType::Binary,
        arrow: || DataType::Binary,
        c_format: "z",
        readable: is_binary,
        family: is_binary,
        casts: Casts::FixedSizeBinary,
        accepted: "binary (BYTEA, LargeBinary or BinaryView)",
    },
    TypeRow {
        udf: UdfType::Date32,
        arrow: || DataType::Date32,
        c_format: "tdD",
        readable: |t| matches!(t, DataType::Date32),
        family: |t| matches!(t, DataType::Date32),
        casts: Casts::TemporalOrString,
        accepted: "a DATE (or a timestamp or a string to cast)",
    },
    TypeRow {
        udf: UdfType::TimestampMicros,
        arrow: timestamp_micros_utc,
        c_format: "tsu:UTC",
        readable: |t| *t == timestamp_micros_utc(),
        family: |t| matches!(t, DataType::Timestamp(_, _)),
        casts: Casts::TemporalOrString,
        accepted: "a TIMESTAMP (or a date or a string to cast)",
    },
];

/// The row of `t`.
fn row(t: UdfType) -> &'static TypeRow {
    &TYPES[t.tag() as usize]
}

/// The types SQL arguments of `arg_types` are cast to for parameters `params`, or the plan error
/// naming `what` (`function f(Int) -> Int`, `aggregate g(BIGINT) -> BIGINT [...]`): a wrong
/// number of arguments, or the first argument a parameter refuses.
pub(crate) fn coerce_arguments(
    what: &str,
    params: &[ValueType],
    arg_types: &[DataType],
) -> datafusion::common::Result<Vec<DataType>> {
    if arg_types.len() != params.len() {
        return datafusion::common::plan_err!(
            "{what} takes {} argument{}, got {}",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            arg_types.len()
        );
    }
    params
        .iter()
        .zip(arg_types)
        .enumerate()
        .map(|(i, (param, actual))| match param.coerce(actual) {
            Some(t) => Ok(t),
            None => datafusion::common::plan_err!(
                "{what}: argument {} has type {actual}, expected {}",
                i + 1,
                param.accepted()
            ),
        })
        .collect()
}

/// The Arrow type a plugin type is exchanged as: Bool→Boolean, Int→Int64, UInt→UInt64,
/// Double→Float64, String→Utf8, Int32→Int32, Float32→Float32, Binary→Binary, Date→Date32,
/// Timestamp→Timestamp(µs, UTC).
pub fn arrow_type(t: UdfType) -> DataType {
    (row(t).arrow)()
}

/// The Arrow C Data Interface format string of [`arrow_type`]`(t)`: what a batch result's schema
/// must say.
pub fn c_format(t: UdfType) -> &'static str {
    row(t).c_format
}

/// The plugin type an Arrow type belongs to, for checking declared DDL types: the string types
/// are `String`, the binary types `Binary`, every timestamp `Timestamp`, else the exact match.
pub fn family(t: &DataType) -> Option<UdfType> {
    TYPES.iter().find(|r| (r.family)(t)).map(|r| r.udf)
}

/// Whether an array of type `t` is read for `param` without a cast.
pub fn is_readable(t: &DataType, param: UdfType) -> bool {
    (row(param).readable)(t)
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
    let accepted = match row(param).casts {
        Casts::Nothing => false,
        Casts::FixedSizeBinary => matches!(actual, FixedSizeBinary(_)),
        Casts::Integers => integer,
        Casts::Numbers => integer || actual.is_floating() || actual.is_decimal(),
        Casts::TemporalOrString => {
            matches!(actual, Date32 | Date64 | Timestamp(_, _)) || is_string(actual)
        }
    };
    accepted.then(|| arrow_type(param))
}

/// A short description of what a parameter accepts, for error messages.
pub fn accepted_types(param: UdfType) -> &'static str {
    row(param).accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_every_type_in_tag_order() {
        assert_eq!(TYPES.len(), UdfType::ALL.len());
        for (i, row) in TYPES.iter().enumerate() {
            assert_eq!(row.udf.tag() as usize, i, "{}", row.udf);
        }
    }

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
