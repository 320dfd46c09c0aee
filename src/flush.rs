//! Waiting at shutdown for a writer thread (a tap's, the access log's) to write what is queued:
//! bounded by a timeout, said in the log once it takes a while, and cut short by an interrupt,
//! so that a sink that takes nothing (a FIFO nobody reads) neither holds the process silently
//! nor ignores the user's second Ctrl-C.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// How long a writer may take before the wait is announced.
const SLOW: Duration = Duration::from_secs(1);
/// How often an interrupt is looked for.
const SLICE: Duration = Duration::from_millis(50);

/// How the wait for a writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// The writer said it was done.
    Done,
    /// The writer ended without saying so: it panicked.
    Panicked,
    /// The timeout passed first.
    TimedOut,
    /// `interrupted` said to stop waiting.
    Interrupted,
}

/// Waits up to `timeout` for `done`, asking `interrupted` every 50 ms whether to stop waiting.
/// Once the writer has taken a second, `slow` is told how long the wait may still last.
pub fn wait(
    done: &Receiver<()>,
    timeout: Duration,
    interrupted: &dyn Fn() -> bool,
    slow: &mut dyn FnMut(Duration),
) -> Flushed {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut announced = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            // No time left (or none given, when several writers share one deadline): a writer
            // that has already finished still counts as done.
            return match done.try_recv() {
                Ok(()) => Flushed::Done,
                Err(TryRecvError::Disconnected) => Flushed::Panicked,
                Err(TryRecvError::Empty) => Flushed::TimedOut,
            };
        }
        if !announced && now >= start + SLOW {
            announced = true;
            slow(deadline - now);
        }
        match done.recv_timeout(SLICE.min(deadline - now)) {
            Ok(()) => return Flushed::Done,
            Err(RecvTimeoutError::Disconnected) => return Flushed::Panicked,
            Err(RecvTimeoutError::Timeout) if interrupted() => return Flushed::Interrupted,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::sync::mpsc;

    #[test]
    fn a_writer_that_finishes_ends_the_wait_unannounced() {
        let (tx, rx) = mpsc::channel();
        tx.send(()).unwrap();
        let mut told = None;
        let r = wait(&rx, Duration::from_secs(5), &|| false, &mut |d| {
            told = Some(d)
        });
        assert_eq!((r, told), (Flushed::Done, None));
        drop(tx);
        assert_eq!(
            wait(&rx, Duration::from_secs(5), &|| false, &mut |_| {}),
            Flushed::Panicked
        );
    }

    #[test]
    fn with_no_time_left_a_finished_writer_is_still_done() {
        let (tx, rx) = mpsc::channel();
        assert_eq!(
            wait(&rx, Duration::ZERO, &|| false, &mut |_| {}),
            Flushed::TimedOut
        );
        tx.send(()).unwrap();
        assert_eq!(
            wait(&rx, Duration::ZERO, &|| false, &mut |_| {}),
            Flushed::Done
        );
        drop(tx);
        assert_eq!(
            wait(&rx, Duration::ZERO, &|| false, &mut |_| {}),
            Flushed::Panicked
        );
    }

    #[test]
    fn a_slow_writer_is_announced_then_given_up_on_or_interrupted() {
        let (_tx, rx) = mpsc::channel::<()>();
        let mut told = Vec::new();
        let start = Instant::now();
        // Room for the announcement even on a loaded machine: the thread may wake late.
        let r = wait(&rx, Duration::from_secs(3), &|| false, &mut |d| {
            told.push(d)
        });
        assert_eq!(r, Flushed::TimedOut);
        assert!(start.elapsed() >= Duration::from_secs(3));
        assert_eq!(told.len(), 1, "announced once");
        assert!(told[0] <= Duration::from_secs(2), "{told:?}");
        // An interrupt ends the wait at the next look.
        let asked = Cell::new(0);
        let start = Instant::now();
        let r = wait(
            &rx,
            Duration::from_secs(30),
            &|| {
                asked.set(asked.get() + 1);
                asked.get() == 3
            },
            &mut |_| {},
        );
        assert_eq!(r, Flushed::Interrupted);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
}
