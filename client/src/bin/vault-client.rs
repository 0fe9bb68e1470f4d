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
    /// Spend a token and print the masked record as one JSON object
    /// (whatever --format says: the record is data for another program).
    Redeem {
        /// The one-time token; prefer the environment variable or
        /// --token-file, which `ps` does not show.
        #[arg(
            long,
            env = "FINTRUST_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file",
            value_parser = client::cli::secret_arg
        )]
        token: Option<Zeroizing<String>>,
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
            let (with, failed) = match verify(&client, &receipt, pinned).await {
                Ok(with) => (with, None),
                Err(e) => (None, Some(e)),
            };
            let verified = with.is_some();
            cli.format
                .print(
                    &json!({
                        "seq": receipt.seq,
                        "entry_hash": hex::encode(receipt.entry_hash),
                        "verified": verified,
                        "verified_with": with,
                        "receipt": hex::encode(receipt.encode()),
                    }),
                    &format!(
                        "seq: {}\nentry_hash: {}\nverified: {verified}",
                        receipt.seq,
                        hex::encode(receipt.entry_hash)
                    ),
                )
                .inspect_err(|_| {
                    // Appended all the same: said where it can be seen,
                    // so that nobody appends it again.
                    eprintln!(
                        "note: the record was appended (seq {}, entry_hash {}); what failed is \
                         printing its receipt",
                        receipt.seq,
                        hex::encode(receipt.entry_hash)
                    );
                })?;
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
                    "encoded": hex::encode(h.encode()),
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
            let token = read_token(token.as_deref().map(String::as_str), token_file.as_deref())?;
            let r = client::cli::redeem(config(&cli)?, &token).await?;
            let fields: serde_json::Map<String, Value> = r
                .fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            // Always JSON: the record is data for another program.
            client::cli::print_line(
                &json!({ "subject": r.subject, "seq": r.seq, "fields": fields }).to_string(),
            )
            .inspect_err(|_| {
                eprintln!(
                    "note: the token was redeemed and is spent; what failed is writing its data"
                );
            })?;
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
                    client::cli::printable(client.server()),
                    client::cli::printable(client.role())
                ),
            )?;
        }
    }
    Ok(())
}

/// What a receipt was verified with: the key given with `--public-key`,
/// or the one the server reports (which a server that lies also would).
const PINNED: &str = "public_key";
const REPORTED: &str = "server_reported_key";

/// Verifies `receipt` with the pinned key, or else with the key the
/// server reports when the role may read the head: `Ok(Some(`[`PINNED`]
/// or [`REPORTED`]`))`, `Ok(None)` when no key could be had; an `Err`
/// when a check fails.
async fn verify(
    client: &Client,
    receipt: &Receipt,
    pinned: Option<[u8; 32]>,
) -> anyhow::Result<Option<&'static str>> {
    if let Some(key) = pinned {
        return match client.verify_receipt(receipt, &key).await {
            Ok(()) => Ok(Some(PINNED)),
            // The connection ended before the key chain came: a pinned key
            // is a check that must be made, so the receipt is checked
            // without the chain, which a head of key 0 needs none of.
            Err(
                e @ (ClientError::Io(_)
                | ClientError::Tls(_)
                | ClientError::Timeout
                | ClientError::Closed
                | ClientError::NotSent),
            ) => {
                match client::verify_receipt(receipt, &key) {
                    Ok(()) => Ok(Some(PINNED)),
                    Err(_) if receipt.head.key_id != 0 => bail!(
                    "the receipt could not be checked against --public-key: its head is signed \
                     by key {}, which only the vault's key chain vouches for, and the connection \
                     failed before it came ({e})",
                    receipt.head.key_id
                ),
                    Err(e) => Err(anyhow::Error::new(e)
                        .context("the receipt does not verify with --public-key")),
                }
            }
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
                client::cli::printable(client.role())
            );
            return Ok(None);
        }
        Err(e) => return unverified(e, "the server's signed head does not check out"),
    };
    if let Err(e) = client.verify_receipt(receipt, &head.public_key).await {
        return unverified(e, "the receipt does not verify");
    }
    eprintln!(
        "note: the receipt was checked against the public key this server reports; \
         pass --public-key to check it against one you hold"
    );
    // A head older than the receipt's own would mean the server went back,
    // and so would no head at all.
    let mut tracker = HeadTracker::new();
    tracker.observe(&receipt.head)?;
    match &head.signed_head {
        Some(h) => tracker.observe(h)?,
        None => bail!(
            "the server reports an empty log after its receipt for seq {}",
            receipt.seq
        ),
    }
    Ok(Some(REPORTED))
}

/// A check that could not be made because the connection failed before
/// an answer came (a note; the receipt stays unverified), or one that
/// failed (`what`, exit 1): a receipt, key chain or head that does not
/// verify, and as much an answer that does not decode, or a refusal
/// (`KeyChain` is open to every role, and `Head` refused as `forbidden`
/// is handled before).
fn unverified(e: ClientError, what: &str) -> anyhow::Result<Option<&'static str>> {
    match e {
        e @ (ClientError::Io(_)
        | ClientError::Tls(_)
        | ClientError::Timeout
        | ClientError::Closed
        | ClientError::NotSent) => {
            eprintln!("note: receipt not verified: {e}");
            Ok(None)
        }
        // Not as a refusal of the request (exit 2): the append was done.
        ClientError::Server { code, message } => bail!(
            "{what}: the server refused the check ({code}: {})",
            client::cli::printable(&message)
        ),
        e => Err(anyhow::Error::new(e).context(what.to_string())),
    }
}

/// The token read from --token-file (`-`: stdin), or else given with
/// --token (or `FINTRUST_TOKEN`), without surrounding whitespace.
fn read_token(
    token: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Zeroizing<String>> {
    // Far more than any token: a device or a wrong file given by mistake
    // is refused, not read whole.
    const MAX: usize = 64 * 1024;
    let too_long = || anyhow::anyhow!("more than {MAX} bytes: not a token");
    let text = match (token, file) {
        (_, Some(path)) if path.as_os_str() == "-" => {
            // Room for the most read at once: a buffer that grows leaves
            // a copy of what it held in memory it frees.
            let mut bytes = Zeroizing::new(Vec::with_capacity(MAX + 1));
            std::io::Read::read_to_end(
                &mut std::io::Read::take(std::io::stdin(), MAX as u64 + 1),
                &mut bytes,
            )
            .context("cannot read the token from stdin")?;
            if bytes.len() > MAX {
                return Err(too_long().context("stdin"));
            }
            utf8(bytes).context("the token on stdin")?
        }
        (_, Some(path)) => {
            let bytes = client::cli::read_secret(path, MAX)
                .with_context(|| format!("{}: cannot read the token", path.display()))?
                .ok_or_else(|| too_long().context(format!("{}", path.display())))?;
            utf8(bytes).with_context(|| format!("{}: the token", path.display()))?
        }
        (Some(t), None) => Zeroizing::new(t.to_string()),
        (None, None) => bail!("no token: pass --token, --token-file or FINTRUST_TOKEN"),
    };
    let token = Zeroizing::new(text.trim().to_string());
    if token.is_empty() {
        bail!("the token is empty");
    }
    Ok(token)
}

/// `bytes` as text, in a buffer wiped when dropped (the copy checked is
/// the one returned).
fn utf8(bytes: Zeroizing<Vec<u8>>) -> anyhow::Result<Zeroizing<String>> {
    let text = std::str::from_utf8(&bytes).map_err(|_| anyhow::anyhow!("not UTF-8"))?;
    Ok(Zeroizing::new(text.to_string()))
}

/// The fields of a JSON object whose values are all strings, each name
/// once, in the order of their names. A record is sent in one frame, so
/// a file four times a frame's size (room for JSON's quotes and escapes)
/// is refused unread past that.
fn read_record(path: &PathBuf) -> anyhow::Result<Vec<(String, String)>> {
    let max = 4 * protocol::MAX_FRAME_LEN;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            std::io::Read::read_to_string(&mut std::io::Read::take(f, max as u64 + 1), &mut text)
        })
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() > max {
        bail!(
            "{}: more than {max} bytes, larger than a record can be",
            path.display()
        );
    }
    // serde_json names the value of the wrong type it found (a bare
    // string or number, which may be the personal data itself): a record
    // that is not an object is refused before it is parsed.
    if !text.trim_start().starts_with('{') {
        bail!(
            "{}: one JSON object whose values are strings is expected",
            path.display()
        );
    }
    let RecordFields(mut fields) =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    fields.sort();
    Ok(fields)
}

/// A record file's fields: a JSON object whose values are strings, no
/// name twice (which a map would keep the last of, silently).
struct RecordFields(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for RecordFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RecordFields;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("one JSON object whose values are strings")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RecordFields, A::Error> {
                use serde::de::Error;
                let mut fields = Vec::new();
                let mut names = std::collections::HashSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    let Value::String(value) = map.next_value::<Value>()? else {
                        return Err(A::Error::custom(format!("field {name:?} is not a string")));
                    };
                    if !names.insert(name.clone()) {
                        return Err(A::Error::custom(format!("field {name:?} appears twice")));
                    }
                    fields.push((name, value));
                }
                Ok(RecordFields(fields))
            }
        }
        d.deserialize_map(Fields)
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

    /// A record file is one object of strings, each name once: anything
    /// else is refused, naming what is wrong.
    #[test]
    fn record_files_are_read_strictly() {
        let dir = std::env::temp_dir().join(format!("vault-client-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a dir");
        let file = dir.join("r.json");
        let read = |text: &str| {
            std::fs::write(&file, text).expect("written");
            read_record(&file).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            read(r#"{"name": "Ada", "email": "a@x"}"#),
            Ok(vec![
                ("email".to_string(), "a@x".to_string()),
                ("name".to_string(), "Ada".to_string())
            ])
        );
        for (text, says) in [
            (
                r#"{"email": "a@x", "email": "b@y"}"#,
                "\"email\" appears twice",
            ),
            (r#"{"age": 3}"#, "\"age\" is not a string"),
            (r#"["a"]"#, "one JSON object"),
            (r#"{"a": "b""#, "EOF"),
            (r#" "4111111111111111""#, "one JSON object"),
            ("4111111111111111", "one JSON object"),
        ] {
            let got = read(text);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(says)),
                "{text}: {got:?}"
            );
            // Nor is a value of the wrong type repeated.
            assert!(
                got.as_ref().is_err_and(|e| !e.contains("4111")),
                "{text}: {got:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Only a connection that failed before an answer leaves the receipt
    /// unverified with a note; a refusal of the check, an answer that does
    /// not decode or one of the wrong type fails it (exit 1, not 2: the
    /// append was done).
    #[test]
    fn a_check_that_gets_an_answer_and_fails_is_a_failure() {
        let notes = [
            ClientError::Timeout,
            ClientError::Closed,
            ClientError::Io(std::io::Error::other("reset")),
        ];
        for e in notes {
            let shown = e.to_string();
            assert!(matches!(unverified(e, "check"), Ok(None)), "{shown}");
        }
        let failures = [
            ClientError::Server {
                code: ErrorCode::Internal,
                message: "no\u{1b}]0;title\u{7}".into(),
            },
            ClientError::UnexpectedResponse("KeyChainInfo"),
            ClientError::Protocol(protocol::Error::Malformed("an endorsement")),
        ];
        for e in failures {
            let shown = e.to_string();
            let Err(failed) = unverified(e, "check") else {
                panic!("{shown}: not a failure");
            };
            assert!(
                failed
                    .downcast_ref::<ClientError>()
                    .is_none_or(|c| !matches!(c, ClientError::Server { .. })),
                "{shown}: would exit 2"
            );
            assert!(!format!("{failed:#}").contains('\u{1b}'), "{failed:#}");
        }
    }
}
