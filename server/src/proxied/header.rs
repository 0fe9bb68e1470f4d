//! The PROXY protocol header (HAProxy's, versions 1 and 2): what a TCP
//! proxy in front of port 9999 sends first on each connection to name the
//! client it accepted it from.
//!
//! A connection from a peer in `--proxy-protocol-from` must begin with
//! one header, before the TLS handshake (or, in plaintext, the `Hello`
//! frame); the bytes after it are the client's. Both versions are read,
//! as far as an address is concerned (the byte layout is in
//! `docs/protocol.md`, "Behind a TCP proxy", with test vectors):
//!
//! ```text
//! v1: "PROXY TCP4 192.0.2.7 10.0.0.1 56324 9999\r\n"      (at most 107 bytes)
//! v2: 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   signature (12 bytes)
//!     21                                    version 2, command PROXY (20: LOCAL)
//!     11                                    TCP over IPv4 (21: over IPv6; 00: unspecified)
//!     00 0C                                 length of what follows, big-endian
//!     C0 00 02 07  0A 00 00 01  DC 04  27 0F   source, destination, ports
//!     (TLVs up to the length: type, 2-byte length, value)
//! ```
//!
//! Invariants:
//! - Exactly the header's bytes are read: the first 15, then up to the
//!   v1 line's end or the v2 length. Nothing the client sent after it is
//!   consumed.
//! - A v1 line is at most 107 bytes and a v2 header at most
//!   [`V2_MAX_LEN`] bytes after its first 16, so a header allocates at
//!   most that much; the caller bounds its time (the handshake timeout).
//! - Anything else refuses the connection ([`HeaderError`]): no header, a
//!   bad signature, version or command, an address that does not parse or
//!   is not of the family named, UDP or Unix sockets. The specification
//!   asks receivers never to guess.
//! - `LOCAL` (v2) says the connection is the proxy's own, such as a
//!   health check: the peer is then the client ([`Header::Local`]), and
//!   the rest of the header is read past. `UNKNOWN` (v1) and a v2 `PROXY`
//!   of the unspecified family relay a client the proxy cannot name:
//!   refused ([`HeaderError::UnknownClient`]), never taken for the proxy's
//!   own connection.
//! - The TLVs after a v2 `PROXY` header's addresses must fill the rest of
//!   its length exactly, and a `PP2_TYPE_CRC32C` among them (HAProxy's
//!   `proxy-v2-options crc32c`) must match the header's bytes, as the
//!   specification asks of a receiver that checks it; other TLVs are read
//!   past.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The first 12 bytes of a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, `\r\n` included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The most bytes accepted after a version 2 header's first 16: addresses
/// and TLVs (the largest address block, of Unix sockets, is 216 bytes).
pub const V2_MAX_LEN: usize = 2048;
/// Bytes read before the version is known: the shortest header
/// (`PROXY UNKNOWN\r\n`).
const FIRST: usize = 15;
/// The TLV type of a CRC32c of the whole v2 header (`PP2_TYPE_CRC32C`).
pub const PP2_TYPE_CRC32C: u8 = 0x03;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The proxy accepted the connection from this client.
    Proxied(SocketAddr),
    /// The connection is the proxy's own (a health check), or the proxy
    /// does not know the client: the peer is the client.
    Local,
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not begin with a PROXY protocol header")]
    Missing,
    /// The connection ended before its first byte: a TCP health check of
    /// the proxy's or a load balancer's, not a misconfigured proxy.
    #[error("the connection ended before its first byte")]
    Closed,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error(
        "PROXY protocol v2 header of {0} bytes after its first 16, over the limit of {V2_MAX_LEN}"
    )]
    TooLong(usize),
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
    /// `PROXY UNKNOWN` (v1) or a v2 `PROXY` of the unspecified family: a
    /// connection the proxy relays for a client whose address it does
    /// not know. Taking the proxy's address for the client's would pass
    /// source rules meant for the client and write the proxy's into the
    /// audit trail, so it is refused (the specification leaves a receiver
    /// free to).
    #[error(
        "the PROXY protocol header relays a client whose address the proxy does not know \
         (UNKNOWN or an unspecified family): refused, since source rules and the audit trail \
         need the client's address"
    )]
    UnknownClient,
}

/// Reads one header from the start of `r`, and nothing after it.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, HeaderError> {
    let mut first = [0u8; FIRST];
    // Nothing at all is a probe that connects and closes, not a header.
    if r.read(&mut first[..1]).await.map_err(HeaderError::Io)? == 0 {
        return Err(HeaderError::Closed);
    }
    r.read_exact(&mut first[1..])
        .await
        .map_err(eof_is_missing)?;
    if first[..12] == V2_SIGNATURE {
        let mut head = [0u8; 16];
        head[..FIRST].copy_from_slice(&first);
        head[FIRST] = r.read_u8().await.map_err(eof_is_missing)?;
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if len > V2_MAX_LEN {
            return Err(HeaderError::TooLong(len));
        }
        let mut rest = vec![0u8; len];
        r.read_exact(&mut rest).await.map_err(eof_is_missing)?;
        return parse_v2(&head, &rest);
    }
    if !first.starts_with(b"PROXY ") {
        return Err(HeaderError::Missing);
    }
    let mut line = first.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(HeaderError::Malformed("a v1 line longer than 107 bytes"));
        }
        line.push(r.read_u8().await.map_err(eof_is_missing)?);
    }
    parse_v1(&line)
}

fn eof_is_missing(e: std::io::Error) -> HeaderError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HeaderError::Malformed("the connection ended inside the header")
    } else {
        HeaderError::Io(e)
    }
}

/// A version 1 line, `\r\n` included.
pub fn parse_v1(line: &[u8]) -> Result<Header, HeaderError> {
    let malformed = HeaderError::Malformed;
    if line.len() > V1_MAX {
        return Err(malformed("a v1 line longer than 107 bytes"));
    }
    let text = line
        .strip_suffix(b"\r\n")
        .ok_or(malformed("a v1 line must end with CRLF"))?;
    let text = std::str::from_utf8(text).map_err(|_| malformed("a v1 line must be ASCII"))?;
    if !text.is_ascii() || text.contains(['\r', '\n']) {
        return Err(malformed("a v1 line must be one line of ASCII"));
    }
    let mut words = text.split(' ');
    if words.next() != Some("PROXY") {
        return Err(HeaderError::Missing);
    }
    let family = words
        .next()
        .ok_or(malformed("a v1 line names no protocol"))?;
    let v6 = match family {
        "UNKNOWN" => return Err(HeaderError::UnknownClient),
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(malformed("a v1 protocol other than TCP4, TCP6 or UNKNOWN")),
    };
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed(
            "a v1 line must name two addresses and two ports, one space apart",
        ));
    };
    let src_ip = address(src, v6)?;
    address(dst, v6)?;
    let src_port = port(sport)?;
    port(dport)?;
    Ok(Header::Proxied(SocketAddr::new(src_ip, src_port)))
}

fn address(s: &str, v6: bool) -> Result<IpAddr, HeaderError> {
    let ip = if v6 {
        s.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        s.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| HeaderError::Malformed("a v1 address that does not parse as its protocol's"))
}

fn port(s: &str) -> Result<u16, HeaderError> {
    let bad = HeaderError::Malformed("a v1 port must be a decimal number from 0 to 65535");
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return Err(bad);
    }
    s.parse().map_err(|_| bad)
}

/// A version 2 header: its first 16 bytes and the `len` bytes after them.
pub fn parse_v2(head: &[u8; 16], rest: &[u8]) -> Result<Header, HeaderError> {
    let malformed = HeaderError::Malformed;
    if head[..12] != V2_SIGNATURE {
        return Err(HeaderError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_LEN {
        return Err(HeaderError::TooLong(len));
    }
    if rest.len() != len {
        return Err(malformed(
            "a v2 header whose length is not that of its addresses and TLVs",
        ));
    }
    if head[12] >> 4 != 2 {
        return Err(malformed("a v2 signature with a version other than 2"));
    }
    match head[12] & 0x0f {
        0x0 => return Ok(Header::Local),
        0x1 => {}
        _ => return Err(malformed("a v2 command other than LOCAL or PROXY")),
    }
    match head[13] {
        0x00 => Err(HeaderError::UnknownClient),
        0x11 => {
            let a: &[u8; 12] = rest
                .get(..12)
                .and_then(|a| a.try_into().ok())
                .ok_or(malformed(
                    "a v2 IPv4 header shorter than its 12 address bytes",
                ))?;
            check_tlvs(head, rest, 12)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let port = u16::from_be_bytes([a[8], a[9]]);
            Ok(Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        0x21 => {
            let a: &[u8; 36] = rest
                .get(..36)
                .and_then(|a| a.try_into().ok())
                .ok_or(malformed(
                    "a v2 IPv6 header shorter than its 36 address bytes",
                ))?;
            check_tlvs(head, rest, 36)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            let port = u16::from_be_bytes([a[32], a[33]]);
            Ok(Header::Proxied(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                port,
            )))
        }
        0x12 | 0x22 | 0x31 | 0x32 => Err(malformed(
            "a v2 header for UDP or a Unix socket, not a TCP connection over IP",
        )),
        _ => Err(malformed(
            "a v2 address family or transport that does not exist",
        )),
    }
}

/// The TLVs of a v2 header after its `addresses` bytes of `rest`: each a
/// type, a big-endian length and that many bytes, filling `rest` exactly;
/// at most one CRC32c (4 bytes, big-endian), which must be that of the
/// whole header with its own value read as zeros.
fn check_tlvs(head: &[u8; 16], rest: &[u8], addresses: usize) -> Result<(), HeaderError> {
    let malformed = HeaderError::Malformed;
    let mut at = addresses;
    let mut crc = None;
    while at < rest.len() {
        let [kind, hi, lo] = rest
            .get(at..at + 3)
            .and_then(|t| <[u8; 3]>::try_from(t).ok())
            .ok_or(malformed("a v2 TLV cut short in its type and length"))?;
        let value = at + 3..at + 3 + usize::from(u16::from_be_bytes([hi, lo]));
        let bytes = rest
            .get(value.clone())
            .ok_or(malformed("a v2 TLV longer than what is left of the header"))?;
        if kind == PP2_TYPE_CRC32C {
            let sum = <[u8; 4]>::try_from(bytes)
                .map_err(|_| malformed("a v2 CRC32c TLV whose value is not 4 bytes"))?;
            if crc
                .replace((value.start, u32::from_be_bytes(sum)))
                .is_some()
            {
                return Err(malformed("a v2 header with two CRC32c TLVs"));
            }
        }
        at = value.end;
    }
    if let Some((at, sum)) = crc {
        let mut whole = [&head[..], rest].concat();
        whole[head.len() + at..][..4].fill(0);
        if crc32c::crc32c(&whole) != sum {
            return Err(malformed(
                "a v2 header whose CRC32c does not match its bytes",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors of `docs/protocol.md`, "Behind a TCP proxy": hex,
    /// and what each says.
    pub(crate) const VECTORS: &[(&str, &str)] = &[
        (
            "50524f58592054435034203139322e302e322e372031302e302e302e312035363332342039393939\
             0d0a",
            "192.0.2.7:56324",
        ),
        (
            "0d0a0d0a000d0a515549540a2111000cc00002070a000001dc04270f",
            "192.0.2.7:56324",
        ),
        (
            "0d0a0d0a000d0a515549540a2121002420010db800000000000000000000000720010db8\
             0000000000000000000000010000270f",
            "[2001:db8::7]:0",
        ),
        ("0d0a0d0a000d0a515549540a20000000", "local"),
        (
            "0d0a0d0a000d0a515549540a21110018c00002070a000001dc04270f\
             0300044a9fee57 0400020000",
            "192.0.2.7:56324",
        ),
    ];

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn said(h: Header) -> String {
        match h {
            Header::Proxied(a) => a.to_string(),
            Header::Local => "local".into(),
        }
    }

    async fn read_all(bytes: &[u8]) -> (Result<Header, HeaderError>, Vec<u8>) {
        let mut r = bytes;
        let got = read(&mut r).await;
        (got, r.to_vec())
    }

    #[tokio::test]
    async fn the_documented_vectors_read_as_documented_and_leave_what_follows() {
        let doc = include_str!("../../../docs/protocol.md");
        for (hex, want) in VECTORS {
            let bytes = unhex(hex);
            let shown: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert!(
                doc.replace([' ', '\n'], "").contains(&shown),
                "docs/protocol.md lacks the vector {shown}"
            );
            let mut stream = bytes.clone();
            stream.extend_from_slice(b"\x16\x03\x01 the client's bytes");
            let (got, left) = read_all(&stream).await;
            assert_eq!(said(got.expect("reads")), *want, "{hex}");
            assert_eq!(left, b"\x16\x03\x01 the client's bytes", "{hex}");
        }
    }

    #[tokio::test]
    async fn every_cut_of_a_header_is_a_clean_error() {
        for (hex, _) in VECTORS {
            let bytes = unhex(hex);
            // Nothing at all is a probe that closed; any cut after the
            // first byte, a header cut short.
            let (got, _) = read_all(&[]).await;
            assert!(matches!(got, Err(HeaderError::Closed)), "{got:?}");
            for cut in 1..bytes.len() {
                let (got, _) = read_all(&bytes[..cut]).await;
                assert!(
                    matches!(got, Err(HeaderError::Malformed(_))),
                    "{hex} cut at {cut}: {got:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn what_is_not_a_header_is_refused() {
        let v2 = |ver_cmd: u8, fam: u8, rest: &[u8]| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[ver_cmd, fam]);
            h.extend_from_slice(&u16::try_from(rest.len()).expect("len").to_be_bytes());
            h.extend_from_slice(rest);
            h
        };
        let missing: &[&[u8]] = &[
            // A TLS ClientHello and a protocol frame, as a client that
            // skipped the proxy would send them.
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 and more bytes",
            b"FVLT\x01\x01\x00\x00\x00\x00\x00\x01\x00\x00\x00\x10",
            b"GET / HTTP/1.1\r\n\r\n",
            b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ];
        for bytes in missing {
            let (got, _) = read_all(bytes).await;
            assert!(
                matches!(got, Err(HeaderError::Missing)),
                "{bytes:?}: {got:?}"
            );
        }
        let malformed: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 9999 x\r\n".to_vec(),
            b"PROXY TCP4  192.0.2.7 10.0.0.1 56324 9999\r\n".to_vec(),
            b"PROXY TCP4 2001:db8::7 10.0.0.1 56324 9999\r\n".to_vec(),
            b"PROXY TCP6 192.0.2.7 2001:db8::1 56324 9999\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 9999\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 9999\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 9999\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.07 10.0.0.1 1 9999\r\n".to_vec(),
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 9999\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 9999\n\r\n".to_vec(),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 \xff9999\r\n".to_vec(),
            [&b"PROXY UNKNOWN "[..], &[b'x'; 100], b"\r\n"].concat(),
            b"PROXY UNKNOWNX\r\n".to_vec(),
            v2(0x11, 0x11, &[0; 12]),
            v2(0x22, 0x11, &[0; 12]),
            v2(0x21, 0x11, &[0; 11]),
            v2(0x21, 0x21, &[0; 35]),
            v2(0x21, 0x12, &[0; 12]),
            v2(0x21, 0x31, &[0; 216]),
            v2(0x21, 0x41, &[0; 12]),
            // TLVs that do not fill the rest: cut in their type and
            // length, longer than the rest.
            v2(0x21, 0x11, &[7; 40]),
            v2(0x21, 0x11, &[&[7u8; 12][..], &[0x04, 0x00]].concat()),
            v2(
                0x21,
                0x21,
                &[&[7u8; 36][..], &[0x04, 0x00, 0x03, 0, 0]].concat(),
            ),
        ];
        for bytes in &malformed {
            let (got, _) = read_all(bytes).await;
            assert!(
                matches!(got, Err(HeaderError::Malformed(_))),
                "{:?}: {got:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A length over the limit is refused before anything more is read.
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (got, left) = read_all(&[&long[..], &[0; 64]].concat()).await;
        assert!(matches!(got, Err(HeaderError::TooLong(65535))), "{got:?}");
        assert_eq!(left.len(), 64);
        // TLVs after the addresses that fill the header are read past;
        // LOCAL and the unspecified family say nothing of the client.
        let tlvs = [&[7u8; 12][..], &[0x07, 0x00, 0x02, 7, 7], &[0xe0, 0, 0]].concat();
        let (got, left) = read_all(&[v2(0x21, 0x11, &tlvs), b"x".to_vec()].concat()).await;
        assert_eq!(
            got.expect("reads"),
            Header::Proxied("7.7.7.7:1799".parse().expect("addr"))
        );
        assert_eq!(left, b"x");
        for (ver_cmd, fam) in [(0x20, 0x11), (0x20, 0x00)] {
            let (got, _) = read_all(&v2(ver_cmd, fam, &[0; 12])).await;
            assert_eq!(got.expect("reads"), Header::Local);
        }
        // A relayed client the proxy cannot name is refused, never taken
        // for the proxy's own connection (whose address would pass the
        // client's source rules).
        let (got, left) = read_all(&[v2(0x21, 0x00, &[0; 12]), b"x".to_vec()].concat()).await;
        assert!(matches!(got, Err(HeaderError::UnknownClient)), "{got:?}");
        assert_eq!(left, b"x");
        for line in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            let (got, _) = read_all(line).await;
            assert!(matches!(got, Err(HeaderError::UnknownClient)), "{got:?}");
        }
    }

    /// A CRC32c TLV is checked against the header's bytes: a bit flipped
    /// in the addresses, the sum, or another TLV's type or value refuses
    /// the header; a second CRC32c, or one that is not 4 bytes, is
    /// malformed.
    #[tokio::test]
    async fn a_crc32c_tlv_must_match_the_header() {
        let (hex, want) = VECTORS[VECTORS.len() - 1];
        let good = unhex(hex);
        assert_eq!(said(read_all(&good).await.0.expect("reads")), want);
        // Bytes 16..28 the addresses, 28 the CRC32c's type, 29..31 its
        // length, 31..35 the sum, 35 the NOOP's type, 36..38 its length,
        // 38..40 its value. A flipped type or length changes the TLVs'
        // structure, which other checks catch or which is then valid.
        for i in (16..good.len()).filter(|i| ![28, 29, 30, 36, 37].contains(i)) {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let (got, _) = read_all(&bad).await;
            assert!(
                matches!(got, Err(HeaderError::Malformed(m)) if m.contains("CRC32c")),
                "byte {i} changed: {got:?}"
            );
        }
        let v2 = |rest: &[u8]| {
            let mut h = V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11]);
            h.extend_from_slice(&u16::try_from(rest.len()).expect("len").to_be_bytes());
            h.extend_from_slice(rest);
            h
        };
        let addresses = &good[16..28];
        let sum = &good[28..35];
        for rest in [
            [addresses, sum, sum].concat(),
            [addresses, &[PP2_TYPE_CRC32C, 0, 3, 0, 0, 0]].concat(),
        ] {
            let (got, _) = read_all(&v2(&rest)).await;
            assert!(
                matches!(got, Err(HeaderError::Malformed(m)) if m.contains("CRC32c")),
                "{got:?}"
            );
        }
    }

    /// A v2 header over IPv4 naming `client`, with `tlvs` (type, value)
    /// after its addresses and, when `crc` says so, a CRC32c TLV at
    /// position `at` among them, its sum made over the whole header.
    fn with_tlvs(
        client: [u8; 4],
        port: u16,
        tlvs: &[(u8, Vec<u8>)],
        crc: Option<usize>,
    ) -> Vec<u8> {
        let mut body = [
            &client[..],
            &[10, 0, 0, 1],
            &port.to_be_bytes(),
            &[0x27, 0x0f],
        ]
        .concat();
        let mut sum_at = None;
        for (i, (kind, value)) in tlvs.iter().enumerate() {
            if crc == Some(i) {
                body.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4]);
                sum_at = Some(body.len());
                body.extend_from_slice(&[0; 4]);
            }
            body.push(*kind);
            body.extend_from_slice(&u16::try_from(value.len()).expect("len").to_be_bytes());
            body.extend_from_slice(value);
        }
        if crc.is_some() && sum_at.is_none() {
            body.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4]);
            sum_at = Some(body.len());
            body.extend_from_slice(&[0; 4]);
        }
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        h.extend_from_slice(&body);
        if let Some(at) = sum_at {
            let sum = crc32c::crc32c(&h);
            h[16 + at..16 + at + 4].copy_from_slice(&sum.to_be_bytes());
        }
        h
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// Any TLVs that fill the header (other than a CRC32c) are read
        /// past, with or without a CRC32c that matches, anywhere among
        /// them: the header names its client, and the bytes after it are
        /// left. The same header with any one bit of its addresses or TLVs
        /// flipped under a CRC32c is refused.
        #[test]
        fn tlvs_that_fill_the_header_are_read_past_and_a_sum_guards_them(
            client in proptest::prelude::any::<[u8; 4]>(),
            port in proptest::prelude::any::<u16>(),
            tlvs in proptest::collection::vec(
                (proptest::prelude::any::<u8>().prop_filter("not a CRC32c", |k| *k != PP2_TYPE_CRC32C),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
                0..6,
            ),
            crc in proptest::option::of(0usize..6),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let header = with_tlvs(client, port, &tlvs, crc);
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let stream = [&header[..], b"next"].concat();
            let (got, left) = rt.block_on(read_all(&stream));
            let want = Header::Proxied(SocketAddr::from((client, port)));
            proptest::prop_assert_eq!(got.expect("reads"), want);
            proptest::prop_assert_eq!(left, b"next".to_vec());
            if crc.is_some() {
                let mut bad = header.clone();
                // A bit of the addresses' 12 bytes, which only the sum
                // can tell from another client's.
                let i = 16 + flip.index(12);
                bad[i] ^= 0x01;
                let (got, _) = rt.block_on(read_all(&bad));
                proptest::prop_assert!(
                    matches!(got, Err(HeaderError::Malformed(m)) if m.contains("CRC32c")),
                    "{:?}", got
                );
            }
        }
    }
}
