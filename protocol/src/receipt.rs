//! Signed heads, Merkle trees over commit groups, and receipts: what the
//! vault signs and what a client checks with nothing but the vault's
//! public key. Shared by the storage engine, which makes them, and the
//! client, which verifies them; their bytes are documented in
//! `docs/storage.md`.
//!
//! ```text
//! signed head (HEAD_LEN = 157 bytes, integers big-endian)
//! 0     1  version = 1
//! 1     4  signing key id
//! 5     8  group_first_seq
//! 13    8  last_seq
//! 21   32  last_hash     hash of entry last_seq: commits to the whole chain
//! 53   32  group_root    Merkle root of the hashes of group_first_seq..=last_seq
//! 85    8  timestamp     unix milliseconds
//! 93   64  ed25519 signature over "fintrust-vault/head/v1\0" || bytes 0..93
//!
//! receipt
//! 0     1  version = 1
//! 1     8  seq
//! 9    32  entry_hash
//! 41    1  path_len (0..=32)
//! 42       path_len x 32  Merkle audit path, leaf to root
//!          signed head (HEAD_LEN bytes)
//! ```
//!
//! The Merkle tree is RFC 6962's over the entry hashes as leaves:
//! `leaf = BLAKE3(0x00 || entry_hash)`, `node = BLAKE3(0x01 || left || right)`.
//!
//! Signing keys rotate: key 0 is the one genesis names (the key clients
//! pin); key n+1 is introduced by a `key_rotated` entry carrying a
//! [`KeyEndorsement`], which key n signs. A head carries the id of the key
//! that signed it, and a [`KeyChain`] (the pinned key plus the
//! endorsements, checked in order) turns ids into keys.
//!
//! ```text
//! key endorsement (ENDORSEMENT_LEN = 108 bytes)
//! 0     4  key id         n + 1
//! 4    32  public key     ed25519 verifying key n + 1
//! 36    8  seq            seq of the key_rotated entry that carries it
//! 44   64  ed25519 signature by key n over
//!          "fintrust-vault/key-endorsement/v1\0" || bytes 0..44
//! ```

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::error::{Error, Result};
use crate::hashing::hash_all;
use crate::wire::Reader;

/// A 32-byte BLAKE3 hash.
pub type Hash = [u8; 32];

/// Length of an encoded signed head.
pub const HEAD_LEN: usize = 157;
/// Domain tag of head signatures.
pub const HEAD_DOMAIN: &[u8] = b"fintrust-vault/head/v1\0";

/// A signed commitment to the chain up to `last_seq`, and to the group
/// `group_first_seq..=last_seq` by its Merkle root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    /// Id of the signing key that signed the head: 0 until the first signing
    /// rotation, then the id of the key in force.
    pub key_id: u32,
    /// Seq of the first entry of the commit group.
    pub group_first_seq: u64,
    /// Seq of the group's last entry (at least `group_first_seq`): the log
    /// holds `last_seq + 1` entries as of this head.
    pub last_seq: u64,
    /// `entry_hash` of entry `last_seq`, which commits to the whole chain
    /// through the entries' `prev_hash` links.
    pub last_hash: Hash,
    /// Merkle root of the entry hashes of `group_first_seq..=last_seq`.
    pub group_root: Hash,
    /// The timestamp of entry `last_seq`, in ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// ed25519 signature (R ‖ S) over [`HEAD_DOMAIN`] followed by the
    /// encoding's first 93 bytes.
    pub signature: [u8; 64],
}

impl SignedHead {
    fn signed_bytes(&self) -> [u8; 93] {
        let mut b = [0u8; 93];
        b[0] = 1;
        b[1..5].copy_from_slice(&self.key_id.to_be_bytes());
        b[5..13].copy_from_slice(&self.group_first_seq.to_be_bytes());
        b[13..21].copy_from_slice(&self.last_seq.to_be_bytes());
        b[21..53].copy_from_slice(&self.last_hash);
        b[53..85].copy_from_slice(&self.group_root);
        b[85..93].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b
    }

    fn message(&self) -> Vec<u8> {
        [HEAD_DOMAIN, &self.signed_bytes()].concat()
    }

    /// Builds and signs a head.
    pub fn sign(
        key: &SigningKey,
        key_id: u32,
        group_first_seq: u64,
        last_seq: u64,
        last_hash: Hash,
        group_root: Hash,
        timestamp_ms: u64,
    ) -> Self {
        let mut h = SignedHead {
            key_id,
            group_first_seq,
            last_seq,
            last_hash,
            group_root,
            timestamp_ms,
            signature: [0; 64],
        };
        h.signature = key.sign(&h.message()).to_bytes();
        h
    }

    /// Checks the signature with `verify_strict`.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        key.verify_strict(&self.message(), &Signature::from_bytes(&self.signature))
            .is_ok()
    }

    /// Appends the [`HEAD_LEN`]-byte encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.signed_bytes());
        out.extend_from_slice(&self.signature);
    }

    /// The [`HEAD_LEN`]-byte encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEAD_LEN);
        self.encode_into(&mut v);
        v
    }

    /// Decodes exactly one head: another version, a group whose first seq is
    /// past its last, or a byte too few or too many is `Malformed`. The
    /// signature is not checked ([`SignedHead::verify`]).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        let h = Self::read(&mut r)?;
        if r.remaining() != 0 {
            return Err(Error::Malformed("trailing bytes after head"));
        }
        Ok(h)
    }

    fn read(r: &mut Reader<'_>) -> Result<Self> {
        if r.u8()? != 1 {
            return Err(Error::Malformed("unknown head version"));
        }
        let h = SignedHead {
            key_id: r.u32()?,
            group_first_seq: r.u64()?,
            last_seq: r.u64()?,
            last_hash: r.array()?,
            group_root: r.array()?,
            timestamp_ms: r.u64()?,
            signature: r.array()?,
        };
        if h.group_first_seq > h.last_seq {
            return Err(Error::Malformed("head covers an empty group"));
        }
        Ok(h)
    }
}

// One-shot hashes of a stack buffer: for inputs this small, setting up an
// incremental `Hasher` costs more than the compression itself.
fn leaf_hash(entry_hash: &Hash) -> Hash {
    let mut b = [0u8; 33];
    b[1..].copy_from_slice(entry_hash);
    *blake3::hash(&b).as_bytes()
}

/// The first byte of a node's hash input (a leaf's is 0x00).
const NODE_TAG: u8 = 0x01;

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut b = [NODE_TAG; 65];
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    *blake3::hash(&b).as_bytes()
}

/// A Merkle tree over a commit group, built once so that every entry's
/// audit path costs O(log n). Building level by level and promoting a lone
/// right node unchanged gives exactly RFC 6962's tree hash.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Builds the tree. Panics on an empty slice: a group is never empty.
    pub fn new(entry_hashes: &[Hash]) -> Self {
        assert!(!entry_hashes.is_empty(), "merkle tree of nothing");
        let mut levels = vec![entry_hashes.iter().map(leaf_hash).collect::<Vec<_>>()];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            // A level's nodes side by side: each is BLAKE3(0x01 || l || r),
            // as `node_hash` computes one.
            let pairs: Vec<[u8; 64]> = last
                .chunks_exact(2)
                .map(|p| {
                    let mut b = [0u8; 64];
                    b[..32].copy_from_slice(&p[0]);
                    b[32..].copy_from_slice(&p[1]);
                    b
                })
                .collect();
            let inputs: Vec<&[u8]> = pairs.iter().map(|p| &p[..]).collect();
            let mut next = hash_all(&[NODE_TAG], &inputs);
            if last.len() % 2 == 1 {
                next.push(last[last.len() - 1]);
            }
            levels.push(next);
        }
        MerkleTree { levels }
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        self.levels[self.levels.len() - 1][0]
    }

    /// The audit path of leaf `index`, leaf to root.
    pub fn path(&self, mut index: usize) -> Vec<Hash> {
        let mut path = Vec::with_capacity(self.levels.len());
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = index ^ 1;
            if sibling < level.len() {
                path.push(level[sibling]);
            }
            index >>= 1;
        }
        path
    }
}

/// RFC 6962 Merkle tree hash over entry hashes. Panics on an empty slice.
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    MerkleTree::new(leaves).root()
}

/// Recomputes the root from a leaf, its index, the tree size and the path.
pub fn root_from_path(entry_hash: &Hash, index: u64, size: u64, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    // Iterative form of RFC 9162 §2.1.3.2 inclusion verification.
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = leaf_hash(entry_hash);
    for p in path {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
}

/// Length of an encoded key endorsement.
pub const ENDORSEMENT_LEN: usize = 108;
/// Domain tag of key endorsements.
pub const ENDORSEMENT_DOMAIN: &[u8] = b"fintrust-vault/key-endorsement/v1\0";

/// Signing key `key_id - 1` vouching for key `key_id`, from the log entry
/// at `seq` on: every head after the commit group holding that entry is
/// signed by the new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEndorsement {
    /// The endorsed key's id, one above the endorsing key's.
    pub key_id: u32,
    /// The endorsed key: its ed25519 verifying key bytes.
    pub public_key: [u8; 32],
    /// Seq of the `key_rotated` entry that carries the endorsement.
    pub seq: u64,
    /// ed25519 signature by key `key_id - 1` over [`ENDORSEMENT_DOMAIN`]
    /// followed by the encoding's first 44 bytes.
    pub signature: [u8; 64],
}

impl KeyEndorsement {
    fn signed_bytes(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[..4].copy_from_slice(&self.key_id.to_be_bytes());
        b[4..36].copy_from_slice(&self.public_key);
        b[36..44].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn message(&self) -> Vec<u8> {
        [ENDORSEMENT_DOMAIN, &self.signed_bytes()].concat()
    }

    /// `old` (key `key_id - 1`) endorses `new` as key `key_id`.
    pub fn sign(old: &SigningKey, key_id: u32, new: &VerifyingKey, seq: u64) -> Self {
        let mut e = KeyEndorsement {
            key_id,
            public_key: new.to_bytes(),
            seq,
            signature: [0; 64],
        };
        e.signature = old.sign(&e.message()).to_bytes();
        e
    }

    /// Checks the signature of the previous key with `verify_strict`.
    pub fn verify(&self, previous: &VerifyingKey) -> bool {
        previous
            .verify_strict(&self.message(), &Signature::from_bytes(&self.signature))
            .is_ok()
    }

    /// The [`ENDORSEMENT_LEN`]-byte encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENDORSEMENT_LEN);
        v.extend_from_slice(&self.signed_bytes());
        v.extend_from_slice(&self.signature);
        v
    }

    /// Decodes exactly [`ENDORSEMENT_LEN`] bytes (fewer or more are
    /// `Malformed`). Neither the signature nor the key is checked
    /// ([`KeyChain::push`] does).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        let e = KeyEndorsement {
            key_id: r.u32()?,
            public_key: r.array()?,
            seq: r.u64()?,
            signature: r.array()?,
        };
        if r.remaining() != 0 {
            return Err(Error::Malformed("trailing bytes after key endorsement"));
        }
        Ok(e)
    }
}

/// The signing keys of a vault by id, from the pinned key 0 through each
/// endorsement in turn.
///
/// Invariant: `keys[n]` is key id `n`; each key after the first was
/// endorsed by the one before it, with strictly increasing seqs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChain {
    keys: Vec<VerifyingKey>,
    endorsements: Vec<KeyEndorsement>,
}

/// Why a chain of endorsements does not lead from the pinned key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("endorsement {index} names key id {found}, not {expected}")]
    /// The endorsement does not name the key after the chain's newest.
    OutOfOrder {
        /// Position of the endorsement in those checked, from 0.
        index: usize,
        /// The key id it names.
        found: u32,
        /// The id of the next key: the chain's newest plus one.
        expected: u32,
    },
    #[error("endorsement of key {key_id} is not signed by the key before it")]
    /// The endorsement's signature does not verify with the chain's newest key.
    BadSignature {
        /// The key id the endorsement names.
        key_id: u32,
    },
    #[error("endorsement of key {key_id} holds no valid public key")]
    /// The endorsed public key is not a valid ed25519 key, or is a weak
    /// (small-order) one.
    BadKey {
        /// The key id the endorsement names.
        key_id: u32,
    },
    #[error("endorsement of key {key_id} does not follow the previous one in the log")]
    /// The endorsement's seq is not after the previous endorsement's.
    SeqOrder {
        /// The key id the endorsement names.
        key_id: u32,
    },
}

impl KeyChain {
    /// A chain holding only the pinned key 0.
    pub fn new(pinned: VerifyingKey) -> Self {
        KeyChain {
            keys: vec![pinned],
            endorsements: Vec::new(),
        }
    }

    /// The pinned key, then every endorsement checked in order.
    pub fn from_endorsements(
        pinned: VerifyingKey,
        endorsements: &[KeyEndorsement],
    ) -> std::result::Result<Self, ChainError> {
        let mut chain = KeyChain::new(pinned);
        for (index, e) in endorsements.iter().enumerate() {
            chain.push(index, e)?;
        }
        Ok(chain)
    }

    /// Adds the next endorsement, checked against the current key.
    pub fn push(
        &mut self,
        index: usize,
        e: &KeyEndorsement,
    ) -> std::result::Result<(), ChainError> {
        let key = self.check_next(index, e)?;
        self.keys.push(key);
        self.endorsements.push(*e);
        Ok(())
    }

    /// Checks that `e` (the `index`-th endorsement) would extend the chain:
    /// the next key id, a later seq, signed by the current key. Returns
    /// the key it endorses.
    pub fn check_next(
        &self,
        index: usize,
        e: &KeyEndorsement,
    ) -> std::result::Result<VerifyingKey, ChainError> {
        let expected = self.current_id().saturating_add(1);
        if e.key_id != expected {
            return Err(ChainError::OutOfOrder {
                index,
                found: e.key_id,
                expected,
            });
        }
        if self.endorsements.last().is_some_and(|p| p.seq >= e.seq) {
            return Err(ChainError::SeqOrder { key_id: e.key_id });
        }
        if !e.verify(self.current()) {
            return Err(ChainError::BadSignature { key_id: e.key_id });
        }
        // A weak (small-order) key would make every head it signs fail
        // `verify_strict`: refused as no key.
        VerifyingKey::from_bytes(&e.public_key)
            .ok()
            .filter(|k| !k.is_weak())
            .ok_or(ChainError::BadKey { key_id: e.key_id })
    }

    /// The key of `key_id`, if the chain reaches it.
    pub fn key(&self, key_id: u32) -> Option<&VerifyingKey> {
        self.keys.get(usize::try_from(key_id).ok()?)
    }

    /// The newest key.
    pub fn current(&self) -> &VerifyingKey {
        // `keys` always holds the pinned key.
        &self.keys[self.keys.len() - 1]
    }

    /// The newest key's id.
    pub fn current_id(&self) -> u32 {
        u32::try_from(self.keys.len() - 1).unwrap_or(u32::MAX)
    }

    /// The endorsements, in order.
    pub fn endorsements(&self) -> &[KeyEndorsement] {
        &self.endorsements
    }

    /// The key that may have signed `head`: the one its id names, if the
    /// head's group lies within the seqs that key signed. Key k ≥ 1 signs
    /// only the groups after the one holding its endorsement's
    /// `key_rotated` entry, and a retired key only up to the group holding
    /// the entry that retired it (`docs/storage.md`, section 5): a leaked
    /// old key cannot vouch for a group that begins past its rotation.
    /// A head's bounds are the signer's word, though: one under the old
    /// key that claims a group from before the rotation to far past it
    /// passes this check, and only a verifier of the log itself (or of
    /// the proof of the rotation's seq, which must name the same group)
    /// can tell.
    pub fn key_for(&self, head: &SignedHead) -> Result<&VerifyingKey, ReceiptError> {
        let id = head.key_id;
        let key = self.key(id).ok_or(ReceiptError::UnknownKey(id))?;
        let index = usize::try_from(id).map_err(|_| ReceiptError::UnknownKey(id))?;
        let endorsed_at = index
            .checked_sub(1)
            .and_then(|i| self.endorsements.get(i))
            .map(|e| e.seq);
        if endorsed_at.is_some_and(|seq| head.group_first_seq <= seq) {
            return Err(ReceiptError::OutsideKeyLifetime(id));
        }
        let retired_at = self.endorsements.get(index).map(|e| e.seq);
        if retired_at.is_some_and(|seq| head.group_first_seq > seq) {
            return Err(ReceiptError::OutsideKeyLifetime(id));
        }
        Ok(key)
    }

    /// Checks `head` with the key its id names, within that key's seqs
    /// ([`KeyChain::key_for`]).
    pub fn verify_head(&self, head: &SignedHead) -> bool {
        self.key_for(head).is_ok_and(|k| head.verify(k))
    }
}

/// Proof that an acknowledged entry is in the signed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Seq of the entry proven.
    pub seq: u64,
    /// `entry_hash` of that entry (`docs/storage.md`).
    pub entry_hash: Hash,
    /// Merkle audit path from the entry's leaf to the group root, leaf to
    /// root; at most 32 hashes.
    pub path: Vec<Hash>,
    /// The signed head of the commit group that holds the entry.
    pub head: SignedHead,
}

/// Most entries of one commit group: the vault closes a group well before
/// (`storage::vault::MAX_GROUP_ITEMS`), and a verification refuses a
/// larger one; so does a receipt's check.
pub const MAX_GROUP_ENTRIES: u64 = 1 << 20;

/// Why a receipt does not check out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the head's signature does not verify")]
    /// The head's signature does not verify with the key given, or with the
    /// one the key chain names.
    BadSignature,
    #[error("the entry is not in the group the head covers")]
    /// The receipt's seq is outside the head's `group_first_seq..=last_seq`.
    NotCovered,
    #[error("the Merkle path does not lead to the signed root")]
    /// The audit path does not lead from the entry hash to the head's group
    /// root, the group is larger than [`MAX_GROUP_ENTRIES`], or the group's
    /// last entry's hash is not the head's `last_hash`.
    BadPath,
    #[error("the head is signed by key {0}, which the key chain does not reach")]
    /// The head names a signing key (this id) past the newest the key chain
    /// reaches.
    UnknownKey(u32),
    #[error("the head is signed by key {0}, for a group outside the seqs that key signed")]
    /// The head names a signing key (this id) that did not sign its group's
    /// seqs: endorsed after the group began, or retired before
    /// ([`KeyChain::key_for`]).
    OutsideKeyLifetime(u32),
}

impl Receipt {
    /// Checks the receipt against the vault's public key (a head signed by
    /// a rotated key needs [`Receipt::verify_chain`]).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), ReceiptError> {
        if !self.head.verify(key) {
            return Err(ReceiptError::BadSignature);
        }
        self.verify_path()
    }

    /// Checks the receipt with the key of the chain its head names, within
    /// that key's seqs ([`KeyChain::key_for`]).
    pub fn verify_chain(&self, chain: &KeyChain) -> Result<(), ReceiptError> {
        self.verify(chain.key_for(&self.head)?)
    }

    fn verify_path(&self) -> Result<(), ReceiptError> {
        let h = &self.head;
        if self.seq < h.group_first_seq || self.seq > h.last_seq {
            return Err(ReceiptError::NotCovered);
        }
        // `first <= seq <= last` here, so the subtraction holds; the + 1
        // overflows for a head over every seq (0..=u64::MAX), which no real
        // group is, and which must be a refusal rather than a panic.
        let size = (h.last_seq - h.group_first_seq)
            .checked_add(1)
            .ok_or(ReceiptError::BadPath)?;
        // No group is larger (a verification refuses one): a head over more
        // seqs is not one the vault signed, and one a leaked retired key
        // signs could otherwise cover any seq after its rotation.
        if size > MAX_GROUP_ENTRIES {
            return Err(ReceiptError::BadPath);
        }
        let root = root_from_path(
            &self.entry_hash,
            self.seq - h.group_first_seq,
            size,
            &self.path,
        )
        .ok_or(ReceiptError::BadPath)?;
        if root != h.group_root {
            return Err(ReceiptError::BadPath);
        }
        if self.seq == h.last_seq && self.entry_hash != h.last_hash {
            return Err(ReceiptError::BadPath);
        }
        Ok(())
    }

    /// The encoding: version 1, seq, entry hash, path length and path, then
    /// the signed head.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42 + 32 * self.path.len() + HEAD_LEN);
        out.push(1);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.entry_hash);
        out.push(self.path.len() as u8);
        for p in &self.path {
            out.extend_from_slice(p);
        }
        self.head.encode_into(&mut out);
        out
    }

    /// Decodes exactly one receipt: another version, a path over 32 hashes, a
    /// head that does not decode, or a byte too few or too many is
    /// `Malformed`. Nothing is verified ([`Receipt::verify`]).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        if r.u8()? != 1 {
            return Err(Error::Malformed("unknown receipt version"));
        }
        let seq = r.u64()?;
        let entry_hash = r.array()?;
        let n = r.u8()?;
        if n > 32 {
            return Err(Error::Malformed("receipt path too long"));
        }
        let mut path = Vec::with_capacity(n as usize);
        for _ in 0..n {
            path.push(r.array()?);
        }
        let head = SignedHead::read(&mut r)?;
        if r.remaining() != 0 {
            return Err(Error::Malformed("trailing bytes after receipt"));
        }
        Ok(Receipt {
            seq,
            entry_hash,
            path,
            head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_be_bytes()).as_bytes())
            .collect()
    }

    /// RFC 6962's recursive definition, as the model.
    fn rfc6962_root(l: &[Hash]) -> Hash {
        if l.len() == 1 {
            return leaf_hash(&l[0]);
        }
        let mut k = 1;
        while k * 2 < l.len() {
            k *= 2;
        }
        node_hash(&rfc6962_root(&l[..k]), &rfc6962_root(&l[k..]))
    }

    /// `verify_strict`, not `verify`: a key of small order (here the
    /// identity point) with the trivial signature (R the identity, s = 0)
    /// passes the plain check for any message, and must not pass ours,
    /// for heads and for key endorsements alike.
    #[test]
    fn a_weak_key_and_its_trivial_signature_are_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = VerifyingKey::from_bytes(&identity).expect("the identity is a point");
        let mut trivial = [0u8; 64];
        trivial[0] = 1;
        let mut head = SignedHead::sign(
            &SigningKey::from_bytes(&[3; 32]),
            0,
            0,
            0,
            [5; 32],
            [6; 32],
            1,
        );
        head.signature = trivial;
        assert!(
            ed25519_dalek::Verifier::verify(
                &weak,
                &head.message(),
                &Signature::from_bytes(&trivial)
            )
            .is_ok(),
            "the plain check takes it, which is what this test is about"
        );
        assert!(!head.verify(&weak));
        let mut e = KeyEndorsement::sign(&SigningKey::from_bytes(&[3; 32]), 1, &weak, 7);
        e.signature = trivial;
        assert!(!e.verify(&weak));
        // Endorsed by a true key, a weak key is no key of the chain: every
        // head it signed would fail anyway.
        let k0 = SigningKey::from_bytes(&[3; 32]);
        let endorsed = KeyEndorsement::sign(&k0, 1, &weak, 7);
        assert!(matches!(
            KeyChain::from_endorsements(k0.verifying_key(), &[endorsed]),
            Err(ChainError::BadKey { key_id: 1 })
        ));
    }

    /// A head over more seqs than any group holds proves nothing, though
    /// its path leads to its signed root: a leaked retired key could
    /// otherwise sign one group reaching any seq after its rotation.
    #[test]
    fn a_head_over_more_than_a_group_proves_nothing() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let entry = [4u8; 32];
        let receipt = |size: u64| {
            let depth = 64 - (size - 1).leading_zeros();
            let path: Vec<Hash> = (0..depth).map(|i| [i as u8; 32]).collect();
            let root = root_from_path(&entry, 0, size, &path).expect("a path of that size");
            Receipt {
                seq: 0,
                entry_hash: entry,
                path,
                head: SignedHead::sign(&key, 0, 0, size - 1, [9; 32], root, 1),
            }
        };
        assert_eq!(
            receipt(MAX_GROUP_ENTRIES).verify(&key.verifying_key()),
            Ok(())
        );
        assert_eq!(
            receipt(MAX_GROUP_ENTRIES + 1).verify(&key.verifying_key()),
            Err(ReceiptError::BadPath)
        );
    }

    /// Key 0 signs up to the group holding the entry that rotates it
    /// away, key 1 from the group after that one on: a head of either
    /// outside its seqs is refused although its signature holds, for a
    /// receipt as for a head alone.
    #[test]
    fn a_key_vouches_only_for_the_groups_of_its_own_seqs() {
        let (k0, k1, k2) = (
            SigningKey::from_bytes(&[7; 32]),
            SigningKey::from_bytes(&[8; 32]),
            SigningKey::from_bytes(&[9; 32]),
        );
        // Key 1's rotation entry is seq 10 (in group 8..=12, signed by
        // key 0); key 2's is seq 20 (in group 18..=21, signed by key 1).
        let chain = KeyChain::from_endorsements(
            k0.verifying_key(),
            &[
                KeyEndorsement::sign(&k0, 1, &k1.verifying_key(), 10),
                KeyEndorsement::sign(&k1, 2, &k2.verifying_key(), 20),
            ],
        )
        .expect("the chain");
        let head = |key: &SigningKey, id: u32, first: u64, last: u64| {
            SignedHead::sign(key, id, first, last, [1; 32], [2; 32], 5)
        };
        let ok = [
            head(&k0, 0, 0, 7),
            head(&k0, 0, 8, 12),
            head(&k1, 1, 13, 13),
            head(&k1, 1, 18, 21),
            head(&k2, 2, 22, 30),
        ];
        for h in &ok {
            assert!(chain.verify_head(h), "{h:?}");
        }
        let outside = [
            (head(&k0, 0, 13, 14), 0),
            (head(&k1, 1, 8, 12), 1),
            (head(&k1, 1, 10, 12), 1),
            (head(&k1, 1, 22, 25), 1),
            (head(&k2, 2, 20, 25), 2),
        ];
        for (h, id) in &outside {
            assert!(!chain.verify_head(h), "{h:?}");
            assert_eq!(
                chain.key_for(h).err(),
                Some(ReceiptError::OutsideKeyLifetime(*id))
            );
        }
        // A receipt of seq 13 under a group that key 0 signed past its
        // rotation: the path is sound, the key is not.
        let entry = [4; 32];
        let tree = MerkleTree::new(&[entry]);
        let receipt = Receipt {
            seq: 13,
            entry_hash: entry,
            path: Vec::new(),
            head: SignedHead::sign(&k0, 0, 13, 13, entry, tree.root(), 5),
        };
        assert_eq!(receipt.verify(&k0.verifying_key()), Ok(()));
        assert_eq!(
            receipt.verify_chain(&chain),
            Err(ReceiptError::OutsideKeyLifetime(0))
        );
        assert_eq!(
            chain.key_for(&head(&k2, 3, 30, 31)).err(),
            Some(ReceiptError::UnknownKey(3))
        );
    }

    #[test]
    fn every_merkle_path_verifies() {
        // Levels of one pair to many batches of 16 nodes hashed side by side.
        for n in (1..=40).chain([100, 257, 1_000]) {
            let l = leaves(n);
            let tree = MerkleTree::new(&l);
            let root = tree.root();
            assert_eq!(root, rfc6962_root(&l), "n={n}");
            for (i, leaf) in l.iter().enumerate() {
                let p = tree.path(i);
                assert_eq!(
                    root_from_path(leaf, i as u64, n as u64, &p),
                    Some(root),
                    "n={n} i={i}"
                );
                // A wrong index or size never verifies to the same root.
                if n > 1 {
                    let j = (i + 1) % n;
                    assert_ne!(root_from_path(leaf, j as u64, n as u64, &p), Some(root));
                }
            }
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9u8; 32])
    }

    fn head() -> SignedHead {
        let l = leaves(5);
        SignedHead::sign(&key(), 0, 10, 14, l[4], merkle_root(&l), 1_764_000_000_000)
    }

    #[test]
    fn head_round_trip_and_truncation() {
        let h = head();
        let enc = h.encode();
        assert_eq!(enc.len(), HEAD_LEN);
        assert_eq!(SignedHead::decode(&enc).expect("decodes"), h);
        assert!(h.verify(&key().verifying_key()));
        for n in 0..enc.len() {
            assert!(SignedHead::decode(&enc[..n]).is_err());
        }
        let mut bad = h;
        bad.last_seq += 1;
        assert!(!bad.verify(&key().verifying_key()));
    }

    #[test]
    fn receipt_round_trip_and_checks() {
        let l = leaves(5);
        let k = key();
        let h = SignedHead::sign(&k, 0, 10, 14, l[4], merkle_root(&l), 5);
        let r = Receipt {
            seq: 12,
            entry_hash: l[2],
            path: MerkleTree::new(&l).path(2),
            head: h,
        };
        let vk = k.verifying_key();
        assert_eq!(r.verify(&vk), Ok(()));
        let enc = r.encode();
        assert_eq!(Receipt::decode(&enc).expect("decodes"), r);
        for n in 0..enc.len() {
            assert!(Receipt::decode(&enc[..n]).is_err());
        }
        let mut wrong = r.clone();
        wrong.entry_hash[0] ^= 1;
        assert_eq!(wrong.verify(&vk), Err(ReceiptError::BadPath));
        let mut moved = r.clone();
        moved.seq = 13;
        assert_eq!(moved.verify(&vk), Err(ReceiptError::BadPath));
        let mut outside = r.clone();
        outside.seq = 20;
        assert_eq!(outside.verify(&vk), Err(ReceiptError::NotCovered));
        let other = SigningKey::from_bytes(&[1u8; 32]).verifying_key();
        assert_eq!(r.verify(&other), Err(ReceiptError::BadSignature));
    }

    /// A correctly signed head over every seq (0..=u64::MAX): the group size
    /// overflowed u64 and verification panicked with overflow checks on.
    #[test]
    fn head_over_every_seq_is_refused_without_overflow() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let leaf = [0x11; 32];
        let head = SignedHead::sign(&key, 0, 0, u64::MAX, leaf, merkle_root(&[leaf]), 0);
        for seq in [0, 5, u64::MAX] {
            let r = Receipt {
                seq,
                entry_hash: leaf,
                path: Vec::new(),
                head,
            };
            assert_eq!(r.verify(&key.verifying_key()), Err(ReceiptError::BadPath));
        }
    }

    proptest::proptest! {
        #[test]
        fn receipt_decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Receipt::decode(&bytes);
            let _ = SignedHead::decode(&bytes);
        }
    }
}
