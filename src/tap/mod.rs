//! The traffic tap: records handed off the data path to a writer thread.
//! (Interface placeholder: the writer lands with the tap module.)

mod record;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use record::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapRecord};

/// Where the human-readable log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output (`-`).
    Stdout,
    /// A file.
    File(PathBuf),
}

/// The pcap output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapTarget {
    /// File path.
    pub path: PathBuf,
    /// Rotate after this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Files kept.
    pub max_files: u32,
}

/// Tap settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    /// Text log.
    pub log: Option<LogTarget>,
    /// Pcap.
    pub pcap: Option<PcapTarget>,
    /// Capture cap per direction.
    pub snaplen: Option<u64>,
    /// Queue budget.
    pub queue_bytes: usize,
}

/// Tap setup error.
#[derive(Debug, thiserror::Error)]
#[error("tap not available")]
pub struct TapError;

/// Loop-side handle.
#[derive(Debug, Clone)]
pub struct TapHandle;

impl TapHandle {
    /// Data record.
    pub fn data(
        &self,
        _conn: &Arc<ConnMeta>,
        _dir: Direction,
        _offset: u64,
        _bytes: &[u8],
    ) -> bool {
        true
    }
    /// Event record.
    pub fn event(&self, _conn: &Arc<ConnMeta>, _event: TapEvent) -> bool {
        true
    }
}

/// Totals.
#[derive(Debug, Clone, Default)]
pub struct TapStats {
    /// Records written.
    pub records_written: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Records dropped.
    pub dropped_records: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
    /// Write errors.
    pub write_errors: u64,
}

/// Writer guard.
#[derive(Debug)]
pub struct TapGuard;

impl TapGuard {
    /// Flush and stop.
    pub fn shutdown(self, _timeout: Duration) -> TapStats {
        TapStats::default()
    }
}

/// Starts a tap.
pub fn start(_cfg: &TapConfig) -> Result<(TapHandle, TapGuard), TapError> {
    Err(TapError)
}
