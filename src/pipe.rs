//! One direction of a pair: read from a source, buffer, write to a destination, propagate EOF.
//!
//! The pump is generic over `Read`/`Write` and knows nothing of mio, so the state machine is tested
//! with fake streams that return `WouldBlock`, short writes, `EINTR`, EOF and resets.
//!
//! ```text
//! OPEN         read src into buf, write buf to dst
//! READ-CLOSED  src read returned Ok(0): stop reading, keep writing what is buffered
//! WRITE-SHUT   buf drained after EOF: dst.shutdown(Write) done; this direction is finished
//! ```
//! A read or write error is returned to the pair, which aborts both directions.
//!
//! Invariants: a pipe holds at most one buffer of the pool's size (never grows); it holds it only
//! while bytes are in flight; `shutdown(Write)` is called once, after every buffered byte was written.

use std::fmt;
use std::io::{self, Read, Write};

use crate::buffer::{Buffer, BufferPool};
use crate::splice::{KernelPipe, NoPipe, PipePool, Refusal};
use crate::tap::Direction;

/// Where a pipe is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeState {
    /// Reading and writing.
    Open,
    /// EOF read from the source; flushing the buffer before shutting the destination's write side.
    ReadClosed,
    /// FIN delivered to the destination: this direction is done.
    WriteShut,
}

impl fmt::Display for PipeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PipeState::Open => "OPEN",
            PipeState::ReadClosed => "READ-CLOSED",
            PipeState::WriteShut => "WRITE-SHUT",
        })
    }
}

/// A stream whose write side can be shut (TCP `shutdown(SHUT_WR)`).
pub trait ShutdownWrite {
    /// Sends FIN after the bytes already written.
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl ShutdownWrite for &mio::net::TcpStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// What the kernel last told us about one socket. A flag is set by an event and cleared when an
/// operation returns `WouldBlock` (edge-triggered readiness must be drained), or, for `readable`,
/// by a short read: see [`Pipe::pump`]. Some are known without an event: a socket just accepted
/// or connected at once is `writable` (it is registered for writable events only once a write
/// would block, see `pair::Registered`), and a client whose upstream connected at once is read
/// once as `readable`, before its socket is registered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// A read may make progress.
    pub readable: bool,
    /// A write may make progress.
    pub writable: bool,
    /// An event reported the peer's FIN (`EPOLLRDHUP`) or an error: no new event will come for
    /// what is already queued, so reads go on until EOF or `WouldBlock`, never stop at a short
    /// read.
    pub closing: bool,
    /// An event showed a connecting socket connected: writable or readable with neither
    /// `EPOLLERR` nor `EPOLLHUP`, which is how epoll reports a failed connect. (HAProxy trusts
    /// the same flags; only an event with either flag needs `SO_ERROR` and `getpeername`.)
    pub connected: bool,
    /// TCP urgent data may wait before the next bytes: an event had `EPOLLPRI`, or a splice
    /// returned 0. `splice(2)` stops at the urgent mark (EAGAIN, or 0 once the FIN is in, which
    /// only looks like EOF), so the direction copies instead: a read skips the urgent byte (it is
    /// not forwarded) and goes on with the stream, and its 0 is the real EOF. Cleared once a
    /// copying read finds the socket drained, or by a readable event without `EPOLLPRI` before
    /// the FIN.
    pub urgent: bool,
    /// An event reported an error (`EPOLLERR`, a reset as a rule). Bytes the peer sent before it
    /// stay readable ahead of the error, so a direction that reads this socket passes them on
    /// and meets the error itself; if it stops first (the destination is full, or no direction
    /// reads the socket any more), the pair asks `SO_ERROR` (see `Pair::settle_errors`).
    pub error: bool,
}

/// Why a pump stopped without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpStatus {
    /// Nothing more can happen until the next readiness event.
    Blocked,
    /// The per-call byte budget ran out while the source was still readable: pump again soon.
    Yielded,
}

/// An I/O error that ends the pair.
#[derive(Debug)]
pub enum PumpError {
    /// Reading the source failed.
    Read(io::Error),
    /// Writing (or shutting) the destination failed.
    Write(io::Error),
}

/// What one read did.
enum Got {
    /// `n` bytes arrived.
    Bytes(usize),
    /// End of stream.
    Eof,
    /// Nothing now: would block (readiness already updated) or EINTR (the loop retries).
    Nothing { retry: bool },
}

/// Sorts a read's result. `clear_on_block` says whether a would-block means the source is
/// drained (it does not for a splice into a non-empty pipe, see [`Pipe::pump_splice`]).
fn got(
    r: io::Result<usize>,
    src_ready: &mut Readiness,
    clear_on_block: bool,
) -> Result<Got, PumpError> {
    match r {
        Ok(0) => Ok(Got::Eof),
        Ok(n) => Ok(Got::Bytes(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if clear_on_block {
                src_ready.readable = false;
            }
            Ok(Got::Nothing { retry: false })
        }
        // EINTR: nothing happened, try again.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Got::Nothing { retry: true }),
        Err(e) => Err(PumpError::Read(e)),
    }
}

/// Sorts a write's result: `Some(n)` bytes written (`Some(0)` after EINTR: retry), `None` when
/// the destination is full (readiness cleared). A write of 0 bytes is an error (`WriteZero`).
fn wrote(r: io::Result<usize>, dst_ready: &mut Readiness) -> Result<Option<usize>, PumpError> {
    match r {
        Ok(0) => Err(PumpError::Write(io::Error::new(
            io::ErrorKind::WriteZero,
            "write returned 0",
        ))),
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            dst_ready.writable = false;
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Some(0)),
        Err(e) => Err(PumpError::Write(e)),
    }
}

/// One direction of a pair.
#[derive(Debug)]
pub struct Pipe {
    dir: Direction,
    state: PipeState,
    buf: Option<Buffer>,
    /// The kernel pipe of the zero-copy path, while bytes are in flight.
    kpipe: Option<KernelPipe>,
    /// May move bytes with `splice(2)` ([`pump_splice`](Pipe::pump_splice)) rather than copying
    /// (off by config, or once no kernel pipe could be had).
    pub zero_copy: bool,
    /// Copying because a budget (descriptors, splice memory) had no pipe to spare: splice again
    /// once the copy buffer is empty and the refusal is lifted.
    pipe_refused: Option<Refusal>,
    /// A copying read has filled a whole empty buffer: this direction carries bulk data, and
    /// moves it with `splice(2)` from now on when `zero_copy` allows. Small messages (request /
    /// response) are cheaper to copy: one read and one write, where splice needs a third call to
    /// learn that the socket is drained.
    bulk: bool,
    /// The source's end is not passed on as a FIN (see [`hold_fin`](Pipe::hold_fin)).
    fin_held: bool,
    /// Bytes read from the source (the tap offset of the next read).
    read_total: u64,
    /// Bytes written to the destination (a [`prefix`](Pipe::prefix) included).
    written_total: u64,
    /// Bytes put in front of the stream by [`prefix`](Pipe::prefix): written, never read.
    prefix_len: u64,
}

impl Pipe {
    /// A new open pipe holding no buffer.
    pub fn new(dir: Direction) -> Pipe {
        Pipe {
            dir,
            state: PipeState::Open,
            buf: None,
            kpipe: None,
            zero_copy: false,
            pipe_refused: None,
            bulk: false,
            fin_held: false,
            read_total: 0,
            written_total: 0,
            prefix_len: 0,
        }
    }

    /// From now on, an end of the source is not passed on: the buffered bytes still are, but no
    /// `shutdown(Write)` follows them (the pipe stays READ-CLOSED). For a pair about to be reset
    /// because the source's peer reset: a write in the other direction that met the reset took
    /// the socket's error with it, so the source then reads as ended, and passing that on as a
    /// FIN would make a stream cut short look complete.
    pub fn hold_fin(&mut self) {
        self.fin_held = true;
    }

    /// Current state.
    pub fn state(&self) -> PipeState {
        self.state
    }

    /// Bytes read from the source so far.
    pub fn read_total(&self) -> u64 {
        self.read_total
    }

    /// Bytes written to the destination so far (a [`prefix`](Pipe::prefix) included).
    pub fn written_total(&self) -> u64 {
        self.written_total
    }

    /// Of the bytes read from the source, how many the destination has, given `unacked`: how many
    /// of the bytes written the destination's TCP has not acknowledged (they are lost if the
    /// socket is reset). A [`prefix`](Pipe::prefix) is not counted: it came from the proxy.
    pub fn delivered(&self, unacked: u64) -> u64 {
        self.written_total
            .saturating_sub(unacked)
            .saturating_sub(self.prefix_len)
    }

    /// Whether this direction has carried bulk data (a read filled a whole buffer).
    pub fn is_bulk(&self) -> bool {
        self.bulk
    }

    /// Bytes waiting in this pipe's kernel pipe (zero-copy path).
    pub fn in_kernel(&self) -> usize {
        self.kpipe.as_ref().map_or(0, |k| k.len)
    }

    /// Bytes buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.as_ref().map_or(0, Buffer::available_data)
            + self.kpipe.as_ref().map_or(0, |k| k.len)
    }

    /// True while the pipe wants to read more (used to decide whether a reset must be checked).
    pub fn is_open(&self) -> bool {
        self.state == PipeState::Open
    }

    fn set_state(&mut self, state: PipeState) {
        log::trace!("{} {}=>{}", self.dir, self.state, state);
        self.state = state;
    }

    /// Returns the buffer to the pool if it holds nothing.
    fn release_if_empty(&mut self, pool: &mut BufferPool) {
        if self.buf.as_ref().is_some_and(Buffer::is_empty) {
            pool.give(self.buf.take().expect("checked above"));
        }
    }

    /// Drops buffered bytes and returns the buffer (pair abort). Returns how many bytes were lost.
    pub fn discard(&mut self, pool: &mut BufferPool) -> usize {
        // A kernel pipe with bytes in it is closed (dropped), never reused.
        let in_kernel = self.kpipe.take().map_or(0, |k| k.len);
        in_kernel
            + match self.buf.take() {
                Some(mut b) => {
                    let n = b.clear();
                    pool.give(b);
                    n
                }
                None => 0,
            }
    }

    /// The zero-copy pump: like [`pump`](Pipe::pump), with `splice(2)` through a kernel pipe
    /// instead of a user-space buffer. Same states and error rules; a splice's 0 is not taken as
    /// EOF but handed to [`pump`](Pipe::pump) to confirm (see [`Readiness::urgent`]).
    ///
    /// With `tee`, the kernel pipe is filled only when empty, and `tee(pipe read end, offset, n)`
    /// is called right after each fill of `n` bytes at stream `offset`: the pipe then holds
    /// exactly those bytes, for the tap to duplicate with `tee(2)`. Each fill moves at most
    /// `fill_max` bytes (what a tee can take at once).
    ///
    /// Readiness: a splice into an *empty* pipe that would block means the socket is drained. A
    /// non-empty pipe can be full with fewer bytes than its capacity (each slot holds one page
    /// fragment), so a would-block then only means "drain first", and readiness is kept.
    #[allow(clippy::too_many_arguments)]
    pub fn pump_splice(
        &mut self,
        src: &mio::net::TcpStream,
        src_ready: &mut Readiness,
        dst: &mio::net::TcpStream,
        dst_ready: &mut Readiness,
        pool: &mut BufferPool,
        pipes: &mut PipePool,
        budget: usize,
        fill_max: usize,
        mut tee: Option<&mut dyn FnMut(std::os::fd::RawFd, u64, usize)>,
    ) -> Result<PumpStatus, PumpError> {
        use std::os::fd::AsRawFd;
        let mut read_now = 0usize;
        let status = loop {
            if self.state == PipeState::WriteShut {
                break PumpStatus::Blocked;
            }
            let mut progress = false;
            // Bytes the proxy queued ahead of the stream (a PROXY header) go first.
            let prefix_pending = self.buf.as_ref().is_some_and(|b| !b.is_empty());
            if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                if dst_ready.writable {
                    if let Some(n) = wrote((&mut &*dst).write(buf.data()), dst_ready)? {
                        buf.consume(n);
                        self.written_total += n as u64;
                        progress = true;
                    }
                }
                if buf.is_empty() {
                    pool.give(self.buf.take().expect("checked above"));
                }
            }
            if let Some(kp) = self.kpipe.as_mut().filter(|k| k.len > 0 && !prefix_pending) {
                if dst_ready.writable {
                    if let Some(n) = wrote(kp.drain_to(dst.as_raw_fd()), dst_ready)? {
                        self.written_total += n as u64;
                        progress = true;
                    }
                }
            }
            if self.state == PipeState::ReadClosed && self.buffered() == 0 {
                if self.fin_held {
                    break PumpStatus::Blocked;
                }
                let mut d = dst;
                d.shutdown_write().map_err(PumpError::Write)?;
                self.set_state(PipeState::WriteShut);
                break PumpStatus::Blocked;
            }
            if self.state == PipeState::Open && src_ready.readable {
                if read_now >= budget || src_ready.urgent {
                    // Budget 0 (only drain), or urgent data (copy it): once drained, yield so
                    // the caller can switch pumps. While bytes wait in the kernel pipe, drain
                    // on until the destination would block, and only then wait for its event:
                    // a splice that took part of the pipe brings no new event.
                    if (budget == 0 || src_ready.urgent) && self.in_kernel() > 0 {
                        if progress && dst_ready.writable {
                            continue;
                        }
                        break PumpStatus::Blocked;
                    }
                    break PumpStatus::Yielded;
                }
                if self.kpipe.is_none() {
                    match pipes.take() {
                        Ok(k) => self.kpipe = Some(k),
                        Err(e) => {
                            // No pipe: this direction copies, until the budget has room again
                            // if that was the reason, else from now on.
                            log::debug!("{}: no kernel pipe ({e}); copying instead", self.dir);
                            self.zero_copy = false;
                            self.pipe_refused = match e {
                                NoPipe::Refused(r) => Some(r),
                                NoPipe::Os(_) => None,
                            };
                            break PumpStatus::Yielded;
                        }
                    }
                }
                let kp = self.kpipe.as_mut().expect("set above");
                // A tee duplicates from the head of the pipe: fill only an empty pipe, so that
                // its whole contents are the bytes just read.
                let room = if tee.is_some() {
                    kp.len == 0
                } else {
                    kp.len < kp.capacity
                };
                if room {
                    let was_empty = kp.len == 0;
                    match got(
                        kp.fill_from(src.as_raw_fd(), fill_max),
                        src_ready,
                        was_empty,
                    )? {
                        Got::Eof => {
                            // An EOF, or the urgent mark with the FIN behind it: a copying read
                            // tells them apart (see `Readiness::urgent`).
                            src_ready.urgent = true;
                            progress = true;
                        }
                        Got::Bytes(n) => {
                            if let Some(tee) = tee.as_mut() {
                                tee(kp.read_fd(), self.read_total, n);
                            }
                            self.read_total += n as u64;
                            read_now += n;
                            progress = true;
                        }
                        Got::Nothing { retry } => progress |= retry,
                    }
                }
            }
            if !progress {
                break PumpStatus::Blocked;
            }
        };
        if self.kpipe.as_ref().is_some_and(|k| k.len == 0) {
            pipes.give(self.kpipe.take().expect("checked above"));
        }
        Ok(status)
    }

    /// Queues bytes the proxy itself sends ahead of the stream (a PROXY protocol header): written
    /// first, not counted as read from the source, not tapped. `bytes` must fit in an empty buffer.
    pub fn prefix(&mut self, pool: &mut BufferPool, bytes: &[u8]) {
        let buf = self.buf.get_or_insert_with(|| pool.take());
        debug_assert!(buf.is_empty() && bytes.len() <= buf.capacity());
        let n = bytes.len().min(buf.space().len());
        buf.space()[..n].copy_from_slice(&bytes[..n]);
        buf.fill(n);
        self.prefix_len += n as u64;
    }

    /// Moves bytes from `src` to `dst` until both would block, EOF is propagated, or `budget` bytes
    /// were read. `on_read(offset, bytes)` sees every chunk read, in order (the tap).
    #[allow(clippy::too_many_arguments)]
    pub fn pump<R, W>(
        &mut self,
        src: &mut R,
        src_ready: &mut Readiness,
        dst: &mut W,
        dst_ready: &mut Readiness,
        pool: &mut BufferPool,
        budget: usize,
        on_read: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<PumpStatus, PumpError>
    where
        R: Read,
        W: Write + ShutdownWrite,
    {
        let mut read_now = 0usize;
        let status = loop {
            if self.state == PipeState::WriteShut {
                break PumpStatus::Blocked;
            }
            let mut progress = false;

            // Write first: frees room so the read below can take a full chunk.
            if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                if dst_ready.writable {
                    if let Some(n) = wrote(dst.write(buf.data()), dst_ready)? {
                        buf.consume(n);
                        self.written_total += n as u64;
                        progress = true;
                    }
                }
            }

            if self.state == PipeState::Open
                && self.buf.as_ref().is_none_or(Buffer::is_empty)
                && self.pipe_refused.as_ref().is_some_and(Refusal::lifted)
            {
                // Copying only because a budget had no pipe to spare, and nothing is buffered:
                // the next bytes may be spliced, in order. The caller pumps again.
                self.pipe_refused = None;
                self.zero_copy = true;
                break PumpStatus::Yielded;
            }

            if self.state == PipeState::ReadClosed && self.buffered() == 0 {
                if self.fin_held {
                    break PumpStatus::Blocked;
                }
                // Every byte before the EOF is written: now pass the EOF on.
                dst.shutdown_write().map_err(PumpError::Write)?;
                self.set_state(PipeState::WriteShut);
                break PumpStatus::Blocked;
            }

            if self.state == PipeState::Open && src_ready.readable {
                if read_now >= budget {
                    break PumpStatus::Yielded;
                }
                let buf = self.buf.get_or_insert_with(|| pool.take());
                let whole = buf.is_empty();
                let space = buf.space();
                if !space.is_empty() {
                    let room = space.len();
                    match got(src.read(space), src_ready, true)? {
                        Got::Eof => {
                            self.set_state(PipeState::ReadClosed);
                            progress = true;
                        }
                        Got::Bytes(n) => {
                            debug_assert!(n <= room, "read more than the space offered");
                            if n < room && !src_ready.closing && !src_ready.urgent && !self.bulk {
                                // A short read took everything the socket held. Linux signals
                                // every later arrival with a new edge, so the read that would
                                // only say `WouldBlock` is skipped (as nginx does). Not after a
                                // FIN or error was reported: their edge is already consumed.
                                // Not for bulk data either: there the next read usually finds
                                // more bytes that arrived meanwhile, which saves a wake-up. Nor
                                // at urgent data, where a read stops short at the urgent mark.
                                src_ready.readable = false;
                            } else if n == room && whole {
                                self.bulk = true;
                            }
                            buf.fill(n);
                            let data = buf.data();
                            on_read(self.read_total, &data[data.len() - n..]);
                            self.read_total += n as u64;
                            read_now += n;
                            progress = true;
                        }
                        Got::Nothing { retry } => {
                            if !src_ready.readable {
                                // Drained: a read skips the urgent byte, so none is left.
                                src_ready.urgent = false;
                            }
                            progress |= retry;
                        }
                    }
                }
            }

            if !progress {
                break PumpStatus::Blocked;
            }
        };
        self.release_if_empty(pool);
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A scripted source: each read pops the next step.
    #[derive(Default)]
    struct FakeSrc {
        steps: VecDeque<io::Result<Vec<u8>>>,
    }

    impl FakeSrc {
        fn new(steps: Vec<io::Result<Vec<u8>>>) -> FakeSrc {
            FakeSrc {
                steps: steps.into(),
            }
        }
    }

    impl Read for FakeSrc {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            match self.steps.pop_front() {
                None => Err(io::ErrorKind::WouldBlock.into()),
                Some(Err(e)) => Err(e),
                Some(Ok(mut bytes)) => {
                    let n = bytes.len().min(out.len());
                    out[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.steps.push_front(Ok(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    /// A destination that accepts at most `limit` bytes per write and `room` bytes before blocking.
    struct FakeDst {
        got: Vec<u8>,
        limit: usize,
        room: usize,
        fail: Option<io::ErrorKind>,
        interrupts: usize,
        shut: usize,
    }

    impl FakeDst {
        fn new(limit: usize, room: usize) -> FakeDst {
            FakeDst {
                got: Vec::new(),
                limit,
                room,
                fail: None,
                interrupts: 0,
                shut: 0,
            }
        }
    }

    impl Write for FakeDst {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            assert_eq!(self.shut, 0, "write after shutdown");
            if self.interrupts > 0 {
                self.interrupts -= 1;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if let Some(k) = self.fail {
                return Err(k.into());
            }
            let n = data.len().min(self.limit).min(self.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.room -= n;
            self.got.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ShutdownWrite for FakeDst {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut += 1;
            Ok(())
        }
    }

    fn ready() -> Readiness {
        Readiness {
            readable: true,
            writable: true,
            closing: false,
            connected: true,
            urgent: false,
            error: false,
        }
    }

    struct Rig {
        pipe: Pipe,
        pool: BufferPool,
        src_ready: Readiness,
        dst_ready: Readiness,
        tapped: Vec<(u64, Vec<u8>)>,
    }

    fn rig(buf: usize) -> Rig {
        Rig {
            pipe: Pipe::new(Direction::DownToUp),
            pool: BufferPool::new(buf, 4),
            src_ready: ready(),
            dst_ready: ready(),
            tapped: Vec::new(),
        }
    }

    impl Rig {
        fn pump(
            &mut self,
            src: &mut FakeSrc,
            dst: &mut FakeDst,
            budget: usize,
        ) -> Result<PumpStatus, PumpError> {
            let tapped = &mut self.tapped;
            self.pipe.pump(
                src,
                &mut self.src_ready,
                dst,
                &mut self.dst_ready,
                &mut self.pool,
                budget,
                &mut |off, b| tapped.push((off, b.to_vec())),
            )
        }
    }

    #[test]
    fn test_open_copies_and_taps_with_offsets() {
        let mut r = rig(8);
        let mut src = FakeSrc::new(vec![Ok(b"hello ".to_vec()), Ok(b"world".to_vec())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        assert_eq!(
            r.pump(&mut src, &mut dst, 1 << 20).unwrap(),
            PumpStatus::Blocked
        );
        assert_eq!(dst.got, b"hello ");
        assert!(!r.src_ready.readable, "a short read clears readiness");
        assert_eq!(src.steps.len(), 1, "no read after a short one");
        // "world" arrives: a new edge.
        r.src_ready.readable = true;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"hello world");
        assert!(!r.src_ready.readable);
        let offsets: Vec<u64> = r.tapped.iter().map(|t| t.0).collect();
        assert_eq!(offsets, vec![0, 6]); // the buffer was drained after each read
        let joined: Vec<u8> = r.tapped.iter().flat_map(|t| t.1.clone()).collect();
        assert_eq!(joined, b"hello world");
        assert_eq!(r.pool.lent(), 0, "idle pipe holds no buffer");
        assert_eq!(r.pipe.state(), PipeState::Open);
    }

    #[test]
    fn test_open_full_buffer_stops_reading() {
        let mut r = rig(4);
        let mut src = FakeSrc::new(vec![Ok(b"0123456789".to_vec())]);
        let mut dst = FakeDst::new(usize::MAX, 0); // blocked destination
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(r.pipe.buffered(), 4, "stops at the buffer bound");
        assert!(
            r.src_ready.readable,
            "source still readable: read again once drained"
        );
        assert!(!r.dst_ready.writable);
        assert_eq!(r.pool.lent(), 1);
        // The destination drains: the rest flows.
        dst.room = usize::MAX;
        r.dst_ready.writable = true;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"0123456789");
        assert_eq!(r.pool.lent(), 0);
    }

    #[test]
    fn test_short_read_after_fin_or_error_reads_on() {
        // Once an event reported the FIN (or an error), a short read must not stop reading: no
        // new event would come for the EOF already queued.
        let mut r = rig(8);
        r.src_ready.closing = true;
        let mut src = FakeSrc::new(vec![Ok(b"abc".to_vec()), Ok(Vec::new())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"abc");
        assert_eq!(
            dst.shut, 1,
            "the EOF behind the short read is seen and passed on"
        );
        assert_eq!(r.pipe.state(), PipeState::WriteShut);
    }

    #[test]
    fn test_full_reads_keep_reading_and_mark_bulk() {
        let mut r = rig(4);
        let mut src = FakeSrc::new(vec![Ok(b"0123".to_vec()), Ok(b"45".to_vec())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        assert!(!r.pipe.is_bulk());
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(
            dst.got, b"012345",
            "a read that filled the buffer is followed by another"
        );
        assert!(r.pipe.is_bulk(), "a whole buffer in one read is bulk data");
        assert!(!r.src_ready.readable);
    }

    #[test]
    fn test_open_partial_writes_and_eintr() {
        let mut r = rig(16);
        // Scripted arrivals in one wake-up: as after an error event, read until it blocks.
        r.src_ready.closing = true;
        let mut src = FakeSrc::new(vec![
            Ok(b"abcdefgh".to_vec()),
            Err(io::ErrorKind::Interrupted.into()),
            Ok(b"ijkl".to_vec()),
        ]);
        let mut dst = FakeDst::new(3, usize::MAX);
        dst.interrupts = 2;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"abcdefghijkl");
        assert_eq!(r.pipe.written_total(), 12);
    }

    #[test]
    fn test_read_closed_flushes_then_shuts_once() {
        let mut r = rig(4);
        let mut src = FakeSrc::new(vec![Ok(b"abcdef".to_vec()), Ok(Vec::new())]);
        let mut dst = FakeDst::new(usize::MAX, 2);
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.shut, 0, "no FIN while bytes are buffered");
        dst.room = 1;
        r.dst_ready.writable = true;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.shut, 0);
        dst.room = usize::MAX;
        r.dst_ready.writable = true;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"abcdef");
        assert_eq!(dst.shut, 1);
        assert_eq!(r.pipe.state(), PipeState::WriteShut);
        // Further pumps (spurious events) do nothing.
        r.src_ready.readable = true;
        r.dst_ready.writable = true;
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.shut, 1);
        assert_eq!(r.pool.lent(), 0);
    }

    #[test]
    fn test_a_held_fin_passes_the_bytes_but_not_the_end() {
        let mut r = rig(4);
        r.pipe.hold_fin();
        let mut src = FakeSrc::new(vec![Ok(b"reply".to_vec()), Ok(Vec::new())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"reply");
        assert_eq!(dst.shut, 0, "no FIN");
        assert_eq!(r.pipe.state(), PipeState::ReadClosed);
    }

    #[test]
    fn test_open_eof_without_data_shuts_at_once() {
        let mut r = rig(4);
        let mut src = FakeSrc::new(vec![Ok(Vec::new())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        r.dst_ready.writable = false; // FIN does not need writability
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.shut, 1);
        assert_eq!(r.pipe.state(), PipeState::WriteShut);
    }

    #[test]
    fn test_open_budget_yields() {
        let mut r = rig(4);
        let mut src = FakeSrc::new(vec![Ok(vec![7u8; 100])]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        assert_eq!(r.pump(&mut src, &mut dst, 10).unwrap(), PumpStatus::Yielded);
        assert!(dst.got.len() >= 10 && dst.got.len() < 100);
        while r.pump(&mut src, &mut dst, 10).unwrap() == PumpStatus::Yielded {}
        assert_eq!(dst.got.len(), 100);
    }

    #[test]
    fn test_open_read_reset_is_error() {
        let mut r = rig(4);
        // A reset after data comes with an error event.
        r.src_ready.closing = true;
        let mut src = FakeSrc::new(vec![
            Ok(b"ab".to_vec()),
            Err(io::ErrorKind::ConnectionReset.into()),
        ]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        match r.pump(&mut src, &mut dst, 1 << 20) {
            Err(PumpError::Read(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected read error, got {other:?}"),
        }
        assert_eq!(dst.got, b"ab");
        assert_eq!(r.pipe.discard(&mut r.pool), 0);
    }

    #[test]
    fn test_delivered_leaves_out_the_prefix_and_unacked_bytes() {
        let mut r = rig(16);
        r.pipe.prefix(&mut r.pool, b"PROXY ");
        let mut src = FakeSrc::new(vec![Ok(b"abcdefgh".to_vec())]);
        // Room for the prefix and 5 bytes: 3 stay buffered.
        let mut dst = FakeDst::new(usize::MAX, 11);
        r.pump(&mut src, &mut dst, 1 << 20).unwrap();
        assert_eq!(dst.got, b"PROXY abcde");
        assert_eq!((r.pipe.read_total(), r.pipe.written_total()), (8, 11));
        assert_eq!(r.pipe.buffered(), 3);
        assert_eq!(
            r.pipe.delivered(0),
            5,
            "the proxy's own header is no source byte"
        );
        assert_eq!(r.pipe.delivered(2), 3);
        assert_eq!(r.pipe.delivered(9), 0, "part of the header unacknowledged");
        assert_eq!(r.pipe.delivered(100), 0);
    }

    #[test]
    fn test_open_write_epipe_is_error_and_discard_counts() {
        let mut r = rig(8);
        let mut src = FakeSrc::new(vec![Ok(b"abc".to_vec())]);
        let mut dst = FakeDst::new(usize::MAX, usize::MAX);
        dst.fail = Some(io::ErrorKind::BrokenPipe);
        assert!(matches!(
            r.pump(&mut src, &mut dst, 1 << 20),
            Err(PumpError::Write(_))
        ));
        assert_eq!(r.pipe.discard(&mut r.pool), 3);
        assert_eq!(r.pool.lent(), 0);
    }

    #[test]
    fn test_open_write_zero_is_error() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl ShutdownWrite for Zero {
            fn shutdown_write(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut pipe = Pipe::new(Direction::UpToDown);
        let mut pool = BufferPool::new(8, 1);
        let mut src = FakeSrc::new(vec![Ok(b"x".to_vec())]);
        let (mut a, mut b) = (ready(), ready());
        let res = pipe.pump(
            &mut src,
            &mut a,
            &mut Zero,
            &mut b,
            &mut pool,
            100,
            &mut |_, _| {},
        );
        assert!(matches!(res, Err(PumpError::Write(e)) if e.kind() == io::ErrorKind::WriteZero));
    }

    /// Two connected loopback sockets `(client, server)`.
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (a, l.accept().unwrap().0)
    }

    /// `s` as the event loop holds it.
    fn nonblocking(s: std::net::TcpStream) -> mio::net::TcpStream {
        s.set_nonblocking(true).unwrap();
        mio::net::TcpStream::from_std(s)
    }

    /// One copying pump of `pipe` between real sockets, without a tap.
    fn copy_pump(
        pipe: &mut Pipe,
        (src, src_ready): (&mio::net::TcpStream, &mut Readiness),
        (dst, dst_ready): (&mio::net::TcpStream, &mut Readiness),
        pool: &mut BufferPool,
    ) -> PumpStatus {
        pipe.pump(
            &mut { src },
            src_ready,
            &mut { dst },
            dst_ready,
            pool,
            1 << 20,
            &mut |_, _| {},
        )
        .unwrap()
    }

    /// Once the source's EOF is in, the kernel pipe is only drained; a splice that takes part of
    /// it brings no new event, so the pump drains on until the destination would block.
    #[test]
    fn test_drain_after_source_eof_goes_on_until_the_destination_blocks() {
        const LEN: usize = 512 * 1024;
        let ((mut sender, src), (dst, mut reader)) = (tcp_pair(), tcp_pair());
        socket2::SockRef::from(&dst)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&reader)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let data: Vec<u8> = (0..LEN)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        reader
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                sender.write_all(&data).unwrap();
                sender.shutdown(std::net::Shutdown::Write).unwrap();
            })
        };
        let (src, dst) = (nonblocking(src), nonblocking(dst));
        let mut pipe = Pipe::new(Direction::UpToDown);
        pipe.zero_copy = true;
        let mut pool = BufferPool::new(64 * 1024, 2);
        let mut pipes = PipePool::new(1 << 20, 2, crate::splice::unlimited());
        let (mut src_ready, mut dst_ready) = (ready(), ready());
        let mut pump =
            |pipe: &mut Pipe, src_ready: &mut Readiness, dst_ready: &mut Readiness, budget| {
                pipe.pump_splice(
                    &src,
                    src_ready,
                    &dst,
                    dst_ready,
                    &mut pool,
                    &mut pipes,
                    budget,
                    usize::MAX,
                    None,
                )
                .unwrap()
            };
        // Read everything, up to the EOF (a splice's 0: copy next), while `reader` reads nothing.
        while !src_ready.urgent {
            src_ready.readable = true;
            pump(&mut pipe, &mut src_ready, &mut dst_ready, 1 << 20);
        }
        writer.join().unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        while got.len() < LEN {
            assert!(
                !dst_ready.writable,
                "the pump stopped with the destination writable"
            );
            // The reader takes some: the destination's writable edge.
            let n = reader.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
            dst_ready.writable = true;
            let status = pump(&mut pipe, &mut src_ready, &mut dst_ready, 0);
            if pipe.in_kernel() == 0 {
                assert_eq!(status, PumpStatus::Yielded, "copy next, to see the EOF");
                break;
            }
            assert_eq!(status, PumpStatus::Blocked);
        }
        assert_eq!(pipe.written_total(), LEN as u64);
        // The copying read confirms the EOF and passes it on.
        copy_pump(
            &mut pipe,
            (&src, &mut src_ready),
            (&dst, &mut dst_ready),
            &mut pool,
        );
        assert_eq!(pipe.state(), PipeState::WriteShut);
        reader.set_nonblocking(false).unwrap();
        reader.read_to_end(&mut got).unwrap();
        assert!(got == data, "bytes differ");
    }

    #[test]
    fn test_splice_stopped_at_urgent_mark_with_fin_is_not_eof() {
        use std::os::fd::AsRawFd;
        let ((mut client, src), (dst, mut server)) = (tcp_pair(), tcp_pair());
        client.write_all(b"head").unwrap();
        // SAFETY: send(2) of one byte from a live local on a socket we own.
        let urgent = b'U';
        let n = unsafe {
            libc::send(
                client.as_raw_fd(),
                (&raw const urgent).cast(),
                1,
                libc::MSG_OOB,
            )
        };
        assert_eq!(n, 1);
        client.write_all(b"tail").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // The FIN comes after every byte: once it is in, so is the rest.
        let mut pfd = libc::pollfd {
            fd: src.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "FIN in");
        let (src, dst) = (nonblocking(src), nonblocking(dst));
        let mut pipe = Pipe::new(Direction::DownToUp);
        pipe.zero_copy = true;
        let mut pool = BufferPool::new(64 * 1024, 2);
        let mut pipes = PipePool::new(64 * 1024, 2, crate::splice::unlimited());
        // As after an event that came before the urgent byte: no EPOLLPRI seen.
        let (mut src_ready, mut dst_ready) = (ready(), ready());
        src_ready.closing = true;
        let status = pipe
            .pump_splice(
                &src,
                &mut src_ready,
                &dst,
                &mut dst_ready,
                &mut pool,
                &mut pipes,
                1 << 20,
                usize::MAX,
                None,
            )
            .unwrap();
        // splice(2) moved the bytes up to the urgent mark, then returned 0 there.
        assert_eq!(pipe.written_total(), 4);
        assert_eq!(status, PumpStatus::Yielded, "copy next");
        assert_eq!(
            pipe.state(),
            PipeState::Open,
            "a 0 at the urgent mark is no EOF"
        );
        assert!(src_ready.urgent && src_ready.readable);
        // The copying read skips the urgent byte, forwards the rest, then sees the real EOF.
        copy_pump(
            &mut pipe,
            (&src, &mut src_ready),
            (&dst, &mut dst_ready),
            &mut pool,
        );
        assert_eq!(pipe.state(), PipeState::WriteShut);
        assert_eq!(pipe.read_total(), 8);
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"headtail");
    }
}
