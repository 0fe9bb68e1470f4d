//! `vault-verify`: run [`storage::verify`] and describe the outcome.

use serde::Serialize;
use storage::Report;

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

/// `vault-verify --json` output.
#[derive(Debug, Serialize)]
pub struct VerifyJson {
    pub ok: bool,
    pub entries: u64,
    pub head: Option<String>,
    pub head_seq: Option<u64>,
    pub failure: Option<FailureJson>,
    pub shredded: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
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
            warning: r.used_stored_key.then_some(STORED_KEY_WARNING),
        }
    }
}

/// A one-line human summary.
pub fn summary(r: &Report) -> String {
    match &r.failure {
        None => format!(
            "OK: {} entries verified; head {}",
            r.entries,
            r.head.map(hex::encode).unwrap_or_else(|| "-".into())
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
