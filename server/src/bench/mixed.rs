//! Appends, redemptions and authorizations together against one `vaultd`,
//! in a given ratio, with each of them alone as the same-run baseline.
//!
//! Setup (not timed): one vault holding what each workload's own setup
//! writes (the demo seed and policies of [`super::http`], the partner,
//! gateway and subject of [`super::redeem`], a writer key), and `vaultd`
//! in this process with its shim when authorizations are in the ratio.
//! Every client opens its connections before the clock starts.
//!
//! Timed: `clients` tasks, each doing one operation at a time until
//! `requests` operations were claimed between them or the deadline passed.
//! Operation `i` (a counter the clients share) is `schedule[i % len]`,
//! where the schedule spreads the ratio's kinds evenly over one cycle
//! ([`Ratio::schedule`]): a deterministic interleaving, so that the count
//! of each kind is exact for a given `requests`. The operations are the
//! other workloads' own, called one at a time:
//!
//! | kind | what one operation is | latency |
//! |---|---|---|
//! | append | one `Append` of a `size`-byte record on the client's persistent writer connection (`super::protocol::send`) | until its receipt (durable) |
//! | redeem | a `Mint` on the client's persistent gateway connection (`super::redeem::mint_one`), then a redemption on a new connection (`super::redeem::redeem_one`) | connect until the data, as in `redeem`; the mint is reported on its own row |
//! | authorize | `POST /v1/authorize` on the client's keep-alive HTTP connection (`super::http::send`) | until the whole body is read |
//!
//! The `all` row counts every operation, a redeem's latency being its mint
//! and its redemption together.
//!
//! With `baseline`, each kind with a non-zero weight then runs alone as its
//! pure workload, with the same total client count and as many operations
//! as the mixed run did of that kind, each against its own fresh vault in
//! the same invocation: `append --protocol --pipeline 1`, `redeem`
//! (against its resumed-session pass with TLS) and `authorize` (whose
//! health phase is run and ignored). The ratio column is the kind's rate
//! in the mixed run over its rate alone.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, Connector};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;

use super::inproc::{self, InProcess};
use super::{
    add_histogram, check, check_common, create_vault, http, join_each, micros, new_histogram,
    protocol, redeem, scratch, thousands, AppendParams, AuthorizeParams, Latency, LatencyTable,
    Progress, RedeemParams, Rng, Stats, Target, TargetInfo,
};
use crate::{Error, Result};

/// Largest weight of one kind in a ratio: keeps the schedule short.
pub const MAX_WEIGHT: u32 = 1_000;

/// Most operations one run claims.
pub const MAX_REQUESTS: u64 = 100_000_000;

/// One kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Append,
    Redeem,
    Authorize,
}

impl Op {
    /// In the order of a ratio's parts.
    pub const ALL: [Op; 3] = [Op::Append, Op::Redeem, Op::Authorize];

    pub fn name(self) -> &'static str {
        match self {
            Op::Append => "append",
            Op::Redeem => "redeem",
            Op::Authorize => "authorize",
        }
    }
}

/// `APPEND:REDEEM:AUTHORIZE` weights, e.g. `8:1:1`. At least one is above
/// zero, none above [`MAX_WEIGHT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ratio {
    pub append: u32,
    pub redeem: u32,
    pub authorize: u32,
}

impl Default for Ratio {
    fn default() -> Self {
        Ratio {
            append: 8,
            redeem: 1,
            authorize: 1,
        }
    }
}

/// Why a ratio does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatioError {
    #[error("a ratio has three parts, APPEND:REDEEM:AUTHORIZE (e.g. 8:1:1), not {0}")]
    Parts(usize),
    #[error("ratio part {0:?} is not a whole number from 0 to {MAX_WEIGHT}")]
    Weight(String),
    #[error("the ratio 0:0:0 runs nothing: give at least one kind a weight above 0")]
    AllZero,
}

impl FromStr for Ratio {
    type Err = RatioError;

    fn from_str(s: &str) -> Result<Self, RatioError> {
        let parts: Vec<&str> = s.split(':').collect();
        let [a, r, z] = parts[..] else {
            return Err(RatioError::Parts(parts.len()));
        };
        let weight = |p: &str| {
            // Digits only: `u32::from_str` would also take a sign.
            p.trim()
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| p.trim().parse::<u32>().ok())
                .flatten()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| RatioError::Weight(p.to_string()))
        };
        let ratio = Ratio {
            append: weight(a)?,
            redeem: weight(r)?,
            authorize: weight(z)?,
        };
        if ratio.total() == 0 {
            return Err(RatioError::AllZero);
        }
        Ok(ratio)
    }
}

impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.append, self.redeem, self.authorize)
    }
}

impl Ratio {
    pub fn weight(&self, op: Op) -> u32 {
        match op {
            Op::Append => self.append,
            Op::Redeem => self.redeem,
            Op::Authorize => self.authorize,
        }
    }

    fn total(&self) -> u64 {
        Op::ALL.iter().map(|op| u64::from(self.weight(*op))).sum()
    }

    /// One cycle of operations, each kind as often as its weight, spread
    /// evenly (smooth weighted round robin: each step, every kind gains its
    /// weight in credit and the richest goes, paying the total). `8:1:1`
    /// gives `A A A A R A A A A Z`-like cycles rather than eight appends in
    /// a row.
    pub fn schedule(&self) -> Vec<Op> {
        let total = self.total() as i64;
        let mut credit = [0i64; 3];
        let mut out = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (k, op) in Op::ALL.iter().enumerate() {
                credit[k] += i64::from(self.weight(*op));
                if credit[k] > credit[best] {
                    best = k;
                }
            }
            credit[best] -= total;
            out.push(Op::ALL[best]);
        }
        out
    }

    /// How many of the first `n` operations of the schedule are `op`.
    pub fn count(&self, op: Op, n: u64) -> u64 {
        let schedule = self.schedule();
        let len = schedule.len() as u64;
        let rest = (n % len) as usize;
        n / len * u64::from(self.weight(op))
            + schedule[..rest].iter().filter(|o| **o == op).count() as u64
    }
}

/// Parameters of [`super::Workload::Mixed`].
#[derive(Debug, Clone, Serialize)]
pub struct MixedParams {
    /// Weights of appends, redemptions and authorizations (default 8:1:1).
    pub ratio: Ratio,
    /// Concurrent clients, each one operation at a time (default 50).
    pub clients: usize,
    /// Operations between all clients (default 20,000).
    pub requests: u64,
    /// Stop claiming operations after this long (default: no limit).
    #[serde(rename = "duration_s", serialize_with = "super::secs_opt")]
    pub duration: Option<Duration>,
    /// Plaintext bytes per appended record (default 512).
    pub size: usize,
    /// Distinct subjects of the appended records (default 10,000).
    pub subjects: usize,
    /// Also run each kind alone at the same client count (default false).
    pub baseline: bool,
    /// Slow clients per port for a second, attacked run (default 0: none);
    /// see [`super::slowloris`].
    pub slowloris: usize,
    /// Time between two bytes of a slow client (default 2 s).
    #[serde(rename = "slowloris_interval_s", serialize_with = "super::secs")]
    pub slowloris_interval: Duration,
    /// Connection limit of both ports (default: the servers' 1024).
    pub max_connections: Option<usize>,
}

impl Default for MixedParams {
    fn default() -> Self {
        MixedParams {
            ratio: Ratio::default(),
            clients: 50,
            requests: 20_000,
            duration: None,
            size: 512,
            subjects: 10_000,
            baseline: false,
            slowloris: 0,
            slowloris_interval: Duration::from_secs(2),
            max_connections: None,
        }
    }
}

impl MixedParams {
    pub(super) fn validate(&self) -> Result<()> {
        check(self.ratio.total() > 0, || RatioError::AllZero.to_string())?;
        check(
            Op::ALL
                .iter()
                .all(|op| self.ratio.weight(*op) <= MAX_WEIGHT),
            || format!("ratio weights go up to {MAX_WEIGHT}"),
        )?;
        check(self.requests <= MAX_REQUESTS, || {
            format!(
                "--requests must be between 1 and {}",
                thousands(MAX_REQUESTS)
            )
        })?;
        check_common(self.requests, self.size, self.subjects)?;
        // Every client holds a keep-alive connection to the shim when
        // authorizations are in the mix, and the shim takes 1024.
        let max_clients = if self.ratio.authorize > 0 {
            1024
        } else {
            super::MAX_CLIENTS
        };
        check((1..=max_clients).contains(&self.clients), || {
            format!("--clients must be between 1 and {max_clients}")
        })?;
        // A client holds a writer and a gateway connection and opens one
        // per redemption: 3 per client, within the server's limit (1,024
        // unless --max-connections says otherwise).
        let limit = self.max_connections.unwrap_or(1024);
        check(limit >= 3 * self.clients && limit <= 1_000_000, || {
            format!(
                "the server's {limit} connections (--max-connections) must be at least 3 per \
                 client (a writer, a gateway and a redemption connection each): at most {} \
                 --clients, or a higher --max-connections",
                limit / 3
            )
        })?;
        check(self.slowloris <= 100_000, || {
            "--slowloris takes at most 100,000 slow clients per port".to_string()
        })
    }
}

/// Result of [`super::Workload::Mixed`].
#[derive(Debug, Clone, Serialize)]
pub struct MixedReport {
    pub target: TargetInfo,
    pub params: MixedParams,
    pub elapsed_s: f64,
    /// One entry per kind with a non-zero weight, in ratio order, then
    /// `all`.
    pub ops: Vec<OpRun>,
    /// Commit groups (signed heads) the appends' receipts named: the
    /// groups other writes (burns, mints) share with them are counted too.
    pub append_commit_groups: u64,
    /// The mint before each redemption (none without redemptions).
    pub mint_latency_us: Option<Latency>,
    /// With `baseline`: each kind alone, in the order of `ops`.
    pub baseline: Option<Vec<PureRun>>,
    /// With `slowloris`: the same run again with the slow clients on.
    pub slowloris: Option<SlowlorisRun>,
}

/// The mixed run repeated while slow clients hold connections.
#[derive(Debug, Clone, Serialize)]
pub struct SlowlorisRun {
    /// Slow clients per port.
    pub per_port: usize,
    pub elapsed_s: f64,
    /// As [`MixedReport::ops`], under attack; `p99_vs_normal` holds the
    /// kind's p99 latency under attack over its p99 in the normal run.
    pub ops: Vec<OpRun>,
    pub attack: super::slowloris::AttackStats,
}

/// One kind's share of the mixed run.
#[derive(Debug, Clone, Serialize)]
pub struct OpRun {
    /// "append", "redeem", "authorize" or "all".
    pub op: &'static str,
    pub count: u64,
    pub per_s: f64,
    pub latency_us: Latency,
    /// With `baseline`: `per_s` over the kind's rate when run alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_pure: Option<f64>,
    /// Under slowloris: the p99 latency over the kind's p99 in the run
    /// without attack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_vs_normal: Option<f64>,
}

/// A kind run alone as its own workload.
#[derive(Debug, Clone, Serialize)]
pub struct PureRun {
    pub op: &'static str,
    pub count: u64,
    pub clients: usize,
    pub per_s: f64,
    pub latency_us: Latency,
}

/// Runs the mixed workload against a `vaultd` started here, data under
/// `dir`; then, with `baseline`, each kind alone under `dir/pure-KIND`.
pub(super) async fn run(
    dir: &Path,
    mut info: TargetInfo,
    p: &MixedParams,
    progress: Progress,
) -> Result<MixedReport> {
    let tls = info.tls;
    let http = p.ratio.authorize > 0;
    if tls && http {
        return Err(Error::Usage(
            "authorize measures the shim in plaintext: drop --tls, or use a ratio with no authorize (e.g. 8:1:0)"
                .into(),
        ));
    }
    let vault_dir = dir.join("vault");
    let pure_dirs: Vec<_> = Op::ALL
        .iter()
        .map(|op| dir.join(format!("pure-{}", op.name())))
        .collect();
    let mut fresh = vec![vault_dir.clone()];
    if p.baseline {
        fresh.extend(pure_dirs.iter().cloned());
    }
    super::ensure_fresh(&fresh)?;
    let vault = create_vault(vault_dir).await?;
    let (demo, policies) = http::prepare(&vault).await?;
    let (partner_key, gateway_key) = redeem::prepare(&vault).await?;
    let server = InProcess::start(
        vault,
        dir,
        inproc::Options {
            tls,
            http,
            policies: http.then_some(policies),
            max_connections: p.max_connections,
        },
    )
    .await?;
    info.addr = Some(server.addr.to_string());
    let keys = Keys {
        writer: demo.writer,
        authorizer: demo.partner,
        gateway: gateway_key,
        partner: partner_key,
    };
    let measured = measure(&server, &keys, p, progress).await;
    let attacked = match (&measured, p.slowloris) {
        (Ok(_), n) if n > 0 => Some(measure_attacked(&server, &keys, p, progress).await),
        _ => None,
    };
    let stopped = server.stop().await;
    let (stats, elapsed) = measured?;
    let attacked = attacked.transpose()?;
    stopped?;

    let secs = elapsed.as_secs_f64();
    let mut ops = op_runs(p, &stats, secs);
    let slowloris = attacked.map(|(stats, elapsed, attack)| {
        let secs = elapsed.as_secs_f64();
        let mut runs = op_runs(p, &stats, secs);
        for r in &mut runs {
            let normal = ops.iter().find(|n| n.op == r.op);
            r.p99_vs_normal = normal
                .filter(|n| n.latency_us.p99 > 0)
                .map(|n| r.latency_us.p99 as f64 / n.latency_us.p99 as f64);
        }
        SlowlorisRun {
            per_port: p.slowloris,
            elapsed_s: secs,
            ops: runs,
            attack,
        }
    });

    let baseline = if p.baseline {
        let mut runs = Vec::new();
        for (op, pure_dir) in Op::ALL.iter().zip(&pure_dirs) {
            let Some(run) = ops.iter_mut().find(|r| r.op == op.name()) else {
                continue;
            };
            let pure = run_pure(*op, pure_dir, tls, run.count.max(1), p, progress).await?;
            run.vs_pure = Some(run.per_s / pure.per_s);
            runs.push(pure);
        }
        Some(runs)
    } else {
        None
    };
    Ok(MixedReport {
        target: info,
        params: p.clone(),
        elapsed_s: secs,
        ops,
        append_commit_groups: stats.append.groups(),
        mint_latency_us: (p.ratio.redeem > 0).then(|| Latency::of(&stats.mint)),
        baseline,
        slowloris,
    })
}

/// One row per kind with a weight, then `all`.
fn op_runs(p: &MixedParams, stats: &MixStats, secs: f64) -> Vec<OpRun> {
    let mut ops = Vec::new();
    for op in Op::ALL {
        if p.ratio.weight(op) == 0 {
            continue;
        }
        let hist = stats.hist(op);
        ops.push(OpRun {
            op: op.name(),
            count: hist.len(),
            per_s: hist.len() as f64 / secs,
            latency_us: Latency::of(hist),
            vs_pure: None,
            p99_vs_normal: None,
        });
    }
    ops.push(OpRun {
        op: "all",
        count: stats.all.len(),
        per_s: stats.all.len() as f64 / secs,
        latency_us: Latency::of(&stats.all),
        vs_pure: None,
        p99_vs_normal: None,
    });
    ops
}

/// The mixed run again while `p.slowloris` slow clients per port hold
/// connections (opened before the clock starts).
async fn measure_attacked(
    server: &InProcess,
    keys: &Keys,
    p: &MixedParams,
    progress: Progress,
) -> Result<(MixStats, Duration, super::slowloris::AttackStats)> {
    let attack = super::slowloris::Attack::start(
        server.addr,
        server.http.filter(|_| p.ratio.authorize > 0),
        p.slowloris,
        p.slowloris_interval,
        server.tls(),
    )
    .await;
    let open = attack.stats();
    let measured = measure(server, keys, p, progress).await;
    let mut stats = attack.stop().await;
    stats.open_protocol = open.open_protocol;
    stats.open_http = open.open_http;
    let (mix, elapsed) = measured?;
    Ok((mix, elapsed, stats))
}

/// `op` alone, `count` times, with the mixed run's clients, as its own
/// workload does it.
async fn run_pure(
    op: Op,
    dir: &Path,
    tls: bool,
    count: u64,
    p: &MixedParams,
    progress: Progress,
) -> Result<PureRun> {
    let (_, dir, info) = scratch(Some(dir), "in-process", tls)?;
    let (per_s, latency_us) = match op {
        Op::Append => {
            let target = Target::InProcess {
                dir: Some(dir),
                tls,
            };
            let ap = AppendParams {
                records: count,
                size: p.size,
                clients: p.clients,
                // One operation at a time per client, as in the mix.
                pipeline: 1,
                batch: 1,
                subjects: p.subjects,
                duration: None,
                baseline: false,
                redis: None,
                postgres: None,
            };
            let r = protocol::run_append(&target, &ap, progress).await?;
            (r.throughput.records_per_s, r.latency_us)
        }
        Op::Redeem => {
            let rp = RedeemParams {
                clients: p.clients,
                tokens: count,
                redis: None,
                rate: None,
                postgres: None,
            };
            let r = redeem::run(&dir, info, &rp, progress).await?;
            // With TLS, the resumed pass: the mix shares one connector too.
            let run = r
                .runs
                .last()
                .ok_or_else(|| Error::Usage("the redeem workload made no run".into()))?;
            (run.redemptions_per_s, run.latency_us)
        }
        Op::Authorize => {
            let ap = AuthorizeParams {
                clients: p.clients,
                requests: count,
                rate: None,
                duration: None,
                http_addr: None,
            };
            let r = http::run(&dir, info, &ap, progress).await?;
            (r.authorize.requests_per_s, r.authorize.latency_us)
        }
    };
    Ok(PureRun {
        op: op.name(),
        count,
        clients: p.clients,
        per_s,
        latency_us,
    })
}

/// API keys of the mixed vault.
struct Keys {
    /// Protocol appends.
    writer: String,
    /// The demo partner, for `/v1/authorize`.
    authorizer: String,
    /// Mints, for redemptions.
    gateway: String,
    /// Redemptions.
    partner: String,
}

/// What one client measured.
struct MixStats {
    append: Stats,
    redeem: Histogram<u64>,
    mint: Histogram<u64>,
    authorize: Histogram<u64>,
    all: Histogram<u64>,
}

impl MixStats {
    fn new() -> Self {
        MixStats {
            append: Stats::new(),
            redeem: new_histogram(),
            mint: new_histogram(),
            authorize: new_histogram(),
            all: new_histogram(),
        }
    }

    fn hist(&self, op: Op) -> &Histogram<u64> {
        match op {
            Op::Append => &self.append.hist,
            Op::Redeem => &self.redeem,
            Op::Authorize => &self.authorize,
        }
    }

    fn merge(&mut self, other: MixStats) {
        self.append.merge(other.append);
        for (mine, theirs) in [
            (&mut self.redeem, &other.redeem),
            (&mut self.mint, &other.mint),
            (&mut self.authorize, &other.authorize),
            (&mut self.all, &other.all),
        ] {
            add_histogram(mine, theirs);
        }
    }
}

/// What the client tasks share.
struct Shared {
    schedule: Vec<Op>,
    /// Operations claimed so far; the next one's index.
    issued: AtomicU64,
    requests: u64,
    deadline: Option<Instant>,
    records: protocol::Records,
    /// Partners connect anew for every token; one connector, so that TLS
    /// sessions resume as in `redeem`'s resumed pass.
    partner: Connector,
    authorize: http::Call,
    bar: ProgressBar,
}

impl Shared {
    /// The next operation, or `None` when all were claimed or time is up.
    fn next(&self) -> Option<Op> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self
            .issued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |i| {
                (i < self.requests).then_some(i + 1)
            })
            .ok()?;
        Some(self.schedule[(i % self.schedule.len() as u64) as usize])
    }
}

/// One client's connections, opened before the clock starts; a kind
/// without weight gets none.
struct Conns {
    writer: Option<Client>,
    gateway: Option<Client>,
    http: Option<http::Conn>,
}

async fn measure(
    server: &InProcess,
    keys: &Keys,
    p: &MixedParams,
    progress: Progress,
) -> Result<(MixStats, Duration)> {
    let writers = Connector::new(server.client_config(&keys.writer))?;
    let gateways = Connector::new(server.client_config(&keys.gateway))?;
    let mut clients = Vec::with_capacity(p.clients);
    for _ in 0..p.clients {
        let writer = if p.ratio.append > 0 {
            Some(writers.connect().await?)
        } else {
            None
        };
        let gateway = if p.ratio.redeem > 0 {
            Some(gateways.connect().await?)
        } else {
            None
        };
        let http = match server.http {
            Some(addr) if p.ratio.authorize > 0 => {
                let mut c = http::connect(addr).await?;
                // Clients send their first request at once: until then the
                // shim counts the connection as unfinished, and may close
                // it to admit a newer one.
                http::send(&mut c, &addr.to_string(), &http::health_call()).await?;
                Some(c)
            }
            _ => None,
        };
        clients.push(Conns {
            writer,
            gateway,
            http,
        });
    }

    let shared = Arc::new(Shared {
        schedule: p.ratio.schedule(),
        issued: AtomicU64::new(0),
        requests: p.requests,
        // Counted from here, after the connections.
        deadline: p.duration.map(|d| Instant::now() + d),
        records: protocol::Records::new(p.size, p.subjects),
        partner: Connector::new(server.client_config(&keys.partner))?,
        authorize: http::authorize_call(&keys.authorizer),
        bar: progress.phase("mixed", p.requests),
    });
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (id, conns) in clients.into_iter().enumerate() {
        set.spawn(client_task(shared.clone(), conns, id as u64));
    }
    let mut total = MixStats::new();
    join_each(set, |s| total.merge(s)).await?;
    let elapsed = start.elapsed();
    shared.bar.finish_and_clear();
    Ok((total, elapsed))
}

/// One client: the schedule's next operation, one at a time.
async fn client_task(shared: Arc<Shared>, mut conns: Conns, id: u64) -> Result<MixStats> {
    const NO_CONN: &str = "a client connects for every kind the ratio weighs";
    let mut stats = MixStats::new();
    let mut rng = Rng::new(id);
    while let Some(op) = shared.next() {
        let latency = match op {
            Op::Append => {
                // Built before the clock starts, as in the pure workload.
                let request = shared.records.request(&mut rng, 1, 1);
                let t = Instant::now();
                let receipts =
                    protocol::send(conns.writer.as_ref().expect(NO_CONN), request).await?;
                let latency = t.elapsed();
                stats.append.record(
                    latency,
                    receipts.len(),
                    receipts.last().map(|r| r.head.last_seq),
                );
                latency
            }
            Op::Redeem => {
                let t = Instant::now();
                let token = redeem::mint_one(conns.gateway.as_ref().expect(NO_CONN)).await?;
                let minted = Instant::now();
                stats.mint.saturating_record(micros(minted - t));
                redeem::redeem_one(&shared.partner, &token).await?;
                stats.redeem.saturating_record(micros(minted.elapsed()));
                t.elapsed()
            }
            Op::Authorize => {
                let conn = conns.http.as_mut().expect(NO_CONN);
                let t = Instant::now();
                http::send(conn, "localhost", &shared.authorize).await?;
                let latency = t.elapsed();
                stats.authorize.saturating_record(micros(latency));
                latency
            }
        };
        stats.all.saturating_record(micros(latency));
        shared.bar.inc(1);
    }
    Ok(stats)
}

impl MixedReport {
    pub(super) fn table(&self) -> String {
        use std::fmt::Write;
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench mixed: {}", self.target.describe());
        let all = self.ops.last().map_or(0, |r| r.count);
        let _ = writeln!(
            s,
            "  ratio {} (append:redeem:authorize); {} clients, one operation at a time each; {} operations, {} B records, {:.2} s",
            p.ratio,
            p.clients,
            thousands(all),
            p.size,
            self.elapsed_s
        );
        let _ = writeln!(s);
        let table = LatencyTable { name: 32, extra: 8 };
        table.header(&mut s, "per s", "vs pure");
        // One row per kind, its ratio in the last column; `mint`: the
        // latency of the redemptions' mints, on a row below theirs.
        let rows = |s: &mut String, ops: &[OpRun], mint: Option<&Latency>| {
            for r in ops {
                let label = match r.op {
                    "append" => "append (protocol, durable)",
                    "redeem" => "redeem (new connection)",
                    "authorize" => "authorize (HTTP)",
                    _ => "all operations",
                };
                let ratio = r
                    .vs_pure
                    .or(r.p99_vs_normal)
                    .map_or(String::new(), |x| format!("{x:.2}x"));
                let name = format!("{label} x{}", thousands(r.count));
                table.row(s, &name, r.per_s, &ratio, &r.latency_us);
                if let (Some(m), "redeem") = (mint, r.op) {
                    table.row(s, "  its mint (gateway)", r.per_s, "", m);
                }
            }
        };
        rows(&mut s, &self.ops, self.mint_latency_us.as_ref());
        for b in self.baseline.iter().flatten() {
            table.row(
                &mut s,
                &format!("{} alone, {} clients", b.op, b.clients),
                b.per_s,
                "",
                &b.latency_us,
            );
        }
        if let Some(a) = &self.slowloris {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "  again under slowloris: {} slow clients per port ({} protocol and {} HTTP open at the start, a byte every {:.1} s, {} closed by the server), {:.2} s",
                a.per_port,
                a.attack.open_protocol,
                a.attack.open_http,
                p.slowloris_interval.as_secs_f64(),
                thousands(a.attack.closed_by_server),
                a.elapsed_s
            );
            table.header(&mut s, "per s", "p99 vs");
            rows(&mut s, &a.ops, None);
        }
        let _ = writeln!(s);
        let _ = write!(
            s,
            "  latency: append until durable; redeem from connect to data (its mint on the row below it); authorize until the body is read; all: whole operations"
        );
        if self.slowloris.is_some() {
            let _ = write!(
                s,
                "\n  p99 vs: the kind's p99 under slowloris over its p99 in the run without it, same run (goal: at most 2x)"
            );
        }
        if self.baseline.is_some() {
            let _ = write!(
                s,
                "\n  vs pure: the kind's rate in the mix over its rate alone, same clients, same run"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse() {
        assert_eq!(
            "8:1:1".parse::<Ratio>(),
            Ok(Ratio {
                append: 8,
                redeem: 1,
                authorize: 1
            })
        );
        assert_eq!(
            "0:1:0".parse::<Ratio>(),
            Ok(Ratio {
                append: 0,
                redeem: 1,
                authorize: 0
            })
        );
        assert_eq!(
            " 2 : 0 : 3 ".parse::<Ratio>().map(|r| r.to_string()),
            Ok("2:0:3".into())
        );
        assert_eq!(
            "8:1:1".parse::<Ratio>().map(|r| r.to_string()),
            Ok("8:1:1".into())
        );
    }

    #[test]
    fn bad_ratios_are_typed_errors() {
        assert_eq!("a:b".parse::<Ratio>(), Err(RatioError::Parts(2)));
        assert_eq!(
            "a:b:c".parse::<Ratio>(),
            Err(RatioError::Weight("a".into()))
        );
        assert_eq!("0:0:0".parse::<Ratio>(), Err(RatioError::AllZero));
        assert_eq!("1:1:1:1".parse::<Ratio>(), Err(RatioError::Parts(4)));
        assert_eq!("".parse::<Ratio>(), Err(RatioError::Parts(1)));
        assert_eq!("8:1".parse::<Ratio>(), Err(RatioError::Parts(2)));
        for bad in [
            "-1:1:1",
            "+1:1:1",
            "1.5:1:1",
            "1::1",
            "1001:1:1",
            "99999999999:1:1",
        ] {
            assert!(
                matches!(bad.parse::<Ratio>(), Err(RatioError::Weight(_))),
                "{bad}"
            );
        }
        // The messages say what is expected.
        assert!(RatioError::Parts(2)
            .to_string()
            .contains("APPEND:REDEEM:AUTHORIZE"));
    }

    #[test]
    fn schedules_interleave_in_the_ratio() {
        let r: Ratio = "8:1:1".parse().expect("valid");
        let s = r.schedule();
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().filter(|o| **o == Op::Append).count(), 8);
        assert_eq!(s.iter().filter(|o| **o == Op::Redeem).count(), 1);
        assert_eq!(s.iter().filter(|o| **o == Op::Authorize).count(), 1);
        // Spread out: the two others are not next to each other.
        let redeem = s.iter().position(|o| *o == Op::Redeem).expect("one");
        let authorize = s.iter().position(|o| *o == Op::Authorize).expect("one");
        assert!(redeem.abs_diff(authorize) > 1, "{s:?}");

        let one: Ratio = "1:1:1".parse().expect("valid");
        assert_eq!(one.schedule(), vec![Op::Append, Op::Redeem, Op::Authorize]);
        let only: Ratio = "0:1:0".parse().expect("valid");
        assert_eq!(only.schedule(), vec![Op::Redeem]);
    }

    #[test]
    fn counts_are_exact_for_any_total() {
        for text in ["8:1:1", "0:1:0", "3:0:2", "7:5:3"] {
            let r: Ratio = text.parse().expect("valid");
            let s = r.schedule();
            for n in [0, 1, 9, 10, 11, 37, 1000] {
                let mut total = 0;
                for op in Op::ALL {
                    let naive = (0..n)
                        .filter(|i| s[(*i % s.len() as u64) as usize] == op)
                        .count() as u64;
                    assert_eq!(r.count(op, n), naive, "{text} {op:?} {n}");
                    total += naive;
                }
                assert_eq!(total, n);
            }
        }
    }

    #[test]
    fn params_are_checked() {
        let ok = MixedParams::default();
        assert!(ok.validate().is_ok());
        let zero = MixedParams {
            ratio: Ratio {
                append: 0,
                redeem: 0,
                authorize: 0,
            },
            ..MixedParams::default()
        };
        assert!(matches!(zero.validate(), Err(Error::Usage(_))));
        let many = MixedParams {
            clients: 2_000,
            ..MixedParams::default()
        };
        assert!(matches!(many.validate(), Err(Error::Usage(_))));
        // Without authorizations, more clients than the shim takes, as
        // long as the protocol port takes 3 connections each.
        let no_http = MixedParams {
            clients: 2_000,
            ratio: "1:1:0".parse().expect("valid"),
            max_connections: Some(6_000),
            ..MixedParams::default()
        };
        assert!(no_http.validate().is_ok());
        let over_the_port = MixedParams {
            max_connections: None,
            ..no_http
        };
        assert!(matches!(over_the_port.validate(), Err(Error::Usage(_))));
    }
}
