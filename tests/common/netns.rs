//! Network namespaces for tests that need netfilter rules or addresses of their own.
//!
//! [`NetNs::new`] creates `tcptap-test-<pid>-<n>` with `ip netns add`, brings up `lo` in it and
//! gives `lo` the addresses 10.99.0.1/16 and fd99::1/64. On a loopback device the whole IPv4
//! prefix becomes local, so any 10.99.x.y can be bound or connected to; IPv6 addresses must be
//! added one by one ([`NetNs::add_addr`]). The namespace is deleted when the value is dropped,
//! even when the test fails.
//!
//! Sockets are created inside it on a thread that entered it with `setns(2)`
//! ([`NetNs::run_inside`]), which affects only that thread; programs run inside it through
//! `ip netns exec` ([`NetNs::command`]). All traffic and all rules stay in the namespace.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), `ip` (iproute2) and `iptables`/`ip6tables`
//! with the nat table. When any of this is missing the tests fail and name the command that
//! failed and its output; they never pass silently.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs a command and panics with the command line and its output if it cannot be run or fails.
pub fn run(program: &str, args: &[&str]) {
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
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace, brings up `lo` and adds 10.99.0.1/16 and fd99::1/64 to it.
    pub fn new() -> NetNs {
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
        ns.exec(&["ip", "addr", "add", "10.99.0.1/16", "dev", "lo"]);
        ns.add_addr("fd99::1/64");
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds an address to `lo` (IPv6 ones without duplicate address detection, so they are
    /// usable at once).
    pub fn add_addr(&self, cidr: &str) {
        if cidr.contains(':') {
            self.exec(&["ip", "-6", "addr", "add", cidr, "dev", "lo", "nodad"]);
        } else {
            self.exec(&["ip", "addr", "add", cidr, "dev", "lo"]);
        }
    }

    /// Runs a command inside the namespace; panics with the command and its output on failure.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// `ip` execs the program, so the child's PID is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Redirects TCP to `net` (IPv4 or IPv6 CIDR) to local `port`, in the nat OUTPUT chain.
    pub fn redirect(&self, net: &str, port: u16) {
        self.nat_redirect(&["-d", net], net.contains(':'), port);
    }

    /// Redirects TCP from the source address `src` to `net` to local `port`, in the nat OUTPUT
    /// chain. Connections from other sources (the proxy's own upstream connects) pass as they
    /// are.
    pub fn redirect_from(&self, src: &str, net: &str, port: u16) {
        self.nat_redirect(&["-s", src, "-d", net], net.contains(':'), port);
    }

    /// Steers TCP from `src` to `net` to the transparent listener on `on_ip`:`port` with the
    /// mangle PREROUTING `TPROXY` target (locally sent packets pass PREROUTING as they come back
    /// in on `lo`; the destinations are local already, so no policy routing is needed).
    pub fn tproxy_from(&self, src: &str, net: &str, on_ip: &str, port: u16) {
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
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-s",
            src,
            "-d",
            net,
            "-j",
            "TPROXY",
            "--on-ip",
            on_ip,
            "--on-port",
            &port,
            "--tproxy-mark",
            "0x1/0x1",
        ]);
    }

    fn nat_redirect(&self, matches: &[&str], ipv6: bool, port: u16) {
        let tool = if ipv6 { "ip6tables" } else { "iptables" };
        let port = port.to_string();
        let mut args = vec![tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp"];
        args.extend_from_slice(matches);
        args.extend_from_slice(&["-j", "REDIRECT", "--to-ports", &port]);
        self.exec(&args);
    }

    /// Runs `f` on a new thread that has entered the namespace; sockets it creates live there,
    /// and so do those of threads it spawns.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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
