//! The admin endpoint: a small HTTP/1.1 server serving `GET /metrics` (Prometheus text format),
//! `GET /healthz` (200 `ok`, 503 `draining`) and `GET /connections` (JSON array of live
//! connections).
//!
//! Invariants:
//! - The data path is never blocked or slowed by a request: `/metrics` reads relaxed atomics,
//!   `/healthz` one `AtomicBool`. `/connections` needs the event loop's slab, which only the loop
//!   may touch, so the admin thread puts a [`SnapshotRequest`] in a bounded queue, wakes the loop,
//!   and waits for the answer for at most [`AdminState::snapshot_timeout`] (503 after that). The
//!   loop answers with a `try_send` into a one-slot channel, so it never waits for the admin thread.
//! - One request per connection (`Connection: close`). The request head (request line + headers)
//!   is parsed by `httparse` from at most [`MAX_REQUEST_HEAD`] bytes read within
//!   [`REQUEST_DEADLINE`]; every socket operation has a timeout. A malformed request gets 400, an
//!   oversized head 431, a slow one 408, an unknown path 404, another method than GET/HEAD 405;
//!   none of them ends the server.
//! - No admin client holds up another. One thread accepts; each connection is served by a thread
//!   of its own (blocking I/O with the deadlines above), at most [`MAX_CONNECTIONS`] at once. A
//!   silent or slow client thus costs its own thread its own deadline, while a liveness probe or a
//!   scrape next to it is answered at once. Threads rather than a non-blocking state machine:
//!   `/connections` blocks on the loops' answers, and a thread per connection keeps that and the
//!   deadlines as the straight-line code above; a few dozen mostly idle threads with small stacks
//!   cost little, and the endpoint sees a handful of connections at a time. At the limit, the
//!   connection that has waited longest without being answered (no request yet, or a response
//!   being written or lingered over) is shut down to make room, so idle connections cannot lock
//!   out a probe however many there are; only when every connection is busy computing its
//!   response (or as many again, shut down, are still ending after [`ENDING_WAIT`]) is a new one
//!   refused with a 503 written without waiting. The accepting thread then half-closes it and
//!   reads it on, never waiting on it (its poll reports what to read), until the client closes or
//!   [`REFUSED_LINGER`] passes (at most [`MAX_LINGERING`] at once, the oldest closed first):
//!   closed at once, the connection would be reset by the first
//!   request byte to come in after the close, and the client could see the reset rather than the
//!   503. Both are counted in `/metrics` and logged (a warning at most every
//!   [`LIMIT_WARNING_EVERY`]). No admin thread touches the event loops.
//! - [`AdminServer::shutdown`] (or drop) stops the accepting thread through a `mio::Waker`, shuts
//!   down the socket of every connection still open, so that their threads end at once, and waits
//!   for those threads (a bounded time: a thread waiting for a loop's `/connections` answer ends
//!   within [`AdminState::snapshot_timeout`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use serde::Serialize;

use crate::metrics::{ExtraGauges, Metrics, UpstreamUp};
use crate::pipe::PipeState;

/// Most bytes of request line plus headers accepted; a longer head gets 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Most header fields accepted; more get 431.
pub const MAX_HEADERS: usize = 32;
/// Time a client has to send its whole request head (408 after that).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Time allowed for writing a response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the response, unread request bytes are drained for at most this long / this many bytes
/// before closing, so that closing does not send RST and destroy the response in flight.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;
/// Default for [`AdminState::snapshot_timeout`].
pub const DEFAULT_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);
/// Snapshot requests that may wait for the loop at once; more get 503 at once.
pub const SNAPSHOT_QUEUE: usize = 4;
/// Admin connections served at once, one thread each; see the module documentation for what
/// happens past it.
pub const MAX_CONNECTIONS: usize = 32;

/// Refused connections read until their client is done, at most (see [`Lingering`]).
const MAX_LINGERING: usize = 16;

/// Descriptors the admin endpoint holds at most: its listener and poller, two per connection
/// (the socket and a clone for the deadline watch) for twice [`MAX_CONNECTIONS`] (served, and
/// shut down but still ending), one per lingering refused connection.
pub const MAX_DESCRIPTORS: usize = 2 + 2 * 2 * MAX_CONNECTIONS + MAX_LINGERING;
/// Stack of a connection thread: request parsing and response building keep their buffers on the
/// heap, so this is ample, and it bounds the address space 32 threads reserve.
const CONN_STACK: usize = 256 * 1024;
/// How long a new connection may wait for the threads of connections shut down to make room
/// (which end at once once scheduled) before it is refused.
const ENDING_WAIT: Duration = Duration::from_millis(250);
/// At most one warning about the connection limit per this long.
const LIMIT_WARNING_EVERY: Duration = Duration::from_secs(10);
/// How long the accepting thread goes on reading a refused connection for its client to send its
/// request and close (see [`refuse`]): as long as a served client has to send its request.
const REFUSED_LINGER: Duration = REQUEST_DEADLINE;
/// On shutdown, how long to wait for connection threads beyond the snapshot timeout; the sockets
/// are shut down first, so they normally end at once.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Refused connections being read until their client closes get tokens from here on.
const FIRST_REFUSED: usize = 2;

/// What one direction of a live connection is doing, as shown by `/connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirState {
    /// Bytes flow; no EOF seen yet.
    Open,
    /// EOF was read from the source; buffered bytes are being written before the FIN is passed on.
    Flushing,
    /// The FIN was passed on: this direction is finished, the other may still carry bytes.
    HalfClosed,
    /// The connection is being torn down (reset, error, timeout).
    Closed,
}

impl DirState {
    /// The JSON value, e.g. `half-closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirState::Open => "open",
            DirState::Flushing => "flushing",
            DirState::HalfClosed => "half-closed",
            DirState::Closed => "closed",
        }
    }
}

impl From<PipeState> for DirState {
    fn from(state: PipeState) -> DirState {
        match state {
            PipeState::Open => DirState::Open,
            PipeState::ReadClosed => DirState::Flushing,
            PipeState::WriteShut => DirState::HalfClosed,
        }
    }
}

impl fmt::Display for DirState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One live connection as `/connections` shows it; built by the event loop from its slab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnInfo {
    /// Connection id (`#42` in logs).
    pub id: u64,
    /// Route name.
    pub route: String,
    /// Downstream (client) address.
    pub client: SocketAddr,
    /// Upstream address in use (or being connected to).
    pub upstream: SocketAddr,
    /// Milliseconds since the connection was accepted.
    pub age_ms: u64,
    /// Bytes proxied client → upstream.
    pub bytes_d2u: u64,
    /// Bytes proxied upstream → client.
    pub bytes_u2d: u64,
    /// State of the client → upstream direction.
    pub d2u_state: DirState,
    /// State of the upstream → client direction.
    pub u2d_state: DirState,
}

/// A request from the admin thread for the list of live connections. The event loop answers it
/// with [`SnapshotRequest::answer`], which never blocks.
#[derive(Debug)]
pub struct SnapshotRequest {
    /// One-slot channel back to the waiting admin thread.
    reply: SyncSender<Vec<ConnInfo>>,
}

impl SnapshotRequest {
    /// Sends the snapshot; false when the admin thread stopped waiting (its request timed out).
    pub fn answer(self, conns: Vec<ConnInfo>) -> bool {
        self.reply.try_send(conns).is_ok()
    }
}

/// One event loop as `/connections` reaches it.
#[derive(Clone)]
pub struct SnapshotTarget {
    /// Where snapshot requests go.
    pub snapshots: SyncSender<SnapshotRequest>,
    /// Wakes that loop.
    pub wake: Arc<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for SnapshotTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotTarget").finish_non_exhaustive()
    }
}

/// The queue of snapshot requests: the sender goes into [`AdminState`], the receiver to the loop.
pub fn snapshot_channel() -> (SyncSender<SnapshotRequest>, Receiver<SnapshotRequest>) {
    mpsc::sync_channel(SNAPSHOT_QUEUE)
}

/// For the event loop, after a wake-up: answers every pending snapshot request (at most
/// [`SNAPSHOT_QUEUE`] + 1, so it stays bounded) with one list built by `build`, built only when a
/// request is pending. Returns the number of requests answered.
pub fn answer_snapshots(
    requests: &Receiver<SnapshotRequest>,
    build: impl FnOnce() -> Vec<ConnInfo>,
) -> usize {
    let mut pending = Vec::new();
    while pending.len() <= SNAPSHOT_QUEUE {
        match requests.try_recv() {
            Ok(r) => pending.push(r),
            Err(_) => break,
        }
    }
    let Some(last) = pending.pop() else {
        return 0;
    };
    let conns = build();
    let n = pending.len() + 1;
    for r in pending {
        r.answer(conns.clone());
    }
    last.answer(conns);
    n
}

/// Everything the admin threads read.
pub struct AdminState {
    /// The counters `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// Route names, indexed like the metrics' routes (a reload appends new routes).
    pub routes: Arc<std::sync::RwLock<Vec<String>>>,
    /// Set when the proxy starts draining: `/healthz` then answers 503.
    pub draining: Arc<AtomicBool>,
    /// Called at each scrape for numbers owned by other components (tap, access log).
    pub extra: Box<dyn Fn() -> ExtraGauges + Send + Sync>,
    /// Called at each scrape for the health of the backends of routes with health checks.
    pub upstreams: Box<dyn Fn() -> Vec<UpstreamUp> + Send + Sync>,
    /// One per event loop: where its snapshot requests go (the loop holds the receiver, see
    /// [`snapshot_channel`]) and how to wake it after queueing one (`mio::Waker::wake`).
    /// `/connections` asks every loop and concatenates the answers.
    pub loops: Vec<SnapshotTarget>,
    /// How long `/connections` waits for the loop's answer before giving 503.
    pub snapshot_timeout: Duration,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("routes", &self.routes)
            .field("draining", &self.draining)
            .field("snapshot_timeout", &self.snapshot_timeout)
            .finish_non_exhaustive()
    }
}

/// The running admin server. Dropping it stops it too.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, shuts down the connections still open (a request in progress gets no
    /// response), and joins the threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("admin: cannot wake the admin thread: {e}");
        }
        if thread.join().is_err() {
            warn!("admin: the admin thread panicked");
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn context(addr: SocketAddr, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("admin listener {addr}: {what}: {e}"))
}

/// Binds `addr` and serves the admin endpoints on a new thread.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> Result<AdminServer, io::Error> {
    start_with_limit(addr, state, MAX_CONNECTIONS)
}

/// [`start`] with another limit of connections served at once (tests use a small one).
fn start_with_limit(
    addr: SocketAddr,
    state: Arc<AdminState>,
    limit: usize,
) -> Result<AdminServer, io::Error> {
    let mut listener = TcpListener::bind(addr).map_err(|e| context(addr, "bind", e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| context(addr, "local address", e))?;
    let poll = Poll::new().map_err(|e| context(addr, "poll", e))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| context(addr, "register", e))?;
    let waker =
        Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| context(addr, "waker", e))?);
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared::new(state, limit));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tcptap-admin".into())
            .spawn(move || serve(poll, listener, &stop, &shared))
            .map_err(|e| context(addr, "spawn thread", e))?
    };
    info!("admin endpoint listening on http://{local_addr}/ (/metrics, /healthz, /connections)");
    Ok(AdminServer {
        local_addr,
        stop,
        waker,
        thread: Some(thread),
    })
}

/// What the accepting thread and the connection threads share.
struct Shared {
    state: Arc<AdminState>,
    /// Connections served at once, not counting those shut down whose threads are ending.
    limit: usize,
    /// One slot per connection thread, from the accept until the thread ends.
    conns: Mutex<Vec<Slot>>,
    /// Signalled when a slot is given back.
    conn_ended: Condvar,
    next_id: AtomicU64,
    /// Connections shut down to make room for a new one.
    evicted: AtomicU64,
    /// Connections refused with 503 (or closed when no thread could be started).
    refused: AtomicU64,
}

/// A connection being served, as the accepting thread sees it.
struct Slot {
    id: u64,
    /// The connection's socket (a duplicate descriptor), to shut it down from another thread.
    socket: TcpStream,
    /// Since when the connection has been waiting on its client: its accept, then the start of
    /// its response. The one waiting longest makes room first.
    waiting_since: Instant,
    /// Computing its response: never shut down to make room.
    busy: bool,
    /// Shut down (to make room, or by the server's shutdown): its thread is ending.
    shut: bool,
}

impl Shared {
    fn new(state: Arc<AdminState>, limit: usize) -> Shared {
        Shared {
            state,
            limit,
            conns: Mutex::new(Vec::with_capacity(2 * limit)),
            conn_ended: Condvar::new(),
            next_id: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn conns(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a new connection whose socket is `socket`. At the limit, first shuts down
    /// the connection that has waited longest on its client. `None`: no room (every connection
    /// is busy, or as many threads as the limit are still ending after [`ENDING_WAIT`]).
    fn admit(&self, socket: TcpStream) -> Option<u64> {
        let mut conns = self.conns();
        // Threads still ending count too: threads are bounded by twice the limit. Shut down
        // connections end at once, but a burst of new ones can outrun their threads: wait for
        // them a little rather than refuse.
        let deadline = Instant::now() + ENDING_WAIT;
        while conns.len() >= 2 * self.limit {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            conns = self
                .conn_ended
                .wait_timeout(conns, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if conns.iter().filter(|c| !c.shut).count() >= self.limit {
            let oldest = conns
                .iter_mut()
                .filter(|c| !c.shut && !c.busy)
                .min_by_key(|c| c.waiting_since)?;
            // Its thread's blocked read or write returns at once, and the thread ends.
            let _ = oldest.socket.shutdown(Shutdown::Both);
            oldest.shut = true;
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conns.push(Slot {
            id,
            socket,
            waiting_since: Instant::now(),
            busy: false,
            shut: false,
        });
        Some(id)
    }

    /// Connections being served (not shut down).
    fn active(&self) -> usize {
        self.conns().iter().filter(|c| !c.shut).count()
    }

    /// Shuts down every connection and waits up to `wait` for their threads to give their slots
    /// back; false if some did not.
    fn shut_all_and_wait(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut conns = self.conns();
        for c in conns.iter_mut().filter(|c| !c.shut) {
            let _ = c.socket.shutdown(Shutdown::Both);
            c.shut = true;
        }
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    "admin: {} connection threads still running at shutdown; not waiting for them",
                    conns.len()
                );
                return false;
            }
            conns = self
                .conn_ended
                .wait_timeout(conns, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A connection thread's slot, given back when the thread ends (a panic included).
struct SlotGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl SlotGuard {
    /// Marks the connection as computing its response (`true`) or waiting on its client again.
    /// False when it has been shut down meanwhile.
    fn set_busy(&self, busy: bool) -> bool {
        let mut conns = self.shared.conns();
        let Some(slot) = conns.iter_mut().find(|c| c.id == self.id) else {
            return false;
        };
        if slot.shut {
            return false;
        }
        slot.busy = busy;
        if !busy {
            slot.waiting_since = Instant::now();
        }
        true
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut conns = self.shared.conns();
        conns.retain(|c| c.id != self.id);
        drop(conns);
        self.shared.conn_ended.notify_all();
    }
}

fn serve(mut poll: Poll, listener: TcpListener, stop: &AtomicBool, shared: &Arc<Shared>) {
    let mut events = Events::with_capacity(64);
    let mut last_warning = None;
    // Connection threads not known to have ended: at most twice the limit after each reaping.
    let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(2 * shared.limit);
    let mut refused = Lingering::new(MAX_LINGERING);
    while !stop.load(Ordering::SeqCst) {
        let timeout = refused
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("admin: poll failed, the admin endpoint stops: {e}");
            break;
        }
        let registry = poll.registry();
        for event in &events {
            if event.token().0 >= FIRST_REFUSED {
                refused.readable(registry, event.token());
            }
        }
        refused.expire(registry, Instant::now());
        // Accept until WouldBlock (edge-triggered), checking the stop flag between connections.
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    threads.retain(|t| !t.is_finished());
                    let stream = TcpStream::from(stream);
                    let accepted = accept(shared, stream, peer, &mut last_warning);
                    match accepted {
                        Accepted::Served(t) => threads.push(t),
                        Accepted::Refused(Some((socket, drained))) => {
                            refused.add(registry, socket, drained, Instant::now());
                        }
                        Accepted::Refused(None) => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: give up on this wake-up; the next connection retries.
                    warn!("admin: accept failed: {e}");
                    break;
                }
            }
        }
    }
    drop(listener);
    drop(refused);
    if shared.shut_all_and_wait(shared.state.snapshot_timeout + SHUTDOWN_GRACE) {
        // Every thread gave its slot back, the last thing it does: these joins do not wait.
        for t in threads {
            let _ = t.join();
        }
    }
    debug!("admin: stopped");
}

/// What became of a new connection.
enum Accepted {
    /// Served by this thread.
    Served(JoinHandle<()>),
    /// Refused; the socket, and the request bytes read so far, when it is to be read until its
    /// client closes (see [`refuse`]).
    Refused(Option<(TcpStream, usize)>),
}

/// A refused connection: answered, half-closed, and read until its client closes.
struct RefusedConn {
    socket: mio::net::TcpStream,
    token: Token,
    /// Closed then, whatever the client does.
    deadline: Instant,
    /// Bytes read and thrown away so far.
    drained: usize,
}

/// The refused connections the accepting thread goes on reading, without ever waiting on one: it
/// reads those its poll reports readable, and closes each once its client has closed, has sent
/// [`LINGER_BYTES`], or [`REFUSED_LINGER`] has passed. At most `max` at once: past that, the
/// oldest is closed.
struct Lingering {
    /// Oldest first: every one has the same linger time, so deadlines are in order too.
    conns: std::collections::VecDeque<RefusedConn>,
    max: usize,
    next_token: usize,
}

impl Lingering {
    fn new(max: usize) -> Lingering {
        Lingering {
            conns: std::collections::VecDeque::with_capacity(max),
            max: max.max(1),
            next_token: FIRST_REFUSED,
        }
    }

    /// Starts reading `socket` (non-blocking, answered and half-closed) from which `drained`
    /// bytes were read already.
    fn add(&mut self, registry: &Registry, socket: TcpStream, drained: usize, now: Instant) {
        if self.conns.len() >= self.max {
            if let Some(oldest) = self.conns.pop_front() {
                close_refused(registry, oldest);
            }
        }
        let mut socket = mio::net::TcpStream::from_std(socket);
        let token = Token(self.next_token);
        // Wraps only after usize::MAX connections; the tokens in use are far apart by then.
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_REFUSED);
        // Bytes that arrived since the last read make the registration report it readable.
        if let Err(e) = registry.register(&mut socket, token, Interest::READABLE) {
            debug!("admin: cannot watch a refused connection, closing it: {e}");
            return;
        }
        self.conns.push_back(RefusedConn {
            socket,
            token,
            deadline: now + REFUSED_LINGER,
            drained,
        });
    }

    /// Reads the connection with `token`; closes it once its client is done.
    fn readable(&mut self, registry: &Registry, token: Token) {
        let Some(i) = self.conns.iter().position(|c| c.token == token) else {
            return;
        };
        let c = &mut self.conns[i];
        if drain(&mut c.socket, &mut c.drained) {
            if let Some(c) = self.conns.remove(i) {
                close_refused(registry, c);
            }
        }
    }

    /// Closes the connections whose time is up.
    fn expire(&mut self, registry: &Registry, now: Instant) {
        while self.conns.front().is_some_and(|c| c.deadline <= now) {
            if let Some(c) = self.conns.pop_front() {
                close_refused(registry, c);
            }
        }
    }

    /// When the next connection's time is up.
    fn next_deadline(&self) -> Option<Instant> {
        self.conns.front().map(|c| c.deadline)
    }
}

/// Reads what arrived last (a close with unread bytes is a reset), then closes.
fn close_refused(registry: &Registry, mut c: RefusedConn) {
    drain(&mut c.socket, &mut c.drained);
    let _ = registry.deregister(&mut c.socket);
}

/// Reads and throws away what a refused client sent, until its socket would block. True once
/// nothing more is to be read: the client closed, the connection failed, or it sent
/// [`LINGER_BYTES`].
fn drain(socket: &mut impl Read, drained: &mut usize) -> bool {
    let mut scratch = [0u8; 4096];
    while *drained < LINGER_BYTES {
        match socket.read(&mut scratch) {
            Ok(0) => return true,
            Ok(n) => *drained += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    true
}

/// Hands a new connection (still non-blocking) to a thread of its own, or refuses it.
fn accept(
    shared: &Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    last_warning: &mut Option<Instant>,
) -> Accepted {
    let evicted_before = shared.evicted.load(Ordering::Relaxed);
    let admitted = match stream.try_clone() {
        Ok(socket) => shared.admit(socket),
        Err(e) => {
            debug!("admin: {peer}: cannot duplicate the socket: {e}");
            None
        }
    };
    let Some(id) = admitted else {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        debug!("admin: {peer}: refused, {} connections busy", shared.limit);
        let lingering = refuse(stream);
        warn_at_limit(shared, last_warning);
        return Accepted::Refused(lingering);
    };
    if shared.evicted.load(Ordering::Relaxed) != evicted_before {
        debug!("admin: {peer}: the longest-waiting connection was shut down to make room");
        warn_at_limit(shared, last_warning);
    }
    let slot = SlotGuard {
        shared: shared.clone(),
        id,
    };
    let spawned = std::thread::Builder::new()
        .name("tcptap-admin-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || handle(stream, peer, &slot));
    match spawned {
        Ok(t) => Accepted::Served(t),
        Err(e) => {
            // The closure is dropped with its socket and slot: the client sees the connection close.
            shared.refused.fetch_add(1, Ordering::Relaxed);
            warn!("admin: {peer}: cannot start a thread for the connection: {e}");
            Accepted::Refused(None)
        }
    }
}

/// At most one warning per [`LIMIT_WARNING_EVERY`] about connections shut down or refused.
fn warn_at_limit(shared: &Shared, last_warning: &mut Option<Instant>) {
    if last_warning.is_some_and(|t| t.elapsed() < LIMIT_WARNING_EVERY) {
        return;
    }
    *last_warning = Some(Instant::now());
    warn!(
        "admin: {} connections open at once, the limit (clients that connect and send nothing?): \
         {} shut down to make room and {} refused so far",
        shared.limit,
        shared.evicted.load(Ordering::Relaxed),
        shared.refused.load(Ordering::Relaxed)
    );
}

/// Answers 503 without waiting (the socket is still non-blocking, and a fresh socket's send buffer
/// takes the short response), half-closes, and reads what already arrived of the request. Returns
/// the socket, and the bytes read, while the client has not closed its side: it is to be read on
/// until it does (see [`Lingering`]). Closing it now would reset the connection as soon as a
/// request byte came in after the close (or was left unread), and a client still sending its
/// request would see the reset rather than the 503.
fn refuse(mut stream: TcpStream) -> Option<(TcpStream, usize)> {
    let response = Response::text(503, "too many admin connections\n");
    if write_response(&mut stream, &response, false).is_err()
        || stream.shutdown(Shutdown::Write).is_err()
    {
        return None;
    }
    let mut drained = 0;
    if drain(&mut stream, &mut drained) {
        return None;
    }
    Some((stream, drained))
}

/// An HTTP response: status, content type, body; HEAD requests get the headers only.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    allow: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: false,
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn handle(mut stream: TcpStream, peer: SocketAddr, slot: &SlotGuard) {
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
    {
        warn!("admin: {peer}: cannot set up the socket: {e}");
        return;
    }
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let (response, head_only, what) = match read_request(&mut stream, &mut buf) {
        Ok(Some(req)) => {
            let head_only = req.method == "HEAD";
            let what = format!("{} {}", req.method, req.target);
            if !slot.set_busy(true) {
                debug!("admin: {peer}: {what}: shut down before the response");
                return;
            }
            let response = route(&req, &slot.shared);
            slot.set_busy(false);
            (response, head_only, what)
        }
        Ok(None) => {
            debug!("admin: {peer}: closed before sending a request");
            return;
        }
        Err(bad) => (
            Response::text(bad.status, &format!("{}\n", bad.message)),
            false,
            bad.message.to_string(),
        ),
    };
    debug!("admin: {peer}: {what} -> {}", response.status);
    if let Err(e) = write_response(&mut stream, &response, head_only) {
        debug!("admin: {peer}: writing the response failed: {e}");
        return;
    }
    linger_close(&mut stream);
}

/// The parts of a request the router looks at.
struct Request<'a> {
    method: &'a str,
    target: &'a str,
}

/// Why a request was refused before routing.
struct BadRequest {
    status: u16,
    message: &'static str,
}

impl BadRequest {
    fn new(status: u16, message: &'static str) -> BadRequest {
        BadRequest { status, message }
    }
}

/// Reads and parses one request head. `Ok(None)`: the client closed without sending anything.
fn read_request<'b>(
    stream: &mut TcpStream,
    buf: &'b mut [u8],
) -> Result<Option<Request<'b>>, BadRequest> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut len = 0;
    // Each pass reads at least one byte or returns, so this ends within buf.len() passes.
    loop {
        if len == buf.len() {
            return Err(BadRequest::new(431, "request head too large"));
        }
        let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            return Err(BadRequest::new(408, "request head not received in time"));
        };
        if stream.set_read_timeout(Some(left)).is_err() {
            return Err(BadRequest::new(400, "socket error"));
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) if len == 0 => return Ok(None),
            Ok(0) => return Err(BadRequest::new(400, "incomplete request head")),
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A read timeout shows up as WouldBlock (or TimedOut) on Unix.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(BadRequest::new(408, "request head not received in time"));
            }
            Err(_) => return Err(BadRequest::new(400, "connection error")),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BadRequest::new(431, "too many header fields"));
            }
            Err(_) => return Err(BadRequest::new(400, "malformed request")),
        }
        check_headers(req.version, req.headers)?;
        // Parse again into borrows of `buf` alone, now that it is complete and no longer written.
        break;
    }
    let buf: &'b [u8] = buf;
    let buf = &buf[..len];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(BadRequest::new(400, "malformed request")),
    }
    match (req.method, req.path) {
        (Some(method), Some(target)) => Ok(Some(Request { method, target })),
        _ => Err(BadRequest::new(400, "malformed request")),
    }
}

/// Rules httparse leaves to the server: HTTP/1.1 needs exactly one Host; no request body.
fn check_headers(version: Option<u8>, headers: &[httparse::Header<'_>]) -> Result<(), BadRequest> {
    let hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .count();
    if version == Some(1) && hosts != 1 {
        return Err(BadRequest::new(
            400,
            "HTTP/1.1 request needs one Host header",
        ));
    }
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        {
            return Err(BadRequest::new(400, "request body not accepted"));
        }
    }
    Ok(())
}

fn route(req: &Request<'_>, shared: &Shared) -> Response {
    let state = &*shared.state;
    if !req.target.starts_with('/') {
        return Response::text(400, "request target must be a path\n");
    }
    let path = req.target.split_once('?').map_or(req.target, |(p, _)| p);
    let known = matches!(path, "/metrics" | "/healthz" | "/connections");
    if !known {
        return Response::text(404, "not found; try /metrics, /healthz, /connections\n");
    }
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::text(405, "method not allowed; use GET\n");
        r.allow = true;
        return r;
    }
    match path {
        "/metrics" => metrics(shared),
        "/healthz" => {
            if state.draining.load(Ordering::Relaxed) {
                Response::text(503, "draining\n")
            } else {
                Response::text(200, "ok\n")
            }
        }
        _ => connections(state),
    }
}

fn metrics(shared: &Shared) -> Response {
    let state = &*shared.state;
    let names = state
        .routes
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let routes: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut extra = (state.extra)();
    extra.admin_connections_active = shared.active() as u64;
    extra.admin_connections_evicted = shared.evicted.load(Ordering::Relaxed);
    extra.admin_connections_refused = shared.refused.load(Ordering::Relaxed);
    let mut body = String::with_capacity(16 * 1024);
    state.metrics.render_prometheus(&routes, &extra, &mut body);
    crate::metrics::render_upstream_health(&(state.upstreams)(), &mut body);
    Response {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: body.into_bytes(),
        allow: false,
    }
}

fn connections(state: &AdminState) -> Response {
    let mut answers = Vec::with_capacity(state.loops.len());
    for target in &state.loops {
        let (reply, answer) = mpsc::sync_channel(1);
        match target.snapshots.try_send(SnapshotRequest { reply }) {
            Ok(()) => (target.wake)(),
            Err(TrySendError::Full(_)) => {
                return Response::text(503, "too many connection listings pending\n");
            }
            Err(TrySendError::Disconnected(_)) => {
                return Response::text(503, "the proxy is not running\n");
            }
        }
        answers.push(answer);
    }
    let deadline = std::time::Instant::now() + state.snapshot_timeout;
    let mut conns = Vec::new();
    for answer in answers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match answer.recv_timeout(left) {
            Ok(mut part) => conns.append(&mut part),
            Err(_) => {
                warn!(
                    "admin: an event loop did not answer a connection listing within {:?}",
                    state.snapshot_timeout
                );
                return Response::text(503, "the event loop did not answer in time\n");
            }
        }
    }
    conns.sort_by_key(|c| c.id);
    match serde_json::to_vec(&conns) {
        Ok(mut body) => {
            body.push(b'\n');
            Response {
                status: 200,
                content_type: "application/json",
                body,
                allow: false,
            }
        }
        Err(e) => {
            warn!("admin: cannot encode the connection list: {e}");
            Response::text(500, "internal error\n")
        }
    }
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) -> io::Result<()> {
    let mut out = Vec::with_capacity(160 + r.body.len());
    write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        r.status,
        reason_phrase(r.status),
        r.content_type,
        r.body.len()
    )?;
    if r.allow {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    stream.write_all(&out)
}

/// Half-closes, then reads and discards what the client still sends (bounded in time and bytes)
/// so that the close does not turn into an RST that could destroy the response before it is read.
fn linger_close(stream: &mut TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut scratch = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::check_exposition;
    use std::sync::atomic::AtomicUsize;

    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Fixture {
        server: AdminServer,
        draining: Arc<AtomicBool>,
        wakes: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    }

    /// Starts a server on 127.0.0.1:0; returns the receiving end of its snapshot queue too.
    fn start_server(snapshot_timeout: Duration) -> (Fixture, Receiver<SnapshotRequest>) {
        let metrics = Arc::new(Metrics::new(2, usize::MAX, 1));
        let draining = Arc::new(AtomicBool::new(false));
        let wakes = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = snapshot_channel();
        let state = AdminState {
            metrics: metrics.clone(),
            routes: Arc::new(std::sync::RwLock::new(vec!["web".into(), "db".into()])),
            draining: draining.clone(),
            extra: Box::new(|| ExtraGauges {
                tap_records_written: 42,
                ..ExtraGauges::default()
            }),
            upstreams: Box::new(|| {
                vec![UpstreamUp {
                    route: "db".into(),
                    upstream: "db.internal:5432".into(),
                    address: "10.0.0.7:5432".into(),
                    up: false,
                }]
            }),
            loops: vec![SnapshotTarget {
                snapshots: tx,
                wake: {
                    let wakes = wakes.clone();
                    Arc::new(move || {
                        wakes.fetch_add(1, Ordering::SeqCst);
                    })
                },
            }],
            snapshot_timeout,
        };
        let server = start("127.0.0.1:0".parse().unwrap(), Arc::new(state)).expect("start");
        (
            Fixture {
                server,
                draining,
                wakes,
                metrics,
            },
            rx,
        )
    }

    /// Sends `raw`, reads until the server closes; returns (status, head, body).
    fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(raw).expect("send request");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).expect("read response");
        let text = String::from_utf8(resp).expect("utf-8 response");
        let (head, body) = text.split_once("\r\n\r\n").expect("response has a head");
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("Content-Length")
            .parse()
            .unwrap();
        if !raw.starts_with(b"HEAD ") {
            assert_eq!(length, body.len(), "Content-Length matches the body");
        }
        (status, head.to_string(), body.to_string())
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n")
                .as_bytes(),
        )
    }

    #[test]
    fn test_metrics_body_parses() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        f.metrics.route(1).on_accept();
        let (status, head, body) = get(f.server.local_addr(), "/metrics");
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let samples = check_exposition(&body);
        let find = |name: &str, route: Option<&str>| {
            samples
                .iter()
                .find(|(n, l, _)| n == name && route.is_none_or(|r| l.iter().any(|(_, v)| v == r)))
                .map(|s| s.2)
        };
        assert_eq!(find("tcptap_connections_active", Some("db")), Some(1.0));
        assert_eq!(find("tcptap_tap_records_written_total", None), Some(42.0));
        let up = samples.iter().find(|(n, _, _)| n == "tcptap_upstream_up");
        let (_, labels, value) = up.expect("tcptap_upstream_up");
        assert_eq!(*value, 0.0);
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(label("upstream"), Some("db.internal:5432"));
        assert_eq!(label("address"), Some("10.0.0.7:5432"));
        // HEAD: same headers, no body.
        let (status, head, body) = exchange(
            f.server.local_addr(),
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(!head.contains("Content-Length: 0"), "{head}");
        assert!(body.is_empty());
        f.server.shutdown();
    }

    #[test]
    fn test_healthz_flips_when_draining() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        let addr = f.server.local_addr();
        let (status, head, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(head.contains("Content-Type: text/plain"), "{head}");
        f.draining.store(true, Ordering::SeqCst);
        let (status, _, body) = get(addr, "/healthz?verbose=1");
        assert_eq!((status, body.as_str()), (503, "draining\n"));
        f.server.shutdown();
    }

    #[test]
    fn test_connections_from_fake_loop() {
        let (f, rx) = start_server(TIMEOUT);
        let conn = ConnInfo {
            id: 7,
            route: "web".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            upstream: "[::1]:80".parse().unwrap(),
            age_ms: 1500,
            bytes_d2u: 10,
            bytes_u2d: 20,
            d2u_state: PipeState::ReadClosed.into(),
            u2d_state: DirState::HalfClosed,
        };
        let fake_loop = {
            let conn = conn.clone();
            // Answers until the admin state (holding the sender) is dropped.
            std::thread::spawn(move || {
                let mut answered = 0;
                while let Ok(req) = rx.recv() {
                    assert!(req.answer(vec![conn.clone()]));
                    answered += 1;
                }
                answered
            })
        };
        let (status, head, body) = get(f.server.local_addr(), "/connections");
        assert_eq!(status, 200);
        assert!(head.contains("Content-Type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(
            v,
            serde_json::json!([{
                "id": 7, "route": "web", "client": "127.0.0.1:5000", "upstream": "[::1]:80",
                "age_ms": 1500, "bytes_d2u": 10, "bytes_u2d": 20,
                "d2u_state": "flushing", "u2d_state": "half-closed"
            }])
        );
        assert!(f.wakes.load(Ordering::SeqCst) >= 1);
        f.server.shutdown();
        assert_eq!(fake_loop.join().expect("fake loop"), 1);
    }

    #[test]
    fn test_connections_unanswered_gets_503_within_timeout() {
        let (f, rx) = start_server(Duration::from_millis(200));
        let started = Instant::now();
        let (status, _, _) = get(f.server.local_addr(), "/connections");
        assert_eq!(status, 503);
        assert!(started.elapsed() < TIMEOUT, "{:?}", started.elapsed());
        // The loop answering late must not block or fail loudly.
        let late = rx.try_recv().expect("request was queued");
        assert!(!late.answer(Vec::new()));
        // Still serving.
        assert_eq!(get(f.server.local_addr(), "/healthz").0, 200);
        f.server.shutdown();
    }

    #[test]
    fn test_bad_requests_get_4xx_and_server_keeps_serving() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        let addr = f.server.local_addr();
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(2 * MAX_REQUEST_HEAD)
        );
        let many = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{}\r\n",
            (0..MAX_HEADERS + 1)
                .map(|i| format!("X-{i}: y\r\n"))
                .collect::<String>()
        );
        let cases: [(&[u8], u16); 11] = [
            (b"\x00\x01\x02garbage\xff\r\n\r\n", 400),
            (b"GET /metrics HTTP/1.1\r\n\r\n", 400), // no Host
            (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET /metrics HTTP/9.9\r\nHost: x\r\n\r\n", 400),
            (b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
                400,
            ),
            (huge.as_bytes(), 431),
            (many.as_bytes(), 431),
            (
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                405,
            ),
            (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        ];
        for (raw, want) in cases {
            let (status, head, _) = exchange(addr, raw);
            assert_eq!(
                status,
                want,
                "{:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(60)])
            );
            if want == 405 {
                assert!(head.contains("Allow: GET, HEAD"), "{head}");
            }
            assert_eq!(get(addr, "/healthz").0, 200, "still serving");
        }
        // HTTP/1.0 needs no Host.
        assert_eq!(exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").0, 200);
        // A client that connects and leaves without a byte does not disturb the server.
        drop(TcpStream::connect(addr).expect("connect"));
        assert_eq!(get(addr, "/healthz").0, 200);
        f.server.shutdown();
    }

    #[test]
    fn test_incomplete_request_gets_408_after_deadline() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        let mut s = TcpStream::connect(f.server.local_addr()).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
        let started = Instant::now();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).expect("server answers and closes");
        assert!(
            resp.starts_with(b"HTTP/1.1 408 "),
            "{:?}",
            String::from_utf8_lossy(&resp)
        );
        assert!(started.elapsed() < TIMEOUT);
        f.server.shutdown();
    }

    /// Starts a server serving at most `limit` connections at once, with a fake loop's queue.
    fn start_limited(limit: usize) -> (AdminServer, Receiver<SnapshotRequest>) {
        let (tx, rx) = snapshot_channel();
        let state = AdminState {
            metrics: Arc::new(Metrics::new(1, usize::MAX, 1)),
            routes: Arc::new(std::sync::RwLock::new(vec!["web".into()])),
            draining: Arc::new(AtomicBool::new(false)),
            extra: Box::new(ExtraGauges::default),
            upstreams: Box::new(Vec::new),
            loops: vec![SnapshotTarget {
                snapshots: tx,
                wake: Arc::new(|| {}),
            }],
            snapshot_timeout: TIMEOUT,
        };
        let addr = "127.0.0.1:0".parse().unwrap();
        let server = start_with_limit(addr, Arc::new(state), limit).expect("start");
        (server, rx)
    }

    /// A connection that sends nothing.
    fn silent(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// Reads until EOF; panics if that takes `limit` or more.
    fn read_to_end_within(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
        let started = Instant::now();
        s.set_read_timeout(Some(limit)).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("no EOF after {:?}: {e}", started.elapsed()));
        got
    }

    #[test]
    fn test_longest_waiting_connection_makes_room() {
        let (server, _rx) = start_limited(2);
        let addr = server.local_addr();
        let mut first = silent(addr);
        let mut second = silent(addr);
        let started = Instant::now();
        let (status, _, _) = get(addr, "/healthz");
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // `first` made room: closed, no response. `second` was not touched: it gets its 408.
        // (Checked before the next request, which could make room by closing `second`.)
        assert_eq!(read_to_end_within(&mut first, Duration::from_secs(1)), b"");
        let mut resp = Vec::new();
        second.read_to_end(&mut resp).unwrap();
        assert!(
            resp.starts_with(b"HTTP/1.1 408 "),
            "{:?}",
            String::from_utf8_lossy(&resp)
        );
        let (_, _, body) = get(addr, "/metrics");
        let samples = check_exposition(&body);
        let value = |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
        assert!(
            value("tcptap_admin_connections_evicted_total") >= Some(1.0),
            "{body}"
        );
        assert_eq!(value("tcptap_admin_connections_refused_total"), Some(0.0));
        server.shutdown();
    }

    /// Answers the held listings (each must get an empty list), then returns `/metrics` and a
    /// lookup of its samples by name.
    fn answer_then_metrics(
        addr: SocketAddr,
        held: Vec<SnapshotRequest>,
        listings: Vec<std::thread::JoinHandle<(u16, String, String)>>,
    ) -> (String, impl Fn(&str) -> Option<f64>) {
        for r in held {
            assert!(r.answer(Vec::new()));
        }
        for l in listings {
            let (status, _, body) = l.join().unwrap();
            assert_eq!((status, body.as_str()), (200, "[]\n"));
        }
        let (_, _, body) = get(addr, "/metrics");
        let samples = check_exposition(&body);
        let value = move |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
        (body, value)
    }

    #[test]
    fn test_busy_connections_refuse_a_new_one_with_503() {
        let (server, rx) = start_limited(2);
        let addr = server.local_addr();
        // Two listings the fake loop does not answer yet: both connections are busy.
        let listings: Vec<_> = (0..2)
            .map(|_| std::thread::spawn(move || get(addr, "/connections")))
            .collect();
        let held: Vec<SnapshotRequest> = (0..2)
            .map(|_| rx.recv_timeout(TIMEOUT).expect("listing requested"))
            .collect();
        // No connection may be shut down to make room: the third is refused at once. (It sends
        // nothing, so the close after the 503 cannot turn into a reset.)
        let started = Instant::now();
        let mut third = silent(addr);
        let resp = read_to_end_within(&mut third, Duration::from_secs(1));
        let resp = String::from_utf8(resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
        assert!(
            resp.ends_with("\r\n\r\ntoo many admin connections\n"),
            "{resp}"
        );
        eprintln!("refused in {:?}", started.elapsed());
        let (body, value) = answer_then_metrics(addr, held, listings);
        assert_eq!(
            value("tcptap_admin_connections_refused_total"),
            Some(1.0),
            "{body}"
        );
        // This request, and the listings if their threads have not ended yet.
        let active = value("tcptap_admin_connections_active").unwrap();
        assert!((1.0..=2.0).contains(&active), "{body}");
        server.shutdown();
    }

    /// Every connection busy computing a response: each new client is refused with 503, and gets
    /// it whenever its request comes in, before or after the refusal, in one write or several;
    /// never a reset. Clients that never send a request hold up none of this.
    #[test]
    fn test_refused_clients_get_the_503_not_a_reset() {
        const CLIENTS: usize = 50;
        let (f, rx) = start_server(TIMEOUT);
        let addr = f.server.local_addr();
        // Listings the fake loop holds, one at a time (its queue takes only a few at once).
        let mut listings = Vec::new();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            listings.push(std::thread::spawn(move || get(addr, "/connections")));
            held.push(rx.recv_timeout(TIMEOUT).expect("listing requested"));
        }
        // Refused too, and then silent: they must not slow down the clients below.
        let mut silent_ones: Vec<TcpStream> = (0..4).map(|_| silent(addr)).collect();
        let mut failures = Vec::new();
        for i in 0..CLIENTS {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.set_write_timeout(Some(TIMEOUT)).unwrap();
            // The request arrives at once, or once the refusal is written.
            std::thread::sleep(Duration::from_millis([0, 0, 1, 2, 5][i % 5]));
            // In two writes, as `write!` on an unbuffered stream sends it.
            let outcome = s
                .write_all(b"GET /metrics HTTP/1.1\r\n")
                .and_then(|()| s.write_all(b"Host: tcptap\r\n\r\n"))
                .and_then(|()| {
                    let mut resp = Vec::new();
                    s.read_to_end(&mut resp).map(|_| resp)
                });
            match outcome {
                Ok(resp) if resp.starts_with(b"HTTP/1.1 503 ") => {}
                Ok(resp) => failures.push(format!("{i}: {:?}", String::from_utf8_lossy(&resp))),
                Err(e) => failures.push(format!("{i}: {e}")),
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "client {i} took {:?}",
                started.elapsed()
            );
        }
        eprintln!("{} of {CLIENTS} refused clients failed", failures.len());
        assert!(
            failures.is_empty(),
            "{} of {CLIENTS} refused clients got no 503: {failures:?}",
            failures.len()
        );
        for s in &mut silent_ones {
            let resp = read_to_end_within(s, Duration::from_secs(1));
            assert!(resp.starts_with(b"HTTP/1.1 503 "), "{resp:?}");
        }
        let (body, value) = answer_then_metrics(addr, held, listings);
        assert_eq!(
            value("tcptap_admin_connections_refused_total"),
            Some((CLIENTS + silent_ones.len()) as f64),
            "{body}"
        );
        assert_eq!(
            value("tcptap_admin_connections_evicted_total"),
            Some(0.0),
            "{body}"
        );
        f.server.shutdown();
    }

    #[test]
    fn test_lingering_refused_connections_are_bounded_and_end() {
        let poll = Poll::new().unwrap();
        let registry = poll.registry();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A refused connection as `refuse` leaves it: answered, half-closed, non-blocking.
        let refused = || {
            let client = silent(addr);
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            let (server, drained) = refuse(server).expect("the client is still there");
            (client, server, drained)
        };
        let mut lingering = Lingering::new(2);
        let now = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (client, server, drained) = refused();
            lingering.add(registry, server, drained, now);
            clients.push(client);
        }
        assert_eq!(lingering.conns.len(), 2, "the oldest made room");
        assert_eq!(lingering.next_deadline(), Some(now + REFUSED_LINGER));
        // A client that sends its request and closes is done with.
        let mut last = clients.pop().unwrap();
        let resp = read_to_end_within(&mut last, Duration::from_secs(1));
        assert!(resp.starts_with(b"HTTP/1.1 503 "), "{resp:?}");
        last.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        last.shutdown(Shutdown::Write).unwrap();
        let token = lingering.conns[1].token;
        let deadline = Instant::now() + TIMEOUT;
        while lingering.conns.len() == 2 {
            assert!(Instant::now() < deadline, "the client's close was not seen");
            std::thread::sleep(Duration::from_millis(5));
            lingering.readable(registry, token);
        }
        assert_eq!(lingering.conns[0].token.0, FIRST_REFUSED + 1);
        // The silent one goes when its time is up.
        lingering.expire(registry, now + REFUSED_LINGER - Duration::from_millis(1));
        assert_eq!(lingering.conns.len(), 1);
        lingering.expire(registry, now + REFUSED_LINGER);
        assert!(lingering.conns.is_empty());
        assert_eq!(lingering.next_deadline(), None);
    }

    #[test]
    fn test_shutdown_does_not_wait_for_silent_or_slow_clients() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        let addr = f.server.local_addr();
        let mut clients: Vec<TcpStream> = (0..3).map(|_| silent(addr)).collect();
        let mut partial = silent(addr);
        partial
            .write_all(b"GET /metrics HTTP/1.1\r\nHost:")
            .unwrap();
        clients.push(partial);
        // Accepted after them: once it is answered, they all have a connection thread.
        assert_eq!(get(addr, "/healthz").0, 200);
        let started = Instant::now();
        f.server.shutdown();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "shutdown took {took:?}");
        for mut c in clients {
            assert_eq!(read_to_end_within(&mut c, Duration::from_secs(1)), b"");
        }
    }

    #[test]
    fn test_answer_snapshots_builds_once_for_all_pending() {
        let (tx, rx) = snapshot_channel();
        assert_eq!(answer_snapshots(&rx, || panic!("nothing pending")), 0);
        let mut replies = Vec::new();
        for _ in 0..3 {
            let (reply, answer) = mpsc::sync_channel(1);
            tx.try_send(SnapshotRequest { reply }).unwrap();
            replies.push(answer);
        }
        let mut builds = 0;
        let n = answer_snapshots(&rx, || {
            builds += 1;
            Vec::new()
        });
        assert_eq!((n, builds), (3, 1));
        for r in replies {
            assert_eq!(r.try_recv().unwrap(), Vec::new());
        }
    }

    #[test]
    fn test_shutdown_by_drop_and_bind_error() {
        let (f, _rx) = start_server(DEFAULT_SNAPSHOT_TIMEOUT);
        let addr = f.server.local_addr();
        drop(f);
        // The port is free again once the thread stopped (nothing listens: connect is refused).
        assert!(TcpStream::connect(addr).is_err());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, _rx) = snapshot_channel();
        let state = Arc::new(AdminState {
            metrics: Arc::new(Metrics::new(0, usize::MAX, 1)),
            routes: Arc::default(),
            draining: Arc::new(AtomicBool::new(false)),
            extra: Box::new(ExtraGauges::default),
            upstreams: Box::new(Vec::new),
            loops: vec![SnapshotTarget {
                snapshots: tx,
                wake: Arc::new(|| {}),
            }],
            snapshot_timeout: DEFAULT_SNAPSHOT_TIMEOUT,
        });
        let e = start(taken.local_addr().unwrap(), state).expect_err("address in use");
        assert!(e.to_string().contains("admin listener"), "{e}");
    }
}
