//! Isolated aggregate functions (ABI 2.4): the accumulators live in a worker process, one
//! worker per accumulator for its whole life, addressed by the worker's number; the host keeps
//! only numbers and checks every array a worker sends back as it checks an in-process plugin's.
//! A worker that crashes fails the queries whose accumulators it held; the host lives on.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray};
use datafusion::arrow::datatypes::DataType;

use super::pool::{Fault, WorkerPool};
use super::protocol::{self, AggregateOp, Reply, Sink};
use crate::error::CallError;
use crate::ffi::PluginLibrary;
use crate::ffi::aggregate::{Emit, Feed, PluginAccumulator, PluginAggregate};

/// The most accumulators one worker holds at once.
const MAX_WORKER_ACCUMULATORS: usize = 1 << 16;

/// A worker's accumulators, by the numbers it gave them.
pub(crate) struct WorkerAccumulators {
    library: Arc<PluginLibrary>,
    accumulators: HashMap<u32, PluginAccumulator>,
    next: u32,
}

impl WorkerAccumulators {
    pub(crate) fn new(library: &Arc<PluginLibrary>) -> WorkerAccumulators {
        WorkerAccumulators {
            library: Arc::clone(library),
            accumulators: HashMap::new(),
            next: 0,
        }
    }

    /// Carries out `op` and writes the reply into `out`: the plugin's error as an error reply,
    /// a request that cannot be served as `Err` (the worker refuses it).
    pub(crate) fn answer<S: Sink>(&mut self, op: AggregateOp, out: &mut S) -> Result<(), String> {
        let outcome: Result<Option<u64>, String> = match op {
            AggregateOp::Create { function } => {
                if self.accumulators.len() >= MAX_WORKER_ACCUMULATORS {
                    return Err(format!(
                        "more than {MAX_WORKER_ACCUMULATORS} accumulators in one worker"
                    ));
                }
                let aggregate = self
                    .library
                    .aggregate(function)
                    .ok_or_else(|| format!("no aggregate #{function} in the library"))?;
                aggregate
                    .accumulator()
                    .map_err(|e| e.to_string())
                    .map(|acc| {
                        self.next = self.next.wrapping_add(1);
                        while self.accumulators.contains_key(&self.next) {
                            self.next = self.next.wrapping_add(1);
                        }
                        self.accumulators.insert(self.next, acc);
                        Some(u64::from(self.next))
                    })
            }
            AggregateOp::Feed {
                acc,
                feed,
                rows: _,
                groups,
                filter,
                total_groups,
                columns,
            } => {
                let acc = self
                    .accumulators
                    .get_mut(&acc)
                    .ok_or_else(|| format!("no accumulator #{acc}"))?;
                acc.feed(
                    feed,
                    &columns,
                    groups.as_deref(),
                    filter.as_ref(),
                    total_groups,
                )
                .map(|()| Some(acc.size() as u64))
                .map_err(|e| e.to_string())
            }
            AggregateOp::Emit { acc, state, emit } => {
                let acc = self
                    .accumulators
                    .get_mut(&acc)
                    .ok_or_else(|| format!("no accumulator #{acc}"))?;
                match acc.emit(state, emit) {
                    Ok(array) => return protocol::encode_result(out, &array),
                    Err(e) => Err(e.to_string()),
                }
            }
            AggregateOp::Destroy { acc } => {
                self.accumulators.remove(&acc);
                Ok(Some(0))
            }
        };
        match outcome {
            Ok(Some(value)) => protocol::encode_ack(out, value),
            Ok(None) => protocol::encode_ack(out, 0),
            Err(message) => protocol::encode_error(out, &message),
        }
    }
}

/// An accumulator that lives in a worker process.
pub(crate) struct IsolatedAccumulator {
    pool: Arc<WorkerPool>,
    function: PluginAggregate,
    /// The worker that holds it, and its number there.
    worker: u64,
    acc: u32,
    /// The groups it holds, as the host counts them.
    groups: usize,
    /// Its size as the worker last said (after each feed).
    size: usize,
}

impl std::fmt::Debug for IsolatedAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedAccumulator")
            .field("function", &self.function.signature().name)
            .field("worker", &self.worker)
            .field("groups", &self.groups)
            .finish()
    }
}

fn fault(fault: Fault) -> CallError {
    CallError::Plugin(fault.reason())
}

impl IsolatedAccumulator {
    /// A new accumulator of `function` (of the pool's library) in one of the pool's workers.
    pub(crate) fn create(
        pool: &Arc<WorkerPool>,
        function: &PluginAggregate,
    ) -> Result<IsolatedAccumulator, CallError> {
        let op = AggregateOp::Create {
            function: function.index(),
        };
        let (worker, reply) = pool.aggregate(None, &op, None).map_err(fault)?;
        let Reply::Ack(number) = reply else {
            return Err(CallError::InvalidResult(
                "the worker did not acknowledge the new accumulator".to_string(),
            ));
        };
        let acc = u32::try_from(number).map_err(|_| {
            CallError::InvalidResult(format!("the worker numbered an accumulator {number}"))
        })?;
        Ok(IsolatedAccumulator {
            pool: Arc::clone(pool),
            function: function.clone(),
            worker,
            acc,
            groups: 0,
            size: 0,
        })
    }

    /// As [`PluginAccumulator::feed`], in the worker.
    pub(crate) fn feed(
        &mut self,
        feed: Feed,
        columns: &[ArrayRef],
        group_indices: Option<&[usize]>,
        filter: Option<&BooleanArray>,
        total_groups: usize,
    ) -> Result<(), CallError> {
        let signature = self.function.signature();
        let declared: Vec<DataType> = match feed {
            Feed::Merge => signature
                .state_fields
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
            Feed::Update | Feed::Retract => signature.arg_types.clone(),
        };
        if feed == Feed::Retract && !signature.retracts {
            return Err(CallError::Plugin(
                "the aggregate cannot remove rows (it has no retract entrypoint), which this \
                 window frame needs"
                    .to_string(),
            ));
        }
        if columns.len() != declared.len() {
            return Err(CallError::ArgumentCount {
                found: columns.len(),
                expected: declared.len(),
            });
        }
        let rows =
            group_indices.map_or_else(|| columns.first().map_or(0, |c| c.len()), <[usize]>::len);
        for (index, (column, t)) in columns.iter().zip(&declared).enumerate() {
            if column.data_type() != t || column.len() != rows {
                return Err(CallError::HostBug(format!(
                    "column {} of an aggregate call is {} of {} rows, {t} of {rows} expected",
                    index + 1,
                    column.data_type(),
                    column.len()
                )));
            }
        }
        let total = if group_indices.is_none() {
            1
        } else {
            total_groups
        };
        let op = AggregateOp::Feed {
            acc: self.acc,
            feed,
            rows,
            groups: group_indices.map(<[usize]>::to_vec),
            filter: filter.cloned(),
            total_groups: total,
            columns: columns.to_vec(),
        };
        let (_, reply) = self
            .pool
            .aggregate(Some(self.worker), &op, None)
            .map_err(fault)?;
        let Reply::Ack(size) = reply else {
            return Err(CallError::InvalidResult(
                "the worker did not acknowledge the rows".to_string(),
            ));
        };
        self.size = usize::try_from(size).unwrap_or(usize::MAX);
        self.groups = self.groups.max(total);
        Ok(())
    }

    /// As [`PluginAccumulator::emit`], in the worker; the array is checked here whole.
    pub(crate) fn emit(&mut self, state: bool, emit: Emit) -> Result<ArrayRef, CallError> {
        let rows = emit.rows(self.groups)?;
        let signature = self.function.signature();
        let declared = if state {
            signature.state_type()
        } else {
            signature.return_type.clone()
        };
        let op = AggregateOp::Emit {
            acc: self.acc,
            state,
            emit,
        };
        let result = self
            .pool
            .aggregate(Some(self.worker), &op, Some((&declared, rows)));
        if emit != Emit::Peek {
            self.groups -= rows;
        }
        let (_, reply) = result.map_err(fault)?;
        let Reply::Result(array) = reply else {
            return Err(CallError::InvalidResult(
                "the worker answered an emit without an array".to_string(),
            ));
        };
        // The worker checked it as the in-process path does, but the plugin shares its process:
        // the same checks again here.
        if array.data_type() != &declared || array.len() != rows {
            return Err(CallError::InvalidResult(format!(
                "the worker sent {} rows of {} where {rows} rows of {declared} were asked for",
                array.len(),
                array.data_type()
            )));
        }
        crate::ffi::check_received_array(&array)?;
        Ok(array)
    }

    /// The bytes the accumulator held after the last feed, as the worker said.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

impl Drop for IsolatedAccumulator {
    fn drop(&mut self) {
        // Best effort: a worker that is gone took the accumulator with it.
        let op = AggregateOp::Destroy { acc: self.acc };
        if let Err(e) = self.pool.aggregate(Some(self.worker), &op, None) {
            tracing::debug!(error = %e.reason(), "an isolated accumulator was not destroyed");
        }
    }
}
