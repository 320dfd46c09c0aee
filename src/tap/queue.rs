//! The loop side of the tap: [`TapHandle`] admits records into the writer's queue.
//!
//! Invariants:
//! - `data` and `event` never block and never do I/O: they take the clock, do a few atomic
//!   operations, copy an admitted payload, and push onto an unbounded `mpsc` channel (which
//!   allocates, but never waits). They never log either (a logger may write to a blocked stderr);
//!   the writer thread reports drops.
//! - Every queued record has a cost (`payload len + RECORD_OVERHEAD`). `Shared::queued_cost` is
//!   the sum of the costs of the records admitted and not yet written (the writer releases a
//!   batch's cost only after writing it, so records in flight inside the writer still count).
//!   Data records are admitted only while `queued_cost + cost <= budget`; control records
//!   (Open/Fin/Reset/Close) may use `CONTROL_RESERVE` more. Hence the memory held by queued
//!   records never exceeds `budget + CONTROL_RESERVE`, even if the writer is blocked forever.
//! - Every record not admitted is counted in `dropped_records` / `dropped_bytes`.
//! - Snaplen is applied here: bytes at stream offsets `>= snaplen` are never queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::SystemTime;

use super::TapStats;
use super::record::{ConnMeta, Direction, TapEvent, TapRecord};
use crate::splice::TeePipe;

/// Fixed cost charged per record on top of its payload (the record itself, the `Arc` clone, the
/// channel node).
pub(crate) const RECORD_OVERHEAD: usize = 64;

/// Extra budget that control records (Open/Fin/Reset/Close) may use over the configured budget,
/// so that connection boundaries survive a queue that data filled up.
pub(crate) const CONTROL_RESERVE: usize = 1024 * RECORD_OVERHEAD;

/// What travels on the channel to the writer thread.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A record and the cost it was admitted with.
    Record(TapRecord, usize),
    /// A data record whose bytes wait in a tee pipe (see [`TapHandle::tee`]), and its cost.
    Teed(Teed, usize),
    /// Stop after writing everything queued before this message.
    Stop,
    /// The last handle is gone: stop like [`Msg::Stop`], and report the tap's end.
    Retire,
}

/// Data captured with `tee(2)`: `len` bytes at the head of `pipe` (after those of earlier
/// records naming the same pipe) are the bytes proxied in `dir` at `offset`.
#[derive(Debug)]
pub(crate) struct Teed {
    pub(crate) time: SystemTime,
    pub(crate) conn: Arc<ConnMeta>,
    pub(crate) dir: Direction,
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) pipe: Arc<TeePipe>,
}

impl Teed {
    /// Reads the bytes out of the pipe into a plain data record, and says how many of the `len`
    /// bytes were missing from the pipe (none, unless it lost them).
    pub(crate) fn into_record(self) -> (TapRecord, usize) {
        let mut bytes = Vec::with_capacity(self.len);
        let missing = self.len - self.pipe.read_into(&mut bytes, self.len);
        let record = TapRecord {
            time: self.time,
            conn: self.conn,
            event: TapEvent::Data {
                dir: self.dir,
                offset: self.offset,
                bytes,
            },
        };
        (record, missing)
    }
}

/// State shared by all handles, the guard and the writer thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Budget for data records (bytes of cost).
    pub(crate) budget: usize,
    /// Sum of the costs of admitted records not yet written.
    pub(crate) queued_cost: AtomicUsize,
    /// Set by shutdown: no record is admitted any more.
    pub(crate) closed: AtomicBool,
    /// Set by the writer once it has written what it will write and closed its files.
    pub(crate) finished: AtomicBool,
    /// Set by the writer when it finished because every handle was gone ([`Msg::Retire`]); it
    /// has then logged its totals itself.
    pub(crate) retired: AtomicBool,
    /// When a worker's tee pipe is behind: copy the bytes (true, a normal-priority writer) or
    /// drop them (false, a low-priority writer).
    pub(crate) copy_when_behind: bool,
    pub(crate) records_queued: AtomicU64,
    pub(crate) bytes_queued: AtomicU64,
    /// Of the records queued (and their payload bytes), those the writer has written or counted
    /// as dropped: the rest is what a writer abandoned at exit loses. Written by the writer
    /// only, so the data path counts a record once, in `records_queued`.
    pub(crate) settled_records: AtomicU64,
    pub(crate) settled_bytes: AtomicU64,
    pub(crate) records_written: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) dropped_records: AtomicU64,
    pub(crate) dropped_bytes: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    /// The outputs, for messages (`tap.log, cap.pcap`); set by the writer.
    pub(crate) label: std::sync::OnceLock<String>,
    /// When (see [`clock_ms`]) the writer went into its outputs with the current batch (an
    /// open or a write, which a FIFO nobody reads blocks); 0 while it is not in one.
    pub(crate) in_sink_since: AtomicU64,
    /// When a drop last warned that the writer is stuck in its outputs.
    stuck_warned: AtomicU64,
}

/// Milliseconds since the first call, never 0 (0 means "not set" in [`Shared`]).
pub(crate) fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// A writer this long in one open or write of its outputs is stuck there (a FIFO nobody reads,
/// a hung disk): the drops it causes say so.
const STUCK_MS: u64 = 5_000;
/// The most often a drop repeats that warning.
const STUCK_WARN_EVERY_MS: u64 = 30_000;

impl Shared {
    pub(crate) fn new(budget: usize, copy_when_behind: bool) -> Shared {
        Shared {
            budget,
            copy_when_behind,
            queued_cost: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            records_queued: AtomicU64::new(0),
            bytes_queued: AtomicU64::new(0),
            settled_records: AtomicU64::new(0),
            settled_bytes: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            dropped_records: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            label: std::sync::OnceLock::new(),
            in_sink_since: AtomicU64::new(0),
            stuck_warned: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> TapStats {
        TapStats {
            records_queued: self.records_queued.load(Ordering::Relaxed),
            bytes_queued: self.bytes_queued.load(Ordering::Relaxed),
            records_written: self.records_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            dropped_records: self.dropped_records.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Reserves `cost` in the queue if it fits under `limit`. Lock-free, never blocks.
    fn try_reserve(&self, cost: usize, limit: usize) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        self.queued_cost
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                queued.checked_add(cost).filter(|total| *total <= limit)
            })
            .is_ok()
    }

    pub(crate) fn release(&self, cost: usize) {
        self.queued_cost.fetch_sub(cost, Ordering::AcqRel);
    }

    pub(crate) fn count_drop(&self, payload: usize) {
        self.count_drops(1, payload as u64);
    }

    /// Counts `payload` bytes of a record that is written all the same (a teed record whose
    /// pipe came up short): the record itself counts as written, once.
    pub(crate) fn count_missing(&self, payload: usize) {
        self.count_drops(0, payload as u64);
    }

    /// The writer is done with admitted records (written or counted as dropped).
    pub(crate) fn settle(&self, records: u64, payload: u64) {
        self.settled_records.fetch_add(records, Ordering::Relaxed);
        self.settled_bytes.fetch_add(payload, Ordering::Relaxed);
    }

    /// Records queued and not settled when the writer is abandoned (it did not finish in time
    /// at exit) count as dropped: written + dropped then still adds up to what was admitted.
    /// Records (and their payload bytes) queued that the writer has not settled yet.
    pub(crate) fn unsettled(&self) -> (u64, u64) {
        let unsettled = |queued: &AtomicU64, settled: &AtomicU64| {
            (queued.load(Ordering::Relaxed)).saturating_sub(settled.load(Ordering::Relaxed))
        };
        (
            unsettled(&self.records_queued, &self.settled_records),
            unsettled(&self.bytes_queued, &self.settled_bytes),
        )
    }

    pub(crate) fn abandon(&self) -> (u64, u64) {
        let unsettled = |queued: &AtomicU64, settled: &AtomicU64| {
            let queued = queued.load(Ordering::Relaxed);
            queued.saturating_sub(settled.swap(queued, Ordering::Relaxed))
        };
        let records = unsettled(&self.records_queued, &self.settled_records);
        let payload = unsettled(&self.bytes_queued, &self.settled_bytes);
        self.count_drops(records, payload);
        (records, payload)
    }

    /// Counts `records` dropped records holding `payload` bytes.
    pub(crate) fn count_drops(&self, records: u64, payload: u64) {
        self.dropped_records.fetch_add(records, Ordering::Relaxed);
        self.dropped_bytes.fetch_add(payload, Ordering::Relaxed);
        self.warn_if_stuck();
    }

    /// A drop while the writer has been stuck in its outputs for [`STUCK_MS`]: the writer cannot
    /// report its drops itself, so this warns (at most every [`STUCK_WARN_EVERY_MS`], from
    /// whichever thread drops; the log line is queued, never written here).
    fn warn_if_stuck(&self) {
        let since = self.in_sink_since.load(Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let now = clock_ms();
        if now.saturating_sub(since) < STUCK_MS {
            return;
        }
        let last = self.stuck_warned.load(Ordering::Relaxed);
        if last != 0 && now - last < STUCK_WARN_EVERY_MS {
            return;
        }
        if (self.stuck_warned)
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        log::warn!(
            "tap {}: its output has taken nothing for {} s (a FIFO nobody reads? a hung disk?); \
             its records are dropped and counted meanwhile ({} so far)",
            self.label.get().map_or("?", String::as_str),
            (now - since) / 1000,
            self.dropped_records.load(Ordering::Relaxed)
        );
    }
}

/// Capacity asked for each tee pipe (the most an unprivileged process may ask for by default).
const TEE_PIPE_SIZE: usize = 1 << 20;

/// The most bytes one tee hands the tap: a kernel pipe that a tap takes tees of is filled by at
/// most this much at a time, so that chunks fit the tee pipes (see [`TeePipe::has_room`]). A
/// small queue budget lowers it further (see [`TapHandle::chunk_max`]).
pub const TEE_CHUNK_MAX: usize = TEE_PIPE_SIZE / 4;

/// A chunk handed to the tap costs at most this share of the queue budget, so that the queue
/// holds this many chunks: a writer that keeps up empties it while the next ones come in.
pub(crate) const CHUNKS_PER_QUEUE: usize = 4;

/// One worker's tee pipes. A pipe's capacity counts buffers (pages or socket fragments), not
/// bytes, so each pipe takes bytes up to half its capacity; pipes are added while the writer
/// lags, until together they could hold the whole queue budget. Records name their pipe, and
/// each pipe is read in the order it was fed, so bytes may go to any pipe with room.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    /// Only the owning worker locks it (the writer reads through the records' `Arc`s).
    pipes: std::sync::Mutex<Vec<Arc<TeePipe>>>,
    /// How many pipes it held after the last change, read without the lock by the event loop
    /// to know whether it has pipes to trim (see [`TapHandle::may_trim_tee_pipes`]).
    held: AtomicUsize,
}

impl Lane {
    /// A pipe that can take `len` more bytes now, made if needed and allowed; `None` when all
    /// are behind and no more can be had.
    fn pipe_with_room(&self, len: usize, budget: usize) -> Option<Arc<TeePipe>> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|e| e.into_inner());
        self.trim(&mut pipes);
        if let Some(p) = pipes.iter().find(|p| p.has_room(len)) {
            return Some(Arc::clone(p));
        }
        let held: usize = pipes.iter().map(|p| p.capacity() / 2).sum();
        if held >= budget {
            return None;
        }
        let pipe = Arc::new(TeePipe::new(TEE_PIPE_SIZE).ok()?);
        if !pipe.has_room(len) {
            return None;
        }
        pipes.push(Arc::clone(&pipe));
        self.held.store(pipes.len(), Ordering::Relaxed);
        Some(pipe)
    }

    /// Closes the pipes the writer has emptied and no queued record names, but one: pipes added
    /// while the writer lagged go once it has caught up, giving their descriptors back (see
    /// [`crate::fd_budget`]).
    fn trim(&self, pipes: &mut Vec<Arc<TeePipe>>) {
        if pipes.len() < 2 {
            return; // one pipe, idle or not, stays
        }
        let mut idle_kept = false;
        pipes.retain(|p| {
            let idle = p.pending() == 0 && Arc::strong_count(p) == 1;
            let keep = !idle || !idle_kept;
            idle_kept |= idle;
            keep
        });
        self.held.store(pipes.len(), Ordering::Relaxed);
    }
}

/// The answer of [`TapHandle::wants`].
#[derive(Debug, Clone)]
pub enum Wants {
    /// Copy the bytes and show them to the tap.
    Yes,
    /// Splice the bytes and give the tap a tee of them, into this pipe of the worker's lane
    /// while it has room (see [`TapHandle::tee`]).
    Tee(Arc<TeePipe>),
    /// Past snaplen: the tap never captures these bytes (not a drop).
    BeyondSnaplen,
    /// The queue is full (or the tee pipe is, behind a low-priority writer): these bytes
    /// would be dropped.
    QueueFull,
}

/// What every handle of one tap shares: the counters, the sending end of the queue and the
/// snaplen. The writer runs as long as it exists: when the last handle goes (no route in force
/// and no open connection uses the tap any more), dropping it tells the writer to finish
/// ([`Msg::Retire`]).
#[derive(Debug)]
pub(crate) struct Feed {
    pub(crate) shared: Arc<Shared>,
    /// Unbounded: `send` never blocks. `Sender` is `Sync`, so no lock is needed.
    tx: Sender<Msg>,
    snaplen: Option<u64>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        // Every record of every handle was sent before this (the handles are gone), so the
        // writer sees them first. Never blocks; a writer that is gone already needs nothing.
        let _ = self.tx.send(Msg::Retire);
    }
}

/// Cheap, cloneable, `Send + Sync` handle the event loop uses to feed the tap.
///
/// Its methods never block and never do I/O; see the module documentation of `tap`. The tap's
/// writer finishes once every handle is dropped (see [`Feed`]).
#[derive(Clone, Debug)]
pub struct TapHandle {
    feed: Arc<Feed>,
    /// This worker's tee pipes (see [`TapHandle::for_worker`]); `None` on the handle `start`
    /// returns (the tap then sees copied bytes only).
    lane: Option<Arc<Lane>>,
}

// The handle must be usable from any thread of the event loop.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TapHandle>();
};

impl TapHandle {
    pub(crate) fn new(shared: Arc<Shared>, tx: Sender<Msg>, snaplen: Option<u64>) -> TapHandle {
        TapHandle::from_feed(Arc::new(Feed {
            shared,
            tx,
            snaplen,
        }))
    }

    /// Another handle of the tap `feed` belongs to (one that some handle still holds).
    pub(crate) fn from_feed(feed: Arc<Feed>) -> TapHandle {
        TapHandle { feed, lane: None }
    }

    /// What this handle's tap shares with every other handle of it.
    pub(crate) fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// A handle for one event loop, with a tee pipe of its own for [`TapHandle::tee`]. A tee
    /// pipe's bytes must be queued in the order they were teed, so one pipe is never fed by two
    /// threads: each worker takes its own handle, and clones of it stay on that worker.
    pub fn for_worker(&self) -> TapHandle {
        TapHandle {
            feed: Arc::clone(&self.feed),
            lane: Some(Arc::new(Lane::default())),
        }
    }

    /// Closes this worker's tee pipes that are idle, but one (see [`Lane`]). Tapped traffic
    /// does it as it comes; the event loop also calls it while descriptors are short, and
    /// every 10 s while [`TapHandle::may_trim_tee_pipes`].
    pub fn trim_tee_pipes(&self) {
        if let Some(lane) = &self.lane {
            lane.trim(&mut lane.pipes.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Whether this worker holds more tee pipes than the one [`TapHandle::trim_tee_pipes`]
    /// keeps, idle or not; a relaxed load, no lock.
    pub fn may_trim_tee_pipes(&self) -> bool {
        self.lane
            .as_ref()
            .is_some_and(|lane| lane.held.load(Ordering::Relaxed) > 1)
    }

    /// Queues `bytes`, proxied in `dir` at stream `offset`, for the writer.
    ///
    /// Never blocks, never does I/O. Applies snaplen: bytes beyond it are clipped, and a chunk
    /// entirely beyond it queues nothing and returns `true`. Copies `bytes` only if the record is
    /// admitted. Returns `false` if the record was dropped (queue full or tap shut down); the drop
    /// is counted.
    pub fn data(&self, conn: &Arc<ConnMeta>, dir: Direction, offset: u64, bytes: &[u8]) -> bool {
        let Some(bytes) = clip(self.feed.snaplen, offset, bytes) else {
            return true;
        };
        let cost = bytes.len().saturating_add(RECORD_OVERHEAD);
        if !self.feed.shared.try_reserve(cost, self.feed.shared.budget) {
            self.feed.shared.count_drop(bytes.len());
            return false;
        }
        let event = TapEvent::Data {
            dir,
            offset,
            bytes: bytes.to_vec(),
        };
        self.push(conn, event, cost, bytes.len())
    }

    /// Queues `bytes` like [`TapHandle::data`], in records of at most
    /// [`TapHandle::chunk_max`] bytes: a read larger than that (a large `buffer_size`, or a
    /// small queue) is captured as far as the queue has room, where one record of it would
    /// never fit. Returns the records and the payload bytes dropped: once a chunk does not fit,
    /// the rest of the read is one dropped record, not one per chunk (and not one attempt each).
    pub fn data_in_chunks(
        &self,
        conn: &Arc<ConnMeta>,
        dir: Direction,
        offset: u64,
        bytes: &[u8],
    ) -> (u64, u64) {
        let mut done = 0;
        for piece in bytes.chunks(self.chunk_max()) {
            let at = offset + done as u64;
            if !self.data(conn, dir, at, piece) {
                // `data` counted this chunk's drop; the bytes after it go with it.
                let rest = clip_len(
                    self.feed.snaplen,
                    at + piece.len() as u64,
                    bytes.len() - done - piece.len(),
                );
                self.feed
                    .shared
                    .dropped_bytes
                    .fetch_add(rest as u64, Ordering::Relaxed);
                let this = clip_len(self.feed.snaplen, at, piece.len());
                return (1, (this + rest) as u64);
            }
            done += piece.len();
        }
        (0, 0)
    }

    /// Queues a connection event (`Open`, `Fin`, `Reset`, `Close`).
    ///
    /// Never blocks, never does I/O. Control records may use a small reserve beyond the queue
    /// budget, so they are rarely lost. A `Data` event is handled exactly like [`TapHandle::data`].
    /// Returns `false` if the record was dropped; the drop is counted.
    pub fn event(&self, conn: &Arc<ConnMeta>, event: TapEvent) -> bool {
        if let TapEvent::Data { dir, offset, bytes } = &event {
            return self.data(conn, *dir, *offset, bytes);
        }
        let limit = self.feed.shared.budget.saturating_add(CONTROL_RESERVE);
        if !self.feed.shared.try_reserve(RECORD_OVERHEAD, limit) {
            self.feed.shared.count_drop(0);
            return false;
        }
        self.push(conn, event, RECORD_OVERHEAD, 0)
    }

    /// The most bytes the tap takes in one record, a tee or a copied chunk: [`TEE_CHUNK_MAX`], or
    /// less when the queue budget is small, so that the queue holds [`CHUNKS_PER_QUEUE`] such
    /// records. Larger chunks would never fit in a small queue, however fast the writer (with a
    /// budget of 16 MiB, the default, this is [`TEE_CHUNK_MAX`]).
    pub fn chunk_max(&self) -> usize {
        (self.feed.shared.budget / CHUNKS_PER_QUEUE)
            .saturating_sub(RECORD_OVERHEAD)
            .clamp(1, TEE_CHUNK_MAX)
    }

    /// How the tap wants the bytes at stream offset `offset` of a spliced (bulk) direction, in
    /// chunks of up to `len` bytes:
    /// - [`Wants::Tee`]: splice them and hand the tap a tee ([`TapHandle::tee`]) into the pipe
    ///   it names, one of this worker's tee pipes with room for `len` bytes;
    /// - [`Wants::Yes`]: copy them through user space and offer them to [`TapHandle::data`]
    ///   (no tee pipe, or it is behind and the writer runs at normal priority);
    /// - [`Wants::BeyondSnaplen`] / [`Wants::QueueFull`]: splice them without the tap; a full
    ///   queue (or a tee pipe behind a low-priority writer) is reported with
    ///   [`TapHandle::count_skipped`].
    pub fn wants(&self, offset: u64, len: usize) -> Wants {
        if self.feed.snaplen.is_some_and(|s| offset >= s) {
            return Wants::BeyondSnaplen;
        }
        let queued = self.feed.shared.queued_cost.load(Ordering::Acquire);
        if self.feed.shared.closed.load(Ordering::Relaxed)
            || queued + len + RECORD_OVERHEAD > self.feed.shared.budget
        {
            return Wants::QueueFull;
        }
        if self.lane.is_none() {
            return Wants::Yes;
        }
        match self.lane_pipe(len) {
            Some(pipe) => Wants::Tee(pipe),
            None if self.feed.shared.copy_when_behind => Wants::Yes,
            None => Wants::QueueFull,
        }
    }

    /// One of this worker's tee pipes with room for `len` more bytes (see [`Lane`]).
    fn lane_pipe(&self, len: usize) -> Option<Arc<TeePipe>> {
        self.lane
            .as_ref()?
            .pipe_with_room(len, self.feed.shared.budget)
    }

    /// Captures `len` bytes, proxied in `dir` at stream `offset`, that fill the whole kernel pipe
    /// `src` (a [`KernelPipe::read_fd`](crate::splice::KernelPipe::read_fd)): duplicates them
    /// with `tee(2)` into the tee pipe `pipe` (from [`Wants::Tee`]) and queues a record naming
    /// them; the writer reads them out. No byte is copied on the data path. Once `pipe` has no
    /// room left, it is replaced by another of the worker's tee pipes that has.
    ///
    /// Never blocks. Applies snaplen like [`TapHandle::data`]. Bytes that do not fit in the queue
    /// budget or in a tee pipe are dropped and counted; returns how many.
    #[allow(clippy::too_many_arguments)]
    pub fn tee(
        &self,
        pipe: &mut Arc<TeePipe>,
        conn: &Arc<ConnMeta>,
        dir: Direction,
        offset: u64,
        src: std::os::fd::RawFd,
        len: usize,
    ) -> u64 {
        let want = clip_len(self.feed.snaplen, offset, len);
        if want == 0 {
            return 0;
        }
        if !pipe.has_room(want) {
            // Earlier chunks filled it: go on with a pipe of the lane that has room, if any.
            if let Some(other) = self.lane_pipe(want) {
                *pipe = other;
            }
        }
        let reserved = want + RECORD_OVERHEAD;
        if !pipe.has_room(want)
            || !self
                .feed
                .shared
                .try_reserve(reserved, self.feed.shared.budget)
        {
            self.feed.shared.count_drop(want);
            return want as u64;
        }
        // A refused tee (it should not be) loses these bytes to the tap, like a full pipe.
        let teed = pipe.tee_from(src, want).unwrap_or(0);
        if teed == 0 {
            self.feed.shared.release(reserved);
            self.feed.shared.count_drop(want);
            return want as u64;
        }
        let cost = teed + RECORD_OVERHEAD;
        self.feed.shared.release(reserved - cost);
        let record = Teed {
            time: SystemTime::now(),
            conn: Arc::clone(conn),
            dir,
            offset,
            len: teed,
            pipe: Arc::clone(pipe),
        };
        let sent = self.send(Msg::Teed(record, cost), cost, teed);
        let lost = want - teed;
        if lost > 0 {
            self.feed.shared.count_drop(lost);
        }
        if sent { lost as u64 } else { want as u64 }
    }

    /// Counts the `len` bytes at stream `offset` that were proxied without being offered to the
    /// tap because its queue was full, as one dropped record: those under snaplen (the tap would
    /// never have captured the rest). Returns the bytes counted.
    pub fn count_skipped(&self, offset: u64, len: u64) -> u64 {
        let counted = clip_len(
            self.feed.snaplen,
            offset,
            usize::try_from(len).unwrap_or(usize::MAX),
        );
        if counted > 0 {
            self.feed.shared.count_drop(counted);
        }
        counted as u64
    }

    /// Totals so far.
    pub fn stats(&self) -> TapStats {
        self.feed.shared.stats()
    }

    /// Cost currently queued (for tests).
    #[cfg(test)]
    pub(crate) fn queued_cost(&self) -> usize {
        self.feed.shared.queued_cost.load(Ordering::Acquire)
    }

    fn push(&self, conn: &Arc<ConnMeta>, event: TapEvent, cost: usize, payload: usize) -> bool {
        let record = TapRecord {
            time: SystemTime::now(),
            conn: Arc::clone(conn),
            event,
        };
        self.send(Msg::Record(record, cost), cost, payload)
    }

    /// Sends an admitted message of `cost` carrying `payload` bytes, and counts it; if the
    /// writer is gone, gives the cost back and counts a drop.
    fn send(&self, msg: Msg, cost: usize, payload: usize) -> bool {
        let shared = &self.feed.shared;
        // Queued before the writer can see it, so that it never settles more than was queued.
        shared.records_queued.fetch_add(1, Ordering::Relaxed);
        (shared.bytes_queued).fetch_add(payload as u64, Ordering::Relaxed);
        if self.feed.tx.send(msg).is_err() {
            // The writer is gone: with a handle left, only the exit stops it.
            shared.records_queued.fetch_sub(1, Ordering::Relaxed);
            (shared.bytes_queued).fetch_sub(payload as u64, Ordering::Relaxed);
            shared.release(cost);
            shared.count_drop(payload);
            return false;
        }
        true
    }
}

/// How many of `len` bytes at stream `offset` fall under `snaplen`.
fn clip_len(snaplen: Option<u64>, offset: u64, len: usize) -> usize {
    match snaplen {
        Some(limit) => len.min(usize::try_from(limit.saturating_sub(offset)).unwrap_or(usize::MAX)),
        None => len,
    }
}

/// Clips `bytes` at stream `offset` to `snaplen`; `None` if nothing is left to queue.
fn clip(snaplen: Option<u64>, offset: u64, bytes: &[u8]) -> Option<&[u8]> {
    let bytes = &bytes[..clip_len(snaplen, offset, bytes.len())];
    (!bytes.is_empty()).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_applies_snaplen() {
        let b = b"0123456789";
        assert_eq!(clip(None, 5, b), Some(&b[..]));
        assert_eq!(clip(Some(8), 0, b), Some(&b[..8]));
        assert_eq!(clip(Some(8), 5, b), Some(&b[..3]));
        assert_eq!(clip(Some(8), 8, b), None);
        assert_eq!(clip(Some(8), 100, b), None);
        assert_eq!(clip(None, 0, b""), None);
    }

    /// A handle over a fresh queue, for one worker, and the writer's end of the channel.
    fn worker_handle(
        budget: usize,
        snaplen: Option<u64>,
    ) -> (TapHandle, std::sync::mpsc::Receiver<Msg>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new(budget, false));
        (TapHandle::new(shared, tx, snaplen).for_worker(), rx)
    }

    /// A kernel pipe holding `data`, spliced from a real socket as the event loop does.
    fn filled_pipe(data: &[u8]) -> crate::splice::KernelPipe {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.write_all(data).unwrap();
        let mut p = crate::splice::KernelPipe::new(64 * 1024).unwrap();
        while p.len < data.len() {
            p.fill_from(b.as_raw_fd(), usize::MAX).unwrap();
        }
        p
    }

    fn conn() -> Arc<ConnMeta> {
        crate::tap::testutil::conn(7, "127.0.0.1:1", "127.0.0.1:2")
    }

    /// A teed record whose pipe came up short is written (shorter): its missing bytes count as
    /// dropped, the record itself only as written, so records written + dropped still equal
    /// records queued.
    #[test]
    fn bytes_missing_from_a_written_record_count_but_the_record_does_not() {
        let shared = Shared::new(1 << 20, false);
        shared.count_missing(6);
        shared.count_drop(10);
        let s = shared.stats();
        assert_eq!((s.dropped_records, s.dropped_bytes), (1, 16));
    }

    /// The writer itself: a teed record whose pipe lost 6 of its 16 bytes before the writer
    /// read them is written, and counted once, as written; the 6 bytes as dropped.
    #[test]
    fn the_writer_counts_a_short_teed_record_once() {
        use crate::tap::text::TextSink;
        use crate::tap::writer::{NamedText, Writer};
        let (h, rx) = worker_handle(1 << 20, None);
        let shared = Arc::clone(&h.feed().shared);
        let mut tee = tee_pipe(&h, 0, 4096);
        let p = filled_pipe(b"sixteen bytes!!!");
        let lost = h.tee(
            &mut tee,
            &conn(),
            Direction::UpToDown,
            0,
            p.read_fd(),
            p.len,
        );
        assert_eq!(lost, 0);
        // Six bytes leave the tee pipe behind the writer's back.
        let mut taken = Vec::new();
        assert_eq!(tee.read_into(&mut taken, 6), 6);
        drop((h, tee));
        let text = NamedText {
            name: "test".into(),
            stdout: false,
            sink: TextSink::new(Box::new(std::io::sink()), false, None),
        };
        let (done, _) = std::sync::mpsc::channel();
        Writer::new(rx, Arc::clone(&shared), Some(text), None).run(done);
        let s = shared.stats();
        assert_eq!(
            (s.records_queued, s.records_written, s.dropped_records),
            (1, 1, 0)
        );
        assert_eq!((s.bytes_written, s.dropped_bytes), (10, 6));
    }

    #[test]
    fn tee_queues_the_spliced_bytes_without_consuming_them() {
        let (h, rx) = worker_handle(1 << 20, None);
        let mut tee = tee_pipe(&h, 0, 4096);
        let p = filled_pipe(b"spliced and teed");
        assert_eq!(
            h.tee(
                &mut tee,
                &conn(),
                Direction::UpToDown,
                100,
                p.read_fd(),
                p.len
            ),
            0
        );
        assert_eq!(p.len, 16, "the loop's pipe keeps its bytes");
        let Ok(Msg::Teed(teed, cost)) = rx.try_recv() else {
            panic!("no teed record")
        };
        assert_eq!(cost, 16 + RECORD_OVERHEAD);
        assert_eq!(h.queued_cost(), cost, "charged until written");
        let (record, missing) = teed.into_record();
        assert_eq!(missing, 0);
        let TapEvent::Data { dir, offset, bytes } = record.event else {
            panic!("not data")
        };
        assert_eq!(
            (dir, offset, bytes.as_slice()),
            (Direction::UpToDown, 100, &b"spliced and teed"[..])
        );
        assert_eq!(h.stats().bytes_queued, 16);
    }

    #[test]
    fn tee_applies_snaplen_and_counts_what_does_not_fit() {
        let (h, rx) = worker_handle(1 << 20, Some(10));
        let mut tee = tee_pipe(&h, 4, 4096);
        let p = filled_pipe(b"0123456789abcdef");
        assert_eq!(
            h.tee(
                &mut tee,
                &conn(),
                Direction::DownToUp,
                4,
                p.read_fd(),
                p.len
            ),
            0
        );
        let Ok(Msg::Teed(teed, _)) = rx.try_recv() else {
            panic!("no teed record")
        };
        let TapEvent::Data { bytes, .. } = teed.into_record().0.event else {
            panic!("not data")
        };
        assert_eq!(bytes, b"012345", "clipped at snaplen 10 from offset 4");
        assert_eq!(
            h.tee(
                &mut tee,
                &conn(),
                Direction::DownToUp,
                10,
                p.read_fd(),
                p.len
            ),
            0
        );
        assert!(rx.try_recv().is_err(), "nothing past snaplen");
        assert!(matches!(h.wants(10, 4096), Wants::BeyondSnaplen));

        // A queue without room for the chunk: dropped and counted, nothing queued.
        let (h, rx) = worker_handle(4096, None);
        let big = filled_pipe(&[1u8; 8192]);
        assert!(matches!(h.wants(0, 8192), Wants::QueueFull));
        let mut tee = tee_pipe(&h, 0, 1024);
        assert_eq!(
            h.tee(
                &mut tee,
                &conn(),
                Direction::DownToUp,
                0,
                big.read_fd(),
                big.len
            ),
            8192
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(
            (h.stats().dropped_records, h.stats().dropped_bytes),
            (1, 8192)
        );
        assert_eq!(h.queued_cost(), 0, "the reservation was given back");
    }

    /// Bytes spliced past a full queue count as dropped only up to snaplen: the tap would never
    /// have captured the rest, and a splice may cross snaplen.
    #[test]
    fn skipped_bytes_count_as_dropped_only_under_snaplen() {
        let (h, _rx) = worker_handle(1 << 20, Some(5000));
        assert_eq!(h.count_skipped(4096, 100_000), 904);
        assert_eq!(h.count_skipped(5000, 100_000), 0);
        let s = h.stats();
        assert_eq!((s.dropped_records, s.dropped_bytes), (1, 904));
        let (h, _rx) = worker_handle(1 << 20, None);
        assert_eq!(h.count_skipped(4096, 100_000), 100_000);
    }

    #[test]
    fn only_a_worker_handle_tees() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let h = TapHandle::new(Arc::new(Shared::new(1 << 20, false)), tx, None);
        assert!(matches!(h.wants(0, 4096), Wants::Yes), "no tee pipe: copy");
        assert!(matches!(h.for_worker().wants(0, 4096), Wants::Tee(_)));
    }

    /// The pipe `wants` hands out for a chunk of `len` bytes at `offset`.
    fn tee_pipe(h: &TapHandle, offset: u64, len: usize) -> Arc<TeePipe> {
        match h.wants(offset, len) {
            Wants::Tee(pipe) => pipe,
            other => panic!("wants {other:?}, not a tee"),
        }
    }

    #[test]
    fn a_full_tee_pipe_hands_over_to_another() {
        let (h, rx) = worker_handle(16 << 20, None);
        let first = tee_pipe(&h, 0, 4096);
        let chunk = filled_pipe(&vec![7u8; (first.capacity() / 8).min(64 * 1024)]);
        let mut tee = Arc::clone(&first);
        let mut offset = 0u64;
        // Tees the chunk at `offset` into the pipe in hand; nothing may be lost.
        let tee_chunk = |tee: &mut Arc<TeePipe>, offset: &mut u64| {
            let lost = h.tee(
                tee,
                &conn(),
                Direction::UpToDown,
                *offset,
                chunk.read_fd(),
                chunk.len,
            );
            assert_eq!(lost, 0, "at offset {offset}");
            *offset += chunk.len as u64;
        };
        // Chunks go to the pipe `wants` named until it is half full, then to a new one.
        while Arc::ptr_eq(&tee, &first) {
            assert!(offset < 4 * first.capacity() as u64, "never handed over");
            tee_chunk(&mut tee, &mut offset);
        }
        assert_eq!(
            first.pending(),
            first.capacity() / 2,
            "the first pipe was filled first"
        );
        assert_eq!(tee.pending(), chunk.len);
        // Each record names the pipe holding its bytes, and no byte was lost.
        let records: Vec<_> = rx.try_iter().collect();
        assert_eq!(records.len() as u64, offset / chunk.len as u64);
        for (i, m) in records.into_iter().enumerate() {
            let Msg::Teed(teed, _) = m else {
                panic!("not teed")
            };
            let last = (i + 1) as u64 * chunk.len as u64 == offset;
            assert!(
                Arc::ptr_eq(&teed.pipe, if last { &tee } else { &first }),
                "record {i}"
            );
            let (record, missing) = teed.into_record();
            assert_eq!(missing, 0);
            let TapEvent::Data { bytes, .. } = record.event else {
                panic!("not data")
            };
            assert!(bytes.len() == chunk.len && bytes.iter().all(|&b| b == 7));
        }
        // The pipe in hand is used while it has room, even when an earlier one has room again.
        let second = Arc::clone(&tee);
        assert_eq!((first.pending(), second.pending()), (0, 0), "all read out");
        tee_chunk(&mut tee, &mut offset);
        assert!(Arc::ptr_eq(&tee, &second));
        assert_eq!((first.pending(), second.pending()), (0, chunk.len));
        // Then the writer has read the first pipe out: `wants` names it again.
        assert!(Arc::ptr_eq(&tee_pipe(&h, offset, 4096), &first));
    }

    #[test]
    fn idle_tee_pipes_are_closed_but_one() {
        let (h, rx) = worker_handle(16 << 20, None);
        let lane = h.lane.as_ref().expect("a worker's handle");
        let count = || lane.pipes.lock().unwrap().len();
        let mut pipes: Vec<Arc<TeePipe>> = (0..4)
            .map(|_| Arc::new(TeePipe::new(64 * 1024).unwrap()))
            .collect();
        lane.pipes.lock().unwrap().extend(pipes.iter().cloned());
        // One holds bytes the writer has yet to read; a record names another.
        let chunk = filled_pipe(b"not read out yet");
        let lost = h.tee(
            &mut pipes[1],
            &conn(),
            Direction::DownToUp,
            0,
            chunk.read_fd(),
            chunk.len,
        );
        assert_eq!(lost, 0);
        let (held, teed) = (Arc::clone(&pipes[1]), rx.try_recv().expect("a record"));
        pipes.clear();
        let _named = Arc::clone(&lane.pipes.lock().unwrap()[2]);
        h.trim_tee_pipes();
        assert_eq!(count(), 3, "the pipe with bytes, the named one, one idle");
        // The writer reads the bytes out and drops its record; the other name goes too.
        drop(teed);
        drop(held);
        drop(_named);
        let pipe = Arc::clone(&lane.pipes.lock().unwrap()[1]);
        let mut out = Vec::new();
        assert_eq!(pipe.read_into(&mut out, pipe.pending()), 16);
        drop(pipe);
        h.trim_tee_pipes();
        assert_eq!(count(), 1, "one idle pipe stays for the next tee");
    }

    #[test]
    fn chunks_fit_the_queue_several_times() {
        for (budget, chunk) in [
            (16 << 20, TEE_CHUNK_MAX),
            (1 << 20, TEE_CHUNK_MAX - RECORD_OVERHEAD),
            (128 << 10, (32 << 10) - RECORD_OVERHEAD),
            (64 << 10, (16 << 10) - RECORD_OVERHEAD),
            (4 << 10, 1024 - RECORD_OVERHEAD),
        ] {
            let (h, _rx) = worker_handle(budget, None);
            assert_eq!(h.chunk_max(), chunk, "budget {budget}");
            // An empty queue takes a tee of a whole chunk, and holds four of them.
            assert!(
                matches!(h.wants(0, chunk), Wants::Tee(_)),
                "budget {budget}"
            );
            assert!(CHUNKS_PER_QUEUE * (chunk + RECORD_OVERHEAD) <= budget);
        }
    }

    #[test]
    fn a_read_larger_than_a_chunk_is_queued_in_chunks() {
        let budget = 64 << 10;
        let (h, rx) = worker_handle(budget, None);
        let chunk = h.chunk_max();
        // A whole buffer of 64 KiB: as one record it would cost more than the budget and be
        // dropped whole; in chunks, all but what the records' overhead leaves no room for fits.
        let read: Vec<u8> = (0..budget).map(|i| i as u8).collect();
        let kept = CHUNKS_PER_QUEUE * chunk;
        assert_eq!(
            h.data_in_chunks(&conn(), Direction::DownToUp, 1000, &read),
            (1, (budget - kept) as u64)
        );
        let mut offset = 1000;
        let mut got = Vec::new();
        for m in rx.try_iter() {
            let Msg::Record(record, cost) = m else {
                panic!("not a record")
            };
            let TapEvent::Data {
                offset: at, bytes, ..
            } = record.event
            else {
                panic!("not data")
            };
            assert_eq!(at, offset);
            assert!(bytes.len() <= chunk);
            assert_eq!(cost, bytes.len() + RECORD_OVERHEAD);
            offset += bytes.len() as u64;
            got.extend(bytes);
        }
        assert!(got == read[..kept], "the chunks are queued in order");
        assert_eq!(h.queued_cost(), budget);
        assert_eq!(h.stats().dropped_bytes, (budget - kept) as u64);
        // With the queue full, a whole read is one dropped record.
        assert_eq!(
            h.data_in_chunks(&conn(), Direction::DownToUp, 1000 + budget as u64, &read),
            (1, budget as u64)
        );
        assert_eq!(h.stats().dropped_records, 2);
        assert_eq!(h.stats().dropped_bytes, (2 * budget - kept) as u64);
    }

    #[test]
    fn reserve_respects_limit() {
        let s = Shared::new(100, false);
        assert!(s.try_reserve(60, 100));
        assert!(!s.try_reserve(60, 100));
        assert!(s.try_reserve(40, 100));
        s.release(100);
        assert_eq!(s.queued_cost.load(Ordering::Relaxed), 0);
        s.closed.store(true, Ordering::Release);
        assert!(!s.try_reserve(1, 100));
    }
}
