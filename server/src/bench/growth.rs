//! Cost growth with log size: one vault, grown in steps, measured at each
//! step, so that what gets slower as the log gets longer shows up as a
//! trend in one run.
//!
//! Setup (not timed): a fresh vault with a writer credential and what
//! [`super::redeem`] needs (`super::redeem::prepare`: a partner and a
//! gateway credential, one subject's record); `vaultd` in this process,
//! plaintext, without the shim.
//!
//! Then, for each size `N` of `sizes`, in ascending order:
//!
//! 1. Fill, not timed: `AppendBatch`es of up to [`FILL_BATCH`] records
//!    from `clients` connections, [`FILL_PIPELINE`] in flight on each
//!    (`super::protocol::measure`, the append workload's own driver),
//!    until the log holds `N` entries as `Health` counts them (the
//!    vault's durable length). Nothing is written when the earlier
//!    levels' measurements already took the log past `N`.
//! 2. Appends, timed: `window` single `Append`s of `size`-byte records,
//!    `clients` connections each keeping `pipeline` in flight, with the
//!    same driver; records/s, and the latency of each append until its
//!    receipt (durable).
//! 3. Redemptions, timed: `redemptions` cycles, one at a time: a `Mint`
//!    on a gateway connection opened for the level
//!    (`super::redeem::mint_one`), then a redemption on a new connection
//!    (`super::redeem::redeem_one`). The redemption's latency is from
//!    the connect call to the decoded data, as in `redeem`; the mints'
//!    latency is reported on its own. One cycle at a time, so that the
//!    figure is the cost of one redemption at that log size, not queueing.
//! 4. Memory: `VmRSS` and `VmHWM` of this process from
//!    `/proc/self/status` (`null` where there is none). `vaultd` runs in
//!    this process; the clients next to it are `clients` connections, a
//!    1 MiB pool of record bytes and a few histograms.
//!
//! Records go to [`SUBJECTS`] subjects, the append workload's default. The
//! first record of a subject also writes the subject's key entry, which is
//! why the fill reads the log's length rather than counting records.
//!
//! Data layout under the bench dir: `DIR/vault/`, as for every workload.

use std::path::Path;
use std::time::Instant;

use client::Connector;
use serde::Serialize;

use super::inproc::{self, InProcess};
use super::{
    check, check_clients, create_vault, micros, new_histogram, protocol, rate, redeem, thousands,
    AppendParams, Latency, Progress, TargetInfo, MAX_SIZE,
};
use crate::{Error, Result};

/// Distinct subjects of the appended records (the append workload's
/// default), spread evenly by a seeded generator.
pub const SUBJECTS: usize = 10_000;
/// Most records per `AppendBatch` while filling; fewer when records are
/// large (see [`fill_batch`]).
pub const FILL_BATCH: usize = 256;
/// `AppendBatch`es each fill connection keeps in flight: two, so that the
/// committer fills the next group while the syncer makes the last durable.
pub const FILL_PIPELINE: usize = 2;
/// Largest log size a run grows to, and largest window: a typo fails at
/// once rather than after hours of filling.
pub const MAX_ENTRIES: u64 = 100_000_000;

/// Parameters of [`super::Workload::Growth`].
#[derive(Debug, Clone, Serialize)]
pub struct GrowthParams {
    /// Log sizes, in entries, to measure at; strictly ascending (default
    /// 10,000, 100,000, 1,000,000, 10,000,000).
    pub sizes: Vec<u64>,
    /// Plaintext bytes per appended record (default 512).
    pub size: usize,
    /// Connections appending, in the fill and in the window (default 8).
    pub clients: usize,
    /// Single appends each connection keeps in flight in the window
    /// (default 8).
    pub pipeline: usize,
    /// Appends timed at each size (default 20,000).
    pub window: u64,
    /// Mint+redeem cycles timed at each size (default 500).
    pub redemptions: u64,
}

impl Default for GrowthParams {
    fn default() -> Self {
        GrowthParams {
            sizes: vec![10_000, 100_000, 1_000_000, 10_000_000],
            size: 512,
            clients: 8,
            pipeline: 8,
            window: 20_000,
            redemptions: 500,
        }
    }
}

impl GrowthParams {
    pub(super) fn validate(&self) -> Result<()> {
        check(!self.sizes.is_empty(), || {
            "--sizes needs at least one log size".into()
        })?;
        check(self.sizes.windows(2).all(|w| w[0] < w[1]), || {
            "--sizes must be strictly ascending (e.g. 10000,100000)".into()
        })?;
        check(
            self.sizes.iter().all(|n| (1..=MAX_ENTRIES).contains(n)),
            || {
                format!(
                    "every --sizes value must be between 1 and {}",
                    thousands(MAX_ENTRIES)
                )
            },
        )?;
        check(self.size <= MAX_SIZE, || {
            format!(
                "--size {} exceeds the largest record, {MAX_SIZE} bytes",
                self.size
            )
        })?;
        check_clients(self.clients, self.pipeline, 1)?;
        check((1..=MAX_ENTRIES).contains(&self.window), || {
            format!("--window must be between 1 and {}", thousands(MAX_ENTRIES))
        })?;
        check((1..=redeem::MAX_TOKENS).contains(&self.redemptions), || {
            format!(
                "--redemptions must be between 1 and {}",
                thousands(redeem::MAX_TOKENS)
            )
        })
    }

    /// The append driver's parameters for `records` records in requests
    /// of `batch`, `pipeline` in flight per connection.
    fn appends(&self, records: u64, batch: usize, pipeline: usize) -> AppendParams {
        AppendParams {
            records,
            size: self.size,
            clients: self.clients,
            pipeline,
            batch,
            subjects: SUBJECTS,
            duration: None,
            baseline: false,
            redis: None,
            postgres: None,
        }
    }
}

/// Records per `AppendBatch` while filling: [`FILL_BATCH`], or fewer so
/// that a request of `size`-byte records stays within half a frame.
pub fn fill_batch(size: usize) -> usize {
    // Subject, field name and framing add well under 64 bytes a record.
    (::protocol::MAX_FRAME_LEN / 2 / (size + 64)).clamp(1, FILL_BATCH)
}

/// Result of [`super::Workload::Growth`].
#[derive(Debug, Clone, Serialize)]
pub struct GrowthReport {
    pub target: TargetInfo,
    pub params: GrowthParams,
    /// Distinct subjects of the appended records ([`SUBJECTS`]).
    pub subjects: usize,
    /// Records per `AppendBatch` while filling.
    pub fill_batch: usize,
    /// One per size, in the order of `params.sizes`.
    pub levels: Vec<GrowthLevel>,
}

/// The measurements at one log size.
#[derive(Debug, Clone, Serialize)]
pub struct GrowthLevel {
    /// The size asked for, in entries.
    pub target_entries: u64,
    /// Entries in the log when this level's measurements began: at least
    /// `target_entries`; more when the earlier levels' windows and
    /// redemptions already passed it, or by one: the fill's last request
    /// may be a record of a new subject, which also writes its key entry.
    pub entries: u64,
    pub fill: FillStats,
    pub appends: AppendWindow,
    /// This level's appends/s over the first level's.
    pub vs_first: f64,
    pub redemptions: RedeemCycles,
    /// After this level's measurements; `null` without `/proc/self/status`.
    pub memory: Option<Memory>,
}

/// How the log was grown to a level (not timed as part of it).
#[derive(Debug, Clone, Serialize)]
pub struct FillStats {
    /// Records appended to reach the level; 0 when it was already reached.
    pub records: u64,
    pub elapsed_s: f64,
}

/// The timed appends at one level.
#[derive(Debug, Clone, Serialize)]
pub struct AppendWindow {
    /// Records acknowledged durable (the window).
    pub records: u64,
    /// Subject key entries the window wrote beside its records (the first
    /// record of a subject writes one): more at the first level, where
    /// fewer subjects have a key yet, so a level's rate is read with it.
    pub key_entries: u64,
    /// Commit groups (signed heads) they went in.
    pub commit_groups: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    /// Per append, from submission until its receipt (durable).
    pub latency_us: Latency,
}

/// The timed mint+redeem cycles at one level.
#[derive(Debug, Clone, Serialize)]
pub struct RedeemCycles {
    pub cycles: u64,
    pub elapsed_s: f64,
    /// From the connect call until the data frame is decoded.
    pub redeem_latency_us: Latency,
    /// The `Mint` before each redemption, on a persistent connection.
    pub mint_latency_us: Latency,
}

/// Resident memory of this process, in MiB (of 2^20 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_mib: f64,
    /// `VmHWM`: the most ever resident, since the process started.
    pub peak_mib: f64,
}

impl Memory {
    /// This process's memory, from `/proc/self/status` (Linux).
    pub fn of_this_process() -> Option<Memory> {
        Memory::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    /// The `VmRSS` and `VmHWM` lines of a `/proc/PID/status` text, e.g.
    /// `VmRSS:`, a tab and spaces, `12345 kB`; `None` when either is
    /// missing or malformed.
    pub fn parse(status: &str) -> Option<Memory> {
        let kib = |key: &str| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix(key)?.strip_prefix(':')?;
                value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
            })
        };
        Some(Memory {
            rss_mib: kib("VmRSS")? as f64 / 1024.0,
            peak_mib: kib("VmHWM")? as f64 / 1024.0,
        })
    }
}

/// Runs the workload against a `vaultd` started here, data under `dir`.
pub(super) async fn run(
    dir: &Path,
    mut info: TargetInfo,
    p: &GrowthParams,
    progress: Progress,
) -> Result<GrowthReport> {
    let vault_dir = dir.join("vault");
    super::ensure_fresh(std::slice::from_ref(&vault_dir))?;
    let vault = create_vault(vault_dir).await?;
    let (_, writer_key) = vault.create_credential("writer", "vault-bench").await?;
    let (partner_key, gateway_key) = redeem::prepare(&vault).await?;
    let server = InProcess::start(
        vault,
        dir,
        inproc::Options {
            tls: false,
            http: false,
            policies: None,
            max_connections: None,
        },
    )
    .await?;
    info.addr = Some(server.addr.to_string());
    let keys = Keys {
        writer: server.client_config(&writer_key),
        gateway: server.client_config(&gateway_key),
        partner: server.client_config(&partner_key),
    };
    let measured = measure(keys, p, progress).await;
    // Stop the server whatever happened, then report the first error.
    let stopped = server.stop().await;
    let mut levels = measured?;
    stopped?;

    if let Some(first) = levels.first().map(|l| l.appends.records_per_s) {
        for l in &mut levels {
            l.vs_first = l.appends.records_per_s / first;
        }
    }
    Ok(GrowthReport {
        target: info,
        params: p.clone(),
        subjects: SUBJECTS,
        fill_batch: fill_batch(p.size),
        levels,
    })
}

/// Client configurations of the three roles the workload uses.
struct Keys {
    writer: client::ClientConfig,
    gateway: client::ClientConfig,
    partner: client::ClientConfig,
}

/// Every level in turn; the connectors are dropped on return, so that
/// the server can close the vault.
async fn measure(keys: Keys, p: &GrowthParams, progress: Progress) -> Result<Vec<GrowthLevel>> {
    let writer = Connector::new(keys.writer)?;
    let gateway = Connector::new(keys.gateway)?;
    let partner = Connector::new(keys.partner)?;
    let mut levels = Vec::with_capacity(p.sizes.len());
    for &target in &p.sizes {
        let fill = fill(&writer, target, p, progress).await?;
        let entries = log_len(&writer).await?;

        let (stats, elapsed) =
            protocol::measure(&writer, &p.appends(p.window, 1, p.pipeline), progress).await?;
        let after = log_len(&writer).await?;
        let secs = elapsed.as_secs_f64();
        let appends = AppendWindow {
            records: stats.records,
            key_entries: after.saturating_sub(entries).saturating_sub(stats.records),
            commit_groups: stats.groups(),
            elapsed_s: secs,
            records_per_s: stats.records as f64 / secs,
            latency_us: Latency::of(&stats.hist),
        };

        let redemptions = redeem_cycles(&gateway, &partner, p.redemptions, progress).await?;
        levels.push(GrowthLevel {
            target_entries: target,
            entries,
            fill,
            appends,
            vs_first: 0.0,
            redemptions,
            memory: Memory::of_this_process(),
        });
    }
    Ok(levels)
}

/// The log's length (durable entries), asked on a connection of its own:
/// a connection held through a long fill would time out idle.
async fn log_len(writer: &Connector) -> Result<u64> {
    Ok(writer.connect().await?.health().await?.entries)
}

/// Appends records until the log holds at least `target` entries.
///
/// A record whose subject had none before also writes the subject's key
/// entry, so `n` records add between `n` and `2n` entries, and at most
/// [`SUBJECTS`] key entries are ever written. Appending `gap - SUBJECTS`
/// records while the gap is large, then half the gap at a time, never
/// passes `target` by more than the one entry of a last single record.
async fn fill(
    writer: &Connector,
    target: u64,
    p: &GrowthParams,
    progress: Progress,
) -> Result<FillStats> {
    let start = Instant::now();
    let batch = fill_batch(p.size);
    let subjects = SUBJECTS as u64;
    let mut records = 0;
    let mut entries = log_len(writer).await?;
    while entries < target {
        let gap = target - entries;
        let n = if gap > 2 * subjects {
            gap - subjects
        } else {
            (gap / 2).max(1)
        };
        let (stats, _) =
            protocol::measure(writer, &p.appends(n, batch, FILL_PIPELINE), progress).await?;
        records += stats.records;
        let now = log_len(writer).await?;
        if now <= entries {
            // Acknowledged appends are durable and counted: a log that
            // did not grow is a server that does not count them.
            return Err(Error::Usage(format!(
                "the log stayed at {now} entries after {} appended records",
                stats.records
            )));
        }
        entries = now;
    }
    Ok(FillStats {
        records,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// `n` mint+redeem cycles, one at a time: the mint on one gateway
/// connection, each redemption on a new partner connection.
async fn redeem_cycles(
    gateway: &Connector,
    partner: &Connector,
    n: u64,
    progress: Progress,
) -> Result<RedeemCycles> {
    let gw = gateway.connect().await?;
    let bar = progress.phase("mint + redeem", n);
    let mut mint = new_histogram();
    let mut redeemed = new_histogram();
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let token = redeem::mint_one(&gw).await?;
        mint.saturating_record(micros(t.elapsed()));
        let t = Instant::now();
        redeem::redeem_one(partner, &token).await?;
        redeemed.saturating_record(micros(t.elapsed()));
        bar.inc(1);
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(RedeemCycles {
        cycles: n,
        elapsed_s: secs,
        redeem_latency_us: Latency::of(&redeemed),
        mint_latency_us: Latency::of(&mint),
    })
}

impl GrowthReport {
    pub(super) fn table(&self) -> String {
        use std::fmt::Write;
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench growth: {}", self.target.describe());
        let sizes: Vec<String> = p.sizes.iter().map(|n| thousands(*n)).collect();
        let _ = writeln!(
            s,
            "  one vault grown to {} entries; {} B records over {} subjects, filled in batches of {}",
            sizes.join(" / "),
            p.size,
            thousands(self.subjects as u64),
            self.fill_batch
        );
        let _ = writeln!(
            s,
            "  at each size: {} appends, {} clients x pipeline {}; {} mint+redeem cycles, one at a time",
            thousands(p.window),
            p.clients,
            p.pipeline,
            thousands(p.redemptions)
        );
        let _ = writeln!(s);
        let groups = format!(
            "  {:>12} {:>10} {:>8} | {:^17} | {:^17} | {:^17}",
            "", "", "", "append", "redeem", "memory MiB"
        );
        let _ = writeln!(s, "{}", groups.trim_end());
        let _ = writeln!(
            s,
            "  {:>12} {:>10} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
            "entries",
            "appends/s",
            "vs first",
            "p50 µs",
            "p99 µs",
            "p50 µs",
            "p99 µs",
            "RSS",
            "peak"
        );
        for l in &self.levels {
            let a = &l.appends.latency_us;
            let r = &l.redemptions.redeem_latency_us;
            let (rss, peak) = match l.memory {
                Some(m) => (format!("{:.1}", m.rss_mib), format!("{:.1}", m.peak_mib)),
                None => ("-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "  {:>12} {:>10} {:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
                thousands(l.entries),
                rate(l.appends.records_per_s),
                format!("{:.2}x", l.vs_first),
                a.p50,
                a.p99,
                r.p50,
                r.p99,
                rss,
                peak
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  entries: the log's length when the level's measurements began"
        );
        let _ = writeln!(
            s,
            "  latency: append = one Append until its receipt (durable); redeem = connect until the data is decoded"
        );
        let _ = write!(
            s,
            "  memory: VmRSS / VmHWM of this process after the level: vaultd and {} light client connections",
            p.clients
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_the_status_lines() {
        let status = "Name:\tvault-bench\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t4\n";
        assert_eq!(
            Memory::parse(status),
            Some(Memory {
                rss_mib: 100.0,
                peak_mib: 200.0
            })
        );
        assert_eq!(Memory::parse("VmRSS:\t1 kB\n"), None);
        assert_eq!(Memory::parse("VmRSS:\tlots kB\nVmHWM:\t1 kB\n"), None);
        // `VmRSSx` is not `VmRSS`.
        assert_eq!(Memory::parse("VmRSSx:\t1 kB\nVmHWM:\t1 kB\n"), None);
    }

    #[test]
    fn fill_batches_stay_within_a_frame() {
        assert_eq!(fill_batch(512), FILL_BATCH);
        assert_eq!(fill_batch(0), FILL_BATCH);
        let largest = fill_batch(MAX_SIZE);
        assert!(largest >= 1 && largest * (MAX_SIZE + 64) <= ::protocol::MAX_FRAME_LEN);
    }

    #[test]
    fn sizes_must_ascend() {
        let bad = [vec![], vec![100, 100], vec![1000, 100], vec![0, 10]];
        for sizes in bad {
            let p = GrowthParams {
                sizes: sizes.clone(),
                ..GrowthParams::default()
            };
            assert!(
                matches!(p.validate(), Err(Error::Usage(_))),
                "{sizes:?} accepted"
            );
        }
        assert!(GrowthParams::default().validate().is_ok());
    }
}
