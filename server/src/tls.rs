//! TLS for both of `vaultd`'s ports, 9999 and the shim's 8080 (rustls,
//! aws-lc-rs provider, with the suites in the order of
//! [`client::config::crypto_provider`]): the server's certificate chain
//! and key from PEM files, and optionally a CA whose client certificates
//! are then required (mutual TLS). Client certificates authenticate the
//! connection at the TLS layer; the role is the `Hello` API key's, or,
//! with an empty key over mutual TLS, that of the credential the verified
//! certificate holds (`serve::authenticate_certificate`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

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
    client::config::certificate_file(path).map_err(|e| pem_error(path, &e))
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

/// Whether a finished server handshake may be served as to its client
/// certificate: a full handshake's was checked by the verifier, but a
/// TLS 1.3 resumption brings back the certificate of the session it
/// resumes unchecked, so that a ticket would keep a certificate that has
/// expired since (a ticket lives up to six hours) working. A resumed
/// session's leaf must be within its validity now; one that does not
/// parse is refused too.
pub fn client_certificate_in_force(
    conn: &rustls::ServerConnection,
) -> std::result::Result<(), String> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return Ok(());
    }
    let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
        return Ok(());
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| "the resumed session's client certificate does not parse".to_string())?;
    let v = x.validity();
    if now < v.not_before.timestamp() || now > v.not_after.timestamp() {
        return Err("the resumed session's client certificate is not valid now".into());
    }
    Ok(())
}

/// The TLS configuration a server hands each new connection: read from
/// [`TlsFiles`] at start, and read again whole on demand
/// ([`ServerTls::reload`], `vaultd` on SIGHUP), so that a renewed
/// certificate, key or client CA is served without a restart.
///
/// Invariants:
/// - A reload takes effect only when every file reads, the key fits the
///   chain's first certificate and the client CA builds a verifier;
///   otherwise the configuration served stays as it was.
/// - Each connection takes the configuration of the moment it is accepted:
///   handshakes in progress finish with the one they started with.
/// - A reload starts a new ticket key. A TLS 1.3 resumption does not check
///   the client's certificate again, so a ticket issued before a reload
///   that removed a client CA would otherwise still let its holder in;
///   after a reload every client's next connection makes a full handshake,
///   checked against the new CA and shown the new certificate. Between
///   reloads, a resumed session's certificate must still be within its
///   validity ([`client_certificate_in_force`]).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// `None`: a configuration made in the process, which cannot be read
    /// again.
    files: Option<Arc<TlsFiles>>,
    current: Arc<std::sync::RwLock<Arc<ServerConfig>>>,
    /// When the served chain expires ([`chain_expiry`]); 0 when unknown.
    expires: Arc<std::sync::atomic::AtomicI64>,
}

impl ServerTls {
    /// Reads `files`: TLS 1.3 and 1.2, no client certificates unless a
    /// client CA is given.
    pub fn open(files: &TlsFiles) -> Result<Self> {
        let (config, expires) = server_config(files)?;
        served_until(&files.cert, expires);
        Ok(ServerTls {
            current: Arc::new(std::sync::RwLock::new(config)),
            files: Some(Arc::new(files.clone())),
            expires: Arc::new(expires.into()),
        })
    }

    /// When the served chain expires: the earliest `notAfter` of its
    /// certificates, in seconds since the Unix epoch (0 for a
    /// configuration made in the process).
    pub fn expires_at(&self) -> i64 {
        self.expires.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration served now.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            // Only a panic while the lock was held for a swap: the
            // configuration in it is whole either way.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// An acceptor for one new connection, with the configuration served
    /// now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }

    /// The files it reads, when it was opened from files.
    pub fn files(&self) -> Option<&TlsFiles> {
        self.files.as_deref()
    }

    /// Reads every file again and serves what they hold from the next
    /// connection on, with a new ticket key; on an error, what was served
    /// before stays.
    pub fn reload(&self) -> Result<()> {
        let Some(files) = &self.files else {
            return Err(Error::Usage(
                "this TLS configuration was not read from files".into(),
            ));
        };
        let (fresh, expires) = server_config(files)?;
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = fresh;
        self.expires
            .store(expires, std::sync::atomic::Ordering::Release);
        served_until(&files.cert, expires);
        Ok(())
    }
}

/// A configuration made in the process (a test's, say), served
/// as it is: [`ServerTls::reload`] refuses it.
impl From<Arc<ServerConfig>> for ServerTls {
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls {
            files: None,
            current: Arc::new(std::sync::RwLock::new(config)),
            expires: Arc::default(),
        }
    }
}

/// Reloads `tls` on every SIGHUP, until the process ends: the log says
/// what was loaded, or why not (what was served before stays), and
/// `fintrust_tls_reloads_total{outcome}` counts both. Without files to
/// read (plaintext, or `vaultd dev`'s own certificate), SIGHUP is logged
/// and ignored, not the end of the process.
/// Call it inside a runtime.
pub fn reload_on_hangup(tls: Option<ServerTls>) {
    reload_on(Hangups::listen(), tls)
}

/// SIGHUPs taken from the moment it is made: from then on one no longer
/// ends the process (the default action), and those that arrive before
/// [`reload_on`] starts are not lost. Made before a long start (the open
/// of a large vault), so that a certificate renewal's reload sent
/// meanwhile does not kill the server.
pub struct Hangups(Option<tokio::signal::unix::Signal>);

impl std::fmt::Debug for Hangups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hangups").field(&self.0.is_some()).finish()
    }
}

impl Hangups {
    /// Call it inside a runtime.
    pub fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Hangups(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: the TLS files are read at start only");
                Hangups(None)
            }
        }
    }
}

/// [`reload_on_hangup`], on SIGHUPs listened for since earlier. Call it
/// inside a runtime.
pub fn reload_on(hangups: Hangups, tls: Option<ServerTls>) {
    let Hangups(Some(mut hangups)) = hangups else {
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some((tls, files)) = tls.as_ref().and_then(|t| Some((t, t.files()?))) else {
                tracing::info!("SIGHUP ignored: no TLS files to read again");
                continue;
            };
            let outcome = match tls.reload() {
                Ok(()) => {
                    tracing::info!(
                        cert = %files.cert.display(),
                        client_ca = ?files.client_ca.as_deref().map(Path::display),
                        "SIGHUP: TLS certificate, key and client CA reloaded; new ticket key"
                    );
                    "reloaded"
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; what was served before stays");
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

/// The SHA-256 of the DER of the first certificate in the PEM file
/// `path`: what identifies a client certificate that a credential binds
/// (`vault-admin credentials create --holder-cert`), and what `openssl
/// x509 -noout -fingerprint -sha256` prints.
pub fn certificate_sha256(path: &Path) -> Result<[u8; 32]> {
    Ok(fingerprint(&certs(path)?.remove(0)))
}

/// The SHA-256 of a certificate's DER: the identity a credential held by
/// a client certificate is bound to.
pub fn fingerprint(der: &CertificateDer<'_>) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(der.as_ref()).into()
}

/// How long before its chain expires a served certificate is logged as a
/// warning, at start and at each reload.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

/// The earliest `notAfter` of `chain`'s certificates, in seconds since
/// the Unix epoch: when clients stop accepting the chain.
pub fn chain_expiry(chain: &[CertificateDer<'_>]) -> std::result::Result<i64, String> {
    chain.iter().try_fold(i64::MAX, |earliest, c| {
        let (_, x) = x509_parser::parse_x509_certificate(c.as_ref())
            .map_err(|e| format!("a certificate that does not parse: {e}"))?;
        Ok(earliest.min(x.validity().not_after.timestamp()))
    })
}

/// Reports a chain served from `cert` from now on, which expires at
/// `expires`: `fintrust_tls_certificate_expiry_seconds`, and a warning in
/// the log when that is less than [`EXPIRY_WARNING`] away (an error once
/// it is past).
fn served_until(cert: &Path, expires: i64) {
    crate::metrics::global().tls_certificate_expiry.set(expires);
    expiry_notice(cert, expires);
}

/// How near a chain's expiry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// More than [`EXPIRY_WARNING`] away.
    Far,
    /// Less than [`EXPIRY_WARNING`] away.
    Near,
    Past,
}

impl Expiry {
    /// `expires` judged at `now` (both in seconds since the Unix epoch).
    fn at(expires: i64, now: i64) -> Expiry {
        let warning = i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX);
        if expires <= now {
            Expiry::Past
        } else if expires - now < warning {
            Expiry::Near
        } else {
            Expiry::Far
        }
    }
}

/// The warning (or error) in the log for a chain from `cert` that
/// expires at `expires`, if it is near or past.
fn expiry_notice(cert: &Path, expires: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let at = || crate::shim::api::rfc3339(u64::try_from(expires).unwrap_or(0).saturating_mul(1000));
    match Expiry::at(expires, now) {
        Expiry::Far => {}
        Expiry::Near => {
            tracing::warn!(cert = %cert.display(), expires_at = %at(), "the TLS certificate chain served expires in less than 14 days");
        }
        Expiry::Past => {
            tracing::error!(cert = %cert.display(), expired_at = %at(), "the TLS certificate chain served has expired: clients will refuse it");
        }
    }
}

/// How often a running server looks at its chain's expiry again.
pub const EXPIRY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Looks at the expiry of the chain `tls` serves every
/// [`EXPIRY_CHECK_EVERY`] (beside the look at start and at each reload),
/// so that a server that runs for weeks without a reload still warns,
/// in its log, 14 days before its certificate expires. Nothing for a
/// fixed configuration (no files) or none.
pub fn warn_before_expiry(tls: Option<ServerTls>) {
    let Some(tls) = tls.filter(|t| t.files().is_some()) else {
        return;
    };
    tokio::spawn(async move {
        let first = tokio::time::Instant::now() + EXPIRY_CHECK_EVERY;
        let mut every = tokio::time::interval_at(first, EXPIRY_CHECK_EVERY);
        loop {
            every.tick().await;
            if let Some(files) = tls.files() {
                expiry_notice(&files.cert, tls.expires_at());
            }
        }
    });
}

/// The server configuration for `files`, with a ticket key of its own,
/// and when its chain expires.
fn server_config(files: &TlsFiles) -> Result<(Arc<ServerConfig>, i64)> {
    // The client crate's suite order (AES-128-GCM first); a client's own
    // order is honoured.
    let provider = Arc::new(client::config::crypto_provider());
    // TLS 1.3 only: a TLS 1.2 ticket seals the session's master secret,
    // and a TLS 1.2 resumption makes no new key exchange, so whoever held
    // the ticket key could read every session it was issued for.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
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
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| pem_error(ca, &format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let certified = certified_key(&files.cert, &files.key, &provider)?;
    let expires = chain_expiry(&certified.cert).map_err(|e| pem_error(&files.cert, &e))?;
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.ticketer = stateless_tickets()?;
    // Sessions live in their tickets only: no cache of them here.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    // One ticket per handshake, resumed ones included: a client that opens
    // a connection per request spends one and gets one, so its tickets
    // stay as many as its connections at once, and a ticket lost with a
    // failed connection comes back with the next full handshake. A second
    // ticket cost each connection another seal, key derivation and record
    // at both ends (rustls's default is two).
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok((Arc::new(config), expires))
}

/// The chain in `cert` with the key in `key`, which must fit its first
/// certificate.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey> {
    let chain = certs(cert)?;
    let der = client::config::private_key_file(key).map_err(|e| pem_error(key, &e))?;
    rustls::sign::CertifiedKey::from_der(chain, der.clone_key(), provider)
        .map_err(|e| pem_error(cert, &format!("certificate and key do not fit: {e}")))
}

/// Both ends of TLS with the dev certificate `vaultd dev --tls` makes in
/// `dir`: for tests that run a server over an in-memory pipe.
#[cfg(test)]
pub(crate) fn test_ends(dir: &Path) -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let (server, ca) = crate::dev::dev_tls(dir).expect("a dev certificate");
    (server.acceptor(), test_connector(&[&ca]))
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
        Ok(Err(e)) => {
            // A client that offers only TLS 1.2 (an older nginx's
            // upstream) is seen here.
            tracing::debug!(port, error = %e, "TLS handshake failed");
            "failed"
        }
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

    #[test]
    fn an_expiry_is_near_within_14_days_and_past_from_its_second() {
        let now = 1_800_000_000;
        let day = 86_400;
        assert_eq!(Expiry::at(now + 15 * day, now), Expiry::Far);
        assert_eq!(Expiry::at(now + 14 * day, now), Expiry::Far);
        assert_eq!(Expiry::at(now + 14 * day - 1, now), Expiry::Near);
        assert_eq!(Expiry::at(now + 1, now), Expiry::Near);
        assert_eq!(Expiry::at(now, now), Expiry::Past);
        assert_eq!(Expiry::at(i64::MIN, now), Expiry::Past);
        assert_eq!(Expiry::at(i64::MAX, now), Expiry::Far);
    }

    fn leaf(cert: &Path) -> CertificateDer<'static> {
        certs(cert).expect("a chain").remove(0)
    }

    /// What a client with `connector` is shown by `tls` over a pipe, and
    /// whether it resumed a session.
    async fn presented(
        tls: &ServerTls,
        connector: &tokio_rustls::TlsConnector,
    ) -> (CertificateDer<'static>, bool) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let acceptor = tls.acceptor();
        let server = async move {
            let mut s = acceptor
                .accept(theirs)
                .await
                .expect("the server's handshake");
            let mut byte = [0u8; 1];
            let _ = s.read(&mut byte).await;
            // Its ticket goes out after the handshake; the client reads
            // it with the end of the stream.
            let _ = s.shutdown().await;
        };
        let client = async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
            let mut c = connector
                .connect(name, ours)
                .await
                .expect("the client's handshake");
            c.write_all(b"x").await.expect("a byte");
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest).await;
            let (_, session) = c.get_ref();
            (
                session.peer_certificates().expect("a chain")[0].clone(),
                session.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            )
        };
        tokio::join!(server, client).1
    }

    /// A reload serves the files' new chain from the next connection on,
    /// and with a new ticket key, so that the client's next connection
    /// makes a full handshake; files that do not read, or a key that does
    /// not fit, leave what was served before, tickets included.
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
        let tls = ServerTls::open(&files).expect("a config");
        let connector = test_connector(&[ca_a.as_path(), ca_b.as_path()]);
        assert_eq!(presented(&tls, &connector).await, (leaf(&cert_a), false));
        assert_eq!(presented(&tls, &connector).await, (leaf(&cert_a), true));

        put(&cert_b, &key_b);
        assert_eq!(
            presented(&tls, &connector).await,
            (leaf(&cert_a), true),
            "nothing changes before the reload"
        );
        tls.reload().expect("the renewed files");
        assert_eq!(
            presented(&tls, &connector).await,
            (leaf(&cert_b), false),
            "a ticket of before the reload is not taken"
        );
        assert_eq!(presented(&tls, &connector).await, (leaf(&cert_b), true));

        // A's certificate with B's key; a key that is not PEM; no key.
        std::fs::copy(&cert_a, &files.cert).expect("the cert");
        let err = tls.reload().expect_err("a key that does not fit");
        assert!(err.to_string().contains("do not fit"), "{err}");
        std::fs::write(&files.key, b"not a key").expect("garbage");
        assert!(tls.reload().is_err());
        std::fs::remove_file(&files.key).expect("remove");
        assert!(tls.reload().is_err());
        assert_eq!(
            presented(&tls, &connector).await,
            (leaf(&cert_b), true),
            "what was served stays, its tickets too"
        );

        // A configuration made in the process has no files to read again.
        let fixed = ServerTls::from(tls.config());
        assert!(fixed.files().is_none());
        assert!(fixed.reload().is_err());
    }

    /// What a reload reports as the chain's expiry: the earliest
    /// `notAfter` of its certificates, an intermediate's included.
    #[tokio::test]
    async fn the_served_chain_s_earliest_expiry_is_reported() {
        use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, IsCa};
        let dir = tempfile::tempdir().expect("a dir");
        let mut ca = CertificateParams::new(vec!["expiry CA".to_string()]).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.not_after = date_time_ymd(2030, 6, 1);
        let ca = CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("a key"))
            .expect("a CA");
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        leaf.not_after = date_time_ymd(2031, 1, 2);
        let leaf = leaf.signed_by(&key, &ca).expect("a leaf");
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: None,
        };
        std::fs::write(&files.key, key.serialize_pem()).expect("the key");
        std::fs::write(&files.cert, [leaf.pem(), ca.pem()].concat()).expect("leaf and CA");
        let tls = ServerTls::open(&files).expect("a config");
        assert_eq!(tls.expires_at(), 1_906_502_400, "2030-06-01, the CA's");
        std::fs::write(&files.cert, leaf.pem()).expect("the leaf alone");
        tls.reload().expect("reload");
        assert_eq!(tls.expires_at(), 1_925_078_400, "2031-01-02, the leaf's");
        // A reload that fails leaves the expiry of what is served.
        std::fs::write(&files.cert, "not PEM").expect("garbage");
        assert!(tls.reload().is_err());
        assert_eq!(tls.expires_at(), 1_925_078_400);
        assert_eq!(ServerTls::from(tls.config()).expires_at(), 0);
    }
}
