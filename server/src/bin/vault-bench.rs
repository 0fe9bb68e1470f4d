//! `vault-bench`: throughput and latency of the fintrust-vault storage
//! engine, protocol server and HTTP shim, in the spirit of redis-benchmark
//! and pgbench. The workloads live in `server::bench`; this binary parses
//! flags, runs one, and prints a table (or one JSON object with
//! `--format json`). Diagnostics go to stderr.
//!
//! ```text
//! vault-bench append [--embedded DIR] [--records N] [--size BYTES] [--clients C]
//!                    [--pipeline P] [--batch B] [--subjects S] [--duration SECS] [--baseline]
//!                    [--protocol [--tls]]
//!                    [--addr HOST:PORT --api-key KEY (--cacert FILE | --insecure-plaintext)]
//!                    [--redis]   (with --protocol or --addr, --pipeline 1: Redis SET next to it)
//!                    [--postgres CONNINFO]   (the same: PostgreSQL INSERT next to it)
//! vault-bench verify [--embedded DIR] [--entries N] [--size BYTES] [--baseline] [--remote]
//! vault-bench redeem [--embedded DIR] [--tls] [--clients 50] [--tokens N] [--redis] [--rate R]
//!                    [--addr HOST:PORT --api-key ADMIN_KEY (--cacert FILE | --insecure-plaintext)]
//!                    [--postgres CONNINFO]   (PostgreSQL DELETE ... RETURNING next to it)
//! vault-bench authorize [--embedded DIR] [--clients 50] [--requests N] [--duration SECS] [--rate R]
//! vault-bench mixed [--embedded DIR] [--ratio 8:1:1] [--clients 50] [--requests N]
//!                   [--duration SECS] [--size BYTES] [--subjects S] [--tls] [--baseline]
//! vault-bench growth [--embedded DIR] [--sizes N,N,...] [--size BYTES] [--clients C]
//!                    [--pipeline P] [--window N] [--redemptions N]
//! ```
//!
//! Exit codes: 0 done, 1 local error (bad flags included), 2 refused by
//! the server it ran against (`--addr`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use client::eprintln_or_lose as eprintln;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use server::bench::{
    self, AppendParams, AuthorizeParams, GrowthParams, MixedParams, Progress, Ratio, RedeemParams,
    Target, VerifyParams, Workload,
};

#[derive(Parser)]
#[command(
    name = "vault-bench",
    version,
    about = "Benchmark the fintrust-vault storage engine, protocol server and HTTP shim"
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
    /// Redemptions over the protocol, a new connection per token.
    Redeem(RedeemArgs),
    /// POST /v1/authorize through the HTTP shim, against GET /v1/health.
    Authorize(AuthorizeArgs),
    /// Appends, mint+redeem cycles and authorizations together, in a ratio.
    Mixed(MixedArgs),
    /// One vault grown to each of a list of sizes: appends, redemptions
    /// and memory at each.
    Growth(GrowthArgs),
}

#[derive(Args)]
struct TargetArgs {
    /// Keep the data under DIR: the storage engine's, or that of the
    /// vaultd this process starts (default: a fresh temporary dir,
    /// removed afterwards).
    #[arg(long, value_name = "DIR")]
    embedded: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target::Embedded { dir: self.embedded }
    }

    /// The vaultd `remote` names, else this target.
    fn or_remote(self, remote: RemoteArgs) -> anyhow::Result<Target> {
        match remote.target()? {
            Some(_) if self.embedded.is_some() => {
                anyhow::bail!("--embedded and --addr name two targets: give one")
            }
            Some(t) => Ok(t),
            None => Ok(self.target()),
        }
    }
}

/// Where appends go when not to the embedded engine.
#[derive(Args)]
struct ServerArgs {
    /// Append over the protocol to a vaultd started in this process on
    /// 127.0.0.1 (its data under --embedded DIR, or a temporary dir).
    #[arg(long, conflicts_with = "addr")]
    protocol: bool,
    /// With --protocol: serve TLS with a CA and certificate made for the run.
    #[arg(long, requires = "protocol")]
    tls: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

impl ServerArgs {
    /// The target these flags name, given the embedded dir flag.
    fn target(self, embedded: TargetArgs) -> anyhow::Result<Target> {
        if self.protocol {
            return Ok(Target::InProcess {
                dir: embedded.embedded,
                tls: self.tls,
            });
        }
        embedded.or_remote(self.remote)
    }
}

/// A running vaultd to measure instead of one this process starts.
#[derive(Args)]
struct RemoteArgs {
    /// Measure a running vaultd at HOST:PORT instead (a flag only: a
    /// FINTRUST_ADDR in the environment never redirects a benchmark).
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// The API key for --addr: a writer's for append; an admin's for
    /// redeem and authorize, which make credentials and a subject of their
    /// own for the run, then revoke and shred them.
    /// [env: FINTRUST_API_KEY]
    #[arg(long, value_name = "KEY", value_parser = client::cli::secret_arg)]
    api_key: Option<client::Zeroizing<String>>,
    /// File holding the API key for --addr (surrounding whitespace is
    /// ignored); either flag wins over both variables. [env:
    /// FINTRUST_API_KEY_FILE]
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// PEM CA certificate the vaultd at --addr is checked against.
    #[arg(
        long,
        value_name = "FILE",
        env = "FINTRUST_CACERT",
        conflicts_with = "insecure_plaintext"
    )]
    cacert: Option<PathBuf>,
    /// TLS server name of --addr [default: its host].
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Talk to --addr without TLS (loopback development only).
    #[arg(long)]
    insecure_plaintext: bool,
}

impl RemoteArgs {
    /// The vaultd at `--addr`, if one is named.
    fn target(self) -> anyhow::Result<Option<Target>> {
        let Some(addr) = self.addr else {
            return Ok(None);
        };
        let api_key = client::cli::given_api_key(self.api_key, self.api_key_file.as_deref())?
            .context("--addr needs --api-key or --api-key-file")?;
        let tls = match (self.cacert, self.insecure_plaintext) {
            (Some(ca), false) => client::Tls::Ca {
                ca_pem_file: ca,
                server_name: self
                    .server_name
                    .unwrap_or_else(|| client::config::host_of(&addr).to_string()),
                client_cert: None,
            },
            (None, true) => client::Tls::Plaintext,
            _ => anyhow::bail!("--addr needs --cacert FILE, or --insecure-plaintext"),
        };
        Ok(Some(Target::Remote(client::ClientConfig {
            addr,
            tls,
            api_key,
            client_name: "vault-bench".into(),
            ..client::ClientConfig::default()
        })))
    }
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    server: ServerArgs,
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
    /// Also measure a baseline in the same run: raw sled at the same
    /// durability; with --protocol or --addr, the embedded engine too.
    #[arg(long)]
    baseline: bool,
    /// With --protocol or --addr: also run as many Redis SETs of --size
    /// bytes (appendfsync always) from as many clients, one at a time each;
    /// needs --pipeline 1 and batch 1. Skipped with a note on stderr when
    /// redis-server is not on PATH.
    #[arg(long)]
    redis: bool,
    /// With --protocol or --addr: also INSERT as many rows of --size bytes
    /// into a table of this PostgreSQL server (a connection string such as
    /// "host=127.0.0.1 port=5432 user=postgres", or a postgresql:// URL),
    /// one statement at a time from as many clients, each committed
    /// durably; needs --pipeline 1 and batch 1. The run creates the table
    /// fintrust_bench_records, refuses to start if it exists, and drops it.
    #[arg(long, value_name = "CONNINFO")]
    postgres: Option<String>,
}

#[derive(Args)]
struct MixedArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// APPEND:REDEEM:AUTHORIZE weights of the operations each client picks.
    #[arg(long, value_name = "A:R:Z", default_value = "8:1:1")]
    ratio: Ratio,
    /// Serve the protocol over TLS (needs a ratio without authorize).
    #[arg(long)]
    tls: bool,
    /// Concurrent clients, each one operation at a time [default: 50].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Operations between all clients [default: 20000; with --duration,
    /// no limit but the time].
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Stop after SECS even if fewer operations were made.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Plaintext bytes per appended record [default: 512].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Distinct subjects of the appended records [default: 10000].
    #[arg(long, value_name = "S")]
    subjects: Option<usize>,
    /// Also run each operation kind alone at the same client count.
    #[arg(long)]
    baseline: bool,
    /// Then run again while N slow clients per port (twice the connection
    /// limit is the classic attack) trickle bytes and never finish.
    #[arg(long, value_name = "N")]
    slowloris: Option<usize>,
    /// Seconds between two bytes of a slow client [default: 2].
    #[arg(long, value_name = "SECS")]
    slowloris_interval: Option<f64>,
    /// Connection limit of both ports of the vaultd started here
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
}

#[derive(Args)]
struct GrowthArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Log sizes in entries, ascending, comma-separated
    /// [default: 10000,100000,1000000,10000000].
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    sizes: Option<Vec<u64>>,
    /// Plaintext bytes per appended record [default: 512].
    #[arg(long, value_name = "BYTES")]
    size: Option<usize>,
    /// Appending connections [default: 8].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Single appends each connection keeps in flight [default: 8].
    #[arg(long, value_name = "P")]
    pipeline: Option<usize>,
    /// Appends timed at each size [default: 20000].
    #[arg(long, value_name = "N")]
    window: Option<u64>,
    /// Mint+redeem cycles timed at each size, one at a time [default: 500].
    #[arg(long, value_name = "N")]
    redemptions: Option<u64>,
}

#[derive(Args)]
struct RedeemArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Serve TLS; then measure full handshakes and resumed sessions.
    #[arg(long, conflicts_with = "addr")]
    tls: bool,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Concurrent partner clients [default: 50].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Tokens redeemed per run [default: 20000].
    #[arg(long, value_name = "N")]
    tokens: Option<u64>,
    /// Also run Redis GETDEL (appendfsync always) on as many keys; needs
    /// redis-server on PATH.
    #[arg(long)]
    redis: bool,
    /// Start R redemptions per second on a schedule (open loop, as pgbench
    /// --rate), the baselines at the same rate; latency counted from each
    /// one's due time when no client was free. Without it each client
    /// starts its next one when the last is done.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// Also burn as many rows with DELETE ... RETURNING in a table of this
    /// PostgreSQL server (a connection string or postgresql:// URL), from
    /// as many clients on persistent connections, each committed durably.
    /// The run creates the table fintrust_bench_tokens, refuses to start
    /// if it exists, and drops it.
    #[arg(long, value_name = "CONNINFO")]
    postgres: Option<String>,
}

#[derive(Args)]
struct AuthorizeArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    remote: RemoteArgs,
    /// With --addr: the HTTP shim of that vaultd, spoken to with its TLS
    /// (--cacert, --server-name) or in plaintext as --addr is [default:
    /// the host of --addr, port 8080].
    #[arg(long, value_name = "HOST:PORT", requires = "addr")]
    http_addr: Option<String>,
    /// Concurrent keep-alive HTTP connections [default: 50].
    #[arg(long, value_name = "C")]
    clients: Option<usize>,
    /// Requests per phase (authorize, and the health baseline) [default:
    /// 20000; with --duration, no limit but the time].
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// End each phase after SECS even if fewer requests were made.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Send R requests per second on a schedule (open loop, as pgbench
    /// --rate), latency counted from each request's due time when no
    /// connection was free; without it each connection sends on its last
    /// answer.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
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
    /// Then serve the vault in this process over TLS and verify it again
    /// as `vault-verify --remote` does, with an auditor key.
    #[arg(long)]
    remote: bool,
}

impl Command {
    fn into_parts(self) -> anyhow::Result<(Target, Workload)> {
        Ok(match self {
            Command::Append(a) => {
                let d = AppendParams::default();
                let duration = seconds(a.duration)?;
                let over_protocol = a.server.protocol || a.server.remote.addr.is_some();
                if a.redis && !over_protocol {
                    anyhow::bail!("--redis compares protocol appends: add --protocol or --addr");
                }
                if a.postgres.is_some() && !over_protocol {
                    anyhow::bail!("--postgres compares protocol appends: add --protocol or --addr");
                }
                let one_at_a_time =
                    a.pipeline.unwrap_or(d.pipeline) == 1 && a.batch.unwrap_or(1) == 1;
                if a.redis && !one_at_a_time {
                    // Checked here too, so that it fails the same with or
                    // without redis-server installed.
                    anyhow::bail!(
                        "--redis times one durable write per round trip: use --pipeline 1 (and batch 1)"
                    );
                }
                if a.postgres.is_some() && !one_at_a_time {
                    anyhow::bail!(
                        "--postgres times one INSERT per round trip: use --pipeline 1 (and batch 1)"
                    );
                }
                let redis = redis_server(a.redis, "SET");
                let postgres = a
                    .postgres
                    .as_deref()
                    .map(bench::postgres::Conninfo::parse)
                    .transpose()?;
                let p = AppendParams {
                    records: a.records.unwrap_or(d.records),
                    size: a.size.unwrap_or(d.size),
                    clients: a.clients.unwrap_or(d.clients),
                    pipeline: a.pipeline.unwrap_or(d.pipeline),
                    batch: a.batch.unwrap_or(d.batch),
                    subjects: a.subjects.unwrap_or(d.subjects),
                    duration,
                    baseline: a.baseline,
                    redis,
                    postgres,
                };
                (a.server.target(a.target)?, Workload::Append(p))
            }
            Command::Redeem(r) => {
                let d = RedeemParams::default();
                let redis = redis_server(r.redis, "GETDEL");
                let postgres = r
                    .postgres
                    .as_deref()
                    .map(bench::postgres::Conninfo::parse)
                    .transpose()?;
                let p = RedeemParams {
                    clients: r.clients.unwrap_or(d.clients),
                    tokens: r.tokens.unwrap_or(d.tokens),
                    redis,
                    rate: r.rate,
                    postgres,
                };
                let target = match r.target.or_remote(r.remote)? {
                    Target::Embedded { dir } => Target::InProcess { dir, tls: r.tls },
                    remote => remote,
                };
                (target, Workload::Redeem(p))
            }
            Command::Authorize(a) => {
                let d = AuthorizeParams::default();
                let duration = seconds(a.duration)?;
                // A duration alone bounds each phase by time; the request
                // count then only guards against a phase without end.
                let requests = match (a.requests, duration) {
                    (Some(n), _) => n,
                    (None, Some(_)) => bench::http::MAX_REQUESTS,
                    (None, None) => d.requests,
                };
                let p = AuthorizeParams {
                    clients: a.clients.unwrap_or(d.clients),
                    requests,
                    rate: a.rate,
                    duration,
                    http_addr: a.http_addr,
                };
                let target = match a.target.or_remote(a.remote)? {
                    Target::Embedded { dir } => Target::InProcess { dir, tls: false },
                    remote => remote,
                };
                (target, Workload::Authorize(p))
            }
            Command::Mixed(m) => {
                let d = MixedParams::default();
                let duration = seconds(m.duration)?;
                // A duration alone bounds the run by time; the request
                // count then only guards against a run without end.
                let requests = match (m.requests, duration) {
                    (Some(n), _) => n,
                    (None, Some(_)) => bench::mixed::MAX_REQUESTS,
                    (None, None) => d.requests,
                };
                let p = MixedParams {
                    ratio: m.ratio,
                    clients: m.clients.unwrap_or(d.clients),
                    requests,
                    duration,
                    size: m.size.unwrap_or(d.size),
                    subjects: m.subjects.unwrap_or(d.subjects),
                    baseline: m.baseline,
                    slowloris: m.slowloris.unwrap_or(0),
                    slowloris_interval: match m.slowloris_interval {
                        Some(secs) => Duration::try_from_secs_f64(secs)
                            .ok()
                            .filter(|d| !d.is_zero())
                            .context("--slowloris-interval takes a positive number of seconds")?,
                        None => d.slowloris_interval,
                    },
                    max_connections: m.max_connections,
                };
                let target = Target::InProcess {
                    dir: m.target.embedded,
                    tls: m.tls,
                };
                (target, Workload::Mixed(p))
            }
            Command::Growth(g) => {
                let d = GrowthParams::default();
                let p = GrowthParams {
                    sizes: g.sizes.unwrap_or(d.sizes),
                    size: g.size.unwrap_or(d.size),
                    clients: g.clients.unwrap_or(d.clients),
                    pipeline: g.pipeline.unwrap_or(d.pipeline),
                    window: g.window.unwrap_or(d.window),
                    redemptions: g.redemptions.unwrap_or(d.redemptions),
                };
                let target = Target::InProcess {
                    dir: g.target.embedded,
                    tls: false,
                };
                (target, Workload::Growth(p))
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
                    remote: v.remote,
                };
                (v.target.target(), Workload::Verify(p))
            }
        })
    }
}

/// The longest `--duration`: a day (a deadline past the clock's range
/// would overflow).
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// `--duration SECS` as a duration.
fn seconds(secs: Option<f64>) -> anyhow::Result<Option<Duration>> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
            .context("--duration takes a positive number of seconds, at most 86400")
    })
    .transpose()
}

fn main() -> ExitCode {
    // The allocator and pages as `vaultd` sets them, so that the server
    // started in this process, and the embedded engine it is compared
    // with, run as they would in `vaultd` (`verify` keeps freed memory
    // instead, as `vault-verify` does).
    server::alloc::return_freed_memory();
    server::alloc::without_huge_pages();
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
    server::log_to_stderr("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if refused(&e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(client::cli::EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(client::cli::EXIT_LOCAL)
        }
    }
}

/// Whether `e` is a refusal by the server the benchmark ran against
/// (`--addr`): a wrong key or role, say.
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<client::ClientError>(),
            Some(client::ClientError::Server { .. })
        ) || matches!(
            c.downcast_ref::<server::Error>(),
            Some(server::Error::Client(client::ClientError::Server { .. }))
        )
    })
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
    let report = rt.block_on(bench::run(&target, &workload, progress));
    // After an interrupt, the server in this process may still write to
    // the run's temporary dir: stopped with the runtime, then removed.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    for (dir, e) in bench::remove_temporary_dirs() {
        eprintln!("warning: {} was not removed: {e}", dir.display());
    }
    // Exit 2 means a refusal by the server at --addr; a server this
    // process started that refuses something is this run's own failure.
    let report = match target {
        bench::Target::Remote(_) => report?,
        _ => report.map_err(|e| anyhow::anyhow!("{e:#}"))?,
    };
    if json {
        client::cli::print_line(&serde_json::to_string(&report)?)
    } else {
        client::cli::print_line(&report.table())
    }
}

/// The `redis-server` to run a baseline with, when `--redis` asks for one;
/// without one on PATH the baseline is skipped with a note (the run goes
/// on, and its JSON says `"redis": null`).
fn redis_server(wanted: bool, command: &str) -> Option<std::path::PathBuf> {
    if !wanted {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = bench::redis::find_on_path("redis-server", &path);
    if found.is_none() {
        eprintln!(
            "note: redis-server is not on PATH; the Redis {command} baseline is skipped (Debian: apt-get install redis-server)"
        );
    }
    found
}
