//! The human-readable live log: renders records as text lines.
//!
//! Format (one header line per record, then the payload for data records):
//!
//! ```text
//! 2024-05-01T12:00:00.123456Z #7 10.0.0.1:50000 -> 10.0.0.2:80 open (route web)
//! 2024-05-01T12:00:00.123500Z #7 10.0.0.1:50000 -> 10.0.0.2:80 client -> upstream 18 bytes
//!   > GET / HTTP/1.1
//!   > Host: x
//! 2024-05-01T12:00:00.124000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 upstream -> client [... 1234 bytes not captured (tap behind) ...]
//! 2024-05-01T12:00:00.124000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 upstream -> client 20 bytes
//!   < 000004d2  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|
//!   < 000004e2  10 11 12 13                                       |....|
//! 2024-05-01T12:00:00.125000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 FIN from client after 18 bytes
//! 2024-05-01T12:00:00.126000Z #7 10.0.0.1:50000 -> 10.0.0.2:80 close: closed, client -> upstream 18 bytes, upstream -> client 1254 bytes, tap dropped 1 records (1234 bytes)
//! ```
//!
//! Invariants:
//! - A payload is shown as text when at most 1 byte in [`TEXT_BAD_RATIO`] is invalid UTF-8 or
//!   part of a control character other than tab, CR and LF (a character cut off at the end does
//!   not count, see below): one output line per input line, a CR right before an LF is not
//!   shown, any other control or invalid byte is escaped as `\xNN` (a lone CR as `\r`), and the
//!   invisible format characters that reorder or hide text on a terminal (bidi controls,
//!   zero-width characters, line and paragraph separators: [`is_format`]) as `\u{202e}`.
//!   Otherwise it is shown as a `hexdump -C` style dump whose offsets are stream offsets of that
//!   direction.
//! - A text chunk that ends inside a UTF-8 character holds those (at most 3) bytes back; the next
//!   chunk of that direction shows them in front of its own when it starts where they end (a
//!   hexdump then starts at their offset), so a character split across reads is shown whole.
//!   Anything else that comes first in that direction (a gap, a FIN, a reset, the close) shows
//!   them as `\xNN` escapes on a line of their own before it, and a chunk that reaches snaplen
//!   holds nothing back: no byte is lost or moved. Header byte counts are those of the chunk.
//! - Per connection and direction the sink remembers the next expected stream offset; a record
//!   starting (or a Fin/Reset/Close ending) past it gets a "not captured" marker line first, split
//!   into the part lost on a full queue and the part beyond snaplen. The chunk that reaches
//!   snaplen is followed by a line saying so, at once. The state of a connection
//!   is forgotten at its Close record; records of a connection whose Open was lost are rendered
//!   the same way (every record carries its `ConnMeta`).
//! - ANSI colours are used only when the caller says so (stdout that is a terminal).
//! - Rendering is linear in the payload, with no formatting machinery per byte: the dump, the
//!   escapes and the timestamp are written from lookup tables, and the part of the line start
//!   that names the connection is rendered once per connection.

use std::collections::hash_map::Entry;
use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use super::record::{ConnMeta, Direction, TapEvent, TapRecord};
use super::tracked::{IdMap, Tracked};

/// Payloads whose share of non-text bytes is at most 1/`TEXT_BAD_RATIO` are shown as text.
const TEXT_BAD_RATIO: usize = 32;

/// The bytes a text chunk ended with that start a UTF-8 character the chunk does not complete.
#[derive(Clone, Copy, Default)]
struct Held {
    bytes: [u8; 3],
    len: u8,
}

impl Held {
    fn new(tail: &[u8]) -> Held {
        let mut held = Held::default();
        held.bytes[..tail.len()].copy_from_slice(tail);
        held.len = tail.len() as u8;
        held
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

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

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What the sink remembers of a connection until its Close record.
struct ConnText {
    /// Next expected stream offset per direction.
    next: [u64; 2],
    /// Per direction, the start of a character the last chunk ended inside of, not shown yet: it
    /// lies just before `next`, and the next chunk, if it starts at `next`, shows it first.
    held: [Held; 2],
    /// `#id downstream -> upstream `, the part of every line start that names the connection.
    name: String,
}

/// Where a connection's log stands: [`ConnText::next`] and [`ConnText::held`].
type Position = ([u64; 2], [Held; 2]);

/// Renders records into text and writes each batch with one `write_all`.
pub(crate) struct TextSink {
    out: Box<dyn Write + Send>,
    palette: &'static Palette,
    snaplen: Option<u64>,
    /// Reused render buffer (one batch). Bytes, not a `String`: everything appended is UTF-8
    /// (text the sink checked or built), and appending bytes spares a validation per piece.
    buf: Vec<u8>,
    /// Per connection id.
    conns: Tracked<ConnText>,
    /// The timestamp up to the seconds (`2024-05-01T12:00:00`) of the last record's second.
    second: Option<(u64, String)>,
    /// The payload line lead (`  > `, coloured or not) per direction.
    leads: [String; 2],
    /// Reused buffer joining held bytes and the chunk that follows them.
    joined: Vec<u8>,
    /// When this process opened the log file, until the line saying so is written (see
    /// [`TextSink::opening_line`]).
    opened: Option<SystemTime>,
    /// For each connection of the batch being written, its state before the batch (none for a
    /// connection the batch starts): what a failed write puts back.
    before: IdMap<Option<Position>>,
}

impl TextSink {
    pub(crate) fn new(out: Box<dyn Write + Send>, color: bool, snaplen: Option<u64>) -> TextSink {
        let palette = if color { &COLOR } else { &PLAIN };
        let leads = Direction::BOTH.map(|dir| {
            format!(
                "  {}{}{} ",
                dir_color(palette, dir),
                dir_mark(dir),
                palette.reset
            )
        });
        TextSink {
            out,
            palette,
            snaplen,
            buf: Vec::new(),
            conns: Tracked::new(),
            second: None,
            leads,
            joined: Vec::new(),
            opened: None,
            before: IdMap::default(),
        }
    }

    /// Starts the log with a line naming this process, written with the first batch: a log
    /// file is appended to across runs, and connection ids start again at #1 in each, so the
    /// line tells the runs apart.
    pub(crate) fn opening_line(mut self, opened: SystemTime) -> TextSink {
        self.opened = Some(opened);
        self
    }

    /// Renders the batch into the reused buffer and writes it with one write and one flush.
    pub(crate) fn write_batch<'a>(
        &mut self,
        batch: impl IntoIterator<Item = &'a TapRecord>,
    ) -> io::Result<()> {
        self.buf.clear();
        if let Some(opened) = self.opened {
            let p = self.palette;
            self.buf.extend_from_slice(p.dim.as_bytes());
            self.timestamp(opened);
            self.buf.extend_from_slice(p.reset.as_bytes());
            let _ = writeln!(
                self.buf,
                " tcptap {} (pid {}) opened this log",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            );
        }
        self.before.clear();
        for record in batch {
            let id = record.conn.id;
            if let Entry::Vacant(slot) = self.before.entry(id) {
                slot.insert(self.conns.get(id).map(|c| (c.next, c.held)));
            }
            self.render(record);
        }
        let result = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush());
        if result.is_ok() {
            self.opened = None;
        } else {
            self.undo_batch();
        }
        if self.buf.capacity() > 16 << 20 {
            self.buf = Vec::new();
        }
        result
    }

    /// After a failed write (the file is cut back to before the batch): each connection's
    /// offsets go back to where they were, so that its next record shows the bytes the batch
    /// held as not captured, rather than going on as if they had been written. A connection the
    /// batch started is forgotten (its next record shows the gap from the start); one the batch
    /// closed stays closed.
    fn undo_batch(&mut self) {
        for (id, saved) in self.before.drain() {
            match saved {
                Some((next, held)) => {
                    if let Some(conn) = self.conns.get_mut(id) {
                        (conn.next, conn.held) = (next, held);
                    }
                }
                None => {
                    self.conns.remove(id);
                }
            }
        }
    }

    /// Appends the text of one record to the buffer.
    pub(crate) fn render(&mut self, record: &TapRecord) {
        let id = record.conn.id;
        match &record.event {
            // The log starts at the open; a capture shows when the SYN went out.
            TapEvent::Connect => {}
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
                let mut held = self.take_held(record, *dir, *offset);
                if !continues(held.as_slice(), bytes) {
                    // Not the rest of that character (Latin-1 text, say): shown on its own, so
                    // that it does not count against this chunk being text.
                    self.write_held(record, *dir, held);
                    held = Held::default();
                }
                self.catch_up(record, *dir, *offset);
                let end = offset.saturating_add(bytes.len() as u64);
                self.advance(record, *dir, end);
                self.dir_line(record, *dir, format_args!("{} bytes", bytes.len()));
                // Held bytes are shown in front of the chunk: the bytes shown start that much
                // before the chunk's offset.
                let mut joined = std::mem::take(&mut self.joined);
                let shown = if held.len == 0 {
                    bytes.as_slice()
                } else {
                    joined.clear();
                    joined.extend_from_slice(held.as_slice());
                    joined.extend_from_slice(bytes);
                    joined.as_slice()
                };
                let base = offset.wrapping_sub(u64::from(held.len));
                // A character cut at the end does not count against the text (its end is likely
                // in the next chunk), and waits for that chunk unless none can follow: past
                // snaplen nothing more of this direction is captured.
                let tail = incomplete_tail(shown);
                let judged = &shown[..shown.len() - tail];
                let more = self.snaplen.is_none_or(|limit| end < limit);
                let (body, kept) = if more {
                    shown.split_at(shown.len() - tail)
                } else {
                    (shown, &[][..])
                };
                let lead = &self.leads[dir.index()];
                // Clean text is the common case and the cheapest to check and render.
                let clean = render_clean_text(&mut self.buf, lead, body);
                if clean || is_text(judged) {
                    if !clean {
                        render_text(&mut self.buf, lead, body);
                    }
                    if !kept.is_empty() {
                        conn_text(&mut self.conns, record).held[dir.index()] = Held::new(kept);
                    }
                } else {
                    render_hex(&mut self.buf, lead, base, shown);
                }
                self.joined = joined;
                if !more {
                    // Said now, not at the end of the connection: until then nothing would show
                    // that this direction goes on uncaptured.
                    let p = self.palette;
                    self.dir_line(
                        record,
                        *dir,
                        format_args!(
                            "{}[... snaplen ({end} bytes) reached: later bytes not captured ...]{}",
                            p.gap, p.reset
                        ),
                    );
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
                ..
            } => {
                for dir in Direction::BOTH {
                    self.catch_up(record, dir, offsets[dir.index()]);
                }
                if let Some(sides) = kind.reset_by_proxy() {
                    self.header(record);
                    let p = self.palette;
                    let _ = writeln!(
                        self.buf,
                        "{}RESET by proxy{} to {sides} ({kind})",
                        p.alert, p.reset
                    );
                }
                self.header(record);
                self.conns.remove(id);
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
        self.buf.extend_from_slice(p.dim.as_bytes());
        self.timestamp(record.time);
        self.buf.extend_from_slice(p.reset.as_bytes());
        self.buf.push(b' ');
        // Connections with data have their name rendered once; other records (an Open, or a
        // Close whose connection sent nothing) format it here and leave no state behind, so a
        // lost Close leaks nothing for them.
        match self.conns.get(record.conn.id) {
            Some(known) => self.buf.extend_from_slice(known.name.as_bytes()),
            None => {
                let _ = write!(self.buf, "{}", conn_name(&record.conn));
            }
        }
    }

    /// Appends `time` as RFC 3339 in UTC with microseconds (`2024-05-01T12:00:00.123456Z`), or
    /// as seconds since the epoch outside the years RFC 3339 can show (see [`outside_rfc3339`]).
    fn timestamp(&mut self, time: SystemTime) {
        let since = match time.duration_since(UNIX_EPOCH) {
            Ok(since) if since.as_secs() <= LAST_RFC3339_SECOND => since,
            _ => {
                let text = outside_rfc3339(time, 6).unwrap_or_default();
                self.buf.extend_from_slice(text.as_bytes());
                return;
            }
        };
        let secs = since.as_secs();
        let second = match &self.second {
            Some((s, text)) if *s == secs => text,
            _ => {
                let mut text = String::new();
                let _ = std::fmt::Write::write_fmt(
                    &mut text,
                    format_args!("{}", humantime::format_rfc3339_seconds(UNIX_EPOCH + since)),
                );
                text.pop(); // the `Z`
                &self.second.insert((secs, text)).1
            }
        };
        self.buf.extend_from_slice(second.as_bytes());
        let mut micros = [b'.', b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
        let mut left = since.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (left % 10) as u8;
            left /= 10;
        }
        self.buf.extend_from_slice(&micros);
    }

    /// Takes the bytes held back for `dir` if a chunk at `offset` continues them (it starts
    /// where they end); otherwise leaves them to [`TextSink::catch_up`].
    fn take_held(&mut self, record: &TapRecord, dir: Direction, offset: u64) -> Held {
        match self.conns.get_mut(record.conn.id) {
            Some(conn) if conn.next[dir.index()] == offset => {
                std::mem::take(&mut conn.held[dir.index()])
            }
            _ => Held::default(),
        }
    }

    /// Shows the bytes still held back for `dir` (no chunk continued them) as escapes, then, if
    /// `offset` is past the next expected offset of `dir`, writes "not captured" markers for the
    /// gap and moves the expectation to `offset`.
    fn catch_up(&mut self, record: &TapRecord, dir: Direction, offset: u64) {
        self.flush_held(record, dir);
        let expected = self
            .conns
            .get(record.conn.id)
            .map_or(0, |c| c.next[dir.index()]);
        if offset <= expected {
            return;
        }
        let (queue, snap) = split_gap(self.snaplen, expected, offset);
        for (len, why) in [(queue, "tap behind"), (snap, "snaplen")] {
            if len == 0 {
                continue;
            }
            let p = self.palette;
            self.dir_line(
                record,
                dir,
                format_args!(
                    "{}[... {len} bytes not captured ({why}) ...]{}",
                    p.gap, p.reset
                ),
            );
        }
        self.advance(record, dir, offset);
    }

    /// A line of `record`'s connection about direction `dir`: the header, the direction, `what`.
    fn dir_line(&mut self, record: &TapRecord, dir: Direction, what: std::fmt::Arguments<'_>) {
        self.header(record);
        let p = self.palette;
        let _ = writeln!(
            self.buf,
            "{}{}{} {what}",
            dir_color(p, dir),
            dir_name(dir),
            p.reset
        );
    }

    /// Writes the bytes held back for `dir`, if any, as `\xNN` escapes under a line of their
    /// own: what comes next in that direction does not continue them, and they are shown before
    /// it, in stream order.
    fn flush_held(&mut self, record: &TapRecord, dir: Direction) {
        let Some(conn) = self.conns.get_mut(record.conn.id) else {
            return;
        };
        let held = std::mem::take(&mut conn.held[dir.index()]);
        self.write_held(record, dir, held);
    }

    /// Writes `held` (if any) as `\xNN` escapes under a line of its own.
    fn write_held(&mut self, record: &TapRecord, dir: Direction, held: Held) {
        if held.len == 0 {
            return;
        }
        self.dir_line(
            record,
            dir,
            format_args!("incomplete character at the end of the last chunk"),
        );
        self.buf
            .extend_from_slice(self.leads[dir.index()].as_bytes());
        for &b in held.as_slice() {
            push_hex_escape(&mut self.buf, b);
        }
        self.buf.push(b'\n');
    }

    fn advance(&mut self, record: &TapRecord, dir: Direction, end: u64) {
        let next = &mut conn_text(&mut self.conns, record).next[dir.index()];
        *next = (*next).max(end);
    }
}

/// The state of the record's connection, made on its first data (or gap). The name is taken
/// from that record: a connection's `ConnMeta` does not change once it is proxying.
fn conn_text<'a>(conns: &'a mut Tracked<ConnText>, record: &TapRecord) -> &'a mut ConnText {
    conns.get_or_insert_with(record.conn.id, || ConnText {
        next: [0; 2],
        held: [Held::default(); 2],
        name: conn_name(&record.conn),
    })
}

/// `#id downstream -> upstream `.
fn conn_name(conn: &ConnMeta) -> String {
    format!("#{} {} -> {} ", conn.id, conn.downstream, conn.upstream)
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

/// Whether `c` is an invisible format character that can reorder or hide text on a terminal
/// ("Trojan Source"): the bidi controls (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069),
/// zero-width characters (U+200B–U+200D, U+2060–U+2064, U+FEFF), the line and paragraph
/// separators (U+2028, U+2029), and their invisible neighbours: the rest of U+2060–U+206F, the
/// Mongolian vowel separator (U+180E), the interlinear annotation controls (U+FFF9–U+FFFB) and
/// the tag characters (U+E0000–U+E007F), which can carry hidden ASCII. They are escaped as
/// `\u{...}`. Unlike control characters they do not count against a payload being text: they
/// are text (U+200C and U+200D join Persian words and emoji), and escaped they are harmless.
fn is_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x61c
            | 0x180e
            | 0x200b..=0x200f
            | 0x2028..=0x202e
            | 0x2060..=0x206f
            | 0xfeff
            | 0xfff9..=0xfffb
            | 0xe0000..=0xe007f
    )
}

/// Whether `text` may hold a character of [`is_format`]: it has one of their UTF-8 lead bytes.
/// One branch-free pass, which spares the check per character to most text that is not ASCII
/// (Latin, Cyrillic, CJK).
fn may_hold_format(text: &[u8]) -> bool {
    text.iter().fold(false, |any, &b| {
        any | (b == 0xd8) | (b == 0xe1) | (b == 0xe2) | (b == 0xef) | (b == 0xf3)
    })
}

/// Whether `next` continues the incomplete character `held` (or cannot tell yet); true when
/// nothing is held.
fn continues(held: &[u8], next: &[u8]) -> bool {
    if held.is_empty() {
        return true;
    }
    let mut probe = [0u8; 4];
    let take = next.len().min(4 - held.len());
    probe[..held.len()].copy_from_slice(held);
    probe[held.len()..held.len() + take].copy_from_slice(&next[..take]);
    match std::str::from_utf8(&probe[..held.len() + take]) {
        Ok(_) => true,
        Err(e) => e.valid_up_to() > 0 || e.error_len().is_none(),
    }
}

/// The length (0 to 3) of the end of `bytes` that starts a UTF-8 character without completing
/// it: bytes that the next chunk can make a valid character of.
fn incomplete_tail(bytes: &[u8]) -> usize {
    // Only a byte of 0x80 or more can be part of a character of several bytes.
    if bytes.last().is_none_or(|&b| b < 0x80) {
        return 0;
    }
    (1..=bytes.len().min(3))
        .find(|&n| {
            // Not valid, but only for the lack of bytes after it.
            matches!(
                std::str::from_utf8(&bytes[bytes.len() - n..]),
                Err(e) if e.valid_up_to() == 0 && e.error_len().is_none()
            )
        })
        .unwrap_or(0)
}

/// True when `bytes` is (almost) all printable UTF-8, tab, CR and LF.
pub(crate) fn is_text(bytes: &[u8]) -> bool {
    let limit = bytes.len() / TEXT_BAD_RATIO;
    if bytes.is_ascii() {
        let bad: usize = bytes
            .chunks(255)
            .map(|chunk| {
                usize::from(count_bytes(chunk, |b| {
                    b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n') || b == 0x7f
                }))
            })
            .sum();
        return bad <= limit;
    }
    // Decided as soon as `bad` passes the limit (binary data after a few bytes).
    let mut bad = 0usize;
    for chunk in bytes.utf8_chunks() {
        bad += chunk.invalid().len();
        for c in chunk.valid().chars() {
            if c.is_control() && !allowed_control(c) {
                bad += c.len_utf8();
            }
        }
        if bad > limit {
            return false;
        }
    }
    true
}

/// How many of at most 255 bytes match `pred`, branch-free so that the compiler runs it over
/// many bytes at a time.
fn count_bytes(bytes: &[u8], pred: impl Fn(u8) -> bool) -> u8 {
    bytes
        .iter()
        .fold(0u8, |n, &b| n.wrapping_add(u8::from(pred(b))))
}

/// The lines of `bytes`: each ends after its newline, a last line without one with the bytes.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let unterminated = bytes.last().is_some_and(|&b| b != b'\n');
    let ends = memchr::memchr_iter(b'\n', bytes).map(|i| i + 1);
    let mut start = 0;
    ends.chain(unterminated.then_some(bytes.len()))
        .map(move |end| {
            let line = &bytes[start..end];
            start = end;
            line
        })
}

/// A line without its line end (LF or CR LF).
fn content(line: &[u8]) -> &[u8] {
    match line.strip_suffix(b"\n") {
        Some(content) => content.strip_suffix(b"\r").unwrap_or(content),
        None => line,
    }
}

/// Renders `bytes` line by line, each prefixed with `lead`, if it is printable ASCII, tabs and
/// line ends (LF, or CR LF) only, the usual text protocol, whose lines are shown as they are.
/// Otherwise appends nothing and returns false. The checks are branch-free passes, which the
/// compiler runs over many bytes at a time.
fn render_clean_text(out: &mut Vec<u8>, lead: &str, bytes: &[u8]) -> bool {
    let mut other = 0u8;
    let mut crs = 0usize;
    for chunk in bytes.chunks(128) {
        let mut chunk_crs = 0u8;
        for &b in chunk {
            // `|`, not `||`: no branch per byte.
            // Printable ASCII but the backslash (shown as `\\`), tab, line ends.
            let shown = ((b.wrapping_sub(0x20) < 0x5f) & (b != b'\\'))
                | (b == b'\t')
                | (b == b'\n')
                | (b == b'\r');
            other |= u8::from(!shown);
            chunk_crs += u8::from(b == b'\r');
        }
        crs += usize::from(chunk_crs);
    }
    if other != 0 {
        return false;
    }
    let start = out.len();
    let mut crlfs = 0;
    for line in lines(bytes) {
        let content = content(line);
        crlfs += usize::from(line.len() - content.len() == 2);
        out.extend_from_slice(lead.as_bytes());
        out.extend_from_slice(content);
        out.push(b'\n');
    }
    // A CR anywhere but before an LF is shown escaped: not for this path.
    if crlfs != crs {
        out.truncate(start);
        return false;
    }
    true
}

/// Renders text line by line, each prefixed with `lead`, escaping what is not shown as is.
fn render_text(out: &mut Vec<u8>, lead: &str, bytes: &[u8]) {
    for line in lines(bytes) {
        out.extend_from_slice(lead.as_bytes());
        escape_into(out, content(line));
        out.push(b'\n');
    }
}

/// Appends `bytes` as text, escaping control characters (except tab) and invalid UTF-8 as
/// `\xNN`, CR as `\r`, format characters ([`is_format`]) as `\u{NNNN}` and the backslash itself
/// as `\\`, so that what reads as an escape is one and what the terminal shows is what was sent.
fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    // The common case, a line of printable ASCII (and tabs): one pass, branch-free, one copy.
    let plain = bytes.iter().fold(true, |plain, &b| {
        plain & !((b < 0x20 && b != b'\t') || b >= 0x7f || b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        return;
    }
    for chunk in bytes.utf8_chunks() {
        let text = chunk.valid();
        let formats = may_hold_format(text.as_bytes());
        // Runs of characters shown as they are go in with one copy.
        let mut shown = 0;
        for (i, c) in text.char_indices() {
            let format = formats && is_format(c);
            if (!c.is_control() || c == '\t') && c != '\\' && !format {
                continue;
            }
            out.extend_from_slice(&text.as_bytes()[shown..i]);
            if c == '\r' {
                out.extend_from_slice(b"\\r");
            } else if c == '\\' {
                out.extend_from_slice(b"\\\\");
            } else if format {
                push_unicode_escape(out, c);
            } else {
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    push_hex_escape(out, b);
                }
            }
            shown = i + c.len_utf8();
        }
        out.extend_from_slice(&text.as_bytes()[shown..]);
        for &b in chunk.invalid() {
            push_hex_escape(out, b);
        }
    }
}

/// Appends `\xNN`.
fn push_hex_escape(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]);
}

/// Appends `\u{N...}`: the code point in lowercase hex without leading zeros, as Rust writes it.
fn push_unicode_escape(out: &mut Vec<u8>, c: char) {
    let code = u32::from(c);
    let digits = (32 - code.leading_zeros()).div_ceil(4).max(1);
    out.extend_from_slice(b"\\u{");
    for shift in (0..digits).rev() {
        out.push(HEX[(code >> (shift * 4)) as usize & 0xf]);
    }
    out.push(b'}');
}

/// Renders a `hexdump -C` style dump; offsets start at the stream offset `base`.
fn render_hex(out: &mut Vec<u8>, lead: &str, base: u64, bytes: &[u8]) {
    // One row: offset (8 digits unless larger), 2 spaces, 16 columns of 3 with one more space
    // after the 8th, ` |`, up to 16 characters, `|` and a newline.
    const ROW: usize = 8 + 2 + 16 * 3 + 1 + 2 + 16 + 2;
    for (row_index, row) in bytes.chunks(16).enumerate() {
        out.extend_from_slice(lead.as_bytes());
        let offset = base.wrapping_add(row_index as u64 * 16);
        let mut line = [b' '; ROW];
        let mut n = 0;
        if offset > u64::from(u32::MAX) {
            let _ = write!(out, "{offset:x}");
        } else {
            for shift in (0..8).rev() {
                line[n] = HEX[(offset >> (shift * 4)) as usize & 0xf];
                n += 1;
            }
        }
        n += 2;
        for (i, b) in row.iter().enumerate() {
            let at = n + i * 3 + usize::from(i >= 8);
            line[at] = HEX[usize::from(b >> 4)];
            line[at + 1] = HEX[usize::from(b & 0xf)];
        }
        n += 16 * 3 + 1 + 1;
        line[n] = b'|';
        n += 1;
        for &b in row {
            line[n] = if b.is_ascii_graphic() || b == b' ' {
                b
            } else {
                b'.'
            };
            n += 1;
        }
        line[n] = b'|';
        line[n + 1] = b'\n';
        out.extend_from_slice(&line[..n + 2]);
    }
}

/// 9999-12-31T23:59:59Z, the last second an RFC 3339 date can show.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// `time` as seconds since the epoch with `digits` decimals (`@-86400.000`) when it lies outside
/// the years 1970–9999, which RFC 3339 dates cannot show (humantime panics on them); `None` when
/// RFC 3339 can show it. A clock set before 1970 must not stop a log.
pub(crate) fn outside_rfc3339(time: SystemTime, digits: u32) -> Option<String> {
    let (sign, d) = match time.duration_since(UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= LAST_RFC3339_SECOND => return None,
        Ok(after) => ("", after),
        Err(before) => ("-", before.duration()),
    };
    let digits = digits.min(9);
    if digits == 0 {
        return Some(format!("@{sign}{}", d.as_secs()));
    }
    let fraction = d.subsec_nanos() / 10u32.pow(9 - digits);
    Some(format!(
        "@{sign}{}.{fraction:0width$}",
        d.as_secs(),
        width = digits as usize
    ))
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

    #[test]
    fn the_opening_line_comes_once_before_the_first_records() {
        #[derive(Clone, Default)]
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let opened = SystemTime::UNIX_EPOCH + Duration::from_micros(1_714_564_799_000_001);
        let mut s = TextSink::new(Box::new(out.clone()), false, None).opening_line(opened);
        s.write_batch(&[rec(TapEvent::Open)]).unwrap();
        s.write_batch(&[rec(TapEvent::Open)]).unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "2024-05-01T11:59:59.000001Z tcptap {} (pid {}) opened this log",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            )
        );
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].ends_with(" open (route web)"), "{text}");
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
        utf8(&sink.buf)
    }

    /// The rendered bytes as text, checking they are UTF-8.
    fn utf8(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).expect("the log is UTF-8")
    }

    fn sink(snaplen: Option<u64>) -> TextSink {
        TextSink::new(Box::new(io::sink()), false, snaplen)
    }

    const HEAD: &str = "2024-05-01T12:00:00.123456Z #7 10.0.0.1:50000 -> [2001:db8::2]:80 ";

    /// An output whose writes fail while `fail` is set, keeping what it was given otherwise.
    #[derive(Clone, Default)]
    struct Flaky {
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
        out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The bytes of a batch whose write failed (a full disk: the file is cut back to before it)
    /// are shown as not captured at the connection's next record, not skipped over as if they
    /// had been written; a connection the failed batch started shows them from its start.
    #[test]
    fn a_failed_write_leaves_a_gap_marker_not_a_silent_jump() {
        let flaky = Flaky::default();
        let mut s = TextSink::new(Box::new(flaky.clone()), false, None);
        let c = crate::tap::testutil::conn(7, "10.0.0.1:50000", "[2001:db8::2]:80");
        let d = crate::tap::testutil::conn(8, "10.0.0.1:50001", "[2001:db8::2]:80");
        let data = |c, t, offset, bytes: &[u8]| {
            let event = TapEvent::Data {
                dir: Direction::DownToUp,
                offset,
                bytes: bytes.to_vec(),
            };
            crate::tap::testutil::record(c, t, event)
        };
        s.write_batch(&[data(&c, 1, 0, b"first\n")]).unwrap();
        flaky.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let lost = [data(&c, 2, 6, b"second...\n"), data(&d, 3, 0, b"new one\n")];
        assert!(s.write_batch(&lost).is_err());
        flaky
            .fail
            .store(false, std::sync::atomic::Ordering::Relaxed);
        s.write_batch(&[data(&c, 4, 16, b"third\n"), data(&d, 5, 8, b"more\n")])
            .unwrap();
        let text = String::from_utf8(flaky.out.lock().unwrap().clone()).unwrap();
        assert!(
            !text.contains("second") && !text.contains("new one"),
            "{text}"
        );
        let gaps: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("not captured"))
            .collect();
        assert_eq!(gaps.len(), 2, "{text}");
        assert!(
            gaps[0].contains("#7 ") && gaps[0].contains("[... 10 bytes"),
            "{text}"
        );
        assert!(
            gaps[1].contains("#8 ") && gaps[1].contains("[... 8 bytes"),
            "{text}"
        );
    }

    /// Connections whose Close record was dropped leave their state behind: past the limit the
    /// least recently heard of are forgotten, so the writer's memory stays bounded.
    #[test]
    fn connections_whose_close_was_lost_are_forgotten_past_the_limit() {
        let mut s = sink(None);
        s.conns = Tracked::with_limit(64);
        for id in 1..=1000u64 {
            let c = crate::tap::testutil::conn(id, "10.0.0.1:50000", "10.0.0.2:80");
            let r = crate::tap::testutil::record(
                &c,
                id,
                TapEvent::Data {
                    dir: Direction::DownToUp,
                    offset: 0,
                    bytes: b"request\n".to_vec(),
                },
            );
            s.write_batch(&[r]).expect("write");
            assert!(s.conns.len() <= 64);
        }
        assert_eq!(s.conns.forgotten() + s.conns.len() as u64, 1000);
        assert!(s.conns.get(1000).is_some(), "the most recent is kept");
    }

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
        let mut out = Vec::new();
        escape_into(&mut out, "é\u{1b}[0m".as_bytes());
        assert_eq!(utf8(&out), "é\\x1b[0m");
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
            "{HEAD}upstream -> client [... 1234 bytes not captured (tap behind) ...]\n\
             {HEAD}upstream -> client 20 bytes\n\
             \x20 < 000004d2  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|\n\
             \x20 < 000004e2  10 11 12 13                                       |....|\n"
        );
        assert_eq!(out, expected);
        // Exactly like `hexdump -C` for a mixed row.
        let mut hex = Vec::new();
        render_hex(&mut hex, "", 0, b"hello\x00world");
        assert_eq!(
            utf8(&hex),
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
                "{HEAD}client -> upstream [... 97 bytes not captured (tap behind) ...]\n\
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
        assert!(s.conns.is_empty(), "state is forgotten at Close");
    }

    #[test]
    fn resets_by_the_proxy_are_shown_before_the_close() {
        let close = |kind| TapEvent::Close {
            kind,
            offsets: [5, 7],
            dropped_records: 0,
            dropped_bytes: 0,
        };
        for (kind, line) in [
            (
                CloseKind::IdleTimeout,
                "RESET by proxy to client and upstream (idle timeout)",
            ),
            (
                CloseKind::Shutdown,
                "RESET by proxy to client and upstream (aborted at shutdown)",
            ),
            (
                CloseKind::ConnectFailed,
                "RESET by proxy to client (upstream connect failed)",
            ),
        ] {
            let mut s = sink(None);
            assert_eq!(
                render(&mut s, close(kind)),
                format!(
                    "{HEAD}client -> upstream [... 5 bytes not captured (tap behind) ...]\n\
                     {HEAD}upstream -> client [... 7 bytes not captured (tap behind) ...]\n\
                     {HEAD}{line}\n\
                     {HEAD}close: {kind}, client -> upstream 5 bytes, upstream -> client 7 bytes, tap dropped 0 records (0 bytes)\n"
                )
            );
        }
        // A clean close, or one a peer's Reset record told about, gets no such line.
        for kind in [
            CloseKind::Normal,
            CloseKind::Reset(Side::Downstream),
            CloseKind::Error(Side::Upstream),
        ] {
            let mut s = sink(None);
            assert!(!render(&mut s, close(kind)).contains("RESET"), "{kind}");
        }
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
        assert!(out.contains("#7 10.0.0.1:50000 -> [2001:db8::2]:80 FIN"));
        // Records of a connection that sent nothing leave no state behind, in case its Close
        // is lost.
        render(&mut plain, TapEvent::Open);
        assert!(plain.conns.is_empty());
    }

    /// A held byte that the next chunk does not continue (Latin-1 text) is shown on its own,
    /// and the next chunk still reads as text.
    #[test]
    fn a_held_byte_the_next_chunk_does_not_continue_is_shown_alone() {
        let mut s = sink(None);
        let mut out = String::new();
        for (offset, bytes) in [(0u64, &b"un caf\xe9"[..]), (7, b"\r\nau lait\r\n")] {
            out += &render(
                &mut s,
                TapEvent::Data {
                    dir: Direction::DownToUp,
                    offset,
                    bytes: bytes.to_vec(),
                },
            );
        }
        assert!(out.contains("  > \\xe9\n"), "{out}");
        assert!(out.contains("  > \n  > au lait\n"), "{out}");
        assert!(!out.contains("0000000"), "no hexdump: {out}");
        assert!(!out.contains("[..."), "no gap: {out}");
    }

    #[test]
    fn format_characters_are_escaped() {
        let escaped = |text: &str| {
            let mut out = Vec::new();
            escape_into(&mut out, text.as_bytes());
            utf8(&out)
        };
        for c in [
            // Bidi controls.
            '\u{202a}',
            '\u{202b}',
            '\u{202c}',
            '\u{202d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{200e}',
            '\u{200f}',
            '\u{61c}',
            // Zero-width characters.
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{2060}',
            '\u{2061}',
            '\u{2062}',
            '\u{2063}',
            '\u{2064}',
            '\u{feff}',
            // Line and paragraph separators.
            '\u{2028}',
            '\u{2029}',
            // Tag characters, interlinear annotations, the Mongolian vowel separator.
            '\u{e0001}',
            '\u{e0041}',
            '\u{e007f}',
            '\u{fff9}',
            '\u{180e}',
        ] {
            let code = u32::from(c);
            assert_eq!(escaped(&format!("a{c}b")), format!("a\\u{{{code:x}}}b"));
        }
        // The "Trojan Source" line reads in the log as it is in the data.
        assert_eq!(
            escaped(
                "if access_level != \"user\u{202e} \u{2066}// Check if admin\u{2069} \u{2066}\""
            ),
            "if access_level != \"user\\u{202e} \\u{2066}// Check if admin\\u{2069} \\u{2066}\""
        );
        // Neighbours with the same lead bytes are shown as they are.
        for text in [
            "‰ € … \u{2070} \u{202f} \u{2027}",
            "\u{61b}\u{fefe}\u{fffc}",
            "テスト",
        ] {
            assert_eq!(escaped(text), text);
        }
        // A backslash in the data cannot forge such an escape.
        assert_eq!(escaped("\\u{202e}"), "\\\\u{202e}");
        // Through the sink: escaped on their line, which stays text.
        let mut s = sink(None);
        let out = render(
            &mut s,
            TapEvent::Data {
                dir: Direction::UpToDown,
                offset: 0,
                bytes: "abc\u{202e}def\u{2028}ghi\r\n".as_bytes().to_vec(),
            },
        );
        assert_eq!(
            out,
            format!("{HEAD}upstream -> client 17 bytes\n  < abc\\u{{202e}}def\\u{{2028}}ghi\n")
        );
    }

    /// Format characters are text: Persian words are joined with U+200C and emoji with U+200D,
    /// and the escapes make them harmless, so they do not turn a payload into a hexdump.
    #[test]
    fn format_characters_do_not_make_a_hexdump() {
        let persian = "می\u{200c}خواهم کتاب\u{200c}ها را بخوانم\n";
        assert!(is_text(persian.as_bytes()));
        let family = "👨\u{200d}👩\u{200d}👧";
        assert!(is_text(family.as_bytes()));
        let mut out = Vec::new();
        render_text(&mut out, "", family.as_bytes());
        assert_eq!(utf8(&out), "👨\\u{200d}👩\\u{200d}👧\n");
    }

    /// Renders `chunks` one after the other in one direction from offset 0 and returns each
    /// chunk's rendering.
    fn render_chunks(s: &mut TextSink, chunks: &[&[u8]]) -> Vec<String> {
        let mut offset = 0;
        chunks
            .iter()
            .map(|chunk| {
                let out = render(
                    s,
                    TapEvent::Data {
                        dir: Direction::DownToUp,
                        offset,
                        bytes: chunk.to_vec(),
                    },
                );
                offset += chunk.len() as u64;
                out
            })
            .collect()
    }

    #[test]
    fn a_character_split_across_reads_is_shown_whole() {
        for c in ['é', 'テ', '😀'] {
            let mut utf8_bytes = [0u8; 4];
            let encoded = c.encode_utf8(&mut utf8_bytes).as_bytes();
            // Every way to cut the character into pieces: bit i of `cuts` cuts after byte i.
            for cuts in 1u32..(1 << (encoded.len() - 1)) {
                let mut pieces = vec![b"ab".to_vec()];
                for (i, &b) in encoded.iter().enumerate() {
                    pieces.last_mut().unwrap().push(b);
                    if cuts & (1 << i) != 0 {
                        pieces.push(Vec::new());
                    }
                }
                pieces.last_mut().unwrap().extend_from_slice(b"cd\n");
                let chunks: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
                let mut s = sink(None);
                let outs = render_chunks(&mut s, &chunks);
                let last = outs.len() - 1;
                for (i, out) in outs.iter().enumerate() {
                    // Each header counts the chunk's own bytes.
                    let mut expected =
                        format!("{HEAD}client -> upstream {} bytes\n", chunks[i].len());
                    if i == 0 {
                        expected.push_str("  > ab\n");
                    }
                    if i == last {
                        expected.push_str(&format!("  > {c}cd\n"));
                    }
                    assert_eq!(*out, expected, "{c} cut {cuts:b}, chunk {i}");
                }
                assert!(
                    s.conns
                        .get(7)
                        .unwrap()
                        .held
                        .iter()
                        .all(|held| held.len == 0)
                );
            }
        }
    }

    #[test]
    fn a_small_chunk_ending_inside_a_character_is_text() {
        let mut s = sink(None);
        let outs = render_chunks(&mut s, &[b"ab\xe3", b"\x82\xb9"]);
        assert_eq!(
            outs,
            [
                format!("{HEAD}client -> upstream 3 bytes\n  > ab\n"),
                format!("{HEAD}client -> upstream 2 bytes\n  > ス\n"),
            ]
        );
        // Held bytes that the next chunk does not continue are shown, escaped, on their own
        // before it.
        let mut s = sink(None);
        let outs = render_chunks(
            &mut s,
            &[b"ab\xe3", b"a line of text that goes on and on\n"],
        );
        assert_eq!(
            outs[1],
            format!(
                "{HEAD}client -> upstream incomplete character at the end of the last chunk\n  \
                 > \\xe3\n{HEAD}client -> upstream 35 bytes\n  > a line of text that goes on and on\n"
            )
        );
        // A line end before the cut character ends its line as usual.
        let mut s = sink(None);
        let outs = render_chunks(&mut s, &[b"ab\r\n\xe3", b"\x82\xb9\r\n"]);
        assert_eq!(
            outs,
            [
                format!("{HEAD}client -> upstream 5 bytes\n  > ab\n"),
                format!("{HEAD}client -> upstream 4 bytes\n  > ス\n"),
            ]
        );
        // Bytes that no continuation makes valid are not held.
        for broken in [
            &b"ab\x82"[..],
            b"ab\xc0",
            b"ab\xe3\x82\xb9\xb9",
            b"ab\xed\xa0",
            b"ab\xf5",
        ] {
            assert_eq!(incomplete_tail(broken), 0, "{broken:?}");
        }
        assert_eq!(incomplete_tail(b"ab\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_tail(b"\xe3"), 1);
    }

    #[test]
    fn held_bytes_are_flushed_before_a_fin_a_gap_and_the_close() {
        let flush = |mark: &str| {
            format!(
                "{HEAD}client -> upstream incomplete character at the end of the last chunk\n  {mark} \\xe3\\x82\n"
            )
        };
        let data = |offset, bytes: &[u8]| TapEvent::Data {
            dir: Direction::DownToUp,
            offset,
            bytes: bytes.to_vec(),
        };
        // Then a FIN.
        let mut s = sink(None);
        render(&mut s, data(0, b"ab\xe3\x82"));
        let fin = render(
            &mut s,
            TapEvent::Fin {
                dir: Direction::DownToUp,
                offset: 4,
            },
        );
        assert_eq!(
            fin,
            format!("{}{HEAD}FIN from client after 4 bytes\n", flush(">"))
        );
        // Then a gap: the held bytes come before it; the chunk after it is shown alone.
        let mut s = sink(None);
        render(&mut s, data(0, b"ab\xe3\x82"));
        let after = render(
            &mut s,
            data(10, b"\xb9 and the rest of the line, at length"),
        );
        assert_eq!(
            after,
            format!(
                "{}{HEAD}client -> upstream [... 6 bytes not captured (tap behind) ...]\n\
                 {HEAD}client -> upstream 37 bytes\n  > \\xb9 and the rest of the line, at length\n",
                flush(">")
            )
        );
        // Then a reset and the close, in both directions, and nothing is left behind.
        let mut s = sink(None);
        render(&mut s, data(0, b"ab\xe3\x82"));
        render(
            &mut s,
            TapEvent::Data {
                dir: Direction::UpToDown,
                offset: 0,
                bytes: b"\xe3\x82".to_vec(),
            },
        );
        let reset = render(
            &mut s,
            TapEvent::Reset {
                side: Side::Downstream,
                offsets: [4, 2],
            },
        );
        assert_eq!(
            reset,
            format!(
                "{}{}{HEAD}RESET by client (client -> upstream 4 bytes, upstream -> client 2 bytes)\n",
                flush(">"),
                flush("<").replace("client -> upstream", "upstream -> client")
            )
        );
        let mut s = sink(None);
        render(&mut s, data(0, b"ab\xe3\x82"));
        let close = render(
            &mut s,
            TapEvent::Close {
                kind: CloseKind::Normal,
                offsets: [4, 0],
                dropped_records: 0,
                dropped_bytes: 0,
            },
        );
        assert!(close.starts_with(&flush(">")), "{close:?}");
        assert!(s.conns.is_empty());
    }

    #[test]
    fn a_chunk_reaching_snaplen_holds_nothing_back() {
        let mut s = sink(Some(4));
        let outs = render_chunks(&mut s, &[b"ab\xe3\x82"]);
        assert_eq!(
            outs[0],
            format!(
                "{HEAD}client -> upstream 4 bytes\n  > ab\\xe3\\x82\n\
                 {HEAD}client -> upstream [... snaplen (4 bytes) reached: later bytes not \
                 captured ...]\n"
            )
        );
        assert_eq!(s.conns.get(7).unwrap().held[0].len, 0);
        // Below snaplen it waits for the rest.
        let mut s = sink(Some(5));
        let outs = render_chunks(&mut s, &[b"ab\xe3\x82", b"\xb9"]);
        assert_eq!(
            outs[1],
            format!(
                "{HEAD}client -> upstream 1 bytes\n  > ス\n\
                 {HEAD}client -> upstream [... snaplen (5 bytes) reached: later bytes not \
                 captured ...]\n"
            )
        );
    }

    #[test]
    fn a_hexdump_after_held_bytes_starts_at_their_offset() {
        let mut s = sink(None);
        let mut binary = b"\x82\xb9".to_vec();
        binary.extend(0u8..14);
        let outs = render_chunks(&mut s, &[b"ab\xe3", &binary]);
        assert_eq!(
            outs[1],
            format!(
                "{HEAD}client -> upstream 16 bytes\n\
                 \x20 > 00000002  e3 82 b9 00 01 02 03 04  05 06 07 08 09 0a 0b 0c  |................|\n\
                 \x20 > 00000012  0d                                                |.|\n"
            )
        );
        // A hexdumped chunk holds nothing back: the next one starts at its own offset.
        let mut tail = vec![0u8; 15];
        tail.push(0xe3);
        let outs = render_chunks(&mut sink(None), &[&tail, b"\x82\xb9"]);
        assert!(outs[0].ends_with("|................|\n"), "{:?}", outs[0]);
        assert_eq!(
            outs[1],
            format!(
                "{HEAD}client -> upstream 2 bytes\n\
                 \x20 > 00000010  82 b9                                             |..|\n"
            )
        );
    }

    /// The straightforward renderings, with the formatting machinery, that the table-driven
    /// ones must match byte for byte.
    mod reference {
        use std::fmt::Write as _;

        pub(super) fn is_text(bytes: &[u8]) -> bool {
            let mut bad = 0usize;
            for chunk in bytes.utf8_chunks() {
                bad += chunk.invalid().len();
                bad += chunk
                    .valid()
                    .chars()
                    .filter(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
                    .map(char::len_utf8)
                    .sum::<usize>();
            }
            bad * super::TEXT_BAD_RATIO <= bytes.len()
        }

        /// The characters escaped as `\u{...}`.
        const FORMAT: [(char, char); 8] = [
            ('\u{61c}', '\u{61c}'),
            ('\u{180e}', '\u{180e}'),
            ('\u{200b}', '\u{200f}'),
            ('\u{2028}', '\u{202e}'),
            ('\u{2060}', '\u{206f}'),
            ('\u{feff}', '\u{feff}'),
            ('\u{fff9}', '\u{fffb}'),
            ('\u{e0000}', '\u{e007f}'),
        ];

        pub(super) fn escape_into(out: &mut String, bytes: &[u8]) {
            for chunk in bytes.utf8_chunks() {
                for c in chunk.valid().chars() {
                    if c == '\r' {
                        out.push_str("\\r");
                    } else if c == '\\' {
                        out.push_str("\\\\");
                    } else if FORMAT.iter().any(|&(from, to)| (from..=to).contains(&c)) {
                        let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
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

        pub(super) fn render_text(out: &mut String, lead: &str, bytes: &[u8]) {
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

        pub(super) fn render_hex(out: &mut String, lead: &str, base: u64, bytes: &[u8]) {
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
    }

    /// Deterministic pseudo-random inputs: binary, ASCII text with controls, and UTF-8 with C1
    /// controls, format characters, their neighbours and broken sequences.
    fn samples() -> Vec<Vec<u8>> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: [&[u8]; 17] = [
            b"GET / HTTP/1.1\r\n",
            b"\\",
            b"\t",
            b"\x00",
            b"\x7f",
            "é✓".as_bytes(),
            "\u{85}".as_bytes(),
            b"\xe2\x9c",
            b"\r",
            "\u{202e}\u{2066}".as_bytes(),
            "\u{200b}\u{feff}".as_bytes(),
            "\u{2028}\u{61c}".as_bytes(),
            "\u{e0041}\u{180e}\u{fffb}".as_bytes(),
            // Neighbours with the same lead bytes, shown as they are.
            "\u{200a}\u{2027}\u{202f}\u{2070}".as_bytes(),
            "\u{61b}\u{180f}\u{fefe}\u{fff8}\u{fffc}".as_bytes(),
            "\u{e0080}\u{dffff}€テ".as_bytes(),
            b"\xe2\x80",
        ];
        let mut out = vec![
            Vec::new(),
            b"a".to_vec(),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"line\tone\nline two\r\nthree".to_vec(),
            b"cr\rinside\r\n".to_vec(),
            b"ends with cr\r".to_vec(),
            b"\n".to_vec(),
            b"\r\n\r\n".to_vec(),
            b"a\nb".to_vec(),
            b"a\r\nb\n".to_vec(),
        ];
        for len in [1usize, 7, 8, 15, 16, 17, 31, 33, 100, 1000] {
            out.push((0..len).map(|_| next() as u8).collect());
            let mut mixed = Vec::new();
            while mixed.len() < len {
                let piece = pieces[next() as usize % pieces.len()];
                mixed.extend_from_slice(piece);
                mixed.push(b' ' + (next() % 95) as u8);
            }
            out.push(mixed);
        }
        out
    }

    #[test]
    fn fast_renderings_match_the_reference() {
        for bytes in samples() {
            assert_eq!(is_text(&bytes), reference::is_text(&bytes), "{bytes:?}");
            let (mut fast, mut slow) = (Vec::new(), String::new());
            escape_into(&mut fast, &bytes);
            reference::escape_into(&mut slow, &bytes);
            assert_eq!(utf8(&fast), slow, "{bytes:?}");
            let (mut fast, mut slow) = (Vec::new(), String::new());
            render_text(&mut fast, "  > ", &bytes);
            reference::render_text(&mut slow, "  > ", &bytes);
            assert_eq!(utf8(&fast), slow, "{bytes:?}");
            let mut clean = b"x".to_vec();
            if render_clean_text(&mut clean, "  > ", &bytes) {
                assert_eq!(utf8(&clean), format!("x{slow}"), "{bytes:?}");
            } else {
                assert_eq!(clean, b"x", "nothing appended");
            }
            for base in [0, 0x4d2, u64::from(u32::MAX) - 20, 1 << 40, u64::MAX - 5] {
                let (mut fast, mut slow) = (b"x".to_vec(), String::from("x"));
                render_hex(&mut fast, "  < ", base, &bytes);
                reference::render_hex(&mut slow, "  < ", base, &bytes);
                assert_eq!(utf8(&fast), slow, "{bytes:?} at {base:#x}");
            }
        }
    }

    #[test]
    fn clean_text_is_what_needs_no_escape() {
        let clean = |bytes: &[u8]| render_clean_text(&mut Vec::new(), "", bytes);
        assert!(clean(b"GET / HTTP/1.1\r\nHost: x\tz\r\n\r\n"));
        assert!(clean(b"no line end"));
        assert!(clean(b""));
        assert!(!clean(b"a\rb\n"), "a CR inside a line is escaped");
        assert!(!clean(b"ends with CR\r"));
        assert!(!clean(b"bell\x07"));
        assert!(!clean("é".as_bytes()));
        assert!(!clean(b"del\x7f"));
        assert!(!clean(b"C:\\dir"), "a backslash is escaped");
    }

    #[test]
    fn a_backslash_in_the_payload_does_not_read_as_an_escape() {
        let mut sink = sink(None);
        let out = render(
            &mut sink,
            TapEvent::Data {
                dir: Direction::DownToUp,
                offset: 0,
                bytes: b"path C:\\x00 \\r\n".to_vec(),
            },
        );
        assert!(out.ends_with("  > path C:\\\\x00 \\\\r\n"), "{out:?}");
        let out = render(
            &mut sink,
            TapEvent::Data {
                dir: Direction::DownToUp,
                offset: 12,
                bytes: b"a line of text with a NUL \x00 and a lone CR \r in it\n".to_vec(),
            },
        );
        assert!(
            out.ends_with("  > a line of text with a NUL \\x00 and a lone CR \\r in it\n"),
            "{out:?}"
        );
    }

    #[test]
    fn timestamps_match_humantime() {
        let mut s = sink(None);
        let mut micros = 1_714_564_799_999_990u64;
        // Across second boundaries, in the same second, and back in time.
        for step in [1u64, 3, 5, 999_991, 7, 1_000_000, 86_400_000_000] {
            micros += step;
            for time in [
                UNIX_EPOCH + Duration::from_micros(micros),
                UNIX_EPOCH + Duration::from_micros(micros / 2),
            ] {
                s.buf.clear();
                s.timestamp(time);
                assert_eq!(
                    utf8(&s.buf),
                    humantime::format_rfc3339_micros(time).to_string(),
                    "{time:?}"
                );
            }
        }
        // Nanoseconds below a microsecond are cut, as humantime does.
        let time = UNIX_EPOCH + Duration::new(1_714_564_800, 123_456_789);
        s.buf.clear();
        s.timestamp(time);
        assert_eq!(utf8(&s.buf), "2024-05-01T12:00:00.123456Z");
        // A clock outside what RFC 3339 shows gives seconds since the epoch, not a panic.
        for (time, shown) in [
            (
                UNIX_EPOCH - Duration::new(86_400, 500_000),
                "@-86400.000500",
            ),
            (
                UNIX_EPOCH + Duration::from_secs(253_402_300_800),
                "@253402300800.000000",
            ),
        ] {
            s.buf.clear();
            s.timestamp(time);
            assert_eq!(utf8(&s.buf), shown);
        }
        s.buf.clear();
        s.timestamp(UNIX_EPOCH + Duration::from_secs(253_402_300_799));
        assert_eq!(utf8(&s.buf), "9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn split_gap_parts() {
        assert_eq!(split_gap(None, 10, 30), (20, 0));
        assert_eq!(split_gap(Some(20), 10, 30), (10, 10));
        assert_eq!(split_gap(Some(5), 10, 30), (0, 20));
        assert_eq!(split_gap(Some(50), 10, 30), (20, 0));
    }
}
