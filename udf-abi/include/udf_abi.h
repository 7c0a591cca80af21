/*
 * udf_abi.h - the C ABI between udfsql (the host) and plugin libraries.
 *
 * The same layout as the Rust crate `udf-abi`; the test suite compiles a C plugin against this
 * header and runs it through the engine, and checks the sizes below from both sides.
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

#ifdef __cplusplus
}
#endif

#endif /* UDF_ABI_H */
