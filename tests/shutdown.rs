//! Graceful shutdown on SIGTERM/SIGINT: listeners close at once, in-flight pairs finish within the
//! drain timeout, the rest are reset, the process exits 0; a second SIGINT stops at once.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

also_with_two_workers!(
    sigterm_drains_inflight_transfer_and_refuses_new_connections,
    drain_timeout_resets_stragglers_and_exits_zero,
    second_sigint_stops_at_once,
    idle_proxy_exits_zero_on_sigterm,
);

#[test]
fn sigterm_drains_inflight_transfer_and_refuses_new_connections() {
    const LEN: usize = 48 << 20;
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        let mut go = [0u8; 2];
        s.read_exact(&mut go).unwrap();
        tx.send(send_pattern(&mut s, 11, LEN).map_err(|e| e.to_string()))
            .unwrap();
    });
    let mut proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    c.write_all(b"go").unwrap();
    // Read the first MiB, then ask the proxy to stop while most of the transfer is still to come.
    let mut first = vec![0u8; 1 << 20];
    c.read_exact(&mut first).unwrap();
    proxy.signal(SIGTERM);
    proxy.wait_log("shutting down", PROMPT);
    let refused = TcpStream::connect_timeout(&proxy.addr(), PROMPT);
    assert_eq!(
        refused.unwrap_err().kind(),
        ErrorKind::ConnectionRefused,
        "listener still open while draining"
    );
    // The rest arrives byte-exact.
    let mut rest = Vec::with_capacity(LEN);
    rest.extend_from_slice(&first);
    rest.extend(read_to_end(&mut c, Duration::from_secs(30)).unwrap());
    assert_eq!(rest.len(), LEN);
    assert!(
        rest == Pattern::bytes(11, LEN),
        "transfer corrupted during shutdown"
    );
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), Ok(()));
    // The upstream has finished; the pair lives until the client closes its side too.
    drop(c);
    let status = proxy.wait_exit(PROMPT);
    assert_eq!(status.code(), Some(0), "{}", proxy.logs());
    proxy.wait_log("all connections finished", PROMPT);
}

#[test]
fn drain_timeout_resets_stragglers_and_exits_zero() {
    let echo = Upstream::echo();
    let config = one_route("127.0.0.1:0", echo.addr, "drain_timeout = \"700ms\"");
    let mut proxy = Proxy::with_config(&config, 1);
    let mut idle = connect(proxy.addr());
    idle.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut idle, 2, PROMPT).unwrap(), b"hi");
    let start = Instant::now();
    proxy.signal(SIGTERM);
    let status = proxy.wait_exit(PROMPT);
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(600),
        "exited after {took:?}, before the drain timeout"
    );
    let r = read_to_end(&mut idle, PROMPT);
    assert_eq!(
        r.unwrap_err().kind(),
        ErrorKind::ConnectionReset,
        "straggler must be reset, not FIN'd"
    );
    // The log reader may still be catching up with the exited process's last lines.
    proxy.wait_log("aborted at end of shutdown drain", PROMPT);
    proxy.wait_log("1 reset at shutdown)", PROMPT);
}

#[test]
fn second_sigint_stops_at_once() {
    let echo = Upstream::echo();
    let config = one_route("127.0.0.1:0", echo.addr, "drain_timeout = \"60s\"");
    let mut proxy = Proxy::with_config(&config, 1);
    let mut c = connect(proxy.addr());
    c.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut c, 1, PROMPT).unwrap(), b"x");
    proxy.signal(SIGINT);
    proxy.wait_log("shutting down", PROMPT);
    let start = Instant::now();
    proxy.signal(SIGINT);
    let status = proxy.wait_exit(PROMPT);
    assert!(start.elapsed() < PROMPT);
    assert_eq!(status.code(), Some(130));
    assert_eq!(
        read_to_end(&mut c, PROMPT).unwrap_err().kind(),
        ErrorKind::ConnectionReset
    );
    // The log says what cut the connection: not the drain, which had 60 s to go.
    proxy.wait_log("aborted by an immediate stop", PROMPT);
    assert_eq!(
        proxy.count_log("end of shutdown drain"),
        0,
        "{}",
        proxy.logs()
    );
    proxy.wait_log("1 reset at shutdown)", PROMPT);
}

#[test]
fn idle_proxy_exits_zero_on_sigterm() {
    let echo = Upstream::echo();
    let mut proxy = Proxy::forwarding_to(echo.addr);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(PROMPT).code(), Some(0));
}
