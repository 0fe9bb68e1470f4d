//! Derived state: what the log implies, kept in the `state` tree so that
//! lookups need not scan the log.
//!
//! Every mutation is a pure function of one entry ([`mutations`]), so the
//! state can be rebuilt from the log at any time and `verify` can replay the
//! log into a model and compare it with the tree byte for byte. The
//! vault's indexer writes mutations in batches, each with the `applied`
//! marker (the seq of the last entry it covers), so the tree is always the
//! model of the log at `applied`; at open, entries after it are replayed.
//!
//! Keys of the `state` tree:
//!
//! ```text
//! "applied"            u64 BE: last seq whose mutations are in the tree
//! "s/" subject         latest record: u64 BE seq || u32 BE key_version
//! "k/" subject         subject data key: u32 BE current version || u8 shredded (0/1);
//!                      set by `subject_key` (version 1), `key_rotated` (the
//!                      new version) and `subject_shredded` (flag set)
//! "c/" credential id   credential: JSON {"role", "key_hash", "name", "seq"}
//! "h/" key hash (hex)  credential id (UTF-8): lookup by presented API key
//! "t/" token hash      a minted token: the `token_minted` payload (JSON)
//! "u/" token hash      u64 BE seq of the `token_redeemed` entry that spent it
//! "p/" partner id      a partner's policy: the `policy_changed` payload (JSON)
//! "g/" subject 0x00 partner id
//!                      the subject's consent for that partner: u8 kind
//!                      (3 granted, 4 revoked) || the entry's payload (JSON)
//! ```
//!
//! The expected content of the `keys` tree is derived the same way
//! ([`key_commitments`]): each key name with the BLAKE3 hash of its bytes.

use protocol::receipt::KeyEndorsement;
use serde::Deserialize;

use crate::entry::{EntryRef, Kind};
use crate::error::{Error, Result};

/// Key of the applied marker.
pub const APPLIED: &[u8] = b"applied";

/// Key of the indexing marker: the seq the indexer is writing the state
/// toward, present only while it writes (and after a crash in the middle).
/// Then each key holds its value at the applied marker or at this one.
pub const INDEXING: &[u8] = b"indexing";

/// One change to the state tree: set a key, or remove it.
pub type Mutation = (Vec<u8>, Option<Vec<u8>>);

/// The prefix of a credential's state key (`c/` and its id): removed when
/// the credential is revoked.
pub const CREDENTIAL_PREFIX: &str = "c/";

/// The prefix of a wrapped data key's name in the `keys` tree
/// ([`data_key_name`]).
pub const DATA_KEY_PREFIX: &[u8] = b"dk/";

/// The prefix of a wrapped signing key's name in the `keys` tree
/// ([`signing_key_name`]).
pub const SIGNING_KEY_PREFIX: &[u8] = b"signing/";

pub(crate) fn key(prefix: &str, rest: &str) -> Vec<u8> {
    [prefix.as_bytes(), rest.as_bytes()].concat()
}

/// Payload of a `credential_created` entry.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialCreated {
    /// Public, non-secret identifier of the credential.
    pub id: String,
    /// Role granted (admin, writer, gateway, partner, auditor).
    pub role: String,
    /// Hex BLAKE3 of the API key; the key itself is never stored. For a
    /// credential held by a client certificate,
    /// [`crate::vault::certificate_key_hash`] of its SHA-256.
    pub key_hash: String,
    /// Human label (e.g. the partner id).
    #[serde(default)]
    pub name: String,
    /// The credential id of the admin who asked for it, where one did
    /// (written by [`crate::vault::Admin`]); absent when the process holding
    /// the vault did it on its own (`vaultd` at start or stop, or an
    /// offline `vault-admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
    /// For a credential held by a client certificate (mutual TLS) instead
    /// of an API key: the hex SHA-256 of the certificate's DER, which is
    /// public (it is what `openssl x509 -fingerprint -sha256` prints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_sha256: Option<String>,
}

/// The stored value of `"c/" id`.
#[derive(serde::Serialize)]
struct CredentialState<'a> {
    role: &'a str,
    key_hash: &'a str,
    name: &'a str,
    seq: u64,
}

/// Payload of a `credential_revoked` entry.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialRevoked {
    pub id: String,
    pub key_hash: String,
    /// The admin who asked for it, as in [`CredentialCreated::recorded_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

/// Payload of a `token_minted` entry, and the value of `"t/" token_hash`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenMinted {
    /// Hex BLAKE3 of the token; the token itself is never stored.
    pub token_hash: String,
    pub partner_id: String,
    pub subject: String,
    pub purpose: String,
    /// (field, masking operator name), in the order they are revealed.
    pub fields: Vec<(String, String)>,
    pub expires_at_ms: u64,
    /// When the vault was asked to mint it (absent in tokens of earlier
    /// builds, which a shorter `max_token_ttl_secs` then does not stop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minted_at_ms: Option<u64>,
}

/// Payload of a `token_redeemed` entry; `"u/" token_hash` holds its seq.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenRedeemed {
    pub token_hash: String,
    pub partner_id: String,
    /// The clock the token was checked by (its expiry, the consent's, the
    /// policy's hours), present only where it is earlier than the previous
    /// entry's timestamp: the log's timestamps never go back, so after the
    /// wall clock stepped back the entry is stamped later than the check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at_ms: Option<u64>,
}

/// Payload of a `consent_granted` or `consent_revoked` entry (the entry's
/// subject is the data subject). Fields the vault does not interpret (who
/// asked, from where) may follow; the stored state is the payload as
/// written.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct ConsentChange {
    pub partner_id: String,
    /// Purposes consented to (empty in a revocation).
    #[serde(default)]
    pub purposes: Vec<String>,
    /// When the consent lapses (unix milliseconds), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// What a subject's latest consent for a partner says of one purpose at
/// one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentStatus {
    /// Granted, naming the purpose, not lapsed.
    InForce,
    /// The latest entry is a revocation.
    Revoked,
    /// Granted, but not for this purpose.
    OtherPurposes,
    /// Granted for the purpose until a time that has passed.
    Expired,
}

impl ConsentChange {
    /// What this consent, the payload of an entry of `kind`, says of
    /// `purpose` at `now_ms`: the one rule of the shim's authorizations
    /// and of the vault's redemptions.
    pub fn status(&self, kind: Kind, purpose: &str, now_ms: u64) -> ConsentStatus {
        if kind == Kind::ConsentRevoked {
            ConsentStatus::Revoked
        } else if !self.purposes.iter().any(|p| p == purpose) {
            ConsentStatus::OtherPurposes
        } else if self.expires_at_ms.is_some_and(|t| t <= now_ms) {
            ConsentStatus::Expired
        } else {
            ConsentStatus::InForce
        }
    }
}

/// A consent's stored value (`consent_key`): the entry's kind byte, then
/// its payload as written.
pub fn split_consent(v: &[u8]) -> Result<(Kind, &[u8])> {
    let bad = || Error::Malformed("consent state");
    let (&k, payload) = v.split_first().ok_or_else(bad)?;
    match Kind::from_u8(k) {
        Some(kind @ (Kind::ConsentGranted | Kind::ConsentRevoked)) => Ok((kind, payload)),
        _ => Err(bad()),
    }
}

/// A consent's stored value, its payload parsed.
pub fn decode_consent(v: &[u8]) -> Result<(Kind, ConsentChange)> {
    let (kind, payload) = split_consent(v)?;
    let c = serde_json::from_slice(payload).map_err(|_| Error::Malformed("consent state"))?;
    Ok((kind, c))
}

/// Payload of a `policy_changed` entry: the partner and its whole new
/// policy, whose schema belongs to the layer that enforces it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct PolicyChange {
    pub partner_id: String,
    pub policy: serde_json::Value,
}

/// A token's longest lifetime, in seconds, under a policy that names
/// none (the shim's default too).
pub const DEFAULT_TOKEN_TTL_SECS: u32 = 300;

/// What the vault reads of a partner's policy when one of its tokens is
/// redeemed: the `"policy"` member of the latest `policy_changed` payload,
/// of which only `active` (default `true`), each purpose's `fields`
/// (field name → masking operator), `max_token_ttl_secs` (default
/// [`DEFAULT_TOKEN_TTL_SECS`]), `allowed_hours_utc` and `source_ips` are
/// read here; the rest of the schema (the rate limit) belongs to the layer
/// that enforces it (docs/http.md, "Policies").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PolicyTerms {
    #[serde(default = "PolicyTerms::active_by_default")]
    pub active: bool,
    #[serde(default)]
    pub purposes: std::collections::BTreeMap<String, PurposeTerms>,
    /// Absent or `null` (which the shim's schema reads as absent), the
    /// default.
    #[serde(
        default = "PolicyTerms::default_ttl",
        deserialize_with = "PolicyTerms::ttl_or_default"
    )]
    pub max_token_ttl_secs: u32,
    /// `[from, to)`, hours of the day in UTC ([`within_hours`]).
    #[serde(default)]
    pub allowed_hours_utc: Option<[u8; 2]>,
    /// Addresses or CIDR networks ([`source_allowed`]).
    #[serde(default)]
    pub source_ips: Vec<String>,
}

/// Whether `now_ms` (milliseconds since the Unix epoch) falls in `hours`:
/// `[from, to)` hours of the day in UTC, wrapping past midnight when
/// `from > to`. `None` allows every hour; hours out of range (`from` over
/// 23, `to` over 24, or `from == to`, which the shim refuses to store)
/// allow none (fail closed). The same rule decides the shim's
/// authorizations and the vault's redemptions.
pub fn within_hours(hours: Option<[u8; 2]>, now_ms: u64) -> bool {
    let Some([from, to]) = hours else {
        return true;
    };
    if !hours_in_range([from, to]) {
        return false;
    }
    let hour = ((now_ms / 3_600_000) % 24) as u8;
    if from < to {
        hour >= from && hour < to
    } else {
        hour >= from || hour < to
    }
}

/// Whether `[from, to)` names hours a policy may hold: `from` 0 to 23,
/// `to` 0 to 24, and not the same hour.
pub fn hours_in_range([from, to]: [u8; 2]) -> bool {
    from <= 23 && to <= 24 && from != to
}

/// Whether `source` is in one of `networks` (CIDR networks, or bare
/// addresses as host networks; an IPv4-mapped IPv6 source counts as its
/// IPv4 address). An empty list allows any source, even an unknown one;
/// otherwise an unknown source (`None`) is refused, and so is every
/// source when an item does not parse (fail closed).
pub fn source_allowed(networks: &[String], source: Option<std::net::IpAddr>) -> bool {
    use ipnet::IpNet;
    if networks.is_empty() {
        return true;
    }
    let Some(ip) = source.map(canonical_ip) else {
        return false;
    };
    let nets: Option<Vec<IpNet>> = networks.iter().map(|s| parse_network(s)).collect();
    nets.is_some_and(|nets| nets.iter().any(|n| n.contains(&ip)))
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4
/// address it maps: how every check of a source address reads one.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// The network `s` names when it is written as a CIDR network with bits
/// set past its prefix (`10.1.2.3/8`): the network it stands for
/// (`10.0.0.0/8`), which holds far more than the address written. A
/// writer of one most likely meant the host; it is refused where
/// networks are given ([`parse_network`] reads it as the network).
pub fn host_bits_set(s: &str) -> Option<ipnet::IpNet> {
    let net = s.trim().parse::<ipnet::IpNet>().ok()?;
    (net != net.trunc()).then(|| net.trunc())
}

/// A CIDR network, or a bare address as its host network. An
/// IPv4-mapped network (`::ffff:10.0.0.0/104`, `::ffff:192.0.2.7`) is the
/// IPv4 network it maps (`10.0.0.0/8`, `192.0.2.7/32`), since every source
/// is compared as [`canonical_ip`] reads it: as written, it would never
/// hold one.
pub fn parse_network(s: &str) -> Option<ipnet::IpNet> {
    let net = s
        .parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))?;
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .network()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map_or(Some(net), |v4| Some(ipnet::IpNet::V4(v4))),
        other => Some(other),
    }
}

/// One purpose of a [`PolicyTerms`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PurposeTerms {
    #[serde(default)]
    pub fields: std::collections::BTreeMap<String, String>,
}

impl PolicyTerms {
    fn active_by_default() -> bool {
        true
    }

    fn default_ttl() -> u32 {
        DEFAULT_TOKEN_TTL_SECS
    }

    fn ttl_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        Ok(Option::<u32>::deserialize(d)?.unwrap_or(DEFAULT_TOKEN_TTL_SECS))
    }

    /// Whether a token minted at `minted_at_ms` is still young enough at
    /// `now_ms` for this policy's `max_token_ttl_secs`: a policy that
    /// shortened it stops the older tokens minted before. A token that
    /// does not say when it was minted is not refused for its age.
    pub fn allows_age(&self, minted_at_ms: Option<u64>, now_ms: u64) -> bool {
        minted_at_ms
            .is_none_or(|at| now_ms.saturating_sub(at) <= u64::from(self.max_token_ttl_secs) * 1000)
    }

    /// Whether this policy still allows a token minted for `purpose` to
    /// reveal `fields` (field, masking operator): the partner is active,
    /// the purpose is there, and it lists every field with the same
    /// operator. A change of operator refuses the token either way (a
    /// token never reveals under other terms than the policy's current
    /// ones); the partner asks again.
    pub fn allows(&self, purpose: &str, fields: &[(String, String)]) -> bool {
        self.active
            && self.purposes.get(purpose).is_some_and(|p| {
                fields
                    .iter()
                    .all(|(f, op)| p.fields.get(f).is_some_and(|o| o == op))
            })
    }

    /// The terms in a policy's stored value (`"p/" partner`, the
    /// `policy_changed` payload as written). `None` when its `policy`
    /// member is not a policy object, which allows nothing.
    pub fn decode(v: &[u8]) -> Option<PolicyTerms> {
        #[derive(Deserialize)]
        struct Stored {
            policy: PolicyTerms,
        }
        serde_json::from_slice::<Stored>(v).ok().map(|s| s.policy)
    }
}

/// Partner ids: the rules of subject ids (printable ASCII, no spaces, at
/// most 256 bytes), and not empty.
fn check_partner(kind: Kind, partner_id: &str) -> Result<()> {
    crate::vault::validate_subject(partner_id, true)
        .map_err(|_| Error::Invalid(format!("{} names an invalid partner id", kind.name())))
}

/// Key of a subject's consent for a partner: `"g/" subject 0x00 partner`.
pub fn consent_key(subject: &str, partner_id: &str) -> Vec<u8> {
    let mut k = key("g/", subject);
    k.push(0);
    k.extend_from_slice(partner_id.as_bytes());
    k
}

/// Key of a partner's policy: `"p/" partner`.
pub fn policy_key(partner_id: &str) -> Vec<u8> {
    key("p/", partner_id)
}

/// Payload of a `subject_key` entry.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectKeyCommit {
    pub version: u32,
    /// Hex BLAKE3 of the wrapped key as stored in the `keys` tree.
    pub wrapped_hash: String,
}

/// Payload of a `subject_shredded` entry: the subject's current data key
/// version when it was shredded (every version up to it is destroyed).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShredCommit {
    pub version: u32,
    /// The admin who asked for it, as in [`CredentialCreated::recorded_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

/// What a `key_rotated` entry's `"key"` member says was rotated: a
/// subject data key ([`KeyRotation`]), the master key ([`MasterRotation`]),
/// or a batch of keys re-wrapped under the new master key ([`Rewrap`]),
/// which precede the master rotation in its commit group.
pub const ROTATED_SUBJECT_KEY: &str = "subject";
/// `"key"` of a master key rotation.
pub const ROTATED_MASTER_KEY: &str = "master";
/// `"key"` of a batch of keys re-wrapped by a master key rotation.
pub const REWRAPPED_KEYS: &str = "rewrap";
/// `"key"` of a signing key rotation.
pub const ROTATED_SIGNING_KEY: &str = "signing";

/// Payload of a `key_rotated` entry for a subject data key: the new
/// version, committed to like `subject_key` commits to version 1.
///
/// `{"key":"subject","subject":"…","version":N,"wrapped_hash":"<64 hex>"}`;
/// `subject` repeats the entry's subject (they must be equal), so that the
/// payload alone names the key.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub key: String,
    pub subject: String,
    pub version: u32,
    /// Hex BLAKE3 of the new wrapped key as stored in the `keys` tree.
    pub wrapped_hash: String,
    /// The admin who asked for it, as in [`CredentialCreated::recorded_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

/// Payload of a `key_rotated` entry that re-wraps keys under a new master
/// key: `{"key":"rewrap","keys":[["<hex of the key name>","<64 hex>"],…]}`,
/// each name with the BLAKE3 of its new wrapped bytes. A rotation writes
/// as many of these as its keys need (each payload stays under 48 KiB),
/// then one [`MasterRotation`]; the entry's subject is empty.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rewrap {
    pub key: String,
    pub keys: Vec<(String, String)>,
}

/// Payload of the `key_rotated` entry that ends a master key rotation:
/// `{"key":"master","sealed_master_hash":"<64 hex>","rewrapped":N}` and,
/// on a vault's first master rotation only, `"mask_key_hash":"<64 hex>"`.
/// It commits to the new sealed master (`keys/"master"`); `rewrapped`
/// counts the keys the [`Rewrap`] entries before it re-wrapped, which must
/// be every key the master wraps. The entry's subject is empty.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MasterRotation {
    pub key: String,
    /// Hex BLAKE3 of the new sealed master key (90 bytes).
    pub sealed_master_hash: String,
    /// Keys re-wrapped under the new master by this rotation.
    pub rewrapped: u64,
    /// Hex BLAKE3 of the wrapped masking secret (`keys/"mask"`), written by
    /// the first master rotation: until then the masking secret is derived
    /// from the master key, and it must survive the master's change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_key_hash: Option<String>,
    /// The admin who asked for it, as in [`CredentialCreated::recorded_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

/// Payload of the `key_rotated` entry that introduces signing key
/// `key_id` (the one before it is retired):
/// `{"key":"signing","key_id":N,"public_key":"<64 hex>","wrapped_hash":"<64 hex>","endorsement":"<128 hex>"}`.
/// `endorsement` is key `N - 1`'s signature of a
/// [`protocol::receipt::KeyEndorsement`] for the new key at this entry's
/// seq; every head after this entry's commit group is signed by key `N`.
/// The entry's subject is empty.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SigningRotation {
    pub key: String,
    pub key_id: u32,
    /// Hex of the new ed25519 verifying key.
    pub public_key: String,
    /// Hex BLAKE3 of the new wrapped signing key (`keys/"signing/" N`).
    pub wrapped_hash: String,
    /// Hex of the 64-byte endorsement signature by the previous key.
    pub endorsement: String,
    /// The admin who asked for it, as in [`CredentialCreated::recorded_by`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_by: Option<String>,
}

impl SigningRotation {
    /// The endorsement this payload carries, for the entry at `seq`.
    pub fn endorsement(&self, seq: u64) -> Result<KeyEndorsement> {
        let mut public_key = [0u8; 32];
        hex::decode_to_slice(&self.public_key, &mut public_key)
            .map_err(|_| Error::Malformed("signing rotation public key"))?;
        let mut signature = [0u8; 64];
        hex::decode_to_slice(&self.endorsement, &mut signature)
            .map_err(|_| Error::Malformed("signing rotation endorsement"))?;
        Ok(KeyEndorsement {
            key_id: self.key_id,
            public_key,
            seq,
            signature,
        })
    }
}

/// A parsed `key_rotated` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    Subject(KeyRotation),
    Rewrap(Rewrap),
    Master(MasterRotation),
    Signing(SigningRotation),
}

#[derive(Deserialize)]
struct RotationTag {
    key: String,
}

impl Rotation {
    /// Parses and checks a `key_rotated` entry's payload against its entry.
    pub fn parse(e: &EntryRef<'_>) -> Result<Self> {
        let tag: RotationTag = parse(e)?;
        match tag.key.as_str() {
            ROTATED_SUBJECT_KEY => {
                let r: KeyRotation = parse(e)?;
                if e.subject.is_empty() || r.subject != e.subject {
                    return Err(Error::Invalid(
                        "key_rotated names another subject than its entry".into(),
                    ));
                }
                if r.version < 2 {
                    return Err(Error::Invalid("key_rotated to a version below 2".into()));
                }
                Ok(Rotation::Subject(r))
            }
            REWRAPPED_KEYS => {
                let r: Rewrap = parse(e)?;
                if !e.subject.is_empty() || r.keys.is_empty() {
                    return Err(Error::Invalid(
                        "a key re-wrap has no subject and names at least one key".into(),
                    ));
                }
                Ok(Rotation::Rewrap(r))
            }
            ROTATED_MASTER_KEY => {
                let r: MasterRotation = parse(e)?;
                if !e.subject.is_empty() {
                    return Err(Error::Invalid("a master rotation has no subject".into()));
                }
                Ok(Rotation::Master(r))
            }
            ROTATED_SIGNING_KEY => {
                let r: SigningRotation = parse(e)?;
                if !e.subject.is_empty() || r.key_id == 0 {
                    return Err(Error::Invalid(
                        "a signing rotation has no subject and a key id above 0".into(),
                    ));
                }
                r.endorsement(e.seq)?;
                Ok(Rotation::Signing(r))
            }
            other => Err(Error::Invalid(format!(
                "key_rotated of an unknown key {other:?}"
            ))),
        }
    }
}

/// Payload of the genesis entry.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Format version of the data dir.
    pub format: u32,
    /// Hex of the 16-byte vault id.
    pub vault_id: String,
    /// Hex of the ed25519 verifying key (key id 0).
    pub public_key: String,
    /// Hex BLAKE3 of the sealed master key.
    pub sealed_master_hash: String,
    /// Hex BLAKE3 of the wrapped signing key (key id 0).
    pub signing_key_hash: String,
}

fn parse<'a, T: Deserialize<'a>>(e: &EntryRef<'a>) -> Result<T> {
    serde_json::from_slice(e.payload).map_err(|_| {
        Error::Invalid(format!(
            "{} payload does not match its schema",
            e.kind.name()
        ))
    })
}

/// [`mutations`] of `e`, added to `out`: for a record (most entries),
/// without a vector of their own.
pub fn mutations_into(e: &EntryRef<'_>, out: &mut Vec<Mutation>) -> Result<()> {
    match e.kind {
        Kind::Record => out.push(record_mutation(e)),
        _ => out.extend(mutations(e)?),
    }
    Ok(())
}

/// A record's one mutation: its subject's latest record is this one.
fn record_mutation(e: &EntryRef<'_>) -> Mutation {
    (
        key("s/", e.subject),
        Some(record_pointer(e.seq, e.key_version).to_vec()),
    )
}

/// The state mutations one entry implies. Errors mean the payload does not
/// fit its kind's schema: the committer refuses such an append, and verify
/// reports it as malformed.
pub fn mutations(e: &EntryRef<'_>) -> Result<Vec<Mutation>> {
    Ok(match e.kind {
        Kind::Record => vec![record_mutation(e)],
        Kind::SubjectKey => {
            let c: SubjectKeyCommit = parse(e)?;
            let mut v = c.version.to_be_bytes().to_vec();
            v.push(0);
            vec![(key("k/", e.subject), Some(v))]
        }
        Kind::SubjectShredded => {
            // The current version is carried over from the key entry; a
            // shredded subject keeps its key record with the flag set.
            let s: ShredCommit = parse(e)?;
            if e.subject.is_empty() {
                return Err(Error::Invalid("subject_shredded needs a subject".into()));
            }
            let mut v = s.version.to_be_bytes().to_vec();
            v.push(1);
            vec![(key("k/", e.subject), Some(v))]
        }
        Kind::KeyRotated => match Rotation::parse(e)? {
            Rotation::Subject(r) => {
                let mut v = r.version.to_be_bytes().to_vec();
                v.push(0);
                vec![(key("k/", e.subject), Some(v))]
            }
            // The key store changes; derived state does not.
            Rotation::Rewrap(_) | Rotation::Master(_) | Rotation::Signing(_) => Vec::new(),
        },
        Kind::CredentialCreated => {
            let c: CredentialCreated = parse(e)?;
            // A struct, not a map, so that field order (and thus the bytes
            // verify compares) never depends on serde_json's features.
            let value = CredentialState {
                role: &c.role,
                key_hash: &c.key_hash,
                name: &c.name,
                seq: e.seq,
            };
            let bytes = serde_json::to_vec(&value).map_err(|e| Error::Invalid(e.to_string()))?;
            vec![
                (key(CREDENTIAL_PREFIX, &c.id), Some(bytes)),
                (key("h/", &c.key_hash), Some(c.id.into_bytes())),
            ]
        }
        Kind::CredentialRevoked => {
            let c: CredentialRevoked = parse(e)?;
            vec![
                (key(CREDENTIAL_PREFIX, &c.id), None),
                (key("h/", &c.key_hash), None),
            ]
        }
        Kind::Genesis => {
            let _: Genesis = parse(e)?;
            Vec::new()
        }
        Kind::TokenMinted => {
            let t: TokenMinted = parse(e)?;
            // The payload as written is the token's state.
            vec![(key("t/", &t.token_hash), Some(e.payload.to_vec()))]
        }
        Kind::TokenRedeemed => {
            let t: TokenRedeemed = parse(e)?;
            vec![(key("u/", &t.token_hash), Some(e.seq.to_be_bytes().to_vec()))]
        }
        Kind::ConsentGranted | Kind::ConsentRevoked => {
            let c: ConsentChange = parse(e)?;
            check_partner(e.kind, &c.partner_id)?;
            if e.subject.is_empty() {
                return Err(Error::Invalid(format!("{} needs a subject", e.kind.name())));
            }
            let mut v = Vec::with_capacity(1 + e.payload.len());
            v.push(e.kind as u8);
            v.extend_from_slice(e.payload);
            vec![(consent_key(e.subject, &c.partner_id), Some(v))]
        }
        Kind::PolicyChanged => {
            let p: PolicyChange = parse(e)?;
            check_partner(e.kind, &p.partner_id)?;
            vec![(policy_key(&p.partner_id), Some(e.payload.to_vec()))]
        }
        // Audit events only.
        Kind::AccessDenied | Kind::Checkpoint => {
            if e.key_version == 0
                && serde_json::from_slice::<serde::de::IgnoredAny>(e.payload).is_err()
            {
                return Err(Error::Invalid(format!(
                    "{} payload is not JSON",
                    e.kind.name()
                )));
            }
            Vec::new()
        }
    })
}

/// A key name with the BLAKE3 of its stored bytes, or a prefix whose keys
/// must all be gone.
pub type KeyCommitment = (Vec<u8>, Option<[u8; 32]>);

/// The value of `"s/" subject`: the seq and key version of the subject's
/// latest record.
pub fn record_pointer(seq: u64, key_version: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&key_version.to_be_bytes());
    v
}

/// Key-store entries one log entry commits to: `(name, Some(blake3))` to
/// expect a key, `(prefix, None)` to expect every key under it gone (a
/// shredded subject's data keys, a retired signing key).
pub fn key_commitments(e: &EntryRef<'_>) -> Result<Vec<KeyCommitment>> {
    fn hash_of(hex_str: &str) -> Result<[u8; 32]> {
        let mut h = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut h).map_err(|_| Error::Malformed("bad key hash"))?;
        Ok(h)
    }
    Ok(match e.kind {
        Kind::Genesis => {
            let g: Genesis = parse(e)?;
            vec![
                (MASTER.to_vec(), Some(hash_of(&g.sealed_master_hash)?)),
                (signing_key_name(0), Some(hash_of(&g.signing_key_hash)?)),
            ]
        }
        Kind::SubjectKey => {
            let c: SubjectKeyCommit = parse(e)?;
            vec![(
                data_key_name(e.subject, c.version),
                Some(hash_of(&c.wrapped_hash)?),
            )]
        }
        Kind::KeyRotated => match Rotation::parse(e)? {
            Rotation::Subject(r) => vec![(
                data_key_name(e.subject, r.version),
                Some(hash_of(&r.wrapped_hash)?),
            )],
            Rotation::Rewrap(r) => r
                .keys
                .iter()
                .map(|(name, h)| {
                    let name = hex::decode(name).map_err(|_| Error::Malformed("bad key name"))?;
                    Ok((name, Some(hash_of(h)?)))
                })
                .collect::<Result<_>>()?,
            Rotation::Master(r) => {
                let mut v = vec![(MASTER.to_vec(), Some(hash_of(&r.sealed_master_hash)?))];
                if let Some(m) = &r.mask_key_hash {
                    v.push((MASK.to_vec(), Some(hash_of(m)?)));
                }
                v
            }
            // The new key is expected; the retired one must be gone.
            Rotation::Signing(r) => vec![
                (signing_key_name(r.key_id), Some(hash_of(&r.wrapped_hash)?)),
                (signing_key_name(r.key_id - 1), None),
            ],
        },
        Kind::SubjectShredded => vec![(data_key_prefix(e.subject), None)],
        _ => Vec::new(),
    })
}

/// Name of the sealed master key in the `keys` tree.
pub const MASTER: &[u8] = b"master";
/// Name of the wrapped masking secret, written by the first master
/// rotation (before it, the secret is derived from the master key).
pub const MASK: &[u8] = b"mask";

/// Name of a wrapped data key in the `keys` tree: `"dk/" subject 0x00 version(u32 BE)`.
pub fn data_key_name(subject: &str, version: u32) -> Vec<u8> {
    let mut k = data_key_prefix(subject);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Prefix of every data key of a subject.
pub fn data_key_prefix(subject: &str) -> Vec<u8> {
    let mut k = DATA_KEY_PREFIX.to_vec();
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k
}

/// Name of a wrapped signing key: `"signing/" key_id(u32 BE)`.
pub fn signing_key_name(key_id: u32) -> Vec<u8> {
    let mut k = SIGNING_KEY_PREFIX.to_vec();
    k.extend_from_slice(&key_id.to_be_bytes());
    k
}

/// A subject's data key state, decoded from `"k/" subject`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    pub version: u32,
    pub shredded: bool,
}

impl KeyState {
    pub(crate) fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != 5 || v[4] > 1 {
            return Err(Error::Malformed("key state"));
        }
        Ok(KeyState {
            version: u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
            shredded: v[4] == 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const H: u64 = 3_600_000;

    #[test]
    fn hours_are_from_inclusive_to_exclusive_and_wrap_past_midnight() {
        assert!(within_hours(None, 3 * H));
        let day = Some([9, 17]);
        assert!(within_hours(day, 9 * H));
        assert!(within_hours(day, 17 * H - 1));
        assert!(!within_hours(day, 17 * H));
        assert!(!within_hours(day, 8 * H + 59 * 60_000));
        // Days later, the same hour.
        assert!(within_hours(day, 40 * 24 * H + 10 * H));
        let night = Some([22, 6]);
        assert!(within_hours(night, 23 * H));
        assert!(within_hours(night, 24 * H + 5 * H));
        assert!(!within_hours(night, 12 * H));
        assert!(!within_hours(night, 6 * H));
        assert!(within_hours(Some([0, 24]), 23 * H + 59 * 60_000));
        // Out of range: no hour at all.
        for bad in [[5, 5], [24, 3], [3, 25], [200, 1]] {
            assert!((0..24).all(|h| !within_hours(Some(bad), h * H)), "{bad:?}");
        }
    }

    #[test]
    fn sources_are_matched_against_networks_and_fail_closed() {
        let nets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("address"));
        assert!(source_allowed(&[], None));
        assert!(source_allowed(&[], ip("192.0.2.1")));
        let allowed = nets(&["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]);
        assert!(source_allowed(&allowed, ip("10.1.2.3")));
        assert!(source_allowed(&allowed, ip("127.0.0.1")));
        assert!(source_allowed(&allowed, ip("::ffff:10.9.9.9")));
        assert!(source_allowed(&allowed, ip("2001:db8::7")));
        assert!(!source_allowed(&allowed, ip("127.0.0.2")));
        assert!(!source_allowed(&allowed, ip("192.168.0.1")));
        assert!(!source_allowed(&allowed, None));
        // IPv4-mapped networks hold the IPv4 sources they map, however
        // the source is written.
        let mapped = nets(&["::ffff:10.0.0.0/104", "::ffff:203.0.113.9"]);
        assert!(source_allowed(&mapped, ip("10.200.0.1")));
        assert!(source_allowed(&mapped, ip("::ffff:10.200.0.1")));
        assert!(source_allowed(&mapped, ip("203.0.113.9")));
        assert!(!source_allowed(&mapped, ip("203.0.113.10")));
        assert!(!source_allowed(&mapped, ip("11.0.0.1")));
        assert_eq!(
            parse_network("::ffff:10.1.2.3/120").map(|n| n.to_string()),
            Some("10.1.2.0/24".to_string())
        );
        assert_eq!(
            parse_network("2001:db8::/32").map(|n| n.to_string()),
            Some("2001:db8::/32".to_string())
        );
        // One item that does not parse refuses every source.
        let broken = nets(&["10.0.0.0/8", "not-a-network"]);
        assert!(!source_allowed(&broken, ip("10.1.2.3")));
    }

    #[test]
    fn policy_terms_read_hours_and_sources() {
        let v = serde_json::json!({
            "partner_id": "p",
            "policy": {
                "purposes": {"kyc": {"fields": {"name": "reveal"}}},
                "rate_limit_per_minute": 60,
                "allowed_hours_utc": [22, 6],
                "source_ips": ["10.0.0.0/8"]
            }
        });
        let t = PolicyTerms::decode(v.to_string().as_bytes()).expect("terms");
        assert_eq!(t.allowed_hours_utc, Some([22, 6]));
        assert_eq!(t.source_ips, vec!["10.0.0.0/8".to_string()]);
        // Hours that are not two small numbers are no policy at all.
        let mut bad = v.clone();
        bad["policy"]["allowed_hours_utc"] = serde_json::json!([300, 2]);
        assert_eq!(PolicyTerms::decode(bad.to_string().as_bytes()), None);
    }

    /// A lifetime given as `null`, which the shim's schema accepts as
    /// absent, is the default here too, not a policy the vault cannot read
    /// (which refused every token of the partner as `policy_changed`).
    #[test]
    fn policy_terms_read_a_null_lifetime_as_the_default() {
        for ttl in [serde_json::Value::Null, serde_json::json!(60)] {
            let v = serde_json::json!({
                "partner_id": "p",
                "policy": {
                    "purposes": {"kyc": {"fields": {"name": "reveal"}}},
                    "max_token_ttl_secs": ttl
                }
            });
            let t = PolicyTerms::decode(v.to_string().as_bytes()).expect("terms");
            let want = ttl.as_u64().map_or(DEFAULT_TOKEN_TTL_SECS, |s| s as u32);
            assert_eq!(t.max_token_ttl_secs, want, "{v}");
        }
    }
}
