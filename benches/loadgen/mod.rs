//! Load generators and upstream servers for the proxy benchmark.
//!
//! Everything here talks to 127.0.0.1 only, binds port 0, and every loop is
//! bounded by a deadline, a count, a socket timeout or a stop flag.
//!
//! Upstreams:
//! - [`BulkUpstream`]: thread per connection. The first byte the client sends
//!   picks the mode: `S` sink (read and count), `G` generate (write until the
//!   peer goes away), `B` both at once.
//! - [`EchoUpstream`]: one mio thread that echoes every byte back; it holds
//!   any number of connections, so it serves ping-pong, churn and the idle
//!   connections of the memory measurement. It closes with RST, so no target
//!   leaves TIME_WAIT sockets for the next one to step around. Started with
//!   `start_http`, the same loop answers HTTP/1.1 requests for wrk instead.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener as MioListener, TcpStream as MioStream};
use mio::{Events, Interest, Poll, Token, Waker};

/// Size of one write / read in the bulk rows.
pub const BULK_CHUNK: usize = 256 * 1024;
/// Size of one request (and of its echoed response) in the request/response rows.
pub const MSG: usize = 64;
/// Timeout on every blocking socket operation, so no thread can hang forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub const MODE_SINK: u8 = b'S';
pub const MODE_GEN: u8 = b'G';
pub const MODE_BOTH: u8 = b'B';

fn localhost0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback port that was free a moment ago: bind port 0, read it, close.
/// Racy by nature; only used for peers that need a port on their command line.
pub fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind(localhost0())?;
    Ok(l.local_addr()?.port())
}

/// Close without a FIN handshake (RST), so the client side leaves no TIME_WAIT.
pub fn close_with_rst(s: TcpStream) {
    let sock = socket2::Socket::from(s);
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
}

// ---------------------------------------------------------------------------
// Bulk upstream

pub struct BulkUpstream {
    pub addr: SocketAddr,
    /// Bytes read by sink/both connections (the receiving end for d→u).
    pub rx_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl BulkUpstream {
    pub fn start() -> io::Result<Self> {
        let listener = TcpListener::bind(localhost0())?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rx_bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (rx2, stop2) = (rx_bytes.clone(), stop.clone());
        let acceptor = std::thread::Builder::new()
            .name("bulk-upstream".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (rx3, stop3) = (rx2.clone(), stop2.clone());
                            let _ = std::thread::Builder::new()
                                .name("bulk-conn".into())
                                .spawn(move || bulk_conn(s, rx3, stop3));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })?;
        Ok(Self {
            addr,
            rx_bytes,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for BulkUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn bulk_conn(s: TcpStream, rx: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut mode = [0u8; 1];
    if (&s).read_exact(&mut mode).is_err() {
        return;
    }
    match mode[0] {
        MODE_SINK => sink_loop(&s, &rx, &stop),
        MODE_GEN => source_loop(&s, &stop),
        MODE_BOTH => {
            let Ok(w) = s.try_clone() else { return };
            let stop2 = stop.clone();
            let writer = std::thread::spawn(move || source_loop(&w, &stop2));
            sink_loop(&s, &rx, &stop);
            let _ = s.shutdown(Shutdown::Both);
            let _ = writer.join();
        }
        _ => {}
    }
}

/// Read and count until EOF, error or stop. Counts into `rx` as it goes.
fn sink_loop(mut s: &TcpStream, rx: &AtomicU64, stop: &AtomicBool) {
    let mut buf = vec![0u8; BULK_CHUNK];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                rx.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Write big chunks until the peer goes away, an error, or stop.
fn source_loop(mut s: &TcpStream, stop: &AtomicBool) {
    let buf = vec![0x5au8; BULK_CHUNK];
    while !stop.load(Ordering::Relaxed) {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// Bulk client

/// Direction of a bulk row, seen from the client ("downstream").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client writes, upstream reads (d→u).
    Up,
    /// Upstream writes, client reads (u→d).
    Down,
    /// Both at once.
    Both,
}

impl Dir {
    pub fn label(self) -> &'static str {
        match self {
            Dir::Up => "d→u",
            Dir::Down => "u→d",
            Dir::Both => "both",
        }
    }
    fn mode(self) -> u8 {
        match self {
            Dir::Up => MODE_SINK,
            Dir::Down => MODE_GEN,
            Dir::Both => MODE_BOTH,
        }
    }
}

/// A running bulk load: `conns` connections streaming in `dir` until dropped.
pub struct BulkLoad {
    /// Bytes read by the client side (the receiving end for u→d).
    pub client_rx: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BulkLoad {
    pub fn start(target: SocketAddr, conns: usize, dir: Dir) -> io::Result<Self> {
        let client_rx = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..conns {
            let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            (&s).write_all(&[dir.mode()])?;
            streams.push(s);
        }
        for s in streams {
            if matches!(dir, Dir::Up | Dir::Both) {
                let w = s.try_clone()?;
                let stop2 = stop.clone();
                threads.push(std::thread::spawn(move || {
                    source_loop(&w, &stop2);
                    let _ = w.shutdown(Shutdown::Write);
                }));
            }
            if matches!(dir, Dir::Down | Dir::Both) {
                let (rx2, stop2) = (client_rx.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    sink_loop(&s, &rx2, &stop2);
                }));
            }
        }
        Ok(Self {
            client_rx,
            stop,
            threads,
        })
    }

    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for BulkLoad {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

// ---------------------------------------------------------------------------
// Echo and HTTP upstreams (mio)

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// A single-threaded upstream that answers what each connection sends: an echo, or an HTTP/1.1
/// server with a fixed response.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

struct EchoConn {
    stream: MioStream,
    pending: Vec<u8>,
    /// HTTP: how many bytes of the `\r\n\r\n` that ends a request head were seen last.
    matched: usize,
}

/// Makes progress on one connection; true when it should be closed.
type Service = fn(&mut EchoConn, &mut [u8]) -> bool;

/// Body size of the HTTP upstream's response.
pub const HTTP_BODY: usize = 1024;

impl EchoUpstream {
    /// Echoes every byte back.
    pub fn start() -> io::Result<Self> {
        Self::start_service("echo-upstream", echo_service)
    }

    /// HTTP/1.1 with keep-alive for wrk: every request head (a GET, no body) gets `200 OK` with
    /// a body of [`HTTP_BODY`] bytes; pipelined requests are answered in order.
    pub fn start_http() -> io::Result<Self> {
        Self::start_service("http-upstream", http_service)
    }

    fn start_service(name: &str, service: Service) -> io::Result<Self> {
        let std_l = TcpListener::bind(localhost0())?;
        std_l.set_nonblocking(true)?;
        let addr = std_l.local_addr()?;
        let mut listener = MioListener::from_std(std_l);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || echo_loop(poll, listener, stop2, service))?;
        Ok(Self {
            addr,
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_loop(mut poll: Poll, listener: MioListener, stop: Arc<AtomicBool>, service: Service) {
    let mut events = Events::with_capacity(1024);
    let mut conns: HashMap<usize, EchoConn> = HashMap::new();
    let mut next = FIRST_CONN;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(200))) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let tok = next;
                            next += 1;
                            if poll
                                .registry()
                                .register(
                                    &mut stream,
                                    Token(tok),
                                    Interest::READABLE | Interest::WRITABLE,
                                )
                                .is_ok()
                            {
                                conns.insert(
                                    tok,
                                    EchoConn {
                                        stream,
                                        pending: Vec::new(),
                                        matched: 0,
                                    },
                                );
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // EMFILE and friends: stop accepting for this event.
                        Err(_) => break,
                    }
                },
                WAKER => {}
                Token(tok) => {
                    let close = match conns.get_mut(&tok) {
                        Some(c) => service(c, &mut buf),
                        None => false,
                    };
                    if close {
                        if let Some(mut c) = conns.remove(&tok) {
                            let _ = poll.registry().deregister(&mut c.stream);
                            // Answer the peer's FIN with RST: a proxy that closed its
                            // upstream side first then leaves no TIME_WAIT behind, which
                            // would slow the connects of the targets measured after it.
                            let _ =
                                socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
                        }
                    }
                }
            }
        }
    }
}

/// Make progress on one echo connection. Returns true when it should be closed.
fn echo_service(c: &mut EchoConn, buf: &mut [u8]) -> bool {
    serve(c, buf, |c, bytes| c.pending.extend_from_slice(bytes))
}

fn http_service(c: &mut EchoConn, buf: &mut [u8]) -> bool {
    serve(c, buf, |c, bytes| {
        for _ in 0..http_requests_ended(&mut c.matched, bytes) {
            c.pending.extend_from_slice(http_response());
        }
    })
}

fn http_response() -> &'static [u8] {
    static RESPONSE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    RESPONSE.get_or_init(|| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {HTTP_BODY}\r\n\r\n"
        )
        .into_bytes();
        r.extend((0..HTTP_BODY).map(|i| b'a' + (i % 26) as u8));
        r
    })
}

/// Counts the request heads that end in `bytes` (at each `\r\n\r\n`); `matched` carries a
/// terminator split across reads.
fn http_requests_ended(matched: &mut usize, bytes: &[u8]) -> usize {
    const END: &[u8; 4] = b"\r\n\r\n";
    let mut ended = 0;
    for &b in bytes {
        *matched = if b == END[*matched] {
            *matched + 1
        } else {
            usize::from(b == b'\r')
        };
        if *matched == END.len() {
            ended += 1;
            *matched = 0;
        }
    }
    ended
}

/// Flushes what is pending, reads, and hands what was read to `answer`, until `WouldBlock`.
fn serve(c: &mut EchoConn, buf: &mut [u8], answer: impl Fn(&mut EchoConn, &[u8])) -> bool {
    loop {
        // Flush what is pending before reading more (backpressure).
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(0) => return true,
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        match c.stream.read(buf) {
            Ok(0) => return true,
            Ok(n) => answer(c, &buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

// ---------------------------------------------------------------------------
// Latency histogram

/// Log-linear histogram of nanosecond values: exact below 64 ns, then 32
/// sub-buckets per power of two (relative error under 3.2 %).
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const LINEAR: u64 = 64;

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; LINEAR as usize + (64 - 6) * SUB],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= 6
        let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
        LINEAR as usize + (e as usize - 6) * SUB + sub
    }

    /// Lower bound of the bucket at `idx`.
    fn value_at(idx: usize) -> u64 {
        if idx < LINEAR as usize {
            return idx as u64;
        }
        let i = idx - LINEAR as usize;
        let e = (i / SUB) as u32 + 6;
        let sub = (i % SUB) as u64;
        (1u64 << e) | (sub << (e - SUB_BITS))
    }

    pub fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// Value at quantile `q` in 0..=1 (bucket lower bound), in nanoseconds.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::value_at(i));
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------
// Ping-pong (closed loop per connection, one mio thread)

pub struct PingPongResult {
    /// Requests completed in the measured window.
    pub requests: u64,
    /// Requests completed in all, warm-up included (for CPU per request).
    pub total_requests: u64,
    pub elapsed: Duration,
    pub hist: Histogram,
}

struct PpConn {
    stream: MioStream,
    sent_at: Instant,
    tx: usize,
    rx: usize,
}

/// `conns` connections, each with one 64-byte request in flight at a time.
/// Latencies are recorded only inside the window [start+warmup, +window).
pub fn ping_pong(
    target: SocketAddr,
    conns: usize,
    warmup: Duration,
    window: Duration,
) -> io::Result<PingPongResult> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut cs = Vec::with_capacity(conns);
    for i in 0..conns {
        let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let mut stream = MioStream::from_std(s);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        cs.push(PpConn {
            stream,
            sent_at: Instant::now(),
            tx: 0,
            rx: 0,
        });
    }
    let req = [0x42u8; MSG];
    let mut buf = [0u8; MSG];
    let start = Instant::now();
    let t0 = start + warmup;
    let t1 = t0 + window;
    let mut hist = Histogram::new();
    let mut requests = 0u64;
    let mut total_requests = 0u64;
    for c in cs.iter_mut() {
        c.sent_at = Instant::now();
        pp_write(c, &req)?;
    }
    loop {
        let now = Instant::now();
        if now >= t1 {
            break;
        }
        match poll.poll(&mut events, Some((t1 - now).min(Duration::from_millis(50)))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let c = &mut cs[ev.token().0];
            // Finish a partial write first.
            pp_write(c, &req)?;
            loop {
                if c.tx < MSG {
                    break;
                }
                match c.stream.read(&mut buf[..MSG - c.rx]) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "ping-pong: connection closed by proxy",
                        ));
                    }
                    Ok(n) => {
                        c.rx += n;
                        if c.rx == MSG {
                            total_requests += 1;
                            let now = Instant::now();
                            if now >= t0 && now < t1 {
                                hist.record(now.duration_since(c.sent_at).as_nanos() as u64);
                                requests += 1;
                            }
                            c.rx = 0;
                            c.tx = 0;
                            c.sent_at = now;
                            pp_write(c, &req)?;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let elapsed = Instant::now().min(t1).saturating_duration_since(t0);
    for c in cs {
        close_with_rst(mio_into_std(c.stream));
    }
    Ok(PingPongResult {
        requests,
        total_requests,
        elapsed,
        hist,
    })
}

fn pp_write(c: &mut PpConn, req: &[u8; MSG]) -> io::Result<()> {
    while c.tx < MSG {
        match c.stream.write(&req[c.tx..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => c.tx += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn mio_into_std(s: MioStream) -> TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the fd comes from a live, owned mio stream and ownership moves.
    unsafe { TcpStream::from_raw_fd(s.into_raw_fd()) }
}

// ---------------------------------------------------------------------------
// Connection churn (one mio thread, `clients` connections in flight)

pub struct ChurnResult {
    /// Connections completed in the measured window.
    pub conns: u64,
    /// Connections completed in all, warm-up included (for CPU per connection).
    pub total_conns: u64,
    /// Connections that failed in the measured window.
    pub errors: u64,
    pub elapsed: Duration,
}

/// One connection of the churn loop and its request / response progress.
struct ChurnConn {
    stream: MioStream,
    token: Token,
    tx: usize,
    rx: usize,
}

/// Give up after this many failed connections: the target is broken, not slow.
const CHURN_MAX_ERRORS: u64 = 1000;

/// A token's low bits name the slot; the rest count connections, so an event
/// that a slot's previous connection left in the batch is told apart.
const SLOT_BITS: u32 = 16;

/// Connect in `slot` and send the request as soon as the socket takes it: on
/// loopback usually right after `connect`, otherwise on the writable event.
fn churn_open(
    poll: &Poll,
    target: SocketAddr,
    slot: usize,
    serial: &mut usize,
) -> io::Result<ChurnConn> {
    let mut stream = MioStream::connect(target)?;
    *serial += 1;
    let token = Token(slot | (*serial << SLOT_BITS));
    poll.registry()
        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
    let mut c = ChurnConn {
        stream,
        token,
        tx: 0,
        rx: 0,
    };
    churn_step(&mut c)?;
    Ok(c)
}

/// Advance one connection: finish the request, then read the response and
/// check that it is the request echoed. `Ok(true)` once the whole response is in.
fn churn_step(c: &mut ChurnConn) -> io::Result<bool> {
    const REQ: [u8; MSG] = [0x43; MSG];
    let mut buf = [0u8; MSG];
    loop {
        let r = if c.tx < MSG {
            c.stream.write(&REQ[c.tx..]).inspect(|&n| c.tx += n)
        } else if c.rx < MSG {
            c.stream.read(&mut buf[..MSG - c.rx]).and_then(|n| {
                if buf[..n] != REQ[..n] {
                    return Err(io::Error::other("churn: the response is not the request"));
                }
                c.rx += n;
                Ok(n)
            })
        } else {
            return Ok(true);
        };
        match r {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            // Not connected yet (EAGAIN in SYN_SENT), or no response yet.
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Close with RST, so the client side leaves no TIME_WAIT. Closing the socket
/// also takes it out of the poll set.
fn churn_close(c: ChurnConn) {
    let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
}

/// Connection churn: `clients` connections in flight, each connect → 64-byte
/// request/response → close with RST and a new one in its place, until the
/// window ends or `max_conns` completed in total. One event-driven thread,
/// like [`ping_pong`]: about eight system calls and no thread switch per
/// connection, so the generator's cost stays small next to a proxy's.
pub fn churn(
    target: SocketAddr,
    clients: usize,
    warmup: Duration,
    window: Duration,
    max_conns: u64,
) -> io::Result<ChurnResult> {
    assert!(clients > 0 && clients < 1 << SLOT_BITS);
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut serial = 0usize;
    let mut errors = 0u64;
    // A new connection for `slot`; a failure counts and is retried, up to the cap.
    let mut open = |poll: &Poll, slot: usize, errors: &mut u64| -> io::Result<ChurnConn> {
        loop {
            match churn_open(poll, target, slot, &mut serial) {
                Ok(c) => return Ok(c),
                Err(e) => churn_failed(e, errors)?,
            }
        }
    };
    let mut slots = Vec::with_capacity(clients);
    for slot in 0..clients {
        slots.push(open(&poll, slot, &mut errors)?);
    }
    let t0 = Instant::now() + warmup;
    let t1 = t0 + window;
    let mut total = 0u64;
    // The counts when the window opened.
    let mut at_t0: Option<(u64, u64)> = None;
    loop {
        let now = Instant::now();
        if at_t0.is_none() && now >= t0 {
            at_t0 = Some((total, errors));
        }
        if now >= t1 || total >= max_conns {
            break;
        }
        let until = if now < t0 { t0 } else { t1 };
        match poll.poll(&mut events, Some(until - now)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let slot = ev.token().0 & ((1 << SLOT_BITS) - 1);
            if slots[slot].token != ev.token() {
                continue; // left in the batch by the slot's previous connection
            }
            match churn_step(&mut slots[slot]) {
                Ok(false) => continue,
                Ok(true) => total += 1,
                Err(e) => churn_failed(e, &mut errors)?,
            }
            let next = open(&poll, slot, &mut errors)?;
            churn_close(std::mem::replace(&mut slots[slot], next));
        }
    }
    let elapsed = Instant::now().min(t1).saturating_duration_since(t0);
    let (c0, e0) = at_t0.unwrap_or((total, errors));
    for c in slots {
        churn_close(c);
    }
    Ok(ChurnResult {
        conns: total - c0,
        total_conns: total,
        errors: errors - e0,
        elapsed,
    })
}

/// Count a failed connection; an error once there were too many.
fn churn_failed(e: io::Error, errors: &mut u64) -> io::Result<()> {
    *errors += 1;
    if *errors > CHURN_MAX_ERRORS {
        return Err(io::Error::new(
            e.kind(),
            format!("churn: {errors} failed connections, the last: {e}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Idle connections

/// Open `n` connections, verify each with one 64-byte round trip, and keep
/// them open. Returns the streams (close them with [`close_all`]).
pub fn open_idle(target: SocketAddr, n: usize) -> io::Result<Vec<TcpStream>> {
    let mut v = Vec::with_capacity(n);
    let req = [0x44u8; MSG];
    let mut buf = [0u8; MSG];
    for i in 0..n {
        let s = TcpStream::connect_timeout(&target, IO_TIMEOUT)
            .map_err(|e| io::Error::new(e.kind(), format!("idle conn {i}: connect: {e}")))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        (&s).write_all(&req)?;
        (&s).read_exact(&mut buf)
            .map_err(|e| io::Error::new(e.kind(), format!("idle conn {i}: echo: {e}")))?;
        if buf != req {
            return Err(io::Error::other(format!("idle conn {i}: echo mismatch")));
        }
        v.push(s);
    }
    Ok(v)
}

pub fn close_all(v: Vec<TcpStream>) {
    for s in v {
        close_with_rst(s);
    }
}

/// Sanity check of the histogram, run by the smoke mode.
pub fn histogram_self_check() {
    let mut h = Histogram::new();
    for v in 1..=10_000u64 {
        h.record(v * 1000);
    }
    let p50 = h.quantile(0.5).unwrap_or(0) as f64;
    let p99 = h.quantile(0.99).unwrap_or(0) as f64;
    assert!(
        (p50 / 5_000_000.0 - 1.0).abs() < 0.04,
        "histogram p50 {p50}"
    );
    assert!(
        (p99 / 9_900_000.0 - 1.0).abs() < 0.04,
        "histogram p99 {p99}"
    );
    assert_eq!(h.count(), 10_000);
}

/// Checks the HTTP upstream's request counting, including a terminator split across reads.
pub fn http_self_check() {
    let mut m = 0;
    assert_eq!(
        http_requests_ended(&mut m, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /"),
        1
    );
    assert_eq!(http_requests_ended(&mut m, b" HTTP/1.1\r\n\r"), 0);
    assert_eq!(http_requests_ended(&mut m, b"\n"), 1);
    assert_eq!(http_requests_ended(&mut m, b"\r\r\n\r\n\r\n\r"), 1);
    assert_eq!(m, 3, "a later request head's end has begun");
    let r = http_response();
    let head = r.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    assert!(r.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(head.map(|h| r.len() - h), Some(HTTP_BODY));
}
