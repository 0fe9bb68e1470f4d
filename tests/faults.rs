//! A full disk under a real `vaultd serve`.
//!
//! The data dir lives on a small tmpfs mounted by the test (when the
//! test may mount, as root on most CI machines), nearly filled with a
//! ballast file. Where mounting is not allowed, `vaultd` runs under a
//! file-size limit instead (`ulimit -f`, with SIGXFSZ ignored), so that
//! its writes fail with EFBIG the way they would with ENOSPC.
//!
//! While the disk is full: appends fail with a typed `unavailable` error
//! and nothing the server could not make durable is acknowledged; a mint,
//! a redemption and an authorization are refused, because their audit
//! entries cannot be written (the token stays unspent); the server does
//! not hang or crash. When space returns, the running `vaultd` opens the
//! vault again by itself (on the tmpfs; under the file-size limit, which
//! stays with the process, it restarts instead): the token refused during
//! the fault redeems once, writes work again, the log verifies with the
//! pinned key, and every acknowledged append is there. Other write and fsync errors, at every step of a commit,
//! are injected by storage/tests/failpoints.rs.
//!
//! The recovery itself (`server::live::watch`) is also driven in this
//! process, with a failed fsync (the `commit::before_flush` failpoint):
//! it opens the vault again once no request holds it, and a stop that
//! comes while a request still holds it leaves the poisoned vault to the
//! shutdown, which reports it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use client::{Client, ClientConfig, ErrorCode, MaskOp, Tls, Zeroizing};

const PASSPHRASE: &[u8] = b"disk full test passphrase";
const PARTNER: &str = "lender-1";
const SUBJECT: &str = "seeded";

/// How the test takes space away.
enum Space {
    /// A tmpfs mounted at this path, with a ballast file in it.
    Tmpfs(PathBuf),
    /// `ulimit -f` (KiB) on the `vaultd` process.
    FileSize(u64),
}

impl Drop for Space {
    fn drop(&mut self) {
        if let Space::Tmpfs(m) = self {
            let _ = Command::new("umount").arg("-l").arg(&*m).status();
        }
    }
}

/// Mounts a tmpfs of `size` at `at`; false when not allowed.
fn mount_tmpfs(at: &Path, size: &str) -> bool {
    std::fs::create_dir_all(at).expect("mount point");
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fills the file system of `dir` with a ballast file but `leave` bytes.
fn fill(dir: &Path, leave: u64) {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let block = vec![0xA5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.flush();
    drop(f);
    let len = std::fs::metadata(&path).expect("ballast").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("ballast");
    f.set_len(len.saturating_sub(leave))
        .expect("shrink the ballast");
}

struct Keys {
    writer: String,
    gateway: String,
    partner: String,
    public_key: ed25519_dalek::VerifyingKey,
}

fn create(dir: &Path) -> Keys {
    use storage::{Append, Kind, Options, Unlock, Vault};
    let created = Vault::create(
        dir,
        &Unlock::passphrase(PASSPHRASE.to_vec()),
        Options::default(),
    )
    .expect("create");
    let vault = created.vault;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (writer, gateway, partner) = rt.block_on(async {
        let key = |role: &'static str, name: &'static str| {
            let vault = &vault;
            async move {
                vault
                    .create_credential(role, name)
                    .await
                    .expect("credential")
                    .1
                    .to_string()
            }
        };
        (
            key("writer", "writer").await,
            key("gateway", "gateway").await,
            key("partner", PARTNER).await,
        )
    });
    vault
        .append_batch_blocking(vec![
            Append::record(SUBJECT, br#"{"name":"Ada Lovelace"}"#.to_vec()),
            Append::event(
                Kind::ConsentGranted,
                SUBJECT,
                &serde_json::json!({"partner_id": PARTNER, "purposes": ["kyc"]}),
            ),
        ])
        .expect("seed");
    let public_key = vault.public_key();
    vault.close().expect("close");
    Keys {
        writer,
        gateway,
        partner,
        public_key,
    }
}

type Served = support::Vaultd;

fn serve(root: &Path, dir: &Path, fsize_kib: Option<u64>) -> Served {
    let vaultd = support::binary("fintrust-server", "vaultd");
    let mut cmd = match fsize_kib {
        // SIGXFSZ ignored (inherited through exec), so that a write past
        // the limit fails with EFBIG instead of killing the process.
        Some(kib) => {
            let mut c = Command::new("bash");
            c.args([
                "-c",
                "trap '' XFSZ; ulimit -f \"$1\"; shift; exec \"$@\"",
                "bash",
            ])
            .arg(kib.to_string())
            .arg(vaultd);
            c
        }
        None => Command::new(vaultd),
    };
    support::serve_args(
        &mut cmd,
        dir,
        &root.join("passphrase"),
        Some(&root.join("policies.toml")),
    );
    Served::spawn(cmd).unwrap_or_else(|e| panic!("{e}"))
}

fn config(addr: &str, key: &str) -> ClientConfig {
    ClientConfig {
        addr: addr.to_string(),
        tls: Tls::Plaintext,
        api_key: Zeroizing::new(key.to_string()),
        client_name: "disk full test".into(),
        timeout: std::time::Duration::from_secs(30),
    }
}

async fn connect(addr: &str, key: &str) -> Client {
    Client::connect(config(addr, key)).await.expect("connect")
}

/// A mint on a new connection. While the vault is being opened again,
/// the connection itself is refused (`unavailable`).
async fn mint(s: &Served, k: &Keys) -> client::Result<String> {
    Client::connect(config(&s.protocol, &k.gateway))
        .await?
        .mint(
            PARTNER,
            SUBJECT,
            "kyc",
            vec![("name".into(), MaskOp::Reveal)],
            600,
        )
        .await
        .map(|(t, _)| t.to_string())
}

async fn redeem(s: &Served, k: &Keys, token: &str) -> client::Result<client::Redeemed> {
    Client::connect(config(&s.protocol, &k.partner))
        .await?
        .redeem(token)
        .await
}

fn authorize(s: &Served, k: &Keys) -> (u16, serde_json::Value) {
    let reply = ureq::post(&format!("http://{}/v1/authorize", s.http))
        .set("Authorization", &format!("Bearer {}", k.partner))
        .send_json(serde_json::json!({"subject_id": SUBJECT, "purpose": "kyc"}));
    match reply {
        Ok(r) => (r.status(), r.into_json().expect("JSON")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().expect("JSON error body")),
        Err(e) => panic!("authorize: {e}"),
    }
}

fn unavailable<T: std::fmt::Debug>(r: &client::Result<T>) -> bool {
    matches!(r, Err(e) if e.server_code() == Some(ErrorCode::Unavailable))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_loses_nothing_and_recovers() {
    let _alone = ALONE.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    std::fs::write(root.join("passphrase"), PASSPHRASE).expect("passphrase");
    std::fs::write(root.join("policies.toml"), support::POLICIES).expect("policies");
    let mnt = root.join("small-disk");
    // FINTRUST_FAULTS_NO_MOUNT=1 takes the file-size path where a mount
    // would work.
    let may_mount = std::env::var_os("FINTRUST_FAULTS_NO_MOUNT").is_none();
    let (dir, space) = if may_mount && mount_tmpfs(&mnt, "96m") {
        (mnt.join("vault"), Space::Tmpfs(mnt.clone()))
    } else {
        eprintln!("note: cannot mount a tmpfs here; limiting vaultd's file size instead");
        (root.join("vault"), Space::FileSize(0))
    };
    let keys = tokio::task::block_in_place(|| create(&dir));
    let mut space = space;
    match &mut space {
        // Filled once vaultd runs: opening a vault writes too.
        Space::Tmpfs(_) => {}
        Space::FileSize(kib) => {
            // Opening grows sled's file (to the end of its segment): let
            // a first run do that, then allow a little beyond.
            tokio::task::block_in_place(|| {
                serve(&root, &dir, None).stop();
                wait_unlocked(&dir);
            });
            let largest = std::fs::read_dir(dir.join("db"))
                .expect("sled's dir")
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0);
            *kib = largest / 1024 + 256;
        }
    }
    let limit = match &space {
        Space::FileSize(kib) => Some(*kib),
        Space::Tmpfs(_) => None,
    };
    let s = tokio::task::block_in_place(|| serve(&root, &dir, limit));

    // A token minted while there is room; it is redeemed during the fault.
    let token = mint(&s, &keys).await.expect("mint before the disk fills");
    if let Space::Tmpfs(m) = &space {
        fill(m, 64 * 1024);
    }

    // Append 32 KiB records until the disk is full.
    let writer = connect(&s.protocol, &keys.writer).await;
    let mut acked = Vec::new();
    let pad = "x".repeat(32 * 1024);
    let refusal = loop {
        assert!(acked.len() < 100_000, "the disk never filled");
        let fields = vec![
            ("n".to_string(), acked.len().to_string()),
            ("pad".to_string(), pad.clone()),
        ];
        match writer.append(format!("s{}", acked.len() % 7), fields).await {
            Ok(r) => acked.push(r),
            Err(e) => break e,
        }
    };
    assert_eq!(
        refusal.server_code(),
        Some(ErrorCode::Unavailable),
        "a full disk is a typed refusal: {refusal}"
    );
    eprintln!(
        "{} appends acknowledged before the disk was full",
        acked.len()
    );

    // Everything that writes to the log is refused, and says so.
    let again = writer
        .append("s0", vec![("n".into(), "after".into())])
        .await;
    assert!(unavailable(&again), "{again:?}");
    let m = mint(&s, &keys).await;
    assert!(unavailable(&m), "a mint without its audit entry: {m:?}");
    let r = redeem(&s, &keys, &token).await;
    assert!(
        unavailable(&r),
        "a redemption without its audit entry: {r:?}"
    );
    let (status, body) = tokio::task::block_in_place(|| authorize(&s, &keys));
    assert!(
        status == 503 && body["error"].is_string() && body.get("token").is_none(),
        "an authorization without its audit entry: {status} {body}"
    );

    // Space returns. On the tmpfs, the running vaultd opens the vault
    // again by itself; under the file-size limit, which stays with the
    // process, vaultd restarts without it.
    let s = match &space {
        Space::Tmpfs(m) => {
            std::fs::remove_file(m.join("ballast")).expect("remove the ballast");
            let mut tries = 0;
            loop {
                let r = match Client::connect(config(&s.protocol, &keys.writer)).await {
                    Ok(c) => {
                        c.append("s0", vec![("n".into(), "space is back".into())])
                            .await
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Ok(_) => break,
                    Err(e) => {
                        // A liveness guard, not a performance limit: the
                        // reopen is retried at most 30 s apart.
                        tries += 1;
                        assert!(tries < 600, "vaultd did not recover: {e}");
                        assert_eq!(e.server_code(), Some(ErrorCode::Unavailable), "{e}");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
            eprintln!("vaultd opened the vault again by itself");
            s
        }
        Space::FileSize(_) => tokio::task::block_in_place(|| {
            let status = s.stop();
            eprintln!("vaultd stopped: {status}");
            wait_unlocked(&dir);
            serve(&root, &dir, None)
        }),
    };
    let got = redeem(&s, &keys, &token)
        .await
        .expect("the token refused during the fault redeems now");
    assert_eq!(got.subject, SUBJECT);
    let spent = redeem(&s, &keys, &token).await;
    assert!(
        matches!(&spent, Err(e) if e.server_code() == Some(ErrorCode::TokenSpent)),
        "{spent:?}"
    );
    let writer = connect(&s.protocol, &keys.writer).await;
    writer
        .append("s0", vec![("n".into(), "after the fault".into())])
        .await
        .expect("writes work again");
    let (status, body) = tokio::task::block_in_place(|| authorize(&s, &keys));
    assert_eq!(status, 200, "{body}");
    tokio::task::block_in_place(|| {
        s.stop();
        wait_unlocked(&dir);
    });
    let report = storage::verify(
        &dir,
        &storage::VerifyOptions {
            public_key: Some(keys.public_key),
            progress: None,
            total_hint: None,
            kept_head: None,
            verified_prefix: None,
        },
    )
    .expect("verify runs");
    assert!(report.ok(), "{:?}", report.failure);

    // Every acknowledged append is at its seq, unchanged.
    let vault = storage::Vault::open(
        &dir,
        &storage::Unlock::passphrase(PASSPHRASE.to_vec()),
        storage::Options::default(),
    )
    .expect("open");
    for r in &acked {
        let e = vault
            .entry(r.seq)
            .expect("read")
            .unwrap_or_else(|| panic!("acknowledged entry {} is gone", r.seq));
        assert_eq!(e.hash, r.entry_hash, "entry {}", r.seq);
    }
    let derived = vault.check_derived_state().expect("rebuild");
    assert_eq!(derived.differences, 0, "{:?}", derived.sample);
    vault.close().expect("close");
    drop(space);
}

fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("sled's data file");
    f.lock().expect("wait for sled's lock");
}

/// A vault in `dir` whose next commit fails its fsync: poisoned by one
/// append, which is refused.
async fn poisoned(dir: &Path) -> std::sync::Arc<storage::Vault> {
    poisoned_after(dir, async |_| {}).await
}

/// [`poisoned`], with `first` done to the vault before its failed append.
async fn poisoned_after(
    dir: &Path,
    first: impl AsyncFnOnce(&storage::Vault),
) -> std::sync::Arc<storage::Vault> {
    use storage::{Append, Options, Unlock, Vault};
    let vault = Vault::create(
        dir,
        &Unlock::passphrase(PASSPHRASE.to_vec()),
        Options::default(),
    )
    .expect("create")
    .vault;
    first(&vault).await;
    vault
        .append(Append::record(SUBJECT, b"{}".to_vec()))
        .await
        .expect("append");
    fail::cfg("commit::before_flush", "return").expect("arm");
    let r = vault.append(Append::record(SUBJECT, b"{}".to_vec())).await;
    fail::remove("commit::before_flush");
    assert!(r.is_err(), "{r:?}");
    assert!(vault.is_poisoned());
    std::sync::Arc::new(vault)
}

fn reopen(dir: &Path) -> server::live::Reopen {
    let dir = dir.to_path_buf();
    server::live::Reopen::new(
        dir,
        || Ok(storage::Unlock::passphrase(PASSPHRASE.to_vec())),
        storage::Options::default,
    )
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("never {what}");
}

/// The tests of this binary one at a time: the failpoint one arms is the
/// process's, and the other's vault commits in this process too.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test, as the failpoint registry is the process's: first a
/// recovery that a held request delays, then a stop in the middle of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_vault_is_opened_again_once_idle_or_left_to_the_shutdown() {
    use server::live::{watch, LiveVault, Status};
    use tokio_util::sync::CancellationToken;
    let _alone = ALONE.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");

    // Recovery: out of service while a request holds it, then open again.
    let dir = tmp.path().join("a");
    let live = LiveVault::from(poisoned(&dir).await);
    let held = live.get().expect("in service");
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch(live.clone(), reopen(&dir), stop.clone()));
    until("out of service", || live.status() == Status::Recovering).await;
    drop(held);
    until("open again", || live.status() == Status::Ok).await;
    let vault = live.get().expect("in service");
    vault
        .append(storage::Append::record(SUBJECT, b"{}".to_vec()))
        .await
        .expect("writes work again");
    drop(vault);
    stop.cancel();
    watcher.await.expect("watcher");
    let vault = std::sync::Arc::into_inner(live.take().expect("the vault")).expect("last handle");
    vault.close().expect("close");

    // Stopped while a request holds the poisoned vault: the shutdown gets
    // it back, and its close says it was poisoned.
    let dir = tmp.path().join("b");
    let live = LiveVault::from(poisoned(&dir).await);
    let held = live.get().expect("in service");
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch(live.clone(), reopen(&dir), stop.clone()));
    until("out of service", || live.status() == Status::Recovering).await;
    stop.cancel();
    watcher.await.expect("watcher");
    assert_eq!(live.status(), Status::Poisoned);
    let back = live.take().expect("the poisoned vault is back");
    drop(held);
    let vault = std::sync::Arc::into_inner(back).expect("last handle");
    assert!(matches!(vault.close(), Err(storage::Error::Poisoned)));

    // Requests that hold the poisoned vault and do not let go (their
    // connections wait to write to clients that read slowly): after the
    // grace, the connections opened before the failure are cut off, and
    // the vault opens again; those opened after it are not. A connection
    // that lived through an earlier recovery is cut off too.
    let dir = tmp.path().join("held");
    let live = LiveVault::from(poisoned(&dir).await);
    let before_first = live.retiring();
    let stop = CancellationToken::new();
    let grace = std::time::Duration::from_secs(2);
    let watcher = tokio::spawn(server::live::watch_with(
        live.clone(),
        reopen(&dir),
        stop.clone(),
        grace,
    ));
    // The first failure: nothing holds the vault, which opens again.
    until("open again", || live.status() == Status::Ok).await;
    assert!(!before_first.is_cancelled());
    let before_second = live.retiring();
    let holders: Vec<_> = [before_first, before_second]
        .into_iter()
        .map(|opened_before| {
            let held = live.get().expect("in service");
            tokio::spawn(async move {
                opened_before.cancelled().await;
                drop(held);
            })
        })
        .collect();
    // The second failure, of the vault opened again.
    let vault = live.get().expect("in service");
    fail::cfg("commit::before_flush", "return").expect("arm");
    let r = vault
        .append(storage::Append::record(SUBJECT, b"{}".to_vec()))
        .await;
    fail::remove("commit::before_flush");
    assert!(r.is_err(), "{r:?}");
    drop(vault);
    until("out of service", || live.status() == Status::Recovering).await;
    let opened_after = live.retiring();
    until("open again", || live.status() == Status::Ok).await;
    for h in holders {
        h.await.expect("the holder was cut off");
    }
    assert!(!opened_after.is_cancelled());
    stop.cancel();
    watcher.await.expect("watcher");
    let vault = std::sync::Arc::into_inner(live.take().expect("the vault")).expect("last handle");
    vault.close().expect("close");

    // Its master key rotated online, its secret file not yet changed: the
    // reopen refused by the file's secret opens with the new one.
    let dir = tmp.path().join("c");
    let vault = poisoned_after(&dir, async |vault| {
        let new = storage::Unlock::passphrase(b"the rotated passphrase".to_vec());
        vault.rotate_master_key(&new).await.expect("rotate");
        server::live::rotated_to(
            vault.vault_id(),
            protocol::SecretKind::Passphrase,
            b"the rotated passphrase",
        );
    })
    .await;
    let live = LiveVault::from(vault);
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch(live.clone(), reopen(&dir), stop.clone()));
    until("open again", || live.status() == Status::Ok).await;
    stop.cancel();
    watcher.await.expect("watcher");
    let vault = std::sync::Arc::into_inner(live.take().expect("the vault")).expect("last handle");
    vault.close().expect("close");
    wait_unlocked(&dir);
    // The old secret opens it no more: the new one did.
    assert!(matches!(
        storage::Vault::open(
            &dir,
            &storage::Unlock::passphrase(PASSPHRASE.to_vec()),
            storage::Options::default()
        ),
        Err(storage::Error::WrongSecret)
    ));
}

/// A stop while the vault is out of service (a failed write, then a
/// reopen that cannot succeed: here a wrong passphrase) is not a clean
/// stop, and `run` says so with an error (the process exits 1), whether
/// the stop comes before the watcher took the vault (its close reports
/// the poisoning) or while it tries to open it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_vault_is_out_of_service_is_not_clean() {
    let _alone = ALONE.lock().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let vault = std::sync::Arc::into_inner(poisoned(&dir).await).expect("one holder");
    let wrong = server::live::Reopen::new(
        dir.clone(),
        || Ok(storage::Unlock::passphrase(b"not the passphrase".to_vec())),
        storage::Options::default,
    );
    let d = server::daemon::Daemon {
        protocol: tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        http: None,
        tls: None,
        serve: server::serve::ServeConfig::default(),
        shim: server::shim::ShimConfig::default(),
        policies: None,
        reopen: Some(wrong),
    };
    let stop = async { tokio::time::sleep(std::time::Duration::from_millis(500)).await };
    let ended = server::daemon::run(vault, d, |_| Ok(()), stop).await;
    let e = ended.expect_err("not a clean stop");
    let said = e.to_string();
    assert!(
        said.contains("out of service") || said.contains("poisoned"),
        "{said}"
    );
}
