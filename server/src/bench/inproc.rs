//! `vaultd` inside the benchmark process: the same [`daemon::run`] that
//! `vaultd serve` runs, on 127.0.0.1 with ports the OS chooses, so that a
//! workload measures the real protocol server (and shim) over real
//! sockets, without a second process to build, find and clean up.
//!
//! With TLS, a CA and a server certificate for `localhost` are made for
//! the run (rcgen, as the TLS tests do) and written under `DIR/tls/`:
//!
//! ```text
//! DIR/tls/ca.pem          the CA clients trust
//! DIR/tls/server.pem      the server's certificate, for localhost
//! DIR/tls/server.key      its private key
//! ```
//!
//! Client and server share the process's two cores: the figures are for
//! the whole system on one machine, as with any loopback benchmark.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use client::{ClientConfig, Tls, Zeroizing};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use storage::Vault;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::daemon::{self, Daemon};
use crate::serve::ServeConfig;
use crate::shim::{PoliciesFile, ShimConfig};
use crate::tls::{ServerTls, TlsFiles};
use crate::{Error, Result};

/// The name in the run's server certificate.
const SERVER_NAME: &str = "localhost";

/// A running in-process `vaultd`. [`InProcess::stop`] shuts it down and
/// closes the vault; dropping it without stopping leaves that to the end
/// of the runtime.
#[derive(Debug)]
pub struct InProcess {
    /// The protocol port.
    pub addr: SocketAddr,
    /// The HTTP shim, when started with one.
    pub http: Option<SocketAddr>,
    /// The CA file clients trust, with TLS.
    ca: Option<PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
}

/// What to start.
#[derive(Debug)]
pub struct Options {
    pub tls: bool,
    pub http: bool,
    /// Written to the vault at start (through the shim's gateway link).
    pub policies: Option<PoliciesFile>,
    /// Connection limit of both ports (default: the servers' own, 1024).
    pub max_connections: Option<usize>,
}

impl InProcess {
    /// Starts `vaultd` on `vault`; TLS material goes under `dir/tls`.
    pub async fn start(vault: Vault, dir: &Path, opts: Options) -> Result<InProcess> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| Error::File {
                path: what,
                error: source,
            }
        };
        let (tls, ca) = if opts.tls {
            let (files, ca) = make_pki(&dir.join("tls"))?;
            (Some(ServerTls::open(&files)?), Some(ca))
        } else {
            (None, None)
        };
        let protocol = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("127.0.0.1:0"))?;
        let http = if opts.http {
            Some(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(io("127.0.0.1:0"))?,
            )
        } else {
            None
        };
        let addr = protocol.local_addr().map_err(io("listener"))?;
        let http_addr = http
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(io("listener"))?;
        let d = Daemon {
            protocol,
            http,
            tls,
            serve: {
                let max_connections = opts
                    .max_connections
                    .unwrap_or(ServeConfig::default().max_connections);
                ServeConfig {
                    max_connections,
                    // The benchmark's clients share one key of each role:
                    // as many as it opens, up to the connection limit.
                    max_connections_per_credential: max_connections,
                    ..ServeConfig::default()
                }
            },
            shim: {
                let max_connections = opts
                    .max_connections
                    .unwrap_or(ShimConfig::default().max_connections);
                ShimConfig {
                    vault_addr: addr.to_string(),
                    max_connections,
                    // The benchmark's clients share one address: as many
                    // as it opens, up to the connection limit.
                    max_connections_per_peer: max_connections,
                    ..ShimConfig::default()
                }
            },
            policies: opts.policies,
            reopen: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(
            vault,
            d,
            move |_| {
                let _ = ready_tx.send(());
                Ok(())
            },
            async {
                let _ = stopped.await;
            },
        ));
        if ready.await.is_err() {
            // The daemon ended before it was ready: its error says why.
            return Err(match task.await {
                Ok(Err(e)) => e,
                Ok(Ok(())) => Error::Usage("vaultd stopped before it was ready".into()),
                Err(e) => super::join_error(e),
            });
        }
        Ok(InProcess {
            addr,
            http: http_addr,
            ca,
            stop: Some(stop),
            task,
        })
    }

    /// Whether both ports serve TLS.
    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }

    /// A client configuration for this server with `api_key`.
    pub fn client_config(&self, api_key: &str) -> ClientConfig {
        ClientConfig {
            addr: self.addr.to_string(),
            tls: match &self.ca {
                None => Tls::Plaintext,
                Some(ca) => Tls::Ca {
                    ca_pem_file: ca.clone(),
                    server_name: SERVER_NAME.into(),
                    client_cert: None,
                },
            },
            api_key: Zeroizing::new(api_key.to_string()),
            client_name: "vault-bench".into(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Stops accepting, lets requests in flight finish, closes the vault.
    /// Drop every client first: the vault closes once no connection holds it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.map_err(super::join_error)?
    }
}

/// Writes a CA and a `localhost` certificate it signed under `dir`;
/// returns the server's files and the CA's path.
fn make_pki(dir: &Path) -> Result<(TlsFiles, PathBuf)> {
    let pki = |e: rcgen::Error| Error::Usage(format!("making the run's TLS certificates: {e}"));
    let mut params = CertificateParams::new(vec!["vault-bench CA".to_string()]).map_err(pki)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(pki)?).map_err(pki)?;
    let key = KeyPair::generate().map_err(pki)?;
    let cert = CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(pki)?
        .signed_by(&key, &ca)
        .map_err(pki)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.display().to_string(),
        error: source,
    })?;
    let write = |name: &str, content: String| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, content).map_err(|source| Error::File {
            path: p.display().to_string(),
            error: source,
        })?;
        Ok(p)
    };
    // The private key, its owner's alone; one a run before left is
    // replaced, not written through.
    let key_file = dir.join("server.key");
    crate::dev::remove_if_present(&key_file)?;
    crate::dev::write_private(&key_file, key.serialize_pem().as_bytes())?;
    let files = TlsFiles {
        cert: write("server.pem", cert.pem())?,
        key: key_file,
        client_ca: None,
    };
    let ca = write("ca.pem", ca.pem())?;
    Ok((files, ca))
}
