//! Log entries: their kinds, canonical encoding and hash.
//!
//! An entry is encoded once, by the committer, and its bytes are stored as
//! they are; the entry hash is BLAKE3 over a domain tag and those bytes, so
//! hashing never depends on a re-encoding. All integers are big-endian.
//!
//! ```text
//! offset size  field
//!      0    1  version            = 1
//!      1    1  kind               (see Kind)
//!      2    8  seq                contiguous from 0
//!     10    8  timestamp          unix milliseconds
//!     18   32  prev_hash          hash of entry seq-1 (zeros for seq 0)
//!     50    4  key_version        subject data key version; 0 = plaintext payload
//!     54   12  nonce              AES-256-GCM-SIV nonce; zeros when plaintext
//!     66    2  subject_len        0..=MAX_SUBJECT_LEN
//!     68    n  subject            UTF-8 subject id (may be empty)
//!   68+n    4  payload_len        0..=MAX_PAYLOAD_LEN
//!   72+n    m  payload            ciphertext (records) or JSON (everything else)
//!
//! entry_hash = BLAKE3("fintrust-vault/entry/v1\0" || encoding)
//! ```
//!
//! Invariants: the encoding has no trailing bytes; `seq` of entry n is n;
//! `prev_hash` of entry n is the hash of entry n-1.

pub(crate) use protocol::wire::Reader;

use crate::error::{Error, Result};

/// Version byte of the entry encoding.
pub const ENTRY_VERSION: u8 = 1;
/// Length of the fixed part before the subject.
pub const FIXED_LEN: usize = 68;
/// Longest subject id in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;
/// Largest payload in bytes. Bounded so that a stored chunk always stays
/// inline in sled (see `chunk`), never in a separate blob file.
pub const MAX_PAYLOAD_LEN: usize = 48 * 1024;
/// Domain tag hashed before every entry encoding.
pub const ENTRY_DOMAIN: &[u8] = b"fintrust-vault/entry/v1\0";

/// A 32-byte BLAKE3 hash.
pub type Hash = [u8; 32];

/// What an entry records. The discriminant is the on-disk byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// The first entry: vault id, public key and commitments to the sealed keys.
    Genesis = 1,
    /// Personal data of a subject (encrypted).
    Record = 2,
    ConsentGranted = 3,
    ConsentRevoked = 4,
    PolicyChanged = 5,
    TokenMinted = 6,
    TokenRedeemed = 7,
    AccessDenied = 8,
    CredentialCreated = 9,
    CredentialRevoked = 10,
    /// A subject data key was created or re-wrapped: commits to its hash.
    SubjectKey = 11,
    /// The master or signing key was rotated.
    KeyRotated = 12,
    /// A subject's data key was destroyed.
    SubjectShredded = 13,
    /// A checkpoint of the chain head (reserved for key rotation and export).
    Checkpoint = 14,
}

impl Kind {
    /// Every kind, in discriminant order.
    pub const ALL: [Kind; 14] = [
        Kind::Genesis,
        Kind::Record,
        Kind::ConsentGranted,
        Kind::ConsentRevoked,
        Kind::PolicyChanged,
        Kind::TokenMinted,
        Kind::TokenRedeemed,
        Kind::AccessDenied,
        Kind::CredentialCreated,
        Kind::CredentialRevoked,
        Kind::SubjectKey,
        Kind::KeyRotated,
        Kind::SubjectShredded,
        Kind::Checkpoint,
    ];

    /// Decodes the on-disk byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.get((b as usize).wrapping_sub(1)).copied()
    }

    /// A stable snake_case name, used in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Genesis => "genesis",
            Kind::Record => "record",
            Kind::ConsentGranted => "consent_granted",
            Kind::ConsentRevoked => "consent_revoked",
            Kind::PolicyChanged => "policy_changed",
            Kind::TokenMinted => "token_minted",
            Kind::TokenRedeemed => "token_redeemed",
            Kind::AccessDenied => "access_denied",
            Kind::CredentialCreated => "credential_created",
            Kind::CredentialRevoked => "credential_revoked",
            Kind::SubjectKey => "subject_key",
            Kind::KeyRotated => "key_rotated",
            Kind::SubjectShredded => "subject_shredded",
            Kind::Checkpoint => "checkpoint",
        }
    }

    /// Parses [`Kind::name`].
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A decoded entry that borrows its subject and payload from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub kind: Kind,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub prev_hash: Hash,
    /// 0 when the payload is plaintext.
    pub key_version: u32,
    pub nonce: [u8; 12],
    pub subject: &'a str,
    pub payload: &'a [u8],
}

impl<'a> EntryRef<'a> {
    /// Length of the canonical encoding.
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + self.subject.len() + 4 + self.payload.len()
    }

    /// Appends the canonical encoding to `out`.
    ///
    /// Panics if the subject or payload exceed their maximum: callers check
    /// input before it reaches the committer, so this is a bug.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(self.subject.len() <= MAX_SUBJECT_LEN, "subject too long");
        assert!(self.payload.len() <= MAX_PAYLOAD_LEN, "payload too long");
        out.reserve(self.encoded_len());
        out.push(ENTRY_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&(self.subject.len() as u16).to_be_bytes());
        out.extend_from_slice(self.subject.as_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(self.payload);
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Decodes exactly one entry from `buf`; trailing bytes are an error.
    pub fn decode(buf: &'a [u8]) -> Result<EntryRef<'a>> {
        let mut r = Reader::new(buf);
        let version = r.u8()?;
        if version != ENTRY_VERSION {
            return Err(Error::Malformed("unknown entry version"));
        }
        let kind = Kind::from_u8(r.u8()?).ok_or(Error::Malformed("unknown entry kind"))?;
        let seq = r.u64()?;
        let timestamp_ms = r.u64()?;
        let prev_hash = r.array::<32>()?;
        let key_version = r.u32()?;
        let nonce = r.array::<12>()?;
        let subject_len = r.u16()? as usize;
        if subject_len > MAX_SUBJECT_LEN {
            return Err(Error::Malformed("subject too long"));
        }
        let subject = std::str::from_utf8(r.take(subject_len)?)
            .map_err(|_| Error::Malformed("subject is not UTF-8"))?;
        let payload_len = r.u32()? as usize;
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(Error::Malformed("payload too long"));
        }
        let payload = r.take(payload_len)?;
        if !r.is_empty() {
            return Err(Error::Malformed("trailing bytes after entry"));
        }
        Ok(EntryRef {
            kind,
            seq,
            timestamp_ms,
            prev_hash,
            key_version,
            nonce,
            subject,
            payload,
        })
    }
}

/// BLAKE3 over the domain tag and an entry's canonical encoding.
pub fn entry_hash(encoded: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(ENTRY_DOMAIN);
    h.update(encoded);
    *h.finalize().as_bytes()
}

/// [`entry_hash`] of each of `encoded`, in order, computed side by side
/// ([`protocol::hashing::hash_all`]): several times faster per entry than
/// one after the other, for a reader that has many entries at hand.
pub fn entry_hashes(encoded: &[&[u8]]) -> Vec<Hash> {
    protocol::hashing::hash_all(ENTRY_DOMAIN, encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EntryRef<'static> {
        EntryRef {
            kind: Kind::Record,
            seq: 7,
            timestamp_ms: 1_764_000_000_000,
            prev_hash: [0xab; 32],
            key_version: 1,
            nonce: [0x11; 12],
            subject: "cust-42",
            payload: b"\x01\x02\x03",
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes.len(), e.encoded_len());
        assert_eq!(EntryRef::decode(&bytes).expect("decodes"), e);
    }

    /// Golden vector: docs/storage.md shows the same bytes and hash.
    #[test]
    fn golden_vector() {
        let bytes = sample().encode();
        let expected = concat!(
            "01",               // version
            "02",               // kind = record
            "0000000000000007", // seq
            "0000019ab697e800", // timestamp ms
            "abababababababababababababababababababababababababababababababab",
            "00000001",                 // key_version
            "111111111111111111111111", // nonce
            "0007",                     // subject_len
            "637573742d3432",           // "cust-42"
            "00000003",                 // payload_len
            "010203",                   // payload
        );
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(
            hex::encode(entry_hash(&bytes)),
            GOLDEN_HASH,
            "entry hash changed: update docs/storage.md only if the format changed on purpose"
        );
    }

    const GOLDEN_HASH: &str = "3fcd2d489aa7af2e6636c35009d5a378027e9b31cd00e0fe81fc2be8da7d8911";

    #[test]
    fn every_truncation_is_a_clean_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(EntryRef::decode(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(EntryRef::decode(&long).is_err());
    }

    #[test]
    fn unknown_kind_and_version_rejected() {
        let mut bytes = sample().encode();
        bytes[1] = 0;
        assert!(EntryRef::decode(&bytes).is_err());
        bytes[1] = 15;
        assert!(EntryRef::decode(&bytes).is_err());
        bytes[1] = 2;
        bytes[0] = 2;
        assert!(EntryRef::decode(&bytes).is_err());
    }

    #[test]
    fn kind_names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
    }

    /// Bytes that differ from one input to the next, so that a lane
    /// mixed up with another shows.
    fn filler(len: usize, salt: usize) -> Vec<u8> {
        (0..len).map(|j| (j * 7 + salt * 131 + 3) as u8).collect()
    }

    #[test]
    fn hashes_side_by_side_of_a_real_entry_match_its_test_vector_hash() {
        let bytes = sample().encode();
        assert_eq!(entry_hashes(&[&bytes]), vec![entry_hash(&bytes)]);
    }

    proptest::proptest! {
        #[test]
        fn hashes_side_by_side_of_mixed_lengths_keep_their_order(
            lens in proptest::collection::vec(0usize..1_200, 0..70)
        ) {
            let inputs: Vec<Vec<u8>> = lens.iter().enumerate().map(|(k, &l)| filler(l, k)).collect();
            let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let want: Vec<Hash> = refs.iter().map(|e| entry_hash(e)).collect();
            proptest::prop_assert_eq!(entry_hashes(&refs), want);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = EntryRef::decode(&bytes);
        }
    }
}
