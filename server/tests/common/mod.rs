//! What the server's test binaries share: a vault with a key of each
//! role, served over TCP on a port the OS chose; and `vaultd`'s daemon
//! run on a task of its own.

use std::sync::Arc;

use server::serve::{run, ServeConfig};
use storage::{Options, Unlock, Vault};

/// A vault served by `serve::run` until dropped, with an API key of each
/// role (the partner's is `demo-lender`'s).
#[allow(dead_code)] // not every test binary uses every key
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub vault: Arc<Vault>,
    pub admin: String,
    pub writer: String,
    pub partner: String,
    pub gateway: String,
    pub auditor: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Stops the server as a signal stops `vaultd`'s, and waits until
    /// `run` has returned, its connections drained.
    #[allow(dead_code)] // not every test binary stops its server
    pub async fn shut_down(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.expect("the server's task").expect("serve::run");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[allow(dead_code)] // not every test binary starts a server
pub async fn start(config: ServeConfig) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let created = Vault::create(
        &dir.path().join("v"),
        &Unlock::passphrase(b"serve test".to_vec()),
        Options::default(),
    )
    .expect("create");
    let vault = Arc::new(created.vault);
    let mut keys = Vec::new();
    for (role, name) in [
        ("writer", "test service"),
        ("partner", "demo-lender"),
        ("gateway", "http shim"),
        ("auditor", "siem"),
    ] {
        let (_, key) = vault.create_credential(role, name).await.expect(role);
        keys.push(key.to_string());
    }
    let [writer, partner, gateway, auditor] = <[String; 4]>::try_from(keys).expect("four keys");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(run(listener, vault.clone().into(), config, None, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        vault,
        admin: created.admin_api_key.to_string(),
        writer,
        partner,
        gateway,
        auditor,
        stop: Some(stop),
        done: Some(done),
        _dir: dir,
    }
}

/// The value of the counter `series` (name and labels, as `/metrics`
/// prints them) in this process's metrics; 0 before it is first counted.
#[allow(dead_code)] // not every test binary reads the metrics
pub fn counter(series: &str) -> u64 {
    let text = server::metrics::global().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A `daemon::run` on a task of its own ([`daemon`]).
#[allow(dead_code)] // not every test binary runs the daemon
pub struct Daemonized {
    /// Where it listens, once ready.
    pub bound: server::daemon::Bound,
    /// Stops it as a signal stops `vaultd`.
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// Its task: `run`'s result once stopped.
    pub done: tokio::task::JoinHandle<server::Result<()>>,
}

/// Runs `vault` with `d` as `vaultd` does, on a task of its own, and
/// returns once it listens.
#[allow(dead_code)] // not every test binary runs the daemon
pub async fn daemon(vault: Vault, d: server::daemon::Daemon) -> Daemonized {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server::daemon::run(
        vault,
        d,
        |b| {
            let _ = ready_tx.send(b);
            Ok(())
        },
        async {
            let _ = stopped.await;
        },
    ));
    let bound = ready_rx.await.expect("the daemon is ready");
    Daemonized { bound, stop, done }
}

/// The subject and payload of each durable entry of `kind` in `vault`'s
/// log, in log order.
#[allow(dead_code)] // not every test binary reads the log
pub fn entries_of(vault: &Vault, kind: storage::Kind) -> Vec<(String, Vec<u8>)> {
    vault
        .entries_from(0, 10_000)
        .expect("entries")
        .iter()
        .filter_map(|e| {
            let e = storage::entry::EntryRef::decode(e).ok()?;
            (e.kind == kind).then(|| (e.subject.to_string(), e.payload.to_vec()))
        })
        .collect()
}
