//! `vaultd` and the admin tools of fintrust-vault.
//!
//! The binaries in `src/bin/` are thin: they parse arguments into the typed
//! options of this library, call one function, and map its error to an
//! exit code. Modules:
//!
//! - [`alloc`]: runtime options of the binaries' allocator (mimalloc).
//! - [`secrets`]: reading passphrase and key files.
//! - [`admin`]: `vault-admin`'s log tools: `audit` (events as JSON lines)
//!   and `export` (a signed, portable log file), online and offline.
//! - [`init`]: `vaultd init`, creating a vault.
//! - [`dev`]: `vaultd dev`, the newcomer's embedded demo.
//! - [`daemon`]: one `vaultd` process: protocol server and shim together.
//! - [`live`]: the vault the servers answer from, reopened after a failed
//!   write or fsync.
//! - [`mask`]: the masking operators a partner's redemption applies.
//! - [`failpoints`]: failpoints before each reply, armed by
//!   `FINTRUST_FAILPOINTS` in test builds only.
//! - [`fuzzing`]: policy parsing, masking and a protocol connection to a
//!   real vault on arbitrary input, shared by the fuzz targets in `fuzz/`
//!   and the proptests.
//! - [`serve`]: the protocol server of port 9999 (`vaultd serve`).
//! - [`tls`]: rustls configuration of that port, mutual TLS optional.
//! - [`shim`]: the HTTP policy shim of port 8080 (authorize, policies,
//!   consents, credentials, logs, health).
//! - [`metrics`]: the Prometheus metrics both servers keep.
//! - [`verify`]: `vault-verify`'s report and its exit codes.
//! - [`remote`]: `vault-verify --remote`, the same checks of a live
//!   server's log over the wire protocol.
//! - [`bench`](mod@bench): `vault-bench`, throughput and latency of the storage
//!   engine, the protocol server and the HTTP shim.

pub mod admin;
pub mod alloc;
pub mod bench;
pub mod daemon;
pub mod dev;
pub mod failpoints;
pub mod fuzzing;
pub mod init;
pub mod live;
pub mod mask;
pub mod metrics;
pub mod proxied;
pub mod remote;
pub mod secrets;
pub mod serve;
pub mod shim;
pub mod tls;
pub mod verify;

/// Prefix of every environment variable the tools read. `VAULT_` belongs to
/// HashiCorp Vault and is never used.
pub const ENV_PREFIX: &str = "FINTRUST_";

/// Sends the process's tracing events to stderr, filtered by
/// `FINTRUST_LOG` (`tracing_subscriber`'s `EnvFilter` syntax), else by
/// `default_filter`; colored only on a terminal. For the binaries: data
/// goes to stdout, diagnostics to stderr.
pub fn log_to_stderr(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FINTRUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
}

/// An error and its sources, `: `-separated ("e: source: source's
/// source"): what a message names when the error's own words leave out
/// their cause (the client's `I/O error`, say).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// Serializes a path as text, its bytes that are not UTF-8 replaced
/// (U+FFFD), for `#[serde(serialize_with)]`: serde_json refuses such a
/// path as it is, which would lose the whole output it is part of (a
/// new admin key, the word that a rotation was done).
pub fn path_text<P: AsRef<std::path::Path>, S: serde::Serializer>(
    p: &P,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&p.as_ref().to_string_lossy())
}

/// [`path_text`] of a path that may be absent.
pub fn optional_path_text<P: AsRef<std::path::Path>, S: serde::Serializer>(
    p: &Option<P>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_some(&p.as_ref().to_string_lossy()),
        None => s.serialize_none(),
    }
}

/// Errors of the server crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// A file or socket the server reads or writes, with the I/O error
    /// in the message (not also as a source, so a chain prints it once).
    #[error("{path}: {error}")]
    File { path: String, error: std::io::Error },
    #[error("{0}")]
    Usage(String),
    /// Talking to a vault failed: unreachable, TLS, refused by the server,
    /// a timeout, or answers that do not decode.
    #[error(transparent)]
    Client(#[from] client::ClientError),
}

/// Result alias of the server crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
