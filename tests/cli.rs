//! End-to-end tests of the command-line tools, driven as real processes
//! through their public interface: arguments, exit codes, JSON on stdout
//! and messages on stderr.
//!
//! - `vaultd init` creates a vault and prints its public key once, and a
//!   failure's cause once;
//! - `vaultd dev` serves a demo vault, stops cleanly on SIGTERM, and reopens it;
//! - `vaultd serve` takes its commit group bounds from the command line,
//!   and refuses a trusted proxy that is not an address or network;
//! - `vault-verify` exits 0 for an intact vault, 1 for an integrity failure
//!   (naming the seq and the reason), 2 when it cannot run; with
//!   `--head-file` it keeps the newest head verified and names a data dir
//!   rolled back behind it; with `--read-only` it writes nothing to the
//!   dir, a vault's killed by SIGKILL included;
//! - a closed stdout is an error with its own exit code, never a panic.

mod support;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::Run;

/// Runs one of the server's binaries with `args`, with no `FINTRUST_*`
/// variable inherited from the environment.
fn run<I, S>(bin: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    support::run_bin("fintrust-server", bin, args, &[])
}

fn vault_verify<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("vault-verify", args)
}

/// `vault-verify --data-dir DIR --public-key KEY`, then `extra`.
fn verify_dir(dir: &Path, key: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--public-key"),
        OsStr::new(key),
    ];
    args.extend(extra.iter().map(OsStr::new));
    vault_verify(args)
}

/// A temp dir with a passphrase file in it.
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            tmp.path().join("passphrase"),
            "correct horse battery staple\n",
        )
        .expect("write the passphrase file");
        Scratch { tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `vaultd init --json` into `name`; returns the printed object.
    fn init(&self, name: &str) -> Value {
        let out = self.init_run(name);
        assert_eq!(out.code, 0, "init failed: {out:?}");
        out.json()
    }

    fn init_run(&self, name: &str) -> Run {
        let dir = self.path(name);
        let pass = self.path("passphrase");
        run(
            "vaultd",
            [
                OsStr::new("init"),
                OsStr::new("--data-dir"),
                dir.as_os_str(),
                OsStr::new("--passphrase-file"),
                pass.as_os_str(),
                OsStr::new("--json"),
            ],
        )
    }
}

fn str_field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string field {name:?} in {v}"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Blocks until this process no longer holds sled's lock on the data dir:
/// sled's background threads may keep its file open for a moment after
/// the last handle is dropped, and a child opening the dir in that window
/// would fail with "locked".
fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("open sled's data file");
    f.lock().expect("wait for sled's lock");
}

#[test]
fn a_failure_names_its_cause_once() {
    let s = Scratch::new();
    std::fs::write(s.path("file"), "not a dir").expect("write");
    // A data dir under a regular file: the storage engine's I/O error.
    let out = s.init_run("file/vault");
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr.matches("Not a directory").count(), 1, "{out:?}");
    // A passphrase file that is not there: the server's file error.
    let missing = s.path("missing");
    let out = run(
        "vaultd",
        [
            OsStr::new("init"),
            OsStr::new("--data-dir"),
            s.path("v").as_os_str(),
            OsStr::new("--passphrase-file"),
            missing.as_os_str(),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr.matches("No such file").count(), 1, "{out:?}");
}

/// `--insecure-plaintext` with a client CA is refused, not served
/// without the client-certificate check the CA asked for.
#[test]
fn plaintext_with_a_client_ca_is_refused() {
    let s = Scratch::new();
    std::fs::write(s.path("ca.pem"), "").expect("write");
    let ca = s.path("ca.pem");
    let dir = s.path("v");
    let pass = s.path("passphrase");
    for args in [
        vec![
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ],
        vec![
            OsStr::new("shim"),
            OsStr::new("--vault"),
            OsStr::new("127.0.0.1:9"),
            OsStr::new("--api-key-file"),
            pass.as_os_str(),
        ],
    ] {
        let mut args = args;
        args.extend([
            OsStr::new("--insecure-plaintext"),
            OsStr::new("--tls-client-ca"),
            ca.as_os_str(),
        ]);
        let out = run("vaultd", &args);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("excludes the TLS options"), "{out:?}");
    }
}

/// A separate shim whose vault TLS files do not read says so at start
/// (exit 1), before it listens, not at each request.
#[test]
fn a_shim_with_a_missing_vault_ca_is_refused_at_start() {
    let s = Scratch::new();
    let key = s.path("gateway.key");
    std::fs::write(&key, "fvk_0000000000000000000000000000000000000000000\n").expect("key");
    let missing = s.path("no-such-ca.pem");
    let out = run(
        "vaultd",
        [
            OsStr::new("shim"),
            OsStr::new("--vault"),
            OsStr::new("127.0.0.1:9"),
            OsStr::new("--api-key-file"),
            key.as_os_str(),
            OsStr::new("--cacert"),
            missing.as_os_str(),
            OsStr::new("--http-listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--insecure-plaintext"),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("the vault's TLS"), "{out:?}");
}

/// A policies file is applied through the HTTP shim: with `--no-http`
/// it would be read and never written, so the two are refused together.
#[test]
fn a_policies_file_without_the_shim_is_refused() {
    let s = Scratch::new();
    let (dir, pass, policies) = (s.path("v"), s.path("passphrase"), s.path("p.toml"));
    let out = run(
        "vaultd",
        [
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
            OsStr::new("--no-http"),
            OsStr::new("--policies"),
            policies.as_os_str(),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--no-http"), "{out:?}");
}

#[test]
fn init_prints_one_json_object_and_refuses_a_second_init() {
    let s = Scratch::new();
    let out = s.init("v");
    assert!(is_hex(str_field(&out, "public_key"), 64), "{out}");
    assert!(is_hex(str_field(&out, "vault_id"), 32), "{out}");
    let api_key = str_field(&out, "admin_api_key");
    assert!(api_key.starts_with("fvk_"), "{out}");
    assert!(is_hex(&api_key["fvk_".len()..], 64), "{out}");

    let again = s.init_run("v");
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stdout.is_empty(), "{again:?}");
    assert!(
        again.stderr.contains("error:") && again.stderr.contains("already exists"),
        "{again:?}"
    );
    // The refused init left the vault as it was.
    let v = verify_dir(&s.path("v"), str_field(&out, "public_key"), &["--json"]);
    assert_eq!(v.code, 0, "{v:?}");
}

/// What a creation's marker holds (docs/storage.md, section 2).
const MARKER: &str = "fintrust-vault: the creation of this vault has not finished\n";

/// A vault whose creation did not finish (its `creating` marker left by
/// a crash) is refused by `vault-verify` (which could not check it, exit
/// 2) and `vaultd serve`, which say so; `vaultd init` starts it over, and
/// when that init fails too (its output lost), what the unfinished
/// creation left is removed with what it made, so that no vault without a
/// shown admin key is left.
#[test]
fn init_starts_over_a_creation_that_did_not_finish() {
    let s = Scratch::new();
    let first = s.init("v");
    let dir = s.path("v");
    wait_unlocked(&dir);
    std::fs::write(dir.join("creating"), MARKER).expect("the marker a crash leaves");
    // Nothing to verify: the check cannot run (exit 2).
    let v = verify_dir(&dir, str_field(&first, "public_key"), &["--json"]);
    assert_eq!(v.code, 2, "{v:?}");
    assert!(v.stderr.contains("did not finish"), "{v:?}");
    let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &dir, &s.path("passphrase"), None);
    let refused = support::Vaultd::spawn(cmd).expect_err("not served");
    assert!(refused.contains("did not finish"), "{refused}");

    let pass = s.path("passphrase");
    let args = [
        OsStr::new("init"),
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--passphrase-file"),
        pass.as_os_str(),
        OsStr::new("--json"),
    ];
    let lost = support::run_bin_into_closed_pipe("fintrust-server", "vaultd", args, &[]);
    assert_eq!(lost.code, 1, "{lost:?}");
    for name in ["db", "chunks", "wal", "creating"] {
        assert!(!dir.join(name).exists(), "{name} left: {lost:?}");
    }
    let again = s.init("v");
    assert_ne!(again["public_key"], first["public_key"], "a new vault");
    wait_unlocked(&dir);
    let v = verify_dir(&dir, str_field(&again, "public_key"), &["--json"]);
    assert_eq!(v.code, 0, "{v:?}");

    // A marker put back beside a vault an open has verified (its record
    // there): init refuses to start it over, and removes nothing.
    std::fs::write(dir.join("creating"), MARKER).expect("marker");
    std::fs::write(dir.join("verified"), b"a record").expect("record");
    let before = support::dir_contents(&dir);
    let refused = s.init_run("v");
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("not started over"), "{refused:?}");
    assert_eq!(support::dir_contents(&dir), before, "nothing removed");
}

/// `vaultd dev --data-dir` given a vault `vaultd init` made (it has no
/// dev passphrase) says so and what to run instead, exit 1.
#[test]
fn vaultd_dev_refuses_a_vault_it_did_not_make() {
    let s = Scratch::new();
    s.init("v");
    wait_unlocked(&s.path("v"));
    let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
    cmd.arg("dev")
        .arg("--data-dir")
        .arg(s.path("v"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    support::clean_env(&mut cmd);
    let mut child = cmd.spawn().expect("start vaultd dev");
    // Bounded, so that a dev server that starts fails the test, not hangs it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vaultd dev served a vault it did not make");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not make") && err.contains("vaultd serve"),
        "{err}"
    );
}

/// `vaultd serve` with a port in use says so before it opens the vault
/// (whose whole log it verifies first), naming the flag that chooses
/// another; `vaultd shim` before it writes its policies to the vault.
#[test]
fn a_port_in_use_is_refused_before_the_vault_is_opened() {
    let s = Scratch::new();
    s.init("v");
    wait_unlocked(&s.path("v"));
    // `vaultd serve` on `listen` and `http`: what it wrote before it
    // exited, and that it did not open the vault first.
    let refused = |listen: &str, http: &str| {
        let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(s.path("v"))
            .arg("--passphrase-file")
            .arg(s.path("passphrase"))
            .args([
                "--insecure-plaintext",
                "--listen",
                listen,
                "--http-listen",
                http,
            ]);
        support::clean_env(&mut cmd);
        let refused = support::Vaultd::spawn(cmd).expect_err("not started");
        assert!(!refused.contains("opening the vault"), "{refused}");
        refused
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("address").to_string();
    let said = refused(&port, "127.0.0.1:0");
    assert!(said.contains("choose another with --listen"), "{said}");
    let said = refused("127.0.0.1:0", &port);
    assert!(said.contains("choose another with --http-listen"), "{said}");
    // One free port given to both (another, should something else take
    // it between its release and the check).
    let said = (0..5)
        .map(|_| {
            let free = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a port")
                .to_string();
            refused(&free, &free)
        })
        .find(|said| !said.contains("choose another with --listen"))
        .expect("a port free for the first check");
    assert!(said.contains("choose another with --http-listen"), "{said}");
    let policies = s.path("policies.toml");
    std::fs::write(&policies, support::POLICIES).expect("write");
    std::fs::write(s.path("key"), "fvk_not_used_before_the_port\n").expect("write");
    let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
    cmd.arg("shim")
        .args(["--vault", "127.0.0.1:1", "--insecure-plaintext"])
        .arg("--api-key-file")
        .arg(s.path("key"))
        .arg("--policies")
        .arg(&policies)
        .args(["--http-listen", &port]);
    support::clean_env(&mut cmd);
    let refused = support::Vaultd::spawn(cmd).expect_err("not started");
    assert!(
        refused.contains("choose another with --http-listen"),
        "{refused}"
    );
    drop(taken);
}

/// `vaultd serve --metrics-key-file`: a key too short is refused at
/// start (exit 1, naming the file); with a good one, `/metrics` answers
/// 401 without it and serves the metrics with it, and `/v1/health` still
/// needs no key.
#[test]
fn serve_asks_for_the_metrics_key_it_was_given() {
    let s = Scratch::new();
    s.init("v");
    wait_unlocked(&s.path("v"));
    let short = s.path("short-key");
    std::fs::write(&short, "too-short\n").expect("write");
    let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &s.path("v"), &s.path("passphrase"), None);
    cmd.arg("--metrics-key-file").arg(&short);
    let refused = support::Vaultd::spawn(cmd).expect_err("not started");
    assert!(
        refused.contains("short-key") && refused.contains("32 to 256"),
        "{refused}"
    );
    let key = "0123456789abcdef".repeat(4);
    let file = s.path("metrics-key");
    std::fs::write(&file, format!("{key}\n")).expect("write");
    let served = serve_with(
        &s,
        "v",
        &["--metrics-key-file", file.to_str().expect("utf-8")],
    );
    let url = format!("http://{}/metrics", served.http);
    let (status, body) = support::http(ureq::get(&url), None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "unauthenticated", "{body}");
    let (status, body) = support::http(
        ureq::get(&url).set("Authorization", &format!("Bearer {key}")),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("fintrust_vault_up 1"), "{body}");
    let (status, _) = support::http(
        ureq::get(&format!("http://{}/v1/health", served.http)),
        None,
    );
    assert_eq!(status, 200);
}

#[test]
fn rotate_master_key_offline_then_only_the_new_secret_opens() {
    let s = Scratch::new();
    let init = s.init("v");
    let dir = s.path("v");
    wait_unlocked(&dir);
    let new = s.path("new-passphrase");
    std::fs::write(&new, "a new passphrase\n").expect("write the new passphrase");
    let rotate = |current: &Path, next: &Path| {
        run(
            "vaultd",
            [
                OsStr::new("rotate-master-key"),
                OsStr::new("--data-dir"),
                dir.as_os_str(),
                OsStr::new("--passphrase-file"),
                current.as_os_str(),
                OsStr::new("--new-passphrase-file"),
                next.as_os_str(),
                OsStr::new("--format"),
                OsStr::new("json"),
            ],
        )
    };
    let out = rotate(&s.path("passphrase"), &new);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json()["seq"],
        3,
        "genesis, admin, rewrap, master: {out:?}"
    );
    // The old passphrase no longer opens the vault.
    wait_unlocked(&dir);
    let again = rotate(&s.path("passphrase"), &new);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("wrong passphrase"), "{again:?}");
    wait_unlocked(&dir);
    let v = verify_dir(&dir, str_field(&init, "public_key"), &[]);
    assert_eq!(v.code, 0, "{v:?}");
    // And the new one does (rotating back to the first passphrase).
    wait_unlocked(&dir);
    let back = rotate(&new, &s.path("passphrase"));
    assert_eq!(back.code, 0, "{back:?}");
}

#[test]
fn verify_accepts_an_intact_vault() {
    let s = Scratch::new();
    let init = s.init("v");
    let dir = s.path("v");
    let key = str_field(&init, "public_key");
    let base = [
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--public-key"),
        OsStr::new(key),
    ];

    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend(extra.iter().map(OsStr::new));
        vault_verify(args)
    };

    let json = with(&["--json"]);
    assert_eq!(json.code, 0, "{json:?}");
    let report = json.json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["failure"], Value::Null, "{report}");
    assert!(
        report["entries"].as_u64().is_some_and(|n| n >= 2),
        "{report}"
    );
    assert!(
        report["groups"].as_u64().is_some_and(|g| g >= 1),
        "{report}"
    );
    assert!(report.get("warning").is_none(), "{report}");
    assert!(!json.stderr.contains("warning"), "{json:?}");

    let format = with(&["--format", "json"]);
    assert_eq!(format.code, 0, "{format:?}");
    assert_eq!(format.json(), report);

    let text = with(&[]);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(text.stdout.starts_with("OK: "), "{text:?}");

    let before = support::dir_contents(&dir);
    let read_only = with(&["--read-only", "--json"]);
    assert_eq!(read_only.code, 0, "{read_only:?}");
    assert_eq!(read_only.json(), report);
    assert_eq!(support::dir_contents(&dir), before);
}

/// A source on the command line wins over the environment's: with
/// `FINTRUST_DATA_DIR` exported, `--remote` and `--file` still work (they
/// were refused as conflicting), and the exported dir alone is verified;
/// two sources from the environment with none on the command line, or
/// two on it, are refused with exit 2.
#[test]
fn verify_takes_its_source_from_the_command_line_first() {
    let s = Scratch::new();
    let init = s.init("v");
    let dir = s.path("v");
    let dir = dir.to_str().expect("a UTF-8 path");
    let key = str_field(&init, "public_key");
    let verify = |args: &[&str], env: &[(&str, &str)]| {
        support::run_bin("fintrust-server", "vault-verify", args, env)
    };
    let from_env = verify(
        &["--public-key", key, "--json"],
        &[("FINTRUST_DATA_DIR", dir)],
    );
    assert_eq!(from_env.code, 0, "{from_env:?}");
    assert_eq!(from_env.json()["ok"], true);
    // A remote no one listens on: the run gets as far as connecting.
    let remote = verify(
        &[
            "--remote",
            "127.0.0.1:1",
            "--public-key",
            key,
            "--insecure-plaintext",
            "--api-key",
            "fvk_x",
        ],
        &[("FINTRUST_DATA_DIR", dir)],
    );
    assert_eq!(remote.code, 2, "{remote:?}");
    assert!(!remote.stderr.contains("cannot be used with"), "{remote:?}");
    assert!(remote.stderr.contains("127.0.0.1:1"), "{remote:?}");
    let both = verify(
        &["--public-key", key],
        &[
            ("FINTRUST_DATA_DIR", dir),
            ("FINTRUST_REMOTE", "127.0.0.1:1"),
        ],
    );
    assert_eq!(both.code, 2, "{both:?}");
    assert!(both.stderr.contains("both set"), "{both:?}");
    let two = verify(&["--data-dir", dir, "--remote", "127.0.0.1:1"], &[]);
    assert_eq!(two.code, 2, "{two:?}");
    assert!(two.stderr.contains("give one of"), "{two:?}");
}

#[test]
fn verify_keeps_the_newest_head_and_names_a_rollback() {
    let s = Scratch::new();
    let init = s.init("v");
    let (dir, old, kept) = (s.path("v"), s.path("old"), s.path("kept-head"));
    let key = str_field(&init, "public_key").to_string();
    let copied = Command::new("cp")
        .arg("-r")
        .args([&dir, &old])
        .status()
        .expect("cp");
    assert!(copied.success());
    let verify = |d: &Path| {
        vault_verify([
            OsStr::new("--data-dir"),
            d.as_os_str(),
            OsStr::new("--public-key"),
            OsStr::new(&key),
            OsStr::new("--head-file"),
            kept.as_os_str(),
            OsStr::new("--json"),
        ])
    };
    let read_kept = || std::fs::read_to_string(&kept).expect("the head file");

    // The first run keeps the log's head (157 bytes, in hex, on one line).
    let first = verify(&dir);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.json().get("kept_head_seq").is_none(), "{first:?}");
    let seq = &first.json()["head_seq"];
    assert!(
        first.stderr.contains(&format!("kept head: seq {seq} in ")),
        "{first:?}"
    );
    // A run with no head to check against says so.
    assert!(
        first
            .stderr
            .contains("holds no head yet: no rollback is checked"),
        "{first:?}"
    );
    let first_head = read_kept();
    assert!(
        first_head.ends_with('\n') && is_hex(first_head.trim_end(), 314),
        "{first_head:?}"
    );

    // The log grows: the kept head is in it, and the newer one is kept.
    let unlock = server::secrets::unlock_from(Some(&s.path("passphrase")), None).expect("secret");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let vault = storage::Vault::open(&dir, &unlock, storage::Options::default()).expect("open");
        for i in 0..3 {
            let record = storage::Append::record(format!("cust-{i}"), b"{\"v\":1}".to_vec());
            vault.append(record).await.expect("append");
        }
        vault.close().expect("close");
    });
    wait_unlocked(&dir);
    let grown = verify(&dir);
    assert_eq!(grown.code, 0, "{grown:?}");
    assert!(!grown.stderr.contains("warning"), "{grown:?}");
    assert_eq!(
        grown.json()["kept_head_seq"],
        first.json()["head_seq"],
        "{grown:?}"
    );
    let newest = read_kept();
    assert_ne!(newest, first_head);

    // The copy from before the appends is rolled back behind it.
    let rolled = verify(&old);
    assert_eq!(rolled.code, 1, "{rolled:?}");
    assert_eq!(
        rolled.json()["failure"]["reason"],
        "rolled_back",
        "{rolled:?}"
    );
    assert_eq!(read_kept(), newest, "a failed run keeps the head it had");

    // A head file that holds no head: the check cannot run.
    std::fs::write(&kept, "not a head\n").expect("write");
    let bad = verify(&dir);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("does not hold a head"), "{bad:?}");

    // A head file whose directory does not exist: said before the scan,
    // nothing verified or printed.
    let nowhere = s.path("no-such-dir").join("kept-head");
    let lost = vault_verify([
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--public-key"),
        OsStr::new(&key),
        OsStr::new("--head-file"),
        nowhere.as_os_str(),
    ]);
    assert_eq!(lost.code, 2, "{lost:?}");
    assert!(lost.stderr.contains("cannot keep a head in"), "{lost:?}");
    assert!(lost.stdout.is_empty(), "{lost:?}");
}

/// A write-ahead segment that is not what the vault wrote (here, bytes
/// under a segment's name in a dir stopped cleanly) is an integrity
/// failure at the seq its name holds, exit 1, with or without
/// `--read-only`; and `vaultd` refuses to serve the dir, naming the seq.
#[test]
fn verify_names_a_damaged_write_ahead_segment() {
    let s = Scratch::new();
    let dir = s.path("dev");
    let dev = vaultd_dev(&dir);
    let key = str_field(&dev, "public_key").to_string();
    let segment = dir.join("wal").join(format!("{:016x}.wal", 3));
    std::fs::create_dir_all(dir.join("wal")).expect("the segments' dir");
    std::fs::write(&segment, b"not a write-ahead segment").expect("write");

    for extra in [&["--json"][..], &["--json", "--read-only"]] {
        let read_only = extra.len() > 1;
        let out = verify_dir(&dir, &key, extra);
        assert_eq!(out.code, 1, "read-only {read_only}: {out:?}");
        let report = out.json();
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(report["failure"]["reason"], "malformed", "{report}");
        assert_eq!(report["failure"]["seq"], 3, "{report}");
    }
    let text = verify_dir(&dir, &key, &[]);
    assert_eq!(text.code, 1, "{text:?}");
    assert!(
        text.stdout
            .contains("INTEGRITY FAILURE at seq 3: malformed")
            && text.stdout.contains("0000000000000003.wal"),
        "{text:?}"
    );
    let pass = str_field(&dev, "passphrase_file");
    let served = run(
        "vaultd",
        [
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--passphrase-file"),
            OsStr::new(pass),
            OsStr::new("--insecure-plaintext"),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    assert_eq!(served.code, 1, "{served:?}");
    assert!(
        served
            .stderr
            .contains("integrity failure at seq 3: malformed"),
        "{served:?}"
    );
    assert!(segment.exists(), "the segment stays for a look");
}

#[test]
fn verify_names_a_corrupted_chunk() {
    let s = Scratch::new();
    let dev = vaultd_dev(&s.path("dev"));
    let dir = s.path("dev");
    let key = str_field(&dev, "public_key").to_string();
    // Flip a byte in the middle of the demo records' chunk, leaving its
    // CRC stale: storage corruption.
    let seq = {
        let raw = storage::RawStore::open(&dir).expect("open the raw trees");
        let (k, v) = raw
            .log
            .iter()
            .nth(1)
            .expect("a second chunk")
            .expect("read the log");
        let mut v = v.to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0x20;
        raw.log.insert(&k, v).expect("write the log");
        raw.flush().expect("flush");
        u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"))
    };
    wait_unlocked(&dir);

    let out = verify_dir(&dir, &key, &["--json"]);
    assert_eq!(out.code, 1, "{out:?}");
    let report = out.json();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["failure"]["reason"], "crc_mismatch", "{report}");
    assert_eq!(report["failure"]["seq"].as_u64(), Some(seq), "{report}");

    let text = verify_dir(&dir, &key, &[]);
    assert_eq!(text.code, 1, "{text:?}");
    assert!(
        text.stdout
            .contains(&format!("INTEGRITY FAILURE at seq {seq}: crc_mismatch")),
        "{text:?}"
    );

    let read_only = verify_dir(&dir, &key, &["--read-only", "--json"]);
    assert_eq!(read_only.code, 1, "{read_only:?}");
    assert_eq!(read_only.json(), report);
}

#[test]
fn verify_with_another_vaults_key_is_an_integrity_failure() {
    let s = Scratch::new();
    s.init("a");
    let b = s.init("b");
    let out = verify_dir(&s.path("a"), str_field(&b, "public_key"), &["--json"]);
    assert_eq!(out.code, 1, "{out:?}");
    let reason = out.json()["failure"]["reason"].clone();
    assert!(
        reason == "bad_signature" || reason == "bad_genesis",
        "{out:?}"
    );
}

/// A closed stdout (`… | head -0`) is a local error named on stderr,
/// never a panic: `vault-verify` exits 2 for an intact vault and keeps
/// exit 1 for one that is not; `vaultd init`, `vaultd dev` and
/// `vault-admin` exit 1.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let s = Scratch::new();
    let a = s.init("a");
    let b = s.init("b");
    let closed = |bin: &str, args: &[&OsStr]| {
        let r = support::run_bin_into_closed_pipe("fintrust-server", bin, args, &[]);
        // EPIPE, named with the stream it broke.
        assert!(r.stderr.contains("stdout: "), "{bin}: {r:?}");
        assert!(r.stderr.contains("(os error 32)"), "{bin}: {r:?}");
        assert!(!r.stderr.contains("panicked"), "{bin}: {r:?}");
        r
    };
    let dir = s.path("a");
    let verify = |key: &str, format: &str| {
        closed(
            "vault-verify",
            &[
                OsStr::new("--data-dir"),
                dir.as_os_str(),
                OsStr::new("--public-key"),
                OsStr::new(key),
                OsStr::new("--format"),
                OsStr::new(format),
            ],
        )
        .code
    };
    for format in ["json", "text"] {
        assert_eq!(verify(str_field(&a, "public_key"), format), 2, "{format}");
        assert_eq!(verify(str_field(&b, "public_key"), format), 1, "{format}");
    }
    // stderr closed too (`2>&1 | head -0`): the diagnostics are lost, the
    // exit code is not.
    for (key, code) in [(&a, 2), (&b, 1)] {
        let args = [
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--public-key"),
            OsStr::new(str_field(key, "public_key")),
        ];
        let got = support::exit_code_into_closed_pipes("fintrust-server", "vault-verify", args);
        assert_eq!(got, code);
    }

    let pass = s.path("passphrase");
    let c = s.path("c");
    let init = closed(
        "vaultd",
        &[
            OsStr::new("init"),
            OsStr::new("--data-dir"),
            c.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ],
    );
    assert_eq!(init.code, 1, "{init:?}");
    // The admin key was never shown: the vault is gone with it, so the
    // same command works again. A dir that was there before stays, with
    // what it held.
    assert!(!c.exists(), "{init:?}");
    s.init("c");
    let d = s.path("d");
    std::fs::create_dir(&d).expect("mkdir");
    std::fs::write(d.join("README"), "kept").expect("write");
    let init = closed(
        "vaultd",
        &[
            OsStr::new("init"),
            OsStr::new("--data-dir"),
            d.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
            OsStr::new("--json"),
        ],
    );
    assert_eq!(init.code, 1, "{init:?}");
    let left: Vec<_> = std::fs::read_dir(&d)
        .expect("the dir stays")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, ["README"], "{init:?}");
    s.init("d");

    let export = s.path("a.export");
    let admin = closed(
        "vault-admin",
        &[
            OsStr::new("export"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--out"),
            export.as_os_str(),
        ],
    );
    assert_eq!(admin.code, 1, "{admin:?}");

    // The API keys of `vaultd dev` go to stdout only: with nowhere to
    // show them, it stops cleanly rather than serve.
    let dev = s.path("dev");
    let run = closed(
        "vaultd",
        &[
            OsStr::new("dev"),
            OsStr::new("--data-dir"),
            dev.as_os_str(),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--http-listen"),
            OsStr::new("127.0.0.1:0"),
        ],
    );
    assert_eq!(run.code, 1, "{run:?}");
    wait_unlocked(&dev);
    let again = vaultd_dev(&dev);
    assert!(verified_entries(&dev, str_field(&again, "public_key")) > 5);

    // A master key rotation is durable before its output is lost: it
    // says so, in either format.
    let new_pass = s.path("new-passphrase");
    std::fs::write(&new_pass, "the new passphrase of d\n").expect("write");
    let d = s.path("d");
    for (format, from, to) in [("text", &pass, &new_pass), ("json", &new_pass, &pass)] {
        let rotated = closed(
            "vaultd",
            &[
                OsStr::new("rotate-master-key"),
                OsStr::new("--data-dir"),
                d.as_os_str(),
                OsStr::new("--passphrase-file"),
                from.as_os_str(),
                OsStr::new("--new-passphrase-file"),
                to.as_os_str(),
                OsStr::new("--format"),
                OsStr::new(format),
            ],
        );
        assert_eq!(rotated.code, 1, "{format}: {rotated:?}");
        assert!(
            rotated.stderr.contains("the master key was rotated")
                && rotated.stderr.contains("new secret only"),
            "{format}: {rotated:?}"
        );
        wait_unlocked(&d);
    }
}

#[test]
fn verify_that_cannot_run_exits_2() {
    let s = Scratch::new();
    let init = s.init("v");
    let dir = s.path("v");
    let key = str_field(&init, "public_key");

    for bad in ["zz", "abcd", &key[..62], "not hex at all"] {
        let out = verify_dir(&dir, bad, &["--json"]);
        assert_eq!(out.code, 2, "key {bad:?}: {out:?}");
        assert!(out.stdout.is_empty(), "key {bad:?}: {out:?}");
        assert!(out.stderr.contains("--public-key"), "key {bad:?}: {out:?}");
    }

    let missing = s.path("no-such-vault");
    let out = verify_dir(&missing, key, &["--json"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains("error:"), "{out:?}");
    assert!(!missing.exists(), "verify created the data dir");
    let out = vault_verify([
        OsStr::new("--data-dir"),
        missing.as_os_str(),
        OsStr::new("--read-only"),
    ]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(!missing.exists(), "a read-only verify created the data dir");
    // --read-only is for --data-dir only.
    let out = vault_verify(["--remote", "127.0.0.1:9", "--read-only"]);
    assert_eq!(out.code, 2, "{out:?}");

    let out = vault_verify(["--format", "yaml"]);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn verify_without_a_pinned_key_warns() {
    let s = Scratch::new();
    s.init("v");
    let out = vault_verify([
        OsStr::new("--data-dir"),
        s.path("v").as_os_str(),
        OsStr::new("--json"),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("warning:"), "{out:?}");
    let report = out.json();
    assert_eq!(report["ok"], true, "{report}");
    let warning = str_field(&report, "warning");
    assert!(warning.contains("--public-key"), "{report}");
}

/// `vaultd dev` in plaintext listens on loopback only: another address
/// for either port is refused before anything is created.
#[test]
fn dev_refuses_plaintext_off_loopback() {
    let s = Scratch::new();
    let dir = s.path("dev");
    let dir_arg = dir.to_str().expect("a UTF-8 path");
    for (listen, http) in [("0.0.0.0:0", "127.0.0.1:0"), ("127.0.0.1:0", "0.0.0.0:0")] {
        let out = run(
            "vaultd",
            [
                "dev",
                "--listen",
                listen,
                "--http-listen",
                http,
                "--data-dir",
                dir_arg,
            ],
        );
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("loopback only"), "{out:?}");
        assert!(!dir.exists(), "{out:?}");
    }
}

/// Runs `vaultd dev` on `dir` until it is ready, stops it cleanly, and
/// returns the object it printed.
fn vaultd_dev(dir: &Path) -> Value {
    let dev = support::DevServer::start(dir);
    let info = dev.info.clone();
    let status = dev.stop();
    assert!(
        status.success(),
        "vaultd dev did not shut down cleanly: {status}"
    );
    wait_unlocked(dir);
    info
}

fn verified_entries(dir: &Path, key: &str) -> u64 {
    let out = verify_dir(dir, key, &["--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    out.json()["entries"].as_u64().expect("entries")
}

#[test]
fn dev_creates_serves_and_reopens_its_vault() {
    let s = Scratch::new();
    let dir = s.path("dev");
    let first = vaultd_dev(&dir);
    for name in [
        "vault_addr",
        "http_addr",
        "admin_api_key",
        "partner_api_key",
        "writer_api_key",
        "demo_subject_id",
        "demo_purpose",
    ] {
        assert!(!str_field(&first, name).is_empty(), "{name}: {first}");
    }
    assert!(
        Path::new(str_field(&first, "passphrase_file")).exists(),
        "{first}"
    );
    let key = str_field(&first, "public_key").to_string();
    let entries = verified_entries(&dir, &key);
    assert!(entries > 5, "demo data is in the log");

    // A second run reopens the same vault with the dev passphrase and
    // appends to the same chain.
    let second = vaultd_dev(&dir);
    assert_eq!(str_field(&second, "public_key"), key);
    assert!(verified_entries(&dir, &key) > entries);
    // Its keys are new, and the first run's are revoked: each run's keys
    // are good until the next.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pass = PathBuf::from(str_field(&second, "passphrase_file"));
    let vault = rt
        .block_on(async {
            let unlock = server::secrets::unlock_from(Some(&pass), None)?;
            Ok::<_, server::Error>(storage::Vault::open(&dir, &unlock, Default::default())?)
        })
        .expect("open");
    for name in [
        "admin_api_key",
        "writer_api_key",
        "partner_api_key",
        "auditor_api_key",
    ] {
        let (old, new) = (str_field(&first, name), str_field(&second, name));
        assert_ne!(old, new, "{name}");
        assert!(
            server::serve::authenticate(&vault, old).is_none(),
            "{name} of the first run still authenticates"
        );
        assert!(server::serve::authenticate(&vault, new).is_some(), "{name}");
    }
    vault.close().expect("close");
}

/// A port in use stops `vaultd dev` before it makes anything: no data
/// dir is left behind.
#[test]
fn dev_binds_before_it_creates() {
    let s = Scratch::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = s.path("dev");
    let dir_arg = dir.to_str().expect("a UTF-8 path");
    let out = run(
        "vaultd",
        [
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            &addr,
            "--data-dir",
            dir_arg,
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains(&addr), "{out:?}");
    assert!(!dir.exists(), "{out:?}");
}

/// What a `vaultd dev` cut short left is taken up again: a passphrase
/// written before its vault was made (made again if empty), and a dev CA
/// file left empty.
#[test]
fn dev_takes_up_what_an_interrupted_run_left() {
    let s = Scratch::new();
    let dir = s.path("dev");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // Left empty (a full disk): made again.
    std::fs::write(dir.join("dev-passphrase"), "").expect("write");
    let first = vaultd_dev(&dir);
    assert!(verified_entries(&dir, str_field(&first, "public_key")) > 5);
    // Left whole: taken up.
    let dir = s.path("dev2");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("dev-passphrase"), "an interrupted run's\n").expect("write");
    let first = vaultd_dev(&dir);
    let key = str_field(&first, "public_key").to_string();
    assert!(verified_entries(&dir, &key) > 5);

    let tls = |dir: &Path| {
        let dev = support::DevServer::start_with(dir, &["--tls"]);
        let ca = std::fs::read_to_string(dir.join("dev-ca.pem")).expect("the dev CA");
        assert!(dev.stop().success());
        wait_unlocked(dir);
        ca
    };
    let ca = tls(&dir);
    assert_eq!(tls(&dir), ca, "kept while it loads");
    std::fs::write(dir.join("dev-ca.pem"), "").expect("empty the CA file");
    let again = tls(&dir);
    assert!(again.contains("-----END CERTIFICATE-----"), "{again}");
    assert_ne!(again, ca, "made again");
}

/// Starts `vaultd serve` in plaintext on ports the OS chooses (killed
/// with SIGKILL when dropped).
fn serve(s: &Scratch, name: &str) -> support::Vaultd {
    serve_with(s, name, &[])
}

/// [`serve`], with `args` added to the command line.
fn serve_with(s: &Scratch, name: &str, args: &[&str]) -> support::Vaultd {
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &s.path(name), &s.path("passphrase"), None);
    cmd.args(args);
    support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// A SIGHUP while `vaultd serve` opens its vault (a certificate
/// renewal's reload sent during a restart) does not end it: SIGHUP is
/// taken from before the open on. The open is held a second by a
/// failpoint, as a large vault's would take.
#[test]
fn a_hangup_during_the_open_does_not_end_serve() {
    use std::io::BufRead;
    let s = Scratch::new();
    s.init("v");
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &s.path("v"), &s.path("passphrase"), None);
    cmd.env("FINTRUST_FAILPOINTS", "serve::open=sleep(1000)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("start vaultd");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut log = Vec::new();
    let mut hung_up = false;
    let ready = loop {
        let Some(Ok(line)) = lines.next() else {
            break false;
        };
        if line.contains("opening the vault") && !hung_up {
            let pid = child.id().to_string();
            let status = Command::new("kill").args(["-HUP", &pid]).status();
            assert!(status.is_ok_and(|s| s.success()), "kill -HUP");
            hung_up = true;
        }
        if line.contains("vaultd ready") {
            break true;
        }
        log.push(line);
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(hung_up, "no open logged: {log:#?}");
    assert!(
        ready,
        "vaultd ended before it was ready ({status}): {log:#?}"
    );
    assert!(status.success(), "{status}");
}

/// A second SIGTERM while `vaultd serve` finishes its requests in flight
/// ends it at once (exit 1). The request here is an append held after it
/// is durable (a failpoint), which the first stop alone waits for.
#[test]
fn a_second_signal_ends_a_shutdown_at_once() {
    use futures_util::SinkExt;
    let s = Scratch::new();
    s.init("v");
    let dir = s.path("v");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let writer = offline_credentials(&rt, &dir, &[("writer", "w")]).remove(0);
    let mut cmd = Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &dir, &s.path("passphrase"), None);
    cmd.env("FINTRUST_FAILPOINTS", "reply::append=sleep(60000)");
    let mut vaultd = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let addr = vaultd.protocol.clone();
    let entries = || match rt.block_on(ask(&addr, &writer, protocol::Message::Health)) {
        protocol::Message::HealthInfo { entries, .. } => entries,
        other => panic!("{other:?}"),
    };
    let before = entries();
    let _held = rt.block_on(async {
        let (mut conn, _) = hello(&addr, &writer).await;
        let append = protocol::Message::Append {
            subject: "cust-1".into(),
            fields: vec![("n".into(), "1".into())],
        };
        conn.send(append.to_frame(2, 0).expect("frame"))
            .await
            .expect("send");
        conn
    });
    // Durable once the log grows: from then on held in the failpoint.
    while entries() == before {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let term = || {
        let sent = Command::new("kill")
            .args(["-TERM", &vaultd.pid().to_string()])
            .status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM");
    };
    term();
    // The shutdown has begun once vaultd says so (its main thread, which
    // the worker the failpoint blocks does not hold up).
    loop {
        match vaultd.log.recv() {
            Ok(line) if line.contains("shutting down") => break,
            Ok(_) => {}
            Err(_) => panic!("vaultd's log ended before its shutdown began"),
        }
    }
    term();
    let status = loop {
        if let Some(status) = vaultd.exited() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{status}");
}

/// Credentials of `(role, name)` made in the vault in `dir` while it
/// is not served: their API keys, in order.
fn offline_credentials(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    wanted: &[(&str, &str)],
) -> Vec<String> {
    let keys = rt.block_on(async {
        let unlock = storage::Unlock::passphrase(b"correct horse battery staple".to_vec());
        let vault = storage::Vault::open(dir, &unlock, storage::Options::default()).expect("open");
        let mut keys = Vec::new();
        for (role, name) in wanted {
            let (_, key) = vault.create_credential(role, name).await.expect(role);
            keys.push(key.to_string());
        }
        vault.close().expect("close");
        keys
    });
    wait_unlocked(dir);
    keys
}

type Conn = tokio_util::codec::Framed<tokio::net::TcpStream, protocol::FrameCodec>;

/// A fresh connection that sent `Hello` with `key`, and the answer to it.
async fn hello(addr: &str, key: &str) -> (Conn, protocol::Message) {
    use futures_util::{SinkExt, StreamExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut conn = tokio_util::codec::Framed::new(tcp, protocol::FrameCodec::new());
    let hello = protocol::Message::Hello {
        api_key: key.into(),
        client: "cli test".into(),
    };
    conn.send(hello.to_frame(1, 0).expect("frame"))
        .await
        .expect("send");
    let reply = conn.next().await.expect("a reply").expect("a frame");
    (
        conn,
        protocol::Message::from_frame(&reply).expect("decodes"),
    )
}

/// One request on a fresh authenticated connection.
async fn ask(addr: &str, key: &str, m: protocol::Message) -> protocol::Message {
    use futures_util::{SinkExt, StreamExt};
    let (mut conn, _) = hello(addr, key).await;
    conn.send(m.to_frame(2, 0).expect("frame"))
        .await
        .expect("send");
    let f = conn.next().await.expect("a reply").expect("a frame");
    protocol::Message::from_frame(&f).expect("decodes")
}

#[test]
fn a_token_redeemed_before_kill_9_stays_spent() {
    let s = Scratch::new();
    let init = s.init("v");
    let dir = s.path("v");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Credentials and a record, written offline before serving.
    let (gateway, partner) = rt.block_on(async {
        let unlock = storage::Unlock::passphrase(b"correct horse battery staple".to_vec());
        let vault = storage::Vault::open(&dir, &unlock, storage::Options::default()).expect("open");
        let (_, gw) = vault
            .create_credential("gateway", "gw")
            .await
            .expect("gateway");
        let (_, p) = vault
            .create_credential("partner", "lender-1")
            .await
            .expect("partner");
        vault
            .append(storage::Append::record(
                "cust-1",
                br#"{"name":"Ada","email":"ada@example.com"}"#.to_vec(),
            ))
            .await
            .expect("record");
        vault.close().expect("close");
        (gw.to_string(), p.to_string())
    });
    wait_unlocked(&dir);
    let server = serve(&s, "v");
    let mint = protocol::Message::Mint {
        partner_id: "lender-1".into(),
        subject: "cust-1".into(),
        purpose: "kyc".into(),
        fields: vec![("email".into(), protocol::MaskOp::Partial)],
        ttl_secs: 0,
    };
    let token = match rt.block_on(ask(&server.protocol, &gateway, mint)) {
        protocol::Message::Minted { token, .. } => token,
        other => panic!("{other:?}"),
    };
    let redeem = protocol::Message::Redeem {
        token: token.clone(),
    };
    let data = rt.block_on(ask(&server.protocol, &partner, redeem.clone()));
    assert!(matches!(data, protocol::Message::Data { .. }), "{data:?}");
    drop(server); // SIGKILL
    wait_unlocked(&dir);
    // The killed vault's dir as a snapshot would hold it: verified without
    // a write, its write-ahead segments left for the next open.
    let before = support::dir_contents(&dir);
    assert!(
        before.iter().any(|(p, _)| p.starts_with("wal")),
        "no write-ahead segment after kill -9"
    );
    let out = verify_dir(
        &dir,
        str_field(&init, "public_key"),
        &["--read-only", "--json"],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["ok"], true, "{out:?}");
    assert_eq!(
        support::dir_contents(&dir),
        before,
        "a read-only verify wrote to the dir"
    );
    let server = serve(&s, "v");
    let again = rt.block_on(ask(&server.protocol, &partner, redeem));
    assert!(
        matches!(
            again,
            protocol::Message::Error {
                code: protocol::ErrorCode::TokenSpent,
                ..
            }
        ),
        "{again:?}"
    );
    drop(server);
    wait_unlocked(&dir);
    let out = verify_dir(&dir, str_field(&init, "public_key"), &[]);
    assert_eq!(out.code, 0, "{out:?}");
}

/// `vaultd serve --max-connections 1`: with one connection served on
/// each port, the next client with a valid key waits for a slot within
/// its first 10 s, then is told so (`unavailable` on the protocol port,
/// 503 `busy` on HTTP) and closed; once the first leaves, its slot is
/// taken again.
/// `vaultd serve` without TLS options is refused unless plaintext is asked
/// for by name, and plaintext with TLS options is refused too.
#[test]
fn serve_refuses_plaintext_it_was_not_asked_for() {
    let s = Scratch::new();
    s.init("v");
    let (dir, pass) = (s.path("v"), s.path("passphrase"));
    let serve = |extra: &[&str]| {
        let mut args = vec![
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        run("vaultd", args)
    };
    let out = serve(&[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("--tls-cert") && out.stderr.contains("--insecure-plaintext"),
        "{out:?}"
    );
    let out = serve(&[
        "--insecure-plaintext",
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("excludes"), "{out:?}");
}

/// A `--policies` file is checked against `--max-token-ttl-secs`, as a
/// policy set over HTTP is: a policy whose tokens would live longer than
/// the ceiling is refused before the vault is opened.
#[test]
fn a_policies_file_is_held_to_the_token_lifetime_ceiling() {
    let s = Scratch::new();
    s.init("v");
    let (dir, pass) = (s.path("v"), s.path("passphrase"));
    let policies = s.path("policies.toml");
    std::fs::write(
        &policies,
        "[partners.p-1]\nmax_token_ttl_secs = 120\n\n[partners.p-1.purposes.credit_check.fields]\nname = \"partial\"\n",
    )
    .expect("write policies");
    let out = run(
        "vaultd",
        [
            OsStr::new("serve"),
            OsStr::new("--data-dir"),
            dir.as_os_str(),
            OsStr::new("--passphrase-file"),
            pass.as_os_str(),
            OsStr::new("--insecure-plaintext"),
            OsStr::new("--max-token-ttl-secs"),
            OsStr::new("60"),
            OsStr::new("--policies"),
            policies.as_os_str(),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("policies.toml") && out.stderr.contains("between 1 and 60"),
        "{out:?}"
    );
}

/// `vaultd serve --max-token-ttl-secs` sets the longest token: a mint
/// asking for more is refused as invalid, and one asking for the default
/// gets the maximum where it is below the default's 300 s.
#[test]
fn serve_takes_its_token_lifetime_from_the_command_line() {
    let s = Scratch::new();
    s.init("v");
    let dir = s.path("v");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let keys = offline_credentials(&rt, &dir, &[("gateway", "gw")]);
    let server = serve_with(&s, "v", &["--max-token-ttl-secs", "60"]);
    rt.block_on(async {
        let gateway = client::Client::connect(client::ClientConfig {
            addr: server.protocol.clone(),
            tls: client::Tls::Plaintext,
            api_key: client::Zeroizing::new(keys[0].clone()),
            ..client::ClientConfig::default()
        })
        .await
        .expect("connect");
        let fields = vec![("name".to_string(), protocol::MaskOp::Partial)];
        let mint = |ttl: u32| gateway.mint("p-1", "cust-1", "credit_check", fields.clone(), ttl);
        match mint(61).await {
            Err(client::ClientError::Server {
                code: protocol::ErrorCode::Invalid,
                message,
            }) => assert!(message.contains("60"), "{message}"),
            other => panic!("{other:?}"),
        }
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_millis() as u64
        };
        let asked = now_ms();
        let (_, expires_at_ms) = mint(0).await.expect("the default, cut to 60 s");
        let answered = now_ms();
        // The server's clock read between the two: 60 s after it, not 300.
        assert!(
            expires_at_ms >= asked + 60_000 && expires_at_ms <= answered + 60_000,
            "expires {} ms after the request",
            expires_at_ms.saturating_sub(asked)
        );
    });
    let status = server.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn serve_takes_its_connection_limit_from_the_command_line() {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Scratch::new();
    s.init("v");
    let dir = s.path("v");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let keys = offline_credentials(&rt, &dir, &[("writer", "svc"), ("admin", "ops")]);
    let (writer, admin) = (&keys[0], &keys[1]);
    let server = serve_with(&s, "v", &["--max-connections", "1"]);
    async fn http(addr: &str, raw: &str) -> tokio::net::TcpStream {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(raw.as_bytes()).await.expect("write");
        tcp
    }
    let (port, http_port) = (server.protocol.as_str(), server.http.as_str());
    rt.block_on(async {
        let (first, reply) = hello(port, writer).await;
        assert!(
            matches!(reply, protocol::Message::HelloOk { .. }),
            "{reply:?}"
        );
        // HTTP: a request answered (the connection holds its slot), then
        // one whose body is still coming (so that it is not closed as
        // idle).
        let raw = format!(
            "GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n\
             PUT /v1/policies/acme HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        );
        let mut holder = http(http_port, &raw).await;
        let mut head = [0u8; 12];
        holder.read_exact(&mut head).await.expect("read");
        assert_eq!(&head, b"HTTP/1.1 200");
        // Both refusals wait out the same 10 s.
        let protocol_refused = async {
            let (mut second, reply) = hello(port, writer).await;
            let refused = matches!(
                &reply,
                protocol::Message::Error {
                    code: protocol::ErrorCode::Unavailable,
                    ..
                }
            );
            assert!(refused, "{reply:?}");
            assert!(second.next().await.is_none(), "closed after it");
        };
        let http_refused = async {
            let mut second = http(http_port, "GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n").await;
            let mut answer = String::new();
            second.read_to_string(&mut answer).await.expect("read");
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(answer.contains("\"error\":\"busy\""), "{answer}");
        };
        let guard = std::time::Duration::from_secs(120);
        tokio::time::timeout(guard, async {
            tokio::join!(protocol_refused, http_refused)
        })
        .await
        .expect("both refused once their window had passed");
        drop(first);
        drop(holder);
        let (_third, reply) = hello(port, writer).await;
        assert!(
            matches!(reply, protocol::Message::HelloOk { .. }),
            "{reply:?}"
        );
    });
    drop(server);
}

#[test]
fn serve_takes_its_commit_group_bounds_from_the_command_line() {
    // Values out of range are refused as usage errors: local errors
    // (exit 1), as HashiCorp Vault's CLI has them; 2 would say a server
    // refused.
    for (flag, value) in [
        ("--max-group-entries", "0"),
        ("--max-group-entries", "131073"),
        ("--max-group-kib", "0"),
        ("--trusted-proxy", "proxy.internal"),
        ("--trusted-proxy", "10.0.0.0/33"),
        ("--trusted-proxy", "10.0.0.1,nope"),
        ("--proxy-protocol-from", "nope"),
        ("--forwarded-header", "x-real-ip"),
        ("--max-connections", "0"),
        ("--max-connections", "many"),
    ] {
        let out = run(
            "vaultd",
            [
                "serve",
                "--data-dir",
                "/nonexistent",
                "--passphrase-file",
                "/nonexistent",
                flag,
                value,
            ],
        );
        assert_eq!(out.code, 1, "{flag} {value}: {out:?}");
        assert!(out.stderr.contains(flag), "{flag} {value}: {out:?}");
        if flag == "--trusted-proxy" || flag == "--proxy-protocol-from" {
            assert!(
                out.stderr.contains("not an address or CIDR network"),
                "{value}: {out:?}"
            );
        }
    }

    let s = Scratch::new();
    s.init("v");
    let dir = s.path("v");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let writer = offline_credentials(&rt, &dir, &[("writer", "svc")]).remove(0);
    let server = serve_with(&s, "v", &["--max-group-entries", "1"]);
    // 200 appends pipelined on one connection: with groups of one entry,
    // each has a signed head of its own (with the default bound, most
    // share one with others).
    let heads = rt.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        let tcp = tokio::net::TcpStream::connect(&server.protocol)
            .await
            .expect("connect");
        let mut conn = tokio_util::codec::Framed::new(tcp, protocol::FrameCodec::new());
        let hello = protocol::Message::Hello {
            api_key: writer,
            client: "cli test".into(),
        };
        conn.feed(hello.to_frame(1, 0).expect("frame"))
            .await
            .expect("send");
        for id in 2..202 {
            let append = protocol::Message::Append {
                subject: "cust-1".into(),
                fields: vec![("n".into(), id.to_string())],
            };
            conn.feed(append.to_frame(id, 0).expect("frame"))
                .await
                .expect("send");
        }
        SinkExt::<protocol::Frame>::flush(&mut conn)
            .await
            .expect("flush");
        let mut heads = std::collections::BTreeSet::new();
        for _ in 0..201 {
            let f = conn.next().await.expect("a reply").expect("a frame");
            match protocol::Message::from_frame(&f).expect("decodes") {
                protocol::Message::HelloOk { .. } => {}
                protocol::Message::Receipt { receipt } => {
                    let r = storage::Receipt::decode(&receipt).expect("receipt");
                    heads.insert(r.head.last_seq);
                }
                other => panic!("{other:?}"),
            }
        }
        heads
    });
    assert_eq!(heads.len(), 200, "{heads:?}");
}
