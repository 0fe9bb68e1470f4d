//! `vault-bench`: throughput and latency of the storage engine, the
//! protocol server and the HTTP shim, in the spirit of redis-benchmark and
//! pgbench.
//!
//! A run is a [`Target`] (the engine embedded in this process, `vaultd`
//! started in this process on loopback, or a running `vaultd`) and a
//! [`Workload`]:
//!
//! - [`Workload::Append`]: `clients` tasks, each keeping `pipeline` appends
//!   of `batch` records in flight, every append awaited until the vault
//!   acknowledges it durable. Reports records/s and the latency of each
//!   append call in an HDR histogram. With `baseline`, raw sled inserts the
//!   same number of records of the same size, one writer thread, made
//!   durable the way sled is made durable (`flush` + `fdatasync` of its
//!   data file) after every record and after every 256. The vault makes
//!   a commit group durable otherwise (one `fdatasync` of its own
//!   write-ahead file, shared by the groups ready), with many appends in
//!   flight: the ratios measure that design against sled used plainly.
//! - [`Workload::Verify`]: builds a vault of `entries` records, closes it,
//!   and times `storage::verify` with the pinned public key (the allocator
//!   keeping freed memory, as in `vault-verify`). With
//!   `baseline`, the one-core rates of BLAKE3 over entry-sized buffers and
//!   of ed25519 `verify_strict`, the two costs verify cannot avoid.
//! - Appends over the protocol ([`protocol`]): [`Workload::Append`] against
//!   [`Target::InProcess`] or [`Target::Remote`]; one client connection per
//!   client task, appends pipelined on it. With `baseline`, the embedded
//!   engine runs the same parameters in the same invocation.
//! - [`Workload::Redeem`] ([`redeem`]): one new connection per token
//!   (TCP, TLS, `Hello`, `Redeem`, data, close), with and without TLS
//!   session resumption; optionally next to Redis `GETDEL` ([`redis`]).
//! - [`Workload::Authorize`] ([`http`]): keep-alive HTTP/1.1 clients
//!   posting `/v1/authorize` to the shim, next to `GET /v1/health`,
//!   against [`Target::InProcess`] or the shim of a [`Target::Remote`].
//! - [`Workload::Mixed`] ([`mixed`]): the three above against one vaultd,
//!   each client picking protocol appends, mint+redeem cycles and
//!   authorizations in a given ratio; with `baseline`, each of them alone
//!   at the same client count in the same run.
//! - Protocol appends next to Redis `SET` with `appendfsync always`
//!   ([`AppendParams::redis`], [`redis`]): one durable write each, the
//!   single-client latency comparison; and next to PostgreSQL `INSERT`s
//!   committed durably ([`AppendParams::postgres`], [`postgres`]), what a
//!   service would use instead of a vault.
//! - [`Workload::Growth`] ([`growth`]): one vaultd whose log is grown to
//!   each of a list of sizes; at each, a window of protocol appends,
//!   mint+redeem cycles one at a time, and the process's resident memory,
//!   with appends/s against the first size's.
//!
//! Redemptions, authorizations and Redis's commands also report their
//! **tail** ([`tail`]): the requests slower than the pass's p99, grouped by
//! the 100 ms window they began in, with what the data dir's block device
//! did while the slowest of each window waited (flushes and their time,
//! bytes written, from `/proc/diskstats`), so that a p99 set by a few
//! stalls can be told from one spread over the run, and a stall of the
//! device from one of the vault's.
//!
//! Submodules, in the order a run uses them: [`inproc`] (vaultd in this
//! process, TLS material made for the run), then one per workload, then
//! [`mixed`] and [`growth`] (which drive the others' operations),
//! [`remote`] (what runs against a running `vaultd` share), [`redis`] and
//! [`postgres`], and [`tail`].
//!
//! The machines this runs on are shared and noisy, so absolute figures
//! move between runs; the baselines are measured in the same run so that
//! the ratios mean something.
//!
//! Data layout under the bench dir (a fresh temporary dir by default,
//! removed at the end; a dir given by the caller is left in place):
//!
//! ```text
//! DIR/vault/           the bench vault (passphrase BENCH_PASSPHRASE)
//! DIR/sled-every-1/    raw sled baseline, durable after every insert
//! DIR/sled-every-256/  raw sled baseline, durable after every 256 inserts
//! ```

use std::fs::File;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use storage::{Append, Options, Unlock, Vault, VerifyOptions};
use tokio::task::JoinSet;

use crate::{Error, Result};

pub mod growth;
pub mod http;
pub mod inproc;
pub mod mixed;
pub mod postgres;
pub mod protocol;
pub mod redeem;
pub mod redis;
pub mod remote;
pub mod slowloris;
pub mod tail;

pub use growth::{GrowthParams, GrowthReport};
pub use http::{AuthorizeParams, AuthorizeReport};
pub use mixed::{MixedParams, MixedReport, Ratio, RatioError};
pub use redeem::{RedeemParams, RedeemReport};

/// Passphrase of every bench vault. A bench vault holds random bytes only;
/// the fixed passphrase keeps runs reproducible and scriptable.
pub const BENCH_PASSPHRASE: &[u8] = b"vault-bench: not a secret";

/// The sled baselines: durable after every this many inserts. With one,
/// every insert is acknowledged durable, as every vault append is.
pub const BASELINE_SYNC_EVERY: [u64; 2] = [1, 256];

/// Where the workload runs.
#[derive(Debug, Clone)]
pub enum Target {
    /// The storage engine inside this process, in `dir` (a fresh temporary
    /// dir, removed afterwards, when `None`).
    Embedded { dir: Option<PathBuf> },
    /// `vaultd` (the protocol server, and the HTTP shim for `authorize`)
    /// started in this process on 127.0.0.1 with a port the OS chooses,
    /// its vault under `dir` as above; over TLS with a CA and certificate
    /// made for the run when `tls`.
    InProcess { dir: Option<PathBuf>, tls: bool },
    /// A running `vaultd`: its address, transport and an API key (a
    /// writer's for appends, an admin's for redemptions).
    Remote(client::ClientConfig),
}

/// What to measure.
#[derive(Debug, Clone)]
pub enum Workload {
    Append(AppendParams),
    Verify(VerifyParams),
    Redeem(RedeemParams),
    Authorize(AuthorizeParams),
    Mixed(MixedParams),
    Growth(GrowthParams),
}

/// Parameters of [`Workload::Append`].
#[derive(Debug, Clone, Serialize)]
pub struct AppendParams {
    /// Records to append (default 200,000); the run ends when all are durable.
    pub records: u64,
    /// Plaintext bytes per record (default 512).
    pub size: usize,
    /// Concurrent clients (default 64).
    pub clients: usize,
    /// Appends each client keeps in flight (default 8).
    pub pipeline: usize,
    /// Records per `append_batch` call (default 1: one `append` per record).
    pub batch: usize,
    /// Distinct subjects the records are spread over (default 10,000).
    pub subjects: usize,
    /// Stop claiming new records after this long, even if fewer than
    /// `records` were appended (default: no limit).
    #[serde(rename = "duration_s", serialize_with = "secs_opt")]
    pub duration: Option<Duration>,
    /// Also measure a baseline in the same run (default false): raw sled
    /// at the same durability; for a protocol target, the embedded engine
    /// with the same parameters too.
    pub baseline: bool,
    /// For a protocol target: the `redis-server` binary to run the same
    /// number of `SET`s of `size`-byte values against, with `appendfsync
    /// always`, from as many clients, one command at a time each (default
    /// none). Needs `pipeline` and `batch` 1, so that both sides time one
    /// durable write per round trip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<PathBuf>,
    /// For a protocol target: a PostgreSQL server to `INSERT` the same
    /// number of `size`-byte rows into, durably, from as many clients, one
    /// statement at a time each (default none; see [`postgres`]). Needs
    /// `pipeline` and `batch` 1, as `redis` does. Not in the report's
    /// parameters (it may hold a password); the run names the server.
    #[serde(skip)]
    pub postgres: Option<postgres::Conninfo>,
}

impl Default for AppendParams {
    fn default() -> Self {
        AppendParams {
            records: 200_000,
            size: 512,
            clients: 64,
            pipeline: 8,
            batch: 1,
            subjects: 10_000,
            duration: None,
            baseline: false,
            redis: None,
            postgres: None,
        }
    }
}

/// Parameters of [`Workload::Verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyParams {
    /// Records to write before verifying (default 1,000,000). The log also
    /// holds one key entry per subject and two initial entries.
    pub entries: u64,
    /// Plaintext bytes per record (default 512).
    pub size: usize,
    /// Distinct subjects (default 10,000).
    pub subjects: usize,
    /// Tasks appending while the vault is built (default 8).
    pub build_clients: usize,
    /// Records per `append_batch` call while building (default 1024).
    pub build_batch: usize,
    /// Also measure BLAKE3 and ed25519 on one core (default false).
    pub baseline: bool,
    /// Then serve the vault in this process over TLS and verify it again
    /// as `vault-verify --remote` does (default false).
    pub remote: bool,
}

impl Default for VerifyParams {
    fn default() -> Self {
        VerifyParams {
            entries: 1_000_000,
            size: 512,
            subjects: 10_000,
            build_clients: 8,
            build_batch: 1024,
            baseline: false,
            remote: false,
        }
    }
}

/// Largest record plaintext: the vault adds a 16-byte tag.
const MAX_SIZE: usize = storage::entry::MAX_PAYLOAD_LEN - 16;
/// Bounds on the knobs, so that a typo fails at once rather than after an
/// hour or with an allocation failure.
const MAX_CLIENTS: usize = 100_000;
const MAX_BATCH: usize = 65_536;
const MAX_SUBJECTS: usize = 10_000_000;

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(msg()))
    }
}

fn check_common(records: u64, size: usize, subjects: usize) -> Result<()> {
    check(records > 0, || "the record count must be at least 1".into())?;
    check(size <= MAX_SIZE, || {
        format!("--size {size} exceeds the largest record, {MAX_SIZE} bytes")
    })?;
    check((1..=MAX_SUBJECTS).contains(&subjects), || {
        format!("--subjects must be between 1 and {MAX_SUBJECTS}")
    })
}

/// Most record bytes one batch holds: what one protocol frame carries
/// (its subject, field names and framing aside), on every target, so that
/// an embedded run stays comparable with a protocol one and allocates
/// nothing unbounded.
const MAX_BATCH_BYTES: usize = ::protocol::MAX_FRAME_LEN - 64 * 1024;

fn check_batch_bytes(batch: usize, size: usize) -> Result<()> {
    check(batch.saturating_mul(size) <= MAX_BATCH_BYTES, || {
        format!(
            "--batch {batch} of --size {size} is {} KiB a batch: at most {} KiB (one protocol frame)",
            batch.saturating_mul(size) >> 10,
            MAX_BATCH_BYTES >> 10
        )
    })
}

fn check_clients(clients: usize, pipeline: usize, batch: usize) -> Result<()> {
    check((1..=MAX_CLIENTS).contains(&clients), || {
        format!("--clients must be between 1 and {MAX_CLIENTS}")
    })?;
    check((1..=MAX_CLIENTS).contains(&pipeline), || {
        format!("--pipeline must be between 1 and {MAX_CLIENTS}")
    })?;
    check((1..=MAX_BATCH).contains(&batch), || {
        format!("--batch must be between 1 and {MAX_BATCH}")
    })
}

impl AppendParams {
    fn validate(&self) -> Result<()> {
        check_common(self.records, self.size, self.subjects)?;
        check_clients(self.clients, self.pipeline, self.batch)?;
        check_batch_bytes(self.batch, self.size)?;
        check(
            self.redis.is_none() || (self.pipeline == 1 && self.batch == 1),
            || {
                "the Redis SET baseline times one write per round trip: use --pipeline 1 --batch 1"
                    .into()
            },
        )?;
        check(
            self.postgres.is_none() || (self.pipeline == 1 && self.batch == 1),
            || {
                "the PostgreSQL baseline times one INSERT per round trip: use --pipeline 1 --batch 1"
                    .into()
            },
        )
    }
}

impl VerifyParams {
    fn validate(&self) -> Result<()> {
        check_common(self.entries, self.size, self.subjects)?;
        check_clients(self.build_clients, 1, self.build_batch)?;
        check_batch_bytes(self.build_batch, self.size)
    }
}

/// The outcome of a run; serialized as one JSON object whose `workload`
/// field names the variant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "workload", rename_all = "snake_case")]
pub enum Report {
    Append(AppendReport),
    Verify(VerifyReport),
    Redeem(RedeemReport),
    Authorize(AuthorizeReport),
    Mixed(MixedReport),
    Growth(GrowthReport),
}

/// Where a run went.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// "embedded", "in-process" (vaultd in this process, on loopback) or
    /// "remote".
    pub kind: &'static str,
    /// The data dir (empty for a remote target).
    pub dir: String,
    /// True when the dir was a temporary one, removed after the run.
    pub temporary: bool,
    /// Whether the protocol connections used TLS.
    pub tls: bool,
    /// The protocol server's address, for a server target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

impl TargetInfo {
    fn describe(&self) -> String {
        let mut s = self.kind.to_string();
        if let Some(a) = &self.addr {
            s.push_str(&format!(" {a}"));
        }
        if self.tls {
            s.push_str(", TLS");
        } else if self.kind != "embedded" {
            s.push_str(", plaintext");
        }
        if !self.dir.is_empty() {
            s.push_str(&format!(", {}", self.dir));
            if self.temporary {
                s.push_str(" (temporary)");
            }
        }
        s
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        Latency {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Result of [`Workload::Append`].
#[derive(Debug, Clone, Serialize)]
pub struct AppendReport {
    pub target: TargetInfo,
    pub params: AppendParams,
    pub throughput: AppendThroughput,
    /// Per append call, from submission until it resolved durable.
    pub latency_us: Latency,
    /// With `baseline`: raw sled, syncing every 1 and every 256 inserts,
    /// each with this run's rate over its own (`vault_ratio`).
    pub baseline: Option<Vec<SledRun>>,
    /// For a protocol target with `baseline`: the embedded engine with the
    /// same parameters, in the same invocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedRun>,
    /// With [`AppendParams::redis`]: Redis `SET`, appendfsync always, in
    /// the same run; `null` when not asked for or skipped.
    pub redis: Option<Box<AppendBaseline<redis::RedisRun>>>,
    /// With [`AppendParams::postgres`]: PostgreSQL `INSERT`s, committed
    /// durably, in the same run; `null` when not asked for.
    pub postgres: Option<Box<AppendBaseline<postgres::PostgresRun>>>,
}

/// A baseline run beside protocol appends (Redis `SET`, PostgreSQL
/// `INSERT`): its own figures, and the protocol's over them.
#[derive(Debug, Clone, Serialize)]
pub struct AppendBaseline<R> {
    #[serde(flatten)]
    pub run: R,
    /// Protocol append p50 over the baseline's (against Redis `SET`, the
    /// goal is at most 1.2).
    pub p50_ratio: f64,
    /// Protocol append p99 over the baseline's.
    pub p99_ratio: f64,
    /// Protocol records/s over the baseline's operations/s.
    pub rate_ratio: f64,
}

impl<R> AppendBaseline<R> {
    /// `run` beside protocol appends that took `latency` at
    /// `records_per_s`.
    fn beside(run: R, latency: &Latency, records_per_s: f64) -> Self
    where
        R: BaselineRun,
    {
        let r = run.ratios(latency, records_per_s);
        AppendBaseline {
            p50_ratio: r.p50,
            p99_ratio: r.p99,
            rate_ratio: r.rate,
            run,
        }
    }
}

/// A timed pass of a baseline: what the vault's figures are divided by.
trait BaselineRun {
    /// One operation's latency.
    fn latency(&self) -> &Latency;
    /// Operations per second over the pass.
    fn ops_per_s(&self) -> f64;

    /// The vault's `latency` and `per_s` over this run's.
    fn ratios(&self, latency: &Latency, per_s: f64) -> Ratios {
        let own = self.latency();
        Ratios {
            p50: latency.p50 as f64 / own.p50.max(1) as f64,
            p99: latency.p99 as f64 / own.p99.max(1) as f64,
            rate: per_s / self.ops_per_s(),
        }
    }
}

/// The vault's figures over a baseline's ([`BaselineRun::ratios`]).
struct Ratios {
    p50: f64,
    p99: f64,
    rate: f64,
}

impl BaselineRun for redis::RedisRun {
    fn latency(&self) -> &Latency {
        &self.latency_us
    }
    fn ops_per_s(&self) -> f64 {
        self.ops_per_s
    }
}

impl BaselineRun for postgres::PostgresRun {
    fn latency(&self) -> &Latency {
        &self.latency_us
    }
    fn ops_per_s(&self) -> f64 {
        self.ops_per_s
    }
}

/// The embedded engine as the baseline of a protocol run.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddedRun {
    pub records: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    pub latency_us: Latency,
    /// The protocol run's records/s divided by this run's.
    pub protocol_ratio: f64,
}

/// Throughput of the vault in an append run.
#[derive(Debug, Clone, Serialize)]
pub struct AppendThroughput {
    /// Records acknowledged durable.
    pub records: u64,
    /// `append`/`append_batch` calls.
    pub appends: u64,
    /// Entries in the log at the end: records, one key entry per new
    /// subject, and the two initial entries.
    pub log_entries: u64,
    /// Commit groups (signed heads) the records went in; one `fdatasync`
    /// may serve several.
    pub commit_groups: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    pub appends_per_s: f64,
    /// The engine's commit pipeline over the run, when the vault is in
    /// this process (not at `--addr`).
    pub pipeline: Option<PipelineRun>,
}

/// The storage engine's commit pipeline over a run (`storage::stats`):
/// how many `fdatasync`s of the write-ahead file the run's groups shared,
/// and how long they took.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineRun {
    /// Commit groups made durable during the run (the run's own, and any
    /// other writes of the vault meanwhile).
    pub groups: u64,
    /// `fdatasync`s of the write-ahead file.
    pub syncs: u64,
    pub groups_per_sync: f64,
    /// The run's records over those syncs.
    pub records_per_sync: f64,
    /// Mean duration of a sync.
    pub mean_sync_ms: f64,
    /// Writes of derived state by the indexer, and their keys.
    pub index_writes: u64,
    pub index_keys: u64,
    /// How long the syncs took: the buckets that hold any, each with its
    /// own count (not cumulative), shortest first.
    pub sync_buckets: Vec<SyncBucket>,
}

/// Syncs that took longer than the bucket before and at most `le_ms`
/// (`None`: longer than every bound, about 3.3 s).
#[derive(Debug, Clone, Serialize)]
pub struct SyncBucket {
    pub le_ms: Option<f64>,
    pub count: u64,
}

impl PipelineRun {
    /// What happened between `before` and `after`, for `records` records.
    pub fn between(
        before: &storage::PipelineStats,
        after: &storage::PipelineStats,
        records: u64,
    ) -> Self {
        let d = after.since(before);
        let sync_buckets = d
            .sync_bucket_counts()
            .filter(|(_, count)| *count > 0)
            .map(|(le_s, count)| SyncBucket {
                le_ms: le_s.map(|b| b * 1e3),
                count,
            })
            .collect();
        PipelineRun {
            groups: d.groups,
            syncs: d.syncs,
            groups_per_sync: d.groups_per_sync(),
            records_per_sync: records as f64 / d.syncs.max(1) as f64,
            mean_sync_ms: d.mean_sync_seconds() * 1e3,
            index_writes: d.index_writes,
            index_keys: d.index_keys,
            sync_buckets,
        }
    }

    /// The counts of the vault that `/metrics` watches (an in-process
    /// server's), to take a run's [`PipelineRun::since_watched`].
    pub(super) fn watched() -> Option<storage::PipelineStats> {
        crate::metrics::global().pipeline_stats()
    }

    /// What happened to the watched vault since `before` (from
    /// [`PipelineRun::watched`]), for `records` records.
    pub(super) fn since_watched(
        before: Option<storage::PipelineStats>,
        records: u64,
    ) -> Option<Self> {
        before
            .zip(Self::watched())
            .map(|(b, a)| Self::between(&b, &a, records))
    }

    /// The bound of the slowest sync's bucket, in ms (`None` with no
    /// sync, infinite past every bound).
    fn slowest_ms(&self) -> Option<f64> {
        self.sync_buckets
            .last()
            .map(|b| b.le_ms.unwrap_or(f64::INFINITY))
    }

    /// One line of the text report.
    pub(super) fn describe(&self) -> String {
        let slowest = match self.slowest_ms() {
            Some(ms) if ms.is_finite() => format!(", slowest at most {ms:.1} ms"),
            Some(_) => ", slowest over 3.3 s".to_string(),
            None => String::new(),
        };
        format!(
            "{} fdatasyncs of the write-ahead file, mean {:.2} ms{slowest}: {:.1} groups and {:.0} records each",
            thousands(self.syncs),
            self.mean_sync_ms,
            self.groups_per_sync,
            self.records_per_sync
        )
    }
}

/// Raw sled at the vault's durability.
#[derive(Debug, Clone, Serialize)]
pub struct SledRun {
    /// Inserts between two `flush` + `fdatasync`.
    pub sync_every: u64,
    pub records: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    /// Per `flush` + `fdatasync`.
    pub sync_latency_us: Latency,
    /// The vault's records/s divided by this run's.
    pub vault_ratio: f64,
}

/// Result of [`Workload::Verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub target: TargetInfo,
    pub params: VerifyParams,
    pub build: BuildStats,
    pub throughput: VerifyThroughput,
    pub baseline: Option<VerifyBaseline>,
    pub remote: Option<RemoteVerifyThroughput>,
}

/// `vault-verify --remote`'s walk ([`crate::remote::verify_remote`]) of
/// the same log, served by `vaultd` in this process over TLS.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteVerifyThroughput {
    /// Entries verified: the local run's, and the auditor credential's
    /// entry made to serve them.
    pub entries: u64,
    /// Commit groups whose head was checked (from `Heads`, a thousand
    /// per request).
    pub groups: u64,
    /// Receipts of random entries checked (`Proof`).
    pub receipts: u64,
    /// Entries asked for per `Entries` request.
    pub page_entries: u32,
    /// Wall time of the walk, connecting included.
    pub elapsed_s: f64,
    pub entries_per_s: f64,
    /// Over the local verification's entries per second.
    pub ratio_vs_local: f64,
}

/// How the vault under test was built.
#[derive(Debug, Clone, Serialize)]
pub struct BuildStats {
    pub records: u64,
    pub commit_groups: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
}

/// `storage::verify` on the built vault.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyThroughput {
    /// Entries verified (records, subject key entries, initial entries).
    pub entries: u64,
    /// Signed heads checked: one per commit group.
    pub signed_heads: u64,
    /// Wall time of `storage::verify`, opening sled included.
    pub elapsed_s: f64,
    pub entries_per_s: f64,
}

/// One-core rates of what verify cannot avoid.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyBaseline {
    /// Length of each hashed buffer: a record entry's encoded length.
    pub blake3_input_bytes: usize,
    pub blake3_hashes: u64,
    pub blake3_per_s: f64,
    /// The same inputs 64 at a time through `storage::entry::entry_hashes`,
    /// which is how verify hashes a chunk's entries.
    pub blake3_side_by_side_per_s: f64,
    pub verify_strict_calls: u64,
    pub verify_strict_per_s: f64,
    /// One core hashing every entry once (side by side) and checking every
    /// head once.
    pub one_core_floor_s: f64,
    /// Verify's entries/s divided by BLAKE3's hashes/s.
    pub ratio_vs_blake3: f64,
    /// The floor divided by verify's time: above 1 means verify beat one
    /// core doing nothing but the unavoidable work.
    pub ratio_vs_floor: f64,
}

/// Progress on stderr while a run goes, one bar per phase.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    visible: bool,
}

impl Progress {
    /// No progress output (tests, JSON output, stderr not a terminal).
    pub fn hidden() -> Self {
        Progress { visible: false }
    }

    /// Draws bars on stderr; the caller checks that it is a terminal.
    pub fn stderr() -> Self {
        Progress { visible: true }
    }

    fn phase(&self, what: &str, total: u64) -> ProgressBar {
        if !self.visible {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:<20} {bar:32} {pos}/{len} ({per_sec}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(what.to_string());
        bar
    }
}

/// Runs `workload` against `target`.
pub async fn run(target: &Target, workload: &Workload, progress: Progress) -> Result<Report> {
    match workload {
        Workload::Append(p) => p.validate()?,
        Workload::Verify(p) => p.validate()?,
        Workload::Redeem(p) => p.validate()?,
        Workload::Authorize(p) => p.validate()?,
        Workload::Mixed(p) => p.validate()?,
        Workload::Growth(p) => p.validate()?,
    }
    if let Target::Remote(_) = target {
        // Interrupts are the remote run's own: it revokes what it made on
        // the server first (`remote::Interrupts`).
        return run_workload(target, workload, progress).await;
    }
    // In this process, an interrupt (SIGINT, SIGTERM) ends the run, and
    // what it made goes as the run is dropped: a `redis-server` it
    // started is killed, a PostgreSQL table it made is dropped
    // (`postgres::with_table`), and a temporary data dir is removed, by
    // [`remove_temporary_dirs`] once the runtime is shut down (the
    // server in this process may write to it until then).
    tokio::select! {
        report = run_workload(target, workload, progress) => report,
        () = crate::daemon::signal() => Err(Error::Usage(
            "interrupted: the run stopped, and its temporary data dir, if any, was removed".into(),
        )),
    }
}

async fn run_workload(target: &Target, workload: &Workload, progress: Progress) -> Result<Report> {
    match (target, workload) {
        (Target::Embedded { .. }, Workload::Append(p)) if p.redis.is_some() => Err(Error::Usage(
            "the Redis SET baseline compares protocol appends: add --protocol or --addr".into(),
        )),
        (Target::Embedded { .. }, Workload::Append(p)) if p.postgres.is_some() => {
            Err(Error::Usage(
                "the PostgreSQL baseline compares protocol appends: add --protocol or --addr"
                    .into(),
            ))
        }
        (Target::Embedded { dir }, Workload::Append(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "embedded", false)?;
            run_append(&dir, info, p, progress)
                .await
                .map(Report::Append)
        }
        (Target::Embedded { dir }, Workload::Verify(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "embedded", false)?;
            run_verify(&dir, info, p, progress)
                .await
                .map(Report::Verify)
        }
        (Target::InProcess { .. } | Target::Remote(_), Workload::Append(p)) => {
            protocol::run_append(target, p, progress)
                .await
                .map(Report::Append)
        }
        (Target::InProcess { dir, tls }, Workload::Redeem(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "in-process", *tls)?;
            redeem::run(&dir, info, p, progress)
                .await
                .map(Report::Redeem)
        }
        (Target::Remote(config), Workload::Redeem(p)) => redeem::run_remote(config, p, progress)
            .await
            .map(Report::Redeem),
        (Target::Embedded { .. } | Target::InProcess { .. }, Workload::Authorize(p))
            if p.http_addr.is_some() =>
        {
            Err(Error::Usage(
                "--http-addr names the shim of the vaultd at --addr: add --addr".into(),
            ))
        }
        (Target::InProcess { dir, tls: false }, Workload::Authorize(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "in-process", false)?;
            http::run(&dir, info, p, progress)
                .await
                .map(Report::Authorize)
        }
        (Target::InProcess { tls: true, .. }, Workload::Authorize(_)) => Err(Error::Usage(
            "authorize measures the shim in plaintext: drop --tls".into(),
        )),
        (Target::Remote(config), Workload::Authorize(p)) => http::run_remote(config, p, progress)
            .await
            .map(Report::Authorize),
        (Target::InProcess { dir, tls }, Workload::Mixed(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "in-process", *tls)?;
            mixed::run(&dir, info, p, progress).await.map(Report::Mixed)
        }
        (Target::InProcess { dir, tls: false }, Workload::Growth(p)) => {
            let (_tmp, dir, info) = scratch(dir.as_deref(), "in-process", false)?;
            growth::run(&dir, info, p, progress)
                .await
                .map(Report::Growth)
        }
        (Target::InProcess { tls: true, .. }, Workload::Growth(_)) => Err(Error::Usage(
            "growth runs vaultd in plaintext: drop --tls".into(),
        )),
        (_, Workload::Verify(_)) => Err(Error::Usage(
            "verify runs on the embedded engine only".into(),
        )),
        (Target::Embedded { .. }, Workload::Redeem(_)) => Err(Error::Usage(
            "redeem runs against vaultd, in this process or at --addr".into(),
        )),
        (_, Workload::Authorize(_)) => Err(Error::Usage(
            "authorize runs against vaultd, in this process or at --addr".into(),
        )),
        (_, Workload::Mixed(_)) => Err(Error::Usage(
            "mixed starts vaultd in this process: no --addr".into(),
        )),
        (_, Workload::Growth(_)) => Err(Error::Usage(
            "growth starts vaultd in this process: no --addr".into(),
        )),
    }
}

/// The temporary data dirs of the runs of this process, removed when
/// their guards are dropped; and by [`remove_temporary_dirs`] when that
/// did not remove them all (an interrupted run's server still writing).
static TEMPORARY_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes what is left of this process's temporary data dirs: call it
/// after the runtime is shut down, when nothing writes to them any more.
/// Returns the dirs that could not be removed, each with why.
pub fn remove_temporary_dirs() -> Vec<(PathBuf, std::io::Error)> {
    let dirs = std::mem::take(
        &mut *TEMPORARY_DIRS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    dirs.into_iter()
        .filter_map(|d| match std::fs::remove_dir_all(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Some((d, e)),
            _ => None,
        })
        .collect()
}

/// The run's data dir: `dir`, created if needed and kept afterwards, or a
/// fresh temporary dir, removed when the returned guard is dropped (or
/// by [`remove_temporary_dirs`]).
fn scratch(
    dir: Option<&Path>,
    kind: &'static str,
    tls: bool,
) -> Result<(Option<tempfile::TempDir>, PathBuf, TargetInfo)> {
    let (tmp, dir) = match dir {
        Some(d) => (None, d.to_path_buf()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("vault-bench-")
                .tempdir()
                .map_err(|source| Error::File {
                    path: std::env::temp_dir().display().to_string(),
                    error: source,
                })?;
            let p = t.path().to_path_buf();
            TEMPORARY_DIRS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(p.clone());
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&dir).map_err(|source| Error::File {
        path: dir.display().to_string(),
        error: source,
    })?;
    let info = TargetInfo {
        kind,
        dir: dir.display().to_string(),
        temporary: tmp.is_some(),
        tls,
        addr: None,
    };
    Ok((tmp, dir, info))
}

fn sled_dir(dir: &Path, sync_every: u64) -> PathBuf {
    dir.join(format!("sled-every-{sync_every}"))
}

/// Refuses to write over an earlier run's data, which would skew it.
fn ensure_fresh(paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        check(!p.exists(), || {
            format!(
                "{} already exists: give the bench an empty or new dir",
                p.display()
            )
        })?;
    }
    Ok(())
}

async fn run_append(
    dir: &Path,
    target: TargetInfo,
    p: &AppendParams,
    progress: Progress,
) -> Result<AppendReport> {
    let vault_dir = dir.join("vault");
    let mut fresh = vec![vault_dir.clone()];
    if p.baseline {
        fresh.extend(BASELINE_SYNC_EVERY.iter().map(|k| sled_dir(dir, *k)));
    }
    ensure_fresh(&fresh)?;
    let vault = create_vault(vault_dir).await?;
    let bar = progress.phase("vault append", p.records);
    let work = Arc::new(Work::new(
        vault, p.records, p.size, p.batch, p.subjects, bar,
    ));
    let deadline = p.duration.map(|d| Instant::now() + d);
    let before = work.vault.pipeline_stats();
    let start = Instant::now();
    let stats = drive(&work, p.clients, p.pipeline, deadline).await?;
    let elapsed = start.elapsed();
    let pipeline = PipelineRun::between(&before, &work.vault.pipeline_stats(), stats.records);
    work.bar.finish_and_clear();
    let work =
        Arc::try_unwrap(work).map_err(|_| Error::Usage("bench tasks outlived the run".into()))?;
    let log_entries = work.vault.head().map_or(0, |h| h.last_seq + 1);
    close_vault(work.vault).await?;

    let secs = elapsed.as_secs_f64();
    let records_per_s = stats.records as f64 / secs;
    let throughput = AppendThroughput {
        records: stats.records,
        appends: stats.appends,
        log_entries,
        commit_groups: stats.groups(),
        elapsed_s: secs,
        records_per_s,
        appends_per_s: stats.appends as f64 / secs,
        pipeline: Some(pipeline),
    };
    let baseline = if p.baseline {
        let mut runs = Vec::new();
        for k in BASELINE_SYNC_EVERY {
            let bar = progress.phase(&format!("sled, sync every {k}"), stats.records);
            let sdir = sled_dir(dir, k);
            let (records, size, payloads) = (stats.records, p.size, work.payloads.clone());
            let mut run = tokio::task::spawn_blocking(move || {
                let r = sled_baseline(&sdir, records, size, k, &payloads, &bar);
                bar.finish_and_clear();
                r
            })
            .await
            .map_err(join_error)??;
            run.vault_ratio = records_per_s / run.records_per_s;
            runs.push(run);
        }
        Some(runs)
    } else {
        None
    };
    Ok(AppendReport {
        target,
        params: p.clone(),
        throughput,
        latency_us: Latency::of(&stats.hist),
        baseline,
        embedded: None,
        redis: None,
        postgres: None,
    })
}

async fn run_verify(
    dir: &Path,
    target: TargetInfo,
    p: &VerifyParams,
    progress: Progress,
) -> Result<VerifyReport> {
    let vault_dir = dir.join("vault");
    ensure_fresh(std::slice::from_ref(&vault_dir))?;
    let vault = create_vault(vault_dir.clone()).await?;
    let public_key = vault.public_key();
    let bar = progress.phase("building vault", p.entries);
    let work = Arc::new(Work::new(
        vault,
        p.entries,
        p.size,
        p.build_batch,
        p.subjects,
        bar,
    ));
    let start = Instant::now();
    // Two batches in flight per task, so that the committer fills the next
    // group while the syncer makes the last one durable.
    let stats = drive(&work, p.build_clients, 2, None).await?;
    let build_secs = start.elapsed().as_secs_f64();
    work.bar.finish_and_clear();
    let work =
        Arc::try_unwrap(work).map_err(|_| Error::Usage("bench tasks outlived the run".into()))?;
    close_vault(work.vault).await?;
    let build = BuildStats {
        records: stats.records,
        commit_groups: stats.groups(),
        elapsed_s: build_secs,
        records_per_s: stats.records as f64 / build_secs,
    };

    // As `vault-verify` does: its scan keeps the memory it frees.
    crate::alloc::keep_freed_memory();
    let bar = progress.phase("storage::verify", 0);
    let (elapsed, report) = tokio::task::spawn_blocking(move || {
        let set = |n: u64| bar.set_position(n);
        let total = |n: u64| bar.set_length(n);
        let opts = VerifyOptions {
            public_key: Some(public_key),
            progress: Some(&set),
            total_hint: Some(&total),
            kept_head: None,
            verified_prefix: None,
        };
        let start = Instant::now();
        let report = storage::verify(&vault_dir, &opts);
        let elapsed = start.elapsed();
        bar.finish_and_clear();
        (elapsed, report)
    })
    .await
    .map_err(join_error)?;
    let report = report?;
    if let Some(f) = report.failure {
        return Err(storage::Error::from(f).into());
    }
    let secs = elapsed.as_secs_f64();
    let entries_per_s = report.entries as f64 / secs;
    let throughput = VerifyThroughput {
        entries: report.entries,
        signed_heads: build.commit_groups,
        elapsed_s: secs,
        entries_per_s,
    };

    let baseline = if p.baseline {
        let input = record_entry_len(p.size, p.subjects);
        let hashes = report.entries;
        let verifies = (hashes / 100).clamp(100, 10_000);
        let bar = progress.phase("baseline, 1 core", 0);
        bar.tick();
        let payloads = work.payloads.clone();
        let (blake3_per_s, side_by_side_per_s, verify_strict_per_s) =
            tokio::task::spawn_blocking(move || {
                let r = (
                    blake3_rate(&payloads, input, hashes),
                    blake3_side_by_side_rate(&payloads, input, hashes),
                    verify_strict_rate(verifies),
                );
                bar.finish_and_clear();
                r
            })
            .await
            .map_err(join_error)?;
        let floor = hashes as f64 / side_by_side_per_s
            + throughput.signed_heads as f64 / verify_strict_per_s;
        Some(VerifyBaseline {
            blake3_input_bytes: input,
            blake3_hashes: hashes,
            blake3_per_s,
            blake3_side_by_side_per_s: side_by_side_per_s,
            verify_strict_calls: verifies,
            verify_strict_per_s,
            one_core_floor_s: floor,
            ratio_vs_blake3: entries_per_s / blake3_per_s,
            ratio_vs_floor: floor / secs,
        })
    } else {
        None
    };
    let remote = if p.remote {
        let bar = progress.phase("vault-verify --remote", 0);
        let r = run_remote_verify(dir, public_key, &bar).await;
        bar.finish_and_clear();
        let mut r = r?;
        r.ratio_vs_local = r.entries_per_s / entries_per_s;
        Some(r)
    } else {
        None
    };
    Ok(VerifyReport {
        target,
        params: p.clone(),
        build,
        throughput,
        baseline,
        remote,
    })
}

/// Opens the vault under `dir` again, serves it over TLS in this process,
/// and times [`crate::remote::verify_remote`] against it with an auditor
/// key and the pinned `public_key`.
async fn run_remote_verify(
    dir: &Path,
    public_key: ed25519_dalek::VerifyingKey,
    bar: &indicatif::ProgressBar,
) -> Result<RemoteVerifyThroughput> {
    use crate::remote::{RemoteOptions, DEFAULT_PAGE_ENTRIES, DEFAULT_SAMPLE_RECEIPTS};
    let vault_dir = dir.join("vault");
    let vault = tokio::task::spawn_blocking(move || {
        Vault::open(
            &vault_dir,
            &Unlock::passphrase(BENCH_PASSPHRASE.to_vec()),
            Options::default(),
        )
    })
    .await
    .map_err(join_error)??;
    let (_, key) = vault.create_credential("auditor", "vault-bench").await?;
    let server = inproc::InProcess::start(
        vault,
        dir,
        inproc::Options {
            tls: true,
            http: false,
            policies: None,
            max_connections: None,
        },
    )
    .await?;
    let set = |n: u64| bar.set_position(n);
    let total = |n: u64| bar.set_length(n);
    let opts = RemoteOptions {
        client: server.client_config(&key),
        public_key,
        page_entries: DEFAULT_PAGE_ENTRIES,
        sample_receipts: DEFAULT_SAMPLE_RECEIPTS,
        progress: Some(&set),
        total_hint: Some(&total),
        kept_head: None,
    };
    let verified = crate::remote::verify_remote(&opts).await;
    // Stop the server whatever happened, then report the first error.
    let stopped = server.stop().await;
    let verified = verified?;
    stopped?;
    if let Some(f) = verified.report.failure {
        return Err(storage::Error::from(f).into());
    }
    let secs = verified.elapsed.as_secs_f64();
    Ok(RemoteVerifyThroughput {
        entries: verified.report.entries,
        groups: verified.report.groups,
        receipts: verified.receipts_checked,
        page_entries: DEFAULT_PAGE_ENTRIES,
        elapsed_s: secs,
        entries_per_s: verified.report.entries as f64 / secs,
        ratio_vs_local: 0.0,
    })
}

async fn create_vault(dir: PathBuf) -> Result<Vault> {
    // Key derivation (argon2id) blocks for tens of milliseconds.
    let created = tokio::task::spawn_blocking(move || {
        Vault::create(
            &dir,
            &Unlock::passphrase(BENCH_PASSPHRASE.to_vec()),
            Options::default(),
        )
    })
    .await
    .map_err(join_error)??;
    Ok(created.vault)
}

async fn close_vault(vault: Vault) -> Result<()> {
    tokio::task::spawn_blocking(move || vault.close())
        .await
        .map_err(join_error)??;
    Ok(())
}

/// Waits for every task of `set`, handing each one's result to `each` as
/// it finishes. The first error returns at once, and dropping the set
/// aborts the other tasks; a panic goes through ([`join_error`]).
async fn join_each<T: 'static>(mut set: JoinSet<Result<T>>, mut each: impl FnMut(T)) -> Result<()> {
    while let Some(joined) = set.join_next().await {
        each(joined.map_err(join_error)??);
    }
    Ok(())
}

/// Adds `other` to `into`. Both come from [`new_histogram`], so adding
/// cannot fail; counting `other`'s values one by one would only hide a
/// bug.
fn add_histogram(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    into.add(other).expect("histograms with identical bounds");
}

/// A bench task panicking is a bug: let the panic through. Tasks are never
/// aborted while awaited, so cancellation cannot happen either.
fn join_error(e: tokio::task::JoinError) -> Error {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    Error::Usage(format!("a bench task was cancelled: {e}"))
}

/// Subject ids of the bench: `bench-` and six digits (more digits past a million).
fn subject_id(i: usize) -> String {
    format!("bench-{i:06}")
}

/// Encoded length of a record entry: fixed part, subject, payload length,
/// ciphertext (plaintext and a 16-byte tag).
fn record_entry_len(size: usize, subjects: usize) -> usize {
    let subject = subject_id(subjects.saturating_sub(1)).len();
    storage::entry::FIXED_LEN + subject + 4 + size + 16
}

/// What the append tasks share.
struct Work {
    vault: Vault,
    subjects: Vec<String>,
    payloads: Arc<Payloads>,
    /// Records not yet claimed by any task.
    remaining: AtomicU64,
    size: usize,
    batch: u64,
    bar: ProgressBar,
}

impl Work {
    fn new(
        vault: Vault,
        records: u64,
        size: usize,
        batch: usize,
        subjects: usize,
        bar: ProgressBar,
    ) -> Self {
        Work {
            vault,
            subjects: (0..subjects).map(subject_id).collect(),
            payloads: Arc::new(Payloads::new(size)),
            remaining: AtomicU64::new(records),
            size,
            batch: batch as u64,
            bar,
        }
    }

    /// Claims up to one batch of records; 0 when none are left.
    fn claim(&self, deadline: Option<Instant>) -> u64 {
        claim(&self.remaining, self.batch, deadline)
    }

    fn record(&self, rng: &mut Rng) -> Append {
        let subject = &self.subjects[rng.below(self.subjects.len())];
        Append::record(subject.clone(), self.payloads.pick(rng, self.size).to_vec())
    }
}

/// Takes up to `batch` from `remaining`; 0 when it is empty or the
/// deadline passed.
fn claim(remaining: &AtomicU64, batch: u64, deadline: Option<Instant>) -> u64 {
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return 0;
    }
    remaining
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            (r > 0).then(|| r - r.min(batch))
        })
        .map_or(0, |r| r.min(batch))
}

/// How a timed pass's connections pace `total` requests between them.
///
/// Without a rate, a closed loop: each connection sends its next request
/// when it has the last answer. Such a loop measures the latency of its
/// own pace: with C connections at R requests/s every request waits C/R
/// on average (Little's law), however quick the server.
///
/// With a rate, an open-loop schedule, as pgbench's `--rate` and wrk2 make
/// one: request `i` is due at `start + i / rate` whatever the answers do,
/// and is taken by whichever connection is free first. Its latency starts
/// ([`Slot::measured_from`]) at its due time when no connection was free
/// by then (the wait for one counts, as a user's request waits in a
/// pool), otherwise when it was sent: the tokio timer wakes a sleeping
/// connection up to a millisecond after the due time, and that delay is
/// the load generator's, not the server's.
pub(super) struct Pace {
    next: AtomicU64,
    total: u64,
    /// The schedule's start and requests per second.
    schedule: Option<(Instant, f64)>,
    /// No request is taken at or after it.
    deadline: Option<Instant>,
    /// Requests taken after their due time: no connection was free.
    late: AtomicU64,
}

/// When a scheduled request was due, and when a connection took it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub due: Instant,
    /// When the connection that took it was free to send.
    pub taken: Instant,
}

impl Slot {
    /// Where the request's latency starts, given when it was sent.
    pub fn measured_from(&self, sent: Instant) -> Instant {
        if self.late() {
            self.due
        } else {
            sent
        }
    }

    /// Whether the request found no connection free at its due time.
    pub fn late(&self) -> bool {
        self.taken > self.due
    }
}

impl Pace {
    /// `total` requests from `start`, at `rate` per second if given.
    pub fn new(rate: Option<f64>, total: u64, start: Instant) -> Pace {
        Pace {
            next: AtomicU64::new(0),
            total,
            schedule: rate.map(|r| (start, r)),
            deadline: None,
            late: AtomicU64::new(0),
        }
    }

    /// This pace, ending at `deadline` too: on a schedule, every request
    /// due before it is made (one taken late is counted late, as any);
    /// in a closed loop, none is taken at or after it.
    pub fn until(mut self, deadline: Option<Instant>) -> Pace {
        self.deadline = deadline;
        self
    }

    /// With a schedule, how many requests found no connection free at
    /// their due time.
    pub fn behind_schedule(&self) -> Option<u64> {
        self.schedule.map(|_| self.late.load(Ordering::Acquire))
    }

    /// The next request for a connection that is free now; `None` when
    /// every request was taken.
    pub fn take(&self) -> Option<Turn> {
        self.take_at(Instant::now())
    }

    /// The next request for a connection free since `taken`.
    fn take_at(&self, taken: Instant) -> Option<Turn> {
        if self.schedule.is_none() && self.deadline.is_some_and(|d| taken >= d) {
            return None;
        }
        let index = self
            .next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.total).then_some(n + 1)
            })
            .ok()?;
        let slot = self.schedule.map(|(start, rate)| Slot {
            due: start + Duration::from_secs_f64(index as f64 / rate),
            taken,
        });
        if let (Some(s), Some(d)) = (slot, self.deadline) {
            if s.due >= d {
                return None;
            }
        }
        if slot.is_some_and(|s| s.late()) {
            self.late.fetch_add(1, Ordering::AcqRel);
        }
        Some(Turn { index, slot })
    }
}

/// One request of a [`Pace`].
pub(super) struct Turn {
    /// Its place among the pass's requests, from 0.
    pub index: u64,
    /// With a rate: when it is due.
    slot: Option<Slot>,
}

impl Turn {
    /// Waits until the request is due (not at all in a closed loop) and
    /// returns where its latency starts ([`Slot::measured_from`]).
    pub async fn start(&self) -> Instant {
        if let Some(s) = &self.slot {
            tokio::time::sleep_until(s.due.into()).await;
        }
        let now = Instant::now();
        self.slot.map_or(now, |s| s.measured_from(now))
    }
}

/// Checks a `--rate` flag: requests per second, positive and finite.
pub(super) fn check_rate(rate: Option<f64>) -> Result<()> {
    check(
        rate.is_none_or(|r| r.is_finite() && (1.0..=10_000_000.0).contains(&r)),
        || "--rate must be between 1 and 10,000,000 requests per second".into(),
    )
}

/// What the append tasks measured.
struct Stats {
    hist: Histogram<u64>,
    records: u64,
    appends: u64,
    /// The last seq of each acknowledged append's group; distinct values
    /// count the groups.
    group_ends: Vec<u64>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            hist: new_histogram(),
            records: 0,
            appends: 0,
            group_ends: Vec::new(),
        }
    }

    /// Counts one acknowledged append request of `records` records that
    /// took `latency`, whose group ends at `group_end` (a request is never
    /// split between groups: its receipts share a head).
    fn record(&mut self, latency: Duration, records: usize, group_end: Option<u64>) {
        self.hist.saturating_record(micros(latency));
        self.appends += 1;
        self.records += records as u64;
        if let Some(end) = group_end {
            self.group_ends.push(end);
        }
    }

    fn merge(&mut self, other: Stats) {
        add_histogram(&mut self.hist, &other.hist);
        self.records += other.records;
        self.appends += other.appends;
        self.group_ends.extend(other.group_ends);
    }

    fn groups(&self) -> u64 {
        let mut ends = self.group_ends.clone();
        ends.sort_unstable();
        ends.dedup();
        ends.len() as u64
    }
}

/// Latencies in microseconds, from 1 µs to an hour, 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs `clients` tasks, each keeping `pipeline` appends in flight until
/// no records are left to claim or the deadline passed.
async fn drive(
    work: &Arc<Work>,
    clients: usize,
    pipeline: usize,
    deadline: Option<Instant>,
) -> Result<Stats> {
    let mut set = JoinSet::new();
    for id in 0..clients {
        set.spawn(client(work.clone(), id as u64, pipeline, deadline));
    }
    let mut total = Stats::new();
    join_each(set, |s| total.merge(s)).await?;
    Ok(total)
}

/// One client: `pipeline` appends in flight.
async fn client(
    work: Arc<Work>,
    id: u64,
    pipeline: usize,
    deadline: Option<Instant>,
) -> Result<Stats> {
    let mut rng = Rng::new(id);
    pipelined(pipeline, &work.bar, || {
        let n = work.claim(deadline);
        if n == 0 {
            return None;
        }
        let items: Vec<Append> = (0..n).map(|_| work.record(&mut rng)).collect();
        let w = work.clone();
        Some(async move {
            let receipts = w.vault.append_batch(items).await?;
            Ok((receipts.len(), receipts.last().map(|r| r.head.last_seq)))
        })
    })
    .await
}

/// Keeps up to `pipeline` appends in flight until `next` has none left,
/// all polled by the calling task (as a service pipelining its requests
/// would: no task spawned per append). Each is timed from its first poll,
/// which comes as soon as it is queued, until it resolved; it resolves to
/// the records it appended and the last seq of the commit group that
/// holds them.
async fn pipelined<F>(
    pipeline: usize,
    bar: &ProgressBar,
    mut next: impl FnMut() -> Option<F>,
) -> Result<Stats>
where
    F: std::future::Future<Output = Result<(usize, Option<u64>)>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let mut stats = Stats::new();
    let mut in_flight = FuturesUnordered::new();
    let mut exhausted = false;
    loop {
        while !exhausted && in_flight.len() < pipeline {
            let Some(append) = next() else {
                exhausted = true;
                break;
            };
            in_flight.push(async move {
                let start = Instant::now();
                let r = append.await;
                (start.elapsed(), r)
            });
        }
        let Some((latency, appended)) = in_flight.next().await else {
            break;
        };
        let (records, group_end) = appended?;
        stats.record(latency, records, group_end);
        bar.inc(records as u64);
    }
    Ok(stats)
}

/// A pool of random bytes that payloads are sliced from: random enough for
/// a storage bench (no compression or dedup applies), without spending CPU
/// on a generator while the vault is measured.
#[derive(Debug)]
struct Payloads(Vec<u8>);

impl Payloads {
    fn new(size: usize) -> Self {
        let mut pool = vec![0u8; (1 << 20).max(4 * size)];
        storage::crypto::random_bytes(&mut pool);
        Payloads(pool)
    }

    fn pick(&self, rng: &mut Rng, len: usize) -> &[u8] {
        let off = rng.below(self.0.len() - len + 1);
        &self.0[off..off + len]
    }
}

/// splitmix64: a tiny, fast generator for picking subjects and offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough below `n` (> 0) for a bench.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Raw sled, one writer thread: `records` inserts of `size` bytes under
/// big-endian u64 keys, with `flush` + `fdatasync` of sled's data file
/// after every `sync_every` inserts and after the last: sled made durable
/// as sled offers it. Sled is configured like the vault's store (segment
/// size, cache, mode). The vault makes its groups durable through its own
/// write-ahead file instead (docs/storage.md), so the difference between
/// the runs is the vault's whole write path against sled used plainly.
fn sled_baseline(
    dir: &Path,
    records: u64,
    size: usize,
    sync_every: u64,
    payloads: &Payloads,
    bar: &ProgressBar,
) -> Result<SledRun> {
    let io = |source: std::io::Error| Error::File {
        path: dir.display().to_string(),
        error: source,
    };
    let db = sled::Config::new()
        .path(dir)
        .segment_size(16 * 1024 * 1024)
        .cache_capacity(Options::default().cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| io(e.into()))?;
    let data = File::open(dir.join("db")).map_err(io)?;
    let mut rng = Rng::new(sync_every);
    let mut hist = new_histogram();
    let mut unsynced = 0u64;
    let start = Instant::now();
    for i in 0..records {
        db.insert(i.to_be_bytes(), payloads.pick(&mut rng, size))
            .map_err(|e| io(e.into()))?;
        unsynced += 1;
        if unsynced == sync_every || i + 1 == records {
            unsynced = 0;
            let t = Instant::now();
            db.flush().map_err(|e| io(e.into()))?;
            data.sync_data().map_err(io)?;
            hist.saturating_record(micros(t.elapsed()));
            bar.set_position(i + 1);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(SledRun {
        sync_every,
        records,
        elapsed_s: secs,
        records_per_s: records as f64 / secs,
        sync_latency_us: Latency::of(&hist),
        vault_ratio: 0.0,
    })
}

/// BLAKE3 hashes per second of `len`-byte buffers on this thread.
fn blake3_rate(payloads: &Payloads, len: usize, n: u64) -> f64 {
    let pool = &payloads.0;
    let span = pool.len() - len + 1;
    let mut acc = 0u8;
    let start = Instant::now();
    let mut off = 0usize;
    for _ in 0..n {
        let h = blake3::hash(black_box(&pool[off..off + len]));
        acc ^= h.as_bytes()[0];
        // Step through the pool so that every input is a different buffer.
        off = (off + 4099) % span;
    }
    black_box(acc);
    n as f64 / start.elapsed().as_secs_f64()
}

/// Hashes per second on this thread of `n` buffers of `len` bytes, 64 at a
/// time through `storage::entry::entry_hashes` (which hashes the domain tag
/// before each, so the buffers are that much shorter).
fn blake3_side_by_side_rate(payloads: &Payloads, len: usize, n: u64) -> f64 {
    let len = len.saturating_sub(storage::entry::ENTRY_DOMAIN.len());
    let pool = &payloads.0;
    let span = pool.len() - len + 1;
    let mut acc = 0u8;
    let start = Instant::now();
    let mut off = 0usize;
    let mut done = 0u64;
    while done < n {
        let batch = (n - done).min(64) as usize;
        let inputs: Vec<&[u8]> = (0..batch)
            .map(|_| {
                let input = &pool[off..off + len];
                off = (off + 4099) % span;
                input
            })
            .collect();
        let hashes = storage::entry::entry_hashes(black_box(&inputs));
        acc ^= hashes.iter().fold(0, |a, h| a ^ h[0]);
        done += batch as u64;
    }
    black_box(acc);
    n as f64 / start.elapsed().as_secs_f64()
}

/// ed25519 `verify_strict` calls per second on this thread, over a message
/// as long as a signed head's (domain tag and 93 bytes).
fn verify_strict_rate(n: u64) -> f64 {
    let mut seed = [0u8; 32];
    storage::crypto::random_bytes(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    let public = key.verifying_key();
    let msg = [0x5au8; 116];
    let sig = key.sign(&msg);
    let start = Instant::now();
    for _ in 0..n {
        let ok = public
            .verify_strict(black_box(&msg), black_box(&sig))
            .is_ok();
        assert!(ok, "verify_strict rejected a signature made here");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn secs_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let lead = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        r => r,
    };
    let mut out = digits[..lead].to_string();
    for group in digits.as_bytes()[lead..].chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|&b| char::from(b)));
    }
    out
}

fn rate(r: f64) -> String {
    thousands(r.round() as u64)
}

/// The latency table every workload prints: a name column, a rate, one
/// column of the workload's choosing (a ratio, a count), then the
/// percentiles of a [`Latency`], all in µs.
#[derive(Debug, Clone, Copy)]
struct LatencyTable {
    /// Width of the name column.
    name: usize,
    /// Width of the free column.
    extra: usize,
}

impl LatencyTable {
    fn header(&self, s: &mut String, rate_title: &str, extra_title: &str) {
        self.line(
            s,
            "",
            rate_title,
            extra_title,
            ["p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"].map(String::from),
        );
    }

    fn row(&self, s: &mut String, name: &str, per_s: f64, extra: &str, l: &Latency) {
        self.line(
            s,
            name,
            &rate(per_s),
            extra,
            [l.p50, l.p90, l.p99, l.p999, l.max].map(|v| v.to_string()),
        );
    }

    fn line(&self, s: &mut String, name: &str, per_s: &str, extra: &str, cols: [String; 5]) {
        use std::fmt::Write;
        let [p50, p90, p99, p999, max] = cols;
        let _ = writeln!(
            s,
            "  {name:<nw$} {per_s:>10} {extra:>ew$} | {p50:>8} {p90:>8} {p99:>8} {p999:>8} {max:>8}",
            nw = self.name,
            ew = self.extra,
        );
    }
}

impl Report {
    /// The human table `vault-bench` prints by default.
    pub fn table(&self) -> String {
        match self {
            Report::Append(r) => r.table(),
            Report::Verify(r) => r.table(),
            Report::Redeem(r) => r.table(),
            Report::Authorize(r) => r.table(),
            Report::Mixed(r) => r.table(),
            Report::Growth(r) => r.table(),
        }
    }
}

impl AppendReport {
    fn table(&self) -> String {
        use std::fmt::Write;
        let p = &self.params;
        let t = &self.throughput;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench append: {}", self.target.describe());
        let _ = writeln!(
            s,
            "  {} records x {} B over {} subjects; {} clients x pipeline {}, batch {}",
            thousands(t.records),
            p.size,
            thousands(p.subjects as u64),
            p.clients,
            p.pipeline,
            p.batch
        );
        let _ = writeln!(
            s,
            "  {} log entries in {} commit groups ({:.0} entries/group), {:.2} s",
            thousands(t.log_entries),
            thousands(t.commit_groups),
            t.log_entries as f64 / t.commit_groups.max(1) as f64,
            t.elapsed_s
        );
        if let Some(pl) = &t.pipeline {
            let _ = writeln!(s, "  {}", pl.describe());
        }
        let _ = writeln!(s);
        let table = LatencyTable { name: 28, extra: 8 };
        table.header(&mut s, "records/s", "vault/x");
        let row = |s: &mut String, name: &str, per_s: f64, ratio: &str, l: &Latency| {
            table.row(s, name, per_s, ratio, l);
        };
        let name = if self.target.kind == "embedded" {
            "vault append (durable)"
        } else {
            "protocol append (durable)"
        };
        row(&mut s, name, t.records_per_s, "", &self.latency_us);
        if let Some(e) = &self.embedded {
            row(
                &mut s,
                "embedded engine, same params",
                e.records_per_s,
                &format!("{:.2}x", e.protocol_ratio),
                &e.latency_us,
            );
        }
        for b in self.baseline.iter().flatten() {
            row(
                &mut s,
                &format!("sled, sync every {}", b.sync_every),
                b.records_per_s,
                &format!("{:.2}x", b.vault_ratio),
                &b.sync_latency_us,
            );
        }
        if let Some(r) = &self.redis {
            row(
                &mut s,
                "redis SET (appendfsync always)",
                r.run.ops_per_s,
                &format!("{:.2}x", r.rate_ratio),
                &r.run.latency_us,
            );
        }
        if let Some(r) = &self.postgres {
            row(
                &mut s,
                "postgres INSERT (durable)",
                r.run.ops_per_s,
                &format!("{:.2}x", r.rate_ratio),
                &r.run.latency_us,
            );
        }
        let _ = writeln!(s);
        if let Some(r) = &self.redis {
            let _ = writeln!(
                s,
                "  protocol append over Redis SET: p50 {:.2}x, p99 {:.2}x (goal: p50 at most 1.2x)",
                r.p50_ratio, r.p99_ratio
            );
            let _ = writeln!(
                s,
                "  redis {}: appendfsync always, {} client(s) on persistent plaintext connections, one SET of {} B at a time",
                r.run.version, p.clients, r.run.value_bytes
            );
        }
        if let Some(r) = &self.postgres {
            let _ = writeln!(
                s,
                "  protocol append over PostgreSQL INSERT: p50 {:.2}x, p99 {:.2}x",
                r.p50_ratio, r.p99_ratio
            );
            let _ = writeln!(
                s,
                "  postgres {} at {}: synchronous_commit {}, {} client(s) over plaintext TCP, one INSERT of a {} B row at a time",
                r.run.version, r.run.server, r.run.synchronous_commit, r.run.clients, r.run.row_bytes
            );
        }
        let _ = write!(
            s,
            "  latency: vault = one append call until durable; sled = one flush + fdatasync"
        );
        if self.redis.is_some() {
            let _ = write!(s, "; redis = one SET round trip");
        }
        if self.postgres.is_some() {
            let _ = write!(s, "; postgres = one INSERT round trip, commit included");
        }
        if self.embedded.is_some() {
            let _ = write!(
                s,
                "\n  ratio column: protocol records/s divided by each baseline's (the embedded engine's, sled's)"
            );
        }
        s
    }
}

impl VerifyReport {
    fn table(&self) -> String {
        use std::fmt::Write;
        let b = &self.build;
        let t = &self.throughput;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench verify: {}", self.target.describe());
        let _ = writeln!(
            s,
            "  built {} records x {} B in {} commit groups: {:.1} s ({} records/s)",
            thousands(b.records),
            self.params.size,
            thousands(b.commit_groups),
            b.elapsed_s,
            rate(b.records_per_s)
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "  {:<38} {:>12} {:>10}", "", "per s", "time s");
        let _ = writeln!(
            s,
            "  {:<38} {:>12} {:>10.3}",
            format!("storage::verify, {} entries", thousands(t.entries)),
            rate(t.entries_per_s),
            t.elapsed_s
        );
        if let Some(base) = &self.baseline {
            let _ = writeln!(
                s,
                "  {:<38} {:>12} {:>10.3}",
                format!("BLAKE3 of {} B, 1 core", base.blake3_input_bytes),
                rate(base.blake3_per_s),
                base.blake3_hashes as f64 / base.blake3_per_s
            );
            let _ = writeln!(
                s,
                "  {:<38} {:>12} {:>10.3}",
                format!("BLAKE3 of {} B, 64 side by side", base.blake3_input_bytes),
                rate(base.blake3_side_by_side_per_s),
                base.blake3_hashes as f64 / base.blake3_side_by_side_per_s
            );
            let _ = writeln!(
                s,
                "  {:<38} {:>12} {:>10.3}",
                "ed25519 verify_strict, 1 core",
                rate(base.verify_strict_per_s),
                base.verify_strict_calls as f64 / base.verify_strict_per_s
            );
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "  verify / BLAKE3: {:.2}x; one-core floor (hash every entry, check every head once): {:.3} s",
                base.ratio_vs_blake3, base.one_core_floor_s
            );
            let _ = writeln!(s, "  floor / verify time: {:.2}x", base.ratio_vs_floor);
        }
        if let Some(r) = &self.remote {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "  {:<38} {:>12} {:>10.3}",
                format!("vault-verify --remote (TLS), {}", thousands(r.entries)),
                rate(r.entries_per_s),
                r.elapsed_s
            );
            let _ = write!(
                s,
                "  remote / storage::verify: {:.2}x; {} groups, {} receipts checked, {} entries per page",
                r.ratio_vs_local,
                thousands(r.groups),
                thousands(r.receipts),
                thousands(u64::from(r.page_entries))
            );
        }
        s.trim_end().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn claims_never_exceed_the_records() {
        let remaining = AtomicU64::new(10);
        let claims: Vec<u64> = (0..5).map(|_| claim(&remaining, 4, None)).collect();
        assert_eq!(claims, vec![4, 4, 2, 0, 0]);
        let past = Instant::now();
        assert_eq!(claim(&AtomicU64::new(10), 4, Some(past)), 0);
    }

    #[test]
    fn a_schedule_spaces_its_requests_at_the_rate_and_ends() {
        let start = Instant::now();
        let pace = Pace::new(Some(1000.0), 3, start);
        let taken = start + Duration::from_micros(1500);
        let turns: Vec<Turn> = std::iter::from_fn(|| pace.take_at(taken)).collect();
        let indexes: Vec<u64> = turns.iter().map(|t| t.index).collect();
        assert_eq!(indexes, [0, 1, 2]);
        let slots: Vec<Slot> = turns.iter().filter_map(|t| t.slot).collect();
        let dues: Vec<Duration> = slots.iter().map(|x| x.due - start).collect();
        assert_eq!(
            dues,
            [0, 1000, 2000].map(Duration::from_micros),
            "request i is due at start + i / rate"
        );
        assert!(pace.take_at(taken).is_none(), "no more than the total");

        // Taken 1.5 ms in: the first two were already due and waited for
        // a connection, so their latency starts at the due time; the
        // third is sent on time, and its latency starts when it is sent.
        let sent = start + Duration::from_micros(2300);
        let late: Vec<bool> = slots.iter().map(Slot::late).collect();
        assert_eq!(late, [true, true, false]);
        assert_eq!(pace.behind_schedule(), Some(2));
        assert_eq!(slots[0].measured_from(sent), slots[0].due);
        assert_eq!(slots[1].measured_from(sent), slots[1].due);
        assert_eq!(slots[2].measured_from(sent), sent);
    }

    #[test]
    fn a_deadline_ends_a_pace_before_its_total() {
        let start = Instant::now();
        // On a schedule: the requests due before the deadline, even those
        // taken after it, late.
        let deadline = start + Duration::from_micros(2500);
        let pace = Pace::new(Some(1000.0), 10, start).until(Some(deadline));
        let taken = deadline + Duration::from_millis(1);
        let indexes: Vec<u64> = std::iter::from_fn(|| pace.take_at(taken))
            .map(|t| t.index)
            .collect();
        assert_eq!(indexes, [0, 1, 2]);
        assert_eq!(pace.behind_schedule(), Some(3));
        // In a closed loop: none taken once the deadline has come.
        let deadline = start + Duration::from_millis(1);
        let pace = Pace::new(None, 10, start).until(Some(deadline));
        assert!(pace.take_at(start).is_some());
        assert!(pace.take_at(deadline).is_none());
    }

    #[test]
    fn a_closed_loop_hands_out_each_index_once_and_never_late() {
        let pace = Pace::new(None, 3, Instant::now());
        let turns: Vec<(u64, bool)> = std::iter::from_fn(|| pace.take())
            .map(|t| (t.index, t.slot.is_some()))
            .collect();
        assert_eq!(turns, [(0, false), (1, false), (2, false)]);
        assert_eq!(pace.behind_schedule(), None);
    }

    #[test]
    fn rates_outside_the_range_are_refused() {
        assert!(check_rate(None).is_ok());
        assert!(check_rate(Some(10_000.0)).is_ok());
        for bad in [0.0, 0.5, -3.0, f64::NAN, f64::INFINITY, 1e12] {
            assert!(
                matches!(check_rate(Some(bad)), Err(Error::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn picks_stay_in_the_pool() {
        let pool = Payloads::new(100);
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert_eq!(pool.pick(&mut rng, 100).len(), 100);
            assert!(rng.below(7) < 7);
        }
        assert_eq!(record_entry_len(512, 10_000), 68 + 12 + 4 + 512 + 16);
    }
}
