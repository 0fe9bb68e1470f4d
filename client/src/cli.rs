//! What the command-line tools that talk to a vault (`vault-client`,
//! `vault-admin`, `vault-verify --remote`) share: the connection flags in
//! one clap [`ConnectArgs`] that each binary flattens into its own
//! arguments, so that the flags, their `FINTRUST_*` environment variables
//! and the refusal of implicit plaintext are the same everywhere; and
//! [`main`] and [`connect`], so that `vault-client` and `vault-admin` map
//! errors to the same exit codes (0 success, 1 local error, 2 refused by
//! the server). `vault-verify` keeps its own (0 intact, 1 integrity
//! failure, 2 could not run), remote or not.
//!
//! This is the edge of a binary: it reads the API key file it is given.
//! Libraries take a [`ClientConfig`] and never read flags or files.

use crate::eprintln_or_lose as eprintln;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, Tls};
use crate::connection::{Client, Connector, Redeemed};
use crate::error::{ClientError, Result};

/// Exit code of a local failure (arguments, files, connection, TLS).
pub const EXIT_LOCAL: u8 = 1;
/// Exit code of a request the server refused with an `Error` frame.
pub const EXIT_REFUSED: u8 = 2;

/// Output format of the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Plain text for a person to read.
    Text,
    /// One JSON object on a single line, for a program to read.
    Json,
}

impl Format {
    /// Prints `json` or `text` on stdout, as this format asks, with
    /// [`print_line`].
    pub fn print(self, json: &serde_json::Value, text: &str) -> anyhow::Result<()> {
        match self {
            Format::Json => print_line(&json.to_string()),
            Format::Text => print_line(text),
        }
    }
}

/// `eprintln!` that loses its line, rather than panic, when stderr is
/// closed (`tool … 2>&1 | head -1`): the tools import it under that name,
/// so that a diagnostic never takes the place of their exit code.
#[macro_export]
macro_rules! eprintln_or_lose {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

/// `line` and a newline on stdout, flushed: an error (exit 1 from a tool)
/// where `println!` would panic, when stdout is closed, as by
/// `vault-verify … | head -0`.
pub fn print_line(line: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    write_line(line).context("cannot write to stdout")
}

/// [`print_line`]'s write, with the I/O error as it came.
pub fn write_line(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush())
}

/// A secret given as an argument, kept in a buffer that is wiped when it
/// is dropped (the copy in the process's arguments cannot be).
pub fn secret_arg(s: &str) -> std::result::Result<Zeroizing<String>, std::convert::Infallible> {
    Ok(Zeroizing::new(s.to_string()))
}

/// How to reach and authenticate to a vault: everything but the address,
/// which each tool names in its own way (`--addr`, `--remote`). Its
/// `Debug` leaves the API key out.
#[derive(Clone, Args)]
pub struct ConnectArgs {
    /// API key; prefer the environment variable or --api-key-file, which
    /// `ps` does not show. [env: FINTRUST_API_KEY]
    #[arg(long, global = true, value_parser = secret_arg)]
    pub api_key: Option<Zeroizing<String>>,
    /// File holding the API key (surrounding whitespace is ignored).
    /// Either flag wins over both variables. [env: FINTRUST_API_KEY_FILE]
    #[arg(long, global = true)]
    pub api_key_file: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate: connect
    /// over TLS, trusting only this CA.
    #[arg(long, global = true, env = "FINTRUST_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Name the server's certificate must carry [default: the host of the
    /// address].
    #[arg(long, global = true, env = "FINTRUST_SERVER_NAME")]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for a server that requires mutual TLS.
    /// Without an API key, the certificate itself authenticates, as the
    /// credential the vault binds to it (`vault-admin credentials create
    /// --holder-cert`).
    #[arg(long, global = true, env = "FINTRUST_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, global = true, env = "FINTRUST_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Connect without TLS: the API key and data cross the network in the
    /// clear. Only for a server on loopback during development.
    #[arg(long, global = true)]
    pub insecure_plaintext: bool,
    /// Seconds allowed to connect and for each request (1 to 86,400).
    #[arg(
        long,
        global = true,
        env = "FINTRUST_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=crate::MAX_TIMEOUT.as_secs())
    )]
    pub timeout_secs: u64,
}

impl std::fmt::Debug for ConnectArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectArgs")
            .field("api_key", &self.api_key.as_ref().map(|_| ".."))
            .field("api_key_file", &self.api_key_file)
            .field("cacert", &self.cacert)
            .field("server_name", &self.server_name)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("insecure_plaintext", &self.insecure_plaintext)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

impl ConnectArgs {
    /// The library's config for `addr`, refusing plaintext unless it was
    /// asked for by name. Reads `--api-key-file`; touches no network.
    pub fn config(&self, addr: &str, client_name: String) -> Result<ClientConfig> {
        let config = ClientConfig {
            addr: addr.to_string(),
            tls: self.tls(addr)?,
            api_key: self.api_key()?,
            client_name,
            timeout: Duration::from_secs(self.timeout_secs),
        };
        config.validate()?;
        Ok(config)
    }

    /// The TLS to speak to `addr`: its certificate is checked against
    /// `--server-name`, or else the address's own host, so that a
    /// certificate for another name of the same CA is not taken for it.
    fn tls(&self, addr: &str) -> Result<Tls> {
        let bad = |m: &str| Err(ClientError::Config(m.to_string()));
        match (&self.cacert, self.insecure_plaintext) {
            (Some(_), true) => bad("--cacert and --insecure-plaintext exclude each other"),
            (None, false) => bad(
                "refusing to connect without TLS: pass --cacert FILE (or set FINTRUST_CACERT), \
                 or --insecure-plaintext for a development server on loopback",
            ),
            (None, true) => {
                if self.client_cert.is_some() || self.client_key.is_some() {
                    return bad("--client-cert and --client-key need TLS (--cacert)");
                }
                if !crate::config::is_loopback(addr) {
                    eprintln!(
                        "warning: --insecure-plaintext to {}, which is not a loopback address: \
                         the API key and the data cross the network in the clear",
                        printable(addr)
                    );
                }
                Ok(Tls::Plaintext)
            }
            (Some(ca), false) => Ok(Tls::Ca {
                ca_pem_file: ca.clone(),
                server_name: self
                    .server_name
                    .clone()
                    .unwrap_or_else(|| crate::config::host_of(addr).to_string()),
                client_cert: match (&self.client_cert, &self.client_key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    _ => return bad("--client-cert and --client-key go together"),
                },
            }),
        }
    }

    /// The API key: from `--api-key` or `--api-key-file`, or else from
    /// `FINTRUST_API_KEY` or `FINTRUST_API_KEY_FILE` (a variable set in a
    /// service's environment does not stand in the way of a flag given
    /// to one command). Two of one level are refused: which was meant is
    /// not known.
    fn api_key(&self) -> Result<Zeroizing<String>> {
        match given_api_key(self.api_key.clone(), self.api_key_file.as_deref())? {
            Some(key) => Ok(key),
            // Over mutual TLS the certificate may stand for the caller.
            None if self.client_cert.is_some() => Ok(Zeroizing::new(String::new())),
            None => Err(ClientError::Config(
                "an API key is needed: set FINTRUST_API_KEY or pass --api-key or --api-key-file \
                 (or --client-cert, for a credential the vault binds to that certificate)"
                    .into(),
            )),
        }
    }
}

/// The API key a tool was given: by `--api-key` (`flag`) or
/// `--api-key-file` (`file`), or else by `FINTRUST_API_KEY` or
/// `FINTRUST_API_KEY_FILE` (a variable set in a service's environment does
/// not stand in the way of a flag given to one command); `None` when by
/// none. Two of one level are refused: which was meant is not known. A
/// key file is read whole, at most 64 KiB, without surrounding whitespace.
pub fn given_api_key(
    flag: Option<Zeroizing<String>>,
    file: Option<&std::path::Path>,
) -> Result<Option<Zeroizing<String>>> {
    let (key, file, both) = match (flag, file) {
        (None, None) => (
            std::env::var("FINTRUST_API_KEY")
                .ok()
                .filter(|k| !k.is_empty())
                .map(Zeroizing::new),
            std::env::var_os("FINTRUST_API_KEY_FILE")
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
            "FINTRUST_API_KEY and FINTRUST_API_KEY_FILE are both set",
        ),
        (key, file) => (
            key,
            file.map(std::path::Path::to_path_buf),
            "--api-key and --api-key-file exclude each other",
        ),
    };
    match (key, file) {
        (Some(_), Some(_)) => Err(ClientError::Config(both.into())),
        (Some(key), None) => Ok(Some(key)),
        (None, Some(path)) => read_key_file(&path).map(Some),
        (None, None) => Ok(None),
    }
}

/// The key in `path`, read into a wiped buffer: at most 64 KiB (a device
/// or a wrong file given by mistake is refused, not read whole), UTF-8,
/// without surrounding whitespace.
fn read_key_file(path: &std::path::Path) -> Result<Zeroizing<String>> {
    const MAX: usize = 64 * 1024;
    let bad = |what: String| ClientError::Config(format!("{}: {what}", path.display()));
    let bytes = read_secret(path, MAX)
        .map_err(|e| bad(format!("cannot read the API key: {e}")))?
        .ok_or_else(|| bad(format!("more than {MAX} bytes: not an API key file")))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("the API key is not UTF-8".into()))?;
    Ok(Zeroizing::new(text.trim().to_string()))
}

pub use crate::config::read_secret;

/// The `main` of a tool: parses `C` (help and version exit 0, bad flags
/// exit 1), runs `run` on a current-thread runtime, and maps its error to
/// the exit code: [`EXIT_REFUSED`] for a refusal by the server (printed as
/// `error: <code>: <message>`), [`EXIT_LOCAL`] for everything else.
pub fn main<C, F>(run: impl FnOnce(C) -> F) -> ExitCode
where
    C: clap::Parser,
    F: Future<Output = anyhow::Result<()>>,
{
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_LOCAL)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_LOCAL);
        }
    };
    let result = runtime.block_on(run(cli));
    // A name lookup still running on the blocking pool (its connect timed
    // out) is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(ClientError::Server { code, message }) => {
                eprintln!("error: {code}: {}", printable(message));
                ExitCode::from(EXIT_REFUSED)
            }
            _ => {
                eprintln!("error: {}", printable(&format!("{e:#}")));
                ExitCode::from(EXIT_LOCAL)
            }
        },
    }
}

/// `s` with its control characters escaped (`\u{1b}`), for a terminal: a
/// server's message or name must not be able to move the cursor, retitle
/// the window or hide what precedes it.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Connects with `config`. A refusal by the server keeps its type (so
/// [`main`] exits [`EXIT_REFUSED`]); other failures name the address.
pub async fn connect(config: ClientConfig) -> anyhow::Result<Client> {
    let addr = config.addr.clone();
    Client::connect(config)
        .await
        .map_err(|e| unless_refused(e, || format!("cannot connect to {addr}")))
}

/// A redemption on a connection of its own ([`Connector::redeem`]), with
/// the errors [`connect`] gives.
pub async fn redeem(config: ClientConfig, token: &str) -> anyhow::Result<Redeemed> {
    let addr = config.addr.clone();
    match Connector::new(config)?.redeem(token).await {
        Ok(r) => Ok(r.data),
        Err(e) => {
            let spent = if maybe_spent(&e) {
                "; the token may be spent: the vault burns a token before its data leaves, \
                 so a redemption cut off once it reached the vault loses the data (another \
                 redemption answers token_spent then)"
            } else {
                ""
            };
            Err(unless_refused(e, || {
                format!("cannot redeem at {addr}{spent}")
            }))
        }
    }
}

/// Whether a redemption that failed with `e` may have reached the vault,
/// which then burnt the token: the connection closed or reset, no answer
/// in time, an answer that does not read. Not a refusal, a local error or
/// a connection never made.
fn maybe_spent(e: &ClientError) -> bool {
    use std::io::ErrorKind as K;
    match e {
        ClientError::Closed
        | ClientError::Timeout
        | ClientError::UnexpectedResponse(_)
        | ClientError::WrongProtocol(_)
        | ClientError::Protocol(_) => true,
        ClientError::Io(io) => matches!(
            io.kind(),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof
        ),
        _ => false,
    }
}

/// `e` with `context`, unless the server refused: a refusal keeps its
/// type, so that [`main`] exits [`EXIT_REFUSED`].
fn unless_refused(e: ClientError, context: impl FnOnce() -> String) -> anyhow::Error {
    match e {
        e @ ClientError::Server { .. } => e.into(),
        e => {
            let hint = next_step(&e);
            anyhow::Error::new(e).context(format!("{}{hint}", context()))
        }
    }
}

/// What to check after the failures a user meets most, as a sentence to
/// follow the context (empty for the others).
fn next_step(e: &ClientError) -> &'static str {
    match e {
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            " (is vaultd running and listening there? --addr, FINTRUST_ADDR)"
        }
        ClientError::Tls(t) if t.contains("UnknownIssuer") || t.contains("unknown issuer") => {
            " (is --cacert the CA that signed the server's certificate? each data dir of \
             `vaultd dev --tls` has a CA of its own, dev-ca.pem)"
        }
        ClientError::Tls(t)
            if t.contains("NotValidForName") || t.contains("not valid for name") =>
        {
            " (the certificate does not name the host of --addr: give the name it holds with \
             --server-name)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    fn parse(args: &[&str]) -> ConnectArgs {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("parses")
            .connect
    }

    /// A refused connection and a certificate that does not check say
    /// what to look at; a server's refusal keeps its own words.
    #[test]
    fn the_common_failures_say_what_to_check() {
        let refused = ClientError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(next_step(&refused).contains("is vaultd running"));
        let issuer = ClientError::from(std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        assert!(next_step(&issuer).contains("--cacert"), "{issuer}");
        let name = ClientError::from(std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        )));
        assert!(next_step(&name).contains("--server-name"), "{name}");
        let other = ClientError::Io(std::io::ErrorKind::TimedOut.into());
        assert_eq!(next_step(&other), "");
        let server = ClientError::Server {
            code: protocol::ErrorCode::Unauthenticated,
            message: "m".into(),
        };
        assert_eq!(
            unless_refused(server, || "context".into()).to_string(),
            ClientError::Server {
                code: protocol::ErrorCode::Unauthenticated,
                message: "m".into(),
            }
            .to_string()
        );
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("plain: été"), "plain: été");
        assert_eq!(printable("a\u{1b}[2Jb\nc\u{7}"), "a\\u{1b}[2Jb\\nc\\u{7}");
    }

    #[test]
    fn debug_leaves_the_api_key_out() {
        let a = parse(&["--api-key", "fvk_SECRET", "--insecure-plaintext"]);
        let shown = format!("{a:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("insecure_plaintext: true"), "{shown}");
    }

    /// Without --server-name, the name checked is the address's host.
    #[test]
    fn the_server_name_is_the_host_of_the_address_by_default() {
        let dir = scratch_dir("name");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "").expect("write");
        let ca = ca.to_str().expect("utf-8");
        let name = |args: &[&str], addr: &str| match parse(args).tls(addr) {
            Ok(Tls::Ca { server_name, .. }) => server_name,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            name(&["--cacert", ca], "vault.example:9999"),
            "vault.example"
        );
        assert_eq!(name(&["--cacert", ca], "[::1]:9999"), "::1");
        assert_eq!(
            name(
                &["--cacert", ca, "--server-name", "other"],
                "vault.example:9999"
            ),
            "other"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A dir of this process for the test `name`, which removes it.
    fn scratch_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("fintrust-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn plaintext_must_be_asked_for() {
        let a = parse(&["--api-key", "fvk_x"]);
        assert!(matches!(
            a.config("127.0.0.1:1", "t".into()),
            Err(ClientError::Config(m)) if m.contains("without TLS")
        ));
        let a = parse(&["--api-key", "fvk_x", "--insecure-plaintext"]);
        let c = a.config("127.0.0.1:1", "t".into()).expect("config");
        assert_eq!(c.tls, Tls::Plaintext);
        assert_eq!(c.api_key.as_str(), "fvk_x");
    }

    #[test]
    fn the_api_key_file_is_read_and_trimmed() {
        let dir = scratch_dir("key");
        let file = dir.join("key");
        std::fs::write(&file, "fvk_from_file\n").expect("write");
        let path = file.to_str().expect("utf-8");
        let a = parse(&["--api-key-file", path, "--insecure-plaintext"]);
        let c = a.config("127.0.0.1:1", "t".into()).expect("config");
        assert_eq!(c.api_key.as_str(), "fvk_from_file");
        let _ = std::fs::remove_dir_all(&dir);
        let missing = parse(&["--api-key-file", path, "--insecure-plaintext"]);
        assert!(matches!(
            missing.config("127.0.0.1:1", "t".into()),
            Err(ClientError::Config(_))
        ));
    }

    #[test]
    fn client_certificates_need_tls_and_each_other() {
        let a = parse(&[
            "--api-key",
            "k",
            "--insecure-plaintext",
            "--client-cert",
            "c.pem",
        ]);
        assert!(a.config("h:1", "t".into()).is_err());
        let a = parse(&["--api-key", "k", "--cacert", "ca.pem", "--client-cert", "c"]);
        assert!(a.config("h:1", "t".into()).is_err());
        let a = parse(&["--api-key", "k", "--cacert", "ca.pem"]);
        assert!(matches!(
            a.config("h:1", "t".into()).map(|c| c.tls),
            Ok(Tls::Ca { .. })
        ));
    }
}
