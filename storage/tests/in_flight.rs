//! Redemptions are decided in log order, also against the changes of
//! groups that the writer has not published yet.
//!
//! The committer builds and signs a group, hands it to the writer, and
//! goes on with the next one; readers see a group's derived state only
//! once the writer publishes it. A redemption decided in the next group
//! must still find a consent revoked in the one before, and a token minted
//! there. The writer is held between its apply and its publish by a
//! failpoint callback (process wide, so this file has a binary of its own
//! and its cases run one after the other in one test).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use storage::{Append, Error, Kind, Options, TokenRefusal, Unlock, Vault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redemption_finds_the_changes_the_writer_has_not_published() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vault = Arc::new(
        Vault::create(
            &tmp.path().join("v"),
            &Unlock::passphrase(b"in-flight test".to_vec()),
            Options::default(),
        )
        .expect("create")
        .vault,
    );
    vault
        .append(Append::record("s1", br#"{"name":"x"}"#.to_vec()))
        .await
        .expect("append");
    let grant = serde_json::json!({"partner_id": "p1", "purposes": ["kyc"]});
    vault
        .append(Append::event(Kind::ConsentGranted, "s1", &grant))
        .await
        .expect("grant");
    let fields = vec![("name".to_string(), "reveal".to_string())];
    let token = vault
        .mint("p1", "s1", "kyc", fields, u64::MAX)
        .await
        .expect("mint");

    // A revocation stops the token.
    let revoke = serde_json::json!({"partner_id": "p1"});
    let (revoked, redeemed) = redeem_behind(
        &vault,
        Append::event(Kind::ConsentRevoked, "s1", &revoke),
        token.to_string(),
    )
    .await;
    revoked.expect("revoked");
    match redeemed {
        Err(Error::TokenRefused(TokenRefusal::ConsentRevoked)) => {}
        other => panic!("{:?}", other.map(|_| "redeemed")),
    }

    // A token its caller minted with an event of its own (its hash, and
    // the terms) is found, not refused as unknown.
    let grant = serde_json::json!({"partner_id": "p1", "purposes": ["kyc"]});
    vault
        .append(Append::event(Kind::ConsentGranted, "s1", &grant))
        .await
        .expect("granted again");
    let token = "fvt_minted_by_an_event_of_its_caller".to_string();
    let minted = serde_json::json!({
        "token_hash": storage::api_key_hash(&token),
        "partner_id": "p1",
        "subject": "s1",
        "purpose": "kyc",
        "fields": [["name", "reveal"]],
        "expires_at_ms": u64::MAX,
    });
    let (minted, redeemed) = redeem_behind(
        &vault,
        Append::event(Kind::TokenMinted, "s1", &minted),
        token,
    )
    .await;
    minted.expect("minted");
    let (terms, _) = redeemed.expect("redeemed");
    assert_eq!(terms.subject, "s1");
}

/// Appends `first` and holds the writer after it applied the group of
/// `first`, before it publishes it, while `token` is redeemed (by p1) in
/// the group after it; then lets the writer go on, and returns both
/// outcomes.
async fn redeem_behind(
    vault: &Arc<Vault>,
    first: Append,
    token: String,
) -> (
    storage::Result<Vec<storage::Receipt>>,
    storage::Result<(storage::state::TokenMinted, storage::Receipt)>,
) {
    // The writer stops after applying the next group (`first`'s), before
    // publishing it, until told to go on.
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (held_tx, go_rx) = (Mutex::new(held_tx), Mutex::new(go_rx));
    let holding = AtomicBool::new(true);
    fail::cfg_callback("commit::after_write", move || {
        if holding.swap(false, Ordering::AcqRel) {
            let _ = held_tx.lock().map(|tx| tx.send(()));
            let _ = go_rx.lock().map(|rx| rx.recv());
        }
    })
    .expect("arm");
    // Each group the committer builds from then on.
    let built = Arc::new(AtomicU64::new(0));
    let (built_tx, built_rx) = mpsc::channel::<()>();
    let built_tx = Mutex::new(built_tx);
    let counted = built.clone();
    fail::cfg_callback("commit::before_write", move || {
        counted.fetch_add(1, Ordering::AcqRel);
        let _ = built_tx.lock().map(|tx| tx.send(()));
    })
    .expect("arm");

    let appending = {
        let vault = vault.clone();
        tokio::spawn(async move { vault.append_batch(vec![first]).await })
    };
    let held_rx = tokio::task::spawn_blocking(move || {
        held_rx.recv().expect("the writer holds the first group");
        held_rx
    })
    .await
    .expect("join");
    // The first group is built, applied and not published; the
    // redemption comes in the group after it.
    let before = built.load(Ordering::Acquire);
    let redeeming = {
        let vault = vault.clone();
        tokio::spawn(async move { vault.redeem(&token, "p1", 5, None).await })
    };
    tokio::task::spawn_blocking(move || {
        while built.load(Ordering::Acquire) == before {
            built_rx.recv().expect("a group built");
        }
    })
    .await
    .expect("join");
    go_tx.send(()).expect("the writer goes on");
    fail::remove("commit::after_write");
    fail::remove("commit::before_write");
    drop(held_rx);
    (
        appending.await.expect("join"),
        redeeming.await.expect("join"),
    )
}
