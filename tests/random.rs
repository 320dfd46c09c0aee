//! Many connections with random sizes, chunking, pauses and close orders; every byte checked.
//! The seed is printed; set TCPTAP_SEED to replay a run.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;

also_with_two_workers!(random_connections_every_byte_checked);

/// The same traffic over the copying path (splice off) instead of the zero-copy one.
#[test]
fn random_connections_copying_path() {
    run_random("splice = false");
}

/// Small socket buffers on the proxy: a splice into a socket takes a fraction of what a kernel
/// pipe holds, and, with clients that read slowly, a peer often ends its stream while the proxy
/// still holds much of it.
#[test]
fn random_connections_small_socket_buffers() {
    run_random(SMALL_SOCKET_BUFFERS);
}

/// The same with a pcap tap: spliced bytes are duplicated into the tap's pipes with `tee(2)`.
#[test]
fn random_connections_small_socket_buffers_tapped() {
    run_tapped("pcap = \"{dir}/random.pcap\"");
}

/// A tap whose queue holds 4 KiB: it is full most of the time, so directions switch between
/// teeing and dropping in the middle of their streams.
#[test]
fn random_connections_with_a_tap_that_keeps_dropping() {
    run_tapped("pcap = \"{dir}/random.pcap\"\nqueue_size = \"4 KiB\"");
}

/// A log tap with a snaplen: a direction past 100 KiB stops being tapped mid-stream.
#[test]
fn random_connections_with_a_tap_snaplen() {
    run_tapped("log = \"{dir}/random.log\"\nsnaplen = \"100 KiB\"\nqueue_size = \"256 KiB\"");
}

/// [`run_random`] through small socket buffers with the `[tap]` table `tap`, where `{dir}` is a
/// directory of the test's own.
fn run_tapped(tap: &str) {
    let dir = TempDir::new("random-tap");
    let tap = tap.replace("{dir}", &dir.0.display().to_string());
    run_random(&format!("{SMALL_SOCKET_BUFFERS}\n[tap]\n{tap}"));
}

const SMALL_SOCKET_BUFFERS: &str =
    "[socket]\nsend_buffer_size = \"16 KiB\"\nrecv_buffer_size = \"16 KiB\"";

/// What one connection does, derived from its seed.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    up_len: usize,
    down_len: usize,
    /// 0: upstream replies after the client's EOF; 1: both stream at once; 2: upstream sends and
    /// closes its write side first, then reads.
    order: u64,
    /// The client reads in small pieces with pauses.
    slow_reader: bool,
}

impl Plan {
    fn new(seed: u64) -> Plan {
        let mut p = Pattern::new(seed);
        let size = |p: &mut Pattern| match p.below(4) {
            0 => p.below(16) as usize,
            1 => p.below(4096) as usize,
            2 => p.below(200_000) as usize,
            _ => p.below(2_000_000) as usize,
        };
        Plan {
            seed,
            up_len: size(&mut p),
            down_len: size(&mut p),
            order: p.below(3),
            slow_reader: p.below(4) == 0,
        }
    }

    fn encode(&self) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[..8].copy_from_slice(&self.seed.to_le_bytes());
        h[8..16].copy_from_slice(&(self.up_len as u64).to_le_bytes());
        h[16..].copy_from_slice(&(self.down_len as u64).to_le_bytes());
        h
    }

    fn decode(h: [u8; 24]) -> Plan {
        let seed = u64::from_le_bytes(h[..8].try_into().unwrap());
        let plan = Plan::new(seed);
        assert_eq!(
            plan.up_len as u64,
            u64::from_le_bytes(h[8..16].try_into().unwrap())
        );
        assert_eq!(
            plan.down_len as u64,
            u64::from_le_bytes(h[16..].try_into().unwrap())
        );
        plan
    }
}

/// Writes `len` pattern bytes in random chunks with occasional short pauses.
fn send_chunked(s: &mut TcpStream, seed: u64, len: usize, rng: &mut Pattern) {
    let data = Pattern::bytes(seed, len);
    let mut off = 0;
    while off < len {
        let n = (1 + rng.below(65_536) as usize).min(len - off);
        s.write_all(&data[off..off + n]).unwrap();
        off += n;
        if rng.below(16) == 0 {
            thread::sleep(Duration::from_micros(rng.below(3000)));
        }
    }
}

fn recv_all(s: &mut TcpStream, seed: u64, len: usize) -> Result<(), String> {
    let got = read_to_end(s, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    check(got, seed, len)
}

/// Like [`recv_all`], reading at most 16 KiB at a time with a pause of up to 2 ms after every
/// fourth read: the proxy's buffers toward this client fill and stay full.
fn recv_all_slowly(
    s: &mut TcpStream,
    seed: u64,
    len: usize,
    rng: &mut Pattern,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    for reads in 0u64.. {
        if std::time::Instant::now() > deadline {
            return Err(format!("timed out after {} bytes", got.len()));
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("after {} bytes: {e}", got.len())),
        }
        if reads % 4 == 3 {
            thread::sleep(Duration::from_micros(rng.below(2000)));
        }
    }
    check(got, seed, len)
}

fn check(got: Vec<u8>, seed: u64, len: usize) -> Result<(), String> {
    if got.len() != len {
        return Err(format!("got {} bytes, expected {len}", got.len()));
    }
    if got != Pattern::bytes(seed, len) {
        return Err("byte mismatch".into());
    }
    Ok(())
}

fn upstream_side(mut s: TcpStream) -> Result<(), String> {
    let mut h = [0u8; 24];
    s.read_exact(&mut h).map_err(|e| e.to_string())?;
    let plan = Plan::decode(h);
    let mut rng = Pattern::new(plan.seed ^ 0xAA);
    match plan.order {
        0 => {
            recv_all(&mut s, plan.seed + 1, plan.up_len)?;
            send_chunked(&mut s, plan.seed + 2, plan.down_len, &mut rng);
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())
        }
        1 => {
            let mut w = s.try_clone().unwrap();
            let t = thread::spawn(move || {
                send_chunked(&mut w, plan.seed + 2, plan.down_len, &mut rng);
                w.shutdown(Shutdown::Write).unwrap();
            });
            let r = recv_all(&mut s, plan.seed + 1, plan.up_len);
            t.join()
                .map_err(|_| "upstream writer panicked".to_string())?;
            r
        }
        _ => {
            send_chunked(&mut s, plan.seed + 2, plan.down_len, &mut rng);
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            recv_all(&mut s, plan.seed + 1, plan.up_len)
        }
    }
}

fn client_side(addr: std::net::SocketAddr, plan: Plan) -> Result<(), String> {
    let mut s = connect(addr);
    let mut rng = Pattern::new(plan.seed ^ 0x55);
    let mut read_rng = Pattern::new(plan.seed ^ 0x77);
    let mut receive = |s: &mut TcpStream| {
        if plan.slow_reader {
            recv_all_slowly(s, plan.seed + 2, plan.down_len, &mut read_rng)
        } else {
            recv_all(s, plan.seed + 2, plan.down_len)
        }
    };
    s.write_all(&plan.encode()).unwrap();
    match plan.order {
        0 => {
            send_chunked(&mut s, plan.seed + 1, plan.up_len, &mut rng);
            s.shutdown(Shutdown::Write).unwrap();
            receive(&mut s)
        }
        1 => {
            let mut w = s.try_clone().unwrap();
            let t = thread::spawn(move || {
                send_chunked(&mut w, plan.seed + 1, plan.up_len, &mut rng);
                w.shutdown(Shutdown::Write).unwrap();
            });
            let r = receive(&mut s);
            t.join().map_err(|_| "client writer panicked".to_string())?;
            r
        }
        _ => {
            receive(&mut s)?;
            send_chunked(&mut s, plan.seed + 1, plan.up_len, &mut rng);
            s.shutdown(Shutdown::Write).unwrap();
            // Wait for the proxy to close our socket: the pair is done.
            read_to_end(&mut s, Duration::from_secs(30))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

#[test]
fn random_connections_every_byte_checked() {
    run_random("");
}

fn run_random(extra: &str) {
    let seed: u64 = std::env::var("TCPTAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("TCPTAP_SEED={seed}");
    const CONNS: u64 = 240;
    const PARALLEL: u64 = 24;
    let (utx, urx) = mpsc::channel();
    let up = Upstream::start(move |s| {
        utx.send(upstream_side(s)).unwrap();
    });
    // A small buffer makes partial writes and backpressure common.
    let config = one_route(
        "127.0.0.1:0",
        up.addr,
        &format!("buffer_size = \"4 KiB\"\n{extra}"),
    );
    let proxy = Proxy::with_config(&config, 1);
    let addr = proxy.addr();
    let mut workers = Vec::new();
    for w in 0..PARALLEL {
        workers.push(thread::spawn(move || {
            let mut failures = Vec::new();
            for i in (w..CONNS).step_by(PARALLEL as usize) {
                let plan = Plan::new(seed.wrapping_add(i * 1_000_003));
                if let Err(e) = client_side(addr, plan) {
                    failures.push(format!("{plan:?}: client: {e}"));
                }
            }
            failures
        }));
    }
    let mut failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    for _ in 0..CONNS {
        match urx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("upstream: {e}")),
            Err(_) => failures.push("an upstream handler never finished".into()),
        }
    }
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    proxy.wait_count("closed first", CONNS as usize, Duration::from_secs(30));
}
