//! The tamper matrix: every way of altering a closed vault's data dir that
//! the design claims to catch, each named by the reason `verify` must give.
//!
//! Each case builds a small vault, copies its closed data dir, alters the
//! copy through [`RawStore`] (the sled trees, bypassing every invariant),
//! and checks that `verify` with the pinned public key names the first bad
//! seq and the reason. Where the alteration is in the chain (the `log`
//! tree), `Vault::open` must refuse the copy too.
//!
//! Two kinds of alteration are told apart: corruption leaves a chunk's CRC
//! stale (`crc_mismatch`), tampering recomputes it, so that only the hash
//! chain and the signed heads can catch it. The strongest keyless attacker
//! also recomputes every link and every head's hashes ([`relink`]); what is
//! left to catch them is the signature.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};

use common::{copy_dir, pending_value, scratch_dir, wait_unlocked};
use ed25519_dalek::VerifyingKey;
use storage::chunk::{encode_chunk, Chunk, MerkleTree, SignedHead, CHUNK_TARGET_BYTES, HEAD_LEN};
use storage::crypto::{data_key_aad, record_aad, unwrap_key};
use storage::entry::{entry_hash, EntryRef};
use storage::state::data_key_name;
use storage::{
    verify, Append, Error, Hash, Kind, Options, RawStore, Reason, Unlock, Vault, VerifiedPrefix,
    VerifyOptions,
};

// ---------------------------------------------------------------------------
// The fixture vault

fn passphrase() -> Unlock {
    Unlock::passphrase(b"tamper matrix passphrase".to_vec())
}

/// Commit groups of the fixture, by the seq of their first entry. Every
/// group but the big one is a single chunk stored under that seq.
const GENESIS: u64 = 0; // 0 genesis, 1 admin credential
const ALICE: u64 = 2; // 2 alice's data key, 3 alice's first record
const BOB: u64 = 4; // 4 bob's data key, 5 bob's first record
const CONSENT: u64 = 6; // 6 a consent event for alice
const ALICE_2: u64 = 7; // 7 alice's second record
const BIG: u64 = 8; // 8..=207: 200 records of 1 KiB, several chunks
const BIG_RECORDS: u64 = 200;
const LAST: u64 = BIG + BIG_RECORDS; // 208: bob's last record
const SUBJECTS: [&str; 2] = ["alice", "bob"];

/// A 1 KiB JSON record whose length does not depend on `i`, so that two
/// vaults built by the same script split their chunks at the same seqs.
fn kib_record(i: u64) -> Vec<u8> {
    let mut p = format!("{{\"i\":{i:04},\"pad\":\"").into_bytes();
    p.resize(1022, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// Builds the fixture in `dir` (plus `extra` one-record groups after
/// `LAST`), closes it, and returns its public key.
fn build_vault(dir: &Path, extra: u64) -> VerifyingKey {
    let vault = Vault::create(dir, &passphrase(), Options::default())
        .expect("create the fixture vault")
        .vault;
    let append = |a: Append| vault.append_blocking(a).expect("append to the fixture");
    assert_eq!(
        append(Append::record("alice", b"{\"n\":1}".to_vec())).seq,
        ALICE + 1
    );
    assert_eq!(
        append(Append::record("bob", b"{\"n\":2}".to_vec())).seq,
        BOB + 1
    );
    let consent = serde_json::json!({"partner_id": "lender-1", "purposes": ["credit_check"]});
    assert_eq!(
        append(Append::event(Kind::ConsentGranted, "alice", &consent)).seq,
        CONSENT
    );
    assert_eq!(
        append(Append::record("alice", b"{\"n\":3}".to_vec())).seq,
        ALICE_2
    );
    let big: Vec<Append> = (0..BIG_RECORDS)
        .map(|i| Append::record(SUBJECTS[i as usize % 2], kib_record(i)))
        .collect();
    assert!(big.len() * 1024 > CHUNK_TARGET_BYTES, "one chunk would do");
    let receipts = vault
        .append_batch_blocking(big)
        .expect("append the big group");
    assert_eq!(receipts.first().map(|r| r.seq), Some(BIG));
    assert_eq!(receipts.last().map(|r| r.seq), Some(LAST - 1));
    assert_eq!(
        append(Append::record("bob", b"{\"n\":4}".to_vec())).seq,
        LAST
    );
    for i in 0..extra {
        append(Append::record("bob", kib_record(1000 + i)));
    }
    let key = vault.public_key();
    vault.close().expect("close the fixture");
    key
}

/// A closed fixture vault, copied afresh for every alteration.
struct Fixture {
    tmp: tempfile::TempDir,
    pristine: PathBuf,
    key: VerifyingKey,
    copies: std::cell::Cell<u32>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = scratch_dir();
        let pristine = tmp.path().join("pristine");
        let key = build_vault(&pristine, 0);
        Fixture {
            tmp,
            pristine,
            key,
            copies: std::cell::Cell::new(0),
        }
    }

    /// The fixture opened and closed once more, so that it holds the
    /// record of the prefix that open verified (`storage::verified`).
    fn opened() -> Fixture {
        let fx = Fixture::new();
        wait_unlocked(&fx.pristine);
        Vault::open(&fx.pristine, &passphrase(), Options::default())
            .expect("open the fixture")
            .close()
            .expect("close the fixture");
        assert!(
            fx.pristine.join(storage::verified::FILE).exists(),
            "open recorded the prefix it verified"
        );
        fx
    }

    /// A fresh copy of the closed pristine data dir.
    fn copy(&self) -> PathBuf {
        let n = self.copies.get();
        self.copies.set(n + 1);
        let to = self.tmp.path().join(format!("copy-{n}"));
        wait_unlocked(&self.pristine);
        copy_dir(&self.pristine, &to);
        to
    }

    /// A fresh copy altered by `f`.
    fn tampered(&self, f: impl FnOnce(&RawStore)) -> PathBuf {
        let dir = self.copy();
        tamper(&dir, f);
        dir
    }

    /// The failure `verify` reports with the pinned key; panics if none.
    fn failure(&self, dir: &Path) -> (u64, Reason) {
        failure_with(dir, Some(self.key))
    }
}

/// The raw trees of a closed data dir.
fn raw_open(dir: &Path) -> RawStore {
    wait_unlocked(dir);
    RawStore::open(dir).expect("open the raw trees")
}

/// Alters the closed vault in `dir` through its raw trees, then flushes
/// and closes them.
fn tamper(dir: &Path, f: impl FnOnce(&RawStore)) {
    let raw = raw_open(dir);
    f(&raw);
    raw.flush().expect("flush the raw trees");
}

fn verify_with(dir: &Path, key: Option<VerifyingKey>) -> storage::Report {
    wait_unlocked(dir);
    verify(
        dir,
        &VerifyOptions {
            public_key: key,
            ..Default::default()
        },
    )
    .expect("verify runs to the end (no I/O or lock error)")
}

fn failure_with(dir: &Path, key: Option<VerifyingKey>) -> (u64, Reason) {
    let report = verify_with(dir, key);
    match report.failure {
        Some(failure) => failure,
        None => panic!("verify accepted the altered vault: {report:?}"),
    }
}

/// The integrity failure with which `Vault::open` refuses `dir`.
fn open_refusal(dir: &Path) -> (u64, Reason) {
    wait_unlocked(dir);
    match Vault::open(dir, &passphrase(), Options::default()) {
        Err(Error::Integrity { seq, reason }) => (seq, reason),
        Err(other) => panic!("open failed, but not with an integrity error: {other}"),
        Ok(_) => panic!("open accepted a vault whose log was altered"),
    }
}

/// Asserts that both verify and open name `expected` at `seq`.
fn assert_chain_failure(fx: &Fixture, dir: &Path, seq: u64, expected: Reason) {
    assert_eq!(fx.failure(dir), (seq, expected.clone()), "verify");
    assert_eq!(open_refusal(dir), (seq, expected), "open");
}

// ---------------------------------------------------------------------------
// Raw chunk surgery

fn log_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn log_value(raw: &RawStore, key: u64) -> Vec<u8> {
    raw.log
        .get(log_key(key))
        .expect("read the log")
        .unwrap_or_else(|| panic!("no chunk under key {key}"))
        .to_vec()
}

/// The pointer under `key` in the `log` tree: the chunk's offset in
/// `DIR/chunks`, then its length.
fn stored_pointer(raw: &RawStore, key: u64) -> Vec<u8> {
    raw.log
        .index
        .get(log_key(key))
        .expect("read a pointer")
        .unwrap_or_else(|| panic!("no pointer under key {key}"))
        .to_vec()
}

/// The first seqs of the stored chunks, in key order.
fn chunk_keys(raw: &RawStore) -> Vec<u64> {
    raw.log
        .index
        .iter()
        .keys()
        .map(|k| {
            let k = k.expect("read a log key");
            u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"))
        })
        .collect()
}

/// Rewrites the chunk stored under `key` in place.
fn edit_chunk(raw: &RawStore, key: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let mut v = log_value(raw, key);
    f(&mut v);
    raw.log.insert(log_key(key), v).expect("write the log");
}

/// Recomputes a chunk value's CRC32 (its last 4 bytes).
/// Flips the bits `mask` of byte `at` of the signed head in chunk `key`
/// (offsets as in `storage.md` section 5), then fixes the chunk's CRC.
fn flip_head(raw: &RawStore, key: u64, at: usize, mask: u8) {
    edit_chunk(raw, key, |v| {
        let i = head_offset(v) + at;
        v[i] ^= mask;
        fix_crc(v);
    })
}

fn fix_crc(v: &mut [u8]) {
    let n = v.len() - 4;
    let crc = crc32fast::hash(&v[..n]);
    v[n..].copy_from_slice(&crc.to_be_bytes());
}

/// Byte ranges of each entry encoding inside a chunk value.
fn entry_ranges(v: &[u8]) -> Vec<Range<usize>> {
    let count = u32::from_be_bytes(v[14..18].try_into().expect("4 bytes"));
    let mut pos = 18;
    let mut out = Vec::new();
    for _ in 0..count {
        let len = u32::from_be_bytes(v[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        out.push(pos + 4..pos + 4 + len);
        pos += 4 + len;
    }
    out
}

/// Offset of the signed head inside a chunk value that carries one.
fn head_offset(v: &[u8]) -> usize {
    v.len() - 4 - HEAD_LEN
}

/// Field offsets inside a signed head (the table in `storage::chunk`).
const HEAD_LAST_SEQ: usize = 13;
const HEAD_TIMESTAMP: usize = 85;
const HEAD_SIGNATURE: usize = 93;

/// An entry, owned, so that it can be altered and re-encoded.
#[derive(Debug, Clone)]
struct OwnedEntry {
    kind: Kind,
    seq: u64,
    timestamp_ms: u64,
    prev_hash: Hash,
    key_version: u32,
    nonce: [u8; 12],
    subject: String,
    payload: Vec<u8>,
}

impl OwnedEntry {
    fn decode(bytes: &[u8]) -> OwnedEntry {
        let e = EntryRef::decode(bytes).expect("a stored entry decodes");
        OwnedEntry {
            kind: e.kind,
            seq: e.seq,
            timestamp_ms: e.timestamp_ms,
            prev_hash: e.prev_hash,
            key_version: e.key_version,
            nonce: e.nonce,
            subject: e.subject.to_string(),
            payload: e.payload.to_vec(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        EntryRef {
            kind: self.kind,
            seq: self.seq,
            timestamp_ms: self.timestamp_ms,
            prev_hash: self.prev_hash,
            key_version: self.key_version,
            nonce: self.nonce,
            subject: &self.subject,
            payload: &self.payload,
        }
        .encode()
    }
}

/// A chunk, owned and decoded, with the key it is stored under.
#[derive(Debug, Clone)]
struct OwnedChunk {
    key: u64,
    first_seq: u64,
    entries: Vec<OwnedEntry>,
    head: Option<SignedHead>,
}

impl OwnedChunk {
    fn decode(key: u64, v: &[u8]) -> OwnedChunk {
        let c = Chunk::decode(v).expect("a stored chunk decodes");
        OwnedChunk {
            key,
            first_seq: c.first_seq,
            entries: c.entries.iter().map(|e| OwnedEntry::decode(e)).collect(),
            head: c.head,
        }
    }

    /// The chunk encoding, with a valid CRC.
    fn encode(&self) -> Vec<u8> {
        let encoded: Vec<Vec<u8>> = self.entries.iter().map(OwnedEntry::encode).collect();
        let refs: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        encode_chunk(self.first_seq, &refs, self.head.as_ref())
    }
}

fn read_chunk(raw: &RawStore, key: u64) -> OwnedChunk {
    OwnedChunk::decode(key, &log_value(raw, key))
}

fn read_log(raw: &RawStore) -> Vec<OwnedChunk> {
    chunk_keys(raw)
        .into_iter()
        .map(|k| read_chunk(raw, k))
        .collect()
}

/// Replaces the whole log tree with `chunks`.
fn write_log(raw: &RawStore, chunks: &[OwnedChunk]) {
    raw.log.clear().expect("clear the log");
    for c in chunks {
        raw.log
            .insert(log_key(c.key), c.encode())
            .expect("write the log");
    }
}

/// What a keyless attacker does after altering entries: recompute every
/// `prev_hash`, and every head's `last_hash` and Merkle root, keeping the
/// old signatures, since the signing key is sealed under the master key.
fn relink(chunks: &mut [OwnedChunk]) {
    let mut prev = [0u8; 32];
    let mut group: Vec<Hash> = Vec::new();
    for c in chunks {
        for e in &mut c.entries {
            e.prev_hash = prev;
            prev = entry_hash(&e.encode());
            group.push(prev);
        }
        if let Some(h) = &mut c.head {
            h.last_hash = prev;
            h.group_root = MerkleTree::new(&group).root();
            group.clear();
        }
    }
}

/// The keys under which the big group's chunks are stored.
fn big_group_keys(raw: &RawStore) -> Vec<u64> {
    chunk_keys(raw)
        .into_iter()
        .filter(|k| (BIG..LAST).contains(k))
        .collect()
}

// ---------------------------------------------------------------------------
// The fixture itself

#[test]
fn fixture_has_several_groups_and_a_multi_chunk_group() {
    let fx = Fixture::new();
    let report = verify_with(&fx.pristine, Some(fx.key));
    assert!(report.ok(), "pristine vault fails: {:?}", report.failure);
    assert_eq!(report.entries, LAST + 1);
    let dir = fx.copy();
    let raw = raw_open(&dir);
    let keys = chunk_keys(&raw);
    assert_eq!(&keys[..6], &[GENESIS, ALICE, BOB, CONSENT, ALICE_2, BIG]);
    assert_eq!(keys.last(), Some(&LAST));
    let big = big_group_keys(&raw);
    assert!(big.len() >= 3, "the big group spans {} chunks", big.len());
    let heads: Vec<u64> = read_log(&raw)
        .iter()
        .filter_map(|c| c.head.map(|h| h.last_seq))
        .collect();
    assert_eq!(heads, vec![1, 3, 5, CONSENT, ALICE_2, LAST - 1, LAST]);
    drop(raw);
    wait_unlocked(&dir);
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("pristine opens");
    let bob = vault.latest_record("bob").expect("read").expect("present");
    assert_eq!(bob.plaintext.as_slice(), b"{\"n\":4}");
    vault.close().expect("close");
}

// ---------------------------------------------------------------------------
// Corruption and tampering inside chunks

#[test]
fn entry_byte_flipped_with_stale_crc_is_crc_mismatch() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        edit_chunk(raw, ALICE, |v| {
            let r = entry_ranges(v)[1].clone();
            v[r.start + r.len() / 2] ^= 0x40;
        })
    });
    assert_chain_failure(&fx, &dir, ALICE, Reason::CrcMismatch);
}

/// Flips the last payload byte of entry `seq` and recomputes the CRC.
fn flip_payload(raw: &RawStore, seq: u64) {
    let key = chunk_keys(raw)
        .into_iter()
        .rev()
        .find(|k| *k <= seq)
        .expect("a chunk holds seq");
    edit_chunk(raw, key, |v| {
        let r = entry_ranges(v)[(seq - key) as usize].clone();
        v[r.end - 1] ^= 0x01;
        fix_crc(v);
    });
}

#[test]
fn entry_byte_flipped_with_fresh_crc_breaks_the_chain() {
    let fx = Fixture::new();
    // Inside a group: the next entry's link no longer matches.
    let dir = fx.tampered(|raw| flip_payload(raw, BIG));
    assert_chain_failure(&fx, &dir, BIG + 1, Reason::BadLink);

    // The last entry of a chunk that does not close its group: the link
    // into the next chunk breaks.
    let second = {
        let raw = raw_open(&fx.pristine);
        big_group_keys(&raw)[1]
    };
    let dir = fx.tampered(|raw| flip_payload(raw, second - 1));
    assert_chain_failure(&fx, &dir, second, Reason::BadLink);

    // The last entry of a group: its signed head no longer matches.
    let dir = fx.tampered(|raw| flip_payload(raw, ALICE + 1));
    assert_chain_failure(&fx, &dir, ALICE + 1, Reason::HeadMismatch);
}

#[test]
fn signed_head_signature_flipped_is_bad_signature() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_SIGNATURE + 10, 0x08));
    assert_chain_failure(&fx, &dir, BOB + 1, Reason::BadSignature);
}

#[test]
fn the_record_of_a_verified_prefix_hides_no_alteration_from_open() {
    // Every head here is under the record, whose signatures open does not
    // check again: each alteration must still be refused as a full
    // verification refuses it.
    let fx = Fixture::opened();
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_SIGNATURE + 10, 0x08));
    assert_chain_failure(&fx, &dir, BOB + 1, Reason::BadSignature);
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_TIMESTAMP + 7, 0x01));
    assert_chain_failure(&fx, &dir, BOB + 1, Reason::HeadMismatch);
    // The last head, of the last group the record covers.
    let dir = fx.tampered(|raw| flip_head(raw, LAST, HEAD_SIGNATURE, 0x80));
    assert_chain_failure(&fx, &dir, LAST, Reason::BadSignature);
    // The head of the group that spans several chunks.
    let dir = fx.tampered(|raw| {
        let last_chunk = *big_group_keys(raw).last().expect("the big group");
        flip_head(raw, last_chunk, HEAD_SIGNATURE + 40, 0x02)
    });
    assert_chain_failure(&fx, &dir, LAST - 1, Reason::BadSignature);
    let dir = fx.tampered(|raw| flip_payload(raw, ALICE + 1));
    assert_chain_failure(&fx, &dir, ALICE + 1, Reason::HeadMismatch);
    // The log cut back to before the record's end.
    let dir = fx.tampered(|raw| {
        raw.log.remove(log_key(LAST)).expect("cut the log");
    });
    assert_eq!(open_refusal(&dir), fx.failure(&dir));
}

/// The digest of the heads of `dir`'s log whose groups end before
/// `entries`, and the hash of entry `entries - 1`.
fn prefix_of(dir: &Path, entries: u64) -> VerifiedPrefix {
    let raw = raw_open(dir);
    let mut digest = blake3::Hasher::new();
    let mut last_hash = None;
    for chunk in read_log(&raw) {
        for e in &chunk.entries {
            if e.seq == entries - 1 {
                last_hash = Some(entry_hash(&e.encode()));
            }
        }
        if let Some(h) = chunk.head.filter(|h| h.last_seq < entries) {
            let mut buf = Vec::with_capacity(HEAD_LEN);
            h.encode_into(&mut buf);
            digest.update(&buf);
        }
    }
    VerifiedPrefix {
        entries,
        last_hash: last_hash.expect("the log holds the prefix's last entry"),
        heads_digest: *digest.finalize().as_bytes(),
    }
}

fn verify_vouched(dir: &Path, key: VerifyingKey, prefix: VerifiedPrefix) -> storage::Report {
    wait_unlocked(dir);
    verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            verified_prefix: Some(prefix),
            ..Default::default()
        },
    )
    .expect("verify runs")
}

#[test]
fn a_verified_prefix_stands_for_its_signatures_and_must_match_the_log() {
    let fx = Fixture::new();
    let full = verify_with(&fx.pristine, Some(fx.key));
    assert!(full.ok());
    assert_eq!(full.vouched_groups, 0);
    let whole = prefix_of(&fx.pristine, LAST + 1);
    assert_eq!(Some(whole.heads_digest), full.heads_digest);
    assert_eq!(Some(whole.last_hash), full.head);

    // The whole log: every head vouched for, the same report otherwise.
    let report = verify_vouched(&fx.pristine, fx.key, whole);
    assert!(report.ok(), "{:?}", report.failure);
    assert_eq!(report.vouched_groups, full.groups);
    assert_eq!((report.entries, report.head), (full.entries, full.head));
    assert_eq!(report.heads_digest, full.heads_digest);
    // A prefix ending with bob's group: its three heads.
    let report = verify_vouched(&fx.pristine, fx.key, prefix_of(&fx.pristine, BOB + 2));
    assert!(report.ok(), "{:?}", report.failure);
    assert_eq!(report.vouched_groups, 3);

    // Whatever does not match fails at the prefix's last seq.
    let refused = |p: VerifiedPrefix| verify_vouched(&fx.pristine, fx.key, p).failure;
    let wrong_digest = VerifiedPrefix {
        heads_digest: [0; 32],
        ..whole
    };
    assert_eq!(refused(wrong_digest), Some((LAST, Reason::BadSignature)));
    let wrong_hash = VerifiedPrefix {
        last_hash: [0; 32],
        ..whole
    };
    assert_eq!(refused(wrong_hash), Some((LAST, Reason::BadSignature)));
    let longer = VerifiedPrefix {
        entries: LAST + 2,
        ..whole
    };
    assert_eq!(refused(longer), Some((LAST, Reason::BadSignature)));
    let empty = VerifiedPrefix {
        entries: 0,
        ..whole
    };
    assert_eq!(refused(empty), Some((0, Reason::BadSignature)));
    // Inside the group that spans several chunks: no group ends there.
    let inside = prefix_of(&fx.pristine, BIG + 1);
    assert_eq!(refused(inside), Some((BIG, Reason::BadSignature)));

    // A head whose signature no longer verifies, under a prefix whose
    // digest is that of the altered heads: the caller vouched for it, so
    // the scan takes it; without the prefix it is refused.
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_SIGNATURE + 10, 0x08));
    let altered = prefix_of(&dir, LAST + 1);
    assert!(verify_vouched(&dir, fx.key, altered).ok());
    assert_eq!(fx.failure(&dir), (BOB + 1, Reason::BadSignature));
}

#[test]
fn open_takes_the_word_of_a_record_under_the_master_key() {
    // What shows that open reads the record: a record made with the
    // master key for heads altered after the open that verified them is
    // taken at its word, as anyone holding the master key could also have
    // signed the heads again. Without the master key no such record can
    // be made (the other tests).
    let fx = Fixture::opened();
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_SIGNATURE + 10, 0x08));
    let (master, vault_id) = common::unseal_master(&raw_open(&dir), &passphrase());
    let record = storage::verified::encode(&prefix_of(&dir, LAST + 1), &master, &vault_id);
    std::fs::write(dir.join(storage::verified::FILE), record).expect("write the record");
    wait_unlocked(&dir);
    Vault::open(&dir, &passphrase(), Options::default())
        .expect("open takes the record's word")
        .close()
        .expect("close");
    assert_eq!(fx.failure(&dir), (BOB + 1, Reason::BadSignature));
}

#[test]
fn a_record_of_a_verified_prefix_that_does_not_check_out_is_ignored() {
    let fx = Fixture::opened();
    let record = std::fs::read(fx.pristine.join(storage::verified::FILE)).expect("the record");
    for i in [0, 5, 20, 60, 100] {
        let dir = fx.copy();
        let mut bad = record.clone();
        bad[i] ^= 0x01;
        std::fs::write(dir.join(storage::verified::FILE), &bad).expect("alter the record");
        wait_unlocked(&dir);
        let vault = Vault::open(&dir, &passphrase(), Options::default())
            .unwrap_or_else(|e| panic!("byte {i} altered: {e}"));
        vault.close().expect("close");
        // Open verified it all and wrote the record again.
        assert_eq!(
            std::fs::read(dir.join(storage::verified::FILE)).expect("the record"),
            record,
            "byte {i}"
        );
    }
    // Another vault's record.
    let other = fx.tmp.path().join("other");
    build_vault(&other, 1);
    Vault::open(&other, &passphrase(), Options::default())
        .expect("open the other vault")
        .close()
        .expect("close it");
    let dir = fx.copy();
    std::fs::copy(
        other.join(storage::verified::FILE),
        dir.join(storage::verified::FILE),
    )
    .expect("copy the other record");
    wait_unlocked(&dir);
    Vault::open(&dir, &passphrase(), Options::default())
        .expect("a record of another vault is ignored")
        .close()
        .expect("close");
}

#[test]
fn signed_head_fields_altered_are_detected() {
    let fx = Fixture::new();
    // The timestamp must be the group's last entry's.
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_TIMESTAMP + 7, 0x01));
    assert_chain_failure(&fx, &dir, BOB + 1, Reason::HeadMismatch);
    // The covered range no longer matches the entries.
    let dir = fx.tampered(|raw| flip_head(raw, BOB, HEAD_LAST_SEQ + 7, 0x01));
    assert_chain_failure(&fx, &dir, BOB + 1, Reason::HeadMismatch);
    // Dropping the head (clearing the flag) leaves the group unsigned.
    let dir = fx.tampered(|raw| {
        let mut c = read_chunk(raw, LAST);
        c.head = None;
        raw.log
            .insert(log_key(LAST), c.encode())
            .expect("write the log");
    });
    assert_chain_failure(&fx, &dir, LAST, Reason::UnsignedTail);
}

/// Open verifies the chunks file as it is; one changed under the running
/// vault is read back as changed. A head whose bounds make no group (the
/// first seq 0, the last u64::MAX) answers a receipt for an entry of it
/// with a head mismatch, where the arithmetic on its bounds used to wrap
/// and end in a panic.
#[test]
fn a_head_altered_under_a_running_vault_gets_no_receipt_and_no_panic() {
    use std::os::unix::fs::FileExt;
    let fx = Fixture::new();
    let dir = fx.copy();
    let (offset, altered) = {
        let raw = raw_open(&dir);
        let pointer = stored_pointer(&raw, BOB);
        let (offset, _) = storage::logfile::decode_pointer(&pointer).expect("a pointer");
        let mut v = log_value(&raw, BOB);
        let h = head_offset(&v);
        v[h + 5..h + HEAD_LAST_SEQ].copy_from_slice(&0u64.to_be_bytes());
        v[h + HEAD_LAST_SEQ..h + HEAD_LAST_SEQ + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        fix_crc(&mut v);
        (offset, v)
    };
    wait_unlocked(&dir);
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("open");
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(storage::logfile::FILE))
        .expect("the chunks file")
        .write_all_at(&altered, offset)
        .expect("alter bob's chunk");
    match vault.receipt(BOB + 1) {
        Err(Error::Integrity {
            reason: Reason::HeadMismatch,
            ..
        }) => {}
        other => panic!("a receipt from an altered head: {other:?}"),
    }
    vault.close().expect("close");
}

/// A shredded subject's wrapped key put back in the key store, with a
/// pending marker forged to excuse it as left over by a commit that
/// never reached the log, is a key mismatch: a marker of an unlogged group
/// may name only keys the log never committed to. So is a marker naming
/// a key the log committed to and still holds (open would delete it).
#[test]
fn a_forged_marker_does_not_excuse_a_shredded_key_put_back() {
    let fx = Fixture::new();
    let dir = fx.copy();
    let old = {
        let raw = raw_open(&dir);
        raw.keys
            .get(data_key_name("bob", 1))
            .expect("read keys")
            .expect("bob's key")
            .to_vec()
    };
    wait_unlocked(&dir);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let vault = Vault::open(&dir, &passphrase(), Options::default()).expect("open");
    rt.block_on(vault.shred("bob")).expect("shred bob");
    vault.close().expect("close");
    let end = verify_with(&dir, Some(fx.key)).entries;
    assert_eq!(
        verify_with(&dir, Some(fx.key)).failure,
        None,
        "the shred verifies"
    );
    tamper(&dir, |raw| {
        raw.keys
            .insert(data_key_name("bob", 1), old)
            .expect("write keys");
        raw.keys
            .insert(
                storage::vault::pending_name(end + 5),
                pending_value(end + 5, &[data_key_name("bob", 1)]),
            )
            .expect("write keys");
    });
    let (_, reason) = failure_with(&dir, Some(fx.key));
    assert!(
        matches!(&reason, Reason::KeyMismatch(m) if m.contains("pending marker")),
        "{reason}"
    );
    let (_, reason) = open_refusal(&dir);
    assert!(matches!(reason, Reason::KeyMismatch(_)), "open: {reason}");
}

/// One entry inside a chunk of many deleted, moved or duplicated, with
/// the chain, the heads' hashes and roots and the CRC made good again by
/// a keyless attacker: verify names the entry's seq and the alteration,
/// and open refuses the vault the same way.
#[test]
fn an_entry_deleted_reordered_or_duplicated_inside_a_chunk_is_named() {
    let fx = Fixture::new();
    let alter = |f: fn(&mut Vec<OwnedEntry>)| {
        fx.tampered(|raw| {
            let mut log = read_log(raw);
            let first = big_group_keys(raw)[0];
            let chunk = log
                .iter_mut()
                .find(|c| c.key == first)
                .expect("the big group's first chunk");
            assert!(chunk.entries.len() > 3, "a chunk of many entries");
            f(&mut chunk.entries);
            relink(&mut log);
            write_log(raw, &log);
        })
    };
    let deleted = alter(|e| {
        e.remove(1);
    });
    let reordered = alter(|e| e.swap(1, 2));
    let duplicated = alter(|e| {
        let copy = e[1].clone();
        e.insert(2, copy);
    });
    for (dir, seq, expected) in [
        (&deleted, BIG + 1, Reason::Gap),
        // Seq BIG + 2 where BIG + 1 is due: a gap.
        (&reordered, BIG + 1, Reason::Gap),
        // Seq BIG + 1 again where BIG + 2 is due.
        (&duplicated, BIG + 2, Reason::Duplicate),
    ] {
        assert_chain_failure(&fx, dir, seq, expected);
    }
}

// ---------------------------------------------------------------------------
// Derived state

#[test]
fn state_tree_altered_is_index_mismatch() {
    let fx = Fixture::new();
    let flipped = fx.tampered(|raw| {
        let mut v = raw
            .state
            .get("s/alice")
            .expect("read state")
            .expect("alice has a record pointer")
            .to_vec();
        v[7] ^= 0x01;
        raw.state.insert("s/alice", v).expect("write state");
    });
    let extra = fx.tampered(|raw| {
        let mut v = LAST.to_be_bytes().to_vec();
        v.extend_from_slice(&1u32.to_be_bytes());
        raw.state.insert("s/mallory", v).expect("write state");
    });
    let removed = fx.tampered(|raw| {
        raw.state.remove("k/bob").expect("write state");
    });
    // Pointing alice at her older record would serve stale data.
    let stale = fx.tampered(|raw| {
        let mut v = (ALICE + 1).to_be_bytes().to_vec();
        v.extend_from_slice(&1u32.to_be_bytes());
        raw.state.insert("s/alice", v).expect("write state");
    });
    let no_marker = fx.tampered(|raw| {
        raw.state.remove(b"applied").expect("write state");
    });
    for dir in [flipped, extra, removed, stale, no_marker] {
        assert_eq!(assert_index_mismatch(&fx, &dir), LAST, "{dir:?}");
    }
}

/// Asserts that verify names an `index_mismatch` and that open refuses the
/// vault with one too (open verifies derived state: no stale record is
/// served); returns the seq verify named.
fn assert_index_mismatch(fx: &Fixture, dir: &Path) -> u64 {
    let (seq, reason) = fx.failure(dir);
    assert!(
        matches!(reason, Reason::IndexMismatch(_)),
        "{dir:?}: {reason}"
    );
    let (_, reason) = open_refusal(dir);
    assert!(
        matches!(reason, Reason::IndexMismatch(_)),
        "{dir:?}: open: {reason}"
    );
    seq
}

/// A record pointer in the state tree: the record's seq and key version.
fn pointer(seq: u64) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend_from_slice(&1u32.to_be_bytes());
    v
}

/// The state tree as a crash in the middle of an index write from seq
/// `ALICE_2` toward `LAST` leaves it: both markers, and each key the write
/// touches at its value at one end or the other (`s/alice` already at
/// `LAST`'s, `s/bob` still at `ALICE_2`'s).
fn index_write_cut_off(raw: &RawStore) {
    raw.state
        .insert(b"applied", &ALICE_2.to_be_bytes())
        .expect("write state");
    raw.state
        .insert(b"indexing", &LAST.to_be_bytes())
        .expect("write state");
    raw.state
        .insert("s/bob", pointer(BOB + 1))
        .expect("write state");
}

#[test]
fn an_index_write_cut_off_by_a_crash_verifies_and_open_finishes_it() {
    let fx = Fixture::new();
    let cut = fx.tampered(index_write_cut_off);
    let report = verify_with(&cut, Some(fx.key));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unindexed, LAST - ALICE_2);

    // Open replays from the applied marker and removes the indexing one.
    wait_unlocked(&cut);
    let vault = Vault::open(&cut, &passphrase(), Options::default()).expect("open");
    vault.close().expect("close");
    let raw = raw_open(&cut);
    assert_eq!(raw.state.get(b"indexing").expect("read state"), None);
    assert_eq!(
        raw.state.get(b"applied").expect("read state").as_deref(),
        Some(LAST.to_be_bytes().as_slice())
    );
    assert_eq!(
        raw.state.get("s/bob").expect("read state").as_deref(),
        Some(pointer(LAST).as_slice())
    );
    drop(raw);
    assert!(verify_with(&cut, Some(fx.key)).ok());

    // A key at neither end's value, or markers out of place, are refused.
    let neither = fx.tampered(|raw| {
        index_write_cut_off(raw);
        raw.state
            .insert("s/alice", pointer(ALICE + 1))
            .expect("write state");
    });
    let beyond = fx.tampered(|raw| {
        index_write_cut_off(raw);
        raw.state
            .insert(b"indexing", &(LAST + 1).to_be_bytes())
            .expect("write state");
    });
    let behind = fx.tampered(|raw| {
        index_write_cut_off(raw);
        raw.state
            .insert(b"indexing", &ALICE.to_be_bytes())
            .expect("write state");
    });
    let malformed = fx.tampered(|raw| {
        raw.state.insert(b"indexing", b"x").expect("write state");
    });
    for dir in [neither, behind, malformed] {
        assert_index_mismatch(&fx, &dir);
    }
    assert_eq!(fx.failure(&beyond), (LAST, Reason::Truncated));
}

// ---------------------------------------------------------------------------
// Whole chunks deleted, moved, duplicated, spliced

#[test]
fn chunk_deleted_from_the_middle_is_a_gap() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        raw.log.remove(log_key(BOB)).expect("write the log");
    });
    assert_chain_failure(&fx, &dir, BOB, Reason::Gap);
    // A chunk from the middle of a group.
    let mut deleted = 0;
    let dir = fx.tampered(|raw| {
        deleted = big_group_keys(raw)[1];
        raw.log.remove(log_key(deleted)).expect("write the log");
    });
    assert_chain_failure(&fx, &dir, deleted, Reason::Gap);
}

#[test]
fn chunks_swapped_are_detected() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        let a = log_value(raw, ALICE);
        let b = log_value(raw, BOB);
        raw.log.insert(log_key(ALICE), b).expect("write the log");
        raw.log.insert(log_key(BOB), a).expect("write the log");
    });
    let (seq, reason) = fx.failure(&dir);
    assert_eq!(seq, ALICE);
    assert!(
        matches!(reason, Reason::Reordered | Reason::Gap | Reason::BadLink),
        "{reason}"
    );
    assert_eq!(open_refusal(&dir), (seq, reason));
}

#[test]
fn chunk_moved_under_another_key_is_detected() {
    // The chunk's header is rewritten to match its new key, so that the
    // key and the header agree but the key no longer names its first entry.
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        let mut c = read_chunk(raw, BOB);
        raw.log.remove(log_key(BOB)).expect("write the log");
        c.first_seq = BOB + 1;
        raw.log
            .insert(log_key(BOB + 1), c.encode())
            .expect("write the log");
    });
    assert_chain_failure(&fx, &dir, BOB, Reason::Gap);
}

#[test]
fn chunk_duplicated_is_detected() {
    let fx = Fixture::new();
    // A copy under a key inside the log.
    let dir = fx.tampered(|raw| {
        let v = log_value(raw, BOB);
        raw.log.insert(log_key(BOB + 1), v).expect("write the log");
    });
    assert_chain_failure(&fx, &dir, BOB + 2, Reason::Reordered);
    // A copy of the last chunk appended after it, its header rewritten to
    // the next seq.
    let dir = fx.tampered(|raw| {
        let mut c = read_chunk(raw, LAST);
        c.key = LAST + 1;
        c.first_seq = LAST + 1;
        raw.log
            .insert(log_key(LAST + 1), c.encode())
            .expect("write the log");
    });
    assert_chain_failure(&fx, &dir, LAST + 1, Reason::Duplicate);
    // The same copy left as it was.
    let dir = fx.tampered(|raw| {
        let v = log_value(raw, LAST);
        raw.log.insert(log_key(LAST + 1), v).expect("write the log");
    });
    assert_chain_failure(&fx, &dir, LAST + 1, Reason::Reordered);
}

#[test]
fn tail_truncated_is_detected_by_the_applied_marker() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        raw.log.remove(log_key(LAST)).expect("write the log");
    });
    assert_eq!(fx.failure(&dir), (LAST - 1, Reason::Truncated));
    assert_eq!(open_refusal(&dir), (LAST - 1, Reason::Truncated));
    // The whole log gone.
    let dir = fx.tampered(|raw| raw.log.clear().expect("clear the log"));
    let (seq, reason) = fx.failure(&dir);
    assert_eq!(seq, 0);
    assert!(matches!(reason, Reason::BadGenesis(_)), "{reason}");
    let (seq, reason) = open_refusal(&dir);
    assert_eq!(seq, 0);
    assert!(
        matches!(reason, Reason::Truncated | Reason::BadGenesis(_)),
        "{reason}"
    );
}

#[test]
fn the_chunks_file_cut_short_or_out_of_place_is_detected() {
    let fx = Fixture::new();
    let cut = |dir: &Path, f: &dyn Fn(u64) -> u64| -> u64 {
        let file = dir.join(storage::logfile::FILE);
        let len = std::fs::metadata(&file)
            .expect("stat the chunks file")
            .len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|h| h.set_len(f(len)))
            .expect("resize the chunks file");
        len
    };
    // An empty write-ahead segment named `seq`, as a vault has while the
    // groups from `seq` on are not checkpointed yet.
    let segment = |dir: &Path, seq: u64| {
        let mut bytes = storage::wal::SEGMENT_MAGIC.to_vec();
        bytes.extend_from_slice(&storage::wal::SEGMENT_VERSION.to_be_bytes());
        bytes.resize(4096, 0);
        std::fs::write(dir.join("wal").join(format!("{seq:016x}.wal")), bytes)
            .expect("write a segment");
    };
    // The open drops a pointer or cuts bytes only for a group that the
    // write-ahead file can still hold: in a vault closed cleanly (every
    // group checkpointed) a shorter or longer chunks file is damage, named
    // where it starts, and nothing is dropped or cut.
    let damaged = |dir: &Path, seq: u64, len: u64| {
        for (at, reason) in [fx.failure(dir), open_refusal(dir)] {
            assert_eq!(at, seq);
            assert!(
                matches!(&reason, Reason::Malformed(m) if m.contains("nothing was dropped or cut")),
                "{reason}"
            );
        }
        let file = dir.join(storage::logfile::FILE);
        assert_eq!(std::fs::metadata(file).expect("stat").len(), len);
    };
    // Cut inside the last chunk.
    let dir = fx.copy();
    let len = cut(&dir, &|len| len - 1);
    damaged(&dir, LAST, len - 1);
    // After a power loss, with the group's segment there, the open drops
    // its pointer, and the applied marker names what is lost.
    segment(&dir, LAST);
    assert_eq!(fx.failure(&dir), (LAST - 1, Reason::Truncated));
    segment(&dir, LAST);
    assert_eq!(open_refusal(&dir), (LAST - 1, Reason::Truncated));
    // A pointer moved by one byte: the chunk no longer starts where the
    // one before it ends.
    let dir = fx.tampered(|raw| {
        let p = stored_pointer(raw, BOB);
        let (offset, _) = storage::logfile::decode_pointer(&p).expect("a pointer");
        let moved = [&(offset + 1).to_be_bytes()[..], &p[8..]].concat();
        raw.log
            .index
            .insert(log_key(BOB), moved)
            .expect("write a pointer");
    });
    for (seq, reason) in [fx.failure(&dir), open_refusal(&dir)] {
        assert_eq!(seq, BOB);
        assert!(matches!(reason, Reason::Malformed(_)), "{reason}");
    }
    // The last pointer's offset or length lowered: what lies past it is
    // no crash's leftover, and not cut off.
    for (offset_less, len_less) in [(1u64, 0u64), (4096, 0), (0, 1)] {
        let dir = fx.tampered(|raw| {
            let p = stored_pointer(raw, LAST);
            let (offset, n) = storage::logfile::decode_pointer(&p).expect("a pointer");
            let lowered = [
                &(offset - offset_less).to_be_bytes()[..],
                &((n - len_less) as u32).to_be_bytes()[..],
            ]
            .concat();
            raw.log
                .index
                .insert(log_key(LAST), lowered)
                .expect("write a pointer");
        });
        let len = std::fs::metadata(dir.join(storage::logfile::FILE))
            .expect("stat the chunks file")
            .len();
        damaged(&dir, LAST, len);
    }
    // Bytes past the last chunk: damage in a vault closed cleanly; with
    // a segment that can hold the next group, a write whose pointers a
    // crash kept out of sled, cut off at open, and the log verifies.
    let dir = fx.copy();
    let len = cut(&dir, &|len| len + 100);
    damaged(&dir, LAST + 1, len + 100);
    segment(&dir, LAST + 1);
    assert_eq!(verify_with(&dir, Some(fx.key)).failure, None);
    assert_eq!(
        std::fs::metadata(dir.join(storage::logfile::FILE))
            .expect("stat the chunks file")
            .len(),
        len
    );
}

#[test]
fn chunk_spliced_from_another_vault_is_detected() {
    let fx = Fixture::new();
    // A second vault built by the same script, one group longer: its chunk
    // at LAST + 1 is a seamless continuation, except for the chain.
    let other = fx.tmp.path().join("other");
    build_vault(&other, 1);
    let foreign = {
        let raw = raw_open(&other);
        read_chunk(&raw, LAST + 1)
    };
    let dir = fx.tampered(|raw| {
        raw.log
            .insert(log_key(LAST + 1), foreign.encode())
            .expect("write the log");
    });
    assert_chain_failure(&fx, &dir, LAST + 1, Reason::BadLink);
    // Relinked, the spliced head is still signed by the other vault's key.
    let dir = fx.tampered(|raw| {
        let mut log = read_log(raw);
        log.push(foreign.clone());
        relink(&mut log);
        write_log(raw, &log);
    });
    assert_chain_failure(&fx, &dir, LAST + 1, Reason::BadSignature);
}

// ---------------------------------------------------------------------------
// Ciphertexts moved between subjects

/// Swaps the nonce and ciphertext of alice's first record with bob's
/// (each the second entry of its subject's first group).
fn swap_records(log: &mut [OwnedChunk]) {
    let find = |log: &[OwnedChunk], key: u64| {
        log.iter()
            .position(|c| c.key == key)
            .expect("the subject's first chunk")
    };
    let (ca, cb) = (find(log, ALICE), find(log, BOB));
    let ea = log[ca].entries[1].clone();
    let eb = log[cb].entries[1].clone();
    assert_eq!((ea.kind, ea.subject.as_str()), (Kind::Record, "alice"));
    assert_eq!((eb.kind, eb.subject.as_str()), (Kind::Record, "bob"));
    log[ca].entries[1].payload = eb.payload;
    log[ca].entries[1].nonce = eb.nonce;
    log[cb].entries[1].payload = ea.payload;
    log[cb].entries[1].nonce = ea.nonce;
}

#[test]
fn record_ciphertexts_swapped_between_subjects_are_detected() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        let mut log = read_log(raw);
        swap_records(&mut log);
        write_log(raw, &log);
    });
    assert_chain_failure(&fx, &dir, ALICE + 1, Reason::HeadMismatch);
    // Every hash recomputed: only the signature is left, and it holds.
    let dir = fx.tampered(|raw| {
        let mut log = read_log(raw);
        swap_records(&mut log);
        relink(&mut log);
        write_log(raw, &log);
    });
    assert_chain_failure(&fx, &dir, ALICE + 1, Reason::BadSignature);
}

#[test]
fn record_ciphertext_moved_to_another_subject_does_not_decrypt() {
    // Even with every hash recomputed and the signature somehow accepted,
    // the vault could not read a moved ciphertext: its associated data
    // binds the subject, the seq and the key version.
    let fx = Fixture::new();
    let raw = raw_open(&fx.pristine);
    let (master, _) = common::unseal_master(&raw, &passphrase());
    let data_key = |subject: &str| {
        let wrapped = raw
            .keys
            .get(data_key_name(subject, 1))
            .expect("read keys")
            .expect("data key present");
        unwrap_key(&master, &data_key_aad(subject, 1), &wrapped).expect("data key unwraps")
    };
    let (alice_key, bob_key) = (data_key("alice"), data_key("bob"));
    let alice = read_chunk(&raw, ALICE).entries[1].clone();
    assert_eq!((alice.seq, alice.subject.as_str()), (ALICE + 1, "alice"));
    let bob_seq = BOB + 1;

    let opened = alice_key.open(
        &alice.nonce,
        &record_aad("alice", alice.seq, 1),
        &alice.payload,
    );
    assert_eq!(
        opened.as_deref().map(Vec::as_slice),
        Some(&b"{\"n\":1}"[..])
    );
    // Moved into bob's place, read with bob's key (what the vault would do).
    assert!(bob_key
        .open(&alice.nonce, &record_aad("bob", bob_seq, 1), &alice.payload)
        .is_none());
    // Even alice's own key refuses it under another subject or seq.
    assert!(alice_key
        .open(&alice.nonce, &record_aad("bob", bob_seq, 1), &alice.payload)
        .is_none());
    assert!(alice_key
        .open(
            &alice.nonce,
            &record_aad("bob", alice.seq, 1),
            &alice.payload
        )
        .is_none());
    assert!(alice_key
        .open(
            &alice.nonce,
            &record_aad("alice", bob_seq, 1),
            &alice.payload
        )
        .is_none());
    assert!(alice_key
        .open(
            &alice.nonce,
            &record_aad("alice", alice.seq, 2),
            &alice.payload
        )
        .is_none());
}

// ---------------------------------------------------------------------------
// Key store, metadata, trees

#[test]
fn key_store_altered_is_key_mismatch() {
    let fx = Fixture::new();
    let flip_key = |name: Vec<u8>| {
        fx.tampered(move |raw| {
            let mut v = raw
                .keys
                .get(&name)
                .expect("read keys")
                .expect("key present")
                .to_vec();
            // The last byte: inside the ciphertext, never the KDF parameters.
            let last = v.len() - 1;
            v[last] ^= 0x01;
            raw.keys.insert(name, v).expect("write keys");
        })
    };
    let altered_dk = flip_key(data_key_name("alice", 1));
    let altered_master = flip_key(b"master".to_vec());
    let deleted_dk = fx.tampered(|raw| {
        raw.keys
            .remove(data_key_name("bob", 1))
            .expect("write keys");
    });
    let extra_dk = fx.tampered(|raw| {
        let v = raw
            .keys
            .get(data_key_name("bob", 1))
            .expect("read keys")
            .expect("bob's key");
        raw.keys
            .insert(data_key_name("mallory", 1), v)
            .expect("write keys");
    });
    // Two subjects' wrapped keys exchanged: each is committed to under
    // its own name (and bound to its subject as associated data).
    let swapped_dk = fx.tampered(|raw| {
        let key = |subject: &str| {
            raw.keys
                .get(data_key_name(subject, 1))
                .expect("read keys")
                .expect("a key")
        };
        let (alice, bob) = (key("alice"), key("bob"));
        raw.keys
            .insert(data_key_name("alice", 1), bob)
            .expect("write keys");
        raw.keys
            .insert(data_key_name("bob", 1), alice)
            .expect("write keys");
    });
    // A forged crash marker that names a committed key as left over by a
    // group that never reached the log, so that it would be deleted.
    let forged = || pending_value(LAST + 1, &[data_key_name("alice", 1)]);
    let forged_pending = fx.tampered(|raw| {
        raw.keys.insert("pending", forged()).expect("write keys");
    });
    // The same as a group's own marker.
    let forged_group_marker = fx.tampered(|raw| {
        raw.keys
            .insert(storage::vault::pending_name(LAST + 1), forged())
            .expect("write keys");
    });
    for dir in [
        &altered_dk,
        &altered_master,
        &deleted_dk,
        &extra_dk,
        &swapped_dk,
        &forged_pending,
        &forged_group_marker,
    ] {
        let (seq, reason) = fx.failure(dir);
        assert_eq!(seq, LAST, "{dir:?}");
        assert!(
            matches!(reason, Reason::KeyMismatch(_)),
            "{dir:?}: {reason}"
        );
    }
    // Opening refuses them too, so a forged marker never makes open delete
    // a committed key.
    for dir in [
        &deleted_dk,
        &extra_dk,
        &forged_pending,
        &forged_group_marker,
    ] {
        let (_, reason) = open_refusal(dir);
        assert!(
            matches!(reason, Reason::KeyMismatch(_)),
            "{dir:?}: open: {reason}"
        );
    }
    for dir in [&forged_pending, &forged_group_marker] {
        let raw = raw_open(dir);
        assert!(raw
            .keys
            .get(data_key_name("alice", 1))
            .expect("read")
            .is_some());
    }
    // A master key that no longer unseals cannot be told from a wrong
    // passphrase by open.
    wait_unlocked(&altered_master);
    assert!(matches!(
        Vault::open(&altered_master, &passphrase(), Options::default()),
        Err(Error::WrongSecret)
    ));
    // The signing key is checked at open.
    let altered_signing = flip_key(storage::state::signing_key_name(0));
    let (_, reason) = fx.failure(&altered_signing);
    assert!(matches!(reason, Reason::KeyMismatch(_)), "{reason}");
    let (_, reason) = open_refusal(&altered_signing);
    assert!(matches!(reason, Reason::KeyMismatch(_)), "{reason}");
}

#[test]
fn metadata_altered_is_detected() {
    let fx = Fixture::new();
    let other = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let dir = fx.tampered(|raw| {
        raw.meta
            .insert("public_key", other.as_bytes())
            .expect("write meta");
    });
    let (seq, reason) = fx.failure(&dir);
    assert_eq!(seq, 0);
    assert!(matches!(reason, Reason::MetaMismatch(_)), "{reason}");
    // Trusting the stored key instead: the heads do not verify under it.
    let report = verify_with(&dir, None);
    assert!(report.used_stored_key);
    assert_eq!(report.failure, Some((1, Reason::BadSignature)));
    // Open verifies with the stored key, under which the heads do not
    // verify.
    assert_eq!(open_refusal(&dir), (1, Reason::BadSignature));

    let dir = fx.tampered(|raw| {
        raw.meta.insert("vault_id", &[0u8; 16]).expect("write meta");
    });
    let (_, reason) = fx.failure(&dir);
    assert!(matches!(reason, Reason::MetaMismatch(_)), "{reason}");
    let dir = fx.tampered(|raw| {
        raw.meta.insert("note", "hello").expect("write meta");
    });
    let (_, reason) = fx.failure(&dir);
    assert!(matches!(reason, Reason::MetaMismatch(_)), "{reason}");
}

#[test]
fn wrong_pinned_public_key_is_refused() {
    let fx = Fixture::new();
    let wrong = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    let (seq, reason) = failure_with(&fx.pristine, Some(wrong));
    assert!(
        matches!(reason, Reason::BadSignature | Reason::BadGenesis(_)),
        "{reason}"
    );
    assert_eq!(seq, 1, "the first signed head");
}

#[test]
fn unexpected_tree_is_detected() {
    let fx = Fixture::new();
    let dir = fx.tampered(|raw| {
        let t = raw.db.open_tree("extra").expect("open a tree");
        t.insert("k", "v").expect("write the tree");
    });
    let (seq, reason) = fx.failure(&dir);
    assert_eq!(seq, 0);
    assert!(matches!(reason, Reason::MetaMismatch(_)), "{reason}");
    // sled's default tree, which every database has and the vault never
    // writes: bytes hidden there are found too.
    let dir = fx.tampered(|raw| {
        raw.db.insert("k", "v").expect("write the default tree");
    });
    let (seq, reason) = fx.failure(&dir);
    assert_eq!(seq, 0);
    assert!(
        matches!(&reason, Reason::MetaMismatch(m) if m.contains("default tree")),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------
// Random damage

/// xorshift64*: a fixed-seed generator, so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A copy of the fixture damaged one chunk at a time. Each damage undoes
/// the previous one in the same write, so that a check costs two opens of
/// the data dir (one to write, one to verify) rather than three.
struct Damaged<'a> {
    fx: &'a Fixture,
    dir: PathBuf,
    /// The chunk damaged last, with its original value.
    undo: Option<(u64, Vec<u8>)>,
}

impl<'a> Damaged<'a> {
    fn new(fx: &'a Fixture) -> Self {
        Damaged {
            fx,
            dir: fx.copy(),
            undo: None,
        }
    }

    /// The stored chunks, undamaged.
    fn chunks(&self) -> Vec<(u64, Vec<u8>)> {
        assert!(self.undo.is_none(), "read the chunks before damaging them");
        let raw = raw_open(&self.dir);
        chunk_keys(&raw)
            .into_iter()
            .map(|k| (k, log_value(&raw, k)))
            .collect()
    }

    /// Stores `damaged` in place of the chunk under `key` (whose original
    /// value is `original`) and returns the failure verify reports.
    fn check(&mut self, key: u64, original: &[u8], damaged: Vec<u8>) -> (u64, Reason) {
        let undo = self.undo.replace((key, original.to_vec()));
        tamper(&self.dir, |raw| {
            if let Some((k, v)) = undo {
                raw.log.insert(log_key(k), v).expect("write the log");
            }
            raw.log
                .insert(log_key(key), damaged)
                .expect("write the log");
        });
        self.fx.failure(&self.dir)
    }

    /// Undoes the last damage and checks that the copy verifies again.
    fn assert_restored(mut self) {
        if let Some((k, v)) = self.undo.take() {
            tamper(&self.dir, |raw| {
                raw.log.insert(log_key(k), v).expect("write the log");
            });
        }
        let report = verify_with(&self.dir, Some(self.fx.key));
        assert!(report.ok(), "restored copy fails: {:?}", report.failure);
    }
}

#[test]
fn random_bit_flips_are_always_reported() {
    let fx = Fixture::new();
    let mut damaged = Damaged::new(&fx);
    let chunks = damaged.chunks();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let (key, original) = &chunks[rng.below(chunks.len())];
        let mut v = original.clone();
        // Half of the flips are corruption (stale CRC), half tampering
        // (CRC recomputed, so that decoding and the chain are exercised).
        let tampering = i % 2 == 1;
        let span = if tampering { v.len() - 4 } else { v.len() };
        let at = rng.below(span);
        let bit = 1u8 << rng.below(8);
        v[at] ^= bit;
        if tampering {
            fix_crc(&mut v);
        }
        let (seq, reason) = damaged.check(*key, original, v);
        let what =
            format!("flip {i}: chunk {key}, byte {at}, bit {bit:#04x} -> seq {seq} {reason}");
        // Everything before the damaged chunk is intact.
        assert!((*key..=LAST + 1).contains(&seq), "{what}");
        if tampering {
            assert_ne!(reason, Reason::CrcMismatch, "{what}");
        } else {
            assert_eq!(reason, Reason::CrcMismatch, "{what}");
        }
    }
    damaged.assert_restored();
}

#[test]
fn truncated_chunk_is_always_a_clean_failure() {
    let fx = Fixture::new();
    let mut damaged = Damaged::new(&fx);
    let original = damaged
        .chunks()
        .into_iter()
        .find(|(k, _)| *k == BOB)
        .map(|(_, v)| v)
        .expect("bob's chunk");
    // Every field boundary (and the bytes either side of it), then a
    // stride through the rest.
    let body = original.len() - 4;
    let mut cuts: Vec<usize> = vec![0, 1, 4, 5, 6, 13, 14, 17, 18, 19];
    for r in entry_ranges(&original) {
        cuts.extend([r.start - 4, r.start - 1, r.start, r.start + 1]);
        cuts.extend([r.end - 1, r.end, r.end + 1]);
    }
    let head = head_offset(&original);
    cuts.extend([
        head - 1,
        head,
        head + 1,
        head + HEAD_SIGNATURE,
        body - 1,
        body,
        body + 1,
    ]);
    cuts.extend((0..original.len()).step_by(13));
    cuts.retain(|n| *n < original.len());
    cuts.sort_unstable();
    cuts.dedup();
    for n in cuts {
        // Cut short as storage would leave it: the CRC is whatever is left.
        let (seq, reason) = damaged.check(BOB, &original, original[..n].to_vec());
        assert_eq!(seq, BOB, "cut to {n}");
        assert!(
            matches!(reason, Reason::CrcMismatch | Reason::Malformed(_)),
            "cut to {n}: {reason}"
        );
        // Cut short with a CRC computed over what is left.
        if n < body {
            let mut forged = original[..n].to_vec();
            forged.extend_from_slice(&crc32fast::hash(&original[..n]).to_be_bytes());
            let (seq, reason) = damaged.check(BOB, &original, forged);
            assert_eq!(seq, BOB, "forged cut to {n}");
            assert!(
                matches!(reason, Reason::Malformed(_)),
                "forged cut to {n}: {reason}"
            );
        }
    }
    damaged.assert_restored();
}
