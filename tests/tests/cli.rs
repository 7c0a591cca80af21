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
    assert_eq!(stdout(&o), "{\"sq\":16}\n{}\n");
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
