//! The traffic tap: records handed off the data path to a writer thread.
//!
//! The event loop starts a writer per tap config through a [`TapSet`] (at startup and when a
//! reload brings a new tap), then feeds records through [`TapHandle`]s; at exit it calls
//! [`TapSet::shutdown`]. The writer thread renders records to a live text log ([`LogTarget`])
//! and/or a Wireshark-ready pcap file ([`PcapTarget`]).
//!
//! Invariants:
//! - The data path never stalls: [`TapHandle::data`] and [`TapHandle::event`] never block and
//!   never do I/O. The queue is bounded by cost (`queue_bytes`, plus a small reserve for control
//!   records); what does not fit is dropped and counted, and the writer reports drops with
//!   rate-limited warnings. Drops show up as "not captured" gaps in the log and as missing
//!   segments in the pcap.
//! - Bulk bytes reach the tap without a copy on the loop side: the loop tees its kernel pipe
//!   into a tee pipe of its worker ([`TapHandle::for_worker`], [`TapHandle::tee`]) and queues a
//!   record naming the pipe; the writer reads the bytes out (straight into the pcap's output
//!   buffer, between packet headers, when the pcap is the only sink). Each tee pipe is fed by
//!   one thread and read in queue order, so a record's bytes are at the head of its pipe when
//!   the writer takes it. Teed bytes are charged to the queue budget like copied ones.
//! - The writer runs at nice 19, and at most a quarter of a core while CPUs are contended, unless
//!   configured otherwise ([`WriterPriority`]).
//! - Snaplen is applied on the loop side: only the first `snaplen` bytes of each direction of each
//!   connection are ever queued.
//! - The writer thread is the only one doing tap I/O; a sink that blocks forever blocks only it,
//!   and [`TapGuard::shutdown`] gives up after its timeout.
//! - A writer runs while a [`TapHandle`] of it exists (routes in force that use it, connections
//!   that started tapping into it); after the last one is dropped it writes what is queued,
//!   closes its files and ends, and a later writer of the same file starts afresh, like at
//!   startup (see `set.rs`).
//! - Pcap rotation (see `rotate.rs`): the current file is always the configured path; older ones
//!   are `PATH.1` (newest) .. `PATH.<max_files - 1>` (oldest); each file is a standalone pcap.
//!
//! Layout: `queue.rs` (loop side), `writer.rs` (thread and outputs), `text.rs` (log format),
//! `pcap.rs` (packet synthesis), `rotate.rs` (pcap files), `record.rs` (the record types),
//! `set.rs` (the writers of a process).

mod direct;
mod pcap;
mod queue;
mod record;
mod rotate;
mod set;
mod text;
mod throttle;
mod tracked;

pub(crate) use tracked::track_at_least;
mod writer;

pub(crate) use text::outside_rfc3339;

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use log::warn;

use crate::flush::{self, Flushed};

pub use queue::{TEE_CHUNK_MAX, TapHandle, Wants};
pub use record::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapRecord};
pub use set::TapSet;

use pcap::PcapSink;
use queue::{Msg, Shared};
use text::TextSink;
use writer::{LogFile, NamedText, StdoutSink, Writer, open_output};

/// Where the text log goes. `-` on the command line means [`LogTarget::Stdout`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output; coloured when it is a terminal.
    Stdout,
    /// A file, appended to (a FIFO works too).
    File(PathBuf),
}

impl std::str::FromStr for LogTarget {
    type Err = std::convert::Infallible;

    /// `-` is stdout, anything else a file path (usable as a `clap` value parser).
    fn from_str(s: &str) -> Result<LogTarget, Self::Err> {
        Ok(match s {
            "-" => LogTarget::Stdout,
            path => LogTarget::File(PathBuf::from(path)),
        })
    }
}

/// Where the pcap goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcapTarget {
    /// The current capture file; rotated files get `.1`, `.2`, … appended.
    pub path: PathBuf,
    /// Start a new file before the current one would exceed this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Most files kept, the current one included (at least 1).
    pub max_files: u32,
    /// Write regular files with `O_DIRECT` (bulk blocks bypass the page cache); falls back to
    /// the page cache where refused.
    pub direct_io: bool,
}

/// Tap configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// Text log target, if any.
    pub log: Option<LogTarget>,
    /// Pcap target, if any.
    pub pcap: Option<PcapTarget>,
    /// Capture only the first N bytes of each direction of each connection.
    pub snaplen: Option<u64>,
    /// Queue budget: bytes of payload plus a fixed per-record overhead.
    pub queue_bytes: usize,
    /// CPU priority of the writer thread.
    pub writer_priority: WriterPriority,
}

impl TapConfig {
    /// Where this tap writes, for logs: `log to stdout, pcap to cap.pcap`.
    pub fn describe(&self) -> String {
        let log = self.log.as_ref().map(|l| match l {
            LogTarget::Stdout => "log to stdout".to_string(),
            LogTarget::File(p) => format!("log to {}", p.display()),
        });
        let pcap = (self.pcap.as_ref()).map(|p| format!("pcap to {}", p.path.display()));
        let parts: Vec<String> = log.into_iter().chain(pcap).collect();
        if parts.is_empty() {
            "no output".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// The files this tap writes (the text log unless it goes to stdout, and the pcap), each
    /// with the config key that names it.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        let log = match &self.log {
            Some(LogTarget::File(p)) => Some(("log", p.as_path())),
            _ => None,
        };
        log.into_iter()
            .chain(self.pcap.as_ref().map(|p| ("pcap", p.path.as_path())))
    }

    /// The first file this tap shares with `other`: `(key here, key there, path)`. Two writers
    /// on one file would truncate and interleave each other's output.
    pub fn shared_file<'a>(
        &'a self,
        other: &TapConfig,
    ) -> Option<(&'static str, &'static str, &'a Path)> {
        self.files().find_map(|(key, path)| {
            other
                .files()
                .find(|(_, p)| same_file(path, p))
                .map(|(other_key, _)| (key, other_key, path))
        })
    }
}

/// Whether two configured paths name the same file, which two writers would truncate and
/// interleave: compared with `.` components dropped and the parent directory resolved when it
/// exists (symlinks, `..`), so `cap.pcap`, `./cap.pcap` and `/abs/dir/cap.pcap` match. A
/// character device (`/dev/null`) takes any number of writers.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(a).is_ok_and(|m| m.file_type().is_char_device()) {
        return false;
    }
    fn norm(p: &Path) -> PathBuf {
        let lexical: PathBuf = p
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        let parent = match lexical.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match (std::fs::canonicalize(&parent), lexical.file_name()) {
            (Ok(dir), Some(name)) => dir.join(name),
            _ => lexical,
        }
    }
    a == b || norm(a) == norm(b)
}

/// How the tap writer thread competes for CPU with the event loops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriterPriority {
    /// The lowest time-sharing priority (nice 19), and while the kernel reports tasks waiting
    /// for CPU (PSI) at most a quarter of one core (see `throttle`): the writer gets little CPU
    /// while the event loops want it, and bulk bytes it has fallen behind on are dropped (and
    /// counted): the tap costs proxying as little as it can. (Not `SCHED_IDLE`: on a machine kept busy by other
    /// processes that would starve it completely, and an unprivileged process cannot undo it.)
    #[default]
    Low,
    /// The normal time-sharing class, and bulk bytes the writer has fallen behind on are copied
    /// into the queue while it has room: a fuller capture, at the cost of CPU the event loops
    /// could use.
    Normal,
}

/// Tap totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Records admitted into the queue.
    pub records_queued: u64,
    /// Payload bytes admitted into the queue.
    pub bytes_queued: u64,
    /// Records written to every sink without error.
    pub records_written: u64,
    /// Payload bytes of those records.
    pub bytes_written: u64,
    /// Records dropped because the queue was full (or the tap was shut down).
    pub dropped_records: u64,
    /// Payload bytes of the dropped records.
    pub dropped_bytes: u64,
    /// Failed batch writes (one per batch and sink).
    pub write_errors: u64,
}

impl std::ops::AddAssign for TapStats {
    fn add_assign(&mut self, other: TapStats) {
        self.records_queued += other.records_queued;
        self.bytes_queued += other.bytes_queued;
        self.records_written += other.records_written;
        self.bytes_written += other.bytes_written;
        self.dropped_records += other.dropped_records;
        self.dropped_bytes += other.dropped_bytes;
        self.write_errors += other.write_errors;
    }
}

/// Why the tap could not start.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The text log file could not be opened.
    #[error("cannot open tap log {}: {source}", path.display())]
    Log {
        /// The log path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The pcap file could not be opened or its header written.
    #[error("cannot open pcap file {}: {source}", path.display())]
    Pcap {
        /// The pcap path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The writer thread could not be spawned.
    #[error("cannot start the tap writer thread: {0}")]
    Spawn(#[source] io::Error),
    /// A writer that nothing uses any more has not finished writing a file that a new writer
    /// would open (its sink is blocked, or slow).
    #[error("the previous tap writer of {} has not finished with it yet (blocked sink?)", path.display())]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// The proxy is shutting down: no tap starts any more.
    #[error("the proxy is shutting down")]
    Closed,
}

/// Owns the writer thread; call [`TapGuard::shutdown`] at exit (dropping it shuts down with a
/// short timeout). The writer also finishes by itself once every [`TapHandle`] is gone.
#[derive(Debug)]
pub struct TapGuard {
    inner: Option<GuardInner>,
}

#[derive(Debug)]
struct GuardInner {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    done: Receiver<()>,
    /// `done` was received (or the writer is gone): the thread has ended or is about to.
    finished: bool,
    thread: JoinHandle<()>,
}

/// Timeout used when a guard is dropped without [`TapGuard::shutdown`].
const DROP_TIMEOUT: Duration = Duration::from_secs(2);

impl TapGuard {
    /// Stops accepting records, lets the writer drain what is queued and flush, and joins it;
    /// gives up after `timeout` (the writer is then left behind, blocked in its sink).
    /// Returns the final totals.
    pub fn shutdown(mut self, timeout: Duration) -> TapStats {
        match self.inner.take() {
            Some(inner) => inner.shutdown(timeout, None),
            None => TapStats::default(),
        }
    }

    /// [`TapGuard::shutdown`], also given up on, records abandoned, as soon as `interrupted`
    /// says so (it is asked every 50 ms); a writer that takes more than a second is announced.
    pub fn shutdown_unless(
        mut self,
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> TapStats {
        match self.inner.take() {
            Some(inner) => inner.shutdown(timeout, Some(interrupted)),
            None => TapStats::default(),
        }
    }

    /// Tells the writer to stop once it has written what is queued, without waiting for it:
    /// several writers then drain at once, within one shutdown wait. Records offered after this
    /// are refused. [`TapGuard::shutdown`] does it too.
    pub fn request_stop(&self) {
        if let Some(inner) = &self.inner {
            inner.request_stop();
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> TapStats {
        self.inner
            .as_ref()
            .map_or_else(TapStats::default, |inner| inner.shared.stats())
    }

    /// Whether the writer finished because every handle was gone, and logged its totals.
    pub fn retired(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.shared.retired.load(Ordering::Acquire))
    }

    /// Whether the writer thread has ended (or is returning), without waiting.
    fn finished(&mut self) -> bool {
        let Some(inner) = self.inner.as_mut() else {
            return true;
        };
        if !inner.finished {
            inner.finished = match inner.done.try_recv() {
                Ok(()) | Err(mpsc::TryRecvError::Disconnected) => true,
                Err(mpsc::TryRecvError::Empty) => false,
            };
        }
        inner.finished
    }
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.shutdown(DROP_TIMEOUT, None);
        }
    }
}

impl GuardInner {
    /// Tells the writer to stop (once).
    fn request_stop(&self) {
        if !self.shared.closed.swap(true, Ordering::AcqRel) {
            let _ = self.tx.send(Msg::Stop);
        }
    }

    /// With `interrupted`, a wait of more than a second is announced (with how to cut it short).
    fn shutdown(self, timeout: Duration, interrupted: Option<&dyn Fn() -> bool>) -> TapStats {
        self.request_stop();
        let label = || self.shared.label.get().map_or("?", String::as_str);
        let done = if self.finished {
            Flushed::Done
        } else {
            flush::wait(
                &self.done,
                timeout,
                interrupted.unwrap_or(&|| false),
                &mut |left| {
                    if interrupted.is_none() {
                        return;
                    }
                    let (records, bytes) = self.shared.unsettled();
                    warn!(
                        "tap {}: waiting up to {:.0?} for its writer to write {records} \
                         queued records ({bytes} payload bytes); interrupt again (Ctrl-C) to \
                         drop them and stop now",
                        label(),
                        left
                    );
                },
            )
        };
        match done {
            Flushed::Done => {
                if self.thread.join().is_err() {
                    warn!("tap writer thread panicked");
                }
            }
            Flushed::Panicked => {
                // The thread ended without signalling: it panicked, leaving what was queued
                // unwritten.
                let _ = self.thread.join();
                let (records, bytes) = self.shared.abandon();
                warn!(
                    "tap {}: the writer thread panicked; {records} queued records ({bytes} \
                     payload bytes) abandoned, counted as dropped",
                    label()
                );
            }
            Flushed::TimedOut => {
                let (records, bytes) = self.shared.abandon();
                warn!(
                    "tap {}: the writer did not finish within the shutdown wait (blocked \
                     sink?); {records} queued records ({bytes} payload bytes) abandoned, \
                     counted as dropped",
                    label()
                );
            }
            Flushed::Interrupted => {
                let (records, bytes) = self.shared.abandon();
                warn!(
                    "tap {}: interrupted; {records} queued records ({bytes} payload bytes) \
                     abandoned, counted as dropped",
                    label()
                );
            }
        }
        self.shared.stats()
    }
}

/// Opens the configured files (errors name the path) and spawns the writer thread.
pub fn start(cfg: &TapConfig) -> Result<(TapHandle, TapGuard), TapError> {
    let text = match &cfg.log {
        None => None,
        Some(LogTarget::Stdout) => Some(NamedText {
            name: writer::STDOUT_NAME.to_owned(),
            stdout: true,
            sink: TextSink::new(
                Box::new(StdoutSink),
                crate::logging::wants_color(io::stdout().is_terminal(), |name| {
                    std::env::var_os(name)
                }),
                cfg.snaplen,
            ),
        }),
        Some(LogTarget::File(path)) => {
            let file = open_output(path, true).map_err(|source| TapError::Log {
                path: path.clone(),
                source,
            })?;
            Some(NamedText {
                name: path.display().to_string(),
                stdout: false,
                sink: TextSink::new(
                    Box::new(LogFile::new(path.clone(), file)),
                    false,
                    cfg.snaplen,
                )
                .opening_line(SystemTime::now()),
            })
        }
    };
    let pcap = match &cfg.pcap {
        None => None,
        Some(target) => Some(PcapSink::open(target).map_err(|source| TapError::Pcap {
            path: target.path.clone(),
            source,
        })?),
    };
    spawn(cfg, text, pcap)
}

/// Spawns the writer thread over already opened sinks.
fn spawn(
    cfg: &TapConfig,
    text: Option<NamedText>,
    pcap: Option<PcapSink>,
) -> Result<(TapHandle, TapGuard), TapError> {
    spawn_throttled(cfg, text, pcap, throttle::Throttle::for_this_thread)
}

/// [`spawn`], with the low-priority writer's throttle made by `throttle` on the writer thread.
fn spawn_throttled(
    cfg: &TapConfig,
    text: Option<NamedText>,
    pcap: Option<PcapSink>,
    throttle: fn() -> Option<throttle::Throttle>,
) -> Result<(TapHandle, TapGuard), TapError> {
    let shared = Arc::new(Shared::new(
        cfg.queue_bytes,
        cfg.writer_priority == WriterPriority::Normal,
    ));
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let writer = Writer::new(rx, Arc::clone(&shared), text, pcap);
    let priority = cfg.writer_priority;
    let thread = std::thread::Builder::new()
        .name("tap-writer".to_owned())
        .spawn(move || {
            let mut writer = writer;
            if priority == WriterPriority::Low {
                writer::set_low_priority();
                writer.throttle = throttle();
            }
            writer.run(done_tx)
        })
        .map_err(TapError::Spawn)?;
    let handle = TapHandle::new(Arc::clone(&shared), tx.clone(), cfg.snaplen);
    let guard = TapGuard {
        inner: Some(GuardInner {
            tx,
            shared,
            done: done_rx,
            finished: false,
            thread,
        }),
    };
    Ok((handle, guard))
}

/// Helpers shared by the tap's unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::{ConnMeta, TapEvent, TapRecord};

    /// A directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let path = std::env::temp_dir().join(format!(
                "tcptap-{tag}-{}-{nanos}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn conn(id: u64, down: &str, up: &str) -> Arc<ConnMeta> {
        Arc::new(ConnMeta {
            id,
            route: Arc::from("test"),
            downstream: down.parse().expect("downstream address"),
            upstream: up.parse().expect("upstream address"),
        })
    }

    /// A record at a fixed time plus `micros`.
    pub(crate) fn record(conn: &Arc<ConnMeta>, micros: u64, event: TapEvent) -> TapRecord {
        TapRecord {
            time: UNIX_EPOCH + Duration::from_micros(1_714_564_800_000_000 + micros),
            conn: Arc::clone(conn),
            event,
        }
    }

    /// Deterministic pseudo-random bytes.
    pub(crate) fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{TempDir, conn};
    use super::*;
    use std::ffi::CString;
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    /// A writer that died (panicked) with records queued: they count as dropped, as they do
    /// when a stuck writer is given up on, so queued = written + dropped still holds.
    #[test]
    fn records_a_panicked_writer_left_count_as_dropped() {
        let shared = Arc::new(Shared::new(1 << 20, false));
        shared.records_queued.store(5, Ordering::Relaxed);
        shared.bytes_queued.store(300, Ordering::Relaxed);
        let (tx, _rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _done = done_tx;
            panic!("a writer bug (expected by this test)");
        });
        let inner = GuardInner {
            tx,
            shared: Arc::clone(&shared),
            done,
            finished: false,
            thread,
        };
        let stats = inner.shutdown(Duration::from_secs(5), None);
        assert_eq!((stats.dropped_records, stats.dropped_bytes), (5, 300));
    }

    fn config(queue_bytes: usize) -> TapConfig {
        TapConfig {
            log: None,
            pcap: None,
            snaplen: None,
            queue_bytes,
            writer_priority: WriterPriority::default(),
        }
    }

    /// A sink whose writes block until the test drops the other end of `gate`.
    struct BlockingWriter {
        gate: Receiver<()>,
    }

    impl Write for BlockingWriter {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            let _ = self.gate.recv();
            Err(io::Error::other("unblocked"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn blocked_sink_never_stalls_the_data_path() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let text = NamedText {
            name: "blocking".to_owned(),
            stdout: false,
            sink: TextSink::new(Box::new(BlockingWriter { gate: gate_rx }), false, None),
        };
        let budget = 4096;
        let (tap, guard) = spawn(&config(budget), Some(text), None).expect("spawn");
        let c = conn(1, "10.0.0.1:1000", "10.0.0.2:2000");
        let payload = [b'a'; 100];

        let calls = 100_000u64;
        let started = Instant::now();
        let mut admitted = 0u64;
        for i in 0..calls {
            if tap.data(&c, Direction::DownToUp, i * 100, &payload) {
                admitted += 1;
            }
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(3),
            "{calls} calls took {elapsed:?}"
        );
        let per_record = (payload.len() + queue::RECORD_OVERHEAD) as u64;
        assert!(
            admitted <= budget as u64 / per_record + 1,
            "admitted {admitted}"
        );
        let stats = tap.stats();
        assert_eq!(stats.dropped_records, calls - admitted);
        assert_eq!(stats.dropped_bytes, (calls - admitted) * 100);
        assert_eq!(stats.records_queued, admitted);

        // Control records still get through, within the reserve, then are dropped too.
        assert!(tap.event(&c, TapEvent::Open));
        let mut control = 1;
        while tap.event(&c, TapEvent::Open) {
            control += 1;
            // The reserve, plus what the data records left unused of the budget.
            let limit = (queue::CONTROL_RESERVE + per_record as usize) / queue::RECORD_OVERHEAD;
            assert!(control <= limit, "{control} control records admitted");
        }
        assert!(tap.queued_cost() <= budget + queue::CONTROL_RESERVE);

        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let stats = guard.shutdown(timeout);
        assert!(started.elapsed() < timeout + Duration::from_secs(2));
        assert_eq!(stats.records_written, 0);
        assert!(stats.dropped_records > calls - admitted);
        // After shutdown nothing is admitted.
        assert!(!tap.data(&c, Direction::DownToUp, 0, b"late"));
        drop(gate_tx); // lets the abandoned writer finish
    }

    /// A sink that counts its write calls and the bytes written.
    struct CountingWriter {
        writes: Arc<AtomicU64>,
        bytes: Arc<AtomicU64>,
    }

    impl Write for CountingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_records_are_written_in_batches() {
        // Request/response traffic: small records a little apart. The writer must not wake up
        // and write once per record; it lingers so that each write carries a batch.
        let writes = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let sink = CountingWriter {
            writes: Arc::clone(&writes),
            bytes: Arc::clone(&bytes),
        };
        let text = NamedText {
            name: "counting".to_owned(),
            stdout: false,
            sink: TextSink::new(Box::new(sink), false, None),
        };
        // At normal priority, and with the sender sleeping between records, the writer gets a
        // CPU even on a single core: without the linger it would write once per record.
        let cfg = TapConfig {
            writer_priority: WriterPriority::Normal,
            ..config(1 << 20)
        };
        let (tap, guard) = spawn(&cfg, Some(text), None).expect("spawn");
        let c = conn(1, "10.0.0.1:1000", "10.0.0.2:2000");
        let records = 300u64;
        let started = Instant::now();
        for i in 0..records {
            std::thread::sleep(Duration::from_micros(100));
            assert!(tap.data(&c, Direction::DownToUp, i * 64, &[b'x'; 64]));
        }
        let stats = guard.shutdown(Duration::from_secs(5));
        let elapsed = started.elapsed();
        assert_eq!(stats.records_written, records);
        assert!(bytes.load(Ordering::Relaxed) > records * 64);
        // Every batch is followed by a whole linger, except the one the shutdown cuts short, so
        // batches cannot outnumber the lingers that fit in the run plus that one and the last,
        // whatever the scheduling; one write per record would.
        let most = elapsed.as_micros() / writer::LINGER.as_micros() + 2;
        let made = u128::from(writes.load(Ordering::Relaxed));
        assert!(
            made <= most,
            "{made} writes for {records} records in {elapsed:?} (at most {most})"
        );
    }

    /// The CPU time the tap's writer thread has used so far.
    fn writer_cpu(guard: &TapGuard) -> Duration {
        use std::os::unix::thread::JoinHandleExt;
        let thread = guard.inner.as_ref().expect("running").thread.as_pthread_t();
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive (joined only at shutdown); `clock` is a valid out pointer.
        assert_eq!(
            unsafe { libc::pthread_getcpuclockid(thread, &mut clock) },
            0
        );
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and out pointer.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn a_contended_cpu_keeps_the_low_priority_writer_to_a_quarter_core() {
        // A pressure source saying that tasks waited for a CPU all the time.
        fn always_contended() -> Option<u64> {
            static TOTAL: AtomicU64 = AtomicU64::new(0);
            Some(TOTAL.fetch_add(10_000_000, Ordering::Relaxed))
        }
        fn contended() -> Option<throttle::Throttle> {
            throttle::Throttle::with_source(always_contended)
        }
        let sink = CountingWriter {
            writes: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
        };
        let text = NamedText {
            name: "counting".to_owned(),
            stdout: false,
            sink: TextSink::new(Box::new(sink), false, None),
        };
        // A small queue keeps batches small (a few records), so the batch under way when the
        // measurement ends is a small part of it.
        let cfg = config(256 << 10);
        let (tap, guard) = spawn_throttled(&cfg, Some(text), None, contended).expect("spawn");
        let c = conn(3, "10.0.0.1:1000", "10.0.0.2:2000");
        // Binary records (a hexdump each): as much work as the writer is willing to do.
        let chunk: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
        let mut offset = 0u64;
        let mut feed = |until: Instant| {
            while Instant::now() < until {
                if !tap.data(&c, Direction::DownToUp, offset, &chunk) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                offset += chunk.len() as u64;
            }
        };
        // The first pressure reading comes after one window; measure from the second on.
        feed(Instant::now() + 3 * throttle::WINDOW);
        let before = writer_cpu(&guard);
        let started = Instant::now();
        feed(started + Duration::from_millis(1500));
        let used = writer_cpu(&guard) - before;
        let wall = started.elapsed();
        let stats = guard.shutdown(Duration::from_secs(30));
        assert!(stats.records_written > 0, "{stats:?}");
        let share = used.as_secs_f64() / wall.as_secs_f64();
        // A quarter of a core, plus what was owed or under way at either end (a batch, a window).
        let most = 0.25 + 0.1 / wall.as_secs_f64();
        assert!(
            share <= most,
            "the writer used {:.0}% of a core ({used:?} in {wall:?}; at most {:.0}%)",
            share * 100.0,
            most * 100.0,
        );
    }

    #[test]
    fn fifo_without_reader_blocks_only_the_writer() {
        let dir = TempDir::new("fifo");
        let fifo = dir.path().join("log.fifo");
        let name = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `name` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let mut cfg = config(1 << 20);
        cfg.log = Some(LogTarget::File(fifo.clone()));
        let started = Instant::now();
        let (tap, guard) = start(&cfg).expect("start does not block on a FIFO");
        let c = conn(2, "10.0.0.1:1000", "10.0.0.2:2000");
        assert!(tap.event(&c, TapEvent::Open));
        assert!(tap.data(&c, Direction::DownToUp, 0, b"hello"));
        let stats = guard.shutdown(Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(stats.records_written, 0);
        // What the abandoned writer held counts as dropped: written + dropped = admitted.
        assert_eq!(
            (stats.dropped_records, stats.dropped_bytes),
            (2, 5),
            "{stats:?}"
        );
        assert_eq!(stats.records_queued, 2);
        // Give the writer its reader so the thread can finish.
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open fifo for reading");
        std::thread::sleep(Duration::from_millis(100));
        drop(reader);
    }

    #[test]
    fn dev_full_only_counts_errors() {
        let mut cfg = config(1 << 20);
        cfg.log = Some(LogTarget::File(PathBuf::from("/dev/full")));
        cfg.pcap = Some(PcapTarget {
            path: PathBuf::from("/dev/full"),
            rotate_bytes: Some(1000),
            max_files: 3,
            direct_io: true,
        });
        let (tap, guard) = start(&cfg).expect("start");
        let c = conn(3, "10.0.0.1:1000", "10.0.0.2:2000");
        assert!(tap.event(&c, TapEvent::Open));
        for i in 0..10 {
            assert!(tap.data(&c, Direction::UpToDown, i * 4, b"data"));
            std::thread::sleep(Duration::from_millis(2));
        }
        let stats = guard.shutdown(Duration::from_secs(5));
        assert!(stats.write_errors >= 2, "{stats:?}");
        assert_eq!(stats.records_written, 0);
        assert_eq!(stats.records_queued, 11);
        assert_eq!(stats.dropped_records, 11, "{stats:?}");
    }

    #[test]
    fn log_target_from_cli() {
        assert_eq!("-".parse::<LogTarget>(), Ok(LogTarget::Stdout));
        assert_eq!(
            "tap.log".parse::<LogTarget>(),
            Ok(LogTarget::File(PathBuf::from("tap.log")))
        );
    }

    #[test]
    fn start_names_the_path_it_cannot_open() {
        let mut cfg = config(1 << 20);
        cfg.pcap = Some(PcapTarget {
            path: PathBuf::from("/nonexistent-dir/cap.pcap"),
            rotate_bytes: None,
            max_files: 1,
            direct_io: true,
        });
        let err = start(&cfg).expect_err("no such directory");
        assert!(
            err.to_string().contains("/nonexistent-dir/cap.pcap"),
            "{err}"
        );
        cfg.pcap = None;
        cfg.log = Some(LogTarget::File(PathBuf::from("/nonexistent-dir/log")));
        let err = start(&cfg).expect_err("no such directory");
        assert!(err.to_string().contains("/nonexistent-dir/log"), "{err}");
    }

    #[test]
    fn end_to_end_with_snaplen() {
        let dir = TempDir::new("e2e");
        let log = dir.path().join("tap.log");
        let pcap = dir.path().join("cap.pcap");
        let cfg = TapConfig {
            log: Some(LogTarget::File(log.clone())),
            pcap: Some(PcapTarget {
                path: pcap.clone(),
                rotate_bytes: None,
                max_files: 1,
                direct_io: true,
            }),
            snaplen: Some(10),
            queue_bytes: 1 << 20,
            writer_priority: WriterPriority::default(),
        };
        let (tap, guard) = start(&cfg).expect("start");
        let c = conn(4, "10.0.0.1:1000", "10.0.0.2:2000");
        assert!(tap.event(&c, TapEvent::Open));
        assert!(tap.data(&c, Direction::DownToUp, 0, b"0123456789abcdefghij"));
        // Entirely beyond snaplen: accepted, nothing queued.
        assert!(tap.data(&c, Direction::DownToUp, 20, b"klmno"));
        // The Data variant of `event` is clipped the same way.
        assert!(tap.event(
            &c,
            TapEvent::Data {
                dir: Direction::UpToDown,
                offset: 0,
                bytes: b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b".to_vec(),
            }
        ));
        assert!(tap.event(
            &c,
            TapEvent::Fin {
                dir: Direction::DownToUp,
                offset: 25
            }
        ));
        assert!(tap.event(
            &c,
            TapEvent::Fin {
                dir: Direction::UpToDown,
                offset: 12
            }
        ));
        assert!(tap.event(
            &c,
            TapEvent::Close {
                kind: CloseKind::Normal,
                offsets: [25, 12],
                dropped_records: 0,
                dropped_bytes: 0,
            }
        ));
        let stats = guard.shutdown(Duration::from_secs(5));
        assert_eq!(
            stats,
            TapStats {
                records_queued: 6,
                bytes_queued: 20,
                records_written: 6,
                bytes_written: 20,
                dropped_records: 0,
                dropped_bytes: 0,
                write_errors: 0,
            }
        );
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(!text.contains('\x1b'), "no colour in files");
        assert!(text.contains("#4 10.0.0.1:1000 -> 10.0.0.2:2000 open (route test)"));
        assert!(text.contains("client -> upstream 10 bytes\n  > 0123456789\n"));
        assert!(text.contains("upstream -> client 10 bytes\n  < 00000000  00 01 02"));
        assert!(text.contains("client -> upstream [... 15 bytes not captured (snaplen) ...]"));
        assert!(text.contains("upstream -> client [... 2 bytes not captured (snaplen) ...]"));
        assert!(text.contains("FIN from client after 25 bytes"));
        assert!(text.contains("FIN from upstream after 12 bytes"));
        assert!(text.contains("close: closed, client -> upstream 25 bytes"));
        let capture = std::fs::read(&pcap).expect("pcap");
        assert_eq!(&capture[..4], &0xa1b2_c3d4u32.to_le_bytes());
        // Handshake, two data segments, two FINs, final ACK.
        let mut reader = pcap_file::pcap::PcapReader::new(&capture[..]).expect("pcap");
        let mut packets = 0;
        while let Some(p) = reader.next_packet() {
            p.expect("packet");
            packets += 1;
        }
        assert_eq!(packets, 8);
    }
}
