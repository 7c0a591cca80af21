//! Splitting SQL text into statements at `;` outside quotes and comments, so that one bad
//! statement does not take the others with it, and the REPL knows when a statement is complete.

/// Splits `text` into complete statements (each without its `;`) and the incomplete rest.
pub fn split_statements(text: &str) -> (Vec<&str>, &str) {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut in_single = false;
    let mut in_double = false;
    let mut in_line_comment = false;
    let mut in_block_comment = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        if in_line_comment {
            in_line_comment = c != b'\n';
        } else if in_block_comment {
            if c == b'*' && next == Some(b'/') {
                in_block_comment = false;
                i += 1;
            }
        } else if in_single {
            in_single = c != b'\'';
        } else if in_double {
            in_double = c != b'"';
        } else {
            match c {
                b'\'' => in_single = true,
                b'"' => in_double = true,
                b'-' if next == Some(b'-') => in_line_comment = true,
                b'/' if next == Some(b'*') => {
                    in_block_comment = true;
                    i += 1;
                }
                b';' => {
                    statements.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    (statements, &text[start..])
}

/// Whether `text` holds only whitespace and comments.
pub fn is_blank(text: &str) -> bool {
    text.lines().all(|line| {
        let line = line.trim();
        line.is_empty() || line.starts_with("--")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_semicolons_outside_quotes_and_comments() {
        let (s, rest) =
            split_statements("SELECT 1; SELECT ';' -- x;\n; SELECT \"a;b\" /* ; */;tail");
        assert_eq!(
            s,
            ["SELECT 1", " SELECT ';' -- x;\n", " SELECT \"a;b\" /* ; */"]
        );
        assert_eq!(rest, "tail");
        let (s, rest) = split_statements("SELECT 'unterminated;");
        assert!(s.is_empty());
        assert_eq!(rest, "SELECT 'unterminated;");
    }

    #[test]
    fn blank_means_whitespace_and_line_comments() {
        assert!(is_blank("  \n -- comment\n"));
        assert!(!is_blank("-- c\nSELECT 1"));
    }
}
