//! The log's chunks in an append-only file of their own, and the sled tree
//! that finds them.
//!
//! ```text
//! DIR/chunks      the chunks (see `chunk`), one after another in seq
//!                 order, nothing between them and nothing after the last
//! tree `log`      u64 BE first seq of a chunk -> u64 BE offset of the
//!                 chunk in DIR/chunks || u32 BE its length (12 bytes)
//! ```
//!
//! sled rewrites a whole leaf every few inserts into it, so a chunk stored
//! in sled was written about three times (`docs/benchmarks.md`, "Where the
//! time goes"); here it is written once, at the end of a file, and sled
//! holds 12 bytes per chunk.
//!
//! Invariants: the chunks lie back to back from offset 0 in the order of
//! their first seqs, and the file ends where the last one ends.
//! [`LogTree::layout_fault`] checks both (verify does as it reads, on every
//! open), so every byte of the file belongs to exactly one chunk the tree
//! names.
//!
//! Writes: `LogTree::apply` writes a batch of chunks at the end of the
//! file with one `pwrite`, then their pointers into sled in one batch. A
//! crash between the two leaves bytes past the last pointer, which the next
//! open cuts off (`LogTree::open`), as long as a write-ahead segment can
//! hold their group: bytes (or pointers) lost past what a checkpoint made
//! durable are damage, refused with nothing cut or dropped. Neither write is synced here:
//! durability rests on the write-ahead file until a checkpoint syncs this
//! file and then sled (`Store::sync`).
//!
//! Writeback: the file is written through the page cache, and left alone
//! the kernel writes its dirty pages back in bursts: several megabytes at
//! once when a sync comes (the indexer's, a checkpoint's) or its flusher
//! wakes, during which every write-ahead `fdatasync` waits behind them at
//! the device (a 13 MB burst held redemptions for 30–40 ms,
//! `docs/benchmarks.md`, "The chunks file written back as it grows"). So
//! each time [`WRITEBACK_BYTES`] more have been written, `apply` asks the
//! kernel to start writing them back (`sync_file_range` with
//! `SYNC_FILE_RANGE_WRITE`, as RocksDB's `bytes_per_sync` does), without
//! waiting for the device and without any promise of durability: the
//! syncs that make the file durable stay where they were, and find little
//! left to write.
//!
//! sled's own flusher may make a pointer durable before the bytes it names,
//! and a power loss then leaves a pointer to bytes the file lacks. Such a
//! chunk belongs to a group written after the last checkpoint. If its
//! write-ahead record is durable (every acknowledged group's is), the
//! replay writes the chunk again (`LogTree::repair`, or appended anew).
//! If it is not, the group was never acknowledged: the next open drops the
//! pointers at the end of the log whose bytes lie past the end of the file,
//! or (from a seq the write-ahead file can hold) read as zeros from a page
//! boundary on, where the file's length survived its bytes, and those of
//! the first chunks of their group, which one write put out with them
//! (`LogTree::open`), as a torn write-ahead record is dropped; and a last
//! group whose head chunk is whole and whose first chunks read so, pages
//! written back out of order, whole. No other
//! sled write may rest on such a group: whatever the vault writes to sled
//! because a chunk is in the log (a pending marker's removal, a shred's
//! last batch, derived state) waits for `LogTree::sync` after the
//! chunk's pointer, so that sled, which recovers a prefix of its writes,
//! holds it only with the chunk's bytes durable.
//!
//! Reads go through `pread` (`FileExt::read_at`), so readers on any thread
//! share the file with the one writer. A pointer that is not 12 bytes, or
//! whose bytes are not (all) in the file, reads as what is there (possibly
//! nothing), and one that claims more than any chunk's length reads as
//! nothing: the chunk then fails to decode, and verify names its seq.
//!
//! A read-only open (`LogTree::open_read_only`, for `verify_read_only`)
//! never writes the file: the cut at open is only a limit on reads, and
//! the writes of the replay that follows go to a file in a scratch dir
//! (chunks appended past that limit) or to memory (chunks repaired below
//! it). Reads see the file as an open that writes would leave it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use crate::error::{Error, Reason, Result};

/// The file of chunks, in the data dir.
pub const FILE: &str = "chunks";
/// Bytes of a pointer: offset, then length.
pub const POINTER_BYTES: usize = 12;
/// No chunk is longer (`chunk::CHUNK_TARGET_BYTES` plus one largest entry,
/// the header and the head stay below 128 KiB).
const MAX_CHUNK_BYTES: u64 = 1 << 20;

/// A pointer's value: where a chunk lies in the file (`docs/storage.md`,
/// section 2; vector LOG_POINTER in section 10).
pub fn encode_pointer(offset: u64, len: u32) -> [u8; POINTER_BYTES] {
    let mut p = [0u8; POINTER_BYTES];
    p[..8].copy_from_slice(&offset.to_be_bytes());
    p[8..].copy_from_slice(&len.to_be_bytes());
    p
}

/// `(offset, length)` of a pointer, if it is one.
pub fn decode_pointer(p: &[u8]) -> Option<(u64, u64)> {
    let p: &[u8; POINTER_BYTES] = p.try_into().ok()?;
    let offset = u64::from_be_bytes(p[..8].try_into().ok()?);
    let len = u32::from_be_bytes(p[8..].try_into().ok()?);
    Some((offset, u64::from(len)))
}

/// Checks, chunk after chunk in key order, the invariants of the module
/// doc, and keeps the first place where the file and the index disagree:
/// the first seq of the chunk there (of the last chunk, for bytes past
/// it) and what is wrong: a pointer that is not one, a chunk that does
/// not start where the one before it ends, or a file that does not end
/// where the last chunk ends.
#[derive(Debug, Default)]
pub(crate) struct LayoutCheck {
    expected: u64,
    last_seq: u64,
    fault: Option<(u64, String)>,
}

impl LayoutCheck {
    /// The next chunk: its key, and where it lies (`None`: no pointer).
    pub(crate) fn chunk(&mut self, key: &[u8], at: Option<(u64, u64)>) {
        if self.fault.is_some() {
            return;
        }
        let seq = <[u8; 8]>::try_from(key)
            .map(u64::from_be_bytes)
            .unwrap_or(self.last_seq);
        match at {
            None => self.fault = Some((seq, "a log pointer is not 12 bytes".into())),
            Some((offset, _)) if offset != self.expected => {
                self.fault = Some((
                    seq,
                    format!(
                        "the chunk lies at offset {offset} of the chunks file, where the one before it ends at {}",
                        self.expected
                    ),
                ))
            }
            Some((offset, len)) => {
                self.expected = offset.saturating_add(len);
                self.last_seq = seq;
            }
        }
    }

    /// The first fault among the chunks seen so far.
    pub(crate) fn fault(&self) -> Option<(u64, String)> {
        self.fault.clone()
    }

    /// After the last chunk: the first fault, the file's end included.
    pub(crate) fn finish(mut self, file_len: u64) -> Option<(u64, String)> {
        if self.fault.is_none() && file_len != self.expected {
            self.fault = Some((
                self.last_seq,
                format!(
                    "the chunks file holds {file_len} bytes, and its chunks end at {}",
                    self.expected
                ),
            ));
        }
        self.fault
    }
}

/// A chunk read with where it lies: its key, its offset and length in the
/// file (`None` for a pointer that is not one), and its bytes.
pub(crate) type Located = (sled::IVec, Option<(u64, u64)>, Bytes);

/// The log: chunks in [`FILE`], found through a sled tree of pointers.
#[derive(Debug)]
pub struct LogTree {
    /// First seq of each chunk -> its pointer. Public for tools and tests
    /// that inspect or tamper with the pointers (`RawStore`).
    pub index: sled::Tree,
    file: File,
    /// Where the next chunk goes: the end of the last chunk the index
    /// names. Held while a batch is written, so chunks and pointers go in
    /// the same order.
    end: Mutex<u64>,
    /// Where the kernel was last asked to start writing the file back
    /// ([`WRITEBACK_BYTES`]); guarded by `end`'s lock.
    written_back: AtomicU64,
    /// Edits from [`crate::RawStore`] rewrite the file in key order, so
    /// that a test's tampering leaves the layout as the vault writes it.
    compact: bool,
    /// Set by a read-only open: where the writes go instead of the file.
    overlay: Option<Overlay>,
    /// The file's `fdatasync`s ([`LogTree::sync`]).
    syncs: StickySync,
}

/// The `fdatasync`s of a file that several threads sync: one at a time,
/// and every one after a failed one fails too. Linux reports a failed
/// writeback to one `fdatasync` only, so another thread's could succeed
/// over pages that never reached the disk (and the checkpointer then
/// delete the write-ahead segment that holds them).
#[derive(Debug, Default)]
pub(crate) struct StickySync(Mutex<bool>);

impl StickySync {
    /// `fdatasync`s `file`, or fails as an earlier one did.
    pub(crate) fn sync(&self, file: &File) -> Result<()> {
        let mut failed = self.0.lock().map_err(|_| Error::Poisoned)?;
        if *failed {
            return Err(Error::Poisoned);
        }
        if let Err(e) = file.sync_data() {
            *failed = true;
            return Err(e.into());
        }
        Ok(())
    }
}

/// What a read-only open ([`LogTree::open_read_only`]) writes instead of
/// the data dir's chunks file, which it only reads: the file as this open
/// sees it is its first `split` bytes, then `tail`, with `patches` laid
/// over it.
#[derive(Debug)]
struct Overlay {
    /// Where the chunks the index named at open end: bytes of the file
    /// past it are left out, as an open that writes would cut them off.
    split: u64,
    /// Chunks appended after the open (the write-ahead replay's), a file
    /// in the scratch dir: offset `split + n` of the log is byte `n` here.
    tail: File,
    /// Chunks below `split` written again by a repair, by offset.
    patches: Mutex<std::collections::BTreeMap<u64, Bytes>>,
}

/// Chunk bytes written between two requests to start their writeback
/// (see the module doc).
pub const WRITEBACK_BYTES: u64 = 1 << 20;

/// Asks the kernel to start writing `len` bytes of `file` from `offset`
/// back to the device, and returns without waiting for them. Only a hint:
/// durability comes from the syncs (`LogTree::sync`), so a refusal is
/// ignored.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range(2) reads no memory of this process; the
    // descriptor is `file`'s, open for as long as the borrow lasts, and a
    // range past the file's end is valid (it writes back nothing there).
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

/// Elsewhere the kernel's own writeback stays in charge.
#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// `f` of the chunk of `n` bytes at `offset` of `file`, decoded whole (its
/// CRC checked, exactly `n` bytes), or of `None` when it is too long to be
/// one or does not decode.
fn with_chunk_at<T>(
    file: &File,
    offset: u64,
    n: u64,
    f: impl FnOnce(Option<crate::chunk::Chunk<'_>>) -> T,
) -> Result<T> {
    if n > MAX_CHUNK_BYTES {
        return Ok(f(None));
    }
    let bytes = read_file_at(file, offset, n)?;
    Ok(f(crate::chunk::Chunk::decode(&bytes).ok()))
}

/// Whether the chunk of `n` bytes at `offset` of `file`, under the key
/// `key`, closes its commit group (carries the group's signed head). A
/// chunk that cannot be read whole, does not decode, or is not the one its
/// key names counts as closing one: it is kept, and verify names it.
fn closes_group(file: &File, key: &[u8], offset: u64, n: u64) -> Result<bool> {
    with_chunk_at(file, offset, n, |c| {
        c.is_none_or(|c| c.head.is_some() || !is_key_of(key, &c))
    })
}

/// Whether the `n` bytes at `offset` of `file` are what a power loss
/// leaves of a chunk the file's length kept: all zeros, or (a write of
/// several pages cut short) a chunk that does not decode and whose bytes
/// are zeros from a page boundary within it to its end. A length over any
/// chunk's is not read, and counts as not.
fn lost_to_power(file: &File, offset: u64, n: u64) -> Result<bool> {
    const PAGE: u64 = 4096;
    if n > MAX_CHUNK_BYTES {
        return Ok(false);
    }
    let bytes = read_file_at(file, offset, n)?;
    let Some(last) = bytes.iter().rposition(|b| *b != 0) else {
        return Ok(true);
    };
    if crate::chunk::Chunk::decode(&bytes).is_ok() {
        return Ok(false);
    }
    // The first page boundary at or after the last byte that is not zero.
    let boundary = (offset + last as u64 + 1).div_ceil(PAGE) * PAGE;
    Ok(boundary < offset + bytes.len() as u64)
}

/// Whether `key` is the index key of `chunk`: its first seq.
fn is_key_of(key: &[u8], chunk: &crate::chunk::Chunk<'_>) -> bool {
    key == chunk.first_seq.to_be_bytes()
}

/// The seq that follows the chunk of first seq `key` at `offset`, `n`
/// bytes long: the seq after its entries when it decodes whole, as that
/// seq, and `key` itself when it does not, so that a pointer or chunk
/// that is not what it claims never lets more be cut than its own group.
fn seq_after(file: &File, key: &[u8], offset: u64, n: u64) -> Result<u64> {
    // A key that is not a seq: as strict as can be.
    let Ok(first) = <[u8; 8]>::try_from(key).map(u64::from_be_bytes) else {
        return Ok(0);
    };
    with_chunk_at(file, offset, n, |c| match c {
        Some(c) if c.first_seq == first => first.saturating_add(c.entries.len() as u64),
        _ => first,
    })
}

/// Refuses to drop pointers, or cut bytes, from seq `seq` on when no
/// write-ahead segment can hold that seq's group: the group was made
/// durable by a checkpoint (or the write-ahead file was taken away), so
/// the index or the chunks file lost what it held for good (a damaged
/// database, a chunks file cut short or written past by something else),
/// and the cut would lose it again with no trace.
fn refuse_lost_checkpoint(dir: &Path, seq: u64, pointers: usize, bytes: u64) -> Result<()> {
    match crate::wal::oldest_segment(dir)? {
        Some(oldest) if oldest <= seq => Ok(()),
        oldest => Err(Error::integrity(
            seq,
            Reason::Malformed(format!(
                "the log's index and its chunks file disagree from seq {seq} on ({pointers} \
                 pointers to bytes the file lacks, {bytes} bytes no pointer names), and no \
                 write-ahead segment holds that seq (oldest: {}): what a checkpoint made \
                 durable is damaged; nothing was dropped or cut",
                oldest.map_or_else(|| "none".to_string(), |s| s.to_string())
            )),
        )),
    }
}

/// Reads up to `len` bytes at `offset`, fewer where the file ends.
fn read_file_at(file: &File, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset.saturating_add(got as u64)) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// A chunks file that is not there, while `index` names chunks in it: the
/// whole log's bytes are missing (a copy or restore of the data dir that
/// left the file out, a file system not mounted), an integrity failure at
/// the first seq named, never an empty log (the cut at open would drop
/// every pointer).
fn refuse_missing(path: &Path, index: &sled::Tree) -> Result<()> {
    let Some((first, _)) = index.first()? else {
        return Ok(());
    };
    let seq = <[u8; 8]>::try_from(first.as_ref()).map_or(0, u64::from_be_bytes);
    Err(Error::integrity(
        seq,
        Reason::Malformed(format!(
            "the chunks file {} is missing, while the log's index names chunks from seq {seq} \
             on: restore it with the rest of the data dir",
            path.display()
        )),
    ))
}

impl LogTree {
    /// Opens (creating if absent) the chunks file of `dir` beside its index
    /// tree, and cuts off whatever lies past the last chunk the index names
    /// (a batch whose pointers a crash kept out of sled).
    pub(crate) fn open(dir: &Path, index: sled::Tree) -> Result<LogTree> {
        let path = dir.join(FILE);
        let created = !path.exists();
        if created {
            refuse_missing(&path, &index)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if created {
            crate::store::sync_dir(dir)?;
        }
        let end = Self::drop_dangling(dir, &file, &index)?;
        if file.metadata()?.len() > end {
            file.set_len(end)?;
        }
        Ok(LogTree {
            index,
            file,
            end: Mutex::new(end),
            written_back: AtomicU64::new(end),
            compact: false,
            overlay: None,
            syncs: StickySync::default(),
        })
    }

    /// Opens the chunks file of `dir` for reading only, beside `index` (a
    /// copy of the data dir's tree, which this may change): the file is
    /// never written, and what an open and the writes after it would write
    /// there goes to a file in `scratch` and to memory instead ([`Overlay`]).
    /// Readers see the log as an open that writes would leave it.
    pub(crate) fn open_read_only(dir: &Path, index: sled::Tree, scratch: &Path) -> Result<LogTree> {
        let path = dir.join(FILE);
        if !path.exists() {
            refuse_missing(&path, &index)?;
        }
        let file = File::open(path)?;
        let end = Self::drop_dangling(dir, &file, &index)?;
        let tail = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(scratch.join(FILE))?;
        Ok(LogTree {
            index,
            file,
            end: Mutex::new(end),
            written_back: AtomicU64::new(end),
            compact: false,
            overlay: Some(Overlay {
                split: end,
                tail,
                patches: Mutex::new(std::collections::BTreeMap::new()),
            }),
            syncs: StickySync::default(),
        })
    }

    /// Drops the pointers at the end of `index` whose bytes lie past the
    /// end of `file` or (from a seq the write-ahead file can hold) are
    /// zeros from a page boundary on ([`lost_to_power`]), and with them the rest of their commit group, and returns
    /// where the last chunk left then ends. Only groups at the end of the
    /// log are dropped: a last group whose head is whole and whose first
    /// chunks are zeros (the file's pages written back out of order before
    /// the power went) is dropped whole from a seq the write-ahead file can
    /// hold ([`LogTree::lost_before`]); chunks with other bytes than
    /// zeros where they do not decode are damage, kept for verify to name.
    ///
    /// A group's chunks go out in one write and their pointers in one sled
    /// batch, so a file that lost a group's last chunks may still hold its
    /// first ones: those are dropped too, up to a chunk that closes a group
    /// (its head in it), so that the log ends with a whole group. The
    /// replay writes the group again when the write-ahead file holds it;
    /// when it does not, the group was never acknowledged.
    ///
    /// Only a group the write-ahead file still holds (or one never
    /// acknowledged, which follows those) can be dropped or cut off this
    /// way: one that a checkpoint made durable has its pointers and bytes
    /// in sled and the file for good, so losing either is damage
    /// ([`refuse_lost_checkpoint`]), and nothing is dropped or cut.
    fn drop_dangling(dir: &Path, file: &File, index: &sled::Tree) -> Result<u64> {
        let len = file.metadata()?.len();
        let mut dropped = Vec::new();
        let mut end = 0;
        // The first seq that cutting the bytes past the chunks kept loses.
        let mut next = 0;
        // From this seq on, a group may be one the write-ahead file holds,
        // or one never acknowledged after them.
        let oldest = crate::wal::oldest_segment(dir)?;
        let written_ahead = |k: &[u8]| {
            let seq = <[u8; 8]>::try_from(k).map(u64::from_be_bytes);
            oldest.is_some_and(|o| seq.is_ok_and(|s| s >= o))
        };
        // The keys not looked at yet are those before this one.
        let mut before: Option<sled::IVec> = None;
        loop {
            let last = match &before {
                None => index.last()?,
                Some(b) => index.range(..b.clone()).next_back().transpose()?,
            };
            let Some((k, p)) = last else {
                break;
            };
            before = Some(k.clone());
            match decode_pointer(&p) {
                // Pointers whose bytes the file never held: a batch whose
                // pointers sled made durable and whose bytes a power loss
                // took (see the module doc).
                Some((offset, n)) if offset.saturating_add(n) > len => dropped.push(k),
                // The same where the file's length survived and its bytes
                // did not (zeros in their place, from a page boundary on):
                // dropped only from a seq the write-ahead file can hold,
                // whose replay writes an acknowledged group again. A
                // checkpointed group's chunk, and other bytes (damage, not
                // a loss), are kept, and verify names them.
                Some((offset, n)) if written_ahead(&k) && lost_to_power(file, offset, n)? => {
                    dropped.push(k)
                }
                // The first chunks of a group that lost its last ones.
                Some((offset, n)) if !dropped.is_empty() && !closes_group(file, &k, offset, n)? => {
                    dropped.push(k)
                }
                // A whole chunk: it ends the log, unless it closes a group
                // whose first chunks a power loss took.
                Some((offset, n)) => {
                    let whole_head = || {
                        with_chunk_at(file, offset, n, |c| {
                            c.is_some_and(|c| c.head.is_some() && is_key_of(&k, &c))
                        })
                    };
                    if written_ahead(&k) && whole_head()? {
                        if let Some(first) = Self::lost_before(file, index, &k, &written_ahead)? {
                            // Before the group's first chunk (never empty:
                            // one of them at least was lost).
                            before = Some(first.last().cloned().unwrap_or_else(|| k.clone()));
                            dropped.push(k);
                            dropped.extend(first);
                            continue;
                        }
                    }
                    end = offset + n;
                    next = seq_after(file, &k, offset, n)?;
                    break;
                }
                // A last pointer that is not one: keep the file as it is,
                // and let verify name the chunk.
                None => {
                    end = len;
                    break;
                }
            }
        }
        let first_lost = match dropped.last() {
            // A key that is not a seq: as strict as can be.
            Some(k) => Some(<[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes)),
            None if len > end => Some(next),
            None => None,
        };
        if let Some(seq) = first_lost {
            refuse_lost_checkpoint(dir, seq, dropped.len(), len - end)?;
        }
        if !dropped.is_empty() {
            // In one batch: sled recovers a prefix of its writes, and a
            // prefix of these removals could leave the first chunks of a
            // group behind with none past the file's end to tell.
            let mut batch = sled::Batch::default();
            for k in &dropped {
                batch.remove(k.clone());
            }
            index.apply_batch(batch)?;
            index.flush()?;
            tracing::warn!(
                chunks = dropped.len(),
                "dropped the log's last chunks: the chunks file ends before them, or holds zeros \
                 where they or the first chunks of their commit group should be (a power loss \
                 after sled made their pointers durable)"
            );
        }
        Ok(end)
    }

    /// The keys of the chunks before `key` in its commit group, last
    /// first, when a power loss took some of them: those back to the
    /// previous chunk that decodes whole and closes a group (or the log's
    /// start), all from a seq the write-ahead file can hold, each one
    /// decoding whole or being zeros from a page boundary on
    /// ([`lost_to_power`]), and one of them at least the latter. `None`
    /// otherwise: nothing lost, or bytes that are damage rather than a
    /// loss, which stay for verify to name.
    fn lost_before(
        file: &File,
        index: &sled::Tree,
        key: &[u8],
        written_ahead: &impl Fn(&[u8]) -> bool,
    ) -> Result<Option<Vec<sled::IVec>>> {
        let mut keys = Vec::new();
        let mut lost = false;
        for kv in index.range(..key).rev() {
            let (k, p) = kv?;
            let Some((offset, n)) = decode_pointer(&p) else {
                return Ok(None);
            };
            // A chunk that decodes but is not the one its key names is
            // damage.
            let closes = with_chunk_at(file, offset, n, |c| {
                c.map(|c| is_key_of(&k, &c).then_some(c.head.is_some()))
            })?;
            let closes = match closes {
                Some(None) => return Ok(None),
                Some(Some(closes)) => Some(closes),
                None => None,
            };
            match closes {
                Some(true) => break,
                Some(false) => {}
                None if lost_to_power(file, offset, n)? => lost = true,
                None => return Ok(None),
            }
            if !written_ahead(&k) {
                return Ok(None);
            }
            keys.push(k);
        }
        Ok(lost.then_some(keys))
    }

    /// Writes `bytes` at `offset` of the log's file, or where a read-only
    /// open keeps them.
    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        match &self.overlay {
            None => self.file.write_all_at(bytes, offset)?,
            Some(o) if offset >= o.split => o.tail.write_all_at(bytes, offset - o.split)?,
            Some(o) => {
                o.patches
                    .lock()
                    .map_err(|_| Error::Poisoned)?
                    .insert(offset, Bytes::copy_from_slice(bytes));
            }
        }
        Ok(())
    }

    fn end(&self) -> Result<std::sync::MutexGuard<'_, u64>> {
        self.end.lock().map_err(|_| Error::Poisoned)
    }

    /// Writes chunks (first seq, bytes), in the order given, at the end of
    /// the file, then their pointers in one sled batch.
    pub(crate) fn apply<K: AsRef<[u8]>, V: AsRef<[u8]>>(&self, chunks: &[(K, V)]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut end = self.end()?;
        let total: usize = chunks.iter().map(|(_, v)| v.as_ref().len()).sum();
        let mut buf = Vec::with_capacity(total);
        let mut batch = sled::Batch::default();
        let mut at = *end;
        for (k, v) in chunks {
            let v = v.as_ref();
            let len = u32::try_from(v.len()).map_err(|_| Error::Malformed("a chunk over 4 GiB"))?;
            buf.extend_from_slice(v);
            batch.insert(k.as_ref(), &encode_pointer(at, len)[..]);
            at += u64::from(len);
        }
        self.write_at(&buf, *end)?;
        self.index.apply_batch(batch)?;
        *end = at;
        let from = self.written_back.load(Ordering::Relaxed).min(at);
        if self.overlay.is_none() && at - from >= WRITEBACK_BYTES {
            start_writeback(&self.file, from, at - from);
            self.written_back.store(at, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes `bytes` again where the pointer of `key` says they are, if
    /// the file does not hold them there: a chunk whose pointer sled made
    /// durable before the file held its bytes (see the module doc). A
    /// chunk past the last pointer is appended with its pointer: the end
    /// of a group of several chunks whose first pointers survived a power
    /// loss and whose last ones open dropped, their bytes lying past the
    /// file's end ([`LogTree::drop_dangling`]).
    pub(crate) fn repair(&self, key: &[u8], bytes: &[u8]) -> Result<()> {
        let Some(p) = self.index.get(key)? else {
            if self
                .index
                .last()?
                .is_some_and(|(last, _)| last.as_ref() < key)
            {
                return self.apply(&[(key, bytes)]);
            }
            return Err(Error::Malformed("repair of a chunk the log does not name"));
        };
        let Some((offset, len)) = decode_pointer(&p) else {
            return Err(Error::Malformed("a log pointer is not 12 bytes"));
        };
        if len != bytes.len() as u64 {
            return Err(Error::Malformed(
                "a log pointer's length differs from the write-ahead record's chunk",
            ));
        }
        // Chunks lie back to back: a pointer that says otherwise is
        // damaged, and writing there would overwrite the chunk before it.
        let before = match self.index.get_lt(key)? {
            Some((_, q)) => decode_pointer(&q).map(|(o, n)| o.saturating_add(n)),
            None => Some(0),
        };
        if before != Some(offset) {
            return Err(Error::Malformed(
                "a log pointer's offset is not where the chunk before it ends",
            ));
        }
        // A whole chunk (its CRC holds) that is not the record's is no
        // write a crash cut short: the record is of another vault or
        // another time, and the chunk is kept.
        let held = self.read(&p)?;
        if held.as_ref() != bytes && crate::chunk::Chunk::decode(&held).is_ok() {
            return Err(Error::Malformed(
                "a write-ahead record's chunk differs from the whole chunk the log holds at its seq",
            ));
        }
        // Written again even when the file seems to hold them: after a
        // failed writeback, Linux keeps the pages in its cache marked
        // clean, so what reads back may be what the disk never got. The
        // write makes them dirty, and the replay's sync writes them.
        // (A read-only open only compares: it never syncs.) The pointer
        // too is written again, for the same reason on sled's side.
        if self.overlay.is_none() {
            self.write_at(bytes, offset)?;
            self.index.insert(key, p)?;
        } else if held.as_ref() != bytes {
            self.write_at(bytes, offset)?;
        }
        Ok(())
    }

    /// Whether the log names a chunk after the one of first seq `key`.
    pub(crate) fn holds_after(&self, key: &[u8]) -> Result<bool> {
        Ok(self.index.get_gt(key)?.is_some())
    }

    /// The bytes a pointer names, as far as the file holds them. A length
    /// no chunk can have (the committer keeps chunks below 128 KiB) reads
    /// as nothing, so a forged pointer cannot make a read allocate much.
    fn read(&self, p: &[u8]) -> Result<Bytes> {
        let Some((offset, len)) = decode_pointer(p).filter(|(_, len)| *len <= MAX_CHUNK_BYTES)
        else {
            return Ok(Bytes::new());
        };
        let buf = match &self.overlay {
            None => read_file_at(&self.file, offset, len)?,
            Some(o) if offset >= o.split => read_file_at(&o.tail, offset - o.split, len)?,
            Some(o) => {
                let patched = o
                    .patches
                    .lock()
                    .map_err(|_| Error::Poisoned)?
                    .get(&offset)
                    .filter(|b| b.len() as u64 == len)
                    .cloned();
                match patched {
                    Some(b) => return Ok(b),
                    // The file as an open that writes would have cut it.
                    None => read_file_at(&self.file, offset, len.min(o.split - offset))?,
                }
            }
        };
        // Owned as read: an `IVec` would copy the chunk once more.
        Ok(Bytes::from(buf))
    }

    /// Makes the file durable (its data; its length is set by writes that
    /// the next open checks against the index). A read-only open has
    /// nothing to make durable: its writes go away with the scratch dir.
    pub(crate) fn sync(&self) -> Result<()> {
        if self.overlay.is_some() {
            return Ok(());
        }
        // The writer, the indexer and the checkpointer share this file.
        self.syncs.sync(&self.file)
    }

    /// The chunk whose first seq is `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.index.get(key)?.map(|p| self.read(&p)).transpose()
    }

    /// A key found in the index with its chunk read through the pointer.
    fn read_found(
        &self,
        found: Option<(sled::IVec, sled::IVec)>,
    ) -> Result<Option<(sled::IVec, Bytes)>> {
        found.map(|(k, p)| Ok((k, self.read(&p)?))).transpose()
    }

    /// Whether a chunk starts at `key`.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.index.contains_key(key)?)
    }

    /// The chunk with the greatest first seq.
    pub fn last(&self) -> Result<Option<(sled::IVec, Bytes)>> {
        self.read_found(self.index.last()?)
    }

    /// The chunk with the greatest first seq at or below `key`: the one
    /// that holds seq `key`, if the log reaches it.
    pub(crate) fn at_or_before(&self, key: u64) -> Result<Option<(sled::IVec, Bytes)>> {
        let found = self.index.range(..=key.to_be_bytes()).next_back();
        self.read_found(found.transpose()?)
    }

    /// The chunks whose keys are in `range`, in key order, each read as it
    /// is reached.
    pub fn range<K, R>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, Bytes)>> + Send + '_
    where
        K: AsRef<[u8]>,
        R: std::ops::RangeBounds<K>,
    {
        self.range_located(range)
            .map(|kv| kv.map(|(k, _, chunk)| (k, chunk)))
    }

    /// [`LogTree::range`], with where each chunk lies (`None` for a
    /// pointer that is not one), for a [`LayoutCheck`].
    pub(crate) fn range_located<K, R>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = Result<Located>> + Send + '_
    where
        K: AsRef<[u8]>,
        R: std::ops::RangeBounds<K>,
    {
        self.index.range(range).map(move |kv| {
            let (k, p) = kv?;
            Ok((k, decode_pointer(&p), self.read(&p)?))
        })
    }

    /// Every chunk, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, Bytes)>> + '_ {
        self.range::<&[u8], _>(..)
    }

    /// The first place where the file and the index disagree, as the first
    /// seq of the chunk there (of the last chunk, for bytes past it) and
    /// what is wrong. Verify makes the same check as it reads the log.
    pub fn layout_fault(&self) -> Result<Option<(u64, String)>> {
        let mut check = LayoutCheck::default();
        for kv in self.index.iter() {
            let (k, p) = kv?;
            check.chunk(&k, decode_pointer(&p));
        }
        Ok(check.finish(self.file_len()?))
    }

    /// The length of the chunks file.
    pub(crate) fn file_len(&self) -> Result<u64> {
        match &self.overlay {
            None => Ok(self.file.metadata()?.len()),
            Some(o) => Ok(o.split + o.tail.metadata()?.len()),
        }
    }

    // Edits for tools and tests (`RawStore`): each keeps the layout by
    // rewriting the file in key order.

    /// Sets the chunk at `key`. On a vault's own tree (not `RawStore`'s)
    /// this appends, as the vault does, and refuses a key that already has
    /// a chunk: the old bytes would stay in the file with nothing naming
    /// them, a layout fault.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        if !self.compact {
            if self.index.contains_key(key.as_ref())? {
                return Err(Error::Invalid(
                    "the log has a chunk at that key; only RawStore rewrites one".into(),
                ));
            }
            return self.apply(&[(key.as_ref(), value.as_ref())]);
        }
        self.edit(|all| {
            all.insert(key.as_ref().to_vec(), value.as_ref().to_vec());
        })
    }

    /// Removes the chunk at `key`.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.edit(|all| {
            all.remove(key.as_ref());
        })
    }

    /// Removes every chunk.
    pub fn clear(&self) -> Result<()> {
        self.edit(std::collections::BTreeMap::clear)
    }

    /// Reads every chunk, changes the set, and writes it back from offset 0.
    fn edit(
        &self,
        f: impl FnOnce(&mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>),
    ) -> Result<()> {
        let mut all = std::collections::BTreeMap::new();
        for kv in self.iter() {
            let (k, v) = kv?;
            all.insert(k.to_vec(), v.to_vec());
        }
        f(&mut all);
        if self.overlay.is_some() {
            return Err(Error::Invalid(
                "a log opened read-only is not edited".into(),
            ));
        }
        {
            let mut end = self.end()?;
            self.index.clear()?;
            self.file.set_len(0)?;
            *end = 0;
        }
        let chunks: Vec<(Vec<u8>, Vec<u8>)> = all.into_iter().collect();
        self.apply(&chunks)
    }

    /// This tree, for `RawStore`: its edits keep the layout.
    pub(crate) fn compacting(mut self) -> LogTree {
        self.compact = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Result<(sled::Db, LogTree)> {
        let db = sled_db(dir)?;
        let log = LogTree::open(dir, db.open_tree("log")?)?;
        Ok((db, log))
    }

    /// A write-ahead segment named `seq` in `dir` (its name is all that
    /// the open of a log reads).
    fn segment(dir: &Path, seq: u64) -> Result<()> {
        let wal = dir.join("wal");
        std::fs::create_dir_all(&wal)?;
        std::fs::write(wal.join(format!("{seq:016x}.wal")), b"")?;
        Ok(())
    }

    fn sled_db(dir: &Path) -> Result<sled::Db> {
        // A sled dropped just before may still hold its file lock for a
        // moment (its flusher thread lets go of it last): wait for it.
        if let Ok(f) = std::fs::File::open(dir.join("db").join("db")) {
            f.lock()?;
        }
        Ok(sled::Config::new().path(dir.join("db")).open()?)
    }

    #[test]
    fn writeback_is_asked_for_each_mebibyte_written_and_changes_no_byte() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = open(dir.path())?;
        let chunk = vec![7u8; 300 * 1024];
        let mut seq = 0u64;
        let mut asked = Vec::new();
        for _ in 0..8 {
            log.apply(&[(seq.to_be_bytes(), &chunk[..])])?;
            seq += 1;
            asked.push(log.written_back.load(Ordering::Relaxed));
        }
        // 300 KiB a batch: asked at the 4th batch (1,200 KiB) and the 8th
        // (2,400 KiB), each time for everything written until then.
        let kib = 1024;
        assert_eq!(
            asked,
            [
                0,
                0,
                0,
                1200 * kib,
                1200 * kib,
                1200 * kib,
                1200 * kib,
                2400 * kib
            ]
        );
        assert!(asked
            .windows(2)
            .all(|w| w[1] == w[0] || w[1] - w[0] >= WRITEBACK_BYTES));
        assert_eq!(log.file_len()?, 8 * 300 * kib);
        for s in 0..seq {
            assert_eq!(log.get(s.to_be_bytes())?.as_deref(), Some(&chunk[..]));
        }
        // A range past the end of the file is no error, nor a length of 0
        // (which the call reads as "to the end of the file").
        start_writeback(&log.file, 1 << 40, 1 << 20);
        start_writeback(&log.file, 0, 0);
        assert_eq!(
            std::fs::read(dir.path().join(FILE))?.len() as u64,
            8 * 300 * kib
        );
        Ok(())
    }

    #[test]
    fn chunks_lie_back_to_back_and_read_back() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = open(dir.path())?;
        log.apply(&[
            (0u64.to_be_bytes(), &b"abc"[..]),
            (3u64.to_be_bytes(), &b"defg"[..]),
        ])?;
        log.apply(&[(7u64.to_be_bytes(), &b"h"[..])])?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcdefgh");
        assert_eq!(log.get(3u64.to_be_bytes())?.as_deref(), Some(&b"defg"[..]));
        assert_eq!(
            log.index.get(7u64.to_be_bytes())?.as_deref(),
            Some(&[0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1][..])
        );
        let keys: Vec<u64> = log
            .range(1u64.to_be_bytes()..)
            .map(|kv| {
                kv.map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or_default()))
            })
            .collect::<Result<_>>()?;
        assert_eq!(keys, [3, 7]);
        assert_eq!(log.layout_fault()?, None);
        Ok(())
    }

    #[test]
    fn bytes_past_the_last_pointer_are_cut_off_at_open() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let c0 = whole_chunk(0);
        {
            let (_db, log) = open(dir.path())?;
            log.apply(&[(0u64.to_be_bytes(), &c0[..])])?;
            // A batch whose pointers a crash kept out of sled, and whose
            // group the write-ahead file still holds.
            log.file.write_all_at(b"zz", c0.len() as u64)?;
            assert!(log.layout_fault()?.is_some());
            segment(dir.path(), 0)?;
        }
        let (_db, log) = open(dir.path())?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, c0);
        assert_eq!(log.layout_fault()?, None);
        log.apply(&[(1u64.to_be_bytes(), &b"d"[..])])?;
        assert_eq!(
            std::fs::read(dir.path().join(FILE))?,
            [&c0[..], b"d"].concat()
        );
        Ok(())
    }

    /// A chunk of one entry whose first seq is `first`, that decodes whole
    /// and closes its group (a head in it).
    fn whole_chunk(first: u64) -> Vec<u8> {
        let head = crate::chunk::SignedHead::sign(
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            0,
            first,
            first,
            [1; 32],
            [2; 32],
            3,
        );
        crate::chunk::encode_chunk(first, &[b"an entry"], Some(&head))
    }

    /// Chunks at the end of the log whose bytes the file holds as zeros
    /// (where a power loss took the bytes and the file's length survived)
    /// are dropped at open from a seq the write-ahead file can hold (a
    /// group never acknowledged when it does not hold it: gone, as a torn
    /// record is), and kept, for verify to name, below it (a checkpoint
    /// made them durable), or when they are not all zeros.
    #[test]
    fn chunks_that_read_as_zeros_at_the_end_are_dropped_when_written_ahead() -> Result<()> {
        let (c1, c2) = (whole_chunk(1), whole_chunk(2));
        let c0 = whole_chunk(0).len() as u64;
        zeros_after_the_first_chunk(&c1, &c2, c1.len() + c2.len(), c0 + c1.len() as u64)
    }

    /// The last group's head whole and its first chunk zeros (pages
    /// written back out of order before a power loss): the whole group is
    /// dropped at open from a seq the write-ahead file can hold, and kept
    /// below it, or when the chunk holds other bytes than zeros (damage).
    #[test]
    fn a_last_group_whose_first_chunks_read_as_zeros_is_dropped_when_written_ahead() -> Result<()> {
        let c1 = crate::chunk::encode_chunk(1, &[b"an entry"], None);
        let c0 = whole_chunk(0).len() as u64;
        zeros_after_the_first_chunk(&c1, &whole_chunk(2), c1.len(), c0 + 3)
    }

    /// A log of chunk 0 (a group of its own), then `c1` and `c2` (seqs 1
    /// and 2) in one write, and `zeroed` bytes of zeros after chunk 0 in
    /// the file: kept as they are with no write-ahead segment, or only one
    /// from after them; with one from seq 1, kept while the byte at
    /// `damage_at` is not zero (damage, not a loss), and dropped down to
    /// chunk 0 once it is.
    fn zeros_after_the_first_chunk(
        c1: &[u8],
        c2: &[u8],
        zeroed: usize,
        damage_at: u64,
    ) -> Result<()> {
        let c0 = whole_chunk(0);
        let dir = tempfile::tempdir()?;
        {
            let (db, log) = open(dir.path())?;
            log.apply(&[(0u64.to_be_bytes(), &c0[..])])?;
            log.apply(&[(1u64.to_be_bytes(), c1), (2u64.to_be_bytes(), c2)])?;
            db.flush()?;
            log.file.write_all_at(&vec![0u8; zeroed], c0.len() as u64)?;
        }
        let keys = |log: &LogTree| -> Result<Vec<Vec<u8>>> {
            log.index.iter().keys().map(|k| Ok(k?.to_vec())).collect()
        };
        for later in [None, Some(3)] {
            if let Some(seq) = later {
                segment(dir.path(), seq)?;
            }
            let (_db, log) = open(dir.path())?;
            assert_eq!(keys(&log)?.len(), 3);
            assert_eq!(*log.end()?, (c0.len() + c1.len() + c2.len()) as u64);
        }
        segment(dir.path(), 1)?;
        {
            let file = OpenOptions::new().write(true).open(dir.path().join(FILE))?;
            file.write_all_at(&[0xff], damage_at)?;
            let (_db, log) = open(dir.path())?;
            assert_eq!(keys(&log)?.len(), 3);
            file.write_all_at(&[0], damage_at)?;
        }
        let (_db, log) = open(dir.path())?;
        assert_eq!(keys(&log)?, [0u64.to_be_bytes().to_vec()]);
        assert_eq!(*log.end()?, c0.len() as u64);
        assert_eq!(std::fs::read(dir.path().join(FILE))?, c0);
        assert_eq!(log.layout_fault()?, None);
        Ok(())
    }

    /// The first chunks of a group whose last ones the file lost are
    /// dropped with them, but not a chunk that is not the one its key
    /// names (damage, not a loss): the drop stops there, for verify to
    /// name it.
    #[test]
    fn a_chunk_under_another_key_stops_the_drop_of_a_group_s_first_chunks() -> Result<()> {
        let c0 = whole_chunk(0);
        for (first, kept) in [(1u64, 1), (7, 2)] {
            let c1 = crate::chunk::encode_chunk(first, &[b"an entry"], None);
            let c2 = whole_chunk(2);
            let dir = tempfile::tempdir()?;
            {
                let (db, log) = open(dir.path())?;
                log.apply(&[(0u64.to_be_bytes(), &c0[..])])?;
                log.apply(&[(1u64.to_be_bytes(), &c1[..]), (2u64.to_be_bytes(), &c2[..])])?;
                db.flush()?;
                // The group's last chunk past the file's end.
                log.file.set_len((c0.len() + c1.len() + 2) as u64)?;
            }
            segment(dir.path(), 1)?;
            let (_db, log) = open(dir.path())?;
            assert_eq!(log.index.len(), kept, "chunk 1 of first seq {first}");
        }
        Ok(())
    }

    /// A chunk of several pages whose write a power loss cut short (its
    /// first page there, zeros from a page boundary on) is dropped at the
    /// end of the log from a seq the write-ahead file can hold; one with a
    /// byte that is not zero after its last page boundary is damage, kept.
    #[test]
    fn a_chunk_cut_short_at_a_page_is_dropped_when_written_ahead() -> Result<()> {
        let c0 = whole_chunk(0);
        let big = crate::chunk::encode_chunk(1, &[&[7u8; 10_000][..]], None);
        for last_byte_kept in [false, true] {
            let dir = tempfile::tempdir()?;
            {
                let (db, log) = open(dir.path())?;
                log.apply(&[(0u64.to_be_bytes(), &c0[..])])?;
                log.apply(&[(1u64.to_be_bytes(), &big[..])])?;
                db.flush()?;
                let start = c0.len() as u64;
                let end = start + big.len() as u64;
                let boundary = start.div_ceil(4096) * 4096;
                log.file
                    .write_all_at(&vec![0u8; (end - boundary) as usize], boundary)?;
                if last_byte_kept {
                    log.file.write_all_at(&[1], end - 1)?;
                }
            }
            segment(dir.path(), 1)?;
            let (_db, log) = open(dir.path())?;
            let kept = log.index.len();
            assert_eq!(kept, if last_byte_kept { 2 } else { 1 });
        }
        Ok(())
    }

    #[test]
    fn a_read_only_open_writes_its_changes_beside_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (c0, c3) = (whole_chunk(0), whole_chunk(3));
        let (n0, n3) = (c0.len() as u64, c3.len() as u64);
        {
            let (_db, log) = open(dir.path())?;
            log.apply(&[(0u64.to_be_bytes(), &c0[..]), (3u64.to_be_bytes(), &c3[..])])?;
            log.file.write_all_at(b"zz", n0 + n3)?;
            segment(dir.path(), 3)?;
        }
        let scratch = tempfile::tempdir()?;
        let db = sled::Config::new().temporary(true).open()?;
        let index = db.open_tree("log")?;
        for (k, p) in [
            (0u64, encode_pointer(0, n0 as u32)),
            (3, encode_pointer(n0, n3 as u32)),
        ] {
            index.insert(k.to_be_bytes(), &p[..])?;
        }
        let log = LogTree::open_read_only(dir.path(), index, scratch.path())?;
        // Seen as cut at the last chunk, though the file is not.
        assert_eq!(log.file_len()?, n0 + n3);
        assert_eq!(log.layout_fault()?, None);
        // An append goes to the scratch file; a repair (of chunk 3, torn in
        // the file since the open) to memory.
        log.apply(&[(6u64.to_be_bytes(), &b"gh"[..])])?;
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE))?;
        file.write_all_at(&[0; 4], n0)?;
        log.repair(&3u64.to_be_bytes(), &c3)?;
        assert_eq!(log.get(6u64.to_be_bytes())?.as_deref(), Some(&b"gh"[..]));
        assert_eq!(log.get(3u64.to_be_bytes())?.as_deref(), Some(&c3[..]));
        assert_eq!(log.get(0u64.to_be_bytes())?.as_deref(), Some(&c0[..]));
        assert_eq!((log.file_len()?, log.layout_fault()?), (n0 + n3 + 2, None));
        log.sync()?;
        let mut torn = c3.clone();
        torn[..4].fill(0);
        assert_eq!(
            std::fs::read(dir.path().join(FILE))?,
            [&c0[..], &torn[..], b"zz"].concat()
        );
        assert_eq!(std::fs::read(scratch.path().join(FILE))?, b"gh");
        // A pointer reaching past the cut reads only up to it.
        assert_eq!(
            log.read(&encode_pointer(n0 + n3 - 2, 4))?.as_ref(),
            &c3[c3.len() - 2..]
        );
        // Nothing of the data dir's file to write back, however much is
        // appended.
        let big = vec![1u8; WRITEBACK_BYTES as usize + 1];
        log.apply(&[(8u64.to_be_bytes(), &big[..])])?;
        assert_eq!(log.written_back.load(Ordering::Relaxed), n0 + n3);
        Ok(())
    }

    /// A log of two chunks, "abc" at 0 and "def" at 3, and a read of the
    /// second.
    fn abc_def(dir: &Path) -> Result<(sled::Db, LogTree)> {
        let (db, log) = open(dir)?;
        log.apply(&[
            (0u64.to_be_bytes(), &b"abc"[..]),
            (3u64.to_be_bytes(), &b"def"[..]),
        ])?;
        Ok((db, log))
    }

    fn second(log: &LogTree) -> Result<Vec<u8>> {
        Ok(log
            .get(3u64.to_be_bytes())?
            .map(|v| v.to_vec())
            .unwrap_or_default())
    }

    /// A power loss that took the file from the middle of a group of
    /// three chunks on: open drops the pointers of the chunks past the end
    /// and of the group's first chunk, which the file still holds, so
    /// that the log ends with the whole group before it.
    #[test]
    fn open_drops_a_group_whose_last_chunks_the_file_lost_whole() -> Result<()> {
        let head = crate::chunk::SignedHead::sign(
            &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            0,
            0,
            0,
            [1; 32],
            [2; 32],
            3,
        );
        let entry: &[u8] = b"an entry";
        let chunks = [
            crate::chunk::encode_chunk(0, &[entry], Some(&head)),
            crate::chunk::encode_chunk(1, &[entry], None),
            crate::chunk::encode_chunk(2, &[entry], None),
            crate::chunk::encode_chunk(3, &[entry], Some(&head)),
        ];
        let dir = tempfile::tempdir()?;
        {
            let (db, log) = open(dir.path())?;
            log.apply(&[(0u64.to_be_bytes(), &chunks[0][..])])?;
            let group: Vec<([u8; 8], &[u8])> = (1..4u64)
                .map(|s| (s.to_be_bytes(), &chunks[s as usize][..]))
                .collect();
            log.apply(&group)?;
            db.flush()?;
        }
        let first_two = (chunks[0].len() + chunks[1].len()) as u64;
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE))?;
        file.set_len(first_two + 5)?;
        drop(file);
        let keys = |log: &LogTree| {
            log.index
                .iter()
                .keys()
                .map(|k| Ok(u64::from_be_bytes(k?.as_ref().try_into().expect("8 bytes"))))
                .collect::<Result<Vec<u64>>>()
        };
        // With no write-ahead segment that can hold group 1, a checkpoint
        // made it durable: the file lost it for good, and the open refuses
        // rather than drop it again.
        for later in [None, Some(2)] {
            if let Some(seq) = later {
                segment(dir.path(), seq)?;
            }
            let db = sled_db(dir.path())?;
            match LogTree::open(dir.path(), db.open_tree("log")?) {
                Err(Error::Integrity {
                    seq: 1,
                    reason: Reason::Malformed(m),
                }) if m.contains("nothing was dropped or cut") => {}
                other => panic!("the open gave {:?}", other.map(|_| "a log")),
            }
            assert_eq!(db.open_tree("log")?.len(), 4, "no pointer was dropped");
            let len = std::fs::metadata(dir.path().join(FILE))?.len();
            assert_eq!(len, first_two + 5, "no byte was cut");
        }
        // Group 1's segment is there: the group was written after the last
        // checkpoint, and the replay writes it again.
        segment(dir.path(), 1)?;
        let (_db, log) = open(dir.path())?;
        assert_eq!(keys(&log)?, [0]);
        assert_eq!(*log.end()?, chunks[0].len() as u64);
        assert_eq!(log.layout_fault()?, None);
        Ok(())
    }

    /// A record's chunk that differs from a whole chunk the log holds at
    /// its seq (a segment of another vault, or of another time) is
    /// refused, and the held chunk stays; the same chunk, or one the file
    /// lost, is written again.
    #[test]
    fn repair_keeps_a_whole_chunk_that_differs_from_the_record() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = open(dir.path())?;
        let ours = crate::chunk::encode_chunk(0, &[b"ours"], None);
        let theirs = crate::chunk::encode_chunk(0, &[b"mine"], None);
        assert_eq!(ours.len(), theirs.len());
        log.apply(&[(0u64.to_be_bytes(), &ours[..])])?;
        match log.repair(&0u64.to_be_bytes(), &theirs) {
            Err(Error::Malformed(m)) if m.contains("differs from the whole chunk") => {}
            other => panic!("the repair gave {other:?}"),
        }
        assert_eq!(std::fs::read(dir.path().join(FILE))?, ours);
        log.repair(&0u64.to_be_bytes(), &ours)?;
        // Torn in the file: written again from the record.
        log.file.write_all_at(&[0; 8], 4)?;
        log.repair(&0u64.to_be_bytes(), &ours)?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, ours);
        Ok(())
    }

    /// A pointer whose offset is not where the chunk before it ends is
    /// damaged: a repair through it would overwrite that chunk.
    #[test]
    fn repair_refuses_a_pointer_out_of_place() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = abc_def(dir.path())?;
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(2, 3)[..])?;
        match log.repair(&3u64.to_be_bytes(), b"DEF") {
            Err(Error::Malformed(m)) if m.contains("not where the chunk before it ends") => {}
            other => panic!("the repair gave {other:?}"),
        }
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcdef");
        Ok(())
    }

    #[test]
    fn repair_writes_lost_bytes_in_place_and_refuses_another_length() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = abc_def(dir.path())?;
        // The file lost the second chunk (a pointer durable before its bytes).
        log.file.set_len(3)?;
        assert_eq!(second(&log)?, b"");
        log.repair(&3u64.to_be_bytes(), b"def")?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcdef");
        assert!(log.repair(&3u64.to_be_bytes(), b"de").is_err());
        // A chunk the log does not name before its last one is refused;
        // one past it is the end of a group whose last pointers open
        // dropped, appended with its pointer.
        assert!(log.repair(&1u64.to_be_bytes(), b"x").is_err());
        log.repair(&9u64.to_be_bytes(), b"x")?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcdefx");
        assert_eq!(log.layout_fault()?, None);
        Ok(())
    }

    #[test]
    fn an_insert_over_a_chunk_is_refused_unless_the_tree_rewrites() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = abc_def(dir.path())?;
        assert!(matches!(
            log.insert(3u64.to_be_bytes(), b"xyz"),
            Err(Error::Invalid(_))
        ));
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcdef");
        log.insert(6u64.to_be_bytes(), b"g")?;
        let log = log.compacting();
        log.insert(3u64.to_be_bytes(), b"xyz")?;
        assert_eq!(std::fs::read(dir.path().join(FILE))?, b"abcxyzg");
        assert_eq!(log.layout_fault()?, None);
        assert_eq!(
            log.at_or_before(5)?.map(|(k, v)| (k.to_vec(), v.to_vec())),
            Some((3u64.to_be_bytes().to_vec(), b"xyz".to_vec()))
        );
        assert_eq!(log.last()?.map(|(_, v)| v.to_vec()), Some(b"g".to_vec()));
        Ok(())
    }

    #[test]
    fn a_layout_fault_names_the_chunk() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, log) = abc_def(dir.path())?;
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(2, 4)[..])?;
        assert_eq!(log.layout_fault()?.map(|(s, _)| s), Some(3));
        log.index.insert(3u64.to_be_bytes(), &b"short"[..])?;
        assert_eq!(log.layout_fault()?.map(|(s, _)| s), Some(3));
        assert_eq!(second(&log)?, b"");
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(3, 3)[..])?;
        log.file.write_all_at(b"x", 6)?;
        assert_eq!(log.layout_fault()?.map(|(s, _)| s), Some(3));
        // A pointer past the file reads as what is there, and one longer
        // than any chunk as nothing.
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(1 << 40, 100)[..])?;
        assert_eq!(second(&log)?, b"");
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(0, u32::MAX)[..])?;
        assert_eq!(second(&log)?, b"");
        log.index
            .insert(3u64.to_be_bytes(), &encode_pointer(4, 100)[..])?;
        assert_eq!(second(&log)?, b"efx");
        Ok(())
    }
}
