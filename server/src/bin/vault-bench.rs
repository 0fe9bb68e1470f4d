//! `vault-bench`: throughput and latency of the fintrust-vault storage
//! engine, in the spirit of redis-benchmark and pgbench. The workloads live
//! in `server::bench`; this binary parses flags, runs one, and prints a
//! table (or one JSON object with `--format json`).
//!
//! ```text
//! vault-bench append [--embedded DIR] [--records N] [--size BYTES] [--clients C]
//!                    [--pipeline P] [--batch B] [--subjects S] [--duration SECS] [--baseline]
//! vault-bench verify [--embedded DIR] [--entries N] [--size BYTES] [--baseline]
//! ```
//!
//! Exit codes: 0 done, 1 error (bad flags included).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use server::bench::{self, AppendParams, Progress, Target, VerifyParams, Workload};

#[derive(Parser)]
#[command(
    name = "vault-bench",
    version,
    about = "Benchmark the fintrust-vault storage engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Output format: a table, or one JSON object on stdout.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Durable appends from concurrent clients: records/s and latency.
    Append(AppendArgs),
    /// Build a vault, then time `storage::verify` with the pinned key.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct TargetArgs {
    /// Run the storage engine in this process, with its data under DIR
    /// (default: a fresh temporary dir, removed afterwards).
    #[arg(long, value_name = "DIR")]
    embedded: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target::Embedded { dir: self.embedded }
    }
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Records to append [default: 200000].
    #[arg(long, value_name = "N")]
    records: Option<u64>,
    /// Plaintext bytes per record [default: 512].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Concurrent clients [default: 64].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Appends each client keeps in flight [default: 8].
    #[arg(long, value_name = "P")]
    pipeline: Option<usize>,
    /// Records per append_batch call [default: 1].
    #[arg(long, value_name = "B")]
    batch: Option<usize>,
    /// Distinct subjects [default: 10000].
    #[arg(long, value_name = "S")]
    subjects: Option<usize>,
    /// Stop after SECS even if fewer records were appended.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Also measure raw sled at the same durability.
    #[arg(long)]
    baseline: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Records in the vault to verify [default: 1000000].
    #[arg(long, value_name = "N")]
    entries: Option<u64>,
    /// Plaintext bytes per record [default: 512].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Distinct subjects [default: 10000].
    #[arg(long, value_name = "S")]
    subjects: Option<usize>,
    /// Tasks appending while the vault is built [default: 8].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Records per append_batch call while building [default: 1024].
    #[arg(long, value_name = "B")]
    batch: Option<usize>,
    /// Also measure BLAKE3 and ed25519 verify_strict on one core.
    #[arg(long)]
    baseline: bool,
}

impl Command {
    fn into_parts(self) -> anyhow::Result<(Target, Workload)> {
        Ok(match self {
            Command::Append(a) => {
                let d = AppendParams::default();
                let duration = a
                    .duration
                    .map(Duration::try_from_secs_f64)
                    .transpose()
                    .context("--duration takes a positive number of seconds")?;
                let p = AppendParams {
                    records: a.records.unwrap_or(d.records),
                    size: a.size.unwrap_or(d.size),
                    clients: a.clients.unwrap_or(d.clients),
                    pipeline: a.pipeline.unwrap_or(d.pipeline),
                    batch: a.batch.unwrap_or(d.batch),
                    subjects: a.subjects.unwrap_or(d.subjects),
                    duration,
                    baseline: a.baseline,
                };
                (a.target.target(), Workload::Append(p))
            }
            Command::Verify(v) => {
                let d = VerifyParams::default();
                let p = VerifyParams {
                    entries: v.entries.unwrap_or(d.entries),
                    size: v.size.unwrap_or(d.size),
                    subjects: v.subjects.unwrap_or(d.subjects),
                    build_clients: v.clients.unwrap_or(d.build_clients),
                    build_batch: v.batch.unwrap_or(d.build_batch),
                    baseline: v.baseline,
                };
                (v.target.target(), Workload::Verify(p))
            }
        })
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FINTRUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.format == "json";
    let (target, workload) = cli.command.into_parts()?;
    let progress = if std::io::stderr().is_terminal() {
        Progress::stderr()
    } else {
        Progress::hidden()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt.block_on(bench::run(&target, &workload, progress))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.table());
    }
    Ok(())
}
