//! Arrow types declared by ABI 2.2 type strings (parsed by [`udf_abi::type_string`]): the SQL
//! name shown to users, which SQL argument types are cast to a declared Arrow type, and which
//! result and DDL types match one.

use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::compute::can_cast_types;
use datafusion::arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
pub use udf_abi::type_string::{MAX_DEPTH, MAX_FIELD_NAME_LEN, MAX_FIELDS, type_string};

/// Parses an ABI 2.2 Arrow type string ([`udf_abi::type_string::parse`]) and checks every time
/// zone in it as arrow does when it computes with one (an IANA name such as `Europe/Paris`, or
/// an offset such as `+05:30`): a zone arrow cannot use is refused here, at load, instead of
/// failing every query that reads the column.
pub fn parse(text: &str) -> Result<DataType, String> {
    let t = udf_abi::type_string::parse(text)?;
    check_zones(&t)?;
    Ok(t)
}

/// The first time zone in `t` (at any level) that arrow cannot use, as an error.
fn check_zones(t: &DataType) -> Result<(), String> {
    match t {
        DataType::Timestamp(_, Some(zone)) => zone.parse::<Tz>().map(drop).map_err(|_| {
            const SHOWN: usize = 64;
            let shown: String = zone.chars().take(SHOWN).collect();
            let more = if zone.chars().count() > SHOWN {
                "..."
            } else {
                ""
            };
            format!(
                "the time zone `{shown}{more}` ({} bytes) is not one arrow knows: use an IANA \
                 name such as `Europe/Paris` or `UTC`, or an offset such as `+05:30`",
                zone.len()
            )
        }),
        DataType::List(item) | DataType::LargeList(item) => check_zones(item.data_type()),
        DataType::Struct(fields) => fields.iter().try_for_each(|f| {
            check_zones(f.data_type()).map_err(|e| format!("field `{}`: {e}", f.name()))
        }),
        _ => Ok(()),
    }
}

/// SQL names of the primitive types that have one; every other type shows Arrow's name.
const SQL_NAMES: [(DataType, &str); 14] = [
    (DataType::Boolean, "BOOLEAN"),
    (DataType::Int8, "TINYINT"),
    (DataType::UInt8, "TINYINT UNSIGNED"),
    (DataType::Int16, "SMALLINT"),
    (DataType::UInt16, "SMALLINT UNSIGNED"),
    (DataType::Int32, "INT"),
    (DataType::UInt32, "INT UNSIGNED"),
    (DataType::Int64, "BIGINT"),
    (DataType::UInt64, "BIGINT UNSIGNED"),
    (DataType::Float32, "REAL"),
    (DataType::Float64, "DOUBLE"),
    (DataType::Utf8, "VARCHAR"),
    (DataType::Binary, "BYTEA"),
    (DataType::Date32, "DATE"),
];

/// Digits of a timestamp's fraction, by unit.
const DIGITS: [(TimeUnit, u8); 4] = [
    (TimeUnit::Second, 0),
    (TimeUnit::Millisecond, 3),
    (TimeUnit::Microsecond, 6),
    (TimeUnit::Nanosecond, 9),
];

/// The name users see for a declared Arrow type: its SQL name where DataFusion has one
/// (`BIGINT`, `DECIMAL(12,2)`, `TIMESTAMP(3) WITH TIME ZONE 'Europe/Paris'`, `DOUBLE[]`,
/// `STRUCT<street VARCHAR, zip INT>`), else Arrow's (`LargeUtf8`, `Duration(ms)`).
pub fn sql_name(t: &DataType) -> String {
    if let Some((_, sql)) = SQL_NAMES.iter().find(|(arrow, _)| arrow == t) {
        return sql.to_string();
    }
    match t {
        DataType::Interval(IntervalUnit::MonthDayNano) => "INTERVAL".to_string(),
        DataType::Decimal128(p, s) => format!("DECIMAL({p},{s})"),
        DataType::Timestamp(unit, zone) => {
            let digits = DIGITS.iter().find(|(u, _)| u == unit).map_or(9, |d| d.1);
            match zone {
                None => format!("TIMESTAMP({digits})"),
                Some(zone) => format!("TIMESTAMP({digits}) WITH TIME ZONE '{zone}'"),
            }
        }
        DataType::List(item) => format!("{}[]", sql_name(item.data_type())),
        DataType::LargeList(item) => format!("LargeList({})", sql_name(item.data_type())),
        DataType::Struct(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|f| format!("{} {}", f.name(), sql_name(f.data_type())))
                .collect();
            format!("STRUCT<{}>", fields.join(", "))
        }
        other => other.to_string(),
    }
}

/// The kinds of types that convert into each other implicitly.
#[derive(Debug, PartialEq, Eq)]
enum Family {
    Boolean,
    Number,
    String,
    Binary,
    Temporal,
    Duration,
    Interval,
    List,
    Struct,
    Other,
}

fn family(t: &DataType) -> Family {
    use DataType::*;
    match t {
        Boolean => Family::Boolean,
        t if t.is_numeric() => Family::Number,
        Utf8 | LargeUtf8 | Utf8View => Family::String,
        Binary | LargeBinary | BinaryView | FixedSizeBinary(_) => Family::Binary,
        Date32 | Date64 | Timestamp(_, _) => Family::Temporal,
        Duration(_) => Family::Duration,
        Interval(_) => Family::Interval,
        List(_) | LargeList(_) | FixedSizeList(_, _) | ListView(_) | LargeListView(_) => {
            Family::List
        }
        Struct(_) => Family::Struct,
        _ => Family::Other,
    }
}

/// What a SQL argument of type `actual` becomes for a parameter declared as the Arrow type
/// `declared`: always `declared` itself (the plugin gets exactly its type), or `None` when the
/// argument is refused. Accepted: the type itself, `NULL`, dictionary-encoded values (decoded),
/// and any type of the same family that Arrow can cast (integers, floats and decimals into each
/// other; string layouts; binary layouts; dates and timestamps, and strings for them; lists and
/// structs whose children cast). A value the cast cannot represent is an error when the query
/// runs, as for DataFusion's own casts.
pub fn coerce(declared: &DataType, actual: &DataType) -> Option<DataType> {
    match actual {
        DataType::Null => return Some(declared.clone()),
        DataType::Dictionary(_, value) => return coerce(declared, value),
        _ => {}
    }
    if actual == declared {
        return Some(declared.clone());
    }
    let same_family = family(actual) == family(declared)
        || (family(declared) == Family::Temporal && family(actual) == Family::String);
    (same_family && family(declared) != Family::Other && can_cast_types(actual, declared))
        .then(|| declared.clone())
}

/// Whether a result of type `found` (from the plugin's schema) is the declared type `declared`:
/// equal, except that list items may have any name and nullability (C libraries name them
/// `item`, `element` or nothing).
pub fn result_matches(declared: &DataType, found: &DataType) -> bool {
    match (declared, found) {
        (DataType::List(d), DataType::List(f))
        | (DataType::LargeList(d), DataType::LargeList(f)) => {
            result_matches(d.data_type(), f.data_type())
        }
        (DataType::Struct(d), DataType::Struct(f)) => {
            d.len() == f.len()
                && d.iter().zip(f.iter()).all(|(d, f)| {
                    d.name() == f.name() && result_matches(d.data_type(), f.data_type())
                })
        }
        _ => declared == found,
    }
}

/// Whether a type declared in DDL (`CREATE FUNCTION`) fits a parameter of the Arrow type
/// `library`: the same type, where every string layout is one type (DataFusion's `VARCHAR` may
/// be `Utf8View`), every binary layout one, `T[]` is a List or a LargeList, and a timestamp of
/// the same unit matches whatever its zone (SQL's `WITH TIME ZONE` does not name the zone).
pub fn declared_matches(declared: &DataType, library: &DataType) -> bool {
    use DataType::*;
    match (declared, library) {
        // SQL has one array type (`T[]`): it stands for List and LargeList.
        (List(d) | LargeList(d), List(l) | LargeList(l)) => {
            declared_matches(d.data_type(), l.data_type())
        }
        (Struct(d), Struct(l)) => {
            d.len() == l.len()
                && d.iter().zip(l.iter()).all(|(d, l)| {
                    d.name() == l.name() && declared_matches(d.data_type(), l.data_type())
                })
        }
        (Timestamp(du, _), Timestamp(lu, _)) => du == lu,
        _ => {
            declared == library
                || (family(declared) == Family::String && family(library) == Family::String)
                || (family(declared) == Family::Binary && family(library) == Family::Binary)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: [&str; 6] = [
        "c",
        "d:12,2",
        "tsm:Europe/Paris",
        "+l<g>",
        "+L<+l<u>>",
        "+s<street:u;zip:i;tags:+l<U>;where:+s<lat:g;lon:g>>",
    ];

    #[test]
    fn every_type_matches_and_casts_to_itself() {
        for s in SAMPLES {
            let t = parse(s).unwrap();
            assert!(result_matches(&t, &t));
            assert!(declared_matches(&t, &t));
            assert_eq!(coerce(&t, &t), Some(t.clone()));
        }
        let nested = parse("+s<street:u;tags:+l<U>>").unwrap();
        assert_eq!(
            sql_name(&nested),
            "STRUCT<street VARCHAR, tags LargeUtf8[]>"
        );
        assert_eq!(sql_name(&parse("d:12,2").unwrap()), "DECIMAL(12,2)");
        assert_eq!(
            sql_name(&parse("tsm:Europe/Paris").unwrap()),
            "TIMESTAMP(3) WITH TIME ZONE 'Europe/Paris'"
        );
    }

    #[test]
    fn arguments_of_the_same_family_are_cast_to_the_declared_type() {
        let dec = DataType::Decimal128(12, 2);
        assert_eq!(coerce(&dec, &DataType::Int64), Some(dec.clone()));
        assert_eq!(coerce(&dec, &DataType::Float64), Some(dec.clone()));
        assert_eq!(coerce(&dec, &DataType::Utf8), None);
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        assert_eq!(
            coerce(&DataType::LargeUtf8, &dict),
            Some(DataType::LargeUtf8)
        );
        let list = parse("+l<l>").unwrap();
        assert_eq!(coerce(&list, &parse("+l<i>").unwrap()), Some(list.clone()));
        assert_eq!(coerce(&list, &DataType::Int64), None);
        let ts = parse("tsu:UTC").unwrap();
        assert_eq!(coerce(&ts, &DataType::Utf8), Some(ts.clone()));
        assert_eq!(coerce(&DataType::Boolean, &DataType::Int8), None);
    }
}
