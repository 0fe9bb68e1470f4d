//! The tamper case no check inside a data dir can catch: the whole
//! directory rolled back to an older copy (or that copy extended into a
//! fork). The older copy is internally consistent, so `vault-verify` and
//! open accept it; a client that kept the newest signed head it saw
//! (`client::HeadTracker`) detects it at the next head the server
//! presents, and so does `vault-verify` given the head it kept
//! (`--head-file`; `VerifyOptions::kept_head` offline,
//! `RemoteOptions::kept_head` over the wire).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use client::{Client, ClientConfig, ClientError, HeadTracker, Tls, Zeroizing};
use server::remote::{verify_remote, RemoteOptions};
use server::serve::{run, ServeConfig};
use storage::{verify, Append, Options, Reason, Report, SignedHead, Unlock, Vault, VerifyOptions};

fn unlock() -> Unlock {
    Unlock::passphrase(b"rollback test".to_vec())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

/// Waits until sled's threads of a closed vault let go of the lock.
fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("open sled's data file");
    f.lock().expect("wait for sled's lock");
}

/// Serves the vault in `dir` until the returned sender is dropped, and
/// connects an auditor to it (the config is the auditor's).
async fn serve(
    dir: &Path,
) -> (
    Client,
    ClientConfig,
    tokio::sync::oneshot::Sender<()>,
    Arc<Vault>,
) {
    wait_unlocked(dir);
    let vault = Arc::new(Vault::open(dir, &unlock(), Options::default()).expect("open"));
    let (_, auditor) = vault
        .create_credential("auditor", "held-head client")
        .await
        .expect("auditor");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(
        listener,
        vault.clone().into(),
        ServeConfig::default(),
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let config = ClientConfig {
        addr: addr.to_string(),
        tls: Tls::Plaintext,
        api_key: Zeroizing::new(auditor.to_string()),
        client_name: "rollback test".into(),
        timeout: Duration::from_secs(10),
    };
    let client = Client::connect(config.clone()).await.expect("connect");
    (client, config, stop, vault)
}

/// The offline verification of `dir` with the pinned key and `kept`.
fn verify_kept(dir: &Path, pinned: ed25519_dalek::VerifyingKey, kept: SignedHead) -> Report {
    wait_unlocked(dir);
    verify(
        dir,
        &VerifyOptions {
            public_key: Some(pinned),
            kept_head: Some(kept),
            ..Default::default()
        },
    )
    .expect("verify runs")
}

/// The remote verification of the served vault with the pinned key and
/// `kept`.
async fn verify_remote_kept(
    config: &ClientConfig,
    pinned: ed25519_dalek::VerifyingKey,
    kept: SignedHead,
) -> Report {
    verify_remote(&RemoteOptions {
        client: config.clone(),
        public_key: pinned,
        page_entries: 100,
        sample_receipts: 4,
        progress: None,
        total_hint: None,
        kept_head: Some(kept),
    })
    .await
    .expect("remote verification runs")
    .report
}

async fn append(vault: &Vault, n: usize, tag: &str) {
    for i in 0..n {
        vault
            .append(Append::record(
                format!("cust-{i}"),
                format!("{{\"v\":\"{tag}-{i}\"}}").into_bytes(),
            ))
            .await
            .expect("append");
    }
}

/// A vault of three records in `dir`, closed, and a copy of it in `old`
/// (the older copy a rollback restores); returns its public key.
async fn a_vault_and_its_copy(dir: &Path, old: &Path) -> ed25519_dalek::VerifyingKey {
    let created = Vault::create(dir, &unlock(), Options::default()).expect("create");
    let pinned = created.vault.public_key();
    append(&created.vault, 3, "a").await;
    created.vault.close().expect("close");
    wait_unlocked(dir);
    copy_dir(dir, old);
    pinned
}

/// Stops a served vault and closes it.
async fn shut(client: Client, stop: tokio::sync::oneshot::Sender<()>, vault: Arc<Vault>) {
    drop(client);
    drop(stop);
    // The server task lets go of its handle once it has stopped.
    let mut vault = vault;
    let vault = loop {
        match Arc::try_unwrap(vault) {
            Ok(v) => break v,
            Err(v) => {
                vault = v;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    vault.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_rolled_back_or_forked_is_caught_by_the_held_head() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, old) = (tmp.path().join("v"), tmp.path().join("old"));
    let pinned = a_vault_and_its_copy(&dir, &old).await;

    // The client sees the vault grow, and keeps the newest head.
    let mut tracker = HeadTracker::new();
    let (client, config, stop, vault) = serve(&dir).await;
    let first = client
        .head()
        .await
        .expect("head")
        .signed_head
        .expect("a head");
    append(&vault, 3, "b").await;
    let newest = client
        .head()
        .await
        .expect("head")
        .signed_head
        .expect("a head");
    // Kept from the first head on, through the proof of the kept seq.
    let mut checked = HeadTracker::new();
    client
        .observe_head(&mut checked, &first, pinned.as_bytes())
        .await
        .expect("the first head");
    client
        .observe_head(&mut checked, &newest, pinned.as_bytes())
        .await
        .expect("a head that extends the first");
    assert_eq!(checked.newest(), Some(&newest));
    // A head far ahead, signed by another key (one a server could name as
    // its own): refused, and the tracker keeps what it had, so that true
    // heads are not taken for rollbacks after it.
    let other = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let forged = SignedHead::sign(
        &other,
        0,
        newest.last_seq + 1,
        u64::MAX - 1,
        [7; 32],
        [8; 32],
        newest.timestamp_ms,
    );
    let r = client
        .observe_head(&mut checked, &forged, pinned.as_bytes())
        .await;
    assert!(matches!(r, Err(ClientError::BadReceipt(_))), "{r:?}");
    assert_eq!(checked.newest(), Some(&newest));
    tracker.observe(&newest).expect("the first head");
    // The log that grew holds a head kept earlier, and its own.
    for kept in [first, newest] {
        let r = verify_remote_kept(&config, pinned, kept).await;
        assert!(r.ok(), "{:?}", r.failure);
    }
    shut(client, stop, vault).await;
    let r = verify_kept(&dir, pinned, newest);
    assert!(r.ok(), "{:?}", r.failure);

    // Roll the directory back to the older copy: it verifies on its own.
    wait_unlocked(&dir);
    std::fs::remove_dir_all(&dir).expect("remove");
    copy_dir(&old, &dir);
    let report = verify(
        &dir,
        &VerifyOptions {
            public_key: Some(pinned),
            ..Default::default()
        },
    )
    .expect("verify runs");
    assert!(
        report.ok(),
        "an older copy is consistent: {:?}",
        report.failure
    );

    // Given the head kept, it is a rollback.
    let r = verify_kept(&dir, pinned, newest);
    assert_eq!(r.failure, Some((newest.last_seq, Reason::RolledBack)));

    // Served again, its head is older than the one held: a rollback.
    let (client, config, stop, vault) = serve(&dir).await;
    let r = verify_remote_kept(&config, pinned, newest).await;
    assert_eq!(r.failure, Some((newest.last_seq, Reason::RolledBack)));
    let head = client
        .head()
        .await
        .expect("head")
        .signed_head
        .expect("a head");
    assert!(head.last_seq < newest.last_seq);
    assert!(matches!(
        tracker.observe(&head),
        Err(ClientError::Rollback { kept, got }) if kept == newest.last_seq && got == head.last_seq
    ));

    // Extended past the held head with other entries: a fork. Its heads
    // verify and do not go back, but the entry at the held seq is not the
    // one the held head names: a client that asks the proof of its held
    // seq catches it.
    append(&vault, 6, "fork").await;
    let forked = client
        .head()
        .await
        .expect("head")
        .signed_head
        .expect("a head");
    assert!(forked.last_seq >= newest.last_seq);
    let at_held = client.proof(newest.last_seq).await.expect("proof");
    at_held
        .verify(&pinned)
        .expect("the fork is signed by the vault's own key");
    assert_ne!(
        at_held.entry_hash, newest.last_hash,
        "the fork holds another entry at the held seq"
    );
    // Client::observe_head asks it.
    assert!(matches!(
        client.observe_head(&mut checked, &forked, pinned.as_bytes()).await,
        Err(ClientError::Rollback { kept, got }) if kept == newest.last_seq && got == forked.last_seq
    ));
    assert_eq!(
        checked.newest(),
        Some(&newest),
        "the fork's head is not kept"
    );
    // vault-verify with the kept head finds it, over the wire and offline.
    let r = verify_remote_kept(&config, pinned, newest).await;
    assert!(
        matches!(r.failure, Some((seq, Reason::Forked(_))) if seq == newest.last_seq),
        "{:?}",
        r.failure
    );
    // Never a wrong plaintext: every record is one this copy was given.
    for i in 0..6 {
        let r = vault
            .latest_record(&format!("cust-{i}"))
            .expect("read")
            .expect("a record");
        let v: serde_json::Value = serde_json::from_slice(&r.plaintext).expect("json");
        assert_eq!(v["v"], format!("fork-{i}"));
    }
    shut(client, stop, vault).await;
    let r = verify_kept(&dir, pinned, newest);
    assert!(
        matches!(r.failure, Some((seq, Reason::Forked(_))) if seq == newest.last_seq),
        "{:?}",
        r.failure
    );
    // A head no key of the log signed is no head of this log.
    let mut forged = newest;
    forged.signature[0] ^= 1;
    let r = verify_kept(&dir, pinned, forged);
    assert!(
        matches!(r.failure, Some((_, Reason::Forked(_)))),
        "{:?}",
        r.failure
    );
}

/// A copy from before a signing key's rotation, given a head kept after it
/// (signed by the new key, which the copy's key chain lacks): a rollback,
/// as a restored backup is, not a fork.
#[tokio::test]
async fn a_copy_from_before_a_signing_rotation_is_a_rollback() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dir, old) = (tmp.path().join("v"), tmp.path().join("old"));
    let pinned = a_vault_and_its_copy(&dir, &old).await;
    let vault = Vault::open(&dir, &unlock(), Options::default()).expect("open");
    vault.rotate_signing_key().await.expect("rotate");
    append(&vault, 3, "b").await;
    vault.close().expect("close");
    wait_unlocked(&dir);
    let grown = verify_kept(
        &dir,
        pinned,
        verify(
            &dir,
            &VerifyOptions {
                public_key: Some(pinned),
                ..Default::default()
            },
        )
        .expect("verify runs")
        .signed_head
        .expect("a head"),
    );
    assert!(grown.ok(), "{:?}", grown.failure);
    let kept = grown.signed_head.expect("a head");
    assert_eq!(kept.key_id, 1, "signed by the rotated key");
    let r = verify_kept(&old, pinned, kept);
    assert_eq!(r.failure, Some((kept.last_seq, Reason::RolledBack)));
}
