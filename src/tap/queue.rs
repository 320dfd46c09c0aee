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
    /// Stop after writing everything queued before this message.
    Stop,
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
    pub(crate) records_queued: AtomicU64,
    pub(crate) bytes_queued: AtomicU64,
    pub(crate) records_written: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) dropped_records: AtomicU64,
    pub(crate) dropped_bytes: AtomicU64,
    pub(crate) write_errors: AtomicU64,
}

impl Shared {
    pub(crate) fn new(budget: usize) -> Shared {
        Shared {
            budget,
            queued_cost: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            records_queued: AtomicU64::new(0),
            bytes_queued: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            dropped_records: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
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

    fn count_drop(&self, payload: usize) {
        self.dropped_records.fetch_add(1, Ordering::Relaxed);
        self.dropped_bytes
            .fetch_add(payload as u64, Ordering::Relaxed);
    }
}

/// The answer of [`TapHandle::wants`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// Show the bytes to the tap.
    Yes,
    /// Past snaplen: the tap never captures these bytes (not a drop).
    BeyondSnaplen,
    /// The queue is full: these bytes would be dropped.
    QueueFull,
}

/// Cheap, cloneable, `Send + Sync` handle the event loop uses to feed the tap.
///
/// Its methods never block and never do I/O; see the module documentation of `tap`.
#[derive(Clone, Debug)]
pub struct TapHandle {
    shared: Arc<Shared>,
    /// Unbounded: `send` never blocks. `Sender` is `Sync`, so no lock is needed.
    tx: Sender<Msg>,
    snaplen: Option<u64>,
}

// The handle must be usable from any thread of the event loop.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TapHandle>();
};

impl TapHandle {
    pub(crate) fn new(shared: Arc<Shared>, tx: Sender<Msg>, snaplen: Option<u64>) -> TapHandle {
        TapHandle {
            shared,
            tx,
            snaplen,
        }
    }

    /// Queues `bytes`, proxied in `dir` at stream `offset`, for the writer.
    ///
    /// Never blocks, never does I/O. Applies snaplen: bytes beyond it are clipped, and a chunk
    /// entirely beyond it queues nothing and returns `true`. Copies `bytes` only if the record is
    /// admitted. Returns `false` if the record was dropped (queue full or tap shut down); the drop
    /// is counted.
    pub fn data(&self, conn: &Arc<ConnMeta>, dir: Direction, offset: u64, bytes: &[u8]) -> bool {
        let Some(bytes) = clip(self.snaplen, offset, bytes) else {
            return true;
        };
        let cost = bytes.len().saturating_add(RECORD_OVERHEAD);
        if !self.shared.try_reserve(cost, self.shared.budget) {
            self.shared.count_drop(bytes.len());
            return false;
        }
        let event = TapEvent::Data {
            dir,
            offset,
            bytes: bytes.to_vec(),
        };
        self.push(conn, event, cost, bytes.len())
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
        let limit = self.shared.budget.saturating_add(CONTROL_RESERVE);
        if !self.shared.try_reserve(RECORD_OVERHEAD, limit) {
            self.shared.count_drop(0);
            return false;
        }
        self.push(conn, event, RECORD_OVERHEAD, 0)
    }

    /// Whether the tap wants the bytes at stream offset `offset` of a direction now: not when
    /// they are beyond snaplen (never captured), nor when a chunk of `len` bytes would not fit in
    /// the queue (it would be dropped). Either way the event loop may move those bytes with
    /// `splice(2)` without showing them to the tap, and reports a full queue with
    /// [`TapHandle::count_skipped`].
    pub fn wants(&self, offset: u64, len: usize) -> Wants {
        if self.snaplen.is_some_and(|s| offset >= s) {
            return Wants::BeyondSnaplen;
        }
        let queued = self.shared.queued_cost.load(Ordering::Acquire);
        if self.shared.closed.load(Ordering::Relaxed)
            || queued + len + RECORD_OVERHEAD > self.shared.budget
        {
            return Wants::QueueFull;
        }
        Wants::Yes
    }

    /// Counts `bytes` that were proxied without being offered to the tap because its queue was
    /// full, as one dropped record.
    pub fn count_skipped(&self, bytes: u64) {
        if bytes > 0 {
            self.shared
                .count_drop(usize::try_from(bytes).unwrap_or(usize::MAX));
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> TapStats {
        self.shared.stats()
    }

    /// Cost currently queued (for tests).
    #[cfg(test)]
    pub(crate) fn queued_cost(&self) -> usize {
        self.shared.queued_cost.load(Ordering::Acquire)
    }

    fn push(&self, conn: &Arc<ConnMeta>, event: TapEvent, cost: usize, payload: usize) -> bool {
        let record = TapRecord {
            time: SystemTime::now(),
            conn: Arc::clone(conn),
            event,
        };
        if self.tx.send(Msg::Record(record, cost)).is_err() {
            // The writer is gone (it only exits at shutdown).
            self.shared.release(cost);
            self.shared.count_drop(payload);
            return false;
        }
        self.shared.records_queued.fetch_add(1, Ordering::Relaxed);
        self.shared
            .bytes_queued
            .fetch_add(payload as u64, Ordering::Relaxed);
        true
    }
}

/// Clips `bytes` at stream `offset` to `snaplen`; `None` if nothing is left to queue.
fn clip(snaplen: Option<u64>, offset: u64, bytes: &[u8]) -> Option<&[u8]> {
    let bytes = match snaplen {
        Some(limit) if offset >= limit => return None,
        Some(limit) => {
            let room = usize::try_from(limit - offset).unwrap_or(usize::MAX);
            &bytes[..bytes.len().min(room)]
        }
        None => bytes,
    };
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

    #[test]
    fn reserve_respects_limit() {
        let s = Shared::new(100);
        assert!(s.try_reserve(60, 100));
        assert!(!s.try_reserve(60, 100));
        assert!(s.try_reserve(40, 100));
        s.release(100);
        assert_eq!(s.queued_cost.load(Ordering::Relaxed), 0);
        s.closed.store(true, Ordering::Release);
        assert!(!s.try_reserve(1, 100));
    }
}
