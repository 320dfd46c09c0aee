//! The human-readable live log: renders records as text lines.
//!
//! Format (one header line per record, then the payload for data records):
//!
//! ```text
//! 2024-05-01T12:00:00.123456Z #7 10.0.0.1:50000 -> 10.0.0.2:80 open (route web)
//! 2024-05-01T12:00:00.123500Z #7 10.0.0.1:50000 -> 10.0.0.2:80 client -> upstream 18 bytes
//!   > GET / HTTP/1.1
//!   > Host: x
//! 2024-05-01T12:00:00.124000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 upstream -> client [... 1234 bytes not captured (tap queue full) ...]
//! 2024-05-01T12:00:00.124000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 upstream -> client 20 bytes
//!   < 000004d2  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|
//!   < 000004e2  10 11 12 13                                       |....|
//! 2024-05-01T12:00:00.125000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 FIN from client after 18 bytes
//! 2024-05-01T12:00:00.126000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 close: closed, client -> upstream 18 bytes, upstream -> client 1254 bytes, tap dropped 1 records (1234 bytes)
//! ```
//!
//! Invariants:
//! - A payload is shown as text when it is (almost) entirely printable UTF-8 (tab, CR and LF
//!   allowed): one output line per input line, a CR right before an LF is not shown, and any
//!   other control or invalid byte is escaped as `\xNN` (a lone CR as `\r`). Otherwise it is shown
//!   as a `hexdump -C` style dump whose offsets are stream offsets of that direction.
//! - Per connection and direction the sink remembers the next expected stream offset; a record
//!   starting (or a Fin/Reset/Close ending) past it gets a "not captured" marker line first, split
//!   into the part lost on a full queue and the part beyond snaplen. The state of a connection
//!   is forgotten at its Close record; records of a connection whose Open was lost are rendered
//!   the same way (every record carries its `ConnMeta`).
//! - ANSI colours are used only when the caller says so (stdout that is a terminal).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use super::record::{Direction, TapEvent, TapRecord};

/// Payloads whose share of non-text bytes is at most 1/`TEXT_BAD_RATIO` are shown as text.
const TEXT_BAD_RATIO: usize = 32;

/// ANSI escape sequences; all empty when colour is off.
struct Palette {
    dim: &'static str,
    bold: &'static str,
    to_upstream: &'static str,
    to_client: &'static str,
    alert: &'static str,
    gap: &'static str,
    reset: &'static str,
}

const COLOR: Palette = Palette {
    dim: "\x1b[2m",
    bold: "\x1b[1m",
    to_upstream: "\x1b[36m",
    to_client: "\x1b[33m",
    alert: "\x1b[1;31m",
    gap: "\x1b[35m",
    reset: "\x1b[0m",
};

const PLAIN: Palette = Palette {
    dim: "",
    bold: "",
    to_upstream: "",
    to_client: "",
    alert: "",
    gap: "",
    reset: "",
};

/// Renders records into text and writes each batch with one `write_all`.
pub(crate) struct TextSink {
    out: Box<dyn Write + Send>,
    palette: &'static Palette,
    snaplen: Option<u64>,
    /// Reused render buffer (one batch).
    buf: String,
    /// Next expected stream offset per connection id and direction.
    next: HashMap<u64, [u64; 2]>,
}

impl TextSink {
    pub(crate) fn new(out: Box<dyn Write + Send>, color: bool, snaplen: Option<u64>) -> TextSink {
        TextSink {
            out,
            palette: if color { &COLOR } else { &PLAIN },
            snaplen,
            buf: String::new(),
            next: HashMap::new(),
        }
    }

    /// Renders the batch into the reused buffer and writes it with one write and one flush.
    pub(crate) fn write_batch<'a>(
        &mut self,
        batch: impl IntoIterator<Item = &'a TapRecord>,
    ) -> io::Result<()> {
        self.buf.clear();
        for record in batch {
            self.render(record);
        }
        let result = self
            .out
            .write_all(self.buf.as_bytes())
            .and_then(|()| self.out.flush());
        if self.buf.capacity() > 16 << 20 {
            self.buf = String::new();
        }
        result
    }

    /// Appends the text of one record to the buffer.
    pub(crate) fn render(&mut self, record: &TapRecord) {
        let id = record.conn.id;
        match &record.event {
            TapEvent::Open => {
                self.header(record);
                let p = self.palette;
                let _ = writeln!(
                    self.buf,
                    "{}open{} (route {})",
                    p.bold, p.reset, record.conn.route
                );
            }
            TapEvent::Data { dir, offset, bytes } => {
                self.catch_up(record, *dir, *offset);
                let end = offset.saturating_add(bytes.len() as u64);
                self.advance(id, *dir, end);
                self.header(record);
                let p = self.palette;
                let _ = writeln!(
                    self.buf,
                    "{}{}{} {} bytes",
                    dir_color(p, *dir),
                    dir_name(*dir),
                    p.reset,
                    bytes.len()
                );
                let lead = format!("  {}{}{} ", dir_color(p, *dir), dir_mark(*dir), p.reset);
                if is_text(bytes) {
                    render_text(&mut self.buf, &lead, bytes);
                } else {
                    render_hex(&mut self.buf, &lead, *offset, bytes);
                }
            }
            TapEvent::Fin { dir, offset } => {
                self.catch_up(record, *dir, *offset);
                self.header(record);
                let p = self.palette;
                let _ = writeln!(
                    self.buf,
                    "{}FIN from {}{} after {} bytes",
                    dir_color(p, *dir),
                    dir.source(),
                    p.reset,
                    offset
                );
            }
            TapEvent::Reset { side, offsets } => {
                for dir in Direction::BOTH {
                    self.catch_up(record, dir, offsets[dir.index()]);
                }
                self.header(record);
                let p = self.palette;
                let _ = writeln!(
                    self.buf,
                    "{}RESET by {}{} (client -> upstream {} bytes, upstream -> client {} bytes)",
                    p.alert, side, p.reset, offsets[0], offsets[1]
                );
            }
            TapEvent::Close {
                kind,
                offsets,
                dropped_records,
                dropped_bytes,
            } => {
                for dir in Direction::BOTH {
                    self.catch_up(record, dir, offsets[dir.index()]);
                }
                self.next.remove(&id);
                self.header(record);
                let p = self.palette;
                let _ = writeln!(
                    self.buf,
                    "{}close: {}{}, client -> upstream {} bytes, upstream -> client {} bytes, \
                     tap dropped {} records ({} bytes)",
                    p.bold, kind, p.reset, offsets[0], offsets[1], dropped_records, dropped_bytes
                );
            }
        }
    }

    /// Writes the common line start: time, connection id and addresses.
    fn header(&mut self, record: &TapRecord) {
        let p = self.palette;
        let _ = write!(
            self.buf,
            "{}{}{} #{} {} -> {} ",
            p.dim,
            humantime::format_rfc3339_micros(record.time),
            p.reset,
            record.conn.id,
            record.conn.downstream,
            record.conn.upstream
        );
    }

    /// If `offset` is past the next expected offset of `dir`, writes "not captured" markers for
    /// the gap and moves the expectation to `offset`.
    fn catch_up(&mut self, record: &TapRecord, dir: Direction, offset: u64) {
        let expected = self.next.get(&record.conn.id).map_or(0, |n| n[dir.index()]);
        if offset <= expected {
            return;
        }
        let (queue, snap) = split_gap(self.snaplen, expected, offset);
        for (len, why) in [(queue, "tap queue full"), (snap, "snaplen")] {
            if len == 0 {
                continue;
            }
            self.header(record);
            let p = self.palette;
            let _ = writeln!(
                self.buf,
                "{}{}{} {}[... {} bytes not captured ({}) ...]{}",
                dir_color(p, dir),
                dir_name(dir),
                p.reset,
                p.gap,
                len,
                why,
                p.reset
            );
        }
        self.advance(record.conn.id, dir, offset);
    }

    fn advance(&mut self, id: u64, dir: Direction, end: u64) {
        let next = &mut self.next.entry(id).or_insert([0; 2])[dir.index()];
        *next = (*next).max(end);
    }
}

/// Splits the uncaptured range `[from, to)` into (bytes lost below snaplen, bytes beyond it).
pub(crate) fn split_gap(snaplen: Option<u64>, from: u64, to: u64) -> (u64, u64) {
    let total = to.saturating_sub(from);
    match snaplen {
        Some(limit) => {
            let below = to.min(limit).saturating_sub(from);
            (below, total - below)
        }
        None => (total, 0),
    }
}

fn dir_name(dir: Direction) -> &'static str {
    match dir {
        Direction::DownToUp => "client -> upstream",
        Direction::UpToDown => "upstream -> client",
    }
}

fn dir_mark(dir: Direction) -> char {
    match dir {
        Direction::DownToUp => '>',
        Direction::UpToDown => '<',
    }
}

fn dir_color(p: &Palette, dir: Direction) -> &'static str {
    match dir {
        Direction::DownToUp => p.to_upstream,
        Direction::UpToDown => p.to_client,
    }
}

/// Whether a control character may appear in text as is.
fn allowed_control(c: char) -> bool {
    matches!(c, '\t' | '\r' | '\n')
}

/// True when `bytes` is (almost) all printable UTF-8, tab, CR and LF.
pub(crate) fn is_text(bytes: &[u8]) -> bool {
    let mut bad = 0usize;
    for chunk in bytes.utf8_chunks() {
        bad += chunk.invalid().len();
        bad += chunk
            .valid()
            .chars()
            .filter(|c| c.is_control() && !allowed_control(*c))
            .map(char::len_utf8)
            .sum::<usize>();
    }
    bad * TEXT_BAD_RATIO <= bytes.len()
}

/// Renders text line by line, each prefixed with `lead`.
fn render_text(out: &mut String, lead: &str, bytes: &[u8]) {
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        let content = match line.strip_suffix(b"\n") {
            Some(content) => content.strip_suffix(b"\r").unwrap_or(content),
            None => line,
        };
        out.push_str(lead);
        escape_into(out, content);
        out.push('\n');
    }
}

/// Appends `bytes` as text, escaping control characters (except tab) and invalid UTF-8.
fn escape_into(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\r' {
                out.push_str("\\r");
            } else if c.is_control() && c != '\t' {
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// Renders a `hexdump -C` style dump; offsets start at the stream offset `base`.
fn render_hex(out: &mut String, lead: &str, base: u64, bytes: &[u8]) {
    for (row_index, row) in bytes.chunks(16).enumerate() {
        out.push_str(lead);
        let _ = write!(out, "{:08x}  ", base.wrapping_add(row_index as u64 * 16));
        for i in 0..16 {
            match row.get(i) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if i == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        for b in row {
            out.push(if b.is_ascii_graphic() || *b == b' ' {
                char::from(*b)
            } else {
                '.'
            });
        }
        out.push_str("|\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::record::{CloseKind, ConnMeta, Side};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn conn() -> Arc<ConnMeta> {
        Arc::new(ConnMeta {
            id: 7,
            route: Arc::from("web"),
            downstream: "10.0.0.1:50000".parse().unwrap(),
            upstream: "[2001:db8::2]:80".parse().unwrap(),
        })
    }

    fn rec(event: TapEvent) -> TapRecord {
        TapRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_714_564_800_123_456),
            conn: conn(),
            event,
        }
    }

    fn render(sink: &mut TextSink, event: TapEvent) -> String {
        sink.buf.clear();
        sink.render(&rec(event));
        sink.buf.clone()
    }

    fn sink(snaplen: Option<u64>) -> TextSink {
        TextSink::new(Box::new(io::sink()), false, snaplen)
    }

    const HEAD: &str = "2024-05-01T12:00:00.123456Z #7 10.0.0.1:50000 -> [2001:db8::2]:80 ";

    #[test]
    fn printable_payload_is_shown_line_by_line() {
        let mut s = sink(None);
        let out = render(
            &mut s,
            TapEvent::Data {
                dir: Direction::DownToUp,
                offset: 0,
                bytes: b"GET / HTTP/1.1\r\nHost: x\tz\r\n\r\nbody\x01\rend".to_vec(),
            },
        );
        let expected = format!(
            "{HEAD}client -> upstream 38 bytes\n  > GET / HTTP/1.1\n  > Host: x\tz\n  > \n  > body\\x01\\rend\n"
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn utf8_text_is_kept() {
        assert!(is_text("héllo wörld ✓\n".as_bytes()));
        let mut out = String::new();
        escape_into(&mut out, "é\u{1b}[0m".as_bytes());
        assert_eq!(out, "é\\x1b[0m");
    }

    #[test]
    fn binary_payload_is_hexdumped() {
        let mut s = sink(None);
        let bytes: Vec<u8> = (0u8..20).collect();
        let out = render(
            &mut s,
            TapEvent::Data {
                dir: Direction::UpToDown,
                offset: 0x4d2,
                bytes,
            },
        );
        let expected = format!(
            "{HEAD}upstream -> client [... 1234 bytes not captured (tap queue full) ...]\n\
             {HEAD}upstream -> client 20 bytes\n\
             \x20 < 000004d2  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|\n\
             \x20 < 000004e2  10 11 12 13                                       |....|\n"
        );
        assert_eq!(out, expected);
        // Exactly like `hexdump -C` for a mixed row.
        let mut hex = String::new();
        render_hex(&mut hex, "", 0, b"hello\x00world");
        assert_eq!(
            hex,
            "00000000  68 65 6c 6c 6f 00 77 6f  72 6c 64                 |hello.world|\n"
        );
    }

    #[test]
    fn gap_markers_and_events() {
        let mut s = sink(Some(100));
        let open = render(&mut s, TapEvent::Open);
        assert_eq!(open, format!("{HEAD}open (route web)\n"));
        render(
            &mut s,
            TapEvent::Data {
                dir: Direction::DownToUp,
                offset: 0,
                bytes: b"abc".to_vec(),
            },
        );
        // The rest of the first 100 bytes was dropped, the rest is beyond snaplen.
        let fin = render(
            &mut s,
            TapEvent::Fin {
                dir: Direction::DownToUp,
                offset: 150,
            },
        );
        assert_eq!(
            fin,
            format!(
                "{HEAD}client -> upstream [... 97 bytes not captured (tap queue full) ...]\n\
                 {HEAD}client -> upstream [... 50 bytes not captured (snaplen) ...]\n\
                 {HEAD}FIN from client after 150 bytes\n"
            )
        );
        let reset = render(
            &mut s,
            TapEvent::Reset {
                side: Side::Upstream,
                offsets: [150, 0],
            },
        );
        assert_eq!(
            reset,
            format!(
                "{HEAD}RESET by upstream (client -> upstream 150 bytes, upstream -> client 0 bytes)\n"
            )
        );
        let close = render(
            &mut s,
            TapEvent::Close {
                kind: CloseKind::Reset(Side::Upstream),
                offsets: [150, 0],
                dropped_records: 1,
                dropped_bytes: 97,
            },
        );
        assert_eq!(
            close,
            format!(
                "{HEAD}close: reset by upstream, client -> upstream 150 bytes, upstream -> client 0 bytes, tap dropped 1 records (97 bytes)\n"
            )
        );
        assert!(s.next.is_empty(), "state is forgotten at Close");
    }

    #[test]
    fn records_without_open_render_and_colour_only_on_request() {
        let mut s = TextSink::new(Box::new(io::sink()), true, None);
        let out = render(
            &mut s,
            TapEvent::Fin {
                dir: Direction::UpToDown,
                offset: 0,
            },
        );
        assert!(out.contains("\x1b["));
        assert!(out.contains("FIN from upstream"));
        let mut plain = sink(None);
        let out = render(
            &mut plain,
            TapEvent::Fin {
                dir: Direction::UpToDown,
                offset: 0,
            },
        );
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn split_gap_parts() {
        assert_eq!(split_gap(None, 10, 30), (20, 0));
        assert_eq!(split_gap(Some(20), 10, 30), (10, 10));
        assert_eq!(split_gap(Some(5), 10, 30), (0, 20));
        assert_eq!(split_gap(Some(50), 10, 30), (20, 0));
    }
}
