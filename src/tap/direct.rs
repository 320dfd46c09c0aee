//! Direct I/O for the pcap file: a block-aligned byte buffer and the `O_DIRECT` calls.
//!
//! Why: written through the page cache, every captured byte is copied once more by the kernel
//! and then held as dirty cache until writeback, which costs the tap writer about half of its
//! CPU per byte and evicts the cache of whatever runs beside the proxy. With `O_DIRECT` the
//! device reads the writer's buffer itself. That needs the buffer address, the length and the
//! file offset aligned to the device's block size, so whole blocks go out direct and the last,
//! partial block of the file is written through the page cache (see `rotate.rs`).

use std::alloc::{Layout, alloc, dealloc, handle_alloc_error};
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Alignment of direct writes: buffer address, length and file offset. A multiple of the
/// 512-byte and 4 KiB logical blocks of common devices; where a device needs more, the write
/// fails with `EINVAL` and the file falls back to the page cache.
pub(crate) const DIO_ALIGN: usize = 4096;

/// A growable byte buffer whose storage is aligned to [`DIO_ALIGN`] (the subset of `Vec<u8>`
/// the pcap renderer uses).
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively, like `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(crate) const fn new() -> AlignedBuf {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Shortens the buffer to `len` bytes (no-op if it is shorter).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Removes the first `n` bytes, moving the rest to the front.
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.copy_within(n.., 0);
        self.len -= n;
    }

    #[inline]
    pub(crate) fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    #[inline]
    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        // SAFETY: `reserve` made room for `bytes.len()` more bytes after `len`; the source is a
        // separate borrow, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(self.len),
                bytes.len(),
            );
        }
        self.len += bytes.len();
    }

    /// Inserts `bytes` before the current contents.
    pub(crate) fn prepend(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        self.reserve(n);
        // SAFETY: `reserve` made room for `len + n` bytes; `copy` handles the overlap of moving
        // the contents up by `n`, and `bytes` is a separate borrow.
        unsafe {
            let p = self.ptr.as_ptr();
            std::ptr::copy(p, p.add(n), self.len);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n);
        }
        self.len += n;
    }

    /// Appends up to `n` bytes that `fill` writes into uninitialized room and reports the
    /// count of (at most `n`); returns that count.
    ///
    /// # Safety
    /// `fill` must have initialized the first bytes of the room, as many as it returns.
    pub(crate) unsafe fn fill_with(
        &mut self,
        n: usize,
        fill: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]) -> usize,
    ) -> usize {
        self.reserve(n);
        // SAFETY: `reserve` made `n` bytes of room after `len`; they are viewed as
        // uninitialized, so nothing unwritten is read through this slice.
        let room = unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr
                    .as_ptr()
                    .add(self.len)
                    .cast::<std::mem::MaybeUninit<u8>>(),
                n,
            )
        };
        let got = fill(room).min(n);
        self.len += got;
        got
    }

    /// Makes room for `extra` more bytes. The check is inlined into every append (a packet
    /// is a dozen of them); growing is the rare, out-of-line part.
    #[inline]
    fn reserve(&mut self, extra: usize) {
        if extra > self.cap - self.len {
            self.grow(extra);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, extra: usize) {
        let need = self.len.checked_add(extra).expect("buffer size overflow");
        let cap = need
            .max(self.cap * 2)
            .max(64 * 1024)
            .next_multiple_of(DIO_ALIGN);
        let layout = Layout::from_size_align(cap, DIO_ALIGN).expect("buffer layout");
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            handle_alloc_error(layout)
        };
        // SAFETY: the old allocation holds `len` initialized bytes and the new one `cap >= len`;
        // they are distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), ptr.as_ptr(), self.len) };
        self.free();
        self.ptr = ptr;
        self.cap = cap;
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: `ptr` was allocated in `grow` with exactly this layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, DIO_ALIGN),
                )
            };
        }
    }

    /// Gives the memory back if more than `max` bytes are held (after a burst), keeping the
    /// contents if they fit in `max`.
    pub(crate) fn shrink_if_over(&mut self, max: usize) {
        if self.cap > max && self.len <= max {
            let mut smaller = AlignedBuf::new();
            smaller.extend_from_slice(self);
            *self = smaller;
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> AlignedBuf {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialized bytes (dangling but aligned when 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Turns `O_DIRECT` on or off for `file`'s open file description.
pub(crate) fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid descriptor owned by `file`; F_GETFL/F_SETFL only read and change
    // its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_behaves_like_a_vec() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        let mut v = Vec::new();
        for i in 0..100_000u32 {
            b.push(i as u8);
            v.push(i as u8);
            if i % 7 == 0 {
                b.extend_from_slice(&i.to_le_bytes());
                v.extend_from_slice(&i.to_le_bytes());
            }
        }
        assert_eq!(&b[..], &v[..]);
        assert_eq!(b.as_ptr() as usize % DIO_ALIGN, 0, "storage is aligned");
        assert_eq!(b.capacity() % DIO_ALIGN, 0);
        b.consume(5000);
        assert_eq!(&b[..], &v[5000..]);
        b.prepend(b"head");
        assert_eq!(&b[..4], b"head");
        assert_eq!(&b[4..], &v[5000..]);
        b[0] = b'H';
        assert_eq!(&b[..4], b"Head");
        b.truncate(3);
        assert_eq!(&b[..], b"Hea");
        b.shrink_if_over(1 << 20);
        assert!(b.capacity() > 1 << 17, "kept under the limit");
        b.shrink_if_over(1024);
        assert_eq!((&b[..], b.capacity()), (&b"Hea"[..], 64 * 1024));
        b.clear();
        b.shrink_if_over(1024);
        assert_eq!(b.capacity(), 0);
    }
}
