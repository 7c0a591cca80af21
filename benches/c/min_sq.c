/* `sq(BIGINT) -> BIGINT` (x * x) written straight to the ABI in C, with nothing but what a batch
 * call needs: the argument read in place (left for the host to release), one result buffer, one
 * allocation for its private data. Columns without NULLs only (it is a yardstick, not a plugin):
 * `coldcall` compares the cold fixed cost of the generated `#[udf]` entry against it.
 *
 *   gcc -O2 -shared -fPIC -Iudf-abi/include benches/c/min_sq.c -o /tmp/libmin_sq.so
 *   cargo run --release -p udf-benches --bin coldcall -- /tmp/libmin_sq.so sq
 */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>
#include "udf_abi.h"

typedef struct Private { const void *buffers[2]; void *values; } Private;
static void release_array(struct ArrowArray *a) {
    Private *p = a->private_data; free(p->values); free(p); a->release = NULL;
}
static void release_bytes(UdfOwnedBytes b) { free(b.ptr); }
static void release_schema(struct ArrowSchema *s) { s->release = NULL; }
static int32_t sq_row(const UdfValue *args, size_t len, UdfValue *out, UdfOwnedBytes *error) {
    (void)len; (void)error; out->is_null = 0; out->value.int64 = args[0].value.int64 * args[0].value.int64; return UDF_STATUS_OK;
}
static int32_t sq_batch(struct ArrowArray *args, const struct ArrowSchema *schemas,
                        const uint8_t *is_scalar, size_t args_len, size_t num_rows,
                        struct ArrowArray *out, struct ArrowSchema *out_schema, UdfOwnedBytes *error) {
    (void)schemas; (void)args_len; (void)error; (void)is_scalar;
    struct ArrowArray in = args[0]; args[0].release = NULL;
    const int64_t *values = (const int64_t *)in.buffers[1] + in.offset;
    Private *p = malloc(sizeof *p);
    int64_t *o = malloc(num_rows ? num_rows * 8 : 8);
    for (size_t i = 0; i < num_rows; i++) o[i] = values[i] * values[i];
    in.release(&in);
    p->values = o; p->buffers[0] = NULL; p->buffers[1] = o;
    memset(out, 0, sizeof *out);
    out->length = (int64_t)num_rows; out->n_buffers = 2; out->buffers = p->buffers;
    out->private_data = p; out->release = release_array;
    memset(out_schema, 0, sizeof *out_schema);
    out_schema->format = "l"; out_schema->name = ""; out_schema->release = release_schema;
    return UDF_STATUS_OK;
}
static const uint32_t ARGS[] = {UDF_TYPE_INT64};
static const UdfFunction FUNCTIONS[] = {
    {{(const uint8_t *)"sq", 2}, ARGS, NULL, 1, UDF_TYPE_INT64, 0, UDF_VOLATILITY_IMMUTABLE, sq_row, sq_batch},
};
static const UdfManifest MANIFEST = {sizeof(UdfManifest), FUNCTIONS, 1, release_bytes, NULL, NULL, NULL, NULL, 0};
UdfAbiVersion udfsql_abi_version(void) { UdfAbiVersion v = {UDF_ABI_MAJOR, UDF_ABI_MINOR, sizeof(UdfManifest)}; return v; }
const UdfManifest *udfsql_manifest(void) { return &MANIFEST; }
