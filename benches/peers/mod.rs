//! The proxies under comparison and the external servers, as child processes.
//!
//! Every child is started from the main thread with `PR_SET_PDEATHSIG`
//! (SIGKILL), owned by a [`ProcGuard`] that stops it by PID on drop, listens on
//! 127.0.0.1 only, and gets its port either from binding port 0 (tcptap
//! reports the address it bound) or from [`free_port`](crate::loadgen::free_port).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::loadgen::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Temp dir and process guard

/// A private directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> io::Result<Self> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("{tag}-{}-{seq}", std::process::id()));
        // A leftover from a crashed run with the same PID is stale: start afresh.
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 1 s) by PID
/// when dropped.
pub struct ProcGuard {
    pub name: String,
    child: Child,
    /// Where its stderr (and stdout) went, for error messages.
    pub log: PathBuf,
}

impl ProcGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited already? Returns the status text if so.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    pub fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Asks the child to stop (SIGTERM, a graceful shutdown) and waits for it as [`wait_exit`]
    /// does.
    ///
    /// [`wait_exit`]: ProcGuard::wait_exit
    pub fn terminate(self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on the PID of our own child, which the guard has not reaped.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Wait (bounded) for the child to exit on its own; kill it after `timeout`.
    pub fn wait_exit(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None // Drop kills it.
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on the PID of our own, not yet reaped child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `cmd` with stdout+stderr appended to `log` (unless the caller set
/// them), and with SIGKILL as its parent-death signal so that nothing
/// outlives the benchmark even if it is killed.
pub fn spawn(name: &str, mut cmd: Command, log: &Path, piped_stderr: bool) -> io::Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?);
    if piped_stderr {
        cmd.stderr(Stdio::piped());
    } else {
        cmd.stderr(out);
    }
    die_with_parent(&mut cmd);
    cmd.spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{name}: cannot start: {e}")))
}

// ---------------------------------------------------------------------------
// /proc helpers

/// Is something listening on 127.0.0.1:port (or a wildcard address)?
/// Reads /proc/net/tcp{,6}, so that readiness checks open no connection
/// (iperf3 -s -1 or socat would take a probe for real traffic).
pub fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = fs::read_to_string(f) else {
            continue;
        };
        for line in s.lines().skip(1) {
            let mut it = line.split_whitespace();
            let (_, Some(local), _, Some(st)) = (it.next(), it.next(), it.next(), it.next()) else {
                continue;
            };
            if st == "0A" && local.ends_with(&want) {
                return true;
            }
        }
    }
    false
}

/// Wait until `port` is listening, failing early if the child exits.
pub fn wait_listening(g: &mut ProcGuard, port: u16) -> io::Result<()> {
    let end = Instant::now() + START_TIMEOUT;
    loop {
        if is_listening(port) {
            return Ok(());
        }
        if let Some(st) = g.exited() {
            return Err(io::Error::other(format!(
                "{} exited during start-up ({st}):\n{}",
                g.name,
                g.log_tail()
            )));
        }
        if Instant::now() > end {
            return Err(io::Error::other(format!(
                "{} not listening on port {port} after {START_TIMEOUT:?}:\n{}",
                g.name,
                g.log_tail()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok())) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Fields of /proc/PID/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and all of its live descendants (bounded depth).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut frontier = vec![pid];
    for _ in 0..4 {
        let next: Vec<u32> = frontier.iter().flat_map(|&p| children_of(p)).collect();
        if next.is_empty() {
            break;
        }
        all.extend(&next);
        frontier = next;
    }
    all
}

/// CPU time of `pid` and its descendants in milliseconds: utime+stime of each live process,
/// plus cutime+cstime, the children it has already reaped (socat's per-connection forks).
pub fn cpu_ms_tree(pid: u32) -> f64 {
    let (user, kernel) = cpu_split_ms_tree(pid);
    user + kernel
}

/// [`cpu_ms_tree`] split into (user, kernel) milliseconds: utime+cutime and stime+cstime.
pub fn cpu_split_ms_tree(pid: u32) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let field =
        |f: &[String], i: usize| -> u64 { f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
    let (user, kernel) = process_tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| (field(&f, 11) + field(&f, 13), field(&f, 12) + field(&f, 14)))
        .fold((0, 0), |(u, k), (du, dk)| (u + du, k + dk));
    let ms = |ticks: u64| ticks as f64 * 1000.0 / hz;
    (ms(user), ms(kernel))
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// (VmRSS, Pss) in KiB of one process.
fn mem_kib_one(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some((kib_field(&status, "VmRSS:")?, kib_field(&rollup, "Pss:")?))
}

/// (VmRSS, Pss) in KiB of `pid` and its live descendants (nginx's workers, say), summed.
pub fn mem_kib(pid: u32) -> Option<(u64, u64)> {
    let (rss, pss) = mem_kib_one(pid)?;
    Some(
        process_tree(pid)
            .into_iter()
            .skip(1)
            .filter_map(mem_kib_one)
            .fold((rss, pss), |(r, p), (r1, p1)| (r + r1, p + p1)),
    )
}

/// Find an executable on PATH, like `which`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// First line of `prog ARGS` (stdout or stderr), for the results header.
pub fn version_line(prog: &Path, args: &[&str]) -> String {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_owned()
        }
        Err(e) => format!("? ({e})"),
    }
}

// ---------------------------------------------------------------------------
// Targets

#[derive(Clone, Debug)]
pub enum Kind {
    /// The client connects straight to the upstream.
    Direct,
    /// The tcptap release binary, with extra command-line arguments.
    /// `{tmp}` in an argument is replaced by a fresh per-run directory.
    Tcptap {
        bin: PathBuf,
        args: Vec<String>,
    },
    /// haproxy `mode tcp` with `nbthread threads`; `splice` forces `option splice-request` and
    /// `option splice-response` (zero-copy, off by default in haproxy); `busy` sets
    /// `busy-polling` (its threads never sleep in the poller); `defer` binds with `defer-accept`
    /// (`TCP_DEFER_ACCEPT`).
    Haproxy {
        bin: PathBuf,
        threads: u32,
        splice: bool,
        busy: bool,
        defer: bool,
    },
    Socat {
        bin: PathBuf,
    },
    /// nginx `stream` with `worker_processes workers` (a master process when more than one).
    Nginx {
        bin: PathBuf,
        module: Option<PathBuf>,
        workers: u32,
    },
}

#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
}

/// A started target: where clients connect, and the proxy process if any.
pub struct Running {
    pub addr: SocketAddr,
    pub proc: Option<ProcGuard>,
    _dir: Option<TempDir>,
}

impl Running {
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(ProcGuard::pid)
    }

    /// Error if the proxy process died (e.g. crashed under load).
    pub fn check_alive(&mut self) -> io::Result<()> {
        if let Some(g) = self.proc.as_mut() {
            if let Some(st) = g.exited() {
                return Err(io::Error::other(format!(
                    "{} exited ({st}):\n{}",
                    g.name,
                    g.log_tail()
                )));
            }
        }
        Ok(())
    }
}

impl Target {
    pub fn is_tcptap(&self) -> bool {
        matches!(self.kind, Kind::Tcptap { .. })
    }

    /// Why this target cannot hold `n` idle connections, if it cannot.
    /// A tcptap whose tap writes to a file (not to a FIFO nobody reads): it logs what the tap
    /// wrote and dropped when it exits.
    pub fn taps_to_a_file(&self) -> bool {
        match &self.kind {
            Kind::Tcptap { args, .. } => {
                args.iter().any(|a| a == "--tap-pcap" || a == "--tap-log")
                    && !args.iter().any(|a| a == "{fifo}")
            }
            _ => false,
        }
    }

    pub fn idle_unsupported(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Socat { .. } => Some("socat forks one process per connection"),
            _ => None,
        }
    }

    /// Start the target in front of `upstream`. `max_conns` sizes the
    /// connection limits of the peers that have one.
    pub fn start(&self, upstream: SocketAddr, max_conns: usize) -> io::Result<Running> {
        let mut last_err = None;
        // Peers get a port that was free a moment ago; retry if it was taken.
        for _ in 0..3 {
            match self.try_start(upstream, max_conns) {
                Ok(r) => return Ok(r),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("start failed")))
    }

    fn try_start(&self, upstream: SocketAddr, max_conns: usize) -> io::Result<Running> {
        if let Kind::Direct = self.kind {
            return Ok(Running {
                addr: upstream,
                proc: None,
                _dir: None,
            });
        }
        let dir = TempDir::new(&format!("tcptap-bench-{}", self.name.replace('+', "-")))?;
        let log = dir.0.join("stderr.log");
        let (addr, guard) = match &self.kind {
            Kind::Direct => unreachable!(),
            Kind::Tcptap { bin, args } => {
                start_tcptap(&self.name, &[], bin, args, upstream, &dir.0)?
            }
            Kind::Haproxy {
                bin,
                threads,
                splice,
                busy,
                defer,
            } => {
                // A few pipes are enough for the bulk rows; haproxy's default (maxconn / 4)
                // would need more descriptors than RLIMIT_NOFILE allows with the idle row's
                // maxconn, and haproxy refuses to start.
                let (splice, maxpipes) = if *splice {
                    (
                        "  option splice-request\n  option splice-response\n",
                        "  maxpipes 128\n",
                    )
                } else {
                    ("", "")
                };
                let busy = if *busy { "  busy-polling\n" } else { "" };
                let defer = if *defer { " defer-accept" } else { "" };
                let port = free_port()?;
                let cfg = dir.0.join("haproxy.cfg");
                fs::write(
                    &cfg,
                    format!(
                        "global\n  nbthread {threads}\n  maxconn {max_conns}\n{maxpipes}{busy}\n\
                         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n{splice}\n\
                         frontend fe\n  bind 127.0.0.1:{port}{defer}\n  default_backend be\n\n\
                         backend be\n  server up {upstream}\n"
                    ),
                )?;
                let mut cmd = Command::new(bin);
                cmd.arg("-f").arg(&cfg).arg("-db");
                let mut g = guard(&self.name, cmd, &log)?;
                wait_listening(&mut g, port)?;
                (SocketAddr::from(([127, 0, 0, 1], port)), g)
            }
            Kind::Socat { bin } => {
                let port = free_port()?;
                let mut cmd = Command::new(bin);
                cmd.arg(format!(
                    "TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,backlog=1024"
                ))
                .arg(format!("TCP:{upstream}"));
                let mut g = guard(&self.name, cmd, &log)?;
                wait_listening(&mut g, port)?;
                (SocketAddr::from(([127, 0, 0, 1], port)), g)
            }
            Kind::Nginx {
                bin,
                module,
                workers,
            } => {
                let port = free_port()?;
                // One worker runs in the foreground process itself; several need the master,
                // and each gets its own listener (reuseport), as tcptap's workers do.
                let (master, reuseport) = if *workers > 1 {
                    ("on", " reuseport")
                } else {
                    ("off", "")
                };
                let p = &dir.0;
                let load = module
                    .as_ref()
                    .map(|m| format!("load_module {};\n", m.display()))
                    .unwrap_or_default();
                let conf = p.join("nginx.conf");
                fs::write(
                    &conf,
                    format!(
                        "{load}daemon off;\nmaster_process {master};\nworker_processes {workers};\n\
                         pid {pid};\nerror_log {err} warn;\n\
                         events {{ worker_connections {wc}; }}\n\
                         stream {{\n  server {{\n    listen 127.0.0.1:{port}{reuseport};\n    proxy_pass {upstream};\n  }}\n}}\n",
                        pid = p.join("nginx.pid").display(),
                        err = log.display(),
                        wc = max_conns * 2 + 64,
                    ),
                )?;
                let mut cmd = Command::new(bin);
                cmd.arg("-p")
                    .arg(p)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg(&log);
                let mut g = guard(&self.name, cmd, &log)?;
                wait_listening(&mut g, port)?;
                (SocketAddr::from(([127, 0, 0, 1], port)), g)
            }
        };
        Ok(Running {
            addr,
            proc: Some(guard),
            _dir: Some(dir),
        })
    }
}

fn guard(name: &str, cmd: Command, log: &Path) -> io::Result<ProcGuard> {
    let child = spawn(name, cmd, log, false)?;
    Ok(ProcGuard {
        name: name.to_owned(),
        child,
        log: log.to_owned(),
    })
}

/// Start tcptap on 127.0.0.1:0 and read the real address from the
/// `listening on <ADDR>` info line on its stderr. A thread keeps draining
/// stderr into the log file so the pipe never fills up. A non-empty `wrapper`
/// (e.g. `valgrind --tool=callgrind`) runs tcptap as its last argument.
pub fn start_tcptap(
    name: &str,
    wrapper: &[String],
    bin: &Path,
    args: &[String],
    upstream: SocketAddr,
    dir: &Path,
) -> io::Result<(SocketAddr, ProcGuard)> {
    let log = dir.join("stderr.log");
    let mut cmd = match wrapper.split_first() {
        Some((prog, rest)) => {
            let mut c = Command::new(prog);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--upstream")
        .arg(upstream.to_string());
    let tmp = dir.to_string_lossy();
    for a in args {
        if let Some(text) = a.strip_prefix("config:") {
            // A config file holding just these settings; the flags above give the route.
            let path = dir.join("variant.toml");
            fs::write(&path, text)?;
            cmd.arg("--config").arg(path);
        } else if a == "{fifo}" {
            // A FIFO nobody reads: a tap sink that blocks forever.
            let path = dir.join("blocked.fifo");
            let c = std::ffi::CString::new(path.to_string_lossy().as_bytes())
                .map_err(io::Error::other)?;
            // SAFETY: valid NUL-terminated path.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                return Err(io::Error::last_os_error());
            }
            cmd.arg(path);
        } else {
            cmd.arg(a.replace("{tmp}", &tmp));
        }
    }
    let level =
        std::env::var("TCPTAP_BENCH_RUST_LOG").unwrap_or_else(|_| "info,tcptap::conn=warn".into());
    cmd.env("RUST_LOG", level);
    let mut child = spawn(name, cmd, &log, true)?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut g = ProcGuard {
        name: name.to_owned(),
        child,
        log: log.clone(),
    };
    let (tx, rx) = mpsc::channel();
    let mut out = fs::OpenOptions::new().append(true).open(&log)?;
    std::thread::Builder::new()
        .name("tcptap-stderr".into())
        .spawn(move || {
            let mut sent = false;
            // Ends when tcptap exits and the pipe closes.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out, "{line}");
                if !sent {
                    if let Some(addr) = parse_listening(&line) {
                        sent = true;
                        let _ = tx.send(addr);
                    }
                }
            }
        })?;
    // A wrapper such as valgrind takes far longer to start.
    let limit = if wrapper.is_empty() {
        START_TIMEOUT
    } else {
        START_TIMEOUT * 6
    };
    let end = Instant::now() + limit;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(addr) => return Ok((addr, g)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(50));
                return Err(io::Error::other(format!(
                    "{name}: stderr closed before a `listening on <ADDR>` line:\n{}",
                    g.log_tail()
                )));
            }
        }
        if let Some(st) = g.exited() {
            std::thread::sleep(Duration::from_millis(50));
            return Err(io::Error::other(format!(
                "{name} exited during start-up ({st}):\n{}",
                g.log_tail()
            )));
        }
        if Instant::now() > end {
            return Err(io::Error::other(format!(
                "{name}: no `listening on <ADDR>` line on stderr after {limit:?} \
                 (RUST_LOG must enable info for it):\n{}",
                g.log_tail()
            )));
        }
    }
}

/// `... listening on 127.0.0.1:40123 -> 127.0.0.1:8000` → 127.0.0.1:40123.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let tok = rest.split_whitespace().next()?;
    tok.trim_end_matches([',', ';']).parse().ok()
}

/// The tcptap binary to measure: `TCPTAP_BENCH_BIN`, else the one Cargo built.
pub fn tcptap_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TCPTAP_BENCH_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("TCPTAP_BENCH_BIN={} does not exist", p.display()))
        };
    }
    // Set by Cargo for benches when the package has a `tcptap` binary target.
    if let Some(p) = option_env!("CARGO_BIN_EXE_tcptap") {
        return Ok(PathBuf::from(p));
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let p = target_dir.join("release").join("tcptap");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "tcptap binary not found: no `tcptap` bin target in this build and no {} \
             (build it with `cargo build --release`, set TCPTAP_BENCH_BIN, or exclude it \
             with TCPTAP_BENCH_TARGETS=direct,haproxy,...)",
            p.display()
        ))
    }
}

// ---------------------------------------------------------------------------
// External upstream servers (iperf3, redis)

/// `iperf3 -s -1` on a free loopback port; it exits after one test.
pub fn start_iperf3_server(bin: &Path, dir: &Path) -> io::Result<(u16, ProcGuard)> {
    let port = free_port()?;
    let log = dir.join(format!("iperf3-s-{port}.log"));
    let mut cmd = Command::new(bin);
    cmd.args(["-s", "-1", "-B", "127.0.0.1", "-p"])
        .arg(port.to_string());
    let mut g = guard("iperf3 -s", cmd, &log)?;
    wait_listening(&mut g, port)?;
    Ok((port, g))
}

/// `redis-server` on a free loopback port, without persistence.
pub fn start_redis_server(bin: &Path, dir: &Path) -> io::Result<(u16, ProcGuard)> {
    let port = free_port()?;
    let log = dir.join("redis-server.log");
    let mut cmd = Command::new(bin);
    cmd.args(["--bind", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir);
    let mut g = guard("redis-server", cmd, &log)?;
    wait_listening(&mut g, port)?;
    Ok((port, g))
}

/// Run `cmd` to completion with stdout into `out` (stderr into `out`.err),
/// killing it after `timeout`. Returns its stdout text.
pub fn run_bounded(
    name: &str,
    mut cmd: Command,
    out: &Path,
    timeout: Duration,
) -> io::Result<String> {
    let err = out.with_extension("err");
    cmd.stderr(fs::File::create(&err)?);
    let stdout = fs::File::create(out)?;
    cmd.stdout(stdout).stdin(Stdio::null());
    die_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{name}: cannot start: {e}")))?;
    let g = ProcGuard {
        name: name.to_owned(),
        child,
        log: err.clone(),
    };
    match g.wait_exit(timeout) {
        Some(st) if st.success() => fs::read_to_string(out),
        Some(st) => Err(io::Error::other(format!(
            "{name} failed ({st}): {}\n{}",
            fs::read_to_string(out)
                .unwrap_or_default()
                .chars()
                .take(2000)
                .collect::<String>(),
            fs::read_to_string(&err).unwrap_or_default()
        ))),
        None => Err(io::Error::other(format!(
            "{name}: timed out after {timeout:?}"
        ))),
    }
}

/// Makes the child get SIGKILL when this process dies, so that no peer outlives a run.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
