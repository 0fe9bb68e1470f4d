//! Runs against a running `vaultd` (`--addr`): what `redeem` and
//! `authorize` share.
//!
//! A remote run connects as an admin (`Remote::connect`) and makes what
//! it needs on the server under a name of its own, `vault-bench-` and 12
//! random hex digits, pushing the id of each credential it makes to
//! `Remote::made` as soon as it is made. After the measurement,
//! `Remote::finish` revokes those credentials and shreds the subject of
//! that name (which has no key, and so nothing to shred, when the run
//! stopped before its record), whether the run succeeded, failed or was
//! interrupted, so that nothing the run made can be used or read again.
//! Its entries stay in the log, as every entry does.
//!
//! Ctrl-C (`Interrupts::until`, `Remote::finish`):
//!
//! - during the setup, lets the setup finish, so that a credential being
//!   made is known to the clean-up; the run then stops and cleans up;
//! - during the measurement, ends it, and the run cleans up;
//! - while the setup finishes after one, or during the clean-up, stops
//!   the run at once, without the rest of the clean-up.
//!
//! A run that stops before its clean-up is done (or whose clean-up fails)
//! ends with an error that names what is left on the server, for
//! `vault-admin`; a run killed outright says nothing, but leaves what it
//! made under its name. Ctrl-C is read by one listener for the whole
//! process, from the connection on, so that no press is lost between two
//! steps; after the clean-up, it also ends the baselines run beside a
//! remote run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use client::{Client, ClientConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use super::{scratch, TargetInfo};
use crate::{Error, Result};

/// The name of the gateway credential a `redeem` run makes (its partner
/// credential has the run's name).
pub const CREDENTIAL_NAME: &str = "vault-bench";

/// A run against a running `vaultd`: its admin connection, its name, and
/// what it has made so far.
pub(super) struct Remote<'c> {
    config: &'c ClientConfig,
    /// The admin's connection, for the setup.
    pub(super) admin: Client,
    /// `vault-bench-<hex>`: the subject's id, and the partner's.
    pub(super) name: String,
    /// The ids of the credentials made so far.
    pub(super) made: Vec<String>,
    /// Ctrl-C, for [`Interrupts::until`] and the clean-up.
    pub(super) interrupts: Interrupts,
}

impl<'c> Remote<'c> {
    /// Connects to the `vaultd` of `config` as the admin whose key it holds
    /// (`workload` names the run in the refusal of another role's key), and
    /// draws the run's name.
    pub(super) async fn connect(config: &'c ClientConfig, workload: &str) -> Result<Remote<'c>> {
        let admin = Client::connect(config.clone()).await?;
        if admin.role() != "admin" {
            return Err(Error::Usage(format!(
                "{workload} --addr takes an admin's API key (this one is a {}'s): the run makes \
                 credentials and a subject of its own, then revokes and shreds them",
                admin.role()
            )));
        }
        let mut bytes = [0u8; 6];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| Error::Usage(format!("no randomness for the run's names: {e}")))?;
        Ok(Remote {
            config,
            admin,
            name: format!("vault-bench-{}", hex::encode(bytes)),
            made: Vec::new(),
            interrupts: Interrupts::ctrl_c(),
        })
    }

    /// Cleans up after the run whose result is `measured` (see the module
    /// docs), on a connection of its own (the setup's may have idled out
    /// meanwhile), unless a second interrupt came while the setup
    /// finished; an interrupt during the clean-up stops it. The result is
    /// the run's, with the clean-up's failure, which says what is left on
    /// the server, added to it.
    pub(super) async fn finish<U>(self, measured: Result<U>) -> Result<U> {
        let Remote {
            config,
            admin,
            name,
            made,
            interrupts,
        } = self;
        drop(admin);
        let mut left = Left {
            name,
            made,
            shredded: false,
            cut_short: interrupts.seen() >= 2,
        };
        let cleaned = if left.cut_short {
            Err(left.error("clean up: it was interrupted twice"))
        } else {
            match interrupts
                .unless_interrupted(clean_up(config, &mut left))
                .await
            {
                Some(cleaned) => cleaned,
                None => Err(left.error("finish its clean-up: it was interrupted")),
            }
        };
        cleaned_up(measured, cleaned)
    }
}

/// What a run made and has not undone yet, as its clean-up error tells
/// it.
struct Left {
    /// The run's name: its subject's id.
    name: String,
    /// The credentials not revoked yet.
    made: Vec<String>,
    /// Whether the subject was shredded (or had nothing to shred).
    shredded: bool,
    /// Whether the setup was stopped in the middle, which may have made a
    /// credential whose id the run never got.
    cut_short: bool,
}

impl Left {
    /// The run could not `what`: what to revoke and shred by hand.
    fn error(&self, what: &str) -> Error {
        let mut todo = Vec::new();
        if !self.made.is_empty() {
            todo.push(format!("revoke its credentials {}", self.made.join(", ")));
        }
        if self.cut_short {
            todo.push(format!(
                "revoke any credential named {} or {CREDENTIAL_NAME} that it may have made as \
                 it stopped (vault-admin credentials list)",
                self.name
            ));
        }
        if !self.shredded {
            todo.push(format!("shred the subject {}", self.name));
        }
        Error::Usage(format!(
            "the run could not {what}: {}, with vault-admin",
            todo.join("; ")
        ))
    }
}

/// Revokes the credentials `left.made` and shreds the subject
/// `left.name`, taking each from `left` once done: each is tried, and the
/// first failure reported, naming what is left for the operator (as
/// `left` does when the clean-up stops midway).
async fn clean_up(config: &ClientConfig, left: &mut Left) -> Result<()> {
    let admin = Client::connect(config.clone())
        .await
        .map_err(|e| left.error(&format!("clean up ({e})")))?;
    let mut first = None;
    for id in std::mem::take(&mut left.made) {
        if let Err(e) = admin.revoke_credential(id.as_str()).await {
            first = first.or(Some(format!("revoke {id} ({e})")));
            left.made.push(id);
        }
    }
    match admin.shred(left.name.as_str()).await {
        Ok(_)
        | Err(client::ClientError::Server {
            code: client::ErrorCode::NotFound,
            ..
        }) => left.shredded = true,
        Err(e) => first = first.or(Some(format!("shred its subject ({e})"))),
    }
    first.map_or(Ok(()), |what| Err(left.error(&what)))
}

/// A remote run's result after its clean-up: the clean-up's failure,
/// which says what is left on the server, is not lost to the run's own.
fn cleaned_up<T>(measured: Result<T>, cleaned: Result<()>) -> Result<T> {
    match (measured, cleaned) {
        (Ok(m), Ok(())) => Ok(m),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
        (Err(run), Err(clean)) => Err(Error::Usage(format!("{run}; then {clean}"))),
    }
}

/// A run's interrupts: the presses of Ctrl-C (or a test's), counted as
/// they come by one listener, and how many of them the run has taken.
#[derive(Clone)]
pub(super) struct Interrupts {
    shared: Arc<Presses>,
}

#[derive(Default)]
struct Presses {
    pressed: AtomicUsize,
    seen: AtomicUsize,
    changed: Notify,
}

impl Interrupts {
    /// Presses of Ctrl-C (SIGINT), and SIGTERM (a `kill`, a CI job's
    /// timeout, systemd), from now on, for the rest of the process: each
    /// is an interrupt, so that a run stopped either way still revokes
    /// what it made on the server. Where a handler cannot be installed,
    /// none come of it.
    fn ctrl_c() -> Interrupts {
        let interrupts = Interrupts::none();
        for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
            if let Ok(mut signals) = signal(kind) {
                let presses = interrupts.clone();
                tokio::spawn(async move {
                    while signals.recv().await.is_some() {
                        presses.press();
                    }
                });
            }
        }
        interrupts
    }

    /// Interrupts that come only from [`Interrupts::press`].
    fn none() -> Interrupts {
        Interrupts {
            shared: Arc::new(Presses::default()),
        }
    }

    /// One more interrupt.
    fn press(&self) {
        self.shared.pressed.fetch_add(1, Ordering::SeqCst);
        self.shared.changed.notify_waiters();
    }

    /// How many interrupts the run has taken.
    fn seen(&self) -> usize {
        self.shared.seen.load(Ordering::SeqCst)
    }

    /// Takes an interrupt that came and was not taken yet, if there is
    /// one.
    fn take(&self) -> bool {
        let p = &self.shared;
        p.seen
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |seen| {
                (seen < p.pressed.load(Ordering::SeqCst)).then_some(seen + 1)
            })
            .is_ok()
    }

    /// Resolves once an interrupt is taken.
    async fn next(&self) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            // Registered before the look, so that a press between the two
            // wakes it.
            changed.as_mut().enable();
            if self.take() {
                return;
            }
            changed.await;
        }
    }

    /// `work`'s output, or `None` when an interrupt comes first (or had
    /// come, untaken, before).
    pub(super) async fn unless_interrupted<T>(
        &self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            biased;
            () = self.next() => None,
            done = work => Some(done),
        }
    }

    /// A remote run's `setup` (what it makes on the server), then its
    /// `measure`, ended early by an interrupt but not in the middle of the
    /// setup: a credential being made is then known, for the clean-up to
    /// revoke, and the run stops after the setup; a second interrupt
    /// meanwhile stops it at once. The clean-up is [`Remote::finish`]'s,
    /// after this returns.
    pub(super) async fn until<T, U, S, M, F>(&self, setup: S, measure: M) -> Result<U>
    where
        S: std::future::Future<Output = Result<T>>,
        M: FnOnce(T) -> F,
        F: std::future::Future<Output = Result<U>>,
    {
        let interrupted = |when: &str| Err(Error::Usage(format!("interrupted {when}")));
        tokio::pin!(setup);
        let made = match self.unless_interrupted(&mut setup).await {
            Some(made) => made?,
            None => {
                return match self.unless_interrupted(setup).await {
                    Some(made) => made.and_then(|_| interrupted("during the setup")),
                    None => interrupted("twice, while the setup finished"),
                }
            }
        };
        match self.unless_interrupted(measure(made)).await {
            Some(measured) => measured,
            None => interrupted("during the measurement"),
        }
    }
}

/// [`scratch`] for a run against the running `vaultd` of `config`: a
/// temporary dir for the baselines run beside it, and the target as
/// [`info`] describes it.
pub(super) fn scratch_for(
    config: &ClientConfig,
) -> Result<(Option<tempfile::TempDir>, PathBuf, TargetInfo)> {
    let (tmp, dir, scratch_info) = scratch(None, "remote", false)?;
    let target = TargetInfo {
        temporary: scratch_info.temporary,
        ..info(config)
    };
    Ok((tmp, dir, target))
}

/// The running `vaultd` of `config` as a target: its address and
/// transport, no data dir of ours.
pub(super) fn info(config: &ClientConfig) -> TargetInfo {
    TargetInfo {
        kind: "remote",
        dir: String::new(),
        temporary: false,
        tls: config.tls != client::Tls::Plaintext,
        addr: Some(config.addr.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// Interrupts pressed at the given times after the start (paused
    /// time).
    fn at(ms: &[u64]) -> Interrupts {
        let interrupts = Interrupts::none();
        let (presses, ms) = (interrupts.clone(), ms.to_vec());
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for m in ms {
                tokio::time::sleep_until(start + Duration::from_millis(m)).await;
                presses.press();
            }
        });
        interrupts
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A run whose setup takes an hour ends "interrupted twice".
    async fn assert_stopped_twice_in_a_setup_of_an_hour(interrupts: &Interrupts) {
        let setup = async {
            tokio::time::sleep(HOUR).await;
            Ok(())
        };
        let r = interrupts.until(setup, |()| async { Ok(()) }).await;
        assert!(r.is_err_and(|e| e.to_string().contains("twice")));
    }

    /// An interrupt during the setup lets the setup finish (what it makes
    /// is then known to the clean-up) and skips the measurement; one
    /// during the measurement ends it; none lets both run.
    #[tokio::test(start_paused = true)]
    async fn an_interrupt_never_cuts_the_setup_short() {
        let setup_done = AtomicBool::new(false);
        let setup = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            setup_done.store(true, Ordering::SeqCst);
            Ok(7)
        };
        let measured = AtomicBool::new(false);
        let interrupts = at(&[0]);
        let r = interrupts
            .until(setup, |_| async {
                measured.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await;
        assert!(r.is_err_and(|e| e.to_string() == "interrupted during the setup"));
        assert!(setup_done.load(Ordering::SeqCst), "the setup finished");
        assert!(!measured.load(Ordering::SeqCst), "no measurement after it");
        assert_eq!(interrupts.seen(), 1);

        let r = at(&[10])
            .until(async { Ok(1) }, |_| async {
                tokio::time::sleep(HOUR).await;
                Ok(())
            })
            .await;
        assert!(r.is_err_and(|e| e.to_string() == "interrupted during the measurement"));

        let r = at(&[])
            .until(async { Ok(2) }, |n| async move { Ok(n * 10) })
            .await;
        assert!(matches!(r, Ok(20)));
    }

    /// A second interrupt while the setup finishes stops the run at once,
    /// and counts as the second ([`Remote::finish`] then skips the
    /// clean-up).
    #[tokio::test(start_paused = true)]
    async fn a_second_interrupt_stops_a_setup_that_does_not_finish() {
        let started = tokio::time::Instant::now();
        let interrupts = at(&[10, 20]);
        assert_stopped_twice_in_a_setup_of_an_hour(&interrupts).await;
        assert!(started.elapsed() < HOUR, "it did not wait for the setup");
        assert_eq!(interrupts.seen(), 2);
    }

    /// Presses that came before anyone waited, or between two waits, are
    /// not lost: each is taken by the next wait.
    #[tokio::test(start_paused = true)]
    async fn no_press_is_lost_between_waits() {
        let interrupts = Interrupts::none();
        interrupts.press();
        interrupts.press();
        assert_stopped_twice_in_a_setup_of_an_hour(&interrupts).await;
        assert_eq!(interrupts.seen(), 2);
        interrupts.press();
        assert_eq!(interrupts.unless_interrupted(async { 1 }).await, None);
        assert_eq!(interrupts.unless_interrupted(async { 2 }).await, Some(2));
        assert_eq!(interrupts.seen(), 3);
    }

    /// An interrupt during the clean-up stops it; without one it runs to
    /// its end.
    #[tokio::test(start_paused = true)]
    async fn an_interrupt_stops_the_clean_up() {
        let slow = async {
            tokio::time::sleep(HOUR).await;
            1
        };
        assert_eq!(at(&[5]).unless_interrupted(slow).await, None);
        assert_eq!(at(&[]).unless_interrupted(async { 2 }).await, Some(2));
    }

    /// What a run leaves is named: the credentials not revoked yet, one
    /// it may have made as it stopped, and its subject until shredded.
    #[test]
    fn what_is_left_is_named() {
        let mut left = Left {
            name: "vault-bench-0a".into(),
            made: vec!["partner-1".into(), "gateway-2".into()],
            shredded: false,
            cut_short: false,
        };
        let told = left.error("finish its clean-up").to_string();
        assert_eq!(
            told,
            "the run could not finish its clean-up: revoke its credentials partner-1, \
             gateway-2; shred the subject vault-bench-0a, with vault-admin"
        );
        left.made.remove(0);
        left.shredded = true;
        let told = left.error("revoke gateway-2 (closed)").to_string();
        assert!(
            told.contains("credentials gateway-2, with")
                && !told.contains("partner-1")
                && !told.contains("shred"),
            "{told}"
        );
        let cut = Left {
            name: "vault-bench-0b".into(),
            made: Vec::new(),
            shredded: false,
            cut_short: true,
        }
        .error("clean up")
        .to_string();
        assert!(
            cut.contains(
                "any credential named vault-bench-0b or vault-bench that it may have made"
            ) && cut.contains("shred the subject vault-bench-0b"),
            "{cut}"
        );
    }

    /// A remote run's failure and its clean-up's are both told.
    #[test]
    fn a_failed_clean_up_is_told_with_the_runs_failure() {
        let err = |m: &str| Err::<u8, _>(Error::Usage(m.into()));
        assert!(matches!(cleaned_up(Ok(1), Ok(())), Ok(1)));
        let both = cleaned_up(err("run failed"), Err(Error::Usage("left: x".into())));
        let told = both.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            told.contains("run failed") && told.contains("left: x"),
            "{told}"
        );
        let clean = cleaned_up(Ok(1), Err(Error::Usage("left: y".into())));
        assert!(clean.is_err_and(|e| e.to_string().contains("left: y")));
    }
}
