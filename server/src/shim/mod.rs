//! The HTTP policy shim (port 8080): the control plane partners talk to
//! first.
//!
//! ```text
//! partner ──HTTP──> shim ──(gateway key, one pipelined connection)──> vault
//!                          (inside vaultd: direct calls; else :9999)
//!                     │   Context (whois key, policy, consent: one request)
//!                     │   → policy → fields → hours/IP → rate → consent
//!                     │   granted: Mint (token_minted is durable first)
//!                     │   denied:  Event access_denied (durable first), then 403
//!                     │            (429 for the rate limit)
//! admin/writer/auditor ──HTTP──> shim ──(the caller's own key)──> vault
//!                         policies, consents, credentials, logs
//! ```
//!
//! Invariants:
//! - The shim keeps no personal data: no cache, no copies. Policies,
//!   consents and credentials are read from the vault for every decision,
//!   so a revocation takes effect at the next request.
//! - Every decision is in the log before its answer leaves: a grant is the
//!   `token_minted` entry, a denial an `access_denied` entry. If the log
//!   cannot be written, the answer is 503 (fail closed).
//! - Requests made with a caller's authority go to the vault with the
//!   caller's own key, so the vault checks the role and the log names the
//!   caller's credential (`recorded_by`).
//! - Slow clients are cut off: headers within `header_timeout`, the whole
//!   request within `request_timeout`, bodies up to `max_body_bytes`; a
//!   connection whose client leaves a response unread for
//!   `request_timeout` is closed, so that it does not hold its slot.
//!
//! The routes and their JSON are in `openapi.json` (served at
//! `/v1/openapi.json`) and `docs/http.md`.

pub mod api;
pub mod link;
pub mod policy;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpListener;

pub use link::VaultLink;
pub use policy::Policy;

use crate::metrics::Metrics;

/// The OpenAPI document of the routes, as written for the default
/// options ([`openapi_for`] serves a server's own).
pub const OPENAPI: &str = include_str!("openapi.json");

/// [`OPENAPI`] as a shim of `config` serves it: a policy's token lifetime
/// bounded by the ceiling it enforces, with the default it gives.
pub fn openapi_for(config: &ShimConfig) -> axum::body::Bytes {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(OPENAPI) else {
        return axum::body::Bytes::from_static(OPENAPI.as_bytes());
    };
    let ttl = &mut doc["components"]["schemas"]["Policy"]["properties"]["max_token_ttl_secs"];
    if ttl.is_object() {
        let ceiling = config.max_token_ttl_secs;
        ttl["maximum"] = ceiling.into();
        ttl["default"] = policy::DEFAULT_TOKEN_TTL_SECS.min(ceiling).into();
    }
    // A server with a metrics key asks for it.
    if config.metrics_key.is_some() {
        doc["components"]["securitySchemes"]["metrics_key"] = serde_json::json!({
            "type": "http",
            "scheme": "bearer",
            "description": "the metrics key of this server (--metrics-key-file), not an API key"
        });
        let get = &mut doc["paths"]["/metrics"]["get"];
        if get.is_object() {
            get["security"] = serde_json::json!([{"metrics_key": []}]);
            get["responses"]["401"] = serde_json::json!({
                "description": "Missing or wrong metrics key",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            });
        }
    }
    serde_json::to_vec_pretty(&doc).map_or_else(
        |_| axum::body::Bytes::from_static(OPENAPI.as_bytes()),
        axum::body::Bytes::from,
    )
}

/// Options of the shim, with documented defaults.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The vault address `/v1/authorize` tells partners to redeem at.
    pub vault_addr: String,
    /// Ceiling of any policy's token lifetime (default 3600 s, the
    /// protocol server's own ceiling).
    pub max_token_ttl_secs: u32,
    /// Largest request body (default 64 KiB).
    pub max_body_bytes: usize,
    /// Time allowed for a request's headers (default 10 s); a new
    /// connection's TLS handshake and first request's headers share it,
    /// from its arrival.
    pub header_timeout: Duration,
    /// Time allowed for a request from its headers on, body and handling
    /// included (default 15 s), and for a client to take its response: a response whose writing
    /// moves no byte for this long closes the connection.
    pub request_timeout: Duration,
    /// Connections served at once (default 1024). A connection takes its
    /// slot once its first request's headers are in: until then it is in
    /// its handshake, see `max_handshakes`. A request that finds none free
    /// waits within the handshake's window (`header_timeout` from the
    /// connection's arrival), then is answered 503 `busy` and closed.
    pub max_connections: usize,
    /// Connections whose first request's headers are not in yet, or whose
    /// first request waits for a slot, at once (default 1024); one more
    /// closes the oldest of them (a waiting request is answered 503
    /// `busy`), so that clients that never finish (slowloris) cannot keep
    /// others out.
    pub max_handshakes: usize,
    /// Connections one client address holds slots with at once (default
    /// 256): an IPv4 address, or an IPv6 /64 network, as the protocol
    /// port's throttle counts peers; `trusted_proxies` are not limited so
    /// (their connections carry many clients). One more is answered 503
    /// `busy` and closed, so that one host cannot take every slot of
    /// `max_connections` by sending whole requests that need no key.
    pub max_connections_per_peer: usize,
    /// Reverse proxies in front of the shim (default none), whose
    /// `forwarded_header` names the client that `source_ips` is checked
    /// against ([`crate::proxied::forwarded`]).
    pub trusted_proxies: crate::proxied::TrustedProxies,
    /// The header trusted proxies name the client in (default
    /// `X-Forwarded-For`).
    pub forwarded_header: crate::proxied::forwarded::ForwardedHeader,
    /// A partner's denials of `/v1/authorize` recorded an entry each, a
    /// minute at most, in bursts of as many (default 600). Past it, a
    /// denial is answered `429 rate_limited` without its reason, and the
    /// shim records how many there were in one entry a minute
    /// ([`policy::DenialBudget`]).
    pub recorded_denials_per_minute: u32,
    /// The key `GET /metrics` asks for as `Authorization: Bearer`
    /// (default none: the metrics are served to whoever reaches the port).
    pub metrics_key: Option<MetricsKey>,
}

/// The key of `GET /metrics` (`--metrics-key-file`), for a Prometheus
/// that sends it (`authorization: {credentials_file: …}`): held only as
/// its BLAKE3 hash, and a key presented is compared by its hash, in
/// constant time. Not a vault credential: the metrics stay readable when
/// the vault is not (`fintrust_vault_up` 0).
#[derive(Clone)]
pub struct MetricsKey([u8; 32]);

impl MetricsKey {
    /// Fewest characters a key may have.
    pub const MIN_LEN: usize = 32;

    /// A key of 32 to 256 printable ASCII characters without spaces (what
    /// an `Authorization` header carries), e.g. `openssl rand -hex 32`.
    pub fn new(key: &str) -> std::result::Result<MetricsKey, String> {
        if !(Self::MIN_LEN..=256).contains(&key.len()) {
            return Err(format!(
                "the metrics key has {} characters: it needs {} to 256 (openssl rand -hex 32 makes one)",
                key.len(),
                Self::MIN_LEN
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the metrics key holds a space or a character that is not printable ASCII".into(),
            );
        }
        Ok(MetricsKey(*blake3::hash(key.as_bytes()).as_bytes()))
    }

    /// Whether `presented` is the key.
    pub fn admits(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        blake3::hash(presented.as_bytes())
            .as_bytes()
            .ct_eq(&self.0)
            .into()
    }
}

impl std::fmt::Debug for MetricsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsKey(..)")
    }
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            vault_addr: format!("127.0.0.1:{}", protocol::DEFAULT_PORT),
            max_token_ttl_secs: 3600,
            max_body_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            max_connections: 1024,
            max_handshakes: 1024,
            max_connections_per_peer: 256,
            trusted_proxies: crate::proxied::TrustedProxies::default(),
            forwarded_header: Default::default(),
            recorded_denials_per_minute: 600,
            metrics_key: None,
        }
    }
}

/// The shim's state, shared by every request.
#[derive(Debug)]
pub struct Shim {
    pub link: Arc<VaultLink>,
    pub config: ShimConfig,
    limiter: policy::RateLimiter,
    denials: policy::DenialBudget,
    metrics: &'static Metrics,
    /// What `/v1/openapi.json` serves ([`openapi_for`]).
    openapi: axum::body::Bytes,
    /// The vault's last health answer and the ask under way
    /// (`api::vault_health`).
    health: std::sync::Mutex<api::HealthAsks>,
    /// Turns of `/v1/logs` scans ([`api::LOG_SCANS`] at once): a scan
    /// holds up to an `Entries` answer (8 MiB) while it builds its page,
    /// so the requests of many connections do not each hold that much at
    /// once (the in-process shim's reads are not bounded by the protocol
    /// port's `Entries` budget). A page written to a slow client is held
    /// by its connection, not by a turn.
    log_scans: tokio::sync::Semaphore,
}

impl Shim {
    pub fn new(link: VaultLink, config: ShimConfig) -> Arc<Self> {
        Arc::new(Shim {
            link: Arc::new(link),
            openapi: openapi_for(&config),
            config,
            limiter: policy::RateLimiter::default(),
            denials: policy::DenialBudget::default(),
            metrics: crate::metrics::global(),
            health: std::sync::Mutex::new(api::HealthAsks::default()),
            log_scans: tokio::sync::Semaphore::new(api::LOG_SCANS),
        })
    }
}

/// The routes.
pub fn router(shim: Arc<Shim>) -> Router {
    Router::new()
        .route("/v1/authorize", post(api::authorize))
        .route(
            "/v1/policies/{partner_id}",
            get(api::get_policy).put(api::put_policy),
        )
        .route(
            "/v1/subjects/{subject_id}/consents/{partner_id}",
            put(api::put_consent).delete(api::delete_consent),
        )
        .route("/v1/credentials", post(api::create_credential))
        .route(
            "/v1/credentials/{id}",
            axum::routing::delete(api::revoke_credential),
        )
        .route("/v1/logs", get(api::logs))
        .route("/v1/health", get(api::health))
        .route("/v1/openapi.json", get(api::openapi))
        .route("/metrics", get(api::metrics))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            shim.clone(),
            api::observe,
        ))
        .layer(DefaultBodyLimit::max(shim.config.max_body_bytes))
        .with_state(shim)
}

/// Serves the shim on `listener` until `shutdown` resolves, over TLS with
/// `tls` (each connection with the configuration of the moment it is
/// accepted); then waits for the requests in flight. Connections that have not
/// yet sent a request's headers (in their TLS handshake, or trickling
/// bytes) are closed at once.
pub async fn serve(
    listener: TcpListener,
    shim: Arc<Shim>,
    tls: Option<crate::tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = router(shim.clone());
    let admission = Arc::new(
        crate::serve::Admission::new(
            shim.config.max_connections,
            shim.config.max_handshakes,
            "http",
        )
        .per_credential(shim.config.max_connections_per_peer),
    );
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The counts of denials not recorded one by one, recorded once a
    // minute, and once more when the shim stops.
    // Cancelled at shutdown: connections without a request are closed,
    // and the counts' task stops between two records (never during one,
    // which would lose the counts it took).
    let stopping = tokio_util::sync::CancellationToken::new();
    let counts = {
        let (shim, stopping) = (shim.clone(), stopping.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UNRECORDED_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = stopping.cancelled() => break,
                }
                api::record_unrecorded_denials(&shim, false).await;
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    crate::serve::accept_failed(&e, &admission).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (ticket, evicted) = admission.arrive();
        let conn = Connection {
            app: app.clone(),
            acceptor: tls.as_ref().map(crate::tls::ServerTls::acceptor),
            header_timeout: shim.config.header_timeout,
            unread_limit: shim.config.request_timeout,
            admission: admission.clone(),
            ticket,
            evicted,
            stopping: stopping.clone(),
            peer,
            // Counted by address unless a trusted proxy's.
            peer_key: (!shim.config.trusted_proxies.trusts(peer.ip()))
                .then(|| crate::serve::peer_of(peer.ip()).to_string()),
            arrived: tokio::time::Instant::now(),
            max_connections: shim.config.max_connections,
            max_per_peer: shim.config.max_connections_per_peer,
        };
        tokio::spawn(conn.serve(tcp, graceful.watcher()));
    }
    drop(listener);
    stopping.cancel();
    // Requests in flight finish; idle keep-alive connections close.
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    let _ = counts.await;
    api::record_unrecorded_denials(&shim, true).await;
    Ok(())
}

/// How often the counts of denials not recorded one by one are recorded
/// ([`ShimConfig::recorded_denials_per_minute`]).
pub const UNRECORDED_EVERY: Duration = Duration::from_secs(60);

/// Most bytes a connection's read buffer holds (hyper's default is about
/// 400 KiB): a request's line and headers must fit (longer is answered
/// 431), and a connection that sent no whole request yet, so holds no
/// slot, can make the shim hold no more (times `max_handshakes`).
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// One connection of [`serve`].
struct Connection {
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    /// How long a response may wait for the client to read it before the
    /// connection is closed (`request_timeout`).
    unread_limit: Duration,
    admission: Arc<crate::serve::Admission>,
    ticket: u64,
    /// Cancelled to admit a newer connection while this one is in its
    /// handshake.
    evicted: tokio_util::sync::CancellationToken,
    /// Cancelled when the shim stops.
    stopping: tokio_util::sync::CancellationToken,
    peer: SocketAddr,
    /// What its address counts as against `max_per_peer`
    /// ([`crate::serve::peer_of`]); `None` for a trusted proxy's.
    peer_key: Option<String>,
    /// When it was accepted.
    arrived: tokio::time::Instant,
    /// The limit it takes a slot of, named when it finds none free.
    max_connections: usize,
    /// The most slots one address holds ([`ShimConfig::max_connections_per_peer`]).
    max_per_peer: usize,
}

impl Connection {
    /// Serves the connection over `io`: its TLS handshake and its first
    /// request's headers within `header_timeout` of its arrival, one
    /// window for both (so that a client that trickles bytes holds a
    /// handshake place that long at most), then its requests, each with
    /// its headers within `header_timeout`, until it closes. It ends early
    /// when evicted during its handshake, or when the shim stops before it
    /// asked anything.
    async fn serve<S>(self, io: S, watcher: hyper_util::server::graceful::Watcher)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            acceptor,
            header_timeout,
            unread_limit,
            admission,
            ticket,
            evicted,
            stopping,
            peer,
            peer_key,
            arrived,
            max_connections,
            max_per_peer,
        } = self;
        let deadline = arrived + header_timeout;
        // Its place among the connections in their handshake is left as
        // the connection ends, however it ends.
        let _departure = admission.departure(ticket);
        // The connection's slot, taken when its first request's headers
        // are in, and held until it closes.
        let slot = Arc::new(tokio::sync::OnceCell::new());
        // Set once a request's headers are in.
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let svc = {
            let (admission, asked) = (admission.clone(), asked.clone());
            hyper::service::service_fn(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    asked.store(true, std::sync::atomic::Ordering::Release);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
                    let (app, admission, slot) = (app.clone(), admission.clone(), slot.clone());
                    let peer_key = peer_key.clone();
                    async move {
                        let admitted = slot.get_or_try_init(|| async {
                            // The address's count first: one past its
                            // limit takes no slot.
                            let held = match peer_key.as_deref().map(|k| admission.hold(k)) {
                                Some(None) => {
                                    admission.leave(ticket);
                                    return Err(crate::serve::Refused::CredentialLimit);
                                }
                                Some(held) => held,
                                None => None,
                            };
                            let slot = admission.admitted(ticket, deadline).await?;
                            Ok((held, slot))
                        });
                        if let Err(refused) = admitted.await {
                            let (reason, why) = match refused {
                                crate::serve::Refused::CredentialLimit => (
                                    "peer_limit",
                                    format!(
                                        "this address holds its limit of {max_per_peer} \
                                         connections: close one, or use the ones it has \
                                         (keep-alive)"
                                    ),
                                ),
                                other => (other.reason(), crate::serve::busy(max_connections)),
                            };
                            crate::metrics::turned_away("http", reason);
                            return Ok(busy(why));
                        }
                        tower::ServiceExt::oneshot(app, req).await
                    }
                },
            )
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        let served = async move {
            match acceptor {
                None => {
                    let io = crate::serve::Unread::new(io, unread_limit);
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    let _ = watcher.watch(conn).await;
                }
                Some(acceptor) => {
                    let accepted = tokio::time::timeout_at(deadline, acceptor.accept(io)).await;
                    crate::tls::count_handshake("http", &accepted);
                    let Ok(Ok(stream)) = accepted else {
                        return;
                    };
                    if let Err(e) = crate::tls::client_certificate_in_force(stream.get_ref().1) {
                        tracing::debug!(error = %e, "TLS connection refused");
                        return;
                    }
                    let stream = crate::serve::Unread::new(stream, unread_limit);
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                }
            }
        };
        tokio::select! {
            // First: at the deadline, a TLS handshake still going ends in
            // `served`, counted as timed out.
            biased;
            () = served => {}
            // The handshake's window: the first request's headers by the
            // deadline, whatever the TLS handshake took.
            () = unless_asked(tokio::time::sleep_until(deadline), &asked) => {}
            () = evicted.cancelled() => crate::metrics::turned_away("http", "evicted"),
            // At shutdown, a connection that never asked anything has
            // nothing to finish; one that did is the graceful shutdown's.
            () = unless_asked(stopping.cancelled(), &asked) => {}
        }
        admission.leave(ticket);
    }
}

/// The answer to a request whose connection found no slot free within
/// its handshake's window, or whose address holds its limit of them
/// (`why`): 503, and the connection closes.
fn busy(why: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut r = api::ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy", why)
        .into_response();
    let headers = r.headers_mut();
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    headers.insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    r
}

/// Resolves when `event` does, unless a request's headers were in by then
/// (`asked`): then never.
async fn unless_asked(event: impl Future<Output = ()>, asked: &std::sync::atomic::AtomicBool) {
    event.await;
    if asked.load(std::sync::atomic::Ordering::Acquire) {
        std::future::pending::<()>().await;
    }
}

/// A policies file: `[partners.<partner_id>]` tables in TOML, each a
/// [`Policy`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesFile {
    #[serde(default)]
    pub partners: BTreeMap<String, Policy>,
}

impl PoliciesFile {
    /// Parses and validates a policies file.
    pub fn parse(text: &str, max_ttl_secs: u32) -> Result<Self, String> {
        let f: PoliciesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for (partner, p) in &f.partners {
            storage::vault::validate_subject(partner, true)
                .map_err(|e| format!("partner {partner:?}: {e}"))?;
            p.validate(max_ttl_secs)
                .map_err(|e| format!("partner {partner:?}: {e}"))?;
            // Checked here for every partner, before any is written: the
            // vault would refuse one too large only once those before it
            // were in the log.
            let len = policy_payload(partner, p).len() + RECORDED_BY_ROOM;
            if len > storage::entry::MAX_PAYLOAD_LEN {
                return Err(format!(
                    "partner {partner:?}: its policy takes about {len} bytes as a log entry, over \
                     the {} an entry's payload may take",
                    storage::entry::MAX_PAYLOAD_LEN
                ));
            }
        }
        Ok(f)
    }
}

/// Room left in a `policy_changed` payload for the `recorded_by` member the
/// vault adds (a credential id is far shorter).
const RECORDED_BY_ROOM: usize = 256;

/// The payload of the `policy_changed` entry of a policies file's policy.
fn policy_payload(partner: &str, policy: &Policy) -> String {
    serde_json::json!({"partner_id": partner, "policy": policy, "source": "policies file"})
        .to_string()
}

/// Writes the file's policies that differ from the vault's current ones
/// (a `policy_changed` entry each, through the gateway connection).
/// Returns how many changed.
pub async fn apply_policies(
    shim: &Shim,
    file: &PoliciesFile,
) -> Result<usize, client::ClientError> {
    let c = shim.link.gateway().await?;
    let mut changed = 0;
    for (partner, policy) in &file.partners {
        let current = c
            .policy(partner.clone())
            .await?
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v.value).ok());
        let same = current
            .as_ref()
            .and_then(|v| v.get("policy").cloned())
            .and_then(|v| serde_json::from_value::<Policy>(v).ok())
            .is_some_and(|p| &p == policy);
        if same {
            continue;
        }
        // A policy the log holds from elsewhere than the file (a change
        // made with PUT since the last start, a partner made inactive) is
        // replaced: said, by name. One the file wrote, now edited, is not.
        let from_elsewhere = current
            .as_ref()
            .is_some_and(|v| v.get("source").and_then(|s| s.as_str()) != Some("policies file"));
        if from_elsewhere {
            tracing::warn!(
                partner = %partner,
                "the policies file replaces the partner's policy in the log, which differs from \
                 it (a change made with PUT /v1/policies since is undone: make it in the file)"
            );
        }
        c.event(
            storage::Kind::PolicyChanged as u8,
            "",
            policy_payload(partner, policy).into_bytes(),
        )
        .await?;
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// A new connection's TLS handshake and its first request's headers
    /// share one window, `header_timeout` from its arrival. The clock is
    /// tokio's paused one, which moves only when every task waits, so what
    /// is measured is the shim's deadlines, never the machine's speed.
    mod one_handshake_window {
        use std::time::Duration;

        use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
        use tokio::time::Instant;

        use super::super::{router, Connection, Shim, ShimConfig, VaultLink};

        const WINDOW: Duration = Duration::from_secs(10);

        /// Serves one connection over `io` as `serve` does, with TLS when
        /// `tls` is given: how long after its arrival it ended.
        async fn serve(io: DuplexStream, tls: Option<tokio_rustls::TlsAcceptor>) -> Duration {
            // A shim whose vault is nowhere: the route asked for needs none.
            let link = VaultLink::new(client::ClientConfig {
                addr: "127.0.0.1:9".into(),
                tls: client::Tls::Plaintext,
                api_key: zeroize::Zeroizing::new("fvk_none".into()),
                client_name: "test".into(),
                timeout: Duration::from_secs(1),
            });
            let shim = Shim::new(
                link,
                ShimConfig {
                    header_timeout: WINDOW,
                    ..ShimConfig::default()
                },
            );
            let admission = std::sync::Arc::new(crate::serve::Admission::new(4, 4, "test-shim"));
            let (ticket, evicted) = admission.arrive();
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            let arrived = Instant::now();
            Connection {
                app: router(shim),
                acceptor: tls,
                header_timeout: WINDOW,
                unread_limit: WINDOW,
                admission,
                ticket,
                evicted,
                stopping: tokio_util::sync::CancellationToken::new(),
                peer: "127.0.0.1:40000".parse().expect("an address"),
                peer_key: Some("127.0.0.1".into()),
                arrived,
                max_connections: 4,
                max_per_peer: 4,
            }
            .serve(io, graceful.watcher())
            .await;
            arrived.elapsed()
        }

        /// Completes the TLS handshake at `tls_at` (with TLS), sends a
        /// request at `ask_at` (if any); the status line it got, and its
        /// stream, kept open until the shim ends the connection.
        async fn client(
            io: DuplexStream,
            tls: Option<tokio_rustls::TlsConnector>,
            tls_at: Duration,
            ask_at: Option<Duration>,
        ) -> (Option<String>, Box<dyn std::any::Any + Send>) {
            async fn ask<S>(
                mut io: S,
                at: Option<Instant>,
            ) -> (Option<String>, Box<dyn std::any::Any + Send>)
            where
                S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
            {
                let Some(at) = at else {
                    return (None, Box::new(io));
                };
                tokio::time::sleep_until(at).await;
                let request =
                    b"GET /v1/openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
                if io.write_all(request).await.is_err() {
                    return (None, Box::new(io));
                }
                let mut answer = Vec::new();
                let _ = io.read_to_end(&mut answer).await;
                let status = String::from_utf8_lossy(&answer)
                    .lines()
                    .next()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string);
                (status, Box::new(io))
            }
            let start = Instant::now();
            let ask_at = ask_at.map(|d| start + d);
            match tls {
                None => ask(io, ask_at).await,
                Some(connector) => {
                    tokio::time::sleep_until(start + tls_at).await;
                    let name =
                        rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                    match connector.connect(name, io).await {
                        Ok(stream) => ask(stream, ask_at).await,
                        Err(_) => (None, Box::new(())),
                    }
                }
            }
        }

        /// One connection: when the shim ended it, and the status line the
        /// client got.
        async fn connection(
            tls: bool,
            tls_at: u64,
            ask_at: Option<u64>,
        ) -> (Duration, Option<String>) {
            let dir = tempfile::tempdir().expect("a scratch dir");
            let (acceptor, connector) = crate::tls::test_ends(dir.path());
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let (ended, (status, _kept)) = tokio::join!(
                serve(theirs, tls.then_some(acceptor)),
                client(
                    ours,
                    tls.then_some(connector),
                    Duration::from_secs(tls_at),
                    ask_at.map(Duration::from_secs),
                ),
            );
            (ended, status)
        }

        #[tokio::test(start_paused = true)]
        async fn a_slow_tls_handshake_leaves_less_time_for_the_first_request() {
            // The handshake at 6 s, then nothing: closed at 10 s, not 10 s
            // after the handshake.
            let (ended, status) = connection(true, 6, None).await;
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            assert_eq!(status, None);
            // The handshake at 6 s, the request at 11 s: too late.
            let (ended, status) = connection(true, 6, Some(11)).await;
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            assert_eq!(status, None);
            // In plaintext, a request at 11 s is too late as well.
            let (ended, status) = connection(false, 0, Some(11)).await;
            assert_eq!(ended.as_secs(), 10, "{ended:?}");
            assert_eq!(status, None);
        }

        #[tokio::test(start_paused = true)]
        async fn a_first_request_within_the_window_is_answered_however_slow_the_handshake() {
            for (tls, tls_at, ask_at) in [(true, 9, 9), (true, 2, 9), (false, 0, 9)] {
                let (_, status) = connection(tls, tls_at, Some(ask_at)).await;
                assert_eq!(
                    status.as_deref(),
                    Some("HTTP/1.1 200 OK"),
                    "{tls} {tls_at} {ask_at}"
                );
            }
        }
    }

    fn doc() -> Value {
        serde_json::from_str(super::OPENAPI).expect("openapi.json is JSON")
    }

    /// The document served names the server's own ceiling on a policy's
    /// token lifetime, and the default a policy without one gets under
    /// it; the rest is the document as written.
    #[test]
    fn the_served_document_bounds_token_lifetimes_by_the_servers_ceiling() {
        for (ceiling, default) in [(3600, 300), (86_400, 300), (60, 60)] {
            let config = super::ShimConfig {
                max_token_ttl_secs: ceiling,
                ..Default::default()
            };
            let mut served: Value =
                serde_json::from_slice(&super::openapi_for(&config)).expect("JSON");
            let ttl =
                &mut served["components"]["schemas"]["Policy"]["properties"]["max_token_ttl_secs"];
            assert_eq!(
                (ttl["maximum"].clone(), ttl["default"].clone()),
                (ceiling.into(), default.into())
            );
            ttl["maximum"] = 3600.into();
            ttl["default"] = 300.into();
            assert_eq!(served, doc());
        }
    }

    /// Health requests that arrive while the vault is being asked share
    /// the next answer: twenty at once ask a slow vault a few times, not
    /// twenty, and every one is answered; twenty more that gave up while
    /// it was asked do not make it asked again.
    #[tokio::test]
    async fn health_requests_at_once_ask_the_vault_once_at_a_time() {
        use futures_util::{SinkExt, StreamExt};
        use protocol::{Message, MessageCodec};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let asked = std::sync::Arc::new(AtomicUsize::new(0));
        // A vault that takes 100 ms to answer each `Health`.
        let vault = tokio::spawn({
            let asked = asked.clone();
            async move {
                let (tcp, _) = listener.accept().await.expect("accept");
                let mut conn = tokio_util::codec::Framed::new(tcp, MessageCodec::new());
                while let Some(Ok(req)) = conn.next().await {
                    let answer = match req.message {
                        Message::Hello { .. } => Message::HelloOk {
                            role: "gateway".into(),
                            server: "slow".into(),
                        },
                        Message::Health => {
                            asked.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            Message::HealthInfo {
                                status: "ok".into(),
                                entries: 0,
                                signed_head: Vec::new(),
                            }
                        }
                        _ => Message::Pong,
                    };
                    if conn.send((req.request_id, answer)).await.is_err() {
                        break;
                    }
                }
            }
        });
        let link = super::VaultLink::new(client::ClientConfig {
            addr: addr.to_string(),
            tls: client::Tls::Plaintext,
            api_key: zeroize::Zeroizing::new("fvk_gateway".into()),
            client_name: "test".into(),
            timeout: std::time::Duration::from_secs(30),
        });
        let app = super::router(super::Shim::new(link, super::ShimConfig::default()));
        let health = || {
            axum::http::Request::get("/v1/health")
                .body(axum::body::Body::empty())
                .expect("request")
        };
        // Requests that give up while the vault is asked do not make it
        // asked again.
        let mut gone = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let app = app.clone();
            let req = health();
            gone.spawn(async move {
                let _ = tower::ServiceExt::oneshot(app, req).await;
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        gone.abort_all();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let app = app.clone();
            let req = health();
            calls.spawn(async move {
                tower::ServiceExt::oneshot(app, req)
                    .await
                    .expect("answered")
                    .status()
            });
        }
        while let Some(status) = calls.join_next().await {
            assert_eq!(status.expect("join"), axum::http::StatusCode::OK);
        }
        let n = asked.load(Ordering::SeqCst);
        assert!((1..=10).contains(&n), "the vault was asked {n} times");
        vault.abort();
    }

    /// With a metrics key, `/metrics` answers 401 (and `WWW-Authenticate:
    /// Bearer`) to a request without it or with another key, 200 with it,
    /// whether the vault answers or not; the served document says so.
    /// Without one, it answers anyone. A key too short or with a space is
    /// refused.
    #[tokio::test(start_paused = true)]
    async fn a_metrics_key_is_asked_for_when_set() {
        use axum::http::{header, Request, StatusCode};
        let key = "k".repeat(super::MetricsKey::MIN_LEN);
        assert!(super::MetricsKey::new(&key[1..]).is_err());
        assert!(super::MetricsKey::new(&format!("{key} x")).is_err());
        let scrape = |config: super::ShimConfig, auth: Option<String>| async move {
            // A vault nowhere: the scrape reports it down, and is served.
            let link = super::VaultLink::new(client::ClientConfig {
                addr: "127.0.0.1:9".into(),
                tls: client::Tls::Plaintext,
                api_key: zeroize::Zeroizing::new("fvk_none".into()),
                client_name: "test".into(),
                timeout: std::time::Duration::from_secs(1),
            });
            let app = super::router(super::Shim::new(link, config));
            let mut req = Request::get("/metrics");
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let r = tower::ServiceExt::oneshot(
                app,
                req.body(axum::body::Body::empty()).expect("request"),
            )
            .await
            .expect("answered");
            (
                r.status(),
                r.headers().get(header::WWW_AUTHENTICATE).cloned(),
            )
        };
        let keyed = || super::ShimConfig {
            metrics_key: Some(super::MetricsKey::new(&key).expect("a key")),
            ..Default::default()
        };
        for auth in [
            None,
            Some(format!("Bearer {}", "j".repeat(32))),
            Some(format!("Basic {key}")),
            Some(format!("Bearer {key}x")),
        ] {
            let (status, challenge) = scrape(keyed(), auth.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
            assert_eq!(
                challenge.as_ref().map(|v| v.as_bytes()),
                Some(&b"Bearer"[..])
            );
        }
        let (status, _) = scrape(keyed(), Some(format!("bearer {key}"))).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = scrape(super::ShimConfig::default(), None).await;
        assert_eq!(status, StatusCode::OK);
        let served: Value = serde_json::from_slice(&super::openapi_for(&keyed())).expect("JSON");
        let get = &served["paths"]["/metrics"]["get"];
        assert_eq!(get["security"], serde_json::json!([{"metrics_key": []}]));
        assert!(get["responses"]["401"].is_object());
        assert_eq!(
            served["components"]["securitySchemes"]["metrics_key"]["scheme"],
            "bearer"
        );
    }

    /// The document states the rules the handlers enforce, so that a
    /// request it calls valid is not refused as malformed (what a client
    /// generated from it, or a tool such as schemathesis, relies on).
    #[test]
    fn the_openapi_document_states_the_rules_the_handlers_enforce() {
        let d = doc();
        let schemas = &d["components"]["schemas"];
        assert_eq!(schemas["Id"]["pattern"], "^[!-~]{1,256}$");
        assert_eq!(schemas["Name"]["pattern"], "^[!-~]{1,128}$");
        // Ids: what `validate_subject` accepts, and nothing it refuses.
        for (id, ok) in [("cust-42", true), ("", false), ("a b", false), ("é", false)] {
            assert_eq!(
                storage::vault::validate_subject(id, true).is_ok(),
                ok,
                "{id:?}"
            );
        }
        assert!(storage::vault::validate_subject(&"x".repeat(256), true).is_ok());
        assert!(storage::vault::validate_subject(&"x".repeat(257), true).is_err());
        assert!(
            super::policy::is_name(&"x".repeat(128)) && !super::policy::is_name(&"x".repeat(129))
        );
        // Every path parameter is an id; every body may be refused as not
        // JSON (415).
        for (path, item) in d["paths"].as_object().expect("paths") {
            for p in item["parameters"].as_array().into_iter().flatten() {
                assert_eq!(p["schema"]["$ref"], "#/components/schemas/Id", "{path}");
            }
            for (method, op) in item.as_object().expect("path item") {
                if op.get("requestBody").is_some() {
                    assert!(op["responses"].get("415").is_some(), "{method} {path}");
                }
                // Every route that asks the vault something may meet a
                // refusal it has no status for (502, `vault_error`) or
                // stored state it cannot read (500); health answers 503
                // for any failure.
                if method != "parameters"
                    && path.starts_with("/v1/")
                    && !["/v1/openapi.json", "/v1/health"].contains(&path.as_str())
                {
                    for status in ["500", "502"] {
                        assert!(
                            op["responses"].get(status).is_some(),
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        // The kinds `/v1/logs` filters on are the log's.
        let logs = &d["paths"]["/v1/logs"]["get"]["parameters"];
        let param = |name: &str| {
            logs.as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                .map(|p| p["schema"].clone())
                .unwrap_or_else(|| panic!("no parameter {name}"))
        };
        let kinds: Vec<&str> = storage::Kind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(param("kind")["enum"], serde_json::json!(kinds));
        assert_eq!(
            (
                param("limit")["minimum"].clone(),
                param("limit")["maximum"].clone()
            ),
            (1.into(), 1000.into())
        );
        let policy = &schemas["Policy"]["properties"];
        assert_eq!(
            policy["max_token_ttl_secs"]["maximum"],
            super::ShimConfig::default().max_token_ttl_secs
        );
        // The hours the document allows are those the handler takes, but
        // for from = to, which only its description can say (a schema's
        // `not` of those pairs leaves schemathesis unable to generate
        // policies).
        let hours = &policy["allowed_hours_utc"];
        let range = |i: usize| {
            let item = &hours["prefixItems"][i];
            let bound = |k: &str| item[k].as_u64().expect("a bound");
            bound("minimum")..=bound("maximum")
        };
        assert!(hours["description"]
            .as_str()
            .is_some_and(|d| d.contains("from != to")));
        for from in 0u8..=30 {
            for to in 0u8..=30 {
                let documented =
                    range(0).contains(&u64::from(from)) && range(1).contains(&u64::from(to));
                assert_eq!(
                    documented && from != to,
                    storage::state::hours_in_range([from, to]),
                    "[{from}, {to}]"
                );
            }
        }
        // Members the handlers read as optional take null, and say so.
        for (schema, member) in [
            ("AuthorizeRequest", "fields"),
            ("Policy", "rate_limit_per_minute"),
            ("Policy", "allowed_hours_utc"),
            ("ConsentRequest", "expires_at"),
            ("CredentialRequest", "client_cert_sha256"),
            ("Policy", "max_token_ttl_secs"),
        ] {
            let types = &schemas[schema]["properties"][member]["type"];
            assert!(
                types.as_array().is_some_and(|t| t.contains(&"null".into())),
                "{schema}.{member}: {types}"
            );
        }
        let nulls = [
            serde_json::from_str::<super::api::AuthorizeRequest>(
                r#"{"subject_id": "s", "purpose": "p", "fields": null}"#,
            )
            .is_ok(),
            serde_json::from_str::<super::Policy>(
                r#"{"purposes": {}, "rate_limit_per_minute": null, "allowed_hours_utc": null}"#,
            )
            .is_ok(),
            serde_json::from_str::<super::api::ConsentRequest>(
                r#"{"purposes": ["p"], "expires_at": null}"#,
            )
            .is_ok(),
            serde_json::from_str::<super::api::CredentialRequest>(
                r#"{"role": "admin", "name": "n", "client_cert_sha256": null}"#,
            )
            .is_ok(),
        ];
        assert_eq!(nulls, [true; 4]);
    }
}
