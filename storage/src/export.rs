//! Export files: a vault's whole log, entries and signed heads in order,
//! in one portable file that anyone holding the pinned public key can
//! check offline (`vault-verify --file`), with the same rules as a data
//! dir ([`crate::verify::StreamCheck`]).
//!
//! ```text
//! export file (all integers big-endian; docs/storage.md, section 11)
//! 0     8  magic "FVEXPORT"
//! 8     1  version = 1
//! 9    16  vault id (as the genesis entry names it)
//! 25       records, each: u8 tag, u32 len, len bytes
//!            tag 0x01 entry: an entry's encoding (1..=MAX_ENTRY_LEN bytes)
//!            tag 0x02 head:  a signed head (HEAD_LEN = 157 bytes), closing
//!                            the commit group of the entries before it
//!            tag 0xFF end:   u64 entries, u64 heads (len = 16); the last
//!                            record, followed by nothing
//! ```
//!
//! The order is the log's: each group's entries, then its head. Lengths
//! are checked against their maximum before anything is read or
//! allocated. A reader thread reads the records into runs of up to 1,024
//! entries (1 MiB) and hashes each run's entries side by side on every
//! core while the checker walks the run before, at most
//! two runs ahead: a hostile file costs at most one entry's
//! buffer beyond those runs (4 MiB in all). Groups' Merkle roots and
//! heads' signatures are checked up to 64 groups at a time on every core
//! ([`StreamCheck::settle`]); whatever stops the walk, the entries and
//! groups read before it are checked first, so the failure reported is
//! the earliest.
//!
//! A file whose first 8 bytes are not the magic is not an export (the
//! check cannot run); so is one of another version. Past the magic, any
//! fault is damage to an export and an integrity failure at the next
//! expected seq: a truncation (`truncated`), a bad tag, length or count
//! (`malformed`), or whatever the chain checks find.

use std::io::{self, Read, Write};
use std::sync::mpsc;

use ed25519_dalek::VerifyingKey;

use crate::chunk::{SignedHead, HEAD_LEN};
use crate::entry::{FIXED_LEN, MAX_PAYLOAD_LEN, MAX_SUBJECT_LEN};
use crate::error::{Error, Reason, Result};
use crate::verify::{EntryRun, Failure, Hashed, HashedRun, Report, StreamCheck};

/// The first bytes of every export file.
pub const EXPORT_MAGIC: &[u8; 8] = b"FVEXPORT";
/// The version this crate writes and reads.
pub const EXPORT_VERSION: u8 = 1;
/// Length of the header: magic, version, vault id.
pub const EXPORT_HEADER_LEN: usize = 8 + 1 + 16;
/// Record tag of an entry.
pub const TAG_ENTRY: u8 = 0x01;
/// Record tag of a signed head.
pub const TAG_HEAD: u8 = 0x02;
/// Record tag of the end marker.
pub const TAG_END: u8 = 0xFF;
/// Longest entry encoding: the fixed part, the longest subject, the
/// payload length and the largest payload.
pub const MAX_ENTRY_LEN: usize = FIXED_LEN + MAX_SUBJECT_LEN + 4 + MAX_PAYLOAD_LEN;
/// Length of the end record's body.
const END_LEN: usize = 16;

/// Writes an export file record by record. The caller feeds the log in
/// order (the export drivers check it with [`StreamCheck`] as they go);
/// [`ExportWriter::finish`] writes the end marker.
#[derive(Debug)]
pub struct ExportWriter<W: Write> {
    out: W,
    entries: u64,
    heads: u64,
}

impl<W: Write> ExportWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W, vault_id: &[u8; 16]) -> Result<Self> {
        out.write_all(EXPORT_MAGIC)?;
        out.write_all(&[EXPORT_VERSION])?;
        out.write_all(vault_id)?;
        Ok(ExportWriter {
            out,
            entries: 0,
            heads: 0,
        })
    }

    fn record(&mut self, tag: u8, body: &[u8]) -> Result<()> {
        let len =
            u32::try_from(body.len()).map_err(|_| Error::Invalid("record too long".into()))?;
        self.out.write_all(&[tag])?;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(body)?;
        Ok(())
    }

    /// Writes an entry's encoding.
    pub fn entry(&mut self, encoded: &[u8]) -> Result<()> {
        if encoded.is_empty() || encoded.len() > MAX_ENTRY_LEN {
            return Err(Error::Invalid("entry length out of range".into()));
        }
        self.record(TAG_ENTRY, encoded)?;
        self.entries += 1;
        Ok(())
    }

    /// Writes the head closing the group of the entries written since the
    /// last one.
    pub fn head(&mut self, head: &SignedHead) -> Result<()> {
        self.record(TAG_HEAD, &head.encode())?;
        self.heads += 1;
        Ok(())
    }

    /// Writes the end marker; returns the output and the counts.
    pub fn finish(mut self) -> Result<(W, u64, u64)> {
        let mut end = [0u8; END_LEN];
        end[..8].copy_from_slice(&self.entries.to_be_bytes());
        end[8..].copy_from_slice(&self.heads.to_be_bytes());
        self.record(TAG_END, &end)?;
        self.out.flush()?;
        Ok((self.out, self.entries, self.heads))
    }
}

/// What [`verify_export`] found. `report.failure` is the first integrity
/// failure; `report.used_stored_key` is always false (the key is pinned).
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub report: Report,
    /// The vault id the header names.
    pub vault_id: [u8; 16],
}

/// Reads exactly `buf.len()` bytes: `Ok(false)` when the input ends first
/// (a truncated export), `Err` for any other I/O error.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Verifies an export file read from `input` against the pinned `key`:
/// the chain (contiguous seqs from 0, links), the genesis entry naming
/// `key` and the header's vault id, every group's Merkle root and
/// signature, every payload's schema, and an end marker that counts what
/// came before and follows a head covering the last entry.
///
/// `Err` means the check could not run: an I/O error, a file that is not
/// an export (`Malformed`: wrong magic) or of an unknown version. Every
/// other fault is an integrity failure in the report.
pub fn verify_export(input: impl Read + Send, key: &VerifyingKey) -> Result<ExportReport> {
    let mut r = io::BufReader::new(input);
    let mut magic = [0u8; 8];
    if !read_full(&mut r, &mut magic)? || &magic != EXPORT_MAGIC {
        return Err(Error::Malformed("not a fintrust-vault export file"));
    }
    let mut version = [0u8; 1];
    if read_full(&mut r, &mut version)? && version[0] != EXPORT_VERSION {
        return Err(Error::Malformed("unsupported export file version"));
    }
    let mut walk = StreamCheck::new(*key);
    let mut vault_id = [0u8; 16];
    let outcome = if version == [EXPORT_VERSION] && read_full(&mut r, &mut vault_id)? {
        walk_records(&mut r, &mut walk, &vault_id)?
    } else {
        Err((0, Reason::Truncated))
    };
    let mut report = Report {
        groups: walk.groups(),
        shredded: walk.shredded().to_vec(),
        ..Report::default()
    };
    match outcome {
        Ok(()) => {
            report.signing_keys = walk.keys().endorsements().to_vec();
            let tip = walk.tip();
            report.entries = tip.entries;
            report.head = tip.last_hash;
            report.signed_head = tip.head;
        }
        Err(f) => report.failure = Some(f),
    }
    Ok(ExportReport { report, vault_id })
}

/// Reads records until the end marker. `Ok(Err(_))` is an integrity
/// failure; `Err` an I/O error. A reader thread reads the records and
/// hashes their entries side by side, a run at a time ([`Piece`]), while
/// this thread checks the run before; whatever ends the walk, the records
/// read before it are checked first, so the failure reported is the
/// earliest, as if each record had been checked as it was read.
fn walk_records<R: Read + Send>(
    r: &mut R,
    walk: &mut StreamCheck,
    vault_id: &[u8; 16],
) -> Result<std::result::Result<(), Failure>> {
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel(RUNS_AHEAD);
        let reader = std::thread::Builder::new()
            .name("export-reader".into())
            .spawn_scoped(s, move || read_pieces(r, &tx))?;
        let outcome = check_pieces(&rx, walk, vault_id);
        // A walk that stopped early leaves the reader blocked on a full
        // channel: dropping the receiver ends its next send.
        drop(rx);
        reader
            .join()
            .map_err(|_| Error::Malformed("the export reader stopped"))?;
        // The groups left to settle come before whatever ended the walk.
        match (walk.settle(), outcome) {
            (Err(f), _) => Ok(Err(f)),
            (Ok(()), outcome) => outcome,
        }
    })
}

/// Runs read ahead of the one being checked.
const RUNS_AHEAD: usize = 2;

/// Groups whose roots and signatures wait to be checked together, on
/// every core: at most this many heads, and at most
/// [`UNSETTLED_HASHES`] entry hashes (32 bytes each) among them.
const UNSETTLED_HEADS: usize = 64;
const UNSETTLED_HASHES: usize = 16 * 1024;

/// What the reader hands the checker, in file order.
enum Piece {
    /// Entries, hashed, and the heads among them: each after the number of
    /// the run's entries it names.
    Run {
        entries: HashedRun,
        heads: Vec<(usize, SignedHead)>,
    },
    /// The end marker, its counts those of the records before it; whether
    /// bytes follow it.
    End { trailing: bool, at: u64 },
    /// Damage the reader found at the entry it names: a cut, or a bad tag,
    /// length or count.
    Damage(Failure),
    /// The file could not be read.
    Io(Error),
}

/// A run is handed over once it holds this many entries or bytes.
const RUN_ENTRIES: usize = 1024;
const RUN_BYTES: usize = 1024 * 1024;

/// Reads records into runs and sends them, then what ended the reading.
/// Stops early when the checker has gone.
fn read_pieces(r: &mut impl Read, tx: &mpsc::SyncSender<Piece>) {
    let mut run = EntryRun::default();
    let mut heads = Vec::new();
    let ending = read_runs(r, tx, &mut run, &mut heads);
    if let Some(ending) = ending {
        let last = Piece::Run {
            entries: std::mem::take(&mut run).hash(),
            heads: std::mem::take(&mut heads),
        };
        if tx.send(last).is_ok() {
            let _ = tx.send(ending);
        }
    }
}

/// The records of [`read_pieces`], the last run left in `run` and `heads`;
/// returns what ended the reading (`None`: the checker has gone).
fn read_runs(
    r: &mut impl Read,
    tx: &mpsc::SyncSender<Piece>,
    run: &mut EntryRun,
    heads: &mut Vec<(usize, SignedHead)>,
) -> Option<Piece> {
    let mut buf = Vec::new();
    let (mut entries, mut head_count) = (0u64, 0u64);
    // The entry count at the last head: each head closes a commit group,
    // which holds an entry at least, so a head with none since the one
    // before (or since the header) is refused here, before the heads that
    // follow it could pile up unchecked (they go to the checker with the
    // entries of their run).
    let mut entries_at_head = 0u64;
    loop {
        if run.len() >= RUN_ENTRIES || run.byte_len() >= RUN_BYTES {
            let full = Piece::Run {
                entries: std::mem::take(run).hash(),
                heads: std::mem::take(heads),
            };
            tx.send(full).ok()?;
        }
        let at = entries;
        let bad = |m: &str| Piece::Damage((at, Reason::Malformed(format!("export file: {m}"))));
        let mut tag_len = [0u8; 5];
        match read_full(r, &mut tag_len) {
            Ok(true) => {}
            Ok(false) => return Some(Piece::Damage((at, Reason::Truncated))),
            Err(e) => return Some(Piece::Io(e)),
        }
        let tag = tag_len[0];
        let len = u32::from_be_bytes([tag_len[1], tag_len[2], tag_len[3], tag_len[4]]) as usize;
        let max = match tag {
            TAG_ENTRY => MAX_ENTRY_LEN,
            TAG_HEAD => HEAD_LEN,
            TAG_END => END_LEN,
            _ => return Some(bad("unknown record tag")),
        };
        // Checked before a byte of the body is read or allocated.
        if len > max || len == 0 || (tag != TAG_ENTRY && len != max) {
            return Some(bad("record length out of range"));
        }
        buf.resize(len, 0);
        match read_full(r, &mut buf) {
            Ok(true) => {}
            Ok(false) => return Some(Piece::Damage((at, Reason::Truncated))),
            Err(e) => return Some(Piece::Io(e)),
        }
        match tag {
            TAG_ENTRY => {
                run.push(&buf);
                entries += 1;
            }
            TAG_HEAD => {
                if entries == entries_at_head {
                    return Some(bad("a head with no entry after the one before it"));
                }
                entries_at_head = entries;
                let Ok(head) = SignedHead::decode(&buf) else {
                    return Some(bad("head does not decode"));
                };
                heads.push((run.len(), head));
                head_count += 1;
            }
            _ => {
                let counted = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
                let counted_heads = u64::from_be_bytes(buf[8..].try_into().unwrap_or_default());
                if counted != entries || counted_heads != head_count {
                    return Some(bad("end marker counts differ from the records"));
                }
                let mut extra = [0u8; 1];
                return Some(match read_full(r, &mut extra) {
                    Ok(trailing) => Piece::End { trailing, at },
                    Err(e) => Piece::Io(e),
                });
            }
        }
    }
}

/// Checks the pieces [`read_pieces`] sends, in order, up to the end or the
/// first failure; leaves the groups closed last to settle.
fn check_pieces(
    rx: &mpsc::Receiver<Piece>,
    walk: &mut StreamCheck,
    vault_id: &[u8; 16],
) -> Result<std::result::Result<(), Failure>> {
    for piece in rx {
        match piece {
            Piece::Run { entries, heads } => {
                if let Err(f) = check_run(&entries, &heads, walk, vault_id) {
                    return Ok(Err(f));
                }
            }
            Piece::End { trailing, at } => {
                if let Err(f) = walk.finish() {
                    return Ok(Err(f));
                }
                if trailing {
                    let m = "export file: bytes after the end marker";
                    return Ok(Err((at, Reason::Malformed(m.into()))));
                }
                return Ok(Ok(()));
            }
            Piece::Damage(f) => return Ok(Err(f)),
            Piece::Io(e) => return Err(e),
        }
    }
    Err(Error::Malformed("the export reader stopped"))
}

/// Checks one run: its entries in order, each head after the entries
/// before it.
fn check_run(
    entries: &HashedRun,
    heads: &[(usize, SignedHead)],
    walk: &mut StreamCheck,
    vault_id: &[u8; 16],
) -> std::result::Result<(), Failure> {
    let mut heads = heads.iter().peekable();
    let head = |walk: &mut StreamCheck, head: &SignedHead| {
        walk.head_deferred(head)?;
        let (groups, hashes) = walk.unsettled();
        if groups >= UNSETTLED_HEADS || hashes >= UNSETTLED_HASHES {
            walk.settle()?;
        }
        Ok(())
    };
    for (i, e) in entries.iter().enumerate() {
        while let Some((_, h)) = heads.next_if(|(at, _)| *at == i) {
            head(walk, h)?;
        }
        let first = walk.next_seq() == 0;
        walk.hashed_entry(&e)?;
        if first {
            let named = walk.genesis().map(|g| g.vault_id.as_str());
            if named != Some(hex::encode(vault_id).as_str()) {
                return Err((
                    0,
                    Reason::MetaMismatch(
                        "the export header names another vault id than genesis".into(),
                    ),
                ));
            }
        }
    }
    for (_, h) in heads {
        head(walk, h)?;
    }
    Ok(())
}

/// Writes the log of the stopped vault in `dir` to `out` as an export
/// file, checking it as it goes with `key` (or, without one, the key
/// stored in the data dir): an integrity failure stops the export with
/// `Error::Integrity`, so that no export of a damaged log is written.
/// Needs no secret. Returns the output and the entry and head counts.
pub fn export_dir<W: Write>(
    dir: &std::path::Path,
    out: W,
    key: Option<VerifyingKey>,
) -> Result<(W, u64, u64)> {
    export_store(&crate::store::Store::open_existing(dir)?, out, key)
}

/// [`export_dir`] without writing to `dir`, as
/// [`crate::verify_read_only`] opens it: its sled database copied into
/// `scratch` (an empty dir the caller removes afterwards), its chunks read
/// in place, its write-ahead file replayed into the copies and left there.
pub fn export_dir_read_only<W: Write>(
    dir: &std::path::Path,
    scratch: &std::path::Path,
    out: W,
    key: Option<VerifyingKey>,
) -> Result<(W, u64, u64)> {
    let store =
        crate::store::Store::open_read_only(dir, scratch, crate::vault::DEFAULT_CACHE_BYTES)?;
    export_store(&store, out, key)
}

/// Writes the log of an opened store to `out`, checking it as it goes.
fn export_store<W: Write>(
    store: &crate::store::Store,
    out: W,
    key: Option<VerifyingKey>,
) -> Result<(W, u64, u64)> {
    use crate::chunk::{Chunk, ChunkError};
    let key = key
        .or_else(|| store.stored_public_key())
        .ok_or(Error::Malformed("no public key"))?;
    let mut writer = ExportWriter::new(out, &store.vault_id()?)?;
    let mut walk = StreamCheck::new(key);
    for kv in store.log.iter() {
        let (_, v) = kv?;
        let next = walk.next_seq();
        let chunk = Chunk::decode(&v).map_err(|e| {
            let reason = match e {
                ChunkError::Crc => Reason::CrcMismatch,
                ChunkError::Malformed(m) => Reason::Malformed(m.into()),
            };
            Error::integrity(next, reason)
        })?;
        for e in Hashed::all(&chunk.entries) {
            walk.hashed_entry(&e)?;
            writer.entry(e.bytes())?;
        }
        if let Some(h) = &chunk.head {
            walk.head(h)?;
            writer.head(h)?;
        }
    }
    walk.finish()?;
    // The header took its vault id from the metadata, which a local
    // verification holds to what genesis committed to: so does the export.
    let genesis = walk
        .genesis()
        .ok_or_else(|| Error::integrity(0, Reason::BadGenesis("no genesis".into())))?;
    if let Some(m) = store.check_meta(genesis)? {
        return Err(Error::integrity(0, Reason::MetaMismatch(m)));
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HEAD of docs/storage.md, section 10.
    const HEAD: &str = "010000000000000000000000060000000000000007da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b0000019ab697e801d228d4013f28506569727a5e8ab1de0e1928c08cfbb05a124c4f3f374e7c2247fb6f8e0286e2b44112c8206ace4f5b476ad0a9ff441d227b32ace54eb6eab60f";

    /// The framing vector of docs/storage.md, section 11: vault id
    /// 0x06 × 16, one entry record holding the stand-in bytes 01 02 03
    /// (framing only: not a decodable entry), HEAD, and the end marker.
    const GOLDEN: &str = concat!(
        "46564558504f5254",                 // "FVEXPORT"
        "01",                               // version
        "06060606060606060606060606060606", // vault id
        "01",
        "00000003",
        "010203", // entry record
        "02",
        "0000009d", // head record, 157 bytes:
        "010000000000000000000000060000000000000007da55ce0d24cf332c92603f34a8b04f4615f4876e23c7f3655c626ec7f2a864a7e33c8e847f25074a3e03b967f6e7d471b1490f105677ee71d0e257f1e4647f4b0000019ab697e801d228d4013f28506569727a5e8ab1de0e1928c08cfbb05a124c4f3f374e7c2247fb6f8e0286e2b44112c8206ace4f5b476ad0a9ff441d227b32ace54eb6eab60f",
        "ff",
        "00000010",
        "0000000000000001",
        "0000000000000001", // end: 1 entry, 1 head
    );

    #[test]
    fn golden_vector() {
        let head_bytes = hex::decode(HEAD).expect("hex");
        let head = SignedHead::decode(&head_bytes).expect("head");
        let mut w = ExportWriter::new(Vec::new(), &[6; 16]).expect("header");
        w.entry(&[1, 2, 3]).expect("entry");
        w.head(&head).expect("head");
        let (bytes, entries, heads) = w.finish().expect("end");
        assert_eq!((entries, heads), (1, 1));
        assert_eq!(
            hex::encode(&bytes),
            GOLDEN,
            "export format changed: update docs/storage.md only if it changed on purpose"
        );
        let docs = include_str!("../../docs/storage.md");
        assert!(
            docs.contains(GOLDEN),
            "docs/storage.md lacks the export vector"
        );
        // Its spaced-out form shows HEAD by its first and last bytes.
        let spaced = format!("02 0000009d {}…{}", &HEAD[..50], &HEAD[HEAD.len() - 6..]);
        assert!(docs.contains(&spaced), "docs/storage.md lacks {spaced}");
    }

    #[test]
    fn the_writer_refuses_entries_out_of_range() {
        let mut w = ExportWriter::new(Vec::new(), &[0; 16]).expect("header");
        assert!(matches!(w.entry(&[]), Err(Error::Invalid(_))));
        assert!(matches!(
            w.entry(&vec![0; MAX_ENTRY_LEN + 1]),
            Err(Error::Invalid(_))
        ));
    }

    /// A read error past the header ends the check with that error, not
    /// with a verdict on the log.
    #[test]
    fn a_read_error_is_an_error_not_a_verdict() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("the disk failed"))
            }
        }
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let header = hex::decode(&GOLDEN[..50]).expect("hex");
        let got = verify_export(header.as_slice().chain(Failing), &key);
        assert!(matches!(got, Err(Error::Io(_))), "{got:?}");
    }

    /// A head with no entry since the one before it (or since the header)
    /// is refused as it is read: heads alone, however many, are never
    /// held waiting for entries.
    #[test]
    fn a_head_without_an_entry_before_it_is_refused_as_read() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let head_record = [&[2u8, 0, 0, 0, 0x9d][..], &hex::decode(HEAD).expect("hex")].concat();
        let entry_record = [1u8, 0, 0, 0, 3, 1, 2, 3];
        let header = hex::decode(&GOLDEN[..50]).expect("hex");
        let file = [header, vec![head_record.clone(); 3].concat()].concat();
        let got = verify_export(file.as_slice(), &key).expect("a verdict");
        assert!(
            matches!(&got.report.failure, Some((0, Reason::Malformed(m))) if m.contains("no entry after")),
            "{:?}",
            got.report.failure
        );
        // After an entry, a second head in a row: refused by the reader.
        let records = [entry_record.to_vec(), head_record.clone(), head_record].concat();
        let (tx, _rx) = mpsc::sync_channel(16);
        let (mut run, mut heads) = (EntryRun::default(), Vec::new());
        let ending = read_runs(&mut records.as_slice(), &tx, &mut run, &mut heads);
        assert!(
            matches!(&ending, Some(Piece::Damage((1, Reason::Malformed(m)))) if m.contains("no entry after")),
            "{}",
            ending.is_some()
        );
        assert_eq!(heads.len(), 1, "the first head only");
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
            let mut file = hex::decode(&GOLDEN[..50]).expect("hex");
            file.extend_from_slice(&tail);
            let _ = verify_export(file.as_slice(), &key);
        }
    }
}
