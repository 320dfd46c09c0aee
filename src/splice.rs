//! Zero-copy forwarding: socket → kernel pipe → socket with `splice(2)`; the bytes never enter
//! user space. Used for routes without a tap (a tap needs to see the bytes).
//!
//! Invariants:
//! - A [`KernelPipe`] is both ends of a non-blocking `pipe2(2)`; `len` counts the bytes inside.
//! - Its capacity is set once (`F_SETPIPE_SZ`) and bounds what a direction holds, like a
//!   [`Buffer`](crate::buffer::Buffer) does on the copying path.
//! - A pipe holds a kernel pipe only while bytes are in flight; idle pipes go back to the
//!   [`PipePool`] (at most `max_free` kept), and a pipe with bytes left in it is closed, never reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Both ends of a kernel pipe and the number of bytes in it.
#[derive(Debug)]
pub struct KernelPipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    pub len: usize,
    /// Capacity in bytes.
    pub capacity: usize,
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
        let mut capacity = 64 * 1024; // the kernel's default pipe size
        if size != capacity {
            // SAFETY: fcntl on a descriptor we own.
            let got =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
            if got > 0 {
                capacity = got as usize;
            }
        }
        Ok(KernelPipe {
            read,
            write,
            len: 0,
            capacity,
        })
    }

    /// Moves up to the pipe's free room from socket `src` into the pipe. `Ok(0)` is EOF.
    pub fn fill_from(&mut self, src: RawFd) -> io::Result<usize> {
        let n = splice(src, self.write.as_raw_fd(), self.capacity - self.len)?;
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

/// Idle kernel pipes, reused so a busy connection does not create two descriptors per burst.
#[derive(Debug)]
pub struct PipePool {
    size: usize,
    max_free: usize,
    free: Vec<KernelPipe>,
}

impl PipePool {
    /// A pool of pipes of `size` bytes keeping at most `max_free` idle ones.
    pub fn new(size: usize, max_free: usize) -> PipePool {
        PipePool {
            size,
            max_free,
            free: Vec::new(),
        }
    }

    /// An empty pipe; fails when descriptors run out (the caller falls back to copying).
    pub fn take(&mut self) -> io::Result<KernelPipe> {
        match self.free.pop() {
            Some(p) => Ok(p),
            None => KernelPipe::new(self.size),
        }
    }

    /// Returns an empty pipe; a pipe with bytes left is closed instead.
    pub fn give(&mut self, pipe: KernelPipe) {
        if pipe.len == 0 && self.free.len() < self.max_free {
            self.free.push(pipe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn moves_bytes_between_sockets_and_sees_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        let mut pool = PipePool::new(64 * 1024, 2);
        let mut p = pool.take().unwrap();
        a.write_all(b"zero-copy").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        b.set_nonblocking(false).unwrap();
        let mut total = 0;
        while total < 9 {
            total += p.fill_from(b.as_raw_fd()).unwrap();
        }
        assert_eq!(p.len, 9);
        assert_eq!(p.fill_from(b.as_raw_fd()).unwrap(), 0, "EOF");
        assert_eq!(p.drain_to(c.as_raw_fd()).unwrap(), 9);
        assert_eq!(p.len, 0);
        let mut got = [0u8; 9];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"zero-copy");
        pool.give(p);
        assert_eq!(pool.free.len(), 1);
    }

    #[test]
    fn empty_source_would_block() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut p = KernelPipe::new(64 * 1024).unwrap();
        let e = p.fill_from(b.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
