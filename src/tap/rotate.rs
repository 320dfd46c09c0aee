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
//! - Packets are appended to an in-memory batch buffer and written with one `write_all` per
//!   batch (plus one at each file switch). If a write fails on a regular file, the file is cut
//!   back to its last complete packet, so a later batch never lands after a torn record.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use log::warn;

use super::PcapTarget;
use super::writer::{open_blocking, open_output};

/// Size of the pcap global header.
pub(crate) const GLOBAL_HEADER_LEN: usize = 24;

/// The pcap file(s) of one capture.
pub(crate) struct RotatingFile {
    path: PathBuf,
    /// `None` when not rotating (not configured, or not a regular file).
    rotate_bytes: Option<u64>,
    max_files: u32,
    header: [u8; GLOBAL_HEADER_LEN],
    /// The current file; `None` until opened (FIFO without reader, or after a rotation).
    file: Option<File>,
    /// Whether the current file is a regular file (can be cut back after a failed write).
    regular: bool,
    /// Bytes known to be in the current file, header included.
    written: u64,
    /// Whether the current file has its header.
    header_written: bool,
    /// Whether the current file holds (or the pending buffer adds) at least one packet.
    has_packets: bool,
    /// Packets not yet written to the current file.
    pending: Vec<u8>,
    /// First error met while switching files inside the current batch.
    error: Option<io::Error>,
}

impl RotatingFile {
    /// Opens (creates, truncates) the target's path without blocking and writes the header to
    /// a regular file right away.
    pub(crate) fn open(
        target: &PcapTarget,
        header: [u8; GLOBAL_HEADER_LEN],
    ) -> io::Result<RotatingFile> {
        let file = open_output(&target.path, false)?;
        let regular = match &file {
            Some(f) => f.metadata()?.file_type().is_file(),
            None => false,
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
            file,
            regular,
            written: 0,
            header_written: false,
            has_packets: false,
            pending: Vec::new(),
            error: None,
        };
        if regular {
            out.write_header()?;
        }
        Ok(out)
    }

    /// The path of the current file, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the buffer a packet of `len` bytes is to be appended to, switching files first if
    /// the packet would take the current file past the rotation size.
    pub(crate) fn room(&mut self, len: usize) -> &mut Vec<u8> {
        if let Some(limit) = self.rotate_bytes {
            let header = if self.header_written {
                0
            } else {
                GLOBAL_HEADER_LEN
            };
            let size = self.written + (header + self.pending.len() + len) as u64;
            if self.has_packets && size > limit {
                self.rotate();
            }
        }
        self.has_packets = true;
        &mut self.pending
    }

    /// Writes the pending packets. Returns the first error of this batch (including errors met
    /// while switching files); the pending packets are discarded either way.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        let result = self.write_pending();
        self.pending.clear();
        if self.pending.capacity() > 16 << 20 {
            self.pending = Vec::new();
        }
        match self.error.take() {
            Some(err) => Err(err),
            None => result,
        }
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.write_header()?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let file = self.current();
        let result = file.and_then(|file| file.write_all(&pending).and_then(|()| file.flush()));
        let len = pending.len() as u64;
        self.pending = pending;
        match result {
            Ok(()) => {
                self.written += len;
                Ok(())
            }
            Err(err) => {
                self.cut_back();
                Err(err)
            }
        }
    }

    fn write_header(&mut self) -> io::Result<()> {
        let header = self.header;
        let file = self.current()?;
        match file.write_all(&header) {
            Ok(()) => {
                self.header_written = true;
                self.written = GLOBAL_HEADER_LEN as u64;
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
        match &mut self.file {
            Some(file) => Ok(file),
            none => {
                let file = open_blocking(&self.path, false)?;
                self.regular = file.metadata()?.file_type().is_file();
                self.written = 0;
                self.header_written = false;
                Ok(none.insert(file))
            }
        }
    }

    /// After a failed write to a regular file, removes the partial record at its end.
    fn cut_back(&mut self) {
        if !self.regular {
            return;
        }
        if let Some(file) = &mut self.file {
            let good = self.written;
            if file.set_len(good).is_err() || file.seek(SeekFrom::Start(good)).is_err() {
                // Start over with a fresh file on the next write.
                self.file = None;
                self.written = 0;
                self.header_written = false;
            }
        }
    }

    /// Closes the current file after writing what is pending, shifts the numbered files and
    /// starts a new, empty current file.
    fn rotate(&mut self) {
        if let Err(err) = self.write_pending() {
            self.error.get_or_insert(err);
        }
        self.pending.clear();
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
        self.header_written = false;
        self.has_packets = false;
    }
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
