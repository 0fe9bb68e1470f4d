//! The whole flow through the real binaries: `vaultd dev` serves a demo
//! vault; partners authorize over HTTP and redeem with `vault-client`;
//! admins, writers and auditors use the HTTP API; every decision is in the
//! audit log in order; after a clean shutdown `vault-verify` passes.

mod support;

use std::ffi::OsStr;
use std::process::Command;

use serde_json::{json, Value};
use support::DevServer;

/// Status and JSON body of an HTTP request (4xx and 5xx included).
fn call(method: &str, url: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    support::http(req, body)
}

/// Writes `request` on a new connection and reads until the server closes
/// it, a JSON body has arrived, or 10 s pass in silence.
fn raw_http(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `vault-client redeem` of `token` with `key`, in plaintext, at `addr`.
fn redeem_plaintext(addr: &str, key: &str, token: &str) -> support::Run {
    support::vault_client(&[
        "redeem",
        "--insecure-plaintext",
        "--addr",
        addr,
        "--api-key",
        key,
        "--token",
        token,
    ])
}

struct Flow {
    dev: DevServer,
}

impl Flow {
    fn authorize(&self, key: &str, body: Value) -> (u16, Value) {
        call(
            "POST",
            &format!("{}/v1/authorize", self.dev.http()),
            Some(key),
            Some(&body.to_string()),
        )
    }

    fn partner_authorize(&self, subject: &str, purpose: &str) -> (u16, Value) {
        self.authorize(
            &self.dev.get("partner_api_key"),
            json!({"subject_id": subject, "purpose": purpose}),
        )
    }

    /// Asserts a refusal with `status` and `code`.
    fn refused(&self, (status, body): (u16, Value), want_status: u16, code: &str) {
        assert_eq!(status, want_status, "{body}");
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }

    /// `vault-client redeem`: exit code, stdout, stderr.
    fn redeem(&self, key: &str, token: &str) -> (i32, String, String) {
        let out = redeem_plaintext(&self.dev.get("vault_addr"), key, token);
        (out.code, out.stdout, out.stderr)
    }
}

#[test]
fn authorize_redeem_deny_audit_and_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let f = Flow {
        dev: DevServer::start(&dir),
    };
    let http = f.dev.http();
    let (admin, writer, partner, auditor) = (
        f.dev.get("admin_api_key"),
        f.dev.get("writer_api_key"),
        f.dev.get("partner_api_key"),
        f.dev.get("auditor_api_key"),
    );
    let subject = f.dev.get("demo_subject_id");
    let purpose = f.dev.get("demo_purpose");

    let (status, health) = call("GET", &format!("{http}/v1/health"), None, None);
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["vault"], "reachable");
    // The log head health shows is what `vault-verify --head-file` keeps.
    let seen_head = health["head"]["signed_head"]
        .as_str()
        .expect("a signed head")
        .to_string();

    // Granted: the token and the masking the demo policy names.
    let (status, grant) = f.partner_authorize(&subject, &purpose);
    assert_eq!(status, 200, "{grant}");
    assert_eq!(grant["vault_addr"], f.dev.get("vault_addr").as_str());
    assert!(grant["expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let (_, policy) = call(
        "GET",
        &format!("{http}/v1/policies/demo-lender"),
        Some(&admin),
        None,
    );
    assert_eq!(
        grant["fields"],
        policy["policy"]["purposes"][purpose.as_str()]["fields"],
        "the answer names the policy's operator for each field"
    );
    let token = grant["token"].as_str().expect("token").to_string();
    assert!(token.starts_with("fvt_"));

    // Redeemed once, masked exactly as the policy says; then spent.
    let (code, stdout, stderr) = f.redeem(&partner, &token);
    assert_eq!(code, 0, "{stderr}");
    let data: Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(
        data["fields"],
        json!({
            "name": "A***",
            "email": "a***@example.com",
            "iban": "******************5555",
            "dob": "1815",
            "income": "50000-99999"
        }),
        "{data}"
    );
    let (code, _, stderr) = f.redeem(&partner, &token);
    assert_eq!(code, 2, "a second redemption is refused by the server");
    assert!(stderr.contains("token_spent"), "{stderr}");

    // Only the fields asked for, with the purpose's operators.
    let (status, some) = f.authorize(
        &partner,
        json!({"subject_id": subject, "purpose": "fraud_check", "fields": ["name"]}),
    );
    assert_eq!(status, 200, "{some}");
    assert_eq!(some["fields"], json!({"name": "reveal"}));

    // Denials, each recorded.
    f.refused(
        f.partner_authorize("cust-0003", &purpose),
        403,
        "consent_missing",
    );
    f.refused(
        f.partner_authorize(&subject, "marketing"),
        403,
        "purpose_not_allowed",
    );
    f.refused(
        f.authorize(
            &partner,
            json!({"subject_id": subject, "purpose": purpose, "fields": ["name", "ssn"]}),
        ),
        403,
        "field_not_allowed",
    );
    // cust-0002 consented, then revokes: the token granted before the
    // revocation is refused too.
    let (status, granted) = f.partner_authorize("cust-0002", &purpose);
    assert_eq!(status, 200, "{granted}");
    let before_revocation = granted["token"].as_str().expect("token").to_string();
    let consent_url = format!("{http}/v1/subjects/cust-0002/consents/demo-lender");
    let (status, body) = call("DELETE", &consent_url, Some(&writer), None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body["seq"].is_u64() && body["entry_hash"].is_string(),
        "{body}"
    );
    f.refused(
        f.partner_authorize("cust-0002", &purpose),
        403,
        "consent_revoked",
    );
    let (code, stdout, stderr) = f.redeem(&partner, &before_revocation);
    assert_eq!(code, 2, "refused by the server: {stdout}");
    assert!(stderr.contains("consent_revoked"), "{stderr}");
    // cust-0003 consents until a time already past.
    let (status, body) = call(
        "PUT",
        &format!("{http}/v1/subjects/cust-0003/consents/demo-lender"),
        Some(&writer),
        Some(r#"{"purposes": ["credit_check"], "expires_at": "2020-01-01T00:00:00Z"}"#),
    );
    assert_eq!(status, 200, "{body}");
    f.refused(
        f.partner_authorize("cust-0003", &purpose),
        403,
        "consent_expired",
    );

    // A second partner with a rate limit of 2 a minute.
    let (status, cred) = call(
        "POST",
        &format!("{http}/v1/credentials"),
        Some(&admin),
        Some(r#"{"role": "partner", "name": "tight-lender"}"#),
    );
    assert_eq!(status, 201, "{cred}");
    let tight = cred["api_key"].as_str().expect("key").to_string();
    let policy = json!({
        "purposes": {"credit_check": {"fields": {"income": "generalize"}}},
        "rate_limit_per_minute": 3
    });
    let set_policy = |p: &Value| {
        let (status, body) = call(
            "PUT",
            &format!("{http}/v1/policies/tight-lender"),
            Some(&admin),
            Some(&p.to_string()),
        );
        assert_eq!(status, 200, "{body}");
    };
    set_policy(&policy);
    let (status, body) = call(
        "PUT",
        &format!("{http}/v1/subjects/{subject}/consents/tight-lender"),
        Some(&admin),
        Some(r#"{"purposes": ["credit_check"]}"#),
    );
    assert_eq!(status, 200, "{body}");
    let ask = json!({"subject_id": subject, "purpose": "credit_check"});
    let (status, tight_grant) = f.authorize(&tight, ask.clone());
    assert_eq!(status, 200, "{tight_grant}");
    let (status, aged_grant) = f.authorize(&tight, ask.clone());
    assert_eq!(status, 200, "{aged_grant}");
    let (status, placed_grant) = f.authorize(&tight, ask.clone());
    assert_eq!(status, 200, "{placed_grant}");
    f.refused(f.authorize(&tight, ask.clone()), 429, "rate_limited");
    // Its token is not the demo partner's to redeem.
    let (_, other) = f.partner_authorize(&subject, &purpose);
    let other_token = other["token"].as_str().expect("token").to_string();
    let (code, _, stderr) = f.redeem(&tight, &other_token);
    assert_eq!(code, 2);
    assert!(stderr.contains("wrong_partner"), "{stderr}");
    // The policy's conditions hold for the redemption too: from outside
    // its source networks, or outside its hours, the token is refused, and
    // the refusals do not spend it.
    let placed = placed_grant["token"].as_str().expect("token");
    let mut elsewhere = policy.clone();
    elsewhere["source_ips"] = json!(["192.0.2.0/24"]);
    set_policy(&elsewhere);
    let (code, stdout, stderr) = f.redeem(&tight, placed);
    assert_eq!(code, 2, "refused by the server: {stdout}");
    assert!(stderr.contains("source_not_allowed"), "{stderr}");
    assert!(stderr.contains("redemptions from this address"), "{stderr}");
    let hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 3600
        % 24;
    // Neither this hour nor the next, so the clock cannot step into it.
    let mut later = policy.clone();
    later["allowed_hours_utc"] = json!([(hour + 2) % 24, (hour + 3) % 24]);
    set_policy(&later);
    let (code, stdout, stderr) = f.redeem(&tight, placed);
    assert_eq!(code, 2, "refused by the server: {stdout}");
    assert!(stderr.contains("outside_allowed_hours"), "{stderr}");
    let mut here = later.clone();
    here["source_ips"] = json!(["127.0.0.0/8", "::1"]);
    here["allowed_hours_utc"] = json!([hour, (hour + 2) % 24]);
    set_policy(&here);
    let (code, stdout, stderr) = f.redeem(&tight, placed);
    assert_eq!(code, 0, "redeemed once allowed: {stderr}");
    assert!(stdout.contains("income"), "{stdout}");
    // A lifetime shortened below a token's age stops the token.
    let mut short = policy.clone();
    short["max_token_ttl_secs"] = 1.into();
    set_policy(&short);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    let (code, stdout, stderr) = f.redeem(&tight, aged_grant["token"].as_str().expect("token"));
    assert_eq!(code, 2, "refused by the server: {stdout}");
    assert!(stderr.contains("policy_changed"), "{stderr}");
    // Made inactive, the partner's tokens granted before are refused too.
    let mut inactive = policy.clone();
    inactive["active"] = false.into();
    set_policy(&inactive);
    let (code, stdout, stderr) = f.redeem(&tight, tight_grant["token"].as_str().expect("token"));
    assert_eq!(code, 2, "refused by the server: {stdout}");
    assert!(stderr.contains("policy_changed"), "{stderr}");

    // Bad input: the JSON error shape, nothing granted.
    let url = format!("{http}/v1/authorize");
    let bad = [
        (
            Some(partner.as_str()),
            Some("{\"subject_id\": "),
            400,
            "malformed_json",
        ),
        (
            Some(partner.as_str()),
            Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check", "extra": 1}"#),
            400,
            "invalid_request",
        ),
        (
            Some(partner.as_str()),
            Some(r#"{"subject_id": 7, "purpose": "x"}"#),
            400,
            "invalid_request",
        ),
        (
            None,
            Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
            401,
            "unauthenticated",
        ),
        (
            Some("fvk_0000000000000000000000000000000000000000000000000000000000000000"),
            Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
            401,
            "unauthenticated",
        ),
        (
            Some(writer.as_str()),
            Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
            403,
            "forbidden",
        ),
    ];
    for (key, body, status, code) in bad {
        f.refused(call("POST", &url, key, body), status, code);
    }
    // A declared length over the limit is refused before the body is read.
    let answer = raw_http(
        &f.dev.get("http_addr"),
        &format!(
            "POST /v1/authorize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {partner}\r\n\
             Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{{"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // Garbage instead of HTTP is answered with 400 or closed, never hangs.
    let answer = raw_http(&f.dev.get("http_addr"), "\x00\x01 garbage\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // The two ports mistaken for each other: HTTP to the protocol port is
    // answered in HTTP, and `vault-client` at the HTTP port says so.
    let answer = raw_http(
        &f.dev.get("vault_addr"),
        "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("HTTP API is served by the shim"),
        "{answer}"
    );
    let out = redeem_plaintext(&f.dev.get("http_addr"), &partner, "fvt_x");
    assert_eq!(out.code, 1, "a local error: {}", out.stderr);
    assert!(out.stderr.contains("answered in HTTP"), "{}", out.stderr);
    f.refused(
        call(
            "PUT",
            &format!("{http}/v1/policies/demo-lender"),
            Some(&partner),
            Some(&policy.to_string()),
        ),
        403,
        "forbidden",
    );
    f.refused(
        call(
            "PUT",
            &format!("{http}/v1/policies/demo-lender"),
            Some(&admin),
            Some(r#"{"purposes": {"x": {"fields": {"a": "shout"}}}}"#),
        ),
        400,
        "invalid_request",
    );
    f.refused(
        call("GET", &format!("{http}/v1/nothing"), None, None),
        404,
        "not_found",
    );
    f.refused(
        call("GET", &url, Some(&partner), None),
        405,
        "method_not_allowed",
    );
    f.refused(
        call("GET", &format!("{http}/v1/logs"), Some(&partner), None),
        403,
        "forbidden",
    );

    // The audit trail of the demo partner, in log order.
    let (status, logs) = call(
        "GET",
        &format!("{http}/v1/logs?partner=demo-lender&limit=1000"),
        Some(&auditor),
        None,
    );
    assert_eq!(status, 200, "{logs}");
    let steps: Vec<String> = logs["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] != "consent_granted" && e["kind"] != "consent_revoked")
        .map(|e| match e["payload"]["reason"].as_str() {
            Some(r) => format!("{}:{r}", e["kind"].as_str().unwrap_or("?")),
            None => e["kind"].as_str().unwrap_or("?").to_string(),
        })
        .collect();
    assert_eq!(
        steps,
        [
            "policy_changed",
            "token_minted",
            "token_redeemed",
            "access_denied:token_spent",
            "token_minted",
            "access_denied:consent_missing",
            "access_denied:purpose_not_allowed",
            "access_denied:field_not_allowed",
            "token_minted",
            "access_denied:consent_revoked",
            "access_denied:consent_revoked",
            "access_denied:consent_expired",
            "token_minted",
        ],
        "{logs}"
    );
    let seqs: Vec<u64> = logs["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
    // The rate-limited partner's denial is in the log too, and the
    // policy change names the admin who made it.
    let (_, tight_logs) = call(
        "GET",
        &format!("{http}/v1/logs?partner=tight-lender&kind=access_denied"),
        Some(&auditor),
        None,
    );
    assert_eq!(tight_logs["events"][0]["payload"]["reason"], "rate_limited");
    let (_, changes) = call(
        "GET",
        &format!("{http}/v1/logs?partner=tight-lender&kind=policy_changed&format=jsonl"),
        Some(&auditor),
        None,
    );
    // One event is one line, which the helper already parsed as JSON.
    let change = match changes {
        Value::String(lines) => {
            let first = lines.lines().next().expect("one line");
            serde_json::from_str(first).expect("a JSON event per line")
        }
        one => one,
    };
    assert!(
        change["payload"]["recorded_by"]
            .as_str()
            .is_some_and(|id| id.starts_with("admin-")),
        "{change}"
    );
    // What that admin asked for, and only that: the tight partner's
    // credential and its policy changes among it.
    let admin_id = change["payload"]["recorded_by"].as_str().unwrap_or("?");
    let (status, by_admin) = call(
        "GET",
        &format!("{http}/v1/logs?recorded_by={admin_id}&limit=1000"),
        Some(&auditor),
        None,
    );
    assert_eq!(status, 200, "{by_admin}");
    let events = by_admin["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .all(|e| e["payload"]["recorded_by"] == admin_id),
        "{by_admin}"
    );
    for kind in ["credential_created", "policy_changed"] {
        assert!(
            events.iter().any(|e| e["kind"] == kind),
            "{kind}: {by_admin}"
        );
    }

    let (_, metrics) = call("GET", &format!("{http}/metrics"), None, None);
    let metrics = metrics.as_str().expect("text").to_string();
    assert!(
        metrics.contains(
            r#"fintrust_authorizations_total{outcome="denied",reason="consent_missing"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"fintrust_redemptions_total{outcome="token_spent"} 1"#));
    // The commit pipeline of the vault in service: groups made durable by
    // the write-ahead file's fdatasyncs, each timed.
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(value("fintrust_commit_groups_total") >= 1, "{metrics}");
    let syncs = value("fintrust_wal_syncs_total");
    assert!(syncs >= 1, "{metrics}");
    assert_eq!(
        value(r#"fintrust_wal_sync_seconds_bucket{le="+Inf"}"#),
        syncs,
        "{metrics}"
    );
    // The connections of each port against their limits: the scrape's
    // own connection holds one of the shim's slots.
    assert!(
        value(r#"fintrust_connections{port="http",state="served"}"#) >= 1,
        "{metrics}"
    );
    assert_eq!(
        value(r#"fintrust_connections_limit{port="http",state="served"}"#),
        1024,
        "{metrics}"
    );
    assert_eq!(
        value(r#"fintrust_connections_limit{port="protocol",state="handshake"}"#),
        1024,
        "{metrics}"
    );

    // A clean shutdown leaves a log that verifies with the public key,
    // and that holds the head health showed at the start.
    let public_key = f.dev.get("public_key");
    let status = f.dev.stop();
    assert!(status.success(), "{status}");
    let kept = dir.with_extension("kept-head");
    std::fs::write(&kept, format!("{seen_head}\n")).expect("write the head");
    let mut verified = None;
    for _ in 0..100 {
        let out = Command::new(support::binary("fintrust-server", "vault-verify"))
            .arg("--data-dir")
            .arg(&dir)
            .args([OsStr::new("--public-key"), OsStr::new(&public_key)])
            .arg("--head-file")
            .arg(&kept)
            .output()
            .expect("run vault-verify");
        if String::from_utf8_lossy(&out.stderr).contains("in use") {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        verified = Some(out);
        break;
    }
    let out = verified.expect("the data dir was released");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept head: seq"),
        "{out:?}"
    );
}

/// `vaultd shim` as its own process in front of a vault in another one:
/// it authenticates to the vault with a gateway key from a file, loads a
/// policies file, reads `X-Forwarded-For` from the proxy it is told to
/// trust, and the flow works through it; a stopped vault makes it answer
/// 503 and write nothing. The vault is `vaultd dev` with the proxy flags.
#[test]
fn the_shim_runs_as_its_own_process_in_front_of_a_remote_vault() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // `vaultd dev` takes the proxy flags too: its own shim reads RFC
    // 7239's `Forwarded` from the test's address.
    let dev = DevServer::start_with(
        &tmp.path().join("dev"),
        &[
            "--trusted-proxy",
            "127.0.0.1",
            "--forwarded-header",
            "forwarded",
            "--proxy-protocol-from",
            "192.0.2.1",
        ],
    );
    let admin = dev.get("admin_api_key");
    let (status, refused) = support::http(
        ureq::post(&format!("{}/v1/authorize", dev.http()))
            .set(
                "Authorization",
                &format!("Bearer {}", dev.get("partner_api_key")),
            )
            .set("Forwarded", "for=unknown;proto=https"),
        Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
    );
    assert_eq!(
        (status, &refused["error"]),
        (400, &json!("invalid_request"))
    );
    let (status, created) = call(
        "POST",
        &format!("{}/v1/credentials", dev.http()),
        Some(&admin),
        Some(r#"{"role": "gateway", "name": "edge-shim"}"#),
    );
    assert_eq!(status, 201, "{created}");
    let key_file = tmp.path().join("gateway.key");
    std::fs::write(&key_file, created["api_key"].as_str().expect("api_key")).expect("write key");
    // The file's policy gives the demo partner a narrower purpose.
    let policies = tmp.path().join("policies.toml");
    std::fs::write(
        &policies,
        "[partners.demo-lender.purposes.credit_check.fields]\nname = \"redact\"\n",
    )
    .expect("write policies");

    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::shim_args(&mut cmd, &dev.get("vault_addr"), &key_file);
    cmd.arg("--policies")
        .arg(&policies)
        .args(["--trusted-proxy", "127.0.0.1"])
        .env("NO_COLOR", "1");
    let shim = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let http = shim.http.clone();
    let base = format!("http://{http}");

    let (status, health) = call("GET", &format!("{base}/v1/health"), None, None);
    assert_eq!(status, 200, "{health}");
    let partner = dev.get("partner_api_key");
    // The test's address is the trusted proxy's: what it forwards is read.
    let ask = r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#;
    let (status, refused) = support::http(
        ureq::post(&format!("{base}/v1/authorize"))
            .set("Authorization", &format!("Bearer {partner}"))
            .set("X-Forwarded-For", "not-an-address"),
        Some(ask),
    );
    assert_eq!(
        (status, &refused["error"]),
        (400, &json!("invalid_request"))
    );
    let (status, granted) = call(
        "POST",
        &format!("{base}/v1/authorize"),
        Some(&partner),
        Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
    );
    assert_eq!(status, 200, "{granted}");
    assert_eq!(granted["fields"], json!({"name": "redact"}));
    assert_eq!(granted["vault_addr"], dev.get("vault_addr").as_str());
    let out = redeem_plaintext(
        &dev.get("vault_addr"),
        &partner,
        granted["token"].as_str().expect("token"),
    );
    let record = out.ok_json();
    let fields = record.get("fields").unwrap_or(&record);
    assert!(fields.get("email").is_none(), "{record}");
    assert!(
        !fields.to_string().contains("Ada Lovelace"),
        "name must be redacted: {record}"
    );

    // A made-up key is refused (401) after a look-up over the shim's own
    // connection, without a connection of its own to the vault.
    let made_up = format!("fvk_{}", "0".repeat(64));
    let (status, refused) = call(
        "GET",
        &format!("{base}/v1/logs?kind=policy_changed"),
        Some(&made_up),
        None,
    );
    assert_eq!(
        (status, &refused["error"]),
        (401, &json!("unauthenticated")),
        "{refused}"
    );

    // The policy change was recorded through the gateway key.
    let (_, logs) = call(
        "GET",
        &format!("{base}/v1/logs?kind=policy_changed&partner=demo-lender"),
        Some(&dev.get("auditor_api_key")),
        None,
    );
    let events = logs["events"].as_array().expect("events");
    let last = events.last().expect("a policy_changed event");
    assert_eq!(last["payload"]["source"], "policies file", "{logs}");
    assert_eq!(last["payload"]["recorded_by"], created["id"], "{logs}");

    // Without the vault the shim fails closed.
    assert!(dev.stop().success());
    let (status, body) = call(
        "POST",
        &format!("{base}/v1/authorize"),
        Some(&partner),
        Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "vault_unavailable", "{body}");
    let (status, _) = call("GET", &format!("{base}/v1/health"), None, None);
    assert_eq!(status, 503);

    let status = shim.stop();
    assert!(
        status.success(),
        "vaultd shim did not stop cleanly: {status}"
    );
}

/// `vaultd dev --tls`: both ports over TLS with a generated dev CA whose
/// certificate file it names; the flow works for clients that trust it,
/// and plaintext to either port gets nothing.
#[test]
fn dev_with_tls_serves_both_ports_with_a_dev_certificate() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev = DevServer::start_with(&tmp.path().join("dev"), &["--tls"]);
    assert_eq!(dev.info["tls"], true, "{}", dev.info);
    let ca = dev.get("ca_cert");
    let tls = trusting(&[&std::fs::read(&ca).expect("read the CA file")]);
    let agent = ureq::AgentBuilder::new().tls_config(tls).build();
    let http = dev.get("http_addr");
    let partner = dev.get("partner_api_key");
    let granted: Value = agent
        .post(&format!("https://{http}/v1/authorize"))
        .set("Authorization", &format!("Bearer {partner}"))
        .send_json(
            json!({"subject_id": dev.get("demo_subject_id"), "purpose": dev.get("demo_purpose")}),
        )
        .expect("authorize over https")
        .into_json()
        .expect("JSON");
    let out = support::vault_client(&[
        "redeem",
        "--addr",
        &dev.get("vault_addr"),
        "--cacert",
        &ca,
        "--api-key",
        &partner,
        "--token",
        granted["token"].as_str().expect("token"),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("a***@example.com"), "{out:?}");
    // Plaintext HTTP to the TLS port: no HTTP answer.
    let mut s = std::net::TcpStream::connect(&http).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "{got:?}");
    // `vault-client` in plaintext at the TLS protocol port is told the
    // server answers in TLS.
    let out = redeem_plaintext(&dev.get("vault_addr"), &partner, "fvt_x");
    assert_eq!(out.code, 1, "a local error: {}", out.stderr);
    assert!(out.stderr.contains("answered in TLS"), "{}", out.stderr);
    assert!(dev.stop().success());
}

/// Secrets hygiene: after the whole flow, with the log at debug level, no
/// token, API key or planted personal value appears in any file of the
/// data dir (outside ciphertext), in the server's log, or in the audit
/// output. The dev passphrase and TLS key are files the dev server keeps
/// in its data dir by design, so they are left out of the search and only
/// the passphrase's absence from everything else is checked.
#[test]
fn no_secret_or_personal_value_reaches_disk_logs_or_audit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let log = tmp.path().join("vaultd.log");
    let dev = DevServer::start_logged(&dir, &[], &log);
    let f = Flow { dev };
    let http = f.dev.http();
    let mut secrets: Vec<String> = [
        "admin_api_key",
        "writer_api_key",
        "partner_api_key",
        "auditor_api_key",
    ]
    .iter()
    .map(|k| f.dev.get(k))
    .collect();
    secrets.push(
        std::fs::read_to_string(dir.join("dev-passphrase"))
            .expect("passphrase")
            .trim()
            .to_string(),
    );
    // Planted personal values, in a record a writer appends.
    let planted = [
        "Zebulon Quarterfield",
        "zebulon.q@example.org",
        "NL91ABNA0417164300",
        "4111111111111111",
    ];
    let record = tmp.path().join("record.json");
    std::fs::write(
        &record,
        json!({"name": planted[0], "email": planted[1], "iban": planted[2], "card": planted[3]})
            .to_string(),
    )
    .expect("record");
    let out = support::vault_client(&[
        "append",
        "--insecure-plaintext",
        "--subject",
        "cust-0002",
        "--addr",
        &f.dev.get("vault_addr"),
        "--api-key",
        &f.dev.get("writer_api_key"),
        "--record-file",
        record.to_str().expect("a UTF-8 path"),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    // Tokens: one redeemed, one left unredeemed, one refused.
    let partner = f.dev.get("partner_api_key");
    for _ in 0..2 {
        let (status, grant) = f.partner_authorize("cust-0002", "credit_check");
        assert_eq!(status, 200, "{grant}");
        secrets.push(grant["token"].as_str().expect("token").to_string());
    }
    let (code, stdout, stderr) = f.redeem(&partner, &secrets[secrets.len() - 2]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains(planted[0]), "masked: {stdout}");
    let (code, _, _) = f.redeem(&partner, &secrets[secrets.len() - 2]);
    assert_eq!(code, 2, "a spent token is refused");
    let (status, _) = f.partner_authorize("cust-0003", "credit_check");
    assert_eq!(status, 403);
    // A credential made over HTTP: its key is shown once, then only hashed.
    let (status, created) = call(
        "POST",
        &format!("{http}/v1/credentials"),
        Some(&f.dev.get("admin_api_key")),
        Some(r#"{"role": "partner", "name": "other-lender"}"#),
    );
    assert_eq!(status, 201, "{created}");
    secrets.push(created["api_key"].as_str().expect("api_key").to_string());

    // A master rotation over the wire: the new passphrase crosses the
    // connection and must be found nowhere either.
    let new_pass = "correct horse battery staple 7e1f";
    let new_pass_file = tmp.path().join("new-passphrase");
    std::fs::write(&new_pass_file, new_pass).expect("write");
    secrets.push(new_pass.to_string());
    let out = Command::new(support::binary("fintrust-server", "vault-admin"))
        .args(["rotate-master-key", "--insecure-plaintext", "--addr"])
        .arg(f.dev.get("vault_addr"))
        .args([
            "--api-key",
            &f.dev.get("admin_api_key"),
            "--new-passphrase-file",
        ])
        .arg(&new_pass_file)
        .env_remove("FINTRUST_API_KEY")
        .output()
        .expect("vault-admin rotate-master-key");
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let auditor = f.dev.get("auditor_api_key");
    let mut audit = String::new();
    let out = Command::new(support::binary("fintrust-server", "vault-admin"))
        .args([
            "audit",
            "--include-records",
            "--insecure-plaintext",
            "--addr",
        ])
        .arg(f.dev.get("vault_addr"))
        .args(["--api-key", &auditor])
        .env_remove("FINTRUST_API_KEY")
        .output()
        .expect("vault-admin audit");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    audit.push_str(&String::from_utf8_lossy(&out.stdout));
    for format in ["json", "jsonl"] {
        let (status, body) = call(
            "GET",
            &format!("{http}/v1/logs?limit=1000&format={format}"),
            Some(&auditor),
            None,
        );
        assert_eq!(status, 200);
        audit.push_str(&body.to_string());
    }
    assert!(f.dev.stop().success());

    let mut haystacks: Vec<(String, Vec<u8>)> = vec![
        ("vaultd log".into(), std::fs::read(&log).expect("log")),
        ("audit output".into(), audit.into_bytes()),
    ];
    for (rel, bytes) in support::dir_contents(&dir) {
        if rel.file_name().is_some_and(|n| n != "dev-passphrase") {
            haystacks.push((dir.join(rel).display().to_string(), bytes));
        }
    }
    assert!(
        haystacks.len() > 3,
        "the data dir has files: {}",
        haystacks.len()
    );
    let log_text = String::from_utf8_lossy(&haystacks[0].1).into_owned();
    assert!(log_text.contains("DEBUG"), "the log ran at debug level");
    for needle in secrets.iter().map(String::as_str).chain(planted) {
        for (name, bytes) in &haystacks {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle:?} found in {name}"
            );
        }
    }
}

/// A TLS client configuration that trusts the CA certificates in the PEM
/// texts `pems`.
fn trusting(pems: &[&[u8]]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for pem in pems {
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            roots.add(c.expect("a PEM certificate")).expect("a root");
        }
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// The certificate a TLS server at `addr` presents to a client with
/// `config`.
fn presented(addr: &str, config: &std::sync::Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
    let mut conn = rustls::ClientConnection::new(config.clone(), name).expect("a connection");
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("a handshake");
    }
    conn.peer_certificates().expect("a chain")[0].to_vec()
}

/// A CA of its own and a certificate for `localhost` and `127.0.0.1` it
/// issued, valid until 2031-01-02 ([`RENEWED_UNTIL`]): the CA's PEM, the
/// leaf's PEM and DER, and the key's PEM.
fn renewed_certificate() -> (String, String, Vec<u8>, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(vec!["renewal CA".to_string()]).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key")).expect("a CA");
    let key = KeyPair::generate().expect("a key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params");
    leaf.not_after = rcgen::date_time_ymd(2031, 1, 2);
    let leaf = leaf.signed_by(&key, &ca).expect("a leaf");
    (
        ca.pem(),
        leaf.pem(),
        leaf.der().to_vec(),
        key.serialize_pem(),
    )
}

/// When the renewed certificate expires: 2031-01-02 00:00 UTC.
const RENEWED_UNTIL: u64 = 1_925_078_400;

/// `vaultd serve` reads its certificate and key again on SIGHUP: the
/// renewed certificate is presented on both ports from then on, without a
/// restart; files that do not fit leave it as it was, and the daemon keeps
/// serving. `/metrics` counts both reloads, and reports when the served
/// chain expires.
#[test]
fn vaultd_presents_a_renewed_certificate_after_sighup() {
    use rustls_pki_types::pem::PemObject;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vault");
    let dev = DevServer::start_with(&dir, &["--tls"]);
    assert!(dev.stop().success());
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::copy(dir.join("dev-cert.pem"), &cert).expect("cert");
    std::fs::copy(dir.join("dev-key.pem"), &key).expect("key");
    let (ca_pem, leaf_pem, leaf_der, key_pem) = renewed_certificate();
    let dev_ca = std::fs::read(dir.join("dev-ca.pem")).expect("dev CA");
    let tls = trusting(&[&dev_ca, ca_pem.as_bytes()]);
    let dev_leaf = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("dev-cert.pem"))
        .expect("dev cert")
        .next()
        .expect("one")
        .expect("a certificate")
        .to_vec();

    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_tls_args(&mut cmd, &dir, &cert, &key);
    let vaultd = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    for port in [&vaultd.protocol, &vaultd.http] {
        assert_eq!(presented(port, &tls), dev_leaf, "{port}");
    }
    let hangup = || {
        let status = Command::new("kill")
            .args(["-HUP", &vaultd.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
    };
    // Renewed: both ports present it once the signal is handled (the
    // loop waits for the daemon, it is not a time limit on it).
    std::fs::write(&cert, &leaf_pem).expect("cert");
    std::fs::write(&key, &key_pem).expect("key");
    hangup();
    let started = std::time::Instant::now();
    while presented(&vaultd.protocol, &tls) != leaf_der {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the renewed certificate is not presented"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(presented(&vaultd.http, &tls), leaf_der);
    // A key that does not fit: the renewed certificate stays.
    std::fs::copy(dir.join("dev-key.pem"), &key).expect("key");
    hangup();
    let agent = ureq::AgentBuilder::new().tls_config(tls.clone()).build();
    let metric = |series: &str| {
        let metrics = agent
            .get(&format!("https://{}/metrics", vaultd.http))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text");
        let series = format!("{series} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let reloads = |outcome: &str| {
        metric(&format!(
            "fintrust_tls_reloads_total{{outcome=\"{outcome}\"}}"
        ))
    };
    let started = std::time::Instant::now();
    while reloads("failed") == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the failed reload is not counted"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(reloads("reloaded"), 1);
    assert_eq!(
        metric("fintrust_tls_certificate_expiry_seconds"),
        RENEWED_UNTIL
    );
    assert_eq!(presented(&vaultd.protocol, &tls), leaf_der);
    assert!(vaultd.stop().success());
}

/// A client CA of its own and a certificate it issued: the CA's PEM, and
/// the leaf's PEM and key's PEM.
fn client_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(vec!["shim client CA".to_string()]).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key")).expect("a CA");
    let key = KeyPair::generate().expect("a key");
    let leaf = CertificateParams::new(vec!["edge-shim".to_string()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("a leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// `vaultd shim` in front of a `vaultd serve` that requires client
/// certificates (`--tls-client-ca`): with `--client-cert` and
/// `--client-key` it reaches the vault, and a partner is granted through
/// it; without them the vault refuses its handshake, and it answers 503
/// (fail closed).
#[test]
fn vaultd_shim_presents_a_client_certificate_to_a_vault_that_requires_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vault");
    let dev = DevServer::start_with(&dir, &["--tls"]);
    let (admin, partner) = (dev.get("admin_api_key"), dev.get("partner_api_key"));
    assert!(dev.stop().success());
    let (ca_pem, cert_pem, key_pem) = client_certificate();
    let write = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (client_ca, client_cert, client_key) = (
        write("client-ca.pem", &ca_pem),
        write("client.pem", &cert_pem),
        write("client.key", &key_pem),
    );
    let key_file = write("shim.key", &admin);

    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_dev_tls_args(&mut cmd, &dir);
    cmd.arg("--tls-client-ca").arg(&client_ca);
    let vaultd = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let shim = |with_certificate: bool| {
        let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
        support::shim_args(&mut cmd, &vaultd.protocol, &key_file);
        cmd.arg("--cacert").arg(dir.join("dev-ca.pem"));
        if with_certificate {
            cmd.arg("--client-cert")
                .arg(&client_cert)
                .arg("--client-key")
                .arg(&client_key);
        }
        support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"))
    };

    // The shim's health, and its answer to the partner's authorization.
    let ask = |shim: &support::Vaultd| {
        let base = format!("http://{}", shim.http);
        let (health, _) = support::http(ureq::get(&format!("{base}/v1/health")), None);
        let (status, body) = support::http(
            ureq::post(&format!("{base}/v1/authorize"))
                .set("Authorization", &format!("Bearer {partner}")),
            Some(r#"{"subject_id": "cust-0001", "purpose": "credit_check"}"#),
        );
        (health, status, body)
    };

    let with = shim(true);
    let (health, status, granted) = ask(&with);
    assert_eq!((health, status), (200, 200), "{granted}");
    assert!(granted["token"].is_string(), "{granted}");
    assert!(with.stop().success());

    let without = shim(false);
    let (health, status, refused) = ask(&without);
    assert_eq!(
        (health, status, &refused["error"]),
        (503, 503, &json!("vault_unavailable"))
    );
    assert!(without.stop().success());
    assert!(vaultd.stop().success());
}

/// A client certificate holds a credential instead of an API key, through
/// the real binaries: an admin (presenting its own certificate and key)
/// creates a writer credential for a service's certificate with
/// `vault-admin credentials create --holder-cert`; the service then pings
/// and appends with `vault-client --client-cert` and no API key. Another
/// certificate of the same CA holding no credential is refused (exit 2),
/// a second credential for the same certificate too, and after the
/// revocation the service's certificate is refused as well.
#[test]
fn a_client_certificate_holds_a_credential_through_vault_admin_and_vault_client() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("vault");
    let dev = DevServer::start_with(&dir, &["--tls"]);
    let admin = dev.get("admin_api_key");
    assert!(dev.stop().success());
    let write = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let mut ca = CertificateParams::new(vec!["services CA".to_string()]).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key")).expect("a CA");
    let issue = |name: &str| {
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("a leaf");
        (
            write(&format!("{name}.pem"), &cert.pem()),
            write(&format!("{name}.key"), &key.serialize_pem()),
        )
    };
    let client_ca = write("client-ca.pem", &ca.pem());
    let (admin_cert, admin_key) = issue("ops");
    let (svc_cert, svc_key) = issue("svc");
    let record = write("record.json", r#"{"email": "jane@example.com"}"#);

    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_dev_tls_args(&mut cmd, &dir);
    cmd.args(["--tls-client-ca", &client_ca]);
    let vaultd = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let dev_ca = dir.join("dev-ca.pem").display().to_string();
    let tls = |cert: &str, key: &str| -> Vec<String> {
        [
            "--addr",
            vaultd.protocol.as_str(),
            "--cacert",
            &dev_ca,
            "--server-name",
            "127.0.0.1",
            "--client-cert",
            cert,
            "--client-key",
            key,
            "--format",
            "json",
        ]
        .map(String::from)
        .to_vec()
    };
    let admin_tool = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(tls(&admin_cert, &admin_key));
        all.extend(["--api-key".to_string(), admin.clone()]);
        support::run_bin("fintrust-server", "vault-admin", &all, &[])
    };
    let as_service = |cert: &str, key: &str, args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(tls(cert, key));
        support::run_bin("fintrust-client", "vault-client", &all, &[])
    };

    let created = admin_tool(&[
        "credentials",
        "create",
        "--role",
        "writer",
        "--name",
        "svc",
        "--holder-cert",
        &svc_cert,
    ])
    .ok_json();
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(
        created["client_cert_sha256"].as_str().map(str::len),
        Some(64)
    );
    assert!(created.get("api_key").is_none(), "{created}");

    let pong = as_service(&svc_cert, &svc_key, &["ping"]).ok_json();
    assert_eq!(pong["role"], "writer", "{pong}");
    let receipt = as_service(
        &svc_cert,
        &svc_key,
        &["append", "--subject", "cust-9", "--record-file", &record],
    )
    .ok_json();
    assert!(receipt["seq"].is_u64(), "{receipt}");

    // The admin's own certificate holds no credential: without a key it
    // is nobody.
    let refused = as_service(&admin_cert, &admin_key, &["ping"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("unauthenticated"), "{refused:?}");
    let twice = admin_tool(&[
        "credentials",
        "create",
        "--role",
        "auditor",
        "--name",
        "svc",
        "--holder-cert",
        &svc_cert,
    ]);
    assert_eq!(twice.code, 2, "{twice:?}");

    // The list names what holds each credential: the certificate's
    // fingerprint for this one, an API key (null) for the admin's.
    let listed = admin_tool(&["credentials", "list"]).ok_json();
    let listed = listed["credentials"].as_array().expect("a list").clone();
    let held = |id: &str| {
        listed
            .iter()
            .find(|c| c["id"] == id)
            .map(|c| c["client_cert_sha256"].clone())
    };
    assert_eq!(held(&id), Some(created["client_cert_sha256"].clone()));
    assert!(
        listed
            .iter()
            .any(|c| c["role"] == "admin" && c["client_cert_sha256"].is_null()),
        "{listed:?}"
    );

    admin_tool(&["credentials", "revoke", "--id", &id]).ok_json();
    let revoked = as_service(&svc_cert, &svc_key, &["ping"]);
    assert_eq!(revoked.code, 2, "{revoked:?}");
    assert!(vaultd.stop().success());

    // On the stopped vault, the same refusal of a second credential for a
    // certificate is the vault's (exit 2, `conflict`), as it is online.
    let offline = || {
        let dev_pass = dir.join("dev-passphrase");
        support::run_bin(
            "fintrust-server",
            "vault-admin",
            [
                "credentials",
                "create",
                "--role",
                "writer",
                "--name",
                "svc",
                "--holder-cert",
                &svc_cert,
                "--data-dir",
                dir.to_str().expect("utf-8"),
                "--passphrase-file",
                dev_pass.to_str().expect("utf-8"),
                "--format",
                "json",
            ],
            &[],
        )
    };
    offline().ok_json();
    let twice = offline();
    assert_eq!(twice.code, 2, "{twice:?}");
    assert!(twice.stderr.contains("conflict"), "{twice:?}");
}

/// The commands `vaultd dev` prints, pasted into bash in its order (with
/// `cargo run ... --bin NAME --` standing for the test build's binary):
/// the partner's authorization and redemption, the redemption again
/// (`token_spent`, exit 2), the audit trail, and after the stop the
/// verification of the data dir.
#[test]
fn the_commands_vaultd_dev_prints_work_when_pasted() {
    use std::io::BufRead;
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed: the printed commands need it; skipped");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(support::binary("fintrust-server", "vaultd"))
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("dev dir"))
        .env("FINTRUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start vaultd dev");
    let stdout = child.stdout.take().expect("stdout");
    // Killed if the test fails before it stops it.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // Drained to the end, read or not.
            let _ = tx.send(line);
        }
    });
    let mut text = Vec::new();
    loop {
        // Bounded, so that a server that never prints them fails the test.
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("the commands, printed whole: {e}: {text:#?}"));
        let last = line.contains("--bin vault-verify");
        text.push(line);
        if last {
            break;
        }
    }
    drop(rx);
    // Step N: the indented lines after the line that starts with "N. ",
    // with the binaries of this build.
    let step = |n: usize| -> String {
        let start = text
            .iter()
            .position(|l| l.starts_with(&format!("{n}. ")))
            .unwrap_or_else(|| panic!("no step {n} in {text:#?}"));
        let mut cmd = text[start + 1..]
            .iter()
            .take_while(|l| l.starts_with("   "))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        for (package, bin) in [
            ("fintrust-client", "vault-client"),
            ("fintrust-server", "vault-verify"),
        ] {
            let path = support::binary(package, bin);
            cmd = cmd.replace(
                &format!("cargo run --release -q --bin {bin} --"),
                &format!("'{}'", path.display()),
            );
        }
        assert!(!cmd.contains("cargo "), "{cmd}");
        cmd
    };
    let bash = |script: &str| {
        let out = Command::new("bash")
            .args(["-c", script])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .expect("run bash");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = bash(&format!("set -e\n{}\n{}", step(1), step(2)));
    assert_eq!(code, Some(0), "{out}\n{err}");
    let redeemed: Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("the record as JSON last: {out}\n{err}"));
    assert_eq!(redeemed["subject"], "cust-0001", "{redeemed}");
    assert!(redeemed["fields"].is_object(), "{redeemed}");
    // The same token again, with a new authorization's answer dropped.
    let (code, out, err) = bash(&format!("{}\n{}\n{}", step(1), step(2), step(2)));
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(err.contains("token_spent"), "{err}");
    let (code, out, err) = bash(&step(3));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("token_redeemed"), "{out}");

    let stopped = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(stopped.success());
    assert!(child.0.wait().expect("wait").success());
    let (code, out, err) = bash(&step(4));
    assert_eq!(code, Some(0), "{out}\n{err}");
}
