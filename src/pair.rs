//! A pair: one accepted downstream socket, one upstream socket, and the two pipes between them.
//!
//! Lifecycle: `Connecting` (non-blocking upstream connect in flight; downstream bytes wait in the
//! kernel) → `Established` (both pipes pump) → closed by the event loop with a [`CloseReason`]:
//! - both pipes `WRITE-SHUT`: a clean close (half-close was propagated in each direction);
//! - an error or reset on either socket: both are closed with RST (`SO_LINGER` 0), buffered bytes
//!   are discarded and counted;
//! - a timeout or the end of the shutdown drain: both are reset.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::buffer::BufferPool;
use crate::net;
use crate::pipe::{Pipe, PipeState, PumpError, PumpStatus, Readiness};
use crate::splice::PipePool;
use crate::tap::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapHandle, Wants};

/// Why a pair ended; shown in the close log line and the tap.
#[derive(Debug)]
pub enum CloseReason {
    /// Both directions ended with FIN; `first` sent its FIN first.
    Finished {
        /// The side whose EOF came first.
        first: Side,
    },
    /// A peer reset (or vanished: EPIPE, ECONNABORTED); the other side was reset too.
    Reset(Side),
    /// An unexpected I/O error on one side.
    Error(Side, io::Error),
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The upstream connect failed.
    ConnectFailed(io::Error),
    /// The upstream connect did not complete in time.
    ConnectTimeout,
    /// Still open when the shutdown drain period ended.
    Shutdown,
    /// Still open at an immediate stop (a second SIGINT, or a failed event loop).
    Stopped,
    /// Not proxied: no usable original destination, a loop to this proxy, or a destination
    /// outside `allowed_destinations`.
    Refused(String),
    /// The client's PROXY protocol header was malformed.
    BadProxyHeader(crate::proxy_protocol::ParseError),
    /// The client sent no complete PROXY protocol header in time.
    ProxyHeaderTimeout,
}

impl CloseReason {
    /// True when the sockets must be closed with RST rather than FIN.
    pub fn is_abort(&self) -> bool {
        !matches!(self, CloseReason::Finished { .. })
    }

    /// The tap's view of this reason.
    pub fn kind(&self) -> CloseKind {
        match self {
            CloseReason::Finished { .. } => CloseKind::Normal,
            CloseReason::Reset(s) => CloseKind::Reset(*s),
            CloseReason::Error(s, _) => CloseKind::Error(*s),
            CloseReason::IdleTimeout => CloseKind::IdleTimeout,
            CloseReason::ConnectFailed(_) => CloseKind::ConnectFailed,
            CloseReason::ConnectTimeout => CloseKind::ConnectTimeout,
            CloseReason::Shutdown | CloseReason::Stopped => CloseKind::Shutdown,
            CloseReason::Refused(_)
            | CloseReason::BadProxyHeader(_)
            | CloseReason::ProxyHeaderTimeout => CloseKind::ConnectFailed,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Finished { first } => write!(f, "{first} closed first"),
            CloseReason::Reset(side) => write!(f, "reset by {side}"),
            CloseReason::Error(side, e) => write!(f, "error on {side}: {e}"),
            CloseReason::IdleTimeout => f.write_str("idle timeout"),
            CloseReason::ConnectFailed(e) => write!(f, "upstream connect failed: {e}"),
            CloseReason::ConnectTimeout => f.write_str("upstream connect timeout"),
            CloseReason::Shutdown => f.write_str("aborted at end of shutdown drain"),
            CloseReason::Stopped => f.write_str("aborted by an immediate stop"),
            CloseReason::Refused(why) => write!(f, "refused: {why}"),
            CloseReason::BadProxyHeader(e) => write!(f, "bad PROXY protocol header: {e}"),
            CloseReason::ProxyHeaderTimeout => f.write_str("no PROXY protocol header in time"),
        }
    }
}

/// Where the upstream connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the client's PROXY protocol header (no upstream socket yet) until `deadline`.
    AwaitingHeader {
        /// Header timeout.
        deadline: Instant,
    },
    /// `connect(2)` in flight; `deadline` is when it times out.
    Connecting {
        /// Connect timeout.
        deadline: Instant,
    },
    /// Connected: bytes flow.
    Established,
}

/// How a socket is registered with the poller. A connected socket starts with reads only: it is
/// writable, so its first writable edge would come at once and cost a loop turn, for nothing
/// unless a write is waiting. The first write that would block adds the writable interest, for
/// the rest of the pair's life (see [`Pair::write_blocked`]). A connecting upstream socket has
/// it from the start: its writable edge says that the connect completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Not registered (yet).
    No,
    /// Readable and priority events only; `Readiness::writable` stays set until a write would
    /// block.
    Read,
    /// Writable events too.
    ReadWrite,
}

/// What a closed pair moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Bytes read from the source `[d→u, u→d]`.
    pub received: [u64; 2],
    /// Of those, bytes the receiving peer's TCP has (see [`Pair::delivered`]); asked for only.
    pub delivered: Option<[u64; 2]>,
    /// Bytes still in the proxy's buffers, thrown away.
    pub discarded: u64,
    /// Tap records and payload bytes of this connection dropped, those of its end included.
    pub tap_dropped: (u64, u64),
}

/// What driving a pair produced.
#[derive(Debug)]
pub enum Drive {
    /// Waiting for events.
    Idle,
    /// Ran out of budget with work left: drive again before sleeping.
    Yielded,
    /// The pair is finished and must be closed.
    Close(CloseReason),
}

/// Per-pair tap state: the handle, and what this connection lost.
#[derive(Debug)]
pub struct PairTap {
    /// Where records go.
    pub handle: TapHandle,
    /// Records dropped because the queue was full.
    pub dropped_records: u64,
    /// Payload bytes dropped because the queue was full.
    pub dropped_bytes: u64,
}

impl PairTap {
    fn event(&mut self, meta: &Arc<ConnMeta>, event: TapEvent) {
        if !self.handle.event(meta, event) {
            self.dropped_records += 1;
        }
    }
}

/// One proxied connection.
#[derive(Debug)]
pub struct Pair {
    /// Identity shown in logs (`#42`) and tap records.
    pub meta: Arc<ConnMeta>,
    /// Index of the route that accepted it.
    pub route: usize,
    /// That route's metrics slot when it accepted it (a reload may rename the route).
    pub metrics: usize,
    /// The route's `idle_timeout` when it accepted the connection: a reload does not change it.
    pub idle_timeout: Option<Duration>,
    /// Its two sockets' place in the descriptor budget.
    pub fds: crate::fd_budget::Slot,
    /// The accepted client socket.
    pub downstream: TcpStream,
    /// The backend socket (none while waiting for a PROXY protocol header).
    pub upstream: Option<TcpStream>,
    /// The address the client connected to (the accepted socket's local address); the
    /// destination of a PROXY protocol header sent upstream.
    pub local: SocketAddr,
    /// The route's backend in use (index in its upstream set), counted open there.
    pub backend: Option<usize>,
    /// Backends tried for this client so far (bounded by `connect_attempts`).
    pub tried: Vec<usize>,
    /// The route's upstream-set epoch `backend` belongs to (a reload may replace the set).
    pub set_epoch: u64,
    /// Connect state.
    pub phase: Phase,
    /// `[d→u, u→d]`.
    pub pipes: [Pipe; 2],
    /// Kernel readiness of `[downstream, upstream]`.
    pub ready: [Readiness; 2],
    /// How each socket `[downstream, upstream]` is registered with the poller.
    pub interest: [Registered; 2],
    /// When it was accepted.
    pub started: Instant,
    /// When a byte was last read or written (idle timeout).
    pub last_active: Instant,
    /// The side that sent the first EOF.
    pub first_fin: Option<Side>,
    /// Tap, when the route has one.
    pub tap: Option<PairTap>,
    /// True while the pair sits in the loop's work list (avoids queueing it twice).
    pub scheduled: bool,
    /// The deadline of this pair's live timer entry; other entries for it are stale.
    pub timer_at: Option<Instant>,
    /// Peek buffer for the client's PROXY protocol header (empty otherwise).
    pub header: Vec<u8>,
    /// When the current upstream connect started (connect latency).
    pub connect_started: Instant,
    /// The upstream socket's local address, registered for loop detection (original-destination
    /// routes only).
    pub own_upstream: Option<SocketAddr>,
}

impl Pair {
    /// The socket of one side, if it exists.
    pub fn stream(&self, side: Side) -> Option<&TcpStream> {
        match side {
            Side::Downstream => Some(&self.downstream),
            Side::Upstream => self.upstream.as_ref(),
        }
    }

    /// Bytes held in the pair's buffers.
    pub fn buffered(&self) -> usize {
        self.pipes[0].buffered() + self.pipes[1].buffered()
    }

    /// Bytes proxied `[d→u, u→d]` (read from the source).
    pub fn offsets(&self) -> [u64; 2] {
        [self.pipes[0].read_total(), self.pipes[1].read_total()]
    }

    /// Bytes read plus bytes written, both directions: activity, for the idle timeout (a client
    /// slowly reading what the proxy buffered is not idle).
    fn moved(&self) -> u64 {
        self.pipes
            .iter()
            .map(|p| p.read_total() + p.written_total())
            .sum()
    }

    /// When this pair times out, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Connecting { deadline } | Phase::AwaitingHeader { deadline } => Some(deadline),
            Phase::Established => self.idle_timeout.map(|t| self.last_active + t),
        }
    }

    /// Whether `side` is registered for reads only and its last write would block: it needs
    /// its writable events from now on.
    pub fn write_blocked(&self, side: Side) -> bool {
        self.interest[side.index()] == Registered::Read && !self.ready[side.index()].writable
    }

    /// Whether a socket's registration must change: the client's is still to be made, or a
    /// write would block where only reads are watched.
    pub fn interest_due(&self) -> bool {
        self.interest[Side::Downstream.index()] == Registered::No
            || self.write_blocked(Side::Downstream)
            || self.write_blocked(Side::Upstream)
    }

    /// Checks a socket's pending error (`SO_ERROR`) after an error event. A reset on a socket whose
    /// read side is already closed is otherwise noticed only at the next write.
    pub fn check_socket_error(&self, side: Side) -> Option<CloseReason> {
        match self.stream(side)?.take_error() {
            Ok(Some(e)) | Err(e) => Some(classify(side, e)),
            Ok(None) => None,
        }
    }

    /// Bytes `side` sent that wait unread in its socket (0 if unknown).
    pub fn unread(&self, side: Side) -> u64 {
        self.stream(side)
            .and_then(|s| net::unread(s).ok())
            .unwrap_or(0)
    }

    /// After the pumps ran until they would block: the error an event reported, which they did
    /// not meet. A direction reading the socket has passed on what its peer sent before the
    /// error, as far as the destination takes it now: the rest is not waited for (the peer
    /// is gone, and a destination that does not read would hold the pair), and is discarded
    /// and counted with the abort. A socket no direction reads any more (its FIN came before)
    /// only ever tells the error this way.
    pub fn settle_errors(&mut self) -> Option<CloseReason> {
        for side in [Side::Downstream, Side::Upstream] {
            if !self.ready[side.index()].error {
                continue;
            }
            self.ready[side.index()].error = false;
            if let Some(reason) = self.check_socket_error(side) {
                return Some(reason);
            }
        }
        None
    }

    /// After an event while connecting: done, still in progress, or failed. A clean event (see
    /// `Readiness::connected`) settles it without a syscall; otherwise mio's recipe: writable,
    /// then `take_error()` is `None`, then `peer_addr()` succeeds.
    pub fn check_connected(&mut self) -> Result<bool, io::Error> {
        let Some(upstream) = self.upstream.as_ref() else {
            return Ok(false);
        };
        if self.ready[Side::Upstream.index()].connected {
            self.phase = Phase::Established;
            return Ok(true);
        }
        // Bytes came in, then an error (the upstream greeted and reset at once): it connected.
        // The pumps pass the bytes on, then meet the error (left unread here).
        if self.ready[Side::Upstream.index()].error && net::unread(upstream).is_ok_and(|n| n > 0) {
            self.phase = Phase::Established;
            return Ok(true);
        }
        if let Some(e) = upstream.take_error()? {
            return Err(e);
        }
        match upstream.peer_addr() {
            Ok(_) => {
                self.phase = Phase::Established;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Pumps both directions. `budget` caps the bytes read per direction in this call.
    pub fn pump(
        &mut self,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
        budget: usize,
        now: Instant,
    ) -> Drive {
        let Some(upstream) = self.upstream.as_ref() else {
            return Drive::Idle;
        };
        let before = self.moved();
        let states = [self.pipes[0].state(), self.pipes[1].state()];
        let mut yielded = false;
        let mut failed: Option<CloseReason> = None;
        for dir in Direction::BOTH {
            let [down_ready, up_ready] = &mut self.ready;
            let (src, src_ready, dst, dst_ready) = match dir {
                Direction::DownToUp => (&self.downstream, down_ready, upstream, up_ready),
                Direction::UpToDown => (upstream, up_ready, &self.downstream, down_ready),
            };
            let meta = &self.meta;
            let tap = &mut self.tap;
            let pipe = &mut self.pipes[dir.index()];
            // Splice bulk data unless the tap wants these bytes copied. A tap takes a tee of
            // spliced bytes while its tee pipe has room; a tap whose queue is full, or that is
            // past snaplen, takes nothing, and a full queue counts the bytes as dropped. Back to
            // copying only once the kernel pipe is empty, so bytes stay in order: until then the
            // splice pump only drains (a budget of 0 reads nothing). Urgent data is copied too
            // (see `Readiness::urgent`). The tap takes chunks that its queue can hold several of
            // (see `TapHandle::chunk_max`).
            let chunk = tap.as_ref().map_or(usize::MAX, |t| t.handle.chunk_max());
            let wants = match tap.as_ref() {
                _ if !(pipe.zero_copy && pipe.is_bulk()) => Wants::Yes, // copy, tap or not
                None => Wants::BeyondSnaplen,
                Some(t) => t.handle.wants(pipe.read_total(), pipes.size().min(chunk)),
            };
            let splice = !matches!(wants, Wants::Yes) && !src_ready.urgent;
            let queue_full = matches!(wants, Wants::QueueFull);
            let mut tee_pipe = match wants {
                Wants::Tee(pipe) => Some(pipe),
                _ => None,
            };
            let tee = tee_pipe.is_some();
            let splice_budget = if splice { budget } else { 0 };
            let result = if splice || pipe.in_kernel() > 0 {
                let before = pipe.read_total();
                let mut on_fill = |src: RawFd, offset: u64, len: usize| {
                    if let (Some(t), Some(tee_pipe)) = (tap.as_mut(), tee_pipe.as_mut()) {
                        let lost = t.handle.tee(tee_pipe, meta, dir, offset, src, len);
                        if lost > 0 {
                            t.dropped_records += 1;
                            t.dropped_bytes += lost;
                        }
                    }
                };
                let on_fill: Option<&mut dyn FnMut(RawFd, u64, usize)> =
                    if tee { Some(&mut on_fill) } else { None };
                let r = pipe.pump_splice(
                    src,
                    src_ready,
                    dst,
                    dst_ready,
                    pool,
                    pipes,
                    splice_budget,
                    if tee { chunk } else { usize::MAX },
                    on_fill,
                );
                let skipped = pipe.read_total() - before;
                if let Some(t) = tap.as_mut().filter(|_| queue_full && skipped > 0) {
                    let counted = t.handle.count_skipped(before, skipped);
                    if counted > 0 {
                        t.dropped_records += 1;
                        t.dropped_bytes += counted;
                    }
                }
                r
            } else {
                let mut on_read = |offset: u64, bytes: &[u8]| {
                    if let Some(t) = tap.as_mut() {
                        let (records, lost) = t.handle.data_in_chunks(meta, dir, offset, bytes);
                        t.dropped_records += records;
                        t.dropped_bytes += lost;
                    }
                };
                pipe.pump(
                    &mut { src },
                    src_ready,
                    &mut { dst },
                    dst_ready,
                    pool,
                    budget,
                    &mut on_read,
                )
            };
            match result {
                Ok(PumpStatus::Yielded) => yielded = true,
                Ok(PumpStatus::Blocked) => {}
                Err(PumpError::Read(e)) => return Drive::Close(classify(dir.source(), e)),
                Err(PumpError::Write(e)) => {
                    let reason = classify(dir.source().other(), e);
                    if dir == Direction::DownToUp && matches!(reason, CloseReason::Reset(_)) {
                        // The upstream reset: what it sent before, still queued in its socket,
                        // goes to the client first (the other direction reads it, then the
                        // reset, as a direct connection would show them), even if no event
                        // said so yet (a connect that completed at once had none). This write
                        // took the socket's error, so that read then ends as at a FIN: not
                        // passed on, the reset follows.
                        failed = Some(reason);
                        self.ready[Side::Upstream.index()].readable = true;
                        self.pipes[Direction::UpToDown.index()].hold_fin();
                        continue;
                    }
                    return Drive::Close(reason);
                }
            }
            if let Some(reason) = failed.take() {
                return Drive::Close(reason);
            }
        }
        if self.moved() != before {
            self.last_active = now;
        }
        for dir in Direction::BOTH {
            let state = self.pipes[dir.index()].state();
            if state != states[dir.index()] {
                self.on_state_change(dir, state);
            }
        }
        if self.pipes.iter().all(|p| p.state() == PipeState::WriteShut) {
            return Drive::Close(CloseReason::Finished {
                first: self.first_fin.unwrap_or(Side::Downstream),
            });
        }
        if yielded { Drive::Yielded } else { Drive::Idle }
    }

    fn on_state_change(&mut self, dir: Direction, state: PipeState) {
        let from = dir.source();
        if state != PipeState::Open && self.first_fin.is_none() {
            self.first_fin = Some(from);
        }
        if state == PipeState::WriteShut {
            log::debug!(
                "#{} {} {dir}: FIN from {from} passed on after {} bytes",
                self.meta.id,
                self.meta.downstream,
                self.pipes[dir.index()].written_total()
            );
            let offset = self.pipes[dir.index()].read_total();
            let meta = self.meta.clone();
            if let Some(t) = self.tap.as_mut() {
                t.event(&meta, TapEvent::Fin { dir, offset });
            }
        }
    }

    /// Of the bytes read `[d→u, u→d]`, how many the receiving peer has, were the pair closed for
    /// `reason` now. A clean close leaves the kernel to send what is queued, so every byte
    /// written counts; an abort resets both sockets, and the bytes their peers had not
    /// acknowledged are lost with the buffered ones.
    pub fn delivered(&self, reason: &CloseReason) -> [u64; 2] {
        Direction::BOTH.map(|dir| {
            let pipe = &self.pipes[dir.index()];
            let dst = self.stream(dir.source().other());
            let unacked = match dst {
                Some(s) if reason.is_abort() && pipe.written_total() > 0 => {
                    match net::unacked(s) {
                        // Once the FIN was passed on, the last unacknowledged byte is the FIN.
                        Ok(n) if pipe.state() == PipeState::WriteShut => n.saturating_sub(1),
                        Ok(n) => n,
                        Err(e) => {
                            log::debug!("#{} {dir}: SIOCOUTQ failed: {e}", self.meta.id);
                            0
                        }
                    }
                }
                _ => 0,
            };
            pipe.delivered(unacked)
        })
    }

    /// Closes both sockets: with RST when `reason` is an abort. Returns what the pair moved,
    /// with the bytes delivered if `count_delivered` (after an abort that costs a `SIOCOUTQ`
    /// per direction).
    pub fn finish(
        mut self,
        reason: &CloseReason,
        pool: &mut BufferPool,
        count_delivered: bool,
    ) -> Totals {
        // Before the close: the send queues are still there to ask.
        let delivered = count_delivered.then(|| self.delivered(reason));
        let discarded = (self.pipes[0].discard(pool) + self.pipes[1].discard(pool)) as u64;
        if reason.is_abort() {
            // SO_LINGER 0: close(2) sends RST, so the peer learns at once that the stream was cut.
            // A socket its peer reset is closed already: nothing to tell that side.
            let reset_by = match reason {
                CloseReason::Reset(side) => Some(*side),
                _ => None,
            };
            for side in [Side::Downstream, Side::Upstream] {
                if let Some(s) = self.stream(side).filter(|_| reset_by != Some(side)) {
                    let _ = net::set_linger_zero(s);
                }
            }
        }
        let offsets = self.offsets();
        let meta = self.meta.clone();
        if let Some(t) = self.tap.as_mut() {
            if let CloseReason::Reset(side) | CloseReason::Error(side, _) = reason {
                t.event(
                    &meta,
                    TapEvent::Reset {
                        side: *side,
                        offsets,
                    },
                );
            }
            let close = TapEvent::Close {
                kind: reason.kind(),
                offsets,
                dropped_records: t.dropped_records,
                dropped_bytes: t.dropped_bytes,
            };
            t.event(&meta, close);
        }
        Totals {
            received: offsets,
            delivered,
            discarded,
            tap_dropped: self.tap_drops(),
        }
    }

    /// Tap drops of this pair `(records, bytes)`.
    pub fn tap_drops(&self) -> (u64, u64) {
        self.tap
            .as_ref()
            .map_or((0, 0), |t| (t.dropped_records, t.dropped_bytes))
    }

    /// Sends the tap's Connect record: a connect to `meta.upstream` has started.
    pub fn tap_connect(&mut self) {
        let meta = self.meta.clone();
        if let Some(t) = self.tap.as_mut() {
            t.event(&meta, TapEvent::Connect);
        }
    }

    /// Sends the tap's Open record.
    pub fn tap_open(&mut self) {
        let meta = self.meta.clone();
        if let Some(t) = self.tap.as_mut() {
            t.event(&meta, TapEvent::Open);
        }
    }

    /// The client address.
    pub fn downstream_addr(&self) -> SocketAddr {
        self.meta.downstream
    }
}

/// Sorts an I/O error on `side` into a reset (routine) or an error (worth a warning).
pub fn classify(side: Side, e: io::Error) -> CloseReason {
    if net::is_peer_reset(&e) {
        CloseReason::Reset(side)
    } else {
        CloseReason::Error(side, e)
    }
}
