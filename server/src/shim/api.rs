//! The routes of the HTTP shim and the JSON they speak.
//!
//! Every error is `{"error": "<stable code>", "message": "..."}` with a
//! 4xx or 5xx status, including malformed JSON, unknown fields and wrong
//! types (axum's rejections are mapped here), unknown routes and methods.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use client::{Client, ClientError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use storage::Kind;

use super::link::is_transport;
use super::policy::{self, Consent, Denial, Policy};
use super::Shim;
use crate::metrics::{DecisionLabels, OpLabels, RouteLabels, RouteOnly};

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn unauthenticated() -> Self {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "send a valid API key as `Authorization: Bearer <key>`",
        )
    }

    fn unavailable() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "vault_unavailable",
            "the vault cannot be reached; nothing was done",
        )
    }

    fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Maps a vault error to an HTTP error.
/// The stable codes of `http.md` stand for the vault's where the two
/// differ (`invalid_request`, `vault_unavailable`), so that a client
/// branches on one code whichever side refused.
fn vault_error(e: &ClientError) -> ApiError {
    match e {
        ClientError::Server { code, message } => {
            let (status, name) = match code {
                ErrorCode::Unauthenticated => return ApiError::unauthenticated(),
                ErrorCode::Invalid | ErrorCode::Malformed => {
                    (StatusCode::BAD_REQUEST, "invalid_request")
                }
                ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "vault_unavailable"),
                ErrorCode::Forbidden | ErrorCode::WrongPartner => {
                    (StatusCode::FORBIDDEN, code.name())
                }
                ErrorCode::NotFound => (StatusCode::NOT_FOUND, code.name()),
                ErrorCode::Conflict => (StatusCode::CONFLICT, code.name()),
                ErrorCode::SubjectShredded => (StatusCode::GONE, code.name()),
                ErrorCode::RateLimited => (StatusCode::TOO_MANY_REQUESTS, code.name()),
                _ => (StatusCode::BAD_GATEWAY, code.name()),
            };
            ApiError::new(status, name, message.clone())
        }
        ClientError::Config(m) => ApiError::internal(m.clone()),
        // Not "nothing was done": the vault answered, and a write it was
        // asked for may be in the log.
        ClientError::BadReceipt(_) | ClientError::BadKeyChain(_) | ClientError::Rollback { .. } => {
            tracing::error!(error = %e, "an answer of the vault failed its check");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "internal",
                format!(
                    "an answer of the vault failed its check ({e}); what the request asked for \
                     may or may not have been done"
                ),
            )
        }
        _ => ApiError::unavailable(),
    }
}

/// [`vault_error`] for a call that writes to the log, made on a
/// connection that was up: a connection that fails then may have carried
/// the request, and the vault may have written what it was asked to, so
/// the 503 does not say that nothing was done.
fn written_error(e: &ClientError) -> ApiError {
    // Never sent: nothing was written.
    if !is_transport(e) || matches!(e, ClientError::NotSent) {
        return vault_error(e);
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "vault_unavailable",
        format!(
            "the vault's connection failed during the request ({e}); a log entry it was \
             asked to write may or may not have been written (GET /v1/logs shows it)"
        ),
    )
}

/// [`vault_error`] for the shim's own gateway connection: the vault
/// refusing the gateway key (revoked, or not the vault's) is the shim's
/// configuration, a 500, not the caller's key (401).
fn gateway_error(e: &ClientError) -> ApiError {
    match e {
        ClientError::Server {
            code: ErrorCode::Unauthenticated,
            ..
        } => ApiError::internal(
            "the vault refuses the shim's gateway key (revoked, or another vault's); nothing was done",
        ),
        _ => vault_error(e),
    }
}

/// JSON bodies with the error shape above for every rejection.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is over the limit",
            )
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
        }
        JsonRejection::JsonDataError(e) => ApiError::bad_request(e.body_text()),
        other => ApiError::bad_request(other.body_text()),
    }
}

/// Path parameters with the error shape above.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|r: PathRejection| ApiError::bad_request(r.body_text()))
    }
}

/// Query strings with the error shape above.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|r: QueryRejection| ApiError::bad_request(r.body_text()))
    }
}

/// The bearer key of a request, read before its path, query or body: a
/// request without a well-formed key is refused with 401 whatever else it
/// holds, so nothing more of it is parsed.
pub struct Bearer(zeroize::Zeroizing<String>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(..)")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        bearer(&parts.headers).map(|k| Bearer(zeroize::Zeroizing::new(k.to_string())))
    }
}

/// The bearer key of a request: `fvk_` keys of at most 128 bytes. The
/// scheme's name is case-insensitive (RFC 9110, section 11.1).
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::unauthenticated)?;
    let key = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .ok_or_else(ApiError::unauthenticated)?;
    if !key.starts_with(storage::vault::API_KEY_PREFIX) || key.len() > 128 {
        return Err(ApiError::unauthenticated());
    }
    Ok(key)
}

fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
    storage::vault::validate_subject(id, true).map_err(|_| {
        ApiError::bad_request(format!(
            "{what}: 1 to 256 printable ASCII characters without spaces"
        ))
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// RFC 3339 (UTC, milliseconds) of unix milliseconds. RFC 3339 has four
/// digits for the year: a later time is shown as the last millisecond of
/// 9999, never earlier than it is.
pub fn rfc3339(ms: u64) -> String {
    /// 9999-12-31T23:59:59.999Z.
    const LAST_MS: u64 = 253_402_300_799_999;
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms.min(LAST_MS)) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Unix milliseconds of an RFC 3339 time; one before 1970 is 0, since
/// every time the vault keeps is later (a consent that expired then has
/// expired, a range that starts then starts at the log's beginning).
fn parse_rfc3339(what: &str, s: &str) -> Result<u64, ApiError> {
    Ok(u64::try_from(rfc3339_nanos(what, s)? / 1_000_000).unwrap_or(0))
}

/// [`parse_rfc3339`] rounded up to the next millisecond: a bound of
/// `/v1/logs`, whose entries are stamped in milliseconds, so that
/// `[since, until)` holds exactly for a bound finer than that.
fn parse_rfc3339_ceil(what: &str, s: &str) -> Result<u64, ApiError> {
    let nanos = rfc3339_nanos(what, s)?;
    Ok(
        u64::try_from(nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0))
            .unwrap_or(0),
    )
}

fn rfc3339_nanos(what: &str, s: &str) -> Result<i128, ApiError> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            // A `+` of an offset arrives as a space unless it is
            // percent-encoded (`%2B`), as in any query string.
            let hint = if s.contains(' ') {
                " (write the `+` of an offset as %2B)"
            } else {
                ""
            };
            ApiError::bad_request(format!("{what}: not an RFC 3339 time{hint}"))
        })?;
    Ok(t.unix_timestamp_nanos())
}

impl Shim {
    /// Counts an authorization in `fintrust_authorizations_total`.
    fn decided(&self, outcome: &'static str, reason: &'static str) {
        self.metrics
            .authorizations
            .get_or_create(&DecisionLabels { outcome, reason })
            .inc();
    }

    /// Runs `f` on the gateway connection, timing it; a transport failure
    /// drops the connection (the next request reconnects) and is a 503.
    async fn gw<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = client::Result<T>>,
    {
        let started = Instant::now();
        let took = || {
            self.metrics
                .vault_seconds
                .get_or_create(&OpLabels { op })
                .observe(started.elapsed().as_secs_f64())
        };
        let c = self.link.gateway().await.map_err(|e| {
            // A failed connect is timed too: under an outage, the slowest
            // calls are these.
            took();
            tracing::warn!(error = %e, "cannot reach the vault");
            gateway_error(&e)
        })?;
        let r = f(c.clone()).await;
        took();
        r.map_err(|e| {
            if !is_transport(&e) {
                return gateway_error(&e);
            }
            tracing::warn!(error = %e, op, "vault connection failed");
            let link = self.link.clone();
            tokio::spawn(async move { link.reset(&c).await });
            // Reads asked nothing to be written: nothing was done.
            if matches!(op, "context" | "health" | "whois") {
                vault_error(&e)
            } else {
                written_error(&e)
            }
        })
    }

    /// A connection as the caller whose bearer key is `key`. To a vault
    /// of another process, the key is first looked up over the gateway's
    /// connection: an unknown one is refused (401) without a connection
    /// of its own, which costs a TLS handshake and one of the vault's
    /// handshake places, so that made-up keys cannot crowd out partners'.
    async fn caller(&self, key: &Bearer) -> Result<Client, ApiError> {
        if !self.link.is_local() {
            let hash = *blake3::hash(key.0.as_bytes()).as_bytes();
            let known = self
                .gw("whois", |c| async move { c.whois(hash).await })
                .await?;
            if known.is_none() {
                return Err(vault_error(&ClientError::Server {
                    code: ErrorCode::Unauthenticated,
                    message: "no such API key".into(),
                }));
            }
        }
        self.link
            .as_caller(&key.0)
            .await
            .map_err(|e| vault_error(&e))
    }
}

/// Body of `POST /v1/authorize`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub subject_id: String,
    pub purpose: String,
    #[serde(default)]
    pub fields: Option<Vec<String>>,
}

/// Answer of a granted authorization. Its token is wiped as it is dropped
/// (once serialized into the response's body), and `Debug` leaves it out.
#[derive(Serialize)]
pub struct AuthorizeResponse {
    #[serde(serialize_with = "secret_str")]
    pub token: zeroize::Zeroizing<String>,
    pub vault_addr: String,
    pub expires_at: String,
    pub fields: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for AuthorizeResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizeResponse")
            .field("vault_addr", &self.vault_addr)
            .field("expires_at", &self.expires_at)
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

fn secret_str<S: serde::Serializer>(
    s: &zeroize::Zeroizing<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(s)
}

/// Where a request comes from: the TCP peer, or behind a trusted reverse
/// proxy the client its `X-Forwarded-For` names ([`crate::proxied`]); 400
/// when a trusted proxy wrote something that is not an address.
#[derive(Debug)]
pub struct ClientSource(pub crate::proxied::Source);

impl FromRequestParts<Arc<Shim>> for ClientSource {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        shim: &Arc<Shim>,
    ) -> Result<Self, ApiError> {
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .ok_or_else(|| ApiError::internal("the connection's peer address is unknown"))?;
        let source = shim.config.trusted_proxies.source(
            peer.ip(),
            &parts.headers,
            shim.config.forwarded_header,
        );
        if shim.config.trusted_proxies.trusts(peer.ip()) {
            let outcome = match &source {
                Ok(s) if s.proxy.is_some() => "forwarded",
                Ok(_) => "none",
                Err(_) => "refused",
            };
            crate::metrics::global()
                .forwarded_headers
                .get_or_create(&crate::metrics::OutcomeLabels { outcome })
                .inc();
        }
        source.map(ClientSource).map_err(|e| {
            // A trusted proxy that writes something else is
            // misconfigured: every client behind it is refused. The
            // entry itself may be a client's address: not logged.
            tracing::warn!(
                proxy = %peer.ip(),
                header = e.header,
                "request from a trusted proxy refused: its forwarding header names no address"
            );
            ApiError::bad_request(e.to_string())
        })
    }
}

pub async fn authorize(
    State(shim): State<Arc<Shim>>,
    Bearer(key): Bearer,
    ClientSource(source): ClientSource,
    ApiJson(req): ApiJson<AuthorizeRequest>,
) -> Result<axum::Json<AuthorizeResponse>, ApiError> {
    check_id("subject_id", &req.subject_id)?;
    if !policy::is_name(&req.purpose) {
        return Err(ApiError::bad_request(
            "purpose: 1 to 128 printable ASCII characters without spaces",
        ));
    }
    if let Some(fields) = &req.fields {
        if fields.is_empty() || fields.len() > 256 {
            return Err(ApiError::bad_request(
                "fields: 1 to 256 names when given (leave it out for every field the purpose allows)",
            ));
        }
        if !fields.iter().all(|f| policy::is_name(f)) {
            return Err(ApiError::bad_request(
                "fields: each name 1 to 128 printable ASCII characters without spaces",
            ));
        }
    }
    let hash = *blake3::hash(key.as_bytes()).as_bytes();
    // Who holds the key, its policy and the subject's consent for it: one
    // round trip (`Context`), read afresh for every request.
    let subject = req.subject_id.clone();
    let ctx = shim
        .gw("context", |c| async move { c.context(hash, subject).await })
        .await?
        .ok_or_else(ApiError::unauthenticated)?;
    let who = ctx.identity;
    if who.role != "partner" {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only partner keys may authorize",
        ));
    }
    let partner = who.name;
    let now = now_ms();
    let stored = (ctx.policy, ctx.consent);
    let denial = match decide(&shim, &partner, &req, stored, now, source.client)? {
        Ok((policy, fields)) => {
            let ttl = policy.token_ttl_secs(shim.config.max_token_ttl_secs);
            let (p, s, pur, f) = (
                partner.clone(),
                req.subject_id.clone(),
                req.purpose.clone(),
                fields.clone(),
            );
            // The token_minted entry is the grant's audit record: the
            // token exists for no one until it is durable.
            // The vault refuses to mint for a shredded subject, the one
            // check the shim cannot make from `Context`: a denial like the
            // others, audited.
            let minted = shim
                .gw("mint", |c| async move { c.mint(p, s, pur, f, ttl).await })
                .await;
            let (token, expires_at_ms) = match minted {
                Ok(m) => m,
                Err(e) if e.code == ErrorCode::SubjectShredded.name() => {
                    return deny(&shim, &partner, &req, &source, Denial::SubjectShredded).await;
                }
                // The request passed every check: the vault refusing its
                // mint (a policy's lifetime over a separate vault's
                // ceiling, say) is the deployment's fault, not the
                // partner's, and no token exists.
                Err(e) if e.status.is_client_error() => {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        e.code,
                        format!("the vault refused to mint the granted token: {}", e.message),
                    ))
                }
                Err(e) => return Err(e),
            };
            shim.decided("granted", "none");
            crate::failpoints::before_reply("authorize");
            return Ok(axum::Json(AuthorizeResponse {
                // Into the answer, which is the token's way to the partner.
                token: token.into_inner(),
                vault_addr: shim.config.vault_addr.clone(),
                expires_at: rfc3339(expires_at_ms),
                fields: fields
                    .into_iter()
                    .map(|(f, op)| (f, Value::String(op.name().to_string())))
                    .collect(),
            }));
        }
        Err(denial) => denial,
    };
    deny(&shim, &partner, &req, &source, denial).await
}

/// Records a denial of `/v1/authorize` durably (fail closed: without the
/// record the answer is 503, never a silent refusal), counts it, and
/// answers it.
async fn deny(
    shim: &Shim,
    partner: &str,
    req: &AuthorizeRequest,
    source: &crate::proxied::Source,
    denial: Denial,
) -> Result<axum::Json<AuthorizeResponse>, ApiError> {
    let per_minute = shim.config.recorded_denials_per_minute;
    // A denial about the subject is recorded whatever the budget says: a
    // partner that spent it on refusals of its policy would otherwise probe
    // consents with no trace under the subject (`/v1/logs?subject=`).
    if !denial.about_the_subject() && !shim.denials.admit(partner, per_minute, now_ms()) {
        shim.decided("denied", "unrecorded");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Denial::RateLimited.code(),
            format!(
                "too many refused requests: this partner's refusals are recorded one by one \
                 {per_minute} a minute at most, and those past it are answered so and counted \
                 in the log; try again later"
            ),
        ));
    }
    let (fields, omitted) = recorded_fields(req.fields.as_deref());
    let mut audit = json!({
        "action": "authorize",
        "partner_id": partner,
        "purpose": req.purpose,
        "reason": denial.code(),
        "fields": fields,
        "source_ip": source.client.to_string(),
    });
    if omitted > 0 {
        audit["fields_omitted"] = omitted.into();
    }
    if let Some(proxy) = source.proxy {
        audit["proxy_ip"] = proxy.to_string().into();
    }
    let subject = req.subject_id.clone();
    shim.gw("audit", |c| async move {
        c.event(
            Kind::AccessDenied as u8,
            subject,
            audit.to_string().into_bytes(),
        )
        .await
    })
    .await
    .map_err(unrecorded)?;
    shim.decided("denied", denial.code());
    let status = if denial == Denial::RateLimited {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::FORBIDDEN
    };
    Err(ApiError::new(status, denial.code(), denial.message()))
}

/// Records the denials of `/v1/authorize` that were not recorded one by
/// one ([`policy::DenialBudget`]): for each partner, one `access_denied`
/// entry without a subject, `{"action": "authorize", "partner_id",
/// "reason": "rate_limited", "unrecorded": <count>, "first", "last"}`.
/// A count that cannot be written is kept for the next time (and may be
/// in the log twice if the vault's connection failed as it wrote it);
/// when this is the `last` time (the shim stops), it is lost, and logged.
pub async fn record_unrecorded_denials(shim: &Shim, last: bool) {
    for (partner, u) in shim.denials.take_unrecorded() {
        let entry = json!({
            "action": "authorize",
            "partner_id": partner,
            "reason": Denial::RateLimited.code(),
            "unrecorded": u.count,
            "first": rfc3339(u.first_ms),
            "last": rfc3339(u.last_ms),
        });
        let written = shim
            .gw("audit", |c| async move {
                c.event(
                    Kind::AccessDenied as u8,
                    String::new(),
                    entry.to_string().into_bytes(),
                )
                .await
            })
            .await;
        match written {
            Err(e) if last => tracing::warn!(
                partner = %partner,
                count = u.count,
                error = %e.message,
                "the count of denials not recorded one by one could not be recorded as the shim stops: lost"
            ),
            Err(e) => {
                tracing::warn!(
                    partner = %partner,
                    count = u.count,
                    error = %e.message,
                    "the count of denials not recorded one by one could not be recorded; kept for the next try"
                );
                shim.denials.restore(partner, u);
            }
            Ok(_) => {}
        }
    }
}

/// Room for the requested field names in a denial's `access_denied`
/// entry, as JSON: 256 names of 128 characters fit whole when none of
/// their characters is escaped; with the entry's other members, this
/// stays under the vault's largest event payload (48 KiB).
const RECORDED_FIELDS_BYTES: usize = 40 * 1024;

/// The requested field names a denial's entry records: as many as fit
/// [`RECORDED_FIELDS_BYTES`] as JSON, in the request's order, and how many
/// more were left out (only names full of characters JSON escapes, `"`
/// and `\`, take more room).
fn recorded_fields(fields: Option<&[String]>) -> (Option<&[String]>, usize) {
    let Some(fields) = fields else {
        return (None, 0);
    };
    let mut used = 2;
    for (i, f) in fields.iter().enumerate() {
        // The name, its quotes and escapes, and a comma.
        used += f.len() + 3 + f.bytes().filter(|b| matches!(b, b'"' | b'\\')).count();
        if used > RECORDED_FIELDS_BYTES {
            return (Some(&fields[..i]), fields.len() - i);
        }
    }
    (Some(fields), 0)
}

/// A denial's entry that the vault refused: whatever the refusal, the
/// denial is not in the log, so it is not answered as one (fail closed,
/// `503 vault_unavailable`). A 503 already says what happened (a vault
/// that cannot write, or a connection lost on the way, when the entry may
/// be in the log after all), and a shim whose gateway key the vault
/// refuses is its own configuration's fault (500): both pass unchanged.
fn unrecorded(e: ApiError) -> ApiError {
    if matches!(
        e.status,
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::SERVICE_UNAVAILABLE
    ) {
        return e;
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "vault_unavailable",
        format!(
            "the refusal could not be recorded in the log ({}); nothing was done",
            e.message
        ),
    )
}

/// A grant: the partner's policy and the masking of each field.
type Grant = (Policy, Vec<(String, client::MaskOp)>);

/// The policy checks, in the documented order, on the partner's stored
/// policy and the subject's stored consent (as `Context` read them).
/// `Ok(Err(_))` is a denial; `Err(_)` is a failure to decide (a stored
/// value that does not parse).
fn decide(
    shim: &Shim,
    partner: &str,
    req: &AuthorizeRequest,
    (stored, consent): (Option<client::StateValue>, Option<client::StateValue>),
    now: u64,
    source: IpAddr,
) -> Result<Result<Grant, Denial>, ApiError> {
    let Some(stored) = stored else {
        return Ok(Err(Denial::PartnerInactive));
    };
    let policy = parse_stored_policy(&stored.value)?;
    let fields = match policy::fields_for(&policy, &req.purpose, req.fields.as_deref()) {
        Ok(f) => f,
        Err(d) => return Ok(Err(d)),
    };
    if let Err(d) = policy::check_conditions(&policy, now, source) {
        return Ok(Err(d));
    }
    // Every question about a subject spends the rate, answered or denied:
    // the consent checks past this point are no faster an oracle of who
    // consented than grants are, and a caller from a source the policy
    // does not allow learns nothing of them.
    if let Some(n) = policy.rate_limit_per_minute {
        if !shim.limiter.take(partner, n, now) {
            return Ok(Err(Denial::RateLimited));
        }
    }
    let consent = match consent {
        None => None,
        Some(v) => Some((
            v.kind,
            serde_json::from_slice::<Consent>(&v.value)
                .map_err(|_| ApiError::internal("a stored consent does not parse"))?,
        )),
    };
    if let Err(d) = policy::check_consent(consent.as_ref().map(|(k, c)| (*k, c)), &req.purpose, now)
    {
        return Ok(Err(d));
    }
    Ok(Ok((policy, fields)))
}

/// The `policy` member of a stored `policy_changed` payload.
fn parse_stored_policy(bytes: &[u8]) -> Result<Policy, ApiError> {
    #[derive(Deserialize)]
    struct Stored {
        policy: Policy,
    }
    serde_json::from_slice::<Stored>(bytes)
        .map(|s| s.policy)
        .map_err(|_| ApiError::internal("a stored policy does not parse"))
}

pub async fn get_policy(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiPath(partner): ApiPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    check_id("partner_id", &partner)?;
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin", "auditor"])?;
    let stored = c
        .policy(partner)
        .await
        .map_err(|e| vault_error(&e))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no policy for this partner",
            )
        })?;
    let v: Value = serde_json::from_slice(&stored.value)
        .map_err(|_| ApiError::internal("a stored policy does not parse"))?;
    Ok(axum::Json(v))
}

pub async fn put_policy(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiPath(partner): ApiPath<String>,
    ApiJson(policy): ApiJson<Policy>,
) -> Result<axum::Json<Value>, ApiError> {
    check_id("partner_id", &partner)?;
    policy
        .validate(shim.config.max_token_ttl_secs)
        .map_err(ApiError::bad_request)?;
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin"])?;
    let payload = json!({"partner_id": partner, "policy": policy});
    write_event(
        &c,
        Kind::PolicyChanged,
        "",
        payload.to_string().into_bytes(),
    )
    .await
}

/// Body of `PUT /v1/subjects/{subject_id}/consents/{partner_id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRequest {
    pub purposes: Vec<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
}

pub async fn put_consent(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiPath((subject, partner)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<ConsentRequest>,
) -> Result<axum::Json<Value>, ApiError> {
    check_id("subject_id", &subject)?;
    check_id("partner_id", &partner)?;
    if req.purposes.is_empty() || req.purposes.len() > 256 {
        return Err(ApiError::bad_request("purposes: 1 to 256 purposes"));
    }
    // As a policy names them: a consent to anything else could never apply.
    if !req.purposes.iter().all(|p| crate::shim::policy::is_name(p)) {
        return Err(ApiError::bad_request(
            "purposes: each 1 to 128 printable ASCII characters without spaces",
        ));
    }
    let expires_at_ms = match &req.expires_at {
        Some(s) => Some(parse_rfc3339("expires_at", s)?),
        None => None,
    };
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin", "writer"])?;
    let consent = Consent {
        partner_id: partner,
        purposes: req.purposes,
        expires_at_ms,
    };
    let payload = serde_json::to_vec(&consent).map_err(|e| ApiError::internal(e.to_string()))?;
    write_event(&c, Kind::ConsentGranted, subject, payload).await
}

pub async fn delete_consent(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiPath((subject, partner)): ApiPath<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    check_id("subject_id", &subject)?;
    check_id("partner_id", &partner)?;
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin", "writer"])?;
    // A revocation of a consent never granted would make later denials
    // say the subject revoked one (`consent_revoked`, in the answer and
    // the log), where it never consented: refused, nothing written.
    let held = c
        .consent(subject.clone(), partner.clone())
        .await
        .map_err(|e| vault_error(&e))?;
    if held.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no consent of this subject for this partner was ever granted: nothing to revoke",
        ));
    }
    let payload = json!({"partner_id": partner});
    write_event(
        &c,
        Kind::ConsentRevoked,
        subject,
        payload.to_string().into_bytes(),
    )
    .await
}

/// Body of `POST /v1/credentials`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    pub role: String,
    pub name: String,
    /// For a credential held by a client certificate instead of an API
    /// key: the SHA-256 of the certificate's DER, 64 hex digits.
    #[serde(default)]
    pub client_cert_sha256: Option<String>,
}

pub async fn create_credential(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiJson(req): ApiJson<CredentialRequest>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    check_id("name", &req.name)?;
    let cert_sha256 = req
        .client_cert_sha256
        .as_deref()
        .map(|hex_digits| {
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(hex_digits, &mut sha256)
                .ok()
                .filter(|()| hex_digits.bytes().all(|b| !b.is_ascii_uppercase()))
                .map(|()| sha256)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "client_cert_sha256 must be 64 lowercase hex digits",
                    )
                })
        })
        .transpose()?;
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin"])?;
    if let Some(sha256) = cert_sha256 {
        let id = c
            .create_cert_credential(req.role.clone(), req.name.clone(), sha256)
            .await
            .map_err(|e| written_error(&e))?;
        return Ok((
            StatusCode::CREATED,
            axum::Json(json!({"id": id, "role": req.role, "name": req.name,
                              "client_cert_sha256": hex::encode(sha256)})),
        ));
    }
    let (id, key) = c
        .create_credential(req.role.clone(), req.name.clone())
        .await
        .map_err(|e| written_error(&e))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": id, "role": req.role, "name": req.name, "api_key": key.as_str()})),
    ))
}

pub async fn revoke_credential(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<Value>, ApiError> {
    check_id("id", &id)?;
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin"])?;
    let r = c
        .revoke_credential(id)
        .await
        .map_err(|e| written_error(&e))?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such credential"))?;
    Ok(axum::Json(receipt_json(&r)))
}

fn require_role(c: &Client, roles: &[&str]) -> Result<(), ApiError> {
    if roles.contains(&c.role()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs one of the roles {}", roles.join(", ")),
        ))
    }
}

/// Writes an event to the log as the caller `c` (the vault checks its role
/// and names it as `recorded_by`), and answers with the event's receipt.
async fn write_event(
    c: &Client,
    kind: Kind,
    subject: impl Into<String>,
    payload: Vec<u8>,
) -> Result<axum::Json<Value>, ApiError> {
    let r = c
        .event(kind as u8, subject, payload)
        .await
        .map_err(|e| written_error(&e))?;
    Ok(axum::Json(receipt_json(&r)))
}

fn receipt_json(r: &client::Receipt) -> Value {
    json!({"seq": r.seq, "entry_hash": hex::encode(r.entry_hash)})
}

/// Query of `GET /v1/logs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    pub subject: Option<String>,
    pub partner: Option<String>,
    /// Only entries whose payload names this credential as `recorded_by`.
    pub recorded_by: Option<String>,
    pub kind: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// Continue after this seq (the `next_after` of the previous page).
    pub after: Option<u64>,
    pub limit: Option<usize>,
    /// `json` (default) or `jsonl`.
    pub format: Option<String>,
}

/// Entries one `/v1/logs` request reads at most; a page may hold fewer
/// than `limit` events, and `next_after` says where to continue.
const MAX_SCAN: u64 = 100_000;

/// Bytes of entries one `/v1/logs` request reads at most: 100,000 entries
/// of large records would be gigabytes. The page ends there, as at
/// [`MAX_SCAN`].
const MAX_SCAN_BYTES: usize = 64 * 1024 * 1024;

/// `/v1/logs` requests that scan at once; the others wait their turn
/// within the scan's time budget, which counts from the request's arrival
/// (one that waited long scans less, one batch at least, and answers in
/// time with a cursor), and are answered `503` past it.
pub(crate) const LOG_SCANS: usize = 4;

/// The most of its `request_timeout` a `/v1/logs` request spends reading
/// (half of it, at most 5 s): a scan that would outlast the timeout ends
/// its page early with a `next_after`, so that a long stretch of entries
/// that match nothing is crossed page by page instead of answered `408`
/// again and again.
fn scan_budget(request_timeout: Duration) -> Duration {
    (request_timeout / 2).min(Duration::from_secs(5))
}

/// Bytes of payloads one `/v1/logs` page holds at most (at least one
/// event): a payload may take 48 KiB, so 1,000 of them would otherwise
/// make a page of ~48 MiB. The page ends before the event that would pass
/// it, and `next_after` continues there.
pub const MAX_PAGE_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// One event of a `/v1/logs` page. The payload is copied as the entry
/// holds it, checked to be JSON but never parsed into a tree, which
/// would take many times its size.
#[derive(Debug, Serialize)]
struct LogEvent {
    seq: u64,
    time: String,
    kind: &'static str,
    subject: String,
    entry_hash: String,
    payload: Option<Box<serde_json::value::RawValue>>,
}

/// The members of an audit payload that `/v1/logs` filters on, read
/// without building the payload's tree (other members are skipped).
#[derive(Debug, Default, Deserialize)]
struct NamedIn<'a> {
    #[serde(borrow)]
    partner_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    recorded_by: Option<std::borrow::Cow<'a, str>>,
}

/// An audit payload as one line of JSON, or `None` when it is not JSON.
/// The vault writes payloads compactly; one with a line break (from a
/// vault a separate shim cannot vouch for) is written again without it,
/// so that `format=jsonl` stays one event per line.
fn one_line(payload: &[u8]) -> Option<Box<serde_json::value::RawValue>> {
    let raw = serde_json::from_slice::<Box<serde_json::value::RawValue>>(payload).ok()?;
    if !raw.get().contains(['\n', '\r']) {
        return Some(raw);
    }
    let tree: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
    serde_json::value::to_raw_value(&tree).ok()
}

pub async fn logs(
    State(shim): State<Arc<Shim>>,
    key: Bearer,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let kind = match &q.kind {
        Some(k) => Some(
            Kind::from_name(k)
                .ok_or_else(|| ApiError::bad_request(format!("unknown kind {k:?}")))?,
        ),
        None => None,
    };
    let since = q
        .since
        .as_deref()
        .map(|s| parse_rfc3339_ceil("since", s))
        .transpose()?;
    let until = q
        .until
        .as_deref()
        .map(|s| parse_rfc3339_ceil("until", s))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until) {
        if since > until {
            return Err(ApiError::bad_request("since: after until"));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit: 1 to 1000"));
    }
    let jsonl = match q.format.as_deref() {
        None | Some("json") => false,
        Some("jsonl") => true,
        Some(_) => return Err(ApiError::bad_request("format: json or jsonl")),
    };
    // A seq JSON carries exactly to every client (JavaScript's integers
    // stop at 2^53): a log never grows near it.
    let start = match q.after {
        None => 0,
        Some(a) if a < MAX_JSON_SEQ => a + 1,
        Some(_) => {
            return Err(ApiError::bad_request(
                "after: at most 9007199254740990 (2^53 - 2)",
            ))
        }
    };
    let arrived = Instant::now();
    // The key last, once the request is otherwise valid (as on every route).
    let c = shim.caller(&key).await?;
    require_role(&c, &["admin", "auditor"])?;
    let deadline = arrived + scan_budget(shim.config.request_timeout);
    // A turn within the scan's budget, or a 503 to try again: a request
    // that waited past it would scan past its request timeout.
    let _turn = match tokio::time::timeout_at(deadline.into(), shim.log_scans.acquire()).await {
        Ok(Ok(turn)) => turn,
        Ok(Err(_)) | Err(_) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many audit log reads at once: try again shortly",
            ))
        }
    };
    let mut from = start;
    let mut events: Vec<LogEvent> = Vec::new();
    let mut payload_bytes = 0;
    let mut scanned_bytes = 0;
    let mut last_scanned = None;
    let mut at_end = false;
    'scan: while from - start < MAX_SCAN && scanned_bytes < MAX_SCAN_BYTES {
        if from > start && Instant::now() >= deadline {
            break;
        }
        let ask = (MAX_SCAN - (from - start)).min(1000) as u32;
        let batch = c.entries(from, ask).await.map_err(|e| vault_error(&e))?;
        if batch.is_empty() {
            // A cursor past the log's end (a typo, another vault's) is
            // not the end of this one.
            if from == start && start > 0 {
                let head = c.head().await.map_err(|e| vault_error(&e))?;
                if start > head.entries {
                    return Err(ApiError::bad_request(match head.entries {
                        0 => "after: past the log's end (the log is empty)".to_string(),
                        n => format!("after: past the log's last seq ({})", n - 1),
                    }));
                }
            }
            at_end = true;
            break;
        }
        for bytes in &batch {
            let e = storage::entry::EntryRef::decode(bytes)
                .map_err(|_| ApiError::internal("the vault sent an entry that does not decode"))?;
            // A vault that answers out of order (a separate shim's may be
            // anything) must not make the scan wrap or run for ever.
            let next = e.seq.checked_add(1).filter(|_| e.seq == from);
            let Some(next) = next else {
                return Err(ApiError::internal("the vault sent entries out of order"));
            };
            // Timestamps never decrease along the log (storage.md, and
            // verify checks it): nothing from here on is before `until`.
            if until.is_some_and(|t| e.timestamp_ms >= t) {
                at_end = true;
                break 'scan;
            }
            // The cheap checks first: a payload is read only for an entry
            // they keep.
            let mut wanted = kind.is_none_or(|k| k == e.kind)
                && q.subject.as_deref().is_none_or(|s| s == e.subject)
                && since.is_none_or(|t| e.timestamp_ms >= t);
            // Records are ciphertext: only their metadata is shown.
            let payload = (wanted && e.kind != Kind::Record && e.key_version == 0)
                .then(|| one_line(e.payload))
                .flatten();
            if wanted && (q.partner.is_some() || q.recorded_by.is_some()) {
                let names: NamedIn = payload
                    .as_deref()
                    .and_then(|p| serde_json::from_str(p.get()).ok())
                    .unwrap_or_default();
                let is = |want: &Option<String>, has: &Option<std::borrow::Cow<str>>| {
                    want.as_deref().is_none_or(|w| has.as_deref() == Some(w))
                };
                wanted =
                    is(&q.partner, &names.partner_id) && is(&q.recorded_by, &names.recorded_by);
            }
            let size = payload.as_ref().map_or(0, |p| p.get().len());
            if wanted && !events.is_empty() && payload_bytes + size > MAX_PAGE_PAYLOAD_BYTES {
                // Not scanned: the next page starts with it.
                break 'scan;
            }
            last_scanned = Some(e.seq);
            from = next;
            scanned_bytes += bytes.len();
            if !wanted {
                continue;
            }
            payload_bytes += size;
            events.push(LogEvent {
                seq: e.seq,
                time: rfc3339(e.timestamp_ms),
                kind: e.kind.name(),
                subject: e.subject.to_string(),
                entry_hash: hex::encode(storage::entry::entry_hash(bytes)),
                payload,
            });
            if events.len() == limit {
                break 'scan;
            }
        }
    }
    let next_after = if at_end { None } else { last_scanned };
    if jsonl {
        let mut body = String::new();
        for e in &events {
            let line = serde_json::to_string(e)
                .map_err(|_| ApiError::internal("an event could not be written as JSON"))?;
            body.push_str(&line);
            body.push('\n');
        }
        let mut r = body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        if let Some(n) = next_after {
            if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
                r.headers_mut().insert("x-next-after", v);
            }
        }
        return Ok(r);
    }
    // Serialized as it is: through `json!`, each payload would be parsed.
    #[derive(Serialize)]
    struct Page {
        events: Vec<LogEvent>,
        next_after: Option<u64>,
    }
    Ok(axum::Json(Page { events, next_after }).into_response())
}

/// The vault's health answers: the last one with when it was asked for,
/// and the ask under way, if any (`vault_health`).
#[derive(Debug, Default)]
pub struct HealthAsks {
    last: Option<(Instant, Result<client::Health, ApiError>)>,
    /// Turns `true` when the ask under way has ended.
    asking: Option<tokio::sync::watch::Receiver<bool>>,
}

/// The vault's health, asked at most once at a time: under a flood of
/// `/v1/health` or `/metrics` requests (which need no key), the gateway
/// connection that `/v1/authorize` uses is not filled with them. The ask
/// runs in a task of its own, so that requests that give up waiting do
/// not cut it short; an answer is used only by requests that arrived
/// before it was asked for (`not_before`), and requests that arrived
/// during an ask wait for it to end, then for the next.
async fn vault_health(shim: &Arc<Shim>, not_before: Instant) -> Result<client::Health, ApiError> {
    loop {
        let mut ended = {
            let mut asks = shim.health.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((asked, answer)) = &asks.last {
                if *asked > not_before {
                    return answer.clone();
                }
            }
            match &asks.asking {
                Some(ended) => ended.clone(),
                None => {
                    let (tx, ended) = tokio::sync::watch::channel(false);
                    asks.asking = Some(ended.clone());
                    let shim = Arc::clone(shim);
                    tokio::spawn(async move {
                        let asked = Instant::now();
                        let answer = shim.gw("health", |c| async move { c.health().await }).await;
                        let mut asks = shim.health.lock().unwrap_or_else(PoisonError::into_inner);
                        asks.last = Some((asked, answer));
                        asks.asking = None;
                        drop(asks);
                        let _ = tx.send(true);
                    });
                    ended
                }
            }
        };
        if ended.wait_for(|done| *done).await.is_err() {
            // The ask's task ended without a word (the runtime stopping):
            // forget it, so that the next look asks again.
            let mut asks = shim.health.lock().unwrap_or_else(PoisonError::into_inner);
            if asks.asking.as_ref().is_some_and(|a| a.same_channel(&ended)) {
                asks.asking = None;
            }
            return Err(ApiError::unavailable());
        }
    }
}

pub async fn health(State(shim): State<Arc<Shim>>) -> Response {
    match vault_health(&shim, Instant::now()).await {
        Ok(h) => {
            if h.status != "recovering" {
                shim.metrics.log_entries.set(h.entries as i64);
            }
            let status = if h.status == "ok" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            // The head as the vault signed it: a monitor holding the public
            // key checks `signed_head` and compares it with one it saw before.
            let head = h.head.map(|head| {
                json!({
                    "seq": head.last_seq,
                    "hash": hex::encode(head.last_hash),
                    "timestamp_ms": head.timestamp_ms,
                    "key_id": head.key_id,
                    "signed_head": hex::encode(head.encode()),
                })
            });
            let body = json!({
                "status": h.status,
                "vault": "reachable",
                "entries": h.entries,
                "head": head,
            });
            (status, axum::Json(body)).into_response()
        }
        // A vault that answered and refused the shim (its gateway key
        // revoked, say) is not out of reach: an operator looks elsewhere.
        // An answer that does not decode is a broken connection.
        Err(e) => {
            let vault = if e.status == StatusCode::SERVICE_UNAVAILABLE {
                "unreachable"
            } else {
                "refused"
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "unavailable", "vault": vault})),
            )
                .into_response()
        }
    }
}

/// How long a scrape waits for the vault's entry count: the metrics are
/// served without it after that (`fintrust_vault_up` 0), well within a
/// scraper's timeout, so that they do not go dark while the vault is out
/// of reach, when they matter most.
const SCRAPE_VAULT_WAIT: Duration = Duration::from_secs(1);

/// The largest seq `/v1/logs` names exactly to any JSON client, 2^53 - 1;
/// `after` is below it.
const MAX_JSON_SEQ: u64 = (1 << 53) - 1;

pub async fn metrics(State(shim): State<Arc<Shim>>, headers: HeaderMap) -> Response {
    if let Some(key) = &shim.config.metrics_key {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, k)| k.trim());
        if !presented.is_some_and(|k| key.admits(k)) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "send the metrics key (--metrics-key-file) as `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    // An answer asked for up to the wait before the scrape will do: a
    // scrape that came during another request's ask does not wait for
    // two of them.
    let arrived = Instant::now();
    let asked = vault_health(
        &shim,
        arrived.checked_sub(SCRAPE_VAULT_WAIT).unwrap_or(arrived),
    );
    let up = match tokio::time::timeout(SCRAPE_VAULT_WAIT, asked).await {
        // A vault recovering from a failed write answers, but refuses
        // requests: not up (and its size, 0 meanwhile, is not taken).
        Ok(Ok(h)) if h.status == "recovering" => 0,
        Ok(Ok(h)) => {
            shim.metrics.log_entries.set(h.entries as i64);
            1
        }
        Ok(Err(_)) | Err(_) => 0,
    };
    shim.metrics.vault_up.set(up);
    let mut r = shim.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

pub async fn openapi(State(shim): State<Arc<Shim>>) -> Response {
    let mut r = shim.openapi.clone().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// Counts and times every request by matched route and status.
pub async fn observe(
    State(shim): State<Arc<Shim>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    // Counted as 499 if dropped unanswered: the client closed the
    // connection, and hyper dropped the handler where it was.
    let unanswered = Unanswered {
        shim: &shim,
        route: &route,
        started,
        armed: true,
    };
    let timeout = shim.config.request_timeout;
    // A declared length over the limit is refused before any of the body is
    // read (the extractors would otherwise wait for it to arrive).
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let response = if declared.is_some_and(|n| n > shim.config.max_body_bytes as u64) {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is over the limit",
        )
        .into_response()
    } else {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(r) => r,
            // The handler is dropped where it was: a change it asked of
            // the vault may be in the log already (`/v1/logs` tells).
            Err(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request took too long; a change it asked for may or may not have been made",
            )
            .into_response(),
        }
    };
    unanswered.answered(response.status());
    response
}

/// A request being served, counted once in `fintrust_http_requests_total`
/// and timed: with its status when answered, as 499 (nginx's "client
/// closed request") when dropped before that.
struct Unanswered<'a> {
    shim: &'a Shim,
    route: &'a str,
    started: Instant,
    armed: bool,
}

impl Unanswered<'_> {
    fn answered(mut self, status: StatusCode) {
        self.armed = false;
        self.count(status.as_u16());
    }

    fn count(&self, status: u16) {
        let metrics = self.shim.metrics;
        metrics
            .http_requests
            .get_or_create(&RouteLabels {
                route: self.route.to_string(),
                status,
            })
            .inc();
        metrics
            .http_seconds
            .get_or_create(&RouteOnly {
                route: self.route.to_string(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.count(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// The status a request is counted under when its client went away
/// before the answer (nginx's 499).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

#[cfg(test)]
mod tests {
    use super::*;

    /// Times past RFC 3339's last year are shown at its end, not at 1970.
    #[test]
    fn rfc3339_shows_a_time_past_9999_at_its_end() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
        for ms in [253_402_300_799_999, 253_402_300_800_000, u64::MAX] {
            assert_eq!(rfc3339(ms), "9999-12-31T23:59:59.999Z", "{ms}");
        }
    }

    /// `Bearer` in any case, the key trimmed; any other scheme, or none,
    /// is `unauthenticated`.
    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let key = "fvk_0123456789abcdef";
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                value.parse().expect("a header value"),
            );
            bearer(&h).map(str::to_string).map_err(|e| e.code)
        };
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            assert_eq!(with(&format!("{scheme} {key}")), Ok(key.to_string()));
        }
        assert_eq!(with(&format!("Bearer  {key} ")), Ok(key.to_string()));
        for refused in [
            format!("Basic {key}"),
            format!("Bearer{key}"),
            key.to_string(),
            "Bearer ".to_string(),
            "Bearer not-a-key".to_string(),
        ] {
            assert_eq!(with(&refused), Err("unauthenticated"), "{refused}");
        }
        assert_eq!(
            bearer(&HeaderMap::new()).map_err(|e| e.code),
            Err("unauthenticated")
        );
    }

    /// An answer of the vault that fails its check is a 502 that does
    /// not say that nothing was done.
    #[test]
    fn an_answer_that_fails_its_check_is_not_unavailable() {
        for e in [
            ClientError::BadReceipt(protocol::receipt::ReceiptError::BadSignature),
            ClientError::Rollback { kept: 9, got: 3 },
        ] {
            let api = vault_error(&e);
            assert_eq!(
                (api.status, api.code),
                (StatusCode::BAD_GATEWAY, "internal")
            );
            assert!(
                api.message.contains("may or may not have been done")
                    && !api.message.contains("nothing was done"),
                "{}",
                api.message
            );
        }
    }

    /// A denial's entry that the vault refused, for any reason, is a 503:
    /// the denial is not in the log; a refused gateway key stays a 500,
    /// and a lost connection's 503 keeps its own words.
    #[test]
    fn a_denial_the_log_did_not_take_is_unavailable() {
        let refused = vault_error(&ClientError::Server {
            code: ErrorCode::Invalid,
            message: "event payload too large".into(),
        });
        let e = unrecorded(refused);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::SERVICE_UNAVAILABLE, "vault_unavailable")
        );
        assert!(
            e.message.contains("event payload too large"),
            "{}",
            e.message
        );
        let key = gateway_error(&ClientError::Server {
            code: ErrorCode::Unauthenticated,
            message: String::new(),
        });
        assert_eq!(unrecorded(key).status, StatusCode::INTERNAL_SERVER_ERROR);
        let lost = unrecorded(written_error(&ClientError::Closed));
        assert_eq!(lost.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            lost.message.contains("may or may not have been written")
                && !lost.message.contains("nothing was done"),
            "{}",
            lost.message
        );
    }

    /// The names a denial records fit their room; only names that JSON
    /// escapes can overflow it, and the rest are counted.
    #[test]
    fn a_denial_records_the_field_names_that_fit() {
        let plain: Vec<String> = (0..256).map(|i| format!("{i:0>128}")).collect();
        assert_eq!(recorded_fields(Some(&plain)), (Some(&plain[..]), 0));
        let (kept, omitted) = recorded_fields(Some(&plain[..1]));
        assert_eq!((kept.map(<[String]>::len), omitted), (Some(1), 0));
        assert_eq!(recorded_fields(None), (None, 0));
        let escaped: Vec<String> = (0..256).map(|_| "\\\"".repeat(64)).collect();
        let (kept, omitted) = recorded_fields(Some(&escaped));
        let kept = kept.unwrap_or_default();
        assert_eq!(kept.len() + omitted, 256);
        assert!(serde_json::to_string(kept).is_ok_and(|j| j.len() <= RECORDED_FIELDS_BYTES));
        assert!(omitted > 0);
    }

    /// Each refusal of the vault has the status `http.md` gives it (or,
    /// for `subject_shredded` and `wrong_partner`, which no route of the
    /// shim meets, the one it would take), and a code with none of its
    /// own (a newer vault's included) is a 502 that keeps the vault's code
    /// and words.
    #[test]
    fn each_vault_refusal_has_its_documented_status() {
        let status = |code: ErrorCode| {
            let e = vault_error(&ClientError::Server {
                code,
                message: format!("words of {}", code.name()),
            });
            (e.status, e.code, e.message)
        };
        for (code, want_status, want_name) in [
            (ErrorCode::Forbidden, StatusCode::FORBIDDEN, "forbidden"),
            (
                ErrorCode::WrongPartner,
                StatusCode::FORBIDDEN,
                "wrong_partner",
            ),
            (ErrorCode::NotFound, StatusCode::NOT_FOUND, "not_found"),
            (
                ErrorCode::Invalid,
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                ErrorCode::Malformed,
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (ErrorCode::Conflict, StatusCode::CONFLICT, "conflict"),
            (
                ErrorCode::SubjectShredded,
                StatusCode::GONE,
                "subject_shredded",
            ),
            (
                ErrorCode::RateLimited,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
            ),
            (
                ErrorCode::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "vault_unavailable",
            ),
            (ErrorCode::Internal, StatusCode::BAD_GATEWAY, "internal"),
            (
                ErrorCode::Unrecognized,
                StatusCode::BAD_GATEWAY,
                "unrecognized",
            ),
        ] {
            let (got, name, message) = status(code);
            assert_eq!((got, name), (want_status, want_name), "{}", code.name());
            assert_eq!(message, format!("words of {}", code.name()));
        }
        let e = vault_error(&ClientError::Server {
            code: ErrorCode::Unauthenticated,
            message: "no".into(),
        });
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        // The same refusal of the shim's own gateway key is its
        // configuration, not the caller's key.
        let e = gateway_error(&ClientError::Server {
            code: ErrorCode::Unauthenticated,
            message: "no".into(),
        });
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(
            vault_error(&ClientError::Closed).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            vault_error(&ClientError::Config("x".into())).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
