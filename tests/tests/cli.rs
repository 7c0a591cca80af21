//! The `udfsql` binary driven non-interactively, with asserted output and exit codes.

use std::process::{Command, Output};

use udf_tests::{example_plugin_dir, misbehaving, plugin, udfsql};

fn run(args: &[&str]) -> Output {
    Command::new(udfsql())
        .args(args)
        .env_remove("UDFSQL_LOG")
        .output()
        .expect("run udfsql")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_seed_query_prints_the_repeated_string_and_an_empty_field() {
    let dir = example_plugin_dir().to_str().unwrap().to_string();
    let o = run(&[
        "--plugin-dir",
        &dir,
        "--format",
        "csv",
        "-c",
        "SELECT repeat(name, 3) FROM (VALUES ('cool'), (NULL)) AS t(name)",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "\"repeat(t.name,Int64(3))\"\ncoolcoolcool\n\n");
    // Replacing the builtin is said once, on stderr.
    assert!(
        stderr(&o).contains("note: plugin function repeat"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn commands_run_in_order_and_csv_keeps_null_and_empty_apart() {
    let repeat = plugin("repeat");
    let square = plugin("square");
    let o = run(&[
        "--plugin",
        repeat.to_str().unwrap(),
        "--plugin",
        square.to_str().unwrap(),
        "--format",
        "csv",
        "-c",
        "SELECT square(x) AS sq FROM (VALUES (3), (NULL)) t(x)",
        "-c",
        "SELECT repeat('', 2) AS e, CAST(NULL AS VARCHAR) AS n, 'a,\"b' AS q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "sq\n9\n\ne,n,q\n\"\",,\"a,\"\"b\"\n");
}

#[test]
fn table_and_json_formats() {
    let square = plugin("square");
    let square = square.to_str().unwrap();
    let sql = "SELECT square(x) AS sq FROM (VALUES (4), (NULL)) t(x)";
    let o = run(&["--plugin", square, "-c", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "+----+\n| sq |\n+----+\n| 16 |\n|    |\n+----+\n"
    );
    let o = run(&["--plugin", square, "--format", "json", "-c", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[{\"sq\":16},{}]\n");
}

#[test]
fn a_failing_statement_sets_the_exit_status_and_the_others_still_run() {
    let dir = example_plugin_dir().to_str().unwrap().to_string();
    let o = run(&[
        "--plugin-dir",
        &dir,
        "--format",
        "csv",
        "-c",
        "SELECT safe_div(1, 0)",
        "-c",
        "SELECT safe_div(9, 3) AS q",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("division by zero: 1 / 0"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), "q\n3\n");
}

#[test]
fn a_load_failure_is_an_error_not_a_skip() {
    let bad = misbehaving("NULL_NAME");
    let o = run(&["--plugin", bad.to_str().unwrap(), "-c", "SELECT 1"]);
    assert!(!o.status.success());
    assert!(stdout(&o).is_empty(), "nothing runs after a failed load");
    let err = stderr(&o);
    assert!(
        err.contains(bad.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert!(err.contains("the function name is a null pointer"), "{err}");

    let o = run(&["--plugin-dir", "/nonexistent/plugins", "-c", "SELECT 1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/plugins"),
        "{}",
        stderr(&o)
    );
}

fn run_with_stdin(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(udfsql())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn udfsql");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn demo_mode_has_the_example_plugins_and_table_t() {
    let o = run(&[
        "--demo",
        "--format",
        "csv",
        "-c",
        "SELECT repeat(name, 3) AS r FROM t ORDER BY r LIMIT 2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "r\ncoolcoolcool\nhéllohéllohéllo\n");
}

#[test]
fn sql_piped_on_stdin_runs_statement_by_statement() {
    let script = "CREATE FUNCTION my_sq(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so';\n\
                  SELECT my_sq(x) AS s\n  FROM (VALUES (3)) t(x);\n\
                  SELECT nope(;\n\
                  \\format json\n\
                  SELECT my_sq(4) AS s; -- a comment; with a semicolon\n";
    let dir = example_plugin_dir().to_str().unwrap().to_string();
    let o = run_with_stdin(&["--plugin-dir", &dir, "--format", "csv"], script);
    assert!(!o.status.success(), "the bad statement fails the run");
    assert_eq!(stdout(&o), "s\n9\n[{\"s\":16}]\n");
    let err = stderr(&o);
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

#[test]
fn a_sql_file_with_meta_commands() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("script.sql");
    std::fs::write(
        &file,
        "\\timing off\nCREATE TABLE nums AS VALUES (1), (2), (3);\n\\d\nSELECT sum(square(column1)) AS total FROM nums;\n",
    )
    .unwrap();
    let square = plugin("square");
    let o = run(&[
        "--plugin",
        square.to_str().unwrap(),
        "--format",
        "csv",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("nums,BASE TABLE"), "{out}");
    assert!(out.contains("plugin_functions,VIEW"), "{out}");
    assert!(out.ends_with("total\n14\n"), "{out}");

    let o = run(&["-f", "/nonexistent/script.sql"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("/nonexistent/script.sql"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn external_tables_over_csv_ndjson_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("people.csv"), "name,n\nann,2\nbo,3\n").unwrap();
    std::fs::write(
        dir.path().join("people.json"),
        "{\"name\":\"cy\",\"n\":1}\n",
    )
    .unwrap();
    let parquet = dir.path().join("people.parquet");
    let d = dir.path().display();
    let pq = parquet.display();
    let sql = format!(
        "CREATE EXTERNAL TABLE c STORED AS CSV LOCATION '{d}/people.csv' OPTIONS ('format.has_header' 'true');\n\
         CREATE EXTERNAL TABLE j STORED AS JSON LOCATION '{d}/people.json';\n\
         COPY (SELECT * FROM c) TO '{pq}' STORED AS PARQUET;\n\
         CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{pq}';\n\
         SELECT repeat(name, n) AS r FROM (SELECT name, n FROM c UNION ALL SELECT name, n FROM j UNION ALL SELECT name, n FROM p) ORDER BY r;\n"
    );
    let repeat = plugin("repeat");
    let o = run_with_stdin(
        &["--plugin", repeat.to_str().unwrap(), "--format", "csv"],
        &sql,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with("r\nannann\nannann\nbobobo\nbobobo\ncy\n"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn drop_of_a_missing_function_names_it() {
    let o = run(&["-c", "DROP FUNCTION no_such_fn"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("DROP FUNCTION no_such_fn: no such function"),
        "{}",
        stderr(&o)
    );
}

/// udfsql with `args` in a pseudo-terminal: its history in `history`, `TERM=term`, and `env`
/// set (`Some`) or removed (`None`); reads time out after `timeout_ms`.
fn terminal(
    args: &[&str],
    history: &std::path::Path,
    term: &str,
    env: &[(&str, Option<&str>)],
    timeout_ms: u64,
) -> rexpect::session::PtySession {
    let mut cmd = Command::new(udfsql());
    cmd.args(args)
        .env("UDFSQL_HISTORY", history)
        .env("TERM", term)
        // No function compiled in the background by --demo (no SDK there), unless a test says
        // otherwise; never in the user's cache.
        .env("UDFSQL_SDK", "/nonexistent/udf-abi")
        .env(
            "UDFSQL_CACHE_DIR",
            udf_tests::fixture_dir().join("compiled"),
        );
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    rexpect::session::spawn_command(cmd, Some(timeout_ms)).expect("spawn in a pty")
}

/// The interactive shell through a pseudo-terminal: a multi-line query, a table, Ctrl-C during a
/// long query leaves the shell alive, history is written, Ctrl-D exits.
#[test]
fn interactive_session_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let mut p = terminal(&["--demo"], &history, "dumb", &[], 30_000);
    p.exp_string("udfsql> ").unwrap();
    p.send_line("SELECT repeat(name, 3) AS r").unwrap();
    p.exp_string("-> ").unwrap();
    p.send_line("FROM t WHERE x = 1;").unwrap();
    p.exp_string("| coolcoolcool |").unwrap();
    p.exp_string("1 row.").unwrap();
    p.send_line("SELECT count(*) FROM generate_series(1, 100000000000) g WHERE square(value) > 0;")
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.send_control('c').unwrap();
    p.exp_string("statement cancelled (Ctrl-C)").unwrap();
    p.send_line("SELECT safe_div(7, 0);").unwrap();
    p.exp_string("division by zero").unwrap();
    p.send_line("SELECT 40 + 2 AS answer;").unwrap();
    p.exp_string("| 42     |").unwrap();
    // The demo lists more functions than the default \\maxrows shows.
    p.send_line("\\maxrows 0").unwrap();
    p.send_line("\\df").unwrap();
    p.exp_string("safe_div(Int, Int) -> Int").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let saved = std::fs::read_to_string(&history).unwrap();
    assert!(saved.contains("SELECT 40 + 2 AS answer;"), "{saved}");
}

#[test]
fn hash_prints_what_sha256sum_prints_and_names_unreadable_files() {
    let square = plugin("square");
    let repeat = plugin("repeat");
    let o = run(&["hash", square.to_str().unwrap(), repeat.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "{}  {}\n{}  {}\n",
            udf_tests::sha256sum(&square),
            square.display(),
            udf_tests::sha256sum(&repeat),
            repeat.display()
        )
    );
    let o = run(&["hash", "/no/such/lib.so", square.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("cannot read /no/such/lib.so"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).contains(&udf_tests::sha256sum(&square)));
}

#[test]
fn every_load_is_logged_with_path_digest_abi_and_functions() {
    let square = plugin("square").canonicalize().unwrap();
    let o = Command::new(udfsql())
        .args(["--plugin", square.to_str().unwrap(), "-c", "SELECT 1"])
        .env("UDFSQL_LOG", "info")
        .output()
        .expect("run udfsql");
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let line = log
        .lines()
        .find(|l| l.contains("loaded plugin library"))
        .unwrap_or_else(|| panic!("no load line in:\n{log}"));
    for part in [
        format!("path={}", square.display()),
        format!("sha256={}", udf_tests::sha256sum(&square)),
        format!("abi=v2.{}", udf_abi::v2::ABI_MINOR),
        "functions=square(Int) -> Int".to_string(),
    ] {
        assert!(line.contains(&part), "{part} missing from: {line}");
    }
}

#[test]
fn no_rows_print_the_csv_header_the_table_header_and_an_empty_json_array() {
    let sql = "SELECT 1 AS a, 'x' AS b WHERE false";
    let o = run(&["--format", "csv", "-c", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "a,b\n");
    let o = run(&["--format", "json", "-c", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "[]\n");
    let o = run(&["--format", "table", "-c", sql]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "+---+---+\n| a | b |\n+---+---+\n+---+---+\n");
    // A table with no rows from a plugin function too.
    let square = plugin("square");
    let o = run(&[
        "--plugin",
        square.to_str().unwrap(),
        "--format",
        "csv",
        "-c",
        "SELECT square(x) AS sq FROM (VALUES (1)) t(x) WHERE x > 5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "sq\n");
}

#[test]
fn json_output_is_one_json_array_with_escaped_strings() {
    let repeat = plugin("repeat");
    let o = run(&[
        "--plugin",
        repeat.to_str().unwrap(),
        "--format",
        "json",
        "-c",
        "SELECT repeat(s, 2) AS r, n, DATE '2024-02-29' AS d \
         FROM (VALUES ('a\"b\\c', 1), ('line\nbreak', NULL)) t(s, n) ORDER BY r",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let value: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not one JSON document ({e}): {out}"));
    assert_eq!(
        value,
        serde_json::json!([
            {"r": "a\"b\\ca\"b\\c", "n": 1, "d": "2024-02-29"},
            {"r": "line\nbreakline\nbreak", "d": "2024-02-29"},
        ])
    );
}

/// A value arrow cannot display (a timestamp outside chrono's range) fails its statement in every
/// format: `error:` on stderr naming the column, nothing of it on stdout, a non-zero exit, and the
/// next statement still runs.
#[test]
fn an_undisplayable_value_is_an_error_not_data_in_every_format() {
    let cases = [
        (
            "SELECT arrow_cast(9223372036854775807, 'Timestamp(Second, None)') AS ts",
            "row 1 of column ts",
        ),
        (
            "SELECT to_timestamp_seconds(x) AS late FROM (VALUES (0), (9223372036854775807)) t(x) \
             ORDER BY x",
            "row 2 of column late",
        ),
        (
            "SELECT named_struct('t', arrow_cast(9223372036854775807, 'Timestamp(Second, None)')) AS nested",
            "row 1 of column nested",
        ),
    ];
    for (format, next) in [
        ("table", "| next |"),
        ("csv", "n\nnext\n"),
        ("json", "[{\"n\":\"next\"}]\n"),
    ] {
        for (sql, place) in cases {
            let o = run(&["--format", format, "-c", sql, "-c", "SELECT 'next' AS n"]);
            let (out, err) = (stdout(&o), stderr(&o));
            assert!(!o.status.success(), "{format}: {sql}: exit 0\n{out}");
            assert!(
                err.lines()
                    .any(|l| l.starts_with("error: cannot display the value in ")
                        && l.contains(place)),
                "{format}: {sql}: {err}"
            );
            assert!(
                !out.contains("ERROR"),
                "{format}: {sql}: error text as data: {out}"
            );
            assert!(
                out.contains(next),
                "{format}: {sql}: the next statement's output: {out}"
            );
            if format != "table" {
                assert_eq!(out, next, "{format}: {sql}: nothing of the failed result");
            }
        }
    }
}

/// A directory tree for the plugin directory tests: `root/` (0700, under /tmp), a group-writable
/// `root/shared/` (0775) holding `plugins/` (0755) with a copy of the square plugin.
fn group_writable_tree() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let shared = root.path().join("shared");
    let plugins = shared.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    udf_tests::set_mode(&shared, 0o775);
    udf_tests::set_mode(&plugins, 0o755);
    let library = plugins.join("libudf_plugin_square.so");
    std::fs::copy(plugin("square"), &library).unwrap();
    udf_tests::set_mode(&library, 0o755);
    (root, shared, library)
}

#[test]
fn a_plugin_dir_symlink_is_checked_where_it_leads() {
    let (root, shared, _) = group_writable_tree();
    // The path given has no group-writable directory; the directory it leads to is under one.
    let link = root.path().join("link");
    std::os::unix::fs::symlink(shared.join("plugins"), &link).unwrap();
    let o = run(&["--plugin-dir", link.to_str().unwrap(), "-c", "SELECT 1"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{} is writable by its group (mode 0775)",
            shared.display()
        )),
        "{err}"
    );
}

#[test]
fn a_symlinked_library_must_stay_inside_its_plugin_dir() {
    let (root, _, library) = group_writable_tree();
    // A safe directory whose entry leads to a library in the group-writable tree.
    let dir = root.path().join("safe");
    std::fs::create_dir(&dir).unwrap();
    udf_tests::set_mode(&dir, 0o755);
    let entry = dir.join("libsquare.so");
    std::os::unix::fs::symlink(&library, &entry).unwrap();
    let o = run(&[
        "--plugin-dir",
        dir.to_str().unwrap(),
        "-c",
        "SELECT square(3)",
    ]);
    assert!(!o.status.success());
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "plugin library {} resolves to {}, which is outside the plugin directory",
            entry.display(),
            library.display()
        )),
        "{err}"
    );

    // A symlink to a library inside the directory is followed, and loaded once.
    std::fs::remove_file(&entry).unwrap();
    let real = dir.join("libudf_plugin_square.so.1");
    std::fs::copy(&library, &real).unwrap();
    udf_tests::set_mode(&real, 0o755);
    std::os::unix::fs::symlink("libudf_plugin_square.so.1", &entry).unwrap();
    std::os::unix::fs::symlink("libudf_plugin_square.so.1", dir.join("libalias.so")).unwrap();
    let o = run(&[
        "--plugin-dir",
        dir.to_str().unwrap(),
        "--format",
        "csv",
        "-c",
        "SELECT square(3) AS s",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "s\n9\n");

    // A group-writable library in the directory is refused, naming the file.
    udf_tests::set_mode(&real, 0o775);
    let o = run(&["--plugin-dir", dir.to_str().unwrap(), "-c", "SELECT 1"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{} is writable by its group (mode 0775)",
            real.display()
        )),
        "{err}"
    );
}

/// Statements are split with sqlparser's tokenizer, as DataFusion parses: a `;` inside a
/// dollar-quoted string or a nested comment does not end a statement (`-c` and stdin alike), and
/// an unterminated string or comment is an error naming its line and column, after the complete
/// statements before it ran.
#[test]
fn statements_split_as_datafusion_parses_them() {
    let o = run(&[
        "--format",
        "csv",
        "-c",
        "SELECT $$a;b$$ AS d; SELECT 1 /* a /* nested */ ; */ AS n",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "d\na;b\nn\n1\n");
    let o = run_with_stdin(
        &["--format", "csv"],
        "SELECT 'x;y' AS s;\nSELECT 2 AS t;\nSELECT 'open;\n",
    );
    assert!(!o.status.success());
    assert_eq!(stdout(&o), "s\nx;y\nt\n2\n");
    assert!(
        stderr(&o).contains("error: Unterminated string literal at Line: 3, Column: 8"),
        "{}",
        stderr(&o)
    );
    let o = run(&["-c", "SELECT 1; /* never closed"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("error: Unterminated comment at Line: 1, Column: 11"),
        "{}",
        stderr(&o)
    );
}

/// `\o FILE` sends results to a file and `\o` back; `\x` shows one `column | value` line per
/// column; `\i FILE` runs a script (its statements' results where `\o` says), and a script that
/// includes itself is an error that leaves the session running.
#[test]
fn meta_commands_redirect_expand_and_include() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.txt");
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!("SELECT 4 AS e;\n\\i {}\nSELECT 5 AS f;\n", script.display()),
    )
    .unwrap();
    let input = format!(
        "\\o {}\nSELECT 1 AS a;\n\\o\nSELECT 2 AS b;\n\\x\nSELECT 3 AS c, 'z' AS dd, NULL AS n;\n\\x off\n\\i {}\nSELECT 6 AS g;\n",
        out_file.display(),
        script.display()
    );
    let o = run_with_stdin(&["--format", "table"], &input);
    assert!(!o.status.success(), "the self-including script fails");
    let file = std::fs::read_to_string(&out_file).unwrap();
    assert!(file.contains("| a |") && file.contains("| 1 |"), "{file}");
    let text = stdout(&o);
    assert!(!text.contains("| a |"), "redirected away: {text}");
    assert!(text.contains("| b |") && text.contains("| 2 |"), "{text}");
    assert!(text.contains("Expanded display is on."), "{text}");
    assert!(
        text.contains("-[ RECORD 1 ]-\nc  | 3\ndd | z\nn  | \n"),
        "{text}"
    );
    // The script ran once (4 and 5), its self-inclusion was refused, and the session went on (6).
    assert_eq!(text.matches("| 4 |").count(), 1, "{text}");
    assert!(text.contains("| 5 |") && text.contains("| 6 |"), "{text}");
    assert!(stderr(&o).contains("already being run"), "{}", stderr(&o));
}

/// In a terminal, the input line is highlighted — keywords, strings, numbers and plugin function
/// names each in their colour — and not when `NO_COLOR` is set.
#[test]
fn the_input_line_is_highlighted_unless_no_color() {
    for no_color in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("history");
        let no_color_env: &[(&str, Option<&str>)] = if no_color {
            &[("NO_COLOR", Some("1"))]
        } else {
            &[("NO_COLOR", None)]
        };
        let mut p = terminal(&["--demo"], &history, "xterm", no_color_env, 30_000);
        p.exp_string("udfsql> ").unwrap();
        p.send_line("SELECT square(7) AS s, 'x' AS y;").unwrap();
        let echoed = p.exp_string("| 49 |").unwrap();
        let coloured = [
            "\x1b[1;34mSELECT\x1b[0m",
            "\x1b[1;35msquare\x1b[0m",
            "\x1b[33m7\x1b[0m",
            "\x1b[32m'x'\x1b[0m",
        ];
        for code in coloured {
            assert_eq!(
                echoed.contains(code),
                !no_color,
                "NO_COLOR={no_color}: {code:?} in {echoed:?}"
            );
        }
        p.send_control('d').unwrap();
        p.exp_eof().unwrap();
    }
}

/// A statement that runs longer than a second shows a live line on the terminal — elapsed time,
/// rows, and the share of the in-memory table scanned so far — cleared when it ends; `-c` output
/// never has it.
#[test]
fn a_long_statement_shows_a_progress_line_only_in_a_terminal() {
    let create = "CREATE TABLE big AS SELECT value AS v FROM generate_series(1, 3000000);";
    let slow = "SELECT count(*) AS n FROM big WHERE str_len(repeat(CAST(v AS VARCHAR), 40)) > 0;";
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let mut p = terminal(&["--demo"], &history, "dumb", &[], 60_000);
    p.exp_string("udfsql> ").unwrap();
    p.send_line(create).unwrap();
    p.exp_string("udfsql> ").unwrap();
    p.send_line(slow).unwrap();
    let shown = p.exp_string("| 3000000 |").unwrap();
    assert!(
        shown.contains("\r\x1b[2K"),
        "a progress line was drawn: {shown:?}"
    );
    assert!(
        shown.contains(" s, ") && shown.contains(" rows  ["),
        "{shown:?}"
    );
    assert!(shown.contains("%"), "with a percentage: {shown:?}");
    p.send_line("\\progress off").unwrap();
    p.exp_string("Progress is off.").unwrap();
    p.send_line(slow).unwrap();
    let quiet = p.exp_string("| 3000000 |").unwrap();
    assert!(!quiet.contains("\x1b[2K"), "\\progress off: {quiet:?}");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    // --no-progress in a terminal: no line either.
    let mut p = terminal(&["--demo", "--no-progress"], &history, "dumb", &[], 60_000);
    p.exp_string("udfsql> ").unwrap();
    p.send_line(create).unwrap();
    p.exp_string("udfsql> ").unwrap();
    p.send_line(slow).unwrap();
    let quiet = p.exp_string("| 3000000 |").unwrap();
    assert!(!quiet.contains("\x1b[2K"), "--no-progress: {quiet:?}");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let o = run(&["--demo", "-c", create, "-c", slow]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("\x1b[2K") && !stdout(&o).contains("\x1b[2K"));
}

/// Statements are split in the dialect the session is configured with: after
/// `SET datafusion.sql_parser.dialect = 'MySQL'`, `#` starts a comment whose `;` ends nothing.
#[test]
fn statements_split_in_the_configured_dialect() {
    let o = run(&[
        "--format",
        "csv",
        "-c",
        "SET datafusion.sql_parser.dialect = 'MySQL'",
        "-c",
        "SELECT 1 AS a # a comment; not the end\n;",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "a\n1\n");
}

/// `\x`, `\o` and `\i` in a real terminal session.
#[test]
fn meta_commands_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.txt");
    let script = dir.path().join("s.sql");
    std::fs::write(&script, "SELECT 'from the script' AS s;\n").unwrap();
    let history = dir.path().join("history");
    let mut p = terminal(&["--demo"], &history, "dumb", &[], 30_000);
    p.exp_string("udfsql> ").unwrap();
    p.send_line("\\x on").unwrap();
    p.exp_string("Expanded display is on.").unwrap();
    p.send_line("SELECT square(3) AS sq, 'w' AS word;").unwrap();
    p.exp_string("-[ RECORD 1 ]-").unwrap();
    p.exp_string("sq   | 9").unwrap();
    p.exp_string("word | w").unwrap();
    p.send_line("\\x off").unwrap();
    p.exp_string("Expanded display is off.").unwrap();
    p.send_line(&format!("\\o {}", out_file.display())).unwrap();
    p.send_line("SELECT 'to the file' AS f;").unwrap();
    p.send_line("\\o").unwrap();
    p.send_line(&format!("\\i {}", script.display())).unwrap();
    p.exp_string("from the script").unwrap();
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let file = std::fs::read_to_string(&out_file).unwrap();
    assert!(file.contains("to the file"), "{file}");
}

/// `--allow-compile`: off without the flag (the error names it); with it, a function written in
/// SQL is compiled (offline, into the test run's shared cache) and called, and a compile error
/// names the statement's line and column.
#[test]
fn allow_compile_compiles_functions_written_in_sql() {
    let cache = udf_tests::fixture_dir().join("compiled");
    let cache = cache.to_str().unwrap();
    let create = "CREATE FUNCTION cli_twice(x BIGINT) RETURNS BIGINT LANGUAGE rust AS $$ x * 2 $$";
    let o = run(&["--format", "csv", "-c", create]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--allow-compile"), "{}", stderr(&o));
    let compile = ["--allow-compile", "--offline", "--compile-cache", cache];
    let mut args = compile.to_vec();
    args.extend([
        "--format",
        "csv",
        "-c",
        create,
        "-c",
        "SELECT cli_twice(21) AS r",
    ]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).ends_with("r\n42\n"), "{}", stdout(&o));
    let mut args = compile.to_vec();
    args.extend([
        "-c",
        "CREATE FUNCTION cli_bad(x BIGINT)\nRETURNS BIGINT LANGUAGE rust AS $$\n    x + \"a\"\n$$",
    ]);
    let o = run(&args);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cli_bad")
            && e.contains("line 3, column")
            && e.contains("of the statement (body line 2, column"),
        "{e}"
    );

    // After a restart (a new process), the same statement finds its library in the cache.
    let mut args = compile.to_vec();
    args.extend(["-c", create]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("note: cli_twice from the compile cache in "),
        "{}",
        stderr(&o)
    );

    // export-function copies the library for a plugin directory (an executor's, a server's),
    // with its digest and the statement that loads it there.
    let deploy = tempfile::Builder::new()
        .prefix("export-")
        .tempdir_in(udf_tests::fixture_dir())
        .unwrap();
    let dir = deploy.path().to_str().unwrap();
    let o = run(&[
        "export-function",
        "cli_twice",
        dir,
        "--compile-cache",
        cache,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let copied = std::path::Path::new(lines[0]);
    assert_eq!(copied.parent(), Some(deploy.path()));
    let file_name = copied.file_name().unwrap().to_str().unwrap();
    assert!(file_name.starts_with("libudfsql_compiled_"), "{out}");
    let hashed = run(&["hash", lines[0]]);
    let digest = stdout(&hashed)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(lines[1], format!("sha256 {digest}"));
    assert!(
        lines[2].contains(&format!("'{file_name}#cli_twice#sha256={digest}'")),
        "{out}"
    );
    // Loaded from that directory by a session that cannot compile, with the printed statement.
    let o = run(&[
        "--plugin-dir",
        dir,
        "--format",
        "csv",
        "-c",
        lines[2],
        "-c",
        "SELECT cli_twice(4) AS r, language FROM plugin_functions WHERE name = 'cli_twice'",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).ends_with("r,language\n8,plugin\n"),
        "{}",
        stdout(&o)
    );
    // A function never compiled, a missing directory: errors that name them.
    let o = run(&[
        "export-function",
        "never_made",
        dir,
        "--compile-cache",
        cache,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no function never_made was compiled"),
        "{}",
        stderr(&o)
    );
    let missing = deploy.path().join("missing");
    let o = run(&[
        "export-function",
        "cli_twice",
        missing.to_str().unwrap(),
        "--compile-cache",
        cache,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));
}

/// `udfsql --demo` in a terminal compiles its function written in SQL (`exclaim`) in the
/// background while the shell is already usable; `\df` lists it as language rust.
#[test]
fn demo_compiles_a_function_written_in_sql() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let sdk =
        std::fs::canonicalize(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../udf-abi"))
            .unwrap();
    let mut p = terminal(
        &["--demo"],
        &history,
        "dumb",
        &[("UDFSQL_SDK", Some(sdk.to_str().unwrap()))],
        30_000,
    );
    p.exp_string("demo: compiling exclaim(s VARCHAR)").unwrap();
    p.exp_string("udfsql> ").unwrap();
    // The shell answers while the function builds.
    p.send_line("SELECT 40 + 2 AS answer;").unwrap();
    p.exp_string("| 42 ").unwrap();
    p.exp_string("udfsql> ").unwrap();
    // Asked again every second until it exists (a cold build takes about a minute here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(400);
    loop {
        p.send_line("SELECT exclaim('hi') AS e;").unwrap();
        let (_, found) = p
            .exp_regex(r"\| HI! |Invalid function|rror[^\n]*\n")
            .unwrap();
        if found.contains("HI!") {
            break;
        }
        assert!(
            found.contains("Invalid function") || found.contains("exclaim"),
            "{found}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "exclaim never appeared"
        );
        p.exp_string("udfsql> ").unwrap();
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    p.exp_string("udfsql> ").unwrap();
    p.send_line("SELECT name, language FROM plugin_functions WHERE language = 'rust';")
        .unwrap();
    p.exp_string("| exclaim | rust     |").unwrap();
    p.exp_string("udfsql> ").unwrap();
    p.send_line("\\q").unwrap();
    p.exp_eof().unwrap();
}
