//! Failpoints of `vaultd`, for the crash harness (tests/crash).
//!
//! They are compiled in only with the `failpoints` feature, which only the
//! test build turns on; in any other build every failpoint is nothing and
//! `FINTRUST_FAILPOINTS` is ignored with a warning.
//!
//! `FINTRUST_FAILPOINTS="name=actions;name=actions"` arms failpoints at
//! start, in the `fail` crate's syntax: `reply::redeem=20*off->panic`
//! lets 20 redemptions through and crashes at the 21st. Once one is
//! armed, any panic aborts the process, so a `panic` action is a crash at
//! exactly that step (not the end of one task that the runtime survives).
//!
//! | failpoint | where |
//! |---|---|
//! | `reply::append`, `reply::append_batch`, `reply::event`, `reply::mint` | the vault answered (the write is durable); the reply frame is not sent yet |
//! | `reply::redeem` | the token is spent and the segment read; not sent yet |
//! | `reply::authorize` | the decision is audited and the token minted; the HTTP response is not sent yet |
//! | `serve::open` | `vaultd serve` is about to open the vault (a `sleep` stands for the open of a large one) |
//!
//! and the storage engine's, at each step of a commit (`commit::*`,
//! `index::*`: storage/src/vault.rs), whose `return` action is a failed
//! write or fsync.

/// The variable that arms failpoints.
pub const ENV: &str = "FINTRUST_FAILPOINTS";

/// Arms the failpoints named in [`ENV`]; returns how many.
pub fn arm_from_env() -> Result<usize, String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(0);
    };
    arm(&spec)
}

#[cfg(feature = "failpoints")]
fn arm(spec: &str) -> Result<usize, String> {
    let mut n = 0;
    for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, actions) = item
            .split_once('=')
            .ok_or_else(|| format!("{ENV}: {item:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| format!("{ENV}: {name}: {e}"))?;
        n += 1;
    }
    if n > 0 {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("failpoint: {info}; aborting");
            std::process::abort();
        }));
    }
    Ok(n)
}

#[cfg(not(feature = "failpoints"))]
fn arm(_spec: &str) -> Result<usize, String> {
    tracing::warn!("{ENV} is ignored: this build has no failpoints");
    Ok(0)
}

/// The failpoint `reply::{op}`, evaluated just before a reply is sent.
pub fn before_reply(op: &str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(&format!("reply::{op}"));
    #[cfg(not(feature = "failpoints"))]
    let _ = op;
}

/// The failpoint `serve::open`, evaluated just before `vaultd serve`
/// opens its vault.
pub fn before_open() {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("serve::open");
}
