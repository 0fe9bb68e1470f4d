//! The mixed load of one cycle, and the kill (or crash) at its end.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{Client, ClientError, ErrorCode, Record};
use tokio::sync::{mpsc, Mutex};

use crate::model::{config, mint_seeded, Acked, Model, Rng, Token};
use crate::{seeded_record, Ending, Env, Server, SEEDED};

const WRITERS: usize = 4;
const MINTERS: usize = 2;
const AUTHORIZERS: usize = 2;
const REDEEMERS: usize = 3;

/// How long a server may take to serve again after a failed write before
/// the harness calls it stuck.
const RECOVERY_GUARD: Duration = Duration::from_secs(60);

/// One in this many acknowledged tokens is kept for after the restart.
const KEEP_ONE_IN: u64 = 4;

/// What the clients of one cycle share.
#[derive(Debug, Default)]
struct Flags {
    /// Set just before the SIGKILL, or once the server is seen dead: a
    /// failure seen before it is a bug, one seen after it is the kill.
    killed: AtomicBool,
    /// The server may crash by itself (a failpoint).
    may_crash: bool,
    /// A failed write poisons the vault this cycle: `unavailable` is
    /// expected until `vaultd` has opened it again.
    fault: bool,
    /// Requests refused with `unavailable`, and acknowledged after one.
    refused: AtomicUsize,
    resumed: AtomicUsize,
}

impl Flags {
    fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// `Ok` when the kill explains the error, `Err` when it does not. A
    /// server that crashed by itself is seen dead a few milliseconds
    /// after its clients see their connections close: wait that long.
    async fn after_kill(&self, what: &str, e: impl fmt::Display) -> Result<(), String> {
        if self.may_crash {
            for _ in 0..100 {
                if self.killed() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        self.judge(what, e)
    }

    /// [`Flags::after_kill`] for a client's error: a typed answer other
    /// than `unavailable` came from a server alive to give it (a
    /// `token_spent` on a token's first redemption, an `internal`), which
    /// no kill explains.
    async fn after_kill_client(&self, what: &str, e: ClientError) -> Result<(), String> {
        match e.server_code() {
            Some(code) if code != ErrorCode::Unavailable => {
                Err(format!("{what} was refused by the server: {e}"))
            }
            _ => self.after_kill(what, e).await,
        }
    }

    /// [`Flags::after_kill`] on a blocking thread.
    fn after_kill_blocking(&self, what: &str, e: impl fmt::Display) -> Result<(), String> {
        if self.may_crash {
            for _ in 0..100 {
                if self.killed() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.judge(what, e)
    }

    fn judge(&self, what: &str, e: impl fmt::Display) -> Result<(), String> {
        if self.killed() {
            Ok(())
        } else {
            Err(format!("{what} failed before the kill: {e}"))
        }
    }

    /// A refusal the failed write of this cycle explains.
    fn tolerated(&self, e: &ClientError) -> bool {
        let yes = self.fault && e.server_code() == Some(ErrorCode::Unavailable);
        if yes {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        yes
    }
}

/// Connects, and while the vault is being opened again after a failed
/// write, tries again. `None`: the server is gone.
async fn connect(
    flags: &Flags,
    what: &str,
    addr: &str,
    key: &str,
) -> Result<Option<Client>, String> {
    loop {
        match Client::connect(config(addr, key)).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if flags.tolerated(&e) && !flags.killed() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return flags.after_kill_client(what, e).await.map(|()| None),
        }
    }
}

/// What one cycle's load did.
#[derive(Debug, Default)]
pub struct Stats {
    /// How the cycle ended, said in words.
    ending: String,
    /// A crash cycle's failpoint crashed `vaultd` (rather than being
    /// killed for not reaching it).
    pub crashed: bool,
    /// Requests refused after a failed write: a fault cycle's fault
    /// reached a request.
    pub refused: usize,
    resumed: usize,
    rotations: usize,
    appends: usize,
    mints: usize,
    authorizations: usize,
    delivered: usize,
    cut_off: usize,
    kept: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.ending)?;
        if self.refused > 0 {
            write!(
                f,
                "{} requests refused as unavailable, {} acknowledged after a refusal; ",
                self.refused, self.resumed
            )?;
        }
        write!(
            f,
            "{} appends, {} key rotation entries, {} mints and {} authorizations acknowledged, {} tokens delivered, {} redemptions cut off, {} tokens kept",
            self.appends, self.rotations, self.mints, self.authorizations, self.delivered, self.cut_off, self.kept
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
    ending: Ending,
    run_for: Duration,
) -> Result<Stats, String> {
    let flags = Arc::new(Flags {
        may_crash: matches!(ending, Ending::Crash(_)),
        fault: matches!(ending, Ending::Fault(_)),
        ..Flags::default()
    });
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
    let rotator = {
        let (env, flags, addr, seed) = (
            env.clone(),
            flags.clone(),
            server.protocol.clone(),
            rng.next(),
        );
        tokio::spawn(rotator(env, flags, addr, seed))
    };
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

    // Until `run_for` has passed, or the server crashed by itself. After
    // a failed write, also until a request was acknowledged again: the
    // vault was opened again in the running server (the guard is for a
    // server that never recovers, not a performance limit).
    let started = Instant::now();
    let mut crashed = None;
    let waiting = |flags: &Flags| {
        let recovering =
            flags.refused.load(Ordering::SeqCst) > 0 && flags.resumed.load(Ordering::SeqCst) == 0;
        started.elapsed() < run_for || (recovering && started.elapsed() < RECOVERY_GUARD)
    };
    while waiting(&flags) {
        if let Some(status) = server.exited() {
            // An armed vaultd aborts on a panic (SIGABRT): anything else is
            // not the failpoint's crash.
            use std::os::unix::process::ExitStatusExt;
            if matches!(ending, Ending::Crash(_)) && status.signal() != Some(6) {
                return Err(format!("vaultd exited, not at its failpoint: {status}"));
            }
            // And its last words name the failpoint: any other panic of
            // an armed vaultd aborts it too.
            if let Ending::Crash(name) = ending {
                let said = format!("failpoint {name} panic");
                // The process is gone: its log ends once its pipe is read.
                let log: Vec<String> =
                    std::iter::from_fn(|| server.log.recv_timeout(Duration::from_secs(10)).ok())
                        .collect();
                if !log.iter().any(|l| l.contains(&said)) {
                    return Err(format!(
                        "vaultd aborted, not at its failpoint {name}: {}",
                        log.join("\n")
                    ));
                }
            }
            crashed = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    flags.killed.store(true, Ordering::SeqCst);
    server.kill();
    let after = started.elapsed().as_millis();
    let (refused, resumed) = (
        flags.refused.load(Ordering::SeqCst),
        flags.resumed.load(Ordering::SeqCst),
    );
    if refused > 0 && resumed == 0 && crashed.is_none() {
        return Err(format!(
            "{refused} requests refused after a failed write, and vaultd did not serve again within {} s",
            RECOVERY_GUARD.as_secs()
        ));
    }

    let mut stats = Stats {
        ending: match (ending, crashed) {
            (Ending::Crash(point), Some(status)) => {
                format!("crashed at {point} after {after} ms ({status})")
            }
            (Ending::Crash(point), None) => {
                format!("{point} not reached; killed after {after} ms")
            }
            (_, Some(status)) => return Err(format!("vaultd exited by itself: {status}")),
            (Ending::Fault(point), None) => {
                format!("a failed write at {point}; killed after {after} ms")
            }
            (Ending::Kill, None) => format!("killed after {after} ms"),
        },
        crashed: crashed.is_some(),
        refused,
        resumed,
        ..Stats::default()
    };
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
    match rotator.await.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(acked) => {
            stats.rotations += acked.len();
            for a in acked {
                model.rotated(a)?;
            }
        }
        Err(e) => failure = failure.or(Some(e)),
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
    let Some(c) = connect(&flags, "a writer's connect", &addr, &env.writer).await? else {
        return Ok(acked);
    };
    let mut i = 0u64;
    let mut refused = false;
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
            Err(e) if flags.tolerated(&e) => {
                refused = true;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                return flags
                    .after_kill_client("an append", e)
                    .await
                    .map(|()| acked)
            }
        };
        if std::mem::take(&mut refused) {
            flags.resumed.fetch_add(1, Ordering::SeqCst);
        }
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
                subject: Some(record.subject),
                plaintext: Some(plaintext),
            });
        }
    }
    Ok(acked)
}

/// Rotates keys as an admin every 50–300 ms, until the kill: a seeded
/// subject's data key (half the time re-encrypting its record, which
/// must then read back as the seeded plaintext), or one time in five the
/// signing key. Returns the entries acknowledged.
async fn rotator(
    env: Arc<Env>,
    flags: Arc<Flags>,
    addr: String,
    seed: u64,
) -> Result<Vec<Acked>, String> {
    let mut rng = Rng::new(seed);
    let mut acked = Vec::new();
    let Some(c) = connect(&flags, "an admin's connect", &addr, &env.admin).await? else {
        return Ok(acked);
    };
    let entry = |r: &client::Receipt, subject: Option<&str>, plaintext: Option<Vec<u8>>| Acked {
        seq: r.seq,
        entry_hash: r.entry_hash,
        subject: subject.map(str::to_string),
        plaintext,
    };
    while !flags.killed() {
        tokio::time::sleep(Duration::from_millis(50 + rng.below(250))).await;
        let result = if rng.below(5) == 0 {
            c.rotate_signing_key()
                .await
                .map(|r| vec![entry(&r.receipt, None, None)])
        } else {
            let (subject, name) = SEEDED[rng.below(SEEDED.len() as u64) as usize];
            let reencrypt = rng.below(2) == 0;
            c.rotate_subject_key(subject, reencrypt).await.map(|r| {
                let mut v = vec![entry(&r.receipt, Some(subject), None)];
                if let Some(re) = &r.reencrypted {
                    v.push(entry(re, Some(subject), Some(seeded_record(subject, name))));
                }
                v
            })
        };
        match result {
            Ok(entries) => acked.extend(entries),
            Err(e) if flags.tolerated(&e) => {}
            Err(e) => {
                return flags
                    .after_kill_client("a key rotation", e)
                    .await
                    .map(|()| acked)
            }
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
    let Some(c) = connect(&flags, "a gateway's connect", &addr, &env.gateway).await? else {
        return Ok(0);
    };
    let mut n = 0;
    while !flags.killed() {
        match mint_seeded(&c, &mut rng).await {
            Ok(t) => {
                n += 1;
                hand_out(t, &mut rng, &tx, &kept)?;
            }
            Err(e) if flags.tolerated(&e) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return flags.after_kill_client("a mint", e).await.map(|()| n),
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
        // One in eight asks for a purpose the policy does not allow: a
        // denial, audited (an `access_denied` event) before the 403.
        let denied = rng.below(8) == 0;
        let purpose = if denied { "marketing" } else { "kyc" };
        let reply = agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", env.partner))
            .send_json(serde_json::json!({"subject_id": subject, "purpose": purpose}));
        let body: serde_json::Value = match reply {
            Ok(r) if denied => {
                return Err(format!(
                    "a purpose outside the policy was granted: {}",
                    r.status()
                ))
            }
            Err(ureq::Error::Status(403, r)) if denied => {
                let body: serde_json::Value =
                    r.into_json().map_err(|e| format!("a denial's body: {e}"))?;
                if body["error"] != "purpose_not_allowed" {
                    return Err(format!("the wrong denial: {body}"));
                }
                n += 1;
                continue;
            }
            Ok(r) => match r.into_json() {
                Ok(v) => v,
                Err(e) => return flags.after_kill_blocking("reading a grant", e).map(|()| n),
            },
            Err(ureq::Error::Status(503, _)) if flags.fault => {
                flags.refused.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                return flags
                    .after_kill_blocking("an authorization", format!("{code} {body}"))
                    .map(|()| n);
            }
            Err(e) => return flags.after_kill_blocking("an authorization", e).map(|()| n),
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
            // Refused during a failed write's recovery: the token may or
            // may not be spent (at most once, like a cut-off redemption).
            Err(e) if flags.tolerated(&e) => cut_off.push(t),
            Err(e) => {
                flags.after_kill_client("a redemption", e).await?;
                cut_off.push(t);
            }
        }
    }
    Ok((delivered, cut_off))
}
