#!/usr/bin/env bash
# A udfsql session under valgrind memcheck: load every example plugin, CREATE a function, call
# every example function (and the aggregates, below) (v1 strings freed with free(), v2 results released to the plugin, batch
# arrays released through their callbacks), hit a plugin error and a panic, DROP. Fails on any
# invalid read/write or a definite leak. The direct batch entry of primitive kernels
# (`udf_abi::export::direct`) takes the primitive calls: over columns without NULLs (the second
# query), with a NULL (the first), and two columns with NULLs in different rows (the third). Needs
# target/debug/udfsql and the plugins (built by `cargo test --workspace`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
    apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp target/debug/libudf_plugin_*.so "$work"/
set +e
UDFSQL_HISTORY=/dev/null valgrind --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=3 \
    target/debug/udfsql --plugin-dir "$work" --format csv \
    -c "CREATE FUNCTION my_sq(BIGINT) RETURNS BIGINT LANGUAGE plugin AS 'libudf_plugin_square.so'" \
    -c "SELECT repeat(s, 2), my_sq(x), safe_div(x, 2), hypot(x, 4), str_len(s), is_even(x), choose(x > 5, s, 'b'), shout(s), hex_bytes(reverse_bytes(X'0102')), add_days(DATE '2024-01-01', 1), add_seconds(TIMESTAMP '2024-01-01 00:00:00', x), coalesce_len(NULL), null_if_empty(''), repeat_text(s, 2), square(x), add_i32(1, 2), half_f32(3), negate(true), byte_len(X'00'), iso_weekday(DATE '2024-01-01'), year_of(DATE '2024-01-01'), epoch_micros(TIMESTAMP '1970-01-01 00:00:01'), utf8_len(s), next_id() FROM (VALUES ('q', 5), ('r', 6), (NULL, NULL)) t(s, x)" \
    -c "SELECT my_sq(x), square(x), is_even(x), hypot(x, y), hypot(x, 4), hypot(4, y), half_f32(f) FROM (VALUES (5, 1.5, CAST(1.5 AS REAL)), (6, 2.5, CAST(2.5 AS REAL))) t(x, y, f)" \
    -c "SELECT hypot(x, y), is_even(x), square(x), hypot(4, y) FROM (VALUES (5, NULL), (NULL, 2.5), (7, 3.5)) t(x, y)" \
    -c "SELECT safe_div(1, 0)" \
    -c "SELECT boom('z')" \
    -c "DROP FUNCTION my_sq" \
    > "$work/out.csv" 2> "$work/valgrind.log"
code=$?
set -e
grep -E "definitely lost|ERROR SUMMARY" "$work/valgrind.log"
if [ "$code" -eq 3 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$work/valgrind.log"; then
    cat "$work/valgrind.log"
    echo "valgrind found errors or definite leaks" >&2
    exit 1
fi
# Two statements fail on purpose; the rest must have produced the queries' rows (a header and
# three rows, a header and two rows, a header and three rows).
if [ "$(wc -l < "$work/out.csv")" -ne 11 ]; then
    cat "$work/out.csv" "$work/valgrind.log"
    echo "the session's query did not answer" >&2
    exit 1
fi

# The misbehaving batch corpus (tests/fixtures/c/batch_misbehaving.c, built by the tests): every
# function on the batch path, most of them refused, none may read or write out of bounds or leak.
corpus=target/udf-fixtures/libbatch_misbehaving.so
for f in "$corpus" target/udf-fixtures/libmisbehaving_wrong_return_type_string.so; do
    if [ ! -f "$f" ]; then
        echo "$f is missing: run cargo test --workspace first" >&2
        exit 1
    fi
done
statements=()
for f in $(grep -oE 'INT_FN\("[a-z_0-9]+"' tests/fixtures/c/batch_misbehaving.c | cut -d'"' -f2); do
    statements+=(-c "SELECT $f(x) FROM (VALUES (1), (NULL), (3)) t(x)")
done
for f in $(grep -oE 'STR_FN\("[a-z_0-9]+"' tests/fixtures/c/batch_misbehaving.c | cut -d'"' -f2); do
    statements+=(-c "SELECT $f(arrow_cast(s, 'Utf8')) FROM (VALUES ('one'), (NULL), ('três')) t(s)")
done
statements+=(-c "SELECT undeclared_null_nullable_arg(x) FROM (VALUES (1), (NULL)) t(x)")
# A v1 plugin returning a malloc'ed string from a function declared Int: refused and freed.
wrong_type=target/udf-fixtures/libmisbehaving_wrong_return_type_string.so
statements+=(-c "SELECT broken(x) FROM (VALUES (1), (2)) t(x)")
set +e
UDFSQL_HISTORY=/dev/null valgrind --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=3 \
    target/debug/udfsql --plugin "$corpus" --plugin "$wrong_type" --format csv "${statements[@]}" \
    > "$work/corpus.csv" 2> "$work/corpus.log"
code=$?
set -e
grep -E "definitely lost|ERROR SUMMARY" "$work/corpus.log"
if [ "$code" -eq 3 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$work/corpus.log"; then
    cat "$work/corpus.log"
    echo "valgrind found errors or definite leaks in the misbehaving batch corpus" >&2
    exit 1
fi
refused=$(grep -c "^error: .*plugin function" "$work/corpus.log" || true)
echo "misbehaving batch corpus: ${#statements[@]} statements, $refused refused with a plugin function error"
if [ "$refused" -lt 25 ]; then
    cat "$work/corpus.log"
    echo "expected at least 25 refused statements" >&2
    exit 1
fi

# Arrow types (ABI 2.2): the C library of decimal/list/struct functions with its nested
# misbehaving corpus (tests/fixtures/c/arrow_types.c), and the Rust vectorised functions; every
# result imported, validated and released (or refused and released), nothing read out of bounds.
arrow_c=target/udf-fixtures/libarrow_types.so
if [ ! -f "$arrow_c" ]; then
    echo "$arrow_c is missing: run cargo test --workspace first" >&2
    exit 1
fi
values="(VALUES (1, 1.5, 2.5, CAST(1.25 AS DECIMAL(12,2)), [1, NULL], 'a'), (NULL, NULL, 4.0, NULL, NULL, NULL), (3, 0.5, NULL, CAST(-2.00 AS DECIMAL(12,2)), [], 'c')) t(x, a, b, d, l, s)"
arrow_statements=(
    -c "SELECT c_decimal_double(d), c_list_len(l), c_pairs(x), c_point(a, b), c_id_struct(named_struct('name', s, 'score', a, 'tags', [s])), c_id_dec(d), c_id_utf8_view(s) FROM $values"
    -c "SELECT add_cents(d, x), list_total([a, b]), list_count([a]), pairs(x), city_of(address(s, s)), id_struct(named_struct('name', s, 'score', a, 'tags', [s])), id_ts_ms_paris(TIMESTAMP '2024-01-01 00:00:00'), id_large_list_utf8([s]) FROM $values"
)
for f in $(grep -oE 'FN\("bad_[a-z_0-9]+", (ONE|TWO)_[A-Z]+' tests/fixtures/c/arrow_types.c | sed -E 's/FN\("([a-z_0-9]+)", ([A-Z_]+)/\1:\2/'); do
    name=${f%%:*}
    case "$name" in
        bad_decimal_*) args="d" ;;
        bad_struct_*|bad_schema_*) args="a, b" ;;
        *) args="x" ;;
    esac
    arrow_statements+=(-c "SELECT $name($args) FROM $values")
done
set +e
UDFSQL_HISTORY=/dev/null valgrind --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=3 \
    target/debug/udfsql --plugin "$arrow_c" --plugin "$work/libudf_plugin_arrow_types.so" \
    --format csv "${arrow_statements[@]}" > "$work/arrow.csv" 2> "$work/arrow.log"
code=$?
set -e
grep -E "definitely lost|ERROR SUMMARY" "$work/arrow.log"
if [ "$code" -eq 3 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$work/arrow.log"; then
    cat "$work/arrow.log"
    echo "valgrind found errors or definite leaks with Arrow types" >&2
    exit 1
fi
refused=$(grep -c "^error: .*plugin function bad_" "$work/arrow.log" || true)
echo "Arrow types: ${#arrow_statements[@]} arguments, $refused nested results refused"
if [ "$refused" -lt 13 ] || [ "$(grep -c . "$work/arrow.csv")" -lt 8 ]; then
    cat "$work/arrow.csv" "$work/arrow.log"
    echo "expected 13 refused nested results and the two queries' rows" >&2
    exit 1
fi
# Aggregates (ABI 2.4): the stats plugin's (#[udaf], per-group and expert forms) in GROUP BY,
# without GROUP BY and in a sliding window, the C example, and the misbehaving C aggregates
# (tests/fixtures/c/aggregates.c built with -D<CASE> by the tests): every state and result
# imported, validated and released (or refused and released), every accumulator destroyed.
aggregate_session() {
    local name=$1
    shift
    set +e
    UDFSQL_HISTORY=/dev/null valgrind --leak-check=full --errors-for-leak-kinds=definite \
        --show-leak-kinds=definite --error-exitcode=3 \
        target/debug/udfsql --format csv "$@" > "$work/$name.csv" 2> "$work/$name.log"
    local code=$?
    set -e
    grep -E "definitely lost|ERROR SUMMARY" "$work/$name.log"
    if [ "$code" -eq 3 ] || ! grep -q "ERROR SUMMARY: 0 errors" "$work/$name.log"; then
        cat "$work/$name.log"
        echo "valgrind found errors or definite leaks in the aggregate session $name" >&2
        exit 1
    fi
}
groups="(VALUES (1, 'a'), (2, 'b'), (3, 'a'), (NULL, NULL)) t(x, s)"
aggregate_session stats --plugin "$work/libudf_plugin_stats.so" \
    -c "SELECT x % 2 AS k, my_sum(x), my_sum_vec(x), geo_mean(CAST(x AS DOUBLE)), median_exact(CAST(x AS DOUBLE)), hll_count(s), my_sum(DISTINCT x) FROM $groups GROUP BY x % 2 ORDER BY k" \
    -c "SELECT my_sum(x) OVER (ORDER BY x ROWS BETWEEN 1 PRECEDING AND CURRENT ROW), median_exact(CAST(x AS DOUBLE)) OVER (ORDER BY x) FROM $groups"
if [ "$(grep -c . "$work/stats.csv")" -ne 9 ]; then
    cat "$work/stats.csv" "$work/stats.log"
    echo "expected the two aggregate queries' headers and rows (3 + 4)" >&2
    exit 1
fi
for case in "" _short_state _short_result _wrong_type _null_buffer _one_field _released _update_error; do
    library=target/udf-fixtures/libaggregates$case.so
    if [ ! -f "$library" ]; then
        echo "$library is missing: run cargo test --workspace first" >&2
        exit 1
    fi
    aggregate_session "aggregates$case" --plugin "$library" \
        -c "SELECT s, c_sum(x) FROM $groups GROUP BY s ORDER BY s"
    if [ -n "$case" ] && ! grep -q "plugin aggregate c_sum" "$work/aggregates$case.log"; then
        cat "$work/aggregates$case.log"
        echo "the misbehaving aggregate$case was not refused with an error naming it" >&2
        exit 1
    fi
done
echo "aggregates: the stats plugin, the C example and 7 misbehaving C aggregates"

# Not here: an isolated session. Valgrind 3.19 (Debian 12) does not implement pidfd_open
# (syscall 434), which the host needs to watch its workers, so `udfsql --isolate` refuses to start
# a worker under memcheck ("pidfd_open: Function not implemented").
echo "valgrind: clean"
