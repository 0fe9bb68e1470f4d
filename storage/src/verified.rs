//! The record of the prefix an open verified: `DIR/verified`.
//!
//! `Vault::open` verifies the whole log before it serves (fail closed),
//! and on a log of small commit groups most of that time is the groups'
//! `verify_strict`. After a verification that passed, open writes this
//! record: how many entries it verified, the hash of the last one, and the
//! BLAKE3 of every signed head up to there ([`VerifiedPrefix`]), with a
//! tag under a key derived from the master key. The next open that finds
//! a record whose tag checks passes it to the scan, which skips the
//! signatures of those heads and checks everything else as always, and
//! which fails unless the log's hash at the prefix's end and its digest
//! of the heads are the record's. Any failure with a record makes open
//! verify again from scratch without it, so what open reports is what a
//! full verification reports.
//!
//! Invariants:
//! - the record proves no less than the signatures it stands for: a valid
//!   tag takes the master key, which also unwraps the signing key;
//! - a record that is missing, torn, of another vault or another master
//!   key (a master rotation), or that does not match the log is ignored:
//!   open then checks every signature, as `vault-verify` always does;
//! - it is written only after a verification that passed, to a temporary
//!   name and renamed, so a crash leaves the old record, the new one, or
//!   none (the rename is not synced: losing it costs one full open).
//!
//! The format is in `docs/storage.md`, section 7, "The verified prefix".

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::crypto::SecretKey;
use crate::entry::Hash;
use crate::verify::VerifiedPrefix;

/// File name in the data dir.
pub const FILE: &str = "verified";
/// Length of the record.
pub const LEN: usize = 109;
const MAGIC: &[u8; 4] = b"FVVP";
const VERSION: u8 = 1;
/// BLAKE3 `derive_key` context of the tag's key.
const TAG_CONTEXT: &str = "fintrust-vault 2026 verified prefix v1";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

fn tag(master: &SecretKey, vault_id: &[u8; 16], body: &[u8]) -> Hash {
    let key = zeroize::Zeroizing::new(blake3::derive_key(TAG_CONTEXT, master.as_bytes()));
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(vault_id);
    h.update(body);
    *h.finalize().as_bytes()
}

/// The record of `prefix` for the vault `vault_id` under `master`.
pub fn encode(prefix: &VerifiedPrefix, master: &SecretKey, vault_id: &[u8; 16]) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[0..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[5..13].copy_from_slice(&prefix.entries.to_be_bytes());
    out[13..45].copy_from_slice(&prefix.last_hash);
    out[45..77].copy_from_slice(&prefix.heads_digest);
    let t = tag(master, vault_id, &out[..77]);
    out[77..].copy_from_slice(&t);
    out
}

/// The prefix in `bytes`, if they are a record of this vault under this
/// master key; `None` for anything else.
pub fn decode(bytes: &[u8], master: &SecretKey, vault_id: &[u8; 16]) -> Option<VerifiedPrefix> {
    let bytes: &[u8; LEN] = bytes.try_into().ok()?;
    if &bytes[0..4] != MAGIC || bytes[4] != VERSION {
        return None;
    }
    let want = tag(master, vault_id, &bytes[..77]);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &bytes[77..])) {
        return None;
    }
    let entries = u64::from_be_bytes(bytes[5..13].try_into().ok()?);
    if entries == 0 {
        return None;
    }
    Some(VerifiedPrefix {
        entries,
        last_hash: bytes[13..45].try_into().ok()?,
        heads_digest: bytes[45..77].try_into().ok()?,
    })
}

/// The record in `dir`, if there is one that [`decode`] accepts.
pub(crate) fn read(dir: &Path, master: &SecretKey, vault_id: &[u8; 16]) -> Option<VerifiedPrefix> {
    // At most one byte more than a record: a file of any size put in the
    // dir costs no more memory than that, and is refused by its length.
    // Only a regular file, and not through a link: opening a pipe put in
    // its place would wait for a writer forever (and the open with it).
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path(dir))
        .and_then(|f| {
            if f.metadata()?.is_file() {
                Ok(f)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .and_then(|f| {
            let mut bytes = Vec::with_capacity(LEN + 1);
            std::io::Read::read_to_end(&mut std::io::Read::take(f, LEN as u64 + 1), &mut bytes)?;
            Ok(bytes)
        });
    match read {
        Ok(bytes) => {
            let prefix = decode(&bytes, master, vault_id);
            if prefix.is_none() {
                tracing::debug!("the verified-prefix record does not check out: ignored");
            }
            prefix
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the verified-prefix record: ignored");
            None
        }
    }
}

/// Writes the record of `prefix` in `dir` (see the module doc).
pub(crate) fn write(
    dir: &Path,
    prefix: &VerifiedPrefix,
    master: &SecretKey,
    vault_id: &[u8; 16],
) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{FILE}.tmp"));
    // A new file, never one a link in the dir points to elsewhere; synced
    // before it takes the record's name, and the name synced after, so
    // that a crash leaves the old record, the new one or none.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&encode(prefix, master, vault_id))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (VerifiedPrefix, SecretKey, [u8; 16]) {
        (
            VerifiedPrefix {
                entries: 1000,
                last_hash: [0x11; 32],
                heads_digest: [0x22; 32],
            },
            SecretKey::from_bytes([7; 32]),
            [9; 16],
        )
    }

    #[test]
    fn golden_vector() {
        // docs/storage.md, section 7, "The verified prefix".
        let (prefix, master, vault_id) = fixture();
        let record = encode(&prefix, &master, &vault_id);
        assert_eq!(
            hex::encode(record),
            concat!(
                "4656565001",
                "00000000000003e8",
                "1111111111111111111111111111111111111111111111111111111111111111",
                "2222222222222222222222222222222222222222222222222222222222222222",
                "7c895bb97c2a7dc050f104b6db1e241db951304dc60c12a080c5c8138dd10e65"
            )
        );
        assert_eq!(decode(&record, &master, &vault_id), Some(prefix));
    }

    #[test]
    fn anything_but_the_record_of_this_vault_and_master_is_refused() {
        let (prefix, master, vault_id) = fixture();
        let record = encode(&prefix, &master, &vault_id);
        for i in 0..LEN {
            let mut bad = record;
            bad[i] ^= 0x01;
            assert_eq!(decode(&bad, &master, &vault_id), None, "byte {i} flipped");
        }
        assert_eq!(decode(&record[..LEN - 1], &master, &vault_id), None);
        let mut longer = record.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer, &master, &vault_id), None);
        assert_eq!(
            decode(&record, &SecretKey::from_bytes([8; 32]), &vault_id),
            None
        );
        assert_eq!(decode(&record, &master, &[10; 16]), None);
        let empty = VerifiedPrefix {
            entries: 0,
            ..prefix
        };
        assert_eq!(
            decode(&encode(&empty, &master, &vault_id), &master, &vault_id),
            None
        );
    }

    #[test]
    fn a_record_written_reads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (prefix, master, vault_id) = fixture();
        assert_eq!(read(dir.path(), &master, &vault_id), None);
        write(dir.path(), &prefix, &master, &vault_id).expect("write");
        assert_eq!(read(dir.path(), &master, &vault_id), Some(prefix));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
        // A record with anything after it, however much, is ignored; it is
        // read no further than one byte past a record.
        let mut longer = encode(&prefix, &master, &vault_id).to_vec();
        longer.resize(8 << 20, 0);
        std::fs::write(dir.path().join(FILE), &longer).expect("write");
        assert_eq!(read(dir.path(), &master, &vault_id), None);
    }

    /// What someone who can only change the data dir puts there gets the
    /// open no further than a full verification: a pipe in the record's
    /// place is not waited on, a link to a good record is not followed,
    /// and a link at the temporary name is replaced, not written through.
    #[test]
    fn no_pipe_is_waited_on_and_no_link_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (prefix, master, vault_id) = fixture();
        let made = std::process::Command::new("mkfifo")
            .arg(dir.path().join(FILE))
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "mkfifo");
        assert_eq!(read(dir.path(), &master, &vault_id), None);
        std::fs::remove_file(dir.path().join(FILE)).expect("remove the pipe");

        let elsewhere = tempfile::tempdir().expect("temp dir");
        write(elsewhere.path(), &prefix, &master, &vault_id).expect("write");
        std::os::unix::fs::symlink(elsewhere.path().join(FILE), dir.path().join(FILE))
            .expect("link");
        assert_eq!(read(dir.path(), &master, &vault_id), None);
        std::fs::remove_file(dir.path().join(FILE)).expect("remove the link");

        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, b"kept").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.path().join(format!("{FILE}.tmp"))).expect("link");
        write(dir.path(), &prefix, &master, &vault_id).expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"kept");
        assert_eq!(read(dir.path(), &master, &vault_id), Some(prefix));
    }
}
