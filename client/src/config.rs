//! What a [`Client`](crate::Client) connects to and how: the address, the
//! transport ([`Tls`]), the API key, and the time allowed per request.
//!
//! The library reads no environment variables and no configuration files of
//! its own; only the PEM files a [`Tls::Ca`] names, when connecting. The
//! `vault-client` binary fills a `ClientConfig` from its flags and the
//! `FINTRUST_*` environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig as RustlsConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    ServerName,
};
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};
use crate::sessions::{SessionCache, SERVERS, TICKETS_PER_SERVER};

/// Default time allowed for connecting and for each request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the requests that work through the whole vault wait for
/// their answer at least, whatever the config's timeout:
/// [`Client::reindex`](crate::Client::reindex) and
/// [`Client::rotate_master_key`](crate::Client::rotate_master_key), which
/// take minutes on a large vault where every other request takes
/// milliseconds. An hour.
pub const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Longest timeout [`ClientConfig::validate`] accepts: a day. Deadlines
/// are instants this far ahead, which must not overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

/// How the byte stream to the server is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// No TLS: API keys and personal data cross the network in the clear.
    /// Only for a server on the loopback interface during development; it
    /// has to be chosen by name, so that it is never the result of a
    /// forgotten setting ([`ClientConfig::default`] chooses no TLS at all,
    /// which [`ClientConfig::validate`] refuses).
    Plaintext,
    /// TLS 1.3 or 1.2 with the server's certificate checked against this
    /// CA only (not the system's roots: a vault's certificate comes from
    /// the operator's own CA).
    Ca {
        /// PEM file with the CA certificate(s) to trust.
        ca_pem_file: PathBuf,
        /// The name the server's certificate must carry (DNS name or IP).
        server_name: String,
        /// PEM certificate chain and PEM private key presented to a server
        /// that requires client certificates (mutual TLS).
        client_cert: Option<(PathBuf, PathBuf)>,
    },
}

/// Options of [`Client::connect`](crate::Client::connect).
///
/// `Debug` never shows the API key, and the key is zeroized when the
/// config is dropped. The client does not keep the config: the key is
/// sent once, in `Hello`.
#[derive(Clone)]
pub struct ClientConfig {
    /// `host:port` of the vault (its port is 9999 by default).
    pub addr: String,
    /// How the stream is protected: [`Tls::Ca`], the vault's CA (with a
    /// client certificate for mutual TLS), or, by name, [`Tls::Plaintext`]
    /// for a server on loopback. It must be chosen: the default's
    /// `Tls::Ca` names no CA file, which [`ClientConfig::validate`]
    /// refuses. [`Client::direct`](crate::Client::direct) does not use it.
    pub tls: Tls,
    /// The API key that authenticates the connection and fixes its role.
    /// Empty with a client certificate in `tls`: the certificate
    /// authenticates, as the credential the vault binds to it.
    pub api_key: Zeroizing<String>,
    /// A name for this client, sent in `Hello` for the server's logs.
    pub client_name: String,
    /// Time allowed to connect (TCP, TLS and `Hello` together) and for each
    /// request to be answered (default [`DEFAULT_TIMEOUT`], 30 s; at most
    /// [`MAX_TIMEOUT`], a day). A request
    /// on a [`Client`](crate::Client)'s connection fails with `Timeout`
    /// within an eighth of this after its deadline; and when nothing at
    /// all came from the server during a timed-out request's wait, the
    /// connection is taken for stalled and closed, its other requests
    /// failing with `Timeout` then, before their own deadlines. So set it
    /// above the longest a single request may take when nothing else is
    /// answered meanwhile; the requests that work through the whole vault
    /// (an online reindex, a master key's rotation) wait
    /// [`LONG_REQUEST_TIMEOUT`] at least, and while one waits the
    /// connection is not taken for stalled.
    pub timeout: Duration,
}

impl Default for ClientConfig {
    /// `127.0.0.1:9999` with no key and no TLS chosen (a [`Tls::Ca`] with
    /// no CA file): [`ClientConfig::validate`] refuses it until a key is
    /// set and `tls` is chosen, the vault's CA or, by name,
    /// [`Tls::Plaintext`]. A config that only changes the address of the
    /// default so never sends a key in the clear.
    fn default() -> Self {
        ClientConfig {
            addr: format!("127.0.0.1:{}", protocol::DEFAULT_PORT),
            tls: Tls::Ca {
                ca_pem_file: PathBuf::new(),
                server_name: String::new(),
                client_cert: None,
            },
            api_key: Zeroizing::new(String::new()),
            client_name: format!("fintrust-client/{}", env!("CARGO_PKG_VERSION")),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("addr", &self.addr)
            .field("tls", &self.tls)
            .field("api_key", &"..")
            .field("client_name", &self.client_name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Longest string the protocol's `str` encoding carries.
const MAX_STR: usize = u16::MAX as usize;

impl ClientConfig {
    /// Checks what can be checked without touching the network or the
    /// files: a non-empty address; TLS chosen (a CA file named, or
    /// [`Tls::Plaintext`]); a non-empty key, unless a client
    /// certificate stands for it; a timeout of more than zero and at most
    /// [`MAX_TIMEOUT`]; strings the protocol can carry; and a valid TLS
    /// server name.
    pub fn validate(&self) -> Result<()> {
        if self.addr.trim().is_empty() {
            return Err(ClientError::Config("the server address is empty".into()));
        }
        if matches!(&self.tls, Tls::Ca { ca_pem_file, .. } if ca_pem_file.as_os_str().is_empty()) {
            return Err(ClientError::Config(
                "no TLS chosen: set `tls` to `Tls::Ca` with the vault's CA file and server name \
                 (or to `Tls::Plaintext`, by name, for a development server on loopback)"
                    .into(),
            ));
        }
        // Without a key, only a client certificate can stand for the
        // caller (a credential the vault binds to it).
        let certificate = matches!(
            &self.tls,
            Tls::Ca {
                client_cert: Some(_),
                ..
            }
        );
        if self.api_key.is_empty() && !certificate {
            return Err(ClientError::Config(
                "the API key is empty (and no client certificate stands for it)".into(),
            ));
        }
        if self.api_key.len() > MAX_STR || self.client_name.len() > MAX_STR {
            return Err(ClientError::Config(
                "the API key and client name must be under 64 KiB".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(ClientError::Config("the timeout is zero".into()));
        }
        if self.timeout > MAX_TIMEOUT {
            return Err(ClientError::Config(
                "the timeout is over a day (86,400 s)".into(),
            ));
        }
        if let Tls::Ca { server_name, .. } = &self.tls {
            server_name_of(server_name)?;
        }
        Ok(())
    }
}

/// The host of a `host:port` address, without the brackets of an IPv6
/// literal (`[::1]:9999` is `::1`): the name a server's certificate is
/// checked against by default.
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Whether the host of a `host:port` address is `localhost` or a
/// loopback address: the only server plaintext is meant for.
pub fn is_loopback(addr: &str) -> bool {
    let host = host_of(addr);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(crate) fn server_name_of(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|_| ClientError::Config(format!("{name:?} is not a valid TLS server name")))
}

fn file_error(path: &Path, what: &str) -> ClientError {
    ClientError::Config(format!("{}: {what}", path.display()))
}

/// The bytes of the secret file `path`, read into one buffer allocated
/// once (a buffer that grows leaves copies of what it held in memory it
/// frees) and wiped when dropped; `None` when it holds more than `max`
/// bytes (a device or a wrong file given by mistake is refused, not read
/// whole).
pub fn read_secret(
    path: &std::path::Path,
    max: usize,
) -> std::io::Result<Option<Zeroizing<Vec<u8>>>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(max + 1));
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() <= max).then_some(bytes))
}

/// Largest private key file read: an RSA key of 16,384 bits is about
/// 13 KiB of PEM, and the rest of the file (a certificate chain beside
/// the key) is allowed for.
const MAX_PRIVATE_KEY_FILE: usize = 1 << 20;

/// The first private key of the PEM file `path` (PKCS#8 `PRIVATE KEY`,
/// PKCS#1 `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`; other sections, such
/// as certificates or `EC PARAMETERS`, and text between sections are
/// passed over), for a TLS certificate's key at either end. Lines may end
/// in LF, CRLF or CR, and the Base64 may be wrapped at any width, with
/// blanks around it, padded or not, as rustls's own reader takes them; a
/// section never ended is dropped at the next BEGIN line, and Base64
/// whose last digit carries bits past the data is refused (rustls
/// ignores them).
///
/// The file is read into one buffer, its Base64 gathered into another and
/// decoded (in constant time, `base64ct`) into a third, all wiped when
/// dropped, as the key returned is: a key handed to rustls is a copy
/// (`clone_key`), which rustls's aws-lc-rs provider wipes once it has
/// loaded it. (`PrivateKeyDer::from_pem_file` reads through buffers that
/// grow and are freed unwiped.) `Err` is what went wrong, without the
/// path.
pub fn private_key_file(
    path: &Path,
) -> std::result::Result<Zeroizing<PrivateKeyDer<'static>>, String> {
    use base64ct::Encoding;
    let pem = read_secret(path, MAX_PRIVATE_KEY_FILE)
        .map_err(|e| format!("cannot read the private key: {e}"))?
        .ok_or("the private key file is over 1 MiB")?;
    // A private key of a kind this cannot use, named if no other is found.
    let mut unusable: Option<String> = None;
    // The section being read (its label, and whether it has RFC 1421
    // headers such as `Proc-Type: 4,ENCRYPTED`: an encrypted key), and its
    // Base64 without blanks, in one buffer that never grows.
    let mut section: Option<(&[u8], bool)> = None;
    let mut base64 = Zeroizing::new(Vec::with_capacity(pem.len()));
    for line in pem
        .split(|b| *b == b'\n' || *b == b'\r')
        .map(<[u8]>::trim_ascii)
    {
        // A BEGIN line starts a section, also within one never ended.
        if let Some(label) = line
            .strip_prefix(b"-----BEGIN ")
            .and_then(|l| l.strip_suffix(b"-----"))
        {
            section = Some((label, false));
            base64.clear();
            continue;
        }
        let Some((label, headers)) = section.as_mut() else {
            continue;
        };
        let Some(end) = line.strip_prefix(b"-----END ") else {
            *headers |= line.contains(&b':');
            base64.extend(line.iter().filter(|b| !b.is_ascii_whitespace()));
            continue;
        };
        let (label, headers) = (*label, *headers);
        section = None;
        // Anything may follow `-----END <label>-----`; another label's
        // end leaves the section unread.
        if !end
            .strip_prefix(label)
            .is_some_and(|r| r.starts_with(b"-----"))
        {
            continue;
        }
        let label = String::from_utf8_lossy(label).into_owned();
        let kind = match label.as_str() {
            "PRIVATE KEY" => 8,
            "RSA PRIVATE KEY" => 1,
            "EC PRIVATE KEY" => 2,
            other => {
                if other.ends_with("PRIVATE KEY") && unusable.is_none() {
                    unusable = Some(label);
                }
                continue;
            }
        };
        if headers {
            return Err(format!(
                "the PEM {label} is encrypted (it has headers): decrypt it first"
            ));
        }
        // With its padding (whole groups of four) or without it.
        if base64.last() == Some(&b'=') && base64.len() % 4 != 0 {
            return Err("cannot decode the private key: Base64 padding out of place".into());
        }
        let digits = base64
            .strip_suffix(b"==")
            .or_else(|| base64.strip_suffix(b"="))
            .unwrap_or(&base64);
        let mut der = Zeroizing::new(vec![0u8; digits.len() / 4 * 3 + 3]);
        let decoded = base64ct::Base64Unpadded::decode(digits, &mut der)
            .map_err(|e| format!("cannot decode the private key: {e}"))?;
        let owned = decoded.to_vec();
        return Ok(Zeroizing::new(match kind {
            8 => PrivatePkcs8KeyDer::from(owned).into(),
            1 => PrivatePkcs1KeyDer::from(owned).into(),
            _ => PrivateSec1KeyDer::from(owned).into(),
        }));
    }
    Err(match unusable {
        Some(label) => format!("a PEM {label} is not a key TLS here can use"),
        None => "no private key in it (PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".into(),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    certificate_file(path).map_err(|e| file_error(path, &e))
}

/// Largest certificate file read: a bundle of every public CA is about
/// 200 KiB of PEM.
const MAX_CERTIFICATE_FILE: u64 = 16 << 20;

/// The certificates of the PEM file `path` (at least one), for either end
/// of port 9999 and the HTTP shim. The file is read up to 16 MiB: a device
/// or a wrong file given by mistake is refused, not read whole (rustls's
/// own reader grows its line without bound until it meets a newline).
pub fn certificate_file(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    use std::io::Read;
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CERTIFICATE_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| format!("cannot read certificates: {e}"))?;
    if pem.len() as u64 > MAX_CERTIFICATE_FILE {
        return Err("the certificate file is over 16 MiB".into());
    }
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".into());
    }
    Ok(certs)
}

/// The TLS cryptography of both ends of port 9999 (rustls's aws-lc-rs
/// provider), with the TLS 1.3 suites in the order
/// `TLS13_AES_128_GCM_SHA256`, `TLS13_AES_256_GCM_SHA384`,
/// `TLS13_CHACHA20_POLY1305_SHA256` (rustls's default puts the AES-256
/// suite first), then the TLS 1.2 suites as rustls orders them.
///
/// The key exchange groups are the provider's defaults: X25519 first (the
/// one share a client sends), then P-256, P-384 and the post-quantum
/// hybrid X25519MLKEM768; a rustls server takes the first group in the
/// client's list that it supports, so a client listing the hybrid first
/// gets it. aws-lc-rs rather than ring because a connection's four X25519
/// operations (a key pair and an agreement at each end) take about half
/// the time there, and they are a third of the CPU of a redemption over
/// TLS, where each token opens a connection (`docs/benchmarks.md`, "TLS
/// with aws-lc-rs").
///
/// The key exchange is 128-bit secure, so AES-256 and SHA-384 add cost
/// and no strength to a session: the SHA-384 key schedule was ~7% of the
/// CPU time of a TLS redemption, where SHA-256 runs on the processor's
/// SHA extensions. A rustls server honours a client's order (its
/// default), so other clients still get the suite they prefer.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let rest = provider
        .cipher_suites
        .iter()
        .filter(|s| !first.iter().any(|f| f.suite() == s.suite()));
    provider.cipher_suites = first.iter().chain(rest).copied().collect();
    provider
}

/// The rustls configuration of a [`Tls::Ca`]: [`crypto_provider`], safe
/// default versions, only `ca_pem_file` as roots, and a session cache of
/// its own ([`crate::sessions`]) that every connection made with this
/// configuration shares.
pub(crate) fn rustls_config(
    ca_pem_file: &Path,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<Arc<RustlsConfig>> {
    let provider = Arc::new(crypto_provider());
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem_file)? {
        roots
            .add(cert)
            .map_err(|e| file_error(ca_pem_file, &format!("bad CA certificate: {e}")))?;
    }
    let builder = RustlsConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let key = private_key_file(key).map_err(|e| file_error(key, &e))?;
            builder
                .with_client_auth_cert(chain, key.clone_key())
                .map_err(|e| file_error(cert, &format!("certificate and key do not fit: {e}")))?
        }
    };
    config.resumption =
        rustls::client::Resumption::store(Arc::new(SessionCache::new(TICKETS_PER_SERVER, SERVERS)));
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate path that names a device is read up to the bound and
    /// refused, not read until memory runs out.
    #[test]
    fn a_certificate_file_is_read_up_to_16_mib() {
        let zeros = certificate_file(Path::new("/dev/zero"));
        assert_eq!(zeros, Err("the certificate file is over 16 MiB".into()));
        let missing = certificate_file(Path::new("/nonexistent/ca.pem"));
        assert!(missing.is_err_and(|e| e.starts_with("cannot read certificates")));
    }

    /// Writes `pem` to a file and reads its key.
    fn key_of(pem: &str) -> std::result::Result<Vec<u8>, String> {
        let dir = std::env::temp_dir().join(format!(
            "fintrust-key-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("key.pem");
        std::fs::write(&path, pem).expect("write");
        let key = private_key_file(&path);
        let _ = std::fs::remove_dir_all(&dir);
        key.map(|k| k.secret_der().to_vec())
    }

    /// The first private key section is found among others (text before,
    /// a certificate, `EC PARAMETERS`, a key of a kind TLS here cannot
    /// use), with LF, CRLF or CR line ends, Base64 wrapped at any width or
    /// not at all and blanks around lines, and its label says its kind; a
    /// file without one, with a body that is not Base64, an encrypted key
    /// or over 1 MiB is a clear error.
    #[test]
    fn a_private_key_is_read_from_its_pem_section() {
        let pkcs8 = "-----BEGIN PRIVATE KEY-----\nAAEC\n-----END PRIVATE KEY-----\n";
        assert_eq!(key_of(pkcs8), Ok(vec![0, 1, 2]));
        let mixed = "Bag Attributes\n-----BEGIN CERTIFICATE-----\nBwgJ\n-----END CERTIFICATE-----\n\
                     -----BEGIN ENCRYPTED PRIVATE KEY-----\nBwgJ\n-----END ENCRYPTED PRIVATE KEY-----\n\
                     -----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\r\n\
                     -----BEGIN EC PRIVATE KEY-----\r\nAwQF\r\n-----END EC PRIVATE KEY-----\r\n\
                     -----BEGIN CERTIFICATE-----\nBwgJ\n-----END CERTIFICATE-----\n";
        assert_eq!(key_of(mixed), Ok(vec![3, 4, 5]));
        // 300 bytes, as openssl (64 columns), Java (76) and `base64 -w0`
        // write them, with CR line ends, and blanks around lines.
        let der: Vec<u8> = (0..300u32).map(|i| (i * 7 % 256) as u8).collect();
        let b64 = {
            use base64ct::Encoding;
            let mut buf = [0u8; 512];
            base64ct::Base64::encode(&der, &mut buf)
                .expect("room")
                .to_string()
        };
        let wrapped = |width: usize, eol: &str, pad: &str| {
            let body: Vec<String> = b64
                .as_bytes()
                .chunks(width)
                .map(|c| format!("{pad}{}{pad}", String::from_utf8_lossy(c)))
                .collect();
            format!(
                "-----BEGIN PRIVATE KEY-----{pad}{eol}{}{eol}-----END PRIVATE KEY-----{eol}",
                body.join(eol)
            )
        };
        let unpadded = "-----BEGIN PRIVATE KEY-----\nAAECAw\n-----END PRIVATE KEY----- trailing\n";
        assert_eq!(key_of(unpadded), Ok(vec![0, 1, 2, 3]));
        let padded = "-----BEGIN PRIVATE KEY-----\nAAECAw==\n-----END PRIVATE KEY-----\n";
        assert_eq!(key_of(padded), Ok(vec![0, 1, 2, 3]));
        for bad in ["AAEC=", "AAEC==", "AAECAw=", "AA=EC", "AAEC==="] {
            let pem = format!("-----BEGIN PRIVATE KEY-----\n{bad}\n-----END PRIVATE KEY-----\n");
            assert!(key_of(&pem).is_err(), "{bad}");
        }
        let unclosed = "-----BEGIN CERTIFICATE-----\nBwgJ\n-----BEGIN PRIVATE KEY-----\nAAEC\n\
                        -----END PRIVATE KEY-----\n";
        assert_eq!(key_of(unclosed), Ok(vec![0, 1, 2]));
        for (width, eol, pad) in [
            (64, "\n", ""),
            (76, "\r\n", ""),
            (b64.len(), "\n", ""),
            (64, "\r", ""),
            (64, "\n", " \t"),
        ] {
            assert_eq!(
                key_of(&wrapped(width, eol, pad)).as_deref(),
                Ok(&der[..]),
                "{width} {eol:?} {pad:?}"
            );
        }
        let dir = std::env::temp_dir().join(format!("fintrust-key-kind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (label, kind) in [
            ("PRIVATE KEY", 8),
            ("RSA PRIVATE KEY", 1),
            ("EC PRIVATE KEY", 2),
        ] {
            let path = dir.join("k.pem");
            let pem = format!("-----BEGIN {label}-----\nAAEC\n-----END {label}-----");
            std::fs::write(&path, pem).expect("write");
            let key = private_key_file(&path).expect("a key");
            let got = match &*key {
                PrivateKeyDer::Pkcs8(_) => 8,
                PrivateKeyDer::Pkcs1(_) => 1,
                PrivateKeyDer::Sec1(_) => 2,
                _ => 0,
            };
            assert_eq!(got, kind, "{label}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        let refused = [
            ("-----BEGIN CERTIFICATE-----\nBwgJ\n-----END CERTIFICATE-----\n", "no private key"),
            ("", "no private key"),
            ("-----BEGIN PRIVATE KEY-----\nAAEC\n", "no private key"),
            ("-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n", "cannot decode"),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAEC\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "ENCRYPTED PRIVATE KEY is not",
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n\
                 AAEC\n-----END RSA PRIVATE KEY-----\n",
                "encrypted",
            ),
        ];
        for (pem, says) in refused {
            let e = key_of(pem).expect_err(pem);
            assert!(e.contains(says), "{pem:?}: {e}");
        }
        let huge = format!("{pkcs8}{}", " ".repeat(MAX_PRIVATE_KEY_FILE));
        assert!(key_of(&huge).expect_err("too large").contains("over 1 MiB"));
    }

    #[test]
    fn the_host_of_an_address_drops_its_port_and_brackets() {
        assert_eq!(host_of("vault.example:9999"), "vault.example");
        assert_eq!(host_of("127.0.0.1:9999"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9999"), "::1");
        assert_eq!(host_of("vault.example"), "vault.example");
        // What a default server name is taken from: an IPv6 host without
        // its brackets is a name TLS takes (an IP address), with them not.
        assert!(server_name_of(host_of("[::1]:9999")).is_ok());
        assert!(server_name_of("[::1]").is_err());
    }

    fn valid() -> ClientConfig {
        ClientConfig {
            api_key: Zeroizing::new("fvk_test".into()),
            tls: Tls::Plaintext,
            ..ClientConfig::default()
        }
    }

    #[test]
    fn aes_128_comes_first_and_no_suite_is_lost() {
        use rustls::CipherSuite;
        let ours = crypto_provider();
        let default = rustls::crypto::aws_lc_rs::default_provider();
        let names = |p: &rustls::crypto::CryptoProvider| -> Vec<CipherSuite> {
            p.cipher_suites.iter().map(|s| s.suite()).collect()
        };
        let (mut a, mut b) = (names(&ours), names(&default));
        assert_eq!(
            a[..3],
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b, "the same suites as rustls's default, reordered");
    }

    #[test]
    fn x25519_is_the_key_share_sent_and_the_hybrid_is_offered_last() {
        use rustls::NamedGroup;
        let groups: Vec<NamedGroup> = crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1,
                NamedGroup::X25519MLKEM768
            ]
        );
    }

    #[test]
    fn defaults_are_documented_ones() {
        let c = ClientConfig::default();
        assert_eq!(c.addr, "127.0.0.1:9999");
        assert_eq!(c.timeout, Duration::from_secs(30));
    }

    /// The default chooses no TLS, and a config that changes only its
    /// address and key is refused, naming what to choose: never a key
    /// sent in the clear by a forgotten setting.
    #[test]
    fn the_default_leaves_tls_to_be_chosen() {
        let c = ClientConfig {
            addr: "vault.prod.example:9999".into(),
            api_key: Zeroizing::new("fvk_test".into()),
            ..ClientConfig::default()
        };
        match c.validate() {
            Err(ClientError::Config(m)) => assert!(m.contains("no TLS chosen"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            crate::connection::Connector::new(c),
            Err(ClientError::Config(m)) if m.contains("no TLS chosen")
        ));
    }

    #[test]
    fn a_valid_config_passes() {
        assert!(valid().validate().is_ok());
        let tls = ClientConfig {
            tls: Tls::Ca {
                ca_pem_file: "ca.pem".into(),
                server_name: "vault.internal".into(),
                client_cert: None,
            },
            ..valid()
        };
        assert!(tls.validate().is_ok());
    }

    #[test]
    fn unusable_configs_are_refused() {
        let cases = [
            ClientConfig::default(),
            ClientConfig {
                api_key: Zeroizing::new(String::new()),
                ..valid()
            },
            ClientConfig {
                addr: " ".into(),
                ..valid()
            },
            ClientConfig {
                timeout: Duration::ZERO,
                ..valid()
            },
            ClientConfig {
                api_key: Zeroizing::new("k".repeat(70_000)),
                ..valid()
            },
            ClientConfig {
                tls: Tls::Ca {
                    ca_pem_file: "ca.pem".into(),
                    server_name: "not a name!".into(),
                    client_cert: None,
                },
                ..valid()
            },
        ];
        for c in cases {
            assert!(
                matches!(c.validate(), Err(ClientError::Config(_))),
                "{c:?} was accepted"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let c = ClientConfig {
            api_key: Zeroizing::new("fvk_secret-value".into()),
            ..ClientConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret-value"), "{shown}");
    }

    #[test]
    fn missing_pem_files_are_config_errors() {
        let missing = Path::new("/nonexistent/fintrust-ca.pem");
        assert!(matches!(
            rustls_config(missing, None),
            Err(ClientError::Config(_))
        ));
    }
}
