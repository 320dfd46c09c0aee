//! End-to-end check of `orig_dst::original_destination` against real netfilter redirects.
//!
//! Each test creates its own network namespace (`ip netns add tcptap-test-<pid>-<n>`), brings
//! up `lo` in it, gives `lo` addresses from 10.99.0.0/16 and fd99::/64, and installs
//! `iptables`/`ip6tables` `nat OUTPUT ... REDIRECT` rules there. The sockets are created on a
//! thread that has entered the namespace with `setns(2)` (which affects only that thread), so
//! all traffic and all rules stay inside the namespace, and the namespace is deleted by a guard
//! even when the test fails.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2), and `iptables`/`ip6tables`
//! with the nat table. When any of this is missing the tests fail and say which command
//! failed; they do not pass silently.

mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tcptap::orig_dst::original_destination;

use common::netns::NetNs;

/// Where the client believes it connects; nothing listens there.
const TARGET_V4: &str = "10.99.0.7:8080";
const TARGET_V6: &str = "[fd99::7]:8080";

/// Connects to `target` (which the namespace redirects to `listener`), accepts, checks that
/// the bytes flow, and returns what `original_destination` says about the accepted socket.
fn connect_and_ask(listener: &TcpListener, target: SocketAddr) -> io::Result<SocketAddr> {
    // A bound on the handshake, so a missing redirect fails the test instead of hanging it.
    let mut client = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    let (mut accepted, _) = listener.accept()?;
    client.write_all(b"ping")?;
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got)?;
    assert_eq!(&got, b"ping");
    original_destination(&accepted)
}

#[test]
fn ipv4_redirect_reports_the_original_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V4.parse().unwrap();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        ns.redirect("10.99.0.0/16", listener.local_addr().unwrap().port());
        connect_and_ask(&listener, target)
    });
    assert_eq!(got.unwrap(), target);
}

#[test]
fn ipv6_redirect_reports_the_original_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V6.parse().unwrap();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        ns.redirect("fd99::/64", listener.local_addr().unwrap().port());
        connect_and_ask(&listener, target)
    });
    assert_eq!(got.unwrap(), target);
}

#[test]
fn ipv4_client_on_dual_stack_listener_reports_ipv4_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V4.parse().unwrap();
    let (got, local) = ns.run_inside(|| {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_only_v6(false).unwrap();
        socket
            .bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())
            .unwrap();
        socket.listen(8).unwrap();
        let listener: TcpListener = socket.into();
        ns.redirect("10.99.0.0/16", listener.local_addr().unwrap().port());

        let client = TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        drop(client);
        (original_destination(&accepted), local)
    });
    // The accepted socket is IPv6 with a v4-mapped local address ...
    assert!(
        matches!(local, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some()),
        "{local}"
    );
    // ... and the answer is the plain IPv4 destination.
    assert_eq!(got.unwrap(), target);
}

#[test]
fn connection_that_was_not_redirected_reports_its_own_address() {
    let ns = NetNs::new();
    let (v4, v6) = ns.run_inside(|| {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        // Rules for other addresses make connection tracking active in the namespace.
        ns.redirect("10.99.0.0/16", v4.local_addr().unwrap().port());
        ns.redirect("fd99::/64", v6.local_addr().unwrap().port());
        (
            (
                connect_and_ask(&v4, v4.local_addr().unwrap()),
                v4.local_addr().unwrap(),
            ),
            (
                connect_and_ask(&v6, v6.local_addr().unwrap()),
                v6.local_addr().unwrap(),
            ),
        )
    });
    // Connection tracking knows these connections, unchanged: the answer is the listener's own
    // address, which callers must recognize as "not redirected".
    assert_eq!(v4.0.unwrap(), v4.1);
    assert_eq!(v6.0.unwrap(), v6.1);
}

#[test]
fn without_connection_tracking_the_answer_is_an_error() {
    let ns = NetNs::new();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        connect_and_ask(&listener, listener.local_addr().unwrap())
    });
    // Since Linux 4.10 connection tracking only runs in a namespace once a rule needs it.
    let err = got.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}
