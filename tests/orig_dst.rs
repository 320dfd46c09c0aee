//! End-to-end check of `orig_dst::original_destination` against real netfilter redirects.
//!
//! Each test creates its own network namespace (`ip netns add tcptap-test-<pid>-<n>`), brings
//! up `lo` in it, gives `lo` addresses from 10.99.0.0/16 and fd99::/64, and installs
//! `iptables`/`ip6tables` `nat OUTPUT ... REDIRECT` rules there. The sockets are created on a
//! thread that has entered the namespace with `setns(2)` (which affects only that thread), so
//! all traffic and all rules stay inside the namespace, and the namespace is deleted by a guard
//! even when the test fails.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2), and `iptables`/`ip6tables`
//! with the nat table. When any of this is missing the tests fail and say which command
//! failed; they do not pass silently.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tcptap::orig_dst::original_destination;

/// Where the client believes it connects; nothing listens there.
const TARGET_V4: &str = "10.99.0.7:8080";
const TARGET_V6: &str = "[fd99::7]:8080";

/// Runs a command and panics with its output if it cannot be run or fails.
fn run(program: &str, args: &[&str]) {
    let shown = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{shown}`: {e} (the test needs iproute2 and iptables installed)")
        });
    assert!(
        output.status.success(),
        "`{shown}` failed ({}): {}{}(the test needs root, iproute2 and iptables with the nat table)",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

/// A network namespace that exists as long as this value does.
struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace, brings up `lo` and adds the test addresses to it.
    fn new() -> NetNs {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tcptap-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        // From here on the guard deletes the namespace, whatever happens.
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // On a loopback device the whole prefix becomes local, so 10.99.0.7 is routable.
        ns.exec(&["ip", "addr", "add", "10.99.0.1/16", "dev", "lo"]);
        ns.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            "fd99::1/64",
            "dev",
            "lo",
            "nodad",
        ]);
        ns
    }

    /// Runs a command inside the namespace.
    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Redirects TCP to `net` (IPv4 or IPv6 CIDR) to local `port`, in the nat OUTPUT chain.
    fn redirect(&self, net: &str, port: u16) {
        let tool = if net.contains(':') {
            "ip6tables"
        } else {
            "iptables"
        };
        let port = port.to_string();
        self.exec(&[
            tool,
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            net,
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]);
    }

    /// Runs `f` on a new thread that has entered the namespace; sockets it creates live there.
    fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let inside = scope.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // SAFETY: setns only reads the descriptor, which stays open for the call; it
                // changes the network namespace of the calling thread alone.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns({path}): {}", io::Error::last_os_error());
                f()
            });
            match inside.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(deleted, Ok(status) if status.success()) {
            eprintln!(
                "could not delete network namespace {}: {deleted:?}",
                self.name
            );
        }
    }
}

/// Connects to `target` (which the namespace redirects to `listener`), accepts, checks that
/// the bytes flow, and returns what `original_destination` says about the accepted socket.
fn connect_and_ask(listener: &TcpListener, target: SocketAddr) -> io::Result<SocketAddr> {
    // A bound on the handshake, so a missing redirect fails the test instead of hanging it.
    let mut client = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    let (mut accepted, _) = listener.accept()?;
    client.write_all(b"ping")?;
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got)?;
    assert_eq!(&got, b"ping");
    original_destination(&accepted)
}

#[test]
fn ipv4_redirect_reports_the_original_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V4.parse().unwrap();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        ns.redirect("10.99.0.0/16", listener.local_addr().unwrap().port());
        connect_and_ask(&listener, target)
    });
    assert_eq!(got.unwrap(), target);
}

#[test]
fn ipv6_redirect_reports_the_original_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V6.parse().unwrap();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        ns.redirect("fd99::/64", listener.local_addr().unwrap().port());
        connect_and_ask(&listener, target)
    });
    assert_eq!(got.unwrap(), target);
}

#[test]
fn ipv4_client_on_dual_stack_listener_reports_ipv4_destination() {
    let ns = NetNs::new();
    let target: SocketAddr = TARGET_V4.parse().unwrap();
    let (got, local) = ns.run_inside(|| {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
        socket.set_only_v6(false).unwrap();
        socket
            .bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())
            .unwrap();
        socket.listen(8).unwrap();
        let listener: TcpListener = socket.into();
        ns.redirect("10.99.0.0/16", listener.local_addr().unwrap().port());

        let client = TcpStream::connect_timeout(&target, Duration::from_secs(10)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let local = accepted.local_addr().unwrap();
        drop(client);
        (original_destination(&accepted), local)
    });
    // The accepted socket is IPv6 with a v4-mapped local address ...
    assert!(
        matches!(local, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some()),
        "{local}"
    );
    // ... and the answer is the plain IPv4 destination.
    assert_eq!(got.unwrap(), target);
}

#[test]
fn connection_that_was_not_redirected_reports_its_own_address() {
    let ns = NetNs::new();
    let (v4, v6) = ns.run_inside(|| {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        // Rules for other addresses make connection tracking active in the namespace.
        ns.redirect("10.99.0.0/16", v4.local_addr().unwrap().port());
        ns.redirect("fd99::/64", v6.local_addr().unwrap().port());
        (
            (
                connect_and_ask(&v4, v4.local_addr().unwrap()),
                v4.local_addr().unwrap(),
            ),
            (
                connect_and_ask(&v6, v6.local_addr().unwrap()),
                v6.local_addr().unwrap(),
            ),
        )
    });
    // Connection tracking knows these connections, unchanged: the answer is the listener's own
    // address, which callers must recognize as "not redirected".
    assert_eq!(v4.0.unwrap(), v4.1);
    assert_eq!(v6.0.unwrap(), v6.1);
}

#[test]
fn without_connection_tracking_the_answer_is_an_error() {
    let ns = NetNs::new();
    let got = ns.run_inside(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        connect_and_ask(&listener, listener.local_addr().unwrap())
    });
    // Since Linux 4.10 connection tracking only runs in a namespace once a rule needs it.
    let err = got.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}
