//! Transparent (sidecar) mode end to end: `upstream = "original-destination"` behind real
//! iptables `REDIRECT` rules, in a network namespace each test creates.
//!
//! Layout inside the namespace (see `common::netns`): `lo` holds 10.99.0.0/16 (all of it local)
//! and fd99::/64 plus the IPv6 addresses added below. Backends listen on 10.99.0.5 and
//! 10.99.1.7 (fd99::5 for IPv6), on ports the kernel picks. Clients bind to 10.99.9.9 (fd99::9)
//! before connecting, and only traffic from that source is redirected to the proxy:
//!
//! ```text
//! iptables -t nat -A OUTPUT -p tcp -s 10.99.9.9 -d 10.99.0.0/16 -j REDIRECT --to-ports PROXYPORT
//! ```
//!
//! The proxy's own upstream connects leave from 10.99.0.1 (fd99::5), so they reach the backends
//! directly instead of being redirected back to it. The proxy runs inside the namespace through
//! `ip netns exec`; the test's sockets are made on threads that entered it with `setns(2)`.
//!
//! One test uses the `TPROXY` target (mangle table) instead of `REDIRECT`, with
//! `transparent = true`.
//!
//! Needs root, iproute2 and iptables/ip6tables with the nat and mangle tables; without them the tests fail,
//! naming the command that failed.

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use common::netns::NetNs;
use common::{PROMPT, Pattern, Proxy, Upstream, binary, read_to_end};

const CLIENT_V4: &str = "10.99.9.9";
const CLIENT_V6: &str = "fd99::9";
const REQUEST_LEN: usize = 300 * 1024;
const REPLY_LEN: usize = 200 * 1024;

/// A backend in the namespace: reads the whole request, answers `REPLY_LEN` bytes of
/// `Pattern(seed)` and shuts its write side. What it read arrives on `requests`.
struct Backend {
    upstream: Upstream,
    /// Seed of the reply it sends.
    seed: u64,
    requests: Mutex<mpsc::Receiver<io::Result<Vec<u8>>>>,
}

impl Backend {
    /// Binds `bind` (an address with port 0); call it inside the namespace.
    fn start(bind: &str, seed: u64) -> Backend {
        let (tx, requests) = mpsc::channel();
        let upstream = Upstream::start_on(bind, move |mut s| {
            let got = read_to_end(&mut s, Duration::from_secs(30));
            let ok = got.is_ok();
            let _ = tx.send(got);
            if ok {
                let _ = s.write_all(&Pattern::bytes(seed, REPLY_LEN));
                let _ = s.shutdown(Shutdown::Write);
            }
        });
        Backend {
            upstream,
            seed,
            requests: Mutex::new(requests),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.upstream.addr
    }

    fn accepted(&self) -> u64 {
        self.upstream.accepted.load(Ordering::SeqCst)
    }

    /// The next request this backend read, byte for byte.
    fn request(&self) -> Vec<u8> {
        match self
            .requests
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30))
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => panic!("backend {} failed reading the request: {e}", self.addr()),
            Err(_) => panic!("backend {} got no request", self.addr()),
        }
    }
}

/// Connects from `src` (port 0) to `dst`; call it inside the namespace.
fn connect_from(src: &str, dst: SocketAddr) -> io::Result<TcpStream> {
    let src: IpAddr = src.parse().unwrap();
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&dst.into(), PROMPT)?;
    Ok(sock.into())
}

/// Client side of one exchange: sends the request, half-closes, reads the reply to EOF.
/// Returns the client's own address and the reply.
fn exchange(src: &str, dst: SocketAddr, seed: u64) -> (SocketAddr, Vec<u8>) {
    let mut c = connect_from(src, dst).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"));
    let me = c.local_addr().unwrap();
    c.write_all(&Pattern::bytes(seed, REQUEST_LEN))
        .unwrap_or_else(|e| panic!("{me} -> {dst}: send: {e}"));
    c.shutdown(Shutdown::Write).unwrap();
    let reply = read_to_end(&mut c, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{me} -> {dst}: reply: {e}"));
    (me, reply)
}

/// Connects from `src` (by default the destination's own address, as a client on the same
/// host would) to `dst` and expects the proxy to reset the connection without a byte. The reset
/// can come before the connect call returns. Returns the client's address.
fn expect_refused(src: Option<&str>, dst: SocketAddr) -> SocketAddr {
    let src: IpAddr = src.map_or(dst.ip(), |s| s.parse().unwrap());
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)).unwrap();
    sock.bind(&SocketAddr::new(src, 0).into())
        .unwrap_or_else(|e| panic!("bind {src}: {e}"));
    let me = sock.local_addr().unwrap().as_socket().unwrap();
    match sock.connect_timeout(&dst.into(), PROMPT) {
        Ok(()) => {
            let mut c: TcpStream = sock.into();
            let got = read_to_end(&mut c, PROMPT);
            assert!(
                matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "a refused connection {me} -> {dst} must be reset, got {got:?}"
            );
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connect {me} -> {dst}: {e}"),
    }
    me
}

/// Checks the proxy's line about a connection refused by the allow-list: it names the client,
/// the destination and the reason.
fn assert_refused_by_allow_list(proxy: &Proxy, client: SocketAddr, dst: SocketAddr) {
    let line = proxy.wait_log(&format!("{client} -> "), PROMPT);
    assert!(
        line.contains("refused:")
            && line.contains("allowed_destinations")
            && line.contains(&dst.to_string()),
        "{line}"
    );
}

/// Checks the proxy's close line for a relayed exchange: client address, original destination,
/// and the byte counts both ways.
fn assert_close_line(proxy: &Proxy, client: SocketAddr, dst: SocketAddr) {
    let line = proxy.wait_log(&format!("{client} -> {dst}: "), PROMPT);
    assert!(
        line.contains(&format!(
            "{REQUEST_LEN} bytes to upstream, {REPLY_LEN} bytes to client"
        )),
        "{line}"
    );
}

/// One exchange from `src` inside `ns` to `backend` through the proxy: the reply and the
/// request arrive byte-exact, and the proxy's close line names the original destination.
fn relay(ns: &NetNs, proxy: &Proxy, src: &str, backend: &Backend, seed: u64) {
    let dst = backend.addr();
    let (client, reply) = ns.run_inside(|| exchange(src, dst, seed));
    assert!(
        reply == Pattern::bytes(backend.seed, REPLY_LEN),
        "reply from {dst}"
    );
    assert!(
        backend.request() == Pattern::bytes(seed, REQUEST_LEN),
        "request at {dst}"
    );
    assert_close_line(proxy, client, dst);
}

fn route(listen: &str, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"egress\"\nlisten = \"{listen}\"\n\
         upstream = \"original-destination\"\n{extra}\n"
    )
}

/// Two backends on two addresses: each redirected connection reaches the one the client asked
/// for, byte-exact both ways with half-close, and the log names the original destination.
#[test]
fn ipv4_redirected_connections_reach_their_original_destination() {
    let ns = NetNs::new();
    let (a, b) = ns.run_inside(|| {
        (
            Backend::start("10.99.0.5:0", 0xA),
            Backend::start("10.99.1.7:0", 0xB),
        )
    });
    let proxy = Proxy::with_config_cmd(
        ns.command(binary()),
        &route(
            "127.0.0.1:0",
            &format!(
                "allowed_destinations = [\"10.99.0.5/32\", \"10.99.1.0/24:{}\"]",
                b.addr().port()
            ),
        ),
        1,
    );
    ns.redirect_from(CLIENT_V4, "10.99.0.0/16", proxy.addr().port());

    relay(&ns, &proxy, CLIENT_V4, &a, 1);
    relay(&ns, &proxy, CLIENT_V4, &b, 2);
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
    assert_eq!(proxy.count_log("refused:"), 0, "{}", proxy.logs());
}

/// Destinations outside `allowed_destinations` (another network, or an allowed network on
/// another port) and a connection straight to the proxy's listener are reset and logged, and
/// never connected to.
#[test]
fn ipv4_refusals_are_reset_logged_and_never_connected() {
    let ns = NetNs::new();
    let (b, other_port) = ns.run_inside(|| {
        (
            Backend::start("10.99.1.7:0", 0xB),
            Backend::start("10.99.1.7:0", 0xC),
        )
    });
    let outside: SocketAddr = format!("10.99.2.2:{}", b.addr().port()).parse().unwrap();
    let proxy = Proxy::with_config_cmd(
        ns.command(binary()),
        &route(
            "127.0.0.1:0",
            &format!(
                "allowed_destinations = [\"10.99.1.0/24:{}\"]",
                b.addr().port()
            ),
        ),
        1,
    );
    ns.redirect_from(CLIENT_V4, "10.99.0.0/16", proxy.addr().port());

    // Allowed network, port not allowed.
    let client = ns.run_inside(|| expect_refused(Some(CLIENT_V4), other_port.addr()));
    assert_refused_by_allow_list(&proxy, client, other_port.addr());
    assert_eq!(
        other_port.accepted(),
        0,
        "a refused destination was connected"
    );

    // Network not allowed.
    let client = ns.run_inside(|| expect_refused(Some(CLIENT_V4), outside));
    assert_refused_by_allow_list(&proxy, client, outside);

    // Straight to the listener: not redirected, so there is no destination to go to.
    ns.run_inside(|| expect_refused(None, proxy.addr()));
    proxy.wait_count("refused:", 3, PROMPT);

    // The allowed destination still works, and nothing else was refused in the meantime (a
    // connection proxied to the proxy itself would have shown up as one more refusal).
    let (cb, reply) = ns.run_inside(|| exchange(CLIENT_V4, b.addr(), 3));
    assert!(reply == Pattern::bytes(0xB, REPLY_LEN), "reply from B");
    assert!(
        b.request() == Pattern::bytes(3, REQUEST_LEN),
        "request at B"
    );
    assert_close_line(&proxy, cb, b.addr());
    assert_eq!(proxy.count_log("refused:"), 3, "{}", proxy.logs());
    assert_eq!((b.accepted(), other_port.accepted()), (1, 0));
}

/// With a wildcard listener and no allow-list, loop protection alone refuses a connection that
/// was not redirected at all (no connection tracking yet), one straight to the listener, and a
/// redirected one whose original destination is the listener's port on a local address.
#[test]
fn ipv4_loop_protection_on_a_wildcard_listener() {
    let ns = NetNs::new();
    let a = ns.run_inside(|| Backend::start("10.99.0.5:0", 0xA));
    let proxy = Proxy::with_config_cmd(ns.command(binary()), &route("0.0.0.0:0", ""), 1);
    let port = proxy.addr().port();
    let loopback: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // No rule in the namespace yet: connection tracking knows nothing of this connection.
    ns.run_inside(|| expect_refused(None, loopback));
    proxy.wait_count("refused:", 1, PROMPT);

    ns.redirect_from(CLIENT_V4, "10.99.0.0/16", port);
    // Not redirected, connection tracking active.
    ns.run_inside(|| expect_refused(None, loopback));
    proxy.wait_count("refused:", 2, PROMPT);
    // Redirected, but the original destination is the proxy's own listener.
    let own: SocketAddr = format!("10.99.0.1:{port}").parse().unwrap();
    ns.run_inside(|| expect_refused(Some(CLIENT_V4), own));
    proxy.wait_count("refused:", 3, PROMPT);

    let (ca, reply) = ns.run_inside(|| exchange(CLIENT_V4, a.addr(), 4));
    assert!(reply == Pattern::bytes(0xA, REPLY_LEN), "reply from A");
    assert!(
        a.request() == Pattern::bytes(4, REQUEST_LEN),
        "request at A"
    );
    assert_close_line(&proxy, ca, a.addr());
    assert_eq!(proxy.count_log("refused:"), 3, "{}", proxy.logs());
}

/// The same over IPv6 with ip6tables: routing by original destination, a refused destination,
/// a refused direct connection.
#[test]
fn ipv6_redirected_connections_reach_their_original_destination() {
    let ns = NetNs::new();
    ns.add_addr("fd99::5/128");
    ns.add_addr(&format!("{CLIENT_V6}/128"));
    let a = ns.run_inside(|| Backend::start("[fd99::5]:0", 0xA));
    let outside: SocketAddr = format!("[fd99::6]:{}", a.addr().port()).parse().unwrap();
    let proxy = Proxy::with_config_cmd(
        ns.command(binary()),
        &route(
            "[::1]:0",
            "allowed_destinations = [\"[fd99::5]/128\", \"10.0.0.0/8\"]",
        ),
        1,
    );
    ns.redirect_from(CLIENT_V6, "fd99::/64", proxy.addr().port());

    relay(&ns, &proxy, CLIENT_V6, &a, 5);

    let client = ns.run_inside(|| expect_refused(Some(CLIENT_V6), outside));
    assert_refused_by_allow_list(&proxy, client, outside);
    ns.run_inside(|| expect_refused(None, proxy.addr()));
    proxy.wait_count("refused:", 2, PROMPT);
    assert_eq!(a.accepted(), 1);
}

/// `transparent = true`: a TPROXY listener (IP_TRANSPARENT) takes connections to any
/// destination; the destination is the accepted socket's local address. A connection straight
/// to the listener is refused.
#[test]
fn ipv4_tproxy_listener_forwards_to_the_local_address() {
    let ns = NetNs::new();
    let (a, b) = ns.run_inside(|| {
        (
            Backend::start("10.99.0.5:0", 0xA),
            Backend::start("10.99.1.7:0", 0xB),
        )
    });
    let proxy = Proxy::with_config_cmd(
        ns.command(binary()),
        &route("127.0.0.1:0", "transparent = true"),
        1,
    );
    ns.tproxy_from(CLIENT_V4, "10.99.0.0/16", "127.0.0.1", proxy.addr().port());

    relay(&ns, &proxy, CLIENT_V4, &a, 7);
    relay(&ns, &proxy, CLIENT_V4, &b, 8);

    ns.run_inside(|| expect_refused(None, proxy.addr()));
    proxy.wait_count("refused:", 1, PROMPT);
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

/// Byte flow through a redirected connection is untouched by a slow reader: the client reads
/// the reply in small pieces while the backend is still sending.
#[test]
fn ipv4_redirected_stream_with_interleaved_reads() {
    let ns = NetNs::new();
    let (tx, rx) = mpsc::channel::<()>();
    let echo = ns.run_inside(|| {
        Upstream::start_on("10.99.0.5:0", move |mut s| {
            let mut buf = vec![0; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            let _ = tx.send(());
        })
    });
    let proxy = Proxy::with_config_cmd(ns.command(binary()), &route("127.0.0.1:0", ""), 1);
    ns.redirect_from(CLIENT_V4, "10.99.0.0/16", proxy.addr().port());
    let total = 256 * 1024;
    ns.run_inside(|| {
        let mut c = connect_from(CLIENT_V4, echo.addr).unwrap();
        let data = Pattern::bytes(6, total);
        let mut got = Vec::new();
        for chunk in data.chunks(16 * 1024) {
            c.write_all(chunk).unwrap();
            got.extend(common::read_n(&mut c, chunk.len(), PROMPT).unwrap());
        }
        c.shutdown(Shutdown::Write).unwrap();
        assert!(read_to_end(&mut c, PROMPT).unwrap().is_empty());
        assert!(got == data, "echo through the redirect differs");
    });
    rx.recv_timeout(PROMPT).expect("backend saw the half-close");
    proxy.wait_log(&format!("-> {}: ", echo.addr), PROMPT);
}

also_with_two_workers!(ipv4_redirected_connections_reach_their_original_destination);

/// A missing exclusion rule: the proxy's own upstream connect is redirected back to it, with
/// the same original destination. The proxy must recognize its own connection and refuse it,
/// instead of chaining connections to itself until `max_connections` is reached and then
/// hanging every client.
#[test]
fn ipv4_redirect_loop_through_a_missing_exclusion_is_refused() {
    let ns = NetNs::new();
    let a = ns.run_inside(|| Backend::start("10.99.0.5:0", 0xA));
    let proxy = Proxy::with_config_cmd(
        ns.command(binary()),
        &format!("max_connections = 50\n{}", route("127.0.0.1:0", "")),
        1,
    );
    // Every connection to 10.99.0.0/16 is redirected, the proxy's own included.
    ns.redirect("10.99.0.0/16", proxy.addr().port());
    let (client, got) = ns.run_inside(|| {
        // The refusal can be so fast that connect(2) itself sees the reset.
        let mut c = match connect_from(CLIENT_V4, a.addr()) {
            Ok(c) => c,
            Err(e) => return (None, Err(e)),
        };
        let me = c.local_addr().unwrap();
        let _ = c.write_all(b"hello");
        let _ = c.shutdown(Shutdown::Write);
        (Some(me), read_to_end(&mut c, PROMPT))
    });
    assert!(
        !matches!(&got, Err(e) if e.kind() == io::ErrorKind::TimedOut),
        "the client hangs: the proxy is looping through its own listener; log:\n{}",
        proxy.logs()
    );
    assert!(
        !matches!(&got, Ok(b) if !b.is_empty()),
        "the client got data: {got:?}"
    );
    if let Some(client) = client {
        proxy.wait_log(&format!("{client} -> "), PROMPT);
    }
    let refused = proxy.wait_log("refused:", PROMPT);
    assert!(proxy.count_log("refused:") <= 2, "{}", proxy.logs());
    assert_eq!(
        a.accepted(),
        0,
        "the backend cannot be reached through the redirect"
    );
    drop(refused);
}
