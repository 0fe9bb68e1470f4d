//! Helpers shared by the storage crate's test binaries.

use std::path::{Path, PathBuf};

/// A temp dir for a test of what a data dir holds, not of what reaches
/// the disk: on the machine's tmpfs (`/dev/shm`) when it has room, else
/// under the system's temp dir. An explicit `TMPDIR` always wins.
///
/// The tests that use it damage, fail or compare the dirs of processes
/// that do not lose power, so the page cache holds all they check; on
/// this project's CI machines, the fsyncs of each open, commit and close
/// to disk were about half of their time.
#[allow(dead_code)] // not every test binary uses it
pub fn scratch_dir() -> tempfile::TempDir {
    /// Room the tmpfs must have: far above what any of these tests write.
    const ROOM: u64 = 1 << 30;
    let shm = Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none() {
        let room = rustix::fs::statvfs(shm)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        if room >= ROOM {
            if let Ok(dir) = tempfile::Builder::new()
                .prefix("fintrust-test-")
                .tempdir_in(shm)
            {
                return dir;
            }
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Copies a directory tree (a closed data dir, or a live vault's
/// write-ahead segments) file by file.
#[allow(dead_code)] // not every test binary copies dirs
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy's dir");
    for item in std::fs::read_dir(from).expect("read the dir") {
        let item = item.expect("dir entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("file type").is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy a file");
        }
    }
}

/// Every regular file under `dir` (empty ones too), as its path relative
/// to `dir` and its length, sorted: two listings compare equal when the
/// tree holds the same files at the same lengths.
#[allow(dead_code)] // not every test binary lists files
pub fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("dir entry");
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                let len = e.metadata().expect("metadata").len();
                let rel = e.path().strip_prefix(dir).expect("under dir").to_path_buf();
                out.push((rel, len));
            }
        }
    }
    out.sort();
    out
}

/// A pending marker's value (docs/storage.md, section 2): the group's
/// first seq, then each key name with its u16 length.
#[allow(dead_code)] // not every test binary writes markers
pub fn pending_value(first_seq: u64, names: &[Vec<u8>]) -> Vec<u8> {
    let mut v = first_seq.to_be_bytes().to_vec();
    for n in names {
        v.extend_from_slice(&(n.len() as u16).to_be_bytes());
        v.extend_from_slice(n);
    }
    v
}

/// Blocks until no handle of this process still holds sled's lock on the
/// data dir. Dropping the last sled handle does not release the lock at
/// once: sled's background threads may still hold the file for a moment,
/// and opening the dir again in that window fails with `Locked`. A
/// blocking `flock` of our own waits exactly until that file is closed.
#[allow(dead_code)] // not every test binary reopens a closed dir
pub fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("open sled's data file");
    f.lock().expect("wait for sled's lock");
}

/// The master key of the closed data dir behind `raw`, unsealed with
/// `unlock`, and the dir's vault id.
#[allow(dead_code)] // not every test binary uses it
pub fn unseal_master(
    raw: &storage::RawStore,
    unlock: &storage::Unlock,
) -> (storage::crypto::SecretKey, [u8; 16]) {
    let vault_id: [u8; 16] = raw
        .meta
        .get("vault_id")
        .expect("read meta")
        .expect("vault id")
        .as_ref()
        .try_into()
        .expect("16-byte vault id");
    let sealed = raw.keys.get("master").expect("read keys").expect("master");
    let master = storage::crypto::SealedMaster::decode(&sealed)
        .expect("sealed master decodes")
        .unseal(unlock, &vault_id)
        .expect("the secret unseals the master key");
    (master, vault_id)
}
