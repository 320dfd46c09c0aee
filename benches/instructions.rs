//! Instructions tcptap executes in user space (valgrind's callgrind), per request, per
//! connection and per MiB.
//!
//! Why: timings on a shared machine move by ±20% between runs, instruction counts by well under
//! 1%, so a change to the proxy's own code shows here as a number before and after. What they
//! leave out is the kernel, which does nearly all of the work on every row of the `proxy` bench
//! (perf: 95–98% of tcptap's CPU): a lower count here is a saving in tcptap's share only.
//!
//! Each workload runs twice against a fresh tcptap under callgrind, with n and with 2n units
//! (requests, connections, MiB); the difference of the two totals divided by n is the cost of
//! one unit, with start-up and shutdown cancelled out. Counts include every tcptap thread (the
//! tap writer too). The splice and copy bulk rows depend on timing: under callgrind tcptap runs
//! tens of times slower than its client, so each wake-up finds full socket buffers and moves
//! more bytes than it would natively; read them as the cost of moving bytes at full buffers, a
//! lower bound. The pcap bulk row captures every byte (a normal-priority writer and a queue
//! larger than the data; tcptap's exit report must show every byte written, none dropped), so
//! that it counts the cost of capturing a MiB rather than how much a timing let the tap take.
//! The rows with a tap move by about 1% as well: how many records share a batch of the writer
//! depends on how many arrive within its linger.
//!
//! Run: `cargo bench --bench instructions` (needs valgrind; about a minute). `TCPTAP_BENCH_BIN`
//! selects the tcptap binary, as for `proxy`. Without `--bench` (`cargo test --benches`) it only
//! checks its parser.

// Shared with the `proxy` bench, which uses all of them.
#[allow(dead_code)]
mod loadgen;
#[allow(dead_code)]
mod peers;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use loadgen::{BulkUpstream, EchoUpstream, MODE_SINK, MSG};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one workload run.
const RUN_LIMIT: Duration = Duration::from_secs(300);
const MIB: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Work {
    /// Requests of 64 bytes, each echoed, over one connection.
    Rr,
    /// The same with requests of 1 KiB of text lines (an HTTP request head): what the log
    /// shows as text rather than as a hexdump.
    RrText,
    /// Connections: connect, one 64-byte request/response, close.
    Churn,
    /// MiB written one way, then EOF, read to the end on the other side.
    Bulk,
}

struct Case {
    name: &'static str,
    /// tcptap arguments, as in the `proxy` bench: `{tmp}` is a private directory,
    /// `config:TEXT` a config file holding TEXT.
    args: &'static [&'static str],
    work: Work,
    n: usize,
    /// The tap must capture every proxied byte (tcptap's exit report says so): a capture that
    /// dropped a share depending on timing would make the count depend on timing too.
    whole_pcap: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "rr 64B",
        args: &[],
        work: Work::Rr,
        n: 2000,
        whole_pcap: false,
    },
    Case {
        name: "rr 64B, pcap",
        args: &["--tap-pcap", "{tmp}/tap.pcap"],
        work: Work::Rr,
        n: 2000,
        whole_pcap: false,
    },
    Case {
        name: "rr 64B, log",
        args: &["--tap-log", "{tmp}/tap.log"],
        work: Work::Rr,
        n: 2000,
        whole_pcap: false,
    },
    Case {
        name: "rr 1K text, log",
        args: &["--tap-log", "{tmp}/tap.log"],
        work: Work::RrText,
        n: 2000,
        whole_pcap: false,
    },
    Case {
        name: "churn",
        args: &[],
        work: Work::Churn,
        n: 300,
        whole_pcap: false,
    },
    Case {
        name: "bulk d→u, splice",
        args: &[],
        work: Work::Bulk,
        // A few thousand instructions per MiB, which wake-ups move by as much: many MiB.
        n: 256,
        whole_pcap: false,
    },
    Case {
        name: "bulk d→u, copy",
        args: &["config:splice = false\n"],
        work: Work::Bulk,
        n: 256,
        whole_pcap: false,
    },
    // A writer at normal priority and a queue larger than the data: nothing is dropped.
    Case {
        name: "bulk d→u, pcap",
        args: &[
            "--tap-pcap",
            "{tmp}/tap.pcap",
            "config:[tap]\nwriter_priority = \"normal\"\nqueue_size = \"256 MiB\"\n",
        ],
        work: Work::Bulk,
        n: 32,
        whole_pcap: true,
    },
];

impl Work {
    fn unit(self) -> &'static str {
        match self {
            Work::Rr | Work::RrText => "request",
            Work::Churn => "connection",
            Work::Bulk => "MiB",
        }
    }

    /// Runs `n` units against the proxy at `addr`; `sunk` counts the bytes the bulk upstream
    /// read, to check that a bulk run delivered every byte.
    fn run(self, addr: SocketAddr, n: usize, sunk: &AtomicU64) -> io::Result<()> {
        let deadline = Instant::now() + RUN_LIMIT;
        let in_time = || {
            if Instant::now() < deadline {
                Ok(())
            } else {
                Err(io::Error::other(format!("not done after {RUN_LIMIT:?}")))
            }
        };
        let connect = || -> io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            Ok(s)
        };
        let echo = |mut s: &TcpStream, msg: &[u8]| -> io::Result<()> {
            s.write_all(msg)?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back)?;
            if back != msg {
                return Err(io::Error::other("echo returned other bytes"));
            }
            Ok(())
        };
        let ping = |s: &TcpStream, i: usize| echo(s, &[(i % 251) as u8; MSG]);
        match self {
            Work::Rr | Work::RrText => {
                let s = connect()?;
                for i in 0..n {
                    match self {
                        Work::RrText => echo(&s, &text_request(i))?,
                        _ => ping(&s, i)?,
                    }
                    in_time()?;
                }
                loadgen::close_with_rst(s);
            }
            Work::Churn => {
                for i in 0..n {
                    let s = connect()?;
                    ping(&s, i)?;
                    loadgen::close_with_rst(s);
                    in_time()?;
                }
            }
            Work::Bulk => {
                let before = sunk.load(Ordering::Relaxed);
                let mut s = connect()?;
                s.write_all(&[MODE_SINK])?;
                let chunk = vec![0x5au8; MIB];
                for _ in 0..n {
                    s.write_all(&chunk)?;
                    in_time()?;
                }
                s.shutdown(Shutdown::Write)?;
                // The sink closes after our EOF reached it, and the proxy passes that on.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)?;
                let got = sunk.load(Ordering::Relaxed) - before;
                if got != (n * MIB) as u64 {
                    return Err(io::Error::other(format!(
                        "the upstream read {got} bytes, not {}",
                        n * MIB
                    )));
                }
            }
        }
        Ok(())
    }
}

/// 1 KiB of HTTP-like request: a head numbered `i`, then a body of dots.
fn text_request(i: usize) -> Vec<u8> {
    let mut r = format!("GET /items/{i} HTTP/1.1\r\nHost: example.test\r\n").into_bytes();
    for h in 0.. {
        let line = format!("X-Header-{h}: value {i} of the request, some text\r\n");
        if r.len() + line.len() + 2 > 1024 {
            break;
        }
        r.extend_from_slice(line.as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.resize(1024, b'.');
    r
}

/// The total instruction count (`Ir`) of a callgrind output file: its `totals:` line, or the
/// `summary:` line of older valgrind versions.
fn callgrind_total(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l
            .strip_prefix("totals:")
            .or_else(|| l.strip_prefix("summary:"))?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Starts tcptap under callgrind in front of `upstream`, runs `n` units of `work`, stops it
/// with SIGTERM (a graceful shutdown, after which callgrind writes its file) and returns the
/// instructions it executed.
fn measure(
    valgrind: &Path,
    bin: &Path,
    case: &Case,
    (upstream, sunk): (SocketAddr, &AtomicU64),
    n: usize,
) -> Result<u64, String> {
    let tmp = peers::TempDir::new("tcptap-instructions").map_err(|e| e.to_string())?;
    let dir = &tmp.0;
    let out = dir.join("callgrind.out");
    // Options given here, not taken from VALGRIND_OPTS or a ~/.valgrindrc, which could rename
    // the output or split it per thread.
    let wrapper = [
        valgrind.display().to_string(),
        "--command-line-only=yes".to_owned(),
        "--tool=callgrind".to_owned(),
        "--quiet".to_owned(),
        "--separate-threads=no".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let args: Vec<String> = case.args.iter().map(|a| a.to_string()).collect();
    let (addr, guard) = peers::start_tcptap(case.name, &wrapper, bin, &args, upstream, dir)
        .map_err(|e| e.to_string())?;
    case.work
        .run(addr, n, sunk)
        .map_err(|e| format!("{} with n = {n}: {e}\n{}", case.name, guard.log_tail()))?;
    let log = guard.log.clone();
    match guard.terminate(Duration::from_secs(60)) {
        Some(st) if st.success() => {}
        other => {
            return Err(format!(
                "{}: tcptap under callgrind did not exit cleanly ({other:?}):\n{}",
                case.name,
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
    }
    if case.whole_pcap {
        // tcptap's last words count what the tap wrote and dropped.
        let text = std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        // The bytes proxied: n MiB after the one byte that selects the upstream's mode.
        let proxied = n * MIB + 1;
        let wrote_all = format!("({proxied} bytes) written, 0 records (0 bytes) dropped");
        if !text.contains(&wrote_all) {
            return Err(format!(
                "{}: the tap did not capture exactly the {n} MiB proxied:\n{text}",
                case.name
            ));
        }
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    callgrind_total(&text).ok_or_else(|| format!("{}: no totals line", out.display()))
}

fn self_check() {
    let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\nfn=(1) main\n16 3\n\
                totals: 123456789\n";
    assert_eq!(callgrind_total(text), Some(123_456_789));
    assert_eq!(callgrind_total("summary: 42\n"), Some(42));
    assert_eq!(callgrind_total("events: Ir\n"), None);
}

fn main() {
    self_check();
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "instructions bench: parser checked (pass --bench, as `cargo bench` does, to run)"
        );
        return;
    }
    let Some(valgrind) = peers::which("valgrind") else {
        println!("instructions bench: valgrind is not installed; nothing measured");
        return;
    };
    let bin = match peers::tcptap_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{}; tcptap at {}",
        peers::version_line(&valgrind, &["--version"]),
        bin.display()
    );
    let echo = EchoUpstream::start().expect("echo upstream");
    let bulk = BulkUpstream::start().expect("bulk upstream");
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = false;
    for case in CASES {
        let upstream = match case.work {
            Work::Bulk => bulk.addr,
            Work::Rr | Work::RrText | Work::Churn => echo.addr,
        };
        let counts: Result<Vec<u64>, String> = [case.n, 2 * case.n]
            .iter()
            .map(|&n| measure(&valgrind, &bin, case, (upstream, &bulk.rx_bytes), n))
            .collect();
        match counts {
            Ok(c) => {
                let per = (c[1] as f64 - c[0] as f64) / case.n as f64;
                println!(
                    "  {:<18} {:>12.0} instructions per {} (totals {} and {} for n = {} and {})",
                    case.name,
                    per,
                    case.work.unit(),
                    c[0],
                    c[1],
                    case.n,
                    2 * case.n
                );
                rows.push((case, per));
            }
            Err(e) => {
                eprintln!("  error: {e}");
                failed = true;
            }
        }
    }
    println!("\n| workload | tcptap instructions (user space) | per |\n|---|---:|---|");
    for (case, per) in &rows {
        println!("| {} | {:.0} | {} |", case.name, per, case.work.unit());
    }
    println!("\ntotal time: {:.1} s", started.elapsed().as_secs_f64());
    if failed {
        std::process::exit(1);
    }
}
