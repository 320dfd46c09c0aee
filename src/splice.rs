//! Zero-copy forwarding: socket → kernel pipe → socket with `splice(2)`; the bytes never enter
//! user space. Used for bulk data; a tapped direction hands the tap a `tee(2)` of its pipe.
//!
//! Invariants:
//! - A [`KernelPipe`] is both ends of a non-blocking `pipe2(2)`; `len` counts the bytes inside.
//! - Its capacity is set once (`F_SETPIPE_SZ`) and bounds what a direction holds, like a
//!   [`Buffer`](crate::buffer::Buffer) does on the copying path.
//! - A pipe holds a kernel pipe only while bytes are in flight; idle pipes go back to the
//!   [`PipePool`] (at most `max_free` kept), and a pipe with bytes left in it is closed, never reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::fd_budget::PipeSlot;

/// Kernel memory that the pipes of spliced directions may hold together (`splice_memory_limit`),
/// over every worker. A pipe counts while a direction holds it (see [`PipePool`]): a direction
/// stalled on a slow reader keeps its pipe full, and run as root (`CAP_SYS_RESOURCE`) no
/// per-user pipe limit of the kernel bounds the sum. A direction that finds the limit reached
/// copies through its user-space buffer instead, and splices again once there is room.
#[derive(Debug)]
pub struct SpliceMemory {
    limit: AtomicUsize,
    held: AtomicUsize,
    refused: AtomicU64,
}

impl SpliceMemory {
    /// A budget of `limit` bytes, none held.
    pub fn new(limit: usize) -> SpliceMemory {
        SpliceMemory {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Changes the limit (a reload). Pipes held beyond a lowered limit stay until given back.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes the pipes held by directions count now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Times a direction copied because a pipe would have passed the limit.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether a pipe of `bytes` fits now.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.held().saturating_add(bytes) <= self.limit()
    }

    /// Counts `bytes` as held, if they fit.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        let limit = self.limit();
        let fits = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(bytes).filter(|&m| m <= limit)
            })
            .is_ok();
        if !fits {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(Held {
            memory: Arc::clone(self),
            bytes,
        })
    }
}

/// What a pipe asked of `size` bytes counts in a [`SpliceMemory`]: the size the kernel makes of
/// it (a power of two pages). A pipe the kernel granted smaller, past the user's limit, counts
/// at that size all the same.
pub fn pipe_cost(size: usize) -> usize {
    size.next_power_of_two()
}

/// A pipe's capacity counted in a [`SpliceMemory`], released on drop.
#[derive(Debug)]
struct Held {
    memory: Arc<SpliceMemory>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.memory.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Both ends of a kernel pipe and the number of bytes in it.
#[derive(Debug)]
pub struct KernelPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    pub len: usize,
    /// Capacity in bytes.
    pub capacity: usize,
    /// Its place in the descriptor budget while a direction holds it (see [`PipePool`]).
    slot: Option<PipeSlot>,
    /// Its capacity counted in the splice memory budget while a direction holds it.
    held: Option<Held>,
}

impl KernelPipe {
    /// A new empty pipe of (at least) `size` bytes.
    pub fn new(size: usize) -> io::Result<KernelPipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Refused sizes (above pipe-max-size without CAP_SYS_RESOURCE, or more than the user's
        // pipe-user-pages-soft has left) are asked again at half, down to the kernel's default.
        let mut ask = size;
        let got = loop {
            // SAFETY: fcntl on a descriptor we own.
            let got =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, ask as libc::c_int) };
            if got > 0 || ask <= 64 * 1024 {
                break got;
            }
            ask /= 2;
        };
        // Still refused: keep what the pipe has (past pipe-user-pages-soft, the kernel makes new
        // pipes of two pages).
        let got = if got > 0 {
            got
        } else {
            // SAFETY: as above.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
        };
        let capacity = if got > 0 { got as usize } else { 4096 };
        Ok(KernelPipe {
            read,
            write,
            len: 0,
            capacity,
            slot: None,
            held: None,
        })
    }

    /// A pipe holding `data` (at least 64 KiB of capacity), written into it directly.
    #[cfg(test)]
    pub(crate) fn holding(data: &[u8]) -> KernelPipe {
        let mut p = KernelPipe::new(data.len().max(64 * 1024)).expect("pipe");
        assert!(p.capacity >= data.len(), "pipe of {} bytes", p.capacity);
        // SAFETY: writes from a live buffer into the pipe's own write end.
        let n = unsafe { libc::write(p.write.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize, "one write fills the pipe");
        p.len = data.len();
        p
    }

    /// The read end: what [`TeePipe::tee_from`] duplicates from.
    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Moves up to `max` bytes, and at most the pipe's free room, from socket `src` into the
    /// pipe. `Ok(0)` is EOF, or TCP urgent data next with the FIN behind it: the kernel's
    /// splice stops at the urgent mark (EAGAIN before the FIN), where a `recv(2)` skips the
    /// urgent byte and reads on.
    pub fn fill_from(&mut self, src: RawFd, max: usize) -> io::Result<usize> {
        let room = (self.capacity - self.len).min(max);
        let n = splice(src, self.write.as_raw_fd(), room)?;
        self.len += n;
        Ok(n)
    }

    /// Moves bytes from the pipe to socket `dst`.
    pub fn drain_to(&mut self, dst: RawFd) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), dst, self.len)?;
        self.len -= n;
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller; null offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A kernel pipe that mirrors spliced bytes to the tap: the event loop duplicates a
/// [`KernelPipe`]'s contents into it with `tee(2)` (page references, no copy), and the tap writer
/// thread reads them out. Each worker has its own (see `tap::queue::Lane`); shared by the loop
/// (write end) and the records in the tap queue (read end), so it lives as long as either needs
/// it.
///
/// The write end is non-blocking: a tee into a full pipe moves nothing, and the loop counts the
/// bytes as dropped. The read end is non-blocking too: the writer reads only bytes that a queued
/// record says are there, so a short read means a bug, not a wait.
#[derive(Debug)]
pub struct TeePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes teed in and not yet read out.
    pending: std::sync::atomic::AtomicUsize,
    /// Its place in the descriptor budget.
    _slot: PipeSlot,
}

impl TeePipe {
    /// A new empty pipe of `size` bytes (of the kernel's default size when refused); fails when
    /// descriptors run out, or the descriptor budget has none to spare for a tap.
    pub fn new(size: usize) -> io::Result<TeePipe> {
        let slot = PipeSlot::take().ok_or_else(|| io::Error::other(BUDGET_SPENT))?;
        let KernelPipe {
            read,
            write,
            capacity,
            ..
        } = KernelPipe::new(size)?;
        Ok(TeePipe {
            read,
            write,
            capacity,
            pending: Default::default(),
            _slot: slot,
        })
    }

    /// Capacity in bytes, if every buffer in it were a full page.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes teed in and not yet read out.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether `len` more bytes fit, counting a pipe as full at half its capacity: the capacity
    /// counts buffers (pages or socket fragments), not bytes.
    pub fn has_room(&self, len: usize) -> bool {
        self.pending() + len <= self.capacity / 2
    }

    /// Duplicates up to `len` bytes from the head of the pipe `src` (a [`KernelPipe::read_fd`])
    /// into this pipe, leaving `src` unchanged. `Ok(0)` when this pipe is full.
    pub fn tee_from(&self, src: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on pipe descriptors owned by the caller and by self.
        let n = unsafe { libc::tee(src, self.write.as_raw_fd(), len, libc::SPLICE_F_NONBLOCK) };
        match n {
            n if n >= 0 => {
                self.pending
                    .fetch_add(n as usize, std::sync::atomic::Ordering::AcqRel);
                Ok(n as usize)
            }
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                e => Err(e),
            },
        }
    }

    /// Reads up to `len` bytes out of the pipe, appending them to `out`; returns how many.
    pub fn read_into(&self, out: &mut Vec<u8>, len: usize) -> usize {
        out.reserve(len);
        let got = self.read_uninit(&mut out.spare_capacity_mut()[..len]);
        // SAFETY: `read_uninit` initialized the first `got` bytes of the spare capacity.
        unsafe { out.set_len(out.len() + got) };
        got
    }

    /// Reads out of the pipe until `dst` is full or the pipe is empty; returns how many bytes
    /// (all initialized at the start of `dst`).
    pub fn read_uninit(&self, dst: &mut [std::mem::MaybeUninit<u8>]) -> usize {
        let mut got = 0;
        while got < dst.len() {
            let rest = &mut dst[got..];
            // SAFETY: reads at most `rest.len()` bytes into memory `rest` borrows exclusively.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            if n > 0 {
                got += n as usize;
            } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                break;
            }
        }
        self.pending
            .fetch_sub(got, std::sync::atomic::Ordering::AcqRel);
        got
    }
}

/// Why [`PipePool::take`] has no pipe.
#[derive(Debug)]
pub enum NoPipe {
    /// A budget has no room for one, for now: see [`Refusal::lifted`].
    Refused(Refusal),
    /// The kernel refused one, or granted one too small to be worth it.
    Os(io::Error),
}

/// A budget with no room for one more pipe.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The descriptor budget has none to spare: they are kept for connections.
    Descriptors,
    /// The pipes held would pass `splice_memory_limit`.
    Memory {
        /// The budget.
        memory: Arc<SpliceMemory>,
        /// The capacity of the pipe refused.
        bytes: usize,
    },
}

impl Refusal {
    /// Whether the budgets have room now for what was refused: a direction that copies because
    /// of this refusal may splice again (it may be refused again, if another took the room).
    pub fn lifted(&self) -> bool {
        crate::fd_budget::has_room()
            && match self {
                Refusal::Descriptors => true,
                Refusal::Memory { memory, bytes } => memory.has_room(*bytes),
            }
    }
}

impl std::fmt::Display for NoPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPipe::Refused(Refusal::Descriptors) => f.write_str(BUDGET_SPENT),
            NoPipe::Refused(Refusal::Memory { .. }) => {
                f.write_str("the pipes held reach splice_memory_limit")
            }
            NoPipe::Os(e) => e.fmt(f),
        }
    }
}

const BUDGET_SPENT: &str = "the descriptors left are kept for connections";

/// Below this capacity a kernel pipe is not worth splicing through (the default copy buffer is
/// 64 KiB).
const MIN_USEFUL_PIPE: usize = 64 * 1024;

/// Idle kernel pipes, reused so a busy connection does not create two descriptors per burst.
#[derive(Debug)]
pub struct PipePool {
    size: usize,
    max_free: usize,
    free: Vec<KernelPipe>,
    memory: Arc<SpliceMemory>,
}

impl PipePool {
    /// A pool of pipes of `size` bytes keeping at most `max_free` idle ones, whose busy pipes
    /// count in `memory`.
    pub fn new(size: usize, max_free: usize, memory: Arc<SpliceMemory>) -> PipePool {
        PipePool {
            size,
            max_free,
            free: Vec::new(),
            memory,
        }
    }

    /// The capacity asked for each pipe.
    pub fn size(&self) -> usize {
        self.size
    }

    /// An empty pipe; fails when the descriptor budget has none to spare (they are left to
    /// connections, see [`crate::fd_budget`]), when the pipes held would pass the splice memory
    /// limit, when descriptors run out, or when the kernel grants less than 64 KiB (or less
    /// than `size`, if smaller): past the user's pipe-user-pages-soft, new pipes hold two pages,
    /// and splicing through those costs more than copying. The caller then copies.
    ///
    /// Idle pipes kept in the pool are outside both budgets (the event loop reserves descriptors
    /// for them): a pipe counts while a direction holds it.
    pub fn take(&mut self) -> Result<KernelPipe, NoPipe> {
        let slot = PipeSlot::take().ok_or(NoPipe::Refused(Refusal::Descriptors))?;
        let held = self
            .memory
            .reserve(self.cost())
            .ok_or_else(|| self.memory_refusal())?;
        let mut p = match self.free.pop() {
            Some(p) => p,
            None => {
                let p = KernelPipe::new(self.size).map_err(NoPipe::Os)?;
                if p.capacity != self.size {
                    log::debug!("kernel pipe of {} bytes ({} asked)", p.capacity, self.size);
                }
                if p.capacity < self.size.min(MIN_USEFUL_PIPE) {
                    return Err(NoPipe::Os(io::Error::other(format!(
                        "the kernel granted a pipe of {} bytes (pipe-user-pages-soft reached?)",
                        p.capacity
                    ))));
                }
                p
            }
        };
        p.slot = Some(slot);
        p.held = Some(held);
        Ok(p)
    }

    /// What each pipe of this pool counts in the splice memory budget: see [`pipe_cost`]. One
    /// figure for every pipe, so that a refusal is lifted exactly when a take would succeed.
    fn cost(&self) -> usize {
        pipe_cost(self.size)
    }

    fn memory_refusal(&self) -> NoPipe {
        NoPipe::Refused(Refusal::Memory {
            memory: Arc::clone(&self.memory),
            bytes: self.cost(),
        })
    }

    /// Returns an empty pipe; a pipe with bytes left is closed instead.
    pub fn give(&mut self, mut pipe: KernelPipe) {
        pipe.slot = None;
        pipe.held = None;
        if pipe.len == 0 && self.free.len() < self.max_free {
            self.free.push(pipe);
        }
    }
}

/// A budget with no limit, for tests.
#[cfg(test)]
pub(crate) fn unlimited() -> Arc<SpliceMemory> {
    Arc::new(SpliceMemory::new(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Two loopback connections: bytes written to `a` arrive at `b`; bytes sent from `c` arrive
    /// at `d`.
    fn two_connections() -> [TcpStream; 4] {
        let pair = || {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (a, l.accept().unwrap().0)
        };
        let ((a, b), (c, d)) = (pair(), pair());
        [a, b, c, d]
    }

    #[test]
    fn capacity_is_what_the_kernel_granted() {
        // The kernel rounds a pipe's size up to a power of two pages.
        let p = KernelPipe::new(100 * 1024).unwrap();
        assert_eq!(p.capacity, 128 * 1024);
        // SAFETY: fcntl on the pipe's own descriptor.
        let got = unsafe { libc::fcntl(p.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert_eq!(got as usize, p.capacity);
    }

    #[test]
    fn moves_bytes_between_sockets_and_sees_eof() {
        let [mut a, b, c, mut d] = two_connections();
        let mut pool = PipePool::new(64 * 1024, 2, unlimited());
        let mut p = pool.take().unwrap();
        a.write_all(b"zero-copy").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        b.set_nonblocking(false).unwrap();
        let mut total = 0;
        while total < 9 {
            total += p.fill_from(b.as_raw_fd(), usize::MAX).unwrap();
        }
        assert_eq!(p.len, 9);
        assert_eq!(p.fill_from(b.as_raw_fd(), usize::MAX).unwrap(), 0, "EOF");
        assert_eq!(p.drain_to(c.as_raw_fd()).unwrap(), 9);
        assert_eq!(p.len, 0);
        let mut got = [0u8; 9];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"zero-copy");
        pool.give(p);
        assert_eq!(pool.free.len(), 1);
    }

    #[test]
    fn busy_pipes_stay_within_the_memory_limit() {
        let memory = Arc::new(SpliceMemory::new(128 * 1024));
        let mut pool = PipePool::new(64 * 1024, 4, Arc::clone(&memory));
        let mut a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!(memory.held(), 128 * 1024);
        let refusal = match pool.take() {
            Err(NoPipe::Refused(r @ Refusal::Memory { .. })) => r,
            other => panic!("a third pipe: {other:?}"),
        };
        assert_eq!(memory.refused(), 1);
        assert!(!refusal.lifted());
        // A pipe given back with bytes in it is closed; its memory is free all the same.
        a.len = 1;
        pool.give(a);
        assert_eq!(memory.held(), 64 * 1024);
        assert!(refusal.lifted());
        let c = pool.take().unwrap();
        pool.give(b);
        pool.give(c);
        assert_eq!(memory.held(), 0, "idle pooled pipes do not count");
        assert_eq!(pool.free.len(), 2);
        // A pooled pipe counts again when taken, and is kept when refused.
        memory.set_limit(64 * 1024);
        let d = pool.take().unwrap();
        assert!(matches!(
            pool.take(),
            Err(NoPipe::Refused(Refusal::Memory { .. }))
        ));
        assert_eq!(pool.free.len(), 1);
        drop(d);
        assert_eq!(memory.held(), 0, "a dropped pipe frees its memory");
        // A size the kernel rounds up counts rounded, the same in a take and in its refusal.
        let memory = Arc::new(SpliceMemory::new(128 * 1024));
        let mut pool = PipePool::new(100 * 1024, 4, Arc::clone(&memory));
        let e = pool.take().unwrap();
        assert_eq!((e.capacity, memory.held()), (128 * 1024, 128 * 1024));
        let Err(NoPipe::Refused(refusal)) = pool.take() else {
            panic!("a second pipe past the limit");
        };
        pool.give(e);
        assert!(refusal.lifted());
        pool.take().unwrap();
    }

    #[test]
    fn tee_duplicates_without_consuming() {
        let [mut a, b, c, mut d] = two_connections();
        let mut p = KernelPipe::new(64 * 1024).unwrap();
        let tee = TeePipe::new(4096).unwrap();
        a.write_all(b"mirrored").unwrap();
        b.set_nonblocking(false).unwrap();
        let mut total = 0;
        while total < 8 {
            total += p.fill_from(b.as_raw_fd(), usize::MAX).unwrap();
        }
        assert_eq!(tee.tee_from(p.read_fd(), 8).unwrap(), 8);
        assert_eq!(tee.pending(), 8);
        assert_eq!(
            p.drain_to(c.as_raw_fd()).unwrap(),
            8,
            "the source pipe still holds them"
        );
        let mut got = [0u8; 8];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"mirrored");
        let mut out = b"x".to_vec();
        assert_eq!(tee.read_into(&mut out, 8), 8);
        assert_eq!(out, b"xmirrored");
        assert_eq!(tee.pending(), 0);
        assert_eq!(tee.read_into(&mut out, 8), 0, "nothing left");
        assert_eq!(out, b"xmirrored");
    }

    #[test]
    fn tee_into_full_pipe_moves_nothing() {
        let (src, dst) = (
            KernelPipe::holding(&[7u8; 64 * 1024]),
            TeePipe::new(4096).unwrap(),
        );
        // tee always duplicates from the head: one call fills the one-page destination.
        let teed = dst.tee_from(src.read_fd(), src.len).unwrap();
        assert!(teed > 0 && teed < 64 * 1024, "teed {teed}");
        assert_eq!(dst.tee_from(src.read_fd(), 1).unwrap(), 0, "full");
    }

    #[test]
    fn empty_source_would_block() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut p = KernelPipe::new(64 * 1024).unwrap();
        let e = p.fill_from(b.as_raw_fd(), usize::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
