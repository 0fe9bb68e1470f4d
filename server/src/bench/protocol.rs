//! Appends over the wire protocol: `clients` tasks, each with its own
//! connection ([`client::Client`]), keeping `pipeline` appends of `batch`
//! records in flight on it, each awaited until its receipt (durable).
//!
//! A record is one field, `v`, whose value is ASCII chosen so that the
//! JSON object the server stores (`{"v":"..."}`) is exactly `size` bytes:
//! the same plaintext size as the embedded workload's records, which is
//! what the `baseline` comparison needs.
//!
//! With [`AppendParams::redis`], Redis `SET`s of `size`-byte values follow
//! in the same run, from as many clients, one at a time each
//! (`super::redis::run_set`): the single-client durable-write latency
//! comparison. With [`AppendParams::postgres`], PostgreSQL `INSERT`s of
//! `size`-byte rows follow the same way ([`super::postgres`]).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use client::{Client, Connector, Receipt, Record};
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use super::inproc::{self, InProcess};
use super::{
    claim, create_vault, join_each, join_error, pipelined, run_append as run_embedded, scratch,
    subject_id, AppendBaseline, AppendParams, AppendReport, AppendThroughput, EmbeddedRun, Latency,
    PipelineRun, Progress, Rng, Stats, Target,
};
use super::{postgres, redis};
use crate::{Error, Result};

/// Bytes `{"v":""}` adds around a value.
const JSON_OVERHEAD: usize = 8;

/// Runs the append workload against a protocol target, then, with
/// `baseline`, the embedded engine with the same parameters.
pub(super) async fn run_append(
    target: &Target,
    p: &AppendParams,
    progress: Progress,
) -> Result<AppendReport> {
    // A PostgreSQL server that cannot serve as the baseline fails the run
    // before the vault's part, not after it.
    if let Some(info) = &p.postgres {
        postgres::preflight(info, postgres::TABLE).await?;
    }
    let (tmp, dir, mut info) = match target {
        Target::InProcess { dir, tls } => scratch(dir.as_deref(), "in-process", *tls)?,
        // The embedded baseline, if any, still needs a scratch dir.
        Target::Remote(config) => super::remote::scratch_for(config)?,
        Target::Embedded { .. } => {
            return Err(Error::Usage("not a protocol target".into()));
        }
    };
    let (server, config) = match target {
        Target::InProcess { tls, .. } => {
            let vault_dir = dir.join("vault");
            super::ensure_fresh(std::slice::from_ref(&vault_dir))?;
            let vault = create_vault(vault_dir).await?;
            let (_, key) = vault.create_credential("writer", "vault-bench").await?;
            let server = InProcess::start(
                vault,
                &dir,
                inproc::Options {
                    tls: *tls,
                    http: false,
                    policies: None,
                    max_connections: None,
                },
            )
            .await?;
            info.addr = Some(server.addr.to_string());
            let config = server.client_config(&key);
            (Some(server), config)
        }
        Target::Remote(config) => (None, config.clone()),
        Target::Embedded { .. } => return Err(Error::Usage("not a protocol target".into())),
    };
    let connector = Connector::new(config)?;

    // The in-process server's vault is the one `/metrics` watches; a
    // remote one is not this process's.
    let before = server.as_ref().and_then(|_| PipelineRun::watched());
    let measured = measure(&connector, p, progress).await;
    let pipeline = match &measured {
        Ok((stats, _)) => PipelineRun::since_watched(before, stats.records),
        Err(_) => None,
    };
    // Stop the server whatever happened, then report the first error.
    let stopped = match server {
        Some(s) => s.stop().await,
        None => Ok(()),
    };
    let (stats, elapsed) = measured?;
    stopped?;

    let secs = elapsed.as_secs_f64();
    let records_per_s = stats.records as f64 / secs;
    let log_entries = stats.group_ends.iter().max().map_or(0, |s| s + 1);
    let throughput = AppendThroughput {
        records: stats.records,
        appends: stats.appends,
        log_entries,
        commit_groups: stats.groups(),
        elapsed_s: secs,
        records_per_s,
        appends_per_s: stats.appends as f64 / secs,
        pipeline,
    };
    // The embedded engine with the same parameters, and raw sled at the
    // engine's durability, on the same records: each a ratio of this run.
    let (embedded, sled) = if p.baseline {
        let edir = dir.join("embedded");
        let (_, _, einfo) = scratch(Some(&edir), "embedded", false)?;
        let ep = AppendParams {
            records: stats.records,
            duration: None,
            baseline: true,
            redis: None,
            postgres: None,
            ..p.clone()
        };
        let e = run_embedded(&edir, einfo, &ep, progress).await?;
        let sled = e.baseline.map(|runs| {
            runs.into_iter()
                .map(|mut run| {
                    run.vault_ratio = records_per_s / run.records_per_s;
                    run
                })
                .collect()
        });
        let embedded = EmbeddedRun {
            records: e.throughput.records,
            elapsed_s: e.throughput.elapsed_s,
            records_per_s: e.throughput.records_per_s,
            latency_us: e.latency_us,
            protocol_ratio: records_per_s / e.throughput.records_per_s,
        };
        (Some(embedded), sled)
    } else {
        (None, None)
    };
    let latency_us = Latency::of(&stats.hist);
    let redis = match &p.redis {
        None => None,
        Some(bin) => {
            let rdir = dir.join("redis");
            super::ensure_fresh(std::slice::from_ref(&rdir))?;
            let r = redis::run_set(bin, &rdir, stats.records, p.clients, p.size, progress).await?;
            Some(Box::new(AppendBaseline::beside(
                r,
                &latency_us,
                records_per_s,
            )))
        }
    };
    let postgres = match &p.postgres {
        None => None,
        Some(info) => {
            let r =
                postgres::run_insert(info, stats.records, p.clients, p.size, p.subjects, progress)
                    .await?;
            Some(Box::new(AppendBaseline::beside(
                r,
                &latency_us,
                records_per_s,
            )))
        }
    };
    drop(tmp);
    Ok(AppendReport {
        target: info,
        params: p.clone(),
        throughput,
        latency_us,
        baseline: sled,
        embedded,
        redis,
        postgres,
    })
}

/// Record contents of protocol appends, shared by the pure append workload
/// and [`super::mixed`].
#[derive(Debug)]
pub(super) struct Records {
    subjects: Vec<String>,
    /// ASCII letters and digits that values are sliced from.
    pool: String,
    value_len: usize,
}

impl Records {
    /// Records whose stored JSON object is `size` bytes, spread over
    /// `subjects` subjects.
    pub(super) fn new(size: usize, subjects: usize) -> Self {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let value_len = size.saturating_sub(JSON_OVERHEAD);
        let mut raw = vec![0u8; (1 << 20).max(4 * value_len)];
        storage::crypto::random_bytes(&mut raw);
        let pool: String = raw
            .iter()
            .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
            .collect();
        Records {
            subjects: (0..subjects).map(subject_id).collect(),
            pool,
            value_len,
        }
    }

    fn record(&self, rng: &mut Rng) -> (String, Vec<(String, String)>) {
        let subject = self.subjects[rng.below(self.subjects.len())].clone();
        let off = rng.below(self.pool.len() - self.value_len + 1);
        // The pool is ASCII, so every offset is a char boundary.
        let value = self.pool[off..off + self.value_len].to_string();
        (subject, vec![("v".to_string(), value)])
    }

    /// One append request of `n` records: an `Append` when `batch` is 1,
    /// else an `AppendBatch` (even of fewer records, the last claim).
    pub(super) fn request(&self, rng: &mut Rng, n: u64, batch: u64) -> Request {
        if batch == 1 {
            let (subject, fields) = self.record(rng);
            Request::One(subject, fields)
        } else {
            Request::Batch(
                (0..n)
                    .map(|_| {
                        let (subject, fields) = self.record(rng);
                        Record { subject, fields }
                    })
                    .collect(),
            )
        }
    }
}

/// An append request, built before its clock starts.
#[derive(Debug)]
pub(super) enum Request {
    One(String, Vec<(String, String)>),
    Batch(Vec<Record>),
}

/// Sends one append request and waits for its receipts (durable).
pub(super) async fn send(c: &Client, request: Request) -> client::Result<Vec<Receipt>> {
    match request {
        Request::One(subject, fields) => c.append(subject, fields).await.map(|r| vec![r]),
        Request::Batch(items) => c.append_batch(items).await,
    }
}

/// What the client tasks share.
struct Work {
    records: Records,
    remaining: AtomicU64,
    batch: u64,
    bar: ProgressBar,
}

/// Connects every client, then times the appends: `p.records` records,
/// `p.clients` connections with `p.pipeline` requests of `p.batch` in
/// flight each. Also the driver of [`super::growth`]'s fill and windows.
pub(super) async fn measure(
    connector: &Connector,
    p: &AppendParams,
    progress: Progress,
) -> Result<(Stats, std::time::Duration)> {
    let work = Arc::new(Work {
        records: Records::new(p.size, p.subjects),
        remaining: AtomicU64::new(p.records),
        batch: p.batch as u64,
        bar: progress.phase("protocol append", p.records),
    });

    // Connections are made before the clock starts: the workload is the
    // appends, not the handshakes.
    let mut connecting = JoinSet::new();
    for _ in 0..p.clients {
        let c = connector.clone();
        connecting.spawn(async move { c.connect().await });
    }
    let mut clients = Vec::with_capacity(p.clients);
    while let Some(c) = connecting.join_next().await {
        let c = c.map_err(join_error)??;
        if c.role() != "writer" && c.role() != "admin" {
            return Err(Error::Usage(format!(
                "the API key has role {}; appends need a writer key",
                c.role()
            )));
        }
        clients.push(Arc::new(c));
    }

    let deadline = p.duration.map(|d| Instant::now() + d);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (id, c) in clients.into_iter().enumerate() {
        set.spawn(client_task(
            work.clone(),
            c,
            id as u64,
            p.pipeline,
            deadline,
        ));
    }
    let mut total = Stats::new();
    join_each(set, |s| total.merge(s)).await?;
    let elapsed = start.elapsed();
    work.bar.finish_and_clear();
    Ok((total, elapsed))
}

/// One connection with `pipeline` appends in flight.
async fn client_task(
    work: Arc<Work>,
    c: Arc<Client>,
    id: u64,
    pipeline: usize,
    deadline: Option<Instant>,
) -> Result<Stats> {
    let mut rng = Rng::new(id);
    pipelined(pipeline, &work.bar, || {
        let n = claim(&work.remaining, work.batch, deadline);
        if n == 0 {
            return None;
        }
        let request = work.records.request(&mut rng, n, work.batch);
        let c = c.clone();
        Some(async move {
            let receipts = send(&c, request).await?;
            Ok((receipts.len(), receipts.last().map(|r| r.head.last_seq)))
        })
    })
    .await
}
