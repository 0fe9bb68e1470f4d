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
//! - during the setup, lets the step under way finish, so that a
//!   credential being made is known to the clean-up; the run then stops
//!   and cleans up;
//! - during the measurement, ends it, and the run cleans up;
//! - while the setup finishes after one, or during the clean-up, stops
//!   the run at once, without the rest of the clean-up.
//!
//! A run that stops before its clean-up is done (or whose clean-up fails)
//! ends with an error that names what is left on the server, for
//! `vault-admin`; so does a run killed outright, which says nothing but
//! leaves what it made under its name.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use client::{Client, ClientConfig};
use futures_util::future::BoxFuture;

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
        let left = Left {
            name: &name,
            made: &made,
            cut_short: interrupts.seen() >= 2,
        };
        let cleaned = if left.cut_short {
            Err(left.error("clean up: it was interrupted twice"))
        } else {
            interrupts
                .unless_interrupted(clean_up(config, &left))
                .await
                .unwrap_or_else(|| Err(left.error("finish its clean-up: it was interrupted")))
        };
        cleaned_up(measured, cleaned)
    }
}

/// What a run made, as its clean-up error tells it.
struct Left<'a> {
    name: &'a str,
    made: &'a [String],
    /// Whether the setup was stopped in the middle of a step, which may
    /// have made a credential whose id the run never got.
    cut_short: bool,
}

impl Left<'_> {
    /// The run could not `what`: what to revoke and shred by hand.
    fn error(&self, what: &str) -> Error {
        let mut credentials = match self.made {
            [] => "none was made".to_string(),
            ids => ids.join(", "),
        };
        if self.cut_short {
            credentials += &format!(
                "; one being made when it stopped is named {} or {CREDENTIAL_NAME}, \
                 see vault-admin credentials list",
                self.name
            );
        }
        Error::Usage(format!(
            "the run could not {what}: revoke its credentials ({credentials}) and shred the \
             subject {}, with vault-admin",
            self.name
        ))
    }
}

/// Revokes the credentials `left.made` and shreds the subject
/// `left.name`: each is tried, and the first failure reported, naming
/// what is left for the operator.
async fn clean_up(config: &ClientConfig, left: &Left<'_>) -> Result<()> {
    let admin = Client::connect(config.clone())
        .await
        .map_err(|e| left.error(&format!("clean up ({e})")))?;
    let mut first = None;
    for id in left.made {
        if let Err(e) = admin.revoke_credential(id.as_str()).await {
            first = first.or(Some(left.error(&format!("revoke {id} ({e})"))));
        }
    }
    match admin.shred(left.name).await {
        Ok(_)
        | Err(client::ClientError::Server {
            code: client::ErrorCode::NotFound,
            ..
        }) => {}
        Err(e) => first = first.or(Some(left.error(&format!("shred its subject ({e})")))),
    }
    first.map_or(Ok(()), Err)
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

/// Where a run's interrupts come from (Ctrl-C, or a test's), and how many
/// it has seen.
#[derive(Clone)]
pub(super) struct Interrupts {
    next: Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    seen: Arc<AtomicUsize>,
}

impl Interrupts {
    /// Ctrl-C. Where its handler cannot be installed, no interrupt comes.
    fn ctrl_c() -> Interrupts {
        Interrupts::from_fn(|| {
            Box::pin(async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        })
    }

    /// Interrupts that come when the futures `next` makes resolve, one
    /// future per interrupt awaited.
    fn from_fn(next: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static) -> Interrupts {
        Interrupts {
            next: Arc::new(next),
            seen: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many interrupts have come.
    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// `work`'s output, or `None` when an interrupt comes first.
    async fn unless_interrupted<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            done = work => Some(done),
            () = (self.next)() => {
                self.seen.fetch_add(1, Ordering::SeqCst);
                None
            }
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
    use std::sync::Mutex;
    use std::time::Duration;

    /// Interrupts at the given times after the start (paused time), as
    /// Ctrl-C would come: each one seen by the future awaited when it
    /// comes; none after the last.
    fn at(ms: &[u64]) -> Interrupts {
        let start = tokio::time::Instant::now();
        let due = Arc::new(Mutex::new(ms.to_vec()));
        Interrupts::from_fn(move || {
            let due = due.clone();
            Box::pin(async move {
                let next = due.lock().ok().and_then(|d| d.first().copied());
                let Some(ms) = next else {
                    return std::future::pending().await;
                };
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                if let Ok(mut d) = due.lock() {
                    d.retain(|&m| m != ms);
                }
            })
        })
    }

    const HOUR: Duration = Duration::from_secs(3600);

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
    /// and then the clean-up is skipped ([`Remote::finish`] reads
    /// [`Interrupts::seen`]).
    #[tokio::test(start_paused = true)]
    async fn a_second_interrupt_stops_a_setup_that_does_not_finish() {
        let started = tokio::time::Instant::now();
        let interrupts = at(&[10, 20]);
        let r = interrupts
            .until(
                async {
                    tokio::time::sleep(HOUR).await;
                    Ok(())
                },
                |()| async { Ok(()) },
            )
            .await;
        assert!(r.is_err_and(|e| e.to_string().contains("twice")));
        assert!(started.elapsed() < HOUR, "it did not wait for the setup");
        assert_eq!(interrupts.seen(), 2);
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

    /// What a run leaves is named: its credentials, or that it made none,
    /// and its subject.
    #[test]
    fn what_is_left_is_named() {
        let made = ["partner-1".to_string(), "gateway-2".to_string()];
        let told = Left {
            name: "vault-bench-0a",
            made: &made,
            cut_short: false,
        }
        .error("finish its clean-up")
        .to_string();
        assert!(
            told.contains("could not finish its clean-up")
                && told.contains("partner-1, gateway-2")
                && told.contains("shred the subject vault-bench-0a")
                && !told.contains("being made"),
            "{told}"
        );
        let none = Left {
            name: "vault-bench-0b",
            made: &[],
            cut_short: true,
        }
        .error("clean up")
        .to_string();
        assert!(
            none.contains(
                "none was made; one being made when it stopped is named \
                 vault-bench-0b or vault-bench"
            ),
            "{none}"
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
