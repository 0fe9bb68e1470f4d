//! Random rounds of concurrent requests against one vault, checked
//! against what the vault acknowledged: batches of records (of known
//! subjects, of new ones, of a shredded one, which refuses the batch after
//! its new keys are made), shreds, subject key rotations with and without
//! re-encryption, signing and master key rotations, and tokens minted and
//! redeemed, with the vault closed and opened again after some rounds;
//! under small key caches, small per-key limits and small commit groups,
//! so that groups mix requests, caches empty, keys rotate by themselves
//! and requests are rolled back within groups.
//!
//! At each reopen and at the end, before and after it: the log verifies
//! with the pinned key; every receipt names its entry; no record of a
//! subject is acknowledged after its shred, and a batch refused as holding
//! a shredded subject holds one; each subject's latest record
//! is its acknowledged one with the highest seq (a re-encryption copies
//! the one before it); the key status is what a reopen rebuilds from the
//! log, and no key passes the limit; the derived state equals a rebuild;
//! a token redeemed once is spent.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use storage::{verify, Append, Error, Options, TokenRefusal, Unlock, Vault, VerifyOptions};

const SUBJECTS: u8 = 5;

#[derive(Debug, Clone, Copy)]
enum Item {
    Known(u8),
    New,
    Shredded,
}

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<Item>),
    Shred(u8),
    Rotate(u8, bool),
    RotateSigning,
    /// To a key file of these bytes.
    RotateMaster(u8),
    MintRedeem(u8),
}

#[derive(Debug, Clone)]
struct Case {
    key_cache: usize,
    limit: u64,
    group_entries: usize,
    /// Each round's requests, and whether the vault is closed and opened
    /// again after it.
    rounds: Vec<(Vec<Op>, bool)>,
}

fn op() -> impl Strategy<Value = Op> {
    let item = prop_oneof![
        6 => (0..SUBJECTS).prop_map(Item::Known),
        2 => Just(Item::New),
        1 => Just(Item::Shredded),
    ];
    prop_oneof![
        8 => proptest::collection::vec(item, 1..5).prop_map(Op::Batch),
        1 => (0..SUBJECTS).prop_map(Op::Shred),
        2 => (0..SUBJECTS, any::<bool>()).prop_map(|(s, r)| Op::Rotate(s, r)),
        1 => Just(Op::RotateSigning),
        1 => any::<u8>().prop_map(Op::RotateMaster),
        1 => (0..SUBJECTS).prop_map(Op::MintRedeem),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(1usize), Just(2), Just(100_000)],
        2u64..6,
        prop_oneof![Just(4usize), Just(16), Just(1024)],
        proptest::collection::vec(
            (
                proptest::collection::vec(op(), 1..9),
                proptest::bool::weighted(0.3),
            ),
            1..6,
        ),
    )
        .prop_map(|(key_cache, limit, group_entries, rounds)| Case {
            key_cache,
            limit,
            group_entries,
            rounds,
        })
}

/// What an acknowledged write put in the log at its seq.
#[derive(Debug, Clone)]
enum Wrote {
    Record(Vec<u8>),
    /// The subject's latest record, appended again under its new key.
    Reencrypted,
    Shred,
}

/// Every acknowledged write: seq → (subject, what, entry hash).
type Acked = BTreeMap<u64, (String, Wrote, [u8; 32])>;

/// What one request acknowledged: its writes, and the seq of a master
/// rotation with the key file it set.
#[derive(Default)]
struct Done {
    writes: Vec<(u64, String, Wrote, [u8; 32])>,
    master: Option<(u64, u8)>,
    /// The subjects of a batch refused as holding a shredded subject.
    refused: Option<Vec<String>>,
}

/// The key file of a master rotation's byte.
fn key_file(b: u8) -> Unlock {
    Unlock::key_file(&[b.max(1); 32]).expect("a key file")
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// Refusals the model allows for a request whose subject another request
/// of its round may shred, or never wrote.
fn allowed(e: &Error) -> bool {
    matches!(e, Error::SubjectShredded(_) | Error::NoSuchSubject(_))
}

async fn run_op(vault: Arc<Vault>, tag: String, op: Op) -> Result<Done, TestCaseError> {
    let subject = |n: u8| format!("m{n}");
    let mut done = Done::default();
    let out = &mut done.writes;
    match op {
        Op::Batch(items) => {
            let mut names = Vec::new();
            let mut appends = Vec::new();
            for (j, item) in items.iter().enumerate() {
                let s = match item {
                    Item::Known(n) => subject(*n),
                    Item::New => format!("{tag}-new{j}"),
                    Item::Shredded => "gone".to_string(),
                };
                let plaintext = format!("{tag}/{j}").into_bytes();
                names.push((s.clone(), plaintext.clone()));
                appends.push(Append::record(s, plaintext));
            }
            let refused = items.iter().any(|i| matches!(i, Item::Shredded));
            match vault.append_batch(appends).await {
                Ok(receipts) => {
                    if refused {
                        return Err(fail(format!(
                            "{tag}: a batch with a shredded subject went in"
                        )));
                    }
                    for ((s, p), r) in names.into_iter().zip(receipts) {
                        out.push((r.seq, s, Wrote::Record(p), r.entry_hash));
                    }
                }
                Err(Error::SubjectShredded(_)) => {
                    done.refused = Some(names.into_iter().map(|(s, _)| s).collect());
                }
                Err(e) => return Err(fail(format!("{tag}: batch refused: {e}"))),
            }
        }
        Op::Shred(n) => match vault.shred(&subject(n)).await {
            Ok(r) => out.push((r.seq, subject(n), Wrote::Shred, r.entry_hash)),
            Err(e) if allowed(&e) => {}
            Err(e) => return Err(fail(format!("{tag}: shred: {e}"))),
        },
        Op::Rotate(n, reencrypt) => match vault.rotate_subject_key(&subject(n), reencrypt).await {
            Ok(r) => {
                if let Some(c) = r.reencrypted {
                    out.push((c.seq, subject(n), Wrote::Reencrypted, c.entry_hash));
                }
            }
            Err(e) if allowed(&e) => {}
            Err(e) => return Err(fail(format!("{tag}: rotate: {e}"))),
        },
        Op::RotateSigning => {
            vault
                .rotate_signing_key()
                .await
                .map_err(|e| fail(format!("{tag}: signing rotation: {e}")))?;
        }
        Op::RotateMaster(b) => {
            let r = vault
                .rotate_master_key(&key_file(b))
                .await
                .map_err(|e| fail(format!("{tag}: master rotation: {e}")))?;
            done.master = Some((r.seq, b));
        }
        Op::MintRedeem(n) => {
            let fields = vec![("a".to_string(), "reveal".to_string())];
            let token = match vault.mint("p", &subject(n), "x", fields, u64::MAX).await {
                Ok(t) => t,
                Err(e) if allowed(&e) => return Ok(done),
                Err(e) => return Err(fail(format!("{tag}: mint: {e}"))),
            };
            // The subject may be shredded before the redemption.
            match vault.redeem(&token, "p", 0).await {
                Ok(_) | Err(Error::TokenRefused(TokenRefusal::SubjectShredded)) => {}
                Err(e) => return Err(fail(format!("{tag}: redeem: {e}"))),
            }
            match vault.redeem(&token, "p", 0).await {
                Err(Error::TokenRefused(_)) => {}
                other => return Err(fail(format!("{tag}: second redemption: {other:?}"))),
            }
        }
    }
    Ok(done)
}

/// Each subject key version: records encrypted under it, and its life.
type KeyCounts = BTreeMap<(String, u32), (u64, &'static str)>;

fn key_counts(v: &Vault) -> Result<KeyCounts, TestCaseError> {
    Ok(v.key_status(None, 1_000_000)
        .map_err(|e| fail(format!("key status: {e}")))?
        .subject_keys
        .into_iter()
        .map(|k| ((k.subject, k.version), (k.encryptions, k.life.name())))
        .collect())
}

/// The model's checks on an open vault.
fn check(v: &Vault, acked: &Acked, limit: u64) -> Result<(), TestCaseError> {
    for (seq, (subject, _, hash)) in acked {
        let e = v
            .entry(*seq)
            .map_err(|e| fail(format!("read {seq}: {e}")))?
            .ok_or_else(|| fail(format!("acknowledged seq {seq} is not in the log")))?;
        prop_assert_eq!(&e.hash, hash, "seq {}", seq);
        prop_assert_eq!(&e.subject, subject, "seq {}", seq);
    }
    // Per subject, in log order.
    let mut by_subject: BTreeMap<&str, Vec<(u64, &Wrote)>> = BTreeMap::new();
    for (seq, (s, w, _)) in acked {
        by_subject.entry(s).or_default().push((*seq, w));
    }
    for (subject, writes) in &by_subject {
        let mut latest: Option<&[u8]> = None;
        let mut shredded = false;
        for (seq, w) in writes {
            prop_assert!(!shredded, "{} written at {} after its shred", subject, seq);
            match w {
                Wrote::Record(p) => latest = Some(p),
                Wrote::Reencrypted => {
                    prop_assert!(latest.is_some(), "{} re-encrypted nothing", subject)
                }
                Wrote::Shred => shredded = true,
            }
        }
        match v.latest_record(subject) {
            Err(Error::SubjectShredded(_)) => {
                prop_assert!(shredded, "{} reads as shredded", subject)
            }
            Ok(r) => {
                prop_assert!(!shredded, "{} shredded but readable", subject);
                prop_assert_eq!(
                    r.map(|r| r.plaintext.to_vec()),
                    latest.map(<[u8]>::to_vec),
                    "{}",
                    subject
                );
            }
            Err(e) => return Err(fail(format!("{subject}: {e}"))),
        }
    }
    for ((s, version), (n, _)) in key_counts(v)? {
        prop_assert!(
            n <= limit,
            "{} v{} encrypted {} records, over {}",
            s,
            version,
            n,
            limit
        );
    }
    let report = v
        .check_derived_state()
        .map_err(|e| fail(format!("derived state: {e}")))?;
    prop_assert_eq!(report.differences, 0, "{:?}", report.sample);
    Ok(())
}

/// The secret that opens the vault: the passphrase it was made with, or
/// the key file of its latest master rotation.
fn secret(master: Option<(u64, u8)>) -> Unlock {
    match master {
        None => Unlock::passphrase(b"model".to_vec()),
        Some((_, b)) => key_file(b),
    }
}

/// Closes the vault, verifies its log with the pinned key, opens it again
/// with `unlock`, and checks that the reopened vault is the one closed.
fn close_and_reopen(
    vault: Arc<Vault>,
    dir: &std::path::Path,
    unlock: &Unlock,
    opts: Options,
    acked: &Acked,
    limit: u64,
) -> Result<Vault, TestCaseError> {
    check(&vault, acked, limit)?;
    let live = key_counts(&vault)?;
    let key = vault.public_key();
    let vault = Arc::into_inner(vault).ok_or_else(|| fail("the vault is still shared"))?;
    vault.close().map_err(|e| fail(format!("close: {e}")))?;
    let report = verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .map_err(|e| fail(format!("verify: {e}")))?;
    prop_assert!(report.ok(), "verify: {:?}", report.failure);
    let reopened = Vault::open(dir, unlock, opts).map_err(|e| fail(format!("reopen: {e}")))?;
    check(&reopened, acked, limit)?;
    prop_assert_eq!(
        &live,
        &key_counts(&reopened)?,
        "key status live and rebuilt"
    );
    Ok(reopened)
}

fn run_case(n: u32, c: &Case) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().map_err(fail)?;
    let dir = tmp.path().join("v");
    let opts = || Options {
        key_cache: c.key_cache,
        max_encryptions_per_key: c.limit,
        max_group_entries: c.group_entries,
        ..Options::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(fail)?;
    rt.block_on(async {
        let mut master = None;
        let mut vault = Arc::new(
            Vault::create(&dir, &secret(master), opts())
                .map_err(|e| fail(format!("create: {e}")))?
                .vault,
        );
        let mut acked = Acked::new();
        let mut refused = Vec::new();
        let r = vault
            .append(Append::record("gone", b"x".to_vec()))
            .await
            .map_err(fail)?;
        acked.insert(
            r.seq,
            ("gone".into(), Wrote::Record(b"x".to_vec()), r.entry_hash),
        );
        let r = vault.shred("gone").await.map_err(fail)?;
        acked.insert(r.seq, ("gone".into(), Wrote::Shred, r.entry_hash));
        for (i, (round, reopen)) in c.rounds.iter().enumerate() {
            let tasks: Vec<_> = round
                .iter()
                .enumerate()
                .map(|(j, op)| {
                    let tag = format!("c{n}r{i}o{j}");
                    tokio::spawn(run_op(vault.clone(), tag, op.clone()))
                })
                .collect();
            for t in tasks {
                let done = t.await.map_err(fail)??;
                refused.extend(done.refused);
                for (seq, s, w, h) in done.writes {
                    prop_assert!(acked.insert(seq, (s, w, h)).is_none(), "seq {} twice", seq);
                }
                // The latest master rotation in the log sets the secret.
                if done.master > master {
                    master = done.master;
                }
            }
            if *reopen || i + 1 == c.rounds.len() {
                let v = close_and_reopen(vault, &dir, &secret(master), opts(), &acked, c.limit)?;
                vault = Arc::new(v);
            }
        }
        // A batch refused for a shredded subject held one.
        let shredded: Vec<&str> = acked
            .values()
            .filter(|(_, w, _)| matches!(w, Wrote::Shred))
            .map(|(s, _, _)| s.as_str())
            .collect();
        for subjects in &refused {
            prop_assert!(
                subjects.iter().any(|s| shredded.contains(&s.as_str())),
                "a batch of {:?} refused as shredded",
                subjects
            );
        }
        let vault = Arc::into_inner(vault).ok_or_else(|| fail("the vault is still shared"))?;
        vault.close().map_err(|e| fail(format!("close: {e}")))?;
        Ok(())
    })
}

#[test]
fn random_rounds_of_requests_keep_the_log_and_its_state_as_acknowledged() {
    let mut runner = TestRunner::new(Config {
        // PROPTEST_CASES=N runs more.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&case(), |c| {
        let n = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        run_case(n, &c)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
