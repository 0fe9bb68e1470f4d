//! `vault-admin`: the operator's tool for a vault, over the protocol with
//! an admin API key, or (where it says so) offline on a stopped vault's
//! data dir. Subcommands:
//!
//! - `shred --subject S`: crypto-shred a subject.
//! - `rotate-subject-key --subject S [--reencrypt]`: a new data key version.
//! - `rotate-signing-key [--data-dir DIR …]`: a new signing key, endorsed
//!   by the current one; old receipts verify through the key chain.
//! - `rotate-master-key --new-passphrase-file F|--new-key-file F
//!   [--data-dir DIR …]`: re-wrap every key under a new master key (the
//!   secret crosses the connection: TLS or loopback only).
//! - `keys`: every key, its age, use and state.
//! - `status`: the signed head, the entry count, key ages, and warnings
//!   when a key is older than the server's rotation policy allows.
//! - `credentials create|revoke|list`: credentials, each held by an API
//!   key or, with `create --holder-cert FILE`, by a client certificate
//!   (mutual TLS); `list` shows every credential, revoked ones included,
//!   never a key hash. `create` and `revoke` also offline, with
//!   `--data-dir` and the vault's secret: the way back to an admin key.
//! - `audit [--from-seq N] [--kind K]… [--subject S] [--limit N]
//!   [--include-records] [--data-dir DIR]`: the log's events as JSON lines
//!   (one object per line, whatever `--format`); records only with
//!   `--include-records`, and then as metadata (never ciphertext). An
//!   auditor key works too. Offline with `--data-dir` (no secret needed).
//! - `export --out FILE [--data-dir DIR]`: the whole log with every commit
//!   group's signed head in one portable file (docs/storage.md, section
//!   11), checked while written and written atomically; `vault-verify
//!   --file FILE --public-key HEX` checks it with nothing else.
//! - `reindex [--data-dir DIR --passphrase-file F|--key-file F [--repair]]`:
//!   rebuild the derived state from the log and compare it with the stored
//!   one; offline with `--repair`, replace it when it differs.
//!
//! Each online subcommand is one or two calls of the `client` library plus
//! printing; the log tools are `server::admin` and `storage::{export,
//! reindex}`; the offline rotations open the vault with its current
//! secret through `storage`. Procedures and guarantees are in docs/keys.md.
//!
//! Data goes to stdout (text, or one JSON object with `--format json`),
//! diagnostics to stderr. Exit codes: 0 success, 1 local error (arguments,
//! connection, TLS, a receipt that does not verify, an export of a log that
//! does not verify, a reindex that found differences it did not repair), 2
//! refused by the server (`error: <code>: <message>`, e.g.
//! `subject_shredded`, `not_found`, `forbidden` for a key whose role may
//! not do this).

use client::eprintln_or_lose as eprintln;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use client::cli::{ConnectArgs, Format};
use client::{Client, ClientError, ErrorCode, KeyLife, Receipt};
use serde_json::{json, Value};
use server::admin::AuditFilter;

#[derive(Parser)]
#[command(
    name = "vault-admin",
    version,
    about = "Administer a fintrust-vault: shred, key rotation, key status, credentials, audit, export, reindex"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Address of the vault, host:port.
    #[arg(
        long,
        global = true,
        env = "FINTRUST_ADDR",
        default_value = "127.0.0.1:9999"
    )]
    addr: String,
    /// TLS, API key and timeout, shared with `vault-client`.
    #[command(flatten)]
    connect: ConnectArgs,
    /// Hex of the vault's public key (printed by `vaultd init`): receipts
    /// are checked against it instead of the key the server reports, and
    /// a change that cannot be undone (shred, key rotations) is sent only
    /// once the vault's signed head checks against it.
    #[arg(long, global = true, env = "FINTRUST_PUBLIC_KEY")]
    public_key: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Crypto-shred a subject: destroy every data key of it, so that its
    /// records (which stay in the log) open under no key. Irreversible;
    /// old backups of the key store still hold the keys (docs/keys.md).
    Shred {
        #[arg(long)]
        subject: String,
        /// Shred nothing: show the vault it would go to (address, public
        /// key) and the subject's data keys, to check the target first.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give a subject a new data key version; new records use it.
    RotateSubjectKey {
        #[arg(long)]
        subject: String,
        /// Also append the subject's latest record again under the new key.
        #[arg(long)]
        reencrypt: bool,
    },
    /// Rotate the signing key: the current key endorses a new one in a
    /// `key_rotated` entry; later heads are signed by the new key, and the
    /// old key is destroyed. Old receipts still verify through the key
    /// chain from the pinned key.
    RotateSigningKey {
        #[command(flatten)]
        offline: Offline,
    },
    /// Rotate the master key: every key is re-wrapped under a new master
    /// key sealed by the new secret (records are not re-encrypted). From
    /// then on only the new secret opens the vault.
    RotateMasterKey {
        /// File holding the new passphrase.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        /// File holding the new 32-byte key (raw or hex) instead.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        #[command(flatten)]
        offline: Offline,
    },
    /// List every key: master, signing key, and each subject data key
    /// with its age, its use and whether it is active, retired or shredded.
    Keys,
    /// The signed head, the entry count and the ages of the keys.
    Status,
    /// Create, revoke or list API-key credentials.
    Credentials {
        #[command(subcommand)]
        command: Credentials,
    },
    /// Print the log's events as JSON lines (one object per line): every
    /// entry but personal-data records, whose metadata only
    /// --include-records adds. Admin or auditor key.
    Audit {
        /// First seq to look at.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// Only entries of this kind (repeatable), e.g. credential_created.
        #[arg(long = "kind", value_name = "NAME")]
        kinds: Vec<String>,
        /// Only entries of this subject.
        #[arg(long)]
        subject: Option<String>,
        /// Print at most this many lines.
        #[arg(long)]
        limit: Option<u64>,
        /// Also records, as metadata (seq, time, subject, key version).
        #[arg(long)]
        include_records: bool,
        /// Read the stopped vault in DIR instead of asking a server.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// With --data-dir: write nothing to DIR (read-only storage, a
        /// snapshot, a backup); its sled database is copied into a
        /// temporary dir instead. Chosen by itself when DIR cannot be
        /// written.
        #[arg(long, requires = "data_dir")]
        read_only: bool,
    },
    /// Write the whole log, with every commit group's signed head, to a
    /// portable file that `vault-verify --file` checks offline.
    Export {
        /// The file to write (atomically: replaced only once complete).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Export the stopped vault in DIR instead of asking a server.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// With --data-dir: write nothing to DIR (read-only storage, a
        /// snapshot, a backup); its sled database is copied into a
        /// temporary dir instead. Chosen by itself when DIR cannot be
        /// written.
        #[arg(long, requires = "data_dir")]
        read_only: bool,
    },
    /// Rebuild the derived state from the log and compare it with the
    /// stored one (exit 1 when they differ and were not repaired).
    Reindex {
        // `FINTRUST_PASSPHRASE_FILE` and `FINTRUST_KEY_FILE` are `vaultd`'s
        // too: set in the environment, they must not stop an online
        // reindex (clap's `requires` counts them as given).
        #[command(flatten)]
        offline: Offline,
        /// Offline: replace the stored derived state with the rebuilt one
        /// when they differ.
        #[arg(long, requires = "data_dir")]
        repair: bool,
    },
}

/// A stopped vault to work on directly instead of a running one.
#[derive(clap::Args)]
struct Offline {
    /// Work on the stopped vault in this data dir (no server).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --data-dir: the file of the current passphrase.
    #[arg(long, env = "FINTRUST_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
    /// With --data-dir: the current key file instead.
    #[arg(long, env = "FINTRUST_KEY_FILE")]
    key_file: Option<PathBuf>,
}

impl Offline {
    /// The flag given on the command line that only `--data-dir` uses,
    /// when `--data-dir` is not given: the command would go to a server
    /// and leave that flag unused, which is not what its giver meant.
    /// (From the environment, `FINTRUST_PASSPHRASE_FILE` and
    /// `FINTRUST_KEY_FILE` are `vaultd`'s too, and are left alone.)
    fn unused_flag(&self) -> Option<&'static str> {
        if self.data_dir.is_some() {
            return None;
        }
        let given = |value: &Option<PathBuf>, env: &str| {
            value.is_some() && !server::secrets::from_env(value.as_deref(), env)
        };
        if given(&self.passphrase_file, "FINTRUST_PASSPHRASE_FILE") {
            Some("--passphrase-file")
        } else if given(&self.key_file, "FINTRUST_KEY_FILE") {
            Some("--key-file")
        } else {
            None
        }
    }

    /// The stopped vault, opened with its current secret.
    fn open(&self, dir: &Path) -> anyhow::Result<storage::Vault> {
        let unlock = server::secrets::unlock_from_args(
            self.passphrase_file.as_deref(),
            self.key_file.as_deref(),
        )?;
        storage::Vault::open(dir, &unlock, storage::Options::default())
            .with_context(|| format!("opening the vault in {}", dir.display()))
    }
}

#[derive(Subcommand)]
enum Credentials {
    /// Create a credential; its API key is printed this once. With
    /// --holder-cert, the credential is held by that client certificate
    /// instead, over mutual TLS, and has no API key.
    Create {
        /// admin, writer, gateway, partner or auditor.
        #[arg(long)]
        role: String,
        /// A label; for a partner, the partner id.
        #[arg(long)]
        name: String,
        /// PEM file whose first certificate holds the credential: its
        /// holder connects with it (and its key) and no API key, to a vault
        /// that requires client certificates (`vaultd serve --tls-client-ca`).
        #[arg(long)]
        holder_cert: Option<PathBuf>,
        /// With --data-dir, on the stopped vault there, opened with its
        /// passphrase or key file: the way back to an admin key when none
        /// is left (docs/keys.md, section 7).
        #[command(flatten)]
        offline: Offline,
    },
    /// Revoke a credential by id.
    Revoke {
        #[arg(long)]
        id: String,
        /// With --data-dir, on the stopped vault there.
        #[command(flatten)]
        offline: Offline,
    },
    /// List every credential: id, role, name, when it was created,
    /// whether it was revoked, and what holds it: an API key, or the
    /// client certificate whose SHA-256 it names (never a key hash).
    List,
}

fn main() -> ExitCode {
    // What an open of a stopped vault (`--data-dir`) has to say: a
    // rotation a crash left half done and undone, a shred finished.
    server::log_to_stderr("warn");
    client::cli::main(run)
}

/// A server-crate error of a call to the vault, with a refusal by the
/// server kept as the client's error, so that `cli::main` exits 2 for it
/// as it does for the client's own calls.
fn remote(e: server::Error) -> anyhow::Error {
    match e {
        server::Error::Client(c) => c.into(),
        other => other.into(),
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let config = cli.connect.config(
        &cli.addr,
        format!("vault-admin/{}", env!("CARGO_PKG_VERSION")),
    )?;
    client::cli::connect(config).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let pinned = cli.public_key.as_deref().map(parse_key).transpose()?;
    match offline(&cli, pinned).await? {
        Some(Done::Print(json, text)) => return print_done(&cli, &json, &text),
        Some(Done::Printed) => return Ok(()),
        None => {}
    }
    // The log tools print as they go, and may need no server at all.
    match &cli.command {
        Command::Audit {
            from_seq,
            kinds,
            subject,
            limit,
            include_records,
            data_dir,
            read_only,
        } => {
            let filter = AuditFilter {
                from_seq: *from_seq,
                kinds: kinds
                    .iter()
                    .map(|k| {
                        storage::Kind::from_name(k)
                            .ok_or_else(|| anyhow::anyhow!("--kind {k:?} is not an entry kind"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                subject: subject.clone(),
                limit: *limit,
                include_records: *include_records,
            };
            filter.validate()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut print = |line: &Value| -> server::Result<()> {
                writeln!(out, "{line}").map_err(|source| server::Error::File {
                    path: "stdout".into(),
                    error: source,
                })
            };
            match data_dir {
                Some(dir) => {
                    let (n, opened) =
                        server::admin::audit_local(dir, &filter, *read_only, &mut print)?;
                    if opened == server::verify::Opened::ReadOnlyFallback {
                        eprintln!("{}", server::verify::fallback_note(dir));
                    }
                    n
                }
                None => {
                    let client = connect(&cli).await?;
                    server::admin::audit_remote(&client, &filter, &mut print)
                        .await
                        .map_err(remote)?
                }
            };
            out.flush()?;
            return Ok(());
        }
        Command::Export {
            out,
            data_dir,
            read_only,
        } => {
            let key = pinned
                .map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k))
                .transpose()
                .map_err(|_| anyhow::anyhow!("--public-key is not a valid ed25519 key"))?;
            let (done, mode) = match data_dir {
                Some(dir) => {
                    let done = server::admin::export_local(dir, out, key, *read_only)?;
                    if done.opened == Some(server::verify::Opened::ReadOnlyFallback) {
                        eprintln!("{}", server::verify::fallback_note(dir));
                    }
                    (done, "offline")
                }
                None => {
                    let client = Arc::new(connect(&cli).await?);
                    (
                        server::admin::export_remote(client, key, out)
                            .await
                            .map_err(remote)?,
                        "online",
                    )
                }
            };
            // A path that is not UTF-8 is shown with its odd bytes
            // replaced (serde_json refuses it as it is).
            let json = json!({"out": out.to_string_lossy(), "mode": mode, "entries": done.entries,
                              "heads": done.heads});
            let text = format!(
                "exported {} entries and {} signed heads to {}",
                done.entries,
                done.heads,
                out.display()
            );
            cli.format.print(&json, &text)?;
            return Ok(());
        }
        Command::Reindex { offline, repair } => {
            if let Some(flag) = offline.unused_flag() {
                anyhow::bail!(
                    "{flag} opens a stopped vault and needs --data-dir; without it the reindex \
                     would ask the server at --addr: nothing was done"
                );
            }
            let (r, mode) = match &offline.data_dir {
                Some(dir) => {
                    let unlock = server::secrets::unlock_from_args(
                        offline.passphrase_file.as_deref(),
                        offline.key_file.as_deref(),
                    )?;
                    let key = pinned
                        .map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k))
                        .transpose()
                        .map_err(|_| anyhow::anyhow!("--public-key is not a valid ed25519 key"))?;
                    let opts = storage::reindex::ReindexOptions {
                        repair: *repair,
                        public_key: key,
                    };
                    (storage::reindex::reindex(dir, &unlock, &opts)?, "offline")
                }
                None => {
                    let client = connect(&cli).await?;
                    let r = client.reindex().await?;
                    let report = storage::reindex::ReindexReport {
                        entries: r.entries,
                        keys_compared: r.keys_compared,
                        differences: r.differences,
                        sample: r.sample,
                        repaired: false,
                    };
                    (report, "online")
                }
            };
            let json = json!({"mode": mode, "entries": r.entries,
                              "keys_compared": r.keys_compared,
                              "differences": r.differences, "sample": r.sample,
                              "repaired": r.repaired});
            let mut text = format!(
                "replayed {} entries, compared {} state keys: {} differences{}",
                r.entries,
                r.keys_compared,
                r.differences,
                if r.repaired { " (repaired)" } else { "" }
            );
            for d in &r.sample {
                text.push_str(&format!("\n  {d}"));
            }
            cli.format.print(&json, &text)?;
            if r.differences > 0 && !r.repaired {
                anyhow::bail!(
                    "the stored derived state differs from the log in {} keys{}",
                    r.differences,
                    if offline.data_dir.is_some() {
                        "; run again with --repair to replace it"
                    } else {
                        "; stop the vault and run `vault-admin reindex --data-dir DIR --repair`"
                    }
                );
            }
            return Ok(());
        }
        // Refused before any connection: the secret is not even read.
        Command::RotateMasterKey { .. }
            if cli.connect.insecure_plaintext && !client::config::is_loopback(&cli.addr) =>
        {
            anyhow::bail!(
                "the new secret would cross the network in plaintext: use TLS (--cacert), or run vault-admin on the vault's host"
            );
        }
        _ => {}
    }
    // A new master secret is read and checked before anything is sent.
    let new_master = match &cli.command {
        Command::RotateMasterKey {
            new_passphrase_file,
            new_key_file,
            ..
        } => Some(new_secret(
            new_passphrase_file.as_deref(),
            new_key_file.as_deref(),
        )?),
        _ => None,
    };
    let client = connect(&cli).await?;
    // A change that cannot be undone is sent only once the pinned key is
    // known to be this vault's (its current signed head checks through
    // the key chain from it), so that the check of its receipt cannot
    // fail afterwards for the key alone.
    if let (Some(key), true) = (pinned, irreversible(&cli.command)) {
        let head = client.head().await?.signed_head;
        let chain = client.key_chain(&key).await;
        if !matches!((&head, &chain), (Some(h), Ok(c)) if c.verify_head(h)) {
            anyhow::bail!(
                "--public-key is not this vault's: its signed head does not verify through \
                 the key chain from it; nothing was sent"
            );
        }
    }
    let now = now_ms();
    let (json, text) = match &cli.command {
        Command::RotateSigningKey { .. } => {
            let r = client.rotate_signing_key().await.map_err(|e| {
                maybe_done(
                    e,
                    "the signing key rotation",
                    "`vault-admin keys` shows the signing key's id and age",
                )
            })?;
            check_done(&client, &r.receipt, pinned, "the signing key was rotated").await?;
            // The new key must chain from the pinned one.
            let chained = async {
                let key = match pinned {
                    Some(k) => k,
                    None => client.head().await?.public_key,
                };
                let chain = client.key_chain(&key).await?;
                if chain.key(r.endorsement.key_id).map(|k| k.to_bytes())
                    != Some(r.endorsement.public_key)
                {
                    anyhow::bail!("the new signing key is not in the vault's key chain");
                }
                Ok(())
            };
            chained.await.map_err(|e| {
                eprintln!(
                    "note: the signing key was rotated (seq {}); what failed is the check of its key chain",
                    r.receipt.seq
                );
                done_anyway(e)
            })?;
            signing_rotated(&r.receipt, &r.endorsement)
        }
        Command::RotateMasterKey { .. } => {
            let (kind, secret) = new_master.context("the new secret")?;
            let r = match client.rotate_master_key(kind, &secret).await {
                Ok(r) => r,
                Err(e) => {
                    if outcome_unknown(&e) {
                        eprintln!("note: {}", server::init::MAYBE_ROTATED);
                    }
                    return Err(e.into());
                }
            };
            if let Err(e) = check(&client, &r, pinned).await {
                eprintln!(
                    "note: {}",
                    server::init::rotated_but(r.seq, "the check of the rotation's receipt")
                );
                return Err(done_anyway(e));
            }
            master_rotated(r.seq, &r.entry_hash)
        }
        Command::Shred {
            subject,
            dry_run: true,
        } => {
            let key = client.head().await?.public_key;
            // The subject's keys only, from its first version on.
            let mut keys = Vec::new();
            client
                .for_each_key(Some((subject.clone(), 0)), |k| {
                    let this = &k.subject == subject;
                    if this {
                        keys.push(k);
                    }
                    this
                })
                .await?;
            let list: Vec<Value> = keys
                .iter()
                .map(|k| {
                    json!({"version": k.version, "state": k.life.name(),
                                "encryptions": k.encryptions})
                })
                .collect();
            let mut text = format!(
                "dry run: nothing was shredded\nvault: {} (public key {})\nsubject: {}\n",
                cli.addr,
                hex::encode(key),
                client::cli::printable(subject)
            );
            // What a shred would do: refused without a key, or once the
            // subject is shredded; otherwise destroy the keys listed.
            let shredded = !keys.is_empty() && keys.iter().all(|k| k.life == KeyLife::Shredded);
            let would = if keys.is_empty() {
                text.push_str("no data key: a shred would be refused (not_found)");
                "refused: not_found"
            } else if shredded {
                text.push_str("already shredded: a shred would be refused (subject_shredded)\n");
                "refused: subject_shredded"
            } else {
                "shred"
            };
            for k in &keys {
                text.push_str(&format!(
                    "data key version {}: {}, {} records encrypted\n",
                    k.version,
                    k.life.name(),
                    k.encryptions
                ));
            }
            (
                json!({"dry_run": true, "addr": cli.addr, "public_key": hex::encode(key),
                       "subject": subject, "keys": list, "would": would}),
                text.trim_end().to_string(),
            )
        }
        Command::Shred { subject, .. } => {
            let r = client.shred(subject.as_str()).await.map_err(|e| {
                maybe_done(
                    e,
                    "the shred",
                    "`vault-admin keys` lists the subject's keys as shredded if it did (a shred sent \
                     again is refused `subject_shredded`)",
                )
            })?;
            check_done(&client, &r, pinned, "the subject was shredded").await?;
            (
                json!({"subject": subject, "shredded": true, "seq": r.seq,
                       "entry_hash": hex::encode(r.entry_hash)}),
                format!(
                    "shredded {subject}: its data keys are destroyed\nseq: {}\nentry_hash: {}",
                    r.seq,
                    hex::encode(r.entry_hash)
                ),
            )
        }
        Command::RotateSubjectKey { subject, reencrypt } => {
            let r = client
                .rotate_subject_key(subject.as_str(), *reencrypt)
                .await
                .map_err(|e| {
                    maybe_done(
                        e,
                        "the data key rotation",
                        "`vault-admin keys` shows the subject's key versions",
                    )
                })?;
            check_done(&client, &r.receipt, pinned, "the data key was rotated").await?;
            if let Some(re) = &r.reencrypted {
                check_done(
                    &client,
                    re,
                    pinned,
                    "the data key was rotated and the record re-encrypted",
                )
                .await?;
            }
            let re_seq = r.reencrypted.as_ref().map(|re| re.seq);
            let mut text = format!(
                "{subject}: data key version {}\nseq: {}",
                r.version, r.receipt.seq
            );
            match re_seq {
                Some(s) => text.push_str(&format!("\nre-encrypted latest record at seq {s}")),
                None if *reencrypt => text.push_str("\nno record to re-encrypt"),
                None => {}
            }
            (
                json!({"subject": subject, "version": r.version, "seq": r.receipt.seq,
                       "entry_hash": hex::encode(r.receipt.entry_hash),
                       "reencrypted_seq": re_seq}),
                text,
            )
        }
        Command::Keys => {
            let s = client.key_status().await?;
            let keys: Vec<Value> = s
                .keys
                .iter()
                .map(|k| {
                    json!({"subject": k.subject, "version": k.version,
                           "created_seq": k.created_seq, "created_ms": k.created_ms,
                           "age_secs": age_secs(now, k.created_ms),
                           "encryptions": k.encryptions, "state": k.life.name()})
                })
                .collect();
            let mut text = format!(
                "master   created {}  wraps {}\nsigning  key id {}  created {}\nlimit    {} encryptions per subject key\n",
                age(now, s.master_created_ms),
                s.master_wraps,
                s.signing_key_id,
                age(now, s.signing_created_ms),
                s.encryption_limit
            );
            text.push_str("SUBJECT\tVERSION\tSTATE\tCREATED_SEQ\tAGE\tENCRYPTIONS");
            for k in &s.keys {
                text.push_str(&format!(
                    "\n{}\t{}\t{}\t{}\t{}\t{}",
                    client::cli::printable(&k.subject),
                    k.version,
                    k.life.name(),
                    k.created_seq,
                    age(now, k.created_ms),
                    k.encryptions
                ));
            }
            (
                json!({
                    "master": {"created_ms": s.master_created_ms,
                               "age_secs": age_secs(now, s.master_created_ms),
                               "wraps": s.master_wraps},
                    "signing": {"key_id": s.signing_key_id, "created_ms": s.signing_created_ms,
                                "age_secs": age_secs(now, s.signing_created_ms)},
                    "encryption_limit": s.encryption_limit,
                    "keys": keys,
                }),
                text,
            )
        }
        Command::Status => {
            let head = client.head().await?;
            // Counted page by page: a vault of any number of keys.
            let (mut active, mut retired, mut shredded) = (0usize, 0usize, 0usize);
            let mut active_created: Vec<u64> = Vec::new();
            let keys = client
                .for_each_key(None, |k| {
                    match k.life {
                        KeyLife::Active => {
                            active += 1;
                            active_created.push(k.created_ms);
                        }
                        KeyLife::Retired => retired += 1,
                        KeyLife::Shredded => shredded += 1,
                    }
                    true
                })
                .await?;
            let count = |l: KeyLife| match l {
                KeyLife::Active => active,
                KeyLife::Retired => retired,
                KeyLife::Shredded => shredded,
            };
            let oldest_active = active_created.iter().copied().min();
            let signed = head.signed_head.as_ref();
            let mut text = format!(
                "public_key: {}\nentries: {}",
                hex::encode(head.public_key),
                head.entries
            );
            match signed {
                Some(h) => text.push_str(&format!(
                    "\nhead: seq {} {} ({})",
                    h.last_seq,
                    hex::encode(h.last_hash),
                    age(now, h.timestamp_ms)
                )),
                None => text.push_str("\nhead: none (empty log)"),
            }
            text.push_str(&format!(
                "\nmaster key: created {}\nsigning key {}: created {}\nsubject keys: {} active, {} retired, {} shredded",
                age(now, keys.master_created_ms),
                keys.signing_key_id,
                age(now, keys.signing_created_ms),
                count(KeyLife::Active),
                count(KeyLife::Retired),
                count(KeyLife::Shredded)
            ));
            if let Some(ms) = oldest_active {
                text.push_str(&format!(
                    "\noldest active subject key: created {}",
                    age(now, ms)
                ));
            }
            let policy = server::serve::RotationPolicy {
                max_signing_key_age: secs(keys.max_signing_key_age_secs),
                max_subject_key_age: secs(keys.max_subject_key_age_secs),
            };
            let warnings = policy.overdue(
                now,
                (keys.signing_key_id, keys.signing_created_ms),
                active_created.iter().copied(),
            );
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            (
                json!({
                    "public_key": hex::encode(head.public_key),
                    "entries": head.entries,
                    "head": signed.map(|h| json!({"last_seq": h.last_seq,
                        "last_hash": hex::encode(h.last_hash), "timestamp_ms": h.timestamp_ms})),
                    "master_key_age_secs": age_secs(now, keys.master_created_ms),
                    "signing_key_id": keys.signing_key_id,
                    "signing_key_age_secs": age_secs(now, keys.signing_created_ms),
                    "rotation_policy": {
                        "max_signing_key_age_secs": keys.max_signing_key_age_secs,
                        "max_subject_key_age_secs": keys.max_subject_key_age_secs},
                    "warnings": warnings,
                    "subject_keys": {"active": count(KeyLife::Active),
                                     "retired": count(KeyLife::Retired),
                                     "shredded": count(KeyLife::Shredded)},
                    "oldest_active_subject_key_age_secs": oldest_active.map(|ms| age_secs(now, ms)),
                    "encryption_limit": keys.encryption_limit,
                }),
                text,
            )
        }
        Command::Credentials {
            command:
                Credentials::Create {
                    role,
                    name,
                    holder_cert: Some(cert),
                    ..
                },
        } => {
            let sha256 = server::tls::certificate_sha256(cert)?;
            let id = client
                .create_cert_credential(role.as_str(), name.as_str(), sha256)
                .await?;
            let fingerprint = hex::encode(sha256);
            (
                json!({"id": id, "role": role, "name": name, "client_cert_sha256": fingerprint}),
                format!("id: {id}\nrole: {role}\nclient certificate (SHA-256): {fingerprint}"),
            )
        }
        Command::Credentials {
            command:
                Credentials::Create {
                    role,
                    name,
                    holder_cert: None,
                    ..
                },
        } => {
            let (id, key) = client
                .create_credential(role.as_str(), name.as_str())
                .await
                .map_err(|e| {
                    maybe_done(
                        e,
                        "the credential's creation",
                        "its key is lost with the answer: `vault-admin credentials list` shows it \
                         if it was made, to revoke it",
                    )
                })?;
            show_new_key(cli.format, (&id, role, name), &key, async || {
                client.revoke_credential(id.as_str()).await.map(|_| ())
            })
            .await?;
            return Ok(());
        }
        Command::Credentials {
            command: Credentials::List,
        } => {
            let all = client.credentials().await?;
            let holders = server::admin::certificate_holders(&client, &all)
                .await
                .map_err(remote)?;
            let list: Vec<Value> = all
                .iter()
                .zip(&holders)
                .map(|(c, cert)| {
                    json!({"id": c.id, "role": c.role, "name": c.name,
                           "created_seq": c.created_seq, "created_ms": c.created_ms,
                           "revoked": c.revoked_seq.is_some(),
                           "revoked_seq": c.revoked_seq,
                           "client_cert_sha256": cert})
                })
                .collect();
            let mut text = String::from("ID\tROLE\tNAME\tCREATED_SEQ\tCREATED\tSTATE\tHELD_BY");
            for (c, cert) in all.iter().zip(&holders) {
                let state = match c.revoked_seq {
                    Some(s) => format!("revoked at seq {s}"),
                    None => "live".into(),
                };
                let held_by = match cert {
                    Some(sha256) => format!("client certificate {sha256}"),
                    None => "API key".into(),
                };
                // What the server names is shown, never run by the terminal.
                let p = client::cli::printable;
                text.push_str(&format!(
                    "\n{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    p(&c.id),
                    p(&c.role),
                    p(&c.name),
                    c.created_seq,
                    age(now, c.created_ms),
                    state,
                    held_by
                ));
            }
            (json!({ "credentials": list }), text)
        }
        // Printed as they ran, above.
        Command::Audit { .. } | Command::Export { .. } | Command::Reindex { .. } => return Ok(()),
        Command::Credentials {
            command: Credentials::Revoke { id, .. },
        } => match client.revoke_credential(id.as_str()).await.map_err(|e| {
            maybe_done(
                e,
                "the revocation",
                "`vault-admin credentials list` shows whether it is revoked",
            )
        })? {
            Some(r) => {
                check_done(&client, &r, pinned, "the credential was revoked").await?;
                (
                    json!({"id": id, "revoked": true, "seq": r.seq}),
                    format!("revoked {id}\nseq: {}", r.seq),
                )
            }
            // The library reports "no such credential" as None; for the
            // operator it is the server's refusal.
            None => {
                return Err(ClientError::Server {
                    code: ErrorCode::NotFound,
                    message: "no such credential".into(),
                }
                .into())
            }
        },
    };
    print_done(&cli, &json, &text)
}

/// Prints a command's result. A change is durable by the time it is
/// printed: when the output is lost (stdout closed, as in `… | head -0`),
/// say so on stderr rather than leave the operator to guess, and perhaps
/// to run it again (a second rotation) or to keep a secret the vault no
/// longer takes.
fn print_done(cli: &Cli, json: &Value, text: &str) -> anyhow::Result<()> {
    cli.format.print(json, text).inspect_err(|_| {
        let created = matches!(
            cli.command,
            Command::Credentials {
                command: Credentials::Create { .. }
            }
        );
        if created || irreversible(&cli.command) {
            eprintln!("note: the change was made; what failed is printing its result");
        }
    })
}

/// What a subcommand run on a stopped vault has left to do.
enum Done {
    /// Print this (JSON, text).
    Print(Value, String),
    /// Nothing: it printed what it had to.
    Printed,
}

/// The subcommands run on a stopped vault (`--data-dir`), if this is one.
async fn offline(cli: &Cli, pinned: Option<[u8; 32]>) -> anyhow::Result<Option<Done>> {
    // The vault in DIR must be the one the key pins, as a server must be
    // (its chain from genesis is checked by the open).
    let open = |offline: &Offline, dir: &Path| -> anyhow::Result<storage::Vault> {
        let vault = offline.open(dir)?;
        if let Some(k) = pinned {
            if vault.public_key().to_bytes() != k {
                let _ = vault.close();
                anyhow::bail!(
                    "the vault in {} is not the one --public-key (FINTRUST_PUBLIC_KEY) pins: \
                     nothing was done",
                    dir.display()
                );
            }
        }
        Ok(vault)
    };
    if let Command::RotateSigningKey { offline }
    | Command::RotateMasterKey { offline, .. }
    | Command::Credentials {
        command: Credentials::Create { offline, .. } | Credentials::Revoke { offline, .. },
    } = &cli.command
    {
        if let Some(flag) = offline.unused_flag() {
            anyhow::bail!(
                "{flag} opens a stopped vault and needs --data-dir; without it the command \
                 would go to the server at --addr: nothing was done"
            );
        }
    }
    match &cli.command {
        Command::Credentials {
            command:
                Credentials::Create {
                    role,
                    name,
                    holder_cert,
                    offline,
                },
        } => {
            let Some(dir) = &offline.data_dir else {
                return Ok(None);
            };
            server::serve::credential_terms(role, name)
                .map_err(|why| anyhow::anyhow!("{why}: nothing was done"))?;
            // Read before the vault is opened: a file that cannot be read
            // leaves the log as it was.
            let cert = holder_cert
                .as_deref()
                .map(server::tls::certificate_sha256)
                .transpose()?;
            let vault = open(offline, dir)?;
            let created = match cert {
                Some(sha256) => offline_cert_credential(&vault, role, name, &sha256).await,
                None => offline_key_credential(cli, &vault, role, name).await,
            };
            let closed = vault.close();
            let done = created?;
            if closed.is_err() {
                eprintln!(
                    "note: the credential was created (its entry is durable{}) before closing \
                     the vault failed; `vault-admin audit --data-dir {} --kind credential_created` \
                     shows it",
                    if matches!(done, Done::Printed) {
                        ", its key printed above"
                    } else {
                        ""
                    },
                    dir.display()
                );
            }
            closed.with_context(|| format!("closing the vault in {}", dir.display()))?;
            Ok(Some(done))
        }
        Command::Credentials {
            command: Credentials::Revoke { id, offline },
        } => {
            let Some(dir) = &offline.data_dir else {
                return Ok(None);
            };
            let vault = open(offline, dir)?;
            let revoked = vault.revoke_credential(id).await;
            let closed = vault.close();
            let Some(receipt) = revoked? else {
                // Nothing was written. The vault's own refusal, exit 2 as
                // the server's would be online, once the close is known
                // to have gone well.
                closed.with_context(|| format!("closing the vault in {}", dir.display()))?;
                return Err(ClientError::Server {
                    code: ErrorCode::NotFound,
                    message: "no such credential".into(),
                }
                .into());
            };
            if closed.is_err() {
                eprintln!(
                    "note: credential {id} was revoked (seq {}, durable) before closing the vault \
                     failed",
                    receipt.seq
                );
            }
            closed.with_context(|| format!("closing the vault in {}", dir.display()))?;
            Ok(Some(Done::Print(
                json!({"id": id, "revoked": true, "seq": receipt.seq}),
                format!("revoked {id}\nseq: {}", receipt.seq),
            )))
        }
        Command::RotateSigningKey { offline } => {
            let Some(dir) = &offline.data_dir else {
                return Ok(None);
            };
            let vault = open(offline, dir)?;
            let (receipt, endorsement) = match vault.rotate_signing_key().await {
                Ok(r) => r,
                Err(e) => {
                    if server::init::rotation_outcome_unknown(&e) {
                        eprintln!(
                            "note: the signing key's rotation may have taken effect before this \
                             failure: `vault-admin keys` shows which key signs now; run it again \
                             only if the key is the old one"
                        );
                    }
                    return Err(e.into());
                }
            };
            if let Err(e) = vault.close() {
                eprintln!(
                    "note: the signing key was rotated (key {}, key_rotated entry at seq {}, \
                     durable); what failed is closing the vault",
                    endorsement.key_id, receipt.seq
                );
                return Err(e.into());
            }
            let (json, text) = signing_rotated(&receipt, &endorsement);
            Ok(Some(Done::Print(json, text)))
        }
        Command::RotateMasterKey {
            new_passphrase_file,
            new_key_file,
            offline,
        } => {
            let Some(dir) = &offline.data_dir else {
                return Ok(None);
            };
            let new = server::secrets::unlock_from(
                new_passphrase_file.as_deref(),
                new_key_file.as_deref(),
            )
            .context("the new secret (--new-passphrase-file or --new-key-file)")?;
            let vault = open(offline, dir)?;
            let receipt = match vault.rotate_master_key(&new).await {
                Ok(r) => r,
                Err(e) => {
                    if server::init::rotation_outcome_unknown(&e) {
                        eprintln!("note: {}", server::init::MAYBE_ROTATED);
                    }
                    return Err(e.into());
                }
            };
            if let Err(e) = vault.close() {
                eprintln!(
                    "note: {}",
                    server::init::rotated_but(receipt.seq, "closing the vault")
                );
                return Err(e.into());
            }
            let (json, text) = master_rotated(receipt.seq, &receipt.entry_hash);
            Ok(Some(Done::Print(json, text)))
        }
        _ => Ok(None),
    }
}

/// A storage error of a change made on a stopped vault: a refusal of the
/// request (a conflict with a live credential, a value out of range) as
/// the server would answer it online, so that it exits 2 there too
/// (README, "Exit codes"); any other error as it is, a local one.
fn refused_offline(e: storage::Error) -> anyhow::Error {
    let code = match &e {
        storage::Error::Conflict(_) => ErrorCode::Conflict,
        storage::Error::Invalid(_) => ErrorCode::Invalid,
        storage::Error::SubjectShredded(_) => ErrorCode::SubjectShredded,
        storage::Error::NoSuchSubject(_) => ErrorCode::NotFound,
        _ => return e.into(),
    };
    ClientError::Server {
        code,
        message: e.to_string(),
    }
    .into()
}

/// An API-key credential made on a stopped vault, its key printed here
/// (the caller prints nothing more). A key that cannot be shown is
/// revoked again, as online.
async fn offline_key_credential(
    cli: &Cli,
    vault: &storage::Vault,
    role: &str,
    name: &str,
) -> anyhow::Result<Done> {
    let (id, key) = vault
        .create_credential(role, name)
        .await
        .map_err(refused_offline)?;
    show_new_key(cli.format, (&id, role, name), &key, async || {
        vault.revoke_credential(&id).await.map(|_| ())
    })
    .await?;
    Ok(Done::Printed)
}

/// Prints a new credential (`id`, role, name) and its API key, this once.
/// The key exists only in this output: a credential whose key could not be
/// shown is taken back by `revoke`, so that none is left live that nobody
/// can use or knows of.
async fn show_new_key<E: std::fmt::Display>(
    format: Format,
    (id, role, name): (&str, &str, &str),
    key: &str,
    revoke: impl AsyncFnOnce() -> Result<(), E>,
) -> anyhow::Result<()> {
    let json = json!({"id": id, "role": role, "name": name, "api_key": key});
    let text = zeroize::Zeroizing::new(format!(
        "id: {id}\nrole: {role}\napi_key: {key} (shown once; store it now)"
    ));
    if let Err(e) = format.print(&json, &text) {
        let undone = match revoke().await {
            Ok(()) => format!("credential {id} was revoked again"),
            Err(r) => format!(
                "credential {id} could not be revoked again ({r}): revoke it with \
                 `vault-admin credentials revoke --id {id}`"
            ),
        };
        anyhow::bail!("{e:#}; its API key was not shown, so {undone}");
    }
    Ok(())
}

/// A credential held by a client certificate, made on a stopped vault.
async fn offline_cert_credential(
    vault: &storage::Vault,
    role: &str,
    name: &str,
    sha256: &[u8; 32],
) -> anyhow::Result<Done> {
    let id = vault
        .create_cert_credential(role, name, sha256)
        .await
        .map_err(refused_offline)?;
    let fingerprint = hex::encode(sha256);
    Ok(Done::Print(
        json!({"id": id, "role": role, "name": name, "client_cert_sha256": fingerprint}),
        format!("id: {id}\nrole: {role}\nclient certificate (SHA-256): {fingerprint}"),
    ))
}

fn signing_rotated(receipt: &Receipt, e: &client::KeyEndorsement) -> (Value, String) {
    (
        json!({"key_id": e.key_id, "public_key": hex::encode(e.public_key),
               "seq": receipt.seq, "entry_hash": hex::encode(receipt.entry_hash),
               "endorsement": hex::encode(e.encode())}),
        format!(
            "signing key {} is in force: heads after seq {} are signed by it\npublic_key: {}\nentry_hash: {}\nthe old key is destroyed; receipts it signed still verify through the key chain",
            e.key_id,
            receipt.seq,
            hex::encode(e.public_key),
            hex::encode(receipt.entry_hash)
        ),
    )
}

/// Whether a failed call may still have taken effect: the vault could not
/// write (`unavailable`: a write or sync that failed may have been this
/// call's own), failed inside, or the connection failed once the request
/// was sent. Every other refusal comes before anything is done.
fn outcome_unknown(e: &client::ClientError) -> bool {
    use client::{ClientError, ErrorCode};
    match e {
        ClientError::Server { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Internal)
        }
        ClientError::Config(_) | ClientError::NotSent => false,
        _ => true,
    }
}

/// `e`, after a note on stderr when the change it was asked for (`what`)
/// may have been made before it (the connection lost, or the vault failed,
/// once the request was sent; [`outcome_unknown`]): `how` tells where to
/// look before trying again.
fn maybe_done(e: client::ClientError, what: &str, how: &str) -> anyhow::Error {
    if outcome_unknown(&e) {
        eprintln!("note: {what} may have taken effect before this failure; {how}");
    }
    e.into()
}

fn master_rotated(seq: u64, entry_hash: &[u8; 32]) -> (Value, String) {
    (
        json!({"rotated": "master", "seq": seq, "entry_hash": hex::encode(entry_hash)}),
        format!(
            "master key rotated (key_rotated entry at seq {seq}): only the new secret opens the vault now; start vaultd with it\nentry_hash: {}",
            hex::encode(entry_hash)
        ),
    )
}

/// The new master secret, as the protocol carries it: the file read once
/// and checked as the server will check it.
fn new_secret(
    passphrase_file: Option<&Path>,
    key_file: Option<&Path>,
) -> anyhow::Result<(client::SecretKind, client::Zeroizing<Vec<u8>>)> {
    server::secrets::master_secret_from(passphrase_file, key_file)
        .context("the new secret (--new-passphrase-file or --new-key-file)")
}

/// Checks a receipt with the pinned key, or else the key the server
/// reports (an admin may read the head).
async fn check(client: &Client, receipt: &Receipt, pinned: Option<[u8; 32]>) -> anyhow::Result<()> {
    let key = match pinned {
        Some(k) => k,
        None => client.head().await?.public_key,
    };
    client
        .verify_receipt(receipt, &key)
        .await
        .context("the receipt does not verify")?;
    Ok(())
}

/// [`check`] of the receipt of a change that cannot be undone: when it
/// fails, says first that the change (`done`) took effect.
async fn check_done(
    client: &Client,
    receipt: &Receipt,
    pinned: Option<[u8; 32]>,
    done: &str,
) -> anyhow::Result<()> {
    check(client, receipt, pinned).await.map_err(|e| {
        eprintln!(
            "note: {done} (seq {}); what failed is the check of its receipt",
            receipt.seq
        );
        done_anyway(e)
    })
}

/// The failure of a check that followed a change the server made: a
/// local error (exit 1) even when the server refused the check's request,
/// since the change itself was done, not refused (exit 2).
fn done_anyway(e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// The commands whose change cannot be undone.
fn irreversible(c: &Command) -> bool {
    matches!(
        c,
        Command::Shred { .. }
            | Command::Credentials {
                command: Credentials::Revoke { .. }
            }
            | Command::RotateSubjectKey { .. }
            | Command::RotateSigningKey { .. }
            | Command::RotateMasterKey { .. }
    )
}

/// A policy's maximum age: 0 seconds means none.
fn secs(s: u64) -> Option<std::time::Duration> {
    (s > 0).then(|| std::time::Duration::from_secs(s))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn age_secs(now_ms: u64, then_ms: u64) -> u64 {
    now_ms.saturating_sub(then_ms) / 1000
}

/// "3d 4h ago" style age of a unix-ms timestamp.
fn age(now_ms: u64, then_ms: u64) -> String {
    let s = age_secs(now_ms, then_ms);
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s ago"),
        (0, 0, m) => format!("{m}m ago"),
        (0, h, m) => format!("{h}h {m}m ago"),
        (d, h, _) => format!("{d}d {h}h ago"),
    }
}

fn parse_key(s: &str) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("--public-key takes 64 hex digits"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use client::{ClientError, ErrorCode};

    /// A master rotation that failed is called undecided when the vault
    /// could not write, failed inside, or the connection failed after the
    /// request; a refusal before anything was done is not.
    #[test]
    fn only_failures_after_the_request_leave_its_outcome_unknown() {
        let refused = |code| ClientError::Server {
            code,
            message: String::new(),
        };
        assert!(outcome_unknown(&refused(ErrorCode::Unavailable)));
        assert!(outcome_unknown(&refused(ErrorCode::Internal)));
        assert!(outcome_unknown(&ClientError::Timeout));
        assert!(outcome_unknown(&ClientError::Closed));
        assert!(!outcome_unknown(&refused(ErrorCode::Forbidden)));
        assert!(!outcome_unknown(&refused(ErrorCode::Invalid)));
        assert!(!outcome_unknown(&ClientError::Config("bad".into())));
    }

    /// A check that the server refused after the change it checks was
    /// made exits 1, a local error, with the refusal's words kept; only a
    /// refused change exits 2 (`cli::main` looks for a `ClientError`).
    #[test]
    fn a_refused_check_after_a_change_is_not_a_refused_change() {
        let refused = anyhow::Error::from(ClientError::Server {
            code: ErrorCode::Unavailable,
            message: "busy".into(),
        })
        .context("the receipt does not verify");
        assert!(refused.downcast_ref::<ClientError>().is_some());
        let done = done_anyway(refused);
        assert!(done.downcast_ref::<ClientError>().is_none());
        let words = format!("{done:#}");
        assert!(words.contains("the receipt does not verify"), "{words}");
        assert!(words.contains("unavailable"), "{words}");
    }
}
