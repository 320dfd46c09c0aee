//! `busy_poll`: an event loop that just had events polls again before it sleeps, and an idle
//! one sleeps.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const REQUESTS: usize = 2000;

also_with_two_workers!(
    busy_poll_keeps_a_busy_loop_awake_and_lets_an_idle_one_sleep,
    a_reload_turns_busy_poll_on_and_off_at_once,
);

/// The tests that count sleeps run one at a time: a loop finds events without sleeping more
/// often while other tests keep the CPUs busy.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Times each of the proxy's event loops went to sleep so far (voluntary context switches), by
/// thread id: worker 0 runs on the main thread, the others on `tcptap-worker-N` threads. The
/// other threads (tap and log writers, admin, reload) come and go and sleep on their own.
fn sleeps(pid: u32) -> HashMap<String, u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("proxy's threads");
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if tid != pid.to_string() && !comm.starts_with("tcptap-worker") {
                return None;
            }
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = (status.lines())
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse()
                .ok()?;
            Some((tid, n))
        })
        .collect()
}

/// `REQUESTS` ping-pongs of 64 bytes over one connection through the proxy; returns the
/// proxy's sleeps per request meanwhile.
fn sleeps_per_request(proxy: &Proxy) -> f64 {
    let mut s = connect(proxy.addr());
    s.set_nodelay(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 64];
    // One exchange first, so that the connection is set up before counting.
    s.write_all(&buf).unwrap();
    s.read_exact(&mut buf).unwrap();
    let before = sleeps(proxy.pid());
    for i in 0..REQUESTS {
        buf.fill(i as u8);
        s.write_all(&buf).unwrap();
        s.read_exact(&mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == i as u8),
            "request {i}: wrong bytes back"
        );
        assert!(
            Instant::now() < deadline,
            "{i} of {REQUESTS} requests in 60 s"
        );
    }
    let after = sleeps(proxy.pid());
    assert!(!after.is_empty(), "no event loop thread found");
    let slept: u64 = (after.iter())
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(*n)))
        .sum();
    let per = slept as f64 / REQUESTS as f64;
    eprintln!("{per:.3} sleeps per request");
    per
}

fn proxy(upstream: SocketAddr, busy_poll: &str) -> Proxy {
    Proxy::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
            "--busy-poll",
            busy_poll,
        ],
        1,
    )
}

/// Between the requests of a busy connection the loop polls instead of sleeping; once traffic
/// stops, it sleeps again instead of spinning.
#[test]
fn busy_poll_keeps_a_busy_loop_awake_and_lets_an_idle_one_sleep() {
    let _alone = alone();
    let up = Upstream::echo();
    // Without it, the loop sleeps while the upstream answers and while the client sends the
    // next request: up to twice per request.
    let plain = proxy(up.addr, "off");
    let without = sleeps_per_request(&plain);
    drop(plain);
    // With a window far longer than a round trip on loopback, it hardly sleeps at all.
    let busy = proxy(up.addr, "20ms");
    busy.wait_log(
        "each event loop polls for up to 20ms before it sleeps",
        PROMPT,
    );
    let with = sleeps_per_request(&busy);
    assert!(
        with < without / 4.0,
        "with busy_poll = \"20ms\" the loop slept {with:.3} times per request, without it \
         {without:.3}"
    );
    // Idle (the client gone, nothing sent): the loop polls for 20 ms at most, then sleeps. A
    // loop that kept polling would take the whole second.
    let cpu0 = busy.cpu_time();
    thread::sleep(Duration::from_secs(1));
    let spent = busy.cpu_time() - cpu0;
    assert!(
        spent < Duration::from_millis(200),
        "an idle proxy with busy_poll used {spent:?} of CPU in 1 s"
    );
    // And it still serves.
    let mut s = connect(busy.addr());
    s.write_all(b"after").unwrap();
    assert_eq!(read_n(&mut s, 5, PROMPT).unwrap(), b"after");
}

/// A wrong value names the flag or the key, and the proxy does not start.
#[test]
fn a_bad_busy_poll_is_refused_with_its_name() {
    let _alone = alone();
    let out = std::process::Command::new(binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--busy-poll",
            "fast",
            "--check-config",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted --busy-poll fast: {err}");
    assert!(
        err.contains("--busy-poll") && err.contains("\"fast\" is not a duration"),
        "{err}"
    );
    let dir = TempDir::new("busy-poll-bad");
    let path = dir.path("proxy.toml");
    for (value, problem) in [("slow", "is not a duration"), ("2s", "longer than 1s")] {
        let top = format!("busy_poll = \"{value}\"");
        write_file(&path, &one_route("127.0.0.1:0", dead_addr(), &top));
        let out = std::process::Command::new(binary())
            .args(["--config", path.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "accepted busy_poll = \"{value}\": {err}"
        );
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains("busy_poll")
                && err.contains(problem),
            "{err}"
        );
    }
}

/// A timer due within the window cuts the polling short: with `busy_poll = "1s"`, an idle
/// connection is still reset at its 300 ms `idle_timeout`, not after a second of polling.
#[test]
fn timers_fire_on_time_while_the_loop_polls() {
    let _alone = alone();
    let up = Upstream::echo();
    let top = "busy_poll = \"1s\"\nidle_timeout = \"300ms\"";
    let proxy = Proxy::with_config(&one_route("127.0.0.1:0", up.addr, top), 1);
    let mut s = connect(proxy.addr());
    s.write_all(b"ping").unwrap();
    assert_eq!(read_n(&mut s, 4, PROMPT).unwrap(), b"ping");
    let idle_since = Instant::now();
    // The loop now polls; the connection's idle timer is due in 300 ms.
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    let after = idle_since.elapsed();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "expected the idle connection to be closed, read {r:?}"
    );
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_millis(800),
        "idle_timeout of 300 ms fired after {after:?}"
    );
}

/// `busy_poll` in the config file, changed by a reload at once, both ways; `/metrics` counts
/// the time spent polling.
#[test]
fn a_reload_turns_busy_poll_on_and_off_at_once() {
    let _alone = alone();
    let up = Upstream::echo();
    let dir = TempDir::new("busy-poll-reload");
    let path = dir.path("proxy.toml");
    let config = |busy_poll: &str| {
        let top = format!("busy_poll = \"{busy_poll}\"\n[admin]\nlisten = \"127.0.0.1:0\"");
        one_route("127.0.0.1:0", up.addr, &top)
    };
    write_file(&path, &config("off"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let admin = proxy.admin_addr();
    let polled = || {
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        metric(&body, "tcptap_busy_poll_seconds_total").expect("busy_poll metric")
    };
    let without = sleeps_per_request(&proxy);
    assert_eq!(polled(), 0.0, "polled with busy_poll off");

    write_file(&path, &config("20ms"));
    proxy.signal(libc::SIGHUP);
    proxy.wait_log("reload: busy_poll is now 20ms (was off)", PROMPT);
    proxy.wait_log("configuration generation 2", PROMPT);
    let with = sleeps_per_request(&proxy);

    write_file(&path, &config("off"));
    proxy.signal(libc::SIGHUP);
    proxy.wait_log("reload: busy_poll is now off (was 20ms)", PROMPT);
    proxy.wait_log("configuration generation 3", PROMPT);
    // Each request's round trip was spent polling: far more than nothing.
    let on = polled();
    assert!(on > 0.0, "busy_poll on, yet no time counted as polling");
    let again = sleeps_per_request(&proxy);
    assert!(
        with < without / 4.0 && with < again / 4.0,
        "sleeps per request: {without:.3} off, {with:.3} after the reload to 20ms, {again:.3} \
         after the reload back to off"
    );
    // Off again (the worker logs the change as it applies it): the loop no longer polls.
    assert_eq!(polled(), on, "polled after busy_poll was turned off");
}
