//! The process log (env_logger's filter and format) written to stderr by a thread of its own.
//!
//! env_logger writes each record to stderr in the calling thread, so a stderr that nobody reads
//! (a stalled log collector, a full pipe, a terminal on hold) would stop an event loop in
//! `write(2)` and every connection with it. Here env_logger formats into [`QueueWriter`], which
//! appends the line to a bounded queue and returns: a full queue drops the line and counts it
//! ([`dropped_total`], `tcptap_log_lines_dropped_total` in `/metrics`). The writer thread writes
//! whatever has gathered in one `write(2)`, and after a loss it adds a line saying how many lines
//! were dropped. At exit, [`flush`] gives the queue a bounded time to reach stderr.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Bytes of formatted lines the queue holds (about 1,500 connection lines) before it drops.
pub const QUEUE_BYTES: usize = 256 * 1024;

/// Lines dropped since start.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Whether the "N lines dropped" line is written: `RUST_LOG` lets WARN of `tcptap::logging` through.
static REPORT_DROPS: AtomicBool = AtomicBool::new(true);
static QUEUE: OnceLock<Queue> = OnceLock::new();

/// After writing a batch smaller than this, the writer lets lines gather for up to [`LINGER`]:
/// a line a millisecond then costs one `write(2)` every few milliseconds, and the threads that
/// log do not wake the writer (a futex call each) for every line.
const LINGER_BELOW: usize = 64 * 1024;
/// How long lines may wait for the next write (checked every [`LINGER_SLICE`]).
const LINGER: Duration = Duration::from_millis(5);
const LINGER_SLICE: Duration = Duration::from_millis(1);

#[derive(Debug, Default)]
struct Pending {
    /// Formatted lines, oldest first.
    bytes: Vec<u8>,
    /// Lines dropped since the writer last reported a loss.
    dropped: u64,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    /// The writer waits on `arrived` for lines: the next line must wake it.
    parked: bool,
    /// Threads in [`Queue::flush`], waiting on `written`.
    flushing: usize,
}

#[derive(Debug, Default)]
struct Queue {
    pending: Mutex<Pending>,
    /// Lines arrived for a parked writer.
    arrived: Condvar,
    /// A batch was written (for [`Queue::flush`]).
    written: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave `Pending` inconsistent: keep logging.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one formatted line, or drops it when it does not fit. Never blocks on output;
    /// wakes the writer only when it is parked.
    fn push(&self, line: &[u8]) {
        let mut p = self.lock();
        if p.bytes.len() + line.len() > QUEUE_BYTES {
            p.dropped += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
        } else {
            p.bytes.extend_from_slice(line);
        }
        let wake = std::mem::take(&mut p.parked);
        drop(p);
        if wake {
            self.arrived.notify_one();
        }
    }

    /// The writer thread: takes everything queued and writes it in one go, for ever.
    fn run(&self, out: &mut dyn Write) {
        let mut batch = Vec::new();
        loop {
            let dropped;
            {
                let mut p = self.lock();
                p.writing = false;
                if p.flushing > 0 {
                    self.written.notify_all();
                }
                while p.bytes.is_empty() && p.dropped == 0 {
                    p.parked = true;
                    p = self.arrived.wait(p).unwrap_or_else(|e| e.into_inner());
                }
                p.parked = false;
                std::mem::swap(&mut batch, &mut p.bytes);
                dropped = std::mem::take(&mut p.dropped);
                p.writing = true;
            }
            if dropped > 0 && REPORT_DROPS.load(Ordering::Relaxed) {
                dropped_line(&mut batch, dropped, SystemTime::now());
            }
            let lost = write_out(out, &batch);
            if lost > 0 {
                DROPPED.fetch_add(lost, Ordering::Relaxed);
            }
            let small = batch.len() < LINGER_BELOW;
            batch.clear();
            if batch.capacity() > QUEUE_BYTES {
                batch = Vec::new();
            }
            if small {
                self.linger();
            }
        }
    }

    /// Lets lines gather after a small batch, until [`LINGER`] passes, [`LINGER_BELOW`] bytes are
    /// queued, or someone flushes.
    fn linger(&self) {
        let until = Instant::now() + LINGER;
        while Instant::now() < until {
            std::thread::sleep(LINGER_SLICE);
            let p = self.lock();
            if p.bytes.len() >= LINGER_BELOW || p.flushing > 0 {
                return;
            }
        }
    }

    /// Waits until every queued line is written, or `timeout` passes. True if all were written.
    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock();
        p.flushing += 1;
        let done = loop {
            if p.bytes.is_empty() && p.dropped == 0 && !p.writing {
                break true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break false;
            };
            p = self
                .written
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        p.flushing -= 1;
        done
    }
}

/// Writes `batch`, waiting out `EAGAIN` (a stderr some other process made non-blocking). After
/// any other error (EPIPE, EBADF: stderr is gone) it gives up: returns the lines not written.
fn write_out(out: &mut dyn Write, mut batch: &[u8]) -> u64 {
    while !batch.is_empty() {
        match out.write(batch) {
            Ok(0) => break,
            Ok(n) => batch = &batch[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => break,
        }
    }
    let _ = out.flush();
    memchr::memchr_iter(b'\n', batch).count() as u64
}

/// Appends the line that reports `n` lost lines, in env_logger's default format.
fn dropped_line(out: &mut Vec<u8>, n: u64, now: SystemTime) {
    let time = crate::tap::outside_rfc3339(now, 0)
        .unwrap_or_else(|| humantime::format_rfc3339_seconds(now).to_string());
    let _ = writeln!(
        out,
        "[{time} WARN  tcptap::logging] {n} log line{} dropped: stderr was not read fast enough",
        if n == 1 { "" } else { "s" }
    );
}

/// What env_logger writes to: each record arrives in one `write`, which queues it.
#[derive(Debug)]
pub struct QueueWriter(&'static Queue);

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs the global logger: env_logger's filter (`RUST_LOG`, default `info`) and format,
/// writing through the queue to stderr, and a panic hook that lets queued lines out first.
/// Colors as env_logger chooses them for a terminal: `RUST_LOG_STYLE=always|never` decides;
/// Whether output to a stream is colored: when `CLICOLOR_FORCE` is set (not to `0`), or when
/// the stream is a terminal, `NO_COLOR` is unset (or empty) and `TERM` is not `dumb`. `env`
/// reads an environment variable.
pub fn wants_color(is_terminal: bool, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let set = |name| env(name).is_some_and(|v| !v.is_empty() && v != "0");
    set("CLICOLOR_FORCE")
        || (is_terminal
            && env("NO_COLOR").is_none_or(|v| v.is_empty())
            && env("TERM").is_none_or(|t| t != "dumb"))
}

/// otherwise colored when `CLICOLOR_FORCE` is set, or when stderr is a terminal, `NO_COLOR` is
/// unset and `TERM` is not `dumb`.
pub fn init() {
    let queue = QUEUE.get_or_init(Queue::default);
    let env = env_logger::Env::default().default_filter_or("info");
    let mut builder = env_logger::Builder::from_env(env);
    let style = std::env::var("RUST_LOG_STYLE").unwrap_or_default();
    if style != "always" && style != "never" {
        let color = wants_color(io::stderr().is_terminal(), |name| std::env::var_os(name));
        builder.write_style(if color {
            env_logger::WriteStyle::Always
        } else {
            env_logger::WriteStyle::Never
        });
    }
    builder.target(env_logger::Target::Pipe(Box::new(QueueWriter(queue))));
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || queue.run(&mut io::stderr()));
    if spawned.is_err() {
        // No thread, no queue: write in place, as env_logger does by default.
        builder.target(env_logger::Target::Stderr);
    }
    builder.init();
    REPORT_DROPS.store(
        log::log_enabled!(target: "tcptap::logging", log::Level::Warn),
        Ordering::Relaxed,
    );
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // The lines logged before a panic explain it: let them out first, briefly.
        flush(Duration::from_millis(200));
        report(info);
    }));
}

/// Waits up to `timeout` for queued lines to reach stderr (before exiting or printing an error
/// directly). Returns at once when nothing is queued or the logger was not installed here.
pub fn flush(timeout: Duration) -> bool {
    QUEUE.get().is_none_or(|q| q.flush(timeout))
}

/// Log lines dropped since start because stderr did not keep up.
pub fn dropped_total() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;

    #[test]
    fn color_follows_the_terminal_and_the_conventions() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert!(wants_color(true, env(&[])));
        assert!(!wants_color(false, env(&[])));
        assert!(!wants_color(true, env(&[("NO_COLOR", "1")])));
        assert!(wants_color(true, env(&[("NO_COLOR", "")])));
        assert!(!wants_color(true, env(&[("TERM", "dumb")])));
        assert!(wants_color(false, env(&[("CLICOLOR_FORCE", "1")])));
        assert!(!wants_color(false, env(&[("CLICOLOR_FORCE", "0")])));
        assert!(wants_color(
            true,
            env(&[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")])
        ));
    }

    /// A writer that blocks each write until the test lets it through.
    struct Gate {
        open: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.open.recv().map_err(|_| io::ErrorKind::BrokenPipe)?;
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_lines_then_reports_them() {
        let queue: &'static Queue = Box::leak(Box::default());
        let (open, gate) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut out = Gate {
            open: gate,
            got: got.clone(),
        };
        std::thread::spawn(move || queue.run(&mut out));
        let mut line = vec![b'x'; 63];
        line.push(b'\n');
        // The first line is taken by the writer, which then blocks; the queue fills behind it.
        QueueWriter(queue).write_all(&line).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !queue.lock().writing {
            assert!(
                Instant::now() < deadline,
                "the writer never took the first line"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            !queue.flush(Duration::from_millis(50)),
            "the output is blocked"
        );
        let start = Instant::now();
        let sent = QUEUE_BYTES / line.len() + 500;
        for _ in 0..sent {
            QueueWriter(queue).write_all(&line).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "queueing must not wait for the output"
        );
        let dropped = queue.lock().dropped;
        assert!(dropped >= 500, "{dropped} dropped");
        // Let everything through: the lines kept, then one line counting the others.
        for _ in 0..3 {
            open.send(()).unwrap();
        }
        assert!(queue.flush(Duration::from_secs(10)));
        let text = String::from_utf8(got.lock().unwrap().clone()).unwrap();
        let kept = text
            .lines()
            .filter(|l| l.bytes().all(|b| b == b'x'))
            .count() as u64;
        assert_eq!(
            kept + dropped,
            1 + sent as u64,
            "every line written or counted"
        );
        let report = text.lines().last().unwrap();
        assert!(
            report.ends_with(&format!(
                "WARN  tcptap::logging] {dropped} log lines dropped: stderr was not read fast \
                 enough"
            )),
            "{report}"
        );
        drop(open);
    }

    /// Counts the writes it is given.
    struct Counting(Arc<Mutex<(usize, usize)>>);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0 += 1;
            c.1 += buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn paced_lines_are_written_in_batches() {
        let queue: &'static Queue = Box::leak(Box::default());
        let counts = Arc::new(Mutex::new((0, 0)));
        let mut out = Counting(counts.clone());
        std::thread::spawn(move || queue.run(&mut out));
        let line = b"[2026-01-01T00:00:00Z INFO  tcptap::conn] #1 a connection line\n";
        let start = Instant::now();
        const LINES: usize = 300;
        for _ in 0..LINES {
            QueueWriter(queue).write_all(line).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(queue.flush(Duration::from_secs(10)));
        let elapsed = start.elapsed();
        let (writes, bytes) = *counts.lock().unwrap();
        assert_eq!(bytes, LINES * line.len(), "every line written");
        // One write per linger period at most (plus the first line, written at once). Without
        // the linger, a writer woken for each line makes about one write per line.
        let bound = (elapsed.as_micros() / LINGER.as_micros()) as usize + 2;
        assert!(
            writes <= bound,
            "{writes} writes for {LINES} lines in {elapsed:?} (at most {bound})"
        );
    }

    /// Refuses with `EAGAIN` `again` times, then takes 10 bytes a call; then fails with `EPIPE`
    /// once `limit` bytes are in.
    struct Flaky {
        again: usize,
        limit: usize,
        got: Vec<u8>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.again > 0 {
                self.again -= 1;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.got.len() >= self.limit {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            let n = buf.len().min(10);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn eagain_is_waited_out_and_a_gone_stderr_counts_what_it_lost() {
        let batch = b"one line\nanother line\na third one\n";
        let mut out = Flaky {
            again: 3,
            limit: usize::MAX,
            got: Vec::new(),
        };
        assert_eq!(write_out(&mut out, batch), 0);
        assert_eq!(out.got, batch);
        let mut out = Flaky {
            again: 0,
            limit: 10,
            got: Vec::new(),
        };
        // "one line\na": the first line is out; the second and third are lost.
        assert_eq!(write_out(&mut out, batch), 2);
    }
}
