//! The entrypoints of `#[udaf]` aggregate functions (ABI 2.4): one set of `extern "C"` functions
//! per [`Aggregate`] type, over the SDK's [`Groups`] accumulator, and the descriptors the
//! manifest lists them from.

use std::ffi::c_void;

use arrow_array::ffi::from_ffi;
use arrow_array::{ArrayRef, make_array};

use super::*;
use crate::aggregate::{
    Aggregate, Emit, Feed, GroupedState, Groups, GroupsAggregate, Rows, Vectorized,
};
use crate::v2::{
    AggregateCreate, AggregateDestroy, AggregateEmit, AggregateSize, AggregateUpdate, emit,
};

/// The Arrow types of an aggregate function, as its Rust types say them.
#[derive(Debug)]
pub struct AggregateTypes {
    /// The arguments.
    pub args: Vec<arrow_schema::DataType>,
    /// The state fields (named `s0`, `s1`, ...).
    pub state: Vec<arrow_schema::DataType>,
    /// The result.
    pub output: arrow_schema::DataType,
}

/// One `#[udaf]` function of the library, in [`AGGREGATES`].
#[derive(Debug)]
pub struct ExportedAggregate {
    /// The SQL name.
    pub name: &'static str,
    /// Its types, computed when the manifest is built.
    pub types: fn() -> AggregateTypes,
    pub(crate) create: AggregateCreate,
    pub(crate) update: AggregateUpdate,
    pub(crate) merge: AggregateUpdate,
    pub(crate) retract: Option<AggregateUpdate>,
    pub(crate) evaluate: AggregateEmit,
    pub(crate) state: AggregateEmit,
    pub(crate) size: AggregateSize,
    pub(crate) destroy: AggregateDestroy,
}

impl ExportedAggregate {
    /// The descriptor of the aggregate `A` under `name`.
    pub const fn of<A: Aggregate>(name: &'static str) -> ExportedAggregate {
        Self::with::<Groups<A>>(name)
    }

    /// The descriptor of the expert aggregate `G` under `name`.
    pub const fn grouped<G: GroupsAggregate>(name: &'static str) -> ExportedAggregate {
        Self::with::<Vectorized<G>>(name)
    }

    /// The descriptor of accumulators of type `S`.
    const fn with<S: GroupedState>(name: &'static str) -> ExportedAggregate {
        ExportedAggregate {
            name,
            types: types::<S>,
            create: create::<S>,
            update: update::<S>,
            merge: merge::<S>,
            retract: if S::RETRACTS {
                Some(retract::<S>)
            } else {
                None
            },
            evaluate: evaluate::<S>,
            state: state::<S>,
            size: size::<S>,
            destroy: destroy::<S>,
        }
    }
}

/// Every `#[udaf]` function of the library.
#[linkme::distributed_slice]
pub static AGGREGATES: [ExportedAggregate];

fn types<S: GroupedState>() -> AggregateTypes {
    let (args, state, output) = S::types();
    AggregateTypes {
        args,
        state,
        output,
    }
}

unsafe extern "C" fn create<S: GroupedState>(error: *mut UdfOwnedBytes) -> *mut c_void {
    let _ = error;
    Box::into_raw(Box::new(S::default())).cast()
}

unsafe extern "C" fn destroy<S: GroupedState>(acc: *mut c_void) {
    if acc.is_null() {
        return;
    }
    // SAFETY: made by `create::<S>` (the same `S`: the host calls one function's entrypoints on
    // the accumulators of its own `create`), destroyed once.
    let groups = unsafe { Box::from_raw(acc.cast::<S>()) };
    // A panicking `Drop` of the plugin's type must not unwind into the host.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(groups)));
}

unsafe extern "C" fn size<S: GroupedState>(acc: *mut c_void) -> usize {
    if acc.is_null() {
        return 0;
    }
    // SAFETY: made by `create::<S>`, not destroyed, not used by another call now (ABI 2.4).
    let groups = unsafe { &*acc.cast::<S>() };
    groups.size()
}

macro_rules! feed_entrypoint {
    ($name:ident, $feed:expr) => {
        #[allow(clippy::too_many_arguments)]
        unsafe extern "C" fn $name<S: GroupedState>(
            acc: *mut c_void,
            args: *mut FFI_ArrowArray,
            schemas: *const FFI_ArrowSchema,
            args_len: usize,
            num_rows: usize,
            group_indices: *const usize,
            filter: *const u8,
            total_groups: usize,
            error: *mut UdfOwnedBytes,
        ) -> i32 {
            // SAFETY: the host's promises of `AggregateUpdate`, passed on.
            unsafe {
                feed::<S>(
                    $feed,
                    acc,
                    args,
                    schemas,
                    args_len,
                    num_rows,
                    group_indices,
                    filter,
                    total_groups,
                    error,
                )
            }
        }
    };
}

feed_entrypoint!(update, Feed::Update);
feed_entrypoint!(merge, Feed::Merge);
feed_entrypoint!(retract, Feed::Retract);

/// The body of `update`, `merge` and `retract`.
///
/// # Safety
///
/// [`AggregateUpdate`]'s contract: `acc` from `create::<S>`, `args_len` arrays and schemas,
/// `num_rows` group numbers (or null) and filter bytes (or null), `error` valid for writes.
#[allow(clippy::too_many_arguments)]
unsafe fn feed<S: GroupedState>(
    feed: Feed,
    acc: *mut c_void,
    args: *mut FFI_ArrowArray,
    schemas: *const FFI_ArrowSchema,
    args_len: usize,
    num_rows: usize,
    group_indices: *const usize,
    filter: *const u8,
    total_groups: usize,
    error: *mut UdfOwnedBytes,
) -> i32 {
    if acc.is_null() || error.is_null() || (args_len > 0 && (args.is_null() || schemas.is_null())) {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(args_len);
        for i in 0..args_len {
            // SAFETY: `i < args_len` arrays and schemas, as the host passes them; `from_raw`
            // moves the array out (the C Data Interface's move semantics the ABI prescribes).
            let (array, schema) =
                unsafe { (FFI_ArrowArray::from_raw(args.add(i)), &*schemas.add(i)) };
            // SAFETY: the host exports valid arrays described by their schemas.
            let data =
                unsafe { from_ffi(array, schema) }.map_err(|e| format!("column {}: {e}", i + 1))?;
            columns.push(make_array(data));
        }
        // SAFETY: the host passes `num_rows` group numbers and filter flags when non-null.
        let (groups, filter) = unsafe {
            (
                (!group_indices.is_null())
                    .then(|| std::slice::from_raw_parts(group_indices, num_rows)),
                (!filter.is_null()).then(|| std::slice::from_raw_parts(filter, num_rows)),
            )
        };
        let total_groups = if groups.is_none() {
            total_groups.max(1)
        } else {
            total_groups
        };
        // SAFETY: made by `create::<S>`, not destroyed, used by no other call now (ABI 2.4).
        let groups_state = unsafe { &mut *acc.cast::<S>() };
        groups_state.feed(
            feed,
            &columns,
            Rows {
                len: num_rows,
                groups,
                filter,
                total_groups,
            },
        )
    }));
    let message = match result {
        Ok(Ok(())) => return status::OK,
        Ok(Err(message)) => message,
        Err(panic) => panicked(panic),
    };
    // SAFETY: checked non-null above; the host's promise that it is valid for writes.
    unsafe { write_error(error, message) }
}

fn emit_of(mode: u32, first: usize) -> Result<Emit, String> {
    match mode {
        emit::PEEK => Ok(Emit::Peek),
        emit::TAKE_ALL => Ok(Emit::TakeAll),
        emit::TAKE_FIRST => Ok(Emit::TakeFirst(first)),
        other => Err(format!("unknown emit mode {other}")),
    }
}

/// The body of `evaluate` and `state`.
///
/// # Safety
///
/// [`AggregateEmit`]'s contract.
unsafe fn emit_with<S: GroupedState>(
    acc: *mut c_void,
    mode: u32,
    first: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
    what: fn(&mut S, Emit) -> Result<ArrayRef, String>,
) -> i32 {
    if acc.is_null() || out.is_null() || out_schema.is_null() || error.is_null() {
        return status::ERROR;
    }
    install_quiet_panic_hook();
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: made by `create::<S>`, not destroyed, used by no other call now (ABI 2.4).
        let groups = unsafe { &mut *acc.cast::<S>() };
        let array = what(groups, emit_of(mode, first)?)?;
        let schema = FFI_ArrowSchema::try_from(array.data_type()).map_err(|e| e.to_string())?;
        Ok((FFI_ArrowArray::new(&array.to_data()), schema))
    }));
    // SAFETY: checked non-null above; valid for writes by the host's promise.
    unsafe { super::scalar::write_batch_outcome(result, out, out_schema, error) }
}

unsafe extern "C" fn evaluate<S: GroupedState>(
    acc: *mut c_void,
    mode: u32,
    first: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
) -> i32 {
    // SAFETY: the host's promises of `AggregateEmit`, passed on.
    unsafe { emit_with::<S>(acc, mode, first, out, out_schema, error, S::evaluate) }
}

unsafe extern "C" fn state<S: GroupedState>(
    acc: *mut c_void,
    mode: u32,
    first: usize,
    out: *mut FFI_ArrowArray,
    out_schema: *mut FFI_ArrowSchema,
    error: *mut UdfOwnedBytes,
) -> i32 {
    // SAFETY: the host's promises of `AggregateEmit`, passed on.
    unsafe { emit_with::<S>(acc, mode, first, out, out_schema, error, S::state) }
}
