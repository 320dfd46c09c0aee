//! Per-route operational metrics, shared between the event loop (writer) and the admin threads
//! (readers), rendered in the Prometheus text exposition format (version 0.0.4).
//!
//! Invariants:
//! - The event loop only ever does relaxed `fetch_add`/`store` on atomics here: no lock, no
//!   allocation, no system call, so reading metrics can never block or slow the data path.
//! - A scrape reads each atomic once. Values of different series are not a consistent snapshot
//!   (a connection may be counted as accepted but not yet as active), but every counter is
//!   monotonic, and a histogram's buckets, `+Inf` and `_count` are all derived from the same reads, so
//!   they always agree with each other.
//! - `active = accepted - closed` per route holds because [`RouteMetrics::on_accept`] and
//!   [`RouteMetrics::on_close`] are the only functions that move those counters.
//! - Samples of one family are written together, after exactly one `# HELP` and one `# TYPE` line;
//!   counter names end in `_total`; label values are escaped (`\\`, `\"`, `\n`).

use std::fmt::{self, Display, Write as _};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::pair::CloseReason;
use crate::splice::SpliceMemory;
use crate::tap::{Direction, Side};

/// Upper bounds (inclusive, microseconds) of the upstream connect latency histogram buckets:
/// 0.5 ms to 5 s. Slower connects land in the implicit `+Inf` bucket.
pub const CONNECT_LATENCY_BUCKETS_US: [u64; 13] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];

const BUCKETS: usize = CONNECT_LATENCY_BUCKETS_US.len() + 1;

/// Why a connection ended, as a metric label and access-log value. One per [`CloseReason`] shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCause {
    /// Both directions ended with FIN; the client's came first.
    ClientClosedFirst,
    /// Both directions ended with FIN; the upstream's came first.
    UpstreamClosedFirst,
    /// The client reset the connection (or it vanished: EPIPE, ECONNABORTED).
    ResetByClient,
    /// The upstream reset the connection.
    ResetByUpstream,
    /// An unexpected I/O error on either socket.
    Error,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The upstream connect failed (refused, unreachable, ...).
    ConnectFailed,
    /// The upstream connect did not complete in time.
    ConnectTimeout,
    /// Still open when the shutdown drain ended.
    Shutdown,
    /// Refused: no usable original destination, a loop, or not in allowed_destinations.
    Refused,
    /// The client's PROXY protocol header was malformed or missing.
    ProxyHeader,
}

impl CloseCause {
    /// Every cause, in rendering order.
    pub const ALL: [CloseCause; 11] = [
        CloseCause::ClientClosedFirst,
        CloseCause::UpstreamClosedFirst,
        CloseCause::ResetByClient,
        CloseCause::ResetByUpstream,
        CloseCause::Error,
        CloseCause::IdleTimeout,
        CloseCause::ConnectFailed,
        CloseCause::ConnectTimeout,
        CloseCause::Shutdown,
        CloseCause::Refused,
        CloseCause::ProxyHeader,
    ];

    /// The label value, e.g. `client_closed_first`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::ClientClosedFirst => "client_closed_first",
            CloseCause::UpstreamClosedFirst => "upstream_closed_first",
            CloseCause::ResetByClient => "reset_by_client",
            CloseCause::ResetByUpstream => "reset_by_upstream",
            CloseCause::Error => "error",
            CloseCause::IdleTimeout => "idle_timeout",
            CloseCause::ConnectFailed => "connect_failed",
            CloseCause::ConnectTimeout => "connect_timeout",
            CloseCause::Shutdown => "shutdown",
            CloseCause::Refused => "refused",
            CloseCause::ProxyHeader => "proxy_header_error",
        }
    }

    /// The cause of a pair's [`CloseReason`].
    pub fn of(reason: &CloseReason) -> CloseCause {
        match reason {
            CloseReason::Finished {
                first: Side::Downstream,
            } => CloseCause::ClientClosedFirst,
            CloseReason::Finished {
                first: Side::Upstream,
            } => CloseCause::UpstreamClosedFirst,
            CloseReason::Reset(Side::Downstream) => CloseCause::ResetByClient,
            CloseReason::Reset(Side::Upstream) => CloseCause::ResetByUpstream,
            CloseReason::Error(..) => CloseCause::Error,
            CloseReason::IdleTimeout => CloseCause::IdleTimeout,
            CloseReason::ConnectFailed(_) => CloseCause::ConnectFailed,
            CloseReason::ConnectTimeout => CloseCause::ConnectTimeout,
            CloseReason::Shutdown | CloseReason::Stopped => CloseCause::Shutdown,
            CloseReason::Refused(_) => CloseCause::Refused,
            CloseReason::BadProxyHeader(_) | CloseReason::ProxyHeaderTimeout => {
                CloseCause::ProxyHeader
            }
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one upstream connect attempt failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    /// ECONNREFUSED: nothing listens there.
    Refused,
    /// The connect timeout fired (or the kernel gave up: ETIMEDOUT).
    Timeout,
    /// EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN: no route to the upstream.
    Unreachable,
    /// EADDRNOTAVAIL: no free local port toward that address (the ephemeral range is held,
    /// usually by this proxy's own TIME_WAIT sockets to it).
    NoLocalPort,
    /// Anything else.
    Other,
}

impl ConnectFailure {
    /// Every cause, in rendering order.
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
        ConnectFailure::NoLocalPort,
        ConnectFailure::Other,
    ];

    /// The label value, e.g. `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::NoLocalPort => "no_local_port",
            ConnectFailure::Other => "other",
        }
    }

    /// Sorts the error of a failed `connect(2)` (as reported by `SO_ERROR` or `connect` itself).
    pub fn of_error(e: &io::Error) -> ConnectFailure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => return ConnectFailure::Refused,
            io::ErrorKind::TimedOut => return ConnectFailure::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                return ConnectFailure::Unreachable;
            }
            _ => {}
        }
        match e.raw_os_error() {
            Some(libc::EHOSTDOWN | libc::ENETDOWN | libc::EHOSTUNREACH | libc::ENETUNREACH) => {
                ConnectFailure::Unreachable
            }
            Some(libc::EADDRNOTAVAIL) => ConnectFailure::NoLocalPort,
            _ => ConnectFailure::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fixed-bucket latency histogram ([`CONNECT_LATENCY_BUCKETS_US`]).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, *not* cumulative (cumulated at render time); the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS],
    /// Sum of all observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let i = CONNECT_LATENCY_BUCKETS_US
            .iter()
            .position(|&le| us <= le)
            .unwrap_or(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

/// Counters and gauges of one route. The event loop calls the `on_*`/`add_*` methods.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// Connections accepted.
    accepted: AtomicU64,
    /// Connections accepted and not yet closed (signed: a transient negative value must not wrap).
    active: AtomicI64,
    /// Closed connections by [`CloseCause`].
    closed: [AtomicU64; CloseCause::ALL.len()],
    /// Failed upstream connect attempts by [`ConnectFailure`].
    connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    /// Time from starting the upstream connect to its completion (successful connects only).
    connect_latency: Histogram,
    /// Bytes proxied `[d→u, u→d]`.
    bytes: [AtomicU64; 2],
    /// Bytes sitting in this route's pipe buffers right now.
    buffered: AtomicI64,
}

impl RouteMetrics {
    /// A connection was accepted (it is active until [`on_close`](Self::on_close)).
    pub fn on_accept(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
    }

    /// An accepted connection ended; call exactly once per [`on_accept`](Self::on_accept).
    pub fn on_close(&self, cause: CloseCause) {
        self.closed[cause.index()].fetch_add(1, Relaxed);
        self.active.fetch_sub(1, Relaxed);
    }

    /// The upstream connect completed after `latency`.
    pub fn on_connected(&self, latency: Duration) {
        self.connect_latency.observe(latency);
    }

    /// One upstream connect attempt failed. A connection that tries several upstream addresses may
    /// count several failures but closes once.
    pub fn on_connect_failure(&self, cause: ConnectFailure) {
        self.connect_failures[cause.index()].fetch_add(1, Relaxed);
    }

    /// `n` more bytes were proxied in `dir`.
    pub fn add_bytes(&self, dir: Direction, n: u64) {
        self.bytes[dir.index()].fetch_add(n, Relaxed);
    }

    /// The route's buffered bytes grew (positive) or shrank (negative) by `delta`.
    pub fn add_buffered(&self, delta: i64) {
        self.buffered.fetch_add(delta, Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Connections open now.
    pub fn active(&self) -> i64 {
        self.active.load(Relaxed)
    }

    /// Connections closed so far for `cause`.
    pub fn closed(&self, cause: CloseCause) -> u64 {
        self.closed[cause.index()].load(Relaxed)
    }

    /// Failed connect attempts so far for `cause`.
    pub fn connect_failures(&self, cause: ConnectFailure) -> u64 {
        self.connect_failures[cause.index()].load(Relaxed)
    }

    /// Bytes proxied so far in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes[dir.index()].load(Relaxed)
    }

    /// Buffered bytes now.
    pub fn buffered(&self) -> i64 {
        self.buffered.load(Relaxed)
    }

    /// The connect latency histogram.
    pub fn connect_latency(&self) -> &Histogram {
        &self.connect_latency
    }
}

/// Numbers owned by other components (tap writer, access log), passed in at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraGauges {
    /// Tap records written to the outputs.
    pub tap_records_written: u64,
    /// Tap bytes written to the outputs.
    pub tap_bytes_written: u64,
    /// Tap records dropped because the queue was full.
    pub tap_dropped_records: u64,
    /// Payload bytes of the dropped tap records.
    pub tap_dropped_bytes: u64,
    /// Tap output write errors.
    pub tap_write_errors: u64,
    /// Access log lines written.
    pub access_log_written: u64,
    /// Access log entries dropped because the queue was full.
    pub access_log_dropped: u64,
    /// Access log write errors (each may lose a batch of lines).
    pub access_log_write_errors: u64,
    /// Admin connections being served now.
    pub admin_connections_active: u64,
    /// Admin connections shut down to make room for a new one at the connection limit.
    pub admin_connections_evicted: u64,
    /// Admin connections refused at the connection limit.
    pub admin_connections_refused: u64,
}

/// All metrics of one proxy process.
#[derive(Debug)]
pub struct Metrics {
    /// One entry per configured route, in config order.
    routes: Box<[RouteMetrics]>,
    /// Absorbs updates for an out-of-range route index (a caller bug, caught by a debug assertion)
    /// so the data path never panics on it. Never rendered.
    spare: RouteMetrics,
    /// Generation of the config in force (1 for the config read at start).
    config_generation: AtomicU64,
    /// 1 when the last reload attempt succeeded (or none was made), 0 when it failed.
    last_reload_success: AtomicU64,
    /// Kernel pipe memory held by spliced directions, and its limit (shared with every
    /// worker's pipe pool).
    pub splice_memory: Arc<SpliceMemory>,
    /// Nanoseconds each event loop spent polling without sleeping (`busy_poll`), one slot per
    /// worker, each on a cache line of its own.
    busy_poll_ns: Box<[PerWorker]>,
}

/// A counter that one worker adds to, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct PerWorker(AtomicU64);

impl Metrics {
    /// Metrics for `routes` routes and `workers` event loops, all zero; config generation 1;
    /// spliced directions may hold `splice_memory_limit` bytes of pipes.
    pub fn new(routes: usize, splice_memory_limit: usize, workers: usize) -> Metrics {
        Metrics {
            routes: (0..routes).map(|_| RouteMetrics::default()).collect(),
            spare: RouteMetrics::default(),
            config_generation: AtomicU64::new(1),
            last_reload_success: AtomicU64::new(1),
            splice_memory: Arc::new(SpliceMemory::new(splice_memory_limit)),
            busy_poll_ns: (0..workers.max(1)).map(|_| PerWorker::default()).collect(),
        }
    }

    /// Worker `worker` polled for `spent` without sleeping.
    pub fn on_busy_poll(&self, worker: usize, spent: Duration) {
        if let Some(slot) = self.busy_poll_ns.get(worker) {
            let ns = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
            slot.0.fetch_add(ns, Relaxed);
        }
    }

    /// Seconds the event loops spent polling without sleeping, in all.
    fn busy_poll_seconds(&self) -> f64 {
        let ns: u64 = (self.busy_poll_ns.iter()).map(|s| s.0.load(Relaxed)).sum();
        ns as f64 / 1e9
    }

    /// Number of routes.
    pub fn routes(&self) -> usize {
        self.routes.len()
    }

    /// The metrics of route `index` (the index into `Config::routes`).
    pub fn route(&self, index: usize) -> &RouteMetrics {
        debug_assert!(
            index < self.routes.len(),
            "route index {index} out of range"
        );
        self.routes.get(index).unwrap_or(&self.spare)
    }

    /// Records a config reload: `Some(generation)` when the new config is in force, `None` when the
    /// reload was rejected (the old generation stays).
    pub fn on_reload(&self, generation: Option<u64>) {
        match generation {
            Some(g) => {
                self.config_generation.store(g, Relaxed);
                self.last_reload_success.store(1, Relaxed);
            }
            None => self.last_reload_success.store(0, Relaxed),
        }
    }

    /// Appends every metric to `out` in the Prometheus text format. `routes[i]` names route `i`;
    /// routes beyond the shorter of the two lists are left out. Routes with the same name (a
    /// reload that moved a route to another `listen` address removes it and adds it again) are
    /// one series: Prometheus rejects duplicates, and the counters carry on.
    pub fn render_prometheus(&self, routes: &[&str], extra: &ExtraGauges, out: &mut String) {
        let mut merged: Vec<(&str, Vec<&RouteMetrics>)> = Vec::new();
        for (name, r) in routes.iter().copied().zip(self.routes.iter()) {
            match merged.iter_mut().find(|(n, _)| *n == name) {
                Some((_, same)) => same.push(r),
                None => merged.push((name, vec![r])),
            }
        }
        let routes: Vec<(&str, Merged<'_>)> = merged
            .iter()
            .map(|(name, rs)| (*name, Merged(rs.as_slice())))
            .collect();
        let mut w = Exposition { out };

        w.family(
            "tcptap_connections_accepted_total",
            "counter",
            "Downstream connections accepted.",
        );
        for (name, r) in &routes {
            w.sample(
                "tcptap_connections_accepted_total",
                &[("route", name)],
                r.accepted(),
            );
        }
        w.family(
            "tcptap_connections_active",
            "gauge",
            "Connections accepted and not yet closed.",
        );
        for (name, r) in &routes {
            w.sample("tcptap_connections_active", &[("route", name)], r.active());
        }
        w.family(
            "tcptap_connections_closed_total",
            "counter",
            "Connections closed, by reason (resets: reset_by_*; timeouts: idle_timeout, connect_timeout).",
        );
        for (name, r) in &routes {
            for cause in CloseCause::ALL {
                w.sample(
                    "tcptap_connections_closed_total",
                    &[("route", name), ("reason", cause.as_str())],
                    r.closed(cause),
                );
            }
        }
        w.family(
            "tcptap_upstream_connect_failures_total",
            "counter",
            "Failed upstream connect attempts, by cause.",
        );
        for (name, r) in &routes {
            for cause in ConnectFailure::ALL {
                w.sample(
                    "tcptap_upstream_connect_failures_total",
                    &[("route", name), ("cause", cause.as_str())],
                    r.connect_failures(cause),
                );
            }
        }
        w.family(
            "tcptap_upstream_connect_duration_seconds",
            "histogram",
            "Time to establish the upstream connection (successful connects).",
        );
        for (name, r) in &routes {
            w.histogram("tcptap_upstream_connect_duration_seconds", name, r);
        }
        w.family(
            "tcptap_bytes_total",
            "counter",
            "Bytes proxied, by direction (d2u: client to upstream, u2d: upstream to client).",
        );
        for (name, r) in &routes {
            for (label, dir) in [("d2u", Direction::DownToUp), ("u2d", Direction::UpToDown)] {
                w.sample(
                    "tcptap_bytes_total",
                    &[("route", name), ("direction", label)],
                    r.bytes(dir),
                );
            }
        }
        w.family(
            "tcptap_buffered_bytes",
            "gauge",
            "Bytes held in pipe buffers, read but not yet written.",
        );
        for (name, r) in &routes {
            w.sample("tcptap_buffered_bytes", &[("route", name)], r.buffered());
        }

        let globals: [(&str, &str, &str, u64); 18] = [
            (
                "tcptap_tap_records_written_total",
                "counter",
                "Tap records written.",
                extra.tap_records_written,
            ),
            (
                "tcptap_tap_bytes_written_total",
                "counter",
                "Payload bytes of the tap records written (each byte once, however many outputs the tap has).",
                extra.tap_bytes_written,
            ),
            (
                "tcptap_tap_dropped_records_total",
                "counter",
                "Tap records dropped: the tap queue was full, or writing them failed.",
                extra.tap_dropped_records,
            ),
            (
                "tcptap_tap_dropped_bytes_total",
                "counter",
                "Payload bytes of dropped tap records.",
                extra.tap_dropped_bytes,
            ),
            (
                "tcptap_tap_write_errors_total",
                "counter",
                "Tap output write errors.",
                extra.tap_write_errors,
            ),
            (
                "tcptap_access_log_written_total",
                "counter",
                "Access log lines written.",
                extra.access_log_written,
            ),
            (
                "tcptap_access_log_dropped_total",
                "counter",
                "Access log entries dropped because the queue was full.",
                extra.access_log_dropped,
            ),
            (
                "tcptap_access_log_write_errors_total",
                "counter",
                "Access log write errors.",
                extra.access_log_write_errors,
            ),
            (
                "tcptap_log_lines_dropped_total",
                "counter",
                "Process log lines dropped because stderr did not keep up.",
                crate::logging::dropped_total(),
            ),
            (
                "tcptap_admin_connections_active",
                "gauge",
                "Admin endpoint connections being served.",
                extra.admin_connections_active,
            ),
            (
                "tcptap_admin_connections_evicted_total",
                "counter",
                "Admin endpoint connections still waiting on their client, shut down to make room at the connection limit.",
                extra.admin_connections_evicted,
            ),
            (
                "tcptap_admin_connections_refused_total",
                "counter",
                "Admin endpoint connections refused (503) at the connection limit.",
                extra.admin_connections_refused,
            ),
            (
                "tcptap_kernel_pipes",
                "gauge",
                "Kernel pipes held by spliced directions and tap tees (two descriptors each; idle pooled pipes not counted).",
                crate::fd_budget::pipes() as u64,
            ),
            (
                "tcptap_splice_pipe_bytes",
                "gauge",
                "Capacity of the kernel pipes held by spliced directions, in bytes (at most splice_memory_limit).",
                self.splice_memory.held() as u64,
            ),
            (
                "tcptap_splice_memory_limit_bytes",
                "gauge",
                "splice_memory_limit: kernel pipe capacity spliced directions may hold together.",
                self.splice_memory.limit() as u64,
            ),
            (
                "tcptap_splice_refused_total",
                "counter",
                "Times a direction copied instead of splicing because a pipe would have passed splice_memory_limit.",
                self.splice_memory.refused(),
            ),
            (
                "tcptap_config_generation",
                "gauge",
                "Generation of the configuration in force.",
                self.config_generation.load(Relaxed),
            ),
            (
                "tcptap_config_last_reload_success",
                "gauge",
                "1 if the last configuration reload succeeded, 0 if it was rejected.",
                self.last_reload_success.load(Relaxed),
            ),
        ];
        for (name, kind, help, value) in globals {
            w.family(name, kind, help);
            w.sample(name, &[], value);
        }
        w.family(
            "tcptap_busy_poll_seconds_total",
            "counter",
            "Time the event loops spent polling without sleeping (busy_poll), in all.",
        );
        w.sample(
            "tcptap_busy_poll_seconds_total",
            &[],
            self.busy_poll_seconds(),
        );
        // The standard process metrics, each where the system gives it.
        let process: [(&str, &str, &str, Option<f64>); 4] = [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                cpu_seconds(),
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                resident_bytes().map(|b| b as f64),
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                open_fds().map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors (soft RLIMIT_NOFILE).",
                max_fds().map(|n| n as f64),
            ),
        ];
        for (name, kind, help, value) in process {
            if let Some(v) = value {
                w.family(name, kind, help);
                w.sample(name, &[], v);
            }
        }
    }
}

/// One backend of a route with health checks, as `tcptap_upstream_up` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUp {
    /// The route's name.
    pub route: String,
    /// The upstream as written in the config (a `host:port` may stand for several addresses).
    pub upstream: String,
    /// The address probed.
    pub address: String,
    /// True while in rotation.
    pub up: bool,
}

/// Appends the `tcptap_upstream_up` family: 1 per backend in rotation, 0 per backend taken out by
/// its health checks. Routes without health checks have no samples.
pub fn render_upstream_health(rows: &[UpstreamUp], out: &mut String) {
    let mut w = Exposition { out };
    w.family(
        "tcptap_upstream_up",
        "gauge",
        "1 if the upstream address passes its route's health checks (or has not failed them yet), 0 if it is DOWN. Only routes with health checks.",
    );
    for r in rows {
        w.sample(
            "tcptap_upstream_up",
            &[
                ("route", &r.route),
                ("upstream", &r.upstream),
                ("address", &r.address),
            ],
            u8::from(r.up),
        );
    }
}

/// The metrics of the routes that share a name, read as one route.
struct Merged<'a>(&'a [&'a RouteMetrics]);

impl Merged<'_> {
    fn sum<T: std::iter::Sum<T>>(&self, f: impl Fn(&RouteMetrics) -> T) -> T {
        self.0.iter().map(|r| f(r)).sum()
    }
    fn accepted(&self) -> u64 {
        self.sum(RouteMetrics::accepted)
    }
    fn active(&self) -> i64 {
        self.sum(RouteMetrics::active)
    }
    fn closed(&self, cause: CloseCause) -> u64 {
        self.sum(|r| r.closed(cause))
    }
    fn connect_failures(&self, cause: ConnectFailure) -> u64 {
        self.sum(|r| r.connect_failures(cause))
    }
    fn bytes(&self, dir: Direction) -> u64 {
        self.sum(|r| r.bytes(dir))
    }
    fn buffered(&self) -> i64 {
        self.sum(RouteMetrics::buffered)
    }
}

/// Writes exposition-format lines into a string (writing to a `String` cannot fail).
struct Exposition<'a> {
    out: &'a mut String,
}

impl Exposition<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(v, self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, route: &str, r: &Merged<'_>) {
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| r.sum(|m| m.connect_latency.buckets[i].load(Relaxed)));
        let sum_us = r.sum(|m| m.connect_latency.sum_us.load(Relaxed));
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = match CONNECT_LATENCY_BUCKETS_US.get(i) {
                Some(us) => (*us as f64 / 1e6).to_string(),
                None => "+Inf".to_string(),
            };
            self.sample(&bucket, &[("route", route), ("le", &le)], cumulative);
        }
        self.sample(
            &format!("{name}_sum"),
            &[("route", route)],
            sum_us as f64 / 1e6,
        );
        self.sample(&format!("{name}_count"), &[("route", route)], cumulative);
    }
}

/// Escapes a label value: backslash, double quote and line feed are the only escapes the format has.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Open file descriptors of this process, counted in `/proc/self/fd` (Linux); `None` elsewhere.
pub fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory handle being read is itself one of the listed descriptors.
    let n = dir.filter(|e| e.is_ok()).count() as u64;
    Some(n.saturating_sub(1))
}

/// User + system CPU time of every thread of the process.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return None;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Some(t(ru.ru_utime) + t(ru.ru_stime))
}

/// The process's resident set size (`/proc/self/statm`'s second field, in pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// The soft limit on open file descriptors, when it is finite.
pub fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// One parsed sample: name, labels in order, value.
    pub(crate) type Sample = (String, Vec<(String, String)>, f64);

    /// Checks `text` against the exposition format and returns every sample as
    /// `(name, labels, value)`. Panics with the offending line on the first violation.
    pub(crate) fn check_exposition(text: &str) -> Vec<Sample> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(valid_name(name), "bad metric name in {line:?}");
                assert!(!help.is_empty(), "empty HELP in {line:?}");
                assert!(helps.insert(name.to_string()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a type");
                assert!(valid_name(name), "bad metric name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "unknown type in {line:?}"
                );
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "second TYPE for {name}"
                );
                if kind == "counter" {
                    assert!(
                        name.ends_with("_total"),
                        "counter {name} must end in _total"
                    );
                }
                if let Some(prev) = current.replace(name.to_string()) {
                    finished.insert(prev);
                }
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (name, labels, value) = parse_sample(line);
            let family = types
                .keys()
                .find(|f| {
                    *f == &name
                        || (types[*f] == "histogram"
                            && ["_bucket", "_sum", "_count"]
                                .iter()
                                .any(|s| name == format!("{f}{s}")))
                })
                .unwrap_or_else(|| panic!("sample before its TYPE: {line:?}"))
                .clone();
            assert_eq!(
                current.as_deref(),
                Some(family.as_str()),
                "sample outside its family's block: {line:?}"
            );
            assert!(!finished.contains(&family), "family {family} split");
            samples.push((name, labels, value));
        }
        check_histograms(&types, &samples);
        for (i, (name, labels, _)) in samples.iter().enumerate() {
            assert!(
                !samples[..i]
                    .iter()
                    .any(|(n, l, _)| n == name && l == labels),
                "duplicate series {name} {labels:?}"
            );
        }
        samples
    }

    fn check_histograms(types: &HashMap<String, String>, samples: &[Sample]) {
        for (family, _) in types.iter().filter(|(_, k)| *k == "histogram") {
            // Group the buckets by their labels other than `le`.
            type Labels = Vec<(String, String)>;
            let mut series: HashMap<Labels, Vec<(String, f64)>> = HashMap::new();
            for (name, labels, value) in samples {
                if *name == format!("{family}_bucket") {
                    let le = labels
                        .iter()
                        .find(|(k, _)| k == "le")
                        .expect("bucket has le")
                        .1
                        .clone();
                    let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                    series.entry(rest).or_default().push((le, *value));
                }
            }
            assert!(!series.is_empty(), "histogram {family} has no buckets");
            for (labels, buckets) in &series {
                let mut prev_le = f64::NEG_INFINITY;
                let mut prev_count = 0.0;
                for (le, count) in buckets {
                    let le: f64 = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le is a number")
                    };
                    assert!(le > prev_le, "{family}{labels:?}: le not increasing");
                    assert!(
                        *count >= prev_count,
                        "{family}{labels:?}: buckets not cumulative"
                    );
                    prev_le = le;
                    prev_count = *count;
                }
                assert_eq!(buckets.last().map(|b| b.0.as_str()), Some("+Inf"));
                let count = samples
                    .iter()
                    .find(|(n, l, _)| *n == format!("{family}_count") && l == labels)
                    .expect("histogram has _count")
                    .2;
                assert_eq!(
                    count, prev_count,
                    "{family}{labels:?}: _count != +Inf bucket"
                );
                assert!(
                    samples
                        .iter()
                        .any(|(n, l, _)| *n == format!("{family}_sum") && l == labels),
                    "histogram has _sum"
                );
            }
        }
    }

    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// `name{k="v",...} value`, with the format's label escapes.
    fn parse_sample(line: &str) -> Sample {
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name = &line[..name_end];
        assert!(valid_name(name), "bad metric name in {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let end;
            loop {
                let start = chars.peek().map(|(i, _)| *i).expect("unterminated labels");
                let mut key_end = start;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        key_end = i;
                        break;
                    }
                }
                let key = &r[start..key_end];
                assert!(
                    valid_name(key) && !key.contains(':'),
                    "bad label name in {line:?}"
                );
                assert_eq!(
                    chars.next().map(|(_, c)| c),
                    Some('"'),
                    "label value not quoted in {line:?}"
                );
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some('"') => break,
                        Some('\n') | None => panic!("unterminated label value in {line:?}"),
                        Some(c) => value.push(c),
                    }
                }
                assert!(
                    labels.iter().all(|(k, _): &(String, String)| k != key),
                    "duplicate label in {line:?}"
                );
                labels.push((key.to_string(), value));
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    other => panic!("expected , or }} after label, got {other:?} in {line:?}"),
                }
            }
            rest = &r[end..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before value in {line:?}"));
        assert!(!value.contains(' '), "timestamps are not used: {line:?}");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        (name.to_string(), labels, value)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
            .2
    }

    #[test]
    fn test_render_empty_is_valid() {
        let m = Metrics::new(2, usize::MAX, 1);
        let mut out = String::new();
        m.render_prometheus(&["web", "db"], &ExtraGauges::default(), &mut out);
        let samples = check_exposition(&out);
        assert_eq!(
            value(
                &samples,
                "tcptap_connections_accepted_total",
                &[("route", "db")]
            ),
            0.0
        );
        assert_eq!(value(&samples, "tcptap_config_generation", &[]), 1.0);
        assert!(value(&samples, "process_open_fds", &[]) >= 3.0);
    }

    #[test]
    fn busy_poll_time_adds_up_over_workers_and_process_usage_is_shown() {
        let m = Metrics::new(1, usize::MAX, 2);
        m.on_busy_poll(0, Duration::from_micros(1500));
        m.on_busy_poll(1, Duration::from_micros(500));
        m.on_busy_poll(0, Duration::from_millis(1));
        // A worker index past the count (a caller bug) is ignored, not a panic.
        m.on_busy_poll(7, Duration::from_secs(1));
        let mut out = String::new();
        m.render_prometheus(&["web"], &ExtraGauges::default(), &mut out);
        let samples = check_exposition(&out);
        let polled = value(&samples, "tcptap_busy_poll_seconds_total", &[]);
        assert!((polled - 0.003).abs() < 1e-9, "{polled}");
        // This test process has run and holds memory.
        assert!(value(&samples, "process_cpu_seconds_total", &[]) > 0.0);
        assert!(value(&samples, "process_resident_memory_bytes", &[]) > 1e6);
    }

    #[test]
    fn test_render_counts_and_histogram() {
        let m = Metrics::new(2, usize::MAX, 1);
        let r = m.route(1);
        for _ in 0..3 {
            r.on_accept();
        }
        r.on_close(CloseCause::ClientClosedFirst);
        r.on_close(CloseCause::ResetByUpstream);
        r.on_connect_failure(ConnectFailure::Refused);
        r.on_connected(Duration::from_micros(300));
        r.on_connected(Duration::from_millis(3));
        r.on_connected(Duration::from_secs(10));
        r.add_bytes(Direction::DownToUp, 100);
        r.add_bytes(Direction::UpToDown, 7);
        r.add_buffered(4096);
        r.add_buffered(-1000);
        m.on_reload(Some(3));
        m.on_reload(None);
        let extra = ExtraGauges {
            tap_dropped_records: 5,
            access_log_dropped: 2,
            ..ExtraGauges::default()
        };
        let mut out = String::new();
        m.render_prometheus(&["web", "db"], &extra, &mut out);
        let s = check_exposition(&out);
        let db = [("route", "db")];
        assert_eq!(value(&s, "tcptap_connections_accepted_total", &db), 3.0);
        assert_eq!(value(&s, "tcptap_connections_active", &db), 1.0);
        assert_eq!(
            value(
                &s,
                "tcptap_connections_closed_total",
                &[("route", "db"), ("reason", "reset_by_upstream")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "tcptap_upstream_connect_failures_total",
                &[("route", "db"), ("cause", "refused")]
            ),
            1.0
        );
        let bucket = "tcptap_upstream_connect_duration_seconds_bucket";
        assert_eq!(value(&s, bucket, &[("route", "db"), ("le", "0.0005")]), 1.0);
        assert_eq!(value(&s, bucket, &[("route", "db"), ("le", "0.005")]), 2.0);
        assert_eq!(value(&s, bucket, &[("route", "db"), ("le", "5")]), 2.0);
        assert_eq!(value(&s, bucket, &[("route", "db"), ("le", "+Inf")]), 3.0);
        let sum = value(&s, "tcptap_upstream_connect_duration_seconds_sum", &db);
        assert!((sum - 10.0033).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(
                &s,
                "tcptap_bytes_total",
                &[("route", "db"), ("direction", "d2u")]
            ),
            100.0
        );
        assert_eq!(value(&s, "tcptap_buffered_bytes", &db), 3096.0);
        assert_eq!(value(&s, "tcptap_tap_dropped_records_total", &[]), 5.0);
        assert_eq!(value(&s, "tcptap_access_log_dropped_total", &[]), 2.0);
        assert_eq!(value(&s, "tcptap_config_generation", &[]), 3.0);
        assert_eq!(value(&s, "tcptap_config_last_reload_success", &[]), 0.0);
        // Route 0 is untouched.
        assert_eq!(
            value(&s, "tcptap_connections_accepted_total", &[("route", "web")]),
            0.0
        );
    }

    #[test]
    fn test_routes_with_one_name_render_as_one_series() {
        // A reload that moves route `api` to another listen address removes it (slot 0) and
        // adds it again (slot 2).
        let m = Metrics::new(3, usize::MAX, 1);
        m.route(0).on_accept();
        m.route(0).on_connected(Duration::from_millis(3));
        m.route(0).on_close(CloseCause::ClientClosedFirst);
        m.route(2).on_accept();
        m.route(2).on_connected(Duration::from_millis(3));
        m.route(1).on_accept();
        let mut out = String::new();
        m.render_prometheus(&["api", "web", "api"], &ExtraGauges::default(), &mut out);
        let s = check_exposition(&out);
        let api = [("route", "api")];
        assert_eq!(value(&s, "tcptap_connections_accepted_total", &api), 2.0);
        assert_eq!(value(&s, "tcptap_connections_active", &api), 1.0);
        let bucket = "tcptap_upstream_connect_duration_seconds_bucket";
        assert_eq!(value(&s, bucket, &[("route", "api"), ("le", "+Inf")]), 2.0);
        assert_eq!(
            value(&s, "tcptap_connections_accepted_total", &[("route", "web")]),
            1.0
        );
    }

    #[test]
    fn test_render_escapes_label_values() {
        let m = Metrics::new(1, usize::MAX, 1);
        m.route(0).on_accept();
        let name = "we\"b\\x\ny";
        let mut out = String::new();
        m.render_prometheus(&[name], &ExtraGauges::default(), &mut out);
        assert!(out.contains(r#"route="we\"b\\x\ny""#), "{out}");
        let s = check_exposition(&out);
        assert_eq!(
            value(&s, "tcptap_connections_accepted_total", &[("route", name)]),
            1.0
        );
    }

    #[test]
    #[should_panic(expected = "not cumulative")]
    fn test_checker_rejects_non_cumulative_buckets() {
        check_exposition(
            "# HELP h_seconds x\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 2\n\
             h_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_sum 0\nh_seconds_count 1\n",
        );
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    fn test_checker_rejects_counter_without_total() {
        check_exposition("# HELP c x\n# TYPE c counter\nc 1\n");
    }

    #[test]
    #[should_panic(expected = "bad escape")]
    fn test_checker_rejects_bad_escape() {
        check_exposition("# HELP g x\n# TYPE g gauge\ng{a=\"\\q\"} 1\n");
    }

    #[test]
    fn test_close_cause_of_reason() {
        assert_eq!(
            CloseCause::of(&CloseReason::Finished {
                first: Side::Upstream
            }),
            CloseCause::UpstreamClosedFirst
        );
        assert_eq!(
            CloseCause::of(&CloseReason::Reset(Side::Downstream)),
            CloseCause::ResetByClient
        );
        assert_eq!(
            CloseCause::of(&CloseReason::ConnectFailed(
                io::ErrorKind::ConnectionRefused.into()
            )),
            CloseCause::ConnectFailed
        );
        let labels: HashSet<&str> = CloseCause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels.len(), CloseCause::ALL.len());
        for (i, c) in CloseCause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, c) in ConnectFailure::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn test_connect_failure_of_error() {
        let e = |errno| io::Error::from_raw_os_error(errno);
        assert_eq!(
            ConnectFailure::of_error(&e(libc::ECONNREFUSED)),
            ConnectFailure::Refused
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::ETIMEDOUT)),
            ConnectFailure::Timeout
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::EHOSTUNREACH)),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::ENETUNREACH)),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::EHOSTDOWN)),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::EADDRNOTAVAIL)),
            ConnectFailure::NoLocalPort
        );
        assert_eq!(
            ConnectFailure::of_error(&e(libc::EACCES)),
            ConnectFailure::Other
        );
    }

    #[test]
    fn test_open_fds_sees_a_new_file() {
        let before = open_fds().expect("/proc/self/fd");
        let f = std::fs::File::open("/proc/self/stat").expect("open");
        // Other tests open and close files concurrently, so only check it is plausible.
        let during = open_fds().expect("/proc/self/fd");
        drop(f);
        assert!(before >= 3 && during >= 4, "{before} {during}");
    }
}
