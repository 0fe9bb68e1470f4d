//! Entry points for fuzzers and property tests over the storage decoders:
//! what `open`, `verify` and `vault-verify --file` read back from a data
//! dir or a file and treat as untrusted: an entry, a chunk, a write-ahead
//! segment, the key store's sealed master key and markers, the record of a
//! verified prefix, an export file, and the payloads of the entries that
//! remote and file verification are sent. Each asserts what must hold
//! whatever the bytes: no panic, an error of the documented kind, and
//! whatever decodes re-encodes to the same bytes.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line shims over these
//! functions; the proptests below run them on stable in CI.

use crate::chunk::{encode_chunk, Chunk, MAX_CHUNK_ENTRIES};
use crate::crypto::{SealedMaster, SecretKey};
use crate::entry::{entry_hash, entry_hashes, EntryRef, Kind};
use crate::error::Error;
use crate::export::{verify_export, EXPORT_MAGIC, EXPORT_VERSION};
use crate::vault::{decode_pending, decode_shredding, encode_pending, encode_shredding};
use crate::verified;
use crate::verify::{check_entry_content, VerifiedPrefix};
use crate::wal::{encode_record, read_segment, SEGMENT_MAGIC, SEGMENT_VERSION};

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

/// An entry's content as `vault-verify --remote` and `--file` check every
/// entry they are sent ([`check_entry_content`]): the genesis position and
/// the payload's schema, which parses the JSON of audit and key entries.
/// The input is read by [`payload_entry`]. A refusal names the entry's own
/// seq.
pub fn payload(data: &[u8]) {
    let Some(e) = payload_entry(data) else {
        return;
    };
    let kind = e.kind;
    match check_entry_content(&e) {
        Ok(Some(_)) => assert!(e.seq == 0 && kind == Kind::Genesis),
        Ok(None) => assert!(e.seq != 0 && kind != Kind::Genesis),
        Err((seq, _)) => assert_eq!(seq, e.seq),
    }
}

/// The entry [`payload`] checks: the first byte chooses the kind (`None`
/// for one that names none); the second, bit by bit, seq 1 rather than 0
/// (bit 0; only a genesis may stand at seq 0), the subject `cust-42`
/// rather than none (bit 1), and key version 1 rather than 0 (bit 2); the
/// rest is the payload.
pub fn payload_entry(data: &[u8]) -> Option<EntryRef<'_>> {
    let [kind, flags, payload @ ..] = data else {
        return None;
    };
    Some(EntryRef {
        kind: Kind::from_u8(*kind)?,
        seq: u64::from(flags & 1 != 0),
        timestamp_ms: 1,
        prev_hash: [0; 32],
        key_version: u32::from(flags & 4 != 0),
        nonce: [0; 12],
        subject: if flags & 2 != 0 { "cust-42" } else { "" },
        payload,
    })
}

/// A write-ahead segment, as `open` reads it before anything else: the
/// bytes as a whole file, then after a valid header (so the records are
/// reached), then as one record's body under a CRC that holds (so the body
/// decoder sees arbitrary bytes). A segment that reads gives records that
/// re-encode to exactly the bytes after its header, up to where it stopped;
/// one that does not read is `Malformed`.
pub fn wal(data: &[u8]) {
    segment(data);
    let header = [&SEGMENT_MAGIC[..], &SEGMENT_VERSION.to_be_bytes()].concat();
    segment(&[&header[..], data].concat());
    let Ok(len) = u32::try_from(data.len()) else {
        return;
    };
    let record = [
        &len.to_be_bytes()[..],
        &crc32fast::hash(data).to_be_bytes(),
        data,
    ]
    .concat();
    match read_segment(&[&header[..], &record].concat()) {
        // An empty body is eight zero bytes: where the records end.
        Ok(s) if data.is_empty() => assert!(s.groups.is_empty() && !s.torn),
        Ok(s) => {
            assert!(!s.torn && s.groups.len() == 1);
            assert_eq!(encode_record(&s.groups[0]).ok(), Some(record));
        }
        Err(e) => assert!(matches!(e, Error::Malformed(_)), "{e:?}"),
    }
}

fn segment(bytes: &[u8]) {
    match read_segment(bytes) {
        Ok(s) => {
            let mut read = Vec::new();
            for g in &s.groups {
                read.extend(encode_record(g).expect("a record read re-encodes"));
            }
            if !read.is_empty() {
                assert_eq!(bytes.get(8..8 + read.len()), Some(&read[..]));
            }
        }
        Err(e) => assert!(matches!(e, Error::Malformed(_)), "{e:?}"),
    }
}

/// The key store's own formats and the record of a verified prefix, the
/// first byte choosing which: 0 the sealed master key, 1 a pending marker,
/// 2 a shredding marker, 3 a verified-prefix record as read (its tag
/// almost never checks) and again with its tag made good under a fixed
/// master key, so that the fields behind the tag are reached. Whatever
/// decodes re-encodes to the same bytes.
pub fn keys(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which {
        0 => {
            if let Ok(m) = SealedMaster::decode(rest) {
                assert_eq!(m.encode(), rest);
            }
        }
        1 => {
            if let Ok((first, names)) = decode_pending(rest) {
                assert_eq!(encode_pending(first, &names), rest);
            }
        }
        2 => {
            if let Ok((first, subjects)) = decode_shredding(rest) {
                assert_eq!(encode_shredding(first, &subjects), rest);
            }
        }
        3 => {
            let master = SecretKey::from_bytes([7; 32]);
            let vault_id = [9; 16];
            let _ = verified::decode(rest, &master, &vault_id);
            if rest.len() != verified::LEN {
                return;
            }
            let entries = u64::from_be_bytes(rest[5..13].try_into().expect("8 bytes"));
            let prefix = VerifiedPrefix {
                entries,
                last_hash: rest[13..45].try_into().expect("32 bytes"),
                heads_digest: rest[45..77].try_into().expect("32 bytes"),
            };
            let tagged = verified::encode(&prefix, &master, &vault_id);
            let good = [&rest[..77], &tagged[77..]].concat();
            match verified::decode(&good, &master, &vault_id) {
                Some(p) => {
                    assert_eq!(p, prefix);
                    assert_eq!(&tagged[..], &good[..]);
                }
                None => assert!(&good[..5] != b"FVVP\x01" || entries == 0),
            }
        }
        _ => {}
    }
}

/// An export file, as `vault-verify --file` reads it: the bytes as a whole
/// file, then after a valid header (magic, version and the vault id of the
/// export vector of `docs/storage.md`), against a fixed key. Read from
/// memory, the check always runs once the header is there: whatever
/// follows is a verdict in the report (never an error, a panic or a hang),
/// and a file without the magic is refused as not an export.
pub fn export(data: &[u8]) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[0x42; 32]).verifying_key();
    let header = [&EXPORT_MAGIC[..], &[EXPORT_VERSION], &[6; 16]].concat();
    match verify_export(data, &key) {
        Ok(r) => {
            assert!(data.starts_with(EXPORT_MAGIC));
            passed_means_signed(&r.report);
        }
        Err(e) => assert!(matches!(e, Error::Malformed(_)), "{e:?}"),
    }
    let r = verify_export([&header[..], data].concat().as_slice(), &key)
        .expect("an export with a good header is checked");
    passed_means_signed(&r.report);
}

/// An export that passes ends with a signed head covering its last entry.
fn passed_means_signed(r: &crate::verify::Report) {
    if r.failure.is_none() {
        let head = r.signed_head.as_ref().expect("a passing export has a head");
        assert_eq!(head.last_seq + 1, r.entries);
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::num::u8::ANY;
    use proptest::option::of;

    use crate::chunk::{CHUNK_MAGIC, CHUNK_VERSION};
    use crate::crypto::SealedMaster;
    use crate::error::Error;
    use crate::export::{TAG_END, TAG_ENTRY, TAG_HEAD};
    use crate::wal::{encode_record, Batch, GroupWrite, TreeId, SEGMENT_MAGIC, SEGMENT_VERSION};

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

        /// Payloads shaped as the schemas' JSON: an object of known and
        /// unknown members with values of every type, hex strings among
        /// them.
        #[test]
        fn payload_never_panics(
            kind in 0u8..16,
            flags in 0u8..8,
            members in vec((0usize..MEMBERS.len(), 0u8..6, 0u32..6), 0..8),
            raw in vec(ANY, 0..40),
        ) {
            let body: Vec<String> = members
                .iter()
                .map(|&(name, value, n)| {
                    let v = match value {
                        0 => n.to_string(),
                        1 => format!("\"{}\"", "ab".repeat(16 * n as usize)),
                        2 => {
                            let words = ["x", "subject", "rewrap", "master", "signing", "cust-42"];
                            format!("\"{}\"", words[n as usize % words.len()])
                        }
                        3 => format!("[[\"{}\",\"{}\"]]", "61".repeat(n as usize), "cd".repeat(32)),
                        4 => "null".to_string(),
                        _ => "{}".to_string(),
                    };
                    format!("\"{}\":{v}", MEMBERS[name])
                })
                .collect();
            let json = format!("{{{}}}", body.join(","));
            super::payload(&[&[kind, flags][..], json.as_bytes()].concat());
            super::payload(&[&[kind, flags][..], &raw].concat());
        }

        #[test]
        fn wal_never_panics(
            first_seq in proptest::num::u64::ANY,
            batches in vec((0u8..5, vec((vec(ANY, 0..12), of(vec(ANY, 0..24))), 0..4)), 0..4),
            zeros in 0usize..20,
            poke in (0usize..1000, ANY),
        ) {
            let g = GroupWrite {
                first_seq,
                batches: batches
                    .into_iter()
                    .map(|(tree, ops)| Batch { tree: tree_id(tree), ops })
                    .collect(),
            };
            let record = encode_record(&g).expect("encodes");
            // A good body, then one with a byte changed: the body decoder.
            let mut body = record[8..].to_vec();
            super::wal(&body);
            let at = poke.0 % body.len();
            body[at] = poke.1;
            super::wal(&body);
            // A whole segment (header, two records, zeros), then with a
            // byte changed: the segment reader.
            let mut seg = [&SEGMENT_MAGIC[..], &SEGMENT_VERSION.to_be_bytes()].concat();
            seg.extend_from_slice(&record);
            seg.extend_from_slice(&record);
            seg.extend(std::iter::repeat_n(0, zeros));
            super::wal(&seg);
            let at = poke.0 % seg.len();
            seg[at] = poke.1;
            super::wal(&seg);
        }

        #[test]
        fn keys_never_panic(
            which in 0u8..4,
            kdf in 0u8..4,
            fields in vec(ANY, 96),
            names in vec(vec(0x20u8..0x80, 0..20), 0..4),
            entries in 0u64..3,
            poke in (0usize..200, ANY),
        ) {
            let mut v = vec![which];
            match which {
                0 => {
                    v.extend_from_slice(&[1, kdf]);
                    v.extend_from_slice(&fields[..88]);
                    if kdf == 2 {
                        v[3..15].fill(0);
                    }
                }
                1 | 2 => {
                    v.extend_from_slice(&fields[..8]);
                    for n in &names {
                        v.extend_from_slice(&(n.len() as u16).to_be_bytes());
                        v.extend_from_slice(n);
                    }
                }
                _ => {
                    v.extend_from_slice(b"FVVP\x01");
                    v.extend_from_slice(&entries.to_be_bytes());
                    v.extend_from_slice(&fields[..LEN_AFTER_ENTRIES]);
                }
            }
            super::keys(&v);
            let at = 1 + poke.0 % (v.len() - 1).max(1);
            if at < v.len() {
                v[at] = poke.1;
            }
            super::keys(&v);
        }

        #[test]
        fn export_never_panics(
            records in vec((0u8..4, vec(ANY, 0..200)), 0..6),
            poke in (0usize..2000, ANY),
        ) {
            // Records after the header that `export` writes: entries
            // shaped as entries, heads of the right length, an end marker
            // that counts them, and now and then an unknown tag.
            let (mut out, mut entries, mut heads) = (Vec::new(), 0u64, 0u64);
            for (tag, body) in &records {
                let (tag, body) = match tag {
                    0 => {
                        entries += 1;
                        let kind = body.first().copied().unwrap_or(2) % 16;
                        (TAG_ENTRY, entry_bytes(kind, &[0; 64], b"s", body, (0, 1)))
                    }
                    1 => {
                        heads += 1;
                        let mut h = body.clone();
                        h.resize(157, 1);
                        (TAG_HEAD, h)
                    }
                    2 => (TAG_END, [entries.to_be_bytes(), heads.to_be_bytes()].concat()),
                    _ => (0x7f, body.clone()),
                };
                out.push(tag);
                out.extend_from_slice(&(body.len() as u32).to_be_bytes());
                out.extend_from_slice(&body);
            }
            super::export(&out);
            if !out.is_empty() {
                let at = poke.0 % out.len();
                out[at] = poke.1;
                super::export(&out);
            }
        }
    }

    /// The members of the payload schemas (`docs/storage.md`, section 3),
    /// and one that none has.
    const MEMBERS: &[&str] = &[
        "format",
        "vault_id",
        "public_key",
        "sealed_master_hash",
        "signing_key_hash",
        "version",
        "wrapped_hash",
        "recorded_by",
        "key",
        "subject",
        "keys",
        "rewrapped",
        "mask_key_hash",
        "key_id",
        "endorsement",
        "id",
        "role",
        "key_hash",
        "name",
        "token_hash",
        "partner_id",
        "purpose",
        "fields",
        "expires_at_ms",
        "minted_at_ms",
        "checked_at_ms",
        "purposes",
        "unknown",
    ];

    /// Bytes of a verified-prefix record after its entry count.
    const LEN_AFTER_ENTRIES: usize = crate::verified::LEN - 13;

    fn tree_id(b: u8) -> TreeId {
        match b {
            0 => TreeId::Log,
            1 => TreeId::State,
            2 => TreeId::Keys,
            _ => TreeId::Meta,
        }
    }

    /// A key-file sealing whose parameters are not zeros has a second
    /// encoding of the same key: it does not decode.
    #[test]
    fn a_key_file_sealing_with_kdf_parameters_is_malformed() {
        let mut v = vec![1u8, 2];
        v.extend_from_slice(&[0; 12]);
        v.extend_from_slice(&[5; 76]);
        assert!(SealedMaster::decode(&v).is_ok());
        v[5] = 1;
        assert!(matches!(SealedMaster::decode(&v), Err(Error::Malformed(_))));
        super::keys(&[&[0u8][..], &v].concat());
    }
}
