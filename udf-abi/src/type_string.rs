//! ABI 2.2 Arrow type strings (the grammar is on [`UdfArrowTypes`](crate::v2::UdfArrowTypes)):
//! [`parse`] one into an Arrow [`DataType`], write one with [`type_string`]. Host and plugins
//! read them with this one parser.
#![forbid(unsafe_code)]

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, IntervalUnit, TimeUnit};

use crate::v2::MAX_TYPE_STRING_LEN;

/// How deep nested types may nest.
pub const MAX_DEPTH: usize = 16;
/// The longest struct field name, in bytes.
pub const MAX_FIELD_NAME_LEN: usize = 256;
/// The most fields a struct type may have.
pub const MAX_FIELDS: usize = 1024;

/// One primitive format: its C Data Interface format and its Arrow type.
struct Primitive {
    format: &'static str,
    arrow: DataType,
}

/// Every primitive format a type string may use (timestamps and decimals, which carry
/// parameters, are parsed beside it).
const PRIMITIVES: [Primitive; 21] = [
    prim("b", DataType::Boolean),
    prim("c", DataType::Int8),
    prim("C", DataType::UInt8),
    prim("s", DataType::Int16),
    prim("S", DataType::UInt16),
    prim("i", DataType::Int32),
    prim("I", DataType::UInt32),
    prim("l", DataType::Int64),
    prim("L", DataType::UInt64),
    prim("f", DataType::Float32),
    prim("g", DataType::Float64),
    prim("u", DataType::Utf8),
    prim("U", DataType::LargeUtf8),
    prim("vu", DataType::Utf8View),
    prim("z", DataType::Binary),
    prim("Z", DataType::LargeBinary),
    prim("tdD", DataType::Date32),
    prim("tDs", DataType::Duration(TimeUnit::Second)),
    prim("tDm", DataType::Duration(TimeUnit::Millisecond)),
    prim("tDu", DataType::Duration(TimeUnit::Microsecond)),
    prim("tDn", DataType::Duration(TimeUnit::Nanosecond)),
];

const fn prim(format: &'static str, arrow: DataType) -> Primitive {
    Primitive { format, arrow }
}

/// The interval type (`tin`): months, days and nanoseconds.
pub(crate) const INTERVAL: DataType = DataType::Interval(IntervalUnit::MonthDayNano);

/// Time units by their format letter.
pub(crate) const UNITS: [(char, TimeUnit, u8); 4] = [
    ('s', TimeUnit::Second, 0),
    ('m', TimeUnit::Millisecond, 3),
    ('u', TimeUnit::Microsecond, 6),
    ('n', TimeUnit::Nanosecond, 9),
];

/// Parses an Arrow type string. The error names the offending part.
pub fn parse(text: &str) -> Result<DataType, String> {
    if text.len() > MAX_TYPE_STRING_LEN {
        return Err(format!(
            "the type string is {} bytes long, at most {MAX_TYPE_STRING_LEN} are allowed",
            text.len()
        ));
    }
    let mut parser = Parser { text, pos: 0 };
    let t = parser.parse_type(0)?;
    if parser.pos != text.len() {
        return Err(format!(
            "unexpected `{}` after the type at byte {}",
            &text[parser.pos..],
            parser.pos
        ));
    }
    Ok(t)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            Ok(())
        } else {
            Err(format!(
                "expected `{c}` at byte {} of `{}`",
                self.pos, self.text
            ))
        }
    }

    /// The text up to (not including) the first of `stops`, or to the end.
    fn until(&mut self, stops: &[char]) -> &str {
        let rest = &self.text[self.pos..];
        let len = rest.find(|c| stops.contains(&c)).unwrap_or(rest.len());
        self.pos += len;
        &rest[..len]
    }

    fn parse_type(&mut self, depth: usize) -> Result<DataType, String> {
        if depth > MAX_DEPTH {
            return Err(format!("types nest deeper than {MAX_DEPTH} levels"));
        }
        let rest = self.rest();
        for (prefix, large) in [("+l<", false), ("+L<", true)] {
            if rest.starts_with(prefix) {
                self.pos += prefix.len();
                let item = self.parse_type(depth + 1)?;
                self.expect('>')?;
                let field = Arc::new(Field::new("item", item, true));
                return Ok(if large {
                    DataType::LargeList(field)
                } else {
                    DataType::List(field)
                });
            }
        }
        if rest.starts_with("+s<") {
            self.pos += 3;
            let mut fields = Vec::new();
            loop {
                let start = self.pos;
                let name = self.until(&[':', ';', '<', '>']).to_string();
                if name.is_empty() || name.len() > MAX_FIELD_NAME_LEN {
                    return Err(format!(
                        "a struct field at byte {start} needs a name of 1 to \
                         {MAX_FIELD_NAME_LEN} bytes followed by `:`"
                    ));
                }
                self.expect(':')?;
                let t = self.parse_type(depth + 1)?;
                if fields.iter().any(|f: &Field| f.name() == &name) {
                    return Err(format!("the struct has two fields named `{name}`"));
                }
                fields.push(Field::new(name, t, true));
                if fields.len() > MAX_FIELDS {
                    return Err(format!("a struct has more than {MAX_FIELDS} fields"));
                }
                if self.rest().starts_with(';') {
                    self.pos += 1;
                } else {
                    break;
                }
            }
            self.expect('>')?;
            return Ok(DataType::Struct(Fields::from(fields)));
        }
        let start = self.pos;
        let format = self.until(&[';', '<', '>']);
        primitive(format).ok_or_else(|| {
            format!(
                "`{format}` (at byte {start}) is not a type this ABI defines (see \
                 udf_abi::v2::UdfArrowTypes for the list)"
            )
        })
    }
}

/// The Arrow type of a primitive format string.
fn primitive(format: &str) -> Option<DataType> {
    if let Some(row) = PRIMITIVES.iter().find(|p| p.format == format) {
        return Some(row.arrow.clone());
    }
    if format == "tin" {
        return Some(INTERVAL);
    }
    if let Some(params) = format.strip_prefix("d:") {
        let mut parts = params.split(',');
        let precision: u8 = parts.next()?.parse().ok()?;
        let scale: i8 = parts.next()?.parse().ok()?;
        match parts.next() {
            None | Some("128") => {}
            Some(_) => return None,
        }
        if parts.next().is_some()
            || !(1..=38).contains(&precision)
            || scale < 0
            || scale as u8 > precision
        {
            return None;
        }
        return Some(DataType::Decimal128(precision, scale));
    }
    let rest = format.strip_prefix("ts")?;
    let mut chars = rest.chars();
    let letter = chars.next()?;
    let zone = chars.as_str().strip_prefix(':')?;
    let unit = UNITS.iter().find(|(l, _, _)| *l == letter)?.1;
    let zone = (!zone.is_empty()).then(|| Arc::from(zone));
    Some(DataType::Timestamp(unit, zone))
}

/// The type string of an Arrow type, or `None` for a type the ABI does not define.
pub fn type_string(t: &DataType) -> Option<String> {
    if let Some(row) = PRIMITIVES.iter().find(|p| p.arrow == *t) {
        return Some(row.format.to_string());
    }
    Some(match t {
        DataType::Interval(IntervalUnit::MonthDayNano) => "tin".to_string(),
        DataType::Decimal128(p, s) => format!("d:{p},{s}"),
        DataType::Timestamp(unit, zone) => {
            let letter = UNITS.iter().find(|(_, u, _)| u == unit)?.0;
            format!("ts{letter}:{}", zone.as_deref().unwrap_or(""))
        }
        DataType::List(item) => format!("+l<{}>", type_string(item.data_type())?),
        DataType::LargeList(item) => format!("+L<{}>", type_string(item.data_type())?),
        DataType::Struct(fields) if !fields.is_empty() => {
            let fields = fields
                .iter()
                .map(|f| Some(format!("{}:{}", f.name(), type_string(f.data_type())?)))
                .collect::<Option<Vec<_>>>()?;
            format!("+s<{}>", fields.join(";"))
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Type strings with nested types.
    const SAMPLES: [&str; 12] = [
        "c",
        "L",
        "d:12,2",
        "d:38,0",
        "vu",
        "tsn:",
        "tsm:Europe/Paris",
        "tDu",
        "tin",
        "+l<g>",
        "+L<+l<u>>",
        "+s<street:u;zip:i;tags:+l<U>;where:+s<lat:g;lon:g>>",
    ];

    #[test]
    fn every_primitive_is_arrows_own_format() {
        use arrow_schema::ffi::FFI_ArrowSchema;
        for p in &PRIMITIVES {
            let schema = FFI_ArrowSchema::try_from(&p.arrow).unwrap();
            assert_eq!(schema.format(), p.format);
            assert_eq!(parse(p.format).unwrap(), p.arrow);
        }
        for t in [
            INTERVAL,
            DataType::Decimal128(12, 2),
            DataType::Timestamp(TimeUnit::Millisecond, Some("Europe/Paris".into())),
            DataType::Timestamp(TimeUnit::Second, None),
        ] {
            let schema = FFI_ArrowSchema::try_from(&t).unwrap();
            assert_eq!(parse(schema.format()).unwrap(), t, "{}", schema.format());
        }
    }

    #[test]
    fn type_strings_round_trip() {
        for s in SAMPLES {
            let t = parse(s).unwrap();
            assert_eq!(type_string(&t).as_deref(), Some(s), "{t}");
        }
    }

    #[test]
    fn bad_type_strings_are_refused_with_the_reason() {
        for (bad, says) in [
            ("", "is not a type"),
            ("x", "`x`"),
            ("d:39,2", "`d:39,2`"),
            ("d:5,6", "`d:5,6`"),
            ("d:5,2,256", "`d:5,2,256`"),
            ("tsx:", "`tsx:`"),
            ("+l<l", "expected `>`"),
            ("+l<l>>", "unexpected `>`"),
            ("+s<>", "needs a name"),
            ("+s<a:l;a:g>", "two fields named `a`"),
            ("+s<:l>", "needs a name"),
            ("+w:3<l>", "`+w:3`"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let deep = format!("{}l{}", "+l<".repeat(20), ">".repeat(20));
        assert!(parse(&deep).unwrap_err().contains("deeper than 16"));
        assert!(
            parse(&"l".repeat(5000))
                .unwrap_err()
                .contains("at most 4096")
        );
    }
}
