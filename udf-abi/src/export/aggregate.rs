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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::Int64Array;

    use super::*;

    /// An aggregate whose update panics on 13 and whose result panics when the sum is 7.
    #[derive(Default)]
    struct Touchy(i64);

    impl Aggregate for Touchy {
        type Input = i64;
        type State = i64;
        type Output = i64;
        fn update(&mut self, x: i64) {
            assert_ne!(x, 13, "thirteen");
            self.0 += x;
        }
        fn merge(&mut self, s: i64) {
            self.0 += s;
        }
        fn state(&self) -> i64 {
            self.0
        }
        fn finish(&self) -> i64 {
            assert_ne!(self.0, 7, "seven");
            self.0
        }
    }

    /// The message of a failed call, released as the host releases it.
    fn message(status: i32, error: UdfOwnedBytes) -> String {
        assert_eq!(status, status::ERROR);
        // SAFETY: the bytes of a message the entrypoint wrote, read then handed back once.
        unsafe {
            let text = String::from_utf8_lossy(std::slice::from_raw_parts(error.ptr, error.len))
                .into_owned();
            release_bytes(error);
            text
        }
    }

    /// Feeds `values` to `acc` through the update entrypoint, as the host does.
    fn feed(acc: *mut c_void, values: Vec<i64>) -> (i32, UdfOwnedBytes) {
        let array: ArrayRef = Arc::new(Int64Array::from(values));
        let mut arrays = [FFI_ArrowArray::new(&array.to_data())];
        let schemas = [FFI_ArrowSchema::try_from(array.data_type()).unwrap()];
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: one array and schema of the declared type, one group, a writable error.
        let status = unsafe {
            update::<Groups<Touchy>>(
                acc,
                arrays.as_mut_ptr(),
                schemas.as_ptr(),
                1,
                array.len(),
                std::ptr::null(),
                std::ptr::null(),
                1,
                &mut error,
            )
        };
        (status, error)
    }

    #[test]
    fn panics_in_update_and_finish_are_errors_with_their_location() {
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: a writable error; the accumulator is destroyed below.
        let acc = unsafe { create::<Groups<Touchy>>(&mut error) };
        assert!(!acc.is_null());
        let (status, error) = feed(acc, vec![1, 13]);
        let text = message(status, error);
        assert!(
            text.starts_with("panicked: ")
                && text.contains("thirteen")
                && text.contains("aggregate.rs:"),
            "{text}"
        );
        let (status, _) = feed(acc, vec![2, 4]);
        assert_eq!(status, status::OK);
        let mut out = FFI_ArrowArray::empty();
        let mut out_schema = FFI_ArrowSchema::empty();
        let mut error = UdfOwnedBytes::EMPTY;
        // SAFETY: the accumulator of `create`, writable out, schema and error.
        let status = unsafe {
            evaluate::<Groups<Touchy>>(acc, emit::PEEK, 0, &mut out, &mut out_schema, &mut error)
        };
        let text = message(status, error);
        assert!(text.contains("seven"), "{text}");
        // SAFETY: made by `create` above, destroyed once.
        unsafe { destroy::<Groups<Touchy>>(acc) };
    }
}
