//! The TLS session cache a [`Connector`](crate::Connector) shares across
//! its connections, so that a partner opening one connection per token
//! resumes TLS sessions instead of making a full handshake each time.
//!
//! A TLS 1.3 ticket resumes at most one connection (rustls takes it out of
//! the store), and a vault sends one with every handshake, resumed or
//! full, so a partner keeps as many as it has connections. rustls's own
//! in-memory cache keeps at most eight tickets per server: with more than
//! eight connections opening at once the rest find none and make a full
//! handshake (certificate chain and signature checked again). This cache
//! keeps up to [`TICKETS_PER_SERVER`] tickets per server name, the newest
//! taken first, the oldest dropped when full, for up to [`SERVERS`]
//! servers (the least recently stored one dropped first).
//!
//! Tickets are secrets (they resume a session keyed by the secret inside
//! them); they stay in memory only, and rustls zeroizes their secrets when
//! they are dropped. A lock poisoned by a panicking thread makes the cache
//! store nothing more and answer as if empty: every connection still
//! works, with full handshakes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::NamedGroup;
use rustls_pki_types::ServerName;

/// Tickets kept per server name: enough for every connection of a busy
/// partner's pool to resume at once.
pub const TICKETS_PER_SERVER: usize = 256;

/// Server names remembered.
pub const SERVERS: usize = 16;

#[derive(Default)]
struct Server {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    /// Oldest first.
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// A bounded in-memory [`ClientSessionStore`] that keeps many TLS 1.3
/// tickets per server (see the module documentation).
pub(crate) struct SessionCache {
    tickets_per_server: usize,
    max_servers: usize,
    /// Least recently stored first.
    servers: Mutex<VecDeque<(ServerName<'static>, Server)>>,
}

impl SessionCache {
    pub(crate) fn new(tickets_per_server: usize, max_servers: usize) -> SessionCache {
        SessionCache {
            tickets_per_server,
            max_servers,
            servers: Mutex::new(VecDeque::new()),
        }
    }

    /// Runs `f` on the entry of `name`, creating it (and dropping the least
    /// recently stored server when full), and moves it to the back.
    fn store(&self, name: ServerName<'static>, f: impl FnOnce(&mut Server)) {
        if self.max_servers == 0 {
            return;
        }
        let Ok(mut servers) = self.servers.lock() else {
            return;
        };
        let found = servers
            .iter()
            .position(|(n, _)| *n == name)
            .and_then(|i| servers.remove(i));
        let mut entry = match found {
            Some(entry) => entry,
            None => {
                while servers.len() >= self.max_servers {
                    servers.pop_front();
                }
                (name, Server::default())
            }
        };
        f(&mut entry.1);
        servers.push_back(entry);
    }

    /// Runs `f` on the entry of `name`, if there is one.
    fn with<T>(
        &self,
        name: &ServerName<'_>,
        f: impl FnOnce(&mut Server) -> Option<T>,
    ) -> Option<T> {
        let mut servers = self.servers.lock().ok()?;
        let (_, server) = servers.iter_mut().find(|(n, _)| n == name)?;
        f(server)
    }

    /// Tickets held for `name` (for tests and diagnostics).
    #[cfg(test)]
    fn tickets(&self, name: &ServerName<'_>) -> usize {
        self.with(name, |s| Some(s.tls13.len())).unwrap_or(0)
    }
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tickets themselves.
        let servers = self.servers.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("SessionCache")
            .field("servers", &servers)
            .field("tickets_per_server", &self.tickets_per_server)
            .finish()
    }
}

impl ClientSessionStore for SessionCache {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.store(name, |s| s.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.with(name, |s| s.kx_hint)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.store(name, |s| s.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.with(name, |s| s.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.with(name, |s| s.tls12.take());
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let max = self.tickets_per_server;
        if max == 0 {
            return;
        }
        self.store(name, |s| {
            while s.tls13.len() >= max {
                s.tls13.pop_front();
            }
            s.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.with(name, |s| s.tls13.pop_back())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName<'static> {
        ServerName::try_from(s.to_string()).expect("a valid name")
    }

    #[test]
    fn kx_hints_are_kept_per_server() {
        let c = SessionCache::new(4, 2);
        c.set_kx_hint(name("a.example"), NamedGroup::X25519);
        c.set_kx_hint(name("b.example"), NamedGroup::secp256r1);
        assert_eq!(c.kx_hint(&name("a.example")), Some(NamedGroup::X25519));
        assert_eq!(c.kx_hint(&name("b.example")), Some(NamedGroup::secp256r1));
        assert_eq!(c.kx_hint(&name("c.example")), None);
    }

    #[test]
    fn the_least_recently_stored_server_goes_first() {
        let c = SessionCache::new(4, 2);
        c.set_kx_hint(name("a.example"), NamedGroup::X25519);
        c.set_kx_hint(name("b.example"), NamedGroup::X25519);
        // Storing for `a` again makes `b` the oldest.
        c.set_kx_hint(name("a.example"), NamedGroup::secp256r1);
        c.set_kx_hint(name("c.example"), NamedGroup::X25519);
        assert_eq!(c.kx_hint(&name("b.example")), None);
        assert_eq!(c.kx_hint(&name("a.example")), Some(NamedGroup::secp256r1));
        assert_eq!(c.kx_hint(&name("c.example")), Some(NamedGroup::X25519));
    }

    #[test]
    fn a_cache_of_no_servers_keeps_nothing() {
        let c = SessionCache::new(4, 0);
        c.set_kx_hint(name("a.example"), NamedGroup::X25519);
        assert_eq!(c.kx_hint(&name("a.example")), None);
        assert_eq!(c.tickets(&name("a.example")), 0);
    }

    #[test]
    fn debug_shows_counts_only() {
        let c = SessionCache::new(4, 2);
        c.set_kx_hint(name("a.example"), NamedGroup::X25519);
        let s = format!("{c:?}");
        assert!(s.contains("servers: 1"), "{s}");
    }
}
