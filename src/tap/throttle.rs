//! The low-priority tap writer's CPU cap while the machine's CPUs are contended.
//!
//! Nice 19 alone leaves the writer whatever CPU is idle for a moment, and most of its work is in
//! the kernel (reading the tee pipe, `O_DIRECT` writes) in stretches an event loop waking on
//! that core has to wait out. On a busy machine that costs throughput in proportion to what is
//! captured: a pcap of bulk traffic ran at 0.75–0.92x of tap-off on 2 cores, capturing 30–60%.
//! So while the kernel's pressure stall information says tasks are waiting for a CPU (the `some`
//! line of `/proc/pressure/cpu` grew by at least [`PRESSURE`] of the last [`WINDOW`]), the writer
//! keeps to a quarter of one core: after a batch it sleeps [`SLEEP_PER_CPU`] times the CPU time
//! it used.
//! With idle CPUs there is no pressure and no cap; without PSI (a kernel built without it, or
//! booted with `psi=0`) there is no cap either, as before.

use std::fs;
use std::time::{Duration, Instant};

/// While CPUs are contended, the writer sleeps this many times the CPU time it used: it keeps to
/// a quarter of one core.
pub(crate) const SLEEP_PER_CPU: u32 = 3;
/// How often the pressure is looked at.
pub(crate) const WINDOW: Duration = Duration::from_millis(50);
/// The fraction of a window during which some task waited for a CPU that counts as contended.
pub(crate) const PRESSURE: f64 = 0.10;
/// CPU time the writer may run up before it sleeps (no sleeps of a few microseconds).
const MIN_OWED: Duration = Duration::from_millis(1);

const PSI_CPU: &str = "/proc/pressure/cpu";

/// Decides how long the writer sleeps after each batch.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// Reads the stall total (`read_stalled`; tests substitute their own).
    source: fn() -> Option<u64>,
    window_start: Instant,
    /// `some total` (µs) at `window_start`.
    stalled_mark: u64,
    /// The thread's CPU time after the previous batch.
    cpu_mark: Duration,
    /// CPU time used while contended and not yet slept for.
    owed: Duration,
    contended: bool,
}

impl Throttle {
    /// Starts a throttle for the calling thread; `None` when this kernel has no PSI.
    pub(crate) fn for_this_thread() -> Option<Throttle> {
        Throttle::with_source(read_stalled)
    }

    /// A throttle for the calling thread that reads the stall total from `source`.
    pub(crate) fn with_source(source: fn() -> Option<u64>) -> Option<Throttle> {
        let mut t = Throttle::new(Instant::now(), thread_cpu(), source()?);
        t.source = source;
        Some(t)
    }

    pub(crate) fn new(now: Instant, cpu: Duration, stalled: u64) -> Throttle {
        Throttle {
            source: read_stalled,
            window_start: now,
            stalled_mark: stalled,
            cpu_mark: cpu,
            owed: Duration::ZERO,
            contended: false,
        }
    }

    /// After a batch, on the writer thread: how long to sleep now.
    pub(crate) fn after_batch(&mut self) -> Duration {
        self.after_batch_at(Instant::now(), thread_cpu(), self.source)
    }

    /// [`after_batch`](Throttle::after_batch) with the clock, the thread's CPU time and the
    /// pressure reading given (`stalled` is called at most once per [`WINDOW`]).
    pub(crate) fn after_batch_at(
        &mut self,
        now: Instant,
        cpu: Duration,
        stalled: impl FnOnce() -> Option<u64>,
    ) -> Duration {
        let used = cpu.saturating_sub(self.cpu_mark);
        self.cpu_mark = cpu;
        let window = now.saturating_duration_since(self.window_start);
        if window >= WINDOW {
            if let Some(total) = stalled() {
                let waited = total.saturating_sub(self.stalled_mark);
                self.contended = waited as f64 >= PRESSURE * window.as_micros() as f64;
                self.stalled_mark = total;
                self.window_start = now;
            }
        }
        if !self.contended {
            self.owed = Duration::ZERO;
            return Duration::ZERO;
        }
        self.owed += used;
        if self.owed < MIN_OWED {
            return Duration::ZERO;
        }
        std::mem::take(&mut self.owed) * SLEEP_PER_CPU
    }
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer; this clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Microseconds during which some task waited for a CPU, since boot.
fn read_stalled() -> Option<u64> {
    parse_some_total(&fs::read_to_string(PSI_CPU).ok()?)
}

/// The `total=` of the `some` line of a PSI file.
fn parse_some_total(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn psi_some_total_is_parsed() {
        let text = "some avg10=0.18 avg60=18.40 avg300=25.50 total=3779551701\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_some_total(text), Some(3_779_551_701));
        assert_eq!(parse_some_total("full avg10=0.00 total=5\n"), None);
        assert_eq!(parse_some_total(""), None);
    }

    #[test]
    fn this_kernel_reports_pressure_or_the_cap_is_off() {
        match fs::read_to_string(PSI_CPU) {
            Ok(text) => {
                assert!(parse_some_total(&text).is_some(), "{text}");
                assert!(Throttle::for_this_thread().is_some());
            }
            Err(_) => assert!(Throttle::for_this_thread().is_none()),
        }
    }

    #[test]
    fn contended_cpus_cap_the_writer_at_a_quarter_core() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0, Duration::ZERO, 1_000);
        // Within the first window nothing is known yet: no sleep.
        assert_eq!(
            t.after_batch_at(t0 + 10 * MS, 4 * MS, || panic!("read early")),
            Duration::ZERO
        );
        // 50 ms later, tasks waited 20 ms (40%): contended. 6 ms of CPU since the last batch,
        // so sleep 18 ms (6 ms of every 24 ms: a quarter).
        let sleep = t.after_batch_at(t0 + 50 * MS, 10 * MS, || Some(21_000));
        assert_eq!(sleep, 18 * MS);
        // Small batches run up CPU time until a sleep is worth it.
        assert_eq!(
            t.after_batch_at(t0 + 60 * MS, 10 * MS + MS / 2, || None),
            Duration::ZERO
        );
        assert_eq!(t.after_batch_at(t0 + 61 * MS, 11 * MS, || None), 3 * MS);
        // The next window saw 2 ms of waiting in 50 ms (4%): not contended, no cap.
        assert_eq!(
            t.after_batch_at(t0 + 100 * MS, 30 * MS, || Some(23_000)),
            Duration::ZERO
        );
        assert_eq!(
            t.after_batch_at(t0 + 120 * MS, 40 * MS, || panic!("read early")),
            Duration::ZERO
        );
    }

    #[test]
    fn a_missing_reading_keeps_the_last_verdict() {
        let t0 = Instant::now();
        let mut t = Throttle::new(t0, Duration::ZERO, 0);
        assert_eq!(
            t.after_batch_at(t0 + 60 * MS, 2 * MS, || Some(30_000)),
            6 * MS
        );
        assert_eq!(t.after_batch_at(t0 + 120 * MS, 4 * MS, || None), 6 * MS);
    }
}
