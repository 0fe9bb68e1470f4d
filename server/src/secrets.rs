//! Reading secrets from files: what unseals the master key, API keys.
//!
//! A passphrase file holds the passphrase (a trailing newline is ignored);
//! a key file holds 32 raw bytes or 64 hex digits. Contents live only in
//! zeroized buffers.

use std::path::Path;

use storage::Unlock;
use zeroize::Zeroizing;

use crate::{Error, Result};

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| Error::File {
            path: path.display().to_string(),
            error: source,
        })
}

/// Builds the [`Unlock`] from exactly one of a passphrase file or a key file.
pub fn unlock_from(passphrase_file: Option<&Path>, key_file: Option<&Path>) -> Result<Unlock> {
    match (passphrase_file, key_file) {
        (Some(p), None) => passphrase(&read(p)?)
            .ok_or_else(|| Error::Usage(format!("{}: the passphrase is empty", p.display()))),
        (None, Some(k)) => Ok(Unlock::key_file(&read(k)?)?),
        (Some(_), Some(_)) => Err(Error::Usage(
            "give either --passphrase-file or --key-file, not both".into(),
        )),
        (None, None) => Err(Error::Usage(
            "a passphrase file (--passphrase-file) or key file (--key-file) is required".into(),
        )),
    }
}

/// The [`Unlock`] of a passphrase given as bytes (a trailing newline is
/// ignored); `None` when nothing is left.
pub fn passphrase(bytes: &[u8]) -> Option<Unlock> {
    match Unlock::passphrase(bytes.to_vec()) {
        Unlock::Passphrase(v) if v.is_empty() => None,
        unlock => Some(unlock),
    }
}

/// Reads an API key from a file: its content with surrounding whitespace
/// removed, which must not be empty.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::Usage(format!("{}: not UTF-8", path.display())))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(Error::Usage(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(key.to_string()))
}

/// An API key a command prints once (`vaultd init`, `vaultd dev`): it
/// serializes as the key, `Debug` shows `<redacted>`, the key is read
/// with [`ShownOnce::expose`] to print it, and it is zeroized when
/// dropped.
#[derive(serde::Serialize)]
#[serde(transparent)]
pub struct ShownOnce(String);

impl ShownOnce {
    /// The key, to print it once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ShownOnce {
    fn from(key: String) -> Self {
        ShownOnce(key)
    }
}

impl std::fmt::Debug for ShownOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for ShownOnce {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}
