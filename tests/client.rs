//! The client library and the `vault-client` binary against a real server
//! on a port the OS chose: authentication and roles, receipts the client
//! verifies, 200 appends pipelined from 20 tasks on one connection, the
//! auditor's reads, tokens, TLS (and mutual TLS) with certificates made
//! here, timeouts, and the binary's exit codes.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use client::{
    verify_receipt, Client, ClientConfig, ClientError, Connector, ErrorCode, HeadTracker, MaskOp,
    Record, SecretKind, Tls, Zeroizing,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use server::serve::ServeConfig;
use server::tls::TlsFiles;
use support::{start, Run, Server, PARTNER};

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_append_and_verify_the_receipt() {
    let s = start(ServeConfig::default(), None).await;
    let c = s.connect(&s.writer).await;
    assert_eq!(c.role(), "writer");
    c.ping().await.expect("ping");
    let receipt = c
        .append(
            "cust-1",
            fields(&[("name", "Ada"), ("iban", "GB33BUKB20201555555555")]),
        )
        .await
        .expect("append");
    verify_receipt(&receipt, &s.public_key()).expect("the receipt verifies");
    let health = c.health().await.expect("health");
    assert_eq!(health.status, "ok");
    assert_eq!(health.entries, receipt.seq + 1);
    let head = health.head.expect("a head");
    let key = ed25519_dalek::VerifyingKey::from_bytes(&s.public_key()).expect("key");
    assert!(head.verify(&key), "the head verifies with the vault's key");
    assert_eq!(head.last_seq, receipt.seq);
    // A receipt does not verify with another vault's key.
    let other = ed25519_dalek::SigningKey::from_bytes(&[5; 32])
        .verifying_key()
        .to_bytes();
    assert!(matches!(
        verify_receipt(&receipt, &other),
        Err(ClientError::BadReceipt(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_appends_from_twenty_tasks_share_one_client() {
    let s = start(ServeConfig::default(), None).await;
    let c = Arc::new(s.connect(&s.writer).await);
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut receipts = Vec::new();
                for i in 0..10 {
                    let r = c
                        .append(format!("cust-{t}"), fields(&[("n", &format!("{t}/{i}"))]))
                        .await
                        .expect("append");
                    receipts.push(r);
                }
                receipts
            })
        })
        .collect();
    let mut seqs = HashSet::new();
    for t in tasks {
        for r in t.await.expect("task") {
            verify_receipt(&r, &s.public_key()).expect("verifies");
            assert!(seqs.insert(r.seq), "seq {} acknowledged twice", r.seq);
        }
    }
    assert_eq!(seqs.len(), 200);
}

#[tokio::test]
async fn head_proof_and_entries_match_what_was_appended() {
    // A small frame maximum makes the server split the entries stream.
    let s = start(
        ServeConfig {
            max_frame_len: 4096,
            ..ServeConfig::default()
        },
        None,
    )
    .await;
    let writer = s.connect(&s.writer).await;
    let mut receipts = Vec::new();
    for i in 0..30 {
        let value = format!("value {i} {}", "x".repeat(100));
        receipts.push(
            writer
                .append(format!("cust-{}", i % 4), fields(&[("note", &value)]))
                .await
                .expect("append"),
        );
    }
    let batch: Vec<Record> = (0..3)
        .map(|i| Record {
            subject: format!("batch-{i}"),
            fields: fields(&[("k", "v")]),
        })
        .collect();
    let batch_receipts = writer.append_batch(batch).await.expect("batch");
    assert_eq!(batch_receipts.len(), 3);
    receipts.extend(batch_receipts);
    // A writer may not read the head.
    assert_eq!(code(writer.head().await), ErrorCode::Forbidden);

    let admin = s.connect(&s.admin).await;
    let head = admin.head().await.expect("head");
    assert_eq!(head.public_key, s.public_key());
    let last = receipts.last().expect("receipts");
    assert_eq!(head.entries, last.seq + 1);
    let signed = head.signed_head.expect("a signed head");
    assert_eq!(signed.last_seq, last.seq);

    // Heads only move forward; an older one is a rollback.
    let mut tracker = HeadTracker::new();
    for r in &receipts {
        verify_receipt(r, &head.public_key).expect("verifies");
        tracker
            .observe(&r.head)
            .expect("receipts in order move forward");
    }
    tracker.observe(&signed).expect("the head is the newest");
    assert!(matches!(
        tracker.check_not_rolled_back(&receipts[0].head),
        Err(ClientError::Rollback { .. })
    ));

    let proof = admin.proof(receipts[7].seq).await.expect("proof");
    verify_receipt(&proof, &head.public_key).expect("the proof verifies");
    assert_eq!(proof.entry_hash, receipts[7].entry_hash);
    assert_eq!(code(admin.proof(1 << 40).await), ErrorCode::NotFound);

    let entries = admin.entries(0, 1000).await.expect("entries");
    assert_eq!(entries.len() as u64, head.entries);
    for r in &receipts {
        assert_eq!(
            storage::entry::entry_hash(&entries[r.seq as usize]),
            r.entry_hash,
            "entry {}",
            r.seq
        );
    }
    let window = admin.entries(5, 3).await.expect("entries");
    assert_eq!(window, entries[5..8].to_vec());
    assert!(admin
        .entries(head.entries, 10)
        .await
        .expect("empty range")
        .is_empty());
}

#[tokio::test]
async fn a_wrong_api_key_is_unauthenticated() {
    let s = start(ServeConfig::default(), None).await;
    let refused = Client::connect(s.plain("fvk_not-a-key")).await;
    assert_eq!(code(refused), ErrorCode::Unauthenticated);
}

#[tokio::test]
async fn a_partner_appending_is_forbidden_and_the_connection_stays_usable() {
    let s = start(ServeConfig::default(), None).await;
    let c = s.connect(&s.partner).await;
    assert_eq!(c.role(), "partner");
    assert_eq!(
        code(c.append("cust-1", fields(&[("a", "b")])).await),
        ErrorCode::Forbidden
    );
    c.ping().await.expect("still connected");
    // A record naming a field twice is invalid, not a connection error.
    let w = s.connect(&s.writer).await;
    assert_eq!(
        code(w.append("cust-1", fields(&[("a", "1"), ("a", "2")])).await),
        ErrorCode::Invalid
    );
    w.ping().await.expect("still connected");
}

#[tokio::test]
async fn a_minted_token_is_redeemed_once_by_its_partner() {
    let s = start(ServeConfig::default(), None).await;
    let writer = s.connect(&s.writer).await;
    let appended = writer
        .append(
            "cust-7",
            fields(&[("name", "Ada Lovelace"), ("iban", "GB33BUKB20201555555555")]),
        )
        .await
        .expect("append");
    let admin = s.connect(&s.admin).await;
    let rules = vec![
        ("name".to_string(), MaskOp::Reveal),
        ("iban".to_string(), MaskOp::Redact),
    ];
    let (token, expires_at_ms) = admin
        .mint(PARTNER, "cust-7", "kyc", rules.clone(), 60)
        .await
        .expect("mint");
    assert!(expires_at_ms > 0);
    assert_eq!(
        code(
            s.connect(&s.writer)
                .await
                .mint(PARTNER, "cust-7", "kyc", rules, 60)
                .await
        ),
        ErrorCode::Forbidden
    );

    let redeemed = s
        .connect(&s.partner)
        .await
        .redeem(&token)
        .await
        .expect("redeem");
    assert_eq!(redeemed.subject, "cust-7");
    assert_eq!(redeemed.seq, appended.seq);
    let name = redeemed.fields.iter().find(|(k, _)| k == "name");
    assert_eq!(name.map(|(_, v)| v.as_str()), Some("Ada Lovelace"));
    assert!(
        redeemed.fields.iter().all(|(_, v)| !v.contains("GB33")),
        "the redacted IBAN leaked"
    );
    let again = s.connect(&s.partner).await.redeem(&token).await;
    assert_eq!(code(again), ErrorCode::TokenSpent);
}

#[tokio::test]
async fn a_token_is_redeemed_on_a_connection_of_its_own_in_one_round_trip() {
    let s = start(ServeConfig::default(), None).await;
    let writer = s.connect(&s.writer).await;
    let appended = writer
        .append("cust-8", fields(&[("name", "Grace Hopper")]))
        .await
        .expect("append");
    let admin = s.connect(&s.admin).await;
    let rules = vec![("name".to_string(), MaskOp::Reveal)];
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (token, _) = admin
            .mint(PARTNER, "cust-8", "kyc", rules.clone(), 60)
            .await
            .expect("mint");
        tokens.push(token);
    }
    let connector = |key: &str| client::Connector::new(s.plain(key)).expect("connector");

    // A wrong key, or a key that may not redeem: refused, token unspent.
    let wrong = connector("fvk_not_a_key").redeem(&tokens[0]).await;
    assert_eq!(code(wrong), ErrorCode::Unauthenticated);
    let writer_try = connector(&s.writer).redeem(&tokens[0]).await;
    assert_eq!(code(writer_try), ErrorCode::Forbidden);

    // The partner: the data, once.
    let partner = connector(&s.partner);
    let r = partner.redeem(&tokens[0]).await.expect("redeem");
    assert!(!r.tls_resumed);
    assert_eq!(
        (r.data.subject.as_str(), r.data.seq),
        ("cust-8", appended.seq)
    );
    assert_eq!(
        r.data.fields,
        vec![("name".to_string(), "Grace Hopper".to_string())]
    );
    assert_eq!(
        code(partner.redeem(&tokens[0]).await),
        ErrorCode::TokenSpent
    );
    assert_eq!(
        code(partner.redeem("not-a-token").await),
        ErrorCode::TokenUnknown
    );
    // The same as through a client connection.
    let other = s.connect(&s.partner).await.redeem(&tokens[1]).await;
    assert_eq!(other.expect("redeem").fields, r.data.fields);
}

#[tokio::test]
async fn a_silent_server_times_out() {
    // Accepts, then never answers the Hello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move { listener.accept().await });
    let config = ClientConfig {
        addr: addr.to_string(),
        api_key: Zeroizing::new("fvk_x".into()),
        timeout: Duration::from_millis(300),
        tls: client::Tls::Plaintext,
        ..ClientConfig::default()
    };
    assert!(matches!(
        Client::connect(config).await,
        Err(ClientError::Timeout)
    ));
    hold.abort();
}

// ---- TLS ----

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A leaf for `name` signed by `issuer`, written as `<file>.pem` and
/// `<file>.key` in `dir`.
fn leaf(
    dir: &Path,
    file: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec![name.to_string()]).expect("params");
    let cert = params.signed_by(&key, issuer).expect("sign");
    (
        write(dir, &format!("{file}.pem"), &cert.pem()),
        write(dir, &format!("{file}.key"), &key.serialize_pem()),
    )
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

struct TlsSetup {
    server: Server,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    client_cert: (PathBuf, PathBuf),
    pki: tempfile::TempDir,
}

async fn start_tls(mutual: bool) -> TlsSetup {
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path();
    let server_ca = ca("fintrust test CA");
    let client_ca = ca("fintrust test client CA");
    let (cert, key) = leaf(dir, "server", &server_ca, "localhost");
    let files = TlsFiles {
        cert,
        key,
        client_ca: mutual.then(|| write(dir, "client-ca.pem", &client_ca.pem())),
    };
    TlsSetup {
        ca_file: write(dir, "ca.pem", &server_ca.pem()),
        other_ca_file: write(dir, "other-ca.pem", &ca("another CA").pem()),
        client_cert: leaf(dir, "client", &client_ca, "svc"),
        server: start(ServeConfig::default(), Some(files)).await,
        pki,
    }
}

fn tls_config(
    s: &TlsSetup,
    ca_pem_file: &Path,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> ClientConfig {
    ClientConfig {
        tls: Tls::Ca {
            ca_pem_file: ca_pem_file.to_path_buf(),
            server_name: "localhost".into(),
            client_cert,
        },
        ..s.server.plain(&s.server.writer)
    }
}

#[tokio::test]
async fn tls_works_with_the_servers_ca_and_fails_with_another() {
    let s = start_tls(false).await;
    let c = Client::connect(tls_config(&s, &s.ca_file, None))
        .await
        .expect("TLS connect");
    let r = c
        .append("cust-1", fields(&[("email", "jane@example.com")]))
        .await
        .expect("append");
    verify_receipt(&r, &s.server.public_key()).expect("verifies");

    match Client::connect(tls_config(&s, &s.other_ca_file, None)).await {
        Err(ClientError::Tls(_)) => {}
        other => panic!("trusting another CA: {other:?}"),
    }
    // Plaintext to the TLS port never authenticates.
    assert!(Client::connect(s.server.plain(&s.server.writer))
        .await
        .is_err());
    // The wrong name on the certificate is a TLS failure too.
    let mut wrong_name = tls_config(&s, &s.ca_file, None);
    wrong_name.tls = Tls::Ca {
        ca_pem_file: s.ca_file.clone(),
        server_name: "vault.example".into(),
        client_cert: None,
    };
    assert!(matches!(
        Client::connect(wrong_name).await,
        Err(ClientError::Tls(_))
    ));

    // A connector's TLS to another port (as vault-bench's to the shim's)
    // gives up on a port that accepts and never answers the handshake,
    // after the connector's timeout.
    let connector = Connector::new(ClientConfig {
        timeout: Duration::from_millis(300),
        ..tls_config(&s, &s.ca_file, None)
    })
    .expect("connector");
    let link = connector.tls().expect("TLS");
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    let hold = tokio::spawn(async move { silent.accept().await });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(matches!(link.wrap(tcp).await, Err(ClientError::Timeout)));
    hold.abort();
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let s = start_tls(true).await;
    let with_cert = tls_config(&s, &s.ca_file, Some(s.client_cert.clone()));
    let c = Client::connect(with_cert).await.expect("mutual TLS");
    c.ping().await.expect("ping");
    match Client::connect(tls_config(&s, &s.ca_file, None)).await {
        Err(ClientError::Tls(_)) => {}
        other => panic!("no client certificate: {other:?}"),
    }
    let missing = (s.pki.path().join("none.pem"), s.pki.path().join("none.key"));
    assert!(matches!(
        Client::connect(tls_config(&s, &s.ca_file, Some(missing))).await,
        Err(ClientError::Config(_))
    ));
}

// ---- the vault-client binary ----

/// Runs `vault-client` with `args` and `env`, and no other `FINTRUST_*`
/// variable, without blocking the runtime serving it.
async fn vault_client(args: &[&str], env: &[(&str, &str)]) -> Run {
    support::run_tool("fintrust-client", "vault-client", args, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_client_binary_exit_codes() {
    let s = start(ServeConfig::default(), None).await;
    let addr = s.addr.to_string();
    let record = write(
        s.dir.path(),
        "record.json",
        r#"{"name": "Ada", "iban": "GB33BUKB20201555555555"}"#,
    );
    let record = record.to_str().expect("utf-8 path");

    // A writer appends; it may not read the public key, so it says so.
    let r = vault_client(
        &[
            "append",
            "--subject",
            "cust-1",
            "--record-file",
            record,
            "--addr",
            &addr,
            "--insecure-plaintext",
        ],
        &[("FINTRUST_API_KEY", &s.writer)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("seq: ") && r.stdout.contains("entry_hash: "),
        "{r:?}"
    );
    assert!(r.stderr.contains("not verified"), "{r:?}");

    // An admin's receipt is verified with the key from `head`.
    let r = vault_client(
        &[
            "append",
            "--subject",
            "cust-2",
            "--record-file",
            record,
            "--addr",
            &addr,
            "--insecure-plaintext",
            "--format",
            "json",
            "--api-key",
            &s.admin,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["verified"], true, "{r:?}");
    assert_eq!(v["verified_with"], "server_reported_key", "{r:?}");
    let seq = v["seq"].as_u64().expect("seq");
    // The receipt itself, to keep: it decodes, and verifies offline.
    let receipt = client::Receipt::decode(
        &hex::decode(v["receipt"].as_str().expect("a receipt")).expect("hex"),
    )
    .expect("a receipt");
    assert_eq!(receipt.seq, seq);
    client::verify_receipt(&receipt, &s.public_key()).expect("verifies");

    // A writer with the pinned key verifies too.
    let append_pinned = |key: String| {
        let (addr, writer) = (addr.clone(), s.writer.clone());
        async move {
            vault_client(
                &[
                    "append",
                    "--subject",
                    "cust-3",
                    "--record-file",
                    record,
                    "--addr",
                    &addr,
                    "--insecure-plaintext",
                    "--format",
                    "json",
                    "--public-key",
                    &key,
                ],
                &[("FINTRUST_API_KEY", &writer)],
            )
            .await
        }
    };
    let key = hex::encode(s.public_key());
    let r = append_pinned(key.clone()).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["verified"], true);
    assert_eq!(r.json()["verified_with"], "public_key");
    // Pinned to another key: the receipt does not verify (exit 1), and
    // is printed all the same, since the record is in the log.
    let r = append_pinned(hex::encode([7u8; 32])).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("does not verify with --public-key"),
        "{r:?}"
    );
    let v = r.json();
    assert_eq!(v["verified"], false, "{r:?}");
    assert_eq!(v["verified_with"], serde_json::Value::Null, "{r:?}");
    assert!(v["seq"].as_u64() > Some(seq), "{r:?}");

    let r = vault_client(
        &["head", "--format", "json", "--insecure-plaintext"],
        &[("FINTRUST_ADDR", &addr), ("FINTRUST_API_KEY", &s.admin)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["public_key"], key);
    let entries = v["entries"].as_u64().expect("entries");
    assert!(entries >= seq + 2, "{v}");
    assert_eq!(v["signed_head"]["last_seq"].as_u64(), Some(entries - 1));
    // The head as signed, to keep (`HeadTracker::starting_from`,
    // `vault-verify --head-file`): it decodes and verifies.
    let head = client::SignedHead::decode(
        &hex::decode(v["signed_head"]["encoded"].as_str().expect("encoded")).expect("hex"),
    )
    .expect("a signed head");
    assert_eq!(Some(head.last_seq), Some(entries - 1));
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&s.public_key()).expect("a key");
    assert!(head.verify(&vk));
    // The pinned key is checked: the vault's own passes, another is a
    // local failure with nothing on stdout, and so is one that is not a
    // key, whatever the subcommand.
    let head_pinned = |key: String| {
        let addr = addr.clone();
        let admin = s.admin.clone();
        async move {
            vault_client(
                &["head", "--insecure-plaintext", "--public-key", &key],
                &[("FINTRUST_ADDR", &addr), ("FINTRUST_API_KEY", &admin)],
            )
            .await
        }
    };
    let r = head_pinned(key.clone()).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = head_pinned(hex::encode([9u8; 32])).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("is not --public-key"), "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    let r = vault_client(
        &[
            "ping",
            "--addr",
            &addr,
            "--insecure-plaintext",
            "--public-key",
            "zz",
        ],
        &[("FINTRUST_API_KEY", &s.writer)],
    )
    .await;
    assert_eq!(r.code, 1, "a key that is not one: {r:?}");

    let r = vault_client(
        &["ping", "--addr", &addr, "--insecure-plaintext"],
        &[("FINTRUST_API_KEY", &s.writer)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("pong"), "{r:?}");
    assert!(!r.stderr.contains("warning"), "loopback: {r:?}");
    // A flag wins over a variable of the environment (a service's own key
    // in FINTRUST_API_KEY does not stand in the way of --api-key-file);
    // two of one kind are refused.
    let key_file = s.dir.path().join("writer.key");
    std::fs::write(&key_file, format!("{}\n", s.writer)).expect("key file");
    let key_file = key_file.to_str().expect("utf-8 path").to_string();
    let ping = [
        "ping",
        "--addr",
        &addr,
        "--insecure-plaintext",
        "--format",
        "json",
    ];
    let r = vault_client(
        &[&ping[..], &["--api-key-file", &key_file]].concat(),
        &[("FINTRUST_API_KEY", &s.admin)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["role"], "writer", "{r:?}");
    let r = vault_client(
        &[&ping[..], &["--api-key", &s.writer]].concat(),
        &[("FINTRUST_API_KEY_FILE", "/nonexistent/key")],
    )
    .await;
    assert_eq!(r.json()["role"], "writer", "{r:?}");
    let r = vault_client(
        &ping,
        &[
            ("FINTRUST_API_KEY", &s.writer),
            ("FINTRUST_API_KEY_FILE", &key_file),
        ],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("are both set"), "{r:?}");
    let r = vault_client(
        &[
            &ping[..],
            &["--api-key", &s.writer, "--api-key-file", &key_file],
        ]
        .concat(),
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("exclude each other"), "{r:?}");
    // Plaintext to a host that is not loopback is said to be in the clear.
    let r = vault_client(
        &[
            "ping",
            "--addr",
            "192.0.2.1:9999",
            "--insecure-plaintext",
            "--timeout-secs",
            "1",
        ],
        &[("FINTRUST_API_KEY", &s.writer)],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a loopback address"), "{r:?}");
    // Into a closed pipe (`| head -0`): a local error, not a panic.
    let args = ["ping", "--addr", &addr, "--insecure-plaintext"].map(String::from);
    let key = s.writer.clone();
    let r = tokio::task::spawn_blocking(move || {
        support::run_bin_into_closed_pipe(
            "fintrust-client",
            "vault-client",
            args,
            &[("FINTRUST_API_KEY", &key)],
        )
    })
    .await
    .expect("run");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.starts_with("error: cannot write to stdout"),
        "{r:?}"
    );

    // Refused by the server: exit 2 with its code on stderr.
    let r = vault_client(
        &[
            "head",
            "--addr",
            &addr,
            "--insecure-plaintext",
            "--api-key",
            "fvk_wrong",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.starts_with("error: unauthenticated: "), "{r:?}");
    assert!(r.stdout.is_empty());
    let r = vault_client(
        &[
            "head",
            "--addr",
            &addr,
            "--insecure-plaintext",
            "--api-key",
            &s.writer,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.starts_with("error: forbidden: "), "{r:?}");

    // Local errors: exit 1.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let r = vault_client(
        &[
            "ping",
            "--addr",
            &closed,
            "--insecure-plaintext",
            "--api-key",
            &s.writer,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "no server listening: {r:?}");
    let r = vault_client(&["ping", "--addr", &addr, "--api-key", &s.writer], &[]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("--insecure-plaintext"), "{r:?}");
    let r = vault_client(&["ping", "--addr", &addr, "--insecure-plaintext"], &[]).await;
    assert_eq!(r.code, 1, "no API key: {r:?}");
    let bad = write(s.dir.path(), "bad.json", r#"{"name": "Ada", "age": 36}"#);
    let r = vault_client(
        &[
            "append",
            "--subject",
            "cust-1",
            "--record-file",
            bad.to_str().expect("utf-8"),
            "--addr",
            &addr,
            "--insecure-plaintext",
            "--api-key",
            &s.writer,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("\"age\" is not a string"), "{r:?}");
    let r = vault_client(&["append", "--subject", "x"], &[]).await;
    assert_eq!(r.code, 1, "bad arguments: {r:?}");
    let r = vault_client(
        &[
            "ping",
            "--addr",
            &addr,
            "--cacert",
            "/nonexistent/ca.pem",
            "--api-key",
            &s.writer,
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_client_redeems_a_token_as_one_json_object() {
    let s = start(ServeConfig::default(), None).await;
    let addr = s.addr.to_string();
    let writer = s.connect(&s.writer).await;
    let appended = writer
        .append(
            "cust-9",
            fields(&[("name", "Grace"), ("city", "Arlington")]),
        )
        .await
        .expect("append");
    let admin = s.connect(&s.admin).await;
    // Every token of the test minted now, for an hour: the admin's
    // connection may be closed as idle, and the tokens of a shorter life
    // expire, while a binary is built.
    let mint = || async {
        admin
            .mint(
                PARTNER,
                "cust-9",
                "kyc",
                vec![("name".into(), MaskOp::Reveal)],
                3600,
            )
            .await
            .expect("mint")
            .0
    };
    let (token, from_env, from_file) = (mint().await, mint().await, mint().await);
    let env = [("FINTRUST_API_KEY", s.partner.as_str())];
    let args = [
        "redeem",
        "--token",
        &token,
        "--addr",
        &addr,
        "--insecure-plaintext",
    ];
    let r = vault_client(&args, &env).await;
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["subject"], "cust-9");
    assert_eq!(v["seq"].as_u64(), Some(appended.seq));
    assert_eq!(v["fields"]["name"], "Grace");
    assert!(v["fields"].get("city").is_none(), "{v}");
    let r = vault_client(&args, &env).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.starts_with("error: token_spent: "), "{r:?}");

    // The token from the environment, or from a file, off the command
    // line that `ps` shows.
    let plain = ["redeem", "--addr", &addr, "--insecure-plaintext"];
    let env_token = [
        ("FINTRUST_API_KEY", s.partner.as_str()),
        ("FINTRUST_TOKEN", from_env.as_str()),
    ];
    let r = vault_client(&plain, &env_token).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["fields"]["name"], "Grace");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{}\n", from_file.as_str())).expect("token file");
    let file = file.to_str().expect("utf-8");
    let r = vault_client(&[&plain[..], &["--token-file", file]].concat(), &env).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["subject"], "cust-9");
    let r = vault_client(&plain, &env).await;
    assert_eq!(r.code, 1, "no token: {r:?}");
    // The file wins over FINTRUST_TOKEN: its token, spent above, not
    // one the vault never minted.
    let unknown = [
        ("FINTRUST_API_KEY", s.partner.as_str()),
        ("FINTRUST_TOKEN", "fvt_never_minted"),
    ];
    let r = vault_client(&[&plain[..], &["--token-file", file]].concat(), &unknown).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.starts_with("error: token_spent: "), "{r:?}");
    // A device, or a file far larger than any token or record, given by
    // mistake: refused as a local error, not read whole.
    let r = vault_client(&[&plain[..], &["--token-file", "/dev/zero"]].concat(), &env).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not a token"), "{r:?}");
    let writer = [("FINTRUST_API_KEY", s.writer.as_str())];
    let append = [
        "append",
        "--subject",
        "cust-9",
        "--record-file",
        "/dev/zero",
        "--addr",
        &addr,
        "--insecure-plaintext",
    ];
    let r = vault_client(&append, &writer).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("larger than a record can be"), "{r:?}");

    // Data or a receipt that cannot be written (stdout closed, `| head
    // -0`): what was done is said on stderr, the token spent, the record
    // appended with its seq, so that nobody appends it again.
    let record = dir.path().join("record.json");
    std::fs::write(&record, r#"{"name": "Grace"}"#).expect("record");
    let token = mint().await;
    let runs = [
        (
            vec!["redeem", "--token", token.as_str()],
            s.partner.clone(),
            "the token was redeemed and is spent",
        ),
        (
            vec![
                "append",
                "--subject",
                "cust-9",
                "--record-file",
                record.to_str().expect("utf-8"),
            ],
            s.writer.clone(),
            "the record was appended (seq ",
        ),
    ];
    for (command, key, said) in runs {
        let mut args: Vec<String> = command.into_iter().map(String::from).collect();
        args.extend(["--addr", &addr, "--insecure-plaintext"].map(String::from));
        let r = tokio::task::spawn_blocking(move || {
            support::run_bin_into_closed_pipe(
                "fintrust-client",
                "vault-client",
                args,
                &[("FINTRUST_API_KEY", &key)],
            )
        })
        .await
        .expect("run");
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains(said), "{r:?}");
    }
}

/// A redemption whose connection closes before its answer says the token
/// may be spent (the vault burns it before the data leaves); one whose
/// connection is never made does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_client_says_a_redemption_cut_off_may_have_spent_its_token() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    // Reads what the client sends (its Hello and Redeem), then closes
    // without an answer, as a vault that crashed after the burn would.
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
        }
    });
    let args = [
        "redeem",
        "--token",
        "fvt_cut_off",
        "--addr",
        &addr,
        "--insecure-plaintext",
        "--api-key",
        "fvk_partner",
    ];
    let r = vault_client(&args, &[]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("the token may be spent"), "{r:?}");
    // Nothing listens on port 1: never reached, nothing said of the token.
    let args = [
        "redeem",
        "--token",
        "fvt_cut_off",
        "--addr",
        "127.0.0.1:1",
        "--insecure-plaintext",
        "--api-key",
        "fvk_partner",
    ];
    let r = vault_client(&args, &[]).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(!r.stderr.contains("may be spent"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_client_speaks_tls_with_cacert() {
    let s = start_tls(false).await;
    let addr = s.server.addr.to_string();
    let ca = s.ca_file.to_str().expect("utf-8");
    let other = s.other_ca_file.to_str().expect("utf-8");
    let env = [("FINTRUST_API_KEY", s.server.writer.as_str())];
    // The certificate names `localhost`, and the name checked is the
    // address's host unless --server-name says otherwise.
    let r = vault_client(&["ping", "--addr", &addr, "--cacert", ca], &env).await;
    assert_eq!(r.code, 1, "a certificate for another name: {r:?}");
    assert!(r.stderr.contains("TLS"), "{r:?}");
    let named = ["--server-name", "localhost"];
    let r = vault_client(
        &[
            &["ping", "--addr", &addr, "--cacert", ca, "--format", "json"],
            &named[..],
        ]
        .concat(),
        &env,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["role"], "writer");
    let localhost = addr.replace("127.0.0.1", "localhost");
    let r = vault_client(&["ping", "--addr", &localhost, "--cacert", ca], &env).await;
    assert_eq!(r.code, 0, "the address's own host: {r:?}");
    let r = vault_client(
        &[&["ping", "--addr", &addr, "--cacert", other], &named[..]].concat(),
        &env,
    )
    .await;
    assert_eq!(r.code, 1, "another CA: {r:?}");
    assert!(r.stderr.contains("TLS"), "{r:?}");
}

#[tokio::test]
async fn policies_consents_and_credentials_through_the_gateway_requests() {
    let s = start(ServeConfig::default(), None).await;
    let admin = s.connect(&s.admin).await;
    let (gateway_id, gateway_key) = admin
        .create_credential("gateway", "http-shim")
        .await
        .expect("create gateway");
    assert!(gateway_key.starts_with("fvk_"));
    let gw = s.connect(&gateway_key).await;
    assert_eq!(gw.role(), "gateway");

    // Whois by the hash of a presented key; unknown keys are `None`.
    let hash = *blake3::hash(s.partner.as_bytes()).as_bytes();
    let who = gw.whois(hash).await.expect("whois").expect("known");
    assert_eq!((who.role.as_str(), who.name.as_str()), ("partner", PARTNER));
    assert_eq!(gw.whois([7; 32]).await.expect("whois"), None);

    // Policies and consents: events in the log, then readable state.
    // A policy the shim would not take (a member it does not know) is
    // refused, whoever sends it.
    let typo = serde_json::json!({"partner_id": PARTNER,
        "policy": {"purposes": {}, "allowed_hour": [9, 17]}});
    let refused = gw.event(5, "", typo.to_string().into_bytes()).await;
    assert!(
        matches!(&refused, Err(client::ClientError::Server { code: client::ErrorCode::Invalid, message })
            if message.contains("allowed_hour")),
        "{refused:?}"
    );
    let policy =
        serde_json::json!({"partner_id": PARTNER, "policy": {"active": true, "purposes": {}}});
    gw.event(5, "", policy.to_string().into_bytes())
        .await
        .expect("policy");
    let got = gw.policy(PARTNER).await.expect("policy").expect("set");
    assert_eq!(got.kind, 5);
    let got: serde_json::Value = serde_json::from_slice(&got.value).expect("json");
    assert_eq!(got["policy"]["active"], true);
    assert_eq!(
        got["recorded_by"],
        gateway_id.as_str(),
        "the vault names the writer"
    );
    assert_eq!(gw.policy("nobody").await.expect("policy"), None);

    let w = s.connect(&s.writer).await;
    let consent = serde_json::json!({"partner_id": PARTNER, "purposes": ["credit_check"]});
    w.event(3, "cust-1", consent.to_string().into_bytes())
        .await
        .expect("consent");
    let got = gw
        .consent("cust-1", PARTNER)
        .await
        .expect("consent")
        .expect("set");
    assert_eq!(got.kind, 3);
    assert_eq!(gw.consent("cust-2", PARTNER).await.expect("consent"), None);

    // Context: the same three answers in one request.
    let ctx = gw
        .context(hash, "cust-1")
        .await
        .expect("context")
        .expect("known key");
    assert_eq!(ctx.identity, who);
    assert_eq!(ctx.policy, gw.policy(PARTNER).await.expect("policy"));
    assert_eq!(
        ctx.consent,
        gw.consent("cust-1", PARTNER).await.expect("consent")
    );
    let ctx = gw
        .context(hash, "cust-2")
        .await
        .expect("context")
        .expect("known key");
    assert_eq!((ctx.policy.is_some(), ctx.consent), (true, None));
    assert_eq!(gw.context([7; 32], "cust-1").await.expect("context"), None);
    // A key that is not a partner's: its identity, and nothing else.
    let writer_hash = *blake3::hash(s.writer.as_bytes()).as_bytes();
    let ctx = gw
        .context(writer_hash, "cust-1")
        .await
        .expect("context")
        .expect("known key");
    assert_eq!(
        (ctx.identity.role.as_str(), ctx.policy, ctx.consent),
        ("writer", None, None)
    );
    assert_eq!(
        code(gw.context(hash, "has space").await),
        ErrorCode::Invalid
    );

    // Roles: writers may not set policies, gateways may not create keys,
    // nobody appends token or credential entries as events.
    let refused = [
        code(w.event(5, "", policy.to_string().into_bytes()).await),
        code(gw.create_credential("admin", "x").await),
        code(gw.event(9, "", b"{}".to_vec()).await),
        code(admin.event(6, "", b"{}".to_vec()).await),
        code(w.whois(hash).await),
        code(w.context(hash, "cust-1").await),
    ];
    assert!(
        refused.iter().all(|c| *c == ErrorCode::Forbidden),
        "{refused:?}"
    );
    // Bad input: not an object, unknown kind, bad role, bad partner id.
    assert_eq!(
        code(gw.event(5, "", b"[1]".to_vec()).await),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(admin.event(200, "", b"{}".to_vec()).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(
            gw.event(3, "cust-1", br#"{"partner_id": "a b"}"#.to_vec())
                .await
        ),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(admin.create_credential("root", "x").await),
        ErrorCode::Invalid
    );

    // Revocation: the key stops working, on the connections it already
    // had too (their next request is refused and they close); revoking
    // twice finds nothing; other credentials' connections go on.
    assert!(admin
        .revoke_credential(gateway_id.as_str())
        .await
        .expect("revoke")
        .is_some());
    assert_eq!(
        admin.revoke_credential(gateway_id).await.expect("again"),
        None
    );
    assert!(matches!(
        Client::connect(s.plain(&gateway_key)).await,
        Err(ClientError::Server {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));
    // Even a request its role may not make: refused as revoked, and closed.
    assert_eq!(
        code(gw.create_credential("partner", "p9").await),
        ErrorCode::Unauthenticated
    );
    assert!(gw.ping().await.is_err(), "the connection is closed");
    assert!(w.ping().await.is_ok());
    assert!(admin.ping().await.is_ok());
}

/// The payload of the entry at `seq`, as JSON.
fn payload_at(entries: &[Vec<u8>], seq: u64) -> serde_json::Value {
    let e = storage::entry::EntryRef::decode(&entries[seq as usize]).expect("an entry");
    serde_json::from_slice(e.payload).expect("a JSON payload")
}

#[tokio::test]
async fn every_admin_action_names_the_admin_who_asked() {
    let s = start(ServeConfig::default(), None).await;
    let first = s.connect(&s.admin).await;
    let hash = *blake3::hash(s.admin.as_bytes()).as_bytes();
    let first_id = first.whois(hash).await.expect("whois").expect("known").id;
    let (second_id, second_key) = first
        .create_credential("admin", "second-admin")
        .await
        .expect("create an admin");
    let second = s.connect(&second_key).await;
    let writer = s.connect(&s.writer).await;
    writer
        .append("cust-1", fields(&[("name", "Ada")]))
        .await
        .expect("append");

    let (doomed, _) = second
        .create_credential("writer", "doomed")
        .await
        .expect("create");
    let revoked = second
        .revoke_credential(doomed.as_str())
        .await
        .expect("revoke")
        .expect("known");
    let rotated = second
        .rotate_subject_key("cust-1", true)
        .await
        .expect("rotate");
    let signing = second.rotate_signing_key().await.expect("rotate signing");
    let master = second
        .rotate_master_key(SecretKind::KeyFile, &[7u8; 32])
        .await
        .expect("rotate master");
    let shred = second.shred("cust-1").await.expect("shred");

    let entries = first.entries(0, 10_000).await.expect("entries");
    let created = entries
        .iter()
        .map(|b| storage::entry::EntryRef::decode(b).expect("an entry"))
        .filter(|e| e.kind == storage::Kind::CredentialCreated)
        .map(|e| serde_json::from_slice::<serde_json::Value>(e.payload).expect("json"))
        .collect::<Vec<_>>();
    let by_id = |id: &str| {
        created
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} created: {created:?}"))
            .clone()
    };
    // The vault's own first admin and the test's credentials, made on the
    // vault directly, name no one.
    assert!(by_id(&first_id).get("recorded_by").is_none());
    assert_eq!(by_id(&second_id)["recorded_by"], first_id.as_str());
    assert_eq!(by_id(&doomed)["recorded_by"], second_id.as_str());
    for (what, seq) in [
        ("revocation", revoked.seq),
        ("subject key rotation", rotated.receipt.seq),
        ("signing key rotation", signing.receipt.seq),
        ("master key rotation", master.seq),
        ("shred", shred.seq),
    ] {
        assert_eq!(
            payload_at(&entries, seq)["recorded_by"],
            second_id.as_str(),
            "{what}"
        );
    }
    // The record appended again under the new key is the writer's data,
    // not an admin entry.
    let again = rotated.reencrypted.expect("re-encrypted").seq;
    assert_eq!(
        storage::entry::EntryRef::decode(&entries[again as usize])
            .expect("an entry")
            .kind,
        storage::Kind::Record
    );
}
