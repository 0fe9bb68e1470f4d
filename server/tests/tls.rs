//! Port 9999 over TLS, with certificates made in the test: a client that
//! trusts the CA appends and gets a receipt; plaintext to the TLS port is
//! refused without harming the server; with mutual TLS, a client without a
//! certificate from the client CA is refused.

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use protocol::{FrameCodec, Message};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use server::serve::{run, ServeConfig};
use server::tls::{server_config, TlsFiles};
use storage::{Options, Receipt, Unlock, Vault};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

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
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec![name.to_string()]).expect("params");
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
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
    vault: Arc<Vault>,
}

async fn start(mutual: bool) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki {
        ca: ca("fintrust test CA"),
        client_ca: ca("fintrust test client CA"),
    };
    let (chain, key, _, _) = leaf(&pki.ca, "localhost");
    let files = TlsFiles {
        cert: write(dir.path(), "server.pem", &chain),
        key: write(dir.path(), "server.key", &key),
        client_ca: mutual.then(|| write(dir.path(), "client-ca.pem", &pki.client_ca.pem())),
    };
    let config = server_config(&files).expect("server config");
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
        ServeConfig::default(),
        Some(config),
        async {
            let _ = stopped.await;
        },
    ));
    Setup {
        addr,
        writer_key: writer_key.to_string(),
        pki,
        _dir: dir,
        _stop: stop,
        vault,
    }
}

fn client_config(
    s: &Setup,
    client_cert: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    client_config_with(s, rustls::crypto::ring::default_provider(), client_cert)
}

/// A client configuration trusting the test CA, with `provider`'s suites.
fn client_config_with(
    s: &Setup,
    provider: rustls::crypto::CryptoProvider,
    client_cert: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.pki.ca.der().clone()).expect("root");
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

async fn tls_append(s: &Setup, config: Arc<rustls::ClientConfig>) -> Result<Message, String> {
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
        api_key: s.writer_key.clone(),
        client: "tls test".into(),
    };
    conn.send(hello.to_frame(1, 0).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let append = Message::Append {
        subject: "cust-1".into(),
        fields: vec![("email".into(), "jane@example.com".into())],
    };
    conn.send(append.to_frame(2, 0).map_err(|e| e.to_string())?)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = None;
    for _ in 0..2 {
        let f = conn
            .next()
            .await
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        last = Some(Message::from_frame(&f).map_err(|e| e.to_string())?);
    }
    last.ok_or_else(|| "no reply".to_string())
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
    let (_, _, cert, key) = leaf(&s.pki.client_ca, "svc");
    let reply = tls_append(&s, client_config(&s, Some((cert, key))))
        .await
        .expect("accepted");
    assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
}

/// A connector keeps a ticket for every connection that may open at once:
/// rustls's own cache kept eight per server, so the ninth connection opening
/// at the same time made a full handshake (checking the certificate chain
/// and the server's signature again).
#[tokio::test]
async fn many_connections_opening_at_once_all_resume() {
    let s = start(false).await;
    let ca_file = write(s._dir.path(), "ca.pem", &s.pki.ca.pem());
    let connector = client::Connector::new(client::ClientConfig {
        addr: s.addr.to_string(),
        tls: client::Tls::Ca {
            ca_pem_file: ca_file,
            server_name: "localhost".into(),
            client_cert: None,
        },
        api_key: client::Zeroizing::new(s.writer_key.clone()),
        ..client::ClientConfig::default()
    })
    .expect("connector");
    // One at a time: each connection takes a ticket and brings two, so
    // after these the connector holds 25.
    for i in 0..24 {
        let c = connector.connect().await.expect("connect");
        assert_eq!(c.tls_resumed(), i > 0, "connection {i}");
    }
    let opened = futures_util::future::join_all((0..20).map(|_| connector.connect())).await;
    let mut resumed = 0;
    for c in opened {
        let c = c.expect("connect");
        resumed += usize::from(c.tls_resumed());
        // A resumed session carries requests like a fresh one.
        let receipt = c
            .append("cust-1", vec![("email".into(), "jane@example.com".into())])
            .await
            .expect("append");
        client::verify_receipt(&receipt, s.vault.public_key().as_bytes()).expect("receipt");
    }
    assert_eq!(resumed, 20, "every connection opened at once resumed");
    // The server counted them (other tests of this binary resume nothing).
    assert!(handshakes("resumed") >= 43, "{}", handshakes("resumed"));
}

/// `fintrust_tls_handshakes_total` of the protocol port for `outcome`.
fn handshakes(outcome: &str) -> u64 {
    let text = server::metrics::global().render();
    let prefix =
        format!("fintrust_tls_handshakes_total{{port=\"protocol\",outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The TLS 1.3 suite a client with `provider` gets from the vault.
async fn negotiated(s: &Setup, provider: rustls::crypto::CryptoProvider) -> rustls::CipherSuite {
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client_config_with(s, provider, None))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref()
        .1
        .negotiated_cipher_suite()
        .expect("a suite")
        .suite()
}

/// The client crate asks for AES-128-GCM first and gets it; a client that
/// prefers AES-256-GCM (rustls's default order) gets that.
#[tokio::test]
async fn the_client_s_suite_order_is_honoured() {
    let s = start(false).await;
    assert_eq!(
        negotiated(&s, client::config::crypto_provider()).await,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        negotiated(&s, rustls::crypto::ring::default_provider()).await,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
}
