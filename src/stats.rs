//! Process-wide counters, updated by the event loop with relaxed atomics and read by anyone.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Connections closed, for any reason.
    pub closed: AtomicU64,
    /// Upstream connects that failed or timed out.
    pub connect_failures: AtomicU64,
    /// Pairs ended by a reset or error.
    pub resets: AtomicU64,
    /// Pairs ended by the idle timeout.
    pub timeouts: AtomicU64,
    /// accept(2) errors (EMFILE, ECONNABORTED...).
    pub accept_errors: AtomicU64,
    /// Bytes proxied client → upstream (counted when a pair closes).
    pub bytes_d2u: AtomicU64,
    /// Bytes proxied upstream → client (counted when a pair closes).
    pub bytes_u2d: AtomicU64,
    /// Pairs reset at shutdown: at the end of the drain, or by an immediate stop.
    pub shutdown_aborts: AtomicU64,
    /// Buffered bytes thrown away because a pair was reset.
    pub discarded: AtomicU64,
}

impl Stats {
    /// One line for the shutdown log.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} connections accepted, {} closed ({} connect failures, {} resets, {} idle timeouts, \
             {} reset at shutdown), {} bytes to upstream, {} bytes to clients",
            g(&self.accepted),
            g(&self.closed),
            g(&self.connect_failures),
            g(&self.resets),
            g(&self.timeouts),
            g(&self.shutdown_aborts),
            g(&self.bytes_d2u),
            g(&self.bytes_u2d)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_connections_reset_by_the_drain() {
        let s = Stats::default();
        s.closed.store(2, Ordering::Relaxed);
        s.shutdown_aborts.store(2, Ordering::Relaxed);
        let line = s.summary();
        assert!(
            line.contains(
                "2 closed (0 connect failures, 0 resets, 0 idle timeouts, 2 reset at shutdown)"
            ),
            "{line}"
        );
    }
}
