//! What the harness was told (acknowledged appends, tokens and their
//! fate), and the checks against it after each kill.

use std::collections::HashSet;
use std::fmt;

use client::{Client, ClientConfig, ErrorCode, MaskOp, Tls, Zeroizing};

use crate::{Env, Server, PARTNER, PASSPHRASE, SEEDED};

/// splitmix64: small, seedable, good enough to pick moments and choices.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An entry the server acknowledged with a receipt: an append, or a
/// key rotation (and its re-encrypted record).
#[derive(Debug, Clone)]
pub struct Acked {
    pub seq: u64,
    pub entry_hash: [u8; 32],
    /// The entry's subject (`None`: a signing key rotation, no subject).
    pub subject: Option<String>,
    /// A record's plaintext as the server encodes it (a JSON object);
    /// `None` for an entry that is not a record.
    pub plaintext: Option<Vec<u8>>,
}

/// A token the server acknowledged (minted over the protocol or granted
/// by `/v1/authorize`), and the name its redemption must reveal.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub subject: String,
    pub from_http: bool,
}

impl Token {
    /// The right answer for this token's subject: `name` revealed (and,
    /// through the shim's policy, `email` partially masked after it).
    pub fn check(&self, got: &client::Redeemed) -> Result<(), String> {
        let name = SEEDED
            .iter()
            .find(|(s, _)| *s == self.subject)
            .map(|(_, n)| *n)
            .ok_or_else(|| format!("unknown subject {}", self.subject))?;
        // The shim's policy adds `email`, partially masked; the order of
        // the fields is the policy's.
        let revealed = got
            .fields
            .iter()
            .find(|(field, _)| field == "name")
            .map(|(_, value)| value.as_str());
        let fields_ok = got.subject == self.subject
            && revealed == Some(name)
            && got.fields.len() == if self.from_http { 2 } else { 1 };
        if fields_ok {
            Ok(())
        } else {
            Err(format!(
                "token for {} revealed the wrong data: subject {:?}, {} fields",
                self.subject,
                got.subject,
                got.fields.len()
            ))
        }
    }
}

/// Everything acknowledged so far, and what became of each token.
#[derive(Debug, Default)]
pub struct Model {
    /// Acknowledged appends not yet checked offline.
    pub new_appends: Vec<Acked>,
    /// Acknowledged appends checked at least once.
    pub old_appends: Vec<Acked>,
    /// Every acknowledged seq (none may be acknowledged twice).
    pub seqs: HashSet<u64>,
    /// Tokens a partner got data for.
    pub delivered: Vec<Token>,
    /// Delivered tokens checked spent after a restart (sampled later).
    pub spent: Vec<Token>,
    /// Acknowledged tokens nobody tried to redeem.
    pub kept: Vec<Token>,
    /// Tokens whose redemption the kill cut off: outcome unknown.
    pub in_flight: Vec<Token>,
    /// The last signed head the offline check verified: every later log
    /// must still hold it (`vault-verify --head-file`'s check).
    pub kept_head: Option<storage::SignedHead>,
    pub totals: Totals,
}

/// Counts over the whole run.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub appends: u64,
    pub rotations: u64,
    pub mints: u64,
    pub authorizations: u64,
    pub redemptions: u64,
    pub rechecked_tokens: u64,
    pub cut_off: u64,
    pub cut_off_delivered_later: u64,
}

impl Model {
    /// An acknowledged append.
    pub fn acked(&mut self, a: Acked) -> Result<(), String> {
        self.totals.appends += 1;
        self.entry(a)
    }

    /// A key rotation's entry (or its re-encrypted record).
    pub fn rotated(&mut self, a: Acked) -> Result<(), String> {
        self.totals.rotations += 1;
        self.entry(a)
    }

    /// An acknowledged entry, to be checked offline after the next kill.
    fn entry(&mut self, a: Acked) -> Result<(), String> {
        if !self.seqs.insert(a.seq) {
            return Err(format!("seq {} was acknowledged twice", a.seq));
        }
        self.new_appends.push(a);
        Ok(())
    }

    pub fn totals(&self) -> String {
        let t = &self.totals;
        format!(
            "{} appends, {} key rotations, {} mints, {} authorizations, {} redemptions acknowledged; {} token redemptions cut off by a kill ({} of them delivered after the restart); {} tokens rechecked after restarts",
            t.appends,
            t.rotations,
            t.mints,
            t.authorizations,
            t.redemptions,
            t.cut_off,
            t.cut_off_delivered_later,
            t.rechecked_tokens
        )
    }
}

/// A plaintext client config for `key`.
pub fn config(addr: &str, key: &str) -> ClientConfig {
    ClientConfig {
        addr: addr.to_string(),
        tls: Tls::Plaintext,
        api_key: Zeroizing::new(key.to_string()),
        client_name: "crash harness".into(),
        timeout: std::time::Duration::from_secs(20),
    }
}

/// Redeems tokens a connection each, as a partner does, many at once so
/// that the server's group commit shares a flush among them, and keeps
/// the server's brute-force throttle out of the way: once five
/// redemptions in a row from a peer were refused (the rechecks of spent
/// tokens are refusals on purpose), it delays that peer's next one, and a
/// success forgives it. Redemptions that may be refused go four at a
/// time, and a freshly minted token's redemption comes between two such
/// groups (after five, it would wait out the delay, 50 ms each time).
struct Redeemer<'a> {
    server: &'a Server,
    env: &'a Env,
    gateway: Client,
    /// Refusals since the last redemption known to have come after them
    /// all (counted high: the server may have seen a group's success
    /// before its refusals).
    refusals_in_a_row: usize,
    rng: &'a mut Rng,
}

/// Refusals in a row after which the server delays a peer's redemptions.
const THROTTLE_FREE_REFUSALS: usize = 5;

/// Redemptions in flight at once when none should be refused.
const IN_FLIGHT: usize = 16;

impl Redeemer<'_> {
    /// Redeems each of `tokens` once, the results in the same order.
    /// `may_refuse`: some are expected to be refused.
    async fn redeem_all(
        &mut self,
        tokens: &[&Token],
        may_refuse: bool,
    ) -> Result<Vec<client::Result<client::Redeemed>>, String> {
        let group = if may_refuse {
            THROTTLE_FREE_REFUSALS - 1
        } else {
            IN_FLIGHT
        };
        let mut results = Vec::with_capacity(tokens.len());
        for chunk in tokens.chunks(group) {
            let may_add = if may_refuse { chunk.len() } else { 0 };
            if self.refusals_in_a_row + may_add >= THROTTLE_FREE_REFUSALS {
                self.forgive().await?;
            }
            let got = futures_util::future::join_all(chunk.iter().map(|t| self.redeem(t))).await;
            let mut refused = 0;
            for r in got {
                let r = r?;
                refused += usize::from(r.is_err());
                results.push(r);
            }
            // All succeeded: the last one the server saw forgave the
            // peer. Otherwise count every refusal, as if they came last.
            self.refusals_in_a_row = if refused == 0 {
                0
            } else {
                self.refusals_in_a_row + refused
            };
        }
        Ok(results)
    }

    async fn redeem(&self, t: &Token) -> Result<client::Result<client::Redeemed>, String> {
        match Client::connect(config(&self.server.protocol, &self.env.partner)).await {
            Ok(c) => Ok(c.redeem(&t.token).await),
            Err(e) => Err(format!("connect as the partner: {e}")),
        }
    }

    /// Mints a token and redeems it: must give the right data.
    async fn forgive(&mut self) -> Result<(), String> {
        let t = mint_seeded(&self.gateway, self.rng)
            .await
            .map_err(|e| format!("mint after a restart: {e}"))?;
        let got = self
            .redeem(&t)
            .await?
            .map_err(|e| format!("redeem a fresh token after a restart: {e}"))?;
        t.check(&got)?;
        self.refusals_in_a_row = 0;
        Ok(())
    }
}

/// Mints a token (name revealed, 10 minutes) for a random seeded subject,
/// as the gateway `c`.
pub async fn mint_seeded(c: &Client, rng: &mut Rng) -> client::Result<Token> {
    let subject = SEEDED[rng.below(SEEDED.len() as u64) as usize].0;
    let (token, _) = c
        .mint(
            PARTNER,
            subject,
            "kyc",
            vec![("name".into(), MaskOp::Reveal)],
            600,
        )
        .await?;
    Ok(Token {
        token: token.to_string(),
        subject: subject.to_string(),
        from_http: false,
    })
}

fn is_spent(r: &client::Result<client::Redeemed>) -> bool {
    matches!(r, Err(e) if e.server_code() == Some(ErrorCode::TokenSpent))
}

/// What [`check_tokens`] did.
#[derive(Debug)]
pub struct TokenCheck {
    spent: usize,
    kept: usize,
    cut_off: usize,
    cut_off_delivered: usize,
}

impl fmt::Display for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} delivered tokens were spent, {} kept tokens gave their data once, {} cut-off redemptions resolved ({} gave data now)",
            self.spent, self.kept, self.cut_off, self.cut_off_delivered
        )
    }
}

/// After a restart: every token delivered in the last cycle (and a
/// sample of older ones) is spent, kept tokens give their data once,
/// cut-off ones at most once.
pub async fn check_tokens(
    env: &Env,
    server: &Server,
    model: &mut Model,
    rng: &mut Rng,
) -> Result<TokenCheck, String> {
    let mut recheck = std::mem::take(&mut model.delivered);
    let fresh = recheck.len();
    for _ in 0..model.spent.len().min(10) {
        let i = rng.below(model.spent.len() as u64) as usize;
        recheck.push(model.spent[i].clone());
    }
    let gateway = Client::connect(config(&server.protocol, &env.gateway))
        .await
        .map_err(|e| format!("connect as the gateway after a restart: {e}"))?;
    let mut p = Redeemer {
        server,
        env,
        gateway,
        refusals_in_a_row: 0,
        rng,
    };
    for r in p.redeem_all(&refs(&recheck), true).await? {
        if !is_spent(&r) {
            return Err(format!(
                "a token delivered before a kill was not spent after the restart: {}",
                describe(&r)
            ));
        }
    }
    model.totals.rechecked_tokens += recheck.len() as u64;
    recheck.truncate(fresh);
    model.spent.extend(recheck);

    let kept = std::mem::take(&mut model.kept);
    for (t, r) in kept.iter().zip(p.redeem_all(&refs(&kept), false).await?) {
        match r {
            Ok(got) => t.check(&got)?,
            Err(e) => {
                return Err(format!(
                    "an acknowledged token never redeemed was lost in a kill ({}): {e}",
                    if t.from_http { "authorize" } else { "mint" }
                ))
            }
        }
    }

    // A cut-off redemption may have spent its token, or not.
    let cut = std::mem::take(&mut model.in_flight);
    let mut delivered = Vec::new();
    for (t, r) in cut.iter().zip(p.redeem_all(&refs(&cut), true).await?) {
        match &r {
            Ok(got) => {
                t.check(got)?;
                delivered.push(t);
            }
            _ if is_spent(&r) => {}
            _ => {
                return Err(format!(
                    "a token whose redemption was cut off is {}",
                    describe(&r)
                ))
            }
        }
    }
    let delivered_now = delivered.len();

    // Every token that gave its data now is spent.
    let again: Vec<&Token> = kept.iter().chain(delivered).collect();
    for r in p.redeem_all(&again, true).await? {
        if !is_spent(&r) {
            return Err(format!(
                "a token gave its data and was then {}",
                describe(&r)
            ));
        }
    }
    model.spent.extend(kept.iter().cloned());
    model.spent.extend(cut.iter().cloned());
    model.totals.cut_off_delivered_later += delivered_now as u64;
    Ok(TokenCheck {
        spent: fresh,
        kept: kept.len(),
        cut_off: cut.len(),
        cut_off_delivered: delivered_now,
    })
}

fn refs(tokens: &[Token]) -> Vec<&Token> {
    tokens.iter().collect()
}

fn describe(r: &client::Result<client::Redeemed>) -> String {
    match r {
        Ok(got) => format!("redeemed again (data for {})", got.subject),
        Err(e) => format!("refused: {e}"),
    }
}

/// With the server down: the log verifies from genesis with the pinned
/// key and still holds the head the last check verified, every new
/// acknowledged append (and a sample of older ones) is there unchanged,
/// and the derived state equals a rebuild. Returns the number of entries.
pub fn check_offline(env: &Env, model: &mut Model, rng: &mut Rng) -> Result<u64, String> {
    use storage::{Options, Unlock, Vault, VerifyOptions};
    let report = storage::verify(
        &env.dir,
        &VerifyOptions {
            public_key: Some(env.public_key),
            progress: None,
            total_hint: None,
            kept_head: model.kept_head,
            verified_prefix: None,
        },
    )
    .map_err(|e| format!("verify could not run: {e}"))?;
    if let Some(f) = &report.failure {
        return Err(format!("the log does not verify after a kill: {f:?}"));
    }
    model.kept_head = report.signed_head;
    let vault = Vault::open(
        &env.dir,
        &Unlock::passphrase(PASSPHRASE.to_vec()),
        Options::default(),
    )
    .map_err(|e| format!("the vault does not open after a kill: {e}"))?;
    let mut check: Vec<Acked> = std::mem::take(&mut model.new_appends);
    let fresh = check.len();
    for _ in 0..model.old_appends.len().min(200) {
        let i = rng.below(model.old_appends.len() as u64) as usize;
        check.push(model.old_appends[i].clone());
    }
    let durable = vault.durable_len();
    for a in &check {
        if a.seq >= durable {
            return Err(format!(
                "acknowledged seq {} is past the log's end ({durable} entries): lost",
                a.seq
            ));
        }
        let entry = vault
            .entry(a.seq)
            .map_err(|e| format!("read entry {}: {e}", a.seq))?
            .ok_or_else(|| format!("acknowledged entry {} is gone", a.seq))?;
        let subject_differs = a.subject.as_ref().is_some_and(|s| *s != entry.subject);
        if entry.hash != a.entry_hash || subject_differs {
            return Err(format!(
                "entry {} is not the one acknowledged (hash or subject differs)",
                a.seq
            ));
        }
        let Some(plaintext) = &a.plaintext else {
            continue;
        };
        let record = vault
            .record_at(a.seq)
            .map_err(|e| format!("read record {}: {e}", a.seq))?
            .ok_or_else(|| format!("record {} is gone", a.seq))?;
        if record.plaintext.as_slice() != plaintext.as_slice() {
            return Err(format!(
                "record {} does not hold the acknowledged plaintext",
                a.seq
            ));
        }
    }
    let derived = vault
        .check_derived_state()
        .map_err(|e| format!("rebuild the derived state: {e}"))?;
    if derived.differences != 0 {
        return Err(format!(
            "the derived state differs from a rebuild from the log: {:?}",
            derived.sample
        ));
    }
    vault.close().map_err(|e| format!("close: {e}"))?;
    wait_unlocked(&env.dir)?;
    check.truncate(fresh);
    model.old_appends.extend(check);
    Ok(report.entries)
}

/// Waits until sled's threads of a closed vault let go of its lock.
fn wait_unlocked(dir: &std::path::Path) -> Result<(), String> {
    let f = std::fs::File::open(dir.join("db").join("db")).map_err(|e| e.to_string())?;
    f.lock().map_err(|e| e.to_string())
}
