//! Splitting SQL text into statements with sqlparser's tokenizer — the tokenizer DataFusion
//! parses with, in the same dialect — so that a `;` inside a string (`'a;b'`, `E'a\';b'`,
//! `$$a;b$$`), a quoted identifier or a (nested) comment never ends a statement, one bad statement
//! does not take the others with it, and the REPL knows when a statement is complete.

use sqlparser::dialect::Dialect;
#[cfg(test)]
use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Location, Token, Tokenizer, Whitespace};

/// `text` cut into statements.
#[derive(Debug, PartialEq, Eq)]
pub struct Split<'a> {
    /// The complete statements, each without its `;`.
    pub statements: Vec<&'a str>,
    /// The text after the last `;`: blank, a statement without its `;`, or the unterminated rest.
    pub rest: &'a str,
    /// Why `rest` cannot be a statement as it stands: an unterminated string, quoted identifier
    /// or comment, with its line and column in `text` (sqlparser's message).
    pub unterminated: Option<String>,
}

/// The dialect of the helpers that take none: DataFusion's default (`generic`).
#[cfg(test)]
fn dialect() -> &'static dyn Dialect {
    &GenericDialect {}
}

/// The byte offset of a tokenizer location (1-based line and column, the column in characters).
pub fn byte_offset(text: &str, at: Location) -> usize {
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if i + 1 == at.line as usize {
            let column = (at.column as usize).saturating_sub(1);
            return offset
                + line
                    .char_indices()
                    .nth(column)
                    .map_or(line.len(), |(b, _)| b);
        }
        offset += line.len();
    }
    text.len()
}

/// The line and column (1-based, the column in characters) of byte `at` of `text`.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before[before.rfind('\n').map_or(0, |i| i + 1)..]
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Where the token that never ends starts, when the tokenizer reports it at the end of `text`
/// (unterminated comments and dollar-quoted strings): the last place a comment, dollar quote or
/// quote opens before which `text` tokenizes and from which it does not.
fn unterminated_start(text: &str, dialect: &dyn Dialect) -> Option<usize> {
    let tokenizes = |t: &str| Tokenizer::new(dialect, t).tokenize().is_ok();
    text.char_indices()
        .rev()
        .filter(|&(i, c)| matches!(c, '\'' | '"' | '$' | '`') || text[i..].starts_with("/*"))
        .map(|(i, _)| i)
        .find(|&i| tokenizes(&text[..i]) && !tokenizes(&text[i..]))
}

/// The tokens of `text` that end statements (`;`), as byte offsets, or the tokenizer's error.
fn semicolons(
    text: &str,
    dialect: &dyn Dialect,
) -> Result<Vec<usize>, sqlparser::tokenizer::TokenizerError> {
    let tokens = Tokenizer::new(dialect, text).tokenize_with_location()?;
    Ok(tokens
        .iter()
        .filter(|t| t.token == Token::SemiColon)
        .map(|t| byte_offset(text, t.span.start))
        .collect())
}

/// Splits `text` into complete statements and the rest, in DataFusion's default dialect.
#[cfg(test)]
pub fn split_statements(text: &str) -> Split<'_> {
    split_statements_in(text, dialect())
}

/// Splits `text` into complete statements and the rest, tokenized in `dialect` (the session's).
pub fn split_statements_in<'a>(text: &'a str, dialect: &dyn Dialect) -> Split<'a> {
    let (ends, unterminated) = match semicolons(text, dialect) {
        Ok(ends) => (ends, None),
        Err(e) => {
            // sqlparser places an unterminated string at its start, an unterminated comment at
            // the end of the text: find where that comment opens.
            let reported = byte_offset(text, e.location);
            let (at, message) = match (reported >= text.len())
                .then(|| unterminated_start(text, dialect))
                .flatten()
            {
                Some(at) => {
                    let (line, column) = line_and_column(text, at);
                    let what = if text[at..].starts_with("/*") {
                        "comment"
                    } else {
                        "string"
                    };
                    let message = format!("Unterminated {what} at Line: {line}, Column: {column}");
                    (at, message)
                }
                None => (reported.min(text.len()), e.to_string()),
            };
            // Everything before the unterminated token tokenizes: split that part.
            (
                semicolons(&text[..at], dialect).unwrap_or_default(),
                Some(message),
            )
        }
    };
    let mut statements = Vec::with_capacity(ends.len());
    let mut start = 0;
    for end in ends {
        statements.push(&text[start..end]);
        start = end + 1;
    }
    Split {
        statements,
        rest: &text[start..],
        unterminated,
    }
}

/// Whether `text` holds only whitespace and comments (as the tokenizer reads them).
#[cfg(test)]
pub fn is_blank(text: &str) -> bool {
    is_blank_in(text, dialect())
}

/// Whether `text` holds only whitespace and comments, tokenized in `dialect`.
pub fn is_blank_in(text: &str, dialect: &dyn Dialect) -> bool {
    match Tokenizer::new(dialect, text).tokenize() {
        Ok(tokens) => tokens.iter().all(|t| {
            matches!(
                t,
                Token::Whitespace(
                    Whitespace::Space
                        | Whitespace::Newline
                        | Whitespace::Tab
                        | Whitespace::SingleLineComment { .. }
                        | Whitespace::MultiLineComment(_)
                ) | Token::EOF
            )
        }),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;

    /// Inputs that a hand-written splitter gets wrong, and ordinary ones.
    const TRICKY: &[&str] = &[
        "SELECT 1; SELECT 2",
        "SELECT 1;",
        "SELECT $$a;b$$",
        "SELECT $tag$a;b$tag$ AS x; SELECT 2",
        "SELECT 1 /* a /* nested */ ; */",
        "SELECT 1 /* a /* nested */ ; */; SELECT 2",
        "SELECT 'it''s; fine'",
        "SELECT E'a\\';b'",
        "SELECT \"a;b\" FROM (SELECT 1 AS \"a;b\")",
        "SELECT ';' -- ;\n; SELECT 2",
        "-- leading; comment\nSELECT 1",
        "SELECT 1 -- trailing; comment",
        "SELECT 'é;😀' ; SELECT 'ü'",
        "SELECT 1;;SELECT 2",
        "CREATE TABLE t AS VALUES (1, ';'); SELECT * FROM t",
    ];

    /// Each input splits into exactly the statements DataFusion parses from it, in order.
    #[test]
    fn splits_as_datafusion_parses() {
        for input in TRICKY {
            let split = split_statements(input);
            assert_eq!(split.unterminated, None, "{input}");
            let mut pieces: Vec<&str> = split.statements.clone();
            pieces.push(split.rest);
            let pieces: Vec<&str> = pieces.into_iter().filter(|p| !is_blank(p)).collect();
            let whole = DFParser::parse_sql_with_dialect(input, &GenericDialect {})
                .unwrap_or_else(|e| panic!("DataFusion refuses {input:?}: {e}"));
            assert_eq!(pieces.len(), whole.len(), "{input:?} split into {pieces:?}");
            for (piece, statement) in pieces.iter().zip(&whole) {
                let alone = DFParser::parse_sql_with_dialect(piece, &GenericDialect {})
                    .unwrap_or_else(|e| panic!("{piece:?} of {input:?}: {e}"));
                assert_eq!(alone.len(), 1, "{piece:?}");
                assert_eq!(alone[0].to_string(), statement.to_string(), "{input:?}");
            }
        }
    }

    /// Unterminated strings and comments: complete statements before them still split, and the
    /// rest says where the problem starts; DataFusion refuses the same inputs.
    #[test]
    fn unterminated_input_names_line_and_column() {
        for (input, complete, says) in [
            ("SELECT 'abc", 0, "Line: 1, Column: 8"),
            ("SELECT 1;\nSELECT 'x;", 1, "Line: 2, Column: 8"),
            (
                "SELECT 1 /* open /* nested */",
                0,
                "comment at Line: 1, Column: 10",
            ),
            (
                "SELECT 1; SELECT 2 /* ; */ /* x;\n y",
                1,
                "comment at Line: 1, Column: 28",
            ),
            ("SELECT $$a;b", 0, "string at Line: 1, Column: 8"),
        ] {
            let split = split_statements(input);
            assert_eq!(split.statements.len(), complete, "{input:?}");
            let e = split.unterminated.unwrap_or_default();
            assert!(e.contains(says), "{input:?}: {e}");
            assert!(DFParser::parse_sql_with_dialect(input, &GenericDialect {}).is_err());
        }
    }

    #[test]
    fn blank_means_whitespace_and_comments() {
        assert!(is_blank("  \n -- comment\n"));
        assert!(is_blank("/* a /* b */ c */\n"));
        assert!(!is_blank("-- c\nSELECT 1"));
        assert!(!is_blank("'open"));
    }
}
