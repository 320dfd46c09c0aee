//! Fixed-capacity byte buffers and the pool that lends them to pipes.
//!
//! Invariants:
//! - A [`Buffer`] never grows: its capacity is set once, from `buffer_size`. This is the backpressure
//!   bound: a pipe whose buffer is full stops reading.
//! - `start <= end <= capacity`; bytes in `start..end` are waiting to be written.
//! - A pipe holds a buffer only while bytes are in flight; an idle connection holds none. Released
//!   buffers go back to the [`BufferPool`], which keeps at most `max_free` of them.

/// A fixed-capacity buffer: read into [`space`](Buffer::space) then [`fill`](Buffer::fill),
/// write from [`data`](Buffer::data) then [`consume`](Buffer::consume).
#[derive(Debug)]
pub struct Buffer {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    /// A new empty buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            mem: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Total capacity.
    pub fn capacity(&self) -> usize {
        self.mem.len()
    }

    /// Bytes waiting to be written.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.mem[self.start..self.end]
    }

    /// Number of bytes waiting to be written.
    pub fn available_data(&self) -> usize {
        self.end - self.start
    }

    /// Free room at the end. Moves pending bytes to the front first when that makes room.
    #[must_use]
    pub fn space(&mut self) -> &mut [u8] {
        if self.end == self.mem.len() && self.start > 0 {
            self.shift();
        }
        &mut self.mem[self.end..]
    }

    /// Room that [`space`](Buffer::space) can offer.
    pub fn available_space(&self) -> usize {
        self.mem.len() - self.end + self.start
    }

    /// Records that `n` bytes were written into [`space`](Buffer::space).
    pub fn fill(&mut self, n: usize) {
        debug_assert!(n <= self.mem.len() - self.end, "fill({n}) beyond space");
        self.end += n;
    }

    /// Records that the first `n` bytes of [`data`](Buffer::data) were written out.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.available_data(), "consume({n}) beyond data");
        self.start += n;
        if self.start == self.end {
            // Empty: rewind so the next read gets the whole capacity without a copy.
            self.start = 0;
            self.end = 0;
        }
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Moves pending bytes to the front.
    pub fn shift(&mut self) {
        if self.start > 0 {
            self.mem.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Forgets pending bytes (used when a pair is reset). Returns how many were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.available_data();
        self.start = 0;
        self.end = 0;
        n
    }
}

/// Free buffers of one size, reused so the data path does not allocate per read.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    max_free: usize,
    free: Vec<Buffer>,
    /// Buffers currently lent out (for tests and metrics).
    lent: usize,
    /// Fewest idle buffers since the last [`trim`](BufferPool::trim): that many were not
    /// needed all that time.
    low_water: usize,
}

/// Idle buffers a pool keeps however long it goes unused.
pub const KEEP_IDLE: usize = 4;

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `max_free` idle ones.
    pub fn new(size: usize, max_free: usize) -> BufferPool {
        BufferPool {
            size,
            max_free,
            free: Vec::new(),
            lent: 0,
            low_water: 0,
        }
    }

    /// An empty buffer, reused when one is free.
    pub fn take(&mut self) -> Buffer {
        self.lent += 1;
        let buf = self.free.pop().unwrap_or_else(|| Buffer::new(self.size));
        self.low_water = self.low_water.min(self.free.len());
        buf
    }

    /// Frees the idle buffers that were not needed since the last trim, down to
    /// [`KEEP_IDLE`]: after a burst the pool gives its memory back within two trims of calm,
    /// while a steady load keeps what it uses. Returns how many were freed.
    pub fn trim(&mut self) -> usize {
        let unused = self.low_water.min(self.free.len());
        let freed = unused.min(self.free.len().saturating_sub(KEEP_IDLE));
        self.free.truncate(self.free.len() - freed);
        self.low_water = self.free.len();
        freed
    }

    /// Whether the pool holds more idle buffers than it keeps for good (a [`trim`] is due
    /// after a while).
    ///
    /// [`trim`]: BufferPool::trim
    pub fn has_excess(&self) -> bool {
        self.free.len() > KEEP_IDLE
    }

    /// Gives a buffer back; it is dropped if the pool already keeps enough.
    pub fn give(&mut self, mut buf: Buffer) {
        debug_assert!(self.lent > 0);
        self.lent -= 1;
        if self.free.len() < self.max_free {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Buffers currently held by pipes.
    pub fn lent(&self) -> usize {
        self.lent
    }

    /// Size of each buffer.
    pub fn buffer_size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_buffers_are_freed_after_two_calm_trims_and_used_ones_kept() {
        let mut pool = BufferPool::new(1024, 100);
        let burst: Vec<Buffer> = (0..50).map(|_| pool.take()).collect();
        for b in burst {
            pool.give(b);
        }
        assert!(pool.has_excess());
        // The first trim after the burst: those 50 were in use meanwhile.
        assert_eq!(pool.trim(), 0);
        // A steady load of 10 at a time keeps 10 (and the rest goes).
        let steady: Vec<Buffer> = (0..10).map(|_| pool.take()).collect();
        for b in steady {
            pool.give(b);
        }
        assert_eq!(pool.trim(), 40);
        assert_eq!(pool.free.len(), 10);
        // Calm: down to what is kept for good, and no further.
        assert_eq!(pool.trim(), 10 - KEEP_IDLE);
        assert!(!pool.has_excess());
        assert_eq!(pool.trim(), 0);
        assert_eq!(pool.free.len(), KEEP_IDLE);
    }

    #[test]
    fn fill_consume_rewinds() {
        let mut b = Buffer::new(8);
        b.space()[..5].copy_from_slice(b"hello");
        b.fill(5);
        assert_eq!(b.data(), b"hello");
        assert_eq!(b.available_space(), 3);
        b.consume(2);
        assert_eq!(b.data(), b"llo");
        assert_eq!(b.available_space(), 5);
        b.consume(3);
        assert!(b.is_empty());
        assert_eq!(b.space().len(), 8);
    }

    #[test]
    fn space_shifts_when_tail_is_full() {
        let mut b = Buffer::new(4);
        b.space().copy_from_slice(b"abcd");
        b.fill(4);
        assert!(b.space().is_empty());
        b.consume(3);
        let s = b.space();
        assert_eq!(s.len(), 3);
        assert_eq!(b.data(), b"d");
    }

    #[test]
    fn never_grows() {
        let mut b = Buffer::new(16);
        let mut total = 0;
        while !b.space().is_empty() {
            let n = b.space().len().min(5);
            b.fill(n);
            total += n;
        }
        assert_eq!(total, 16);
        assert_eq!(b.capacity(), 16);
        assert_eq!(b.available_space(), 0);
    }

    #[test]
    fn pool_reuses_and_bounds_free_list() {
        let mut p = BufferPool::new(32, 1);
        let a = p.take();
        let b = p.take();
        assert_eq!(p.lent(), 2);
        p.give(a);
        p.give(b);
        assert_eq!(p.lent(), 0);
        assert_eq!(p.free.len(), 1);
        let c = p.take();
        assert_eq!(c.capacity(), 32);
        assert!(c.is_empty());
    }
}
