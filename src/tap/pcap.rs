//! The pcap sink: turns records into synthesized TCP packets that Wireshark can follow.
//!
//! File format: classic libpcap (magic `0xa1b2c3d4`, little-endian, microsecond timestamps,
//! version 2.4, snaplen 262144), link type `LINKTYPE_ETHERNET` (1) with fixed locally
//! administered MAC addresses (`02:00:00:00:00:01` for the client, `…:02` for the upstream).
//! Ethernet rather than raw IP because every pcap reader decodes it the same way.
//!
//! Each connection is one TCP conversation between `ConnMeta.downstream` and `ConnMeta.upstream`,
//! as if the proxy were not there. Invariants:
//! - Addresses are canonicalized (`::ffff:a.b.c.d` becomes IPv4); if the two sides still differ
//!   in family the IPv4 one is written as IPv4-mapped IPv6. IPv6 connections give IPv6 packets.
//! - The initial sequence numbers derive from the connection id. The sequence number of the byte
//!   at stream offset `o` of direction `d` is `isn[d] + 1 + o`, so bytes that were not captured
//!   (queue drops, snaplen) simply leave a hole, which Wireshark reports as "previous segment not
//!   captured"; nothing is ever invented to fill it.
//! - A connection gets a three-way handshake (SYN and SYN/ACK with MSS 65495 and window scale 14,
//!   so a window is never "full") at its Open record, or at the first record seen if Open was lost.
//!   Every later packet carries ACK with the next sequence number of the other direction, i.e.
//!   it acknowledges only what was written. The receiver sends a pure ACK whenever
//!   `ACK_EVERY` bytes are unacknowledged, and after the last FIN at Close.
//! - Payloads are split into segments of at most `MAX_SEGMENT` bytes (IP length limit); the last
//!   segment of a record has PSH.
//! - Fin → FIN/ACK, Reset → RST/ACK from the side that reset. A connection the proxy resets
//!   itself (idle timeout, end of the shutdown drain: a Close without a Reset before it) →
//!   RST/ACK toward each side, i.e. one from each address. Close after a failed connect → SYN
//!   then RST/ACK toward the client. Per-connection state is forgotten at Close.
//! - IPv4 header checksum and TCP checksum (with the IPv4 or IPv6 pseudo-header) are correct.
//! - Timestamps are the record times, except the SYN of a failed connect: the Close time less
//!   how long the connect went on, so the capture shows the wait.

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use super::PcapTarget;
use super::queue::Teed;
use super::record::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapRecord};
use super::rotate::{GLOBAL_HEADER_LEN, RotatingFile};
use super::tracked::Tracked;
use super::writer::Entry;
use crate::splice::TeePipe;

/// `LINKTYPE_ETHERNET`.
const LINKTYPE_ETHERNET: u32 = 1;
/// Snapshot length announced in the global header (larger than any packet we write).
const SNAPLEN: u32 = 262_144;
/// Largest TCP payload per packet (keeps the IPv4 total length under 65535).
pub(crate) const MAX_SEGMENT: usize = 65_000;
/// Unacknowledged bytes after which the receiver sends a pure ACK.
const ACK_EVERY: u64 = 256 * 1024;
/// A gap in a direction this long or longer is crossed in steps (see [`PcapSink::bridge`]): the
/// window the SYNs offer (`WINDOW << WSCALE`, 1 GiB), well short of the 2^31 that sequence
/// numbers can jump forward.
const GAP_MAX: u64 = 1 << 30;
/// The step crossing a long gap.
const GAP_STEP: u64 = 1 << 29;
/// Window scale shift offered in the SYNs.
const WSCALE: u8 = 14;
/// Options of both SYNs: MSS 65495, NOP, window scale 14.
const SYN_OPTIONS: [u8; 8] = [2, 4, 0xff, 0xd7, 1, 3, 3, WSCALE];
/// Advertised (unscaled) window.
const WINDOW: u16 = 0xffff;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// MAC address of each side, by [`Side::index`].
const MACS: [[u8; 6]; 2] = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]];

/// The pcap global header.
pub(crate) fn global_header() -> [u8; GLOBAL_HEADER_LEN] {
    let mut h = [0u8; GLOBAL_HEADER_LEN];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

/// TCP state of one connection, as written so far.
struct Flow {
    /// Addresses by [`Side::index`] (same family).
    addrs: [IpAddr; 2],
    /// Ports by [`Side::index`].
    ports: [u16; 2],
    /// Initial sequence numbers by [`Direction::index`] (the direction's source sends it).
    isn: [u32; 2],
    /// Next stream offset per direction (end of what was written or skipped).
    next: [u64; 2],
    /// Whether a FIN was written per direction.
    fin: [bool; 2],
    /// Stream position (offset, plus one for a FIN) the receiver has acknowledged, per direction.
    acked: [u64; 2],
    /// IPv4 identification counter per direction.
    ip_id: [u16; 2],
    /// Whether a RST was written.
    reset: bool,
    /// Only the SYN is written: the upstream has not answered (yet).
    syn_only: bool,
}

impl Flow {
    fn new(conn: &ConnMeta) -> Flow {
        let (a, b) = (
            conn.downstream.ip().to_canonical(),
            conn.upstream.ip().to_canonical(),
        );
        let addrs = match (a, b) {
            (IpAddr::V4(x), IpAddr::V6(y)) => [IpAddr::V6(x.to_ipv6_mapped()), IpAddr::V6(y)],
            (IpAddr::V6(x), IpAddr::V4(y)) => [IpAddr::V6(x), IpAddr::V6(y.to_ipv6_mapped())],
            _ => [a, b],
        };
        let seed = mix(conn.id);
        Flow {
            addrs,
            ports: [conn.downstream.port(), conn.upstream.port()],
            isn: [seed as u32, (seed >> 32) as u32],
            next: [0; 2],
            fin: [false; 2],
            acked: [0; 2],
            ip_id: [(seed >> 7) as u16, (seed >> 23) as u16],
            reset: false,
            syn_only: false,
        }
    }

    /// Sequence number of stream offset `offset` of `dir`.
    fn seq_at(&self, dir: Direction, offset: u64) -> u32 {
        self.isn[dir.index()]
            .wrapping_add(1)
            .wrapping_add(offset as u32)
    }

    /// Stream position after everything written in `dir` (a FIN counts one).
    fn position(&self, dir: Direction) -> u64 {
        self.next[dir.index()] + u64::from(self.fin[dir.index()])
    }

    /// Next sequence number the source of `dir` will use.
    fn snd_nxt(&self, dir: Direction) -> u32 {
        self.seq_at(dir, self.position(dir))
    }
}

/// splitmix64: spreads connection ids over the sequence space.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn reverse(dir: Direction) -> Direction {
    match dir {
        Direction::DownToUp => Direction::UpToDown,
        Direction::UpToDown => Direction::DownToUp,
    }
}

/// One packet to write.
struct Segment<'a> {
    dir: Direction,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: Payload<'a>,
}

/// Where a segment's payload comes from.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Bytes(&'a [u8]),
    /// The next `len` bytes of a tee pipe, read straight into the output buffer.
    Pipe(&'a TeePipe, usize),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Pipe(_, len) => *len,
        }
    }
}

impl Segment<'static> {
    /// A segment without payload (SYN, ACK, FIN, RST).
    fn control(dir: Direction, flags: u8, seq: u32, ack: u32) -> Self {
        Segment {
            dir,
            flags,
            seq,
            ack,
            payload: Payload::Bytes(&[]),
        }
    }
}

/// Writes records as packets into a (rotating) pcap file.
pub(crate) struct PcapSink {
    file: RotatingFile,
    flows: Tracked<Flow>,
    /// For each teed record whose pipe held fewer bytes than it named: how many were missing
    /// (the writer counts them as dropped).
    missing: Vec<usize>,
}

impl PcapSink {
    /// Opens the target (without blocking; see [`RotatingFile::open`]).
    pub(crate) fn open(target: &PcapTarget) -> io::Result<PcapSink> {
        Ok(PcapSink {
            file: RotatingFile::open(target, global_header())?,
            flows: Tracked::new(),
            missing: Vec::new(),
        })
    }

    /// The path, for messages.
    pub(crate) fn name(&self) -> String {
        self.file.path().display().to_string()
    }

    /// Renders records and writes them, as [`PcapSink::write_entries`] does.
    #[cfg(test)]
    pub(crate) fn write_batch(&mut self, batch: &[TapRecord], more_queued: bool) -> io::Result<()> {
        for record in batch {
            self.record(record);
        }
        self.file.flush(more_queued)
    }

    /// Renders a batch of records and teed data (read from their pipes straight into the
    /// output buffer: no copy in between) and writes it. `more_queued`: more records are
    /// waiting, so a partial block may be held back for the next batch (see
    /// [`RotatingFile::flush`]).
    pub(crate) fn write_entries(&mut self, batch: &[Entry], more_queued: bool) -> io::Result<()> {
        for entry in batch {
            match entry {
                Entry::Record(record) => self.record(record),
                Entry::Teed(teed) => self.teed(teed),
            }
        }
        self.file.flush(more_queued)
    }

    /// Takes the missing byte counts of teed records rendered since the last call.
    pub(crate) fn take_missing(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.missing)
    }

    /// Appends the packets of teed data, reading the bytes out of its pipe.
    fn teed(&mut self, teed: &Teed) {
        let mut flow = self.flow_for(&teed.conn, teed.time);
        let payload = Payload::Pipe(&teed.pipe, teed.len);
        let got = self.data(teed.time, &mut flow, teed.dir, teed.offset, payload);
        if got < teed.len {
            self.missing.push(teed.len - got);
        }
        self.flows.insert(teed.conn.id, flow);
    }

    /// The state of a connection, starting it with a handshake if it has none, or finishing the
    /// handshake whose SYN went out at its Connect record.
    fn flow_for(&mut self, conn: &ConnMeta, time: SystemTime) -> Flow {
        match self.flows.remove(conn.id) {
            Some(mut flow) if flow.syn_only => {
                flow.syn_only = false;
                self.answer(time, &mut flow);
                flow
            }
            Some(flow) => flow,
            None => {
                let mut flow = Flow::new(conn);
                self.syn(time, &mut flow);
                self.answer(time, &mut flow);
                flow
            }
        }
    }

    /// Appends the packets of one record.
    fn record(&mut self, record: &TapRecord) {
        let id = record.conn.id;
        let time = record.time;
        match &record.event {
            TapEvent::Connect => {
                // An earlier attempt of this connection, to another address, failed.
                if let Some(mut earlier) = self.flows.remove(id) {
                    self.unanswered(time, &mut earlier, CloseKind::ConnectFailed);
                }
                let mut flow = Flow::new(&record.conn);
                self.syn(time, &mut flow);
                flow.syn_only = true;
                self.flows.insert(id, flow);
                return;
            }
            TapEvent::Close { kind, offsets, .. } => {
                match self.flows.remove(id) {
                    Some(mut flow) if flow.syn_only => self.unanswered(time, &mut flow, *kind),
                    Some(mut flow) => self.close(time, &mut flow, *kind, *offsets),
                    // Its Connect record was lost: the SYN is shown now, in file order.
                    None if matches!(
                        kind,
                        CloseKind::ConnectFailed | CloseKind::ConnectTimeout
                    ) =>
                    {
                        let mut flow = Flow::new(&record.conn);
                        self.syn(time, &mut flow);
                        self.unanswered(time, &mut flow, *kind);
                    }
                    None => {}
                }
                return;
            }
            // The client left, or the upstream refused, before the handshake ended.
            TapEvent::Reset { side, .. } if self.flows.get(id).is_some_and(|f| f.syn_only) => {
                let mut flow = self.flows.remove(id).expect("checked above");
                self.unanswered(time, &mut flow, CloseKind::Reset(*side));
                self.flows.insert(id, flow);
                return;
            }
            _ => {}
        }
        let mut flow = self.flow_for(&record.conn, time);
        match &record.event {
            TapEvent::Connect | TapEvent::Open | TapEvent::Close { .. } => {}
            TapEvent::Data { dir, offset, bytes } => {
                self.data(time, &mut flow, *dir, *offset, Payload::Bytes(bytes));
            }
            TapEvent::Fin { dir, offset } => self.fin(time, &mut flow, *dir, *offset),
            TapEvent::Reset { side, offsets } => self.reset(time, &mut flow, *side, *offsets),
        }
        self.flows.insert(id, flow);
    }

    /// The client's SYN.
    fn syn(&mut self, time: SystemTime, flow: &mut Flow) {
        let c = flow.isn[0];
        self.emit(time, flow, Segment::control(Direction::DownToUp, SYN, c, 0));
    }

    /// The rest of the handshake: the upstream's SYN-ACK and the client's ACK.
    fn answer(&mut self, time: SystemTime, flow: &mut Flow) {
        let [c, u] = flow.isn;
        self.emit(
            time,
            flow,
            Segment::control(Direction::UpToDown, SYN | ACK, u, c.wrapping_add(1)),
        );
        self.emit(
            time,
            flow,
            Segment::control(
                Direction::DownToUp,
                ACK,
                c.wrapping_add(1),
                u.wrapping_add(1),
            ),
        );
    }

    /// The end of a connection whose SYN got no answer: a reset from the upstream when the
    /// connect failed (refused, timed out, or the upstream reset), else from the client.
    fn unanswered(&mut self, time: SystemTime, flow: &mut Flow, kind: CloseKind) {
        if flow.reset {
            return;
        }
        flow.reset = true;
        flow.syn_only = false;
        let c = flow.isn[0];
        let seg = match kind {
            CloseKind::ConnectFailed
            | CloseKind::ConnectTimeout
            | CloseKind::Reset(Side::Upstream)
            | CloseKind::Error(Side::Upstream) => {
                Segment::control(Direction::UpToDown, RST | ACK, 0, c.wrapping_add(1))
            }
            _ => Segment::control(Direction::DownToUp, RST, c.wrapping_add(1), 0),
        };
        self.emit(time, flow, seg);
    }

    /// Appends the segments of a data record; returns how many of its bytes were written
    /// (fewer than asked only when a tee pipe came up short).
    fn data(
        &mut self,
        time: SystemTime,
        flow: &mut Flow,
        dir: Direction,
        offset: u64,
        payload: Payload<'_>,
    ) -> usize {
        self.bridge(time, flow, dir, offset);
        let back = reverse(dir);
        let len = payload.len();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_SEGMENT);
            let at = offset + done as u64;
            let flags = if done + n == len { ACK | PSH } else { ACK };
            let seq = flow.seq_at(dir, at);
            let ack = flow.snd_nxt(back);
            let part = match payload {
                Payload::Bytes(b) => Payload::Bytes(&b[done..done + n]),
                Payload::Pipe(pipe, _) => Payload::Pipe(pipe, n),
            };
            let seg = Segment {
                dir,
                flags,
                seq,
                ack,
                payload: part,
            };
            let got = self.emit(time, flow, seg);
            if got == 0 {
                break;
            }
            flow.acked[back.index()] = flow.position(back);
            let d = &mut flow.next[dir.index()];
            *d = (*d).max(at + got as u64);
            done += got;
            if got < n {
                break;
            }
        }
        if flow.next[dir.index()] - flow.acked[dir.index()] >= ACK_EVERY {
            self.ack(time, flow, dir);
        }
        done
    }

    /// Crosses a gap in `dir` (bytes not captured: beyond `snaplen`, or dropped) up to stream
    /// offset `to` in steps Wireshark can follow. Sequence numbers are 32 bits, and it reads a
    /// jump of 2^31 or more as going backwards (a retransmission, not a gap), so a gap of
    /// [`GAP_MAX`] or more is crossed [`GAP_STEP`] at a time: at each step an empty segment at
    /// the sequence number past it, and the other side's ACK.
    fn bridge(&mut self, time: SystemTime, flow: &mut Flow, dir: Direction, to: u64) {
        if flow.fin[dir.index()] {
            return;
        }
        while to.saturating_sub(flow.next[dir.index()]) >= GAP_MAX {
            flow.next[dir.index()] += GAP_STEP;
            let back = reverse(dir);
            let seg = Segment::control(dir, ACK, flow.snd_nxt(dir), flow.snd_nxt(back));
            self.emit(time, flow, seg);
            self.ack(time, flow, dir);
        }
    }

    /// The receiver of `dir` acknowledges everything written in `dir`.
    fn ack(&mut self, time: SystemTime, flow: &mut Flow, dir: Direction) {
        let back = reverse(dir);
        let seg = Segment::control(back, ACK, flow.snd_nxt(back), flow.snd_nxt(dir));
        self.emit(time, flow, seg);
        flow.acked[dir.index()] = flow.position(dir);
    }

    fn fin(&mut self, time: SystemTime, flow: &mut Flow, dir: Direction, offset: u64) {
        if flow.fin[dir.index()] || flow.reset {
            return;
        }
        self.bridge(time, flow, dir, offset);
        let next = &mut flow.next[dir.index()];
        *next = (*next).max(offset);
        let back = reverse(dir);
        let seg = Segment::control(dir, FIN | ACK, flow.snd_nxt(dir), flow.snd_nxt(back));
        self.emit(time, flow, seg);
        flow.acked[back.index()] = flow.position(back);
        flow.fin[dir.index()] = true;
    }

    fn reset(&mut self, time: SystemTime, flow: &mut Flow, side: Side, offsets: [u64; 2]) {
        if flow.reset {
            return;
        }
        let dir = side.outgoing();
        self.bridge(time, flow, dir, offsets[dir.index()]);
        let next = &mut flow.next[dir.index()];
        *next = (*next).max(offsets[dir.index()]);
        let back = reverse(dir);
        let seg = Segment::control(dir, RST | ACK, flow.snd_nxt(dir), flow.snd_nxt(back));
        self.emit(time, flow, seg);
        flow.reset = true;
    }

    /// The proxy reset both sides itself: a RST toward the client (from the upstream's address)
    /// and one toward the upstream (from the client's), in the order the proxy closes the
    /// sockets, each at the next sequence number of its sender and acknowledging everything of
    /// the other.
    fn abort(&mut self, time: SystemTime, flow: &mut Flow, offsets: [u64; 2]) {
        for dir in Direction::BOTH {
            self.bridge(time, flow, dir, offsets[dir.index()]);
            let next = &mut flow.next[dir.index()];
            *next = (*next).max(offsets[dir.index()]);
        }
        for dir in [Direction::UpToDown, Direction::DownToUp] {
            let back = reverse(dir);
            let seg = Segment::control(dir, RST | ACK, flow.snd_nxt(dir), flow.snd_nxt(back));
            self.emit(time, flow, seg);
        }
        flow.reset = true;
    }

    fn close(&mut self, time: SystemTime, flow: &mut Flow, kind: CloseKind, offsets: [u64; 2]) {
        if flow.reset {
            return;
        }
        match kind {
            // Normally after the Reset record, which wrote the RST already.
            CloseKind::Reset(side) | CloseKind::Error(side) => {
                self.reset(time, flow, side, offsets);
                return;
            }
            // The proxy reset the sides itself; the handshake is written, so both ends of the
            // conversation are shown reset.
            CloseKind::IdleTimeout
            | CloseKind::Shutdown
            | CloseKind::ConnectFailed
            | CloseKind::ConnectTimeout => {
                self.abort(time, flow, offsets);
                return;
            }
            CloseKind::Normal => {}
        }
        for dir in Direction::BOTH {
            if flow.fin[dir.index()] && flow.acked[dir.index()] < flow.position(dir) {
                self.ack(time, flow, dir);
            }
        }
    }

    /// Appends one packet (pcap record header, Ethernet, IP, TCP, payload); returns the payload
    /// bytes it holds. A tee pipe that comes up short gives a shorter packet (none if empty).
    fn emit(&mut self, time: SystemTime, flow: &mut Flow, seg: Segment<'_>) -> usize {
        let src = seg.dir.source().index();
        let dst = 1 - src;
        let syn = seg.flags & SYN != 0;
        let options: &[u8] = if syn { &SYN_OPTIONS } else { &[] };
        let payload_len = seg.payload.len();
        let tcp_len = 20 + options.len() + payload_len;
        let (ip_len, ethertype) = match flow.addrs[0] {
            IpAddr::V4(_) => (20, 0x0800u16),
            IpAddr::V6(_) => (40, 0x86ddu16),
        };
        let frame_len = 14 + ip_len + tcp_len;
        let out = self.file.room(16 + frame_len);
        let record_start = out.len();

        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = u32::try_from(since.as_secs()).unwrap_or(u32::MAX);
        out.extend_from_slice(&secs.to_le_bytes());
        out.extend_from_slice(&since.subsec_micros().to_le_bytes());
        out.extend_from_slice(&(frame_len as u32).to_le_bytes());
        out.extend_from_slice(&(frame_len as u32).to_le_bytes());

        out.extend_from_slice(&MACS[dst]);
        out.extend_from_slice(&MACS[src]);
        out.extend_from_slice(&ethertype.to_be_bytes());

        // The pseudo-header sum for the TCP checksum.
        let mut pseudo = 0u64;
        match (flow.addrs[src], flow.addrs[dst]) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let id = &mut flow.ip_id[seg.dir.index()];
                *id = id.wrapping_add(1);
                let start = out.len();
                out.extend_from_slice(&[0x45, 0]);
                out.extend_from_slice(&((ip_len + tcp_len) as u16).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]); // DF, TTL 64, TCP, checksum
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
                let sum = checksum(sum_words(0, &out[start..]));
                out[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
                pseudo = sum_words(pseudo, &s.octets());
                pseudo = sum_words(pseudo, &d.octets());
                pseudo = sum_words(pseudo, &[0, 6]);
                pseudo = sum_words(pseudo, &(tcp_len as u16).to_be_bytes());
            }
            (s, d) => {
                let (s, d) = (v6(s), v6(d));
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(tcp_len as u16).to_be_bytes());
                out.extend_from_slice(&[6, 64]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
                pseudo = sum_words(pseudo, &s.octets());
                pseudo = sum_words(pseudo, &d.octets());
                pseudo = sum_words(pseudo, &(tcp_len as u32).to_be_bytes());
                pseudo = sum_words(pseudo, &[0, 0, 0, 6]);
            }
        }

        let start = out.len();
        out.extend_from_slice(&flow.ports[src].to_be_bytes());
        out.extend_from_slice(&flow.ports[dst].to_be_bytes());
        out.extend_from_slice(&seg.seq.to_be_bytes());
        out.extend_from_slice(&seg.ack.to_be_bytes());
        out.push(((20 + options.len()) / 4) as u8 * 16);
        out.push(seg.flags);
        out.extend_from_slice(&WINDOW.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        out.extend_from_slice(options);
        let got = match seg.payload {
            Payload::Bytes(b) => {
                out.extend_from_slice(b);
                b.len()
            }
            // SAFETY: `read_uninit` initializes the first bytes of the room, as many as it
            // returns.
            Payload::Pipe(pipe, n) => unsafe { out.fill_with(n, |room| pipe.read_uninit(room)) },
        };
        if got < payload_len {
            // The headers announce more than the pipe gave: write the packet again with what
            // there is (rare: only a pipe that lost bytes).
            let bytes = out[out.len() - got..].to_vec();
            out.truncate(record_start);
            if bytes.is_empty() {
                return 0;
            }
            let seg = Segment {
                payload: Payload::Bytes(&bytes),
                ..seg
            };
            return self.emit(time, flow, seg);
        }
        let sum = checksum(sum_words(pseudo, &out[start..]));
        out[start + 16..start + 18].copy_from_slice(&sum.to_be_bytes());
        got
    }
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// Adds `data` as big-endian 16-bit words (odd length padded with zero) to `sum`; the result is
/// congruent modulo 0xffff to the word-by-word sum (`data` must start at an even offset of the
/// checksummed range).
///
/// The ones' complement sum does not depend on byte order (RFC 1071, 2(B)): the words are added
/// in native (little-endian) order, in blocks small enough that a 32-bit accumulator cannot
/// overflow, so that the loop has no carries to handle and the compiler runs it over several
/// words at a time; the total is folded to 16 bits and swapped into big-endian order once.
fn sum_words(sum: u64, data: &[u8]) -> u64 {
    /// 2^15 words of at most 0xffff sum to less than 2^32.
    const BLOCK: usize = 1 << 16;
    let mut le = 0u64;
    for block in data.chunks(BLOCK) {
        let mut words = block.chunks_exact(2);
        let part: u32 = (&mut words)
            .map(|w| u32::from(u16::from_le_bytes([w[0], w[1]])))
            .sum();
        le += u64::from(part);
        if let [last] = words.remainder() {
            le += u64::from(*last);
        }
    }
    let folded = u64::from(fold(le).swap_bytes());
    let (total, carry) = sum.overflowing_add(folded);
    total + u64::from(carry)
}

/// Folds a sum to 16 bits keeping its value modulo 0xffff (2^16 = 1 modulo 0xffff).
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Folds a word sum into the Internet checksum (2^16 = 1 modulo 0xffff, so folding 16 bits at
/// a time keeps the value).
fn checksum(sum: u64) -> u16 {
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fast_sum_matches_word_by_word() {
        fn naive(data: &[u8]) -> u16 {
            let mut sum = 0u64;
            for pair in data.chunks(2) {
                sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
            checksum(sum)
        }
        let mut x = 0x1234_5678_9abc_def0u64;
        for len in (0..300).chain([1459, 65535, 65536]) {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert_eq!(checksum(sum_words(0, &data)), naive(&data), "len {len}");
            // Chained over pieces of even length, as the pseudo-header and headers are.
            let split = (len / 3) & !1;
            let chained = sum_words(sum_words(0, &data[..split]), &data[split..]);
            assert_eq!(
                checksum(chained),
                naive(&data),
                "len {len} split at {split}"
            );
            assert_eq!(
                checksum(sum_words(0, &vec![0xff; len])),
                naive(&vec![0xff; len]),
                "len {len}"
            );
        }
    }
    use crate::tap::testutil::{TempDir, bytes, conn, record};
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    use pcap_file::DataLink;
    use pcap_file::pcap::PcapReader;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;

    /// One parsed packet.
    #[derive(Debug)]
    struct Pkt {
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
        /// Since the epoch.
        time: Duration,
    }

    /// Reads a pcap written by the sink, verifying the format and every checksum.
    fn read(path: &Path) -> Vec<Pkt> {
        let file = std::fs::File::open(path).expect("open pcap");
        let mut reader = PcapReader::new(file).expect("pcap header");
        let header = reader.header();
        assert_eq!(header.datalink, DataLink::ETHERNET);
        assert_eq!((header.version_major, header.version_minor), (2, 4));
        let mut out = Vec::new();
        while let Some(packet) = reader.next_packet() {
            let packet = packet.expect("pcap record");
            assert_eq!(packet.orig_len as usize, packet.data.len());
            let sliced = SlicedPacket::from_ethernet(&packet.data).expect("ethernet frame");
            let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
                panic!("not TCP");
            };
            let (src, dst): (IpAddr, IpAddr) = match &sliced.net {
                Some(NetSlice::Ipv4(ip)) => {
                    let h = ip.header();
                    assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
                    assert_eq!(
                        tcp.calc_checksum_ipv4(h.source(), h.destination()).unwrap(),
                        tcp.checksum(),
                        "IPv4 TCP checksum"
                    );
                    (h.source_addr().into(), h.destination_addr().into())
                }
                Some(NetSlice::Ipv6(ip)) => {
                    let h = ip.header();
                    assert_eq!(
                        tcp.calc_checksum_ipv6(h.source(), h.destination()).unwrap(),
                        tcp.checksum(),
                        "IPv6 TCP checksum"
                    );
                    (h.source_addr().into(), h.destination_addr().into())
                }
                other => panic!("unexpected network layer {other:?}"),
            };
            let flags = u8::from(tcp.fin())
                | u8::from(tcp.syn()) << 1
                | u8::from(tcp.rst()) << 2
                | u8::from(tcp.psh()) << 3
                | u8::from(tcp.ack()) << 4;
            out.push(Pkt {
                src: SocketAddr::new(src, tcp.source_port()),
                dst: SocketAddr::new(dst, tcp.destination_port()),
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                flags,
                payload: tcp.payload().to_vec(),
                time: packet.timestamp,
            });
        }
        out
    }

    /// What one conversation looked like in the capture.
    #[derive(Debug, Default)]
    struct Conversation {
        /// Per direction (client first): payload by stream offset.
        data: [BTreeMap<u64, Vec<u8>>; 2],
        /// Per direction: whether every data segment started where the previous one ended.
        contiguous: [bool; 2],
        fins: [bool; 2],
        rsts: [bool; 2],
        /// Flags of the last packet and whether it came from the client.
        last: (u8, bool),
    }

    impl Conversation {
        /// The reassembled bytes of a direction (holes are not filled).
        fn bytes(&self, dir: usize) -> Vec<u8> {
            self.data[dir].values().flatten().copied().collect()
        }
    }

    /// Checks the TCP logic of the conversation between `client` and `server` and reassembles it.
    fn conversation(pkts: &[Pkt], client: SocketAddr, server: SocketAddr) -> Conversation {
        let pkts: Vec<&Pkt> = pkts
            .iter()
            .filter(|p| {
                (p.src == client && p.dst == server) || (p.src == server && p.dst == client)
            })
            .collect();
        assert!(pkts.len() >= 3, "no handshake for {client} -> {server}");
        assert_eq!((pkts[0].src, pkts[0].flags), (client, SYN));
        assert_eq!((pkts[1].src, pkts[1].flags), (server, SYN | ACK));
        assert_eq!((pkts[2].src, pkts[2].flags), (client, ACK));
        let isn = [pkts[0].seq, pkts[1].seq];
        assert_eq!(pkts[1].ack, isn[0].wrapping_add(1));
        assert_eq!(pkts[2].ack, isn[1].wrapping_add(1));
        let mut conv = Conversation {
            contiguous: [true; 2],
            ..Conversation::default()
        };
        // Highest stream position (FIN included) seen per direction.
        let mut seen = [0u64; 2];
        let mut last_ack = [0u64; 2];
        for p in &pkts[3..] {
            let d = usize::from(p.src != client);
            let o = 1 - d;
            let offset = u64::from(p.seq.wrapping_sub(isn[d]).wrapping_sub(1));
            if !p.payload.is_empty() {
                if offset != seen[d] {
                    conv.contiguous[d] = false;
                }
                assert!(offset >= seen[d], "data goes backwards");
                conv.data[d].insert(offset, p.payload.clone());
                seen[d] = offset + p.payload.len() as u64;
            } else if p.flags & (FIN | RST) != 0 {
                if offset != seen[d] {
                    conv.contiguous[d] = false;
                }
                seen[d] = seen[d].max(offset);
            } else {
                assert_eq!(offset, seen[d], "pure ACK with odd sequence number");
            }
            if p.flags & FIN != 0 {
                assert!(!conv.fins[d], "two FINs");
                conv.fins[d] = true;
                seen[d] += 1;
            }
            if p.flags & RST != 0 {
                conv.rsts[d] = true;
            }
            assert!(
                p.flags & ACK != 0,
                "every packet after the handshake has ACK"
            );
            let acked = u64::from(p.ack.wrapping_sub(isn[o]).wrapping_sub(1));
            assert!(acked <= seen[o], "acks unseen data: {acked} > {}", seen[o]);
            assert!(acked >= last_ack[d], "ack goes backwards");
            last_ack[d] = acked;
            conv.last = (p.flags, d == 0);
        }
        conv
    }

    fn sink(path: &Path, rotate_bytes: Option<u64>, max_files: u32) -> PcapSink {
        sink_with(path, rotate_bytes, max_files, true)
    }

    fn sink_with(path: &Path, rotate_bytes: Option<u64>, max_files: u32, direct: bool) -> PcapSink {
        PcapSink::open(&PcapTarget {
            path: path.to_path_buf(),
            rotate_bytes,
            max_files,
            direct_io: direct,
        })
        .expect("open pcap sink")
    }

    /// Records of one connection carrying payloads of the given sizes (every third one from the
    /// upstream), and the bytes of each direction (client to server first).
    fn bulk_records(c: &Arc<ConnMeta>, sizes: &[usize]) -> (Vec<TapRecord>, [Vec<u8>; 2]) {
        let mut records = vec![record(c, 0, TapEvent::Open)];
        let mut sent: [Vec<u8>; 2] = Default::default();
        for (i, &n) in sizes.iter().enumerate() {
            let (dir, side) = if i % 3 == 2 { (U2C, 1) } else { (C2U, 0) };
            let chunk = bytes(i as u64, n);
            let offset = sent[side].len() as u64;
            records.push(record(c, i as u64 + 1, data(dir, offset, &chunk)));
            sent[side].extend_from_slice(&chunk);
        }
        (records, sent)
    }

    /// Where two captures part (for messages that do not print megabytes).
    fn differ(direct: &[u8], cached: &[u8]) -> String {
        let at = direct.iter().zip(cached).position(|(a, b)| a != b);
        format!(
            "direct file {} bytes, buffered {} bytes, first difference at {at:?}",
            direct.len(),
            cached.len()
        )
    }

    /// Whether `dir` is on tmpfs (statfs magic `TMPFS_MAGIC`).
    fn on_tmpfs(dir: &Path) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
        // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut st) }, 0, "statfs");
        st.f_type == 0x0102_1994
    }

    /// Which of the file's pages are in the page cache.
    fn resident_pages(path: &Path) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).expect("open");
        let len = file.metadata().unwrap().len() as usize;
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, used only for
        // mincore (never dereferenced) and unmapped before returning; `vec` has one byte per page.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED, "mmap");
            let rc = libc::mincore(addr, len, vec.as_mut_ptr());
            libc::munmap(addr, len);
            assert_eq!(rc, 0, "mincore");
        }
        vec.into_iter().map(|b| b & 1 == 1).collect()
    }

    #[test]
    fn direct_io_writes_the_same_bytes_and_keeps_them_out_of_the_page_cache() {
        let dir = TempDir::new("pcap-direct");
        let conn_meta = conn(40, "10.3.0.1:5000", "10.3.0.2:80");
        // Bulk chunks (above DIRECT_MIN together) and small ones, in batches that end with more
        // queued, then drained.
        let sizes: Vec<usize> = (0..120)
            .map(|i| if i % 5 == 0 { 97 + i } else { 65_536 + 13 * i })
            .collect();
        let (records, sent) = bulk_records(&conn_meta, &sizes);
        let (direct_path, cached_path) = (dir.path().join("d.pcap"), dir.path().join("c.pcap"));
        let mut direct = sink_with(&direct_path, None, 1, true);
        let mut cached = sink_with(&cached_path, None, 1, false);
        assert!(
            direct.file.is_direct(),
            "O_DIRECT refused in {}: this test needs a file system that supports it",
            dir.path().display()
        );
        assert!(!cached.file.is_direct());
        let batches: Vec<&[TapRecord]> = records.chunks(9).collect();
        for (i, batch) in batches.iter().enumerate() {
            let more = i + 1 < batches.len() && i % 4 != 3;
            direct.write_batch(batch, more).expect("direct write");
            cached.write_batch(batch, more).expect("cached write");
            let (d, c) = (
                std::fs::read(&direct_path).unwrap(),
                std::fs::read(&cached_path).unwrap(),
            );
            if more {
                assert!(c.starts_with(&d), "batch {i}: {}", differ(&d, &c));
            } else {
                assert!(d == c, "batch {i}: drained but {}", differ(&d, &c));
            }
        }
        let (d, c) = (
            std::fs::read(&direct_path).unwrap(),
            std::fs::read(&cached_path).unwrap(),
        );
        assert!(d.len() > 6 << 20, "{} bytes", d.len());
        assert!(d == c, "{}", differ(&d, &c));
        let (client, server) = addrs(&conn_meta);
        let conv = conversation(&read(&direct_path), client, server);
        assert_eq!([conv.bytes(0), conv.bytes(1)], sent);

        // Fresh files: what went out direct is not cached; the last partial block may be. On
        // tmpfs the page cache is the storage, so there is nothing to bypass.
        if on_tmpfs(dir.path()) {
            eprintln!(
                "{} is on tmpfs: page-cache check skipped",
                dir.path().display()
            );
            return;
        }
        let (fresh_d, fresh_c) = (dir.path().join("d2.pcap"), dir.path().join("c2.pcap"));
        let mut direct = sink_with(&fresh_d, None, 1, true);
        let mut cached = sink_with(&fresh_c, None, 1, false);
        direct.write_batch(&records, false).expect("direct write");
        cached.write_batch(&records, false).expect("cached write");
        let resident_d = resident_pages(&fresh_d);
        let resident_c = resident_pages(&fresh_c);
        assert!(resident_d.len() > 1500);
        let cached_pages_d = resident_d.iter().filter(|&&r| r).count();
        let cached_pages_c = resident_c.iter().filter(|&&r| r).count();
        assert!(
            cached_pages_d <= 2,
            "{cached_pages_d} of {} pages of the direct file are cached",
            resident_d.len()
        );
        assert!(
            cached_pages_c > resident_c.len() / 2,
            "the page cache holds a buffered write ({cached_pages_c} pages)"
        );
    }

    /// Data `data` of `conn` teed into `pipe` (appended after what it holds), as the event loop
    /// does, and the entry naming it.
    fn teed_entry(
        pipe: &Arc<TeePipe>,
        conn: &Arc<ConnMeta>,
        micros: u64,
        dir: Direction,
        offset: u64,
        data: &[u8],
    ) -> Entry {
        let src = crate::splice::KernelPipe::holding(data);
        let mut teed = 0;
        while teed < data.len() {
            teed += pipe
                .tee_from(src.read_fd(), data.len() - teed)
                .expect("tee");
        }
        Entry::Teed(Teed {
            time: record(conn, micros, TapEvent::Open).time,
            conn: Arc::clone(conn),
            dir,
            offset,
            len: data.len(),
            pipe: Arc::clone(pipe),
        })
    }

    #[test]
    fn teed_data_is_read_from_the_pipe_into_the_same_packets() {
        let dir = TempDir::new("pcap-teed");
        let c = conn(42, "10.4.0.1:5000", "10.4.0.2:80");
        let sizes = [300_000, 5, 70_000, 65_000, 130_001, 1];
        let (records, sent) = bulk_records(&c, &sizes);
        let pipe = Arc::new(TeePipe::new(1 << 20).expect("tee pipe"));
        // Records 0 (Open) and 2 stay records; the others become teed entries naming one pipe.
        let entries: Vec<Entry> = records
            .iter()
            .enumerate()
            .map(|(i, r)| match &r.event {
                TapEvent::Data { dir, offset, bytes } if i != 2 => {
                    teed_entry(&pipe, &c, i as u64, *dir, *offset, bytes)
                }
                _ => Entry::Record(r.clone()),
            })
            .collect();
        let (from_records, from_pipe) = (dir.path().join("r.pcap"), dir.path().join("p.pcap"));
        let mut a = sink(&from_records, None, 1);
        let mut b = sink(&from_pipe, None, 1);
        a.write_batch(&records, false).expect("write records");
        b.write_entries(&entries, false).expect("write entries");
        assert!(b.take_missing().is_empty());
        let (x, y) = (
            std::fs::read(&from_records).unwrap(),
            std::fs::read(&from_pipe).unwrap(),
        );
        assert!(x == y, "{}", differ(&x, &y));
        let (client, server) = addrs(&c);
        let conv = conversation(&read(&from_pipe), client, server);
        assert_eq!([conv.bytes(0), conv.bytes(1)], sent);

        // A pipe that lost bytes: the packets hold what it had, the rest is reported missing,
        // and the capture stays valid.
        let short = Arc::new(TeePipe::new(1 << 20).expect("tee pipe"));
        let Entry::Teed(mut lost) = teed_entry(&short, &c, 50, C2U, 0, &bytes(9, 100_000)) else {
            unreachable!()
        };
        lost.len = 150_000;
        let path = dir.path().join("short.pcap");
        let mut s = sink(&path, None, 1);
        s.write_entries(&[Entry::Teed(lost)], false).expect("write");
        assert_eq!(s.take_missing(), [50_000]);
        let conv = conversation(&read(&path), client, server);
        assert_eq!(conv.bytes(0), bytes(9, 100_000));
    }

    #[test]
    fn direct_io_rotation_keeps_every_file_valid() {
        let dir = TempDir::new("pcap-direct-rotate");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, Some(1 << 20), 4);
        let c = conn(41, "10.3.0.1:5001", "10.3.0.2:80");
        let (records, _) = bulk_records(&c, &[200_000; 20]);
        for batch in records.chunks(3) {
            s.write_batch(batch, true).expect("write");
        }
        s.write_batch(&[], false).expect("drain");
        for index in 0..4 {
            let file = super::super::rotate::numbered(&path, index);
            let len = std::fs::metadata(&file).unwrap().len();
            assert!(len <= 1 << 20, "{} has {len} bytes", file.display());
            let pkts = read(&file);
            let payload: usize = pkts.iter().map(|p| p.payload.len()).sum();
            assert!(
                payload >= 600_000,
                "{}: {payload} payload bytes",
                file.display()
            );
        }
        assert!(!super::super::rotate::numbered(&path, 4).exists());
    }

    fn data(dir: Direction, offset: u64, bytes: &[u8]) -> TapEvent {
        TapEvent::Data {
            dir,
            offset,
            bytes: bytes.to_vec(),
        }
    }

    use Direction::{DownToUp as C2U, UpToDown as U2C};

    /// A complete connection: handshake, data both ways (one record larger than a segment and
    /// more than `ACK_EVERY`), both FINs, Close.
    fn complete(
        id: u64,
        down: &str,
        up: &str,
        t: u64,
    ) -> (Arc<ConnMeta>, Vec<TapRecord>, [Vec<u8>; 2]) {
        let c = conn(id, down, up);
        let req = b"HELLO tcptap\r\nmode: test\r\n\r\n".to_vec();
        let resp = bytes(id, 300_000);
        let tail = b"bye\n".to_vec();
        let n = resp.len() as u64;
        let records = vec![
            record(&c, t, TapEvent::Open),
            record(&c, t + 1, data(C2U, 0, &req)),
            record(&c, t + 2, data(U2C, 0, &resp[..1000])),
            record(&c, t + 3, data(U2C, 1000, &resp[1000..])),
            record(&c, t + 4, data(C2U, req.len() as u64, &tail)),
            record(
                &c,
                t + 5,
                TapEvent::Fin {
                    dir: C2U,
                    offset: (req.len() + tail.len()) as u64,
                },
            ),
            record(
                &c,
                t + 6,
                TapEvent::Fin {
                    dir: U2C,
                    offset: n,
                },
            ),
            record(
                &c,
                t + 7,
                TapEvent::Close {
                    kind: CloseKind::Normal,
                    offsets: [(req.len() + tail.len()) as u64, n],
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            ),
        ];
        let up_bytes = [req, tail].concat();
        (c, records, [up_bytes, resp])
    }

    /// The addresses the capture uses for a connection.
    fn addrs(c: &ConnMeta) -> (SocketAddr, SocketAddr) {
        let flow = Flow::new(c);
        (
            SocketAddr::new(flow.addrs[0], flow.ports[0]),
            SocketAddr::new(flow.addrs[1], flow.ports[1]),
        )
    }

    /// One `follow,tcp,raw` result: node 0 address, bytes from node 0, bytes from node 1.
    type Follow = (String, Vec<u8>, Vec<u8>);

    /// Runs tshark once with `-z follow,tcp,raw,N` for streams `0..streams` and `-z expert`.
    /// Returns the follows by stream index and the whole output; `None` (and a note) if tshark
    /// is not installed.
    fn tshark(path: &Path, streams: usize) -> Option<(Vec<Follow>, String)> {
        let mut cmd = Command::new("tshark");
        cmd.arg("-r").arg(path).arg("-q");
        for stream in 0..streams {
            cmd.arg("-z").arg(format!("follow,tcp,raw,{stream}"));
        }
        let output = match cmd.arg("-z").arg("expert").output() {
            Ok(output) => output,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("tshark not installed: skipping the tshark checks");
                return None;
            }
            Err(err) => panic!("cannot run tshark: {err}"),
        };
        assert!(output.status.success(), "tshark failed: {output:?}");
        let text = String::from_utf8(output.stdout).expect("tshark output");
        let mut follows: Vec<Follow> = vec![Default::default(); streams];
        let mut current: Option<usize> = None;
        let mut in_body = false;
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("Filter: tcp.stream eq ") {
                current = n.trim().parse().ok();
            } else if let Some(addr) = line.strip_prefix("Node 0: ") {
                if let Some(i) = current {
                    follows[i].0 = addr.to_owned();
                }
            } else if line.starts_with("Node 1: ") {
                in_body = current.is_some();
            } else if line.starts_with("=====") {
                in_body = false;
                current = None;
            } else if let (true, Some(i)) = (in_body, current) {
                let (hex, from) = match line.strip_prefix('\t') {
                    Some(hex) => (hex, &mut follows[i].2),
                    None => (line, &mut follows[i].1),
                };
                from.extend(
                    (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")),
                );
            }
        }
        Some((follows, text))
    }

    /// Connections whose Close record was dropped (a full queue) leave their flows behind:
    /// past the limit the least recently heard of are forgotten, so the writer's memory stays
    /// bounded; a connection heard of again starts over, and a complete one after them still
    /// reassembles and leaves nothing behind.
    #[test]
    fn flows_whose_close_was_lost_are_forgotten_past_the_limit() {
        let dir = TempDir::new("pcap-lost-close");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        s.flows = Tracked::with_limit(64);
        for id in 1..=1000u64 {
            let c = conn(id, "10.0.0.1:50000", "10.0.0.2:80");
            let batch = [
                record(&c, id * 10, TapEvent::Open),
                record(&c, id * 10 + 1, data(C2U, 0, b"request")),
            ];
            s.write_batch(&batch, false).expect("write batch");
            assert!(s.flows.len() <= 64);
        }
        assert_eq!(s.flows.forgotten() + s.flows.len() as u64, 1000);
        assert!(s.flows.get(1000).is_some(), "the most recent is kept");
        let (_, records, _) = complete(5000, "10.0.0.3:40000", "10.0.0.4:38000", 20_000);
        s.write_batch(&records, false).expect("write batch");
        assert!(s.flows.get(5000).is_none(), "state is forgotten at Close");
        assert!(read(&path).len() > 3 * 1000);
    }

    /// A gap of 2 GiB or more in a direction (beyond `snaplen`, or dropped) would make the
    /// sequence numbers jump by 2^31 or more, which Wireshark reads as going backwards (a
    /// retransmission): it is crossed in steps, so tshark reports uncaptured segments and no
    /// retransmission. (Its "Follow TCP Stream" measures a gap between data segments in 32
    /// bits, so it still cannot show the bytes after a gap of 2 GiB or more.)
    #[test]
    fn a_gap_of_gigabytes_reads_as_a_gap() {
        const GIB: u64 = 1 << 30;
        let dir = TempDir::new("pcap-big-gap");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        let c = conn(1, "10.0.0.1:50000", "10.0.0.2:80");
        let records = [
            record(&c, 0, TapEvent::Open),
            record(&c, 1, data(C2U, 0, b"GET /big\r\n")),
            record(&c, 2, data(U2C, 0, &[b'a'; 1000])),
            // 3 GiB not captured, then the tail, then 2.5 GiB more and the end.
            record(&c, 3, data(U2C, 3 * GIB, b"tail")),
            record(
                &c,
                4,
                TapEvent::Fin {
                    dir: U2C,
                    offset: 5 * GIB + GIB / 2,
                },
            ),
            record(
                &c,
                5,
                TapEvent::Fin {
                    dir: C2U,
                    offset: 10,
                },
            ),
            record(
                &c,
                6,
                TapEvent::Close {
                    kind: CloseKind::Normal,
                    offsets: [10, 5 * GIB + GIB / 2],
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            ),
        ];
        s.write_batch(&records, false).expect("write batch");
        // Each direction's sequence numbers only move forward, by less than 2^31 at a time.
        let pkts = read(&path);
        let mut last: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        for p in &pkts {
            if let Some(prev) = last.insert(p.src, p.seq) {
                let step = p.seq.wrapping_sub(prev);
                assert!(step < 1 << 31, "{} jumps by {step}", p.src);
            }
        }
        let Some((follows, text)) = tshark(&path, 1) else {
            return;
        };
        let expert = text.to_lowercase();
        assert!(!expert.contains("retransmission"), "{text}");
        assert!(expert.contains("not captured"), "{text}");
        assert!(follows[0].2.starts_with(&[b'a'; 1000]), "{text}");
    }

    #[test]
    fn complete_connections_reassemble_and_tshark_agrees() {
        let dir = TempDir::new("pcap-complete");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        let conns = [
            complete(1, "10.0.0.1:50000", "10.0.0.2:38001", 0),
            complete(2, "[2001:db8::1]:50001", "[2001:db8::2]:38002", 100),
            // Dual-stack listener: IPv4-mapped client, IPv4 upstream => plain IPv4.
            complete(3, "[::ffff:10.0.0.5]:40000", "10.0.0.6:38003", 200),
            // Mixed families => IPv6 with the IPv4 side mapped.
            complete(4, "10.0.0.7:40001", "[2001:db8::9]:38004", 300),
        ];
        // Interleave the connections' records, in a few batches.
        let mut all: Vec<TapRecord> = conns.iter().flat_map(|(_, r, _)| r.clone()).collect();
        all.sort_by_key(|r| r.time);
        for batch in all.chunks(5) {
            s.write_batch(batch, false).expect("write batch");
        }
        assert!(s.flows.is_empty(), "state is forgotten at Close");

        let pkts = read(&path);
        for (c, _, expected) in &conns {
            let (client, server) = addrs(c);
            let conv = conversation(&pkts, client, server);
            assert_eq!(conv.bytes(0), expected[0], "#{} client bytes", c.id);
            assert_eq!(conv.bytes(1), expected[1], "#{} upstream bytes", c.id);
            assert_eq!(conv.contiguous, [true, true]);
            assert_eq!(conv.fins, [true, true]);
            assert_eq!(conv.rsts, [false, false]);
            // The last packet acknowledges the upstream's FIN.
            assert_eq!(conv.last, (ACK, true));
            assert!(conv.data[1].values().all(|seg| seg.len() <= MAX_SEGMENT));
        }
        // Mixed families became IPv6.
        assert!(
            pkts.iter()
                .any(|p| p.src.ip() == "::ffff:10.0.0.7".parse::<IpAddr>().unwrap())
        );

        let Some((follows, text)) = tshark(&path, conns.len()) else {
            return;
        };
        for (stream, (c, _, expected)) in conns.iter().enumerate() {
            let (node0, from0, from1) = &follows[stream];
            let (client, _) = addrs(c);
            // Older tshark versions print IPv6 endpoints without brackets.
            let bare = format!("{}:{}", client.ip(), client.port());
            assert!(
                *node0 == client.to_string() || *node0 == bare,
                "stream {stream}: {node0}"
            );
            assert!(
                *from0 == expected[0],
                "stream {stream}: client bytes differ"
            );
            assert!(
                *from1 == expected[1],
                "stream {stream}: upstream bytes differ"
            );
        }
        // Sections are "Errors (n)", "Warns (n)", "Notes (n)", "Chats (n)"; no TCP line may sit in
        // the first two.
        let mut severe = false;
        for line in text.lines() {
            if line.starts_with("Errors") || line.starts_with("Warns") {
                severe = true;
            } else if line.starts_with("Notes") || line.starts_with("Chats") {
                severe = false;
            } else if severe {
                assert!(
                    !line.split_whitespace().any(|w| w == "TCP"),
                    "tshark reports a TCP problem in a complete capture:\n{text}"
                );
            }
        }
    }

    /// A Connect record writes the SYN when the connect started; the rest of the handshake
    /// follows at the Open, so a slow connect shows as the time between them and the file stays
    /// in time order. A retry to another address ends the first attempt with the upstream's
    /// reset; a client that resets before the upstream answers sends the RST itself.
    #[test]
    fn connects_show_their_syn_when_sent() {
        let dir = TempDir::new("pcap-connect");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        // #20: slow connect; #21: refused by one address, then open on another; #22: the
        // client resets before the upstream answers.
        let slow = conn(20, "192.0.2.1:1000", "192.0.2.2:2000");
        let first = conn(21, "192.0.2.1:1001", "192.0.2.3:2001");
        let second = conn(21, "192.0.2.1:1001", "192.0.2.4:2001");
        let left = conn(22, "192.0.2.1:1002", "192.0.2.2:2000");
        let batch = vec![
            record(&slow, 0, TapEvent::Connect),
            record(&first, 1, TapEvent::Connect),
            record(&left, 2, TapEvent::Connect),
            record(&second, 3, TapEvent::Connect),
            record(
                &left,
                4,
                TapEvent::Reset {
                    side: Side::Downstream,
                    offsets: [0, 0],
                },
            ),
            record(
                &left,
                4,
                TapEvent::Close {
                    kind: CloseKind::Reset(Side::Downstream),
                    offsets: [0, 0],
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            ),
            record(&second, 5, TapEvent::Open),
            record(&slow, 1_000_000, TapEvent::Open),
            record(&slow, 1_000_001, data(C2U, 0, b"hello")),
        ];
        s.write_batch(&batch, false).expect("write");
        let pkts = read(&path);
        assert!(
            pkts.windows(2).all(|w| w[0].time <= w[1].time),
            "frames out of time order"
        );
        let of = |c: &ConnMeta| -> Vec<(u8, Duration)> {
            let (client, server) = addrs(c);
            pkts.iter()
                .filter(|p| {
                    (p.src, p.dst) == (client, server) || (p.src, p.dst) == (server, client)
                })
                .map(|p| (p.flags, p.time - pkts[0].time))
                .collect()
        };
        let us = Duration::from_micros;
        assert_eq!(
            of(&slow)[..3],
            [
                (SYN, us(0)),
                (SYN | ACK, us(1_000_000)),
                (ACK, us(1_000_000))
            ]
        );
        assert_eq!(of(&first), [(SYN, us(1)), (RST | ACK, us(3))]);
        assert_eq!(
            of(&second),
            [(SYN, us(3)), (SYN | ACK, us(5)), (ACK, us(5))]
        );
        assert_eq!(of(&left), [(SYN, us(2)), (RST, us(4))]);
        if let Some((_, text)) = tshark(&path, 4) {
            for problem in [
                "Previous segment",
                "ACKed unseen",
                "Malformed",
                "Retransmission",
            ] {
                assert!(!text.contains(problem), "{text}");
            }
        }
    }

    #[test]
    fn gaps_resets_and_lost_opens() {
        let dir = TempDir::new("pcap-gaps");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        // #10: Open lost; a gap of 100 bytes client -> upstream, FIN after a snaplen cut.
        let a = conn(10, "192.0.2.1:1000", "192.0.2.2:2000");
        // #11: IPv6, data both ways, reset by the upstream.
        let b = conn(11, "[2001:db8::a]:1001", "[2001:db8::b]:2001");
        // #12: upstream connect failed.
        let f = conn(12, "192.0.2.3:1002", "192.0.2.4:2002");
        let batch = vec![
            record(&a, 0, data(C2U, 0, b"first")),
            record(&b, 1, TapEvent::Open),
            record(&f, 2, TapEvent::Connect),
            record(&a, 2, data(C2U, 105, b"second")),
            record(&b, 3, data(C2U, 0, b"ping")),
            record(&b, 4, data(U2C, 0, b"pong")),
            record(&a, 5, data(U2C, 0, b"reply")),
            record(
                &a,
                6,
                TapEvent::Fin {
                    dir: C2U,
                    offset: 500,
                },
            ),
            record(
                &b,
                7,
                TapEvent::Reset {
                    side: Side::Upstream,
                    offsets: [4, 4],
                },
            ),
            record(
                &b,
                8,
                TapEvent::Close {
                    kind: CloseKind::Reset(Side::Upstream),
                    offsets: [4, 4],
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            ),
            record(
                &a,
                9,
                TapEvent::Fin {
                    dir: U2C,
                    offset: 5,
                },
            ),
            record(
                &a,
                10,
                TapEvent::Close {
                    kind: CloseKind::Normal,
                    offsets: [500, 5],
                    dropped_records: 1,
                    dropped_bytes: 100,
                },
            ),
            record(
                &f,
                11,
                TapEvent::Close {
                    kind: CloseKind::ConnectFailed,
                    offsets: [0, 0],
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            ),
        ];
        s.write_batch(&batch, false).expect("write");
        assert!(s.flows.is_empty());
        let pkts = read(&path);

        let (client, server) = addrs(&a);
        let conv = conversation(&pkts, client, server);
        assert_eq!(
            conv.data[0]
                .iter()
                .map(|(o, b)| (*o, b.as_slice()))
                .collect::<Vec<_>>(),
            vec![(0, &b"first"[..]), (105, &b"second"[..])]
        );
        assert_eq!(conv.bytes(1), b"reply");
        assert_eq!(conv.contiguous, [false, true]);
        assert_eq!(conv.fins, [true, true]);
        // The FIN after the snaplen cut sits at stream offset 500.
        let fin = pkts
            .iter()
            .find(|p| p.src == client && p.flags & FIN != 0)
            .unwrap();
        let syn = pkts
            .iter()
            .find(|p| p.src == client && p.flags == SYN)
            .unwrap();
        assert_eq!(fin.seq, syn.seq.wrapping_add(501));

        let (client, server) = addrs(&b);
        let conv = conversation(&pkts, client, server);
        assert_eq!(
            (conv.bytes(0), conv.bytes(1)),
            (b"ping".to_vec(), b"pong".to_vec())
        );
        assert_eq!(conv.rsts, [false, true], "one RST, from the upstream");
        assert!(
            pkts.iter()
                .all(|p| !p.src.is_ipv4() || p.src.port() != 1001)
        );

        let (client, server) = addrs(&f);
        let failed: Vec<&Pkt> = pkts
            .iter()
            .filter(|p| p.src == client || p.src == server)
            .collect();
        assert_eq!(failed.len(), 2);
        assert_eq!((failed[0].flags, failed[1].flags), (SYN, RST | ACK));
        assert_eq!(failed[1].ack, failed[0].seq.wrapping_add(1));
        // The SYN when the connect started, the RST when it failed.
        assert_eq!(failed[1].time - failed[0].time, Duration::from_micros(9));

        if let Some((follows, text)) = tshark(&path, 2) {
            eprintln!("{text}");
            assert!(
                text.contains("Previous segment"),
                "the hole is reported:\n{text}"
            );
            // Stream 0 is #10 (first packet); tshark shows the captured bytes only and marks the
            // hole itself ("[100 bytes missing in capture file]").
            let text = String::from_utf8_lossy(&follows[0].1);
            assert!(
                text.starts_with("first") && text.ends_with("second"),
                "{text}"
            );
            assert!(text.contains("100 bytes missing"), "{text}");
            assert_eq!(follows[0].2, b"reply");
            assert_eq!(
                (&follows[1].1[..], &follows[1].2[..]),
                (&b"ping"[..], &b"pong"[..])
            );
        }
    }

    #[test]
    fn resets_by_the_proxy_reach_both_sides() {
        let dir = TempDir::new("pcap-abort");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, None, 1);
        let close = |c: &Arc<ConnMeta>, t, kind, offsets| {
            record(
                c,
                t,
                TapEvent::Close {
                    kind,
                    offsets,
                    dropped_records: 0,
                    dropped_bytes: 0,
                },
            )
        };
        // #50: idle timeout with both directions open.
        let a = conn(50, "192.0.2.1:3000", "192.0.2.2:4000");
        // #51: the end of the shutdown drain after the upstream's FIN.
        let b = conn(51, "[2001:db8::a]:3001", "[2001:db8::b]:4001");
        // #52: idle timeout after the client's FIN.
        let c = conn(52, "192.0.2.5:3002", "192.0.2.6:4002");
        // #53: an error whose Reset record was lost: the Close still ends it.
        let e = conn(53, "192.0.2.7:3003", "192.0.2.8:4003");
        let batch = vec![
            record(&a, 0, TapEvent::Open),
            record(&a, 1, data(C2U, 0, b"ping")),
            record(&a, 2, data(U2C, 0, b"pong!")),
            record(&b, 3, data(C2U, 0, b"get")),
            record(&b, 4, data(U2C, 0, b"body")),
            record(
                &b,
                5,
                TapEvent::Fin {
                    dir: U2C,
                    offset: 4,
                },
            ),
            record(&c, 6, data(C2U, 0, b"bye")),
            record(
                &c,
                7,
                TapEvent::Fin {
                    dir: C2U,
                    offset: 3,
                },
            ),
            record(&c, 8, data(U2C, 0, b"ok")),
            record(&e, 9, data(C2U, 0, b"x")),
            close(&a, 10, CloseKind::IdleTimeout, [4, 5]),
            close(&b, 11, CloseKind::Shutdown, [3, 4]),
            close(&c, 12, CloseKind::IdleTimeout, [3, 2]),
            close(&e, 13, CloseKind::Error(Side::Downstream), [1, 0]),
        ];
        s.write_batch(&batch, false).expect("write");
        assert!(s.flows.is_empty());
        let pkts = read(&path);
        // (connection, RSTs per direction, stream position of each RST: bytes, plus a FIN).
        for (conn_meta, rsts, at) in [
            (&a, [true, true], [4, 5]),
            (&b, [true, true], [3, 5]),
            (&c, [true, true], [4, 2]),
            (&e, [true, false], [1, 0]),
        ] {
            let (client, server) = addrs(conn_meta);
            let conv = conversation(&pkts, client, server);
            assert_eq!(conv.rsts, rsts, "#{}", conn_meta.id);
            assert_eq!(conv.contiguous, [true, true], "#{}", conn_meta.id);
            let isn = |from| pkts.iter().find(|p| p.src == from && p.flags & SYN != 0);
            let isn = [isn(client).unwrap().seq, isn(server).unwrap().seq];
            let ends = [client, server];
            for d in 0..2 {
                let Some(rst) = pkts.iter().find(|p| p.src == ends[d] && p.flags & RST != 0) else {
                    continue;
                };
                assert_eq!(rst.flags, RST | ACK, "#{}", conn_meta.id);
                assert_eq!(rst.seq, isn[d].wrapping_add(1 + at[d]), "#{}", conn_meta.id);
                assert_eq!(
                    rst.ack,
                    isn[1 - d].wrapping_add(1 + at[1 - d]),
                    "#{}",
                    conn_meta.id
                );
            }
            // Toward the client first, as the proxy closes its sockets.
            if rsts == [true, true] {
                let last: Vec<_> = pkts
                    .iter()
                    .filter(|p| [client, server].contains(&p.src))
                    .rev()
                    .take(2)
                    .map(|p| (p.src, p.flags))
                    .collect();
                assert_eq!(last, [(client, RST | ACK), (server, RST | ACK)]);
            }
        }
        if let Some((_, text)) = tshark(&path, 0) {
            for word in [
                "not captured",
                "unseen",
                "Retransmission",
                "Out-Of-Order",
                "Dup",
            ] {
                assert!(!text.contains(word), "tshark: {word}\n{text}");
            }
        }
    }

    #[test]
    fn rotation_keeps_max_files_each_a_valid_pcap() {
        let dir = TempDir::new("pcap-rotate");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, Some(4096), 3);
        let c = conn(20, "10.1.0.1:5000", "10.1.0.2:80");
        let mut records = vec![record(&c, 0, TapEvent::Open)];
        let mut offset = 0;
        for i in 0..200u64 {
            let chunk = bytes(i, 300);
            records.push(record(&c, i + 1, data(C2U, offset, &chunk)));
            offset += chunk.len() as u64;
        }
        for batch in records.chunks(7) {
            s.write_batch(batch, false).expect("write");
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["cap.pcap", "cap.pcap.1", "cap.pcap.2"]);
        for name in &names {
            let file = dir.path().join(name);
            let len = std::fs::metadata(&file).unwrap().len();
            assert!(len <= 4096, "{name} has {len} bytes");
            assert!(!read(&file).is_empty(), "{name} has packets");
        }
    }

    #[test]
    fn max_files_one_truncates_in_place() {
        let dir = TempDir::new("pcap-rotate-one");
        let path = dir.path().join("cap.pcap");
        let mut s = sink(&path, Some(2000), 1);
        let c = conn(21, "10.1.0.1:5001", "10.1.0.2:80");
        let mut offset = 0;
        for i in 0..50u64 {
            let r = record(&c, i, data(C2U, offset, &bytes(i, 200)));
            offset += 200;
            s.write_batch(&[r], false).expect("write");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(!read(&path).is_empty());
    }

    #[test]
    fn dev_full_gives_errors_not_panics() {
        let mut s = sink(Path::new("/dev/full"), Some(1000), 2);
        let c = conn(30, "10.2.0.1:5000", "10.2.0.2:80");
        for i in 0..3 {
            let r = record(&c, i, data(C2U, i * 10, &[b'x'; 10]));
            assert!(s.write_batch(&[r], false).is_err());
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example words.
        let sum = sum_words(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(checksum(sum), !0xddf2);
        assert_eq!(sum_words(0, &[0xab]), 0xab00);
    }
}
