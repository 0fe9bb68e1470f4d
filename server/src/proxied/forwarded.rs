//! `X-Forwarded-For`: the client an HTTP request to the shim comes from,
//! behind reverse proxies.
//!
//! Behind a reverse proxy (a load balancer, nginx, an API gateway) the
//! shim's TCP peer is the proxy, so the operator names the proxies'
//! networks (`vaultd serve --trusted-proxy CIDR`), and for a request whose
//! peer is in one of them the shim reads `X-Forwarded-For`, to which each
//! proxy appends the address it received the request from.
//!
//! ```text
//! X-Forwarded-For: 198.51.100.7, 203.0.113.9, 10.0.0.5      peer 10.0.0.6
//!                  └ client's ┘  └ client ┘   └ trusted ┘   └ trusted ┘
//!                    own words     (read)       proxy         proxy
//! ```
//!
//! Invariants:
//! - `X-Forwarded-For` is read only when the peer is a trusted proxy. Any
//!   other client can write anything there, so from it the header is
//!   ignored and the peer is the client.
//! - The list is read from the right. Each trusted proxy appends the
//!   address it saw, so only the entries up to and including the first
//!   that is not a trusted proxy were written by proxies the operator
//!   trusts: that entry is the client. Entries left of it are the client's
//!   own words and are never read, so nothing written there can choose an
//!   address or refuse a request.
//! - An entry that must be read and is not an address refuses the request
//!   ([`Malformed`], a 400): a trusted proxy that writes something else is
//!   misconfigured, and a guess could pass or fail a policy by accident.
//! - Every entry a trusted proxy: the client is the leftmost. A trusted
//!   peer that sends no `X-Forwarded-For`: the client is the peer.
//! - IPv4-mapped IPv6 addresses are read as IPv4, as the policy check
//!   reads them ([`storage::state::source_allowed`]).
//!
//! Only `X-Forwarded-For` is read (not RFC 7239's `Forwarded`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;

use storage::state::canonical_ip;

use super::{Source, TrustedProxies};

/// The header a proxy appends the address it saw to.
pub const HEADER: &str = "x-forwarded-for";

/// An `X-Forwarded-For` entry that had to be read and is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("X-Forwarded-For from a trusted proxy holds {entry:?}, which is not an IP address")]
pub struct Malformed {
    /// The entry, cut to 64 characters.
    pub entry: String,
}

impl TrustedProxies {
    /// Where a request from `peer` with `headers` comes from.
    pub fn source(&self, peer: IpAddr, headers: &HeaderMap) -> Result<Source, Malformed> {
        let peer = canonical_ip(peer);
        if !self.trusts(peer) {
            return Ok(Source {
                client: peer,
                proxy: None,
            });
        }
        // Header lines in order, each a comma-separated list: together one
        // list (RFC 9110, section 5.3), read here from its end.
        let lines: Vec<_> = headers.get_all(HEADER).iter().collect();
        let mut leftmost = None;
        for line in lines.into_iter().rev() {
            let text = line.to_str().map_err(|_| Malformed {
                entry: String::from_utf8_lossy(line.as_bytes())
                    .chars()
                    .take(64)
                    .collect(),
            })?;
            for entry in text.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    // `a,,b` and a trailing comma: empty list elements,
                    // which RFC 9110 tells recipients to skip.
                    continue;
                }
                let ip = parse_entry(entry).ok_or_else(|| Malformed {
                    entry: entry.chars().take(64).collect(),
                })?;
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

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:80` (proxies differ in whether they add the port).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })?;
    Some(canonical_ip(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(HEADER, HeaderValue::from_bytes(l).expect("header value"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::parse(&["10.0.0.0/8", "2001:db8:ffff::1"]).expect("networks")
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let t = proxies();
        for lines in [&[][..], &[&b"192.0.2.1"[..]], &[&b"not an address"[..]]] {
            let got = t
                .source(ip("203.0.113.9"), &headers(lines))
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
            .source(ip("10.0.0.1"), &headers(&[b"192.0.2.1"]))
            .expect("source");
        assert_eq!(got.client, ip("10.0.0.1"));
    }

    #[test]
    fn the_client_is_the_rightmost_entry_that_is_not_a_trusted_proxy() {
        let t = proxies();
        let peer = ip("10.0.0.6");
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
        for (lines, want) in cases {
            let got = t.source(peer, &headers(lines)).expect("source");
            let expected_proxy = (*want != "10.0.0.6").then_some(peer);
            assert_eq!(
                got,
                Source {
                    client: ip(want),
                    proxy: expected_proxy
                },
                "{lines:?}"
            );
        }
        // A mapped peer address is trusted as its IPv4 address.
        let got = t
            .source(ip("::ffff:10.0.0.6"), &headers(&[b"192.0.2.7"]))
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
            let err = t.source(peer, &headers(lines)).expect_err("malformed");
            assert!(err.entry.len() <= 64, "{err}");
            assert!(err.to_string().contains("X-Forwarded-For"), "{err}");
        }
        let long = format!("192.0.2.7, {}", "x".repeat(1000));
        let err = t
            .source(peer, &headers(&[long.as_bytes()]))
            .expect_err("malformed");
        assert_eq!(err.entry, "x".repeat(64));
    }
}
