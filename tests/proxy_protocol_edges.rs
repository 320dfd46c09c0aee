//! PROXY protocol edge cases: the buffered-bytes gauge with a header sent upstream, and a client
//! that closes in the middle of the header it has to send.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{PROMPT, Proxy, Upstream, connect, dead_addr, http_get, metric, read_n};

/// Length of a v2 header for TCP over IPv4.
const V2_TCP4_LEN: usize = 16 + 12;

/// The route's `tcptap_buffered_bytes` and `tcptap_connections_active`.
fn gauges(admin: SocketAddr, route: &str) -> (f64, f64) {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let get = |name: &str| {
        metric(&body, &format!("{name}{{route=\"{route}\"}}"))
            .unwrap_or_else(|| panic!("no {name} for {route}:\n{body}"))
    };
    (
        get("tcptap_buffered_bytes"),
        get("tcptap_connections_active"),
    )
}

/// Polls until the route has no connection left; returns its buffered-bytes gauge then.
fn buffered_once_closed(admin: SocketAddr, route: &str) -> f64 {
    let deadline = Instant::now() + PROMPT;
    loop {
        let (buffered, active) = gauges(admin, route);
        assert!(buffered >= 0.0, "{route}: buffered bytes {buffered}");
        if active == 0.0 {
            return buffered;
        }
        assert!(Instant::now() < deadline, "{route}: {active} still open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn buffered_bytes_gauge_counts_the_proxy_header() {
    let echo = Upstream::echo();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"pp\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         send_proxy_protocol = \"v2\"\n\
         [[route]]\nname = \"dead\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         send_proxy_protocol = \"v1\"\nconnect_attempts = 1\n",
        echo.addr,
        dead_addr()
    );
    let proxy = Proxy::with_config(&config, 2);
    let admin = proxy.admin_addr();
    // Ten connections whose header and request have gone through (the echo sends both back).
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut c = connect(proxy.addrs[0]);
        c.write_all(b"hi").unwrap();
        let back = read_n(&mut c, V2_TCP4_LEN + 2, PROMPT).unwrap();
        assert_eq!(&back[V2_TCP4_LEN..], b"hi");
        open.push(c);
    }
    let (buffered, active) = gauges(admin, "pp");
    assert_eq!(active, 10.0);
    assert_eq!(buffered, 0.0, "nothing is buffered while all ten are open");
    for mut c in open {
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
    }
    assert_eq!(buffered_once_closed(admin, "pp"), 0.0);
    // Connections whose upstream connect fails close with the header still queued.
    for _ in 0..3 {
        // The reset may come before the client's connect(2) returns.
        if let Ok(mut c) = TcpStream::connect_timeout(&proxy.addrs[1], PROMPT) {
            c.set_read_timeout(Some(PROMPT)).unwrap();
            let _ = c.read_to_end(&mut Vec::new());
        }
    }
    proxy.wait_count("upstream connect failed", 3, PROMPT);
    assert_eq!(buffered_once_closed(admin, "dead"), 0.0);
}

#[test]
fn client_closing_inside_its_header_is_closed_at_once() {
    let up = Upstream::echo();
    // A header timeout far beyond the deadline below: only the client's close can end these.
    let config = format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         accept_proxy_protocol = true\nproxy_protocol_timeout = \"60s\"\n",
        up.addr
    );
    let proxy = Proxy::with_config(&config, 1);
    let v2_prefix = &tcptap::proxy_protocol::V2_SIGNATURE[..10];
    let prefixes: [&[u8]; 3] = [b"PROXY TCP4 1.2.3.4", b"PROXY", v2_prefix];
    for (i, prefix) in prefixes.into_iter().enumerate() {
        let start = Instant::now();
        let mut c = connect(proxy.addr());
        c.write_all(prefix).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        // EOF or reset: either way the proxy let go, long before the header timeout.
        let mut rest = Vec::new();
        c.set_read_timeout(Some(PROMPT)).unwrap();
        match c.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("prefix {prefix:?}: no close within {PROMPT:?}: {e}"),
        }
        assert!(rest.is_empty());
        assert!(start.elapsed() < PROMPT, "prefix {prefix:?}");
        proxy.wait_count(
            "refused: client closed before sending its PROXY protocol header",
            i + 1,
            PROMPT,
        );
    }
    assert_eq!(common::close_wait_on(&[proxy.addr().port()]), 0);
    assert_eq!(
        up.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no upstream connect without a header"
    );
}
