//! Port 9999 over TLS, with certificates made in the test: a client that
//! trusts the CA appends and gets a receipt; plaintext to the TLS port is
//! refused without harming the server; with mutual TLS, a client without a
//! valid certificate from the client CA (none, another CA's, expired, not
//! yet valid) is refused, on port 9999 and on the shim's HTTPS port alike;
//! connections that never finish their TLS handshake cannot keep a client
//! out.

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use protocol::{FrameCodec, Message};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use server::serve::{run, ServeConfig};
use server::tls::{ServerTls, TlsFiles};
use storage::{Options, Receipt, Unlock, Vault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

mod common;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    client_ca: CertifiedIssuer<'static, KeyPair>,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// A leaf certificate for `name` signed by `issuer`: (PEM chain, PEM key, DER cert, DER key).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
) -> (String, String, CertificateDer<'static>, Vec<u8>) {
    leaf_valid(issuer, name, None)
}

/// [`leaf`], valid from the first year to the end of the second when
/// `years` names them.
fn leaf_valid(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    years: Option<(i32, i32)>,
) -> (String, String, CertificateDer<'static>, Vec<u8>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
    if let Some((from, to)) = years {
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 12, 31);
    }
    let cert = params.signed_by(&key, issuer).expect("sign");
    (
        cert.pem(),
        key.serialize_pem(),
        cert.der().clone(),
        key.serialize_der(),
    )
}

fn write(dir: &Path, name: &str, content: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

struct Setup {
    addr: std::net::SocketAddr,
    writer_key: String,
    pki: Pki,
    /// What the server serves, to reload.
    tls: ServerTls,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    vault: Arc<Vault>,
}

async fn start(mutual: bool) -> Setup {
    start_with(mutual, ServeConfig::default()).await
}

/// Test CAs, and the server's TLS configuration with a certificate for
/// `localhost` from the first (client certificates from the second with
/// `mutual`).
fn pki(dir: &Path, mutual: bool) -> (Pki, ServerTls) {
    let pki = Pki {
        ca: ca("fintrust test CA"),
        client_ca: ca("fintrust test client CA"),
    };
    let (chain, key, _, _) = leaf(&pki.ca, "localhost");
    let files = TlsFiles {
        cert: write(dir, "server.pem", &chain),
        key: write(dir, "server.key", &key),
        client_ca: mutual.then(|| write(dir, "client-ca.pem", &pki.client_ca.pem())),
    };
    let config = ServerTls::open(&files).expect("server config");
    (pki, config)
}

async fn start_with(mutual: bool, serve: ServeConfig) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, config) = pki(dir.path(), mutual);
    start_serving(dir, pki, config, serve).await
}

/// A server that speaks TLS 1.2 only, with session tickets as
/// `ServerTls::open` makes them.
async fn start_tls12() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, _) = pki(dir.path(), false);
    let (_, _, cert, key) = leaf(&pki.ca, "localhost");
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(client::config::crypto_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .expect("certificate");
    config.ticketer = server::tls::stateless_tickets().expect("ticketer");
    start_serving(dir, pki, Arc::new(config).into(), ServeConfig::default()).await
}

async fn start_serving(
    dir: tempfile::TempDir,
    pki: Pki,
    tls: ServerTls,
    serve: ServeConfig,
) -> Setup {
    let vault = Arc::new(
        Vault::create(
            &dir.path().join("v"),
            &Unlock::passphrase(b"tls test".to_vec()),
            Options::default(),
        )
        .expect("create")
        .vault,
    );
    let (_, writer_key) = vault
        .create_credential("writer", "svc")
        .await
        .expect("credential");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(
        listener,
        vault.clone().into(),
        serve,
        Some(tls.clone()),
        async {
            let _ = stopped.await;
        },
    ));
    Setup {
        addr,
        writer_key: writer_key.to_string(),
        pki,
        tls,
        _dir: dir,
        _stop: stop,
        vault,
    }
}

fn client_config(
    s: &Setup,
    client_cert: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    client_config_with(
        s,
        rustls::crypto::aws_lc_rs::default_provider(),
        client_cert,
    )
}

/// A client configuration trusting the test CA, with `provider`'s suites.
fn client_config_with(
    s: &Setup,
    provider: rustls::crypto::CryptoProvider,
    client_cert: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    trusting(&s.pki, provider, client_cert)
}

/// A client configuration trusting `pki`'s server CA.
fn trusting(
    pki: &Pki,
    provider: rustls::crypto::CryptoProvider,
    client_cert: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .expect("client cert"),
    };
    Arc::new(config)
}

type TlsConn = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

async fn tls_append(s: &Setup, config: Arc<rustls::ClientConfig>) -> Result<Message, String> {
    let mut conn = tls_hello(s, config).await?;
    append(&mut conn).await
}

/// A TLS connection that has sent its `Hello` with the writer's key and
/// read the answer: `HelloOk`, or an error.
async fn tls_hello(s: &Setup, config: Arc<rustls::ClientConfig>) -> Result<TlsConn, String> {
    tls_hello_as(s, config, &s.writer_key)
        .await
        .map(|(conn, _)| conn)
}

/// [`tls_hello`] with `api_key` in the `Hello`: the connection, and the
/// role `HelloOk` named.
async fn tls_hello_as(
    s: &Setup,
    config: Arc<rustls::ClientConfig>,
    api_key: &str,
) -> Result<(TlsConn, String), String> {
    let tcp = TcpStream::connect(s.addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = Framed::new(tls, FrameCodec::new());
    let hello = Message::Hello {
        api_key: api_key.to_string(),
        client: "tls test".into(),
    };
    conn.send(hello.to_frame(1, 0).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    match next(&mut conn).await? {
        Message::HelloOk { role, .. } => Ok((conn, role)),
        other => Err(format!("{other:?}")),
    }
}

async fn next(conn: &mut TlsConn) -> Result<Message, String> {
    let f = conn
        .next()
        .await
        .ok_or("closed")?
        .map_err(|e| e.to_string())?;
    Message::from_frame(&f).map_err(|e| e.to_string())
}

/// Appends a record on `conn` and returns the answer.
async fn append(conn: &mut TlsConn) -> Result<Message, String> {
    let append = Message::Append {
        subject: "cust-1".into(),
        fields: vec![("email".into(), "jane@example.com".into())],
    };
    conn.send(append.to_frame(2, 0).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    next(conn).await
}

#[tokio::test]
async fn appends_over_tls_get_receipts() {
    let s = start(false).await;
    let reply = tls_append(&s, client_config(&s, None))
        .await
        .expect("TLS exchange");
    let Message::Receipt { receipt } = reply else {
        panic!("{reply:?}");
    };
    Receipt::decode(&receipt)
        .expect("decodes")
        .verify(&s.vault.public_key())
        .expect("verifies");
}

#[tokio::test]
async fn plaintext_to_the_tls_port_is_refused_and_the_server_keeps_serving() {
    let s = start(false).await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    let hello = protocol::encode_frame(
        1,
        &Message::Hello {
            api_key: s.writer_key.clone(),
            client: "plain".into(),
        },
        0,
    )
    .expect("frame");
    tcp.write_all(&hello).await.expect("write");
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(
        protocol::frame::decode(&out).map_or(true, |f| f.is_none()),
        "a protocol answer in plaintext"
    );
    assert!(tls_append(&s, client_config(&s, None)).await.is_ok());
    assert!(
        handshakes("failed") >= 1,
        "the refused handshake is counted"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let s = start(true).await;
    assert!(
        tls_append(&s, client_config(&s, None)).await.is_err(),
        "no client certificate accepted"
    );
    // A certificate from the server CA is not one from the client CA.
    let (_, _, wrong_cert, wrong_key) = leaf(&s.pki.ca, "svc");
    assert!(
        tls_append(&s, client_config(&s, Some((wrong_cert, wrong_key))))
            .await
            .is_err()
    );
    // Nor is one of the client CA that has expired, or is not valid yet.
    for years in [(2020, 2021), (2098, 2099)] {
        let (_, _, cert, key) = leaf_valid(&s.pki.client_ca, "svc", Some(years));
        assert!(
            tls_append(&s, client_config(&s, Some((cert, key))))
                .await
                .is_err(),
            "a certificate valid {years:?} accepted"
        );
    }
    let (_, _, cert, key) = leaf(&s.pki.client_ca, "svc");
    let reply = tls_append(&s, client_config(&s, Some((cert, key))))
        .await
        .expect("accepted");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
}

/// `GET /v1/health` over HTTPS with `config`: the answer's bytes, or why
/// there were none.
async fn https_health(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // A guard against a server that never answers, not a time limit.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tls.read_to_end(&mut out),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A new vault served by `vaultd`'s daemon over TLS on both ports (mutual
/// TLS with `mutual`), its shim configured by `shim`: the data dir, the
/// test CAs and the running daemon.
async fn tls_daemon(
    mutual: bool,
    shim: server::shim::ShimConfig,
) -> (tempfile::TempDir, Pki, common::Daemonized) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, tls) = pki(dir.path(), mutual);
    let running = daemon_over_tls(daemon_vault(dir.path()), tls, shim).await;
    (dir, pki, running)
}

/// The vault of a test daemon, at `dir/v`, made or opened again.
fn daemon_vault(dir: &Path) -> Vault {
    let (path, unlock) = (dir.join("v"), Unlock::passphrase(b"tls test".to_vec()));
    if path.exists() {
        return Vault::open(&path, &unlock, Options::default()).expect("open");
    }
    Vault::create(&path, &unlock, Options::default())
        .expect("create")
        .vault
}

/// `vault` served by `vaultd`'s daemon with `tls` on both ports of
/// loopback, its shim configured by `shim`.
async fn daemon_over_tls(
    vault: Vault,
    tls: ServerTls,
    shim: server::shim::ShimConfig,
) -> common::Daemonized {
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    };
    let d = server::daemon::Daemon {
        protocol: bind().await,
        http: Some(bind().await),
        tls: Some(tls),
        serve: ServeConfig::default(),
        shim,
        policies: None,
        reopen: None,
    };
    common::daemon(vault, d).await
}

/// In `vaultd serve`, one TLS configuration serves both ports: with mutual
/// TLS the HTTPS port of the shim asks for a client certificate from the
/// client CA just as port 9999 does, and refuses none, another CA's, an
/// expired one, or one not valid yet.
#[tokio::test]
async fn the_https_port_asks_for_the_same_client_certificates() {
    let (_dir, pki, running) = tls_daemon(true, server::shim::ShimConfig::default()).await;
    let http_addr = running.bound.http.expect("the shim");
    let config = |cert| trusting(&pki, rustls::crypto::aws_lc_rs::default_provider(), cert);
    let ok = |r: &Result<String, String>| matches!(r, Ok(a) if a.starts_with("HTTP/1.1 200"));
    let (_, _, wrong_cert, wrong_key) = leaf(&pki.ca, "svc");
    let (_, _, old_cert, old_key) = leaf_valid(&pki.client_ca, "svc", Some((2020, 2021)));
    let (_, _, new_cert, new_key) = leaf_valid(&pki.client_ca, "svc", Some((2098, 2099)));
    for (what, cert) in [
        ("no certificate", None),
        ("another CA's", Some((wrong_cert, wrong_key))),
        ("an expired one", Some((old_cert, old_key))),
        ("one not valid yet", Some((new_cert, new_key))),
    ] {
        let r = https_health(http_addr, config(cert)).await;
        assert!(!ok(&r), "{what} accepted: {r:?}");
    }
    let (_, _, cert, key) = leaf(&pki.client_ca, "svc");
    let r = https_health(http_addr, config(Some((cert, key)))).await;
    assert!(ok(&r), "{r:?}");
    let _ = running.stop.send(());
    running.done.await.expect("daemon task").expect("daemon");
}

/// With mutual TLS a client certificate can hold a credential: a `Hello`
/// with no API key over a connection that presents it authenticates with
/// the credential's role, once the credential exists and until it is
/// revoked. Another certificate of the same CA, the certificate's public
/// fingerprint or its key hash presented as an API key, and a second
/// credential for the same certificate are refused; an API key sent with
/// the certificate decides the role, as without it.
#[tokio::test]
async fn a_client_certificate_can_hold_a_credential() {
    use sha2::Digest as _;
    let s = start(true).await;
    let (_, _, cert, key) = leaf(&s.pki.client_ca, "svc");
    let (_, _, other, other_key) = leaf(&s.pki.client_ca, "svc");
    let sha256: [u8; 32] = sha2::Sha256::digest(cert.as_ref()).into();
    let holder = client_config(&s, Some((cert, key)));
    let stranger = client_config(&s, Some((other, other_key)));
    assert!(
        tls_hello_as(&s, holder.clone(), "").await.is_err(),
        "no credential holds the certificate yet"
    );
    let id = s
        .vault
        .create_cert_credential("auditor", "svc", &sha256)
        .await
        .expect("a credential");
    let again = s
        .vault
        .create_cert_credential("writer", "svc", &sha256)
        .await;
    assert!(again.is_err(), "a second credential for it: {again:?}");

    let (mut conn, role) = tls_hello_as(&s, holder.clone(), "")
        .await
        .expect("the certificate");
    assert_eq!(role, "auditor");
    let head = conn
        .send(Message::Head.to_frame(2, 0).expect("frame"))
        .await;
    assert!(head.is_ok());
    assert!(matches!(
        next(&mut conn).await,
        Ok(Message::HeadInfo { .. })
    ));
    // An auditor may not append.
    assert!(matches!(append(&mut conn).await, Ok(Message::Error { .. })));

    assert!(
        tls_hello_as(&s, stranger, "").await.is_err(),
        "another certificate"
    );
    for key in [hex::encode(sha256), storage::certificate_key_hash(&sha256)] {
        assert!(
            tls_hello_as(&s, holder.clone(), &key).await.is_err(),
            "{key} as an API key"
        );
    }
    let (_, role) = tls_hello_as(&s, holder.clone(), &s.writer_key)
        .await
        .expect("the writer's key");
    assert_eq!(role, "writer");

    s.vault.revoke_credential(&id).await.expect("revoke");
    assert!(
        tls_hello_as(&s, holder, "").await.is_err(),
        "the certificate after its credential was revoked"
    );
    // Made again for the certificate under another name: the same id, but
    // not the caller the open connection authenticated as.
    let remade = s
        .vault
        .create_cert_credential("auditor", "svc-2", &sha256)
        .await
        .expect("a new credential");
    assert_eq!(remade, id);
    conn.send(Message::Head.to_frame(3, 0).expect("frame"))
        .await
        .expect("send");
    assert!(
        matches!(
            next(&mut conn).await,
            Ok(Message::Error {
                code: protocol::ErrorCode::Unauthenticated,
                ..
            })
        ),
        "the old connection after its credential was made again"
    );
}

/// Whether `conn`'s handshake resumed a session.
fn resumed(conn: &TlsConn) -> bool {
    conn.get_ref().get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
}

/// The operator replaces the client CA and reloads (`vaultd` on SIGHUP): a
/// client with a certificate from the new CA gets in, and one from the old
/// CA is refused, even with a ticket from before the reload, which would
/// have resumed without its certificate being checked again.
#[tokio::test]
async fn a_reload_takes_the_new_client_ca_and_no_ticket_from_before() {
    let s = start(true).await;
    let (_, _, cert, key) = leaf(&s.pki.client_ca, "svc");
    let old = client_config(&s, Some((cert, key)));
    let mut first = tls_hello(&s, old.clone())
        .await
        .expect("the old CA's client");
    let mut second = tls_hello(&s, old.clone()).await.expect("it again");
    assert!(
        !resumed(&first) && resumed(&second),
        "the old client resumes"
    );
    for conn in [&mut first, &mut second] {
        let reply = append(conn).await.expect("append");
        assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
    }

    let renewed_ca = ca("fintrust renewed client CA");
    let (_, _, cert, key) = leaf(&renewed_ca, "svc");
    let renewed = client_config(&s, Some((cert, key)));
    assert!(
        tls_append(&s, renewed.clone()).await.is_err(),
        "the new CA's client before the reload"
    );
    let files = s.tls.files().expect("files").clone();
    let ca_file = files.client_ca.expect("a client CA");
    std::fs::write(&ca_file, "not a CA").expect("garbage");
    assert!(s.tls.reload().is_err(), "a client CA that does not read");
    assert!(
        tls_hello(&s, old.clone()).await.is_ok(),
        "what was served stays after a failed reload"
    );

    std::fs::write(&ca_file, renewed_ca.pem()).expect("the new CA");
    s.tls.reload().expect("reload");
    let reply = tls_append(&s, renewed)
        .await
        .expect("the new CA's client after the reload");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
    let refused = tls_append(&s, old).await;
    assert!(
        refused.is_err(),
        "the old CA's client, with its tickets: {refused:?}"
    );
    // Connections opened before the reload are not cut off.
    let reply = append(&mut first).await.expect("append");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
}

/// A TLS 1.3 resumption brings back its session's client certificate
/// without the verifier: one that has expired since the ticket was issued
/// is refused after the resumed handshake, where a full handshake would
/// have refused it, and a connection opened while it was valid stays.
#[tokio::test]
async fn a_resumed_session_whose_client_certificate_has_expired_is_refused() {
    let s = start(true).await;
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["svc".to_string()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    // Long enough for two handshakes on a loaded machine.
    params.not_after = now + time::Duration::seconds(8);
    let cert = params.signed_by(&key, &s.pki.client_ca).expect("sign");
    let config = client_config(&s, Some((cert.der().clone(), key.serialize_der())));
    let mut first = tls_hello(&s, config.clone())
        .await
        .expect("a full handshake");
    let second = tls_hello(&s, config.clone()).await.expect("a resumed one");
    assert!(!resumed(&first) && resumed(&second));
    while time::OffsetDateTime::now_utc() <= now + time::Duration::seconds(9) {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The client finishes its side of the resumed handshake; the server
    // then closes without an answer to its Hello.
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("the client's side of the handshake");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let mut conn = Framed::new(tls, FrameCodec::new());
    let hello = Message::Hello {
        api_key: s.writer_key.clone(),
        client: "tls test".into(),
    };
    let _ = conn.send(hello.to_frame(1, 0).expect("frame")).await;
    let answer = next(&mut conn).await;
    assert!(answer.is_err(), "{answer:?}");
    let reply = append(&mut first).await.expect("append");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
}

/// The client crate's connector to `s`, trusting the test CA, as the
/// writer.
fn connector(s: &Setup) -> client::Connector {
    let ca_file = write(s._dir.path(), "ca.pem", &s.pki.ca.pem());
    client::Connector::new(client::ClientConfig {
        addr: s.addr.to_string(),
        tls: client::Tls::Ca {
            ca_pem_file: ca_file,
            server_name: "localhost".into(),
            client_cert: None,
        },
        api_key: client::Zeroizing::new(s.writer_key.clone()),
        ..client::ClientConfig::default()
    })
    .expect("connector")
}

/// Appends a record on `c` and checks its receipt.
async fn append_checked(s: &Setup, c: &client::Client) {
    let receipt = c
        .append("cust-1", vec![("email".into(), "jane@example.com".into())])
        .await
        .expect("append");
    client::verify_receipt(&receipt, s.vault.public_key().as_bytes()).expect("receipt");
}

/// A connector keeps a ticket for every connection that may open at once:
/// rustls's own cache kept eight per server, so the ninth connection opening
/// at the same time made a full handshake (checking the certificate chain
/// and the server's signature again). The server sends one ticket per
/// handshake, resumed ones included, so the tickets stay as many as the
/// connections, wave after wave.
#[tokio::test]
async fn many_connections_opening_at_once_all_resume() {
    let s = start(false).await;
    let connector = connector(&s);
    // One at a time: each connection after the first takes the ticket the
    // one before brought.
    for i in 0..4 {
        let c = connector.connect().await.expect("connect");
        assert_eq!(c.tls_resumed(), i > 0, "connection {i}");
    }
    // Waves of 20 at once. The first finds one ticket, so most make full
    // handshakes; every connection brings one ticket back, so each full
    // handshake adds one to the connector's tickets. Once a wave resumed
    // all 20, the tickets are as many as the connections, and stay so.
    let mut waves = Vec::new();
    while waves.len() < 20 && waves.last() != Some(&20) {
        waves.push(wave(&s, &connector).await);
    }
    assert_eq!(waves.last(), Some(&20), "no wave resumed all: {waves:?}");
    for _ in 0..2 {
        assert_eq!(wave(&s, &connector).await, 20, "after {waves:?}");
    }
    // The server counted them (at least; other tests of this binary resume
    // a few more).
    assert!(handshakes("resumed") >= 43, "{}", handshakes("resumed"));
}

/// Opens 20 connections at once, appends over each, and answers how many
/// resumed a session.
async fn wave(s: &Setup, connector: &client::Connector) -> usize {
    let opened = futures_util::future::join_all((0..20).map(|_| connector.connect())).await;
    let mut resumed = 0;
    for c in opened {
        let c = c.expect("connect");
        resumed += usize::from(c.tls_resumed());
        // A resumed session carries requests like a fresh one.
        append_checked(s, &c).await;
    }
    resumed
}

/// A server that offers only TLS 1.2 serves the client crate's connector
/// and a plain rustls client, full handshakes and resumed ones (from the
/// stateless tickets, which TLS 1.2 uses too).
#[tokio::test]
async fn tls_1_2_handshakes_complete_full_and_resumed() {
    let s = start_tls12().await;
    let connector = connector(&s);
    for i in 0..3 {
        let c = connector.connect().await.expect("connect");
        assert_eq!(c.tls_resumed(), i > 0, "connection {i}");
        append_checked(&s, &c).await;
    }
    let plain = client_config(&s, None);
    for _ in 0..2 {
        let reply = tls_append(&s, plain.clone()).await.expect("append");
        assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
    }
}

/// `vaultd`'s own TLS is TLS 1.3 only: a client that offers only TLS
/// 1.2 (whose tickets would seal the session's master secret, and whose
/// resumption makes no key exchange) fails its handshake.
#[tokio::test]
async fn the_served_tls_refuses_a_tls_1_2_client() {
    let s = start(false).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.pki.ca.der().clone()).expect("root");
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let refused = tls_append(&s, Arc::new(tls12)).await;
    assert!(refused.is_err(), "{refused:?}");
    // A client that offers both gets TLS 1.3.
    let reply = tls_append(&s, client_config(&s, None))
        .await
        .expect("append");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
}

/// `fintrust_tls_handshakes_total` of the protocol port for `outcome`.
fn handshakes(outcome: &str) -> u64 {
    common::counter(&format!(
        "fintrust_tls_handshakes_total{{port=\"protocol\",outcome=\"{outcome}\"}}"
    ))
}

/// The TLS 1.3 suite a client with `provider` gets from the vault.
async fn negotiated(
    s: &Setup,
    provider: rustls::crypto::CryptoProvider,
) -> (rustls::CipherSuite, rustls::NamedGroup) {
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client_config_with(s, provider, None))
        .connect(name, tcp)
        .await
        .expect("handshake");
    let conn = tls.get_ref().1;
    (
        conn.negotiated_cipher_suite().expect("a suite").suite(),
        conn.negotiated_key_exchange_group()
            .expect("a group")
            .name(),
    )
}

/// The client crate asks for AES-128-GCM first and gets it, with X25519; a
/// client that prefers AES-256-GCM (rustls's default order) gets that, and
/// one that lists the post-quantum hybrid first gets the hybrid.
#[tokio::test]
async fn the_client_s_suite_and_group_order_is_honoured() {
    use rustls::{CipherSuite, NamedGroup};
    let s = start(false).await;
    assert_eq!(
        negotiated(&s, client::config::crypto_provider()).await,
        (CipherSuite::TLS13_AES_128_GCM_SHA256, NamedGroup::X25519)
    );
    assert_eq!(
        negotiated(&s, rustls::crypto::aws_lc_rs::default_provider()).await,
        (CipherSuite::TLS13_AES_256_GCM_SHA384, NamedGroup::X25519)
    );
    let mut hybrid_first = client::config::crypto_provider();
    hybrid_first.kx_groups = vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        rustls::crypto::aws_lc_rs::kx_group::X25519,
    ];
    assert_eq!(
        negotiated(&s, hybrid_first).await,
        (
            CipherSuite::TLS13_AES_128_GCM_SHA256,
            NamedGroup::X25519MLKEM768
        )
    );
}

/// Eight connections that never finish a TLS handshake: every other one
/// sends a handshake record's header and no more, the others nothing.
async fn slow_handshakes(addr: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut slow = Vec::new();
    for i in 0..8 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        if i % 2 == 0 {
            tcp.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        }
        slow.push(tcp);
    }
    slow
}

/// Each connection is closed by the server without a byte sent.
async fn assert_closed(conns: &mut [TcpStream]) {
    for tcp in conns {
        let mut buf = Vec::new();
        // A 30 s guard: a slow connection left open would hang the test.
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tcp.read_to_end(&mut buf),
        )
        .await
        .expect("the slow connection was closed");
        assert_eq!(read.unwrap_or(0), 0, "a slow connection got {buf:?}");
    }
}

/// Slowloris against the TLS port: connections that send the start of a
/// TLS record (a ClientHello's first bytes) or nothing at all, then stay
/// silent, against two slots, four handshake places and a handshake
/// timeout longer than the test. Only eviction lets the clients in: two
/// TLS clients authenticate and append, each holding its slot, and the
/// oldest slow connections are closed to make room.
#[tokio::test]
async fn connections_that_never_finish_a_tls_handshake_cannot_keep_a_client_out() {
    let s = start_with(
        false,
        ServeConfig {
            max_connections: 2,
            max_handshakes: 4,
            handshake_timeout: std::time::Duration::from_secs(3600),
            ..ServeConfig::default()
        },
    )
    .await;
    let mut slow = slow_handshakes(s.addr).await;
    let config = client_config(&s, None);
    let mut a = tls_hello(&s, config.clone()).await.expect("first client");
    let mut b = tls_hello(&s, config).await.expect("second client");
    for conn in [&mut a, &mut b] {
        let reply = append(conn).await.expect("append");
        assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
    }
    // As with plaintext (`serve.rs`): the first four when the last four
    // came, then one for the first client.
    assert_closed(&mut slow[..5]).await;
}

/// The same against the shim's HTTPS port: slow TLS clients hold no slot,
/// and two HTTPS clients that send their request get their answers, each
/// holding its slot. The daemon then stops without waiting for the slow
/// connections' handshakes.
#[tokio::test]
async fn https_clients_get_in_past_connections_that_never_finish_a_handshake() {
    let shim = server::shim::ShimConfig {
        max_connections: 2,
        max_handshakes: 4,
        header_timeout: std::time::Duration::from_secs(3600),
        ..server::shim::ShimConfig::default()
    };
    let (_dir, pki, common::Daemonized { bound, stop, done }) = tls_daemon(false, shim).await;
    let http = bound.http.expect("the shim");
    let mut slow = slow_handshakes(http).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).expect("root");
    // The provider named: with the whole workspace built, a test
    // dependency (ureq) turns on rustls's ring provider next to aws-lc-rs,
    // and rustls then has no process default.
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(client::config::crypto_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut clients = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(http).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .expect("handshake");
        tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("request");
        let mut head = [0u8; 12];
        tls.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
        clients.push(tls);
    }
    assert_closed(&mut slow[..5]).await;
    // A clean stop does not wait for the handshakes that never finish
    // (the last three slow connections are still open).
    drop(clients);
    let _ = stop.send(());
    done.await.expect("daemon task").expect("daemon");
    drop(slow);
}

/// `vault-bench authorize --addr` against a `vaultd` serving TLS on both
/// ports, with an admin's key: the shim's HTTPS port (`--http-addr`) is
/// spoken to with the CA and server name of `--addr`; every grant is a
/// `token_minted` entry; the vault request times come from the server's
/// `/metrics`; and the partner the run made is revoked and its subject
/// shredded afterwards.
#[test]
fn vault_bench_authorizes_over_https_at_a_running_vaultd() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (dir, ca_file, admin, running) = rt.block_on(bench_daemon());
    let http = running.bound.http.expect("the shim").to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args(["authorize", "--addr", &running.bound.protocol.to_string()])
        .args(["--api-key", &admin])
        .arg("--cacert")
        .arg(&ca_file)
        .args(["--server-name", "localhost", "--http-addr", &http])
        .args(["--requests", "40", "--clients", "4", "--format", "json"])
        .output()
        .expect("vault-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["target"]["kind"], "remote", "{v}");
    assert_eq!(v["target"]["tls"], true, "{v}");
    assert_eq!(v["params"]["http_addr"], http.as_str(), "{v}");
    assert_eq!(v["authorize"]["requests"], 40, "{v}");
    assert_eq!(v["health"]["requests"], 40, "{v}");
    assert_eq!(v["audit_entries"], 40, "nothing else wrote meanwhile: {v}");
    assert!(v["vault_mean_us"]["mint"].as_f64() > Some(0.0), "{v}");
    assert!(
        v["vault_mean_us"]["health"].is_null(),
        "the scrape's own: {v}"
    );
    assert!(v["pipeline"].is_null(), "{v}");
    let _ = running.stop.send(());
    rt.block_on(running.done)
        .expect("daemon task")
        .expect("daemon");

    let (vault, partner) = bench_partner_cleaned_up(dir.path());
    let minted = common::entries_of(&vault, storage::Kind::TokenMinted)
        .into_iter()
        .filter(|(subject, _)| *subject == partner.name)
        .count();
    assert_eq!(minted, 40);
}

/// Ctrl-C once `vault-bench authorize --addr` has made its partner (its
/// setup perhaps not done yet) ends the run with exit 1, "interrupted",
/// after its clean-up: every credential it made is revoked and its
/// subject shredded.
#[test]
fn vault_bench_interrupted_at_a_running_vaultd_cleans_up_first() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (dir, ca_file, admin, running) = rt.block_on(bench_daemon());
    let addr = running.bound.protocol.to_string();
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args(["authorize", "--addr", &addr, "--api-key", &admin])
        .arg("--cacert")
        .arg(&ca_file)
        .args(["--server-name", "localhost"])
        .args([
            "--http-addr",
            &running.bound.http.expect("the shim").to_string(),
        ])
        .args(["--duration", "120", "--clients", "4", "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vault-bench starts");
    let watcher = rt
        .block_on(client::Client::connect(client::ClientConfig {
            addr,
            tls: client::Tls::Ca {
                ca_pem_file: ca_file.clone(),
                server_name: "localhost".into(),
                client_cert: None,
            },
            api_key: client::Zeroizing::new(admin.to_string()),
            ..client::ClientConfig::default()
        }))
        .expect("an admin connection");
    // Until the run's partner exists (or the run ended by itself).
    loop {
        let creds = rt.block_on(watcher.credentials()).expect("credentials");
        if creds
            .iter()
            .any(|c| c.role == "partner" && c.name.starts_with("vault-bench-"))
        {
            break;
        }
        if let Some(status) = bench.try_wait().expect("poll vault-bench") {
            panic!("vault-bench ended before making its partner: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &bench.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -INT failed");
    let out = bench.wait_with_output().expect("vault-bench ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(out.stdout.is_empty(), "no report of a cut run");
    drop(watcher);
    let _ = running.stop.send(());
    rt.block_on(running.done)
        .expect("daemon task")
        .expect("daemon");

    bench_partner_cleaned_up(dir.path());
}

/// A vaultd daemon over TLS on both ports for `vault-bench --addr`: its
/// dir, the CA file that trusts it (server name `localhost`), an admin's
/// API key, and the daemon.
async fn bench_daemon() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    String,
    common::Daemonized,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, tls) = pki(dir.path(), false);
    let ca_file = write(dir.path(), "ca.pem", &pki.ca.pem());
    let vault = daemon_vault(dir.path());
    let (_, admin) = vault
        .create_credential("admin", "bench-admin")
        .await
        .expect("an admin key");
    let running = daemon_over_tls(vault, tls, server::shim::ShimConfig::default()).await;
    (dir, ca_file, admin.to_string(), running)
}

/// After a `vault-bench --addr` run against [`bench_daemon`] (stopped),
/// the one credential it made, a partner's: revoked, and its subject (of
/// the partner's name) shredded. The vault and the credential.
fn bench_partner_cleaned_up(dir: &Path) -> (Vault, storage::CredentialInfo) {
    let vault = daemon_vault(dir);
    let made: Vec<_> = vault
        .credentials(None, 1_000)
        .expect("credentials")
        .0
        .into_iter()
        .filter(|c| c.name.starts_with("vault-bench"))
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let partner = made.into_iter().next().expect("one");
    assert_eq!(partner.role, "partner", "{partner:?}");
    assert!(partner.revoked_seq.is_some(), "{partner:?}");
    let shredded: Vec<String> = common::entries_of(&vault, storage::Kind::SubjectShredded)
        .into_iter()
        .map(|(subject, _)| subject)
        .collect();
    assert_eq!(shredded, std::slice::from_ref(&partner.name));
    (vault, partner)
}

/// The shim's link to a vault elsewhere reads its TLS files once, at its
/// first connection, and the connections it opens with its callers' own
/// keys resume TLS sessions (the gateway's handshake left a ticket)
/// instead of each reading the CA file and making a full handshake.
#[tokio::test]
async fn the_shim_s_connections_for_its_callers_resume_tls_sessions() {
    let s = start(false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &s.pki.ca.pem());
    let (_, gateway) = s
        .vault
        .create_credential("gateway", "shim")
        .await
        .expect("a gateway");
    let (_, admin) = s
        .vault
        .create_credential("admin", "ops")
        .await
        .expect("an admin");
    let link = server::shim::VaultLink::new(client::ClientConfig {
        addr: s.addr.to_string(),
        tls: client::Tls::Ca {
            ca_pem_file: ca.clone(),
            server_name: "localhost".into(),
            client_cert: None,
        },
        api_key: client::Zeroizing::new(gateway.to_string()),
        client_name: "test-shim".into(),
        timeout: std::time::Duration::from_secs(10),
    });
    let g = link.gateway().await.expect("the gateway's connection");
    assert_eq!(g.role(), "gateway");
    for _ in 0..2 {
        let c = link.as_caller(&admin).await.expect("a caller's connection");
        assert_eq!(c.role(), "admin");
        assert!(c.tls_resumed(), "resumed");
    }
    // A CA file changed since is read again: another CA's is not trusted
    // (no session resumed past it), the right one again is.
    let set = |pem: String, at: u64| {
        std::fs::write(&ca, pem).expect("write the CA file");
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(at);
        std::fs::File::options()
            .write(true)
            .open(&ca)
            .and_then(|f| f.set_modified(when))
            .expect("its time");
    };
    set(ca_pem("another CA"), 1_000_000);
    assert!(link.as_caller(&admin).await.is_err(), "another CA's file");
    set(s.pki.ca.pem(), 2_000_000);
    let c = link.as_caller(&admin).await.expect("the right CA again");
    assert_eq!(c.role(), "admin");
    // A file that changed and does not read (a renewal half done): the
    // connector made before serves meanwhile.
    set("not a certificate".into(), 3_000_000);
    let c = link
        .as_caller(&admin)
        .await
        .expect("with the files read before");
    assert_eq!(c.role(), "admin");
}

/// The PEM of a new CA named `name`.
fn ca_pem(name: &str) -> String {
    ca(name).pem()
}
