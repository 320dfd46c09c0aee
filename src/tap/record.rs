//! What the event loop hands to the tap: one [`TapRecord`] per chunk of bytes or per connection event.
//!
//! Invariants:
//! - Every record carries an `Arc<ConnMeta>`, so a writer that never saw a connection's `Open`
//!   (because it was dropped) can still render every later record of that connection.
//! - `Data` and `Fin` carry the stream offset of their direction (bytes proxied in that direction
//!   before this record). A writer that expected offset `n` and receives `m > n` knows that
//!   `m - n` bytes were not captured (dropped on a full queue, or cut by `snaplen`), and says so.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// Which way bytes travel through a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the accepted client (downstream) to the backend (upstream): `d→u`.
    DownToUp,
    /// From the backend (upstream) to the client (downstream): `u→d`.
    UpToDown,
}

impl Direction {
    /// Both directions, `d→u` first.
    pub const BOTH: [Direction; 2] = [Direction::DownToUp, Direction::UpToDown];

    /// Index usable for `[T; 2]` arrays: 0 for `d→u`, 1 for `u→d`.
    pub fn index(self) -> usize {
        match self {
            Direction::DownToUp => 0,
            Direction::UpToDown => 1,
        }
    }

    /// The side bytes of this direction are read from.
    pub fn source(self) -> Side {
        match self {
            Direction::DownToUp => Side::Downstream,
            Direction::UpToDown => Side::Upstream,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::DownToUp => "d→u",
            Direction::UpToDown => "u→d",
        })
    }
}

/// One of the two sockets of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The accepted client connection.
    Downstream,
    /// The connection to the backend.
    Upstream,
}

impl Side {
    /// Index usable for `[T; 2]` arrays: 0 for downstream, 1 for upstream.
    pub fn index(self) -> usize {
        match self {
            Side::Downstream => 0,
            Side::Upstream => 1,
        }
    }

    /// The other socket of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Downstream => Side::Upstream,
            Side::Upstream => Side::Downstream,
        }
    }

    /// The direction whose bytes are read from this side.
    pub fn outgoing(self) -> Direction {
        match self {
            Side::Downstream => Direction::DownToUp,
            Side::Upstream => Direction::UpToDown,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Downstream => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// Identity of one proxied connection, shared by all its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnMeta {
    /// Process-wide connection id, shown as `#42`.
    pub id: u64,
    /// Name of the route that accepted it.
    pub route: Arc<str>,
    /// The client's address (peer of the accepted socket).
    pub downstream: SocketAddr,
    /// The backend address the pair connects to.
    pub upstream: SocketAddr,
}

/// How a connection ended, as told in the tap's `Close` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Both directions finished with FIN.
    Normal,
    /// One side reset; the other was reset too.
    Reset(Side),
    /// No bytes moved for the idle timeout.
    IdleTimeout,
    /// The upstream connect failed (no data was ever proxied).
    ConnectFailed,
    /// The upstream connect timed out (no data was ever proxied).
    ConnectTimeout,
    /// Aborted at the end of the shutdown drain period.
    Shutdown,
    /// A local error on one side (not a peer reset).
    Error(Side),
}

impl CloseKind {
    /// The sides the proxy reset itself to end the connection, in words for the log: both at an
    /// idle timeout or at the end of the shutdown drain, the client when its upstream could not
    /// be reached (the upstream connection never opened), none otherwise (a peer's reset or
    /// error has a [`TapEvent::Reset`] record of its own).
    pub fn reset_by_proxy(self) -> Option<&'static str> {
        match self {
            CloseKind::IdleTimeout | CloseKind::Shutdown => Some("client and upstream"),
            CloseKind::ConnectFailed | CloseKind::ConnectTimeout => Some("client"),
            CloseKind::Normal | CloseKind::Reset(_) | CloseKind::Error(_) => None,
        }
    }
}

impl fmt::Display for CloseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseKind::Normal => f.write_str("closed"),
            CloseKind::Reset(side) => write!(f, "reset by {side}"),
            CloseKind::IdleTimeout => f.write_str("idle timeout"),
            CloseKind::ConnectFailed => f.write_str("upstream connect failed"),
            CloseKind::ConnectTimeout => f.write_str("upstream connect timed out"),
            CloseKind::Shutdown => f.write_str("aborted at shutdown"),
            CloseKind::Error(side) => write!(f, "error on {side}"),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapEvent {
    /// The connect to the upstream (`ConnMeta::upstream`) started. Another one follows for the
    /// next address when this one fails and the connection tries again. Only a capture shows it
    /// (its SYN, when it was sent); the log starts at [`TapEvent::Open`].
    Connect,
    /// The upstream connect succeeded: the pair starts proxying.
    Open,
    /// Bytes proxied in `dir`; `offset` is the number of bytes proxied in `dir` before them.
    Data {
        /// Direction of the bytes.
        dir: Direction,
        /// Stream offset of `bytes[0]` in this direction.
        offset: u64,
        /// The bytes, exactly as proxied.
        bytes: Vec<u8>,
    },
    /// The source of `dir` sent EOF and it was propagated as `shutdown(Write)` after `offset` bytes.
    Fin {
        /// The direction that ended.
        dir: Direction,
        /// Total bytes proxied in `dir`.
        offset: u64,
    },
    /// `side` reset the connection (or failed); the other side is being reset too.
    /// `offsets` are the bytes proxied so far in `[d→u, u→d]`.
    Reset {
        /// Which socket reset first.
        side: Side,
        /// Bytes proxied so far in each direction, indexed by [`Direction::index`].
        offsets: [u64; 2],
    },
    /// The pair is gone. Always the last record of a connection. A pair the proxy cut itself
    /// (see [`CloseKind::reset_by_proxy`]) was reset, with no record before this one saying so.
    Close {
        /// How it ended.
        kind: CloseKind,
        /// Bytes proxied in each direction, indexed by [`Direction::index`].
        offsets: [u64; 2],
        /// Records this connection lost because the tap queue was full.
        dropped_records: u64,
        /// Payload bytes this connection lost because the tap queue was full.
        dropped_bytes: u64,
    },
}

/// One unit handed from the event loop to the tap writer.
#[derive(Debug, Clone)]
pub struct TapRecord {
    /// Wall-clock time the event loop saw the event.
    pub time: SystemTime,
    /// The connection.
    pub conn: Arc<ConnMeta>,
    /// What happened.
    pub event: TapEvent,
}
