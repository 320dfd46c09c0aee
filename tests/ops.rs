//! Operating the proxy as a sidecar: `/metrics`, `/connections`, `/healthz`, and the access log,
//! checked against the traffic each test makes.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tcptap::admin::MAX_CONNECTIONS;

fn ops_config(dir: &TempDir, routes: &str) -> String {
    format!(
        "drain_timeout = \"3s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[access_log]\npath = \"{}\"\nformat = \"json\"\n{routes}",
        dir.path("access.log").display()
    )
}

#[test]
fn metrics_match_the_traffic() {
    let dir = TempDir::new("ops");
    let echo = Upstream::echo();
    let routes = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         [[route]]\nname = \"dead\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr,
        dead_addr()
    );
    let proxy = Proxy::with_config(&ops_config(&dir, &routes), 2);
    let admin = proxy.admin_addr();
    for i in 0..3u64 {
        let mut c = connect(proxy.addrs[0]);
        c.write_all(&Pattern::bytes(i, 1000)).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c, PROMPT).unwrap().len(), 1000);
    }
    let mut c = connect(proxy.addrs[0]);
    // Reset at once: possibly before this connect(2) has returned.
    if let Ok(mut r) = std::net::TcpStream::connect_timeout(&proxy.addrs[1], PROMPT) {
        let _ = read_to_end(&mut r, PROMPT);
    }
    c.write_all(b"12345").unwrap();
    assert_eq!(read_n(&mut c, 5, PROMPT).unwrap(), b"12345");
    // Counters are added right after the bytes move: wait for the last one to land.
    wait_metric(
        admin,
        "tcptap_bytes_total{route=\"web\",direction=\"u2d\"}",
        3005.0,
    );
    let body = wait_metric(
        admin,
        "tcptap_connections_closed_total{route=\"web\",reason=\"client_closed_first\"}",
        3.0,
    );
    assert_eq!(
        metric(&body, "tcptap_connections_accepted_total{route=\"web\"}"),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "tcptap_connections_active{route=\"web\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "tcptap_bytes_total{route=\"web\",direction=\"d2u\"}"),
        Some(3005.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "tcptap_bytes_total{route=\"web\",direction=\"u2d\"}"),
        Some(3005.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tcptap_upstream_connect_failures_total{route=\"dead\",cause=\"refused\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tcptap_connections_closed_total{route=\"dead\",reason=\"connect_failed\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tcptap_upstream_connect_duration_seconds_count{route=\"web\"}"
        ),
        Some(4.0),
        "{body}"
    );
    assert!(metric(&body, "process_open_fds").unwrap() > 0.0);
    drop(c);
    wait_metric(admin, "tcptap_connections_active{route=\"web\"}", 0.0);
}

#[test]
fn connections_lists_a_half_closed_pair() {
    let dir = TempDir::new("ops");
    // The upstream never closes: after the client's FIN, d→u is half-closed, u→d still open.
    let up = Upstream::start(|mut s| {
        let _ = read_to_end(&mut s, Duration::from_secs(30));
        let _ = s.write_all(b"late");
        std::thread::sleep(Duration::from_secs(2));
    });
    let routes = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        up.addr
    );
    let proxy = Proxy::with_config(&ops_config(&dir, &routes), 1);
    let admin = proxy.admin_addr();
    let mut c = connect(proxy.addr());
    c.write_all(b"hello").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"late");
    let (status, body) = http_get(admin, "/connections");
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let conns = list.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{body}");
    let conn = &conns[0];
    assert_eq!(conn["route"], "web");
    assert_eq!(conn["client"], c.local_addr().unwrap().to_string());
    assert_eq!(conn["upstream"], up.addr.to_string());
    assert_eq!(conn["bytes_d2u"], 5);
    assert_eq!(conn["bytes_u2d"], 4);
    assert_eq!(conn["d2u_state"], "half-closed", "{body}");
    assert_eq!(conn["u2d_state"], "open", "{body}");
}

#[test]
fn healthz_turns_503_while_draining_and_access_log_has_every_field() {
    let dir = TempDir::new("ops");
    let echo = Upstream::echo();
    let routes = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let mut proxy = Proxy::with_config(&ops_config(&dir, &routes), 1);
    let admin = proxy.admin_addr();
    assert_eq!(http_get(admin, "/healthz").0, 200);
    let mut c = connect(proxy.addr());
    c.write_all(b"abc").unwrap();
    assert_eq!(read_n(&mut c, 3, PROMPT).unwrap(), b"abc");
    proxy.signal(SIGTERM);
    proxy.wait_log("shutting down", PROMPT);
    assert_eq!(http_get(admin, "/healthz").0, 503);
    // The drain lets the open pair finish.
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), b"");
    assert_eq!(proxy.wait_exit(PROMPT).code(), Some(0));
    let log = std::fs::read_to_string(dir.path("access.log")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "{log}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["route"], "web");
    assert_eq!(v["client"], c.local_addr().unwrap().to_string());
    assert_eq!(v["upstream"], echo.addr.to_string());
    assert_eq!(v["bytes_d2u"], 3);
    assert_eq!(v["bytes_u2d"], 3);
    assert_eq!(v["delivered_d2u"], 3);
    assert_eq!(v["delivered_u2d"], 3);
    assert_eq!(v["end"], "client_closed_first");
    assert_eq!(v["d2u_end"], "fin_from_client");
    assert_eq!(v["u2d_end"], "fin_from_upstream");
    assert!(v["start"].as_str().unwrap().ends_with('Z'));
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn sigusr1_reopens_the_access_log() {
    let dir = TempDir::new("ops");
    let echo = Upstream::echo();
    let routes = format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let proxy = Proxy::with_config(&ops_config(&dir, &routes), 1);
    let one = |n: u8| {
        let mut c = connect(proxy.addr());
        c.write_all(&[n]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), [n]);
    };
    let wait_lines = |path: &std::path::Path, n: usize| {
        let deadline = Instant::now() + PROMPT;
        while std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
            < n
        {
            assert!(
                Instant::now() < deadline,
                "{} has fewer than {n} lines",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    one(1);
    wait_lines(&dir.path("access.log"), 1);
    std::fs::rename(dir.path("access.log"), dir.path("access.log.1")).unwrap();
    proxy.signal(10); // SIGUSR1
    proxy.wait_log("reopening the access log", PROMPT);
    one(2);
    wait_lines(&dir.path("access.log"), 1);
    assert_eq!(
        std::fs::read_to_string(dir.path("access.log.1"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

/// The sum of the counts in the proxy's "N log line(s) dropped" lines.
fn log_lines_reported_dropped(proxy: &Proxy) -> usize {
    proxy
        .logs()
        .lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" log line")?;
            head.rsplit(' ').next()?.parse::<usize>().ok()
        })
        .sum()
}

/// A stderr nobody reads (a stalled log collector) fills its pipe; the proxy goes on proxying,
/// drops the log lines that do not fit its queue, and once stderr is read again it writes the
/// lines it kept and how many it dropped: every connection's line is either there or counted.
#[test]
fn a_stderr_nobody_reads_never_stalls_proxying() {
    let echo = Upstream::echo();
    let toml = one_route(
        "127.0.0.1:0",
        echo.addr,
        "[admin]\nlisten = \"127.0.0.1:0\"",
    );
    // At `info` the only lines during the traffic are the connections' close lines.
    let proxy = Proxy::with_config_in(&toml, 1, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    let admin = proxy.admin_addr();
    proxy.stall_logs(4096);
    // About 130 bytes of log per connection: 4,000 overflow the pipe and the 256 KiB queue.
    const N: usize = 4000;
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0..N {
        let mut c = connect(proxy.addr());
        c.write_all(b"ping").unwrap();
        let got = read_n(&mut c, 4, PROMPT)
            .unwrap_or_else(|e| panic!("connection {i} with stderr unread: {e}"));
        assert_eq!(got, b"ping");
        assert!(Instant::now() < deadline, "{i} connections in 120 s");
    }
    proxy.resume_logs();
    let deadline = Instant::now() + PROMPT;
    loop {
        let (written, dropped) = (
            proxy.count_log("client closed first"),
            log_lines_reported_dropped(&proxy),
        );
        if written + dropped == N && dropped > 0 {
            let (status, body) = http_get(admin, "/metrics");
            assert_eq!(status, 200);
            assert_eq!(
                metric(&body, "tcptap_log_lines_dropped_total"),
                Some(dropped as f64),
                "{body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{written} connection lines written and {dropped} reported dropped, of {N}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM while stderr is not being read: queued log lines get a bounded moment, then the proxy
/// exits as usual.
#[test]
fn sigterm_exits_while_stderr_is_not_read() {
    let echo = Upstream::echo();
    let upstream = echo.addr.to_string();
    let mut proxy = Proxy::start(&["--listen", "127.0.0.1:0", "--upstream", &upstream], 1);
    proxy.stall_logs(4096);
    for _ in 0..200 {
        let mut c = connect(proxy.addr());
        c.write_all(b"ping").unwrap();
        assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
    }
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
}

/// The time an admin request may take while other admin clients misbehave: far below the 2 s
/// request deadline each of them may use.
const ADMIN_ANSWER: Duration = Duration::from_secs(1);

/// `GET path` whose whole exchange (connect, request, response, close) must end within `limit`:
/// (status, body).
fn get_within(admin: SocketAddr, path: &str, limit: Duration) -> (u16, String) {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&admin, limit).expect("connect to admin");
    s.set_write_timeout(Some(limit)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: tcptap\r\n\r\n").unwrap();
    let left = limit.saturating_sub(started.elapsed());
    let raw = read_to_end(&mut s, left).unwrap_or_else(|e| {
        panic!(
            "GET {path}: {e} after {:?} (limit {limit:?})",
            started.elapsed()
        )
    });
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A client that sends the start of a request, then one more header byte every 50 ms, never
/// finishing it, until it is stopped or its connection fails.
struct Trickler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<TcpStream>>,
}

impl Trickler {
    fn start(admin: SocketAddr) -> Trickler {
        let mut s = connect(admin);
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tcptap\r\nX-Slow: ")
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) && s.write_all(b"a").is_ok() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                s
            })
        };
        Trickler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops trickling; returns the connection.
    fn stop(mut self) -> TcpStream {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("trickler")
    }
}

impl Drop for Trickler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The status of the response the admin endpoint sends a client that has not finished its
/// request, once its request deadline has passed.
fn status_after_deadline(s: &mut TcpStream) -> String {
    let raw = read_to_end(s, PROMPT).expect("the admin endpoint answers and closes");
    let text = String::from_utf8_lossy(&raw);
    text.lines().next().unwrap_or_default().to_string()
}

/// Admin clients that connect and say nothing, or trickle a request that never ends, do not
/// hold up anyone else's request: a liveness probe and a scrape are answered at once.
#[test]
fn admin_answers_while_other_clients_stay_silent() {
    let dir = TempDir::new("ops");
    let echo = Upstream::echo();
    let routes = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let proxy = Proxy::with_config(&ops_config(&dir, &routes), 1);
    let admin = proxy.admin_addr();
    // Connected (in the accept queue) before the requests below, so they are accepted first.
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..6).map(|_| connect(admin)).collect();
    let trickler = Trickler::start(admin);
    for path in ["/healthz", "/metrics"] {
        let started = Instant::now();
        let (status, body) = get_within(admin, path, ADMIN_ANSWER);
        assert_eq!(status, 200, "{path}: {body}");
        if path == "/metrics" {
            assert_eq!(
                metric(&body, "tcptap_connections_active{route=\"web\"}"),
                Some(0.0),
                "{body}"
            );
        }
        eprintln!("{path} answered in {:?}", started.elapsed());
    }
    // The misbehaving clients still get what they got before, each on its own deadline (2 s
    // from its accept), not one after the other.
    for s in &mut silent {
        assert!(status_after_deadline(s).starts_with("HTTP/1.1 408 "));
    }
    let mut slow = trickler.stop();
    assert!(status_after_deadline(&mut slow).starts_with("HTTP/1.1 408 "));
    assert!(
        opened.elapsed() < Duration::from_secs(5),
        "7 timed-out requests took {:?}",
        opened.elapsed()
    );
}

/// More silent clients than the admin endpoint serves at once: the ones that waited longest are
/// closed to make room, so requests are still answered at once, and its threads stay bounded.
#[test]
fn admin_makes_room_when_more_clients_stay_silent_than_its_limit() {
    // Past the limit by more than the limit: unbounded, there would be a thread for each.
    const EXTRA: usize = 2 * MAX_CONNECTIONS + 8;
    let dir = TempDir::new("ops");
    let echo = Upstream::echo();
    let routes = format!(
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let proxy = Proxy::with_config(&ops_config(&dir, &routes), 1);
    let admin = proxy.admin_addr();
    let threads_before = proc_status_kib(proxy.pid(), "Threads:");
    assert!(threads_before > 0);
    let mut silent: Vec<TcpStream> = (0..MAX_CONNECTIONS + EXTRA)
        .map(|_| connect(admin))
        .collect();
    let started = Instant::now();
    let (status, body) = get_within(admin, "/healthz", ADMIN_ANSWER);
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "/healthz answered in {:?} with {} silent clients",
        started.elapsed(),
        silent.len()
    );
    // Accepted after every silent client (the accept queue is in order): they were all seen.
    let threads = proc_status_kib(proxy.pid(), "Threads:");
    assert!(
        threads <= threads_before + 2 * MAX_CONNECTIONS as u64,
        "{threads} threads, {threads_before} before"
    );
    let (status, body) = get_within(admin, "/metrics", ADMIN_ANSWER);
    assert_eq!(status, 200, "{body}");
    // EXTRA for the silent ones past the limit, one for /healthz.
    let evicted = metric(&body, "tcptap_admin_connections_evicted_total").unwrap();
    assert!(evicted >= (EXTRA + 1) as f64, "{body}");
    assert_eq!(
        metric(&body, "tcptap_admin_connections_refused_total"),
        Some(0.0),
        "{body}"
    );
    let served = metric(&body, "tcptap_admin_connections_active").unwrap();
    assert!(served <= MAX_CONNECTIONS as f64, "{body}");
    // The oldest were closed at once, without a response; the newest are still served as
    // before: 408 once their own deadline passes.
    for (i, s) in silent.iter_mut().enumerate().take(EXTRA + 1) {
        let got = read_to_end(s, ADMIN_ANSWER)
            .unwrap_or_else(|e| panic!("silent client {i} was not closed: {e}"));
        assert!(got.is_empty(), "silent client {i} got {got:?}");
    }
    for s in &mut silent[EXTRA + 2..] {
        assert!(status_after_deadline(s).starts_with("HTTP/1.1 408 "));
    }
    proxy.wait_log("shut down to make room", PROMPT);
}

/// An unreachable upstream is visible at warn level even with per-connection lines off: the first
/// failed connect says so at once, the next ones within 10 s only add to a count.
#[test]
fn an_unreachable_upstream_is_warned_about_once_with_connection_lines_off() {
    let dead = dead_addr().to_string();
    let args = ["--listen", "127.0.0.1:0", "--upstream", &dead];
    let mut proxy = Proxy::start_in(&args, 1, None, |cmd| {
        cmd.env("RUST_LOG", "info,tcptap::conn=warn");
    });
    for _ in 0..3 {
        // Reset at once: possibly before this connect(2) has returned.
        if let Ok(mut c) = std::net::TcpStream::connect_timeout(&proxy.addr(), PROMPT) {
            let _ = read_to_end(&mut c, PROMPT);
        }
    }
    let line = proxy.wait_log("cannot connect to", PROMPT);
    assert!(
        line.contains("WARN") && line.contains("route `cli`") && line.contains(&dead),
        "{line}"
    );
    // Every log line is in once the process has exited: only the first failure warned.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(PROMPT).success());
    assert_eq!(proxy.count_log("connect failures"), 1, "{}", proxy.logs());
    assert_eq!(proxy.count_log("cannot connect to"), 1, "{}", proxy.logs());
}

/// A socket standing in for systemd's `NOTIFY_SOCKET`.
struct Notifications(std::os::unix::net::UnixDatagram);

impl Notifications {
    /// A socket in `dir` for the proxy to notify (pass its path as `NOTIFY_SOCKET`).
    fn bind(dir: &TempDir) -> Notifications {
        let socket = std::os::unix::net::UnixDatagram::bind(dir.path("notify.sock")).unwrap();
        socket.set_read_timeout(Some(PROMPT)).unwrap();
        Notifications(socket)
    }

    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf).expect("a notification in time");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }
}

/// Under systemd (`Type=notify` / `Type=notify-reload`): `READY=1` once listening,
/// `RELOADING=1` with `MONOTONIC_USEC` and then `READY=1` around a SIGHUP reload (applied, or
/// rejected with a status saying why), `STOPPING=1` when a SIGTERM starts the drain.
#[test]
fn a_service_manager_is_told_ready_reloading_and_stopping() {
    let dir = TempDir::new("notify");
    let notes = Notifications::bind(&dir);
    let tag = |t: u8| {
        Upstream::start(move |mut s| {
            let _ = s.write_all(&[t]);
        })
    };
    let (one, two) = (tag(1), tag(2));
    let config = dir.path("proxy.toml");
    write_file(&config, &one_route("127.0.0.1:0", one.addr, ""));
    let mut proxy = Proxy::start_in(&["--config", config.to_str().unwrap()], 1, None, |cmd| {
        cmd.env("NOTIFY_SOCKET", dir.path("notify.sock"));
    });
    let first = |addr| read_to_end(&mut connect(addr), PROMPT).unwrap();
    assert_eq!(notes.next(), "READY=1\nSTATUS=serving 1 route(s)");
    assert_eq!(first(proxy.addr()), [1]);

    // A reload: its end is told once it is in force.
    write_file(&config, &one_route("127.0.0.1:0", two.addr, ""));
    let before = tcptap::notify::monotonic_usec();
    proxy.signal(libc::SIGHUP);
    let reloading = notes.next();
    let after = tcptap::notify::monotonic_usec();
    let usec: u64 = (reloading.strip_prefix("RELOADING=1\nMONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("{reloading:?}"))
        .parse()
        .unwrap();
    assert!((before..=after).contains(&usec), "{before} {usec} {after}");
    assert_eq!(
        notes.next(),
        "READY=1\nSTATUS=serving configuration generation 2"
    );
    assert_eq!(first(proxy.addr()), [2]);

    // A rejected reload ends too, and says why.
    write_file(&config, "[[route]]\nlisten = \"nowhere\"\n");
    proxy.signal(libc::SIGHUP);
    assert!(notes.next().starts_with("RELOADING=1\n"));
    let ready = notes.next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=reload rejected: ")
            && ready.contains("proxy.toml: `route[0].upstream`"),
        "{ready:?}"
    );

    proxy.signal(libc::SIGTERM);
    assert_eq!(notes.next(), "STOPPING=1");
    assert!(proxy.wait_exit(PROMPT).success());
}

/// `WatchdogSec=` (`WATCHDOG_USEC`): `WATCHDOG=1` every half period while the loops turn, idle
/// or busy, with one loop or several; nothing when `WATCHDOG_PID` names another process.
#[test]
fn a_service_manager_watchdog_is_kept_alive() {
    let echo = Upstream::echo();
    for (workers, pid) in [(1, None), (2, None), (2, Some(std::process::id()))] {
        let dir = TempDir::new("notify-watchdog");
        let notes = Notifications::bind(&dir);
        let config = one_route("127.0.0.1:0", echo.addr, &format!("workers = {workers}"));
        let proxy = Proxy::with_config_in(&config, 1, |cmd| {
            cmd.env("NOTIFY_SOCKET", dir.path("notify.sock"));
            cmd.env("WATCHDOG_USEC", "200000");
            if let Some(pid) = pid {
                cmd.env("WATCHDOG_PID", pid.to_string());
            }
        });
        let mut watchdogs = Vec::new();
        let mut c = connect(proxy.addr());
        if pid.is_some() {
            // Not for this process: READY, then nothing for several periods.
            assert!(notes.next().starts_with("READY=1\n"));
            notes
                .0
                .set_read_timeout(Some(Duration::from_millis(600)))
                .unwrap();
            let mut buf = [0u8; 64];
            let got = notes.0.recv(&mut buf).map(|n| buf[..n].to_vec());
            assert!(got.is_err(), "{got:?}");
            continue;
        }
        while watchdogs.len() < 4 {
            let note = notes.next();
            if note == "WATCHDOG=1" {
                watchdogs.push(Instant::now());
                // Busy in between: keep-alives come while bytes move too.
                c.write_all(b"ping").unwrap();
                assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
            } else {
                assert!(note.starts_with("READY=1\n"), "{note:?}");
            }
        }
        let gaps: Vec<Duration> = watchdogs.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|&g| g >= Duration::from_millis(50)),
            "keep-alives closer than the period (100ms): {gaps:?}"
        );
    }
}

/// `NOTIFY_SOCKET` may name an abstract socket (`@name`).
#[test]
fn a_service_manager_on_an_abstract_socket_is_told_ready() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!(
        "tcptap-test-{}-{}",
        std::process::id(),
        tcptap::notify::monotonic_usec()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    socket.set_read_timeout(Some(PROMPT)).unwrap();
    let notes = Notifications(socket);
    let echo = Upstream::echo();
    let _proxy = Proxy::with_config_in(&one_route("127.0.0.1:0", echo.addr, ""), 1, |cmd| {
        cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    });
    assert_eq!(notes.next(), "READY=1\nSTATUS=serving 1 route(s)");
}

/// With routes from the command line there is nothing to reload: a service manager's SIGHUP
/// (`Type=notify-reload`) still gets its reload ended at once, and the proxy serves on.
#[test]
fn a_service_manager_reload_without_a_config_file_ends_at_once() {
    let dir = TempDir::new("notify-cli");
    let notes = Notifications::bind(&dir);
    let echo = Upstream::echo();
    let upstream = echo.addr.to_string();
    let proxy = Proxy::start_in(
        &["--listen", "127.0.0.1:0", "--upstream", &upstream],
        1,
        None,
        |cmd| {
            cmd.env("NOTIFY_SOCKET", dir.path("notify.sock"));
        },
    );
    assert!(notes.next().starts_with("READY=1\n"));
    proxy.signal(libc::SIGHUP);
    assert!(notes.next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(notes.next(), "READY=1");
    let mut c = connect(proxy.addr());
    c.write_all(b"still here").unwrap();
    assert_eq!(read_n(&mut c, 10, PROMPT).unwrap(), b"still here");
}
