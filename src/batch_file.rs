//! Writing a batch of lines to a log file (a tap's log, the access log) whole or not at all.

use std::fs::File;
use std::io::{self, Write};

/// Writes `buf` to `file`. A batch that fails part-way (disk full, the file size limit) is cut
/// off a regular file again, so that the next batch does not continue a torn line.
pub fn write_whole(file: &mut File, buf: &[u8]) -> io::Result<()> {
    let before = (file.metadata().ok())
        .filter(|m| m.file_type().is_file())
        .map(|m| m.len());
    let result = file.write_all(buf);
    if let (Err(_), Some(len)) = (&result, before) {
        let _ = file.set_len(len);
    }
    result
}
