//! The crash harness: a real `vaultd serve` process under mixed load,
//! killed with SIGKILL at random moments (during startup and recovery
//! too), restarted, and checked after every cycle.
//!
//! Load, all at once, from this process:
//! - writers append records (single appends and batches) over the
//!   protocol, each on its own connection;
//! - gateways mint one-time tokens over the protocol, and partners
//!   authorize over the HTTP shim (`POST /v1/authorize`), which audits the
//!   grant and mints a token;
//! - partners redeem most tokens at once, a connection per token, and
//!   keep the rest for after the restart.
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
//! Any request refused or failed before the kill is a failure too. Usage:
//!
//! ```text
//! cargo test --test crash_harness                     # 20 cycles, a random seed
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

/// Cycles without `--cycles`: what CI runs.
const DEFAULT_CYCLES: usize = 20;

/// The partner every token is for, with its policy.
const PARTNER: &str = "lender-1";
const POLICIES: &str = r#"
[partners.lender-1]
max_token_ttl_secs = 900
rate_limit_per_minute = 1000000

[partners.lender-1.purposes.kyc.fields]
name = "reveal"
email = "partial"
"#;

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
    for cycle in 1..=args.cycles {
        // Some cycles first kill a server that is still opening the vault
        // (recovering from the previous kill).
        if rng.below(3) == 0 {
            let at = Duration::from_millis(rng.below(400));
            kill_during_startup(&env, at)?;
            startup_kills += 1;
        }
        let mut server = start(&env)?;
        let checked = rt.block_on(model::check_tokens(&env, &server, &mut model, &mut rng))?;
        let run_for = Duration::from_millis(150 + rng.below(1350));
        let stats = rt.block_on(load::drive(
            &env,
            &mut server,
            &mut model,
            &mut rng,
            run_for,
        ))?;
        drop(server); // already killed by `drive`
        let entries = model::check_offline(&env, &mut model, &mut rng)?;
        eprintln!(
            "cycle {cycle}/{}: killed after {} ms: {stats}; after the restart {checked}; log of {entries} entries verified",
            args.cycles,
            run_for.as_millis()
        );
    }
    // A last restart checks the tokens of the last cycle.
    let server = start(&env)?;
    let checked = rt.block_on(model::check_tokens(&env, &server, &mut model, &mut rng))?;
    drop(server);
    eprintln!("after the last restart {checked}");
    Ok(format!(
        "crash harness passed: {} cycles ({startup_kills} with a kill during startup) in {:.0} s, seed {}: {}",
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
    std::fs::write(&policies_file, POLICIES).map_err(|e| e.to_string())?;
    server::shim::PoliciesFile::parse(POLICIES, 3600)?;
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
    let mut items = Vec::new();
    for (subject, name) in SEEDED {
        let record = serde_json::json!({"name": name, "email": format!("{subject}@example.com")});
        items.push(Append::record(*subject, record.to_string().into_bytes()));
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
    })
}

/// `vaultd serve` as the harness runs it (SIGKILL when dropped).
pub type Server = support::Vaultd;

fn vaultd(env: &Env) -> Command {
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&env.dir)
        .arg("--passphrase-file")
        .arg(&env.passphrase_file)
        .arg("--policies")
        .arg(&env.policies_file)
        .args([
            "--insecure-plaintext",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FINTRUST_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("FINTRUST_LOG", "info");
    cmd
}

fn start(env: &Env) -> Result<Server, String> {
    Server::spawn(vaultd(env))
}

/// Starts `vaultd serve` and kills it `at` later, ready or not.
fn kill_during_startup(env: &Env, at: Duration) -> Result<(), String> {
    let mut child = vaultd(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start vaultd: {e}"))?;
    std::thread::sleep(at);
    let _ = child.kill();
    child.wait().map_err(|e| e.to_string())?;
    Ok(())
}
