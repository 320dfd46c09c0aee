//! Proxy benchmark: tcptap against a direct connection and against the
//! established TCP proxies (haproxy, socat, nginx stream) that are installed.
//!
//! Why: the numbers only mean something relative to the cost of no proxy at
//! all and to what people would otherwise deploy, measured on the same machine
//! in the same run. So every target runs in every round (round r runs all
//! targets before round r+1, in a shuffled order) against the same in-process
//! upstreams and load generators, and the table reports medians over rounds
//! plus tcptap/peer ratios: the median of the ratios within each round, which
//! cancels the load of a shared machine drifting between rounds.
//!
//! Rows: bulk throughput (1 and 8 connections; d→u, u→d, both), 64-byte
//! request/response (1 and 64 connections; req/s, p50, p99), connection churn,
//! idle memory per connection, proxy CPU per GiB, per request and per
//! connection (and the kernel's part of the latter), the share of the bytes a tap
//! captured, and iperf3 / redis-benchmark (keep-alive SET/GET, and PING with a
//! new connection per request) / wrk through each target when those are
//! installed.
//!
//! Columns: tcptap variants (copy path, tap to pcap / log / a blocked FIFO, two
//! workers), haproxy `mode tcp` with nbthread 1, nbthread 1 with forced splice,
//! nbthread 2, and nbthread 1 with `busy-polling`, socat, nginx stream with 1 and 2 workers.
//! Two-thread peers are compared with tcptap's two workers, haproxy's busy polling with
//! tcptap's (`--busy-poll 50us`), the others with one event loop. Only when named in
//! `TCPTAP_BENCH_TARGETS`: `tcptap-defer` (`defer_accept = "1s"`) and `haproxy-defer`
//! (`bind ... defer-accept`), compared with each other.
//!
//! Run: `cargo bench --bench proxy`. Environment:
//! - `TCPTAP_BENCH_QUICK=1`: one short round (under 30 s).
//! - `TCPTAP_BENCH_ROUNDS` (default 3), `TCPTAP_BENCH_SECS` (measured window
//!   per row and target, default 0.6), `TCPTAP_BENCH_IDLE_CONNS` (10000).
//! - `TCPTAP_BENCH_TARGETS=direct,tcptap,...` and
//!   `TCPTAP_BENCH_ONLY=bulk,rr,churn,idle,iperf3,redis,wrk` to select.
//! - `TCPTAP_BENCH_BIN`: the tcptap binary to use instead of Cargo's.
//! - `TCPTAP_BENCH_BASELINE`: another tcptap binary (an earlier build), measured in the same
//!   rounds as the column `tcptap-baseline`, with the ratio `tcptap/tcptap-baseline`: the
//!   before/after of a change, interleaved.
//! - `TCPTAP_BENCH_OUT`: the name of the result files (default `latest`), so that a run of
//!   some rows leaves the full suite's results alone.
//! - `TCPTAP_BENCH_RUST_LOG`: RUST_LOG for tcptap (default
//!   `info,tcptap::conn=warn`: no line per connection).
//!
//! Without `--bench` on the command line (`cargo test --benches`), it runs a
//! smoke test of the harness: direct and tcptap only, tiny durations, no
//! result files.
//!
//! Results: printed, and written to `benches/results/latest.md` (medians, and
//! how the ratios to the peers spread over the rounds) and
//! `benches/results/latest.json` (every round).

mod loadgen;
mod peers;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use loadgen::{BulkLoad, BulkUpstream, Dir, EchoUpstream};
use peers::{Kind, Target};

/// tcptap variants to compare: (column name, extra arguments). `{tmp}` is
/// replaced by a private directory of the run, `{fifo}` by a FIFO nobody reads
/// in it, and an argument `config:TEXT` by `--config FILE` holding TEXT. Adding a variant (e.g. a tap
/// mode) is one line here; every variant after the first also gets a
/// `variant/tcptap` ratio column.
const TCPTAP_VARIANTS: &[(&str, &[&str])] = &[
    ("tcptap", &[]),
    // The copying path (splice off): what the zero-copy path gains.
    ("tcptap-copy", &["config:splice = false\n"]),
    // Tap cost: pcap to a file, log to /dev/null, and a sink that never drains.
    ("tcptap+pcap", &["--tap-pcap", "{tmp}/tap.pcap"]),
    // The same with the writer at normal priority (a fuller capture).
    (
        "tcptap+pcap-normal",
        &[
            "--tap-pcap",
            "{tmp}/tap.pcap",
            "config:[tap]\nwriter_priority = \"normal\"\n",
        ],
    ),
    ("tcptap+log", &["--tap-log", "/dev/null"]),
    // At exit, a writer stuck on the FIFO is waited for drain_timeout (at least 2 s): with
    // the default 30 s, the harness would wait its 10 s and kill the proxy after every row.
    (
        "tcptap+blocked",
        &["--tap-log", "{fifo}", "config:drain_timeout = \"0s\"\n"],
    ),
    // Two event loops.
    (TWO_WORKERS, &["--workers", "2"]),
    // Polling without sleeping for 50 µs after events, against haproxy's `busy-polling`.
    (BUSY, &["--busy-poll", "50us"]),
    // Accepting a client only once its first bytes are in, against haproxy's `defer-accept`.
    (DEFER, &["config:defer_accept = \"1s\"\n"]),
];

/// Targets that run only when `TCPTAP_BENCH_TARGETS` names them.
const OPT_IN: &[&str] = &[DEFER, "haproxy-defer"];

/// The default variant run with `TCPTAP_BENCH_BASELINE`'s binary.
const BASELINE: &str = "tcptap-baseline";

/// The tcptap variant with two workers, compared with the two-thread peers.
const TWO_WORKERS: &str = "tcptap-2w";

/// The tcptap variant that busy-polls, compared with haproxy's `busy-polling`.
const BUSY: &str = "tcptap-busy";

/// The tcptap variant with `defer_accept`, compared with haproxy's `defer-accept`.
const DEFER: &str = "tcptap-defer";

/// File descriptors kept back from the idle-connection budget.
const FD_RESERVE: usize = 512;

// ---------------------------------------------------------------------------
// Configuration

struct Config {
    smoke: bool,
    quick: bool,
    rounds: usize,
    window: Duration,
    warmup: Duration,
    idle_conns: usize,
    churn_clients: usize,
    churn_max: u64,
    /// Duration of an iperf3 or wrk run.
    tool_secs: u32,
    redis_n: u32,
    /// Connections of the redis-benchmark churn row (one PING each).
    redis_churn_n: u32,
    targets: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    /// The name of the result files under `benches/results/` (`latest`: the full suite's).
    out: String,
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(x) => Some(x),
        Err(_) => {
            eprintln!("warning: ignoring {name}={v:?} (cannot parse)");
            None
        }
    }
}

/// The result files' name: `TCPTAP_BENCH_OUT` when it is a plain file name (letters, digits,
/// `-`, `_`, `.`; no path), else `latest`.
fn bench_out(v: Option<String>) -> String {
    match v.map(|v| v.trim().to_owned()) {
        None => "latest".into(),
        Some(v)
            if !v.is_empty()
                && !v.starts_with('.')
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            v
        }
        Some(v) => {
            eprintln!("warning: ignoring TCPTAP_BENCH_OUT={v:?} (not a plain file name)");
            "latest".into()
        }
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    let l: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (!l.is_empty()).then_some(l)
}

impl Config {
    fn from_env() -> Self {
        let smoke = !std::env::args().any(|a| a == "--bench");
        let quick = !smoke && std::env::var("TCPTAP_BENCH_QUICK").is_ok_and(|v| v != "0");
        let (rounds, secs, idle, tool_secs, redis_n): (usize, f64, usize, u32, u32) = if smoke {
            (1, 0.1, 100, 1, 1000)
        } else if quick {
            (1, 0.2, 1000, 1, 5000)
        } else {
            (3, 0.6, 10_000, 3, 50_000)
        };
        let rounds = env_parse("TCPTAP_BENCH_ROUNDS")
            .unwrap_or(rounds)
            .clamp(1, 100);
        let secs: f64 = env_parse("TCPTAP_BENCH_SECS")
            .unwrap_or(secs)
            .clamp(0.05, 60.0);
        let window = Duration::from_secs_f64(secs);
        Config {
            smoke,
            quick,
            rounds,
            window,
            warmup: (window / 4).clamp(Duration::from_millis(50), Duration::from_millis(250)),
            idle_conns: env_parse("TCPTAP_BENCH_IDLE_CONNS")
                .unwrap_or(idle)
                .clamp(1, 100_000),
            churn_clients: 4,
            churn_max: 200_000,
            tool_secs,
            redis_n,
            redis_churn_n: redis_n / 5,
            targets: if smoke {
                Some(vec!["direct".into(), "tcptap".into()])
            } else {
                env_list("TCPTAP_BENCH_TARGETS")
            },
            groups: if smoke {
                Some(["bulk", "rr", "churn", "idle"].map(String::from).to_vec())
            } else {
                env_list("TCPTAP_BENCH_ONLY")
            },
            out: bench_out(std::env::var("TCPTAP_BENCH_OUT").ok()),
        }
    }

    fn group_on(&self, g: &str) -> bool {
        self.groups
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == g))
    }

    fn target_on(&self, t: &str) -> bool {
        match &self.targets {
            Some(l) => l.iter().any(|x| x == t),
            None => !OPT_IN.contains(&t),
        }
    }
}

// ---------------------------------------------------------------------------
// Results

#[derive(Clone, Copy)]
struct Unit {
    name: &'static str,
    higher_is_better: bool,
}

/// A unit where more is better (throughput) or, with `less`, where less is (latency, cost).
const fn more(name: &'static str) -> Unit {
    Unit {
        name,
        higher_is_better: true,
    }
}

const fn less(name: &'static str) -> Unit {
    Unit {
        name,
        higher_is_better: false,
    }
}

const GBPS: Unit = more("Gbit/s");
const REQS: Unit = more("req/s");
const CONNS: Unit = more("conns/s");
const PERCENT: Unit = more("%");
const MICROS: Unit = less("µs");
const KIB_CONN: Unit = less("KiB/conn");
const MS_GIB: Unit = less("CPU ms/GiB");
const US_CPU_REQ: Unit = less("CPU µs/req");
const US_CPU_CONN: Unit = less("CPU µs/conn");
/// The kernel's part of [`US_CPU_CONN`] (stime): the TCP work both proxies share.
const US_KERNEL_CONN: Unit = less("kernel CPU µs/conn");

#[derive(Default)]
struct Results {
    /// Metric names in first-seen order.
    order: Vec<(String, Unit)>,
    /// (metric, target) → one slot per round (None: that round failed).
    values: BTreeMap<(String, String), Vec<Option<f64>>>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Results {
    fn add(&mut self, metric: &str, unit: Unit, target: &str, round: usize, v: f64) {
        if !self.order.iter().any(|(m, _)| m == metric) {
            self.order.push((metric.to_owned(), unit));
        }
        let slots = self
            .values
            .entry((metric.to_owned(), target.to_owned()))
            .or_default();
        if slots.len() <= round {
            slots.resize(round + 1, None);
        }
        slots[round] = v.is_finite().then_some(v);
    }

    fn median(&self, metric: &str, target: &str) -> Option<f64> {
        median(
            self.values
                .get(&(metric.to_owned(), target.to_owned()))?
                .iter()
                .flatten()
                .copied()
                .collect(),
        )
    }

    /// The median over rounds of `a / b` within each round that measured both. The targets of a
    /// row run one after the other in a round, so each quotient compares them under the same
    /// machine load, which drifts between rounds on a shared machine.
    fn paired_ratio(&self, metric: &str, a: &str, b: &str) -> Option<f64> {
        median(self.round_ratios(metric, a, b))
    }

    /// The per-round ratios `a / b` of a row, in round order (rounds that measured both).
    fn round_ratios(&self, metric: &str, a: &str, b: &str) -> Vec<f64> {
        let get = |t: &str| self.values.get(&(metric.to_owned(), t.to_owned()));
        let (Some(xa), Some(xb)) = (get(a), get(b)) else {
            return Vec::new();
        };
        xa.iter()
            .zip(xb)
            .filter_map(|(x, y)| match (x, y) {
                (Some(x), Some(y)) if *y != 0.0 => Some(x / y),
                _ => None,
            })
            .collect()
    }

    fn note(&mut self, s: String) {
        println!("note: {s}");
        self.notes.push(s);
    }
}

/// The `q` quantile (0..=1) of `v`, interpolated between the two nearest values.
fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

fn median(v: Vec<f64>) -> Option<f64> {
    quantile(v, 0.5)
}

type Measured = Vec<(String, Unit, f64)>;

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, Debug)]
enum Scenario {
    Bulk {
        conns: usize,
        dir: Dir,
    },
    PingPong {
        conns: usize,
    },
    Churn {
        clients: usize,
    },
    Idle,
    Iperf3,
    Redis,
    /// redis-benchmark opening a new connection per request (`-k 0`): churn as users measure
    /// it, where the client closes first, so each close is a FIN handshake, not the RST of `Churn`.
    RedisChurn,
    Wrk {
        conns: usize,
    },
}

impl Scenario {
    fn label(&self) -> String {
        match self {
            Scenario::Bulk { conns, dir } => format!("bulk {conns}c {}", dir.label()),
            Scenario::PingPong { conns } => format!("rr 64B {conns}c"),
            Scenario::Churn { clients } => format!("churn {clients} clients"),
            Scenario::Idle => "idle memory".into(),
            Scenario::Iperf3 => "iperf3".into(),
            Scenario::Redis => "redis-benchmark".into(),
            Scenario::RedisChurn => "redis-benchmark -k 0".into(),
            Scenario::Wrk { conns } => format!("wrk {conns}c"),
        }
    }
}

/// Shared servers that live for the whole run.
struct Env {
    bulk: BulkUpstream,
    echo: EchoUpstream,
    tmp: peers::TempDir,
    iperf3: Option<PathBuf>,
    redis: Option<(PathBuf, peers::ProcGuard, u16)>,
    /// wrk and the HTTP upstream it is run against.
    wrk: Option<(PathBuf, EchoUpstream)>,
    /// Connection limit passed to peers that have one.
    max_conns: usize,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// For a tcptap with a tap: stops it gracefully and reads the share of the proxied bytes its tap
/// wrote from the shutdown summary. None for anything else. With `required` (a tap that
/// writes somewhere), a log without that summary is an error: the share must not vanish from
/// the results unnoticed when the line changes.
fn tap_captured_share(r: &mut peers::Running, required: bool) -> Result<Option<f64>, String> {
    let Some(g) = r.proc.take() else {
        return Ok(None);
    };
    let log = g.log.clone();
    if g.terminate(Duration::from_secs(10)).is_none() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(log).map_err(|e| e.to_string())?;
    match text.lines().rev().find_map(tap_summary_bytes) {
        Some((written, dropped)) => {
            Ok((written + dropped > 0).then(|| written as f64 / (written + dropped) as f64))
        }
        None if required => Err("no tap summary in the proxy's log at exit".into()),
        None => Ok(None),
    }
}

/// (bytes written, bytes dropped) from the line tcptap logs per tap at exit:
/// `tap (pcap /dir/tap.pcap): R records (B bytes) written, R records (B bytes) dropped, E write
/// errors`. The numbers are read after the tap's description, which may hold digits.
fn tap_summary_bytes(line: &str) -> Option<(u64, u64)> {
    if !line.contains("tap (") || !line.ends_with(" write errors") {
        return None;
    }
    let at = line.rfind("): ")? + 3;
    let nums: Vec<u64> = line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [_, written, _, dropped, _] = nums[..] else {
        return None;
    };
    Some((written, dropped))
}

fn tap_summary_self_check() {
    let line = "2026-11-29T19:00:00Z INFO  tcptap::event_loop] tap (pcap /tmp/b-7 (2)/tap.pcap): \
                12 records (3400 bytes) written, 5 records (600 bytes) dropped, 0 write errors";
    assert_eq!(tap_summary_bytes(line), Some((3400, 600)));
    assert_eq!(tap_summary_bytes("tap (log -): 1 records dropped"), None);
}

fn run_scenario(cfg: &Config, env: &Env, sc: Scenario, t: &Target) -> Result<Measured, String> {
    let e = |x: std::io::Error| x.to_string();
    let mut out = Measured::new();
    match sc {
        Scenario::Bulk { conns, dir } => {
            let mut r = t.start(env.bulk.addr, env.max_conns).map_err(e)?;
            let pid = r.pid();
            let load = BulkLoad::start(r.addr, conns, dir).map_err(e)?;
            std::thread::sleep(cfg.warmup);
            let sample = || {
                let up = env.bulk.rx_bytes.load(std::sync::atomic::Ordering::Relaxed);
                let down = load.client_rx.load(std::sync::atomic::Ordering::Relaxed);
                let bytes = match dir {
                    Dir::Up => up,
                    Dir::Down => down,
                    Dir::Both => up + down,
                };
                (bytes, pid.map(peers::cpu_ms_tree), Instant::now())
            };
            let (b0, c0, t0) = sample();
            std::thread::sleep(cfg.window);
            let (b1, c1, t1) = sample();
            load.stop();
            r.check_alive().map_err(e)?;
            let bytes = (b1 - b0) as f64;
            if bytes == 0.0 {
                return Err("no bytes moved".into());
            }
            let label = sc.label();
            out.push((label.clone(), GBPS, bytes * 8.0 / secs(t1 - t0) / 1e9));
            if let (Some(c0), Some(c1)) = (c0, c1) {
                let gib = bytes / (1u64 << 30) as f64;
                out.push((format!("cpu {}", label), MS_GIB, (c1 - c0) / gib));
            }
            // A tap that cannot keep up drops (and counts) what it cannot take: throughput
            // alone would hide that, so report the share of the bytes the tap captured.
            if let Some(share) = tap_captured_share(&mut r, t.taps_to_a_file())? {
                out.push((format!("tap captured {}", label), PERCENT, share * 100.0));
            }
        }
        Scenario::PingPong { conns } => {
            let mut r = t.start(env.echo.addr, env.max_conns).map_err(e)?;
            let cpu0 = r.pid().map(peers::cpu_ms_tree);
            let res = loadgen::ping_pong(r.addr, conns, cfg.warmup, cfg.window).map_err(e)?;
            let cpu1 = r.pid().map(peers::cpu_ms_tree);
            r.check_alive().map_err(e)?;
            if res.requests == 0 {
                return Err("no request completed".into());
            }
            let label = sc.label();
            let us = |q| {
                res.hist
                    .quantile(q)
                    .map_or(f64::NAN, |ns| ns as f64 / 1000.0)
            };
            out.push((label.clone(), REQS, res.requests as f64 / secs(res.elapsed)));
            out.push((format!("{label} p50"), MICROS, us(0.50)));
            out.push((format!("{label} p99"), MICROS, us(0.99)));
            if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                let per = (c1 - c0) * 1000.0 / res.total_requests as f64;
                out.push((format!("cpu {label}"), US_CPU_REQ, per));
            }
        }
        Scenario::Churn { clients } => {
            let mut r = t.start(env.echo.addr, env.max_conns).map_err(e)?;
            let cpu0 = r.pid().map(peers::cpu_split_ms_tree);
            let res = loadgen::churn(r.addr, clients, cfg.warmup, cfg.window, cfg.churn_max)
                .map_err(e)?;
            let cpu1 = r.pid().map(peers::cpu_split_ms_tree);
            r.check_alive().map_err(e)?;
            if res.errors > 0 {
                println!(
                    "    {}: {} failed connections in the window",
                    t.name, res.errors
                );
            }
            if res.conns == 0 {
                return Err(format!("no connection completed ({} errors)", res.errors));
            }
            out.push((sc.label(), CONNS, res.conns as f64 / secs(res.elapsed)));
            if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                push_conn_cpu(&mut out, &sc.label(), c0, c1, res.total_conns.max(1) as f64);
            }
        }
        Scenario::Idle => {
            if matches!(t.kind, Kind::Direct) {
                return Ok(out);
            }
            if let Some(why) = t.idle_unsupported() {
                return Err(format!("skipped: {why}"));
            }
            let mut r = t.start(env.echo.addr, env.max_conns).map_err(e)?;
            let pid = r.pid().ok_or("no pid")?;
            std::thread::sleep(Duration::from_millis(100));
            let (rss0, pss0) = peers::mem_kib(pid).ok_or("cannot read /proc memory")?;
            let conns = loadgen::open_idle(r.addr, cfg.idle_conns).map_err(e)?;
            std::thread::sleep(Duration::from_millis(200));
            let after = peers::mem_kib(pid);
            loadgen::close_all(conns);
            r.check_alive().map_err(e)?;
            let (rss1, pss1) = after.ok_or("cannot read /proc memory")?;
            let n = cfg.idle_conns as f64;
            out.push((
                format!("idle RSS, {} conns", cfg.idle_conns),
                KIB_CONN,
                (rss1 as f64 - rss0 as f64) / n,
            ));
            out.push((
                format!("idle PSS, {} conns", cfg.idle_conns),
                KIB_CONN,
                (pss1 as f64 - pss0 as f64) / n,
            ));
        }
        Scenario::Iperf3 => {
            let bin = env.iperf3.as_ref().ok_or("iperf3 not installed")?;
            let (port, _server) = peers::start_iperf3_server(bin, &env.tmp.0).map_err(e)?;
            let mut r = t
                .start(SocketAddr::from(([127, 0, 0, 1], port)), env.max_conns)
                .map_err(e)?;
            let mut cmd = Command::new(bin);
            cmd.args(["-c", "127.0.0.1", "-p"])
                .arg(r.addr.port().to_string())
                .args(["-t", &cfg.tool_secs.to_string(), "-J"]);
            let json = peers::run_bounded(
                "iperf3 -c",
                cmd,
                &env.tmp.0.join("iperf3-c.json"),
                Duration::from_secs(cfg.tool_secs as u64 + 20),
            )
            .map_err(e)?;
            r.check_alive().map_err(e)?;
            let v: serde_json::Value =
                serde_json::from_str(&json).map_err(|x| format!("iperf3 JSON: {x}"))?;
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .ok_or_else(|| format!("iperf3: no end.sum_received ({})", v["error"]))?;
            out.push((format!("iperf3 -t {}", cfg.tool_secs), GBPS, bps / 1e9));
        }
        Scenario::Redis => {
            let (_, _, port) = env.redis.as_ref().ok_or("redis not installed")?;
            let bench = peers::which("redis-benchmark").ok_or("redis-benchmark not installed")?;
            let mut r = t
                .start(SocketAddr::from(([127, 0, 0, 1], *port)), env.max_conns)
                .map_err(e)?;
            let mut cmd = Command::new(bench);
            cmd.args(["-h", "127.0.0.1", "-p"])
                .arg(r.addr.port().to_string())
                .args(["-t", "get,set", "-n", &cfg.redis_n.to_string()])
                .args(["-c", "50", "--csv"]);
            let csv = peers::run_bounded(
                "redis-benchmark",
                cmd,
                &env.tmp.0.join("redis-benchmark.csv"),
                Duration::from_secs(120),
            )
            .map_err(e)?;
            r.check_alive().map_err(e)?;
            for test in ["SET", "GET"] {
                let rps = parse_redis_csv(&csv, test)
                    .ok_or_else(|| format!("redis-benchmark: no {test} row in {csv:?}"))?;
                out.push((format!("redis {test} -c 50"), REQS, rps));
            }
        }
        Scenario::RedisChurn => {
            let (_, _, port) = env.redis.as_ref().ok_or("redis not installed")?;
            let bench = peers::which("redis-benchmark").ok_or("redis-benchmark not installed")?;
            let mut r = t
                .start(SocketAddr::from(([127, 0, 0, 1], *port)), env.max_conns)
                .map_err(e)?;
            let cpu0 = r.pid().map(peers::cpu_split_ms_tree);
            let mut cmd = Command::new(bench);
            cmd.args(["-h", "127.0.0.1", "-p"])
                .arg(r.addr.port().to_string())
                .args(["-t", "ping_inline", "-n", &cfg.redis_churn_n.to_string()])
                .args(["-c", "50", "-k", "0", "--csv"]);
            let csv = peers::run_bounded(
                "redis-benchmark",
                cmd,
                &env.tmp.0.join("redis-benchmark-k0.csv"),
                Duration::from_secs(120),
            )
            .map_err(e)?;
            let cpu1 = r.pid().map(peers::cpu_split_ms_tree);
            r.check_alive().map_err(e)?;
            let rate = parse_redis_csv(&csv, "PING_INLINE")
                .ok_or_else(|| format!("redis-benchmark: no PING_INLINE row in {csv:?}"))?;
            let label = "redis PING -k 0 -c 50";
            out.push((label.into(), CONNS, rate));
            if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                push_conn_cpu(&mut out, label, c0, c1, cfg.redis_churn_n as f64);
            }
        }
        Scenario::Wrk { conns } => {
            let (bin, http) = env.wrk.as_ref().ok_or("wrk not installed")?;
            let mut r = t.start(http.addr, env.max_conns).map_err(e)?;
            let cpu0 = r.pid().map(peers::cpu_ms_tree);
            let mut cmd = Command::new(bin);
            cmd.args(["-t", "1", "-c", &conns.to_string()])
                .args(["-d", &format!("{}s", cfg.tool_secs), "--latency"])
                .arg(format!("http://{}/", r.addr));
            let text = peers::run_bounded(
                "wrk",
                cmd,
                &env.tmp.0.join("wrk.txt"),
                Duration::from_secs(cfg.tool_secs as u64 + 20),
            )
            .map_err(e)?;
            let cpu1 = r.pid().map(peers::cpu_ms_tree);
            r.check_alive().map_err(e)?;
            let rep = parse_wrk(&text)?;
            let label = sc.label();
            out.push((label.clone(), REQS, rep.per_sec));
            out.push((format!("{label} p50"), MICROS, rep.p50_us));
            out.push((format!("{label} p99"), MICROS, rep.p99_us));
            if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
                let per = (c1 - c0) * 1000.0 / rep.requests;
                out.push((format!("cpu {label}"), US_CPU_REQ, per));
            }
        }
    }
    Ok(out)
}

/// The proxy's CPU per connection of a churn row, and the kernel's part of it: a proxy's own
/// code can only shrink the difference, so the kernel row shows how far its lead can go.
fn push_conn_cpu(out: &mut Measured, label: &str, c0: (f64, f64), c1: (f64, f64), conns: f64) {
    let (user, kernel) = (c1.0 - c0.0, c1.1 - c0.1);
    out.push((
        format!("cpu {label}"),
        US_CPU_CONN,
        (user + kernel) * 1000.0 / conns,
    ));
    out.push((
        format!("kernel cpu {label}"),
        US_KERNEL_CONN,
        kernel * 1000.0 / conns,
    ));
}

/// What `wrk --latency` reports: requests in total and per second, and latency percentiles.
#[derive(Debug, PartialEq)]
struct WrkReport {
    requests: f64,
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Parses wrk's text report (`  123456 requests in 3.00s, ...`, `Requests/sec: 41152.00`, and
/// the `Latency Distribution` lines such as `     50%  839.00us`). Errors on socket errors and
/// non-2xx/3xx responses: through a proxy that works there are none.
fn parse_wrk(text: &str) -> Result<WrkReport, String> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::trim))
            .ok_or_else(|| format!("wrk: no `{key}` in its report:\n{text}"))
    };
    let latency_us = |v: &str| -> Option<f64> {
        let split = v.find(|c: char| c.is_ascii_alphabetic())?;
        let (num, unit) = v.split_at(split);
        let scale = match unit {
            "us" => 1.0,
            "ms" => 1e3,
            "s" => 1e6,
            "m" => 60e6,
            _ => return None,
        };
        Some(num.parse::<f64>().ok()? * scale)
    };
    if let Some(l) = text.lines().find(|l| {
        let l = l.trim();
        l.starts_with("Socket errors:") || l.starts_with("Non-2xx")
    }) {
        return Err(format!("wrk: {}", l.trim()));
    }
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").map(|(n, _)| n.trim()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("wrk: no `N requests in` line:\n{text}"))?;
    if requests == 0.0 {
        return Err("wrk: no request completed".into());
    }
    let per_sec = field("Requests/sec:")?
        .parse()
        .map_err(|e| format!("wrk: Requests/sec: {e}"))?;
    let p = |q: &str| {
        field(q).and_then(|v| latency_us(v).ok_or_else(|| format!("wrk: latency {q} {v:?}")))
    };
    Ok(WrkReport {
        requests,
        per_sec,
        p50_us: p("50%")?,
        p99_us: p("99%")?,
    })
}

/// Checks [`parse_wrk`] on a report of wrk 4.
fn wrk_parse_self_check() {
    let ok = "Running 3s test @ http://127.0.0.1:4000/\n  1 threads and 64 connections\n  \
              Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.52ms  \
              405.21us   9.80ms   80.19%\n    Req/Sec    42.10k     2.01k   45.34k    73.33%\n  \
              Latency Distribution\n     50%    1.43ms\n     75%    1.71ms\n     90%    \
              2.01ms\n     99%    2.89ms\n  125731 requests in 3.00s, 137.89MB read\n\
              Requests/sec:  41905.63\nTransfer/sec:     45.96MB\n";
    assert_eq!(
        parse_wrk(ok),
        Ok(WrkReport {
            requests: 125731.0,
            per_sec: 41905.63,
            p50_us: 1430.0,
            p99_us: 2890.0
        })
    );
    let us = ok.replace("1.43ms", "839.00us");
    assert_eq!(parse_wrk(&us).map(|r| r.p50_us), Ok(839.0));
    let bad = ok.replace(
        "Requests/sec",
        "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
    );
    assert!(parse_wrk(&bad).is_err());
    assert!(parse_wrk(&ok.replace("125731 requests", "0 requests")).is_err());
}

/// Checks [`quantile`] and [`spread_cell`].
fn spread_self_check() {
    assert_eq!(quantile(vec![3.0, 1.0, 2.0, 4.0], 0.5), Some(2.5));
    assert_eq!(quantile(vec![1.0, 2.0, 3.0, 4.0, 5.0], 0.25), Some(2.0));
    assert_eq!(quantile(vec![7.0], 0.75), Some(7.0));
    assert_eq!(quantile(Vec::new(), 0.5), None);
    let r = [0.8, 1.1, 1.2, 0.9, 1.3];
    assert_eq!(spread_cell(&r, true), "1.10 (0.90–1.20) 3/5");
    assert_eq!(spread_cell(&r, false), "1.10 (0.90–1.20) 2/5");
    assert_eq!(spread_cell(&[], true), "–");
    assert_eq!(bench_out(None), "latest");
    assert_eq!(bench_out(Some(" small-rows_2.x ".into())), "small-rows_2.x");
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert_eq!(bench_out(Some(bad.into())), "latest", "{bad:?}");
    }
}

fn redis_parse_self_check() {
    let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\"\n\
               \"PING_INLINE\",\"15748.03\",\"0.240\",\"0.024\"\n\
               \"SET\",\"20202.02\",\"0.171\",\"0.032\"\n\
               \"GET\",\"12048.19\",\"0.306\",\"0.016\"\n";
    assert_eq!(parse_redis_csv(csv, "PING_INLINE"), Some(15748.03));
    assert_eq!(parse_redis_csv(csv, "SET"), Some(20202.02));
    assert_eq!(parse_redis_csv(csv, "GET"), Some(12048.19));
    assert_eq!(parse_redis_csv(csv, "INCR"), None);
}

/// `"SET","81234.56",...` → 81234.56 (redis-benchmark --csv, any version).
fn parse_redis_csv(csv: &str, test: &str) -> Option<f64> {
    csv.lines().find_map(|l| {
        let mut f = l.split(',').map(|x| x.trim().trim_matches('"'));
        let name = f.next()?;
        if name.eq_ignore_ascii_case(test) || name.starts_with(&format!("{test} ")) {
            f.next()?.parse().ok()
        } else {
            None
        }
    })
}

/// The order in which a round runs the targets of one row: a shuffle seeded by the round and
/// the row, so that no target always goes first or always follows the same one (whatever a
/// target leaves behind, such as disk writeback, falls on a different one each time), and a run
/// is repeatable.
fn order(n: usize, round: usize, sc: &Scenario) -> Vec<usize> {
    let mut seed = sc.label().bytes().fold(round as u64 + 1, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) | 1; // xorshift never leaves 0
    let mut next = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    v
}

// ---------------------------------------------------------------------------
// Targets

fn nginx_stream_module() -> Result<Option<PathBuf>, String> {
    let bin = peers::which("nginx").ok_or("not installed")?;
    let out = Command::new(&bin)
        .arg("-V")
        .output()
        .map_err(|e| e.to_string())?;
    let v = String::from_utf8_lossy(&out.stderr);
    if v.split_whitespace().any(|f| f == "--with-stream") {
        return Ok(None); // Built in.
    }
    for d in [
        "/usr/lib/nginx/modules",
        "/usr/lib64/nginx/modules",
        "/usr/share/nginx/modules",
    ] {
        let p = Path::new(d).join("ngx_stream_module.so");
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    Err("stream module not found (install libnginx-mod-stream)".into())
}

fn discover_targets(cfg: &Config, res: &mut Results, versions: &mut Vec<String>) -> Vec<Target> {
    let mut ts = vec![Target {
        name: "direct".into(),
        kind: Kind::Direct,
    }];
    let want_tcptap = TCPTAP_VARIANTS.iter().any(|(n, _)| cfg.target_on(n));
    if want_tcptap {
        match peers::tcptap_bin() {
            Ok(bin) => {
                let level = std::env::var("TCPTAP_BENCH_RUST_LOG")
                    .unwrap_or_else(|_| "info,tcptap::conn=warn".into());
                versions.push(format!(
                    "{} at {} (RUST_LOG={level})",
                    peers::version_line(&bin, &["--version"]),
                    bin.display()
                ));
                for (name, args) in TCPTAP_VARIANTS {
                    ts.push(Target {
                        name: (*name).into(),
                        kind: Kind::Tcptap {
                            bin: bin.clone(),
                            args: args.iter().map(|s| (*s).to_owned()).collect(),
                        },
                    });
                }
            }
            Err(msg) if cfg.smoke => res.note(format!("tcptap skipped: {msg}")),
            Err(msg) => {
                eprintln!("error: {msg}");
                std::process::exit(2);
            }
        }
    }
    if let Some(bin) = std::env::var_os("TCPTAP_BENCH_BASELINE").filter(|_| cfg.target_on(BASELINE))
    {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            eprintln!(
                "error: TCPTAP_BENCH_BASELINE={} does not exist",
                bin.display()
            );
            std::process::exit(2);
        }
        versions.push(format!(
            "{} at {} (column {BASELINE})",
            peers::version_line(&bin, &["--version"]),
            bin.display()
        ));
        ts.push(Target {
            name: BASELINE.into(),
            kind: Kind::Tcptap {
                bin,
                args: Vec::new(),
            },
        });
    }
    match peers::which("haproxy") {
        Some(bin) => {
            versions.push(peers::version_line(&bin, &["-v"]));
            // nbthread 1 is the reference for one event loop; with forced splice, the same
            // zero-copy path as tcptap's default; nbthread 2 against tcptap's two workers;
            // with busy-polling against tcptap's busy_poll; with defer-accept against
            // tcptap's defer_accept.
            for (name, threads, splice, busy, defer) in [
                ("haproxy", 1, false, false, false),
                ("haproxy-splice", 1, true, false, false),
                ("haproxy-2t", 2, false, false, false),
                ("haproxy-busy", 1, false, true, false),
                ("haproxy-defer", 1, false, false, true),
            ] {
                ts.push(Target {
                    name: name.into(),
                    kind: Kind::Haproxy {
                        bin: bin.clone(),
                        threads,
                        splice,
                        busy,
                        defer,
                    },
                });
            }
        }
        None => res.note("haproxy not installed: column skipped".into()),
    }
    match peers::which("socat") {
        Some(bin) => {
            let v = Command::new(&bin).arg("-V").output();
            let v = v
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .find(|l| l.contains("socat version"))
                        .unwrap_or("socat")
                        .trim()
                        .to_owned()
                })
                .unwrap_or_else(|_| "socat".into());
            versions.push(v);
            ts.push(Target {
                name: "socat".into(),
                kind: Kind::Socat { bin },
            });
        }
        None => res.note("socat not installed: column skipped".into()),
    }
    match nginx_stream_module() {
        Ok(module) => {
            let bin = peers::which("nginx").expect("checked above");
            versions.push(peers::version_line(&bin, &["-v"]));
            for (name, workers) in [("nginx", 1), ("nginx-2w", 2)] {
                ts.push(Target {
                    name: name.into(),
                    kind: Kind::Nginx {
                        bin: bin.clone(),
                        module: module.clone(),
                        workers,
                    },
                });
            }
        }
        Err(why) => res.note(format!("nginx (stream) skipped: {why}")),
    }
    ts.retain(|t| cfg.target_on(&t.name));
    ts
}

// ---------------------------------------------------------------------------
// File descriptors

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
/// Children inherit it.
fn raise_nofile() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
    }
    usize::try_from(rl.rlim_cur)
        .unwrap_or(usize::MAX)
        .min(1 << 20)
}

// ---------------------------------------------------------------------------
// Report

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The tcptap column a peer is compared with: two-thread and two-worker peers with tcptap's two
/// workers, everything else with the default (one event loop).
fn tcptap_for(peer: &str) -> &'static str {
    if peer.ends_with("-2t") || peer.ends_with("-2w") {
        TWO_WORKERS
    } else if peer.ends_with("-busy") {
        BUSY
    } else if peer.ends_with("-defer") {
        DEFER
    } else {
        TCPTAP_VARIANTS[0].0
    }
}

fn ratio_columns(targets: &[Target]) -> Vec<(String, String)> {
    let base = TCPTAP_VARIANTS[0].0;
    let has = |name: &str| targets.iter().any(|t| t.name == name);
    let mut cols = Vec::new();
    if !has(base) {
        return cols;
    }
    for t in targets {
        if !t.is_tcptap() && has(tcptap_for(&t.name)) {
            cols.push((tcptap_for(&t.name).to_owned(), t.name.clone()));
        }
    }
    for t in targets {
        if t.name == BASELINE {
            cols.push((base.to_owned(), BASELINE.to_owned()));
        } else if t.is_tcptap() && t.name != base {
            cols.push((t.name.clone(), base.to_owned()));
        }
    }
    cols
}

fn markdown_table(res: &Results, targets: &[Target]) -> String {
    let ratios = ratio_columns(targets);
    let mut s = String::from("| metric | unit | better |");
    for t in targets {
        let _ = write!(s, " {} |", t.name);
    }
    for (a, b) in &ratios {
        let _ = write!(s, " {a}/{b} |");
    }
    s.push_str("\n|---|---|---|");
    for _ in 0..targets.len() + ratios.len() {
        s.push_str("---:|");
    }
    s.push('\n');
    for (m, unit) in &res.order {
        let _ = write!(
            s,
            "| {m} | {} | {} |",
            unit.name,
            if unit.higher_is_better { "↑" } else { "↓" }
        );
        for t in targets {
            match res.median(m, &t.name) {
                Some(v) => {
                    let _ = write!(s, " {} |", fmt_num(v));
                }
                None => s.push_str(" – |"),
            }
        }
        for (a, b) in &ratios {
            match res.paired_ratio(m, a, b) {
                Some(r) => {
                    let _ = write!(s, " {r:.2} |");
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

/// How the ratios of tcptap to each peer spread over the rounds: per row and peer, the median
/// ratio, the middle half of the rounds' ratios, and in how many rounds tcptap did better. On a
/// shared machine a single row's median moves from run to run; a middle half that straddles 1
/// says the two are within the noise of this run, and the rounds won say which way it leans.
fn spread_table(res: &Results, targets: &[Target]) -> String {
    let peers: Vec<(String, String)> = ratio_columns(targets)
        .into_iter()
        .filter(|(_, b)| {
            b == BASELINE || b != "direct" && targets.iter().any(|t| t.name == *b && !t.is_tcptap())
        })
        .collect();
    if peers.is_empty() {
        return String::new();
    }
    let mut s = String::from("| metric | better |");
    for (a, b) in &peers {
        let _ = write!(s, " {a}/{b} |");
    }
    s.push_str("\n|---|---|");
    for _ in &peers {
        s.push_str("---:|");
    }
    s.push('\n');
    for (m, unit) in &res.order {
        let cells: Vec<String> = peers
            .iter()
            .map(|(a, b)| spread_cell(&res.round_ratios(m, a, b), unit.higher_is_better))
            .collect();
        if cells.iter().all(|c| c == "–") {
            continue;
        }
        let better = if unit.higher_is_better { "↑" } else { "↓" };
        let _ = write!(s, "| {m} | {better} |");
        for c in cells {
            let _ = write!(s, " {c} |");
        }
        s.push('\n');
    }
    s
}

/// `median (q1–q3) won/rounds` for one row's per-round ratios.
fn spread_cell(ratios: &[f64], higher_is_better: bool) -> String {
    let [Some(q1), Some(q2), Some(q3)] = [0.25, 0.5, 0.75].map(|q| quantile(ratios.to_vec(), q))
    else {
        return "–".into();
    };
    let won = (ratios.iter())
        .filter(|&&r| if higher_is_better { r > 1.0 } else { r < 1.0 })
        .count();
    format!("{q2:.2} ({q1:.2}–{q3:.2}) {won}/{}", ratios.len())
}

fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, sod) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

struct Machine {
    date: String,
    kernel: String,
    cpu: String,
    nproc: usize,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        date: utc_now(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into()),
        cpu,
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

fn write_results(
    cfg: &Config,
    m: &Machine,
    res: &Results,
    targets: &[Target],
    versions: &[String],
    table: &str,
    spread: &str,
) -> std::io::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&dir)?;
    let mut md = if cfg.out == "latest" {
        String::from("# tcptap proxy benchmark: latest run\n\n")
    } else {
        format!("# tcptap proxy benchmark: {}\n\n", cfg.out)
    };
    let _ = writeln!(md, "- date: {}", m.date);
    let _ = writeln!(md, "- kernel (`uname -r`): {}", m.kernel);
    let _ = writeln!(md, "- CPU: {} × {} (nproc)", m.cpu, m.nproc);
    let _ = writeln!(
        md,
        "- rounds: {}, measured window per row: {:.2} s after {:.2} s warm-up{}",
        cfg.rounds,
        secs(cfg.window),
        secs(cfg.warmup),
        if cfg.quick { " (quick mode)" } else { "" }
    );
    for v in versions {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(
        md,
        "\nMedians over rounds. A ratio column is the median over rounds of the ratio \
         measured within each round, where the two targets ran one after the other (for ↓ rows, \
         below 1 means tcptap is better). `–`: not measured or failed.\n"
    );
    md.push_str(table);
    if !spread.is_empty() {
        let _ = writeln!(
            md,
            "\nRound by round: the median ratio of tcptap to each peer, the middle half of the \
             rounds' ratios in parentheses, and the rounds where tcptap did better. A middle \
             half that straddles 1 is within the noise of this run.\n"
        );
        md.push_str(spread);
    }
    if !res.notes.is_empty() {
        md.push_str("\nNotes:\n");
        for n in &res.notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    if !res.errors.is_empty() {
        md.push_str("\nErrors:\n");
        for e in &res.errors {
            let _ = writeln!(md, "- {}", e.lines().next().unwrap_or(""));
        }
    }
    std::fs::write(dir.join(format!("{}.md", cfg.out)), md)?;

    let metrics: Vec<serde_json::Value> = res
        .order
        .iter()
        .map(|(name, unit)| {
            let mut rounds = serde_json::Map::new();
            let mut medians = serde_json::Map::new();
            for t in targets {
                if let Some(v) = res.values.get(&(name.clone(), t.name.clone())) {
                    let mut v = v.clone();
                    v.resize(cfg.rounds.max(v.len()), None);
                    rounds.insert(t.name.clone(), serde_json::json!(v));
                }
                if let Some(v) = res.median(name, &t.name) {
                    medians.insert(t.name.clone(), serde_json::json!(v));
                }
            }
            serde_json::json!({
                "metric": name,
                "unit": unit.name,
                "higher_is_better": unit.higher_is_better,
                "rounds": rounds,
                "median": medians,
            })
        })
        .collect();
    let json = serde_json::json!({
        "date": m.date,
        "kernel": m.kernel,
        "cpu": m.cpu,
        "nproc": m.nproc,
        "config": {
            "rounds": cfg.rounds,
            "window_s": secs(cfg.window),
            "warmup_s": secs(cfg.warmup),
            "quick": cfg.quick,
            "idle_conns": cfg.idle_conns,
            "churn_clients": cfg.churn_clients,
            "tool_secs": cfg.tool_secs,
            "redis_requests": cfg.redis_n,
            "redis_churn_connections": cfg.redis_churn_n,
        },
        "targets": targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "versions": versions,
        "metrics": metrics,
        "notes": res.notes,
        "errors": res.errors,
    });
    let text = serde_json::to_string_pretty(&json).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{}.json", cfg.out)), text + "\n")?;
    Ok(dir)
}

// ---------------------------------------------------------------------------

fn main() {
    let mut cfg = Config::from_env();
    let started = Instant::now();
    if cfg.smoke {
        println!("proxy bench: smoke run (pass --bench, as `cargo bench` does, for the suite)");
        loadgen::histogram_self_check();
        loadgen::http_self_check();
        wrk_parse_self_check();
        redis_parse_self_check();
        spread_self_check();
        tap_summary_self_check();
    }
    let mut res = Results::default();
    let mut versions = Vec::new();
    let targets = discover_targets(&cfg, &mut res, &mut versions);

    // Idle connections: client and upstream ends both live in this process.
    let nofile = raise_nofile();
    let budget = nofile.saturating_sub(FD_RESERVE) / 2;
    if cfg.idle_conns > budget {
        res.note(format!(
            "idle connections lowered from {} to {budget} (RLIMIT_NOFILE {nofile}; \
             each connection costs this process two descriptors)",
            cfg.idle_conns
        ));
        cfg.idle_conns = budget.max(1);
    }
    res.note(format!(
        "idle memory uses {} connections; churn keeps {} connections in flight from one \
         event-driven client and closes each with SO_LINGER 0 (RST), so the client side \
         leaves no TIME_WAIT",
        cfg.idle_conns, cfg.churn_clients
    ));

    let env = {
        let tmp = peers::TempDir::new("tcptap-bench").expect("temp dir");
        let iperf3 = if cfg.group_on("iperf3") {
            let p = peers::which("iperf3");
            if p.is_none() {
                res.note("iperf3 not installed: iperf3 row skipped".into());
            }
            p
        } else {
            None
        };
        let redis = if cfg.group_on("redis") {
            match (
                peers::which("redis-server"),
                peers::which("redis-benchmark"),
            ) {
                (Some(srv), Some(_)) => match peers::start_redis_server(&srv, &tmp.0) {
                    Ok((port, g)) => Some((srv, g, port)),
                    Err(e) => {
                        res.note(format!("redis-server failed to start: {e}"));
                        None
                    }
                },
                _ => {
                    res.note(
                        "redis-server/redis-benchmark not installed: redis rows skipped".into(),
                    );
                    None
                }
            }
        } else {
            None
        };
        let wrk = if cfg.group_on("wrk") {
            match peers::which("wrk") {
                Some(bin) => Some((bin, EchoUpstream::start_http().expect("HTTP upstream"))),
                None => {
                    res.note("wrk not installed: wrk rows skipped".into());
                    None
                }
            }
        } else {
            None
        };
        Env {
            bulk: BulkUpstream::start().expect("bulk upstream"),
            echo: EchoUpstream::start().expect("echo upstream"),
            tmp,
            iperf3,
            redis,
            wrk,
            max_conns: cfg.idle_conns + 64,
        }
    };

    let mut scenarios = Vec::new();
    if cfg.group_on("bulk") {
        for conns in [1, 8] {
            for dir in [Dir::Up, Dir::Down, Dir::Both] {
                scenarios.push(Scenario::Bulk { conns, dir });
            }
        }
    }
    if cfg.group_on("rr") {
        scenarios.push(Scenario::PingPong { conns: 1 });
        scenarios.push(Scenario::PingPong { conns: 64 });
    }
    if cfg.group_on("churn") {
        scenarios.push(Scenario::Churn {
            clients: cfg.churn_clients,
        });
    }
    if cfg.group_on("idle") {
        scenarios.push(Scenario::Idle);
    }
    if env.iperf3.is_some() {
        scenarios.push(Scenario::Iperf3);
    }
    if env.redis.is_some() {
        scenarios.push(Scenario::Redis);
        scenarios.push(Scenario::RedisChurn);
    }
    if env.wrk.is_some() {
        scenarios.push(Scenario::Wrk { conns: 64 });
        res.note(format!(
            "wrk: 1 thread, 64 keep-alive connections, each GET answered with a {} KiB body \
             by an HTTP upstream in the harness",
            loadgen::HTTP_BODY / 1024
        ));
    }

    println!(
        "targets: {}; {} rounds, {:.2} s window + {:.2} s warm-up",
        targets
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.rounds,
        secs(cfg.window),
        secs(cfg.warmup)
    );
    let mut skipped_once = std::collections::BTreeSet::new();
    for round in 0..cfg.rounds {
        println!("round {}/{}", round + 1, cfg.rounds);
        for &sc in &scenarios {
            for &i in &order(targets.len(), round, &sc) {
                let t = &targets[i];
                let began = Instant::now();
                match run_scenario(&cfg, &env, sc, t) {
                    Ok(ms) => {
                        let shown: Vec<String> = ms
                            .iter()
                            .map(|(m, u, v)| format!("{m} = {} {}", fmt_num(*v), u.name))
                            .collect();
                        if !shown.is_empty() {
                            println!(
                                "  {:<8} {:.1}s  {}",
                                t.name,
                                secs(began.elapsed()),
                                shown.join(", ")
                            );
                        }
                        for (m, u, v) in ms {
                            res.add(&m, u, &t.name, round, v);
                        }
                    }
                    Err(msg) if msg.starts_with("skipped:") => {
                        if skipped_once.insert((sc.label(), t.name.clone())) {
                            res.note(format!("{} / {}: {msg}", sc.label(), t.name));
                        }
                    }
                    Err(msg) => {
                        let line =
                            format!("round {} {} / {}: {msg}", round + 1, sc.label(), t.name);
                        eprintln!("  error: {line}");
                        res.errors.push(line);
                    }
                }
            }
        }
    }
    drop(env);

    let table = markdown_table(&res, &targets);
    let spread = spread_table(&res, &targets);
    println!("\n{table}");
    if !spread.is_empty() {
        println!("round by round, tcptap/peer: median (middle half) rounds won\n\n{spread}");
    }
    println!("total time: {:.1} s", secs(started.elapsed()));
    if cfg.smoke {
        if !res.errors.is_empty() {
            eprintln!("smoke run: {} errors", res.errors.len());
            std::process::exit(1);
        }
        return;
    }
    let m = machine();
    match write_results(&cfg, &m, &res, &targets, &versions, &table, &spread) {
        Ok(dir) => println!(
            "wrote {}/{name}.md and {name}.json",
            dir.display(),
            name = cfg.out
        ),
        Err(e) => {
            eprintln!("error: cannot write results: {e}");
            std::process::exit(1);
        }
    }
}
