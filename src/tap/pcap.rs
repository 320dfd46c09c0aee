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
//! - A connection gets a three-way handshake (SYN and SYN/ACK with window scale 14, so a window
//!   is never "full") at its Open record, or at the first record seen if Open was lost.
//!   Every later packet carries ACK with the next sequence number of the other direction, i.e.
//!   it acknowledges only what was written. The receiver sends a pure ACK whenever
//!   `ACK_EVERY` bytes are unacknowledged, and after the last FIN at Close.
//! - Payloads are split into segments of at most `MAX_SEGMENT` bytes (IP length limit); the last
//!   segment of a record has PSH.
//! - Fin → FIN/ACK, Reset → RST/ACK from the side that reset, Close after a failed connect →
//!   SYN then RST/ACK. Per-connection state is forgotten at Close.
//! - IPv4 header checksum and TCP checksum (with the IPv4 or IPv6 pseudo-header) are correct.
//! - Timestamps are the record times.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use super::PcapTarget;
use super::record::{CloseKind, ConnMeta, Direction, Side, TapEvent, TapRecord};
use super::rotate::{GLOBAL_HEADER_LEN, RotatingFile};

/// `LINKTYPE_ETHERNET`.
const LINKTYPE_ETHERNET: u32 = 1;
/// Snapshot length announced in the global header (larger than any packet we write).
const SNAPLEN: u32 = 262_144;
/// Largest TCP payload per packet (keeps the IPv4 total length under 65535).
pub(crate) const MAX_SEGMENT: usize = 65_000;
/// Unacknowledged bytes after which the receiver sends a pure ACK.
const ACK_EVERY: u64 = 256 * 1024;
/// Window scale shift offered in the SYNs.
const WSCALE: u8 = 14;
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
    payload: &'a [u8],
}

/// Writes records as packets into a (rotating) pcap file.
pub(crate) struct PcapSink {
    file: RotatingFile,
    flows: HashMap<u64, Flow>,
}

impl PcapSink {
    /// Opens the target (without blocking; see [`RotatingFile::open`]).
    pub(crate) fn open(target: &PcapTarget) -> io::Result<PcapSink> {
        Ok(PcapSink {
            file: RotatingFile::open(target, global_header())?,
            flows: HashMap::new(),
        })
    }

    /// The path, for messages.
    pub(crate) fn name(&self) -> String {
        self.file.path().display().to_string()
    }

    /// Renders the batch and writes it.
    pub(crate) fn write_batch(&mut self, batch: &[TapRecord]) -> io::Result<()> {
        for record in batch {
            self.record(record);
        }
        self.file.flush()
    }

    /// Appends the packets of one record.
    fn record(&mut self, record: &TapRecord) {
        let id = record.conn.id;
        let time = record.time;
        if let TapEvent::Close { kind, offsets, .. } = &record.event {
            match self.flows.remove(&id) {
                Some(mut flow) => self.close(time, &mut flow, *kind, *offsets),
                None if *kind == CloseKind::ConnectFailed => {
                    let mut flow = Flow::new(&record.conn);
                    self.failed_connect(time, &mut flow);
                }
                None => {}
            }
            return;
        }
        let mut flow = match self.flows.remove(&id) {
            Some(flow) => flow,
            None => {
                let mut flow = Flow::new(&record.conn);
                self.handshake(time, &mut flow);
                flow
            }
        };
        match &record.event {
            TapEvent::Open | TapEvent::Close { .. } => {}
            TapEvent::Data { dir, offset, bytes } => {
                self.data(time, &mut flow, *dir, *offset, bytes)
            }
            TapEvent::Fin { dir, offset } => self.fin(time, &mut flow, *dir, *offset),
            TapEvent::Reset { side, offsets } => self.reset(time, &mut flow, *side, *offsets),
        }
        self.flows.insert(id, flow);
    }

    fn handshake(&mut self, time: SystemTime, flow: &mut Flow) {
        let [c, u] = flow.isn;
        self.emit(
            time,
            flow,
            Segment {
                dir: Direction::DownToUp,
                flags: SYN,
                seq: c,
                ack: 0,
                payload: &[],
            },
        );
        self.emit(
            time,
            flow,
            Segment {
                dir: Direction::UpToDown,
                flags: SYN | ACK,
                seq: u,
                ack: c.wrapping_add(1),
                payload: &[],
            },
        );
        self.emit(
            time,
            flow,
            Segment {
                dir: Direction::DownToUp,
                flags: ACK,
                seq: c.wrapping_add(1),
                ack: u.wrapping_add(1),
                payload: &[],
            },
        );
    }

    fn failed_connect(&mut self, time: SystemTime, flow: &mut Flow) {
        let c = flow.isn[0];
        self.emit(
            time,
            flow,
            Segment {
                dir: Direction::DownToUp,
                flags: SYN,
                seq: c,
                ack: 0,
                payload: &[],
            },
        );
        self.emit(
            time,
            flow,
            Segment {
                dir: Direction::UpToDown,
                flags: RST | ACK,
                seq: 0,
                ack: c.wrapping_add(1),
                payload: &[],
            },
        );
    }

    fn data(
        &mut self,
        time: SystemTime,
        flow: &mut Flow,
        dir: Direction,
        offset: u64,
        bytes: &[u8],
    ) {
        let back = reverse(dir);
        let count = bytes.len().div_ceil(MAX_SEGMENT);
        for (i, chunk) in bytes.chunks(MAX_SEGMENT).enumerate() {
            let at = offset + (i * MAX_SEGMENT) as u64;
            let flags = if i + 1 == count { ACK | PSH } else { ACK };
            let seq = flow.seq_at(dir, at);
            let ack = flow.snd_nxt(back);
            self.emit(
                time,
                flow,
                Segment {
                    dir,
                    flags,
                    seq,
                    ack,
                    payload: chunk,
                },
            );
            flow.acked[back.index()] = flow.position(back);
            let d = &mut flow.next[dir.index()];
            *d = (*d).max(at + chunk.len() as u64);
        }
        if flow.next[dir.index()] - flow.acked[dir.index()] >= ACK_EVERY {
            self.ack(time, flow, dir);
        }
    }

    /// The receiver of `dir` acknowledges everything written in `dir`.
    fn ack(&mut self, time: SystemTime, flow: &mut Flow, dir: Direction) {
        let back = reverse(dir);
        let seg = Segment {
            dir: back,
            flags: ACK,
            seq: flow.snd_nxt(back),
            ack: flow.snd_nxt(dir),
            payload: &[],
        };
        self.emit(time, flow, seg);
        flow.acked[dir.index()] = flow.position(dir);
    }

    fn fin(&mut self, time: SystemTime, flow: &mut Flow, dir: Direction, offset: u64) {
        if flow.fin[dir.index()] || flow.reset {
            return;
        }
        let next = &mut flow.next[dir.index()];
        *next = (*next).max(offset);
        let back = reverse(dir);
        let seg = Segment {
            dir,
            flags: FIN | ACK,
            seq: flow.snd_nxt(dir),
            ack: flow.snd_nxt(back),
            payload: &[],
        };
        self.emit(time, flow, seg);
        flow.acked[back.index()] = flow.position(back);
        flow.fin[dir.index()] = true;
    }

    fn reset(&mut self, time: SystemTime, flow: &mut Flow, side: Side, offsets: [u64; 2]) {
        if flow.reset {
            return;
        }
        let dir = side.outgoing();
        let next = &mut flow.next[dir.index()];
        *next = (*next).max(offsets[dir.index()]);
        let back = reverse(dir);
        let seg = Segment {
            dir,
            flags: RST | ACK,
            seq: flow.snd_nxt(dir),
            ack: flow.snd_nxt(back),
            payload: &[],
        };
        self.emit(time, flow, seg);
        flow.reset = true;
    }

    fn close(&mut self, time: SystemTime, flow: &mut Flow, kind: CloseKind, offsets: [u64; 2]) {
        if flow.reset {
            return;
        }
        if let CloseKind::Reset(side) = kind {
            self.reset(time, flow, side, offsets);
            return;
        }
        for dir in Direction::BOTH {
            if flow.fin[dir.index()] && flow.acked[dir.index()] < flow.position(dir) {
                self.ack(time, flow, dir);
            }
        }
    }

    /// Appends one packet (pcap record header, Ethernet, IP, TCP, payload).
    fn emit(&mut self, time: SystemTime, flow: &mut Flow, seg: Segment<'_>) {
        let src = seg.dir.source().index();
        let dst = 1 - src;
        let syn = seg.flags & SYN != 0;
        let options: &[u8] = if syn { &[1, 3, 3, WSCALE] } else { &[] };
        let tcp_len = 20 + options.len() + seg.payload.len();
        let (ip_len, ethertype) = match flow.addrs[0] {
            IpAddr::V4(_) => (20, 0x0800u16),
            IpAddr::V6(_) => (40, 0x86ddu16),
        };
        let frame_len = 14 + ip_len + tcp_len;
        let out = self.file.room(16 + frame_len);

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
        out.extend_from_slice(seg.payload);
        let sum = checksum(sum_words(pseudo, &out[start..]));
        out[start + 16..start + 18].copy_from_slice(&sum.to_be_bytes());
    }
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

/// Adds `data` as big-endian 16-bit words (odd length padded with zero) to `sum`.
fn sum_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a word sum into the Internet checksum.
fn checksum(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
