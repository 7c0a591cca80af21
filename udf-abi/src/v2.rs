//! ABI v2: versioned, many functions per library, NULL-aware, strings and binary as pointer +
//! length, and memory released by whoever allocated it.
//!
//! A v2 library exports two functions with C linkage (the `#[udf]` macro writes both):
//!
//! ```c
//! UdfAbiVersion    udfsql_abi_version(void);   // checked first, before anything else
//! const UdfManifest *udfsql_manifest(void);    // every function of the library
//! ```
//!
//! A library without `udfsql_abi_version` is a v1 (seed contract) library; so is a library whose
//! manifest lists no function but which exports the v1 symbols (a v1 plugin built against this
//! crate carries its empty v2 exports). A host refuses a library
//! whose major version differs from [`ABI_MAJOR`]; a newer minor version may append fields to
//! [`UdfManifest`] (the host reads only the first [`UdfAbiVersion::manifest_size`] bytes it knows).
//!
//! # Ownership
//!
//! * The manifest and everything it points to belong to the plugin and must stay valid while the
//!   library is loaded (statics).
//! * Arguments belong to the host and are valid only during the call; the plugin must not modify,
//!   free or keep them.
//! * A returned `Utf8`/`Binary` value and an error message are [`UdfOwnedBytes`] allocated by the
//!   plugin. The host copies them and then hands them back through
//!   [`UdfManifest::release_bytes`]; the host never frees plugin memory with its own allocator.
//!
//! # Calling rules
//!
//! * Values carry no type tag: their type is the one declared in the manifest.
//! * An argument declared not nullable is never NULL: the host skips the row and yields NULL (the
//!   STRICT rule). A nullable argument may arrive with `is_null = 1`.
//! * A result with `is_null = 1` is SQL NULL; allowed only when the return is declared nullable.
//! * Entrypoints may be called from several threads at once and must not unwind.

pub use arrow_data::ffi::FFI_ArrowArray;
pub use arrow_schema::ffi::FFI_ArrowSchema;

/// The ABI major version this crate describes. A host refuses libraries of another major.
pub const ABI_MAJOR: u32 = 2;
/// The ABI minor version this crate describes. Minors add fields at the end of the manifest or
/// give meaning to reserved ones: 2.1 defines [`UdfFunction::call_batch`], 2.2 appends
/// [`UdfManifest::arrow_types`] (Arrow types declared by format strings) and lets a function
/// with a batch entrypoint leave [`UdfFunction::call_row`] null, 2.3 appends
/// [`UdfManifest::async_functions`] and [`UdfManifest::unload`] (asynchronous functions), 2.4
/// appends [`UdfManifest::aggregates`] (aggregate functions, usable as window functions).
pub const ABI_MINOR: u32 = 4;
/// `sizeof(UdfManifest)` of ABI 2.0 and 2.1 (four pointer-sized fields): the least a host reads.
pub const MANIFEST_SIZE_2_0: usize = 4 * std::mem::size_of::<usize>();
/// `sizeof(UdfManifest)` of ABI 2.2 (five pointer-sized fields).
pub const MANIFEST_SIZE_2_2: usize = 5 * std::mem::size_of::<usize>();
/// `sizeof(UdfManifest)` of ABI 2.3 (seven pointer-sized fields).
pub const MANIFEST_SIZE_2_3: usize = 7 * std::mem::size_of::<usize>();
/// The type tag of an argument or result declared by an Arrow type string in
/// [`UdfManifest::arrow_types`] (ABI 2.2) instead of by a [`UdfType`]. A host of ABI 2.1 or
/// older refuses it as an unknown tag.
pub const TYPE_ARROW: u32 = u32::MAX;
/// The longest Arrow type string a host reads, in bytes.
pub const MAX_TYPE_STRING_LEN: usize = 4096;
/// `UdfAbiVersion udfsql_abi_version(void)`: the handshake.
pub const SYMBOL_ABI_VERSION: &str = "udfsql_abi_version";
/// `const UdfManifest *udfsql_manifest(void)`: the list of functions.
pub const SYMBOL_MANIFEST: &str = "udfsql_manifest";

/// The handshake answer. Returned by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdfAbiVersion {
    /// [`ABI_MAJOR`] of the `udf-abi` the library was built with.
    pub major: u32,
    /// [`ABI_MINOR`] of the `udf-abi` the library was built with.
    pub minor: u32,
    /// `sizeof(UdfManifest)` as the library was built.
    pub manifest_size: usize,
}

impl UdfAbiVersion {
    /// The version of this crate.
    pub const CURRENT: UdfAbiVersion = UdfAbiVersion {
        major: ABI_MAJOR,
        minor: ABI_MINOR,
        manifest_size: std::mem::size_of::<UdfManifest>(),
    };
}

/// A value type. The tags 0 to 4 equal v1's [`PluginType`](crate::PluginType) tags.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UdfType {
    /// `bool` (`UdfScalar::boolean`, 0 or 1); SQL `BOOLEAN`.
    Bool = 0,
    /// `i64` (`int64`); SQL `BIGINT`.
    Int64 = 1,
    /// `u64` (`uint64`); SQL `BIGINT UNSIGNED`.
    UInt64 = 2,
    /// `f64` (`float64`); SQL `DOUBLE`.
    Float64 = 3,
    /// UTF-8 bytes (`bytes`, not NUL-terminated; NUL bytes allowed); SQL `VARCHAR`.
    Utf8 = 4,
    /// `i32` (`int32`); SQL `INT`.
    Int32 = 5,
    /// `f32` (`float32`); SQL `REAL`.
    Float32 = 6,
    /// Bytes (`bytes`); SQL `BYTEA`.
    Binary = 7,
    /// Days since 1970-01-01 as `i32` (`int32`); SQL `DATE`. Rust: [`Date`].
    Date32 = 8,
    /// Microseconds since 1970-01-01T00:00:00 UTC as `i64` (`int64`); SQL `TIMESTAMP` in UTC.
    /// Rust: [`Timestamp`].
    TimestampMicros = 9,
}

impl UdfType {
    /// Every type, in tag order.
    pub const ALL: [UdfType; 10] = [
        UdfType::Bool,
        UdfType::Int64,
        UdfType::UInt64,
        UdfType::Float64,
        UdfType::Utf8,
        UdfType::Int32,
        UdfType::Float32,
        UdfType::Binary,
        UdfType::Date32,
        UdfType::TimestampMicros,
    ];

    /// The C tag.
    pub const fn tag(self) -> u32 {
        self as u32
    }

    /// The type with C tag `tag`, or `None` for a tag this ABI does not define.
    pub const fn from_tag(tag: u32) -> Option<UdfType> {
        if (tag as usize) < Self::ALL.len() {
            Some(Self::ALL[tag as usize])
        } else {
            None
        }
    }

    /// The name used in signatures and error messages.
    pub const fn name(self) -> &'static str {
        match self {
            UdfType::Bool => "Bool",
            UdfType::Int64 => "Int",
            UdfType::UInt64 => "UInt",
            UdfType::Float64 => "Double",
            UdfType::Utf8 => "String",
            UdfType::Int32 => "Int32",
            UdfType::Float32 => "Float32",
            UdfType::Binary => "Binary",
            UdfType::Date32 => "Date",
            UdfType::TimestampMicros => "Timestamp",
        }
    }
}

impl From<crate::PluginType> for UdfType {
    fn from(t: crate::PluginType) -> Self {
        match t {
            crate::PluginType::Bool => UdfType::Bool,
            crate::PluginType::Int => UdfType::Int64,
            crate::PluginType::UInt => UdfType::UInt64,
            crate::PluginType::Double => UdfType::Float64,
            crate::PluginType::String => UdfType::Utf8,
        }
    }
}

impl std::fmt::Display for UdfType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Volatility tags for [`UdfFunction::volatility`].
pub mod volatility {
    /// Same result for the same arguments: may be evaluated once at planning time.
    pub const IMMUTABLE: u32 = 0;
    /// Same result within one query.
    pub const STABLE: u32 = 1;
    /// May differ on every call (random, clocks): never folded.
    pub const VOLATILE: u32 = 2;
}

/// Borrowed bytes: `len` bytes at `ptr` (`ptr` may be dangling when `len` is 0).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfBytes {
    /// The first byte.
    pub ptr: *const u8,
    /// The number of bytes.
    pub len: usize,
}

/// Bytes allocated by the plugin and handed to the host, which returns them through
/// [`UdfManifest::release_bytes`] (never frees them itself). `capacity` is for the plugin's own
/// bookkeeping (a Rust `Vec`'s capacity); the host passes it back unchanged.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfOwnedBytes {
    /// The first byte; null means "nothing to release".
    pub ptr: *mut u8,
    /// The number of bytes.
    pub len: usize,
    /// The allocation's capacity, as the plugin needs it to free.
    pub capacity: usize,
}

impl UdfOwnedBytes {
    /// Nothing.
    pub const EMPTY: UdfOwnedBytes = UdfOwnedBytes {
        ptr: std::ptr::null_mut(),
        len: 0,
        capacity: 0,
    };
}

/// The payload of a [`UdfValue`]; which member is valid follows from the declared type.
#[repr(C)]
#[derive(Clone, Copy)]
pub union UdfScalar {
    /// `Bool`: 0 or 1.
    pub boolean: u8,
    /// `Int32`, `Date32`.
    pub int32: i32,
    /// `Int64`, `TimestampMicros`.
    pub int64: i64,
    /// `UInt64`.
    pub uint64: u64,
    /// `Float32`.
    pub float32: f32,
    /// `Float64`.
    pub float64: f64,
    /// `Utf8`, `Binary` arguments (borrowed from the host).
    pub bytes: UdfBytes,
    /// `Utf8`, `Binary` results (handed to the host, released through `release_bytes`).
    pub owned: UdfOwnedBytes,
}

impl std::fmt::Debug for UdfScalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdfScalar { .. }")
    }
}

/// One argument or result value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfValue {
    /// 1 for SQL NULL (then `value` is meaningless), else 0.
    pub is_null: u8,
    /// The value, of the declared type.
    pub value: UdfScalar,
}

impl UdfValue {
    /// A NULL value.
    pub const NULL: UdfValue = UdfValue {
        is_null: 1,
        value: UdfScalar { int64: 0 },
    };
}

/// Status codes of [`RowEntrypoint`].
pub mod status {
    /// `*out` holds the result.
    pub const OK: i32 = 0;
    /// `*error` holds a UTF-8 message (released through `release_bytes`).
    pub const ERROR: i32 = 1;
    /// ABI 2.3, asynchronous completions only: a temporary failure (a timeout, a refused
    /// connection, HTTP 503). `error` is the message, as for [`ERROR`]; the host starts the call
    /// again when the function's retries allow it (`#retries=N`, none by default), else fails
    /// the query with the message. Anywhere else it is an invalid status.
    pub const RETRY: i32 = 2;
}

/// Evaluates a function for one row.
///
/// * `args`: `args_len` values owned by the host, of the declared types, valid during the call.
/// * `out`: where the plugin writes the result (a `Utf8`/`Binary` result in `value.owned`).
/// * `error`: where the plugin writes an error message when it returns [`status::ERROR`].
///
/// Returns [`status::OK`] or [`status::ERROR`]; must not unwind.
pub type RowEntrypoint = unsafe extern "C" fn(
    args: *const UdfValue,
    args_len: usize,
    out: *mut UdfValue,
    error: *mut UdfOwnedBytes,
) -> i32;

/// Releases bytes the plugin handed to the host (results and error messages).
pub type ReleaseBytes = unsafe extern "C" fn(bytes: UdfOwnedBytes);

/// Evaluates a function over whole columns, with the Arrow C Data Interface (ABI 2.1).
///
/// * `args`: `args_len` arrays, one per argument, each of its declared type's canonical Arrow type
///   except that `String` arguments may be `Utf8`, `LargeUtf8` or `Utf8View` and `Binary` ones
///   `Binary`, `LargeBinary` or `BinaryView` (their schemas say which). The arrays are **moved**
///   to the plugin (C Data Interface move semantics): the plugin takes them (setting the
///   original's `release` to null, as `FFI_ArrowArray::from_raw` does) and releases them when done;
///   the host releases any array the plugin left in place after the call.
/// * `arg_schemas`: `args_len` schemas, borrowed for the call.
/// * `arg_is_scalar`: `args_len` flags; 1 means the array has one row that stands for every row
///   (a constant argument, not expanded).
/// * `num_rows`: the number of rows to compute.
/// * `out`, `out_schema`: where the plugin writes the result: an array of `num_rows` rows of the
///   declared return type's canonical Arrow type and its schema, both released by the host through
///   their `release` callbacks. The host validates them (type, length, buffers, UTF-8, NULLs only
///   where declared); it cannot check buffer sizes, which the C Data Interface does not carry.
/// * `error`: where the plugin writes a message when it returns [`status::ERROR`].
///
/// The same NULL rule as for rows: a row with a NULL in an argument that does not take NULLs
/// gives NULL. Must not unwind.
pub type BatchEntrypoint = unsafe extern "C" fn(
    args: *mut FFI_ArrowArray,
    arg_schemas: *const FFI_ArrowSchema,
    arg_is_scalar: *const u8,
    args_len: usize,
    num_rows: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
) -> i32;

/// How an asynchronous call reports its outcome (ABI 2.3): the plugin calls
/// `complete(context, status, out, out_schema, error)` **exactly once** per started call, from
/// any thread, at any time after `start` was entered (also before `start` returns).
///
/// * [`status::OK`]: `out` and `out_schema` point at the result array (`num_rows` rows of the
///   declared return type) and its schema, **moved** to the host (it copies the structs and sets
///   the plugin's `release` to null, as the C Data Interface's move semantics say); the host
///   checks them as a batch result. `error` is ignored (pass an empty [`UdfOwnedBytes`]; a
///   non-empty one is released).
/// * [`status::ERROR`]: `error` is the message, released through `release_bytes`; `out` and
///   `out_schema` may be null (an array passed anyway is released).
/// * [`status::RETRY`]: as `ERROR`, for a temporary failure the host may retry (a new `start`
///   of the same rows, after a short wait) when the function's retries allow it.
///
/// `context` is the host's and is passed back unchanged; the host never dereferences it as a
/// pointer the plugin could have forged. `complete` returns promptly (it never waits for I/O or
/// for the query).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfCompletion {
    /// Passed back unchanged.
    pub context: *mut std::ffi::c_void,
    /// The host's completion function; never null.
    pub complete: Option<CompleteFn>,
}

/// The host's completion function (see [`UdfCompletion`]).
pub type CompleteFn = unsafe extern "C" fn(
    context: *mut std::ffi::c_void,
    status: i32,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: UdfOwnedBytes,
);

/// Starts one asynchronous call over whole columns (ABI 2.3) and returns without waiting for
/// its outcome.
///
/// * `args`, `arg_schemas`, `arg_is_scalar`, `args_len`, `num_rows`: as for [`BatchEntrypoint`]
///   (the arrays are moved to the plugin; the schemas and flags are valid only until `start`
///   returns: copy what the call needs later).
/// * `completion`: how the outcome is reported, exactly once, when `start` returns
///   [`status::OK`].
/// * `call`: the host's number for this call, passed to the cancel entrypoint.
/// * `error`: the message when `start` returns [`status::ERROR`]: the call did not start, and
///   `completion` must then never be called.
///
/// Must not block on I/O and must not unwind.
pub type AsyncStart = unsafe extern "C" fn(
    args: *mut FFI_ArrowArray,
    arg_schemas: *const FFI_ArrowSchema,
    arg_is_scalar: *const u8,
    args_len: usize,
    num_rows: usize,
    completion: UdfCompletion,
    call: u64,
    error: *mut UdfOwnedBytes,
) -> i32;

/// Asks the plugin to stop call `call` early (ABI 2.3): the query was cancelled or the call's
/// time limit passed. The plugin still completes the call exactly once (any status); the host
/// ignores that outcome and releases what it carries. Called from any thread, possibly after the
/// call completed (then it does nothing). Must not block and must not unwind.
pub type AsyncCancel = unsafe extern "C" fn(call: u64);

/// Stops the library's threads before the host unmaps it (ABI 2.3): called once, after every
/// call of the library completed, right before `dlclose`. Must return only when no thread runs
/// the library's code any more.
pub type UnloadHook = unsafe extern "C" fn();

/// The asynchronous side of one function (ABI 2.3), in [`UdfManifest::async_functions`],
/// parallel to [`UdfManifest::functions`]. A function whose `start` is not null is
/// **asynchronous**: the host calls only `start` (and `cancel`) for it, never `call_row` or
/// `call_batch` (leave them null). `start` null: the function is synchronous and the other
/// fields are ignored.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfAsyncFunction {
    /// Null for a synchronous function.
    pub start: Option<AsyncStart>,
    /// Optional: null when calls cannot be stopped early (the host then waits for their
    /// completion in the background, holding the library mapped).
    pub cancel: Option<AsyncCancel>,
    /// The most calls of this function the plugin wants in flight at once; 0 lets the host
    /// choose (its default). The host's setting, when given, wins.
    pub max_in_flight: u32,
    /// The most rows per call; 0 lets the host choose. The host splits a batch into calls of at
    /// most this many rows and assembles their results in row order.
    pub chunk_rows: u32,
}

/// One function of a v2 library. Everything it points to is static data of the plugin.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfFunction {
    /// The function's SQL name: UTF-8, not empty, unique within the library.
    pub name: UdfBytes,
    /// `args_len` [`UdfType`] tags; null only when `args_len` is 0.
    pub arg_types: *const u32,
    /// `args_len` flags: 1 when the argument receives NULLs, 0 for the STRICT rule. May be null
    /// (no argument receives NULLs).
    pub arg_nullable: *const u8,
    /// The number of arguments, at most [`MAX_ARGS`](crate::MAX_ARGS).
    pub args_len: usize,
    /// The [`UdfType`] tag of the result.
    pub return_type: u32,
    /// 1 when the function may return NULL.
    pub return_nullable: u8,
    /// One of the [`volatility`] tags.
    pub volatility: u32,
    /// The row entrypoint. Must not be null before ABI 2.2; from 2.2 on it may be null when
    /// `call_batch` is not (a batch-only function). A function with an Arrow type
    /// ([`TYPE_ARROW`]) is evaluated through its batch entrypoint only: its `call_row` is never
    /// called (leave it null).
    pub call_row: Option<RowEntrypoint>,
    /// The optional batch entrypoint (ABI 2.1; null in 2.0 libraries). A host uses it when
    /// present and the row entrypoint otherwise.
    pub call_batch: Option<BatchEntrypoint>,
}

/// The Arrow types of one function (ABI 2.2): for each argument and for the result, null (its
/// [`UdfType`] tag applies) or a NUL-terminated **Arrow type string**, where the tag is
/// [`TYPE_ARROW`]. A type string is an Arrow C Data Interface format string, with the children of
/// nested types in angle brackets:
///
/// ```text
/// type   := format                        primitive formats, below
///         | "+l<" type ">"                List of type (child named "item", nullable)
///         | "+L<" type ">"                LargeList of type
///         | "+s<" field (";" field)* ">"  Struct (every field nullable)
/// field  := name ":" type                 name: 1..=256 bytes of UTF-8 without : ; < >
/// format := b | c C s S i I l L | f g | d:P,S  (Decimal128, 1 ≤ P ≤ 38, 0 ≤ S ≤ P)
///         | u U vu | z Z | tdD | ts{s,m,u,n}:[ZONE] | tD{s,m,u,n} | tin
/// ```
///
/// (`c`..`L`: Int8, UInt8, Int16, UInt16, Int32, UInt32, Int64, UInt64; `f`/`g`: Float32/64;
/// `u`/`U`/`vu`: Utf8, LargeUtf8, Utf8View; `z`/`Z`: Binary, LargeBinary; `tdD`: Date32;
/// `tss:`..`tsn:`: Timestamp in s/ms/µs/ns, with the time zone after the colon or none;
/// `tDs`..`tDn`: Duration; `tin`: Interval(MonthDayNano).) Nested types nest up to 16 levels; a
/// string is at most [`MAX_TYPE_STRING_LEN`] bytes. Examples: `d:12,2`, `tsu:Europe/Paris`,
/// `+l<g>`, `+s<street:u;zip:i;tags:+l<u>>`.
///
/// Arguments of an Arrow type reach the batch entrypoint as arrays of exactly that type (the host
/// casts SQL arguments to it; dictionary-encoded columns are decoded first); a result must be an
/// array of exactly that type (list children may have any name), which the host validates whole:
/// every level's buffers, offsets within the child's length, child lengths, struct field count
/// and names, UTF-8, decimal precision. NULLs may appear at every level; the nullable flags of the
/// function apply to the top level. A zone must be one arrow computes with (an IANA name such as
/// `Europe/Paris`, or an offset such as `+05:30`); the host refuses any other at load.
///
/// A type string that starts with `!` is not a type but the library's reason for not declaring
/// the function's types (`udf-abi` writes one as the `return_format` when its static storage for
/// computed type strings is full, or a Rust type cannot be described); a host refuses the
/// function with that message.
///
/// A host reads a function's entry only when one of its tags is [`TYPE_ARROW`] (a library of a
/// later minor whose functions use none may leave `arrow_types` to whatever that minor defines),
/// and dereferences a type string only where its tag is.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfArrowTypes {
    /// `args_len` pointers, each null or a type string; may itself be null (no argument has one).
    pub arg_formats: *const *const std::ffi::c_char,
    /// Null or the result's type string.
    pub return_format: *const std::ffi::c_char,
}

/// What `udfsql_manifest` returns: every function of the library.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfManifest {
    /// `sizeof(UdfManifest)` as the library was built (equals the handshake's `manifest_size`).
    pub size: usize,
    /// `functions_len` functions; null only when `functions_len` is 0.
    pub functions: *const UdfFunction,
    /// The number of functions.
    pub functions_len: usize,
    /// Releases result bytes and error messages; must not be null.
    pub release_bytes: Option<ReleaseBytes>,
    /// ABI 2.2: `functions_len` entries, parallel to `functions`, or null (no function declares
    /// an Arrow type). Read only from libraries of minor 2 or later whose manifest is this long.
    pub arrow_types: *const UdfArrowTypes,
    /// ABI 2.3: `functions_len` entries, parallel to `functions`, or null (every function is
    /// synchronous). Read only from libraries of minor 3 or later whose manifest is this long.
    pub async_functions: *const UdfAsyncFunction,
    /// ABI 2.3: optional; see [`UnloadHook`].
    pub unload: Option<UnloadHook>,
    /// ABI 2.4: `aggregates_len` aggregate functions, or null when `aggregates_len` is 0. A
    /// library may list aggregates and no scalar function (`functions_len` 0). Names are unique
    /// across both lists. Read only from libraries of minor 4 or later whose manifest is this
    /// long.
    pub aggregates: *const UdfAggregateFunction,
    /// ABI 2.4: the number of aggregate functions, at most [`MAX_AGGREGATES`].
    pub aggregates_len: usize,
}

/// The most aggregate functions a manifest may list (ABI 2.4).
pub const MAX_AGGREGATES: usize = 1024;
/// The most state fields an aggregate may declare (ABI 2.4).
pub const MAX_STATE_FIELDS: usize = 64;

/// What [`AggregateEmit`] hands over (ABI 2.4).
pub mod emit {
    /// Every group's value, **keeping** the groups: the accumulator goes on as before. Used by
    /// window frames and single-group aggregation, which may ask again after more rows.
    pub const PEEK: u32 = 0;
    /// Every group's value, then every group is dropped (the next update starts with none).
    pub const TAKE_ALL: u32 = 1;
    /// The first `first` groups' values, then those groups are dropped and the others are
    /// renumbered from 0 (group `first` becomes 0), as DataFusion's `EmitTo::First`.
    pub const TAKE_FIRST: u32 = 2;
}

/// Creates an accumulator (ABI 2.4): an opaque object of the plugin holding the state of any
/// number of groups, none at first. Returns null and writes `error` when it cannot.
pub type AggregateCreate = unsafe extern "C" fn(error: *mut UdfOwnedBytes) -> *mut std::ffi::c_void;

/// Feeds rows to an accumulator (ABI 2.4): `update`, `merge` and `retract` share this shape.
///
/// * `acc`: made by `create`, not yet destroyed. The host never calls two entrypoints on the
///   same accumulator at once (different accumulators may be used from different threads).
/// * `args`, `arg_schemas`, `args_len`, `num_rows`: the columns, as for [`BatchEntrypoint`]
///   (the arrays are **moved** to the plugin; the schemas are lent for the call): for `update`
///   and `retract` the arguments, of exactly the declared argument types; for `merge` the state
///   fields, of exactly the declared state types (partial states the same library made with
///   `state`, maybe in another process). Every column has `num_rows` rows. NULL arguments are
///   passed as they are: the plugin decides (SQL aggregates usually skip them).
/// * `group_indices`: `num_rows` group numbers, each below `total_groups`, or null: every row
///   belongs to group 0 (then `total_groups` is 1).
/// * `filter`: null (every row counts) or `num_rows` bytes, 1 for a row that counts and 0 for
///   one to skip (`FILTER (WHERE ...)`).
/// * `total_groups`: the number of groups after this call; it only grows between emits, and
///   groups the accumulator has not seen start empty.
/// * `error`: the message when the entrypoint returns [`status::ERROR`] (the query fails).
///
/// `retract` removes rows an earlier `update` added (sliding window frames). Must not unwind.
pub type AggregateUpdate = unsafe extern "C" fn(
    acc: *mut std::ffi::c_void,
    args: *mut FFI_ArrowArray,
    arg_schemas: *const FFI_ArrowSchema,
    args_len: usize,
    num_rows: usize,
    group_indices: *const usize,
    filter: *const u8,
    total_groups: usize,
    error: *mut UdfOwnedBytes,
) -> i32;

/// Hands over groups' results (`evaluate`) or partial states (`state`) (ABI 2.4), as one array
/// moved to the host: for `evaluate` of the declared result type, for `state` a struct array
/// (`+s`) whose fields are the declared state fields, in order, with their names. Its length is
/// the number of groups asked for: every group (`mode` [`emit::PEEK`] or [`emit::TAKE_ALL`]:
/// the largest `total_groups` given since the last emit that dropped them) or `first`
/// ([`emit::TAKE_FIRST`]). The host validates it whole (type, length, every buffer level,
/// UTF-8, nested lengths) before using it. Must not unwind.
pub type AggregateEmit = unsafe extern "C" fn(
    acc: *mut std::ffi::c_void,
    mode: u32,
    first: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
) -> i32;

/// The bytes an accumulator holds (ABI 2.4), for the host's memory accounting; it should grow
/// with the groups and the values it keeps. Must not unwind.
pub type AggregateSize = unsafe extern "C" fn(acc: *mut std::ffi::c_void) -> usize;

/// Frees an accumulator (ABI 2.4); called once per accumulator, after its last use.
pub type AggregateDestroy = unsafe extern "C" fn(acc: *mut std::ffi::c_void);

/// One aggregate function of a library (ABI 2.4), in [`UdfManifest::aggregates`]. Every type
/// is an Arrow type string, as in [`UdfArrowTypes`]; everything pointed to is static data of the
/// plugin. Callable from SQL as an aggregate (`GROUP BY`, `FILTER`, `DISTINCT`) and as a window
/// function (`OVER (...)`; frames that slide need `retract`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UdfAggregateFunction {
    /// The SQL name: UTF-8, not empty, unique within the library (scalar functions included).
    pub name: UdfBytes,
    /// `args_len` NUL-terminated type strings; null only when `args_len` is 0.
    pub arg_formats: *const *const std::ffi::c_char,
    /// The number of arguments, at most [`MAX_ARGS`](crate::MAX_ARGS).
    pub args_len: usize,
    /// `state_len` NUL-terminated field names (UTF-8, unique, 1..=256 bytes).
    pub state_names: *const *const std::ffi::c_char,
    /// `state_len` NUL-terminated type strings: the partial state of one group, as a row of
    /// these columns (every field nullable).
    pub state_formats: *const *const std::ffi::c_char,
    /// The number of state fields, 1..=[`MAX_STATE_FIELDS`].
    pub state_len: usize,
    /// The result's type string (the result is nullable: an empty group may give NULL).
    pub return_format: *const std::ffi::c_char,
    /// One of the [`volatility`] tags.
    pub volatility: u32,
    /// Reserved: 0.
    pub flags: u32,
    /// Never null.
    pub create: Option<AggregateCreate>,
    /// Never null.
    pub update: Option<AggregateUpdate>,
    /// Never null.
    pub merge: Option<AggregateUpdate>,
    /// Null when rows cannot be removed (then sliding window frames are refused).
    pub retract: Option<AggregateUpdate>,
    /// Never null.
    pub evaluate: Option<AggregateEmit>,
    /// Never null.
    pub state: Option<AggregateEmit>,
    /// Null when the accumulator does not report its size (the host then counts the groups).
    pub size: Option<AggregateSize>,
    /// Never null.
    pub destroy: Option<AggregateDestroy>,
}

/// A `DATE` for Rust plugins: days since 1970-01-01 (Arrow `Date32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// Days since 1970-01-01; negative before it.
    pub days_since_epoch: i32,
}

impl Date {
    /// The date `year-month-day` of the proleptic Gregorian calendar, if valid.
    pub fn from_ymd(year: i32, month: u32, day: u32) -> Option<Date> {
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        // Howard Hinnant's days_from_civil.
        let y = i64::from(year) - i64::from(month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        i32::try_from(days).ok().map(|d| Date {
            days_since_epoch: d,
        })
    }

    /// `(year, month, day)` of this date.
    pub fn to_ymd(self) -> (i32, u32, u32) {
        // Howard Hinnant's civil_from_days.
        let z = i64::from(self.days_since_epoch) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        (year, month, day)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A `TIMESTAMP` in UTC for Rust plugins: microseconds since 1970-01-01T00:00:00Z (Arrow
/// `Timestamp(Microsecond, "UTC")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Microseconds since the Unix epoch; negative before it.
    pub micros_since_epoch: i64,
}

impl Timestamp {
    /// The timestamp of a [`std::time::SystemTime`], if it fits.
    pub fn from_system_time(t: std::time::SystemTime) -> Option<Timestamp> {
        let micros = match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).ok()?,
            Err(e) => -i64::try_from(e.duration().as_micros()).ok()?,
        };
        Some(Timestamp {
            micros_since_epoch: micros,
        })
    }

    /// This timestamp as a [`std::time::SystemTime`].
    pub fn to_system_time(self) -> std::time::SystemTime {
        let magnitude = std::time::Duration::from_micros(self.micros_since_epoch.unsigned_abs());
        if self.micros_since_epoch >= 0 {
            std::time::UNIX_EPOCH + magnitude
        } else {
            std::time::UNIX_EPOCH - magnitude
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_extend_v1() {
        for t in UdfType::ALL {
            assert_eq!(UdfType::from_tag(t.tag()), Some(t));
        }
        assert_eq!(UdfType::from_tag(10), None);
        for t in crate::PluginType::ALL {
            assert_eq!(UdfType::from(t).tag(), t.tag());
        }
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(
            Date::from_ymd(1970, 1, 1),
            Some(Date {
                days_since_epoch: 0
            })
        );
        assert_eq!(
            Date::from_ymd(2000, 3, 1).map(|d| d.days_since_epoch),
            Some(11_017)
        );
        assert_eq!(
            Date::from_ymd(1969, 12, 31).map(|d| d.days_since_epoch),
            Some(-1)
        );
        assert_eq!(Date::from_ymd(2023, 2, 29), None);
        for days in [-800_000, -1, 0, 59, 60, 11_017, 19_000, 2_932_896] {
            let d = Date {
                days_since_epoch: days,
            };
            let (y, m, dd) = d.to_ymd();
            assert_eq!(Date::from_ymd(y, m, dd), Some(d), "{days}");
        }
    }

    #[test]
    fn timestamps_round_trip_through_system_time() {
        for micros in [-1_000_000_123, -1, 0, 1, 1_700_000_000_000_000] {
            let t = Timestamp {
                micros_since_epoch: micros,
            };
            assert_eq!(Timestamp::from_system_time(t.to_system_time()), Some(t));
        }
    }

    #[test]
    fn layout() {
        if std::mem::size_of::<usize>() == 8 {
            assert_eq!(std::mem::size_of::<UdfValue>(), 32);
            assert_eq!(std::mem::size_of::<UdfFunction>(), 72);
            assert_eq!(std::mem::size_of::<UdfManifest>(), 72);
            assert_eq!(MANIFEST_SIZE_2_3, 56);
            assert_eq!(std::mem::offset_of!(UdfManifest, aggregates), 56);
            assert_eq!(std::mem::size_of::<UdfAggregateFunction>(), 136);
            assert_eq!(std::mem::offset_of!(UdfAggregateFunction, create), 72);
            assert_eq!(std::mem::offset_of!(UdfAggregateFunction, destroy), 128);
            assert_eq!(MANIFEST_SIZE_2_0, 32);
            assert_eq!(MANIFEST_SIZE_2_2, 40);
            assert_eq!(std::mem::offset_of!(UdfManifest, arrow_types), 32);
            assert_eq!(std::mem::offset_of!(UdfManifest, async_functions), 40);
            assert_eq!(std::mem::offset_of!(UdfManifest, unload), 48);
            assert_eq!(std::mem::size_of::<UdfAsyncFunction>(), 24);
            assert_eq!(std::mem::size_of::<UdfCompletion>(), 16);
            assert_eq!(std::mem::size_of::<UdfArrowTypes>(), 16);
            assert_eq!(std::mem::size_of::<UdfAbiVersion>(), 16);
        }
    }
}
