//! The write-ahead file: every commit group's sled writes, appended to a
//! file of our own and made durable with one `fdatasync` before the group
//! is acknowledged.
//!
//! Making sled itself durable costs a `flush()` (its buffers written, then
//! `sync_file_range`, with each stored byte written about three times by
//! its leaf rewrites) and an `fdatasync` of its file: two device waits per
//! commit group. With this file a group costs one sequential write and one
//! `fdatasync`; sled receives the same writes at once (or, for a group
//! whose only batch is its log batch, within 5 ms: held back meanwhile in
//! `Store::recent`, where readers find it) and is made durable in the
//! background, once per segment, by a **checkpoint**: `Store::sync`, then
//! the segment is deleted.
//!
//! ```text
//! DIR/wal/<first seq, 16 hex digits>.wal     one segment; its name is the
//!                                            first seq of its first group
//! segment (all integers big-endian)
//! 0     6  magic "FTVWAL"
//! 6     2  version = 2 (1 is read too: the same, without the zeros)
//! 8        records, back to back, then zeros to the end of the file:
//!   0   4  body length n
//!   4   4  CRC32 (IEEE) of the body
//!   8   n  body:
//!          8  first seq of the group
//!          2  batch count
//!             batch count × {
//!               1  tree: 0 log, 1 state, 2 keys, 3 meta
//!               4  op count
//!                  op count × {
//!                    1  op: 0 remove, 1 insert
//!                    4  key length, key
//!                    [4  value length, value]   when op = 1
//!                  }
//!             }
//! ```
//!
//! A record is one commit group: the sled batches the writer applies for
//! it, in the order it applies them (each batch atomically, as sled
//! applies a batch).
//!
//! **Zeros ahead.** The writer keeps the file between 512 KiB and 1 MiB
//! (`ZEROED_AHEAD`) longer than its records, written with zeros, so that a
//! record overwrites blocks the file already has. An `fdatasync` after an
//! append that grows the file must also commit the new size to the file
//! system's journal; after an overwrite it writes the data alone (on this
//! machine's ext4: p50 ~120 µs against ~180 µs, `docs/benchmarks.md`). The
//! zeros are written (not `fallocate`d: writing into an unwritten extent
//! commits its conversion the same way): the first with the segment, then
//! 1 MiB at a time, asked for by the group that finds fewer than 512 KiB
//! left and written by a thread of their own (`Zeros`), off the
//! committer's thread, and made durable by the segment's next
//! `fdatasync`. That thread writes only past the zeros already written and
//! a record only over them, so no record is covered with zeros. A record
//! never starts with eight zero bytes (its body is
//! never empty), so eight zeros where a record would start end the
//! records; anything but zeros after that is a record whose start never
//! reached the disk, torn.
//!
//! Recovery (`replay`, run by every open of a data dir before anything
//! reads sled): the segments are read in the order of their names, and the
//! records in file order, one at a time (`SegmentReader`: the memory an
//! open takes does not grow with the segment's size). sled recovers a prefix of its own writes, and
//! receives a group's batches in the record's order, after every earlier
//! record's; so a group whose log chunk sled holds is wholly in sled up to
//! its log batch, and it is skipped. What follows that batch in a group
//! (the last steps of a shred or a rotation) may be missing only for the
//! last group sled holds: those batches are applied again before the
//! first group sled lacks (or at the end), in the writer's order, so that
//! a later group's deletions are not undone by an earlier rotation's swap
//! finished afterwards. Every other group's batches are applied again.
//! Then sled is made durable and the segments are deleted.
//!
//! A record cut short or failing its CRC at the end of the **last** segment
//! is the write of a group that was never acknowledged (the crash came
//! before its `fdatasync` returned): it and anything after it are dropped.
//! The writer `fdatasync`s a segment before it starts the next one, so the
//! same in an earlier segment is corruption, and the open is refused
//! rather than losing acknowledged groups silently: an integrity failure
//! (`Error::Integrity`, reason `malformed`) at the segment's first seq, as
//! is a segment with a bad magic or a record whose CRC holds but whose
//! body does not decode.
//!
//! Invariants: a group is acknowledged only after its record is durable;
//! a segment is deleted only after sled is durable with every group in it;
//! replaying a record twice, or a record sled already holds, changes
//! nothing; zeros are never written over a record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::chunk::Chunk;
use crate::entry::{entry_hash, EntryRef, Hash, Reader};
use crate::error::{Error, Reason, Result};
use crate::store::{sync_dir, Store};

/// Magic and version at the start of every segment.
pub const SEGMENT_MAGIC: &[u8; 6] = b"FTVWAL";
/// Version of the segment format written: 2, a segment with zeros after
/// its records. Version 1 (the same records, no zeros) is still read.
pub const SEGMENT_VERSION: u16 = 2;
const HEADER_LEN: usize = 8;
/// The writer keeps between half of this and all of it (to the next 4 KiB)
/// written as zeros past the end of its records (see the module doc); a
/// segment closed at fewer bytes (`Options::wal_segment_bytes`) keeps
/// that many, at least a page.
pub const ZEROED_AHEAD: u64 = 1024 * 1024;
/// A segment is closed (and checkpointed) once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// The sled tree a batch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    Log = 0,
    State = 1,
    Keys = 2,
    Meta = 3,
}

impl TreeId {
    fn from_u8(b: u8) -> Result<TreeId> {
        Ok(match b {
            0 => TreeId::Log,
            1 => TreeId::State,
            2 => TreeId::Keys,
            3 => TreeId::Meta,
            _ => return Err(Error::Malformed("write-ahead record names an unknown tree")),
        })
    }

    /// The sled tree of a batch; `None` for the log, whose chunks go to
    /// its own file (`logfile`).
    fn tree(self, store: &Store) -> Option<&sled::Tree> {
        match self {
            TreeId::Log => None,
            TreeId::State => Some(&store.state),
            TreeId::Keys => Some(&store.keys),
            TreeId::Meta => Some(&store.meta),
        }
    }
}

/// One sled batch of a group: inserts (`Some`) and removes (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub tree: TreeId,
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn new(tree: TreeId) -> Batch {
        Batch {
            tree,
            ops: Vec::new(),
        }
    }

    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// A log batch's chunks, as (first seq, bytes); a log batch only
    /// inserts.
    fn chunks(&self) -> Result<Vec<(&[u8], &[u8])>> {
        self.ops
            .iter()
            .map(|(k, v)| match v {
                Some(v) => Ok((k.as_slice(), v.as_slice())),
                None => Err(Error::Malformed("a log batch removes a chunk")),
            })
            .collect()
    }

    /// Applies the batch to its tree atomically.
    pub(crate) fn apply(self, store: &Store) -> Result<()> {
        let Some(tree) = self.tree.tree(store) else {
            return store.log.apply(&self.chunks()?);
        };
        let mut b = sled::Batch::default();
        for (k, v) in self.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        tree.apply_batch(b)?;
        Ok(())
    }
}

/// One commit group's record: its first seq and its batches in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupWrite {
    pub first_seq: u64,
    pub batches: Vec<Batch>,
}

fn len_u32(n: usize) -> Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| Error::Invalid("a write-ahead record field exceeds 4 GiB".into()))
}

/// Encodes a group as one record (length, CRC32, body).
pub fn encode_record(g: &GroupWrite) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_record_into(g, &mut out)?;
    Ok(out)
}

/// [`encode_record`] into `out`, which is cleared first: the writer keeps
/// one buffer across groups, so that a group's record does not fault in
/// fresh pages each time.
pub fn encode_record_into(g: &GroupWrite, out: &mut Vec<u8>) -> Result<()> {
    let size: usize = 8
        + 8
        + 2
        + g.batches
            .iter()
            .map(|b| {
                5 + b
                    .ops
                    .iter()
                    .map(|(k, v)| 5 + k.len() + v.as_ref().map_or(0, |v| 4 + v.len()))
                    .sum::<usize>()
            })
            .sum::<usize>();
    out.clear();
    out.reserve(size);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&g.first_seq.to_be_bytes());
    let count = u16::try_from(g.batches.len())
        .map_err(|_| Error::Invalid("too many batches in one group".into()))?;
    out.extend_from_slice(&count.to_be_bytes());
    for b in &g.batches {
        out.push(b.tree as u8);
        out.extend_from_slice(&len_u32(b.ops.len())?);
        for (k, v) in &b.ops {
            out.push(u8::from(v.is_some()));
            out.extend_from_slice(&len_u32(k.len())?);
            out.extend_from_slice(k);
            if let Some(v) = v {
                out.extend_from_slice(&len_u32(v.len())?);
                out.extend_from_slice(v);
            }
        }
    }
    let body_len = len_u32(out.len() - 8)?;
    let crc = crc32fast::hash(&out[8..]);
    out[..4].copy_from_slice(&body_len);
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

fn decode_body(body: &[u8]) -> Result<GroupWrite> {
    let mut r = Reader::new(body);
    let first_seq = r.u64()?;
    let count = r.u16()?;
    let mut batches = Vec::new();
    for _ in 0..count {
        let tree = TreeId::from_u8(r.u8()?)?;
        let n = r.u32()?;
        let mut ops = Vec::new();
        for _ in 0..n {
            let op = r.u8()?;
            let klen = r.u32()? as usize;
            let key = r.take(klen)?.to_vec();
            let value = match op {
                0 => None,
                1 => {
                    let vlen = r.u32()? as usize;
                    Some(r.take(vlen)?.to_vec())
                }
                _ => return Err(Error::Malformed("write-ahead record has an unknown op")),
            };
            ops.push((key, value));
        }
        batches.push(Batch { tree, ops });
    }
    if !r.is_empty() {
        return Err(Error::Malformed("write-ahead record has trailing bytes"));
    }
    Ok(GroupWrite { first_seq, batches })
}

/// What reading one segment found.
#[derive(Debug, PartialEq, Eq)]
pub struct Segment {
    /// The records that are whole and pass their CRC, in file order.
    pub groups: Vec<GroupWrite>,
    /// Whether bytes after them were cut short or failed their CRC (or the
    /// header itself was).
    pub torn: bool,
}

/// Reads a segment's bytes whole ([`SegmentReader`] over them). Never
/// trusts a length: a record's claimed length is checked against the bytes
/// left before anything is copied. A record whose CRC holds but whose body
/// does not decode is an error (`Malformed`): that is not a torn write.
pub fn read_segment(bytes: &[u8]) -> Result<Segment> {
    let mut reader = SegmentReader::new(bytes, bytes.len() as u64)?;
    let mut groups = Vec::new();
    while let Some(g) = reader.next_group()? {
        groups.push(g);
    }
    Ok(Segment {
        groups,
        torn: reader.torn(),
    })
}

/// A segment's records read one at a time from `src`, a segment of `len`
/// bytes, so that an open after a crash holds one commit group at a time
/// rather than the segment (up to `Options::wal_segment_bytes`, 64 MiB by
/// default) and every group decoded from it. Never trusts a length: a
/// record's claimed length is checked against the bytes left before
/// anything is allocated for it.
#[derive(Debug)]
pub struct SegmentReader<R> {
    src: R,
    /// Bytes of the segment not read yet.
    left: u64,
    /// Set once the records ended: whether they ended torn.
    ended: Option<bool>,
}

impl<R: std::io::Read> SegmentReader<R> {
    /// Reads the segment's header. Shorter than a header, or zeros only:
    /// a segment whose first sync a power loss cut off, after its name
    /// and size reached the disk but before its content did (a file
    /// system that updates the size first reads the rest back as zeros).
    /// No record was written before that sync, so it holds none: torn. A
    /// zeroed header before records is damage.
    pub fn new(src: R, len: u64) -> Result<Self> {
        let mut r = SegmentReader {
            src,
            left: len,
            ended: None,
        };
        if len < HEADER_LEN as u64 {
            r.ended = Some(true);
            return Ok(r);
        }
        let mut header = [0u8; HEADER_LEN];
        r.read(&mut header)?;
        if header == [0; HEADER_LEN] && r.zeros_to_end()? {
            r.ended = Some(true);
            return Ok(r);
        }
        if &header[..6] != SEGMENT_MAGIC {
            return Err(Error::Malformed("write-ahead segment has a bad magic"));
        }
        if !matches!(
            u16::from_be_bytes([header[6], header[7]]),
            1 | SEGMENT_VERSION
        ) {
            return Err(Error::Malformed(
                "write-ahead segment has an unknown version",
            ));
        }
        Ok(r)
    }

    /// The next record's group, or `None` once the records end
    /// ([`SegmentReader::torn`] then says how they ended).
    pub fn next_group(&mut self) -> Result<Option<GroupWrite>> {
        if self.ended.is_some() {
            return Ok(None);
        }
        // The zeros after the records (no record is empty), eight of them
        // or the fewer a segment closed before its zeros ran further ends
        // with. Anything else after or among them is a record cut short,
        // or one whose start did not reach the disk: torn.
        if self.left < 8 {
            self.ended = Some(!self.zeros_to_end()?);
            return Ok(None);
        }
        let mut head = [0u8; 8];
        self.read(&mut head)?;
        if head == [0; 8] {
            self.ended = Some(!self.zeros_to_end()?);
            return Ok(None);
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if u64::from(len) > self.left {
            self.ended = Some(true);
            return Ok(None);
        }
        let mut body = vec![0u8; len as usize];
        self.read(&mut body)?;
        if crc32fast::hash(&body) != crc {
            self.ended = Some(true);
            return Ok(None);
        }
        decode_body(&body).map(Some)
    }

    /// Whether bytes after the records read were cut short or failed
    /// their CRC (or the header itself was): meaningful once
    /// [`SegmentReader::next_group`] returned `None`.
    pub fn torn(&self) -> bool {
        self.ended == Some(true)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.src.read_exact(buf)?;
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// Reads the rest of the segment: whether it is zeros only.
    fn zeros_to_end(&mut self) -> Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut zeros = true;
        while self.left > 0 {
            let n = self.left.min(buf.len() as u64) as usize;
            self.read(&mut buf[..n])?;
            zeros &= buf[..n].iter().all(|&b| b == 0);
        }
        Ok(zeros)
    }
}

fn wal_dir(dir: &Path) -> PathBuf {
    dir.join("wal")
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:016x}.wal")
}

/// The segments in `dir`, each with the first seq its name holds, in the
/// order of their names.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let wd = wal_dir(dir);
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(&wd) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    for e in entries {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        if stem.len() == 16 {
            if let Ok(seq) = u64::from_str_radix(stem, 16) {
                found.push((seq, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The first seq of the oldest segment in `dir`: every group from it on
/// that a checkpoint has not made durable in sled and the chunks file is
/// in a segment (segments are deleted in order, each once sled holds its
/// groups). `None` when there is no segment: sled holds every group.
pub(crate) fn oldest_segment(dir: &Path) -> Result<Option<u64>> {
    Ok(segments(dir)?.first().map(|(seq, _)| *seq))
}

/// What `replay` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Groups applied to sled again.
    pub applied: u64,
    /// Groups sled already held.
    pub skipped: u64,
    /// Whether the last segment ended in a torn record (dropped).
    pub torn: bool,
}

/// Applies to sled every group of the write-ahead segments that sled does
/// not hold, makes sled durable and deletes the segments (see the module
/// doc). Run by every open of a data dir, before anything reads sled.
pub(crate) fn replay(store: &Store) -> Result<Replayed> {
    let found = segments(&store.dir)?;
    let mut done = Replayed::default();
    if found.is_empty() {
        return Ok(done);
    }
    // The last group sled holds, with its segment's index: its batches
    // after its log batch may be missing, and must be in place before any
    // later group's.
    let mut held: Option<(GroupWrite, usize)> = None;
    let finish = |held: &mut Option<(GroupWrite, usize)>| match held.take() {
        Some((g, i)) => finish_held(store, g).map_err(damaged(&found[i])),
        None => Ok(()),
    };
    // Where the log ends (its next seq and its last entry's hash), once a
    // group the log lacks is met: each such group must begin there, or it
    // is not this log's next (another vault's segment, one of an earlier
    // time): applied, its key batches would change this vault's keys
    // before its secret or its chain is checked.
    let mut end: Option<(u64, Hash)> = None;
    for (i, segment) in found.iter().enumerate() {
        let damaged = damaged(segment);
        // The writer makes regular files only: a link, a pipe or a device
        // of that name could make the read take all memory or never end.
        if !std::fs::symlink_metadata(&segment.1)?.is_file() {
            return Err(damaged(Error::Malformed(
                "a write-ahead segment is not a regular file",
            )));
        }
        // One group at a time (`SegmentReader`): a segment may be as
        // large as `Options::wal_segment_bytes`. The groups before a tear
        // in a segment that is not the last are applied before the tear
        // is found and the open refused: each is checked to follow the
        // log, and a group applied again changes nothing.
        let file = File::open(&segment.1)?;
        let len = file.metadata()?.len();
        let mut seg = SegmentReader::new(std::io::BufReader::with_capacity(1 << 20, file), len)
            .map_err(&damaged)?;
        while let Some(g) = seg.next_group().map_err(&damaged)? {
            if store.log.contains_key(g.first_seq.to_be_bytes())? {
                // sled may have made the pointers durable before the
                // chunks file held their bytes (`logfile`).
                for b in g.batches.iter().filter(|b| b.tree == TreeId::Log) {
                    for (k, v) in b.chunks().map_err(&damaged)? {
                        store.log.repair(k, v).map_err(&damaged)?;
                    }
                }
                done.skipped += 1;
                held = Some((g, i));
                continue;
            }
            finish(&mut held)?;
            let at = match end {
                Some(at) => at,
                None => log_end(store).map_err(&damaged)?,
            };
            end = Some(follows(&g, at).map_err(&damaged)?);
            for b in g.batches {
                b.apply(store).map_err(&damaged)?;
            }
            done.applied += 1;
        }
        if seg.torn() {
            if i + 1 != found.len() {
                return Err(damaged(Error::Malformed(
                    "a write-ahead segment before the last one is cut short or fails its CRC",
                )));
            }
            done.torn = true;
        }
    }
    finish(&mut held)?;
    store.sync()?;
    // A read-only open replayed into copies: the segments stay for the
    // next open that writes.
    if !store.is_read_only() {
        remove_segments(&store.dir, &found)?;
    }
    if done.applied > 0 || done.torn {
        tracing::info!(
            applied = done.applied,
            skipped = done.skipped,
            torn = done.torn,
            "replayed the write-ahead file"
        );
    }
    Ok(done)
}

/// The seq after the log's last entry, and that entry's hash (0 and
/// zeros for an empty log).
fn log_end(store: &Store) -> Result<(u64, Hash)> {
    let Some((_, bytes)) = store.log.last()? else {
        return Ok((0, [0; 32]));
    };
    last_of(&bytes, "the log's last chunk")
}

/// The seq after the last entry of the chunk `bytes`, and its hash.
fn last_of(bytes: &[u8], what: &'static str) -> Result<(u64, Hash)> {
    let chunk = Chunk::decode(bytes).map_err(|_| Error::Malformed(what))?;
    let last = chunk.entries.last().ok_or(Error::Malformed(what))?;
    let e = EntryRef::decode(last)?;
    Ok((e.seq.saturating_add(1), entry_hash(last)))
}

/// Checks that the group `g` begins where the log ends (`at`: its next
/// seq and its last entry's hash), and returns where the log ends after
/// it.
fn follows(g: &GroupWrite, (next, last_hash): (u64, Hash)) -> Result<(u64, Hash)> {
    let mut chunks: Vec<(&[u8], &[u8])> = Vec::new();
    for b in g.batches.iter().filter(|b| b.tree == TreeId::Log) {
        chunks.extend(b.chunks()?);
    }
    chunks.sort_by(|a, b| a.0.cmp(b.0));
    let (Some((_, first)), Some((_, last))) = (chunks.first(), chunks.last()) else {
        return Err(Error::Malformed("a write-ahead group holds no chunk"));
    };
    let first = Chunk::decode(first).map_err(|_| Error::Malformed("a write-ahead chunk"))?;
    let head = first
        .entries
        .first()
        .map(|e| EntryRef::decode(e))
        .transpose()?
        .ok_or(Error::Malformed("a write-ahead chunk holds no entry"))?;
    if g.first_seq != next || head.seq != next || head.prev_hash != last_hash {
        return Err(Error::Malformed(
            "a write-ahead group does not follow the log's last entry (another vault's or \
             another time's segment)",
        ));
    }
    last_of(last, "a write-ahead chunk")
}

/// What a segment's records hold that the writer cannot have written (a
/// `Malformed` record, or one sled's log contradicts) made an integrity
/// failure at the segment's first seq, naming its file; other errors (I/O)
/// stay as they are.
fn damaged((first_seq, path): &(u64, PathBuf)) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Malformed(m) => Error::integrity(
            *first_seq,
            Reason::Malformed(format!("{m}, in {}", path.display())),
        ),
        other => other,
    }
}

/// Applies again the batches that come after a held group's log batch
/// (the last steps of a shred or a rotation). sled recovers a prefix of
/// its writes, so only the last group it holds can lack them; applying
/// them again where sled has them changes nothing. They go before any
/// later group's batches, as the writer applied them: a later signing
/// rotation deletes a key that a master rotation's swap would otherwise
/// bring back afterwards from its staged copy.
///
/// Only while no later group's chunk is in the log: the writer applies a
/// group's batches before any later group's, so sled holding a later
/// chunk holds all of this group's batches too, and applying them again
/// could only undo what later groups changed: a segment of an earlier
/// time (a restore that mixed in an old `wal` dir) would put back the
/// sealed master key of a rotation since superseded, and lose the keys
/// wrapped under the current one.
fn finish_held(store: &Store, g: GroupWrite) -> Result<()> {
    let mut last_chunk: Option<&[u8]> = None;
    for b in g.batches.iter().filter(|b| b.tree == TreeId::Log) {
        for (k, _) in b.chunks()? {
            last_chunk = last_chunk.max(Some(k));
        }
    }
    if let Some(k) = last_chunk {
        if store.log.holds_after(k)? {
            return Ok(());
        }
    }
    let after_log = g
        .batches
        .into_iter()
        .skip_while(|b| b.tree != TreeId::Log)
        .skip(1);
    for b in after_log {
        b.apply(store)?;
    }
    Ok(())
}

/// Deletes every segment: after a clean shutdown, once sled is durable.
pub(crate) fn remove_all(dir: &Path) -> Result<()> {
    let found = segments(dir)?;
    if found.is_empty() {
        return Ok(());
    }
    remove_segments(dir, &found)
}

/// Deletes `found`, segments of `dir`'s write-ahead dir (as [`segments`]
/// lists them), and makes their removal durable.
fn remove_segments(dir: &Path, found: &[(u64, PathBuf)]) -> Result<()> {
    for (_, path) in found {
        std::fs::remove_file(path)?;
    }
    sync_dir(&wal_dir(dir))
}

/// The writer's end: appends records to the current segment and starts a
/// new one when it is full.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    current: Option<Current>,
    /// The thread that writes the zeros ahead, and what it shares.
    zeros: Zeros,
}

/// The segment being written.
#[derive(Debug)]
struct Current {
    path: PathBuf,
    file: Arc<File>,
    /// Where the records end (the file's cursor).
    len: u64,
    /// How far ahead the zeros go: `ZEROED_AHEAD`, or less for segments
    /// closed at fewer bytes (never less than a page).
    ahead: u64,
    /// Up to where zeros were written, as last seen (never more than
    /// the zeros thread's own figure): records written below it need no
    /// look at the shared state.
    zeroed: u64,
    /// Up to where zeros were last asked for.
    asked: u64,
}

/// Writes zeros past the records of the current segment, on a thread of
/// its own, so that the committer (whose thread bounds the rate of
/// appends) does not spend its time on them: 1 MiB of zeros costs the
/// kernel as much as 1 MiB of records (pages allocated, copied into,
/// marked dirty).
///
/// Invariant: the thread writes only from `zeroed` up to `target`, and
/// the committer writes a record only below `zeroed`; so a record is
/// never overwritten with zeros, and the records still overwrite blocks
/// the file already has.
#[derive(Debug)]
struct Zeros {
    shared: Arc<ZerosShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ZerosShared {
    state: Mutex<ZerosState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ZerosState {
    /// The segment being zeroed (the current one).
    file: Option<Arc<File>>,
    /// Zeros (or records) fill `file` up to here.
    zeroed: u64,
    /// Where the committer asked the zeros to reach.
    target: u64,
    /// The thread is writing zeros, the lock released.
    busy: bool,
    /// A write of zeros failed: the segment takes no more records.
    failed: Option<std::io::ErrorKind>,
    closing: bool,
}

impl ZerosShared {
    fn lock(&self) -> MutexGuard<'_, ZerosState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, ZerosState>) -> MutexGuard<'a, ZerosState> {
        self.changed.wait(g).unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        // `n` is at most the buffer's length.
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// The zeros thread: writes what the committer asks for, until closing.
fn run_zeros(shared: Arc<ZerosShared>) {
    let mut st = shared.lock();
    loop {
        if st.closing {
            return;
        }
        let work = match &st.file {
            Some(f) if st.zeroed < st.target && st.failed.is_none() => {
                Some((f.clone(), st.zeroed, st.target))
            }
            _ => None,
        };
        let Some((file, from, to)) = work else {
            st = shared.wait(st);
            continue;
        };
        st.busy = true;
        drop(st);
        let written = write_zeros(&file, from, to);
        st = shared.lock();
        st.busy = false;
        match written {
            Ok(()) => st.zeroed = to,
            Err(e) => st.failed = Some(e.kind()),
        }
        shared.changed.notify_all();
    }
}

impl Zeros {
    fn start() -> Zeros {
        let shared = Arc::new(ZerosShared::default());
        let for_thread = shared.clone();
        // Without a thread (none can be made), the committer writes the
        // zeros itself.
        let thread = std::thread::Builder::new()
            .name("vault-wal-zeros".into())
            .spawn(move || run_zeros(for_thread))
            .ok();
        Zeros { shared, thread }
    }

    /// Stops zeroing the current segment, once the write under way (if
    /// any) is done.
    fn stop(&self) {
        let mut st = self.shared.lock();
        st.file = None;
        while st.busy {
            st = self.shared.wait(st);
        }
    }

    /// Hands a new segment, zeroed up to `zeroed`, to the thread, once it
    /// is done with the one before.
    fn switch_to(&self, file: Arc<File>, zeroed: u64) {
        self.stop();
        let mut st = self.shared.lock();
        *st = ZerosState {
            file: Some(file),
            zeroed,
            target: zeroed,
            ..ZerosState::default()
        };
    }

    /// Asks for zeros up to `target` (if not asked yet) and waits until
    /// they reach `end`; returns how far they reach and were asked for.
    fn ensure(&self, c: &Current, end: u64, target: u64) -> Result<(u64, u64)> {
        let mut st = self.shared.lock();
        if st.target < target {
            st.target = target;
            self.shared.changed.notify_all();
        }
        if self.thread.is_none() && st.zeroed < st.target {
            // No thread: the zeros are written here.
            write_zeros(&c.file, st.zeroed, st.target)?;
            st.zeroed = st.target;
        }
        while st.zeroed < end {
            if let Some(kind) = st.failed {
                return Err(std::io::Error::from(kind).into());
            }
            st = self.shared.wait(st);
        }
        Ok((st.zeroed, st.target))
    }
}

impl Drop for Zeros {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            // Its last write of zeros is done before the segment's
            // directory may be read again (a reopen's replay).
            let _ = t.join();
        }
    }
}

impl Wal {
    pub(crate) fn new(dir: &Path, segment_bytes: u64) -> Wal {
        Wal {
            dir: wal_dir(dir),
            segment_bytes,
            current: None,
            zeros: Zeros::start(),
        }
    }

    /// Appends a record (not yet durable: sync the returned file). When
    /// the current segment is full it is made durable first (through
    /// `sync`, which the vault runs under the lock of every `fdatasync` of
    /// the write-ahead file) and its path returned as `closed`, for a
    /// checkpoint.
    pub(crate) fn append(
        &mut self,
        first_seq: u64,
        record: &[u8],
        sync: impl FnOnce(&Arc<File>) -> Result<()>,
    ) -> Result<(Arc<File>, Option<PathBuf>)> {
        let mut closed = None;
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.len >= self.segment_bytes)
        {
            if let Some(c) = self.current.take() {
                // Its last zeros are written before it is made durable.
                self.zeros.stop();
                sync(&c.file)?;
                closed = Some(c.path);
            }
        }
        if self.current.is_none() {
            if !self.dir.exists() {
                // The directory's own entry must survive power loss too.
                std::fs::create_dir_all(&self.dir)?;
                if let Some(parent) = self.dir.parent() {
                    sync_dir(parent)?;
                }
            }
            let path = self.dir.join(segment_name(first_seq));
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)?;
            let mut header = [0u8; HEADER_LEN];
            header[..6].copy_from_slice(SEGMENT_MAGIC);
            header[6..].copy_from_slice(&SEGMENT_VERSION.to_be_bytes());
            file.write_all(&header)?;
            let ahead = ZEROED_AHEAD.min(self.segment_bytes).max(4096);
            // The first zeros are written here, and made durable with the
            // segment's name, before its first record.
            let zeroed = (HEADER_LEN as u64 + ahead).next_multiple_of(4096);
            write_zeros(&file, HEADER_LEN as u64, zeroed)?;
            file.sync_data()?;
            sync_dir(&self.dir)?;
            let file = Arc::new(file);
            self.zeros.switch_to(file.clone(), zeroed);
            self.current = Some(Current {
                path,
                file,
                len: HEADER_LEN as u64,
                ahead,
                zeroed,
                asked: zeroed,
            });
        }
        let Some(c) = self.current.as_mut() else {
            return Err(Error::Closed);
        };
        let end = c.len + record.len() as u64;
        // Once fewer than `ahead / 2` zeroed bytes would be left past the
        // record, zeros are asked for up to `ahead` past it (to the next
        // 4 KiB page); the record waits only for zeros under itself.
        let ask_more = end + c.ahead / 2 > c.asked;
        if end > c.zeroed || ask_more {
            let asked = if ask_more {
                (end + c.ahead).next_multiple_of(4096)
            } else {
                c.asked
            };
            (c.zeroed, c.asked) = self.zeros.ensure(c, end, asked)?;
        }
        c.file.write_all_at(record, c.len)?;
        c.len = end;
        Ok((c.file.clone(), closed))
    }

    /// Waits until the zeros asked for are written (for tests that look
    /// at a segment's size).
    #[cfg(test)]
    fn settle(&self) {
        let z = &self.zeros.shared;
        let mut st = z.lock();
        while st.zeroed < st.target && st.failed.is_none() {
            st = z.wait(st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> GroupWrite {
        let mut keys = Batch::new(TreeId::Keys);
        keys.insert(b"pending".to_vec(), vec![1, 2]);
        keys.remove(b"next/x".to_vec());
        let mut log = Batch::new(TreeId::Log);
        log.insert(7u64.to_be_bytes().to_vec(), b"chunk".to_vec());
        GroupWrite {
            first_seq: 7,
            batches: vec![keys, log],
        }
    }

    fn segment(records: &[Vec<u8>]) -> Vec<u8> {
        let mut s = b"FTVWAL\x00\x02".to_vec();
        for r in records {
            s.extend_from_slice(r);
        }
        s
    }

    /// docs/storage.md, section 10: a segment holding the record of
    /// `group()`.
    pub(crate) const WAL_SEGMENT: &str = "46545657414c000200000047d6f7b133000000000000000700020200000002010000000770656e64696e6700000002010200000000066e6578742f78000000000101000000080000000000000007000000056368756e6b";

    #[test]
    fn golden_segment() -> Result<()> {
        let seg = segment(&[encode_record(&group())?]);
        assert_eq!(hex::encode(&seg), WAL_SEGMENT);
        Ok(())
    }

    #[test]
    fn a_record_round_trips() -> Result<()> {
        let g = group();
        let seg = read_segment(&segment(&[encode_record(&g)?]))?;
        assert_eq!(
            seg,
            Segment {
                groups: vec![g],
                torn: false
            }
        );
        Ok(())
    }

    #[test]
    fn a_cut_or_flipped_record_ends_the_segment_as_torn() -> Result<()> {
        let g = group();
        let rec = encode_record(&g)?;
        for cut in 1..rec.len() {
            let bytes = segment(&[rec.clone(), rec[..cut].to_vec()]);
            let seg = read_segment(&bytes)?;
            assert_eq!(seg.groups, vec![g.clone()], "cut at {cut}");
            // A cut that kept only zeros (the high bytes of the length)
            // reads as the zeros after the records: the record is not
            // there either way.
            let kept_any = rec[..cut].iter().any(|&b| b != 0);
            assert_eq!(seg.torn, kept_any, "cut at {cut}");
        }
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x40;
            let seg = read_segment(&segment(&[rec.clone(), bad, rec.clone()]))?;
            // A flipped length may still frame the rest as one bad record.
            assert_eq!(seg.groups, vec![g.clone()], "flip at {i}");
            assert!(seg.torn, "flip at {i}");
        }
        assert!(read_segment(b"FTVW")?.torn);
        // A new segment whose header a power loss kept from the disk
        // (its size and zeros did reach it): empty, not damaged. A header
        // of anything else stays damage.
        let unsynced = vec![0u8; HEADER_LEN + 4096];
        let seg = read_segment(&unsynced)?;
        assert!(seg.groups.is_empty() && seg.torn);
        let mut garbled = unsynced.clone();
        garbled[0] = 1;
        assert!(read_segment(&garbled).is_err());
        // Records behind a zeroed header: damage, not an empty segment.
        let mut zeroed = segment(std::slice::from_ref(&rec));
        zeroed[..HEADER_LEN].fill(0);
        assert!(read_segment(&zeroed).is_err());
        Ok(())
    }

    #[test]
    fn zeros_after_the_records_end_them_and_anything_else_after_is_torn() -> Result<()> {
        let g = group();
        let rec = encode_record(&g)?;
        let mut bytes = segment(&[rec.clone(), rec.clone()]);
        bytes.extend_from_slice(&[0; 4096]);
        let seg = read_segment(&bytes)?;
        assert_eq!(seg.groups, vec![g.clone(), g.clone()]);
        assert!(!seg.torn);
        // A record whose first bytes did not reach the disk, its last did.
        let mut lost_start = segment(std::slice::from_ref(&rec));
        lost_start.extend_from_slice(&[0; 16]);
        lost_start.extend_from_slice(&rec[16..]);
        lost_start.extend_from_slice(&[0; 100]);
        let seg = read_segment(&lost_start)?;
        assert_eq!(seg.groups, vec![g.clone()]);
        assert!(seg.torn);
        // Fewer than eight zeros at the end: the zeros of a segment closed
        // before they ran further, a clean end (a closed segment read as
        // torn would refuse the open). Fewer than eight bytes that are not
        // all zero: a record cut short.
        let mut short = segment(std::slice::from_ref(&rec));
        short.extend_from_slice(&[0; 7]);
        let seg = read_segment(&short)?;
        assert_eq!(seg.groups, vec![g.clone()]);
        assert!(!seg.torn);
        let mut cut = segment(&[rec]);
        cut.extend_from_slice(&[0, 0, 0, 9]);
        assert!(read_segment(&cut)?.torn);
        Ok(())
    }

    #[test]
    fn a_version_1_segment_still_reads() -> Result<()> {
        let g = group();
        let mut bytes = segment(&[encode_record(&g)?]);
        bytes[7] = 1;
        let seg = read_segment(&bytes)?;
        assert_eq!(seg.groups, vec![g]);
        assert!(!seg.torn);
        Ok(())
    }

    #[test]
    fn the_writer_keeps_zeros_ahead_of_its_records() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut wal = Wal::new(tmp.path(), SEGMENT_BYTES);
        let mut g = group();
        let mut records = HEADER_LEN as u64;
        let mut written = Vec::new();
        // About 2.5 MiB of records of 40 KiB: the zeros are renewed
        // several times.
        for seq in 0..64u64 {
            g.first_seq = seq;
            g.batches[1].ops[0].1 = Some(vec![seq as u8 | 1; 40 * 1024]);
            let rec = encode_record(&g)?;
            let (file, closed) = wal.append(seq, &rec, |f| Ok(f.sync_data()?))?;
            assert!(closed.is_none());
            records += rec.len() as u64;
            wal.settle();
            let size = file.metadata()?.len();
            assert!(
                size >= records + ZEROED_AHEAD / 2 && size <= records + ZEROED_AHEAD + 4096,
                "{size} bytes for {records} of records"
            );
            written.push(g.clone());
        }
        let path = tmp.path().join("wal").join(segment_name(0));
        let seg = read_segment(&std::fs::read(path)?)?;
        assert_eq!(seg.groups, written);
        assert!(!seg.torn);
        Ok(())
    }

    /// The zeros thread never writes over a record: many small segments,
    /// each with many renewals of its zeros, and every record read back.
    #[test]
    fn zeros_written_beside_the_records_never_cover_one() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        // Segments of 64 KiB: 64 KiB of zeros ahead, renewed every 32.
        let mut wal = Wal::new(tmp.path(), 64 * 1024);
        let mut g = group();
        let mut written = Vec::new();
        let mut closed = Vec::new();
        for seq in 0..600u64 {
            g.first_seq = seq;
            // From 100 bytes to past the zeros' margin of 32 KiB, so that
            // records often reach zeros still being written.
            let len = 100 + (seq as usize * 7919) % 48_000;
            g.batches[1].ops[0].1 = Some(vec![seq as u8 | 1; len]);
            let rec = encode_record(&g)?;
            let (_, c) = wal.append(seq, &rec, |f| Ok(f.sync_data()?))?;
            closed.extend(c);
            written.push(g.clone());
        }
        assert!(closed.len() > 10, "{} segments closed", closed.len());
        drop(wal);
        let mut names: Vec<_> = std::fs::read_dir(tmp.path().join("wal"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        let mut read = Vec::new();
        for path in names {
            let seg = read_segment(&std::fs::read(&path)?)?;
            assert!(!seg.torn, "{}", path.display());
            read.extend(seg.groups);
        }
        assert_eq!(read, written);
        Ok(())
    }

    #[test]
    fn small_segments_keep_fewer_zeros() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let mut wal = Wal::new(tmp.path(), 2048);
        let mut g = group();
        for seq in 0..8u64 {
            g.first_seq = seq;
            let rec = encode_record(&g)?;
            let (file, _) = wal.append(seq, &rec, |f| Ok(f.sync_data()?))?;
            wal.settle();
            let size = file.metadata()?.len();
            assert!(size <= 2 * 4096 + 2048, "{size} bytes in a 2 KiB segment");
        }
        Ok(())
    }

    /// A group with a log batch at `seq` and, after it, a keys batch
    /// that sets each of `after`.
    /// The entry at `seq` of a test chain: one entry per seq, each linked
    /// to the one before, as replay checks a group it applies to be.
    fn chain_entry(seq: u64) -> Vec<u8> {
        let mut prev = [0u8; 32];
        let mut bytes = Vec::new();
        for s in 0..=seq {
            bytes = EntryRef {
                kind: crate::entry::Kind::AccessDenied,
                seq: s,
                timestamp_ms: 1,
                prev_hash: prev,
                key_version: 0,
                nonce: [0; 12],
                subject: "",
                payload: b"{}",
            }
            .encode();
            prev = entry_hash(&bytes);
        }
        bytes
    }

    /// The chunk of the entry at `seq` of the test chain; with `closes`, it
    /// carries the head of a group `first..=seq`.
    fn chain_chunk(seq: u64, closes: Option<u64>) -> Vec<u8> {
        let entry = chain_entry(seq);
        let head = closes.map(|first| {
            let hashes: Vec<Hash> = (first..=seq).map(|s| entry_hash(&chain_entry(s))).collect();
            crate::chunk::SignedHead::sign(
                &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
                0,
                first,
                seq,
                entry_hash(&entry),
                crate::chunk::MerkleTree::new(&hashes).root(),
                1,
            )
        });
        crate::chunk::encode_chunk(seq, &[&entry], head.as_ref())
    }

    /// The group of the one entry at `seq`, whose batch after its log
    /// batch sets `after`.
    fn group_at(seq: u64, after: &[(&str, &str)]) -> GroupWrite {
        let mut log = Batch::new(TreeId::Log);
        log.insert(seq.to_be_bytes().to_vec(), chain_chunk(seq, Some(seq)));
        let mut keys = Batch::new(TreeId::Keys);
        for (k, v) in after {
            keys.insert(k.as_bytes(), v.as_bytes());
        }
        GroupWrite {
            first_seq: seq,
            batches: vec![log, keys],
        }
    }

    /// A store in `dir` whose log holds group 0 of one chunk and group 1
    /// of three (seqs 1, 2 and 3, its head in the last), made durable, and
    /// a write-ahead file holding group 0's record and, when
    /// `acknowledged`, group 1's; the log's chunks.
    fn groups_of_one_and_three(dir: &Path, acknowledged: bool) -> Result<Vec<Vec<u8>>> {
        let store = Store::create_for_tests(dir, 8 << 20, crate::store::Flusher::Off)?;
        let g0 = group_at(0, &[]);
        let mut log = Batch::new(TreeId::Log);
        for seq in 1..=3u64 {
            let closes = (seq == 3).then_some(1);
            log.insert(seq.to_be_bytes().to_vec(), chain_chunk(seq, closes));
        }
        let g1 = GroupWrite {
            first_seq: 1,
            batches: vec![log],
        };
        let mut wal = Wal::new(dir, SEGMENT_BYTES);
        for g in [&g0, &g1] {
            if g.first_seq == 0 || acknowledged {
                wal.append(g.first_seq, &encode_record(g)?, |f| Ok(f.sync_data()?))?;
            }
            g.batches[0].clone().apply(&store)?;
        }
        let whole = chunks(&store)?;
        store.sync()?;
        Ok(whole)
    }

    /// The log's chunks, in seq order.
    fn chunks(store: &Store) -> Result<Vec<Vec<u8>>> {
        store.log.iter().map(|kv| Ok(kv?.1.to_vec())).collect()
    }

    fn key(store: &Store, k: &str) -> Result<Option<Vec<u8>>> {
        Ok(store.keys.get(k)?.map(|v| v.to_vec()))
    }

    /// A store in `dir` whose log holds groups 0 to 2, made durable, and
    /// a write-ahead file holding the records of the groups `written_ahead`
    /// names; the log's chunks.
    fn three_groups(dir: &Path, written_ahead: &[usize]) -> Result<Vec<Vec<u8>>> {
        let store = Store::create_for_tests(dir, 8 << 20, crate::store::Flusher::Off)?;
        let groups: Vec<GroupWrite> = (0..3).map(|s| group_at(s, &[])).collect();
        for g in &groups {
            g.batches[0].clone().apply(&store)?;
        }
        let whole = chunks(&store)?;
        let mut wal = Wal::new(dir, SEGMENT_BYTES);
        for &i in written_ahead {
            let g = &groups[i];
            wal.append(g.first_seq, &encode_record(g)?, |f| Ok(f.sync_data()?))?;
        }
        store.sync()?;
        Ok(whole)
    }

    #[test]
    fn replay_writes_again_the_chunks_a_power_loss_took() -> Result<()> {
        // Groups 0 to 2 in the log; the write-ahead file still holds 1 and
        // 2 (0 was checkpointed). A power loss then takes chunk bytes whose
        // pointers sled had made durable.
        for lost in ["the file's tail", "bytes in place"] {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().join("v");
            let whole = three_groups(&dir, &[1, 2])?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(crate::logfile::FILE))?;
            // Into group 1's chunk, which follows group 0's.
            let at = whole[0].len() as u64;
            match lost {
                "the file's tail" => file.set_len(at + 2)?,
                _ => std::os::unix::fs::FileExt::write_all_at(&file, &[0; 5], at)?,
            }
            drop(file);
            let store = Store::open_existing(&dir)?;
            assert_eq!(chunks(&store)?, whole, "{lost}");
            assert_eq!(store.log.layout_fault()?, None, "{lost}");
        }
        Ok(())
    }

    /// Groups 0 to 2 in the log; the write-ahead file holds 1 (0 was
    /// checkpointed), and group 2's record never became durable (it was
    /// not acknowledged). A power loss then leaves zeros where the file
    /// kept its length and lost its bytes: in group 2 alone, or in groups 1
    /// and 2. The open drops group 2, as it drops one whose bytes lie past
    /// the file's end, and the replay writes group 1 again: the log ends
    /// with group 1, whole, and opens.
    #[test]
    fn an_unacknowledged_last_group_whose_bytes_read_as_zeros_is_dropped() -> Result<()> {
        for zeroed in [&[2usize][..], &[1, 2]] {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().join("v");
            let whole = three_groups(&dir, &[1])?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(crate::logfile::FILE))?;
            for &g in zeroed {
                let at: usize = whole[..g].iter().map(Vec::len).sum();
                std::os::unix::fs::FileExt::write_all_at(
                    &file,
                    &vec![0; whole[g].len()],
                    at as u64,
                )?;
            }
            drop(file);
            let store = Store::open_existing(&dir)?;
            assert_eq!(chunks(&store)?, whole[..2].to_vec(), "{zeroed:?}");
            assert_eq!(store.log.layout_fault()?, None, "{zeroed:?}");
        }
        Ok(())
    }

    #[test]
    fn replay_writes_again_a_group_s_last_chunks_whose_pointers_open_dropped() -> Result<()> {
        // Group 0 of one chunk, group 1 of three (seqs 1, 2 and 3), all in
        // the log and the write-ahead file. A power loss takes the file's
        // bytes from the middle of group 1's second chunk on: open drops
        // the pointers of its last two chunks (their bytes lie past the
        // end), keeps its first, and replay must write the two again.
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("v");
        let whole = groups_of_one_and_three(&dir, true)?;
        // Cut 2 bytes into group 1's second chunk.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(crate::logfile::FILE))?;
        file.set_len((whole[0].len() + whole[1].len() + 2) as u64)?;
        drop(file);
        let store = Store::open_existing(&dir)?;
        assert_eq!(chunks(&store)?, whole);
        assert_eq!(store.log.layout_fault()?, None);
        Ok(())
    }

    /// Group 0 of one chunk, group 1 of three (seqs 1 to 3, its head in
    /// the last), all in the log; a power loss then leaves zeros in group
    /// 1's first chunk and its head whole (pages written back out of
    /// order). Acknowledged (its record in the write-ahead file), the
    /// replay writes the group again; never acknowledged, it is dropped
    /// whole. Either way the log ends with a whole group, and opens.
    #[test]
    fn a_last_group_whose_first_chunk_reads_as_zeros_is_written_again_or_dropped() -> Result<()> {
        for acknowledged in [true, false] {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().join("v");
            let whole = groups_of_one_and_three(&dir, acknowledged)?;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(crate::logfile::FILE))?;
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                &vec![0; whole[1].len()],
                whole[0].len() as u64,
            )?;
            drop(file);
            let store = Store::open_existing(&dir)?;
            let kept = if acknowledged {
                &whole[..]
            } else {
                &whole[..1]
            };
            assert_eq!(chunks(&store)?, kept, "acknowledged: {acknowledged}");
            assert_eq!(store.log.layout_fault()?, None);
        }
        Ok(())
    }

    #[test]
    fn the_last_held_group_s_last_steps_go_before_the_groups_sled_lacks() -> Result<()> {
        // Held: sled has group 1's log batch but not the batch after it
        // (its crash came in between). Group 2 then sets the same key.
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("v");
        let store = Store::create_for_tests(&dir, 8 << 20, crate::store::Flusher::Off)?;
        let g0 = group_at(0, &[("a", "0")]);
        let g1 = group_at(1, &[("k", "from 1"), ("x", "1")]);
        let g2 = group_at(2, &[("k", "from 2")]);
        for b in g0.batches.iter().cloned() {
            b.apply(&store)?;
        }
        g1.batches[0].clone().apply(&store)?;
        let mut wal = Wal::new(&dir, SEGMENT_BYTES);
        for g in [&g0, &g1, &g2] {
            wal.append(g.first_seq, &encode_record(g)?, |f| Ok(f.sync_data()?))?;
        }
        let done = replay(&store)?;
        assert_eq!((done.skipped, done.applied), (2, 1));
        assert_eq!(key(&store, "x")?.as_deref(), Some(&b"1"[..]));
        assert_eq!(key(&store, "k")?.as_deref(), Some(&b"from 2"[..]));
        assert!(store.log.contains_key(2u64.to_be_bytes())?);

        // The last group of the segments held, its last step not: it is
        // finished at the end.
        let dir = tmp.path().join("w");
        let store = Store::create_for_tests(&dir, 8 << 20, crate::store::Flusher::Off)?;
        let g0 = group_at(0, &[("y", "0")]);
        g0.batches[0].clone().apply(&store)?;
        let mut wal = Wal::new(&dir, SEGMENT_BYTES);
        wal.append(0, &encode_record(&g0)?, |f| Ok(f.sync_data()?))?;
        let done = replay(&store)?;
        assert_eq!((done.skipped, done.applied), (1, 0));
        assert_eq!(key(&store, "y")?.as_deref(), Some(&b"0"[..]));
        Ok(())
    }

    /// A group the log lacks that does not begin where the log ends (a
    /// segment of another vault, or of another time) is refused before
    /// any of its batches is applied: its keys would replace this vault's
    /// before its secret or chain is checked.
    #[test]
    fn a_group_that_does_not_follow_the_log_is_refused_unapplied() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("v");
        let store = Store::create_for_tests(&dir, 8 << 20, crate::store::Flusher::Off)?;
        for b in group_at(0, &[]).batches {
            b.apply(&store)?;
        }
        // Seq 2 after a log that ends at 0; then seq 1 of another chain.
        let gap = group_at(2, &[("master", "another vault's")]);
        let mut other = group_at(1, &[("master", "another vault's")]);
        let mut log = Batch::new(TreeId::Log);
        let foreign = EntryRef {
            kind: crate::entry::Kind::AccessDenied,
            seq: 1,
            timestamp_ms: 1,
            prev_hash: [9; 32],
            key_version: 0,
            nonce: [0; 12],
            subject: "",
            payload: b"{}",
        }
        .encode();
        log.insert(
            1u64.to_be_bytes().to_vec(),
            crate::chunk::encode_chunk(1, &[&foreign], None),
        );
        other.batches[0] = log;
        for g in [gap, other] {
            let mut wal = Wal::new(&dir, SEGMENT_BYTES);
            wal.append(g.first_seq, &encode_record(&g)?, |f| Ok(f.sync_data()?))?;
            drop(wal);
            let r = replay(&store);
            assert!(
                matches!(r, Err(Error::Integrity { reason: Reason::Malformed(ref m), .. }) if m.contains("does not follow")),
                "{r:?}"
            );
            assert_eq!(key(&store, "master")?, None, "nothing of it applied");
            remove_all(&dir)?;
        }
        Ok(())
    }

    /// A segment is read a record at a time: when the first group is
    /// handed out, nothing past its record has been read, and the groups
    /// and the tear are those `read_segment` finds in the whole bytes.
    #[test]
    fn a_segment_is_read_one_record_at_a_time() -> Result<()> {
        struct Counted<'a>(&'a [u8], std::rc::Rc<std::cell::Cell<usize>>);
        impl std::io::Read for Counted<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        let mut g = group();
        let mut records = Vec::new();
        for seq in 0..3u64 {
            g.first_seq = seq;
            records.push(encode_record(&g)?);
        }
        let mut bytes = segment(&records);
        bytes.extend_from_slice(b"torn tail");
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut reader = SegmentReader::new(Counted(&bytes, read.clone()), bytes.len() as u64)?;
        let first = reader.next_group()?.expect("a first group");
        assert_eq!(read.get(), HEADER_LEN + records[0].len());
        let mut groups = vec![first];
        while let Some(g) = reader.next_group()? {
            groups.push(g);
        }
        assert!(reader.torn());
        let whole = read_segment(&bytes)?;
        assert_eq!(groups, whole.groups);
        assert!(whole.torn);
        assert_eq!(groups.len(), 3);
        Ok(())
    }

    #[test]
    fn a_huge_claimed_length_is_torn_without_allocating() -> Result<()> {
        let mut bytes = segment(&[]);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let seg = read_segment(&bytes)?;
        assert!(seg.torn && seg.groups.is_empty());
        Ok(())
    }

    #[test]
    fn a_record_with_a_good_crc_that_does_not_decode_is_malformed() {
        // Body: first seq, one batch on tree 9 (unknown).
        let mut body = 1u64.to_be_bytes().to_vec();
        body.extend_from_slice(&1u16.to_be_bytes());
        body.push(9);
        body.extend_from_slice(&0u32.to_be_bytes());
        let mut rec = (body.len() as u32).to_be_bytes().to_vec();
        rec.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        rec.extend_from_slice(&body);
        assert!(matches!(
            read_segment(&segment(&[rec])),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            read_segment(b"NOTWAL\x00\x01"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            read_segment(b"FTVWAL\x00\x03"),
            Err(Error::Malformed(_))
        ));
    }
}
