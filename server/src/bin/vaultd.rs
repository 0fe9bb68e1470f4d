//! `vaultd`: the fintrust-vault server. Subcommands: `init`, `serve`,
//! `shim`, `dev`, and `rotate-master-key` (offline).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use client::eprintln_or_lose as eprintln;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use client::cli::print_line;

#[derive(Parser)]
#[command(
    name = "vaultd",
    version,
    about = "fintrust-vault: a privacy vault for financial data sharing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a vault is and what unseals it (`init` and `serve`).
#[derive(clap::Args)]
struct VaultArgs {
    /// The vault's data dir.
    #[arg(long, env = "FINTRUST_DATA_DIR")]
    data_dir: PathBuf,
    /// File holding the passphrase that seals the master key.
    #[arg(long, env = "FINTRUST_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
    /// File holding a 32-byte key (raw or hex) instead of a passphrase.
    #[arg(long, env = "FINTRUST_KEY_FILE")]
    key_file: Option<PathBuf>,
}

impl VaultArgs {
    fn unlock(&self) -> server::Result<storage::Unlock> {
        server::secrets::unlock_from_args(self.passphrase_file.as_deref(), self.key_file.as_deref())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a vault: signing key, sealed master key, genesis entry, admin credential.
    Init {
        #[command(flatten)]
        vault: VaultArgs,
        /// Print one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Output format (`--format json` is the same as `--json`).
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Rotate the master key of a stopped vault: re-wrap every key under a
    /// new master key sealed by the new passphrase or key file (records are
    /// not re-encrypted). Afterwards only the new secret opens the vault.
    RotateMasterKey {
        /// The data dir and the current secret.
        #[command(flatten)]
        vault: VaultArgs,
        /// File holding the new passphrase.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        /// File holding the new 32-byte key (raw or hex) instead.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
    /// Serve an existing vault: the wire protocol (port 9999) and the HTTP
    /// policy shim (port 8080).
    Serve {
        #[command(flatten)]
        vault: VaultArgs,
        /// Address of the wire protocol.
        #[arg(long, env = "FINTRUST_LISTEN", default_value = "127.0.0.1:9999")]
        listen: String,
        /// Address of the HTTP shim.
        #[arg(long, env = "FINTRUST_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
        http_listen: String,
        /// Do not serve the HTTP shim.
        #[arg(long)]
        no_http: bool,
        /// Connections one credential holds at once on the protocol port:
        /// one more is refused (`unavailable`), so that one key cannot
        /// take every slot of --max-connections.
        #[arg(long, env = "FINTRUST_MAX_CONNECTIONS_PER_CREDENTIAL", value_name = "N",
              default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
        max_connections_per_credential: u32,
        /// The vault address `/v1/authorize` tells partners (default: --listen).
        #[arg(long, env = "FINTRUST_PUBLIC_VAULT_ADDR")]
        public_vault_addr: Option<String>,
        /// TOML file of partner policies, written to the log at start where they differ
        /// (through the HTTP shim: not with --no-http).
        #[arg(long, env = "FINTRUST_POLICIES", conflicts_with = "no_http")]
        policies: Option<PathBuf>,
        #[command(flatten)]
        http_proxies: HttpProxyArgs,
        #[command(flatten)]
        tcp_proxies: TcpProxyArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        rotation: RotationArgs,
        /// Entries between writes of the derived state (indexes), which is
        /// also written every 5 s; the next open after a crash replays at
        /// most this many.
        #[arg(long, env = "FINTRUST_INDEX_BATCH", default_value_t = storage::Options::default().index_batch)]
        index_batch: u64,
        /// Capacity of the storage engine's page cache, in MiB (at least 1).
        #[arg(long, env = "FINTRUST_CACHE_MIB", value_name = "MIB",
              default_value_t = storage::DEFAULT_CACHE_BYTES >> 20,
              value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        cache_mib: u64,
        /// Size at which a write-ahead segment is closed and the storage
        /// engine made durable up to it (a checkpoint), in KiB (at least
        /// 4); the next open after a crash replays at most about this much.
        #[arg(long, env = "FINTRUST_WAL_SEGMENT_KIB", value_name = "KIB",
              default_value_t = storage::wal::SEGMENT_BYTES >> 10,
              value_parser = clap::value_parser!(u64).range(4..=1 << 30))]
        wal_segment_kib: u64,
        /// Most entries in one commit group (1 to 131,072); a request is
        /// never split (docs/storage.md, section 4). Larger groups write the log to
        /// the storage engine in larger pieces, which takes less disk for
        /// bulk loads, but under heavy load the stages of a commit overlap
        /// less (docs/benchmarks.md, "Commit groups bounded").
        #[arg(long, env = "FINTRUST_MAX_GROUP_ENTRIES", value_name = "N",
              default_value_t = storage::Options::default().max_group_entries,
              value_parser = clap::value_parser!(u64).range(1..=storage::vault::MAX_GROUP_ITEMS as u64)
                  .map(|n| n as usize))]
        max_group_entries: usize,
        /// A commit group closes once its requests carry this many KiB of
        /// records and payloads (1 to 1,048,576).
        #[arg(long, env = "FINTRUST_MAX_GROUP_KIB", value_name = "KIB",
              default_value_t = storage::Options::default().max_group_bytes >> 10,
              value_parser = clap::value_parser!(u64).range(1..=1 << 20)
                  .map(|n| n as usize))]
        max_group_kib: usize,
    },
    /// Serve only the HTTP policy shim, in front of a vault in another process.
    Shim {
        /// The vault's protocol address.
        #[arg(long, env = "FINTRUST_ADDR", default_value = "127.0.0.1:9999")]
        vault: String,
        /// File holding the gateway API key the shim uses with the vault.
        #[arg(long, env = "FINTRUST_API_KEY_FILE")]
        api_key_file: PathBuf,
        /// PEM CA certificate of the vault's TLS certificate.
        #[arg(long, env = "FINTRUST_CACERT")]
        cacert: Option<PathBuf>,
        /// Name the vault's certificate carries (default: the host of --vault).
        #[arg(long, env = "FINTRUST_SERVER_NAME", visible_alias = "server-name")]
        tls_server_name: Option<String>,
        /// PEM client certificate chain the shim presents to a vault that
        /// requires mutual TLS (`vaultd serve --tls-client-ca`).
        #[arg(long, env = "FINTRUST_CLIENT_CERT", requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// PEM private key of --client-cert.
        #[arg(long, env = "FINTRUST_CLIENT_KEY", requires = "client_cert")]
        client_key: Option<PathBuf>,
        /// Address of the HTTP shim.
        #[arg(long, env = "FINTRUST_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
        http_listen: String,
        /// The vault address `/v1/authorize` tells partners (default: --vault).
        #[arg(long, env = "FINTRUST_PUBLIC_VAULT_ADDR")]
        public_vault_addr: Option<String>,
        #[arg(long, env = "FINTRUST_POLICIES")]
        policies: Option<PathBuf>,
        #[command(flatten)]
        http_proxies: HttpProxyArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
        /// TLS of the HTTP port (and, with --insecure-plaintext and no --cacert, plaintext
        /// to the vault too).
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Development server: a fresh vault with demo data, keys and policy,
    /// serving both ports on loopback until interrupted.
    Dev {
        /// Data dir (default: a new folder under the system temp dir).
        /// Not taken from FINTRUST_DATA_DIR, which names a real vault's.
        /// A dev vault given again is reopened, with new API keys: the
        /// ones an earlier run printed are revoked.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of the wire protocol.
        #[arg(long, default_value = "127.0.0.1:9999")]
        listen: String,
        /// Address of the HTTP shim.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: String,
        /// Serve both ports over TLS with a generated dev certificate
        /// (its CA is written to DATA_DIR/dev-ca.pem).
        #[arg(long)]
        tls: bool,
        /// Print one JSON object on the first line of stdout.
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
        #[command(flatten)]
        http_proxies: HttpProxyArgs,
        #[command(flatten)]
        tcp_proxies: TcpProxyArgs,
    },
}

/// Reverse proxies in front of the HTTP shim.
#[derive(clap::Args)]
struct HttpProxyArgs {
    /// A reverse proxy in front of the HTTP shim, as an address or CIDR
    /// network (repeat the option; comma-separated in the environment):
    /// from such a peer, the --forwarded-header names the client whose
    /// address a policy's `source_ips` must hold (docs/http.md).
    #[arg(long = "trusted-proxy", env = "FINTRUST_TRUSTED_PROXIES",
          value_name = "CIDR", value_delimiter = ',', value_parser = network)]
    trusted_proxies: Vec<String>,
    /// The header the trusted proxies name the client in: X-Forwarded-For,
    /// or RFC 7239's Forwarded. Only this one is read.
    #[arg(long, env = "FINTRUST_FORWARDED_HEADER", value_name = "HEADER",
          value_parser = clap::builder::PossibleValuesParser::new(["x-forwarded-for", "forwarded"])
              .try_map(|s| s.parse::<server::proxied::forwarded::ForwardedHeader>()),
          default_value = "x-forwarded-for")]
    forwarded_header: server::proxied::forwarded::ForwardedHeader,
}

impl HttpProxyArgs {
    fn config(
        &self,
    ) -> anyhow::Result<(
        server::proxied::TrustedProxies,
        server::proxied::forwarded::ForwardedHeader,
    )> {
        Ok((trusted(&self.trusted_proxies)?, self.forwarded_header))
    }
}

/// TCP proxies in front of the protocol port.
#[derive(clap::Args)]
struct TcpProxyArgs {
    /// A TCP proxy in front of the protocol port, as an address or CIDR
    /// network (repeat the option; comma-separated in the environment):
    /// each connection from it must begin with a PROXY protocol header
    /// (v1 or v2), whose client address the partner's `source_ips` must
    /// hold (docs/protocol.md, "Behind a TCP proxy").
    #[arg(long = "proxy-protocol-from", env = "FINTRUST_PROXY_PROTOCOL_FROM",
          value_name = "CIDR", value_delimiter = ',', value_parser = network)]
    proxy_protocol_from: Vec<String>,
}

/// How many connections each served port takes at once.
#[derive(clap::Args)]
struct LimitArgs {
    /// Connections served at once on each port (the protocol's and the
    /// HTTP shim's). One more waits for a slot once authenticated, within
    /// its first 10 s, then is refused: `unavailable`, on HTTP 503 `busy`;
    /// `fintrust_connections_turned_away_total` counts the refusals.
    #[arg(long, env = "FINTRUST_MAX_CONNECTIONS", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Connections one client address (an IPv4 address, an IPv6 /64)
    /// holds slots with at once on the HTTP port, --trusted-proxy
    /// addresses excepted: a request on one more is answered 503 `busy`,
    /// so that one host cannot take every slot of --max-connections.
    #[arg(long, env = "FINTRUST_HTTP_MAX_CONNECTIONS_PER_PEER", value_name = "N",
          default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    http_max_connections_per_peer: u32,
    /// Longest lifetime of a one-time token, in seconds (1 to 86,400): a
    /// `Mint` asking for more is refused (`invalid`), the default of 300 s
    /// is cut to it, and the shim grants no more and accepts no policy
    /// whose `max_token_ttl_secs` is over it.
    #[arg(long, env = "FINTRUST_MAX_TOKEN_TTL_SECS", value_name = "SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(server::serve::MAX_TOKEN_TTL_SECS)))]
    max_token_ttl_secs: u32,
    /// A partner's refusals by `/v1/authorize` that the shim records an
    /// `access_denied` entry each, a minute at most, in bursts of as many.
    /// Past it, a refusal is answered 429 `rate_limited` without its
    /// reason, and counted: the count is recorded once a minute
    /// (docs/http.md). So a partner's key cannot grow the log faster.
    #[arg(long, env = "FINTRUST_RECORDED_DENIALS_PER_MINUTE", value_name = "N",
          default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..))]
    recorded_denials_per_minute: u32,
}

impl LimitArgs {
    fn max_connections(&self) -> usize {
        usize::try_from(self.max_connections).unwrap_or(usize::MAX)
    }

    fn http_max_connections_per_peer(&self) -> usize {
        usize::try_from(self.http_max_connections_per_peer).unwrap_or(usize::MAX)
    }
}

#[derive(clap::Args)]
struct MetricsArgs {
    /// File holding the key `GET /metrics` asks for as `Authorization:
    /// Bearer <key>` (32 to 256 printable ASCII characters, no spaces, e.g. `openssl rand
    /// -hex 32`; Prometheus sends it with `authorization: {credentials_file:
    /// FILE}`); only its hash is kept. Without it, the metrics are served to
    /// whoever reaches the HTTP port.
    #[arg(long, env = "FINTRUST_METRICS_KEY_FILE", value_name = "FILE")]
    metrics_key_file: Option<PathBuf>,
}

impl MetricsArgs {
    fn key(&self) -> anyhow::Result<Option<server::shim::MetricsKey>> {
        let Some(file) = &self.metrics_key_file else {
            return Ok(None);
        };
        let key = server::secrets::read_secret_file(file)?;
        server::shim::MetricsKey::new(&key)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
    }
}

/// The rotation policy: `vaultd` warns at start, and `vault-admin status`
/// warns, about keys older than these.
#[derive(clap::Args)]
struct RotationArgs {
    /// Maximum age of the signing key, in days (0: none).
    #[arg(long, env = "FINTRUST_MAX_SIGNING_KEY_AGE_DAYS", default_value_t = 0)]
    max_signing_key_age_days: u64,
    /// Maximum age of an active subject data key, in days (0: none).
    #[arg(long, env = "FINTRUST_MAX_SUBJECT_KEY_AGE_DAYS", default_value_t = 0)]
    max_subject_key_age_days: u64,
}

impl RotationArgs {
    fn policy(&self) -> server::serve::RotationPolicy {
        let days =
            |d: u64| (d > 0).then(|| std::time::Duration::from_secs(d.saturating_mul(86_400)));
        server::serve::RotationPolicy {
            max_signing_key_age: days(self.max_signing_key_age_days),
            max_subject_key_age: days(self.max_subject_key_age_days),
        }
    }
}

/// TLS of the served ports.
#[derive(clap::Args)]
struct TlsArgs {
    /// PEM certificate chain of the server.
    #[arg(long, env = "FINTRUST_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the server.
    #[arg(long, env = "FINTRUST_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: require client certificates issued by them
    /// (read again on SIGHUP, with the certificate and key).
    #[arg(long, env = "FINTRUST_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Serve without TLS. Only for loopback tests and development.
    #[arg(long)]
    insecure_plaintext: bool,
}

impl TlsArgs {
    /// The server's TLS, read again on SIGHUP; `None` in plaintext.
    fn config(self) -> anyhow::Result<Option<server::tls::ServerTls>> {
        Ok(match (self.tls_cert, self.tls_key, self.insecure_plaintext) {
            (Some(cert), Some(key), false) => Some(server::tls::ServerTls::open(
                &server::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: self.tls_client_ca,
                },
            )?),
            (None, None, true) if self.tls_client_ca.is_none() => {
                tracing::warn!("serving WITHOUT TLS (--insecure-plaintext): loopback and development only");
                None
            }
            (_, _, true) => anyhow::bail!("--insecure-plaintext excludes the TLS options"),
            _ => anyhow::bail!(
                "give --tls-cert and --tls-key (or --insecure-plaintext for loopback development without TLS)"
            ),
        })
    }
}

/// The `--policies` file, each policy checked against the token lifetime
/// ceiling (`--max-token-ttl-secs`), as a policy set over HTTP is.
fn read_policies(
    path: Option<PathBuf>,
    max_token_ttl_secs: u32,
) -> anyhow::Result<Option<server::shim::PoliciesFile>> {
    let Some(path) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file = server::shim::PoliciesFile::parse(&text, max_token_ttl_secs)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(file))
}

/// A `--trusted-proxy` or `--proxy-protocol-from` value, checked as the
/// command line is read. A blank one (an empty variable) names none.
fn network(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Ok(String::new());
    }
    server::proxied::TrustedProxies::parse(&[s]).map(|_| s.to_string())
}

/// The networks of `--trusted-proxy` or `--proxy-protocol-from`.
fn trusted(networks: &[String]) -> anyhow::Result<server::proxied::TrustedProxies> {
    let networks: Vec<&String> = networks.iter().filter(|n| !n.is_empty()).collect();
    server::proxied::TrustedProxies::parse(&networks).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() -> ExitCode {
    let purge_delay_ms = server::alloc::return_freed_memory();
    let huge_pages_off = server::alloc::without_huge_pages();
    server::log_to_stderr("info");
    tracing::debug!(purge_delay_ms, huge_pages_off, "allocator");
    match server::failpoints::arm_from_env() {
        Ok(0) => {}
        Ok(n) => tracing::warn!("{n} failpoints armed (a test build)"),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    // A usage error is a local error (exit 1), as in the other binaries:
    // clap's own exit code, 2, means a refusal by the server here.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            vault,
            json,
            format,
        } => {
            let unlock = vault.unlock()?;
            let json = json || format == "json";
            server::init::create_and_show(
                vault.data_dir,
                &unlock,
                storage::Options::default(),
                |out| {
                    let line = zeroize::Zeroizing::new(if json {
                        serde_json::to_string(out).map_err(std::io::Error::other)?
                    } else {
                        format!(
                            "Created vault {} in {}\n\
                             Public key (pin it for vault-verify): {}\n\
                             Admin API key (shown once, stored only as a hash): {}",
                            out.vault_id,
                            out.data_dir.display(),
                            out.public_key,
                            out.admin_api_key.expose()
                        )
                    });
                    client::cli::write_line(&line)
                },
            )?;
        }
        Command::RotateMasterKey {
            vault,
            new_passphrase_file,
            new_key_file,
            format,
        } => {
            let old = vault.unlock()?;
            let new = server::secrets::unlock_from(
                new_passphrase_file.as_deref(),
                new_key_file.as_deref(),
            )
            .context("the new secret (--new-passphrase-file or --new-key-file)")?;
            let out = server::init::rotate_master_key(
                vault.data_dir,
                &old,
                &new,
                storage::Options::default(),
            )?;
            let printed = if format == "json" {
                serde_json::to_string(&out)
                    .map_err(anyhow::Error::from)
                    .and_then(|line| print_line(&line))
            } else {
                print_line(&format!(
                    "Rotated the master key of {} (key_rotated entry at seq {}); only the new secret opens it now",
                    out.data_dir.display(),
                    out.seq
                ))
            };
            // The rotation is durable: a lost output must not leave the
            // operator thinking the old secret still opens the vault.
            printed.inspect_err(|_| {
                eprintln!(
                    "note: {}",
                    server::init::rotated_but(out.seq, "printing its result")
                )
            })?;
        }
        Command::Serve {
            vault,
            listen,
            http_listen,
            no_http,
            max_connections_per_credential,
            public_vault_addr,
            policies,
            http_proxies,
            tcp_proxies,
            limits,
            metrics,
            tls,
            rotation,
            index_batch,
            cache_mib,
            wal_segment_kib,
            max_group_entries,
            max_group_kib,
        } => {
            // SIGHUP is taken (not the end of the process) from here on,
            // through the open of the vault, however long it takes.
            let rt = tokio::runtime::Runtime::new()?;
            let hangups = {
                let _runtime = rt.enter();
                server::tls::Hangups::listen()
            };
            let tls = tls.config()?;
            let policies = read_policies(policies, limits.max_token_ttl_secs)?;
            let metrics_key = metrics.key()?;
            let (trusted_proxies, forwarded_header) = http_proxies.config()?;
            let proxy_protocol_from = trusted(&tcp_proxies.proxy_protocol_from)?;
            // The ports first: one in use is said now, not after the open.
            let (listen_hint, http_hint) = (
                format!("listening on {listen} (choose another with --listen)"),
                format!("listening on {http_listen} (choose another with --http-listen)"),
            );
            let mut addrs = vec![listen.as_str()];
            if !no_http {
                addrs.push(http_listen.as_str());
            }
            rt.block_on(server::daemon::check_listenable(&addrs))
                .map_err(|(i, e)| {
                    anyhow::Error::new(e).context(if i == 0 {
                        listen_hint.clone()
                    } else {
                        http_hint.clone()
                    })
                })?;
            let unlock = vault.unlock()?;
            let options = move || storage::Options {
                index_batch,
                cache_bytes: cache_mib << 20,
                wal_segment_bytes: wal_segment_kib << 10,
                max_group_entries,
                max_group_bytes: max_group_kib << 10,
                ..storage::Options::default()
            };
            // The open verifies the whole log: freed memory stays committed
            // meanwhile, and is given back once the server is about to serve.
            tracing::info!(data_dir = %vault.data_dir.display(), "opening the vault (its whole log is verified first)");
            server::failpoints::before_open();
            let opened = server::alloc::scanning(|| {
                storage::Vault::open(&vault.data_dir, &unlock, options())
            })?;
            drop(unlock);
            // After a failed write or fsync: the same open, the secret read again.
            let reopen =
                server::live::Reopen::new(vault.data_dir.clone(), move || vault.unlock(), options);
            rt.block_on(async {
                server::tls::reload_on(hangups, tls.clone());
                server::tls::warn_before_expiry(tls.clone());
                let protocol = tokio::net::TcpListener::bind(&listen)
                    .await
                    .context(listen_hint)?;
                let http = if no_http {
                    None
                } else {
                    Some(
                        tokio::net::TcpListener::bind(&http_listen)
                            .await
                            .context(http_hint)?,
                    )
                };
                let unspecified = listen
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.ip().is_unspecified());
                if public_vault_addr.is_none() && unspecified && !no_http {
                    tracing::warn!(
                        listen = %listen,
                        "/v1/authorize tells partners to redeem at --listen, which names every \
                         interface and none they can reach: give theirs with --public-vault-addr"
                    );
                }
                let shim = server::shim::ShimConfig {
                    vault_addr: public_vault_addr.unwrap_or(listen),
                    trusted_proxies,
                    forwarded_header,
                    max_connections: limits.max_connections(),
                    max_connections_per_peer: limits.http_max_connections_per_peer(),
                    max_token_ttl_secs: limits.max_token_ttl_secs,
                    recorded_denials_per_minute: limits.recorded_denials_per_minute,
                    metrics_key,
                    ..Default::default()
                };
                let d = server::daemon::Daemon {
                    protocol,
                    http,
                    tls,
                    serve: server::serve::ServeConfig {
                        rotation: rotation.policy(),
                        proxy_protocol_from,
                        max_connections: limits.max_connections(),
                        max_connections_per_credential: usize::try_from(
                            max_connections_per_credential,
                        )
                        .unwrap_or(usize::MAX),
                        max_token_ttl: std::time::Duration::from_secs(
                            limits.max_token_ttl_secs.into(),
                        ),
                        ..Default::default()
                    },
                    shim,
                    policies,
                    reopen: Some(reopen),
                };
                server::daemon::run(
                    opened,
                    d,
                    |b| {
                        tracing::info!(protocol = %b.protocol, http = ?b.http, "vaultd ready");
                        Ok(())
                    },
                    server::daemon::signal_then_hurry(),
                )
                .await?;
                anyhow::Ok(())
            })?;
        }
        Command::Shim {
            vault,
            api_key_file,
            cacert,
            tls_server_name,
            client_cert,
            client_key,
            http_listen,
            public_vault_addr,
            policies,
            http_proxies,
            limits,
            metrics,
            tls,
        } => {
            let plaintext = tls.insecure_plaintext;
            let http_tls = tls.config()?;
            let policies = read_policies(policies, limits.max_token_ttl_secs)?;
            let metrics_key = metrics.key()?;
            let (trusted_proxies, forwarded_header) = http_proxies.config()?;
            let key = server::secrets::read_secret_file(&api_key_file)?;
            let vault_tls = match (cacert, plaintext) {
                (Some(ca), _) => client::Tls::Ca {
                    ca_pem_file: ca,
                    server_name: tls_server_name
                        .unwrap_or_else(|| client::config::host_of(&vault).to_string()),
                    client_cert: client_cert.zip(client_key),
                },
                (None, _) if client_cert.is_some() => {
                    anyhow::bail!("--client-cert needs the vault's TLS (--cacert)")
                }
                (None, true) => client::Tls::Plaintext,
                (None, false) => {
                    anyhow::bail!("give --cacert for the vault's TLS (or --insecure-plaintext)")
                }
            };
            if vault_tls == client::Tls::Plaintext && !client::config::is_loopback(&vault) {
                tracing::warn!(
                    vault = %vault,
                    "--insecure-plaintext to a vault that is not on this machine: the shim's key \
                     and every admin's and auditor's key it passes on cross the network in the clear"
                );
            }
            let link_config = client::ClientConfig {
                addr: vault.clone(),
                tls: vault_tls,
                api_key: key,
                client_name: "vaultd-shim".into(),
                timeout: std::time::Duration::from_secs(10),
            };
            // Its TLS files read now: a wrong --cacert or client
            // certificate is said at start, not at every request.
            client::Connector::new(link_config.clone())
                .context("the vault's TLS (--cacert, --client-cert, --client-key)")?;
            let link = server::shim::VaultLink::new(link_config);
            let shim = server::shim::Shim::new(
                link,
                server::shim::ShimConfig {
                    vault_addr: public_vault_addr.unwrap_or(vault),
                    trusted_proxies,
                    forwarded_header,
                    max_connections: limits.max_connections(),
                    max_connections_per_peer: limits.http_max_connections_per_peer(),
                    max_token_ttl_secs: limits.max_token_ttl_secs,
                    recorded_denials_per_minute: limits.recorded_denials_per_minute,
                    metrics_key,
                    ..Default::default()
                },
            );
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                server::tls::reload_on_hangup(http_tls.clone());
                server::tls::warn_before_expiry(http_tls.clone());
                // The port first: one in use is said before the policies
                // are written to the vault's log.
                let listener = tokio::net::TcpListener::bind(&http_listen)
                    .await
                    .with_context(|| {
                        format!("listening on {http_listen} (choose another with --http-listen)")
                    })?;
                if let Some(file) = &policies {
                    server::shim::apply_policies(&shim, file)
                        .await
                        .context("loading the policies file")?;
                }
                let bound = listener.local_addr()?;
                // The vault's idle timeout would close the gateway's
                // connection between requests.
                let _kept = shim.link.keep_alive(server::shim::link::KEEP_ALIVE_EVERY);
                let shutdown = server::daemon::signal_then_hurry();
                let open_files = server::daemon::raise_open_files_limit();
                tracing::info!(http = %bound, vault = %shim.config.vault_addr, ?open_files, "shim ready");
                server::shim::serve(listener, shim, http_tls, shutdown).await?;
                anyhow::Ok(())
            })?;
        }
        Command::Dev {
            data_dir,
            listen,
            http_listen,
            tls,
            json,
            format,
            http_proxies,
            tcp_proxies,
        } => {
            let json = json || format == "json";
            let (trusted_proxies, forwarded_header) = http_proxies.config()?;
            let proxy_protocol_from = trusted(&tcp_proxies.proxy_protocol_from)?;
            let rt = tokio::runtime::Runtime::new()?;
            let _runtime = rt.enter();
            server::tls::reload_on_hangup(None);
            rt.block_on(server::dev::run(
                server::dev::DevOptions {
                    data_dir,
                    listen,
                    http_listen,
                    tls,
                    trusted_proxies,
                    forwarded_header,
                    proxy_protocol_from,
                },
                // The API keys are shown only here: a vault nobody can
                // reach stops rather than serve.
                |out| {
                    let line = if json {
                        serde_json::to_string(&out).map_err(std::io::Error::other)
                    } else {
                        Ok(server::dev::walkthrough(&out))
                    };
                    line.and_then(|l| client::cli::write_line(&l))
                        .map_err(|error| server::Error::File {
                            path: "stdout".into(),
                            error,
                        })
                },
                server::daemon::signal_then_hurry,
            ))?;
        }
    }
    Ok(())
}
