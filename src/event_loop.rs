//! The event loop: one `Poll`, one `Slab<Pair>`, listeners, timers, signals and the shutdown drain.
//!
//! Tokens: a pair's sockets use `key << 1 | side` (side 0 downstream, 1 upstream), so one slab entry
//! serves both. Reserved tokens count down from `usize::MAX`: the waker, the signal pipe, then one per
//! listener.
//!
//! Readiness is edge-triggered: the pair keeps what the kernel reported in [`Readiness`] until an
//! operation returns `WouldBlock`. A connected socket is registered for READABLE|PRIORITY and
//! taken as writable; the first write that would block adds WRITABLE (see
//! [`Registered`](crate::pair::Registered)), so a socket that never fills its send buffer brings
//! no writable events. PRIORITY (`EPOLLPRI`: TCP urgent data) is part of the registration and costs
//! no syscall; epoll wakes a socket for it anyway, with its data. Work per pair per wake-up is
//! capped (`budget`); a pair that used its budget is driven again before the loop sleeps, so one
//! busy pair cannot starve the others.
//!
//! A connect to a loopback upstream completes within `connect(2)`: the pair is then driven at
//! once, in the turn that accepted the client, and what the client already sent goes upstream
//! before the client's socket is registered (so no event is left behind for bytes already read).
//! The client's request then costs the loop no wake-up of its own. A client's PROXY protocol
//! header is looked at in that turn too.
//!
//! Pairs are closed only after the whole event batch was handled, and work items carry the
//! connection id, so an event or work item can never land on a slab key that was reused.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, trace, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::access_log::{AccessLog, AccessLogGuard, AccessLogHandle, ConnSummary, DirEnd};
use crate::admin::{
    self, AdminServer, AdminState, ConnInfo, DirState, SnapshotRequest, SnapshotTarget,
};
use crate::buffer::BufferPool;
use crate::config::{Config, Overrides, ProxyProtocolVersion, Route};
use crate::fd_budget;
use crate::metrics::{CloseCause, ConnectFailure, ExtraGauges, Metrics, UpstreamUp};
use crate::net::{self, SetupError};
use crate::notify;
use crate::orig_dst;
use crate::pair;
use crate::pair::{CloseReason, Drive, Pair, PairTap, Phase, Registered};
use crate::pipe::{Pipe, Readiness};
use crate::proxy_protocol::{self, Parsed};
use crate::splice::PipePool;
use crate::stats::Stats;
use crate::tap::{ConnMeta, Direction, Side, TapConfig, TapHandle, TapSet, TapStats};
use crate::upstream::{
    AddressUpdate, Health, HealthBoard, Prober, ResolveTarget, Resolver, Subscriber, UpstreamSet,
};
use std::io::Read;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;

/// A pair's socket before any write of it would block (see [`Registered`]).
const READ: Interest = Interest::READABLE.add(Interest::PRIORITY);
/// A connecting upstream socket, or a socket whose write would block.
const READ_WRITE: Interest = READ.add(Interest::WRITABLE);

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const FIRST_LISTENER: usize = usize::MAX - 2;

fn listener_token(i: usize) -> Token {
    Token(FIRST_LISTENER - i)
}

/// First pause of accepting after EMFILE/ENFILE.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause of accepting after EMFILE/ENFILE.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What the owner of a [`Server`] asked for.
const RUN: u8 = 0;
const GRACEFUL: u8 = 1;
const IMMEDIATE: u8 = 2;

/// While a connection limit blocks accepting, re-check this often (another worker may free a slot,
/// another thread a kernel pipe).
const LIMIT_RETRY: Duration = Duration::from_millis(20);

/// State every worker reads: the config, the shutdown request, ids, limits and counters.
#[derive(Debug)]
struct Shared {
    config: Config,
    request: AtomicU8,
    next_id: AtomicU64,
    stats: Stats,
    /// Pairs open per route over all workers (for the route limits; the total is `stats.active`).
    route_active: Vec<AtomicUsize>,
    /// `max_connections`, lowered if the open-file limit cannot hold that many pairs.
    max_connections: usize,
    /// Workers whose listeners are still open.
    workers_listening: AtomicUsize,
    /// Workers whose loop is still running (the one handling signals stays until it is the last).
    workers_running: AtomicUsize,
    /// Per-route counters for `/metrics`.
    metrics: Arc<Metrics>,
    /// Set when draining starts (`/healthz` answers 503).
    draining: Arc<AtomicBool>,
    /// One line per finished connection, when configured.
    access_log: Option<AccessLogHandle>,
    /// Route names for `/metrics`, by metrics slot (see `RouteRt::metrics_slot`; a reload
    /// appends).
    route_names: Arc<RwLock<Vec<String>>>,
    /// The routes in force, indexed like the workers' routes; `None` once removed by a reload.
    /// A reload holds it while it prepares, which can take a while (a new tap may wait for a
    /// writer still flushing): `/metrics` reads `health_boards` instead.
    current_routes: Mutex<Vec<Option<Route>>>,
    /// The health boards of the routes in force that have health checks, by route name, for
    /// `/metrics`: replaced, not held, by a reload.
    health_boards: Mutex<Vec<(String, HealthBoard)>>,
    /// Where a reload reads the config from (none for a command-line-only config).
    reload_source: Mutex<Option<(PathBuf, Overrides)>>,
    /// Set while a reload is being prepared (one at a time).
    reloading: AtomicBool,
    /// A SIGHUP came after the reload in progress read its file: another reload follows it.
    reload_pending: AtomicBool,
    /// The config generation each worker has applied: a reload waits for the previous one to be
    /// applied everywhere (a listener it removed is closed before an address is bound again).
    applied_generation: Vec<AtomicU64>,
    /// Config generation in force (1 at start).
    generation: AtomicU64,
    /// The service manager's keep-alive period ([`notify::watchdog`]), if it asked for one.
    watchdog: Option<Duration>,
    /// Per worker, when its loop last turned, in milliseconds since `epoch`; [`FINISHED`] once
    /// it has returned. Kept only with a watchdog.
    heartbeats: Vec<AtomicU64>,
    epoch: Instant,
    /// Each worker's end for reload plans, with its waker.
    reload_targets: Mutex<Vec<(Sender<ReloadPlan>, Arc<Waker>)>>,
    /// Started from a terminal: without a config file, SIGHUP is its hangup and ends the process.
    hangup_ends: AtomicBool,
    /// Every tap writer, by config: routes with the same tap share one, a reload reuses those
    /// still in use (a second writer on a file would truncate it), and `/metrics` sums them,
    /// stopped ones included. A writer runs while a route in force or an open connection holds
    /// a handle of it.
    taps: Arc<TapSet>,
    /// The routes' tap handles once their worker has stopped, kept until the writers are shut
    /// down: dropping them before would end those writers as unused (see `TapSet`).
    parked_taps: Mutex<Vec<TapHandle>>,
    /// The signals, once the worker that handled them has stopped: the shutdown looks at them
    /// while it waits for the tap and access log writers.
    parked_signals: Mutex<ParkedSignals>,
    /// Local addresses of upstream sockets opened for `original-destination` routes: a client
    /// connecting from one of them is this proxy itself, caught by a REDIRECT rule that does not
    /// exclude the proxy's own traffic.
    own_upstreams: Mutex<HashSet<SocketAddr>>,
}

/// Asks a running server to stop, from any thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
}

impl ShutdownHandle {
    /// Stops accepting at once, lets open connections finish for up to the drain timeout.
    pub fn graceful(&self) {
        let _ =
            self.shared
                .request
                .compare_exchange(RUN, GRACEFUL, Ordering::SeqCst, Ordering::SeqCst);
        self.wake_all();
    }

    /// Resets every connection and stops now.
    pub fn immediate(&self) {
        self.shared.request.store(IMMEDIATE, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }
}

/// How [`Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Graceful shutdown (every connection finished or the drain timeout reset the rest).
    Graceful,
    /// Immediate shutdown (a second SIGINT, or [`ShutdownHandle::immediate`]).
    Immediate,
}

struct Listener {
    socket: Option<TcpListener>,
    local: SocketAddr,
    /// Accepting stopped because a connection limit was reached; resume when a slot frees.
    blocked_by_limit: bool,
    /// Accepting paused after EMFILE/ENFILE until then.
    paused_until: Option<Instant>,
    /// When reaching a limit was last warned about, and the pauses since.
    limit_warning: (Option<Instant>, u64),
}

struct RouteRt {
    config: Route,
    /// The route's name, shared by every connection's `ConnMeta`.
    name: Arc<str>,
    tap: Option<TapHandle>,
    /// Removed by a reload: no listener; its live pairs finish.
    removed: bool,
    /// Bumped when a reload replaces the route's upstream set: pairs of an older set do not
    /// report to the new one.
    set_epoch: u64,
    /// When connecting upstream last failed with a warning, and the failures since.
    connect_warning: (Option<Instant>, u64),
    /// Where its connections count in `/metrics`: the route's index at start, a slot of its
    /// own for a route added or renamed by a reload (slots with the same name add up, so a
    /// route's series goes on under its name). Its `max_connections` counts the connections
    /// of its listener (`route_active`, by route index), a renamed route's included.
    metrics_slot: usize,
}

/// A bound, ready-to-run proxy: one or more workers (event loops) and the taps they share.
pub struct Server {
    workers: Vec<Worker>,
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    admin: Option<AdminServer>,
    access_guard: Option<AccessLogGuard>,
    resolver: Option<Resolver>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.local_addrs())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// One single-threaded event loop with its own listeners (`SO_REUSEPORT` when there are several).
struct Worker {
    index: usize,
    poll: Poll,
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    listeners: Vec<Listener>,
    routes: Vec<RouteRt>,
    pairs: Slab<Pair>,
    pool: BufferPool,
    /// Kernel pipes for the zero-copy path.
    pipes: PipePool,
    /// Each route's backends (policy, health, open counts), indexed like `routes`.
    sets: Vec<UpstreamSet>,
    /// Each route's health prober, if it has health checks.
    probers: Vec<Option<Prober>>,
    /// Re-resolved upstream addresses from the resolver thread.
    address_updates: Receiver<AddressUpdate>,
    /// Route changes from a reload (SIGHUP).
    reload_plans: Receiver<ReloadPlan>,
    /// `(deadline, key, id)`; the live entry of a pair is the one equal to its `timer_at`.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Pairs to drive in this round `(key, id)`.
    work: Vec<(usize, u64)>,
    /// Pairs that yielded and must be driven again before sleeping.
    again: Vec<(usize, u64)>,
    /// Pairs to close at the end of the batch.
    closing: Vec<(usize, u64, CloseReason)>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    /// `/connections` requests from the admin endpoint's threads.
    snapshots: Receiver<SnapshotRequest>,
    budget: usize,
    draining: Option<Instant>,
    sigints: u32,
    /// Current pause after running out of descriptors; reset once a pair starts fine.
    accept_backoff: Duration,
    last_fd_warning: Option<Instant>,
    /// When "no free local port" was last logged, and the connects that failed so since then.
    last_port_warning: Option<Instant>,
    port_failures_unwarned: u64,
    /// When the buffer pool was last trimmed (see [`BufferPool::trim`]).
    pool_trimmed: Instant,
    /// Worker 0: when it last told the service manager the process is alive.
    watchdog_sent: Option<Instant>,
    /// `busy_poll`: how long to poll without sleeping after a wait that returned events.
    busy_poll: Option<Duration>,
    /// The last wait returned events: the next may poll before it sleeps.
    busy: bool,
}

/// How often a buffer pool holding more than it keeps for good gives back what went unused.
const POOL_TRIM: Duration = Duration::from_secs(10);

impl Server {
    /// Binds every route's listener (once per worker) and starts the taps. Nothing is accepted
    /// until [`run`](Server::run).
    pub fn bind(config: Config) -> Result<Server, SetupError> {
        // A tap output forgets connections past a limit (their close records may be lost): never
        // fewer than the proxy may hold, with room for the workers' overshoot.
        crate::tap::track_at_least(config.max_connections.saturating_mul(2));
        // Routes with the same tap config share one writer (and one output file).
        let taps = Arc::new(TapSet::new());
        let mut route_taps = Vec::new();
        for route in &config.routes {
            let tap = match &route.tap {
                None => None,
                Some(tc) => match taps.find(tc) {
                    Some(h) => Some(h),
                    None => {
                        let started = taps.start(tc, Duration::ZERO);
                        Some(started.map_err(|source| SetupError::Tap {
                            route: route.name.clone(),
                            source,
                        })?)
                    }
                },
            };
            route_taps.push(tap);
        }
        let (access_handle, access_guard) = match &config.access_log {
            Some(a) => {
                let (h, g) = AccessLog::start(&a.path, a.format).map_err(|source| {
                    SetupError::AccessLog {
                        path: a.path.clone(),
                        source,
                    }
                })?;
                (Some(h), Some(g))
            }
            None => (None, None),
        };
        let n = config.workers.get();
        let shared = Arc::new(Shared {
            request: AtomicU8::new(RUN),
            next_id: AtomicU64::new(1),
            stats: Stats::default(),
            // Preallocated: a reload appends routes, up to MAX_ROUTES over the process's life.
            route_active: (0..MAX_ROUTES).map(|_| AtomicUsize::new(0)).collect(),
            max_connections: fd_capped_max_connections(
                config.max_connections,
                reserved_descriptors(&config),
            ),
            workers_listening: AtomicUsize::new(n),
            workers_running: AtomicUsize::new(n),
            metrics: Arc::new(Metrics::new(
                MAX_ROUTES,
                config.splice_memory_limit,
                config.workers.get(),
            )),
            draining: Arc::new(AtomicBool::new(false)),
            access_log: access_handle,
            own_upstreams: Mutex::new(HashSet::new()),
            route_names: Arc::new(RwLock::new(
                config.routes.iter().map(|r| r.name.clone()).collect(),
            )),
            current_routes: Mutex::new(config.routes.iter().cloned().map(Some).collect()),
            health_boards: Mutex::new(health_boards(config.routes.iter())),
            reload_source: Mutex::new(None),
            reloading: AtomicBool::new(false),
            reload_pending: AtomicBool::new(false),
            applied_generation: (0..n).map(|_| AtomicU64::new(1)).collect(),
            generation: AtomicU64::new(1),
            watchdog: notify::watchdog(),
            heartbeats: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            reload_targets: Mutex::new(Vec::new()),
            hangup_ends: AtomicBool::new(false),
            taps: taps.clone(),
            parked_taps: Mutex::new(Vec::new()),
            parked_signals: Mutex::new(ParkedSignals(None)),
            config,
        });
        let mut workers = Vec::with_capacity(n);
        let mut wakers = Vec::with_capacity(n);
        let mut loops = Vec::with_capacity(n);
        let mut subscribers = Vec::with_capacity(n);
        // Worker 0 binds the configured addresses (port 0 becomes a real port); the others bind
        // the same real addresses with SO_REUSEPORT, and the kernel spreads connections.
        let mut addrs: Vec<SocketAddr> = shared.config.routes.iter().map(|r| r.listen).collect();
        for index in 0..n {
            let poll = Poll::new().map_err(SetupError::Poll)?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SetupError::Poll)?);
            let (snap_tx, snap_rx) = admin::snapshot_channel();
            let (updates_tx, updates_rx) = std::sync::mpsc::channel();
            let (reload_tx, reload_rx) = std::sync::mpsc::channel();
            lock(&shared.reload_targets).push((reload_tx, waker.clone()));
            let w = waker.clone();
            subscribers.push(Subscriber {
                updates: updates_tx,
                wake: {
                    let w = waker.clone();
                    Arc::new(move || {
                        let _ = w.wake();
                    })
                },
            });
            loops.push(SnapshotTarget {
                snapshots: snap_tx,
                wake: Arc::new(move || {
                    let _ = w.wake();
                }),
            });
            wakers.push(waker);
            let mut listeners = Vec::new();
            for (i, route) in shared.config.routes.iter().enumerate() {
                let mut socket = net::bind_listener(
                    &route.name,
                    addrs[i],
                    shared.config.listen_backlog,
                    n > 1,
                    route.transparent,
                    route.defer_accept,
                    &shared.config.socket,
                )?;
                let local = socket.local_addr().map_err(|source| SetupError::Bind {
                    route: route.name.clone(),
                    addr: route.listen,
                    source,
                })?;
                addrs[i] = local;
                poll.registry()
                    .register(&mut socket, listener_token(i), Interest::READABLE)
                    .map_err(SetupError::Poll)?;
                listeners.push(Listener {
                    socket: Some(socket),
                    local,
                    blocked_by_limit: false,
                    paused_until: None,
                    limit_warning: (None, 0),
                });
            }
            let buffer_size = shared.config.buffer_size.get();
            // Keep up to 32 MiB of idle buffers for reuse; beyond that, free them.
            let max_free = ((32 << 20) / buffer_size / n).clamp(4, 4096);
            workers.push(Worker {
                index,
                poll,
                shared: shared.clone(),
                wakers: Vec::new(),
                listeners,
                routes: shared
                    .config
                    .routes
                    .iter()
                    .zip(&route_taps)
                    .enumerate()
                    .map(|(i, (r, t))| RouteRt {
                        name: Arc::from(r.name.as_str()),
                        config: r.clone(),
                        tap: t.as_ref().map(TapHandle::for_worker),
                        removed: false,
                        set_epoch: 0,
                        connect_warning: (None, 0),
                        metrics_slot: i,
                    })
                    .collect(),
                pairs: Slab::with_capacity(1024),
                pool: BufferPool::new(buffer_size, max_free),
                pipes: PipePool::new(
                    shared.config.splice_pipe_size,
                    PIPE_POOL_MAX,
                    Arc::clone(&shared.metrics.splice_memory),
                ),
                sets: shared
                    .config
                    .routes
                    .iter()
                    .map(|r| UpstreamSet::new(&r.name, &r.upstream_set).on_worker(index))
                    .collect(),
                probers: Vec::new(),
                address_updates: updates_rx,
                reload_plans: reload_rx,
                timers: BinaryHeap::new(),
                work: Vec::new(),
                again: Vec::new(),
                closing: Vec::new(),
                signals: None,
                snapshots: snap_rx,
                budget: (4 * buffer_size).max(256 * 1024),
                draining: None,
                sigints: 0,
                accept_backoff: MIN_ACCEPT_BACKOFF,
                last_fd_warning: None,
                last_port_warning: None,
                port_failures_unwarned: 0,
                pool_trimmed: Instant::now(),
                watchdog_sent: None,
                busy_poll: shared.config.busy_poll,
                busy: false,
            });
        }
        for w in &mut workers {
            w.wakers = wakers.clone();
            w.probers = (w.sets.iter().zip(&shared.config.routes).enumerate())
                .map(|(i, (set, route))| prober(set, route, i))
                .collect();
        }
        let resolver = Resolver::start(
            ResolveTarget::from_routes(&shared.config.routes),
            subscribers,
        )
        .map_err(SetupError::Poll)?;
        let admin = match shared.config.admin {
            Some(addr) => {
                let access = shared.access_log.clone();
                let state = AdminState {
                    metrics: shared.metrics.clone(),
                    routes: shared.route_names.clone(),
                    draining: shared.draining.clone(),
                    extra: Box::new(move || extra_gauges(taps.stats(), access.as_ref())),
                    upstreams: {
                        let shared = shared.clone();
                        Box::new(move || upstream_health(&lock(&shared.health_boards)))
                    },
                    loops,
                    snapshot_timeout: admin::DEFAULT_SNAPSHOT_TIMEOUT,
                };
                Some(admin::start(addr, Arc::new(state)).map_err(SetupError::Admin)?)
            }
            None => None,
        };
        Ok(Server {
            workers,
            shared,
            wakers,
            admin,
            access_guard,
            resolver,
        })
    }

    /// The bound listen addresses, in route order (port 0 in the config becomes the real port here).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.workers[0].listeners.iter().map(|l| l.local).collect()
    }

    /// Lets SIGHUP re-read `path` (with the same command-line `overrides`) and apply its routes.
    pub fn set_reload_source(&self, path: PathBuf, overrides: Overrides) {
        *lock(&self.shared.reload_source) = Some((path, overrides));
    }

    /// The admin endpoint's address, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// A handle to stop the server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
            wakers: self.wakers.clone(),
        }
    }

    /// Routes SIGTERM and SIGINT into the first worker's loop: the first starts a graceful shutdown
    /// of every worker, a second SIGINT stops at once. SIGHUP reloads the config file. Without one
    /// (routes from the command line), in a process started from a terminal, SIGHUP is that
    /// terminal's hangup and shuts down gracefully, unless it was ignored when the process
    /// started (`nohup`), and stays so; started without a terminal (a service manager's
    /// `kill -HUP` to reload), it changes nothing and says so.
    pub fn handle_signals(&mut self) -> Result<(), SetupError> {
        let mut wanted = vec![libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];
        // SAFETY: isatty only inspects the descriptor.
        let terminal = [0, 1, 2].iter().any(|&fd| unsafe { libc::isatty(fd) } == 1);
        self.shared.hangup_ends.store(terminal, Ordering::Relaxed);
        if lock(&self.shared.reload_source).is_some() || !signal_ignored(libc::SIGHUP) {
            wanted.push(libc::SIGHUP);
        }
        let mut signals =
            signal_hook_mio::v1_0::Signals::new(wanted).map_err(SetupError::Signals)?;
        let w = &mut self.workers[0];
        w.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(SetupError::Signals)?;
        w.signals = Some(signals);
        Ok(())
    }

    /// Runs every worker until shut down (worker 0 on this thread). Only a failing `poll(2)` is an
    /// error.
    pub fn run(mut self) -> io::Result<Exit> {
        let n = self.workers.len();
        for (i, r) in self.shared.config.routes.iter().enumerate() {
            info!(
                "route `{}`: listening on {} -> {}{}{}",
                r.name,
                self.workers[0].listeners[i].local,
                upstream_desc(r),
                workers_note(n),
                defer_note(r)
            );
        }
        // Where each tap writes, and for which routes.
        let mut taps: Vec<(&TapConfig, Vec<&str>)> = Vec::new();
        for r in &self.shared.config.routes {
            let Some(tc) = &r.tap else { continue };
            match taps.iter_mut().find(|(t, _)| *t == tc) {
                Some((_, names)) => names.push(&r.name),
                None => taps.push((tc, vec![&r.name])),
            }
        }
        for (tc, names) in taps {
            info!(
                "tap: {} (route{} `{}`)",
                tc.describe(),
                if names.len() == 1 { "" } else { "s" },
                names.join("`, `")
            );
        }
        if let Some(d) = self.shared.config.busy_poll {
            info!(
                "busy_poll: after events, each event loop polls for up to {} before it sleeps",
                humantime::format_duration(d)
            );
        }
        // The listeners are bound: clients are served (from the backlog) from here on.
        notify::send(&format!(
            "READY=1\nSTATUS=serving {} route(s)",
            self.shared.config.routes.len()
        ));
        let handle = self.shutdown_handle();
        let mut threads = Vec::new();
        for w in self.workers.drain(1..) {
            let h = handle.clone();
            let t = std::thread::Builder::new()
                .name(format!("tcptap-worker-{}", w.index))
                .spawn(move || {
                    let r = w.run();
                    if r.is_err() {
                        // A dead worker takes the process down cleanly rather than silently.
                        h.immediate();
                    }
                    r
                })?;
            threads.push(t);
        }
        let first = self.workers.pop().expect("at least one worker").run();
        if first.is_err() {
            handle.immediate();
        }
        let mut exit = first;
        for t in threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("worker thread panicked")));
            exit = match (exit, r) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(Exit::Immediate), _) | (_, Ok(Exit::Immediate)) => Ok(Exit::Immediate),
                _ => Ok(Exit::Graceful),
            };
        }
        let graceful = matches!(exit, Ok(Exit::Graceful));
        if graceful && self.shared.stats.shutdown_aborts.load(Ordering::Relaxed) == 0 {
            info!("shutdown: all connections finished");
        }
        let timeout = if graceful {
            self.shared.config.drain_timeout.max(Duration::from_secs(2))
        } else {
            Duration::from_secs(1)
        };
        // The writers may take up to `timeout` (a FIFO nobody reads): an interrupt now stops
        // waiting for them, as one during the drain stops the drain.
        let shared = Arc::clone(&self.shared);
        let interrupted = move || shared.interrupted_now();
        // One wait for all writers: each drains while the others are waited for, so writers
        // stuck in their sinks hold the exit for `timeout` in all, not each.
        let deadline = Instant::now() + timeout;
        if let Some(guard) = &self.access_guard {
            guard.request_stop();
        }
        for (tap, s) in self.shared.taps.shutdown(deadline, &interrupted) {
            info!(
                "tap ({}): {} records ({} bytes) written, {} records ({} bytes) dropped, {} write errors",
                tap.describe(),
                s.records_written,
                s.bytes_written,
                s.dropped_records,
                s.dropped_bytes,
                s.write_errors
            );
        }
        // The writers are done: these handles now only tell them so again.
        lock(&self.shared.parked_taps).clear();
        if let Some(admin) = self.admin.take() {
            admin.shutdown();
        }
        if let Some(r) = self.resolver.take() {
            r.stop();
        }
        if let Some(guard) = self.access_guard.take() {
            let left = deadline.saturating_duration_since(Instant::now());
            let s = guard.shutdown_unless(left, &interrupted);
            info!(
                "access log: {} lines written, {} dropped, {} write errors",
                s.written, s.dropped, s.write_errors
            );
        }
        info!("stopped: {}", self.shared.stats.summary());
        if self.shared.request.load(Ordering::SeqCst) == IMMEDIATE {
            return exit.map(|_| Exit::Immediate);
        }
        exit
    }
}

impl Shared {
    /// While the writers flush at shutdown: whether SIGINT came since the loops stopped (or an
    /// immediate stop was asked before); it stops the waiting for every writer that is left.
    fn interrupted_now(&self) -> bool {
        if self.request.load(Ordering::SeqCst) == IMMEDIATE {
            return true;
        }
        let mut parked = lock(&self.parked_signals);
        let Some(signals) = parked.0.as_mut() else {
            return false;
        };
        if signals.pending().any(|sig| sig == libc::SIGINT) {
            info!("interrupt: not waiting for the writers any longer");
            self.request.store(IMMEDIATE, Ordering::SeqCst);
            return true;
        }
        false
    }
}

impl Worker {
    fn run(mut self) -> io::Result<Exit> {
        let r = self.run_loop();
        for p in self.probers.iter_mut().flatten() {
            p.stop(self.poll.registry());
        }
        // Keep the taps' writers for the shutdown (they flush and report there), not ended as
        // unused now.
        let taps = self.routes.iter_mut().filter_map(|r| r.tap.take());
        lock(&self.shared.parked_taps).extend(taps);
        if let Some(signals) = self.signals.take() {
            lock(&self.shared.parked_signals).0 = Some(signals);
        }
        self.shared.heartbeats[self.index].store(FINISHED, Ordering::Relaxed);
        self.shared.workers_running.fetch_sub(1, Ordering::SeqCst);
        // The signal-handling worker waits for the others: tell it one is gone.
        let _ = self.wakers[0].wake();
        r
    }

    fn run_loop(&mut self) -> io::Result<Exit> {
        let mut events = Events::with_capacity(1024);
        // Start the first health probes now; later ones are due by the poll timeout.
        self.tick_upstreams(Instant::now());
        let exit = loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.wait(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("worker {}: poll failed: {e}", self.index);
                self.abort_all(|| CloseReason::Stopped);
                return Err(e);
            }
            let now = Instant::now();
            self.apply_reloads(now);
            for event in events.iter() {
                self.dispatch(event, now);
            }
            if let Some(exit) = self.control(now) {
                break exit;
            }
            self.drive_work(now);
            self.fire_timers(now);
            self.close_pending();
            self.resume_accepting(now);
            self.tick_upstreams(now);
            self.trim_pool(now);
            self.keep_alive(now);
            if let Some(deadline) = self.draining {
                // The worker that handles signals stays until the others are done, so that a
                // second SIGINT still works while they drain.
                let others_done = self.signals.is_none()
                    || self.shared.workers_running.load(Ordering::SeqCst) == 1;
                if self.pairs.is_empty() && others_done {
                    break Exit::Graceful;
                }
                if now >= deadline {
                    let n = self.shared.config.workers.get();
                    warn!(
                        "shutdown: drain timeout reached, resetting {} connection(s){}",
                        self.pairs.len(),
                        if n > 1 {
                            format!(" of worker {} (of {n})", self.index)
                        } else {
                            String::new()
                        }
                    );
                    self.abort_all(|| CloseReason::Shutdown);
                    break Exit::Graceful;
                }
            }
        };
        if exit == Exit::Immediate {
            self.abort_all(|| CloseReason::Stopped);
        }
        Ok(exit)
    }

    /// Waits for events, for up to `timeout`. With `busy_poll`, a loop whose last wait returned
    /// events first polls without sleeping, for up to that long: the next event of a busy
    /// connection usually comes within microseconds, and the peer that sends it then does not
    /// pay for waking the loop, nor the loop for sleeping. A loop woken by a timer alone, or
    /// that polled for the whole window in vain, sleeps at once: an idle proxy does not spin.
    fn wait(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let Some(spin) = self.busy_poll else {
            return self.poll.poll(events, timeout);
        };
        let mut timeout = timeout;
        if self.busy && timeout != Some(Duration::ZERO) {
            match self.spin(events, spin, timeout)? {
                None => return Ok(()),
                Some(left) => timeout = left,
            }
        }
        self.poll.poll(events, timeout)?;
        // A turn with work left over (a zero timeout) keeps the loop busy until it sleeps.
        self.busy = !events.is_empty() || (self.busy && timeout == Some(Duration::ZERO));
        Ok(())
    }

    /// [`wait`](Self::wait)'s polling: `None` once events came within `spin` (or `timeout`);
    /// else what is left of `timeout` to sleep for (nothing, when a timer came due meanwhile).
    /// Out of line: inlined, it made the loop without `busy_poll` cost about 30 more
    /// instructions per turn (callgrind), the code around it being compiled otherwise.
    #[inline(never)]
    fn spin(
        &mut self,
        events: &mut Events,
        spin: Duration,
        timeout: Option<Duration>,
    ) -> io::Result<Option<Option<Duration>>> {
        let start = Instant::now();
        let window = timeout.map_or(spin, |t| t.min(spin));
        loop {
            self.poll.poll(events, Some(Duration::ZERO))?;
            if !events.is_empty() {
                self.shared
                    .metrics
                    .on_busy_poll(self.index, start.elapsed());
                return Ok(None);
            }
            if start.elapsed() >= window {
                break;
            }
            std::hint::spin_loop();
        }
        let spent = start.elapsed();
        self.shared.metrics.on_busy_poll(self.index, spent);
        self.busy = false;
        Ok(Some(timeout.map(|t| t.saturating_sub(spent))))
    }

    /// With a service manager's watchdog: notes that this loop turned and, on worker 0 once per
    /// period, sends `WATCHDOG=1` if every loop turned within the period. A loop that hangs (a
    /// bug, a blocking call) thus stops the keep-alives and systemd restarts the proxy.
    fn keep_alive(&mut self, now: Instant) {
        let Some(period) = self.shared.watchdog else {
            return;
        };
        let ms = |t: Instant| t.saturating_duration_since(self.shared.epoch).as_millis() as u64;
        self.shared.heartbeats[self.index].store(ms(now), Ordering::Relaxed);
        if self.index != 0 || self.watchdog_sent.is_some_and(|t| now < t + period) {
            return;
        }
        self.watchdog_sent = Some(now);
        let beats: Vec<u64> = (self.shared.heartbeats.iter())
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        match stalled_worker(&beats, ms(now), period.as_millis() as u64) {
            None => notify::send("WATCHDOG=1"),
            Some((i, idle_ms)) => warn!(
                "worker {i} has not turned for {:.1}s: the service manager's watchdog is not \
                 told that the proxy is alive",
                idle_ms as f64 / 1000.0
            ),
        }
    }

    /// Every [`POOL_TRIM`]: frees the buffers a burst left that went unused since (and the heap
    /// pages they held), and closes the tee pipes a lagging tap writer made that it has emptied
    /// since (they are otherwise closed only by the next tapped traffic, or while descriptors
    /// are short).
    fn trim_pool(&mut self, now: Instant) {
        if now < self.pool_trimmed + POOL_TRIM {
            return;
        }
        self.pool_trimmed = now;
        self.trim_tee_pipes();
        let freed = self.pool.trim();
        if freed > 0 {
            debug!("worker {}: {freed} idle buffers freed", self.index);
        }
        // Buffers come from the heap (below glibc's mmap threshold): hand the pages back, when
        // worth the walk over the heap that this takes.
        if freed * self.pool.buffer_size() >= 4 << 20 {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free memory of the allocator.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Closes the idle tee pipes of every route's tap, but one each (see
    /// [`TapHandle::trim_tee_pipes`]).
    fn trim_tee_pipes(&self) {
        for tap in self.routes.iter().filter_map(|r| r.tap.as_ref()) {
            tap.trim_tee_pipes();
        }
    }

    fn poll_timeout(&mut self) -> Option<Duration> {
        // Pairs started after this turn's work was done (accepts resumed) are driven next turn.
        if !self.again.is_empty() || !self.work.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        // Entries of closed pairs, and superseded ones, stay in the heap until they reach the
        // top: drop them here, so that they never wake the loop.
        while let Some(&Reverse((t, key, id))) = self.timers.peek() {
            if self.live_timer(t, key, id) {
                break;
            }
            self.timers.pop();
        }
        let mut next: Option<Instant> = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        // A closed listener's pause (drain, removed route) wakes nobody: its deadline, once
        // past, would make every wait return at once.
        for l in self.listeners.iter().filter(|l| l.socket.is_some()) {
            if let Some(t) = l.paused_until {
                consider(t);
            }
        }
        if let Some(t) = self.draining {
            consider(t);
        }
        if let Some(period) = self.shared.watchdog {
            // Turn at least twice a period, so that an idle loop is not taken for a hung one.
            consider(now + period / 2);
        }
        let tees = || self.routes.iter().filter_map(|r| r.tap.as_ref());
        if self.pool.has_excess() || tees().any(TapHandle::may_trim_tee_pipes) {
            consider(self.pool_trimmed + POOL_TRIM);
        }
        for p in self.probers.iter().flatten() {
            if let Some(t) = p.next_deadline() {
                consider(t);
            }
        }
        // Another worker may free a slot, and another thread a kernel pipe (a tap writer drops
        // the last reference to a tee pipe): no event on this loop says so.
        if (self.listeners.iter()).any(|l| l.blocked_by_limit && l.socket.is_some()) {
            consider(now + LIMIT_RETRY);
        }
        // Round up to a millisecond so a timer is never polled for a zero timeout in a busy loop.
        next.map(|t| t.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn dispatch(&mut self, event: &Event, now: Instant) {
        match event.token() {
            WAKER => self.answer_snapshots(now),
            SIGNALS => self.on_signals(),
            Token(t) if t > FIRST_LISTENER - self.listeners.len() => {
                let i = FIRST_LISTENER - t;
                self.accept(i, now);
            }
            Token(t) if t >= PROBE_BASE => {
                let route = (t - PROBE_BASE) / PROBE_SPAN;
                if let (Some(Some(prober)), Some(set)) =
                    (self.probers.get_mut(route), self.sets.get_mut(route))
                {
                    prober.on_event(self.poll.registry(), event.token(), set);
                }
            }
            Token(t) => {
                let key = t >> 1;
                let side = if t & 1 == 0 {
                    Side::Downstream
                } else {
                    Side::Upstream
                };
                let Some(pair) = self.pairs.get_mut(key) else {
                    // Spurious or stale: the pair is gone.
                    return;
                };
                let r = &mut pair.ready[side.index()];
                r.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
                r.closing |= event.is_read_closed() || event.is_error();
                r.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
                r.connected |= (event.is_writable() || event.is_readable())
                    && !event.is_error()
                    && !event.is_write_closed();
                // EPOLLPRI is in every event while urgent data waits unread (tcp_poll). Once the
                // FIN is in, `urgent` may also stand for a splice's 0 that a read must confirm.
                if event.is_priority() {
                    r.urgent = true;
                } else if event.is_readable() && !event.is_read_closed() {
                    r.urgent = false;
                }
                // An error (a reset) ends the pair once what the peer sent before it is passed
                // on: the pumps read it, then meet the error (see `Pair::settle_errors`). A
                // client that resets while its upstream connect is in flight, having sent
                // nothing, ends at once: it need not wait out `connect_timeout`, holding its
                // slot and counting as an upstream timeout.
                r.error |= event.is_error();
                if event.is_error()
                    && side == Side::Downstream
                    && matches!(pair.phase, Phase::Connecting { .. })
                    && pair.unread(side) == 0
                {
                    if let Some(reason) = pair.check_socket_error(side) {
                        self.closing.push((key, pair.meta.id, reason));
                        return;
                    }
                }
                if !pair.scheduled {
                    pair.scheduled = true;
                    self.work.push((key, pair.meta.id));
                }
            }
        }
    }

    /// SIGHUP: prepares the new configuration on a thread of its own. False when there is no
    /// config file: the signal is then a hangup, which shuts down.
    fn start_reload(&mut self) -> bool {
        let Some((path, overrides)) = lock(&self.shared.reload_source).clone() else {
            if !self.shared.hangup_ends.load(Ordering::Relaxed) {
                warn!("SIGHUP: no config file to reload (routes come from the command line)");
                // A service manager that sent it to reload waits for the reload to end.
                notify::reloading();
                notify::send("READY=1");
                return true;
            }
            info!(
                "SIGHUP without a config file to reload (routes come from the command line), \
                 from the terminal this was started in: shutting down"
            );
            return false;
        };
        // Every SIGHUP is followed by a reload that reads the file after it: one that comes
        // while a reload is in progress (which may have read the file before it was edited)
        // gets a reload of its own once that one ends.
        self.shared.reload_pending.store(true, Ordering::SeqCst);
        if self.shared.reloading.swap(true, Ordering::SeqCst) {
            info!("SIGHUP: a reload is in progress; reloading again when it ends");
            return true;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tcptap-reload".into())
            .spawn(move || {
                loop {
                    shared.reload_pending.store(false, Ordering::SeqCst);
                    notify::reloading();
                    wait_applied(&shared);
                    info!("SIGHUP: reloading {}", path.display());
                    let status = match prepare_reload(&shared, &path, &overrides) {
                        Ok(()) => format!(
                            "serving configuration generation {}",
                            shared.generation.load(Ordering::SeqCst)
                        ),
                        Err(e) => {
                            error!("reload rejected, the running configuration stays: {e}");
                            shared.metrics.on_reload(None);
                            // STATUS is one line.
                            format!("reload rejected: {}", e.replace('\n', "; "))
                        }
                    };
                    if shared.reload_pending.load(Ordering::SeqCst) {
                        continue; // a SIGHUP came meanwhile: its reload follows at once
                    }
                    // The end is told while this thread still holds `reloading`, so that it
                    // cannot be taken for the end of a reload started after it.
                    wait_applied(&shared);
                    notify::send(&format!("READY=1\nSTATUS={status}"));
                    shared.reloading.store(false, Ordering::SeqCst);
                    // A SIGHUP that came since either found `reloading` cleared and started a
                    // reload of its own, or left it to this thread.
                    if !shared.reload_pending.load(Ordering::SeqCst)
                        || shared.reloading.swap(true, Ordering::SeqCst)
                    {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            error!("reload: cannot start: {e}");
            self.shared.reloading.store(false, Ordering::SeqCst);
            notify::send(&format!("READY=1\nSTATUS=reload failed to start: {e}"));
        }
        true
    }

    /// Applies this worker's part of a reload. Cold: it runs once per reload, and inlined into
    /// the loop it made every request cost about 60 instructions more (callgrind).
    #[cold]
    fn apply_reload(&mut self, plan: ReloadPlan, now: Instant) {
        if plan.busy_poll != self.busy_poll {
            if self.index == 0 {
                info!(
                    "reload: busy_poll is now {} (was {})",
                    fmt_busy_poll(plan.busy_poll),
                    fmt_busy_poll(self.busy_poll)
                );
            }
            self.busy_poll = plan.busy_poll;
            // Not kept up to date while off.
            self.busy = false;
        }
        for change in plan.changes {
            match change {
                RouteChange::Remove(i) => {
                    if let Some(mut l) = self.listeners[i].socket.take() {
                        let _ = self.poll.registry().deregister(&mut l);
                    }
                    self.listeners[i].blocked_by_limit = false;
                    self.routes[i].removed = true;
                    // Its connections hold the tap until they finish; then its writer stops,
                    // unless another route uses it.
                    self.routes[i].tap = None;
                    if let Some(p) = self.probers[i].as_mut() {
                        p.stop(self.poll.registry());
                    }
                    self.probers[i] = None;
                    if self.index == 0 {
                        info!(
                            "reload: route `{}` removed; its open connections finish",
                            self.routes[i].config.name
                        );
                    }
                }
                RouteChange::Update {
                    index,
                    mut route,
                    tap,
                    upstreams_changed,
                    metrics_slot,
                } => {
                    if let Some(slot) = metrics_slot {
                        self.routes[index].metrics_slot = slot;
                    }
                    if upstreams_changed {
                        if let Some(p) = self.probers[index].as_mut() {
                            p.stop(self.poll.registry());
                        }
                        self.sets[index] = UpstreamSet::new(&route.name, &route.upstream_set)
                            .on_worker(self.index);
                        self.probers[index] = prober(&self.sets[index], &route, index);
                        self.routes[index].set_epoch += 1;
                    } else if let Some(p) = self.probers[index].as_mut() {
                        p.set_greeting(probe_greeting(&route));
                    }
                    if let Some(t) = tap {
                        self.routes[index].tap = t.as_ref().map(TapHandle::for_worker);
                    }
                    if *self.routes[index].name != *route.name {
                        self.routes[index].name = Arc::from(route.name.as_str());
                    }
                    let was = self.routes[index].config.defer_accept;
                    if route.defer_accept != was && !self.set_defer_accept(index, &route) {
                        // Still in force on the listener: a later reload tries again.
                        route.defer_accept = was;
                    }
                    self.routes[index].config = route;
                }
                RouteChange::Add {
                    route,
                    tap,
                    mut listener,
                    metrics_slot,
                } => {
                    let i = self.routes.len();
                    let local = listener.local_addr().unwrap_or(route.listen);
                    if self.index == 0 {
                        let n = self.shared.config.workers.get();
                        info!(
                            "route `{}`: listening on {local} -> {}{}{}",
                            route.name,
                            upstream_desc(&route),
                            workers_note(n),
                            defer_note(&route)
                        );
                    }
                    let registered = self.poll.registry().register(
                        &mut listener,
                        listener_token(i),
                        Interest::READABLE,
                    );
                    if let Err(e) = &registered {
                        error!(
                            "reload: route `{}`: cannot watch its listener: {e}",
                            route.name
                        );
                    }
                    self.sets.push(
                        UpstreamSet::new(&route.name, &route.upstream_set).on_worker(self.index),
                    );
                    self.probers.push(prober(&self.sets[i], &route, i));
                    self.listeners.push(Listener {
                        socket: registered.ok().map(|()| listener),
                        local,
                        blocked_by_limit: false,
                        paused_until: None,
                        limit_warning: (None, 0),
                    });
                    self.routes.push(RouteRt {
                        name: Arc::from(route.name.as_str()),
                        config: route,
                        tap: tap.as_ref().map(TapHandle::for_worker),
                        removed: false,
                        set_epoch: 0,
                        connect_warning: (None, 0),
                        metrics_slot,
                    });
                    // Connections may already wait in the new listener's backlog.
                    self.accept(i, now);
                }
            }
        }
        if self.draining.is_some() {
            // A reload during shutdown adds nothing: close what it opened.
            for l in &mut self.listeners {
                if let Some(mut s) = l.socket.take() {
                    let _ = self.poll.registry().deregister(&mut s);
                }
            }
        }
        self.shared.applied_generation[self.index].store(plan.generation, Ordering::SeqCst);
        debug!(
            "worker {}: configuration generation {} applied",
            self.index, plan.generation
        );
    }

    /// Applies the reload plans sent to this worker. Called before the events of each wake-up
    /// are handled: a client that connects once the reload is logged (after the plans were
    /// sent) is accepted under the new configuration.
    fn apply_reloads(&mut self, now: Instant) {
        while let Ok(plan) = self.reload_plans.try_recv() {
            self.apply_reload(plan, now);
        }
    }

    /// Applies re-resolved addresses and runs due health probes.
    fn tick_upstreams(&mut self, now: Instant) {
        while let Ok(u) = self.address_updates.try_recv() {
            if let Some(set) = self.sets.get_mut(u.route) {
                // Every worker applies it; the first one says so.
                if set.replace_addresses(&u.name, &u.addrs) && self.index == 0 {
                    info!(
                        "route `{}`: {} now resolves to {}",
                        set.route(),
                        u.name,
                        fmt_addrs(&u.addrs)
                    );
                }
            }
        }
        for (prober, set) in self.probers.iter_mut().zip(&mut self.sets) {
            if let Some(p) = prober {
                p.tick(self.poll.registry(), set, now);
            }
        }
    }

    /// Answers pending `/connections` requests with this worker's live pairs.
    fn answer_snapshots(&mut self, now: Instant) {
        let pairs = &self.pairs;
        admin::answer_snapshots(&self.snapshots, || {
            pairs
                .iter()
                .map(|(_, p)| ConnInfo {
                    id: p.meta.id,
                    // The name it was accepted under, as in its log lines and metrics (a
                    // reload may have renamed the route since).
                    route: p.meta.route.to_string(),
                    client: p.meta.downstream,
                    upstream: p.meta.upstream,
                    age_ms: now.saturating_duration_since(p.started).as_millis() as u64,
                    bytes_d2u: p.pipes[0].read_total(),
                    bytes_u2d: p.pipes[1].read_total(),
                    d2u_state: DirState::from(p.pipes[0].state()),
                    u2d_state: DirState::from(p.pipes[1].state()),
                })
                .collect()
        });
    }

    fn on_signals(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let mut graceful = false;
        let mut immediate = false;
        for sig in signals.pending() {
            match sig {
                libc::SIGINT => {
                    self.sigints += 1;
                    if self.sigints >= 2 || self.draining.is_some() {
                        immediate = true;
                    } else {
                        graceful = true;
                    }
                }
                libc::SIGHUP => {
                    if !self.start_reload() {
                        graceful = true;
                    }
                }
                libc::SIGUSR1 => {
                    // logrotate convention: reopen the access log at its configured path.
                    if let Some(a) = &self.shared.access_log {
                        info!("SIGUSR1: reopening the access log");
                        a.reopen();
                    }
                }
                _ => graceful = true,
            }
        }
        if immediate {
            info!("second interrupt: stopping now");
            self.shared.request.store(IMMEDIATE, Ordering::SeqCst);
        } else if graceful {
            let _ = self.shared.request.compare_exchange(
                RUN,
                GRACEFUL,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        if immediate || graceful {
            // The other workers learn through their wakers.
            for (i, w) in self.wakers.iter().enumerate() {
                if i != self.index {
                    let _ = w.wake();
                }
            }
        }
    }

    /// Acts on a shutdown request. Returns the exit when the loop must stop now.
    fn control(&mut self, now: Instant) -> Option<Exit> {
        match self.shared.request.load(Ordering::SeqCst) {
            IMMEDIATE => Some(Exit::Immediate),
            GRACEFUL if self.draining.is_none() => {
                self.draining = Some(now + self.shared.config.drain_timeout);
                if !self.shared.draining.swap(true, Ordering::SeqCst) {
                    notify::send("STOPPING=1");
                }
                for (i, l) in self.listeners.iter_mut().enumerate() {
                    if let Some(mut s) = l.socket.take() {
                        let _ = self.poll.registry().deregister(&mut s);
                        // Dropping the socket closes it: new connections are refused from here on.
                        debug!(
                            "route `{}`: listener {} closed",
                            self.routes[i].config.name, l.local
                        );
                    }
                }
                // The last worker to close its listeners tells: from then on every connect is refused.
                if self.shared.workers_listening.fetch_sub(1, Ordering::SeqCst) == 1 {
                    info!(
                        "shutting down: listeners closed, {} connection(s) draining (up to {:?})",
                        self.shared.stats.active.load(Ordering::Relaxed),
                        self.shared.config.drain_timeout
                    );
                }
                None
            }
            _ => None,
        }
    }

    /// A reload changed the `defer_accept` of route `i` (now `route`): the listener it keeps
    /// takes the new value, for the handshakes still pending too. False when it could not.
    fn set_defer_accept(&mut self, i: usize, route: &Route) -> bool {
        let Some(l) = &self.listeners[i].socket else {
            return true;
        };
        let show = |d: Option<Duration>| {
            d.map_or_else(
                || "off".to_string(),
                |d| humantime::format_duration(d).to_string(),
            )
        };
        let (now, was) = (
            show(route.defer_accept),
            show(self.routes[i].config.defer_accept),
        );
        let name = &route.name;
        match net::set_defer_accept(l, route.defer_accept) {
            Ok(()) => {
                if self.index == 0 {
                    info!("reload: route `{name}`: defer_accept is now {now} (was {was})");
                }
                true
            }
            Err(e) => {
                warn!("reload: route `{name}`: cannot set defer_accept to {now}, {was} stays: {e}");
                false
            }
        }
    }

    /// True when the global or the route's connection limit is reached, or when kernel pipes
    /// hold the descriptors that one more connection needs (see [`fd_budget`]).
    fn at_limit(&self, route: usize) -> bool {
        // Workers check and count separately, so N workers may overshoot by at most N - 1.
        self.shared.stats.active.load(Ordering::Relaxed) as usize >= self.shared.max_connections
            || self.shared.route_active[route].load(Ordering::Relaxed)
                >= self.routes[route].config.max_connections
            || !fd_budget::has_room()
    }

    /// A client waits in route `i`'s listen backlog because accepting is paused at a limit,
    /// which an operator should know about. A warning at once, then at most every 10 s per
    /// route (and worker) with the number of such arrivals since.
    fn warn_limit(&mut self, i: usize, now: Instant) {
        let active = self.shared.stats.active.load(Ordering::Relaxed) as usize;
        let route = &self.routes[i];
        let which = if active >= self.shared.max_connections {
            format!(
                "max_connections = {} (all routes)",
                self.shared.max_connections
            )
        } else if self.shared.route_active[i].load(Ordering::Relaxed)
            >= route.config.max_connections
        {
            format!(
                "the route's max_connections = {}",
                route.config.max_connections
            )
        } else {
            format!(
                "the open-file limit ({active} connections, {} descriptor pairs held, kernel pipes \
                 included)",
                fd_budget::used()
            )
        };
        let (last, since) = &mut self.listeners[i].limit_warning;
        *since += 1;
        if last.is_some_and(|t| now < t + Duration::from_secs(10)) {
            debug!(
                "route `{}`: at {which}, accepting paused",
                route.config.name
            );
            return;
        }
        let again = if *since > 1 {
            format!(" ({} arrivals since the last warning)", *since)
        } else {
            String::new()
        };
        warn!(
            "route `{}`: at {which}: accepting paused, new clients wait in the listen backlog \
             until a connection ends{again}",
            route.config.name
        );
        *last = Some(now);
        *since = 0;
    }

    fn accept(&mut self, i: usize, now: Instant) {
        // A limit met before accepting anything here means a client waits (this is its
        // listener's event); met after accepting, it was just reached.
        let mut accepted = false;
        loop {
            let l = &mut self.listeners[i];
            if l.socket.is_none() || l.paused_until.is_some_and(|t| now < t) {
                return;
            }
            l.paused_until = None;
            if self.at_limit(i) {
                // Leave connections in the kernel's backlog; resume when a slot frees.
                if !accepted {
                    self.warn_limit(i, now);
                } else {
                    debug!(
                        "route `{}`: connection limit reached, accepting paused",
                        self.routes[i].config.name
                    );
                }
                self.listeners[i].blocked_by_limit = true;
                return;
            }
            self.listeners[i].blocked_by_limit = false;
            let Some(socket) = self.listeners[i].socket.as_ref() else {
                return;
            };
            match socket.accept() {
                Ok((stream, peer)) => {
                    self.start_pair(i, stream, peer, now);
                    accepted = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if net::is_resource_exhaustion(&e) => {
                    self.pause_accepting(now, &e);
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends: that one client is gone; keep accepting.
                    debug!("route `{}`: accept: {e}", self.routes[i].config.name);
                    self.shared
                        .stats
                        .accept_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Out of descriptors (or memory): stop accepting on every listener for a while, doubling the
    /// pause up to [`MAX_ACCEPT_BACKOFF`], instead of spinning on accept(2). Pending clients wait
    /// in the kernel's backlog. Warns at most once per 10 s.
    fn pause_accepting(&mut self, now: Instant, e: &io::Error) {
        self.shared
            .stats
            .accept_errors
            .fetch_add(1, Ordering::Relaxed);
        let backoff = self.accept_backoff;
        for l in &mut self.listeners {
            l.paused_until = Some(now + backoff);
        }
        if self
            .last_fd_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_fd_warning = Some(now);
            warn!(
                "{e}: pausing accepts for {backoff:?} ({} connections open)",
                self.pairs.len()
            );
        }
        self.accept_backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
    }

    /// `connect(2)` found no free local port toward `dst`. Each failure is in the metrics and
    /// the connection's close line; this says why and what to do, at most every 10 s (per
    /// worker).
    fn warn_no_local_port(&mut self, dst: SocketAddr, now: Instant) {
        self.port_failures_unwarned += 1;
        if self
            .last_port_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return;
        }
        let failed = std::mem::take(&mut self.port_failures_unwarned);
        let since = match self.last_port_warning.replace(now) {
            Some(_) => format!(" ({failed} failed connects since the previous warning)"),
            None => String::new(),
        };
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join("-"))
            .unwrap_or_else(|_| "?".into());
        warn!(
            "no free local port to connect to {dst}{since}: every port of \
             net.ipv4.ip_local_port_range ({range}) is in use toward that address, usually by \
             this proxy's TIME_WAIT sockets to it (clients that close first leave one per \
             connection for 60 s). Set net.ipv4.tcp_tw_reuse=1, widen the range, or give the \
             route more upstream addresses"
        );
    }

    fn start_pair(
        &mut self,
        route_idx: usize,
        downstream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let route = &self.routes[route_idx];
        // The address the client connected to matters only to transparent mode and PROXY headers.
        let c = &route.config;
        let local = if c.original_destination || c.send_proxy_protocol.is_some() || c.transparent {
            downstream
                .local_addr()
                .unwrap_or(self.listeners[route_idx].local)
        } else {
            self.listeners[route_idx].local
        };
        let entry = self.pairs.vacant_entry();
        let key = entry.key();
        let meta = Arc::new(ConnMeta {
            id,
            route: route.name.clone(),
            downstream: peer,
            // Until the destination is known (original destination, PROXY header), the address
            // the client connected to stands in.
            upstream: route.config.upstream.first().copied().unwrap_or(local),
        });
        debug!(
            "#{id} {peer}: accepted on route `{}` ({local})",
            route.config.name
        );
        let (phase, deadline) = if route.config.accept_proxy_protocol {
            let deadline = now + route.config.proxy_protocol_timeout;
            (Phase::AwaitingHeader { deadline }, deadline)
        } else {
            let deadline = now + route.config.connect_timeout;
            (Phase::Connecting { deadline }, deadline)
        };
        let slot = route.metrics_slot;
        entry.insert(Pair {
            meta,
            route: route_idx,
            metrics: slot,
            idle_timeout: route.config.idle_timeout,
            fds: fd_budget::Slot::connection(),
            downstream,
            upstream: None,
            local,
            backend: None,
            tried: Vec::new(),
            set_epoch: route.set_epoch,
            phase,
            pipes: {
                // Zero-copy whenever no tap needs the bytes (see `Pair::pump`).
                let zero_copy = self.shared.config.splice;
                let mut p = [
                    Pipe::new(Direction::DownToUp),
                    Pipe::new(Direction::UpToDown),
                ];
                p[0].zero_copy = zero_copy;
                p[1].zero_copy = zero_copy;
                p
            },
            ready: [
                // Just accepted: its send buffer is empty.
                Readiness {
                    writable: true,
                    ..Readiness::default()
                },
                Readiness::default(),
            ],
            // The client's socket is registered once its first bytes were looked at (below).
            interest: [Registered::No, Registered::No],
            started: now,
            last_active: now,
            first_fin: None,
            tap: route.tap.clone().map(|handle| PairTap {
                handle,
                dropped_records: 0,
                dropped_bytes: 0,
            }),
            scheduled: false,
            timer_at: Some(deadline),
            header: Vec::new(),
            connect_started: now,
            own_upstream: None,
        });
        self.shared.route_active[route_idx].fetch_add(1, Ordering::Relaxed);
        self.shared.stats.active.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.route(slot).on_accept();
        self.timers.push(Reverse((deadline, key, id)));
        if let Phase::Connecting { .. } = phase {
            if let Some(reason) = self.begin_connect(key, None, now) {
                self.closing.push((key, id, reason));
                return;
            }
            self.accept_backoff = MIN_ACCEPT_BACKOFF;
            if !self.pairs[key].ready[Side::Upstream.index()].connected {
                // The client's bytes wait in the kernel until the connect completes.
                if let Some(reason) = self.update_interest(key) {
                    self.closing.push((key, id, reason));
                }
                return;
            }
        }
        // A PROXY header to read, or an upstream connected already (loopback): what the client
        // sent meanwhile is read in this turn, and its socket registered after that read (see
        // `drive`), so that it reports only later bytes: they would otherwise bring one more
        // event.
        let pair = &mut self.pairs[key];
        pair.ready[Side::Downstream.index()].readable = true;
        pair.scheduled = true;
        self.work.push((key, id));
    }

    /// Chooses the pair's destination (its original destination, or a backend picked by the
    /// route's policy) and starts the upstream connect. `header_dst` is the destination from
    /// the client's PROXY protocol header, if any.
    fn begin_connect(
        &mut self,
        key: usize,
        header_dst: Option<SocketAddr>,
        now: Instant,
    ) -> Option<CloseReason> {
        let route_idx = self.pairs[key].route;
        let dst = if self.routes[route_idx].config.original_destination {
            match self.original_destination(key, header_dst) {
                Ok(d) => d,
                Err(reason) => return Some(reason),
            }
        } else {
            let set = &mut self.sets[route_idx];
            let Some(idx) = set.pick() else {
                return Some(CloseReason::Refused(
                    "no upstream address is available".into(),
                ));
            };
            set.on_open(idx);
            let addr = set.backend(idx).map(|b| b.addr())?;
            let pair = &mut self.pairs[key];
            pair.backend = Some(idx);
            pair.tried.push(idx);
            // The set the backend was counted in: a reload may have replaced the route's set
            // since this client was accepted (while its PROXY header was awaited), and its
            // close must be counted in the set its open was.
            pair.set_epoch = self.routes[route_idx].set_epoch;
            addr
        };
        let route = &self.routes[route_idx].config;
        let pair = &mut self.pairs[key];
        if let Some(version) = route.send_proxy_protocol {
            // The backend learns who the client really was and where it was going. The header
            // waits in the buffer until a connect succeeds, whichever backend that is.
            let proxy_dst = header_dst.unwrap_or(if route.original_destination {
                dst
            } else {
                pair.local
            });
            let mut header = Vec::with_capacity(64);
            match version {
                ProxyProtocolVersion::V1 => {
                    proxy_protocol::encode_v1(pair.meta.downstream, proxy_dst, &mut header)
                }
                ProxyProtocolVersion::V2 => {
                    proxy_protocol::encode_v2(pair.meta.downstream, proxy_dst, &mut header)
                }
            }
            pair.pipes[Direction::DownToUp.index()].prefix(&mut self.pool, &header);
            // `drive` counts what pumping changes, so it takes the header off as it is written
            // (and `close` whatever is left): count it in here.
            self.shared
                .metrics
                .route(pair.metrics)
                .add_buffered(header.len() as i64);
        }
        match self.connect_to(key, dst, now) {
            None => None,
            Some(reason) => self.retry_connect(key, reason, now),
        }
    }

    /// Starts a non-blocking connect of pair `key` to `dst`, replacing any earlier attempt.
    fn connect_to(&mut self, key: usize, dst: SocketAddr, now: Instant) -> Option<CloseReason> {
        let pair = &mut self.pairs[key];
        let route = &self.routes[pair.route].config;
        if pair.meta.upstream != dst {
            let mut meta = (*pair.meta).clone();
            meta.upstream = dst;
            pair.meta = Arc::new(meta);
        }
        let registry = self.poll.registry();
        if let Some(mut old) = pair.upstream.take() {
            let _ = registry.deregister(&mut old);
        }
        if let Some(own) = pair.own_upstream.take() {
            lock(&self.shared.own_upstreams).remove(&own);
        }
        pair.ready[Side::Upstream.index()] = Readiness::default();
        pair.interest[Side::Upstream.index()] = Registered::No;
        let mut stream = match net::connect_upstream(dst, &self.shared.config.socket) {
            Ok(s) => s,
            Err(e) => {
                self.shared
                    .metrics
                    .route(pair.metrics)
                    .on_connect_failure(ConnectFailure::of_error(&e));
                if net::is_resource_exhaustion(&e) {
                    self.pause_accepting(now, &e);
                }
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    self.warn_no_local_port(dst, now);
                }
                return Some(CloseReason::ConnectFailed(e));
            }
        };
        // Over loopback the handshake runs within connect(2) (unless the listener's queue is
        // full): one getpeername(2) tells, and no writable edge need say it. A remote upstream
        // cannot have answered yet: not asked.
        let connected = dst.ip().is_loopback() && stream.peer_addr().is_ok();
        let (interest, registered) = if connected {
            (READ, Registered::Read)
        } else {
            (READ_WRITE, Registered::ReadWrite)
        };
        if let Err(e) = registry.register(&mut stream, Token(key << 1 | 1), interest) {
            return Some(CloseReason::ConnectFailed(e));
        }
        pair.interest[Side::Upstream.index()] = registered;
        if connected {
            pair.ready[Side::Upstream.index()] = Readiness {
                writable: true,
                connected: true,
                ..Readiness::default()
            };
        }
        debug!(
            "#{} {}: {} to {dst}",
            pair.meta.id,
            pair.meta.downstream,
            if connected {
                "connected within connect(2)"
            } else {
                "connecting"
            }
        );
        if route.original_destination {
            // connect(2) has bound the socket: its local address is known now.
            if let Ok(own) = stream.local_addr() {
                lock(&self.shared.own_upstreams).insert(own);
                pair.own_upstream = Some(own);
            }
        }
        pair.upstream = Some(stream);
        pair.connect_started = now;
        pair.tap_connect();
        let deadline = now + route.connect_timeout;
        pair.phase = Phase::Connecting { deadline };
        // The pair's timer may already be this deadline (armed at accept, in the same round).
        if pair.timer_at != Some(deadline) {
            pair.timer_at = Some(deadline);
            self.timers.push(Reverse((deadline, key, pair.meta.id)));
        }
        None
    }

    /// After a failed or timed-out connect: tries the route's next backend (policy order,
    /// healthy first, at most `connect_attempts` in all). Returns the reason to close the pair
    /// when no attempt is left.
    fn retry_connect(
        &mut self,
        key: usize,
        mut reason: CloseReason,
        now: Instant,
    ) -> Option<CloseReason> {
        let route_idx = self.pairs[key].route;
        loop {
            let pair = &mut self.pairs[key];
            let set = &mut self.sets[route_idx];
            if pair.set_epoch != self.routes[route_idx].set_epoch {
                // The set was replaced by a reload: start over in the new one.
                pair.set_epoch = self.routes[route_idx].set_epoch;
                pair.backend = None;
                pair.tried.clear();
            }
            if let Some(idx) = pair.backend.take() {
                set.on_close(idx);
            }
            if self.routes[route_idx].config.original_destination {
                return Some(reason); // one destination only
            }
            let Some(next) = set.next_after_failure(&pair.tried) else {
                return Some(reason);
            };
            let Some(addr) = set.backend(next).map(|b| b.addr()) else {
                return Some(reason);
            };
            set.on_open(next);
            pair.backend = Some(next);
            pair.tried.push(next);
            debug!(
                "#{} {}: {} ({reason}); trying {addr}",
                pair.meta.id, pair.meta.downstream, pair.meta.upstream
            );
            match self.connect_to(key, addr, now) {
                None => return None,
                Some(r) => reason = r,
            }
        }
    }

    /// Where a connection on an `original-destination` route was going, or why it is refused.
    /// A refused destination is still shown as the pair's upstream in the close line.
    fn original_destination(
        &mut self,
        key: usize,
        header_dst: Option<SocketAddr>,
    ) -> Result<SocketAddr, CloseReason> {
        let pair = &self.pairs[key];
        let route = &self.routes[pair.route].config;
        if lock(&self.shared.own_upstreams).contains(&pair.meta.downstream) {
            return Err(CloseReason::Refused(
                "connection loop: the client is this proxy's own upstream connection \
                 (exclude the proxy's traffic from the REDIRECT rule)"
                    .into(),
            ));
        }
        let dst = match header_dst {
            Some(d) => d,
            None if route.transparent => pair.local,
            None => {
                let d = orig_dst::original_destination(&pair.downstream).map_err(|e| {
                    CloseReason::Refused(format!(
                        "no original destination ({e}); was the connection redirected?"
                    ))
                })?;
                // Without a redirect, conntrack reports the address the client connected to: us.
                if d == pair.local {
                    return Err(CloseReason::Refused(format!(
                        "{d} is this proxy's own address: the connection was not redirected"
                    )));
                }
                d
            }
        };
        let own = self.listeners.iter().any(|l| {
            l.local == dst
                || (l.local.ip().is_unspecified()
                    && l.local.port() == dst.port()
                    && (dst.ip().is_loopback() || dst.ip() == pair.local.ip()))
        });
        let allowed = &route.allowed_destinations;
        let refusal = if own {
            Some(format!(
                "{dst} is this proxy's own listener; not proxying to itself"
            ))
        } else if !allowed.is_empty() && !allowed.iter().any(|r| r.matches(dst)) {
            Some(format!("{dst} is not in allowed_destinations"))
        } else {
            None
        };
        if let Some(why) = refusal {
            let pair = &mut self.pairs[key];
            let mut meta = (*pair.meta).clone();
            meta.upstream = dst;
            pair.meta = Arc::new(meta);
            return Err(CloseReason::Refused(why));
        }
        Ok(dst)
    }

    /// Reads the client's PROXY protocol header without reading past it: peeks, parses, then
    /// consumes exactly the header's bytes.
    fn read_proxy_header(&mut self, key: usize, now: Instant) -> Drive {
        const CLOSED: &str = "client closed before sending its PROXY protocol header";
        loop {
            let pair = &mut self.pairs[key];
            if !pair.ready[Side::Downstream.index()].readable {
                return Drive::Idle;
            }
            // v1 fits in 107 bytes; v2 says its length in its first 16.
            let want = match pair.header.get(..proxy_protocol::V2_FIXED_LEN) {
                Some(h) if h.starts_with(&proxy_protocol::V2_SIGNATURE) => {
                    proxy_protocol::V2_FIXED_LEN + usize::from(u16::from_be_bytes([h[14], h[15]]))
                }
                _ => proxy_protocol::V1_MAX_LEN + 1,
            };
            pair.header.resize(want, 0);
            let n = match pair.downstream.peek(&mut pair.header) {
                Ok(0) => return Drive::Close(CloseReason::Refused(CLOSED.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pair.ready[Side::Downstream.index()].readable = false;
                    return Drive::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Drive::Close(pair::classify(Side::Downstream, e)),
            };
            pair.header.truncate(n);
            match proxy_protocol::parse(&pair.header) {
                Err(e) => return Drive::Close(CloseReason::BadProxyHeader(e)),
                Ok(Parsed::Incomplete) => {
                    if n == want && want > proxy_protocol::V1_MAX_LEN {
                        continue; // a v2 header longer than the first peek: peek again, larger
                    }
                    if n >= want {
                        continue; // now that 16 bytes are in, the v2 length is known
                    }
                    if pair.ready[Side::Downstream.index()].closing {
                        // The client closed after a header prefix: the rest will never come.
                        return Drive::Close(CloseReason::Refused(CLOSED.into()));
                    }
                    // Everything the kernel has is a header prefix: wait for more.
                    pair.ready[Side::Downstream.index()].readable = false;
                    return Drive::Idle;
                }
                Ok(Parsed::Complete { header, consumed }) => {
                    let mut left = consumed;
                    let mut sink = [0u8; 512];
                    while left > 0 {
                        let chunk = left.min(sink.len());
                        match (&pair.downstream).read(&mut sink[..chunk]) {
                            Ok(0) => {
                                return Drive::Close(CloseReason::Refused("client closed".into()));
                            }
                            Ok(k) => left -= k,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            // The peeked bytes are in the kernel: a read cannot block here.
                            Err(e) => return Drive::Close(pair::classify(Side::Downstream, e)),
                        }
                    }
                    pair.header = Vec::new();
                    let mut header_dst = None;
                    if let Some((src, dst)) = header.addrs {
                        debug!(
                            "#{} {}: PROXY header says client {src}, destination {dst}",
                            pair.meta.id, pair.meta.downstream
                        );
                        let mut meta = (*pair.meta).clone();
                        meta.downstream = src;
                        pair.meta = Arc::new(meta);
                        header_dst = Some(dst);
                    }
                    if let Some(reason) = self.begin_connect(key, header_dst, now) {
                        return Drive::Close(reason);
                    }
                    return Drive::Idle;
                }
            }
        }
    }

    /// Drives every pair that had events or yielded, until the work list is empty or every pair is
    /// waiting for the kernel.
    fn drive_work(&mut self, now: Instant) {
        self.work.append(&mut self.again);
        let mut work = std::mem::take(&mut self.work);
        for &(key, id) in &work {
            match self.pairs.get_mut(key) {
                Some(p) if p.meta.id == id => p.scheduled = false,
                _ => continue,
            }
            if self.closing.iter().any(|(k, i, _)| *k == key && *i == id) {
                continue;
            }
            match self.drive(key, now) {
                Drive::Idle => {}
                Drive::Yielded => {
                    let p = &mut self.pairs[key];
                    p.scheduled = true;
                    self.again.push((key, id));
                }
                Drive::Close(reason) => self.closing.push((key, id, reason)),
            }
        }
        work.clear();
        self.work = work;
    }

    fn drive(&mut self, key: usize, now: Instant) -> Drive {
        if !matches!(self.pairs[key].phase, Phase::Established) {
            if let Some(drive) = self.connect_phase(key, now) {
                // Still waiting (more of a PROXY header, or an upstream connect): a client read
                // for the first time is registered now.
                let first = self.pairs[key].interest[Side::Downstream.index()] == Registered::No;
                if first && !matches!(drive, Drive::Close(_)) {
                    if let Some(reason) = self.update_interest(key) {
                        return Drive::Close(reason);
                    }
                }
                return drive;
            }
        }
        let pair = &mut self.pairs[key];
        let before = pair.offsets();
        let buffered = pair.buffered();
        let mut drive = pair.pump(&mut self.pool, &mut self.pipes, self.budget, now);
        if let Drive::Idle = drive {
            if let Some(reason) = pair.settle_errors() {
                drive = Drive::Close(reason);
            }
        }
        let m = self.shared.metrics.route(pair.metrics);
        for dir in Direction::BOTH {
            let moved = pair.pipes[dir.index()].read_total() - before[dir.index()];
            if moved > 0 {
                m.add_bytes(dir, moved);
            }
        }
        let now_buffered = pair.buffered();
        if now_buffered != buffered {
            m.add_buffered(now_buffered as i64 - buffered as i64);
        }
        if pair.interest_due() && !matches!(drive, Drive::Close(_)) {
            if let Some(reason) = self.update_interest(key) {
                return Drive::Close(reason);
            }
        }
        drive
    }

    /// The phases before bytes flow: the client's PROXY protocol header, then the upstream
    /// connect. `None` once connected (the pumps run now), else what [`drive`](Self::drive)
    /// returns. Out of line: a connection passes here once or twice.
    #[inline(never)]
    fn connect_phase(&mut self, key: usize, now: Instant) -> Option<Drive> {
        if let Phase::AwaitingHeader { .. } = self.pairs[key].phase {
            match self.read_proxy_header(key, now) {
                // The header started a connect that completed at once (loopback): no event
                // will say so.
                Drive::Idle if self.pairs[key].ready[Side::Upstream.index()].connected => {}
                drive => return Some(drive),
            }
        }
        loop {
            let pair = &mut self.pairs[key];
            let up = pair.ready[Side::Upstream.index()];
            if !up.writable && !up.readable {
                return Some(Drive::Idle);
            }
            match pair.check_connected() {
                Ok(false) => {
                    // Not yet: wait for the next writable edge.
                    pair.ready[Side::Upstream.index()] = Readiness::default();
                    return Some(Drive::Idle);
                }
                Ok(true) => {
                    debug!(
                        "#{} {}: connected to {} in {:?}",
                        pair.meta.id,
                        pair.meta.downstream,
                        pair.meta.upstream,
                        now.duration_since(pair.started)
                    );
                    pair.last_active = now;
                    pair.tap_open();
                    self.shared
                        .metrics
                        .route(pair.metrics)
                        .on_connected(now.duration_since(pair.connect_started));
                    if let Some(t) = pair.deadline() {
                        // Arm the idle timer now only if it is due before the connect timer
                        // still in the heap (which re-arms itself when it fires).
                        if pair.timer_at.is_none_or(|at| t < at) {
                            pair.timer_at = Some(t);
                            self.timers.push(Reverse((t, key, pair.meta.id)));
                        }
                    }
                    return None;
                }
                Err(e) => {
                    self.shared
                        .metrics
                        .route(pair.metrics)
                        .on_connect_failure(ConnectFailure::of_error(&e));
                    if let Some(reason) =
                        self.retry_connect(key, CloseReason::ConnectFailed(e), now)
                    {
                        return Some(Drive::Close(reason));
                    }
                    // The next backend: connected at once (loopback), or wait for its event.
                }
            }
        }
    }

    /// Registers a client's socket once its first bytes were read, or its PROXY header looked at
    /// (see [`start_pair`](Self::start_pair)), and adds the writable interest to the sockets
    /// registered for reads only whose write would block (see [`Registered`]). Registering
    /// polls the socket, so bytes or room that came meanwhile are reported. Once or twice per
    /// connection at most: out of line.
    #[inline(never)]
    fn update_interest(&mut self, key: usize) -> Option<CloseReason> {
        let pair = &mut self.pairs[key];
        let registry = self.poll.registry();
        let down = Side::Downstream.index();
        if pair.interest[down] == Registered::No {
            let (interest, registered) = if pair.ready[down].writable {
                (READ, Registered::Read)
            } else {
                (READ_WRITE, Registered::ReadWrite)
            };
            if let Err(e) = registry.register(&mut pair.downstream, Token(key << 1), interest) {
                warn!(
                    "#{} {}: cannot register socket: {e}",
                    pair.meta.id, pair.meta.downstream
                );
                return Some(CloseReason::Error(Side::Downstream, e));
            }
            pair.interest[down] = registered;
        }
        for side in [Side::Downstream, Side::Upstream] {
            if !pair.write_blocked(side) {
                continue;
            }
            let token = Token(key << 1 | side.index());
            let Some(stream) = (match side {
                Side::Downstream => Some(&mut pair.downstream),
                Side::Upstream => pair.upstream.as_mut(),
            }) else {
                continue;
            };
            if let Err(e) = registry.reregister(stream, token, READ_WRITE) {
                return Some(CloseReason::Error(side, e));
            }
            pair.interest[side.index()] = Registered::ReadWrite;
        }
        None
    }

    /// Whether the heap entry `(t, key, id)` is its pair's armed timer.
    fn live_timer(&self, t: Instant, key: usize, id: u64) -> bool {
        self.pairs
            .get(key)
            .is_some_and(|p| p.meta.id == id && p.timer_at == Some(t))
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, key, id))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if !self.live_timer(t, key, id) {
                continue; // its pair is gone, or the entry was superseded
            }
            let pair = &mut self.pairs[key];
            pair.timer_at = None;
            match pair.deadline() {
                Some(d) if d <= now => {
                    let reason = match pair.phase {
                        Phase::AwaitingHeader { .. } => Some(CloseReason::ProxyHeaderTimeout),
                        Phase::Connecting { .. } => {
                            self.shared
                                .metrics
                                .route(pair.metrics)
                                .on_connect_failure(ConnectFailure::Timeout);
                            // A backend that does not answer: try the next one.
                            let reason = self.retry_connect(key, CloseReason::ConnectTimeout, now);
                            let pair = &mut self.pairs[key];
                            if reason.is_none()
                                && pair.ready[Side::Upstream.index()].connected
                                && !pair.scheduled
                            {
                                // Connected already (loopback): no event will say so.
                                pair.scheduled = true;
                                self.again.push((key, id));
                            }
                            reason
                        }
                        Phase::Established => Some(CloseReason::IdleTimeout),
                    };
                    if let Some(reason) = reason {
                        self.closing.push((key, id, reason));
                    }
                }
                Some(d) => {
                    pair.timer_at = Some(d);
                    self.timers.push(Reverse((d, key, id)));
                }
                None => {}
            }
        }
    }

    fn close_pending(&mut self) {
        let mut closing = std::mem::take(&mut self.closing);
        for (key, id, reason) in closing.drain(..) {
            if self.pairs.get(key).is_none_or(|p| p.meta.id != id) {
                continue; // closed twice in one batch (e.g. error event, then timer)
            }
            self.close(key, reason);
        }
        self.closing = closing;
    }

    /// A client reset because its upstream could not be reached (after every retry). Per-connection
    /// lines may be off under load (`tcptap::conn=warn`): this says it at warn level, at once for
    /// the first failure, then at most every 10 s per route (and worker) with the count since.
    fn warn_connect_failure(&mut self, route: usize, reason: &CloseReason, upstream: SocketAddr) {
        if let CloseReason::ConnectFailed(e) = reason {
            // No local port: `warn_no_local_port` explains it; out of descriptors: the
            // budget's and accept's warnings do.
            if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) || net::is_resource_exhaustion(e) {
                return;
            }
        }
        let r = &mut self.routes[route];
        if r.config.original_destination {
            return; // the clients chose those destinations: their close lines say it
        }
        let now = Instant::now();
        let (last, unwarned) = &mut r.connect_warning;
        *unwarned += 1;
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return;
        }
        let since = match last.replace(now) {
            Some(_) => {
                format!(" ({unwarned} connections failed to connect since the previous warning)")
            }
            None => String::new(),
        };
        *unwarned = 0;
        let what = match reason {
            CloseReason::ConnectFailed(e) => format!("cannot connect to {upstream}: {e}"),
            _ => format!("connecting to {upstream} timed out"),
        };
        warn!("route `{}`: {what}; its client was reset{since}", r.name);
    }

    fn close(&mut self, key: usize, reason: CloseReason) {
        let pair = self.pairs.remove(key);
        // No deregister: closing a descriptor removes it from the epoll set (these sockets are
        // never duplicated), which saves two syscalls per connection.
        let route = pair.route;
        if let Some(own) = pair.own_upstream {
            lock(&self.shared.own_upstreams).remove(&own);
        }
        if let Some(idx) = pair.backend {
            if pair.set_epoch == self.routes[pair.route].set_epoch {
                self.sets[pair.route].on_close(idx);
            }
        }
        if matches!(
            reason,
            CloseReason::ConnectFailed(_) | CloseReason::ConnectTimeout
        ) {
            self.warn_connect_failure(route, &reason, pair.meta.upstream);
        }
        self.shared.route_active[pair.route].fetch_sub(1, Ordering::Relaxed);
        let stats = &self.shared.stats;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        stats.closed.fetch_add(1, Ordering::Relaxed);
        match &reason {
            CloseReason::Reset(_) | CloseReason::Error(..) => {
                stats.resets.fetch_add(1, Ordering::Relaxed)
            }
            CloseReason::IdleTimeout => stats.timeouts.fetch_add(1, Ordering::Relaxed),
            CloseReason::Shutdown | CloseReason::Stopped => {
                stats.shutdown_aborts.fetch_add(1, Ordering::Relaxed)
            }
            CloseReason::ConnectFailed(_) | CloseReason::ConnectTimeout => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed)
            }
            _ => 0,
        };
        let meta = pair.meta.clone();
        let duration = pair.started.elapsed();
        let m = self.shared.metrics.route(pair.metrics);
        m.on_close(CloseCause::of(&reason));
        let buffered = pair.buffered();
        if buffered > 0 {
            m.add_buffered(-(buffered as i64));
        }
        let ends =
            Direction::BOTH.map(|dir| DirEnd::of(dir, pair.pipes[dir.index()].state(), &reason));
        let access = self.shared.access_log.as_ref();
        let totals = pair.finish(&reason, &mut self.pool, access.is_some());
        // Counted by `finish`: the records of the end (reset, close) may have been dropped too.
        let (tap_records, tap_bytes) = totals.tap_dropped;
        let (discarded, offsets) = (totals.discarded, totals.received);
        if let (Some(access), Some(delivered)) = (access, totals.delivered) {
            access.log(&ConnSummary {
                id: meta.id,
                start: SystemTime::now() - duration,
                duration,
                route: meta.route.clone(),
                client: meta.downstream,
                upstream: meta.upstream,
                bytes_d2u: offsets[0],
                bytes_u2d: offsets[1],
                delivered_d2u: delivered[0],
                delivered_u2d: delivered[1],
                end: CloseCause::of(&reason),
                d2u_end: ends[0],
                u2d_end: ends[1],
                tap_dropped_records: tap_records,
                tap_dropped_bytes: tap_bytes,
            });
        }
        stats.bytes_d2u.fetch_add(offsets[0], Ordering::Relaxed);
        stats.bytes_u2d.fetch_add(offsets[1], Ordering::Relaxed);
        stats.discarded.fetch_add(discarded, Ordering::Relaxed);
        let level = match reason {
            CloseReason::Error(..) => log::Level::Warn,
            _ => log::Level::Info,
        };
        // One line per connection, under its own target so it can be silenced on its own
        // (`RUST_LOG=info,tcptap::conn=warn`); formatted only when it will be written.
        if log::log_enabled!(target: CONN_LOG, level) {
            let mut extra = String::new();
            if discarded > 0 {
                extra.push_str(&format!(", {discarded} buffered bytes discarded"));
            }
            if tap_records > 0 {
                extra.push_str(&format!(
                    ", tap dropped {tap_records} records ({tap_bytes} bytes)"
                ));
            }
            log::log!(
                target: CONN_LOG,
                level,
                "#{} {} -> {}: {reason}; {} bytes to upstream, {} bytes to client, {:.3}s{extra}",
                meta.id,
                meta.downstream,
                meta.upstream,
                offsets[0],
                offsets[1],
                duration.as_secs_f64()
            );
        }
        trace!("pool: {} buffers lent", self.pool.lent());
    }

    fn resume_accepting(&mut self, now: Instant) {
        if !fd_budget::has_room() && self.listeners.iter().any(|l| l.blocked_by_limit) {
            // Idle tee pipes hold descriptors too: give them back while clients wait for some.
            self.trim_tee_pipes();
        }
        for i in 0..self.listeners.len() {
            let l = &self.listeners[i];
            let paused_done = l.paused_until.is_some_and(|t| now >= t);
            let slot_free = l.blocked_by_limit && !self.at_limit(i);
            if paused_done || slot_free {
                self.accept(i, now);
            }
        }
    }

    /// Resets every remaining pair (end of the drain, or immediate stop).
    /// Resets every open connection: at the end of the drain (`Shutdown`), or at once
    /// (`Stopped`).
    fn abort_all(&mut self, reason: fn() -> CloseReason) {
        let keys: Vec<usize> = self.pairs.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason());
        }
    }
}

/// A heartbeat of a worker whose loop has returned.
const FINISHED: u64 = u64::MAX;

/// The first worker whose loop has not turned for longer than `period_ms` at `now_ms`, with how
/// long; `None` when every loop turned since (or has finished).
fn stalled_worker(beats: &[u64], now_ms: u64, period_ms: u64) -> Option<(usize, u64)> {
    (beats.iter().enumerate())
        .filter(|&(_, &b)| b != FINISHED)
        .map(|(i, &b)| (i, now_ms.saturating_sub(b)))
        .find(|&(_, idle)| idle > period_ms)
}

/// See `Shared::parked_signals`.
struct ParkedSignals(Option<signal_hook_mio::v1_0::Signals>);

impl std::fmt::Debug for ParkedSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// Locks a mutex that no code path can poison (nothing panics while holding it).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Live numbers of the taps and the access log, for `/metrics`.
fn extra_gauges(taps: TapStats, access: Option<&AccessLogHandle>) -> ExtraGauges {
    let mut g = ExtraGauges {
        tap_records_written: taps.records_written,
        tap_bytes_written: taps.bytes_written,
        tap_dropped_records: taps.dropped_records,
        tap_dropped_bytes: taps.dropped_bytes,
        tap_write_errors: taps.write_errors,
        ..ExtraGauges::default()
    };
    if let Some(a) = access {
        let s = a.stats();
        g.access_log_written = s.written;
        g.access_log_dropped = s.dropped;
        g.access_log_write_errors = s.write_errors;
    }
    g
}

/// Log target of the per-connection close lines.
pub const CONN_LOG: &str = "tcptap::conn";

/// Routes a process can have over its life, reloads included (metrics slots are preallocated).
pub const MAX_ROUTES: usize = 256;

/// What a reload changes, for one worker.
struct ReloadPlan {
    generation: u64,
    changes: Vec<RouteChange>,
    /// `busy_poll`, which a reload changes at once.
    busy_poll: Option<Duration>,
}

enum RouteChange {
    /// Stop accepting on route `index`; its live connections finish.
    Remove(usize),
    /// New settings for new connections of route `index`; `tap` is `Some` when it changed.
    Update {
        index: usize,
        route: Route,
        tap: Option<Option<TapHandle>>,
        upstreams_changed: bool,
        /// A renamed route's metrics slot.
        metrics_slot: Option<usize>,
    },
    /// A new route with this worker's listener for it.
    Add {
        route: Route,
        tap: Option<TapHandle>,
        listener: TcpListener,
        metrics_slot: usize,
    },
}

/// Reads the config again, binds new listeners and starts new taps, then sends each worker its
/// plan. Runs on its own thread: file reads, DNS and bind never happen on an event loop. Any
/// error rejects the whole reload and the running configuration stays.
fn prepare_reload(
    shared: &Shared,
    path: &std::path::Path,
    overrides: &Overrides,
) -> Result<(), String> {
    let mut new = Config::load(path, overrides).map_err(|e| e.to_string())?;
    if let Some(note) = new.overridden_note() {
        warn!("reload: {note}");
    }
    // The global `max_connections` changes at the next restart (said below), so a route without
    // a limit of its own keeps following the one in force, not the file's new one.
    for r in new.routes.iter_mut().filter(|r| !r.own_max_connections) {
        r.max_connections = shared.config.max_connections;
    }
    // The new limit applies now, to pipes of the size in force until the restart.
    let one_pipe = crate::splice::pipe_cost(shared.config.splice_pipe_size);
    if shared.config.splice && new.splice_memory_limit < one_pipe {
        return Err(format!(
            "{}: `splice_memory_limit`: {} does not hold one pipe of the splice_pipe_size in \
             force ({}; a new splice_pipe_size takes effect at the next restart), so no \
             direction could splice",
            path.display(),
            crate::config::format_size(new.splice_memory_limit as u64),
            crate::config::format_size(one_pipe as u64)
        ));
    }
    let mut current = lock(&shared.current_routes);
    let targets = lock(&shared.reload_targets);
    let workers = targets.len();
    for (what, old, now) in [
        (
            "buffer_size",
            shared.config.buffer_size.get(),
            new.buffer_size.get(),
        ),
        (
            "max_connections",
            shared.config.max_connections,
            new.max_connections,
        ),
        ("workers", shared.config.workers.get(), new.workers.get()),
        (
            "splice_pipe_size",
            shared.config.splice_pipe_size,
            new.splice_pipe_size,
        ),
    ]
    .into_iter()
    .map(|(what, old, now)| (what, old.to_string(), now.to_string()))
    .chain([
        (
            "drain_timeout",
            humantime::format_duration(shared.config.drain_timeout).to_string(),
            humantime::format_duration(new.drain_timeout).to_string(),
        ),
        (
            "listen_backlog",
            shared.config.listen_backlog.to_string(),
            new.listen_backlog.to_string(),
        ),
        (
            "splice",
            shared.config.splice.to_string(),
            new.splice.to_string(),
        ),
    ]) {
        if old != now {
            warn!("reload: `{what}` changes from {old} to {now} at the next restart, not now");
        }
    }
    for (table, changed) in [
        ("[socket]", shared.config.socket != new.socket),
        ("[admin]", shared.config.admin != new.admin),
        ("[access_log]", shared.config.access_log != new.access_log),
    ] {
        if changed {
            warn!("reload: {table} changes at the next restart, not now");
        }
    }
    let key = |r: &Route| (r.name.clone(), r.listen);
    // `transparent` is a property of the listener (`IP_TRANSPARENT`, set when it is bound), and
    // it decides how the original destination is read: a route this reload keeps, with its
    // listener, keeps it too until the next restart.
    for r in new.routes.iter_mut() {
        let Some(o) = current.iter().flatten().find(|o| key(o) == key(r)) else {
            continue;
        };
        if o.transparent != r.transparent {
            warn!(
                "reload: route `{}`: `transparent` changes from {} to {} at the next restart, \
                 not now (its listener stays as it was bound)",
                r.name, o.transparent, r.transparent
            );
            r.transparent = o.transparent;
        }
    }
    let mut changes: Vec<Vec<RouteChange>> = (0..workers).map(|_| Vec::new()).collect();
    let mut summary = (0, 0, 0);
    // Writers in use (by a route, or by open connections of a removed route: they still hold
    // their files) are reused; writers that stopped since the last reload are joined.
    shared.taps.reap();
    // A writer that nothing uses any more may still be writing what was queued for it: a new
    // writer of its file waits for it, as long as an exit would.
    let finish_wait = shared.config.drain_timeout.max(Duration::from_secs(2));
    let tap_for = |tc: &Option<TapConfig>, route: &str| -> Result<Option<TapHandle>, String> {
        let Some(tc) = tc else { return Ok(None) };
        if let Some(h) = shared.taps.find(tc) {
            return Ok(Some(h));
        }
        // A new writer on a file a running one writes would truncate it and interleave
        // the two: the route keeps to the running writer.
        if let Some((key, path, h)) = shared.taps.find_on_file(tc) {
            warn!(
                "reload: route `{route}`: tap {key} {} is written by a running tap with other \
                     settings; the route uses that tap, and the new tap settings take effect at \
                     the next restart",
                path.display()
            );
            return Ok(Some(h));
        }
        let h = shared
            .taps
            .start(tc, finish_wait)
            .map_err(|e| format!("route `{route}`: {e}"))?;
        Ok(Some(h))
    };
    // A new route on the listen address of a route this reload removes (renamed, or two routes
    // that swap addresses) takes over that route's listener: the address could not be bound
    // again while the old route holds it. Its metrics go on under the new name.
    let kept = |o: &Route| new.routes.iter().any(|r| key(r) == key(o));
    let is_new = |r: &Route| !current.iter().flatten().any(|o| key(o) == key(r));
    let mut adopted: Vec<(usize, &Route)> = Vec::new();
    for r in new
        .routes
        .iter()
        .filter(|r| r.listen.port() != 0 && is_new(r))
    {
        let holder = current.iter().position(|o| {
            o.as_ref()
                .is_some_and(|o| o.listen == r.listen && o.transparent == r.transparent && !kept(o))
        });
        if let Some(i) = holder.filter(|i| !adopted.iter().any(|(j, _)| j == i)) {
            adopted.push((i, r));
        }
    }
    // Added routes: bind one listener per worker first, so that a busy port rejects the reload
    // before any new tap opens (and truncates) its file.
    // Metrics slots: routes added or renamed here get new ones, numbered from `first_slot`.
    let first_slot = shared.route_names.read().map_or(0, |n| n.len());
    let mut new_names: Vec<String> = Vec::new();
    let added_routes: Vec<&Route> = (new.routes.iter())
        .filter(|r| is_new(r) && !adopted.iter().any(|(_, a)| std::ptr::eq(*a, *r)))
        .collect();
    // Before anything is bound or started: each added or renamed route takes a slot for good.
    if first_slot + adopted.len() + added_routes.len() > MAX_ROUTES {
        return Err(format!(
            "more than {MAX_ROUTES} routes added or renamed over the process's life; restart to \
             add more"
        ));
    }
    let mut bound = Vec::new();
    for r in added_routes {
        let mut addr = r.listen;
        let mut listeners = Vec::new();
        for _ in 0..workers {
            let l = net::bind_listener(
                &r.name,
                addr,
                shared.config.listen_backlog,
                workers > 1,
                r.transparent,
                r.defer_accept,
                &shared.config.socket,
            )
            .map_err(|e| e.to_string())?;
            addr = l.local_addr().map_err(|e| e.to_string())?;
            listeners.push(l);
        }
        bound.push((r, listeners));
    }
    // The outputs of every tap this reload sets are checked before any tap starts: one that
    // cannot be written rejects the reload before another tap has truncated its pcap.
    for r in new
        .routes
        .iter()
        .filter(|r| !(current.iter().flatten()).any(|o| key(o) == key(r) && o.tap == r.tap))
    {
        for (what, path) in r.tap.iter().flat_map(TapConfig::files) {
            if let Err(e) = crate::config::writable(path) {
                return Err(format!(
                    "route `{}`: tap {what}: cannot write {}: {e}",
                    r.name,
                    path.display()
                ));
            }
        }
    }
    // So is every file a writer still finishing writes (see `TapSet::start`): waited for, all
    // within one wait, and one still stuck then rejects the reload before any tap has started.
    let free_by = Instant::now() + finish_wait;
    for r in &new.routes {
        let Some(tc) = &r.tap else { continue };
        if shared.taps.find(tc).is_some() || shared.taps.find_on_file(tc).is_some() {
            continue; // a running writer is used: nothing is opened again
        }
        (shared.taps.wait_free(tc, free_by)).map_err(|e| format!("route `{}`: {e}", r.name))?;
    }
    // Removed and updated routes.
    for (index, slot) in current.iter().enumerate() {
        let Some(old) = slot else { continue };
        let successor = (new.routes.iter().find(|r| key(r) == key(old)))
            .or_else(|| adopted.iter().find(|(i, _)| *i == index).map(|(_, r)| *r));
        match successor {
            None => {
                summary.1 += 1;
                for c in changes.iter_mut() {
                    c.push(RouteChange::Remove(index));
                }
            }
            Some(r) if r != old => {
                summary.2 += 1;
                if r.name != old.name {
                    info!(
                        "reload: route `{}` on {} is now route `{}`",
                        old.name, old.listen, r.name
                    );
                }
                if re_resolved(r) != re_resolved(old) {
                    warn_resolver_fixed(r);
                }
                let tap = if r.tap != old.tap {
                    Some(tap_for(&r.tap, &r.name)?)
                } else {
                    None
                };
                // A renamed route counts under its new name from here on; the old name's
                // series keeps its counts (and those of its connections still open).
                let metrics_slot = (r.name != old.name).then(|| {
                    new_names.push(r.name.clone());
                    first_slot + new_names.len() - 1
                });
                // A renamed route's set logs under its new name.
                let upstreams_changed = r.upstream_set != old.upstream_set || r.name != old.name;
                let mut route = r.clone();
                if !upstreams_changed {
                    // The loops keep their sets, and with them the board they share.
                    route.upstream_set.board = old.upstream_set.board.clone();
                }
                for c in changes.iter_mut() {
                    c.push(RouteChange::Update {
                        index,
                        route: route.clone(),
                        tap: tap.clone(),
                        upstreams_changed,
                        metrics_slot,
                    });
                }
            }
            Some(_) => {}
        }
    }
    let mut added = Vec::new();
    for (r, listeners) in bound {
        let tap = tap_for(&r.tap, &r.name)?;
        if re_resolved(r).is_some() {
            warn_resolver_fixed(r);
        }
        added.push((r.clone(), tap, listeners));
    }
    summary.0 = added.len();
    for (r, tap, listeners) in added {
        new_names.push(r.name.clone());
        let metrics_slot = first_slot + new_names.len() - 1;
        for (c, listener) in changes.iter_mut().zip(listeners) {
            c.push(RouteChange::Add {
                route: r.clone(),
                tap: tap.clone(),
                listener,
                metrics_slot,
            });
        }
        current.push(Some(r));
    }
    // Bookkeeping for the next reload.
    lock_write(&shared.route_names).extend(new_names);
    for c in changes.first().into_iter().flatten() {
        match c {
            RouteChange::Remove(i) => current[*i] = None,
            RouteChange::Update { index, route, .. } => current[*index] = Some(route.clone()),
            RouteChange::Add { .. } => {}
        }
    }
    refit_fd_budget(&shared.config, &current, shared.max_connections);
    *lock(&shared.health_boards) = health_boards(current.iter().flatten());
    let memory = &shared.metrics.splice_memory;
    if memory.limit() != new.splice_memory_limit {
        info!(
            "reload: splice_memory_limit is now {} (was {})",
            crate::config::format_size(new.splice_memory_limit as u64),
            crate::config::format_size(memory.limit() as u64)
        );
        memory.set_limit(new.splice_memory_limit);
    }
    let generation = shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
    shared.metrics.on_reload(Some(generation));
    for ((tx, waker), changes) in targets.iter().zip(changes) {
        let _ = tx.send(ReloadPlan {
            generation,
            changes,
            busy_poll: new.busy_poll,
        });
        let _ = waker.wake();
    }
    // After the plans are sent: a worker applies its plan before it accepts again.
    info!(
        "reload: configuration generation {generation} from {}: {} route(s) added, {} removed, {} changed",
        path.display(),
        summary.0,
        summary.1,
        summary.2
    );
    Ok(())
}

/// `busy_poll` as the config writes it.
fn fmt_busy_poll(d: Option<Duration>) -> String {
    d.map_or_else(
        || "off".into(),
        |d| humantime::format_duration(d).to_string(),
    )
}

/// `, N workers` after a route's listening line when there are several.
fn workers_note(n: usize) -> String {
    if n > 1 {
        format!(", {n} workers")
    } else {
        String::new()
    }
}

/// ", defer_accept 1s" for a route whose listener defers accepting.
fn defer_note(r: &Route) -> String {
    r.defer_accept.map_or_else(String::new, |d| {
        format!(", defer_accept {}", humantime::format_duration(d))
    })
}

/// Waits until every worker has applied the generation in force (workers apply a plan at their
/// next wake-up, which its sending triggers), for at most a few seconds: a worker that has
/// stopped applies nothing more.
fn wait_applied(shared: &Shared) {
    let generation = shared.generation.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (shared.applied_generation.iter()).any(|g| g.load(Ordering::SeqCst) < generation) {
        if Instant::now() >= deadline || shared.request.load(Ordering::SeqCst) != RUN {
            debug!("reload: generation {generation} not applied by every worker yet");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether `sig`'s disposition is "ignore" (inherited across exec, as `nohup` sets SIGHUP's).
fn signal_ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into a zeroed local.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// What the resolver thread does for a route: its interval and the host names it resolves.
/// The thread is set up at startup; reloads do not change it.
fn re_resolved(r: &Route) -> Option<(Duration, Vec<&str>)> {
    let set = &r.upstream_set;
    let names: Vec<&str> = (set.targets.iter())
        .filter(|t| !t.is_literal())
        .map(|t| t.name.as_str())
        .collect();
    set.resolve_interval
        .filter(|_| !names.is_empty())
        .map(|i| (i, names))
}

fn warn_resolver_fixed(r: &Route) {
    warn!(
        "reload: route `{}`: host names are resolved again (`resolve_interval`) as configured at \
         startup; this route's changes to that take effect at the next restart",
        r.name
    );
}

/// Locks a read-write lock for writing (nothing panics while holding it).
fn lock_write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The health boards of `routes` that have health checks, by route name.
fn health_boards<'a>(routes: impl Iterator<Item = &'a Route>) -> Vec<(String, HealthBoard)> {
    routes
        .filter(|r| r.upstream_set.health_check.is_some())
        .map(|r| (r.name.clone(), r.upstream_set.board.clone()))
        .collect()
}

/// The health of every backend of the routes in force that have health checks, as their
/// probing loop last published it.
fn upstream_health(boards: &[(String, HealthBoard)]) -> Vec<UpstreamUp> {
    boards
        .iter()
        .flat_map(|(route, board)| {
            board.entries().into_iter().map(|e| UpstreamUp {
                route: route.clone(),
                upstream: e.name,
                address: e.addr.to_string(),
                up: e.health == Health::Up,
            })
        })
        .collect()
}

/// The health prober of route `i` (with the set `set`), if it has health checks.
fn prober(set: &UpstreamSet, route: &Route, i: usize) -> Option<Prober> {
    let mut p = Prober::for_set(set, PROBE_BASE + i * PROBE_SPAN, PROBE_SPAN)?;
    p.set_greeting(probe_greeting(route));
    Some(p)
}

/// What a health probe of `route` sends once connected: the PROXY protocol header of a
/// connection of the proxy's own when the route sends one (a backend that expects it would
/// otherwise log every probe as a broken connection), else nothing.
fn probe_greeting(route: &Route) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(v) = route.send_proxy_protocol {
        proxy_protocol::encode_local(v == ProxyProtocolVersion::V2, &mut out);
    }
    out
}

/// Health-probe tokens: route `i` uses `PROBE_BASE + i * PROBE_SPAN ..` (`PROBE_SPAN` probes at
/// most at once). Far above any pair token (`key << 1 | side`), below the reserved ones.
const PROBE_BASE: usize = 1 << (usize::BITS - 2);
const PROBE_SPAN: usize = 64;

/// Idle kernel pipes a worker keeps for reuse (two descriptors each).
pub const PIPE_POOL_MAX: usize = 16;

/// Descriptors kept for the process's own: standard streams, pollers and wakers, the signal
/// pipe, log, tap and access-log files, the resolver, and slack for workers that overshoot a
/// limit together (see [`reserved_descriptors`]).
pub const FD_RESERVE: u64 = 64;

/// Descriptors kept outside the budget that connections and busy kernel pipes share (see
/// [`fd_budget`]): [`FD_RESERVE`], one per listener per worker, the admin endpoint's at its
/// limits, health probes in flight at once, and, with `splice`, each worker's idle pipes.
pub fn reserved_descriptors(config: &Config) -> u64 {
    reserve_for(config, config.routes.iter())
}

/// [`reserved_descriptors`] with `routes` in place of the config's: those a reload leaves.
/// Workers, the admin endpoint and `splice` change only at a restart.
fn reserve_for<'a>(config: &Config, routes: impl Iterator<Item = &'a Route>) -> u64 {
    let workers = config.workers.get() as u64;
    let admin = if config.admin.is_some() {
        crate::admin::MAX_DESCRIPTORS as u64
    } else {
        0
    };
    let (mut listeners, mut probes) = (0, 0);
    for r in routes {
        listeners += workers;
        if r.upstream_set.health_check.is_some() {
            probes += r.upstream.len().min(PROBE_SPAN) as u64 * workers;
        }
    }
    let pools = if config.splice {
        workers * 2 * PIPE_POOL_MAX as u64
    } else {
        0
    };
    FD_RESERVE + listeners + admin + probes + pools
}

/// Sets the budget of descriptor pairs (see [`fd_budget`]) to what the open-file limit leaves
/// past `reserve`, and returns it with the limit; `None` (and no budget) when the limit is
/// infinite.
fn set_fd_budget(reserve: u64) -> Option<(usize, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let cap = (lim.rlim_cur.saturating_sub(reserve) / 2).max(1);
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    fd_budget::set_cap(cap);
    Some((cap, lim.rlim_cur))
}

/// Each pair needs two descriptors: cap `configured` so that accepting stops (clients wait in the
/// backlog) before accept(2) or socket(2) run out of descriptors. Past the `reserve`, the
/// descriptors are the budget that connections and busy kernel pipes share (see [`fd_budget`]).
fn fd_capped_max_connections(configured: usize, reserve: u64) -> usize {
    let Some((cap, limit)) = set_fd_budget(reserve) else {
        return configured;
    };
    if configured > cap {
        info!(
            "max_connections = {configured} needs {} descriptors but the open-file limit is {}; \
             holding at most {cap} connections (raise `ulimit -n` for more)",
            (configured as u128) * 2 + u128::from(reserve),
            limit
        );
        return cap;
    }
    configured
}

/// After a reload: the listeners (and health probes) of the routes it added or removed change the
/// descriptors kept outside the budget, so the budget follows, at the open-file limit of now.
fn refit_fd_budget(config: &Config, routes: &[Option<Route>], max_connections: usize) {
    let before = fd_budget::cap().min(max_connections);
    let reserve = reserve_for(config, routes.iter().flatten());
    if let Some((cap, _)) = set_fd_budget(reserve) {
        let now = cap.min(max_connections);
        if now != before {
            info!(
                "reload: the routes' listeners now keep {reserve} descriptors outside the \
                 budget; holding at most {now} connections (was {before})"
            );
        }
    }
}

/// A route's upstreams for its listening line: as written, with what they resolved to
/// (`db.internal:5432 (10.0.0.7:5432)`); `original-destination` alone.
fn upstream_desc(r: &Route) -> String {
    if r.upstream.is_empty() {
        return r.upstream_name.clone();
    }
    format!("{} ({})", r.upstream_name, fmt_addrs(&r.upstream))
}

fn fmt_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_line_names_the_upstreams_and_what_they_resolved_to() {
        let toml = "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                    [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"original-destination\"\n";
        let c = Config::from_toml_str(toml, "t.toml", &Default::default()).unwrap();
        assert_eq!(upstream_desc(&c.routes[0]), "127.0.0.1:9 (127.0.0.1:9)");
        assert_eq!(upstream_desc(&c.routes[1]), "original-destination");
    }

    #[test]
    fn a_loop_that_stopped_turning_holds_back_the_watchdog() {
        // Worker 1 last turned 900 ms ago, with a period of 500 ms.
        assert_eq!(stalled_worker(&[1000, 100], 1000, 500), Some((1, 900)));
        assert_eq!(stalled_worker(&[1000, 600], 1000, 500), None);
        // A loop that has returned (draining ends unevenly) is not waited for.
        assert_eq!(stalled_worker(&[1000, FINISHED], 1000, 500), None);
        // Nor a clock read before a heartbeat stored after it.
        assert_eq!(stalled_worker(&[1200, 1100], 1000, 500), None);
    }
}
