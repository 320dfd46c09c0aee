//! The writer thread: drains the queue in batches and hands each batch to the sinks.
//!
//! Invariants:
//! - The thread blocks only for the first record of a batch (or in a sink's write); the rest of
//!   the batch is taken with `try_recv`, up to `MAX_BATCH_COST` / `MAX_BATCH_RECORDS`.
//! - After a small batch that emptied the queue the thread sleeps up to `LINGER` before it waits
//!   on the queue again, so that small records (request/response traffic) arrive in batches: one
//!   wake-up and one write per `LINGER`, not a futex wake, a context switch and a write per
//!   record. The loop side never waits for this: sends to a receiver that is not parked are a
//!   lock-free push. Output is at most `LINGER` later, which a reader cannot notice. The sleep
//!   is cut short, at the next `LINGER_SLICE`, once `LINGER_BELOW` of cost is queued, or one
//!   chunk of a queue too small for that (a burst of bulk data must not fill the queue while the
//!   writer sleeps), or the tap is closing. Each sink renders a batch into a reused buffer and
//!   writes it with one write call and one flush (a pcap rotation inside a batch adds the
//!   writes of the file switch). The one exception: a pcap file written with direct I/O may
//!   keep up to `DIRECT_MIN` bytes (and then a partial block) for the next batch while that
//!   batch is already queued, so once the queue is drained every record is in the file.
//! - A low-priority writer sleeps after a batch while the CPUs are contended, three times the CPU
//!   time it used (`throttle`); the sleep ends early when the tap closes.
//! - The queue cost of a batch is released only after the batch was written, so the loop-side
//!   budget also bounds what the writer holds.
//! - Write errors are counted (one per failed batch and sink), reported with `warn!` at most once
//!   per `WARN_INTERVAL`, and never stop the thread: it keeps consuming so the queue keeps
//!   draining. A sink that blocks forever blocks only this thread.
//! - Drops counted by the loop side are reported from here (the loop side must not log), at most
//!   once per `WARN_INTERVAL`, plus a final report at exit.
//! - After `Msg::Stop` (shutdown) or `Msg::Retire` (every handle is gone: no route and no
//!   connection uses the tap any more) the thread writes whatever is still queued, reports the
//!   drops, closes its files (the pcap's last partial block included) and exits. It sets
//!   `Shared::finished` and signals the guard through `done` only after the files are closed, so
//!   a new writer may then open them. A retired writer logs its totals itself (at shutdown the
//!   owner of the guard does).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::pcap::PcapSink;
use super::queue::{CHUNKS_PER_QUEUE, Msg, Shared, Teed};
use super::record::{TapEvent, TapRecord};
use super::text::TextSink;
use super::throttle::Throttle;

/// Largest queue cost taken into one batch.
const MAX_BATCH_COST: usize = 1 << 20;
/// Most records taken into one batch.
const MAX_BATCH_RECORDS: usize = 4096;
/// Minimum time between two warnings of the same kind.
const WARN_INTERVAL: Duration = Duration::from_secs(5);
/// How long the writer lets records accumulate after a batch below `LINGER_BELOW`.
pub(crate) const LINGER: Duration = Duration::from_millis(5);
/// The steps of a linger, between which the writer looks at the queued cost.
const LINGER_SLICE: Duration = Duration::from_millis(1);
/// Batches of at least this queue cost (or of one chunk, in a queue of less than four times
/// this) are followed by no linger: the writer is busy (bulk data) and waiting would only let
/// the queue fill.
const LINGER_BELOW: usize = 64 * 1024;
/// The steps of a CPU-cap pause, between which the writer looks whether the tap is closing.
const PAUSE_SLICE: Duration = Duration::from_millis(10);
/// How often an idle writer looks at the drop counters.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Lets a warning through at most once per interval and counts the ones held back.
pub(crate) struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(number of warnings held back since the last one)` if a warning may be issued now.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A text log sink and the name used in messages about it.
pub(crate) struct NamedText {
    pub(crate) name: String,
    /// Standard output (`-`): no reader comes back once it has gone.
    pub(crate) stdout: bool,
    pub(crate) sink: TextSink,
}

/// Gives the calling thread the lowest time-sharing priority, nice 19 (see
/// [`WriterPriority::Low`]); lowering one's own priority needs no privilege, and on Linux it
/// applies to the one thread. A failure is logged and the thread keeps its priority.
///
/// [`WriterPriority::Low`]: super::WriterPriority::Low
pub(crate) fn set_low_priority() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: plain syscall on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        warn!(
            "tap: cannot lower the writer thread's priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// The name of the text log on standard output, in messages.
pub(crate) const STDOUT_NAME: &str = "stdout";

/// The writer thread's state.
pub(crate) struct Writer {
    pub(crate) rx: Receiver<Msg>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) text: Option<NamedText>,
    pub(crate) pcap: Option<PcapSink>,
    error_warnings: RateLimit,
    drop_warnings: RateLimit,
    /// Drops already reported: (records, bytes).
    reported_drops: (u64, u64),
    /// The CPU cap of a low-priority writer (none at normal priority or without PSI).
    pub(crate) throttle: Option<Throttle>,
}

impl Writer {
    pub(crate) fn new(
        rx: Receiver<Msg>,
        shared: Arc<Shared>,
        text: Option<NamedText>,
        pcap: Option<PcapSink>,
    ) -> Writer {
        let writer = Writer {
            rx,
            shared,
            text,
            pcap,
            error_warnings: RateLimit::new(WARN_INTERVAL),
            drop_warnings: RateLimit::new(WARN_INTERVAL),
            reported_drops: (0, 0),
            throttle: None,
        };
        let _ = writer.shared.label.set(writer.names());
        writer
    }

    /// The thread body. Returns after `Msg::Stop` or `Msg::Retire` once the queue is empty, or
    /// when every sender is gone; closes the sinks and sends on `done` right before returning.
    pub(crate) fn run(mut self, done: Sender<()>) {
        let mut batch: Vec<Entry> = Vec::new();
        let mut stopping = false;
        let mut retired = false;
        // The message that did not fit in the last batch.
        let mut carried: Option<Msg> = None;
        loop {
            let first = if let Some(msg) = carried.take() {
                msg
            } else if stopping {
                match self.rx.try_recv() {
                    Ok(msg) => msg,
                    Err(_) => break,
                }
            } else {
                match self.rx.recv_timeout(IDLE_TICK) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => {
                        self.report_drops(false);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut cost = 0usize;
            // Admitted payload of the batch (a teed record's bytes missing from its pipe
            // included), settled once the batch is written or dropped.
            let mut admitted = 0u64;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(record, c) => {
                        batch.push(Entry::Record(record));
                        admitted += batch.last().map_or(0, Entry::payload_len);
                        cost += c;
                    }
                    // The pcap sink alone reads teed bytes straight into its buffer; the text
                    // sink needs them as a record.
                    Msg::Teed(teed, c) if self.text.is_none() && self.pcap.is_some() => {
                        admitted += teed.len as u64;
                        batch.push(Entry::Teed(teed));
                        cost += c;
                    }
                    Msg::Teed(teed, c) => {
                        admitted += teed.len as u64;
                        let (record, missing) = teed.into_record();
                        if missing > 0 {
                            self.shared.count_missing(missing);
                        }
                        batch.push(Entry::Record(record));
                        cost += c;
                    }
                    Msg::Stop => stopping = true,
                    Msg::Retire => {
                        stopping = true;
                        retired = true;
                    }
                }
                if let Ok(msg) = self.rx.try_recv() {
                    if cost < MAX_BATCH_COST && batch.len() < MAX_BATCH_RECORDS {
                        next = Some(msg);
                    } else {
                        carried = Some(msg);
                    }
                }
            }
            if !batch.is_empty() {
                (self.shared.in_sink_since).store(super::queue::clock_ms(), Ordering::Relaxed);
                self.write(&batch, carried.is_some());
                self.shared.in_sink_since.store(0, Ordering::Relaxed);
                self.shared.settle(batch.len() as u64, admitted);
            }
            let linger = !stopping && carried.is_none() && cost < self.burst() && !batch.is_empty();
            batch.clear();
            self.shared.release(cost);
            self.report_drops(false);
            if linger {
                self.nap(LINGER, LINGER_SLICE, true);
            }
            if let Some(throttle) = self.throttle.as_mut().filter(|_| !stopping) {
                let pause = throttle.after_batch();
                if !pause.is_zero() {
                    self.nap(pause, PAUSE_SLICE, false);
                }
            }
        }
        self.report_drops(true);
        let names = self.names();
        // Closing a pcap file writes the partial block direct I/O held back.
        self.text = None;
        self.pcap = None;
        if retired {
            let s = self.shared.stats();
            info!(
                "tap {names}: no route uses it any more and its last connection has ended; \
                 closed with {} records ({} bytes) written, {} records ({} bytes) dropped, {} write errors",
                s.records_written,
                s.bytes_written,
                s.dropped_records,
                s.dropped_bytes,
                s.write_errors
            );
            self.shared.retired.store(true, Ordering::Release);
        }
        self.shared.finished.store(true, Ordering::Release);
        let _ = done.send(());
    }

    /// The sinks, for messages: `tap.log, cap.pcap`.
    fn names(&self) -> String {
        let text = self.text.as_ref().map(|t| t.name.clone());
        let pcap = self.pcap.as_ref().map(PcapSink::name);
        text.into_iter().chain(pcap).collect::<Vec<_>>().join(", ")
    }

    /// The queue cost that makes a burst: `LINGER_BELOW`, or in a smaller queue one chunk of
    /// bulk data (see `TapHandle::chunk_max`), which it holds only a few of.
    fn burst(&self) -> usize {
        LINGER_BELOW.min(self.shared.budget / CHUNKS_PER_QUEUE)
    }

    /// Sleeps `for_how_long` in steps of `slice`; wakes early when the tap closes, and when
    /// `burst` is set also once a burst has queued [`Writer::burst`] (the linger after a small
    /// batch; the CPU cap's pause lets the queue fill).
    fn nap(&self, for_how_long: Duration, slice: Duration, burst: bool) {
        let until = Instant::now() + for_how_long;
        loop {
            let now = Instant::now();
            if now >= until
                || (burst && self.shared.queued_cost.load(Ordering::Relaxed) >= self.burst())
                || self.shared.closed.load(Ordering::Relaxed)
            {
                return;
            }
            std::thread::sleep(slice.min(until - now));
        }
    }

    /// Writes one batch to every sink and updates the counters. `more_queued`: the next batch
    /// is already waiting.
    fn write(&mut self, batch: &[Entry], more_queued: bool) {
        if self.text.is_none() && self.pcap.is_none() {
            // Every output stopped (see `stop_if_reader_gone`).
            let payload = batch.iter().map(Entry::payload_len).sum();
            self.shared.count_drops(batch.len() as u64, payload);
            return;
        }
        let mut failures: Vec<(String, io::Error)> = Vec::new();
        if let Some(text) = &mut self.text
            && let Err(err) = text
                .sink
                .write_batch(batch.iter().filter_map(Entry::record))
        {
            failures.push((text.name.clone(), err));
        }
        let mut missing = 0;
        if let Some(pcap) = &mut self.pcap {
            let result = pcap.write_entries(batch, more_queued);
            for lost in pcap.take_missing() {
                self.shared.count_missing(lost);
                missing += lost as u64;
            }
            if let Err(err) = result {
                failures.push((pcap.name(), err));
            }
        }
        let failed = failures.len();
        failures.retain(|(name, err)| !self.stop_if_reader_gone(name, err));
        let payload: u64 = batch.iter().map(Entry::payload_len).sum::<u64>() - missing;
        if failed == 0 {
            self.shared
                .records_written
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            self.shared
                .bytes_written
                .fetch_add(payload, Ordering::Relaxed);
            return;
        }
        // Not in (every) output: dropped, so that written + dropped still add up to what was
        // tapped.
        self.shared.count_drops(batch.len() as u64, payload);
        self.shared
            .write_errors
            .fetch_add(failed as u64, Ordering::Relaxed);
        if failures.is_empty() {
            return;
        }
        if let Some(held_back) = self.error_warnings.allow(Instant::now()) {
            for (name, err) in failures {
                if held_back > 0 {
                    warn!(
                        "tap: cannot write to {name}: {err} ({held_back} similar warnings suppressed)"
                    );
                } else {
                    warn!("tap: cannot write to {name}: {err}");
                }
            }
        }
    }

    /// Standard output whose reader has gone (`| head`, a pager that quit) gets no new one,
    /// unlike a named FIFO: that output is closed, and the writer says so once. Proxying goes on.
    /// Whether `err` from output `name` was that.
    fn stop_if_reader_gone(&mut self, name: &str, err: &io::Error) -> bool {
        if err.kind() != io::ErrorKind::BrokenPipe {
            return false;
        }
        if self
            .text
            .as_ref()
            .is_some_and(|t| t.stdout && t.name == name)
        {
            self.text = None;
        } else if name == crate::config::PCAP_STDOUT && self.pcap.is_some() {
            self.pcap = None;
        } else {
            return false;
        }
        let left = if self.text.is_none() && self.pcap.is_none() {
            " (the tap has no output left: its records are counted as dropped)"
        } else {
            ""
        };
        warn!(
            "tap: {name} has no reader any more ({err}): nothing more is written to it{left}; proxying goes on"
        );
        true
    }

    /// Warns about drops since the last report (rate-limited unless `last`).
    fn report_drops(&mut self, last: bool) {
        let records = self.shared.dropped_records.load(Ordering::Relaxed);
        let bytes = self.shared.dropped_bytes.load(Ordering::Relaxed);
        let (seen_records, seen_bytes) = self.reported_drops;
        // With no output left (its reader gone), every record is dropped: said once already.
        let silent = self.text.is_none() && self.pcap.is_none() && !last;
        if records == seen_records || silent {
            return;
        }
        if !last && self.drop_warnings.allow(Instant::now()).is_none() {
            return;
        }
        // A low-priority writer drops bulk data by design; say how to trade that for throughput.
        let hint = if self.shared.copy_when_behind {
            ""
        } else {
            " (writer_priority = \"normal\" in [tap] captures more, at some cost in throughput)"
        };
        warn!(
            "tap dropped {} records ({} payload bytes) since the last report (the writer fell behind the traffic, or a write failed), {} records in total; the capture has gaps{hint}",
            records - seen_records,
            bytes - seen_bytes,
            records
        );
        self.reported_drops = (records, bytes);
    }
}

/// One item of a batch: a record, or data still in a tee pipe (only when the pcap is the sole
/// sink, which reads it out itself).
pub(crate) enum Entry {
    Record(TapRecord),
    Teed(Teed),
}

impl Entry {
    /// The record, unless the bytes are still in a pipe.
    pub(crate) fn record(&self) -> Option<&TapRecord> {
        match self {
            Entry::Record(record) => Some(record),
            Entry::Teed(_) => None,
        }
    }

    /// Payload bytes the entry carries (or names, in a pipe).
    fn payload_len(&self) -> u64 {
        match self {
            Entry::Record(TapRecord {
                event: TapEvent::Data { bytes, .. },
                ..
            }) => bytes.len() as u64,
            Entry::Record(_) => 0,
            Entry::Teed(teed) => teed.len as u64,
        }
    }
}

/// Opens `path` for writing without blocking the caller.
///
/// Returns `Ok(None)` for a FIFO that has no reader yet: opening it for writing would block, so
/// the writer thread opens it later with [`open_blocking`]. The returned file is in blocking mode.
pub(crate) fn open_output(path: &Path, append: bool) -> io::Result<Option<File>> {
    let file = open_if_read(path, append)?;
    if file.is_none() {
        warn!(
            "tap: {} is a FIFO with no reader yet: its records wait in the tap queue until \
             a reader opens it (once the queue is full, they are dropped and counted)",
            path.display()
        );
    }
    Ok(file)
}

/// Like [`open_output`], quietly: `None` for a FIFO that no reader has open.
pub(crate) fn open_if_read(path: &Path, append: bool) -> io::Result<Option<File>> {
    let mut options = options(append);
    options.custom_flags(libc::O_NONBLOCK);
    match options.open(path) {
        Ok(file) => {
            set_blocking(&file)?;
            Ok(Some(file))
        }
        // ENXIO: a FIFO without a reader (a socket file or a device without driver says the
        // same, and is an error).
        Err(err)
            if err.raw_os_error() == Some(libc::ENXIO)
                && std::fs::metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type())) =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Opens `path` for writing; may block (a FIFO waits for a reader). Only for the writer thread.
pub(crate) fn open_blocking(path: &Path, append: bool) -> io::Result<File> {
    options(append).open(path)
}

fn options(append: bool) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    if append {
        options.append(true);
    } else {
        options.truncate(true);
    }
    options
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid open descriptor owned by `file` for the duration of these calls;
    // F_GETFL/F_SETFL only read and change its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A log file, opened up front or (for a FIFO without reader) on the first write.
pub(crate) struct LogFile {
    path: PathBuf,
    file: Option<File>,
}

impl LogFile {
    pub(crate) fn new(path: PathBuf, file: Option<File>) -> LogFile {
        LogFile { path, file }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        match &mut self.file {
            Some(file) => Ok(file),
            none => Ok(none.insert(open_blocking(&self.path, true)?)),
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file()?.write(buf)
    }

    /// A batch that fails part-way (disk full, file size limit) is cut off the file again, so
    /// the next batch does not continue a torn line.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        crate::batch_file::write_whole(self.file()?, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Standard output, locked once per batch.
pub(crate) struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_suppressed() {
        let mut r = RateLimit::new(Duration::from_secs(5));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t + Duration::from_secs(2)), None);
        assert_eq!(r.allow(t + Duration::from_secs(6)), Some(2));
    }
}
