//! `POST /v1/authorize` through the HTTP shim, next to `GET /v1/health`.
//!
//! Setup (not timed): a vault seeded as `vaultd dev` seeds it
//! ([`crate::dev::seed`]: demo records, consents, one key per role) and
//! `vaultd` with its shim in this process, the demo policies applied at
//! start with one change: the demo partner's rate limit (600 per minute)
//! is lifted, since a benchmark of grants would otherwise measure denials.
//!
//! Timed, in this order, with the same `clients` keep-alive HTTP/1.1
//! connections (hyper's client), one request at a time on each:
//!
//! 1. baseline: `GET /v1/health`, `requests` times. The shim asks the
//!    vault for its health over its gateway connection; nothing is written.
//! 2. `POST /v1/authorize` for the demo partner, subject and purpose,
//!    `requests` times. Each grant looks up the key, the policy and the
//!    consent, and mints a token: a durable `token_minted` entry in the
//!    log before the answer leaves.
//!
//! The audit entries written are counted from the vault's entry count
//! (read through `/v1/health`) before and after the authorize phase.
//!
//! Against a running `vaultd` (`run_remote`) the same phases go to its
//! shim, over the TLS of its protocol port or in plaintext, for a partner
//! and subject the run makes over the protocol and removes afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use storage::Vault;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::inproc::{self, InProcess};
use super::tail::{DiskTrace, Recorder, Tail};
use super::{
    check, create_vault, join_each, thousands, Latency, LatencyTable, Pace, Progress, TargetInfo,
};
use crate::dev::{self, DemoKeys, DEMO_PURPOSE, DEMO_RECORDS};
use crate::shim::PoliciesFile;
use crate::{Error, Result};

/// Parameters of [`super::Workload::Authorize`].
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizeParams {
    /// Concurrent keep-alive connections (default 50).
    pub clients: usize,
    /// Requests per phase (default 20,000).
    pub requests: u64,
    /// Requests per second on a schedule (`bench::Pace`: open loop,
    /// latency from each request's due time when no connection was free);
    /// `None`: each connection sends as soon as it has its last answer.
    pub rate: Option<f64>,
    /// Each phase also ends after this long, with fewer requests than
    /// `requests` if need be.
    #[serde(rename = "duration_s", serialize_with = "super::secs_opt")]
    pub duration: Option<std::time::Duration>,
    /// Against a running `vaultd` (`--addr`): its HTTP shim's HOST:PORT,
    /// by default the host of `--addr` on port 8080. Spoken to with the
    /// protocol's TLS (the same CA and server name), or in plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
}

impl Default for AuthorizeParams {
    fn default() -> Self {
        AuthorizeParams {
            clients: 50,
            requests: 20_000,
            rate: None,
            duration: None,
            http_addr: None,
        }
    }
}

/// Most requests a phase makes.
pub const MAX_REQUESTS: u64 = 100_000_000;

/// The shim serves at most 1,024 connections by default, and the run
/// opens one more beside its clients' to read the log's size.
const MAX_HTTP_CLIENTS: usize = 1023;

impl AuthorizeParams {
    pub(super) fn validate(&self) -> Result<()> {
        check((1..=MAX_HTTP_CLIENTS).contains(&self.clients), || {
            format!(
                "--clients must be between 1 and {MAX_HTTP_CLIENTS} (the shim serves 1,024 \
                 connections, and the run opens one beside its clients'; against --addr, a \
                 vaultd serves one address 256 of them unless --http-max-connections-per-peer \
                 says more)"
            )
        })?;
        check((1..=MAX_REQUESTS).contains(&self.requests), || {
            format!(
                "--requests must be between 1 and {}",
                thousands(MAX_REQUESTS)
            )
        })?;
        super::check_rate(self.rate)
    }
}

/// Result of [`super::Workload::Authorize`].
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizeReport {
    pub target: TargetInfo,
    pub params: AuthorizeParams,
    /// `POST /v1/authorize`, every answer a grant (200).
    pub authorize: HttpRun,
    /// `GET /v1/health` with the same clients, before the authorize phase.
    pub health: HttpRun,
    /// Authorizations/s over health requests/s.
    pub ratio_vs_health: f64,
    /// Log entries written during the authorize phase (one `token_minted`
    /// per grant).
    pub audit_entries: u64,
    /// Where an authorization's time goes, from the process's metrics over
    /// the authorize phase: mean µs of each shim → vault request by
    /// operation (`context`, `mint`), and
    /// `server:mint`, the protocol server's own time for a mint (request
    /// to durable receipt).
    pub vault_mean_us: BTreeMap<String, f64>,
    /// The engine's commit pipeline over the authorize phase (its
    /// `fdatasync`s and how long they took; `records_per_sync` counts
    /// grants).
    pub pipeline: Option<super::PipelineRun>,
}

/// One timed phase.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRun {
    pub requests: u64,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    /// Until the whole body is read, from sending the request; with a
    /// rate, from its due time when it found no connection free.
    pub latency_us: Latency,
    /// With a rate: the requests that found no connection free at their
    /// due time (the connections, not the server, set the pace of those).
    pub behind_schedule: Option<u64>,
    /// The requests slower than the p99: when they began, and what the
    /// data dir's disk did meanwhile ([`super::tail`]).
    pub tail: Tail,
}

/// Runs the workload against a `vaultd` started here, data under `dir`.
pub(super) async fn run(
    dir: &Path,
    mut info: TargetInfo,
    p: &AuthorizeParams,
    progress: Progress,
) -> Result<AuthorizeReport> {
    let vault_dir = dir.join("vault");
    super::ensure_fresh(std::slice::from_ref(&vault_dir))?;
    let vault = create_vault(vault_dir.clone()).await?;
    let disk = DiskTrace::start(&vault_dir);
    let (keys, policies) = prepare(&vault).await?;
    let server = InProcess::start(
        vault,
        dir,
        inproc::Options {
            tls: false,
            http: true,
            policies: Some(policies),
            max_connections: None,
        },
    )
    .await?;
    info.addr = server.http.map(|a| a.to_string());
    let measured = match server.http {
        Some(addr) => {
            let target = HttpTarget::plain(addr);
            let call = authorize_call(&keys.partner);
            measure(&target, &call, true, p, disk.as_deref(), progress).await
        }
        None => Err(Error::Usage("the shim did not start".into())),
    };
    let stopped = server.stop().await;
    let report = measured?;
    stopped?;
    Ok(report.into_report(info, p))
}

/// Runs the workload against the shim of a running `vaultd`, as an admin
/// of it (`config`): a partner, its policy (purpose `bench`, no rate
/// limit), a subject with a record and its consent, made for the run over
/// the protocol under a `vault-bench-<hex>` name, then the credential
/// revoked and the subject shredded, after a failure or Ctrl-C too. The
/// grants' `token_minted` entries stay in the log, as every audit entry
/// does; their tokens go unredeemed. The audit entries counted are every
/// entry the vault wrote meanwhile, other clients' included; the vault
/// request times are read from the server's `GET /metrics`, and the
/// commit pipeline is not known.
pub(super) async fn run_remote(
    config: &client::ClientConfig,
    p: &AuthorizeParams,
    progress: Progress,
) -> Result<AuthorizeReport> {
    let http_addr = match &p.http_addr {
        Some(a) => a.clone(),
        None => default_http_addr(&config.addr),
    };
    let target = HttpTarget {
        addr: http_addr.clone(),
        tls: client::Connector::new(config.clone())?.tls(),
    };
    // No baseline runs beside it: no scratch dir.
    let info = TargetInfo {
        addr: Some(http_addr),
        ..super::remote::info(config)
    };
    let mut run = super::remote::Remote::connect(config, "authorize").await?;
    let names = super::redeem::Names {
        partner: &run.name,
        subject: &run.name,
        ttl_secs: 0,
    };
    let (target, subject) = (&target, run.name.as_str());
    let measured = run
        .interrupts
        .until(
            super::redeem::prepare_partner(&run.admin, &names, &mut run.made),
            |partner_key| async move {
                let call = authorize_call_for(&partner_key, subject, super::redeem::PURPOSE);
                measure(target, &call, false, p, None, progress).await
            },
        )
        .await;
    let report = run.finish(measured).await?;
    Ok(report.into_report(info, p))
}

/// The shim of the `vaultd` at `vault_addr`: its host, port 8080.
fn default_http_addr(vault_addr: &str) -> String {
    match client::config::host_of(vault_addr) {
        host if host.contains(':') => format!("[{host}]:8080"),
        host => format!("{host}:8080"),
    }
}

/// What [`measure`] found.
struct Measured {
    health: HttpRun,
    authorize: HttpRun,
    audit_entries: u64,
    vault_mean_us: BTreeMap<String, f64>,
    pipeline: Option<super::PipelineRun>,
}

impl Measured {
    fn into_report(self, target: TargetInfo, p: &AuthorizeParams) -> AuthorizeReport {
        AuthorizeReport {
            target,
            params: p.clone(),
            ratio_vs_health: self.authorize.requests_per_s / self.health.requests_per_s,
            authorize: self.authorize,
            health: self.health,
            audit_entries: self.audit_entries,
            vault_mean_us: self.vault_mean_us,
            pipeline: self.pipeline,
        }
    }
}

/// Seeds `vault` as `vaultd dev` does; returns the demo keys and the demo
/// policies without their rate limits, for the shim to apply at start.
pub(super) async fn prepare(vault: &Vault) -> Result<(DemoKeys, PoliciesFile)> {
    let keys = dev::seed(vault, true).await?;
    let mut policies = dev::demo_policies()?;
    for policy in policies.partners.values_mut() {
        policy.rate_limit_per_minute = None;
    }
    Ok((keys, policies))
}

/// `GET /v1/health`: no authentication, nothing written.
pub(super) fn health_call() -> Call {
    Call {
        method: Method::GET,
        path: "/v1/health",
        bearer: None,
        body: Bytes::new(),
    }
}

/// `POST /v1/authorize` for the demo partner (API key `partner_key`),
/// subject and purpose: a grant, and a durable `token_minted` entry.
pub(super) fn authorize_call(partner_key: &str) -> Call {
    authorize_call_for(partner_key, DEMO_RECORDS[0].0, DEMO_PURPOSE)
}

/// `POST /v1/authorize` of `subject`'s record for `purpose`, with the
/// partner API key `partner_key`.
fn authorize_call_for(partner_key: &str, subject: &str, purpose: &str) -> Call {
    let body = serde_json::json!({"subject_id": subject, "purpose": purpose});
    Call {
        method: Method::POST,
        path: "/v1/authorize",
        bearer: Some(format!("Bearer {partner_key}")),
        body: Bytes::from(body.to_string()),
    }
}

/// Times the health phase then the authorize phase (`authorize`) on
/// `p.clients` connections to `target`. The vault request times come
/// from this process's metrics when the shim runs here (`in_process`,
/// with the commit pipeline), else from the server's `GET /metrics`.
async fn measure(
    target: &HttpTarget,
    authorize: &Call,
    in_process: bool,
    p: &AuthorizeParams,
    disk: Option<&DiskTrace>,
    progress: Progress,
) -> Result<Measured> {
    let mut conns = Vec::with_capacity(p.clients);
    for _ in 0..p.clients {
        conns.push(connect_to(target).await?);
    }
    let health = health_call();
    let (conns, health_run) =
        phase("GET /v1/health", conns, target, &health, p, disk, progress).await?;
    // A server's metrics that cannot be read leave the means out, not
    // the run.
    let metrics = || async {
        if in_process {
            return crate::metrics::global().render();
        }
        let scraped = async {
            let mut c = connect_to(target).await?;
            send(&mut c, &target.addr, &metrics_call()).await
        };
        match scraped.await {
            Ok(body) => String::from_utf8_lossy(&body).into_owned(),
            Err(e) => {
                tracing::warn!(error = %e, "GET /metrics: no vault request times");
                String::new()
            }
        }
    };
    let before = entries(target).await?;
    let ops_before = op_times(&metrics().await);
    let pipeline_before = in_process.then(super::PipelineRun::watched);
    let (conns, auth_run) = phase(
        "POST /v1/authorize",
        conns,
        target,
        authorize,
        p,
        disk,
        progress,
    )
    .await?;
    let ops_after = op_times(&metrics().await);
    let pipeline =
        pipeline_before.and_then(|b| super::PipelineRun::since_watched(b, auth_run.requests));
    drop(conns);
    let after = entries(target).await?;
    tracing::debug!(before, after, "authorize phase");
    // Each grant is answered only once its `token_minted` entry is
    // durable: fewer entries than grants is a grant without its audit
    // entry, which fails the run rather than count as a throughput.
    let audit_entries = after.saturating_sub(before);
    if audit_entries < auth_run.requests {
        return Err(Error::Usage(format!(
            "{} authorizations granted but the log grew by {audit_entries} entries: a grant was \
             answered without its audit entry",
            auth_run.requests
        )));
    }
    let vault_mean_us = ops_after
        .iter()
        // A server's `GET /metrics` asks the vault for its health first:
        // the measurement's own request, not the workload's.
        .filter(|(op, _)| in_process || op.as_str() != "health")
        .filter_map(|(op, (sum, n))| {
            let (sum0, n0) = ops_before.get(op).copied().unwrap_or((0.0, 0));
            (*n > n0).then(|| (op.clone(), (sum - sum0) / (n - n0) as f64 * 1e6))
        })
        .collect();
    Ok(Measured {
        health: health_run,
        authorize: auth_run,
        audit_entries,
        vault_mean_us,
        pipeline,
    })
}

/// (sum of seconds, count) by operation of the shim's vault requests
/// (`op`) and of the protocol server's durable writes (`server:op`), from
/// the Prometheus text of the process's metrics.
fn op_times(text: &str) -> BTreeMap<String, (f64, u64)> {
    let mut out: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for line in text.lines() {
        for (family, prefix) in [
            ("fintrust_vault_request_seconds", ""),
            ("fintrust_commit_seconds", "server:"),
        ] {
            let Some(rest) = line.strip_prefix(family) else {
                continue;
            };
            let (is_sum, rest) = if let Some(r) = rest.strip_prefix("_sum{op=\"") {
                (true, r)
            } else if let Some(r) = rest.strip_prefix("_count{op=\"") {
                (false, r)
            } else {
                continue;
            };
            let Some((op, value)) = rest.split_once("\"} ") else {
                continue;
            };
            let e = out.entry(format!("{prefix}{op}")).or_default();
            if is_sum {
                e.0 = value.trim().parse().unwrap_or(0.0);
            } else {
                e.1 = value.trim().parse().unwrap_or(0);
            }
        }
    }
    out
}

/// One request shape, sent many times.
#[derive(Debug, Clone)]
pub(super) struct Call {
    method: Method,
    path: &'static str,
    bearer: Option<String>,
    body: Bytes,
}

pub(super) type Conn = SendRequest<Full<Bytes>>;

/// `GET /metrics`: the server's Prometheus text.
fn metrics_call() -> Call {
    Call {
        method: Method::GET,
        path: "/metrics",
        bearer: None,
        body: Bytes::new(),
    }
}

/// Where HTTP requests go: the shim's HOST:PORT, and the TLS spoken to
/// it (`None`: plaintext).
pub(super) struct HttpTarget {
    addr: String,
    tls: Option<client::TlsLink>,
}

impl HttpTarget {
    fn plain(addr: SocketAddr) -> HttpTarget {
        HttpTarget {
            addr: addr.to_string(),
            tls: None,
        }
    }
}

/// A keep-alive HTTP/1.1 connection to the shim at `addr`, in plaintext.
pub(super) async fn connect(addr: SocketAddr) -> Result<Conn> {
    connect_to(&HttpTarget::plain(addr)).await
}

/// How long a connection (its TLS handshake included) or a request may
/// take before the run fails: a shim that stopped answering ends the run
/// with an error naming it, rather than hanging it. As long as the client
/// crate's own default.
const HTTP_TIMEOUT: std::time::Duration = client::DEFAULT_TIMEOUT;

/// A keep-alive HTTP/1.1 connection to `target`, within [`HTTP_TIMEOUT`].
async fn connect_to(target: &HttpTarget) -> Result<Conn> {
    tokio::time::timeout(HTTP_TIMEOUT, connect_now(target))
        .await
        .map_err(|_| {
            Error::Usage(format!(
                "{}: no connection within {} s",
                target.addr,
                HTTP_TIMEOUT.as_secs()
            ))
        })?
}

async fn connect_now(target: &HttpTarget) -> Result<Conn> {
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let io = |source| Error::File {
        path: format!("{scheme}://{}", target.addr),
        error: source,
    };
    let tcp = TcpStream::connect(target.addr.as_str()).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    match &target.tls {
        None => handshake(tcp).await,
        Some(tls) => {
            let stream = tls.wrap(tcp).await.map_err(|e| {
                Error::Usage(format!("{scheme}://{}: TLS handshake: {e}", target.addr))
            })?;
            handshake(stream).await
        }
    }
}

async fn handshake<S>(stream: S) -> Result<Conn>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_error)?;
    // Drives the connection until the sender is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

fn http_error(e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("HTTP client: {e}"))
}

/// Sends `call` and reads the whole answer, within [`HTTP_TIMEOUT`]; a
/// status other than 200 is an error naming the answer.
pub(super) async fn send(conn: &mut Conn, addr: &str, call: &Call) -> Result<Bytes> {
    tokio::time::timeout(HTTP_TIMEOUT, send_now(conn, addr, call))
        .await
        .map_err(|_| {
            Error::Usage(format!(
                "{} {} to {addr}: no answer within {} s",
                call.method,
                call.path,
                HTTP_TIMEOUT.as_secs()
            ))
        })?
}

async fn send_now(conn: &mut Conn, addr: &str, call: &Call) -> Result<Bytes> {
    let mut req = Request::builder()
        .method(call.method.clone())
        .uri(call.path)
        .header(header::HOST, addr);
    if let Some(b) = &call.bearer {
        req = req
            .header(header::AUTHORIZATION, b.as_str())
            .header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(call.body.clone())).map_err(http_error)?;
    conn.ready().await.map_err(http_error)?;
    let resp = conn.send_request(req).await.map_err(http_error)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(http_error)?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(Error::Usage(format!(
            "{} {} answered {status}: {}",
            call.method,
            call.path,
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(body)
}

/// The vault's entry count, from `/v1/health`.
async fn entries(target: &HttpTarget) -> Result<u64> {
    let mut c = connect_to(target).await?;
    let body = send(&mut c, &target.addr, &health_call()).await?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("entries").and_then(serde_json::Value::as_u64))
        .ok_or_else(|| Error::Usage("/v1/health did not give an entry count".into()))
}

/// Every connection sends `call` until `p.requests` were sent, each as
/// soon as it has its last answer or, with `p.rate`, on the schedule;
/// gives the connections back for the next phase.
async fn phase(
    name: &str,
    conns: Vec<Conn>,
    target: &HttpTarget,
    call: &Call,
    p: &AuthorizeParams,
    disk: Option<&DiskTrace>,
    progress: Progress,
) -> Result<(Vec<Conn>, HttpRun)> {
    let bar = progress.phase(name, p.requests);
    let call = Arc::new(call.clone());
    let start = Instant::now();
    let pace = Arc::new(Pace::new(p.rate, p.requests, start).until(p.duration.map(|d| start + d)));
    let host: Arc<str> = Arc::from(target.addr.as_str());
    let mut set = JoinSet::new();
    for mut c in conns {
        let (pace, call, bar, host) = (pace.clone(), call.clone(), bar.clone(), host.clone());
        set.spawn(async move {
            let mut rec = Recorder::new(start);
            while let Some(turn) = pace.take() {
                let from = turn.start().await;
                send(&mut c, &host, &call).await?;
                rec.record(from);
                bar.inc(1);
            }
            Ok::<_, Error>((c, rec))
        });
    }
    let mut rec = Recorder::new(start);
    let mut back = Vec::new();
    join_each(set, |(c, r)| {
        rec.merge(r);
        back.push(c);
    })
    .await?;
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let hist = &rec.hist;
    let latency_us = Latency::of(hist);
    Ok((
        back,
        HttpRun {
            requests: hist.len(),
            elapsed_s: secs,
            requests_per_s: hist.len() as f64 / secs,
            latency_us,
            behind_schedule: pace.behind_schedule(),
            tail: rec.tail(disk),
        },
    ))
}

impl AuthorizeReport {
    pub(super) fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench authorize: {}", self.target.describe());
        let per_phase = match self.params.duration {
            Some(d) if self.params.requests == MAX_REQUESTS => format!("{:.1} s", d.as_secs_f64()),
            Some(d) => format!(
                "{} requests or {:.1} s",
                thousands(self.params.requests),
                d.as_secs_f64()
            ),
            None => format!("{} requests", thousands(self.params.requests)),
        };
        let _ = write!(
            s,
            "  {} clients on keep-alive HTTP/1.1 connections, {per_phase} per phase",
            self.params.clients,
        );
        match self.params.rate {
            Some(rate) => {
                let _ = writeln!(
                    s,
                    ", scheduled at {}/s (open loop)",
                    thousands(rate.round() as u64)
                );
            }
            None => {
                let _ = writeln!(s);
            }
        }
        let _ = writeln!(s);
        let table = LatencyTable { name: 24, extra: 8 };
        table.header(&mut s, "per s", "ratio");
        let row = |s: &mut String, name: &str, r: &HttpRun, ratio: &str| {
            table.row(s, name, r.requests_per_s, ratio, &r.latency_us);
        };
        row(
            &mut s,
            "POST /v1/authorize",
            &self.authorize,
            &format!("{:.2}x", self.ratio_vs_health),
        );
        row(&mut s, "GET /v1/health", &self.health, "");
        let _ = writeln!(s);
        let _ = write!(
            s,
            "  audit entries written: {} for {} grants; ratio: authorize per s over health per s",
            thousands(self.audit_entries),
            thousands(self.authorize.requests)
        );
        if let (Some(a), Some(h)) = (self.authorize.behind_schedule, self.health.behind_schedule) {
            let _ = write!(
                s,
                "\n  behind schedule (no connection free at the due time; latency from it): \
                 authorize {}, health {}",
                thousands(a),
                thousands(h)
            );
        }
        if !self.vault_mean_us.is_empty() {
            let parts: Vec<String> = self
                .vault_mean_us
                .iter()
                .map(|(op, us)| format!("{op} {us:.0}"))
                .collect();
            let _ = write!(
                s,
                "\n  mean µs per vault request during authorize: {}",
                parts.join(", ")
            );
        }
        if let Some(pl) = &self.pipeline {
            let _ = write!(s, "\n  during authorize: {}", pl.describe());
        }
        s.push_str(&super::tail::section([
            self.health.tail.describe("GET /v1/health"),
            self.authorize.tail.describe("POST /v1/authorize"),
        ]));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim of a vault at HOST:PORT is at HOST:8080, an IPv6 host in
    /// brackets again.
    #[test]
    fn the_default_shim_is_port_8080_of_the_vaults_host() {
        assert_eq!(
            default_http_addr("vault.example:9999"),
            "vault.example:8080"
        );
        assert_eq!(default_http_addr("10.0.0.7:7000"), "10.0.0.7:8080");
        assert_eq!(default_http_addr("[::1]:9999"), "[::1]:8080");
    }

    /// A shim that takes the connection and never answers fails the
    /// request once `HTTP_TIMEOUT` has passed, with an error naming it,
    /// instead of hanging the run.
    #[tokio::test]
    async fn a_shim_that_never_answers_fails_the_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.expect("accept");
            // Held, never read from or written to.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            drop(sock);
        });
        let mut c = connect(addr).await.expect("connected");
        // Connected in real time; the wait for the answer on the paused
        // clock, which jumps to the deadline once nothing else can run.
        tokio::time::pause();
        let started = tokio::time::Instant::now();
        let e = send(&mut c, &addr.to_string(), &health_call())
            .await
            .expect_err("no answer");
        assert!(e.to_string().contains("no answer within 30 s"), "{e}");
        assert!(started.elapsed() >= HTTP_TIMEOUT);
        held.abort();
    }
}
