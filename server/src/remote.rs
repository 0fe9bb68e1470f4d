//! `vault-verify --remote`: verify a running vault over the wire protocol,
//! with nothing but its pinned public key and an auditor (or admin) API key.
//!
//! ```text
//!            ┌─ head() ───────────────── signed head H (the target: seqs 0..=H.last_seq)
//!  Client ───┼─ entries(from, page) ──> page task ──(2 pages)──┐
//!  (one      └─ heads(from, 1000) ───> head task ──(1,024)─────┼─> walk (this task):
//!   connection,  the groups' signed heads in order,            │   ChainCheck, check_group,
//!   pipelined)   next from = last head's last_seq + 1          │   check_entry_content
//!                                                              └─ then proof(random seqs)
//! ```
//!
//! The `Entries` answer carries entries only, not the heads that close
//! their commit groups, so the group heads come from `Heads`, a thousand
//! per request: the head task reads them ahead of the entries, and the
//! walk checks every entry and closes each group with its head through
//! `storage::verify::StreamCheck`, which runs the same pure functions as
//! the local scan (`ChainCheck`, `check_group`, `check_entry_content`,
//! `check_genesis_key`) and also checks export files (`vault-verify
//! --file`): the group's fields, its Merkle root over the entries served,
//! and its signature under the key chain from the pinned key. A head the
//! server made up or moved fails there like a forged entry. Receipts
//! (`Proof`) are asked for a few random seqs only, after the walk, to
//! check that the server's proofs agree with the log it served.
//!
//! Memory is bounded by four pages of entries at most (two waiting in the
//! channel, one being received, one being checked), 1,024 heads and one
//! answer of `Heads`, and the entry hashes of one commit group (32 bytes per
//! entry; a group holds up to `max_group_entries`, 1,024 by default, and
//! more only when one request alone is larger). The whole log is never
//! held.
//!
//! Cost: the entries' pages and one `Heads` round trip per thousand
//! groups, overlapped; the server reads its log twice (once for the
//! entries, once for the heads) and hashes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, ClientConfig, ClientError, ErrorCode, KeyChain, Receipt};
use ed25519_dalek::VerifyingKey;
use storage::verify::{Failure, Hashed, StreamCheck};
use storage::{Hash, Reason, Report, SignedHead};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Result;

/// Default entries asked for per `Entries` request. The server caps a
/// request at 10,000; 1,000 entries of at most 48 KiB keep a page, which
/// the client collects whole, under 50 MiB.
pub const DEFAULT_PAGE_ENTRIES: u32 = 1_000;
/// Default number of random entries whose receipts are checked besides
/// the one per commit group.
pub const DEFAULT_SAMPLE_RECEIPTS: usize = 8;

/// Pages fetched ahead of the walk.
const PAGES_AHEAD: usize = 2;
/// Group heads fetched ahead of the walk.
pub(crate) const HEADS_AHEAD: usize = 1024;
/// Heads asked for per `Heads` request: the server's cap.
const HEADS_PER_REQUEST: u32 = crate::serve::MAX_HEADS_PER_REQUEST as u32;

/// Options of [`verify_remote`].
pub struct RemoteOptions<'a> {
    /// Where and how to connect; the key's role must be auditor or admin.
    pub client: ClientConfig,
    /// The pinned public key: the only thing trusted.
    pub public_key: VerifyingKey,
    /// Entries asked for per request (at least 1).
    pub page_entries: u32,
    /// Receipts of random entries to check besides the group ones.
    pub sample_receipts: usize,
    /// Called with the number of entries checked so far.
    pub progress: Option<&'a (dyn Fn(u64) + Sync)>,
    /// Called once with the number of entries to check.
    pub total_hint: Option<&'a (dyn Fn(u64) + Sync)>,
    /// A head kept from an earlier verification (`vault-verify
    /// --head-file`): the served log must still hold its entry, with its
    /// hash, under a key of the log's chain
    /// ([`storage::verify::check_kept_head`]).
    pub kept_head: Option<SignedHead>,
}

impl std::fmt::Debug for RemoteOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOptions")
            .field("client", &self.client)
            .field("public_key", &hex::encode(self.public_key.as_bytes()))
            .field("page_entries", &self.page_entries)
            .field("sample_receipts", &self.sample_receipts)
            .finish_non_exhaustive()
    }
}

/// The outcome of a remote verification that ran.
#[derive(Debug, Clone)]
pub struct RemoteReport {
    /// What the local mode reports too: entries, last hash, signed head,
    /// the first failure, shredded subjects. `used_stored_key` is always
    /// false (the key is pinned) and `unindexed` 0 (no derived state is
    /// seen over the wire).
    pub report: Report,
    /// The address verified.
    pub addr: String,
    /// Receipts of random entries checked (`sample_receipts`, fewer for
    /// a shorter log, plus the kept head's entry); the groups are closed
    /// by their heads.
    pub receipts_checked: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl RemoteReport {
    pub fn ok(&self) -> bool {
        self.report.ok()
    }
}

/// Aborts the helper tasks when the walk ends, however it ends.
pub(crate) struct Tasks(pub(crate) Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Verifies the log a live server serves, up to the signed head it
/// presents first (appends that continue meanwhile are not looked at).
///
/// `Err` means the check could not run: unreachable, TLS, a key the server
/// refuses or whose role may not read the log, a timeout, or frames that
/// do not decode. Everything the server says that contradicts its signed
/// head or the pinned key is an integrity failure in the report.
pub async fn verify_remote(opts: &RemoteOptions<'_>) -> Result<RemoteReport> {
    let started = Instant::now();
    let addr = opts.client.addr.clone();
    let client = Arc::new(Client::connect(opts.client.clone()).await?);
    let mut out = RemoteReport {
        report: Report::default(),
        addr,
        receipts_checked: 0,
        elapsed: Duration::ZERO,
    };
    let outcome = run(&client, opts, &mut out).await;
    out.elapsed = started.elapsed();
    match outcome {
        Ok(Ok(())) => Ok(out),
        Ok(Err(failure)) => {
            out.report.failure = Some(failure);
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// The head, then the walk. `Ok(Err(_))` is an integrity failure.
async fn run(
    client: &Arc<Client>,
    opts: &RemoteOptions<'_>,
    out: &mut RemoteReport,
) -> Result<std::result::Result<(), Failure>> {
    let key = &opts.public_key;
    let info = match client.head().await {
        Ok(info) => info,
        // The head does not verify even under the key the server names.
        Err(ClientError::BadReceipt(_)) => return Ok(Err((0, Reason::BadSignature))),
        // The endorsements it sends with it do not make a chain.
        Err(ClientError::BadKeyChain(e)) => {
            return Ok(Err((0, Reason::KeyMismatch(e.to_string()))))
        }
        Err(e) => return Err(e.into()),
    };
    if info.public_key != key.to_bytes() {
        return Ok(Err((
            0,
            Reason::MetaMismatch(format!(
                "the server's public key {} is not the pinned key",
                hex::encode(info.public_key)
            )),
        )));
    }
    let Some(head) = info.signed_head else {
        return Ok(Err((0, Reason::BadGenesis("empty log".into()))));
    };
    // The server's key chain, checked from the pinned key; the walk
    // rebuilds it from the log and must find the same endorsements. Asked
    // for whatever key signed the head: the group of the first rotation
    // is signed by key 0 and holds an endorsement all the same.
    let served_chain = match client.key_chain(key.as_bytes()).await {
        Ok(c) => c,
        Err(ClientError::BadKeyChain(e)) => {
            return Ok(Err((0, Reason::KeyMismatch(e.to_string()))))
        }
        Err(e) => return Err(e.into()),
    };
    if !served_chain.verify_head(&head) {
        return Ok(Err((head.last_seq, Reason::BadSignature)));
    }
    let target = head.last_seq.saturating_add(1);
    if let Some(total) = opts.total_hint {
        total(target);
    }
    out.report.signed_head = Some(head);

    let (page_tx, mut pages) = mpsc::channel(PAGES_AHEAD);
    let (head_tx, mut heads) = mpsc::channel(HEADS_AHEAD);
    let _tasks = Tasks(vec![
        tokio::spawn(fetch_pages(
            client.clone(),
            target,
            opts.page_entries.max(1),
            page_tx,
        )),
        tokio::spawn(fetch_group_heads(client.clone(), target, head_tx)),
    ]);
    let mut samples = sample_seqs(target, opts.sample_receipts);
    // The kept head's entry is read on the walk like a sample's.
    if let Some(kept) = opts.kept_head.filter(|k| k.last_seq < target) {
        samples.insert(kept.last_seq);
    }
    let mut sampled: Vec<(u64, Hash, SignedHead)> = Vec::new();

    let mut walk = StreamCheck::new(*key);
    // The head of the open group.
    let mut group: Option<SignedHead> = None;
    let outcome = walk_entries(
        &mut walk,
        &mut group,
        (&mut pages, &mut heads),
        target,
        &samples,
        &mut sampled,
        (opts, &mut *out),
    )
    .await;
    out.report.shredded = walk.shredded().to_vec();
    match outcome {
        Ok(Ok(())) => {}
        failed => return failed,
    }
    // The last group must be the one the signed head closes.
    let tip = walk.tip();
    if group.is_some() || tip.head != Some(head) || tip.last_hash != Some(head.last_hash) {
        return Ok(Err((head.last_seq, Reason::HeadMismatch)));
    }
    out.report.entries = tip.entries;
    out.report.head = tip.last_hash;
    let walked = walk.keys().endorsements();
    if served_chain.endorsements().get(..walked.len()) != Some(walked) {
        return Ok(Err((
            head.last_seq,
            Reason::KeyMismatch("the served key chain is not the log's".into()),
        )));
    }
    out.report.signing_keys = walked.to_vec();

    for &(seq, hash, group_head) in &sampled {
        let r = match client.proof(seq).await {
            Ok(r) => r,
            Err(ClientError::Server {
                code: ErrorCode::NotFound,
                ..
            }) => return Ok(Err((seq, Reason::Truncated))),
            Err(e) => return Err(e.into()),
        };
        if let Err(f) = check_receipt(&r, &hash, walk.keys()) {
            return Ok(Err(f));
        }
        if r.head != group_head {
            return Ok(Err((
                seq,
                Reason::BadReceipt("signed by another head than its group's".into()),
            )));
        }
        out.receipts_checked += 1;
    }
    if let Some(kept) = &opts.kept_head {
        let hash = sampled
            .iter()
            .find(|(seq, _, _)| *seq == kept.last_seq)
            .map(|(_, hash, _)| *hash);
        if let Some(r) = storage::verify::check_kept_head(kept, walk.keys(), head.last_seq, hash) {
            return Ok(Err((kept.last_seq, r)));
        }
    }
    Ok(Ok(()))
}

type Pages = mpsc::Receiver<std::result::Result<Vec<Vec<u8>>, ClientError>>;
/// The groups' heads in order; `Ok(None)` when the server has no more
/// below the target.
pub(crate) type Heads = mpsc::Receiver<std::result::Result<Option<SignedHead>, ClientError>>;

/// The head of the group that starts at `seq`, the next from `heads`:
/// `Ok(Err(_))` when the server has none (`truncated`) or one that does
/// not start there (`head_mismatch`).
pub(crate) async fn next_group_head(
    heads: &mut Heads,
    seq: u64,
) -> Result<std::result::Result<SignedHead, Failure>> {
    let h = match heads.recv().await {
        Some(Ok(Some(h))) => h,
        Some(Ok(None)) => return Ok(Err((seq, Reason::Truncated))),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ClientError::Closed.into()),
    };
    if h.group_first_seq != seq || h.last_seq < seq {
        return Ok(Err((seq, Reason::HeadMismatch)));
    }
    Ok(Ok(h))
}

/// The walk over the entries `0..target`: each entry through the stream
/// check, each group closed by its signed head.
#[allow(clippy::too_many_arguments)]
async fn walk_entries(
    walk: &mut StreamCheck,
    group: &mut Option<SignedHead>,
    (pages, heads): (&mut Pages, &mut Heads),
    target: u64,
    samples: &BTreeSet<u64>,
    sampled: &mut Vec<(u64, Hash, SignedHead)>,
    (opts, out): (&RemoteOptions<'_>, &mut RemoteReport),
) -> Result<std::result::Result<(), Failure>> {
    while walk.next_seq() < target {
        let page = match pages.recv().await {
            Some(Ok(page)) => page,
            Some(Err(e)) => return Err(e.into()),
            // The reader ended without a word: only if it panicked.
            None => return Err(ClientError::Closed.into()),
        };
        if page.is_empty() {
            // The server signed a head it cannot serve the entries of.
            return Ok(Err((walk.next_seq(), Reason::Truncated)));
        }
        let entries: Vec<&[u8]> = page.iter().map(Vec::as_slice).collect();
        for entry in Hashed::all(&entries) {
            let expected = walk.next_seq();
            let hash = match walk.hashed_entry(&entry) {
                Ok(h) => h,
                Err(f) => return Ok(Err(f)),
            };
            if group.is_none() {
                match next_group_head(heads, expected).await? {
                    Ok(h) => *group = Some(h),
                    Err(f) => return Ok(Err(f)),
                }
            }
            if let Some(h) = *group {
                if samples.contains(&expected) {
                    sampled.push((expected, hash, h));
                }
                if h.last_seq == expected {
                    *group = None;
                    if let Err(f) = walk.head(&h) {
                        return Ok(Err(f));
                    }
                    out.report.groups += 1;
                }
            }
        }
        if let Some(progress) = opts.progress {
            progress(walk.next_seq());
        }
    }
    Ok(Ok(()))
}

/// A receipt verifies with the key chain from the pinned key and names
/// the hash of the entry that was served at its seq.
fn check_receipt(r: &Receipt, served: &Hash, keys: &KeyChain) -> std::result::Result<(), Failure> {
    if let Err(e) = r.verify_chain(keys) {
        return Err((r.seq, Reason::BadReceipt(e.to_string())));
    }
    if &r.entry_hash != served {
        return Err((
            r.seq,
            Reason::BadReceipt("names another entry hash than the entry served".into()),
        ));
    }
    Ok(())
}

/// Pages of entries `0..target`, in order, until the target or an error.
pub(crate) async fn fetch_pages(
    client: Arc<Client>,
    target: u64,
    page: u32,
    tx: mpsc::Sender<std::result::Result<Vec<Vec<u8>>, ClientError>>,
) {
    let mut from = 0u64;
    while from < target {
        let max = u32::try_from(target - from).map_or(page, |left| left.min(page));
        let got = client.entries(from, max).await;
        let stop = match &got {
            Ok(entries) => entries.is_empty(),
            Err(_) => true,
        };
        if let Ok(entries) = &got {
            from += entries.len() as u64;
        }
        if tx.send(got).await.is_err() || stop {
            return;
        }
    }
}

/// The signed head of each commit group below `target`, in order: the
/// group starting at 0, then at each head's `last_seq + 1`, a thousand per
/// `Heads` request; `Ok(None)` when the server has no head from a seq
/// below the target on.
pub(crate) async fn fetch_group_heads(
    client: Arc<Client>,
    target: u64,
    tx: mpsc::Sender<std::result::Result<Option<SignedHead>, ClientError>>,
) {
    let mut start = 0u64;
    while start < target {
        let heads = match client.heads(start, HEADS_PER_REQUEST).await {
            Ok(heads) => heads,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if heads.is_empty() {
            let _ = tx.send(Ok(None)).await;
            return;
        }
        for h in heads {
            // A head that does not move forward is refused by the walk;
            // stop here rather than ask for the same group again.
            let forward = h.last_seq >= start;
            start = h.last_seq.saturating_add(1);
            if tx.send(Ok(Some(h))).await.is_err() || !forward || start >= target {
                return;
            }
        }
    }
}

/// Up to `n` distinct seqs below `target`, drawn from the OS's random
/// source so that a server cannot tell in advance which entries will be
/// asked to prove themselves.
fn sample_seqs(target: u64, n: usize) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    if target == 0 {
        return out;
    }
    let want = u64::try_from(n).unwrap_or(u64::MAX).min(target);
    let mut tries = 0u64;
    while (out.len() as u64) < want && tries < want.saturating_mul(16) {
        tries += 1;
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            break;
        }
        out.insert(u64::from_be_bytes(b) % target);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_distinct_and_below_the_target() {
        assert!(sample_seqs(0, 8).is_empty());
        let s = sample_seqs(3, 8);
        assert!(s.len() <= 3 && s.iter().all(|&k| k < 3));
        let s = sample_seqs(1_000_000, 8);
        assert!(s.len() <= 8 && s.iter().all(|&k| k < 1_000_000));
        assert!(!s.is_empty());
    }
}
