//! `vault-verify`: prove, with nothing but the public key, that a vault's
//! log, derived state and key store were not altered (`--data-dir`), or
//! that the log a live server serves is the one its signed head and key
//! commit to (`--remote`), or that an export file (`vault-admin export`)
//! holds a log the key signed, whole (`--file`).
//!
//! Exit codes: 0 intact, 1 integrity failure, 2 could not run.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use client::eprintln_or_lose as eprintln;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgGroup, ArgMatches, CommandFactory, FromArgMatches, Parser};
use client::cli::ConnectArgs;
use server::remote::{RemoteOptions, DEFAULT_PAGE_ENTRIES, DEFAULT_SAMPLE_RECEIPTS};
use server::verify::{
    exit_code, file_summary, read_head_file, remote_summary, summary, write_head_file, VerifyJson,
    EXIT_ERROR, STORED_KEY_WARNING,
};

#[derive(Parser)]
#[command(
    name = "vault-verify",
    version,
    about = "Verify a fintrust-vault data dir, or a running vault over the wire",
    // One of the three is needed; which one, when the environment gives
    // one and the command line another, is `one_source`'s choice.
    group(ArgGroup::new("source").required(true).multiple(true).args(["data_dir", "remote", "file"]))
)]
struct Cli {
    /// The vault's data dir (stop vaultd first, or verify a copy).
    #[arg(long, env = "FINTRUST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// host:port of a running vault: verify the log it serves, with an
    /// auditor (or admin) API key.
    #[arg(long, env = "FINTRUST_REMOTE", value_name = "HOST:PORT")]
    remote: Option<String>,
    /// An export file written by `vault-admin export`: verify it offline
    /// against the pinned --public-key.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Remote mode: TLS, API key and timeout, as for vault-client.
    #[command(flatten)]
    connect: ConnectArgs,
    /// Remote mode: entries asked for per request.
    #[arg(long, default_value_t = DEFAULT_PAGE_ENTRIES, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    page_size: u32,
    /// Remote mode: receipts of random entries to check (one `Proof`
    /// request each), besides every group's signed head.
    #[arg(long, default_value_t = DEFAULT_SAMPLE_RECEIPTS as u32, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    sample_receipts: u32,
    /// Hex of the vault's ed25519 public key, as `vaultd init` printed it
    /// (required with --remote and --file).
    #[arg(long, env = "FINTRUST_PUBLIC_KEY")]
    public_key: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Output format (`--format json` is the same as `--json`).
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    format: String,
    /// A file that keeps the newest head verified: the log must still hold
    /// the head it holds (else `rolled_back` or `forked`, exit 1), and a
    /// log that verifies replaces it with its own head. Created on the
    /// first run. With --data-dir or --remote.
    #[arg(long, value_name = "FILE", conflicts_with = "file")]
    head_file: Option<PathBuf>,
    /// With --data-dir: write nothing to the dir (read-only storage, a
    /// snapshot, a backup). Its sled database is copied into a temporary
    /// dir (about the size of DIR/db), where what the open writes goes (the
    /// replay of a dir not closed cleanly). Chosen by itself when the dir
    /// cannot be written.
    #[arg(long, requires = "data_dir")]
    read_only: bool,
}

/// Leaves one source to verify: one given on the command line wins over
/// those the environment gives (`FINTRUST_DATA_DIR`, `FINTRUST_REMOTE`),
/// so that an exported data dir does not stand in the way of `--remote`
/// or `--file`; two on the command line, or two from the environment and
/// none on it, are refused.
fn one_source(cli: &mut Cli, matches: &ArgMatches) -> Result<(), String> {
    let flagged = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    match ["data_dir", "remote", "file"]
        .into_iter()
        .filter(|id| flagged(id))
        .count()
    {
        0 => {}
        1 => {
            if !flagged("data_dir") {
                cli.data_dir = None;
            }
            if !flagged("remote") {
                cli.remote = None;
            }
        }
        _ => return Err("give one of --data-dir, --remote and --file".into()),
    }
    if cli.data_dir.is_some() && cli.remote.is_some() {
        return Err(
            "FINTRUST_DATA_DIR and FINTRUST_REMOTE are both set: choose with --data-dir or --remote"
                .into(),
        );
    }
    if cli.read_only && cli.data_dir.is_none() {
        return Err("--read-only is for --data-dir".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    // What an open of a data dir has to say (a torn record dropped, a
    // crash's leftovers cut, a dir other users may read), on stderr.
    server::log_to_stderr("warn");
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let cli = match parsed {
        Ok((mut cli, matches)) => match one_source(&mut cli, &matches) {
            Ok(()) => cli,
            Err(msg) => {
                eprintln!("error: {msg}");
                return ExitCode::from(EXIT_ERROR as u8);
            }
        },
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR as u8 } else { 0 });
        }
    };
    let json = cli.json || cli.format == "json";
    let kept_head = match cli.head_file.as_deref().map(read_head_file).transpose() {
        Ok(k) => k.flatten(),
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    if let Some(Err(msg)) = cli
        .head_file
        .as_deref()
        .map(server::verify::check_head_file_dir)
    {
        eprintln!("error: {msg}");
        return ExitCode::from(EXIT_ERROR as u8);
    }
    if let (Some(path), None) = (&cli.head_file, kept_head) {
        // A first run, or a file lost (a wrong path, a temp dir emptied):
        // either way this run has nothing to check a rollback against.
        eprintln!(
            "warning: {} holds no head yet: no rollback is checked this run; the head verified now is kept there",
            path.display()
        );
    }
    let public_key = match cli.public_key.as_deref().map(parse_key).transpose() {
        Ok(k) => k,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    if let Some(addr) = &cli.remote {
        let Some(public_key) = public_key else {
            eprintln!("error: --remote needs the pinned --public-key (or FINTRUST_PUBLIC_KEY)");
            return ExitCode::from(EXIT_ERROR as u8);
        };
        return remote(&cli, addr, public_key, json, kept_head);
    }
    if let Some(file) = &cli.file {
        let Some(public_key) = public_key else {
            eprintln!("error: --file needs the pinned --public-key (or FINTRUST_PUBLIC_KEY)");
            return ExitCode::from(EXIT_ERROR as u8);
        };
        return export_file(file, &public_key, json);
    }
    let Some(data_dir) = &cli.data_dir else {
        eprintln!("error: pass --data-dir DIR or --remote HOST:PORT");
        return ExitCode::from(EXIT_ERROR as u8);
    };
    if public_key.is_none() {
        eprintln!("warning: {STORED_KEY_WARNING}");
    }
    // The scan frees and allocates sled's pages at a high rate, and the
    // process ends with it.
    server::alloc::keep_freed_memory();
    let bar = progress_bar(json);
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
        kept_head,
        // Every signature, always: the record of a verified prefix is
        // `Vault::open`'s, under the master key.
        verified_prefix: None,
    };
    let report = server::verify::open_data_dir(
        cli.read_only,
        || storage::verify(data_dir, &opts),
        |scratch| storage::verify_read_only(data_dir, scratch, &opts),
    );
    if let Ok((_, server::verify::Opened::ReadOnlyFallback, _)) = &report {
        eprintln!("{}", server::verify::fallback_note(data_dir));
    }
    let report = report.map(|(r, _, _)| r);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match report {
        Ok(r) => {
            let as_json = json.then(|| VerifyJson {
                kept_head_seq: kept_head.map(|k| k.last_seq),
                ..VerifyJson::from(&r)
            });
            finish(
                &r,
                as_json,
                || summary(&r),
                cli.head_file.as_deref().map(|p| (p, kept_head.as_ref())),
            )
        }
        Err(e) => {
            eprintln!("error: could not verify {}: {e}", data_dir.display());
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

/// A progress bar on an interactive stderr, for text output only.
fn progress_bar(json: bool) -> Option<indicatif::ProgressBar> {
    (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} entries ({per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// `--file`: verify an export file. A file that cannot be read, is not
/// an export or is of an unknown version could not be checked (exit 2);
/// damage past its magic is an integrity failure (exit 1).
fn export_file(path: &std::path::Path, key: &ed25519_dalek::VerifyingKey, json: bool) -> ExitCode {
    let outcome = std::fs::File::open(path)
        .map_err(storage::Error::from)
        .and_then(|f| storage::export::verify_export(f, key));
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: could not verify {}: {e}", path.display());
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    finish(
        &report.report,
        json.then(|| VerifyJson::from(&report)),
        || file_summary(&report),
        None,
    )
}

/// `--remote`: verify a live server's log over the wire protocol.
fn remote(
    cli: &Cli,
    addr: &str,
    public_key: ed25519_dalek::VerifyingKey,
    json: bool,
    kept_head: Option<storage::SignedHead>,
) -> ExitCode {
    let name = format!("vault-verify/{}", env!("CARGO_PKG_VERSION"));
    let config = match cli.connect.config(addr, name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    let bar = progress_bar(json);
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
    let opts = RemoteOptions {
        client: config,
        public_key,
        page_entries: cli.page_size,
        sample_receipts: cli.sample_receipts as usize,
        progress: Some(&progress),
        total_hint: Some(&total),
        kept_head,
    };
    let outcome = runtime.block_on(server::remote::verify_remote(&opts));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            // The server's words, escaped: a message it sends must not
            // move the terminal's cursor or hide what precedes it.
            eprintln!(
                "error: could not verify {addr}: {}",
                client::cli::printable(&server::error_chain(&e))
            );
            return ExitCode::from(EXIT_ERROR as u8);
        }
    };
    let as_json = json.then(|| VerifyJson {
        kept_head_seq: kept_head.map(|k| k.last_seq),
        ..VerifyJson::from(&report)
    });
    finish(
        &report.report,
        as_json,
        || remote_summary(&report),
        cli.head_file.as_deref().map(|p| (p, kept_head.as_ref())),
    )
}

/// Keeps the head of a log that verified in `head_file` (with the head it
/// held when read, which the log was checked against), then prints the
/// run, as one JSON object (`as_json`) or its one-line summary, and
/// returns the run's exit code.
fn finish(
    report: &storage::Report,
    as_json: Option<VerifyJson>,
    summary: impl FnOnce() -> String,
    head_file: Option<(&std::path::Path, Option<&storage::SignedHead>)>,
) -> ExitCode {
    let mut unkept = false;
    if let (true, Some((path, checked)), Some(head)) = (report.ok(), head_file, &report.signed_head)
    {
        match write_head_file(path, head, checked) {
            Ok(kept) => eprintln!("kept head: seq {} in {}", kept.last_seq, path.display()),
            // The run's result is printed all the same; the exit says the
            // head was not kept.
            Err(e) => {
                eprintln!("error: cannot keep the head in {}: {e}", path.display());
                unkept = true;
            }
        }
    }
    for note in server::verify::notes(report) {
        eprintln!("{note}");
    }
    let printed = match as_json.map(|j| serde_json::to_string(&j)) {
        Some(Ok(s)) => client::cli::print_line(&s),
        Some(Err(e)) => Err(e.into()),
        None => client::cli::print_line(&summary()),
    };
    if let Err(e) = printed {
        eprintln!("error: {e:#}");
        // An integrity failure keeps its exit code, printed or not.
        if report.ok() {
            return ExitCode::from(EXIT_ERROR as u8);
        }
    }
    if unkept {
        return ExitCode::from(EXIT_ERROR as u8);
    }
    ExitCode::from(exit_code(report) as u8)
}
