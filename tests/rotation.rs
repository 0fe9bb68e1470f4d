//! Every key rotation while the vault is under load, through the server:
//! writers append and partners redeem tokens without pause while an admin
//! rotates the signing key (twice), a subject key (with re-encryption) and
//! the master key over the protocol, and shreds a subject. Not one request
//! may fail, every acknowledged record must be where its receipt says,
//! every receipt must verify through the key chain from the pinned key,
//! and the whole log must verify afterwards (over the wire, pinned key
//! only).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use client::{ErrorCode, MaskOp, Receipt, SecretKind};
use server::remote::{verify_remote, RemoteOptions};
use server::serve::ServeConfig;
use support::{start, Server, PARTNER};

/// Operations each load task must complete after a rotation before the
/// next one starts, so that every rotation overlaps load.
const OPS_BETWEEN: u64 = 15;

struct Load {
    stop: AtomicBool,
    appends: AtomicU64,
    redemptions: AtomicU64,
}

impl Load {
    /// Waits until both kinds of work made `n` more operations.
    async fn progress(&self, n: u64) {
        let (a, r) = (
            self.appends.load(Ordering::Relaxed),
            self.redemptions.load(Ordering::Relaxed),
        );
        while self.appends.load(Ordering::Relaxed) < a + n
            || self.redemptions.load(Ordering::Relaxed) < r + n
        {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Appends to ten subjects of its own until stopped; returns every
/// receipt with the subject and the value it wrote.
async fn writer(s: Arc<Server>, load: Arc<Load>, t: usize) -> Vec<(Receipt, String, String)> {
    let c = s.connect(&s.writer).await;
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        let subject = format!("load-{t}-{}", i % 10);
        let value = format!("v{i}");
        let r = c
            .append(subject.clone(), vec![("n".into(), value.clone())])
            .await
            .unwrap_or_else(|e| panic!("append {i} of writer {t} failed during a rotation: {e}"));
        acked.push((r, subject, value));
        load.appends.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    acked
}

/// Mints a token for a seeded subject and redeems it, until stopped.
async fn redeemer(s: Arc<Server>, load: Arc<Load>, t: usize) -> u64 {
    let admin = s.connect(&s.admin).await;
    let mut n = 0;
    while !load.stop.load(Ordering::Relaxed) {
        let subject = format!("seed-{}", (n as usize + t) % 3);
        let (token, _) = admin
            .mint(
                PARTNER,
                subject.as_str(),
                "kyc",
                vec![("name".into(), MaskOp::Reveal)],
                60,
            )
            .await
            .unwrap_or_else(|e| panic!("mint failed during a rotation: {e}"));
        // A redemption closes its connection: a new one each time.
        let got = s
            .connect(&s.partner)
            .await
            .redeem(&token)
            .await
            .unwrap_or_else(|e| panic!("redemption failed during a rotation: {e}"));
        assert_eq!(got.subject, subject);
        assert_eq!(got.fields, vec![("name".to_string(), subject.clone())]);
        load.redemptions.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rotation_under_load_loses_nothing_and_the_log_verifies() {
    let s = Arc::new(start(ServeConfig::default(), None).await);
    let pinned = s.public_key();
    let admin = s.connect(&s.admin).await;
    for i in 0..3 {
        let subject = format!("seed-{i}");
        admin
            .append(subject.as_str(), vec![("name".into(), subject.clone())])
            .await
            .expect("seed");
    }
    admin
        .append("to-shred", vec![("name".into(), "gone".into())])
        .await
        .expect("seed");

    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        appends: AtomicU64::new(0),
        redemptions: AtomicU64::new(0),
    });
    let writers: Vec<_> = (0..3)
        .map(|t| tokio::spawn(writer(s.clone(), load.clone(), t)))
        .collect();
    let redeemers: Vec<_> = (0..2)
        .map(|t| tokio::spawn(redeemer(s.clone(), load.clone(), t)))
        .collect();

    let mut rotation_receipts = Vec::new();
    load.progress(OPS_BETWEEN).await;
    let r = admin.rotate_signing_key().await.expect("signing rotation");
    assert_eq!((r.endorsement.key_id, r.receipt.head.key_id), (1, 0));
    rotation_receipts.push(r.receipt);
    load.progress(OPS_BETWEEN).await;
    let r = admin
        .rotate_subject_key("load-0-3", true)
        .await
        .expect("subject rotation");
    rotation_receipts.push(r.receipt);
    load.progress(OPS_BETWEEN).await;
    let r = admin
        .rotate_master_key(SecretKind::Passphrase, b"a new master passphrase")
        .await
        .expect("master rotation");
    rotation_receipts.push(r);
    load.progress(OPS_BETWEEN).await;
    let r = admin.rotate_signing_key().await.expect("signing rotation");
    assert_eq!((r.endorsement.key_id, r.receipt.head.key_id), (2, 1));
    rotation_receipts.push(r.receipt);
    load.progress(OPS_BETWEEN).await;
    rotation_receipts.push(admin.shred("to-shred").await.expect("shred"));
    load.progress(OPS_BETWEEN).await;
    load.stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer task"));
    }
    let mut redeemed = 0;
    for r in redeemers {
        redeemed += r.await.expect("redeemer task");
    }
    assert!(acked.len() as u64 >= 6 * OPS_BETWEEN && redeemed >= 6 * OPS_BETWEEN);

    // Every receipt verifies through the key chain from the pinned key,
    // and proves the entry the log holds at its seq.
    let chain = admin.key_chain(&pinned).await.expect("key chain");
    assert_eq!(chain.current_id(), 2);
    let auditor = s.connect(&s.auditor).await;
    let mut key_ids = std::collections::BTreeSet::new();
    for r in rotation_receipts
        .iter()
        .chain(acked.iter().map(|(r, _, _)| r))
    {
        r.verify_chain(&chain).expect("the receipt verifies");
        admin
            .verify_receipt(r, &pinned)
            .await
            .expect("the client verifies it too");
        key_ids.insert(r.head.key_id);
        let proof = auditor.proof(r.seq).await.expect("proof");
        assert_eq!(proof.entry_hash, r.entry_hash, "seq {}", r.seq);
    }
    assert_eq!(key_ids.len(), 3, "receipts signed by keys 0, 1 and 2");

    // Nothing acknowledged is lost: each subject's latest record is the
    // last value acknowledged for it.
    let mut last: HashMap<&str, &str> = HashMap::new();
    for (_, subject, value) in &acked {
        last.insert(subject, value);
    }
    for (subject, value) in last {
        let (token, _) = admin
            .mint(
                PARTNER,
                subject,
                "audit",
                vec![("n".into(), MaskOp::Reveal)],
                60,
            )
            .await
            .expect("mint");
        let got = s
            .connect(&s.partner)
            .await
            .redeem(&token)
            .await
            .expect("redeem");
        assert_eq!(got.fields, vec![("n".to_string(), value.to_string())]);
    }
    let refused = admin
        .mint(
            PARTNER,
            "to-shred",
            "audit",
            vec![("name".into(), MaskOp::Reveal)],
            60,
        )
        .await
        .expect_err("minting for a shredded subject is refused");
    assert_eq!(refused.server_code(), Some(ErrorCode::SubjectShredded));

    // The whole log verifies over the wire with the pinned key alone.
    let report = verify_remote(&RemoteOptions {
        client: s.plain(&s.auditor),
        public_key: ed25519_dalek::VerifyingKey::from_bytes(&pinned).expect("key"),
        page_entries: 500,
        sample_receipts: 16,
        progress: None,
        total_hint: None,
        kept_head: None,
    })
    .await
    .expect("remote verification runs");
    assert!(report.report.ok(), "{:?}", report.report.failure);
    assert_eq!(report.report.signing_keys.len(), 2);
    assert_eq!(report.report.shredded, vec!["to-shred".to_string()]);
}
