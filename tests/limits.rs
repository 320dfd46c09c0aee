//! File-descriptor limits: connections are capped so clients wait in the backlog instead of being
//! rejected, and if descriptors run out anyway the proxy pauses accepting with backoff instead of
//! spinning, then serves again once descriptors free up. Pipe limits: directions fall back to
//! copying. Local ports: running out of them toward an upstream is explained once and counted.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;
use tcptap::admin::MAX_DESCRIPTORS;
use tcptap::event_loop::{FD_RESERVE, PIPE_POOL_MAX};

fn set_nofile(pid: u32, limit: u64) -> libc::rlimit {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: 20_000.max(limit),
    };
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child with valid pointers.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

/// Makes the proxy start with an open-file limit of `n` (soft and hard).
fn limit_nofile(cmd: &mut std::process::Command, n: u64) {
    // SAFETY: setrlimit is async-signal-safe; runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Descriptors a proxy with one route and one worker keeps outside the budget of connections and
/// busy pipes: its own, its listener, its up to 16 idle kernel pipes, and the admin endpoint's.
fn reserved_fds(admin: bool) -> u64 {
    let admin = if admin { MAX_DESCRIPTORS as u64 } else { 0 };
    FD_RESERVE + 1 + 2 * PIPE_POOL_MAX as u64 + admin
}

#[test]
fn fd_limit_caps_connections_and_clients_wait() {
    let echo = Upstream::echo();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &echo.addr.to_string(),
    ];
    let proxy = Proxy::start_in(&args, 1, None, |cmd| {
        limit_nofile(cmd, reserved_fds(false) + 2 * 4)
    });
    proxy.wait_log("holding at most 4 connections", PROMPT);
    let mut clients: Vec<_> = (0..12).map(|_| connect(proxy.addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&[i as u8]).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate().take(4) {
        assert_eq!(read_n(c, 1, PROMPT).unwrap(), [i as u8]);
    }
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 4);
    // Each client that leaves lets one more in; none is rejected.
    for i in 4..12 {
        clients.remove(0);
        let c = &mut clients[3];
        assert_eq!(
            read_n(c, 1, PROMPT).unwrap(),
            [i as u8],
            "client {i} not served"
        );
    }
    assert_eq!(proxy.count_log("connect failed"), 0, "{}", proxy.logs());
}

/// A reload that adds routes keeps their listeners' descriptors out of the connections' budget
/// too, so connections still cannot take the descriptors accept(2) and socket(2) need.
#[test]
fn routes_a_reload_adds_shrink_the_connection_budget() {
    let echo = Upstream::echo();
    let dir = TempDir::new("fd-reload");
    let path = dir.path("proxy.toml");
    let route = |name: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            echo.addr
        )
    };
    write_file(&path, &route("a"));
    let proxy = Proxy::start_in(&["--config", path.to_str().unwrap()], 1, None, |cmd| {
        limit_nofile(cmd, reserved_fds(false) + 2 * 4)
    });
    proxy.wait_log("holding at most 4 connections", PROMPT);
    // Two more listeners: one pair of descriptors less for connections.
    write_file(
        &path,
        &format!("{}{}{}", route("a"), route("b"), route("c")),
    );
    proxy.signal(libc::SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    proxy.wait_log("holding at most 3 connections (was 4)", PROMPT);
    let mut clients: Vec<_> = (0..5).map(|_| connect(proxy.addr())).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&[i as u8]).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate().take(3) {
        assert_eq!(read_n(c, 1, PROMPT).unwrap(), [i as u8]);
    }
    // The fourth waits in the backlog until a connection ends.
    let early = read_n(&mut clients[3], 1, Duration::from_millis(300));
    assert!(early.is_err(), "a fourth connection was served: {early:?}");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 3);
    clients.remove(0);
    assert_eq!(read_n(&mut clients[2], 1, PROMPT).unwrap(), [3]);
    assert_eq!(proxy.count_log("connect failed"), 0, "{}", proxy.logs());
}

/// Accepts one connection on `listener` within `timeout`.
fn accept_within(listener: &std::net::TcpListener, timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection within {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A client that sends an 8-byte id then `len` bytes of pattern `id` from a thread, and keeps its
/// socket open: the thread returns it.
fn bulk_sender(addr: SocketAddr, id: u64, len: usize) -> std::thread::JoinHandle<TcpStream> {
    let mut c = connect(addr);
    std::thread::spawn(move || {
        c.write_all(&id.to_le_bytes()).unwrap();
        send_pattern(&mut c, id, len).unwrap();
        c
    })
}

/// Reads what [`bulk_sender`] sends, exactly, without waiting for an EOF.
fn expect_bulk(s: &mut TcpStream, id: u64, len: usize) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = vec![0u8; 8 + len];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got[..8], id.to_le_bytes());
    assert!(got[8..] == Pattern::bytes(id, len), "stream {id} differs");
}

/// Once every connection of `route` closed: no pipe is held any more, and no accept(2), socket(2)
/// or pipe2(2) ran out of descriptors on the way.
fn assert_budget_whole(proxy: &Proxy, route: &str) {
    let admin = proxy.admin_addr();
    wait_metric(
        admin,
        &format!("tcptap_connections_active{{route=\"{route}\"}}"),
        0.0,
    );
    wait_metric(admin, "tcptap_kernel_pipes", 0.0);
    assert_eq!(
        proxy.count_log("Too many open files"),
        0,
        "{}",
        proxy.logs()
    );
}

/// A proxy with an admin endpoint toward `upstream`, whose open-file limit leaves `pairs`
/// descriptor pairs for connections and busy pipes. Small socket buffers toward the upstream,
/// which reads nothing until the test says: each sender's bytes stay in its direction's kernel
/// pipe.
fn proxy_to_stalled(upstream: &std::net::TcpListener, pairs: u64) -> Proxy {
    Proxy::with_config_in(
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[socket]\nsend_buffer_size = \"64 KiB\"\n{}",
            one_route("127.0.0.1:0", upstream.local_addr().unwrap(), "")
        ),
        1,
        |cmd| {
            cmd.env("RUST_LOG", "info,tcptap::event_loop=debug");
            limit_nofile(cmd, reserved_fds(true) + 2 * pairs);
        },
    )
}

/// Kernel pipes and connections share the open-file budget. While stalled transfers hold their
/// pipes, a new client waits in the listen backlog (no accept(2), socket(2) or pipe2(2) fails for
/// lack of descriptors, so nobody is reset), and it is served as soon as a pipe is released.
#[test]
fn busy_pipes_hold_new_clients_in_the_backlog_until_released() {
    const LEN: usize = 4 << 20;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Room for 4 descriptor pairs.
    let proxy = proxy_to_stalled(&upstream, 4);
    let admin = proxy.admin_addr();
    let senders: Vec<_> = (0..2)
        .map(|id| bulk_sender(proxy.addr(), id, LEN))
        .collect();
    let mut held: Vec<_> = (0..2).map(|_| accept_within(&upstream, PROMPT)).collect();
    // Two connections and their two pipes: the budget is spent.
    wait_metric(admin, "tcptap_kernel_pipes", 2.0);
    let mut late = connect(proxy.addr());
    late.write_all(b"hello").unwrap();
    let line = proxy.wait_log("accepting paused", PROMPT);
    assert!(
        line.contains("2 connections, 4 descriptor pairs held"),
        "{line}"
    );
    upstream.set_nonblocking(true).unwrap();
    assert_eq!(
        upstream.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the late client reached the upstream while the budget was spent"
    );
    // Drain the first transfer: its pipe empties and goes back, and the late client gets in.
    expect_bulk(&mut held[0], 0, LEN);
    let mut up = accept_within(&upstream, PROMPT);
    assert_eq!(read_n(&mut up, 5, PROMPT).unwrap(), b"hello");
    up.write_all(b"world").unwrap();
    assert_eq!(read_n(&mut late, 5, PROMPT).unwrap(), b"world");
    expect_bulk(&mut held[1], 1, LEN);
    let clients: Vec<TcpStream> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    // Everything closed: the budget is whole again.
    drop((clients, late, up, held));
    assert_budget_whole(&proxy, "route0");
}

/// A transfer that found no pipe to spare copies through user space meanwhile, and goes back to
/// splicing once a pipe is free: it takes one as soon as nothing is left in its copy buffer.
#[test]
fn a_transfer_refused_a_pipe_splices_again_once_one_is_free() {
    const LEN: usize = 4 << 20;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Room for 3 descriptor pairs: two connections and one pipe.
    let proxy = proxy_to_stalled(&upstream, 3);
    let admin = proxy.admin_addr();
    // The first transfer stalls with its bytes in a kernel pipe.
    let first = bulk_sender(proxy.addr(), 0, LEN);
    let mut first_up = accept_within(&upstream, PROMPT);
    wait_metric(admin, "tcptap_kernel_pipes", 1.0);
    // The second gets in (one pair left) but no pipe: it copies, and stalls too.
    let second = bulk_sender(proxy.addr(), 1, LEN);
    let mut second_up = accept_within(&upstream, PROMPT);
    wait_metric(admin, "tcptap_connections_active{route=\"route0\"}", 2.0);
    let mut head = vec![0u8; 8 + 64 * 1024];
    second_up.read_exact(&mut head).unwrap();
    assert_eq!(head[..8], 1u64.to_le_bytes());
    assert!(
        head[8..] == Pattern::bytes(1, LEN)[..64 * 1024],
        "stream 1 differs"
    );
    assert_eq!(
        metric(&http_get(admin, "/metrics").1, "tcptap_kernel_pipes"),
        Some(1.0),
        "the second transfer got a pipe while the budget had none"
    );
    // The first one ends and closes: its pipe goes back. The second, read on a little and
    // stalled again, holds a pipe of its own now.
    expect_bulk(&mut first_up, 0, LEN);
    drop((first.join().unwrap(), first_up));
    wait_metric(admin, "tcptap_connections_active{route=\"route0\"}", 1.0);
    let mut more = vec![0u8; 1 << 20];
    second_up.read_exact(&mut more).unwrap();
    wait_metric(admin, "tcptap_kernel_pipes", 1.0);
    // Every byte arrives, in order, across the switches.
    let mut rest = vec![0u8; LEN - 64 * 1024 - more.len()];
    second_up
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    second_up.read_exact(&mut rest).unwrap();
    let mut got = head[8..].to_vec();
    got.extend_from_slice(&more);
    got.extend_from_slice(&rest);
    assert!(got == Pattern::bytes(1, LEN), "stream 1 differs");
    drop((second.join().unwrap(), second_up));
    assert_budget_whole(&proxy, "route0");
}

/// `splice_memory_limit` bounds the kernel memory that stalled transfers pin in their pipes
/// (run as root, the kernel's own per-user limit does not): with room for one pipe, a second
/// stalled transfer copies through its user-space buffer instead, the refusal is counted, and
/// it splices again once the first one's pipe is given back. Every byte arrives, in order.
#[test]
fn splice_memory_limit_holds_stalled_transfers_to_their_copy_buffers() {
    const LEN: usize = 4 << 20;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy::with_config(
        &format!(
            "splice_pipe_size = \"1 MiB\"\nsplice_memory_limit = \"1 MiB\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[socket]\nsend_buffer_size = \"64 KiB\"\n{}",
            one_route("127.0.0.1:0", upstream.local_addr().unwrap(), "")
        ),
        1,
    );
    let admin = proxy.admin_addr();
    let text = http_get(admin, "/metrics").1;
    assert_eq!(
        metric(&text, "tcptap_splice_memory_limit_bytes"),
        Some((1 << 20) as f64)
    );
    // The first transfer stalls with its bytes in a pipe of 1 MiB.
    let first = bulk_sender(proxy.addr(), 0, LEN);
    let mut first_up = accept_within(&upstream, PROMPT);
    wait_metric(admin, "tcptap_splice_pipe_bytes", (1 << 20) as f64);
    // The second finds the limit reached: it copies, counted, and stalls too.
    let second = bulk_sender(proxy.addr(), 1, LEN);
    let mut second_up = accept_within(&upstream, PROMPT);
    wait_metric(admin, "tcptap_splice_refused_total", 1.0);
    let mut head = vec![0u8; 8 + 64 * 1024];
    second_up.read_exact(&mut head).unwrap();
    assert_eq!(head[..8], 1u64.to_le_bytes());
    let text = http_get(admin, "/metrics").1;
    assert_eq!(
        (
            metric(&text, "tcptap_splice_pipe_bytes"),
            metric(&text, "tcptap_kernel_pipes")
        ),
        (Some((1 << 20) as f64), Some(1.0)),
        "the second transfer got a pipe past the limit"
    );
    // The first one ends: its pipe goes back, and the second, read on, splices again.
    expect_bulk(&mut first_up, 0, LEN);
    drop((first.join().unwrap(), first_up));
    wait_metric(admin, "tcptap_connections_active{route=\"route0\"}", 1.0);
    let mut rest = vec![0u8; LEN - 64 * 1024];
    second_up
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    second_up.read_exact(&mut rest[..1 << 20]).unwrap();
    wait_metric(admin, "tcptap_splice_pipe_bytes", (1 << 20) as f64);
    second_up.read_exact(&mut rest[1 << 20..]).unwrap();
    let mut got = head[8..].to_vec();
    got.extend_from_slice(&rest);
    assert!(got == Pattern::bytes(1, LEN), "stream 1 differs");
    drop((second.join().unwrap(), second_up));
    assert_budget_whole(&proxy, "route0");
    wait_metric(admin, "tcptap_splice_pipe_bytes", 0.0);
}

/// Many bulk transfers both ways through a proxy whose open-file limit holds a few connections
/// and pipes at a time: clients take turns from the backlog, every byte arrives, nobody is reset,
/// and the budget is whole again afterwards.
#[test]
fn bulk_transfers_at_the_open_file_limit_take_turns_and_lose_nothing() {
    const CLIENTS: u64 = 12;
    const LEN: usize = 2 << 20;
    let echo = Upstream::echo();
    let proxy = Proxy::with_config_in(
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"bulk\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            echo.addr
        ),
        1,
        |cmd| limit_nofile(cmd, reserved_fds(true) + 2 * 6),
    );
    let admin = proxy.admin_addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let addr = proxy.addr();
            std::thread::spawn(move || {
                let mut c = connect(addr);
                let mut w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    send_pattern(&mut w, id, LEN).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let got = expect_pattern(&mut c, id, LEN);
                writer.join().unwrap();
                got
            })
        })
        .collect();
    for (id, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), LEN, "client {id}");
    }
    // Every connection ended with the client's clean close, none with a reset or refusal.
    wait_metric(
        admin,
        "tcptap_connections_closed_total{route=\"bulk\",reason=\"client_closed_first\"}",
        CLIENTS as f64,
    );
    assert_budget_whole(&proxy, "bulk");
}

#[test]
fn emfile_pauses_accepting_without_spinning() {
    let echo = Upstream::echo();
    let proxy = Proxy::forwarding_to(echo.addr);
    // Lower the running proxy's limit behind its back: it believes it may hold 10000 pairs.
    let old = set_nofile(proxy.pid(), 40);
    // Short of descriptors, the proxy resets a client it accepted but cannot connect upstream
    // for; that reset may already meet the connect. Those that connect are kept.
    let mut clients: Vec<_> = (0..60)
        .filter_map(|_| TcpStream::connect(proxy.addr()).ok())
        .collect();
    for c in clients.iter_mut() {
        let _ = c.write_all(b"?");
    }
    proxy.wait_log("pausing accepts", PROMPT);
    // Saturated: measure CPU over a second. A spinning accept loop would burn ~1 s.
    let cpu0 = proxy.cpu_time();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = proxy.cpu_time() - cpu0;
    assert!(
        used < t0.elapsed() / 3,
        "proxy used {used:?} CPU in {:?} while out of descriptors",
        t0.elapsed()
    );
    set_nofile(proxy.pid(), old.rlim_cur);
    clients.clear();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut c = connect(proxy.addr());
        c.write_all(b"ok").unwrap();
        match read_n(&mut c, 2, Duration::from_secs(3)) {
            Ok(b) => {
                assert_eq!(b, b"ok");
                break;
            }
            Err(e) if Instant::now() < deadline => eprintln!("not served yet: {e}"),
            Err(e) => panic!(
                "proxy did not recover after descriptors were freed: {e}\n{}",
                proxy.logs()
            ),
        }
    }
}

/// The tests below run proxies as `nobody`, whose pipes the kernel counts together: one at a
/// time.
static NOBODY_PIPES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A number from `/proc/sys/fs/NAME`.
fn fs_sysctl(name: &str) -> usize {
    let path = format!("/proc/sys/fs/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Starts tcptap on config `toml`, logging with `rust_log`, as `nobody` when the test runs as
/// root: its pipes then count against limits no other process uses.
fn start_unprivileged(toml: &str, rust_log: &str) -> Proxy {
    Proxy::with_config_in(toml, 1, |cmd| {
        cmd.env("RUST_LOG", rust_log);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.uid(65534).gid(65534);
        }
    })
}

/// Past the user's `pipe-user-pages-soft` (64 MiB of pipes for a user without
/// CAP_SYS_RESOURCE), the kernel shrinks new pipes to two pages. Those directions copy instead of
/// splicing through tiny pipes, and every byte still arrives.
#[test]
fn pipe_limit_of_the_user_falls_back_to_copying() {
    let _one_at_a_time = NOBODY_PIPES.lock().unwrap_or_else(|e| e.into_inner());
    let soft_pages = fs_sysctl("pipe-user-pages-soft");
    if soft_pages == 0 {
        eprintln!("pipe-user-pages-soft is 0 (no limit): nothing to run out of");
        return;
    }
    // Each busy direction holds a 1 MiB pipe (256 pages): this many run past the limit.
    let conns = soft_pages / 256 + 16;
    const LEN: usize = 2 << 20;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // Small fixed socket buffers toward the upstream, which does not read yet: the bytes behind
    // them stay in each direction's pipe, so every pipe is held at once. `splice_memory_limit`
    // (by default the same 64 MiB) is set out of the way: the kernel's limit is under test.
    let proxy = start_unprivileged(
        &format!(
            "splice_pipe_size = \"1 MiB\"\nsplice_memory_limit = \"1 GiB\"\n[socket]\nsend_buffer_size = \"64 KiB\"\n{}",
            one_route("127.0.0.1:0", upstream.local_addr().unwrap(), "")
        ),
        "info,tcptap::pipe=debug",
    );
    let writers: Vec<_> = (0..conns)
        .map(|i| {
            let mut c = connect(proxy.addr());
            std::thread::spawn(move || {
                c.write_all(&(i as u64).to_le_bytes()).unwrap();
                send_pattern(&mut c, i as u64, LEN).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                c
            })
        })
        .collect();
    let held: Vec<_> = (0..conns).map(|_| upstream.accept().unwrap().0).collect();
    let line = proxy.wait_log("no kernel pipe", Duration::from_secs(20));
    assert!(line.contains("granted a pipe of"), "{line}");
    // Now drain every connection and check each stream byte for byte.
    let readers: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut id = [0u8; 8];
                std::io::Read::read_exact(&mut s, &mut id).unwrap();
                expect_pattern(&mut s, u64::from_le_bytes(id), LEN)
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap().unwrap(), LEN);
    }
    for w in writers {
        w.join().unwrap();
    }
}

/// Without CAP_SYS_RESOURCE, a pipe size above pipe-max-size (1 MiB by default) is refused; the
/// proxy then asks for half until the kernel agrees, instead of falling to the 64 KiB default.
#[test]
fn refused_pipe_size_is_halved_until_granted() {
    let _one_at_a_time = NOBODY_PIPES.lock().unwrap_or_else(|e| e.into_inner());
    let max = fs_sysctl("pipe-max-size");
    let upstream = Upstream::echo();
    let proxy = start_unprivileged(
        &format!(
            "splice_pipe_size = \"{} KiB\"\n{}",
            4 * max / 1024,
            one_route("127.0.0.1:0", upstream.addr, "")
        ),
        "info,tcptap::splice=debug",
    );
    let mut c = connect(proxy.addr());
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            send_pattern(&mut c, 7, 8 << 20).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    assert_eq!(expect_pattern(&mut c, 7, 8 << 20).unwrap(), 8 << 20);
    writer.join().unwrap();
    let line = proxy.wait_log("kernel pipe of", Duration::from_secs(10));
    assert!(
        line.contains(&format!("kernel pipe of {max} bytes")),
        "expected pipes of pipe-max-size ({max} bytes): {line}"
    );
}

/// A client socket bound to `port` on 127.0.0.1 (inside the test's namespace, where the
/// ephemeral range is too small to give clients ports of their own).
fn connect_from(port: u16, to: SocketAddr) -> TcpStream {
    try_connect_from(port, to).unwrap_or_else(|e| panic!("connect from port {port} to {to}: {e}"))
}

fn try_connect_from(port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap_or_else(|e| panic!("bind client to port {port}: {e}"));
    s.connect_timeout(&to.into(), PROMPT)?;
    Ok(s.into())
}

/// Every local port toward the upstream is taken, by one open connection and the TIME_WAIT
/// sockets that clients closing first leave on the proxy's side. The next clients are reset,
/// the failures are counted as `no_local_port`, one warning says why and what to change, and the
/// open connection keeps flowing.
#[test]
fn local_port_exhaustion_is_explained_and_spares_open_connections() {
    let ns = NetNs::new();
    let echo = ns.run_inside(Upstream::echo);
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\n",
        echo.addr
    );
    let proxy = Proxy::with_config_cmd(ns.command(binary()), &toml, 1);
    let admin = proxy.admin_addr();
    // Listeners are bound; from here on, connects get one of four ports, reused only after
    // TIME_WAIT (60 s) ends.
    let to = proxy.addr();
    let series = "tcptap_upstream_connect_failures_total{route=\"r\",cause=\"no_local_port\"}";
    ns.run_inside(|| {
        // /proc/sys/net is the namespace of the thread that opens it.
        for (key, value) in [
            ("ip_local_port_range", "40000 40003"),
            ("tcp_tw_reuse", "0"),
        ] {
            let path = format!("/proc/sys/net/ipv4/{key}");
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
        let mut open = connect_from(50_000, to);
        open.write_all(b"open").unwrap();
        assert_eq!(read_n(&mut open, 4, PROMPT).unwrap(), b"open");
        // Three clients that close first: the proxy passes their FIN on, the upstream answers
        // with its own, and the proxy's upstream socket is left in TIME_WAIT.
        for i in 1..=3u16 {
            let mut c = connect_from(50_000 + i, to);
            c.write_all(b"bye").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), b"bye");
        }
        for (i, port) in [50_010u16, 50_011].into_iter().enumerate() {
            // The proxy may accept, fail its connect and reset the client before the client's
            // own connect has returned: then the reset is what that connect reports.
            match try_connect_from(port, to) {
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
                Ok(mut c) => {
                    let _ = c.write_all(b"lost");
                    let mut buf = [0u8; 16];
                    c.set_read_timeout(Some(PROMPT)).unwrap();
                    match c.read(&mut buf) {
                        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
                        Ok(n) => panic!(
                            "client {i} without a local port upstream got {n} bytes, no reset"
                        ),
                    }
                }
            }
            let (status, body) = http_get(admin, "/metrics");
            assert_eq!(status, 200);
            assert_eq!(metric(&body, series), Some(i as f64 + 1.0), "{body}");
        }
        // The open connection is untouched.
        open.write_all(b"still").unwrap();
        assert_eq!(read_n(&mut open, 5, PROMPT).unwrap(), b"still");
    });
    // Both failed connections' close lines are written (after the warning, which comes first),
    // and no other warning came with them.
    proxy.wait_count("Cannot assign requested address", 2, PROMPT);
    let line = proxy.wait_log("no free local port to connect to", PROMPT);
    assert!(
        line.contains(&echo.addr.to_string())
            && line.contains("(40000-40003)")
            && line.contains("TIME_WAIT")
            && line.contains("net.ipv4.tcp_tw_reuse=1"),
        "{line}"
    );
    assert_eq!(
        proxy.count_log("no free local port"),
        1,
        "one warning per 10 s:\n{}",
        proxy.logs()
    );
}

/// Listeners closed by a graceful shutdown while accepting was paused for lack of descriptors:
/// the pause must not keep waking the loop once it is over.
#[test]
fn a_drain_that_starts_while_accepts_are_paused_does_not_spin() {
    let echo = Upstream::echo();
    let mut proxy = Proxy::forwarding_to(echo.addr);
    let old = set_nofile(proxy.pid(), 40);
    // Short of descriptors, the proxy resets a client it accepted but cannot connect upstream
    // for; that reset may already meet the connect. Those that connect are kept.
    let mut clients: Vec<_> = (0..60)
        .filter_map(|_| TcpStream::connect(proxy.addr()).ok())
        .collect();
    for c in clients.iter_mut() {
        let _ = c.write_all(b"?");
    }
    proxy.wait_log("pausing accepts", PROMPT);
    proxy.signal(15);
    proxy.wait_log("shutting down: listeners closed", PROMPT);
    // The pause lasts at most a second; the drain (open connections) up to 30 s. Count the
    // threads' wake-ups from then on: a loop woken by a stale deadline sleeps and wakes about
    // a thousand times a second; an idle drain, a handful.
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(1200));
    let w0 = wakeups(proxy.pid());
    std::thread::sleep(Duration::from_millis(1000));
    let woke = wakeups(proxy.pid()) - w0;
    assert!(
        woke < 100,
        "{woke} wake-ups in a second of an idle drain (started {:?} ago)",
        t0.elapsed()
    );
    set_nofile(proxy.pid(), old.rlim_cur);
    clients.clear();
    assert!(proxy.wait_exit(Duration::from_secs(10)).success());
}

/// Context switches of every thread of process `pid` so far.
fn wakeups(pid: u32) -> u64 {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap();
            }
        }
    }
    n
}

/// Workers at their connection limit retry accepting every 20 ms (another worker may have freed
/// a slot); once a graceful shutdown has closed the listeners, they stop.
#[test]
fn a_drain_stops_the_retries_of_listeners_at_their_limit() {
    let echo = Upstream::echo();
    let config = format!(
        "workers = 2\nmax_connections = 1\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let mut held = connect(proxy.addr());
    held.write_all(b"held").unwrap();
    assert_eq!(read_n(&mut held, 4, PROMPT).unwrap(), b"held");
    // Clients beyond the limit wait in the backlogs: both workers are at the limit.
    let waiting: Vec<_> = (0..8).map(|_| connect(proxy.addr())).collect();
    proxy.signal(15);
    proxy.wait_log("shutting down: listeners closed", PROMPT);
    let w0 = wakeups(proxy.pid());
    std::thread::sleep(Duration::from_millis(1000));
    let woke = wakeups(proxy.pid()) - w0;
    assert!(woke < 20, "{woke} wake-ups in a second of an idle drain");
    drop(waiting);
    drop(held);
    assert!(proxy.wait_exit(Duration::from_secs(10)).success());
}
