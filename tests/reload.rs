//! SIGHUP reloads the config file: routes are added and removed, settings change for new
//! connections, live connections are never dropped, and a bad file is rejected.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const SIGHUP: i32 = 1;

fn tagged(tag: u8) -> Upstream {
    Upstream::start(move |mut s| {
        let _ = s.write_all(&[tag]);
        let _ = s.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    })
}

fn ask(addr: SocketAddr) -> u8 {
    let mut c = connect(addr);
    c.shutdown(Shutdown::Write).unwrap();
    read_to_end(&mut c, PROMPT).unwrap()[0]
}

#[test]
fn sighup_adds_changes_and_removes_routes_without_dropping_live_connections() {
    let one = tagged(1);
    let two = tagged(2);
    // A long transfer on route `a` that spans both reloads.
    const LEN: usize = 16 << 20;
    let (tx, rx) = mpsc::channel();
    let bulk = Upstream::start(move |mut s| {
        let mut go = [0u8; 1];
        s.read_exact(&mut go).unwrap();
        tx.send(send_pattern(&mut s, 21, LEN).map_err(|e| e.to_string()))
            .unwrap();
    });
    let dir = TempDir::new("reload");
    let path = dir.path("proxy.toml");
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let route = |name: &str, listen: &str, up: SocketAddr| {
        format!("[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{up}\"\n")
    };
    write_file(
        &path,
        &format!(
            "{admin}{}{}",
            route("a", "127.0.0.1:0", bulk.addr),
            route("x", "127.0.0.1:0", one.addr)
        ),
    );
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 2);
    let a_addr = proxy.addrs[0];
    let x_addr = proxy.addrs[1];
    let admin_addr = proxy.admin_addr();
    let mut live = connect(a_addr);
    live.write_all(b"g").unwrap();
    let mut first = vec![0u8; 1 << 20];
    live.read_exact(&mut first).unwrap();

    // Reload 1: `x` now goes to upstream 2 (same name and listen address, new upstream), `b` is added.
    // The listen addresses stay as configured ("127.0.0.1:0" matches the same route).
    write_file(
        &path,
        &format!(
            "{admin}{}{}{}",
            route("a", "127.0.0.1:0", bulk.addr),
            route("x", "127.0.0.1:0", two.addr),
            route("b", "127.0.0.1:0", one.addr)
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    let b_addr = proxy.route_addr("b");
    assert_eq!(ask(b_addr), 1, "the added route serves");
    assert_eq!(
        ask(x_addr),
        2,
        "the changed route uses its new upstream for new connections"
    );
    wait_metric(admin_addr, "tcptap_config_generation", 2.0);

    // A bad file is rejected and nothing changes.
    write_file(&path, "[[route]]\nlisten = \"nowhere\"\n");
    proxy.signal(SIGHUP);
    proxy.wait_log("reload rejected", PROMPT);
    wait_metric(admin_addr, "tcptap_config_last_reload_success", 0.0);
    assert_eq!(ask(b_addr), 1);

    // Reload 2: `a` is removed while its transfer is in flight.
    write_file(
        &path,
        &format!(
            "{admin}{}{}",
            route("x", "127.0.0.1:0", two.addr),
            route("b", "127.0.0.1:0", one.addr)
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    proxy.wait_log("route `a` removed", PROMPT);
    let refused = TcpStream::connect_timeout(&a_addr, PROMPT);
    assert_eq!(
        refused.unwrap_err().kind(),
        ErrorKind::ConnectionRefused,
        "removed route still accepts"
    );
    wait_metric(admin_addr, "tcptap_config_last_reload_success", 1.0);
    // The live transfer on the removed route finishes byte-exact.
    let mut all = first;
    all.extend(read_to_end(&mut live, Duration::from_secs(30)).unwrap());
    assert!(
        all == Pattern::bytes(21, LEN),
        "live transfer corrupted by reloads"
    );
    assert_eq!(rx.recv_timeout(PROMPT).unwrap(), Ok(()));
}

/// A pseudo-terminal: (leader, follower). The follower as a child's stdin makes the child a
/// process started from a terminal.
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc calls on descriptors this function opens and hands to `File`s; the
    // name buffer outlives ptsname_r, which NUL-terminates it.
    unsafe {
        let leader = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            leader >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::grantpt(leader), 0);
        assert_eq!(libc::unlockpt(leader), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(leader, name.as_mut_ptr(), name.len()), 0);
        let follower = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(
            follower >= 0,
            "open pty: {}",
            std::io::Error::last_os_error()
        );
        (
            std::fs::File::from_raw_fd(leader),
            std::fs::File::from_raw_fd(follower),
        )
    }
}

/// Started from a terminal without a config file, there is nothing to reload: SIGHUP is the
/// terminal's hangup, and the proxy shuts down gracefully (connections in flight finish)
/// instead of outliving its terminal.
#[test]
fn sighup_from_a_terminal_without_a_config_file_shuts_down_gracefully() {
    let echo = Upstream::echo();
    let (_leader, follower) = pty();
    let addr = echo.addr.to_string();
    let args = ["--listen", "127.0.0.1:0", "--upstream", &addr];
    let mut proxy = Proxy::start_in(&args, 1, None, |cmd| {
        cmd.stdin(follower);
    });
    let mut live = connect(proxy.addr());
    live.write_all(b"a").unwrap();
    assert_eq!(read_n(&mut live, 1, PROMPT).unwrap(), b"a");
    proxy.signal(SIGHUP);
    proxy.wait_log("SIGHUP without a config file", PROMPT);
    // Draining: the open connection still works.
    live.write_all(b"b").unwrap();
    assert_eq!(read_n(&mut live, 1, PROMPT).unwrap(), b"b");
    drop(live);
    assert!(proxy.wait_exit(PROMPT).success(), "{}", proxy.logs());
}

/// Without a terminal (a service manager's `kill -HUP`) and without a config file, SIGHUP
/// changes nothing and says so.
#[test]
fn sighup_without_a_config_file_or_a_terminal_changes_nothing() {
    let one = tagged(1);
    let proxy = Proxy::forwarding_to(one.addr);
    proxy.signal(SIGHUP);
    proxy.wait_log("no config file to reload", PROMPT);
    assert_eq!(ask(proxy.addr()), 1);
    assert_eq!(proxy.count_log("shutting down"), 0, "{}", proxy.logs());
}

/// Started under `nohup` (SIGHUP ignored) with routes from the command line, the proxy keeps
/// SIGHUP ignored and serves on after a hangup.
#[test]
fn sighup_ignored_at_start_stays_ignored_without_a_config_file() {
    use std::os::unix::process::CommandExt;
    let one = tagged(1);
    let addr = one.addr.to_string();
    let args = ["--listen", "127.0.0.1:0", "--upstream", &addr];
    let proxy = Proxy::start_in(&args, 1, None, |cmd| {
        // SAFETY: signal(2) is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        ignored & 1,
        1,
        "SIGHUP (bit 0) no longer ignored: {ignored:x}"
    );
    // The kernel discards an ignored signal when it is sent.
    proxy.signal(SIGHUP);
    assert_eq!(ask(proxy.addr()), 1);
    assert_eq!(proxy.count_log("SIGHUP"), 0, "{}", proxy.logs());
}

/// Process-wide settings stay as they were at start, and a reload that changes them says so.
#[test]
fn sighup_warns_about_settings_that_wait_for_a_restart() {
    let one = tagged(1);
    let dir = TempDir::new("reload-restart");
    let path = dir.path("proxy.toml");
    let route = format!(
        "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        one.addr
    );
    write_file(
        &path,
        &format!("workers = 1\n[socket]\nnodelay = true\n{route}"),
    );
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let log = dir.path("access.log");
    write_file(
        &path,
        &format!(
            "workers = 2\ndrain_timeout = \"7s\"\nsplice = false\nlisten_backlog = 64\n\
             [socket]\nkeepalive = \"30s\"\n[access_log]\npath = \"{}\"\n{route}",
            log.display()
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    for line in [
        "`workers` changes from 1 to 2 at the next restart",
        "`drain_timeout` changes from 30s to 7s at the next restart",
        "`listen_backlog` changes from 1024 to 64 at the next restart",
        "`splice` changes from true to false at the next restart",
        "[socket] changes at the next restart",
        "[access_log] changes at the next restart",
    ] {
        proxy.wait_log(line, PROMPT);
    }
    assert_eq!(
        proxy.count_log("[admin] changes"),
        0,
        "[admin] did not change"
    );
    // The route still serves, and nothing was logged to the access log named by the reload.
    assert_eq!(ask(proxy.addr()), 1);
    assert!(!log.exists(), "the access log opened before a restart");
}

/// Flags keep their values over the file's at a reload: a file that says otherwise is told
/// about, at startup and at each reload, and only then.
#[test]
fn a_reload_says_which_file_settings_the_flags_override() {
    let one = tagged(1);
    let dir = TempDir::new("reload-flags");
    let path = dir.path("proxy.toml");
    let route = one_route("127.0.0.1:0", one.addr, "");
    let says = "the command line overrides";
    write_file(&path, &format!("busy_poll = \"50us\"\n{route}"));
    let proxy = Proxy::start(
        &["--config", path.to_str().unwrap(), "--busy-poll", "off"],
        1,
    );
    let line = proxy.wait_log(says, PROMPT);
    assert!(
        line.contains("INFO")
            && line.contains(path.to_str().unwrap())
            && line.contains("`busy_poll` by --busy-poll"),
        "{line}"
    );
    // The file agrees with the flag now: nothing to say.
    write_file(&path, &format!("busy_poll = \"off\"\n{route}"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    assert_eq!(proxy.count_log(says), 1, "{}", proxy.logs());
    write_file(&path, &format!("busy_poll = \"20us\"\n{route}"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    proxy.wait_count(says, 2, PROMPT);
    let logs = proxy.logs();
    let line = logs.lines().filter(|l| l.contains(says)).nth(1).unwrap();
    assert!(
        line.contains("WARN") && line.contains("reload: ") && line.contains("`busy_poll`"),
        "{line}"
    );
    assert_eq!(proxy.count_log("busy_poll is now"), 0, "{logs}");
    assert_eq!(ask(proxy.addr()), 1);
}

/// `splice_memory_limit` is one number for the whole process, changed by a reload at once.
#[test]
fn sighup_changes_the_splice_memory_limit() {
    let one = tagged(1);
    let dir = TempDir::new("reload-splice-memory");
    let path = dir.path("proxy.toml");
    let config = |limit: &str| {
        let top = format!("splice_memory_limit = \"{limit}\"\n[admin]\nlisten = \"127.0.0.1:0\"");
        one_route("127.0.0.1:0", one.addr, &top)
    };
    write_file(&path, &config("64 MiB"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let series = "tcptap_splice_memory_limit_bytes";
    wait_metric(proxy.admin_addr(), series, (64u64 << 20) as f64);
    write_file(&path, &config("8 MiB"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    proxy.wait_log("splice_memory_limit is now 8 MiB (was 64 MiB)", PROMPT);
    wait_metric(proxy.admin_addr(), series, (8u64 << 20) as f64);
    assert_eq!(ask(proxy.addr()), 1);
    // A limit below one pipe of the size in force (1 MiB until a restart) would stop all
    // splicing, although the file on its own is valid: rejected.
    write_file(
        &path,
        &config("128 KiB").replace("[admin]", "splice_pipe_size = \"64 KiB\"\n[admin]"),
    );
    proxy.signal(SIGHUP);
    let line = proxy.wait_log("reload rejected", PROMPT);
    assert!(
        line.contains("splice_memory_limit") && line.contains("1 MiB"),
        "{line}"
    );
    wait_metric(proxy.admin_addr(), series, (8u64 << 20) as f64);
    assert_eq!(ask(proxy.addr()), 1);
}

/// Open connections keep the `idle_timeout` they started with; new ones get the reloaded one.
#[test]
fn open_connections_keep_their_idle_timeout_across_a_reload() {
    let echo = Upstream::echo();
    let dir = TempDir::new("reload-idle");
    let path = dir.path("proxy.toml");
    let config = |idle: &str| {
        format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
             idle_timeout = \"{idle}\"\n",
            echo.addr
        )
    };
    write_file(&path, &config("1s"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let mut old = connect(proxy.addr());
    old.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut old, 2, PROMPT).unwrap(), b"hi");
    write_file(&path, &config("1h"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    let mut new = connect(proxy.addr());
    new.write_all(b"hi").unwrap();
    assert_eq!(read_n(&mut new, 2, PROMPT).unwrap(), b"hi");
    // The old connection is reset after its 1 s of silence.
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 8];
    old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match old.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "old connection not reset at its idle timeout: {other:?} after {:?}",
            t0.elapsed()
        ),
    }
    // The new one, idle for longer than 1 s by now, still echoes.
    std::thread::sleep(Duration::from_millis(1200));
    new.write_all(b"still").unwrap();
    assert_eq!(read_n(&mut new, 5, PROMPT).unwrap(), b"still");
}

/// A rejected reload leaves alone the file a new tap in it would have written (a pcap is
/// truncated when its tap starts): nothing is opened before every listener is bound and every
/// new tap's outputs are found writable.
#[test]
fn a_rejected_reload_leaves_the_files_of_its_taps_alone() {
    let up = tagged(7);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = TempDir::new("reload-tap");
    let path = dir.path("proxy.toml");
    let kept = dir.path("kept.pcap");
    std::fs::write(&kept, b"an earlier capture").unwrap();
    let route = |name: &str, listen: String, pcap: &std::path::Path| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{}\"\n\
             [route.tap]\npcap = \"{}\"\n",
            up.addr,
            pcap.display()
        )
    };
    write_file(
        &path,
        &route("a", "127.0.0.1:0".into(), &dir.path("first.pcap")),
    );
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    assert_eq!(ask(proxy.addr()), 7);
    // `a` would capture to `kept.pcap`, and `b` cannot listen: the reload is rejected.
    write_file(
        &path,
        &format!(
            "{}{}",
            route("a", "127.0.0.1:0".into(), &kept),
            route(
                "b",
                busy.local_addr().unwrap().to_string(),
                &dir.path("b.pcap")
            )
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("reload rejected", PROMPT);
    assert_eq!(std::fs::read(&kept).unwrap(), b"an earlier capture");
    assert!(!dir.path("b.pcap").exists());
    assert_eq!(ask(proxy.addr()), 7, "the running configuration stays");
    // Nor a reload rejected because another new tap cannot write its file.
    let nowhere = dir.path("no-such-dir").join("b.pcap");
    write_file(
        &path,
        &format!(
            "{}{}",
            route("a", "127.0.0.1:0".into(), &kept),
            route("b", "127.0.0.1:0".into(), &nowhere)
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_count("reload rejected", 2, PROMPT);
    let line = proxy.wait_log("tap pcap: cannot write", PROMPT);
    assert!(line.contains("route `b`"), "{line}");
    assert_eq!(std::fs::read(&kept).unwrap(), b"an earlier capture");
    assert_eq!(ask(proxy.addr()), 7, "the running configuration stays");
}

/// Renaming a route on the same address, or swapping the addresses of two routes, keeps the
/// listeners (binding them anew would fail while the old routes hold them): no moment without a
/// listener, and open connections go on.
#[test]
fn a_reload_renames_routes_and_swaps_their_addresses() {
    let (one, two) = (tagged(1), tagged(2));
    let p = free_port();
    let q = std::iter::repeat_with(free_port)
        .take(100)
        .find(|&q| q != p)
        .unwrap();
    let dir = TempDir::new("reload-rename");
    let path = dir.path("proxy.toml");
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let route = |name: &str, port: u16, up: SocketAddr| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{up}\"\n"
        )
    };
    write_file(
        &path,
        &format!(
            "{admin}{}{}",
            route("a", p, one.addr),
            route("b", q, two.addr)
        ),
    );
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 2);
    let (at_p, at_q) = (
        SocketAddr::from(([127, 0, 0, 1], p)),
        SocketAddr::from(([127, 0, 0, 1], q)),
    );
    assert_eq!((ask(at_p), ask(at_q)), (1, 2));
    let accepted = |route: &str, n: f64| {
        wait_metric(
            proxy.admin_addr(),
            &format!("tcptap_connections_accepted_total{{route=\"{route}\"}}"),
            n,
        )
    };
    let mut live = connect(at_p);
    // Accepted under `a` before the reload (a connect completes in the kernel; the worker whose
    // listener queued it accepts it at its next turn).
    accepted("a", 2.0);
    let reload = |routes: [(&str, u16, SocketAddr); 2], generation: u32| {
        let [r1, r2] = routes.map(|(name, port, up)| route(name, port, up));
        write_file(&path, &format!("{admin}{r1}{r2}"));
        proxy.signal(SIGHUP);
        proxy.wait_log(&format!("configuration generation {generation}"), PROMPT);
    };
    // `a` becomes `c` on the same address.
    reload([("c", p, one.addr), ("b", q, two.addr)], 2);
    proxy.wait_log("route `a` on 127.0.0.1:", PROMPT);
    assert_eq!(ask(at_p), 1);
    // Metrics follow names: `c` starts from 0, `a` keeps its count (its connection is open).
    accepted("c", 1.0);
    let body = accepted("a", 2.0);
    assert_eq!(
        metric(&body, "tcptap_connections_active{route=\"a\"}"),
        Some(1.0),
        "{body}"
    );
    // So does `/connections`: the open connection is listed under the name it was accepted
    // under, as in its log line.
    let (_, body) = http_get(proxy.admin_addr(), "/connections");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let client = live.local_addr().unwrap().to_string();
    let entry = (list.as_array().unwrap().iter())
        .find(|c| c["client"] == client.as_str())
        .unwrap_or_else(|| panic!("{client} not in {body}"));
    assert_eq!(entry["route"], "a", "{body}");
    // `b` and `c` swap addresses (and so upstreams stay with the names).
    reload([("c", q, one.addr), ("b", p, two.addr)], 3);
    assert_eq!((ask(at_q), ask(at_p)), (1, 2));
    // Each name's counter goes on from its own count: none goes backwards.
    accepted("c", 2.0);
    accepted("b", 2.0);
    accepted("a", 2.0);
    assert_eq!(proxy.count_log("reload rejected"), 0, "{}", proxy.logs());
    // The connection accepted before both reloads is served by its upstream.
    live.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut live, PROMPT).unwrap(), [1]);
    drop(live);
    // It closes under the name it was accepted under.
    wait_metric(
        proxy.admin_addr(),
        "tcptap_connections_active{route=\"a\"}",
        0.0,
    );
}

/// SIGHUPs in quick succession, as from a config tool that edits and signals several times:
/// none is lost (the file as it is after the last one is in force, however the reloads
/// overlap), and an address one reload removes can be bound again by the next (its listener
/// is closed before the next reload starts).
#[test]
fn sighups_in_quick_succession_end_with_the_last_file_in_force() {
    // One upstream per step, so that each step's file is told apart by what `x` answers.
    let ups: Vec<Upstream> = (1..=11).map(tagged).collect();
    let p = free_port();
    let dir = TempDir::new("reload-burst");
    let path = dir.path("proxy.toml");
    let config = |k: usize| {
        let up = ups[k].addr;
        let x = format!("[[route]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n");
        // `y` is there in even steps only.
        let y = if k % 2 == 0 {
            format!("[[route]]\nname = \"y\"\nlisten = \"127.0.0.1:{p}\"\nupstream = \"{up}\"\n")
        } else {
            String::new()
        };
        format!("{x}{y}")
    };
    // Replaced whole (write, then rename), so a reload never reads half a file.
    let replace = |text: &str| {
        let tmp = dir.path("proxy.toml.new");
        write_file(&tmp, text);
        std::fs::rename(&tmp, &path).unwrap();
    };
    replace(&config(0));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 2);
    let x_addr = proxy.addrs[0];
    // Waits for step `k`'s file to be in force; returns its upstream's tag.
    let settled = |k: usize| {
        let want = (k + 1) as u8;
        let deadline = std::time::Instant::now() + PROMPT;
        while ask(x_addr) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "step {k} is not in force: {}",
                proxy.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        want
    };
    let at_p = SocketAddr::from(([127, 0, 0, 1], p));
    assert_eq!((ask(x_addr), ask(at_p)), (1, 1));

    // A second SIGHUP while the first reload is still reading its file (20 MB of comments
    // make that take a while): the first reload may have read the file before the edit.
    let comments = format!("# {}\n", "-".repeat(98)).repeat(200_000);
    replace(&format!("{comments}{}", config(1)));
    proxy.signal(SIGHUP);
    proxy.wait_log("SIGHUP: reloading", PROMPT);
    replace(&config(2));
    proxy.signal(SIGHUP);
    let want = settled(2);
    assert_eq!(ask(at_p), want, "{}", proxy.logs());

    // A burst: the kernel merges some of the signals, the proxy must miss none it gets.
    const LAST: usize = 10;
    for k in 3..=LAST {
        replace(&config(k));
        proxy.signal(SIGHUP);
    }
    let want = settled(LAST);
    assert_eq!(ask(at_p), want, "{}", proxy.logs());
    assert_eq!(proxy.count_log("reload rejected"), 0, "{}", proxy.logs());
}

/// Health survives a reload that keeps a route's upstreams: a DOWN backend stays out of
/// rotation and `/metrics` still shows it DOWN. New upstreams start from scratch.
#[test]
fn a_reload_keeps_the_health_of_upstreams_it_does_not_change() {
    let a = tagged(1);
    let c = tagged(3);
    let dead = dead_addr();
    let dir = TempDir::new("reload-health");
    let path = dir.path("proxy.toml");
    let config = |upstreams: &[SocketAddr], idle: &str| {
        let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n\
             upstreams = [{}]\nidle_timeout = \"{idle}\"\n[route.health_check]\n\
             interval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n",
            list.join(", ")
        )
    };
    write_file(&path, &config(&[a.addr, dead], "1m"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    proxy.wait_log("is DOWN after", PROMPT);
    let up = |at: SocketAddr| {
        let (_, metrics) = http_get(proxy.admin_addr(), "/metrics");
        let series =
            format!("tcptap_upstream_up{{route=\"r\",upstream=\"{at}\",address=\"{at}\"}}");
        metric(&metrics, &series)
    };
    assert_eq!((up(a.addr), up(dead)), (Some(1.0), Some(0.0)));
    // Only the idle timeout changes.
    write_file(&path, &config(&[a.addr, dead], "2m"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    assert_eq!((up(a.addr), up(dead)), (Some(1.0), Some(0.0)));
    for _ in 0..4 {
        assert_eq!(ask(proxy.addr()), 1, "{}", proxy.logs());
    }
    assert_eq!(proxy.count_log("is DOWN after"), 1, "{}", proxy.logs());
    // The upstreams change: their health is checked anew.
    write_file(&path, &config(&[a.addr, dead, c.addr], "2m"));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    proxy.wait_count("is DOWN after", 2, PROMPT);
    let deadline = std::time::Instant::now() + PROMPT;
    while up(c.addr) != Some(1.0) || up(dead) != Some(0.0) {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(up(a.addr), Some(1.0));
    assert_eq!(proxy.count_log("reload rejected"), 0, "{}", proxy.logs());
}

also_with_two_workers!(
    sighups_in_quick_succession_end_with_the_last_file_in_force,
    a_reload_renames_routes_and_swaps_their_addresses,
    a_reload_keeps_the_health_of_upstreams_it_does_not_change,
);

/// A client accepted before a reload replaced its route's upstreams, whose connect waits for its
/// PROXY header until after the reload, is counted in the set its backend was picked from: once
/// it is done, least-connections balancing goes on over both upstreams (its close used to be
/// counted against the old set, leaving its backend one connection busier for good).
#[test]
fn a_client_that_connects_after_a_reload_is_counted_in_the_new_set() {
    let (one, two) = (tagged(1), tagged(2));
    let dir = TempDir::new("reload-epoch");
    let path = dir.path("proxy.toml");
    let config = |ups: [SocketAddr; 2]| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n\
             upstreams = [\"{}\", \"{}\"]\npolicy = \"least_connections\"\n\
             accept_proxy_protocol = true\n",
            ups[0], ups[1]
        )
    };
    let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 80\r\n";
    let ask_with_header = |addr: SocketAddr| {
        let mut c = connect(addr);
        c.write_all(header).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        read_to_end(&mut c, PROMPT).unwrap()[0]
    };
    write_file(&path, &config([one.addr, two.addr]));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let admin = proxy.admin_addr();
    // A client that has not sent its header yet, once the proxy holds it.
    let mut pending = connect(proxy.addr());
    let port = format!(":{}\"", pending.local_addr().unwrap().port());
    let deadline = std::time::Instant::now() + PROMPT;
    while !http_get(admin, "/connections").1.contains(&port) {
        assert!(
            std::time::Instant::now() < deadline,
            "the client was not accepted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Same upstreams, another order: a new set.
    write_file(&path, &config([two.addr, one.addr]));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    pending.write_all(header).unwrap();
    pending.shutdown(Shutdown::Write).unwrap();
    let tag = read_to_end(&mut pending, PROMPT).unwrap()[0];
    assert!(tag == 1 || tag == 2);
    drop(pending);
    let tags: Vec<u8> = (0..8).map(|_| ask_with_header(proxy.addr())).collect();
    assert!(tags.contains(&1) && tags.contains(&2), "{tags:?}");
}

/// The global `max_connections` changes at the next restart, as the reload's warning says:
/// also for a route without a limit of its own, which follows the global one (a reload used to
/// give such a route the file's new global value at once).
#[test]
fn a_reload_keeps_the_global_connection_limit_for_routes_without_their_own() {
    let echo = Upstream::echo();
    let dir = TempDir::new("reload-limit");
    let path = dir.path("proxy.toml");
    let config = |max: usize| {
        format!(
            "max_connections = {max}\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"{}\"\n",
            echo.addr
        )
    };
    let echoes = |c: &mut TcpStream, msg: &[u8]| {
        c.write_all(msg).unwrap();
        assert_eq!(read_n(c, msg.len(), PROMPT).unwrap(), msg);
    };
    write_file(&path, &config(2));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let mut first = connect(proxy.addr());
    echoes(&mut first, b"one");
    write_file(&path, &config(1));
    proxy.signal(SIGHUP);
    let line = proxy.wait_log("`max_connections` changes from 2 to 1", PROMPT);
    assert!(line.contains("at the next restart"), "{line}");
    proxy.wait_log("configuration generation 2", PROMPT);
    // Two connections at once are still allowed.
    let mut second = connect(proxy.addr());
    echoes(&mut second, b"two");
    assert_eq!(proxy.count_log("accepting paused"), 0, "{}", proxy.logs());
}

/// Echoes 512 KiB through `addr`: a log of it is many times what a FIFO holds (64 KiB), so a
/// tap writing to a FIFO nobody reads blocks in it.
fn echo_to_a_stuck_log(addr: SocketAddr) {
    let bulk = Pattern::bytes(3, 512 << 10);
    let mut c = connect(addr);
    c.write_all(&bulk).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), bulk);
}

/// A reload that opens again the file of a tap writer still stuck in it (a FIFO whose reader
/// stopped reading) waits for that writer, up to `drain_timeout`. `/metrics` answers meanwhile:
/// the reload used to hold the lock that `/metrics` read the routes' upstream health under.
#[test]
fn metrics_answer_while_a_reload_waits_for_a_stuck_tap_writer() {
    let echo = Upstream::echo();
    let dir = TempDir::new("reload-stuck-tap");
    let fifo = dir.path("stuck");
    mkfifo(&fifo);
    let _reader = open_fifo_reader(&fifo);
    let path = dir.path("proxy.toml");
    let config = |tap: &str| {
        format!(
            "drain_timeout = \"4s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n{tap}",
            echo.addr
        )
    };
    let tap = |queue: &str| {
        format!(
            "[route.tap]\nlog = \"{}\"\nqueue_size = \"{queue}\"\n",
            fifo.display()
        )
    };
    write_file(&path, &config(&tap("1 MiB")));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let admin = proxy.admin_addr();
    echo_to_a_stuck_log(proxy.addr());
    // The tap off: its writer, still stuck, is no longer used.
    write_file(&path, &config(""));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    // Back on the same FIFO with other settings: the reload waits for the stuck writer.
    write_file(&path, &config(&tap("2 MiB")));
    proxy.signal(SIGHUP);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let t = std::time::Instant::now();
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "/metrics took {:?} during the reload",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The writer is still stuck when the wait ends: the reload is rejected, naming the file.
    let line = proxy.wait_log("reload rejected", Duration::from_secs(10));
    assert!(line.contains("stuck"), "{line}");
}

/// `transparent` is a property of a route's listener (`IP_TRANSPARENT`, set when it is bound),
/// and it decides how an `original-destination` route reads where a connection was going: the
/// local address under TPROXY, `SO_ORIGINAL_DST` after a REDIRECT. A reload that flips it on a
/// route it keeps says it changes at the next restart, and the route goes on reading as before:
/// a connection that was not redirected is refused as such, not taken (as the local address
/// would have it) for one to the proxy's own listener.
#[test]
fn a_reload_that_flips_transparent_on_a_kept_route_waits_for_the_restart() {
    let dir = TempDir::new("reload-transparent");
    let path = dir.path("proxy.toml");
    let config = |transparent: bool| {
        format!(
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"original-destination\"\n\
             transparent = {transparent}\n"
        )
    };
    write_file(&path, &config(false));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    write_file(&path, &config(true));
    proxy.signal(SIGHUP);
    let line = proxy.wait_log("`transparent` changes from false to true", PROMPT);
    assert!(
        line.contains("route `r`") && line.contains("next restart"),
        "{line}"
    );
    proxy.wait_log("configuration generation 2", PROMPT);
    // Not redirected: refused as such, as before the reload (the reset may already meet the
    // connect).
    if let Ok(mut c) = TcpStream::connect(proxy.addr()) {
        let _ = read_to_end(&mut c, PROMPT);
    }
    let line = proxy.wait_log("refused", PROMPT);
    assert!(
        line.contains("redirected") && !line.contains("own listener"),
        "{line}"
    );
}

/// A reload that would start a tap on the file of a writer still stuck in it is rejected once
/// the wait for that writer ends, and before any of its taps has started: the pcap another
/// route of the same reload was to write is left as it was (starting it truncates it).
#[test]
fn a_reload_rejected_for_a_stuck_tap_writer_truncates_no_other_tap_file() {
    let echo = Upstream::echo();
    let dir = TempDir::new("reload-stuck-first");
    let fifo = dir.path("stuck");
    mkfifo(&fifo);
    let _reader = open_fifo_reader(&fifo);
    let pcap = dir.path("a.pcap");
    let path = dir.path("proxy.toml");
    let config = |a_tap: &str, b_tap: &str| {
        format!(
            "drain_timeout = \"2s\"\n\
             [[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{a_tap}\
             [[route]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{b_tap}",
            up = echo.addr
        )
    };
    let b_tap = |queue: &str| {
        format!(
            "[route.tap]\nlog = \"{}\"\nqueue_size = \"{queue}\"\n",
            fifo.display()
        )
    };
    write_file(&path, &config("", &b_tap("1 MiB")));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 2);
    echo_to_a_stuck_log(proxy.route_addr("b"));
    write_file(&path, &config("", ""));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    // An earlier capture that route `a`'s new tap would start over.
    std::fs::write(&pcap, b"an earlier capture").unwrap();
    let a_tap = format!("[route.tap]\npcap = \"{}\"\n", pcap.display());
    write_file(&path, &config(&a_tap, &b_tap("2 MiB")));
    proxy.signal(SIGHUP);
    let line = proxy.wait_log("reload rejected", Duration::from_secs(10));
    assert!(line.contains("stuck"), "{line}");
    assert_eq!(std::fs::read(&pcap).unwrap(), b"an earlier capture");
}
