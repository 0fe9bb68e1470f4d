//! `vaultd dev`: the newcomer's first command. It creates a vault in a local
//! data dir with a generated dev passphrase, writes demo records and
//! events, and verifies the result with the public key.

use std::path::{Path, PathBuf};

use serde::Serialize;
use storage::{Append, Kind, Options, Unlock, VerifyOptions};

use crate::{Error, Result};

/// Demo subjects and their records (fictitious people).
pub const DEMO_RECORDS: &[(&str, &str)] = &[
    (
        "cust-0001",
        r#"{"name":"Ada Lovelace","email":"ada@example.com","iban":"GB33BUKB20201555555555","dob":"1815-12-10","income":"84000"}"#,
    ),
    (
        "cust-0002",
        r#"{"name":"Alan Turing","email":"alan@example.com","iban":"GB94BARC10201530093459","dob":"1912-06-23","income":"72000"}"#,
    ),
    (
        "cust-0003",
        r#"{"name":"Grace Hopper","email":"grace@example.com","iban":"DE89370400440532013000","dob":"1906-12-09","income":"91000"}"#,
    ),
];

/// What `vaultd dev` reports.
#[derive(Debug, Serialize)]
pub struct DevOutput {
    pub data_dir: PathBuf,
    pub passphrase_file: PathBuf,
    pub public_key: String,
    pub admin_api_key: String,
    pub demo_subject_id: String,
    pub entries: u64,
    pub verified: bool,
}

/// Creates (or reopens) the dev vault in `data_dir`, appends the demo data
/// and verifies the log with the vault's public key.
pub async fn run(data_dir: &Path) -> Result<DevOutput> {
    let passphrase_file = data_dir.join("dev-passphrase");
    let fresh = !data_dir.join("db").exists();
    let (vault, admin_api_key) = if fresh {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::File {
            path: data_dir.display().to_string(),
            source,
        })?;
        let pass = storage::generate_api_key();
        write_private(&passphrase_file, pass.as_bytes())?;
        let unlock = Unlock::passphrase(pass.as_bytes().to_vec());
        let created = storage::Vault::create(data_dir, &unlock, Options::default())?;
        (created.vault, created.admin_api_key.to_string())
    } else {
        let unlock = crate::secrets::unlock_from(Some(&passphrase_file), None)?;
        let dir = data_dir.to_path_buf();
        let vault = tokio::task::spawn_blocking(move || {
            storage::Vault::open(&dir, &unlock, Options::default())
        })
        .await
        .map_err(|e| Error::Usage(e.to_string()))??;
        (vault, "(shown when the dev vault was created)".into())
    };
    let mut items: Vec<Append> = DEMO_RECORDS
        .iter()
        .map(|(s, r)| Append::record(*s, r.as_bytes().to_vec()))
        .collect();
    items.push(Append::event(
        Kind::ConsentGranted,
        DEMO_RECORDS[0].0,
        &serde_json::json!({"partner_id": "demo-lender", "purposes": ["credit_check"]}),
    ));
    let receipts = vault.append_batch(items).await?;
    let public_key = vault.public_key();
    for r in &receipts {
        r.verify(&public_key)
            .map_err(|e| Error::Usage(format!("a receipt failed to verify: {e}")))?;
    }
    vault.close()?;
    let dir = data_dir.to_path_buf();
    let report = tokio::task::spawn_blocking(move || {
        storage::verify(
            &dir,
            &VerifyOptions {
                public_key: Some(public_key),
                ..Default::default()
            },
        )
    })
    .await
    .map_err(|e| Error::Usage(e.to_string()))??;
    Ok(DevOutput {
        data_dir: data_dir.to_path_buf(),
        passphrase_file,
        public_key: hex::encode(public_key.as_bytes()),
        admin_api_key,
        demo_subject_id: DEMO_RECORDS[0].0.to_string(),
        entries: report.entries,
        verified: report.ok(),
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let err = |source| Error::File {
        path: path.display().to_string(),
        source,
    };
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}
