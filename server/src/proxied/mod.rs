//! Clients behind proxies: the address a policy's `source_ips` is checked
//! against when the TCP peer is a proxy that the operator trusts.
//!
//! A policy names the networks a partner may authorize and redeem from
//! (`storage::state::source_allowed`). Without proxies that is the TCP
//! peer of the connection. With them the peer is the proxy, and the client
//! is what a trusted proxy says it is:
//!
//! - the HTTP shim reads `X-Forwarded-For` (or RFC 7239's `Forwarded`,
//!   `--forwarded-header`) from peers in `--trusted-proxy` networks
//!   ([`forwarded`]);
//! - the protocol server on port 9999 reads a PROXY protocol header
//!   (HAProxy's, version 1 or 2) at the start of every connection from
//!   peers in `--proxy-protocol-from` networks ([`header`]).
//!
//! Invariants:
//! - Only a peer in a configured network is believed, and only about what
//!   it saw itself; what any other client says of its address is ignored
//!   (HTTP) or ends the connection (a PROXY header where none is expected
//!   is not a TLS handshake or a frame).
//! - Nothing is guessed: a trusted peer that says something that is not an
//!   address is refused (HTTP 400; the connection closed on port 9999).
//! - IPv4-mapped IPv6 addresses count as IPv4, as the policy check reads
//!   them.

pub mod forwarded;
pub mod header;

use std::net::IpAddr;

use ipnet::IpNet;

/// The networks whose peers may say who the client is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// Where a request or connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The client, whose address the policy's `source_ips` must hold.
    pub client: IpAddr,
    /// The trusted proxy it came through (the TCP peer), when a proxy
    /// named the client.
    pub proxy: Option<IpAddr>,
}

impl TrustedProxies {
    /// Networks as CIDR (`10.0.0.0/8`) or bare addresses (a host each).
    /// A network of every address (`0.0.0.0/0`, `::/0`, `::ffff:0:0/96`)
    /// is refused: trusted, it would let any client name its own address.
    pub fn parse<S: AsRef<str>>(networks: &[S]) -> Result<Self, String> {
        networks
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                if let Some(net) = storage::state::host_bits_set(s) {
                    return Err(format!(
                        "{s:?} has bits set past its prefix, and stands for all of {net}: write \
                         {net} for the network, or the address alone for the host"
                    ));
                }
                let net = storage::state::parse_network(s)
                    .ok_or_else(|| format!("{s:?} is not an address or CIDR network"))?;
                if net.prefix_len() == 0 {
                    return Err(format!(
                        "{s:?} holds every address: a trusted proxy's header names the client, \
                         so any client could name its own address; name the proxies' networks"
                    ));
                }
                Ok(net)
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `peer` is in one of the networks.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = storage::state::canonical_ip(peer);
        self.0.iter().any(|n| n.contains(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_as_cidr_or_addresses() {
        assert_eq!(
            TrustedProxies::parse(&[" 10.0.0.0/8", "::1"]).expect("networks"),
            TrustedProxies(vec![
                "10.0.0.0/8".parse().expect("net"),
                "::1/128".parse().expect("net")
            ])
        );
        let err = TrustedProxies::parse(&["10.0.0.0/33"]).expect_err("bad");
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(TrustedProxies::parse(&["proxy.internal"]).is_err());
        // A host written with a prefix: far more trusted than meant.
        let err = TrustedProxies::parse(&["10.1.2.3/8"]).expect_err("host bits");
        assert!(err.contains("10.0.0.0/8"), "{err}");
        // Every address trusted would let every client name its own.
        for all in ["0.0.0.0/0", "::/0", "::ffff:0:0/96"] {
            let err = TrustedProxies::parse(&[all]).expect_err(all);
            assert!(err.contains("every address"), "{err}");
        }
        assert!(TrustedProxies::parse(&["0.0.0.0/1"]).is_ok());
        assert!(TrustedProxies::parse::<&str>(&[]).expect("none").is_empty());
        let t = TrustedProxies::parse(&["10.0.0.0/8"]).expect("networks");
        assert!(t.trusts("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!t.trusts("11.0.0.1".parse().expect("ip")));
    }
}
