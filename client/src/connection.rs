//! One connection to the vault, shared by every task that holds the
//! [`Client`]: requests are numbered, pipelined, and matched to their
//! answers by request id, whatever order the server answers in.
//!
//! ```text
//! caller tasks ──register(id → oneshot)──> pending map <──deliver── reader task <── socket
//!      │                                   (one mutex)               (FramedRead,
//!      └──encoded frame──> mpsc ──> writer task ──> socket            MessageCodec)
//!                                  (coalesces queued frames into one flush)
//! ```
//!
//! A caller registers its request id in the pending map with its deadline,
//! encodes its frame itself (so an unencodable request fails only that
//! caller), queues it for the writer, and waits on its oneshot. The reader
//! task decodes each response and hands it to the sender registered under
//! its request id; an `Entries` answer is collected there until the frame
//! flagged `LAST`. When the connection fails or closes, every waiting
//! caller gets the error (a request in flight that may have been done:
//! [`ClientError::Closed`] when the connection ended) and later calls
//! fail at once with [`ClientError::NotSent`], which was not; there is no
//! automatic reconnect, because which requests took effect is the
//! caller's decision to make.
//!
//! Timeouts cost no timer per request: a sweeper task of the connection
//! looks through the map every eighth of the timeout (at least every
//! millisecond) and fails each request past its deadline with
//! [`ClientError::Timeout`], so a request times out between the timeout
//! and an eighth more. A timed-out request's id leaves the map;
//! a late answer to it is dropped, so it can never be delivered to another
//! request. A request times out alone while the server answers others;
//! one that times out with nothing at all heard from the server since it
//! was sent means the server or the path to it stalled (a peer gone
//! without a reset, a server that stopped answering): the connection is
//! closed then, its other requests fail with the same `Timeout`, and
//! later calls fail at once with `Closed` instead of each waiting out its
//! own timeout on a connection that answers nothing. The requests that
//! work through the whole vault (a reindex, a master key's rotation) have
//! a deadline of [`LONG_REQUEST_TIMEOUT`] at least, and while one waits
//! the connection is not taken for stalled: others time out alone.
//! A connection the client keeps sends TCP keepalive probes after 30 s
//! without traffic, three of them 10 s apart, and gives up on bytes the
//! peer has not acknowledged for a minute (`TCP_USER_TIMEOUT`, on Linux:
//! the probes are not sent while any are in flight), so that a peer gone without a
//! reset is found within a minute or so even then: the connection fails
//! with an I/O error, and the long request with it.
//!
//! A server in the same process can be reached without a stream
//! ([`Client::direct`]): the caller hands its encoded frame to an
//! [`Exchange`] and delivers the frames that come back itself, through the
//! same pending map, so no task, pipe or socket sits between the two. The
//! bytes are those of the wire, so the server decodes and checks them as
//! it does a network connection's.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use protocol::receipt::{KeyChain, KeyEndorsement, Receipt, SignedHead};
use protocol::{
    encode_frame, CredentialInfo, Envelope, ErrorCode, MaskOp, Message, MessageCodec, Record,
    SecretKind, SubjectKey,
};
use rustls::ClientConfig as RustlsConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::either::Either;
use zeroize::{Zeroize, Zeroizing};

use crate::config::{rustls_config, server_name_of, ClientConfig, Tls, LONG_REQUEST_TIMEOUT};
use crate::error::{ClientError, Result};
use crate::secret::Secret;
use crate::verify::verifying_key;

/// A connection: plain TCP, or TLS over it.
type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The request id of `Hello`; later requests are numbered from 2 on.
const HELLO_ID: u32 = 1;

/// How many times per timeout the connection's sweeper task looks for
/// requests past their deadline.
const SWEEPS_PER_TIMEOUT: u32 = 8;

/// The deadline of a request whose timeout no instant can hold.
const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The writer task's buffer: frames that fit in it are copied, and the
/// bursts of frames queued together leave in one write.
const WRITE_BUFFER: usize = 8 * 1024;

/// Frames queued for the writer before callers wait for room. Pipelining
/// depth is not limited here: the server reads at most its `max_in_flight`
/// requests ahead and TCP back-pressure does the rest.
const OUTGOING_QUEUE: usize = 256;

/// A server reached by a call instead of a stream: [`Exchange::exchange`]
/// takes one encoded request frame (the first is `Hello`, with the API
/// key: zeroize it once read) and returns the frames that answer it, as
/// they would arrive on a connection.
pub trait Exchange: Send + Sync + 'static {
    /// Serves one request. `frame` is one whole frame as on the wire
    /// (header and payload, under the request id the client chose); the
    /// answer holds every frame that answers it, encoded and concatenated
    /// in order (all of an `Entries` stream, through the frame flagged
    /// `LAST`), and [`Exchanged::closed`] when the server ends the
    /// connection after them (after a redemption, or an error about the
    /// connection): the requests still waiting then fail with
    /// [`ClientError::Closed`], later ones with [`ClientError::NotSent`].
    /// Called from the task of each request, concurrently when tasks share
    /// the [`Client`]; a call not done within the request's timeout is
    /// dropped and the request fails with [`ClientError::Timeout`], as
    /// does one whose answer holds no frame for it.
    fn exchange(&self, frame: Vec<u8>) -> futures_util::future::BoxFuture<'_, Exchanged>;
}

/// What one [`Exchange::exchange`] returns. The frames may hold a token,
/// an API key or personal data: they are wiped when it is dropped, and
/// `Debug` shows only their length.
#[derive(Default)]
pub struct Exchanged {
    /// Encoded frames, concatenated.
    pub frames: Vec<u8>,
    /// The server ended the connection after these frames.
    pub closed: bool,
}

impl Drop for Exchanged {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.frames);
    }
}

impl std::fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanged")
            .field("frames_len", &self.frames.len())
            .field("closed", &self.closed)
            .finish()
    }
}

/// How a [`Client`]'s requests reach the server.
enum Transport {
    /// A byte stream with its writer and reader tasks.
    Stream {
        outgoing: mpsc::Sender<Vec<u8>>,
        reader: JoinHandle<()>,
        /// Fails requests past their deadline (see the module doc).
        sweeper: JoinHandle<()>,
    },
    /// Calls in the caller's own task.
    Direct(Arc<dyn Exchange>),
}

/// Whether each item of a page of a listing is after `cursor` and after
/// the one before it: what a paging loop needs to end (an empty page is
/// the end, unless it says more follow, which the loops refuse).
fn ascending_after<T: Ord>(cursor: T, items: impl IntoIterator<Item = T>) -> bool {
    let mut last = cursor;
    for item in items {
        if item <= last {
            return false;
        }
        last = item;
    }
    true
}

/// What `Head` answers: the vault's public key, how many entries are
/// durable, and the newest signed head (`None` for an empty log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    /// The key the server says signs its heads. Compare it with a key
    /// pinned out of band before trusting receipts checked with it.
    pub public_key: [u8; 32],
    /// How many entries the log holds durably: the signed head's
    /// `last_seq` + 1, 0 for an empty log. The server's word, not checked
    /// against `signed_head` here.
    pub entries: u64,
    /// Checked against `public_key` by [`Client::head`].
    pub signed_head: Option<SignedHead>,
}

/// What `Health` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `ok`; `degraded` when the vault stopped accepting writes;
    /// `recovering` while the server opens its data dir again.
    pub status: String,
    /// Durable entries: `head`'s `last_seq` + 1, or 0 without a head.
    pub entries: u64,
    /// The latest durable signed head, as the server sent it: **not
    /// checked** here, as the answer carries no key. Check it with
    /// [`SignedHead::verify`] against a key pinned out of band (or use
    /// [`Client::head`]). `None` while the server is recovering.
    pub head: Option<SignedHead>,
}

/// What [`Client::rotate_subject_key`] did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The subject's new key version.
    pub version: u32,
    /// Receipt of the `key_rotated` entry.
    pub receipt: Receipt,
    /// Receipt of the re-encrypted record, if one was asked for and the
    /// subject had a record.
    pub reencrypted: Option<Receipt>,
}

/// The vault's keys, from [`Client::key_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// When the master key was committed (the genesis entry, unix ms).
    pub master_created_ms: u64,
    /// Keys wrapped under the master key (signing key and subject keys).
    pub master_wraps: u64,
    /// When the current signing key was committed (unix ms).
    pub signing_created_ms: u64,
    /// Records one subject key may encrypt before the vault rotates it.
    pub encryption_limit: u64,
    /// Subject data keys in (subject, version) order.
    pub keys: Vec<SubjectKey>,
    /// More keys follow (a single page only).
    pub more: bool,
    /// The current signing key's id.
    pub signing_key_id: u32,
    /// The server's rotation policy for the signing key: the age in
    /// seconds past which it should be rotated (0: no maximum). The vault
    /// does not rotate by itself: `vaultd` and `vault-admin status` warn.
    pub max_signing_key_age_secs: u64,
    /// The same for subject data keys: the age in seconds past which an
    /// active subject key should be rotated (0: no maximum).
    pub max_subject_key_age_secs: u64,
}

/// What a signing key rotation did: the receipt of its `key_rotated`
/// entry (signed by the old key) and the new key's endorsement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningRotated {
    /// Receipt of the `key_rotated` entry, decoded but not verified:
    /// check it with [`Client::verify_receipt`] against the pinned key.
    pub receipt: Receipt,
    /// The old key's endorsement of the new signing key: its id (the old
    /// one's + 1), its public key, and the seq of the `key_rotated` entry
    /// (checked to be the receipt's). Heads after that entry's commit
    /// group are signed by the new key.
    pub endorsement: KeyEndorsement,
}

/// What [`Client::reindex`] found: the server rebuilt its derived state
/// from the log (up to the state tree's `applied` marker) and compared it
/// with the stored state, changing nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReindexReport {
    /// Entries replayed.
    pub entries: u64,
    /// State keys compared.
    pub keys_compared: u64,
    /// Keys that differ (0: the stored state is the log's).
    pub differences: u64,
    /// Descriptions of the first differences (at most 20).
    pub sample: Vec<String>,
}

/// A credential as `Whois` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The credential's id (its role, a dash and the start of its key
    /// hash): what [`Client::revoke_credential`] takes, and what the log's
    /// `recorded_by` members name.
    pub id: String,
    /// admin, writer, gateway, partner or auditor.
    pub role: String,
    /// For partners, the partner id.
    pub name: String,
}

/// A derived-state value: the kind byte of the entry that set it (see
/// `docs/storage.md`) and its JSON payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateValue {
    /// The kind byte of that entry: 5 (`policy_changed`) for a policy;
    /// 3 (`consent_granted`) or 4 (`consent_revoked`) for a consent.
    pub kind: u8,
    /// The entry's payload as written, a JSON object in UTF-8: for a
    /// policy `{"partner_id", "policy"}`, for a consent `{"partner_id",
    /// "purposes", "expires_at_ms"?}`; and, when a server recorded it,
    /// `recorded_by`, the id of the credential that sent it.
    pub value: Vec<u8>,
}

/// What a gateway needs to decide an authorization, from one `Context`
/// request: who holds the key and, for a partner, its policy and the
/// subject's consent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeContext {
    /// Who holds the key, as [`Client::whois`] names it: the credential's
    /// id, its role and, for a partner, the partner id.
    pub identity: Identity,
    /// The partner's current policy (`None`: none set, or not a partner).
    pub policy: Option<StateValue>,
    /// The subject's latest consent event for the partner.
    pub consent: Option<StateValue>,
}

/// The one masked segment a token reveals. `Debug` shows field names only:
/// the values are personal data.
#[derive(Clone, PartialEq, Eq)]
pub struct Redeemed {
    /// The data subject the token was minted for (e.g. a customer id).
    pub subject: String,
    /// Seq of the record entry the values were read from: the subject's
    /// latest record when the token was redeemed.
    pub seq: u64,
    /// (name, masked value), in the order the server sent them.
    pub fields: Vec<(String, String)>,
}

impl fmt::Debug for Redeemed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Redeemed")
            .field("subject", &self.subject)
            .field("seq", &self.seq)
            .field("fields", &names)
            .finish()
    }
}

/// A connection to the vault, authenticated by `Hello`.
///
/// Methods take `&self` and may be called concurrently from many tasks
/// (share the client in an `Arc`): their requests are pipelined on the one
/// connection. Each fails with `Timeout` once [`ClientConfig::timeout`]
/// has passed, within an eighth of it more (see the module doc). Dropping the
/// client closes the connection once queued frames are written.
///
/// ```no_run
/// use client::{Client, ClientConfig, Tls, Zeroizing};
///
/// # async fn demo() -> client::Result<()> {
/// let client = Client::connect(ClientConfig {
///     addr: "vault.internal:9999".into(),
///     tls: Tls::Ca {
///         ca_pem_file: "/etc/fintrust/ca.pem".into(),
///         server_name: "vault.internal".into(),
///         client_cert: None,
///     },
///     api_key: Zeroizing::new(std::env::var("FINTRUST_API_KEY").unwrap_or_default()),
///     ..ClientConfig::default()
/// })
/// .await?;
/// let receipt = client
///     .append("cust-42", vec![("iban".into(), "GB33BUKB20201555555555".into())])
///     .await?;
/// let pinned_key = [0u8; 32]; // printed by `vaultd init`
/// client.verify_receipt(&receipt, &pinned_key).await?;
/// # Ok(()) }
/// ```
pub struct Client {
    shared: Arc<Shared>,
    transport: Transport,
    role: String,
    server: String,
    /// True when the TLS handshake resumed an earlier session.
    resumed: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("role", &self.role)
            .field("server", &self.server)
            .field("timeout", &self.shared.timeout)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The writer ends by itself when `outgoing` is dropped, after
        // writing what is queued and closing the stream; the reader would
        // wait for the server to close, so it is stopped here.
        if let Transport::Stream {
            reader, sweeper, ..
        } = &self.transport
        {
            reader.abort();
            sweeper.abort();
        }
    }
}

/// The TLS of a [`Connector`] ([`Connector::tls`]): its trust, session
/// cache and server name, to speak TLS to another port of the same server
/// under the same certificate, such as `vaultd`'s HTTP shim.
#[derive(Clone)]
pub struct TlsLink {
    config: Arc<RustlsConfig>,
    name: ServerName<'static>,
    /// The connector's timeout, for the handshake.
    timeout: Duration,
}

impl TlsLink {
    /// `tcp` inside TLS, once the handshake is done and the server's
    /// certificate checked. A server that does not answer in TLS is
    /// [`ClientError::Tls`], named as such; one that does not finish the
    /// handshake within the connector's timeout, [`ClientError::Timeout`].
    pub async fn wrap(
        &self,
        tcp: TcpStream,
    ) -> Result<impl AsyncRead + AsyncWrite + Unpin + Send + 'static> {
        let handshake =
            tokio_rustls::TlsConnector::from(self.config.clone()).connect(self.name.clone(), tcp);
        let stream = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(stream)
    }
}

impl fmt::Debug for TlsLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsLink")
            .field("server_name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Opens connections with one [`ClientConfig`], its TLS files read and its
/// TLS configuration built once.
///
/// Every connection made through one connector shares one rustls
/// `ClientConfig`, and with it the TLS session cache: after a full
/// handshake with a server, later connections resume the session (TLS 1.3
/// tickets), skipping the certificate check and the server's signature.
/// Clone it freely: clones share the configuration and the cache.
#[derive(Clone)]
pub struct Connector {
    config: ClientConfig,
    tls: Option<(Arc<RustlsConfig>, ServerName<'static>)>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Time without traffic after which a kept connection sends its first
/// TCP keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes that go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel fails the connection.
const KEEPALIVE_PROBES: u32 = 3;

/// How long bytes sent on a kept connection may go unacknowledged before
/// the kernel fails it: the time the keepalive probes take.
#[cfg_attr(
    not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "fuchsia",
        target_os = "cygwin"
    )),
    allow(dead_code)
)]
const UNACKNOWLEDGED_LIMIT: Duration =
    KEEPALIVE_IDLE.saturating_add(KEEPALIVE_INTERVAL.saturating_mul(KEEPALIVE_PROBES));

/// Turns TCP keepalive on for a connection the client keeps, with a
/// limit on unacknowledged bytes (the kernel sends no probe while any are
/// in flight, and retransmits them for about 15 minutes): the only way it
/// learns of a peer gone without a reset while it waits for a long
/// request's answer (the stall check leaves those alone).
fn keep_alive(tcp: &TcpStream) -> std::io::Result<()> {
    let probes = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    // Not on Windows, where the system's count (10) holds.
    #[cfg(not(windows))]
    let probes = probes.with_retries(KEEPALIVE_PROBES);
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(&probes)?;
    // Linux's (and its kin's) alone; elsewhere the probes still find a
    // dead peer once nothing is in flight.
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "fuchsia",
        target_os = "cygwin"
    ))]
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT))?;
    Ok(())
}

impl Connector {
    /// Validates `config` and reads its TLS files; touches no network.
    pub fn new(config: ClientConfig) -> Result<Connector> {
        config.validate()?;
        // Local files are read before anything touches the network, so a
        // bad path fails the same with or without a server.
        let tls = match &config.tls {
            Tls::Plaintext => None,
            Tls::Ca {
                ca_pem_file,
                server_name,
                client_cert,
            } => Some((
                rustls_config(ca_pem_file, client_cert.as_ref())?,
                server_name_of(server_name)?,
            )),
        };
        Ok(Connector { config, tls })
    }

    /// The same connector, TLS configuration and session cache included,
    /// authenticating with another API key and client name: for a
    /// service that acts for many callers with their own keys (the HTTP
    /// shim), whose connections then resume each other's TLS sessions
    /// instead of each reading the TLS files and making a full handshake.
    /// A client certificate in the configuration is presented as before.
    /// The key and name are checked as [`Connector::new`] checks them
    /// (`Config` for an empty key without a client certificate, or one
    /// over 64 KiB).
    pub fn with_key(&self, api_key: Zeroizing<String>, client_name: String) -> Result<Connector> {
        let config = ClientConfig {
            api_key,
            client_name,
            ..self.config.clone()
        };
        config.validate()?;
        Ok(Connector {
            config,
            tls: self.tls.clone(),
        })
    }

    /// The same connector with TLS session resumption turned off: every
    /// connection makes a full handshake (for measuring what resumption
    /// saves). The session cache is not shared with `self`.
    pub fn without_resumption(&self) -> Connector {
        let tls = self.tls.as_ref().map(|(config, name)| {
            let mut config = RustlsConfig::clone(config);
            config.resumption = rustls::client::Resumption::disabled();
            (Arc::new(config), name.clone())
        });
        Connector {
            config: self.config.clone(),
            tls,
        }
    }

    /// The TLS this connector speaks, `None` in plaintext: for another
    /// port of the same server under the same certificate, such as
    /// `vaultd`'s HTTP shim.
    pub fn tls(&self) -> Option<TlsLink> {
        self.tls.as_ref().map(|(config, name)| TlsLink {
            config: config.clone(),
            name: name.clone(),
            timeout: self.config.timeout,
        })
    }

    /// A TCP connection to the vault, inside TLS unless plaintext, and
    /// whether its TLS handshake resumed an earlier session. `one_write`:
    /// the connection will carry a single write of the client's, so in
    /// plaintext Nagle's algorithm has nothing to hold back (it delays a
    /// write only while an earlier one is unacknowledged) and
    /// `TCP_NODELAY` is not set; a TLS handshake writes more than once.
    async fn stream(&self, one_write: bool) -> Result<(Stream, bool)> {
        let tcp = TcpStream::connect(self.config.addr.as_str()).await?;
        if !one_write {
            keep_alive(&tcp)?;
        }
        let Some((tls, name)) = &self.tls else {
            if !one_write {
                // Requests are small and latency matters more than packet count.
                tcp.set_nodelay(true)?;
            }
            return Ok((Either::Left(tcp), false));
        };
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name.clone(), tcp)
            .await?;
        let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Ok((Either::Right(Box::new(stream)), resumed))
    }

    /// Connects and authenticates as [`Client::connect`] does.
    pub async fn connect(&self) -> Result<Client> {
        let config = &self.config;
        let connecting = async {
            match self.stream(false).await? {
                (Either::Left(tcp), _) => {
                    let (r, w) = tcp.into_split();
                    Client::hello(r, w, config).await
                }
                (tls, resumed) => {
                    let (r, w) = tokio::io::split(tls);
                    let mut client = Client::hello(r, w, config).await?;
                    client.resumed = resumed;
                    Ok(client)
                }
            }
        };
        tokio::time::timeout(config.timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// A redemption on a connection of its own ([`Connector::redeem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    /// What the token revealed: the subject, the seq of the record read,
    /// and the masked fields.
    pub data: Redeemed,
    /// Whether the TLS handshake resumed an earlier session.
    pub tls_resumed: bool,
}

impl Connector {
    /// Redeems `token` as a partner does, on a new connection of its own:
    /// `Hello` and `Redeem` go out together in one write, `HelloOk` and
    /// `Data` are read back, and the connection is closed (the server
    /// closes its end after the data). One round trip after the
    /// handshakes where [`Connector::connect`] then [`Client::redeem`]
    /// take two, and no tasks. A refused key is [`ClientError::Server`]
    /// `unauthenticated` (the token is then never looked at); a refused
    /// token is [`ClientError::Server`] with the token's error code.
    ///
    /// ```no_run
    /// # async fn demo() -> client::Result<()> {
    /// use client::{ClientConfig, ClientError, Connector, ErrorCode, Tls, Zeroizing};
    /// // One connector for all of a partner's redemptions: TLS sessions resume.
    /// let partner = Connector::new(ClientConfig {
    ///     addr: "vault.example:9999".into(),
    ///     tls: Tls::Ca {
    ///         ca_pem_file: "vault-ca.pem".into(),
    ///         server_name: "vault.example".into(),
    ///         client_cert: None,
    ///     },
    ///     api_key: Zeroizing::new(std::env::var("FINTRUST_API_KEY").unwrap_or_default()),
    ///     ..ClientConfig::default()
    /// })?;
    /// match partner.redeem("fvt_...").await {
    ///     Ok(r) => println!("{} fields of {}", r.data.fields.len(), r.data.subject),
    ///     Err(ClientError::Server { code: ErrorCode::TokenSpent, .. }) => {
    ///         eprintln!("already redeemed: the data went out once, never again");
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn redeem(&self, token: &str) -> Result<Redemption> {
        let config = &self.config;
        let redeeming = async {
            let (stream, tls_resumed) = self.stream(true).await?;
            Ok(Redemption {
                data: redeem_on(stream, config, token).await?,
                tls_resumed,
            })
        };
        tokio::time::timeout(config.timeout, redeeming)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// `Hello` and `Redeem` in one write on `stream`, then their answers.
async fn redeem_on<S>(mut stream: S, config: &ClientConfig, token: &str) -> Result<Redeemed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Message::Hello {
        api_key: config.api_key.as_str().to_owned(),
        client: config.client_name.clone(),
    };
    let mut redeem = Message::Redeem {
        token: token.to_owned(),
    };
    // Sized for both frames, so that it never grows and leaves the key
    // behind in memory it frees.
    let frames_len = [hello.sensitive_len(), redeem.sensitive_len()]
        .iter()
        .map(|n| protocol::frame::HEADER_LEN + n.unwrap_or(0))
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(frames_len));
    let encoded = encode_frame(HELLO_ID, &hello, 0).and_then(|h| {
        let h = Zeroizing::new(h);
        out.extend_from_slice(&h);
        encode_frame(HELLO_ID + 1, &redeem, 0)
    });
    if let Message::Hello { api_key, .. } = &mut hello {
        api_key.zeroize();
    }
    if let Message::Redeem { token } = &mut redeem {
        token.zeroize();
    }
    out.extend_from_slice(&Zeroizing::new(encoded?));
    stream.write_all(&out).await?;
    stream.flush().await?;
    drop(out);

    // A `Data` frame is small: a small buffer to start with.
    let mut frames = FramedRead::with_capacity(&mut stream, MessageCodec::new(), 1024);
    let mut answer = async |id: u32, expected: &'static str| -> Result<Message> {
        let reply = next_answer(&mut frames).await?;
        // Id 0: an error about the connection itself, and nothing else.
        let connection_error =
            reply.request_id == 0 && matches!(reply.message, Message::Error { .. });
        if reply.request_id != id && !connection_error {
            return Err(ClientError::UnexpectedResponse(expected));
        }
        Ok(reply.message)
    };
    match answer(HELLO_ID, "HelloOk").await? {
        Message::HelloOk { .. } => {}
        other => return Err(refusal(other, "HelloOk")),
    }
    redeemed(answer(HELLO_ID + 1, "Data").await?)
}

/// The next frame read before the connection's reader task runs (the
/// answers to `Hello`, and a redemption's): [`ClientError::Closed`] at the
/// end of the stream, and a frame that does not decode told apart by
/// [`wrong_protocol`].
async fn next_answer<R: AsyncRead + Unpin>(
    frames: &mut FramedRead<R, MessageCodec>,
) -> Result<Envelope> {
    match frames.next().await {
        None => Err(ClientError::Closed),
        Some(Ok(reply)) => Ok(reply),
        Some(Err(e)) => Err(wrong_protocol(e.into(), frames.read_buffer())),
    }
}

/// `e`, a first answer that does not decode, told apart when `buffered`
/// (the bytes it came in) is in a protocol a misdirected client meets:
/// HTTP, from the shim's port or another web service, or TLS records, from
/// a TLS port reached in plaintext.
fn wrong_protocol(e: ClientError, buffered: &[u8]) -> ClientError {
    if !matches!(e, ClientError::Protocol(_)) {
        return e;
    }
    if buffered.starts_with(b"HTTP/") {
        ClientError::WrongProtocol(
            "the server answered in HTTP: is this the HTTP shim's port (8080 by default) \
             rather than the vault's (9999)?",
        )
    } else if let [0x15 | 0x16, 0x03, ..] = buffered {
        // A TLS alert or handshake record, of any TLS version.
        ClientError::WrongProtocol(
            "the server answered in TLS: connect with its CA certificate (--cacert, \
             FINTRUST_CACERT) rather than in plaintext",
        )
    } else {
        e
    }
}

/// The answer to a `Redeem`: its data, or the refusal.
fn redeemed(m: Message) -> Result<Redeemed> {
    match m {
        Message::Data {
            subject,
            seq,
            fields,
        } => Ok(Redeemed {
            subject,
            seq,
            fields,
        }),
        other => Err(refusal(other, "Data")),
    }
}

impl Client {
    /// Connects (TCP, then TLS unless [`Tls::Plaintext`]), sends `Hello`
    /// and waits for `HelloOk`, all within `config.timeout`. A key the
    /// server refuses is [`ClientError::Server`] with code
    /// `unauthenticated`.
    ///
    /// This reads the TLS files and builds a TLS configuration for this one
    /// connection. A caller that opens many connections (one per
    /// redemption, say) should make one [`Connector`] and connect through
    /// it, so that TLS sessions are resumed.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        Connector::new(config)?.connect().await
    }

    /// Authenticates on a byte stream the caller established (a Unix
    /// socket or an in-memory pipe, say), within `config.timeout`;
    /// `config.addr` and `config.tls` are not used. A server in the same
    /// process is reached without a stream by [`Client::direct`].
    pub async fn over<R, W>(reader: R, writer: W, config: &ClientConfig) -> Result<Client>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        tokio::time::timeout(config.timeout, Client::hello(reader, writer, config))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Authenticates on an established byte stream and starts the reader
    /// and writer tasks.
    pub(crate) async fn hello<R, W>(
        reader: R,
        mut writer: W,
        config: &ClientConfig,
    ) -> Result<Client>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut frames = FramedRead::new(reader, MessageCodec::new());
        let encoded = Zeroizing::new(hello_frame(config)?);
        writer.write_all(&encoded).await?;
        writer.flush().await?;
        drop(encoded);

        let reply = next_answer(&mut frames).await?;
        let shared = Arc::new(Shared::new(config.timeout));
        let (role, server) = hello_ok(reply)?;
        let (outgoing, queued) = mpsc::channel(OUTGOING_QUEUE);
        tokio::spawn(write_loop(writer, queued, shared.clone()));
        let reader = tokio::spawn(read_loop(frames, shared.clone()));
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        Ok(Client {
            shared,
            transport: Transport::Stream {
                outgoing,
                reader,
                sweeper,
            },
            role,
            server,
            resumed: false,
        })
    }

    /// Authenticates with a server in this process, reached through
    /// `server` (see [`Exchange`]), within `config.timeout`;
    /// `config.addr` and `config.tls` are not used. Requests then cost
    /// the server's work and no hand-off between tasks.
    pub async fn direct(server: Arc<dyn Exchange>, config: &ClientConfig) -> Result<Client> {
        // The server zeroizes the frame, which holds the API key, once read.
        let answer = tokio::time::timeout(config.timeout, server.exchange(hello_frame(config)?))
            .await
            .map_err(|_| ClientError::Timeout)?;
        let mut frames = bytes::BytesMut::from(&answer.frames[..]);
        let reply = match MessageCodec::new().decode(&mut frames)? {
            None => return Err(ClientError::Closed),
            Some(reply) => reply,
        };
        let (role, server_name) = hello_ok(reply)?;
        if answer.closed {
            return Err(ClientError::Closed);
        }
        Ok(Client {
            shared: Arc::new(Shared::new(config.timeout)),
            transport: Transport::Direct(server),
            role,
            server: server_name,
            resumed: false,
        })
    }

    /// The role of the API key, as `HelloOk` named it (`writer`, `admin`,
    /// `gateway`, `partner`, `auditor`).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// True when this connection's TLS handshake resumed an earlier
    /// session (see [`Connector`]); false for a full handshake or plaintext.
    pub fn tls_resumed(&self) -> bool {
        self.resumed
    }

    /// The server's name and version, as `HelloOk` named it.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// True once the connection has failed or been closed; every request
    /// then fails with [`ClientError::NotSent`].
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Appends one record and returns its receipt, once it is durable.
    /// Check the receipt with [`verify_receipt`](crate::verify_receipt).
    pub async fn append(
        &self,
        subject: impl Into<String>,
        fields: Vec<(String, String)>,
    ) -> Result<Receipt> {
        let m = Message::Append {
            subject: subject.into(),
            fields,
        };
        match self.call(m).await? {
            Message::Receipt { receipt } => Ok(Receipt::decode(&receipt)?),
            other => Err(refusal(other, "Receipt")),
        }
    }

    /// Appends several records in one commit; receipts in item order.
    /// All or none: one record refused refuses the batch.
    ///
    /// ```no_run
    /// # async fn demo(client: &client::Client) -> client::Result<()> {
    /// use client::Record;
    /// let receipts = client
    ///     .append_batch(vec![
    ///         Record { subject: "cust-1".into(), fields: vec![("name".into(), "Ada".into())] },
    ///         Record { subject: "cust-2".into(), fields: vec![("name".into(), "Alan".into())] },
    ///     ])
    ///     .await?;
    /// assert_eq!(receipts.len(), 2);
    /// # Ok(()) }
    /// ```
    pub async fn append_batch(&self, items: Vec<Record>) -> Result<Vec<Receipt>> {
        let n = items.len();
        match self.call(Message::AppendBatch { items }).await? {
            Message::Receipts { receipts } if receipts.len() == n => {
                let receipts = receipts
                    .iter()
                    .map(|r| Ok(Receipt::decode(r)?))
                    .collect::<Result<Vec<_>>>()?;
                // One entry each, in the batch's order: a receipt repeated
                // (each copy verifies) would prove one record for several.
                if receipts.windows(2).any(|w| w[1].seq <= w[0].seq) {
                    return Err(ClientError::UnexpectedResponse(
                        "receipts of distinct entries in the batch's order",
                    ));
                }
                Ok(receipts)
            }
            Message::Receipts { .. } => Err(ClientError::UnexpectedResponse(
                "one receipt per appended record",
            )),
            other => Err(refusal(other, "Receipts")),
        }
    }

    /// The vault's public key, entry count and signed head. The head is
    /// checked against the key sent with it, through the key chain (one
    /// more request), which proves only that the two agree: compare the
    /// key with a pinned one, and feed the head to a
    /// [`HeadTracker`](crate::HeadTracker).
    pub async fn head(&self) -> Result<HeadInfo> {
        match self.call(Message::Head).await? {
            Message::HeadInfo {
                public_key,
                entries,
                signed_head,
            } => {
                let signed_head = if signed_head.is_empty() {
                    None
                } else {
                    let head = SignedHead::decode(&signed_head)?;
                    if !self.key_chain(&public_key).await?.verify_head(&head) {
                        return Err(protocol::receipt::ReceiptError::BadSignature.into());
                    }
                    Some(head)
                };
                // The count is the server's word, not checked here against
                // the head: a verifier that finds them at odds has found
                // what it looks for, and says so in its own terms.
                Ok(HeadInfo {
                    public_key,
                    entries,
                    signed_head,
                })
            }
            other => Err(refusal(other, "HeadInfo")),
        }
    }

    /// Feeds `head`, read from this vault, to `tracker`, having checked
    /// that it is signed by a key of the vault's chain from `pinned` (one
    /// `KeyChain` request: a head signed by any other key, one that the
    /// server itself names included, never reaches the tracker, where a
    /// forged head far ahead would make every true one look rolled back)
    /// and that it extends the head kept there: not older
    /// ([`HeadTracker::check_not_rolled_back`](crate::HeadTracker::check_not_rolled_back)),
    /// and, when it is newer, with the kept head's entry still at the kept
    /// head's seq: the proof of that seq (one `Proof` request, checked
    /// through the key chain from `pinned`) must name the kept head's
    /// last hash. A vault restored from an older copy and grown past the
    /// kept head since presents heads that verify and do not go back, and
    /// is caught only so ([`ClientError::Rollback`]). `Proof` is for the
    /// auditor and admin roles: another role gets `forbidden` for a head
    /// newer than the one kept, and keeps
    /// [`HeadTracker::observe`](crate::HeadTracker::observe)'s check alone.
    /// A head signed by a key older than the kept head's is refused, and
    /// so is a key chain that no longer verifies the kept head (a fork
    /// signed with a stolen retired key, whose rotation the server leaves
    /// out of the chain it sends: [`ClientError::Rollback`]).
    pub async fn observe_head(
        &self,
        tracker: &mut crate::HeadTracker,
        head: &SignedHead,
        pinned: &[u8; 32],
    ) -> Result<()> {
        let chain = self.key_chain(pinned).await?;
        chain.key_for(head)?;
        if !chain.verify_head(head) {
            return Err(protocol::receipt::ReceiptError::BadSignature.into());
        }
        tracker.check_not_rolled_back(head)?;
        if let Some(kept) = tracker.newest().copied() {
            // Key ids grow with the seq: a head signed by a key retired
            // before the kept head's (a stolen one, with bounds of its
            // choosing) does not follow it.
            if head.key_id < kept.key_id {
                return Err(
                    protocol::receipt::ReceiptError::OutsideKeyLifetime(head.key_id).into(),
                );
            }
            // A chain served short of the kept head's key (its rotation
            // left out, so that a retired key seems current) is the
            // server's key chain rolled back.
            if !chain.verify_head(&kept) {
                return Err(ClientError::Rollback {
                    kept: kept.last_seq,
                    got: head.last_seq,
                });
            }
        }
        if let Some(kept) = tracker
            .newest()
            .copied()
            .filter(|kept| head.last_seq > kept.last_seq)
        {
            let proof = self.proof(kept.last_seq).await?;
            proof.verify_chain(&chain)?;
            if proof.entry_hash != kept.last_hash {
                return Err(ClientError::Rollback {
                    kept: kept.last_seq,
                    got: head.last_seq,
                });
            }
        }
        tracker.observe(head)
    }

    /// The receipt proving the entry at `seq`.
    pub async fn proof(&self, seq: u64) -> Result<Receipt> {
        match self.call(Message::Proof { seq }).await? {
            Message::ProofInfo { receipt } => {
                let receipt = Receipt::decode(&receipt)?;
                if receipt.seq != seq {
                    return Err(ClientError::UnexpectedResponse(
                        "a receipt for the seq asked",
                    ));
                }
                Ok(receipt)
            }
            other => Err(refusal(other, "ProofInfo")),
        }
    }

    /// The signed heads of the commit groups from the one holding
    /// `from_seq` on, in seq order, at most `max`; the server may answer
    /// fewer (it caps one request), and none past the end of the log. They
    /// are decoded, not checked: a verifier checks each against the
    /// entries of its group and the pinned key. More than `max` is a
    /// protocol violation.
    pub async fn heads(&self, from_seq: u64, max: u32) -> Result<Vec<SignedHead>> {
        match self.call(Message::Heads { from_seq, max }).await? {
            Message::HeadList { heads } => {
                if heads.len() > max as usize {
                    return Err(ClientError::UnexpectedResponse(
                        "no more heads than asked for",
                    ));
                }
                heads
                    .iter()
                    .map(|h| SignedHead::decode(h).map_err(ClientError::from))
                    .collect()
            }
            other => Err(refusal(other, "HeadList")),
        }
    }

    /// Up to `max` encoded entries from `from_seq` on, in seq order. The
    /// server may return fewer than `max` (it caps one request by count
    /// and by bytes), so page on until an empty answer. More than `max` is
    /// a protocol violation.
    pub async fn entries(&self, from_seq: u64, max: u32) -> Result<Vec<Vec<u8>>> {
        let (tx, rx) = oneshot::channel();
        let stream = Some(Vec::new());
        let max_len = usize::try_from(max).unwrap_or(usize::MAX);
        let timeout = self.shared.timeout;
        let id = self.shared.register(tx, stream, max_len, timeout)?;
        match self
            .exchange(id, rx, Message::Entries { from_seq, max }, timeout)
            .await?
        {
            Reply::Entries(entries) => Ok(entries),
            Reply::Message(other) => Err(refusal(other, "EntryBatch")),
        }
    }

    /// Appends an audit or admin event of entry kind `kind` (a storage
    /// kind byte: consent, policy, access denied) with a JSON object as
    /// payload; the server adds the caller's credential id to it.
    pub async fn event(
        &self,
        kind: u8,
        subject: impl Into<String>,
        payload: Vec<u8>,
    ) -> Result<Receipt> {
        let m = Message::Event {
            kind,
            subject: subject.into(),
            payload,
        };
        match self.call(m).await? {
            Message::Receipt { receipt } => Ok(Receipt::decode(&receipt)?),
            other => Err(refusal(other, "Receipt")),
        }
    }

    /// Who holds the API key whose BLAKE3 hash is `key_hash`; `None` when
    /// no credential has it. Gateway and admin roles.
    pub async fn whois(&self, key_hash: [u8; 32]) -> Result<Option<Identity>> {
        match self.call(Message::Whois { key_hash }).await? {
            Message::Identity { id, role, name } => Ok(Some(Identity { id, role, name })),
            other => not_found_or(other, "Identity"),
        }
    }

    /// [`Client::whois`] of `key_hash` and, when it names a partner, that
    /// partner's [`Client::policy`] and [`Client::consent`] of `subject`,
    /// in one round trip; `None` for an unknown key. Gateway and admin
    /// roles.
    pub async fn context(
        &self,
        key_hash: [u8; 32],
        subject: impl Into<String>,
    ) -> Result<Option<AuthorizeContext>> {
        let m = Message::Context {
            key_hash,
            subject: subject.into(),
        };
        let state = |s: Option<(u8, Vec<u8>)>| s.map(|(kind, value)| StateValue { kind, value });
        match self.call(m).await? {
            Message::ContextInfo(c) => {
                let c = *c;
                Ok(Some(AuthorizeContext {
                    identity: Identity {
                        id: c.id,
                        role: c.role,
                        name: c.name,
                    },
                    policy: state(c.policy),
                    consent: state(c.consent),
                }))
            }
            other => not_found_or(other, "ContextInfo"),
        }
    }

    /// The current policy of `partner_id`, if one was set.
    pub async fn policy(&self, partner_id: impl Into<String>) -> Result<Option<StateValue>> {
        let m = Message::GetPolicy {
            partner_id: partner_id.into(),
        };
        self.state_value(m).await
    }

    /// The latest consent event of `subject` for `partner_id`, if any.
    pub async fn consent(
        &self,
        subject: impl Into<String>,
        partner_id: impl Into<String>,
    ) -> Result<Option<StateValue>> {
        let m = Message::GetConsent {
            subject: subject.into(),
            partner_id: partner_id.into(),
        };
        self.state_value(m).await
    }

    async fn state_value(&self, m: Message) -> Result<Option<StateValue>> {
        match self.call(m).await? {
            Message::StateValue { kind, value } => Ok(Some(StateValue { kind, value })),
            other => not_found_or(other, "StateValue"),
        }
    }

    /// Creates an API key with `role`; returns its id and the key, which
    /// is shown this once. Admin role.
    pub async fn create_credential(
        &self,
        role: impl Into<String>,
        name: impl Into<String>,
    ) -> Result<(String, Secret)> {
        let m = Message::CreateCredential {
            role: role.into(),
            name: name.into(),
        };
        match self.call(m).await? {
            Message::CredentialKey { id, api_key } => Ok((id, Secret::from(api_key))),
            other => Err(refusal(other, "CredentialKey")),
        }
    }

    /// Creates a credential with `role` held by the client certificate
    /// whose DER has the SHA-256 `cert_sha256`: its holder connects over
    /// mutual TLS with that certificate and an empty API key. Returns the
    /// credential's id. Admin role.
    pub async fn create_cert_credential(
        &self,
        role: impl Into<String>,
        name: impl Into<String>,
        cert_sha256: [u8; 32],
    ) -> Result<String> {
        let m = Message::CreateCertCredential {
            role: role.into(),
            name: name.into(),
            cert_sha256,
        };
        match self.call(m).await? {
            Message::Identity { id, .. } => Ok(id),
            other => Err(refusal(other, "Identity")),
        }
    }

    /// Revokes a credential; `None` when there is no such credential.
    /// Admin role.
    pub async fn revoke_credential(&self, id: impl Into<String>) -> Result<Option<Receipt>> {
        match self
            .call(Message::RevokeCredential { id: id.into() })
            .await?
        {
            Message::Receipt { receipt } => Ok(Some(Receipt::decode(&receipt)?)),
            other => not_found_or(other, "Receipt"),
        }
    }

    /// Crypto-shreds `subject`: the vault destroys its data keys, so its
    /// records open under no key any more. Returns the receipt of the
    /// `subject_shredded` entry, once durable with the keys gone. Admin role.
    pub async fn shred(&self, subject: impl Into<String>) -> Result<Receipt> {
        let m = Message::Shred {
            subject: subject.into(),
        };
        match self.call(m).await? {
            Message::Receipt { receipt } => Ok(Receipt::decode(&receipt)?),
            other => Err(refusal(other, "Receipt")),
        }
    }

    /// Gives `subject` a new data key version; with `reencrypt`, its
    /// latest record is appended again under the new key. Admin role.
    pub async fn rotate_subject_key(
        &self,
        subject: impl Into<String>,
        reencrypt: bool,
    ) -> Result<Rotated> {
        let m = Message::RotateSubjectKey {
            subject: subject.into(),
            reencrypt,
        };
        match self.call(m).await? {
            Message::Rotated {
                version,
                receipt,
                reencrypted,
            } => Ok(Rotated {
                version,
                receipt: Receipt::decode(&receipt)?,
                reencrypted: if reencrypted.is_empty() {
                    None
                } else {
                    Some(Receipt::decode(&reencrypted)?)
                },
            }),
            other => Err(refusal(other, "Rotated")),
        }
    }

    /// Rotates the vault's signing key: the current key endorses a new one
    /// in a `key_rotated` entry and signs its group; later heads are
    /// signed by the new key. Admin role.
    pub async fn rotate_signing_key(&self) -> Result<SigningRotated> {
        match self.call(Message::RotateSigningKey).await? {
            Message::SigningRotated {
                receipt,
                endorsement,
            } => {
                let rotated = SigningRotated {
                    receipt: Receipt::decode(&receipt)?,
                    endorsement: KeyEndorsement::decode(&endorsement)?,
                };
                // The endorsement is the one of the entry the receipt proves.
                if rotated.endorsement.seq != rotated.receipt.seq {
                    return Err(ClientError::UnexpectedResponse(
                        "an endorsement of the seq its receipt proves",
                    ));
                }
                Ok(rotated)
            }
            other => Err(refusal(other, "SigningRotated")),
        }
    }

    /// Rotates the master key online to one sealed under `secret` (a
    /// passphrase, or a key file's contents); returns the receipt of the
    /// rotation's `master` entry. From then on only the new secret opens
    /// the vault. The secret crosses the connection: use TLS. Admin role.
    ///
    /// The vault seals the new key (a passphrase's key derivation takes
    /// seconds) and wraps every subject's data key under it, so this waits
    /// for its answer up to [`LONG_REQUEST_TIMEOUT`] (or the config's
    /// timeout when longer): a rotation answered late is still told.
    pub async fn rotate_master_key(&self, kind: SecretKind, secret: &[u8]) -> Result<Receipt> {
        let m = Message::RotateMasterKey {
            kind,
            secret: secret.to_vec(),
        };
        let reply = self.call_within(m, self.long_timeout()).await;
        match reply? {
            Message::Receipt { receipt } => Ok(Receipt::decode(&receipt)?),
            other => Err(refusal(other, "Receipt")),
        }
    }

    /// The vault's signing keys, checked from `pinned` (key 0, printed by
    /// `vaultd init`) through every endorsement the server sends. Any
    /// role.
    pub async fn key_chain(&self, pinned: &[u8; 32]) -> Result<KeyChain> {
        match self.call(Message::KeyChain).await? {
            Message::KeyChainInfo { endorsements } => {
                let endorsements = endorsements
                    .iter()
                    .map(|e| KeyEndorsement::decode(e))
                    .collect::<protocol::Result<Vec<_>>>()?;
                Ok(KeyChain::from_endorsements(
                    verifying_key(pinned)?,
                    &endorsements,
                )?)
            }
            other => Err(refusal(other, "KeyChainInfo")),
        }
    }

    /// Checks a receipt with the pinned key through the vault's key chain
    /// (one `KeyChain` request): signed by the key its head names, and
    /// for a group within the seqs that key signed, so that a key rotated
    /// away cannot vouch for a later group ([`KeyChain::key_for`]). The
    /// chain is the server's word past `pinned`: one that leaves a
    /// rotation out makes the retired key current again, so against a
    /// server holding a stolen retired key this check needs the chain
    /// checked against a head kept from before ([`Client::observe_head`]
    /// does). The offline [`verify_receipt`](crate::verify_receipt) has
    /// no chain and checks key 0's signature alone.
    pub async fn verify_receipt(&self, receipt: &Receipt, pinned: &[u8; 32]) -> Result<()> {
        receipt.verify_chain(&self.key_chain(pinned).await?)?;
        Ok(())
    }

    /// One page of the vault's key status: at most `max` subject keys
    /// after `after` (subject, version), in order. Admin role.
    pub async fn key_status_page(
        &self,
        after: Option<(String, u32)>,
        max: u16,
    ) -> Result<KeyStatus> {
        let (after_subject, after_version) = after.unwrap_or_default();
        let m = Message::KeyStatus {
            after_subject,
            after_version,
            max,
        };
        match self.call(m).await? {
            Message::KeyStatusInfo {
                master_created_ms,
                master_wraps,
                signing_created_ms,
                encryption_limit,
                keys,
                more,
                signing_key_id,
                max_signing_key_age_secs,
                max_subject_key_age_secs,
            } => Ok(KeyStatus {
                master_created_ms,
                master_wraps,
                signing_created_ms,
                encryption_limit,
                keys,
                more,
                signing_key_id,
                max_signing_key_age_secs,
                max_subject_key_age_secs,
            }),
            other => Err(refusal(other, "KeyStatusInfo")),
        }
    }

    /// The whole key status, page after page, at most [`MAX_LISTED`] keys
    /// (so that a server that never ends its pages cannot fill the
    /// memory; [`Client::for_each_key`] reads past it). Admin role.
    pub async fn key_status(&self) -> Result<KeyStatus> {
        let mut keys = Vec::new();
        let mut over = false;
        let mut status = self
            .for_each_key(None, |k| {
                over = keys.len() >= MAX_LISTED;
                keys.push(k);
                !over
            })
            .await?;
        if over {
            return Err(ClientError::UnexpectedResponse(
                "at most MAX_LISTED keys in all (for_each_key reads further)",
            ));
        }
        status.keys = keys;
        Ok(status)
    }

    /// The key status, its keys handed to `each` one at a time, page after
    /// page, from the first after `after` (subject, version) on, until
    /// `each` returns false or the keys end: it holds one page at a time,
    /// so a vault of any number of keys can be read through. Returns the
    /// status of the first page, without its keys (`more` false once the
    /// keys ended). Admin role.
    pub async fn for_each_key(
        &self,
        after: Option<(String, u32)>,
        mut each: impl FnMut(SubjectKey) -> bool,
    ) -> Result<KeyStatus> {
        let mut page = self.key_status_page(after.clone(), 0).await?;
        let mut status = KeyStatus {
            keys: Vec::new(),
            ..page.clone()
        };
        let mut cursor = after;
        loop {
            // Each page must hold keys after the cursor, in order, or paging
            // might never end.
            if let Some((subject, version)) = &cursor {
                let keys = page.keys.iter().map(|k| (k.subject.as_str(), k.version));
                if !ascending_after((subject.as_str(), *version), keys) {
                    return Err(ClientError::UnexpectedResponse(
                        "a page of keys in order after the previous one",
                    ));
                }
            }
            let more = page.more;
            let Some(last) = page.keys.last().map(|k| (k.subject.clone(), k.version)) else {
                if more {
                    return Err(ClientError::UnexpectedResponse(
                        "keys in a page that says more follow",
                    ));
                }
                status.more = false;
                return Ok(status);
            };
            for k in page.keys {
                if !each(k) {
                    status.more = true;
                    return Ok(status);
                }
            }
            if !more {
                status.more = false;
                return Ok(status);
            }
            cursor = Some(last);
            page = self.key_status_page(cursor.clone(), 0).await?;
        }
    }

    /// One page of credentials: at most `max` (0: the server's maximum)
    /// after `after_id`, in id order, revoked ones included; and whether
    /// more follow. Admin role.
    pub async fn credentials_page(
        &self,
        after_id: Option<String>,
        max: u16,
    ) -> Result<(Vec<CredentialInfo>, bool)> {
        let m = Message::ListCredentials {
            after_id: after_id.unwrap_or_default(),
            max,
        };
        match self.call(m).await? {
            Message::CredentialList { credentials, more } => Ok((credentials, more)),
            other => Err(refusal(other, "CredentialList")),
        }
    }

    /// Every credential, page after page, in id order, at most
    /// [`MAX_LISTED`]. Admin role.
    pub async fn credentials(&self) -> Result<Vec<CredentialInfo>> {
        let (mut all, mut more) = self.credentials_page(None, 0).await?;
        while more {
            let Some(last) = all.last().map(|c| c.id.clone()) else {
                return Err(ClientError::UnexpectedResponse(
                    "credentials in a page that says more follow",
                ));
            };
            let (page, next) = self.credentials_page(Some(last.clone()), 0).await?;
            // Each page must hold credentials after the last one's, in
            // order, and an empty one must be the last, or paging might
            // never end.
            if !ascending_after(last.as_str(), page.iter().map(|c| c.id.as_str()))
                || (page.is_empty() && next)
            {
                return Err(ClientError::UnexpectedResponse(
                    "a page of credentials in order after the previous one",
                ));
            }
            all.extend(page);
            more = next;
            if all.len() > MAX_LISTED {
                return Err(ClientError::UnexpectedResponse(
                    "at most MAX_LISTED credentials in all (credentials_page reads further)",
                ));
            }
        }
        Ok(all)
    }

    /// Asks the server to rebuild its derived state from the log and
    /// compare it with the stored state; it changes nothing. Admin role.
    ///
    /// The vault reads its whole log for it, so this waits for its answer
    /// up to [`LONG_REQUEST_TIMEOUT`] (or the config's timeout when
    /// longer).
    pub async fn reindex(&self) -> Result<ReindexReport> {
        match self
            .call_within(Message::Reindex, self.long_timeout())
            .await?
        {
            Message::ReindexReport {
                entries,
                keys_compared,
                differences,
                sample,
            } => Ok(ReindexReport {
                entries,
                keys_compared,
                differences,
                sample,
            }),
            other => Err(refusal(other, "ReindexReport")),
        }
    }

    /// The deadline of the requests that work through the whole vault:
    /// [`LONG_REQUEST_TIMEOUT`], or the config's timeout when longer.
    fn long_timeout(&self) -> Duration {
        self.shared.timeout.max(LONG_REQUEST_TIMEOUT)
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<()> {
        match self.call(Message::Ping).await? {
            Message::Pong => Ok(()),
            other => Err(refusal(other, "Pong")),
        }
    }

    /// The server's status, entry count and log head.
    pub async fn health(&self) -> Result<Health> {
        match self.call(Message::Health).await? {
            Message::HealthInfo {
                status,
                entries,
                signed_head,
            } => {
                let head = if signed_head.is_empty() {
                    None
                } else {
                    Some(SignedHead::decode(&signed_head)?)
                };
                if entries != head.map_or(0, |h| h.last_seq.saturating_add(1)) {
                    return Err(ClientError::UnexpectedResponse(
                        "an entry count that is the head's last seq + 1",
                    ));
                }
                Ok(Health {
                    status,
                    entries,
                    head,
                })
            }
            other => Err(refusal(other, "HealthInfo")),
        }
    }

    /// Asks for a one-time token that shows `fields` of `subject`, masked
    /// as given, to `partner_id` for `purpose`, valid `ttl_secs`. Returns
    /// the token (a secret: hand it to the partner only; zeroized when
    /// dropped) and when it expires, in unix milliseconds. Gateway and admin roles.
    /// `ttl_secs` 0 asks for the server's default (5 minutes, or its
    /// maximum where that is lower).
    ///
    /// ```no_run
    /// # async fn demo(gateway: &client::Client) -> client::Result<()> {
    /// use client::MaskOp;
    /// let fields = vec![("email".into(), MaskOp::Partial), ("dob".into(), MaskOp::Generalize)];
    /// let (token, expires_at_ms) = gateway
    ///     .mint("demo-lender", "cust-0001", "credit_check", fields, 0)
    ///     .await?;
    /// # let _ = (token, expires_at_ms);
    /// # Ok(()) }
    /// ```
    pub async fn mint(
        &self,
        partner_id: impl Into<String>,
        subject: impl Into<String>,
        purpose: impl Into<String>,
        fields: Vec<(String, MaskOp)>,
        ttl_secs: u32,
    ) -> Result<(Secret, u64)> {
        let m = Message::Mint {
            partner_id: partner_id.into(),
            subject: subject.into(),
            purpose: purpose.into(),
            fields,
            ttl_secs,
        };
        match self.call(m).await? {
            Message::Minted {
                token,
                expires_at_ms,
            } => Ok((Secret::from(token), expires_at_ms)),
            other => Err(refusal(other, "Minted")),
        }
    }

    /// Spends `token` for the masked segment it reveals. The server closes
    /// the connection after answering a redemption, so this consumes the
    /// client. Partner role.
    pub async fn redeem(self, token: &str) -> Result<Redeemed> {
        let m = Message::Redeem {
            token: token.to_owned(),
        };
        redeemed(self.call(m).await?)
    }

    /// Sends a request answered by one frame and returns that frame's
    /// message (an `Error` included).
    async fn call(&self, message: Message) -> Result<Message> {
        self.call_within(message, self.shared.timeout).await
    }

    /// [`Client::call`] of a request that may take up to `timeout`, for
    /// the long ones ([`LONG_REQUEST_TIMEOUT`]).
    async fn call_within(&self, message: Message, timeout: Duration) -> Result<Message> {
        let (tx, rx) = oneshot::channel();
        let id = self.shared.register(tx, None, 0, timeout)?;
        match self.exchange(id, rx, message, timeout).await? {
            Reply::Message(m) => Ok(m),
            Reply::Entries(_) => Err(ClientError::UnexpectedResponse("one response frame")),
        }
    }

    /// Encodes and queues the request registered under `id`, then waits
    /// for its answer, until its deadline (see the module doc; a direct
    /// exchange has a timer of its own, of `timeout`). On any early return
    /// the id is unregistered.
    async fn exchange(
        &self,
        id: u32,
        mut rx: oneshot::Receiver<Result<Reply>>,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Reply> {
        let mut registered = Registered {
            shared: &self.shared,
            id,
            answered: false,
        };
        let frame = encode_frame(id, &message, 0);
        // An API key, a token or a master secret is in the frame only.
        message.wipe();
        drop(message);
        let frame = frame?;
        match &self.transport {
            Transport::Stream { outgoing, .. } => {
                match outgoing.try_send(frame) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(ClientError::NotSent),
                    // Waiting for room in the queue ends too when the
                    // request is failed at its deadline.
                    Err(mpsc::error::TrySendError::Full(frame)) => tokio::select! {
                        sent = outgoing.send(frame) => sent.map_err(|_| ClientError::NotSent)?,
                        // Failed while it waited for room (the connection
                        // failed, or its deadline passed): never queued.
                        answer = &mut rx => {
                            registered.answered = true;
                            return match answer {
                                Ok(Ok(reply)) => Ok(reply),
                                Ok(Err(_)) | Err(_) => Err(ClientError::NotSent),
                            };
                        }
                    },
                }
                let answer = rx.await;
                registered.answered = true;
                answer.map_err(|_| ClientError::Closed)?
            }
            Transport::Direct(server) => {
                let answered = async {
                    let answer = server.exchange(frame).await;
                    self.shared.deliver_all(answer);
                    rx.await.map_err(|_| ClientError::Closed)?
                };
                tokio::time::timeout(timeout, answered)
                    .await
                    .map_err(|_| ClientError::Timeout)?
            }
        }
    }
}

/// The error an answer of the wrong kind stands for: the server's own
/// words for an `Error`, otherwise what was expected.
/// `Ok(None)` for a `not_found` error, otherwise as [`refusal`].
fn not_found_or<T>(m: Message, expected: &'static str) -> Result<Option<T>> {
    match m {
        Message::Error {
            code: ErrorCode::NotFound,
            ..
        } => Ok(None),
        other => Err(refusal(other, expected)),
    }
}

/// The `Hello` frame of `config`'s API key (zeroize it after use).
fn hello_frame(config: &ClientConfig) -> Result<Vec<u8>> {
    let mut hello = Message::Hello {
        api_key: config.api_key.as_str().to_owned(),
        client: config.client_name.clone(),
    };
    let encoded = encode_frame(HELLO_ID, &hello, 0);
    if let Message::Hello { api_key, .. } = &mut hello {
        api_key.zeroize();
    }
    Ok(encoded?)
}

/// The role and server name of a `HelloOk`, or why there is none.
fn hello_ok(reply: Envelope) -> Result<(String, String)> {
    // Id 0 is the server's for errors about the connection, and only those.
    let connection_error = reply.request_id == 0 && matches!(reply.message, Message::Error { .. });
    if reply.request_id != HELLO_ID && !connection_error {
        return Err(ClientError::UnexpectedResponse("HelloOk"));
    }
    match reply.message {
        Message::HelloOk { role, server } => Ok((role, server)),
        other => Err(refusal(other, "HelloOk")),
    }
}

fn refusal(m: Message, expected: &'static str) -> ClientError {
    match m {
        Message::Error { code, message } => ClientError::Server { code, message },
        _ => ClientError::UnexpectedResponse(expected),
    }
}

/// What the reader hands a waiting caller.
#[derive(Debug)]
enum Reply {
    /// The one frame answering a request (or the `Error` ending a stream).
    Message(Message),
    /// Every entry of an `Entries` stream, once `LAST` arrived.
    Entries(Vec<Vec<u8>>),
}

/// The most bytes of entries one `Entries` answer may carry: a server
/// that sends more is refused with `UnexpectedResponse` (the request
/// fails, the connection stays open), so that a hostile server cannot
/// make a verifier hold `max` entries of a whole frame each. Eight times
/// what `vaultd` sends at most by default (its `max_entries_bytes`).
pub const MAX_ENTRIES_BYTES: usize = 64 * 1024 * 1024;

/// Most keys [`Client::key_status`], and most credentials
/// [`Client::credentials`], gather page after page: ten million, about a
/// gigabyte, far past any vault's credentials, and past the subjects of
/// most (page by page with [`Client::key_status_page`] for more).
pub const MAX_LISTED: usize = 10_000_000;

/// A caller waiting for its answer.
struct Pending {
    reply: oneshot::Sender<Result<Reply>>,
    /// `Some` for an `Entries` request: entries collected so far.
    stream: Option<Vec<Vec<u8>>>,
    /// Most entries the stream may carry (what was asked for).
    max: usize,
    /// Memory the entries collected so far hold, their `Vec`s counted (at
    /// most [`MAX_ENTRIES_BYTES`]).
    held: usize,
    /// When the connection's sweeper task fails it with
    /// [`ClientError::Timeout`].
    deadline: Instant,
    /// When it was registered, to tell whether the server was heard from
    /// since.
    sent: Instant,
    /// A request that may take longer than the connection's timeout
    /// ([`LONG_REQUEST_TIMEOUT`]): while one waits, a server that answers
    /// nothing else may be busy with it, not stalled.
    long: bool,
}

/// State shared by callers and the reader task.
struct Shared {
    state: Mutex<State>,
    /// How long a request may wait for its answer.
    timeout: Duration,
}

/// Invariant: `closed` implies `pending` is empty, and no id is ever in
/// `pending` twice (ids are allocated under the same lock that inserts them).
struct State {
    pending: HashMap<u32, Pending>,
    /// The last request id handed out; ids wrap around, skipping 0 (the
    /// server's id for errors it cannot tie to a request) and ids in use.
    last_id: u32,
    closed: bool,
    /// When the last frame came from the server (or the connection was
    /// made).
    heard: Instant,
}

impl Shared {
    fn new(timeout: Duration) -> Shared {
        Shared {
            timeout,
            state: Mutex::new(State {
                pending: HashMap::new(),
                last_id: HELLO_ID,
                closed: false,
                heard: Instant::now(),
            }),
        }
    }

    /// Routes the frames of a direct exchange as the reader task routes
    /// those of a stream, and closes when they do not decode or the server
    /// ended the connection.
    /// The frames are decoded where they lie (a copy would keep a
    /// redemption's fields in memory freed unwiped), each frame's payload
    /// wiped once its message is decoded; [`Exchanged`] wipes the rest.
    fn deliver_all(&self, answer: Exchanged) {
        let mut rest = &answer.frames[..];
        while !rest.is_empty() {
            let decoded = match protocol::frame::decode_with_max(rest, protocol::MAX_FRAME_LEN) {
                Ok(Some((mut frame, used))) => {
                    rest = rest.get(used..).unwrap_or_default();
                    let envelope = Message::from_frame(&frame).map(|message| Envelope {
                        request_id: frame.request_id,
                        last: frame.is_last(),
                        message,
                    });
                    frame.payload.zeroize();
                    envelope
                }
                Ok(None) => {
                    self.close(&ClientError::UnexpectedResponse("whole frames"));
                    return;
                }
                Err(e) => Err(e),
            };
            match decoded {
                Ok(envelope) => self.deliver(envelope),
                Err(e) => {
                    self.close(&ClientError::from(e));
                    return;
                }
            }
        }
        if answer.closed {
            self.close(&ClientError::Closed);
        }
    }

    /// Critical sections are a few map operations that cannot panic, so a
    /// poisoned lock holds consistent state and is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Allocates a request id and registers a caller waiting on `reply`
    /// under it, with its deadline `timeout` from now.
    fn register(
        &self,
        reply: oneshot::Sender<Result<Reply>>,
        stream: Option<Vec<Vec<u8>>>,
        max: usize,
        timeout: Duration,
    ) -> Result<u32> {
        let sent = Instant::now();
        let pending = Pending {
            reply,
            stream,
            max,
            held: 0,
            // A config that skipped `validate` may hold any timeout: one
            // past what an instant holds is taken as ten years.
            deadline: sent
                .checked_add(timeout)
                .unwrap_or_else(|| sent + TEN_YEARS),
            sent,
            long: timeout > self.timeout,
        };
        let mut state = self.lock();
        if state.closed {
            return Err(ClientError::NotSent);
        }
        let mut id = state.last_id;
        loop {
            id = id.wrapping_add(1);
            if id != 0 && !state.pending.contains_key(&id) {
                break;
            }
        }
        state.last_id = id;
        state.pending.insert(id, pending);
        Ok(id)
    }

    /// Routes one response to the caller waiting for it.
    fn deliver(&self, envelope: Envelope) {
        if envelope.request_id == 0 {
            // An error the server could not tie to a request: it closes
            // the connection after it, and every waiting caller is told why.
            let why = refusal(envelope.message, "an Error for request id 0");
            self.close(&why);
            return;
        }
        let mut state = self.lock();
        state.heard = Instant::now();
        let id = envelope.request_id;
        let Some(pending) = state.pending.get_mut(&id) else {
            // The answer to a request its caller gave up on.
            return;
        };
        let outcome = match (&mut pending.stream, envelope.message) {
            (Some(entries), Message::EntryBatch { entries: batch }) => {
                // Each entry as it is held: its bytes and its `Vec`, so
                // that empty entries count too.
                pending.held = batch.iter().fold(pending.held, |n, e| {
                    n.saturating_add(e.len() + std::mem::size_of::<Vec<u8>>())
                });
                entries.extend(batch);
                if entries.len() > pending.max {
                    Some(Err(ClientError::UnexpectedResponse(
                        "at most the number of entries asked for",
                    )))
                } else if pending.held > MAX_ENTRIES_BYTES {
                    Some(Err(ClientError::UnexpectedResponse(
                        "at most 64 MiB of entries in one answer",
                    )))
                } else if envelope.last {
                    Some(Ok(Reply::Entries(std::mem::take(entries))))
                } else {
                    None
                }
            }
            (_, m) => Some(Ok(Reply::Message(m))),
        };
        if let Some(outcome) = outcome {
            if let Some(pending) = state.pending.remove(&id) {
                // The caller may have stopped waiting; nothing to do then.
                let _ = pending.reply.send(outcome);
            }
        }
    }

    /// Fails every request whose deadline is `now` or earlier with
    /// [`ClientError::Timeout`]; and when nothing was heard from the
    /// server since one of them was sent, and no long request is waiting,
    /// closes the connection, failing the others with `Timeout` too (see
    /// the module docs).
    fn expire(&self, now: Instant) {
        let (expired, stalled) = {
            let mut state = self.lock();
            let heard = state.heard;
            let expired: Vec<Pending> = state
                .pending
                .extract_if(|_, p| p.deadline <= now)
                .map(|(_, p)| p)
                .collect();
            // Not while a long request waits: the server may be busy with
            // it (appends wait for a master rotation's group, say).
            let stalled =
                expired.iter().any(|p| p.sent >= heard) && !state.pending.values().any(|p| p.long);
            (expired, stalled)
        };
        for p in expired {
            let _ = p.reply.send(Err(ClientError::Timeout));
        }
        if stalled {
            self.close(&ClientError::Timeout);
        }
    }

    /// Marks the connection closed and fails every waiting caller with `why`.
    fn close(&self, why: &ClientError) {
        let pending: Vec<Pending> = {
            let mut state = self.lock();
            state.closed = true;
            state.pending.drain().map(|(_, p)| p).collect()
        };
        for p in pending {
            let _ = p.reply.send(Err(replicate(why)));
        }
    }
}

/// Unregisters a request when its caller stops waiting before its
/// answer (an error, or its future dropped).
struct Registered<'a> {
    shared: &'a Shared,
    id: u32,
    /// Its receiver resolved: whoever answered (the reader, the sweeper,
    /// a close) took the request out of `pending` before sending or
    /// dropping its sender, so there is nothing to remove, and the lock
    /// is not taken a third time for the request.
    answered: bool,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.lock().pending.remove(&self.id);
        }
    }
}

/// A copy of `e` for each of several waiting callers (`io::Error` is not
/// `Clone`; its kind and text are kept).
fn replicate(e: &ClientError) -> ClientError {
    use protocol::Error as P;
    match e {
        ClientError::Io(io) => ClientError::Io(std::io::Error::new(io.kind(), io.to_string())),
        ClientError::Tls(s) => ClientError::Tls(s.clone()),
        ClientError::Protocol(p) => ClientError::Protocol(match p {
            P::FrameTooLarge { len, max } => P::FrameTooLarge {
                len: *len,
                max: *max,
            },
            P::BadMagic => P::BadMagic,
            P::UnsupportedVersion(v) => P::UnsupportedVersion(*v),
            P::UnknownType(t) => P::UnknownType(*t),
            P::BadFlags => P::BadFlags,
            P::CrcMismatch => P::CrcMismatch,
            P::Malformed(m) => P::Malformed(m),
            P::TrailingBytes => P::TrailingBytes,
            P::Io(io) => P::Io(std::io::Error::new(io.kind(), io.to_string())),
        }),
        ClientError::Server { code, message } => ClientError::Server {
            code: *code,
            message: message.clone(),
        },
        ClientError::UnexpectedResponse(s) => ClientError::UnexpectedResponse(s),
        ClientError::WrongProtocol(s) => ClientError::WrongProtocol(s),
        ClientError::Timeout => ClientError::Timeout,
        ClientError::Closed => ClientError::Closed,
        ClientError::NotSent => ClientError::NotSent,
        ClientError::BadReceipt(r) => ClientError::BadReceipt(*r),
        ClientError::BadKeyChain(c) => ClientError::BadKeyChain(*c),
        ClientError::Rollback { kept, got } => ClientError::Rollback {
            kept: *kept,
            got: *got,
        },
        ClientError::Config(s) => ClientError::Config(s.clone()),
    }
}

/// Fails the requests past their deadline, every eighth of the timeout,
/// until the connection is closed.
async fn sweep_loop(shared: Arc<Shared>) {
    // A period of zero would make `interval` panic.
    let every = (shared.timeout / SWEEPS_PER_TIMEOUT).max(Duration::from_millis(1));
    let mut sweeps = tokio::time::interval(every);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Expired against the time now, not the tick's scheduled one,
        // which lags behind after the runtime stalled.
        sweeps.tick().await;
        if shared.lock().closed {
            return;
        }
        shared.expire(tokio::time::Instant::now());
    }
}

/// Decodes responses until the stream ends or fails, then closes.
async fn read_loop<R>(mut frames: FramedRead<R, MessageCodec>, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin,
{
    loop {
        match frames.next().await {
            Some(Ok(envelope)) => shared.deliver(envelope),
            Some(Err(e)) => {
                // A frame that does not decode: the stream is out of step.
                shared.close(&ClientError::from(e));
                return;
            }
            None => {
                shared.close(&ClientError::Closed);
                return;
            }
        }
    }
}

/// Writes queued frames, flushing once per burst of frames that were
/// queued together. A write or flush that cannot finish within the
/// connection's timeout means the server stopped reading: the connection is closed rather than
/// left to hang. (The limit is per frame, not per burst, so a long burst
/// to a slow but live server is not cut off.)
async fn write_loop<W>(writer: W, mut queued: mpsc::Receiver<Vec<u8>>, shared: Arc<Shared>)
where
    W: AsyncWrite + Unpin,
{
    let timeout = shared.timeout;
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(first) = queued.recv().await {
        let mut next = Some(first);
        let mut result = Ok(());
        while let Some(mut frame) = next.take() {
            if protocol::frame::encoded_carries_secret(&frame) {
                // Not through the buffer, whose memory keeps what it held:
                // what came before it first, then the frame itself, then
                // its bytes are zeroized.
                result = match within(timeout, w.flush()).await {
                    Ok(()) => within(timeout, w.get_mut().write_all(&frame)).await,
                    Err(e) => Err(e),
                };
                frame.zeroize();
            } else if w.buffer().len() + frame.len() < WRITE_BUFFER {
                // Copied into the buffer, no I/O: nothing to time.
                result = w.write_all(&frame).await.map_err(ClientError::from);
            } else {
                result = within(timeout, w.write_all(&frame)).await;
            }
            if result.is_err() {
                break;
            }
            next = queued.try_recv().ok();
            if next.is_none() {
                // Callers woken together (by one burst of answers) queue
                // their next requests together: let them run once before
                // writing, so the requests leave in one write.
                tokio::task::yield_now().await;
                next = queued.try_recv().ok();
            }
        }
        if result.is_ok() {
            result = within(timeout, w.flush()).await;
        }
        if let Err(why) = result {
            shared.close(&why);
            return;
        }
    }
    // Every sender is gone (the client was dropped): end the stream
    // cleanly, with a TLS close_notify where there is TLS.
    let _ = tokio::time::timeout(timeout, w.shutdown()).await;
}

/// An I/O step that must finish within `timeout`.
async fn within(
    timeout: Duration,
    step: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<()> {
    match tokio::time::timeout(timeout, step).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ClientError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page that is empty, goes back, repeats an item or starts at the
    /// cursor would let a paging loop run for ever: each is refused.
    #[test]
    fn a_page_must_hold_items_in_order_after_the_cursor() {
        assert!(ascending_after(3, [4, 5, 9]));
        // Nothing after the cursor (a cursor past the last item, or items
        // removed since the page before): the end, unless the page says
        // more follow, which its caller refuses.
        assert!(ascending_after(3, []));
        assert!(!ascending_after(3, [3, 4]));
        assert!(!ascending_after(3, [5, 4]));
        assert!(!ascending_after(3, [4, 4]));
        assert!(ascending_after(("a", 2), [("a", 3), ("b", 1)]));
        assert!(!ascending_after(("b", 1), [("a", 3)]));
    }
    use futures_util::SinkExt;
    use protocol::ErrorCode;
    use tokio::io::DuplexStream;
    use tokio_util::codec::Framed;

    type Peer = Framed<DuplexStream, MessageCodec>;

    /// A connection the client keeps probes an idle peer, so that one gone
    /// without a reset fails it even while a long request waits; a
    /// redemption's connection of one write does not.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_kept_connection_sends_keepalive_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let connector = Connector::new(ClientConfig {
            addr: listener.local_addr().expect("addr").to_string(),
            tls: Tls::Plaintext,
            api_key: Zeroizing::new("fvk_test".into()),
            ..ClientConfig::default()
        })
        .expect("connector");
        for (one_write, probes) in [(false, true), (true, false)] {
            let (stream, resumed) = connector.stream(one_write).await.expect("connect");
            assert!(!resumed);
            let Either::Left(tcp) = stream else {
                panic!("a plaintext stream");
            };
            let sock = socket2::SockRef::from(&tcp);
            assert_eq!(sock.keepalive().expect("SO_KEEPALIVE"), probes);
            if probes {
                assert_eq!(sock.tcp_keepalive_time().expect("idle"), KEEPALIVE_IDLE);
                assert_eq!(
                    sock.tcp_keepalive_interval().expect("interval"),
                    KEEPALIVE_INTERVAL
                );
                assert_eq!(
                    sock.tcp_keepalive_retries().expect("probes"),
                    KEEPALIVE_PROBES
                );
            }
            let limit = sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT");
            assert_eq!(limit, probes.then_some(Duration::from_secs(60)));
        }
    }

    /// A fork signed by a retired key: a head of the old key past the
    /// kept head of the new one is refused, whether the server sends the
    /// rotation in its key chain or leaves it out, and so is one of a key
    /// the old one endorsed in the new one's place (a forked chain); the
    /// tracker keeps its head.
    #[tokio::test]
    async fn a_head_of_a_retired_key_does_not_follow_the_kept_one() {
        use ed25519_dalek::SigningKey;
        let (old, new, other) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
            SigningKey::from_bytes(&[9; 32]),
        );
        let rotation = KeyEndorsement::sign(&old, 1, &new.verifying_key(), 10);
        let forked = KeyEndorsement::sign(&old, 1, &other.verifying_key(), 10);
        let kept = SignedHead::sign(&new, 1, 11, 20, [3; 32], [4; 32], 1_000);
        let retired = |first| SignedHead::sign(&old, 0, first, 30, [5; 32], [6; 32], 2_000);
        let cases = [
            // The rotation left out: the old key seems current.
            (vec![], retired(21), false),
            // The whole chain, and bounds inside the old key's lifetime.
            (vec![rotation.encode()], retired(5), false),
            // Another key endorsed by the old one as key 1.
            (
                vec![forked.encode()],
                SignedHead::sign(&other, 1, 21, 30, [5; 32], [6; 32], 2_000),
                true,
            ),
        ];
        for (served, head, rolled_back) in cases {
            let (client, mut peer) = pair(Duration::from_secs(5)).await;
            let mut tracker = crate::HeadTracker::new();
            tracker.observe(&kept).expect("the kept head");
            let server = tokio::spawn(async move {
                let req = next_request(&mut peer).await;
                assert!(matches!(req.message, Message::KeyChain), "{req:?}");
                let answer = Message::KeyChainInfo {
                    endorsements: served,
                };
                peer.send((req.request_id, answer)).await.expect("send");
                peer
            });
            let r = client
                .observe_head(&mut tracker, &head, &old.verifying_key().to_bytes())
                .await;
            if rolled_back {
                assert!(
                    matches!(r, Err(ClientError::Rollback { kept: 20, got: 30 })),
                    "{r:?}"
                );
            } else {
                assert!(matches!(r, Err(ClientError::BadReceipt(_))), "{r:?}");
            }
            assert_eq!(tracker.newest(), Some(&kept));
            drop(server.await.expect("join"));
        }
    }

    /// Another key on the same connector is checked as a new connector's
    /// is: none at all, or one too long to send, is a `Config` error.
    #[test]
    fn another_key_is_checked_as_the_first() {
        let connector = Connector::new(ClientConfig {
            addr: "127.0.0.1:9999".into(),
            tls: Tls::Plaintext,
            api_key: Zeroizing::new("fvk_first".into()),
            ..ClientConfig::default()
        })
        .expect("connector");
        let other = connector
            .with_key(Zeroizing::new("fvk_second".into()), "caller".into())
            .expect("another key");
        assert_eq!(other.config.api_key.as_str(), "fvk_second");
        assert_eq!(other.config.addr, "127.0.0.1:9999");
        for (key, name) in [
            (String::new(), String::new()),
            ("k".repeat(1 << 16), String::new()),
            ("fvk_third".into(), "n".repeat(1 << 16)),
        ] {
            assert!(matches!(
                connector.with_key(Zeroizing::new(key), name),
                Err(ClientError::Config(_))
            ));
        }
    }

    /// A client over an in-memory pipe, and the server's end of it, past
    /// a `HelloOk` for role `admin`.
    async fn pair(timeout: Duration) -> (Client, Peer) {
        let (near, far) = tokio::io::duplex(1 << 16);
        let mut peer = Framed::new(far, MessageCodec::new());
        let config = ClientConfig {
            api_key: Zeroizing::new("fvk_test".into()),
            timeout,
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        };
        let (r, w) = tokio::io::split(near);
        let connecting = tokio::spawn(async move { Client::hello(r, w, &config).await });
        let hello = peer.next().await.expect("a frame").expect("decodes");
        assert_eq!(hello.request_id, HELLO_ID);
        assert!(
            matches!(hello.message, Message::Hello { ref api_key, .. } if api_key == "fvk_test")
        );
        let ok = Message::HelloOk {
            role: "admin".into(),
            server: "fake".into(),
        };
        peer.send((HELLO_ID, ok)).await.expect("send");
        let client = connecting.await.expect("join").expect("hello");
        assert_eq!(client.role(), "admin");
        (client, peer)
    }

    /// A `ping` of `client`'s in a task of its own.
    fn spawn_ping(client: &Arc<Client>) -> JoinHandle<Result<()>> {
        let c = client.clone();
        tokio::spawn(async move { c.ping().await })
    }

    async fn next_request(peer: &mut Peer) -> Envelope {
        peer.next().await.expect("a request").expect("decodes")
    }

    /// A server of direct exchanges that answers `HelloOk`, then each
    /// request with what `answer` makes of it.
    struct Scripted<F>(F);

    impl<F> Exchange for Scripted<F>
    where
        F: Fn(Envelope) -> Exchanged + Send + Sync + 'static,
    {
        fn exchange(&self, frame: Vec<u8>) -> futures_util::future::BoxFuture<'_, Exchanged> {
            let mut buf = bytes::BytesMut::from(&frame[..]);
            let request = MessageCodec::new()
                .decode(&mut buf)
                .expect("decodes")
                .expect("whole");
            let answer = match request.message {
                Message::Hello { .. } => Exchanged {
                    frames: encode_frame(
                        request.request_id,
                        &Message::HelloOk {
                            role: "admin".into(),
                            server: "fake".into(),
                        },
                        0,
                    )
                    .expect("encode"),
                    closed: false,
                },
                _ => (self.0)(request),
            };
            Box::pin(async move { answer })
        }
    }

    async fn direct<F>(answer: F) -> Client
    where
        F: Fn(Envelope) -> Exchanged + Send + Sync + 'static,
    {
        let config = ClientConfig {
            api_key: Zeroizing::new("fvk_test".into()),
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        };
        Client::direct(Arc::new(Scripted(answer)), &config)
            .await
            .expect("hello")
    }

    #[tokio::test]
    async fn a_direct_client_delivers_answers_and_closes_on_what_does_not_decode() {
        // Answers by request id, several frames of a stream as one list.
        let client = direct(|r| {
            let frames = match r.message {
                Message::Ping => encode_frame(r.request_id, &Message::Pong, 0),
                _ => {
                    let mut out = encode_frame(
                        r.request_id,
                        &Message::EntryBatch {
                            entries: vec![b"a".to_vec()],
                        },
                        0,
                    )
                    .expect("encode");
                    out.extend(
                        encode_frame(
                            r.request_id,
                            &Message::EntryBatch {
                                entries: vec![b"b".to_vec()],
                            },
                            protocol::FLAG_LAST,
                        )
                        .expect("encode"),
                    );
                    Ok(out)
                }
            };
            Exchanged {
                frames: frames.expect("encode"),
                closed: false,
            }
        })
        .await;
        client.ping().await.expect("pong");
        let entries = client.entries(0, 10).await.expect("entries");
        assert_eq!(entries, vec![b"a".to_vec(), b"b".to_vec()]);

        // Garbage, or half a frame: a typed error, then closed.
        for bytes in [b"GARBAGE GARBAGE GARBAGE".to_vec(), {
            let f = encode_frame(2, &Message::Pong, 0).expect("encode");
            f[..f.len() - 1].to_vec()
        }] {
            let client = direct(move |_| Exchanged {
                frames: bytes.clone(),
                closed: false,
            })
            .await;
            assert!(client.ping().await.is_err());
            assert!(client.is_closed());
            assert!(matches!(client.ping().await, Err(ClientError::NotSent)));
        }

        // The server ends the connection: the answer first, then closed.
        let client = direct(|r| Exchanged {
            frames: encode_frame(r.request_id, &Message::Pong, 0).expect("encode"),
            closed: true,
        })
        .await;
        client.ping().await.expect("the last answer");
        assert!(client.is_closed());
        assert!(matches!(client.ping().await, Err(ClientError::NotSent)));

        // The server ends the connection with a request in flight, which
        // it may have done: `Closed`; the next is never sent: `NotSent`.
        let client = direct(|_| Exchanged {
            frames: Vec::new(),
            closed: true,
        })
        .await;
        let in_flight = client.ping().await;
        assert!(
            matches!(in_flight, Err(ClientError::Closed)),
            "{in_flight:?}"
        );
        assert!(matches!(client.ping().await, Err(ClientError::NotSent)));
    }

    #[tokio::test]
    async fn answers_out_of_order_reach_their_callers() {
        let (client, mut peer) = pair(Duration::from_secs(5)).await;
        let client = Arc::new(client);
        let a = tokio::spawn({
            let c = client.clone();
            async move { c.health().await }
        });
        let first = next_request(&mut peer).await;
        let b = spawn_ping(&client);
        let second = next_request(&mut peer).await;
        assert_ne!(first.request_id, second.request_id);
        // Answer the second request first.
        peer.send((second.request_id, Message::Pong))
            .await
            .expect("send");
        let head = test_head(2);
        let health = Message::HealthInfo {
            status: "ok".into(),
            entries: 3,
            signed_head: head.encode(),
        };
        peer.send((first.request_id, health)).await.expect("send");
        b.await.expect("join").expect("pong");
        let h = a.await.expect("join").expect("health");
        assert_eq!(
            (h.status.as_str(), h.entries, h.head),
            ("ok", 3, Some(head))
        );
    }

    /// A head signed by a test key, covering the log up to `last_seq`.
    fn test_head(last_seq: u64) -> SignedHead {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        SignedHead::sign(&key, 0, last_seq, last_seq, [1; 32], [2; 32], 5)
    }

    /// A `HealthInfo` whose head does not decode, or whose entry count is
    /// not its head's, is refused rather than shown to the caller.
    #[tokio::test]
    async fn a_health_answer_must_agree_with_its_head() {
        let head = test_head(4).encode();
        for (entries, signed_head) in [
            (4, head.clone()),
            (6, head.clone()),
            (1, Vec::new()),
            (5, head[..head.len() - 1].to_vec()),
            (5, vec![0; 3]),
        ] {
            let (client, mut peer) = pair(Duration::from_secs(5)).await;
            let asked = tokio::spawn(async move { client.health().await });
            let req = next_request(&mut peer).await;
            let answer = Message::HealthInfo {
                status: "ok".into(),
                entries,
                signed_head,
            };
            peer.send((req.request_id, answer)).await.expect("send");
            let err = asked
                .await
                .expect("join")
                .expect_err("an inconsistent health answer");
            assert!(
                matches!(
                    err,
                    ClientError::UnexpectedResponse(_) | ClientError::Protocol(_)
                ),
                "{entries}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_entries_stream_is_collected_until_last() {
        let (client, mut peer) = pair(Duration::from_secs(5)).await;
        let server = tokio::spawn(async move {
            let req = next_request(&mut peer).await;
            assert_eq!(
                req.message,
                Message::Entries {
                    from_seq: 0,
                    max: 3
                }
            );
            let id = req.request_id;
            let batch = |e: &[&[u8]]| Message::EntryBatch {
                entries: e.iter().map(|b| b.to_vec()).collect(),
            };
            peer.send((id, batch(&[b"a", b"b"]))).await.expect("send");
            peer.send(Envelope::last(id, batch(&[b"c"])))
                .await
                .expect("send");
            // A stream longer than asked for is refused.
            let req = next_request(&mut peer).await;
            peer.send(Envelope::last(req.request_id, batch(&[b"x", b"y"])))
                .await
                .expect("send");
            peer
        });
        let got = client.entries(0, 3).await.expect("entries");
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert!(matches!(
            client.entries(5, 1).await,
            Err(ClientError::UnexpectedResponse(_))
        ));
        drop(server.await.expect("join"));
    }

    /// A call the client makes of a hostile server.
    #[derive(Debug, Clone, Copy)]
    enum Call {
        Ping,
        Health,
        Append,
        Entries,
    }

    /// What the hostile server does with the call's request.
    #[derive(Debug, Clone)]
    enum Act {
        /// The right answer (Ping, Health), or one that does not decode
        /// (a receipt of random bytes, a batch without LAST, then a close).
        Answer,
        /// The `n`th of a list of answers of other types, with the
        /// request's id.
        Other(usize),
        /// That answer with another request id, then a close.
        OtherId(usize),
        /// Bytes that are not the protocol.
        Garbage(Vec<u8>),
        /// The connection closed.
        Close,
        /// Nothing at all.
        Silence,
    }

    fn others() -> Vec<Message> {
        vec![
            Message::Pong,
            Message::HealthInfo {
                status: "ok".into(),
                entries: 0,
                signed_head: Vec::new(),
            },
            Message::Receipt {
                receipt: vec![1, 2, 3],
            },
            Message::Receipts {
                receipts: vec![vec![0; 40]],
            },
            Message::EntryBatch {
                entries: vec![vec![9; 3]],
            },
            Message::Error {
                code: ErrorCode::Forbidden,
                message: "no".into(),
            },
            Message::HelloOk {
                role: "admin".into(),
                server: "again".into(),
            },
            Message::Data {
                subject: "s".into(),
                seq: 1,
                fields: vec![("a".into(), "b".into())],
            },
        ]
    }

    /// Whatever a server sends, a call ends with an answer of its type or
    /// a typed error, within its timeout, and nothing panics.
    #[test]
    fn a_hostile_server_gets_typed_errors_and_no_hang() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestCaseError, TestRunner};
        let call = prop_oneof![
            Just(Call::Ping),
            Just(Call::Health),
            Just(Call::Append),
            Just(Call::Entries),
        ];
        let n = others().len();
        let act = prop_oneof![
            2 => Just(Act::Answer),
            3 => (0..n).prop_map(Act::Other),
            1 => (0..n).prop_map(Act::OtherId),
            1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Act::Garbage),
            1 => Just(Act::Close),
            1 => Just(Act::Silence),
        ];
        let mut runner = TestRunner::new(Config {
            // PROPTEST_CASES=N runs more.
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(256),
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&(call, act), |(call, act)| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (client, mut peer) = pair(Duration::from_secs(2)).await;
                let client = Arc::new(client);
                let calling = tokio::spawn({
                    let c = client.clone();
                    async move {
                        match call {
                            Call::Ping => c.ping().await.map(|_| ()),
                            Call::Health => c.health().await.map(|_| ()),
                            Call::Append => c
                                .append("s", vec![("a".into(), "b".into())])
                                .await
                                .map(|_| ()),
                            Call::Entries => c.entries(0, 2).await.map(|_| ()),
                        }
                    }
                });
                let req = next_request(&mut peer).await;
                let id = req.request_id;
                let right = match (call, &act) {
                    (Call::Ping, Act::Answer) => Some(Message::Pong),
                    (Call::Health, Act::Answer) => Some(Message::HealthInfo {
                        status: "ok".into(),
                        entries: 0,
                        signed_head: Vec::new(),
                    }),
                    _ => None,
                };
                let expect_ok = right.is_some()
                    || matches!(
                        (call, &act),
                        (Call::Ping, Act::Other(0)) | (Call::Health, Act::Other(1))
                    );
                match act.clone() {
                    Act::Answer => {
                        let m = right.unwrap_or(match call {
                            Call::Append => Message::Receipt {
                                receipt: vec![7; 9],
                            },
                            _ => Message::EntryBatch {
                                entries: vec![vec![1]],
                            },
                        });
                        let _ = peer.send((id, m)).await;
                        if expect_ok {
                            // Kept open: the answer is all it takes.
                            let r = calling.await.expect("no panic");
                            prop_assert!(r.is_ok(), "{:?}: {:?}", call, r);
                            return Ok(());
                        }
                        drop(peer);
                    }
                    Act::Other(k) => {
                        let _ = peer.send((id, others()[k].clone())).await;
                        if expect_ok {
                            let r = calling.await.expect("no panic");
                            prop_assert!(r.is_ok(), "{:?}: {:?}", call, r);
                            return Ok(());
                        }
                    }
                    Act::OtherId(k) => {
                        let _ = peer
                            .send((id.wrapping_add(1000), others()[k].clone()))
                            .await;
                        drop(peer);
                    }
                    Act::Garbage(bytes) => {
                        use tokio::io::AsyncWriteExt;
                        let mut b = b"GET ".to_vec();
                        b.extend(bytes);
                        let _ = peer.get_mut().write_all(&b).await;
                    }
                    Act::Close => drop(peer),
                    Act::Silence => {
                        // Held open while the call waits out its timeout.
                        let r = calling.await.expect("no panic");
                        prop_assert!(matches!(r, Err(ClientError::Timeout)), "{:?}", r);
                        return Ok(());
                    }
                }
                let r = tokio::time::timeout(Duration::from_secs(10), calling)
                    .await
                    .map_err(|_| TestCaseError::fail("the call never ended"))?
                    .expect("no panic");
                prop_assert!(r.is_err(), "{:?} with {:?}: {:?}", call, act, r);
                Ok(())
            })
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// A request the server leaves unanswered (while it answers another)
    /// times out, and its late answer is dropped, never taken as another
    /// request's.
    #[tokio::test(start_paused = true)]
    async fn a_request_without_an_answer_times_out_and_its_late_answer_is_dropped() {
        let (client, mut peer) = pair(Duration::from_secs(2)).await;
        let client = Arc::new(client);
        let unanswered = spawn_ping(&client);
        let late = next_request(&mut peer).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answered = spawn_ping(&client);
        let req = next_request(&mut peer).await;
        peer.send((req.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(answered.await.expect("join").is_ok());
        let outcome = unanswered.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        assert!(!client.is_closed());
        peer.send((late.request_id, Message::Pong))
            .await
            .expect("send");
        // The next request gets its own answer, not the late one.
        let health = tokio::spawn(async move { client.health().await });
        let req = next_request(&mut peer).await;
        assert_ne!(req.request_id, late.request_id);
        let answer = Message::HealthInfo {
            status: "ok".into(),
            entries: 0,
            signed_head: Vec::new(),
        };
        peer.send((req.request_id, answer)).await.expect("send");
        assert!(health.await.expect("join").is_ok());
    }

    /// A first answer in HTTP or in TLS says which, whether it comes to a
    /// connection's `Hello` or to a redemption's.
    #[tokio::test]
    async fn a_server_answering_in_another_protocol_is_named() {
        let http = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        // A TLS 1.2 record header and a fatal alert (decode_error).
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
        let config = ClientConfig {
            api_key: Zeroizing::new("fvk_test".into()),
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        };
        for (answer, names) in [(&http[..], "in HTTP"), (&alert[..], "in TLS")] {
            for redeem in [false, true] {
                let (near, mut far) = tokio::io::duplex(4096);
                let server = tokio::spawn({
                    let answer = answer.to_vec();
                    async move {
                        let mut request = [0u8; 16];
                        let _ = tokio::io::AsyncReadExt::read(&mut far, &mut request).await;
                        far.write_all(&answer).await.expect("answer");
                        far.shutdown().await.expect("close");
                        far
                    }
                });
                let got = if redeem {
                    redeem_on(near, &config, "fvt_x").await.map(|_| ())
                } else {
                    let (r, w) = tokio::io::split(near);
                    Client::hello(r, w, &config).await.map(|_| ())
                };
                let _far = server.await.expect("server");
                match got {
                    Err(e @ ClientError::WrongProtocol(_)) => {
                        assert!(e.to_string().contains(names), "{e}")
                    }
                    other => panic!("{names}, redeem {redeem}: {other:?}"),
                }
            }
        }
        // Bytes of no known protocol stay a protocol error.
        assert!(matches!(
            wrong_protocol(ClientError::Protocol(protocol::Error::BadMagic), b"SSH-2.0"),
            ClientError::Protocol(protocol::Error::BadMagic)
        ));
    }

    /// An error code added by a later server version fails the request it
    /// answers, as a refusal with the server's words, and not the
    /// connection: the next request on it is answered.
    #[tokio::test]
    async fn an_error_code_this_build_does_not_know_fails_only_its_request() {
        let (client, mut peer) = pair(Duration::from_secs(30)).await;
        let client = Arc::new(client);
        let ping = spawn_ping(&client);
        let req = next_request(&mut peer).await;
        let mut payload = 40u16.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 9]);
        payload.extend_from_slice(b"try later");
        let frame = protocol::Frame {
            msg_type: protocol::MessageType::Error,
            flags: 0,
            request_id: req.request_id,
            payload,
        }
        .encode()
        .expect("encode");
        peer.get_mut().write_all(&frame).await.expect("write");
        match ping.await.expect("join") {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::Unrecognized);
                assert_eq!(message, "code 40: try later");
            }
            other => panic!("{other:?}"),
        }
        assert!(!client.is_closed());
        let ping = spawn_ping(&client);
        let req = next_request(&mut peer).await;
        peer.send((req.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(ping.await.expect("join").is_ok());
    }

    /// A request fails once its own deadline passed, within an eighth of
    /// the timeout after it, and alone while the server answers others: a
    /// later request on the same connection still gets its answer.
    #[tokio::test(start_paused = true)]
    async fn a_request_times_out_at_its_own_deadline_and_alone() {
        let timeout = Duration::from_secs(8);
        let (client, mut peer) = pair(timeout).await;
        let client = Arc::new(client);
        let start = Instant::now();
        let first = tokio::spawn({
            let c = client.clone();
            async move { (c.ping().await, Instant::now()) }
        });
        let _unanswered = next_request(&mut peer).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let second = tokio::spawn({
            let c = client.clone();
            async move { c.health().await }
        });
        let req = next_request(&mut peer).await;
        // Another request answered meanwhile: the server is alive.
        let answered = spawn_ping(&client);
        let pinged = next_request(&mut peer).await;
        peer.send((pinged.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(answered.await.expect("join").is_ok());
        let (outcome, at) = first.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        let waited = at - start;
        assert!(
            waited >= timeout && waited <= timeout + timeout / SWEEPS_PER_TIMEOUT,
            "{waited:?}"
        );
        assert!(!second.is_finished());
        let answer = Message::HealthInfo {
            status: "ok".into(),
            entries: 0,
            signed_head: Vec::new(),
        };
        peer.send((req.request_id, answer)).await.expect("send");
        assert!(second.await.expect("join").is_ok());
        assert!(!client.is_closed());
    }

    /// A request that times out with nothing heard from the server since
    /// it was sent closes the connection: the requests sent after it fail
    /// with `Timeout` then, not each at its own deadline, and later calls
    /// fail at once with `Closed`.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_with_the_server_silent_closes_the_connection() {
        let timeout = Duration::from_secs(8);
        let (client, mut peer) = pair(timeout).await;
        let client = Arc::new(client);
        let start = Instant::now();
        let first = spawn_ping(&client);
        let _unanswered = next_request(&mut peer).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let second = tokio::spawn({
            let c = client.clone();
            async move { (c.ping().await, Instant::now()) }
        });
        let _also_unanswered = next_request(&mut peer).await;
        let outcome = first.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        let (outcome, at) = second.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        assert!(
            at - start <= timeout + timeout / SWEEPS_PER_TIMEOUT,
            "failed with the first, not at its own deadline: {:?}",
            at - start
        );
        assert!(client.is_closed());
        let later = client.ping().await;
        assert!(matches!(later, Err(ClientError::NotSent)), "{later:?}");
        assert_eq!(client.shared.lock().pending.len(), 0);
    }

    /// A reindex answered long after the config's timeout, with nothing
    /// else heard meanwhile, is still told: the requests that work through
    /// the whole vault wait `LONG_REQUEST_TIMEOUT`, and the connection is
    /// not taken for stalled, also when a request sent meanwhile times
    /// out. Past that it times out as others do.
    #[tokio::test(start_paused = true)]
    async fn a_reindex_waits_longer_than_the_timeout() {
        let timeout = Duration::from_secs(8);
        let (client, mut peer) = pair(timeout).await;
        let client = Arc::new(client);
        let asked = tokio::spawn({
            let c = client.clone();
            async move { c.reindex().await }
        });
        let req = next_request(&mut peer).await;
        assert!(matches!(req.message, Message::Reindex));
        // A ping meanwhile, unanswered (the server busy with the
        // reindex), times out alone.
        let ping = spawn_ping(&client);
        let _unanswered = next_request(&mut peer).await;
        let outcome = ping.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        tokio::time::sleep(timeout * 20).await;
        assert!(!client.is_closed());
        let report = Message::ReindexReport {
            entries: 7,
            keys_compared: 3,
            differences: 0,
            sample: Vec::new(),
        };
        peer.send((req.request_id, report)).await.expect("send");
        let got = asked.await.expect("join").expect("a report");
        assert_eq!((got.entries, got.differences), (7, 0));

        let start = Instant::now();
        let asked = tokio::spawn({
            let c = client.clone();
            async move { c.reindex().await }
        });
        let _unanswered = next_request(&mut peer).await;
        let outcome = asked.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        let waited = start.elapsed();
        assert!(
            waited >= LONG_REQUEST_TIMEOUT
                && waited <= LONG_REQUEST_TIMEOUT + timeout / SWEEPS_PER_TIMEOUT,
            "{waited:?}"
        );
    }

    /// An `Entries` answer whose entries pass `MAX_ENTRIES_BYTES` is
    /// refused before its end, as one of more entries than asked is: a
    /// hostile server cannot make the client hold `max` whole frames. The
    /// connection goes on.
    #[tokio::test]
    async fn an_entries_answer_past_its_bytes_is_refused() {
        let (client, mut peer) = pair(Duration::from_secs(30)).await;
        let client = Arc::new(client);
        let asked = tokio::spawn({
            let c = client.clone();
            async move { c.entries(0, 10_000).await }
        });
        let req = next_request(&mut peer).await;
        let entry = vec![7u8; 512 * 1024];
        let batches = MAX_ENTRIES_BYTES / entry.len() + 1;
        let feeding = tokio::spawn(async move {
            for _ in 0..batches {
                let batch = Message::EntryBatch {
                    entries: vec![entry.clone()],
                };
                if peer
                    .send(Envelope::new(req.request_id, batch))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            peer
        });
        let outcome = asked.await.expect("join");
        assert!(
            matches!(outcome, Err(ClientError::UnexpectedResponse(w)) if w.contains("64 MiB")),
            "{outcome:?}"
        );
        let mut peer = feeding.await.expect("join");
        let ping = spawn_ping(&client);
        let req = next_request(&mut peer).await;
        peer.send((req.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(ping.await.expect("join").is_ok());
    }

    /// Nothing stays registered: not a request answered, nor one that
    /// timed out, nor one whose caller gave up before its answer.
    #[tokio::test(start_paused = true)]
    async fn no_request_stays_registered_once_its_caller_is_done() {
        let timeout = Duration::from_secs(8);
        let (client, mut peer) = pair(timeout).await;
        let client = Arc::new(client);
        let registered = || client.shared.lock().pending.len();
        // Answered.
        let answered = spawn_ping(&client);
        let req = next_request(&mut peer).await;
        assert_eq!(registered(), 1);
        peer.send((req.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(answered.await.expect("join").is_ok());
        assert_eq!(registered(), 0);
        // Given up: its future dropped while it waits.
        let given_up = spawn_ping(&client);
        let _ = next_request(&mut peer).await;
        given_up.abort();
        assert!(given_up.await.expect_err("aborted").is_cancelled());
        assert_eq!(registered(), 0);
        // Timed out.
        let timed_out = spawn_ping(&client);
        let _ = next_request(&mut peer).await;
        let outcome = timed_out.await.expect("join");
        assert!(matches!(outcome, Err(ClientError::Timeout)), "{outcome:?}");
        assert_eq!(registered(), 0);
    }

    /// A timeout shorter than the sweeps can divide (nanoseconds) is still
    /// a typed `Timeout`, not a panic of the sweeper's interval (and, the
    /// server silent meanwhile, closes the connection).
    #[tokio::test(start_paused = true)]
    async fn a_timeout_of_nanoseconds_times_out() {
        let (client, _peer) = pair(Duration::from_nanos(5)).await;
        // Bounded, so that a sweeper that died fails the test, not hangs it.
        let outcome = tokio::time::timeout(Duration::from_secs(60), client.ping()).await;
        assert!(
            matches!(outcome, Ok(Err(ClientError::Timeout))),
            "{outcome:?}"
        );
        assert!(client.is_closed());
    }

    /// A timeout no instant can hold (a config that skipped `validate`,
    /// which refuses more than a day) is a deadline far ahead, not a
    /// panic of the caller.
    #[tokio::test]
    async fn a_timeout_of_centuries_is_answered_not_a_panic() {
        let (client, mut peer) = pair(Duration::MAX).await;
        let client = Arc::new(client);
        let ping = spawn_ping(&client);
        let asked = next_request(&mut peer).await;
        peer.send((asked.request_id, Message::Pong))
            .await
            .expect("send");
        assert!(matches!(ping.await, Ok(Ok(()))));
        let config = ClientConfig {
            api_key: Zeroizing::new("fvk_test".into()),
            timeout: crate::MAX_TIMEOUT + Duration::from_secs(1),
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        };
        assert!(
            matches!(config.validate(), Err(ClientError::Config(ref m)) if m.contains("a day")),
            "{:?}",
            config.validate()
        );
        let config = ClientConfig {
            timeout: crate::MAX_TIMEOUT,
            ..config
        };
        assert!(config.validate().is_ok(), "{:?}", config.validate());
    }

    #[tokio::test]
    async fn an_error_for_request_zero_fails_every_waiting_caller_and_closes() {
        let (client, mut peer) = pair(Duration::from_secs(5)).await;
        let client = Arc::new(client);
        let waiting = spawn_ping(&client);
        let _ = next_request(&mut peer).await;
        let error = Message::Error {
            code: ErrorCode::Malformed,
            message: "bad frame".into(),
        };
        peer.send((0, error)).await.expect("send");
        drop(peer);
        match waiting.await.expect("join") {
            Err(ClientError::Server {
                code: ErrorCode::Malformed,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(client.is_closed());
        assert!(matches!(client.ping().await, Err(ClientError::NotSent)));
    }

    #[tokio::test]
    async fn a_refused_hello_is_a_server_error() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let mut peer = Framed::new(far, MessageCodec::new());
        let config = ClientConfig {
            api_key: Zeroizing::new("fvk_wrong".into()),
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        };
        let (r, w) = tokio::io::split(near);
        let connecting = tokio::spawn(async move { Client::hello(r, w, &config).await });
        let hello = next_request(&mut peer).await;
        let error = Message::Error {
            code: ErrorCode::Unauthenticated,
            message: "no".into(),
        };
        peer.send((hello.request_id, error)).await.expect("send");
        match connecting.await.expect("join") {
            Err(ClientError::Server {
                code: ErrorCode::Unauthenticated,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redeemed_debug_hides_values() {
        let r = Redeemed {
            subject: "cust-1".into(),
            seq: 4,
            fields: vec![("iban".into(), "GB33BUKB20201555555555".into())],
        };
        let shown = format!("{r:?}");
        assert!(shown.contains("iban") && !shown.contains("GB33"), "{shown}");
    }
}
