//! Verification: prove from the stored bytes and a public key alone that
//! the log was not altered, and that derived state and the key store match
//! what the log says.
//!
//! The scan reads the log in windows. A window is cut into ranges of
//! keys, each read from sled as one parallel task; then the window's
//! chunks are decoded, CRC-checked, hashed and their head signatures
//! checked (`verify_strict`) in parallel, chunk by chunk (every entry
//! stores its predecessor's hash, so entry hashes are independent, and a
//! chunk's entries are hashed side by side: [`entry_hashes`]). The
//! window is then walked in order to check seqs, links and group heads,
//! while the next window is read. Nothing here needs a
//! passphrase or a data key, and the checks write nothing; the open
//! before them ([`verify`]) does what every open does (sled's own
//! recovery, the chunks file cut after its last chunk, the write-ahead
//! file replayed and its segments deleted), which [`verify_read_only`]
//! does to a copy instead.
//!
//! The ranges of a window are contiguous in sled's key order and the
//! walk takes the tasks' chunks in that order, so it sees exactly what
//! one sequential scan of the tree would, whatever the keys are (a
//! tampered key outside the seq space included). A range's end is a seq,
//! so that a range holds about the bytes of its share; a task stops after
//! a bounded number of chunks, and the next window then starts right
//! after the last chunk read (the later tasks' chunks are read again), so
//! memory stays bounded whatever the sizes of the entries.
//!
//! A log that verifies may still be an older copy of itself. Given a head
//! kept from an earlier run ([`VerifyOptions::kept_head`]), the log must
//! also hold that head's entry with its hash, under a key of its own chain
//! ([`check_kept_head`]): `rolled_back` or `forked` otherwise.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use rayon::prelude::*;

use crate::chunk::{Chunk, ChunkError, KeyChain, KeyEndorsement, MerkleTree, SignedHead};
use crate::entry::{entry_hash, entry_hashes, EntryRef, Hash, Kind};
use crate::error::{Error, Reason, Result};
use crate::logfile::{LayoutCheck, LogTree};
use crate::state::{self, Genesis, KeyState};
use crate::store::{Flusher, Store, TREES};
use crate::vault::KeyUses;

/// Parallel tasks (ranges of keys) in a window.
const WINDOW_TASKS: usize = 8;

/// Chunks one task reads at most (below 128 KiB each as the writer makes
/// them): with two windows in memory, the one walked and the one read, at
/// most 32 MiB; 256 MiB when forged pointers each claim the most a read
/// takes (`logfile`'s 1 MiB).
const TASK_CHUNKS: usize = 16;

/// Chunks a task aims at (half its bound, for the entries per chunk to
/// vary): a window's range of seqs is sized from the entries per chunk
/// seen so far.
const TASK_TARGET_CHUNKS: u64 = TASK_CHUNKS as u64 / 2;

/// Seqs per task in the first window, before any entry was seen: a range
/// of that many seqs holds at most that many chunks, so no task of it
/// reaches its bound.
const FIRST_TASK_SEQS: u64 = TASK_CHUNKS as u64;

/// sled cache of a stand-alone verify: a scan reads each chunk once, so a
/// cache only holds what it has passed.
const VERIFY_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// What a completed chain scan found.
#[derive(Debug, Clone, Default)]
pub struct ChainTip {
    /// Number of entries (= next seq).
    pub entries: u64,
    /// Hash of the last entry, if any.
    pub last_hash: Option<Hash>,
    /// The last signed head.
    pub head: Option<SignedHead>,
    /// Commit groups closed by a head.
    pub groups: u64,
}

/// An integrity failure: the first bad seq and why.
pub type Failure = (u64, Reason);

/// A prefix of the log whose head signatures the caller has already
/// verified ([`VerifyOptions::verified_prefix`]): `Vault::open` takes it
/// from the record an earlier open left, authenticated under the master
/// key (`crate::verified`).
///
/// A scan given one does not run `verify_strict` on the heads of groups
/// that end before `entries`, and checks everything else as always. When
/// it closes the group that ends at `entries - 1`, that entry's hash must
/// be `last_hash` and the BLAKE3 of every head so far (157 bytes each, in
/// log order) must be `heads_digest`; a prefix that does not match, or
/// that the log does not reach, fails the scan with `bad_signature` at
/// its last seq, since its signatures were not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedPrefix {
    /// Entries it covers: seqs `0..entries`, ending with a group.
    pub entries: u64,
    /// The hash of entry `entries - 1`.
    pub last_hash: Hash,
    /// BLAKE3 of the signed heads of those entries, in order.
    pub heads_digest: Hash,
}

/// The BLAKE3 of a log's signed heads, in order ([`VerifiedPrefix`]).
#[derive(Default)]
struct HeadsDigest {
    hasher: blake3::Hasher,
    buf: Vec<u8>,
}

impl HeadsDigest {
    fn push(&mut self, head: &SignedHead) {
        self.buf.clear();
        head.encode_into(&mut self.buf);
        self.hasher.update(&self.buf);
    }

    fn digest(&self) -> Hash {
        *self.hasher.finalize().as_bytes()
    }
}

/// Whether `prefix` vouches for the signature of `head` (its group ends
/// before the prefix does).
fn vouched(prefix: Option<&VerifiedPrefix>, head: &SignedHead) -> bool {
    prefix.is_some_and(|p| head.last_seq < p.entries)
}

/// One chunk after the parallel phase: its bytes, where its entries lie in
/// them, their hashes, and whether its head's signature verified.
struct Decoded {
    key: Option<u64>,
    value: bytes::Bytes,
    first_seq: u64,
    ranges: Vec<std::ops::Range<usize>>,
    hashes: Vec<Hash>,
    head: Option<SignedHead>,
    /// `None` when the head's key id is beyond the chain known when the
    /// window was read.
    head_signature_ok: Option<bool>,
    /// The Merkle root of this chunk's entries, computed in the parallel
    /// phase when the chunk holds a whole commit group (the common case).
    root: Option<Hash>,
}

fn decode_one(
    k: &sled::IVec,
    v: bytes::Bytes,
    keys: &KeyChain,
    prefix: Option<&VerifiedPrefix>,
) -> std::result::Result<Decoded, Reason> {
    let (first_seq, ranges, head) = {
        let chunk = Chunk::decode(&v).map_err(|e| match e {
            ChunkError::Crc => Reason::CrcMismatch,
            ChunkError::Malformed(m) => Reason::Malformed(m.into()),
        })?;
        let base = v.as_ptr() as usize;
        let ranges = chunk
            .entries
            .iter()
            .map(|e| {
                let start = e.as_ptr() as usize - base;
                start..start + e.len()
            })
            .collect::<Vec<_>>();
        (chunk.first_seq, ranges, chunk.head)
    };
    let hashes = entry_hashes(&ranges.iter().map(|r| &v[r.clone()]).collect::<Vec<_>>());
    let whole_group = head.is_some_and(|h| h.group_first_seq == first_seq);
    let root = (whole_group && !hashes.is_empty()).then(|| MerkleTree::new(&hashes).root());
    Ok(Decoded {
        root,
        key: <[u8; 8]>::try_from(k.as_ref()).ok().map(u64::from_be_bytes),
        first_seq,
        ranges,
        hashes,
        // A head signed by a key this window introduces is checked by the
        // walk, once the chain reaches the key. One the prefix vouches
        // for is taken as checked; the walk then compares the prefix's
        // digest of the heads.
        head_signature_ok: head.and_then(|h| {
            keys.key(h.key_id)
                .map(|k| vouched(prefix, &h) || h.verify(k))
        }),
        head,
        value: v,
    })
}

/// A window's chunks in key order: each key, and its chunk decoded.
type Window = Vec<(sled::IVec, std::result::Result<Decoded, Reason>)>;

/// One range of keys, read by one task.
type Range = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Reads the log tree window after window (see the module doc).
struct WindowReader<'a> {
    log: &'a LogTree,
    /// Where the next window starts.
    from: Bound<Vec<u8>>,
    /// The log's last key when the scan began: the range holding it is
    /// left open at its end, so nothing after it is missed either.
    last: Option<sled::IVec>,
    /// Seqs per task.
    span: u64,
    done: bool,
    /// Chunks read from sled, those of dropped tasks included.
    reads: u64,
    /// The chunks file's layout, checked chunk after chunk as windows
    /// take them.
    layout: LayoutCheck,
    /// Heads whose signatures are not checked here (the walk checks the
    /// prefix's digest instead).
    prefix: Option<VerifiedPrefix>,
}

/// What one task read: its chunks as stored, where each lies, and
/// whether it stopped at [`TASK_CHUNKS`] before the end of its range.
struct TaskRead {
    chunks: Vec<(sled::IVec, bytes::Bytes)>,
    /// Where each chunk lies in the chunks file.
    located: Vec<Option<(u64, u64)>>,
    cut: bool,
}

impl<'a> WindowReader<'a> {
    fn new(log: &'a LogTree) -> Result<Self> {
        let last = log.index.last()?.map(|(k, _)| k);
        Ok(WindowReader {
            log,
            from: Bound::Unbounded,
            done: last.is_none(),
            last,
            span: FIRST_TASK_SEQS,
            reads: 0,
            layout: LayoutCheck::default(),
            prefix: None,
        })
    }

    /// The ranges of the next window: from `from`, each `span` seqs long,
    /// the one that reaches past the last key open at its end (and then
    /// the last one).
    fn ranges(&self) -> Vec<Range> {
        let base = match &self.from {
            Bound::Unbounded => Some(0),
            Bound::Included(k) => seq_of(k),
            Bound::Excluded(k) => seq_of(k).and_then(|s| s.checked_add(1)),
        };
        let mut ranges = Vec::with_capacity(WINDOW_TASKS);
        let mut lo = self.from.clone();
        if let Some(base) = base {
            for i in 1..=WINDOW_TASKS as u64 {
                let end = self
                    .span
                    .checked_mul(i)
                    .and_then(|n| base.checked_add(n))
                    .map(u64::to_be_bytes);
                match end {
                    Some(end) if self.last.as_deref().is_some_and(|l| l < &end[..]) => {
                        ranges.push((lo, Bound::Unbounded));
                        return ranges;
                    }
                    Some(end) => {
                        ranges.push((lo, Bound::Excluded(end.to_vec())));
                        lo = Bound::Included(end.to_vec());
                    }
                    None => {
                        ranges.push((lo, Bound::Unbounded));
                        return ranges;
                    }
                }
            }
            ranges
        } else {
            // Only after a task stopped at a key that is not a seq, which
            // the walk refuses: read on from it, one task.
            ranges.push((lo, Bound::Unbounded));
            ranges
        }
    }

    /// Reads the next window: its ranges in parallel, then its chunks
    /// decoded, hashed and their signatures checked in parallel. Empty
    /// only at the end of the log.
    fn next(&mut self, keys: &KeyChain) -> Result<Window> {
        while !self.done {
            let window = self.read_window(keys)?;
            if !window.is_empty() {
                return Ok(window);
            }
            // A window of gaps (a sound log has none): go on from the next
            // key, wherever it is.
            match self
                .log
                .index
                .range::<Vec<u8>, _>((self.from.clone(), Bound::Unbounded))
                .next()
            {
                Some(kv) => self.from = Bound::Included(kv?.0.to_vec()),
                None => self.done = true,
            }
        }
        Ok(Vec::new())
    }

    fn read_window(&mut self, keys: &KeyChain) -> Result<Window> {
        let ranges = self.ranges();
        let reads = ranges
            .par_iter()
            .map(|r| read_range(self.log, r))
            .collect::<Vec<_>>();
        let mut chunks = Vec::new();
        let mut next_from = None;
        for r in reads.iter().flatten() {
            self.reads += r.chunks.len() as u64;
        }
        for (read, range) in reads.into_iter().zip(&ranges) {
            let read = read?;
            let last_key = read.chunks.last().map(|(k, _)| k.to_vec());
            for ((k, _), at) in read.chunks.iter().zip(read.located) {
                self.layout.chunk(k, at);
            }
            chunks.extend(read.chunks);
            if read.cut {
                // Later tasks read what comes after the rest of this
                // range: drop them, and go on right after its last chunk.
                next_from = Some(last_key.map_or_else(|| range.0.clone(), Bound::Excluded));
                break;
            }
        }
        match next_from {
            Some(from) => self.from = from,
            None => match ranges.last().map(|r| r.1.clone()) {
                Some(Bound::Excluded(end)) => self.from = Bound::Included(end),
                _ => self.done = true,
            },
        }
        // Decoding, hashing and the heads' signatures, chunk by chunk
        // rather than range by range: a range's chunks may cost ten times
        // another's (a head to verify for every few entries, or hundreds
        // of entries per head), and the cores would wait on the longest.
        let window: Window = chunks
            .into_par_iter()
            .map(|(k, v)| {
                let d = decode_one(&k, v, keys, self.prefix.as_ref());
                (k, d)
            })
            .collect();
        let (decoded, entries) = window
            .iter()
            .filter_map(|(_, d)| d.as_ref().ok())
            .fold((0u64, 0u64), |(n, e), d| (n + 1, e + d.ranges.len() as u64));
        if let Some(span) = (TASK_TARGET_CHUNKS * entries).checked_div(decoded) {
            self.span = span.clamp(1, 1 << 16);
        }
        Ok(window)
    }
}

/// The seq a log key names, if it is one.
fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// One task: reads a range of the log, at most [`TASK_CHUNKS`] chunks.
fn read_range(log: &LogTree, range: &Range) -> Result<TaskRead> {
    let mut read = TaskRead {
        chunks: Vec::new(),
        located: Vec::new(),
        cut: false,
    };
    for item in log.range_located::<Vec<u8>, _>(range.clone()) {
        if read.chunks.len() == TASK_CHUNKS {
            read.cut = true;
            break;
        }
        let (k, at, v) = item?;
        read.located.push(at);
        read.chunks.push((k, v));
    }
    Ok(read)
}

/// Most entries of one commit group: what [`ChainCheck`] holds the hashes
/// of at most. The writer stays well under it (`vault::MAX_GROUP_ITEMS`).
pub const MAX_GROUP_ENTRIES: usize = protocol::receipt::MAX_GROUP_ENTRIES as usize;

/// The in-order checks of a log, fed one entry and one head at a time:
/// contiguous seqs from 0, hash links, a head's fields against the group
/// it closes, and the chain of signing keys. Pure (no I/O), so that the
/// local scan and `vault-verify --remote`, which streams entries over the
/// wire, run the very same checks.
///
/// Invariants: `group` holds the hashes of the entries since the last
/// head (the open commit group), `group_first` the seq of the first of
/// them; `keys` holds the signing keys from the pinned key 0 through
/// every rotation in a closed group, and `rotation` the endorsement of a
/// signing rotation in the open group, which takes effect when the group
/// closes (the group itself is signed by the key it retires).
#[derive(Debug)]
pub struct ChainCheck {
    tip: ChainTip,
    group: Vec<Hash>,
    group_first: u64,
    keys: KeyChain,
    rotation: Option<KeyEndorsement>,
    /// The last entry's timestamp (0 before the first).
    last_ts: u64,
}

/// A group [`ChainCheck::close_group`] closed: its entry hashes, and the
/// key its head's signature must verify under.
#[derive(Debug)]
pub struct ClosedGroup {
    pub hashes: Vec<Hash>,
    pub key: VerifyingKey,
}

impl ChainCheck {
    /// A check expecting seq 0 next, pinned to signing key 0.
    pub fn new(pinned: VerifyingKey) -> Self {
        ChainCheck {
            tip: ChainTip::default(),
            group: Vec::new(),
            group_first: 0,
            keys: KeyChain::new(pinned),
            rotation: None,
            last_ts: 0,
        }
    }

    /// Entries accepted so far, the last one's hash and the last head.
    pub fn tip(&self) -> &ChainTip {
        &self.tip
    }

    /// The signing keys of every closed group's rotations.
    pub fn keys(&self) -> &KeyChain {
        &self.keys
    }

    /// The seq the next entry must carry.
    pub fn next_seq(&self) -> u64 {
        self.tip.entries
    }

    /// The first seq of the open group, when entries follow the last head.
    pub fn open_group(&self) -> Option<u64> {
        (!self.group.is_empty()).then_some(self.group_first)
    }

    /// Checks that `e` (whose encoding hashes to `hash`) is the next entry,
    /// links to the previous one and is not dated before it, then adds it
    /// to the open group. A signing rotation must endorse the next key id
    /// with the current key, at most one per group.
    pub fn entry(&mut self, e: &EntryRef<'_>, hash: &Hash) -> std::result::Result<(), Failure> {
        let expected = self.tip.entries;
        if e.seq != expected {
            return Err((expected, seq_reason(e.seq, expected)));
        }
        if e.prev_hash != self.tip.last_hash.unwrap_or([0; 32]) {
            return Err((e.seq, Reason::BadLink));
        }
        if e.timestamp_ms < self.last_ts {
            return Err((
                e.seq,
                Reason::Malformed("a timestamp earlier than the entry before it".into()),
            ));
        }
        if e.kind == Kind::KeyRotated {
            self.signing_rotation(e)?;
        }
        if self.group.is_empty() {
            self.group_first = e.seq;
        }
        // The writer closes a group at 2^20 entries at most: a longer one
        // (a log whose heads were left out or forged to cover more) is
        // refused before its hashes, which are held until the head that
        // closes it, can grow further.
        if self.group.len() >= MAX_GROUP_ENTRIES {
            return Err((
                e.seq,
                Reason::Malformed(format!(
                    "a commit group of more than {MAX_GROUP_ENTRIES} entries"
                )),
            ));
        }
        self.group.push(*hash);
        self.tip.entries += 1;
        self.tip.last_hash = Some(*hash);
        self.last_ts = e.timestamp_ms;
        Ok(())
    }

    fn signing_rotation(&mut self, e: &EntryRef<'_>) -> std::result::Result<(), Failure> {
        let bad = |m: &str| (e.seq, Reason::KeyMismatch(format!("signing rotation: {m}")));
        let r = match state::Rotation::parse(e) {
            Ok(state::Rotation::Signing(r)) => r,
            // Other rotations, and malformed payloads, which the content
            // checks report.
            _ => return Ok(()),
        };
        let endorsement = r.endorsement(e.seq).map_err(|_| bad("malformed"))?;
        if self.rotation.is_some() {
            return Err(bad("a second rotation in one commit group"));
        }
        let index = self.keys.endorsements().len();
        self.keys
            .check_next(index, &endorsement)
            .map_err(|err| bad(&err.to_string()))?;
        self.rotation = Some(endorsement);
        Ok(())
    }

    /// Closes the open group with `head`: its first and last seq, last
    /// hash, timestamp (the last entry's) and key id (the current signing
    /// key's) must be those of the entries since the last head. Returns the group's entry hashes and
    /// the key for [`check_group`] (which the local scan may run later, in
    /// parallel); a rotation in the group takes effect after it.
    pub fn close_group(&mut self, head: &SignedHead) -> std::result::Result<ClosedGroup, Failure> {
        let last = self.tip.entries.saturating_sub(1);
        let ok = !self.group.is_empty()
            && head.group_first_seq == self.group_first
            && head.last_seq == last
            && Some(head.last_hash) == self.tip.last_hash
            && head.timestamp_ms == self.last_ts
            && head.key_id == self.keys.current_id();
        if !ok {
            return Err((last, Reason::HeadMismatch));
        }
        let key = *self.keys.current();
        if let Some(r) = self.rotation.take() {
            let index = self.keys.endorsements().len();
            self.keys
                .push(index, &r)
                .map_err(|err| (r.seq, Reason::KeyMismatch(err.to_string())))?;
        }
        self.tip.head = Some(*head);
        self.tip.groups += 1;
        Ok(ClosedGroup {
            hashes: std::mem::take(&mut self.group),
            key,
        })
    }
}

/// Checks a closed group's Merkle root against its head, then the head's
/// signature (`signature_ok`: [`SignedHead::verify`] with the key
/// [`ChainCheck::close_group`] named, which the caller may have computed
/// ahead, in parallel). Failures name
/// the head's last seq.
pub fn check_group(
    hashes: &[Hash],
    head: &SignedHead,
    signature_ok: bool,
) -> std::result::Result<(), Failure> {
    if hashes.is_empty() {
        return Err((head.last_seq, Reason::HeadMismatch));
    }
    group_verdict(MerkleTree::new(hashes).root(), head, signature_ok)
}

fn group_verdict(
    root: Hash,
    head: &SignedHead,
    signature_ok: bool,
) -> std::result::Result<(), Failure> {
    if head.group_root != root {
        return Err((head.last_seq, Reason::HeadMismatch));
    }
    if !signature_ok {
        return Err((head.last_seq, Reason::BadSignature));
    }
    Ok(())
}

/// The checks of one entry's content that need no other entry: seq 0 is
/// a well-formed genesis and no other entry is one (its payload is
/// returned), and the payload fits its kind's schema (section 3 of
/// `docs/storage.md`). The local scan does the schema part as it replays
/// derived state; remote verification calls this.
pub fn check_entry_content(e: &EntryRef<'_>) -> std::result::Result<Option<Genesis>, Failure> {
    let genesis = check_genesis_position(e)?;
    state::mutations(e).map_err(|err| (e.seq, Reason::Malformed(err.to_string())))?;
    state::key_commitments(e).map_err(|err| (e.seq, Reason::Malformed(err.to_string())))?;
    Ok(genesis)
}

/// Seq 0 must be a genesis entry whose payload parses; no other entry may
/// be one.
fn check_genesis_position(e: &EntryRef<'_>) -> std::result::Result<Option<Genesis>, Failure> {
    if e.seq == 0 {
        if e.kind != Kind::Genesis {
            return Err((0, Reason::BadGenesis("first entry is not genesis".into())));
        }
        let g: Genesis = serde_json::from_slice(e.payload)
            .map_err(|_| (0, Reason::BadGenesis("payload".into())))?;
        return Ok(Some(g));
    }
    if e.kind == Kind::Genesis {
        return Err((e.seq, Reason::BadGenesis("second genesis entry".into())));
    }
    Ok(None)
}

/// The genesis entry must name the key the log was verified with.
pub fn check_genesis_key(g: &Genesis, key: &VerifyingKey) -> std::result::Result<(), Failure> {
    if g.public_key != hex::encode(key.as_bytes()) {
        return Err((
            0,
            Reason::BadGenesis("genesis names another public key".into()),
        ));
    }
    Ok(())
}

/// An encoded entry with its hash, for [`StreamCheck::hashed_entry`]. Made
/// only by [`Hashed::all`] and [`HashedRun::iter`], which hash entries
/// side by side ([`entry_hashes`]), so the hash is always the entry's.
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'a> {
    bytes: &'a [u8],
    hash: Hash,
}

impl<'a> Hashed<'a> {
    /// Each of `entries` with its hash, in order.
    pub fn all(entries: &[&'a [u8]]) -> Vec<Hashed<'a>> {
        entry_hashes(entries)
            .into_iter()
            .zip(entries)
            .map(|(hash, &bytes)| Hashed { bytes, hash })
            .collect()
    }

    /// The entry's encoding.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Encoded entries end to end in one buffer, to be hashed together by
/// [`EntryRun::hash`]: what a reader collects while the entries before
/// are checked.
#[derive(Debug, Default)]
pub struct EntryRun {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl EntryRun {
    /// Entries hashed side by side on one core at a time.
    const PER_TASK: usize = 64;

    /// Appends one entry's encoding.
    pub fn push(&mut self, entry: &[u8]) {
        self.bytes.extend_from_slice(entry);
        self.ends.push(self.bytes.len());
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    fn entries(&self) -> Vec<&[u8]> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let e = &self.bytes[start..end];
                start = end;
                e
            })
            .collect()
    }

    /// Hashes the entries side by side ([`entry_hashes`]),
    /// 64 at a time on every core.
    pub fn hash(self) -> HashedRun {
        let hashes = self
            .entries()
            .par_chunks(Self::PER_TASK)
            .flat_map_iter(entry_hashes)
            .collect();
        HashedRun { run: self, hashes }
    }
}

/// An [`EntryRun`] with each entry's hash. Made only by
/// [`EntryRun::hash`], so every hash is its entry's.
#[derive(Debug)]
pub struct HashedRun {
    run: EntryRun,
    hashes: Vec<Hash>,
}

impl HashedRun {
    /// Each entry with its hash, in order.
    pub fn iter(&self) -> impl Iterator<Item = Hashed<'_>> {
        self.run
            .entries()
            .into_iter()
            .zip(&self.hashes)
            .map(|(bytes, &hash)| Hashed { bytes, hash })
    }
}

/// The in-order checks of a log read as a stream of encoded entries and
/// signed heads, with a pinned key: what `vault-verify --remote` reads
/// over the wire and `vault-verify --file` from an export file. Each
/// entry goes through [`ChainCheck::entry`] and [`check_entry_content`]
/// (and seq 0 through [`check_genesis_key`]); each head closes the open
/// group through [`ChainCheck::close_group`] and [`check_group`], so the
/// rules are those of the local scan, written once.
///
/// Invariant: every entry accepted so far passed those checks, in order;
/// every group closed so far and settled has a matching root and a valid
/// signature.
#[derive(Debug)]
pub struct StreamCheck {
    chain: ChainCheck,
    key: VerifyingKey,
    genesis: Option<Genesis>,
    shredded: Vec<String>,
    /// Groups closed by [`StreamCheck::head_deferred`] whose Merkle roots
    /// and signatures [`StreamCheck::settle`] has yet to check, in order.
    unsettled: Vec<Unsettled>,
    /// Entry hashes held in `unsettled`.
    unsettled_hashes: usize,
    /// Groups whose head passed every check, its signature included.
    checked: u64,
}

/// A group closed by [`StreamCheck::head_deferred`]: its head, the
/// signing key in force for it, and its entries' hashes.
#[derive(Debug)]
struct Unsettled {
    head: SignedHead,
    key: VerifyingKey,
    hashes: Vec<Hash>,
}

impl Unsettled {
    /// [`check_group`], the signature checked only once the root matched.
    fn check(&self) -> std::result::Result<(), Failure> {
        check_group(&self.hashes, &self.head, true)?;
        if self.head.verify(&self.key) {
            Ok(())
        } else {
            Err((self.head.last_seq, Reason::BadSignature))
        }
    }
}

impl StreamCheck {
    /// A check expecting seq 0 next, against the pinned `key`.
    pub fn new(key: VerifyingKey) -> Self {
        StreamCheck {
            chain: ChainCheck::new(key),
            key,
            genesis: None,
            shredded: Vec::new(),
            unsettled: Vec::new(),
            unsettled_hashes: 0,
            checked: 0,
        }
    }

    /// Checks the next entry, hashed beforehand with the entries around it
    /// ([`Hashed::all`]); returns its hash.
    pub fn hashed_entry(&mut self, entry: &Hashed<'_>) -> std::result::Result<Hash, Failure> {
        let (bytes, hash) = (entry.bytes, entry.hash);
        let expected = self.chain.next_seq();
        let e =
            EntryRef::decode(bytes).map_err(|_| (expected, Reason::Malformed("entry".into())))?;
        self.chain.entry(&e, &hash)?;
        if let Some(g) = check_entry_content(&e)? {
            check_genesis_key(&g, &self.key)?;
            self.genesis = Some(g);
        }
        if e.kind == Kind::SubjectShredded {
            self.shredded.push(e.subject.to_string());
        }
        Ok(hash)
    }

    /// Closes the open group with `head`: its fields, Merkle root and
    /// signature (under the signing key in force, from the chain of
    /// rotations) must be those of the entries since the last head.
    pub fn head(&mut self, head: &SignedHead) -> std::result::Result<(), Failure> {
        let closed = self.chain.close_group(head)?;
        check_group(&closed.hashes, head, head.verify(&closed.key))?;
        self.checked += 1;
        Ok(())
    }

    /// Closes the open group with `head` as [`StreamCheck::head`] does,
    /// but leaves its Merkle root and signature to
    /// [`StreamCheck::settle`], which checks the groups left to it on
    /// every core. Meanwhile the group counts as closed (the next entry
    /// opens a new one), so a caller settles before it reports anything,
    /// a failure included: a group left unchecked may fail before it.
    pub fn head_deferred(&mut self, head: &SignedHead) -> std::result::Result<(), Failure> {
        let closed = self.chain.close_group(head)?;
        self.unsettled_hashes += closed.hashes.len();
        self.unsettled.push(Unsettled {
            head: *head,
            key: closed.key,
            hashes: closed.hashes,
        });
        Ok(())
    }

    /// Groups left to [`StreamCheck::settle`], and the entry hashes they
    /// hold.
    pub fn unsettled(&self) -> (usize, usize) {
        (self.unsettled.len(), self.unsettled_hashes)
    }

    /// Checks, in parallel, the Merkle roots and signatures of the groups
    /// closed by [`StreamCheck::head_deferred`]; the earliest that fails
    /// is the failure, as [`StreamCheck::head`] would have found it.
    pub fn settle(&mut self) -> std::result::Result<(), Failure> {
        let bad = self
            .unsettled
            .par_iter()
            .enumerate()
            .filter_map(|(i, u)| u.check().err().map(|f| (i, f)))
            .min_by_key(|(i, _)| *i);
        // The groups before the earliest bad one hold.
        self.checked += bad.as_ref().map_or(self.unsettled.len(), |(i, _)| *i) as u64;
        self.unsettled.clear();
        self.unsettled_hashes = 0;
        match bad {
            Some((_, f)) => Err(f),
            None => Ok(()),
        }
    }

    /// The end of the stream: every signature left to
    /// [`StreamCheck::settle`] holds, the log is not empty and its last
    /// group is closed by a head. Returns what was checked.
    pub fn finish(&mut self) -> std::result::Result<&ChainTip, Failure> {
        self.settle()?;
        if let Some(first) = self.chain.open_group() {
            return Err((first, Reason::UnsignedTail));
        }
        if self.genesis.is_none() {
            return Err((0, Reason::BadGenesis("empty log".into())));
        }
        Ok(self.chain.tip())
    }

    /// The seq the next entry must carry.
    pub fn next_seq(&self) -> u64 {
        self.chain.next_seq()
    }

    /// Whether entries follow the last head.
    pub fn group_open(&self) -> bool {
        self.chain.open_group().is_some()
    }

    /// Entries accepted, the last one's hash and the last head.
    pub fn tip(&self) -> &ChainTip {
        self.chain.tip()
    }

    /// The genesis payload, once entry 0 was accepted.
    pub fn genesis(&self) -> Option<&Genesis> {
        self.genesis.as_ref()
    }

    /// Subjects of the `subject_shredded` entries accepted so far.
    pub fn shredded(&self) -> &[String] {
        &self.shredded
    }

    /// Groups whose head passed every check so far: its fields, its
    /// Merkle root and its signature (one left to
    /// [`StreamCheck::settle`] counts once it has settled).
    pub fn groups(&self) -> u64 {
        self.checked
    }

    /// The signing keys of the rotations in the groups closed so far.
    pub fn keys(&self) -> &KeyChain {
        self.chain.keys()
    }
}

/// The derived state replayed from the log, hashed: the replay looks up
/// two keys per record, and a sorted map of every subject's keys made
/// those lookups a tenth of the walk. Sorted ([`sorted`]) where it is
/// compared with the state tree.
pub(crate) type Model = std::collections::HashMap<Vec<u8>, Vec<u8>>;

/// `model` in the state tree's order.
pub(crate) fn sorted(model: &Model) -> BTreeMap<Vec<u8>, Vec<u8>> {
    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Applies one entry's derived-state mutations to `model` (the state tree
/// as a [`Model`]): what the local scan replays and `reindex` rebuilds.
/// `key_buf` is scratch space, so that the hot path (records) does not
/// allocate.
pub(crate) fn replay_entry(
    model: &mut Model,
    e: &EntryRef<'_>,
    key_buf: &mut Vec<u8>,
) -> std::result::Result<(), Failure> {
    if e.kind == Kind::Record {
        // The same mutation as `state::mutations` gives for a record.
        key_buf.clear();
        key_buf.extend_from_slice(b"s/");
        key_buf.extend_from_slice(e.subject.as_bytes());
        let value = state::record_pointer(e.seq, e.key_version);
        match model.get_mut(key_buf.as_slice()) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(&value);
            }
            None => {
                model.insert(key_buf.clone(), value.to_vec());
            }
        }
        return Ok(());
    }
    let muts = state::mutations(e).map_err(|err| (e.seq, Reason::Malformed(err.to_string())))?;
    for (k, v) in muts {
        match v {
            Some(v) => model.insert(k, v),
            None => model.remove(&k),
        };
    }
    Ok(())
}

/// The in-order part of a scan: [`ChainCheck`] over decoded windows.
struct Walk {
    chain: ChainCheck,
    /// Every head so far, for [`VerifiedPrefix`].
    heads: HeadsDigest,
    prefix: Option<VerifiedPrefix>,
    /// Whether the walk has closed the prefix's last group and found the
    /// prefix's hash and digest there.
    confirmed: bool,
    /// Heads whose signatures the prefix vouched for.
    vouched: u64,
}

/// What a scan found when the log passed: the chain's tip and keys, the
/// digest of every head, and how many heads' signatures a
/// [`VerifiedPrefix`] stood for.
pub(crate) struct Scanned {
    pub(crate) tip: ChainTip,
    pub(crate) keys: KeyChain,
    pub(crate) heads_digest: Hash,
    pub(crate) vouched: u64,
}

/// A group spanning several chunks whose Merkle root and signature are
/// checked after the window's walk, in parallel.
struct Deferred {
    hashes: Vec<Hash>,
    head: SignedHead,
    signature_ok: bool,
}

impl Walk {
    /// Walks a window, then checks the groups it deferred; reports the
    /// failure with the lowest seq, so the order stays that of the log.
    fn window(
        &mut self,
        window: Window,
        visit: &mut impl FnMut(&EntryRef<'_>, &Hash) -> std::result::Result<(), Failure>,
    ) -> std::result::Result<(), Failure> {
        let mut deferred = Vec::new();
        let walked = self.walk(window, visit, &mut deferred);
        let bad = deferred
            .par_iter()
            .filter_map(|d| check_group(&d.hashes, &d.head, d.signature_ok).err())
            .min_by_key(|f| f.0);
        match (walked, bad) {
            (Err(e), Some(b)) if b.0 < e.0 => Err(b),
            (Err(e), _) => Err(e),
            (Ok(()), Some(b)) => Err(b),
            (Ok(()), None) => Ok(()),
        }
    }

    fn walk(
        &mut self,
        window: Window,
        visit: &mut impl FnMut(&EntryRef<'_>, &Hash) -> std::result::Result<(), Failure>,
        deferred: &mut Vec<Deferred>,
    ) -> std::result::Result<(), Failure> {
        let Walk {
            chain,
            heads,
            prefix,
            confirmed,
            vouched: vouched_heads,
        } = self;
        for (_, d) in window {
            let d = d.map_err(|reason| (chain.next_seq(), reason))?;
            if d.key != Some(d.first_seq) {
                return Err((chain.next_seq(), Reason::Reordered));
            }
            // The key must also name the seq of the chunk's first entry:
            // reads by seq find a chunk by its key, so a chunk moved under
            // another key (header rewritten to match) would hide entries
            // that the chain itself still accounts for.
            if d.first_seq != chain.next_seq() {
                return Err((chain.next_seq(), seq_reason(d.first_seq, chain.next_seq())));
            }
            let group_starts_here = chain.open_group().is_none();
            for (range, hash) in d.ranges.iter().zip(&d.hashes) {
                let e = EntryRef::decode(&d.value[range.clone()])
                    .map_err(|_| (chain.next_seq(), Reason::Malformed("entry".into())))?;
                chain.entry(&e, hash)?;
                visit(&e, hash)?;
            }
            if let Some(h) = d.head {
                let closed = chain.close_group(&h)?;
                heads.push(&h);
                let vouch = vouched(prefix.as_ref(), &h);
                if let Some(p) = prefix.as_ref().filter(|_| !*confirmed) {
                    if h.last_seq.checked_add(1) == Some(p.entries) {
                        if h.last_hash != p.last_hash || heads.digest() != p.heads_digest {
                            return Err((h.last_seq, Reason::BadSignature));
                        }
                        *confirmed = true;
                    } else if h.last_seq >= p.entries {
                        // The prefix does not end with a group.
                        return Err((p.entries.saturating_sub(1), Reason::BadSignature));
                    }
                }
                if vouch {
                    *vouched_heads += 1;
                }
                // Checked ahead with the key of the chain at the window's
                // start, which the chain only extends.
                let signature_ok = d
                    .head_signature_ok
                    .unwrap_or_else(|| vouch || h.verify(&closed.key));
                match d.root {
                    Some(root) if group_starts_here => {
                        group_verdict(root, &h, signature_ok)?;
                    }
                    _ => deferred.push(Deferred {
                        hashes: closed.hashes,
                        head: h,
                        signature_ok,
                    }),
                }
            }
        }
        Ok(())
    }
}

/// Scans the log tree: CRC, decoding, contiguous seqs, hash links, group
/// Merkle roots and head signatures. `visit` sees each entry, in order,
/// after its own checks passed. Returns `Ok(Err(failure))` for the first
/// integrity failure in log order and `Err` only for I/O.
///
/// Pipelined on two cores: while one walks window n in order, the other
/// reads window n+1 and decodes, hashes and checks it in parallel.
pub(crate) fn scan_chain(
    log: &LogTree,
    key: &VerifyingKey,
    prefix: Option<VerifiedPrefix>,
    progress: &(dyn Fn(u64) + Sync),
    visit: impl FnMut(&EntryRef<'_>, &Hash) -> std::result::Result<(), Failure> + Send,
) -> Result<std::result::Result<Scanned, Failure>> {
    // The chunks file's layout (`logfile`): a fault there is reported
    // unless the walk fails at an earlier seq.
    let (walked, layout) = walk_chain(log, key, prefix, progress, visit)?;
    Ok(match (layout, walked) {
        (Some((at, _)), Err((seq, reason))) if seq < at => Err((seq, reason)),
        (Some((at, why)), _) => Err((at, Reason::Malformed(why))),
        (None, walked) => walked,
    })
}

/// The walk of [`scan_chain`], and the first fault of the chunks file's
/// layout among the chunks it read (all of them, and the file's end, when
/// the walk reached the end).
type Walked = (std::result::Result<Scanned, Failure>, Option<(u64, String)>);

/// [`scan_chain`] with the layout fault apart.
fn walk_chain(
    log: &LogTree,
    key: &VerifyingKey,
    prefix: Option<VerifiedPrefix>,
    progress: &(dyn Fn(u64) + Sync),
    mut visit: impl FnMut(&EntryRef<'_>, &Hash) -> std::result::Result<(), Failure> + Send,
) -> Result<Walked> {
    let mut walk = Walk {
        chain: ChainCheck::new(*key),
        heads: HeadsDigest::default(),
        prefix,
        confirmed: false,
        vouched: 0,
    };
    let mut reader = WindowReader::new(log)?;
    reader.prefix = prefix;
    let mut next = reader.next(walk.chain.keys())?;
    while !next.is_empty() {
        let current = std::mem::take(&mut next);
        let keys = walk.chain.keys().clone();
        let (walked, read) =
            rayon::join(|| walk.window(current, &mut visit), || reader.next(&keys));
        if let Err(f) = walked {
            return Ok((Err(f), reader.layout.fault()));
        }
        next = read?;
        progress(walk.chain.next_seq());
    }
    let layout = std::mem::take(&mut reader.layout).finish(log.file_len()?);
    tracing::debug!(
        entries = walk.chain.next_seq(),
        chunks_read = reader.reads,
        "log scanned"
    );
    if let Some(first) = walk.chain.open_group() {
        return Ok((Err((first, Reason::UnsignedTail)), layout));
    }
    if let Some(p) = prefix.filter(|_| !walk.confirmed) {
        // A prefix longer than the log.
        let at = p
            .entries
            .saturating_sub(1)
            .min(walk.chain.next_seq().saturating_sub(1));
        return Ok((Err((at, Reason::BadSignature)), layout));
    }
    Ok((
        Ok(Scanned {
            tip: walk.chain.tip().clone(),
            keys: walk.chain.keys().clone(),
            heads_digest: walk.heads.digest(),
            vouched: walk.vouched,
        }),
        layout,
    ))
}

/// Names an out-of-place seq: `found` where `expected` should be.
fn seq_reason(found: u64, expected: u64) -> Reason {
    if found > expected {
        Reason::Gap
    } else if found + 1 == expected {
        Reason::Duplicate
    } else {
        Reason::Reordered
    }
}

/// Options of [`verify`].
#[derive(Default)]
pub struct VerifyOptions<'a> {
    /// The pinned public key. `None` uses the key stored in the data dir,
    /// which proves only as much as that directory can be trusted.
    pub public_key: Option<VerifyingKey>,
    /// Called with the number of entries checked so far.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
    /// Called once with the total number of entries to expect (approximate).
    pub total_hint: Option<&'a dyn Fn(u64)>,
    /// A head kept from an earlier verification (`vault-verify
    /// --head-file`): the log must still hold its entry, with its hash,
    /// under a key of the log's chain ([`check_kept_head`]).
    pub kept_head: Option<SignedHead>,
    /// A prefix whose head signatures the caller has verified itself
    /// ([`VerifiedPrefix`]); `None` checks every signature, as
    /// `vault-verify` does.
    pub verified_prefix: Option<VerifiedPrefix>,
}

impl std::fmt::Debug for VerifyOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyOptions")
            .field(
                "public_key",
                &self.public_key.map(|k| hex::encode(k.as_bytes())),
            )
            .finish_non_exhaustive()
    }
}

/// The outcome of a verification that ran. The default is a report of
/// nothing checked yet, which each mode of verification fills in.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Entries checked.
    pub entries: u64,
    /// Hash of the last entry.
    pub head: Option<Hash>,
    /// The last signed head.
    pub signed_head: Option<SignedHead>,
    /// Commit groups whose head was checked: its fields against the
    /// group's entries, its Merkle root and its signature. Each costs one
    /// `verify_strict`. The local scan leaves it 0 when the chain scan
    /// failed; the stream modes (remote, export file) count the groups
    /// checked before the failure, the failing one excluded.
    pub groups: u64,
    /// The first failure, if any.
    pub failure: Option<Failure>,
    /// True when no key was pinned and the stored one was used.
    pub used_stored_key: bool,
    /// Subjects whose data keys were shredded (and are gone from the store).
    pub shredded: Vec<String>,
    /// Entries past the derived state's applied marker (after a crash),
    /// replayed into the state tree at the next open.
    pub unindexed: u64,
    /// Shredded subjects whose wrapped keys are still in the key store: a
    /// crash came between the durable `subject_shredded` entry and the
    /// deletion of the keys, and the `shredding` marker names them. The
    /// next open deletes them (docs/keys.md).
    pub shred_pending: Vec<String>,
    /// The endorsements of every signing key after key 0, in order: the
    /// log's chain of signing keys (the last one signs new heads).
    pub signing_keys: Vec<KeyEndorsement>,
    /// Retired signing keys still in the key store: a crash came between
    /// the rotation's durable entry and the key's deletion. The next open
    /// deletes them.
    pub retired_signing_pending: Vec<u32>,
    /// BLAKE3 of every signed head of the log, in order (what a
    /// [`VerifiedPrefix`] of the whole log would hold), when the chain
    /// scan passed.
    pub heads_digest: Option<Hash>,
    /// Heads whose signatures [`VerifyOptions::verified_prefix`] stood
    /// for instead of `verify_strict`.
    pub vouched_groups: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Verifies the vault in `dir`. `Err` means the check could not run (no
/// vault, locked, I/O); integrity failures are in [`Report::failure`],
/// those the open meets (a damaged write-ahead segment) included.
pub fn verify(dir: &Path, opts: &VerifyOptions<'_>) -> Result<Report> {
    match Store::open_existing_with(dir, VERIFY_CACHE_BYTES, Flusher::Off) {
        Ok(store) => verify_opened(&store, opts).or_else(|e| failed_open(e, opts)),
        Err(e) => failed_open(e, opts),
    }
}

/// The report of an open or a scan that met an integrity failure, or
/// that sled found its own file corrupt, before the report was whole
/// (`used_stored_key` as the scan would have had it, so that the warning
/// of an unpinned key is not lost); other errors stay errors: the check
/// could not run.
fn failed_open(e: Error, opts: &VerifyOptions<'_>) -> Result<Report> {
    let failure = match e {
        Error::Integrity { seq, reason } => (seq, reason),
        Error::Sled(sled::Error::Corruption { at, .. }) => (
            0,
            Reason::Malformed(format!(
                "sled finds its database file corrupt{}",
                at.map(|p| format!(" at {p:?}")).unwrap_or_default()
            )),
        ),
        other => return Err(other),
    };
    Ok(Report {
        failure: Some(failure),
        used_stored_key: opts.public_key.is_none(),
        ..Report::default()
    })
}

/// [`verify`] without writing to `dir`, for a data dir on read-only
/// storage or one that must stay as it is (a snapshot, a backup, an
/// auditor's copy). An open that writes replays the write-ahead file into
/// the dir and cuts off what a crash left past the log's end; this one
/// copies the dir's sled database into `scratch` (an empty dir the caller
/// removes afterwards; it needs about the size of `dir/db`) and makes
/// those changes to the copy and to files in `scratch`, reading the dir's
/// chunks in place. The same log is verified, with the same report: only
/// where the open's writes go differs (`docs/storage.md`, section 8).
pub fn verify_read_only(dir: &Path, scratch: &Path, opts: &VerifyOptions<'_>) -> Result<Report> {
    match Store::open_read_only(dir, scratch, VERIFY_CACHE_BYTES) {
        Ok(store) => verify_opened(&store, opts).or_else(|e| failed_open(e, opts)),
        Err(e) => failed_open(e, opts),
    }
}

/// Verifies an opened store, and the kept head of `opts` against it.
fn verify_opened(store: &Store, opts: &VerifyOptions<'_>) -> Result<Report> {
    let mut report = verify_store(store, opts)?;
    if let (None, Some(kept)) = (&report.failure, &opts.kept_head) {
        let key = opts.public_key.or(store.stored_public_key());
        let chain = key.map(|k| KeyChain::from_endorsements(k, &report.signing_keys));
        let last_seq = report.signed_head.map_or(0, |h| h.last_seq);
        let hash = if kept.last_seq <= last_seq {
            entry_at(store, kept.last_seq)?.map(|e| entry_hash(&e))
        } else {
            None
        };
        report.failure = match chain {
            Some(Ok(chain)) => check_kept_head(kept, &chain, last_seq, hash),
            _ => Some(Reason::Forked("the log's key chain does not build".into())),
        }
        .map(|r| (kept.last_seq, r));
    }
    Ok(report)
}

/// Checks a log that verified against a head kept from an earlier
/// verification of it: the head is signed by a key of the log's `chain`,
/// the log (whose signed head is at `last_seq`) reaches its seq, and the
/// log's entry there has the head's hash, `hash_at_kept` (which, the log's
/// chain being intact, commits to every entry before it too). `None` when
/// it holds.
pub fn check_kept_head(
    kept: &SignedHead,
    chain: &KeyChain,
    last_seq: u64,
    hash_at_kept: Option<Hash>,
) -> Option<Reason> {
    if !chain.verify_head(kept) {
        // Signed by a key this log never rotated to, past this log's end:
        // the log ends before that rotation (a backup from before it), a
        // rollback rather than a fork.
        if chain.key(kept.key_id).is_none() && kept.last_seq > last_seq {
            return Some(Reason::RolledBack);
        }
        return Some(Reason::Forked(
            "the kept head is not signed by a key of this log's chain".into(),
        ));
    }
    if kept.last_seq > last_seq {
        return Some(Reason::RolledBack);
    }
    if hash_at_kept != Some(kept.last_hash) {
        return Some(Reason::Forked(
            "the log holds another entry at the kept head's seq".into(),
        ));
    }
    None
}

/// The encoded entry at `seq` in the log, if the log holds it.
pub(crate) fn entry_at(store: &Store, seq: u64) -> Result<Option<Vec<u8>>> {
    let Some((_, v)) = store.chunk_at(seq)? else {
        return Ok(None);
    };
    let chunk = Chunk::decode(&v).map_err(|_| Error::integrity(seq, Reason::CrcMismatch))?;
    Ok(seq
        .checked_sub(chunk.first_seq)
        .and_then(|i| chunk.entries.get(usize::try_from(i).ok()?))
        .map(|e| e.to_vec()))
}

pub(crate) fn verify_store(store: &Store, opts: &VerifyOptions<'_>) -> Result<Report> {
    verify_store_with(store, opts, None)
}

/// [`verify_store`], also collecting every subject data key's creation and
/// use into `usage` (what `Vault::open` needs for key status and the
/// per-key encryption limit).
pub(crate) fn verify_store_with(
    store: &Store,
    opts: &VerifyOptions<'_>,
    mut usage: Option<&mut KeyUses>,
) -> Result<Report> {
    let stored_key = store.stored_public_key();
    let used_stored_key = opts.public_key.is_none();
    let mut report = Report {
        used_stored_key,
        ..Report::default()
    };
    let key = match opts.public_key.or(stored_key) {
        Some(k) => k,
        None => {
            report.failure = Some((0, Reason::MetaMismatch("no public key stored".into())));
            return Ok(report);
        }
    };
    if let Some(total) = opts.total_hint {
        total(store.entry_count_hint());
    }
    let noop = |_: u64| {};
    let progress = opts.progress.unwrap_or(&noop);

    // The state tree is the model of the log at its `applied` marker (the
    // indexer writes it behind the log): remember the model at that seq.
    let applied = match store.applied() {
        Ok(a) => a,
        Err(Error::Malformed(_)) => {
            report.failure = Some((0, Reason::IndexMismatch("malformed applied marker".into())));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    // A crash in the middle of an index write leaves the marker of the seq
    // it was writing toward, and each key at one of the two seqs' values.
    let indexing = match store.indexing() {
        Ok(i) => i,
        Err(Error::Malformed(_)) => {
            report.failure = Some((0, Reason::IndexMismatch("malformed indexing marker".into())));
            return Ok(report);
        }
        Err(e) => return Err(e),
    };
    let mut model = Model::new();
    let mut model_at_applied: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
    let mut model_at_indexing: Option<BTreeMap<Vec<u8>, Vec<u8>>> = None;
    let mut key_buf: Vec<u8> = Vec::with_capacity(64);
    let mut keys: BTreeMap<Vec<u8>, [u8; 32]> = BTreeMap::new();
    // Keys the log committed to and a later shred destroyed.
    let mut destroyed: BTreeMap<Vec<u8>, [u8; 32]> = BTreeMap::new();
    let mut shredded = Vec::new();
    // The seq of each subject's shred, for the `shredding` marker.
    let mut shredded_at: BTreeMap<String, u64> = BTreeMap::new();
    let mut rotations = RotationCheck::default();
    let mut genesis: Option<Genesis> = None;
    // Records per subject and key version, for `usage`.
    let mut encryptions: std::collections::HashMap<String, Vec<(u32, u64)>> =
        std::collections::HashMap::new();
    let scan = scan_chain(&store.log, &key, opts.verified_prefix, progress, |e, _| {
        rotations.entry(e, &keys)?;
        if let Some(g) = check_genesis_position(e)? {
            genesis = Some(g);
        }
        if e.kind == Kind::Record {
            // The hot path, without allocation. The record must be
            // encrypted under its subject's current data key, which a
            // shred has not destroyed (the write path's rules).
            key_buf.clear();
            key_buf.extend_from_slice(b"k/");
            key_buf.extend_from_slice(e.subject.as_bytes());
            match model.get(key_buf.as_slice()).map(|v| KeyState::decode(v)) {
                Some(Ok(k)) if k.shredded => {
                    return Err((
                        e.seq,
                        Reason::KeyMismatch("a record after its subject's shred".into()),
                    ))
                }
                Some(Ok(k)) if k.version == e.key_version => {}
                _ => {
                    return Err((
                        e.seq,
                        Reason::KeyMismatch(
                            "a record not under its subject's current data key".into(),
                        ),
                    ))
                }
            }
            if usage.is_some() {
                // Counted here and added to the key use after the scan:
                // one hash lookup per record on the walk, where the key
                // use's sorted map of subjects took a tenth of it.
                match encryptions.get_mut(e.subject) {
                    Some(versions) => {
                        match versions.iter_mut().find(|(v, _)| *v == e.key_version) {
                            Some((_, n)) => *n += 1,
                            None => versions.push((e.key_version, 1)),
                        }
                    }
                    None => {
                        encryptions.insert(e.subject.to_string(), vec![(e.key_version, 1)]);
                    }
                }
            }
        } else if matches!(
            e.kind,
            Kind::KeyRotated | Kind::SubjectShredded | Kind::SubjectKey
        ) {
            // Against the key state before this entry's own mutation.
            check_key_entry(e, &model)?;
            if let Some(u) = usage.as_deref_mut() {
                key_usage(u, e);
            }
        }
        replay_entry(&mut model, e, &mut key_buf)?;
        if applied == Some(e.seq) {
            model_at_applied = Some(sorted(&model));
        }
        if indexing == Some(e.seq) {
            model_at_indexing = Some(sorted(&model));
        }
        let commits =
            state::key_commitments(e).map_err(|err| (e.seq, Reason::Malformed(err.to_string())))?;
        for (name, hash) in commits {
            match hash {
                Some(h) => {
                    keys.insert(name, h);
                }
                None => {
                    let gone: Vec<Vec<u8>> = keys
                        .range(name.clone()..)
                        .take_while(|(k, _)| k.starts_with(&name))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in gone {
                        if let Some(h) = keys.remove(&k) {
                            destroyed.insert(k, h);
                        }
                    }
                    if e.kind == Kind::SubjectShredded {
                        shredded.push(e.subject.to_string());
                        shredded_at.insert(e.subject.to_string(), e.seq);
                    }
                }
            }
        }
        Ok(())
    })?;
    if let Some(u) = usage {
        for (subject, versions) in &encryptions {
            for &(version, n) in versions {
                u.encrypted_times(subject, version, n);
            }
        }
    }
    let tip = match scan {
        Ok(scanned) => {
            report.signing_keys = scanned.keys.endorsements().to_vec();
            report.heads_digest = Some(scanned.heads_digest);
            report.vouched_groups = scanned.vouched;
            scanned.tip
        }
        Err(f) => {
            report.failure = Some(f);
            return Ok(report);
        }
    };
    if !rotations.pending.is_empty() {
        report.failure = Some((
            tip.entries.saturating_sub(1),
            Reason::Malformed("key_rotated: re-wrapped keys without a master rotation".into()),
        ));
        return Ok(report);
    }
    report.entries = tip.entries;
    report.head = tip.last_hash;
    report.signed_head = tip.head;
    report.groups = tip.groups;
    report.shredded = shredded;
    let last = tip.entries.saturating_sub(1);
    let fail = |r: Reason| Some((last, r));
    // The markers below are not signed. A crash can leave one only for
    // the log's last commit group: sled recovers a prefix of its writes,
    // and each later group's batches come after the step that removes an
    // earlier group's marker. So a marker of an earlier group is forged.
    let last_group = tip.head.map(|h| h.group_first_seq);

    // Genesis against the metadata and the pinned key.
    let Some(g) = genesis else {
        report.failure = Some((0, Reason::BadGenesis("empty log".into())));
        return Ok(report);
    };
    if let Err(f) = check_genesis_key(&g, &key) {
        report.failure = Some(f);
        return Ok(report);
    }
    if let Some(t) = unexpected_tree(&store.db.tree_names()) {
        report.failure = Some((0, Reason::MetaMismatch(format!("unexpected tree {t:?}"))));
        return Ok(report);
    }
    // sled's default tree exists in every database; the vault writes
    // nothing to it, so bytes there are bytes no check would cover.
    if !store.db.is_empty() {
        report.failure = Some((
            0,
            Reason::MetaMismatch("sled's default tree holds data the vault never writes".into()),
        ));
        return Ok(report);
    }
    if let Some(m) = store.check_meta(&g)? {
        report.failure = Some((0, Reason::MetaMismatch(m)));
        return Ok(report);
    }

    // Derived state against the replayed model at the applied marker.
    if applied.is_some_and(|a| a > last) {
        report.failure = fail(Reason::Truncated);
        return Ok(report);
    }
    if let Some(i) = indexing {
        if i > last {
            report.failure = fail(Reason::Truncated);
            return Ok(report);
        }
        if applied.is_some_and(|a| a >= i) {
            report.failure = fail(Reason::IndexMismatch(
                "indexing marker not past the applied marker".into(),
            ));
            return Ok(report);
        }
    }
    let markers = |mut m: BTreeMap<Vec<u8>, Vec<u8>>| {
        if let Some(a) = applied {
            m.insert(state::APPLIED.to_vec(), a.to_be_bytes().to_vec());
        }
        if let Some(i) = indexing {
            m.insert(state::INDEXING.to_vec(), i.to_be_bytes().to_vec());
        }
        m
    };
    let expected_state = markers(model_at_applied.unwrap_or_default());
    report.unindexed = applied.map_or(tip.entries, |a| last - a);
    let mismatch = match model_at_indexing {
        None => compare(
            &store.state,
            expected_state.iter().map(|(k, v)| (k.clone(), v.clone())),
        )?,
        Some(to) => compare_between(&store.state, &expected_state, &markers(to))?,
    };
    if let Some(m) = mismatch {
        report.failure = fail(Reason::IndexMismatch(m));
        return Ok(report);
    }
    // Key store against the commitments. Keys named by a pending marker
    // whose group never reached the log were written by a commit that a
    // crash interrupted; the next open deletes them, and nothing uses them.
    let mut uncommitted: Vec<Vec<u8>> = Vec::new();
    // Whatever the store holds beyond what the log committed to (what a
    // crash left, which the next open deletes) may not be a key the log
    // destroyed, under any name: a shredded key kept there is not gone.
    let destroyed_hashes: std::collections::HashSet<[u8; 32]> =
        destroyed.values().copied().collect();
    let kept_destroyed = |k: &[u8], h: &[u8; 32]| {
        destroyed_hashes.contains(h).then(|| {
            fail(Reason::KeyMismatch(format!(
                "{:?} holds a key the log destroyed",
                String::from_utf8_lossy(k)
            )))
        })
    };
    match crate::vault::pending_markers(&store.keys) {
        Ok(markers) => {
            for m in markers {
                // A group creates data and signing keys only; its marker
                // names nothing else, whether its group reached the log
                // (a crash came before the marker's removal) or not.
                if let Some(k) = m.keys.iter().find(|k| {
                    !(k.starts_with(state::DATA_KEY_PREFIX)
                        || k.starts_with(state::SIGNING_KEY_PREFIX))
                }) {
                    report.failure = fail(Reason::KeyMismatch(format!(
                        "a pending marker names {:?}, a key no group creates",
                        String::from_utf8_lossy(k)
                    )));
                    return Ok(report);
                }
                if m.first_seq >= tip.entries {
                    // An interrupted commit names keys no entry committed
                    // to yet (of the kinds checked above). The markers are
                    // not signed: one that names a key the log committed
                    // to (which open would delete) or destroyed (a
                    // shredded key put back) is forged.
                    if let Some(k) = m.keys.iter().find(|k| {
                        keys.contains_key(k.as_slice()) || destroyed.contains_key(k.as_slice())
                    }) {
                        report.failure = fail(Reason::KeyMismatch(format!(
                            "a pending marker names {:?}, a key the log committed to",
                            String::from_utf8_lossy(k)
                        )));
                        return Ok(report);
                    }
                    uncommitted.extend(m.keys);
                }
            }
        }
        Err(Error::Malformed(_)) => {
            report.failure = fail(Reason::KeyMismatch("malformed pending marker".into()));
            return Ok(report);
        }
        Err(e) => return Err(e),
    }
    // A shred whose entry is in the log but whose keys a crash kept from
    // being deleted: the `shredding` marker names its subjects. Their keys
    // are accepted (and reported) if the log committed to them and then
    // shredded them; the next open deletes them.
    let mut finishing: Vec<String> = Vec::new();
    if let Some(m) = store.keys.get(crate::vault::SHREDDING)? {
        match crate::vault::decode_shredding(&m) {
            Ok((first, subjects)) if first < tip.entries => {
                if last_group != Some(first) {
                    report.failure = fail(Reason::KeyMismatch(format!(
                        "shredding marker names the group at seq {first}, not the log's last"
                    )));
                    return Ok(report);
                }
                if let Some(s) = subjects
                    .iter()
                    .find(|s| shredded_at.get(s.as_str()).is_none_or(|&at| at < first))
                {
                    report.failure = fail(Reason::KeyMismatch(format!(
                        "shredding marker names {s:?}, which the log's last group does not shred"
                    )));
                    return Ok(report);
                }
                finishing = subjects;
            }
            Ok(_) => {}
            Err(_) => {
                report.failure = fail(Reason::KeyMismatch("malformed shredding marker".into()));
                return Ok(report);
            }
        }
    }
    // A master rotation's staged keys (`"next/"` names, with the
    // `rotating` marker): ignored when the marker's group never reached
    // the log (open deletes them), and standing in for the keys they
    // replace when it did (a crash came before the swap; open finishes it),
    // the replaced keys then being exactly those the rotation superseded.
    let mut staged_committed = false;
    if let Some(m) = store.keys.get(crate::vault::ROTATING)? {
        match <[u8; 8]>::try_from(m.as_ref()).map(u64::from_be_bytes) {
            Ok(first) if first < tip.entries => {
                if last_group != Some(first) || rotations.last_master.is_none_or(|s| s < first) {
                    report.failure = fail(Reason::KeyMismatch(
                        "rotating marker names no master rotation".into(),
                    ));
                    return Ok(report);
                }
                staged_committed = true;
            }
            Ok(_) => {}
            Err(_) => {
                report.failure = fail(Reason::KeyMismatch("malformed rotating marker".into()));
                return Ok(report);
            }
        }
    }
    let has_marker = store.keys.contains_key(crate::vault::ROTATING)?;
    let expected = keys.iter().map(|(k, h)| (k.clone(), h.to_vec()));
    let mut actual: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for kv in store.keys.iter() {
        let (k, v) = kv?;
        if crate::vault::is_pending_marker(&k)
            || k.as_ref() == crate::vault::SHREDDING
            || k.as_ref() == crate::vault::ROTATING
        {
            continue;
        }
        let h = *blake3::hash(&v).as_bytes();
        if uncommitted.iter().any(|n| n.as_slice() == k.as_ref()) {
            if let Some(failure) = kept_destroyed(&k, &h) {
                report.failure = failure;
                return Ok(report);
            }
            continue;
        }
        if has_marker {
            if let Some(name) = k.strip_prefix(crate::vault::STAGED) {
                if staged_committed {
                    actual.insert(name.to_vec(), h.to_vec());
                    continue;
                }
                // Staged by a rotation whose entry never reached the log:
                // a new value of a key the log holds, or of one a group
                // that did not reach it either created, or the masking
                // key a vault's first master rotation creates.
                if !keys.contains_key(name)
                    && name != state::MASK
                    && !uncommitted.iter().any(|n| n.as_slice() == name)
                {
                    report.failure = fail(Reason::KeyMismatch(format!(
                        "{:?} is staged for a key the log does not hold",
                        String::from_utf8_lossy(&k)
                    )));
                    return Ok(report);
                }
                if let Some(failure) = kept_destroyed(&k, &h) {
                    report.failure = failure;
                    return Ok(report);
                }
                continue;
            }
            if staged_committed
                && store
                    .keys
                    .contains_key([crate::vault::STAGED, k.as_ref()].concat())?
            {
                if rotations.superseded.get(k.as_ref()) != Some(&h) {
                    report.failure = fail(Reason::KeyMismatch(format!(
                        "key {:?} is not one the master rotation replaced",
                        String::from_utf8_lossy(&k)
                    )));
                    return Ok(report);
                }
                continue;
            }
        }
        if let Some(id) = k
            .strip_prefix(state::SIGNING_KEY_PREFIX)
            .and_then(|id| <[u8; 4]>::try_from(id).ok())
            .map(u32::from_be_bytes)
        {
            // Retired by a rotation in the log's last group (the key of
            // the next id endorsed there): one a crash may have left.
            let retired_last = report.signing_keys.iter().any(|e| {
                Some(e.key_id) == id.checked_add(1) && last_group.is_some_and(|g| e.seq >= g)
            });
            if retired_last && destroyed.get(k.as_ref()) == Some(&h) {
                report.retired_signing_pending.push(id);
                continue;
            }
        }
        if let Some(s) = finishing
            .iter()
            .find(|s| k.starts_with(&state::data_key_prefix(s)))
        {
            if destroyed.get(k.as_ref()) == Some(&h) {
                if !report.shred_pending.contains(s) {
                    report.shred_pending.push(s.clone());
                }
                continue;
            }
        }
        actual.insert(k.to_vec(), h.to_vec());
    }
    if let Some(m) = compare_iters(actual.into_iter(), expected) {
        report.failure = fail(Reason::KeyMismatch(m));
        return Ok(report);
    }
    Ok(report)
}

/// The checks of master key rotations, in log order: the `rewrap`
/// entries of a rotation name only keys the log committed to and still
/// holds (each once), nothing else comes between them and their `master`
/// entry, and that entry counts them and finds every key the master wraps
/// re-wrapped. So after a rotation no key is left under the old master,
/// and the key store must hold what the latest rotation committed to.
#[derive(Default)]
struct RotationCheck {
    /// Keys re-wrapped by the rotation in progress, with their old hashes.
    pending: BTreeMap<Vec<u8>, [u8; 32]>,
    /// The keys the latest completed rotation replaced (the sealed master
    /// included), with their old hashes.
    superseded: BTreeMap<Vec<u8>, [u8; 32]>,
    /// Seq of the latest `master` rotation entry.
    last_master: Option<u64>,
}

impl RotationCheck {
    /// Called before `e`'s commitments are applied to `keys`.
    fn entry(
        &mut self,
        e: &EntryRef<'_>,
        keys: &BTreeMap<Vec<u8>, [u8; 32]>,
    ) -> std::result::Result<(), Failure> {
        let bad = |m: &str| (e.seq, Reason::Malformed(format!("key_rotated: {m}")));
        let rotation = match e.kind {
            Kind::KeyRotated => state::Rotation::parse(e).map_err(|_| bad("payload"))?,
            _ => {
                if !self.pending.is_empty() {
                    return Err(bad("re-wrapped keys without a master rotation"));
                }
                return Ok(());
            }
        };
        match rotation {
            state::Rotation::Subject(_) | state::Rotation::Signing(_)
                if !self.pending.is_empty() =>
            {
                Err(bad("re-wrapped keys without a master rotation"))
            }
            state::Rotation::Subject(_) | state::Rotation::Signing(_) => Ok(()),
            state::Rotation::Rewrap(r) => {
                for (name, _) in &r.keys {
                    let name = hex::decode(name).map_err(|_| bad("key name"))?;
                    let old = match keys.get(&name) {
                        Some(h) if name != state::MASTER => *h,
                        _ => return Err(bad("re-wraps a key the log does not hold")),
                    };
                    if self.pending.insert(name, old).is_some() {
                        return Err(bad("re-wraps a key twice"));
                    }
                }
                Ok(())
            }
            state::Rotation::Master(m) => {
                let wrapped = keys.len().saturating_sub(1);
                let first_mask = m.mask_key_hash.is_some();
                if self.pending.len() != wrapped
                    || m.rewrapped != self.pending.len() as u64
                    || first_mask == keys.contains_key(state::MASK)
                {
                    return Err(bad("the master rotation does not re-wrap every key"));
                }
                let mut superseded = std::mem::take(&mut self.pending);
                if let Some(h) = keys.get(state::MASTER) {
                    superseded.insert(state::MASTER.to_vec(), *h);
                }
                self.superseded = superseded;
                self.last_master = Some(e.seq);
                Ok(())
            }
        }
    }
}

/// Checks a key entry against the subject's key state before it: a
/// rotation moves a live key to the next version, a shred names the
/// current version of a live key.
fn check_key_entry(e: &EntryRef<'_>, model: &Model) -> std::result::Result<(), Failure> {
    let bad = |m: &str| (e.seq, Reason::Malformed(format!("{}: {m}", e.kind.name())));
    let current = match model.get(&state::key("k/", e.subject)) {
        Some(v) => Some(KeyState::decode(v).map_err(|_| bad("key state"))?),
        None => None,
    };
    let version = match e.kind {
        Kind::KeyRotated => match state::Rotation::parse(e).map_err(|_| bad("payload"))? {
            state::Rotation::Subject(r) => r.version,
            // Master rotations are checked against the key store's
            // commitments by `RotationCheck`.
            _ => return Ok(()),
        },
        Kind::SubjectShredded => {
            serde_json::from_slice::<state::ShredCommit>(e.payload)
                .map_err(|_| bad("payload"))?
                .version
        }
        // A subject's first key: version 1, and only for a subject that
        // has none (the writer makes one only there; a second would
        // give a shredded subject a live key again).
        Kind::SubjectKey => {
            let c = serde_json::from_slice::<state::SubjectKeyCommit>(e.payload)
                .map_err(|_| bad("payload"))?;
            return match current {
                Some(k) if k.shredded => Err(bad("subject already shredded")),
                Some(_) => Err(bad("subject already has a data key")),
                None if c.version != 1 => Err(bad("a first key is version 1")),
                None => Ok(()),
            };
        }
        _ => return Ok(()),
    };
    let Some(current) = current else {
        return Err(bad("subject has no data key"));
    };
    if current.shredded {
        return Err(bad("subject already shredded"));
    }
    let expected = match e.kind {
        Kind::KeyRotated => current.version.checked_add(1),
        _ => Some(current.version),
    };
    if Some(version) != expected {
        return Err(bad("version does not follow the subject's key"));
    }
    Ok(())
}

/// Adds a key entry to the collected key use.
fn key_usage(u: &mut KeyUses, e: &EntryRef<'_>) {
    match e.kind {
        Kind::SubjectKey => {
            if let Ok(c) = serde_json::from_slice::<state::SubjectKeyCommit>(e.payload) {
                u.created(e.subject, c.version, e.seq, e.timestamp_ms);
            }
        }
        Kind::KeyRotated => match state::Rotation::parse(e) {
            Ok(state::Rotation::Subject(r)) => {
                u.created(e.subject, r.version, e.seq, e.timestamp_ms)
            }
            Ok(state::Rotation::Master(_)) => u.master_rotated(e.seq, e.timestamp_ms),
            _ => {}
        },
        Kind::SubjectShredded => u.shredded(e.subject),
        _ => {}
    }
}

fn compare(
    tree: &sled::Tree,
    expected: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<Option<String>> {
    Ok(diff_tree(tree, expected, 1)?.sample.into_iter().next())
}

/// Compares a state tree that a crash left in the middle of an index write
/// with the expected content at both ends of it: each key must hold its
/// value in `from` or its value in `to` (being absent counts as a value).
/// Describes the first key that holds neither.
fn compare_between(
    tree: &sled::Tree,
    from: &BTreeMap<Vec<u8>, Vec<u8>>,
    to: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<Option<String>> {
    let check = |k: &[u8], found: Option<&[u8]>| -> Option<String> {
        let (f, t) = (from.get(k).map(Vec::as_slice), to.get(k).map(Vec::as_slice));
        if found == f || found == t {
            return None;
        }
        let show = String::from_utf8_lossy(k);
        Some(match found {
            None => format!("missing key {show:?}"),
            Some(_) if f.is_none() && t.is_none() => format!("unexpected key {show:?}"),
            Some(_) => format!("value of {show:?} differs"),
        })
    };
    // The tree streamed against the keys either state names, in order:
    // a tree of any size costs no memory here.
    let named: std::collections::BTreeSet<&[u8]> =
        from.keys().chain(to.keys()).map(Vec::as_slice).collect();
    let mut named = named.into_iter().peekable();
    for kv in tree.iter() {
        let (k, v) = kv?;
        while let Some(e) = named.next_if(|e| *e < &*k) {
            if let Some(m) = check(e, None) {
                return Ok(Some(m));
            }
        }
        named.next_if(|e| *e == &*k);
        if let Some(m) = check(&k, Some(&v)) {
            return Ok(Some(m));
        }
    }
    for e in named {
        if let Some(m) = check(e, None) {
            return Ok(Some(m));
        }
    }
    Ok(None)
}

/// Compares two sorted key/value streams; describes the first difference.
fn compare_iters(
    actual: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    expected: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Option<String> {
    diff_iters(actual, expected, 1).sample.into_iter().next()
}

/// What a comparison of a stored tree with its expected content found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Distinct keys looked at (stored or expected), up to where it stopped.
    pub compared: u64,
    /// Keys that are missing, unexpected or hold another value.
    pub differences: u64,
    /// Descriptions of the first differences (at most the `sample` asked
    /// for): `missing key "…"`, `unexpected key "…"`, `value of "…" differs`.
    pub sample: Vec<String>,
}

/// Compares the content of `tree` with `expected` (sorted by key).
/// Stops once `stop_after` differences were found (`u64::MAX`: never),
/// and describes at most that many (and never more than
/// [`MAX_DIFF_SAMPLE`]).
pub(crate) fn diff_tree(
    tree: &sled::Tree,
    expected: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    stop_after: u64,
) -> Result<Diff> {
    // Streamed, not gathered first: a tree of any size (one a forged data
    // dir filled) costs no more memory than the differences described.
    let mut failed = None;
    let actual = tree.iter().map_while(|kv| match kv {
        Ok((k, v)) => Some((k.to_vec(), v.to_vec())),
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    let diff = diff_iters(actual, expected, stop_after);
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(diff),
    }
}

/// Most difference descriptions a [`Diff`] keeps.
pub const MAX_DIFF_SAMPLE: usize = 20;

/// Merges two sorted key/value streams and counts their differences.
pub(crate) fn diff_iters(
    actual: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    expected: impl Iterator<Item = (Vec<u8>, Vec<u8>)>,
    stop_after: u64,
) -> Diff {
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    let mut diff = Diff::default();
    let mut actual = actual.peekable();
    let mut expected = expected.peekable();
    while diff.differences < stop_after {
        let order = match (actual.peek(), expected.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ak, _)), Some((ek, _))) => ak.cmp(ek),
        };
        let found = match order {
            std::cmp::Ordering::Less => actual
                .next()
                .map(|(k, _)| format!("unexpected key {:?}", show(&k))),
            std::cmp::Ordering::Greater => expected
                .next()
                .map(|(k, _)| format!("missing key {:?}", show(&k))),
            std::cmp::Ordering::Equal => match (actual.next(), expected.next()) {
                (Some((k, av)), Some((_, ev))) if av != ev => {
                    Some(format!("value of {:?} differs", show(&k)))
                }
                _ => None,
            },
        };
        diff.compared += 1;
        if let Some(d) = found {
            diff.differences += 1;
            if (diff.sample.len() as u64) < stop_after.min(MAX_DIFF_SAMPLE as u64) {
                diff.sample.push(d);
            }
        }
    }
    diff
}

/// Names of the trees a vault may hold; any other is an integrity failure.
pub(crate) fn unexpected_tree(names: &[sled::IVec]) -> Option<String> {
    names
        .iter()
        .find(|n| !TREES.contains(&n.as_ref()) && n.as_ref() != b"__sled__default")
        .map(|n| String::from_utf8_lossy(n).into_owned())
}

impl From<Failure> for Error {
    fn from((seq, reason): Failure) -> Self {
        Error::integrity(seq, reason)
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    /// sled's own finding of a corrupt file is an integrity failure of
    /// the data dir (`vault-verify` exit 1), not a check that could not
    /// run; an I/O error stays one.
    #[test]
    fn a_corrupt_sled_file_is_an_integrity_failure() {
        let opts = VerifyOptions::default();
        let corrupt = Error::Sled(sled::Error::Corruption { at: None, bt: () });
        let report = failed_open(corrupt, &opts).expect("a report");
        match report.failure {
            Some((0, Reason::Malformed(m))) if m.contains("database file corrupt") => {}
            other => panic!("{other:?}"),
        }
        let io = Error::Io(std::io::Error::other("a disk"));
        assert!(matches!(failed_open(io, &opts), Err(Error::Io(_))));
    }

    /// A small log built by hand, group by group, through a `ChainCheck`.
    struct Log {
        chain: ChainCheck,
        prev: Hash,
        seq: u64,
        group: Vec<Hash>,
        first: u64,
        /// The timestamp of the next entry.
        ts: u64,
        /// The timestamp the next head carries, when not its last entry's.
        head_ts: Option<u64>,
    }

    impl Log {
        fn new(pinned: &SigningKey) -> Self {
            Log {
                chain: ChainCheck::new(pinned.verifying_key()),
                prev: [0; 32],
                seq: 0,
                group: Vec::new(),
                first: 0,
                ts: 1,
                head_ts: None,
            }
        }

        fn push(&mut self, kind: Kind, payload: &[u8]) -> std::result::Result<(), Failure> {
            let bytes = EntryRef {
                kind,
                seq: self.seq,
                timestamp_ms: self.ts,
                prev_hash: self.prev,
                key_version: 0,
                nonce: [0; 12],
                subject: "",
                payload,
            }
            .encode();
            let hash = entry_hash(&bytes);
            let e = EntryRef::decode(&bytes).expect("decodes");
            if self.group.is_empty() {
                self.first = self.seq;
            }
            self.chain.entry(&e, &hash)?;
            self.group.push(hash);
            self.prev = hash;
            self.seq += 1;
            Ok(())
        }

        /// Closes the group with a head of `key_id` signed by `key`; the
        /// whole verdict, signature included.
        fn close(&mut self, key: &SigningKey, key_id: u32) -> std::result::Result<(), Failure> {
            let root = MerkleTree::new(&self.group).root();
            let ts = self.head_ts.take().unwrap_or(self.ts);
            let head = SignedHead::sign(key, key_id, self.first, self.seq - 1, self.prev, root, ts);
            self.group.clear();
            let closed = self.chain.close_group(&head)?;
            check_group(&closed.hashes, &head, head.verify(&closed.key))
        }
    }

    fn rotation(by: &SigningKey, key_id: u32, new: &SigningKey, seq: u64) -> Vec<u8> {
        let e = KeyEndorsement::sign(by, key_id, &new.verifying_key(), seq);
        serde_json::to_vec(&state::SigningRotation {
            key: state::ROTATED_SIGNING_KEY.into(),
            key_id,
            public_key: hex::encode(e.public_key),
            wrapped_hash: hex::encode([0u8; 32]),
            endorsement: hex::encode(e.signature),
            recorded_by: None,
        })
        .expect("json")
    }

    fn keys() -> [SigningKey; 3] {
        [1u8, 2, 3].map(|b| SigningKey::from_bytes(&[b; 32]))
    }

    /// The committer dates an entry no earlier than the one before it and
    /// a head with its group's last entry: a log the signer wrote
    /// otherwise fails, at the entry or at the head.
    #[test]
    fn timestamps_never_go_back_and_heads_carry_their_last_entrys() {
        let [k0, ..] = keys();
        let mut log = Log::new(&k0);
        log.ts = 10;
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.push(Kind::PolicyChanged, b"{}").expect("same time");
        log.close(&k0, 0).expect("head at 10");
        log.ts = 9;
        let err = log
            .push(Kind::PolicyChanged, b"{}")
            .expect_err("back in time");
        assert!(matches!(err, (2, Reason::Malformed(_))), "{err:?}");

        let mut log = Log::new(&k0);
        log.ts = 10;
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.ts = 20;
        log.push(Kind::PolicyChanged, b"{}").expect("later");
        log.head_ts = Some(10);
        let err = log
            .close(&k0, 0)
            .expect_err("a head dated before its last entry");
        assert_eq!(err, (1, Reason::HeadMismatch));
        let mut log = Log::new(&k0);
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.head_ts = Some(2);
        let err = log
            .close(&k0, 0)
            .expect_err("a head dated after its last entry");
        assert_eq!(err, (0, Reason::HeadMismatch));
    }

    #[test]
    fn heads_follow_the_chain_of_signing_keys() {
        let [k0, k1, k2] = keys();
        let mut log = Log::new(&k0);
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.close(&k0, 0).expect("key 0 signs");
        log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 1))
            .expect("rotation");
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        // The rotation's own group is signed by the key it retires.
        log.close(&k0, 0).expect("key 0 signs the rotation's group");
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.close(&k1, 1).expect("key 1 signs after it");
        log.push(Kind::KeyRotated, &rotation(&k1, 2, &k2, 4))
            .expect("second rotation");
        log.close(&k1, 1).expect("key 1 signs it");
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        log.close(&k2, 2).expect("key 2");
        assert_eq!(log.chain.keys().current_id(), 2);
        assert_eq!(log.chain.keys().endorsements().len(), 2);
    }

    /// A `subject_key` (a subject's first key) is version 1 and only for
    /// a subject without a key: a second one, or one after a shred (a
    /// shredded subject given a live key again), is refused.
    #[test]
    fn a_first_key_is_refused_for_a_subject_that_has_one() {
        let entry = |payload: &'static [u8]| EntryRef {
            kind: Kind::SubjectKey,
            seq: 9,
            timestamp_ms: 0,
            prev_hash: [0; 32],
            key_version: 0,
            nonce: [0; 12],
            subject: "cust-1",
            payload,
        };
        let v1: &[u8] = br#"{"version":1,"wrapped_hash":"00"}"#;
        let with = |version: u32, shredded: bool| {
            let mut v = version.to_be_bytes().to_vec();
            v.push(u8::from(shredded));
            Model::from([(state::key("k/", "cust-1"), v)])
        };
        assert_eq!(check_key_entry(&entry(v1), &Model::new()), Ok(()));
        let said = |model: &Model, payload| match check_key_entry(&entry(payload), model) {
            Err((9, Reason::Malformed(m))) => m,
            other => panic!("{other:?}"),
        };
        assert!(said(&with(1, false), v1).contains("already has a data key"));
        assert!(said(&with(3, true), v1).contains("already shredded"));
        assert!(said(&Model::new(), br#"{"version":2,"wrapped_hash":"00"}"#).contains("version 1"));
        assert!(said(&Model::new(), b"{}").contains("payload"));
    }

    #[test]
    fn a_retired_key_or_a_forged_rotation_is_refused() {
        let [k0, k1, k2] = keys();
        // After the rotation, a head by the retired key 0 (a thief of the
        // old key extending the log) does not match the chain.
        let mut log = Log::new(&k0);
        log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 0))
            .expect("rotation");
        log.close(&k0, 0).expect("rotation group");
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        assert_eq!(log.close(&k0, 0), Err((1, Reason::HeadMismatch)));

        // A head claiming key 1 but signed by key 0.
        let mut log = Log::new(&k0);
        log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 0))
            .expect("rotation");
        log.close(&k0, 0).expect("rotation group");
        log.push(Kind::PolicyChanged, b"{}").expect("entry");
        assert_eq!(log.close(&k0, 1), Err((1, Reason::BadSignature)));

        // Key 1 used before the group holding its rotation is closed.
        let mut log = Log::new(&k0);
        log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 0))
            .expect("rotation");
        assert_eq!(log.close(&k1, 1), Err((0, Reason::HeadMismatch)));

        // An endorsement not signed by the current key, a skipped id, two
        // rotations in one group.
        let mut log = Log::new(&k0);
        let forged = log.push(Kind::KeyRotated, &rotation(&k2, 1, &k1, 0));
        assert!(
            matches!(forged, Err((0, Reason::KeyMismatch(_)))),
            "{forged:?}"
        );
        let mut log = Log::new(&k0);
        let skipped = log.push(Kind::KeyRotated, &rotation(&k0, 2, &k2, 0));
        assert!(
            matches!(skipped, Err((0, Reason::KeyMismatch(_)))),
            "{skipped:?}"
        );
        let mut log = Log::new(&k0);
        log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 0))
            .expect("rotation");
        let twice = log.push(Kind::KeyRotated, &rotation(&k1, 2, &k2, 1));
        assert!(
            matches!(twice, Err((1, Reason::KeyMismatch(_)))),
            "{twice:?}"
        );
        // An endorsement for another seq than its entry's.
        let mut log = Log::new(&k0);
        let moved = log.push(Kind::KeyRotated, &rotation(&k0, 1, &k1, 5));
        assert!(
            matches!(moved, Err((0, Reason::KeyMismatch(_)))),
            "{moved:?}"
        );
    }
}

#[cfg(test)]
mod window_tests {
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    use super::*;

    /// A group longer than the writer ever makes is refused at its
    /// `MAX_GROUP_ENTRIES + 1`th entry: the hashes held for it stop there.
    #[test]
    fn a_group_longer_than_the_writer_makes_is_refused() {
        let mut chain = ChainCheck::new(SigningKey::from_bytes(&[7; 32]).verifying_key());
        let mut prev = [0u8; 32];
        for seq in 0..=MAX_GROUP_ENTRIES as u64 {
            let e = EntryRef {
                kind: Kind::Record,
                seq,
                timestamp_ms: 0,
                prev_hash: prev,
                key_version: 1,
                nonce: [0; 12],
                subject: "s",
                payload: &[],
            };
            // Any hash will do: the link is checked against it.
            let hash = {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&seq.to_be_bytes());
                h
            };
            let got = chain.entry(&e, &hash);
            if seq < MAX_GROUP_ENTRIES as u64 {
                assert!(got.is_ok(), "{seq}: {got:?}");
            } else {
                assert!(
                    matches!(&got, Err((s, Reason::Malformed(m))) if *s == seq && m.contains("commit group")),
                    "{got:?}"
                );
            }
            prev = hash;
        }
        assert_eq!(chain.group.len(), MAX_GROUP_ENTRIES);
    }

    /// Every key of `tree`, as the windows of a scan yield them.
    fn windowed_keys(tree: &LogTree) -> Vec<Vec<u8>> {
        let chain = ChainCheck::new(SigningKey::from_bytes(&[7; 32]).verifying_key());
        let mut reader = WindowReader::new(tree).expect("reader");
        let mut keys = Vec::new();
        loop {
            let window = reader.next(chain.keys()).expect("read");
            if window.is_empty() {
                return keys;
            }
            keys.extend(window.into_iter().map(|(k, _)| k.to_vec()));
        }
    }

    /// A log in a temporary dir (removed with the returned guard).
    fn empty_log() -> (tempfile::TempDir, LogTree) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let log = LogTree::open(dir.path(), db.open_tree("log").expect("tree")).expect("log");
        (dir, log)
    }

    fn tree_with(keys: &[Vec<u8>]) -> (tempfile::TempDir, LogTree) {
        let (dir, tree) = empty_log();
        for k in keys {
            // Not chunks: each decodes to an error, which the window keeps
            // in its place. A key given twice is written once.
            if !tree.contains_key(k).expect("read") {
                tree.insert(k, b"not a chunk".as_slice()).expect("insert");
            }
        }
        (dir, tree)
    }

    #[test]
    fn windows_yield_every_key_once_in_order_tasks_cut_or_not() {
        // Dense seqs (more than a task's chunks in each range, so tasks
        // stop early), a gap, keys that are not seqs, the extremes.
        let mut keys: Vec<Vec<u8>> = (0..300u64).map(|s| s.to_be_bytes().to_vec()).collect();
        keys.push(10_000u64.to_be_bytes().to_vec());
        keys.push([&42u64.to_be_bytes()[..], &[0]].concat());
        keys.push(vec![0, 0, 0, 1]);
        keys.push(vec![]);
        keys.push(vec![0xff; 12]);
        keys.push(u64::MAX.to_be_bytes().to_vec());
        let (_dir, tree) = tree_with(&keys);
        let all: Vec<Vec<u8>> = tree
            .index
            .iter()
            .keys()
            .map(|k| k.expect("key").to_vec())
            .collect();
        assert_eq!(all.len(), keys.len());
        assert_eq!(windowed_keys(&tree), all);
    }

    #[test]
    fn each_chunk_of_a_uniform_log_is_read_once() {
        // Chunks of 1 to 600 entries: the ranges follow the entries per
        // chunk, so no task reaches its bound and nothing is read twice.
        for per_chunk in [1u64, 3, 26, 100, 600] {
            let (_dir, tree) = empty_log();
            let entries: Vec<&[u8]> = vec![b"an entry".as_slice(); per_chunk as usize];
            let chunks = 2_000u64;
            for i in 0..chunks {
                let first = i * per_chunk;
                let chunk = crate::chunk::encode_chunk(first, &entries, None);
                tree.insert(first.to_be_bytes(), chunk).expect("insert");
            }
            let chain = ChainCheck::new(SigningKey::from_bytes(&[7; 32]).verifying_key());
            let mut reader = WindowReader::new(&tree).expect("reader");
            let mut kept = 0;
            loop {
                let window = reader.next(chain.keys()).expect("read");
                if window.is_empty() {
                    break;
                }
                assert!(window.iter().all(|(_, d)| d.is_ok()));
                kept += window.len() as u64;
            }
            assert_eq!(kept, chunks);
            assert_eq!(reader.reads, chunks, "{per_chunk} entries per chunk");
        }
    }

    #[test]
    fn an_empty_log_has_no_window() {
        assert!(windowed_keys(&tree_with(&[]).1).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn windows_match_one_sequential_scan(
            seqs in proptest::collection::vec(0u64..5_000, 0..400),
            others in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..10), 0..20),
        ) {
            let keys: Vec<Vec<u8>> = seqs
                .iter()
                .map(|s| s.to_be_bytes().to_vec())
                .chain(others)
                .collect();
            let (_dir, tree) = tree_with(&keys);
            let all: Vec<Vec<u8>> = tree.index.iter().keys().map(|k| k.expect("key").to_vec()).collect();
            prop_assert_eq!(windowed_keys(&tree), all);
        }
    }
}
