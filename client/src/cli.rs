//! What the command-line tools (`vault-client`, `vault-admin`) share: the
//! connection flags, read from flags or `FINTRUST_` environment variables
//! (clap `global = true`, so they are accepted after the subcommand too),
//! and how they become a [`ClientConfig`]. The binaries stay thin: parse,
//! call one library method, print, map the error to an exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use zeroize::Zeroizing;

use crate::config::{ClientConfig, Tls};
use crate::error::{ClientError, Result};

/// Exit code of a local failure (arguments, files, connection, TLS).
pub const EXIT_LOCAL: u8 = 1;
/// Exit code of a request the server refused with an `Error` frame.
pub const EXIT_REFUSED: u8 = 2;

/// How to reach the vault and authenticate.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Address of the vault, host:port.
    #[arg(
        long,
        global = true,
        env = "FINTRUST_ADDR",
        default_value = "127.0.0.1:9999"
    )]
    pub addr: String,
    /// API key; prefer the environment variable, which `ps` does not show.
    #[arg(long, global = true, env = "FINTRUST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM file of the CA that signed the server's certificate: connect
    /// over TLS, trusting only this CA.
    #[arg(long, global = true, env = "FINTRUST_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Name the server's certificate must carry.
    #[arg(
        long,
        global = true,
        env = "FINTRUST_SERVER_NAME",
        default_value = "localhost"
    )]
    pub server_name: String,
    /// PEM client certificate chain, for a server that requires mutual TLS.
    #[arg(long, global = true, env = "FINTRUST_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, global = true, env = "FINTRUST_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Connect without TLS: the API key and data cross the network in the
    /// clear. Only for a server on loopback during development.
    #[arg(long, global = true)]
    pub insecure_plaintext: bool,
    /// Seconds allowed to connect and for each request.
    #[arg(
        long,
        global = true,
        env = "FINTRUST_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub timeout_secs: u64,
}

/// Output format of the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

impl ConnectArgs {
    /// The library's config, refusing plaintext unless asked for by name.
    /// `client_name` is sent in `Hello`.
    pub fn config(&self, client_name: &str) -> Result<ClientConfig> {
        let bad = |m: &str| ClientError::Config(m.to_string());
        let tls = match (&self.cacert, self.insecure_plaintext) {
            (Some(_), true) => {
                return Err(bad("--cacert and --insecure-plaintext exclude each other"))
            }
            (None, false) => return Err(bad(
                "refusing to connect without TLS: pass --cacert FILE (or set FINTRUST_CACERT), \
                     or --insecure-plaintext for a development server on loopback",
            )),
            (None, true) => {
                if self.client_cert.is_some() || self.client_key.is_some() {
                    return Err(bad("--client-cert and --client-key need TLS (--cacert)"));
                }
                Tls::Plaintext
            }
            (Some(ca), false) => Tls::Ca {
                ca_pem_file: ca.clone(),
                server_name: self.server_name.clone(),
                client_cert: match (&self.client_cert, &self.client_key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    _ => return Err(bad("--client-cert and --client-key go together")),
                },
            },
        };
        let Some(api_key) = self.api_key.clone() else {
            return Err(bad(
                "an API key is needed: set FINTRUST_API_KEY or pass --api-key",
            ));
        };
        let config = ClientConfig {
            addr: self.addr.clone(),
            tls,
            api_key: Zeroizing::new(api_key),
            client_name: client_name.to_string(),
            timeout: Duration::from_secs(self.timeout_secs),
        };
        config.validate()?;
        Ok(config)
    }
}
