//! Several upstreams per route: selection policy, connect retries, active health checks and DNS
//! re-resolution.
//!
//! - [`UpstreamSpec`]: a route's upstreams as configured (names as written, addresses resolved at
//!   startup, policy, attempts, health check, re-resolve interval). Built by `config`.
//! - [`UpstreamSet`]: one per route per event loop; the backends with their health and active
//!   connection counts. Pure bookkeeping, no I/O: [`UpstreamSet::pick`] chooses per [`Policy`],
//!   [`UpstreamSet::next_after_failure`] chooses the retry after a failed connect.
//! - [`HealthState`]: the rise/fall machine of one backend (`UP` → `DOWN` after `fall` consecutive failed
//!   probes, `DOWN` → `UP` after `rise` consecutive good ones; every backend starts `UP`).
//! - [`Prober`]: non-blocking TCP connect probes, registered in the loop's `mio::Registry` under tokens
//!   `base .. base + capacity`, results reported into the [`UpstreamSet`]. Only the first event loop
//!   probes: its set publishes each backend's health on the route's [`HealthBoard`], and the sets of
//!   the other loops follow it there, so a backend sees one probe per interval however many loops
//!   run, and every loop agrees on what is `DOWN`.
//! - [`Resolver`]: a std thread that re-resolves host names every `resolve_interval` and sends changed
//!   address lists to each loop (an mpsc channel plus a wake callback), so DNS never blocks a loop.
//!
//! Invariants:
//! - Backend indices are stable for as long as anything may hold them: an address that disappears from
//!   DNS is *retired* (never picked or probed again) and its slot is reused only once its active
//!   connection count is back to zero. A caller that calls [`UpstreamSet::on_open`] when it starts a
//!   connect and [`UpstreamSet::on_close`] exactly once when that upstream socket goes away therefore
//!   never sees its index point at another address.
//! - Probe results carry the address they probed; a result for a retired or reused slot is ignored.
//! - When every candidate backend is `DOWN`, the policy still picks among them: trying a backend that may
//!   have recovered is better than refusing every client until the next good probe.

use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::config::Route;

/// How a route chooses among its upstreams (`policy = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each new connection goes to the next healthy backend in turn (the default).
    #[default]
    RoundRobin,
    /// The healthy backend with the fewest open and opening connections; ties go round-robin.
    LeastConnections,
    /// The first healthy backend in the order written (failover).
    First,
}

impl Policy {
    /// Parses the config spelling (`round_robin`, `least_connections`, `first`).
    pub fn from_name(name: &str) -> Option<Policy> {
        match name.trim() {
            "round_robin" => Some(Policy::RoundRobin),
            "least_connections" => Some(Policy::LeastConnections),
            "first" => Some(Policy::First),
            _ => None,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConnections => "least_connections",
            Policy::First => "first",
        })
    }
}

/// `[route.health_check]`: periodic TCP connect probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between the starts of two probes of one backend (default 2s).
    pub interval: Duration,
    /// A probe that has not connected after this long failed (default 1s; at most `interval`).
    pub timeout: Duration,
    /// Consecutive good probes that bring a `DOWN` backend back (default 2; at least 1).
    pub rise: u32,
    /// Consecutive failed probes that take an `UP` backend out of rotation (default 3; at least 1).
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// One entry of `upstreams` (or the single `upstream`): the text as written and what it resolved to.
#[derive(Debug, Clone, Eq)]
pub struct UpstreamTarget {
    /// `host:port` or `ip:port` as written; the resolver looks it up again by this name.
    pub name: String,
    /// The addresses it resolved to at startup, in resolver order.
    pub addrs: Vec<SocketAddr>,
}

/// The same name resolving to the same addresses, in any order: DNS servers rotate their
/// answers, and a reload that finds them in another order keeps the route's upstreams (and
/// their health) as they are.
impl PartialEq for UpstreamTarget {
    fn eq(&self, other: &UpstreamTarget) -> bool {
        self.name == other.name && same_set(&self.addrs, &other.addrs)
    }
}

impl UpstreamTarget {
    /// True when the name is an IP address with a port: nothing to re-resolve.
    pub fn is_literal(&self) -> bool {
        self.name.parse::<SocketAddr>().is_ok()
    }
}

/// A route's upstreams as configured; see the config keys in `proxy.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// The upstreams in the order written (empty for `original-destination` routes).
    pub targets: Vec<UpstreamTarget>,
    /// How a backend is chosen (default round-robin).
    pub policy: Policy,
    /// Connects tried per client before giving up, counting the first; `None` (the default):
    /// min(3, number of addresses), counted anew when re-resolution changes the addresses. Each
    /// address is tried at most once per client, which also bounds the attempts.
    pub connect_attempts: Option<usize>,
    /// Active health checks, off unless `[route.health_check]` is present.
    pub health_check: Option<HealthCheck>,
    /// Re-resolve host names this often (`resolve_interval`), off unless set.
    pub resolve_interval: Option<Duration>,
    /// Not configuration: where the health checks of this route, made by one event loop, are
    /// published for the others. Every clone of a spec shares it; equality ignores it.
    pub board: HealthBoard,
}

impl Default for UpstreamSpec {
    fn default() -> UpstreamSpec {
        UpstreamSpec {
            targets: Vec::new(),
            policy: Policy::RoundRobin,
            connect_attempts: None,
            health_check: None,
            resolve_interval: None,
            board: HealthBoard::default(),
        }
    }
}

impl UpstreamSpec {
    /// One upstream with every other setting at its default (`--upstream` on the command line).
    pub fn single(name: &str, addrs: Vec<SocketAddr>) -> UpstreamSpec {
        UpstreamSpec {
            targets: vec![UpstreamTarget {
                name: name.to_string(),
                addrs,
            }],
            ..UpstreamSpec::default()
        }
    }

    /// Every address of every target, in the order written, each once.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for addr in self.targets.iter().flat_map(|t| t.addrs.iter()) {
            if !out.contains(addr) {
                out.push(*addr);
            }
        }
        out
    }
}

/// Whether a backend is in rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// In rotation.
    Up,
    /// Out of rotation until `rise` consecutive probes succeed.
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Up => "UP",
            Health::Down => "DOWN",
        })
    }
}

/// The rise/fall counters of one backend. Starts `UP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    health: Health,
    /// Consecutive good probes (reset by a failure).
    successes: u32,
    /// Consecutive failed probes (reset by a success).
    failures: u32,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            health: Health::Up,
            successes: 0,
            failures: 0,
        }
    }
}

impl HealthState {
    /// Current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// True when in rotation.
    pub fn is_up(&self) -> bool {
        self.health == Health::Up
    }

    /// Counts one probe result; returns the new state when it changed. `rise` and `fall` below 1
    /// count as 1.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.health == Health::Down && self.successes >= rise.max(1) {
                self.health = Health::Up;
                return Some(Health::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.health == Health::Up && self.failures >= fall.max(1) {
                self.health = Health::Down;
                return Some(Health::Down);
            }
        }
        None
    }
}

/// One upstream address of a route.
#[derive(Debug, Clone)]
pub struct Backend {
    addr: SocketAddr,
    /// The target name it was resolved from, for logs and for DNS updates.
    name: String,
    health: HealthState,
    /// Connects started and not yet closed (for `least_connections`, and to know when a retired slot
    /// may be reused).
    active: usize,
    /// (position of the name in the config, position in its resolved list): the `first` order.
    rank: (usize, usize),
    /// False once DNS no longer returns the address: never picked or probed again.
    live: bool,
}

impl Backend {
    fn new(addr: SocketAddr, name: &str, rank: (usize, usize)) -> Backend {
        Backend {
            addr,
            name: name.to_string(),
            health: HealthState::default(),
            active: 0,
            rank,
            live: true,
        }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The target name as written.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The health state.
    pub fn health(&self) -> Health {
        self.health.health()
    }

    /// Connects started and not yet closed.
    pub fn active(&self) -> usize {
        self.active
    }

    /// False once the address was dropped by a DNS update.
    pub fn is_live(&self) -> bool {
        self.live
    }
}

/// One backend as published on a [`HealthBoard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardEntry {
    /// The target name as written.
    pub name: String,
    /// The address probed.
    pub addr: SocketAddr,
    /// Its health.
    pub health: Health,
}

#[derive(Debug, Default)]
struct Board {
    /// Bumped after each publication, read without the lock.
    version: AtomicU64,
    entries: Mutex<Vec<BoardEntry>>,
}

/// The health of one route's live backends, written by the event loop that probes them and read
/// by the others (at their next pick) and by `/metrics`. A cheap handle: clones share the board.
/// Readers take the lock only after the version moved, so a loop's pick costs one atomic load.
#[derive(Clone, Default)]
pub struct HealthBoard(Arc<Board>);

impl HealthBoard {
    /// Every live backend with its health, in the prober's slot order; empty until the prober's
    /// loop has started.
    pub fn entries(&self) -> Vec<BoardEntry> {
        self.lock().clone()
    }

    fn version(&self) -> u64 {
        self.0.version.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BoardEntry>> {
        self.0
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, entries: Vec<BoardEntry>) {
        *self.lock() = entries;
        self.0.version.fetch_add(1, Ordering::Release);
    }
}

/// Not part of the configuration: two specs are equal whatever their boards.
impl PartialEq for HealthBoard {
    fn eq(&self, _: &HealthBoard) -> bool {
        true
    }
}

impl Eq for HealthBoard {}

impl fmt::Debug for HealthBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthBoard")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

/// Whether a set probes its backends (and publishes their health) or follows the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The first event loop's set: its [`Prober`] probes, it publishes.
    Prober,
    /// Another loop's set: takes each backend's health from the board, last seen at `seen`.
    Follower { seen: u64 },
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeFailure {
    /// The connect failed (refused, unreachable, reset...).
    Connect(io::Error),
    /// No answer within the health check timeout.
    TimedOut(Duration),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Connect(e) => write!(f, "{e}"),
            ProbeFailure::TimedOut(t) => write!(f, "no connection after {t:?}"),
        }
    }
}

/// The backends of one route on one event loop. No I/O: the loop connects, the [`Prober`] probes,
/// the [`Resolver`] resolves; this only keeps the books.
#[derive(Debug)]
pub struct UpstreamSet {
    /// Route name, for logs.
    route: String,
    policy: Policy,
    /// `connect_attempts` as configured; `None`: min(3, live addresses).
    attempts: Option<usize>,
    check: Option<HealthCheck>,
    /// Target names in config order: the first element of a backend's `rank`.
    names: Vec<String>,
    /// What each name resolves to now, indexed like `names`: an address two names share
    /// stays while either still resolves to it.
    resolved: Vec<Vec<SocketAddr>>,
    backends: Vec<Backend>,
    /// Round-robin position: the next index to consider.
    cursor: usize,
    /// Shared with the sets of the same route on the other event loops.
    board: HealthBoard,
    role: Role,
}

impl UpstreamSet {
    /// The backends of `spec`, all `UP`, none active.
    pub fn new(route: &str, spec: &UpstreamSpec) -> UpstreamSet {
        let mut backends: Vec<Backend> = Vec::new();
        for (i, t) in spec.targets.iter().enumerate() {
            for (j, &addr) in t.addrs.iter().enumerate() {
                if !backends.iter().any(|b| b.addr == addr) {
                    backends.push(Backend::new(addr, &t.name, (i, j)));
                }
            }
        }
        UpstreamSet {
            route: route.to_string(),
            policy: spec.policy,
            attempts: spec.connect_attempts.map(|n| n.max(1)),
            check: spec.health_check,
            names: spec.targets.iter().map(|t| t.name.clone()).collect(),
            resolved: spec.targets.iter().map(|t| t.addrs.clone()).collect(),
            backends,
            cursor: 0,
            board: spec.board.clone(),
            role: Role::Prober,
        }
    }

    /// The set of event loop `index`: the first loop's probes and publishes (from now: `/metrics`
    /// lists its backends), the others follow the board. [`UpstreamSet::new`] makes a set that
    /// probes and has published nothing yet.
    pub fn on_worker(mut self, index: usize) -> UpstreamSet {
        if index == 0 {
            self.publish();
        } else {
            self.role = Role::Follower { seen: 0 };
            self.follow();
        }
        self
    }

    /// True when this set's health comes from its own probes (see [`UpstreamSet::on_worker`]).
    pub fn probes(&self) -> bool {
        self.role == Role::Prober
    }

    /// Puts every live backend's health on the board, if this set is the prober's.
    fn publish(&self) {
        if self.role != Role::Prober || self.check.is_none() {
            return;
        }
        let entries = (self.backends.iter().filter(|b| b.live))
            .map(|b| BoardEntry {
                name: b.name.clone(),
                addr: b.addr,
                health: b.health.health(),
            })
            .collect();
        self.board.publish(entries);
    }

    /// Takes each backend's health from the board when it changed since last time, if this set
    /// follows it. A backend the board does not list (yet) stays as it is.
    fn follow(&mut self) {
        let Role::Follower { seen } = &mut self.role else {
            return;
        };
        if self.check.is_none() || self.board.version() == *seen {
            return;
        }
        // Read the version first: a publication racing this read is seen again next time.
        *seen = self.board.version();
        let entries = self.board.lock();
        for b in self.backends.iter_mut().filter(|b| b.live) {
            if let Some(e) = entries.iter().find(|e| e.addr == b.addr) {
                b.health.health = e.health;
            }
        }
    }

    /// The route name.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// The selection policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Connects allowed per client, counting the first.
    pub fn connect_attempts(&self) -> usize {
        self.attempts
            .unwrap_or_else(|| self.backends.iter().filter(|b| b.live).count().clamp(1, 3))
    }

    /// The health check settings, if checks are on.
    pub fn health_check(&self) -> Option<HealthCheck> {
        self.check
    }

    /// The backend at `idx` (also retired ones still counted as active).
    pub fn backend(&self, idx: usize) -> Option<&Backend> {
        self.backends.get(idx)
    }

    /// Every slot with its index, retired ones included (see [`Backend::is_live`]).
    pub fn backends(&self) -> impl Iterator<Item = (usize, &Backend)> {
        self.backends.iter().enumerate()
    }

    /// The backend for a new client, per policy, skipping `DOWN` ones unless all are down.
    /// `None` only when the route has no live backend at all.
    pub fn pick(&mut self) -> Option<usize> {
        self.choose(&[])
    }

    /// The backend to retry after the connects to `tried` failed (in order; `tried` includes the
    /// first pick). `None` when `connect_attempts` are used up or every live backend was tried.
    pub fn next_after_failure(&mut self, tried: &[usize]) -> Option<usize> {
        if tried.len() >= self.connect_attempts() {
            return None;
        }
        self.choose(tried)
    }

    /// A connect to `idx` started: it counts for `least_connections` until [`UpstreamSet::on_close`].
    pub fn on_open(&mut self, idx: usize) {
        if let Some(b) = self.backends.get_mut(idx) {
            b.active += 1;
        }
    }

    /// The upstream socket opened by [`UpstreamSet::on_open`] is gone (failed connect or closed pair).
    pub fn on_close(&mut self, idx: usize) {
        if let Some(b) = self.backends.get_mut(idx) {
            debug_assert!(b.active > 0, "on_close without on_open for {}", b.addr);
            b.active = b.active.saturating_sub(1);
        }
    }

    fn choose(&mut self, exclude: &[usize]) -> Option<usize> {
        self.follow();
        let n = self.backends.len();
        let eligible = |i: usize, b: &Backend| b.live && !exclude.contains(&i);
        let any_up = self
            .backends
            .iter()
            .enumerate()
            .any(|(i, b)| eligible(i, b) && b.health.is_up());
        let candidate = |i: usize, b: &Backend| eligible(i, b) && (b.health.is_up() || !any_up);
        let rotation = (0..n).map(|o| (self.cursor + o) % n);
        let chosen = match self.policy {
            Policy::First => self
                .backends
                .iter()
                .enumerate()
                .filter(|&(i, b)| candidate(i, b))
                .min_by_key(|(_, b)| b.rank)
                .map(|(i, _)| i),
            Policy::RoundRobin => rotation.clone().find(|&i| candidate(i, &self.backends[i])),
            // `min_by_key` keeps the first minimum: ties go to the next one in rotation.
            Policy::LeastConnections => rotation
                .filter(|&i| candidate(i, &self.backends[i]))
                .min_by_key(|&i| self.backends[i].active),
        }?;
        if !any_up {
            debug!(
                "route `{}`: every upstream is DOWN; trying {} anyway",
                self.route, self.backends[chosen].addr
            );
        }
        self.cursor = (chosen + 1) % n;
        Some(chosen)
    }

    /// Applies a DNS answer for the target `name`: addresses that stay keep their health and counts,
    /// new ones start `UP`, vanished ones are retired (their slot is reused once idle). An empty list
    /// or an unknown name changes nothing. Returns true when the set changed.
    pub fn replace_addresses(&mut self, name: &str, addrs: &[SocketAddr]) -> bool {
        let Some(pos) = self.names.iter().position(|n| n == name) else {
            warn!(
                "route `{}`: address update for unknown upstream {name}",
                self.route
            );
            return false;
        };
        if addrs.is_empty() {
            warn!(
                "route `{}`: upstream {name} resolved to no address; keeping the old ones",
                self.route
            );
            return false;
        }
        self.resolved[pos] = addrs.to_vec();
        let mut removed = Vec::new();
        let mut moved = false;
        for b in self.backends.iter_mut() {
            if b.live && b.name == name && !addrs.contains(&b.addr) {
                // Another name that still resolves to it keeps it (the first such, in config
                // order), with its health and counts.
                let other = (self.resolved.iter().enumerate())
                    .filter(|&(k, _)| k != pos)
                    .find_map(|(k, list)| Some((k, list.iter().position(|&a| a == b.addr)?)));
                match other {
                    Some((k, j)) => {
                        b.name = self.names[k].clone();
                        b.rank = (k, j);
                        moved = true;
                    }
                    None => {
                        b.live = false;
                        removed.push(b.addr);
                    }
                }
            }
        }
        let mut added = Vec::new();
        for (j, &addr) in addrs.iter().enumerate() {
            if let Some(b) = self.backends.iter_mut().find(|b| b.addr == addr) {
                if b.live && b.name != name {
                    continue; // Also resolved from another name, which keeps it.
                }
                if !b.live {
                    added.push(addr);
                }
                b.live = true;
                b.name = name.to_string();
                b.rank = (pos, j);
                continue;
            }
            added.push(addr);
            let fresh = Backend::new(addr, name, (pos, j));
            match self.backends.iter().position(|b| !b.live && b.active == 0) {
                Some(slot) => self.backends[slot] = fresh,
                None => self.backends.push(fresh),
            }
        }
        // An address passed to another name is published too: `/metrics` labels it by name.
        let changed = !added.is_empty() || !removed.is_empty() || moved;
        if changed {
            self.publish();
            debug!(
                "route `{}`: upstream {name} now resolves to {} (added {}; removed {})",
                self.route,
                list(addrs),
                list(&added),
                list(&removed)
            );
        }
        changed
    }

    /// Counts a probe of `addr` at `idx`; logs, publishes and returns the new health when it
    /// changed. Ignored when checks are off, the slot no longer holds `addr`, or this set follows
    /// the board.
    pub fn report_probe(
        &mut self,
        idx: usize,
        addr: SocketAddr,
        result: Result<(), &ProbeFailure>,
    ) -> Option<Health> {
        let check = self.check?;
        if self.role != Role::Prober {
            return None;
        }
        let b = self
            .backends
            .get_mut(idx)
            .filter(|b| b.live && b.addr == addr)?;
        let changed = b.health.record(result.is_ok(), check.rise, check.fall)?;
        match (changed, result) {
            (Health::Down, Err(why)) => info!(
                "route `{}`: upstream {} ({addr}) is DOWN after {} failed probe(s), last: {why}",
                self.route, b.name, check.fall
            ),
            _ => info!(
                "route `{}`: upstream {} ({addr}) is {changed} after {} good probe(s)",
                self.route, b.name, check.rise
            ),
        }
        self.publish();
        Some(changed)
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    if addrs.is_empty() {
        return "none".to_string();
    }
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Probe counters of one [`Prober`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Probes started.
    pub started: u64,
    /// Probes that connected.
    pub succeeded: u64,
    /// Probes that failed or timed out.
    pub failed: u64,
}

/// One probe in flight.
#[derive(Debug)]
struct Probe {
    idx: usize,
    addr: SocketAddr,
    stream: TcpStream,
    deadline: Instant,
}

/// Active health checks of one [`UpstreamSet`], driven by the event loop.
///
/// Each in-flight probe is a non-blocking connect registered under `Token(base + k)`, `k <
/// capacity`. The loop calls [`Prober::tick`] every iteration (starts due probes, expires late ones),
/// routes events of [`Prober::tokens`] to [`Prober::on_event`], and bounds its poll timeout by
/// [`Prober::next_deadline`].
#[derive(Debug)]
pub struct Prober {
    check: HealthCheck,
    base: usize,
    /// In-flight probes by token offset; the length is the capacity.
    slots: Vec<Option<Probe>>,
    /// Per backend index: the address scheduled and when its next probe starts.
    schedule: Vec<Option<(SocketAddr, Instant)>>,
    stats: ProbeStats,
    /// Sent once a probe connects, before it closes: the route's PROXY protocol header for a
    /// connection of the proxy's own (see [`crate::proxy_protocol::encode_local`]), so that a
    /// backend expecting one does not log each probe as a broken connection.
    greeting: Vec<u8>,
}

impl Prober {
    /// A prober for `set`, or `None` when the route has no health check or the set follows another
    /// loop's probes ([`UpstreamSet::probes`]). At most `capacity` (at least 1) probes run at once;
    /// they use tokens `base .. base + capacity`.
    pub fn for_set(set: &UpstreamSet, base: usize, capacity: usize) -> Option<Prober> {
        let check = set.health_check().filter(|_| set.probes())?;
        Some(Prober {
            greeting: Vec::new(),
            check,
            base,
            slots: (0..capacity.max(1)).map(|_| None).collect(),
            schedule: Vec::new(),
            stats: ProbeStats::default(),
        })
    }

    /// The tokens this prober registers sockets under.
    pub fn tokens(&self) -> Range<usize> {
        self.base..self.base + self.slots.len()
    }

    /// True when `token` is one of [`Prober::tokens`].
    pub fn owns(&self, token: Token) -> bool {
        self.tokens().contains(&token.0)
    }

    /// Counters so far.
    pub fn stats(&self) -> ProbeStats {
        self.stats
    }

    /// The backends whose probe is due at `now` and not running, at most as many as there are free
    /// slots. Also brings the schedule in line with `set`: a new or re-resolved address is due at once,
    /// a retired one is forgotten.
    pub fn due(&mut self, set: &UpstreamSet, now: Instant) -> Vec<(usize, SocketAddr)> {
        self.schedule.resize(set.backends.len(), None);
        for (idx, b) in set.backends() {
            let entry = &mut self.schedule[idx];
            match entry {
                _ if !b.is_live() => *entry = None,
                Some((addr, _)) if *addr == b.addr() => {}
                _ => *entry = Some((b.addr(), now)),
            }
        }
        let free = self.slots.iter().filter(|s| s.is_none()).count();
        let mut due: Vec<(Instant, usize, SocketAddr)> = self
            .schedule
            .iter()
            .enumerate()
            .filter_map(|(idx, e)| e.map(|(addr, at)| (at, idx, addr)))
            .filter(|&(at, idx, _)| at <= now && !self.in_flight(idx))
            .collect();
        due.sort();
        due.truncate(free);
        due.into_iter().map(|(_, idx, addr)| (idx, addr)).collect()
    }

    fn in_flight(&self, idx: usize) -> bool {
        self.slots.iter().flatten().any(|p| p.idx == idx)
    }

    /// Starts a probe of backend `idx` at `addr` (from [`Prober::due`]). A connect that fails at once
    /// counts as a failed probe, except for local resource exhaustion (out of descriptors), which is
    /// not the backend's fault: that probe is skipped until the next interval.
    pub fn start_probe(
        &mut self,
        registry: &Registry,
        set: &mut UpstreamSet,
        idx: usize,
        addr: SocketAddr,
        now: Instant,
    ) {
        if let Some(Some((_, at))) = self.schedule.get_mut(idx) {
            *at = now + self.check.interval;
        }
        let Some(k) = self.slots.iter().position(Option::is_none) else {
            return;
        };
        self.stats.started += 1;
        // mio's connect is non-blocking: EINPROGRESS comes back as Ok, completion as an event.
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) if crate::net::is_resource_exhaustion(&e) => {
                warn!(
                    "route `{}`: cannot probe {addr}: {e}; skipping this probe",
                    set.route()
                );
                return;
            }
            Err(e) => {
                self.stats.failed += 1;
                set.report_probe(idx, addr, Err(&ProbeFailure::Connect(e)));
                return;
            }
        };
        if let Err(e) = registry.register(
            &mut stream,
            Token(self.base + k),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(
                "route `{}`: cannot register the probe of {addr}: {e}",
                set.route()
            );
            return;
        }
        self.slots[k] = Some(Probe {
            idx,
            addr,
            stream,
            deadline: now + self.check.timeout,
        });
    }

    /// Starts every due probe and fails every late one. Call once per loop iteration, before computing
    /// the poll timeout (and after applying DNS updates, so new addresses are probed at once).
    pub fn tick(&mut self, registry: &Registry, set: &mut UpstreamSet, now: Instant) {
        self.on_timeout(registry, set, now);
        for (idx, addr) in self.due(set, now) {
            self.start_probe(registry, set, idx, addr, now);
        }
    }

    /// An event for one of [`Prober::tokens`]: checks whether the connect finished, the way mio
    /// documents for `TcpStream::connect` (`take_error`, then `peer_addr`; `NotConnected` means not yet).
    pub fn on_event(&mut self, registry: &Registry, token: Token, set: &mut UpstreamSet) {
        let Some(k) = token.0.checked_sub(self.base) else {
            return;
        };
        let Some(Some(probe)) = self.slots.get(k) else {
            return; // A late or spurious event for a probe already finished.
        };
        let result = match probe.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(ProbeFailure::Connect(e)),
            Ok(None) => match probe.stream.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => Err(ProbeFailure::Connect(e)),
            },
        };
        self.finish(registry, set, k, result);
    }

    /// Fails every probe whose timeout passed at `now`.
    pub fn on_timeout(&mut self, registry: &Registry, set: &mut UpstreamSet, now: Instant) {
        for k in 0..self.slots.len() {
            if self.slots[k].as_ref().is_some_and(|p| p.deadline <= now) {
                let why = ProbeFailure::TimedOut(self.check.timeout);
                self.finish(registry, set, k, Err(why));
            }
        }
    }

    fn finish(
        &mut self,
        registry: &Registry,
        set: &mut UpstreamSet,
        k: usize,
        result: Result<(), ProbeFailure>,
    ) {
        let Some(mut probe) = self.slots[k].take() else {
            return;
        };
        let _ = registry.deregister(&mut probe.stream);
        if result.is_ok() {
            self.stats.succeeded += 1;
            let greeted = !self.greeting.is_empty()
                && (&probe.stream).write(&self.greeting).ok() == Some(self.greeting.len());
            if !greeted {
                // Close with RST: the probe leaves no TIME_WAIT socket behind on either host.
                // After a greeting, a FIN: a reset could discard it before the backend reads
                // it.
                let _ = crate::net::set_linger_zero(&probe.stream);
            }
        } else {
            self.stats.failed += 1;
        }
        debug!(
            "route {}: probe of {}: {}",
            set.route(),
            probe.addr,
            match &result {
                Ok(()) => "connected".to_string(),
                Err(e) => e.to_string(),
            }
        );
        set.report_probe(probe.idx, probe.addr, result.as_ref().map(|_| ()));
    }

    /// Probes send `greeting` once connected (the route's PROXY protocol header; empty: none).
    pub fn set_greeting(&mut self, greeting: Vec<u8>) {
        self.greeting = greeting;
    }

    /// When the loop must call [`Prober::tick`] next: the earliest probe timeout or, when a slot is
    /// free, the earliest scheduled probe.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeouts = self.slots.iter().flatten().map(|p| p.deadline);
        let free = self.slots.iter().any(Option::is_none);
        let starts = self
            .schedule
            .iter()
            .enumerate()
            .filter(|&(idx, _)| free && !self.in_flight(idx))
            .filter_map(|(_, e)| e.map(|(_, at)| at));
        timeouts.chain(starts).min()
    }

    /// Deregisters and drops every probe in flight (at shutdown).
    pub fn stop(&mut self, registry: &Registry) {
        for probe in self.slots.iter_mut().filter_map(Option::take) {
            let mut stream = probe.stream;
            let _ = registry.deregister(&mut stream);
        }
    }
}

/// A changed DNS answer, sent by the [`Resolver`] to each event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressUpdate {
    /// Index of the route in `Config::routes`.
    pub route: usize,
    /// The target name as written (`host:port`).
    pub name: String,
    /// The new addresses; pass to [`UpstreamSet::replace_addresses`].
    pub addrs: Vec<SocketAddr>,
}

/// One name to re-resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveTarget {
    /// Index of the route in `Config::routes`.
    pub route: usize,
    /// The route's name, for logs.
    pub route_name: String,
    /// `host:port` as written.
    pub name: String,
    /// How often.
    pub interval: Duration,
    /// The addresses known now (an update is sent only when the set of addresses differs).
    pub current: Vec<SocketAddr>,
    /// Why the last lookup failed, while it fails: a failure is warned about when it starts or
    /// its reason changes, not at every interval.
    pub failing: Option<String>,
}

impl ResolveTarget {
    /// A lookup failed for `why`; true when that is news (it was not failing, or failed
    /// otherwise), to be warned about: not at every interval.
    fn failed(&mut self, why: &str) -> bool {
        let news = self.failing.as_deref() != Some(why);
        self.failing = Some(why.to_string());
        news
    }

    /// A lookup succeeded; true when it had been failing.
    fn recovered(&mut self) -> bool {
        self.failing.take().is_some()
    }

    /// Every host name of every route with a `resolve_interval` (IP literals need no lookup).
    pub fn from_routes(routes: &[Route]) -> Vec<ResolveTarget> {
        let mut out = Vec::new();
        for (route, r) in routes.iter().enumerate() {
            let Some(interval) = r.upstream_set.resolve_interval else {
                continue;
            };
            for t in r.upstream_set.targets.iter().filter(|t| !t.is_literal()) {
                out.push(ResolveTarget {
                    route,
                    route_name: r.name.clone(),
                    name: t.name.clone(),
                    interval,
                    current: t.addrs.clone(),
                    failing: None,
                });
            }
        }
        out
    }
}

/// Where the [`Resolver`] sends updates: one per event loop.
#[derive(Clone)]
pub struct Subscriber {
    /// The loop's end of the update channel.
    pub updates: Sender<AddressUpdate>,
    /// Wakes the loop after updates were sent (e.g. a `mio::Waker`).
    pub wake: Arc<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber").finish_non_exhaustive()
    }
}

/// How long [`Resolver::stop`] waits for a lookup in progress before leaving the thread to finish alone.
const RESOLVER_STOP_WAIT: Duration = Duration::from_secs(1);

/// The DNS re-resolution thread. Dropping it (or [`Resolver::stop`]) stops the thread: it waits on a
/// channel between lookups, so it exits at once unless a lookup is in progress.
#[derive(Debug)]
pub struct Resolver {
    /// Dropped to stop the thread (its `recv_timeout` returns `Disconnected`).
    stop: Option<Sender<()>>,
    /// Disconnected when the thread has exited.
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    /// Starts the thread, or returns `None` when there is nothing to re-resolve.
    pub fn start(
        targets: Vec<ResolveTarget>,
        subscribers: Vec<Subscriber>,
    ) -> io::Result<Option<Resolver>> {
        if targets.is_empty() || subscribers.is_empty() {
            return Ok(None);
        }
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tcptap-resolve".to_string())
            .spawn(move || {
                let _done = done_tx; // Dropped when the thread ends, even by panic.
                resolve_loop(targets, subscribers, &stop_rx);
            })?;
        Ok(Some(Resolver {
            stop: Some(stop_tx),
            done: done_rx,
            thread: Some(thread),
        }))
    }

    /// Stops the thread and waits for it (at most about a second, if a lookup is in progress).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        match self.done.recv_timeout(RESOLVER_STOP_WAIT) {
            Err(RecvTimeoutError::Timeout) => {
                debug!("resolver: a lookup is still running; not waiting for it");
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    warn!("resolver: the thread panicked");
                }
            }
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn resolve_loop(
    mut targets: Vec<ResolveTarget>,
    mut subscribers: Vec<Subscriber>,
    stop: &Receiver<()>,
) {
    let start = Instant::now();
    let mut next: Vec<Instant> = targets.iter().map(|t| start + t.interval).collect();
    loop {
        let now = Instant::now();
        let Some(&soonest) = next.iter().min() else {
            return;
        };
        if soonest > now {
            match stop.recv_timeout(soonest - now) {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let mut sent = false;
        for (t, at) in targets.iter_mut().zip(next.iter_mut()) {
            if *at > now {
                continue;
            }
            if !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
                return;
            }
            let found = lookup(&t.name);
            *at = Instant::now() + t.interval;
            let failure = match found {
                Ok(a) if !a.is_empty() => Ok(a),
                Ok(_) => Err("it resolves to no address".to_string()),
                Err(e) => Err(format!("cannot resolve it: {e}")),
            };
            let addrs = match failure {
                Ok(addrs) => {
                    if t.recovered() {
                        info!(
                            "route `{}`: {} resolves again, to {}",
                            t.route_name,
                            t.name,
                            list(&addrs)
                        );
                    }
                    addrs
                }
                Err(why) => {
                    if t.failed(&why) {
                        warn!(
                            "route `{}`: {}: {why}; keeping its addresses {} (said again only \
                             if this changes)",
                            t.route_name,
                            t.name,
                            list(&t.current)
                        );
                    } else {
                        debug!("route `{}`: {}: {why}", t.route_name, t.name);
                    }
                    continue;
                }
            };
            if same_set(&addrs, &t.current) {
                continue;
            }
            t.current = addrs.clone();
            let update = AddressUpdate {
                route: t.route,
                name: t.name.clone(),
                addrs,
            };
            // A loop that has gone away dropped its receiver: forget it.
            subscribers.retain(|s| s.updates.send(update.clone()).is_ok());
            sent = true;
        }
        if subscribers.is_empty() {
            return;
        }
        if sent {
            for s in &subscribers {
                (s.wake)();
            }
        }
    }
}

/// Resolves `host:port` (blocking: only on the resolver thread), each address once, in resolver order.
fn lookup(name: &str) -> io::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in name.to_socket_addrs()? {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Order-insensitive comparison: DNS servers rotate their answers.
fn same_set(a: &[SocketAddr], b: &[SocketAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mio::{Events, Poll};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn spec(policy: Policy, ports: &[u16], check: Option<HealthCheck>) -> UpstreamSpec {
        UpstreamSpec {
            targets: ports
                .iter()
                .map(|&p| UpstreamTarget {
                    name: addr(p).to_string(),
                    addrs: vec![addr(p)],
                })
                .collect(),
            policy,
            health_check: check,
            ..UpstreamSpec::default()
        }
    }

    const CHECK: HealthCheck = HealthCheck {
        interval: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        rise: 2,
        fall: 3,
    };

    /// A set whose backend `down` was taken out of rotation by `fall` failed probes.
    fn set_with_down(policy: Policy, ports: &[u16], down: &[usize]) -> UpstreamSet {
        let mut set = UpstreamSet::new("r", &spec(policy, ports, Some(CHECK)));
        let why = ProbeFailure::TimedOut(CHECK.timeout);
        for &i in down {
            for _ in 0..CHECK.fall {
                set.report_probe(i, addr(ports[i]), Err(&why));
            }
            assert_eq!(set.backend(i).unwrap().health(), Health::Down);
        }
        set
    }

    #[test]
    fn test_health_up_down_up() {
        let mut h = HealthState::default();
        assert!(h.is_up());
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), None, "a success resets the failures");
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(Health::Down));
        assert_eq!(h.record(false, 2, 3), None, "already down");
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(
            h.record(false, 2, 3),
            None,
            "a failure resets the successes"
        );
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), Some(Health::Up));
        assert_eq!(h.health().to_string(), "UP");
        let mut h = HealthState::default();
        assert_eq!(h.record(false, 0, 0), Some(Health::Down), "0 counts as 1");
    }

    #[test]
    fn test_round_robin_skips_down() {
        let mut set = UpstreamSet::new("r", &spec(Policy::RoundRobin, &[1, 2, 3], None));
        let picks: Vec<_> = (0..6).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let mut set = set_with_down(Policy::RoundRobin, &[1, 2, 3], &[1]);
        let picks: Vec<_> = (0..4).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn test_all_down_still_picks() {
        let mut set = set_with_down(Policy::RoundRobin, &[1, 2], &[0, 1]);
        let picks: Vec<_> = (0..3).filter_map(|_| set.pick()).collect();
        assert_eq!(picks, [0, 1, 0]);
        let mut set = set_with_down(Policy::First, &[1, 2], &[0, 1]);
        assert_eq!(set.pick(), Some(0));
        let mut empty = UpstreamSet::new("r", &UpstreamSpec::default());
        assert_eq!(empty.pick(), None);
    }

    #[test]
    fn test_first_fails_over_in_order() {
        let mut set = set_with_down(Policy::First, &[1, 2, 3], &[]);
        assert_eq!((set.pick(), set.pick()), (Some(0), Some(0)));
        let mut set = set_with_down(Policy::First, &[1, 2, 3], &[0]);
        assert_eq!((set.pick(), set.pick()), (Some(1), Some(1)));
        let ok = Ok(());
        set.report_probe(0, addr(1), ok);
        assert_eq!(set.pick(), Some(1), "one good probe is not enough (rise 2)");
        assert_eq!(set.report_probe(0, addr(1), ok), Some(Health::Up));
        assert_eq!(set.pick(), Some(0), "back first once up");
    }

    #[test]
    fn test_least_connections() {
        let mut set = UpstreamSet::new("r", &spec(Policy::LeastConnections, &[1, 2, 3], None));
        let a = set.pick().unwrap();
        set.on_open(a);
        let b = set.pick().unwrap();
        set.on_open(b);
        let c = set.pick().unwrap();
        set.on_open(c);
        let mut first = [a, b, c];
        first.sort();
        assert_eq!(first, [0, 1, 2], "ties spread over all");
        set.on_close(1);
        assert_eq!(set.pick(), Some(1), "the one with fewest connections");
        set.on_open(1);
        set.on_open(1);
        set.on_close(0);
        assert_eq!(set.pick(), Some(0));
        assert_eq!(set.backend(1).unwrap().active(), 2);
    }

    #[test]
    fn test_retry_is_bounded() {
        let mut s = spec(Policy::RoundRobin, &[1, 2, 3, 4], None);
        s.connect_attempts = Some(3);
        let mut set = UpstreamSet::new("r", &s);
        let mut tried = vec![set.pick().unwrap()];
        while let Some(next) = set.next_after_failure(&tried) {
            assert!(!tried.contains(&next), "each backend at most once");
            tried.push(next);
            assert!(tried.len() <= 4);
        }
        assert_eq!(tried, [0, 1, 2]);
        // More attempts than backends: every backend once, then none.
        s.connect_attempts = Some(10);
        let mut set = UpstreamSet::new("r", &s);
        let mut tried = vec![set.pick().unwrap()];
        while let Some(next) = set.next_after_failure(&tried) {
            tried.push(next);
            assert!(tried.len() <= 4);
        }
        assert_eq!(tried.len(), 4);
        // Retries prefer healthy backends, then fall back to the down ones.
        let mut set = set_with_down(Policy::First, &[1, 2, 3], &[1]);
        assert_eq!(set.pick(), Some(0));
        assert_eq!(set.next_after_failure(&[0]), Some(2));
        assert_eq!(set.next_after_failure(&[0, 2]), Some(1));
    }

    /// Target `name` resolving to `addr(p)` for each of `ports`, in that order.
    fn t(name: &str, ports: &[u16]) -> UpstreamTarget {
        UpstreamTarget {
            name: name.into(),
            addrs: ports.iter().map(|&p| addr(p)).collect(),
        }
    }

    #[test]
    fn targets_resolving_to_the_same_addresses_in_another_order_are_equal() {
        assert_eq!(t("a:80", &[1, 2, 3]), t("a:80", &[3, 1, 2]));
        assert_ne!(t("a:80", &[1, 2, 3]), t("a:80", &[1, 2]));
        assert_ne!(t("a:80", &[1, 2]), t("b:80", &[1, 2]));
        let spec = |targets| UpstreamSpec {
            targets,
            ..UpstreamSpec::default()
        };
        assert_eq!(
            spec(vec![t("a:80", &[1, 2]), t("b:80", &[3])]),
            spec(vec![t("a:80", &[2, 1]), t("b:80", &[3])])
        );
    }

    /// Two names resolving to one address share one backend, kept while either still resolves
    /// to it: when the name it was filed under moves, the other keeps it, health and counts.
    #[test]
    fn an_address_two_names_share_stays_while_either_resolves_to_it() {
        let s = UpstreamSpec {
            targets: vec![t("a.test:80", &[1]), t("b.test:80", &[1])],
            health_check: Some(CHECK),
            ..UpstreamSpec::default()
        };
        let mut set = UpstreamSet::new("r", &s);
        assert_eq!(set.backends().count(), 1);
        set.on_open(0);
        // `a` moves; `b` still resolves to addr(1).
        assert!(set.replace_addresses("a.test:80", &[addr(2)]));
        let live: Vec<SocketAddr> = (set.backends())
            .filter(|(_, b)| b.is_live())
            .map(|(_, b)| b.addr())
            .collect();
        assert_eq!(live.len(), 2, "{live:?}");
        assert!(
            live.contains(&addr(1)) && live.contains(&addr(2)),
            "{live:?}"
        );
        let kept = set.backend(0).unwrap();
        assert_eq!(
            (kept.addr(), kept.active()),
            (addr(1), 1),
            "the same backend"
        );
        // Published under the name that keeps it (`/metrics` labels it so).
        let named: Vec<(String, SocketAddr)> = (s.board.entries().into_iter())
            .map(|e| (e.name, e.addr))
            .collect();
        assert!(named.contains(&("b.test:80".into(), addr(1))), "{named:?}");
        // Now `b` moves too: addr(1) goes.
        assert!(set.replace_addresses("b.test:80", &[addr(3)]));
        assert!(!set.backend(0).unwrap().is_live());
    }

    /// An address that passes to another name, with nothing else changing, is published under
    /// that name (`/metrics` labels backends by the name they were resolved from).
    #[test]
    fn an_address_passed_to_another_name_is_published_under_it() {
        let s = UpstreamSpec {
            targets: vec![t("a.test:80", &[1]), t("b.test:80", &[1, 2])],
            health_check: Some(CHECK),
            ..UpstreamSpec::default()
        };
        let mut set = UpstreamSet::new("r", &s);
        // `a` now resolves to addr(2) only, which `b` owns; `b` still resolves to addr(1).
        assert!(set.replace_addresses("a.test:80", &[addr(2)]));
        let named: Vec<(String, SocketAddr)> = (s.board.entries().into_iter())
            .map(|e| (e.name, e.addr))
            .collect();
        assert!(named.contains(&("b.test:80".into(), addr(1))), "{named:?}");
        assert!(!named.iter().any(|(n, _)| n == "a.test:80"), "{named:?}");
    }

    #[test]
    fn test_replace_addresses_keeps_state() {
        let name = "backend.test:80";
        let s = UpstreamSpec {
            targets: vec![UpstreamTarget {
                name: name.into(),
                addrs: vec![addr(1), addr(2)],
            }],
            health_check: Some(CHECK),
            ..UpstreamSpec::default()
        };
        let mut set = UpstreamSet::new("r", &s);
        set.on_open(0);
        set.on_open(1);
        let why = ProbeFailure::TimedOut(CHECK.timeout);
        for _ in 0..CHECK.fall {
            set.report_probe(1, addr(2), Err(&why));
        }
        // addr(1) goes away, addr(2) stays, addr(3) is new.
        assert!(set.replace_addresses(name, &[addr(2), addr(3)]));
        let b1 = set.backend(1).unwrap();
        assert_eq!(
            (b1.addr(), b1.health(), b1.active()),
            (addr(2), Health::Down, 1)
        );
        let b0 = set.backend(0).unwrap();
        assert!(
            !b0.is_live() && b0.active() == 1,
            "retired but still counted"
        );
        assert_eq!(set.backend(2).unwrap().addr(), addr(3), "slot 0 is busy");
        assert!(set.backend(2).unwrap().is_live());
        for _ in 0..4 {
            assert_ne!(set.pick(), Some(0), "retired is never picked");
        }
        // Probe results for the retired slot are ignored.
        assert_eq!(set.report_probe(0, addr(1), Err(&why)), None);
        // Once idle, the retired slot is reused.
        set.on_close(0);
        assert!(set.replace_addresses(name, &[addr(2), addr(3), addr(4)]));
        assert_eq!(set.backend(0).unwrap().addr(), addr(4));
        assert!(set.backend(0).unwrap().is_live());
        assert_eq!(set.backends().count(), 3);
        // No change, unknown name, empty answer: nothing happens.
        assert!(!set.replace_addresses(name, &[addr(4), addr(3), addr(2)]));
        assert!(!set.replace_addresses("other:80", &[addr(9)]));
        assert!(!set.replace_addresses(name, &[]));
        assert_eq!(set.backends().filter(|(_, b)| b.is_live()).count(), 3);
    }

    /// The default `connect_attempts`, min(3, addresses), follows re-resolution: a name that
    /// resolved to one address at startup and to two now fails over to the second.
    #[test]
    fn other_loops_follow_the_probing_loops_health() {
        let s = spec(Policy::RoundRobin, &[1, 2], Some(CHECK));
        let mut prober = UpstreamSet::new("r", &s).on_worker(0);
        // A loop that applies the route late still starts from what was published.
        let why = ProbeFailure::TimedOut(CHECK.timeout);
        for _ in 0..CHECK.fall {
            prober.report_probe(1, addr(2), Err(&why));
        }
        let mut late = UpstreamSet::new("r", &s.clone()).on_worker(1);
        assert_eq!(late.backend(1).unwrap().health(), Health::Down);
        assert!(!late.probes() && Prober::for_set(&late, 0, 4).is_none());
        // Its own probe results (it runs none, but say one arrived) count for nothing.
        for _ in 0..CHECK.rise {
            assert_eq!(late.report_probe(1, addr(2), Ok(())), None);
        }
        assert_eq!(
            (0..4).map(|_| late.pick().unwrap()).collect::<Vec<_>>(),
            [0; 4]
        );
        // Back up on the prober: the follower puts it back at its next pick.
        for _ in 0..CHECK.rise {
            prober.report_probe(1, addr(2), Ok(()));
        }
        let picks: Vec<usize> = (0..4).map(|_| late.pick().unwrap()).collect();
        assert!(picks.contains(&1), "{picks:?}");
        // The board lists every live backend, for /metrics.
        let names: Vec<(SocketAddr, Health)> = (s.board.entries().iter())
            .map(|e| (e.addr, e.health))
            .collect();
        assert_eq!(names, [(addr(1), Health::Up), (addr(2), Health::Up)]);
        // A retired address leaves it; a spec parsed anew (a reload) has a board of its own.
        let name = addr(2).to_string();
        assert!(prober.replace_addresses(&name, &[addr(3)]));
        let listed: Vec<SocketAddr> = s.board.entries().iter().map(|e| e.addr).collect();
        assert_eq!(listed, [addr(1), addr(3)]);
        let fresh = spec(Policy::RoundRobin, &[1, 2], Some(CHECK));
        assert!(fresh == s && fresh.board.entries().is_empty());
    }

    #[test]
    fn without_health_checks_nothing_is_published() {
        let s = spec(Policy::RoundRobin, &[1, 2], None);
        let mut set = UpstreamSet::new("r", &s).on_worker(0);
        assert!(set.replace_addresses(&addr(2).to_string(), &[addr(3)]));
        assert!(s.board.entries().is_empty());
    }

    #[test]
    fn default_attempts_follow_the_resolved_addresses() {
        let name = "backend.test:80";
        let s = UpstreamSpec {
            targets: vec![UpstreamTarget {
                name: name.into(),
                addrs: vec![addr(1)],
            }],
            ..UpstreamSpec::default()
        };
        let mut set = UpstreamSet::new("r", &s);
        let first = set.pick().unwrap();
        assert_eq!(set.next_after_failure(&[first]), None);
        assert!(set.replace_addresses(name, &[addr(1), addr(2)]));
        assert_eq!(set.connect_attempts(), 2);
        let first = set.pick().unwrap();
        assert!(set.next_after_failure(&[first]).is_some());
        assert!(set.replace_addresses(name, &[addr(1), addr(2), addr(3), addr(4)]));
        assert_eq!(set.connect_attempts(), 3);
        // Configured, it stays.
        let mut set = UpstreamSet::new(
            "r",
            &UpstreamSpec {
                connect_attempts: Some(1),
                ..s
            },
        );
        assert!(set.replace_addresses(name, &[addr(1), addr(2)]));
        let first = set.pick().unwrap();
        assert_eq!(set.next_after_failure(&[first]), None);
    }

    fn listener(at: SocketAddr) -> mio::net::TcpListener {
        let opts = crate::config::SocketOptions {
            nodelay: true,
            keepalive: None,
            recv_buffer_size: None,
            send_buffer_size: None,
        };
        crate::net::bind_listener("test", at, 64, false, false, None, &opts)
            .expect("bind a loopback listener")
    }

    /// Drives `prober` the way the event loop does until `done` holds (at most 10 s).
    fn drive(
        poll: &mut Poll,
        prober: &mut Prober,
        set: &mut UpstreamSet,
        listener: Option<&mio::net::TcpListener>,
        done: impl Fn(&UpstreamSet, &Prober) -> bool,
    ) {
        let mut events = Events::with_capacity(16);
        let end = Instant::now() + Duration::from_secs(10);
        for _ in 0..100_000 {
            let now = Instant::now();
            prober.tick(poll.registry(), set, now);
            if done(set, prober) {
                return;
            }
            assert!(now < end, "timed out; {:?}", prober.stats());
            let wait = prober
                .next_deadline()
                .map_or(end - now, |d| d.saturating_duration_since(now))
                .min(end - now);
            poll.poll(&mut events, Some(wait)).expect("poll");
            for e in events.iter() {
                assert!(prober.owns(e.token()), "unexpected token {:?}", e.token());
                prober.on_event(poll.registry(), e.token(), set);
            }
            // Keep the accept queue short; the accepted sockets are dropped at once.
            while let Some(l) = listener {
                if l.accept().is_err() {
                    break;
                }
            }
            if done(set, prober) {
                return;
            }
        }
        panic!("too many iterations; {:?}", prober.stats());
    }

    #[test]
    fn test_probe_down_after_fall_up_after_rise() {
        let mut poll = Poll::new().expect("poll");
        let live = listener(addr(0));
        let at = live.local_addr().expect("local addr");
        let mut set = UpstreamSet::new("r", &spec(Policy::RoundRobin, &[at.port()], Some(CHECK)));
        let mut prober = Prober::for_set(&set, 1000, 4).expect("checks are on");
        assert_eq!(prober.tokens(), 1000..1004);
        let up = |s: &UpstreamSet| s.backend(0).map(Backend::health) == Some(Health::Up);

        drive(&mut poll, &mut prober, &mut set, Some(&live), |_, p| {
            p.stats().succeeded >= 3
        });
        assert!(up(&set));
        assert_eq!(prober.stats().failed, 0);

        drop(live); // Now the port refuses.
        let before = prober.stats();
        drive(&mut poll, &mut prober, &mut set, None, |s, _| !up(s));
        let failed = prober.stats().failed - before.failed;
        assert!(failed >= u64::from(CHECK.fall), "{failed} failures");
        assert!(set.pick().is_some(), "all down: still picked");

        let back = listener(at); // SO_REUSEADDR: same port again.
        let before = prober.stats();
        drive(&mut poll, &mut prober, &mut set, Some(&back), |s, _| up(s));
        let ok = prober.stats().succeeded - before.succeeded;
        assert!(ok >= u64::from(CHECK.rise), "{ok} successes");
        prober.stop(poll.registry());
        assert_eq!(
            prober.next_deadline().map(|_| ()),
            Some(()),
            "still scheduled"
        );
    }

    #[test]
    fn test_probe_timeout() {
        let poll = Poll::new().expect("poll");
        let live = listener(addr(0));
        let at = live.local_addr().expect("local addr");
        let mut check = CHECK;
        check.fall = 1;
        let mut set = UpstreamSet::new("r", &spec(Policy::First, &[at.port()], Some(check)));
        let mut prober = Prober::for_set(&set, 0, 1).expect("checks are on");
        let now = Instant::now();
        assert_eq!(
            prober.due(&set, now),
            vec![(0, at)],
            "a new backend is due at once"
        );
        prober.tick(poll.registry(), &mut set, now);
        assert_eq!(prober.stats().started, 1);
        assert_eq!(prober.next_deadline(), Some(now + check.timeout));
        assert!(
            prober.due(&set, now + check.interval).is_empty(),
            "in flight"
        );
        // The loop never delivered the event: the probe times out.
        prober.on_timeout(poll.registry(), &mut set, now + check.timeout);
        assert_eq!(prober.stats().failed, 1);
        assert_eq!(set.backend(0).unwrap().health(), Health::Down);
        assert_eq!(prober.next_deadline(), Some(now + check.interval));
    }

    #[test]
    fn test_probes_limited_by_capacity() {
        let poll = Poll::new().expect("poll");
        let mut set = UpstreamSet::new("r", &spec(Policy::First, &[1, 2, 3], Some(CHECK)));
        let mut prober = Prober::for_set(&set, 0, 2).expect("checks are on");
        let now = Instant::now();
        assert_eq!(prober.due(&set, now).len(), 2);
        prober.tick(poll.registry(), &mut set, now);
        assert_eq!(prober.stats().started, 2);
        assert!(prober.due(&set, now).is_empty(), "no free slot");
        assert!(
            UpstreamSet::new("r", &spec(Policy::First, &[1], None))
                .health_check()
                .is_none()
        );
        assert!(
            Prober::for_set(
                &UpstreamSet::new("r", &spec(Policy::First, &[1], None)),
                0,
                1
            )
            .is_none()
        );
        prober.stop(poll.registry());
    }

    #[test]
    fn test_resolver_publishes_changes() {
        let (tx, rx) = mpsc::channel();
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&wakes);
        let target = ResolveTarget {
            route: 3,
            name: "localhost:4242".to_string(),
            interval: Duration::from_millis(10),
            current: vec!["192.0.2.1:4242".parse().unwrap()],
            route_name: "r".to_string(),
            failing: None,
        };
        let resolver = Resolver::start(
            vec![target],
            vec![Subscriber {
                updates: tx,
                wake: Arc::new(move || {
                    w.fetch_add(1, Ordering::SeqCst);
                }),
            }],
        )
        .expect("spawn")
        .expect("there is a target");
        let update = rx.recv_timeout(Duration::from_secs(10)).expect("an update");
        assert_eq!((update.route, update.name.as_str()), (3, "localhost:4242"));
        assert!(!update.addrs.is_empty());
        assert!(
            update
                .addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 4242)
        );
        let started = Instant::now();
        resolver.stop();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(wakes.load(Ordering::SeqCst) >= 1);
        assert!(
            rx.try_recv().is_err(),
            "unchanged answers are not sent again"
        );
    }

    #[test]
    fn a_failing_lookup_is_news_once_per_reason() {
        let mut t = ResolveTarget {
            route: 0,
            route_name: "r".to_string(),
            name: "backend:80".to_string(),
            interval: Duration::from_secs(1),
            current: Vec::new(),
            failing: None,
        };
        assert!(!t.recovered());
        assert!(t.failed("cannot resolve it: timeout"));
        assert!(
            !t.failed("cannot resolve it: timeout"),
            "same reason: quiet"
        );
        assert!(
            t.failed("it resolves to no address"),
            "another reason: news"
        );
        assert!(t.recovered());
        assert!(!t.recovered());
        assert!(
            t.failed("cannot resolve it: timeout"),
            "failing again: news"
        );
    }

    #[test]
    fn test_resolver_stops_promptly() {
        let (tx, _rx) = mpsc::channel();
        let target = ResolveTarget {
            route: 0,
            name: "localhost:1".to_string(),
            interval: Duration::from_secs(3600),
            current: Vec::new(),
            route_name: "r".to_string(),
            failing: None,
        };
        let sub = Subscriber {
            updates: tx,
            wake: Arc::new(|| {}),
        };
        let resolver = Resolver::start(vec![target], vec![sub.clone()])
            .expect("spawn")
            .expect("there is a target");
        let started = Instant::now();
        drop(resolver);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            Resolver::start(Vec::new(), vec![sub])
                .expect("no thread")
                .is_none()
        );
    }

    #[test]
    fn test_targets_from_config() {
        let c = crate::config::Config::from_toml_str(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"localhost:4242\", \"127.0.0.1:1\"]\n\
             resolve_interval = \"1h\"\n\
             [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:1\"\n",
            "test.toml",
            &crate::config::Overrides::default(),
        )
        .expect("valid");
        let targets = ResolveTarget::from_routes(&c.routes);
        assert_eq!(
            targets.len(),
            1,
            "literals and routes without resolve_interval are skipped"
        );
        assert_eq!(
            (targets[0].route, targets[0].name.as_str()),
            (0, "localhost:4242")
        );
        assert_eq!(targets[0].interval, Duration::from_secs(3600));
        assert!(!targets[0].current.is_empty());
    }
}
