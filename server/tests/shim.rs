//! The HTTP policy shim in front of a real vault, both in this process on
//! ports the OS chose: bad input gets the typed JSON error and writes
//! nothing, source-address and time-of-day rules are enforced and audited,
//! and slow, idle or never-finishing HTTP clients are cut off.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use server::daemon::{self, Bound, Daemon};
use server::serve::ServeConfig;
use server::shim::ShimConfig;
use storage::{Append, Kind, Options, Unlock, Vault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARTNER: &str = "acme-lender";
const SUBJECT: &str = "cust-7";

struct Running {
    http: SocketAddr,
    admin: String,
    partner: String,
    writer: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.expect("the daemon task ends");
        }
    }
}

/// A vault with one subject (record + consent for `credit_check`), keys
/// for admin/partner/writer, and the daemon serving it with `shim`.
async fn start(shim: ShimConfig) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = Vault::create(
        &dir.path().join("v"),
        &Unlock::passphrase(b"shim test".to_vec()),
        Options::default(),
    )
    .expect("create");
    let vault = created.vault;
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
    let protocol = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_addr = http.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Bound>();
    let d = Daemon {
        protocol,
        http: Some(http),
        tls: None,
        serve: ServeConfig::default(),
        shim,
        policies: None,
        reopen: None,
    };
    let done = tokio::spawn(async move {
        daemon::run(
            vault,
            d,
            |b| {
                let _ = ready_tx.send(b);
            },
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("daemon");
    });
    ready_rx.await.expect("ready");
    Running {
        http: http_addr,
        admin: created.admin_api_key.to_string(),
        partner: partner.to_string(),
        writer: writer.to_string(),
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

#[tokio::test]
async fn bad_input_gets_a_typed_error_and_writes_nothing() {
    let r = start(ShimConfig::default()).await;
    put_policy(
        &r,
        json!({"purposes": {"credit_check": {"fields": {"name": "partial"}}}}),
    )
    .await;
    let before = entries(&r).await;
    let a = r.http;
    let (p, w, adm) = (r.partner.as_str(), r.writer.as_str(), r.admin.as_str());
    let ok_body = r#"{"subject_id": "cust-7", "purpose": "credit_check"}"#;
    let cases: Vec<((u16, Value), u16, &str)> = vec![
        (
            call(a, "POST", "/v1/authorize", Some(p), Some("{not json")).await,
            400,
            "malformed_json",
        ),
        (
            call(
                a,
                "POST",
                "/v1/authorize",
                Some(p),
                Some(r#"{"subject_id": "cust-7", "purpose": "credit_check", "extra": 1}"#),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            call(
                a,
                "POST",
                "/v1/authorize",
                Some(p),
                Some(r#"{"subject_id": 7, "purpose": "credit_check"}"#),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            call(
                a,
                "POST",
                "/v1/authorize",
                Some(p),
                Some(r#"{"subject_id": "has space", "purpose": "credit_check"}"#),
            )
            .await,
            400,
            "invalid_request",
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
            call(
                a,
                "PUT",
                "/v1/subjects/cust-7/consents/acme-lender",
                Some(w),
                Some(r#"{"purposes": ["credit_check"], "expires_at": "tomorrow"}"#),
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
    for (got, status, code) in &cases {
        assert_error(got, *status, code);
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

    let logs = call(
        r.http,
        "GET",
        "/v1/logs?kind=access_denied",
        Some(&r.admin),
        None,
    )
    .await;
    let reasons: Vec<&str> = logs.1["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["payload"]["reason"].as_str())
        .collect();
    assert_eq!(reasons, ["source_not_allowed", "outside_allowed_hours"]);
    r.stop().await;
}

#[tokio::test]
async fn slow_idle_and_unfinished_http_clients_are_cut_off() {
    let r = start(ShimConfig {
        header_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(600),
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
