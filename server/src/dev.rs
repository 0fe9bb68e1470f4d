//! `vaultd dev`: the newcomer's first command. It creates a vault in a
//! fresh data dir (under the system's temp dir unless told otherwise)
//! with a generated dev passphrase, writes demo records, consents and a
//! demo policy, creates an API key for the admin, writer, partner and
//! auditor roles (the gateway's is the daemon's own, for its shim, and
//! never printed), and serves the protocol and
//! the HTTP shim on loopback until interrupted: in plaintext (with a
//! warning), or with `tls` over a certificate for `localhost`,
//! `127.0.0.1` and `::1` issued by a dev CA generated into the data dir
//! (`dev-ca.pem`, which clients trust with `--cacert`). The data dir stays
//! after exit so that `vault-verify` can check it; a run on it again
//! revokes the keys the runs before printed and prints new ones. Both
//! ports are bound before anything is created or changed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use storage::{Append, Kind, Options, Unlock};

use crate::daemon::{self, Bound, Daemon};
use crate::secrets::ShownOnce;
use crate::serve::ServeConfig;
use crate::shim::{PoliciesFile, ShimConfig};
use crate::{Error, Result};

/// Demo subjects and their records (fictitious people).
pub const DEMO_RECORDS: &[(&str, &str)] = &[
    (
        "cust-0001",
        r#"{"name":"Ada Lovelace","email":"ada@example.com","iban":"GB33BUKB20201555555555","dob":"1815-12-10","income":"84000"}"#,
    ),
    (
        "cust-0002",
        r#"{"name":"Alan Turing","email":"alan@example.com","iban":"GB94BARC10201530093459","dob":"1912-06-23","income":"72000"}"#,
    ),
    (
        "cust-0003",
        r#"{"name":"Grace Hopper","email":"grace@example.com","iban":"DE89370400440532013000","dob":"1906-12-09","income":"91000"}"#,
    ),
];

/// The demo partner, its purpose, and its policy.
pub const DEMO_PARTNER: &str = "demo-lender";
pub const DEMO_PURPOSE: &str = "credit_check";
pub const DEMO_POLICIES: &str = r#"
[partners.demo-lender]
max_token_ttl_secs = 300
rate_limit_per_minute = 600

[partners.demo-lender.purposes.credit_check.fields]
name = "partial"
email = "partial"
iban = "partial"
dob = "generalize"
income = "generalize"

[partners.demo-lender.purposes.fraud_check.fields]
name = "reveal"
dob = "reveal"
iban = "hash"
"#;

/// Options of `vaultd dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Default: a new folder under the system temp dir.
    pub data_dir: Option<PathBuf>,
    pub listen: String,
    pub http_listen: String,
    /// Serve both ports over TLS with a generated dev certificate.
    pub tls: bool,
    /// HTTP reverse proxies in front of the shim
    /// ([`ShimConfig::trusted_proxies`]), and the header they name the
    /// client in.
    pub trusted_proxies: crate::proxied::TrustedProxies,
    pub forwarded_header: crate::proxied::forwarded::ForwardedHeader,
    /// TCP proxies in front of the protocol port
    /// ([`ServeConfig::proxy_protocol_from`]).
    pub proxy_protocol_from: crate::proxied::TrustedProxies,
}

/// What `vaultd dev` prints (one JSON object with `--json`). The keys are
/// development keys, shown once ([`ShownOnce`]: `Debug` leaves them out,
/// and they are zeroized when dropped).
#[derive(Debug, Serialize)]
pub struct DevOutput {
    pub vault_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub public_key: String,
    #[serde(serialize_with = "crate::path_text")]
    pub data_dir: PathBuf,
    #[serde(serialize_with = "crate::path_text")]
    pub passphrase_file: PathBuf,
    pub admin_api_key: ShownOnce,
    pub writer_api_key: ShownOnce,
    pub partner_api_key: ShownOnce,
    pub auditor_api_key: ShownOnce,
    pub partner_id: String,
    pub demo_subject_id: String,
    pub demo_purpose: String,
    pub tls: bool,
    /// The dev CA certificate (PEM) clients trust, when `tls` is on.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::optional_path_text"
    )]
    pub ca_cert: Option<PathBuf>,
}

/// Creates (or reopens) the dev vault, loads the demo data, and serves it
/// until the future that `shutdown` makes resolves; `ready` gets what to print
/// once both ports listen. `shutdown` is called before a new vault is made
/// (its seeding is then finished before a stop), and for an existing one
/// only once it is open, so that a signal handler it installs does not
/// keep a signal from ending a start that takes long (a large vault's
/// open).
pub async fn run<Fut>(
    opts: DevOptions,
    ready: impl FnOnce(DevOutput) -> Result<()>,
    shutdown: impl FnOnce() -> Fut,
) -> Result<()>
where
    Fut: std::future::Future<Output = ()>,
{
    // Both ports are bound before anything is made (a port in use leaves
    // no vault behind), each to the addresses its name resolved to once;
    // in plaintext, only where nothing but this machine can listen in.
    let protocol = bind_checked(&opts.listen, opts.tls).await?;
    let http = bind_checked(&opts.http_listen, opts.tls).await?;
    let data_dir = match opts.data_dir {
        Some(d) => d,
        None => {
            let mut b = [0u8; 4];
            storage::crypto::random_bytes(&mut b);
            std::env::temp_dir().join(format!("fintrust-dev-{}", hex::encode(b)))
        }
    };
    let passphrase_file = data_dir.join("dev-passphrase");
    // A vault whose creation did not finish is made again (the create
    // starts over), with the passphrase of the run that began it.
    let fresh = !data_dir.join("db").exists() || storage::Vault::is_unfinished(&data_dir);
    // A new vault is made and seeded quickly, and a signal then must wait
    // for the seeding (cut short, the vault would be left without its demo
    // data, which only a first run writes): the stop is asked for before
    // it is made. An existing vault's open may take long (it verifies the
    // whole log): until it is open, SIGINT and SIGTERM keep their default
    // action and end the process at once, as a crash would, which the
    // vault recovers from; the stop is asked for once it is open, well
    // before the addresses are printed (a signal sent once they are is a
    // stop, not the default action).
    let (vault, admin_api_key, stop) = if fresh {
        let stop = shutdown();
        std::fs::create_dir_all(&data_dir).map_err(|source| Error::File {
            path: data_dir.display().to_string(),
            error: source,
        })?;
        // A passphrase a run cut short before its vault was made (a full
        // disk, a crash) is taken up again, not refused as existing; one
        // it left empty is made again (no vault uses it).
        let left = std::fs::metadata(&passphrase_file).map_or(0, |m| m.len());
        if left == 0 {
            remove_if_present(&passphrase_file)?;
        }
        let unlock = if left > 0 {
            crate::secrets::unlock_from(Some(&passphrase_file), None)?
        } else {
            let pass = storage::generate_api_key();
            write_private(&passphrase_file, pass.as_bytes())?;
            Unlock::passphrase(pass.as_bytes().to_vec())
        };
        let created = storage::Vault::create(&data_dir, &unlock, Options::default())?;
        (created.vault, created.admin_api_key.to_string(), stop)
    } else {
        if std::fs::symlink_metadata(&passphrase_file).is_err() {
            return Err(Error::Usage(format!(
                "{} holds a vault that `vaultd dev` did not make (it has no dev-passphrase): \
                 serve it with `vaultd serve --data-dir DIR --passphrase-file FILE`, or give \
                 `vaultd dev` another --data-dir",
                data_dir.display()
            )));
        }
        let unlock = crate::secrets::unlock_from(Some(&passphrase_file), None)?;
        let dir = data_dir.clone();
        let vault = tokio::task::spawn_blocking(move || {
            storage::Vault::open(&dir, &unlock, Options::default())
        })
        .await
        .map_err(|e| Error::Usage(e.to_string()))??;
        let stop = shutdown();
        let revoked = revoke_earlier_demo_keys(&vault).await?;
        if revoked > 0 {
            tracing::info!(revoked, "revoked the demo keys that earlier runs printed");
        }
        let (_, key) = vault.create_credential("admin", "dev-admin").await?;
        (vault, key.to_string(), stop)
    };
    let DemoKeys {
        writer,
        partner,
        auditor,
    } = seed(&vault, fresh).await?;
    let policies = demo_policies()?;
    let public_key = hex::encode(vault.public_key().as_bytes());
    let (tls, ca_cert) = if opts.tls {
        let (config, ca) = dev_tls(&data_dir)?;
        (Some(config), Some(ca))
    } else {
        tracing::warn!(
            "vaultd dev serves WITHOUT TLS on loopback: development only (--tls for a dev certificate)"
        );
        (None, None)
    };
    let d = Daemon {
        protocol,
        http: Some(http),
        tls,
        // A demonstration of the rotation policy: `vault-admin status`
        // reports keys older than these.
        serve: ServeConfig {
            rotation: crate::serve::RotationPolicy {
                max_signing_key_age: Some(std::time::Duration::from_secs(90 * 86_400)),
                max_subject_key_age: Some(std::time::Duration::from_secs(365 * 86_400)),
            },
            proxy_protocol_from: opts.proxy_protocol_from,
            ..ServeConfig::default()
        },
        shim: ShimConfig {
            trusted_proxies: opts.trusted_proxies,
            forwarded_header: opts.forwarded_header,
            ..ShimConfig::default()
        },
        policies: Some(policies),
        reopen: Some(reopen(data_dir.clone(), passphrase_file.clone())),
    };
    let mut shim_config = d.shim.clone();
    let output = move |b: Bound| DevOutput {
        vault_addr: b.protocol,
        http_addr: b.http.unwrap_or(b.protocol),
        public_key,
        data_dir,
        passphrase_file,
        admin_api_key: admin_api_key.into(),
        writer_api_key: writer.into(),
        partner_api_key: partner.into(),
        auditor_api_key: auditor.into(),
        partner_id: DEMO_PARTNER.into(),
        demo_subject_id: DEMO_RECORDS[0].0.into(),
        demo_purpose: DEMO_PURPOSE.into(),
        tls: ca_cert.is_some(),
        ca_cert,
    };
    // Partners redeem where the protocol port actually listens.
    shim_config.vault_addr = d
        .protocol
        .local_addr()
        .map_or_else(|_| shim_config.vault_addr.clone(), |a| a.to_string());
    let d = Daemon {
        shim: shim_config,
        ..d
    };
    daemon::run(vault, d, |b| ready(output(b)), stop).await
}

/// Opens the dev vault again after a failed write, as `vaultd dev` does
/// when it starts on an existing data dir.
fn reopen(data_dir: PathBuf, passphrase_file: PathBuf) -> crate::live::Reopen {
    crate::live::Reopen::new(
        data_dir,
        move || crate::secrets::unlock_from(Some(&passphrase_file), None),
        Options::default,
    )
}

/// How long `vaultd dev`'s certificates are valid.
const DEV_CERT_LIFETIME: time::Duration = time::Duration::days(90);
/// An earlier run's certificate is made again when it expires within this.
const DEV_CERT_RENEWED_BEFORE: time::Duration = time::Duration::days(7);

/// The dev CA, and a certificate for `localhost`, `127.0.0.1` and `::1`
/// it issued, in `data_dir` (made on first use, reused after): the server's
/// TLS configuration and the CA file clients trust. (A certificate an
/// earlier build made names no `::1`: it is made again.)
pub(crate) fn dev_tls(data_dir: &Path) -> Result<(crate::tls::ServerTls, PathBuf)> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, CidrSubnet, DistinguishedName,
        DnType, GeneralSubtree, IsCa, KeyPair, NameConstraints,
    };
    let named = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_file = data_dir.join("dev-ca.pem");
    let files = crate::tls::TlsFiles {
        cert: data_dir.join("dev-cert.pem"),
        key: data_dir.join("dev-key.pem"),
        client_ca: None,
    };
    // Made again unless an earlier run's files are all there and load (a
    // run cut short while writing them leaves one empty or torn), and are
    // good for another week.
    let now = time::OffsetDateTime::now_utc();
    let reusable = ca_file.exists()
        && crate::tls::ServerTls::open(&files)
            .is_ok_and(|t| t.expires_at() > (now + DEV_CERT_RENEWED_BEFORE).unix_timestamp())
        && names_ipv6_loopback(&files.cert)
        && std::fs::read_to_string(&ca_file)
            .is_ok_and(|pem| pem.contains("-----END CERTIFICATE-----"));
    if !reusable {
        let tls_err = |e: rcgen::Error| Error::Usage(format!("making the dev certificate: {e}"));
        // Short-lived, and the CA can issue for this machine's names only:
        // a dev CA someone trusts (added to a system store, say) is
        // worth little to whoever copies its key pair's certificate.
        let (not_before, not_after) = (now - time::Duration::hours(1), now + DEV_CERT_LIFETIME);
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = named("fintrust-vault dev CA");
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![
                GeneralSubtree::DnsName("localhost".into()),
                GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([127, 0, 0, 0], 8)),
                GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix(
                    std::net::Ipv6Addr::LOCALHOST.octets(),
                    128,
                )),
            ],
            excluded_subtrees: Vec::new(),
        });
        (params.not_before, params.not_after) = (not_before, not_after);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(tls_err)?)
            .map_err(tls_err)?;
        let key = KeyPair::generate().map_err(tls_err)?;
        let mut leaf =
            CertificateParams::new(["localhost", "127.0.0.1", "::1"].map(String::from).to_vec())
                .map_err(tls_err)?;
        leaf.distinguished_name = named("localhost");
        (leaf.not_before, leaf.not_after) = (not_before, not_after);
        let cert = leaf.signed_by(&key, &ca).map_err(tls_err)?;
        for f in [&ca_file, &files.cert, &files.key] {
            remove_if_present(f)?;
        }
        write_private(&files.key, key.serialize_pem().as_bytes())?;
        write_private(&files.cert, cert.pem().as_bytes())?;
        write_private(&ca_file, ca.pem().as_bytes())?;
    }
    Ok((crate::tls::ServerTls::open(&files)?, ca_file))
}

/// Whether the first certificate of the PEM file `path` names `::1`, as
/// the dev certificates of this build do (an earlier build's did not).
fn names_ipv6_loopback(path: &Path) -> bool {
    use rustls_pki_types::pem::PemObject as _;
    use x509_parser::extensions::GeneralName;
    let Ok(cert) = rustls_pki_types::CertificateDer::from_pem_file(path) else {
        return false;
    };
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return false;
    };
    let loopback = std::net::Ipv6Addr::LOCALHOST.octets();
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == loopback))
}

/// The role and name of each credential whose key `vaultd dev` prints:
/// the vault's initial admin at the first run, `dev-admin` at the next.
const DEMO_CREDENTIALS: [(&str, &str); 5] = [
    ("admin", "initial admin"),
    ("admin", "dev-admin"),
    ("writer", "demo-service"),
    ("partner", DEMO_PARTNER),
    ("auditor", "demo-auditor"),
];

/// Revokes the live credentials that earlier runs of `vaultd dev` on
/// this vault made (and printed): each run's keys are good until the
/// next run, so keys copied into shells and notes of earlier sessions do
/// not stay valid for good. Returns how many were revoked.
async fn revoke_earlier_demo_keys(vault: &storage::Vault) -> Result<usize> {
    let mut revoked = 0;
    for (role, name) in DEMO_CREDENTIALS {
        for c in vault.live_credentials(&format!("{role}-"))? {
            if c.role == role && c.name == name {
                vault.revoke_credential(&c.id).await?;
                revoked += 1;
            }
        }
    }
    Ok(revoked)
}

/// A listener on `addr`, resolved once; without `tls`, refused unless
/// every address it resolves to is a loopback one.
async fn bind_checked(addr: &str, tls: bool) -> Result<tokio::net::TcpListener> {
    let file_error = |source| Error::File {
        path: addr.to_string(),
        error: source,
    };
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(file_error)?
        .collect();
    if !tls && !resolved.iter().all(|a| a.ip().is_loopback()) {
        return Err(Error::Usage(format!(
            "vaultd dev serves plaintext on loopback only, and {addr} is not: add --tls \
             (a dev certificate), or run vaultd serve with your own"
        )));
    }
    tokio::net::TcpListener::bind(resolved.as_slice())
        .await
        .map_err(file_error)
}

/// API keys of the demo's roles (development keys, shown once).
pub struct DemoKeys {
    pub writer: String,
    pub partner: String,
    pub auditor: String,
}

/// The roles only: a key is shown once, in `vaultd dev`'s output.
impl std::fmt::Debug for DemoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoKeys")
            .field("writer", &"<redacted>")
            .field("partner", &"<redacted>")
            .field("auditor", &"<redacted>")
            .finish()
    }
}

/// Creates one API key per demo role and, in a `fresh` vault, writes the
/// demo records and the consents of [`DEMO_RECORDS`]' first two subjects
/// for [`DEMO_PARTNER`]. The third subject has a record and no consent.
pub async fn seed(vault: &storage::Vault, fresh: bool) -> Result<DemoKeys> {
    let (_, writer) = vault.create_credential("writer", "demo-service").await?;
    let (_, partner) = vault.create_credential("partner", DEMO_PARTNER).await?;
    let (_, auditor) = vault.create_credential("auditor", "demo-auditor").await?;
    if fresh {
        let mut items: Vec<Append> = DEMO_RECORDS
            .iter()
            .map(|(s, r)| Append::record(*s, r.as_bytes().to_vec()))
            .collect();
        let consent = |subject: &str, purposes: &[&str]| {
            Append::event(
                Kind::ConsentGranted,
                subject,
                &serde_json::json!({"partner_id": DEMO_PARTNER, "purposes": purposes, "recorded_by": "vaultd-dev"}),
            )
        };
        items.push(consent(DEMO_RECORDS[0].0, &[DEMO_PURPOSE, "fraud_check"]));
        items.push(consent(DEMO_RECORDS[1].0, &[DEMO_PURPOSE]));
        vault.append_batch(items).await?;
    }
    Ok(DemoKeys {
        writer: writer.to_string(),
        partner: partner.to_string(),
        auditor: auditor.to_string(),
    })
}

/// [`DEMO_POLICIES`], parsed and validated.
pub fn demo_policies() -> Result<PoliciesFile> {
    PoliciesFile::parse(DEMO_POLICIES, 3600).map_err(Error::Usage)
}

/// Copy-paste commands for the whole flow, for the text output: bash or
/// zsh, pasted in order (the first keeps the answer that the second takes
/// the token from), paths quoted; the binaries built by the README's
/// `cargo run --release` (another profile would build everything again).
pub fn walkthrough(o: &DevOutput) -> String {
    let (scheme, mut curl_tls, client_tls, mode) = match &o.ca_cert {
        Some(ca) => (
            "https",
            format!(" --cacert {}", shell_quote(&ca.to_string_lossy())),
            format!("--cacert {}", shell_quote(&ca.to_string_lossy())),
            "TLS with a dev certificate",
        ),
        None => (
            "http",
            String::new(),
            "--insecure-plaintext".to_string(),
            "plaintext, loopback only",
        ),
    };
    if o.http_addr.is_ipv6() {
        // An IPv6 address: brackets in a URL are a range to curl's globbing.
        curl_tls.insert(0, 'g');
    }
    format!(
        r#"fintrust-vault dev server ({mode})
  protocol:   {vault}   HTTP shim: {scheme}://{http}
  data dir:   {dir}
  public key: {pk}
  API keys (development only, shown once):
    admin    {admin}
    writer   {writer}
    partner  {partner}   (partner id {partner_id})
    auditor  {auditor}

1. A partner asks for {subject}'s data for {purpose}; the answer holds a one-time token:
   ANSWER=$(curl -s{curl_tls} -X POST '{scheme}://{http}/v1/authorize' \
     -H 'Authorization: Bearer {partner}' -H 'Content-Type: application/json' \
     -d '{{"subject_id": "{subject}", "purpose": "{purpose}"}}'); echo "$ANSWER"

2. It redeems the token, once (again, the answer is token_spent):
   FINTRUST_API_KEY={partner} FINTRUST_TOKEN="$(echo "$ANSWER" | sed -E 's/.*"token":"([^"]+)".*/\1/')" \
     cargo run --release -q --bin vault-client -- redeem --addr {qvault} {client_tls}

3. Without consent (cust-0003) the answer is 403 consent_missing; the audit trail:
   curl -s{curl_tls} '{scheme}://{http}/v1/logs?partner={partner_id}' -H 'Authorization: Bearer {auditor}'

4. After Ctrl-C, check the whole log with the public key alone:
   cargo run --release -q --bin vault-verify -- --data-dir {qdir} --public-key {pk}
"#,
        vault = o.vault_addr,
        qvault = shell_quote(&o.vault_addr.to_string()),
        http = o.http_addr,
        dir = o.data_dir.display(),
        qdir = shell_quote(&o.data_dir.to_string_lossy()),
        pk = o.public_key,
        admin = o.admin_api_key.expose(),
        writer = o.writer_api_key.expose(),
        partner = o.partner_api_key.expose(),
        partner_id = o.partner_id,
        auditor = o.auditor_api_key.expose(),
        subject = o.demo_subject_id,
        purpose = o.demo_purpose,
    )
}

/// `s` as one word for a POSIX shell: as it is when it holds only
/// characters no shell treats specially, else in single quotes.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Removes the file at `path`, if there is one.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::File {
            path: path.display().to_string(),
            error: source,
        }),
    }
}

/// Writes `bytes` to a new file at `path`, readable by its owner alone
/// from the start (0600), synced; an existing file (or symlink) there is
/// an error, never followed or overwritten.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let err = |source| Error::File {
        path: path.display().to_string(),
        error: source,
    };
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    /// A word a shell would split or expand is quoted, a quote in it too.
    #[test]
    fn shell_quote_keeps_a_path_one_word() {
        use super::shell_quote;
        assert_eq!(
            shell_quote("/tmp/fintrust-dev.x1/dev-ca.pem"),
            "/tmp/fintrust-dev.x1/dev-ca.pem"
        );
        assert_eq!(shell_quote("127.0.0.1:9999"), "127.0.0.1:9999");
        assert_eq!(shell_quote("[::1]:9999"), "'[::1]:9999'");
        assert_eq!(shell_quote("/tmp/a dir/$x"), "'/tmp/a dir/$x'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    /// The dev certificate lives 90 days, is kept by the next run while
    /// it has more than a week left, and a client that trusts the dev CA
    /// reaches `localhost` with it (the CA's name constraints allow it).
    #[tokio::test]
    async fn the_dev_certificate_is_short_lived_kept_and_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tls, ca) = super::dev_tls(dir.path()).expect("made");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let left = tls.expires_at() - now;
        assert!((89 * 86_400..=90 * 86_400).contains(&left), "{left} s left");
        let cert = std::fs::read(dir.path().join("dev-cert.pem")).expect("cert");
        let (again, _) = super::dev_tls(dir.path()).expect("kept");
        assert_eq!(again.expires_at(), tls.expires_at());
        assert_eq!(
            std::fs::read(dir.path().join("dev-cert.pem")).expect("cert"),
            cert
        );
        assert!(super::names_ipv6_loopback(&dir.path().join("dev-cert.pem")));
        // One that names no `::1` (as an earlier build made them), still
        // valid for months, is made again.
        let old = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("a key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("params");
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(60);
        let stale = params.self_signed(&key).expect("a certificate");
        std::fs::write(old.path().join("dev-cert.pem"), stale.pem()).expect("cert");
        std::fs::write(old.path().join("dev-key.pem"), key.serialize_pem()).expect("key");
        std::fs::write(old.path().join("dev-ca.pem"), stale.pem()).expect("CA");
        assert!(!super::names_ipv6_loopback(
            &old.path().join("dev-cert.pem")
        ));
        super::dev_tls(old.path()).expect("made again");
        assert!(super::names_ipv6_loopback(&old.path().join("dev-cert.pem")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let served = tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.expect("accept");
                let _ = acceptor.accept(tcp).await;
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&ca).expect("CA");
        use rustls::pki_types::pem::PemObject as _;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.expect("a certificate")).expect("a root");
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            client::config::crypto_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        for name in ["localhost", "127.0.0.1"] {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from(name).expect("name");
            tokio_rustls::TlsConnector::from(std::sync::Arc::new(config.clone()))
                .connect(name, tcp)
                .await
                .expect("the dev CA's certificate is trusted");
        }
        served.abort();
    }

    /// The development keys are printed once, by the command, never by
    /// `Debug`.
    #[test]
    fn debug_prints_no_key() {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 9999).into();
        let out = super::DevOutput {
            vault_addr: addr,
            http_addr: addr,
            public_key: "pk".into(),
            data_dir: "d".into(),
            passphrase_file: "d/p".into(),
            admin_api_key: "fvk_a_not_for_logs".to_string().into(),
            writer_api_key: "fvk_w_not_for_logs".to_string().into(),
            partner_api_key: "fvk_p_not_for_logs".to_string().into(),
            auditor_api_key: "fvk_u_not_for_logs".to_string().into(),
            partner_id: "p".into(),
            demo_subject_id: "s".into(),
            demo_purpose: "x".into(),
            tls: false,
            ca_cert: None,
        };
        let text = format!("{out:?}");
        assert!(
            !text.contains("not_for_logs") && text.contains("redacted"),
            "{text}"
        );
    }
}
