//! The destination a client originally asked for, on connections that the kernel redirected
//! to us (iptables/nftables `REDIRECT` or `DNAT`), and the socket option transparent
//! (`TPROXY`) listeners need.
//!
//! - [`original_destination`] asks netfilter's connection tracking through `getsockopt`:
//!   `SO_ORIGINAL_DST` at level `SOL_IP` for IPv4 connections and `IP6T_SO_ORIGINAL_DST`
//!   at level `SOL_IPV6` for IPv6 ones (both option number 80). The family is taken from the
//!   socket's local address, so an IPv4 client accepted on a dual-stack IPv6 listener (local
//!   address `::ffff:a.b.c.d`) is asked about as the IPv4 connection it is, and its answer is
//!   a plain IPv4 address.
//! - [`set_transparent`] sets `IP_TRANSPARENT` or `IPV6_TRANSPARENT` (by the socket's
//!   domain) so a listener can accept connections `TPROXY` steers to it and a socket can bind
//!   to a non-local address. It needs `CAP_NET_ADMIN`.
//!
//! Invariants: the functions only issue `getsockopt`/`setsockopt`/`getsockname` on the given
//! socket, never block, and return either an address the kernel reported for an IP family or
//! an error; they never make up an address.
//!
//! On a connection that was not redirected, [`original_destination`] fails with `ENOENT`
//! when connection tracking knows nothing about it, but returns the socket's own local
//! address when connection tracking is active in the network namespace (it then tracks every
//! connection, redirected or not). Callers must treat a result equal to the local address as
//! "not redirected", or they would connect to themselves.
//!
//! Both functions are Linux-only, like the socket options.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::{Domain, SockRef};

/// The destination the client connected to before netfilter redirected the connection to this
/// socket (an accepted TCP stream).
///
/// Errors: `ENOENT` when connection tracking has no entry for the connection; `ENOPROTOOPT`
/// or `EINVAL` on sockets the option does not apply to; `InvalidInput` for a socket that is
/// not IPv4 or IPv6 (the check happens before asking the kernel). See the module
/// documentation for connections that were not redirected.
pub fn original_destination(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let sock = SockRef::from(socket);
    let local = sock.local_addr()?.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "original destination asked of a socket that is not IPv4 or IPv6",
        )
    })?;
    let ipv4_connection = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4_connection {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    original.as_socket().ok_or_else(|| {
        io::Error::other("the kernel reported an original destination that is not IPv4 or IPv6")
    })
}

/// Sets `IP_TRANSPARENT` (IPv4 socket) or `IPV6_TRANSPARENT` (IPv6 socket, which also covers
/// IPv4 connections on a dual-stack socket) on `socket`, for `TPROXY` listeners and for
/// binding to non-local addresses. Needs `CAP_NET_ADMIN`; without it the error is
/// `PermissionDenied`. Call it before `bind`.
pub fn set_transparent(socket: &impl AsFd) -> io::Result<()> {
    let sock = SockRef::from(socket);
    let domain = sock.domain()?;
    if domain == Domain::IPV4 {
        sock.set_ip_transparent_v4(true)
    } else if domain == Domain::IPV6 {
        sock.set_ip_transparent_v6(true)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "IP_TRANSPARENT asked of a socket that is not IPv4 or IPv6",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Protocol, Socket, Type};
    use std::net::{Ipv6Addr, TcpListener, TcpStream};

    /// A connected pair over loopback; returns (accepted side, client side).
    fn loopback_pair(listen: &str) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind(listen).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        (accepted, client)
    }

    /// Without a redirect the answer is an error or the socket's own address, never another one.
    fn assert_not_redirected(accepted: &TcpStream) {
        let local = accepted.local_addr().unwrap();
        match original_destination(accepted) {
            Err(e) => assert_ne!(e.kind(), io::ErrorKind::InvalidInput, "{e}"),
            Ok(addr) => assert_eq!(addr, local),
        }
    }

    #[test]
    fn plain_ipv4_connection_is_not_redirected() {
        let (accepted, _client) = loopback_pair("127.0.0.1:0");
        assert_not_redirected(&accepted);
    }

    #[test]
    fn plain_ipv6_connection_is_not_redirected() {
        let Ok(listener) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) else {
            // No IPv6 on this host's loopback: nothing to check.
            return;
        };
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_not_redirected(&accepted);
        drop(client);
    }

    #[test]
    fn unix_socket_is_rejected() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = original_destination(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            set_transparent(&a).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn set_transparent_on_both_families() {
        for domain in [Domain::IPV4, Domain::IPV6] {
            let Ok(socket) = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)) else {
                continue; // IPv6 disabled on this host.
            };
            match set_transparent(&socket) {
                Ok(()) => {
                    let on = if domain == Domain::IPV4 {
                        socket.ip_transparent_v4().unwrap()
                    } else {
                        socket.ip_transparent_v6().unwrap()
                    };
                    assert!(on, "{domain:?}");
                }
                // Not running with CAP_NET_ADMIN.
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
            }
        }
    }
}
