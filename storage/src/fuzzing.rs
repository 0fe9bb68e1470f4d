//! Entry points for fuzzers and property tests over the storage decoders:
//! an entry and a chunk as read back from disk, which `open` and `verify`
//! treat as untrusted. Each asserts what must hold whatever the bytes: no
//! panic, and whatever decodes re-encodes to the same bytes.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line shims over these
//! functions; the proptests below run them on stable in CI.

use crate::chunk::{encode_chunk, Chunk, MAX_CHUNK_ENTRIES};
use crate::entry::{entry_hash, entry_hashes, EntryRef};

/// One entry: decode, re-encode, hash. Whatever the bytes, hashing them
/// side by side with pieces of themselves gives each piece's own hash.
pub fn entry(data: &[u8]) {
    if let Ok(e) = EntryRef::decode(data) {
        assert_eq!(e.encode(), data);
        assert_eq!(e.encoded_len(), data.len());
        let _ = entry_hash(data);
    }
    let pieces: Vec<&[u8]> = (0..=data.len().min(40))
        .map(|cut| &data[cut..])
        .chain(data.chunks(97))
        .collect();
    let one_by_one: Vec<_> = pieces.iter().map(|p| entry_hash(p)).collect();
    assert_eq!(entry_hashes(&pieces), one_by_one);
}

/// One chunk: as given (the CRC almost never holds), and with a correct
/// CRC appended so that the body decoder sees arbitrary bytes. A chunk that
/// decodes re-encodes to the same bytes, and its entries go through
/// [`entry`].
pub fn chunk(data: &[u8]) {
    let _ = Chunk::decode(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    let Ok(c) = Chunk::decode(&sealed) else {
        return;
    };
    assert!(!c.entries.is_empty() && c.entries.len() as u32 <= MAX_CHUNK_ENTRIES);
    assert_eq!(
        encode_chunk(c.first_seq, &c.entries, c.head.as_ref()),
        sealed
    );
    for e in &c.entries {
        entry(e);
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::num::u8::ANY;

    use crate::chunk::{CHUNK_MAGIC, CHUNK_VERSION};

    /// An entry-shaped byte string: a valid version, any kind byte, and
    /// length prefixes that match what follows (and fit), then one byte
    /// overwritten, so that every later check is reached.
    fn entry_bytes(
        kind: u8,
        fixed: &[u8],
        subject: &[u8],
        payload: &[u8],
        poke: (usize, u8),
    ) -> Vec<u8> {
        let mut e = vec![1, kind];
        e.extend_from_slice(fixed);
        e.extend_from_slice(&(subject.len() as u16).to_be_bytes());
        e.extend_from_slice(subject);
        e.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        e.extend_from_slice(payload);
        let at = poke.0 % e.len();
        e[at] = poke.1;
        e
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn entry_never_panics(
            kind in 0u8..16,
            fixed in vec(ANY, 64),
            subject in vec(0x20u8..0x80, 0..40),
            payload in vec(ANY, 0..100),
            poke in (0usize..300, ANY),
        ) {
            super::entry(&entry_bytes(kind, &fixed, &subject, &payload, poke));
        }

        #[test]
        fn chunk_never_panics(
            flags in 0u8..3,
            first_seq in proptest::num::u64::ANY,
            entries in vec(vec(ANY, 0..80), 0..4),
            head in vec(ANY, 157),
            poke in (0usize..1000, ANY),
        ) {
            let mut c = CHUNK_MAGIC.to_vec();
            c.push(CHUNK_VERSION);
            c.push(flags);
            c.extend_from_slice(&first_seq.to_be_bytes());
            c.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            for e in &entries {
                c.extend_from_slice(&(e.len() as u32).to_be_bytes());
                c.extend_from_slice(e);
            }
            if flags == 1 {
                let at = c.len();
                c.extend_from_slice(&head);
                c[at] = 1;
            }
            super::chunk(&c);
            let at = poke.0 % c.len();
            c[at] = poke.1;
            super::chunk(&c);
        }
    }
}
