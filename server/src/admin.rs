//! What `vault-admin`'s log tools do, as library functions: `audit` (the
//! log's events as JSON lines), `export` (a signed, portable log file)
//! and the atomic file writing they need. Each works online, over the
//! protocol with a [`Client`], or offline on a stopped vault's data dir.
//!
//! ```text
//! online:  Entries pages ──┐                       ┌─> AuditFilter::line ─> JSON lines
//!          Heads ──────────┴─> StreamCheck ──┬─────┘
//! offline: log chunks ─────────────────────> └─> ExportWriter ─> temp file ─fsync─> rename
//! ```
//!
//! Neither needs a secret: audit payloads are plain JSON, records are
//! shown as metadata only (never their ciphertext), and an export holds
//! the log as it is stored (records stay encrypted in it).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use client::{Client, ClientError};
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Value};
use storage::chunk::Chunk;
use storage::entry::EntryRef;
use storage::export::ExportWriter;
use storage::verify::{Hashed, StreamCheck};
use storage::{Kind, Reason, SignedHead};
use tokio::sync::mpsc;

use crate::{Error, Result};

/// Entries asked for per `Entries` request by `audit` and `export`.
pub const PAGE_ENTRIES: u32 = 1_000;

/// Which entries `audit` prints.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// First seq looked at.
    pub from_seq: u64,
    /// Only these kinds (empty: every kind but records, unless
    /// `include_records`).
    pub kinds: Vec<Kind>,
    /// Only entries of this subject.
    pub subject: Option<String>,
    /// At most this many lines.
    pub limit: Option<u64>,
    /// Records too, as metadata only.
    pub include_records: bool,
}

impl AuditFilter {
    /// Checks the filter: asking for the `record` kind needs
    /// `include_records`, which says that record metadata may be shown.
    pub fn validate(&self) -> Result<()> {
        if self.kinds.contains(&Kind::Record) && !self.include_records {
            return Err(Error::Usage(
                "--kind record lists personal-data records: add --include-records".into(),
            ));
        }
        Ok(())
    }

    /// The JSON line of `e`, or `None` when the filter leaves it out.
    ///
    /// Every kind but records: `{"seq","timestamp_ms","kind","subject",
    /// "payload"}` with the payload parsed (`null` and `"encrypted":true`
    /// for an event whose payload is not plain). Records, with
    /// `include_records`: `{"seq","timestamp_ms","kind":"record",
    /// "subject","key_version"}`, never the ciphertext.
    pub fn line(&self, e: &EntryRef<'_>) -> Option<Value> {
        if e.seq < self.from_seq {
            return None;
        }
        if e.kind == Kind::Record && !self.include_records {
            return None;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&e.kind) {
            return None;
        }
        if self.subject.as_deref().is_some_and(|s| s != e.subject) {
            return None;
        }
        let mut line = json!({
            "seq": e.seq,
            "timestamp_ms": e.timestamp_ms,
            "kind": e.kind.name(),
            "subject": e.subject,
        });
        if e.kind == Kind::Record {
            line["key_version"] = json!(e.key_version);
        } else if e.key_version != 0 {
            line["payload"] = Value::Null;
            line["encrypted"] = json!(true);
        } else {
            line["payload"] = serde_json::from_slice(e.payload).unwrap_or(Value::Null);
        }
        Some(line)
    }
}

/// The client certificate (the SHA-256 of its DER, hex) that holds each
/// of `credentials`, if one does, as its `credential_created` entry says:
/// the credentials' list does not carry it. One `Entries` request of one
/// entry per credential, pipelined on `client`'s connection (an admin's or
/// an auditor's), [`HOLDER_READS_IN_FLIGHT`] at a time, so that each
/// request's timeout runs from when it is sent, not from when a long
/// list was queued. An entry at a credential's seq that is not its creation
/// is refused as an unexpected answer. What the entries say is the log's
/// word: `vault-verify --remote` proves the log.
pub async fn certificate_holders(
    client: &Client,
    credentials: &[client::CredentialInfo],
) -> Result<Vec<Option<String>>> {
    let reads = credentials.iter().map(|c| async move {
        let entries = client.entries(c.created_seq, 1).await?;
        let created = entries.first().and_then(|bytes| {
            let e = EntryRef::decode(bytes).ok()?;
            if e.kind != Kind::CredentialCreated || e.seq != c.created_seq {
                return None;
            }
            let payload: storage::state::CredentialCreated =
                serde_json::from_slice(e.payload).ok()?;
            (payload.id == c.id).then_some(payload)
        });
        match created {
            Some(p) => Ok(p.client_cert_sha256),
            None => Err(Error::Client(ClientError::UnexpectedResponse(
                "an entry at a credential's seq that is not its creation",
            ))),
        }
    });
    use futures_util::{StreamExt as _, TryStreamExt as _};
    futures_util::stream::iter(reads)
        .buffered(HOLDER_READS_IN_FLIGHT)
        .try_collect()
        .await
}

/// [`certificate_holders`]' requests in flight: the protocol's 64 per
/// connection, less room for the caller's own.
pub const HOLDER_READS_IN_FLIGHT: usize = 32;

/// The seq after `seq`. None follows `u64::MAX`: an entry there comes
/// from a hostile server or a damaged dir, and the scan ends on it.
fn seq_after(seq: u64) -> Result<u64> {
    seq.checked_add(1).ok_or_else(|| {
        storage::Error::Integrity {
            seq,
            reason: Reason::Malformed("no seq follows u64::MAX".into()),
        }
        .into()
    })
}

/// Prints the entries the filter selects, in log order, through `out`;
/// returns how many. Stops at the limit or the end of the log (the entries
/// durable when each page was asked for). Auditor or admin role.
pub async fn audit_remote(
    client: &Client,
    filter: &AuditFilter,
    mut out: impl FnMut(&Value) -> Result<()>,
) -> Result<u64> {
    let mut printed = 0u64;
    let mut from = filter.from_seq;
    loop {
        let page = client.entries(from, PAGE_ENTRIES).await?;
        if page.is_empty() {
            return Ok(printed);
        }
        for bytes in &page {
            let e = EntryRef::decode(bytes)?;
            if e.seq != from {
                return Err(storage::Error::Integrity {
                    seq: from,
                    reason: Reason::Reordered,
                }
                .into());
            }
            from = seq_after(e.seq)?;
            if filter.limit.is_some_and(|l| printed >= l) {
                return Ok(printed);
            }
            if let Some(line) = filter.line(&e) {
                out(&line)?;
                printed += 1;
            }
        }
        if filter.limit.is_some_and(|l| printed >= l) {
            return Ok(printed);
        }
    }
}

/// [`audit_remote`] on the stopped vault in `dir`, reading its chunks;
/// without writing to `dir` when `read_only` asks, or when `dir` cannot be
/// written ([`crate::verify::open_data_dir`]).
pub fn audit_local(
    dir: &Path,
    filter: &AuditFilter,
    read_only: bool,
    mut out: impl FnMut(&Value) -> Result<()>,
) -> Result<(u64, crate::verify::Opened)> {
    let (store, opened, _scratch) = crate::verify::open_data_dir(
        read_only,
        || storage::RawStore::open(dir),
        |scratch| storage::RawStore::open_read_only(dir, scratch),
    )?;
    let printed = audit_store(&store, filter, &mut out)?;
    // Closed before its scratch dir goes.
    drop(store);
    Ok((printed, opened))
}

/// Prints the events of an opened store's log that `filter` selects.
fn audit_store(
    store: &storage::RawStore,
    filter: &AuditFilter,
    mut out: impl FnMut(&Value) -> Result<()>,
) -> Result<u64> {
    let mut printed = 0u64;
    let start = match store
        .log
        .range(..=filter.from_seq.to_be_bytes())
        .next_back()
    {
        Some(kv) => kv?.0,
        None => return Ok(0),
    };
    let mut next: Option<u64> = None;
    for kv in store.log.range(start..) {
        let (_, v) = kv?;
        let seq = next.unwrap_or(0);
        let chunk = Chunk::decode(&v).map_err(|_| storage::Error::Integrity {
            seq,
            reason: Reason::CrcMismatch,
        })?;
        for bytes in chunk.entries {
            let e = EntryRef::decode(bytes)?;
            if next.is_some_and(|n| n != e.seq) {
                return Err(storage::Error::Integrity {
                    seq,
                    reason: Reason::Reordered,
                }
                .into());
            }
            next = Some(seq_after(e.seq)?);
            if filter.limit.is_some_and(|l| printed >= l) {
                return Ok(printed);
            }
            if let Some(line) = filter.line(&e) {
                out(&line)?;
                printed += 1;
            }
        }
    }
    Ok(printed)
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub entries: u64,
    pub heads: u64,
    /// How the data dir was opened, for an offline export.
    pub opened: Option<crate::verify::Opened>,
}

/// A file written atomically: filled as a temporary file beside its
/// path, then [`AtomicFile::commit`] fsyncs it, renames it over the path
/// and fsyncs the directory. Dropped without a commit, the temporary file
/// is removed and the path left as it was: a reader sees the old file or
/// the whole new one, never a part.
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
    dir: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file in `path`'s directory.
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let dir = dir_of(path).to_path_buf();
        let tmp = tempfile::Builder::new()
            .prefix(".vault-export-")
            .tempfile_in(&dir)
            .map_err(|source| file_error(&dir, source))?;
        Ok(AtomicFile {
            tmp,
            path: path.to_path_buf(),
            dir,
        })
    }

    /// A buffered writer into the temporary file.
    pub fn writer(&self) -> BufWriter<&File> {
        BufWriter::new(self.tmp.as_file())
    }

    /// A buffered writer into the temporary file, emptied first: for a
    /// second try after one that failed part way.
    pub fn rewriter(&self) -> std::io::Result<BufWriter<&File>> {
        use std::io::{Seek, SeekFrom};
        let mut f = self.tmp.as_file();
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        Ok(BufWriter::new(f))
    }

    /// Makes the file durable under its path.
    pub fn commit(self) -> Result<()> {
        let AtomicFile { tmp, path, dir } = self;
        tmp.as_file()
            .sync_all()
            .map_err(|source| file_error(&path, source))?;
        tmp.persist(&path).map_err(|e| file_error(&path, e.error))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| file_error(&dir, source))?;
        Ok(())
    }
}

/// The directory a file at `path` is in, where its temporary file goes
/// and which is synced after the rename: its parent, or `.` for a bare
/// file name.
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn file_error(path: &Path, source: std::io::Error) -> Error {
    Error::File {
        path: path.display().to_string(),
        error: source,
    }
}

/// Flushes a writer of the temporary file.
fn flush(w: BufWriter<&File>) -> Result<()> {
    w.into_inner()
        .map_err(|e| file_error(Path::new("export"), e.into_error()))?;
    Ok(())
}

/// Exports the stopped vault in `dir` to `out` (see
/// [`storage::export::export_dir`]), atomically; without writing to `dir`
/// when `read_only` asks, or when `dir` cannot be written
/// ([`crate::verify::open_data_dir`]).
pub fn export_local(
    dir: &Path,
    out: &Path,
    key: Option<VerifyingKey>,
    read_only: bool,
) -> Result<Exported> {
    let file = AtomicFile::create(out)?;
    let ((w, entries, heads), opened, _scratch) = crate::verify::open_data_dir(
        read_only,
        || storage::export::export_dir(dir, file.writer(), key),
        |scratch| storage::export::export_dir_read_only(dir, scratch, file.rewriter()?, key),
    )?;
    flush(w)?;
    file.commit()?;
    Ok(Exported {
        entries,
        heads,
        opened: Some(opened),
    })
}

/// Exports the log a running vault serves, up to the signed head it
/// presents first, to `out`, atomically: entries in pages, and the commit
/// groups' signed heads from `Heads` (as `vault-verify --remote` gets
/// them). Everything is checked on the way
/// with `key` (the pinned key, or else the one the server reports): an
/// integrity failure stops the export and leaves `out` untouched.
pub async fn export_remote(
    client: Arc<Client>,
    key: Option<VerifyingKey>,
    out: &Path,
) -> Result<Exported> {
    let info = client.head().await?;
    let key = match key {
        Some(k) if k.to_bytes() != info.public_key => {
            return Err(Error::Usage(format!(
                "the server's public key {} is not the pinned key",
                hex::encode(info.public_key)
            )))
        }
        Some(k) => k,
        None => VerifyingKey::from_bytes(&info.public_key)
            .map_err(|_| Error::Usage("the server reports an invalid public key".into()))?,
    };
    let Some(head) = info.signed_head else {
        return Err(Error::Usage("the vault's log is empty".into()));
    };
    let target = head.last_seq.saturating_add(1);
    let (page_tx, mut pages) = mpsc::channel(2);
    let (head_tx, mut heads) = mpsc::channel(crate::remote::HEADS_AHEAD);
    let _tasks = crate::remote::Tasks(vec![
        tokio::spawn(crate::remote::fetch_pages(
            client.clone(),
            target,
            PAGE_ENTRIES,
            page_tx,
        )),
        tokio::spawn(crate::remote::fetch_group_heads(
            client.clone(),
            target,
            head_tx,
        )),
    ]);
    let file = AtomicFile::create(out)?;
    let mut first_writer = Some(file.writer());
    let mut walk = StreamCheck::new(key);
    let mut writer: Option<ExportWriter<BufWriter<&File>>> = None;
    let mut group: Option<SignedHead> = None;
    while walk.next_seq() < target {
        let page = match pages.recv().await {
            Some(Ok(p)) => p,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::Closed.into()),
        };
        if page.is_empty() {
            return Err(integrity(walk.next_seq(), Reason::Truncated));
        }
        let entries: Vec<&[u8]> = page.iter().map(Vec::as_slice).collect();
        for entry in Hashed::all(&entries) {
            let bytes = entry.bytes();
            let seq = walk.next_seq();
            if group.is_none() {
                let h = crate::remote::next_group_head(&mut heads, seq)
                    .await?
                    .map_err(|(seq, reason)| integrity(seq, reason))?;
                group = Some(h);
            }
            walk.hashed_entry(&entry).map_err(storage::Error::from)?;
            let w = match &mut writer {
                Some(w) => w,
                None => {
                    // Entry 0 passed the walk: its genesis names the vault.
                    let id = walk
                        .genesis()
                        .and_then(|g| hex::decode(&g.vault_id).ok())
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .ok_or_else(|| integrity(0, Reason::BadGenesis("vault id".into())))?;
                    let out = first_writer
                        .take()
                        .ok_or_else(|| integrity(seq, Reason::Reordered))?;
                    writer.insert(ExportWriter::new(out, &id)?)
                }
            };
            w.entry(bytes)?;
            if let Some(h) = group.take_if(|h| h.last_seq == seq) {
                walk.head(&h).map_err(storage::Error::from)?;
                w.head(&h)?;
            }
        }
    }
    walk.finish().map_err(storage::Error::from)?;
    if walk.tip().head != Some(head) {
        return Err(integrity(head.last_seq, Reason::HeadMismatch));
    }
    let writer = writer.ok_or_else(|| integrity(0, Reason::Truncated))?;
    let (w, entries, heads) = writer.finish()?;
    flush(w)?;
    drop(first_writer);
    file.commit()?;
    Ok(Exported {
        entries,
        heads,
        opened: None,
    })
}

fn integrity(seq: u64, reason: Reason) -> Error {
    storage::Error::Integrity { seq, reason }.into()
}
