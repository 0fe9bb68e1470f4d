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
