//! The data path of worker calls: shared memory, with the channel as a doorbell.
//!
//! Each worker has two regions the host creates (see [`crate::ffi::shm`]) and sends it once,
//! right after starting it (a setup message with the two descriptors attached):
//!
//! * **input**, written by the host: a page of control words, then the call request at
//!   [`CALL_AT`] (the frame `protocol::encode_call` writes, encoded straight into the region).
//!   The worker decodes the arguments where they lie, without a copy.
//! * **output**, written by the worker: the reply frame at offset 0 (a result or an error,
//!   encoded straight into the region; the worker grows it when a result needs more room).
//!
//! One call is one request and one reply. The host publishes a request by storing its sequence
//! number in `REQ_SEQ`; the worker publishes the reply by storing the same number in `REP_SEQ`.
//! Each side first waits for the other by spinning on the word (briefly busy, then yielding the
//! CPU) for as long as the other side took lately ([`AdaptiveSpin`]: not at all when it took
//! longer than the spin's limit; a host whose pool is crowded, not at all: `pool::crowded`), and
//! only then goes to sleep: it sets its `*_SLEEPING` word,
//! looks once more, and waits on the channel; the other side, after publishing, writes one byte
//! to the channel when it sees the sleeping word set (the store-then-load pairs on both sides are
//! sequentially consistent, so one of the two always sees the other). While it spins, each side
//! also says on which CPU it runs, and never busy-waits on the CPU the other side was last seen
//! on: it yields at once there ([`Whereabouts`]). A sleeping host waits with `poll` on the
//! channel, the worker's pidfd, its stderr and the query's cancellation, as before. A host whose
//! calls are too long to spin through naps instead, unless its pool is crowded
//! ([`AdaptiveSpin::nap`]): asleep as above, its
//! sleeping word set, until shortly before the reply usually comes, then spinning for it, so
//! that the wake-up of its CPU (tens of µs on a VM) is not paid per call.
//!
//! What the host trusts of this: nothing. The worker may write the control words and the output
//! region at any time, grow the output region to any size, and keep writing after it replied.
//! The host reads the reply's length from a copy of its header, refuses a length over what the
//! call can return ([`protocol::max_reply_len`]) or past the end of the region's file, copies the
//! body out once into memory of its own, and decodes and checks only that copy (the same checks
//! as before: `protocol::decode_reply`, then the in-process result rules). Regions cannot shrink
//! (sealed), so no copy can fault.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::datatypes::DataType;

use super::protocol::{self, HEADER, MAGIC};
use crate::async_udf::AsyncLimits;
use crate::call_path::CallPath;
use crate::ffi::shm::{self, Region, RegionWriter};

/// Control words in the input region's first page, each on its own cache line.
const REQ_SEQ: usize = 0;
const REP_SEQ: usize = 64;
const WORKER_SLEEPING: usize = 128;
const HOST_SLEEPING: usize = 192;
/// Where each side last ran while awake: its CPU's number + 1, 0 while asleep ([`Whereabouts`]).
const HOST_CPU: usize = 256;
const WORKER_CPU: usize = 320;

/// Where the call request starts in the input region.
const CALL_AT: usize = 4096;

/// The regions' first size (pages are only used once written).
const INITIAL_INPUT: usize = CALL_AT + (1 << 20);
const INITIAL_OUTPUT: usize = 1 << 20;

/// The one byte either side writes to the channel after the setup: a doorbell. Any other byte
/// from a worker is garbage (its plugin wrote to the channel), and the reply is refused.
pub(crate) const BELL: u8 = 0x07;

/// The setup message: a frame of kind `M` with no more body, the two descriptors attached.
const SETUP: [u8; HEADER + 1] = [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], 1, 0, 0, 0, b'M'];

/// How a side waits for the other before it goes to sleep: busy for `busy`, then yielding the
/// CPU between looks until `total`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spin {
    pub busy: Duration,
    pub total: Duration,
}

/// The host waiting for a reply: at most this long.
pub(crate) const HOST_SPIN: Spin = Spin {
    busy: Duration::from_micros(20),
    total: Duration::from_micros(200),
};

/// The worker waiting for the next request (calls of one query follow each other closely): at
/// most this long.
const WORKER_SPIN: Spin = Spin {
    busy: Duration::from_micros(20),
    total: Duration::from_millis(1),
};

/// Spins until `done` or the spin is over; whether `done` answered true. Busy at first, unless
/// `beside` says that the side waited for runs on this CPU too: spinning there would only keep it
/// from running, so the spin yields at once.
pub(crate) fn spin_until(
    spin: Spin,
    mut beside: impl FnMut() -> bool,
    mut done: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    let mut looks = 0u32;
    loop {
        if done() {
            return true;
        }
        looks = looks.wrapping_add(1);
        if !looks.is_multiple_of(16) {
            std::hint::spin_loop();
            continue;
        }
        let spent = start.elapsed();
        if spent >= spin.total {
            return false;
        }
        // `beside` first: it also keeps this side's whereabouts current (a yield can move it).
        if beside() || spent >= spin.busy {
            std::thread::yield_now();
        }
    }
}

/// Where the two sides of a worker run, as each says in the control page: the CPU's number + 1
/// while awake, 0 asleep. A side about to spin says where it is and learns whether the other
/// side was last seen on the same CPU; the scheduler puts the two together often (a doorbell
/// wakes the sleeper on the ringer's CPU), and then a busy wait only delays the reply it waits
/// for. Only a hint: a worker writing anything here changes how long its own host spins, within
/// the spin's limits.
#[derive(Clone, Copy)]
pub(crate) struct Whereabouts<'a> {
    mine: &'a AtomicU64,
    theirs: &'a AtomicU64,
}

impl Whereabouts<'_> {
    /// Says where this side runs now; whether the other side was last seen there.
    pub(crate) fn beside(&self) -> bool {
        let here = self.awake();
        self.theirs.load(Relaxed) == here
    }

    /// Says where this side runs now (awake); that CPU's number + 1.
    pub(crate) fn awake(&self) -> u64 {
        let here = rustix::thread::sched_getcpu() as u64 + 1;
        self.mine.store(here, Relaxed);
        here
    }

    /// Says that this side goes to sleep.
    pub(crate) fn asleep(&self) {
        self.mine.store(0, Relaxed);
    }
}

/// A spin that lasts as long as the other side's recent waits: twice their running mean plus
/// [`AdaptiveSpin::SLACK`], within `limit`, and none at all while the mean is over the limit's
/// total (then the other side takes long anyway, and a spinning side would only take a CPU from
/// it, or from the other partitions' hosts and workers: this machine has two). Each wait counts
/// at most twice the limit, so that a long pause (the gap between two queries, a slow first
/// call) is forgotten after a few quick waits.
#[derive(Debug, Clone)]
pub(crate) struct AdaptiveSpin {
    limit: Spin,
    /// The running mean of recent waits (weight 1/4 for the newest), in nanoseconds.
    mean_ns: u64,
    /// The same over waits counted up to [`AdaptiveSpin::MAX_NAP`]: how long calls take that
    /// are too long to spin for ([`AdaptiveSpin::nap`]).
    long_mean_ns: u64,
}

impl AdaptiveSpin {
    /// Added to twice the mean: a wait a little longer than the recent ones still ends in the
    /// spin.
    const SLACK: Duration = Duration::from_micros(10);

    /// How long before a long call usually ends its waiting side wakes up to spin for it.
    const LEAD: Duration = Duration::from_micros(100);

    /// Calls longer than this are not napped for: a wake-up costs little beside them.
    const MAX_NAP: Duration = Duration::from_millis(20);

    pub(crate) const fn new(limit: Spin) -> AdaptiveSpin {
        AdaptiveSpin {
            limit,
            mean_ns: 0,
            long_mean_ns: 0,
        }
    }

    /// For a side whose waits are too long to spin through (the spin is off), how long to
    /// sleep before spinning for the rest: the recent waits' mean less [`AdaptiveSpin::LEAD`]. A
    /// sleeping side's wake-up costs tens of µs on a VM (an idle vCPU halts); waking a little
    /// before the other side answers hides it. `None` while the spin is on or the waits are
    /// longer than [`AdaptiveSpin::MAX_NAP`].
    pub(crate) fn nap(&self) -> Option<Duration> {
        let mean = Duration::from_nanos(self.long_mean_ns);
        (self.mean_ns > duration_ns(self.limit.total) && mean < Self::MAX_NAP)
            .then(|| mean.saturating_sub(Self::LEAD))
    }

    /// The spin after a [`AdaptiveSpin::nap`]: through the lead, with the slack a timer's
    /// wake-up may be late by, yielding after the busy limit.
    pub(crate) fn after_nap(&self) -> Spin {
        Spin {
            busy: self.limit.busy,
            total: Self::LEAD * 2,
        }
    }

    /// The spin for the next wait.
    pub(crate) fn next(&self) -> Spin {
        let limit = duration_ns(self.limit.total);
        if self.mean_ns > limit {
            return Spin {
                busy: Duration::ZERO,
                total: Duration::ZERO,
            };
        }
        let total = Duration::from_nanos(
            self.mean_ns
                .saturating_mul(2)
                .saturating_add(duration_ns(Self::SLACK))
                .min(limit),
        );
        Spin {
            busy: self.limit.busy.min(total),
            total,
        }
    }

    /// Counts a wait that took `waited` from its start to the other side's answer, spin and
    /// sleep together.
    pub(crate) fn record(&mut self, waited: Duration) {
        let sample = duration_ns(waited).min(duration_ns(self.limit.total).saturating_mul(2));
        self.mean_ns = (self.mean_ns.saturating_mul(3).saturating_add(sample)) / 4;
        let long = duration_ns(waited).min(duration_ns(Self::MAX_NAP).saturating_mul(2));
        self.long_mean_ns = (self.long_mean_ns.saturating_mul(3).saturating_add(long)) / 4;
    }
}

/// While alive, the calling thread's timers expire when asked (a timer slack of 1 ns) rather
/// than up to the default 50 µs later, when the kernel lets them be grouped with others: a side
/// napping until a little before a reply usually comes ([`AdaptiveSpin::nap`]) must be awake
/// when it comes. Measured (`isobench`, BENCHMARKS.md): with the default slack a napping host
/// still slept when `repeat_text`'s replies came in most calls, and needed the doorbell, +57 µs
/// per batch. The thread's own slack is put back on drop (the thread may belong to the
/// embedding application's runtime).
pub(crate) struct PreciseTimers {
    previous: Option<std::num::NonZeroU64>,
}

impl PreciseTimers {
    pub(crate) fn new() -> PreciseTimers {
        use rustix::thread::{current_timer_slack, set_current_timer_slack};
        // A kernel without the call leaves the default: the nap is then only less precise.
        let previous = current_timer_slack()
            .ok()
            .and_then(std::num::NonZeroU64::new);
        if previous.is_some() && set_current_timer_slack(std::num::NonZeroU64::new(1)).is_err() {
            return PreciseTimers { previous: None };
        }
        PreciseTimers { previous }
    }
}

impl Drop for PreciseTimers {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            // Cannot fail for a value the kernel gave (it was one it accepts); if it did, the
            // thread keeps precise timers, which only wakes it on time.
            rustix::thread::set_current_timer_slack(Some(previous)).ok();
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The host's side of one worker's regions.
#[derive(Debug)]
pub(crate) struct HostRegions {
    input: Region,
    output: Region,
    /// The last request's sequence number.
    seq: u64,
}

impl HostRegions {
    pub(crate) fn create() -> std::io::Result<HostRegions> {
        Ok(HostRegions {
            input: Region::create("udfsql-in", INITIAL_INPUT)?,
            output: Region::create("udfsql-out", INITIAL_OUTPUT)?,
            seq: 0,
        })
    }

    /// Sends the regions to the worker on `channel`.
    pub(crate) fn send(&self, channel: &UnixStream) -> std::io::Result<()> {
        shm::send_with_fds(channel, &SETUP, &[self.input.fd(), self.output.fd()])
    }

    /// Writes a call request into the input region.
    pub(crate) fn write_call(
        &mut self,
        function: usize,
        path: CallPath,
        asynchronous: Option<&AsyncLimits>,
        args: &[(ArrayRef, bool)],
        rows: usize,
    ) -> Result<(), String> {
        let mut out = RegionWriter::new(&mut self.input, CALL_AT);
        protocol::encode_call(&mut out, function, path, asynchronous, args, rows)
    }

    /// Writes an aggregate request into the input region.
    pub(crate) fn write_aggregate(&mut self, op: &protocol::AggregateOp) -> Result<(), String> {
        let mut out = RegionWriter::new(&mut self.input, CALL_AT);
        protocol::encode_aggregate(&mut out, op)
    }

    /// Publishes the request written last, ringing the worker if it sleeps; its sequence
    /// number. Fails when the channel is broken (the worker is gone).
    pub(crate) fn publish(&mut self, channel: &UnixStream) -> std::io::Result<u64> {
        self.seq += 1;
        self.input.word(REQ_SEQ).store(self.seq, SeqCst);
        if self.input.word(WORKER_SLEEPING).load(SeqCst) != 0 {
            shm::ring(channel, BELL)?;
        }
        Ok(self.seq)
    }

    /// Whether the worker says it answered request `seq`.
    pub(crate) fn replied(&self, seq: u64) -> bool {
        self.input.word(REP_SEQ).load(SeqCst) == seq
    }

    /// Where the host and the worker run.
    pub(crate) fn whereabouts(&self) -> Whereabouts<'_> {
        Whereabouts {
            mine: self.input.word(HOST_CPU),
            theirs: self.input.word(WORKER_CPU),
        }
    }

    /// Tells the worker to ring (or not) when it replies.
    pub(crate) fn set_sleeping(&self, sleeping: bool) {
        self.input
            .word(HOST_SLEEPING)
            .store(u64::from(sleeping), SeqCst);
    }

    /// A copy of the reply's body, of at most what a request expecting `expect` can receive (a
    /// result of that type and rows; `None`: an acknowledgement or an error); why not, when the
    /// header is not one or the body is not all in the region.
    pub(crate) fn take_reply(
        &mut self,
        expect: Option<(&DataType, usize)>,
    ) -> Result<Buffer, String> {
        let mut header = [0u8; HEADER];
        if !self.output.read_into(0, &mut header) {
            return Err("the shared region is smaller than a message header".to_string());
        }
        let len = protocol::body_len(&header)?;
        let max = protocol::max_reply_len(expect);
        if len > max {
            return Err(match expect {
                Some((t, rows)) => format!(
                    "a message of {len} bytes, more than a result of {rows} rows of {t} takes \
                     (at most {max} bytes)"
                ),
                None => format!("a message of {len} bytes where at most {max} were expected"),
            });
        }
        let end = HEADER + len;
        let mapped = self
            .output
            .map_written(end)
            .map_err(|e| format!("cannot map the shared region: {e}"))?;
        if !mapped {
            return Err(format!(
                "a message of {len} bytes past the end of the shared region ({} bytes)",
                self.output.file_len().unwrap_or(0)
            ));
        }
        let body = self
            .output
            .copy_out(HEADER, len)
            .ok_or("a message past the end of the shared region")?;
        Ok(Buffer::from(body))
    }
}

/// The worker's side of its regions.
#[derive(Debug)]
pub(crate) struct WorkerRegions {
    input: Region,
    output: Region,
    /// The request being answered.
    seq: u64,
    /// How long the worker spins for the next request: as long as the host took lately
    /// between a reply and its next request.
    spin: AdaptiveSpin,
    /// When the last reply was published.
    replied_at: Option<Instant>,
}

impl WorkerRegions {
    /// Receives the regions from the host (the first message after the ready message).
    pub(crate) fn receive(channel: &UnixStream) -> std::io::Result<WorkerRegions> {
        let mut setup = [0u8; SETUP.len()];
        let [input, output] = shm::receive_with_fds::<2>(channel, &mut setup)?;
        if setup != SETUP {
            return Err(std::io::Error::other("not a setup message"));
        }
        Ok(WorkerRegions {
            input: Region::open(input)?,
            output: Region::open(output)?,
            seq: 0,
            spin: AdaptiveSpin::new(WORKER_SPIN),
            replied_at: None,
        })
    }

    /// Waits for the next request and returns its body, used in place; `None` when the host
    /// closed the channel.
    pub(crate) fn next_call(
        &mut self,
        mut channel: &UnixStream,
    ) -> std::io::Result<Option<Buffer>> {
        let seq = self.seq;
        let spin = self.spin.next();
        let whereabouts = Whereabouts {
            mine: self.input.word(WORKER_CPU),
            theirs: self.input.word(HOST_CPU),
        };
        loop {
            if spin_until(
                spin,
                || whereabouts.beside(),
                || self.input.word(REQ_SEQ).load(SeqCst) != seq,
            ) {
                break;
            }
            whereabouts.asleep();
            self.input.word(WORKER_SLEEPING).store(1, SeqCst);
            if self.input.word(REQ_SEQ).load(SeqCst) != seq {
                self.input.word(WORKER_SLEEPING).store(0, SeqCst);
                break;
            }
            let mut bell = [0u8; 64];
            let read = loop {
                match channel.read(&mut bell) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            self.input.word(WORKER_SLEEPING).store(0, SeqCst);
            if read? == 0 {
                return Ok(None);
            }
        }
        if let Some(replied_at) = self.replied_at.take() {
            self.spin.record(replied_at.elapsed());
        }
        self.seq = self.input.word(REQ_SEQ).load(SeqCst);
        let mut header = [0u8; HEADER];
        if !self.input.map_written(CALL_AT + HEADER)? || !self.input.read_into(CALL_AT, &mut header)
        {
            return Err(std::io::Error::other(
                "a request past the end of the region",
            ));
        }
        let len = protocol::body_len(&header).map_err(std::io::Error::other)?;
        if !self.input.map_written(CALL_AT + HEADER + len)? {
            return Err(std::io::Error::other(
                "a request past the end of the region",
            ));
        }
        self.input
            .buffer(CALL_AT + HEADER, len)
            .map(Some)
            .ok_or_else(|| std::io::Error::other("a request past the end of the region"))
    }

    /// Where the reply to the current request is written.
    pub(crate) fn reply(&mut self) -> RegionWriter<'_> {
        RegionWriter::new(&mut self.output, 0)
    }

    /// Publishes the reply written, ringing the host if it sleeps.
    pub(crate) fn publish(&mut self, channel: &UnixStream) -> std::io::Result<()> {
        self.input.word(REP_SEQ).store(self.seq, SeqCst);
        if self.input.word(HOST_SLEEPING).load(SeqCst) != 0 {
            shm::ring(channel, BELL)?;
        }
        self.replied_at = Some(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    const LIMIT: Spin = Spin {
        busy: Duration::from_micros(20),
        total: Duration::from_micros(200),
    };

    fn waits(spin: &mut AdaptiveSpin, micros: u64, times: usize) {
        for _ in 0..times {
            spin.record(Duration::from_micros(micros));
        }
    }

    #[test]
    fn a_spin_follows_the_recent_waits_within_its_limit() {
        let mut spin = AdaptiveSpin::new(LIMIT);
        // Nothing seen yet: a short spin, busy all along.
        let first = spin.next();
        assert_eq!(first.total, AdaptiveSpin::SLACK);
        assert_eq!(first.busy, AdaptiveSpin::SLACK);

        // Quick replies (40 µs): spin about twice as long, busy for the limit's busy part.
        waits(&mut spin, 40, 40);
        let quick = spin.next();
        assert!(
            quick.total >= Duration::from_micros(80) && quick.total <= Duration::from_micros(95),
            "{quick:?}"
        );
        assert_eq!(quick.busy, LIMIT.busy);

        // Replies a little slower than the limit: spin up to the limit, not past it.
        waits(&mut spin, 150, 40);
        assert_eq!(spin.next().total, LIMIT.total);

        // Replies slower than the limit: no spin at all.
        waits(&mut spin, 5_000, 8);
        let slow = spin.next();
        assert_eq!(slow.total, Duration::ZERO);
        assert_eq!(slow.busy, Duration::ZERO);
    }

    #[test]
    fn precise_timers_set_the_threads_slack_for_their_lifetime_only() {
        use rustix::thread::{current_timer_slack, set_current_timer_slack};
        let original = current_timer_slack().expect("PR_GET_TIMERSLACK");
        // A slack of the thread's own, not the default: the guard must put back this one.
        let own = 123_456;
        set_current_timer_slack(std::num::NonZeroU64::new(own)).expect("PR_SET_TIMERSLACK");
        {
            let _precise = PreciseTimers::new();
            assert_eq!(current_timer_slack().unwrap(), 1);
        }
        assert_eq!(current_timer_slack().unwrap(), own);
        set_current_timer_slack(std::num::NonZeroU64::new(original)).expect("restored");
    }

    #[test]
    fn a_side_naps_through_long_calls_and_wakes_before_they_usually_end() {
        let mut spin = AdaptiveSpin::new(HOST_SPIN);
        // Quick calls: spun for, never napped.
        waits(&mut spin, 30, 20);
        assert_eq!(spin.nap(), None);
        // Calls of 800 µs: too long to spin for; a nap to 100 µs before their usual end.
        waits(&mut spin, 800, 40);
        assert_eq!(spin.next().total, Duration::ZERO);
        let nap = spin.nap().expect("a nap");
        assert!(
            nap > Duration::from_micros(690) && nap <= Duration::from_micros(700),
            "{nap:?}"
        );
        assert_eq!(spin.after_nap().total, Duration::from_micros(200));
        // Calls of 50 ms: a wake-up costs little beside them; no nap.
        waits(&mut spin, 50_000, 40);
        assert_eq!(spin.nap(), None);
        // Quick again: spun for, and the nap forgotten.
        waits(&mut spin, 30, 40);
        assert_eq!(spin.nap(), None);
        assert!(spin.next().total > Duration::ZERO);
    }

    #[test]
    fn one_long_pause_does_not_stop_the_spin_and_slow_waits_are_forgotten_quickly() {
        let mut spin = AdaptiveSpin::new(LIMIT);
        waits(&mut spin, 30, 20);
        // The gap between two queries: an hour, counted as twice the limit. The next query's
        // first wait still spins.
        spin.record(Duration::from_secs(3600));
        assert!(spin.next().total > Duration::ZERO);
        // A run of slow waits stops it...
        waits(&mut spin, 3_600_000_000, 3);
        assert_eq!(spin.next().total, Duration::ZERO);
        // ...and a few quick ones bring it back.
        let mut quick = 0;
        while spin.next().total == Duration::ZERO {
            spin.record(Duration::from_micros(30));
            quick += 1;
            assert!(quick <= 4, "still not spinning after {quick} quick waits");
        }
        assert!(quick >= 1);
        waits(&mut spin, 30, 20);
        assert!(spin.next().total <= Duration::from_micros(80));
    }

    fn pin_here() -> usize {
        let cpu = rustix::thread::sched_getcpu();
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set).expect("pin the thread");
        cpu
    }

    #[test]
    fn whereabouts_say_where_a_side_runs_and_whether_the_other_was_seen_there() {
        let cpu = pin_here() as u64;
        let (mine, theirs) = (AtomicU64::new(0), AtomicU64::new(0));
        let here = Whereabouts {
            mine: &mine,
            theirs: &theirs,
        };
        // The other side asleep (0): not beside; this side says where it runs.
        assert!(!here.beside());
        assert_eq!(mine.load(SeqCst), cpu + 1);
        // The other side on another CPU, then on this one.
        theirs.store(cpu + 2, SeqCst);
        assert!(!here.beside());
        theirs.store(cpu + 1, SeqCst);
        assert!(here.beside());
        here.asleep();
        assert_eq!(mine.load(SeqCst), 0);
        // Awake again without spinning (a host woken from its sleep): it says where.
        assert_eq!(here.awake(), cpu + 1);
        assert_eq!(mine.load(SeqCst), cpu + 1);
    }

    /// The thread's switches away from the CPU while it could have run on.
    fn involuntary_switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("nonvoluntary_ctxt_switches")
    }

    /// Spins for 20 ms (never done, all of it busy unless `beside`) on this thread's CPU, with
    /// a second thread pinned to the same CPU that yields in a loop; how often the spinning
    /// thread let the other one run.
    fn switches_while_spinning(beside: bool) -> u64 {
        let cpu = pin_here();
        let stop = Arc::new(AtomicBool::new(false));
        let other = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut set = rustix::thread::CpuSet::new();
                set.set(cpu);
                rustix::thread::sched_setaffinity(None, &set).expect("pin the thread");
                while !stop.load(SeqCst) {
                    std::thread::yield_now();
                }
            }
        });
        let before = involuntary_switches();
        let spin = Spin {
            busy: Duration::from_millis(20),
            total: Duration::from_millis(20),
        };
        assert!(!spin_until(spin, || beside, || false));
        let switches = involuntary_switches() - before;
        stop.store(true, SeqCst);
        other.join().expect("the other thread");
        switches
    }

    #[test]
    fn a_side_waiting_on_the_cpu_of_the_side_it_waits_for_lets_it_run_at_once() {
        // Beside the other side, the spin yields at every look: the other thread gets the CPU
        // again and again. Elsewhere, it is busy the whole time and only the scheduler's
        // preemption (every few milliseconds) lets the other thread run. Up to five tries: a
        // third thread on the same CPU (another test, another program) takes turns too (seen
        // beside a busy process: 15-17 switches while yielding, 3-4 while busy; a spin that never
        // yields: 4-5 and 4).
        let mut tries = Vec::new();
        for _ in 0..5 {
            let yielding = switches_while_spinning(true);
            let busy = switches_while_spinning(false);
            tries.push((yielding, busy));
            if yielding >= 10 && yielding >= 3 * busy {
                return;
            }
        }
        panic!("switches while yielding and while busy, in each try: {tries:?}");
    }
}
