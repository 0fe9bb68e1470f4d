//! Helpers shared by the end-to-end tests.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The path of binary `bin` of workspace package `package`, built first.
///
/// The binaries belong to other packages, so `CARGO_BIN_EXE_*` does not
/// name them; they sit beside this test's own profile dir
/// (`target/debug/deps/<test>-…` → `target/debug`). Each package is built
/// once per test run, which cargo makes a no-op when it is fresh, so that
/// a stale binary is never tested.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let built = built.get_or_insert_with(HashSet::new);
    if !built.contains(package) {
        let target = profile.parent().expect("the profile dir has a parent");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--quiet", "-p", package, "--bins"])
            .arg("--target-dir")
            .arg(target);
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
        assert!(status.success(), "cargo build -p {package} --bins failed");
        built.insert(package.to_string());
    }
    profile.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX))
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
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        child.wait().expect("wait for vaultd dev")
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
