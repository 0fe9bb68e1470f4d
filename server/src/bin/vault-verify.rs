//! `vault-verify`: prove, with nothing but the public key, that a vault's
//! log, derived state and key store were not altered.
//!
//! Exit codes: 0 intact, 1 integrity failure, 2 could not run.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use server::verify::{exit_code, summary, VerifyJson, EXIT_ERROR, STORED_KEY_WARNING};

#[derive(Parser)]
#[command(
    name = "vault-verify",
    version,
    about = "Verify a fintrust-vault data dir"
)]
struct Cli {
    /// The vault's data dir.
    #[arg(long, env = "FINTRUST_DATA_DIR")]
    data_dir: PathBuf,
    /// Hex of the vault's ed25519 public key, as `vaultd init` printed it.
    #[arg(long, env = "FINTRUST_PUBLIC_KEY")]
    public_key: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Output format (`--format json` is the same as `--json`).
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    format: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR as u8 } else { 0 });
        }
    };
    let json = cli.json || cli.format == "json";
    let public_key = match cli.public_key.as_deref().map(parse_key).transpose() {
        Ok(k) => k,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    if public_key.is_none() {
        eprintln!("warning: {STORED_KEY_WARNING}");
    }
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} entries ({per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let progress = |n: u64| {
        if let Some(b) = &bar {
            b.set_position(n);
        }
    };
    let total = |n: u64| {
        if let Some(b) = &bar {
            b.set_length(n);
        }
    };
    let opts = storage::VerifyOptions {
        public_key,
        progress: Some(&progress),
        total_hint: Some(&total),
    };
    let report = storage::verify(&cli.data_dir, &opts);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match report {
        Ok(r) => {
            if json {
                match serde_json::to_string(&VerifyJson::from(&r)) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EXIT_ERROR as u8);
                    }
                }
            } else {
                println!("{}", summary(&r));
            }
            ExitCode::from(exit_code(&r) as u8)
        }
        Err(e) => {
            eprintln!("error: could not verify {}: {e}", cli.data_dir.display());
            ExitCode::from(EXIT_ERROR as u8)
        }
    }
}

fn parse_key(s: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut b)
        .map_err(|_| "--public-key takes 64 hex digits".to_string())?;
    ed25519_dalek::VerifyingKey::from_bytes(&b)
        .map_err(|_| "--public-key is not a valid ed25519 key".to_string())
}
