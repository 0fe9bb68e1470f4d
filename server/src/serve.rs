//! The protocol server of port 9999: connections, authentication, roles,
//! pipelined requests.
//!
//! ```text
//! accept ──(connection limit)──> connection task
//!   (from a trusted TCP proxy: its PROXY header first, naming the peer)
//!   read half:  frames ─> Hello? ─> role check ─> one future per request
//!                                   (appends read together: one future,
//!                                   one request each to the engine),
//!                                   polled by the connection task
//!                                   (at most `max_in_flight` requests)
//!   write half: responses in completion order, each with its request
//!               id, written by the same task: buffered as requests
//!               complete, flushed once none more is ready (one write
//!               for the answers of one commit group)
//!   reads of a stretch of the log (Entries, Heads, Proof): on tokio's
//!               blocking threads, two at once in the process, one at a
//!               time per connection until its answer is fed to the sink
//!
//! a partner's connection (one per token): its requests one at a time,
//!   answered in order by the connection task itself, until its Redeem
//!
//! a direct connection (Local::direct, the shim inside vaultd): each
//!   request frame handed over by a call, decoded, checked and answered
//!   in the caller's task, under the same rules
//! ```
//!
//! Rules (docs/protocol.md): the first frame must be `Hello` with an API
//! key, which is looked up by its BLAKE3 hash (keys are never stored) and
//! fixes the connection's role (over mutual TLS, an empty key and the
//! client certificate a credential holds); each request is checked against the role;
//! a frame that does not decode is answered with an `Error` of its code and
//! the connection is closed; a connection idle for `idle_timeout` (from
//! its last request or answer; its PROXY header, TLS handshake and `Hello`
//! have `handshake_timeout`) is closed, and so is one whose answers cannot be
//! written for as long because its client does not read them
//! ([`ConnectionError::Unread`]): it would otherwise hold its slot, and
//! its requests in flight, for ever. Nothing a client sends makes the
//! server allocate beyond `max_frame_len` per frame (`MAX_HELLO_LEN`
//! before it is authenticated), `max_in_flight` requests per connection
//! (one of many fields counting as more: [`FIELDS_PER_REQUEST`]) and
//! `max_entries_bytes` per `Entries` answer.
//!
//! A connection from a peer in `proxy_protocol_from` must begin with a
//! PROXY protocol header, before TLS; the client it names is then the
//! connection's peer for every check ([`crate::proxied::header`]).
//!
//! `run` takes the listener and a shutdown future, so that tests bind port
//! 0 and stop the server when they are done. When it resolves, `run`
//! stops accepting, closes the connections not yet authenticated, and
//! has each other one read no further request, answer those it has read,
//! send `Error unavailable` under request id 0 and close; it returns once
//! they are done, or after [`SHUTDOWN_GRACE`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use protocol::{ErrorCode, Frame, FrameCodec, Message};
use storage::{Append, Vault};

use crate::live::{LiveVault, Status};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

/// Options of [`run`], with documented defaults.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most connections served at once (default 1024). One past it waits
    /// for a slot once authenticated, within its handshake's window and
    /// among the `max_handshakes`; it is answered `unavailable` and closed
    /// if none frees by then.
    pub max_connections: usize,
    /// Most connections one credential holds at once (default 256, a
    /// quarter of the default `max_connections`): one more is answered
    /// `unavailable` and closed at once, so that a single key, a partner's
    /// that keeps its connections alive with `Ping`s for instance, cannot
    /// take every slot from the others.
    pub max_connections_per_credential: usize,
    /// Requests of one connection handled at once; further frames are not
    /// read until one finishes (default 64). A request of many fields
    /// counts as more than one ([`FIELDS_PER_REQUEST`]).
    pub max_in_flight: usize,
    /// A connection that sends nothing for this long, counted from its
    /// last request or answer, is closed (default
    /// 30 s), and so is one whose answers cannot be written for this long
    /// because its client does not read them.
    pub idle_timeout: Duration,
    /// Time a new connection has, from its arrival, to send a trusted
    /// proxy's PROXY header (when it comes from one), finish its TLS
    /// handshake and send a valid `Hello`, all three together (default
    /// 10 s).
    pub handshake_timeout: Duration,
    /// Connections still in their handshake, or authenticated and waiting
    /// for a slot, at once (default 1024). They hold no slot of
    /// `max_connections`; when this many are waiting, a new connection
    /// closes the oldest of them, so that clients that never finish
    /// (slowloris) cannot keep others out.
    pub max_handshakes: usize,
    /// Largest frame accepted (default 1 MiB).
    pub max_frame_len: usize,
    /// Most entries one `Entries` request returns (default 10,000).
    pub max_entries: u32,
    /// Most bytes of entries one `Entries` request returns (default 8 MiB;
    /// at least one entry): entries are as large as writers make them
    /// (48 KiB each at most), and the server holds an answer whole before
    /// it is written, so without it one request could make the server
    /// hold 10,000 of the largest. A reader asks again from the seq after
    /// the last entry it got.
    pub max_entries_bytes: usize,
    /// Bytes of `Entries` answers the server holds at once across its
    /// connections, from the read of the log until the answer is written
    /// (default 256 MiB): each `Entries` request takes `max_entries_bytes`
    /// of it first, waiting while it is spent (`entries_wait` at most,
    /// then answered `unavailable`: clients that read a little now and
    /// then may hold it longer), and gives back what its
    /// answer does not hold once read. A client that asks and
    /// does not read keeps its share until it is closed for it (after
    /// `idle_timeout`), so that readers who never read cannot make the
    /// server hold 8 MiB for each of their connections; and one
    /// credential holds a quarter of the budget at most (or one answer's
    /// `max_entries_bytes` where that is more), so that a key's
    /// connections that never read leave the rest to other keys.
    pub entries_budget: EntriesBudget,
    /// The longest an `Entries` request waits for room in
    /// `entries_budget` (default a minute).
    pub entries_wait: Duration,
    /// Name sent in `HelloOk`.
    pub server_name: String,
    /// Lifetime of a token minted with `ttl_secs = 0` (default 5 minutes).
    pub default_token_ttl: Duration,
    /// Longest lifetime a `Mint` may ask for (default 1 hour).
    pub max_token_ttl: Duration,
    /// The rotation policy `KeyStatus` reports, for `vault-admin status`
    /// to warn about keys older than it (default: none).
    pub rotation: RotationPolicy,
    /// TCP proxies in front of the port (default none): a connection from
    /// one of them must begin with a PROXY protocol header, whose client
    /// address then stands for the peer's, in the policy's `source_ips`
    /// check and the throttle of failed redemptions
    /// ([`crate::proxied::header`]).
    pub proxy_protocol_from: crate::proxied::TrustedProxies,
}

/// Maximum ages of keys before they should be rotated (`None`: no
/// maximum). The vault does not rotate by itself: `vaultd` warns at start
/// and `vault-admin status` warns (docs/keys.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationPolicy {
    pub max_signing_key_age: Option<Duration>,
    pub max_subject_key_age: Option<Duration>,
}

impl RotationPolicy {
    /// What is overdue at `now_ms`, one line per finding: the signing key
    /// (its id and creation time) and the active subject keys (their
    /// creation times).
    pub fn overdue(
        &self,
        now_ms: u64,
        (signing_key_id, signing_created_ms): (u32, u64),
        active_subject_keys_created_ms: impl Iterator<Item = u64>,
    ) -> Vec<String> {
        let age = |created_ms: u64| Duration::from_millis(now_ms.saturating_sub(created_ms));
        let days = |d: Duration| d.as_secs() / 86_400;
        let mut out = Vec::new();
        if let Some(max) = self.max_signing_key_age {
            if age(signing_created_ms) > max {
                out.push(format!(
                    "signing key {signing_key_id} is older than the maximum of {} days: rotate it (vault-admin rotate-signing-key)",
                    days(max)
                ));
            }
        }
        if let Some(max) = self.max_subject_key_age {
            let old = active_subject_keys_created_ms
                .filter(|ms| age(*ms) > max)
                .count();
            if old > 0 {
                out.push(format!(
                    "{old} active subject key(s) are older than the maximum of {} days: rotate them (vault-admin rotate-subject-key)",
                    days(max)
                ));
            }
        }
        out
    }

    /// [`RotationPolicy::overdue`] for every key of `vault`, now.
    pub fn check(&self, vault: &Vault) -> storage::Result<Vec<String>> {
        if self.max_signing_key_age.is_none() && self.max_subject_key_age.is_none() {
            return Ok(Vec::new());
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut active = Vec::new();
        let mut after: Option<(String, u32)> = None;
        let signing = loop {
            let page = vault.key_status(after.as_ref().map(|(s, v)| (s.as_str(), *v)), 1000)?;
            active.extend(
                page.subject_keys
                    .iter()
                    .filter(|k| k.life == storage::KeyLife::Active)
                    .map(|k| k.created_ms),
            );
            match (page.more, page.subject_keys.last()) {
                (true, Some(k)) => after = Some((k.subject.clone(), k.version)),
                _ => break (page.signing_key_id, page.signing_created_ms),
            }
        };
        Ok(self.overdue(now_ms, signing, active.into_iter()))
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_connections: 1024,
            max_connections_per_credential: 256,
            max_in_flight: 64,
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_frame_len: protocol::MAX_FRAME_LEN,
            max_entries: 10_000,
            max_entries_bytes: 8 * 1024 * 1024,
            entries_budget: EntriesBudget::bytes(256 << 20),
            entries_wait: Duration::from_secs(60),
            server_name: format!("vaultd/{}", env!("CARGO_PKG_VERSION")),
            default_token_ttl: Duration::from_secs(300),
            max_token_ttl: Duration::from_secs(3600),
            rotation: RotationPolicy::default(),
            proxy_protocol_from: crate::proxied::TrustedProxies::default(),
        }
    }
}

/// The bytes of `Entries` answers a server holds at once
/// ([`ServeConfig::entries_budget`]), counted in units of 64 KiB. Clones
/// share the budget.
///
/// One credential holds at most a quarter of it (its share, one unit at
/// least; or one answer's units where those are more), however many
/// connections it has: the connections of a key that ask and never read
/// wait for their own share, not for the answers of every other auditor.
#[derive(Debug, Clone)]
pub struct EntriesBudget {
    units: Arc<Semaphore>,
    total: u32,
    /// Each credential's share ([`EntriesBudget::share`] units).
    shares: Arc<PerCredential>,
}

/// Semaphores of `permits` each, one per credential id, made when first
/// asked for and dropped once nothing holds or waits for one (its permits
/// all given back, so a new one is the same); the map is swept of those
/// as it grows. A credential's share of what the server's connections
/// share: the `Entries` budget's, and the turn to read the log
/// ([`scan_turn`]).
#[derive(Debug)]
struct PerCredential {
    permits: usize,
    map: std::sync::Mutex<PerCredentialMap>,
}

#[derive(Debug)]
struct PerCredentialMap {
    by_id: std::collections::HashMap<String, std::sync::Weak<Semaphore>>,
    /// The map's size at which the semaphores nothing holds are swept.
    sweep_at: usize,
}

impl PerCredential {
    fn new(permits: usize) -> PerCredential {
        PerCredential {
            permits,
            map: std::sync::Mutex::new(PerCredentialMap {
                by_id: std::collections::HashMap::new(),
                sweep_at: 64,
            }),
        }
    }

    /// The semaphore of the credential `id`.
    fn of(&self, id: &str) -> Arc<Semaphore> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let PerCredentialMap { by_id, sweep_at } = &mut *map;
        if let Some(s) = by_id.get(id).and_then(std::sync::Weak::upgrade) {
            return s;
        }
        if by_id.len() >= *sweep_at {
            by_id.retain(|_, s| s.strong_count() > 0);
            *sweep_at = (by_id.len() * 2).max(64);
        }
        let s = Arc::new(Semaphore::new(self.permits));
        by_id.insert(id.to_owned(), Arc::downgrade(&s));
        s
    }

    /// Credentials in the map, swept or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_id
            .len()
    }
}

/// What an `Entries` answer holds of the budget: of the whole, its units;
/// of its credential's share, as many (the whole share at most).
#[derive(Debug)]
pub struct EntriesHold {
    mine: tokio::sync::OwnedSemaphorePermit,
    all: tokio::sync::OwnedSemaphorePermit,
}

impl EntriesBudget {
    const UNIT: usize = 64 * 1024;

    /// A budget of `bytes` (at least one unit).
    pub fn bytes(bytes: usize) -> EntriesBudget {
        let total = (bytes / Self::UNIT).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let total = u32::try_from(total).unwrap_or(u32::MAX);
        EntriesBudget {
            units: Arc::new(Semaphore::new(total as usize)),
            total,
            // A quarter of the budget, one unit at least.
            shares: Arc::new(PerCredential::new((total / 4).max(1) as usize)),
        }
    }

    /// The units a credential holds at most: a quarter of the budget,
    /// one unit at least (as [`EntriesBudget::bytes`] made its shares).
    fn share(&self) -> u32 {
        u32::try_from(self.shares.permits).unwrap_or(self.total)
    }

    /// The units an answer of `bytes` takes (all of the budget at most).
    fn units_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(Self::UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total)
    }

    /// Takes room for an answer of up to `bytes` for `credential`,
    /// waiting while its share, then the budget, is spent: of the budget
    /// the answer's units, of the share as many (the whole share at most).
    async fn take(&self, credential: &str, bytes: usize) -> Option<EntriesHold> {
        let want = self.units_for(bytes);
        let mine = self
            .shares
            .of(credential)
            .acquire_many_owned(want.min(self.share()))
            .await
            .ok()?;
        let all = self.units.clone().acquire_many_owned(want).await.ok()?;
        Some(EntriesHold { mine, all })
    }

    /// Gives back what `held` took beyond an answer of `bytes`.
    fn keep_only(&self, held: &mut EntriesHold, bytes: usize) {
        let keep = self.units_for(bytes);
        for (permit, keep) in [
            (&mut held.all, keep),
            (&mut held.mine, keep.min(self.share())),
        ] {
            if let Some(extra) = permit
                .num_permits()
                .checked_sub(keep as usize)
                .filter(|n| *n > 0)
            {
                drop(permit.split(extra));
            }
        }
    }

    /// Bytes of the budget not taken now.
    pub fn available(&self) -> usize {
        self.units.available_permits() * Self::UNIT
    }
}

/// A role and what it may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Writer,
    Gateway,
    Partner,
    Auditor,
}

impl Role {
    /// Parses a stored role name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "writer" => Role::Writer,
            "gateway" => Role::Gateway,
            "partner" => Role::Partner,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }

    /// The stored name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Writer => "writer",
            Role::Gateway => "gateway",
            Role::Partner => "partner",
            Role::Auditor => "auditor",
        }
    }

    /// Whether this role may send `m`. Admins may do everything but redeem
    /// (a token is for the partner it was minted for). The gateway (the
    /// HTTP policy shim) records policy changes, consents and denials on
    /// behalf of the callers it has authenticated; writers record consents.
    pub fn may(self, m: &Message) -> bool {
        use storage::Kind;
        match m {
            Message::Ping | Message::Health | Message::KeyChain => true,
            Message::Event { kind, .. } => match Kind::from_u8(*kind) {
                Some(Kind::ConsentGranted | Kind::ConsentRevoked) => {
                    matches!(self, Role::Admin | Role::Writer | Role::Gateway)
                }
                Some(Kind::PolicyChanged | Kind::AccessDenied) => {
                    matches!(self, Role::Admin | Role::Gateway)
                }
                // Tokens, credentials and keys have their own requests.
                _ => false,
            },
            Message::Whois { .. } | Message::Context { .. } => {
                matches!(self, Role::Gateway | Role::Admin)
            }
            Message::GetPolicy { .. } => {
                matches!(self, Role::Gateway | Role::Admin | Role::Auditor)
            }
            Message::GetConsent { .. } => matches!(
                self,
                Role::Gateway | Role::Admin | Role::Writer | Role::Auditor
            ),
            Message::CreateCredential { .. }
            | Message::CreateCertCredential { .. }
            | Message::RevokeCredential { .. }
            | Message::Shred { .. }
            | Message::RotateSubjectKey { .. }
            | Message::RotateSigningKey
            | Message::RotateMasterKey { .. }
            | Message::KeyStatus { .. }
            | Message::ListCredentials { .. }
            | Message::Reindex => self == Role::Admin,
            Message::Append { .. } | Message::AppendBatch { .. } => {
                matches!(self, Role::Writer | Role::Admin)
            }
            Message::Mint { .. } => matches!(self, Role::Gateway | Role::Admin),
            Message::Redeem { .. } => self == Role::Partner,
            Message::Head
            | Message::Entries { .. }
            | Message::Proof { .. }
            | Message::Heads { .. } => matches!(self, Role::Auditor | Role::Admin),
            _ => false,
        }
    }
}

/// Slows down peers that keep failing to redeem tokens (guessing, or
/// replaying spent ones): after `FREE_FAILURES` refusals from one peer,
/// each further redemption from it waits twice as long as the previous,
/// up to `MAX_DELAY`; a success, or an hour without failures, forgives
/// the peer. The refusals themselves are in the audit log.
///
/// A peer is an IPv4 address, or an IPv6 /64 network (`peer_of`): one
/// host, or one customer's link, is usually given a whole /64, and could
/// otherwise take a fresh address for each guess.
#[derive(Debug, Default)]
pub struct FailureThrottle {
    peers: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, Refusals>>,
}

/// A peer's refusals in a row, the last one's time, and the start given
/// to its latest redemption slowed down ([`FailureThrottle::reserve`]).
#[derive(Debug, Clone, Copy)]
struct Refusals {
    count: u32,
    last: std::time::Instant,
    slot: std::time::Instant,
}

impl FailureThrottle {
    const FREE_FAILURES: u32 = 5;
    const BASE_DELAY: Duration = Duration::from_millis(50);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    /// The longest a redemption waits its turn ([`FailureThrottle::reserve`]):
    /// two of the longest delays, within a client's usual 10 s timeout.
    const MAX_WAIT: Duration = Duration::from_secs(10);
    const FORGET_AFTER: Duration = Duration::from_secs(3600);
    /// Peers tracked at most (a flood of addresses must not grow memory
    /// without bound). Past it, room is made ([`FailureThrottle::make_room`]).
    const MAX_PEERS: usize = 100_000;

    /// The wait between two redemptions from `ip`, by its refusals (what
    /// [`FailureThrottle::reserve`] spaces them by).
    #[cfg(test)]
    fn delay(&self, ip: std::net::IpAddr) -> Duration {
        let Ok(peers) = self.peers.lock() else {
            return Duration::ZERO;
        };
        peers.get(&peer_of(ip)).map_or(Duration::ZERO, Self::step)
    }

    fn step(r: &Refusals) -> Duration {
        if r.count < Self::FREE_FAILURES || r.last.elapsed() >= Self::FORGET_AFTER {
            return Duration::ZERO;
        }
        let exp = (r.count - Self::FREE_FAILURES).min(16);
        Self::BASE_DELAY
            .saturating_mul(1 << exp)
            .min(Self::MAX_DELAY)
    }

    /// How long a redemption from `ip` arriving at `now` must wait: its
    /// delay (50 ms, doubling per refusal past the free ones, up to 5 s)
    /// after the later of `now` and the start
    /// given to the peer's previous redemption. So redemptions sent at
    /// once, on as many connections, start one `delay` apart, as they
    /// would one after the other, and not all after the same wait.
    ///
    /// `None` when that wait would pass `MAX_WAIT` (10 s):
    /// the redemption is refused (`rate_limited`) without waiting, and
    /// without its token being looked at, so that a queue of a slowed
    /// peer's redemptions cannot hold a valid token for minutes and spend
    /// it for a client that gave up long before.
    pub fn reserve(&self, ip: std::net::IpAddr, now: std::time::Instant) -> Option<Duration> {
        let Ok(mut peers) = self.peers.lock() else {
            return Some(Duration::ZERO);
        };
        let Some(r) = peers.get_mut(&peer_of(ip)) else {
            return Some(Duration::ZERO);
        };
        let step = Self::step(r);
        if step.is_zero() {
            return Some(Duration::ZERO);
        }
        let slot = r.slot.max(now) + step;
        let wait = slot - now;
        if wait > Self::MAX_WAIT {
            return None;
        }
        r.slot = slot;
        Some(wait)
    }

    /// Makes room in a table of `max_peers` or more for an eighth of
    /// them: the peers not slowed down yet and those forgiven by time go
    /// first, so that a flood of new addresses does not forgive the peers
    /// it is slowing down; then, while the table is still fuller than that,
    /// the slowed peers refused longest ago. Each call looks through the
    /// whole table, and leaves room for an eighth of it, so a flood of new
    /// peers costs a bounded amount of work per refusal, however many of
    /// the peers held are slowed down.
    fn make_room(
        peers: &mut std::collections::HashMap<std::net::IpAddr, Refusals>,
        max_peers: usize,
    ) {
        let keep = max_peers - max_peers.div_ceil(8);
        peers.retain(|_, r| !Self::step(r).is_zero());
        if peers.len() <= keep {
            return;
        }
        let mut lasts: Vec<std::time::Instant> = peers.values().map(|r| r.last).collect();
        let drop = peers.len() - keep;
        let (_, cutoff, _) = lasts.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        // Refused no later than the cutoff: at least `drop` peers, more
        // only for refusals of the same instant.
        peers.retain(|_, r| r.last > cutoff);
    }

    /// Records the outcome of a redemption from `ip`.
    pub fn record(&self, ip: std::net::IpAddr, refused: bool) {
        self.record_within(ip, refused, Self::MAX_PEERS);
    }

    fn record_within(&self, ip: std::net::IpAddr, refused: bool, max_peers: usize) {
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        let ip = peer_of(ip);
        if !refused {
            peers.remove(&ip);
            return;
        }
        if peers.len() >= max_peers && !peers.contains_key(&ip) {
            Self::make_room(&mut peers, max_peers);
        }
        let now = std::time::Instant::now();
        let r = peers.entry(ip).or_insert(Refusals {
            count: 0,
            last: now,
            slot: now,
        });
        if r.last.elapsed() >= Self::FORGET_AFTER {
            r.count = 0;
        }
        r.count = r.count.saturating_add(1);
        r.last = now;
    }
}

/// The peer [`FailureThrottle`] counts an address as: an IPv4 address
/// (IPv4-mapped IPv6 ones included) as itself, an IPv6 address as its /64
/// network.
pub(crate) fn peer_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match storage::state::canonical_ip(ip) {
        std::net::IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(network.into())
        }
        v4 => v4,
    }
}

/// The protocol served to a client in the same process (the HTTP shim of
/// `vaultd`) by calls instead of a socket ([`Local::direct`]): every
/// connection is served as one from the network is, its frames decoded
/// and checked, Hello and roles included, without the socket calls of a
/// loopback connection and without hand-offs between tasks.
#[derive(Debug, Clone)]
pub struct Local {
    vault: LiveVault,
    config: Arc<ServeConfig>,
    throttle: Arc<FailureThrottle>,
}

impl Local {
    pub fn new(vault: LiveVault, config: ServeConfig) -> Local {
        Local {
            vault,
            config: Arc::new(config),
            throttle: Arc::new(FailureThrottle::default()),
        }
    }

    /// A new connection served by calls instead of a pipe: each request
    /// frame a [`client::Client::direct`] hands it is decoded, checked and
    /// answered as on a network connection (`Hello` first, the role's
    /// rules, a partner's connection ending with its `Redeem`), in the
    /// caller's task.
    ///
    /// It is never [`Conn::confidential`]: the shim that calls forwards
    /// what HTTP callers send, over whatever their connection was, so a
    /// new master secret is not taken from it.
    pub fn direct(&self) -> Arc<Direct> {
        Arc::new(Direct {
            conn: Conn {
                vault: self.vault.clone(),
                config: self.config.clone(),
                throttle: self.throttle.clone(),
                peer: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                proxy: None,
                admission: None,
                arrived: tokio::time::Instant::now(),
                client_cert: None,
                tls: false,
                // The shim that calls is drained before the vault stops.
                stopping: CancellationToken::new(),
            },
            state: std::sync::Mutex::new(DirectState::Hello),
        })
    }
}

/// A connection of [`Local::direct`].
#[derive(Debug)]
pub struct Direct {
    conn: Conn,
    state: std::sync::Mutex<DirectState>,
}

#[derive(Debug, Clone)]
enum DirectState {
    /// Waiting for `Hello`.
    Hello,
    Open(Arc<Caller>),
    Closed,
}

impl Direct {
    /// Ends the connection, after `answer` if any.
    fn end(&self, answer: Option<(u32, Message)>) -> client::Exchanged {
        self.set(DirectState::Closed);
        client::Exchanged {
            frames: answer
                .map(|(id, m)| encode(vec![(id, m, 0)]))
                .unwrap_or_default(),
            closed: true,
        }
    }

    fn set(&self, state: DirectState) {
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state;
    }

    async fn answer(&self, frame: Vec<u8>) -> client::Exchanged {
        let config = &self.conn.config;
        let next = {
            // Zeroized: the first frame holds the API key.
            let frame = zeroize::Zeroizing::new(frame);
            match protocol::frame::decode_with_max(&frame, config.max_frame_len) {
                Ok(Some((f, used))) if used == frame.len() => Ok(Some(f)),
                Ok(Some(_)) => Err(protocol::Error::TrailingBytes.into()),
                Ok(None) => Err(protocol::Error::Malformed("an incomplete frame").into()),
                Err(e) => Err(e.into()),
            }
        };
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let caller = match state {
            DirectState::Closed => return self.end(None),
            DirectState::Hello => {
                return match hello(next, &self.conn.vault, None, false) {
                    Ok((id, caller)) => {
                        let ok = Message::HelloOk {
                            role: caller.role.name().into(),
                            server: config.server_name.clone(),
                        };
                        self.set(DirectState::Open(Arc::new(caller)));
                        answered(vec![(id, ok, 0)])
                    }
                    Err(ending) => self.end(ending.0),
                };
            }
            DirectState::Open(caller) => caller,
        };
        match screen(next, &caller, &self.conn.vault) {
            Screened::Request(id, Message::Redeem { token }, current) => {
                // Wiped once served, whatever the answer.
                let token = zeroize::Zeroizing::new(token);
                let reply = redeem_request(current, &token, &caller, &self.conn).await;
                self.end(Some((id, reply)))
            }
            Screened::Request(id, message, current) => {
                let answers = respond(message, &current, config, &caller).await;
                let frames: Vec<_> = answers.into_iter().map(|(m, f)| (id, m, f)).collect();
                answered(frames)
            }
            Screened::Answer(id, reply) => answered(vec![(id, reply, 0)]),
            Screened::End((reply, _)) => self.end(reply),
        }
    }
}

impl client::Exchange for Direct {
    fn exchange(&self, frame: Vec<u8>) -> futures_util::future::BoxFuture<'_, client::Exchanged> {
        Box::pin(self.answer(frame))
    }
}

/// Answers on a direct connection that stays open.
fn answered(answers: Vec<(u32, Message, u16)>) -> client::Exchanged {
    client::Exchanged {
        frames: encode(answers),
        closed: false,
    }
}

/// Answers encoded as frames, one after the other, into a buffer sized
/// for them: one that grows leaves copies of what it held (a token, an API
/// key, personal data) in memory it frees. The answers and their frames'
/// payloads are wiped once encoded; the client wipes the buffer
/// ([`client::Exchanged`]).
fn encode(answers: Vec<(u32, Message, u16)>) -> Vec<u8> {
    let frames: Vec<Frame> = answers
        .into_iter()
        .filter_map(|(id, mut m, flags)| {
            let f = answer_frame(id, &m, flags);
            m.wipe();
            f
        })
        .collect();
    let len = frames
        .iter()
        .map(|f| protocol::frame::HEADER_LEN + f.payload.len())
        .sum();
    let mut out = Vec::with_capacity(len);
    for mut f in frames {
        let _ = f.encode_into(&mut out, usize::MAX);
        zeroize::Zeroize::zeroize(&mut f.payload);
    }
    out
}

/// The frame of an answer; one too large to encode becomes an `internal`
/// error.
fn answer_frame(id: u32, m: &Message, flags: u16) -> Option<Frame> {
    m.to_frame(id, flags)
        .or_else(|_| error(ErrorCode::Internal, "response too large").to_frame(id, 0))
        .ok()
}

/// Sets `TCP_NODELAY` on the listening socket, and says whether the
/// sockets it accepts have it from there: Linux copies a listener's
/// options into each socket it accepts, which saves a system call per
/// connection. Elsewhere, or if the option cannot be set, each accepted
/// socket is given it.
fn nodelay_inherited(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux")
        && socket2::SockRef::from(listener)
            .set_tcp_nodelay(true)
            .is_ok()
}

/// Serves the protocol on `listener` until `shutdown` resolves: over TLS
/// with `tls` (each connection with the configuration of the moment it is
/// accepted, so that a reload serves the next), in plaintext without it.
///
/// Every accepted socket has `TCP_NODELAY`: answers are small and latency
/// matters more than packet count.
pub async fn run(
    listener: TcpListener,
    vault: LiveVault,
    config: ServeConfig,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let throttle = Arc::new(FailureThrottle::default());
    let config = Arc::new(config);
    let admission = Arc::new(
        Admission::new(config.max_connections, config.max_handshakes, "protocol")
            .per_credential(config.max_connections_per_credential),
    );
    let inherited = nodelay_inherited(&listener);
    tokio::pin!(shutdown);
    let stopping = CancellationToken::new();
    // Fired when the shutdown's grace is over: a connection still going
    // then is dropped where it stands.
    let cut_off = CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e, &admission).await;
                    continue;
                }
            },
        };
        if !inherited {
            let _ = socket.set_nodelay(true);
        }
        let vault = vault.clone();
        let config = config.clone();
        let acceptor = tls.as_ref().map(crate::tls::ServerTls::acceptor);
        let throttle = throttle.clone();
        let (ticket, evicted) = admission.arrive();
        let admission = admission.clone();
        // The handshake's window starts at the accept, not when the task
        // first runs.
        let arrived = tokio::time::Instant::now();
        let stopping = stopping.clone();
        let cut_off = cut_off.clone();
        // Cut off should the vault be taken out of service (a failed
        // write) while this connection's requests still hold it.
        let retiring = vault.retiring();
        connections.spawn(async move {
            let _departure = admission.departure(ticket);
            let mut conn = Conn {
                vault,
                config,
                throttle,
                // `::ffff:10.0.0.5` on a dual-stack listener is 10.0.0.5 here, as
                // it is in every check: the audit trail names it so.
                peer: storage::state::canonical_ip(peer.ip()),
                proxy: None,
                admission: Some((admission.clone(), ticket)),
                arrived,
                client_cert: None,
                tls: false,
                stopping,
            };
            let stop_opening = conn.stopping.clone();
            let served = async move {
                // A server that stops closes a connection still opening.
                let opened = tokio::select! {
                    opened = open(socket, acceptor.as_ref(), &mut conn) => opened?,
                    () = stop_opening.cancelled() => return Ok(()),
                };
                match opened {
                    Opened::Plain(socket) => {
                        let (r, w) = socket.into_split();
                        serve_connection(r, w, conn).await
                    }
                    Opened::Tls(stream) => {
                        let (r, w) = TlsOutgoing::split(*stream);
                        serve_connection(r, w, conn).await
                    }
                }
            };
            let result = tokio::select! {
                r = served => r,
                () = evicted.cancelled() => {
                    crate::metrics::turned_away("protocol", "evicted");
                    Err(ConnectionError::Evicted)
                }
                () = cut_off.cancelled() => Err(ConnectionError::CutOff),
                () = retiring.cancelled() => Err(ConnectionError::CutOff),
            };
            admission.leave(ticket);
            match result {
                Ok(()) => {}
                // A probe that connects and closes at once.
                Err(ConnectionError::ProxyHeader(crate::proxied::header::HeaderError::Closed)) => {
                    tracing::debug!(%peer, "a connection from a trusted proxy closed before its header");
                }
                // A trusted proxy that sends no header, or a bad one, is
                // misconfigured: every client behind it is refused.
                Err(e @ ConnectionError::ProxyHeader(_)) => {
                    tracing::warn!(%peer, error = %e, "connection from a trusted proxy refused");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "connection ended"),
            }
        });
    }
    // New connections are refused from here on (not left in the kernel's
    // backlog, unanswered, until the process ends), so that clients try
    // again elsewhere or later at once.
    drop(listener);
    // The requests read are answered before the vault is closed behind
    // them; a client that does not read its answers is cut off by then.
    stopping.cancel();
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "connections still answering {} s after the stop are dropped",
            SHUTDOWN_GRACE.as_secs()
        );
        // Dropped at their next await: what they hold of the vault goes
        // with them, so that it is closed (and synced) behind them. A task
        // stuck in a blocking call keeps its hold until that returns.
        cut_off.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    }
    Ok(())
}

/// Leaves a ticket's place among the connections in their handshake when
/// dropped ([`Admission::departure`]).
#[derive(Debug)]
pub struct Departure(Arc<Admission>, u64);

impl Drop for Departure {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// After an accept that failed: out of file descriptors, the oldest
/// connection still in its handshake is closed to make room (so that
/// connections that never authenticate cannot keep every client out);
/// then a short pause before the next accept.
pub(crate) async fn accept_failed(e: &std::io::Error, admission: &Admission) {
    // EMFILE, ENFILE: the process's or the system's descriptors are used up.
    let out_of_fds = matches!(e.raw_os_error(), Some(24 | 23));
    let evicted = out_of_fds && admission.evict_oldest();
    tracing::warn!(error = %e, evicted, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// How long a stopping server waits for its connections to answer the
/// requests they had read.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The longest token lifetime a server may be given
/// (`--max-token-ttl-secs`), in seconds: a day.
pub const MAX_TOKEN_TTL_SECS: u32 = 86_400;

/// Why a connection closes when the server stops: its last frame, under
/// request id 0 (the requests read before it were answered).
fn shutting_down() -> Message {
    error(
        ErrorCode::Unavailable,
        "the server is shutting down: requests not answered were not done; try again shortly",
    )
}

/// A new connection's stream once what comes before `Hello` is done.
enum Opened<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// What comes before `Hello` on a new connection: a trusted proxy's PROXY
/// header (which names the client `conn` then stands for), then the TLS
/// handshake. Both must be done by [`Conn::handshake_deadline`], which
/// the `Hello` after them shares.
async fn open<S>(
    mut socket: S,
    acceptor: Option<&tokio_rustls::TlsAcceptor>,
    conn: &mut Conn,
) -> Result<Opened<S>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = conn.handshake_deadline();
    if conn.config.proxy_protocol_from.trusts(conn.peer) {
        if let Some(client) = proxied_client(&mut socket, deadline).await? {
            conn.proxy = Some(std::mem::replace(&mut conn.peer, client));
        }
    }
    let Some(acceptor) = acceptor else {
        return Ok(Opened::Plain(socket));
    };
    let accepted = tokio::time::timeout_at(deadline, acceptor.accept(socket)).await;
    crate::tls::count_handshake("protocol", &accepted);
    match accepted {
        Err(_) => Err(ConnectionError::Idle),
        Ok(Err(e)) => Err(ConnectionError::Tls(e.to_string())),
        Ok(Ok(stream)) => {
            crate::tls::client_certificate_in_force(stream.get_ref().1)
                .map_err(ConnectionError::Tls)?;
            conn.client_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(crate::tls::fingerprint);
            conn.tls = true;
            Ok(Opened::Tls(Box::new(stream)))
        }
    }
}

/// The client a trusted TCP proxy names in the PROXY header that begins
/// its connection; `None` when the connection is the proxy's own.
async fn proxied_client<R: AsyncRead + Unpin>(
    socket: &mut R,
    deadline: tokio::time::Instant,
) -> Result<Option<std::net::IpAddr>, ConnectionError> {
    use crate::proxied::header::{self, Header};
    let (outcome, client) = match tokio::time::timeout_at(deadline, header::read(socket)).await {
        Err(_) => ("timeout", Err(ConnectionError::Idle)),
        Ok(Err(e @ header::HeaderError::Closed)) => {
            ("closed", Err(ConnectionError::ProxyHeader(e)))
        }
        Ok(Err(e)) => ("refused", Err(ConnectionError::ProxyHeader(e))),
        Ok(Ok(Header::Local)) => ("local", Ok(None)),
        Ok(Ok(Header::Proxied(client))) => (
            "proxied",
            Ok(Some(storage::state::canonical_ip(client.ip()))),
        ),
    };
    crate::metrics::global()
        .proxy_headers
        .get_or_create(&crate::metrics::OutcomeLabels { outcome })
        .inc();
    client
}

/// Admission of connections: the handshake (TLS and `Hello`) first, then
/// one of `max_connections` slots.
///
/// A connection in its handshake holds no slot. At most `max_handshakes`
/// are in their handshake at once; one more closes the oldest of them
/// (it has had the longest to finish), and each has `handshake_timeout`.
/// So connections that trickle bytes and never authenticate (slowloris)
/// cannot fill the slots, and a client that authenticates at once always
/// gets through when a slot is free: it would have to be the oldest of
/// `max_handshakes` handshakes to be closed. Once authenticated, a
/// connection past the limit waits for a slot before `HelloOk`, but only
/// until its handshake's deadline, and still among the handshakes (its
/// wait can be ended for a newer one): so connections that wait are bounded in
/// time and in number, and a client with a valid key cannot make the
/// server hold more than `max_connections + max_handshakes` connections.
///
/// `fintrust_connections{port, state}` counts the connections in their
/// handshake (the map's entries) and those holding a slot ([`Slot`]s),
/// each change made where the map or the slot changes, so the gauges of
/// every `Admission` of a port add up.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_handshakes: usize,
    next: std::sync::atomic::AtomicU64,
    /// Connections in their handshake, oldest first.
    handshaking: std::sync::Mutex<std::collections::BTreeMap<u64, CancellationToken>>,
    /// `fintrust_connections` of this port, `handshake` and `served`.
    in_handshake: Gauge,
    served: Gauge,
    /// Connections each credential (by id) holds, and the most it may
    /// ([`Admission::hold`]).
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    per_credential: usize,
}

impl Admission {
    /// `max_connections` slots; at most `max_handshakes` connections in
    /// their handshake; `port` names it in the metrics (`protocol`,
    /// `http`).
    pub fn new(max_connections: usize, max_handshakes: usize, port: &'static str) -> Self {
        let (max_connections, max_handshakes) = (max_connections.max(1), max_handshakes.max(1));
        let m = crate::metrics::global();
        let gauge = |family: &Family<crate::metrics::ConnectionLabels, Gauge>, state| {
            family
                .get_or_create(&crate::metrics::ConnectionLabels { port, state })
                .clone()
        };
        for (state, max) in [("handshake", max_handshakes), ("served", max_connections)] {
            gauge(&m.connections_limit, state).set(i64::try_from(max).unwrap_or(i64::MAX));
        }
        Admission {
            slots: Arc::new(Semaphore::new(max_connections)),
            max_handshakes,
            next: std::sync::atomic::AtomicU64::new(0),
            handshaking: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            in_handshake: gauge(&m.connections, "handshake"),
            served: gauge(&m.connections, "served"),
            held: Arc::default(),
            per_credential: usize::MAX,
        }
    }

    /// At most `max` connections per credential ([`Admission::hold`]; the
    /// HTTP shim holds them by client address).
    pub fn per_credential(mut self, max: usize) -> Self {
        self.per_credential = max.max(1);
        self
    }

    /// One more connection of the credential `id`, held until the
    /// [`Held`] is dropped; `None` when the credential holds its maximum
    /// already.
    pub fn hold(&self, id: &str) -> Option<Held> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(id.to_string()).or_insert(0);
        if *n >= self.per_credential {
            return None;
        }
        *n += 1;
        Some(Held {
            held: self.held.clone(),
            id: id.to_string(),
        })
    }

    /// A new connection: its ticket, and the token that closes it if it
    /// is evicted during its handshake.
    pub fn arrive(&self) -> (u64, CancellationToken) {
        let ticket = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        if let Ok(mut h) = self.handshaking.lock() {
            while h.len() >= self.max_handshakes {
                match h.pop_first() {
                    Some((_, oldest)) => {
                        oldest.cancel();
                        self.in_handshake.dec();
                    }
                    None => break,
                }
            }
            h.insert(ticket, token.clone());
            self.in_handshake.inc();
        }
        (ticket, token)
    }

    /// Closes the oldest connection in its handshake, if there is one: for
    /// an accept that failed for want of file descriptors, which would
    /// otherwise leave every new client in the kernel's backlog while
    /// connections that never authenticate hold them.
    pub fn evict_oldest(&self) -> bool {
        let Ok(mut h) = self.handshaking.lock() else {
            return false;
        };
        match h.pop_first() {
            Some((_, oldest)) => {
                oldest.cancel();
                self.in_handshake.dec();
                true
            }
            None => false,
        }
    }

    /// The connection authenticated: its slot, held until the connection
    /// ends, taken at once when one is free; otherwise waited for until
    /// `deadline`. A connection is evicted no longer once it holds its
    /// slot, but still while it waits: so connections waiting for a slot
    /// count among the `max_handshakes`, and a client with a valid key
    /// cannot make the server hold more connections than
    /// `max_connections` and `max_handshakes` together. A waiting
    /// connection that is evicted is not closed outright as one in its
    /// handshake is: its wait ends with [`Refused::Evicted`], so that the
    /// caller can tell its client, as for [`Refused::Busy`].
    pub async fn admitted(
        &self,
        ticket: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Slot, Refused> {
        let waited = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(tokio::sync::TryAcquireError::Closed) => Err(Refused::Busy),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Eviction from now on ends the wait, not the connection.
                let evicted = CancellationToken::new();
                if let Ok(mut h) = self.handshaking.lock() {
                    if let Some(token) = h.get_mut(&ticket) {
                        *token = evicted.clone();
                    }
                }
                tokio::select! {
                    acquired = self.slots.clone().acquire_owned() => {
                        acquired.map_err(|_| Refused::Busy)
                    }
                    () = tokio::time::sleep_until(deadline) => Err(Refused::Busy),
                    () = evicted.cancelled() => Err(Refused::Evicted),
                }
            }
        };
        self.leave(ticket);
        waited.map(|permit| {
            self.served.inc();
            Slot {
                _permit: permit,
                served: self.served.clone(),
            }
        })
    }

    /// The connection ended (at any stage).
    pub fn leave(&self, ticket: u64) {
        if let Ok(mut h) = self.handshaking.lock() {
            if h.remove(&ticket).is_some() {
                self.in_handshake.dec();
            }
        }
    }

    /// A guard that leaves `ticket`'s place when it is dropped, however
    /// the connection's task ends (a panic included): [`Admission::leave`]
    /// of a ticket that left already does nothing.
    pub fn departure(self: &Arc<Self>, ticket: u64) -> Departure {
        Departure(self.clone(), ticket)
    }
}

/// A connection counted against its credential's maximum
/// ([`Admission::hold`]) until it is dropped.
#[derive(Debug)]
pub struct Held {
    held: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    id: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.id);
            }
        }
    }
}

/// One of an [`Admission`]'s slots, held until the connection ends.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    served: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.served.dec();
    }
}

/// Why an authenticated connection got no slot ([`Admission::admitted`],
/// [`Admission::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// None came free by its deadline.
    Busy,
    /// It was the oldest of the connections without a slot when one more
    /// arrived past `max_handshakes`.
    Evicted,
    /// Its credential (on the HTTP port, its address) holds its maximum of
    /// connections already.
    CredentialLimit,
}

impl Refused {
    /// The `reason` label of `fintrust_connections_turned_away_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Busy => "busy",
            Refused::Evicted => "evicted",
            Refused::CredentialLimit => "credential_limit",
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("idle timeout")]
    Idle,
    #[error("protocol error: {0}")]
    Protocol(protocol::Error),
    #[error("not authenticated")]
    Unauthenticated,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("closed during its handshake to admit a newer connection")]
    Evicted,
    #[error("still answering when the shutdown's grace ran out")]
    CutOff,
    #[error("answers left unread for the idle timeout")]
    Unread,
    #[error("no connection slot came free for it")]
    Busy,
    #[error(transparent)]
    ProxyHeader(crate::proxied::header::HeaderError),
}

impl From<protocol::Error> for ConnectionError {
    fn from(e: protocol::Error) -> Self {
        ConnectionError::Protocol(e)
    }
}

/// What a connection is served with.
#[derive(Debug, Clone)]
pub struct Conn {
    pub vault: LiveVault,
    pub config: Arc<ServeConfig>,
    pub throttle: Arc<FailureThrottle>,
    pub peer: std::net::IpAddr,
    /// The trusted TCP proxy the connection came through, when its PROXY
    /// header named `peer` (`ServeConfig::proxy_protocol_from`).
    pub proxy: Option<std::net::IpAddr>,
    /// Where the connection takes its slot once authenticated, and its
    /// ticket (`None`: no limit).
    pub admission: Option<(Arc<Admission>, u64)>,
    /// When the connection was accepted: its handshake ends
    /// `handshake_timeout` later ([`Conn::handshake_deadline`]).
    pub arrived: tokio::time::Instant,
    /// The SHA-256 of the client certificate the TLS handshake verified
    /// (mutual TLS), which a `Hello` with an empty API key authenticates
    /// with ([`authenticate_certificate`]).
    pub client_cert: Option<[u8; 32]>,
    /// Whether the connection is TLS (set by its handshake).
    pub tls: bool,
    /// Cancelled when the server stops: the connection reads no further
    /// request, answers those it has read, says why it closes (`Error
    /// unavailable`, request id 0) and closes; one not yet authenticated
    /// closes at once.
    pub stopping: CancellationToken,
}

impl Conn {
    /// When everything before the connection is authenticated must be
    /// done: a trusted proxy's PROXY header, the TLS handshake and a valid
    /// `Hello`, one window for all three, so that a client that trickles
    /// bytes holds a handshake place for `handshake_timeout` at most.
    pub fn handshake_deadline(&self) -> tokio::time::Instant {
        self.arrived + self.config.handshake_timeout
    }

    /// Whether what the connection carries cannot have been read on a
    /// network: it is TLS, or plaintext from a loopback address (through
    /// a trusted proxy, when there is one, on a loopback address too). A
    /// new master secret is taken only from such a connection
    /// ([`Caller::confidential`]).
    pub fn confidential(&self) -> bool {
        let loopback = |ip: std::net::IpAddr| storage::state::canonical_ip(ip).is_loopback();
        self.tls || (loopback(self.peer) && self.proxy.is_none_or(loopback))
    }
}

/// Size of a connection's read and write buffers until `Hello` is
/// answered, and for the whole of a partner's connection (they grow for a
/// larger frame). Fresh 8 KiB buffers for each redemption's connection
/// cost ~8% of the redemption rate (docs/benchmarks.md).
const HELLO_BUFFER: usize = 1024;
/// Largest payload of a connection's first frame, its `Hello` (an API key
/// and a client name; longer is `frame_too_large`): the most a client
/// that is not authenticated can make the server hold for its frame, so
/// that the connections in their handshake (`max_handshakes`) cannot pin
/// `max_frame_len` each.
pub const MAX_HELLO_LEN: usize = 4 * 1024;
/// Read buffer of any other role's connection, which may pipeline, and
/// the write buffer's flush mark for all.
const PIPELINE_BUFFER: usize = 8 * 1024;
/// Most room a connection's write buffer keeps once it has written
/// everything (a larger one, left by a large answer, is given back).
const MAX_IDLE_WRITE_BUFFER: usize = 64 * 1024;

/// The write half of a connection's byte stream.
pub trait Outgoing: AsyncWrite + Unpin + Send + 'static {
    /// Holds back what is written from now on until the stream is shut
    /// down or closed, so that a connection's last answer and its end
    /// leave together: over TCP one segment with the FIN where there were
    /// two (three over TLS, with its `close_notify`), which a connection
    /// per token makes worth it (docs/benchmarks.md, "The last answer
    /// with the FIN"). Only a hint: a stream that cannot hold sends at
    /// once.
    fn hold_until_close(&self) {}
}

/// `TCP_CORK` on `socket`: the FIN of the shutdown (or of the close, if
/// the connection is dropped) pushes out what is held, with it.
fn cork(socket: socket2::SockRef<'_>) {
    if let Err(e) = socket.set_tcp_cork(true) {
        tracing::debug!(error = %e, "TCP_CORK not set");
    }
}

impl Outgoing for tokio::net::tcp::OwnedWriteHalf {
    fn hold_until_close(&self) {
        cork(socket2::SockRef::from(self.as_ref()));
    }
}

/// In-process pipes and the like: nothing to hold.
impl<T: AsyncRead + AsyncWrite + Send + 'static> Outgoing for tokio::io::WriteHalf<T> {}

/// The write half of a TLS connection, with a second descriptor of its
/// socket (the TLS stream's own half gives no access to it) so that
/// [`Outgoing::hold_until_close`] can hold its last record, the
/// `close_notify` and the FIN together.
struct TlsOutgoing<S> {
    half: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<S>>,
    socket: Option<socket2::Socket>,
}

impl TlsOutgoing<tokio::net::TcpStream> {
    /// Splits `stream` into its read half and a write half that can hold.
    fn split(
        stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    ) -> (
        tokio::io::ReadHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        Self,
    ) {
        // Without a second descriptor (none left), the answer is not held.
        let socket = socket2::SockRef::from(stream.get_ref().0).try_clone().ok();
        let (r, half) = tokio::io::split(stream);
        (r, TlsOutgoing { half, socket })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsOutgoing<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.half).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.half).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.half.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.half).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

impl Outgoing for TlsOutgoing<tokio::net::TcpStream> {
    fn hold_until_close(&self) {
        if let Some(socket) = &self.socket {
            cork(socket2::SockRef::from(socket));
        }
    }
}

/// A served connection's byte stream (or its write half), whose writes
/// fail once they have made no progress for `limit`: a client that sends
/// requests but leaves the answers unread fills the socket's buffers, and
/// without a limit its connection would wait for ever, holding its slot
/// of `max_connections` and its requests in flight. Reads pass through
/// (the shim's HTTP connections wrap their whole stream).
///
/// A timer is armed only when a write, flush or shutdown has to wait, and
/// disarmed by the next one that moves: a client that reads, however
/// slowly, is never cut off, and a write the socket takes at once (nearly
/// every one) costs no timer. Once the limit passed, every later call
/// fails at once with [`std::io::ErrorKind::TimedOut`], so that nothing
/// waits for the limit twice.
pub(crate) struct Unread<W> {
    inner: W,
    limit: Duration,
    /// Armed while a call waits; `None` before the first wait.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    expired: bool,
}

impl<W> Unread<W> {
    pub(crate) fn new(inner: W, limit: Duration) -> Self {
        Unread {
            inner,
            limit,
            timer: None,
            armed: false,
            expired: false,
        }
    }

    /// Whether the limit ended a call (the connection's answers were left
    /// unread).
    pub(crate) fn expired(&self) -> bool {
        self.expired
    }

    /// The outcome of a call of the inner stream: a result disarms the
    /// timer; a wait arms it (if it is not armed yet), and fails once it
    /// has run out.
    fn watch<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.expired = true;
                Poll::Ready(Err(Self::gone()))
            }
        }
    }

    /// Makes a call of the inner stream under the limit; fails at once
    /// once the limit has passed.
    fn call<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        op: impl FnOnce(
            std::pin::Pin<&mut W>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>>
    where
        W: Unpin,
    {
        if self.expired {
            return std::task::Poll::Ready(Err(Self::gone()));
        }
        let polled = op(std::pin::Pin::new(&mut self.inner), cx);
        self.watch(cx, polled)
    }

    fn gone() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "answers left unread for the idle timeout",
        )
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Unread<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.call(cx, |w, cx| w.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.call(cx, |w, cx| w.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.call(cx, |w, cx| w.poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.call(cx, |w, cx| w.poll_shutdown(cx))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Unread<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<W: Outgoing> Outgoing for Unread<W> {
    fn hold_until_close(&self) {
        self.inner.hold_until_close();
    }
}

/// Serves one connection over any byte stream (plain TCP or TLS).
pub async fn serve_connection<R, W>(reader: R, writer: W, conn: Conn) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: Outgoing,
{
    let codec = FrameCodec::with_max_frame_len(conn.config.max_frame_len);
    // Small buffers until the caller is known: a partner's connection
    // carries a `Hello` and one `Redeem`, and there is one per token. And
    // a small frame: until it is authenticated, a connection may make the
    // server hold `MAX_HELLO_LEN` bytes, not `max_frame_len`.
    let hello_codec = FrameCodec::with_max_frame_len(MAX_HELLO_LEN.min(conn.config.max_frame_len));
    let mut frames = FramedRead::with_capacity(reader, hello_codec, HELLO_BUFFER);
    let writer = Unread::new(writer, conn.config.idle_timeout);
    let mut sink = FramedWrite::with_capacity(writer, codec.clone(), HELLO_BUFFER);
    sink.set_backpressure_boundary(PIPELINE_BUFFER);

    // Authentication: the first frame, by the handshake's deadline; a
    // server that stops meanwhile closes the connection.
    let first = tokio::select! {
        first = next_frame_by(&mut frames, conn.handshake_deadline()) => first,
        () = conn.stopping.cancelled() => return Ok(()),
    };
    let (hello_id, caller) = match hello(first, &conn.vault, conn.client_cert, conn.confidential())
    {
        Ok(known) => known,
        Err(ending) => {
            let (reply, result) = *ending;
            let bad_magic = matches!(
                result,
                Err(ConnectionError::Protocol(protocol::Error::BadMagic))
            );
            if bad_magic && is_http_request(frames.read_buffer()) {
                let w = sink.get_mut();
                let _ = tokio::io::AsyncWriteExt::write_all(w, http_answer().as_bytes()).await;
                let _ = tokio::io::AsyncWriteExt::flush(w).await;
            } else if let Some((id, m)) = reply {
                send(&mut sink, id, &m).await;
            }
            return result;
        }
    };
    // The credential's own share first: one at its maximum takes no slot,
    // nor waits for one.
    let admitted = match &conn.admission {
        Some((a, ticket)) => match a.hold(&caller.id) {
            Some(held) => a
                .admitted(*ticket, conn.handshake_deadline())
                .await
                .map(|slot| Some((held, slot))),
            None => {
                a.leave(*ticket);
                Err(Refused::CredentialLimit)
            }
        },
        None => Ok(None),
    };
    let _admitted = match admitted {
        Ok(held_and_slot) => held_and_slot,
        Err(refused) => {
            crate::metrics::turned_away("protocol", refused.reason());
            let why = match refused {
                Refused::CredentialLimit => format!(
                    "this credential holds its limit of {} connections: close one, or use \
                     the ones it has (requests pipeline on one connection)",
                    conn.config.max_connections_per_credential
                ),
                Refused::Busy | Refused::Evicted => busy(conn.config.max_connections),
            };
            send(&mut sink, hello_id, &error(ErrorCode::Unavailable, &why)).await;
            return Err(ConnectionError::Busy);
        }
    };
    *frames.decoder_mut() = codec;
    let role = caller.role;
    let ok = Message::HelloOk {
        role: role.name().into(),
        server: conn.config.server_name.clone(),
    };
    if role == Role::Partner {
        return serve_partner(frames, sink, (hello_id, ok), &caller, &conn).await;
    }
    let Conn {
        vault,
        config,
        stopping,
        ..
    } = conn;
    // Pipelined requests: read them in larger pieces.
    frames.read_buffer_mut().reserve(PIPELINE_BUFFER);
    let caller = Arc::new(caller);
    if !send(&mut sink, hello_id, &ok).await {
        return Ok(());
    }

    // Requests in flight are futures polled by this task, not tasks of
    // their own: a pipelined append costs no spawn, and the answers of one
    // commit group are sent from one place. Appends that arrived together
    // share one future ([`handle_appends`]); each future yields how many
    // requests it answered, so that the limit counts requests, and their
    // answers.
    //
    // Answers are written by this task too, in completion order: fed into
    // the sink's buffer as their requests complete, and flushed once no
    // more are ready, so that the answers of one commit group leave in one
    // write (the buffer still writes on its own past its mark). A write
    // that cannot move (the client does not read) holds up reading too,
    // which is the back-pressure wanted, and fails after the idle timeout
    // ([`Unread`]), which ends the connection.
    let max_in_flight = config.max_in_flight.max(1);
    let (config_ref, caller_ref) = (&config, &caller);
    // This connection's reads of a stretch of the log ([`scan`]) take
    // turns, and each keeps its turn until its answers are fed to the
    // sink: what a connection holds of them is one answer, however many
    // it has in flight and whether or not it reads what it is sent. (The
    // reads of its credential, on all its connections together, take
    // turns for the read itself: [`scan`].)
    let scan_turn = Semaphore::new(1);
    let turn_ref = &scan_turn;
    let mut pending = FuturesUnordered::new();
    let mut in_flight = 0;
    let mut out = Answers {
        sink,
        dirty: false,
        failed: false,
        budget: Vec::new(),
    };
    // A frame read while gathering appends that is not one of them.
    let mut carried = None;
    let (last, result) = loop {
        // Answers could not be written (left unread): nothing more is
        // read or answered.
        if out.failed {
            break (None, Ok(()));
        }
        // Back-pressure: read the next frame only when a slot is free.
        if in_flight >= max_in_flight {
            out.flush().await;
            if let Some((n, answers, held)) = pending.next().await {
                in_flight -= n;
                out.feed_all(answers).await;
                out.hold(held);
            }
            continue;
        }
        let screened = match carried.take() {
            Some(s) => s,
            None => {
                // Requests in flight progress while the next frame is
                // awaited (reading a frame is cancel-safe, and so is a
                // flush: what it did not write stays in the buffer).
                let next = tokio::select! {
                    biased;
                    Some((n, answers, held)) = pending.next(), if !pending.is_empty() => {
                        in_flight -= n;
                        out.feed_all(answers).await;
                        out.hold(held);
                        continue;
                    }
                    () = out.flush(), if out.dirty => continue,
                    () = stopping.cancelled() => break (Some((0, shutting_down())), Ok(())),
                    next = next_frame(&mut frames, config.idle_timeout) => next,
                };
                screen(next, caller_ref, &vault)
            }
        };
        let (id, message, current) = match screened {
            Screened::Request(id, Message::Append { subject, fields }, current) => {
                let room = max_in_flight.saturating_sub(in_flight);
                let first = (id, subject, fields);
                let (mut appends, weight, next) =
                    gather_appends(&mut frames, first, &current, room, caller_ref, &vault);
                carried = next;
                if appends.len() > 1 {
                    in_flight += weight;
                    pending.push(Either::Left(async move {
                        let answers = handle_appends(appends, current).await;
                        (weight, answers, AnswerHold::default())
                    }));
                    continue;
                }
                // One alone is answered as any request, so that it may
                // lead a group of its own (`Vault::append`).
                match appends.pop() {
                    Some((id, subject, fields)) => {
                        (id, Message::Append { subject, fields }, current)
                    }
                    None => continue,
                }
            }
            Screened::Request(id, message, current) => (id, message, current),
            Screened::Answer(id, reply) => {
                out.feed(id, &reply, 0).await;
                continue;
            }
            Screened::End(ending) => break ending,
        };
        let weight = weight(&message);
        in_flight += weight;
        pending.push(Either::Right(async move {
            let mut held = AnswerHold::default();
            if is_scan(&message) {
                held.turn = turn_ref.acquire().await.ok();
            }
            if matches!(message, Message::Entries { .. }) {
                // Bounded: answers that other connections hold unread may
                // keep the budget as long as their clients read a little
                // now and then, and a wait without end would keep this
                // connection's slot with it (and, once its client gave
                // up, the slot of a connection that only drains what it
                // had read).
                let wait = config_ref.entries_wait;
                let taking = config_ref
                    .entries_budget
                    .take(&caller_ref.id, config_ref.max_entries_bytes);
                match tokio::time::timeout(wait, taking).await {
                    Ok(budget) => held.budget = budget,
                    Err(_) => {
                        let busy = error(
                            ErrorCode::Unavailable,
                            "the server holds as many entries as it may in answers not yet \
                             read by their clients: try again later",
                        );
                        return (weight, vec![(id, busy, 0)], held);
                    }
                }
            }
            let answers = handle(id, message, &current, config_ref, caller_ref).await;
            if let Some(b) = held.budget.as_mut() {
                // What the answer holds: its entries.
                let bytes = answers
                    .iter()
                    .map(|(_, m, _)| match m {
                        Message::EntryBatch { entries } => entries.iter().map(Vec::len).sum(),
                        _ => 0,
                    })
                    .sum();
                config_ref.entries_budget.keep_only(b, bytes);
            }
            (weight, answers, held)
        }));
    };
    // Requests already read are answered, even when reading has ended;
    // then what ended it (a frame that cannot be read), so that its error
    // is the connection's last answer. Answers are flushed while others
    // are awaited, as above: an `Entries` still to come may wait for the
    // budget that answers fed and not yet written hold. Once a write has
    // failed, nothing more is written: the reads still to come are not
    // made.
    loop {
        if out.failed {
            break;
        }
        tokio::select! {
            biased;
            next = pending.next() => match next {
                Some((_, answers, held)) => {
                    out.feed_all(answers).await;
                    out.hold(held);
                }
                None => break,
            },
            () = out.flush(), if out.dirty => {}
        }
    }
    drop(pending);
    if let Some((id, reply)) = last {
        out.feed(id, &reply, 0).await;
    }
    out.flush().await;
    let mut sink = out.sink;
    let _ = SinkExt::<Frame>::close(&mut sink).await;
    unread_or(&sink, result)
}

/// What an answer holds until it is out: the connection's turn to read
/// the log ([`scan`]), given back once the answer is fed to the sink, and
/// its share of [`ServeConfig::entries_budget`], given back once a flush
/// has written it.
#[derive(Default)]
struct AnswerHold<'a> {
    turn: Option<tokio::sync::SemaphorePermit<'a>>,
    budget: Option<EntriesHold>,
}

/// The answers of a pipelined connection on their way out: fed into the
/// sink's buffer, flushed when none is ready. Once a write has failed,
/// nothing more is written.
struct Answers<W: AsyncWrite + Unpin> {
    sink: FramedWrite<Unread<W>, FrameCodec>,
    /// Fed since the last flush.
    dirty: bool,
    failed: bool,
    /// The budget of answers fed and not yet written (all of it given
    /// back by the flush that writes them, or when the connection ends).
    budget: Vec<EntriesHold>,
}

impl<W: AsyncWrite + Unpin> Answers<W> {
    async fn feed(&mut self, id: u32, m: &Message, flags: u16) {
        if self.failed {
            return;
        }
        let fed = feed(&mut self.sink, id, m, flags).await;
        self.failed = !fed;
        self.dirty = fed;
        if !fed {
            // Nothing more is written: what the answers held is free.
            self.budget.clear();
        }
    }

    /// Each answer is wiped once fed (a token, an API key, personal data).
    async fn feed_all(&mut self, answers: Vec<(u32, Message, u16)>) {
        for (id, mut m, flags) in answers {
            self.feed(id, &m, flags).await;
            m.wipe();
        }
    }

    async fn flush(&mut self) {
        if self.dirty && !self.failed {
            self.failed = SinkExt::<Frame>::flush(&mut self.sink).await.is_err();
        }
        self.dirty = false;
        self.budget.clear();
        // The buffer grows to the largest answer written (an `Entries`
        // answer: megabytes) and keeps that room: given back once
        // written, so that what a connection holds between answers stays
        // small.
        // (`capacity` counts only the room past what was written: whether
        // the whole allocation is larger is what `try_reclaim` says.) Once
        // a write failed, nothing more is written: all of it goes.
        let buffer = self.sink.write_buffer_mut();
        if self.failed || (buffer.is_empty() && buffer.try_reclaim(MAX_IDLE_WRITE_BUFFER + 1)) {
            drop(std::mem::take(buffer));
        }
    }

    /// Keeps `held`'s budget until the next flush; its turn ends here.
    fn hold(&mut self, held: AnswerHold<'_>) {
        if let Some(b) = held.budget {
            if self.dirty && !self.failed {
                self.budget.push(b);
            }
        }
    }
}

/// A partner's connection: a `Redeem` ends it, after any number of
/// `Ping`, `Health` and `KeyChain` requests, answered one at a time in
/// order. No writer task: the answers are written here, and `HelloOk`
/// leaves with the first answer when the partner sent that whole request
/// along with `Hello` (as `client::Connector::redeem` does), so that a
/// redemption costs one write each way.
async fn serve_partner<R, W>(
    mut frames: FramedRead<R, FrameCodec>,
    mut sink: FramedWrite<Unread<W>, FrameCodec>,
    (hello_id, ok): (u32, Message),
    caller: &Caller,
    conn: &Conn,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: Outgoing,
{
    let mut answer = Some((hello_id, ok));
    let result = loop {
        if let Some((id, m)) = answer.take() {
            if !feed(&mut sink, id, &m, 0).await {
                return unread_or(&sink, Ok(()));
            }
        }
        // What is answered leaves before the next request is awaited,
        // unless that request is already here whole (a partner that sent
        // part of one may be waiting for `HelloOk` before the rest).
        let next_is_here = matches!(
            protocol::frame::decode_with_max(frames.read_buffer(), conn.config.max_frame_len),
            Ok(Some(_))
        );
        if !next_is_here && SinkExt::<Frame>::flush(&mut sink).await.is_err() {
            return unread_or(&sink, Ok(()));
        }
        // The stop first: a request already in the buffer is not served
        // once the server is stopping (protocol.md, "Shutdown").
        let next = tokio::select! {
            biased;
            () = conn.stopping.cancelled() => {
                answer = Some((0, shutting_down()));
                break Ok(());
            }
            next = next_frame(&mut frames, conn.config.idle_timeout) => next,
        };
        let (id, message, current) = match screen(next, caller, &conn.vault) {
            Screened::Request(id, message, current) => (id, message, current),
            Screened::Answer(id, reply) => {
                answer = Some((id, reply));
                continue;
            }
            Screened::End((reply, result)) => {
                answer = reply;
                break result;
            }
        };
        if let Message::Redeem { token } = message {
            // Wiped once served, whatever the answer.
            let token = zeroize::Zeroizing::new(token);
            answer = Some((id, redeem_request(current, &token, caller, conn).await));
            break Ok(());
        }
        // Each request a partner may send has exactly one answer.
        let mut answers = respond(message, &current, &conn.config, caller).await;
        answer = answers.pop().map(|(m, _)| (id, m));
    };
    // The last answer, then the connection closes: both leave together
    // (what is still in the sink's buffer, `HelloOk` too, is written by
    // the close).
    sink.get_ref().hold_until_close();
    if let Some((id, mut m)) = answer {
        feed(&mut sink, id, &m, 0).await;
        m.wipe();
    }
    let _ = SinkExt::<Frame>::close(&mut sink).await;
    unread_or(&sink, result)
}

/// `result`, unless the connection's answers were left unread.
fn unread_or<W>(
    sink: &FramedWrite<Unread<W>, FrameCodec>,
    result: Result<(), ConnectionError>,
) -> Result<(), ConnectionError> {
    if sink.get_ref().expired() {
        return Err(ConnectionError::Unread);
    }
    result
}

/// What ends a connection: the answer to send first, if any, and how it
/// ended (`Ok`: the peer closed it, or the vault is being reopened).
type Ending = (Option<(u32, Message)>, Result<(), ConnectionError>);

/// How a connection ends on a frame that cannot be read: with an error
/// of the frame's code, if it has one.
fn unreadable(id: u32, e: ConnectionError) -> Ending {
    let reply = wire_code(&e).map(|code| (id, error(code, &e.to_string())));
    (reply, Err(e))
}

/// A frame read as a request, `Hello` included: one numbered 0 is an
/// error. 0 is the number of the server's answers that no request can be
/// told from (a frame that does not decode), so a client could not tell
/// its answer from those; the connection ends, as after a frame that
/// does not decode.
fn numbered(
    next: Result<Option<Frame>, ConnectionError>,
) -> Result<Option<Frame>, ConnectionError> {
    match next {
        Ok(Some(f)) if f.request_id == 0 => Err(protocol::Error::Malformed(
            "request id 0 is the server's, for errors it cannot tie to a request: number requests from 1",
        )
        .into()),
        other => other,
    }
}

/// The first bytes of a connection are an HTTP request: a method, then a
/// space (curl, a browser, or a client of the shim sent to this port).
pub(crate) fn is_http_request(first: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| first.starts_with(m))
}

/// What an HTTP request to this port is answered, in HTTP, so that curl
/// or a browser shows why; the connection is then closed. It repeats
/// nothing of the request.
pub(crate) fn http_answer() -> String {
    let body = "This port speaks the fintrust-vault wire protocol (docs/protocol.md), not HTTP. \
                The HTTP API is served by the shim: vaultd's --http-listen, 127.0.0.1:8080 by default.\n";
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The caller a connection's first frame authenticates, with the frame's
/// request id; otherwise how the connection ends. The first frame must be
/// `Hello` with a valid API key.
fn hello(
    first: Result<Option<Frame>, ConnectionError>,
    vault: &LiveVault,
    client_cert: Option<[u8; 32]>,
    confidential: bool,
) -> Result<(u32, Caller), Box<Ending>> {
    let frame = match numbered(first) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(Box::new((None, Ok(())))),
        Err(e) => return Err(Box::new(unreadable(0, e))),
    };
    let id = frame.request_id;
    let hello = frame.msg_type == protocol::MessageType::Hello;
    let identity = match Message::from_frame(&frame) {
        Ok(Message::Hello { api_key, .. }) => {
            let api_key = zeroize::Zeroizing::new(api_key);
            match (vault.get(), client_cert) {
                // No key, over mutual TLS: the certificate is the credential.
                (Some(v), Some(cert)) if api_key.is_empty() => authenticate_certificate(&v, &cert),
                (Some(v), _) => authenticate(&v, &api_key),
                (None, _) => return Err(Box::new((Some((id, recovering())), Ok(())))),
            }
        }
        Ok(_) => None,
        Err(e) => return Err(Box::new(unreadable(id, e.into()))),
    };
    match identity {
        Some(caller) => Ok((
            id,
            Caller {
                confidential,
                ..caller
            },
        )),
        None => {
            let m = error(
                ErrorCode::Unauthenticated,
                if hello {
                    "the API key is not one of the vault's live credentials: unknown, or revoked \
                     (a `vaultd dev` run revokes the keys an earlier run printed); over mutual \
                     TLS, no live credential holds the client certificate"
                } else {
                    "the first frame must be Hello with a valid API key (or, over mutual TLS, an \
                     empty one and a client certificate a credential holds)"
                },
            );
            let ending = (Some((id, m)), Err(ConnectionError::Unauthenticated));
            Err(Box::new(ending))
        }
    }
}

/// A frame read on an authenticated connection, sorted.
enum Screened {
    /// A request this role may send, and the vault to answer it from.
    Request(u32, Message, Arc<Vault>),
    /// A request answered without the vault: refused for the role, or
    /// while the vault is reopened.
    Answer(u32, Message),
    /// The connection ends: the peer closed it (`Ok`), or sent what
    /// cannot be read further; with the answer to send first, if any.
    End(Ending),
}

/// A request decoded but not (yet) handed on to be served: wiped when
/// dropped ([`Message::wipe`]), so that one refused leaves none of the
/// secrets or personal data it carried in freed memory.
struct Unserved(Option<Message>);

impl Drop for Unserved {
    fn drop(&mut self) {
        if let Some(m) = &mut self.0 {
            m.wipe();
        }
    }
}

fn screen(
    next: Result<Option<Frame>, ConnectionError>,
    caller: &Caller,
    vault: &LiveVault,
) -> Screened {
    let role = caller.role;
    let frame = match numbered(next) {
        Ok(Some(f)) => f,
        Ok(None) => return Screened::End((None, Ok(()))),
        Err(e) => return Screened::End(unreadable(0, e)),
    };
    let id = frame.request_id;
    // A redemption refused here is counted under its code, as one
    // refused where it is served is.
    let redemption = frame.msg_type == protocol::MessageType::Redeem;
    let refused = |code: ErrorCode| {
        if redemption {
            count_redemption(code.name());
        }
    };
    // Wiped when dropped: a request refused here (a new master secret, a
    // token) leaves no copy of its secret behind; one served is taken out.
    let mut message = match Message::from_frame(&frame) {
        Ok(m) => Unserved(Some(m)),
        Err(e) => {
            let code = e.wire_code().unwrap_or(ErrorCode::Malformed);
            refused(code);
            return Screened::End((Some((id, error(code, &e.to_string()))), Err(e.into())));
        }
    };
    let message_ref = message.0.as_ref();
    // A response type decodes, but no client may send one: the peer is
    // out of step, and the stream cannot be trusted past it (rule 8).
    if !frame.msg_type.is_request() {
        let e = protocol::Error::Malformed("a response type sent as a request");
        return Screened::End((
            Some((id, error(ErrorCode::Malformed, &e.to_string()))),
            Err(e.into()),
        ));
    }
    // A revoked credential's connection is refused whatever it asks
    // (read while the vault is reopened: nothing is checked then).
    let current = vault.get();
    if current
        .as_ref()
        .is_some_and(|current| !caller.still_live(current))
    {
        let m = error(
            ErrorCode::Unauthenticated,
            "this connection's credential was revoked",
        );
        refused(ErrorCode::Unauthenticated);
        return Screened::End((Some((id, m)), Err(ConnectionError::Unauthenticated)));
    }
    if message_ref.is_some_and(|m| !role.may(m)) {
        refused(ErrorCode::Forbidden);
        let m = error(
            ErrorCode::Forbidden,
            &format!("the {} role may not send this request", role.name()),
        );
        return Screened::Answer(id, m);
    }
    if matches!(message_ref, Some(Message::RotateMasterKey { .. })) && !caller.confidential {
        let m = error(
            ErrorCode::Forbidden,
            "a new master secret is taken only over TLS or from a loopback address: this one \
             crossed the network in plaintext, so it was not used (choose another)",
        );
        return Screened::Answer(id, m);
    }
    // Out of service while a failed write is recovered from.
    let Some(current) = current else {
        return match message_ref {
            Some(Message::Health) => Screened::Answer(
                id,
                Message::HealthInfo {
                    status: Status::Recovering.name().into(),
                    entries: 0,
                    signed_head: Vec::new(),
                },
            ),
            // Terminal, as its answer would be.
            Some(Message::Redeem { .. }) => {
                refused(ErrorCode::Unavailable);
                Screened::End((Some((id, recovering())), Ok(())))
            }
            _ => Screened::Answer(id, recovering()),
        };
    };
    match message.0.take() {
        Some(message) => Screened::Request(id, message, current),
        None => Screened::End((None, Ok(()))),
    }
}

/// The durable entry count and the encoded signed head that covers them
/// (empty without one), from one read of the head, so that the count is
/// always the head's: what `Health` and `Head` answer.
fn durable_head(vault: &Vault) -> (u64, Vec<u8>) {
    let head = vault.head();
    (
        head.map_or(0, |h| h.last_seq + 1),
        head.map(|h| h.encode()).unwrap_or_default(),
    )
}

/// A partner's `Redeem`: the answer, after the peer's penalty for earlier
/// refusals, counted in the metrics and in the peer's record.
async fn redeem_request(
    mut current: Arc<Vault>,
    token: &str,
    caller: &Caller,
    conn: &Conn,
) -> Message {
    let Some(wait) = conn.throttle.reserve(conn.peer, std::time::Instant::now()) else {
        count_redemption(ErrorCode::RateLimited.name());
        return error(
            ErrorCode::RateLimited,
            "too many redemptions from this address were refused for their token: its next \
             turn is more than 10 s away; try again later (the token was not looked at)",
        );
    };
    if !wait.is_zero() {
        // Not holding the vault meanwhile: it may be reopened. A stop
        // ends the wait, the token not looked at, so that a burn does not
        // begin as the grace ends, with its answer cut off.
        drop(current);
        tokio::select! {
            biased;
            () = conn.stopping.cancelled() => {
                count_redemption(ErrorCode::Unavailable.name());
                return shutting_down();
            }
            () = tokio::time::sleep(wait) => {}
        }
        current = match conn.vault.get() {
            Some(v) => v,
            None => {
                count_redemption(ErrorCode::Unavailable.name());
                return recovering();
            }
        };
        // Revoked during the wait: no token of it is spent, as none is
        // of a revoked partner's connection (the check at its read).
        if !caller.still_live(&current) {
            count_redemption(ErrorCode::Unauthenticated.name());
            return error(
                ErrorCode::Unauthenticated,
                "this connection's credential was revoked",
            );
        }
    }
    let started = std::time::Instant::now();
    let reply = redeem(&current, token, caller, (conn.peer, conn.proxy)).await;
    drop(current);
    // Only refusals of the token count as guesses; a vault that cannot
    // answer (`unavailable`) neither slows nor forgives.
    match &reply {
        Message::Error { code, .. } if is_token_refusal(*code) => {
            conn.throttle.record(conn.peer, true)
        }
        Message::Error { .. } => {}
        _ => conn.throttle.record(conn.peer, false),
    }
    let outcome = match &reply {
        Message::Error { code, .. } => code.name(),
        _ => {
            crate::metrics::global().commit("redeem", started.elapsed());
            "ok"
        }
    };
    count_redemption(outcome);
    crate::failpoints::before_reply("redeem");
    reply
}

/// Counts a redemption in `fintrust_redemptions_total`: `ok`, or the
/// error code it was answered.
fn count_redemption(outcome: &'static str) {
    crate::metrics::global()
        .redemptions
        .get_or_create(&crate::metrics::OutcomeLabels { outcome })
        .inc();
}

async fn next_frame<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, FrameCodec>,
    idle: Duration,
) -> Result<Option<Frame>, ConnectionError> {
    next_frame_by(frames, tokio::time::Instant::now() + idle).await
}

/// The next frame, `None` at the end of the stream; `Idle` at `deadline`.
async fn next_frame_by<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, FrameCodec>,
    deadline: tokio::time::Instant,
) -> Result<Option<Frame>, ConnectionError> {
    match tokio::time::timeout_at(deadline, frames.next()).await {
        Err(_) => Err(ConnectionError::Idle),
        Ok(None) => Ok(None),
        Ok(Some(Ok(f))) => Ok(Some(f)),
        Ok(Some(Err(e))) => Err(e.into()),
    }
}

fn wire_code(e: &ConnectionError) -> Option<ErrorCode> {
    match e {
        ConnectionError::Protocol(p) => p.wire_code(),
        ConnectionError::Unauthenticated => Some(ErrorCode::Unauthenticated),
        ConnectionError::Idle
        | ConnectionError::Unread
        | ConnectionError::Tls(_)
        | ConnectionError::Evicted
        | ConnectionError::CutOff
        | ConnectionError::ProxyHeader(_) => None,
        ConnectionError::Busy => Some(ErrorCode::Unavailable),
    }
}

/// The words of the answer to a connection that found no slot free.
pub(crate) fn busy(max_connections: usize) -> String {
    format!(
        "the server is serving its limit of {max_connections} connections, and none came free for this one: try again later"
    )
}

/// Writes `m` and flushes.
async fn send<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, FrameCodec>,
    id: u32,
    m: &Message,
) -> bool {
    feed(sink, id, m, 0).await && SinkExt::<Frame>::flush(sink).await.is_ok()
}

/// Queues `m`, with frame flags `flags`, in the sink's buffer, which is
/// written once it passes its mark or is flushed.
async fn feed<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, FrameCodec>,
    id: u32,
    m: &Message,
    flags: u16,
) -> bool {
    match answer_frame(id, m, flags) {
        // A token or an API key does not go through the sink's buffer,
        // whose memory keeps what it held: what was fed before is written
        // first, then the frame itself, whose copies are zeroized.
        Some(f) if f.msg_type.carries_secret() => {
            let Ok(encoded) = f.encode().map(zeroize::Zeroizing::new) else {
                return false;
            };
            SinkExt::<Frame>::flush(sink).await.is_ok()
                && tokio::io::AsyncWriteExt::write_all(sink.get_mut(), &encoded)
                    .await
                    .is_ok()
        }
        Some(f) => sink.feed(f).await.is_ok(),
        None => false,
    }
}

/// A redemption refused for its token: what a guesser gets.
fn is_token_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::TokenUnknown
            | ErrorCode::TokenExpired
            | ErrorCode::TokenSpent
            | ErrorCode::WrongPartner
    )
}

/// The answer of every request while the vault is reopened.
fn recovering() -> Message {
    error(
        ErrorCode::Unavailable,
        "the vault is recovering from a failed write; try again shortly",
    )
}

fn error(code: ErrorCode, message: &str) -> Message {
    Message::Error {
        code,
        message: message.to_string(),
    }
}

/// Who a connection speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The credential's name: for partners, the partner id.
    pub name: String,
    /// The credential's id, written into the events it records.
    pub id: String,
    /// Whether the connection is one a secret may cross
    /// ([`Conn::confidential`]): only then is `RotateMasterKey` taken.
    pub confidential: bool,
    /// The vault's count of revocations when the credential was last
    /// found live ([`Caller::still_live`]).
    checked: Checked,
}

impl Caller {
    /// Whether the credential is still live in `vault`: looked up again
    /// only when a credential was revoked since the last look (one atomic
    /// read per request otherwise). A revoked credential's connections
    /// are refused from their next request on, not only its new ones; so
    /// are those of a certificate's credential made again under another
    /// role or name. A lookup that fails counts as revoked (fail closed).
    fn still_live(&self, vault: &Vault) -> bool {
        let now = vault.revocations();
        if self.checked.0.load(Ordering::Acquire) == now {
            return true;
        }
        match vault.credential(&self.id) {
            // A certificate's credential revoked and made again has the
            // same id: it stands for this caller only with its role and
            // name (a partner's id).
            Ok(Some(c)) if c.role == self.role.name() && c.name == self.name => {
                self.checked.0.store(now, Ordering::Release);
                true
            }
            Ok(_) | Err(_) => false,
        }
    }
}

/// [`Caller::still_live`]'s memory: a cache, so two callers that differ
/// only in it are the same caller.
#[derive(Debug, Default)]
struct Checked(AtomicU64);

impl Clone for Checked {
    fn clone(&self) -> Self {
        Checked(AtomicU64::new(self.0.load(Ordering::Acquire)))
    }
}

impl PartialEq for Checked {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Checked {}

/// The caller an API key authenticates, or `None`. The key is looked up by
/// its hash, and the stored hash is compared again in constant time.
pub fn authenticate(vault: &Vault, api_key: &str) -> Option<Caller> {
    caller_by_key_hash(vault, &storage::api_key_hash(api_key))
}

/// The caller whose credential the client certificate with this SHA-256
/// holds ([`storage::Vault::create_cert_credential`]), if any.
pub fn authenticate_certificate(vault: &Vault, cert_sha256: &[u8; 32]) -> Option<Caller> {
    caller_by_key_hash(vault, &storage::certificate_key_hash(cert_sha256))
}

/// The caller whose active credential has `hash` as its key hash.
fn caller_by_key_hash(vault: &Vault, hash: &str) -> Option<Caller> {
    // Read before the lookup: a revocation published in between makes the
    // first request look again.
    let revocations = vault.revocations();
    let cred = vault.credential_by_key_hash(hash).ok()??;
    if !bool::from(cred.key_hash.as_bytes().ct_eq(hash.as_bytes())) {
        return None;
    }
    Some(Caller {
        role: Role::parse(&cred.role)?,
        name: cred.name,
        id: cred.id,
        confidential: false,
        checked: Checked(AtomicU64::new(revocations)),
    })
}

/// Why a new credential with `role` and `name` is refused, if it is: an
/// unknown role, or a name that is not a valid label.
fn credential_refused(role: &str, name: &str) -> Option<Message> {
    credential_terms(role, name)
        .err()
        .map(|why| error(ErrorCode::Invalid, &why))
}

/// Checks a new credential's role and name as the server does before
/// creating it (`vault-admin credentials create --data-dir` checks them
/// too): a role of [`Role`], a name that could be a subject id.
pub fn credential_terms(role: &str, name: &str) -> Result<(), String> {
    if Role::parse(role).is_none() {
        Err("unknown role".into())
    } else {
        storage::vault::validate_subject(name, true).map_err(|e| format!("credential name: {e}"))
    }
}

/// Maps a storage error to a wire error without leaking internals.
pub fn storage_error(e: &storage::Error) -> Message {
    use storage::Error as E;
    match e {
        E::Invalid(m) => error(ErrorCode::Invalid, m),
        E::Conflict(m) => error(ErrorCode::Conflict, m),
        E::SubjectShredded(_) => error(ErrorCode::SubjectShredded, "the subject has been shredded"),
        E::NoSuchSubject(_) => error(ErrorCode::NotFound, "no such subject"),
        E::CredentialRevoked(_) => error(
            ErrorCode::Unauthenticated,
            "this connection's credential was revoked",
        ),
        E::Poisoned | E::Closed | E::Locked => {
            error(ErrorCode::Unavailable, "the vault is not accepting writes")
        }
        other => {
            tracing::error!(error = %other, "request failed");
            error(ErrorCode::Internal, "internal error")
        }
    }
}

/// A record's fields as the JSON object that is encrypted and stored: its
/// keys in byte order (as a `serde_json::Map` writes them), no key twice.
pub fn record_json(fields: &[(String, String)]) -> Result<Vec<u8>, Message> {
    let mut sorted: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if let Some(twice) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(error(
            ErrorCode::Invalid,
            &format!("field {:?} appears twice", twice[0].0),
        ));
    }
    // Room for the quotes, colon and comma of each field; escapes grow it.
    let len = 2 + sorted
        .iter()
        .map(|(k, v)| k.len() + v.len() + 6)
        .sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.push(b'{');
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(&mut out, k)?;
        out.push(b':');
        push_json_str(&mut out, v)?;
    }
    out.push(b'}');
    Ok(out)
}

/// `s` as a JSON string, byte for byte as serde_json writes it: between
/// quotes as it is when no byte needs an escape (no control character,
/// quote or backslash), as a record's values nearly always are, and
/// through serde_json's own escaping otherwise.
fn push_json_str(out: &mut Vec<u8>, s: &str) -> Result<(), Message> {
    // Without an early exit, so that the compiler checks many bytes at once.
    let plain = !s.bytes().fold(false, |escape, b| {
        escape | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, s)
            .map_err(|_| error(ErrorCode::Internal, "encoding failed"))
    }
}

/// An `Append` request read: its id, subject and fields.
type ReadAppend = (u32, String, Vec<(String, String)>);

/// `first`, an append, and the appends behind it that were read with it
/// (already whole in the read buffer: reading no further, so that a lone
/// append is not held back), at most `room` in all; with what follows
/// them there, if it is not an append, to be handled next.
fn gather_appends<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, FrameCodec>,
    first: ReadAppend,
    current: &Arc<Vault>,
    room: usize,
    caller: &Caller,
    vault: &LiveVault,
) -> (Vec<ReadAppend>, usize, Option<Screened>) {
    let mut weight = fields_weight(first.2.len());
    let mut appends = vec![first];
    // The codec keeps no state between frames: decoding from the buffer
    // here is what the `FramedRead` would do next.
    let mut codec = frames.decoder().clone();
    while weight < room {
        let next = match codec.decode(frames.read_buffer_mut()) {
            Ok(None) => break,
            Ok(Some(frame)) => Ok(Some(frame)),
            Err(e) => Err(ConnectionError::from(e)),
        };
        match screen(next, caller, vault) {
            // The same vault: it may be reopened between two frames.
            Screened::Request(id, Message::Append { subject, fields }, same)
                if Arc::ptr_eq(&same, current) =>
            {
                weight += fields_weight(fields.len());
                appends.push((id, subject, fields))
            }
            other => return (appends, weight, Some(other)),
        }
    }
    (appends, weight, None)
}

/// Fields a request holds for each request it counts as in its
/// connection's `max_in_flight`: decoded, a field takes 48 bytes and its
/// two strings' allocations, up to some twenty times the bytes it took in
/// its frame, so a connection's requests in flight are counted by their
/// fields too, not only by their number, to bound the memory they hold.
pub const FIELDS_PER_REQUEST: usize = 256;

fn fields_weight(fields: usize) -> usize {
    1 + fields / FIELDS_PER_REQUEST
}

/// How many requests `m` counts as in its connection's `max_in_flight`
/// ([`FIELDS_PER_REQUEST`]).
fn weight(m: &Message) -> usize {
    match m {
        Message::Append { fields, .. } => fields_weight(fields.len()),
        Message::Mint { fields, .. } => fields_weight(fields.len()),
        Message::AppendBatch { items } => fields_weight(
            items
                .iter()
                .map(|r| r.fields.len().saturating_add(1))
                .fold(0, usize::saturating_add),
        ),
        _ => 1,
    }
}

/// Answers a connection's appends that were read together: each is a
/// request of its own to the engine ([`Vault::append_each`]), so one
/// refused does not refuse the others, and each has its answer, as
/// [`handle`] would give it, in the order of the requests.
async fn handle_appends(appends: Vec<ReadAppend>, vault: Arc<Vault>) -> Vec<(u32, Message, u16)> {
    let n = appends.len();
    let started = std::time::Instant::now();
    let mut items = Vec::with_capacity(n);
    let mut answers: Vec<(u32, Option<Message>)> = Vec::with_capacity(n);
    for (id, subject, fields) in appends {
        match record_json(&fields) {
            Ok(json) => {
                items.push(Append::record(subject, json));
                answers.push((id, None));
            }
            Err(refused) => answers.push((id, Some(refused))),
        }
    }
    let mut results = vault.append_each(items).await.into_iter();
    let elapsed = started.elapsed();
    let mut out = Vec::with_capacity(n);
    for (id, answer) in answers {
        let reply = match answer {
            Some(refused) => refused,
            None => {
                let r = results.next().unwrap_or(Err(storage::Error::Closed));
                if r.is_ok() {
                    crate::metrics::global().commit("append", elapsed);
                }
                receipt_or_error(r)
            }
        };
        crate::failpoints::before_reply("append");
        out.push((id, reply, 0));
    }
    out
}

/// The answer to an append: its receipt, or the error's code and words.
fn receipt_or_error(appended: storage::Result<storage::Receipt>) -> Message {
    match appended {
        Ok(r) => Message::Receipt {
            receipt: r.encode(),
        },
        Err(e) => storage_error(&e),
    }
}

/// The answers to request `id` of a pipelined connection, with their
/// frame flags.
async fn handle(
    id: u32,
    message: Message,
    vault: &Arc<Vault>,
    config: &ServeConfig,
    caller: &Caller,
) -> Vec<(u32, Message, u16)> {
    respond(message, vault, config, caller)
        .await
        .into_iter()
        .map(|(reply, flags)| (id, reply, flags))
        .collect()
}

/// The answer to a request the caller's role may send: one message, or
/// for `Entries` several, each with its frame flags.
async fn respond(
    message: Message,
    vault: &Arc<Vault>,
    config: &ServeConfig,
    caller: &Caller,
) -> Vec<(Message, u16)> {
    let started = std::time::Instant::now();
    let op = match &message {
        Message::Append { .. } => Some("append"),
        Message::AppendBatch { .. } => Some("append_batch"),
        Message::Event { .. } => Some("event"),
        Message::Mint { .. } => Some("mint"),
        _ => None,
    };
    let reply = match message {
        Message::Ping => Message::Pong,
        Message::Health => {
            let (entries, signed_head) = durable_head(vault);
            Message::HealthInfo {
                status: if vault.is_poisoned() {
                    "degraded"
                } else {
                    "ok"
                }
                .into(),
                entries,
                signed_head,
            }
        }
        Message::Head => {
            let (entries, signed_head) = durable_head(vault);
            Message::HeadInfo {
                public_key: vault.public_key().to_bytes(),
                entries,
                signed_head,
            }
        }
        Message::Append { subject, fields } => match record_json(&fields) {
            Err(m) => m,
            Ok(json) => receipt_or_error(vault.append(Append::record(subject, json)).await),
        },
        Message::AppendBatch { items } => {
            let mut appends = Vec::with_capacity(items.len());
            let mut bad = None;
            for item in items {
                match record_json(&item.fields) {
                    Ok(json) => appends.push(Append::record(item.subject, json)),
                    Err(m) => {
                        bad = Some(m);
                        break;
                    }
                }
            }
            match bad {
                Some(m) => m,
                None => match vault.append_batch(appends).await {
                    Ok(rs) => Message::Receipts {
                        receipts: rs.iter().map(|r| r.encode()).collect(),
                    },
                    Err(e) => storage_error(&e),
                },
            }
        }
        Message::Entries { from_seq, max } => {
            let max = max.min(config.max_entries) as usize;
            let max_bytes = config.max_entries_bytes;
            match scan(vault, &caller.id, move |v| {
                v.entries_within(from_seq, max, max_bytes)
            })
            .await
            {
                Err(refused) => refused,
                Ok(entries) => {
                    // Batches that stay well inside the frame limit.
                    let mut batches: Vec<Vec<Vec<u8>>> = Vec::new();
                    let mut size = 0usize;
                    for e in entries {
                        if batches.is_empty() || size + e.len() + 8 > config.max_frame_len / 2 {
                            batches.push(Vec::new());
                            size = 0;
                        }
                        size += e.len() + 8;
                        if let Some(b) = batches.last_mut() {
                            b.push(e);
                        }
                    }
                    if batches.is_empty() {
                        batches.push(Vec::new());
                    }
                    let n = batches.len();
                    return batches
                        .into_iter()
                        .enumerate()
                        .map(|(i, entries)| {
                            let flags = if i + 1 == n { protocol::FLAG_LAST } else { 0 };
                            (Message::EntryBatch { entries }, flags)
                        })
                        .collect();
                }
            }
        }
        Message::Proof { seq } => match scan(vault, &caller.id, move |v| v.receipt(seq)).await {
            Ok(Some(r)) => Message::ProofInfo {
                receipt: r.encode(),
            },
            Ok(None) => error(ErrorCode::NotFound, "no such entry"),
            Err(refused) => refused,
        },
        Message::Heads { from_seq, max } => {
            // At most a thousand, and a frame well inside the limit.
            let fit = config.max_frame_len / 2 / (protocol::receipt::HEAD_LEN + 4);
            let max = (max as usize).min(MAX_HEADS_PER_REQUEST).min(fit.max(1));
            match scan(vault, &caller.id, move |v| {
                v.heads(from_seq, max, MAX_HEADS_SCAN_BYTES)
            })
            .await
            {
                Ok(heads) => Message::HeadList {
                    heads: heads.iter().map(storage::SignedHead::encode).collect(),
                },
                Err(refused) => refused,
            }
        }
        Message::Mint {
            partner_id,
            subject,
            purpose,
            fields,
            ttl_secs,
        } => {
            mint(
                vault, config, partner_id, subject, purpose, fields, ttl_secs,
            )
            .await
        }
        Message::Event {
            kind,
            subject,
            payload,
        } => event(vault, caller, (kind, subject), &payload).await,
        Message::Whois { key_hash } => match vault.credential_by_key_hash(&hex::encode(key_hash)) {
            Ok(Some(c)) => Message::Identity {
                id: c.id,
                role: c.role,
                name: c.name,
            },
            Ok(None) => error(ErrorCode::NotFound, "no such credential"),
            Err(e) => storage_error(&e),
        },
        Message::Context { key_hash, subject } => context(vault, key_hash, &subject),
        Message::GetPolicy { partner_id } => match vault.policy(&partner_id) {
            Ok(Some(value)) => Message::StateValue {
                kind: storage::Kind::PolicyChanged as u8,
                value,
            },
            Ok(None) => error(ErrorCode::NotFound, "no policy for this partner"),
            Err(e) => storage_error(&e),
        },
        Message::GetConsent {
            subject,
            partner_id,
        } => match vault.consent(&subject, &partner_id) {
            Ok(Some((kind, value))) => Message::StateValue {
                kind: kind as u8,
                value,
            },
            Ok(None) => error(ErrorCode::NotFound, "no consent recorded"),
            Err(e) => storage_error(&e),
        },
        Message::CreateCredential { role, name } => match credential_refused(&role, &name) {
            Some(refusal) => refusal,
            None => match vault
                .acting_as(&caller.id)
                .create_credential(&role, &name)
                .await
            {
                Ok((id, key)) => Message::CredentialKey {
                    id,
                    api_key: key.to_string(),
                },
                Err(e) => storage_error(&e),
            },
        },
        Message::CreateCertCredential {
            role,
            name,
            cert_sha256,
        } => match credential_refused(&role, &name) {
            Some(refusal) => refusal,
            None => match vault
                .acting_as(&caller.id)
                .create_cert_credential(&role, &name, &cert_sha256)
                .await
            {
                Ok(id) => Message::Identity { id, role, name },
                Err(e) => storage_error(&e),
            },
        },
        Message::RevokeCredential { id: cred } => {
            if cred == caller.id {
                error(ErrorCode::Conflict, "a credential cannot revoke itself")
            } else {
                match vault.acting_as(&caller.id).revoke_credential(&cred).await {
                    Ok(Some(r)) => Message::Receipt {
                        receipt: r.encode(),
                    },
                    Ok(None) => error(ErrorCode::NotFound, "no such credential"),
                    Err(e) => storage_error(&e),
                }
            }
        }
        Message::Shred { subject } => {
            receipt_or_error(vault.acting_as(&caller.id).shred(&subject).await)
        }
        Message::RotateSubjectKey { subject, reencrypt } => {
            match vault
                .acting_as(&caller.id)
                .rotate_subject_key(&subject, reencrypt)
                .await
            {
                Ok(r) => Message::Rotated {
                    version: r.version,
                    receipt: r.receipt.encode(),
                    reencrypted: r.reencrypted.map(|r| r.encode()).unwrap_or_default(),
                },
                Err(e) => storage_error(&e),
            }
        }
        Message::KeyStatus {
            after_subject,
            after_version,
            max,
        } => key_status(vault, &config.rotation, &after_subject, after_version, max),
        Message::RotateSigningKey => match vault.acting_as(&caller.id).rotate_signing_key().await {
            Ok((r, e)) => {
                tracing::info!(key_id = e.key_id, admin = %caller.id, "signing key rotated");
                Message::SigningRotated {
                    receipt: r.encode(),
                    endorsement: e.encode(),
                }
            }
            Err(e) => storage_error(&e),
        },
        Message::KeyChain => Message::KeyChainInfo {
            endorsements: vault.key_chain().iter().map(|e| e.encode()).collect(),
        },
        Message::RotateMasterKey { kind, secret } => {
            let secret = zeroize::Zeroizing::new(secret);
            let unlock = crate::secrets::unlock_of(kind, &secret)
                .map_err(|why| error(ErrorCode::Invalid, &why));
            match unlock {
                Err(m) => m,
                Ok(unlock) => match vault.acting_as(&caller.id).rotate_master_key(&unlock).await {
                    Ok(r) => {
                        // A reopen after a failed write opens with it until
                        // the secret file holds it.
                        crate::live::rotated_to(vault.vault_id(), kind, &secret);
                        tracing::warn!(
                            admin = %caller.id,
                            "master key rotated: the next start of vaultd needs the new secret"
                        );
                        Message::Receipt {
                            receipt: r.encode(),
                        }
                    }
                    Err(e) => {
                        // It may have reached the disk (a failed write or
                        // sync poisons the vault, which is reopened): the
                        // reopen may need the new secret then.
                        if crate::init::rotation_outcome_unknown(&e) {
                            crate::live::rotated_to(vault.vault_id(), kind, &secret);
                        }
                        storage_error(&e)
                    }
                },
            }
        }
        Message::ListCredentials { after_id, max } => list_credentials(vault, &after_id, max),
        Message::Reindex => reindex(vault.clone()).await,
        _ => error(ErrorCode::Malformed, "a response sent as a request"),
    };
    if let (Some(op), false) = (op, matches!(reply, Message::Error { .. })) {
        crate::metrics::global().commit(op, started.elapsed());
    }
    if let Some(op) = op {
        crate::failpoints::before_reply(op);
    }
    vec![(reply, 0)]
}

/// Reads of a stretch of the log run at once in the process ([`scan`]).
const SCAN_SLOTS: usize = 2;

/// The slots of [`scan`], shared by every connection of the process.
static SCANS: Semaphore = Semaphore::const_new(SCAN_SLOTS);

/// Each credential's turn to read a stretch of the log ([`scan`]), held
/// for the read alone, by credential id, shared by the reads of all its
/// connections: so that the slots go round the credentials that read (the
/// slots' queue is first come, first served, and holds one read of each),
/// not to whichever has the most connections asking. Dropped with the
/// last read that waits for it or holds it; the map is swept of those as
/// it grows.
static TURNS: std::sync::LazyLock<PerCredential> =
    std::sync::LazyLock::new(|| PerCredential::new(1));

/// The turn of the credential `id` ([`TURNS`]).
fn scan_turn(id: &str) -> Arc<Semaphore> {
    TURNS.of(id)
}

/// Whether `message` reads a stretch of the log ([`scan`]): `Entries`
/// (up to `max_entries_bytes`), `Heads` (up to [`MAX_HEADS_SCAN_BYTES`])
/// and `Proof` (a whole commit group, rehashed).
fn is_scan(message: &Message) -> bool {
    matches!(
        message,
        Message::Entries { .. } | Message::Heads { .. } | Message::Proof { .. }
    )
}

/// `read` of the log, on one of tokio's blocking threads: a read of
/// megabytes would otherwise hold up, for its whole length, one of the
/// few worker threads (one per core) that every connection's requests
/// run on. At most [`SCAN_SLOTS`] run at once, one per credential at a
/// time ([`scan_turn`]), and a read keeps its slot until it ends, even
/// when the request that started it is dropped.
///
/// The turn and the slot are waited for in a task of its own, and given
/// back by the read's end, not by the request's future: a connection
/// whose task is held up writing answers its client does not read polls
/// none of its requests' futures, and a future that is not polled would
/// keep a permit the semaphore handed it, for as long as the client
/// stalls. A request dropped while its task waits ends the wait.
async fn scan<T, F>(vault: &Arc<Vault>, credential: &str, read: F) -> Result<T, Message>
where
    T: Send + 'static,
    F: FnOnce(&Vault) -> storage::Result<T> + Send + 'static,
{
    let turn = scan_turn(credential);
    let vault = Arc::clone(vault);
    let task = tokio::spawn(async move {
        let turn = turn.acquire_owned().await.ok()?;
        let slot = SCANS.acquire().await.ok()?;
        let read = tokio::task::spawn_blocking(move || {
            let _held = (turn, slot);
            read(&vault)
        });
        Some(read.await)
    });
    let waiting = AbortOnDrop(task.abort_handle());
    let outcome = task.await;
    drop(waiting);
    match outcome {
        Ok(Some(Ok(Ok(value)))) => Ok(value),
        Ok(Some(Ok(Err(e)))) => Err(storage_error(&e)),
        Ok(None) => Err(error(ErrorCode::Unavailable, "the log cannot be read now")),
        Ok(Some(Err(_))) | Err(_) => Err(error(ErrorCode::Internal, "the read of the log failed")),
    }
}

/// Aborts a task when dropped: a request's wait in [`scan`] ends with it.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Most subject keys in one `KeyStatusInfo`: 1,000 keys of at most 256-byte
/// subjects stay far below the frame limit.
const MAX_KEY_STATUS_PAGE: u16 = 1000;

/// Most signed heads one `HeadList` carries (about 160 KB).
pub const MAX_HEADS_PER_REQUEST: usize = 1000;

/// Bytes of log chunks one `Heads` request reads past its first head
/// (`storage::Vault::heads`): about 64 groups of 1,024 records of 512
/// bytes, or all 1,000 heads of smaller groups.
pub const MAX_HEADS_SCAN_BYTES: usize = 64 << 20;

/// A page of the vault's key status.
fn key_status(
    vault: &Vault,
    policy: &RotationPolicy,
    after_subject: &str,
    after_version: u32,
    max: u16,
) -> Message {
    let max = match max {
        0 => MAX_KEY_STATUS_PAGE,
        m => m.min(MAX_KEY_STATUS_PAGE),
    };
    let after = (!after_subject.is_empty()).then_some((after_subject, after_version));
    match vault.key_status(after, usize::from(max)) {
        Ok(s) => Message::KeyStatusInfo {
            master_created_ms: s.master_created_ms,
            master_wraps: s.master_wraps,
            signing_created_ms: s.signing_created_ms,
            encryption_limit: s.encryption_limit,
            keys: s
                .subject_keys
                .into_iter()
                .map(|k| protocol::SubjectKey {
                    subject: k.subject,
                    version: k.version,
                    created_seq: k.created_seq,
                    created_ms: k.created_ms,
                    encryptions: k.encryptions,
                    life: match k.life {
                        storage::KeyLife::Active => protocol::KeyLife::Active,
                        storage::KeyLife::Retired => protocol::KeyLife::Retired,
                        storage::KeyLife::Shredded => protocol::KeyLife::Shredded,
                    },
                })
                .collect(),
            more: s.more,
            signing_key_id: s.signing_key_id,
            max_signing_key_age_secs: policy.max_signing_key_age.map_or(0, |d| d.as_secs()),
            max_subject_key_age_secs: policy.max_subject_key_age.map_or(0, |d| d.as_secs()),
        },
        Err(e) => storage_error(&e),
    }
}

/// Most credentials in one `CredentialList`: 1,000 credentials of at most
/// 256-byte names stay far below the frame limit.
const MAX_CREDENTIAL_PAGE: u16 = 1000;

/// A page of the vault's credentials, revoked ones included.
fn list_credentials(vault: &Vault, after_id: &str, max: u16) -> Message {
    let max = match max {
        0 => MAX_CREDENTIAL_PAGE,
        m => m.min(MAX_CREDENTIAL_PAGE),
    };
    let after = (!after_id.is_empty()).then_some(after_id);
    match vault.credentials(after, usize::from(max)) {
        Ok((page, more)) => Message::CredentialList {
            credentials: page
                .into_iter()
                .map(|c| protocol::CredentialInfo {
                    id: c.id,
                    role: c.role,
                    name: c.name,
                    created_seq: c.created_seq,
                    created_ms: c.created_ms,
                    revoked_seq: c.revoked_seq,
                })
                .collect(),
            more,
        },
        Err(e) => storage_error(&e),
    }
}

/// Rebuilds the derived state from the log and compares it with the
/// stored state, on a blocking thread (it reads the whole log); changes
/// nothing.
async fn reindex(vault: Arc<Vault>) -> Message {
    // One at a time per vault: each replays the whole log and holds the
    // whole derived state, and runs on after its client gave up.
    static RUNNING: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());
    struct Running(usize);
    impl Drop for Running {
        fn drop(&mut self) {
            let mut running = RUNNING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            running.retain(|v| *v != self.0);
        }
    }
    let this = Arc::as_ptr(&vault) as usize;
    let running = {
        let mut running = RUNNING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.contains(&this) {
            return error(
                ErrorCode::Unavailable,
                "a reindex of this vault is running already; retry once it is done",
            );
        }
        running.push(this);
        Running(this)
    };
    let checked = tokio::task::spawn_blocking(move || {
        let _running = running;
        vault.check_derived_state()
    });
    match checked.await {
        Ok(Ok(r)) => Message::ReindexReport {
            entries: r.entries,
            keys_compared: r.keys_compared,
            differences: r.differences,
            sample: r
                .sample
                .into_iter()
                .take(protocol::MAX_REINDEX_SAMPLE)
                .collect(),
        },
        Ok(Err(e)) => storage_error(&e),
        Err(_) => error(ErrorCode::Internal, "the comparison failed"),
    }
}

/// `Context`: the `Whois` of a key hash and, for a partner's credential,
/// its `GetPolicy` and the subject's `GetConsent` for it, in one answer.
fn context(vault: &Vault, key_hash: [u8; 32], subject: &str) -> Message {
    if let Err(e) = storage::vault::validate_subject(subject, true) {
        return error(ErrorCode::Invalid, &format!("subject: {e}"));
    }
    let c = match vault.credential_by_key_hash(&hex::encode(key_hash)) {
        Ok(Some(c)) => c,
        Ok(None) => return error(ErrorCode::NotFound, "no such credential"),
        Err(e) => return storage_error(&e),
    };
    let (mut policy, mut consent) = (None, None);
    if Role::parse(&c.role) == Some(Role::Partner) {
        policy = match vault.policy(&c.name) {
            Ok(v) => v.map(|v| (storage::Kind::PolicyChanged as u8, v)),
            Err(e) => return storage_error(&e),
        };
        consent = match vault.consent(subject, &c.name) {
            Ok(v) => v.map(|(kind, v)| (kind as u8, v)),
            Err(e) => return storage_error(&e),
        };
    }
    Message::ContextInfo(Box::new(protocol::ContextReply {
        id: c.id,
        role: c.role,
        name: c.name,
        policy,
        consent,
    }))
}

/// Appends an audit or admin event. The payload must be a JSON object;
/// the vault sets its `recorded_by` member to the caller's credential id,
/// so that the log says which credential wrote every event.
async fn event(
    vault: &Vault,
    caller: &Caller,
    (kind, subject): (u8, String),
    payload: &[u8],
) -> Message {
    let Some(kind) = storage::Kind::from_u8(kind) else {
        return error(ErrorCode::Invalid, "unknown entry kind");
    };
    let mut object: serde_json::Map<String, serde_json::Value> =
        match serde_json::from_slice(payload) {
            Ok(o) => o,
            Err(_) => return error(ErrorCode::Invalid, "the payload is not a JSON object"),
        };
    // A policy is held to the shim's rules, whoever writes it: the vault
    // reads what it understands of one at redemption, so a member it
    // would not know (`allowed_hour` for `allowed_hours_utc`) would drop
    // a condition unseen. Its lifetime is bounded by the largest ceiling
    // a shim may have, as a separate shim may allow more than this vault.
    if kind == storage::Kind::PolicyChanged {
        if let Some(policy) = object.get("policy") {
            let checked = serde_json::from_value::<crate::shim::Policy>(policy.clone())
                .map_err(|e| e.to_string())
                .and_then(|p| p.validate(MAX_TOKEN_TTL_SECS));
            if let Err(e) = checked {
                return error(ErrorCode::Invalid, &format!("the policy: {e}"));
            }
        }
    }
    object.insert(
        "recorded_by".into(),
        serde_json::Value::String(caller.id.clone()),
    );
    let payload = match serde_json::to_vec(&object) {
        Ok(p) => p,
        Err(_) => return error(ErrorCode::Internal, "encoding failed"),
    };
    let appended = vault
        .append(Append::Event {
            kind,
            subject,
            payload,
        })
        .await;
    receipt_or_error(appended)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn mint(
    vault: &Vault,
    config: &ServeConfig,
    partner_id: String,
    subject: String,
    purpose: String,
    fields: Vec<(String, protocol::MaskOp)>,
    ttl_secs: u32,
) -> Message {
    // The default never exceeds a maximum set below it.
    let ttl = if ttl_secs == 0 {
        config.default_token_ttl.min(config.max_token_ttl)
    } else {
        Duration::from_secs(u64::from(ttl_secs))
    };
    if ttl > config.max_token_ttl {
        return error(
            ErrorCode::Invalid,
            &format!(
                "ttl_secs exceeds the maximum of {}",
                config.max_token_ttl.as_secs()
            ),
        );
    }
    let mut seen = std::collections::HashSet::new();
    if fields.iter().any(|(f, _)| !seen.insert(f.as_str())) {
        return error(ErrorCode::Invalid, "a field is named twice");
    }
    let expires_at_ms = now_ms().saturating_add(ttl.as_millis() as u64);
    let fields = fields
        .into_iter()
        .map(|(f, op)| (f, op.name().to_string()))
        .collect();
    match vault
        .mint(&partner_id, &subject, &purpose, fields, expires_at_ms)
        .await
    {
        Ok(token) => Message::Minted {
            token: token.to_string(),
            expires_at_ms,
        },
        Err(e) => storage_error(&e),
    }
}

/// Burns the token (durably) and returns the masked segment it grants to
/// `partner_id`, whose connection comes from `peer` (through `proxy`, a
/// trusted TCP proxy, when one named it).
async fn redeem(
    vault: &Vault,
    token: &str,
    caller: &Caller,
    (peer, proxy): (std::net::IpAddr, Option<std::net::IpAddr>),
) -> Message {
    let partner_id = caller.name.as_str();
    let (terms, _) = match vault
        .redeem_via(token, partner_id, None, Some(peer), proxy, Some(&caller.id))
        .await
    {
        Ok(t) => t,
        Err(storage::Error::TokenRefused(r)) => {
            let code = ErrorCode::from_name(r.code()).unwrap_or(ErrorCode::Forbidden);
            return error(code, r.message());
        }
        Err(e) => return storage_error(&e),
    };
    // The token is spent from here on, whatever happens below: data may be
    // lost to the partner, never delivered twice.
    let record = match vault.latest_record(&terms.subject) {
        Ok(Some(r)) => r,
        Ok(None) => return error(ErrorCode::NotFound, "the subject has no record"),
        Err(e) => return storage_error(&e),
    };
    let parsed: serde_json::Map<String, serde_json::Value> =
        match serde_json::from_slice(&record.plaintext) {
            Ok(m) => m,
            Err(_) => return error(ErrorCode::Internal, "the record is not a set of fields"),
        };
    // A record written over the protocol holds text only. Another value
    // (a number, an object, written through the storage library) has no
    // masking defined for it: a field asked for that holds one stops the
    // answer (below), rather than be masked as its JSON text.
    let mut not_text = std::collections::HashSet::new();
    let fields: Vec<(String, String)> = parsed
        .into_iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some((k, s)),
            _ => {
                not_text.insert(k);
                None
            }
        })
        .collect();
    // A field the token names but the subject's record does not hold is
    // left out of the answer (a policy lists what a partner may see, not
    // what every record has); the token is spent either way.
    let present: std::collections::HashSet<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    let mut wanted = Vec::with_capacity(terms.fields.len());
    for (f, op) in &terms.fields {
        if not_text.contains(f) {
            return error(
                ErrorCode::Internal,
                "a field the token names is not text in the record, so no masking applies to it: nothing was sent",
            );
        }
        if !present.contains(f.as_str()) {
            continue;
        }
        match protocol::MaskOp::from_name(op) {
            Some(op) => wanted.push((f.clone(), op)),
            None => return error(ErrorCode::Internal, "the token names an unknown operator"),
        }
    }
    let keys = crate::mask::MaskKeys::derive_from(vault.mask_secret().as_ref());
    match crate::mask::apply_all(&wanted, &fields, &keys, partner_id) {
        Ok(masked) => Message::Data {
            subject: terms.subject,
            seq: record.seq,
            fields: masked,
        },
        Err(e) => error(ErrorCode::Invalid, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 86_400_000;

    /// A key strictly older than its maximum is overdue, one line for the
    /// signing key and one counting the subject keys; no maximum, no
    /// finding (docs/keys.md, "Rotation policy").
    #[test]
    fn keys_past_their_maximum_age_are_told() {
        let policy = RotationPolicy {
            max_signing_key_age: Some(Duration::from_secs(90 * 86_400)),
            max_subject_key_age: Some(Duration::from_secs(30 * 86_400)),
        };
        let now = 400 * DAY_MS;
        // Signing key 2, 91 days old; subject keys 31, 30 and 29 and 45 days old.
        let subjects = [
            now - 31 * DAY_MS,
            now - 30 * DAY_MS,
            now - 29 * DAY_MS,
            now - 45 * DAY_MS,
        ];
        let found = policy.overdue(now, (2, now - 91 * DAY_MS), subjects.into_iter());
        assert_eq!(
            found,
            [
                "signing key 2 is older than the maximum of 90 days: rotate it (vault-admin rotate-signing-key)",
                "2 active subject key(s) are older than the maximum of 30 days: rotate them (vault-admin rotate-subject-key)",
            ]
        );
        // Exactly at the maximum is not past it.
        let found = policy.overdue(now, (0, now - 90 * DAY_MS), [now - 30 * DAY_MS].into_iter());
        assert!(found.is_empty(), "{found:?}");
        // No maximum, nothing told, however old.
        let none = RotationPolicy::default();
        assert!(none.overdue(now, (0, 0), [0].into_iter()).is_empty());
        // A creation time past `now` (a clock set back) is not overdue.
        let found = policy.overdue(now, (0, now + DAY_MS), [now + DAY_MS].into_iter());
        assert!(found.is_empty(), "{found:?}");
    }

    /// A read of the log on a blocking thread answers as the read would
    /// in place: its value, its storage error with the code the protocol
    /// gives it, and a read that panics is `internal`, not a panic of the
    /// connection.
    #[tokio::test]
    async fn a_scan_answers_its_value_its_error_or_internal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Arc::new(
            Vault::create(
                &dir.path().join("v"),
                &storage::Unlock::passphrase(b"scan test".to_vec()),
                storage::Options::default(),
            )
            .expect("create")
            .vault,
        );
        let entries = scan(&vault, "auditor:scan-test", |v| {
            v.entries_within(0, 10, 1 << 20)
        })
        .await
        .expect("entries");
        assert_eq!(entries, vault.entries_from(0, 10).expect("in place"));
        let closed = scan(&vault, "auditor:scan-test", |_| -> storage::Result<()> {
            Err(storage::Error::Closed)
        })
        .await;
        assert_eq!(closed, Err(storage_error(&storage::Error::Closed)));
        let panicked = scan(&vault, "auditor:scan-test", |_| -> storage::Result<()> {
            panic!("a read that panics");
        })
        .await;
        assert!(
            matches!(
                panicked,
                Err(Message::Error {
                    code: ErrorCode::Internal,
                    ..
                })
            ),
            "{panicked:?}"
        );
    }

    /// `check` reads the vault's own keys: its signing key and the active
    /// subject keys, not the retired ones.
    #[tokio::test]
    async fn the_policy_is_checked_against_the_vaults_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vault = Vault::create(
            &dir.path().join("v"),
            &storage::Unlock::passphrase(b"rotation policy test".to_vec()),
            storage::Options::default(),
        )
        .expect("create")
        .vault;
        for subject in ["cust-1", "cust-2"] {
            vault
                .append(storage::Append::record(subject, br#"{"a":"1"}"#.to_vec()))
                .await
                .expect("append");
        }
        // cust-1's first key is retired by its rotation: two active keys.
        vault
            .rotate_subject_key("cust-1", false)
            .await
            .expect("rotate");
        let none = RotationPolicy::default();
        assert!(none.check(&vault).expect("check").is_empty());
        let loose = RotationPolicy {
            max_signing_key_age: Some(Duration::from_secs(86_400)),
            max_subject_key_age: Some(Duration::from_secs(86_400)),
        };
        assert!(loose.check(&vault).expect("check").is_empty());
        // Every key is older than a millisecond once one has passed.
        std::thread::sleep(Duration::from_millis(5));
        let strict = RotationPolicy {
            max_signing_key_age: Some(Duration::from_millis(1)),
            max_subject_key_age: Some(Duration::from_millis(1)),
        };
        let found = strict.check(&vault).expect("check");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("signing key 0 is older"), "{found:?}");
        assert!(found[1].starts_with("2 active subject key(s)"), "{found:?}");
        vault.close().expect("close");
    }

    /// Only a refusal of the token itself counts as a guess and slows the
    /// peer down; the partner's own conditions (consent, policy, hours,
    /// source address) and a vault that cannot answer do not
    /// (docs/protocol.md, "Connection rules").
    #[test]
    fn only_refusals_of_the_token_itself_count_as_guesses() {
        let guesses: Vec<&str> = ErrorCode::ALL
            .into_iter()
            .filter(|c| is_token_refusal(*c))
            .map(ErrorCode::name)
            .collect();
        assert_eq!(
            guesses,
            [
                "token_unknown",
                "token_expired",
                "token_spent",
                "wrong_partner"
            ]
        );
    }

    /// Every refusal of a redemption reaches the partner as the wire code
    /// of its own name, with its own words.
    #[test]
    fn every_token_refusal_has_a_wire_code_and_words() {
        let mut words = std::collections::HashSet::new();
        for r in storage::TokenRefusal::ALL {
            let code = ErrorCode::from_name(r.code());
            assert_eq!(code.map(ErrorCode::name), Some(r.code()), "{r:?}");
            assert!(words.insert(r.message()), "{r:?}: words of another");
        }
    }

    #[test]
    fn a_record_is_the_json_object_of_its_fields_with_sorted_keys() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            f(&[]),
            f(&[("name", "Ada")]),
            f(&[("z", "1"), ("a", "2"), ("é", "3"), ("B", "4")]),
            f(&[
                ("quote\"", "line\nbreak\ttab \u{1} \\ back"),
                ("emoji", "😀"),
            ]),
        ];
        for fields in cases {
            // The same bytes as the object built through serde_json's map.
            let map: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let want = serde_json::to_vec(&map).expect("encodes");
            assert_eq!(record_json(&fields).expect("encodes"), want, "{fields:?}");
        }
        assert_eq!(record_json(&f(&[])).expect("encodes"), b"{}");
        assert_eq!(
            record_json(&f(&[("b", "x\"y"), ("a", "1")])).expect("encodes"),
            br#"{"a":"1","b":"x\"y"}"#
        );
        let twice = f(&[("a", "1"), ("b", "2"), ("a", "3")]);
        let Err(Message::Error { code, message }) = record_json(&twice) else {
            panic!("a field named twice is refused");
        };
        assert_eq!(code, ErrorCode::Invalid);
        assert!(message.contains("\"a\""), "{message}");
    }

    proptest::proptest! {
        /// Whatever the fields' names and values (escapes, control
        /// characters, any Unicode), the bytes serde_json's map writes.
        #[test]
        fn a_record_is_encoded_as_serde_json_encodes_its_map(
            fields in proptest::collection::btree_map(".{0,12}", "(.|[\\x00-\\x1f\"\\\\]){0,40}", 0..6)
        ) {
            let fields: Vec<(String, String)> = fields.into_iter().rev().collect();
            let map: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let want = serde_json::to_vec(&map).expect("encodes");
            proptest::prop_assert_eq!(record_json(&fields).expect("encodes"), want);
        }
    }

    #[test]
    fn repeated_refusals_slow_a_peer_down_and_success_forgives() {
        let t = FailureThrottle::default();
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        let b: std::net::IpAddr = [10, 0, 0, 2].into();
        // The schedule of `protocol.md`: after 5 refusals, each further
        // redemption waits 50 ms, doubling per refusal up to 5 s.
        let mut waits = Vec::new();
        for _ in 0..14 {
            waits.push(t.delay(a).as_millis());
            t.record(a, true);
        }
        assert_eq!(
            waits,
            [0, 0, 0, 0, 0, 50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        for _ in 0..40 {
            t.record(a, true);
        }
        assert_eq!(t.delay(a), FailureThrottle::MAX_DELAY);
        assert_eq!(t.delay(b), Duration::ZERO, "other peers are not affected");
        t.record(a, false);
        assert_eq!(t.delay(a), Duration::ZERO);
    }

    /// A request counts in its connection's `max_in_flight` as one per
    /// `FIELDS_PER_REQUEST` fields it holds, and at least as one.
    #[test]
    fn requests_of_many_fields_count_as_more_in_flight() {
        let fields = |n: usize| (0..n).map(|i| (format!("f{i}"), "v".to_string())).collect();
        let append = |n| Message::Append {
            subject: "s".into(),
            fields: fields(n),
        };
        assert_eq!(weight(&Message::Ping), 1);
        assert_eq!(weight(&append(0)), 1);
        assert_eq!(weight(&append(FIELDS_PER_REQUEST - 1)), 1);
        assert_eq!(weight(&append(FIELDS_PER_REQUEST)), 2);
        assert_eq!(weight(&append(65_535)), 1 + 65_535 / FIELDS_PER_REQUEST);
        // A batch counts its records too: empty ones cost memory as well.
        let batch = |records: usize, each: usize| Message::AppendBatch {
            items: (0..records)
                .map(|_| protocol::Record {
                    subject: "s".into(),
                    fields: fields(each),
                })
                .collect(),
        };
        assert_eq!(weight(&batch(100, 1)), 1);
        assert_eq!(weight(&batch(1_000, 0)), 1 + 1_000 / FIELDS_PER_REQUEST);
        assert_eq!(weight(&batch(1_000, 9)), 1 + 10_000 / FIELDS_PER_REQUEST);
    }

    /// Redemptions a slowed-down peer sends at once, on as many
    /// connections, start one delay apart, not all after the same wait.
    #[test]
    fn redemptions_sent_at_once_by_a_slowed_peer_wait_their_turns() {
        let t = FailureThrottle::default();
        let a: std::net::IpAddr = [10, 0, 0, 1].into();
        assert_eq!(
            t.reserve(a, std::time::Instant::now()),
            Some(Duration::ZERO),
            "an unknown peer"
        );
        for _ in 0..=FailureThrottle::FREE_FAILURES {
            t.record(a, true);
        }
        let now = std::time::Instant::now();
        let step = t.delay(a);
        assert_eq!(step, FailureThrottle::BASE_DELAY * 2);
        let waits: Vec<Option<Duration>> = (0..4).map(|_| t.reserve(a, now)).collect();
        assert_eq!(
            waits,
            [Some(step), Some(step * 2), Some(step * 3), Some(step * 4)]
        );
        // One that comes after those slots still waits a whole step.
        let later = now + step * 10;
        assert_eq!(t.reserve(a, later), Some(step));
        // The queue is bounded: a turn more than `MAX_WAIT` away is
        // refused, and takes no slot.
        let full = (FailureThrottle::MAX_WAIT.as_millis() / step.as_millis()) as u32;
        let waits: Vec<_> = (0..full + 3).map(|_| t.reserve(a, later)).collect();
        assert!(waits
            .iter()
            .all(|w| w.is_none_or(|w| w <= FailureThrottle::MAX_WAIT)));
        assert_eq!(waits.last(), Some(&None), "{waits:?}");
        assert_eq!(
            t.reserve(a, later + FailureThrottle::MAX_WAIT),
            Some(step),
            "a refused turn took no slot"
        );
        // Others, and the peer once forgiven, do not wait.
        assert_eq!(t.reserve([10, 0, 0, 2].into(), now), Some(Duration::ZERO));
        t.record(a, false);
        assert_eq!(t.reserve(a, now), Some(Duration::ZERO));
    }

    #[test]
    fn an_ipv6_peer_is_its_64_network() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
        let t = FailureThrottle::default();
        // A fresh address of one /64 for each refusal: still one peer.
        for i in 0..=FailureThrottle::FREE_FAILURES {
            t.record(ip(&format!("2001:db8:1:2::{:x}", i + 1)), true);
        }
        assert!(t.delay(ip("2001:db8:1:2:ffff::9")) > Duration::ZERO);
        assert_eq!(
            t.delay(ip("2001:db8:1:3::1")),
            Duration::ZERO,
            "the next /64"
        );
        // IPv4, mapped or not, is counted by address.
        for _ in 0..=FailureThrottle::FREE_FAILURES {
            t.record(ip("::ffff:192.0.2.7"), true);
        }
        assert!(t.delay(ip("192.0.2.7")) > Duration::ZERO);
        assert_eq!(t.delay(ip("192.0.2.8")), Duration::ZERO);
        assert_eq!(peer_of(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn a_flood_of_new_addresses_does_not_forgive_the_peers_slowed_down() {
        let t = FailureThrottle::default();
        let slowed: std::net::IpAddr = [10, 0, 0, 1].into();
        for _ in 0..=FailureThrottle::FREE_FAILURES + 2 {
            t.record_within(slowed, true, 8);
        }
        let before = t.delay(slowed);
        assert!(before > Duration::ZERO);
        // Far more addresses than the table holds, one refusal each.
        for i in 0..100u8 {
            t.record_within([10, 1, 0, i].into(), true, 8);
        }
        assert_eq!(t.delay(slowed), before, "still slowed down");
        let held = t.peers.lock().map(|p| p.len()).unwrap_or(usize::MAX);
        assert!(held <= 8, "{held} peers held");
    }

    /// A credential's connections share one turn to read the log while
    /// one of them holds it, other credentials have turns of their own,
    /// and a turn no connection holds is dropped (and swept from the map
    /// as it grows).
    #[test]
    fn a_credential_s_connections_share_one_turn_to_read() {
        let a = scan_turn("auditor:turns-a");
        assert!(Arc::ptr_eq(&a, &scan_turn("auditor:turns-a")));
        let b = scan_turn("auditor:turns-b");
        assert!(!Arc::ptr_eq(&a, &b));
        let weak = Arc::downgrade(&a);
        drop(a);
        assert!(weak.upgrade().is_none(), "dropped with its last holder");
        // Many credentials come and go: the map holds about the live ones.
        for i in 0..1000 {
            drop(scan_turn(&format!("auditor:turns-gone-{i}")));
        }
        let held = TURNS.len();
        assert!(held < 200, "{held} turns in the map");
        drop(b);
    }

    /// A table full of slowed peers makes room for an eighth of it at
    /// once, by the peers refused longest ago, so that a flood of new
    /// peers does not look through the whole table at every refusal; the
    /// peers refused last stay slowed down.
    #[test]
    fn a_table_of_slowed_peers_makes_room_for_an_eighth_by_the_oldest() {
        let t = FailureThrottle::default();
        let peer = |i: u8| std::net::IpAddr::from([10, 2, 0, i]);
        for i in 0..16 {
            for _ in 0..=FailureThrottle::FREE_FAILURES {
                t.record_within(peer(i), true, 16);
            }
            // Each peer's last refusal at an instant of its own.
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!((0..16).all(|i| t.delay(peer(i)) > Duration::ZERO));
        let held = || t.peers.lock().map(|p| p.len()).unwrap_or(usize::MAX);
        assert_eq!(held(), 16);
        t.record_within([10, 3, 0, 0].into(), true, 16);
        assert!(held() <= 15, "{} peers held", held());
        assert_eq!(t.delay(peer(0)), Duration::ZERO, "refused first, forgiven");
        assert_eq!(t.delay(peer(1)), Duration::ZERO, "refused second, forgiven");
        assert!((2..16).all(|i| t.delay(peer(i)) > Duration::ZERO));
        // Room was made for the next one without another look.
        let before = held();
        t.record_within([10, 3, 0, 1].into(), true, 16);
        assert_eq!(held(), before + 1);
    }

    /// A redemption refused while the vault is reopened is counted, as
    /// every other refusal is, under its code (`unavailable`).
    #[tokio::test]
    async fn a_redemption_refused_while_recovering_is_counted() {
        let (_dir, vault, key) = vault_with("partner", "p").await;
        let caller = authenticate(&vault, &key).expect("a partner");
        let live = LiveVault::from(vault);
        let _taken = live.take().expect("in service");
        let counted = || {
            crate::metrics::global()
                .redemptions
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: ErrorCode::Unavailable.name(),
                })
                .get()
        };
        let before = counted();
        let frame = Message::Redeem { token: "x".into() }
            .to_frame(1, 0)
            .expect("a frame");
        match screen(Ok(Some(frame)), &caller, &live) {
            Screened::End((Some((1, Message::Error { code, .. })), Ok(()))) => {
                assert_eq!(code, ErrorCode::Unavailable)
            }
            _ => panic!("a recovering redemption ends its connection with unavailable"),
        }
        // Other tests of this binary may count too: never fewer.
        assert!(counted() > before);
    }

    /// A redemption refused before it is served (a revoked credential's,
    /// one a role other than a partner's sends, one that does not decode)
    /// is counted under its code too.
    #[tokio::test]
    async fn a_redemption_refused_before_it_is_served_is_counted() {
        let counted = |code: ErrorCode| {
            crate::metrics::global()
                .redemptions
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: code.name(),
                })
                .get()
        };
        let redeem = || {
            Message::Redeem { token: "x".into() }
                .to_frame(1, 0)
                .expect("a frame")
        };
        let refused = |screened: Screened| match screened {
            Screened::End((Some((1, Message::Error { code, .. })), _))
            | Screened::Answer(1, Message::Error { code, .. }) => code,
            _ => panic!("a refusal"),
        };
        // A writer may not redeem.
        let (_dir, vault, key) = vault_with("writer", "w").await;
        let caller = authenticate(&vault, &key).expect("a writer");
        let live = LiveVault::from(vault);
        let before = counted(ErrorCode::Forbidden);
        let code = refused(screen(Ok(Some(redeem())), &caller, &live));
        assert_eq!(code, ErrorCode::Forbidden);
        assert!(counted(ErrorCode::Forbidden) > before);
        // A partner whose credential is revoked once it is connected.
        let (_dir, vault, key) = vault_with("partner", "p").await;
        let caller = authenticate(&vault, &key).expect("a partner");
        vault.revoke_credential(&caller.id).await.expect("revoked");
        let live = LiveVault::from(vault);
        let before = counted(ErrorCode::Unauthenticated);
        let code = refused(screen(Ok(Some(redeem())), &caller, &live));
        assert_eq!(code, ErrorCode::Unauthenticated);
        assert!(counted(ErrorCode::Unauthenticated) > before);
        // A redemption whose payload does not decode.
        let mut frame = redeem();
        frame.payload = vec![0xff];
        let before = counted(ErrorCode::Malformed);
        let code = refused(screen(Ok(Some(frame)), &caller, &live));
        assert_eq!(code, ErrorCode::Malformed);
        assert!(counted(ErrorCode::Malformed) > before);
    }

    /// A new vault in a scratch dir (kept while the guard lives), and the
    /// API key of a credential of `role` named `name` in it.
    async fn vault_with(role: &str, name: &str) -> (tempfile::TempDir, Vault, String) {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let unlock = storage::Unlock::KeyFile(storage::crypto::SecretKey::from_bytes([7; 32]));
        let created = Vault::create(&dir.path().join("v"), &unlock, storage::Options::default())
            .expect("a vault");
        let (_, key) = created
            .vault
            .create_credential(role, name)
            .await
            .expect("a credential");
        (dir, created.vault, key.to_string())
    }

    /// Everything before a connection is authenticated shares one window,
    /// `handshake_timeout` from its arrival: a trusted proxy's PROXY
    /// header, the TLS handshake and `Hello`. The clock is tokio's paused
    /// one, which moves only when every task waits, so what is measured is
    /// the server's deadlines, never the machine's speed.
    mod one_handshake_window {
        use super::*;
        use rustls::pki_types::ServerName;
        use tokio::io::{AsyncWriteExt, DuplexStream};
        use tokio::time::Instant;
        use tokio_util::codec::Framed;

        const WINDOW: Duration = Duration::from_secs(10);
        /// HAProxy's v1 header for a client at 192.0.2.7.
        const HEADER: &[u8] = b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 9999\r\n";

        struct Setup {
            _dir: tempfile::TempDir,
            vault: LiveVault,
            writer_key: String,
            tls: tokio_rustls::TlsAcceptor,
            connector: tokio_rustls::TlsConnector,
        }

        async fn setup() -> Setup {
            let (dir, vault, writer_key) = vault_with("writer", "w").await;
            let (tls, connector) = crate::tls::test_ends(dir.path());
            Setup {
                _dir: dir,
                vault: vault.into(),
                writer_key,
                tls,
                connector,
            }
        }

        /// Serves one connection as `run` does, from a trusted proxy at
        /// 127.0.0.1 when `proxied`: its result, and how long after its
        /// arrival it ended.
        async fn serve(
            s: &Setup,
            socket: DuplexStream,
            tls: bool,
            proxied: bool,
        ) -> (Result<(), ConnectionError>, Duration) {
            let proxies: &[&str] = if proxied { &["127.0.0.1/32"] } else { &[] };
            let config = ServeConfig {
                handshake_timeout: WINDOW,
                proxy_protocol_from: crate::proxied::TrustedProxies::parse(proxies)
                    .expect("proxies"),
                ..ServeConfig::default()
            };
            let arrived = Instant::now();
            let mut conn = Conn {
                vault: s.vault.clone(),
                config: Arc::new(config),
                throttle: Arc::new(FailureThrottle::default()),
                peer: std::net::Ipv4Addr::LOCALHOST.into(),
                proxy: None,
                admission: None,
                arrived,
                client_cert: None,
                tls: false,
                stopping: CancellationToken::new(),
            };
            let result = async {
                match open(socket, tls.then_some(&s.tls), &mut conn).await? {
                    Opened::Plain(socket) => {
                        let (r, w) = tokio::io::split(socket);
                        serve_connection(r, w, conn).await
                    }
                    Opened::Tls(stream) => {
                        let (r, w) = tokio::io::split(*stream);
                        serve_connection(r, w, conn).await
                    }
                }
            }
            .await;
            (result, arrived.elapsed())
        }

        /// Writes the proxy's header `after` the connection opens (if
        /// any), then completes the TLS handshake `tls_after` it opens (if
        /// any), and `Hello` `hello_after` (if any); returns its stream,
        /// so that the connection stays open until the server ends it, and
        /// what the server answered.
        async fn client(
            s: &Setup,
            socket: DuplexStream,
            header_after: Option<Duration>,
            tls_after: Option<Duration>,
            hello_after: Option<Duration>,
        ) -> (Box<dyn std::any::Any + Send>, Option<Message>) {
            let start = Instant::now();
            let mut socket = socket;
            if let Some(at) = header_after {
                tokio::time::sleep_until(start + at).await;
                socket.write_all(HEADER).await.expect("the header");
            }
            async fn hello<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
                socket: S,
                at: Option<Instant>,
                key: &str,
            ) -> (Box<dyn std::any::Any + Send>, Option<Message>) {
                let Some(at) = at else {
                    return (Box::new(socket), None);
                };
                tokio::time::sleep_until(at).await;
                let mut framed = Framed::new(socket, FrameCodec::new());
                let hello = Message::Hello {
                    api_key: key.into(),
                    client: "test".into(),
                };
                let reply = match framed.send(hello.to_frame(1, 0).expect("a frame")).await {
                    Ok(()) => framed
                        .next()
                        .await
                        .and_then(|f| f.ok())
                        .and_then(|f| Message::from_frame(&f).ok()),
                    Err(_) => None,
                };
                (Box::new(framed), reply)
            }
            let hello_at = hello_after.map(|d| start + d);
            match tls_after {
                None => hello(socket, hello_at, &s.writer_key).await,
                Some(at) => {
                    tokio::time::sleep_until(start + at).await;
                    let name = ServerName::try_from("localhost").expect("a name");
                    match s.connector.connect(name, socket).await {
                        Ok(tls) => hello(tls, hello_at, &s.writer_key).await,
                        Err(_) => (Box::new(()), None),
                    }
                }
            }
        }

        /// One connection: the server's result and when it ended, and
        /// what the client was answered.
        async fn connection(
            s: &Setup,
            tls: bool,
            header_after: Option<Duration>,
            tls_after: Option<Duration>,
            hello_after: Option<Duration>,
        ) -> (Result<(), ConnectionError>, Duration, Option<Message>) {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let ((result, ended), (_kept, answer)) = tokio::join!(
                serve(s, theirs, tls, header_after.is_some()),
                client(s, ours, header_after, tls_after, hello_after),
            );
            (result, ended, answer)
        }

        fn secs(s: u64) -> Option<Duration> {
            Some(Duration::from_secs(s))
        }

        #[tokio::test(start_paused = true)]
        async fn a_slow_header_leaves_less_time_for_tls_and_hello() {
            let s = setup().await;
            // Plaintext: the header at 6 s, then no Hello: closed at 10 s,
            // not 10 s after the header.
            let (result, ended, _) = connection(&s, false, secs(6), None, None).await;
            assert!(matches!(result, Err(ConnectionError::Idle)), "{result:?}");
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            // TLS: the header at 6 s, then no handshake: closed at 10 s.
            let (result, ended, _) = connection(&s, true, secs(6), None, None).await;
            assert!(matches!(result, Err(ConnectionError::Idle)), "{result:?}");
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            // The header at 3 s, TLS at 6 s, then no Hello: closed at 10 s.
            let (result, ended, _) = connection(&s, true, secs(3), secs(6), None).await;
            assert!(matches!(result, Err(ConnectionError::Idle)), "{result:?}");
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn a_hello_within_the_window_is_answered_however_slow_the_steps_before_it() {
            let s = setup().await;
            for (tls, header, handshake) in [
                (false, secs(9), None),
                (true, None, secs(9)),
                (true, secs(4), secs(8)),
            ] {
                let (result, _, answer) = connection(&s, tls, header, handshake, secs(9)).await;
                assert!(
                    matches!(answer, Some(Message::HelloOk { ref role, .. }) if role == "writer"),
                    "{answer:?}"
                );
                // Then the client is idle, until the idle timeout.
                assert!(matches!(result, Err(ConnectionError::Idle)), "{result:?}");
            }
            // A Hello after the window, with nothing before it, is not.
            let (result, ended, answer) = connection(&s, false, None, None, secs(11)).await;
            assert!(matches!(result, Err(ConnectionError::Idle)), "{result:?}");
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            assert!(answer.is_none(), "{answer:?}");
        }
    }

    /// A client's end and the end `listener` accepted of a new connection.
    async fn connected(listener: &TcpListener) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let addr = listener.local_addr().expect("its address");
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (client.expect("connected"), accepted.expect("accepted").0)
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let inherited = nodelay_inherited(&listener);
        assert_eq!(inherited, cfg!(target_os = "linux"));
        let (client, accepted) = connected(&listener).await;
        if inherited {
            assert!(accepted.nodelay().expect("TCP_NODELAY"));
        }
        drop(client);
    }

    /// A connection's last answer is held back until its end and leaves
    /// with it (`Outgoing::hold_until_close`); nothing held is lost,
    /// whether the stream is shut down or dropped.
    /// A new master secret is taken only from a connection it cannot have
    /// crossed a network on in clear: TLS, or plaintext between loopback
    /// addresses. Otherwise it is refused, and the vault keeps its master.
    mod master_secret_channel {
        use super::*;
        use rustls::pki_types::ServerName;
        use std::net::IpAddr;
        use tokio_util::codec::Framed;

        /// The answer to `RotateMasterKey` over one connection from `peer`
        /// (through a trusted proxy at `proxy`, when given), over TLS or
        /// not; and whether the vault's log grew.
        async fn rotate(tls: bool, peer: &str, proxy: Option<&str>) -> (Message, bool) {
            let (dir, vault, key) = vault_with("admin", "ops").await;
            let before = vault.head().map(|h| h.last_seq);
            let vault: LiveVault = vault.into();
            let (acceptor, connector) = crate::tls::test_ends(dir.path());
            let mut conn = Conn {
                vault: vault.clone(),
                config: Arc::new(ServeConfig::default()),
                throttle: Arc::new(FailureThrottle::default()),
                peer: peer.parse().expect("an address"),
                proxy: proxy.map(|p| p.parse::<IpAddr>().expect("an address")),
                admission: None,
                arrived: tokio::time::Instant::now(),
                client_cert: None,
                tls: false,
                stopping: CancellationToken::new(),
            };
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let server = async move {
                match open(theirs, tls.then_some(&acceptor), &mut conn).await {
                    Ok(Opened::Plain(socket)) => {
                        let (r, w) = tokio::io::split(socket);
                        let _ = serve_connection(r, w, conn).await;
                    }
                    Ok(Opened::Tls(stream)) => {
                        let (r, w) = tokio::io::split(*stream);
                        let _ = serve_connection(r, w, conn).await;
                    }
                    Err(e) => panic!("the connection did not open: {e}"),
                }
            };
            async fn talk<S: AsyncRead + AsyncWrite + Unpin>(socket: S, key: &str) -> Message {
                let mut framed = Framed::new(socket, FrameCodec::new());
                let mut last = Message::Pong;
                for (id, m) in [
                    (
                        1,
                        Message::Hello {
                            api_key: key.into(),
                            client: "test".into(),
                        },
                    ),
                    (
                        2,
                        Message::RotateMasterKey {
                            kind: protocol::SecretKind::KeyFile,
                            secret: vec![9; 32],
                        },
                    ),
                ] {
                    let frame = m.to_frame(id, 0).expect("a frame");
                    framed.send(frame).await.expect("sent");
                    let reply = framed.next().await.expect("an answer").expect("a frame");
                    last = Message::from_frame(&reply).expect("a message");
                }
                last
            }
            let client = async move {
                if tls {
                    let name = ServerName::try_from("localhost").expect("a name");
                    let stream = connector.connect(name, ours).await.expect("TLS");
                    talk(stream, &key).await
                } else {
                    talk(ours, &key).await
                }
            };
            let answer = tokio::select! {
                answer = client => answer,
                () = server => panic!("the server ended the connection first"),
            };
            let after = vault.get().expect("the vault").head().map(|h| h.last_seq);
            (answer, after > before)
        }

        fn refused(answer: &Message) -> bool {
            matches!(answer, Message::Error { code, message }
                if *code == ErrorCode::Forbidden && message.contains("plaintext"))
        }

        #[tokio::test]
        async fn plaintext_from_another_host_is_refused_and_changes_nothing() {
            for (peer, proxy) in [
                ("192.0.2.7", None),
                // A loopback proxy's client on another host.
                ("192.0.2.7", Some("127.0.0.1")),
                // A proxy on another host, whatever it names.
                ("127.0.0.1", Some("192.0.2.9")),
            ] {
                let (answer, grew) = rotate(false, peer, proxy).await;
                assert!(refused(&answer), "{peer} via {proxy:?}: {answer:?}");
                assert!(!grew, "{peer} via {proxy:?}: the log grew");
            }
        }

        #[tokio::test]
        async fn tls_or_loopback_is_taken() {
            for (tls, peer, proxy) in [
                (true, "192.0.2.7", None),
                (true, "192.0.2.7", Some("192.0.2.9")),
                (false, "127.0.0.1", None),
                (false, "::1", None),
                (false, "::ffff:127.0.0.1", Some("127.0.0.1")),
            ] {
                let (answer, grew) = rotate(tls, peer, proxy).await;
                assert!(
                    matches!(answer, Message::Receipt { .. }),
                    "tls {tls}, {peer} via {proxy:?}: {answer:?}"
                );
                assert!(grew, "tls {tls}, {peer} via {proxy:?}: nothing logged");
            }
        }
    }

    mod held_answers {
        use super::*;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
            connected(&listener).await
        }

        #[tokio::test]
        async fn over_tcp_the_answer_leaves_with_the_shutdown_or_the_drop() {
            for shut_down in [true, false] {
                let (mut client, server) = tcp_pair().await;
                let (r, mut w) = server.into_split();
                let corked = || {
                    socket2::SockRef::from(w.as_ref())
                        .tcp_cork()
                        .expect("TCP_CORK")
                };
                assert!(!corked());
                w.hold_until_close();
                assert!(corked(), "held");
                w.write_all(b"the last answer").await.expect("written");
                if shut_down {
                    w.shutdown().await.expect("shut down");
                } else {
                    drop((r, w));
                }
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.expect("read to the end");
                assert_eq!(got, b"the last answer", "shut down: {shut_down}");
            }
        }

        #[tokio::test]
        async fn over_tls_the_answer_leaves_with_the_close_notify() {
            let dir = tempfile::tempdir().expect("a scratch dir");
            let (acceptor, connector) = crate::tls::test_ends(dir.path());
            let (client, server) = tcp_pair().await;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let (client, server) =
                tokio::join!(connector.connect(name, client), acceptor.accept(server));
            let (mut client, server) = (client.expect("client end"), server.expect("server end"));
            let (_r, mut w) = TlsOutgoing::split(server);
            let socket = w.socket.as_ref().expect("a second descriptor");
            assert!(!socket.tcp_cork().expect("TCP_CORK"));
            w.hold_until_close();
            assert!(socket.tcp_cork().expect("TCP_CORK"), "held");
            w.write_all(b"the last answer").await.expect("written");
            w.shutdown().await.expect("shut down");
            let mut got = Vec::new();
            // An end without `close_notify` would be an error here.
            client.read_to_end(&mut got).await.expect("read to the end");
            assert_eq!(got, b"the last answer");
        }
    }

    /// The HTTP answer on the protocol port is the one docs/protocol.md
    /// shows (rule 8), each line ending as its `\r\n` or `\n` says.
    #[test]
    fn the_http_answer_is_the_documented_one() {
        let docs = include_str!("../../docs/protocol.md");
        let block = docs
            .split_once("The HTTP answer, whole")
            .and_then(|(_, rest)| rest.split_once("```text\n"))
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(block, _)| block)
            .expect("protocol.md shows the HTTP answer");
        let documented: String = block
            .lines()
            .map(|l| l.trim_start().replace("\\r", "\r").replace("\\n", "\n"))
            .collect();
        assert_eq!(documented, http_answer());
        assert!(is_http_request(b"GET / HTTP/1.1\r\n"));
        assert!(!is_http_request(b"GET"));
        assert!(!is_http_request(b"FV\x01\x01"));
    }

    /// An accept that fails for want of file descriptors closes the
    /// oldest connection still in its handshake, and only such a one.
    #[tokio::test]
    async fn out_of_descriptors_the_oldest_handshake_makes_room() {
        let a = Admission::new(1, 4, "test-descriptors");
        let emfile = std::io::Error::from_raw_os_error(24);
        accept_failed(&emfile, &a).await;
        let (t0, oldest) = a.arrive();
        let (_, newer) = a.arrive();
        let _slot = a
            .admitted(t0, tokio::time::Instant::now())
            .await
            .expect("a free slot");
        // The oldest holds its slot now: no longer evictable.
        let (_, newest) = a.arrive();
        accept_failed(&std::io::Error::other("another"), &a).await;
        assert!(!newer.is_cancelled(), "not for another error");
        accept_failed(&emfile, &a).await;
        assert!(!oldest.is_cancelled() && newer.is_cancelled() && !newest.is_cancelled());
        accept_failed(&emfile, &a).await;
        assert!(newest.is_cancelled());
        assert!(!a.evict_oldest(), "none left");
    }

    /// `fintrust_connections` follows each connection: in its handshake
    /// from its arrival until it holds a slot (waiting included), evicted
    /// or gone; served while it holds one. The limits are beside them.
    #[tokio::test]
    async fn the_connection_gauges_follow_each_connection() {
        let port = "test-gauges";
        let m = crate::metrics::global();
        let read = |family: &Family<crate::metrics::ConnectionLabels, Gauge>, state| {
            family
                .get_or_create(&crate::metrics::ConnectionLabels { port, state })
                .get()
        };
        let now = || {
            (
                read(&m.connections, "handshake"),
                read(&m.connections, "served"),
            )
        };
        let a = Arc::new(Admission::new(1, 2, port));
        assert_eq!(read(&m.connections_limit, "handshake"), 2);
        assert_eq!(read(&m.connections_limit, "served"), 1);
        assert_eq!(now(), (0, 0));
        let (t0, _) = a.arrive();
        let (t1, _) = a.arrive();
        assert_eq!(now(), (2, 0));
        let slot = a
            .admitted(t0, tokio::time::Instant::now())
            .await
            .expect("a free slot");
        assert_eq!(now(), (1, 1));
        // The second waits for the slot, still in its handshake...
        let waiting = tokio::spawn({
            let a = a.clone();
            async move {
                a.admitted(t1, tokio::time::Instant::now() + Duration::from_secs(3600))
                    .await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(now(), (1, 1));
        // ...until two more arrive: the oldest (it) is evicted.
        let (t2, _) = a.arrive();
        let (t3, _) = a.arrive();
        assert!(matches!(
            waiting.await.expect("task"),
            Err(Refused::Evicted)
        ));
        assert_eq!(now(), (2, 1));
        // A departure leaves its place when dropped (a connection's task
        // that panics drops it too), and leaving again does nothing.
        drop(a.departure(t2));
        a.leave(t2);
        drop(slot);
        assert_eq!(now(), (1, 0));
        let slot = a
            .admitted(t3, tokio::time::Instant::now())
            .await
            .expect("the freed slot");
        assert_eq!(now(), (0, 1));
        drop(slot);
        a.leave(t3);
        assert_eq!(now(), (0, 0));
    }

    /// Connections that authenticated but wait for a slot stay among the
    /// handshakes (the oldest one's wait ends when one more arrives past
    /// `max_handshakes`, without closing it, so that it can be told), and
    /// wait until their deadline only; a slot that frees goes to one that
    /// waits. On tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_slot_is_bounded_in_time_and_in_number() {
        use tokio::time::Instant;
        let a = Arc::new(Admission::new(1, 2, "test-waiting"));
        let far = Instant::now() + Duration::from_secs(3600);
        let (t0, e0) = a.arrive();
        let held = a.admitted(t0, far).await.expect("a free slot");
        let wait = |ticket: u64, deadline: Instant| {
            let a = a.clone();
            tokio::spawn(async move { a.admitted(ticket, deadline).await })
        };
        let (t1, e1) = a.arrive();
        let w1 = wait(t1, far);
        let (t2, e2) = a.arrive();
        let w2 = wait(t2, far);
        tokio::task::yield_now().await;
        assert!(!w1.is_finished() && !w2.is_finished(), "no slot free");
        // One more arrival past `max_handshakes`: the oldest waiting one
        // is refused, not the one that holds the slot, and none is closed
        // outright.
        let (t3, e3) = a.arrive();
        let refused = w1.await.expect("task").map(|_| ());
        assert_eq!(refused, Err(Refused::Evicted));
        for e in [&e0, &e1, &e2, &e3] {
            assert!(!e.is_cancelled());
        }
        // A deadline passes: no slot.
        let w3 = wait(t3, Instant::now() + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(11)).await;
        let refused = w3.await.expect("task").map(|_| ());
        assert_eq!(refused, Err(Refused::Busy), "no slot by the deadline");
        // The held slot frees: the one still waiting takes it, and is no
        // longer among the handshakes (new arrivals evict no one).
        drop(held);
        let got = w2.await.expect("task");
        assert!(got.is_ok(), "the freed slot");
        let (_t4, _) = a.arrive();
        let (_t5, _) = a.arrive();
        let (_t6, _) = a.arrive();
        assert!(!e2.is_cancelled(), "a connection holding its slot stays");
    }

    /// A connection's write buffer, grown by a large answer, is given back
    /// once that answer is written; a small one is kept.
    #[tokio::test]
    async fn the_write_buffer_a_large_answer_grew_is_given_back() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = far.read_to_end(&mut sink).await;
        });
        let mut sink = FramedWrite::new(
            Unread::new(near, Duration::from_secs(30)),
            FrameCodec::new(),
        );
        sink.set_backpressure_boundary(PIPELINE_BUFFER);
        let mut out = Answers {
            sink,
            dirty: false,
            failed: false,
            budget: Vec::new(),
        };
        let batch = |n: usize| Message::EntryBatch {
            entries: vec![vec![7u8; n]],
        };
        out.feed(2, &batch(100), 0).await;
        out.flush().await;
        assert!(
            out.sink.write_buffer_mut().try_reclaim(100),
            "a small buffer kept"
        );
        out.feed(3, &batch(512 * 1024), 0).await;
        out.flush().await;
        assert!(!out.failed);
        assert!(
            !out.sink
                .write_buffer_mut()
                .try_reclaim(MAX_IDLE_WRITE_BUFFER + 1),
            "given back"
        );
        drop(out);
        reader.await.expect("reader");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_fails_only_once_it_made_no_progress_for_the_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limit = Duration::from_millis(300);
        let (near, mut far) = tokio::io::duplex(256);
        let mut w = Unread::new(near, limit);
        // A reader that takes 256 bytes every 100 ms: slow, but never
        // the limit without progress.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let mut total = 0;
            while total < 8192 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                total += far.read(&mut buf).await.expect("read");
            }
            far
        });
        let slow = tokio::time::Instant::now();
        w.write_all(&[7; 8192])
            .await
            .expect("a slow reader is not cut off");
        assert!(slow.elapsed() > limit * 3, "{:?}", slow.elapsed());
        assert!(!w.expired());
        // Nobody reads any more (the reader's end is kept open): the
        // write that cannot move fails at the limit, ...
        let _far = reader.await.expect("reader");
        let stalled = tokio::time::Instant::now();
        let e = w.write_all(&[7; 1024]).await.expect_err("left unread");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(stalled.elapsed() >= limit, "{:?}", stalled.elapsed());
        assert!(w.expired());
        // ... and every later call at once, without waiting again.
        let again = tokio::time::Instant::now();
        assert!(w.flush().await.is_err());
        assert!(w.shutdown().await.is_err());
        assert_eq!(again.elapsed(), Duration::ZERO);
    }
}
