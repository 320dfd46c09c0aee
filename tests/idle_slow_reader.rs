//! `idle_timeout` means no byte moved either way: a connection whose upstream has sent
//! everything and whose client is still reading what the proxy buffered is busy, not idle.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{PROMPT, Pattern, Proxy, Upstream};

const TOTAL: usize = 320 * 1024;
const IDLE: Duration = Duration::from_secs(1);

/// A client with a small receive buffer, so that the proxy holds most of the download.
fn small_window_client(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), PROMPT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn slow_download(splice: bool) {
    // The upstream sends everything at once and shuts its write side; it reads on until EOF.
    let up = Upstream::start(|mut s| {
        s.write_all(&Pattern::bytes(7, TOTAL)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = io::copy(&mut s, &mut io::sink());
    });
    let proxy = Proxy::with_config(
        &format!(
            "idle_timeout = \"1s\"\nbuffer_size = \"256 KiB\"\nsplice = {splice}\n\
             [socket]\nsend_buffer_size = \"4 KiB\"\nrecv_buffer_size = \"4 KiB\"\n\
             [[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            up.addr
        ),
        1,
    );
    let mut c = small_window_client(proxy.addr());
    // About 160 KiB/s: the proxy has read the whole response long before the client has it, and
    // then for well over `IDLE` only writes to the client.
    let start = Instant::now();
    let mut got = Vec::with_capacity(TOTAL);
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "download cut after {} of {TOTAL} bytes, {:?}: {e}; log:\n{}",
                got.len(),
                start.elapsed(),
                proxy.logs()
            ),
        }
        thread::sleep(Duration::from_millis(25));
    }
    let took = start.elapsed();
    assert_eq!(got.len(), TOTAL, "log:\n{}", proxy.logs());
    assert!(got == Pattern::bytes(7, TOTAL), "bytes differ");
    assert!(
        took > IDLE + IDLE / 2,
        "the download took {took:?}: too fast to show anything"
    );
    c.shutdown(Shutdown::Write).unwrap();
    let line = proxy.wait_log("bytes to client", PROMPT);
    assert!(line.contains("upstream closed first"), "{line}");
    assert_eq!(proxy.count_log("idle timeout"), 0, "{}", proxy.logs());
}

#[test]
fn slow_reader_of_buffered_bytes_is_not_idle_copy() {
    slow_download(false);
}

#[test]
fn slow_reader_of_buffered_bytes_is_not_idle_splice() {
    slow_download(true);
}
