//! HAProxy PROXY protocol, version 1 (text) and version 2 (binary): an encoder and an
//! incremental, bounded decoder.
//!
//! The format is the one of haproxy's `doc/proxy-protocol.txt`:
//!
//! - v1 is one US-ASCII line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (or `TCP6`, or
//!   `PROXY UNKNOWN<anything>\r\n`), at most [`V1_MAX_LEN`] bytes including the CRLF.
//! - v2 is the 12-byte signature [`V2_SIGNATURE`], a version/command byte (`0x21` PROXY,
//!   `0x20` LOCAL), a family/transport byte (`0x11` TCP over IPv4, `0x21` TCP over IPv6,
//!   `0x00` UNSPEC, ...), a big-endian 16-bit length, then that many bytes: the address block
//!   followed by TLVs.
//!
//! The decoder is meant for bytes arriving in pieces from a non-blocking socket: the caller
//! appends what it reads to a buffer and calls [`parse`] on the whole buffer again.
//!
//! Invariants of [`parse`]:
//! - It never panics, never allocates, and does work bounded by the input it looks at, which is
//!   capped at [`MAX_HEADER_LEN`] bytes (a caller that keeps reading does re-parse the buffer
//!   each time; headers are normally whole in the first segment).
//! - [`Parsed::Incomplete`] is only returned while the buffer is shorter than the header it
//!   announces: never at or beyond [`V1_MAX_LEN`] bytes for a v1 line, never at or beyond
//!   [`MAX_HEADER_LEN`] bytes for anything. A caller therefore never needs to buffer more
//!   than [`MAX_HEADER_LEN`] bytes.
//! - It rejects as early as the bytes allow: the first byte that cannot belong to a v1 or v2
//!   signature gives [`ParseError::NotProxyProtocol`], so a client that does not speak the
//!   protocol is turned away on its first segment rather than after a timeout.
//! - The result does not depend on how the stream was split: if `parse(prefix)` is an error or
//!   complete, `parse` of any longer buffer starting with that prefix gives the same answer.
//! - On success, `consumed` is the exact header length; bytes after it (the proxied payload)
//!   are left for the caller.
//!
//! v2 TLVs are not interpreted, but their lengths are checked against the header length
//! whenever the address block layout is known (a known family). v2 families that a TCP proxy
//! cannot use (UDP, AF_UNIX) are accepted and reported without addresses, as the
//! specification asks of receivers that do not implement them.
//!
//! The encoder writes TCP4 when both addresses are IPv4 and TCP6 otherwise; an IPv4 address
//! paired with an IPv6 one is written as its IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), as
//! haproxy does.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the fixed part of a v2 header (signature, version/command, family, length).
pub const V2_FIXED_LEN: usize = 16;

/// Longest possible v2 header: the fixed part plus a 16-bit address/TLV length.
pub const V2_MAX_LEN: usize = V2_FIXED_LEN + u16::MAX as usize;

/// Longest valid v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;

/// The most bytes [`parse`] can ever ask for before it answers.
pub const MAX_HEADER_LEN: usize = V2_MAX_LEN;

const V1_SIGNATURE: &[u8; 5] = b"PROXY";

/// Which version of the protocol a header was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The text format.
    V1,
    /// The binary format.
    V2,
}

/// What the sender says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// The connection is relayed on behalf of another node; the header carries its endpoints
    /// (when the family is one this module understands). Every v1 header is `Proxy`.
    Proxy,
    /// v2 only: the sender opened the connection for itself (for example a health check);
    /// the receiver uses the real connection endpoints.
    Local,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// The format the header was written in.
    pub version: Version,
    /// PROXY or LOCAL.
    pub command: Command,
    /// `(source, destination)` of the original connection, or `None` when the header does not
    /// carry usable TCP endpoints (v2 LOCAL, v2 UNSPEC or non-TCP family, v1 `UNKNOWN`). With
    /// `None` the receiver uses the real endpoints of the connection.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// The answer of [`parse`] for a buffer that is not (yet) invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parsed {
    /// The buffer is a valid beginning of a header; read more and call [`parse`] again.
    Incomplete,
    /// A whole header: it spans `buf[..consumed]`, the payload follows.
    Complete {
        /// The decoded header.
        header: ProxyHeader,
        /// Length of the header in bytes.
        consumed: usize,
    },
}

/// Why a buffer is not a valid PROXY protocol header. The connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// The first bytes are neither a v1 nor a v2 signature.
    #[error(
        "not a PROXY protocol header: the first bytes match neither the v1 nor the v2 signature"
    )]
    NotProxyProtocol,
    /// No CRLF within the first [`V1_MAX_LEN`] bytes of a v1 line.
    #[error("PROXY v1 line longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    /// A lone CR or LF in a v1 line.
    #[error("PROXY v1 line not terminated by CRLF (lone CR or LF)")]
    V1BadLineEnding,
    /// A v1 line that does not follow the format; the text says which part.
    #[error("malformed PROXY v1 line: {0}")]
    V1Malformed(&'static str),
    /// The high nibble of the 13th byte of a v2 header is not 2.
    #[error("PROXY v2 header with unsupported version nibble {0:#x}")]
    V2BadVersion(u8),
    /// The low nibble of the 13th byte of a v2 header is neither LOCAL (0) nor PROXY (1).
    #[error("PROXY v2 header with unknown command {0:#x}")]
    V2BadCommand(u8),
    /// The family/transport byte of a v2 PROXY header has an unassigned nibble.
    #[error("PROXY v2 header with invalid family/transport byte {0:#04x}")]
    V2BadFamily(u8),
    /// The v2 length is too short for the address block of the announced family.
    #[error("PROXY v2 header length {len} too short for family {family:#04x} (needs {needed})")]
    V2AddressTooShort {
        /// The family/transport byte.
        family: u8,
        /// The announced length.
        len: u16,
        /// The size of that family's address block.
        needed: usize,
    },
    /// The TLVs after the address block do not add up to the announced length.
    #[error("PROXY v2 header with a TLV running past the end of the header")]
    V2BadTlv,
}

/// Decodes a PROXY protocol header (v1 or v2) at the start of `buf`.
///
/// Call it again on the whole accumulated buffer after each read until it answers something
/// other than [`Parsed::Incomplete`]. See the module documentation for the guarantees.
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(&b) if b == V1_SIGNATURE[0] => parse_v1(buf),
        Some(&b) if b == V2_SIGNATURE[0] => parse_v2(buf),
        Some(_) => Err(ParseError::NotProxyProtocol),
    }
}

/// Appends a v1 header for a TCP connection from `src` to `dst` to `out`.
///
/// Writes `TCP4` when both are IPv4, `TCP6` otherwise (mapping an IPv4 address to
/// `::ffff:a.b.c.d` when the other one is IPv6). At most 104 bytes.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, so the io::Result of write! carries nothing.
    let _ = match same_family(src, dst) {
        Endpoints::V4(s, d) => write!(out, "PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port()),
        Endpoints::V6(s, d) => write!(out, "PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port()),
    };
}

/// Appends a v2 PROXY header (TCP, no TLVs) for a connection from `src` to `dst` to `out`.
///
/// Family `0x11` (28 bytes) when both are IPv4, `0x21` (52 bytes) otherwise, mapping an IPv4
/// address to `::ffff:a.b.c.d` when the other one is IPv6.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match same_family(src, dst) {
        Endpoints::V4(s, d) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        Endpoints::V6(s, d) => {
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// The header of a connection the proxy makes on its own behalf (a health check): v1
/// `PROXY UNKNOWN\r\n`, v2 `LOCAL` with no addresses (16 bytes). Receivers keep the
/// connection's real addresses, as for haproxy's `check-send-proxy`.
pub fn encode_local(v2: bool, out: &mut Vec<u8>) {
    if v2 {
        out.extend_from_slice(&V2_SIGNATURE);
        out.push(0x20);
        out.push(0x00);
        out.extend_from_slice(&0u16.to_be_bytes());
    } else {
        out.extend_from_slice(b"PROXY UNKNOWN\r\n");
    }
}

enum Endpoints {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> Endpoints {
    fn to_v6(ip: IpAddr) -> Ipv6Addr {
        match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        }
    }
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Endpoints::V4(s, d),
        (s, d) => Endpoints::V6(to_v6(s), to_v6(d)),
    }
}

// ---------------------------------------------------------------------------------------------
// v1

/// The protocol tokens of a v1 line.
const V1_TCP4: &[u8] = b"TCP4";
const V1_TCP6: &[u8] = b"TCP6";
const V1_UNKNOWN: &[u8] = b"UNKNOWN";
const V1_PROTOCOLS: [&[u8]; 3] = [V1_TCP4, V1_TCP6, V1_UNKNOWN];

fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let line_end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    // Everything before the first CR/LF is checked left to right, so the first bad byte gives
    // the same error whatever the length of the buffer.
    check_v1_prefix(&window[..line_end.unwrap_or(window.len())])?;

    let Some(cr) = line_end else {
        return if window.len() >= V1_MAX_LEN {
            Err(ParseError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if window[cr] == b'\n' {
        return Err(ParseError::V1BadLineEnding);
    }
    // The LF must fit within V1_MAX_LEN bytes too.
    if cr + 2 > V1_MAX_LEN {
        return Err(ParseError::V1TooLong);
    }
    match buf.get(cr + 1) {
        None => Ok(Parsed::Incomplete),
        Some(b'\n') => {
            let header = parse_v1_line(&buf[..cr])?;
            Ok(Parsed::Complete {
                header,
                consumed: cr + 2,
            })
        }
        Some(_) => Err(ParseError::V1BadLineEnding),
    }
}

/// Checks bytes of a v1 line that contain no CR or LF, which may stop anywhere.
fn check_v1_prefix(bytes: &[u8]) -> Result<(), ParseError> {
    let sig_len = bytes.len().min(V1_SIGNATURE.len());
    if bytes[..sig_len] != V1_SIGNATURE[..sig_len] {
        return Err(ParseError::NotProxyProtocol);
    }
    let Some(rest) = bytes.get(V1_SIGNATURE.len()..) else {
        return Ok(());
    };
    match rest.first() {
        None => return Ok(()),
        Some(b' ') => {}
        Some(_) => return Err(ParseError::V1Malformed("expected a space after PROXY")),
    }
    let rest = &rest[1..];
    let token_end = rest.iter().position(|&b| b == b' ');
    let token = &rest[..token_end.unwrap_or(rest.len())];
    if !V1_PROTOCOLS.iter().any(|p| p.starts_with(token)) {
        return Err(ParseError::V1Malformed(
            "unknown protocol (expected TCP4, TCP6 or UNKNOWN)",
        ));
    }
    let Some(token_end) = token_end else {
        return Ok(());
    };
    if !V1_PROTOCOLS.contains(&token) {
        return Err(ParseError::V1Malformed(
            "unknown protocol (expected TCP4, TCP6 or UNKNOWN)",
        ));
    }
    if token == V1_UNKNOWN {
        // The receiver must ignore whatever follows UNKNOWN up to the CRLF.
        return Ok(());
    }
    let addresses = &rest[token_end..];
    if addresses
        .iter()
        .any(|&b| !(b.is_ascii_hexdigit() || b == b'.' || b == b':' || b == b' '))
    {
        return Err(ParseError::V1Malformed(
            "invalid character in addresses or ports",
        ));
    }
    Ok(())
}

/// Parses a whole v1 line without its CRLF; `check_v1_prefix` has accepted it.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ParseError> {
    const BAD_PROTOCOL: ParseError =
        ParseError::V1Malformed("unknown protocol (expected TCP4, TCP6 or UNKNOWN)");
    let unknown = ProxyHeader {
        version: Version::V1,
        command: Command::Proxy,
        addrs: None,
    };
    // "PROXY " has been checked; the protocol token follows.
    let rest = line.get(V1_SIGNATURE.len() + 1..).ok_or(BAD_PROTOCOL)?;
    let token = rest.split(|&b| b == b' ').next().unwrap_or_default();
    if !V1_PROTOCOLS.contains(&token) {
        return Err(BAD_PROTOCOL);
    }
    if token == V1_UNKNOWN {
        return Ok(unknown);
    }
    // Only ASCII is left (checked by check_v1_prefix), so this cannot fail.
    let text = std::str::from_utf8(rest)
        .map_err(|_| ParseError::V1Malformed("invalid character in addresses or ports"))?;
    let mut fields = text.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ParseError::V1Malformed(
            "expected exactly: PROXY <protocol> <src> <dst> <sport> <dport>",
        ));
    };
    let (src_ip, dst_ip) = match proto.as_bytes() {
        V1_TCP4 => (
            parse_v1_ip::<Ipv4Addr>(src, "invalid IPv4 source address")?,
            parse_v1_ip::<Ipv4Addr>(dst, "invalid IPv4 destination address")?,
        ),
        V1_TCP6 => (
            parse_v1_ip::<Ipv6Addr>(src, "invalid IPv6 source address")?,
            parse_v1_ip::<Ipv6Addr>(dst, "invalid IPv6 destination address")?,
        ),
        _ => return Err(BAD_PROTOCOL),
    };
    let sport = parse_v1_port(sport).ok_or(ParseError::V1Malformed("invalid source port"))?;
    let dport = parse_v1_port(dport).ok_or(ParseError::V1Malformed("invalid destination port"))?;
    Ok(ProxyHeader {
        addrs: Some((
            SocketAddr::new(src_ip, sport),
            SocketAddr::new(dst_ip, dport),
        )),
        ..unknown
    })
}

fn parse_v1_ip<A>(text: &str, what: &'static str) -> Result<IpAddr, ParseError>
where
    A: std::str::FromStr + Into<IpAddr>,
{
    // std's parsers are strict enough for the specification: IPv4 needs exactly four decimal
    // numbers without leading zeroes, IPv6 needs at most one "::".
    text.parse::<A>()
        .map(Into::into)
        .map_err(|_| ParseError::V1Malformed(what))
}

/// A decimal port in 0..=65535 without sign or leading zeroes.
fn parse_v1_port(text: &str) -> Option<u16> {
    let bytes = text.as_bytes();
    let well_formed = !bytes.is_empty()
        && bytes.len() <= 5
        && bytes.iter().all(u8::is_ascii_digit)
        && (bytes.len() == 1 || bytes[0] != b'0');
    if !well_formed {
        return None;
    }
    text.parse::<u16>().ok()
}

// ---------------------------------------------------------------------------------------------
// v2

/// Size of the address block for a v2 family/transport byte, when the layout is known.
fn v2_address_len(family: u8) -> Option<usize> {
    match family {
        0x11 | 0x12 => Some(12),
        0x21 | 0x22 => Some(36),
        0x31 | 0x32 => Some(216),
        _ => None,
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ParseError> {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] != V2_SIGNATURE[..sig_len] {
        return Err(ParseError::NotProxyProtocol);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::V2BadVersion(ver_cmd >> 4));
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(ParseError::V2BadCommand(other)),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // For LOCAL the family is ignored; for PROXY both nibbles must be assigned values.
    if command == Command::Proxy && (family >> 4 > 3 || family & 0x0f > 2) {
        return Err(ParseError::V2BadFamily(family));
    }
    let (Some(&len_hi), Some(&len_lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let len = u16::from_be_bytes([len_hi, len_lo]);
    let address_len = v2_address_len(family);
    if let (Command::Proxy, Some(needed)) = (command, address_len) {
        if usize::from(len) < needed {
            return Err(ParseError::V2AddressTooShort {
                family,
                len,
                needed,
            });
        }
    }
    let total = V2_FIXED_LEN + usize::from(len);
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(Parsed::Incomplete);
    };

    // TLVs follow the address block when its layout is known (and, for LOCAL, when it fits).
    if let Some(tlvs) = address_len.and_then(|n| block.get(n..)) {
        check_tlvs(tlvs)?;
    }

    let addrs = match (command, family) {
        (Command::Proxy, 0x11) => {
            let ip =
                |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Some((
                SocketAddr::new(ip(0).into(), port(8)),
                SocketAddr::new(ip(4).into(), port(10)),
            ))
        }
        (Command::Proxy, 0x21) => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Some((
                SocketAddr::new(ip(0).into(), port(32)),
                SocketAddr::new(ip(16).into(), port(34)),
            ))
        }
        _ => None,
    };
    Ok(Parsed::Complete {
        header: ProxyHeader {
            version: Version::V2,
            command,
            addrs,
        },
        consumed: total,
    })
}

/// Walks the TLVs (1 type byte, 2 big-endian length bytes, value) and checks that they exactly
/// fill `tlvs`. Each step consumes at least 3 bytes, so this runs at most 65535 / 3 times.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ParseError> {
    while !tlvs.is_empty() {
        let [_ty, hi, lo, rest @ ..] = tlvs else {
            return Err(ParseError::V2BadTlv);
        };
        let value_len = usize::from(u16::from_be_bytes([*hi, *lo]));
        tlvs = rest.get(value_len..).ok_or(ParseError::V2BadTlv)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("expected a complete header for {buf:?}, got {other:?}"),
        }
    }

    fn v1(addrs: Option<(&str, &str)>) -> ProxyHeader {
        ProxyHeader {
            version: Version::V1,
            command: Command::Proxy,
            addrs: addrs.map(|(s, d)| (sa(s), sa(d))),
        }
    }

    fn v2(command: Command, addrs: Option<(&str, &str)>) -> ProxyHeader {
        ProxyHeader {
            version: Version::V2,
            command,
            addrs: addrs.map(|(s, d)| (sa(s), sa(d))),
        }
    }

    /// A v2 header with the given version/command byte, family byte and block.
    fn v2_raw(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    const V4_BLOCK: [u8; 12] = [10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0x01, 0xbb];

    fn valid_headers() -> Vec<Vec<u8>> {
        let mut tlv_block = V4_BLOCK.to_vec();
        tlv_block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        let mut v1_tcp4 = Vec::new();
        encode_v1(
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
            &mut v1_tcp4,
        );
        let mut v1_tcp6 = Vec::new();
        encode_v1(
            sa("[2001:db8::1]:1"),
            sa("[2001:db8::2]:65535"),
            &mut v1_tcp6,
        );
        let mut v2_tcp4 = Vec::new();
        encode_v2(sa("10.0.0.1:12345"), sa("10.0.0.2:443"), &mut v2_tcp4);
        let mut v2_tcp6 = Vec::new();
        encode_v2(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"), &mut v2_tcp6);
        vec![
            v1_tcp4,
            v1_tcp6,
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN whatever the sender likes\r\n".to_vec(),
            v2_tcp4,
            v2_tcp6,
            v2_raw(0x20, 0x00, &[]),
            v2_raw(0x21, 0x00, &[1, 2, 3]),
            v2_raw(0x21, 0x11, &tlv_block),
        ]
    }

    // ----- v1 --------------------------------------------------------------------------------

    #[test]
    fn v1_spec_example() {
        let buf = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";
        let (header, consumed) = complete(buf);
        assert_eq!(header, v1(Some(("192.168.0.1:56324", "192.168.0.11:443"))));
        assert_eq!(&buf[consumed..consumed + 5], b"GET /");
        assert_eq!(consumed, 47);
    }

    #[test]
    fn v1_longest_lines_of_the_spec() {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(tcp4.len(), 56);
        let (header, consumed) = complete(tcp4);
        assert_eq!(consumed, 56);
        assert_eq!(
            header,
            v1(Some(("255.255.255.255:65535", "255.255.255.255:65535")))
        );

        let tcp6 = format!("PROXY TCP6 {f} {f} 65535 65535\r\n");
        assert_eq!(tcp6.len(), 104);
        let (header, consumed) = complete(tcp6.as_bytes());
        assert_eq!(consumed, 104);
        let max = format!("[{f}]:65535");
        assert_eq!(header, v1(Some((&max, &max))));

        let (header, consumed) = complete(b"PROXY UNKNOWN\r\n");
        assert_eq!((header, consumed), (v1(None), 15));

        let worst = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_eq!(complete(worst.as_bytes()), (v1(None), V1_MAX_LEN));
    }

    #[test]
    fn v1_too_long() {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        // 108 bytes: the CR is the 107th byte, the LF the 108th.
        let line = format!("PROXY UNKNOWN {f} {f} 65535 655350\r\n");
        assert_eq!(line.len(), V1_MAX_LEN + 1);
        assert_eq!(parse(line.as_bytes()), Err(ParseError::V1TooLong));
        assert_eq!(
            parse(&line.as_bytes()[..V1_MAX_LEN]),
            Err(ParseError::V1TooLong)
        );
        assert_eq!(
            parse(&line.as_bytes()[..V1_MAX_LEN - 1]),
            Ok(Parsed::Incomplete)
        );
        // Padding without any CRLF.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(500, b'x');
        assert_eq!(parse(&long), Err(ParseError::V1TooLong));
    }

    #[test]
    fn v1_bad_ports() {
        for port in [
            "65536", "99999", "-1", "+80", "080", "00", "", "8o", "123456", "0x50",
        ] {
            for line in [
                format!("PROXY TCP4 1.2.3.4 5.6.7.8 {port} 80\r\n"),
                format!("PROXY TCP4 1.2.3.4 5.6.7.8 80 {port}\r\n"),
            ] {
                assert!(
                    matches!(parse(line.as_bytes()), Err(ParseError::V1Malformed(_))),
                    "{line:?} must be rejected, got {:?}",
                    parse(line.as_bytes())
                );
            }
        }
        // Zero itself is a valid port.
        let (header, _) = complete(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0\r\n");
        assert_eq!(header, v1(Some(("1.2.3.4:0", "5.6.7.8:0"))));
    }

    #[test]
    fn v1_bad_addresses() {
        for line in [
            "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
            "PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            "PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            "PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n",
            "PROXY TCP6 ::1 1::2::3 1 2\r\n",
            "PROXY TCP6 ::1 12345::1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(line.as_bytes()), Err(ParseError::V1Malformed(_))),
                "{line:?} must be rejected, got {:?}",
                parse(line.as_bytes())
            );
        }
    }

    #[test]
    fn v1_bad_structure() {
        for line in [
            "PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            "PROXY TCP4\r\n",
            "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY UNKNOW\r\n",
            "PROXY UNKNOWNX\r\n",
            "PROXY \r\n",
            "PROXY\r\n",
            "PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(parse(line.as_bytes()), Err(ParseError::V1Malformed(_))),
                "{line:?} must be rejected, got {:?}",
                parse(line.as_bytes())
            );
        }
        assert_eq!(parse(b"proxy TCP4"), Err(ParseError::NotProxyProtocol));
    }

    #[test]
    fn v1_requires_crlf() {
        for line in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
            b"PROXY UNKNOWN\n",
            b"PROXY UNKNOWN x\ry\r\n",
            b"PROXY\n",
        ] {
            assert_eq!(parse(line), Err(ParseError::V1BadLineEnding), "{line:?}");
        }
        // A CR alone at the end may still be followed by its LF.
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
            Ok(Parsed::Incomplete)
        );
    }

    #[test]
    fn v1_rejects_early_without_crlf() {
        assert_eq!(parse(b"PROXX"), Err(ParseError::NotProxyProtocol));
        assert_eq!(parse(b"PX"), Err(ParseError::NotProxyProtocol));
        assert!(matches!(parse(b"PROXY_"), Err(ParseError::V1Malformed(_))));
        assert!(matches!(
            parse(b"PROXY TCX"),
            Err(ParseError::V1Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 zz"),
            Err(ParseError::V1Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP6 \0"),
            Err(ParseError::V1Malformed(_))
        ));
        // Anything may follow UNKNOWN.
        assert_eq!(parse(b"PROXY UNKNOWN \xff\0 zz"), Ok(Parsed::Incomplete));
    }

    // ----- v2 --------------------------------------------------------------------------------

    #[test]
    fn v2_captured_example() {
        // haproxy's `send-proxy-v2` in front of `curl http://localhost:8080/`, as captured on
        // the wire: TCP4 172.19.0.1:42578 -> 172.19.0.3:80, then the HTTP request.
        let buf: &[u8] = &[
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
            0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50,
            b'G', b'E', b'T', b' ',
        ];
        let (header, consumed) = complete(buf);
        assert_eq!(
            header,
            v2(Command::Proxy, Some(("172.19.0.1:42578", "172.19.0.3:80")))
        );
        assert_eq!(consumed, 28);
        assert_eq!(&buf[consumed..], b"GET ");
    }

    #[test]
    fn v2_tcp6() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0xff, 0xff, 0x00, 0x01]);
        let mut buf = v2_raw(0x21, 0x21, &block);
        buf.extend_from_slice(b"payload");
        let (header, consumed) = complete(&buf);
        assert_eq!(consumed, 52);
        assert_eq!(
            header,
            v2(
                Command::Proxy,
                Some(("[2001:db8::1]:65535", "[2001:db8::2]:1"))
            )
        );
    }

    #[test]
    fn v2_local_ignores_family_and_addresses() {
        assert_eq!(
            complete(&v2_raw(0x20, 0x00, &[])),
            (v2(Command::Local, None), 16)
        );
        // Addresses may be present; they are skipped.
        assert_eq!(
            complete(&v2_raw(0x20, 0x11, &V4_BLOCK)),
            (v2(Command::Local, None), 28)
        );
        // The family byte is not interpreted for LOCAL, not even an unassigned one.
        assert_eq!(
            complete(&v2_raw(0x20, 0xff, &[1, 2, 3])),
            (v2(Command::Local, None), 19)
        );
    }

    #[test]
    fn v2_unspec_and_non_tcp_families_have_no_addresses() {
        assert_eq!(
            complete(&v2_raw(0x21, 0x00, &[])),
            (v2(Command::Proxy, None), 16)
        );
        assert_eq!(
            complete(&v2_raw(0x21, 0x00, &[0xde, 0xad])),
            (v2(Command::Proxy, None), 18)
        );
        // UDP over IPv4, UNIX stream: valid, but not usable by a TCP proxy.
        assert_eq!(
            complete(&v2_raw(0x21, 0x12, &V4_BLOCK)),
            (v2(Command::Proxy, None), 28)
        );
        assert_eq!(
            complete(&v2_raw(0x21, 0x31, &[0u8; 216])),
            (v2(Command::Proxy, None), 16 + 216)
        );
    }

    #[test]
    fn v2_bad_fixed_header() {
        assert_eq!(
            parse(&v2_raw(0x11, 0x11, &V4_BLOCK)),
            Err(ParseError::V2BadVersion(1))
        );
        assert_eq!(
            parse(&v2_raw(0x31, 0x11, &V4_BLOCK)),
            Err(ParseError::V2BadVersion(3))
        );
        assert_eq!(
            parse(&v2_raw(0x22, 0x11, &V4_BLOCK)),
            Err(ParseError::V2BadCommand(2))
        );
        assert_eq!(
            parse(&v2_raw(0x21, 0x41, &V4_BLOCK)),
            Err(ParseError::V2BadFamily(0x41))
        );
        assert_eq!(
            parse(&v2_raw(0x21, 0x13, &V4_BLOCK)),
            Err(ParseError::V2BadFamily(0x13))
        );
        // Errors come as soon as the offending byte is there.
        assert_eq!(
            parse(&v2_raw(0x31, 0x11, &V4_BLOCK)[..13]),
            Err(ParseError::V2BadVersion(3))
        );
        assert_eq!(
            parse(&v2_raw(0x21, 0x41, &V4_BLOCK)[..14]),
            Err(ParseError::V2BadFamily(0x41))
        );
    }

    #[test]
    fn v2_length_too_short_for_the_family() {
        let short = v2_raw(0x21, 0x11, &V4_BLOCK[..11]);
        let expected = Err(ParseError::V2AddressTooShort {
            family: 0x11,
            len: 11,
            needed: 12,
        });
        assert_eq!(parse(&short), expected);
        // Known from the fixed part alone: no need to wait for the block.
        assert_eq!(parse(&short[..16]), expected);
        assert!(matches!(
            parse(&v2_raw(0x21, 0x21, &[0u8; 35])),
            Err(ParseError::V2AddressTooShort { needed: 36, .. })
        ));
        assert!(matches!(
            parse(&v2_raw(0x21, 0x11, &[])),
            Err(ParseError::V2AddressTooShort { needed: 12, .. })
        ));
    }

    #[test]
    fn v2_tlvs_are_skipped_but_length_checked() {
        let with_tlvs = |tlvs: &[u8]| {
            let mut block = V4_BLOCK.to_vec();
            block.extend_from_slice(tlvs);
            v2_raw(0x21, 0x11, &block)
        };
        let expected = v2(Command::Proxy, Some(("10.0.0.1:12345", "10.0.0.2:443")));
        // ALPN "h2", an empty NOOP, a custom TLV.
        let tlvs = [
            0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00, 0xe0, 0x00, 0x01, 0x7f,
        ];
        let buf = with_tlvs(&tlvs);
        assert_eq!(complete(&buf), (expected, 28 + tlvs.len()));

        for bad in [
            &[0x01][..],
            &[0x01, 0x00],
            &[0x01, 0x00, 0x03, b'h', b'2'],
            &[0x04, 0x00, 0x00, 0x01],
            &[0x04, 0xff, 0xff, 0x00],
        ] {
            assert_eq!(parse(&with_tlvs(bad)), Err(ParseError::V2BadTlv), "{bad:?}");
        }
        // LOCAL with a known family: TLVs after the addresses are checked as well.
        let mut block = V4_BLOCK.to_vec();
        block.push(0x04);
        assert_eq!(
            parse(&v2_raw(0x20, 0x11, &block)),
            Err(ParseError::V2BadTlv)
        );
    }

    #[test]
    fn v2_largest_header() {
        let block = vec![0u8; usize::from(u16::MAX)];
        let buf = v2_raw(0x21, 0x00, &block);
        assert_eq!(buf.len(), MAX_HEADER_LEN);
        assert_eq!(parse(&buf[..MAX_HEADER_LEN - 1]), Ok(Parsed::Incomplete));
        assert_eq!(complete(&buf), (v2(Command::Proxy, None), MAX_HEADER_LEN));
    }

    // ----- both ------------------------------------------------------------------------------

    #[test]
    fn every_truncation_of_a_valid_header_is_incomplete() {
        for header in valid_headers() {
            for cut in 0..header.len() {
                assert_eq!(
                    parse(&header[..cut]),
                    Ok(Parsed::Incomplete),
                    "{header:?} cut at {cut}"
                );
            }
            let (_, consumed) = complete(&header);
            assert_eq!(consumed, header.len());
        }
    }

    #[test]
    fn trailing_payload_is_not_consumed() {
        for header in valid_headers() {
            let mut buf = header.clone();
            buf.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\nPROXY payload");
            assert_eq!(complete(&buf), complete(&header));
        }
    }

    #[test]
    fn other_protocols_are_rejected_on_their_first_byte() {
        for b in 0..=u8::MAX {
            let expected = if b == b'P' || b == b'\r' {
                Ok(Parsed::Incomplete)
            } else {
                Err(ParseError::NotProxyProtocol)
            };
            assert_eq!(parse(&[b]), expected, "first byte {b:#04x}");
        }
        // A TLS ClientHello, an HTTP request, an SSH banner.
        for first in [
            &b"\x16\x03\x01"[..],
            b"GET / HTTP/1.1\r\n",
            b"SSH-2.0-x\r\n",
        ] {
            assert_eq!(parse(first), Err(ParseError::NotProxyProtocol));
        }
        // Diverging from the v2 signature after a common prefix.
        assert_eq!(parse(b"\r\n\r\nX"), Err(ParseError::NotProxyProtocol));
        assert_eq!(
            parse(b"\r\n\r\n\0\r\nQUIT\r"),
            Err(ParseError::NotProxyProtocol)
        );
    }

    #[test]
    fn encode_exact_bytes() {
        let mut out = Vec::new();
        encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443"), &mut out);
        assert_eq!(out, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");

        out.clear();
        encode_v1(sa("[2001:db8::1]:1"), sa("[::1]:2"), &mut out);
        assert_eq!(out, b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n");

        out.clear();
        encode_v2(sa("172.19.0.1:42578"), sa("172.19.0.3:80"), &mut out);
        assert_eq!(
            out,
            [
                0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11,
                0x00, 0x0c, 0xac, 0x13, 0x00, 0x01, 0xac, 0x13, 0x00, 0x03, 0xa6, 0x52, 0x00, 0x50,
            ]
        );

        out.clear();
        encode_v2(sa("[::1]:1"), sa("[::2]:2"), &mut out);
        assert_eq!(out.len(), 52);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0x00, 0x24]);
    }

    #[test]
    fn encode_mixed_families_as_v4_mapped_v6() {
        let (v4, v6) = (sa("192.0.2.1:1000"), sa("[2001:db8::1]:2000"));
        let mapped = sa("[::ffff:192.0.2.1]:1000");

        let mut out = Vec::new();
        encode_v1(v4, v6, &mut out);
        assert_eq!(
            out,
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1000 2000\r\n"
        );
        assert_eq!(complete(&out).0.addrs, Some((mapped, v6)));

        out.clear();
        encode_v2(v6, v4, &mut out);
        assert_eq!(out[13], 0x21);
        assert_eq!(complete(&out).0.addrs, Some((v6, mapped)));
    }

    #[test]
    fn errors_display_clearly() {
        assert_eq!(
            ParseError::NotProxyProtocol.to_string(),
            "not a PROXY protocol header: the first bytes match neither the v1 nor the v2 signature"
        );
        assert_eq!(
            ParseError::V1Malformed("invalid source port").to_string(),
            "malformed PROXY v1 line: invalid source port"
        );
        assert_eq!(
            ParseError::V2AddressTooShort {
                family: 0x11,
                len: 4,
                needed: 12
            }
            .to_string(),
            "PROXY v2 header length 4 too short for family 0x11 (needs 12)"
        );
    }

    // ----- properties ------------------------------------------------------------------------

    /// The addresses `parse` gives back for a header encoded from `(src, dst)`.
    fn as_encoded(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
        match same_family(src, dst) {
            Endpoints::V4(s, d) => (
                SocketAddr::new(s.into(), src.port()),
                SocketAddr::new(d.into(), dst.port()),
            ),
            Endpoints::V6(s, d) => (
                SocketAddr::new(s.into(), src.port()),
                SocketAddr::new(d.into(), dst.port()),
            ),
        }
    }

    fn any_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
            // Addresses whose text form is special: unspecified, loopback, mapped, compressed.
            (
                prop::sample::select(vec![
                    "0.0.0.0",
                    "::",
                    "::1",
                    "::ffff:10.1.2.3",
                    "1::",
                    "1:0:0:1::",
                    "fe80::1:0:0:0"
                ]),
                any::<u16>()
            )
                .prop_map(|(ip, port)| SocketAddr::new(ip.parse().unwrap(), port)),
        ]
    }

    /// Bytes that often look like the start of a header, sometimes a broken one.
    fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let mutated = (
            any_socket_addr(),
            any_socket_addr(),
            any::<bool>(),
            any::<usize>(),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(src, dst, use_v2, at, byte, tail)| {
                let mut out = Vec::new();
                if use_v2 {
                    encode_v2(src, dst, &mut out);
                } else {
                    encode_v1(src, dst, &mut out);
                }
                let at = at % out.len();
                out[at] = byte;
                out.extend_from_slice(&tail);
                out
            });
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..300),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|tail| {
                let mut out = b"PROXY ".to_vec();
                out.extend_from_slice(&tail);
                out
            }),
            prop::collection::vec(
                prop::sample::select(b"PROXYTCP46UNKNOWabcdef0123456789.: \r\n".to_vec()),
                0..130
            ),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|tail| {
                let mut out = V2_SIGNATURE.to_vec();
                out.extend_from_slice(&tail);
                out
            }),
            mutated,
        ]
    }

    proptest! {
        #[test]
        fn roundtrip_v1(src in any_socket_addr(), dst in any_socket_addr(),
                        payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = Vec::new();
            encode_v1(src, dst, &mut buf);
            let len = buf.len();
            prop_assert!(len <= 104);
            buf.extend_from_slice(&payload);
            prop_assert_eq!(parse(&buf), Ok(Parsed::Complete {
                header: ProxyHeader {
                    version: Version::V1,
                    command: Command::Proxy,
                    addrs: Some(as_encoded(src, dst)),
                },
                consumed: len,
            }));
        }

        #[test]
        fn roundtrip_v2(src in any_socket_addr(), dst in any_socket_addr(),
                        payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = Vec::new();
            encode_v2(src, dst, &mut buf);
            let len = buf.len();
            prop_assert!(len == 28 || len == 52);
            buf.extend_from_slice(&payload);
            prop_assert_eq!(parse(&buf), Ok(Parsed::Complete {
                header: ProxyHeader {
                    version: Version::V2,
                    command: Command::Proxy,
                    addrs: Some(as_encoded(src, dst)),
                },
                consumed: len,
            }));
        }

        /// A receiver that appends each chunk and parses again gets the same answer as one
        /// that parses the whole stream at once, whatever the chunk sizes.
        #[test]
        fn chunking_does_not_change_the_result(
            src in any_socket_addr(),
            dst in any_socket_addr(),
            use_v2 in any::<bool>(),
            payload in prop::collection::vec(any::<u8>(), 0..64),
            chunks in prop::collection::vec(1usize..16, 1..120),
        ) {
            let mut stream = Vec::new();
            if use_v2 {
                encode_v2(src, dst, &mut stream);
            } else {
                encode_v1(src, dst, &mut stream);
            }
            let header_len = stream.len();
            stream.extend_from_slice(&payload);
            let whole = parse(&stream);

            let mut received = Vec::new();
            let mut rest = &stream[..];
            let mut answer = Ok(Parsed::Incomplete);
            for size in chunks.iter().copied().chain(std::iter::repeat(16)) {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at(size.min(rest.len()));
                received.extend_from_slice(chunk);
                rest = tail;
                answer = parse(&received);
                if answer != Ok(Parsed::Incomplete) {
                    break;
                }
                prop_assert!(received.len() < header_len);
            }
            prop_assert_eq!(answer, whole);
        }

        /// Whatever the bytes: no panic, no Incomplete past the header length caps, and an
        /// answer given for a prefix never changes as more bytes arrive.
        #[test]
        fn garbage_is_answered_consistently(buf in header_like_bytes()) {
            let whole = parse(&buf);
            if whole == Ok(Parsed::Incomplete) {
                prop_assert!(buf.len() < MAX_HEADER_LEN);
                if buf.first() == Some(&b'P') {
                    prop_assert!(buf.len() < V1_MAX_LEN);
                }
            }
            if let Ok(Parsed::Complete { consumed, .. }) = whole {
                prop_assert!(consumed <= buf.len());
            }
            for cut in 0..buf.len() {
                let early = parse(&buf[..cut]);
                if early != Ok(Parsed::Incomplete) {
                    prop_assert_eq!(early, whole, "prefix of {} bytes", cut);
                    break;
                }
            }
        }
    }
}
