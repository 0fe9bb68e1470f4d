//! The vault a running server answers from, and its recovery after a
//! failed write.
//!
//! A write or fsync that fails poisons the storage engine: it refuses
//! every later write, because after a failed fsync the kernel may have
//! dropped the dirty pages it could not write, and nothing in the process
//! can tell what reached the disk. Only opening the data dir again, which
//! reads and checks the log's tail the way a start after a crash does,
//! knows. So a server does not hold a [`Vault`] but a [`LiveVault`], and
//! [`watch`] replaces a poisoned vault by a freshly opened one:
//!
//! ```text
//! ok ──write or fsync fails──> poisoned ──watch──> recovering ──open──> ok
//!      (writes: unavailable)              (every request: unavailable)
//! ```
//!
//! 1. The vault is taken out of service: requests that arrive get
//!    `unavailable` ("recovering") at once.
//! 2. Requests in flight finish (a poisoned vault refuses their writes)
//!    and let go of it; it is closed, which releases the data dir. A
//!    request whose connection's client reads its answers slowly is not
//!    polled while its connection waits to write, and would hold the vault
//!    as long as that client likes: after [`RETIRE_GRACE`], the
//!    connections opened before the failure that are still going are cut
//!    off ([`LiveVault::retiring`]), those that lived through an earlier
//!    recovery included, and what they held goes with them.
//! 3. The data dir is opened again as at a restart: the secret is read
//!    again from its file (so a master key rotated meanwhile still opens
//!    it once the file holds the new secret, and before that the secret
//!    this process rotated it to does, [`rotated_to`]), and the log's
//!    tail is recovered. First the kernel's cached
//!    pages of sled's files are dropped: after a failed fsync, Linux keeps
//!    the pages it could not write there, marked clean, and an open that
//!    read them would take writes the disk lacks for durable. An open that fails (the disk
//!    is still full, say) is tried again after 1 s, 2 s, … up to 30 s.
//!
//! Invariants: nothing acknowledged is lost (the open keeps every
//! durable entry, and only durable entries were acknowledged); a vault
//! that was poisoned refuses every write (reads and `Health`, which says
//! `degraded`, are still served from it until it is taken out of
//! service); at most one vault is open on
//! the data dir at a time (sled's lock would refuse a second).

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use protocol::SecretKind;
use storage::{Unlock, Vault};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// Opens the data dir again, as `vaultd` does at start.
#[derive(Clone)]
pub struct Reopen {
    dir: std::path::PathBuf,
    secret: Arc<dyn Fn() -> crate::Result<Unlock> + Send + Sync>,
    options: Arc<dyn Fn() -> storage::Options + Send + Sync>,
}

/// The master secrets that vaults of this process were rotated to online
/// (`RotateMasterKey`), by vault id: the one their secret file held at
/// start opens them no more until the operator replaces it, and a reopen
/// after a failed write must not be stopped by that. Each is wiped once
/// the file's secret opens its vault again, when it is replaced, and when
/// the server of its vault stops ([`Forget`]).
static ROTATED: Mutex<Vec<Rotated>> = Mutex::new(Vec::new());

/// A vault's id, and the kind and bytes of the secret it was rotated to.
type Rotated = ([u8; 16], SecretKind, Zeroizing<Vec<u8>>);

/// Secrets kept per vault at most: the last ones it may have been
/// rotated to.
const MAX_ROTATED: usize = 4;

/// Notes that the vault `vault_id` was, or may have been, rotated online
/// to the master secret `secret` of `kind` (see [`Reopen`]). The secrets
/// noted before are kept beside it: a rotation whose outcome is unknown
/// may have done nothing, and the one before it is then the one that
/// opens the vault.
pub fn rotated_to(vault_id: [u8; 16], kind: SecretKind, secret: &[u8]) {
    let mut rotated = ROTATED.lock().unwrap_or_else(PoisonError::into_inner);
    rotated.retain(|(id, k, s)| !(*id == vault_id && *k == kind && s.as_slice() == secret));
    rotated.push((vault_id, kind, Zeroizing::new(secret.to_vec())));
    let of_vault = rotated.iter().filter(|(id, _, _)| *id == vault_id).count();
    if of_vault > MAX_ROTATED {
        if let Some(oldest) = rotated.iter().position(|(id, _, _)| *id == vault_id) {
            rotated.remove(oldest);
        }
    }
}

/// Wipes what [`rotated_to`] holds of the vault `vault_id`.
pub fn forget_rotated(vault_id: [u8; 16]) {
    let mut rotated = ROTATED.lock().unwrap_or_else(PoisonError::into_inner);
    rotated.retain(|(id, _, _)| *id != vault_id);
}

/// [`forget_rotated`] of a vault when dropped: held by the server of the
/// vault for as long as it serves it (a static is never dropped, so
/// nothing else would wipe it at exit).
#[derive(Debug)]
pub struct Forget(pub [u8; 16]);

impl Drop for Forget {
    fn drop(&mut self) {
        forget_rotated(self.0);
    }
}

/// The master secrets the vault `vault_id` was, or may have been,
/// rotated to online, the latest first.
fn rotated_secrets(vault_id: [u8; 16]) -> Vec<crate::Result<Unlock>> {
    let rotated = ROTATED.lock().unwrap_or_else(PoisonError::into_inner);
    rotated
        .iter()
        .rev()
        .filter(|(id, _, _)| *id == vault_id)
        .map(|(_, kind, secret)| {
            crate::secrets::unlock_of(*kind, secret).map_err(crate::Error::Usage)
        })
        .collect()
}

impl Reopen {
    /// Opens the data dir `dir` with `options`, unsealed by `secret` (read
    /// again each time, from its file); when that secret is refused and
    /// this process rotated the vault's master key online
    /// ([`rotated_to`]), by the secret it was rotated to.
    pub fn new(
        dir: impl Into<std::path::PathBuf>,
        secret: impl Fn() -> crate::Result<Unlock> + Send + Sync + 'static,
        options: impl Fn() -> storage::Options + Send + Sync + 'static,
    ) -> Self {
        Reopen {
            dir: dir.into(),
            secret: Arc::new(secret),
            options: Arc::new(options),
        }
    }

    /// Opens the vault `vault_id` again, having dropped the kernel's
    /// cached pages of sled's files ([`storage::forget_cached_pages`]):
    /// after a failed fsync, the cache may hold writes the disk lacks,
    /// which the open must not take for durable.
    fn attempt(&self, vault_id: [u8; 16]) -> crate::Result<Vault> {
        if let Err(e) = storage::forget_cached_pages(&self.dir) {
            tracing::warn!(error = %e, "could not drop the cached pages of the vault's files");
        }
        let open = |unlock: &Unlock| Vault::open(&self.dir, unlock, (self.options)());
        match (self.secret)().and_then(|unlock| Ok(open(&unlock)?)) {
            Ok(vault) => {
                // The file holds the secret now: the copy kept can go.
                forget_rotated(vault_id);
                Ok(vault)
            }
            Err(crate::Error::Storage(storage::Error::WrongSecret)) => {
                for rotated in rotated_secrets(vault_id) {
                    match open(&rotated?) {
                        Err(storage::Error::WrongSecret) => continue,
                        opened => {
                            tracing::warn!(
                                "the secret file no longer opens the vault, whose master key \
                                 was rotated while it served: opened with the new secret; put \
                                 that secret in the file before the next start"
                            );
                            return Ok(opened?);
                        }
                    }
                }
                Err(storage::Error::WrongSecret.into())
            }
            opened => opened,
        }
    }
}

impl std::fmt::Debug for Reopen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reopen(..)")
    }
}

/// The vault in service, or none while it is being reopened.
#[derive(Debug, Clone)]
pub struct LiveVault {
    current: Arc<RwLock<Option<Arc<Vault>>>>,
    /// Cancelled to cut off the connections opened before the vault in
    /// service was taken out of it, when they still hold it after
    /// [`RETIRE_GRACE`]; replaced as it is taken.
    retiring: Arc<Mutex<CancellationToken>>,
}

/// How long the requests in flight when a vault is taken out of service
/// may hold it before their connections are cut off ([`watch`]).
pub const RETIRE_GRACE: Duration = Duration::from_secs(30);

/// What [`LiveVault::status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Serving.
    Ok,
    /// A write failed; the vault refuses writes until it is reopened.
    Poisoned,
    /// Out of service while the data dir is opened again.
    Recovering,
}

impl Status {
    /// The name health checks report.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Poisoned => "degraded",
            Status::Recovering => "recovering",
        }
    }
}

impl From<Arc<Vault>> for LiveVault {
    fn from(vault: Arc<Vault>) -> Self {
        LiveVault {
            current: Arc::new(RwLock::new(Some(vault))),
            retiring: Arc::new(Mutex::new(CancellationToken::new())),
        }
    }
}

impl From<Vault> for LiveVault {
    fn from(vault: Vault) -> Self {
        Arc::new(vault).into()
    }
}

impl LiveVault {
    /// The vault in service; `None` while it is being reopened.
    pub fn get(&self) -> Option<Arc<Vault>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether requests are served, refused for writes, or not served.
    pub fn status(&self) -> Status {
        match self.get() {
            None => Status::Recovering,
            Some(v) if v.is_poisoned() => Status::Poisoned,
            Some(_) => Status::Ok,
        }
    }

    /// Takes the vault out of service.
    pub fn take(&self) -> Option<Arc<Vault>> {
        self.current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// What a connection opened now listens to, to be cut off should the
    /// vault it was served from be taken out of service and still be held
    /// after [`RETIRE_GRACE`].
    pub fn retiring(&self) -> CancellationToken {
        self.retiring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes the vault out of service ([`LiveVault::take`]), with the token
    /// of the connections opened until now, which is replaced by a new one
    /// for those opened from now on (one step: a connection that asks for
    /// its token meanwhile waits for it).
    fn take_retiring(&self) -> Option<(Arc<Vault>, CancellationToken)> {
        let mut retiring = self.retiring.lock().unwrap_or_else(PoisonError::into_inner);
        let vault = self.take()?;
        Some((vault, std::mem::take(&mut *retiring)))
    }

    fn put(&self, vault: Arc<Vault>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(vault);
    }
}

/// Waits until `vault` is the last handle to it (requests in flight have
/// finished), and returns it for the caller to close or drop. Gives up
/// when `give_up` resolves first, and hands the handle back.
pub async fn close_when_idle(
    vault: Arc<Vault>,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<Vault, Arc<Vault>> {
    tokio::pin!(give_up);
    let mut waited = Instant::now();
    let mut vault = vault;
    loop {
        match Arc::try_unwrap(vault) {
            Ok(v) => return Ok(v),
            Err(shared) => vault = shared,
        }
        if waited.elapsed() > Duration::from_secs(10) {
            tracing::warn!(
                handles = Arc::strong_count(&vault) - 1,
                "requests still hold the vault; waiting for them to finish"
            );
            waited = Instant::now();
        }
        tokio::select! {
            () = &mut give_up => return Err(vault),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Replaces the vault of `live` whenever a failed write poisons it, until
/// `stop` is cancelled. See the module docs for the steps.
pub async fn watch(live: LiveVault, reopen: Reopen, stop: CancellationToken) {
    watch_with(live, reopen, stop, RETIRE_GRACE).await;
}

/// [`watch`], with the connections that still hold a vault taken out of
/// service cut off after `grace`.
pub async fn watch_with(live: LiveVault, reopen: Reopen, stop: CancellationToken, grace: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delay = Duration::from_secs(1);
    let mut reopened_at: Option<Instant> = None;
    let mut uncut: Vec<CancellationToken> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if live.status() != Status::Poisoned {
            continue;
        }
        let Some((poisoned, opened_before)) = live.take_retiring() else {
            continue;
        };
        tracing::error!(
            "a write or fsync failed: the vault is out of service and is opened again from disk"
        );
        // The connections opened before this failure, and those opened
        // before earlier ones that were not cut (their vault was let go of
        // in time): served since from the vault opened again, they may
        // hold this one.
        uncut.push(opened_before);
        let closing = close_when_idle(poisoned, stop.cancelled());
        tokio::pin!(closing);
        let cut_at = tokio::time::sleep(grace);
        tokio::pin!(cut_at);
        let mut cut = false;
        let closed = loop {
            tokio::select! {
                // A vault let go of as the grace ends is not cut off for.
                biased;
                closed = &mut closing => break closed,
                () = &mut cut_at, if !cut => {
                    tracing::warn!(
                        grace_secs = grace.as_secs(),
                        "requests still hold the vault taken out of service: the connections \
                         opened before it was are cut off"
                    );
                    for token in uncut.drain(..) {
                        token.cancel();
                    }
                    cut = true;
                }
            }
        };
        let old = match closed {
            Ok(old) => old,
            Err(poisoned) => {
                // Stopped first: the server's shutdown closes it (and
                // reports that it was poisoned), as it would have had the
                // failure come a moment before the stop.
                live.put(poisoned);
                return;
            }
        };
        let vault_id = old.vault_id();
        // Dropping joins the vault's threads: off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        // Poisoned again soon after a reopen (the disk is still full):
        // wait before opening again, longer each time.
        match reopened_at {
            Some(at) if at.elapsed() < Duration::from_secs(60) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            _ => delay = Duration::from_secs(1),
        }
        loop {
            let attempt = reopen.clone();
            match tokio::task::spawn_blocking(move || attempt.attempt(vault_id)).await {
                Ok(Ok(vault)) => {
                    tracing::info!(
                        entries = vault.durable_len(),
                        "vault opened again: requests are served"
                    );
                    live.put(Arc::new(vault));
                    reopened_at = Some(Instant::now());
                    break;
                }
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    retry_in_secs = delay.as_secs(),
                    "opening the vault again failed"
                ),
                Err(e) => tracing::error!(error = %e, "opening the vault again panicked"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secrets rotated to are kept per vault, the latest four, and
    /// wiped when its vault's server stops; another vault's stay.
    #[test]
    fn a_rotated_secret_is_kept_per_vault_until_its_server_stops() {
        let (a, b) = ([0xa1; 16], [0xb2; 16]);
        let held = |id| rotated_secrets(id).len();
        let of_a = || -> Vec<Vec<u8>> {
            let rotated = ROTATED.lock().unwrap_or_else(PoisonError::into_inner);
            rotated
                .iter()
                .filter(|(id, _, _)| *id == a)
                .map(|(_, _, s)| s.to_vec())
                .collect()
        };
        for secret in [&b"first"[..], b"second", b"first", b"3", b"4", b"5"] {
            rotated_to(a, SecretKind::Passphrase, secret);
        }
        rotated_to(b, SecretKind::Passphrase, b"other");
        // The latest four, each once, the one noted again moved last.
        assert_eq!(of_a(), [&b"first"[..], b"3", b"4", b"5"]);
        assert_eq!(held(a), 4);
        drop(Forget(a));
        assert_eq!(held(a), 0);
        assert_eq!(held(b), 1);
        forget_rotated(b);
        assert_eq!(held(b), 0);
    }
}
