//! Aggregate functions (ABI 2.4): reading a library's `aggregates`, and one accumulator of the
//! plugin ([`PluginAccumulator`]) behind a safe interface: rows and partial states go in as Arrow
//! columns, results and partial states come out checked as every batch result is (type, rows,
//! every buffer level), and the accumulator is destroyed by the library that made it.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, make_array};
use datafusion::arrow::datatypes::{DataType, Field, Fields};
use datafusion::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema};
use udf_abi::v2::{
    self, AggregateCreate, AggregateDestroy, AggregateEmit, AggregateSize, AggregateUpdate,
    ReleaseBytes, UdfAggregateFunction, UdfOwnedBytes,
};

use super::library::{Entrypoints, PluginLibrary};
use super::manifest::DeclaredVolatility;
use super::scalar::{ArgSchemas, check_status, export_for_a_plugin};
use crate::error::{CallError, MetadataError};

/// The most aggregates a manifest may list.
pub const MAX_AGGREGATES: usize = v2::MAX_AGGREGATES;

/// The validated signature of one aggregate function of a library.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregateSignature {
    /// The name the library gives the function.
    pub name: String,
    /// The argument types, in order.
    pub arg_types: Vec<DataType>,
    /// The partial state of one group, as nullable fields.
    pub state_fields: Fields,
    /// The result type (nullable).
    pub return_type: DataType,
    /// The declared volatility.
    pub volatility: DeclaredVolatility,
    /// Whether the function can remove rows (sliding window frames).
    pub retracts: bool,
    /// Whether the accumulator reports its size.
    pub reports_size: bool,
}

impl AggregateSignature {
    /// The argument types as SQL names them.
    pub fn sql_arguments(&self) -> Vec<String> {
        self.arg_types
            .iter()
            .map(crate::types::arrow::sql_name)
            .collect()
    }

    /// The result type as SQL names it.
    pub fn sql_result(&self) -> String {
        crate::types::arrow::sql_name(&self.return_type)
    }

    /// `name(Int64) -> Float64 [state: s0 Float64, s1 UInt64]`.
    pub fn display_as(&self, name: &str) -> String {
        let args: Vec<String> = self
            .arg_types
            .iter()
            .map(crate::types::arrow::sql_name)
            .collect();
        let state: Vec<String> = self
            .state_fields
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f.name(),
                    crate::types::arrow::sql_name(f.data_type())
                )
            })
            .collect();
        format!(
            "{name}({}) -> {} [aggregate; state: {}{}]",
            args.join(", "),
            crate::types::arrow::sql_name(&self.return_type),
            state.join(", "),
            if self.retracts { "; retracts" } else { "" }
        )
    }

    /// The struct type of a partial state.
    pub fn state_type(&self) -> DataType {
        DataType::Struct(self.state_fields.clone())
    }
}

impl std::fmt::Display for AggregateSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display_as(&self.name))
    }
}

/// The entrypoints of one aggregate.
#[derive(Debug, Clone, Copy)]
struct AggregateEntrypoints {
    create: AggregateCreate,
    update: AggregateUpdate,
    merge: AggregateUpdate,
    retract: Option<AggregateUpdate>,
    evaluate: AggregateEmit,
    state: AggregateEmit,
    size: Option<AggregateSize>,
    destroy: AggregateDestroy,
}

/// One aggregate of a loaded library: what it declares, its entrypoints, and the schemas of its
/// argument and state types, exported once and lent to every call.
pub(super) struct LoadedAggregate {
    signature: AggregateSignature,
    entry: AggregateEntrypoints,
    arg_schemas: ArgSchemas,
    state_types: Vec<DataType>,
    state_schemas: ArgSchemas,
}

impl LoadedAggregate {
    pub(super) fn signature(&self) -> &AggregateSignature {
        &self.signature
    }
}

fn bad(function: &str, reason: impl Into<String>) -> MetadataError {
    MetadataError::BadAggregate {
        function: function.to_string(),
        reason: reason.into(),
    }
}

/// Reads `len` NUL-terminated strings at `ptrs` (null only when `len` is 0), each read as
/// `read_type_string` does (bounded, UTF-8).
///
/// # Safety
///
/// `ptrs` is null or points at `len` pointers (bounded by the caller), each null or a
/// NUL-terminated string in the library's static data.
unsafe fn read_strings(
    function: &str,
    what: &str,
    ptrs: *const *const c_char,
    len: usize,
) -> Result<Vec<String>, MetadataError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptrs.is_null() {
        return Err(bad(
            function,
            format!("{what} is a null pointer for {len} entries"),
        ));
    }
    // SAFETY: non-null, and the caller's promise of `len` (bounded) pointers.
    let ptrs = unsafe { std::slice::from_raw_parts(ptrs, len) };
    ptrs.iter()
        .enumerate()
        .map(|(i, &p)| {
            super::metadata::read_type_string(p)
                .map(str::to_string)
                .map_err(|e| bad(function, format!("{what} {}: {e}", i + 1)))
        })
        .collect()
}

/// What a type string of an aggregate declares: a library's message (`!...`) is its reason
/// for not declaring the function.
fn parse_type(function: &str, what: &str, text: &str) -> Result<DataType, MetadataError> {
    if let Some(message) = text.strip_prefix('!') {
        return Err(MetadataError::UndeclaredTypes {
            function: function.to_string(),
            message: message.to_string(),
        });
    }
    crate::types::arrow::parse(text)
        .map_err(|e| bad(function, format!("{what}: Arrow type string `{text}`: {e}")))
}

/// Validates one manifest entry.
///
/// # Safety
///
/// `entry`'s pointers are valid as ABI 2.4 says (bounded reads of what the counts say; every
/// count is checked before it bounds a read).
unsafe fn read_aggregate(entry: &UdfAggregateFunction) -> Result<LoadedAggregate, MetadataError> {
    let v2::UdfBytes { ptr, len } = entry.name;
    if ptr.is_null() {
        return Err(MetadataError::NullName);
    }
    if len > super::MAX_NAME_LEN {
        return Err(MetadataError::NameTooLong {
            max: super::MAX_NAME_LEN,
        });
    }
    // SAFETY: non-null, bounded, and ABI 2.4 says the name is `len` bytes of static data.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
    if bytes.is_empty() {
        return Err(MetadataError::EmptyName);
    }
    let name = String::from_utf8(bytes.to_vec()).map_err(|e| MetadataError::NonUtf8Name {
        bytes: e.into_bytes(),
    })?;
    // The library's own reason for not declaring the function comes first.
    if !entry.return_format.is_null()
        && let Ok(text) = super::metadata::read_type_string(entry.return_format)
        && let Some(message) = text.strip_prefix('!')
    {
        return Err(MetadataError::UndeclaredTypes {
            function: name,
            message: message.to_string(),
        });
    }
    if entry.args_len > udf_abi::MAX_ARGS {
        return Err(MetadataError::TooManyArgs {
            function: name,
            len: entry.args_len,
            max: udf_abi::MAX_ARGS,
        });
    }
    if entry.state_len == 0 || entry.state_len > v2::MAX_STATE_FIELDS {
        return Err(bad(
            &name,
            format!(
                "declares {} state fields, 1..={} are allowed",
                entry.state_len,
                v2::MAX_STATE_FIELDS
            ),
        ));
    }
    if entry.flags != 0 {
        return Err(MetadataError::InvalidField {
            function: name,
            field: "flags",
            value: entry.flags,
        });
    }
    let Some(volatility) = DeclaredVolatility::from_tag(entry.volatility) else {
        return Err(MetadataError::InvalidField {
            function: name,
            field: "volatility",
            value: entry.volatility,
        });
    };
    // SAFETY: counts bounded above; the ABI's promise of that many pointers.
    let (args, names, states) = unsafe {
        (
            read_strings(&name, "argument type", entry.arg_formats, entry.args_len)?,
            read_strings(
                &name,
                "state field name",
                entry.state_names,
                entry.state_len,
            )?,
            read_strings(
                &name,
                "state field type",
                entry.state_formats,
                entry.state_len,
            )?,
        )
    };
    let arg_types = args
        .iter()
        .enumerate()
        .map(|(i, t)| parse_type(&name, &format!("argument {}", i + 1), t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut fields = Vec::with_capacity(names.len());
    for (i, (field, t)) in names.iter().zip(&states).enumerate() {
        let bad_name = field.is_empty()
            || field.len() > 256
            || field.contains(|c: char| c.is_control() || ":;<>".contains(c));
        if bad_name {
            return Err(bad(
                &name,
                format!("state field {} has the invalid name {field:?}", i + 1),
            ));
        }
        if names[..i].contains(field) {
            return Err(bad(
                &name,
                format!("state field {field:?} is declared twice"),
            ));
        }
        let data_type = parse_type(&name, &format!("state field {field}"), t)?;
        fields.push(Field::new(field.as_str(), data_type, true));
    }
    if entry.return_format.is_null() {
        return Err(bad(&name, "the result's type string is a null pointer"));
    }
    let return_text = super::metadata::read_type_string(entry.return_format)
        .map_err(|e| bad(&name, format!("the result: {e}")))?;
    let return_type = parse_type(&name, "the result", return_text)?;
    let missing = |field: &str| bad(&name, format!("its {field} entrypoint is null"));
    let entry = AggregateEntrypoints {
        create: entry.create.ok_or_else(|| missing("create"))?,
        update: entry.update.ok_or_else(|| missing("update"))?,
        merge: entry.merge.ok_or_else(|| missing("merge"))?,
        retract: entry.retract,
        evaluate: entry.evaluate.ok_or_else(|| missing("evaluate"))?,
        state: entry.state.ok_or_else(|| missing("state"))?,
        size: entry.size,
        destroy: entry.destroy.ok_or_else(|| missing("destroy"))?,
    };
    let fields = Fields::from(fields);
    let state_types: Vec<DataType> = fields.iter().map(|f| f.data_type().clone()).collect();
    let arg_schemas = ArgSchemas::of_types(&arg_types)
        .ok_or_else(|| bad(&name, "an argument type cannot be exported"))?;
    let state_schemas = ArgSchemas::of_types(&state_types)
        .ok_or_else(|| bad(&name, "a state type cannot be exported"))?;
    Ok(LoadedAggregate {
        signature: AggregateSignature {
            name,
            arg_types,
            state_fields: fields,
            return_type,
            volatility,
            retracts: entry.retract.is_some(),
            reports_size: entry.size.is_some(),
        },
        entry,
        arg_schemas,
        state_types,
        state_schemas,
    })
}

/// Reads a manifest's `aggregates` (ABI 2.4).
///
/// # Safety
///
/// `ptr` is null or points at `len` entries laid out as `UdfAggregateFunction`, valid as ABI 2.4
/// says; `len` is checked against [`MAX_AGGREGATES`] before it bounds a read.
pub(super) unsafe fn read_aggregates(
    ptr: *const UdfAggregateFunction,
    len: usize,
) -> Result<Vec<LoadedAggregate>, MetadataError> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() || len > MAX_AGGREGATES {
        return Err(MetadataError::BadFunctionList {
            len,
            pointer: if ptr.is_null() {
                "a null pointer (aggregates)"
            } else {
                "more than the limit of 1024 (aggregates)"
            },
        });
    }
    // SAFETY: non-null, bounded, and the caller's promise of `len` entries; the struct is
    // integers, raw pointers and optional function pointers, valid for any bits.
    let entries = unsafe { std::slice::from_raw_parts(ptr, len) };
    let mut aggregates: Vec<LoadedAggregate> = Vec::with_capacity(len);
    for entry in entries {
        // SAFETY: the caller's promise, entry by entry.
        let aggregate = unsafe { read_aggregate(entry) }?;
        if aggregates
            .iter()
            .any(|a| a.signature.name == aggregate.signature.name)
        {
            return Err(MetadataError::DuplicateName {
                function: aggregate.signature.name,
            });
        }
        aggregates.push(aggregate);
    }
    Ok(aggregates)
}

/// One aggregate function of a loaded library; holds the library.
#[derive(Clone)]
pub struct PluginAggregate {
    library: Arc<PluginLibrary>,
    index: usize,
}

impl std::fmt::Debug for PluginAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginAggregate")
            .field("library", &self.library.path())
            .field("signature", self.signature())
            .finish()
    }
}

impl PluginAggregate {
    pub(super) fn new(library: Arc<PluginLibrary>, index: usize) -> PluginAggregate {
        PluginAggregate { library, index }
    }

    fn loaded(&self) -> &LoadedAggregate {
        match &self.library.entrypoints {
            Entrypoints::V2 { aggregates, .. } => &aggregates[self.index],
            // Only a v2 library lists aggregates: `PluginLibrary::aggregate` never makes one
            // of a v1 library.
            Entrypoints::V1(_) => unreachable!("a v1 library has no aggregates"),
        }
    }

    fn release(&self) -> ReleaseBytes {
        match &self.library.entrypoints {
            Entrypoints::V2 { release, .. } => *release,
            Entrypoints::V1(_) => unreachable!("a v1 library has no aggregates"),
        }
    }

    /// The function's place in its library's list of aggregates.
    pub fn index(&self) -> usize {
        self.index
    }

    /// What the function declares.
    pub fn signature(&self) -> &AggregateSignature {
        &self.loaded().signature
    }

    /// The library.
    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// A new accumulator, with no groups.
    pub fn accumulator(&self) -> Result<PluginAccumulator, CallError> {
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the entrypoint belongs to `self.library`, alive while we hold the Arc;
        // `error` is valid for writes.
        let acc = unsafe { (self.loaded().entry.create)(&mut error) };
        if acc.is_null() {
            check_status(v2::status::ERROR, error, self.release(), &self.library)?;
            return Err(CallError::Plugin(
                "create returned no accumulator".to_string(),
            ));
        }
        check_status(v2::status::OK, error, self.release(), &self.library)?;
        Ok(PluginAccumulator {
            function: self.clone(),
            acc,
            groups: 0,
        })
    }
}

/// What a [`PluginAccumulator::feed`] does with its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Adds argument rows.
    Update,
    /// Removes argument rows an update added.
    Retract,
    /// Adds partial states.
    Merge,
}

/// Which groups an emit covers (ABI 2.4's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Every group, kept.
    Peek,
    /// Every group, dropped.
    TakeAll,
    /// The first N groups, dropped; the others renumbered from 0.
    TakeFirst(usize),
}

impl Emit {
    /// The groups this emit covers of an accumulator of `groups`, or why it cannot.
    pub fn rows(self, groups: usize) -> Result<usize, CallError> {
        match self {
            Emit::Peek | Emit::TakeAll => Ok(groups),
            Emit::TakeFirst(n) if n <= groups => Ok(n),
            Emit::TakeFirst(n) => Err(CallError::HostBug(format!(
                "emit of {n} groups asked of an accumulator of {groups}"
            ))),
        }
    }
}

/// One accumulator of a plugin aggregate, destroyed by its library when dropped.
pub struct PluginAccumulator {
    function: PluginAggregate,
    acc: *mut c_void,
    /// The groups the plugin holds, as the host counts them.
    groups: usize,
}

// SAFETY: the accumulator is the plugin's object, which ABI 2.4 lets the host use from any
// thread, one call at a time: every entrypoint but `size` takes `&mut self`, and `size` only
// reads (the ABI's `size` must not change the accumulator).
unsafe impl Send for PluginAccumulator {}
// SAFETY: as above: through `&self` only `size` is called.
unsafe impl Sync for PluginAccumulator {}

impl std::fmt::Debug for PluginAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginAccumulator")
            .field("function", &self.function.signature().name)
            .field("groups", &self.groups)
            .finish()
    }
}

impl Drop for PluginAccumulator {
    fn drop(&mut self) {
        // SAFETY: `acc` came from this function's `create` and is destroyed once, here; the
        // library is alive (held by `self.function`).
        unsafe { (self.function.loaded().entry.destroy)(self.acc) };
    }
}

impl PluginAccumulator {
    /// The function.
    pub fn function(&self) -> &PluginAggregate {
        &self.function
    }

    /// The number of groups the accumulator holds.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Feeds `columns` (arguments, or the state fields for [`Feed::Merge`], of exactly the
    /// declared types) to the groups `group_indices` says (`None`: all in group 0), the rows
    /// `filter` keeps (true; NULL and false skip the row).
    pub fn feed(
        &mut self,
        feed: Feed,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> Result<(), CallError> {
        let loaded = self.function.loaded();
        let (entrypoint, declared, schemas) = match feed {
            Feed::Update => (
                loaded.entry.update,
                &loaded.signature.arg_types,
                &loaded.arg_schemas,
            ),
            Feed::Retract => (
                loaded.entry.retract.ok_or_else(|| {
                    CallError::Plugin(
                        "the aggregate cannot remove rows (it has no retract entrypoint), which \
                         this window frame needs"
                            .to_string(),
                    )
                })?,
                &loaded.signature.arg_types,
                &loaded.arg_schemas,
            ),
            Feed::Merge => (
                loaded.entry.merge,
                &loaded.state_types,
                &loaded.state_schemas,
            ),
        };
        self.feed_checked(
            entrypoint,
            declared,
            schemas,
            columns,
            group_indices,
            filter,
            total_groups,
        )?;
        let total_groups = if group_indices.is_none() {
            1
        } else {
            total_groups
        };
        self.groups = self.groups.max(total_groups);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn feed_checked(
        &self,
        entrypoint: AggregateUpdate,
        declared: &[DataType],
        schemas: &ArgSchemas,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> Result<(), CallError> {
        // Checked here, not trusted: the ABI promises the plugin exactly these types and rows.
        if columns.len() != declared.len() {
            return Err(CallError::ArgumentCount {
                found: columns.len(),
                expected: declared.len(),
            });
        }
        let num_rows =
            group_indices.map_or_else(|| columns.first().map_or(0, |c| c.len()), <[usize]>::len);
        for (index, (column, t)) in columns.iter().zip(declared).enumerate() {
            if column.data_type() != t {
                return Err(CallError::HostBug(format!(
                    "column {} of an aggregate call is {}, {t} declared",
                    index + 1,
                    column.data_type()
                )));
            }
            if column.len() != num_rows {
                return Err(CallError::ArgumentRows {
                    index,
                    found: column.len(),
                    expected: num_rows,
                });
            }
        }
        // DataFusion's promise, passed on to the plugin as the ABI's: checked in debug builds
        // only (a pass over every row of every batch).
        debug_assert!(
            group_indices.is_none_or(|g| g.iter().all(|&i| i < total_groups)),
            "a group number is not below the {total_groups} groups"
        );
        let filter_bytes: Option<Vec<u8>> = filter.map(|f| {
            (0..num_rows)
                .map(|i| u8::from(f.is_valid(i) && f.value(i)))
                .collect()
        });
        if filter.is_some_and(|f| f.len() < num_rows) {
            return Err(CallError::HostBug(
                "the filter has fewer rows than the call".into(),
            ));
        }
        let mut arrays: Vec<FFI_ArrowArray> = columns
            .iter()
            .map(|c| export_for_a_plugin(&c.to_data()))
            .collect();
        let total_groups = if group_indices.is_none() {
            1
        } else {
            total_groups
        };
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the entrypoint and `acc` belong to this function's library, alive while
        // `self.function` holds it, and `acc` is used by no other call (`&mut self` up the
        // stack). The arrays (moved to the plugin, or released when `arrays` drops), schemas
        // (lent, of the declared types the arrays were checked to have), group numbers and
        // filter bytes are `num_rows` long and live through the call; `error` is writable.
        let status = unsafe {
            entrypoint(
                self.acc,
                arrays.as_mut_ptr(),
                schemas.as_ptr(),
                arrays.len(),
                num_rows,
                group_indices.map_or(std::ptr::null(), <[usize]>::as_ptr),
                filter_bytes
                    .as_ref()
                    .map_or(std::ptr::null(), |f| f.as_ptr()),
                total_groups,
                &mut error,
            )
        };
        drop(arrays);
        check_status(
            status,
            error,
            self.function.release(),
            &self.function.library,
        )
    }

    /// The results (`state == false`) or partial states (a struct array of the state fields)
    /// of the groups `emit` covers, checked whole.
    pub fn emit(&mut self, state: bool, emit: Emit) -> Result<ArrayRef, CallError> {
        let loaded = self.function.loaded();
        let rows = emit.rows(self.groups)?;
        let (mode, first) = match emit {
            Emit::Peek => (v2::emit::PEEK, 0),
            Emit::TakeAll => (v2::emit::TAKE_ALL, 0),
            Emit::TakeFirst(n) => (v2::emit::TAKE_FIRST, n),
        };
        let (entrypoint, declared) = if state {
            (loaded.entry.state, loaded.signature.state_type())
        } else {
            (loaded.entry.evaluate, loaded.signature.return_type.clone())
        };
        let mut out = FFI_ArrowArray::empty();
        let mut out_schema = FFI_ArrowSchema::empty();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: as in `feed_checked`: the library is alive, `acc` is its own and used by no
        // other call; `out`, `out_schema` and `error` are valid for writes.
        let status =
            unsafe { entrypoint(self.acc, mode, first, &mut out, &mut out_schema, &mut error) };
        // From here the plugin's groups are gone whatever it returned: the host counts them so.
        if emit != Emit::Peek {
            self.groups -= rows;
        }
        check_status(
            status,
            error,
            self.function.release(),
            &self.function.library,
        )?;
        let data = super::scalar::arrow_result::import_result(
            out,
            out_schema,
            &declared,
            rows,
            Arc::clone(&self.function.library),
        )?;
        Ok(make_array(data))
    }

    /// The bytes the accumulator says it holds, or a count of its groups when it does not say.
    pub fn size(&self) -> usize {
        match self.function.loaded().entry.size {
            // SAFETY: as in `feed_checked`; `size` only reads the accumulator.
            Some(size) => unsafe { size(self.acc) },
            None => self.groups.saturating_mul(64),
        }
    }
}
