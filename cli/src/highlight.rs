//! Syntax highlighting of the input line: keywords, strings, numbers, comments and plugin function
//! names, found by sqlparser's tokenizer (the one statements are split with). Off when `NO_COLOR`
//! is set or the terminal is dumb; a line that does not tokenize yet (an open string) is shown as
//! it is.

use std::borrow::Cow;
use std::collections::HashSet;

use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::split::byte_offset;

/// ANSI styles, one per kind of token.
const KEYWORD: &str = "\x1b[1;34m";
const STRING: &str = "\x1b[32m";
const NUMBER: &str = "\x1b[33m";
const COMMENT: &str = "\x1b[2m";
const PLUGIN: &str = "\x1b[1;35m";
const RESET: &str = "\x1b[0m";

/// Whether the terminal may be coloured: not with `NO_COLOR` (any value) or `TERM=dumb`.
pub fn colours_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// The style of one token, if it has one.
fn style(token: &Token, plugins: &HashSet<String>) -> Option<&'static str> {
    match token {
        Token::Word(w) if w.quote_style.is_none() && plugins.contains(&w.value.to_lowercase()) => {
            Some(PLUGIN)
        }
        Token::Word(w) if w.quote_style.is_none() && w.keyword != Keyword::NoKeyword => {
            Some(KEYWORD)
        }
        Token::SingleQuotedString(_)
        | Token::DoubleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::EscapedStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::SingleQuotedByteStringLiteral(_) => Some(STRING),
        Token::Number(_, _) => Some(NUMBER),
        Token::Whitespace(
            Whitespace::SingleLineComment { .. } | Whitespace::MultiLineComment(_),
        ) => Some(COMMENT),
        _ => None,
    }
}

/// `line` with ANSI colours around its keywords, strings, numbers, comments and the names in
/// `plugins` (lower case); unchanged when it does not tokenize.
pub fn highlight<'l>(line: &'l str, plugins: &HashSet<String>) -> Cow<'l, str> {
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, line).tokenize_with_location() else {
        return Cow::Borrowed(line);
    };
    let starts: Vec<usize> = tokens
        .iter()
        .map(|t| byte_offset(line, t.span.start))
        .collect();
    let mut out = String::with_capacity(line.len() * 2);
    let mut painted = false;
    for (i, token) in tokens.iter().enumerate() {
        if token.token == Token::EOF {
            continue;
        }
        let start = starts[i];
        let end = starts.get(i + 1).copied().unwrap_or(line.len()).max(start);
        let text = &line[start..end.min(line.len())];
        match style(&token.token, plugins) {
            Some(style) => {
                out.push_str(style);
                out.push_str(text);
                out.push_str(RESET);
                painted = true;
            }
            None => out.push_str(text),
        }
    }
    if painted && out.len() >= line.len() {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_strings_numbers_comments_and_plugins_are_coloured() {
        let plugins: HashSet<String> = ["repeat".to_string()].into();
        let line = "SELECT repeat('a;b', 3), x -- note";
        let coloured = highlight(line, &plugins);
        assert_eq!(
            coloured,
            format!(
                "{KEYWORD}SELECT{RESET} {PLUGIN}repeat{RESET}({STRING}'a;b'{RESET}, \
                 {NUMBER}3{RESET}), x {COMMENT}-- note{RESET}"
            )
        );
        // Without the colour codes, the text is the line itself.
        let plain = coloured
            .replace(KEYWORD, "")
            .replace(PLUGIN, "")
            .replace(STRING, "")
            .replace(NUMBER, "")
            .replace(COMMENT, "")
            .replace(RESET, "");
        assert_eq!(plain, line);
    }

    #[test]
    fn lines_that_do_not_tokenize_or_have_nothing_to_colour_are_unchanged() {
        let plugins = HashSet::new();
        assert!(matches!(
            highlight("SELECT 'open", &plugins),
            Cow::Borrowed(_)
        ));
        assert!(matches!(highlight("x, y", &plugins), Cow::Borrowed(_)));
        let multibyte = highlight("SELECT 'é😀' AS \"ü\"", &plugins);
        assert!(multibyte.contains("'é😀'"), "{multibyte}");
    }
}
