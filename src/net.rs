//! Every socket option tcptap sets, in one place (socket2), and the setup errors they can raise.
//!
//! Listeners: `SO_REUSEADDR` (restart without waiting for TIME_WAIT), `IPV6_V6ONLY` on IPv6 listeners,
//! optional `SO_REUSEPORT` (one listener per worker), optional `TCP_DEFER_ACCEPT`, non-blocking, a
//! configurable backlog.
//! Proxied sockets: `TCP_NODELAY`, optional keepalive and buffer sizes, set on the accepted socket and
//! on the upstream socket before `connect(2)` (buffer sizes must be set before the handshake to take
//! effect on the window scale).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::SocketOptions;

/// A listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `socket(2)` failed.
    #[error("route `{route}`: cannot create a socket for {addr}: {source}")]
    Socket {
        /// Route name.
        route: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed (address in use, not local, permission).
    #[error("route `{route}`: cannot listen on {addr}: {source}")]
    Bind {
        /// Route name.
        route: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `listen(2)` failed.
    #[error("route `{route}`: listen({addr}) failed: {source}")]
    Listen {
        /// Route name.
        route: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The event loop could not be created.
    #[error("cannot create the event loop: {0}")]
    Poll(#[source] io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// The admin endpoint could not listen.
    #[error("{0}")]
    Admin(#[source] io::Error),
    /// The access log could not be opened.
    #[error("{source}")]
    AccessLog {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A tap output could not be opened.
    #[error("route `{route}`: cannot start the tap: {source}")]
    Tap {
        /// Route name.
        route: String,
        /// Cause.
        #[source]
        source: crate::tap::TapError,
    },
}

/// Binds a non-blocking listener with `SO_REUSEADDR` (and `SO_REUSEPORT` when `reuse_port`,
/// `IP_TRANSPARENT` when `transparent`, `TCP_DEFER_ACCEPT` when `defer_accept`) and the socket
/// options its connections get.
pub fn bind_listener(
    route: &str,
    addr: SocketAddr,
    backlog: i32,
    reuse_port: bool,
    transparent: bool,
    defer_accept: Option<Duration>,
    opts: &SocketOptions,
) -> Result<TcpListener, SetupError> {
    let socket_err = |source| SetupError::Socket {
        route: route.to_string(),
        addr,
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(socket_err)?;
    socket.set_reuse_address(true).map_err(socket_err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(socket_err)?;
    }
    if transparent {
        // TPROXY: accept connections addressed to any IP; needs CAP_NET_ADMIN.
        crate::orig_dst::set_transparent(&socket).map_err(socket_err)?;
    }
    if addr.is_ipv6() {
        // One listener per family: "[::]:80" must not also grab the IPv4 port.
        socket.set_only_v6(true).map_err(socket_err)?;
    }
    // Accepted sockets inherit these from the listener: no syscall per connection, and buffer
    // sizes set before listen(2) count in the window scale of the handshake.
    apply_options(&socket, opts).map_err(socket_err)?;
    if defer_accept.is_some() {
        set_defer_accept(&socket, defer_accept).map_err(socket_err)?;
    }
    socket.set_nonblocking(true).map_err(socket_err)?;
    socket
        .bind(&addr.into())
        .map_err(|source| SetupError::Bind {
            route: route.to_string(),
            addr,
            source,
        })?;
    socket
        .listen(backlog)
        .map_err(|source| SetupError::Listen {
            route: route.to_string(),
            addr,
            source,
        })?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Sets `TCP_DEFER_ACCEPT` on a listener (`None` clears it): the kernel completes the handshake
/// but queues the connection for accept(2) only once the client's first bytes are in, so the
/// event that reports it also finds its request. Meanwhile the client holds an entry of the
/// SYN queue. A client that sends nothing is queued at the first retransmission of its SYN-ACK
/// at or past `delay` (1, 3, 7, 15 ... s; whole seconds, rounded up), when its ACK of that
/// SYN-ACK is taken. Can be set on a listening socket at any time: the kernel reads it again at
/// each retransmission and ACK of the handshakes pending too, so a lower value releases
/// clients already waiting at their next retransmission.
pub fn set_defer_accept(listener: &impl AsRawFd, delay: Option<Duration>) -> io::Result<()> {
    let secs = delay.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads a c_int of the given size from a live local.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a non-blocking connect to `addr` with the options applied first.
/// Completion is reported later by a writable event (see `Pair::check_connected`); over loopback
/// it is usually complete on return (see `Worker::connect_to`).
pub fn connect_upstream(addr: SocketAddr, opts: &SocketOptions) -> io::Result<TcpStream> {
    // Non-blocking from the start (SOCK_NONBLOCK): one syscall less per connection.
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    apply_options(&socket, opts)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // Non-blocking connect: EINPROGRESS is the normal answer.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Applies `TCP_NODELAY`, keepalive (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`) and
/// `SO_RCVBUF`/`SO_SNDBUF`.
fn apply_options(socket: &Socket, opts: &SocketOptions) -> io::Result<()> {
    if opts.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    if let Some(k) = opts.keepalive {
        let ka = TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval);
        socket.set_tcp_keepalive(&ka)?;
    }
    if let Some(n) = opts.recv_buffer_size {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(n) = opts.send_buffer_size {
        socket.set_send_buffer_size(n)?;
    }
    Ok(())
}

/// Sets `SO_LINGER` to 0 so that closing the socket sends RST instead of FIN.
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Bytes in the socket's send queue that the peer has not acknowledged (`SIOCOUTQ`), a FIN
/// included once `shutdown(Write)` queued it (it takes one sequence number). Still answers after
/// a reset, which threw those bytes away: with `SO_LINGER` 0, so does `close(2)`.
pub fn unacked(stream: &impl AsRawFd) -> io::Result<u64> {
    queue_len(stream, libc::TIOCOUTQ) // SIOCOUTQ
}

/// Bytes received and not yet read (`SIOCINQ`). Still answers after a reset: what the peer sent
/// before it stays readable, ahead of the error.
pub fn unread(stream: &impl AsRawFd) -> io::Result<u64> {
    queue_len(stream, libc::FIONREAD) // SIOCINQ
}

/// A socket queue length ioctl (`SIOCINQ`, `SIOCOUTQ`): one int.
fn queue_len(stream: &impl AsRawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer, to a local that outlives the
    // call; the descriptor is the live socket `stream` owns.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), request, &raw mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Classifies an I/O error from a peer: true when it is the peer resetting or vanishing
/// (`ECONNRESET`, `EPIPE`, `ECONNABORTED`, `ENOTCONN`, `ETIMEDOUT` from keepalive), which is routine for a proxy.
pub fn is_peer_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
    )
}

/// True for the accept(2) errors that mean "out of file descriptors or memory": back off, do not spin.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TCP_DEFER_ACCEPT` of a listener in seconds, as the kernel reports it (0: off).
    fn defer_accept(listener: &impl AsRawFd) -> io::Result<u32> {
        let mut secs: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live local c_int.
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&raw mut secs).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u32::try_from(secs).unwrap_or(0))
    }

    #[test]
    fn defer_accept_is_set_in_whole_seconds_and_cleared() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(defer_accept(&l).unwrap(), 0);
        set_defer_accept(&l, Some(Duration::from_millis(200))).unwrap();
        assert_eq!(defer_accept(&l).unwrap(), 1);
        // The kernel keeps a count of SYN-ACK retransmissions, 1, 3, 7, 15 ... seconds after
        // the first, and reports the time of the last one counted.
        for (asked, kept) in [(2, 3), (7, 7), (8, 15), (60, 63)] {
            set_defer_accept(&l, Some(Duration::from_secs(asked))).unwrap();
            assert_eq!(defer_accept(&l).unwrap(), kept, "{asked} s");
        }
        set_defer_accept(&l, None).unwrap();
        assert_eq!(defer_accept(&l).unwrap(), 0);
    }
}
