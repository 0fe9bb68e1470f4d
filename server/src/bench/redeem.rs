//! Redemptions, one new connection per token, as partners make them.
//!
//! Setup (not timed): a vault with one subject and its record, a partner
//! credential and a gateway credential, the partner's policy and the
//! subject's consent; `vaultd` in this process; the
//! gateway mints the tokens over the protocol, pipelined on one connection.
//! Against a running `vaultd` (`run_remote`) an admin makes the same
//! over the protocol, under names of the run's own, and revokes and shreds
//! them afterwards ([`super::remote`]).
//!
//! Timed: `clients` tasks, each looping: connect (TCP, and TLS), `Hello`,
//! `Redeem` one token, read the `Data` frame, close. Latency is from the
//! connect call to the data in hand. Every redemption burns its token
//! durably (a `token_redeemed` entry, fsynced in a commit group) before
//! the data leaves.
//!
//! With TLS the workload runs twice on fresh tokens: every connection a
//! full handshake (resumption off), then through one shared
//! [`Connector`], whose rustls configuration resumes sessions.
//!
//! With a Redis binary, the same number of keys is deleted with `GETDEL`
//! by the same number of clients on persistent connections ([`super::redis`]);
//! with a PostgreSQL server, as many rows with `DELETE ... RETURNING`
//! ([`super::postgres`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use client::{Client, ClientConfig, Connector, MaskOp};
use futures_util::StreamExt;
use serde::Serialize;
use storage::{Append, Vault};
use tokio::task::JoinSet;

use super::inproc::{self, InProcess};
use super::postgres::{self, Conninfo, PostgresRun};
use super::redis::{self, RedisRun};
use super::remote::Remote;
use super::tail::{DiskTrace, Recorder, Tail};
use super::{
    check, create_vault, join_each, rate, thousands, BaselineRun, Latency, LatencyTable, Pace,
    Progress, TargetInfo,
};
use crate::{Error, Result};

/// The one subject whose record every token reveals.
pub const SUBJECT: &str = "bench-subject-000001";
/// The partner the tokens are minted for.
pub const PARTNER: &str = "bench-partner";
/// Mints the gateway keeps in flight on its connection while setting up.
const MINT_PIPELINE: usize = 256;

/// Parameters of [`super::Workload::Redeem`].
#[derive(Debug, Clone, Serialize)]
pub struct RedeemParams {
    /// Concurrent partner clients (default 50).
    pub clients: usize,
    /// Tokens redeemed per run (default 20,000); with TLS, two runs.
    pub tokens: u64,
    /// The Redis server binary for the `GETDEL` baseline, if asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<PathBuf>,
    /// Redemptions per second on a schedule (`bench::Pace`, open
    /// loop), the Redis baseline at the same rate; `None`: each client
    /// starts its next one when the last is done.
    pub rate: Option<f64>,
    /// A PostgreSQL server for the `DELETE ... RETURNING` baseline, if
    /// asked for; not in the report's parameters (it may hold a password).
    #[serde(skip)]
    pub postgres: Option<Conninfo>,
}

impl Default for RedeemParams {
    fn default() -> Self {
        RedeemParams {
            clients: 50,
            tokens: 20_000,
            redis: None,
            rate: None,
            postgres: None,
        }
    }
}

/// Most tokens one run redeems: each connection leaves a socket in
/// TIME_WAIT for a minute, and loopback has about 28,000 ephemeral ports.
pub(super) const MAX_TOKENS: u64 = 1_000_000;

impl RedeemParams {
    pub(super) fn validate(&self) -> Result<()> {
        check((1..=super::MAX_CLIENTS).contains(&self.clients), || {
            format!("--clients must be between 1 and {}", super::MAX_CLIENTS)
        })?;
        check((1..=MAX_TOKENS).contains(&self.tokens), || {
            format!("--tokens must be between 1 and {MAX_TOKENS}")
        })?;
        super::check_rate(self.rate)
    }
}

/// Result of [`super::Workload::Redeem`].
#[derive(Debug, Clone, Serialize)]
pub struct RedeemReport {
    pub target: TargetInfo,
    pub params: RedeemParams,
    pub setup: MintStats,
    /// One run without TLS; with TLS, full handshakes then resumed ones.
    pub runs: Vec<RedeemRun>,
    pub redis: Option<RedisRun>,
    /// With [`RedeemParams::postgres`]: the same number of rows deleted
    /// with `DELETE ... RETURNING`, committed durably; `null` when not
    /// asked for.
    pub postgres: Option<PostgresRun>,
}

/// How the tokens were minted (over the protocol, gateway role).
#[derive(Debug, Clone, Serialize)]
pub struct MintStats {
    pub tokens: u64,
    pub elapsed_s: f64,
    pub mints_per_s: f64,
}

/// One timed pass over `tokens` tokens.
#[derive(Debug, Clone, Serialize)]
pub struct RedeemRun {
    /// "plaintext", "tls-full-handshake" or "tls-resumed".
    pub mode: &'static str,
    pub redemptions: u64,
    /// Connections whose TLS handshake resumed a session.
    pub resumed_handshakes: u64,
    pub elapsed_s: f64,
    pub redemptions_per_s: f64,
    /// From the connect call until the data frame is decoded; with a
    /// rate, from the due time of a redemption that found no client free.
    pub latency_us: Latency,
    /// With a rate: the redemptions that found no client free at their
    /// due time.
    pub behind_schedule: Option<u64>,
    /// The redemptions slower than the p99: when they began, and what the
    /// data dir's disk did meanwhile ([`super::tail`]).
    pub tail: Tail,
    /// The engine's commit pipeline over the run (its `fdatasync`s and
    /// how long they took; `records_per_sync` counts redemptions).
    pub pipeline: Option<super::PipelineRun>,
    /// With the Redis baseline: this run's p99 over Redis `GETDEL`'s p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_vs_redis: Option<f64>,
    /// With the Redis baseline: this run's rate over Redis `GETDEL`'s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_vs_redis: Option<f64>,
    /// With the PostgreSQL baseline: this run's p99 over its p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_vs_postgres: Option<f64>,
    /// With the PostgreSQL baseline: this run's rate over its rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_vs_postgres: Option<f64>,
}

/// Runs the workload against a `vaultd` started here, data under `dir`.
pub(super) async fn run(
    dir: &Path,
    mut info: TargetInfo,
    p: &RedeemParams,
    progress: Progress,
) -> Result<RedeemReport> {
    // A PostgreSQL server that cannot serve as the baseline fails the run
    // before the vault's part, not after it.
    if let Some(pg) = &p.postgres {
        postgres::preflight(pg, postgres::TOKENS_TABLE).await?;
    }
    let vault_dir = dir.join("vault");
    super::ensure_fresh(std::slice::from_ref(&vault_dir))?;
    let vault = create_vault(vault_dir.clone()).await?;
    let disk = DiskTrace::start(&vault_dir);
    let (partner_key, gateway_key) = prepare(&vault).await?;
    let tls = info.tls;
    let server = InProcess::start(
        vault,
        dir,
        inproc::Options {
            tls,
            http: false,
            policies: None,
            max_connections: None,
        },
    )
    .await?;
    info.addr = Some(server.addr.to_string());
    let measured = measure(
        &server.client_config(""),
        &OWN,
        &gateway_key,
        &partner_key,
        p,
        disk.as_deref(),
        progress,
    )
    .await;
    let stopped = server.stop().await;
    let (setup, runs) = measured?;
    stopped?;
    report(dir, info, p, setup, runs, progress).await
}

/// The report of `runs`, after the baselines `p` asks for (run in `dir`),
/// with each run's ratios to them.
async fn report(
    dir: &Path,
    info: TargetInfo,
    p: &RedeemParams,
    setup: MintStats,
    mut runs: Vec<RedeemRun>,
    progress: Progress,
) -> Result<RedeemReport> {
    let redis = match &p.redis {
        None => None,
        Some(bin) => {
            let r = redis::run(
                bin,
                &dir.join("redis"),
                p.tokens,
                p.clients,
                p.rate,
                progress,
            )
            .await?;
            for run in &mut runs {
                let vs = r.ratios(&run.latency_us, run.redemptions_per_s);
                (run.p99_vs_redis, run.rate_vs_redis) = (Some(vs.p99), Some(vs.rate));
            }
            Some(r)
        }
    };
    let postgres = match &p.postgres {
        None => None,
        Some(pg) => {
            let r = postgres::run_delete(pg, p.tokens, p.clients, redis::VALUE, p.rate, progress)
                .await?;
            for run in &mut runs {
                let vs = r.ratios(&run.latency_us, run.redemptions_per_s);
                (run.p99_vs_postgres, run.rate_vs_postgres) = (Some(vs.p99), Some(vs.rate));
            }
            Some(r)
        }
    };
    Ok(RedeemReport {
        target: info,
        params: p.clone(),
        setup,
        runs,
        redis,
        postgres,
    })
}

/// Runs the workload against the running `vaultd` at `config.addr`, as
/// the admin whose key `config` holds. The run makes what it needs under
/// a name of its own, `vault-bench-` and 12 random hex digits: a partner
/// of that id with its credential, a gateway credential, a subject of
/// that id with one record, the partner's policy and the subject's
/// consent. Afterwards, whether the run succeeded, failed or was
/// interrupted with Ctrl-C, it revokes both credentials and shreds the
/// subject ([`Remote::finish`]). Tokens get the server's default
/// lifetime.
pub(super) async fn run_remote(
    config: &ClientConfig,
    p: &RedeemParams,
    progress: Progress,
) -> Result<RedeemReport> {
    if let Some(pg) = &p.postgres {
        postgres::preflight(pg, postgres::TOKENS_TABLE).await?;
    }
    let (_tmp, dir, info) = super::remote::scratch_for(config)?;
    let mut run = Remote::connect(config, "redeem").await?;
    // The server's default lifetime (5 minutes, or its maximum where
    // that is lower): a server's maximum may be under an hour.
    let names = Names {
        partner: &run.name,
        subject: &run.name,
        ttl_secs: 0,
    };
    let names = &names;
    let measured = run
        .interrupts
        .until(
            prepare_remote(&run.admin, names, &mut run.made),
            |(partner_key, gateway_key)| async move {
                measure(config, names, &gateway_key, &partner_key, p, None, progress).await
            },
        )
        .await;
    let interrupts = run.interrupts.clone();
    let (setup, runs) = run.finish(measured).await?;
    // The baselines beside it stop at Ctrl-C too.
    interrupts
        .unless_interrupted(report(&dir, info, p, setup, runs, progress))
        .await
        .unwrap_or_else(|| Err(Error::Usage("interrupted during the baselines".into())))
}

/// [`prepare`] over the protocol, as an admin, for `names`: the partner's
/// and the gateway's API keys; the ids of the credentials it made are
/// pushed to `made` as they are made.
async fn prepare_remote(
    admin: &Client,
    names: &Names<'_>,
    made: &mut Vec<String>,
) -> Result<(client::Zeroizing<String>, client::Zeroizing<String>)> {
    let partner_key = prepare_partner(admin, names, made).await?;
    let (id, gateway_key) = admin
        .create_credential("gateway", super::remote::CREDENTIAL_NAME)
        .await?;
    made.push(id);
    Ok((partner_key, gateway_key.into_inner()))
}

/// The partner's side of [`prepare_remote`]: its credential (the API key
/// returned, the id pushed to `made`), the subject's record, the
/// partner's policy and the subject's consent.
pub(super) async fn prepare_partner(
    admin: &Client,
    names: &Names<'_>,
    made: &mut Vec<String>,
) -> Result<client::Zeroizing<String>> {
    let (id, partner_key) = admin.create_credential("partner", names.partner).await?;
    let partner_key = partner_key.into_inner();
    made.push(id);
    let record: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(crate::dev::DEMO_RECORDS[0].1)
            .map_err(|e| Error::Usage(format!("the demo record: {e}")))?;
    let fields = record
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
        .collect();
    admin.append(names.subject, fields).await?;
    let (policy, consent) = policy_and_consent(names.partner);
    admin
        .event(
            storage::Kind::PolicyChanged as u8,
            "",
            policy.to_string().into_bytes(),
        )
        .await?;
    admin
        .event(
            storage::Kind::ConsentGranted as u8,
            names.subject,
            consent.to_string().into_bytes(),
        )
        .await?;
    Ok(partner_key)
}

/// Writes what redemptions need: a partner and a gateway credential
/// (their API keys returned in that order), [`SUBJECT`]'s record, and,
/// as the HTTP shim would have them, the partner's policy and the
/// subject's consent, which every redemption checks again.
pub(super) async fn prepare(vault: &Vault) -> Result<(String, String)> {
    let (_, partner_key) = vault.create_credential("partner", PARTNER).await?;
    let (_, gateway_key) = vault.create_credential("gateway", "vault-bench").await?;
    let record = crate::dev::DEMO_RECORDS[0].1;
    vault
        .append(Append::record(SUBJECT, record.as_bytes().to_vec()))
        .await?;
    let (policy, consent) = policy_and_consent(PARTNER);
    vault
        .append(Append::event(storage::Kind::PolicyChanged, "", &policy))
        .await?;
    vault
        .append(Append::event(
            storage::Kind::ConsentGranted,
            SUBJECT,
            &consent,
        ))
        .await?;
    Ok((partner_key.to_string(), gateway_key.to_string()))
}

/// The partner's policy (its tokens' purpose, each field under its
/// masking) and the subject's consent to it, as `policy_changed` and
/// `consent_granted` payloads.
fn policy_and_consent(partner: &str) -> (serde_json::Value, serde_json::Value) {
    let fields: serde_json::Map<String, serde_json::Value> = FIELDS
        .iter()
        .map(|(f, op)| (f.to_string(), op.name().into()))
        .collect();
    let policy = serde_json::json!({
        "partner_id": partner,
        "policy": {"purposes": {PURPOSE: {"fields": fields}}},
    });
    let consent = serde_json::json!({"partner_id": partner, "purposes": [PURPOSE]});
    (policy, consent)
}

/// The purpose tokens are minted for, and the fields they reveal with
/// their masking: what the partner's policy allows.
pub(super) const PURPOSE: &str = "bench";
const FIELDS: [(&str, MaskOp); 4] = [
    ("name", MaskOp::Partial),
    ("iban", MaskOp::Partial),
    ("dob", MaskOp::Generalize),
    ("income", MaskOp::Generalize),
];

/// Mints one token for [`PARTNER`] on the gateway connection `gw`.
pub(super) async fn mint_one(gw: &Client) -> Result<String> {
    mint_for(gw, &OWN).await
}

async fn mint_for(gw: &Client, names: &Names<'_>) -> Result<String> {
    let fields = FIELDS.iter().map(|(f, op)| (f.to_string(), *op)).collect();
    let (token, _) = gw
        .mint(
            names.partner,
            names.subject,
            PURPOSE,
            fields,
            names.ttl_secs,
        )
        .await?;
    // The benchmark keeps its tokens until it redeems them.
    let mut token = token.into_inner();
    Ok(std::mem::take(&mut *token))
}

/// One redemption as a partner makes it ([`Connector::redeem`]): a new
/// connection from `connector`, `Hello` and `Redeem` of `token` in one
/// write, the data frame, close.
/// Returns whether the TLS handshake resumed a session.
pub(super) async fn redeem_one(connector: &Connector, token: &str) -> Result<bool> {
    let r = connector.redeem(token).await?;
    if r.data.fields.is_empty() {
        return Err(Error::Usage("a redemption returned no fields".into()));
    }
    Ok(r.tls_resumed)
}

/// Who the tokens are for: the partner, and the subject whose record they
/// reveal.
pub(super) struct Names<'a> {
    pub(super) partner: &'a str,
    pub(super) subject: &'a str,
    /// The tokens' lifetime, as `Mint` asks it (0: the server's default).
    pub(super) ttl_secs: u32,
}

/// The names of a vault this run made ([`prepare`]), whose tokens live
/// an hour, the longest `vaultd` allows by default.
const OWN: Names<'static> = Names {
    partner: PARTNER,
    subject: SUBJECT,
    ttl_secs: 3600,
};

/// `base` with `api_key` in place of its key.
fn with_key(base: &ClientConfig, api_key: &str) -> ClientConfig {
    ClientConfig {
        api_key: client::Zeroizing::new(api_key.to_string()),
        ..base.clone()
    }
}

async fn measure(
    base: &ClientConfig,
    names: &Names<'_>,
    gateway_key: &str,
    partner_key: &str,
    p: &RedeemParams,
    disk: Option<&DiskTrace>,
    progress: Progress,
) -> Result<(MintStats, Vec<RedeemRun>)> {
    let tls = base.tls != client::Tls::Plaintext;
    let runs = if tls { 2 } else { 1 };
    // Every token is minted first: on a schedule, the last must still be
    // alive when its turn comes (a server's default lifetime is 300 s).
    if let Some(rate) = p.rate {
        let lifetime = if names.ttl_secs == 0 {
            300
        } else {
            names.ttl_secs
        };
        let needed = (p.tokens * runs) as f64 / rate;
        check(needed <= f64::from(lifetime) * 0.9, || {
            format!(
                "at --rate {rate}, the {} tokens minted first take {needed:.0} s to redeem, \
                 past their {lifetime} s lifetime: fewer --tokens or a higher --rate",
                p.tokens * runs
            )
        })?;
    }
    let setup = Connector::new(with_key(base, gateway_key))?;
    let (setup_stats, tokens) = mint(&setup, names, p.tokens * runs, progress).await?;
    let mut tokens = tokens.into_iter();
    let shared = Connector::new(with_key(base, partner_key))?;
    let modes: Vec<(&'static str, Connector)> = if tls {
        vec![
            ("tls-full-handshake", shared.without_resumption()),
            ("tls-resumed", shared),
        ]
    } else {
        vec![("plaintext", shared)]
    };
    let mut out = Vec::new();
    for (mode, connector) in modes {
        let batch: Vec<String> = tokens.by_ref().take(p.tokens as usize).collect();
        out.push(redeem_all(mode, &connector, batch, p, disk, progress).await?);
    }
    Ok((setup_stats, out))
}

/// Mints `n` tokens for `names` on one gateway connection.
async fn mint(
    connector: &Connector,
    names: &Names<'_>,
    n: u64,
    progress: Progress,
) -> Result<(MintStats, Vec<String>)> {
    let gw = connector.connect().await?;
    let bar = progress.phase("minting tokens", n);
    let start = Instant::now();
    let mut minted = futures_util::stream::iter(0..n)
        .map(|_| mint_for(&gw, names))
        .buffer_unordered(MINT_PIPELINE);
    let mut tokens = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    while let Some(r) = minted.next().await {
        tokens.push(r?);
        bar.inc(1);
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok((
        MintStats {
            tokens: n,
            elapsed_s: secs,
            mints_per_s: n as f64 / secs,
        },
        tokens,
    ))
}

/// `p.clients` tasks redeeming `tokens`, one connection each, each as
/// soon as its last is done or, with `p.rate`, on the schedule.
async fn redeem_all(
    mode: &'static str,
    connector: &Connector,
    tokens: Vec<String>,
    p: &RedeemParams,
    disk: Option<&DiskTrace>,
    progress: Progress,
) -> Result<RedeemRun> {
    let n = tokens.len() as u64;
    let bar = progress.phase(&format!("redeem, {mode}"), n);
    let tokens = Arc::new(tokens);
    // The in-process server's vault is the one `/metrics` watches.
    let pipeline_before = super::PipelineRun::watched();
    let start = Instant::now();
    let pace = Arc::new(Pace::new(p.rate, n, start));
    let mut set = JoinSet::new();
    for _ in 0..p.clients {
        let (c, tokens, pace, bar) = (connector.clone(), tokens.clone(), pace.clone(), bar.clone());
        set.spawn(async move {
            let mut rec = Recorder::new(start);
            let mut resumed = 0u64;
            while let Some(turn) = pace.take() {
                let token = usize::try_from(turn.index)
                    .ok()
                    .and_then(|i| tokens.get(i))
                    .ok_or_else(|| Error::Usage("a turn past the tokens".into()))?;
                let from = turn.start().await;
                resumed += u64::from(redeem_one(&c, token).await?);
                rec.record(from);
                bar.inc(1);
            }
            Ok::<(Recorder, u64), Error>((rec, resumed))
        });
    }
    let mut rec = Recorder::new(start);
    let mut resumed = 0;
    join_each(set, |(r, n)| {
        rec.merge(r);
        resumed += n;
    })
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let pipeline = super::PipelineRun::since_watched(pipeline_before, rec.hist.len());
    bar.finish_and_clear();
    let hist = &rec.hist;
    let latency_us = Latency::of(hist);
    Ok(RedeemRun {
        mode,
        redemptions: hist.len(),
        resumed_handshakes: resumed,
        elapsed_s: secs,
        redemptions_per_s: hist.len() as f64 / secs,
        latency_us,
        behind_schedule: pace.behind_schedule(),
        tail: rec.tail(disk),
        pipeline,
        p99_vs_redis: None,
        rate_vs_redis: None,
        p99_vs_postgres: None,
        rate_vs_postgres: None,
    })
}

impl RedeemReport {
    pub(super) fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "vault-bench redeem: {}", self.target.describe());
        let _ = writeln!(
            s,
            "  {} clients, a new connection per token; {} tokens minted over the protocol in {:.2} s ({}/s)",
            self.params.clients,
            thousands(self.setup.tokens),
            self.setup.elapsed_s,
            rate(self.setup.mints_per_s)
        );
        if let Some(rate) = self.params.rate {
            let _ = writeln!(
                s,
                "  scheduled at {}/s (open loop); latency of one found with no client free counts from its due time",
                thousands(rate.round() as u64)
            );
        }
        let _ = writeln!(s);
        let table = LatencyTable { name: 28, extra: 9 };
        table.header(&mut s, "per s", "resumed");
        let row = |s: &mut String, name: &str, per_s: f64, resumed: &str, l: &Latency| {
            table.row(s, name, per_s, resumed, l);
        };
        for r in &self.runs {
            let resumed = if self.target.tls {
                thousands(r.resumed_handshakes)
            } else {
                "-".into()
            };
            row(
                &mut s,
                &format!("redeem, {}", r.mode),
                r.redemptions_per_s,
                &resumed,
                &r.latency_us,
            );
        }
        if let Some(r) = &self.redis {
            row(
                &mut s,
                "redis GETDEL (persistent)",
                r.ops_per_s,
                "-",
                &r.latency_us,
            );
        }
        if let Some(r) = &self.postgres {
            row(
                &mut s,
                "postgres DELETE RETURNING",
                r.ops_per_s,
                "-",
                &r.latency_us,
            );
        }
        // Each run's rate and p99 over a baseline's.
        let ratios = |name: &str, of: fn(&RedeemRun) -> (Option<f64>, Option<f64>)| {
            self.runs
                .iter()
                .map(|run| {
                    let (rate, p99) = of(run);
                    format!(
                        "  {}: {:.2}x {name}'s rate, p99 {:.2}x {name}'s",
                        run.mode,
                        rate.unwrap_or(0.0),
                        p99.unwrap_or(0.0)
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut notes = Vec::new();
        if let Some(r) = &self.redis {
            notes.extend(ratios("Redis", |run| (run.rate_vs_redis, run.p99_vs_redis)));
            notes.push(format!(
                "  redis {}: appendfsync always, {} clients on persistent plaintext connections",
                r.version, self.params.clients
            ));
        }
        if let Some(r) = &self.postgres {
            notes.extend(ratios("PostgreSQL", |run| {
                (run.rate_vs_postgres, run.p99_vs_postgres)
            }));
            notes.push(format!(
                "  postgres {} at {}: synchronous_commit {}, {} clients on persistent plaintext connections",
                r.version, r.server, r.synchronous_commit, r.clients
            ));
        }
        if notes.is_empty() {
            let _ = write!(
                s,
                "  latency: connect (TCP{}, Hello) until the data frame is decoded",
                if self.target.tls { ", TLS" } else { "" }
            );
        } else {
            let _ = write!(s, "\n{}", notes.join("\n"));
        }
        for r in &self.runs {
            if let Some(pl) = &r.pipeline {
                let _ = write!(s, "\n  during redeem, {}: {}", r.mode, pl.describe());
            }
        }
        s.push_str(&super::tail::section(
            self.runs
                .iter()
                .map(|r| r.tail.describe(&format!("redeem, {}", r.mode)))
                .chain(self.redis.iter().map(|r| r.tail.describe("redis GETDEL"))),
        ));
        let behind: Vec<String> = self
            .runs
            .iter()
            .filter_map(|r| {
                r.behind_schedule
                    .map(|n| format!("{} {}", r.mode, thousands(n)))
            })
            .chain(
                self.redis
                    .iter()
                    .filter_map(|r| r.behind_schedule.map(|n| format!("redis {}", thousands(n)))),
            )
            .chain(self.postgres.iter().filter_map(|r| {
                r.behind_schedule
                    .map(|n| format!("postgres {}", thousands(n)))
            }))
            .collect();
        if !behind.is_empty() {
            let _ = write!(
                s,
                "\n  behind schedule (no client free at the due time): {}",
                behind.join(", ")
            );
        }
        s
    }
}
