//! Helpers shared by the end-to-end tests.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{Client, ClientConfig, Tls, Zeroizing};
use server::serve::{run, ServeConfig};
use server::tls::{ServerTls, TlsFiles};
use storage::{Options, Unlock, Vault};

/// The path of binary `bin` of workspace package `package`, built first.
///
/// The binaries belong to other packages, so `CARGO_BIN_EXE_*` does not
/// name them; they sit beside this test's own profile dir
/// (`target/debug/deps/<test>-…` → `target/debug`). They are built once
/// per test run, which cargo makes a no-op when they are fresh, so that a
/// stale binary is never tested.
///
/// The build names what `cargo test --workspace` builds (every package,
/// its tests, the server's `failpoints` feature that the root package's
/// tests turn on), so that both resolve the same features of every
/// dependency and the binaries reuse the test build's compiled crates.
/// `cargo build -p <package> --bins` alone leaves the dev-dependencies
/// out, which changes the features of tokio, serde and about forty other
/// crates, so that all of them are compiled a second time: minutes of a
/// CI run. A failpoint
/// is armed only through `FINTRUST_FAILPOINTS` (the crash harness), and
/// an unarmed failpoint does nothing.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*built {
        let target = profile.parent().expect("the profile dir has a parent");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "--workspace", "--tests", "--bins"])
            .args(["--features", "fintrust-server/failpoints"])
            .arg("--target-dir")
            .arg(target);
        // `cargo test` runs this process with the variables of the crate
        // it compiled (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …). ring's
        // build script reruns when `CARGO_MANIFEST_DIR` changes, so a
        // build that inherited them would compile ring and every crate
        // above it (rustls, the client, the server, every test) again,
        // and the next `cargo` run from a shell once more.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo_for_a_crate) {
                cargo.env_remove(name);
            }
        }
        match profile.file_name().and_then(OsStr::to_str) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(other) => {
                cargo.args(["--profile", other]);
            }
            None => panic!("unexpected profile dir {}", profile.display()),
        }
        let status = cargo.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the workspace's binaries failed"
        );
        *built = true;
    }
    let path = profile.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{package} built no binary {bin}");
    path
}

/// The variables cargo sets for a crate it compiles, and for the test
/// or binary it runs: the ones a shell running `cargo` does not have.
fn set_by_cargo_for_a_crate(name: &str) -> bool {
    matches!(
        name,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_MANIFEST_LINKS"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "CARGO_TARGET_TMPDIR"
            | "CARGO_RUSTC_CURRENT_DIR"
            | "OUT_DIR"
    ) || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}

/// A running `vaultd dev` on ports the OS chose, stopped with SIGTERM
/// (a clean shutdown) by [`DevServer::stop`], or SIGKILL when dropped.
pub struct DevServer {
    child: Option<std::process::Child>,
    /// The JSON object `vaultd dev --json` printed on its first line.
    pub info: serde_json::Value,
}

#[allow(dead_code)] // each test binary uses part of it
impl DevServer {
    /// Starts `vaultd dev --json` with its data under `dir`.
    pub fn start(dir: &Path) -> DevServer {
        Self::start_with(dir, &[])
    }

    /// Starts `vaultd dev --json` with its data under `dir` and `extra`
    /// arguments.
    pub fn start_with(dir: &Path, extra: &[&str]) -> DevServer {
        Self::spawn(dir, extra, None)
    }

    /// Like [`DevServer::start_with`], with its log at debug level written
    /// to `log`.
    pub fn start_logged(dir: &Path, extra: &[&str], log: &Path) -> DevServer {
        Self::spawn(dir, extra, Some(log))
    }

    fn spawn(dir: &Path, extra: &[&str], log: Option<&Path>) -> DevServer {
        use std::io::BufRead;
        let stderr = match log {
            Some(path) => std::process::Stdio::from(std::fs::File::create(path).expect("log file")),
            None => std::process::Stdio::null(),
        };
        let mut child = Command::new(binary("fintrust-server", "vaultd"))
            .arg("dev")
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--json",
            ])
            .args(extra)
            .env("FINTRUST_LOG", if log.is_some() { "debug" } else { "info" })
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start vaultd dev");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = match lines.next() {
            Some(Ok(l)) => l,
            other => {
                let _ = child.kill();
                panic!("vaultd dev printed no first line: {other:?}");
            }
        };
        let info = serde_json::from_str(&first).expect("the first line is one JSON object");
        std::thread::spawn(move || for _ in lines {});
        DevServer {
            child: Some(child),
            info,
        }
    }

    /// The process id of the running `vaultd dev`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// A string member of the printed object.
    pub fn get(&self, name: &str) -> String {
        self.info[name]
            .as_str()
            .unwrap_or_else(|| panic!("no string {name:?} in {}", self.info))
            .to_string()
    }

    /// `http://` + the shim's address.
    pub fn http(&self) -> String {
        format!("http://{}", self.get("http_addr"))
    }

    /// SIGTERM, then waits: the exit status of a clean shutdown.
    pub fn stop(mut self) -> std::process::ExitStatus {
        terminate(self.child.take().expect("running"))
    }
}

/// SIGTERM (a clean shutdown), then waits: the exit status.
fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
    child.wait().expect("wait for vaultd")
}

/// Partner policies of the tests that run `vaultd serve --policies`:
/// `lender-1` may see `name` and a partial `email` for `kyc`, at a rate
/// no test reaches.
#[allow(dead_code)] // each test binary uses part of it
pub const POLICIES: &str = r#"
[partners.lender-1]
max_token_ttl_secs = 900
rate_limit_per_minute = 1000000

[partners.lender-1.purposes.kyc.fields]
name = "reveal"
email = "partial"
"#;

/// Adds to `cmd` (the `vaultd` binary, or a wrapper that execs it with
/// these arguments) the arguments of a plaintext `vaultd serve` of
/// `data_dir` on ports the OS chooses, unlocked by `passphrase_file`,
/// with `policies` loaded at start; no `FINTRUST_` variable of the test's
/// environment reaches it, and it logs at info level (its ready line).
#[allow(dead_code)] // each test binary uses part of it
pub fn serve_args(
    cmd: &mut Command,
    data_dir: &Path,
    passphrase_file: &Path,
    policies: Option<&Path>,
) {
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--passphrase-file")
        .arg(passphrase_file);
    if let Some(p) = policies {
        cmd.arg("--policies").arg(p);
    }
    cmd.args([
        "--insecure-plaintext",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    clean_env(cmd);
}

/// Adds to `cmd` (the `vaultd` binary) the arguments of a `vaultd serve`
/// over TLS, with `cert` and `key`, of the data dir a `vaultd dev` made
/// (unlocked by its dev passphrase), on ports the OS chooses; as
/// [`serve_args`], with no `FINTRUST_` variable of the test's environment.
#[allow(dead_code)] // each test binary uses part of it
pub fn serve_tls_args(cmd: &mut Command, data_dir: &Path, cert: &Path, key: &Path) {
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--passphrase-file")
        .arg(data_dir.join("dev-passphrase"))
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
    clean_env(cmd);
}

/// [`serve_tls_args`] with the certificate and key that `vaultd dev --tls`
/// made in `data_dir`.
#[allow(dead_code)] // each test binary uses part of it
pub fn serve_dev_tls_args(cmd: &mut Command, data_dir: &Path) {
    serve_tls_args(
        cmd,
        data_dir,
        &data_dir.join("dev-cert.pem"),
        &data_dir.join("dev-key.pem"),
    );
}

/// Adds to `cmd` (the `vaultd` binary) the arguments of a `vaultd shim`
/// in front of the vault at `vault`, whose gateway key is in `key_file`,
/// serving HTTP in plaintext on a port the OS chooses (and reaching the
/// vault in plaintext too unless `--cacert` is added); as [`serve_args`],
/// with no `FINTRUST_` variable of the test's environment.
#[allow(dead_code)] // each test binary uses part of it
pub fn shim_args(cmd: &mut Command, vault: &str, key_file: &Path) {
    cmd.args([
        "shim",
        "--insecure-plaintext",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .args(["--vault", vault])
    .arg("--api-key-file")
    .arg(key_file);
    clean_env(cmd);
}

/// Keeps every `FINTRUST_` variable of the test's environment from `cmd`,
/// and has it log at info level (where `vaultd` says it is ready).
#[allow(dead_code)] // each test binary uses part of it
pub fn clean_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FINTRUST_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("FINTRUST_LOG", "info");
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `vaultd serve` (or `vaultd shim`), with the addresses of its
/// `vaultd ready` (`shim ready`) log line; SIGKILL when dropped.
#[derive(Debug)]
#[allow(dead_code)] // each test binary uses part of it
pub struct Vaultd {
    child: Option<std::process::Child>,
    /// The protocol port (empty for `vaultd shim`).
    pub protocol: String,
    /// The HTTP shim.
    pub http: String,
    /// Its log's lines after the ready line, as they come.
    pub log: std::sync::mpsc::Receiver<String>,
}

#[allow(dead_code)] // each test binary uses part of it
impl Vaultd {
    /// Runs `cmd`, a `vaultd serve` or `vaultd shim` on ports 0 (possibly
    /// behind a wrapper that execs it), and waits for its `vaultd ready`
    /// or `shim ready` line. `Err` holds the log it wrote if it exits
    /// first.
    pub fn spawn(mut cmd: Command) -> Result<Vaultd, String> {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("start vaultd: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut log = Vec::new();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("vaultd ready") || line.contains("shim ready") => {
                    break line
                }
                Some(Ok(line)) => log.push(line),
                _ => {
                    let status = child.wait().map_err(|e| e.to_string())?;
                    return Err(format!(
                        "vaultd exited before it was ready ({status}):\n{}",
                        log.join("\n")
                    ));
                }
            }
        };
        // Keep draining the log so that the child never blocks on a full
        // pipe, handing its lines to whoever reads them.
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let after = |key: &str| {
            ready
                .split(key)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(|s| {
                    s.trim_start_matches("Some(")
                        .trim_end_matches(')')
                        .to_string()
                })
                .ok_or_else(|| format!("no {key} in {ready:?}"))
        };
        let protocol = if ready.contains("shim ready") {
            String::new()
        } else {
            after("protocol=")?
        };
        Ok(Vaultd {
            protocol,
            http: after("http=")?,
            child: Some(child),
            log,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    /// SIGKILL, and waits until the process is gone (its sled lock with it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its exit status if it has exited (by itself: a crash).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// SIGTERM (a clean shutdown), then waits: its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        terminate(self.child.take().expect("running"))
    }
}

impl Drop for Vaultd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a finished tool process left behind.
#[derive(Debug)]
#[allow(dead_code)] // each test binary uses part of it
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

#[allow(dead_code)]
impl Run {
    /// Stdout as exactly one JSON object on one line.
    pub fn json(&self) -> serde_json::Value {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line of JSON: {self:?}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
        assert!(v.is_object(), "not a JSON object: {v}");
        v
    }

    /// [`Run::json`] of a run that exited 0.
    pub fn ok_json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "{self:?}");
        self.json()
    }
}

/// Runs binary `bin` of `package` with `args` and `env`, and no other
/// `FINTRUST_*` variable of the test's environment, until it exits.
#[allow(dead_code)]
pub fn run_bin<I, S>(package: &str, bin: &str, args: I, env: &[(&str, &str)]) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    finished(bin, tool(package, bin, args, env).output())
}

/// What a run of `bin` that `output` waited for left behind.
fn finished(bin: &str, output: std::io::Result<std::process::Output>) -> Run {
    let out = output.unwrap_or_else(|e| panic!("run {bin}: {e}"));
    Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("{bin} was killed by a signal")),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`run_bin`] with `input` on stdin, a pipe (as in `printf … | bin`,
/// or a `<(…)` file): it can be read once.
#[allow(dead_code)]
pub fn run_bin_with_stdin<I, S>(
    package: &str,
    bin: &str,
    args: I,
    env: &[(&str, &str)],
    input: &[u8],
) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::io::Write;
    let mut child = tool(package, bin, args, env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    // A tool that does not read it all gets EPIPE here: not this run's
    // failure, which its exit tells.
    let _ = stdin.write_all(input);
    drop(stdin);
    finished(bin, child.wait_with_output())
}

/// [`run_bin`] with stdout a pipe whose reading end is already closed, as
/// in `bin … | head -0`: every write to it fails (`EPIPE`).
#[allow(dead_code)]
pub fn run_bin_into_closed_pipe<I, S>(
    package: &str,
    bin: &str,
    args: I,
    env: &[(&str, &str)],
) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    finished(bin, tool(package, bin, args, env).stdout(writer).output())
}

/// The exit code of [`run_bin`] with stdout and stderr both a pipe whose
/// reading end is already closed (`bin … 2>&1 | head -0`).
#[allow(dead_code)]
pub fn exit_code_into_closed_pipes<I, S>(package: &str, bin: &str, args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let stderr = writer.try_clone().expect("clone the pipe");
    tool(package, bin, args, &[])
        .stdout(writer)
        .stderr(stderr)
        .status()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"))
        .code()
        .unwrap_or_else(|| panic!("{bin} was killed by a signal"))
}

/// The command of binary `bin` of `package` with `args` and `env`, and
/// no other `FINTRUST_*` variable of the test's environment.
fn tool<I, S>(package: &str, bin: &str, args: I, env: &[(&str, &str)]) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(binary(package, bin));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FINTRUST_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// `vault-client` with `args`, and no `FINTRUST_*` variable of the
/// test's environment (an API key there would stand in for a missing
/// `--api-key`).
#[allow(dead_code)]
pub fn vault_client(args: &[&str]) -> Run {
    run_bin("fintrust-client", "vault-client", args, &[])
}

/// [`run_bin`] without blocking the runtime (which may be serving the
/// vault the tool talks to).
#[allow(dead_code)]
pub async fn run_tool(package: &str, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let (package, bin, args) = (package.to_string(), bin.to_string(), owned(args));
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_bin(&package, &bin, &args, &env)
    })
    .await
    .expect("the tool's thread")
}

/// The partner credential's name, which is the partner id tokens name.
#[allow(dead_code)]
pub const PARTNER: &str = "demo-lender";

/// A vault served on 127.0.0.1 on a port the OS chose, in this process,
/// with writer, partner and auditor credentials besides the admin's.
/// Dropping it stops the server.
#[allow(dead_code)] // each test binary uses part of it
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub vault: Arc<Vault>,
    pub admin: String,
    pub writer: String,
    pub partner: String,
    /// An auditor's API key: may read the head, entries and proofs.
    pub auditor: String,
    pub dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[allow(dead_code)] // each test binary uses part of it
impl Server {
    pub fn public_key(&self) -> [u8; 32] {
        self.vault.public_key().to_bytes()
    }

    /// A plaintext config for `key` (the server is on loopback).
    pub fn plain(&self, key: &str) -> ClientConfig {
        ClientConfig {
            addr: self.addr.to_string(),
            tls: Tls::Plaintext,
            api_key: Zeroizing::new(key.to_string()),
            client_name: "client test".into(),
            timeout: Duration::from_secs(10),
        }
    }

    pub async fn connect(&self, key: &str) -> Client {
        Client::connect(self.plain(key)).await.expect("connect")
    }
}

#[allow(dead_code)]
/// Creates a vault in a temp dir and serves it with `config` (and TLS
/// when `tls` names the files).
pub async fn start(config: ServeConfig, tls: Option<TlsFiles>) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = Vault::create(
        &dir.path().join("v"),
        &Unlock::passphrase(b"client test".to_vec()),
        Options::default(),
    )
    .expect("create");
    let vault = Arc::new(created.vault);
    let (_, writer) = vault
        .create_credential("writer", "test service")
        .await
        .expect("writer");
    let (_, partner) = vault
        .create_credential("partner", PARTNER)
        .await
        .expect("partner");
    let (_, auditor) = vault
        .create_credential("auditor", "test auditor")
        .await
        .expect("auditor");
    let tls = tls.map(|files| ServerTls::open(&files).expect("server TLS config"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run(listener, vault.clone().into(), config, tls, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        vault,
        admin: created.admin_api_key.to_string(),
        writer: writer.to_string(),
        partner: partner.to_string(),
        auditor: auditor.to_string(),
        dir,
        _stop: stop,
    }
}

/// Every regular file under `dir` with its bytes, by path relative to it,
/// sorted: two listings compare equal when the tree holds the same files
/// with the same bytes.
#[allow(dead_code)] // each test binary uses part of it
pub fn dir_contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let path = e.expect("dir entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
                out.push((rel, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Sends `req`, with `body` as JSON when given, and returns the status and
/// the body parsed as JSON (or as a string when it is not), 4xx and 5xx
/// included.
#[allow(dead_code)] // each test binary uses part of it
pub fn http(req: ureq::Request, body: Option<&str>) -> (u16, serde_json::Value) {
    let (method, url) = (req.method().to_string(), req.url().to_string());
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().expect("body");
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}
