//! Failpoints at every step of a commit, for every kind of write.
//!
//! The commit path has failpoints (the `fail` crate, compiled in only
//! for tests through the `failpoints` feature):
//!
//! | failpoint | where |
//! |---|---|
//! | `commit::before_write` | a group is built and signed; nothing is written yet |
//! | `commit::after_write` | the group's record is in the write-ahead file (not synced) and its chunk in sled's buffers |
//! | `commit::before_flush` | the syncer, or a lone append that syncs its own group, is about to `fdatasync` the write-ahead file |
//! | `commit::after_flush` | the group is durable; no caller has its reply yet |
//! | `checkpoint::before_sync` | a full write-ahead segment is about to be checkpointed (sled flushed and fsynced, the segment deleted) |
//! | `apply::before_write` | the writer is about to move held-back log chunks to sled (5 ms after the first, once 256 KiB wait, before a batch that must follow them, before a closed segment's checkpoint, and at close) |
//! | `index::before_write` | the indexer is about to write derived state |
//! | `index::mid_write` | the `indexing` marker and half the keys are written |
//! | `index::after_write` | derived state is written (not yet flushed) |
//!
//! Each one is armed in a child process (this test binary again) that
//! writes one kind of entry: a record (append), a record of a new subject
//! (its group creates the subject's data key), an audit event, a token
//! mint, or a mint and a redemption. Actions:
//! - `panic`: the child's panic hook aborts the process, so this is a
//!   crash at exactly that step;
//! - `return`: the step fails with an I/O error, as a failing disk or
//!   fsync would report it; `return(full)`: with "no space left on
//!   device".
//!
//! After a crash, or after an I/O error (the vault must refuse every later
//! write with a typed error, and the process exits), the parent reopens
//! the same data dir, which carries every earlier case with it, and
//! checks: the log verifies with the pinned key; every acknowledged
//! append is at its seq with its hash and plaintext; every delivered token
//! is spent; every acknowledged token never redeemed redeems once; a
//! redemption cut off redeems at most once; the derived state equals a
//! rebuild from the log.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use storage::vault::FAILPOINTS;
use storage::{verify, Append, Error, Kind, Options, TokenRefusal, Unlock, Vault, VerifyOptions};

mod common;
use common::scratch_dir;

const CHILD_ENV: &str = "FINTRUST_FAILPOINT_CHILD";
const KEY_FILE: &[u8] = b"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const PARTNER: &str = "lender-1";
const SUBJECT: &str = "seeded";
const SEEDED_NAME: &str = "Ada Lovelace";

const OPS: &[&str] = &["append", "subject", "audit", "mint", "redeem"];

fn unlock() -> Unlock {
    Unlock::key_file(KEY_FILE).expect("a 32-byte hex key")
}

/// Derived state is written after every group, and a write-ahead segment
/// is checkpointed every few groups, so that the index and checkpoint
/// failpoints are reached at once.
fn options() -> Options {
    Options {
        index_batch: 1,
        wal_segment_bytes: 2048,
        cache_bytes: 8 << 20,
        ..Options::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The child: opens the vault, writes `op` entries, arms the failpoint
/// after a few, and reports every outcome on stdout.
#[test]
fn failpoint_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(5, '|');
    let mut next = || parts.next().expect("a complete child spec").to_string();
    let (dir, name, action, op, warmup) = (next(), next(), next(), next(), next());
    let warmup: usize = warmup.parse().expect("warm-up count");
    // Any panic (the armed failpoint) is a crash of the whole process.
    std::panic::set_hook(Box::new(|_| std::process::abort()));
    let vault = Vault::open(Path::new(&dir), &unlock(), options()).expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut refused = 0;
    for i in 0..400 {
        if i == warmup {
            fail::cfg(&name, &action).expect("arm the failpoint");
        }
        let ok = rt.block_on(one_op(&vault, &op, i));
        if !ok {
            refused += 1;
            if refused == 4 {
                std::process::exit(0);
            }
        } else if refused > 0 {
            println!("accepted after a refusal");
            std::process::exit(0);
        }
    }
    println!("not fired");
    std::process::exit(0);
}

/// One operation of kind `op`, printed; false when it was refused.
async fn one_op(vault: &Vault, op: &str, i: usize) -> bool {
    let refused = |e: Error| {
        // A typed error: the vault is poisoned, or the I/O step failed.
        let kind = if matches!(e, Error::Poisoned) {
            "poisoned"
        } else {
            "failed"
        };
        println!("refused {kind} {e}");
        false
    };
    match op {
        "append" | "subject" | "audit" => {
            let subject = match op {
                // A new subject each time: its group creates a data key.
                "subject" => format!("new-{}-{i}", std::process::id()),
                _ => format!("s{}", i % 5),
            };
            let (item, plaintext) = if op != "audit" {
                let body = format!("{{\"n\":\"{i}\",\"pid\":\"{}\"}}", std::process::id());
                (
                    Append::record(subject.as_str(), body.clone().into_bytes()),
                    hex::encode(body),
                )
            } else {
                let event =
                    serde_json::json!({"partner_id": PARTNER, "reason": "forbidden", "n": i});
                (
                    Append::event(Kind::AccessDenied, subject.as_str(), &event),
                    "-".to_string(),
                )
            };
            match vault.append(item).await {
                Ok(r) => {
                    println!(
                        "ack {} {} {subject} {plaintext}",
                        r.seq,
                        hex::encode(r.entry_hash)
                    );
                    true
                }
                Err(e) => refused(e),
            }
        }
        "mint" | "redeem" => {
            let token = match mint(vault).await {
                Ok(t) => t,
                Err(e) => return refused(e),
            };
            println!("minted {token}");
            if op == "mint" {
                return true;
            }
            println!("redeeming {token}");
            match vault.redeem(&token, PARTNER, now_ms(), None).await {
                Ok(_) => {
                    println!("delivered {token}");
                    true
                }
                Err(e) => refused(e),
            }
        }
        other => panic!("unknown op {other}"),
    }
}

async fn mint(vault: &Vault) -> storage::Result<String> {
    vault
        .mint(
            PARTNER,
            SUBJECT,
            "kyc",
            vec![("name".into(), "reveal".into())],
            now_ms() + 600_000,
        )
        .await
        .map(|t| t.to_string())
}

/// What the parent was told, over every case.
#[derive(Default)]
struct Model {
    /// (seq, entry hash, plaintext hex or "-").
    appends: Vec<(u64, String, String)>,
    minted: Vec<String>,
    redeeming: Vec<String>,
    delivered: Vec<String>,
}

fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("sled's data file");
    f.lock().expect("wait for sled's lock");
}

/// Runs one case in a child; returns what it printed and how it ended.
fn run_child(
    dir: &Path,
    name: &str,
    action: &str,
    op: &str,
    warmup: usize,
) -> (Vec<String>, std::process::ExitStatus) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "failpoint_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{name}|{action}|{op}|{warmup}", dir.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().expect("wait for the child");
    (lines, status)
}

/// Reopens the vault (a restart) and checks everything the model holds.
fn check_after(dir: &Path, key: &ed25519_dalek::VerifyingKey, m: &mut Model, case: &str) {
    wait_unlocked(dir);
    let report = verify(
        dir,
        &VerifyOptions {
            public_key: Some(*key),
            progress: None,
            total_hint: None,
            kept_head: None,
            verified_prefix: None,
        },
    )
    .unwrap_or_else(|e| panic!("{case}: verify could not run: {e}"));
    assert!(report.ok(), "{case}: {:?}", report.failure);
    let vault = Vault::open(dir, &unlock(), options())
        .unwrap_or_else(|e| panic!("{case}: the vault does not reopen: {e}"));
    for (seq, hash, plaintext) in &m.appends {
        let e = vault
            .entry(*seq)
            .expect("read an entry")
            .unwrap_or_else(|| panic!("{case}: acknowledged entry {seq} is gone"));
        assert_eq!(&hex::encode(e.hash), hash, "{case}: entry {seq} changed");
        if plaintext != "-" {
            let r = vault
                .record_at(*seq)
                .expect("read a record")
                .unwrap_or_else(|| panic!("{case}: record {seq} is gone"));
            assert_eq!(
                &hex::encode(r.plaintext.as_slice()),
                plaintext,
                "{case}: record {seq}"
            );
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let spent =
            |r: &storage::Result<_>| matches!(r, Err(Error::TokenRefused(TokenRefusal::Spent)));
        for t in std::mem::take(&mut m.delivered) {
            let r = vault.redeem(&t, PARTNER, now_ms(), None).await;
            assert!(
                spent(&r),
                "{case}: a delivered token is not spent: {:?}",
                r.err()
            );
        }
        for t in std::mem::take(&mut m.minted) {
            let cut_off = m.redeeming.contains(&t);
            let r = vault.redeem(&t, PARTNER, now_ms(), None).await;
            match &r {
                Ok((terms, _)) => assert_eq!(terms.subject, SUBJECT, "{case}"),
                Err(_) if cut_off && spent(&r) => continue,
                Err(e) => panic!("{case}: an acknowledged token does not redeem: {e}"),
            }
            let again = vault.redeem(&t, PARTNER, now_ms(), None).await;
            assert!(spent(&again), "{case}: a token redeemed twice");
        }
        m.redeeming.clear();
        // The seeded record still reads through a fresh token.
        let t = mint(&vault).await.expect("mint after a restart");
        vault
            .redeem(&t, PARTNER, now_ms(), None)
            .await
            .expect("redeem after a restart");
    });
    let derived = vault
        .check_derived_state()
        .expect("rebuild the derived state");
    assert_eq!(derived.differences, 0, "{case}: {:?}", derived.sample);
    vault.close().expect("close");
    wait_unlocked(dir);
}

#[test]
fn every_failpoint_of_every_write_keeps_what_was_acknowledged() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), options()).expect("create");
    let key = created.vault.public_key();
    let body = format!("{{\"name\":\"{SEEDED_NAME}\"}}");
    created
        .vault
        .append_blocking(Append::record(SUBJECT, body.into_bytes()))
        .expect("seed");
    created.vault.close().expect("close");
    wait_unlocked(&dir);

    let mut cases = Vec::new();
    for name in FAILPOINTS {
        for op in OPS {
            cases.push((*name, "panic", *op));
            cases.push((*name, "return", *op));
        }
    }
    // A full disk where the log is written and flushed.
    for name in &FAILPOINTS[..3] {
        cases.push((*name, "return(full)", "append"));
    }
    let mut m = Model::default();
    for (n, (name, action, op)) in cases.iter().enumerate() {
        let case = format!("{name} {action} during {op}");
        let (lines, status) = run_child(&dir, name, action, op, 2 + n % 4);
        let mut refusals = 0;
        for line in &lines {
            let mut w = line.split(' ');
            match w.next() {
                Some("ack") => {
                    let seq = w.next().and_then(|s| s.parse().ok()).expect("seq");
                    let hash = w.next().expect("hash").to_string();
                    let _subject = w.next();
                    let plaintext = w.next().expect("plaintext").to_string();
                    m.appends.push((seq, hash, plaintext));
                }
                Some("minted") => m.minted.push(w.next().expect("token").to_string()),
                Some("redeeming") => m.redeeming.push(w.next().expect("token").to_string()),
                Some("delivered") => {
                    let t = w.next().expect("token").to_string();
                    m.minted.retain(|x| *x != t);
                    m.delivered.push(t);
                }
                Some("refused") => {
                    // The first refusal may be the injected error itself;
                    // every later one is the poisoned vault's.
                    let kind = w.next();
                    assert!(
                        refusals == 0 || kind == Some("poisoned"),
                        "{case}: a refusal after the first that is not Poisoned: {line}"
                    );
                    refusals += 1;
                }
                Some("not" | "accepted") => panic!("{case}: {line}"),
                // libtest's own lines ("running 1 test", …).
                _ => {}
            }
        }
        if *action == "panic" {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(6),
                "{case}: the failpoint did not crash the child ({status}); it printed {lines:?}"
            );
        } else {
            assert!(status.success(), "{case}: {status}, printed {lines:?}");
            assert_eq!(
                refusals, 4,
                "{case}: after an I/O error every write is refused: {lines:?}"
            );
        }
        check_after(&dir, &key, &mut m, &case);
    }
    eprintln!(
        "{} failpoint cases; {} acknowledged entries checked after every restart",
        cases.len(),
        m.appends.len()
    );
}
