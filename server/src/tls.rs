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

/// The server configuration for `files`: TLS 1.3 and 1.2, no client
/// certificates unless a client CA is given.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    // The client crate's suite order (AES-128-GCM first); a client's own
    // order is honoured.
    let provider = Arc::new(client::config::crypto_provider());
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| pem_error(&files.key, &format!("cannot read the private key: {e}")))?;
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
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| pem_error(&files.cert, &format!("certificate and key do not fit: {e}")))?;
    config.ticketer = stateless_tickets()?;
    // One ticket per handshake, resumed ones included: a client that opens
    // a connection per request spends one and gets one, so its tickets
    // stay as many as its connections at once, and a ticket lost with a
    // failed connection comes back with the next full handshake. A second
    // ticket cost each connection another seal, key derivation and record
    // at both ends (rustls's default is two).
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// Both ends of TLS with the dev certificate `vaultd dev --tls` makes in
/// `dir`: for tests that run a server over an in-memory pipe.
#[cfg(test)]
pub(crate) fn test_ends(dir: &Path) -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let (server, ca) = crate::dev::dev_tls(dir).expect("a dev certificate");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).expect("the CA file") {
        roots.add(c.expect("a certificate")).expect("a root");
    }
    let client =
        rustls::ClientConfig::builder_with_provider(Arc::new(client::config::crypto_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(server),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
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
