//! The key lifecycle through the public API: crypto-shredding (before and
//! after, across reopen, after a crash between the shred entry and the key
//! deletion), subject key rotation with and without re-encryption, the
//! per-key encryption limit, and key status.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{copy_dir, pending_value, scratch_dir};
use storage::crypto::{data_key_aad, record_aad, unwrap_key, SecretKey};
use storage::state::{data_key_name, data_key_prefix};
use storage::{
    verify, Append, Error, KeyLife, Kind, Options, RawStore, Reason, Report, TokenRefusal, Unlock,
    Vault, VerifyOptions,
};

fn unlock() -> Unlock {
    Unlock::passphrase(b"key lifecycle".to_vec())
}

fn report(dir: &Path, key: ed25519_dalek::VerifyingKey) -> Report {
    wait_unlocked(dir);
    verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .expect("verify runs")
}

fn verify_ok(dir: &Path, key: ed25519_dalek::VerifyingKey) -> Report {
    let r = report(dir, key);
    assert!(r.ok(), "verify failed: {:?}", r.failure);
    r
}

/// Waits until sled's background threads of a closed vault have let go of
/// the data dir's lock (see tamper.rs).
fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("open sled's data file");
    f.lock().expect("wait for sled's lock");
    drop(f);
}

fn reopen(dir: &Path) -> Vault {
    wait_unlocked(dir);
    Vault::open(dir, &unlock(), Options::default()).expect("reopen")
}

fn raw(dir: &Path) -> RawStore {
    wait_unlocked(dir);
    RawStore::open(dir).expect("raw open")
}

/// The master key, unsealed from a closed data dir.
fn master_of(raw: &RawStore) -> SecretKey {
    common::unseal_master(raw, &unlock()).0
}

/// Every data key left in the key store, unwrapped: (subject, version, key).
fn remaining_data_keys(raw: &RawStore, master: &SecretKey) -> Vec<(String, u32, SecretKey)> {
    let mut out = Vec::new();
    for kv in raw.keys.scan_prefix(b"dk/") {
        let (name, wrapped) = kv.expect("read keys");
        let rest = &name[3..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .expect("0x00 after subject");
        let subject = String::from_utf8(rest[..nul].to_vec()).expect("utf-8 subject");
        let version = u32::from_be_bytes(rest[nul + 1..].try_into().expect("u32 version"));
        let key = unwrap_key(master, &data_key_aad(&subject, version), &wrapped)
            .expect("every remaining key unwraps");
        out.push((subject, version, key));
    }
    out
}

#[tokio::test]
async fn shred_destroys_every_key_of_the_subject_and_only_those() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let vault = Vault::create(&dir, &unlock(), Options::default())
        .expect("create")
        .vault;
    let key = vault.public_key();
    let a1 = vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    let b1 = vault
        .append(Append::record("bob", b"{\"n\":2}".to_vec()))
        .await
        .expect("append");
    // Two key versions, so that the shred has more than one key to destroy.
    let rotated = vault
        .rotate_subject_key("alice", false)
        .await
        .expect("rotate");
    assert_eq!(rotated.version, 2);
    let a2 = vault
        .append(Append::record("alice", b"{\"n\":3}".to_vec()))
        .await
        .expect("append");
    assert_eq!(
        vault
            .latest_record("alice")
            .expect("read")
            .expect("some")
            .key_version,
        2
    );
    let fields = vec![("n".to_string(), "reveal".to_string())];
    let far = u64::MAX / 2;
    let token = vault
        .mint("lender-1", "alice", "kyc", fields.clone(), far)
        .await
        .expect("mint before the shred");

    let shred = vault.shred("alice").await.expect("shred");
    shred.verify(&key).expect("the shred's receipt verifies");
    let e = vault.entry(shred.seq).expect("read").expect("present");
    assert_eq!(e.kind, Kind::SubjectShredded);
    assert_eq!(e.payload, br#"{"version":2}"#);

    // Refusals, each with its typed error.
    assert!(matches!(
        vault.latest_record("alice"),
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault.record_at(a1.seq),
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault.append(Append::record("alice", b"{}".to_vec())).await,
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault
            .mint("lender-1", "alice", "kyc", fields.clone(), far)
            .await,
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault.redeem(&token, "lender-1", 0, None).await,
        Err(Error::TokenRefused(TokenRefusal::SubjectShredded))
    ));
    assert!(matches!(
        vault.shred("alice").await,
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault.rotate_subject_key("alice", true).await,
        Err(Error::SubjectShredded(_))
    ));
    assert!(matches!(
        vault.shred("nobody").await,
        Err(Error::NoSuchSubject(_))
    ));
    assert!(matches!(
        vault.shred("has space").await,
        Err(Error::Invalid(_))
    ));
    // Other subjects are untouched.
    let bob = vault.latest_record("bob").expect("read").expect("bob");
    assert_eq!(bob.plaintext.as_slice(), b"{\"n\":2}");
    vault
        .append(Append::record("bob", b"{\"n\":4}".to_vec()))
        .await
        .expect("bob still appends");
    let status = vault.key_status(None, 100).expect("status");
    let alice: Vec<_> = status
        .subject_keys
        .iter()
        .filter(|k| k.subject == "alice")
        .collect();
    assert_eq!(alice.len(), 2);
    assert!(alice.iter().all(|k| k.life == KeyLife::Shredded));
    vault.close().expect("close");

    // The log still holds alice's ciphertexts and verifies; verify names her.
    let r = verify_ok(&dir, key);
    assert_eq!(r.shredded, vec!["alice".to_string()]);
    assert!(r.shred_pending.is_empty());
    {
        let raw = raw(&dir);
        assert_eq!(raw.keys.scan_prefix(data_key_prefix("alice")).count(), 0);
        assert!(raw.keys.get("shredding").expect("read").is_none());
        let master = master_of(&raw);
        let keys = remaining_data_keys(&raw, &master);
        assert!(keys.iter().any(|(s, _, _)| s == "bob"), "bob's key remains");
        drop(raw);
        let vault = reopen(&dir);
        for seq in [a1.seq, a2.seq] {
            let e = vault.entry(seq).expect("read").expect("ciphertext stays");
            assert_eq!((e.kind, e.subject.as_str()), (Kind::Record, "alice"));
            let aad = record_aad("alice", seq, e.key_version);
            for (subject, version, k) in &keys {
                assert!(
                    k.open(&e.nonce, &aad, &e.payload).is_none(),
                    "seq {seq} opened under {subject} v{version}"
                );
            }
            assert!(master.open(&e.nonce, &aad, &e.payload).is_none());
        }
        // Reopened, alice stays shredded and bob stays readable.
        assert!(matches!(
            vault.latest_record("alice"),
            Err(Error::SubjectShredded(_))
        ));
        assert!(matches!(
            vault.append(Append::record("alice", b"{}".to_vec())).await,
            Err(Error::SubjectShredded(_))
        ));
        assert_eq!(
            vault
                .record_at(b1.seq)
                .expect("read")
                .expect("bob")
                .plaintext
                .as_slice(),
            b"{\"n\":2}"
        );
        let status = vault.key_status(None, 100).expect("status");
        assert!(status
            .subject_keys
            .iter()
            .filter(|k| k.subject == "alice")
            .all(|k| k.life == KeyLife::Shredded));
        vault.close().expect("close");
    }
    let r = verify_ok(&dir, key);
    assert_eq!(r.shredded, vec!["alice".to_string()]);
}

#[tokio::test]
async fn rotation_with_and_without_reencryption_across_reopen() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let vault = Vault::create(&dir, &unlock(), Options::default())
        .expect("create")
        .vault;
    let key = vault.public_key();
    let r1 = vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    vault
        .append(Append::record("bob", b"{\"b\":1}".to_vec()))
        .await
        .expect("append");

    // Without re-encryption: the old record stays under version 1.
    let rot = vault
        .rotate_subject_key("alice", false)
        .await
        .expect("rotate");
    assert_eq!(rot.version, 2);
    assert!(rot.reencrypted.is_none());
    rot.receipt.verify(&key).expect("receipt");
    let e = vault.entry(rot.receipt.seq).expect("read").expect("entry");
    assert_eq!(e.kind, Kind::KeyRotated);
    let payload: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
    assert_eq!(payload["key"], "subject");
    assert_eq!(payload["subject"], "alice");
    assert_eq!(payload["version"], 2);
    assert_eq!(payload["wrapped_hash"].as_str().map(str::len), Some(64));
    let latest = vault.latest_record("alice").expect("read").expect("some");
    assert_eq!((latest.seq, latest.key_version), (r1.seq, 1));
    let r2 = vault
        .append(Append::record("alice", b"{\"n\":2}".to_vec()))
        .await
        .expect("append");
    let rec2 = vault.record_at(r2.seq).expect("read").expect("record");
    assert_eq!(rec2.key_version, 2, "new records use the new version");

    // With re-encryption: the latest record is appended again under v3.
    let rot = vault
        .rotate_subject_key("alice", true)
        .await
        .expect("rotate and re-encrypt");
    assert_eq!(rot.version, 3);
    let re = rot.reencrypted.expect("a re-encrypted record");
    assert_eq!(re.seq, rot.receipt.seq + 1);
    re.verify(&key).expect("receipt");
    let latest = vault.latest_record("alice").expect("read").expect("some");
    assert_eq!((latest.seq, latest.key_version), (re.seq, 3));
    assert_eq!(latest.plaintext.as_slice(), b"{\"n\":2}");
    // Old versions still open the old records.
    let check_old = |v: &Vault| {
        let old1 = v.record_at(r1.seq).expect("read").expect("record");
        assert_eq!(
            (old1.key_version, old1.plaintext.as_slice()),
            (1, &b"{\"n\":1}"[..])
        );
        let old2 = v.record_at(r2.seq).expect("read").expect("record");
        assert_eq!(
            (old2.key_version, old2.plaintext.as_slice()),
            (2, &b"{\"n\":2}"[..])
        );
    };
    check_old(&vault);
    assert!(matches!(
        vault.rotate_subject_key("nobody", false).await,
        Err(Error::NoSuchSubject(_))
    ));
    // A rotation with re-encryption racing appends of the same subject,
    // which may share its commit group or be on their way to the writer.
    let v2 = std::sync::Arc::new(vault);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let v = v2.clone();
        tasks.push(tokio::spawn(async move {
            v.append(Append::record(
                "carol",
                format!("{{\"i\":{i}}}").into_bytes(),
            ))
            .await
            .expect("append carol")
        }));
    }
    let rot_carol = {
        // carol may not exist yet when the rotation is committed.
        loop {
            match v2.rotate_subject_key("carol", true).await {
                Ok(r) => break r,
                Err(Error::NoSuchSubject(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("rotate carol: {e}"),
            }
        }
    };
    for t in tasks {
        t.await.expect("task");
    }
    assert!(rot_carol.version >= 2);
    let vault = std::sync::Arc::try_unwrap(v2).expect("sole owner");

    let status = vault.key_status(None, 100).expect("status");
    let alice: Vec<(u32, u64, KeyLife)> = status
        .subject_keys
        .iter()
        .filter(|k| k.subject == "alice")
        .map(|k| (k.version, k.encryptions, k.life))
        .collect();
    assert_eq!(
        alice,
        vec![
            (1, 1, KeyLife::Retired),
            (2, 1, KeyLife::Retired),
            (3, 1, KeyLife::Active)
        ]
    );
    let before = status.clone();
    vault.close().expect("close");
    let r = verify_ok(&dir, key);
    assert!(r.shredded.is_empty());

    // Across reopen: the same key status, rebuilt from the log; old
    // records readable; new ones under the latest version.
    let vault = reopen(&dir);
    assert_eq!(vault.key_status(None, 100).expect("status"), before);
    check_old(&vault);
    let carol = vault.latest_record("carol").expect("read").expect("carol");
    assert!(carol.key_version >= 2);
    let r4 = vault
        .append(Append::record("alice", b"{\"n\":4}".to_vec()))
        .await
        .expect("append");
    assert_eq!(
        vault
            .record_at(r4.seq)
            .expect("read")
            .expect("r")
            .key_version,
        3
    );
    // Paging through key status by (subject, version).
    let first = vault.key_status(None, 2).expect("page");
    assert_eq!(first.subject_keys.len(), 2);
    assert!(first.more);
    let last = first.subject_keys.last().expect("last");
    let next = vault
        .key_status(Some((&last.subject, last.version)), 100)
        .expect("page");
    assert!(!next.more);
    let all = vault.key_status(None, 100).expect("all");
    assert_eq!(
        first.subject_keys.len() + next.subject_keys.len(),
        all.subject_keys.len()
    );
    assert_eq!(all.master_wraps, 1 + all.subject_keys.len() as u64);
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test]
async fn the_encryption_limit_rotates_keys_by_itself() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let opts = || Options {
        max_encryptions_per_key: 3,
        ..Options::default()
    };
    let vault = Vault::create(&dir, &unlock(), opts())
        .expect("create")
        .vault;
    let key = vault.public_key();
    let mut versions = Vec::new();
    for i in 0..7 {
        let r = vault
            .append(Append::record("alice", format!("{i}").into_bytes()))
            .await
            .expect("append");
        versions.push(
            vault
                .record_at(r.seq)
                .expect("read")
                .expect("r")
                .key_version,
        );
    }
    assert_eq!(versions, vec![1, 1, 1, 2, 2, 2, 3]);
    // A batch crossing the limit rotates inside the group.
    let batch: Vec<Append> = (0..4)
        .map(|i| Append::record("bob", vec![b'0' + i]))
        .collect();
    let rs = vault.append_batch(batch).await.expect("batch");
    let bob: Vec<u32> = rs
        .iter()
        .map(|r| {
            vault
                .record_at(r.seq)
                .expect("read")
                .expect("r")
                .key_version
        })
        .collect();
    assert_eq!(bob, vec![1, 1, 1, 2]);
    let status = vault.key_status(None, 100).expect("status");
    assert_eq!(status.encryption_limit, 3);
    assert!(status.subject_keys.iter().all(|k| k.encryptions <= 3));
    vault.close().expect("close");
    verify_ok(&dir, key);

    // The count survives a reopen: v3 has 1 record, so two more fit.
    wait_unlocked(&dir);
    let vault = Vault::open(&dir, &unlock(), opts()).expect("reopen");
    let mut versions = Vec::new();
    for i in 0..3 {
        let r = vault
            .append(Append::record("alice", format!("again {i}").into_bytes()))
            .await
            .expect("append");
        versions.push(
            vault
                .record_at(r.seq)
                .expect("read")
                .expect("r")
                .key_version,
        );
    }
    assert_eq!(versions, vec![3, 3, 4]);
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// A vault with alice (two key versions) and bob, closed; returns its key.
async fn two_subjects(dir: &Path) -> ed25519_dalek::VerifyingKey {
    let vault = Vault::create(dir, &unlock(), Options::default())
        .expect("create")
        .vault;
    vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    vault
        .rotate_subject_key("alice", true)
        .await
        .expect("rotate");
    vault
        .append(Append::record("bob", b"{\"n\":2}".to_vec()))
        .await
        .expect("append");
    let key = vault.public_key();
    vault.close().expect("close");
    key
}

/// A shredded subject's wrapped key is refused wherever it is kept in the
/// key store, the places where a crash's leftovers are let be included:
/// staged for a master rotation that never reached the log, under a name
/// a pending marker of a group to come names, or as a "name" in the
/// marker of a group that did reach it.
#[tokio::test]
async fn a_shredded_key_kept_among_a_crash_s_leftovers_is_refused() {
    use storage::vault::{pending_name, ROTATING, STAGED};
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = two_subjects(&dir).await;
    let alice = data_key_name("alice", 1);
    let bob = data_key_name("bob", 1);
    let kept = raw(&dir)
        .keys
        .get(&alice)
        .expect("read")
        .expect("alice's key")
        .to_vec();
    let vault = reopen(&dir);
    vault.shred("alice").await.expect("shred");
    let next = vault.durable_len();
    vault.close().expect("close");
    verify_ok(&dir, key);
    let shredded = tmp.path().join("shredded");
    wait_unlocked(&dir);
    copy_dir(&dir, &shredded);

    let unused = data_key_name("carol", 1);
    type Writes = Vec<(Vec<u8>, Vec<u8>)>;
    let cases: Vec<(&str, Writes)> = vec![
        (
            "staged for bob under a rotation to come",
            vec![
                (ROTATING.to_vec(), u64::MAX.to_be_bytes().to_vec()),
                ([STAGED, &bob].concat(), kept.clone()),
            ],
        ),
        (
            "staged for a key the log does not hold",
            vec![
                (ROTATING.to_vec(), u64::MAX.to_be_bytes().to_vec()),
                ([STAGED, b"stash"].concat(), vec![1; 60]),
            ],
        ),
        (
            "under a name a group to come creates",
            vec![
                (
                    pending_name(next),
                    pending_value(next, std::slice::from_ref(&unused)),
                ),
                (unused.clone(), kept.clone()),
            ],
        ),
        (
            "in the marker of a group the log holds",
            vec![(
                pending_name(1),
                pending_value(1, std::slice::from_ref(&kept)),
            )],
        ),
    ];
    for (i, (case, writes)) in cases.into_iter().enumerate() {
        let d = tmp.path().join(format!("case-{i}"));
        copy_dir(&shredded, &d);
        {
            let r = raw(&d);
            for (k, v) in &writes {
                r.keys.insert(k.as_slice(), v.as_slice()).expect("write");
            }
            r.flush().expect("flush");
        }
        let r = report(&d, key);
        assert!(
            matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
            "{case}: {:?}",
            r.failure
        );
    }
}

fn shredding_marker(first_seq: u64, subjects: &[&str]) -> Vec<u8> {
    let mut v = first_seq.to_be_bytes().to_vec();
    for s in subjects {
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
    }
    v
}

#[tokio::test]
async fn a_shred_interrupted_before_its_keys_were_deleted_is_finished_at_open() {
    // The crash window of a shred: its entry is durable in the log, but a
    // crash came before step 3 deleted the keys. Built here by putting the
    // keys (and the marker written in step 1) back after a completed shred.
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = two_subjects(&dir).await;
    let saved: Vec<(Vec<u8>, Vec<u8>)> = raw(&dir)
        .keys
        .scan_prefix(data_key_prefix("alice"))
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read"))
        .collect();
    assert_eq!(saved.len(), 2);
    let vault = reopen(&dir);
    let shred = vault.shred("alice").await.expect("shred");
    vault.close().expect("close");
    verify_ok(&dir, key);
    let shredded = tmp.path().join("shredded");
    wait_unlocked(&dir);
    copy_dir(&dir, &shredded);

    let put_back = |name: &str, marker: Option<Vec<u8>>| {
        let d = tmp.path().join(name);
        copy_dir(&shredded, &d);
        let r = raw(&d);
        for (k, v) in &saved {
            r.keys.insert(k.as_slice(), v.as_slice()).expect("write");
        }
        if let Some(m) = marker {
            r.keys.insert("shredding", m).expect("write");
        }
        r.flush().expect("flush");
        drop(r);
        d
    };

    // With the marker: verify accepts and reports it, open finishes it.
    let crashed = put_back("crashed", Some(shredding_marker(shred.seq, &["alice"])));
    let r = verify_ok(&crashed, key);
    assert_eq!(r.shred_pending, vec!["alice".to_string()]);
    let vault = reopen(&crashed);
    assert!(matches!(
        vault.latest_record("alice"),
        Err(Error::SubjectShredded(_))
    ));
    assert_eq!(
        vault
            .latest_record("bob")
            .expect("read")
            .expect("bob")
            .plaintext
            .as_slice(),
        b"{\"n\":2}"
    );
    vault.close().expect("close");
    let r = verify_ok(&crashed, key);
    assert!(r.shred_pending.is_empty());
    let after = raw(&crashed);
    assert_eq!(after.keys.scan_prefix(data_key_prefix("alice")).count(), 0);
    assert!(after.keys.get("shredding").expect("read").is_none());
    drop(after);

    // The same leftovers with a group after the shred's in the log: no
    // crash leaves them so (that group's write follows the step that
    // deletes them), so they are destroyed keys restored, marker and all.
    let later = tmp.path().join("later");
    copy_dir(&shredded, &later);
    let vault = reopen(&later);
    vault
        .append(Append::record("bob", b"{\"n\":3}".to_vec()))
        .await
        .expect("a later group");
    vault.close().expect("close");
    wait_unlocked(&later);
    {
        let r = raw(&later);
        for (k, v) in &saved {
            r.keys.insert(k.as_slice(), v.as_slice()).expect("write");
        }
        r.keys
            .insert("shredding", shredding_marker(shred.seq, &["alice"]))
            .expect("write");
        r.flush().expect("flush");
    }
    let r = report(&later, key);
    assert!(
        matches!(&r.failure, Some((_, Reason::KeyMismatch(m))) if m.contains("not the log's last")),
        "{:?}",
        r.failure
    );
    wait_unlocked(&later);
    assert!(Vault::open(&later, &unlock(), Options::default()).is_err());

    // Without the marker, a shredded key back in the store is tampering.
    let no_marker = put_back("no-marker", None);
    let r = report(&no_marker, key);
    assert!(
        matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
        "{:?}",
        r.failure
    );
    wait_unlocked(&no_marker);
    assert!(matches!(
        Vault::open(&no_marker, &unlock(), Options::default()),
        Err(Error::Integrity {
            reason: Reason::KeyMismatch(_),
            ..
        })
    ));

    // A forged marker naming a live subject must not make open delete its keys.
    let forged = tmp.path().join("forged");
    copy_dir(&shredded, &forged);
    {
        let r = raw(&forged);
        r.keys
            .insert("shredding", shredding_marker(shred.seq, &["bob"]))
            .expect("write");
        r.flush().expect("flush");
    }
    let r = report(&forged, key);
    assert!(
        matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
        "{:?}",
        r.failure
    );
    wait_unlocked(&forged);
    assert!(Vault::open(&forged, &unlock(), Options::default()).is_err());
    assert!(raw(&forged)
        .keys
        .get(data_key_name("bob", 1))
        .expect("read")
        .is_some());
}

#[tokio::test]
async fn a_shred_that_never_reached_the_log_did_not_happen() {
    // Crash after step 1 (the marker) and before the log write: the next
    // open drops the marker and the subject is as it was.
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = two_subjects(&dir).await;
    let entries = verify_ok(&dir, key).entries;
    {
        let r = raw(&dir);
        r.keys
            .insert("shredding", shredding_marker(entries, &["alice"]))
            .expect("write");
        r.flush().expect("flush");
    }
    let r = verify_ok(&dir, key);
    assert!(r.shred_pending.is_empty() && r.shredded.is_empty());
    let vault = reopen(&dir);
    assert!(vault.latest_record("alice").expect("read").is_some());
    vault.close().expect("close");
    assert!(raw(&dir).keys.get("shredding").expect("read").is_none());
    verify_ok(&dir, key);
}

/// A subject's first record and its shred in one commit group: the key
/// the group creates is destroyed by the same group, although sled does
/// not hold it yet when the group's write-ahead record is built. Pairs of
/// a first record and a shred are sent together, so that many of them
/// share a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_and_shredded_in_one_group_is_gone() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let vault = std::sync::Arc::new(
        Vault::create(&dir, &unlock(), Options::default())
            .expect("create")
            .vault,
    );
    let key = vault.public_key();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let subject = format!("pair-{i}");
        let v = vault.clone();
        let s = subject.clone();
        tasks.push(tokio::spawn(async move {
            v.append(Append::record(s, b"{}".to_vec()))
                .await
                .map(|_| ())
        }));
        let v = vault.clone();
        tasks.push(tokio::spawn(
            async move { v.shred(&subject).await.map(|_| ()) },
        ));
    }
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) | Err(Error::SubjectShredded(_) | Error::NoSuchSubject(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let vault = std::sync::Arc::into_inner(vault).expect("the last handle");
    vault.close().expect("close");
    let r = verify_ok(&dir, key);
    assert!(!r.shredded.is_empty());
    let raw = raw(&dir);
    for s in &r.shredded {
        assert_eq!(raw.keys.scan_prefix(data_key_prefix(s)).count(), 0);
    }
}

const CHILD_ENV: &str = "FINTRUST_TEST_SHRED_CHILD_DIR";

/// Runs only as the child: appends and shreds until killed.
#[test]
fn shred_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let vault = std::sync::Arc::new(
            Vault::open(Path::new(&dir), &unlock(), Options::default()).expect("child open"),
        );
        let pid = std::process::id();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let v = vault.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    // Records for subjects that are being shredded meanwhile.
                    let subject = format!("p{pid}-s{}", (i + t) % 50);
                    match v.append(Append::record(subject, vec![b'x'; 40])).await {
                        Ok(_) | Err(Error::SubjectShredded(_)) => {}
                        Err(e) => panic!("append: {e}"),
                    }
                }
            }));
        }
        for i in 0u64.. {
            let subject = format!("p{pid}-s{}", i % 50);
            vault
                .append(Append::record(subject.clone(), b"{}".to_vec()))
                .await
                .ok();
            match vault.shred(&subject).await {
                Ok(_) => println!("shredded {subject}"),
                Err(Error::SubjectShredded(_)) => {}
                Err(e) => panic!("shred: {e}"),
            }
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

/// Runs the test `name` of this binary as a child process working on
/// `dir` (passed in the variable `env`), with its stdout as lines.
fn spawn_child(
    exe: &Path,
    name: &str,
    env: &str,
    dir: &Path,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
) {
    let mut child = Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(env, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    (child, BufReader::new(stdout).lines())
}

#[test]
fn acknowledged_shreds_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let key = created.vault.public_key();
    created.vault.close().expect("close");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Vec<String> = Vec::new();
    for (cycle, kill_after) in [3usize, 11, 7].into_iter().enumerate() {
        wait_unlocked(&dir);
        let (mut child, mut lines) = spawn_child(&exe, "shred_child", CHILD_ENV, &dir);
        let mut seen = 0;
        while seen < kill_after {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(s) = line.strip_prefix("shredded ") {
                acked.push(s.to_string());
                seen += 1;
            }
        }
        // SIGKILL: no destructors, no flush.
        child.kill().expect("kill");
        let _ = child.wait();
        for line in lines.map_while(Result::ok) {
            if let Some(s) = line.strip_prefix("shredded ") {
                acked.push(s.to_string());
            }
        }
        assert!(seen > 0, "cycle {cycle}: the child acknowledged no shred");

        // Open finishes any interrupted shred; every acknowledged one holds.
        wait_unlocked(&dir);
        let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen after kill");
        for s in &acked {
            assert!(
                matches!(vault.latest_record(s), Err(Error::SubjectShredded(_))),
                "cycle {cycle}: acknowledged shred lost"
            );
        }
        vault.close().expect("close");
        let r = verify_ok(&dir, key);
        assert!(r.shred_pending.is_empty());
        for s in &acked {
            assert!(r.shredded.contains(s));
        }
        let raw = raw(&dir);
        for s in &r.shredded {
            assert_eq!(raw.keys.scan_prefix(data_key_prefix(s)).count(), 0);
        }
    }
}

// ---- Master key rotation ----

fn new_unlock() -> Unlock {
    Unlock::passphrase(b"the new master passphrase".to_vec())
}

fn open_with(dir: &Path, unlock: &Unlock) -> storage::Result<Vault> {
    wait_unlocked(dir);
    Vault::open(dir, unlock, Options::default())
}

fn latest(vault: &Vault, subject: &str) -> Vec<u8> {
    vault
        .latest_record(subject)
        .expect("read")
        .expect("a record")
        .plaintext
        .to_vec()
}

/// Every key of the store, sorted: (name, value).
fn key_tree(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    raw(dir)
        .keys
        .iter()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("read"))
        .collect()
}

/// A vault with alice (two key versions), bob, and carol shredded.
async fn three_subjects(dir: &Path) -> ed25519_dalek::VerifyingKey {
    let key = two_subjects(dir).await;
    let vault = reopen(dir);
    vault
        .append(Append::record("carol", b"{\"n\":3}".to_vec()))
        .await
        .expect("append");
    vault.shred("carol").await.expect("shred");
    vault.close().expect("close");
    key
}

#[tokio::test]
async fn master_rotation_rewraps_every_key_and_only_the_new_secret_opens() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = three_subjects(&dir).await;
    let vault = reopen(&dir);
    let mask = vault.mask_secret();
    let receipt = vault
        .rotate_master_key(&new_unlock())
        .await
        .expect("rotate");
    let e = vault.entry(receipt.seq).expect("read").expect("entry");
    assert_eq!(e.kind, Kind::KeyRotated);
    let payload: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
    assert_eq!(payload["key"], "master");
    assert_eq!(
        payload["rewrapped"], 4,
        "signing key 0, alice 1 and 2, bob 1"
    );
    assert!(payload["mask_key_hash"].is_string());
    // The running vault reads with the new master, and wraps new keys with it.
    assert_eq!(latest(&vault, "alice"), b"{\"n\":1}");
    assert_eq!(latest(&vault, "bob"), b"{\"n\":2}");
    vault
        .append(Append::record("dave", b"{\"n\":4}".to_vec()))
        .await
        .expect("append after the rotation");
    assert_eq!(*vault.mask_secret(), *mask, "masking survives the rotation");
    let status = vault.key_status(None, 100).expect("status");
    assert_eq!(status.master_created_ms, e.timestamp_ms);
    vault.close().expect("close");
    let r = verify_ok(&dir, key);
    assert_eq!(r.shredded, vec!["carol".to_string()]);
    let tree = key_tree(&dir);
    assert!(
        tree.iter()
            .all(|(k, _)| !k.starts_with(b"next/") && k.as_slice() != b"rotating"),
        "no staged key or marker is left"
    );

    // The old secret is refused with the typed error; the new one opens.
    assert!(matches!(
        open_with(&dir, &unlock()),
        Err(Error::WrongSecret)
    ));
    let vault = open_with(&dir, &new_unlock()).expect("open with the new secret");
    for (s, v) in [("alice", "1"), ("bob", "2"), ("dave", "4")] {
        assert_eq!(latest(&vault, s), format!("{{\"n\":{v}}}").as_bytes());
    }
    assert!(matches!(
        vault.latest_record("carol"),
        Err(Error::SubjectShredded(_))
    ));
    assert_eq!(*vault.mask_secret(), *mask);
    // The old alice record, under key version 1, still opens.
    let first_alice = (0..vault.durable_len())
        .find_map(|s| {
            let e = vault.entry(s).ok()??;
            (e.kind == Kind::Record && e.subject == "alice" && e.key_version == 1).then_some(s)
        })
        .expect("alice's first record");
    assert!(vault.record_at(first_alice).expect("read").is_some());

    // A second rotation, to a key file: the mask key is re-wrapped too.
    let kf = Unlock::key_file(&[9u8; 32]).expect("key file");
    let receipt = vault.rotate_master_key(&kf).await.expect("rotate again");
    let e = vault.entry(receipt.seq).expect("read").expect("entry");
    let payload: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
    assert_eq!(
        payload["rewrapped"], 6,
        "signing, alice 1-2, bob, dave, mask"
    );
    assert!(payload.get("mask_key_hash").is_none());
    vault
        .append(Append::record("bob", b"{\"n\":5}".to_vec()))
        .await
        .expect("append");
    vault.close().expect("close");
    verify_ok(&dir, key);
    assert!(matches!(
        open_with(&dir, &new_unlock()),
        Err(Error::Invalid(_) | Error::WrongSecret)
    ));
    let vault = open_with(&dir, &Unlock::key_file(&[9u8; 32]).expect("kf")).expect("open");
    assert_eq!(latest(&vault, "bob"), b"{\"n\":5}");
    assert_eq!(latest(&vault, "dave"), b"{\"n\":4}");
    assert_eq!(*vault.mask_secret(), *mask);
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// A write-ahead segment of an earlier time put back in the data dir (a
/// restore that mixed in an old `wal` dir) holds a master rotation that a
/// later one superseded: the replay does not apply its key swap again
/// over the current keys, and the current secret still opens the vault.
#[tokio::test]
async fn an_old_write_ahead_segment_does_not_bring_back_a_superseded_master() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = three_subjects(&dir).await;
    let vault = reopen(&dir);
    vault
        .rotate_master_key(&new_unlock())
        .await
        .expect("rotate");
    let old: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(dir.join("wal"))
        .expect("the wal dir")
        .map(|e| {
            let path = e.expect("an entry").path();
            let bytes = std::fs::read(&path).expect("a segment");
            (path, bytes)
        })
        .collect();
    assert!(!old.is_empty(), "the rotation's segment");
    let kf = || Unlock::key_file(&[9u8; 32]).expect("key file");
    vault.rotate_master_key(&kf()).await.expect("rotate again");
    vault
        .append(Append::record("bob", b"{\"n\":5}".to_vec()))
        .await
        .expect("append");
    vault.close().expect("close");
    for (path, bytes) in &old {
        std::fs::write(path, bytes).expect("put the old segment back");
    }
    let vault = open_with(&dir, &kf()).expect("the current secret opens");
    assert_eq!(latest(&vault, "bob"), b"{\"n\":5}");
    assert_eq!(latest(&vault, "alice"), b"{\"n\":1}");
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_rotation_under_concurrent_appends() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let key = created.vault.public_key();
    let vault = std::sync::Arc::new(created.vault);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let v = vault.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                // New subjects keep creating keys that the master must wrap.
                let subject = format!("s{t}-{}", i % 10);
                v.append(Append::record(
                    subject,
                    format!("{{\"i\":{i}}}").into_bytes(),
                ))
                .await
                .expect("append during rotation");
            }
        }));
    }
    for _ in 0..2 {
        vault
            .rotate_master_key(&new_unlock())
            .await
            .expect("rotate");
    }
    for t in tasks {
        t.await.expect("task");
    }
    let vault = std::sync::Arc::into_inner(vault).expect("last handle");
    vault.close().expect("close");
    verify_ok(&dir, key);
    let vault = open_with(&dir, &new_unlock()).expect("open with the new secret");
    for t in 0..4 {
        for i in 30..40 {
            assert_eq!(
                latest(&vault, &format!("s{t}-{}", i % 10)),
                format!("{{\"i\":{i}}}").as_bytes()
            );
        }
    }
    vault.close().expect("close");
}

/// The keys of `rotated` (the vault after a completed master rotation)
/// staged over those of `before` (the same vault just before it), as a
/// crash between the rotation's steps leaves them: every value of
/// `rotated` under `"next/" name`, every value of `before` under its name,
/// and the marker naming the rotation's group.
fn stage(dir: &Path, before: &[(Vec<u8>, Vec<u8>)], rotated: &[(Vec<u8>, Vec<u8>)], first: u64) {
    let r = raw(dir);
    r.keys.clear().expect("clear");
    for (k, v) in before {
        r.keys.insert(k.as_slice(), v.as_slice()).expect("write");
    }
    for (k, v) in rotated {
        r.keys
            .insert([b"next/".as_slice(), k].concat(), v.as_slice())
            .expect("write");
    }
    r.keys
        .insert("rotating", &first.to_be_bytes())
        .expect("write");
    r.flush().expect("flush");
}

#[tokio::test]
async fn a_crash_in_a_master_rotation_leaves_exactly_one_secret() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = three_subjects(&dir).await;
    let before_dir = tmp.path().join("before");
    wait_unlocked(&dir);
    copy_dir(&dir, &before_dir);
    let before = key_tree(&dir);
    let vault = reopen(&dir);
    let first = vault.durable_len();
    vault
        .rotate_master_key(&new_unlock())
        .await
        .expect("rotate");
    vault.close().expect("close");
    let rotated: Vec<(Vec<u8>, Vec<u8>)> = key_tree(&dir)
        .into_iter()
        .filter(|(k, _)| k.as_slice() != b"pending")
        .collect();

    let check_reads = |vault: &Vault| {
        assert_eq!(latest(vault, "alice"), b"{\"n\":1}");
        assert_eq!(latest(vault, "bob"), b"{\"n\":2}");
        assert!(matches!(
            vault.latest_record("carol"),
            Err(Error::SubjectShredded(_))
        ));
    };

    // Crash after step 1 (staged keys written, the log not): the rotation
    // did not happen. Only the old secret opens; open drops the staging.
    let step1 = tmp.path().join("step1");
    copy_dir(&before_dir, &step1);
    stage(&step1, &before, &rotated, first);
    verify_ok(&step1, key);
    assert!(matches!(
        open_with(&step1, &new_unlock()),
        Err(Error::WrongSecret)
    ));
    let vault = open_with(&step1, &unlock()).expect("old secret opens");
    check_reads(&vault);
    vault.close().expect("close");
    assert_eq!(
        key_tree(&step1),
        before,
        "staging dropped, nothing else changed"
    );
    verify_ok(&step1, key);

    // Crash after step 2 (the log holds the rotation, the swap did not
    // happen): the rotation is committed. Only the new secret opens; open
    // finishes the swap.
    let step2 = tmp.path().join("step2");
    copy_dir(&dir, &step2);
    stage(&step2, &before, &rotated, first);
    verify_ok(&step2, key);
    assert!(matches!(
        open_with(&step2, &unlock()),
        Err(Error::WrongSecret)
    ));
    let vault = open_with(&step2, &new_unlock()).expect("new secret opens");
    check_reads(&vault);
    vault
        .append(Append::record("erin", b"{\"n\":6}".to_vec()))
        .await
        .expect("append");
    vault.close().expect("close");
    let after: Vec<(Vec<u8>, Vec<u8>)> = key_tree(&step2);
    assert!(after
        .iter()
        .all(|(k, _)| !k.starts_with(b"next/") && k.as_slice() != b"rotating"));
    for (k, v) in &rotated {
        assert!(after.contains(&(k.clone(), v.clone())), "swapped in: {k:?}");
    }
    verify_ok(&step2, key);

    // After step 3 (the completed rotation): the new secret only.
    assert!(matches!(
        open_with(&dir, &unlock()),
        Err(Error::WrongSecret)
    ));
    let vault = open_with(&dir, &new_unlock()).expect("open");
    check_reads(&vault);
    vault.close().expect("close");

    // In the committed state, an old key that is not the one the rotation
    // replaced is tampering.
    let forged = tmp.path().join("forged");
    copy_dir(&dir, &forged);
    let mut tampered = before.clone();
    for (k, v) in tampered.iter_mut() {
        if k.starts_with(b"signing/") {
            v[20] ^= 1;
        }
    }
    stage(&forged, &tampered, &rotated, first);
    let r = report(&forged, key);
    assert!(
        matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
        "{:?}",
        r.failure
    );
    // A key left wrapped under the old master after a completed rotation is
    // a mismatch too (the log committed to the re-wrapped one).
    let stale = tmp.path().join("stale");
    copy_dir(&dir, &stale);
    {
        let r = raw(&stale);
        let (k, v) = before
            .iter()
            .find(|(k, _)| k.starts_with(b"dk/bob"))
            .expect("bob's key");
        r.keys.insert(k.as_slice(), v.as_slice()).expect("write");
        r.flush().expect("flush");
    }
    let r = report(&stale, key);
    assert!(
        matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
        "{:?}",
        r.failure
    );
}

// ---- Signing key rotation ----

/// The key chain a client builds from the pinned key and the vault's
/// endorsements.
fn chain_of(vault: &Vault, pinned: ed25519_dalek::VerifyingKey) -> storage::KeyChain {
    storage::KeyChain::from_endorsements(pinned, &vault.key_chain()).expect("the chain verifies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_rotation_chains_keys_and_every_receipt_still_verifies() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let pinned = created.vault.public_key();
    let before = created
        .vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    created.vault.close().expect("close");
    let signing0 = key_tree(&dir)
        .into_iter()
        .find(|(k, _)| k.as_slice() == b"signing/\0\0\0\0")
        .expect("signing key 0")
        .1;
    let vault = std::sync::Arc::new(reopen(&dir));

    // Rotations while four tasks append.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let v = vault.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in 0..30 {
                let subject = format!("s{t}-{}", i % 5);
                let r = v
                    .append(Append::record(
                        subject,
                        format!("{{\"i\":{i}}}").into_bytes(),
                    ))
                    .await
                    .expect("append during a signing rotation");
                receipts.push(r);
            }
            receipts
        }));
    }
    let (rotation, endorsement) = vault.rotate_signing_key().await.expect("rotate");
    assert_eq!(endorsement.key_id, 1);
    assert_eq!(endorsement.seq, rotation.seq);
    assert_eq!(rotation.head.key_id, 0, "the old key signs the rotation");
    rotation
        .verify(&pinned)
        .expect("the rotation verifies with the pinned key");
    assert!(endorsement.verify(&pinned));
    let (second, e2) = vault.rotate_signing_key().await.expect("rotate again");
    assert_eq!((e2.key_id, second.head.key_id), (2, 1));
    let mut receipts = vec![before];
    for t in tasks {
        receipts.extend(t.await.expect("task"));
    }
    let after = vault
        .append(Append::record("alice", b"{\"n\":2}".to_vec()))
        .await
        .expect("append");
    receipts.push(after.clone());
    assert_eq!(after.head.key_id, 2);
    assert_eq!(vault.signing_key_id(), 2);
    assert!(
        after.verify(&pinned).is_err(),
        "a head of key 2 does not verify with key 0"
    );
    let chain = chain_of(&vault, pinned);
    assert_eq!(chain.current_id(), 2);
    for r in &receipts {
        r.verify_chain(&chain)
            .expect("every receipt verifies with the chain");
    }
    assert_eq!(
        storage::KeyChain::from_endorsements(pinned, &vault.key_chain()[1..]).err(),
        Some(storage::chunk::ChainError::OutOfOrder {
            index: 0,
            found: 2,
            expected: 1
        }),
        "a chain that skips a key is refused"
    );
    let status = vault.key_status(None, 10).expect("status");
    assert_eq!(status.signing_key_id, 2);

    // A master rotation re-wraps the current signing key only: the retired
    // ones are gone.
    vault
        .rotate_master_key(&new_unlock())
        .await
        .expect("master rotation");
    let vault = std::sync::Arc::into_inner(vault).expect("last handle");
    vault.close().expect("close");
    let r = verify_ok(&dir, pinned);
    assert_eq!(r.signing_keys.len(), 2);
    assert!(r.retired_signing_pending.is_empty());
    let names: Vec<Vec<u8>> = key_tree(&dir)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(b"signing/"))
        .collect();
    assert_eq!(names, vec![b"signing/\0\0\0\x02".to_vec()]);

    // Reopened, the vault signs with key 2 and reads everything.
    let vault = open_with(&dir, &new_unlock()).expect("reopen");
    assert_eq!(vault.signing_key_id(), 2);
    let r = vault
        .append(Append::record("bob", b"{}".to_vec()))
        .await
        .expect("append");
    assert_eq!(r.head.key_id, 2);
    r.verify_chain(&chain_of(&vault, pinned)).expect("verifies");
    assert_eq!(latest(&vault, "alice"), b"{\"n\":2}");
    vault.close().expect("close");

    // A crash between a rotation's log write and the old key's deletion
    // leaves the retired key behind, when that rotation is the log's last
    // group: verify accepts it, open deletes it.
    let signing2 = key_tree(&dir)
        .into_iter()
        .find(|(k, _)| k.as_slice() == b"signing/\0\0\0\x02")
        .expect("signing key 2")
        .1;
    let vault = open_with(&dir, &new_unlock()).expect("open");
    let (_, e3) = vault
        .rotate_signing_key()
        .await
        .expect("rotate a third time");
    assert_eq!(e3.key_id, 3);
    vault.close().expect("close");
    let leftover = raw(&dir);
    leftover
        .keys
        .insert(b"signing/\0\0\0\x02".as_slice(), signing2.as_slice())
        .expect("put the retired key back");
    drop(leftover);
    // Key 2's wrapped bytes are those the master rotation committed to,
    // then the last group destroyed.
    let r = verify_ok(&dir, pinned);
    assert_eq!(r.retired_signing_pending, vec![2]);
    let vault = open_with(&dir, &new_unlock()).expect("open");
    vault.close().expect("close");
    let r = verify_ok(&dir, pinned);
    assert!(r.retired_signing_pending.is_empty());
    assert!(key_tree(&dir)
        .iter()
        .all(|(k, _)| k.as_slice() != b"signing/\0\0\0\x02"));

    // Key 0's bytes put under `name` are a key-store mismatch; taken out
    // again, the store is as it was.
    let mismatch_with_key_0_at = |name: &[u8]| {
        let planted = raw(&dir);
        planted
            .keys
            .insert(name, signing0.as_slice())
            .expect("plant a key");
        drop(planted);
        let r = report(&dir, pinned);
        assert!(
            matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
            "{name:?}: {:?}",
            r.failure
        );
        let planted = raw(&dir);
        planted.keys.remove(name).expect("take it out again");
        drop(planted);
    };
    // A key retired by an earlier rotation is not one a crash can leave:
    // put back, it is a destroyed key restored.
    mismatch_with_key_0_at(b"signing/\0\0\0\0");
    // Any other signing key in the store (key 3 is the current one) is a
    // mismatch too.
    mismatch_with_key_0_at(b"signing/\0\0\0\x04");
    verify_ok(&dir, pinned);
}

// ---- Every rotation under SIGKILL ----

const ROTATION_CHILD_ENV: &str = "FINTRUST_TEST_ROTATION_CHILD_DIR";

/// The vault in `dir`, opened with whichever of the two test secrets
/// opens it (true: the new one). With `exactly_one`, also checks that the
/// other one is refused.
fn open_either(dir: &Path, exactly_one: bool) -> (Vault, bool) {
    let (first, on_new) = match open_with(dir, &unlock()) {
        Ok(v) => (v, false),
        Err(Error::WrongSecret) => (open_with(dir, &new_unlock()).expect("open"), true),
        Err(e) => panic!("open: {e}"),
    };
    if !exactly_one {
        return (first, on_new);
    }
    first.close().expect("close");
    let other = if on_new { unlock() } else { new_unlock() };
    assert!(
        matches!(open_with(dir, &other), Err(Error::WrongSecret)),
        "both secrets open the vault"
    );
    let mine = if on_new { new_unlock() } else { unlock() };
    (open_with(dir, &mine).expect("reopen"), on_new)
}

/// Runs only as the child: appends from three tasks while the main task
/// rotates the signing key, a subject key (re-encrypting) and the master
/// key (between the two test secrets) in turn, until killed. Prints each
/// acknowledgement.
#[test]
fn rotation_child() {
    let Ok(dir) = std::env::var(ROTATION_CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let (vault, mut on_new) = open_either(Path::new(&dir), false);
        let vault = std::sync::Arc::new(vault);
        // Each child's own subjects: values restart at 0 in each.
        let pid = std::process::id();
        for t in 0..3u64 {
            let v = vault.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let subject = format!("p{pid}-r{t}-{}", i % 20);
                    let value = format!("{{\"i\":{i}}}");
                    match v
                        .append(Append::record(subject.clone(), value.into_bytes()))
                        .await
                    {
                        Ok(_) => println!("appended {subject} {i}"),
                        Err(e) => panic!("append: {e}"),
                    }
                }
            });
        }
        for n in 0u64.. {
            match n % 3 {
                0 => {
                    let (_, e) = vault.rotate_signing_key().await.expect("signing");
                    println!("signing {}", e.key_id);
                }
                1 => {
                    let subject = format!("p{pid}-r{}-{}", n % 3, n % 20);
                    match vault.rotate_subject_key(&subject, true).await {
                        Ok(r) => println!("subject {subject} {}", r.version),
                        Err(Error::NoSuchSubject(_)) => {}
                        Err(e) => panic!("subject rotation: {e}"),
                    }
                }
                _ => {
                    let next = if on_new { unlock() } else { new_unlock() };
                    vault.rotate_master_key(&next).await.expect("master");
                    on_new = !on_new;
                    println!("master {}", if on_new { "new" } else { "old" });
                }
            }
        }
    });
}

#[test]
fn acknowledged_rotations_survive_sigkill() {
    if std::env::var(ROTATION_CHILD_ENV).is_ok() {
        return;
    }
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let key = created.vault.public_key();
    created.vault.close().expect("close");
    let exe = std::env::current_exe().expect("test binary");
    let mut appended: std::collections::HashMap<String, u64> = Default::default();
    let mut subject_versions: std::collections::HashMap<String, u32> = Default::default();
    let mut signing_id = 0u32;
    let mut masters = 0u32;
    for (cycle, kill_after) in [4usize, 9, 2, 7].into_iter().enumerate() {
        wait_unlocked(&dir);
        let (mut child, mut lines) = spawn_child(&exe, "rotation_child", ROTATION_CHILD_ENV, &dir);
        let mut rotations = 0;
        let mut note = |line: &str, rotations: &mut usize| {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["appended", s, i] => {
                    let i: u64 = i.parse().expect("number");
                    let e = appended.entry(s.to_string()).or_default();
                    *e = (*e).max(i);
                }
                ["signing", id] => {
                    signing_id = id.parse().expect("number");
                    *rotations += 1;
                }
                ["subject", s, v] => {
                    subject_versions.insert(s.to_string(), v.parse().expect("number"));
                    *rotations += 1;
                }
                ["master", _] => {
                    masters += 1;
                    *rotations += 1;
                }
                _ => {}
            }
        };
        while rotations < kill_after {
            let Some(Ok(line)) = lines.next() else { break };
            note(&line, &mut rotations);
        }
        // SIGKILL: no destructors, no flush; then what it still printed.
        child.kill().expect("kill");
        let _ = child.wait();
        for line in lines.map_while(Result::ok) {
            note(&line, &mut rotations);
        }
        assert!(rotations > 0, "cycle {cycle}: no rotation acknowledged");

        // Exactly one secret opens the vault, and every acknowledged
        // rotation and append holds.
        // (A master rotation in flight may have become durable without its
        // acknowledgement, so either secret may be the one.)
        let (vault, _) = open_either(&dir, true);
        assert!(
            vault.signing_key_id() >= signing_id,
            "cycle {cycle}: acknowledged signing rotation lost"
        );
        let status = vault.key_status(None, 100_000).expect("key status");
        for (s, v) in &subject_versions {
            let current = status
                .subject_keys
                .iter()
                .filter(|k| &k.subject == s)
                .map(|k| k.version)
                .max()
                .unwrap_or(0);
            assert!(current >= *v, "cycle {cycle}: rotation of {s} lost");
        }
        for (s, i) in &appended {
            let got = latest(&vault, s);
            let got: serde_json::Value = serde_json::from_slice(&got).expect("json");
            assert!(
                got["i"].as_u64().expect("i") >= *i,
                "cycle {cycle}: acknowledged append to {s} lost"
            );
        }
        vault.close().expect("close");
        let r = verify_ok(&dir, key);
        assert!(r.signing_keys.len() as u32 >= signing_id);
    }
    assert!(masters > 0 && signing_id > 0 && !subject_versions.is_empty());
}

/// Each group that creates keys names them in a pending marker of its own,
/// which goes once the group's log is in sled. A marker that a crash left
/// behind makes open delete the keys it names when its group never
/// reached the log, and only then; the single marker of older data dirs
/// is honoured the same way.
#[tokio::test]
async fn pending_markers_go_with_their_group_and_a_crash_s_marker_takes_its_keys() {
    use storage::vault::{is_pending_marker, pending_name, PENDING};
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let key = three_subjects(&dir).await;
    let vault = reopen(&dir);
    for i in 0..20 {
        vault
            .append(Append::record(format!("new-{i}"), b"{\"n\":0}".to_vec()))
            .await
            .expect("append");
    }
    let next = vault.durable_len();
    vault.close().expect("close");
    let before = key_tree(&dir);
    assert!(
        before.iter().all(|(k, _)| !is_pending_marker(k)),
        "a marker outlived its group"
    );
    assert!(before.iter().any(|(k, _)| *k == data_key_name("new-19", 1)));
    verify_ok(&dir, key);

    for legacy in [false, true] {
        // What a crash leaves when a group's keys reached sled and its
        // write-ahead record did not: the keys and the marker naming them;
        // beside it, the marker of a group that did reach the log.
        let lost = data_key_name("lost", 1);
        let kept = data_key_name("new-3", 1);
        {
            let raw = raw(&dir);
            let marker = if legacy {
                PENDING.to_vec()
            } else {
                pending_name(next)
            };
            raw.keys.insert(&lost, vec![7u8; 60]).expect("write keys");
            raw.keys
                .insert(marker, pending_value(next, std::slice::from_ref(&lost)))
                .expect("write keys");
            raw.keys
                .insert(
                    pending_name(1),
                    pending_value(1, std::slice::from_ref(&kept)),
                )
                .expect("write keys");
            raw.flush().expect("flush");
        }
        let r = verify_ok(&dir, key);
        assert_eq!(r.entries, next, "legacy: {legacy}");
        reopen(&dir).close().expect("close");
        assert_eq!(key_tree(&dir), before, "legacy: {legacy}");
    }

    // A group creates data and signing keys only: a marker of a group to
    // come that names any other key (which open would delete with it) is
    // forged.
    for name in [
        b"shredding".to_vec(),
        b"master".to_vec(),
        b"rotating".to_vec(),
    ] {
        {
            let raw = raw(&dir);
            raw.keys
                .insert(
                    pending_name(next),
                    pending_value(next, std::slice::from_ref(&name)),
                )
                .expect("write keys");
            raw.flush().expect("flush");
        }
        let r = report(&dir, key);
        assert!(
            matches!(r.failure, Some((_, Reason::KeyMismatch(_)))),
            "{name:?}: {:?}",
            r.failure
        );
        let raw = raw(&dir);
        raw.keys.remove(pending_name(next)).expect("undo");
        raw.flush().expect("flush");
    }
    verify_ok(&dir, key);
}

/// Every key's count of encryptions, as the vault reports it live, is
/// the count a reopen rebuilds from the log, however the key cache came
/// and went: a cache of one key (emptied before nearly every group),
/// concurrent batches that create keys and encrypt under them in one
/// group, batches refused after creating a key (rolled back, emptying
/// the cache within the group), and keys rotated by the limit.
#[tokio::test]
async fn key_use_counts_live_equal_the_counts_rebuilt_from_the_log() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let opts = || Options {
        key_cache: 1,
        max_encryptions_per_key: 7,
        ..Options::default()
    };
    let vault = std::sync::Arc::new(
        Vault::create(&dir, &unlock(), opts())
            .expect("create")
            .vault,
    );
    let key = vault.public_key();
    vault
        .append(Append::record("gone", b"x".to_vec()))
        .await
        .expect("append");
    vault.shred("gone").await.expect("shred");
    let mut tasks = Vec::new();
    for t in 0..6u32 {
        let vault = vault.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30u32 {
                let a = |s: String| Append::record(s, format!("{t}/{i}").into_bytes());
                // `r{i}` is new, and shared by the tasks' requests of
                // round i: the first in a group creates its key, those
                // after use it (after a refusal's rollback, from a cache
                // emptied within the group).
                let mut batch = vec![
                    a(format!("s{}", (t + i) % 9)),
                    a(format!("r{i}")),
                    a(format!("new-{t}-{i}")),
                    a(format!("new-{t}-{i}")),
                    a(format!("s{}", i % 4)),
                ];
                if (t + i) % 3 == 0 {
                    // Refused after its new key was made (the subject is
                    // shredded): the request rolls back within its group.
                    batch.push(a("gone".into()));
                    assert!(matches!(
                        vault.append_batch(batch).await,
                        Err(Error::SubjectShredded(_))
                    ));
                } else {
                    vault.append_batch(batch).await.expect("batch");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let counts = |v: &Vault| {
        v.key_status(None, 100_000)
            .expect("status")
            .subject_keys
            .into_iter()
            .map(|k| ((k.subject, k.version), k.encryptions))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let live = counts(&vault);
    // Two batches of five records in three went in, and the first record.
    assert_eq!(
        live.values().sum::<u64>(),
        1 + 6 * 30 * 2 / 3 * 5,
        "{live:?}"
    );
    assert!(live.values().all(|&n| n <= 7), "the limit holds: {live:?}");
    assert!(live.keys().any(|(_, v)| *v > 1), "the limit rotated keys");
    let vault = std::sync::Arc::into_inner(vault).expect("one owner");
    vault.close().expect("close");
    verify_ok(&dir, key);
    wait_unlocked(&dir);
    let reopened = Vault::open(&dir, &unlock(), opts()).expect("reopen");
    assert_eq!(live, counts(&reopened));
}

/// Signing key rotations requested together are each done, in groups of
/// their own, whatever the timing: none is refused for meeting another.
#[tokio::test]
async fn concurrent_signing_rotations_are_all_done() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let vault = std::sync::Arc::new(
        Vault::create(&dir, &unlock(), Options::default())
            .expect("create")
            .vault,
    );
    let key = vault.public_key();
    for round in 0..10 {
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let v = vault.clone();
                tokio::spawn(async move { v.rotate_signing_key().await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("rotation");
        }
        vault
            .append(Append::record("alice", format!("{round}").into_bytes()))
            .await
            .expect("append");
    }
    assert_eq!(vault.signing_key_id(), 30);
    let vault = std::sync::Arc::into_inner(vault).expect("one owner");
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// A master rotation seals the new master at least as hard as the one it
/// replaces: a vault made with argon2id settings above the defaults keeps
/// them when a process with the default options rotates it.
#[tokio::test]
async fn a_master_rotation_keeps_stronger_argon2_settings() {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let strong = storage::KdfParams {
        m_kib: storage::KdfParams::default().m_kib * 2,
        t: storage::KdfParams::default().t + 1,
        p: storage::KdfParams::default().p,
    };
    let created = Vault::create(
        &dir,
        &unlock(),
        Options {
            kdf: strong,
            ..Options::default()
        },
    )
    .expect("create");
    created.vault.close().expect("close");
    let stored = || {
        let sealed = raw(&dir).keys.get("master").expect("read").expect("sealed");
        storage::crypto::SealedMaster::decode(&sealed)
            .expect("decodes")
            .kdf
    };
    assert_eq!(stored(), Some(strong));
    let vault = reopen(&dir);
    vault
        .rotate_master_key(&new_unlock())
        .await
        .expect("rotate");
    vault.close().expect("close");
    assert_eq!(stored(), Some(strong), "not lowered to the defaults");
}
