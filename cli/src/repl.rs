//! The interactive loop: rustyline with history, multi-line statements ending in `;`, meta
//! commands, and completion of keywords, functions and tables.

use std::path::PathBuf;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::history::DefaultHistory;
use rustyline::{Context, Editor, Helper, Hinter, Validator};

use crate::shell::{Next, Shell};
use crate::split::{is_blank_in, split_statements_in};

const KEYWORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "ORDER",
    "HAVING",
    "LIMIT",
    "OFFSET",
    "JOIN",
    "LEFT",
    "RIGHT",
    "INNER",
    "OUTER",
    "FULL",
    "CROSS",
    "ON",
    "USING",
    "AS",
    "AND",
    "OR",
    "NOT",
    "NULL",
    "IS",
    "IN",
    "BETWEEN",
    "LIKE",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "DISTINCT",
    "UNION",
    "ALL",
    "WITH",
    "VALUES",
    "CREATE",
    "REPLACE",
    "FUNCTION",
    "RETURNS",
    "LANGUAGE",
    "PLUGIN",
    "DROP",
    "IF",
    "EXISTS",
    "EXTERNAL",
    "TABLE",
    "STORED",
    "LOCATION",
    "CSV",
    "PARQUET",
    "JSON",
    "EXPLAIN",
    "ANALYZE",
    "SHOW",
    "FUNCTIONS",
    "TABLES",
    "DESCRIBE",
    "CAST",
    "VARCHAR",
    "BIGINT",
    "UNSIGNED",
    "DOUBLE",
    "BOOLEAN",
    "TRUE",
    "FALSE",
    "IMMUTABLE",
    "STABLE",
    "VOLATILE",
];

#[derive(Helper, Hinter, Validator)]
struct SqlHelper {
    words: Vec<String>,
    /// Plugin function names (lower case), coloured apart; `None` when colours are off.
    plugins: Option<std::collections::HashSet<String>>,
}

impl Completer for SqlHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == '\\'))
            .map_or(0, |i| i + 1);
        let prefix = &line[start..pos];
        if prefix.is_empty() {
            return Ok((pos, Vec::new()));
        }
        let lower = prefix.to_lowercase();
        let upper = prefix.chars().next().is_some_and(char::is_uppercase);
        let keywords = KEYWORDS.iter().map(|k| {
            if upper {
                k.to_string()
            } else {
                k.to_lowercase()
            }
        });
        let candidates = keywords
            .chain(self.words.iter().cloned())
            .filter(|w| w.to_lowercase().starts_with(&lower) && w.len() > prefix.len())
            .map(|w| Pair {
                display: w.clone(),
                replacement: w,
            })
            .collect();
        Ok((start, candidates))
    }
}

/// The history file: `$UDFSQL_HISTORY`, else `$XDG_DATA_HOME/udfsql/history`, else
/// `~/.local/share/udfsql/history`.
pub fn default_history_file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("UDFSQL_HISTORY") {
        return Some(PathBuf::from(path));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::home_dir().map(|h| h.join(".local/share")))?;
    Some(data.join("udfsql/history"))
}

impl Highlighter for SqlHelper {
    fn highlight<'l>(&self, line: &'l str, _pos: usize) -> std::borrow::Cow<'l, str> {
        match &self.plugins {
            Some(plugins) => crate::highlight::highlight(line, plugins),
            None => std::borrow::Cow::Borrowed(line),
        }
    }

    fn highlight_char(
        &self,
        _line: &str,
        _pos: usize,
        _kind: rustyline::highlight::CmdKind,
    ) -> bool {
        self.plugins.is_some()
    }
}

/// Whether `buffer` holds at least one complete statement and nothing but blanks after it, in
/// `dialect`.
fn statement_complete(
    buffer: &str,
    dialect: &dyn datafusion::sql::sqlparser::dialect::Dialect,
) -> bool {
    let split = split_statements_in(buffer, dialect);
    split.unterminated.is_none() && !split.statements.is_empty() && is_blank_in(split.rest, dialect)
}

pub fn run(shell: &mut Shell, history: Option<PathBuf>) -> anyhow::Result<bool> {
    let mut editor: Editor<SqlHelper, DefaultHistory> = Editor::new()?;
    editor.set_helper(Some(SqlHelper {
        words: shell.completion_words(),
        plugins: crate::highlight::colours_allowed().then(|| shell.plugin_function_names()),
    }));
    if let Some(path) = &history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // A missing history file is normal on the first run.
        let _ = editor.load_history(path);
    }
    println!(
        "udfsql {} — \\? for help, \\q to quit.",
        env!("CARGO_PKG_VERSION")
    );
    let mut all_ok = true;
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "udfsql> "
        } else {
            "     -> "
        };
        match editor.readline(prompt) {
            Ok(line) => {
                if buffer.is_empty() && line.trim_start().starts_with('\\') {
                    let _ = editor.add_history_entry(line.as_str());
                    match shell.meta(&line, &mut std::io::stdout()) {
                        Ok(Next::Quit) => break,
                        Ok(Next::Continue) => {}
                        Err(e) => {
                            eprintln!("error: {}", crate::shell::report(&e));
                            all_ok = false;
                        }
                    }
                    continue;
                }
                if !buffer.is_empty() {
                    buffer.push('\n');
                }
                buffer.push_str(&line);
                if buffer.trim().is_empty() {
                    buffer.clear();
                    continue;
                }
                if statement_complete(&buffer, shell.dialect().as_ref()) {
                    let _ = editor.add_history_entry(buffer.as_str());
                    match shell.run_sql(&buffer, &mut std::io::stdout()) {
                        Ok(ok) => all_ok &= ok,
                        Err(e) => {
                            eprintln!("error: {}", crate::shell::report(&e));
                            all_ok = false;
                        }
                    }
                    buffer.clear();
                    if let Some(helper) = editor.helper_mut() {
                        helper.words = shell.completion_words();
                    }
                }
            }
            // Ctrl-C at the prompt discards the statement being typed.
            Err(ReadlineError::Interrupted) => {
                if !buffer.is_empty() {
                    println!("(statement discarded)");
                }
                buffer.clear();
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(path) = &history
        && let Err(e) = editor.save_history(path)
    {
        eprintln!("warning: cannot save history to {}: {e}", path.display());
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::GenericDialect;

    use super::statement_complete;

    #[test]
    fn statements_end_with_a_semicolon_outside_quotes_and_comments() {
        assert!(statement_complete("SELECT 1;", &GenericDialect {}));
        assert!(statement_complete("SELECT 1;  \n", &GenericDialect {}));
        assert!(!statement_complete("SELECT 1", &GenericDialect {}));
        assert!(!statement_complete("SELECT ';", &GenericDialect {}));
        assert!(statement_complete("SELECT ';';", &GenericDialect {}));
        assert!(!statement_complete("SELECT 1 -- done;", &GenericDialect {}));
        assert!(statement_complete(
            "SELECT 1 -- a comment\n;",
            &GenericDialect {}
        ));
        assert!(!statement_complete("SELECT \"a;", &GenericDialect {}));
        assert!(!statement_complete("SELECT 1; SELECT", &GenericDialect {}));
    }
}
