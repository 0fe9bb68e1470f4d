//! Stored chunks, signed heads, Merkle roots and receipts.
//!
//! The committer packs each commit group into one or more **chunks**, each
//! written to the chunks file and found through a pointer in sled's `log`
//! tree under the big-endian seq of its first entry ([`crate::logfile`]).
//! The last chunk of a group carries the group's **signed head**; a sled
//! batch writes a group's pointers together, so after a crash a group is
//! either wholly present or wholly absent.
//!
//! ```text
//! chunk (all integers big-endian)
//! 0     4  magic "FVLC"
//! 4     1  version = 1
//! 5     1  flags: bit 0 = a signed head follows the entries
//! 6     8  first_seq
//! 14    4  entry_count (1..=MAX_CHUNK_ENTRIES)
//! 18       entry_count × { u32 len, entry encoding (see entry) }
//!          [signed head, HEAD_LEN bytes, when flags bit 0]
//! end-4 4  CRC32 (IEEE) of every byte before it
//! ```
//!
//! ```text
//! signed head
//! 0     1  version = 1
//! 1     4  signing key id
//! 5     8  group_first_seq
//! 13    8  last_seq
//! 21   32  last_hash     hash of entry last_seq: commits to the whole chain
//! 53   32  group_root    Merkle root of the hashes of group_first_seq..=last_seq
//! 85    8  timestamp     unix milliseconds
//! 93   64  ed25519 signature over "fintrust-vault/head/v1\0" || bytes 0..93
//! ```
//!
//! The Merkle tree is RFC 6962's over the entry hashes as leaves:
//! `leaf = BLAKE3(0x00 || entry_hash)`, `node = BLAKE3(0x01 || left || right)`,
//! split at the largest power of two below the size.
//!
//! Signed heads, the Merkle tree and receipts are defined in
//! `protocol::receipt` (clients verify them) and re-exported here.
//!
//! A **receipt** proves, to anyone holding the public key, that an entry
//! with this hash sits at this seq in a group the vault signed:
//!
//! ```text
//! receipt
//! 0     1  version = 1
//! 1     8  seq
//! 9    32  entry_hash
//! 41    1  path_len (0..=32)
//! 42       path_len × 32  Merkle audit path, leaf to root
//!          signed head (HEAD_LEN bytes)
//! ```

pub use protocol::receipt::{
    merkle_root, root_from_path, ChainError, KeyChain, KeyEndorsement, MerkleTree, Receipt,
    ReceiptError, SignedHead, HEAD_DOMAIN, HEAD_LEN,
};

use crate::entry::Reader;
use crate::error::{Error, Result};

/// Magic bytes that open every chunk.
pub const CHUNK_MAGIC: &[u8; 4] = b"FVLC";
/// Version byte of the chunk encoding.
pub const CHUNK_VERSION: u8 = 1;
/// Length of the chunk header.
pub const CHUNK_HEADER_LEN: usize = 18;
/// Most entries in one chunk.
pub const MAX_CHUNK_ENTRIES: u32 = 4096;
/// A chunk is closed once its entries reach this many bytes. With one
/// entry of at most `MAX_PAYLOAD_LEN` on top, a chunk stays below 128 KiB.
/// Sled keeps at most 17 values in a leaf and writes a node larger than a
/// quarter segment to a separate blob file that its flush does not sync, so
/// the vault opens sled with 16 MiB segments to keep every node inline.
pub const CHUNK_TARGET_BYTES: usize = 64 * 1024;
/// A chunk decoded over borrowed bytes.
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    pub first_seq: u64,
    /// The encoded entries, in order.
    pub entries: Vec<&'a [u8]>,
    pub head: Option<SignedHead>,
}

/// Encodes a chunk from already-encoded entries.
pub fn encode_chunk(first_seq: u64, entries: &[&[u8]], head: Option<&SignedHead>) -> Vec<u8> {
    assert!(!entries.is_empty() && entries.len() as u32 <= MAX_CHUNK_ENTRIES);
    let body: usize = entries.iter().map(|e| 4 + e.len()).sum();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body + HEAD_LEN + 4);
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(CHUNK_VERSION);
    out.push(u8::from(head.is_some()));
    out.extend_from_slice(&first_seq.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        out.extend_from_slice(&(e.len() as u32).to_be_bytes());
        out.extend_from_slice(e);
    }
    if let Some(h) = head {
        h.encode_into(&mut out);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Why a chunk does not decode: the CRC is kept apart from the rest so that
/// storage corruption can be told from tampering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    Crc,
    Malformed(&'static str),
}

impl<'a> Chunk<'a> {
    /// Checks the CRC, then decodes; never panics on any input.
    pub fn decode(buf: &'a [u8]) -> Result<Chunk<'a>, ChunkError> {
        if buf.len() < CHUNK_HEADER_LEN + 4 {
            return Err(ChunkError::Malformed("chunk too short"));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != stored {
            return Err(ChunkError::Crc);
        }
        Self::decode_body(body).map_err(|e| match e {
            Error::Malformed(m) => ChunkError::Malformed(m),
            _ => ChunkError::Malformed("chunk"),
        })
    }

    fn decode_body(body: &'a [u8]) -> Result<Chunk<'a>> {
        let mut r = Reader::new(body);
        if &r.array::<4>()? != CHUNK_MAGIC {
            return Err(Error::Malformed("bad chunk magic"));
        }
        if r.u8()? != CHUNK_VERSION {
            return Err(Error::Malformed("unknown chunk version"));
        }
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(Error::Malformed("unknown chunk flags"));
        }
        let first_seq = r.u64()?;
        let count = r.u32()?;
        if count == 0 || count > MAX_CHUNK_ENTRIES {
            return Err(Error::Malformed("bad chunk entry count"));
        }
        // Each entry needs at least 4 bytes of length: bound the allocation
        // by what the buffer could hold before trusting `count`.
        if count as usize > r.remaining() / 4 {
            return Err(Error::Malformed("truncated"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = r.u32()? as usize;
            entries.push(r.take(len)?);
        }
        let head = if flags & 1 == 1 {
            Some(SignedHead::decode(r.take(HEAD_LEN)?).map_err(|_| Error::Malformed("bad head"))?)
        } else {
            None
        };
        if !r.is_empty() {
            return Err(Error::Malformed("trailing bytes in chunk"));
        }
        Ok(Chunk {
            first_seq,
            entries,
            head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Hash;
    use ed25519_dalek::SigningKey;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_be_bytes()).as_bytes())
            .collect()
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9u8; 32])
    }

    fn head() -> SignedHead {
        let l = leaves(5);
        SignedHead::sign(&key(), 0, 10, 14, l[4], merkle_root(&l), 1_764_000_000_000)
    }

    #[test]
    fn chunk_round_trip_crc_and_truncation() {
        let h = head();
        let e1 = b"first entry".to_vec();
        let e2 = b"second".to_vec();
        let enc = encode_chunk(10, &[&e1, &e2], Some(&h));
        let c = Chunk::decode(&enc).expect("decodes");
        assert_eq!(c.first_seq, 10);
        assert_eq!(c.entries, vec![e1.as_slice(), e2.as_slice()]);
        assert_eq!(c.head, Some(h));
        for n in 0..enc.len() {
            assert!(Chunk::decode(&enc[..n]).is_err(), "prefix {n}");
        }
        for i in 0..enc.len() {
            let mut flipped = enc.clone();
            flipped[i] ^= 0x01;
            assert!(Chunk::decode(&flipped).is_err(), "flip at {i}");
        }
        // A flip with a recomputed CRC decodes or is malformed, never panics.
        let mut forged = enc[..enc.len() - 4].to_vec();
        forged[14..18].copy_from_slice(&u32::MAX.to_be_bytes());
        let crc = crc32fast::hash(&forged);
        forged.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            Chunk::decode(&forged),
            Err(ChunkError::Malformed(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn chunk_decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = Chunk::decode(&bytes);
        }
    }
}
