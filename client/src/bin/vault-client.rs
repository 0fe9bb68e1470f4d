//! `vault-client`: append a record, read the signed head, redeem a token or
//! ping a running vault from the shell. Each subcommand is one call of the
//! `client` library plus printing.
//!
//! Data goes to stdout (text, or one JSON object with `--format json`;
//! `redeem` always prints JSON), diagnostics to stderr. Exit codes: 0
//! success, 1 local error (arguments, files, connection, TLS, a receipt
//! that does not verify), 2 refused by the server (`error: <code>: <message>`).

use client::eprintln_or_lose as eprintln;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use client::cli::{ConnectArgs, Format};
use client::{Client, ClientConfig, ClientError, ErrorCode, HeadTracker, Receipt};
use serde_json::{json, Value};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "vault-client",
    version,
    about = "Talk to a fintrust-vault server (port 9999)"
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
    /// TLS, API key and timeout, shared with `vault-verify --remote`.
    #[command(flatten)]
    connect: ConnectArgs,
    /// Hex of the vault's public key (printed by `vaultd init`): receipts
    /// are checked against it instead of the key the server reports.
    #[arg(long, global = true, env = "FINTRUST_PUBLIC_KEY")]
    public_key: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Append one record and print its receipt, verified when the public
    /// key is known (--public-key, or a role that may read the head).
    Append {
        /// The data subject (e.g. a customer id).
        #[arg(long)]
        subject: String,
        /// JSON file holding one object whose values are all strings.
        #[arg(long)]
        record_file: PathBuf,
    },
    /// Print the vault's public key, entry count and signed head, checked
    /// against --public-key when it is given.
    Head,
    /// Spend a token and print the masked record as one JSON object.
    Redeem {
        /// The one-time token; prefer the environment variable or
        /// --token-file, which `ps` does not show.
        #[arg(
            long,
            env = "FINTRUST_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// File holding the token (surrounding whitespace is ignored); `-`
        /// reads it from stdin. It wins over --token and FINTRUST_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Check that the vault answers, and with which role.
    Ping,
}

fn main() -> ExitCode {
    client::cli::main(run)
}

/// The library's config from the shared connection flags.
fn config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let name = format!("vault-client/{}", env!("CARGO_PKG_VERSION"));
    Ok(cli.connect.config(&cli.addr, name)?)
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    client::cli::connect(config(cli)?).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // A key given is a key checked, whatever the subcommand does with it.
    let pinned = cli.public_key.as_deref().map(parse_key).transpose()?;
    match &cli.command {
        Command::Append {
            subject,
            record_file,
        } => {
            let fields = read_record(record_file)?;
            let client = connect(&cli).await?;
            let receipt = client.append(subject.as_str(), fields).await?;
            // The record is in the log whatever the check finds: its
            // receipt is printed either way, so that nobody appends it
            // again, and a receipt that does not verify then exits 1.
            let (verified, failed) = match verify(&client, &receipt, pinned).await {
                Ok(verified) => (verified, None),
                Err(e) => (false, Some(e)),
            };
            cli.format.print(
                &json!({
                    "seq": receipt.seq,
                    "entry_hash": hex::encode(receipt.entry_hash),
                    "verified": verified,
                }),
                &format!(
                    "seq: {}\nentry_hash: {}\nverified: {verified}",
                    receipt.seq,
                    hex::encode(receipt.entry_hash)
                ),
            )?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Command::Head => {
            let client = connect(&cli).await?;
            let head = client.head().await?;
            if let Some(key) = pinned.filter(|key| *key != head.public_key) {
                bail!(
                    "the vault's public key {} is not --public-key {}",
                    hex::encode(head.public_key),
                    hex::encode(key)
                );
            }
            let signed = head.signed_head.map(|h| {
                json!({
                    "key_id": h.key_id,
                    "group_first_seq": h.group_first_seq,
                    "last_seq": h.last_seq,
                    "last_hash": hex::encode(h.last_hash),
                    "group_root": hex::encode(h.group_root),
                    "timestamp_ms": h.timestamp_ms,
                })
            });
            let mut text = format!(
                "public_key: {}\nentries: {}",
                hex::encode(head.public_key),
                head.entries
            );
            match &head.signed_head {
                Some(h) => text.push_str(&format!(
                    "\nlast_seq: {}\nlast_hash: {}\ntimestamp_ms: {}",
                    h.last_seq,
                    hex::encode(h.last_hash),
                    h.timestamp_ms
                )),
                None => text.push_str("\nsigned_head: none (empty log)"),
            }
            cli.format.print(
                &json!({
                    "public_key": hex::encode(head.public_key),
                    "entries": head.entries,
                    "signed_head": signed,
                }),
                &text,
            )?;
        }
        Command::Redeem { token, token_file } => {
            let token = read_token(token.as_deref(), token_file.as_deref())?;
            let r = client::cli::redeem(config(&cli)?, &token).await?;
            let fields: serde_json::Map<String, Value> = r
                .fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            // Always JSON: the record is data for another program.
            client::cli::print_line(
                &json!({ "subject": r.subject, "seq": r.seq, "fields": fields }).to_string(),
            )?;
        }
        Command::Ping => {
            let client = connect(&cli).await?;
            let start = Instant::now();
            client.ping().await?;
            let rtt_ms = start.elapsed().as_secs_f64() * 1000.0;
            cli.format.print(
                &json!({
                    "pong": true,
                    "server": client.server(),
                    "role": client.role(),
                    "rtt_ms": rtt_ms,
                }),
                &format!(
                    "pong from {} (role {}) in {rtt_ms:.1} ms",
                    client.server(),
                    client.role()
                ),
            )?;
        }
    }
    Ok(())
}

/// Verifies `receipt` with the pinned key, or else with the key the
/// server reports when the role may read the head. `Ok(false)` when no key
/// could be had; an `Err` when a check fails.
async fn verify(
    client: &Client,
    receipt: &Receipt,
    pinned: Option<[u8; 32]>,
) -> anyhow::Result<bool> {
    if let Some(key) = pinned {
        return match client.verify_receipt(receipt, &key).await {
            Ok(()) => Ok(true),
            Err(e) => unverified(e, "the receipt does not verify with --public-key"),
        };
    }
    let head = match client.head().await {
        Ok(head) => head,
        Err(ClientError::Server {
            code: ErrorCode::Forbidden,
            ..
        }) => {
            eprintln!(
                "note: receipt not verified: the {} role may not read the public key; \
                 pass --public-key to verify",
                client.role()
            );
            return Ok(false);
        }
        // A head that does not check out is the server's word against its
        // own key: never a note.
        Err(e @ (ClientError::BadReceipt(_) | ClientError::BadKeyChain(_))) => {
            return Err(anyhow::Error::new(e).context("the server's signed head does not verify"));
        }
        Err(e) => {
            eprintln!("note: receipt not verified: cannot read the public key: {e}");
            return Ok(false);
        }
    };
    if let Err(e) = client.verify_receipt(receipt, &head.public_key).await {
        return unverified(e, "the receipt does not verify");
    }
    // A head older than the receipt's own would mean the server went back.
    let mut tracker = HeadTracker::new();
    tracker.observe(&receipt.head)?;
    if let Some(h) = &head.signed_head {
        tracker.observe(h)?;
    }
    Ok(true)
}

/// A check that failed (`what`, exit 1), or one that could not be made
/// (the connection failed, the server refused the `KeyChain` request): a
/// note, and the receipt stays unverified.
fn unverified(e: ClientError, what: &str) -> anyhow::Result<bool> {
    match e {
        e @ (ClientError::BadReceipt(_)
        | ClientError::BadKeyChain(_)
        | ClientError::Rollback { .. }) => Err(anyhow::Error::new(e).context(what.to_string())),
        e => {
            eprintln!("note: receipt not verified: {e}");
            Ok(false)
        }
    }
}

/// The token read from --token-file (`-`: stdin), or else given with
/// --token (or `FINTRUST_TOKEN`), without surrounding whitespace.
fn read_token(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Zeroizing<String>> {
    let text = match (token, file) {
        (_, Some(path)) if path.as_os_str() == "-" => {
            // Room for any token at once: a string that grows leaves a
            // copy of what it held in memory it frees.
            let mut text = Zeroizing::new(String::with_capacity(4096));
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the token from stdin")?;
            text
        }
        (_, Some(path)) => Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read the token", path.display()))?,
        ),
        (Some(t), None) => Zeroizing::new(t.to_string()),
        (None, None) => bail!("no token: pass --token, --token-file or FINTRUST_TOKEN"),
    };
    let token = Zeroizing::new(text.trim().to_string());
    if token.is_empty() {
        bail!("the token is empty");
    }
    Ok(token)
}

/// The fields of a JSON object whose values are all strings.
fn read_record(path: &PathBuf) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Value::Object(map) = value else {
        bail!("{} must hold one JSON object", path.display());
    };
    map.into_iter()
        .map(|(name, v)| match v {
            Value::String(s) => Ok((name, s)),
            _ => bail!("{}: field {name:?} is not a string", path.display()),
        })
        .collect()
}

fn parse_key(s: &str) -> anyhow::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key)
        .map_err(|_| anyhow::anyhow!("--public-key takes 64 hex digits"))?;
    Ok(key)
}
