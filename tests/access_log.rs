//! The access log tells bytes received from bytes delivered: a response cut by a reset (idle
//! timeout, either peer resetting) shows `delivered_u2d` below `bytes_u2d`, by exactly what the
//! client never got; a connection that ends cleanly shows them equal.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{PROMPT, Pattern, Proxy, TempDir, Upstream, expect_pattern, send_pattern};

/// The client's request.
const REQUEST: &[u8] = b"hello";
/// The upstream's response: far more than every buffer on the way holds.
const RESPONSE: usize = 8 << 20;

/// One access-log entry, from a JSON or a logfmt line, as `field -> value` (strings unquoted).
fn parse_entry(line: &str) -> HashMap<String, String> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        v.as_object()
            .expect("JSON object")
            .iter()
            .map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                (k.clone(), v)
            })
            .collect()
    } else {
        // The values written here have no spaces (no route name is set).
        line.split(' ')
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("key=value");
                (k.to_string(), v.to_string())
            })
            .collect()
    }
}

/// Waits for the access log at `path` to hold one entry, and returns it.
fn wait_entry(path: &Path) -> HashMap<String, String> {
    let deadline = Instant::now() + PROMPT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.ends_with('\n') {
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 1, "{text}");
            return parse_entry(lines[0]);
        }
        assert!(Instant::now() < deadline, "no access log entry: {text:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn num(entry: &HashMap<String, String>, field: &str) -> u64 {
    entry
        .get(field)
        .unwrap_or_else(|| panic!("no {field} in {entry:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{field} in {entry:?}: {e}"))
}

fn config(dir: &TempDir, format: &str, top: &str, upstream: SocketAddr) -> String {
    format!(
        "{top}\nbuffer_size = \"64 KiB\"\n\
         [socket]\nsend_buffer_size = \"64 KiB\"\nrecv_buffer_size = \"64 KiB\"\n\
         [access_log]\npath = \"{}\"\nformat = \"{format}\"\n\
         [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n",
        dir.path("access.log").display()
    )
}

/// A client with a small receive buffer that sends the request and reads nothing yet.
fn client(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), PROMPT).unwrap();
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(PROMPT)).unwrap();
    s.write_all(REQUEST).unwrap();
    s
}

/// Reads until the stream ends; returns the bytes and whether it ended with a reset.
fn read_until_cut(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("after {} bytes: {e}", got.len()),
        }
    }
}

/// What the upstream does once its response no longer moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stuck {
    /// Waits until the proxy closes the connection.
    Wait,
    /// Resets the connection.
    Reset,
}

/// An upstream that reads the request, then writes the response until it stops moving for a
/// second, says so on the channel, and does `then`.
fn stalling_upstream(then: Stuck) -> (Upstream, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = Upstream::start(move |mut s| {
        let mut req = [0u8; REQUEST.len()];
        s.read_exact(&mut req).unwrap();
        assert_eq!(req, REQUEST);
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        // A fixed send buffer: however large `tcp_wmem` lets it grow, the response does not fit
        // in the buffers on the way.
        socket2::SockRef::from(&s)
            .set_send_buffer_size(128 * 1024)
            .unwrap();
        let response = Pattern::bytes(3, RESPONSE);
        assert!(
            s.write_all(&response).is_err(),
            "the whole response went through a client that does not read"
        );
        let _ = tx.lock().unwrap().send(());
        match then {
            Stuck::Wait => {
                let _ = s.read(&mut [0u8; 1]);
            }
            Stuck::Reset => {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        }
    });
    (up, rx)
}

/// The entry of a connection whose response was cut: what the client got is what the log says
/// was delivered, less than what was received; the request went through whole.
fn check_cut(entry: &HashMap<String, String>, client_got: u64, end: &str) {
    eprintln!("{entry:?}, client got {client_got}");
    assert_eq!(entry["end"], end, "{entry:?}");
    assert_eq!(num(entry, "bytes_d2u"), REQUEST.len() as u64, "{entry:?}");
    assert_eq!(
        num(entry, "delivered_d2u"),
        REQUEST.len() as u64,
        "{entry:?}"
    );
    let (received, delivered) = (num(entry, "bytes_u2d"), num(entry, "delivered_u2d"));
    assert!(received < RESPONSE as u64, "{entry:?}");
    assert!(delivered < received, "{entry:?}");
    assert_eq!(
        delivered, client_got,
        "the client got what was delivered: {entry:?}"
    );
}

/// A client, through a proxy (`top` settings, access log in `format`), of an upstream whose
/// response stalls, then which does `then`: once the connection is cut (the client reset after
/// some bytes, checked), the proxy, its directory and the entry, checked by [`check_cut`] with
/// close reason `end`.
fn response_cut(
    then: Stuck,
    format: &str,
    top: &str,
    end: &str,
) -> (TempDir, Proxy, HashMap<String, String>) {
    let dir = TempDir::new("access");
    let (up, stuck) = stalling_upstream(then);
    let proxy = Proxy::with_config(&config(&dir, format, top, up.addr), 1);
    let mut c = client(proxy.addr());
    stuck
        .recv_timeout(PROMPT + PROMPT)
        .expect("the response stalls");
    let entry = wait_entry(&dir.path("access.log"));
    let (got, reset) = read_until_cut(&mut c);
    assert!(reset, "the client was reset, after {} bytes", got.len());
    assert!(got == Pattern::bytes(3, got.len()), "bytes differ");
    check_cut(&entry, got.len() as u64, end);
    (dir, proxy, entry)
}

fn cut_by_idle_timeout(splice: bool, format: &str) {
    // The proxy resets both sides a second after the last byte moved.
    let top = format!("idle_timeout = \"1s\"\nsplice = {splice}");
    let (_dir, proxy, entry) = response_cut(Stuck::Wait, format, &top, "idle_timeout");
    assert_eq!(entry["u2d_end"], "timeout");
    proxy.wait_log("buffered bytes discarded", PROMPT);
}

#[test]
fn a_response_cut_by_the_idle_timeout_shows_what_the_client_got_copy() {
    cut_by_idle_timeout(false, "json");
}

#[test]
fn a_response_cut_by_the_idle_timeout_shows_what_the_client_got_splice() {
    cut_by_idle_timeout(true, "text");
}

#[test]
fn a_response_cut_by_an_upstream_reset_shows_what_the_client_got() {
    let (_dir, _proxy, entry) = response_cut(Stuck::Reset, "json", "", "reset_by_upstream");
    assert_eq!(entry["u2d_end"], "reset_by_upstream");
}

#[test]
fn a_client_reset_with_a_response_in_flight_shows_what_it_had_received() {
    let dir = TempDir::new("access");
    let (up, stuck) = stalling_upstream(Stuck::Wait);
    let proxy = Proxy::with_config(&config(&dir, "text", "splice = false", up.addr), 1);
    let mut c = client(proxy.addr());
    // Some of the response is read, then the client stops reading.
    let mut head = vec![0; 100 * 1024];
    c.read_exact(&mut head).unwrap();
    assert!(head == Pattern::bytes(3, head.len()), "bytes differ");
    stuck
        .recv_timeout(PROMPT + PROMPT)
        .expect("the response stalls");
    // What the client's kernel holds for it counts as received: the client's TCP acknowledged it.
    let got = head.len() as u64 + tcptap::net::unread(&c).expect("SIOCINQ");
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    let entry = wait_entry(&dir.path("access.log"));
    check_cut(&entry, got, "reset_by_client");
    assert_eq!(entry["u2d_end"], "reset_by_client");
}

/// A connection that ends with FIN both ways delivered every byte received, the PROXY protocol
/// header the proxy adds toward the upstream not counted.
#[test]
fn a_clean_connection_delivered_every_byte_it_received() {
    const LEN: usize = 1 << 20;
    let dir = TempDir::new("access");
    let header = Arc::new(Mutex::new(Vec::new()));
    let up = {
        let header = header.clone();
        // Takes the header line off, then echoes the rest.
        Upstream::start(move |mut s| {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut b).unwrap();
                line.push(b[0]);
            }
            *header.lock().unwrap() = line;
            let mut w = s.try_clone().unwrap();
            std::io::copy(&mut s, &mut w).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let toml = config(&dir, "text", "", up.addr)
        .replace("[[route]]\n", "[[route]]\nsend_proxy_protocol = \"v1\"\n");
    let proxy = Proxy::with_config(&toml, 1);
    let mut c = common::connect(proxy.addr());
    let mut w = c.try_clone().unwrap();
    let sender = thread::spawn(move || {
        send_pattern(&mut w, 9, LEN).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    assert_eq!(expect_pattern(&mut c, 9, LEN).unwrap(), LEN);
    sender.join().unwrap();
    let entry = wait_entry(&dir.path("access.log"));
    eprintln!("{entry:?}");
    assert!(header.lock().unwrap().starts_with(b"PROXY TCP4 "));
    assert_eq!(entry["end"], "client_closed_first");
    for field in ["bytes_d2u", "delivered_d2u", "bytes_u2d", "delivered_u2d"] {
        assert_eq!(num(&entry, field), LEN as u64, "{field}: {entry:?}");
    }
}

/// Each connection's `tap_dropped_records` counts every record of it the tap dropped, those
/// of its end (FIN, reset, close) included: over all connections they add up to the total in
/// `/metrics`, as its bytes do.
#[test]
fn tap_drops_per_connection_add_up_to_the_total() {
    // More than the queue's reserve for control records (open, FIN, reset, close) holds.
    const CONNS: usize = 400;
    let dir = TempDir::new("access-tap-drops");
    // A FIFO nobody opens: the tap writer waits for a reader, its small queue fills, and the
    // records past it are dropped.
    let fifo = dir.path("nobody-reads");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let up = Upstream::echo();
    let toml = config(&dir, "json", "drain_timeout = \"1s\"", up.addr).replace(
        "[[route]]\n",
        &format!(
            "[tap]\nlog = \"{}\"\nqueue_size = \"4 KiB\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[route]]\n",
            fifo.display()
        ),
    );
    let proxy = Proxy::with_config(&toml, 1);
    // Some connections end with a FIN each way, some with the client's reset.
    for i in 0..CONNS {
        let mut c = common::connect(proxy.addr());
        c.write_all(b"ping").unwrap();
        assert_eq!(common::read_n(&mut c, 4, PROMPT).unwrap(), b"ping");
        if i % 2 == 0 {
            c.shutdown(Shutdown::Write).unwrap();
            assert_eq!(common::read_to_end(&mut c, PROMPT).unwrap(), b"");
        } else {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    }
    let path = dir.path("access.log");
    let deadline = Instant::now() + PROMPT;
    let entries = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() == CONNS && text.ends_with('\n') {
            break lines.into_iter().map(parse_entry).collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "{} entries: {text}", lines.len());
        thread::sleep(Duration::from_millis(20));
    };
    let sum = |field| entries.iter().map(|e| num(e, field)).sum::<u64>();
    let (records, bytes) = (sum("tap_dropped_records"), sum("tap_dropped_bytes"));
    let body = common::wait_metric(
        proxy.admin_addr(),
        "tcptap_tap_dropped_records_total",
        records as f64,
    );
    assert_eq!(
        common::metric(&body, "tcptap_tap_dropped_bytes_total"),
        Some(bytes as f64),
        "{body}"
    );
    // The last connections lost every record: connect, open, the data each way, then FIN both
    // ways and close, or reset and close.
    let last = &entries[CONNS - 2..];
    assert_eq!(
        last.iter()
            .map(|e| num(e, "tap_dropped_records"))
            .collect::<Vec<_>>(),
        [7, 6],
        "{last:?}"
    );
}

/// An access log at the file size limit (`ulimit -f`, as on a full disk): a batch that fails
/// part-way is cut off the file again, so that once there is room the file goes on with whole
/// lines (not a torn line that the next one continues), and every connection is either a line
/// written or a drop counted, in the file (`{"dropped":N}`) and in the exit line.
#[test]
fn an_access_log_at_the_file_size_limit_keeps_whole_lines_and_counts_what_it_lost() {
    const LIMIT: u64 = 3000;
    let dir = TempDir::new("access-fsize");
    let up = Upstream::echo();
    let mut proxy = Proxy::with_config(&config(&dir, "json", "", up.addr), 1);
    common::set_fsize(proxy.pid(), LIMIT);
    let mut conns = 0;
    let mut echo_one = || {
        let mut c = common::connect(proxy.addr());
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(common::read_to_end(&mut c, PROMPT).unwrap(), b"ping");
        conns += 1;
    };
    // Until a write has failed, then a few more that fail too.
    let deadline = Instant::now() + PROMPT;
    while proxy.count_log("access log: write failed") == 0 {
        assert!(
            Instant::now() < deadline,
            "no failed write: {}",
            proxy.logs()
        );
        echo_one();
    }
    for _ in 0..3 {
        echo_one();
    }
    common::set_fsize(proxy.pid(), libc::RLIM_INFINITY);
    for _ in 0..3 {
        echo_one();
    }
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(PROMPT).code(), Some(0));
    let text = std::fs::read_to_string(dir.path("access.log")).unwrap();
    let (mut lines, mut dropped) = (0, 0);
    for line in text.lines() {
        let entry = parse_entry(line);
        match entry.get("dropped") {
            Some(n) => dropped += n.parse::<u64>().unwrap(),
            None => lines += 1,
        }
    }
    assert!(dropped > 0 && lines > 3, "{text}");
    assert_eq!(lines + dropped, conns, "{text}");
    let exit = proxy.wait_log(" lines written, ", PROMPT);
    let exit = exit.split("access log: ").nth(1).unwrap();
    assert!(
        exit.starts_with(&format!("{lines} lines written, {dropped} dropped, ")),
        "{exit}"
    );
}
