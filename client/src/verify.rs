//! What a client checks for itself, with nothing but the vault's public
//! key: that a receipt proves its entry is in the signed log
//! ([`verify_receipt`]), and that the vault never goes back in time
//! ([`HeadTracker`]).
//!
//! A receipt alone cannot reveal a rollback: an old copy of a vault
//! directory holds validly signed heads too. Only a client that remembers
//! the newest head it has seen can notice when a server presents an older
//! one, or a different one for the same seq (a fork).

use ed25519_dalek::VerifyingKey;
use protocol::receipt::{Receipt, ReceiptError, SignedHead};

use crate::error::{ClientError, Result};

/// The vault's public key from its 32 bytes. Bytes that are not an ed25519
/// point can verify nothing, so they count as a bad signature.
pub(crate) fn verifying_key(public_key: &[u8; 32]) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(public_key)
        .map_err(|_| ClientError::BadReceipt(ReceiptError::BadSignature))
}

/// Checks that `receipt` proves its entry is in the log signed by
/// `public_key`: the head's signature, then the Merkle path from the entry
/// hash to the signed group root.
///
/// `public_key` must be the key that signed the head: the vault's key 0,
/// printed once by `vaultd init` and pinned out of band, until its first
/// signing key rotation. A head signed by another key than the one given
/// fails as [`ReceiptError::UnknownKey`] with its key id, not as a bad
/// signature: [`Client::verify_receipt`](crate::Client::verify_receipt)
/// checks such a receipt by following the vault's key chain from the
/// pinned key. The key [`Client::head`](crate::Client::head) returns comes
/// from the server being checked.
///
/// ```
/// # fn demo(receipt: &protocol::receipt::Receipt, pinned_key: &[u8; 32]) -> client::Result<()> {
/// client::verify_receipt(receipt, pinned_key)?;
/// # Ok(()) }
/// ```
pub fn verify_receipt(receipt: &Receipt, public_key: &[u8; 32]) -> Result<()> {
    match receipt.verify(&verifying_key(public_key)?) {
        // Key 0 is what callers pin; a rotated key is another question
        // than a forged head, and is named as such.
        Err(ReceiptError::BadSignature) if receipt.head.key_id != 0 => Err(
            ClientError::BadReceipt(ReceiptError::UnknownKey(receipt.head.key_id)),
        ),
        r => Ok(r?),
    }
}

/// The newest signed head a client has seen, to detect a vault rolled back
/// to an older copy of its directory, or forked.
///
/// Invariant: `newest` is the head with the highest `last_seq` among those
/// passed to [`HeadTracker::observe`] (the first one seen wins among equal
/// seqs, which all carry the same `last_hash`, or `observe` refused them).
/// The tracker compares heads only; check their signatures first
/// ([`Client::head`](crate::Client::head) and [`verify_receipt`] do). On
/// its own it sees a head that went back, not a fork grown past the head
/// kept: [`Client::observe_head`](crate::Client::observe_head) also asks
/// the vault for the proof of the kept seq, and catches both. A
/// long-lived service keeps its tracker across reconnects, and ideally
/// across restarts, since a rollback is only visible against memory.
///
/// ```
/// # fn demo(old: protocol::receipt::SignedHead, new: protocol::receipt::SignedHead) -> client::Result<()> {
/// let mut tracker = client::HeadTracker::new();
/// tracker.observe(&old)?;
/// tracker.observe(&new)?; // Err(Rollback) if `new` is older than `old`
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadTracker {
    newest: Option<SignedHead>,
}

impl HeadTracker {
    /// A tracker that has seen nothing.
    pub fn new() -> Self {
        HeadTracker::default()
    }

    /// A tracker that starts from a head remembered from an earlier run.
    pub fn starting_from(head: SignedHead) -> Self {
        HeadTracker { newest: Some(head) }
    }

    /// The newest head seen so far.
    pub fn newest(&self) -> Option<&SignedHead> {
        self.newest.as_ref()
    }

    /// Refuses `new` if its `last_seq` is lower than the newest head's, or
    /// equal with another `last_hash`. Does not remember `new`.
    pub fn check_not_rolled_back(&self, new: &SignedHead) -> Result<()> {
        let Some(kept) = &self.newest else {
            return Ok(());
        };
        let older = new.last_seq < kept.last_seq;
        let forked = new.last_seq == kept.last_seq && new.last_hash != kept.last_hash;
        if older || forked {
            return Err(ClientError::Rollback {
                kept: kept.last_seq,
                got: new.last_seq,
            });
        }
        Ok(())
    }

    /// [`HeadTracker::check_not_rolled_back`], then keeps `new` if it is
    /// newer than the head kept so far.
    pub fn observe(&mut self, new: &SignedHead) -> Result<()> {
        self.check_not_rolled_back(new)?;
        if self.newest.is_none_or(|kept| new.last_seq > kept.last_seq) {
            self.newest = Some(*new);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use protocol::receipt::{merkle_root, MerkleTree};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn head(last_seq: u64, hash_byte: u8) -> SignedHead {
        let last_hash = [hash_byte; 32];
        SignedHead::sign(
            &key(),
            0,
            last_seq,
            last_seq,
            last_hash,
            merkle_root(&[last_hash]),
            1_764_000_000_000 + last_seq,
        )
    }

    /// A receipt of a group signed by a rotated key verifies with that key;
    /// against the pinned key 0 it is named as another key's, while a head
    /// of key 0 that does not verify stays a bad signature.
    #[test]
    fn a_receipt_of_a_rotated_key_is_named_not_called_forged() {
        let rotated = SigningKey::from_bytes(&[9u8; 32]);
        let entry_hash = [4u8; 32];
        let receipt = |signer: &SigningKey, key_id: u32| Receipt {
            seq: 3,
            entry_hash,
            path: Vec::new(),
            head: SignedHead::sign(
                signer,
                key_id,
                3,
                3,
                entry_hash,
                MerkleTree::new(&[entry_hash]).root(),
                1_764_000_000_000,
            ),
        };
        let pinned = key().verifying_key().to_bytes();
        let by_rotated = receipt(&rotated, 2);
        verify_receipt(&by_rotated, &rotated.verifying_key().to_bytes()).expect("its own key");
        match verify_receipt(&by_rotated, &pinned) {
            Err(ClientError::BadReceipt(ReceiptError::UnknownKey(2))) => {}
            other => panic!("{other:?}"),
        }
        verify_receipt(&receipt(&key(), 0), &pinned).expect("key 0");
        match verify_receipt(&receipt(&rotated, 0), &pinned) {
            Err(ClientError::BadReceipt(ReceiptError::BadSignature)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn newer_heads_are_accepted_and_kept() {
        let mut t = HeadTracker::new();
        assert_eq!(t.newest(), None);
        t.observe(&head(3, 1)).expect("first head");
        t.observe(&head(5, 2)).expect("newer head");
        assert_eq!(t.newest().map(|h| h.last_seq), Some(5));
        // The same head again is not a rollback.
        t.observe(&head(5, 2)).expect("same head");
        assert_eq!(t.newest(), Some(&head(5, 2)));
    }

    #[test]
    fn an_older_head_is_refused_and_not_kept() {
        let mut t = HeadTracker::starting_from(head(9, 1));
        match t.observe(&head(4, 1)) {
            Err(ClientError::Rollback { kept: 9, got: 4 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(t.newest().map(|h| h.last_seq), Some(9));
        assert!(t.check_not_rolled_back(&head(10, 3)).is_ok());
    }

    #[test]
    fn a_fork_at_the_same_seq_is_refused() {
        let t = HeadTracker::starting_from(head(9, 1));
        match t.check_not_rolled_back(&head(9, 2)) {
            Err(ClientError::Rollback { kept: 9, got: 9 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn receipts_verify_only_with_the_signing_key() {
        let hashes: Vec<[u8; 32]> = (0..3u8).map(|i| [i; 32]).collect();
        let head = SignedHead::sign(&key(), 0, 10, 12, hashes[2], merkle_root(&hashes), 5);
        let receipt = Receipt {
            seq: 11,
            entry_hash: hashes[1],
            path: MerkleTree::new(&hashes).path(1),
            head,
        };
        let public = key().verifying_key().to_bytes();
        verify_receipt(&receipt, &public).expect("verifies");
        let other = SigningKey::from_bytes(&[8u8; 32])
            .verifying_key()
            .to_bytes();
        assert!(matches!(
            verify_receipt(&receipt, &other),
            Err(ClientError::BadReceipt(ReceiptError::BadSignature))
        ));
        let mut moved = receipt.clone();
        moved.entry_hash = hashes[0];
        assert!(matches!(
            verify_receipt(&moved, &public),
            Err(ClientError::BadReceipt(ReceiptError::BadPath))
        ));
    }
}
