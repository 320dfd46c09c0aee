//! The data path, end to end: the real binary between real loopback peers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

also_with_two_workers!(
    bulk_both_directions_at_once_byte_exact,
    half_close_client_first_reply_after_eof,
    half_close_upstream_first_client_keeps_sending,
    upstream_reset_resets_client,
    an_upstream_reset_met_by_a_write_is_not_passed_on_as_a_fin,
    client_reset_resets_upstream,
    upstream_refused_closes_client_and_keeps_serving,
    connect_timeout_closes_client,
    a_client_reset_during_the_upstream_connect_ends_the_connection_at_once,
    idle_timeout_closes_only_idle_pairs,
    slow_reader_keeps_memory_bounded,
    many_connections_no_fd_or_close_wait_leak,
    ipv6_and_hostname_upstream,
    garbage_idlers_and_instant_closers_do_not_harm_others,
    closed_connections_leave_no_timer_wakeups,
    socket_options_reach_both_sockets_of_a_pair,
    a_response_the_upstream_ended_while_the_proxy_held_it_arrives_whole,
);

#[test]
fn bulk_both_directions_at_once_byte_exact() {
    const LEN: usize = 24 << 20;
    // Upstream sends its own stream while checking the client's; both then half-close.
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |s| {
        let mut reader = s.try_clone().unwrap();
        let mut writer = s;
        let t = thread::spawn(move || {
            send_pattern(&mut writer, 2, LEN).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let got = expect_pattern(&mut reader, 1, LEN);
        t.join().unwrap();
        tx.send(got.map_err(|e| e.to_string())).unwrap();
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let client = connect(proxy.addr());
    let mut writer = client.try_clone().unwrap();
    let t = thread::spawn(move || {
        send_pattern(&mut writer, 1, LEN).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = client;
    assert_eq!(expect_pattern(&mut reader, 2, LEN).unwrap(), LEN);
    t.join().unwrap();
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), Ok(LEN));
    let line = proxy.wait_log("bytes to upstream", PROMPT);
    assert!(
        line.contains(&format!("{LEN} bytes to upstream, {LEN} bytes to client")),
        "{line}"
    );
}

/// The upstream sends its whole response and closes while the client reads nothing yet: the
/// proxy holds most of it (in the kernel pipe of its zero-copy path), and its EOF has been seen.
/// Every byte then reaches the client however slowly it reads, and the FIN after them; nothing
/// waits for an event that will not come.
#[test]
fn a_response_the_upstream_ended_while_the_proxy_held_it_arrives_whole() {
    const LEN: usize = 768 << 10;
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        let mut go = [0u8; 2];
        s.read_exact(&mut go).unwrap();
        send_pattern(&mut s, 6, LEN).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        // Until the proxy's TCP has acknowledged every byte and the FIN.
        let deadline = Instant::now() + PROMPT;
        while tcptap::net::unacked(&s).unwrap() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        tx.send(tcptap::net::unacked(&s).unwrap()).unwrap();
    });
    // Small socket buffers: one splice into the client's socket takes a fraction of what the
    // proxy holds. A small copy buffer: the first read fills it, which marks the direction as
    // bulk, moved with splice(2) from then on.
    let extra = "buffer_size = \"1 KiB\"\n\
                 [socket]\nsend_buffer_size = \"64 KiB\"\nrecv_buffer_size = \"64 KiB\"\n";
    let proxy = Proxy::with_config(&one_route("127.0.0.1:0", up.addr, extra), 1);
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.set_recv_buffer_size(16 * 1024).unwrap();
    c.connect_timeout(&proxy.addr().into(), PROMPT).unwrap();
    let mut c: TcpStream = c.into();
    c.set_read_timeout(Some(PROMPT)).unwrap();
    c.write_all(b"go").unwrap();
    assert_eq!(
        rx.recv_timeout(PROMPT).unwrap(),
        0,
        "upstream bytes acknowledged"
    );
    let got = expect_pattern(&mut c, 6, LEN);
    assert_eq!(got.unwrap(), LEN);
}

/// PITFALLS: "first EOF closes both directions". The reply comes well after the client's FIN.
#[test]
fn half_close_client_first_reply_after_eof() {
    let reply = Pattern::bytes(7, 3 << 20);
    let expected = reply.clone();
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        let got = read_to_end(&mut s, Duration::from_secs(20)).unwrap();
        tx.send(got).unwrap();
        thread::sleep(Duration::from_millis(700)); // longer than socat's 0.5 s half-close grace
        s.write_all(&reply).unwrap();
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    c.write_all(b"request body").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), b"request body");
    let got = read_to_end(&mut c, Duration::from_secs(20)).unwrap();
    assert!(
        got == expected,
        "reply differs: {} of {} bytes",
        got.len(),
        expected.len()
    );
    let line = proxy.wait_log("bytes to client", PROMPT);
    assert!(line.contains("client closed first"), "{line}");
}

#[test]
fn half_close_upstream_first_client_keeps_sending() {
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        s.write_all(b"greeting").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let got = expect_pattern(&mut s, 9, 2 << 20);
        tx.send(got.map_err(|e| e.to_string())).unwrap();
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    // The client sees the greeting, then EOF, and can still send.
    assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), b"greeting");
    thread::sleep(Duration::from_millis(600));
    send_pattern(&mut c, 9, 2 << 20).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap(),
        Ok(2 << 20)
    );
    let line = proxy.wait_log("bytes to client", PROMPT);
    assert!(line.contains("upstream closed first"), "{line}");
}

fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

#[test]
fn upstream_reset_resets_client() {
    let up = Upstream::start(|mut s| {
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"partial").unwrap();
        reset(s);
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    c.write_all(b"hello").unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let err = loop {
        match c.read(&mut buf) {
            Ok(0) => panic!("clean EOF after {got:?}: a reset must not become a FIN"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(start.elapsed() < PROMPT);
    assert_eq!(got, b"partial", "what the upstream sent before its reset");
    let line = proxy.wait_log("reset by upstream", PROMPT);
    assert!(line.contains("reset by upstream"), "{line}");
}

/// The upstream answers and resets while the client is still sending, all before the proxy
/// looks (it is stopped meanwhile): the proxy's write of the client's bytes meets the reset
/// first, and takes the socket's error with it, so the upstream's socket then reads as ended.
/// The answer must still reach the client, then the reset: never a FIN, which would make a
/// reply cut short by a crash look complete. With splice on (the default) and off.
#[test]
fn an_upstream_reset_met_by_a_write_is_not_passed_on_as_a_fin() {
    for extra in ["", "splice = false"] {
        let (tx, rx) = mpsc::channel::<TcpStream>();
        let up = Upstream::start(move |mut s| {
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            tx.send(s).unwrap();
        });
        let proxy = Proxy::with_config(&one_route("127.0.0.1:0", up.addr, extra), 1);
        let mut c = connect(proxy.addr());
        c.write_all(b"hello").unwrap();
        let s = rx
            .recv_timeout(PROMPT)
            .expect("the upstream got the request");
        while_stopped(&proxy, || {
            (&s).write_all(b"reply").unwrap();
            reset(s);
            c.write_all(b"more upload").unwrap();
        });
        let got = read_until_error_or_eof(&mut c);
        assert_eq!(
            got,
            (b"reply".to_vec(), Some(ErrorKind::ConnectionReset)),
            "{extra:?}: the answer, then the reset (None: a clean EOF)"
        );
        let line = proxy.wait_log("reset by upstream", PROMPT);
        assert!(line.contains("reset by upstream"), "{line}");
    }
}

/// Reads until an error (`Some(kind)`) or a clean EOF (`None`).
fn read_until_error_or_eof(s: &mut TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(PROMPT)).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

/// Reads until an error; a clean EOF is a failure (a reset must not become a FIN).
fn read_until_reset(s: &mut TcpStream) -> (Vec<u8>, ErrorKind) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(PROMPT)).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("clean EOF after {} bytes, not a reset", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, e.kind()),
        }
    }
}

/// What a peer sends just before it resets reaches the other peer, then the reset: as over a
/// direct connection, whichever side resets, whether the bytes are a reply to a request or a
/// greeting, and however the events of the bytes and the reset fall.
#[test]
fn bytes_sent_just_before_a_reset_arrive_before_it() {
    const ROUNDS: usize = 40;
    let reply = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
    // The upstream answers a request, or greets, then resets.
    let answers = Upstream::start(move |mut s| {
        let mut b = [0u8; 5];
        if s.read_exact(&mut b).is_ok() {
            let _ = s.write_all(reply);
            reset(s);
        }
    });
    let greets = Upstream::start(move |s| {
        let _ = (&s).write_all(b"220 ready\r\n");
        reset(s);
    });
    // The client sends, then resets: the upstream tells what it got.
    let (tx, rx) = mpsc::channel();
    let hears = Upstream::start(move |mut s| {
        let _ = tx.send(read_until_reset(&mut s));
    });
    let config = format!(
        "{}{}{}",
        one_route("127.0.0.1:0", answers.addr, ""),
        one_route("127.0.0.1:0", greets.addr, ""),
        one_route("127.0.0.1:0", hears.addr, "")
    );
    let proxy = Proxy::with_config(&config, 3);
    for i in 0..ROUNDS {
        let mut c = connect(proxy.addrs[0]);
        c.write_all(b"hello").unwrap();
        assert_eq!(
            read_until_reset(&mut c),
            (reply.to_vec(), ErrorKind::ConnectionReset),
            "round {i}"
        );
        let mut c = connect_for_greeting(proxy.addrs[1]);
        let (got, kind) = read_until_reset(&mut c);
        assert_eq!(
            (&got[..], kind),
            (&b"220 ready\r\n"[..], ErrorKind::ConnectionReset)
        );
        let c = connect(proxy.addrs[2]);
        (&c).write_all(&[7u8; 100]).unwrap();
        reset(c);
        let (got, kind) = rx
            .recv_timeout(PROMPT)
            .expect("the upstream saw the connection");
        assert_eq!(
            (got, kind),
            (vec![7u8; 100], ErrorKind::ConnectionReset),
            "round {i}"
        );
    }
}

/// A client that sends and resets while the upstream connect is still in flight: its bytes
/// are delivered once the connect completes, then the reset. (Without bytes, such a client ends
/// at once; see the test below.)
#[test]
fn bytes_a_client_sent_before_resetting_during_the_connect_reach_the_upstream() {
    let blackhole = Blackhole::start();
    let config = one_route("127.0.0.1:0", blackhole.addr, "connect_timeout = \"30s\"");
    let proxy = Proxy::with_config(&config, 1);
    let c = connect(proxy.addr());
    (&c).write_all(b"request before the reset").unwrap();
    reset(c);
    // Only now may the upstream connect complete: take every connection off the full queue
    // (the SYNs it dropped are sent again) until the proxy's arrives.
    let mut upstream = blackhole.accept_other(PROMPT);
    let (got, kind) = read_until_reset(&mut upstream);
    assert_eq!(
        (&got[..], kind),
        (&b"request before the reset"[..], ErrorKind::ConnectionReset)
    );
    proxy.wait_log("reset by client", PROMPT);
}

#[test]
fn client_reset_resets_upstream() {
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        s.write_all(b"ready").unwrap();
        let mut buf = [0u8; 64];
        let res = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => continue,
                Err(e) => break Err(e.kind()),
            }
        };
        tx.send(res).unwrap();
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    assert_eq!(read_n(&mut c, 5, PROMPT).unwrap(), b"ready");
    c.write_all(b"some bytes").unwrap();
    reset(c);
    assert_eq!(
        rx.recv_timeout(PROMPT).unwrap(),
        Err(ErrorKind::ConnectionReset)
    );
    proxy.wait_log("reset by client", PROMPT);
}

#[test]
fn upstream_refused_closes_client_and_keeps_serving() {
    let echo = Upstream::echo();
    let dead = dead_addr();
    let config = format!(
        "[[route]]\nname = \"dead\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{dead}\"\n\
         [[route]]\nname = \"live\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let proxy = Proxy::with_config(&config, 2);
    for _ in 0..20 {
        let start = Instant::now();
        // The reset can arrive so fast that connect(2) itself reports it.
        match TcpStream::connect_timeout(&proxy.addrs[0], PROMPT) {
            Ok(mut c) => {
                let r = read_to_end(&mut c, PROMPT);
                assert!(r.is_err() || r.as_ref().unwrap().is_empty(), "{r:?}");
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
        assert!(start.elapsed() < PROMPT);
    }
    proxy.wait_count("connect failed", 20, PROMPT);
    let mut c = connect(proxy.addrs[1]);
    c.write_all(b"still alive").unwrap();
    assert_eq!(read_n(&mut c, 11, PROMPT).unwrap(), b"still alive");
}

#[test]
fn connect_timeout_closes_client() {
    let blackhole = Blackhole::start();
    let config = one_route("127.0.0.1:0", blackhole.addr, "connect_timeout = \"400ms\"");
    let proxy = Proxy::with_config(&config, 1);
    let mut c = connect(proxy.addr());
    let start = Instant::now();
    let _ = read_to_end(&mut c, Duration::from_secs(10));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "closed after {took:?}, before the timeout"
    );
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    proxy.wait_log("upstream connect timeout", PROMPT);
}

/// A client that resets while its upstream connect is still in flight is closed at once: it
/// does not hold its slot (and descriptors) until `connect_timeout`, nor count as an upstream
/// timeout.
#[test]
fn a_client_reset_during_the_upstream_connect_ends_the_connection_at_once() {
    let blackhole = Blackhole::start();
    let config = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        one_route("127.0.0.1:0", blackhole.addr, "connect_timeout = \"60s\"")
    );
    let proxy = Proxy::with_config(&config, 1);
    let admin = proxy.admin_addr();
    let c = connect(proxy.addr());
    let body = wait_metric(admin, "tcptap_connections_active{route=\"route0\"}", 1.0);
    assert_eq!(
        metric(&body, "tcptap_connections_accepted_total{route=\"route0\"}"),
        Some(1.0)
    );
    // Reset: SO_LINGER 0, then close.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let body = wait_metric(admin, "tcptap_connections_active{route=\"route0\"}", 0.0);
    assert_eq!(
        metric(
            &body,
            "tcptap_connections_closed_total{route=\"route0\",reason=\"reset_by_client\"}"
        ),
        Some(1.0),
        "{body}"
    );
    proxy.wait_log("reset by client", PROMPT);
    assert_eq!(proxy.count_log("upstream connect timeout"), 0);
}

#[test]
fn idle_timeout_closes_only_idle_pairs() {
    let echo = Upstream::echo();
    let config = one_route("127.0.0.1:0", echo.addr, "idle_timeout = \"600ms\"");
    let proxy = Proxy::with_config(&config, 1);
    let mut idle = connect(proxy.addr());
    let mut busy = connect(proxy.addr());
    let start = Instant::now();
    let mut last = start;
    // The busy pair talks every 150 ms for 1.5 s: it must survive.
    for i in 0..10u8 {
        busy.write_all(&[i]).unwrap();
        assert_eq!(read_n(&mut busy, 1, PROMPT).unwrap(), [i]);
        last = Instant::now();
        thread::sleep(Duration::from_millis(150));
    }
    // By now the idle pair is gone.
    let r = read_to_end(&mut idle, Duration::from_millis(100));
    assert!(r.is_err() || r.unwrap().is_empty());
    assert!(start.elapsed() >= Duration::from_millis(600));
    proxy.wait_count("idle timeout", 1, PROMPT);
    // Then the busy one goes quiet and times out too, 600 ms after its last byte.
    let _ = read_to_end(&mut busy, Duration::from_secs(10));
    let quiet = last.elapsed();
    assert!(
        quiet >= Duration::from_millis(500) && quiet < Duration::from_secs(4),
        "{quiet:?}"
    );
    proxy.wait_count("idle timeout", 2, PROMPT);
}

/// A client that does not read must not make the proxy buffer without bound.
#[test]
fn slow_reader_keeps_memory_bounded() {
    const LEN: usize = 256 << 20;
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        // Read the request first: closing with unread bytes would send RST instead of FIN.
        let mut go = [0u8; 2];
        s.read_exact(&mut go).unwrap();
        tx.send(send_pattern(&mut s, 5, LEN).map_err(|e| e.to_string()))
            .unwrap();
    });
    let proxy = Proxy::forwarding_to(up.addr);
    let baseline = proxy.rss_kib();
    let mut c = connect(proxy.addr());
    c.write_all(b"go").unwrap();
    // Wait until the data path is stalled: the client reads nothing, so the upstream blocks.
    thread::sleep(Duration::from_millis(1500));
    let stalled = proxy.rss_kib();
    assert!(
        rx.try_recv().is_err(),
        "upstream finished 256 MiB into a client that reads nothing"
    );
    let growth = stalled.saturating_sub(baseline);
    assert!(
        growth < 4096,
        "proxy RSS grew by {growth} KiB while the client did not read"
    );
    // Now read it all: every byte arrives, memory stays bounded.
    assert_eq!(expect_pattern(&mut c, 5, LEN).unwrap(), LEN);
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), Ok(()));
    let growth = proxy.rss_kib().saturating_sub(baseline);
    assert!(growth < 8192, "proxy RSS grew by {growth} KiB");
}

#[test]
fn many_connections_no_fd_or_close_wait_leak() {
    const N: usize = 1200;
    let echo = Upstream::echo();
    let proxy = Proxy::forwarding_to(echo.addr);
    let baseline_fds = proxy.fd_count();
    let mut conns = Vec::with_capacity(N);
    for _ in 0..N {
        conns.push(connect(proxy.addr()));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&(i as u32).to_le_bytes()).unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(read_n(c, 4, PROMPT).unwrap(), (i as u32).to_le_bytes());
    }
    assert!(proxy.fd_count() >= baseline_fds + 2 * N);
    // Every close order: client FIN first, client reset, client half-close then full read.
    for (i, mut c) in conns.into_iter().enumerate() {
        match i % 3 {
            0 => drop(c),
            1 => reset(c),
            _ => {
                c.shutdown(Shutdown::Write).unwrap();
                assert!(read_to_end(&mut c, PROMPT).unwrap().is_empty());
            }
        }
    }
    // Each worker may keep a few idle kernel pipes of the zero-copy path for reuse.
    let pooled = 2 * tcptap::event_loop::PIPE_POOL_MAX * 2;
    proxy.wait_fds_at_most(baseline_fds + pooled, Duration::from_secs(15));
    let ports = [proxy.addr().port(), echo.addr.port()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while close_wait_on(&ports) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(close_wait_on(&ports), 0, "sockets left in CLOSE_WAIT");
}

#[test]
fn max_connections_queues_in_backlog() {
    let echo = Upstream::echo();
    let config = one_route("127.0.0.1:0", echo.addr, "max_connections = 2");
    let proxy = Proxy::with_config(&config, 1);
    let mut a = connect(proxy.addr());
    let mut b = connect(proxy.addr());
    for s in [&mut a, &mut b] {
        s.write_all(b"x").unwrap();
        assert_eq!(read_n(s, 1, PROMPT).unwrap(), b"x");
    }
    // The third completes the TCP handshake (kernel backlog) but is not served yet.
    let mut c = connect(proxy.addr());
    c.write_all(b"y").unwrap();
    let r = read_n(&mut c, 1, Duration::from_millis(500));
    assert_eq!(
        r.unwrap_err().kind(),
        ErrorKind::TimedOut,
        "third connection served over the limit"
    );
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    // The operator is told why clients wait.
    let line = proxy.wait_log(
        "accepting paused, new clients wait in the listen backlog",
        PROMPT,
    );
    assert!(
        line.contains("WARN") && line.contains("at max_connections = 2 (all routes)"),
        "{line}"
    );
    drop(a);
    assert_eq!(read_n(&mut c, 1, PROMPT).unwrap(), b"y");
}

/// Clients that leave together free room for a waiting one, which is accepted after the loop's
/// work for that turn is done, with no limit left to retry on. Its upstream connects at once
/// (loopback), and its request, sent while it waited, is passed on by the next turn: nothing
/// else would wake the loop for it before the 30 s connect timeout.
#[test]
fn a_client_accepted_when_others_leave_is_served_at_once() {
    let echo = Upstream::echo();
    let config = one_route(
        "127.0.0.1:0",
        echo.addr,
        "max_connections = 2\nconnect_timeout = \"30s\"",
    );
    let proxy = Proxy::with_config(&config, 1);
    for round in 0..5 {
        let mut a = connect(proxy.addr());
        let mut b = connect(proxy.addr());
        for s in [&mut a, &mut b] {
            s.write_all(b"x").unwrap();
            assert_eq!(read_n(s, 1, PROMPT).unwrap(), b"x", "round {round}");
        }
        let mut c = connect(proxy.addr());
        c.write_all(b"y").unwrap();
        let held = read_n(&mut c, 1, Duration::from_millis(200));
        assert_eq!(
            held.unwrap_err().kind(),
            ErrorKind::TimedOut,
            "round {round}"
        );
        // Both reset at once: the proxy usually sees them in one batch of events.
        reset(a);
        reset(b);
        match read_n(&mut c, 1, Duration::from_secs(3)) {
            Ok(got) => assert_eq!(got, b"y", "round {round}"),
            Err(e) => panic!(
                "round {round}: the waiting client was not served: {e}\n{}",
                proxy.logs()
            ),
        }
    }
}

/// Over loopback the handshake completes within connect(2): the proxy learns it at once
/// (getpeername) and moves the first bytes without waiting for a writable event. Over IPv4 and
/// IPv6. Not every connect: under heavy loopback traffic (other tests) the kernel may leave the
/// handshake to its softirq thread. So connections go on, for up to 10 s, until one did.
#[test]
fn a_loopback_upstream_is_known_connected_within_connect() {
    for (listen, bind) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
        let echo = Upstream::start_on(bind, |mut s| {
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        });
        let config = one_route(listen, echo.addr, "");
        let proxy = Proxy::with_config_in(&config, 1, |cmd| {
            cmd.env("RUST_LOG", "debug");
        });
        let needle = format!("connected within connect(2) to {}", echo.addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tried = 0;
        while proxy.count_log(&needle) == 0 {
            assert!(
                Instant::now() < deadline,
                "{listen}: none of {tried} connects completed at once\n{}",
                proxy.logs()
            );
            let mut c = connect(proxy.addr());
            c.write_all(b"ping").unwrap();
            assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
            tried += 1;
        }
    }
}

#[test]
fn ipv6_and_hostname_upstream() {
    // [::1] on both sides.
    let echo6 = Upstream::start_on("[::1]:0", |mut s| {
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(&b).unwrap();
    });
    let proxy = Proxy::start(
        &["--listen", "[::1]:0", "--upstream", &echo6.addr.to_string()],
        1,
    );
    assert!(proxy.addr().is_ipv6());
    let mut c = connect(proxy.addr());
    c.write_all(b"six!").unwrap();
    assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"six!");
    // "localhost" resolves to ::1 and 127.0.0.1; the upstream listens only on 127.0.0.1, so a
    // refused ::1 must fall back to the next address.
    let echo4 = Upstream::echo();
    let up = format!("localhost:{}", echo4.addr.port());
    let proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--upstream", &up], 1);
    let mut c = connect(proxy.addr());
    c.write_all(b"four").unwrap();
    assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"four");
}

#[test]
fn garbage_idlers_and_instant_closers_do_not_harm_others() {
    let echo = Upstream::echo();
    let proxy = Proxy::forwarding_to(echo.addr);
    let mut good = connect(proxy.addr());
    let mut idlers = Vec::new();
    for i in 0..50 {
        let mut s = connect(proxy.addr());
        match i % 3 {
            0 => idlers.push(s),
            1 => {
                let _ = s.write_all(&Pattern::bytes(i, 10_000));
                reset(s);
            }
            _ => drop(s),
        }
    }
    let data = Pattern::bytes(99, 1 << 20);
    let mut w = good.try_clone().unwrap();
    let d = data.clone();
    let t = thread::spawn(move || w.write_all(&d).unwrap());
    assert!(read_n(&mut good, data.len(), PROMPT).unwrap() == data);
    t.join().unwrap();
}

/// Context switches of every thread of `pid` so far (each wakeup of a sleeping loop is one).
fn context_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("proxy tasks");
    tasks
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The connect deadline of a connection that has closed must not wake the idle loop later: a
/// sidecar that served a burst would otherwise spin through one wakeup per past connection.
#[test]
fn closed_connections_leave_no_timer_wakeups() {
    let echo = Upstream::echo();
    let timeout = Duration::from_millis(1500);
    let config = one_route("127.0.0.1:0", echo.addr, "connect_timeout = \"1500ms\"");
    let proxy = Proxy::with_config(&config, 1);
    // A burst of short connections, bounded in count and time so that all of their connect
    // deadlines come after it.
    let start = Instant::now();
    let mut conns = 0;
    while conns < 300 && start.elapsed() < Duration::from_millis(500) {
        let mut c = connect(proxy.addr());
        c.write_all(&[conns as u8]).unwrap();
        assert_eq!(read_n(&mut c, 1, PROMPT).unwrap(), [conns as u8]);
        conns += 1;
    }
    let burst = start.elapsed();
    assert!(conns >= 50, "only {conns} connections in {burst:?}");
    proxy.wait_count("bytes to client", conns, PROMPT);
    // Every connection is closed; their deadlines pass in this window.
    let before = context_switches(proxy.pid());
    let window_end = start + timeout + burst + Duration::from_millis(300);
    thread::sleep(window_end.saturating_duration_since(Instant::now()));
    let woke = context_switches(proxy.pid()) - before;
    assert!(
        woke < 20,
        "an idle proxy woke {woke} times while the connect deadlines of {conns} closed \
         connections passed"
    );
    // And it still serves.
    let mut c = connect(proxy.addr());
    c.write_all(b"x").unwrap();
    assert_eq!(read_n(&mut c, 1, PROMPT).unwrap(), b"x");
}

/// A duplicate of every socket the process `pid` holds (pidfd_getfd(2): the proxy is our child,
/// so we may), with its peer address.
fn sockets_of(pid: u32) -> Vec<(std::os::fd::OwnedFd, Option<SocketAddr>)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscalls; every descriptor returned is new and owned by the OwnedFd made here.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        use std::os::fd::AsRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EBADF), "pidfd_getfd: {e}");
            continue; // closed meanwhile
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let peer = socket2::SockRef::from(&fd)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        out.push((fd, peer));
    }
    out
}

/// `[socket]` options hold on both sockets of a pair: the accepted one inherits them from its
/// listener, the upstream one gets them before it connects.
#[test]
fn socket_options_reach_both_sockets_of_a_pair() {
    let echo = Upstream::echo();
    let config = format!(
        "[socket]\nnodelay = true\nkeepalive = \"37s\"\nkeepalive_interval = \"7s\"\n\
         recv_buffer_size = \"48 KiB\"\nsend_buffer_size = \"40 KiB\"\n{}",
        one_route("127.0.0.1:0", echo.addr, "")
    );
    let proxy = Proxy::with_config(&config, 1);
    let mut c = connect(proxy.addr());
    c.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
    let client = c.local_addr().unwrap();
    let sockets = sockets_of(proxy.pid());
    let find = |what: &str, f: &dyn Fn(Option<SocketAddr>) -> bool| {
        let found: Vec<_> = sockets.iter().filter(|(_, peer)| f(*peer)).collect();
        assert_eq!(found.len(), 1, "{what}: {sockets:?}");
        socket2::SockRef::from(&found[0].0)
    };
    let down = find("downstream socket", &|peer| peer == Some(client));
    let up = find("upstream socket", &|peer| peer == Some(echo.addr));
    for (side, s) in [("downstream", down), ("upstream", up)] {
        assert!(s.tcp_nodelay().unwrap(), "{side}: TCP_NODELAY");
        assert!(s.keepalive().unwrap(), "{side}: SO_KEEPALIVE");
        assert_eq!(
            s.tcp_keepalive_time().unwrap(),
            Duration::from_secs(37),
            "{side}"
        );
        assert_eq!(
            s.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7),
            "{side}"
        );
        // The kernel doubles the size asked for, for its bookkeeping.
        assert_eq!(
            s.recv_buffer_size().unwrap(),
            2 * 48 * 1024,
            "{side}: SO_RCVBUF"
        );
        assert_eq!(
            s.send_buffer_size().unwrap(),
            2 * 40 * 1024,
            "{side}: SO_SNDBUF"
        );
    }
}
