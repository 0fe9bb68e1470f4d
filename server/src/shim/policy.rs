//! Partner policies and subject consents, and the checks `/v1/authorize`
//! makes with them. Pure functions of their inputs (the time and source
//! address are arguments), so every rule is tested here without a vault.
//!
//! A policy is stored in the log as the `policy` member of a
//! `policy_changed` entry; a consent is the payload of the subject's latest
//! `consent_granted` or `consent_revoked` entry for the partner.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use protocol::MaskOp;
use serde::{Deserialize, Serialize};

/// What a partner may ask for, and under which conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// An inactive partner is refused everything.
    #[serde(default = "yes")]
    pub active: bool,
    /// Purpose → the fields it may reveal and the masking of each.
    #[serde(deserialize_with = "unique_keys")]
    pub purposes: BTreeMap<String, Purpose>,
    /// Longest token lifetime, in seconds; absent, 300 or the server's
    /// ceiling if that is lower ([`Policy::token_ttl_secs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_ttl_secs: Option<u32>,
    /// Authorizations per minute; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_minute: Option<u32>,
    /// Source addresses or CIDR networks allowed to authorize, and to
    /// redeem (checked by the vault); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    /// Hours of the day (UTC) in which authorizations and redemptions
    /// are allowed: `[from, to)`, wrapping past midnight when `from > to`;
    /// absent means all day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_hours_utc: Option<[u8; 2]>,
}

/// One purpose of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purpose {
    /// Field name → masking operator name (`reveal`, `redact`, `partial`,
    /// `tokenize`, `hash`, `generalize`).
    #[serde(deserialize_with = "unique_keys")]
    pub fields: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A map whose keys are each given once: a JSON object that names a
/// purpose or a field twice (`{"iban": "reveal", "iban": "redact"}`) is
/// refused, where a `BTreeMap` would keep the last one without a word.
/// (TOML's parser refuses a key given twice itself.)
fn unique_keys<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of distinct names")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, V>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("{k:?} is given twice")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(std::marker::PhantomData))
}

/// A token's lifetime under a policy that names none, unless the
/// server's ceiling is lower.
pub const DEFAULT_TOKEN_TTL_SECS: u32 = storage::state::DEFAULT_TOKEN_TTL_SECS;

/// Largest number of purposes, and of fields per purpose, a policy may hold.
const MAX_ITEMS: usize = 256;

impl Policy {
    /// The lifetime of a token granted under this policy, in seconds,
    /// under the server's ceiling `max_ttl_secs`: the policy's own, or
    /// the default, at most the ceiling.
    pub fn token_ttl_secs(&self, max_ttl_secs: u32) -> u32 {
        self.max_token_ttl_secs
            .unwrap_or(DEFAULT_TOKEN_TTL_SECS)
            .min(max_ttl_secs)
    }

    /// Checks what serde cannot: names, operators, networks, hours, limits.
    pub fn validate(&self, max_ttl_secs: u32) -> Result<(), String> {
        if self.purposes.len() > MAX_ITEMS {
            return Err(format!("at most {MAX_ITEMS} purposes"));
        }
        for (name, p) in &self.purposes {
            check_name("purpose", name)?;
            if p.fields.is_empty() || p.fields.len() > MAX_ITEMS {
                return Err(format!(
                    "purpose {name:?} needs between 1 and {MAX_ITEMS} fields"
                ));
            }
            for (field, op) in &p.fields {
                check_name("field", field)?;
                if MaskOp::from_name(op).is_none() {
                    return Err(format!(
                        "field {field:?} of purpose {name:?}: unknown masking operator {op:?}"
                    ));
                }
            }
        }
        if self
            .max_token_ttl_secs
            .is_some_and(|t| t == 0 || t > max_ttl_secs)
        {
            return Err(format!(
                "max_token_ttl_secs must be between 1 and {max_ttl_secs}"
            ));
        }
        if self.rate_limit_per_minute == Some(0) {
            return Err("rate_limit_per_minute must be at least 1 (omit it for no limit)".into());
        }
        if self.source_ips.len() > MAX_ITEMS {
            return Err(format!("at most {MAX_ITEMS} source_ips"));
        }
        self.networks()?;
        if let Some(hours) = self.allowed_hours_utc {
            if !storage::state::hours_in_range(hours) {
                return Err("allowed_hours_utc is [from, to) with 0 <= from <= 23, 0 <= to <= 24, from != to".into());
            }
        }
        Ok(())
    }

    /// The allowed source networks (a bare address is a host network).
    pub fn networks(&self) -> Result<Vec<IpNet>, String> {
        self.source_ips
            .iter()
            .map(|s| {
                if let Some(net) = storage::state::host_bits_set(s) {
                    return Err(format!(
                        "source_ips: {s:?} has bits set past its prefix, and stands for all of \
                         {net}: write {net} for the network, or the address alone for the host"
                    ));
                }
                storage::state::parse_network(s)
                    .ok_or_else(|| format!("source_ips: {s:?} is not an address or CIDR network"))
            })
            .collect()
    }
}

/// Whether `name` can name a purpose or a field: 1 to 128 printable ASCII
/// characters without spaces.
pub fn is_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic())
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if !is_name(name) {
        return Err(format!(
            "{what} names are 1 to 128 printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// A subject's consent for one partner, as the shim writes it: the
/// payload of a consent entry, whose rule the vault applies again at
/// redemption ([`Consent::status`]).
pub use storage::state::ConsentChange as Consent;

/// Why an authorization was refused: the stable `error` code of the HTTP
/// answer and of the audit entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    PartnerInactive,
    PurposeNotAllowed,
    FieldNotAllowed,
    ConsentMissing,
    ConsentRevoked,
    ConsentExpired,
    OutsideAllowedHours,
    SourceNotAllowed,
    RateLimited,
    /// The vault refused the mint: the subject was crypto-shredded.
    SubjectShredded,
}

impl Denial {
    /// Every reason, for metrics.
    pub const ALL: [Denial; 10] = [
        Denial::PartnerInactive,
        Denial::PurposeNotAllowed,
        Denial::FieldNotAllowed,
        Denial::ConsentMissing,
        Denial::ConsentRevoked,
        Denial::ConsentExpired,
        Denial::OutsideAllowedHours,
        Denial::SourceNotAllowed,
        Denial::RateLimited,
        Denial::SubjectShredded,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Denial::PartnerInactive => "partner_inactive",
            Denial::PurposeNotAllowed => "purpose_not_allowed",
            Denial::FieldNotAllowed => "field_not_allowed",
            Denial::ConsentMissing => "consent_missing",
            Denial::ConsentRevoked => "consent_revoked",
            Denial::ConsentExpired => "consent_expired",
            Denial::OutsideAllowedHours => "outside_allowed_hours",
            Denial::SourceNotAllowed => "source_not_allowed",
            Denial::RateLimited => "rate_limited",
            Denial::SubjectShredded => "subject_shredded",
        }
    }

    /// Whether the denial is decided about the subject (its consent, its
    /// erasure): such a denial tells the partner something of the
    /// subject, so it is always recorded an entry of its own, naming the
    /// subject, never only counted ([`DenialBudget`]). It comes after the
    /// partner's rate limit, which bounds how many the partner can make.
    pub fn about_the_subject(self) -> bool {
        matches!(
            self,
            Denial::ConsentMissing
                | Denial::ConsentRevoked
                | Denial::ConsentExpired
                | Denial::SubjectShredded
        )
    }

    /// A human message for the partner.
    pub fn message(self) -> &'static str {
        match self {
            Denial::PartnerInactive => "the partner has no active policy",
            Denial::PurposeNotAllowed => "the purpose is not allowed for this partner",
            Denial::FieldNotAllowed => "a requested field is not allowed for this purpose",
            Denial::ConsentMissing => {
                "the subject has not consented to this partner for this purpose"
            }
            Denial::ConsentRevoked => "the subject revoked its consent",
            Denial::ConsentExpired => "the subject's consent has expired",
            Denial::OutsideAllowedHours => "authorizations are not allowed at this hour",
            Denial::SourceNotAllowed => "requests from this address are not allowed",
            Denial::RateLimited => "the partner's rate limit is exhausted",
            Denial::SubjectShredded => "the subject's data was erased (crypto-shredded)",
        }
    }
}

/// The checks of `/v1/authorize` that need only the policy: purpose and
/// fields. Returns the fields to reveal with their operators, in the
/// order asked (all of the purpose's fields when none are named).
pub fn fields_for(
    policy: &Policy,
    purpose: &str,
    asked: Option<&[String]>,
) -> Result<Vec<(String, MaskOp)>, Denial> {
    if !policy.active {
        return Err(Denial::PartnerInactive);
    }
    let p = policy
        .purposes
        .get(purpose)
        .ok_or(Denial::PurposeNotAllowed)?;
    let op = |name: &str| {
        p.fields
            .get(name)
            .and_then(|op| MaskOp::from_name(op))
            .ok_or(Denial::FieldNotAllowed)
    };
    match asked {
        None => p.fields.keys().map(|f| Ok((f.clone(), op(f)?))).collect(),
        Some(list) => {
            let mut out: Vec<(String, MaskOp)> = Vec::with_capacity(list.len());
            for f in list {
                if !out.iter().any(|(g, _)| g == f) {
                    out.push((f.clone(), op(f)?));
                }
            }
            if out.is_empty() {
                return Err(Denial::FieldNotAllowed);
            }
            Ok(out)
        }
    }
}

/// Whether the subject's latest consent event (kind byte 3 granted, 4
/// revoked, and its payload) allows `purpose` at `now_ms`.
pub fn check_consent(
    latest: Option<(u8, &Consent)>,
    purpose: &str,
    now_ms: u64,
) -> Result<(), Denial> {
    use storage::state::ConsentStatus;
    let Some((kind, c)) = latest else {
        return Err(Denial::ConsentMissing);
    };
    let kind = match storage::Kind::from_u8(kind) {
        Some(storage::Kind::ConsentGranted) => storage::Kind::ConsentGranted,
        _ => storage::Kind::ConsentRevoked,
    };
    match c.status(kind, purpose, now_ms) {
        ConsentStatus::InForce => Ok(()),
        ConsentStatus::Revoked => Err(Denial::ConsentRevoked),
        ConsentStatus::OtherPurposes => Err(Denial::ConsentMissing),
        ConsentStatus::Expired => Err(Denial::ConsentExpired),
    }
}

/// Time-of-day and source-address restrictions: the rules the vault
/// applies again when a token is redeemed ([`storage::state::within_hours`],
/// [`storage::state::source_allowed`]).
pub fn check_conditions(policy: &Policy, now_ms: u64, source: IpAddr) -> Result<(), Denial> {
    if !storage::state::within_hours(policy.allowed_hours_utc, now_ms) {
        return Err(Denial::OutsideAllowedHours);
    }
    if !storage::state::source_allowed(&policy.source_ips, Some(source)) {
        return Err(Denial::SourceNotAllowed);
    }
    Ok(())
}

/// Per-partner token buckets: `per_minute` authorizations a minute, in
/// bursts of at most that many.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, u64)>>,
}

impl RateLimiter {
    /// Partners tracked at most; beyond, the table is cleared (memory must
    /// not grow without bound).
    const MAX_PARTNERS: usize = 100_000;

    /// Takes one authorization from `partner`'s bucket at `now_ms`.
    pub fn take(&self, partner: &str, per_minute: u32, now_ms: u64) -> bool {
        let Ok(mut b) = self.buckets.lock() else {
            return false;
        };
        if b.len() >= Self::MAX_PARTNERS && !b.contains_key(partner) {
            b.clear();
        }
        let cap = f64::from(per_minute);
        let (tokens, last) = b.entry(partner.to_string()).or_insert((cap, now_ms));
        let elapsed = now_ms.saturating_sub(*last) as f64 / 60_000.0;
        *tokens = (*tokens + elapsed * cap).min(cap);
        *last = now_ms.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Denials of `/v1/authorize` past the rate at which a partner's are
/// recorded one entry each, counted until [`DenialBudget::take_unrecorded`]
/// hands them over to be recorded as one count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecorded {
    pub count: u64,
    /// The first and the last of them, in milliseconds since the epoch.
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Unrecorded {
    fn merge(&mut self, other: Unrecorded) {
        self.count = self.count.saturating_add(other.count);
        self.first_ms = self.first_ms.min(other.first_ms);
        self.last_ms = self.last_ms.max(other.last_ms);
    }
}

/// How many of a partner's denials by its policy are recorded one entry
/// each: at most `per_minute` a minute, in bursts of as many. So a
/// partner's key, a stolen one included, cannot grow the log faster than
/// that by asking for what its policy refuses; the denials past it are
/// counted per partner and recorded as one count a minute
/// ([`DenialBudget::take_unrecorded`]). Denials about the subject
/// ([`Denial::about_the_subject`]) are not counted against it.
#[derive(Debug, Default)]
pub struct DenialBudget {
    recorded: RateLimiter,
    unrecorded: std::sync::Mutex<std::collections::BTreeMap<String, Unrecorded>>,
}

impl DenialBudget {
    /// Whether `partner`'s denial at `now_ms` is recorded an entry of its
    /// own; if not, it is counted.
    pub fn admit(&self, partner: &str, per_minute: u32, now_ms: u64) -> bool {
        if self.recorded.take(partner, per_minute, now_ms) {
            return true;
        }
        self.restore(
            partner.to_string(),
            Unrecorded {
                count: 1,
                first_ms: now_ms,
                last_ms: now_ms,
            },
        );
        false
    }

    /// The counts of denials not recorded one by one, by partner, which
    /// the budget forgets: the caller records them, or gives back those it
    /// could not ([`DenialBudget::restore`]).
    pub fn take_unrecorded(&self) -> Vec<(String, Unrecorded)> {
        let mut pending = self
            .unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *pending).into_iter().collect()
    }

    /// Counts `u` for `partner` again, added to what was counted since.
    pub fn restore(&self, partner: String, u: Unrecorded) {
        let mut pending = self
            .unrecorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending
            .entry(partner)
            .and_modify(|have| have.merge(u))
            .or_insert(u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        serde_json::from_value(serde_json::json!({
            "purposes": {
                "credit_check": {"fields": {"name": "partial", "income": "generalize", "iban": "redact"}}
            },
            "rate_limit_per_minute": 2,
            "source_ips": ["10.0.0.0/8", "127.0.0.1"],
            "allowed_hours_utc": [22, 6]
        }))
        .expect("policy")
    }

    const H: u64 = 3_600_000;

    /// A purpose or a field named twice in a JSON body is refused, not
    /// taken as its last value.
    #[test]
    fn a_name_given_twice_is_refused() {
        for body in [
            r#"{"purposes": {"kyc": {"fields": {"iban": "reveal", "iban": "redact"}}}}"#,
            r#"{"purposes": {"kyc": {"fields": {}}, "kyc": {"fields": {"iban": "reveal"}}}}"#,
        ] {
            let e = serde_json::from_str::<Policy>(body).expect_err(body);
            assert!(e.to_string().contains("given twice"), "{e}");
        }
        let once = r#"{"purposes": {"kyc": {"fields": {"iban": "redact", "name": "partial"}}}}"#;
        assert!(serde_json::from_str::<Policy>(once).is_ok());
        // Through a JSON tree too (as the log's payloads are read).
        assert_eq!(
            serde_json::from_value::<Policy>(serde_json::to_value(policy()).expect("json"))
                .expect("policy"),
            policy()
        );
    }

    #[test]
    fn denials_past_the_budget_are_counted_and_handed_over_once() {
        let b = DenialBudget::default();
        let m = 60_000;
        assert!(b.admit("p", 2, m) && b.admit("p", 2, m));
        assert!(!b.admit("p", 2, m + 1) && !b.admit("p", 2, m + 5));
        // Another partner has its own budget.
        assert!(b.admit("q", 2, m + 5));
        // Half a minute later, one more is recorded.
        assert!(b.admit("p", 2, m + 30_005));
        assert!(!b.admit("p", 2, m + 30_006));
        let taken = b.take_unrecorded();
        let want = Unrecorded {
            count: 3,
            first_ms: m + 1,
            last_ms: m + 30_006,
        };
        assert_eq!(taken, vec![("p".to_string(), want)]);
        assert!(b.take_unrecorded().is_empty(), "handed over once");
        // Given back after a failed write, and counted on.
        b.restore("p".into(), want);
        assert!(!b.admit("p", 2, m + 30_007));
        let again = b.take_unrecorded();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].1.count, 4);
        assert_eq!(
            (again[0].1.first_ms, again[0].1.last_ms),
            (m + 1, m + 30_007)
        );
    }

    #[test]
    fn policies_parse_strictly_and_validate() {
        let p = policy();
        assert!(p.active);
        assert_eq!(p.max_token_ttl_secs, None);
        assert_eq!(p.token_ttl_secs(3600), 300);
        assert_eq!(p.validate(3600), Ok(()));
        // Under a ceiling below the default, a policy that names no
        // lifetime is valid, and its tokens live as long as the ceiling.
        assert_eq!(p.validate(60), Ok(()));
        assert_eq!(p.token_ttl_secs(60), 60);
        let mut q = p.clone();
        q.max_token_ttl_secs = Some(900);
        assert_eq!(q.token_ttl_secs(3600), 900);
        assert!(q.validate(600).is_err());
        q.max_token_ttl_secs = Some(0);
        assert!(q.validate(3600).is_err());
        let bad = [
            serde_json::json!({"purposes": {}, "extra": 1}),
            serde_json::json!({"purposes": {"x": {"fields": {"a": "reveal"}, "more": 1}}}),
            serde_json::json!({"purposes": "no"}),
        ];
        for b in bad {
            assert!(serde_json::from_value::<Policy>(b).is_err());
        }
        let mut q = p.clone();
        q.purposes
            .get_mut("credit_check")
            .expect("purpose")
            .fields
            .insert("x".into(), "shout".into());
        assert!(q.validate(3600).is_err());
        let mut q = p.clone();
        q.source_ips.push("not-an-ip".into());
        assert!(q.validate(3600).is_err());
        // Bits past the prefix: the network is far wider than the address
        // written (all of 10/8, or every address), so not taken.
        for wide in ["10.1.2.3/8", "1.2.3.4/0", "2001:db8::1/32"] {
            let mut q = p.clone();
            q.source_ips.push(wide.into());
            let e = q.validate(3600).expect_err(wide);
            assert!(e.contains("bits set past its prefix"), "{e}");
        }
        let mut q = p.clone();
        q.max_token_ttl_secs = Some(7200);
        assert!(q.validate(3600).is_err());
        let mut q = p.clone();
        q.allowed_hours_utc = Some([5, 5]);
        assert!(q.validate(3600).is_err());
        let mut q = p;
        q.purposes.insert(
            "bad purpose".into(),
            Purpose {
                fields: BTreeMap::new(),
            },
        );
        assert!(q.validate(3600).is_err());
    }

    #[test]
    fn fields_follow_the_purpose() {
        let p = policy();
        let all = fields_for(&p, "credit_check", None).expect("all");
        assert_eq!(all.len(), 3);
        let some =
            fields_for(&p, "credit_check", Some(&["name".into(), "name".into()])).expect("some");
        assert_eq!(some, vec![("name".to_string(), MaskOp::Partial)]);
        assert_eq!(
            fields_for(&p, "marketing", None),
            Err(Denial::PurposeNotAllowed)
        );
        assert_eq!(
            fields_for(&p, "credit_check", Some(&["dob".into()])),
            Err(Denial::FieldNotAllowed)
        );
        assert_eq!(
            fields_for(&p, "credit_check", Some(&[])),
            Err(Denial::FieldNotAllowed)
        );
        let mut off = p;
        off.active = false;
        assert_eq!(
            fields_for(&off, "credit_check", None),
            Err(Denial::PartnerInactive)
        );
    }

    #[test]
    fn consent_must_be_granted_for_the_purpose_and_in_force() {
        let c = Consent {
            partner_id: "p".into(),
            purposes: vec!["credit_check".into()],
            expires_at_ms: Some(1_000),
        };
        assert_eq!(check_consent(Some((3, &c)), "credit_check", 999), Ok(()));
        assert_eq!(
            check_consent(Some((3, &c)), "credit_check", 1_000),
            Err(Denial::ConsentExpired)
        );
        assert_eq!(
            check_consent(Some((3, &c)), "marketing", 0),
            Err(Denial::ConsentMissing)
        );
        assert_eq!(
            check_consent(Some((4, &c)), "credit_check", 0),
            Err(Denial::ConsentRevoked)
        );
        assert_eq!(
            check_consent(None, "credit_check", 0),
            Err(Denial::ConsentMissing)
        );
    }

    #[test]
    fn hours_wrap_past_midnight_and_sources_match_networks() {
        let p = policy();
        let local: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(check_conditions(&p, 23 * H, local), Ok(()));
        assert_eq!(check_conditions(&p, 24 * H + 5 * H, local), Ok(()));
        assert_eq!(
            check_conditions(&p, 12 * H, local),
            Err(Denial::OutsideAllowedHours)
        );
        assert_eq!(check_conditions(&p, 23 * H, [10, 1, 2, 3].into()), Ok(()));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(check_conditions(&p, 23 * H, mapped), Ok(()));
        assert_eq!(
            check_conditions(&p, 23 * H, [192, 168, 0, 1].into()),
            Err(Denial::SourceNotAllowed)
        );
    }

    #[test]
    fn rate_limit_refills_over_a_minute() {
        let r = RateLimiter::default();
        assert!(r.take("p", 2, 0));
        assert!(r.take("p", 2, 0));
        assert!(!r.take("p", 2, 1));
        assert!(r.take("q", 2, 1), "partners have their own buckets");
        assert!(r.take("p", 2, 30_001), "half a minute refills one of two");
        assert!(!r.take("p", 2, 30_002));
    }
}
