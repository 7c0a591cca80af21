/*
 * udf_abi.h - the C ABI between udfsql (the host) and plugin libraries.
 *
 * The same layout as the Rust crate `udf-abi`; the test suite compiles a C plugin against this
 * header and runs it through the engine, and checks the sizes below from both sides.
 *
 * Two ABIs: v1 (the seed contract, below) and v2 (further down).
 *
 * ABI v1 (the seed contract). A v1 plugin library exports exactly:
 *
 *     PluginMetadata plugin_metadata(void);
 *     PluginResult   plugin_entrypoint(const PluginValue *args, size_t args_len);
 *
 * Ownership, pointer by pointer:
 *   - PluginMetadata.name, PluginMetadata.arg_types: owned by the plugin; must stay valid while
 *     the library is loaded (point at static data). The host never frees them.
 *   - args (and every string it points to): owned by the host; valid only during the call. The
 *     plugin must not modify, free or keep them.
 *   - A string inside PluginResult.ok and the message PluginResult.err: handed to the host, which
 *     frees them with free(). Allocate them with malloc() (or strdup()).
 *
 * Calling rules:
 *   - The host validates the metadata and only ever calls plugin_entrypoint with args_len equal
 *     to arg_types_len and each value of the declared type.
 *   - A row with a SQL NULL argument is not passed to the plugin: its result is NULL.
 *   - plugin_entrypoint may be called from several threads at once: it must be thread-safe.
 *   - Strings are NUL-terminated UTF-8. An argument never contains an interior NUL byte.
 */
#ifndef UDF_ABI_H
#define UDF_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The largest arg_types_len a host accepts. */
#define UDF_ABI_MAX_ARGS 64

/* The type of an argument or result. The host refuses any other value. */
typedef enum PluginType {
    PLUGIN_TYPE_BOOL = 0,   /* bool; SQL BOOLEAN */
    PLUGIN_TYPE_INT = 1,    /* int64_t; SQL BIGINT */
    PLUGIN_TYPE_UINT = 2,   /* uint64_t; SQL BIGINT UNSIGNED */
    PLUGIN_TYPE_DOUBLE = 3, /* double; SQL DOUBLE */
    PLUGIN_TYPE_STRING = 4  /* NUL-terminated UTF-8 const char *; SQL VARCHAR */
} PluginType;

/* One value: the tag says which union member is valid and must match the declared type. */
typedef struct PluginValue {
    PluginType tag;
    union {
        bool bool_;           /* PLUGIN_TYPE_BOOL: 0 or 1 */
        int64_t int_;         /* PLUGIN_TYPE_INT */
        uint64_t uint_;       /* PLUGIN_TYPE_UINT */
        double double_;       /* PLUGIN_TYPE_DOUBLE */
        const char *string;   /* PLUGIN_TYPE_STRING: never NULL. As an argument owned by the
                                 host (valid during the call); as a result handed to the host,
                                 which frees it with free(). */
    } value;
} PluginValue;

/* What plugin_metadata() returns: the library's one function. */
typedef struct PluginMetadata {
    const char *name;           /* NUL-terminated UTF-8, not empty; static, owned by the plugin */
    const PluginType *arg_types;/* arg_types_len types; NULL only if arg_types_len == 0; static */
    size_t arg_types_len;       /* at most UDF_ABI_MAX_ARGS */
    PluginType return_type;
} PluginMetadata;

typedef enum PluginResultTag {
    PLUGIN_RESULT_OK = 0,
    PLUGIN_RESULT_ERR = 1
} PluginResultTag;

/* What plugin_entrypoint() returns. */
typedef struct PluginResult {
    PluginResultTag tag;
    union {
        PluginValue ok; /* PLUGIN_RESULT_OK: the result, of the declared return type */
        char *err;      /* PLUGIN_RESULT_ERR: a malloc()ed NUL-terminated UTF-8 message, freed
                           by the host with free(); must not be NULL */
    } value;
} PluginResult;

/* The two symbols of a v1 library. */
PluginMetadata plugin_metadata(void);
PluginResult plugin_entrypoint(const PluginValue *args, size_t args_len);

/* ============================================================================================
 * ABI v2: versioned, many functions per library, NULL-aware, pointer + length strings, and
 * memory released by whoever allocated it. A v2 library exports exactly:
 *
 *     UdfAbiVersion      udfsql_abi_version(void);   -- checked first
 *     const UdfManifest *udfsql_manifest(void);      -- every function of the library
 *
 * A library without udfsql_abi_version is a v1 library. A host refuses a library whose major
 * version differs from its own; a newer minor version may only append fields to UdfManifest.
 *
 * Ownership, pointer by pointer:
 *   - The manifest, every UdfFunction, their names, arg_types and arg_nullable arrays: owned by
 *     the plugin, static, valid while the library is loaded. The host never frees them.
 *   - args (and the bytes every Utf8/Binary argument points to): owned by the host, valid only
 *     during the call. The plugin must not modify, free or keep them.
 *   - A Utf8/Binary result (out->value.owned) and an error message (*error): allocated by the
 *     plugin and handed to the host, which copies them and then passes them back, unchanged,
 *     to the manifest's release_bytes. The host never frees plugin memory itself.
 *
 * Calling rules:
 *   - A value has no type tag: its type is the declared one.
 *   - An argument whose arg_nullable flag is 0 is never NULL (the host skips the row: STRICT).
 *   - A result with is_null = 1 is SQL NULL; only allowed when return_nullable is 1.
 *   - Entrypoints may run on several threads at once; they must be thread-safe.
 * ============================================================================================ */

#define UDF_ABI_MAJOR 2
#define UDF_ABI_MINOR 4   /* 2.4 appends UdfManifest.aggregates and .aggregates_len; 2.3 appends
                             UdfManifest.async_functions and .unload; 2.1 defines UdfFunction.call_batch;
                             2.2 appends UdfManifest.arrow_types and allows batch-only functions */
#define UDF_MANIFEST_SIZE_2_3 (7 * sizeof(size_t)) /* sizeof(UdfManifest) of ABI 2.3 */
#define UDF_MANIFEST_SIZE_2_0 (4 * sizeof(size_t)) /* sizeof(UdfManifest) of ABI 2.0 and 2.1 */

/* The Arrow C Data Interface (https://arrow.apache.org/docs/format/CDataInterface.html), for the
 * batch entrypoint. */
#ifndef ARROW_C_DATA_INTERFACE
#define ARROW_C_DATA_INTERFACE
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};
#endif /* ARROW_C_DATA_INTERFACE */

/* Value types. Tags 0..4 equal v1's PluginType. */
typedef enum UdfType {
    UDF_TYPE_BOOL = 0,             /* value.boolean: 0 or 1 */
    UDF_TYPE_INT64 = 1,            /* value.int64 */
    UDF_TYPE_UINT64 = 2,           /* value.uint64 */
    UDF_TYPE_FLOAT64 = 3,          /* value.float64 */
    UDF_TYPE_UTF8 = 4,             /* value.bytes (argument) / value.owned (result); UTF-8, no NUL
                                      terminator, NUL bytes allowed */
    UDF_TYPE_INT32 = 5,            /* value.int32 */
    UDF_TYPE_FLOAT32 = 6,          /* value.float32 */
    UDF_TYPE_BINARY = 7,           /* value.bytes / value.owned */
    UDF_TYPE_DATE32 = 8,           /* value.int32: days since 1970-01-01 */
    UDF_TYPE_TIMESTAMP_MICROS = 9  /* value.int64: microseconds since the epoch, UTC */
} UdfType;

/* ABI 2.2: the tag of an argument or result whose type is an Arrow type string in
 * UdfManifest.arrow_types (see UdfArrowTypes). */
#define UDF_TYPE_ARROW 0xFFFFFFFFu
#define UDF_MAX_TYPE_STRING_LEN 4096

#define UDF_VOLATILITY_IMMUTABLE 0 /* same result for the same arguments: may be folded */
#define UDF_VOLATILITY_STABLE 1    /* same result within one query */
#define UDF_VOLATILITY_VOLATILE 2  /* may change on every call: never folded */

#define UDF_STATUS_OK 0            /* *out holds the result */
#define UDF_STATUS_ERROR 1         /* *error holds a UTF-8 message */
#define UDF_STATUS_RETRY 2         /* 2.3, async completions only: a temporary failure */

typedef struct UdfAbiVersion {
    uint32_t major;                /* UDF_ABI_MAJOR the library was built with */
    uint32_t minor;                /* UDF_ABI_MINOR the library was built with */
    size_t manifest_size;          /* sizeof(UdfManifest) as the library was built */
} UdfAbiVersion;

/* Borrowed bytes: len bytes at ptr (ptr may be anything when len is 0). */
typedef struct UdfBytes {
    const uint8_t *ptr;
    size_t len;
} UdfBytes;

/* Bytes the plugin allocated and hands to the host; the host gives them back, unchanged, to
 * release_bytes. capacity is for the plugin's own bookkeeping. ptr NULL means nothing. */
typedef struct UdfOwnedBytes {
    uint8_t *ptr;
    size_t len;
    size_t capacity;
} UdfOwnedBytes;

typedef union UdfScalar {
    uint8_t boolean;
    int32_t int32;
    int64_t int64;
    uint64_t uint64;
    float float32;
    double float64;
    UdfBytes bytes;                /* Utf8/Binary arguments: owned by the host */
    UdfOwnedBytes owned;           /* Utf8/Binary results: owned by the plugin until released */
} UdfScalar;

typedef struct UdfValue {
    uint8_t is_null;               /* 1 for SQL NULL (value is then meaningless) */
    UdfScalar value;
} UdfValue;

/* Evaluates one row. args: args_len host-owned values of the declared types. out, error: where
 * the plugin writes the result, or an error message when it returns UDF_STATUS_ERROR. */
typedef int32_t (*UdfRowEntrypoint)(const UdfValue *args, size_t args_len, UdfValue *out,
                                    UdfOwnedBytes *error);

/* Gives back bytes the plugin handed to the host (results and error messages). */
typedef void (*UdfReleaseBytes)(UdfOwnedBytes bytes);

/* ABI 2.1: evaluates a function over whole columns.
 *   args:          args_len arrays MOVED to the plugin (C Data Interface move semantics: the
 *                  plugin copies the struct and sets the original's release to NULL, then calls
 *                  release when done). The host releases any array left in place after the call.
 *                  Types: the declared type's canonical Arrow type (String may also be large_utf8
 *                  or utf8_view, Binary large_binary or binary_view: see arg_schemas).
 *   arg_schemas:   args_len schemas, borrowed (owned by the host) for the call.
 *   arg_is_scalar: args_len flags; 1 = a one-row array standing for every row.
 *   num_rows:      rows to compute.
 *   out, out_schema: the plugin writes an array of num_rows rows of the declared return type
 *                  and its schema; the host owns both from then on and calls their release
 *                  (plugin code) when done. The host checks the type, length, buffers, UTF-8 and
 *                  NULLs against the declaration (buffer sizes are not part of the interface).
 *   error:         message for UDF_STATUS_ERROR, released through release_bytes.
 * A row where an argument that does not take NULLs is NULL is NULL: its value slot holds any
 * bytes (e.g. after a filter), so do not compute the function there (the host masks such rows
 * whatever the plugin writes). With scalar arguments, an immutable function may compute its
 * value once for every row; a stable or volatile one computes every row (the code #[udf]
 * generates does both, and reports a panic as UDF_STATUS_ERROR with its message and location). */
typedef int32_t (*UdfBatchEntrypoint)(struct ArrowArray *args, const struct ArrowSchema *arg_schemas,
                                      const uint8_t *arg_is_scalar, size_t args_len,
                                      size_t num_rows, struct ArrowArray *out,
                                      struct ArrowSchema *out_schema, UdfOwnedBytes *error);

typedef struct UdfFunction {
    UdfBytes name;                 /* UTF-8, not empty, unique in the library; static */
    const uint32_t *arg_types;     /* args_len UdfType tags; NULL only if args_len == 0; static */
    const uint8_t *arg_nullable;   /* args_len flags (1 = receives NULLs); NULL = none; static */
    size_t args_len;               /* at most UDF_ABI_MAX_ARGS */
    uint32_t return_type;          /* a UdfType tag */
    uint8_t return_nullable;       /* 1 if the function may return NULL */
    uint32_t volatility;           /* UDF_VOLATILITY_* */
    UdfRowEntrypoint call_row;     /* must not be NULL before 2.2; from 2.2 NULL means batch only
                                      (and it is never called for a function with an Arrow type) */
    UdfBatchEntrypoint call_batch; /* optional (NULL: rows only); ignored in 2.0 libraries */
} UdfFunction;

/* ABI 2.2: the Arrow types of one function. For each argument and the result: NULL (its UdfType
 * tag applies) or, where the tag is UDF_TYPE_ARROW, a NUL-terminated Arrow type string: a C Data
 * Interface format with the children of nested types in angle brackets:
 *     type  := format | "+l<" type ">" | "+L<" type ">" | "+s<" name ":" type (";" name ":" type)* ">"
 *     format: b c C s S i I l L f g  d:P,S (Decimal128)  u U vu  z Z  tdD  ts{s,m,u,n}:[ZONE]
 *             tD{s,m,u,n} (Duration)  tin (Interval MonthDayNano)
 * e.g. "d:12,2", "tsu:Europe/Paris", "+l<g>", "+s<street:u;zip:i>". Children are nullable; a
 * list's child may have any name in results. Such a function runs through call_batch only:
 * arguments arrive as arrays of exactly the declared type; the result must be of exactly the
 * declared type, and the host validates every level (buffers, offsets against the child's
 * length, child lengths, struct field count and names, UTF-8, decimal precision). A zone must
 * be an IANA name ("Europe/Paris", "UTC") or an offset ("+05:30"); others are refused at load.
 * A type string that starts with '!' is the library's reason for not declaring the function's
 * types (the host refuses the function with that message).
 * The host reads a function's entry only when one of its tags is UDF_TYPE_ARROW, and dereferences
 * a type string only where its tag is. */
typedef struct UdfArrowTypes {
    const char *const *arg_formats; /* args_len entries (each NULL or a type string), or NULL */
    const char *return_format;      /* NULL or a type string */
} UdfArrowTypes;

/* ABI 2.3: asynchronous functions (I/O from SQL: lookups, HTTP, model calls).
 *
 * A function is asynchronous when its UdfAsyncFunction entry (in UdfManifest.async_functions,
 * parallel to functions) has a non-NULL start. The host then calls only start and cancel for it,
 * never call_row or call_batch (leave them NULL). It splits a batch into calls of at most
 * chunk_rows rows, keeps at most max_in_flight calls of the function started and not completed,
 * and assembles the results in row order (both are the host's settings; the values here are the
 * library's defaults, 0 = the host's default).
 *
 * start(args, arg_schemas, arg_is_scalar, args_len, num_rows, completion, call, error):
 *   begins one call and returns at once; it must not wait for I/O. The arguments are as for
 *   UdfBatchEntrypoint (arrays MOVED to the plugin; schemas and flags valid only until start
 *   returns: copy what the call needs later). `call` is the host's number for the call (for
 *   cancel). Returns UDF_STATUS_OK when the call started: the plugin then calls
 *   completion.complete(completion.context, status, out, out_schema, error) EXACTLY ONCE, from
 *   any thread, at any time (even before start returns):
 *     UDF_STATUS_OK:    *out / *out_schema hold num_rows rows of the declared return type,
 *                       MOVED to the host (it copies them and sets their release to NULL);
 *                       checked as a batch result. error: empty ({NULL, 0, 0}).
 *     UDF_STATUS_ERROR: error is the message (released through release_bytes); out and
 *                       out_schema may be NULL.
 *     UDF_STATUS_RETRY: as UDF_STATUS_ERROR, for a temporary failure: the host starts the
 *                       same rows again after a short wait when the function's retries allow
 *                       it (#retries=N from SQL; none by default), else fails the query.
 *   Returns UDF_STATUS_ERROR with *error set when the call could not start: then complete must
 *   never be called for it.
 * cancel(call): optional. The query was cancelled or the call's time limit passed: stop early
 *   if you can. The plugin still calls complete exactly once for the call (any status); the host
 *   releases that outcome unread. May come from any thread, also after the call completed.
 * unload(): optional (UdfManifest.unload). Called once, after every call of the library
 *   completed, right before the host unmaps the library: return only when none of the library's
 *   threads runs any more.
 *
 * What the host does with a plugin that breaks these rules: a second complete for a call, or one
 * for a call it never started, is released and reported (never read twice); a result of the
 * wrong length, type or NULLs fails the query naming the function; a call that never completes
 * fails the query at the call's time limit, and keeps the library mapped for the rest of the
 * process (its threads may still run its code). complete never dereferences context: it is the
 * host's number for the call, not a pointer the plugin could forge. */
typedef struct UdfCompletion {
    void *context; /* the host's; pass it back unchanged */
    void (*complete)(void *context, int32_t status, struct ArrowArray *out,
                     struct ArrowSchema *out_schema, UdfOwnedBytes error);
} UdfCompletion;

typedef int32_t (*UdfAsyncStart)(struct ArrowArray *args, const struct ArrowSchema *arg_schemas,
                                 const uint8_t *arg_is_scalar, size_t args_len, size_t num_rows,
                                 UdfCompletion completion, uint64_t call, UdfOwnedBytes *error);
typedef void (*UdfAsyncCancel)(uint64_t call);
typedef void (*UdfUnloadHook)(void);

typedef struct UdfAsyncFunction {
    UdfAsyncStart start;    /* NULL: the function is synchronous (the rest is ignored) */
    UdfAsyncCancel cancel;  /* optional */
    uint32_t max_in_flight; /* the library's default for calls in flight; 0 = the host's (64) */
    uint32_t chunk_rows;    /* the library's default rows per call; 0 = the host's */
} UdfAsyncFunction;

/* ============================================================================================
 * Aggregate functions (ABI 2.4): usable with GROUP BY, FILTER (WHERE ...), DISTINCT, and as
 * window functions (OVER (...); frames that slide need `retract`). Every type is an Arrow type
 * string (see UdfArrowTypes). One accumulator holds the state of any number of groups, numbered
 * from 0; the host never calls two entrypoints on the same accumulator at once (different
 * accumulators may be used from different threads).
 *
 *   create(error)                      -> a new accumulator with no groups, or NULL + *error
 *   update(acc, args, schemas, args_len, num_rows, group_indices, filter, total_groups, error)
 *       args: args_len arrays of the declared argument types, num_rows rows each, MOVED to the
 *       plugin (take them, or leave them: the host releases what is left); schemas lent.
 *       group_indices: num_rows group numbers < total_groups, or NULL: every row in group 0
 *       (then total_groups is 1). filter: NULL or num_rows bytes, 1 = the row counts.
 *       total_groups only grows between emits; new groups start empty. NULLs are passed as
 *       they are: the plugin decides (SQL aggregates usually skip them).
 *   merge(...)   same shape; the columns are the declared state fields (partial states made by
 *                `state` of the same function, maybe in another process)
 *   retract(...) optional, same shape: removes rows an earlier update added (sliding frames)
 *   evaluate(acc, mode, first, out, out_schema, error)
 *                one array of the result type, one row per group asked for
 *   state(acc, mode, first, out, out_schema, error)
 *                one struct array ("+s") whose fields are the state fields, in order, by name
 *       mode UDF_EMIT_PEEK: every group, kept; UDF_EMIT_TAKE_ALL: every group, then none are
 *       left; UDF_EMIT_TAKE_FIRST: the first `first` groups, then the others are renumbered from
 *       0. "Every group" is the largest total_groups given since the last emit that dropped them.
 *   size(acc)    optional: the bytes the accumulator holds (for the host's memory accounting)
 *   destroy(acc) once per accumulator
 *
 * The host validates every array it receives (type, length, buffers at every level, UTF-8)
 * before using it. Entrypoints return UDF_STATUS_OK or UDF_STATUS_ERROR and must not unwind.
 * Prefer designated initializers (.name = ..., .create = ...) for UdfAggregateFunction and
 * UdfManifest: later minors append fields.
 * ============================================================================================ */
#define UDF_EMIT_PEEK 0
#define UDF_EMIT_TAKE_ALL 1
#define UDF_EMIT_TAKE_FIRST 2
#define UDF_MAX_AGGREGATES 1024
#define UDF_MAX_STATE_FIELDS 64

typedef void *(*UdfAggregateCreate)(UdfOwnedBytes *error);
typedef int32_t (*UdfAggregateUpdate)(void *acc, struct ArrowArray *args,
                                      const struct ArrowSchema *arg_schemas, size_t args_len,
                                      size_t num_rows, const size_t *group_indices,
                                      const uint8_t *filter, size_t total_groups,
                                      UdfOwnedBytes *error);
typedef int32_t (*UdfAggregateEmit)(void *acc, uint32_t mode, size_t first, struct ArrowArray *out,
                                    struct ArrowSchema *out_schema, UdfOwnedBytes *error);
typedef size_t (*UdfAggregateSize)(void *acc);
typedef void (*UdfAggregateDestroy)(void *acc);

typedef struct UdfAggregateFunction {
    UdfBytes name;                   /* SQL name, unique in the library (scalars included) */
    const char *const *arg_formats;  /* args_len type strings; NULL only when args_len is 0 */
    size_t args_len;                 /* at most UDF_ABI_MAX_ARGS */
    const char *const *state_names;  /* state_len field names (1..=256 bytes, no : ; < >) */
    const char *const *state_formats; /* state_len type strings */
    size_t state_len;                /* 1..=UDF_MAX_STATE_FIELDS */
    const char *return_format;       /* the result's type string (the result is nullable) */
    uint32_t volatility;             /* UDF_VOLATILITY_* */
    uint32_t flags;                  /* reserved: 0 */
    UdfAggregateCreate create;       /* required */
    UdfAggregateUpdate update;       /* required */
    UdfAggregateUpdate merge;        /* required */
    UdfAggregateUpdate retract;      /* optional: NULL refuses sliding window frames */
    UdfAggregateEmit evaluate;       /* required */
    UdfAggregateEmit state;          /* required */
    UdfAggregateSize size;           /* optional */
    UdfAggregateDestroy destroy;     /* required */
} UdfAggregateFunction;

typedef struct UdfManifest {
    size_t size;                   /* sizeof(UdfManifest) as built */
    const UdfFunction *functions;  /* functions_len entries; static */
    size_t functions_len;
    UdfReleaseBytes release_bytes; /* must not be NULL */
    const UdfArrowTypes *arrow_types; /* 2.2: functions_len entries parallel to functions, or NULL */
    const UdfAsyncFunction *async_functions; /* 2.3: functions_len entries parallel, or NULL */
    UdfUnloadHook unload;          /* 2.3: optional */
    const UdfAggregateFunction *aggregates; /* 2.4: aggregates_len entries, or NULL */
    size_t aggregates_len;         /* 2.4: at most UDF_MAX_AGGREGATES; functions_len may be 0 */
} UdfManifest;

UdfAbiVersion udfsql_abi_version(void);
const UdfManifest *udfsql_manifest(void);

#ifdef __cplusplus
}
#endif

#endif /* UDF_ABI_H */
