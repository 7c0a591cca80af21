//! Splitting SQL text into statements with sqlparser's tokenizer — the tokenizer DataFusion
//! parses with, in the same dialect — so that a `;` inside a string (`'a;b'`, `E'a\';b'`,
//! `$$a;b$$`), a quoted identifier or a (nested) comment never ends a statement, one bad statement
//! does not take the others with it, and the REPL knows when a statement is complete.

use sqlparser::dialect::Dialect;
#[cfg(test)]
use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer, Whitespace};

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
    Offsets::new(text).of(at)
}

/// Byte offsets of tokenizer locations met in order: one walk over the text for all of them
/// (a location before the last one asked starts the walk again).
struct Offsets<'a> {
    text: &'a str,
    /// The 1-based line at `line_start`, and that line's first byte.
    line: u64,
    line_start: usize,
}

impl<'a> Offsets<'a> {
    fn new(text: &'a str) -> Self {
        Offsets {
            text,
            line: 1,
            line_start: 0,
        }
    }

    fn of(&mut self, at: Location) -> usize {
        if at.line == 0 {
            return self.text.len();
        }
        if at.line < self.line {
            (self.line, self.line_start) = (1, 0);
        }
        while self.line < at.line {
            match self.text[self.line_start..].find('\n') {
                Some(i) => {
                    self.line_start += i + 1;
                    self.line += 1;
                }
                None => return self.text.len(),
            }
        }
        let line = &self.text[self.line_start..];
        let line = &line[..line.find('\n').map_or(line.len(), |i| i + 1)];
        let column = (at.column as usize).saturating_sub(1);
        self.line_start
            + line
                .char_indices()
                .nth(column)
                .map_or(line.len(), |(b, _)| b)
    }
}

#[cfg(test)]
thread_local! {
    /// How many times this thread ran the tokenizer (the splitter's work, for the tests).
    static TOKENIZER_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The tokens of `text` into `tokens`, up to the first error.
fn tokenize_into(
    text: &str,
    dialect: &dyn Dialect,
    tokens: &mut Vec<TokenWithSpan>,
) -> Result<(), sqlparser::tokenizer::TokenizerError> {
    #[cfg(test)]
    TOKENIZER_RUNS.with(|r| r.set(r.get() + 1));
    Tokenizer::new(dialect, text).tokenize_with_location_into_buf(tokens)
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

/// The byte offsets of the tokens of `tokens` that end statements (`;`).
fn semicolons(text: &str, tokens: &[TokenWithSpan]) -> Vec<usize> {
    let mut offsets = Offsets::new(text);
    tokens
        .iter()
        .filter(|t| t.token == Token::SemiColon)
        .map(|t| offsets.of(t.span.start))
        .collect()
}

/// Splits `text` into complete statements and the rest, in DataFusion's default dialect.
#[cfg(test)]
pub fn split_statements(text: &str) -> Split<'_> {
    split_statements_in(text, dialect())
}

/// Splits `text` into complete statements and the rest, tokenized in `dialect` (the session's).
///
/// One pass of the tokenizer: on an error, the tokens before it are kept, and the token that
/// fails starts where the last good one ends (sqlparser reports an unterminated comment or dollar
/// quote at the end of the text, not where it opens).
pub fn split_statements_in<'a>(text: &'a str, dialect: &dyn Dialect) -> Split<'a> {
    let mut tokens = Vec::new();
    let outcome = tokenize_into(text, dialect, &mut tokens);
    let ends = semicolons(text, &tokens);
    let unterminated = outcome.err().map(|e| {
        let at = tokens.last().map_or(0, |t| byte_offset(text, t.span.end));
        let opens = &text[at.min(text.len())..];
        // The words sqlparser uses where it places the error itself ("string literal"); a dollar
        // quote, which it reports at the end of the text, is a "string".
        let what = if opens.starts_with("/*") {
            Some("comment")
        } else if opens.starts_with('$') {
            Some("string")
        } else if opens.starts_with(['\'', '"', '`']) {
            Some("string literal")
        } else {
            None
        };
        match what {
            Some(what) => {
                let (line, column) = line_and_column(text, at);
                format!("Unterminated {what} at Line: {line}, Column: {column}")
            }
            None => e.to_string(),
        }
    });
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

    /// A megabyte of script with an unclosed comment near its start and a quote on every line:
    /// the comment is found in one pass of the tokenizer (the search used to tokenize the text
    /// again for every quote after it: minutes for this input). Also a megabyte of short
    /// statements, whose semicolons are located in one walk over the text.
    #[test]
    fn a_large_script_is_split_in_one_pass() {
        let runs = || TOKENIZER_RUNS.with(|r| r.get());
        let mut script = String::from("SELECT 1;\nSELECT 2 /* never closed\n");
        while script.len() < 1 << 20 {
            script.push_str("SELECT 'it''s', \"q\", $$d$$ FROM t; -- ' \" `\n");
        }
        let before = runs();
        let split = split_statements(&script);
        assert_eq!(runs() - before, 1);
        assert_eq!(split.statements, ["SELECT 1"]);
        assert_eq!(
            split.unterminated.as_deref(),
            Some("Unterminated comment at Line: 2, Column: 10")
        );
        assert!(split.rest.starts_with("\nSELECT 2 /* never closed"));

        let mut many = String::new();
        let mut count = 0;
        while many.len() < 1 << 20 {
            many.push_str("SELECT 'a;b' AS x;\n");
            count += 1;
        }
        many.push_str("SELECT 'open");
        let before = runs();
        let split = split_statements(&many);
        assert_eq!(runs() - before, 1);
        assert_eq!(split.statements.len(), count);
        assert_eq!(split.statements[count - 1], "\nSELECT 'a;b' AS x");
        let e = split.unterminated.unwrap_or_default();
        assert!(
            e.contains(&format!("Line: {}, Column: 8", count + 1)),
            "{e}"
        );
    }

    #[test]
    fn byte_offsets_of_locations_in_any_order() {
        let text = "ab\néü;\n\nx";
        let mut offsets = Offsets::new(text);
        for (line, column, byte) in [(2, 3, 7), (1, 2, 1), (4, 1, 10), (2, 1, 3), (9, 1, 11)] {
            assert_eq!(
                offsets.of(Location::new(line, column)),
                byte,
                "{line}:{column}"
            );
            assert_eq!(byte_offset(text, Location::new(line, column)), byte);
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
