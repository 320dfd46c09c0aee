//! The tap writers of a process: found by config, started, and joined once they stop.
//!
//! Invariants:
//! - A writer runs while a [`TapHandle`] of it exists: the routes in force that use it and the
//!   connections that started tapping into it each hold one. When the last is dropped the writer
//!   writes what is queued, closes its files and ends by itself (see `writer.rs`). The set only
//!   holds a weak reference, so it never keeps a writer alive.
//! - Two writers never write one file: a writer is started on a file only once any writer that
//!   wrote it before has finished (closed it). A writer still in use on a file is found with
//!   [`TapSet::find_on_file`] and shared instead.
//! - Totals never go down: a stopped writer's counters stay in [`TapSet::stats`], first through
//!   its entry, then (after [`TapSet::reap`]) in the totals of stopped writers.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::queue::{Feed, Shared};
use super::{TapConfig, TapError, TapGuard, TapHandle, TapStats};

/// How often [`TapSet::start`] looks whether a finishing writer is done.
const FINISH_POLL: Duration = Duration::from_millis(1);

/// The tap writers of a process, shared by whoever starts taps (startup, reloads), the admin
/// endpoint (their totals) and the exit (their shutdown).
#[derive(Debug, Default)]
pub struct TapSet {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    writers: Vec<Entry>,
    /// Totals of the writers that stopped and were joined.
    stopped: TapStats,
    /// Set by [`TapSet::shutdown`]: no writer starts any more.
    closed: bool,
}

#[derive(Debug)]
struct Entry {
    config: TapConfig,
    /// The handles' shared part; dead once no handle is left.
    feed: Weak<Feed>,
    shared: Arc<Shared>,
    /// Taken at shutdown.
    guard: Option<TapGuard>,
}

impl Entry {
    fn handle(&self) -> Option<TapHandle> {
        self.feed.upgrade().map(TapHandle::from_feed)
    }
}

impl TapSet {
    /// An empty set.
    pub fn new() -> TapSet {
        TapSet::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A handle of the writer started for exactly `cfg`, while something still uses it.
    pub fn find(&self, cfg: &TapConfig) -> Option<TapHandle> {
        self.lock()
            .writers
            .iter()
            .filter(|e| e.config == *cfg)
            .find_map(Entry::handle)
    }

    /// A writer still in use that writes one of `cfg`'s files (with other settings): the key of
    /// `cfg` that names the file, its path, and a handle of that writer.
    pub fn find_on_file(&self, cfg: &TapConfig) -> Option<(&'static str, PathBuf, TapHandle)> {
        self.lock().writers.iter().find_map(|e| {
            let (key, _, path) = cfg.shared_file(&e.config)?;
            Some((key, path.to_path_buf(), e.handle()?))
        })
    }

    /// Opens `cfg`'s files and starts a writer for it, exactly as at startup (see
    /// [`super::start`]). A writer that wrote one of these files before and is still finishing
    /// (it has no users any more, and is writing what was queued, or is blocked in its sink) is
    /// waited for, up to `wait`; [`TapError::Busy`] if it has not finished by then. Call
    /// [`TapSet::find_on_file`] first: a writer in use does not finish.
    pub fn start(&self, cfg: &TapConfig, wait: Duration) -> Result<TapHandle, TapError> {
        self.wait_free(cfg, Instant::now() + wait)?;
        let (handle, guard) = super::start(cfg)?;
        let mut inner = self.lock();
        if inner.closed {
            // The exit began while the files were opened: nobody else would stop this writer.
            drop(inner);
            guard.shutdown(Duration::from_secs(1));
            return Err(TapError::Closed);
        }
        inner.writers.push(Entry {
            config: cfg.clone(),
            feed: Arc::downgrade(handle.feed()),
            shared: Arc::clone(&handle.feed().shared),
            guard: Some(guard),
        });
        Ok(handle)
    }

    /// Waits until no writer that is finishing (see [`TapSet::start`]) still writes one of
    /// `cfg`'s files, until `deadline`; [`TapError::Busy`] then. Opens nothing: a reload asks
    /// this of every tap it will start before it starts any, so that a writer still stuck
    /// rejects it before another tap has truncated its pcap.
    pub fn wait_free(&self, cfg: &TapConfig, deadline: Instant) -> Result<(), TapError> {
        loop {
            let inner = self.lock();
            if inner.closed {
                return Err(TapError::Closed);
            }
            let busy = inner.writers.iter().find_map(|e| {
                let (_, _, path) = cfg.shared_file(&e.config)?;
                (!e.shared.finished.load(Ordering::Acquire)).then(|| path.to_path_buf())
            });
            drop(inner);
            match busy {
                None => return Ok(()),
                Some(path) if Instant::now() >= deadline => return Err(TapError::Busy { path }),
                Some(_) => std::thread::sleep(FINISH_POLL),
            }
        }
    }

    /// Joins the writers that ended because nothing used them any more; their totals stay.
    pub fn reap(&self) {
        let mut inner = self.lock();
        let mut i = 0;
        while i < inner.writers.len() {
            let e = &mut inner.writers[i];
            let ended =
                e.feed.strong_count() == 0 && e.guard.as_mut().is_some_and(|g| g.finished());
            if !ended {
                i += 1;
                continue;
            }
            let e = inner.writers.remove(i);
            if let Some(guard) = e.guard {
                guard.shutdown(Duration::ZERO);
            }
            inner.stopped += e.shared.stats();
        }
    }

    /// Totals over every writer the process has had, stopped ones included.
    pub fn stats(&self) -> TapStats {
        let inner = self.lock();
        let mut total = inner.stopped;
        for e in &inner.writers {
            total += e.shared.stats();
        }
        total
    }

    /// Stops every writer (see [`TapGuard::shutdown`]) and returns the final totals of each one
    /// that had not reported its end already (a writer that ended because nothing used it any
    /// more logged its totals then). All are told to stop first, so they drain at once, and
    /// waited for until `deadline`, all together: blocked writers hold the exit that long, not
    /// that long each. No writer starts after this ([`TapError::Closed`]). `interrupted` cuts
    /// the waits short (see [`TapGuard::shutdown_unless`]).
    pub fn shutdown(
        &self,
        deadline: Instant,
        interrupted: &dyn Fn() -> bool,
    ) -> Vec<(TapConfig, TapStats)> {
        let mut inner = self.lock();
        inner.closed = true;
        let guards: Vec<(TapGuard, Arc<Shared>, TapConfig)> = (inner.writers.iter_mut())
            .filter_map(|e| Some((e.guard.take()?, Arc::clone(&e.shared), e.config.clone())))
            .collect();
        drop(inner);
        for (guard, _, _) in &guards {
            guard.request_stop();
        }
        // Outside the lock: the writers may take until `deadline`, and the totals stay
        // readable meanwhile.
        guards
            .into_iter()
            .filter_map(|(guard, shared, config)| {
                let left = deadline.saturating_duration_since(Instant::now());
                let stats = guard.shutdown_unless(left, interrupted);
                (!shared.retired.load(Ordering::Acquire)).then_some((config, stats))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::fs::OpenOptions;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    use super::*;
    use crate::tap::testutil::{TempDir, conn};
    use crate::tap::{Direction, LogTarget, TapEvent, WriterPriority};

    fn log_config(path: &Path) -> TapConfig {
        TapConfig {
            log: Some(LogTarget::File(path.to_path_buf())),
            pcap: None,
            snaplen: None,
            queue_bytes: 1 << 20,
            writer_priority: WriterPriority::Normal,
        }
    }

    /// Waits until `set` has joined every writer; panics after a few seconds.
    fn reap_all(set: &TapSet) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            set.reap();
            if set.lock().writers.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "a writer did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_writer_ends_with_its_last_handle_and_keeps_its_totals() {
        let dir = TempDir::new("set-ends");
        let log = dir.path().join("tap.log");
        let cfg = log_config(&log);
        let set = TapSet::new();
        let route = set.start(&cfg, Duration::ZERO).expect("start");
        let connection = route.for_worker();
        let c = conn(1, "10.0.0.1:1000", "10.0.0.2:2000");
        assert!(connection.event(&c, TapEvent::Open));
        assert!(connection.data(&c, Direction::DownToUp, 0, b"first words"));
        // The route goes; the connection goes on with the tap.
        drop(route);
        let found = set.find(&cfg).expect("in use by the connection");
        drop(found);
        assert!(connection.data(&c, Direction::UpToDown, 0, b"last words"));
        set.reap();
        assert_eq!(set.lock().writers.len(), 1, "still in use");
        drop(connection);
        reap_all(&set);
        assert!(set.find(&cfg).is_none());
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("  > first words\n") && text.contains("  < last words\n"));
        let stats = set.stats();
        assert_eq!((stats.records_written, stats.bytes_written), (3, 21));
        // Nothing left to shut down at exit.
        assert!(
            set.shutdown(Instant::now() + Duration::from_secs(1), &|| false)
                .is_empty()
        );
        assert_eq!(set.stats(), stats);
    }

    #[test]
    fn no_writer_starts_once_the_exit_began() {
        let dir = TempDir::new("set-closed");
        let set = TapSet::new();
        let running = set.start(&log_config(&dir.path().join("a.log")), Duration::ZERO);
        assert_eq!(
            set.shutdown(Instant::now() + Duration::from_secs(5), &|| false)
                .len(),
            1
        );
        drop(running);
        // A reload that was preparing a tap meanwhile: refused, and nothing was opened.
        let late = dir.path().join("b.log");
        let err = set.start(&log_config(&late), Duration::ZERO).unwrap_err();
        assert!(matches!(err, TapError::Closed), "{err}");
        assert!(!late.exists());
    }

    #[test]
    fn a_new_writer_of_a_file_waits_for_the_previous_one_to_finish() {
        let dir = TempDir::new("set-busy");
        let fifo = dir.path().join("log.fifo");
        let name = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: `name` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let cfg = log_config(&fifo);
        let set = TapSet::new();
        let tap = set.start(&cfg, Duration::ZERO).expect("start");
        let c = conn(2, "10.0.0.1:1000", "10.0.0.2:2000");
        assert!(tap.event(&c, TapEvent::Open));
        // Unused now, but its writer waits for a reader of the FIFO before it can write: it cannot
        // finish.
        drop(tap);
        assert!(set.find(&cfg).is_none());
        assert!(set.find_on_file(&cfg).is_none());
        let started = Instant::now();
        match set.start(&cfg, Duration::from_millis(100)) {
            Err(TapError::Busy { path }) => assert_eq!(path, fifo),
            other => panic!("a second writer of {}: {other:?}", fifo.display()),
        }
        assert!(started.elapsed() >= Duration::from_millis(100));
        set.reap();
        assert_eq!(set.lock().writers.len(), 1, "not finished, not joined");
        // A reader lets it write and finish; then a new writer starts.
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open fifo for reading");
        let again = set
            .start(&cfg, Duration::from_secs(10))
            .expect("start again");
        assert_eq!(set.lock().writers.len(), 2);
        set.reap();
        assert_eq!(set.lock().writers.len(), 1, "the first writer joined");
        assert_eq!(set.stats().records_written, 1);
        drop(again);
        reap_all(&set);
    }
}
