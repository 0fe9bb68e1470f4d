//! `vaultd init`: create a vault in a data dir.

use std::path::PathBuf;

use serde::Serialize;
use storage::{Options, Unlock, Vault};

use crate::secrets::ShownOnce;
use crate::Result;

/// What `vaultd init` prints (`--json`). The admin API key is shown once
/// ([`ShownOnce`]: `Debug` leaves it out, and it is zeroized when dropped).
#[derive(Debug, Serialize)]
pub struct InitOutput {
    #[serde(serialize_with = "crate::path_text")]
    pub data_dir: PathBuf,
    /// Hex of the ed25519 verifying key: pin it for `vault-verify`.
    pub public_key: String,
    pub vault_id: String,
    pub admin_api_key: ShownOnce,
    pub admin_credential_id: String,
}

/// `vaultd init`: creates a vault (refusing an existing one), closes it,
/// and hands what to print to `show`, all or nothing. The admin API key
/// exists only in that output, so a vault whose output could not be
/// shown (stdout closed, say) would have no admin: when creating, closing
/// or showing fails, what this call added to the data dir is removed
/// again (the dir itself too if this call made it), so that the same
/// command can be run again; what was there before is left alone.
pub fn create_and_show(
    data_dir: PathBuf,
    unlock: &Unlock,
    opts: Options,
    show: impl FnOnce(&InitOutput) -> std::io::Result<()>,
) -> Result<()> {
    // What a creation that did not finish left is removed first (or the
    // init refused, nothing removed), so that what is there next is what
    // a failure leaves alone. Nothing is done where there is none.
    Vault::start_over(&data_dir)?;
    let before = Before::look(&data_dir);
    let done = init(data_dir.clone(), unlock, opts).and_then(|(vault, out)| {
        vault.close()?;
        show(&out).map_err(|error| crate::Error::File {
            path: "stdout".into(),
            error,
        })
    });
    // A vault there already, another process creating one (the lock), or
    // a dir refused before anything was made in it: nothing there is this
    // call's to remove (what another process made meanwhile included).
    let not_ours = matches!(
        &done,
        Err(crate::Error::Storage(
            storage::Error::AlreadyExists(_)
                | storage::Error::Locked
                | storage::Error::DirRefused(_)
        ))
    );
    if done.is_err() && !not_ours {
        before.restore(&data_dir);
    }
    done
}

/// What a data dir held before `vaultd init`: the names in it, or that
/// it was not there.
enum Before {
    Absent,
    Names(std::collections::HashSet<std::ffi::OsString>),
    /// Unreadable: nothing is removed after a failure.
    Unknown,
}

impl Before {
    fn look(dir: &std::path::Path) -> Before {
        match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<std::io::Result<_>>()
                .map_or(Before::Unknown, Before::Names),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Before::Absent,
            Err(_) => Before::Unknown,
        }
    }

    /// Removes what was added to `dir` since [`Before::look`].
    fn restore(&self, dir: &std::path::Path) {
        let removed = match self {
            Before::Unknown => return,
            Before::Absent => std::fs::remove_dir_all(dir).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
            Before::Names(names) => std::fs::read_dir(dir).and_then(|entries| {
                for e in entries {
                    let e = e?;
                    if names.contains(&e.file_name()) {
                        continue;
                    }
                    let path = e.path();
                    if e.file_type()?.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                }
                Ok(())
            }),
        };
        match removed {
            Ok(()) => {
                tracing::info!(data_dir = %dir.display(), "init failed: what it created was removed")
            }
            Err(e) => tracing::warn!(
                data_dir = %dir.display(),
                error = %e,
                "init failed, and what it created could not all be removed: remove the data dir before trying again"
            ),
        }
    }
}

/// Creates a vault; refuses an existing one. Returns the open vault too.
pub fn init(data_dir: PathBuf, unlock: &Unlock, opts: Options) -> Result<(Vault, InitOutput)> {
    let created = Vault::create(&data_dir, unlock, opts)?;
    let out = InitOutput {
        data_dir,
        public_key: hex::encode(created.vault.public_key().as_bytes()),
        vault_id: hex::encode(created.vault.vault_id()),
        admin_api_key: created.admin_api_key.to_string().into(),
        admin_credential_id: created.admin_credential_id.clone(),
    };
    Ok((created.vault, out))
}

/// What `vaultd rotate-master-key` prints.
#[derive(Debug, Serialize)]
pub struct RotateMasterOutput {
    #[serde(serialize_with = "crate::path_text")]
    pub data_dir: PathBuf,
    /// Seq of the `key_rotated` entry `{"key":"master",…}`.
    pub seq: u64,
    /// Hex of that entry's hash.
    pub entry_hash: String,
}

/// What to tell the operator when a master key rotation failed in a way
/// that leaves its outcome unknown.
pub const MAYBE_ROTATED: &str = "the rotation may have taken effect before this failure: keep \
     both the old and the new secret; `vault-admin keys` shows the master key's age (a new \
     master if it did), and vaultd opens with the one that seals it (try the new secret first)";

/// What to tell the operator when a master key rotation is durable at
/// `seq` and a step after it (`what`) failed: the new secret is the only
/// one that opens the vault.
pub fn rotated_but(seq: u64, what: &str) -> String {
    format!(
        "the master key was rotated (seq {seq}): the vault now opens with the new secret \
         only; what failed is {what}"
    )
}

/// Whether a failed `Vault::rotate_master_key` may still have rotated
/// the key: a write that failed once the rotation's record may be on disk
/// (I/O, a poisoned vault). A refusal (the secret, the vault's state) did
/// nothing.
pub fn rotation_outcome_unknown(e: &storage::Error) -> bool {
    matches!(
        e,
        storage::Error::Io(_) | storage::Error::Poisoned | storage::Error::Sled(_)
    )
}

/// Rotates the master key of a stopped vault: opens it with `old`
/// (refused with `WrongSecret` otherwise), re-wraps every key under a new
/// master sealed by `new`, and closes it. Afterwards only `new` opens it
/// (docs/keys.md). A running vault does the same through
/// [`Vault::rotate_master_key`].
pub fn rotate_master_key(
    data_dir: PathBuf,
    old: &Unlock,
    new: &Unlock,
    opts: Options,
) -> Result<RotateMasterOutput> {
    let vault = Vault::open(&data_dir, old, opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(storage::Error::Io)?;
    let receipt = rt.block_on(vault.rotate_master_key(new)).inspect_err(|e| {
        if rotation_outcome_unknown(e) {
            tracing::error!("{MAYBE_ROTATED}");
        }
    })?;
    vault.close().inspect_err(|_| {
        tracing::error!("{}", rotated_but(receipt.seq, "closing the vault"));
    })?;
    Ok(RotateMasterOutput {
        data_dir,
        seq: receipt.seq,
        entry_hash: hex::encode(receipt.entry_hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data dir whose path is not UTF-8 is shown with its odd bytes
    /// replaced: the JSON of a rotation that was done (or of a new vault's
    /// admin key) is still printed.
    #[test]
    fn a_path_that_is_not_utf8_is_shown_not_refused() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::path::Path::new(std::ffi::OsStr::from_bytes(b"/srv/v\xff1"));
        let out = RotateMasterOutput {
            data_dir: dir.to_path_buf(),
            seq: 7,
            entry_hash: "ab".into(),
        };
        let json = serde_json::to_value(&out).expect("serializes");
        assert_eq!(json["data_dir"], "/srv/v\u{fffd}1");
        assert_eq!(json["seq"], 7);
    }

    /// The admin key is printed once, by the command, never by `Debug`.
    #[test]
    fn debug_prints_no_key() {
        let out = InitOutput {
            data_dir: "d".into(),
            public_key: "pk".into(),
            vault_id: "v".into(),
            admin_api_key: "fvk_not_for_logs".to_string().into(),
            admin_credential_id: "c".into(),
        };
        let text = format!("{out:?}");
        assert!(
            !text.contains("fvk_not_for_logs") && text.contains("redacted"),
            "{text}"
        );
    }
}
