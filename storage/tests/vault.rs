//! The vault through its public API: appends, receipts, restarts, group
//! commit under concurrency, secrets.

mod common;

use std::sync::Arc;

use common::{copy_dir, files, wait_unlocked};

use storage::{verify, Append, Error, Kind, Options, Reason, Unlock, Vault, VerifyOptions};

fn unlock() -> Unlock {
    Unlock::passphrase(b"test passphrase".to_vec())
}

fn new_vault(dir: &std::path::Path) -> Vault {
    Vault::create(dir, &unlock(), Options::default())
        .expect("create")
        .vault
}

fn verify_ok(dir: &std::path::Path, key: ed25519_dalek::VerifyingKey) -> storage::Report {
    let r = verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .expect("verify runs");
    assert!(r.ok(), "verify failed: {:?}", r.failure);
    r
}

/// A new vault in `dir` holding one record of subject `s1`,
/// `{"name":"x"}`, for the tokens minted in the tests.
async fn vault_holding_s1(dir: &std::path::Path) -> Vault {
    let vault = new_vault(dir);
    vault
        .append(Append::record("s1", b"{\"name\":\"x\"}".to_vec()))
        .await
        .expect("append");
    vault
}

/// What one round of appends reads back right away: the record, its
/// entry, its receipt, the entries from it on.
async fn read_back(vault: &Vault, receipts: &[storage::Receipt], subjects: &[String]) {
    let key = vault.public_key();
    for (r, subject) in receipts.iter().zip(subjects) {
        let e = vault.entry(r.seq).expect("entry").expect("entry present");
        assert_eq!(e.hash, r.entry_hash);
        let again = vault
            .receipt(r.seq)
            .expect("receipt")
            .expect("receipt present");
        again.verify(&key).expect("receipt verifies");
        assert_eq!(again.entry_hash, r.entry_hash);
        let latest = vault
            .latest_record(subject)
            .expect("latest record")
            .expect("a record");
        assert_eq!(latest.seq, r.seq);
        let from = vault.entries_from(r.seq, 1).expect("entries_from");
        assert_eq!(from, [e.encoded]);
    }
    let last = receipts.iter().map(|r| r.seq).max().expect("appends");
    assert_eq!(
        vault.entries_from(last + 1, 10).expect("past the end"),
        Vec::<Vec<u8>>::new()
    );
}

/// Groups that are only log chunks reach sled up to a few milliseconds
/// after they are acknowledged (`Writer::defer`); every read of the live
/// log finds them meanwhile, and a restart finds them in sled.
#[tokio::test]
async fn appends_read_back_at_once_and_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = Arc::new(new_vault(&dir));
    // Known subjects first, so that the rounds below are log-only groups.
    let subjects: Vec<String> = (0..8).map(|i| format!("s{i}")).collect();
    for s in &subjects {
        vault
            .append(Append::record(s.clone(), b"{}".to_vec()))
            .await
            .expect("first record");
    }
    let mut all = Vec::new();
    for round in 0..20 {
        let tasks: Vec<_> = subjects
            .iter()
            .map(|s| {
                let (v, s) = (vault.clone(), s.clone());
                tokio::spawn(async move {
                    v.append(Append::record(s, format!("{{\"r\":{round}}}").into_bytes()))
                        .await
                })
            })
            .collect();
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.push(t.await.expect("task").expect("append"));
        }
        read_back(&vault, &receipts, &subjects).await;
        all.push(receipts);
    }
    let key = vault.public_key();
    Arc::into_inner(vault)
        .expect("one handle")
        .close()
        .expect("close");
    verify_ok(&dir, key);
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    // The last round is each subject's latest record.
    let last = all.last().expect("rounds");
    read_back(&vault, last, &subjects).await;
    for r in all.iter().flatten() {
        assert_eq!(
            vault.entry(r.seq).expect("entry").map(|e| e.hash),
            Some(r.entry_hash)
        );
    }
    vault.close().expect("close");
}

#[tokio::test]
async fn round_trip_across_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    let r1 = vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    let r2 = vault
        .append(Append::record("alice", b"{\"n\":2}".to_vec()))
        .await
        .expect("append");
    let r3 = vault
        .append(Append::record("bob", b"{\"n\":3}".to_vec()))
        .await
        .expect("append");
    for r in [&r1, &r2, &r3] {
        r.verify(&key).expect("receipt verifies");
    }
    assert!(r1.seq < r2.seq && r2.seq < r3.seq);
    vault.close().expect("close");

    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    assert_eq!(vault.public_key(), key);
    let alice = vault
        .latest_record("alice")
        .expect("read")
        .expect("present");
    assert_eq!(alice.plaintext.as_slice(), b"{\"n\":2}");
    assert_eq!(alice.seq, r2.seq);
    let bob = vault.latest_record("bob").expect("read").expect("present");
    assert_eq!(bob.plaintext.as_slice(), b"{\"n\":3}");
    assert!(vault.latest_record("carol").expect("read").is_none());
    // Entries read back hash to what the receipts said.
    let e = vault.entry(r3.seq).expect("read").expect("present");
    assert_eq!(e.hash, r3.entry_hash);
    assert_eq!(e.kind, Kind::Record);
    // The chain continues where it stopped.
    let r4 = vault
        .append(Append::record("bob", b"4".to_vec()))
        .await
        .expect("append");
    assert_eq!(r4.seq, r3.seq + 1);
    assert_eq!(vault.head().expect("head").last_seq, r4.seq);
    vault.close().expect("close");
    let report = verify_ok(&dir, key);
    assert_eq!(report.entries, r4.seq + 1);
}

#[tokio::test]
async fn group_commit_under_concurrency_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = Arc::new(new_vault(&dir));
    let key = vault.public_key();
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let v = vault.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40u32 {
                let subject = format!("s-{}", (t * 7 + i) % 50);
                let body = format!("{{\"t\":{t},\"i\":{i}}}");
                let r = v
                    .append(Append::record(subject.clone(), body.clone().into_bytes()))
                    .await
                    .expect("append");
                acked.push((r, subject, body));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("task"));
    }
    // Groups really were shared: fewer signed heads than appends.
    let heads: std::collections::HashSet<u64> =
        acked.iter().map(|(r, _, _)| r.head.last_seq).collect();
    assert!(heads.len() < acked.len(), "no group commit happened");
    let vault = Arc::try_unwrap(vault).expect("sole owner");
    vault.close().expect("close");

    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    let mut seqs: Vec<u64> = acked.iter().map(|(r, _, _)| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), acked.len(), "a seq was acknowledged twice");
    for (r, subject, _) in &acked {
        r.verify(&key).expect("receipt verifies");
        let e = vault
            .entry(r.seq)
            .expect("read")
            .expect("acknowledged entry present");
        assert_eq!(e.hash, r.entry_hash);
        assert_eq!(&e.subject, subject);
    }
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// Polls `futs` in their order, each first poll before the next one's,
/// as a connection's pipelined requests are started, until all are done.
async fn in_order<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

/// A request that finds no other in progress builds its group on its own
/// thread; the rest queue for the committer. Either way, requests started
/// one after another by one task (pipelined, as a connection starts them)
/// get seqs in that order, and concurrent tasks still share groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_keep_their_order_whoever_builds_the_group() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = Arc::new(new_vault(&dir));
    let mut tasks = Vec::new();
    for t in 0..6u32 {
        let v = vault.clone();
        tasks.push(tokio::spawn(async move {
            let mut heads = Vec::new();
            for round in 0..20u32 {
                // Alone now and then: one append, then a pipeline.
                let lone = v
                    .append(Append::record(format!("s-{t}"), b"lone".to_vec()))
                    .await
                    .expect("append");
                heads.push(lone.head.last_seq);
                let n = 1 + (round % 8) as usize;
                let futs = (0..n)
                    .map(|i| {
                        let v = v.clone();
                        async move {
                            let item = if i % 3 == 2 {
                                Append::event(
                                    Kind::ConsentGranted,
                                    format!("s-{t}"),
                                    &serde_json::json!({"partner_id": format!("p-{i}")}),
                                )
                            } else {
                                Append::record(format!("s-{t}-{i}"), vec![b'x'; 100])
                            };
                            v.append(item).await.expect("append")
                        }
                    })
                    .collect();
                let receipts = in_order(futs).await;
                let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
                assert!(
                    seqs.windows(2).all(|w| w[0] < w[1]),
                    "out of order: {seqs:?}"
                );
                assert!(lone.seq < seqs[0]);
                heads.extend(receipts.iter().map(|r| r.head.last_seq));
            }
            heads
        }));
    }
    let mut heads = Vec::new();
    for t in tasks {
        heads.extend(t.await.expect("task"));
    }
    let groups: std::collections::HashSet<u64> = heads.iter().copied().collect();
    assert!(groups.len() < heads.len(), "no group commit happened");
    let vault = Arc::try_unwrap(vault).expect("sole owner");
    let key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// Entries of each commit group among `receipts` (all of the groups'
/// entries, when `receipts` are every append since the first).
fn group_sizes(receipts: &[storage::Receipt]) -> std::collections::BTreeMap<u64, usize> {
    let mut sizes = std::collections::BTreeMap::new();
    for r in receipts {
        *sizes.entry(r.head.last_seq).or_insert(0) += 1;
    }
    sizes
}

#[tokio::test]
async fn commit_groups_stop_at_their_bounds_but_never_split_a_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let opts = Options {
        max_group_entries: 4,
        max_group_bytes: 1000,
        ..Options::default()
    };
    let vault = Vault::create(&dir, &unlock(), opts).expect("create").vault;
    // One known subject, so that no group holds a key's entries besides.
    let first = vault
        .append(Append::record("s", b"first".to_vec()))
        .await
        .expect("append");
    let queued = |size: usize| {
        let vault = &vault;
        in_order(
            (0..40)
                .map(|_| async move {
                    vault
                        .append(Append::record("s", vec![b'x'; size]))
                        .await
                        .expect("append")
                })
                .collect(),
        )
    };
    // 40 small appends queued at once: at most 4 entries a group.
    let small = queued(10).await;
    let sizes = group_sizes(&small);
    assert!(sizes.values().all(|&n| n <= 4), "{sizes:?}");
    assert!(sizes.len() >= 10);
    // Records of 400 bytes: a group closes once it carries 1000 bytes.
    let large = queued(400).await;
    let sizes = group_sizes(&large);
    assert!(sizes.values().all(|&n| n <= 3), "{sizes:?}");
    // A batch larger than both bounds is one group all the same.
    let batch = vault
        .append_batch(
            (0..10)
                .map(|_| Append::record("s", vec![b'y'; 400]))
                .collect(),
        )
        .await
        .expect("batch");
    assert_eq!(group_sizes(&batch).len(), 1);
    let mut seqs: Vec<u64> = small
        .iter()
        .chain(&large)
        .chain(&batch)
        .map(|r| r.seq)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 90);
    assert_eq!(seqs[0], first.seq + 1);
    let key = vault.public_key();
    vault.close().expect("close");
    assert_eq!(verify_ok(&dir, key).entries, first.seq + 91);
}

#[tokio::test]
async fn batch_is_atomic_and_ordered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let rs = vault
        .append_batch(vec![
            Append::record("a", b"1".to_vec()),
            Append::event(
                Kind::ConsentGranted,
                "a",
                &serde_json::json!({"partner_id": "p"}),
            ),
            Append::record("a", b"2".to_vec()),
        ])
        .await
        .expect("batch");
    assert_eq!(rs.len(), 3);
    assert!(rs.windows(2).all(|w| w[0].seq < w[1].seq));
    // An invalid item refuses the whole batch.
    let err = vault
        .append_batch(vec![
            Append::record("a", b"3".to_vec()),
            Append::record("", b"x".to_vec()),
        ])
        .await
        .expect_err("invalid subject");
    assert!(matches!(err, Error::Invalid(_)));
    assert_eq!(
        vault
            .latest_record("a")
            .expect("read")
            .expect("present")
            .plaintext
            .as_slice(),
        b"2"
    );
}

#[tokio::test]
async fn append_each_answers_every_item_on_its_own_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    vault
        .append(Append::record("gone", b"0".to_vec()))
        .await
        .expect("append");
    vault.shred("gone").await.expect("shred");
    let results = vault
        .append_each(vec![
            Append::record("a", b"1".to_vec()),
            Append::record("", b"x".to_vec()),
            Append::record("gone", b"x".to_vec()),
            Append::record("a", b"2".to_vec()),
            Append::record("b", b"3".to_vec()),
        ])
        .await;
    assert_eq!(results.len(), 5);
    // The invalid item and the shredded subject's are refused, each with
    // its own error; the others are durable, in the order given.
    assert!(
        matches!(results[1], Err(Error::Invalid(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(Error::SubjectShredded(ref s)) if s == "gone"),
        "{:?}",
        results[2]
    );
    let seqs: Vec<u64> = [0, 3, 4]
        .iter()
        .map(|&i| match &results[i] {
            Ok(r) => {
                r.verify(&vault.public_key()).expect("receipt verifies");
                r.seq
            }
            Err(e) => panic!("item {i}: {e}"),
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let latest = |s: &str| vault.latest_record(s).expect("read").expect("present");
    assert_eq!(latest("a").plaintext.as_slice(), b"2");
    assert_eq!(latest("b").plaintext.as_slice(), b"3");
    assert!(vault.append_each(Vec::new()).await.is_empty());
    let key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test]
async fn bad_input_gets_typed_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vault = new_vault(&tmp.path().join("v"));
    // A batch of more items than one request may hold: refused whole.
    let many = || {
        (0..=storage::vault::MAX_REQUEST_ITEMS)
            .map(|_| Append::record("a", b"x".to_vec()))
            .collect::<Vec<_>>()
    };
    assert!(matches!(
        vault.append_batch(many()).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        vault.append_batch_blocking(many()),
        Err(Error::Invalid(_))
    ));
    let too_big = vec![0u8; storage::entry::MAX_PAYLOAD_LEN];
    assert!(matches!(
        vault.append(Append::record("a", too_big)).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        vault.append(Append::record("a b", b"x".to_vec())).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        vault
            .append(Append::record("x".repeat(257), b"x".to_vec()))
            .await,
        Err(Error::Invalid(_))
    ));
    // The vault writes genesis, key and record entries itself.
    for kind in [
        Kind::Genesis,
        Kind::Record,
        Kind::SubjectKey,
        Kind::SubjectShredded,
        Kind::TokenRedeemed,
    ] {
        let r = vault
            .append(Append::event(kind, "a", &serde_json::json!({})))
            .await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{kind:?} accepted");
    }
    // Payloads must fit their kind's schema.
    let r = vault
        .append(Append::Event {
            kind: Kind::CredentialCreated,
            subject: String::new(),
            payload: b"{\"id\": 1}".to_vec(),
        })
        .await;
    assert!(matches!(r, Err(Error::Invalid(_))));
    let r = vault
        .append(Append::Event {
            kind: Kind::AccessDenied,
            subject: String::new(),
            payload: b"not json".to_vec(),
        })
        .await;
    assert!(matches!(r, Err(Error::Invalid(_))));
    // A token for a partner id no consent or policy could name.
    let fields = vec![("name".to_string(), "reveal".to_string())];
    let r = vault.mint("lender one", "a", "kyc", fields, u64::MAX).await;
    assert!(matches!(r, Err(Error::Invalid(_))), "{:?}", r.map(|_| ()));
    // A partner id too long for the refusal entry that would name it is
    // refused before the committer (whose encoder would have asserted).
    for partner in [String::new(), "p".repeat(60_000)] {
        let r = vault.redeem("fvt_unknown", &partner, 1, None).await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
    }
    // None of it reached the log, and the vault still works.
    vault
        .append(Append::record("a", b"ok".to_vec()))
        .await
        .expect("append");
    let r = vault.redeem("fvt_unknown", "p1", 1, None).await;
    assert!(
        matches!(r, Err(Error::TokenRefused(storage::TokenRefusal::Unknown))),
        "{r:?}"
    );
}

/// A new vault goes in a dir that is new, empty or holds files only:
/// one holding a subdirectory (a dir of other things, given by mistake)
/// or what another vault left is refused, and left as it was.
#[test]
fn a_vault_is_created_only_in_a_dir_meant_for_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(busy.join("other")).expect("a subdir");
    let leftover = tmp.path().join("leftover");
    std::fs::create_dir_all(&leftover).expect("dir");
    std::fs::write(leftover.join("chunks"), b"old").expect("chunks");
    for dir in [&busy, &leftover] {
        let r = Vault::create(dir, &unlock(), Options::default());
        assert!(
            matches!(r, Err(Error::DirRefused(_))),
            "{:?}",
            r.map(|_| ())
        );
        assert!(!dir.join("db").exists(), "nothing made");
    }
    let files = tmp.path().join("files");
    std::fs::create_dir_all(&files).expect("dir");
    std::fs::write(files.join("dev-passphrase"), b"x").expect("a file");
    let created = Vault::create(&files, &unlock(), Options::default()).expect("a dir of files");
    created.vault.close().expect("close");
}

/// What a creation's marker holds (docs/storage.md, section 2).
const MARKER: &str = "fintrust-vault: the creation of this vault has not finished\n";

/// A creation that did not finish (its `creating` marker still in the
/// dir) is not opened nor verified, but named; creating again starts
/// over, unless another process holds the dir (a creation under way).
#[test]
fn an_unfinished_creation_is_refused_by_open_and_started_over_by_create() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let first = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    assert!(
        !dir.join("creating").exists(),
        "removed once genesis is durable"
    );
    let first_key = first.vault.public_key();
    // The marker, as a crash before its removal leaves it.
    std::fs::write(dir.join("creating"), MARKER).expect("marker");
    assert!(Vault::is_unfinished(&dir));
    // Held by the vault still open: not undone.
    let r = Vault::create(&dir, &unlock(), Options::default());
    assert!(matches!(r, Err(Error::Locked)), "{:?}", r.map(|_| ()));
    assert!(dir.join("db").exists() && dir.join("creating").exists());
    first.vault.close().expect("close");
    wait_unlocked(&dir);
    let r = Vault::open(&dir, &unlock(), Options::default());
    match r {
        Err(Error::Unfinished(d)) => assert_eq!(d, dir.display().to_string()),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let v = verify(&dir, &VerifyOptions::default());
    assert!(matches!(v, Err(Error::Unfinished(_))), "{v:?}");
    // While the creation runs (its process holds the marker's lock), the
    // open and another creation are refused as locked.
    {
        let held = std::fs::File::open(dir.join("creating")).expect("marker");
        held.lock().expect("lock");
        let r = Vault::open(&dir, &unlock(), Options::default());
        assert!(matches!(r, Err(Error::Locked)), "{:?}", r.map(|_| ()));
        let r = Vault::create(&dir, &unlock(), Options::default());
        assert!(matches!(r, Err(Error::Locked)), "{:?}", r.map(|_| ()));
    }
    let again = Vault::create(&dir, &unlock(), Options::default()).expect("started over");
    assert_ne!(again.vault.public_key(), first_key, "a new vault");
    assert!(!Vault::is_unfinished(&dir));
    again.vault.close().expect("close");
    wait_unlocked(&dir);
    let v = verify(&dir, &VerifyOptions::default()).expect("verify");
    assert!(v.ok(), "{:?}", v.failure);
    assert_eq!(v.entries, 2, "genesis and the admin credential, once");
    // A marker alone (a crash before the database was made): the same.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).expect("dir");
    std::fs::write(bare.join("creating"), MARKER).expect("marker");
    let made = Vault::create(&bare, &unlock(), Options::default()).expect("create");
    made.vault.close().expect("close");
    assert!(!bare.join("creating").exists());
}

/// A file named `creating` that is not a creation's marker is never taken
/// for one: the vault beside it opens, and a new vault is not made there.
/// A marker beside a log longer than a creation writes (a vault in use)
/// is not started over: nothing is removed.
#[test]
fn only_a_creations_own_marker_starts_it_over() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for i in 0..200 {
            created
                .vault
                .append(Append::record(format!("s{i}"), vec![7u8; 512]))
                .await
                .expect("append");
        }
    });
    created.vault.close().expect("close");
    wait_unlocked(&dir);
    std::fs::write(dir.join("creating"), "my notes\n").expect("a file");
    Vault::open(&dir, &unlock(), Options::default())
        .expect("opens: not a marker")
        .close()
        .expect("close");
    wait_unlocked(&dir);
    let r = Vault::create(&tmp.path().join("v"), &unlock(), Options::default());
    assert!(
        matches!(r, Err(Error::AlreadyExists(_))),
        "{:?}",
        r.map(|_| ())
    );
    std::fs::write(dir.join("creating"), MARKER).expect("a marker");
    let r = Vault::create(&dir, &unlock(), Options::default());
    match r {
        Err(Error::DirRefused(m)) => assert!(m.contains("not started over"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(
        dir.join("db").exists() && dir.join("chunks").exists(),
        "nothing removed"
    );
}

/// The cached pages of a closed vault's files can be dropped (as `vaultd`
/// does before it opens a vault again after a failed fsync): the next open
/// reads the files from the disk and finds everything.
#[tokio::test]
async fn a_vault_opens_whole_after_its_cached_pages_are_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let r = vault
        .append(Append::record("a", b"{\"n\":\"1\"}".to_vec()))
        .await
        .expect("append");
    vault.close().expect("close");
    storage::forget_cached_pages(&dir).expect("dropped");
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    assert_eq!(
        vault.latest_record("a").expect("read").map(|rec| rec.seq),
        Some(r.seq)
    );
    vault.close().expect("close");
    assert!(storage::forget_cached_pages(&tmp.path().join("none")).is_err());
}

/// A connection keeps the revocation count it last checked its
/// credential at: a vault opened again must not start where the one before
/// stood, or a count of revocations it missed could match.
#[tokio::test]
async fn each_open_counts_revocations_from_a_value_of_its_own() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let mut seen = vec![vault.revocations()];
    vault.close().expect("close");
    for _ in 0..3 {
        let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
        let count = vault.revocations();
        assert!(!seen.contains(&count), "{count} again after {seen:?}");
        seen.push(count);
        vault.close().expect("close");
    }
}

#[test]
fn wrong_passphrase_is_clear_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    vault
        .append_blocking(Append::record("a", b"x".to_vec()))
        .expect("append");
    vault.close().expect("close");
    let before = snapshot(&dir);
    let err = Vault::open(
        &dir,
        &Unlock::passphrase(b"wrong".to_vec()),
        Options::default(),
    )
    .expect_err("wrong passphrase");
    assert!(matches!(err, Error::WrongSecret), "{err}");
    assert!(err.to_string().contains("wrong passphrase"));
    let kf = Unlock::key_file(&[7u8; 32]).expect("key file");
    assert!(Vault::open(&dir, &kf, Options::default()).is_err());
    assert_eq!(snapshot(&dir), before, "a failed open changed the data");
    verify_ok(&dir, key);
    Vault::open(&dir, &unlock(), Options::default()).expect("right passphrase opens");
}

/// Every key and value of every tree.
fn snapshot(dir: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let raw = storage::RawStore::open(dir).expect("raw open");
    let mut out = Vec::new();
    for name in raw.db.tree_names() {
        let t = raw.db.open_tree(&name).expect("tree");
        for kv in t.iter() {
            let (k, v) = kv.expect("kv");
            out.push((name.to_vec(), k.to_vec(), v.to_vec()));
        }
    }
    out
}

/// A vault at `tmp/v` with five records, closed, and the write-ahead
/// segments it had while open, copied to `tmp/wal` (what a data dir
/// stopped uncleanly holds): the data dir, its public key, the copy.
async fn closed_with_live_wal(
    tmp: &std::path::Path,
) -> (
    std::path::PathBuf,
    ed25519_dalek::VerifyingKey,
    std::path::PathBuf,
) {
    let dir = tmp.join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    for i in 0..5 {
        vault
            .append(Append::record(format!("s{i}"), b"{}".to_vec()))
            .await
            .expect("append");
    }
    let live_wal = tmp.join("wal");
    copy_dir(&dir.join("wal"), &live_wal);
    vault.close().expect("close");
    (dir, key, live_wal)
}

#[tokio::test]
async fn a_data_dir_of_another_format_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The live vault's write-ahead segments are put back below: a data
    // dir stopped uncleanly, which an open would replay.
    let (dir, key, live_wal) = closed_with_live_wal(tmp.path()).await;
    {
        let raw = storage::RawStore::open(&dir).expect("raw open");
        raw.meta
            .insert("format", &1u32.to_be_bytes())
            .expect("set the format");
        raw.flush().expect("flush");
    }
    // As a data dir of format 1 is: its chunks in the log tree, no file.
    std::fs::remove_file(dir.join("chunks")).expect("remove the chunks file");
    copy_dir(&live_wal, &dir.join("wal"));
    let wal = files(&dir.join("wal"));
    assert!(
        wal.iter().any(|(_, len)| *len > 0),
        "segments to replay: {wal:?}"
    );

    let opened = Vault::open(&dir, &unlock(), Options::default()).err();
    assert!(
        matches!(
            opened,
            Some(Error::UnsupportedFormat {
                found: 1,
                supported: 2
            })
        ),
        "{opened:?}"
    );
    let verified = verify(
        &dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .err();
    assert!(
        matches!(verified, Some(Error::UnsupportedFormat { found: 1, .. })),
        "{verified:?}"
    );
    assert!(!dir.join("chunks").exists(), "no chunks file was created");
    assert_eq!(files(&dir.join("wal")), wal, "nothing was replayed");
}

/// Bytes the writer did not write in a write-ahead segment (a bad magic;
/// a record failing its CRC in a segment before the last, which no crash
/// leaves) are an integrity failure at the segment's first seq, naming
/// the file: the open refuses the dir, and verify reports it (exit 1 in
/// `vault-verify`) rather than failing to run, from a writing open and a
/// read-only one alike.
#[tokio::test]
async fn a_damaged_write_ahead_segment_is_an_integrity_failure_at_its_first_seq() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, key, live_wal) = closed_with_live_wal(tmp.path()).await;
    let (name, segment) = std::fs::read_dir(&live_wal)
        .expect("read the copy")
        .map(|e| e.expect("dir entry").path())
        .map(|p| {
            (
                p.file_name().expect("name").to_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .find(|(_, bytes)| bytes.len() > 16 && bytes[8..16] != [0; 8])
        .expect("a segment with a record");
    let first: u64 = name
        .to_str()
        .and_then(|n| n.strip_suffix(".wal"))
        .and_then(|n| u64::from_str_radix(n, 16).ok())
        .expect("a segment is named by its first seq");
    let mut bad_magic = segment.clone();
    bad_magic[..6].copy_from_slice(b"NOTWAL");
    let mut bad_crc = segment.clone();
    bad_crc[8 + 4] ^= 0x01; // the first record's CRC, after the header and its length
    let later = std::ffi::OsString::from(format!("{:016x}.wal", first + 1_000));
    let mut empty = segment[..8].to_vec();
    empty.extend_from_slice(&[0; 64]);
    // (case, what the reason says, the segments)
    let cases = [
        ("a bad magic", "bad magic", vec![(name.clone(), bad_magic)]),
        (
            "a record failing its CRC before the last segment",
            "fails its CRC",
            vec![(name.clone(), bad_crc), (later, empty)],
        ),
    ];
    let opts = VerifyOptions {
        public_key: Some(key),
        ..Default::default()
    };
    let file = name.to_str().expect("a UTF-8 name").to_string();
    for (case, says, segments) in cases {
        let wal = dir.join("wal");
        std::fs::remove_dir_all(&wal).expect("clear the segments");
        std::fs::create_dir_all(&wal).expect("the segments' dir");
        for (n, bytes) in &segments {
            std::fs::write(wal.join(n), bytes).expect("write a segment");
        }
        let names_the_file = |reason: &Reason| match reason {
            Reason::Malformed(m) => m.contains(&file) && m.contains(says),
            _ => false,
        };
        match Vault::open(&dir, &unlock(), Options::default()) {
            Err(Error::Integrity { seq, reason }) if seq == first && names_the_file(&reason) => {}
            other => panic!("{case}: the open gave {:?}", other.map(|_| "a vault")),
        }
        let scratch = tempfile::tempdir().expect("scratch");
        for report in [
            verify(&dir, &opts).expect("verify runs"),
            storage::verify_read_only(&dir, scratch.path(), &opts).expect("verify runs"),
        ] {
            match &report.failure {
                Some((seq, reason)) if *seq == first && names_the_file(reason) => {}
                other => panic!("{case}: verify reported {other:?}"),
            }
        }
        assert_eq!(
            files(&wal).len(),
            segments.len(),
            "{case}: the segments stay for a look"
        );
    }
}

/// A write-ahead segment, or any file of the data dir, that is not a
/// regular file (here a link to `/dev/zero`, which a read would never
/// finish) is refused without being read: a segment as damage at its
/// first seq (by the open and both verifies), a file of the storage
/// engine's dir by a read-only verify's copy as one a data dir does not
/// hold.
#[tokio::test]
async fn a_segment_that_is_not_a_regular_file_is_refused_unread() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, key, live_wal) = closed_with_live_wal(tmp.path()).await;
    let first = std::fs::read_dir(&live_wal)
        .expect("read the copy")
        .filter_map(|e| {
            let name = e.expect("dir entry").file_name();
            let name = name.to_str()?.strip_suffix(".wal")?.to_string();
            u64::from_str_radix(&name, 16).ok()
        })
        .min()
        .expect("a segment");
    let wal = dir.join("wal");
    std::fs::remove_dir_all(&wal).expect("clear the segments");
    std::fs::create_dir_all(&wal).expect("the segments' dir");
    std::os::unix::fs::symlink("/dev/zero", wal.join(format!("{first:016x}.wal"))).expect("a link");
    let not_regular = |reason: &Reason| matches!(reason, Reason::Malformed(m) if m.contains("not a regular file"));
    match Vault::open(&dir, &unlock(), Options::default()) {
        Err(Error::Integrity { seq, reason }) if seq == first && not_regular(&reason) => {}
        other => panic!("the open gave {:?}", other.map(|_| "a vault")),
    }
    let opts = VerifyOptions {
        public_key: Some(key),
        ..Default::default()
    };
    match &verify(&dir, &opts).expect("verify runs").failure {
        Some((seq, reason)) if *seq == first && not_regular(reason) => {}
        other => panic!("verify reported {other:?}"),
    }
    let scratch = tempfile::tempdir().expect("scratch");
    match &storage::verify_read_only(&dir, scratch.path(), &opts)
        .expect("verify runs")
        .failure
    {
        Some((seq, reason)) if *seq == first && not_regular(reason) => {}
        other => panic!("a read-only verify reported {other:?}"),
    }
    // In the storage engine's dir, which a read-only verify copies.
    std::fs::remove_dir_all(&wal).expect("clear the segments");
    std::os::unix::fs::symlink("/dev/zero", dir.join("db").join("blob")).expect("a link");
    let scratch = tempfile::tempdir().expect("scratch");
    match storage::verify_read_only(&dir, scratch.path(), &opts) {
        Err(Error::Invalid(m)) if m.contains("not a regular file") => {}
        other => panic!("a read-only verify gave {:?}", other.map(|r| r.failure)),
    }
}

/// Asserts that an open and verify (writing and read-only) of `dir` all
/// fail at seq 0 for a reason `named` says is the one expected.
fn assert_fails_at_genesis(
    dir: &std::path::Path,
    key: ed25519_dalek::VerifyingKey,
    named: impl Fn(&Reason) -> bool,
) {
    match Vault::open(dir, &unlock(), Options::default()) {
        Err(Error::Integrity { seq: 0, reason }) if named(&reason) => {}
        other => panic!("the open gave {:?}", other.map(|_| "a vault")),
    }
    let opts = VerifyOptions {
        public_key: Some(key),
        ..Default::default()
    };
    let scratch = tempfile::tempdir().expect("scratch");
    for report in [
        verify(dir, &opts).expect("verify runs"),
        storage::verify_read_only(dir, scratch.path(), &opts).expect("verify runs"),
    ] {
        match &report.failure {
            Some((0, reason)) if named(reason) => {}
            other => panic!("verify reported {other:?}"),
        }
    }
}

/// A data dir whose chunks file is gone (a restore that left it out)
/// is an integrity failure at the log's first seq, from an open and from
/// verify (writing or read-only), and nothing is dropped: with the file
/// put back, the vault opens as it was.
#[tokio::test]
async fn a_missing_chunks_file_is_an_integrity_failure_and_drops_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    let entries = vault.durable_len();
    vault.close().expect("close");
    wait_unlocked(&dir);
    let (chunks, aside) = (dir.join("chunks"), tmp.path().join("chunks.aside"));
    std::fs::rename(&chunks, &aside).expect("take the chunks file away");
    assert_fails_at_genesis(
        &dir,
        key,
        |reason| matches!(reason, Reason::Malformed(m) if m.contains("is missing")),
    );
    assert!(!chunks.exists(), "no empty chunks file was made");
    std::fs::rename(&aside, &chunks).expect("put it back");
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    assert_eq!(vault.durable_len(), entries);
    vault.close().expect("close");
    let opts = VerifyOptions {
        public_key: Some(key),
        ..Default::default()
    };
    assert!(verify(&dir, &opts).expect("verify runs").ok());
}

/// A sled database that lost everything (here, its file zeroed) beside
/// a chunks file that holds the log: the open and verify name it, and no
/// chunk is cut off as a crash's leftovers.
#[tokio::test]
async fn a_database_that_lost_its_metadata_is_an_integrity_failure_and_cuts_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    vault
        .append(Append::record("alice", b"{\"n\":1}".to_vec()))
        .await
        .expect("append");
    vault.close().expect("close");
    wait_unlocked(&dir);
    let chunks = std::fs::read(dir.join("chunks")).expect("chunks");
    assert!(!chunks.is_empty());
    let db = dir.join("db").join("db");
    let len = std::fs::metadata(&db).expect("db").len();
    std::fs::write(&db, vec![0u8; len as usize]).expect("zero the database");
    assert_fails_at_genesis(
        &dir,
        key,
        |reason| matches!(reason, Reason::Malformed(m) if m.contains("no vault metadata")),
    );
    assert_eq!(std::fs::read(dir.join("chunks")).expect("chunks"), chunks);
}

#[test]
fn create_refuses_existing_vault_and_open_refuses_missing() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    drop(new_vault(&dir));
    // The data dir is its owner's alone, made by the vault or not.
    let mode =
        |d: &std::path::Path| std::fs::metadata(d).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let given = tmp.path().join("given");
    std::fs::create_dir(&given).expect("mkdir");
    std::fs::set_permissions(&given, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    drop(new_vault(&given));
    assert_eq!(mode(&given), 0o700);
    assert!(matches!(
        Vault::create(&dir, &unlock(), Options::default()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        Vault::open(&tmp.path().join("nothing"), &unlock(), Options::default()),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn second_open_is_refused_while_locked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let _vault = new_vault(&dir);
    let err = verify(&dir, &VerifyOptions::default()).expect_err("locked");
    assert!(matches!(err, Error::Locked), "{err}");
}

#[test]
fn key_file_vault_round_trip() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let kf = Unlock::key_file(hex::encode([5u8; 32]).as_bytes()).expect("key file");
    let created = Vault::create(&dir, &kf, Options::default()).expect("create");
    created
        .vault
        .append_blocking(Append::record("a", b"x".to_vec()))
        .expect("append");
    created.vault.close().expect("close");
    assert!(matches!(
        Vault::open(&dir, &unlock(), Options::default()),
        Err(Error::Invalid(_))
    ));
    let v = Vault::open(
        &dir,
        &Unlock::key_file(&[5u8; 32]).expect("raw"),
        Options::default(),
    )
    .expect("open");
    assert_eq!(
        v.latest_record("a")
            .expect("read")
            .expect("present")
            .plaintext
            .as_slice(),
        b"x"
    );
}

#[test]
fn admin_credential_is_stored_as_hash_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let key = created.admin_api_key.to_string();
    assert!(key.starts_with("fvk_"));
    let cred = created
        .vault
        .credential_by_key_hash(&storage::api_key_hash(&key))
        .expect("lookup")
        .expect("present");
    assert_eq!(cred.role, "admin");
    created.vault.close().expect("close");
    for (_, k, v) in snapshot(&dir) {
        assert!(
            !contains(&k, key.as_bytes()) && !contains(&v, key.as_bytes()),
            "API key stored in clear"
        );
    }
}

#[test]
fn ciphertexts_are_bound_to_subject_and_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let secret = b"IBAN GB33BUKB20201555555555";
    vault
        .append_blocking(Append::record("alice", secret.to_vec()))
        .expect("append");
    vault.close().expect("close");
    // The plaintext appears nowhere in the stored bytes.
    for (_, k, v) in snapshot(&dir) {
        assert!(
            !contains(&k, secret) && !contains(&v, secret),
            "plaintext stored"
        );
    }
    let files = std::fs::read_dir(dir.join("db")).expect("dir");
    for f in files {
        let p = f.expect("entry").path();
        if p.is_file() {
            assert!(
                !contains(&std::fs::read(&p).expect("read"), secret),
                "plaintext in {}",
                p.display()
            );
        }
    }
}

/// A token is redeemed only while the vault's consent of its subject for
/// its partner (where it holds one) is in force for the token's purpose:
/// one minted before a revocation, before a grant that drops its purpose,
/// or under a grant that lapses before the redemption, is refused with an
/// audited `access_denied`, and stays redeemable once consent is granted
/// again. Where the vault holds no consent, tokens are not refused for it.
#[tokio::test]
async fn a_consent_revoked_narrowed_or_lapsed_stops_the_tokens_minted_before_it() {
    use storage::TokenRefusal;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    for s in ["s1", "s2"] {
        vault
            .append(Append::record(s, b"{\"name\":\"x\"}".to_vec()))
            .await
            .expect("append");
    }
    let consent = |purposes: &[&str], expires: Option<u64>| {
        let mut c = serde_json::json!({"partner_id": "p1", "purposes": purposes});
        if let Some(t) = expires {
            c["expires_at_ms"] = t.into();
        }
        Append::event(Kind::ConsentGranted, "s1", &c)
    };
    let fields = || vec![("name".to_string(), "reveal".to_string())];
    let mint = |subject: &'static str| {
        let vault = &vault;
        async move {
            vault
                .mint("p1", subject, "credit_check", fields(), u64::MAX)
                .await
                .expect("mint")
        }
    };
    let denials = |vault: &Vault| -> usize {
        (0..vault.durable_len())
            .filter_map(|seq| vault.entry(seq).expect("read"))
            .filter(|e| {
                e.kind == Kind::AccessDenied && contains(&e.payload, b"\"reason\":\"consent_")
            })
            .count()
    };
    // No consent in the vault (a gateway that keeps it elsewhere).
    let t = mint("s2").await;
    vault.redeem(&t, "p1", 5, None).await.expect("redeem");

    vault
        .append(consent(&["credit_check"], None))
        .await
        .expect("grant");
    let (revoked, narrowed, lapsing, regranted) = (
        mint("s1").await,
        mint("s1").await,
        mint("s1").await,
        mint("s1").await,
    );
    let revoke = serde_json::json!({"partner_id": "p1"});
    vault
        .append(Append::event(Kind::ConsentRevoked, "s1", &revoke))
        .await
        .expect("revoke");
    let refused = |r: Result<_, Error>, want: TokenRefusal| match r {
        Err(Error::TokenRefused(got)) => assert_eq!(got, want),
        other => panic!("{:?}", other.map(|_| "redeemed")),
    };
    refused(
        vault.redeem(&revoked, "p1", 5, None).await,
        TokenRefusal::ConsentRevoked,
    );
    vault
        .append(consent(&["marketing"], None))
        .await
        .expect("narrow");
    refused(
        vault.redeem(&narrowed, "p1", 5, None).await,
        TokenRefusal::ConsentRevoked,
    );
    vault
        .append(consent(&["credit_check"], Some(100)))
        .await
        .expect("grant until 100");
    refused(
        vault.redeem(&lapsing, "p1", 100, None).await,
        TokenRefusal::ConsentExpired,
    );
    // A refusal for consent does not spend the token.
    let (terms, _) = vault
        .redeem(&lapsing, "p1", 99, None)
        .await
        .expect("in force");
    assert_eq!(terms.purpose, "credit_check");
    vault
        .redeem(&regranted, "p1", 5, None)
        .await
        .expect("redeem");
    assert_eq!(denials(&vault), 3, "each refusal is audited");
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test]
async fn a_policy_that_stops_allowing_a_token_stops_it_at_redemption() {
    use storage::TokenRefusal;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    vault
        .append(Append::record(
            "s1",
            b"{\"name\":\"x\",\"dob\":\"1990-01-01\"}".to_vec(),
        ))
        .await
        .expect("append");
    let policy = |p: serde_json::Value| {
        Append::event(
            Kind::PolicyChanged,
            "",
            &serde_json::json!({"partner_id": "p1", "policy": p, "recorded_by": "admin-1"}),
        )
    };
    let set = |p: serde_json::Value| {
        let vault = &vault;
        async move { vault.append(policy(p)).await.expect("policy") }
    };
    let both = serde_json::json!({"purposes": {"kyc": {"fields": {"name": "reveal", "dob": "generalize"}}}});
    let mint = |fields: &[(&str, &str)]| {
        let vault = &vault;
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(f, o)| (f.to_string(), o.to_string()))
            .collect();
        async move {
            vault
                .mint("p1", "s1", "kyc", fields, u64::MAX)
                .await
                .expect("mint")
        }
    };
    let refused = |r: Result<_, Error>| match r {
        Err(Error::TokenRefused(got)) => assert_eq!(got, TokenRefusal::PolicyChanged),
        other => panic!("{:?}", other.map(|_| "redeemed")),
    };

    // No policy in the vault (a gateway that keeps policies elsewhere).
    let t = mint(&[("name", "reveal")]).await;
    vault.redeem(&t, "p1", 5, None).await.expect("no policy");

    set(both.clone()).await;
    let name = mint(&[("name", "reveal")]).await;
    let dob = mint(&[("dob", "generalize")]).await;
    let other_op = mint(&[("name", "reveal")]).await;
    let inactive = mint(&[("name", "reveal")]).await;
    let kept = mint(&[("name", "reveal")]).await;
    // Other terms change: the token stays good.
    let mut limited = both.clone();
    limited["rate_limit_per_minute"] = 5.into();
    limited["max_token_ttl_secs"] = 60.into();
    set(limited).await;
    vault
        .redeem(&kept, "p1", 5, None)
        .await
        .expect("other terms");

    // A field taken out stops the tokens that reveal it, not the others.
    set(serde_json::json!({"purposes": {"kyc": {"fields": {"name": "reveal"}}}})).await;
    refused(vault.redeem(&dob, "p1", 5, None).await);
    // The same field under another operator.
    set(serde_json::json!({"purposes": {"kyc": {"fields": {"name": "redact"}}}})).await;
    refused(vault.redeem(&other_op, "p1", 5, None).await);
    // The purpose taken out.
    set(serde_json::json!({"purposes": {"marketing": {"fields": {"name": "reveal"}}}})).await;
    refused(vault.redeem(&name, "p1", 5, None).await);
    // The partner made inactive; then a policy that is no policy object.
    let mut off = both.clone();
    off["active"] = false.into();
    set(off).await;
    refused(vault.redeem(&inactive, "p1", 5, None).await);
    set(serde_json::json!("not an object")).await;
    refused(vault.redeem(&inactive, "p1", 5, None).await);
    // A refusal does not spend the token: allowed again, it redeems once.
    set(both.clone()).await;
    let (terms, _) = vault
        .redeem(&inactive, "p1", 5, None)
        .await
        .expect("allowed again");
    assert_eq!(terms.purpose, "kyc");
    assert!(matches!(
        vault.redeem(&inactive, "p1", 5, None).await,
        Err(Error::TokenRefused(TokenRefusal::Spent))
    ));

    // A shorter `max_token_ttl_secs` stops the tokens older than it: under
    // 60 s, a token redeemed 61 s after it was minted is refused, and one
    // redeemed 59 s after is not.
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let before = wall();
    let aged = mint(&[("name", "reveal")]).await;
    let after = wall();
    let mut short = both;
    short["max_token_ttl_secs"] = 60.into();
    set(short).await;
    refused(vault.redeem(&aged, "p1", after + 61_000, None).await);
    vault
        .redeem(&aged, "p1", before + 59_000, None)
        .await
        .expect("younger than the policy's lifetime");
    // A token that does not say when it was minted (an earlier build's)
    // is not refused for its age.
    let token = format!("{}{}", storage::vault::TOKEN_PREFIX, "ab".repeat(32));
    vault
        .append(Append::event(
            Kind::TokenMinted,
            "s1",
            &serde_json::json!({
                "token_hash": storage::api_key_hash(&token),
                "partner_id": "p1",
                "subject": "s1",
                "purpose": "kyc",
                "fields": [["name", "reveal"]],
                "expires_at_ms": u64::MAX,
            }),
        ))
        .await
        .expect("a token of an earlier build");
    vault
        .redeem(&token, "p1", after + 3_600_000, None)
        .await
        .expect("no mint time, no age");

    let denials = (0..vault.durable_len())
        .filter_map(|seq| vault.entry(seq).expect("read"))
        .filter(|e| {
            e.kind == Kind::AccessDenied && contains(&e.payload, b"\"reason\":\"policy_changed\"")
        })
        .count();
    assert_eq!(denials, 6, "each refusal is audited");
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test]
async fn a_redemption_meets_the_policys_hours_and_source_networks() {
    use std::net::IpAddr;
    use storage::TokenRefusal;
    use TokenRefusal::{OutsideAllowedHours as Hours, SourceNotAllowed as Source};
    const H: u64 = 3_600_000;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = vault_holding_s1(&dir).await;
    let key = vault.public_key();
    let set = |conditions: serde_json::Value| {
        let vault = &vault;
        let mut policy = serde_json::json!({"purposes": {"kyc": {"fields": {"name": "reveal"}}}});
        if let (Some(p), Some(c)) = (policy.as_object_mut(), conditions.as_object()) {
            p.extend(c.clone());
        }
        async move {
            vault
                .append(Append::event(
                    Kind::PolicyChanged,
                    "",
                    &serde_json::json!({"partner_id": "p1", "policy": policy}),
                ))
                .await
                .expect("policy")
        }
    };
    let mint = || {
        let vault = &vault;
        async move {
            vault
                .mint(
                    "p1",
                    "s1",
                    "kyc",
                    vec![("name".into(), "reveal".into())],
                    u64::MAX,
                )
                .await
                .expect("mint")
        }
    };
    let ip = |s: &str| s.parse::<IpAddr>().expect("address");
    // The policy's conditions, then redemptions of one token in turn: at
    // `now_ms`, from an address or none, and the refusal, or `None` for
    // the redemption that spends it. The refusals before it did not.
    type Tries<'a> = &'a [(u64, Option<&'a str>, Option<TokenRefusal>)];
    let networks = serde_json::json!({"source_ips": ["10.0.0.0/8", "192.0.2.7"]});
    let cases: [(serde_json::Value, Tries); 6] = [
        // [9, 17) UTC: refused at 17:00 and at 08:59, then redeemed at
        // 16:59 of another day.
        (
            serde_json::json!({"allowed_hours_utc": [9, 17]}),
            &[
                (17 * H, None, Some(Hours)),
                (9 * H - 60_000, None, Some(Hours)),
                (3 * 24 * H + 17 * H - 60_000, None, None),
            ],
        ),
        // Past midnight.
        (
            serde_json::json!({"allowed_hours_utc": [22, 6]}),
            &[(12 * H, None, Some(Hours)), (23 * H, None, None)],
        ),
        // Another address and an unknown one are refused; an IPv4-mapped
        // address inside a network redeems, and so does a listed address.
        (
            networks.clone(),
            &[
                (5, Some("192.0.2.8"), Some(Source)),
                (5, None, Some(Source)),
                (5, Some("::ffff:10.20.30.40"), None),
            ],
        ),
        (networks, &[(5, Some("192.0.2.7"), None)]),
        // A network that does not parse refuses every source (the shim
        // validates policies; one written by hand is not trusted further).
        (
            serde_json::json!({"source_ips": ["10.0.0.0/8", "ten"]}),
            &[(5, Some("10.0.0.1"), Some(Source))],
        ),
        // No networks: any source, known or not.
        (serde_json::json!({}), &[(5, None, None)]),
    ];
    for (conditions, tries) in cases {
        set(conditions.clone()).await;
        let t = mint().await;
        for &(now_ms, source, want) in tries {
            let got = vault.redeem(&t, "p1", now_ms, source.map(ip)).await;
            match (got, want) {
                (Ok(_), None) => {}
                (Err(Error::TokenRefused(got)), Some(want)) => assert_eq!(got, want),
                (got, _) => panic!(
                    "{conditions} at {now_ms} from {source:?}: {:?}, {want:?} expected",
                    got.map(|_| "redeemed")
                ),
            }
        }
    }

    // Each refusal is audited with its reason, and with the address when
    // one is known.
    let denials: Vec<serde_json::Value> = (0..vault.durable_len())
        .filter_map(|seq| vault.entry(seq).expect("read"))
        .filter(|e| e.kind == Kind::AccessDenied)
        .map(|e| serde_json::from_slice(&e.payload).expect("JSON"))
        .collect();
    let reasons: Vec<&str> = denials
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        reasons,
        [
            "outside_allowed_hours",
            "outside_allowed_hours",
            "outside_allowed_hours",
            "source_not_allowed",
            "source_not_allowed",
            "source_not_allowed",
        ]
    );
    assert_eq!(denials[3]["source_ip"], "192.0.2.8");
    assert!(denials[4].get("source_ip").is_none());
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// A redemption made with a credential that the log revoked before it
/// fails, nothing written and the token not spent; the same with a live
/// credential redeems.
#[tokio::test]
async fn a_redemption_after_its_credential_s_revocation_fails_and_spends_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = vault_holding_s1(&dir).await;
    let fields = vec![("name".to_string(), "reveal".to_string())];
    let token = vault
        .mint("p1", "s1", "credit_check", fields, u64::MAX)
        .await
        .expect("mint");
    let (revoked, _) = vault.create_credential("partner", "p1").await.expect("one");
    let (live, _) = vault.create_credential("partner", "p1").await.expect("two");
    vault
        .revoke_credential(&revoked)
        .await
        .expect("revoke")
        .expect("a receipt");
    let before = vault.durable_len();
    let r = vault
        .redeem_via(&token, "p1", Some(5), None, None, Some(&revoked))
        .await;
    assert!(
        matches!(&r, Err(Error::CredentialRevoked(id)) if *id == revoked),
        "{r:?}"
    );
    assert_eq!(vault.durable_len(), before, "nothing written");
    // A live credential of another name (a certificate's, made again
    // under it, keeps its id) does not stand for this partner either.
    let (renamed, _) = vault
        .create_credential("partner", "p2")
        .await
        .expect("three");
    let before = vault.durable_len();
    let r = vault
        .redeem_via(&token, "p1", Some(5), None, None, Some(&renamed))
        .await;
    assert!(matches!(&r, Err(Error::CredentialRevoked(_))), "{r:?}");
    assert_eq!(vault.durable_len(), before, "nothing written");
    let (terms, _) = vault
        .redeem_via(&token, "p1", Some(5), None, None, Some(&live))
        .await
        .expect("the token, not spent, with a live credential");
    assert_eq!(terms.subject, "s1");
    let key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// A redemption checked by a clock behind the log's last timestamp (the
/// wall clock stepped back) says so in its `token_redeemed` entry, which
/// the log stamps no earlier than the entry before it; one checked by a
/// clock ahead of the log does not.
#[tokio::test]
async fn a_redemption_checked_by_a_clock_behind_the_log_records_that_clock() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = vault_holding_s1(&dir).await;
    let fields = vec![("name".to_string(), "reveal".to_string())];
    let mut burns = Vec::new();
    for at in [5, u64::MAX / 2] {
        let token = vault
            .mint("p1", "s1", "credit_check", fields.clone(), u64::MAX)
            .await
            .expect("mint");
        let (_, receipt) = vault.redeem(&token, "p1", at, None).await.expect("redeem");
        let e = vault
            .entry(receipt.seq)
            .expect("entry")
            .expect("entry present");
        assert_eq!(e.kind, Kind::TokenRedeemed);
        let payload: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        burns.push((e.timestamp_ms, payload));
    }
    let (stamped, behind) = &burns[0];
    assert!(*stamped > 5);
    assert_eq!(behind["checked_at_ms"], 5, "{behind}");
    let (_, ahead) = &burns[1];
    assert!(ahead.get("checked_at_ms").is_none(), "{ahead}");
    let key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, key);
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn tokens_expire_burn_once_and_stay_burned_across_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = vault_holding_s1(&dir).await;
    let key = vault.public_key();
    let fields = vec![("name".to_string(), "reveal".to_string())];
    let token = vault
        .mint("p1", "s1", "credit_check", fields.clone(), 1_000_000)
        .await
        .expect("mint");
    // Expired: the redeemer's clock is past the expiry.
    let expired = vault.redeem(&token, "p1", 1_000_000, None).await;
    assert!(
        matches!(
            expired,
            Err(Error::TokenRefused(storage::TokenRefusal::Expired))
        ),
        "{expired:?}"
    );
    // Without a time of the caller's, the token is checked by the clock
    // as the committer takes it: one that expired before is refused.
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let lapsed = vault
        .mint("p1", "s1", "credit_check", fields.clone(), wall_ms - 1)
        .await
        .expect("mint");
    let by_the_clock = vault
        .redeem_via(&lapsed, "p1", None, None, None, None)
        .await;
    assert!(
        matches!(
            by_the_clock,
            Err(Error::TokenRefused(storage::TokenRefusal::Expired))
        ),
        "{by_the_clock:?}"
    );
    let live = vault
        .mint(
            "p1",
            "s1",
            "credit_check",
            fields.clone(),
            wall_ms + 3_600_000,
        )
        .await
        .expect("mint");
    vault
        .redeem_via(&live, "p1", None, None, None, None)
        .await
        .expect("a live token, by the clock");
    let token = vault
        .mint("p1", "s1", "credit_check", fields, u64::MAX)
        .await
        .expect("mint");
    let (terms, receipt) = vault.redeem(&token, "p1", 5, None).await.expect("redeem");
    assert_eq!(terms.subject, "s1");
    receipt.verify(&key).expect("the burn has a receipt");
    vault.close().expect("close");
    // Reopened (the burn was durable before redeem returned): still spent.
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    let again = vault.redeem(&token, "p1", 6, None).await;
    assert!(
        matches!(
            again,
            Err(Error::TokenRefused(storage::TokenRefusal::Spent))
        ),
        "{again:?}"
    );
    // Redemptions are not appendable by hand.
    let forged = vault
        .append(Append::Redeem {
            token_hash: storage::api_key_hash(&token),
            partner_id: "p1".into(),
            now_ms: Some(0),
            source: None,
            proxy: None,
            credential: None,
        })
        .await;
    assert!(matches!(forged, Err(Error::Invalid(_))));
    vault.close().expect("close");
    verify_ok(&dir, key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redemptions_burn_exactly_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vault = Arc::new(new_vault(&tmp.path().join("v")));
    vault
        .append(Append::record("s", b"{}".to_vec()))
        .await
        .expect("append");
    for round in 0..5u64 {
        let fields = vec![("a".to_string(), "reveal".to_string())];
        let token = vault
            .mint("p", "s", "x", fields, u64::MAX)
            .await
            .expect("mint");
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let (v, t) = (vault.clone(), token.to_string());
            tasks.push(tokio::spawn(async move {
                // Spread the redemptions over several commit groups, so
                // that some land while an earlier burn is still on its way
                // to the writer.
                for _ in 0..(i * 7 + round) % 5 {
                    tokio::task::yield_now().await;
                }
                v.redeem(&t, "p", 1, None).await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => ok += 1,
                Err(Error::TokenRefused(storage::TokenRefusal::Spent)) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(ok, 1, "round {round}");
    }
}

/// One active credential per client certificate, however close together
/// the requests: the check is made as each entry is built, in the commit
/// group's order, not before the request is queued.
#[tokio::test]
async fn two_credentials_for_one_certificate_cannot_both_pass() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vault = std::sync::Arc::new(new_vault(&tmp.path().join("v")));
    let cert = [9u8; 32];
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..32 {
        let vault = vault.clone();
        tries.spawn(async move {
            vault
                .create_cert_credential("partner", &format!("p{i}"), &cert)
                .await
        });
    }
    let mut created = Vec::new();
    while let Some(result) = tries.join_next().await {
        match result.expect("a task") {
            Ok(id) => created.push(id),
            Err(storage::Error::Conflict(m)) => assert!(m.contains("client certificate"), "{m}"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created.len(), 1, "{created:?}");
    // Once revoked, the certificate may hold a new credential.
    vault.revoke_credential(&created[0]).await.expect("revoked");
    vault
        .create_cert_credential("partner", "again", &cert)
        .await
        .expect("a new credential");

    // Two in one batch: the second sees the first, and the batch (all or
    // none) is refused, nothing written.
    let head = vault.head().map(|h| h.last_seq);
    let entry = |name: &str| {
        let c = serde_json::json!({"id": format!("writer-{name}"), "role": "writer",
            "key_hash": "ab".repeat(32), "name": name});
        Append::event(Kind::CredentialCreated, "", &c)
    };
    let twice = vault.append_batch(vec![entry("a"), entry("b")]).await;
    assert!(
        matches!(twice, Err(storage::Error::Conflict(ref m)) if m.contains("already has this key")),
        "{twice:?}"
    );
    assert_eq!(vault.head().map(|h| h.last_seq), head, "nothing written");

    // Another key under a live credential's id (ids carry 48 bits of the
    // key's hash, which a made key could share): refused, and the live
    // credential's key still finds it.
    let with = |key: &str| {
        let c = serde_json::json!({"id": "writer-same", "role": "writer",
            "key_hash": key, "name": "w"});
        Append::event(Kind::CredentialCreated, "", &c)
    };
    vault
        .append(with(&"ab".repeat(32)))
        .await
        .expect("the first");
    let taken = vault.append(with(&"cd".repeat(32))).await;
    assert!(
        matches!(taken, Err(storage::Error::Conflict(ref m)) if m.contains("already has the id")),
        "{taken:?}"
    );
    let held = vault
        .credential_by_key_hash(&"ab".repeat(32))
        .expect("read");
    assert_eq!(held.map(|c| c.id), Some("writer-same".to_string()));
    assert!(vault
        .credential_by_key_hash(&"cd".repeat(32))
        .expect("read")
        .is_none());
}

#[tokio::test]
async fn consents_policies_and_credentials_are_derived_state() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let grant = serde_json::json!({"partner_id": "lender-1", "purposes": ["credit_check"], "actor": "admin-1"});
    let policy = serde_json::json!({"partner_id": "lender-1", "policy": {"active": true}});
    vault
        .append_batch(vec![
            Append::event(Kind::ConsentGranted, "alice", &grant),
            Append::event(Kind::PolicyChanged, "", &policy),
        ])
        .await
        .expect("append");
    let (kind, payload) = vault
        .consent("alice", "lender-1")
        .expect("read")
        .expect("some");
    assert_eq!(kind, Kind::ConsentGranted);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).expect("json"),
        grant
    );
    assert!(vault.consent("alice", "lender-2").expect("read").is_none());
    assert!(vault.consent("bob", "lender-1").expect("read").is_none());
    assert!(vault.policy("lender-1").expect("read").is_some());
    assert!(vault.policy("lender-2").expect("read").is_none());

    let (id, key) = vault
        .create_credential("partner", "lender-1")
        .await
        .expect("create");
    let hash = storage::api_key_hash(&key);
    assert!(vault.credential_by_key_hash(&hash).expect("read").is_some());
    let before = vault.revocations();
    assert!(vault
        .revoke_credential(&id)
        .await
        .expect("revoke")
        .is_some());
    assert!(vault.credential_by_key_hash(&hash).expect("read").is_none());
    assert_ne!(vault.revocations(), before, "the revocation is counted");
    assert!(vault
        .revoke_credential(&id)
        .await
        .expect("revoke")
        .is_none());

    let revoke = serde_json::json!({"partner_id": "lender-1"});
    vault
        .append(Append::event(Kind::ConsentRevoked, "alice", &revoke))
        .await
        .expect("append");
    // Malformed consent and policy events are refused.
    for (kind, subject, payload) in [
        (
            Kind::ConsentGranted,
            "alice",
            serde_json::json!({"purposes": []}),
        ),
        (
            Kind::ConsentGranted,
            "",
            serde_json::json!({"partner_id": "p"}),
        ),
        (
            Kind::ConsentGranted,
            "alice",
            serde_json::json!({"partner_id": "a b"}),
        ),
        (
            Kind::PolicyChanged,
            "",
            serde_json::json!({"partner_id": "p"}),
        ),
    ] {
        let r = vault.append(Append::event(kind, subject, &payload)).await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{payload} accepted");
    }
    let public_key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, public_key);

    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    let (kind, _) = vault
        .consent("alice", "lender-1")
        .expect("read")
        .expect("some");
    assert_eq!(kind, Kind::ConsentRevoked);
    assert!(vault.policy("lender-1").expect("read").is_some());
    assert!(vault.credential(&id).expect("read").is_none());
}

/// Verify reads the log in parallel ranges sized from the bytes per entry
/// seen so far: a log of tiny entries followed by entries of the maximum
/// size makes its tasks stop at their bound of chunks and the next window
/// start after them. The whole log is still verified, entry by entry.
#[tokio::test]
async fn a_log_of_tiny_then_large_entries_verifies_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    for batch in 0..10 {
        let items = (0..500)
            .map(|i| Append::record(format!("s{}", (batch * 500 + i) % 97), b"t".to_vec()))
            .collect();
        vault.append_batch(items).await.expect("tiny records");
    }
    let big = vec![0x5a; storage::entry::MAX_PAYLOAD_LEN - 64];
    for _ in 0..10 {
        let items = (0..12)
            .map(|i| Append::record(format!("s{i}"), big.clone()))
            .collect();
        vault.append_batch(items).await.expect("large records");
    }
    let items = (0..500)
        .map(|i| Append::record(format!("s{}", i % 97), b"t".to_vec()))
        .collect();
    let last = vault.append_batch(items).await.expect("tiny records");
    let head = last.last().expect("receipts").seq;
    vault.close().expect("close");
    let report = verify_ok(&dir, key);
    assert_eq!(report.entries, head + 1);
}

/// A vault in `tmp`/v with 40 records appended after a first close; and,
/// beside it, `tmp`/before (the dir at that close) and `tmp`/wal (the
/// live vault's write-ahead segments before the second close deleted
/// them): what sled held and what the segments would replay after a crash.
async fn forty_records_and_their_segments(
    tmp: &std::path::Path,
) -> (
    std::path::PathBuf,
    ed25519_dalek::VerifyingKey,
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<storage::Receipt>,
) {
    let dir = tmp.join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    vault.close().expect("close");
    let before = tmp.join("before");
    copy_dir(&dir, &before);

    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    let mut receipts = Vec::new();
    for i in 0..40 {
        let subject = format!("s{}", i % 7);
        let r = vault
            .append(Append::record(
                subject,
                format!("{{\"n\":{i}}}").into_bytes(),
            ))
            .await
            .expect("append");
        receipts.push(r);
    }
    // The live vault's segments, before close checkpoints and deletes them.
    let live_wal = tmp.join("wal");
    copy_dir(&dir.join("wal"), &live_wal);
    vault.close().expect("close");
    (dir, key, before, live_wal, receipts)
}

/// sled lost every group after the vault's creation (the data dir as it
/// was before them), and the write-ahead segment of a live vault that
/// acknowledged them is all that holds them: the open replays it, and
/// every acknowledged append is there with its receipt's hash. A torn
/// record at the end of the last segment is dropped; the same in an
/// earlier segment refuses the open.
#[tokio::test]
async fn the_write_ahead_file_brings_back_what_sled_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, key, before, live_wal, receipts) = forty_records_and_their_segments(tmp.path()).await;
    assert_eq!(
        std::fs::read_dir(dir.join("wal")).expect("wal dir").count(),
        0,
        "a clean close leaves no segment"
    );

    // sled as before the appends, the live segments beside it, and a
    // torn record (half of a record's header) at the end of the last one.
    let mut segments: Vec<_> = std::fs::read_dir(&live_wal)
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .collect();
    segments.sort();
    assert!(!segments.is_empty());
    let restored = tmp.path().join("restored");
    copy_dir(&before, &restored);
    copy_dir(&live_wal, &restored.join("wal"));
    let last = restored
        .join("wal")
        .join(segments.last().and_then(|p| p.file_name()).expect("name"));
    let mut bytes = std::fs::read(&last).expect("read");
    bytes.extend_from_slice(&[0, 0, 1]);
    std::fs::write(&last, &bytes).expect("write");

    let vault = Vault::open(&restored, &unlock(), Options::default()).expect("replayed open");
    for r in &receipts {
        let e = vault
            .entry(r.seq)
            .expect("read")
            .expect("acknowledged entry");
        assert_eq!(e.hash, r.entry_hash);
    }
    vault.close().expect("close");
    verify_ok(&restored, key);

    // The same torn segment named before another one: corruption, not a
    // crash's torn write.
    let broken = tmp.path().join("broken");
    copy_dir(&before, &broken);
    copy_dir(&live_wal, &broken.join("wal"));
    std::fs::write(broken.join("wal").join("0000000000000000.wal"), &bytes).expect("write");
    match Vault::open(&broken, &unlock(), Options::default()) {
        Err(Error::Integrity {
            seq: 0,
            reason: Reason::Malformed(m),
        }) => assert!(m.contains("0000000000000000.wal"), "{m}"),
        Err(e) => panic!("expected a malformed write-ahead segment, got {e}"),
        Ok(_) => panic!("expected a malformed write-ahead segment, the vault opened"),
    }
}

#[tokio::test]
async fn an_admins_actions_name_it_and_a_bad_admin_id_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v");
    let vault = new_vault(&path);
    vault
        .append(Append::record("cust-1", b"{}".to_vec()))
        .await
        .expect("append");
    let recorded_by = |seq: u64| -> Option<String> {
        let e = vault.entry(seq).expect("read").expect("entry");
        let v: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        v.get("recorded_by")
            .map(|b| b.as_str().expect("a string").to_string())
    };

    // The vault's own actions name no one.
    let r = vault
        .rotate_subject_key("cust-1", false)
        .await
        .expect("rotate");
    assert_eq!(recorded_by(r.receipt.seq), None);

    let admin = vault.acting_as("admin-0123abcd");
    let (id, _) = admin
        .create_credential("writer", "w")
        .await
        .expect("create");
    let created = vault.durable_len() - 1;
    assert_eq!(recorded_by(created).as_deref(), Some("admin-0123abcd"));
    let r = admin
        .revoke_credential(&id)
        .await
        .expect("revoke")
        .expect("known");
    assert_eq!(recorded_by(r.seq).as_deref(), Some("admin-0123abcd"));
    let r = admin
        .rotate_subject_key("cust-1", false)
        .await
        .expect("rotate");
    assert_eq!(
        recorded_by(r.receipt.seq).as_deref(),
        Some("admin-0123abcd")
    );
    let (r, _) = admin.rotate_signing_key().await.expect("rotate signing");
    assert_eq!(recorded_by(r.seq).as_deref(), Some("admin-0123abcd"));
    let r = admin
        .rotate_master_key(&Unlock::key_file(&[9; 32]).expect("key"))
        .await
        .expect("rotate master");
    assert_eq!(recorded_by(r.seq).as_deref(), Some("admin-0123abcd"));
    let r = admin.shred("cust-1").await.expect("shred");
    assert_eq!(recorded_by(r.seq).as_deref(), Some("admin-0123abcd"));

    // An id that could not be a credential's is refused before anything
    // is written.
    let len = vault.durable_len();
    for bad in ["", "two words", &"x".repeat(10_000)] {
        let admin = vault.acting_as(bad);
        assert!(matches!(
            admin.create_credential("writer", "w").await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            admin.shred("cust-2").await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            admin.rotate_signing_key().await,
            Err(Error::Invalid(_))
        ));
    }
    assert_eq!(vault.durable_len(), len);
    let key = vault.public_key();
    vault.close().expect("close");
    // The entries verify, and derived state agrees with a rebuild.
    let report = verify_ok(&path, key);
    assert_eq!(report.shredded, vec!["cust-1".to_string()]);
}

/// A receipt asked for later is the one the append gave, for every entry
/// of a group whose entries fill several chunks: the first (whose chunk
/// starts the group), one in each later chunk, and the last; before and
/// after a restart, which moves the chunks from memory to the log file.
#[tokio::test]
async fn receipts_of_a_group_over_several_chunks_are_those_of_its_appends() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    // Before and after it, groups of one entry.
    vault
        .append(Append::record("cust-a", b"{}".to_vec()))
        .await
        .expect("append");
    let items = (0..400)
        .map(|i| Append::record(format!("cust-{}", i % 7), vec![b'x'; 600 + i % 300]))
        .collect();
    let receipts = vault.append_batch(items).await.expect("batch");
    vault
        .append(Append::record("cust-b", b"{}".to_vec()))
        .await
        .expect("append");
    let head = receipts[0].head;
    assert!(receipts.iter().all(|r| r.head == head), "one group");
    let check = |vault: &Vault| {
        for r in &receipts {
            let again = vault.receipt(r.seq).expect("receipt").expect("present");
            again.verify(&key).expect("receipt verifies");
            assert_eq!(again.entry_hash, r.entry_hash, "seq {}", r.seq);
            assert_eq!(again.path, r.path, "seq {}", r.seq);
            assert_eq!(again.head, head, "seq {}", r.seq);
        }
    };
    check(&vault);
    vault.close().expect("close");
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    check(&vault);
    vault.close().expect("close");
    // The group's chunks, keyed by their first seq: several.
    let raw = storage::RawStore::open(&dir).expect("raw open");
    let chunks = raw
        .log
        .iter()
        .map(|kv| {
            let (k, _) = kv.expect("chunk");
            u64::from_be_bytes(k.as_ref().try_into().expect("8-byte key"))
        })
        .filter(|first| (head.group_first_seq..=head.last_seq).contains(first))
        .count();
    assert!(chunks >= 3, "{chunks} chunks");
    drop(raw);
    wait_unlocked(&dir);
    verify_ok(&dir, key);
}

#[tokio::test]
async fn heads_are_the_groups_from_the_one_holding_a_seq_in_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = new_vault(&dir);
    let key = vault.public_key();
    // Groups of one entry, one of 400 over several chunks, then more.
    let mut groups = Vec::new();
    let mut big = None;
    for step in 0..7 {
        if step == 3 {
            let items = (0..400)
                .map(|i| Append::record(format!("cust-{}", i % 7), vec![b'x'; 600 + i % 300]))
                .collect();
            let receipts = vault.append_batch(items).await.expect("batch");
            groups.push(receipts[0].head);
            big = Some(receipts[0].head);
            continue;
        }
        let r = vault
            .append(Append::record(format!("cust-{step}"), b"{}".to_vec()))
            .await
            .expect("append");
        groups.push(r.head);
    }
    let big = big.expect("the big group");
    let check = |vault: &Vault| {
        let all = vault.heads(0, usize::MAX, usize::MAX).expect("heads");
        // The genesis group and the others, contiguous, each signed.
        assert_eq!(all.first().map(|h| h.group_first_seq), Some(0));
        assert_eq!(all.last(), groups.last());
        for w in all.windows(2) {
            assert_eq!(w[1].group_first_seq, w[0].last_seq + 1, "{w:?}");
        }
        assert!(all.iter().all(|h| h.verify(&key)));
        for g in &groups {
            assert!(all.contains(g), "{g:?}");
        }
        // From a seq inside the big group: that group first.
        let from = vault
            .heads(big.group_first_seq + 200, 2, usize::MAX)
            .expect("heads");
        assert_eq!(from.len(), 2);
        assert_eq!(from[0], big);
        assert_eq!(from[1].group_first_seq, big.last_seq + 1);
        // At most max; none past the end, nor with max 0.
        let heads = |from, max, bytes| vault.heads(from, max, bytes).expect("heads");
        assert_eq!(heads(0, 3, usize::MAX), all[..3].to_vec());
        let end = all.last().expect("a head").last_seq;
        assert!(heads(end + 1, 10, usize::MAX).is_empty());
        assert!(heads(u64::MAX, 10, usize::MAX).is_empty());
        assert!(heads(0, 0, usize::MAX).is_empty());
        // The bytes read past the first head bound the answer, which
        // always has that head: the big group's (over 240 KB of chunks)
        // ends a read from just before it with a budget of 100 KB.
        let before = big.group_first_seq - 1;
        let bounded = heads(before, 100, 100_000);
        assert_eq!(bounded.len(), 1, "{bounded:?}");
        assert_eq!(bounded[0].last_seq, before);
        assert_eq!(
            heads(before, 100, 10_000_000),
            all[all.len() - 5..].to_vec()
        );
        assert_eq!(heads(big.group_first_seq, 100, 0), vec![big]);
    };
    check(&vault);
    vault.close().expect("close");
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen");
    check(&vault);
    vault.close().expect("close");
}

/// Every regular file under `dir` with its bytes, sorted by path.
fn contents(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    files(dir)
        .into_iter()
        .map(|(rel, _)| {
            let bytes = std::fs::read(dir.join(&rel)).expect("read");
            (rel, bytes)
        })
        .collect()
}

/// `verify_read_only` of `dir` with a fresh scratch dir.
fn verify_ro(
    dir: &std::path::Path,
    key: ed25519_dalek::VerifyingKey,
) -> storage::Result<storage::Report> {
    let scratch = tempfile::tempdir().expect("scratch");
    storage::verify_read_only(
        dir,
        scratch.path(),
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn a_read_only_verify_replays_into_copies_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, key, before, live_wal, _) = forty_records_and_their_segments(tmp.path()).await;
    let closed = verify_ok(&dir, key);

    // What a crash leaves (a snapshot of a running vault): sled as before
    // the appends, the live segments, a torn record at the end of the last
    // one, and bytes past the log's last chunk.
    let crashed = tmp.path().join("crashed");
    copy_dir(&before, &crashed);
    copy_dir(&live_wal, &crashed.join("wal"));
    let mut segments: Vec<_> = std::fs::read_dir(crashed.join("wal"))
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment");
    let mut bytes = std::fs::read(last).expect("read");
    bytes.extend_from_slice(&[0, 0, 1]);
    std::fs::write(last, &bytes).expect("write");
    let mut chunks = std::fs::read(crashed.join("chunks")).expect("read");
    chunks.extend_from_slice(b"left by a crash");
    std::fs::write(crashed.join("chunks"), &chunks).expect("write");

    let untouched = contents(&crashed);
    let r = verify_ro(&crashed, key).expect("read-only verify runs");
    assert!(r.ok(), "read-only verify failed: {:?}", r.failure);
    assert_eq!((r.entries, r.head), (closed.entries, closed.head));
    assert_eq!(contents(&crashed), untouched, "the dir was written to");
    // Again: the segments are still there to replay.
    let again = verify_ro(&crashed, key).expect("runs again");
    assert_eq!((again.entries, again.head), (closed.entries, closed.head));
    assert_eq!(contents(&crashed), untouched);

    // An open that writes makes the same log of it.
    let written = tmp.path().join("written");
    copy_dir(&crashed, &written);
    let w = verify_ok(&written, key);
    assert_eq!((w.entries, w.head), (closed.entries, closed.head));
    assert_ne!(contents(&written), untouched);

    // A pointer sled kept whose bytes a power loss took: the replay's
    // repair goes to memory, not to the file.
    let lost = tmp.path().join("lost");
    copy_dir(&dir, &lost);
    copy_dir(&live_wal, &lost.join("wal"));
    let mut chunks = std::fs::read(lost.join("chunks")).expect("read");
    let n = chunks.len();
    chunks[n - 64..].fill(0);
    std::fs::write(lost.join("chunks"), &chunks).expect("write");
    let untouched = contents(&lost);
    let r = verify_ro(&lost, key).expect("runs");
    assert!(
        r.ok(),
        "read-only verify of a repaired log failed: {:?}",
        r.failure
    );
    assert_eq!((r.entries, r.head), (closed.entries, closed.head));
    assert_eq!(contents(&lost), untouched);
    // Without the write-ahead record, the zeros are what the log holds.
    std::fs::remove_dir_all(lost.join("wal")).expect("remove");
    let r = verify_ro(&lost, key).expect("runs");
    assert!(!r.ok(), "zeroed chunk bytes verified");

    // Tampering shows as it does to a verify that writes.
    let tampered = tmp.path().join("tampered");
    copy_dir(&dir, &tampered);
    let mut chunks = std::fs::read(tampered.join("chunks")).expect("read");
    let n = chunks.len();
    chunks[n / 2] ^= 1;
    std::fs::write(tampered.join("chunks"), &chunks).expect("write");
    let r = verify_ro(&tampered, key).expect("runs");
    assert!(!r.ok(), "a flipped bit verified");

    // A dir that a vault holds is refused, as by a verify that writes.
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    assert!(matches!(verify_ro(&dir, key), Err(Error::Locked)));
    vault.close().expect("close");
    wait_unlocked(&dir);
    assert!(verify_ro(&dir, key).expect("runs").ok());
    // And no vault at all.
    assert!(matches!(
        verify_ro(&tmp.path().join("none"), key),
        Err(Error::NotFound(_))
    ));
}

/// The indexer writes derived state key by key, in the keys' order,
/// resting after every 256 inserts: thousands of subjects' latest records,
/// written while the vault runs (an `index_batch` of 1 wakes it at once)
/// and at close, are all in the state tree, as verify and a reopen find.
#[tokio::test]
async fn derived_state_of_thousands_of_keys_reaches_the_tree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let opts = Options {
        index_batch: 1,
        ..Options::default()
    };
    let vault = Vault::create(&dir, &unlock(), opts.clone())
        .expect("create")
        .vault;
    let key = vault.public_key();
    let subjects: Vec<String> = (0..3000).map(|i| format!("cust-{i:05}")).collect();
    let mut last = Vec::new();
    for round in 0..2 {
        last.clear();
        for part in subjects.chunks(500) {
            let items = part
                .iter()
                .map(|s| Append::record(s, format!("{{\"r\":{round}}}").into_bytes()))
                .collect();
            last.extend(vault.append_batch(items).await.expect("append"));
        }
    }
    vault.close().expect("close");
    verify_ok(&dir, key);
    let vault = Vault::open(&dir, &unlock(), opts).expect("reopen");
    for (s, r) in subjects.iter().zip(&last) {
        let latest = vault
            .latest_record(s)
            .expect("latest record")
            .expect("a record");
        assert_eq!(latest.seq, r.seq, "{s}");
    }
    let report = vault.check_derived_state().expect("check");
    assert_eq!(report.differences, 0, "{report:?}");
    assert!(report.keys_compared >= 3000, "{report:?}");
    vault.close().expect("close");
}

/// A live comparison of the derived state finishes while appends go on
/// and the indexer writes after every group: after its first attempts it
/// holds the indexer off for one, and it finds the tree whole each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_reindex_finishes_under_a_steady_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let opts = Options {
        index_batch: 1,
        ..Options::default()
    };
    let vault = Arc::new(Vault::create(&dir, &unlock(), opts).expect("create").vault);
    // A state tree large enough that comparing it takes longer than the
    // indexer's writes come.
    let subjects: Vec<String> = (0..20_000).map(|i| format!("cust-{i:05}")).collect();
    for part in subjects.chunks(1000) {
        let items = part
            .iter()
            .map(|s| Append::record(s, b"{}".to_vec()))
            .collect();
        vault.append_batch(items).await.expect("append");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (vault, stop) = (vault.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = format!("cust-{:05}", (n * 16 + w) % 20_000);
                    vault
                        .append(Append::record(&s, format!("{{\"n\":{n}}}").into_bytes()))
                        .await
                        .expect("append");
                    n += 1;
                }
                n
            })
        })
        .collect();
    for _ in 0..3 {
        let v = vault.clone();
        let report = tokio::task::spawn_blocking(move || v.check_derived_state())
            .await
            .expect("join")
            .expect("a comparison under load");
        assert_eq!(report.differences, 0, "{report:?}");
        assert!(report.keys_compared >= 20_000, "{report:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut appended = 0;
    for w in writers {
        appended += w.await.expect("writer");
    }
    assert!(appended > 0);
    let vault = Arc::into_inner(vault).expect("the one vault");
    let key = vault.public_key();
    vault.close().expect("close");
    verify_ok(&dir, key);
}

/// The commit pipeline's counters: one group per lone append, each made
/// durable by an `fdatasync` that lands in one bucket, and the indexer's
/// write of the derived state those appends made.
#[tokio::test]
async fn pipeline_stats_count_groups_syncs_and_index_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        index_batch: 1,
        ..Options::default()
    };
    let vault = Vault::create(&tmp.path().join("v"), &unlock(), opts)
        .expect("create")
        .vault;
    let before = vault.pipeline_stats();
    for i in 0..5 {
        vault
            .append(Append::record(format!("cust-{i}"), b"{\"a\":1}".to_vec()))
            .await
            .expect("append");
    }
    let s = vault.pipeline_stats().since(&before);
    assert_eq!(
        s.groups, 5,
        "one group per append made one at a time: {s:?}"
    );
    assert!(s.syncs >= 1, "{s:?}");
    assert_eq!(s.sync_buckets.last(), Some(&s.syncs), "{s:?}");
    assert!(
        s.sync_buckets.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {s:?}"
    );
    assert!(s.sync_seconds > 0.0, "{s:?}");
    // The indexer writes the derived state of those appends (a data key
    // and a latest record per subject) soon after; a hang guard, not a
    // time limit on the write.
    let mut waited = 0;
    let written = loop {
        let s = vault.pipeline_stats().since(&before);
        if s.index_keys >= 10 || waited >= 600 {
            break s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    };
    assert!(written.index_writes >= 1, "{written:?}");
    assert!(written.index_keys >= 10, "{written:?}");
    vault.close().expect("close");
}
