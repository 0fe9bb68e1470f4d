//! The storage side of the operator's log tools: listing credentials
//! (revoked ones included) from the log, reindexing (a state tree altered
//! by hand is reported, and repaired offline), and export files (written
//! from a data dir, verified with nothing but the public key, and every
//! kind of damage to them named).

use std::path::Path;

mod common;
use common::wait_unlocked;

use ed25519_dalek::VerifyingKey;
use storage::export::{
    export_dir, verify_export, EXPORT_HEADER_LEN, MAX_ENTRY_LEN, TAG_ENTRY, TAG_HEAD,
};
use storage::reindex::{reindex, ReindexOptions};
use storage::{
    verify, Append, Error, Kind, Options, RawStore, Reason, Unlock, Vault, VerifyOptions,
};

fn passphrase() -> Unlock {
    Unlock::passphrase(b"admin tools passphrase".to_vec())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// A closed vault with records, consents, and three credentials besides
/// the admin's, one of them revoked. Returns its public key.
fn build(dir: &Path) -> VerifyingKey {
    let vault = Vault::create(dir, &passphrase(), Options::default())
        .expect("create")
        .vault;
    let rt = runtime();
    rt.block_on(async {
        for i in 0..5 {
            vault
                .append(Append::record(
                    format!("cust-{i}"),
                    br#"{"name":"Ada"}"#.to_vec(),
                ))
                .await
                .expect("record");
        }
        vault
            .append(Append::event(
                Kind::ConsentGranted,
                "cust-1",
                &serde_json::json!({"partner_id": "p1", "purposes": ["kyc"]}),
            ))
            .await
            .expect("consent");
        vault
            .create_credential("writer", "svc")
            .await
            .expect("writer");
        let (auditor, _) = vault
            .create_credential("auditor", "ops")
            .await
            .expect("auditor");
        vault
            .create_credential("partner", "p1")
            .await
            .expect("partner");
        vault
            .revoke_credential(&auditor)
            .await
            .expect("revoke")
            .expect("exists");
    });
    let key = vault.public_key();
    vault.close().expect("close");
    wait_unlocked(dir);
    key
}

#[test]
fn credentials_are_listed_in_id_order_with_revocations_and_pages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    build(&dir);
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("open");
    let (all, more) = vault.credentials(None, 100).expect("list");
    assert!(!more);
    let ids: Vec<&str> = all.iter().map(|c| c.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "id order");
    let roles: Vec<&str> = all.iter().map(|c| c.role.as_str()).collect();
    assert_eq!(roles.len(), 4, "{all:?}");
    for role in ["admin", "writer", "auditor", "partner"] {
        assert!(roles.contains(&role), "{role} in {all:?}");
    }
    for c in &all {
        let entry = vault.entry(c.created_seq).expect("read").expect("entry");
        assert_eq!(entry.kind, Kind::CredentialCreated);
        assert_eq!(entry.timestamp_ms, c.created_ms);
        match c.role.as_str() {
            "auditor" => {
                let revoked = c.revoked_seq.expect("the auditor was revoked");
                let e = vault.entry(revoked).expect("read").expect("entry");
                assert_eq!(e.kind, Kind::CredentialRevoked);
                assert!(vault.credential(&c.id).expect("read").is_none());
            }
            _ => {
                assert_eq!(c.revoked_seq, None, "{c:?}");
                assert!(vault.credential(&c.id).expect("read").is_some());
            }
        }
    }
    // Pages of two: the same credentials, in the same order.
    let (first, more) = vault.credentials(None, 2).expect("page 1");
    assert!(more);
    let (second, more) = vault
        .credentials(first.last().map(|c| c.id.as_str()), 2)
        .expect("page 2");
    assert!(!more);
    assert_eq!([first, second].concat(), all);
    // A credential created after the first listing shows up in the next.
    let rt = runtime();
    let (id, _) = rt
        .block_on(vault.create_credential("gateway", "shim"))
        .expect("gateway");
    let (all2, _) = vault.credentials(None, 100).expect("list");
    assert_eq!(all2.len(), 5);
    assert!(all2.iter().any(|c| c.id == id && c.role == "gateway"));
    // The live ones from the derived state: the same, but the revoked
    // auditor, whether written to the tree yet or not.
    let live: Vec<String> = all2
        .iter()
        .filter(|c| c.revoked_seq.is_none())
        .map(|c| c.id.clone())
        .collect();
    let read = |prefix: &str| -> Vec<String> {
        vault
            .live_credentials(prefix)
            .expect("live")
            .into_iter()
            .map(|c| c.id)
            .collect()
    };
    assert_eq!(read(""), live);
    assert_eq!(read("gateway-"), std::slice::from_ref(&id));
    let shim = vault.live_credentials("gateway-").expect("live");
    assert_eq!(
        (shim[0].role.as_str(), shim[0].name.as_str()),
        ("gateway", "shim")
    );
    assert!(read("auditor-").is_empty());
    vault.close().expect("close");
    // And after a reopen, from the tree alone.
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("open");
    assert_eq!(
        vault
            .live_credentials("")
            .expect("live")
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>(),
        live
    );
    vault.close().expect("close");
}

#[test]
fn reindex_finds_a_state_tree_altered_by_hand_and_repairs_it_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let key = build(&dir);
    let opts = ReindexOptions {
        repair: false,
        public_key: Some(key),
    };

    // Intact: nothing differs, online and offline.
    let clean = reindex(&dir, &passphrase(), &opts).expect("reindex");
    assert_eq!(clean.differences, 0, "{clean:?}");
    assert!(clean.keys_compared > 5 && clean.entries > 10, "{clean:?}");
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("open");
    let live = vault.check_derived_state().expect("check");
    assert_eq!(live.differences, 0, "{live:?}");
    assert_eq!(live.entries, clean.entries);
    vault.close().expect("close");
    wait_unlocked(&dir);

    // A wrong secret is refused before the state is read.
    assert!(matches!(
        reindex(&dir, &Unlock::passphrase(b"wrong".to_vec()), &opts),
        Err(Error::WrongSecret)
    ));

    // Alter the state by hand: a changed pointer, a dropped consent, a
    // key that the log never made.
    {
        let raw = RawStore::open(&dir).expect("raw");
        let mut pointer = raw
            .state
            .get(b"s/cust-0")
            .expect("get")
            .expect("pointer")
            .to_vec();
        pointer[7] ^= 1;
        raw.state.insert(b"s/cust-0", pointer).expect("insert");
        let consent: Vec<u8> = [&b"g/cust-1\0"[..], b"p1"].concat();
        assert!(raw.state.remove(consent).expect("remove").is_some());
        raw.state.insert(b"s/nobody", &[0u8; 12]).expect("insert");
        raw.flush().expect("flush");
    }
    // Vault::open refuses the altered state; reindex describes it.
    assert!(matches!(
        Vault::open(&dir, &passphrase(), Options::default()),
        Err(Error::Integrity {
            reason: Reason::IndexMismatch(_),
            ..
        })
    ));
    wait_unlocked(&dir);
    let found = reindex(&dir, &passphrase(), &opts).expect("reindex");
    assert_eq!(found.differences, 3, "{found:?}");
    assert!(!found.repaired);
    let sample = found.sample.join("\n");
    assert!(
        sample.contains(r#"value of "s/cust-0" differs"#),
        "{sample}"
    );
    assert!(sample.contains(r#"missing key "g/cust-1"#), "{sample}");
    assert!(sample.contains(r#"unexpected key "s/nobody""#), "{sample}");
    // Still there: a check repairs nothing.
    assert_eq!(
        reindex(&dir, &passphrase(), &opts)
            .expect("again")
            .differences,
        3
    );

    // Repair: afterwards the vault opens and verifies.
    let repaired = reindex(
        &dir,
        &passphrase(),
        &ReindexOptions {
            repair: true,
            public_key: Some(key),
        },
    )
    .expect("repair");
    assert!(
        repaired.repaired && repaired.differences == 3,
        "{repaired:?}"
    );
    assert_eq!(
        reindex(&dir, &passphrase(), &opts)
            .expect("after")
            .differences,
        0
    );
    let report = verify(
        &dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .expect("verify");
    assert!(report.ok(), "{:?}", report.failure);
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("opens again");
    assert_eq!(vault.check_derived_state().expect("check").differences, 0);
    vault.close().expect("close");
    wait_unlocked(&dir);

    // The log's last group cut off: the applied marker past its end is the
    // one sign of it, which a repair must not erase.
    {
        let raw = RawStore::open(&dir).expect("raw");
        let last = raw
            .log
            .index
            .iter()
            .keys()
            .last()
            .expect("a chunk")
            .expect("read");
        raw.log.remove(last).expect("cut");
        raw.flush().expect("flush");
    }
    for repair in [false, true] {
        let r = reindex(
            &dir,
            &passphrase(),
            &ReindexOptions {
                repair,
                public_key: Some(key),
            },
        );
        assert!(
            matches!(
                r,
                Err(Error::Integrity {
                    reason: Reason::Truncated,
                    ..
                })
            ),
            "repair {repair}: {r:?}"
        );
    }
    wait_unlocked(&dir);
    let report = verify(
        &dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .expect("verify");
    assert!(
        matches!(report.failure, Some((_, Reason::Truncated))),
        "{:?}",
        report.failure
    );
}

/// The records of an export file: (offset, tag, body range).
fn records(file: &[u8]) -> Vec<(usize, u8, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut at = EXPORT_HEADER_LEN;
    while at < file.len() {
        let len = u32::from_be_bytes(file[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        out.push((at, file[at], at + 5..at + 5 + len));
        at += 5 + len;
    }
    out
}

fn check(file: &[u8], key: &VerifyingKey) -> Result<Option<(u64, Reason)>, Error> {
    verify_export(file, key).map(|r| r.report.failure)
}

/// The commit groups `verify_export` reports as checked.
fn groups_checked(file: &[u8], key: &VerifyingKey) -> u64 {
    verify_export(file, key).expect("runs").report.groups
}

/// A vault created in `dir`, filled by `fill`, closed and exported: the
/// file, the public key and the number of heads.
fn exported(dir: &Path, fill: impl AsyncFnOnce(&Vault)) -> (Vec<u8>, VerifyingKey, u64) {
    let vault = Vault::create(dir, &passphrase(), Options::default())
        .expect("create")
        .vault;
    let key = vault.public_key();
    runtime().block_on(fill(&vault));
    vault.close().expect("close");
    wait_unlocked(dir);
    let (file, _, heads) = export_dir(dir, Vec::new(), Some(key)).expect("export");
    (file, key, heads)
}

/// Entries are read in runs of up to 1,024 and hashed side by side, on
/// every core, while the run before is checked: a fault in a later record
/// (a cut, a bad tag) must not hide an earlier entry's failure, nor a run
/// boundary shift where it is.
#[test]
fn an_export_reports_the_earliest_failure_among_entries_read_ahead() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, key, _) = exported(&tmp.path().join("v"), async |vault| {
        // Three groups of 1,000 entries: runs end inside the groups.
        for b in 0..3 {
            let items = (0..1000)
                .map(|i| Append::record(format!("cust-{b}-{i}"), vec![b'x'; 40 + i % 700]))
                .collect();
            vault.append_batch(items).await.expect("batch");
        }
    });
    assert_eq!(check(&file, &key).expect("runs"), None);
    let recs = records(&file);
    let mut cases = 0;
    for i in [
        3, 63, 64, 65, 100, 1020, 1025, 1026, 1027, 1028, 2050, 2051, 2052, 2900,
    ] {
        let (tag, next_tag) = (recs[i].1, recs[i + 1].1);
        if tag != TAG_ENTRY || next_tag != TAG_ENTRY {
            continue;
        }
        cases += 1;
        let mut bad = file.clone();
        let body = recs[i].2.clone();
        bad[body.end - 1] ^= 0x01;
        let alone = check(&bad, &key).expect("runs").expect("caught");
        // The entry after the damaged one no longer links to it.
        assert!(alone.0 <= i as u64 + 1, "record {i}: {alone:?}");
        let heads_before = recs[..i].iter().filter(|r| r.1 == TAG_HEAD).count();
        assert_eq!(groups_checked(&bad, &key), heads_before as u64);
        // Cut right after the next entry, or that cut's record made
        // unknown: the same failure either way.
        let after = recs[i + 2].0;
        assert_eq!(
            check(&bad[..after], &key).expect("runs"),
            Some(alone.clone())
        );
        let mut tagged = bad.clone();
        tagged[after] = 0x77;
        assert_eq!(check(&tagged, &key).expect("runs"), Some(alone));
    }
    assert!(cases >= 12, "{cases} cases");
}

/// Groups' roots and heads' signatures are checked 64 groups at a time: a
/// bad one is still the failure reported, whatever damage follows it in
/// the file.
#[test]
fn an_export_reports_a_bad_signature_before_later_damage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, key, heads) = exported(&tmp.path().join("v"), async |vault| {
        // One at a time: a commit group, and a head, each.
        for i in 0..150 {
            vault
                .append(Append::record(format!("cust-{i}"), b"{}".to_vec()))
                .await
                .expect("record");
        }
    });
    assert!(heads > 140, "{heads} heads");
    let recs = records(&file);
    let head_recs: Vec<_> = recs.iter().filter(|r| r.1 == TAG_HEAD).collect();
    for h in [2, 63, 64, 65, 100, 139] {
        let mut bad = file.clone();
        let body = head_recs[h].2.clone();
        // The signature is the head's last 64 bytes.
        bad[body.end - 1] ^= 0x01;
        let alone = check(&bad, &key).expect("runs").expect("caught");
        assert_eq!(alone.1, Reason::BadSignature, "head {h}");
        // The groups before it count as checked; it and those after, not.
        assert_eq!(groups_checked(&bad, &key), h as u64, "head {h}");
        // A Merkle root (bytes 53..85 of a head) that is not the group's,
        // checked with the signatures: reported as such, at the same head.
        let mut rooted = file.clone();
        rooted[body.start + 53] ^= 0x01;
        assert_eq!(
            check(&rooted, &key).expect("runs"),
            Some((alone.0, Reason::HeadMismatch)),
            "head {h}"
        );
        assert_eq!(groups_checked(&rooted, &key), h as u64, "head {h}");
        // Later damage of every kind: an entry's byte, a cut, a bad tag.
        let later = head_recs[h + 1].2.clone();
        let mut flipped = bad.clone();
        flipped[later.start] ^= 0x01;
        let mut tagged = bad.clone();
        tagged[head_recs[h + 1].0] = 0x77;
        for damaged in [&flipped[..], &bad[..later.start + 3], &tagged[..]] {
            assert_eq!(check(damaged, &key).expect("runs"), Some(alone.clone()));
            assert_eq!(groups_checked(damaged, &key), h as u64, "head {h}");
        }
    }
}

#[test]
fn an_export_verifies_and_every_kind_of_damage_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let key = build(&dir);
    let (file, entries, heads) = export_dir(&dir, Vec::new(), Some(key)).expect("export");
    let report = verify_export(file.as_slice(), &key).expect("verify");
    assert_eq!(report.report.failure, None);
    assert_eq!(report.report.entries, entries);
    assert_eq!(report.report.groups, heads);
    let dir_report = verify(
        &dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .expect("verify dir");
    assert_eq!(report.report.head, dir_report.head);
    assert_eq!(report.report.signed_head, dir_report.signed_head);
    // The local scan counts the very groups whose heads the export holds.
    assert_eq!(dir_report.groups, heads);

    // Another key: the genesis names another (or a signature fails).
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    assert!(check(&file, &other).expect("runs").is_some());

    // Every truncation past the magic is an integrity failure; shorter
    // files are not exports at all. Never a panic.
    for n in 0..file.len() {
        match check(&file[..n], &key) {
            Ok(Some(_)) => assert!(n >= 8, "prefix {n}"),
            Err(Error::Malformed(_)) => assert!(n < 8, "prefix {n}"),
            other => panic!("prefix {n}: {other:?}"),
        }
    }
    // Every flipped byte is caught.
    for i in 0..file.len() {
        let mut bad = file.clone();
        bad[i] ^= 0x01;
        match check(&bad, &key) {
            Ok(Some(_)) => {}
            Err(Error::Malformed(_)) => assert!(i < 9, "flip at {i}"),
            other => panic!("flip at {i}: {other:?}"),
        }
    }
    // A missing entry, and two entries swapped.
    let recs = records(&file);
    let entry_recs: Vec<_> = recs.iter().filter(|r| r.1 == TAG_ENTRY).collect();
    let third = entry_recs[3];
    let mut missing = file[..third.0].to_vec();
    missing.extend_from_slice(&file[third.2.end..]);
    // Entry 3 ends its group: the head that follows no longer matches.
    assert!(
        matches!(
            check(&missing, &key).expect("runs"),
            Some((2..=3, Reason::Gap | Reason::HeadMismatch))
        ),
        "{:?}",
        check(&missing, &key)
    );
    let (a, b) = (entry_recs[5], entry_recs[6]);
    if b.0 == a.2.end {
        let mut swapped = file[..a.0].to_vec();
        swapped.extend_from_slice(&file[b.0..b.2.end]);
        swapped.extend_from_slice(&file[a.0..a.2.end]);
        swapped.extend_from_slice(&file[b.2.end..]);
        assert!(matches!(
            check(&swapped, &key).expect("runs"),
            Some((5, Reason::Gap | Reason::HeadMismatch))
        ));
    }
    // A length over the maximum is refused before anything is allocated.
    let mut huge = file[..EXPORT_HEADER_LEN].to_vec();
    huge.push(TAG_ENTRY);
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        check(&huge, &key).expect("runs"),
        Some((0, Reason::Malformed(_)))
    ));
    let mut over = file[..EXPORT_HEADER_LEN].to_vec();
    over.push(TAG_ENTRY);
    over.extend_from_slice(&((MAX_ENTRY_LEN + 1) as u32).to_be_bytes());
    assert!(check(&over, &key).expect("runs").is_some());
    // Bytes after the end marker.
    let mut trailing = file.clone();
    trailing.push(0);
    assert!(check(&trailing, &key).expect("runs").is_some());
    // Garbage and other versions are not exports: the check cannot run.
    assert!(matches!(
        check(b"hello, world", &key),
        Err(Error::Malformed(_))
    ));
    let mut v2 = file.clone();
    v2[8] = 2;
    assert!(matches!(check(&v2, &key), Err(Error::Malformed(_))));

    // Metadata naming another vault than genesis (the header's vault id
    // comes from it): refused, as a verification of the dir refuses it.
    wait_unlocked(&dir);
    {
        let raw = storage::RawStore::open(&dir).expect("raw open");
        raw.meta.insert("vault_id", &[9u8; 16]).expect("write meta");
        raw.flush().expect("flush");
    }
    wait_unlocked(&dir);
    let r = export_dir(&dir, Vec::new(), Some(key));
    assert!(
        matches!(
            r,
            Err(Error::Integrity {
                seq: 0,
                reason: Reason::MetaMismatch(_)
            })
        ),
        "{r:?}"
    );
}

/// An export of a log that went through every key event (a subject key
/// rotated with its record re-encrypted, a subject shredded, the signing
/// key rotated twice, the master key rotated) verifies offline from the
/// first signing key alone: the checker follows the key chain to heads
/// signed by key 2, and names the shredded subject.
#[test]
fn an_export_after_every_key_event_verifies_from_the_first_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, key, _) = exported(&tmp.path().join("v"), async |vault| {
        let record = |s: &str| Append::record(s, br#"{"name":"Ada"}"#.to_vec());
        for s in ["cust-1", "cust-2", "cust-3"] {
            vault.append(record(s)).await.expect("record");
        }
        vault
            .rotate_subject_key("cust-1", true)
            .await
            .expect("subject key");
        vault.shred("cust-2").await.expect("shred");
        for _ in 0..2 {
            vault.rotate_signing_key().await.expect("signing key");
            vault.append(record("cust-3")).await.expect("record");
        }
        vault
            .rotate_master_key(&Unlock::passphrase(b"a later passphrase".to_vec()))
            .await
            .expect("master key");
        vault.append(record("cust-4")).await.expect("record");
    });
    let report = verify_export(file.as_slice(), &key).expect("runs").report;
    assert_eq!(report.failure, None);
    assert_eq!(report.shredded, ["cust-2"]);
    let chain: Vec<u32> = report.signing_keys.iter().map(|e| e.key_id).collect();
    assert_eq!(chain, [1, 2]);
    assert_eq!(report.signed_head.map(|h| h.key_id), Some(2));
    // Another key, pinned, verifies nothing.
    let other = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert!(check(&file, &other).expect("runs").is_some());
}
