//! The crash harness: a real `vaultd serve` process under mixed load,
//! crashed at random moments and at every failpoint, or made to fail a
//! write, then restarted and checked after every cycle.
//!
//! Cycles take turns (`cycle % 4`):
//! - 0: SIGKILL at a random moment;
//! - 1 and 3: a crash at a failpoint (`FINTRUST_FAILPOINTS`, action
//!   `N*off->panic`: the N+1th time the step is reached, the process
//!   aborts), taking every failpoint in turn: each step of a commit
//!   (before and after the write, before and after the flush, the
//!   checkpoint, the move of held-back log chunks to sled, and
//!   the steps of derived state) and just before each reply (append,
//!   batch, mint, redeem, authorize, and the audit event of a denial);
//!   then SIGKILL if it was not reached;
//! - 2: a failed write or fsync at a commit failpoint (`N*off->1*return`),
//!   which poisons the vault: requests are refused with `unavailable`
//!   (and only with that), `vaultd` opens the vault again by itself, and
//!   the load goes on until a SIGKILL at a random moment.
//!
//! One cycle in three also first kills a `vaultd` that is starting up,
//! that is, while it recovers from the cycle before.
//!
//! Load, all at once, from this process:
//! - writers append records (single appends and batches) over the
//!   protocol, each on its own connection;
//! - gateways mint one-time tokens over the protocol, and partners
//!   authorize over the HTTP shim (`POST /v1/authorize`), which audits the
//!   grant and mints a token (one request in eight names a purpose the
//!   policy does not allow: the shim audits the denial as an
//!   `access_denied` event and answers 403);
//! - partners redeem most tokens at once, a connection per token, and
//!   keep the rest for after the restart;
//! - an admin rotates keys: seeded subjects' data keys (half of them
//!   re-encrypting the record) and, one time in five, the signing key.
//!
//! After each kill, with the server down, the data dir must pass:
//! - `vault-verify`'s checks from genesis with the pinned key;
//! - every acknowledged append is at its seq with its receipt's entry
//!   hash and the exact plaintext written (the new ones of the cycle, and
//!   a sample of older ones); no seq is acknowledged twice;
//! - the derived state equals a rebuild from the log.
//!
//! Then, once the server is back, over the protocol:
//! - every token a partner received data for is spent (`token_spent`);
//! - every acknowledged token never redeemed gives its data exactly once;
//! - a token whose redemption was cut off by the kill gives its data at
//!   most once.
//!
//! Any request refused or failed before the kill or crash is a failure
//! too, except `unavailable` during a failed write's cycle. Usage:
//!
//! ```text
//! cargo test --test crash_harness                     # 34 cycles, a random seed
//! cargo test --release --test crash_harness -- --cycles 100 --seed 7
//! ```
//!
//! The seed is printed first; the same seed gives the same kill moments
//! and choices (not the same interleaving: the processes race).

#[path = "../support/mod.rs"]
mod support;

mod load;
mod model;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use model::{Model, Rng};

/// Cycles without `--cycles`: what CI runs. 34 cycles reach every
/// crash failpoint (15, cycles 1, 3, … 29) and every fault failpoint (9,
/// cycles 2, 6, … 34) once.
const DEFAULT_CYCLES: usize = 34;

/// Where a cycle crashes `vaultd` (storage's commit steps, then the
/// server's replies).
const CRASH_POINTS: &[&str] = &[
    "commit::before_write",
    "reply::append",
    "commit::after_write",
    "reply::mint",
    "commit::before_flush",
    "reply::redeem",
    "commit::after_flush",
    "reply::authorize",
    "index::before_write",
    "reply::append_batch",
    "index::mid_write",
    "reply::event",
    "index::after_write",
    "checkpoint::before_sync",
    "apply::before_write",
];

/// Where a cycle fails a write or fsync: every step of a commit.
const FAULT_POINTS: &[&str] = storage::vault::FAILPOINTS;

/// How a cycle ends.
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    /// SIGKILL at a random moment.
    Kill,
    /// An abort at this failpoint.
    Crash(&'static str),
    /// A failed write at this failpoint, then SIGKILL at a random moment.
    Fault(&'static str),
}

/// The partner every token is for (its policy: `support::POLICIES`).
const PARTNER: &str = "lender-1";

/// Subjects whose records never change, so that every redemption has one
/// right answer: (subject, name).
const SEEDED: &[(&str, &str)] = &[
    ("seed-0", "Ada Lovelace"),
    ("seed-1", "Alan Turing"),
    ("seed-2", "Grace Hopper"),
    ("seed-3", "Edsger Dijkstra"),
];

const PASSPHRASE: &[u8] = b"crash harness passphrase";

#[derive(Debug)]
struct Args {
    cycles: usize,
    seed: u64,
    /// Keep the data dir here instead of a temp dir.
    dir: Option<PathBuf>,
}

/// Parses `--cycles N`, `--seed S`, `--dir D`. The flags libtest takes
/// (`--nocapture`, `--test-threads=2`, …) are ignored; a positional
/// filter that does not match `crash` skips the run, as libtest would.
fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        cycles: std::env::var("FINTRUST_CRASH_CYCLES")
            .ok()
            .map(|v| v.parse().map_err(|e| format!("FINTRUST_CRASH_CYCLES: {e}")))
            .transpose()?
            .unwrap_or(DEFAULT_CYCLES),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--cycles" => {
                args.cycles = value("--cycles")?
                    .parse()
                    .map_err(|e| format!("--cycles: {e}"))?
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--dir" => args.dir = Some(PathBuf::from(value("--dir")?)),
            "--list" => {
                println!("crash_harness: test");
                return Ok(None);
            }
            flag if flag.starts_with('-') => {}
            filter => {
                if !"crash_harness".contains(filter) {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(summary) => {
            eprintln!("{summary}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!(
                "crash harness FAILED (seed {}; rerun with `-- --seed {} --cycles {}`): {failure}",
                args.seed, args.seed, args.cycles
            );
            ExitCode::FAILURE
        }
    }
}

/// What the harness needs to start, load and check the vault.
pub struct Env {
    pub dir: PathBuf,
    pub passphrase_file: PathBuf,
    pub policies_file: PathBuf,
    pub public_key: ed25519_dalek::VerifyingKey,
    pub writer: String,
    pub gateway: String,
    pub partner: String,
    pub admin: String,
}

/// The plaintext of a seeded subject's record.
pub fn seeded_record(subject: &str, name: &str) -> Vec<u8> {
    serde_json::json!({"name": name, "email": format!("{subject}@example.com")})
        .to_string()
        .into_bytes()
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn run(args: &Args) -> Result<String, String> {
    eprintln!("crash harness: {} cycles, seed {}", args.cycles, args.seed);
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let env = Arc::new(rt.block_on(setup(&root))?);
    let mut rng = Rng::new(args.seed);
    let mut model = Model::default();
    let started = Instant::now();
    let mut startup_kills = 0;
    let (mut crashes, mut faults) = (0, 0);
    // Cycles whose failpoint was reached: a crash at it, or a failed write
    // that refused a request.
    let (mut crashed, mut refusing) = (0, 0);
    for cycle in 1..=args.cycles {
        // Some cycles first kill a server that is still opening the vault
        // (recovering from the previous kill).
        if rng.below(3) == 0 {
            let at = Duration::from_millis(rng.below(400));
            kill_during_startup(&env, at)?;
            startup_kills += 1;
        }
        let ending = match cycle % 4 {
            1 | 3 => {
                crashes += 1;
                Ending::Crash(CRASH_POINTS[(crashes - 1) % CRASH_POINTS.len()])
            }
            2 => {
                faults += 1;
                Ending::Fault(FAULT_POINTS[(faults - 1) % FAULT_POINTS.len()])
            }
            _ => Ending::Kill,
        };
        let mut server = start(&env, None)?;
        let checked = rt.block_on(model::check_tokens(&env, &server, &mut model, &mut rng))?;
        // The checks ran on an unarmed server; the load runs on an armed one.
        let armed = match ending {
            Ending::Kill => None,
            Ending::Crash(point) => Some(format!("{point}={}*off->panic", 1 + rng.below(50))),
            Ending::Fault(point) => {
                Some(format!("{point}={}*off->1*return->off", 1 + rng.below(50)))
            }
        };
        if let Some(spec) = &armed {
            // A clean stop, which revokes its shim key, so that the armed
            // server's start writes one commit (its own shim key) as N
            // counts from 1: a SIGKILL would leave the key to revoke, a
            // second commit at start, and N = 1 would then fail the start
            // rather than the load.
            let status = server.stop();
            if !status.success() {
                return Err(format!("the unarmed vaultd did not stop cleanly: {status}"));
            }
            server = start(&env, Some(spec))?;
        }
        let run_for = Duration::from_millis(match ending {
            Ending::Kill => 150 + rng.below(1350),
            Ending::Crash(_) => 3000,
            Ending::Fault(_) => 1500 + rng.below(1500),
        });
        let stats = rt.block_on(load::drive(
            &env,
            &mut server,
            &mut model,
            &mut rng,
            ending,
            run_for,
        ))?;
        drop(server); // killed by `drive` or dead
        match ending {
            Ending::Crash(_) => crashed += usize::from(stats.crashed),
            Ending::Fault(_) => refusing += usize::from(stats.refused > 0),
            Ending::Kill => {}
        }
        let entries = model::check_offline(&env, &mut model, &mut rng)?;
        eprintln!(
            "cycle {cycle}/{}: {stats}; after the restart {checked}; log of {entries} entries verified",
            args.cycles,
        );
    }
    // A last restart checks the tokens of the last cycle.
    let server = start(&env, None)?;
    let checked = rt.block_on(model::check_tokens(&env, &server, &mut model, &mut rng))?;
    drop(server);
    eprintln!("after the last restart {checked}");
    // A failpoint may go unreached in a cycle, but one that is never
    // reached means the harness tests nothing (a vaultd built without the
    // `failpoints` feature only warns of the variable).
    if crashes > 0 && crashed == 0 {
        return Err(format!(
            "none of the {crashes} crash cycles crashed at its failpoint: is vaultd built with the failpoints feature?"
        ));
    }
    if faults > 0 && refusing == 0 {
        return Err(format!(
            "none of the {faults} failed writes refused a request: did their failpoints fire?"
        ));
    }
    Ok(format!(
        "crash harness passed: {} cycles ({crashed} of {crashes} crashed at their failpoint, {refusing} of {faults} failed writes refused a request, {startup_kills} with a kill during startup) in {:.0} s, seed {}: {}",
        args.cycles,
        started.elapsed().as_secs_f64(),
        args.seed,
        model.totals()
    ))
}

/// Creates the vault with the library (credentials, seeded records,
/// consents), writes the passphrase and policies files, and checks the
/// policies parse.
async fn setup(root: &Path) -> Result<Env, String> {
    use storage::{Append, Kind, Options, Unlock, Vault};
    let dir = root.join("vault");
    let passphrase_file = root.join("passphrase");
    let policies_file = root.join("policies.toml");
    std::fs::write(&passphrase_file, PASSPHRASE).map_err(|e| e.to_string())?;
    std::fs::write(&policies_file, support::POLICIES).map_err(|e| e.to_string())?;
    server::shim::PoliciesFile::parse(support::POLICIES, 3600)?;
    let created = Vault::create(
        &dir,
        &Unlock::passphrase(PASSPHRASE.to_vec()),
        Options::default(),
    )
    .map_err(|e| format!("create the vault: {e}"))?;
    let vault = created.vault;
    let credential = |role: &'static str, name: &'static str| {
        let vault = &vault;
        async move {
            vault
                .create_credential(role, name)
                .await
                .map(|(_, key)| key.to_string())
                .map_err(|e| format!("create a {role} credential: {e}"))
        }
    };
    let writer = credential("writer", "crash-writer").await?;
    let gateway = credential("gateway", "crash-gateway").await?;
    let partner = credential("partner", PARTNER).await?;
    let admin = credential("admin", "crash-admin").await?;
    let mut items = Vec::new();
    for (subject, name) in SEEDED {
        items.push(Append::record(*subject, seeded_record(subject, name)));
        items.push(Append::event(
            Kind::ConsentGranted,
            *subject,
            &serde_json::json!({"partner_id": PARTNER, "purposes": ["kyc"], "recorded_by": "crash-harness"}),
        ));
    }
    vault
        .append_batch(items)
        .await
        .map_err(|e| format!("seed: {e}"))?;
    let public_key = vault.public_key();
    vault.close().map_err(|e| format!("close: {e}"))?;
    Ok(Env {
        dir,
        passphrase_file,
        policies_file,
        public_key,
        writer,
        gateway,
        partner,
        admin,
    })
}

/// `vaultd serve` as the harness runs it (SIGKILL when dropped).
pub type Server = support::Vaultd;

fn vaultd(env: &Env, failpoints: Option<&str>) -> Command {
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(
        &mut cmd,
        &env.dir,
        &env.passphrase_file,
        Some(&env.policies_file),
    );
    // Derived state written often, so that its failpoints are reached
    // within a cycle.
    cmd.args(["--index-batch", "500"]);
    // Write-ahead segments checkpointed every few dozen groups, so that
    // the checkpoint's failpoint is reached and an open replays several.
    cmd.args(["--wal-segment-kib", "32"]);
    if let Some(spec) = failpoints {
        cmd.env(server::failpoints::ENV, spec);
    }
    cmd
}

/// Starts `vaultd serve`, with `failpoints` armed.
fn start(env: &Env, failpoints: Option<&str>) -> Result<Server, String> {
    Server::spawn(vaultd(env, failpoints))
}

/// Starts `vaultd serve` and kills it `at` later, ready or not.
fn kill_during_startup(env: &Env, at: Duration) -> Result<(), String> {
    let mut child = vaultd(env, None)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start vaultd: {e}"))?;
    std::thread::sleep(at);
    let _ = child.kill();
    child.wait().map_err(|e| e.to_string())?;
    Ok(())
}
