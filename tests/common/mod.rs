//! Shared test fixtures: run the real `tcptap` binary, fake upstreams, deterministic byte streams,
//! reads with deadlines, and /proc probes (RSS, open fds, CLOSE_WAIT sockets).
#![allow(dead_code)]

pub mod netns;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Generous bound for anything that should happen "promptly" on a loaded 2-core machine.
pub const PROMPT: Duration = Duration::from_secs(5);
/// Time allowed for tap output to appear, or for a proxy with a tap to exit (it flushes the tap
/// first): the tap writer runs at low priority, slow on a machine busy with other tests.
pub const TAP_FLUSH: Duration = Duration::from_secs(30);

/// A deterministic byte stream: the receiver regenerates it to check every byte.
#[derive(Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tcptap-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    /// `--workers` for proxies started on this thread (each test runs on its own thread).
    static WORKERS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every proxy it starts using `n` event loops.
pub fn with_workers<R>(n: usize, f: impl FnOnce() -> R) -> R {
    WORKERS.with(|w| w.set(Some(n)));
    let r = f();
    WORKERS.with(|w| w.set(None));
    r
}

/// The event loops of the proxies this thread starts (see [`with_workers`]).
pub fn workers() -> usize {
    WORKERS.with(|w| w.get()).unwrap_or(1)
}

/// Declares, in a module `workers2`, a copy of each named test that runs with two workers.
#[macro_export]
macro_rules! also_with_two_workers {
    ($($name:ident),* $(,)?) => {
        mod workers2 {
            $(
                #[test]
                fn $name() {
                    $crate::common::with_workers(2, super::$name)
                }
            )*
        }
    };
}

/// The real binary, running as a child process.
pub struct Proxy {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    /// While true, the thread reading the proxy's stderr stops reading (see `stall_logs`).
    stalled: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// The read end of the proxy's stderr pipe (owned by the reading thread).
    stderr_fd: std::os::fd::RawFd,
    _dir: Option<TempDir>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tcptap")
}

impl Proxy {
    /// Starts `tcptap` with `args` and waits for `routes` "listening on" lines.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S], routes: usize) -> Proxy {
        Proxy::start_in(args, routes, None, |_| {})
    }

    /// Starts `tcptap --listen 127.0.0.1:0 --upstream <upstream>`: one route, no config file.
    pub fn forwarding_to(upstream: SocketAddr) -> Proxy {
        Proxy::start(
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &upstream.to_string(),
            ],
            1,
        )
    }

    /// Starts `tcptap --config <file>` with `toml` as the file.
    pub fn with_config(toml: &str, routes: usize) -> Proxy {
        Proxy::with_config_in(toml, routes, |_| {})
    }

    /// Like `with_config`, with a hook to adjust the command (environment, user, limits).
    pub fn with_config_in(toml: &str, routes: usize, adjust: impl FnOnce(&mut Command)) -> Proxy {
        let dir = TempDir::new("cfg");
        let path = dir.path("proxy.toml");
        std::fs::write(&path, toml).expect("write config");
        Proxy::start_in(
            &["--config", path.to_str().unwrap()],
            routes,
            Some(dir),
            adjust,
        )
    }

    /// Like `start`, with a hook to adjust the command (environment, limits).
    pub fn start_in<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        routes: usize,
        dir: Option<TempDir>,
        adjust: impl FnOnce(&mut Command),
    ) -> Proxy {
        let mut cmd = Command::new(binary());
        cmd.args(args);
        Proxy::spawn(cmd, routes, dir, adjust)
    }

    /// Starts `cmd` + `--config <file>` with `toml` as the file; `cmd` runs the binary, possibly
    /// through a wrapper (`ip netns exec NS tcptap`).
    pub fn with_config_cmd(mut cmd: Command, toml: &str, routes: usize) -> Proxy {
        let dir = TempDir::new("cfg");
        let path = dir.path("proxy.toml");
        std::fs::write(&path, toml).expect("write config");
        cmd.arg("--config").arg(&path);
        Proxy::start_cmd(cmd, routes, Some(dir))
    }

    /// Starts `cmd`, which runs the binary with its arguments (possibly through a wrapper that
    /// execs it, so the child's PID is the proxy's), and waits for `routes` "listening on" lines.
    pub fn start_cmd(cmd: Command, routes: usize, dir: Option<TempDir>) -> Proxy {
        Proxy::spawn(cmd, routes, dir, |_| {})
    }

    fn spawn(
        mut cmd: Command,
        routes: usize,
        dir: Option<TempDir>,
        adjust: impl FnOnce(&mut Command),
    ) -> Proxy {
        if let Some(n) = WORKERS.with(|w| w.get()) {
            cmd.args(["--workers", &n.to_string()]);
        }
        cmd.env(
            "RUST_LOG",
            std::env::var("TCPTAP_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let stderr_fd = std::os::fd::AsRawFd::as_raw_fd(&stderr);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        let gate = stalled.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            loop {
                {
                    let (stalled, resumed) = &*gate;
                    let mut s = stalled.lock().unwrap();
                    while *s {
                        s = resumed.wait(s).unwrap();
                    }
                }
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.ends_with('\n') {
                    line.pop();
                }
                if std::env::var_os("TCPTAP_TEST_ECHO").is_some() {
                    eprintln!("proxy: {line}");
                }
                if let Some(pos) = line
                    .find("listening on ")
                    .filter(|_| line.contains("route `"))
                {
                    let addr = line[pos + 13..].split(' ').next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut addrs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while addrs.len() < routes {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(a) => addrs.push(a.parse().expect("listen address in log")),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "tcptap did not start; log:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
        }
        Proxy {
            child,
            addrs,
            logs,
            stalled,
            stderr_fd,
            _dir: dir,
        }
    }

    /// Stops reading the proxy's stderr (after at most the line being read now) and shrinks its
    /// pipe to `pipe_size` bytes: what a stalled log collector looks like to the proxy.
    pub fn stall_logs(&self, pipe_size: usize) {
        *self.stalled.0.lock().unwrap() = true;
        // SAFETY: F_SETPIPE_SZ on the descriptor the reading thread holds until EOF, and the proxy
        // (which holds the write end) is running: callers stall the log of a live proxy.
        let rc =
            unsafe { libc::fcntl(self.stderr_fd, libc::F_SETPIPE_SZ, pipe_size as libc::c_int) };
        assert!(rc >= 0, "F_SETPIPE_SZ: {}", io::Error::last_os_error());
    }

    /// Reads the proxy's stderr again.
    pub fn resume_logs(&self) {
        *self.stalled.0.lock().unwrap() = false;
        self.stalled.1.notify_all();
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The address route `name` listens on, from its log line (the last one, after a reload).
    pub fn route_addr(&self, name: &str) -> SocketAddr {
        let line = self.wait_log(&format!("route `{name}`: listening on "), PROMPT);
        let rest = &line[line.find("listening on ").unwrap() + 13..];
        rest.split(' ').next().unwrap().parse().unwrap()
    }

    /// The admin endpoint's address, from its startup log line.
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self.wait_log("admin endpoint listening on http://", PROMPT);
        let rest = &line[line.find("http://").unwrap() + 7..];
        rest.split('/')
            .next()
            .unwrap()
            .parse()
            .expect("admin address")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line with {needle:?} within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until exactly `n` log lines contain `needle` (fails if more appear or time runs out).
    pub fn wait_count(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count_log(needle);
            if c == n {
                return;
            }
            if c > n || Instant::now() > deadline {
                panic!(
                    "{c} log lines with {needle:?}, expected {n}; log:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        let rc = unsafe { libc_kill(self.pid() as i32, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "tcptap did not exit within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time (user + system) consumed so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
    }

    /// Waits until the open fd count is at most `target`.
    pub fn wait_fds_at_most(&self, target: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.fd_count();
            if n <= target {
                return;
            }
            if Instant::now() > deadline {
                panic!("proxy still has {n} fds open (expected <= {target})");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGTERM: i32 = 15;
pub const SIGINT: i32 = 2;

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// TCP sockets in CLOSE_WAIT whose local port is one of `ports` (from /proc/net/tcp and tcp6).
pub fn close_wait_on(ports: &[u16]) -> usize {
    let mut n = 0;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 || cols[3] != "08" {
                continue;
            }
            let port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if port.is_some_and(|p| ports.contains(&p)) {
                n += 1;
            }
        }
    }
    n
}

/// A port nothing listens on right now (bound to 127.0.0.1:0, then closed), for a config that
/// must name its port (a route's listen address that a reload compares).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A connect that does not ask `SO_ERROR` once the handshake is done. A server that greets and
/// resets at once may have done both before the connecting thread looks, and `connect_timeout`
/// would report that reset instead of the connection, whose greeting is still there to read
/// (ahead of the reset, as a read shows them).
pub fn connect_for_greeting(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    s.set_nonblocking(true).unwrap();
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&s),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            let n = unsafe { libc::poll(&mut pfd, 1, PROMPT.as_millis() as i32) };
            assert_eq!(n, 1, "connect to {addr} did not complete");
        }
        Err(e) => panic!("connect to {addr}: {e}"),
    }
    s.set_nonblocking(false).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, PROMPT).expect("connect through proxy");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until EOF, failing the test after `timeout`.
pub fn read_to_end(s: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no EOF after {} bytes", out.len()),
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no EOF after {} bytes", out.len()),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly `n` bytes or fails after `timeout`.
pub fn read_n(s: &mut TcpStream, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0; n];
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("got {got} of {n} bytes"),
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut out[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {n}"),
                ));
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // SO_RCVTIMEO expiring shows up as EAGAIN.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("got {got} of {n} bytes"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Waits until the peer ends the stream: Ok(bytes) on EOF, Err on reset; panics after `timeout`.
pub fn wait_closed(s: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    read_to_end(s, timeout)
}

/// Sends `len` bytes of `Pattern(seed)` in chunks.
pub fn send_pattern(s: &mut impl Write, seed: u64, len: usize) -> io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        // fill() works in 8-byte steps: keep chunk sizes multiples of 8 except the last.
        s.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(())
}

/// Reads until EOF and checks every byte against `Pattern(seed)`; returns the count.
pub fn expect_pattern(s: &mut impl Read, seed: u64, len: usize) -> io::Result<usize> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0; 256 * 1024];
    let mut expect = vec![0; 256 * 1024];
    let mut exp_have = 0usize; // bytes of `expect` not yet compared
    let mut exp_pos = 0usize;
    let mut total = 0usize;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            if exp_have == 0 {
                let chunk = (len - total - off).clamp(0, expect.len());
                if chunk == 0 {
                    return Err(io::Error::other(format!("more than {len} bytes received")));
                }
                p.fill(&mut expect[..chunk]);
                exp_have = chunk;
                exp_pos = 0;
            }
            let k = (n - off).min(exp_have);
            if buf[off..off + k] != expect[exp_pos..exp_pos + k] {
                return Err(io::Error::other(format!(
                    "byte mismatch near offset {}",
                    total + off
                )));
            }
            off += k;
            exp_pos += k;
            exp_have -= k;
        }
        total += n;
    }
    if total != len {
        return Err(io::Error::other(format!(
            "got {total} bytes, expected {len}"
        )));
    }
    Ok(total)
}

/// A fake upstream: a listener on 127.0.0.1:0 and a thread per connection running `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
}

impl Upstream {
    pub fn start<F>(handler: F) -> Upstream
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Upstream::start_on("127.0.0.1:0", handler)
    }

    pub fn start_on<F>(bind: &str, handler: F) -> Upstream
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(bind).expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let handler = Arc::new(handler);
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let h = handler.clone();
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || h(s))
                    .expect("spawn upstream handler");
            }
        });
        Upstream { addr, accepted }
    }

    /// Echoes until EOF, then shuts its write side.
    pub fn echo() -> Upstream {
        Upstream::start(|mut s| {
            let mut buf = vec![0; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    }
}

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: tcptap\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let raw = read_to_end(&mut s, PROMPT).expect("HTTP response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in a Prometheus exposition, e.g. `metric(&text, "x_total{route=\"a\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// Polls the admin endpoint's `/metrics` until `series` has `value` (the loops update their
/// numbers as they go); returns that exposition.
pub fn wait_metric(admin: SocketAddr, series: &str, value: f64) -> String {
    let deadline = Instant::now() + PROMPT;
    loop {
        let (status, body) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        if metric(&body, series) == Some(value) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {:?}, expected {value}:\n{body}",
            metric(&body, series)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// An address where nothing listens (bound, then closed).
pub fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener whose accept queue is full: it drops SYNs, so connects to `addr` hang.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let fillers: Vec<Socket> = (0..8)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = s.connect(&addr.into());
                s
            })
            .collect();
        // The fillers' handshakes complete (or their SYNs are dropped) at once on loopback;
        // give them a moment so the next SYN finds the queue full.
        std::thread::sleep(Duration::from_millis(100));
        Blackhole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }

    /// The local addresses of the connections that fill the queue.
    pub fn filler_addrs(&self) -> Vec<SocketAddr> {
        (self._fillers.iter())
            .filter_map(|s| s.local_addr().ok()?.as_socket())
            .collect()
    }

    /// Empties the queue and returns the first connection that is not a filler (one whose
    /// SYN was dropped while the queue was full, and sent again): fails after `timeout`.
    pub fn accept_other(&self, timeout: Duration) -> TcpStream {
        let fillers = self.filler_addrs();
        let listener = self.listener();
        let deadline = Instant::now() + timeout;
        loop {
            assert!(
                Instant::now() < deadline,
                "no other connection to {}",
                self.addr
            );
            let (s, from) = listener.accept().unwrap();
            if !fillers.contains(&from) {
                return s;
            }
        }
    }

    /// The listener, blocking, to accept from it.
    pub fn listener(&self) -> TcpListener {
        let l: TcpListener = self._listener.try_clone().unwrap().into();
        l.set_nonblocking(false).unwrap();
        l
    }
}

/// Asserts that the proxy keeps the quiet connection `c` open for `quiet` (a read that times
/// out, neither EOF nor a reset), then that a round trip through it to an echo upstream works.
pub fn assert_kept_open(c: &mut TcpStream, quiet: Duration, logs: impl Fn() -> String) {
    c.set_read_timeout(Some(quiet)).unwrap();
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "the proxy ended a quiet connection within {quiet:?}: {other:?}\n{}",
            logs()
        ),
    }
    c.set_read_timeout(None).unwrap();
    c.write_all(b"ping").unwrap();
    match read_n(c, 4, PROMPT) {
        Ok(got) => assert_eq!(got, b"ping", "{}", logs()),
        Err(e) => panic!("no echo after the quiet time: {e}\n{}", logs()),
    }
}

/// A minimal config for one route.
pub fn one_route(listen: &str, upstream: SocketAddr, extra: &str) -> String {
    format!("{extra}\n[[route]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n")
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

/// The state letter of every thread of `pid` (`/proc/PID/task/*/stat`).
pub fn thread_states(pid: u32) -> Vec<char> {
    let mut states = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
        if let Some(c) = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim().chars().next())
        {
            states.push(c);
        }
    }
    states
}

/// Runs `f` while the proxy is stopped (SIGSTOP), so that what `f` sends is all queued at the
/// proxy's socket before it sees any of it.
pub fn while_stopped(proxy: &Proxy, f: impl FnOnce()) {
    proxy.signal(libc::SIGSTOP);
    let deadline = Instant::now() + PROMPT;
    while !thread_states(proxy.pid()).iter().all(|&s| s == 'T') {
        assert!(Instant::now() < deadline, "proxy did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
    f();
    proxy.signal(libc::SIGCONT);
}

/// Sets process `pid`'s file size limit (`ulimit -f`, in bytes); it can be raised again.
pub fn set_fsize(pid: u32, limit: u64) {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with a valid pointer.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Opens the FIFO `path` for reading without waiting for a writer.
pub fn open_fifo_reader(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}
