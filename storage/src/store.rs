//! The sled database under a data dir, its trees, and durable flushing.
//!
//! ```text
//! DIR/db/        sled's files (conf, db, snap.*)
//! DIR/chunks     the log's chunks (see `logfile`)
//! trees:
//!   log     u64 BE first seq -> where the chunk lies in DIR/chunks
//!   state   derived state (see `state`)
//!   keys    "master" -> sealed master key, "signing/" id -> wrapped signing
//!           key, "dk/" subject 0x00 version -> wrapped subject data key,
//!           "pending" -> the new keys of the last group that created any,
//!           "shredding", "rotating" and "next/" name -> a shred's or master
//!           rotation's marker and staged keys, "mask" -> the wrapped
//!           masking secret (see `vault`)
//!   meta    "format" -> u32 BE 2, "vault_id" -> 16 B, "public_key" -> 32 B
//! ```
//!
//! Durability: sled 0.34's `flush()` writes its buffers and ends in
//! `sync_file_range`, which neither flushes the drive cache nor syncs
//! metadata. `Store::sync` therefore follows every flush with
//! `fdatasync` on sled's data file through a handle of our own (after an
//! `fdatasync` of the chunks file, so that chunks are durable before the
//! pointers that name them), and the
//! directory is fsynced after the files are created. Sled is opened with
//! 16 MiB segments so that no tree node is ever written to a separate blob
//! file (which sled writes without syncing): see `chunk::CHUNK_TARGET_BYTES`.
//!
//! Cleaning: sled 0.34 writes a whole node in place of the old one every
//! 10 updates linked to it and at each split, so its segments soon hold
//! more superseded bytes than live ones; a segment at most half live is
//! cleaned by moving its live pages elsewhere, after which it is reused.
//! Sled moves one such page each time a node is rewritten, on the thread
//! that writes (the vault's writer), and more from its flusher thread. A
//! vault that serves (`Flusher::Running`: `Vault::create`, and
//! `Vault::open` once the log has verified) runs that thread every 500 ms
//! (`FLUSH_EVERY_MS`): it writes sled's buffer, moves pages for up to half
//! the interval, and fsyncs sled's file. Durability does not rest on it
//! (the write-ahead file and `Store::sync` do that); without it a log
//! filled in large batches left its half-empty segments to the appends
//! after the fill, on the writer's thread (`docs/benchmarks.md`, "Sled's
//! flusher"). Tools that open a closed vault (verify, export, reindex)
//! run without it (`Flusher::Off`).
//!
//! Memory: sled 0.34 bounds its cache only for pages it has accounted for,
//! and accounts lazily. Each page access goes into one of 256 shards'
//! queues of 64, and a shard evicts only when its queue fills. A page read
//! once (a scan's leaf) can wait behind 16,384 accesses, so a scan of a
//! 10^7-entry log held all of it (6.6 GB) when sled held the chunks,
//! whatever the cache's capacity, and scans then read each key 16 more
//! times to fill the queues. Now a leaf of the `log` tree holds at most 17
//! pointers of 12 bytes, so 16,384 leaves waiting to be accounted for are
//! a few MB, and scans read each pointer once. The chunks themselves are
//! read from their file, through the kernel's page cache.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use bytes::Bytes;

use ed25519_dalek::VerifyingKey;

use crate::error::{Error, Reason, Result};
use crate::logfile::LogTree;
use crate::state::{self, Genesis};

/// Names of the trees a vault holds.
pub(crate) const TREES: [&[u8]; 4] = [b"log", b"state", b"keys", b"meta"];
/// Format version of the data dir.
pub const FORMAT: u32 = 2;
const SEGMENT_SIZE: usize = 16 * 1024 * 1024;
/// The interval of sled's flusher thread, when it runs (sled's default).
pub(crate) const FLUSH_EVERY_MS: u64 = 500;

/// Whether sled's flusher thread runs (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flusher {
    /// Every [`FLUSH_EVERY_MS`]: a vault that serves.
    Running,
    /// Not at all: tools that open a closed vault, and the open's own
    /// verification scan.
    Off,
}

/// The open database of a vault.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) db: sled::Db,
    pub(crate) log: LogTree,
    pub(crate) state: sled::Tree,
    pub(crate) keys: sled::Tree,
    pub(crate) meta: sled::Tree,
    data_file: File,
    /// The `fdatasync`s of `data_file`, as of the chunks file's.
    data_syncs: crate::logfile::StickySync,
    pub(crate) dir: PathBuf,
    /// Log chunks in the write-ahead file that the writer has not applied
    /// to the `log` tree yet, by first seq: it applies them in batches
    /// (`vault::Writer`), and only ever after every chunk before them.
    /// Readers of a live log go through [`Store::chunk_at`] and
    /// [`Store::chunks_from`], which look here first and then in sled; the
    /// writer inserts a batch into sled before it removes the batch from
    /// here, so every chunk is always in one or the other.
    pub(crate) recent: RwLock<BTreeMap<u64, Bytes>>,
    /// Held by [`Store::apply_recent`] from its read of `recent` to its
    /// removal there: the writer and the indexer both call it, and a chunk
    /// applied twice would lie twice in the chunks file.
    applying: std::sync::Mutex<()>,
    /// Set by [`Store::open_read_only`]: the shared lock it holds on the
    /// data dir's sled file (so no vault opens the dir meanwhile).
    read_only: Option<File>,
}

/// The marker of a vault's creation that has not finished: made (with
/// [`MARKER`] in it, durable, and locked while its creation runs) before
/// anything else of the vault, removed once its first group (genesis and
/// the initial admin credential) is durable. A vault whose dir holds it
/// was never handed to anyone: no admin key of it was shown, and nothing
/// was written to it but what its creation wrote.
pub(crate) const CREATING: &str = "creating";

/// What the marker holds: a file of that name with anything else in it is
/// not this marker, and is never taken for one.
const MARKER: &[u8] = b"fintrust-vault: the creation of this vault has not finished\n";

/// Most bytes of chunks a creation writes (its first group is two
/// entries): a dir whose chunks file holds more was in use, and is not
/// started over whatever marker it holds.
const CREATION_CHUNKS_BYTES: u64 = 64 * 1024;

/// The marker of `dir`, when it is one ([`MARKER`] in a regular file).
fn marker(dir: &Path) -> Option<File> {
    let path = dir.join(CREATING);
    if !std::fs::symlink_metadata(&path).ok()?.is_file() {
        return None;
    }
    let mut f = File::open(&path).ok()?;
    let mut held = Vec::with_capacity(MARKER.len() + 1);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut f, MARKER.len() as u64 + 1),
        &mut held,
    )
    .ok()?;
    (held == MARKER).then_some(f)
}

/// Whether the vault in `dir` is a creation that did not finish.
pub(crate) fn is_unfinished(dir: &Path) -> bool {
    marker(dir).is_some()
}

/// Refuses to open a vault whose creation did not finish: `Locked` while
/// that creation still runs (its process holds the marker's lock),
/// [`Error::Unfinished`] once it ended.
fn refuse_unfinished(dir: &Path) -> Result<()> {
    let Some(f) = marker(dir) else {
        return Ok(());
    };
    match f.try_lock_shared() {
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked),
        _ => Err(Error::Unfinished(dir.display().to_string())),
    }
}

/// A creation under way: its marker, locked, until [`Creating::finish`]
/// (or, dropped before, the marker stays, unlocked: a creation that did
/// not finish).
pub(crate) struct Creating {
    dir: PathBuf,
    _lock: File,
}

impl Creating {
    /// Makes the marker of a creation in `dir`, locked: written and synced
    /// under a name of its own, locked, then linked as [`CREATING`], which
    /// fails if another creation's marker is there already (`Locked`).
    fn begin(dir: &Path) -> Result<Creating> {
        let mut tag = [0u8; 8];
        crate::crypto::random_bytes(&mut tag);
        let tmp = dir.join(format!("{CREATING}.{}.tmp", hex::encode(tag)));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let made = (|| -> Result<()> {
            std::io::Write::write_all(&mut f, MARKER)?;
            f.sync_all()?;
            f.try_lock().map_err(|_| Error::Locked)?;
            match std::fs::hard_link(&tmp, dir.join(CREATING)) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Locked),
                other => Ok(other?),
            }
        })();
        let removed = std::fs::remove_file(&tmp);
        made?;
        removed?;
        sync_dir(dir)?;
        Ok(Creating {
            dir: dir.to_path_buf(),
            _lock: f,
        })
    }

    /// Marks the creation finished (its first group is durable): the
    /// marker is removed, durably, then unlocked. Only this creation's own
    /// marker: one put in its place since (after something removed this
    /// one) is another's, and stays.
    pub(crate) fn finish(self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(CREATING);
        let held = self._lock.metadata()?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => {
                std::fs::remove_file(&path)?;
                sync_dir(&self.dir)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives up a creation before anything of it was made: its marker is
    /// removed, as by [`Creating::finish`].
    fn abandon(self) -> Result<()> {
        self.finish()
    }
}

/// Removes what a creation that did not finish left in `dir` (its
/// database, chunks, write-ahead file and verified record, then the
/// marker). Under the marker's lock, and only if it is still there: a
/// creation still under way in another process holds that lock, and is
/// refused as [`Error::Locked`], not undone; one that finished meanwhile
/// removed it, and is left alone. Refused when the chunks file holds more
/// than a creation writes, or an open left its verified record (a vault
/// in use with a marker put back). `Ok(true)` when it started over.
pub(crate) fn start_over(dir: &Path) -> Result<bool> {
    let Some(f) = marker(dir) else {
        return Ok(false);
    };
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked),
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    // Still the marker in place (not removed by a creation that finished
    // between the look and the lock).
    {
        use std::os::unix::fs::MetadataExt;
        let held = f.metadata()?;
        match std::fs::symlink_metadata(dir.join(CREATING)) {
            Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => {}
            _ => return Ok(false),
        }
    }
    let db_file = db_dir(dir).join("db");
    let _db_lock = match std::fs::symlink_metadata(&db_file) {
        Ok(m) if !m.is_file() => {
            return Err(Error::DirRefused(format!(
                "{} is not a regular file",
                db_file.display()
            )))
        }
        Ok(_) => {
            let db = File::open(&db_file)?;
            match db.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked),
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
            Some(db)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    // A vault in use with a marker put back: more log than a creation
    // writes, or the record an open of it left.
    let chunks = std::fs::symlink_metadata(dir.join(crate::logfile::FILE)).map_or(0, |m| m.len());
    if chunks > CREATION_CHUNKS_BYTES || dir.join(crate::verified::FILE).exists() {
        return Err(Error::DirRefused(format!(
            "{} holds a marker of a creation that did not finish, beside a log that was opened \
             or holds more than a creation writes: it is not started over, and nothing was \
             removed (remove {} if that vault is in use)",
            dir.display(),
            dir.join(CREATING).display()
        )));
    }
    tracing::warn!(
        dir = %dir.display(),
        "a creation of a vault here did not finish: starting over"
    );
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    gone(std::fs::remove_dir_all(db_dir(dir)))?;
    gone(std::fs::remove_dir_all(dir.join("wal")))?;
    let verified_tmp = format!("{}.tmp", crate::verified::FILE);
    for file in [crate::logfile::FILE, crate::verified::FILE, &verified_tmp] {
        gone(std::fs::remove_file(dir.join(file)))?;
    }
    sync_dir(dir)?;
    // Last: a crash before it leaves the marker, and the next creation
    // starts over again.
    gone(std::fs::remove_file(dir.join(CREATING)))?;
    sync_dir(dir)?;
    Ok(true)
}

/// Warns when `dir` is shared ([`sharing`]).
fn warn_if_shared(dir: &Path) {
    if let Some(why) = sharing(dir) {
        tracing::warn!(dir = %dir.display(), "{why}");
    }
}

/// Why `dir` is shared with other users, if it is: another user than this
/// process's owns it (and so may change its mode, and write in it,
/// whatever the mode says now); every local user may read or enter it
/// (its log names subjects, partners and consents in the clear;
/// `Store::create` makes it 0700); or its group may write in it (and so
/// put a write-ahead segment or a record there that the open would read).
fn sharing(dir: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(dir).ok()?;
    let mode = m.permissions().mode() & 0o777;
    let me = rustix::process::geteuid().as_raw();
    // Root's dirs are no one else's to change.
    if m.uid() != me && m.uid() != 0 {
        Some(format!(
            "the data dir belongs to uid {}, not to this process's ({me}): that user may change \
             its mode and write in it; let the vault's own user own it",
            m.uid()
        ))
    } else if mode & 0o007 != 0 {
        Some(format!(
            "every local user may read the data dir (mode {mode:o}): chmod 700 it"
        ))
    } else if mode & 0o020 != 0 {
        Some(format!(
            "the data dir's group may write in it (mode {mode:o}): chmod 700 it"
        ))
    } else {
        None
    }
}

/// Refuses a sled database without the vault's metadata beside a chunks
/// file that holds a log. A vault's metadata is durable before its first
/// chunk is written (`Vault::create`), so this is a database sled could
/// recover nothing of (a damaged or replaced file), whose empty index the
/// open would otherwise take for a crash's and cut every chunk off.
fn refuse_lost_meta(dir: &Path, db: &sled::Db) -> Result<()> {
    if db.open_tree("meta")?.contains_key("vault_id")? {
        return Ok(());
    }
    let held = match std::fs::metadata(dir.join(crate::logfile::FILE)) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e.into()),
    };
    if held == 0 {
        return Ok(());
    }
    Err(Error::integrity(
        0,
        Reason::Malformed(format!(
            "the database in {} holds no vault metadata, while the chunks file holds {held} \
             bytes of log: the database was damaged or replaced; nothing was cut, and the data \
             dir must be restored from a backup",
            db_dir(dir).display()
        )),
    ))
}

fn db_dir(dir: &Path) -> PathBuf {
    dir.join("db")
}

/// Copies the files of `from` into `to` (created), subdirectories too;
/// anything else there is refused.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        let kind = e.file_type()?;
        if kind.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(e.path(), &target)?;
        } else {
            // A link, a pipe or a device: the copy could fill the disk
            // (`/dev/zero`) or never end (a pipe). A vault makes none.
            return Err(Error::Invalid(format!(
                "{} is not a regular file or a directory, which a data dir holds only",
                e.path().display()
            )));
        }
    }
    Ok(())
}

impl Store {
    fn open_at(dir: &Path, cache_bytes: u64, flusher: Flusher) -> Result<Store> {
        let db = Self::open_sled(&db_dir(dir), cache_bytes, flusher)?;
        refuse_lost_meta(dir, &db)?;
        let data_file = File::open(db_dir(dir).join("db"))?;
        let log = LogTree::open(dir, db.open_tree("log")?)?;
        Self::assemble(dir, db, data_file, log, None)
    }

    /// The store of data dir `dir` over an open sled `db` (whose data file
    /// is `data_file`) and `log`.
    fn assemble(
        dir: &Path,
        db: sled::Db,
        data_file: File,
        log: LogTree,
        read_only: Option<File>,
    ) -> Result<Store> {
        Ok(Store {
            log,
            state: db.open_tree("state")?,
            keys: db.open_tree("keys")?,
            meta: db.open_tree("meta")?,
            db,
            data_file,
            data_syncs: crate::logfile::StickySync::default(),
            dir: dir.to_path_buf(),
            recent: RwLock::new(BTreeMap::new()),
            applying: std::sync::Mutex::new(()),
            read_only,
        })
    }

    /// Opens the data dir `dir` without writing to it, as verify of a dir
    /// on read-only storage (a snapshot, a backup, an auditor's copy)
    /// needs: its sled database is copied into `scratch` (an empty dir)
    /// and opened there, its chunks file is read in place
    /// ([`LogTree::open_read_only`]), and its write-ahead file is replayed
    /// into those copies and left in place. A shared lock on the dir's
    /// sled file, held until the store is dropped, keeps a vault from
    /// opening the dir meanwhile, and refuses a dir a vault holds.
    pub(crate) fn open_read_only(dir: &Path, scratch: &Path, cache_bytes: u64) -> Result<Store> {
        if !db_dir(dir).join("conf").exists() {
            return Err(Error::NotFound(dir.display().to_string()));
        }
        refuse_unfinished(dir)?;
        // A regular file only: opening a pipe put in its place would wait
        // for a writer forever.
        let db_file = db_dir(dir).join("db");
        if !std::fs::symlink_metadata(&db_file)?.is_file() {
            return Err(Error::Invalid(format!(
                "{} is not a regular file or a directory, which a data dir holds only",
                db_file.display()
            )));
        }
        let lock = File::open(db_file)?;
        // As `open_sled` does, a moment for a vault closed just before.
        let mut waited = 0;
        loop {
            match lock.try_lock_shared() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if waited < 2000 => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    waited += 20;
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Locked),
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
        }
        let copy = db_dir(scratch);
        copy_dir(&db_dir(dir), &copy)?;
        let db = Self::open_sled(&copy, cache_bytes, Flusher::Off)?;
        refuse_lost_meta(dir, &db)?;
        let data_file = File::open(copy.join("db"))?;
        let log = LogTree::open_read_only(dir, db.open_tree("log")?, scratch)?;
        let store = Self::assemble(dir, db, data_file, log, Some(lock))?;
        crate::wal::replay(&store)?;
        Ok(store)
    }

    /// Whether this store was opened by [`Store::open_read_only`].
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only.is_some()
    }

    /// Opens the sled database at `path`, refusing one of another format.
    fn open_sled(path: &Path, cache_bytes: u64, flusher: Flusher) -> Result<sled::Db> {
        let config = sled::Config::new()
            .path(path)
            .segment_size(SEGMENT_SIZE)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(match flusher {
                Flusher::Running => Some(FLUSH_EVERY_MS),
                Flusher::Off => None,
            });
        // Sled's I/O threads hold the directory lock for a moment after the
        // last handle is dropped, so a reopen in the same process (close,
        // then verify) can find it still held: wait a little for it before
        // reporting the directory as in use.
        let mut waited = 0;
        let db = loop {
            match config.open().map_err(Error::from) {
                Err(Error::Locked) if waited < 2000 => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    waited += 20;
                }
                other => break other?,
            }
        };
        // Another format is refused before anything below writes to the
        // dir: the chunks file's creation, its cut at open and the
        // write-ahead replay would each change a dir this build cannot
        // read. A value that is no format at all is left to verify.
        if let Some(v) = db.open_tree("meta")?.get("format")? {
            if let Ok(b) = <[u8; 4]>::try_from(v.as_ref()) {
                let found = u32::from_be_bytes(b);
                if found != FORMAT {
                    return Err(Error::UnsupportedFormat {
                        found,
                        supported: FORMAT,
                    });
                }
            }
        }
        Ok(db)
    }

    /// Creates the database of a new vault; refuses an existing one. A
    /// creation that did not finish (its [`CREATING`] marker still there)
    /// is started over: what it left is removed first ([`start_over`]).
    /// The marker is made before anything else of the vault, and
    /// removed by [`finished_creation`] once the vault's first group is
    /// durable.
    pub(crate) fn create(
        dir: &Path,
        cache_bytes: u64,
        flusher: Flusher,
    ) -> Result<(Store, Creating)> {
        start_over(dir)?;
        if db_dir(dir).exists() {
            return Err(Error::AlreadyExists(dir.display().to_string()));
        }
        // A dir that is not one for a new vault is refused before anything
        // is made or changed in it: what another vault left (its chunks,
        // write-ahead file or verified record, which this one would take
        // for its own), or a subdirectory (a dir of other things, given by
        // mistake, which would be made its owner's alone).
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries {
                // An entry gone since the listing (another creation's
                // marker under its own name, linked and removed) is none.
                let e = match e {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    e => e?,
                };
                let name = e.file_name();
                let leftover = [crate::logfile::FILE, "wal", crate::verified::FILE, CREATING]
                    .iter()
                    .any(|n| name == *n);
                // Another creation, begun since the look above: under way
                // (its marker) or done (its database), not a dir given by
                // mistake.
                if name == "db" {
                    return Err(Error::AlreadyExists(dir.display().to_string()));
                }
                let is_file = match e.file_type() {
                    Ok(t) => t.is_file(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                if leftover || !is_file {
                    if marker(dir).is_some() {
                        return Err(Error::Locked);
                    }
                    if db_dir(dir).exists() {
                        return Err(Error::AlreadyExists(dir.display().to_string()));
                    }
                    if std::fs::symlink_metadata(e.path())
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                    {
                        continue;
                    }
                    return Err(Error::DirRefused(format!(
                        "{} holds {:?}: a new vault goes in a dir that is new, empty or holds \
                         files only, none of another vault",
                        dir.display(),
                        name
                    )));
                }
            }
        }
        // The dirs this makes, from the first missing one down: each one's
        // entry in its parent is made durable, or a power loss soon after
        // could take the whole vault, genesis and all. Before anything of
        // the vault is there, so that a failure leaves nothing a retry
        // would refuse. A parent that cannot be opened for reading (a dir
        // one may cross, not list) cannot be synced: a warning, since the
        // vault itself can still be made.
        let made: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        std::fs::create_dir_all(dir)?;
        // The log names subjects, partners and consents in the clear: the
        // dir is its owner's alone, whoever made it. A dir given by another
        // user (root's, say, with group write) cannot be changed: a warning.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot make the data dir 0700");
            }
        }
        for d in made {
            let parent = match d.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                // The empty path, which `ancestors` ends a relative one with.
                None => continue,
            };
            if let Err(e) = sync_dir(parent) {
                tracing::warn!(
                    dir = %parent.display(),
                    error = %e,
                    "cannot sync the dir a new vault dir was made in"
                );
            }
        }
        // The marker, durable before the database: a crash from here on
        // leaves a dir that says its creation did not finish.
        let creating = Creating::begin(dir)?;
        // A creation that began and finished since the look above (its
        // marker gone again): its vault is there, and stays as it is.
        if db_dir(dir).exists() {
            // A marker left by a failure here would make that vault look
            // unfinished; the refusal stands either way.
            if let Err(e) = creating.abandon() {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot remove the marker of a creation given up: remove {} by hand",
                    dir.join(CREATING).display()
                );
            }
            return Err(Error::AlreadyExists(dir.display().to_string()));
        }
        let store = Self::open_at(dir, cache_bytes, flusher)?;
        sync_dir(&db_dir(dir))?;
        sync_dir(dir)?;
        Ok((store, creating))
    }

    /// [`Store::create`] with metadata, as a vault's store has before its
    /// first chunk: for tests that write chunks without a vault.
    #[cfg(test)]
    pub(crate) fn create_for_tests(
        dir: &Path,
        cache_bytes: u64,
        flusher: Flusher,
    ) -> Result<Store> {
        let (store, creating) = Self::create(dir, cache_bytes, flusher)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        store.write_meta(&[7; 16], &key)?;
        creating.finish()?;
        Ok(store)
    }

    /// Opens the database of an existing vault.
    pub(crate) fn open_existing_with(
        dir: &Path,
        cache_bytes: u64,
        flusher: Flusher,
    ) -> Result<Store> {
        if !db_dir(dir).join("conf").exists() {
            return Err(Error::NotFound(dir.display().to_string()));
        }
        refuse_unfinished(dir)?;
        warn_if_shared(dir);
        let store = Self::open_at(dir, cache_bytes, flusher)?;
        crate::wal::replay(&store)?;
        Ok(store)
    }

    /// Closes sled and opens the same data dir again, with an empty cache.
    /// sled 0.34 never evicts the page each of its 256 cache shards used
    /// last (see the module doc), so after a scan of the whole log every
    /// shard holds one log leaf (8 to 17 chunks), whatever the capacity:
    /// about 300 MB, which [`crate::Vault::open`] gives back this way once
    /// it has verified the log. Another process that takes the data dir in
    /// between makes this open fail as locked, whether it still holds the
    /// dir or it appended to the log and let go.
    pub(crate) fn reopen(self, cache_bytes: u64, flusher: Flusher) -> Result<Store> {
        let dir = self.dir.clone();
        // What was verified ends with this chunk: another process that
        // took the dir in between and appended would have the caller
        // continue the log from before its entries.
        let last = self.log.last()?.map(|(k, v)| (k.to_vec(), v.to_vec()));
        drop(self);
        let store = Self::open_existing_with(&dir, cache_bytes, flusher)?;
        if store.log.last()?.map(|(k, v)| (k.to_vec(), v.to_vec())) != last {
            return Err(Error::Locked);
        }
        Ok(store)
    }

    pub(crate) fn open_existing(dir: &Path) -> Result<Store> {
        Self::open_existing_with(dir, crate::vault::DEFAULT_CACHE_BYTES, Flusher::Off)
    }

    /// Makes everything written so far durable.
    pub(crate) fn sync(&self) -> Result<()> {
        if self.is_read_only() {
            // Copies thrown away after the read: nothing to keep.
            return Ok(());
        }
        // The chunks before the pointers that name them.
        self.log.sync()?;
        self.db.flush()?;
        self.data_syncs.sync(&self.data_file)?;
        // sled renames its snapshot into place without syncing the dir:
        // before segments are deleted on the strength of this sync, the
        // names in it are made durable too.
        sync_dir(&db_dir(&self.dir))?;
        release_garbage();
        Ok(())
    }

    pub(crate) fn stored_public_key(&self) -> Option<VerifyingKey> {
        let v = self.meta.get("public_key").ok()??;
        let bytes: [u8; 32] = v.as_ref().try_into().ok()?;
        VerifyingKey::from_bytes(&bytes).ok()
    }

    pub(crate) fn vault_id(&self) -> Result<[u8; 16]> {
        let v = self
            .meta
            .get("vault_id")?
            .ok_or(Error::Malformed("no vault id"))?;
        v.as_ref()
            .try_into()
            .map_err(|_| Error::Malformed("vault id"))
    }

    pub(crate) fn write_meta(&self, vault_id: &[u8; 16], public_key: &VerifyingKey) -> Result<()> {
        let mut b = sled::Batch::default();
        b.insert("format", &FORMAT.to_be_bytes());
        b.insert("vault_id", vault_id);
        b.insert("public_key", public_key.as_bytes());
        self.meta.apply_batch(b)?;
        Ok(())
    }

    /// Compares the metadata with the genesis entry; describes a mismatch.
    pub(crate) fn check_meta(&self, g: &Genesis) -> Result<Option<String>> {
        let expected: [(&[u8], Vec<u8>); 3] = [
            (b"format", g.format.to_be_bytes().to_vec()),
            (
                b"public_key",
                hex::decode(&g.public_key).unwrap_or_default(),
            ),
            (b"vault_id", hex::decode(&g.vault_id).unwrap_or_default()),
        ];
        let mut actual = Vec::new();
        for kv in self.meta.iter() {
            let (k, v) = kv?;
            actual.push((k.to_vec(), v.to_vec()));
        }
        if actual.len() != expected.len() {
            return Ok(Some(format!("{} metadata keys, expected 3", actual.len())));
        }
        for ((ak, av), (ek, ev)) in actual.iter().zip(expected.iter()) {
            if ak.as_slice() != *ek || av != ev {
                return Ok(Some(format!(
                    "metadata {:?} differs from genesis",
                    String::from_utf8_lossy(ek)
                )));
            }
        }
        if g.format != FORMAT {
            return Ok(Some(format!("unsupported format {}", g.format)));
        }
        Ok(None)
    }

    /// The applied marker of the derived state.
    pub(crate) fn applied(&self) -> Result<Option<u64>> {
        self.marker(state::APPLIED, "applied marker")
    }

    /// The indexing marker of the derived state (`state::INDEXING`).
    pub(crate) fn indexing(&self) -> Result<Option<u64>> {
        self.marker(state::INDEXING, "indexing marker")
    }

    fn marker(&self, key: &[u8], what: &'static str) -> Result<Option<u64>> {
        match self.state.get(key)? {
            None => Ok(None),
            Some(v) => Ok(Some(u64::from_be_bytes(
                v.as_ref().try_into().map_err(|_| Error::Malformed(what))?,
            ))),
        }
    }

    /// Roughly how many entries the log holds (the first seq of its last chunk).
    pub(crate) fn entry_count_hint(&self) -> u64 {
        let recent = self.recent().last_key_value().map(|(k, _)| *k);
        let applied = self
            .log
            .index
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
            .map(u64::from_be_bytes);
        recent.max(applied).unwrap_or(0)
    }

    /// The chunks not yet in sled, for reading. A poisoned lock (a panic
    /// while it was held for writing) still holds a consistent map: the
    /// writer only inserts and removes whole entries.
    fn recent(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Bytes>> {
        self.recent
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies the recent chunks whose first seq is at or below `upto` (all
    /// of them with `None`) to the `log` tree in one sled batch, then drops
    /// them from `recent`, in that order: a reader finds each chunk in one
    /// or the other throughout. Returns how many were applied.
    ///
    /// Callers keep sled's order of writes: every batch of a group other
    /// than its log batch is in sled before a later group's chunk reaches
    /// `recent` (the writer applies what waits before any such batch), so
    /// applying recent chunks never puts a group's log before the batches
    /// that must precede it.
    pub(crate) fn apply_recent(&self, upto: Option<u64>) -> Result<usize> {
        let _applying = self.applying.lock().map_err(|_| Error::Poisoned)?;
        let chunks: Vec<(u64, Bytes)> = self
            .recent()
            .range(..=upto.unwrap_or(u64::MAX))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        if chunks.is_empty() {
            return Ok(0);
        }
        let keyed: Vec<([u8; 8], &Bytes)> =
            chunks.iter().map(|(k, v)| (k.to_be_bytes(), v)).collect();
        self.log.apply(&keyed)?;
        let mut recent = self.recent.write().map_err(|_| Error::Poisoned)?;
        for (k, _) in &chunks {
            recent.remove(k);
        }
        Ok(chunks.len())
    }

    /// The chunk that holds `seq` if the log reaches it: the one with the
    /// greatest first seq at or below it, as `(first seq, chunk bytes)`.
    pub(crate) fn chunk_at(&self, seq: u64) -> Result<Option<(u64, Bytes)>> {
        // Recent chunks first: one moved to sled after this read is found
        // there below.
        let recent = self
            .recent()
            .range(..=seq)
            .next_back()
            .map(|(k, v)| (*k, v.clone()));
        let applied = match self.log.at_or_before(seq)? {
            Some((k, v)) => Some((chunk_key(&k)?, v)),
            None => None,
        };
        Ok(match (recent, applied) {
            (Some(r), Some(a)) => Some(if r.0 >= a.0 { r } else { a }),
            (r, a) => r.or(a),
        })
    }

    /// The chunks from the one whose first seq is `first` on, in seq order,
    /// each once, whether still recent or already in sled.
    pub(crate) fn chunks_from(
        &self,
        first: u64,
    ) -> impl Iterator<Item = Result<(u64, Bytes)>> + '_ {
        // A snapshot of the recent chunks first, then sled: a chunk moved
        // to sled meanwhile is in both and given once; one added after the
        // snapshot and moved to sled before the scan reaches it is in sled.
        let recent: Vec<(u64, Bytes)> = self
            .recent()
            .range(first..)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let applied = self
            .log
            .range(first.to_be_bytes()..)
            .map(|kv| kv.and_then(|(k, v)| Ok((chunk_key(&k)?, v))));
        merge_chunks(recent.into_iter().peekable(), applied.peekable())
    }
}

/// The first seq a `log` key names.
fn chunk_key(k: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Malformed("log key is not a seq"))
}

/// Two seq-ordered sequences of chunks as one, a chunk in both given once.
fn merge_chunks<'a>(
    mut recent: std::iter::Peekable<impl Iterator<Item = (u64, Bytes)> + 'a>,
    mut applied: std::iter::Peekable<impl Iterator<Item = Result<(u64, Bytes)>> + 'a>,
) -> impl Iterator<Item = Result<(u64, Bytes)>> + 'a {
    std::iter::from_fn(move || {
        let a = match applied.peek() {
            Some(Err(_)) => return applied.next(),
            Some(Ok((k, _))) => Some(*k),
            None => None,
        };
        match (recent.peek().map(|(k, _)| *k), a) {
            (None, None) => None,
            (Some(_), None) => recent.next().map(Ok),
            (None, Some(_)) => applied.next(),
            (Some(r), Some(a)) if r < a => recent.next().map(Ok),
            (Some(r), Some(a)) => {
                if r == a {
                    recent.next();
                }
                applied.next()
            }
        }
    })
}

/// Hands this thread's deferred frees to the global epoch collector.
///
/// sled 0.34 frees replaced tree nodes and its sealed 16 MiB I/O buffers
/// through crossbeam-epoch, which keeps them in the deferring thread's own
/// bag until 64 have gathered there. A thread that touches sled now and
/// then (the checkpointer flushing once per write-ahead segment, the
/// indexer every few seconds) would hold up to 64 of them, I/O buffers
/// included, for as long as it stays quiet: hundreds of MiB. Such threads
/// call this after their sled work, and the writer after each group (a
/// log leaf replaced by a chunk insert can be a MiB).
pub(crate) fn release_garbage() {
    crossbeam_epoch::pin().flush();
}

/// Drops the pages of the data dir's sled files that the kernel caches
/// clean, so that the next open reads them from the disk.
///
/// For an open after a failed `fdatasync` in this boot: Linux reports a
/// failed writeback once and keeps the pages it could not write in its
/// cache marked clean, so a reader of the file (sled opening it again)
/// sees writes the disk lacks, and the write-ahead replay would skip the
/// groups that sled seems to hold; their segments, then deleted, were all
/// that held them. Dropped, the pages are read from the disk: sled
/// recovers what it really has, and the replay applies the rest. Dirty
/// pages (none, on a data dir no vault has open) are left to be written.
pub fn forget_cached_pages(dir: &Path) -> Result<()> {
    fn walk(dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&entry.path())?;
            } else if kind.is_file() {
                let file = File::open(entry.path())?;
                // Linux's behaviour, and its call; elsewhere nothing.
                #[cfg(target_os = "linux")]
                rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
                    .map_err(std::io::Error::from)?;
                drop(file);
            }
        }
        Ok(())
    }
    walk(&db_dir(dir))
}

/// fsyncs a directory so that the files created in it survive power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Direct access to a data dir's sled trees, bypassing every invariant of
/// the vault: for tooling (reindexing, inspection) and for tests that
/// tamper with stored bytes. Never use it to write in a live vault.
#[derive(Debug)]
pub struct RawStore {
    pub db: sled::Db,
    /// The log; its edits rewrite the chunks file in key order, so that
    /// the layout stays as the vault writes it.
    pub log: LogTree,
    pub state: sled::Tree,
    pub keys: sled::Tree,
    pub meta: sled::Tree,
    /// Of a read-only open: its shared lock on the data dir's sled file.
    _lock: Option<File>,
}

impl RawStore {
    /// Opens the trees of the vault in `dir` (the vault must be closed).
    pub fn open(dir: &Path) -> Result<RawStore> {
        Ok(Self::of(Store::open_existing(dir)?))
    }

    /// Opens the trees of the vault in `dir` without writing to `dir`, as
    /// `verify_read_only` does: sled's files copied into `scratch` (an
    /// empty dir that must outlive the store), the chunks read in place.
    /// Writes go to those copies, and the log's edits are refused.
    pub fn open_read_only(dir: &Path, scratch: &Path) -> Result<RawStore> {
        Ok(Self::of(Store::open_read_only(
            dir,
            scratch,
            crate::vault::DEFAULT_CACHE_BYTES,
        )?))
    }

    fn of(s: Store) -> RawStore {
        RawStore {
            db: s.db,
            log: s.log.compacting(),
            state: s.state,
            keys: s.keys,
            meta: s.meta,
            _lock: s.read_only,
        }
    }

    /// Flushes sled's buffers to the file (not an fsync: enough for a
    /// following open on this machine, not for power loss).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// A dir is shared when other users may read or enter it, its group
    /// may write in it, or another user owns it (checked where this
    /// process may give a dir away: as root).
    #[test]
    fn a_shared_data_dir_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let chmod = |mode: u32| {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        chmod(0o700);
        assert_eq!(super::sharing(dir), None);
        chmod(0o750);
        assert_eq!(super::sharing(dir), None);
        chmod(0o755);
        assert!(super::sharing(dir).is_some_and(|w| w.contains("every local user")));
        chmod(0o770);
        assert!(super::sharing(dir).is_some_and(|w| w.contains("group may write")));
        chmod(0o700);
        // Given to another user (where this process may: as root), the
        // dir is that user's to change, whoever serves it.
        if std::os::unix::fs::chown(dir, Some(4242), None).is_ok() {
            let why = super::sharing(dir).expect("owned by another user");
            assert!(why.contains("belongs to uid 4242"), "{why}");
        }
    }

    use super::*;

    /// The names of this process's threads.
    fn thread_names() -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for task in std::fs::read_dir("/proc/self/task")? {
            // A thread that ended between the listing and the read is skipped.
            if let Ok(comm) = std::fs::read_to_string(task?.path().join("comm")) {
                names.push(comm.trim_end().to_owned());
            }
        }
        Ok(names)
    }

    #[test]
    fn a_serving_store_runs_sleds_flusher_and_reopens_with_what_was_written_and_the_lock(
    ) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::create_for_tests(dir.path(), 1 << 20, Flusher::Running)?;
        // sled 0.34 names its flusher thread "log flusher".
        assert!(thread_names()?.iter().any(|n| n == "log flusher"));
        store.log.insert(7u64.to_be_bytes(), &b"chunk"[..])?;
        store.sync()?;
        // Closing stops the flusher after its last round.
        let store = store.reopen(1 << 20, Flusher::Running)?;
        assert_eq!(
            store.log.get(7u64.to_be_bytes())?.as_deref(),
            Some(&b"chunk"[..])
        );
        // sled's lock on the data dir is taken again: a second open fails.
        assert!(Store::open_existing(dir.path()).is_err());
        drop(store);
        assert!(Store::open_existing(dir.path()).is_ok());
        Ok(())
    }

    fn chunk(first: u64) -> Bytes {
        Bytes::from(format!("chunk {first}").into_bytes())
    }

    fn firsts(store: &Store, from: u64) -> Result<Vec<u64>> {
        store
            .chunks_from(from)
            .map(|kv| kv.map(|(k, _)| k))
            .collect()
    }

    #[test]
    fn reads_find_each_chunk_once_whether_recent_or_in_sled() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::create_for_tests(dir.path(), 1 << 20, Flusher::Off)?;
        for first in [0u64, 4, 9] {
            store.log.insert(first.to_be_bytes(), chunk(first))?;
        }
        // 9 is in both, as between the writer's sled batch and its removal
        // from `recent`; 12 and 20 are only recent.
        store.recent.write().map_err(|_| Error::Poisoned)?.extend([
            (9, chunk(9)),
            (12, chunk(12)),
            (20, chunk(20)),
        ]);

        assert_eq!(firsts(&store, 0)?, [0, 4, 9, 12, 20]);
        assert_eq!(firsts(&store, 5)?, [9, 12, 20]);
        assert_eq!(firsts(&store, 12)?, [12, 20]);
        assert_eq!(firsts(&store, 21)?, Vec::<u64>::new());

        let at = |seq| -> Result<Option<u64>> { Ok(store.chunk_at(seq)?.map(|(k, _)| k)) };
        assert_eq!(at(3)?, Some(0), "from sled");
        assert_eq!(at(9)?, Some(9), "in both");
        assert_eq!(at(15)?, Some(12), "recent, past sled's last");
        assert_eq!(at(1_000)?, Some(20));
        assert_eq!(store.chunk_at(12)?.map(|(_, v)| v), Some(chunk(12)));
        assert_eq!(store.entry_count_hint(), 20);

        // Moved to sled (9 is there already): the same answers.
        for (k, v) in std::mem::take(&mut *store.recent.write().map_err(|_| Error::Poisoned)?) {
            if !store.log.contains_key(k.to_be_bytes())? {
                store.log.insert(k.to_be_bytes(), v)?;
            }
        }
        assert_eq!(firsts(&store, 0)?, [0, 4, 9, 12, 20]);
        assert_eq!(at(15)?, Some(12));
        Ok(())
    }

    #[test]
    fn a_store_without_chunks_reads_nothing() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::create_for_tests(dir.path(), 1 << 20, Flusher::Off)?;
        assert_eq!(store.chunk_at(0)?, None);
        assert_eq!(firsts(&store, 0)?, Vec::<u64>::new());
        store
            .recent
            .write()
            .map_err(|_| Error::Poisoned)?
            .insert(3, chunk(3));
        assert_eq!(store.chunk_at(2)?, None, "before the first chunk");
        assert_eq!(firsts(&store, 0)?, [3]);
        Ok(())
    }
}
