//! The HTTP policy shim in front of a real vault, both in this process on
//! ports the OS chose: bad input gets the typed JSON error and writes
//! nothing, source-address rules (behind a trusted reverse proxy, for the
//! client its `X-Forwarded-For` names) and time-of-day rules are enforced
//! and audited, and slow, idle or never-finishing HTTP clients are cut
//! off; and random requests to every route, with any key and any body,
//! get a typed answer and write no more than that answer allows; and a
//! consent's revocation stops the grants that start after it and the
//! tokens granted before it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{json, Value};
use server::daemon::Daemon;
use server::serve::ServeConfig;
use server::shim::ShimConfig;
use storage::{Append, Kind, Options, Unlock, Vault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;

const PARTNER: &str = "acme-lender";
const SUBJECT: &str = "cust-7";

struct Running {
    http: SocketAddr,
    protocol: SocketAddr,
    admin: String,
    partner: String,
    writer: String,
    public_key: ed25519_dalek::VerifyingKey,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<server::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(self) {
        self.stop_keeping_dir().await;
    }

    /// Stops the daemon, and gives the dir the vault is in (`v`).
    async fn stop_keeping_dir(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.expect("the daemon task ends").expect("daemon");
        }
        self._dir
    }
}

/// A vault with one subject (record + consent for `credit_check`), keys
/// for admin/partner/writer, and the daemon serving it with `shim`.
async fn start(shim: ShimConfig) -> Running {
    start_after(shim, |_, _| Box::pin(async {})).await
}

/// [`start`], with `before` done to the vault before the daemon runs.
async fn start_after(
    shim: ShimConfig,
    before: impl for<'a> FnOnce(&'a Vault, &'a str) -> Pin<Box<dyn Future<Output = ()> + 'a>>,
) -> Running {
    start_serving(shim, ServeConfig::default(), before).await
}

/// [`start_after`], the protocol served with `serve`.
async fn start_serving(
    shim: ShimConfig,
    serve: ServeConfig,
    before: impl for<'a> FnOnce(&'a Vault, &'a str) -> Pin<Box<dyn Future<Output = ()> + 'a>>,
) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = Vault::create(
        &dir.path().join("v"),
        &Unlock::passphrase(b"shim test".to_vec()),
        Options::default(),
    )
    .expect("create");
    let vault = created.vault;
    let public_key = vault.public_key();
    let (_, partner) = vault
        .create_credential("partner", PARTNER)
        .await
        .expect("partner");
    let (_, writer) = vault
        .create_credential("writer", "svc")
        .await
        .expect("writer");
    vault
        .append_batch(vec![
            Append::record(SUBJECT, br#"{"name":"Ada Lovelace"}"#.to_vec()),
            Append::event(
                Kind::ConsentGranted,
                SUBJECT,
                &json!({"partner_id": PARTNER, "purposes": ["credit_check"]}),
            ),
        ])
        .await
        .expect("demo data");
    before(&vault, &created.admin_credential_id).await;
    let protocol = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_addr = http.local_addr().expect("addr");
    let d = Daemon {
        protocol,
        http: Some(http),
        tls: None,
        serve,
        shim,
        policies: None,
        reopen: None,
    };
    let common::Daemonized { bound, stop, done } = common::daemon(vault, d).await;
    Running {
        http: http_addr,
        protocol: bound.protocol,
        admin: created.admin_api_key.to_string(),
        partner: partner.to_string(),
        writer: writer.to_string(),
        public_key,
        stop: Some(stop),
        done: Some(done),
        _dir: dir,
    }
}

/// Sends `raw` on a new connection, reads until the server closes it (a
/// 30 s guard keeps a broken server from hanging the test), and returns
/// the status and the body parsed as JSON (or as a string).
async fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, value)
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    exchange(addr, req.as_bytes()).await
}

fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["error"], code, "{}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        got.1
    );
}

/// The log's size, as `/v1/health` reports it.
async fn entries(r: &Running) -> u64 {
    let (status, health) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{health}");
    health["entries"].as_u64().expect("entries")
}

/// The gateway keys of earlier runs' in-process shims, left active by a
/// crash, are revoked at the next start; the running shim's own is not,
/// nor a gateway key an admin made under the name earlier builds used.
#[tokio::test]
async fn a_start_revokes_the_shim_keys_earlier_runs_left_active() {
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = ids.clone();
    let r = start_after(ShimConfig::default(), move |vault, _| {
        Box::pin(async move {
            let mut made = Vec::new();
            for _ in 0..2 {
                let (id, _) = vault
                    .create_credential("gateway", server::daemon::SHIM_KEY_NAME)
                    .await
                    .expect("a key an earlier run left");
                made.push(id);
            }
            // Created by no admin, as the keys of older builds were.
            let (old_name, _) = vault
                .create_credential("gateway", "vaultd-shim")
                .await
                .expect("a key named as before");
            made.push(old_name);
            *kept.lock().expect("ids") = made;
        })
    })
    .await;
    let made = ids.lock().expect("ids").clone();
    let client = client::Client::connect(client::ClientConfig {
        addr: r.protocol.to_string(),
        api_key: client::Zeroizing::new(r.admin.clone()),
        tls: client::Tls::Plaintext,
        ..client::ClientConfig::default()
    })
    .await
    .expect("admin");
    let gateways = |all: Vec<client::CredentialInfo>| {
        all.into_iter()
            .filter(|c| c.role == "gateway")
            .map(|c| (c.id, c.revoked_seq.is_some()))
            .collect::<Vec<_>>()
    };
    let running = gateways(client.credentials().await.expect("list"));
    let revoked = |id: &str| running.iter().find(|(i, _)| i == id).map(|(_, r)| *r);
    assert_eq!(revoked(&made[0]), Some(true), "{running:?}");
    assert_eq!(revoked(&made[1]), Some(true), "{running:?}");
    assert_eq!(revoked(&made[2]), Some(false), "{running:?}");
    // The running shim's own key, and it works.
    let own: Vec<_> = running.iter().filter(|(i, _)| !made.contains(i)).collect();
    assert_eq!(own.len(), 1, "{running:?}");
    assert!(!own[0].1, "{running:?}");
    let (status, health) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{health}");
    // No admin can make a credential of the in-process shim's name.
    let refused = client
        .create_credential("gateway", server::daemon::SHIM_KEY_NAME)
        .await;
    assert!(
        matches!(
            refused,
            Err(client::ClientError::Server {
                code: client::ErrorCode::Invalid,
                ..
            })
        ),
        "{refused:?}"
    );
    drop(client);
    r.stop().await;
}

/// A vault that answers but refuses the shim (its gateway key revoked)
/// is not reported out of reach: `/v1/health` says `refused`, and a
/// scrape says the vault is not up but is served.
#[tokio::test]
async fn health_tells_a_refused_shim_from_an_unreachable_vault() {
    let r = start(ShimConfig::default()).await;
    let client = client::Client::connect(client::ClientConfig {
        addr: r.protocol.to_string(),
        api_key: client::Zeroizing::new(r.admin.clone()),
        tls: client::Tls::Plaintext,
        ..client::ClientConfig::default()
    })
    .await
    .expect("admin");
    let (status, health) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{health}");
    let shim_key = client
        .credentials()
        .await
        .expect("list")
        .into_iter()
        .find(|c| c.role == "gateway" && c.revoked_seq.is_none())
        .expect("the shim's key");
    client
        .revoke_credential(&shim_key.id)
        .await
        .expect("revoked");
    // The first request may see its connection closed; from the next on
    // the vault refuses the key.
    let mut last = Value::Null;
    for _ in 0..2 {
        let (status, health) = call(r.http, "GET", "/v1/health", None, None).await;
        assert_eq!(status, 503, "{health}");
        last = health;
    }
    assert_eq!(last["status"], "unavailable", "{last}");
    assert_eq!(last["vault"], "refused", "{last}");
    // The gauge is the process's: another test's scrape may set it in
    // between, never this vault's for long.
    let mut down = false;
    for _ in 0..5 {
        let (status, _, text) = get_raw(r.http, "/metrics", "").await;
        assert!(status.contains("200"), "{status}");
        down |= text.contains("fintrust_vault_up 0");
    }
    assert!(down, "fintrust_vault_up never 0");
    drop(client);
    r.stop().await;
}

/// `/v1/health` shows the log head as the vault signed it: a head that
/// verifies with the public key alone, the entry count it covers, and one
/// that moves on with the log.
#[tokio::test]
async fn health_shows_the_signed_log_head() {
    let r = start(ShimConfig::default()).await;
    let head = |health: &Value| {
        let signed =
            hex::decode(health["head"]["signed_head"].as_str().expect("signed_head")).expect("hex");
        let head = storage::SignedHead::decode(&signed).expect("a signed head");
        assert!(head.verify(&r.public_key), "signed by the vault's key");
        assert_eq!(health["head"]["seq"], head.last_seq);
        assert_eq!(health["head"]["hash"], hex::encode(head.last_hash));
        assert_eq!(health["head"]["timestamp_ms"], head.timestamp_ms);
        assert_eq!(health["head"]["key_id"], head.key_id);
        assert_eq!(health["entries"], head.last_seq + 1);
        head
    };
    let (status, before) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{before}");
    let before = head(&before);
    // A denial is audited: the log, and its head, move on.
    let got = call(
        r.http,
        "POST",
        "/v1/authorize",
        Some(&r.partner),
        Some(r#"{"subject_id": "cust-7", "purpose": "marketing", "fields": ["name"]}"#),
    )
    .await;
    assert_eq!(got.0, 403, "{}", got.1);
    let (status, after) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{after}");
    let after = head(&after);
    assert!(
        after.last_seq > before.last_seq,
        "{before:?} then {after:?}"
    );
    r.stop().await;
}

/// The subject's consent to the partner for `credit_check`, granted
/// (again) by the writer.
async fn grant_consent(r: &Running) {
    let got = call(
        r.http,
        "PUT",
        &format!("/v1/subjects/{SUBJECT}/consents/{PARTNER}"),
        Some(&r.writer),
        Some(r#"{"purposes": ["credit_check"]}"#),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
}

async fn put_policy(r: &Running, policy: Value) {
    let got = call(
        r.http,
        "PUT",
        &format!("/v1/policies/{PARTNER}"),
        Some(&r.admin),
        Some(&policy.to_string()),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
}

/// [`start`] with the default config, and a policy that lets the
/// partner see the subject's `name`, partly, for `credit_check`.
async fn start_with_policy() -> Running {
    let r = start(ShimConfig::default()).await;
    put_policy(
        &r,
        json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}}}),
    )
    .await;
    r
}

/// `POST /v1/authorize` as the partner, for [`SUBJECT`]'s data and
/// `purpose`.
async fn authorize(r: &Running, purpose: &str) -> (u16, Value) {
    let body = json!({"subject_id": SUBJECT, "purpose": purpose}).to_string();
    call(
        r.http,
        "POST",
        "/v1/authorize",
        Some(&r.partner),
        Some(&body),
    )
    .await
}

/// Under a token lifetime ceiling below the default of 300 s, a policy
/// that names no lifetime is accepted and its grants live as long as the
/// ceiling; one that names a longer lifetime is refused.
#[tokio::test]
async fn under_a_low_ceiling_a_policy_without_a_lifetime_gets_the_ceiling() {
    const CEILING: u32 = 60;
    let r = start(ShimConfig {
        max_token_ttl_secs: CEILING,
        ..ShimConfig::default()
    })
    .await;
    let purposes = json!({"credit_check": {"fields": {"name": "partial"}}});
    let longer = call(
        r.http,
        "PUT",
        &format!("/v1/policies/{PARTNER}"),
        Some(&r.admin),
        Some(&json!({"purposes": purposes, "max_token_ttl_secs": 300}).to_string()),
    )
    .await;
    assert_error(&longer, 400, "invalid_request");
    put_policy(&r, json!({ "purposes": purposes })).await;
    let stored = call(
        r.http,
        "GET",
        &format!("/v1/policies/{PARTNER}"),
        Some(&r.admin),
        None,
    )
    .await;
    assert_eq!(stored.0, 200, "{}", stored.1);
    assert!(
        stored.1.to_string().contains("purposes")
            && !stored.1.to_string().contains("max_token_ttl_secs"),
        "{}",
        stored.1
    );
    let asked = time::OffsetDateTime::now_utc();
    let got = authorize(&r, "credit_check").await;
    assert_eq!(got.0, 200, "{}", got.1);
    let expires = got.1["expires_at"].as_str().expect("expires_at");
    let expires =
        time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
            .expect("an RFC 3339 time");
    // The shim's clock read after `asked`; its times are in milliseconds.
    let lifetime = expires - asked;
    assert!(
        lifetime <= time::Duration::seconds(i64::from(CEILING) + 1),
        "a grant that lives {lifetime} under a ceiling of {CEILING} s"
    );
    r.stop().await;
}

/// A partner's denials by its policy are recorded an entry each up to
/// `recorded_denials_per_minute`; past it they are answered 429
/// `rate_limited` without their reason and write nothing, and their count
/// is recorded in one entry (here when the shim stops). Denials about the
/// subject are recorded past it all the same.
#[tokio::test]
async fn denials_past_the_recorded_rate_are_counted_not_recorded_one_by_one() {
    const RECORDED: u32 = 3;
    const ASKED: u64 = 8;
    let r = start(ShimConfig {
        recorded_denials_per_minute: RECORDED,
        ..ShimConfig::default()
    })
    .await;
    put_policy(
        &r,
        json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}}}),
    )
    .await;
    let before = entries(&r).await;
    let mut answers = Vec::new();
    for _ in 0..ASKED {
        answers.push(authorize(&r, "marketing").await);
    }
    for (i, got) in answers.iter().enumerate() {
        if i < RECORDED as usize {
            assert_error(got, 403, "purpose_not_allowed");
        } else {
            assert_error(got, 429, "rate_limited");
            let message = got.1["message"].as_str().unwrap_or_default();
            assert!(message.contains("counted"), "{}", got.1);
        }
    }
    assert_eq!(
        entries(&r).await,
        before + u64::from(RECORDED),
        "only the first {RECORDED} denials were recorded one by one"
    );
    // A denial about the subject (its consent) is recorded whatever the
    // budget: a partner cannot spend it on its policy's refusals first and
    // then probe consents without a trace under the subject.
    let body = json!({"subject_id": "cust-no-consent", "purpose": "credit_check"}).to_string();
    let got = call(
        r.http,
        "POST",
        "/v1/authorize",
        Some(&r.partner),
        Some(&body),
    )
    .await;
    assert_error(&got, 403, "consent_missing");
    assert_eq!(entries(&r).await, before + u64::from(RECORDED) + 1);
    let dir = r.stop_keeping_dir().await;
    let vault = Vault::open(
        &dir.path().join("v"),
        &Unlock::passphrase(b"shim test".to_vec()),
        Options::default(),
    )
    .expect("open");
    let all = vault.entries_from(before, 1000).expect("entries");
    let counts: Vec<Value> = all
        .iter()
        .filter_map(|bytes| {
            let e = storage::entry::EntryRef::decode(bytes).expect("an entry");
            (e.kind == Kind::AccessDenied)
                .then(|| serde_json::from_slice::<Value>(e.payload).expect("JSON"))
                .filter(|p| p.get("unrecorded").is_some())
                .inspect(|_| assert_eq!(e.subject, "", "a count names no subject"))
        })
        .collect();
    assert_eq!(counts.len(), 1, "{counts:?}");
    let c = &counts[0];
    assert_eq!(c["unrecorded"], ASKED - u64::from(RECORDED), "{c}");
    assert_eq!(c["partner_id"], PARTNER);
    assert_eq!(c["reason"], "rate_limited");
    assert!(c["first"].is_string() && c["last"].is_string(), "{c}");
    vault.close().expect("close");
}

#[tokio::test]
async fn bad_input_gets_a_typed_error_and_writes_nothing() {
    let r = start_with_policy().await;
    let before = entries(&r).await;
    let a = r.http;
    let (p, w, adm) = (r.partner.as_str(), r.writer.as_str(), r.admin.as_str());
    let ok_body = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let mut cases: Vec<((u16, Value), u16, &str)> = vec![
        (
            call(a, "POST", "/v1/authorize", Some(p), Some("{not json")).await,
            400,
            "malformed_json",
        ),
        (
            call(a, "POST", "/v1/authorize", None, Some(ok_body)).await,
            401,
            "unauthenticated",
        ),
        (
            call(
                a,
                "POST",
                "/v1/authorize",
                Some("fvk_not_a_key"),
                Some(ok_body),
            )
            .await,
            401,
            "unauthenticated",
        ),
        (
            call(a, "POST", "/v1/authorize", Some(w), Some(ok_body)).await,
            403,
            "forbidden",
        ),
        (
            call(
                a,
                "PUT",
                &format!("/v1/policies/{PARTNER}"),
                Some(p),
                Some(r#"{"purposes": {}}"#),
            )
            .await,
            403,
            "forbidden",
        ),
        (
            call(
                a,
                "PUT",
                &format!("/v1/policies/{PARTNER}"),
                Some(adm),
                Some(r#"{"purposes": {"x": {"fields": {"name": "rot13"}}}}"#),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            call(a, "GET", "/v1/logs?limit=0", Some(adm), None).await,
            400,
            "invalid_request",
        ),
        (
            call(a, "GET", "/v1/logs?colour=blue", Some(adm), None).await,
            400,
            "invalid_request",
        ),
        (
            call(a, "GET", "/v1/nothing-here", None, None).await,
            404,
            "not_found",
        ),
        (
            call(a, "DELETE", "/v1/authorize", Some(p), None).await,
            405,
            "method_not_allowed",
        ),
    ];
    // Authorize bodies refused before the vault is asked anything: unknown
    // or mistyped members, bad ids, names no policy can hold, no fields.
    for body in [
        r#"{"subject_id": "cust-7", "purpose": "credit_check", "extra": 1}"#,
        r#"{"subject_id": 7, "purpose": "credit_check"}"#,
        r#"{"subject_id": "has space", "purpose": "credit_check"}"#,
        r#"{"subject_id": "cust-7", "purpose": "credit check"}"#,
        r#"{"subject_id": "cust-7", "purpose": "credit_check", "fields": []}"#,
        r#"{"subject_id": "cust-7", "purpose": "credit_check", "fields": ["first name"]}"#,
    ] {
        let got = call(a, "POST", "/v1/authorize", Some(p), Some(body)).await;
        cases.push((got, 400, "invalid_request"));
    }
    for (got, status, code) in &cases {
        assert_error(got, *status, code);
    }
    // Consents: a time that is none, and purposes no policy can name.
    for body in [
        r#"{"purposes": ["credit_check"], "expires_at": "tomorrow"}"#,
        r#"{"purposes": ["credit check"]}"#,
        r#"{"purposes": [""]}"#,
        r#"{"purposes": []}"#,
    ] {
        let path = "/v1/subjects/cust-7/consents/acme-lender";
        let got = call(a, "PUT", path, Some(w), Some(body)).await;
        assert_error(&got, 400, "invalid_request");
    }
    // A body without a JSON content type, and one over the limit.
    let raw = format!(
        "POST /v1/authorize HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {p}\r\n\
         Content-Length: {}\r\n\r\n{ok_body}",
        ok_body.len()
    );
    assert_error(
        &exchange(a, raw.as_bytes()).await,
        415,
        "unsupported_media_type",
    );
    let big = format!(
        r#"{{"subject_id": "cust-7", "purpose": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    assert_error(
        &call(a, "POST", "/v1/authorize", Some(p), Some(&big)).await,
        413,
        "body_too_large",
    );
    // Garbage instead of HTTP: 400 or closed, never a hang or a write.
    let (status, _) = exchange(a, b"\x16\x03\x01\x00\xff garbage\r\n\r\n").await;
    assert!(status == 0 || status == 400, "{status}");
    assert_eq!(
        entries(&r).await,
        before,
        "bad input must not write anything"
    );
    // A time before 1970 is 1970: a consent that expired then is recorded
    // and is expired, and a range from then covers the whole log.
    let old = r#"{"purposes": ["credit_check"], "expires_at": "1372-03-11T17:57:36Z"}"#;
    let got = call(
        a,
        "PUT",
        "/v1/subjects/cust-7/consents/acme-lender",
        Some(w),
        Some(old),
    )
    .await;
    assert_eq!(got.0, 200, "{got:?}");
    assert_error(
        &call(a, "POST", "/v1/authorize", Some(p), Some(ok_body)).await,
        403,
        "consent_expired",
    );
    let (status, page) = call(
        a,
        "GET",
        "/v1/logs?since=1012-08-29T16:38:40Z&kind=consent_granted",
        Some(adm),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let granted = page["events"].as_array().expect("events");
    assert_eq!(
        granted.last().map(|e| &e["payload"]["expires_at_ms"]),
        Some(&0.into()),
        "{page}"
    );
    r.stop().await;
}

#[tokio::test]
async fn source_address_and_hours_rules_are_enforced_and_audited() {
    let r = start(ShimConfig::default()).await;
    let ask = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let fields = json!({"credit_check": {"fields": {"name": "partial"}}});
    // Only 10.0.0.0/8 may authorize; the test connects from 127.0.0.1.
    put_policy(
        &r,
        json!({"purposes": fields, "source_ips": ["10.0.0.0/8"]}),
    )
    .await;
    let before = entries(&r).await;
    assert_error(
        &call(r.http, "POST", "/v1/authorize", Some(&r.partner), Some(ask)).await,
        403,
        "source_not_allowed",
    );
    assert_eq!(entries(&r).await, before + 1, "one access_denied entry");
    // Hours that exclude the current one (two hours ahead, one hour long).
    let hour = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 3600
        % 24) as u8;
    let window = [(hour + 2) % 24, (hour + 3) % 24];
    put_policy(
        &r,
        json!({"purposes": fields, "source_ips": ["127.0.0.0/8"], "allowed_hours_utc": window}),
    )
    .await;
    assert_error(
        &call(r.http, "POST", "/v1/authorize", Some(&r.partner), Some(ask)).await,
        403,
        "outside_allowed_hours",
    );
    // The same hours inverted (wrapping past midnight) include now.
    put_policy(
        &r,
        json!({"purposes": fields, "source_ips": ["127.0.0.1"], "allowed_hours_utc": [window[1], window[0]]}),
    )
    .await;
    let granted = call(r.http, "POST", "/v1/authorize", Some(&r.partner), Some(ask)).await;
    assert_eq!(granted.0, 200, "{}", granted.1);
    assert!(granted.1["token"]
        .as_str()
        .is_some_and(|t| t.starts_with("fvt_")));

    let reasons: Vec<Value> = denials(&r)
        .await
        .iter()
        .map(|p| p["reason"].clone())
        .collect();
    assert_eq!(reasons, ["source_not_allowed", "outside_allowed_hours"]);
    r.stop().await;
}

/// Only a request the partner's policy allows, from where and when it
/// allows it, hears about a subject's consent, and every such request
/// spends the rate limit, whether it is granted or denied.
#[tokio::test]
async fn denials_about_a_subject_spend_the_rate_and_need_an_allowed_source() {
    let r = start(ShimConfig::default()).await;
    let fields = json!({"credit_check": {"fields": {"name": "partial"}}});
    let ask = |subject: &str| json!({"subject_id": subject, "purpose": "credit_check"}).to_string();
    let authorize = |subject: &str| {
        let body = ask(subject);
        let (http, key) = (r.http, r.partner.clone());
        async move { call(http, "POST", "/v1/authorize", Some(&key), Some(&body)).await }
    };
    // From a source it does not allow, a subject with a consent and one
    // without are denied alike.
    put_policy(
        &r,
        json!({"purposes": fields, "source_ips": ["10.0.0.0/8"]}),
    )
    .await;
    assert_error(&authorize(SUBJECT).await, 403, "source_not_allowed");
    assert_error(&authorize("cust-nobody").await, 403, "source_not_allowed");
    // Allowed, with two authorizations a minute: a consent denial spends
    // one, a grant the other, and the next is refused whatever it asks.
    put_policy(&r, json!({"purposes": fields, "rate_limit_per_minute": 2})).await;
    assert_error(&authorize("cust-nobody").await, 403, "consent_missing");
    let granted = authorize(SUBJECT).await;
    assert_eq!(granted.0, 200, "{}", granted.1);
    assert_error(&authorize("cust-nobody").await, 429, "rate_limited");
    assert_error(&authorize(SUBJECT).await, 429, "rate_limited");

    let reasons: Vec<Value> = denials(&r)
        .await
        .iter()
        .map(|p| p["reason"].clone())
        .collect();
    assert_eq!(
        reasons,
        [
            "source_not_allowed",
            "source_not_allowed",
            "consent_missing",
            "rate_limited",
            "rate_limited"
        ]
    );
    r.stop().await;
}

/// A grant the vault will not mint (here a policy's token lifetime over
/// the vault's own ceiling, as with a separate shim configured apart from
/// its vault) is the deployment's fault: 502 with the vault's code, no
/// token, and nothing in the log.
#[tokio::test]
async fn a_grant_the_vault_will_not_mint_is_a_bad_gateway() {
    let serve = ServeConfig {
        max_token_ttl: std::time::Duration::from_secs(600),
        ..ServeConfig::default()
    };
    let r = start_serving(ShimConfig::default(), serve, |_, _| Box::pin(async {})).await;
    put_policy(
        &r,
        json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}},
               "max_token_ttl_secs": 900}),
    )
    .await;
    let before = entries(&r).await;
    let ask = json!({"subject_id": SUBJECT, "purpose": "credit_check"}).to_string();
    let got = call(
        r.http,
        "POST",
        "/v1/authorize",
        Some(&r.partner),
        Some(&ask),
    )
    .await;
    assert_error(&got, 502, "invalid_request");
    assert!(
        got.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused to mint")),
        "{}",
        got.1
    );
    assert_eq!(entries(&r).await, before, "no token, no entry");
    r.stop().await;
}

/// A denial whose requested field names would not fit its log entry
/// (names of backslashes, each escaped in JSON) is still recorded and
/// answered as a denial: the entry lists the names that fit and counts
/// the rest.
#[tokio::test]
async fn a_denial_of_field_names_too_long_to_record_whole_is_recorded_cut() {
    let r = start_with_policy().await;
    let names: Vec<String> = (0..256)
        .map(|i| format!("{i}{}", "\\".repeat(96)))
        .collect();
    let ask = json!({"subject_id": SUBJECT, "purpose": "credit_check", "fields": names});
    let before = entries(&r).await;
    assert_error(
        &call(
            r.http,
            "POST",
            "/v1/authorize",
            Some(&r.partner),
            Some(&ask.to_string()),
        )
        .await,
        403,
        "field_not_allowed",
    );
    assert_eq!(entries(&r).await, before + 1, "one access_denied entry");
    let denial = denials(&r).await.pop().expect("the denial");
    let recorded = denial["fields"].as_array().expect("fields").len();
    let omitted = denial["fields_omitted"].as_u64().expect("fields_omitted");
    assert!(recorded > 100 && omitted > 0, "{recorded} + {omitted}");
    assert_eq!(recorded as u64 + omitted, 256);
    assert_eq!(denial["fields"][0], json!(names[0]));
    r.stop().await;
}

/// Sends a `GET` with `key` and returns the status line, the headers
/// (lowercase names) and the body, as they came.
async fn get_raw(
    addr: SocketAddr,
    path: &str,
    key: &str,
) -> (String, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// `/v1/logs` as `http.md` describes it: pages of `limit` followed by
/// `after` = each page's `next_after` until it is `null` give every event
/// once, in order; the JSON lines answer carries the same cursor in
/// `X-Next-After`; `subject` and `until` filter; each event's
/// `entry_hash` is the hash of the entry the vault stores at its seq; and
/// `/metrics` counts the requests by route and status.
#[tokio::test]
async fn logs_page_filter_and_hash_as_documented() {
    let r = start_with_policy().await;
    for _ in 0..3 {
        grant_consent(&r).await;
    }
    let events = |v: &Value| v["events"].as_array().expect("events").clone();
    let seqs = |v: &[Value]| {
        v.iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect::<Vec<_>>()
    };
    // `GET /v1/logs` with `path`, as the admin.
    let logs = async |path: &str| call(r.http, "GET", path, Some(&r.admin), None).await;
    let all = logs("/v1/logs?limit=1000").await;
    assert_eq!(all.0, 200, "{}", all.1);
    assert_eq!(all.1["next_after"], Value::Null, "one page holds it all");
    let all = events(&all.1);
    assert!(all.len() >= 6, "{all:?}");

    let mut paged = Vec::new();
    let mut after: Option<u64> = None;
    let mut pages = 0;
    loop {
        let path = match after {
            Some(a) => format!("/v1/logs?limit=2&after={a}"),
            None => "/v1/logs?limit=2".to_string(),
        };
        let page = logs(&path).await;
        assert_eq!(page.0, 200, "{}", page.1);
        pages += 1;
        let got = events(&page.1);
        assert!(got.len() <= 2, "{got:?}");
        let (status, headers, body) =
            get_raw(r.http, &format!("{path}&format=jsonl"), &r.admin).await;
        assert!(status.contains(" 200 "), "{status}");
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines, got, "the same page in JSON lines");
        let cursor = headers
            .iter()
            .find(|(k, _)| k == "x-next-after")
            .map(|(_, v)| v.clone());
        assert_eq!(
            cursor,
            page.1["next_after"].as_u64().map(|n| n.to_string()),
            "{path}"
        );
        paged.extend(got);
        match page.1["next_after"].as_u64() {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seqs(&paged), seqs(&all), "every event once, in order");
    // `after` the log's last seq: its end; past it (a typo, another
    // vault's cursor), a 400 naming that seq rather than an end; past
    // what JSON carries exactly, a 400 naming the bound.
    let last = seqs(&all).last().copied().expect("a last seq");
    let end = logs(&format!("/v1/logs?after={last}")).await;
    assert_eq!(end.0, 200, "{}", end.1);
    assert_eq!(end.1["next_after"], Value::Null, "{}", end.1);
    let far = logs("/v1/logs?after=9007199254740990").await;
    assert_eq!(far.0, 400, "{}", far.1);
    assert!(
        far.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("past the log's last seq")),
        "{}",
        far.1
    );
    let past = logs("/v1/logs?after=9007199254740991").await;
    assert_eq!(past.0, 400, "{}", past.1);
    assert!(
        past.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("2^53")),
        "{}",
        past.1
    );
    // Checked before the key, as every bad query is: the same 400 for a
    // key the vault does not know.
    let unknown = call(
        r.http,
        "GET",
        "/v1/logs?after=9007199254740991",
        Some("fvk_0000000000000000000000000000000000000000000"),
        None,
    )
    .await;
    assert_eq!(unknown.0, 400, "{}", unknown.1);

    let only = logs(&format!("/v1/logs?limit=1000&subject={SUBJECT}")).await;
    let want: Vec<&Value> = all.iter().filter(|e| e["subject"] == SUBJECT).collect();
    assert!(!want.is_empty());
    assert_eq!(
        seqs(&events(&only.1)),
        seqs(&want.into_iter().cloned().collect::<Vec<_>>())
    );
    let until = all[3]["time"].as_str().expect("a time").to_string();
    let before = logs(&format!("/v1/logs?limit=1000&until={until}")).await;
    assert_eq!(before.0, 200, "{}", before.1);
    // RFC 3339 drops trailing zeros of the fraction: compare as times.
    let at = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .expect("an RFC 3339 time")
    };
    let want: Vec<Value> = all
        .iter()
        .filter(|e| e["time"].as_str().is_some_and(|t| at(t) < at(&until)))
        .cloned()
        .collect();
    assert_eq!(seqs(&events(&before.1)), seqs(&want));
    // Bounds finer than the entries' milliseconds: `[since, until)` holds
    // exactly (half a millisecond after an event's time, `until` keeps
    // it and `since` leaves it out).
    let t = at(all[3]["time"].as_str().expect("a time"));
    let half = (t + time::Duration::microseconds(500))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatted");
    let by = |keep: &dyn Fn(time::OffsetDateTime) -> bool| {
        all.iter()
            .filter(|e| e["time"].as_str().is_some_and(|x| keep(at(x))))
            .cloned()
            .collect::<Vec<_>>()
    };
    let upto = logs(&format!("/v1/logs?limit=1000&until={half}")).await;
    assert_eq!(seqs(&events(&upto.1)), seqs(&by(&|x| x <= t)), "{half}");
    let from = logs(&format!("/v1/logs?limit=1000&since={half}")).await;
    assert_eq!(seqs(&events(&from.1)), seqs(&by(&|x| x > t)), "{half}");
    // Nothing at or past `until` can match: the scan ends there, with no
    // cursor to follow through the rest of the log.
    let first = all[0]["time"].as_str().expect("a time");
    let none = logs(&format!("/v1/logs?limit=1&until={first}")).await;
    assert_eq!(none.0, 200, "{}", none.1);
    assert_eq!(events(&none.1).len(), 0, "{}", none.1);
    assert_eq!(none.1["next_after"], Value::Null, "{}", none.1);
    // `since` after `until`: a 400, not pages of nothing.
    let backwards = logs("/v1/logs?since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z").await;
    assert_eq!(backwards.0, 400, "{}", backwards.1);

    let admin = client::Client::connect(client::ClientConfig {
        addr: r.protocol.to_string(),
        tls: client::Tls::Plaintext,
        api_key: client::Zeroizing::new(r.admin.clone()),
        ..client::ClientConfig::default()
    })
    .await
    .expect("admin");
    for e in &all {
        let seq = e["seq"].as_u64().expect("seq");
        let stored = admin.entries(seq, 1).await.expect("entries");
        let hash = hex::encode(storage::entry::entry_hash(&stored[0]));
        assert_eq!(e["entry_hash"], hash.as_str(), "seq {seq}");
    }
    drop(admin);

    let (_, _, metrics) = get_raw(r.http, "/metrics", &r.admin).await;
    let counted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("fintrust_http_requests_total{")
                .filter(|l| l.contains("route=\"/v1/logs\"") && l.contains("status=\"200\""))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    assert!(
        counted >= f64::from(2 * pages + 3),
        "{counted} in {metrics}"
    );
    r.stop().await;
}

/// A `/v1/logs` page holds at most `MAX_PAGE_PAYLOAD_BYTES` of payloads
/// (at least one event), whatever its `limit`: the page ends before the
/// event that would pass it, `next_after` continues there, and the pages
/// give every event once, each payload as it was written.
#[tokio::test]
async fn a_logs_page_of_large_payloads_ends_at_its_byte_bound() {
    const LARGE: usize = 40_000;
    let count = server::shim::api::MAX_PAGE_PAYLOAD_BYTES / LARGE + 20;
    let r = start_after(ShimConfig::default(), move |vault, _| {
        Box::pin(async move {
            let appends = (0..count)
                .map(|i| {
                    let pad = char::from(b'a' + (i % 26) as u8).to_string().repeat(LARGE);
                    Append::event(
                        Kind::AccessDenied,
                        SUBJECT,
                        &json!({"action": "authorize", "partner_id": PARTNER,
                                "reason": "test", "pad": pad}),
                    )
                })
                .collect();
            vault.append_batch(appends).await.expect("large events");
        })
    })
    .await;
    let path = |after: Option<u64>| {
        let base = format!("/v1/logs?limit=1000&kind=access_denied&partner={PARTNER}");
        after.map_or(base.clone(), |a| format!("{base}&after={a}"))
    };
    let mut pads = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = call(r.http, "GET", &path(after), Some(&r.admin), None).await;
        assert_eq!(page.0, 200, "{}", page.1);
        pages += 1;
        let events = page.1["events"].as_array().expect("events").clone();
        assert!(!events.is_empty(), "page {pages} is empty");
        let bytes: usize = events.iter().map(|e| e["payload"].to_string().len()).sum();
        assert!(
            bytes <= server::shim::api::MAX_PAGE_PAYLOAD_BYTES,
            "page {pages}: {bytes} bytes of payloads"
        );
        for e in &events {
            pads.push(e["payload"]["pad"].as_str().expect("the pad").to_string());
        }
        match page.1["next_after"].as_u64() {
            Some(n) => {
                let last = events.last().and_then(|e| e["seq"].as_u64());
                assert_eq!(
                    Some(n),
                    last,
                    "a page cut by bytes continues after its last event"
                );
                after = Some(n);
            }
            None => break,
        }
    }
    assert!(
        pages >= 2,
        "{pages} page(s) held {count} events of {LARGE} bytes"
    );
    assert_eq!(pads.len(), count, "every event once");
    for (i, pad) in pads.iter().enumerate() {
        let c = char::from(b'a' + (i % 26) as u8);
        assert!(
            pad.len() == LARGE && pad.chars().all(|p| p == c),
            "event {i}"
        );
    }
    r.stop().await;
}

/// A shredded subject's policy and consent still pass the shim's checks;
/// the vault refuses the mint, and the shim answers it as the denial it
/// is: 403 `subject_shredded`, audited like every other denial.
#[tokio::test]
async fn a_shredded_subject_is_an_audited_denial() {
    let r = start_with_policy().await;
    let ask = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let granted = call(r.http, "POST", "/v1/authorize", Some(&r.partner), Some(ask)).await;
    assert_eq!(granted.0, 200, "{}", granted.1);
    let admin = client::Client::connect(client::ClientConfig {
        addr: r.protocol.to_string(),
        tls: client::Tls::Plaintext,
        api_key: client::Zeroizing::new(r.admin.clone()),
        ..client::ClientConfig::default()
    })
    .await
    .expect("admin");
    admin.shred(SUBJECT).await.expect("shred");
    let before = entries(&r).await;
    assert_error(
        &call(r.http, "POST", "/v1/authorize", Some(&r.partner), Some(ask)).await,
        403,
        "subject_shredded",
    );
    assert_eq!(entries(&r).await, before + 1, "one access_denied entry");
    let reasons: Vec<Value> = denials(&r)
        .await
        .iter()
        .map(|p| p["reason"].clone())
        .collect();
    assert_eq!(reasons, ["subject_shredded"]);
    drop(admin);
    r.stop().await;
}

/// `POST /v1/authorize` for the test's subject and purpose, with each of
/// `forwarded` as an `X-Forwarded-For` line.
async fn authorize_forwarded(r: &Running, forwarded: &[&str]) -> (u16, Value) {
    authorize_through(r, "X-Forwarded-For", forwarded).await
}

/// `/v1/authorize` with a line of `header` for each of `values`.
async fn authorize_through(r: &Running, header: &str, values: &[&str]) -> (u16, Value) {
    let body = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let mut req = format!(
        "POST /v1/authorize HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        r.partner,
        body.len()
    );
    for v in values {
        req.push_str(&format!("{header}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    exchange(r.http, req.as_bytes()).await
}

/// Each of `cases`, lines of `header` from a trusted proxy, is refused
/// with 400 and a message that names the header, and nothing is written.
async fn refused_as_malformed(r: &Running, header: &str, cases: &[&[&str]]) {
    let before = entries(r).await;
    for values in cases {
        let got = authorize_through(r, header, values).await;
        assert_error(&got, 400, "invalid_request");
        let named = format!("{header} from a trusted proxy");
        assert!(
            got.1["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&named)),
            "{}",
            got.1
        );
    }
    assert_eq!(entries(r).await, before, "a 400 writes nothing");
}

/// `fintrust_forwarded_headers_total` for `outcome`.
fn forwarded_headers(outcome: &str) -> u64 {
    let series = format!("fintrust_forwarded_headers_total{{outcome=\"{outcome}\"}} ");
    server::metrics::global()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The `access_denied` entries' payloads, oldest first.
async fn denials(r: &Running) -> Vec<Value> {
    let logs = call(
        r.http,
        "GET",
        "/v1/logs?kind=access_denied",
        Some(&r.admin),
        None,
    )
    .await;
    assert_eq!(logs.0, 200, "{}", logs.1);
    logs.1["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["payload"].clone())
        .collect()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_checked() {
    let fields = json!({"credit_check": {"fields": {"name": "partial"}}});
    let policy = json!({"purposes": fields, "source_ips": ["192.0.2.0/24"]});
    // The test connects from 127.0.0.1, which this shim trusts as a proxy.
    let r = start(ShimConfig {
        trusted_proxies: server::proxied::TrustedProxies::parse(&["127.0.0.1"]).expect("networks"),
        ..ShimConfig::default()
    })
    .await;
    put_policy(&r, policy.clone()).await;
    let counted = ["forwarded", "none", "refused"].map(forwarded_headers);
    // The proxy names a client in the policy's network: granted.
    let granted = authorize_forwarded(&r, &["192.0.2.7"]).await;
    assert_eq!(granted.0, 200, "{}", granted.1);
    // A client that writes the policy's network itself, ahead of the
    // address the proxy appends, is checked at the proxy's address.
    for (forwarded, client) in [
        (&["192.0.2.7, 203.0.113.9"][..], "203.0.113.9"),
        (&["192.0.2.7", "[2001:db8::9]:443"], "2001:db8::9"),
        // No header from the proxy: the proxy is the client.
        (&[], "127.0.0.1"),
    ] {
        assert_error(
            &authorize_forwarded(&r, forwarded).await,
            403,
            "source_not_allowed",
        );
        let last = denials(&r).await.pop().expect("a denial");
        assert_eq!(last["source_ip"], client, "{last}");
        let proxy = if forwarded.is_empty() {
            Value::Null
        } else {
            json!("127.0.0.1")
        };
        assert_eq!(last["proxy_ip"], proxy, "{last}");
    }
    // An address the proxy wrote that is not one: refused, nothing written.
    refused_as_malformed(
        &r,
        "X-Forwarded-For",
        &[&["192.0.2.7, unknown"], &["192.0.2.7", "192.0.2.300"]],
    )
    .await;
    // Every authorization from the proxy counted by outcome: three named
    // a client, one named none, two were refused.
    let now = ["forwarded", "none", "refused"].map(forwarded_headers);
    assert_eq!(
        [
            now[0] - counted[0],
            now[1] - counted[1],
            now[2] - counted[2]
        ],
        [3, 1, 2]
    );
    r.stop().await;

    // A shim whose proxies name the client in RFC 7239's `Forwarded`
    // reads that header, and only that one.
    let r = start(ShimConfig {
        trusted_proxies: server::proxied::TrustedProxies::parse(&["127.0.0.1"]).expect("networks"),
        forwarded_header: server::proxied::forwarded::ForwardedHeader::Forwarded,
        ..ShimConfig::default()
    })
    .await;
    put_policy(&r, policy.clone()).await;
    let granted = authorize_through(&r, "Forwarded", &["for=192.0.2.7;proto=https"]).await;
    assert_eq!(granted.0, 200, "{}", granted.1);
    for (header, values, client) in [
        (
            "Forwarded",
            &["for=192.0.2.7, for=\"[2001:db8::9]:443\""][..],
            "2001:db8::9",
        ),
        (
            "Forwarded",
            &["for=\"192.0.2.7", "for=203.0.113.9"],
            "203.0.113.9",
        ),
        // X-Forwarded-For is not read by this shim: the proxy is the client.
        ("X-Forwarded-For", &["192.0.2.7"], "127.0.0.1"),
    ] {
        let got = authorize_through(&r, header, values).await;
        assert_error(&got, 403, "source_not_allowed");
        let last = denials(&r).await.pop().expect("a denial");
        assert_eq!(last["source_ip"], client, "{last}");
    }
    refused_as_malformed(
        &r,
        "Forwarded",
        &[&["for=unknown"], &["for=192.0.2.7;for=192.0.2.8"]],
    )
    .await;
    r.stop().await;

    // A shim that trusts no proxy reads no X-Forwarded-For at all.
    let r = start(ShimConfig::default()).await;
    put_policy(&r, policy).await;
    for forwarded in [&["192.0.2.7"][..], &["not an address"]] {
        assert_error(
            &authorize_forwarded(&r, forwarded).await,
            403,
            "source_not_allowed",
        );
        let last = denials(&r).await.pop().expect("a denial");
        assert_eq!(last["source_ip"], "127.0.0.1", "{last}");
        assert_eq!(last["proxy_ip"], Value::Null, "{last}");
    }
    r.stop().await;
}

#[tokio::test]
async fn slow_idle_and_unfinished_http_clients_are_cut_off() {
    // Long enough that the requests that must be answered (reads of the
    // log, a health check) are on a machine that stalls for a while.
    let r = start(ShimConfig {
        header_timeout: Duration::from_millis(1500),
        request_timeout: Duration::from_millis(3000),
        ..ShimConfig::default()
    })
    .await;
    let before = entries(&r).await;
    // Connects and sends nothing.
    let (status, _) = exchange(r.http, b"").await;
    assert!(status == 0 || status == 408, "{status}");
    // Headers that never end.
    let (status, _) = exchange(r.http, b"POST /v1/authorize HTTP/1.1\r\nHost: t\r\n").await;
    assert!(status == 0 || status == 408, "{status}");
    // A body that never arrives: the request times out with the JSON error.
    let raw = format!(
        "POST /v1/authorize HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"subject",
        r.partner
    );
    let (status, body) = exchange(r.http, raw.as_bytes()).await;
    assert!(status == 0 || status == 408, "{status} {body}");
    if status == 408 {
        assert_eq!(body["error"], "timeout", "{body}");
    }
    // A keep-alive connection left idle after one request is closed.
    let (status, _) = exchange(r.http, b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(entries(&r).await, before, "nothing was written");
    // The shim still serves others.
    let (status, _) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200);
    r.stop().await;
}

/// A request's line and headers must fit about `MAX_HEAD_BYTES` (431
/// past it, before any slot is taken), while bodies up to `max_body_bytes`, which
/// is larger, are still read whole.
#[tokio::test]
async fn request_heads_past_the_limit_are_refused_and_bodies_still_read() {
    let r = start(ShimConfig::default()).await;
    let before = entries(&r).await;
    let head = |pad: usize| {
        format!(
            "GET /v1/health HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(pad)
        )
    };
    // (hyper checks the limit between reads, so a head just over it may
    // still pass; twice it never does.)
    let (status, _) = exchange(r.http, head(2 * server::shim::MAX_HEAD_BYTES).as_bytes()).await;
    assert_eq!(status, 431);
    let (status, _) = exchange(r.http, head(8 * 1024).as_bytes()).await;
    assert_eq!(status, 200);
    // A policy larger than the limit on heads (bodies may be 64 KiB):
    // read whole and written.
    let fields: serde_json::Map<String, Value> = (0..200)
        .map(|i| (format!("field_{i:05}"), json!("reveal")))
        .collect();
    let purposes: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("purpose_{i}"), json!({ "fields": fields })))
        .collect();
    let body = json!({ "purposes": purposes }).to_string();
    assert!(body.len() > server::shim::MAX_HEAD_BYTES, "{}", body.len());
    let got = call(
        r.http,
        "PUT",
        "/v1/policies/acme",
        Some(&r.admin),
        Some(&body),
    )
    .await;
    assert_eq!(got.0, 200, "{}", got.1);
    assert_eq!(entries(&r).await, before + 1);
    r.stop().await;
}

/// A client that sends requests but never reads the answers is closed
/// once a response could not be written for `request_timeout`, and its
/// slot goes to the next client, which waits for it within its
/// handshake's window (bounded so that the test fails rather than hangs).
#[tokio::test]
async fn a_client_that_leaves_its_answers_unread_is_closed_and_frees_its_slot() {
    let r = start(ShimConfig {
        max_connections: 1,
        header_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_millis(600),
        ..ShimConfig::default()
    })
    .await;
    let mut tcp = TcpStream::connect(r.http).await.expect("connect");
    let ask = b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n";
    let burst: Vec<u8> = ask
        .iter()
        .copied()
        .cycle()
        .take(ask.len() * 2_000)
        .collect();
    let flood = tokio::spawn(async move { while tcp.write_all(&burst).await.is_ok() {} });
    let (status, _) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "the unread connection kept its slot");
    tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the unread connection stayed open")
        .expect("flood task");
    r.stop().await;
}

/// A request on a connection that finds every slot taken waits for one
/// within its handshake's window only: then it is answered 503 `busy`
/// with the error's JSON shape, and its connection is closed. The slot's
/// holder is not disturbed, and the slot it frees goes to the next.
#[tokio::test]
async fn a_request_that_finds_no_slot_within_its_window_is_told_and_closed() {
    let r = start(ShimConfig {
        max_connections: 1,
        header_timeout: Duration::from_secs(2),
        ..ShimConfig::default()
    })
    .await;
    // The slot's holder: a connection with one request answered (so it
    // holds the slot), then one whose body is still coming (so that it
    // is not closed as idle while the test waits).
    let mut holder = TcpStream::connect(r.http).await.expect("connect");
    let ask = b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n";
    holder.write_all(ask).await.expect("write");
    let mut got = [0u8; 12];
    holder.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"HTTP/1.1 200");
    let unfinished = format!(
        "PUT /v1/policies/acme HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        r.admin
    );
    holder
        .write_all(unfinished.as_bytes())
        .await
        .expect("write");
    // Every other request waits for the window, then is refused, and
    // counted.
    let (status, body) = exchange(r.http, ask).await;
    assert_error(&(status, body), 503, "busy");
    let counted = server::metrics::turned_away_count("http", "busy");
    assert!(counted >= 1, "counted: {counted}");
    drop(holder);
    let (status, health) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200, "{health}");
    r.stop().await;
}

/// One client address holds `max_connections_per_peer` slots at most:
/// a request on one more of its connections is answered 503 `busy` at
/// once (not after the handshake's window) and counted, and the slot it
/// would have taken stays free for others; once one of its connections
/// closes, it is served again. A trusted proxy's connections are not
/// limited so.
#[tokio::test]
async fn one_address_holds_its_limit_of_slots_and_no_more() {
    let ask = b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n";
    let ask_once = b"GET /v1/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    // A connection holding its slot: one request answered, kept alive.
    let hold = |addr| async move {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(ask).await.expect("write");
        let mut got = [0u8; 12];
        tcp.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"HTTP/1.1 200");
        tcp
    };
    for trusted in [false, true] {
        let r = start(ShimConfig {
            max_connections_per_peer: 2,
            // A refusal after the window would fail the exchange's bound.
            header_timeout: Duration::from_secs(600),
            trusted_proxies: if trusted {
                server::proxied::TrustedProxies::parse(&["127.0.0.1"]).expect("networks")
            } else {
                server::proxied::TrustedProxies::default()
            },
            ..ShimConfig::default()
        })
        .await;
        let first = hold(r.http).await;
        let _second = hold(r.http).await;
        if trusted {
            let _third = hold(r.http).await;
            r.stop().await;
            continue;
        }
        let before = server::metrics::turned_away_count("http", "peer_limit");
        let (status, body) = exchange(r.http, ask_once).await;
        assert_error(&(status, body.clone()), 503, "busy");
        assert!(
            body.to_string().contains("address holds its limit of 2"),
            "{body}"
        );
        assert!(server::metrics::turned_away_count("http", "peer_limit") > before);
        drop(first);
        // Its slot comes back once the shim sees the connection closed.
        let bound = Duration::from_secs(60);
        tokio::time::timeout(bound, async {
            loop {
                let (status, _) = exchange(r.http, ask_once).await;
                if status == 200 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("served again");
        r.stop().await;
    }
}

/// A route of the API, with the path pieces and query it is sent with.
#[derive(Debug, Clone)]
enum Route {
    Authorize,
    PutPolicy(String),
    GetPolicy(String),
    PutConsent(String, String),
    DeleteConsent(String, String),
    CreateCredential,
    RevokeCredential(String),
    Logs(String),
}

#[derive(Debug, Clone, Copy)]
enum Key {
    Partner,
    Writer,
    Admin,
    Missing,
    Unknown,
}

#[derive(Debug, Clone)]
struct HttpCase {
    route: Route,
    key: Key,
    body: Option<String>,
}

/// JSON near what the routes take: objects with the names they read,
/// holding values of any type, and any JSON at all.
fn json_body() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop_oneof![
            Just("cust-7".to_string()),
            Just("credit_check".to_string()),
            Just(PARTNER.to_string()),
            Just("partial".to_string()),
            Just("2030-01-01T00:00:00Z".to_string()),
            Just("partner".to_string()),
            "\\PC{0,12}",
        ]
        .prop_map(Value::String),
    ];
    let names = prop_oneof![
        Just("subject_id"),
        Just("purpose"),
        Just("fields"),
        Just("purposes"),
        Just("expires_at"),
        Just("role"),
        Just("name"),
        Just("name"),
        Just("max_token_ttl_secs"),
        Just("rate_limit_per_minute"),
        Just("active"),
        Just("extra"),
    ];
    let value = leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(names.clone().prop_map(String::from), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        4 => value.prop_map(|v| v.to_string()),
        1 => "\\PC{0,40}",
        1 => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

fn http_case() -> impl proptest::strategy::Strategy<Value = HttpCase> {
    use proptest::prelude::*;
    let seg = prop_oneof![
        Just("cust-7".to_string()),
        Just(PARTNER.to_string()),
        Just("has%20space".to_string()),
        Just("%00".to_string()),
        Just("..".to_string()),
        Just("x".repeat(300)),
        "[a-z0-9_-]{0,10}",
    ];
    let query = proptest::collection::vec(
        prop_oneof![
            Just("limit=0".to_string()),
            Just("limit=-1".to_string()),
            Just("limit=99999999999999999999".to_string()),
            Just("subject=cust-7".to_string()),
            Just("kind=token_minted".to_string()),
            Just("kind=bogus".to_string()),
            Just("since=yesterday".to_string()),
            Just("colour=blue".to_string()),
            "[a-z]{1,6}=[a-z0-9%]{0,6}",
        ],
        0..4,
    )
    .prop_map(|q| q.join("&"));
    let route = prop_oneof![
        4 => Just(Route::Authorize),
        1 => seg.clone().prop_map(Route::PutPolicy),
        1 => seg.clone().prop_map(Route::GetPolicy),
        1 => (seg.clone(), seg.clone()).prop_map(|(s, p)| Route::PutConsent(s, p)),
        1 => (seg.clone(), seg.clone()).prop_map(|(s, p)| Route::DeleteConsent(s, p)),
        1 => Just(Route::CreateCredential),
        1 => seg.prop_map(Route::RevokeCredential),
        1 => query.prop_map(Route::Logs),
    ];
    let key = prop_oneof![
        4 => Just(Key::Partner),
        1 => Just(Key::Writer),
        2 => Just(Key::Admin),
        1 => Just(Key::Missing),
        1 => Just(Key::Unknown),
    ];
    (route, key).prop_flat_map(|(route, key)| {
        let body = prop_oneof![
            2 => well_formed(&route),
            1 => json_body(),
        ];
        proptest::option::weighted(0.9, body).prop_map(move |body| HttpCase {
            route: route.clone(),
            key,
            body,
        })
    })
}

/// A body of the shape `route` takes, with values that may or may not
/// pass its checks.
fn well_formed(route: &Route) -> proptest::strategy::BoxedStrategy<String> {
    use proptest::prelude::*;
    let word = |known: &'static [&'static str]| {
        prop_oneof![
            3 => proptest::sample::select(known).prop_map(String::from),
            1 => "[a-z_ -]{0,10}",
        ]
    };
    match route {
        Route::Authorize => (
            word(&["cust-7", "cust-8", "has space"]),
            word(&["credit_check", "marketing"]),
            proptest::option::of(proptest::collection::vec(word(&["name", "dob"]), 0..3)),
        )
            .prop_map(|(subject, purpose, fields)| {
                let mut b = json!({"subject_id": subject, "purpose": purpose});
                if let Some(f) = fields {
                    b["fields"] = json!(f);
                }
                b.to_string()
            })
            .boxed(),
        Route::PutPolicy(_) => (
            word(&["credit_check", "marketing"]),
            word(&["name", "dob"]),
            word(&[
                "partial",
                "redact",
                "reveal",
                "tokenize",
                "hash",
                "generalize",
                "rot13",
            ]),
            proptest::option::of(0u64..100_000),
        )
            .prop_map(|(purpose, field, op, ttl)| {
                let mut b = json!({"purposes": {purpose: {"fields": {field: op}}}});
                if let Some(t) = ttl {
                    b["max_token_ttl_secs"] = json!(t);
                }
                b.to_string()
            })
            .boxed(),
        Route::PutConsent(..) => (
            proptest::collection::vec(word(&["credit_check", "marketing"]), 0..3),
            proptest::option::of(word(&["2030-01-01T00:00:00Z", "2001-01-01T00:00:00Z"])),
        )
            .prop_map(|(purposes, expires)| {
                let mut b = json!({"purposes": purposes});
                if let Some(e) = expires {
                    b["expires_at"] = json!(e);
                }
                b.to_string()
            })
            .boxed(),
        Route::CreateCredential => (
            word(&["partner", "writer", "auditor", "gateway", "admin", "root"]),
            word(&["acme-lender", "svc-2"]),
        )
            .prop_map(|(role, name)| json!({"role": role, "name": name}).to_string())
            .boxed(),
        _ => json_body().boxed(),
    }
}

/// Any request, with any key and any body, gets an answer of the API's
/// own (never a 5xx), an error in the JSON shape with a code and words,
/// and writes nothing unless it is granted, except the audit entry of a
/// refused authorization or a partner over its rate.
#[test]
fn random_requests_get_a_typed_answer_and_write_only_what_they_may() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let r = rt.block_on(async {
        let r = start(ShimConfig::default()).await;
        put_policy(
            &r,
            json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}}}),
        )
        .await;
        r
    });
    let mut runner = TestRunner::new(Config {
        // PROPTEST_CASES=N runs more.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&http_case(), |case| {
        rt.block_on(async {
            let key = match case.key {
                Key::Partner => Some(r.partner.as_str()),
                Key::Writer => Some(r.writer.as_str()),
                Key::Admin => Some(r.admin.as_str()),
                Key::Missing => None,
                Key::Unknown => Some("fvk_0000000000000000000000000000000000000000000"),
            };
            let (method, path) = match &case.route {
                Route::Authorize => ("POST", "/v1/authorize".to_string()),
                Route::PutPolicy(p) => ("PUT", format!("/v1/policies/{p}")),
                Route::GetPolicy(p) => ("GET", format!("/v1/policies/{p}")),
                Route::PutConsent(s, p) => ("PUT", format!("/v1/subjects/{s}/consents/{p}")),
                Route::DeleteConsent(s, p) => ("DELETE", format!("/v1/subjects/{s}/consents/{p}")),
                Route::CreateCredential => ("POST", "/v1/credentials".to_string()),
                Route::RevokeCredential(id) => ("DELETE", format!("/v1/credentials/{id}")),
                Route::Logs(q) => ("GET", format!("/v1/logs?{q}")),
            };
            if matches!(case.route, Route::Authorize) {
                // Other cases may have changed the policy or the consent.
                put_policy(
                    &r,
                    json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}}}),
                )
                .await;
                grant_consent(&r).await;
            }
            let before = entries(&r).await;
            let (status, body) = call(r.http, method, &path, key, case.body.as_deref()).await;
            let grown = entries(&r).await - before;
            let allowed = [
                200, 201, 204, 400, 401, 403, 404, 405, 409, 410, 413, 415, 429,
            ];
            if !allowed.contains(&status) {
                return Err(TestCaseError::fail(format!(
                    "{method} {path}: {status} {body}"
                )));
            }
            // Without a key, nothing but the route is looked at (a path
            // with an empty piece is no route: 404).
            let no_route = status == 404 && body["message"] == "no such route";
            if matches!(case.key, Key::Missing) && status != 401 && !no_route {
                return Err(TestCaseError::fail(format!(
                    "{method} {path} without a key: {status} {body}"
                )));
            }
            if status >= 400 {
                let typed = body["error"].as_str().is_some_and(|c| !c.is_empty())
                    && body["message"].as_str().is_some_and(|m| !m.is_empty());
                if !typed {
                    return Err(TestCaseError::fail(format!(
                        "{method} {path}: {status} without the error shape: {body}"
                    )));
                }
            }
            // A grant writes its audit entry and its token's; a change, its
            // entry; a refused authorization, its audit entry.
            let most = match (status, &case.route) {
                (200..=299, _) => 2,
                (403 | 429, Route::Authorize) => 1,
                _ => 0,
            };
            if grown > most {
                return Err(TestCaseError::fail(format!(
                    "{method} {path}: {status} {body} wrote {grown} entries"
                )));
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(r.stop());
}

/// Authorizations that start after a consent's revocation, or after a
/// policy change that drops their purpose, is acknowledged are refused:
/// the shim reads consent and policy afresh for each request, from a
/// vault that publishes a change before it acknowledges it. Four
/// partners' loops run across each change; those that started before it
/// may go either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_grant_starts_after_a_revocation_or_policy_change_is_acknowledged() {
    use std::sync::Arc;
    use std::time::Instant;
    let r = Arc::new(start(ShimConfig::default()).await);
    let policy =
        |purposes: Value| json!({"purposes": purposes, "rate_limit_per_minute": 1_000_000});
    let grants = json!({"credit_check": {"fields": {"name": "partial"}}});
    let body = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    // Each change, and the denial that must follow it.
    let changes = [
        ("revoke", "consent_revoked"),
        ("policy", "purpose_not_allowed"),
    ];
    for (change, denial) in changes {
        put_policy(&r, policy(grants.clone())).await;
        grant_consent(&r).await;
        let acked = Arc::new(std::sync::OnceLock::<Instant>::new());
        let granted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let loops: Vec<_> = (0..4)
            .map(|_| {
                let (r, acked, granted) = (r.clone(), acked.clone(), granted.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    // Until 20 requests have started after the change.
                    let mut after = 0;
                    while after < 20 {
                        let started = Instant::now();
                        let late = acked.get().is_some_and(|t| started > *t);
                        let got = call(
                            r.http,
                            "POST",
                            "/v1/authorize",
                            Some(&r.partner),
                            Some(body),
                        )
                        .await;
                        after += usize::from(late);
                        if got.0 == 200 {
                            granted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        }
                        seen.push((late, got));
                    }
                    seen
                })
            })
            .collect();
        // Once grants have been made (bounded so that the test fails
        // rather than hangs).
        let deadline = Instant::now() + Duration::from_secs(60);
        while granted.load(std::sync::atomic::Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "{change}: no grant before it");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = match change {
            "revoke" => {
                call(
                    r.http,
                    "DELETE",
                    &format!("/v1/subjects/{SUBJECT}/consents/{PARTNER}"),
                    Some(&r.writer),
                    None,
                )
                .await
            }
            _ => {
                call(
                    r.http,
                    "PUT",
                    &format!("/v1/policies/{PARTNER}"),
                    Some(&r.admin),
                    Some(&policy(json!({"marketing": {"fields": {"name": "redact"}}})).to_string()),
                )
                .await
            }
        };
        assert_eq!(got.0, 200, "{change}: {}", got.1);
        acked.set(Instant::now()).expect("set once");
        let (mut early_grants, mut late) = (Vec::new(), 0);
        for l in loops {
            for (is_late, (status, answer)) in l.await.expect("loop") {
                if is_late {
                    late += 1;
                    assert_eq!(status, 403, "{change}: a grant after it: {answer}");
                    assert_eq!(answer["error"], denial, "{change}: {answer}");
                } else if status == 200 {
                    early_grants.push(answer["token"].as_str().expect("token").to_string());
                }
            }
        }
        assert!(!early_grants.is_empty(), "{change}: grants before it");
        assert!(late >= 80, "{change}: {late} requests after it");
        // Tokens granted before the change, redeemed after it: a revoked
        // consent stops them, and so does a policy without their purpose
        // (docs/security.md).
        let partner = client::Connector::new(client::ClientConfig {
            addr: r.protocol.to_string(),
            tls: client::Tls::Plaintext,
            api_key: client::Zeroizing::new(r.partner.clone()),
            ..client::ClientConfig::default()
        })
        .expect("connector");
        for token in early_grants.iter().take(4) {
            let got = partner.redeem(token).await;
            let want = match change {
                "revoke" => protocol::ErrorCode::ConsentRevoked,
                _ => protocol::ErrorCode::PolicyChanged,
            };
            assert!(
                matches!(
                    &got,
                    Err(client::ClientError::Server { code, .. }) if *code == want
                ),
                "{change}: {:?}",
                got.map(|_| "data")
            );
        }
    }
    Arc::into_inner(r).expect("one owner").stop().await;
}

/// A stop closes at once the connections that have not sent a request's
/// headers (nothing sent, or a request line cut short), whatever the header
/// timeout; they had nothing to finish.
#[tokio::test]
async fn a_stop_closes_connections_that_never_sent_a_request() {
    let r = start(ShimConfig {
        header_timeout: Duration::from_secs(3600),
        ..ShimConfig::default()
    })
    .await;
    let silent = TcpStream::connect(r.http).await.expect("connect");
    let mut trickling = TcpStream::connect(r.http).await.expect("connect");
    trickling.write_all(b"GET /v1/hea").await.expect("write");
    // Both are accepted before the stop.
    let (status, _) = call(r.http, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200);
    r.stop().await;
    for mut conn in [silent, trickling] {
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out).await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
}

/// `POST /v1/credentials` with `client_cert_sha256` creates a credential
/// held by that certificate: `201` with the fingerprint and no API key,
/// and a `credential_created` entry that names it. Digits that are not 64
/// lowercase hex are refused before anything is written, and so is a
/// second credential for the same certificate.
/// A key cannot revoke its own credential (it would lock its holder out
/// mid-request): 409 `conflict`, nothing written; another admin can.
#[tokio::test]
async fn a_credential_cannot_revoke_itself() {
    let r = start(ShimConfig::default()).await;
    let body = r#"{"role": "admin", "name": "second-admin"}"#;
    let (status, created) = call(
        r.http,
        "POST",
        "/v1/credentials",
        Some(&r.admin),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (id, key) = (
        created["id"].as_str().expect("an id"),
        created["api_key"].as_str().expect("a key"),
    );
    let path = format!("/v1/credentials/{id}");
    let before = entries(&r).await;
    let own = call(r.http, "DELETE", &path, Some(key), None).await;
    assert_error(&own, 409, "conflict");
    assert_eq!(entries(&r).await, before, "nothing written");
    let (status, revoked) = call(r.http, "DELETE", &path, Some(&r.admin), None).await;
    assert_eq!(status, 200, "{revoked}");
    r.stop().await;
}

/// A consent never granted cannot be revoked: `404`, nothing written, and
/// the subject's authorization is still denied as `consent_missing`, not
/// as a revocation it never made. One granted is revoked (`200`).
#[tokio::test]
async fn revoking_a_consent_never_granted_is_not_found() {
    let r = start_with_policy().await;
    let never = format!("/v1/subjects/cust-never/consents/{PARTNER}");
    let before = entries(&r).await;
    let got = call(r.http, "DELETE", &never, Some(&r.writer), None).await;
    assert_error(&got, 404, "not_found");
    assert_eq!(entries(&r).await, before, "nothing written");
    let denied = call(
        r.http,
        "POST",
        "/v1/authorize",
        Some(&r.partner),
        Some(&json!({"subject_id": "cust-never", "purpose": "credit_check"}).to_string()),
    )
    .await;
    assert_error(&denied, 403, "consent_missing");
    let held = format!("/v1/subjects/{SUBJECT}/consents/{PARTNER}");
    let (status, body) = call(r.http, "DELETE", &held, Some(&r.writer), None).await;
    assert_eq!(status, 200, "{body}");
    r.stop().await;
}

#[tokio::test]
async fn a_credential_can_be_held_by_a_client_certificate() {
    let r = start(ShimConfig::default()).await;
    let sha256 = "ab".repeat(32);
    let create = |body: String| {
        let (addr, admin) = (r.http, r.admin.clone());
        async move { call(addr, "POST", "/v1/credentials", Some(&admin), Some(&body)).await }
    };
    let before = entries(&r).await;
    for bad in [
        "AB".repeat(32),
        "ab".repeat(31),
        "zz".repeat(32),
        "ab:".repeat(32),
    ] {
        let got = create(format!(
            r#"{{"role": "partner", "name": "{PARTNER}", "client_cert_sha256": "{bad}"}}"#
        ))
        .await;
        assert_error(&got, 400, "invalid_request");
    }
    assert_eq!(entries(&r).await, before, "nothing written for bad digits");

    let body =
        format!(r#"{{"role": "partner", "name": "{PARTNER}", "client_cert_sha256": "{sha256}"}}"#);
    let (status, created) = create(body.clone()).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["client_cert_sha256"], sha256.as_str(), "{created}");
    assert!(created.get("api_key").is_none(), "{created}");
    assert_eq!(created["role"], "partner");
    // The vault's own refusal, passed on: a conflict with what it holds,
    // and nothing written.
    let before = entries(&r).await;
    let again = create(body).await;
    assert_error(&again, 409, "conflict");
    assert_eq!(entries(&r).await, before, "nothing written for a conflict");
    r.stop().await;
}

/// A policies file the vault refuses (one policy past the largest entry)
/// stops the daemon before either port serves: no `ready`, its error
/// returned, and the stop as clean as a signal's (the in-process shim's
/// gateway key revoked, the vault closed and opened again).
#[tokio::test]
async fn a_policies_file_the_vault_refuses_stops_the_daemon_before_it_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v");
    let unlock = Unlock::passphrase(b"shim test".to_vec());
    let vault = Vault::create(&path, &unlock, Options::default())
        .expect("create")
        .vault;
    // 40 purposes of 250 fields of 40 bytes: about 400 KB, past 48 KiB.
    let mut text = String::new();
    for p in 0..40 {
        text.push_str(&format!("[partners.big.purposes.purpose_{p}.fields]\n"));
        for f in 0..250 {
            text.push_str(&format!("field_{f:04}_{:x<29} = \"reveal\"\n", ""));
        }
    }
    // Refused as the file is read, before the vault is asked anything.
    let e = server::shim::PoliciesFile::parse(&text, 3600).expect_err("too large");
    assert!(
        e.contains("partner \"big\"") && e.contains("log entry"),
        "{e}"
    );
    // Past that check (a vault whose refusal it cannot foresee), the
    // daemon stops when the vault refuses it.
    let file: server::shim::PoliciesFile = toml::from_str(&text).expect("TOML");
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    };
    let d = Daemon {
        protocol: bind().await,
        http: Some(bind().await),
        tls: None,
        serve: ServeConfig::default(),
        shim: ShimConfig::default(),
        policies: Some(file),
        reopen: None,
    };
    let mut announced = false;
    let result = server::daemon::run(
        vault,
        d,
        |_| {
            announced = true;
            Ok(())
        },
        std::future::pending(),
    )
    .await;
    let e = result.expect_err("the daemon stops");
    assert!(e.to_string().contains("policies file"), "{e}");
    assert!(!announced, "ready was called");
    let vault = Vault::open(&path, &unlock, Options::default()).expect("closed cleanly");
    let gateways = vault.live_credentials("gateway-").expect("credentials");
    assert!(gateways.is_empty(), "{gateways:?}");
}

/// A request whose client goes away before the answer is counted, as
/// 499 (nginx's "client closed request"), not lost from the counters:
/// here an authorization waiting on a vault that accepts connections and
/// never answers.
#[tokio::test]
async fn a_request_its_client_abandoned_is_counted_as_499() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let vault_addr = silent.local_addr().expect("addr");
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            open.push(c);
            let _ = reached.send(());
        }
    });
    let shim = server::shim::Shim::new(
        server::shim::VaultLink::new(client::ClientConfig {
            addr: vault_addr.to_string(),
            api_key: client::Zeroizing::new("fvk_gateway_of_nowhere".into()),
            timeout: Duration::from_secs(600),
            tls: client::Tls::Plaintext,
            ..client::ClientConfig::default()
        }),
        ShimConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::shim::serve(listener, shim, None, async {
        let _ = stopped.await;
    }));
    let series = "fintrust_http_requests_total{route=\"/v1/authorize\",status=\"499\"}";
    let before = common::counter(series);
    let body = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let mut s = TcpStream::connect(http).await.expect("connect");
    let req = format!(
        "POST /v1/authorize HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer fvk_p\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // The shim is waiting on the vault once its connection is there.
    reached_rx.recv().await.expect("the shim reached the vault");
    drop(s);
    let mut counted = false;
    for _ in 0..500 {
        if common::counter(series) > before {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(counted, "the abandoned request was not counted");
    let _ = stop.send(());
    let _ = served.await;
    held.abort();
}
