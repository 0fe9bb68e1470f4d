//! Random rounds of concurrent requests against one vault, checked
//! against what the vault acknowledged: batches of records (of known
//! subjects, of new ones, of a shredded one, which refuses the batch after
//! its new keys are made), shreds, subject key rotations with and without
//! re-encryption, signing and master key rotations, consents granted and
//! revoked, the partner's policy changed, and tokens minted and redeemed,
//! with the vault closed and opened again after some rounds;
//! under small key caches, small per-key limits and small commit groups,
//! so that groups mix requests, caches empty, keys rotate by themselves
//! and requests are rolled back within groups.
//!
//! At each reopen and at the end, before and after it: the log verifies
//! with the pinned key; every receipt names its entry; no record of a
//! subject is acknowledged after its shred, and a batch refused as holding
//! a shredded subject holds one; each subject's latest record
//! is its acknowledged one with the highest seq (a re-encryption copies
//! the one before it); the key status is what a reopen rebuilds from the
//! log, and no key passes the limit; the derived state equals a rebuild;
//! a token redeemed once is spent; a token is redeemed only while its
//! subject's consent (where there is one) is in force and the partner's
//! policy (where there is one) allows it (its purposes and fields, and its
//! hours and source networks for a redemption at midnight UTC from an
//! unknown address), and is refused for the first of
//! the two that does not, as the model has them when no request of the
//! round changes either; the vault's consents and policy are the latest
//! acknowledged changes.
//!
//! A round in five runs with a failpoint armed to fail with an I/O error
//! after a random number of passes, once or until the vault is closed (any
//! of `storage::vault::FAILPOINTS`: a step of a commit, a checkpoint, the
//! writer's move of held-back chunks, the indexer's write), under small
//! write-ahead segments and derived state written after every few
//! entries, so that each is reached. A request of that round may then
//! fail with an I/O error or `Poisoned` (its outcome unknown), and only
//! with those; the vault is closed (which may fail too) and opened again,
//! with whichever secret opens it, and then: the log verifies; every
//! acknowledged write is at its seq; every write in the log that was not
//! acknowledged is one of a request whose outcome was unknown, a batch's
//! records all there or none; the model takes what the log holds and the
//! checks above hold; a token delivered is spent, a token whose
//! redemption was cut off redeems at most once, and writes go on.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use storage::vault::FAILPOINTS;
use storage::{verify, Append, Error, Kind, Options, TokenRefusal, Unlock, Vault, VerifyOptions};
use zeroize::Zeroizing;

mod common;
use common::scratch_dir;

const SUBJECTS: u8 = 5;

#[derive(Debug, Clone, Copy)]
enum Item {
    Known(u8),
    New,
    Shredded,
}

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<Item>),
    Shred(u8),
    Rotate(u8, bool),
    RotateSigning,
    /// To a key file of these bytes.
    RotateMaster(u8),
    MintRedeem(u8),
    /// The subject's consent for partner `p`: granted for purpose `x`
    /// (`Some(true)`, the purpose tokens are minted for), for `y` only
    /// (`Some(false)`), or revoked (`None`).
    Consent(u8, Option<bool>),
    /// Partner `p`'s policy ([`policy`]): one that allows its tokens, or
    /// one that does not in one of five ways.
    Policy(u8),
}

/// Kinds of [`Op::Policy`].
const POLICIES: u8 = 6;

/// The policy of an [`Op::Policy`]: `x` revealing `a` (what tokens are
/// minted for), the partner inactive, only purpose `y`, `a` redacted,
/// redemptions allowed only from 01:00 to 02:00 UTC (the model redeems at
/// `now_ms` 0, midnight), or only from 10.0.0.0/8 (it redeems from an
/// unknown source).
fn policy(n: u8) -> serde_json::Value {
    let allowed = serde_json::json!({"x": {"fields": {"a": "reveal"}}});
    let p = match n % POLICIES {
        0 => serde_json::json!({"purposes": allowed}),
        1 => serde_json::json!({"active": false, "purposes": allowed}),
        2 => serde_json::json!({"purposes": {"y": {"fields": {"a": "reveal"}}}}),
        3 => serde_json::json!({"purposes": {"x": {"fields": {"a": "redact"}}}}),
        4 => serde_json::json!({"purposes": allowed, "allowed_hours_utc": [1, 2]}),
        _ => serde_json::json!({"purposes": allowed, "source_ips": ["10.0.0.0/8"]}),
    };
    serde_json::json!({"partner_id": "p", "policy": p})
}

/// What the policy of an [`Op::Policy`] does to the model's redemptions:
/// nothing, or its refusal.
fn policy_refusal(n: u8) -> Option<TokenRefusal> {
    match n % POLICIES {
        0 => None,
        1..=3 => Some(TokenRefusal::PolicyChanged),
        4 => Some(TokenRefusal::OutsideAllowedHours),
        _ => Some(TokenRefusal::SourceNotAllowed),
    }
}

/// A failpoint armed for one round: after `after` passes it fails with an
/// I/O error, once or (`sticky`) every time until the vault is closed.
#[derive(Debug, Clone)]
struct Fault {
    point: &'static str,
    after: u32,
    sticky: bool,
}

#[derive(Debug, Clone)]
struct Case {
    key_cache: usize,
    limit: u64,
    group_entries: usize,
    index_batch: u64,
    wal_segment_bytes: u64,
    /// Each round's requests, whether the vault is closed and opened
    /// again after it, and the fault armed while it runs.
    rounds: Vec<(Vec<Op>, bool, Option<Fault>)>,
}

fn op() -> impl Strategy<Value = Op> {
    let item = prop_oneof![
        6 => (0..SUBJECTS).prop_map(Item::Known),
        2 => Just(Item::New),
        1 => Just(Item::Shredded),
    ];
    prop_oneof![
        8 => proptest::collection::vec(item, 1..5).prop_map(Op::Batch),
        1 => (0..SUBJECTS).prop_map(Op::Shred),
        2 => (0..SUBJECTS, any::<bool>()).prop_map(|(s, r)| Op::Rotate(s, r)),
        1 => Just(Op::RotateSigning),
        1 => any::<u8>().prop_map(Op::RotateMaster),
        2 => (0..SUBJECTS).prop_map(Op::MintRedeem),
        1 => (0..SUBJECTS, proptest::option::of(any::<bool>())).prop_map(|(s, c)| Op::Consent(s, c)),
        1 => (0..POLICIES).prop_map(Op::Policy),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    (
        proptest::sample::select(FAILPOINTS),
        0u32..6,
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(point, after, sticky)| Fault {
            point,
            after,
            sticky,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(1usize), Just(2), Just(100_000)],
        2u64..6,
        prop_oneof![Just(4usize), Just(16), Just(1024)],
        prop_oneof![Just(1u64), Just(8), Just(1_000_000)],
        prop_oneof![Just(512u64), Just(4096), Just(64 << 20)],
        proptest::collection::vec(
            (
                proptest::collection::vec(op(), 1..9),
                proptest::bool::weighted(0.3),
                proptest::option::weighted(0.2, fault()),
            ),
            1..6,
        ),
    )
        .prop_map(
            |(key_cache, limit, group_entries, index_batch, wal_segment_bytes, rounds)| Case {
                key_cache,
                limit,
                group_entries,
                index_batch,
                wal_segment_bytes,
                rounds,
            },
        )
}

/// What an acknowledged write put in the log at its seq.
#[derive(Debug, Clone)]
enum Wrote {
    Record(Vec<u8>),
    /// The subject's latest record, appended again under its new key.
    Reencrypted,
    Shred,
}

/// Every acknowledged write: seq → (subject, what, entry hash).
type Acked = BTreeMap<u64, (String, Wrote, [u8; 32])>;

/// What one request acknowledged: its writes, and the seq of a master
/// rotation with the key file it set.
#[derive(Default)]
struct Done {
    writes: Vec<(u64, String, Wrote, [u8; 32])>,
    master: Option<(u64, u8)>,
    /// The subjects of a batch refused as holding a shredded subject.
    refused: Option<Vec<String>>,
    /// Failed with an I/O error or `Poisoned` while a fault was armed:
    /// what it writes may or may not be in the log.
    unknown: bool,
    /// A token whose redemption a fault cut off, and whether its data was
    /// delivered once already.
    cut_off: Option<(Zeroizing<String>, bool)>,
    /// An acknowledged consent change: its seq, subject, and whether it
    /// lets a token for purpose `x` be redeemed.
    consent: Option<(u64, String, bool)>,
    /// An acknowledged policy change: its seq, and its refusal of a
    /// redemption (`None`: it lets a token be redeemed).
    policy: Option<(u64, Option<TokenRefusal>)>,
}

/// The key file of a master rotation's byte: that byte between two
/// zeros, so that it is never 32 bytes of text or a line (refused as a
/// phrase).
fn key_file(b: u8) -> Unlock {
    let mut key = [b; 32];
    key[0] = 0;
    key[31] = 0;
    Unlock::key_file(&key).expect("a key file")
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// Refusals the model allows for a request whose subject another request
/// of its round may shred, or never wrote.
fn allowed(e: &Error) -> bool {
    matches!(e, Error::SubjectShredded(_) | Error::NoSuchSubject(_))
}

/// The only refusals a failed write may cause.
fn failed_write(e: &Error) -> bool {
    matches!(e, Error::Io(_) | Error::Poisoned)
}

fn subject(n: u8) -> String {
    format!("m{n}")
}

/// Runs `op`; with `faulty`, a failed write's refusal leaves its outcome
/// unknown instead of failing the case. `expect`: where no request of the
/// round changes the subject's consent or the partner's policy, what its
/// token's redemption meets: `None` redeemed, or the refusal.
async fn run_op(
    vault: Arc<Vault>,
    tag: String,
    op: Op,
    faulty: bool,
    expect: Option<Option<TokenRefusal>>,
) -> Result<Done, TestCaseError> {
    let mut done = Done::default();
    let unknown = |e: &Error| faulty && failed_write(e);
    let out = &mut done.writes;
    match op {
        Op::Batch(items) => {
            let mut names = Vec::new();
            let mut appends = Vec::new();
            for (j, item) in items.iter().enumerate() {
                let s = match item {
                    Item::Known(n) => subject(*n),
                    Item::New => format!("{tag}-new{j}"),
                    Item::Shredded => "gone".to_string(),
                };
                let plaintext = format!("{tag}/{j}").into_bytes();
                names.push((s.clone(), plaintext.clone()));
                appends.push(Append::record(s, plaintext));
            }
            let refused = items.iter().any(|i| matches!(i, Item::Shredded));
            match vault.append_batch(appends).await {
                Ok(receipts) => {
                    if refused {
                        return Err(fail(format!(
                            "{tag}: a batch with a shredded subject went in"
                        )));
                    }
                    for ((s, p), r) in names.into_iter().zip(receipts) {
                        out.push((r.seq, s, Wrote::Record(p), r.entry_hash));
                    }
                }
                Err(Error::SubjectShredded(_)) => {
                    done.refused = Some(names.into_iter().map(|(s, _)| s).collect());
                }
                Err(e) if unknown(&e) => done.unknown = true,
                Err(e) => return Err(fail(format!("{tag}: batch refused: {e}"))),
            }
        }
        Op::Shred(n) => match vault.shred(&subject(n)).await {
            Ok(r) => out.push((r.seq, subject(n), Wrote::Shred, r.entry_hash)),
            Err(e) if allowed(&e) => {}
            Err(e) if unknown(&e) => done.unknown = true,
            Err(e) => return Err(fail(format!("{tag}: shred: {e}"))),
        },
        Op::Rotate(n, reencrypt) => match vault.rotate_subject_key(&subject(n), reencrypt).await {
            Ok(r) => {
                if let Some(c) = r.reencrypted {
                    out.push((c.seq, subject(n), Wrote::Reencrypted, c.entry_hash));
                }
            }
            Err(e) if allowed(&e) => {}
            Err(e) if unknown(&e) => done.unknown = true,
            Err(e) => return Err(fail(format!("{tag}: rotate: {e}"))),
        },
        Op::RotateSigning => match vault.rotate_signing_key().await {
            Ok(_) => {}
            Err(e) if unknown(&e) => done.unknown = true,
            Err(e) => return Err(fail(format!("{tag}: signing rotation: {e}"))),
        },
        Op::RotateMaster(b) => match vault.rotate_master_key(&key_file(b)).await {
            Ok(r) => done.master = Some((r.seq, b)),
            Err(e) if unknown(&e) => done.unknown = true,
            Err(e) => return Err(fail(format!("{tag}: master rotation: {e}"))),
        },
        Op::MintRedeem(n) => {
            let fields = vec![("a".to_string(), "reveal".to_string())];
            let token = match vault.mint("p", &subject(n), "x", fields, u64::MAX).await {
                Ok(t) => t,
                Err(e) if allowed(&e) => return Ok(done),
                Err(e) if unknown(&e) => {
                    done.unknown = true;
                    return Ok(done);
                }
                Err(e) => return Err(fail(format!("{tag}: mint: {e}"))),
            };
            // The subject may be shredded before the redemption.
            match vault.redeem(&token, "p", 0, None).await {
                Ok(_) if matches!(expect, Some(Some(_))) => {
                    return Err(fail(format!("{tag}: redeemed, {expect:?} expected")))
                }
                Ok(_) | Err(Error::TokenRefused(TokenRefusal::SubjectShredded)) => {}
                Err(Error::TokenRefused(
                    r @ (TokenRefusal::ConsentRevoked
                    | TokenRefusal::PolicyChanged
                    | TokenRefusal::OutsideAllowedHours
                    | TokenRefusal::SourceNotAllowed),
                )) => {
                    prop_assert!(
                        expect.is_none() || expect == Some(Some(r)),
                        "{}: refused with {:?}, {:?} expected",
                        tag,
                        r,
                        expect
                    );
                    // Not spent: a change of this round may let it through.
                    return Ok(done);
                }
                Err(e) if unknown(&e) => {
                    done.cut_off = Some((token, false));
                    return Ok(done);
                }
                Err(e) => return Err(fail(format!("{tag}: redeem: {e}"))),
            }
            match vault.redeem(&token, "p", 0, None).await {
                Err(Error::TokenRefused(_)) => {}
                Err(e) if unknown(&e) => done.cut_off = Some((token, true)),
                other => return Err(fail(format!("{tag}: second redemption: {other:?}"))),
            }
        }
        Op::Consent(n, grant) => {
            let (kind, purposes) = match grant {
                Some(x) => (Kind::ConsentGranted, vec![if x { "x" } else { "y" }]),
                None => (Kind::ConsentRevoked, Vec::new()),
            };
            let payload = serde_json::json!({"partner_id": "p", "purposes": purposes});
            match vault
                .append(Append::event(kind, subject(n), &payload))
                .await
            {
                Ok(r) => done.consent = Some((r.seq, subject(n), grant == Some(true))),
                Err(e) if unknown(&e) => done.unknown = true,
                Err(e) => return Err(fail(format!("{tag}: consent: {e}"))),
            }
        }
        Op::Policy(n) => {
            let change = Append::event(Kind::PolicyChanged, "", &policy(n));
            match vault.append(change).await {
                Ok(r) => done.policy = Some((r.seq, policy_refusal(n))),
                Err(e) if unknown(&e) => done.unknown = true,
                Err(e) => return Err(fail(format!("{tag}: policy: {e}"))),
            }
        }
    }
    Ok(done)
}

/// What the vault's policy for partner `p` does to the model's
/// redemptions (at `now_ms` 0, from an unknown source): `None` lets them
/// through, as no policy at all does.
fn policy_now(v: &Vault) -> Result<Option<TokenRefusal>, TestCaseError> {
    use storage::state::{source_allowed, within_hours, PolicyTerms};
    let Some(stored) = v.policy("p").map_err(|e| fail(format!("policy: {e}")))? else {
        return Ok(None);
    };
    let fields = [("a".to_string(), "reveal".to_string())];
    Ok(match PolicyTerms::decode(&stored) {
        Some(p) if !p.allows("x", &fields) => Some(TokenRefusal::PolicyChanged),
        Some(p) if !within_hours(p.allowed_hours_utc, 0) => Some(TokenRefusal::OutsideAllowedHours),
        Some(p) if !source_allowed(&p.source_ips, None) => Some(TokenRefusal::SourceNotAllowed),
        Some(_) => None,
        None => Some(TokenRefusal::PolicyChanged),
    })
}

/// Whether the vault's consent of `subject` for partner `p` lets a token
/// for purpose `x` be redeemed (no consent at all does).
fn consent_allows(v: &Vault, subject: &str) -> Result<bool, TestCaseError> {
    let Some((kind, payload)) = v
        .consent(subject, "p")
        .map_err(|e| fail(format!("consent of {subject}: {e}")))?
    else {
        return Ok(true);
    };
    let c: storage::state::ConsentChange = serde_json::from_slice(&payload).map_err(fail)?;
    Ok(c.status(kind, "x", 0) == storage::state::ConsentStatus::InForce)
}

/// Each subject key version: records encrypted under it, and its life.
type KeyCounts = BTreeMap<(String, u32), (u64, &'static str)>;

fn key_counts(v: &Vault) -> Result<KeyCounts, TestCaseError> {
    Ok(v.key_status(None, 1_000_000)
        .map_err(|e| fail(format!("key status: {e}")))?
        .subject_keys
        .into_iter()
        .map(|k| ((k.subject, k.version), (k.encryptions, k.life.name())))
        .collect())
}

/// The model's checks on an open vault.
fn check(v: &Vault, acked: &Acked, limit: u64) -> Result<(), TestCaseError> {
    for (seq, (subject, _, hash)) in acked {
        let e = v
            .entry(*seq)
            .map_err(|e| fail(format!("read {seq}: {e}")))?
            .ok_or_else(|| fail(format!("acknowledged seq {seq} is not in the log")))?;
        prop_assert_eq!(&e.hash, hash, "seq {}", seq);
        prop_assert_eq!(&e.subject, subject, "seq {}", seq);
    }
    // Per subject, in log order.
    let mut by_subject: BTreeMap<&str, Vec<(u64, &Wrote)>> = BTreeMap::new();
    for (seq, (s, w, _)) in acked {
        by_subject.entry(s).or_default().push((*seq, w));
    }
    for (subject, writes) in &by_subject {
        let mut latest: Option<&[u8]> = None;
        let mut shredded = false;
        for (seq, w) in writes {
            prop_assert!(!shredded, "{} written at {} after its shred", subject, seq);
            match w {
                Wrote::Record(p) => latest = Some(p),
                Wrote::Reencrypted => {
                    prop_assert!(latest.is_some(), "{} re-encrypted nothing", subject)
                }
                Wrote::Shred => shredded = true,
            }
        }
        match v.latest_record(subject) {
            Err(Error::SubjectShredded(_)) => {
                prop_assert!(shredded, "{} reads as shredded", subject)
            }
            Ok(r) => {
                prop_assert!(!shredded, "{} shredded but readable", subject);
                prop_assert_eq!(
                    r.map(|r| r.plaintext.to_vec()),
                    latest.map(<[u8]>::to_vec),
                    "{}",
                    subject
                );
            }
            Err(e) => return Err(fail(format!("{subject}: {e}"))),
        }
    }
    for ((s, version), (n, _)) in key_counts(v)? {
        prop_assert!(
            n <= limit,
            "{} v{} encrypted {} records, over {}",
            s,
            version,
            n,
            limit
        );
    }
    let report = v
        .check_derived_state()
        .map_err(|e| fail(format!("derived state: {e}")))?;
    prop_assert_eq!(report.differences, 0, "{:?}", report.sample);
    Ok(())
}

/// The requests of a round with a fault: all of them, and those whose
/// outcome the fault made unknown.
struct Unknown<'a> {
    round: usize,
    ops: &'a [Op],
    failed: Vec<usize>,
}

impl Unknown<'_> {
    fn failed(&self) -> impl Iterator<Item = &Op> {
        self.failed.iter().map(|&j| &self.ops[j])
    }

    /// The request of this round that wrote `plaintext` (`c…r{i}o{j}/{k}`),
    /// with the index of its record.
    fn origin(&self, plaintext: &[u8]) -> Option<(usize, usize)> {
        let text = std::str::from_utf8(plaintext).ok()?;
        let (tag, k) = text.split_once('/')?;
        let (_, rest) = tag.split_once('r')?;
        let (i, j) = rest.split_once('o')?;
        (i.parse::<usize>().ok()? == self.round).then_some(())?;
        Some((j.parse().ok()?, k.parse().ok()?))
    }

    /// Whether a request of unknown outcome may have written `subject`.
    fn may_write(&self, subject: &str) -> bool {
        self.failed().any(|op| match op {
            Op::Batch(items) => items.iter().any(|it| match it {
                Item::Known(n) => subject == self::subject(*n),
                Item::New => subject.contains("-new"),
                Item::Shredded => false,
            }),
            Op::Rotate(n, true) => subject == self::subject(*n),
            _ => false,
        })
    }
}

/// After a round with a fault: closes the vault (which may fail), disarms
/// the failpoint, opens the vault with the one secret that opens it, and
/// checks that what the log holds beyond the acknowledged writes is what
/// requests of unknown outcome may have written, a batch all or nothing,
/// and a consent or policy change one such request asked for (its
/// subject, its grant or revocation and its purpose). `acked` then takes
/// the log's writes, and `events` the seqs of its consent and policy
/// changes. Returns the vault and the secret.
#[allow(clippy::too_many_arguments)]
fn recover(
    vault: Arc<Vault>,
    dir: &std::path::Path,
    fault: &Fault,
    master: Option<(u64, u8)>,
    opts: &dyn Fn() -> Options,
    acked: &mut Acked,
    events: &mut std::collections::BTreeSet<u64>,
    round: &Unknown<'_>,
) -> Result<(Vault, Option<(u64, u8)>), TestCaseError> {
    let vault = Arc::into_inner(vault).ok_or_else(|| fail("the vault is still shared"))?;
    // The failpoint may fire at close; the close then fails. A vault
    // poisoned by the round's fault says so at its close.
    let poisoned = vault.is_poisoned();
    let closed = vault.close();
    prop_assert!(
        !poisoned || matches!(closed, Err(Error::Poisoned)),
        "a poisoned vault closed with {:?}",
        closed
    );
    fail::remove(fault.point);
    // Exactly one secret opens it: the master key of the last rotation
    // that reached the log.
    let mut secrets = vec![master.map(|(_, b)| b)];
    for op in round.failed() {
        if let Op::RotateMaster(b) = op {
            secrets.push(Some(*b));
        }
    }
    secrets.sort();
    secrets.dedup_by_key(|b| b.map(|b| b.max(1)));
    let mut opened = Vec::new();
    for b in &secrets {
        let unlock = secret(b.map(|b| (0, b)));
        match Vault::open(dir, &unlock, opts()) {
            Ok(v) => {
                v.close().map_err(|e| fail(format!("close: {e}")))?;
                opened.push(*b);
            }
            // A passphrase where a key file sealed it, or the reverse.
            Err(Error::WrongSecret | Error::Invalid(_)) => {}
            Err(e) => return Err(fail(format!("open after {}: {e}", fault.point))),
        }
    }
    prop_assert_eq!(opened.len(), 1, "secrets that open the vault: {:?}", opened);
    let v = Vault::open(dir, &secret(opened[0].map(|b| (0, b))), opts())
        .map_err(|e| fail(format!("open: {e}")))?;
    let master = opened[0].map(|b| (v.durable_len().saturating_sub(1), b));
    let mut rebuilt = Acked::new();
    // Per subject, the plaintext of its latest record.
    let mut latest: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // Per batch of unknown outcome, the indexes of its records found.
    let mut found: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for seq in 0..v.durable_len() {
        let e = v
            .entry(seq)
            .map_err(|e| fail(format!("read {seq}: {e}")))?
            .ok_or_else(|| fail(format!("seq {seq} is missing")))?;
        if let Some(a) = acked.get(&seq) {
            prop_assert_eq!(&a.2, &e.hash, "acknowledged seq {}", seq);
            if let Wrote::Record(p) = &a.1 {
                latest.insert(a.0.clone(), p.clone());
            }
            rebuilt.insert(seq, a.clone());
            continue;
        }
        let wrote = match e.kind {
            Kind::SubjectShredded => {
                let shred = round
                    .failed()
                    .any(|op| matches!(op, Op::Shred(n) if subject(*n) == e.subject));
                prop_assert!(shred, "{} shredded at {} by no request", e.subject, seq);
                Wrote::Shred
            }
            Kind::Record => match v.record_at(seq) {
                Ok(Some(r))
                    if latest.get(&e.subject).map(Vec::as_slice)
                        == Some(r.plaintext.as_slice()) =>
                {
                    let rotation = round
                        .failed()
                        .any(|op| matches!(op, Op::Rotate(n, true) if subject(*n) == e.subject));
                    prop_assert!(rotation, "{} copied at {} by no rotation", e.subject, seq);
                    Wrote::Reencrypted
                }
                Ok(Some(r)) => {
                    let origin = round.origin(&r.plaintext);
                    let Some((j, k)) = origin else {
                        return Err(fail(format!("seq {seq}: a record no request wrote")));
                    };
                    prop_assert!(
                        round.failed.contains(&j),
                        "seq {}: a record of a request refused or lost",
                        seq
                    );
                    found.entry(j).or_default().push(k);
                    latest.insert(e.subject.clone(), r.plaintext.to_vec());
                    Wrote::Record(r.plaintext.to_vec())
                }
                Err(Error::SubjectShredded(_)) => {
                    prop_assert!(
                        round.may_write(&e.subject),
                        "seq {}: a record of {} no request wrote",
                        seq,
                        e.subject
                    );
                    Wrote::Record(Vec::new())
                }
                other => return Err(fail(format!("record at {seq}: {other:?}"))),
            },
            Kind::ConsentGranted | Kind::ConsentRevoked if !events.contains(&seq) => {
                // Granted for `x` (Some(true)), for `y` (Some(false)), or
                // revoked (None), as `Op::Consent` asks.
                let grant = (e.kind == Kind::ConsentGranted).then(|| {
                    serde_json::from_slice::<serde_json::Value>(&e.payload)
                        .ok()
                        .and_then(|p| p["purposes"].as_array().cloned())
                        .is_some_and(|ps| ps.iter().any(|p| p == "x"))
                });
                let asked = round.failed().any(
                    |op| matches!(op, Op::Consent(n, g) if subject(*n) == e.subject && *g == grant),
                );
                prop_assert!(
                    asked,
                    "seq {}: a consent change of {} ({:?}) that no request of unknown outcome asked for",
                    seq,
                    e.subject,
                    grant
                );
                events.insert(seq);
                continue;
            }
            Kind::PolicyChanged if !events.contains(&seq) => {
                let written: Option<serde_json::Value> = serde_json::from_slice(&e.payload).ok();
                let asked = round.failed().any(|op| {
                    matches!(op, Op::Policy(n) if written.as_ref().is_some_and(|w| {
                        w["policy"] == policy(*n)["policy"]
                    }))
                });
                prop_assert!(
                    asked,
                    "seq {}: a policy change that no request of unknown outcome asked for",
                    seq
                );
                events.insert(seq);
                continue;
            }
            _ => continue,
        };
        rebuilt.insert(seq, (e.subject.clone(), wrote, e.hash));
    }
    // A batch is in the log whole or not at all: each of its records
    // was read, or its subject was shredded since.
    let shredded: Vec<&str> = rebuilt
        .values()
        .filter(|(_, w, _)| matches!(w, Wrote::Shred))
        .map(|(s, _, _)| s.as_str())
        .collect();
    for (j, ks) in &found {
        let Op::Batch(items) = &round.ops[*j] else {
            return Err(fail(format!("request {j} is no batch")));
        };
        for (k, item) in items.iter().enumerate() {
            let gone = match item {
                Item::Known(n) => shredded.contains(&subject(*n).as_str()),
                _ => false,
            };
            prop_assert!(
                ks.contains(&k) || gone,
                "batch {} of round {}: records {:?} of {} in the log",
                j,
                round.round,
                ks,
                items.len()
            );
        }
    }
    *acked = rebuilt;
    Ok((v, master))
}

/// Tokens whose redemption a fault cut off: one delivered is spent; one
/// not delivered redeems at most once.
async fn check_tokens(
    v: &Vault,
    cut_off: Vec<(Zeroizing<String>, bool)>,
) -> Result<(), TestCaseError> {
    for (token, delivered) in cut_off {
        if !delivered {
            match v.redeem(&token, "p", 0, None).await {
                Ok(_) | Err(Error::TokenRefused(_)) => {}
                Err(e) => return Err(fail(format!("redeem after recovery: {e}"))),
            }
        }
        match v.redeem(&token, "p", 0, None).await {
            Err(Error::TokenRefused(_)) => {}
            other => {
                return Err(fail(format!(
                    "a token redeemed again after recovery: {:?}",
                    other.map(|_| "data")
                )))
            }
        }
    }
    Ok(())
}

/// The secret that opens the vault: the passphrase it was made with, or
/// the key file of its latest master rotation.
fn secret(master: Option<(u64, u8)>) -> Unlock {
    match master {
        None => Unlock::passphrase(b"model".to_vec()),
        Some((_, b)) => key_file(b),
    }
}

/// Closes the vault, verifies its log with the pinned key, opens it again
/// with `unlock`, and checks that the reopened vault is the one closed.
fn close_and_reopen(
    vault: Arc<Vault>,
    dir: &std::path::Path,
    unlock: &Unlock,
    opts: Options,
    acked: &Acked,
    limit: u64,
) -> Result<Vault, TestCaseError> {
    check(&vault, acked, limit)?;
    let live = key_counts(&vault)?;
    let key = vault.public_key();
    let vault = Arc::into_inner(vault).ok_or_else(|| fail("the vault is still shared"))?;
    vault.close().map_err(|e| fail(format!("close: {e}")))?;
    let report = verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            ..Default::default()
        },
    )
    .map_err(|e| fail(format!("verify: {e}")))?;
    prop_assert!(report.ok(), "verify: {:?}", report.failure);
    let reopened = Vault::open(dir, unlock, opts).map_err(|e| fail(format!("reopen: {e}")))?;
    check(&reopened, acked, limit)?;
    prop_assert_eq!(
        &live,
        &key_counts(&reopened)?,
        "key status live and rebuilt"
    );
    Ok(reopened)
}

fn run_case(n: u32, c: &Case) -> Result<(), TestCaseError> {
    let tmp = scratch_dir();
    let dir = tmp.path().join("v");
    let opts = || Options {
        key_cache: c.key_cache,
        max_encryptions_per_key: c.limit,
        max_group_entries: c.group_entries,
        index_batch: c.index_batch,
        wal_segment_bytes: c.wal_segment_bytes,
        ..Options::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(fail)?;
    rt.block_on(async {
        let mut master = None;
        let mut vault = Arc::new(
            Vault::create(&dir, &secret(master), opts())
                .map_err(|e| fail(format!("create: {e}")))?
                .vault,
        );
        let mut acked = Acked::new();
        let mut refused = Vec::new();
        // Per subject with a consent: whether it lets a token be redeemed;
        // and what the partner's policy does to a redemption.
        let mut consents: BTreeMap<String, bool> = BTreeMap::new();
        let mut policy_effect: Option<TokenRefusal> = None;
        let r = vault
            .append(Append::record("gone", b"x".to_vec()))
            .await
            .map_err(fail)?;
        acked.insert(
            r.seq,
            ("gone".into(), Wrote::Record(b"x".to_vec()), r.entry_hash),
        );
        let r = vault.shred("gone").await.map_err(fail)?;
        acked.insert(r.seq, ("gone".into(), Wrote::Shred, r.entry_hash));
        // The seqs of the consent and policy changes in the log: each one
        // acknowledged, or found after a fault and traced to a request.
        let mut events = std::collections::BTreeSet::new();
        for (i, (round, reopen, fault)) in c.rounds.iter().enumerate() {
            if let Some(f) = fault {
                let times = if f.sticky { "" } else { "1*" };
                fail::cfg(f.point, &format!("{}*off->{times}return", f.after)).map_err(fail)?;
            }
            // Subjects whose consent a request of this round changes: their
            // redemptions may go either way.
            let changing: Vec<String> = round
                .iter()
                .filter_map(|op| match op {
                    Op::Consent(n, _) => Some(subject(*n)),
                    _ => None,
                })
                .collect();
            let policy_changing = round.iter().any(|op| matches!(op, Op::Policy(_)));
            let tasks: Vec<_> = round
                .iter()
                .enumerate()
                .map(|(j, op)| {
                    let tag = format!("c{n}r{i}o{j}");
                    let expect = match op {
                        Op::MintRedeem(s)
                            if !changing.contains(&subject(*s)) && !policy_changing =>
                        {
                            let consent = consents.get(&subject(*s)).copied().unwrap_or(true);
                            Some(if !consent {
                                Some(TokenRefusal::ConsentRevoked)
                            } else {
                                policy_effect
                            })
                        }
                        _ => None,
                    };
                    tokio::spawn(run_op(
                        vault.clone(),
                        tag,
                        op.clone(),
                        fault.is_some(),
                        expect,
                    ))
                })
                .collect();
            // The acknowledged consent change with the highest seq, per
            // subject.
            let mut latest: BTreeMap<String, (u64, bool)> = BTreeMap::new();
            let mut latest_policy: Option<(u64, Option<TokenRefusal>)> = None;
            let mut unknown = Vec::new();
            let mut cut_off = Vec::new();
            for (j, t) in tasks.into_iter().enumerate() {
                let done = t.await.map_err(fail)??;
                refused.extend(done.refused);
                for (seq, s, w, h) in done.writes {
                    prop_assert!(acked.insert(seq, (s, w, h)).is_none(), "seq {} twice", seq);
                }
                // The latest master rotation in the log sets the secret.
                if done.master > master {
                    master = done.master;
                }
                if done.unknown {
                    unknown.push(j);
                }
                cut_off.extend(done.cut_off);
                if let Some((seq, s, allows)) = done.consent {
                    events.insert(seq);
                    if latest.get(&s).is_none_or(|(q, _)| *q < seq) {
                        latest.insert(s, (seq, allows));
                    }
                }
                if let Some((seq, refusal)) = done.policy {
                    events.insert(seq);
                    if latest_policy.is_none_or(|(q, _)| q < seq) {
                        latest_policy = Some((seq, refusal));
                    }
                }
            }
            if let Some(f) = fault {
                let round = Unknown {
                    round: i,
                    ops: round,
                    failed: unknown,
                };
                let (v, m) = recover(
                    vault,
                    &dir,
                    f,
                    master,
                    &opts,
                    &mut acked,
                    &mut events,
                    &round,
                )?;
                master = m;
                vault = Arc::new(v);
                check_tokens(&vault, cut_off).await?;
            }
            // After a fault, too: the log verifies and a reopen rebuilds
            // the same key status.
            if *reopen || fault.is_some() || i + 1 == c.rounds.len() {
                let v = close_and_reopen(vault, &dir, &secret(master), opts(), &acked, c.limit)?;
                vault = Arc::new(v);
            }
            // The vault's consents are the latest acknowledged changes
            // (after a fault a cut-off change may have landed instead).
            for s in &changing {
                let now = consent_allows(&vault, s)?;
                if fault.is_none() {
                    let want = latest.get(s).map(|(_, a)| *a);
                    prop_assert_eq!(Some(now), want, "consent of {}", s);
                }
                consents.insert(s.clone(), now);
            }
            if policy_changing {
                let now = policy_now(&vault)?;
                if fault.is_none() {
                    let want = latest_policy.map(|(_, r)| r);
                    prop_assert_eq!(Some(now), want, "the partner's policy");
                }
                policy_effect = now;
            }
        }
        // A batch refused for a shredded subject held one.
        let shredded: Vec<&str> = acked
            .values()
            .filter(|(_, w, _)| matches!(w, Wrote::Shred))
            .map(|(s, _, _)| s.as_str())
            .collect();
        for subjects in &refused {
            prop_assert!(
                subjects.iter().any(|s| shredded.contains(&s.as_str())),
                "a batch of {:?} refused as shredded",
                subjects
            );
        }
        let vault = Arc::into_inner(vault).ok_or_else(|| fail("the vault is still shared"))?;
        vault.close().map_err(|e| fail(format!("close: {e}")))?;
        Ok(())
    })
}

#[test]
fn random_rounds_of_requests_keep_the_log_and_its_state_as_acknowledged() {
    let mut runner = TestRunner::new(Config {
        // PROPTEST_CASES=N runs more.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&case(), |c| {
        let n = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        run_case(n, &c)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
