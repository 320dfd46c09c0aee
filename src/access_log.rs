//! The access log: one structured line per finished connection (JSON or logfmt text), written by a
//! dedicated thread, off the data path.
//!
//! Invariants:
//! - [`AccessLogHandle::log`] and [`AccessLogHandle::reopen`] never block: they `try_send` into a
//!   bounded queue. An entry that does not fit is dropped and counted; the writer reports the gap
//!   in the log itself (`{"dropped":N}` or `# dropped N entries`) once it catches up, so a reader
//!   of the file knows lines are missing.
//! - The writer blocks for the first message, drains more without blocking up to a batch limit,
//!   and writes the batch with one `write_all` (one `write(2)` for a regular file). Entries logged
//!   before a `reopen()` go to the old file, entries after it to the new one (the reopen is a
//!   message in the same queue; a flag covers the case where the queue was full).
//! - Write errors (disk full, file removed...) are counted and logged at most once per
//!   [`WARN_INTERVAL`]; the batch is lost, the writer keeps going. It never panics on I/O.
//! - [`AccessLogGuard::shutdown`] writes what is queued and joins the writer, but waits no longer
//!   than its timeout (a writer stuck on a hung disk is left behind).

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use serde::Serialize;

use crate::flush::{self, Flushed};
use crate::metrics::CloseCause;
use crate::pair::CloseReason;
use crate::pipe::PipeState;
use crate::tap::{Direction, Side};

/// Entries that may wait for the writer; more are dropped and counted.
pub const DEFAULT_QUEUE: usize = 4096;
/// Most entries written in one batch.
const MAX_BATCH: usize = 512;
/// A batch is written once it holds this many bytes.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Write errors are logged at most once per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One logfmt line (`key=value ...`) per entry.
    Text,
}

impl Format {
    /// `"json"` or `"text"`, as written in the config.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "json" => Some(Format::Json),
            "text" => Some(Format::Text),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Json => "json",
            Format::Text => "text",
        })
    }
}

/// How one direction of a connection ended, as written in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirEnd {
    /// The client sent FIN and it was passed on (only for client → upstream).
    FinFromClient,
    /// The upstream sent FIN and it was passed on (only for upstream → client).
    FinFromUpstream,
    /// Cut by a reset from the client.
    ResetByClient,
    /// Cut by a reset from the upstream.
    ResetByUpstream,
    /// Cut by an I/O error.
    Error,
    /// Cut by the idle timeout.
    Timeout,
    /// Never carried bytes: the upstream connect failed.
    ConnectFailed,
    /// Never carried bytes: the upstream connect timed out.
    ConnectTimeout,
    /// Cut at the end of the shutdown drain.
    Shutdown,
    /// Refused before an upstream was chosen.
    Refused,
    /// The client's PROXY protocol header was malformed or missing.
    ProxyHeader,
    /// Had not ended when the entry was made.
    Open,
}

impl DirEnd {
    /// The logged value, e.g. `fin_from_client`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirEnd::FinFromClient => "fin_from_client",
            DirEnd::FinFromUpstream => "fin_from_upstream",
            DirEnd::ResetByClient => "reset_by_client",
            DirEnd::ResetByUpstream => "reset_by_upstream",
            DirEnd::Error => "error",
            DirEnd::Timeout => "timeout",
            DirEnd::ConnectFailed => "connect_failed",
            DirEnd::ConnectTimeout => "connect_timeout",
            DirEnd::Shutdown => "shutdown",
            DirEnd::Refused => "refused",
            DirEnd::ProxyHeader => "proxy_header_error",
            DirEnd::Open => "open",
        }
    }

    /// How direction `dir` ended, given its pipe state when the pair closed for `reason`: a
    /// direction whose FIN was passed on (`WRITE-SHUT`) ended with that FIN; any other was cut by
    /// the reason the pair closed.
    pub fn of(dir: Direction, state: PipeState, reason: &CloseReason) -> DirEnd {
        let fin = |side: Side| match side {
            Side::Downstream => DirEnd::FinFromClient,
            Side::Upstream => DirEnd::FinFromUpstream,
        };
        if state == PipeState::WriteShut {
            return fin(dir.source());
        }
        match reason {
            // Both directions are WRITE-SHUT for a finished pair; kept total for safety.
            CloseReason::Finished { .. } => fin(dir.source()),
            CloseReason::Reset(Side::Downstream) => DirEnd::ResetByClient,
            CloseReason::Reset(Side::Upstream) => DirEnd::ResetByUpstream,
            CloseReason::Error(..) => DirEnd::Error,
            CloseReason::IdleTimeout => DirEnd::Timeout,
            CloseReason::ConnectFailed(_) => DirEnd::ConnectFailed,
            CloseReason::ConnectTimeout => DirEnd::ConnectTimeout,
            CloseReason::Shutdown | CloseReason::Stopped => DirEnd::Shutdown,
            CloseReason::Refused(_) => DirEnd::Refused,
            CloseReason::BadProxyHeader(_) | CloseReason::ProxyHeaderTimeout => DirEnd::ProxyHeader,
        }
    }
}

impl fmt::Display for DirEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything logged about one finished connection. Built by the event loop when a pair closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSummary {
    /// Connection id (`#42` in logs).
    pub id: u64,
    /// When the connection was accepted (wall clock).
    pub start: SystemTime,
    /// How long it lived.
    pub duration: Duration,
    /// Route name.
    pub route: Arc<str>,
    /// Downstream (client) address.
    pub client: SocketAddr,
    /// Upstream address used (or tried last).
    pub upstream: SocketAddr,
    /// Bytes read from the client (client → upstream).
    pub bytes_d2u: u64,
    /// Bytes read from the upstream (upstream → client).
    pub bytes_u2d: u64,
    /// Of `bytes_d2u`, the bytes the upstream received (see [`Pair::delivered`]); the rest were
    /// lost when the connection was cut.
    ///
    /// [`Pair::delivered`]: crate::pair::Pair::delivered
    pub delivered_d2u: u64,
    /// Of `bytes_u2d`, the bytes the client received.
    pub delivered_u2d: u64,
    /// Why the connection ended.
    pub end: CloseCause,
    /// How client → upstream ended.
    pub d2u_end: DirEnd,
    /// How upstream → client ended.
    pub u2d_end: DirEnd,
    /// Tap records of this connection dropped on a full tap queue.
    pub tap_dropped_records: u64,
    /// Payload bytes of those records.
    pub tap_dropped_bytes: u64,
}

/// Totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessLogStats {
    /// Lines written.
    pub written: u64,
    /// Entries dropped: the queue was full, the writer had stopped, or a failed write lost them.
    pub dropped: u64,
    /// Failed writes (each loses one batch).
    pub write_errors: u64,
}

/// State shared by the handles, the guard and the writer.
#[derive(Debug, Default)]
struct Shared {
    /// A reopen was asked for (set even when the queue is full).
    reopen: AtomicBool,
    /// The guard asked the writer to finish.
    stop: AtomicBool,
    /// Drops not yet reported in the log.
    unreported_drops: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

impl Shared {
    fn stats(&self) -> AccessLogStats {
        AccessLogStats {
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
enum Msg {
    Entry(ConnSummary),
    Reopen,
    Stop,
}

/// The event loop's side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct AccessLogHandle {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

impl AccessLogHandle {
    /// Queues one entry. False when it was dropped (queue full or writer gone); the drop is counted.
    pub fn log(&self, summary: &ConnSummary) -> bool {
        match self.tx.try_send(Msg::Entry(summary.clone())) {
            Ok(()) => true,
            Err(_) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.unreported_drops.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Asks the writer to close and reopen the file at the configured path (call on SIGUSR1, after
    /// logrotate renamed the file).
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Relaxed);
        // When the queue is full the flag alone does it, after the current batch.
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Totals so far (for `/metrics`).
    pub fn stats(&self) -> AccessLogStats {
        self.shared.stats()
    }
}

/// Owns the writer thread. Call [`shutdown`](AccessLogGuard::shutdown) before exiting, or queued
/// lines are lost; dropping the guard only tells the writer to stop.
#[derive(Debug)]
pub struct AccessLogGuard {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl AccessLogGuard {
    /// Writes every queued entry, then joins the writer; gives up waiting after `timeout`.
    pub fn shutdown(self, timeout: Duration) -> AccessLogStats {
        self.shutdown_unless(timeout, &|| false)
    }

    /// [`AccessLogGuard::shutdown`], also given up on as soon as `interrupted` says so (see
    /// [`crate::flush::wait`]).
    pub fn shutdown_unless(
        mut self,
        timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> AccessLogStats {
        self.request_stop();
        let slow = &mut |left: Duration| {
            warn!(
                "access log: waiting up to {left:.0?} for its writer to write the queued lines; \
                 interrupt again (Ctrl-C) to drop them and stop now"
            )
        };
        match flush::wait(&self.done, timeout, interrupted, slow) {
            // Panicked: the writer ended without saying so; join reports that.
            Flushed::Done | Flushed::Panicked => {
                if let Some(t) = self.thread.take() {
                    if t.join().is_err() {
                        warn!("access log: the writer thread panicked");
                    }
                }
            }
            Flushed::TimedOut => {
                warn!(
                    "access log: the writer did not finish within the shutdown wait; queued lines \
                     may be lost"
                );
                self.thread.take();
            }
            Flushed::Interrupted => {
                warn!("access log: interrupted; queued lines may be lost");
                self.thread.take();
            }
        }
        self.shared.stats()
    }

    /// Tells the writer to stop once it has written what is queued, without waiting for it (so
    /// that it drains while other writers are waited for). [`AccessLogGuard::shutdown`] does it
    /// too.
    pub fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // When the queue is full the writer sees the flag after its current batch.
        let _ = self.tx.try_send(Msg::Stop);
    }
}

impl Drop for AccessLogGuard {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
        }
    }
}

/// Where batches go.
trait Sink: Send + 'static {
    /// Writes one batch completely.
    fn write_batch(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Closes and reopens the output.
    fn reopen(&mut self) -> io::Result<()>;
}

struct FileSink {
    path: PathBuf,
    file: File,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl Sink for FileSink {
    /// A batch that fails part-way (disk full, file size limit) is cut off a regular file again,
    /// so that the next line does not continue a torn one.
    fn write_batch(&mut self, bytes: &[u8]) -> io::Result<()> {
        crate::batch_file::write_whole(&mut self.file, bytes)
    }

    fn reopen(&mut self) -> io::Result<()> {
        // Open the new file first: on failure the old one stays in use.
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

/// Access log entry point.
#[derive(Debug)]
pub struct AccessLog;

impl AccessLog {
    /// Opens (creates, appends to) `path` and starts the writer thread with a queue of
    /// [`DEFAULT_QUEUE`] entries.
    pub fn start(
        path: &Path,
        format: Format,
    ) -> Result<(AccessLogHandle, AccessLogGuard), io::Error> {
        AccessLog::start_with_queue(path, format, DEFAULT_QUEUE)
    }

    /// Like [`start`](AccessLog::start) with a queue of `queue` entries (at least 1).
    pub fn start_with_queue(
        path: &Path,
        format: Format,
        queue: usize,
    ) -> Result<(AccessLogHandle, AccessLogGuard), io::Error> {
        let file = open_append(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("access log {}: cannot open: {e}", path.display()),
            )
        })?;
        let sink = FileSink {
            path: path.to_path_buf(),
            file,
        };
        let started = start_sink(sink, format, queue).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "access log {}: cannot start the writer: {e}",
                    path.display()
                ),
            )
        })?;
        info!("access log: writing {format} lines to {}", path.display());
        Ok(started)
    }
}

fn start_sink(
    sink: impl Sink,
    format: Format,
    queue: usize,
) -> io::Result<(AccessLogHandle, AccessLogGuard)> {
    let (tx, rx) = mpsc::sync_channel(queue.max(1));
    let (done_tx, done) = mpsc::sync_channel(1);
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("tcptap-access-log".into())
            .spawn(move || {
                let drain_limit = queue.max(1) + 16;
                Writer {
                    sink,
                    format,
                    shared,
                    batch: Vec::with_capacity(MAX_BATCH_BYTES + 1024),
                    entries: 0,
                    reported: 0,
                    last_warned: None,
                }
                .run(&rx, drain_limit);
                let _ = done_tx.send(());
            })?
    };
    Ok((
        AccessLogHandle {
            tx: tx.clone(),
            shared: shared.clone(),
        },
        AccessLogGuard {
            tx,
            shared,
            done,
            thread: Some(thread),
        },
    ))
}

struct Writer<S> {
    sink: S,
    format: Format,
    shared: Arc<Shared>,
    /// Formatted lines not yet written.
    batch: Vec<u8>,
    /// Entries in `batch` (drop reports not included).
    entries: u64,
    /// Drops that the report in `batch` tells of: reported again if the batch is lost.
    reported: u64,
    last_warned: Option<Instant>,
}

impl<S: Sink> Writer<S> {
    fn run(mut self, rx: &Receiver<Msg>, drain_limit: usize) {
        // Ends when every sender is gone or a stop was asked for.
        while let Ok(first) = rx.recv() {
            let mut stop = false;
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(msg) = next.take() {
                stop |= self.handle(msg);
                taken += 1;
                if taken < MAX_BATCH && self.batch.len() < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.report_drops();
            self.flush();
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.reopen();
            }
            if stop || self.shared.stop.load(Ordering::SeqCst) {
                // Write what is still queued, but no more than a queue's worth: a loop that keeps
                // logging must not keep the writer alive.
                for _ in 0..drain_limit {
                    match rx.try_recv() {
                        Ok(msg) => {
                            self.handle(msg);
                            if self.batch.len() >= MAX_BATCH_BYTES {
                                self.flush();
                            }
                        }
                        Err(_) => break,
                    }
                }
                self.report_drops();
                self.flush();
                break;
            }
        }
        debug!("access log: writer stopped");
    }

    /// Returns true for a stop request.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Entry(s) => {
                format_entry(&s, self.format, &mut self.batch);
                self.entries += 1;
            }
            Msg::Reopen => {
                // Lines queued before the reopen belong to the old file.
                self.flush();
                self.shared.reopen.store(false, Ordering::Relaxed);
                self.reopen();
            }
            Msg::Stop => return true,
        }
        false
    }

    fn report_drops(&mut self) {
        let n = self.shared.unreported_drops.swap(0, Ordering::Relaxed);
        if n > 0 {
            format_drops(n, self.format, &mut self.batch);
            self.reported += n;
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        match self.sink.write_batch(&self.batch) {
            Ok(()) => {
                self.shared
                    .written
                    .fetch_add(self.entries, Ordering::Relaxed);
            }
            Err(e) => {
                // The lines lost are drops like any other, and reported in the file with the
                // ones this batch's report told of, once a write goes through.
                let errors = self.shared.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
                (self.shared.dropped).fetch_add(self.entries, Ordering::Relaxed);
                (self.shared.unreported_drops)
                    .fetch_add(self.entries + self.reported, Ordering::Relaxed);
                if self.should_warn() {
                    warn!(
                        "access log: write failed, {} lines lost, counted as dropped ({errors} \
                         write errors so far): {e}",
                        self.entries
                    );
                }
            }
        }
        self.batch.clear();
        self.entries = 0;
        self.reported = 0;
    }

    fn reopen(&mut self) {
        match self.sink.reopen() {
            Ok(()) => info!("access log: reopened"),
            Err(e) => warn!("access log: cannot reopen, still writing to the old file: {e}"),
        }
    }

    /// True at most once per [`WARN_INTERVAL`].
    fn should_warn(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last_warned
            .is_none_or(|t| now.duration_since(t) >= WARN_INTERVAL);
        if due {
            self.last_warned = Some(now);
        }
        due
    }
}

/// The JSON shape of one entry; field order is the order written. Fields added later go last, as
/// in the text format, so that the fields before them keep their places.
#[derive(Serialize)]
struct JsonLine<'a> {
    start: String,
    duration_ms: f64,
    id: u64,
    route: &'a str,
    client: SocketAddr,
    upstream: SocketAddr,
    bytes_d2u: u64,
    bytes_u2d: u64,
    end: &'static str,
    d2u_end: &'static str,
    u2d_end: &'static str,
    tap_dropped_records: u64,
    tap_dropped_bytes: u64,
    delivered_d2u: u64,
    delivered_u2d: u64,
}

fn duration_ms(d: Duration) -> f64 {
    // Microsecond resolution is plenty; rounding keeps the text short.
    (d.as_micros() as f64) / 1000.0
}

/// Appends one line (with its `\n`) for `s` to `out`.
fn format_entry(s: &ConnSummary, format: Format, out: &mut Vec<u8>) {
    let start = crate::tap::outside_rfc3339(s.start, 3)
        .unwrap_or_else(|| humantime::format_rfc3339_millis(s.start).to_string());
    match format {
        Format::Json => {
            let line = JsonLine {
                start,
                duration_ms: duration_ms(s.duration),
                id: s.id,
                route: &s.route,
                client: s.client,
                upstream: s.upstream,
                bytes_d2u: s.bytes_d2u,
                bytes_u2d: s.bytes_u2d,
                end: s.end.as_str(),
                d2u_end: s.d2u_end.as_str(),
                u2d_end: s.u2d_end.as_str(),
                tap_dropped_records: s.tap_dropped_records,
                tap_dropped_bytes: s.tap_dropped_bytes,
                delivered_d2u: s.delivered_d2u,
                delivered_u2d: s.delivered_u2d,
            };
            let mark = out.len();
            if serde_json::to_writer(&mut *out, &line).is_err() {
                // Cannot happen for this shape (no maps with non-string keys); never leave half a line.
                out.truncate(mark);
                return;
            }
            out.push(b'\n');
        }
        Format::Text => {
            let mut line = String::with_capacity(256);
            let _ = write!(
                line,
                "start={start} duration_ms={} id={} route=",
                duration_ms(s.duration),
                s.id
            );
            logfmt_value(&s.route, &mut line);
            let _ = writeln!(
                line,
                " client={} upstream={} bytes_d2u={} bytes_u2d={} end={} d2u_end={} u2d_end={} \
                 tap_dropped_records={} tap_dropped_bytes={} delivered_d2u={} delivered_u2d={}",
                s.client,
                s.upstream,
                s.bytes_d2u,
                s.bytes_u2d,
                s.end,
                s.d2u_end,
                s.u2d_end,
                s.tap_dropped_records,
                s.tap_dropped_bytes,
                s.delivered_d2u,
                s.delivered_u2d
            );
            out.extend_from_slice(line.as_bytes());
        }
    }
}

/// Appends the line that reports `n` dropped entries.
fn format_drops(n: u64, format: Format, out: &mut Vec<u8>) {
    let line = match format {
        Format::Json => format!("{{\"dropped\":{n}}}\n"),
        Format::Text => format!("# dropped {n} entries\n"),
    };
    out.extend_from_slice(line.as_bytes());
}

/// A logfmt value: bare when it is a plain token, else quoted with `\"`, `\\` and control escapes.
fn logfmt_value(v: &str, out: &mut String) {
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A fresh path in the temp dir, removed (with its rotated sibling) on drop.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(name: &str) -> TempPath {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            TempPath(std::env::temp_dir().join(format!(
                "tcptap-access-{}-{n}-{name}.log",
                std::process::id()
            )))
        }

        fn rotated(&self) -> PathBuf {
            self.0.with_extension("log.1")
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_file(self.rotated());
        }
    }

    fn summary(id: u64) -> ConnSummary {
        ConnSummary {
            id,
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            duration: Duration::from_micros(1_234_567),
            route: Arc::from("web front"),
            client: "127.0.0.1:40000".parse().unwrap(),
            upstream: "[::1]:8080".parse().unwrap(),
            bytes_d2u: 100,
            bytes_u2d: 2000,
            delivered_d2u: 100,
            delivered_u2d: 2000,
            end: CloseCause::ClientClosedFirst,
            d2u_end: DirEnd::FinFromClient,
            u2d_end: DirEnd::FinFromUpstream,
            tap_dropped_records: 1,
            tap_dropped_bytes: 512,
        }
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .expect("read log")
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn test_json_lines_have_every_field() {
        let path = TempPath::new("json");
        let (log, guard) = AccessLog::start(&path.0, Format::Json).expect("start");
        assert!(log.log(&summary(1)));
        let mut second = summary(2);
        second.route = Arc::from("we\"ird\nroute");
        second.end = CloseCause::ResetByUpstream;
        second.u2d_end = DirEnd::ResetByUpstream;
        second.delivered_u2d = 1500;
        assert!(log.log(&second));
        let stats = guard.shutdown(TIMEOUT);
        assert_eq!(
            stats,
            AccessLogStats {
                written: 2,
                dropped: 0,
                write_errors: 0
            }
        );
        let lines = read_lines(&path.0);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON line");
        assert_eq!(
            v,
            serde_json::json!({
                "start": "2023-11-14T22:13:20.123Z", "duration_ms": 1234.567, "id": 1,
                "route": "web front", "client": "127.0.0.1:40000", "upstream": "[::1]:8080",
                "bytes_d2u": 100, "bytes_u2d": 2000, "end": "client_closed_first",
                "d2u_end": "fin_from_client", "u2d_end": "fin_from_upstream",
                "tap_dropped_records": 1, "tap_dropped_bytes": 512,
                "delivered_d2u": 100, "delivered_u2d": 2000
            })
        );
        let v: serde_json::Value = serde_json::from_str(&lines[1]).expect("JSON line");
        assert_eq!(v["route"], "we\"ird\nroute");
        assert_eq!(v["end"], "reset_by_upstream");
        assert_eq!(v["u2d_end"], "reset_by_upstream");
        assert_eq!(v["bytes_u2d"], 2000);
        assert_eq!(v["delivered_u2d"], 1500);
    }

    #[test]
    fn test_clock_outside_rfc3339_years_is_logged_as_epoch_seconds() {
        // humantime panics on these; the writer thread must keep logging.
        for (start, text) in [
            (
                SystemTime::UNIX_EPOCH - Duration::from_micros(86_400_000_500),
                "@-86400.000",
            ),
            (
                SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_800_250),
                "@253402300800.250",
            ),
        ] {
            let mut entry = summary(7);
            entry.start = start;
            let mut json = Vec::new();
            format_entry(&entry, Format::Json, &mut json);
            let v: serde_json::Value = serde_json::from_slice(&json).expect("JSON line");
            assert_eq!(v["start"], text);
            let mut line = Vec::new();
            format_entry(&entry, Format::Text, &mut line);
            let line = String::from_utf8(line).expect("UTF-8");
            assert!(line.starts_with(&format!("start={text} ")), "{line}");
        }
    }

    #[test]
    fn test_text_lines_are_logfmt() {
        let path = TempPath::new("text");
        let (log, guard) = AccessLog::start(&path.0, Format::Text).expect("start");
        assert!(log.log(&summary(7)));
        let mut plain = summary(8);
        plain.route = Arc::from("api");
        plain.end = CloseCause::IdleTimeout;
        plain.u2d_end = DirEnd::Timeout;
        plain.delivered_u2d = 1024;
        assert!(log.log(&plain));
        guard.shutdown(TIMEOUT);
        let lines = read_lines(&path.0);
        assert_eq!(
            lines,
            [
                "start=2023-11-14T22:13:20.123Z duration_ms=1234.567 id=7 route=\"web front\" \
                 client=127.0.0.1:40000 upstream=[::1]:8080 bytes_d2u=100 bytes_u2d=2000 \
                 end=client_closed_first d2u_end=fin_from_client u2d_end=fin_from_upstream \
                 tap_dropped_records=1 tap_dropped_bytes=512 delivered_d2u=100 delivered_u2d=2000",
                "start=2023-11-14T22:13:20.123Z duration_ms=1234.567 id=8 route=api \
                 client=127.0.0.1:40000 upstream=[::1]:8080 bytes_d2u=100 bytes_u2d=2000 \
                 end=idle_timeout d2u_end=fin_from_client u2d_end=timeout \
                 tap_dropped_records=1 tap_dropped_bytes=512 delivered_d2u=100 delivered_u2d=1024",
            ]
        );
    }

    #[test]
    fn test_logfmt_value_quoting() {
        let q = |v: &str| {
            let mut s = String::new();
            logfmt_value(v, &mut s);
            s
        };
        assert_eq!(q("web-1"), "web-1");
        assert_eq!(q(""), "\"\"");
        assert_eq!(q("a=b"), "\"a=b\"");
        assert_eq!(q("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u{0001}\"");
    }

    #[test]
    fn test_reopen_after_rename_writes_to_new_file() {
        let path = TempPath::new("rotate");
        let (log, guard) = AccessLog::start(&path.0, Format::Json).expect("start");
        assert!(log.log(&summary(1)));
        // logrotate: rename, then signal. Entry 1 was queued before the reopen, so it lands in
        // the renamed file whether or not it was written before the rename.
        std::fs::rename(&path.0, path.rotated()).expect("rename");
        log.reopen();
        assert!(log.log(&summary(2)));
        let stats = guard.shutdown(TIMEOUT);
        assert_eq!(stats.written, 2);
        let old = read_lines(&path.rotated());
        let new = read_lines(&path.0);
        assert_eq!(old.len(), 1, "{old:?}");
        assert!(old[0].contains("\"id\":1"), "{old:?}");
        assert_eq!(new.len(), 1, "{new:?}");
        assert!(new[0].contains("\"id\":2"), "{new:?}");
    }

    /// A sink whose writes block until the test lets them through, and that says when a write
    /// starts.
    struct GatedSink {
        started: mpsc::Sender<()>,
        gate: Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Sink for GatedSink {
        fn write_batch(&mut self, bytes: &[u8]) -> io::Result<()> {
            let _ = self.started.send(());
            // Blocks until a token arrives or the test drops the gate's sender.
            let _ = self.gate.recv();
            self.out
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(())
        }

        fn reopen(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink whose first `fail` writes fail, and that says when a write was tried.
    struct FailingSink {
        fail: usize,
        tried: mpsc::Sender<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }

    impl Sink for FailingSink {
        fn write_batch(&mut self, bytes: &[u8]) -> io::Result<()> {
            let failed = self.fail > 0;
            self.fail = self.fail.saturating_sub(1);
            if !failed {
                (self.out.lock().unwrap()).extend_from_slice(bytes);
            }
            let _ = self.tried.send(());
            if failed {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }

        fn reopen(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Lines a failed write lost are drops: counted, and told of in the file by the next batch
    /// that goes through, along with the drops the lost batch itself told of.
    #[test]
    fn test_lines_a_failed_write_lost_count_as_dropped_and_are_reported() {
        let (tried_tx, tried) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = FailingSink {
            fail: 2,
            tried: tried_tx,
            out: out.clone(),
        };
        let (log, guard) = start_sink(sink, Format::Json, 16).expect("start");
        // Entry 1 is lost with the first batch; a drop then rides in the second, lost too.
        assert!(log.log(&summary(1)));
        tried.recv_timeout(TIMEOUT).expect("first write");
        log.shared.dropped.fetch_add(1, Ordering::Relaxed);
        log.shared.unreported_drops.fetch_add(1, Ordering::Relaxed);
        assert!(log.log(&summary(2)));
        tried.recv_timeout(TIMEOUT).expect("second write");
        assert!(log.log(&summary(3)));
        tried.recv_timeout(TIMEOUT).expect("third write");
        let stats = guard.shutdown(TIMEOUT);
        assert_eq!(
            (stats.written, stats.dropped, stats.write_errors),
            (1, 3, 2),
            "{stats:?}"
        );
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"id\":3"), "{text}");
        assert_eq!(lines[1], "{\"dropped\":3}", "{text}");
    }

    /// A writer over a [`GatedSink`] and the test's ends of it.
    struct Gated {
        log: AccessLogHandle,
        guard: AccessLogGuard,
        /// One message per write started.
        started: Receiver<()>,
        /// One token lets one write through; dropping it lets all through.
        gate: mpsc::Sender<()>,
        /// What was written.
        out: Arc<Mutex<Vec<u8>>>,
    }

    fn gated(queue: usize) -> Gated {
        let (started_tx, started) = mpsc::channel();
        let (gate, gate_rx) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = GatedSink {
            started: started_tx,
            gate: gate_rx,
            out: out.clone(),
        };
        let (log, guard) = start_sink(sink, Format::Json, queue).expect("start");
        Gated {
            log,
            guard,
            started,
            gate,
            out,
        }
    }

    #[test]
    fn test_full_queue_drops_counts_and_reports() {
        let Gated {
            log,
            guard,
            started,
            gate,
            out,
        } = gated(1);
        assert!(log.log(&summary(1)));
        // The writer is now blocked inside the write of the batch holding entry 1.
        started
            .recv_timeout(TIMEOUT)
            .expect("writer started a write");
        assert!(log.log(&summary(2)), "one slot in the queue");
        let attempts = 50;
        let refused = (0..attempts).filter(|i| !log.log(&summary(3 + i))).count() as u64;
        assert_eq!(refused, attempts);
        assert_eq!(log.stats().dropped, attempts);
        drop(gate); // let every write through
        let stats = guard.shutdown(TIMEOUT);
        assert_eq!(
            stats,
            AccessLogStats {
                written: 2,
                dropped: attempts,
                write_errors: 0
            }
        );
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        let ids: Vec<u64> = lines.iter().filter_map(|v| v["id"].as_u64()).collect();
        assert_eq!(ids, [1, 2]);
        let reported: u64 = lines.iter().filter_map(|v| v["dropped"].as_u64()).sum();
        assert_eq!(reported, attempts, "{text}");
    }

    #[test]
    fn test_shutdown_gives_up_after_timeout() {
        let Gated {
            log,
            guard,
            started,
            gate,
            ..
        } = gated(4);
        assert!(log.log(&summary(1)));
        started
            .recv_timeout(TIMEOUT)
            .expect("writer started a write");
        let t = Instant::now();
        let stats = guard.shutdown(Duration::from_millis(100));
        assert!(t.elapsed() < TIMEOUT);
        assert_eq!(stats.written, 0);
        drop(gate); // the left-behind writer finishes and exits on its own
    }

    #[test]
    fn test_dev_full_counts_errors_without_panicking() {
        let path = Path::new("/dev/full");
        if !path.exists() {
            return;
        }
        let (log, guard) = AccessLog::start(path, Format::Text).expect("open /dev/full");
        for i in 0..3 {
            log.log(&summary(i));
        }
        log.reopen();
        log.log(&summary(9));
        let stats = guard.shutdown(TIMEOUT);
        assert_eq!(stats.written, 0);
        assert!(stats.write_errors >= 1, "{stats:?}");
        assert!(!log.log(&summary(10)), "writer gone: dropped");
    }

    #[test]
    fn test_open_error_names_the_path() {
        let e = AccessLog::start(Path::new("/nonexistent-dir/x/access.log"), Format::Json)
            .expect_err("cannot open");
        assert!(
            e.to_string().contains("/nonexistent-dir/x/access.log"),
            "{e}"
        );
    }

    #[test]
    fn test_dir_end_of_reason() {
        let reset = CloseReason::Reset(Side::Upstream);
        assert_eq!(
            DirEnd::of(Direction::DownToUp, PipeState::WriteShut, &reset),
            DirEnd::FinFromClient
        );
        assert_eq!(
            DirEnd::of(Direction::UpToDown, PipeState::Open, &reset),
            DirEnd::ResetByUpstream
        );
        assert_eq!(
            DirEnd::of(
                Direction::UpToDown,
                PipeState::ReadClosed,
                &CloseReason::IdleTimeout
            ),
            DirEnd::Timeout
        );
        assert_eq!(
            DirEnd::of(
                Direction::DownToUp,
                PipeState::Open,
                &CloseReason::ConnectTimeout
            ),
            DirEnd::ConnectTimeout
        );
        assert_eq!(Format::from_name("json"), Some(Format::Json));
        assert_eq!(Format::from_name("JSON"), None);
    }
}
