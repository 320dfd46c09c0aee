//! TCP urgent data (`send(MSG_OOB)`) from a client: the urgent byte itself is not forwarded (as
//! with haproxy and nginx), every other byte is, in order, and the stream ends cleanly only once
//! it is complete. On the zero-copy path `splice(2)` stops at the urgent mark (EAGAIN, or 0 once
//! the FIN is in), so these cover bulk (spliced) as well as small (copied) directions.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Instant;

use common::{PROMPT, Pattern, Proxy, TempDir, Upstream, connect, read_to_end, while_stopped};

/// What the upstream saw: each chunk read, then how the stream ended.
enum Seen {
    Bytes(Vec<u8>),
    Eof,
    Failed(io::Error),
}

/// An upstream that reports every chunk it reads, then the EOF (or error), and closes.
fn reporting_upstream() -> (Upstream, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let up = Upstream::start(move |mut s| {
        let tx = tx.lock().unwrap().clone();
        let mut buf = vec![0; 256 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(Seen::Eof);
                    break;
                }
                Ok(n) => {
                    let _ = tx.send(Seen::Bytes(buf[..n].to_vec()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Seen::Failed(e));
                    break;
                }
            }
        }
    });
    (up, rx)
}

/// Receives upstream chunks until exactly `want` bytes came (they must equal `want`), failing on
/// an early end, extra bytes or the deadline.
fn expect_bytes(rx: &mpsc::Receiver<Seen>, want: &[u8], what: &str) {
    let deadline = Instant::now() + PROMPT;
    let mut got = Vec::new();
    while got.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Seen::Bytes(b)) => got.extend_from_slice(&b),
            Ok(Seen::Eof) => panic!("{what}: upstream saw EOF after {} bytes", got.len()),
            Ok(Seen::Failed(e)) => panic!("{what}: upstream failed after {} bytes: {e}", got.len()),
            Err(_) => panic!(
                "{what}: upstream got {} of {} bytes within {PROMPT:?}",
                got.len(),
                want.len()
            ),
        }
    }
    assert_eq!(got.len(), want.len(), "{what}: more bytes than sent");
    assert!(got == want, "{what}: bytes differ from what was sent");
}

/// The next thing the upstream sees must be a clean EOF.
fn expect_eof(rx: &mpsc::Receiver<Seen>, what: &str) {
    match rx.recv_timeout(PROMPT) {
        Ok(Seen::Eof) => {}
        Ok(Seen::Bytes(b)) => panic!("{what}: {} unexpected bytes before EOF", b.len()),
        Ok(Seen::Failed(e)) => panic!("{what}: upstream failed instead of EOF: {e}"),
        Err(_) => panic!("{what}: no EOF within {PROMPT:?}"),
    }
}

/// Sends one urgent byte.
fn send_oob(s: &TcpStream, byte: u8) {
    // SAFETY: send(2) of one byte from a live local on a socket we own.
    let n = unsafe { libc::send(s.as_raw_fd(), (&raw const byte).cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "send(MSG_OOB): {}", io::Error::last_os_error());
}

/// Client: 1 MiB of bulk data (the direction moves to splice), checked at the upstream.
fn bulk_start(proxy: &Proxy, rx: &mpsc::Receiver<Seen>) -> TcpStream {
    let mut c = connect(proxy.addr());
    let bulk = Pattern::bytes(1, 1 << 20);
    c.write_all(&bulk).unwrap();
    expect_bytes(rx, &bulk, "bulk before the urgent byte");
    c
}

/// The client's end of the stream: after its FIN, the proxy closes cleanly (the upstream closes
/// after its EOF), so the client reads a clean EOF, and the log says the client closed first.
fn expect_clean_close(proxy: &Proxy, c: &mut TcpStream) {
    let rest = read_to_end(c, PROMPT).expect("clean EOF at the client");
    assert!(rest.is_empty(), "the upstream sends nothing");
    proxy.wait_log("client closed first", PROMPT);
    assert_eq!(proxy.count_log("reset"), 0, "{}", proxy.logs());
}

/// A spliced stream, then the urgent byte, more data and the FIN, all arriving before the proxy
/// looks: splice would stop at the urgent mark with the FIN in. Every other byte must arrive,
/// then a clean close.
fn urgent_byte_then_fin(proxy: &Proxy, rx: &mpsc::Receiver<Seen>, seed: u64) {
    let mut c = bulk_start(proxy, rx);
    let tail = Pattern::bytes(seed, 100_000);
    while_stopped(proxy, || {
        send_oob(&c, b'U');
        c.write_all(&tail).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
    });
    expect_bytes(rx, &tail, "data after the urgent byte");
    expect_eof(rx, "after the whole stream");
    expect_clean_close(proxy, &mut c);
}

#[test]
fn urgent_byte_in_spliced_stream_then_fin_forwards_the_rest() {
    let (up, rx) = reporting_upstream();
    let proxy = Proxy::forwarding_to(up.addr);
    urgent_byte_then_fin(&proxy, &rx, 2);
}

#[test]
fn urgent_byte_in_tapped_spliced_stream_then_fin_forwards_the_rest() {
    // A tapped direction splices too (the tap takes a tee of the kernel pipe).
    let (up, rx) = reporting_upstream();
    let dir = TempDir::new("urgent-tap");
    let log = dir.path("tap.log");
    let proxy = Proxy::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up.addr.to_string(),
            "--tap-log",
            log.to_str().unwrap(),
        ],
        1,
    );
    urgent_byte_then_fin(&proxy, &rx, 5);
}

#[test]
fn urgent_byte_in_spliced_stream_does_not_stall_the_rest() {
    let (up, rx) = reporting_upstream();
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = bulk_start(&proxy, &rx);
    send_oob(&c, b'U');
    let tail = Pattern::bytes(3, 100_000);
    c.write_all(&tail).unwrap();
    // No FIN yet: the rest must arrive on its own, and the stream stays open.
    expect_bytes(&rx, &tail, "data after the urgent byte, before any FIN");
    // It keeps flowing: bulk again, then the end.
    let more = Pattern::bytes(4, 1 << 20);
    c.write_all(&more).unwrap();
    expect_bytes(&rx, &more, "bulk after the urgent byte");
    c.shutdown(Shutdown::Write).unwrap();
    expect_eof(&rx, "after the whole stream");
    expect_clean_close(&proxy, &mut c);
}

#[test]
fn urgent_byte_last_before_fin_closes_cleanly() {
    let (up, rx) = reporting_upstream();
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = bulk_start(&proxy, &rx);
    send_oob(&c, b'U');
    c.shutdown(Shutdown::Write).unwrap();
    expect_eof(&rx, "urgent byte then FIN");
    expect_clean_close(&proxy, &mut c);
}

#[test]
fn urgent_byte_between_small_messages_is_skipped() {
    // Small messages are copied. When data, the urgent byte and more data are all queued before
    // the proxy reads, a read stops short at the urgent mark although more is queued.
    let (up, rx) = reporting_upstream();
    let proxy = Proxy::forwarding_to(up.addr);
    let mut c = connect(proxy.addr());
    c.write_all(b"hello").unwrap();
    expect_bytes(&rx, b"hello", "first message");
    while_stopped(&proxy, || {
        c.write_all(b"abc").unwrap();
        send_oob(&c, b'U');
        c.write_all(b"def").unwrap();
    });
    expect_bytes(&rx, b"abcdef", "messages around the urgent byte");
    c.shutdown(Shutdown::Write).unwrap();
    expect_eof(&rx, "after the whole stream");
    expect_clean_close(&proxy, &mut c);
}
