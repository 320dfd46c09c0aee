//! `defer_accept`: the kernel hands a client over only once it has sent something
//! (`TCP_DEFER_ACCEPT`), so the proxy connects upstream with the request in hand; a client that
//! sends nothing (a server-speaks-first protocol) is still served after the delay. A reload
//! changes it on the listener the route keeps.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

const SIGHUP: i32 = 1;

/// How long a client is kept quiet to show that the proxy has not taken it: a proxy that
/// accepts at once connects upstream within milliseconds.
const QUIET: Duration = Duration::from_millis(500);

/// Clients per check: enough that, with two workers, both listeners (`SO_REUSEPORT` spreads
/// clients by their addresses) get some.
const CLIENTS: u64 = 16;

/// True when `up` has seen `n` more connections than `before` within `within`.
fn upstream_connected(up: &Upstream, before: u64, n: u64, within: Duration) -> bool {
    let end = Instant::now() + within;
    loop {
        if up.accepted.load(Ordering::SeqCst) >= before + n {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Clients connect and stay quiet: with `deferred`, the upstream sees none of them until they
/// speak; without, it sees them all at once. Either way each request is echoed.
fn check_client(proxy: &impl Target, echo: &Upstream, deferred: bool, what: &str) {
    let before = echo.accepted.load(Ordering::SeqCst);
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| connect(proxy.addr())).collect();
    if deferred {
        assert!(
            !upstream_connected(echo, before, 1, QUIET),
            "{what}: the upstream saw a connection while the clients were quiet\n{}",
            proxy.logs()
        );
    } else {
        assert!(
            upstream_connected(echo, before, CLIENTS, PROMPT),
            "{what}: the upstream did not see the quiet clients\n{}",
            proxy.logs()
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(b"hello").unwrap();
        assert_eq!(
            read_n(c, 5, PROMPT).unwrap(),
            b"hello",
            "{what}: client {i}"
        );
    }
    assert!(upstream_connected(echo, before, CLIENTS, PROMPT), "{what}");
}

fn a_deferred_route_connects_upstream_once_the_client_speaks() {
    let echo = Upstream::echo();
    let proxy = Proxy::with_config(
        &one_route("127.0.0.1:0", echo.addr, "defer_accept = \"30s\""),
        1,
    );
    let line = proxy.wait_log("listening on", PROMPT);
    assert!(line.contains("defer_accept 30s"), "{line}");
    check_client(&proxy, &echo, true, "deferred");
    // Many clients whose requests come with the connection, as a load generator's do.
    for i in 0..200u32 {
        let mut c = connect(proxy.addr());
        c.write_all(&i.to_be_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), i.to_be_bytes(), "{i}");
    }
}

/// A server-speaks-first upstream: the client sends nothing and still gets the greeting, after
/// about the delay (the kernel's SYN-ACK retransmission at 1 s, whose ACK it then takes).
fn a_deferred_client_that_sends_nothing_is_served_after_the_delay() {
    let greeter = Upstream::start(|mut s| {
        let _ = s.write_all(b"220 ready\r\n");
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let proxy = Proxy::with_config(
        &one_route("127.0.0.1:0", greeter.addr, "defer_accept = \"1s\""),
        1,
    );
    let t0 = Instant::now();
    let mut c = connect(proxy.addr());
    let got = read_to_end(&mut c, Duration::from_secs(15)).unwrap_or_else(|e| {
        panic!(
            "no greeting after {:?}: {e}\n{}",
            t0.elapsed(),
            proxy.logs()
        )
    });
    assert_eq!(got, b"220 ready\r\n");
    // Not before the kernel's first retransmission of the SYN-ACK (a timer of 1 s).
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "greeting after {:?}: the connection was not deferred",
        t0.elapsed()
    );
}

also_with_two_workers!(
    a_deferred_route_connects_upstream_once_the_client_speaks,
    a_deferred_client_that_sends_nothing_is_served_after_the_delay,
    a_reload_turns_deferring_on_and_off_on_the_same_listener,
);

#[test]
fn deferred_route_connects_upstream_once_the_client_speaks() {
    a_deferred_route_connects_upstream_once_the_client_speaks();
}

#[test]
fn deferred_client_that_sends_nothing_is_served_after_the_delay() {
    a_deferred_client_that_sends_nothing_is_served_after_the_delay();
}

/// The global value applies to routes from `--listen`/`--upstream` and to routes without their
/// own; a route's own value overrides it, `"off"` included.
#[test]
fn the_global_value_applies_unless_a_route_sets_its_own() {
    let echo = Upstream::echo();
    let dir = TempDir::new("defer-global");
    let path = dir.path("proxy.toml");
    write_file(&path, "defer_accept = \"30s\"\n");
    let up = echo.addr.to_string();
    let cli = Proxy::start(
        &[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
        ],
        1,
    );
    check_client(&cli, &echo, true, "--listen route, global 30s");
    let route = |name: &str, extra: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{extra}"
        )
    };
    let proxy = Proxy::with_config(
        &format!(
            "defer_accept = \"30s\"\n{}{}",
            route("inherits", ""),
            route("own", "defer_accept = \"off\"\n")
        ),
        2,
    );
    let deferred = one_addr(&proxy, 0);
    let not = one_addr(&proxy, 1);
    check_client(&deferred, &echo, true, "route inheriting 30s");
    check_client(&not, &echo, false, "route with its own \"off\"");
}

/// A view of one route of a proxy with several, for `check_client`.
fn one_addr(proxy: &Proxy, i: usize) -> RouteOf<'_> {
    RouteOf(proxy, proxy.addrs[i])
}

struct RouteOf<'a>(&'a Proxy, SocketAddr);

trait Target {
    fn addr(&self) -> SocketAddr;
    fn logs(&self) -> String;
}

impl Target for Proxy {
    fn addr(&self) -> SocketAddr {
        Proxy::addr(self)
    }
    fn logs(&self) -> String {
        Proxy::logs(self)
    }
}

impl Target for RouteOf<'_> {
    fn addr(&self) -> SocketAddr {
        self.1
    }
    fn logs(&self) -> String {
        self.0.logs()
    }
}

/// A reload turns deferring on and off on the listener a route keeps (same address, so
/// clients keep connecting where they did), and a route it adds defers from the start.
fn a_reload_turns_deferring_on_and_off_on_the_same_listener() {
    let echo = Upstream::echo();
    let dir = TempDir::new("defer-reload");
    let path = dir.path("proxy.toml");
    let route = |name: &str, defer: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{defer}",
            echo.addr
        )
    };
    write_file(&path, &route("r", ""));
    // Each worker says when it has applied a reload (a debug line).
    let proxy = Proxy::start_in(&["--config", path.to_str().unwrap()], 1, None, |cmd| {
        cmd.env("RUST_LOG", "info,tcptap::event_loop=debug");
    });
    let applied = |generation: u64| {
        proxy.wait_count(
            &format!("configuration generation {generation} applied"),
            workers(),
            PROMPT,
        );
    };
    let addr = proxy.addr();
    check_client(&proxy, &echo, false, "before any reload");
    write_file(&path, &route("r", "defer_accept = \"30s\"\n"));
    proxy.signal(SIGHUP);
    proxy.wait_log("route `r`: defer_accept is now 30s (was off)", PROMPT);
    applied(2);
    check_client(&proxy, &echo, true, "after the reload that sets 30s");
    // Off again, and a new route that defers.
    write_file(
        &path,
        &format!(
            "{}{}",
            route("r", "defer_accept = \"off\"\n"),
            route("n", "defer_accept = \"30s\"\n")
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("route `r`: defer_accept is now off (was 30s)", PROMPT);
    applied(3);
    let line = proxy.wait_log("route `n`: listening on", PROMPT);
    assert!(line.contains("defer_accept 30s"), "{line}");
    assert_eq!(proxy.addr(), addr);
    check_client(&proxy, &echo, false, "after the reload that sets off");
    let added = RouteOf(&proxy, proxy.route_addr("n"));
    check_client(&added, &echo, true, "a route added by a reload");
    // A value past the limit is rejected with the key named, and nothing changes.
    write_file(&path, &route("r", "defer_accept = \"2m\"\n"));
    proxy.signal(SIGHUP);
    let line = proxy.wait_log("reload rejected", PROMPT);
    assert!(
        line.contains("defer_accept") && line.contains("longer than 1m"),
        "{line}"
    );
    check_client(&proxy, &echo, false, "after a rejected reload");
}

#[test]
fn reload_turns_deferring_on_and_off_on_the_same_listener() {
    a_reload_turns_deferring_on_and_off_on_the_same_listener();
}

/// A bad value at startup: the file, the key and the problem, and a non-zero exit.
#[test]
fn a_bad_value_names_the_file_and_the_key() {
    let dir = TempDir::new("defer-bad");
    for (text, says) in [
        ("defer_accept = \"soon\"", "is not a duration"),
        ("defer_accept = \"2m\"", "is longer than 1m"),
        ("defer_accept = 5", "a duration such as"),
    ] {
        let path = dir.path("proxy.toml");
        write_file(
            &path,
            &format!("[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{text}\n"),
        );
        let out = std::process::Command::new(binary())
            .args(["--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: {err}");
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains("route[0].defer_accept")
                && err.contains(says),
            "{text}: {err}"
        );
    }
}
