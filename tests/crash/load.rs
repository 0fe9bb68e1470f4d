//! The mixed load of one cycle, and the kill at its end.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client::{Client, MaskOp, Record};
use tokio::sync::{mpsc, Mutex};

use crate::model::{config, Acked, Model, Rng, Token};
use crate::{Env, Server, PARTNER, SEEDED};

const WRITERS: usize = 4;
const MINTERS: usize = 2;
const AUTHORIZERS: usize = 2;
const REDEEMERS: usize = 3;

/// One in this many acknowledged tokens is kept for after the restart.
const KEEP_ONE_IN: u64 = 4;

/// Set just before the SIGKILL: a failure seen before it is a bug, one
/// seen after it is the kill.
#[derive(Debug, Default)]
struct Flags {
    killed: AtomicBool,
}

impl Flags {
    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// `Ok` when the kill explains the error, `Err` when it does not.
    fn after_kill(&self, what: &str, e: impl fmt::Display) -> Result<(), String> {
        if self.killed() {
            Ok(())
        } else {
            Err(format!("{what} failed before the kill: {e}"))
        }
    }
}

/// What one cycle's load did.
#[derive(Debug, Default)]
pub struct Stats {
    appends: usize,
    mints: usize,
    authorizations: usize,
    delivered: usize,
    cut_off: usize,
    kept: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} appends, {} mints and {} authorizations acknowledged, {} tokens delivered, {} redemptions cut off, {} tokens kept",
            self.appends, self.mints, self.authorizations, self.delivered, self.cut_off, self.kept
        )
    }
}

/// Runs the mixed load for `run_for`, kills the server, and adds what
/// was acknowledged to `model`.
pub async fn drive(
    env: &Arc<Env>,
    server: &mut Server,
    model: &mut Model,
    rng: &mut Rng,
    run_for: Duration,
) -> Result<Stats, String> {
    let flags = Arc::new(Flags::default());
    let (tx, rx) = mpsc::unbounded_channel::<Token>();
    let rx = Arc::new(Mutex::new(rx));
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));

    let mut writers = Vec::new();
    for t in 0..WRITERS {
        let (env, flags, addr, seed) = (
            env.clone(),
            flags.clone(),
            server.protocol.clone(),
            rng.next(),
        );
        writers.push(tokio::spawn(writer(env, flags, addr, t, seed)));
    }
    let mut minters = Vec::new();
    for _ in 0..MINTERS {
        let (env, flags, addr) = (env.clone(), flags.clone(), server.protocol.clone());
        let (tx, kept, seed) = (tx.clone(), kept.clone(), rng.next());
        minters.push(tokio::spawn(minter(env, flags, addr, tx, kept, seed)));
    }
    let mut authorizers = Vec::new();
    for _ in 0..AUTHORIZERS {
        let (env, flags, http) = (env.clone(), flags.clone(), server.http.clone());
        let (tx, kept, seed) = (tx.clone(), kept.clone(), rng.next());
        authorizers.push(tokio::task::spawn_blocking(move || {
            authorizer(&env, &flags, &http, &tx, &kept, seed)
        }));
    }
    drop(tx);
    let mut redeemers = Vec::new();
    for _ in 0..REDEEMERS {
        let (env, flags, addr, rx) = (
            env.clone(),
            flags.clone(),
            server.protocol.clone(),
            rx.clone(),
        );
        redeemers.push(tokio::spawn(redeemer(env, flags, addr, rx)));
    }

    tokio::time::sleep(run_for).await;
    flags.killed.store(true, Ordering::SeqCst);
    server.kill();

    let mut stats = Stats::default();
    let mut failure = None;
    for w in writers {
        match w.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(acked) => {
                stats.appends += acked.len();
                for a in acked {
                    model.acked(a)?;
                }
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    for m in minters {
        match m.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(n) => stats.mints += n,
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    for a in authorizers {
        match a.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(n) => stats.authorizations += n,
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    for r in redeemers {
        match r.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((delivered, cut_off)) => {
                stats.delivered += delivered.len();
                stats.cut_off += cut_off.len();
                model.delivered.extend(delivered);
                model.in_flight.extend(cut_off);
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Tokens still queued were never sent: as good as kept.
    let mut kept = std::mem::take(&mut *kept.lock().map_err(|e| e.to_string())?);
    while let Ok(t) = rx.lock().await.try_recv() {
        kept.push(t);
    }
    stats.kept = kept.len();
    model.kept.extend(kept);
    model.totals.mints += stats.mints as u64;
    model.totals.authorizations += stats.authorizations as u64;
    model.totals.redemptions += stats.delivered as u64;
    model.totals.cut_off += stats.cut_off as u64;
    Ok(stats)
}

/// Appends records, one at a time or in batches of three, to eight
/// subjects of its own, until the kill.
async fn writer(
    env: Arc<Env>,
    flags: Arc<Flags>,
    addr: String,
    t: usize,
    seed: u64,
) -> Result<Vec<Acked>, String> {
    let mut rng = Rng::new(seed);
    let mut acked = Vec::new();
    let c = match Client::connect(config(&addr, &env.writer)).await {
        Ok(c) => c,
        Err(e) => return flags.after_kill("a writer's connect", e).map(|()| acked),
    };
    let mut i = 0u64;
    while !flags.killed() {
        let n = if rng.below(4) == 0 { 3 } else { 1 };
        let records: Vec<Record> = (0..n)
            .map(|_| {
                i += 1;
                Record {
                    subject: format!("w{t}-{}", i % 8),
                    fields: vec![
                        ("n".to_string(), format!("{seed:x}-{i}")),
                        ("writer".to_string(), t.to_string()),
                    ],
                }
            })
            .collect();
        let result = if n == 1 {
            let r = &records[0];
            c.append(r.subject.clone(), r.fields.clone())
                .await
                .map(|receipt| vec![receipt])
        } else {
            c.append_batch(records.clone()).await
        };
        let receipts = match result {
            Ok(r) => r,
            Err(e) => return flags.after_kill("an append", e).map(|()| acked),
        };
        if receipts.len() != records.len() {
            return Err(format!(
                "{} receipts for a batch of {}",
                receipts.len(),
                records.len()
            ));
        }
        for (receipt, record) in receipts.into_iter().zip(records) {
            let plaintext = server::serve::record_json(&record.fields)
                .map_err(|m| format!("encode a record: {m:?}"))?;
            acked.push(Acked {
                seq: receipt.seq,
                entry_hash: receipt.entry_hash,
                subject: record.subject,
                plaintext,
            });
        }
    }
    Ok(acked)
}

/// Either queues `t` for redemption or keeps it for after the restart.
fn hand_out(
    t: Token,
    rng: &mut Rng,
    tx: &mpsc::UnboundedSender<Token>,
    kept: &std::sync::Mutex<Vec<Token>>,
) -> Result<(), String> {
    if rng.below(KEEP_ONE_IN) == 0 {
        kept.lock().map_err(|e| e.to_string())?.push(t);
    } else if let Err(mpsc::error::SendError(t)) = tx.send(t) {
        kept.lock().map_err(|e| e.to_string())?.push(t);
    }
    Ok(())
}

/// Mints tokens over the protocol as the gateway, until the kill.
async fn minter(
    env: Arc<Env>,
    flags: Arc<Flags>,
    addr: String,
    tx: mpsc::UnboundedSender<Token>,
    kept: Arc<std::sync::Mutex<Vec<Token>>>,
    seed: u64,
) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let c = match Client::connect(config(&addr, &env.gateway)).await {
        Ok(c) => c,
        Err(e) => return flags.after_kill("a gateway's connect", e).map(|()| 0),
    };
    let mut n = 0;
    while !flags.killed() {
        let subject = SEEDED[rng.below(SEEDED.len() as u64) as usize].0;
        match c
            .mint(
                PARTNER,
                subject,
                "kyc",
                vec![("name".into(), MaskOp::Reveal)],
                600,
            )
            .await
        {
            Ok((token, _)) => {
                n += 1;
                let t = Token {
                    token,
                    subject: subject.to_string(),
                    from_http: false,
                };
                hand_out(t, &mut rng, &tx, &kept)?;
            }
            Err(e) => return flags.after_kill("a mint", e).map(|()| n),
        }
    }
    Ok(n)
}

/// Authorizes over the HTTP shim as the partner, until the kill.
fn authorizer(
    env: &Env,
    flags: &Flags,
    http: &str,
    tx: &mpsc::UnboundedSender<Token>,
    kept: &std::sync::Mutex<Vec<Token>>,
    seed: u64,
) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let url = format!("http://{http}/v1/authorize");
    let mut n = 0;
    while !flags.killed() {
        let subject = SEEDED[rng.below(SEEDED.len() as u64) as usize].0;
        let reply = agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", env.partner))
            .send_json(serde_json::json!({"subject_id": subject, "purpose": "kyc"}));
        let body: serde_json::Value = match reply {
            Ok(r) => match r.into_json() {
                Ok(v) => v,
                Err(e) => return flags.after_kill("reading a grant", e).map(|()| n),
            },
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return flags
                    .after_kill("an authorization", format!("{code} {body}"))
                    .map(|()| n);
            }
            Err(e) => return flags.after_kill("an authorization", e).map(|()| n),
        };
        let token = body["token"]
            .as_str()
            .ok_or_else(|| format!("a grant without a token: {body}"))?
            .to_string();
        n += 1;
        let t = Token {
            token,
            subject: subject.to_string(),
            from_http: true,
        };
        hand_out(t, &mut rng, tx, kept)?;
    }
    Ok(n)
}

/// Redeems queued tokens, a connection per token as partners do, until
/// the kill. Returns the tokens delivered and those cut off.
async fn redeemer(
    env: Arc<Env>,
    flags: Arc<Flags>,
    addr: String,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Token>>>,
) -> Result<(Vec<Token>, Vec<Token>), String> {
    let (mut delivered, mut cut_off) = (Vec::new(), Vec::new());
    while !flags.killed() {
        let next = {
            let mut rx = rx.lock().await;
            tokio::time::timeout(Duration::from_millis(20), rx.recv()).await
        };
        let t = match next {
            Ok(Some(t)) => t,
            Ok(None) => break,
            Err(_) => continue,
        };
        let result = match Client::connect(config(&addr, &env.partner)).await {
            Ok(c) => c.redeem(&t.token).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(got) => {
                t.check(&got)?;
                delivered.push(t);
            }
            Err(e) => {
                flags.after_kill("a redemption", e)?;
                cut_off.push(t);
            }
        }
    }
    Ok((delivered, cut_off))
}
