//! Reading secrets from files: what unseals the master key, API keys.
//!
//! A passphrase file holds the passphrase (a trailing newline is ignored);
//! a key file holds 32 raw bytes or 64 hex digits. Contents live only in
//! zeroized buffers.

use std::path::Path;

use storage::Unlock;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// The most a secret file may hold: a passphrase, a key, an API key are
/// far shorter, and a path given by mistake (`/dev/zero`, a log) is
/// refused rather than read into memory whole.
pub const MAX_SECRET_FILE_BYTES: usize = 64 * 1024;

/// The file's bytes, in one buffer allocated once (so that no copy is
/// left behind unzeroized by a reallocation), at most
/// [`MAX_SECRET_FILE_BYTES`].
fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    client::cli::read_secret(path, MAX_SECRET_FILE_BYTES)
        .map_err(|error| Error::File {
            path: path.display().to_string(),
            error,
        })?
        .ok_or_else(|| {
            Error::Usage(format!(
                "{}: more than {} KiB: not a secret file",
                path.display(),
                MAX_SECRET_FILE_BYTES >> 10
            ))
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

/// Whether a path flag's value came from the environment variable `var`
/// rather than the command line: it is the variable's (clap hands over
/// the value, not where it came from).
pub fn from_env(value: Option<&Path>, var: &str) -> bool {
    value.is_some() && value == std::env::var_os(var).as_deref().map(Path::new)
}

/// [`unlock_from`] of a command's `--passphrase-file` and `--key-file`,
/// each of which may also come from its variable (`FINTRUST_PASSPHRASE_FILE`,
/// `FINTRUST_KEY_FILE`): one given on the command line wins over the
/// other's variable, as a flag wins over the environment everywhere
/// else. Both on the command line, or both from the environment, are
/// refused; [`from_env`] tells where each came from.
pub fn unlock_from_args(passphrase_file: Option<&Path>, key_file: Option<&Path>) -> Result<Unlock> {
    let passphrase_env = from_env(passphrase_file, "FINTRUST_PASSPHRASE_FILE");
    let key_env = from_env(key_file, "FINTRUST_KEY_FILE");
    match (passphrase_file, key_file) {
        (Some(_), Some(_)) if key_env && !passphrase_env => unlock_from(passphrase_file, None),
        (Some(_), Some(_)) if passphrase_env && !key_env => unlock_from(None, key_file),
        _ => unlock_from(passphrase_file, key_file),
    }
}

/// A new master secret to send over the wire (`RotateMasterKey`): the
/// bytes of exactly one of a passphrase file or a key file, read once
/// (a pipe, `<(…)`, can be read only once) and checked as the server will
/// check them ([`unlock_of`]), so that a bad file fails before anything is
/// sent.
pub fn master_secret_from(
    passphrase_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<(protocol::SecretKind, Zeroizing<Vec<u8>>)> {
    let (kind, path) = match (passphrase_file, key_file) {
        (Some(p), None) => (protocol::SecretKind::Passphrase, p),
        (None, Some(k)) => (protocol::SecretKind::KeyFile, k),
        _ => {
            return Err(Error::Usage(
                "give one of --new-passphrase-file or --new-key-file".into(),
            ))
        }
    };
    let bytes = read(path)?;
    unlock_of(kind, &bytes).map_err(|why| Error::Usage(format!("{}: {why}", path.display())))?;
    Ok((kind, bytes))
}

/// The [`Unlock`] of a master secret sent over the wire (`RotateMasterKey`):
/// a passphrase, or a key file's content; the reason when it cannot be
/// one.
pub fn unlock_of(kind: protocol::SecretKind, secret: &[u8]) -> std::result::Result<Unlock, String> {
    match kind {
        protocol::SecretKind::Passphrase => {
            passphrase(secret).ok_or_else(|| "the passphrase is empty".to_string())
        }
        protocol::SecretKind::KeyFile => Unlock::key_file(secret).map_err(|e| e.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that is not a secret file (`/dev/zero`, endless) is refused
    /// after [`MAX_SECRET_FILE_BYTES`] + 1 bytes, not read whole; a file
    /// of the largest size is read.
    #[test]
    fn a_secret_file_is_read_up_to_its_bound() {
        let e = read(Path::new("/dev/zero")).expect_err("endless");
        assert!(e.to_string().contains("not a secret file"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let full = dir.path().join("full");
        std::fs::write(&full, vec![b'a'; MAX_SECRET_FILE_BYTES]).expect("write");
        assert_eq!(read(&full).expect("read").len(), MAX_SECRET_FILE_BYTES);
        std::fs::write(&full, vec![b'a'; MAX_SECRET_FILE_BYTES + 1]).expect("write");
        assert!(read(&full).is_err());
        let missing = read(&dir.path().join("missing")).expect_err("missing");
        assert!(matches!(missing, Error::File { .. }), "{missing}");
        let p = dir.path().join("p");
        std::fs::write(&p, "correct horse\n").expect("write");
        assert!(unlock_from(Some(&p), None).is_ok());
    }
}
