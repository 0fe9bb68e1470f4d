//! Reindexing: rebuild the derived state (the `state` tree) from the log
//! and compare it with the stored one; offline, replace the stored one.
//!
//! The rebuild is the replay `verify` does ([`crate::verify`](mod@crate::verify)'s
//! `replay_entry` over every entry, `state::mutations` underneath), held
//! in memory once (verify's `Model`, a hash map), and compared in the
//! tree's order through a sorted list of references to it, each key and
//! value copied only as the comparison reaches it; the comparison is
//! verify's too (`diff_tree`), counting every difference instead of
//! stopping at the first.
//!
//! - `check_live` (a running vault, `Reindex` on the wire) compares the
//!   tree with the log replayed up to the tree's `applied` marker: entries
//!   after it are in the vault's in-memory overlay, not yet in the tree.
//!   It reads only, and never blocks the committer: if the indexer writes
//!   during the comparison (its indexing marker is there, or the applied
//!   marker moved), the rebuild is extended to the new marker and the
//!   comparison run again, at last with the indexer held off until it is
//!   done (the derived state published meanwhile waits in the overlay,
//!   which every reader consults first).
//! - [`reindex`] (a stopped vault, `vault-admin reindex --data-dir`)
//!   checks the chain first (a rebuild from a log that does not verify
//!   would launder it), rebuilds the state of the whole log, compares, and
//!   with `repair` replaces the tree's content in one sled batch: a crash
//!   leaves either the old state or the new one, never a mix.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

use crate::chunk::Chunk;
use crate::crypto::Unlock;
use crate::entry::EntryRef;
use crate::error::{Error, Reason, Result};
use crate::state;
use crate::store::Store;
use crate::verify::{diff_tree, replay_entry, scan_chain, Diff, Model};

/// Comparisons [`check_live`] runs while the indexer may write, before
/// it holds the indexer off for one more.
const FREE_ATTEMPTS: usize = 2;

/// The lock each write of the derived state holds ([`IndexGate::for_indexer`]),
/// and a live comparison takes to hold the indexer off
/// ([`IndexGate::hold_off`]).
#[derive(Debug, Default)]
pub(crate) struct IndexGate {
    lock: Mutex<()>,
    /// Comparisons waiting for `lock`. A std mutex is not fair: under a
    /// steady load the indexer takes it again a moment after each write,
    /// before a waiter is woken, so it leaves it to them first.
    waiting: AtomicUsize,
}

impl IndexGate {
    /// For the indexer, before a write: waits while a comparison waits
    /// for the gate, then takes it.
    pub(crate) fn for_indexer(&self) -> MutexGuard<'_, ()> {
        while self.waiting.load(Ordering::Acquire) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// For a comparison: takes the gate once the indexer's write in
    /// progress, if any, is done, ahead of its next one.
    pub(crate) fn hold_off(&self) -> MutexGuard<'_, ()> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        held
    }
}

/// What a reindex found (and did).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReindexReport {
    /// Entries replayed into the rebuilt state.
    pub entries: u64,
    /// State keys compared (the union of the stored and rebuilt keys).
    pub keys_compared: u64,
    /// Keys missing, unexpected or holding another value in the stored
    /// state, the `applied` marker included.
    pub differences: u64,
    /// Descriptions of the first differences (at most
    /// [`crate::verify::MAX_DIFF_SAMPLE`]), e.g. `value of "s/c1" differs`.
    pub sample: Vec<String>,
    /// Offline: the stored state was replaced by the rebuilt one.
    pub repaired: bool,
}

impl ReindexReport {
    fn from_diff(entries: u64, d: Diff) -> Self {
        ReindexReport {
            entries,
            keys_compared: d.compared,
            differences: d.differences,
            sample: d.sample,
            repaired: false,
        }
    }
}

/// Options of [`reindex`].
#[derive(Debug, Clone, Default)]
pub struct ReindexOptions {
    /// Replace the stored state with the rebuilt one when they differ.
    pub repair: bool,
    /// The key the chain is checked with; `None` uses the one stored in
    /// the data dir (the secret was checked, so the directory is the
    /// operator's own).
    pub public_key: Option<VerifyingKey>,
}

/// The model's keys and values in the state tree's order, borrowed: the
/// rebuilt state is held once, however often it is compared.
fn in_order(model: &Model) -> Vec<(&[u8], &[u8])> {
    let mut kvs: Vec<(&[u8], &[u8])> = model
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    kvs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    kvs
}

/// The expected content of the state tree: the model (`in_order`) and its
/// marker, each key and value copied only as the comparison takes it.
fn expected<'a>(
    model: &'a [(&'a [u8], &'a [u8])],
    applied: Option<u64>,
) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + 'a {
    // "applied" sorts among the model's keys: merge it in its place.
    let marker = applied.map(|a| (state::APPLIED.to_vec(), a.to_be_bytes().to_vec()));
    let at = model.partition_point(|(k, _)| *k < state::APPLIED);
    let owned = |(k, v): &(&[u8], &[u8])| (k.to_vec(), v.to_vec());
    model[..at]
        .iter()
        .map(owned)
        .chain(marker)
        .chain(model[at..].iter().map(owned))
}

/// Replays entries `from..=to` of the log into `model`. The log of a
/// running vault was verified when it opened, and the vault wrote the rest
/// itself; a chunk or entry that does not decode is still an integrity
/// error, never a panic.
fn replay_range(store: &Store, model: &mut Model, from: u64, to: u64) -> Result<()> {
    // Through the writer's held-back chunks too: the state tree can be
    // ahead of the chunks sled holds.
    let Some((start, _)) = store.chunk_at(from)? else {
        return Err(Error::integrity(from, Reason::Truncated));
    };
    let mut key_buf = Vec::with_capacity(64);
    let mut next = from;
    for kv in store.chunks_from(start) {
        let (_, v) = kv?;
        let chunk = Chunk::decode(&v).map_err(|_| Error::integrity(next, Reason::CrcMismatch))?;
        for bytes in chunk.entries {
            let e = EntryRef::decode(bytes)?;
            if e.seq < from {
                continue;
            }
            if e.seq != next {
                return Err(Error::integrity(next, Reason::Reordered));
            }
            replay_entry(model, &e, &mut key_buf)?;
            if e.seq == to {
                return Ok(());
            }
            next += 1;
        }
    }
    Err(Error::integrity(next, Reason::Truncated))
}

/// Replays the entries after `replayed` up to `applied` into `model`, and
/// notes how far the model now goes.
fn catch_up(
    store: &Store,
    model: &mut Model,
    replayed: &mut Option<u64>,
    applied: Option<u64>,
) -> Result<()> {
    if let Some(a) = applied {
        let from = replayed.map_or(0, |r| r + 1);
        if a + 1 > from {
            replay_range(store, model, from, a)?;
        }
        *replayed = Some(a.max(replayed.unwrap_or(0)));
    }
    Ok(())
}

/// Compares the state tree of a running vault with the log replayed up to
/// the tree's `applied` marker. Reads only. The first attempts leave the
/// indexer alone; if it wrote during each of them, the last holds it off
/// (`gate`) for the comparison's time, so that a vault under a steady load
/// is compared too. Only the entries the indexer covered since the last
/// replay are replayed then, and the committer never waits: the state it
/// publishes meanwhile stays in the overlay.
pub(crate) fn check_live(store: &Store, gate: &IndexGate) -> Result<ReindexReport> {
    let mut model = Model::new();
    let mut replayed: Option<u64> = None;
    for _ in 0..FREE_ATTEMPTS {
        // The log up to the marker is there whatever the indexer does.
        let applied = store.applied()?;
        catch_up(store, &mut model, &mut replayed, applied)?;
        // The indexer writes key by key between its two markers: while the
        // indexing marker is there, the tree is moving.
        if store.indexing()?.is_some() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let diff = diff_tree(&store.state, expected(&in_order(&model), applied), u64::MAX)?;
        // The indexer sets its indexing marker before its first key and
        // removes it with the move of the applied marker, which only grows:
        // no indexing marker and an unchanged applied marker mean the tree
        // did not change while it was read.
        if store.indexing()?.is_none() && store.applied()? == applied {
            return Ok(ReindexReport::from_diff(applied.map_or(0, |a| a + 1), diff));
        }
    }
    catch_up(store, &mut model, &mut replayed, store.applied()?)?;
    let _held = gate.hold_off();
    // Between two writes: an indexing marker now was left by a write that
    // failed, after which the vault refuses writes until it is reopened
    // (which replays from `applied`).
    if store.indexing()?.is_some() {
        return Err(Error::Poisoned);
    }
    let applied = store.applied()?;
    catch_up(store, &mut model, &mut replayed, applied)?;
    let diff = diff_tree(&store.state, expected(&in_order(&model), applied), u64::MAX)?;
    Ok(ReindexReport::from_diff(applied.map_or(0, |a| a + 1), diff))
}

/// Reindexes the stopped vault in `dir`: checks that `unlock` opens it
/// (`WrongSecret` otherwise) and that its chain verifies (an integrity
/// error otherwise: nothing is rebuilt from a log that does not), rebuilds
/// the derived state of the whole log, compares it with the stored one,
/// and with `opts.repair` replaces the stored one if they differ.
///
/// A state tree that lags the log (a crash before the indexer caught up)
/// counts as different here: the rebuild covers every entry, and a repair
/// brings the tree up to the last one.
pub fn reindex(dir: &Path, unlock: &Unlock, opts: &ReindexOptions) -> Result<ReindexReport> {
    let store = Store::open_existing(dir)?;
    crate::vault::check_unlock(&store, unlock)?;
    let key = opts
        .public_key
        .or_else(|| store.stored_public_key())
        .ok_or(Error::Malformed("no public key"))?;
    let mut model = Model::new();
    let mut key_buf = Vec::with_capacity(64);
    let tip = scan_chain(&store.log, &key, None, &|_| {}, |e, _| {
        replay_entry(&mut model, e, &mut key_buf)
    })?
    .map_err(Error::from)?
    .tip;
    let last = tip.entries.checked_sub(1);
    // A marker past the log's end is the one sign that whole groups were
    // cut off its end (their receipts given): verify calls it `truncated`,
    // and a repair, which sets the marker to the end, would erase it.
    let past_the_end = |marker: Option<u64>| marker.is_some_and(|m| last.is_none_or(|l| m > l));
    if past_the_end(store.applied()?) || past_the_end(store.indexing()?) {
        return Err(Error::integrity(last.unwrap_or(0), Reason::Truncated));
    }
    let ordered = in_order(&model);
    let diff = diff_tree(&store.state, expected(&ordered, last), u64::MAX)?;
    let mut report = ReindexReport::from_diff(tip.entries, diff);
    if opts.repair && report.differences > 0 {
        replace_state(&store, &model, &ordered, last)?;
        let after = diff_tree(&store.state, expected(&ordered, last), 1)?;
        if after.differences > 0 {
            return Err(Error::integrity(
                last.unwrap_or(0),
                Reason::IndexMismatch("the state tree differs after its repair".into()),
            ));
        }
        report.repaired = true;
    }
    Ok(report)
}

/// Makes the state tree exactly `model` (`ordered`: the same, in order)
/// plus the marker, in one sled batch (atomic across a crash), then makes
/// it durable.
fn replace_state(
    store: &Store,
    model: &Model,
    ordered: &[(&[u8], &[u8])],
    applied: Option<u64>,
) -> Result<()> {
    let mut batch = sled::Batch::default();
    for kv in store.state.iter() {
        let (k, _) = kv?;
        let wanted = k.as_ref() == state::APPLIED && applied.is_some();
        if !wanted && !model.contains_key(k.as_ref()) {
            batch.remove(k);
        }
    }
    for (k, v) in expected(ordered, applied) {
        if store.state.get(&k)?.as_deref() != Some(v.as_slice()) {
            batch.insert(k, v);
        }
    }
    store.state.apply_batch(batch)?;
    store.sync()?;
    tracing::warn!("replaced the derived state with the one rebuilt from the log");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rebuilt state comes out in the tree's order, the `applied`
    /// marker merged in its place among the keys, and without it when
    /// there is none.
    #[test]
    fn the_expected_state_is_in_the_tree_s_order_with_its_marker() {
        let model: Model = [&b"s/b"[..], b"apple", b"applies", b"ab", b"g/x"]
            .iter()
            .map(|k| (k.to_vec(), k.to_ascii_uppercase()))
            .collect();
        let ordered = in_order(&model);
        let keys = |applied| -> Vec<Vec<u8>> {
            expected(&ordered, applied)
                .map(|(k, v)| {
                    if k != state::APPLIED {
                        assert_eq!(v, k.to_ascii_uppercase());
                    }
                    k
                })
                .collect()
        };
        let with: Vec<&[u8]> = vec![b"ab", b"apple", b"applied", b"applies", b"g/x", b"s/b"];
        assert_eq!(keys(Some(7)), with);
        let without: Vec<&[u8]> = vec![b"ab", b"apple", b"applies", b"g/x", b"s/b"];
        assert_eq!(keys(None), without);
        let marker = expected(&ordered, Some(7)).find(|(k, _)| k == state::APPLIED);
        assert_eq!(
            marker,
            Some((state::APPLIED.to_vec(), 7u64.to_be_bytes().to_vec()))
        );
    }
}
