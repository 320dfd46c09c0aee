//! Several upstreams per route: policies, retry on a failed connect, active health checks.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

also_with_two_workers!(health_checks_take_a_dead_upstream_out_and_put_it_back);

/// An upstream that answers every connection with its own tag byte.
fn tagged(tag: u8) -> Upstream {
    Upstream::start(move |mut s| {
        let _ = s.write_all(&[tag]);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    })
}

fn ask(addr: SocketAddr) -> Option<u8> {
    let mut c = connect(addr);
    c.shutdown(Shutdown::Write).ok()?;
    read_to_end(&mut c, PROMPT).ok()?.first().copied()
}

fn route(upstreams: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = upstreams.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

#[test]
fn round_robin_spreads_connections() {
    let ups = [tagged(1), tagged(2), tagged(3)];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let proxy = Proxy::with_config(&route(&addrs, "policy = \"round_robin\""), 1);
    let tags: Vec<u8> = (0..9).map(|_| ask(proxy.addr()).expect("served")).collect();
    for t in 1..=3 {
        assert_eq!(tags.iter().filter(|&&x| x == t).count(), 3, "{tags:?}");
    }
}

#[test]
fn refused_upstream_is_retried_on_the_next() {
    let live = tagged(7);
    let dead = dead_addr();
    let proxy = Proxy::with_config(&route(&[dead, live.addr], "policy = \"first\""), 1);
    for _ in 0..5 {
        assert_eq!(ask(proxy.addr()), Some(7), "{}", proxy.logs());
    }
    assert_eq!(
        proxy.count_log(": upstream connect failed"),
        0,
        "a retry that succeeded is not a failure"
    );
}

/// Over loopback a connect completes within connect(2), and no event says so: the pair must go
/// on at once. A retry that waited for an event would sit until `connect_timeout` (300 ms) and
/// fail. `first` fails; the retry goes to a loopback echo; neither the client nor the echo says
/// anything for `quiet`, three connect timeouts or more.
fn assert_retry_goes_on_without_an_event(first: SocketAddr, quiet: Duration) {
    let echo = Upstream::echo();
    let toml = route(
        &[first, echo.addr],
        "policy = \"first\"\nconnect_timeout = \"300ms\"",
    );
    let proxy = Proxy::with_config(&toml, 1);
    let mut c = connect(proxy.addr());
    assert_kept_open(&mut c, quiet, || proxy.logs());
    assert_eq!(
        proxy.count_log(": upstream connect failed"),
        0,
        "{}",
        proxy.logs()
    );
}

#[test]
fn a_retry_after_a_refused_connect_goes_on_without_an_event() {
    assert_retry_goes_on_without_an_event(dead_addr(), Duration::from_secs(1));
}

/// The retry is made by the connect timer here.
#[test]
fn a_retry_after_a_connect_timeout_goes_on_without_an_event() {
    let hole = Blackhole::start();
    assert_retry_goes_on_without_an_event(hole.addr, Duration::from_millis(1500));
}

#[test]
fn least_connections_prefers_the_idle_upstream() {
    // Upstream 1 holds connections open; new ones go to upstream 2.
    let hold = Upstream::start(|mut s| {
        let _ = s.write_all(&[1]);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let other = tagged(2);
    let proxy = Proxy::with_config(
        &route(&[hold.addr, other.addr], "policy = \"least_connections\""),
        1,
    );
    let mut held = connect(proxy.addr());
    assert_eq!(read_n(&mut held, 1, PROMPT).unwrap(), [1]);
    for _ in 0..4 {
        assert_eq!(ask(proxy.addr()), Some(2));
    }
    drop(held);
}

#[test]
fn health_checks_take_a_dead_upstream_out_and_put_it_back() {
    let a = tagged(1);
    // Upstream B: a port we can close and reopen.
    let b_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = b_listener.local_addr().unwrap();
    let serve_b = |l: TcpListener| {
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                let _ = s.write_all(&[2]);
                let _ = s.shutdown(Shutdown::Write);
            }
        })
    };
    let extra = "policy = \"round_robin\"\n[route.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let proxy = Proxy::with_config(&format!("{admin}{}", route(&[a.addr, b_addr], extra)), 1);
    drop(b_listener); // B is down from the start
    let line = proxy.wait_log("DOWN", PROMPT);
    assert!(
        line.contains(&format!(
            "route `route0`: upstream {b_addr} ({b_addr}) is DOWN after 2"
        )),
        "{line}"
    );
    // One loop probes for all: one line, whatever the number of loops.
    assert_eq!(proxy.count_log("is DOWN after"), 1, "{}", proxy.logs());
    // Every connection now goes to A, with no failed attempt on B first.
    for _ in 0..6 {
        assert_eq!(ask(proxy.addr()), Some(1), "{}", proxy.logs());
    }
    let (_, metrics) = http_get(proxy.admin_addr(), "/metrics");
    let failures = metric(
        &metrics,
        "tcptap_upstream_connect_failures_total{route=\"route0\",cause=\"refused\"}",
    );
    assert_eq!(
        failures,
        Some(0.0),
        "connections still tried the DOWN upstream:\n{metrics}"
    );
    let up = |metrics: &str, at: SocketAddr| {
        let series =
            format!("tcptap_upstream_up{{route=\"route0\",upstream=\"{at}\",address=\"{at}\"}}");
        metric(metrics, &series)
    };
    assert_eq!(up(&metrics, a.addr), Some(1.0), "{metrics}");
    assert_eq!(up(&metrics, b_addr), Some(0.0), "{metrics}");
    // B comes back on the same port and is put back into rotation.
    let b = TcpListener::bind(b_addr).expect("rebind B");
    serve_b(b);
    proxy.wait_log("UP", PROMPT);
    let deadline = Instant::now() + PROMPT;
    let mut seen_b = false;
    while !seen_b && Instant::now() < deadline {
        seen_b = ask(proxy.addr()) == Some(2);
    }
    assert!(
        seen_b,
        "B never served again after recovering:\n{}",
        proxy.logs()
    );
    let (_, metrics) = http_get(proxy.admin_addr(), "/metrics");
    assert_eq!(up(&metrics, b_addr), Some(1.0), "{metrics}");
    assert_eq!(proxy.count_log("is UP after"), 1, "{}", proxy.logs());
}

/// However many event loops run, a backend sees one probe per interval: the loops share one
/// prober. With a prober per loop, probes of the loops come in bursts, a few milliseconds apart.
#[test]
fn two_workers_probe_each_upstream_once_per_interval() {
    const INTERVAL: Duration = Duration::from_millis(300);
    const PROBES: usize = 6;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { break };
            drop(s);
            if tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    let extra = format!(
        "[route.health_check]\ninterval = \"{}ms\"\ntimeout = \"200ms\"\n",
        INTERVAL.as_millis()
    );
    let config = format!("workers = 2\n{}", route(&[addr], &extra));
    let proxy = Proxy::with_config(&config, 1);
    let mut times = Vec::new();
    while times.len() < PROBES {
        match rx.recv_timeout(PROMPT) {
            Ok(t) => times.push(t),
            Err(e) => panic!("{} probes, then {e}:\n{}", times.len(), proxy.logs()),
        }
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&g| g > INTERVAL / 2),
        "probes closer than the interval ({INTERVAL:?}): {gaps:?}"
    );
}
