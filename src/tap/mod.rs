//! The traffic tap: records handed off the data path to a writer thread.

mod record;

pub use record::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapRecord};
