//! The tap through the real binary: the live log, the pcap (read back with independent parsers and,
//! when installed, with tshark), and sinks that block or fail without affecting proxying.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// One direction of a conversation as the capture tells it.
#[derive(Debug, Default, Clone)]
struct Flow {
    isn: Option<u32>,
    /// Payload by stream offset (relative to isn + 1).
    data: BTreeMap<u64, Vec<u8>>,
    fin_at: Option<u64>,
    rst: bool,
    /// Stream offset of the RST's sequence number (a FIN before it counts one).
    rst_at: Option<u64>,
}

impl Flow {
    /// Bytes in order; panics on a hole unless `allow_holes`.
    fn bytes(&self, allow_holes: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (&off, d) in &self.data {
            if !allow_holes {
                assert_eq!(
                    off,
                    out.len() as u64,
                    "hole in the capture at offset {}",
                    out.len()
                );
            }
            out.extend_from_slice(d);
        }
        out
    }
}

/// Parses a pcap into flows keyed by (source, destination).
fn read_pcap(path: &Path) -> BTreeMap<(SocketAddr, SocketAddr), Flow> {
    read_pcap_from(path, true)
}

/// Like `read_pcap`; unless `whole`, the capture may start in the middle of connections,
/// whose segments (before any SYN) are skipped.
fn read_pcap_from(path: &Path, whole: bool) -> BTreeMap<(SocketAddr, SocketAddr), Flow> {
    let file = std::fs::File::open(path).expect("open pcap");
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap header");
    let mut flows: BTreeMap<(SocketAddr, SocketAddr), Flow> = BTreeMap::new();
    while let Some(p) = reader.next_packet() {
        let p = p.expect("pcap packet");
        let sliced = SlicedPacket::from_ethernet(&p.data).expect("ethernet frame");
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            panic!("not TCP")
        };
        let (src, dst): (std::net::IpAddr, std::net::IpAddr) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            other => panic!("unexpected network layer {other:?}"),
        };
        let key = (
            SocketAddr::new(src, tcp.source_port()),
            SocketAddr::new(dst, tcp.destination_port()),
        );
        let f = flows.entry(key).or_default();
        if tcp.syn() {
            f.isn = Some(tcp.sequence_number());
            continue;
        }
        let Some(isn) = f.isn else {
            assert!(!whole, "segment before SYN");
            continue;
        };
        let off = u64::from(tcp.sequence_number().wrapping_sub(isn).wrapping_sub(1));
        if !tcp.payload().is_empty() {
            f.data.insert(off, tcp.payload().to_vec());
        }
        if tcp.fin() {
            f.fin_at = Some(off + tcp.payload().len() as u64);
        }
        if tcp.rst() {
            f.rst = true;
            f.rst_at = Some(off);
        }
    }
    flows
}

fn tshark() -> Option<&'static str> {
    let found = Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("CI").is_some() {
        panic!("tshark is not installed: .ci/run must install it");
    }
    if !found {
        eprintln!("tshark not installed: skipping the tshark checks");
    }
    found.then_some("tshark")
}

/// `tshark -qz follow,tcp,raw,N`: (client bytes, server bytes).
fn tshark_follow(path: &Path, stream: usize) -> (Vec<u8>, Vec<u8>) {
    let out = Command::new("tshark")
        .args([
            "-r",
            path.to_str().unwrap(),
            "-qz",
            &format!("follow,tcp,raw,{stream}"),
        ])
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let body = text
        .split("===================================================================")
        .nth(1)
        .unwrap_or("");
    for line in body.lines().skip(4) {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('\t') {
            b.extend(hex(rest.trim()));
        } else if line.chars().all(|c| c.is_ascii_hexdigit()) {
            a.extend(hex(line.trim()));
        }
    }
    (a, b)
}

/// An upstream that reads a 16-byte header (seed, reply length), the client's bytes to EOF, then
/// replies; `reset` in the header's top bit makes it reset instead of replying.
fn reply_upstream(tx: mpsc::Sender<Vec<u8>>) -> Upstream {
    Upstream::start(move |mut s| {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let seed = u64::from_le_bytes(h[..8].try_into().unwrap());
        let len = u64::from_le_bytes(h[8..].try_into().unwrap());
        if len == u64::MAX {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            tx.send(h.to_vec()).unwrap();
            return;
        }
        let mut got = h.to_vec();
        got.extend(read_to_end(&mut s, Duration::from_secs(30)).unwrap());
        tx.send(got).unwrap();
        send_pattern(&mut s, seed, len as usize).unwrap();
    })
}

fn header(seed: u64, reply: u64) -> Vec<u8> {
    let mut h = seed.to_le_bytes().to_vec();
    h.extend(reply.to_le_bytes());
    h
}

#[test]
fn pcap_reproduces_concurrent_connections_byte_exact() {
    let dir = TempDir::new("pcap");
    let pcap = dir.path("cap.pcap");
    let (tx, rx) = mpsc::channel();
    let up = reply_upstream(tx);
    let mut proxy = Proxy::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up.addr.to_string(),
            "--tap-pcap",
            pcap.to_str().unwrap(),
        ],
        1,
    );
    let sizes = [
        (0usize, 5u64),
        (100, 0),
        (70_000, 300_000),
        (1 << 20, 1 << 20),
        (3, 200_000),
        (12_345, 1),
    ];
    let addr = proxy.addr();
    let clients: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(up_len, down_len))| {
            thread::spawn(move || {
                let mut c = connect(addr);
                let mut sent = header(i as u64 + 100, down_len);
                sent.extend(Pattern::bytes(i as u64, up_len));
                c.write_all(&sent).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let got = read_to_end(&mut c, Duration::from_secs(30)).unwrap();
                assert!(
                    got == Pattern::bytes(i as u64 + 100, down_len as usize),
                    "reply {i} corrupted"
                );
                (c.local_addr().unwrap(), sent, got)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    // One more connection that the upstream resets.
    let mut c = connect(addr);
    c.write_all(&header(1, u64::MAX)).unwrap();
    assert!(read_to_end(&mut c, PROMPT).is_err(), "expected a reset");
    let reset_client = c.local_addr().unwrap();
    for _ in 0..=sizes.len() {
        rx.recv_timeout(PROMPT).unwrap();
    }
    proxy.wait_count("bytes to client", sizes.len() + 1, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));

    let flows = read_pcap(&pcap);
    for (client, sent, got) in &results {
        let c2s = &flows[&(*client, up.addr)];
        let s2c = &flows[&(up.addr, *client)];
        assert!(
            c2s.bytes(false) == *sent,
            "{client}: client bytes differ in the capture"
        );
        assert!(
            s2c.bytes(false) == *got,
            "{client}: upstream bytes differ in the capture"
        );
        assert_eq!(c2s.fin_at, Some(sent.len() as u64), "{client}: client FIN");
        assert_eq!(s2c.fin_at, Some(got.len() as u64), "{client}: upstream FIN");
    }
    assert!(
        flows[&(up.addr, reset_client)].rst,
        "the upstream's reset is in the capture"
    );

    let Some(_) = tshark() else { return };
    // tshark numbers streams in order of first packet; map each by its client port.
    let out = Command::new("tshark")
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "tcp.stream",
            "-e",
            "tcp.srcport",
            "-Y",
            "tcp.flags.syn==1 && tcp.flags.ack==0",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    for (client, sent, got) in &results {
        let stream: usize = listing
            .lines()
            .find(|l| l.split('\t').nth(1) == Some(&client.port().to_string()))
            .and_then(|l| l.split('\t').next()?.parse().ok())
            .unwrap_or_else(|| panic!("tshark does not list {client}: {listing}"));
        let (a, b) = tshark_follow(&pcap, stream);
        assert!(
            a == *sent,
            "tshark: client bytes of {client} differ ({} vs {})",
            a.len(),
            sent.len()
        );
        assert!(
            b == *got,
            "tshark: upstream bytes of {client} differ ({} vs {})",
            b.len(),
            got.len()
        );
    }
    let expert = Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-qz", "expert,warn"])
        .output()
        .unwrap();
    let expert = String::from_utf8_lossy(&expert.stdout);
    for line in expert.lines() {
        let l = line.to_lowercase();
        if l.contains("malformed")
            || l.contains("checksum")
            || l.contains("not captured")
            || l.contains("unseen")
        {
            panic!("tshark complains: {line}\n{expert}");
        }
    }
}

#[test]
fn tap_log_shows_events_and_bytes() {
    let dir = TempDir::new("log");
    let log = dir.path("tap.log");
    let (tx, rx) = mpsc::channel();
    let up = reply_upstream(tx);
    let mut proxy = logging_to(up.addr, &log);
    let mut c = connect(proxy.addr());
    let mut sent = header(5, 40);
    sent.extend(b"GET / HTTP/1.1\r\nHost: tcptap\r\n\r\n");
    c.write_all(&sent).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c, PROMPT).unwrap().len(), 40);
    let mut r = connect(proxy.addr());
    r.write_all(&header(1, u64::MAX)).unwrap();
    assert!(read_to_end(&mut r, PROMPT).is_err());
    rx.recv_timeout(PROMPT).unwrap();
    rx.recv_timeout(PROMPT).unwrap();
    proxy.wait_count("bytes to client", 2, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let client = c.local_addr().unwrap();
    let head = format!("#1 {client} -> {}", up.addr);
    let lines: Vec<&str> = text.lines().collect();
    let find = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in tap log:\n{text}"))
    };
    let open = find(&format!("{head} open"));
    let data = find(&format!("{head} client -> upstream {} bytes", sent.len()));
    let fin_c = find(&format!(
        "{head} FIN from client after {} bytes",
        sent.len()
    ));
    let reply = find(&format!("{head} upstream -> client 40 bytes"));
    let fin_u = find(&format!("{head} FIN from upstream after 40 bytes"));
    let close = find(&format!("{head} close: closed"));
    assert!(
        open < data && data < fin_c && fin_c < reply && reply < fin_u && fin_u < close,
        "{text}"
    );
    // The header's binary bytes come as a hexdump, the pattern reply too.
    assert!(lines[data + 1].contains("00000000"), "{text}");
    assert!(text.contains(&format!("#2 {} -> {}", r.local_addr().unwrap(), up.addr)));
    assert!(text.contains("RESET by upstream"), "{text}");
    assert!(text.contains("close: reset by upstream"), "{text}");
    // Timestamps are RFC 3339 UTC with microseconds.
    let ts = lines[open].split(' ').next().unwrap();
    assert!(
        ts.len() == 27 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
        "{ts}"
    );
}

#[test]
fn text_payload_is_shown_as_text() {
    let dir = TempDir::new("log");
    let log = dir.path("tap.log");
    let echo = Upstream::echo();
    let mut proxy = logging_to(echo.addr, &log);
    let mut c = connect(proxy.addr());
    c.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    assert_eq!(read_n(&mut c, 14, PROMPT).unwrap(), b"*1\r\n$4\r\nPING\r\n");
    drop(c);
    proxy.wait_count("bytes to client", 1, PROMPT);
    proxy.signal(SIGTERM);
    proxy.wait_exit(TAP_FLUSH);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("  > *1\n  > $4\n  > PING\n"), "{text}");
    assert!(text.contains("  < PING\n"), "{text}");
}

#[test]
fn a_log_appended_to_by_two_runs_says_where_each_begins() {
    let dir = TempDir::new("log");
    let log = dir.path("tap.log");
    let echo = Upstream::echo();
    let mut runs = Vec::new();
    for msg in [&b"first run\n"[..], b"second run\n"] {
        let mut proxy = logging_to(echo.addr, &log);
        let client = echo_once(proxy.addr(), msg);
        proxy.wait_count("bytes to client", 1, PROMPT);
        proxy.signal(SIGTERM);
        assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
        runs.push((proxy.pid(), client));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let openings: Vec<usize> = (lines.iter().enumerate())
        .filter(|(_, l)| l.ends_with("opened this log"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(openings.len(), 2, "{text}");
    assert_eq!(
        openings[0], 0,
        "the first line says who opened the log:\n{text}"
    );
    for (k, &(pid, client)) in runs.iter().enumerate() {
        let line = lines[openings[k]];
        let ts = line.split(' ').next().unwrap();
        assert!(ts.len() == 27 && ts.ends_with('Z'), "{line}");
        assert!(
            line.contains(&format!(
                " tcptap {} (pid {pid}) ",
                env!("CARGO_PKG_VERSION")
            )),
            "{line}"
        );
        // Each run's connections follow its own line, ids from #1 again.
        let end = openings.get(k + 1).copied().unwrap_or(lines.len());
        let run = &lines[openings[k] + 1..end];
        assert!(
            run[0].contains(&format!("#1 {client} -> {} open", echo.addr)),
            "{text}"
        );
        assert!(run.iter().all(|l| !l.contains(" #2 ")), "{text}");
    }
    assert!(text.contains("  > first run\n"), "{text}");
    assert!(text.contains("  > second run\n"), "{text}");
}

/// A proxy toward `upstream` with its text log in the file `log`.
fn logging_to(upstream: SocketAddr, log: &Path) -> Proxy {
    Proxy::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
            "--tap-log",
            log.to_str().unwrap(),
        ],
        1,
    )
}

/// Time to push `len` bytes through `addr` into a discarding upstream.
fn transfer_time(addr: SocketAddr, len: usize) -> Duration {
    let mut c = connect(addr);
    let start = Instant::now();
    send_pattern(&mut c, 3, len).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    // The upstream answers with the byte count once it has read everything.
    let got = read_n(&mut c, 8, Duration::from_secs(60)).unwrap();
    assert_eq!(u64::from_le_bytes(got.try_into().unwrap()), len as u64);
    start.elapsed()
}

fn counting_upstream() -> Upstream {
    Upstream::start(|mut s| {
        let mut n = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = s.write_all(&n.to_le_bytes());
    })
}

/// Tee pipes that a lagging writer made are closed once it has emptied them, without waiting for
/// more tapped traffic to do it: one stays, for the next tee.
#[test]
fn tee_pipes_a_writer_has_emptied_are_closed_without_more_traffic() {
    const LEN: usize = 32 << 20;
    let dir = TempDir::new("tee-trim");
    let fifo = dir.path("late-reader");
    mkfifo(&fifo);
    let up = counting_upstream();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[tap]\nlog = \"{}\"\nqueue_size = \"4 MiB\"\n\
         writer_priority = \"normal\"\n{}",
        fifo.display(),
        one_route("127.0.0.1:0", up.addr, "")
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let admin = proxy.admin_addr();
    proxy.wait_log("is a FIFO with no reader yet", PROMPT);
    let pipes = || metric(&http_get(admin, "/metrics").1, "tcptap_kernel_pipes").unwrap();
    // Nobody reads the log yet: the tees of the transfer wait in pipes the writer has not read.
    transfer_time(proxy.addr(), LEN);
    let held = pipes() as usize;
    assert!(held >= 2, "{held} pipes held after the transfer");
    let fds = pipe_fds(proxy.pid());
    // A reader comes, and the writer empties them.
    let reader = thread::spawn(move || {
        let mut f = std::fs::File::open(&fifo).unwrap();
        std::io::copy(&mut f, &mut std::io::sink()).unwrap()
    });
    // All but one close, within the pool's trim period: watched in /proc, since a request for
    // the metrics would wake the event loop, and this must happen with nothing to wake it.
    let deadline = Instant::now() + Duration::from_secs(25);
    while pipe_fds(proxy.pid()) > fds - 2 * (held - 1) {
        assert!(
            Instant::now() < deadline,
            "{} pipe descriptors, {fds} with {held} pipes after the transfer",
            pipe_fds(proxy.pid())
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pipes(), 1.0);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    assert!(reader.join().unwrap() > 0, "the log reached the reader");
}

/// At shutdown, a tap writer that cannot write what is queued (its FIFO has no reader) is
/// waited for up to the drain timeout, and the log says so; an interrupt then stops at once, as
/// during the drain, with the records it held counted as dropped.
#[test]
fn an_interrupt_stops_the_wait_for_a_tap_writer_at_shutdown() {
    let dir = TempDir::new("fifo-exit");
    let fifo = dir.path("nobody-reads");
    mkfifo(&fifo);
    let echo = Upstream::echo();
    let mut proxy = logging_to(echo.addr, &fifo);
    proxy.wait_log("is a FIFO with no reader yet", PROMPT);
    echo_once(proxy.addr(), b"never logged\n");
    proxy.wait_count("bytes to client", 1, PROMPT);
    proxy.signal(SIGTERM);
    // The drain timeout is 30 s: the wait is announced after a second.
    let line = proxy.wait_log("for its writer to write", PROMPT);
    assert!(
        line.contains("WARN")
            && line.contains("nobody-reads")
            && line.contains("waiting up to")
            && line.contains("interrupt again"),
        "{line}"
    );
    let asked = Instant::now();
    proxy.signal(SIGINT);
    let status = proxy.wait_exit(PROMPT);
    assert_eq!(status.code(), Some(130), "{}", proxy.logs());
    assert!(asked.elapsed() < PROMPT, "{:?}", asked.elapsed());
    // What it held counts as dropped.
    let logs = proxy.logs();
    let totals = (logs.lines())
        .find(|l| l.contains("bytes) written,"))
        .unwrap_or_else(|| panic!("no totals:\n{logs}"));
    assert!(
        totals.contains(": 0 records (0 bytes) written") && !totals.contains(", 0 records"),
        "{totals}"
    );
    assert!(logs.contains("interrupted;"), "{logs}");
}

/// The pipe descriptors process `pid` holds, standard input and output aside.
fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) > Some(2))
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

#[test]
fn blocked_tap_sink_neither_hangs_nor_slows_proxying() {
    const LEN: usize = 96 << 20;
    let dir = TempDir::new("fifo");
    let fifo = dir.path("nobody-reads");
    mkfifo(&fifo);
    let up = counting_upstream();
    let plain = Proxy::forwarding_to(up.addr);
    let config = format!(
        "drain_timeout = \"1s\"\n[tap]\nlog = \"{}\"\nqueue_size = \"1 MiB\"\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        fifo.display(),
        up.addr
    );
    let mut tapped = Proxy::with_config(&config, 1);
    // Nothing would read the FIFO: the start says what follows.
    let line = tapped.wait_log("is a FIFO with no reader yet", PROMPT);
    assert!(
        line.contains("WARN") && line.contains("nobody-reads"),
        "{line}"
    );
    let (mut t_plain, mut t_tapped) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        t_plain.push(transfer_time(plain.addr(), LEN));
        t_tapped.push(transfer_time(tapped.addr(), LEN));
    }
    t_plain.sort();
    t_tapped.sort();
    let (p, t) = (t_plain[1], t_tapped[1]);
    eprintln!("median 96 MiB: tap off {p:?}, tap blocked {t:?}");
    // Generous: the benchmark measures this precisely; here a stall or a crawl must fail.
    assert!(
        t < p * 3 + Duration::from_millis(500),
        "blocked tap slowed proxying: {t:?} vs {p:?}"
    );
    let start = Instant::now();
    tapped.signal(SIGTERM);
    assert_eq!(tapped.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(8));
    let line = tapped.wait_log("write errors", PROMPT);
    let dropped: u64 = line
        .split(", ")
        .find(|p| p.contains("dropped"))
        .and_then(|p| p.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {line:?}"));
    assert!(dropped > 0, "{line}");
}

/// A tap output that stops taking writes (a FIFO whose reader never reads) is warned about once
/// the writer has been stuck in it for 5 s: a stuck writer cannot report its own drops.
#[test]
fn a_tap_stuck_in_its_output_is_warned_about() {
    let dir = TempDir::new("fifo-stuck");
    let fifo = dir.path("never-read");
    mkfifo(&fifo);
    // Opened for reading and never read: writes block once the pipe is full.
    let _reader = open_fifo_reader(&fifo);
    let up = Upstream::echo();
    let proxy = Proxy::start(&capture_args(up.addr, fifo.to_str().unwrap()), 1);
    let bulk = Pattern::bytes(9, 1 << 20);
    echo_until_logged(&proxy, "its output has taken nothing", &bulk, 20_000);
    let line = proxy.wait_log("its output has taken nothing", PROMPT);
    assert!(
        line.contains("WARN") && line.contains("never-read"),
        "{line}"
    );
    // Proxying went on meanwhile: the last round-trip was whole.
    echo_once(proxy.addr(), b"still proxying");
}

#[test]
fn full_disk_tap_does_not_affect_proxying() {
    let echo = Upstream::echo();
    // The writer renders whatever is queued before exiting, bounded by the drain timeout. At
    // normal priority, so that it gets to write (and fail) within that second on a busy machine.
    let config = format!(
        "drain_timeout = \"1s\"\n[tap]\npcap = \"/dev/full\"\nlog = \"/dev/full\"\n\
         writer_priority = \"normal\"\n\
         [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        echo.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let data = Pattern::bytes(4, 8 << 20);
    let mut c = connect(proxy.addr());
    let mut w = c.try_clone().unwrap();
    let d = data.clone();
    let t = thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    assert!(read_to_end(&mut c, Duration::from_secs(30)).unwrap() == data);
    t.join().unwrap();
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let line = proxy.wait_log("write errors", PROMPT);
    assert!(!line.contains(" 0 write errors"), "{line}");
}

#[test]
fn snaplen_caps_capture_and_marks_the_rest() {
    let dir = TempDir::new("snap");
    let pcap = dir.path("cap.pcap");
    let log = dir.path("tap.log");
    let (tx, rx) = mpsc::channel();
    let up = reply_upstream(tx);
    let config = format!(
        "[tap]\npcap = \"{}\"\nlog = \"{}\"\nsnaplen = \"64 KiB\"\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        pcap.display(),
        log.display(),
        up.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    // The start says where the tap writes, and for which routes.
    let outputs = format!("log to {}, pcap to {}", log.display(), pcap.display());
    proxy.wait_log(&format!("tap: {outputs} (route `route0`)"), PROMPT);
    let mut c = connect(proxy.addr());
    let mut sent = header(8, 300_000);
    sent.extend(Pattern::bytes(8, 200_000));
    c.write_all(&sent).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_to_end(&mut c, Duration::from_secs(30)).unwrap().len(),
        300_000
    );
    rx.recv_timeout(PROMPT).unwrap();
    proxy.wait_count("bytes to client", 1, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    // So do its totals at the exit.
    proxy.wait_log(&format!("tap ({outputs}): "), PROMPT);
    let flows = read_pcap(&pcap);
    let client = c.local_addr().unwrap();
    let c2s = &flows[&(client, up.addr)];
    assert_eq!(
        c2s.bytes(true),
        sent[..64 * 1024],
        "client direction: exactly the first 64 KiB"
    );
    assert_eq!(
        c2s.fin_at,
        Some(sent.len() as u64),
        "FIN after the uncaptured rest"
    );
    let s2c = &flows[&(up.addr, client)];
    assert_eq!(s2c.bytes(true), Pattern::bytes(8, 300_000)[..64 * 1024]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "[... {} bytes not captured (snaplen) ...]",
            sent.len() - 65536
        )),
        "{text}"
    );
}

/// The log says when a direction reaches snaplen, while the connection is still open: nothing
/// else would show that the bytes after it go uncaptured until the connection ends.
#[test]
fn the_log_says_at_once_that_a_direction_reached_snaplen() {
    let dir = TempDir::new("snap-live");
    let log = dir.path("tap.log");
    let echo = Upstream::echo();
    let tap = format!("[tap]\nlog = \"{}\"\nsnaplen = 100", log.display());
    let proxy = Proxy::with_config(&one_route("127.0.0.1:0", echo.addr, &tap), 1);
    let mut c = connect(proxy.addr());
    for i in 0..6u8 {
        let command = format!("SET key{i} {}\r\n", "v".repeat(20));
        c.write_all(command.as_bytes()).unwrap();
        assert_eq!(
            read_n(&mut c, command.len(), PROMPT).unwrap(),
            command.as_bytes()
        );
    }
    let deadline = Instant::now() + PROMPT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let marks = text
            .lines()
            .filter(|l| {
                l.contains("[... snaplen (100 bytes) reached: later bytes not captured ...]")
            })
            .count();
        if marks == 2 {
            assert!(!text.contains("close:"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{marks} marks:\n{text}");
        thread::sleep(Duration::from_millis(20));
    }
    drop(c);
}

#[test]
fn pcap_rotation_keeps_max_files_each_valid() {
    let dir = TempDir::new("rot");
    let pcap = dir.path("cap.pcap");
    let echo = Upstream::echo();
    let config = format!(
        "[tap]\npcap = \"{}\"\npcap_rotate_size = \"64 KiB\"\npcap_max_files = 3\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        pcap.display(),
        echo.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    for i in 0..10 {
        let mut c = connect(proxy.addr());
        let data = Pattern::bytes(i, 50_000);
        c.write_all(&data).unwrap();
        assert!(read_n(&mut c, data.len(), PROMPT).unwrap() == data);
    }
    proxy.wait_count("bytes to client", 10, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["cap.pcap", "cap.pcap.1", "cap.pcap.2"]);
    for n in &names {
        let path = dir.path(n);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= 64 * 1024 + 2048, "{n} is {size} bytes");
        let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&path).unwrap()).expect(n);
        let mut packets = 0;
        while let Some(p) = r.next_packet() {
            p.expect("valid packet");
            packets += 1;
        }
        assert!(packets > 0, "{n} is empty");
    }
}

/// A tap must not change what the peers see: same bytes with the tap on under load.
#[test]
fn tap_on_randomized_traffic_is_byte_exact() {
    let dir = TempDir::new("tapload");
    let echo = Upstream::echo();
    let config = format!(
        "buffer_size = \"8 KiB\"\n[tap]\npcap = \"{}\"\nlog = \"{}\"\nqueue_size = \"256 KiB\"\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        dir.path("cap.pcap").display(),
        dir.path("tap.log").display(),
        echo.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let addr = proxy.addr();
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let data = Pattern::bytes(i, 1 << 20);
                let mut c = connect(addr);
                let mut w = c.try_clone().unwrap();
                let d = data.clone();
                let t = thread::spawn(move || {
                    w.write_all(&d).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let got = read_to_end(&mut c, Duration::from_secs(60)).unwrap();
                t.join().unwrap();
                assert!(got == data, "connection {i} corrupted with the tap on");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let line = proxy.wait_log("write errors", PROMPT);
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // "tap: R records (B bytes) written, R records (B bytes) dropped, E write errors"
    let [.., written, _, dropped, errors] = numbers[..] else {
        panic!("unexpected summary {line:?}")
    };
    eprintln!("{line}");
    assert_eq!(errors, 0, "{line}");
    assert!(written > 0, "nothing captured: {line}");
    // Every byte was either captured or counted as dropped, whichever way it was moved.
    assert_eq!(written + dropped, 2 * (16 << 20), "{line}");

    // What the capture holds is right where it sits: a queue that fills and empties switches
    // directions between copying (tapped) and splicing (counted as dropped), and the captured
    // segments must still be the stream's bytes at their sequence offsets, with the FIN after
    // the last byte even when the bytes before it were not captured.
    let patterns: Vec<Vec<u8>> = (0..16).map(|i| Pattern::bytes(i, 1 << 20)).collect();
    let flows = read_pcap(&dir.path("cap.pcap"));
    assert_eq!(flows.len(), 32, "two flows per connection");
    let mut captured = 0u64;
    for ((src, dst), flow) in &flows {
        assert_eq!(flow.fin_at, Some(1 << 20), "{src} -> {dst}: FIN at the end");
        let Some((&off, first)) = flow.data.iter().next() else {
            continue;
        };
        let off = off as usize;
        let owner = patterns
            .iter()
            .find(|p| p.get(off..off + first.len()) == Some(first.as_slice()))
            .unwrap_or_else(|| panic!("{src} -> {dst}: segment at {off} is no connection's bytes"));
        for (&off, seg) in &flow.data {
            let off = off as usize;
            assert!(
                owner.get(off..off + seg.len()) == Some(seg.as_slice()),
                "{src} -> {dst}: captured bytes at offset {off} differ from the stream"
            );
            captured += seg.len() as u64;
        }
    }
    assert_eq!(
        captured, written,
        "the pcap holds what the summary says was written"
    );
}

/// Field `field` (1-based, as in proc(5)) of `/proc/PID/task/TID/stat` of the proxy's thread
/// `name`: 19 is the nice value, 41 the scheduling policy.
fn thread_stat(pid: u32, name: &str, field: usize) -> Option<i64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the parenthesised comm start at field 3.
        let rest = &stat[stat.rfind(')')? + 2..];
        return rest.split(' ').nth(field - 3)?.parse().ok();
    }
    None
}

#[test]
fn tap_writer_runs_at_low_priority_unless_configured() {
    const NICE: usize = 19;
    const POLICY: usize = 41;
    const SCHED_OTHER: i64 = 0;
    let dir = TempDir::new("prio");
    let up = Upstream::echo();
    let config = |extra: &str| {
        format!(
            "[tap]\npcap = \"{}\"\n{extra}[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            dir.path("cap.pcap").display(),
            up.addr
        )
    };
    for (extra, nice) in [
        ("", 19),
        ("writer_priority = \"low\"\n", 19),
        ("writer_priority = \"normal\"\n", 0),
    ] {
        let mut proxy = Proxy::with_config(&config(extra), 1);
        let pid = proxy.pid();
        // The thread lowers its own priority as it starts: wait for it, within a deadline.
        let deadline = Instant::now() + PROMPT;
        let mut got = thread_stat(pid, "tap-writer", NICE);
        while got != Some(nice) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
            got = thread_stat(pid, "tap-writer", NICE);
        }
        assert_eq!(got, Some(nice), "tap writer nice value with {extra:?}");
        assert_eq!(
            thread_stat(pid, "tap-writer", POLICY),
            Some(SCHED_OTHER),
            "time-sharing, never SCHED_IDLE (it could starve)"
        );
        assert_eq!(
            thread_stat(pid, "tcptap", NICE),
            Some(0),
            "the event loop keeps its priority"
        );
        // Bytes still get through and into the capture.
        let mut c = connect(proxy.addr());
        c.write_all(b"ping").unwrap();
        assert_eq!(read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
        drop(c);
        proxy.signal(SIGTERM);
        assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
        let flows = read_pcap(&dir.path("cap.pcap"));
        assert!(
            flows.values().any(|f| f.bytes(false) == b"ping"),
            "captured with {extra:?}"
        );
    }
}

const SIGHUP: i32 = 1;

/// `--listen 127.0.0.1:0 --upstream <upstream> --tap-pcap <pcap>`.
fn capture_args(upstream: SocketAddr, pcap: &str) -> Vec<String> {
    let upstream = upstream.to_string();
    [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--tap-pcap",
        pcap,
    ]
    .map(String::from)
    .to_vec()
}

/// Sends `msg`, shuts the write side, expects it echoed; returns the client's address.
fn echo_once(addr: SocketAddr, msg: &[u8]) -> SocketAddr {
    let mut c = connect(addr);
    c.write_all(msg).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c, PROMPT).unwrap(), msg);
    c.local_addr().unwrap()
}

/// Echoes `msg` through `proxy` over and over until its log has a line with `needle` (at most
/// `max` rounds and 30 s); returns the rounds it took.
fn echo_until_logged(proxy: &Proxy, needle: &str, msg: &[u8], max: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        if proxy.count_log(needle) > 0 {
            return round;
        }
        assert!(
            round < max && Instant::now() < deadline,
            "no {needle:?} after {round} rounds: {}",
            proxy.logs()
        );
        echo_once(proxy.addr(), msg);
    }
    unreachable!()
}

/// The client → proxy bytes of `client`'s conversation in a capture.
fn captured_request(
    flows: &BTreeMap<(SocketAddr, SocketAddr), Flow>,
    client: SocketAddr,
) -> Vec<u8> {
    let (_, f) = flows
        .iter()
        .find(|((src, _), _)| *src == client)
        .unwrap_or_else(|| panic!("no conversation of {client} in the capture: {flows:?}"));
    f.bytes(false)
}

/// A reload that adds a route sharing the running tap, or gives that tap other settings, must
/// not start a second writer on its file: that truncated the capture taken so far and then
/// interleaved two writers in it. A tap on a new file starts as usual.
#[test]
fn reloads_keep_the_one_writer_of_a_capture_file() {
    let up = Upstream::echo();
    let dir = TempDir::new("reload-tap");
    let path = dir.path("proxy.toml");
    let (pcap, other) = (dir.path("cap.pcap"), dir.path("other.pcap"));
    let route = |name: &str, tap: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n{tap}",
            up.addr
        )
    };
    let head = |extra: &str| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[tap]\npcap = \"{}\"\nwriter_priority = \"normal\"\n{extra}",
            pcap.display()
        )
    };
    write_file(&path, &format!("{}{}", head(""), route("a", "")));
    let mut proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let a = proxy.addrs[0];
    let mut sent: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    for i in 0..3 {
        let msg = format!("before the reloads {i}").into_bytes();
        sent.push((echo_once(a, &msg), msg));
    }
    // The first conversations are in the file before the reloads.
    let admin = proxy.admin_addr();
    let deadline = Instant::now() + PROMPT;
    while metric(
        &http_get(admin, "/metrics").1,
        "tcptap_tap_records_written_total",
    ) < Some(6.0)
    {
        assert!(Instant::now() < deadline, "tap records not written");
        thread::sleep(Duration::from_millis(10));
    }

    // Reload 1: route `b` with the same (global) tap.
    write_file(
        &path,
        &format!("{}{}{}", head(""), route("a", ""), route("b", "")),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    let b = proxy.route_addr("b");
    for (addr, msg) in [(a, &b"a after reload 1"[..]), (b, b"b after reload 1")] {
        sent.push((echo_once(addr, msg), msg.to_vec()));
    }

    // Reload 2: the global tap gets another setting (same file), and route `c` a tap of its own.
    let c_tap = format!("[route.tap]\npcap = \"{}\"\n", other.display());
    write_file(
        &path,
        &format!(
            "{}{}{}{}",
            head("snaplen = \"1 MiB\"\n"),
            route("a", ""),
            route("b", ""),
            route("c", &c_tap)
        ),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    proxy.wait_log("is written by a running tap with other settings", PROMPT);
    let c = proxy.route_addr("c");
    for (addr, msg) in [(a, &b"a after reload 2"[..]), (b, b"b after reload 2")] {
        sent.push((echo_once(addr, msg), msg.to_vec()));
    }
    let c_client = echo_once(c, b"c after reload 2");

    proxy.signal(SIGTERM);
    assert!(proxy.wait_exit(Duration::from_secs(10)).success());
    let flows = read_pcap(&pcap);
    for (client, msg) in &sent {
        assert_eq!(&captured_request(&flows, *client), msg, "{}", proxy.logs());
    }
    assert_eq!(
        captured_request(&read_pcap(&other), c_client),
        b"c after reload 2"
    );
    if tshark().is_some() {
        let out = Command::new("tshark")
            .args(["-r", pcap.to_str().unwrap(), "-qz", "expert,error"])
            .output()
            .expect("run tshark");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Malformed"),
            "{text}"
        );
    }
}

/// The tap totals in `/metrics` include taps that a reload started.
#[test]
fn a_tap_started_by_a_reload_counts_in_metrics() {
    let up = Upstream::echo();
    let dir = TempDir::new("reload-tap-metrics");
    let path = dir.path("proxy.toml");
    let route = format!(
        "[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        up.addr
    );
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    write_file(&path, &format!("{admin}{route}"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let pcap = dir.path("cap.pcap");
    write_file(
        &path,
        &format!("{admin}[tap]\npcap = \"{}\"\n{route}", pcap.display()),
    );
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    echo_once(proxy.addrs[0], b"tapped");
    let deadline = Instant::now() + PROMPT;
    loop {
        let (_, body) = http_get(proxy.admin_addr(), "/metrics");
        if metric(&body, "tcptap_tap_records_written_total") >= Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tap records not counted:\n{body}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// What tshark makes of the RSTs and the sequence analysis of a capture.
struct TsharkResets {
    /// `(source port, destination port)` of every RST.
    rsts: Vec<(u16, u16)>,
    /// `-z expert` lines about sequence or acknowledgement numbers (segments not captured, ACKs
    /// of unseen segments, retransmissions, out-of-order, ...).
    seq_warnings: Vec<String>,
    /// The whole `-z expert` output, for messages.
    expert: String,
}

fn tshark_resets(pcap: &Path) -> TsharkResets {
    let out = Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-T", "fields"])
        .args(["-e", "tcp.srcport", "-e", "tcp.dstport"])
        .args(["-Y", "tcp.flags.reset==1"])
        .output()
        .expect("run tshark");
    assert!(out.status.success(), "{out:?}");
    let rsts = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut ports = l.split('\t').map(|p| p.trim().parse::<u16>().unwrap());
            (ports.next().unwrap(), ports.next().unwrap())
        })
        .collect();
    let out = Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-qz", "expert,note"])
        .output()
        .expect("run tshark");
    assert!(out.status.success(), "{out:?}");
    let expert = String::from_utf8_lossy(&out.stdout).into_owned();
    let seq_warnings = expert
        .lines()
        .filter(|l| {
            let l = l.to_lowercase();
            [
                "not captured",
                "unseen",
                "retransmission",
                "out-of-order",
                "dup ack",
                "lost",
                "spurious",
                "zero window",
                "keep-alive",
                "malformed",
                "checksum",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .map(str::to_owned)
        .collect();
    TsharkResets {
        rsts,
        seq_warnings,
        expert,
    }
}

/// Checks a capture and a tap log of connections the proxy reset itself (`why`), one per client
/// of `clients`, all to the upstream port `up`: in the capture, a RST toward each side right
/// after what each side sent (FIN included), in tshark too, with no complaint about sequence
/// numbers; in the log, the reset by the proxy.
fn assert_proxy_resets(pcap: &Path, log: &Path, clients: &[SocketAddr], up: u16, why: &str) {
    let flows = read_pcap(pcap);
    for client in clients {
        for (from, to) in [(client.port(), up), (up, client.port())] {
            let flow = flows
                .iter()
                .find(|((s, d), _)| s.port() == from && d.port() == to)
                .map(|(_, f)| f)
                .unwrap_or_else(|| panic!("no flow {from} -> {to} in the capture"));
            assert!(flow.rst, "{from} -> {to}: no RST in the capture");
            let end = flow.bytes(false).len() as u64 + u64::from(flow.fin_at.is_some());
            assert_eq!(
                flow.rst_at,
                Some(end),
                "{from} -> {to}: RST sequence number"
            );
        }
    }
    let text = std::fs::read_to_string(log).unwrap();
    for client in clients {
        let about = |needle: &str| {
            text.lines()
                .any(|l| l.contains(&format!(" {client} ")) && l.contains(needle))
        };
        assert!(
            about("RESET by proxy"),
            "the tap log does not show {client} reset by the proxy:\n{text}"
        );
        assert!(about(&format!("close: {why}")), "{text}");
    }
    let Some(_) = tshark() else { return };
    let t = tshark_resets(pcap);
    for client in clients {
        for (from, to) in [(client.port(), up), (up, client.port())] {
            assert_eq!(
                t.rsts.iter().filter(|&&r| r == (from, to)).count(),
                1,
                "tshark: one RST {from} -> {to}; RSTs: {:?}",
                t.rsts
            );
        }
    }
    assert!(
        t.seq_warnings.is_empty(),
        "tshark complains about sequence numbers: {:?}\n{}",
        t.seq_warnings,
        t.expert
    );
}

/// An upstream that echoes a 5-byte request; a request starting with `F` also gets its FIN. Then
/// it keeps the connection open, never closing its side, until the proxy resets it.
fn echo_once_upstream() -> Upstream {
    Upstream::start(|mut s| {
        let mut req = [0u8; 5];
        s.read_exact(&mut req).unwrap();
        s.write_all(&req).unwrap();
        if req[0] == b'F' {
            s.shutdown(Shutdown::Write).unwrap();
        }
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                // The client's FIN: a reset shows up as the socket's error.
                let deadline = Instant::now() + Duration::from_secs(60);
                while s.take_error().is_ok_and(|e| e.is_none()) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
                break;
            }
        }
    })
}

/// A proxy tapping to `pcap` and `log` in front of [`echo_once_upstream`], with `setting` (a
/// top-level config line), and two connections through it: one with both directions open, one
/// whose upstream has sent its FIN.
fn proxy_with_open_and_half_closed(
    setting: &str,
    pcap: &Path,
    log: &Path,
    up: &Upstream,
) -> (Proxy, TcpStream, TcpStream) {
    let config = format!(
        "{setting}\n[tap]\npcap = \"{}\"\nlog = \"{}\"\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        pcap.display(),
        log.display(),
        up.addr
    );
    let proxy = Proxy::with_config(&config, 1);
    let mut open = connect(proxy.addr());
    open.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut open, 5, PROMPT).unwrap(), b"hello");
    let mut up_fin = connect(proxy.addr());
    up_fin.write_all(b"FIN!!").unwrap();
    assert_eq!(read_to_end(&mut up_fin, PROMPT).unwrap(), b"FIN!!");
    (proxy, open, up_fin)
}

#[test]
fn pcap_shows_the_proxys_resets_at_idle_timeout() {
    let dir = TempDir::new("idle-rst");
    let (pcap, log) = (dir.path("cap.pcap"), dir.path("tap.log"));
    let up = echo_once_upstream();
    // Both directions open; then one where the upstream has sent its FIN, and one where the
    // client has sent its own.
    let (mut proxy, mut open, up_fin) =
        proxy_with_open_and_half_closed("idle_timeout = \"2s\"", &pcap, &log, &up);
    let mut client_fin = connect(proxy.addr());
    client_fin.write_all(b"bye..").unwrap();
    client_fin.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_n(&mut client_fin, 5, PROMPT).unwrap(), b"bye..");
    // Then nothing moves: the proxy resets each of them.
    let err = read_to_end(&mut open, Duration::from_secs(20)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let err = read_to_end(&mut client_fin, Duration::from_secs(20)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    proxy.wait_count("idle timeout", 3, Duration::from_secs(20));
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let clients = [&open, &up_fin, &client_fin].map(|c| c.local_addr().unwrap());
    assert_proxy_resets(&pcap, &log, &clients, up.addr.port(), "idle timeout");
}

#[test]
fn pcap_shows_the_proxys_resets_at_the_end_of_the_drain() {
    let dir = TempDir::new("drain-rst");
    let (pcap, log) = (dir.path("cap.pcap"), dir.path("tap.log"));
    let up = echo_once_upstream();
    let (mut proxy, mut open, up_fin) =
        proxy_with_open_and_half_closed("drain_timeout = \"300ms\"", &pcap, &log, &up);
    proxy.signal(SIGTERM);
    let err = read_to_end(&mut open, Duration::from_secs(20)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    proxy.wait_count("aborted at end of shutdown drain", 2, PROMPT);
    let clients = [&open, &up_fin].map(|c| c.local_addr().unwrap());
    assert_proxy_resets(&pcap, &log, &clients, up.addr.port(), "aborted at shutdown");
}

/// The tap's totals in `/metrics`: payload bytes (written, dropped).
fn tap_bytes(admin: SocketAddr) -> (u64, u64) {
    let (status, body) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let get = |series| metric(&body, series).unwrap_or_else(|| panic!("no {series}:\n{body}"));
    (
        get("tcptap_tap_bytes_written_total") as u64,
        get("tcptap_tap_dropped_bytes_total") as u64,
    )
}

/// A queue far smaller than the tee chunk of the default configuration (256 KiB) still takes
/// bulk data while the writer keeps up: the sender goes on only once the writer has written
/// every byte so far, so nothing may be dropped.
#[test]
fn a_small_tap_queue_captures_bulk_data_a_writer_keeps_up_with() {
    // Each round, both ways, twice over (the cost of a round the writer has written may still
    // count in the queue for a moment), stays within the queue.
    const ROUND: usize = 12 << 10;
    const ROUNDS: usize = 128;
    let dir = TempDir::new("small-queue");
    let pcap = dir.path("cap.pcap");
    let echo = Upstream::echo();
    // 4 KiB buffers: the first full read makes each direction bulk, moved by splice(2) with tees
    // for the tap from then on.
    let config = format!(
        "buffer_size = \"4 KiB\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [tap]\npcap = \"{}\"\nqueue_size = \"64 KiB\"\nwriter_priority = \"normal\"\n\
         [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        pcap.display(),
        echo.addr
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let admin = proxy.admin_addr();
    let data = Pattern::bytes(21, ROUND * ROUNDS);
    let mut c = connect(proxy.addr());
    for (r, round) in data.chunks(ROUND).enumerate() {
        c.write_all(round).unwrap();
        assert!(read_n(&mut c, ROUND, PROMPT).unwrap() == round, "round {r}");
        // Wait for the writer to catch up.
        let want = 2 * ((r + 1) * ROUND) as u64;
        let deadline = Instant::now() + TAP_FLUSH;
        loop {
            let (written, dropped) = tap_bytes(admin);
            assert_eq!(
                dropped, 0,
                "round {r}: the tap dropped bytes ({written} of {want} written)"
            );
            if written == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {r}: {written} of {want} bytes written"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
    c.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut c, PROMPT).unwrap().is_empty());
    proxy.wait_count("bytes to client", 1, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let line = proxy.wait_log("write errors", PROMPT);
    let total = 2 * data.len();
    assert!(
        line.contains(&format!(
            "({total} bytes) written, 0 records (0 bytes) dropped, 0 write errors"
        )),
        "{line}"
    );
    let flows = read_pcap(&pcap);
    let client = c.local_addr().unwrap();
    for key in [(client, echo.addr), (echo.addr, client)] {
        let flow = &flows[&key];
        assert!(
            flow.bytes(false) == data,
            "{key:?}: bytes differ in the capture"
        );
        assert_eq!(flow.fin_at, Some(data.len() as u64), "{key:?}: FIN");
    }
}

/// Stops `proxy` with SIGTERM, expects exit 0, and returns its tap totals line ("R records (B
/// bytes) written, R records (B bytes) dropped, E write errors").
fn stop_for_tap_totals(proxy: &mut Proxy) -> String {
    proxy.signal(SIGTERM);
    assert_eq!(
        proxy.wait_exit(TAP_FLUSH).code(),
        Some(0),
        "{}",
        proxy.logs()
    );
    proxy.wait_log("write errors", PROMPT)
}

/// A tap log that reaches the file size limit (`ulimit -f`): the kernel's SIGXFSZ used to kill
/// the proxy and every connection with it. Proxying goes on, the failed writes are counted, and
/// the log is not left with a torn last line.
#[test]
fn a_tap_log_at_the_file_size_limit_neither_kills_nor_tears() {
    const LIMIT: u64 = 20_000;
    let up = Upstream::echo();
    let dir = TempDir::new("fsize");
    let log = dir.path("tap.log");
    let mut proxy = logging_to(up.addr, &log);
    set_fsize(proxy.pid(), LIMIT);
    // Far more log than the limit holds, one conversation after the other.
    for i in 0..300 {
        let msg = format!("message {i:04} through a tap whose log is full");
        echo_once(proxy.addr(), msg.as_bytes());
    }
    let line = stop_for_tap_totals(&mut proxy);
    assert!(!line.contains(" 0 write errors"), "{line}");
    let text = std::fs::read(&log).unwrap();
    assert!(
        text.len() as u64 <= LIMIT && text.len() > 1000,
        "{} bytes",
        text.len()
    );
    assert_eq!(text.last(), Some(&b'\n'), "torn last line");
}

/// A pcap that hits the file size limit (as a full disk would) keeps only whole packets, and
/// once there is room again, later packets follow them readably: with direct I/O (the default)
/// a write ends on a block boundary, which may fall inside a packet, and the file used to keep
/// that half packet, making everything after it unreadable.
#[test]
fn a_pcap_cut_short_by_the_file_size_limit_stays_readable_after() {
    const LIMIT: u64 = 3_000_000;
    let up = Upstream::echo();
    let dir = TempDir::new("pcap-fsize");
    let pcap = dir.path("cap.pcap");
    let config = format!(
        "[tap]\npcap = \"{}\"\nwriter_priority = \"normal\"\n{}",
        pcap.display(),
        one_route("127.0.0.1:0", up.addr, "")
    );
    let mut proxy = Proxy::with_config(&config, 1);
    set_fsize(proxy.pid(), LIMIT);
    // Bulk transfers (2 MiB each way) until the writer has met the limit: it may drop much of
    // them while it is behind, so the count of rounds varies.
    let bulk = Pattern::bytes(5, 2 << 20);
    let rounds = echo_until_logged(&proxy, "File too large", &bulk, 3000);
    set_fsize(proxy.pid(), libc::RLIM_INFINITY);
    let after = b"a conversation after the file had room again";
    // The writer may still be behind the bulk rounds, its queue full: a conversation whose
    // records were dropped says so in its close line. Again until one had none dropped (it is
    // then all in the queue, so in the file).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut afters = 0;
    let client = loop {
        let client = echo_once(proxy.addr(), after);
        afters += 1;
        let closed = proxy.wait_log(&format!(" {client} -> "), PROMPT);
        if !closed.contains("tap dropped") {
            break client;
        }
        assert!(
            Instant::now() < deadline,
            "every conversation after the limit lost records: {}",
            proxy.logs()
        );
    };
    // What the failed writes lost counts as dropped: written and dropped add up to the traffic.
    let line = stop_for_tap_totals(&mut proxy);
    let number_before = |word: &str| -> u64 {
        let at = line
            .find(word)
            .unwrap_or_else(|| panic!("{word:?} in {line}"));
        let head = line[..at].trim_end().trim_end_matches(')');
        head.rsplit(['(', ' ']).next().unwrap().parse().unwrap()
    };
    let (written, dropped) = (
        number_before("bytes) written"),
        number_before("bytes) dropped"),
    );
    let total = 2 * (rounds * bulk.len() + afters * after.len()) as u64;
    assert_eq!(written + dropped, total, "{line}");
    assert!(!line.contains(" 0 write errors"), "{line}");
    // Every record parses (a torn one would not), and the last conversation is whole. A
    // connection whose SYN went in a failed write has only its later segments in the file,
    // as in a capture started in its middle.
    let flows = read_pcap_from(&pcap, false);
    let key = flows
        .keys()
        .find(|(src, _)| *src == client)
        .expect("the conversation after the limit is in the capture");
    assert_eq!(flows[key].bytes(false), after);
    assert_tshark_reads(&pcap);
}

// A tap's writer lives as long as something uses it: a route in force, or a connection that
// started tapping into it. A reload that takes the tap away from every route lets the open
// connections finish with it; then the writer flushes, closes its files and ends.

/// Whether process `pid` holds `path` open (a link in `/proc/PID/fd`).
fn holds_open(pid: u32, path: &Path) -> bool {
    let canonical = std::fs::canonicalize(path).ok();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target == path || Some(&target) == canonical.as_ref())
}

/// Threads of process `pid`: (all of them, tap writers).
fn threads(pid: u32) -> (usize, usize) {
    let mut all = 0;
    let mut writers = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        all += 1;
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "tap-writer" {
            writers += 1;
        }
    }
    (all, writers)
}

/// Polls `done` every 10 ms until it holds; panics with `what()` after `timeout`.
fn wait_until(timeout: Duration, what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        thread::sleep(Duration::from_millis(10));
    }
}

/// A `[[route]]` to `up`; `tap` is the rest of the route (its `[route.tap]`), if any.
fn named_route(name: &str, up: SocketAddr, tap: &str) -> String {
    format!("[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n{tap}")
}

/// A `[route.tap]` at normal priority (so that it captures every byte of these small tests)
/// writing `files` (`log = "..."`, `pcap = "..."`).
fn route_tap(files: &[(&str, &Path)]) -> String {
    let mut tap = String::from("[route.tap]\nwriter_priority = \"normal\"\n");
    for (key, path) in files {
        tap.push_str(&format!("{key} = \"{}\"\n", path.display()));
    }
    tap
}

/// Sends `msg` on `c` and expects it echoed.
fn echo_on(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    assert_eq!(read_n(c, msg.len(), PROMPT).unwrap(), msg);
}

/// Ends `c` from the client side (with `tail` sent first, from another thread) and reads what
/// is left up to the upstream's FIN, which must be `tail` echoed.
fn finish_with(c: TcpStream, tail: Vec<u8>) {
    let mut w = c.try_clone().unwrap();
    let sent = tail.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut c = c;
    assert!(read_to_end(&mut c, Duration::from_secs(30)).unwrap() == tail);
    writer.join().unwrap();
}

/// tshark reads `pcap` without errors and without malformed packets.
fn assert_tshark_reads(pcap: &Path) {
    if tshark().is_none() {
        return;
    }
    let out = Command::new("tshark")
        .args(["-r", pcap.to_str().unwrap(), "-qz", "expert,error"])
        .output()
        .expect("run tshark");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    // Anything but the notice about running as root is a complaint ("cut short in the middle
    // of a packet", ...).
    let complaints = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("Running as user"))
        .count();
    assert!(
        out.status.success() && !text.contains("Malformed") && complaints == 0,
        "tshark on {}: {text}{err}",
        pcap.display()
    );
}

#[test]
fn a_removed_routes_tap_records_its_open_connection_then_stops() {
    let up = Upstream::echo();
    let dir = TempDir::new("tap-stops");
    let path = dir.path("proxy.toml");
    let (log, pcap) = (dir.path("a.log"), dir.path("a.pcap"));
    let keep = named_route("keep", up.addr, "");
    let tapped = named_route("a", up.addr, &route_tap(&[("log", &log), ("pcap", &pcap)]));
    write_file(&path, &format!("{tapped}{keep}"));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 2);
    let pid = proxy.pid();
    let mut c = connect(proxy.addrs[0]);
    let client = c.local_addr().unwrap();
    echo_on(&mut c, b"before the reload\n");

    // The route goes; its connection stays, and so does its tap.
    write_file(&path, &keep);
    proxy.signal(SIGHUP);
    proxy.wait_log("route `a` removed", PROMPT);
    echo_on(&mut c, b"after the reload, still tapped\n");
    let bulk = Pattern::bytes(31, 1 << 20);
    let mut w = c.try_clone().unwrap();
    let sent = bulk.clone();
    let writer = thread::spawn(move || w.write_all(&sent).unwrap());
    assert!(read_n(&mut c, bulk.len(), Duration::from_secs(30)).unwrap() == bulk);
    writer.join().unwrap();
    assert!(holds_open(pid, &log) && holds_open(pid, &pcap));
    let (before, writers) = threads(pid);
    assert_eq!(writers, 1, "one tap writer while its connection is open");

    // The connection ends: the writer writes the rest, closes its files and ends.
    finish_with(c, b"the end\n".to_vec());
    wait_until(
        TAP_FLUSH,
        || format!("the tap files are still open; log:\n{}", proxy.logs()),
        || !holds_open(pid, &log) && !holds_open(pid, &pcap),
    );
    wait_until(
        PROMPT,
        || format!("threads {:?}, {before} before", threads(pid)),
        || {
            let (all, writers) = threads(pid);
            writers == 0 && all < before
        },
    );
    let line = proxy.wait_log("no route uses it any more", PROMPT);
    assert!(
        line.contains(", 0 records (0 bytes) dropped, 0 write errors"),
        "{line}"
    );

    let mut request = b"before the reload\nafter the reload, still tapped\n".to_vec();
    request.extend(&bulk);
    request.extend(b"the end\n");
    let total = request.len();
    let text = std::fs::read_to_string(&log).unwrap();
    for needle in [
        "  > before the reload\n".to_owned(),
        "  < after the reload, still tapped\n".to_owned(),
        "  > the end\n".to_owned(),
        format!(
            "close: closed, client -> upstream {total} bytes, upstream -> client {total} bytes, \
             tap dropped 0 records (0 bytes)\n"
        ),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in the log");
    }
    assert!(text.ends_with("(0 bytes)\n"), "the log ends with the close");
    let flows = read_pcap(&pcap);
    assert!(captured_request(&flows, client) == request);
    let (_, reply) = flows
        .iter()
        .find(|((_, dst), _)| *dst == client)
        .expect("the reply direction");
    assert!(reply.bytes(false) == request);
    assert_eq!(reply.fin_at, Some(total as u64), "the upstream's FIN");
    assert_tshark_reads(&pcap);
    if tshark().is_some() {
        let (to_server, to_client) = tshark_follow(&pcap, 0);
        assert!(
            to_server == request && to_client == request,
            "tshark follow"
        );
    }
    // The route that stays still serves.
    echo_once(proxy.addrs[1], b"still serving");
}

/// The tap totals in `/metrics` are counters: a writer that stops keeps its share of them.
#[test]
fn tap_totals_in_metrics_keep_what_stopped_writers_counted() {
    const SERIES: [&str; 5] = [
        "tcptap_tap_records_written_total",
        "tcptap_tap_bytes_written_total",
        "tcptap_tap_dropped_records_total",
        "tcptap_tap_dropped_bytes_total",
        "tcptap_tap_write_errors_total",
    ];
    let up = Upstream::echo();
    let dir = TempDir::new("tap-stop-metrics");
    let path = dir.path("proxy.toml");
    let (first, second) = (dir.path("first.pcap"), dir.path("second.pcap"));
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let config = |tap: Option<&Path>| {
        let tap = tap.map_or(String::new(), |p| route_tap(&[("pcap", p)]));
        format!("{admin}{}", named_route("a", up.addr, &tap))
    };
    write_file(&path, &config(Some(&first)));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let pid = proxy.pid();
    let admin = proxy.admin_addr();
    // Every scrape is checked against the one before: no total ever goes down.
    let mut last = [0.0; 5];
    let mut scrape = || -> [f64; 5] {
        let (_, body) = http_get(admin, "/metrics");
        let now = SERIES.map(|s| metric(&body, s).unwrap_or_else(|| panic!("no {s}:\n{body}")));
        for (i, s) in SERIES.iter().enumerate() {
            assert!(now[i] >= last[i], "{s} went from {} to {}", last[i], now[i]);
        }
        last = now;
        now
    };
    // Open, data each way, a FIN each way, close.
    const PER_CONN: f64 = 6.0;
    for i in 0..3 {
        echo_once(proxy.addr(), format!("conversation {i}").as_bytes());
    }
    let unwritten = || "tap records not written".to_owned();
    wait_until(PROMPT, unwritten, || scrape()[0] >= 3.0 * PER_CONN);

    // The route loses its tap; nothing uses the writer any more and it stops.
    write_file(&path, &config(None));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    wait_until(
        TAP_FLUSH,
        || format!("{} is still open", first.display()),
        || {
            scrape();
            !holds_open(pid, &first)
        },
    );
    let written = scrape();

    // Another reload (which joins the stopped writer), and another tap: its counts add to those.
    write_file(&path, &config(Some(&second)));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    assert_eq!(scrape(), written, "the stopped writer's totals");
    echo_once(proxy.addr(), b"on the second tap");
    wait_until(PROMPT, unwritten, || scrape()[0] >= written[0] + PER_CONN);
}

/// A reload that moves a route's tap to another file: connections open on the old tap finish on
/// it, new ones go to the new file, and the old file is closed once they have finished.
#[test]
fn a_tap_moved_to_another_file_closes_the_old_one_after_its_connections() {
    let up = Upstream::echo();
    let dir = TempDir::new("tap-moved");
    let path = dir.path("proxy.toml");
    let (old, new) = (dir.path("old.log"), dir.path("new.log"));
    let config = |log: &Path| named_route("a", up.addr, &route_tap(&[("log", log)]));
    write_file(&path, &config(&old));
    let proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let pid = proxy.pid();
    let mut first = connect(proxy.addr());
    echo_on(&mut first, b"first, on the old tap\n");

    write_file(&path, &config(&new));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    let mut second = connect(proxy.addr());
    echo_on(&mut second, b"second, on the new tap\n");
    echo_on(&mut first, b"first, still on the old tap\n");
    assert!(holds_open(pid, &old) && holds_open(pid, &new));

    finish_with(first, b"first ends\n".to_vec());
    wait_until(
        TAP_FLUSH,
        || format!("{} is still open; log:\n{}", old.display(), proxy.logs()),
        || !holds_open(pid, &old),
    );
    proxy.wait_log("no route uses it any more", PROMPT);
    wait_until(
        PROMPT,
        || format!("threads {:?}", threads(pid)),
        || threads(pid).1 == 1,
    );
    assert!(holds_open(pid, &new), "the route's tap is in use");
    finish_with(second, b"second ends\n".to_vec());
    let closed = |text: &str| text.matches("close: closed").count();
    wait_until(
        TAP_FLUSH,
        || "the second connection's close is not in the new log".to_owned(),
        || closed(&std::fs::read_to_string(&new).unwrap_or_default()) == 1,
    );
    // The route still has its tap: the writer runs on.
    assert!(holds_open(pid, &new));
    assert_eq!(threads(pid).1, 1);
    assert_eq!(proxy.count_log("no route uses it any more"), 1);

    let old_text = std::fs::read_to_string(&old).unwrap();
    let new_text = std::fs::read_to_string(&new).unwrap();
    for needle in [
        "first, on the old tap",
        "first, still on the old tap",
        "first ends",
    ] {
        assert!(old_text.contains(needle), "{needle:?} not in the old log");
        assert!(!new_text.contains(needle), "{needle:?} in the new log");
    }
    for needle in ["second, on the new tap", "second ends"] {
        assert!(new_text.contains(needle), "{needle:?} not in the new log");
        assert!(!old_text.contains(needle), "{needle:?} in the old log");
    }
    assert_eq!(closed(&old_text), 1);
}

/// A tap a reload brings back after its writer stopped starts afresh, as at startup: the pcap
/// is a new capture (truncated), the log is appended to.
#[test]
fn a_tap_brought_back_by_a_reload_starts_like_at_startup() {
    let up = Upstream::echo();
    let dir = TempDir::new("tap-back");
    let path = dir.path("proxy.toml");
    let (log, pcap) = (dir.path("a.log"), dir.path("a.pcap"));
    let config = |tapped: bool| {
        let tap = if tapped {
            route_tap(&[("log", &log), ("pcap", &pcap)])
        } else {
            String::new()
        };
        named_route("a", up.addr, &tap)
    };
    write_file(&path, &config(true));
    let mut proxy = Proxy::start(&["--config", path.to_str().unwrap()], 1);
    let pid = proxy.pid();
    let first = echo_once(proxy.addr(), b"first capture");

    write_file(&path, &config(false));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 2", PROMPT);
    wait_until(
        TAP_FLUSH,
        || format!("the tap files are still open; log:\n{}", proxy.logs()),
        || !holds_open(pid, &log) && !holds_open(pid, &pcap),
    );
    assert!(captured_request(&read_pcap(&pcap), first) == b"first capture");
    echo_once(proxy.addr(), b"not captured");

    write_file(&path, &config(true));
    proxy.signal(SIGHUP);
    proxy.wait_log("configuration generation 3", PROMPT);
    assert!(holds_open(pid, &log) && holds_open(pid, &pcap));
    let second = echo_once(proxy.addr(), b"second capture");
    proxy.signal(SIGTERM);
    assert!(proxy.wait_exit(TAP_FLUSH).success());

    let flows = read_pcap(&pcap);
    assert!(captured_request(&flows, second) == b"second capture");
    assert_eq!(
        flows.len(),
        2,
        "only the second capture's conversation: {flows:?}"
    );
    assert_tshark_reads(&pcap);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("  > first capture\n"),
        "the log is appended to"
    );
    assert!(text.contains("  > second capture\n"));
    assert!(!text.contains("not captured"));
}

also_with_two_workers!(
    a_removed_routes_tap_records_its_open_connection_then_stops,
    a_tap_moved_to_another_file_closes_the_old_one_after_its_connections,
);

/// `--tap-pcap -` writes the capture to stdout, to pipe it into `wireshark -k -i -` or
/// `tshark -r -`: the pipe gets a whole pcap holding the conversation.
#[test]
fn a_pcap_on_stdout_goes_down_the_pipe() {
    let echo = Upstream::echo();
    let mut proxy = Proxy::start_in(&capture_args(echo.addr, "-"), 1, None, |cmd| {
        cmd.stdout(std::process::Stdio::piped());
    });
    let mut out = proxy.child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut all = Vec::new();
        out.read_to_end(&mut all).map(|_| all)
    });
    let msg = Pattern::bytes(31, 300_000);
    let client = echo_once(proxy.addr(), &msg);
    proxy.wait_count("bytes to client", 1, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let piped = reader.join().unwrap().unwrap();
    let dir = TempDir::new("pcap-stdout");
    let path = dir.path("piped.pcap");
    std::fs::write(&path, &piped).unwrap();
    let flows = read_pcap(&path);
    assert!(captured_request(&flows, client) == msg, "{}", proxy.logs());
    proxy.wait_log("tap (pcap to /dev/stdout): ", PROMPT);
}

/// `--tap-pcap -` writes to the standard output the process was given, whatever it is: a
/// socket (a capture streamed through socat, inetd or a systemd socket), which /dev/stdout
/// cannot open, or a file the shell appends to, whose earlier contents stay.
#[test]
fn a_pcap_on_stdout_goes_to_a_socket_or_after_what_a_file_holds() {
    const EARLIER: &[u8] = b"earlier output\n";
    let echo = Upstream::echo();
    let dir = TempDir::new("pcap-stdout-kinds");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let appended = dir.path("appended");
    std::fs::write(&appended, EARLIER).unwrap();
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&appended)
        .unwrap();
    let msg = Pattern::bytes(32, 100_000);
    let mut clients = Vec::new();
    for stdout in [
        std::process::Stdio::from(std::os::fd::OwnedFd::from(theirs)),
        std::process::Stdio::from(file),
    ] {
        let mut proxy = Proxy::start_in(&capture_args(echo.addr, "-"), 1, None, |cmd| {
            cmd.stdout(stdout);
        });
        clients.push(echo_once(proxy.addr(), &msg));
        proxy.wait_count("bytes to client", 1, PROMPT);
        let totals = stop_for_tap_totals(&mut proxy);
        assert!(totals.contains("tap (pcap to /dev/stdout): "), "{totals}");
    }
    // The socket: everything the proxy wrote (it has exited: ours is the last end open).
    ours.set_read_timeout(Some(PROMPT)).unwrap();
    let mut streamed = Vec::new();
    (&ours).read_to_end(&mut streamed).unwrap();
    let path = dir.path("streamed.pcap");
    std::fs::write(&path, &streamed).unwrap();
    assert!(captured_request(&read_pcap(&path), clients[0]) == msg);
    // The file: what it held, then the capture.
    let text = std::fs::read(&appended).unwrap();
    assert!(
        text.starts_with(EARLIER),
        "{:?}",
        &text[..text.len().min(40)]
    );
    let path = dir.path("appended.pcap");
    std::fs::write(&path, &text[EARLIER.len()..]).unwrap();
    assert!(captured_request(&read_pcap(&path), clients[1]) == msg);
}

/// A proxy toward `upstream` with `--tap-log -`, its stdout a pipe: the proxy and the pipe's
/// reading end. `adjust` sets up the command further.
fn logging_to_stdout(
    upstream: SocketAddr,
    adjust: impl FnOnce(&mut std::process::Command),
) -> (Proxy, std::process::ChildStdout) {
    let upstream = upstream.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--tap-log",
        "-",
    ];
    let mut proxy = Proxy::start_in(&args, 1, None, |cmd| {
        cmd.stdout(std::process::Stdio::piped());
        adjust(cmd);
    });
    let out = proxy.child.stdout.take().unwrap();
    (proxy, out)
}

/// The log on stdout is plain text down a pipe, coloured where `CLICOLOR_FORCE` asks for it
/// (as the process log is).
#[test]
fn the_log_on_stdout_is_coloured_only_when_asked() {
    let echo = Upstream::echo();
    for force in [false, true] {
        let (mut proxy, mut out) = logging_to_stdout(echo.addr, |cmd| {
            if force {
                cmd.env("CLICOLOR_FORCE", "1");
            }
        });
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            out.read_to_end(&mut all).map(|_| all)
        });
        echo_once(proxy.addr(), b"hello");
        proxy.wait_count("bytes to client", 1, PROMPT);
        proxy.signal(SIGTERM);
        assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
        let text = String::from_utf8(reader.join().unwrap().unwrap()).unwrap();
        assert!(text.contains("hello"), "{text}");
        assert_eq!(text.contains("\x1b["), force, "{text}");
    }
}

/// The warning about dropped records says how to capture more where the writer's low priority
/// is the reason (it drops bulk bytes it is behind on by design), and only there.
#[test]
fn the_drop_warning_of_a_low_priority_writer_says_how_to_capture_more() {
    let echo = Upstream::echo();
    for priority in ["low", "normal"] {
        let dir = TempDir::new("drop-hint");
        let fifo = dir.path("slow-reader");
        mkfifo(&fifo);
        // A reader that takes nothing until the queue has overflowed.
        let mut reader = open_fifo_reader(&fifo);
        let config = format!(
            "[tap]\nlog = \"{}\"\nqueue_size = \"4 KiB\"\nwriter_priority = \"{priority}\"\n{}",
            fifo.display(),
            one_route("127.0.0.1:0", echo.addr, "")
        );
        let proxy = Proxy::with_config(&config, 1);
        let mut c = connect(proxy.addr());
        for _ in 0..50 {
            let msg = Pattern::bytes(5, 4096);
            c.write_all(&msg).unwrap();
            assert_eq!(read_n(&mut c, msg.len(), PROMPT).unwrap(), msg);
        }
        // Now read: the writer goes on and reports what it dropped.
        let deadline = Instant::now() + PROMPT;
        let line = loop {
            let mut buf = [0u8; 65536];
            let _ = reader.read(&mut buf);
            if proxy.count_log("tap dropped") > 0 {
                break proxy.wait_log("tap dropped", PROMPT);
            }
            assert!(
                Instant::now() < deadline,
                "no drop warning: {}",
                proxy.logs()
            );
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            line.contains("writer_priority = \"normal\" in [tap] captures more"),
            priority == "low",
            "{line}"
        );
    }
}

/// `--tap-log - | head`: once the reader of stdout has gone, the log there stops, said once;
/// proxying goes on, and the exit is clean.
#[test]
fn a_log_on_stdout_whose_reader_left_stops_once_and_proxying_goes_on() {
    let echo = Upstream::echo();
    let (mut proxy, mut out) = logging_to_stdout(echo.addr, |_| {});
    echo_once(proxy.addr(), b"first");
    // The reader takes the first line, then leaves.
    let mut line = [0u8; 16];
    out.read_exact(&mut line).unwrap();
    drop(out);
    let deadline = Instant::now() + PROMPT;
    let mut n = 0;
    while proxy.count_log("has no reader any more") == 0 {
        assert!(Instant::now() < deadline, "{}", proxy.logs());
        echo_once(proxy.addr(), b"more");
        n += 1;
    }
    for _ in 0..50 {
        echo_once(proxy.addr(), b"after");
    }
    proxy.wait_count("bytes to client", n + 51, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let logs = proxy.logs();
    assert_eq!(proxy.count_log("has no reader any more"), 1, "{logs}");
    assert_eq!(proxy.count_log("cannot write to stdout"), 0, "{logs}");
}

/// A pcap FIFO read by one reader after another (a live `tshark -r` restarted): each reader
/// gets a capture of its own, starting with the pcap header, not the middle of the previous
/// reader's stream.
#[test]
fn each_reader_of_a_pcap_fifo_gets_a_whole_capture() {
    let dir = TempDir::new("fifo-readers");
    let fifo = dir.path("live.pcap");
    mkfifo(&fifo);
    // The first reader: opened before the proxy, so the tap finds it at start.
    let mut first = open_fifo_reader(&fifo);
    let echo = Upstream::echo();
    let mut proxy = Proxy::start(&capture_args(echo.addr, fifo.to_str().unwrap()), 1);
    echo_once(proxy.addr(), b"for the first reader");
    let deadline = Instant::now() + PROMPT;
    let mut head = Vec::new();
    while head.len() < 4 {
        let mut buf = [0u8; 4096];
        match first.read(&mut buf) {
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "nothing for the first reader");
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(head[..4], [0xd4, 0xc3, 0xb2, 0xa1]);
    // The first reader leaves; traffic goes on until the tap has found it gone.
    drop(first);
    echo_until_logged(&proxy, "Broken pipe", &Pattern::bytes(3, 64 << 10), 10_000);
    // The second reader (its open waits for the writer, which opens the FIFO for the first
    // batch that finds a reader).
    let (started, has_started) = mpsc::channel();
    let path = fifo.clone();
    let reader = thread::spawn(move || {
        let mut second = std::fs::File::open(&path)?;
        let mut all = vec![0u8; 4096];
        let n = second.read(&mut all)?;
        all.truncate(n);
        let _ = started.send(());
        second.read_to_end(&mut all).map(|_| all)
    });
    let deadline = Instant::now() + PROMPT;
    while has_started.try_recv().is_err() {
        assert!(Instant::now() < deadline, "nothing for the second reader");
        echo_once(proxy.addr(), b"until the second reader reads");
    }
    let client = echo_once(proxy.addr(), b"for the second reader");
    proxy.wait_log(&format!("{client} -> {}: ", echo.addr), PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let got = reader.join().unwrap().unwrap();
    let copy = dir.path("second.pcap");
    std::fs::write(&copy, &got).unwrap();
    // A capture of its own: a header, whole packets (it may start with the end of connections
    // the first reader saw begin), and the new conversation from its SYN.
    let flows = read_pcap_from(&copy, false);
    assert_eq!(captured_request(&flows, client), b"for the second reader");
}

/// One TCP frame of a capture: ports (source, destination), flags, time.
#[derive(Debug)]
struct Frame {
    ports: [u16; 2],
    syn: bool,
    ack: bool,
    rst: bool,
    time: Duration,
}

/// The TCP frames of the capture at `path`, in file order.
fn tcp_frames(path: &Path) -> Vec<Frame> {
    let file = std::fs::File::open(path).expect("open pcap");
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap header");
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        let p = p.expect("pcap packet");
        let sliced = SlicedPacket::from_ethernet(&p.data).expect("ethernet frame");
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            panic!("not TCP")
        };
        frames.push(Frame {
            ports: [tcp.source_port(), tcp.destination_port()],
            syn: tcp.syn(),
            ack: tcp.ack(),
            rst: tcp.rst(),
            time: p.timestamp,
        });
    }
    frames
}

/// A slow connect shows in the capture as its SYN when the connect started and the SYN-ACK when
/// the upstream answered; a failed one, as its SYN and then the RST. The frames of other
/// connections in between stay in time order: Wireshark shows no negative deltas.
#[test]
fn connects_show_in_the_capture_when_they_happen_in_time_order() {
    let (slow, failing) = (Blackhole::start(), Blackhole::start());
    let echo = Upstream::echo();
    let dir = TempDir::new("tap-connect-order");
    let pcap = dir.path("out.pcap");
    let route = |up: SocketAddr, timeout: &str| {
        format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n\
             connect_timeout = \"{timeout}\"\n"
        )
    };
    let config = format!(
        "[tap]\npcap = \"{}\"\nwriter_priority = \"normal\"\n{}{}{}",
        pcap.display(),
        route(slow.addr, "30s"),
        route(failing.addr, "400ms"),
        route(echo.addr, "5s")
    );
    let mut proxy = Proxy::with_config(&config, 3);
    let mut waiting = connect(proxy.addrs[0]);
    let mut refused = connect(proxy.addrs[1]);
    let ports = [&waiting, &refused].map(|c| c.local_addr().unwrap().port());
    // Another conversation while both connects wait.
    echo_once(proxy.addrs[2], b"meanwhile");
    let _ = read_to_end(&mut refused, PROMPT);
    proxy.wait_log("upstream connect timeout", PROMPT);
    // Let the slow connect through: the proxy's SYN is sent again (after about a second) and
    // finds room once the queue is emptied.
    let mut upstream = slow.accept_other(PROMPT);
    upstream.write_all(b"late").unwrap();
    assert_eq!(read_n(&mut waiting, 4, PROMPT).unwrap(), b"late");
    drop((waiting, upstream));
    proxy.wait_count("bytes to client", 3, PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    let frames = tcp_frames(&pcap);
    for w in frames.windows(2) {
        assert!(
            w[0].time <= w[1].time,
            "frames out of time order: {frames:?}"
        );
    }
    let of =
        |port: u16| -> Vec<&Frame> { frames.iter().filter(|f| f.ports.contains(&port)).collect() };
    // The slow one: SYN, then SYN-ACK and ACK once the upstream answered.
    let slow_frames = of(ports[0]);
    let (syn, syn_ack) = (slow_frames[0], slow_frames[1]);
    assert!(
        syn.syn && !syn.ack && syn_ack.syn && syn_ack.ack,
        "{slow_frames:?}"
    );
    assert!(
        syn_ack.time - syn.time >= Duration::from_millis(500),
        "the SYN-ACK came about a second after the SYN: {slow_frames:?}"
    );
    // The failed one: SYN, and the upstream's RST when the proxy gave up.
    let failed = of(ports[1]);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[0].syn && failed[1].rst, "{failed:?}");
    assert!(
        failed[1].time - failed[0].time >= Duration::from_millis(350),
        "{failed:?}"
    );
}

/// A connect that times out shows in the capture as a SYN when the connect started and a RST
/// from the upstream when the proxy gave up: Wireshark's delta between them is the wait.
#[test]
fn a_timed_out_connect_shows_its_syn_when_it_was_sent() {
    let blackhole = Blackhole::start();
    let dir = TempDir::new("tap-connect-timeout");
    let (pcap, log) = (dir.path("out.pcap"), dir.path("tap.log"));
    let config = format!(
        "connect_timeout = \"400ms\"\n[tap]\npcap = \"{}\"\nlog = \"{}\"\n{}",
        pcap.display(),
        log.display(),
        one_route("127.0.0.1:0", blackhole.addr, "")
    );
    let mut proxy = Proxy::with_config(&config, 1);
    let mut c = connect(proxy.addr());
    let client = c.local_addr().unwrap();
    let _ = read_to_end(&mut c, PROMPT);
    proxy.wait_log("upstream connect timeout", PROMPT);
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(TAP_FLUSH).code(), Some(0));
    // The log tells a timeout from a refusal.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("RESET by proxy to client (upstream connect timed out)")
            && text.contains("close: upstream connect timed out"),
        "{text}"
    );
    let seen = tcp_frames(&pcap);
    let from_client = |f: &&Frame| f.ports[0] == client.port();
    let syn = (seen.iter())
        .find(|f| from_client(f) && f.syn)
        .expect("a SYN from the client");
    let rst = (seen.iter())
        .find(|f| !from_client(f) && f.rst)
        .expect("a RST from the upstream");
    let waited = rst.time.saturating_sub(syn.time);
    assert!(
        waited >= Duration::from_millis(350) && waited < PROMPT,
        "SYN to RST in the capture: {waited:?}, the connect waited 400ms: {seen:?}"
    );
}

/// Tap writers stuck in their outputs (FIFOs whose readers never read) hold the exit for one
/// shutdown wait in all, not one each: every writer, and the access log's, is told to stop at
/// once and all share the wait. The access log, not stuck, still writes every line.
#[test]
fn stuck_tap_writers_share_one_shutdown_wait() {
    let dir = TempDir::new("fifo-two");
    let (fifo_a, fifo_b) = (dir.path("stuck-a"), dir.path("stuck-b"));
    mkfifo(&fifo_a);
    mkfifo(&fifo_b);
    let (_reader_a, _reader_b) = (open_fifo_reader(&fifo_a), open_fifo_reader(&fifo_b));
    let access = dir.path("access.log");
    let up = Upstream::echo();
    let route = |name: &str, fifo: &Path| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
             [route.tap]\nlog = \"{}\"\n",
            up.addr,
            fifo.display()
        )
    };
    let config = format!(
        "drain_timeout = \"4s\"\n[access_log]\npath = \"{}\"\n{}{}",
        access.display(),
        route("a", &fifo_a),
        route("b", &fifo_b)
    );
    let mut proxy = Proxy::with_config(&config, 2);
    // A log of 512 KiB of payload is many times what a FIFO holds (64 KiB): both writers block.
    let bulk = Pattern::bytes(5, 512 << 10);
    for name in ["a", "b"] {
        echo_once(proxy.route_addr(name), &bulk);
    }
    let start = Instant::now();
    proxy.signal(SIGTERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let took = start.elapsed();
    // One wait is 4 s; one each would be 8 s.
    assert!(took < Duration::from_millis(6500), "exit took {took:?}");
    for stuck in ["stuck-a", "stuck-b"] {
        let line = proxy.wait_log(&format!("{stuck}): "), PROMPT);
        assert!(
            line.contains("records (") && !line.contains(", 0 records ("),
            "{line}"
        );
    }
    let logs = proxy.logs();
    assert!(
        !logs.contains("access log: the writer did not finish"),
        "{logs}"
    );
    let lines = std::fs::read_to_string(&access).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
}
