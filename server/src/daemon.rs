//! One `vaultd` process: the protocol server (port 9999) and the HTTP
//! policy shim (port 8080) in front of it, started and stopped together.
//!
//! ```text
//! partners, services ──TLS──> :9999  serve::run ──────┐
//!                       direct calls  serve::Local ───┤── Vault
//! partners, admins ──HTTP(S)─> :8080 shim ────────────┘   (shim → calls, gateway key)
//! ```
//!
//! The shim reaches the vault through the client crate, like a shim in its
//! own process would: every connection sends `Hello` with a key and is
//! served under that key's role, its frames decoded and checked as a
//! socket's are, but by a call (`serve::Local::direct`) rather than over a
//! loopback socket, which saves two socket writes and reads and four task
//! wake-ups per request. Its gateway key is created at start and lives
//! only in memory; it is revoked at a clean shutdown. After a crash, or a
//! stop while the vault was being opened again, it is useless (only its
//! hash was ever stored) but still active in the log: the next start
//! revokes every such key of an earlier process, the live gateway
//! credentials named [`SHIM_KEY_NAME`] (a name the API refuses), before it
//! makes its own.
//!
//! Shutdown: stop accepting; each protocol connection answers the
//! requests it has read, says why it closes and closes (`serve::run`
//! waits up to [`serve::SHUTDOWN_GRACE`] for them), and the shim finishes
//! its requests; then the shim's key is revoked and the vault closed
//! (which flushes and syncs the log).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use client::{ClientConfig, Tls, Zeroizing};
use storage::Vault;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::live::{self, LiveVault, Reopen};
use crate::serve::{self, ServeConfig};
use crate::shim::{self, PoliciesFile, Shim, ShimConfig, VaultLink};
use crate::{Error, Result};

/// What [`run`] serves and how.
#[derive(Debug)]
pub struct Daemon {
    pub protocol: TcpListener,
    /// `None`: no HTTP shim.
    pub http: Option<TcpListener>,
    /// TLS of both ports; `None` serves both in plaintext.
    pub tls: Option<crate::tls::ServerTls>,
    pub serve: ServeConfig,
    pub shim: ShimConfig,
    /// Policies to write at start when they differ from the vault's.
    pub policies: Option<PoliciesFile>,
    /// How to open the data dir again after a failed write or fsync
    /// poisons the vault (see [`crate::live`]); `None`: the vault stays
    /// poisoned, refusing writes, until the process restarts.
    pub reopen: Option<Reopen>,
}

/// Where a running daemon listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub protocol: SocketAddr,
    pub http: Option<SocketAddr>,
}

/// Whether every one of `addrs` can be listened on now, all at once (the
/// same port given twice is not): a server whose start takes long (the
/// open of a vault verifies its whole log) says at once that an address
/// is taken, rather than after it. The listeners are closed again, and
/// the server binds its addresses once it is ready to serve, so that no
/// client waits unanswered in a backlog meanwhile (another program may
/// take an address in between: that bind then says so). On failure, the
/// index in `addrs` of the address that could not be listened on.
pub async fn check_listenable(addrs: &[&str]) -> Result<(), (usize, std::io::Error)> {
    let mut held = Vec::with_capacity(addrs.len());
    for (i, addr) in addrs.iter().enumerate() {
        held.push(TcpListener::bind(addr).await.map_err(|e| (i, e))?);
    }
    Ok(())
}

/// Raises the process's soft limit of open files to its hard limit (a
/// server's connections each take one or two, and the default soft limit
/// is often 1,024), and returns the soft limit now in force (`None`: no
/// limit).
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Warns when `limit` open files cannot hold the connections both ports
/// may: each takes up to two (a TLS connection's socket is duplicated
/// for its writer), served or in its handshake.
fn check_open_files(limit: Option<u64>, serve: &ServeConfig, shim: Option<&ShimConfig>) {
    let per_port = |served: usize, handshakes: usize| 2 * (served as u64 + handshakes as u64);
    let needed = per_port(serve.max_connections, serve.max_handshakes)
        + shim.map_or(0, |s| per_port(s.max_connections, s.max_handshakes))
        + 256;
    if let Some(limit) = limit.filter(|l| *l < needed) {
        tracing::warn!(
            limit,
            needed,
            "the open-files limit is below what the connection limits may take: \
             raise it (ulimit -n, LimitNOFILE=) or lower --max-connections"
        );
    }
}

/// Serves until `shutdown` resolves, then stops cleanly and closes the
/// vault. `ready` is called once everything listens; when it fails (it
/// could not hand out the addresses and keys, say), the daemon stops as
/// cleanly and returns its error. A stop that cannot close the vault is
/// an error too: the vault out of service after a failed write (not open
/// again yet), or requests still holding it when the shutdown's wait
/// ends; every acknowledged write is durable either way.
pub async fn run(
    vault: Vault,
    d: Daemon,
    ready: impl FnOnce(Bound) -> Result<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let io = |source| Error::File {
        path: "listener".into(),
        error: source,
    };
    let bound = Bound {
        protocol: d.protocol.local_addr().map_err(io)?,
        http: d
            .http
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()
            .map_err(io)?,
    };
    check_open_files(
        raise_open_files_limit(),
        &d.serve,
        d.http.as_ref().map(|_| &d.shim),
    );
    for warning in d.serve.rotation.check(&vault)? {
        tracing::warn!("rotation policy: {warning}");
    }
    let stale = revoke_stale_shim_keys(&vault).await?;
    if stale > 0 {
        tracing::info!(revoked = stale, "revoked the shim keys of earlier runs");
    }
    let (gateway_id, gateway_key) = match d.http {
        Some(_) => {
            let (id, key) = vault.create_credential("gateway", SHIM_KEY_NAME).await?;
            (Some(id), Some(key))
        }
        None => (None, None),
    };
    // A master secret the vault is rotated to online is kept for its
    // reopens until the server stops.
    let _forget = live::Forget(vault.vault_id());
    let live = LiveVault::from(vault);
    crate::metrics::global().watch_vault(live.clone());
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let watcher = d
        .reopen
        .map(|reopen| tokio::spawn(live::watch(live.clone(), reopen, stop.clone())));
    // The shim first, and the policies file applied through it, so that
    // the protocol port serves under those policies from its first
    // request (a restart to tighten one leaves no window).
    let mut started = Ok(());
    let mut shim = None;
    if let (Some(http), Some(key)) = (d.http, gateway_key) {
        // The shim reaches this process's vault by direct calls.
        let local = serve::Local::new(live.clone(), d.serve.clone());
        let link = VaultLink::in_process(
            local,
            ClientConfig {
                addr: "in-process".into(),
                tls: Tls::Plaintext,
                api_key: Zeroizing::new(key.to_string()),
                client_name: "vaultd-shim".into(),
                timeout: Duration::from_secs(10),
            },
        );
        let s = Shim::new(link, d.shim);
        if let Some(file) = &d.policies {
            match shim::apply_policies(&s, file).await {
                Ok(n) => tracing::info!(changed = n, "policies file applied"),
                Err(e) => started = Err(Error::Usage(format!("loading the policies file: {e}"))),
            }
        }
        shim = Some((http, s));
    }
    let announced = started.and_then(|()| {
        let (vault, config, tls, stopped) = (
            live.clone(),
            d.serve.clone(),
            d.tls.clone(),
            stop.clone().cancelled_owned(),
        );
        tasks.spawn(async move {
            let r = serve::run(d.protocol, vault, config, tls, stopped).await;
            ("protocol port", r)
        });
        if let Some((http, s)) = shim {
            let (tls, stopped) = (d.tls.clone(), stop.clone().cancelled_owned());
            tasks.spawn(async move { ("HTTP port", shim::serve(http, s, tls, stopped).await) });
        }
        ready(bound)
    });
    // A listener that ends before the shutdown (it should not) stops the
    // rest, and the daemon's result is its failure.
    let mut failed = None;
    if announced.is_ok() {
        tokio::select! {
            _ = shutdown => {}
            Some(r) = tasks.join_next() => failed = Some(listener_ended(r)),
        }
    }
    tracing::info!("shutting down: finishing requests in flight");
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok((_, Ok(()))) = r {
            continue;
        }
        failed.get_or_insert(listener_ended(r));
    }
    if let Some(w) = watcher {
        let _ = w.await;
    }
    let announced = announced.and(failed.map_or(Ok(()), Err));
    let Some(vault) = live.take() else {
        // Out of service since a failed write: the stop is not clean, and
        // the exit says so. Nothing acknowledged is lost.
        tracing::warn!("stopped while the vault was being opened again");
        return announced.and(Err(Error::Usage(
            "stopped while the vault was out of service after a failed write (not open again \
             yet): every acknowledged write is durable, and the next start replays the \
             write-ahead file; see the failure logged above"
                .into(),
        )));
    };
    if let Some(id) = gateway_id {
        if let Err(e) = vault.revoke_credential(&id).await {
            tracing::warn!(error = %e, "could not revoke the shim's gateway key");
        }
    }
    // Only requests of connections that outlived the grace hold it now.
    let closed = live::close_when_idle(vault, tokio::time::sleep(Duration::from_secs(5))).await;
    match closed {
        Ok(v) => v.close()?,
        // Not a clean stop either: the vault's close (its checkpoint, a
        // failure it would report) is left to the process's exit.
        Err(_) => {
            tracing::warn!(
                "requests still running at shutdown; the log is flushed as the process exits"
            );
            return announced.and(Err(Error::Usage(
                "requests were still running when the shutdown's wait ended, so the vault was \
                 not closed: every acknowledged write is durable, and the next start replays \
                 the write-ahead file"
                    .into(),
            )));
        }
    }
    announced
}

/// What a listener task's end means for the daemon: its error, or that
/// it panicked or stopped serving without being asked to.
fn listener_ended(
    r: std::result::Result<(&'static str, std::io::Result<()>), tokio::task::JoinError>,
) -> Error {
    let (path, error) = match r {
        Ok((port, Err(e))) => (port, e),
        Ok((port, Ok(()))) => (port, std::io::Error::other("stopped serving on its own")),
        Err(e) => ("a listener", std::io::Error::other(format!("ended: {e}"))),
    };
    tracing::error!(port = path, error = %error, "a listener failed");
    Error::File {
        path: path.into(),
        error,
    }
}

/// The name of the in-process shim's gateway credential. It holds spaces,
/// which a credential name made over the protocol or the HTTP API may
/// not: no admin can make a credential under it.
pub const SHIM_KEY_NAME: &str = "vaultd in-process shim";

/// Revokes the gateway keys that earlier `vaultd` processes made for their
/// in-process shim and could not revoke (a crash, or a stop while the
/// vault was being opened again): the live gateway credentials named
/// [`SHIM_KEY_NAME`], read from the derived state (no pass over the log).
/// Their keys lived only in those processes' memory, so nothing can use
/// them, and no admin can make a credential of that name. (Builds before
/// that name called the key `vaultd-shim`, a name an admin may use too:
/// such keys are left alone.) Returns how many were revoked.
pub async fn revoke_stale_shim_keys(vault: &Vault) -> Result<usize> {
    let stale: Vec<String> = vault
        .live_credentials("gateway-")?
        .into_iter()
        .filter(|c| c.role == "gateway" && c.name == SHIM_KEY_NAME)
        .map(|c| c.id)
        .collect();
    for id in &stale {
        vault.revoke_credential(id).await?;
    }
    Ok(stale.len())
}

/// [`signal`], for a process's main work: resolves on the first SIGINT or
/// SIGTERM, and from then on a second one ends the process at once (exit
/// 1), without waiting for the requests in flight or a reopen of the
/// vault, for an operator who cannot wait. Nothing acknowledged is lost:
/// an append is answered only once durable.
///
/// The second signal is waited for on a thread of its own, not on the
/// runtime: it must end a process whose workers are stuck, which is when
/// an operator presses Ctrl-C twice.
pub fn signal_then_hurry() -> impl std::future::Future<Output = ()> + Send + 'static {
    let first = signal();
    async move {
        first.await;
        use signal_hook::consts::{SIGINT, SIGTERM};
        let not_hurried = |e: std::io::Error| tracing::warn!(error = %e, "a second signal will not hurry the shutdown");
        match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(mut signals) => {
                let spawned = std::thread::Builder::new()
                    .name("second-signal".into())
                    .spawn(move || {
                        if signals.forever().next().is_some() {
                            tracing::warn!(
                                "a second signal: exiting now, without finishing the requests in flight"
                            );
                            std::process::exit(1);
                        }
                    });
                if let Err(e) = spawned {
                    not_hurried(e);
                }
            }
            Err(e) => not_hurried(e),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled, so a signal that arrives between "ready" and the first poll
/// still shuts down cleanly instead of killing the process. Call it inside a
/// runtime context.
pub fn signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
