//! TLS for port 9999 (rustls, aws-lc-rs provider, with the suites in the order
//! of [`client::config::crypto_provider`]): the server's certificate
//! chain and key from PEM files, and optionally a CA whose client
//! certificates are then required (mutual TLS). Client certificates
//! authenticate the connection at the TLS layer; the `Hello` API key still
//! decides the role.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// Where the TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when given, clients must present a certificate
    /// issued by one of them.
    pub client_ca: Option<PathBuf>,
}

fn pem_error(path: &Path, what: &str) -> Error {
    Error::Usage(format!("{}: {what}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, &format!("cannot read certificates: {e}")))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, &format!("bad certificate: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// TLS 1.3 session tickets that carry the session themselves, sealed
/// (AES-256-CBC with HMAC-SHA256) under keys rustls makes at random and
/// rotates every six hours: the server keeps no per-session state, so
/// however many tickets partners hold, none is forgotten before it expires,
/// and no ticket outlives a restart of the process. A resumed handshake
/// still makes a fresh X25519 exchange (rustls offers only `psk_dhe_ke`),
/// so resumed connections keep forward secrecy.
pub fn stateless_tickets() -> Result<Arc<dyn rustls::server::ProducesTickets>> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::Usage(format!("TLS tickets: {e}")))
}

/// TLS 1.3 tickets the server sends after each handshake.
pub const TICKETS_PER_HANDSHAKE: usize = 1;

/// The server's certificate chain and key, read from their files again on
/// demand ([`CertificateStore::reload`], `vaultd` on SIGHUP), so that a
/// renewed certificate is served without a restart.
///
/// Invariants: a reload takes effect only when both files read and the key
/// fits the chain's first certificate; otherwise the certificate served
/// stays as it was. Handshakes in progress keep the certificate they
/// chose; sessions resumed from tickets issued before are not asked for
/// one again.
#[derive(Debug)]
pub struct CertificateStore {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl CertificateStore {
    /// Reads the chain and key of `files`.
    pub fn open(files: &TlsFiles, provider: Arc<rustls::crypto::CryptoProvider>) -> Result<Self> {
        let current = certified_key(&files.cert, &files.key, &provider)?;
        Ok(CertificateStore {
            cert: files.cert.clone(),
            key: files.key.clone(),
            provider,
            current: std::sync::RwLock::new(Arc::new(current)),
        })
    }

    /// Reads both files again and serves what they hold from the next
    /// handshake on; on an error, what was served before stays.
    pub fn reload(&self) -> Result<()> {
        let fresh = Arc::new(certified_key(&self.cert, &self.key, &self.provider)?);
        let mut current = self
            .current
            .write()
            .map_err(|_| Error::Usage("TLS certificate store poisoned".into()))?;
        *current = fresh;
        Ok(())
    }

    /// The chain served now.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current
            .read()
            .map(|c| c.cert.clone())
            .unwrap_or_default()
    }
}

impl rustls::server::ResolvesServerCert for CertificateStore {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// The chain in `cert` with the key in `key`, which must fit its first
/// certificate.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey> {
    let chain = certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| pem_error(key, &format!("cannot read the private key: {e}")))?;
    rustls::sign::CertifiedKey::from_der(chain, der, provider)
        .map_err(|e| pem_error(cert, &format!("certificate and key do not fit: {e}")))
}

/// Reloads `store` on every SIGHUP, until the process ends: the log says
/// what was loaded, or why not (what was served before stays), and
/// `fintrust_tls_reloads_total{outcome}` counts both. Without a store
/// (plaintext, or `vaultd dev`'s own certificate), SIGHUP is logged and
/// ignored, not the end of the process.
/// Call it inside a runtime.
pub fn reload_on_hangup(store: Option<Arc<CertificateStore>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the TLS certificate is read at start only");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(store) = &store else {
                tracing::info!("SIGHUP ignored: no TLS certificate files to read again");
                continue;
            };
            let outcome = match store.reload() {
                Ok(()) => {
                    tracing::info!(cert = %store.cert.display(), "SIGHUP: TLS certificate reloaded");
                    "reloaded"
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; the one served before stays");
                    "failed"
                }
            };
            crate::metrics::global()
                .tls_reloads
                .get_or_create(&crate::metrics::OutcomeLabels { outcome })
                .inc();
        }
    });
}

/// The server configuration for `files`: TLS 1.3 and 1.2, no client
/// certificates unless a client CA is given.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    server_config_reloadable(files).map(|(config, _)| config)
}

/// [`server_config`], and the store its certificate comes from, which
/// [`CertificateStore::reload`] reads again.
pub fn server_config_reloadable(
    files: &TlsFiles,
) -> Result<(Arc<ServerConfig>, Arc<CertificateStore>)> {
    // The client crate's suite order (AES-128-GCM first); a client's own
    // order is honoured.
    let provider = Arc::new(client::config::crypto_provider());
    let store = Arc::new(CertificateStore::open(files, provider.clone())?);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Usage(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| pem_error(ca, &format!("bad CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| pem_error(ca, &format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(store.clone());
    config.ticketer = stateless_tickets()?;
    // One ticket per handshake, resumed ones included: a client that opens
    // a connection per request spends one and gets one, so its tickets
    // stay as many as its connections at once, and a ticket lost with a
    // failed connection comes back with the next full handshake. A second
    // ticket cost each connection another seal, key derivation and record
    // at both ends (rustls's default is two).
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok((Arc::new(config), store))
}

/// Both ends of TLS with the dev certificate `vaultd dev --tls` makes in
/// `dir`: for tests that run a server over an in-memory pipe.
#[cfg(test)]
pub(crate) fn test_ends(dir: &Path) -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let (server, ca) = crate::dev::dev_tls(dir).expect("a dev certificate");
    (
        tokio_rustls::TlsAcceptor::from(server),
        test_connector(&[&ca]),
    )
}

/// A client end of TLS that trusts the CA certificates in the PEM files
/// `cas`, for tests.
#[cfg(test)]
pub(crate) fn test_connector(cas: &[&Path]) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        for c in certs(ca).expect("a CA file") {
            roots.add(c).expect("a root");
        }
    }
    let client =
        rustls::ClientConfig::builder_with_provider(Arc::new(client::config::crypto_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(client))
}

/// Counts a server-side TLS handshake on `port` (`protocol` or `http`) in
/// `fintrust_tls_handshakes_total`: `resumed` or `full` when it finished,
/// `failed` when it did not, `timeout` when the timeout cut it off.
pub(crate) fn count_handshake<IO, Elapsed>(
    port: &'static str,
    accepted: &std::result::Result<std::io::Result<tokio_rustls::server::TlsStream<IO>>, Elapsed>,
) {
    let outcome = match accepted {
        Err(_) => "timeout",
        Ok(Err(_)) => "failed",
        Ok(Ok(stream))
            if stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) =>
        {
            "resumed"
        }
        Ok(Ok(_)) => "full",
    };
    crate::metrics::global()
        .tls_handshakes
        .get_or_create(&crate::metrics::HandshakeLabels { port, outcome })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A dev CA and its leaf for `localhost`, made in a dir of their own.
    fn issued(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("a dir");
        let (_, ca) = crate::dev::dev_tls(dir).expect("a dev certificate");
        (dir.join("dev-cert.pem"), dir.join("dev-key.pem"), ca)
    }

    fn leaf(cert: &Path) -> CertificateDer<'static> {
        certs(cert).expect("a chain").remove(0)
    }

    /// What a client that trusts `cas` is shown by `config`, over a pipe.
    async fn presented(config: Arc<ServerConfig>, cas: &[&Path]) -> CertificateDer<'static> {
        let connector = test_connector(cas);
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let server = async move {
            let mut s = tokio_rustls::TlsAcceptor::from(config)
                .accept(theirs)
                .await
                .expect("the server's handshake");
            let mut byte = [0u8; 1];
            let _ = s.read(&mut byte).await;
        };
        let client = async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let mut c = connector
                .connect(name, ours)
                .await
                .expect("the client's handshake");
            let shown = c.get_ref().1.peer_certificates().expect("a chain")[0].clone();
            c.write_all(b"x").await.expect("a byte");
            // Kept open until the server has read the byte (its tickets
            // go out after the handshake).
            (shown, c)
        };
        tokio::join!(server, client).1 .0
    }

    /// A reload serves the files' new chain from the next handshake on;
    /// files that do not read, or a key that does not fit, leave what was
    /// served before.
    #[tokio::test]
    async fn a_reload_serves_the_renewed_certificate_and_keeps_it_through_bad_files() {
        let dir = tempfile::tempdir().expect("a dir");
        let (cert_a, key_a, ca_a) = issued(&dir.path().join("a"));
        let (cert_b, key_b, ca_b) = issued(&dir.path().join("b"));
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        let put = |cert: &Path, key: &Path| {
            std::fs::copy(cert, &files.cert).expect("the cert");
            std::fs::copy(key, &files.key).expect("the key");
        };
        put(&cert_a, &key_a);
        let (config, store) = server_config_reloadable(&files).expect("a config");
        let cas = [ca_a.as_path(), ca_b.as_path()];
        assert_eq!(presented(config.clone(), &cas).await, leaf(&cert_a));

        put(&cert_b, &key_b);
        assert_eq!(
            presented(config.clone(), &cas).await,
            leaf(&cert_a),
            "nothing changes before the reload"
        );
        store.reload().expect("the renewed files");
        assert_eq!(presented(config.clone(), &cas).await, leaf(&cert_b));

        // A's certificate with B's key; a key that is not PEM; no key.
        std::fs::copy(&cert_a, &files.cert).expect("the cert");
        let err = store.reload().expect_err("a key that does not fit");
        assert!(err.to_string().contains("do not fit"), "{err}");
        std::fs::write(&files.key, b"not a key").expect("garbage");
        assert!(store.reload().is_err());
        std::fs::remove_file(&files.key).expect("remove");
        assert!(store.reload().is_err());
        assert_eq!(store.chain(), vec![leaf(&cert_b)]);
        assert_eq!(presented(config, &cas).await, leaf(&cert_b));
    }
}
