//! The pcap output file, with optional size-based rotation.
//!
//! Naming: the file being written is always the configured path (`cap.pcap`). On rotation it is
//! renamed to `cap.pcap.1`, the former `cap.pcap.1` to `cap.pcap.2`, and so on; the file that
//! would become `cap.pcap.<max_files>` is deleted (overwritten by the rename). So at most
//! `max_files` files exist: `cap.pcap` (newest) and `cap.pcap.1` .. `cap.pcap.<max_files - 1>`
//! (oldest last). Older numbered files left by a previous run are replaced as rotation proceeds.
//!
//! Invariants:
//! - Every file starts with its own pcap global header, so each one is a valid standalone capture.
//! - With `rotate_bytes = Some(n)`, a file is switched before a packet that would take it past
//!   `n` bytes, unless it holds no packet yet (a single packet larger than `n` still gets
//!   written). So every file is at most `max(n, header + largest packet)` bytes.
//! - Rotation is used only for regular files; a FIFO or a device is written without rotation.
//!   A FIFO whose write fails (its reader left) is closed, and opened again for the next
//!   reader, who gets a pcap header first.
//! - Packets are appended to an in-memory batch buffer and written at the end of each batch
//!   (and at each file switch). If a write fails on a regular file, the file is cut back to its
//!   last complete packet (`complete`; a direct write ends on a block boundary, which may fall
//!   inside a packet, so the starts of the packets in the buffer are kept to know where the
//!   last whole one ends), so a later batch never lands after a torn record.
//! - Direct I/O (`PcapTarget::direct_io`, regular files only): whole 4 KiB blocks of at least
//!   [`DIRECT_MIN`] bytes go out with `O_DIRECT`, the rest through the page cache. The buffer
//!   keeps the file's last, partial block (`synced` bytes already in the file) so the next
//!   direct write can start on a block boundary. Between batches while the writer is behind
//!   (`hold_tail`), up to `DIRECT_MIN` bytes (then a partial block) may stay in memory; once the
//!   queue is drained, every rendered packet is in the file. Held packets already count as
//!   written; if a later write fails they are lost with that batch (counted as its error).
//!   Where `O_DIRECT` is refused (the file system, or an alignment the device wants), the file
//!   falls back to the page cache for good.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{info, warn};

use super::PcapTarget;
use super::direct::{AlignedBuf, DIO_ALIGN, set_direct};
use super::writer::{open_blocking, open_if_read, open_output};

/// Size of the pcap global header.
pub(crate) const GLOBAL_HEADER_LEN: usize = 24;

/// Fewest unwritten bytes worth a direct write; smaller batches go through the page cache (a
/// direct write waits for the device, and rewriting a block the cache holds makes the kernel
/// flush it first).
pub(crate) const DIRECT_MIN: usize = 256 * 1024;

/// The batch buffer is given back when a burst grew it past this.
const KEEP_BUFFER: usize = 16 << 20;

/// Packet starts kept room for between batches (a burst may need more; given back after).
const KEEP_STARTS: usize = 1 << 16;

/// The pcap file(s) of one capture.
pub(crate) struct RotatingFile {
    path: PathBuf,
    /// `None` when not rotating (not configured, or not a regular file).
    rotate_bytes: Option<u64>,
    max_files: u32,
    header: [u8; GLOBAL_HEADER_LEN],
    /// Whether to write regular files with direct I/O (configured, and not refused yet): the
    /// current file is written with direct I/O when this holds and it is a regular file.
    direct_io: bool,
    /// The current file; `None` until opened (FIFO without reader, or after a rotation).
    file: Option<File>,
    /// Whether the current file is a regular file (can be cut back after a failed write).
    regular: bool,
    /// Whether `O_DIRECT` is set on the current file's descriptor right now (switched only when
    /// a write needs the other mode, so small batches cost one `pwrite`).
    odirect: bool,
    /// Bytes known to be in the current file, header included.
    written: u64,
    /// Where the last whole packet in the file ends (what a failed write cuts the file back
    /// to); below `written` while a direct write has left a packet half in the file.
    complete: u64,
    /// Offsets in `pending` where packets start, in order, for those not wholly in the file.
    starts: Vec<usize>,
    /// Whether the current file has its header (or the buffer holds it, in direct mode).
    header_written: bool,
    /// Whether the current file holds (or the pending buffer adds) at least one packet.
    has_packets: bool,
    /// Packets not yet written to the current file; in direct mode it starts with the file's
    /// last `synced` bytes, from a block boundary.
    pending: AlignedBuf,
    /// Leading bytes of `pending` already in the file (direct mode; 0 otherwise).
    synced: usize,
    /// First error met while switching files inside the current batch.
    error: Option<io::Error>,
    /// The file is a FIFO whose reader left: open it again only if a reader has it open.
    reopen_without_waiting: bool,
}

impl RotatingFile {
    /// Opens (creates, truncates) the target's path without blocking and writes the header to
    /// a regular file right away. Standard output (`-`) is written where it is, as it is.
    pub(crate) fn open(
        target: &PcapTarget,
        header: [u8; GLOBAL_HEADER_LEN],
    ) -> io::Result<RotatingFile> {
        let (file, regular) = if target.path == Path::new(crate::config::PCAP_STDOUT) {
            // The open file the process was given, not a new one: /dev/stdout cannot open a
            // socket again (ENXIO: a capture streamed over socat, inetd, a systemd socket), and
            // would truncate a file and write it from its start where the shell appends.
            // Written in sequence like a pipe: no rotation, no direct I/O at offsets of ours.
            let fd = std::os::fd::AsFd::as_fd(&io::stdout()).try_clone_to_owned()?;
            (Some(File::from(fd)), false)
        } else {
            let file = open_output(&target.path, false)?;
            let regular = match &file {
                Some(f) => f.metadata()?.file_type().is_file(),
                None => false,
            };
            (file, regular)
        };
        if target.rotate_bytes.is_some() && !regular {
            warn!(
                "tap: {} is not a regular file; pcap rotation is disabled for it",
                target.path.display()
            );
        }
        let mut out = RotatingFile {
            path: target.path.clone(),
            rotate_bytes: target.rotate_bytes.filter(|_| regular),
            max_files: target.max_files.max(1),
            header,
            direct_io: target.direct_io,
            file,
            regular,
            odirect: false,
            written: 0,
            complete: 0,
            starts: Vec::new(),
            header_written: false,
            has_packets: false,
            pending: AlignedBuf::new(),
            synced: 0,
            error: None,
            reopen_without_waiting: false,
        };
        if regular {
            out.start_direct();
            out.write_pending(true)?;
        }
        Ok(out)
    }

    /// The path of the current file, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the current file is written with direct I/O.
    pub(crate) fn is_direct(&self) -> bool {
        self.direct_io && self.regular
    }

    /// Returns the buffer a packet of `len` bytes is to be appended to, switching files first if
    /// the packet would take the current file past the rotation size.
    pub(crate) fn room(&mut self, len: usize) -> &mut AlignedBuf {
        if let Some(limit) = self.rotate_bytes {
            let header = if self.header_written {
                0
            } else {
                GLOBAL_HEADER_LEN
            };
            let unwritten = self.pending.len() - self.synced;
            let size = self.written + (header + unwritten + len) as u64;
            if self.has_packets && size > limit {
                self.rotate();
            }
        }
        self.has_packets = true;
        self.starts.push(self.pending.len());
        &mut self.pending
    }

    /// Writes the pending packets; with `hold_tail` (more records are queued), a partial last
    /// block may stay buffered for the next batch. Returns the first error of this batch
    /// (including errors met while switching files); packets that failed are discarded.
    pub(crate) fn flush(&mut self, hold_tail: bool) -> io::Result<()> {
        let result = self.write_pending(!hold_tail);
        if result.is_err() {
            // Not written (e.g. the file cannot be opened): dropped, never accumulated.
            self.pending.truncate(self.synced);
            self.starts.clear();
        }
        self.pending.shrink_if_over(KEEP_BUFFER);
        if self.starts.capacity() > KEEP_STARTS {
            self.starts.shrink_to(KEEP_STARTS);
        }
        match self.error.take() {
            Some(err) => Err(err),
            None => result,
        }
    }

    /// Writes what is pending; `all`: everything, else direct mode may keep a partial block.
    fn write_pending(&mut self, all: bool) -> io::Result<()> {
        if !self.header_written {
            self.write_header()?;
        }
        if self.is_direct() {
            return self.write_direct(all);
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let file = self.current();
        let result = file.and_then(|file| file.write_all(&pending).and_then(|()| file.flush()));
        let len = pending.len() as u64;
        self.pending = pending;
        self.pending.clear();
        self.starts.clear();
        match result {
            Ok(()) => {
                self.written += len;
                self.complete = self.written;
                Ok(())
            }
            Err(err) => {
                self.cut_back();
                Err(err)
            }
        }
    }

    /// Direct mode: whole blocks with `O_DIRECT` when there are enough new bytes, the rest
    /// through the page cache when `all`.
    fn write_direct(&mut self, all: bool) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let base = self.written - self.synced as u64;
        let unwritten = self.pending.len() - self.synced;
        let whole = self.pending.len() / DIO_ALIGN * DIO_ALIGN;
        if unwritten >= DIRECT_MIN {
            let result = switch(file, &mut self.odirect, true)
                .and_then(|()| file.write_all_at(&self.pending[..whole], base));
            match result {
                Ok(()) => {
                    self.written = base + whole as u64;
                    // The last packet start at or before the block boundary ends the packets
                    // now wholly in the file (all of them when the buffer was all written).
                    let kept = self.starts.partition_point(|&s| s <= whole);
                    if whole == self.pending.len() {
                        self.complete = self.written;
                    } else if let Some(&last) = kept.checked_sub(1).map(|i| &self.starts[i]) {
                        self.complete = self.complete.max(base + last as u64);
                    }
                    self.consume_pending(whole);
                    self.synced = 0;
                }
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    info!(
                        "tap: {}: direct I/O refused ({err}); writing through the page cache",
                        self.path.display()
                    );
                    self.direct_io = false;
                    let _ = switch(file, &mut self.odirect, false);
                    // Go on as a plain file: the bytes already in it leave the buffer, and
                    // writes continue from the file position.
                    if let Err(err) = (&mut &*file).seek(SeekFrom::Start(self.written)) {
                        self.cut_back();
                        return Err(err);
                    }
                    self.consume_pending(self.synced);
                    self.synced = 0;
                    return self.write_pending(all);
                }
                Err(err) => {
                    self.cut_back();
                    return Err(err);
                }
            }
        }
        if all {
            return self.write_tail();
        }
        Ok(())
    }

    /// Removes the first `n` bytes of `pending`, and the starts of packets before them.
    fn consume_pending(&mut self, n: usize) {
        let gone = self.starts.partition_point(|&s| s < n);
        self.starts.drain(..gone);
        for s in &mut self.starts {
            *s -= n;
        }
        self.pending.consume(n);
    }

    /// Direct mode: writes the unwritten rest of `pending` (less than `DIRECT_MIN`, or a partial
    /// block) at the end of the file through the page cache, and keeps the file's last partial
    /// block buffered for the next direct write.
    fn write_tail(&mut self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if self.pending.len() > self.synced {
            let result = switch(file, &mut self.odirect, false)
                .and_then(|()| file.write_all_at(&self.pending[self.synced..], self.written));
            if let Err(err) = result {
                self.cut_back();
                return Err(err);
            }
            self.written += (self.pending.len() - self.synced) as u64;
        }
        self.complete = self.written;
        self.starts.clear();
        let whole = self.pending.len() / DIO_ALIGN * DIO_ALIGN;
        self.pending.consume(whole);
        self.synced = self.pending.len();
        Ok(())
    }

    fn write_header(&mut self) -> io::Result<()> {
        let header = self.header;
        self.current()?;
        if self.is_direct() {
            // The file is empty: the header goes out with the first packets.
            self.pending.prepend(&header);
            for s in &mut self.starts {
                *s += GLOBAL_HEADER_LEN;
            }
            self.header_written = true;
            return Ok(());
        }
        let file = self.file.as_mut().expect("opened by current()");
        match file.write_all(&header) {
            Ok(()) => {
                self.header_written = true;
                self.written = GLOBAL_HEADER_LEN as u64;
                self.complete = self.written;
                Ok(())
            }
            Err(err) => {
                self.cut_back();
                Err(err)
            }
        }
    }

    /// The current file, opened if needed (blocking: only from the writer thread, or for a
    /// regular file).
    fn current(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let file = if self.reopen_without_waiting {
                // A FIFO whose last reader left: never wait for the next one (the writer
                // serves other outputs, and exits); this batch is lost while there is none.
                let file = open_if_read(&self.path, false)?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotConnected, "the FIFO has no reader")
                })?;
                self.reopen_without_waiting = false;
                file
            } else {
                open_blocking(&self.path, false)?
            };
            self.regular = file.metadata()?.file_type().is_file();
            self.file = Some(file);
            self.written = 0;
            self.complete = 0;
            self.synced = 0;
            self.header_written = false;
            self.odirect = false;
            self.start_direct();
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Turns direct I/O on for a new, empty regular file when configured and not refused yet
    /// (`O_DIRECT` is set here to learn whether the file system takes it, and stays set until a
    /// write through the cache switches it off).
    fn start_direct(&mut self) {
        let Some(file) = self.file.as_ref().filter(|_| self.is_direct()) else {
            return;
        };
        match set_direct(file, true) {
            Ok(()) => self.odirect = true,
            Err(err) => {
                info!(
                    "tap: {}: direct I/O not available ({err}); writing through the page cache",
                    self.path.display()
                );
                self.direct_io = false;
            }
        }
    }

    /// After a failed write to a regular file, removes the partial record at its end and
    /// discards the packets not written. In direct mode the file's last partial block is read
    /// back into the buffer, so the next direct write starts on a block boundary again.
    fn cut_back(&mut self) {
        self.pending.clear();
        self.synced = 0;
        self.starts.clear();
        let good = self.complete;
        self.written = good;
        if good == 0 {
            // The header was only in the buffer (direct mode), or not written.
            self.header_written = false;
        }
        if !self.regular {
            // A FIFO whose reader left: the capture it read is over, and the pipe may hold the
            // start of a packet. Closing it frees the pipe (no reader, no writer left); later
            // batches open the FIFO again without waiting (dropped while no reader has it
            // open) and start with the pcap header, so the next reader gets a capture of its
            // own. Only a named FIFO: the path itself (not a link such as /dev/stdout or
            // /proc/self/fd/1 to a pipe, which no new reader can open).
            let fifo = fs::symlink_metadata(&self.path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
            if fifo {
                self.file = None;
                self.reopen_without_waiting = true;
                self.written = 0;
                self.complete = 0;
                self.header_written = false;
            }
            return;
        }
        let direct = self.is_direct();
        let Some(file) = &mut self.file else { return };
        if file.set_len(good).is_err() || file.seek(SeekFrom::Start(good)).is_err() {
            // Start over with a fresh file on the next write.
            self.file = None;
            self.written = 0;
            self.complete = 0;
            self.header_written = false;
            return;
        }
        let tail = (good % DIO_ALIGN as u64) as usize;
        if direct && tail > 0 {
            let mut block = vec![0u8; tail];
            let read = switch(file, &mut self.odirect, false)
                .and_then(|()| file.read_exact_at(&mut block, good - tail as u64));
            match read {
                Ok(()) => {
                    self.pending.extend_from_slice(&block);
                    self.synced = tail;
                }
                Err(err) => {
                    info!(
                        "tap: {}: cannot read back its last block ({err}); writing through the \
                         page cache",
                        self.path.display()
                    );
                    self.direct_io = false;
                }
            }
        }
    }

    /// Closes the current file after writing what is pending, shifts the numbered files and
    /// starts a new, empty current file.
    fn rotate(&mut self) {
        if let Err(err) = self.write_pending(true) {
            self.error.get_or_insert(err);
        }
        self.pending.clear();
        self.synced = 0;
        self.starts.clear();
        self.file = None;
        for index in (1..self.max_files).rev() {
            let from = numbered(&self.path, index - 1);
            let to = numbered(&self.path, index);
            if let Err(err) = fs::rename(&from, &to)
                && err.kind() != io::ErrorKind::NotFound
            {
                self.error.get_or_insert(err);
            }
        }
        self.written = 0;
        self.complete = 0;
        self.header_written = false;
        self.has_packets = false;
    }
}

impl Drop for RotatingFile {
    fn drop(&mut self) {
        // Only a partial block held back in direct mode can be left; write it.
        if self.is_direct() && self.pending.len() > self.synced {
            let _ = self.write_direct(true);
        }
    }
}

/// Sets or clears `O_DIRECT` on `file` unless `state` says it already is.
fn switch(file: &File, state: &mut bool, on: bool) -> io::Result<()> {
    if *state != on {
        set_direct(file, on)?;
        *state = on;
    }
    Ok(())
}

/// `path` for index 0, `path.N` for index N.
pub(crate) fn numbered(path: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_names() {
        let p = Path::new("/tmp/cap.pcap");
        assert_eq!(numbered(p, 0), PathBuf::from("/tmp/cap.pcap"));
        assert_eq!(numbered(p, 3), PathBuf::from("/tmp/cap.pcap.3"));
    }
}
