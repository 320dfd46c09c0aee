//! PROXY protocol on both sides of the proxy, end to end over loopback.
//!
//! - `send_proxy_protocol = "v1"`/`"v2"`: a fake upstream decodes the header with the crate's
//!   own parser and checks the addresses, then the payload.
//! - `accept_proxy_protocol = true`: clients send headers with made-up addresses; the upstream
//!   sees only the payload, the log and the tap name the made-up client; malformed and missing
//!   headers are handled without disturbing other connections.
//! - Real peers: haproxy in `mode tcp` receiving tcptap's header (`accept-proxy`) and sending
//!   one to tcptap (`send-proxy`, `send-proxy-v2`). These need the `haproxy` binary: without it
//!   they fail when `CI` is set and are skipped with a note otherwise.

mod common;

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tcptap::proxy_protocol::{
    self, Command as PpCommand, ParseError, Parsed, ProxyHeader, Version, encode_v1, encode_v2,
};

use common::{
    PROMPT, Pattern, Proxy, TAP_FLUSH, TempDir, Upstream, assert_kept_open, connect, free_port,
    read_n, read_to_end,
};

const REQUEST_LEN: usize = 100 * 1024;

/// Reads from `s` until `proxy_protocol::parse` gives an answer; returns it with whatever
/// payload bytes came in the same reads.
fn read_header(s: &mut TcpStream) -> io::Result<(Result<ProxyHeader, ParseError>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + PROMPT;
    loop {
        match proxy_protocol::parse(&buf) {
            Ok(Parsed::Incomplete) => {}
            Ok(Parsed::Complete { header, consumed }) => {
                return Ok((Ok(header), buf[consumed..].to_vec()));
            }
            Err(e) => return Ok((Err(e), buf)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("incomplete header after {} bytes: {buf:?}", buf.len()),
            ));
        }
        s.set_read_timeout(Some(left))?;
        use std::io::Read;
        match s.read(&mut chunk)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF inside the header after {} bytes: {buf:?}", buf.len()),
                ));
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What a header-reading upstream saw on one connection.
type Seen = io::Result<(ProxyHeader, Vec<u8>)>;

/// An upstream that expects a PROXY header, then reads the payload to EOF, replies with the
/// payload reversed and shuts its write side.
fn header_upstream() -> (Upstream, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let up = Upstream::start(move |mut s| {
        let seen = (|| {
            let (header, mut payload) = read_header(&mut s)?;
            let header = header.map_err(io::Error::other)?;
            payload.extend(read_to_end(&mut s, Duration::from_secs(30))?);
            Ok((header, payload))
        })();
        if let Ok((_, payload)) = &seen {
            let reply: Vec<u8> = payload.iter().rev().copied().collect();
            let _ = s.write_all(&reply);
            let _ = s.shutdown(Shutdown::Write);
        }
        let _ = tx.send(seen);
    });
    (up, rx)
}

fn ipv6_loopback_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Sends `data`, half-closes, reads the reply to EOF.
fn request(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).expect("send request");
    s.shutdown(Shutdown::Write).unwrap();
    read_to_end(s, Duration::from_secs(30)).expect("reply")
}

#[test]
fn send_proxy_protocol_v1_and_v2_carry_client_and_listen_address() {
    let (up, seen) = header_upstream();
    let mut toml = String::new();
    let mut cases = vec![("v1", "127.0.0.1:0"), ("v2", "127.0.0.1:0")];
    if ipv6_loopback_available() {
        cases.extend([("v1", "[::1]:0"), ("v2", "[::1]:0")]);
    }
    for (i, (version, listen)) in cases.iter().enumerate() {
        toml.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\nlisten = \"{listen}\"\nupstream = \"{}\"\n\
             send_proxy_protocol = \"{version}\"\n",
            up.addr
        ));
    }
    let proxy = Proxy::with_config(&toml, cases.len());
    for (i, (version, _)) in cases.iter().enumerate() {
        let listen = proxy.addrs[i];
        let mut c = connect(listen);
        let me = c.local_addr().unwrap();
        let data = Pattern::bytes(i as u64, REQUEST_LEN);
        let reply = request(&mut c, &data);
        let (header, payload) = seen
            .recv_timeout(PROMPT)
            .expect("upstream connection")
            .unwrap_or_else(|e| panic!("{version} via {listen}: {e}"));
        let expected = if *version == "v1" {
            Version::V1
        } else {
            Version::V2
        };
        assert_eq!(
            header,
            ProxyHeader {
                version: expected,
                command: PpCommand::Proxy,
                addrs: Some((me, listen)),
            },
            "{version} via {listen}"
        );
        assert!(payload == data, "{version} via {listen}: payload differs");
        let reversed: Vec<u8> = data.iter().rev().copied().collect();
        assert!(reply == reversed, "{version} via {listen}: reply differs");
        let line = proxy.wait_log(&format!("{me} -> {}: ", up.addr), PROMPT);
        // The header is not counted as client bytes.
        assert!(
            line.contains(&format!(
                "{REQUEST_LEN} bytes to upstream, {REQUEST_LEN} bytes to client"
            )),
            "{line}"
        );
    }
}

/// Health probes of a route that sends the PROXY protocol start with the header of a
/// connection of the proxy's own (v1 `UNKNOWN`, v2 `LOCAL`, as haproxy's `check-send-proxy`)
/// and end with a FIN: a backend that expects a header sees a well-formed probe, not a broken
/// connection.
#[test]
fn health_probes_send_a_local_header_when_the_route_sends_the_protocol() {
    for (version, v2) in [("v1", false), ("v2", true)] {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = backend.local_addr().unwrap();
        let config = format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{addr}\"\n\
             send_proxy_protocol = \"{version}\"\n\
             [route.health_check]\ninterval = \"100ms\"\ntimeout = \"100ms\"\n"
        );
        let _proxy = Proxy::with_config(&config, 1);
        let (mut probe, _) = backend.accept().unwrap();
        // The whole probe: the header, then EOF (a reset would be an error here).
        let got = read_to_end(&mut probe, PROMPT).unwrap();
        let header = match proxy_protocol::parse(&got) {
            Ok(Parsed::Complete { header, consumed }) => {
                assert_eq!(consumed, got.len(), "{version}: only a header: {got:?}");
                header
            }
            other => panic!("{version}: {other:?} from {got:?}"),
        };
        assert_eq!(header.addrs, None, "{version}: no addresses");
        if v2 {
            assert_eq!(header.command, PpCommand::Local);
        }
        assert_eq!(header.version == Version::V2, v2);
    }
}

fn accepting_proxy(upstream: SocketAddr, timeout: &str, tap_log: &std::path::Path) -> Proxy {
    Proxy::with_config(
        &format!(
            "[tap]\nlog = \"{}\"\n[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
             accept_proxy_protocol = true\nproxy_protocol_timeout = \"{timeout}\"\n",
            tap_log.display()
        ),
        1,
    )
}

/// Waits until the file at `path` contains `needle`.
fn wait_file_contains(path: &std::path::Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no {needle:?} within {timeout:?}:\n{text}",
            path.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn accept_proxy_protocol_v1_and_v2_use_the_header_addresses() {
    let echo = Upstream::echo();
    let dir = TempDir::new("pp-accept");
    let tap = dir.path("tap.log");
    let proxy = accepting_proxy(echo.addr, "3s", &tap);

    let v1_src: SocketAddr = "203.0.113.7:40001".parse().unwrap();
    let v1_dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
    let v2_src: SocketAddr = "[2001:db8::7]:40002".parse().unwrap();
    let v2_dst: SocketAddr = "[2001:db8::1]:443".parse().unwrap();

    // v1: header and payload in one write.
    let data = Pattern::bytes(11, REQUEST_LEN);
    let mut bytes = Vec::new();
    encode_v1(v1_src, v1_dst, &mut bytes);
    bytes.extend_from_slice(&data);
    let mut c = connect(proxy.addr());
    assert!(request(&mut c, &bytes) == data, "v1: echo differs");

    // v2: the header in pieces, then the payload.
    let data2 = Pattern::bytes(12, REQUEST_LEN);
    let mut header = Vec::new();
    encode_v2(v2_src, v2_dst, &mut header);
    let mut c2 = connect(proxy.addr());
    c2.set_nodelay(true).unwrap();
    for piece in header.chunks(7) {
        c2.write_all(piece).unwrap();
    }
    assert!(request(&mut c2, &data2) == data2, "v2: echo differs");

    for src in [v1_src, v2_src] {
        let line = proxy.wait_log(&format!("{src} -> {}: ", echo.addr), PROMPT);
        assert!(
            line.contains(&format!(
                "{REQUEST_LEN} bytes to upstream, {REQUEST_LEN} bytes to client"
            )),
            "{line}"
        );
        wait_file_contains(&tap, &src.to_string(), TAP_FLUSH);
    }
    let real = c.local_addr().unwrap().to_string();
    assert!(
        !proxy.logs().contains(&format!("{real} -> ")),
        "the real client address was logged as the client:\n{}",
        proxy.logs()
    );
}

#[test]
fn accept_proxy_protocol_resets_a_malformed_header() {
    let echo = Upstream::echo();
    let dir = TempDir::new("pp-bad");
    let proxy = accepting_proxy(echo.addr, "3s", &dir.path("tap.log"));
    let bad: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 nonsense\r\npayload",
        b"\r\n\r\n\0\r\nQUIT\n\x99\x11\x00\x0cpayload-payload",
    ];
    for (i, bytes) in bad.iter().enumerate() {
        let before = proxy.count_log("PROXY");
        let mut c = connect(proxy.addr());
        c.write_all(bytes).unwrap();
        let got = read_to_end(&mut c, PROMPT);
        assert!(
            matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "malformed header {i}: expected a reset, got {got:?}"
        );
        let deadline = Instant::now() + PROMPT;
        while proxy.count_log("PROXY") == before {
            assert!(
                Instant::now() < deadline,
                "malformed header {i}: no log line with \"PROXY\":\n{}",
                proxy.logs()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    // Still serving.
    let mut header = Vec::new();
    encode_v1(
        "192.0.2.1:1000".parse().unwrap(),
        "192.0.2.2:80".parse().unwrap(),
        &mut header,
    );
    let mut c = connect(proxy.addr());
    c.write_all(&header).unwrap();
    assert_eq!(request(&mut c, b"after"), b"after");
}

#[test]
fn accept_proxy_protocol_closes_a_silent_client_after_the_timeout() {
    let echo = Upstream::echo();
    let dir = TempDir::new("pp-timeout");
    let proxy = accepting_proxy(echo.addr, "1500ms", &dir.path("tap.log"));
    let timeout = Duration::from_millis(1500);

    let started = Instant::now();
    let mut silent = connect(proxy.addr());
    let mut partial = connect(proxy.addr());
    partial.write_all(b"PROXY TCP4 192.0.2.").unwrap();

    // Meanwhile another client is served in full.
    let mut header = Vec::new();
    encode_v2(
        "192.0.2.10:5000".parse().unwrap(),
        "192.0.2.20:80".parse().unwrap(),
        &mut header,
    );
    let mut other = connect(proxy.addr());
    other.write_all(&header).unwrap();
    let data = Pattern::bytes(13, 64 * 1024);
    assert!(request(&mut other, &data) == data, "echo differs");
    let served = started.elapsed();

    for (name, s) in [("silent", &mut silent), ("partial", &mut partial)] {
        let got = read_to_end(s, timeout + PROMPT);
        let closed = started.elapsed();
        assert!(
            matches!(&got, Ok(b) if b.is_empty())
                || matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{name}: expected the proxy to close, got {got:?}"
        );
        assert!(
            closed >= timeout - Duration::from_millis(100),
            "{name}: closed after {closed:?}, before the {timeout:?} timeout"
        );
        assert!(
            served < closed,
            "{name}: the other client finished after {served:?}, the waiting ones closed at {closed:?}"
        );
    }
    proxy.wait_log("192.0.2.10:5000 -> ", PROMPT);
}

/// A header that arrives in two parts: the proxy looks at what came first, and reads on when
/// the rest comes (the client's socket is registered after that first look).
#[test]
fn a_header_in_two_parts_is_read_when_the_rest_comes() {
    let echo = Upstream::echo();
    let dir = TempDir::new("pp-two-parts");
    let proxy = accepting_proxy(echo.addr, "5s", &dir.path("tap.log"));
    for split in [0, 6, 20] {
        let header = b"PROXY TCP4 192.0.2.7 192.0.2.8 5007 80\r\n";
        let mut c = connect(proxy.addr());
        c.write_all(&header[..split]).unwrap();
        // Nothing comes back while the header is incomplete.
        let early = read_n(&mut c, 1, Duration::from_millis(200));
        assert_eq!(
            early.unwrap_err().kind(),
            io::ErrorKind::TimedOut,
            "split {split}"
        );
        c.write_all(&header[split..]).unwrap();
        assert_eq!(request(&mut c, b"after"), b"after", "split {split}");
    }
    proxy.wait_log("192.0.2.7:5007 -> ", PROMPT);
}

/// A header's connect to a loopback upstream completes within connect(2), and no event says so:
/// the pair must go on at once, not sit until `connect_timeout` and fail.
#[test]
fn after_the_header_a_connect_that_completes_at_once_goes_on() {
    let echo = Upstream::echo();
    let proxy = Proxy::with_config(
        &format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
             accept_proxy_protocol = true\nconnect_timeout = \"300ms\"\n",
            echo.addr
        ),
        1,
    );
    let mut c = connect(proxy.addr());
    c.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 5000 80\r\n")
        .unwrap();
    assert_kept_open(&mut c, Duration::from_secs(1), || proxy.logs());
    drop(c);
    proxy.wait_log("192.0.2.1:5000 -> ", PROMPT);
}

/// Two tcptap instances back to back: the first sends a header, the second accepts it and logs
/// the first one's client.
#[test]
fn send_and_accept_chain() {
    let echo = Upstream::echo();
    let inner = Proxy::with_config(
        &format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\naccept_proxy_protocol = true\n",
            echo.addr
        ),
        1,
    );
    for version in ["v1", "v2"] {
        let outer = Proxy::with_config(
            &format!(
                "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nsend_proxy_protocol = \"{version}\"\n",
                inner.addr()
            ),
            1,
        );
        let mut c = connect(outer.addr());
        let me = c.local_addr().unwrap();
        let data = Pattern::bytes(14, REQUEST_LEN);
        assert!(request(&mut c, &data) == data, "{version}: echo differs");
        inner.wait_log(&format!("{me} -> {}: ", echo.addr), PROMPT);
        outer.wait_log(&format!("{me} -> {}: ", inner.addr()), PROMPT);
    }
}

// ---------------------------------------------------------------------------------------------
// haproxy as the real peer.

/// `haproxy -f CFG -db` (foreground), killed by PID on drop; stdout and stderr are collected.
struct Haproxy {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

/// Whether haproxy can be run here; without it, fails under CI and returns false otherwise.
fn haproxy_available() -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is not installed: CI must install the `haproxy` package (see .ci/run)"
        );
        eprintln!("note: haproxy is not installed; skipping this test (apt-get install haproxy)");
    }
    found
}

impl Haproxy {
    /// Starts haproxy with `sections` after a `global`/`defaults` preamble that logs to stdout,
    /// and waits until each of `ports` listens on 127.0.0.1.
    fn start(sections: &str, ports: &[u16]) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let cfg = dir.path("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n    log stdout format raw local0\n    nbthread 1\n\
                 defaults\n    mode tcp\n    log global\n    timeout connect 5s\n\
                 \x20   timeout client 30s\n    timeout server 30s\n{sections}"
            ),
        )
        .unwrap();
        let mut child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let mut h = Haproxy {
            child,
            output,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ports.iter().all(|p| listening(*p)) {
            if let Some(st) = h.child.try_wait().unwrap() {
                panic!("haproxy exited ({st}):\n{}", h.output());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy does not listen on {ports:?}:\n{}",
                h.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
        h
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn wait_output(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .output
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "haproxy printed no {needle:?} within {timeout:?}:\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a socket listens on 127.0.0.1:`port` (from /proc/net/tcp, without connecting).
fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1] == want && cols[3] == "0A"
        })
}

/// tcptap sends v1 and v2 headers to haproxy's `accept-proxy` listener; haproxy logs tcptap's
/// client as the client and tcptap's listen address as the frontend address.
#[test]
fn haproxy_accepts_the_header_tcptap_sends() {
    if !haproxy_available() {
        return;
    }
    let echo = Upstream::echo();
    let port = free_port();
    let haproxy = Haproxy::start(
        &format!(
            "frontend fe\n    bind 127.0.0.1:{port} accept-proxy\n\
             \x20   log-format \"tcptap-test ci=%ci:%cp fi=%fi:%fp bytes=%B\"\n\
             \x20   default_backend be\n\
             backend be\n    server s1 {}\n",
            echo.addr
        ),
        &[port],
    );
    let proxy = Proxy::with_config(
        &format!(
            "[[route]]\nname = \"v1\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\n\
             send_proxy_protocol = \"v1\"\n\
             [[route]]\nname = \"v2\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\n\
             send_proxy_protocol = \"v2\"\n"
        ),
        2,
    );
    for listen in proxy.addrs.clone() {
        let mut c = connect(listen);
        let me = c.local_addr().unwrap();
        let data = Pattern::bytes(21, REQUEST_LEN);
        assert!(request(&mut c, &data) == data, "via {listen}: echo differs");
        let line = haproxy.wait_output(&format!("ci={me} "), PROMPT);
        assert!(
            line.contains(&format!("fi={listen} ")),
            "haproxy's frontend address is not tcptap's listener {listen}: {line}"
        );
    }
}

/// haproxy sends `send-proxy` (v1) and `send-proxy-v2` headers to tcptap; tcptap logs
/// haproxy's client, not haproxy, as the client.
#[test]
fn tcptap_accepts_the_header_haproxy_sends() {
    if !haproxy_available() {
        return;
    }
    let echo = Upstream::echo();
    let proxy = Proxy::with_config(
        &format!(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\naccept_proxy_protocol = true\n",
            echo.addr
        ),
        1,
    );
    let (p1, p2) = (free_port(), free_port());
    let haproxy = Haproxy::start(
        &format!(
            "listen v1\n    bind 127.0.0.1:{p1}\n    server s1 {tcptap} send-proxy\n\
             listen v2\n    bind 127.0.0.1:{p2}\n    server s1 {tcptap} send-proxy-v2\n",
            tcptap = proxy.addr()
        ),
        &[p1, p2],
    );
    for port in [p1, p2] {
        let mut c = connect(format!("127.0.0.1:{port}").parse().unwrap());
        let me = c.local_addr().unwrap();
        let data = Pattern::bytes(22, REQUEST_LEN);
        assert!(
            request(&mut c, &data) == data,
            "via haproxy :{port}: echo differs\n{}",
            haproxy.output()
        );
        let line = proxy.wait_log(&format!("{me} -> {}: ", echo.addr), PROMPT);
        assert!(
            line.contains(&format!(
                "{REQUEST_LEN} bytes to upstream, {REQUEST_LEN} bytes to client"
            )),
            "{line}"
        );
    }
}
