//! `vaultd`: the fintrust-vault server. Subcommands: `init`, `dev`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        server::secrets::unlock_from(self.passphrase_file.as_deref(), self.key_file.as_deref())
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
    /// Serve the wire protocol (port 9999) for an existing vault.
    Serve {
        #[command(flatten)]
        vault: VaultArgs,
        /// Address to listen on.
        #[arg(long, env = "FINTRUST_LISTEN", default_value = "127.0.0.1:9999")]
        listen: String,
        /// PEM certificate chain of the server.
        #[arg(long, env = "FINTRUST_TLS_CERT")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the server.
        #[arg(long, env = "FINTRUST_TLS_KEY")]
        tls_key: Option<PathBuf>,
        /// PEM CA certificates: require client certificates issued by them.
        #[arg(long, env = "FINTRUST_TLS_CLIENT_CA")]
        tls_client_ca: Option<PathBuf>,
        /// Serve without TLS. Only for loopback tests and development.
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Embedded demo: create a vault in a local data dir with a dev
    /// passphrase, write demo records, and verify it.
    Dev {
        /// Data dir (default: ./vault-data).
        #[arg(long, env = "FINTRUST_DATA_DIR", default_value = "vault-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        format: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FINTRUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
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
            let (vault, out) =
                server::init::init(vault.data_dir, &unlock, storage::Options::default())?;
            vault.close()?;
            if json || format == "json" {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!(
                    "Created vault {} in {}",
                    out.vault_id,
                    out.data_dir.display()
                );
                println!("Public key (pin it for vault-verify): {}", out.public_key);
                println!(
                    "Admin API key (shown once, stored only as a hash): {}",
                    out.admin_api_key
                );
            }
        }
        Command::Serve {
            vault,
            listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            insecure_plaintext,
        } => {
            let tls = match (tls_cert, tls_key, insecure_plaintext) {
                (Some(cert), Some(key), false) => Some(server::tls::server_config(&server::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: tls_client_ca,
                })?),
                (None, None, true) => None,
                (_, _, true) => anyhow::bail!("--insecure-plaintext excludes the TLS options"),
                _ => anyhow::bail!(
                    "give --tls-cert and --tls-key (or --insecure-plaintext for loopback development without TLS)"
                ),
            };
            let unlock = vault.unlock()?;
            let vault =
                storage::Vault::open(&vault.data_dir, &unlock, storage::Options::default())?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(vault, &listen, tls))?;
        }
        Command::Dev {
            data_dir,
            json,
            format,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let out = rt.block_on(server::dev::run(&data_dir))?;
            if json || format == "json" {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("Dev vault in {}", out.data_dir.display());
                println!("  passphrase file: {}", out.passphrase_file.display());
                println!("  public key:      {}", out.public_key);
                println!("  admin API key:   {}", out.admin_api_key);
                println!(
                    "  entries:         {} (verified: {})",
                    out.entries, out.verified
                );
                println!();
                println!("Verify it yourself:");
                println!(
                    "  cargo run --release --bin vault-verify -- --data-dir {} --public-key {}",
                    out.data_dir.display(),
                    out.public_key
                );
            }
            if !out.verified {
                anyhow::bail!("the dev vault did not verify");
            }
        }
    }
    Ok(())
}

async fn serve(
    vault: storage::Vault,
    listen: &str,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let vault = std::sync::Arc::new(vault);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    if tls.is_none() {
        tracing::warn!(%addr, "serving WITHOUT TLS (--insecure-plaintext): loopback and development only");
    } else {
        tracing::info!(%addr, "serving over TLS");
    }
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    server::serve::run(
        listener,
        vault.clone(),
        server::serve::ServeConfig::default(),
        tls,
        shutdown,
    )
    .await?;
    // Let in-flight requests finish and drop their handles, then flush.
    for _ in 0..100 {
        if std::sync::Arc::strong_count(&vault) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    match std::sync::Arc::try_unwrap(vault) {
        Ok(v) => v.close()?,
        Err(_) => tracing::warn!(
            "requests still running at shutdown; the log is flushed as the process exits"
        ),
    }
    Ok(())
}
