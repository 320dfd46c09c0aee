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
    /// Pairs reset at the end of the shutdown drain (or by an immediate stop).
    pub shutdown_aborts: AtomicU64,
    /// Buffered bytes thrown away because a pair was reset.
    pub discarded: AtomicU64,
}

impl Stats {
    /// One line for the shutdown log.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} connections accepted, {} closed ({} connect failures, {} resets, {} idle timeouts), \
             {} bytes to upstream, {} bytes to clients",
            g(&self.accepted),
            g(&self.closed),
            g(&self.connect_failures),
            g(&self.resets),
            g(&self.timeouts),
            g(&self.bytes_d2u),
            g(&self.bytes_u2d)
        )
    }
}
