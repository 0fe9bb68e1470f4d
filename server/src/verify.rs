//! `vault-verify`: run [`storage::verify`](fn@storage::verify) (or, with `--remote`,
//! [`crate::remote::verify_remote`], or with `--file`,
//! [`storage::export::verify_export`]) and describe the outcome.

use std::path::Path;

use serde::Serialize;
use storage::export::ExportReport;
use storage::{Report, SignedHead};

use crate::remote::RemoteReport;

/// Exit code: the vault is intact.
pub const EXIT_OK: i32 = 0;
/// Exit code: an integrity failure was found.
pub const EXIT_INTEGRITY: i32 = 1;
/// Exit code: the check could not run (usage, I/O, locked, no vault).
pub const EXIT_ERROR: i32 = 2;

/// Warning printed when no public key was pinned.
pub const STORED_KEY_WARNING: &str =
    "no --public-key given: checked against the key stored in the data dir, \
so this proves only as much as that directory can be trusted";

/// How a tool opened a data dir it only reads (`vault-verify --data-dir`,
/// `vault-admin export --data-dir`, `vault-admin audit --data-dir`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// As a vault opens it, which may write to it (section 7 of
    /// `docs/storage.md`).
    Writable,
    /// Without writing to it, as `--read-only` asked.
    ReadOnly,
    /// Without writing to it, because the open that writes failed on a
    /// dir it cannot write (`EROFS`, `EACCES`).
    ReadOnlyFallback,
}

/// Runs `writable()`, or `read_only_open(scratch)` with a scratch dir
/// under the system's temporary dir when `read_only` is asked for or when
/// `writable` fails because the dir cannot be written; the data dir is
/// never written to in the second case. Returns what the open gave, how
/// the dir was opened, and the scratch dir (removed when dropped: keep it
/// while the result is in use).
pub fn open_data_dir<T>(
    read_only: bool,
    writable: impl FnOnce() -> storage::Result<T>,
    read_only_open: impl FnOnce(&Path) -> storage::Result<T>,
) -> storage::Result<(T, Opened, Option<tempfile::TempDir>)> {
    let with_scratch = |opened| {
        let scratch = tempfile::Builder::new()
            .prefix("fintrust-scratch-")
            .tempdir()?;
        read_only_open(scratch.path()).map(|t| (t, opened, Some(scratch)))
    };
    if read_only {
        return with_scratch(Opened::ReadOnly);
    }
    match writable() {
        Err(storage::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            with_scratch(Opened::ReadOnlyFallback)
        }
        other => other.map(|t| (t, Opened::Writable, None)),
    }
}

/// The note a tool prints on stderr when it fell back to a read-only open.
pub fn fallback_note(dir: &Path) -> String {
    format!(
        "note: {} cannot be written: opened read-only, with a copy of its sled database in a temporary dir",
        dir.display()
    )
}

/// `vault-verify --json` output.
#[derive(Debug, Serialize)]
pub struct VerifyJson {
    pub ok: bool,
    pub entries: u64,
    pub head: Option<String>,
    pub head_seq: Option<u64>,
    pub failure: Option<FailureJson>,
    pub shredded: Vec<String>,
    /// The signing key in force at the end of the log: the pinned key is
    /// key 0, and each rotation's endorsement was followed from it.
    pub signing_key_id: u32,
    /// Public keys of signing keys 1.., in order (hex).
    pub signing_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
    /// `"remote"` for `--remote`, `"file"` for `--file`; absent for a
    /// data dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    /// Remote mode: the address verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Remote mode: the seq of the signed head verified against (the
    /// server's head when the run started), also on failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_head_seq: Option<u64>,
    /// Remote mode: the signed head's timestamp (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_timestamp_ms: Option<u64>,
    /// File mode: the vault id the export's header names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vault_id: Option<String>,
    /// Commit groups whose head (fields, Merkle root, signature) was
    /// checked: one `verify_strict` each, which is most of the time a log
    /// of small groups takes to verify.
    pub groups: u64,
    /// Remote mode: receipts checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipts_checked: Option<u64>,
    /// Remote mode: wall time of the run in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// With `--head-file`: the seq of the kept head checked against the
    /// log (absent when the file did not exist yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_head_seq: Option<u64>,
    /// Shredded subjects whose keys are still in the key store: a shred
    /// whose entry is in the log but whose deletion a crash interrupted
    /// (the `shredding` marker names them); the next open of the vault
    /// deletes them. Absent when there is none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shred_pending: Vec<String>,
    /// Retired signing keys still in the key store, likewise (the next
    /// open deletes them). Absent when there is none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired_signing_pending: Vec<u32>,
}

/// The notes a report calls for besides its verdict: the subjects the log
/// shreds, and keys the log destroyed that are still stored, which the
/// next open deletes. Printed on stderr, so that an auditor sees what
/// was shredded and what a shred left behind.
pub fn notes(r: &Report) -> Vec<String> {
    const NAMED: usize = 20;
    let mut out = Vec::new();
    if !r.shredded.is_empty() {
        let n = r.shredded.len();
        let mut names = r.shredded[..n.min(NAMED)].join(", ");
        if n > NAMED {
            names.push_str(&format!(
                ", and {} more (--format json lists them all)",
                n - NAMED
            ));
        }
        out.push(format!(
            "shredded: {n} subject(s), whose data keys the log records destroyed: {names}"
        ));
    }
    if !r.shred_pending.is_empty() {
        out.push(format!(
            "note: the keys of shredded subjects {} are still in the key store (a shred a crash \
             interrupted); the next open of the vault deletes them",
            r.shred_pending.join(", ")
        ));
    }
    if !r.retired_signing_pending.is_empty() {
        let ids: Vec<String> = r
            .retired_signing_pending
            .iter()
            .map(u32::to_string)
            .collect();
        out.push(format!(
            "note: retired signing keys {} are still in the key store; the next open of the \
             vault deletes them",
            ids.join(", ")
        ));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct FailureJson {
    pub seq: u64,
    pub reason: String,
    pub detail: String,
}

impl From<&Report> for VerifyJson {
    fn from(r: &Report) -> Self {
        VerifyJson {
            ok: r.ok(),
            entries: r.entries,
            head: r.head.map(hex::encode),
            head_seq: r.entries.checked_sub(1),
            failure: r.failure.as_ref().map(|(seq, reason)| FailureJson {
                seq: *seq,
                reason: reason.code().to_string(),
                detail: reason.to_string(),
            }),
            shredded: r.shredded.clone(),
            signing_key_id: r.signing_keys.last().map_or(0, |e| e.key_id),
            signing_keys: r
                .signing_keys
                .iter()
                .map(|e| hex::encode(e.public_key))
                .collect(),
            warning: r.used_stored_key.then_some(STORED_KEY_WARNING),
            mode: None,
            server: None,
            vault_id: None,
            signed_head_seq: None,
            head_timestamp_ms: None,
            groups: r.groups,
            receipts_checked: None,
            elapsed_ms: None,
            kept_head_seq: None,
            shred_pending: r.shred_pending.clone(),
            retired_signing_pending: r.retired_signing_pending.clone(),
        }
    }
}

impl From<&RemoteReport> for VerifyJson {
    fn from(r: &RemoteReport) -> Self {
        VerifyJson {
            mode: Some("remote"),
            server: Some(r.addr.clone()),
            signed_head_seq: r.report.signed_head.map(|h| h.last_seq),
            head_timestamp_ms: r.report.signed_head.map(|h| h.timestamp_ms),
            receipts_checked: Some(r.receipts_checked),
            elapsed_ms: Some(u64::try_from(r.elapsed.as_millis()).unwrap_or(u64::MAX)),
            ..VerifyJson::from(&r.report)
        }
    }
}

impl From<&ExportReport> for VerifyJson {
    fn from(r: &ExportReport) -> Self {
        VerifyJson {
            mode: Some("file"),
            vault_id: Some(hex::encode(r.vault_id)),
            signed_head_seq: r.report.signed_head.map(|h| h.last_seq),
            head_timestamp_ms: r.report.signed_head.map(|h| h.timestamp_ms),
            ..VerifyJson::from(&r.report)
        }
    }
}

/// Reads a head file (`vault-verify --head-file`): one line, the lowercase
/// hex of a signed head as encoded in receipts (docs/storage.md, section
/// 5), then a newline. `None` when the file does not exist yet.
pub fn read_head_file(path: &Path) -> Result<Option<SignedHead>, String> {
    // A head in hex is a few hundred bytes: more is not one, and is not
    // read whole (the path may name anything); nor is anything but a
    // file opened (a pipe's open would wait for a writer).
    const MOST: u64 = 4096;
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(format!("{} is not a file", path.display()));
        }
        _ => {}
    }
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| {
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MOST + 1), &mut text)
    });
    match read {
        Ok(n) if n as u64 > MOST => {
            return Err(format!("{} is too long to hold a head", path.display()))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let bytes = hex::decode(text.trim())
        .map_err(|_| format!("{} does not hold a head in hex", path.display()))?;
    SignedHead::decode(&bytes)
        .map(Some)
        .map_err(|e| format!("{} does not hold a signed head: {e}", path.display()))
}

/// Checks, before a run's scan, that a head can be kept at `path`: its
/// directory takes a new file (the one [`write_head_file`] writes and
/// renames). A path that cannot is said at once, not after the scan of a
/// whole log.
pub fn check_head_file_dir(path: &Path) -> Result<(), String> {
    let dir = crate::admin::dir_of(path);
    if path.file_name().is_none() {
        return Err(format!(
            "{}: the head file needs a file name",
            path.display()
        ));
    }
    tempfile::Builder::new()
        .prefix(".vault-verify-head-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| format!("cannot keep a head in {}: {e}", dir.display()))
}

/// Keeps `head` in the head file at `path`, and returns the head the file
/// holds after: `head`, or a later one that another run kept meanwhile (a
/// cron run that overlapped this one), which is never replaced by an
/// earlier one. `checked` is the head the file held when this run read it,
/// which the run checked its log against: a head another run kept since,
/// no later than `head` and not `head` itself, was not checked, so it is
/// not replaced (an error says to run again). Under an exclusive lock on
/// the file's directory, written to a temporary file of a random name
/// beside it, synced, renamed over it, and the directory synced, so that
/// a crash leaves the old head or the new one.
pub fn write_head_file(
    path: &Path,
    head: &SignedHead,
    checked: Option<&SignedHead>,
) -> std::io::Result<SignedHead> {
    use std::io::Write;
    let dir = crate::admin::dir_of(path);
    if path.file_name().is_none() {
        return Err(std::io::Error::other("the head file needs a file name"));
    }
    // Released when dropped, after the rename.
    let lock = std::fs::File::open(dir)?;
    lock.lock()?;
    if let Ok(Some(kept)) = read_head_file(path) {
        if kept.last_seq > head.last_seq || kept == *head {
            return Ok(kept);
        }
        if Some(&kept) != checked {
            return Err(std::io::Error::other(format!(
                "the head file changed during this run: another run kept the head of seq {}, \
                 which this run did not check its log against; run it again to check that",
                kept.last_seq
            )));
        }
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".vault-verify-head-")
        .tempfile_in(dir)?;
    tmp.write_all(format!("{}\n", hex::encode(head.encode())).as_bytes())?;
    // A signed head is public: readable as a file written the usual way
    // (a temporary file is made 0600).
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    lock.sync_all()?;
    Ok(*head)
}

/// A one-line human summary of an export file's check.
pub fn file_summary(r: &ExportReport) -> String {
    match &r.report.failure {
        None => format!(
            "OK: {} entries verified in the export of vault {}; head seq {} hash {}; {} commit groups",
            r.report.entries,
            hex::encode(r.vault_id),
            r.report.entries.saturating_sub(1),
            r.report.head.map(hex::encode).unwrap_or_else(|| "-".into()),
            r.report.groups
        ),
        Some(_) => summary(&r.report),
    }
}

/// A one-line human summary of a remote run.
pub fn remote_summary(r: &RemoteReport) -> String {
    match &r.report.failure {
        None => format!(
            "OK: {} entries verified at {}; head seq {} hash {} (signed at {} ms); \
             {} commit groups, {} receipts, in {:.1} s",
            r.report.entries,
            r.addr,
            r.report.entries.saturating_sub(1),
            r.report.head.map(hex::encode).unwrap_or_else(|| "-".into()),
            r.report
                .signed_head
                .map_or_else(|| "-".into(), |h| h.timestamp_ms.to_string()),
            r.report.groups,
            r.receipts_checked,
            r.elapsed.as_secs_f64()
        ),
        Some(_) => summary(&r.report),
    }
}

/// A one-line human summary.
pub fn summary(r: &Report) -> String {
    match &r.failure {
        None => format!(
            "OK: {} entries verified; head {}; signing key {}; {} commit groups",
            r.entries,
            r.head.map(hex::encode).unwrap_or_else(|| "-".into()),
            r.signing_keys.last().map_or(0, |e| e.key_id),
            r.groups
        ),
        Some((seq, reason)) => format!("INTEGRITY FAILURE at seq {seq}: {reason}"),
    }
}

/// The exit code for a report.
pub fn exit_code(r: &Report) -> i32 {
    if r.ok() {
        EXIT_OK
    } else {
        EXIT_INTEGRITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys a shred or a signing rotation destroyed in the log but a crash
    /// left in the store are told on stderr and in the JSON, and a report
    /// without them says nothing of them.
    #[test]
    fn keys_left_by_an_interrupted_shred_are_told() {
        let r = Report {
            shred_pending: vec!["bob".into()],
            retired_signing_pending: vec![1],
            ..Report::default()
        };
        let told = notes(&r);
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(
            told[0].contains("bob") && told[1].contains(" 1 "),
            "{told:?}"
        );
        let json = serde_json::to_value(VerifyJson::from(&r)).expect("JSON");
        assert_eq!(json["shred_pending"], serde_json::json!(["bob"]));
        assert_eq!(json["retired_signing_pending"], serde_json::json!([1]));
        let quiet = Report::default();
        assert!(notes(&quiet).is_empty());
        // Shredded subjects are named, the first twenty of them.
        let shredded = Report {
            shredded: (0..25).map(|i| format!("cust-{i}")).collect(),
            ..Report::default()
        };
        let told = notes(&shredded);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].starts_with("shredded: 25 subject(s)")
                && told[0].contains("cust-19, and 5 more")
                && !told[0].contains("cust-20"),
            "{told:?}"
        );
        let json = serde_json::to_value(VerifyJson::from(&quiet)).expect("JSON");
        assert!(
            json.get("shred_pending").is_none() && json.get("retired_signing_pending").is_none()
        );
    }

    /// The head file of docs/storage.md, section 8: the vector HEAD of
    /// section 10, as that page prints it, in hex on one line.
    #[test]
    fn the_head_file_holds_the_head_vector() {
        let page = include_str!("../../docs/storage.md");
        let hex_line = page
            .lines()
            .filter_map(|l| l.strip_prefix("HEAD "))
            .find(|h| h.len() == 314 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .expect("docs/storage.md shows the vector HEAD");
        let head = SignedHead::decode(&hex::decode(hex_line).expect("hex")).expect("a head");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kept-head");
        assert_eq!(read_head_file(&path), Ok(None), "no file yet");
        check_head_file_dir(&path).expect("a dir that takes it");
        write_head_file(&path, &head, None).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{hex_line}\n"));
        assert_eq!(text.len(), 315);
        assert_eq!(read_head_file(&path), Ok(Some(head)));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["kept-head"], "no temporary file is left");
        for bad in ["", "zz\n", &hex_line[..100]] {
            std::fs::write(&path, bad).expect("write");
            assert!(read_head_file(&path).is_err(), "{bad:?}");
        }
        // Longer than a head, or not a file: refused, not read whole.
        std::fs::write(&path, "0".repeat(5000)).expect("write");
        assert!(read_head_file(&path).is_err_and(|e| e.contains("too long")));
        assert!(read_head_file(dir.path()).is_err_and(|e| e.contains("not a file")));
        let zero = std::path::Path::new("/dev/zero");
        assert!(read_head_file(zero).is_err_and(|e| e.contains("not a file")));
    }

    /// Two runs that overlap: the one that verified the longer log kept
    /// its head first, and the other's earlier head does not replace it.
    #[test]
    fn an_earlier_head_never_replaces_a_later_one() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let head = |last_seq| SignedHead::sign(&key, 0, last_seq, last_seq, [1; 32], [2; 32], 3);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kept-head");
        assert_eq!(
            write_head_file(&path, &head(150), None).expect("write"),
            head(150)
        );
        assert_eq!(
            write_head_file(&path, &head(100), None).expect("write"),
            head(150)
        );
        assert_eq!(read_head_file(&path), Ok(Some(head(150))));
        assert_eq!(
            write_head_file(&path, &head(151), Some(&head(150))).expect("write"),
            head(151)
        );
        assert_eq!(read_head_file(&path), Ok(Some(head(151))));
        // A run that checked its log against 100 while another kept 151:
        // its later head is not put over one it never checked.
        let e = write_head_file(&path, &head(160), Some(&head(100))).expect_err("unchecked");
        assert!(e.to_string().contains("changed during this run"), "{e}");
        assert_eq!(read_head_file(&path), Ok(Some(head(151))));
        // Nor is a head of the same seq that is another (a fork's).
        let fork = SignedHead::sign(&key, 0, 151, 151, [9; 32], [2; 32], 3);
        assert!(write_head_file(&path, &fork, Some(&head(150))).is_err());
        // A directory that cannot take the file is said before a scan.
        assert!(check_head_file_dir(&dir.path().join("no-such-dir").join("head")).is_err());
    }
}
