//! `vault-verify --remote` as a real process against servers on ports the
//! OS chose: a live vault (intact, also while appends continue; wrong
//! pinned key; wrong API key or role; nothing listening), and a fake
//! server speaking the protocol codec that serves a recorded log with one
//! entry altered or missing, or answers with garbage.
//!
//! Exit codes: 0 intact, 1 integrity failure, 2 could not run.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use protocol::{Envelope, ErrorCode, Message, MessageCodec};
use server::serve::ServeConfig;
use storage::{Append, SignedHead};
use support::{start, Run, Server};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Runs `vault-verify --remote ADDR --insecure-plaintext` plus `args`.
async fn verify(addr: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut all = vec!["--remote", addr, "--insecure-plaintext"];
    all.extend_from_slice(args);
    support::run_tool("fintrust-server", "vault-verify", &all, env).await
}

fn hex_key(s: &Server) -> String {
    hex::encode(s.public_key())
}

/// Appends `n` records one by one (one commit group each, as nothing else
/// is queued), then one batch of five (one group).
async fn fill(s: &Server, n: usize) {
    for i in 0..n {
        let payload = format!(r#"{{"name":"Ada {i}"}}"#).into_bytes();
        s.vault
            .append(Append::record(format!("cust-{i}"), payload))
            .await
            .expect("append");
    }
    let batch = (0..5)
        .map(|i| Append::record(format!("batch-{i}"), br#"{"a":"1"}"#.to_vec()))
        .collect();
    s.vault.append_batch(batch).await.expect("batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_live_server_verifies() {
    let s = start(ServeConfig::default(), None).await;
    fill(&s, 12).await;
    let addr = s.addr.to_string();
    let key = hex_key(&s);
    let expected = s.vault.head().expect("a head").last_seq + 1;

    let r = verify(
        &addr,
        &["--public-key", &key, "--format", "json"],
        &[("FINTRUST_API_KEY", &s.auditor)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["mode"], "remote", "{j}");
    assert_eq!(j["entries"], expected, "{j}");
    assert_eq!(j["head_seq"], expected - 1, "{j}");
    assert_eq!(j["failure"], serde_json::Value::Null, "{j}");
    assert!(j["groups"].as_u64().is_some_and(|g| g >= 14), "{j}");
    assert!(j["head"].as_str().is_some_and(|h| h.len() == 64), "{j}");

    // Text output, a small page size (many pages), the key from a file,
    // and the admin role, which may read the log too.
    let key_file = s.dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{}\n", s.admin)).expect("write key file");
    let r = verify(
        &addr,
        &[
            "--page-size",
            "3",
            "--api-key-file",
            key_file.to_str().expect("utf-8 path"),
        ],
        &[("FINTRUST_PUBLIC_KEY", &key)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .starts_with(&format!("OK: {expected} entries verified")),
        "{r:?}"
    );

    // Right after the first signing rotation, whose group key 0 signs: the
    // log's chain holds an endorsement that the served chain must too.
    s.vault
        .rotate_signing_key()
        .await
        .expect("signing rotation");
    let r = verify(
        &addr,
        &["--public-key", &key, "--format", "json"],
        &[("FINTRUST_API_KEY", &s.auditor)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["ok"], true, "{r:?}");
}

/// A server that holds at most a few KiB of entries per answer
/// (`max_entries_bytes`) sends fewer than asked, at least one each time;
/// the verifier asks again from the next seq and still checks them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_by_their_bytes_still_verify_whole() {
    let s = start(
        ServeConfig {
            max_entries_bytes: 2048,
            ..ServeConfig::default()
        },
        None,
    )
    .await;
    fill(&s, 12).await;
    // One record past the limit on its own: still served, alone.
    let big = format!(r#"{{"v":"{}"}}"#, "x".repeat(4096)).into_bytes();
    s.vault
        .append(Append::record("big", big))
        .await
        .expect("append");
    let all = s.vault.entries_from(0, 10_000).expect("entries");
    let c = s.connect(&s.auditor).await;
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut answers = 0;
    loop {
        let page = c.entries(got.len() as u64, 10_000).await.expect("entries");
        if page.is_empty() {
            break;
        }
        let bytes: usize = page.iter().map(Vec::len).sum();
        assert!(page.len() == 1 || bytes <= 2048, "{} bytes", bytes);
        answers += 1;
        got.extend(page);
    }
    assert_eq!(got, all);
    assert!(answers > 2, "{answers} answers");
    let r = verify(
        &s.addr.to_string(),
        &["--public-key", &hex_key(&s), "--format", "json"],
        &[("FINTRUST_API_KEY", &s.auditor)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["entries"], all.len(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_while_appends_continue_checks_up_to_the_first_head() {
    let s = start(ServeConfig::default(), None).await;
    fill(&s, 20).await;
    let stop = Arc::new(AtomicBool::new(false));
    let appender = tokio::spawn({
        let vault = s.vault.clone();
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!(r#"{{"n":"{n}"}}"#).into_bytes();
                vault
                    .append(Append::record("busy", payload))
                    .await
                    .expect("append");
                n += 1;
            }
            n
        }
    });
    let key = hex_key(&s);
    for _ in 0..3 {
        let r = verify(
            &s.addr.to_string(),
            &["--public-key", &key, "--json", "--page-size", "7"],
            &[("FINTRUST_API_KEY", &s.auditor)],
        )
        .await;
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.json()["ok"], true, "{r:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let appended = appender.await.expect("join");
    assert!(appended > 0, "the appender made progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pinned_key_is_an_integrity_failure() {
    let s = start(ServeConfig::default(), None).await;
    let other = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]).verifying_key();
    let r = verify(
        &s.addr.to_string(),
        &["--public-key", &hex::encode(other.as_bytes()), "--json"],
        &[("FINTRUST_API_KEY", &s.auditor)],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["ok"], false, "{j}");
    assert_eq!(j["mode"], "remote", "{j}");
    assert_eq!(j["failure"]["reason"], "meta_mismatch", "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_unreachable_servers_cannot_run() {
    let s = start(ServeConfig::default(), None).await;
    let addr = s.addr.to_string();
    let key = hex_key(&s);

    // An API key the server does not know.
    let r = verify(&addr, &["--public-key", &key, "--api-key", "fvk_nope"], &[]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("unauthenticated"), "{r:?}");

    // A role that may not read the log.
    for api_key in [&s.writer, &s.partner] {
        let r = verify(&addr, &["--public-key", &key, "--api-key", api_key], &[]).await;
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("forbidden"), "{r:?}");
    }

    // Nothing listening: a port the OS gave and took back.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let r = verify(
        &closed,
        &["--public-key", &key, "--api-key", &s.auditor],
        &[],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("could not verify"), "{r:?}");

    // No pinned key, or both sources at once, are usage errors.
    let r = verify(&addr, &["--api-key", &s.auditor], &[]).await;
    assert_eq!(r.code, 2, "{r:?}");
    let r = verify(
        &addr,
        &[
            "--public-key",
            &key,
            "--api-key",
            &s.auditor,
            "--data-dir",
            "x",
        ],
        &[],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    // TLS is required unless plaintext is asked for by name.
    let r = support::run_tool(
        "fintrust-server",
        "vault-verify",
        &["--remote", &addr, "--public-key", &key],
        &[("FINTRUST_API_KEY", &s.auditor)],
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--insecure-plaintext"), "{r:?}");
}

/// A log recorded from a real vault, served back by [`fake_server`].
#[derive(Clone)]
struct Recorded {
    public_key: [u8; 32],
    head: Vec<u8>,
    entries: Vec<Vec<u8>>,
    receipts: Vec<Vec<u8>>,
    heads: Vec<SignedHead>,
}

impl Recorded {
    async fn from_vault(s: &Server) -> Recorded {
        let head = s.vault.head().expect("a head");
        let n = head.last_seq + 1;
        let entries = s.vault.entries_from(0, n as usize).expect("entries");
        let receipts = (0..n)
            .map(|seq| {
                s.vault
                    .receipt(seq)
                    .expect("read")
                    .expect("a receipt")
                    .encode()
            })
            .collect();
        let heads = s.vault.heads(0, n as usize, usize::MAX).expect("heads");
        Recorded {
            public_key: s.public_key(),
            head: head.encode(),
            entries,
            receipts,
            heads,
        }
    }
}

/// What the fake server does wrong.
#[derive(Clone, Copy)]
enum Fake {
    /// Serves the recorded log as it is.
    Faithful,
    /// Answers anything with bytes that are not a frame.
    Garbage,
    /// Answers `Hello` properly, then garbage.
    GarbageAfterHello,
    /// Answers `Heads` with more heads than asked for.
    TooManyHeads,
    /// Answers `Hello` properly, then refuses with a message that would
    /// clear the terminal.
    Hostile,
}

/// A server speaking the protocol codec that serves `log` to anyone.
async fn fake_server(log: Recorded, how: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let log = Arc::new(log);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve_fake(tcp, log.clone(), how));
        }
    });
    addr
}

async fn serve_fake(mut tcp: TcpStream, log: Arc<Recorded>, how: Fake) {
    if let Fake::Garbage = how {
        let _ = tcp
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot a vault")
            .await;
        return;
    }
    let mut conn = Framed::new(tcp, MessageCodec::new());
    while let Some(Ok(request)) = conn.next().await {
        let id = request.request_id;
        let reply = match request.message {
            Message::Hello { .. } => Message::HelloOk {
                role: "auditor".into(),
                server: "fake".into(),
            },
            _ if matches!(how, Fake::Hostile) => Message::Error {
                code: ErrorCode::Unavailable,
                message: "\u{1b}[2J\u{1b}[Hall good".into(),
            },
            _ if matches!(how, Fake::GarbageAfterHello) => {
                let mut tcp = conn.into_inner();
                let _ = tcp
                    .write_all(&[0x46, 0x56, 0x01, 0x87, 0xff, 0xff, 1, 2, 3])
                    .await;
                return;
            }
            Message::Head => Message::HeadInfo {
                public_key: log.public_key,
                entries: log.entries.len() as u64,
                signed_head: log.head.clone(),
            },
            Message::Entries { from_seq, max } => {
                let from = usize::try_from(from_seq).unwrap_or(usize::MAX);
                let entries: Vec<Vec<u8>> = log
                    .entries
                    .iter()
                    .skip(from)
                    .take(max as usize)
                    .cloned()
                    .collect();
                let answer = Envelope::last(id, Message::EntryBatch { entries });
                if conn.send(answer).await.is_err() {
                    return;
                }
                continue;
            }
            Message::Heads { from_seq, max } => {
                let from: Vec<&SignedHead> = log
                    .heads
                    .iter()
                    .filter(|h| h.last_seq >= from_seq)
                    .collect();
                let heads = if matches!(how, Fake::TooManyHeads) {
                    // One more than asked: the served heads over and over.
                    (0..=max as usize)
                        .map(|i| log.heads[i % log.heads.len()].encode())
                        .collect()
                } else {
                    from.into_iter()
                        .take(max as usize)
                        .map(SignedHead::encode)
                        .collect()
                };
                Message::HeadList { heads }
            }
            // The recorded vault never rotated its signing key.
            Message::KeyChain => Message::KeyChainInfo {
                endorsements: Vec::new(),
            },
            Message::Proof { seq } => match log.receipts.get(seq as usize) {
                Some(r) => Message::ProofInfo { receipt: r.clone() },
                None => Message::Error {
                    code: ErrorCode::NotFound,
                    message: "no such entry".into(),
                },
            },
            _ => Message::Error {
                code: ErrorCode::Forbidden,
                message: "fake".into(),
            },
        };
        if conn.send((id, reply)).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_log_with_an_altered_or_missing_entry_fails_at_its_seq() {
    let s = start(ServeConfig::default(), None).await;
    fill(&s, 10).await;
    let log = Recorded::from_vault(&s).await;
    let key = hex_key(&s);
    let auditor = [("FINTRUST_API_KEY", "fvk_fake")];

    // The recording, served faithfully, verifies: the fake is a fair one.
    let addr = fake_server(log.clone(), Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 0, "{r:?}");

    // One payload byte flipped in entry k (a record: its ciphertext).
    let k = log.entries.len() / 2;
    let mut altered = log.clone();
    if let Some(byte) = altered.entries[k].last_mut() {
        *byte ^= 0x01;
    }
    let addr = fake_server(altered, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    let seq = j["failure"]["seq"].as_u64().expect("a failing seq");
    assert!(seq == k as u64 || seq == k as u64 + 1, "k={k}: {j}");
    assert_eq!(j["ok"], false, "{j}");
    assert!(r.stdout.contains("\"mode\":\"remote\""), "{r:?}");

    // The text output names the seq too.
    let r = verify(&addr, &["--public-key", &key], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.starts_with("INTEGRITY FAILURE at seq "), "{r:?}");

    // Entry k left out: the chain has a gap where k should be.
    let mut missing = log.clone();
    missing.entries.remove(k);
    let addr = fake_server(missing, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["failure"]["seq"], k as u64, "{j}");
    assert_eq!(j["failure"]["reason"], "gap", "{j}");

    // The log stops short of the signed head.
    let mut short = log.clone();
    short.entries.truncate(k);
    let addr = fake_server(short, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.json()["failure"]["reason"], "truncated", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_head_forged_moved_or_left_out_fails_at_its_group() {
    let s = start(ServeConfig::default(), None).await;
    fill(&s, 10).await;
    let log = Recorded::from_vault(&s).await;
    let key = hex_key(&s);
    let auditor = [("FINTRUST_API_KEY", "fvk_fake")];
    assert!(log.heads.len() >= 4, "several groups: {}", log.heads.len());
    let g = log.heads.len() / 2;
    let group = log.heads[g];

    // A flipped signature byte: the group's signature fails.
    let mut forged = log.clone();
    forged.heads[g].signature[7] ^= 0x01;
    let addr = fake_server(forged, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["failure"]["reason"], "bad_signature", "{j}");
    assert_eq!(j["failure"]["seq"], group.last_seq, "{j}");

    // A root that is not the group's: the head does not match its entries.
    let mut moved = log.clone();
    moved.heads[g].group_root[0] ^= 0x01;
    let addr = fake_server(moved, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["failure"]["reason"], "head_mismatch", "{j}");
    assert_eq!(j["failure"]["seq"], group.last_seq, "{j}");

    // A group's head left out: the next head does not start the group.
    let mut skipped = log.clone();
    skipped.heads.remove(g);
    let addr = fake_server(skipped, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["failure"]["reason"], "head_mismatch", "{j}");
    assert_eq!(j["failure"]["seq"], group.group_first_seq, "{j}");

    // No heads from some group on, though the entries go on: truncated.
    let mut cut = log.clone();
    cut.heads.truncate(g);
    let addr = fake_server(cut, Fake::Faithful).await;
    let r = verify(&addr, &["--public-key", &key, "--json"], &auditor).await;
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["failure"]["reason"], "truncated", "{j}");
    assert_eq!(j["failure"]["seq"], group.group_first_seq, "{j}");

    // More heads than asked for breaks the protocol: no verdict.
    let addr = fake_server(log.clone(), Fake::TooManyHeads).await;
    let r = verify(
        &addr,
        &["--public-key", &key, "--timeout-secs", "5"],
        &auditor,
    )
    .await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("could not verify"), "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_sending_garbage_cannot_be_verified() {
    let s = start(ServeConfig::default(), None).await;
    let log = Recorded::from_vault(&s).await;
    let key = hex_key(&s);
    // The last one's message reaches the terminal escaped.
    for how in [Fake::Garbage, Fake::GarbageAfterHello, Fake::Hostile] {
        let addr = fake_server(log.clone(), how).await;
        let r = verify(
            &addr,
            &["--public-key", &key, "--timeout-secs", "5"],
            &[("FINTRUST_API_KEY", "fvk_fake")],
        )
        .await;
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("could not verify"), "{r:?}");
        assert!(r.stdout.is_empty(), "{r:?}");
        assert!(!r.stderr.contains('\u{1b}'), "{r:?}");
        if matches!(how, Fake::Hostile) {
            assert!(r.stderr.contains("all good"), "{r:?}");
        }
    }
}
