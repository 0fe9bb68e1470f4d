//! `X-Forwarded-For` or RFC 7239's `Forwarded`: the client an HTTP
//! request to the shim comes from, behind reverse proxies.
//!
//! Behind a reverse proxy (a load balancer, nginx, an API gateway) the
//! shim's TCP peer is the proxy, so the operator names the proxies'
//! networks (`vaultd serve --trusted-proxy CIDR`), and for a request whose
//! peer is in one of them the shim reads the header to which each proxy
//! appends the address it received the request from: `X-Forwarded-For` by
//! default, or `Forwarded` (`--forwarded-header forwarded`).
//!
//! ```text
//! X-Forwarded-For: 198.51.100.7, 203.0.113.9, 10.0.0.5      peer 10.0.0.6
//! Forwarded: for=198.51.100.7, for=203.0.113.9;proto=https, for=10.0.0.5
//!                  └ client's ┘  └ client ┘   └ trusted ┘   └ trusted ┘
//!                    own words     (read)       proxy         proxy
//! ```
//!
//! Invariants:
//! - The header is read only when the peer is a trusted proxy. Any other
//!   client can write anything there, so from it the header is ignored
//!   and the peer is the client.
//! - Only the header the operator names is read, never both: a proxy that
//!   appends to one passes the other on as the client wrote it.
//! - The list is read from the right. Each trusted proxy appends the
//!   address it saw, so only the entries up to and including the first
//!   that is not a trusted proxy were written by proxies the operator
//!   trusts: that entry is the client. Entries left of it are the client's
//!   own words and are never read, so nothing written there can choose an
//!   address or refuse a request: as long as no client is inside the
//!   trusted networks (one that is, is taken for a proxy, and its own
//!   entries are read; hence a network of every address is refused,
//!   [`super::TrustedProxies::parse`]). `Forwarded` elements are found from the
//!   right too, with its quoted strings, so that a quote the client left
//!   open cannot swallow what a proxy appended.
//! - An entry that must be read and is not an address refuses the request
//!   ([`Malformed`], a 400): a trusted proxy that writes something else is
//!   misconfigured, and a guess could pass or fail a policy by accident.
//!   So do a `Forwarded` element without exactly one `for`, and its
//!   `unknown` and obfuscated (`_name`) nodes: a policy cannot be checked
//!   against a client the proxy does not name.
//! - Every entry a trusted proxy: the client is the leftmost. A trusted
//!   peer that sends no such header: the client is the peer.
//! - IPv4-mapped IPv6 addresses are read as IPv4, as the policy check
//!   reads them ([`storage::state::source_allowed`]).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;

use storage::state::canonical_ip;

use super::{Source, TrustedProxies};

/// The header that names the client behind trusted proxies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy, ...`: nginx's
    /// `$proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`, most
    /// load balancers.
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded: for=client;proto=https, for=proxy`
    /// (HAProxy's `option forwarded`, from version 2.8).
    Forwarded,
}

impl ForwardedHeader {
    /// The header's name in HTTP (lower case).
    pub fn header_name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "x-forwarded-for",
            ForwardedHeader::Forwarded => "forwarded",
        }
    }

    /// The header's name as written in messages.
    pub fn display_name(self) -> &'static str {
        match self {
            ForwardedHeader::XForwardedFor => "X-Forwarded-For",
            ForwardedHeader::Forwarded => "Forwarded",
        }
    }
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;

    /// `x-forwarded-for` or `forwarded`, in any case.
    fn from_str(s: &str) -> Result<Self, String> {
        [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded]
            .into_iter()
            .find(|h| s.trim().eq_ignore_ascii_case(h.header_name()))
            .ok_or_else(|| format!("{s:?}: expected x-forwarded-for or forwarded"))
    }
}

/// An entry of the forwarding header that had to be read and does not
/// name an IP address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header} from a trusted proxy holds {entry:?}, which is not an IP address")]
pub struct Malformed {
    /// `X-Forwarded-For` or `Forwarded`.
    pub header: &'static str,
    /// The entry, cut to 64 characters.
    pub entry: String,
}

impl Malformed {
    fn new(header: ForwardedHeader, entry: &str) -> Malformed {
        Malformed {
            header: header.display_name(),
            entry: entry.chars().take(64).collect(),
        }
    }

    fn lossy(header: ForwardedHeader, entry: &[u8]) -> Malformed {
        Malformed::new(header, String::from_utf8_lossy(entry).trim())
    }
}

impl TrustedProxies {
    /// Where a request from `peer` with `headers` comes from, read from
    /// `header` when `peer` is a trusted proxy.
    pub fn source(
        &self,
        peer: IpAddr,
        headers: &HeaderMap,
        header: ForwardedHeader,
    ) -> Result<Source, Malformed> {
        let peer = canonical_ip(peer);
        if !self.trusts(peer) {
            return Ok(Source {
                client: peer,
                proxy: None,
            });
        }
        // Header lines in order, each a comma-separated list: together one
        // list (RFC 9110, section 5.3), read here from its end.
        let lines: Vec<_> = headers.get_all(header.header_name()).iter().collect();
        let mut leftmost = None;
        for line in lines.into_iter().rev() {
            // Bytes, not text: what the client wrote left of an element
            // (obs-text included) is never decoded.
            let mut rest = line.as_bytes();
            while !rest.is_empty() {
                let (before, element) = match header {
                    ForwardedHeader::XForwardedFor => {
                        let (before, element) = match rest.iter().rposition(|b| *b == b',') {
                            Some(i) => (&rest[..i], &rest[i + 1..]),
                            None => (&[][..], rest),
                        };
                        (before, Cow::Borrowed(text(header, element)?.trim()))
                    }
                    ForwardedHeader::Forwarded => {
                        let (before, element) =
                            last_element(rest).ok_or_else(|| Malformed::lossy(header, rest))?;
                        let node = match text(header, element)?.trim() {
                            "" => None,
                            e => Some(for_node(e).ok_or_else(|| Malformed::new(header, e))?),
                        };
                        (before, node.unwrap_or_default())
                    }
                };
                rest = before;
                if element.is_empty() {
                    // `a,,b` and a trailing comma: empty list elements,
                    // which RFC 9110 tells recipients to skip.
                    continue;
                }
                // RFC 7239 brackets an IPv6 node: bare, `2001:db8::7:443`
                // could be an address or an address and its port.
                let bare_v6 = header == ForwardedHeader::Forwarded
                    && !element.starts_with('[')
                    && element.contains(':')
                    && element.parse::<std::net::Ipv4Addr>().is_err()
                    && element
                        .rsplit_once(':')
                        .is_none_or(|(a, _)| a.parse::<std::net::Ipv4Addr>().is_err());
                let ip = parse_node(&element)
                    .filter(|_| !bare_v6)
                    .ok_or_else(|| Malformed::new(header, &element))?;
                if !self.trusts(ip) {
                    return Ok(Source {
                        client: ip,
                        proxy: Some(peer),
                    });
                }
                leftmost = Some(ip);
            }
        }
        Ok(match leftmost {
            Some(ip) => Source {
                client: ip,
                proxy: Some(peer),
            },
            None => Source {
                client: peer,
                proxy: None,
            },
        })
    }
}

/// An element's bytes as text; only visible ASCII and blanks are.
fn text(header: ForwardedHeader, element: &[u8]) -> Result<&str, Malformed> {
    match std::str::from_utf8(element) {
        Ok(t)
            if element
                .iter()
                .all(|b| *b == b'\t' || (b' '..=b'~').contains(b)) =>
        {
            Ok(t)
        }
        _ => Err(Malformed::lossy(header, element)),
    }
}

/// A `Forwarded` line split before its last element (RFC 7239, section
/// 4): what comes before the last comma outside a quoted string, and what
/// comes after it. Scanned from the right, so that the elements proxies
/// appended are found whatever the client wrote before them. `None` when
/// a quoted string is not closed, or a quote is escaped outside one.
fn last_element(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut quoted = false;
    for i in (0..line.len()).rev() {
        match line[i] {
            b'"' => {
                // Each run of backslashes ends at a quote: all the runs
                // together are read once.
                let backslashes = line[..i].iter().rev().take_while(|b| **b == b'\\').count();
                let escaped = backslashes % 2 == 1;
                match (quoted, escaped) {
                    (false, true) => return None,
                    (false, false) => quoted = true,
                    (true, false) => quoted = false,
                    (true, true) => {}
                }
            }
            b',' if !quoted => return Some((&line[..i], &line[i + 1..])),
            _ => {}
        }
    }
    (!quoted).then_some((&[][..], line))
}

/// The node of an element's one `for` parameter, unquoted; `None` when
/// the element has no `for`, more than one, or a pair that is not
/// `name=value`.
fn for_node(element: &str) -> Option<Cow<'_, str>> {
    let mut node = None;
    for pair in split_outside_quotes(element, b';') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=')?;
        let name = name.trim();
        if name.is_empty() || name.bytes().any(|b| !is_tchar(b)) {
            return None;
        }
        if name.eq_ignore_ascii_case("for") {
            if node.is_some() {
                return None;
            }
            node = Some(unquote(value.trim())?);
        }
    }
    node
}

/// Pieces of `text` between `separator`s outside quoted strings (which
/// [`last_element`] has checked are closed).
fn split_outside_quotes(text: &str, separator: u8) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    for (i, b) in text.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == separator && !quoted {
            pieces.push(&text[start..i]);
            start = i + 1;
        }
    }
    pieces.push(&text[start..]);
    pieces
}

/// A token, or a quoted string without its quotes and escapes.
fn unquote(value: &str) -> Option<Cow<'_, str>> {
    let Some(inner) = value.strip_prefix('"') else {
        // A bare IPv4 address with a port is not a token (`:`), but is
        // read as proxies write it.
        return value
            .bytes()
            .all(|b| is_tchar(b) || b == b':')
            .then_some(Cow::Borrowed(value))
            .filter(|v| !v.is_empty());
    };
    let inner = inner.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    Some(Cow::Owned(out))
}

/// RFC 9110's `tchar`, the characters of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:80` (proxies differ in whether they add the port), with
/// RFC 7239's obfuscated ports (`:_p1`) too.
fn parse_node(entry: &str) -> Option<IpAddr> {
    let ip = parse_address(entry).or_else(|| {
        let (address, port) = entry.rsplit_once(':')?;
        port.starts_with('_')
            .then(|| parse_address(address))
            .flatten()
    })?;
    Some(canonical_ip(ip))
}

fn parse_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                "x-forwarded-for",
                HeaderValue::from_bytes(l).expect("header value"),
            );
        }
        h
    }

    const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::parse(&["10.0.0.0/8", "2001:db8:ffff::1"]).expect("networks")
    }

    /// Each case's lines of `header`, from the trusted 10.0.0.6, name
    /// its client (10.0.0.6 itself: no client named, the peer is it).
    fn assert_clients(header: ForwardedHeader, cases: &[(&[&[u8]], &str)]) {
        let peer = ip("10.0.0.6");
        for (lines, want) in cases {
            let mut h = HeaderMap::new();
            for l in *lines {
                h.append(
                    header.header_name(),
                    HeaderValue::from_bytes(l).expect("header value"),
                );
            }
            let got = proxies().source(peer, &h, header).expect("source");
            let expected_proxy = (*want != "10.0.0.6").then_some(peer);
            let shown: Vec<_> = lines.iter().map(|l| String::from_utf8_lossy(l)).collect();
            assert_eq!(
                got,
                Source {
                    client: ip(want),
                    proxy: expected_proxy
                },
                "{shown:?}"
            );
        }
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let t = proxies();
        for lines in [&[][..], &[&b"192.0.2.1"[..]], &[&b"not an address"[..]]] {
            let got = t
                .source(ip("203.0.113.9"), &headers(lines), XFF)
                .expect("source");
            assert_eq!(
                got,
                Source {
                    client: ip("203.0.113.9"),
                    proxy: None
                }
            );
        }
        // No proxies configured: the header is never read.
        let got = TrustedProxies::default()
            .source(ip("10.0.0.1"), &headers(&[b"192.0.2.1"]), XFF)
            .expect("source");
        assert_eq!(got.client, ip("10.0.0.1"));
    }

    #[test]
    fn the_client_is_the_rightmost_entry_that_is_not_a_trusted_proxy() {
        let t = proxies();
        let cases: &[(&[&[u8]], &str)] = &[
            (&[b"192.0.2.7"], "192.0.2.7"),
            // What the client wrote itself, left of the first untrusted
            // entry, is not read: not even when it is not an address.
            (&[b"198.51.100.1, 192.0.2.7, 10.0.0.5"], "192.0.2.7"),
            (&[b"garbage, unknown, 192.0.2.7"], "192.0.2.7"),
            // Two header lines are one list, in order.
            (&[b"198.51.100.1", b"192.0.2.7,10.1.2.3"], "192.0.2.7"),
            (&[b"not an address", b"192.0.2.7"], "192.0.2.7"),
            // Ports, brackets and mapped addresses.
            (&[b"192.0.2.7:4711"], "192.0.2.7"),
            (&[b"[2001:db8::7]:443"], "2001:db8::7"),
            (&[b"[2001:db8::7]"], "2001:db8::7"),
            (&[b"2001:db8::7, 2001:db8:ffff::1"], "2001:db8::7"),
            (&[b"::ffff:192.0.2.7"], "192.0.2.7"),
            // Empty elements are skipped.
            (&[b"192.0.2.7,, ,10.0.0.5,"], "192.0.2.7"),
            // Every entry a trusted proxy: the leftmost.
            (&[b"10.9.9.9, 10.0.0.5"], "10.9.9.9"),
            // No header, or only empty elements: the peer.
            (&[], "10.0.0.6"),
            (&[b" , "], "10.0.0.6"),
        ];
        assert_clients(XFF, cases);
        // A mapped peer address is trusted as its IPv4 address.
        let got = t
            .source(ip("::ffff:10.0.0.6"), &headers(&[b"192.0.2.7"]), XFF)
            .expect("source");
        assert_eq!(got.client, ip("192.0.2.7"));
        assert_eq!(got.proxy, Some(ip("10.0.0.6")));
    }

    #[test]
    fn an_entry_that_must_be_read_and_is_not_an_address_refuses() {
        let t = proxies();
        let peer = ip("10.0.0.6");
        for lines in [
            &[&b"unknown"[..]][..],
            &[b"192.0.2.7, _hidden"],
            &[b"192.0.2.7", b"10.0.0.5, 300.1.1.1"],
            &[b"192.0.2.7/24"],
            &[b"[192.0.2.7]"],
            &[b"2001:db8::7:443:x"],
            &[b"192.0.2.7\xff"],
        ] {
            let err = t.source(peer, &headers(lines), XFF).expect_err("malformed");
            assert!(err.entry.len() <= 64, "{err}");
            assert!(err.to_string().contains("X-Forwarded-For"), "{err}");
        }
        let long = format!("192.0.2.7, {}", "x".repeat(1000));
        let err = t
            .source(peer, &headers(&[long.as_bytes()]), XFF)
            .expect_err("malformed");
        assert_eq!(err.entry, "x".repeat(64));
    }

    fn forwarded(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                "forwarded",
                HeaderValue::from_bytes(l).expect("header value"),
            );
        }
        h
    }

    const FWD: ForwardedHeader = ForwardedHeader::Forwarded;

    #[test]
    fn forwarded_names_the_client_in_the_for_of_the_rightmost_untrusted_element() {
        let cases: &[(&[&[u8]], &str)] = &[
            // RFC 7239's own examples (section 4 and 7.1).
            (
                &[b"for=192.0.2.60;proto=http;by=203.0.113.43"],
                "192.0.2.60",
            ),
            (&[b"For=\"[2001:db8:cafe::17]:4711\""], "2001:db8:cafe::17"),
            (&[b"for=192.0.2.43, for=198.51.100.17"], "198.51.100.17"),
            (
                &[b"for=192.0.2.43, for=\"[2001:db8:cafe::17]\""],
                "2001:db8:cafe::17",
            ),
            // Trusted proxies' elements are passed over, the client's own
            // words left of the client never read, whatever they are.
            (
                &[b"for=198.51.100.1, for=192.0.2.7;proto=https, for=10.0.0.5"],
                "192.0.2.7",
            ),
            (&[b"for=\"unclosed, by=x, for=192.0.2.7"], "192.0.2.7"),
            (&[b"garbage;;==, for=_hidden, for=192.0.2.7"], "192.0.2.7"),
            (&[b"for=\"[2001:db8::1]\", for=192.0.2.7"], "192.0.2.7"),
            // A quote the client left open does not swallow an element a
            // proxy appended with a quoted address.
            (&[b"for=\"x, for=\"[2001:db8::7]:4711\""], "2001:db8::7"),
            // Lines are one list, in order.
            (
                &[b"for=198.51.100.1", b"for=192.0.2.7;proto=https"],
                "192.0.2.7",
            ),
            (&[b"for=\"not closed", b"for=192.0.2.7"], "192.0.2.7"),
            // Parameters in any order and case, quoted or not, with
            // commas and escapes inside quoted values; ports, obfuscated
            // ports and mapped addresses.
            (&[b"proto=https;FOR=192.0.2.7;host=\"a,b;c\""], "192.0.2.7"),
            (&[b"for=\"192.0.2.7\";by=\"\\\"x\\\\\""], "192.0.2.7"),
            (&[b"for=\"192.0.2.7:4711\""], "192.0.2.7"),
            (&[b"for=\"[2001:db8::7]:_p1\""], "2001:db8::7"),
            (&[b"for=\"[::ffff:192.0.2.7]\""], "192.0.2.7"),
            (&[b"for=\"\\1\\92.0.2.7\""], "192.0.2.7"),
            // Empty elements are skipped; every element a trusted proxy:
            // the leftmost; no header: the peer.
            (&[b"for=192.0.2.7,, ,for=10.0.0.5,"], "192.0.2.7"),
            (&[b"for=10.9.9.9, for=10.0.0.5"], "10.9.9.9"),
            (&[], "10.0.0.6"),
            (&[b" , "], "10.0.0.6"),
        ];
        assert_clients(FWD, cases);
    }

    #[test]
    fn only_the_header_the_operator_names_is_read() {
        let t = proxies();
        let peer = ip("10.0.0.6");
        let mut both = forwarded(&[b"for=198.51.100.1"]);
        both.append("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        let got = t.source(peer, &both, XFF).expect("source");
        assert_eq!(got.client, ip("192.0.2.7"));
        let got = t.source(peer, &both, FWD).expect("source");
        assert_eq!(got.client, ip("198.51.100.1"));
        // From an untrusted peer, neither.
        let got = t.source(ip("192.0.2.99"), &both, FWD).expect("source");
        assert_eq!(got.client, ip("192.0.2.99"));
        assert_eq!(got.proxy, None);
        // The names the flag takes.
        assert_eq!("forwarded".parse(), Ok(FWD));
        assert_eq!("X-Forwarded-For".parse(), Ok(XFF));
        assert!("x-real-ip".parse::<ForwardedHeader>().is_err());
    }

    #[test]
    fn a_forwarded_element_that_must_be_read_and_names_no_address_refuses() {
        let t = proxies();
        let peer = ip("10.0.0.6");
        for line in [
            // No client address: unknown, obfuscated, none at all.
            &b"for=unknown"[..],
            b"for=192.0.2.7, for=_hidden",
            b"for=\"_gazonk\"",
            b"proto=https;by=10.0.0.5",
            // Not one `for`, or not name=value.
            b"for=192.0.2.7;for=192.0.2.8",
            b"for",
            b"=192.0.2.7",
            b"f r=1;for=192.0.2.7",
            // Quoting: unclosed, escaped outside a string, a bare value
            // that is not a token, an IPv6 address without brackets.
            b"for=\"192.0.2.7",
            b"for=192.0.2.7\\\"",
            b"for=192.0.2.7\"",
            b"for=[2001:db8::7]",
            b"for=192.0.2.7/24",
            b"for=\"2001:db8::7:443:x\"",
            // Quoted but unbracketed: address or address and port?
            b"for=\"2001:db8::7:443\"",
            b"for=\"::1\"",
            b"for=192.0.2.7\xff",
        ] {
            let err = t
                .source(peer, &forwarded(&[line]), FWD)
                .expect_err(&String::from_utf8_lossy(line));
            assert!(err.entry.len() <= 64, "{err}");
            assert_eq!(err.header, "Forwarded", "{err}");
        }
    }

    /// The test vectors of `docs/http.md`, "Behind a reverse proxy": a
    /// header line, then `client ADDR` or `400`.
    fn documented_vectors() -> Vec<(ForwardedHeader, String, Option<IpAddr>)> {
        let doc = include_str!("../../../docs/http.md");
        let block = doc
            .split_once("Test vectors (checked by `server::proxied::forwarded`")
            .and_then(|(_, rest)| rest.split_once("```text\n"))
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(block, _)| block)
            .expect("http.md has the forwarding vectors");
        block
            .lines()
            .map(|line| {
                let (name, rest) = line.split_once(": ").expect("NAME: VALUE");
                let header: ForwardedHeader = name.parse().expect("a header name");
                let (value, want) = rest.rsplit_once("  ").expect("VALUE  RESULT");
                let want = match want.trim() {
                    "400" => None,
                    w => Some(ip(w.strip_prefix("client ").expect("client ADDR"))),
                };
                (header, value.trim().to_string(), want)
            })
            .collect()
    }

    #[test]
    fn the_documented_vectors_read_as_documented() {
        let t = TrustedProxies::parse(&["10.0.0.0/8", "2001:db8:ffff::/48"]).expect("networks");
        let vectors = documented_vectors();
        assert_eq!(vectors.len(), 12, "{vectors:?}");
        for (header, value, want) in vectors {
            let mut h = HeaderMap::new();
            h.append(
                header.header_name(),
                HeaderValue::from_str(&value).expect("a value"),
            );
            let got = t.source(ip("10.0.0.6"), &h, header);
            match want {
                Some(client) => assert_eq!(
                    got,
                    Ok(Source {
                        client,
                        proxy: Some(ip("10.0.0.6"))
                    }),
                    "{value}"
                ),
                None => assert!(got.is_err(), "{value}: {got:?}"),
            }
        }
    }

    proptest::proptest! {
        /// Whatever a client writes (bytes past ASCII included), in a line
        /// of its own or at the start of the line a trusted proxy appends
        /// its element to, the client is the address that proxy appended,
        /// and nothing panics.
        #[test]
        fn what_a_client_writes_before_a_proxy_s_element_never_counts(
            written in "[ -~\t\u{80}-\u{ff}]{0,48}",
            v4 in proptest::prelude::any::<[u8; 4]>(),
            v6 in proptest::prelude::any::<[u16; 8]>(),
            six in proptest::prelude::any::<bool>(),
            params in "(;proto=https)?(;by=_p)?",
        ) {
            let t = proxies();
            let client = if six {
                IpAddr::from(std::net::Ipv6Addr::from(v6))
            } else {
                IpAddr::from(v4)
            };
            let client = canonical_ip(client);
            proptest::prop_assume!(!t.trusts(client));
            let node = match client {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("\"[{a}]:4711\""),
            };
            let element = format!("for={node}{params}");
            let peer = ip("10.0.0.6");
            let Ok(own) = HeaderValue::from_bytes(written.as_bytes()) else {
                return Ok(());
            };
            let mut lines = HeaderMap::new();
            lines.append("forwarded", own);
            lines.append("forwarded", HeaderValue::from_str(&element).expect("a value"));
            let appended =
                HeaderValue::from_bytes(format!("{written}, {element}").as_bytes()).expect("a value");
            let mut one_line = HeaderMap::new();
            one_line.append("forwarded", appended);
            for headers in [lines, one_line] {
                let got = t.source(peer, &headers, FWD);
                proptest::prop_assert_eq!(got, Ok(Source { client, proxy: Some(peer) }));
            }
            // The same for X-Forwarded-For, where a proxy appends the bare
            // address.
            let xff =
                HeaderValue::from_bytes(format!("{written}, {client}").as_bytes()).expect("a value");
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", xff);
            proptest::prop_assert_eq!(t.source(peer, &h, XFF), Ok(Source { client, proxy: Some(peer) }));
        }

        /// Any bytes at all from a trusted proxy: an answer or a refusal,
        /// never a panic.
        #[test]
        fn any_header_from_a_trusted_proxy_is_read_or_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
        ) {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            for header in [XFF, FWD] {
                let mut h = HeaderMap::new();
                h.append(header.header_name(), value.clone());
                let _ = proxies().source(ip("10.0.0.6"), &h, header);
            }
        }
    }
}
