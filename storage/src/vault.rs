//! The vault: creating and opening a data dir, the group committer, and
//! reads.
//!
//! Writers hand appends to one **committer** thread through a bounded
//! channel. The committer takes everything queued (up to
//! `Options::max_group_entries` and `Options::max_group_bytes`, so that
//! under load it, the writer and the sync work on different groups at
//! once) as one commit group: it assigns seqs,
//! encrypts records under their subject's data key with the seq bound as
//! associated data, chains and hashes the entries, and signs one head over
//! the group's Merkle root, appends the group's record to the write-ahead
//! file (`wal`) and names its segment to a **syncer** thread, which makes
//! it durable (`fdatasync`) while a **writer** thread applies the group's
//! batches to sled (a group that is only log chunks waits in
//! `Store::recent` and goes to sled with the next such groups within 5 ms:
//! `Writer::defer`) and publishes it; the syncer answers the writers with
//! their receipts once both are done. The three stages overlap, so one
//! fsync serves every append that arrived while the previous one ran, and
//! a group's fsync starts without a hand-off to the writer's thread.
//!
//! An append of records that finds no other request in progress, the
//! committer idle, and a single request in the last group the committer
//! built, does the committer's part itself, on its own thread,
//! under the same lock (a **leader**, as in the group commit of
//! databases), then `fdatasync`s the segment itself and answers once the
//! writer has published the group: a lone append is spared the wake-ups
//! of the committer, of the syncer and of its own task. Any request that
//! finds another in progress queues, so that the committer builds
//! everything that arrives during a sync as one group, and a connection's
//! pipelined requests keep their order. Every `fdatasync` of the
//! write-ahead file (the syncer's, a leader's, or the one that closes a
//! full segment) runs under one lock, and one that fails poisons the
//! vault before the next one starts.
//!
//! Invariants (asserted on the write path, checked by verify on reads):
//! - seqs are contiguous from 0 and never reused; entry n's `prev_hash` is
//!   the hash of entry n-1;
//! - entries are never rewritten; an append is acknowledged only after the
//!   sync that follows its write succeeded;
//! - after a failed write or sync the vault is poisoned: it refuses every
//!   later append until it is reopened, so nothing that may not be durable
//!   is ever acknowledged.
//!
//! Derived state is kept off the commit path: the committer publishes each
//! group's state mutations to an in-memory **overlay** that every reader
//! consults first, and an **indexer** thread writes the overlay to the
//! `state` tree in large batches (one write per key however often it
//! changed), each with the `applied` marker of the last group it covers.
//! The state tree is thus always the model of the log at `applied`; opening
//! replays the entries after it.
//!
//! Write order within a group, with sled recovering a prefix of its writes
//! after a crash: (1) a pending marker of the group's own naming the
//! wrapped keys of new subjects, then those keys (key by key when that is
//! all the group does besides its log: no sled batch, whose two device
//! writes would sit beside the group's `fdatasync`), (2) the log chunks
//! (one batch, or held back), (3) the marker removed. Opening deletes the
//! keys named by a pending marker whose group never reached the log, and
//! every marker.
//!
//! A master key rotation is a group of its own: (1) the new sealed master
//! and every re-wrapped key staged under `"next/"` names with a `rotating`
//! marker, (2) the log (`rewrap` and `master` key_rotated entries), (3) one
//! batch moving the staged keys over the old ones, with the readers'
//! master switched under its lock. Opening finishes a rotation whose group
//! is in the log (the new secret opens it) and drops one whose group is not
//! (the old secret opens it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::chunk::{
    encode_chunk, KeyChain, KeyEndorsement, MerkleTree, Receipt, SignedHead, CHUNK_TARGET_BYTES,
    MAX_CHUNK_ENTRIES,
};
use crate::crypto::{
    self, data_key_aad, record_aad, signing_key_aad, KdfParams, SealedMaster, SecretKey, Unlock,
};
use crate::entry::{
    entry_hash, entry_hashes, EntryRef, Hash, Kind, MAX_PAYLOAD_LEN, MAX_SUBJECT_LEN,
};
use crate::error::{Error, Reason, Result, TokenRefusal};
use crate::overlay::{Mutation, Mutations};
use crate::state::{
    self, CredentialCreated, Genesis, KeyRotation, KeyState, ShredCommit, SubjectKeyCommit,
};
use crate::store::{Flusher, Store, FORMAT};
use crate::verify::ChainTip;
use crate::wal::{self, TreeId, Wal};

/// Most items of one request ([`Vault::append_batch`]), and the largest
/// `Options::max_group_entries`: 2^17 each. An item makes at most three
/// entries (a record of a new subject or of a key at its encryption limit
/// adds a key entry, a re-encrypting rotation two), and a group takes
/// requests while it holds fewer items than its bound, so a group holds
/// fewer than 3 × 2^18 entries: under the 2^20 a verification takes
/// (`verify::MAX_GROUP_ENTRIES`), which a vault must never write past.
pub const MAX_REQUEST_ITEMS: usize = 1 << 17;

/// Checks the items of one request: at most [`MAX_REQUEST_ITEMS`], each
/// valid ([`Append::validate`]).
fn validate_request(items: &[Append]) -> Result<()> {
    if items.len() > MAX_REQUEST_ITEMS {
        return Err(Error::Invalid(format!(
            "a batch of {} items: at most {MAX_REQUEST_ITEMS} in one request",
            items.len()
        )));
    }
    items.iter().try_for_each(Append::validate)
}

/// Most bytes a master rotation writes again in its one write-ahead
/// record (whose limit is 4 GiB): 3.5 GiB, about nine million subject
/// keys of 36-character subject ids.
pub const MAX_ROTATION_RECORD_BYTES: u64 = 7 << 29;
/// See [`MAX_REQUEST_ITEMS`].
pub const MAX_GROUP_ITEMS: usize = 1 << 17;
const _: () = assert!(3 * (MAX_GROUP_ITEMS + MAX_REQUEST_ITEMS) < crate::verify::MAX_GROUP_ENTRIES);

/// Options of [`Vault::create`] and [`Vault::open`], with documented defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Argon2id parameters for a new passphrase-sealed master key
    /// (default: the floor, m = 19 MiB, t = 2, p = 1).
    pub kdf: KdfParams,
    /// Most entries in one commit group (default 1024; at most
    /// [`MAX_GROUP_ITEMS`]). A request is never split, so a group may hold
    /// more when one request alone does.
    pub max_group_entries: usize,
    /// The committer closes a group once its requests carry this many
    /// bytes of records and event payloads (default 1 MiB).
    ///
    /// Both bounds keep the committer, the writer and the `fdatasync`
    /// working on different groups at once: a group of everything in
    /// flight leaves each stage idle while the others run (with 8,192
    /// records in flight in batches of 16, groups of 8,192 entries halved
    /// the rate; docs/benchmarks.md, "Commit groups bounded").
    pub max_group_bytes: usize,
    /// Appends that may wait for the committer before writers block (default 65536).
    pub queue_depth: usize,
    /// Sled page cache in bytes (default [`DEFAULT_CACHE_BYTES`], 64 MiB).
    pub cache_bytes: u64,
    /// Unwrapped subject data keys kept in memory by the committer (default 100,000).
    pub key_cache: usize,
    /// After an idle spell, the indexer writes derived state once this
    /// many entries are waiting (default 1,000,000) or 5 s have passed;
    /// under steady load it writes again as soon as its last write is
    /// done. A crash replays what waits at the next open.
    pub index_batch: u64,
    /// Records one subject data key may encrypt before the committer
    /// rotates the subject to a new key version by itself (default
    /// [`MAX_ENCRYPTIONS_PER_KEY`], 2^32; at least 1). See docs/keys.md.
    pub max_encryptions_per_key: u64,
    /// A write-ahead segment is closed, and sled made durable up to it
    /// (a checkpoint), once the segment holds this many bytes (default
    /// [`crate::wal::SEGMENT_BYTES`], 64 MiB). An open after a crash
    /// replays at most about this much.
    pub wal_segment_bytes: u64,
}

/// Default per-key encryption limit: 2^32 records. AES-256-GCM-SIV takes
/// 96-bit nonces; the vault's nonces are unique per process and random
/// across restarts, and a bound of 2^32 messages per key keeps the chance
/// of any repeat under a key negligible (and GCM-SIV would leak only the
/// equality of identical records on one). The committer rotates a key
/// before it would pass the limit (docs/keys.md).
pub const MAX_ENCRYPTIONS_PER_KEY: u64 = 1 << 32;

/// Default capacity of sled's page cache: 64 MiB. What a server reads
/// often (the log's last leaves, the derived state of active subjects) fits
/// in it. The capacity is not what held a restarted server's memory (sled
/// keeps one page per cache shard whatever it is; [`Vault::open`] reopens
/// sled for that), but it bounds what the cache may grow to beyond that
/// floor: growth runs to 10^7 entries gave 290-322 MiB with 64 MiB and
/// 324-352 MiB with 256 MiB (docs/benchmarks.md, "Cost growth").
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl Default for Options {
    fn default() -> Self {
        Options {
            kdf: KdfParams::default(),
            max_group_entries: 1024,
            max_group_bytes: 1 << 20,
            queue_depth: 65536,
            cache_bytes: DEFAULT_CACHE_BYTES,
            key_cache: 100_000,
            index_batch: 1_000_000,
            max_encryptions_per_key: MAX_ENCRYPTIONS_PER_KEY,
            wal_segment_bytes: crate::wal::SEGMENT_BYTES,
        }
    }
}

/// One thing to append.
pub enum Append {
    /// Personal data of a subject; encrypted under the subject's data key.
    Record {
        subject: String,
        plaintext: Zeroizing<Vec<u8>>,
    },
    /// An audit or admin event with a plain JSON payload.
    Event {
        kind: Kind,
        subject: String,
        payload: Vec<u8>,
    },
    /// Spend a one-time token: checked and burned by the committer in
    /// log order, so that of concurrent redemptions exactly one wins. Made
    /// by [`Vault::redeem`] only.
    Redeem {
        token_hash: String,
        partner_id: String,
        /// The time the token is checked at (expiry, consent, policy age,
        /// allowed hours); `None`: the clock as the committer decides the
        /// redemption.
        now_ms: Option<u64>,
        source: Option<std::net::IpAddr>,
        /// The trusted proxy that named `source`, for the audit entry.
        proxy: Option<std::net::IpAddr>,
        /// The id of the credential the partner redeems with: one revoked
        /// before the redemption, in log order, or live under another
        /// name than `partner_id`, fails it (`CredentialRevoked`), nothing
        /// written.
        credential: Option<String>,
    },
    /// Destroy every data key of a subject: a `subject_shredded` entry,
    /// then the wrapped keys are deleted. Made by [`Vault::shred`] only.
    Shred { subject: String, by: Option<String> },
    /// A new data key version for a subject (a `key_rotated` entry); with
    /// `reencrypt`, the subject's latest record appended again under it.
    /// Made by [`Vault::rotate_subject_key`] only.
    Rotate {
        subject: String,
        reencrypt: bool,
        by: Option<String>,
    },
    /// Re-wrap every key under a new master key and swap it in. Made by
    /// [`Vault::rotate_master_key`] only; the committer builds it as a
    /// commit group of its own.
    RotateMaster(Box<MasterChange>),
    /// A new signing key, endorsed by the current one in a `key_rotated`
    /// entry; heads after that entry's group are signed by it and the
    /// old key is destroyed. Made by [`Vault::rotate_signing_key`] only.
    RotateSigning { by: Option<String> },
}

/// A new master key, sealed under the new secret, and the masking secret
/// to keep (see [`Vault::mask_secret`]). Made by [`Vault::rotate_master_key`].
pub struct MasterChange {
    master: Arc<SecretKey>,
    sealed: Vec<u8>,
    mask: Zeroizing<[u8; 32]>,
    by: Option<String>,
}

impl std::fmt::Debug for MasterChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterChange(..)")
    }
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never print personal data, not even its subject id.
            Append::Record { plaintext, .. } => {
                write!(f, "Append::Record({} bytes)", plaintext.len())
            }
            Append::Event { kind, .. } => write!(f, "Append::Event({})", kind.name()),
            Append::Redeem { .. } => f.write_str("Append::Redeem(..)"),
            Append::Shred { .. } => f.write_str("Append::Shred(..)"),
            Append::Rotate { reencrypt, .. } => write!(f, "Append::Rotate(reencrypt: {reencrypt})"),
            Append::RotateMaster(_) => f.write_str("Append::RotateMaster(..)"),
            Append::RotateSigning { .. } => f.write_str("Append::RotateSigning"),
        }
    }
}

impl Append {
    /// A record from plaintext bytes.
    pub fn record(subject: impl Into<String>, plaintext: impl Into<Vec<u8>>) -> Self {
        Append::Record {
            subject: subject.into(),
            plaintext: Zeroizing::new(plaintext.into()),
        }
    }

    /// An event with a JSON payload.
    pub fn event(kind: Kind, subject: impl Into<String>, payload: &serde_json::Value) -> Self {
        Append::Event {
            kind,
            subject: subject.into(),
            payload: payload.to_string().into_bytes(),
        }
    }

    /// Bytes of the record or event payload this item carries (0 for
    /// the others), as the committer counts them against
    /// `Options::max_group_bytes`.
    fn payload_len(&self) -> usize {
        match self {
            Append::Record { plaintext, .. } => plaintext.len(),
            Append::Event { payload, .. } => payload.len(),
            _ => 0,
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Append::Redeem { .. } => {
                return Err(Error::Invalid(
                    "redemptions go through Vault::redeem".into(),
                ))
            }
            Append::Shred { .. }
            | Append::Rotate { .. }
            | Append::RotateMaster(_)
            | Append::RotateSigning { .. } => {
                return Err(Error::Invalid(
                    "key changes go through Vault::shred and the Vault::rotate_* methods".into(),
                ))
            }
            Append::Record { subject, plaintext } => {
                validate_subject(subject, true)?;
                if plaintext.len() > MAX_PAYLOAD_LEN - 16 {
                    return Err(Error::Invalid(format!(
                        "record of {} bytes exceeds the maximum of {}",
                        plaintext.len(),
                        MAX_PAYLOAD_LEN - 16
                    )));
                }
            }
            Append::Event {
                kind,
                subject,
                payload,
            } => {
                validate_subject(subject, false)?;
                if payload.len() > MAX_PAYLOAD_LEN {
                    return Err(Error::Invalid("event payload too large".into()));
                }
                match kind {
                    Kind::Genesis
                    | Kind::Record
                    | Kind::SubjectKey
                    | Kind::SubjectShredded
                    | Kind::KeyRotated => {
                        return Err(Error::Invalid(format!(
                            "{} entries are written by the vault itself",
                            kind.name()
                        )))
                    }
                    // A burn only `Vault::redeem` makes: the committer's
                    // own record of burns would miss one made here, and a
                    // redemption in the next group could spend it again.
                    Kind::TokenRedeemed => {
                        return Err(Error::Invalid(
                            "token_redeemed entries are written by Vault::redeem".into(),
                        ))
                    }
                    _ => {}
                }
                let probe = EntryRef {
                    kind: *kind,
                    seq: 0,
                    timestamp_ms: 0,
                    prev_hash: [0; 32],
                    key_version: 0,
                    nonce: [0; 12],
                    subject,
                    payload,
                };
                state::mutations(&probe)?;
            }
        }
        Ok(())
    }
}

/// Subject ids: 1 to 256 bytes of printable ASCII without spaces, so that
/// they are safe in keys, logs and URLs.
pub fn validate_subject(subject: &str, required: bool) -> Result<()> {
    if subject.is_empty() {
        return if required {
            Err(Error::Invalid("subject id is empty".into()))
        } else {
            Ok(())
        };
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(Error::Invalid(format!(
            "subject id longer than {MAX_SUBJECT_LEN} bytes"
        )));
    }
    if !subject.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Invalid(
            "subject id must be printable ASCII without spaces".into(),
        ));
    }
    Ok(())
}

/// A decrypted record.
pub struct Record {
    pub seq: u64,
    pub key_version: u32,
    pub timestamp_ms: u64,
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("seq", &self.seq)
            .field("key_version", &self.key_version)
            .field("plaintext", &format_args!("{} bytes", self.plaintext.len()))
            .finish()
    }
}

/// An entry as stored, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    pub kind: Kind,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub prev_hash: Hash,
    pub key_version: u32,
    pub nonce: [u8; 12],
    pub subject: String,
    pub payload: Vec<u8>,
    /// The entry's hash.
    pub hash: Hash,
    /// The canonical encoding.
    pub encoded: Vec<u8>,
}

/// A credential derived from the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Credential {
    #[serde(skip)]
    pub id: String,
    pub role: String,
    pub key_hash: String,
    pub name: String,
    pub seq: u64,
}

/// A credential as the log tells it: its `credential_created` entry and,
/// if it was revoked, its `credential_revoked` entry. Never the key hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    pub id: String,
    /// admin, writer, gateway, partner or auditor.
    pub role: String,
    /// A label; for a partner, the partner id.
    pub name: String,
    /// Seq of the `credential_created` entry.
    pub created_seq: u64,
    /// Its timestamp (unix ms).
    pub created_ms: u64,
    /// Seq of the `credential_revoked` entry, if revoked.
    pub revoked_seq: Option<u64>,
}

/// Every credential the log created, revoked ones included, up to
/// `scanned`. The derived state keeps live credentials only (a revocation
/// removes `"c/" id`), so listing them all needs the log; credentials are
/// few, so they are kept in memory and [`Vault::credentials`] brings the
/// index up to the durable log before each answer. Only that method
/// touches it: the commit path does not pay for it.
///
/// Invariant: `by_id` is the fold of entries `0..scanned`.
#[derive(Debug, Default)]
struct CredentialIndex {
    scanned: u64,
    by_id: BTreeMap<String, CredentialInfo>,
}

impl CredentialIndex {
    fn apply(&mut self, e: &EntryRef<'_>) -> Result<()> {
        match e.kind {
            Kind::CredentialCreated => {
                let c: CredentialCreated = serde_json::from_slice(e.payload)
                    .map_err(|_| Error::integrity(e.seq, Reason::Malformed("credential".into())))?;
                let info = CredentialInfo {
                    id: c.id.clone(),
                    role: c.role,
                    name: c.name,
                    created_seq: e.seq,
                    created_ms: e.timestamp_ms,
                    revoked_seq: None,
                };
                self.by_id.insert(c.id, info);
            }
            Kind::CredentialRevoked => {
                let c: state::CredentialRevoked = serde_json::from_slice(e.payload)
                    .map_err(|_| Error::integrity(e.seq, Reason::Malformed("credential".into())))?;
                if let Some(info) = self.by_id.get_mut(&c.id) {
                    info.revoked_seq.get_or_insert(e.seq);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Entries read per step while the credential index catches up.
const CREDENTIAL_SCAN_PAGE: u64 = 10_000;

/// What [`Vault::create`] returns besides the vault.
pub struct Created {
    pub vault: Vault,
    /// The initial admin API key: shown once, stored only as a hash.
    pub admin_api_key: Zeroizing<String>,
    pub admin_credential_id: String,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

/// Prefix of one-time tokens, so that secret scanners can spot leaked ones.
pub const TOKEN_PREFIX: &str = "fvt_";

/// Prefix of API keys, so that secret scanners can spot leaked ones.
pub const API_KEY_PREFIX: &str = "fvk_";

/// A new random API key: the prefix and 256 random bits in hex.
pub fn generate_api_key() -> Zeroizing<String> {
    random_secret(API_KEY_PREFIX)
}

/// `prefix` and 256 random bits in hex, built in buffers that are wiped
/// (a `format!` of `hex::encode` would leave the hex in a freed string).
fn random_secret(prefix: &str) -> Zeroizing<String> {
    let mut b = Zeroizing::new([0u8; 32]);
    crypto::random_bytes(b.as_mut());
    let mut hex = Zeroizing::new([0u8; 64]);
    // 64 bytes are exactly what 32 bytes' hex takes.
    let _ = hex::encode_to_slice(b.as_ref(), hex.as_mut());
    let mut s = Zeroizing::new(String::with_capacity(prefix.len() + 64));
    s.push_str(prefix);
    // Hex digits are ASCII.
    s.extend(hex.iter().map(|&c| char::from(c)));
    s
}

/// Hex BLAKE3 of an API key: the only form in which keys are stored. The
/// keys carry 256 random bits, so a fast hash is enough.
pub fn api_key_hash(key: &str) -> String {
    hex::encode(blake3::hash(key.as_bytes()).as_bytes())
}

/// BLAKE3 `derive_key` context of [`certificate_key_hash`].
pub const CERTIFICATE_CONTEXT: &str = "fintrust-vault 2026 client certificate v1";

/// The key hash of a credential held by the client certificate whose DER
/// has this SHA-256: a BLAKE3 key derivation under its own context, so
/// that no API key (whose hash is a plain BLAKE3 of the key) can present
/// it, and the public fingerprint alone authenticates nobody.
pub fn certificate_key_hash(cert_sha256: &[u8; 32]) -> String {
    hex::encode(blake3::derive_key(CERTIFICATE_CONTEXT, cert_sha256))
}

type Reply = oneshot::Sender<Result<Vec<Receipt>>>;

struct Request {
    items: Vec<Append>,
    reply: Reply,
}

impl Request {
    /// Bytes of records and event payloads its items carry.
    fn payload_len(&self) -> usize {
        self.items.iter().map(Append::payload_len).sum()
    }
}

/// What became of a request that may lead ([`Vault::lead`]).
enum Lead {
    /// Built, written ahead and handed to the writer by its own thread.
    Led(Led),
    /// To be queued for the committer's thread.
    Queue(Request),
    /// Not built: the vault stopped (its reply is dropped).
    Gone,
}

/// One request counted in `Shared::active` until it is answered, or its
/// caller gave up on it.
struct Active<'a> {
    count: &'a AtomicUsize,
    /// No other request was in progress when this one started.
    alone: bool,
}

impl<'a> Active<'a> {
    fn new(count: &'a AtomicUsize) -> Active<'a> {
        let before = count.fetch_add(1, Ordering::AcqRel);
        Active {
            count,
            alone: before == 0,
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Synced {
    replies: Vec<(Reply, Result<Vec<Receipt>>)>,
    head: Option<SignedHead>,
}

/// What the syncer is told, in this order for each group: by the
/// committer, the segment its record was written to (as soon as it is, so
/// that the `fdatasync` runs while the writer applies the group to sled);
/// by the writer, which has the group only after that, the replies, once
/// the group is in sled and published.
enum ToSyncer {
    Flush(Arc<File>),
    Done(Synced),
}

/// The append-only, encrypted, hash-chained and signed log of one data dir.
///
/// Cheap to share behind an `Arc`; dropping the last handle stops the
/// committer after it has finished what was queued.
pub struct Vault {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.inner.store.dir)
            .field("public_key", &hex::encode(self.inner.public_key.as_bytes()))
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<Store>,
    /// The master key the key store is wrapped under. Readers hold the
    /// read lock from reading a wrapped key to unwrapping it; the writer
    /// holds the write lock while it swaps a rotation's keys in, so a
    /// reader never pairs a key with the other master.
    master: Arc<RwLock<Arc<SecretKey>>>,
    /// The masking secret: derived from the vault's first master key and
    /// kept across master rotations (`keys/"mask"` after the first one).
    mask: Zeroizing<[u8; 32]>,
    kdf: KdfParams,
    public_key: VerifyingKey,
    vault_id: [u8; 16],
    tx: RwLock<Option<mpsc::Sender<Request>>>,
    /// The committer, which a request may take to build its own group
    /// when no other request is in progress ([`Vault::lead`]).
    leader: LeaderSlot,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    max_encryptions: u64,
    /// Credentials from the log, for [`Vault::credentials`].
    credentials: Mutex<CredentialIndex>,
}

/// Where an open's [`Vault::revocations`] count starts: 2^40 apart for
/// each open in this process, so that no count a caller kept from an
/// earlier open (about to see as many revocations as it missed) equals
/// one of a later open.
fn first_revocation_count() -> u64 {
    static OPENS: AtomicU64 = AtomicU64::new(0);
    OPENS.fetch_add(1, Ordering::Relaxed).wrapping_shl(40)
}

/// State the committer, syncer and indexer share with readers.
struct Shared {
    poisoned: AtomicBool,
    /// Credentials revoked since the vault was opened, counted as their
    /// groups are published ([`Vault::revocations`]), from this open's
    /// [`first_revocation_count`].
    revocations: AtomicU64,
    /// Requests in progress: from before they are queued until they are
    /// answered. Only a request that finds none builds its group itself
    /// ([`Vault::lead`]); any other waits in the queue, so that it can
    /// neither overtake a request sent before it on the same connection
    /// nor miss the group that the committer builds of everything that
    /// arrived during a sync.
    active: AtomicUsize,
    /// Requests in the last group the committer's thread built. A request
    /// leads only when that was one: after a group of many is answered at
    /// once, the next request finds none in progress too, but the others
    /// follow it within microseconds, and a leader would hold up the
    /// runtime thread that should take them in (protocol appends from 64
    /// clients: 4% fewer when it did).
    last_group: AtomicUsize,
    /// Latest durable signed head.
    head: RwLock<Option<SignedHead>>,
    /// Held during each `fdatasync` of the write-ahead file
    /// ([`sync_segments`]).
    wal_sync: Mutex<()>,
    overlay: Mutex<Overlay>,
    /// Held by each write of the derived state ([`write_index`]), and by a
    /// live reindex that needs the state tree to stand still while it
    /// compares it ([`crate::reindex`]).
    index_gate: crate::reindex::IndexGate,
    /// Wakes the indexer early when the overlay is large.
    overlay_full: std::sync::Condvar,
    /// Tells the indexer to write everything and stop.
    stopping: AtomicBool,
    /// Creation and use of every subject data key, as of the groups the
    /// writer has published.
    key_uses: Mutex<KeyUses>,
    /// The endorsements of signing keys 1.. as of the groups the writer
    /// has published (key 0 is the genesis key).
    signing_chain: RwLock<Vec<KeyEndorsement>>,
    /// Counts of groups, `fdatasync`s and index writes, for
    /// [`Vault::pipeline_stats`].
    counters: crate::stats::Counters,
}

/// When a subject data key was created and how many records it encrypted.
#[derive(Debug, Clone, Default)]
pub struct KeyUse {
    /// Seq of the `subject_key` or `key_rotated` entry that committed it.
    pub created_seq: u64,
    /// Timestamp of that entry (unix ms).
    pub created_ms: u64,
    /// Records encrypted under the key (reencryptions included), as of
    /// the groups published. The committer holds the same counter in its
    /// key cache, so that the writer publishes a record's use by adding
    /// to it, not by looking the subject up.
    encryptions: UseCounter,
}

impl KeyUse {
    /// Records encrypted under the key, as of the groups published.
    pub fn encryptions(&self) -> u64 {
        self.encryptions.load(Ordering::Relaxed)
    }
}

/// The count of records encrypted under one subject data key.
type UseCounter = Arc<AtomicU64>;

#[derive(Debug, Default)]
struct SubjectKeys {
    versions: BTreeMap<u32, KeyUse>,
    shredded: bool,
}

/// Every subject data key the log created, kept in memory (about 100
/// bytes per key): built by the verification at open, then kept up by the
/// writer as it publishes groups.
#[derive(Debug, Default)]
pub(crate) struct KeyUses {
    subjects: BTreeMap<String, SubjectKeys>,
    total: u64,
    /// Seq and timestamp of the latest master rotation.
    master_rotated: Option<(u64, u64)>,
    /// Timestamp of the latest signing key rotation.
    signing_rotated: Option<u64>,
}

impl KeyUses {
    pub(crate) fn created(&mut self, subject: &str, version: u32, seq: u64, ts: u64) {
        self.created_with(subject, version, seq, ts, UseCounter::default());
    }

    /// A key created with `counter` as its count of encryptions (the one
    /// the committer that created it holds).
    fn created_with(
        &mut self,
        subject: &str,
        version: u32,
        seq: u64,
        ts: u64,
        counter: UseCounter,
    ) {
        let k = self.subjects.entry(subject.to_string()).or_default();
        let new = KeyUse {
            created_seq: seq,
            created_ms: ts,
            encryptions: counter,
        };
        if k.versions.insert(version, new).is_none() {
            self.total += 1;
        }
    }

    pub(crate) fn master_rotated(&mut self, seq: u64, ts: u64) {
        self.master_rotated = Some((seq, ts));
    }

    pub(crate) fn signing_rotated(&mut self, ts: u64) {
        self.signing_rotated = Some(ts);
    }

    /// `n` records encrypted under `subject`'s key `version`.
    pub(crate) fn encrypted_times(&mut self, subject: &str, version: u32, n: u64) {
        if let Some(k) = self
            .subjects
            .get_mut(subject)
            .and_then(|s| s.versions.get_mut(&version))
        {
            k.encryptions.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn shredded(&mut self, subject: &str) {
        if let Some(s) = self.subjects.get_mut(subject) {
            s.shredded = true;
        }
    }

    /// The counter of `subject`'s key `version`, if a published group
    /// created it.
    fn counter(&self, subject: &str, version: u32) -> Option<&UseCounter> {
        self.subjects
            .get(subject)
            .and_then(|s| s.versions.get(&version))
            .map(|k| &k.encryptions)
    }
}

/// Where a subject data key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLife {
    /// The subject's current version: new records are encrypted under it.
    Active,
    /// An older version: still opens the records written under it.
    Retired,
    /// Destroyed by a shred: nothing opens its records any more.
    Shredded,
}

impl KeyLife {
    /// Stable name: `active`, `retired`, `shredded`.
    pub fn name(self) -> &'static str {
        match self {
            KeyLife::Active => "active",
            KeyLife::Retired => "retired",
            KeyLife::Shredded => "shredded",
        }
    }
}

/// One subject data key version in [`KeyStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectKeyStatus {
    pub subject: String,
    pub version: u32,
    pub created_seq: u64,
    pub created_ms: u64,
    pub encryptions: u64,
    pub life: KeyLife,
}

/// The vault's keys: the master and signing keys, and a page of subject
/// data keys in (subject, version) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// Timestamp of the entry that committed to the current master key:
    /// genesis, or the latest master rotation.
    pub master_created_ms: u64,
    /// Keys wrapped under the master key: the signing key and every
    /// subject data key ever created (shredded ones included).
    pub master_wraps: u64,
    /// Id of the current signing key (0 until the first rotation).
    pub signing_key_id: u32,
    /// Timestamp of the entry that committed to the current signing key:
    /// genesis, or the latest signing rotation.
    pub signing_created_ms: u64,
    /// The per-key encryption limit in force.
    pub encryption_limit: u64,
    pub subject_keys: Vec<SubjectKeyStatus>,
    /// More subject keys follow the last one in `subject_keys`.
    pub more: bool,
}

/// What [`Vault::rotate_subject_key`] did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The subject's new key version.
    pub version: u32,
    /// Receipt of the `key_rotated` entry.
    pub receipt: Receipt,
    /// Receipt of the re-encrypted copy of the latest record, if asked
    /// for (and the subject had a record).
    pub reencrypted: Option<Receipt>,
}

/// Derived-state mutations in the log but not yet in the state tree.
#[derive(Default)]
struct Overlay {
    /// Key → (seq of the group that set it, value or removal).
    map: Mutations,
    /// The mutations the indexer is writing to the tree (older than
    /// `map`'s): taken out of `map` whole, so that the committer never
    /// waits for a copy, and read until they are in the tree.
    frozen: Option<Arc<Mutations>>,
    /// Last seq whose mutations are in the overlay (or already in the tree).
    last_seq: Option<u64>,
    /// Entries published since the last index write.
    waiting: u64,
}

impl Shared {
    /// A derived-state value: the overlay first, then the tree.
    fn state_get(&self, tree: &sled::Tree, key: &[u8]) -> Result<Option<sled::IVec>> {
        {
            // Never skipped, even after a panic under its lock: it holds
            // acknowledged revocations and burns the tree has not yet.
            let o = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
            let newest = o.map.get(key);
            if let Some((_, v)) = newest.or_else(|| o.frozen.as_ref()?.get(key)) {
                return Ok(v.as_deref().map(sled::IVec::from));
            }
        }
        Ok(tree.get(key)?)
    }

    /// Every derived-state value whose key starts with `prefix`, in key
    /// order: [`Shared::state_get`] for a range, the overlay over the tree.
    /// The indexer is held off meanwhile: a write of it between the copy of
    /// the overlay and the scan of the tree could put a newer value in the
    /// tree (a revocation) that the older copy then hid.
    fn state_scan(&self, tree: &sled::Tree, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let _gate = self.index_gate.hold_off();
        let mut newer: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        {
            let o = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
            // The frozen mutations, then the newer `map` over them.
            for muts in o.frozen.iter().map(|f| &**f).chain([&o.map]) {
                for (k, (_, v)) in muts.iter().filter(|(k, _)| k.starts_with(prefix)) {
                    newer.insert(k.clone(), v.clone());
                }
            }
        }
        let mut found = BTreeMap::new();
        for kv in tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            found.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in newer {
            match v {
                Some(v) => found.insert(k, v),
                None => found.remove(&k),
            };
        }
        Ok(found)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.write() {
            tx.take();
        }
        let threads = match self.threads.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => return,
        };
        // Committer, writer, syncer and checkpointer end in turn when the
        // channel closes; the indexer, last, writes what they left in the
        // overlay.
        let stopped = !threads.is_empty();
        let mut threads = threads.into_iter();
        if let Some(committer) = threads.next() {
            let _ = committer.join();
        }
        // The committer's thread drops the leader when it ends, unless it
        // panicked: the writer then stops once the leader, which holds its
        // channel, is gone.
        self.leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for t in threads.by_ref().take(3) {
            let _ = t.join();
        }
        self.shared.stopping.store(true, Ordering::Release);
        // Under the overlay's lock, so that the indexer cannot miss it
        // between its check and its wait.
        let overlay = self.shared.overlay.lock();
        self.shared.overlay_full.notify_all();
        drop(overlay);
        for t in threads {
            let _ = t.join();
        }
        // Once sled is durable the write-ahead file holds nothing sled
        // lacks; when that fails it stays, and the next open replays it.
        // A poisoned vault keeps it too: the writer may have left log
        // chunks it could not apply to sled.
        if stopped && !self.shared.poisoned.load(Ordering::Acquire) {
            let checkpoint = self
                .store
                .sync()
                .and_then(|()| crate::wal::remove_all(&self.store.dir));
            if let Err(e) = checkpoint {
                tracing::error!(error = %e, "final checkpoint failed; the next open replays the write-ahead file");
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Vault {
    /// Creates a vault in `dir`: master key sealed under `unlock`, signing
    /// key, genesis entry, and an initial admin credential. A creation in
    /// `dir` that did not finish is started over ([`Error::Unfinished`]);
    /// an existing vault is refused.
    pub fn create(dir: &Path, unlock: &Unlock, opts: Options) -> Result<Created> {
        let (store, creating) = Store::create(dir, opts.cache_bytes, Flusher::Running)?;
        let mut vault_id = [0u8; 16];
        crypto::random_bytes(&mut vault_id);
        let master = SecretKey::generate();
        let sealed = SealedMaster::seal(&master, unlock, opts.kdf, &vault_id)?.encode();
        let signing = SigningKey::generate(&mut rand_core::OsRng);
        let public_key = signing.verifying_key();
        let wrapped_signing = crypto::wrap(&master, &signing_key_aad(0), signing.as_bytes());

        let mut keys = sled::Batch::default();
        keys.insert(b"master".to_vec(), sealed.clone());
        keys.insert(state::signing_key_name(0), wrapped_signing.clone());
        store.keys.apply_batch(keys)?;
        store.write_meta(&vault_id, &public_key)?;
        store.sync()?;

        let genesis = Genesis {
            format: FORMAT,
            vault_id: hex::encode(vault_id),
            public_key: hex::encode(public_key.as_bytes()),
            sealed_master_hash: hex::encode(blake3::hash(&sealed).as_bytes()),
            signing_key_hash: hex::encode(blake3::hash(&wrapped_signing).as_bytes()),
        };
        let genesis_payload =
            serde_json::to_vec(&genesis).map_err(|e| Error::Invalid(e.to_string()))?;
        let admin_api_key = generate_api_key();
        let admin_credential_id = format!("admin-{}", &api_key_hash(&admin_api_key)[..8]);
        let admin = CredentialCreated {
            id: admin_credential_id.clone(),
            role: "admin".into(),
            key_hash: api_key_hash(&admin_api_key),
            name: "initial admin".into(),
            recorded_by: None,
            client_cert_sha256: None,
        };
        let admin_payload =
            serde_json::to_vec(&admin).map_err(|e| Error::Invalid(e.to_string()))?;

        // Genesis goes through the committer like every other entry, so
        // that it is chained, signed and durable in the same way.
        let initial = vec![
            Append::Event {
                kind: Kind::Genesis,
                subject: String::new(),
                payload: genesis_payload,
            },
            Append::Event {
                kind: Kind::CredentialCreated,
                subject: String::new(),
                payload: admin_payload,
            },
        ];
        let mask = derive_mask(&master);
        let (vault, _) = Self::start(
            store,
            (master, mask),
            (signing, Vec::new()),
            vault_id,
            ChainPos::default(),
            &opts,
            initial,
            KeyUses::default(),
        )?;
        // Genesis and the admin credential are durable: the vault exists.
        creating.finish()?;
        Ok(Created {
            vault,
            admin_api_key,
            admin_credential_id,
        })
    }

    /// Whether `dir` holds a vault whose creation did not finish (which
    /// [`Vault::open`] refuses as [`Error::Unfinished`], and
    /// [`Vault::create`] starts over).
    pub fn is_unfinished(dir: &Path) -> bool {
        crate::store::is_unfinished(dir)
    }

    /// Removes what a creation in `dir` that did not finish left there, as
    /// [`Vault::create`] does first; `Ok(false)` when there is none. Refused
    /// (`Locked`) while that creation still runs or a process holds the
    /// vault's database, and (`DirRefused`, nothing removed) when the dir
    /// holds more log than a creation writes, or the record an open left.
    pub fn start_over(dir: &Path) -> Result<bool> {
        crate::store::start_over(dir)
    }

    /// Opens an existing vault. Fails with `WrongSecret` when `unlock` is
    /// wrong: after the recovery every open makes first (the write-ahead
    /// replay, which a master rotation's staged keys may need before the
    /// secret can be checked), before anything else is written. Refuses to
    /// open (fail closed) when the chain does not verify, naming the seq
    /// and the reason.
    pub fn open(dir: &Path, unlock: &Unlock, opts: Options) -> Result<Vault> {
        let store = Store::open_existing_with(dir, opts.cache_bytes, Flusher::Off)?;
        let vault_id = store.vault_id()?;
        // A master rotation that reached the log but whose swap a crash
        // interrupted: its staged keys are the committed ones, so the new
        // secret opens the vault and the old one does not (docs/keys.md).
        let staged = rotation_committed(&store)?;
        let stored = |name: &[u8]| -> Result<Option<sled::IVec>> {
            if staged {
                Ok(store.keys.get([STAGED, name].concat())?)
            } else {
                Ok(store.keys.get(name)?)
            }
        };
        let sealed = stored(state::MASTER)?.ok_or(Error::Malformed("no sealed master key"))?;
        let sealed = SealedMaster::decode(&sealed)?;
        // A master rotation seals the new master at least as hard as the
        // one it replaces: the stored settings, raised where these
        // options ask more, never lowered to the options' defaults.
        let opts = Options {
            kdf: opts.kdf.at_least(sealed.kdf),
            ..opts
        };
        let master = sealed.unseal(unlock, &vault_id)?;
        let public_key = store
            .stored_public_key()
            .ok_or(Error::Malformed("no public key"))?;
        let mask = match stored(state::MASK)? {
            Some(w) => {
                let k = crypto::unwrap_key(&master, &crypto::mask_key_aad(), &w).ok_or(
                    Error::integrity(0, Reason::KeyMismatch("mask key does not unwrap".into())),
                )?;
                Zeroizing::new(*k.as_bytes())
            }
            None => derive_mask(&master),
        };

        // Recovery: verify everything (chain, genesis and metadata, derived
        // state at its applied marker, key store) and refuse to serve on any
        // failure; then replay derived state past the applied marker and
        // drop keys of a group that never reached the log. The signatures
        // of the prefix an earlier open verified are taken from its record
        // (`verified`); on any failure with it, everything is verified
        // again without it, so the refusal is that of a full verification.
        let verify = |prefix, uses: &mut KeyUses| {
            crate::verify::verify_store_with(
                &store,
                &crate::verify::VerifyOptions {
                    public_key: Some(public_key),
                    verified_prefix: prefix,
                    ..Default::default()
                },
                Some(uses),
            )
        };
        let prefix = crate::verified::read(&store.dir, &master, &vault_id);
        let mut uses = KeyUses::default();
        let mut report = verify(prefix, &mut uses)?;
        if prefix.is_some() && report.failure.is_some() {
            tracing::warn!("the log does not match the verified-prefix record: verifying it all");
            uses = KeyUses::default();
            report = verify(None, &mut uses)?;
        }
        if let Some((seq, reason)) = report.failure {
            return Err(Error::integrity(seq, reason));
        }
        // One line at each open: how much was checked, and how many
        // groups' signatures the verified-prefix record stood for.
        tracing::info!(
            entries = report.entries,
            groups = report.groups,
            signatures_from_record = report.vouched_groups,
            "log verified"
        );
        if let (Some(last_hash), Some(heads_digest)) = (report.head, report.heads_digest) {
            let verified = crate::verify::VerifiedPrefix {
                entries: report.entries,
                last_hash,
                heads_digest,
            };
            // Nothing to write when the log has not grown since the record.
            if prefix != Some(verified) {
                if let Err(e) = crate::verified::write(&store.dir, &verified, &master, &vault_id) {
                    tracing::warn!(error = %e, "cannot record the verified prefix");
                }
            }
        }
        let tip = ChainTip {
            entries: report.entries,
            last_hash: report.head,
            head: report.signed_head,
            groups: report.groups,
        };
        replay_tail(&store, tip.entries)?;
        recover_pending(&store, tip.entries)?;
        recover_shredding(&store, tip.entries)?;
        recover_rotation(&store, tip.entries)?;
        for id in &report.retired_signing_pending {
            store.keys.remove(state::signing_key_name(*id))?;
        }
        store.sync()?;
        // The scan above left a log leaf in each of sled's cache shards,
        // which it never evicts (about 300 MB on a 10^7-entry log): a
        // fresh sled starts the server with an empty cache.
        let store = store.reopen(opts.cache_bytes, Flusher::Running)?;

        // The current signing key: the last one of the log's chain, which
        // verify found committed to in the key store.
        let chain = KeyChain::from_endorsements(public_key, &report.signing_keys)
            .map_err(|e| Error::integrity(0, Reason::KeyMismatch(e.to_string())))?;
        let signing_id = chain.current_id();
        let wrapped = store
            .keys
            .get(state::signing_key_name(signing_id))?
            .ok_or(Error::Malformed("no signing key"))?;
        let seed = crypto::unwrap_key(&master, &signing_key_aad(signing_id), &wrapped).ok_or(
            Error::integrity(0, Reason::KeyMismatch("signing key does not unwrap".into())),
        )?;
        let signing = SigningKey::from_bytes(seed.as_bytes());
        if signing.verifying_key() != *chain.current() {
            return Err(Error::integrity(
                0,
                Reason::KeyMismatch("signing key does not match the log's key chain".into()),
            ));
        }

        let pos = ChainPos {
            next_seq: tip.entries,
            last_hash: tip.last_hash.unwrap_or([0; 32]),
            last_ts: tip.head.map_or(0, |h| h.timestamp_ms),
        };
        let (vault, _) = Self::start(
            store,
            (master, mask),
            (signing, report.signing_keys),
            vault_id,
            pos,
            &opts,
            Vec::new(),
            uses,
        )?;
        if let Ok(mut h) = vault.inner.shared.head.write() {
            *h = tip.head;
        }
        Ok(vault)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        store: Store,
        (master, mask): (SecretKey, Zeroizing<[u8; 32]>),
        (signing, signing_chain): (SigningKey, Vec<KeyEndorsement>),
        vault_id: [u8; 16],
        pos: ChainPos,
        opts: &Options,
        initial: Vec<Append>,
        uses: KeyUses,
    ) -> Result<(Vault, Vec<Receipt>)> {
        let store = Arc::new(store);
        let signing_chain_len = signing_chain.len();
        let master = Arc::new(master);
        let shared_master = Arc::new(RwLock::new(master.clone()));
        let shared = Arc::new(Shared {
            poisoned: AtomicBool::new(false),
            revocations: AtomicU64::new(first_revocation_count()),
            active: AtomicUsize::new(0),
            last_group: AtomicUsize::new(0),
            head: RwLock::new(None),
            wal_sync: Mutex::new(()),
            overlay: Mutex::new(Overlay {
                last_seq: pos.next_seq.checked_sub(1),
                ..Overlay::default()
            }),
            index_gate: crate::reindex::IndexGate::default(),
            overlay_full: std::sync::Condvar::new(),
            stopping: AtomicBool::new(false),
            key_uses: Mutex::new(uses),
            signing_chain: RwLock::new(signing_chain),
            counters: crate::stats::Counters::default(),
        });
        let (tx, rx) = mpsc::channel(opts.queue_depth.max(1));
        let (sync_tx, sync_rx) = std::sync::mpsc::channel::<ToSyncer>();
        let mut committer = Committer {
            store: store.clone(),
            master: master.clone(),
            signing_id: u32::try_from(signing_chain_len).unwrap_or(u32::MAX),
            signing,
            pos,
            keys: HashMap::new(),
            shredded: HashSet::new(),
            publish_first: false,
            max_encryptions: opts.max_encryptions_per_key.max(1),
            key_cache: opts.key_cache.max(1),
            max_group: GroupBound {
                entries: opts.max_group_entries.clamp(1, MAX_GROUP_ITEMS),
                bytes: opts.max_group_bytes.max(1),
            },
            nonces: crypto::NonceSource::default(),
            refusal: None,
            burned: HashMap::new(),
            credentials: HashMap::new(),
            terms: HashMap::new(),
            minted: HashMap::new(),
            minted_trim_at: MINTED_TRIM,
            shared: shared.clone(),
            wal: Wal::new(&store.dir, opts.wal_segment_bytes),
            record: Vec::new(),
            syncer: sync_tx.clone(),
            keep_segment: false,
            kept_segment: None,
        };
        let (ckpt_tx, ckpt_rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            store: store.clone(),
            master: shared_master.clone(),
            shared: shared.clone(),
            index_batch: opts.index_batch.max(1),
            checkpoint: Some(ckpt_tx),
            syncer: sync_tx,
            deferred_bytes: 0,
            deferred_since: None,
            deferred_markers: Vec::new(),
        };
        let mut receipts = Vec::new();
        if !initial.is_empty() {
            // Committed on this thread before the committer starts, so that
            // creating a vault needs no runtime.
            let (reply, mut rx) = oneshot::channel();
            let (unused, _) = std::sync::mpsc::sync_channel(1);
            let mut built = committer.build(
                vec![Request {
                    items: initial,
                    reply,
                }],
                &unused,
            );
            // Its record is synced here rather than named to the syncer,
            // which would sync it only after `create` returned: a stray
            // `fdatasync` in whatever the caller measures first.
            if let Some(segment) = committer.write_ahead_kept(&mut built, &unused) {
                sync_segments(&shared, &[&segment])?;
            }
            let synced = writer.finish(Box::new(built));
            writer.apply_deferred()?;
            store.sync()?;
            for (reply, r) in synced.replies {
                let _ = reply.send(r);
            }
            receipts = rx.try_recv().map_err(|_| Error::Closed)??;
            write_index(&store, &shared)?;
            if let Ok(mut h) = shared.head.write() {
                *h = synced.head;
            }
        }
        // Bounded, so that the committer runs at most a few groups ahead
        // of the writer.
        let (writer_tx, writer_rx) = std::sync::mpsc::sync_channel(4);
        let max_group = committer.max_group;
        let leader: LeaderSlot = Arc::new(Mutex::new(Some(Leader {
            committer,
            writer: writer_tx,
        })));
        let committer_slot = leader.clone();
        let c = std::thread::Builder::new()
            .name("vault-committer".into())
            .spawn(move || run_committer(&committer_slot, rx, max_group))?;
        let w = std::thread::Builder::new()
            .name("vault-writer".into())
            .spawn(move || writer.run(writer_rx))?;
        let syncer_shared = shared.clone();
        let s = std::thread::Builder::new()
            .name("vault-syncer".into())
            .spawn(move || run_syncer(&syncer_shared, sync_rx))?;
        let checkpoint_store = store.clone();
        let checkpoint_shared = shared.clone();
        let k = std::thread::Builder::new()
            .name("vault-checkpointer".into())
            .spawn(move || run_checkpointer(&checkpoint_store, &checkpoint_shared, ckpt_rx))?;
        let indexer_store = store.clone();
        let indexer_shared = shared.clone();
        let i = std::thread::Builder::new()
            .name("vault-indexer".into())
            .spawn(move || run_indexer(&indexer_store, &indexer_shared))?;
        let pk = store
            .stored_public_key()
            .ok_or(Error::Malformed("no public key"))?;
        let vault = Vault {
            inner: Arc::new(Inner {
                store,
                master: shared_master,
                mask,
                kdf: opts.kdf,
                public_key: pk,
                vault_id,
                tx: RwLock::new(Some(tx)),
                leader,
                threads: Mutex::new(vec![c, w, s, k, i]),
                shared,
                max_encryptions: opts.max_encryptions_per_key.max(1),
                credentials: Mutex::new(CredentialIndex::default()),
            }),
        };
        Ok((vault, receipts))
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>> {
        if self.inner.shared.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        self.inner
            .tx
            .read()
            .map_err(|_| Error::Closed)?
            .clone()
            .ok_or(Error::Closed)
    }

    fn submit_raw(&self, items: Vec<Append>) -> Result<Vec<Receipt>> {
        let (reply, rx) = oneshot::channel();
        let _active = Active::new(&self.inner.shared.active);
        self.sender()?
            .blocking_send(Request { items, reply })
            .map_err(|_| Error::Closed)?;
        rx.blocking_recv().map_err(|_| Error::Closed)?
    }

    /// Appends one item; resolves when it is durable, with its receipt.
    pub async fn append(&self, item: Append) -> Result<Receipt> {
        let mut r = self.append_batch(vec![item]).await?;
        r.pop().ok_or(Error::Closed)
    }

    /// Appends items each as a request of its own, queued in order: one
    /// refused (invalid, or of a shredded subject) does not refuse the
    /// others, as if each were an [`Vault::append`] made in turn, but the
    /// caller waits once for all of them. For a server answering a
    /// connection's pipelined appends together. Resolves when every item
    /// is durable or refused, with one result per item, in order.
    pub async fn append_each(&self, items: Vec<Append>) -> Vec<Result<Receipt>> {
        let mut queued = Vec::with_capacity(items.len());
        let mut tx = None;
        for item in items {
            let q = match item.validate() {
                Ok(()) => self.queue(&mut tx, vec![item]).await,
                Err(e) => Err(e),
            };
            queued.push(q);
        }
        let mut out = Vec::with_capacity(queued.len());
        for q in queued {
            out.push(match q {
                Ok((rx, _active)) => rx
                    .await
                    .unwrap_or(Err(Error::Closed))
                    .and_then(|mut r| r.pop().ok_or(Error::Closed)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Queues `items` as one request for the committer's thread (through
    /// `tx`, taken from the vault the first time); the receiver of its
    /// answer, and its count in `Shared::active` until then.
    async fn queue(
        &self,
        tx: &mut Option<mpsc::Sender<Request>>,
        items: Vec<Append>,
    ) -> Result<(oneshot::Receiver<Result<Vec<Receipt>>>, Active<'_>)> {
        let (reply, rx) = oneshot::channel();
        let active = Active::new(&self.inner.shared.active);
        let sender = match tx {
            Some(s) => s,
            None => tx.insert(self.sender()?),
        };
        sender
            .send(Request { items, reply })
            .await
            .map_err(|_| Error::Closed)?;
        Ok((rx, active))
    }

    /// Appends several items atomically (all or none) in order; resolves
    /// when they are durable.
    pub async fn append_batch(&self, items: Vec<Append>) -> Result<Vec<Receipt>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        validate_request(&items)?;
        self.request(items).await
    }

    /// Has `items` built into a commit group, by this task when it may
    /// lead ([`Vault::lead`]), otherwise by the committer's thread, and
    /// waits until the group is durable.
    async fn request(&self, items: Vec<Append>) -> Result<Vec<Receipt>> {
        let (reply, rx) = oneshot::channel();
        let active = Active::new(&self.inner.shared.active);
        let req = Request { items, reply };
        let lone = active.alone && self.inner.shared.last_group.load(Ordering::Acquire) <= 1;
        let req = if lone {
            self.lead(req)?
        } else {
            Lead::Queue(req)
        };
        match req {
            Lead::Queue(req) => self.sender()?.send(req).await.map_err(|_| Error::Closed)?,
            Lead::Led(led) => {
                // The `fdatasync` on this thread: a lone request would
                // otherwise wait for the syncer's wake-up, and then for
                // its own.
                let shared = &self.inner.shared;
                let synced = match &led.segment {
                    Some(f) => sync_segments(shared, &[f]),
                    None => Ok(()),
                };
                if shared.active.load(Ordering::Acquire) > 1 {
                    // Others came in meanwhile: not alone after all. None
                    // leads until the committer's thread builds a group
                    // of one request again.
                    shared.last_group.store(usize::MAX, Ordering::Release);
                }
                if let Ok(done) = led.replies.await {
                    answer(shared, synced, vec![done]);
                }
            }
            Lead::Gone => {}
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Builds a lone request (no other in progress) into a commit group
    /// on the calling thread and hands it to the writer, as the committer's
    /// thread would, when the committer is idle; otherwise gives `req`
    /// back to be queued. This spares a lone append the committer
    /// thread's wake-up, while under load the thread builds everything
    /// queued as one group as before. Only appends of records lead
    /// ([`Leader::may_lead`]).
    fn lead(&self, req: Request) -> Result<Lead> {
        let mut guard = match self.inner.leader.try_lock() {
            Ok(g) => g,
            Err(TryLockError::WouldBlock) => return Ok(Lead::Queue(req)),
            Err(TryLockError::Poisoned(p)) => {
                // The committer's thread panicked midway through a group.
                p.into_inner().take();
                return Err(Error::Closed);
            }
        };
        let Some(leader) = guard.as_mut() else {
            return Err(Error::Closed);
        };
        if !leader.may_lead(&req.items) {
            return Ok(Lead::Queue(req));
        }
        // Still open: a closing vault takes no new request.
        drop(self.sender()?);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| leader.lead(req))) {
            Ok(Some(led)) => Ok(Lead::Led(led)),
            _ => {
                // The writer is gone, or building panicked midway (the
                // request's reply is dropped with it: `Closed`): as when
                // the committer's thread ends, nothing more is built.
                guard.take();
                Ok(Lead::Gone)
            }
        }
    }

    /// Blocking form of [`Vault::append_batch`], for threads outside an
    /// async runtime (it panics inside one, as tokio's blocking calls do).
    pub fn append_batch_blocking(&self, items: Vec<Append>) -> Result<Vec<Receipt>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        validate_request(&items)?;
        self.submit_raw(items)
    }

    /// Blocking form of [`Vault::append`].
    pub fn append_blocking(&self, item: Append) -> Result<Receipt> {
        let mut r = self.append_batch_blocking(vec![item])?;
        r.pop().ok_or(Error::Closed)
    }

    /// The vault's ed25519 public key: signing key 0, which genesis names
    /// and clients pin. Later signing keys chain from it
    /// ([`Vault::key_chain`]).
    pub fn public_key(&self) -> VerifyingKey {
        self.inner.public_key
    }

    /// The endorsements of signing keys 1.. (each signed by the key
    /// before it), as of the groups written so far: with the pinned key,
    /// a client turns them into a [`KeyChain`] and checks any receipt.
    pub fn key_chain(&self) -> Vec<KeyEndorsement> {
        self.inner
            .shared
            .signing_chain
            .read()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Id of the signing key that signs new heads, as of the groups
    /// written so far.
    pub fn signing_key_id(&self) -> u32 {
        self.inner
            .shared
            .signing_chain
            .read()
            .map(|c| c.last().map_or(0, |e| e.key_id))
            .unwrap_or(0)
    }

    /// Rotates the signing key online: a new ed25519 key, wrapped under
    /// the master key, introduced by a `key_rotated` entry
    /// `{"key":"signing",…}` whose endorsement the current key signs, in a
    /// commit group the current key signs; every later head is signed by
    /// the new key, and the old key is destroyed. Appends go on
    /// throughout. Resolves with the receipt of the rotation entry (signed
    /// by the old key) and the new key's endorsement once it is durable;
    /// a crash before that leaves the old key in force (docs/keys.md).
    pub async fn rotate_signing_key(&self) -> Result<(Receipt, KeyEndorsement)> {
        self.rotate_signing_key_by(None).await
    }

    async fn rotate_signing_key_by(&self, by: Option<String>) -> Result<(Receipt, KeyEndorsement)> {
        let receipt = self
            .submit(vec![Append::RotateSigning { by }])
            .await?
            .pop()
            .ok_or(Error::Closed)?;
        let endorsement = self
            .key_chain()
            .into_iter()
            .find(|e| e.seq == receipt.seq)
            .ok_or(Error::Closed)?;
        Ok((receipt, endorsement))
    }

    /// The admin actions of this vault, each written with
    /// `"recorded_by": credential_id` in its entry's payload, so that the
    /// log says who asked for every credential change, shred and key
    /// rotation (a server passes the caller's credential id). The methods
    /// of [`Vault`] of the same names write no `recorded_by`: they are the
    /// vault's own actions (at start, at stop, or offline).
    pub fn acting_as<'a>(&'a self, credential_id: &'a str) -> Admin<'a> {
        Admin {
            vault: self,
            by: credential_id,
        }
    }

    /// The 16-byte vault id.
    pub fn vault_id(&self) -> [u8; 16] {
        self.inner.vault_id
    }

    /// The latest durable signed head.
    pub fn head(&self) -> Option<SignedHead> {
        self.inner.shared.head.read().ok().and_then(|h| *h)
    }

    /// Counts of the commit pipeline since this vault was opened: groups
    /// made durable, the write-ahead file's `fdatasync`s and their
    /// durations, the indexer's writes, and the keys of derived state
    /// waiting in memory now ([`crate::stats`]).
    pub fn pipeline_stats(&self) -> crate::stats::PipelineStats {
        let shared = &self.inner.shared;
        shared.counters.snapshot(live_keys(shared))
    }

    /// A count of the credentials revoked since the vault was opened: it
    /// changes as a revocation becomes visible to readers (before it is
    /// acknowledged), so that a connection authenticated earlier can tell
    /// when to look its credential up again. Compare it only for
    /// equality: each open of a vault in this process starts it at a
    /// value of its own, so a count read from a vault closed since (a
    /// server that opened it again) never matches the new one's.
    pub fn revocations(&self) -> u64 {
        self.inner.shared.revocations.load(Ordering::Acquire)
    }

    /// Whether a failed commit has poisoned the vault.
    pub fn is_poisoned(&self) -> bool {
        self.inner.shared.poisoned.load(Ordering::Acquire)
    }

    /// The entry at `seq`, if the log holds it.
    pub fn entry(&self, seq: u64) -> Result<Option<StoredEntry>> {
        read_entry(&self.inner.store, seq)
    }

    /// Has items built into a commit group without the checks callers'
    /// appends get (for the vault's own kinds), and waits until they are
    /// durable.
    async fn submit(&self, items: Vec<Append>) -> Result<Vec<Receipt>> {
        self.request(items).await
    }

    /// Crypto-shreds `subject`: appends a signed `subject_shredded` entry
    /// and deletes every wrapped data key of the subject from the key
    /// store. Resolves once both are durable. Afterwards the subject's
    /// records (which stay in the log) open under no key the vault holds,
    /// its appends, mints and redemptions are refused with
    /// `SubjectShredded`, and `verify` lists it as shredded.
    ///
    /// `NoSuchSubject` when the subject never had a record, and
    /// `SubjectShredded` when it already was shredded. After a crash
    /// before this returns, the shred may or may not have happened; if its
    /// entry is in the log, the next open finishes deleting the keys
    /// (docs/keys.md).
    pub async fn shred(&self, subject: &str) -> Result<Receipt> {
        self.shred_by(subject, None).await
    }

    async fn shred_by(&self, subject: &str, by: Option<String>) -> Result<Receipt> {
        validate_subject(subject, true)?;
        let mut r = self
            .submit(vec![Append::Shred {
                subject: subject.to_string(),
                by,
            }])
            .await?;
        r.pop().ok_or(Error::Closed)
    }

    /// Gives `subject` a new data key version: a `key_rotated` entry
    /// commits to the new wrapped key, and later records are encrypted
    /// under it; older versions stay and still open the records written
    /// under them. With `reencrypt`, the subject's latest record is
    /// decrypted and appended again under the new key, in the same commit
    /// (a new `record` entry: the old one stays in the log).
    pub async fn rotate_subject_key(&self, subject: &str, reencrypt: bool) -> Result<Rotated> {
        self.rotate_subject_key_by(subject, reencrypt, None).await
    }

    async fn rotate_subject_key_by(
        &self,
        subject: &str,
        reencrypt: bool,
        by: Option<String>,
    ) -> Result<Rotated> {
        validate_subject(subject, true)?;
        let mut r = self
            .submit(vec![Append::Rotate {
                subject: subject.to_string(),
                reencrypt,
                by,
            }])
            .await?
            .into_iter();
        let receipt = r.next().ok_or(Error::Closed)?;
        let reencrypted = r.next();
        let e = self
            .entry(receipt.seq)?
            .ok_or(Error::integrity(receipt.seq, Reason::Truncated))?;
        let rotation: KeyRotation = serde_json::from_slice(&e.payload)
            .map_err(|_| Error::Malformed("key_rotated payload"))?;
        Ok(Rotated {
            version: rotation.version,
            receipt,
            reencrypted,
        })
    }

    /// Rotates the master key online: a new random master key, sealed
    /// under `new_unlock` (argon2id with this vault's KDF options, or a key
    /// file), re-wraps every key the old one wrapped (signing key, subject
    /// data keys, masking secret) without re-encrypting any record, and is
    /// swapped in atomically. Appends wait while the rotation's commit
    /// group is written; reads go on. Resolves with the receipt of the
    /// `key_rotated` entry `{"key":"master",…}` once it is durable; from
    /// then on only `new_unlock` opens the vault. A crash before that
    /// leaves a vault that opens with exactly one of the two secrets
    /// (docs/keys.md, section 5).
    pub async fn rotate_master_key(&self, new_unlock: &Unlock) -> Result<Receipt> {
        self.rotate_master_key_by(new_unlock, None).await
    }

    async fn rotate_master_key_by(
        &self,
        new_unlock: &Unlock,
        by: Option<String>,
    ) -> Result<Receipt> {
        let master = SecretKey::generate();
        let sealed =
            SealedMaster::seal(&master, new_unlock, self.inner.kdf, &self.inner.vault_id)?.encode();
        let change = MasterChange {
            master: Arc::new(master),
            sealed,
            mask: self.inner.mask.clone(),
            by,
        };
        let mut r = self
            .submit(vec![Append::RotateMaster(Box::new(change))])
            .await?;
        r.pop().ok_or(Error::Closed)
    }

    /// The vault's keys: master and signing key, and up to `max` subject
    /// data keys after `after` (a subject and version, exclusive; `None`
    /// from the start), in (subject, version) order. Reflects every group
    /// written so far.
    pub fn key_status(&self, after: Option<(&str, u32)>, max: usize) -> Result<KeyStatus> {
        let genesis = self
            .entry(0)?
            .ok_or(Error::integrity(0, Reason::BadGenesis("empty log".into())))?;
        let uses = self
            .inner
            .shared
            .key_uses
            .lock()
            .map_err(|_| Error::Poisoned)?;
        let mut keys = Vec::new();
        let mut more = false;
        let start = after.map_or(String::new(), |(s, _)| s.to_string());
        'subjects: for (subject, k) in uses.subjects.range(start..) {
            let current = k.versions.keys().next_back().copied();
            for (&version, u) in &k.versions {
                if let Some((s, v)) = after {
                    if subject.as_str() == s && version <= v {
                        continue;
                    }
                }
                if keys.len() == max {
                    more = true;
                    break 'subjects;
                }
                let life = if k.shredded {
                    KeyLife::Shredded
                } else if Some(version) == current {
                    KeyLife::Active
                } else {
                    KeyLife::Retired
                };
                keys.push(SubjectKeyStatus {
                    subject: subject.clone(),
                    version,
                    created_seq: u.created_seq,
                    created_ms: u.created_ms,
                    encryptions: u.encryptions(),
                    life,
                });
            }
        }
        Ok(KeyStatus {
            master_created_ms: uses
                .master_rotated
                .map_or(genesis.timestamp_ms, |(_, ts)| ts),
            master_wraps: uses.total + 1,
            signing_key_id: self.signing_key_id(),
            signing_created_ms: uses.signing_rotated.unwrap_or(genesis.timestamp_ms),
            encryption_limit: self.inner.max_encryptions,
            subject_keys: keys,
            more,
        })
    }

    /// The record at `seq`, decrypted under the key version it names;
    /// `None` when `seq` is past the end or not a record, and
    /// `SubjectShredded` when its subject was shredded.
    pub fn record_at(&self, seq: u64) -> Result<Option<Record>> {
        let Some(e) = self.entry(seq)? else {
            return Ok(None);
        };
        if e.kind != Kind::Record {
            return Ok(None);
        }
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        if let Some(k) = sh.state_get(st, &state::key("k/", &e.subject))? {
            if KeyState::decode(&k)?.shredded {
                return Err(Error::SubjectShredded(e.subject));
            }
        }
        let dk = self.data_key(&e.subject, e.key_version)?;
        let plaintext = dk
            .open(
                &e.nonce,
                &record_aad(&e.subject, seq, e.key_version),
                &e.payload,
            )
            .ok_or(Error::Decrypt(seq))?;
        Ok(Some(Record {
            seq,
            key_version: e.key_version,
            timestamp_ms: e.timestamp_ms,
            plaintext,
        }))
    }

    /// Creates an API-key credential with `role`: a `credential_created`
    /// entry holding only the key's hash. Returns the credential id and the
    /// key, which is shown once and never stored.
    pub async fn create_credential(
        &self,
        role: &str,
        name: &str,
    ) -> Result<(String, Zeroizing<String>)> {
        self.create_credential_by(role, name, None).await
    }

    async fn create_credential_by(
        &self,
        role: &str,
        name: &str,
        by: Option<String>,
    ) -> Result<(String, Zeroizing<String>)> {
        let key = generate_api_key();
        let id = self
            .record_credential(role, name, api_key_hash(&key), by, None)
            .await?;
        Ok((id, key))
    }

    /// Appends the `credential_created` entry of a credential whose key
    /// hash is `key_hash`, and returns its id.
    async fn record_credential(
        &self,
        role: &str,
        name: &str,
        key_hash: String,
        recorded_by: Option<String>,
        client_cert_sha256: Option<String>,
    ) -> Result<String> {
        let id = format!("{role}-{}", &key_hash[..12]);
        let payload = CredentialCreated {
            id: id.clone(),
            role: role.to_string(),
            key_hash,
            name: name.to_string(),
            recorded_by,
            client_cert_sha256,
        };
        let payload = serde_json::to_vec(&payload).map_err(|e| Error::Invalid(e.to_string()))?;
        self.append(Append::Event {
            kind: Kind::CredentialCreated,
            subject: String::new(),
            payload,
        })
        .await?;
        Ok(id)
    }

    /// Creates a credential with `role` held by the client certificate
    /// whose DER has the SHA-256 `cert_sha256`: its holder authenticates
    /// over mutual TLS with that certificate and no API key. A
    /// `credential_created` entry holds [`certificate_key_hash`] and the
    /// fingerprint itself. Returns the credential id; refused while an
    /// active credential holds the same certificate.
    pub async fn create_cert_credential(
        &self,
        role: &str,
        name: &str,
        cert_sha256: &[u8; 32],
    ) -> Result<String> {
        self.create_cert_credential_by(role, name, cert_sha256, None)
            .await
    }

    async fn create_cert_credential_by(
        &self,
        role: &str,
        name: &str,
        cert_sha256: &[u8; 32],
        by: Option<String>,
    ) -> Result<String> {
        // A second active credential for the certificate is refused as
        // its entry is built (`Committer::check_credential_free`).
        let key_hash = certificate_key_hash(cert_sha256);
        self.record_credential(role, name, key_hash, by, Some(hex::encode(cert_sha256)))
            .await
    }

    /// Mints a one-time token for `partner_id` to read `fields` (with their
    /// masking operators) of `subject`'s latest record for `purpose`, valid
    /// until `expires_at_ms`. The token (prefix `fvt_` and 256 random bits)
    /// is returned once; only its hash is written, in a `token_minted` entry.
    pub async fn mint(
        &self,
        partner_id: &str,
        subject: &str,
        purpose: &str,
        fields: Vec<(String, String)>,
        expires_at_ms: u64,
    ) -> Result<Zeroizing<String>> {
        validate_subject(subject, true)?;
        if partner_id.is_empty() || purpose.is_empty() || fields.is_empty() {
            return Err(Error::Invalid(
                "a token needs a partner, a purpose and fields".into(),
            ));
        }
        // A partner id that no consent or policy could name would let its
        // tokens pass the redemption's checks of both ("none held").
        validate_subject(partner_id, true)
            .map_err(|_| Error::Invalid("the partner id is not a valid id".into()))?;
        let token = random_secret(TOKEN_PREFIX);
        let payload = state::TokenMinted {
            token_hash: api_key_hash(&token),
            partner_id: partner_id.to_string(),
            subject: subject.to_string(),
            purpose: purpose.to_string(),
            fields,
            expires_at_ms,
            minted_at_ms: Some(now_ms()),
        };
        let payload = serde_json::to_vec(&payload).map_err(|e| Error::Invalid(e.to_string()))?;
        self.append(Append::Event {
            kind: Kind::TokenMinted,
            subject: subject.to_string(),
            payload,
        })
        .await?;
        Ok(token)
    }

    /// Spends `token` for `partner_id`, asked from `source` (the partner's
    /// network address; `None` when unknown, which a policy with source
    /// networks refuses): on success the `token_redeemed` entry is durable
    /// before this returns, and the token's terms come back; otherwise
    /// `TokenRefused`, with an `access_denied` entry durable. A token
    /// burned just before a crash stays burned after it.
    pub async fn redeem(
        &self,
        token: &str,
        partner_id: &str,
        now_ms: u64,
        source: Option<std::net::IpAddr>,
    ) -> Result<(state::TokenMinted, Receipt)> {
        self.redeem_via(token, partner_id, Some(now_ms), source, None, None)
            .await
    }

    /// [`Vault::redeem`] for a partner whose address `source` a trusted
    /// `proxy` named (a PROXY protocol header): a refusal's
    /// `access_denied` entry holds both (`source_ip`, `proxy_ip`). With
    /// `now_ms` `None`, the token is checked by the clock at the time the
    /// committer decides, not when it was asked: a redemption that waited
    /// in the queue past its token's expiry is refused. With `credential`,
    /// the id of the credential the partner redeems with, a revocation of
    /// it that the log holds before the redemption (or a credential of
    /// that id under another name than `partner_id`) fails it
    /// (`CredentialRevoked`), nothing written: a revocation acknowledged
    /// while the redemption waited stops it.
    pub async fn redeem_via(
        &self,
        token: &str,
        partner_id: &str,
        now_ms: Option<u64>,
        source: Option<std::net::IpAddr>,
        proxy: Option<std::net::IpAddr>,
        credential: Option<&str>,
    ) -> Result<(state::TokenMinted, Receipt)> {
        if partner_id.is_empty() || partner_id.len() > MAX_SUBJECT_LEN {
            return Err(Error::Invalid(format!(
                "partner id must be 1 to {MAX_SUBJECT_LEN} bytes"
            )));
        }
        let token_hash = api_key_hash(token);
        let items = vec![Append::Redeem {
            token_hash: token_hash.clone(),
            partner_id: partner_id.to_string(),
            now_ms,
            source,
            proxy,
            credential: credential.map(str::to_string),
        }];
        let receipt = self.request(items).await?.pop().ok_or(Error::Closed)?;
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        let minted = sh
            .state_get(st, &state::key("t/", &token_hash))?
            .ok_or(Error::Malformed("redeemed token has no state"))?;
        let minted =
            serde_json::from_slice(&minted).map_err(|_| Error::Malformed("token state"))?;
        Ok((minted, receipt))
    }

    /// A secret for keyed masking (tokenize, hash), derived from the master
    /// key so that it survives restarts and never leaves the process.
    /// It does not change when the master key is rotated: the first
    /// rotation keeps it wrapped under the new master (`keys/"mask"`).
    pub fn mask_secret(&self) -> Zeroizing<[u8; 32]> {
        self.inner.mask.clone()
    }

    /// Encoded entries from `from_seq` on, at most `max`, in seq order,
    /// up to the durable head ([`Vault::durable_len`]): never an entry of
    /// a group a power loss could still take, which a reader would find
    /// gone, or signed over again, after a restart. The same bound holds
    /// for [`Vault::heads`] and [`Vault::receipt`].
    pub fn entries_from(&self, from_seq: u64, max: usize) -> Result<Vec<Vec<u8>>> {
        self.entries_within(from_seq, max, usize::MAX)
    }

    /// As [`Vault::entries_from`], and fewer once the entries held would
    /// pass `max_bytes` (at least one entry, when there is one from
    /// `from_seq` on): what a server answering a request holds for it is
    /// bounded by bytes, not only by a count of entries whose size the
    /// writers chose. A reader that wants more asks again from the seq
    /// after the last one.
    pub fn entries_within(
        &self,
        from_seq: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let store = &self.inner.store;
        let durable = self.durable_len();
        let Some((start, _)) = store.chunk_at(from_seq)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut held = 0usize;
        for kv in store.chunks_from(start) {
            let (_, v) = kv?;
            let chunk = crate::chunk::Chunk::decode(&v)
                .map_err(|_| Error::integrity(from_seq, Reason::CrcMismatch))?;
            for (i, bytes) in chunk.entries.iter().enumerate() {
                let seq = chunk.first_seq.saturating_add(i as u64);
                if seq >= durable {
                    return Ok(out);
                }
                if seq >= from_seq {
                    held = held.saturating_add(bytes.len());
                    if out.len() == max || (!out.is_empty() && held > max_bytes) {
                        return Ok(out);
                    }
                    out.push(bytes.to_vec());
                }
            }
        }
        Ok(out)
    }

    /// The signed heads of the commit groups from the one holding
    /// `from_seq` on, in seq order, at most `max`: what a remote verifier
    /// needs to close each group of the entries it reads, without a
    /// receipt (and the group's rehashing) per group. Empty past the end.
    ///
    /// The heads are read from the log's chunks, entries and all, so the
    /// read also stops, with fewer heads, once the chunks read after the
    /// first head hold more than `max_bytes`: a request costs at most that
    /// much reading beyond one group, however large the groups.
    pub fn heads(&self, from_seq: u64, max: usize, max_bytes: usize) -> Result<Vec<SignedHead>> {
        let store = &self.inner.store;
        let durable = self.durable_len();
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let Some((start, _)) = store.chunk_at(from_seq)? else {
            return Ok(out);
        };
        let mut read = 0usize;
        for kv in store.chunks_from(start) {
            let (key, v) = kv?;
            if !out.is_empty() {
                read = read.saturating_add(v.len());
                if read > max_bytes {
                    break;
                }
            }
            let chunk = crate::chunk::Chunk::decode(&v)
                .map_err(|_| Error::integrity(key, Reason::CrcMismatch))?;
            if let Some(h) = chunk.head.filter(|h| h.last_seq >= from_seq) {
                if h.last_seq >= durable {
                    break;
                }
                out.push(h);
                if out.len() == max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The receipt of the entry at `seq`: its hash, its Merkle path in its
    /// commit group, and the group's signed head. `None` past the end.
    pub fn receipt(&self, seq: u64) -> Result<Option<Receipt>> {
        let store = &self.inner.store;
        if seq >= self.durable_len() {
            return Ok(None);
        }
        let Some((first_key, _)) = store.chunk_at(seq)? else {
            return Ok(None);
        };
        // Find the head that closes seq's group, then hash the whole group.
        // A group's chunks hold its entries only, so when seq's chunk is the
        // group's first, the chunks read on the way are the group.
        let mut head = None;
        let mut read = Vec::new();
        for kv in store.chunks_from(first_key) {
            let (_, v) = kv?;
            let chunk = crate::chunk::Chunk::decode(&v)
                .map_err(|_| Error::integrity(seq, Reason::CrcMismatch))?;
            let closes = chunk.head.filter(|h| h.last_seq >= seq);
            read.push(v.clone());
            if let Some(h) = closes {
                head = Some(h);
                break;
            }
        }
        let Some(head) = head else {
            return Ok(None);
        };
        if seq < head.group_first_seq {
            return Err(Error::integrity(seq, Reason::HeadMismatch));
        }
        // A head read back from a chunks file changed since open may name
        // any bounds: ones that do not make a group are a head that does
        // not match (the count of its hashes is checked below).
        let n = head
            .last_seq
            .checked_sub(head.group_first_seq)
            .and_then(|d| d.checked_add(1))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(Error::integrity(seq, Reason::HeadMismatch))?;
        let hashes = if first_key == head.group_first_seq {
            let chunks = read
                .iter()
                .map(|v| {
                    crate::chunk::Chunk::decode(v)
                        .map_err(|_| Error::integrity(seq, Reason::CrcMismatch))
                })
                .collect::<Result<Vec<_>>>()?;
            let entries: Vec<&[u8]> = chunks
                .iter()
                .flat_map(|c| c.entries.iter().copied())
                .collect();
            entry_hashes(&entries)
        } else {
            let entries = self.entries_from(head.group_first_seq, n)?;
            entry_hashes(&entries.iter().map(|e| e.as_ref()).collect::<Vec<_>>())
        };
        if hashes.len() != n {
            return Err(Error::integrity(head.last_seq, Reason::Truncated));
        }
        let tree = MerkleTree::new(&hashes);
        let index = (seq - head.group_first_seq) as usize;
        Ok(Some(Receipt {
            seq,
            entry_hash: hashes[index],
            path: tree.path(index),
            head,
        }))
    }

    /// The latest record of `subject`, decrypted; `SubjectShredded` when its
    /// key was destroyed.
    pub fn latest_record(&self, subject: &str) -> Result<Option<Record>> {
        validate_subject(subject, true)?;
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        if let Some(k) = sh.state_get(st, &state::key("k/", subject))? {
            if KeyState::decode(&k)?.shredded {
                return Err(Error::SubjectShredded(subject.to_string()));
            }
        }
        let Some(ptr) = sh.state_get(st, &state::key("s/", subject))? else {
            return Ok(None);
        };
        if ptr.len() != 12 {
            return Err(Error::Malformed("record pointer"));
        }
        let seq = u64::from_be_bytes(
            ptr[..8]
                .try_into()
                .map_err(|_| Error::Malformed("record pointer"))?,
        );
        let e = self
            .entry(seq)?
            .ok_or(Error::integrity(seq, Reason::Truncated))?;
        if e.kind != Kind::Record || e.subject != subject {
            return Err(Error::integrity(
                seq,
                Reason::IndexMismatch("record pointer".into()),
            ));
        }
        let dk = self.data_key(subject, e.key_version)?;
        let plaintext = dk
            .open(
                &e.nonce,
                &record_aad(subject, seq, e.key_version),
                &e.payload,
            )
            .ok_or(Error::Decrypt(seq))?;
        Ok(Some(Record {
            seq,
            key_version: e.key_version,
            timestamp_ms: e.timestamp_ms,
            plaintext,
        }))
    }

    fn data_key(&self, subject: &str, version: u32) -> Result<SecretKey> {
        // Held from the read to the unwrap: a master rotation swaps the
        // wrapped keys and the master under the write lock.
        let master = self.inner.master.read().map_err(|_| Error::Poisoned)?;
        let wrapped = self
            .inner
            .store
            .keys
            .get(state::data_key_name(subject, version))?
            .ok_or_else(|| Error::SubjectShredded(subject.to_string()))?;
        crypto::unwrap_key(&master, &data_key_aad(subject, version), &wrapped).ok_or(
            Error::integrity(
                0,
                Reason::KeyMismatch(format!(
                    "data key of a subject does not unwrap (version {version})"
                )),
            ),
        )
    }

    /// Looks up a credential by the hash of a presented API key.
    pub fn credential_by_key_hash(&self, key_hash: &str) -> Result<Option<Credential>> {
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        let Some(id) = sh.state_get(st, &state::key("h/", key_hash))? else {
            return Ok(None);
        };
        let id = String::from_utf8(id.to_vec()).map_err(|_| Error::Malformed("credential id"))?;
        let Some(v) = sh.state_get(st, &state::key(state::CREDENTIAL_PREFIX, &id))? else {
            return Ok(None);
        };
        let mut c: Credential =
            serde_json::from_slice(&v).map_err(|_| Error::Malformed("credential"))?;
        // The credential under that id must be the one of this key, not
        // another that took the id since (the vault refuses that, but a
        // log written before it did may hold one).
        if c.key_hash != key_hash {
            return Ok(None);
        }
        c.id = id;
        Ok(Some(c))
    }

    /// A credential by its id.
    pub fn credential(&self, id: &str) -> Result<Option<Credential>> {
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        let Some(v) = sh.state_get(st, &state::key(state::CREDENTIAL_PREFIX, id))? else {
            return Ok(None);
        };
        let mut c: Credential =
            serde_json::from_slice(&v).map_err(|_| Error::Malformed("credential"))?;
        c.id = id.to_string();
        Ok(Some(c))
    }

    /// The live credentials whose id starts with `id_prefix` (ids are
    /// `role-` and 12 hex digits), in id order, from the derived state as
    /// [`Vault::credential`] reads it: no pass over the log.
    pub fn live_credentials(&self, id_prefix: &str) -> Result<Vec<Credential>> {
        let prefix = state::key(state::CREDENTIAL_PREFIX, id_prefix);
        self.inner
            .shared
            .state_scan(&self.inner.store.state, &prefix)?
            .into_iter()
            .map(|(k, v)| {
                let mut c: Credential =
                    serde_json::from_slice(&v).map_err(|_| Error::Malformed("credential"))?;
                c.id = String::from_utf8_lossy(&k[2..]).into_owned();
                Ok(c)
            })
            .collect()
    }

    /// Up to `max` credentials after `after_id` (exclusive; `None` from
    /// the start) in id order, revoked ones included, as the durable log
    /// tells them; and whether more follow. The first call reads every
    /// entry once; later calls read only the entries made since.
    pub fn credentials(
        &self,
        after_id: Option<&str>,
        max: usize,
    ) -> Result<(Vec<CredentialInfo>, bool)> {
        use std::ops::Bound;
        let mut index = self.inner.credentials.lock().map_err(|_| Error::Poisoned)?;
        let end = self.durable_len();
        while index.scanned < end {
            let want = (end - index.scanned).min(CREDENTIAL_SCAN_PAGE) as usize;
            let page = self.entries_from(index.scanned, want)?;
            if page.is_empty() {
                return Err(Error::integrity(index.scanned, Reason::Truncated));
            }
            for bytes in &page {
                let e = EntryRef::decode(bytes)?;
                if e.seq != index.scanned {
                    return Err(Error::integrity(index.scanned, Reason::Reordered));
                }
                index.apply(&e)?;
                index.scanned += 1;
            }
        }
        let start = after_id.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page: Vec<CredentialInfo> = index
            .by_id
            .range::<str, _>((start, Bound::Unbounded))
            .take(max.saturating_add(1))
            .map(|(_, c)| c.clone())
            .collect();
        let more = page.len() > max;
        page.truncate(max);
        Ok((page, more))
    }

    /// Rebuilds the derived state from the log, in memory, up to the state
    /// tree's `applied` marker and compares it with the tree, key by key;
    /// changes nothing (see [`crate::reindex`]).
    pub fn check_derived_state(&self) -> Result<crate::reindex::ReindexReport> {
        crate::reindex::check_live(&self.inner.store, &self.inner.shared.index_gate)
    }

    /// Revokes the credential `id`: a `credential_revoked` entry, after
    /// which its key no longer authenticates. `NotFound`-like `Ok(None)`
    /// when there is no such credential.
    pub async fn revoke_credential(&self, id: &str) -> Result<Option<Receipt>> {
        self.revoke_credential_by(id, None).await
    }

    async fn revoke_credential_by(&self, id: &str, by: Option<String>) -> Result<Option<Receipt>> {
        let Some(c) = self.credential(id)? else {
            return Ok(None);
        };
        let payload = state::CredentialRevoked {
            id: c.id,
            key_hash: c.key_hash,
            recorded_by: by,
        };
        let payload = serde_json::to_vec(&payload).map_err(|e| Error::Invalid(e.to_string()))?;
        self.append(Append::Event {
            kind: Kind::CredentialRevoked,
            subject: String::new(),
            payload,
        })
        .await
        .map(Some)
    }

    /// The latest consent event of `subject` for `partner_id`: its kind
    /// (granted or revoked) and JSON payload.
    pub fn consent(&self, subject: &str, partner_id: &str) -> Result<Option<(Kind, Vec<u8>)>> {
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        let Some(v) = sh.state_get(st, &state::consent_key(subject, partner_id))? else {
            return Ok(None);
        };
        let (kind, payload) = state::split_consent(&v)?;
        Ok(Some((kind, payload.to_vec())))
    }

    /// The current policy of `partner_id`: the payload of its latest
    /// `policy_changed` entry.
    pub fn policy(&self, partner_id: &str) -> Result<Option<Vec<u8>>> {
        let (st, sh) = (&self.inner.store.state, &self.inner.shared);
        Ok(sh
            .state_get(st, &state::policy_key(partner_id))?
            .map(|v| v.to_vec()))
    }

    /// Number of durable entries: the seq after the latest signed head.
    pub fn durable_len(&self) -> u64 {
        self.head().map_or(0, |h| h.last_seq + 1)
    }

    /// Stops the committer after the queued appends and makes them durable.
    ///
    /// `Poisoned` when a write failed before or during the close: every
    /// append that was acknowledged is durable (the write-ahead file keeps
    /// what sled may lack, and the next open replays it), but the vault did
    /// not stop cleanly, and the caller should say so.
    pub fn close(self) -> Result<()> {
        self.inner.shutdown();
        if self.inner.shared.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        self.inner.store.sync()
    }
}

/// The admin actions of a [`Vault`] on behalf of one credential; see
/// [`Vault::acting_as`]. Each method does what the [`Vault`] method of the
/// same name does, and names the credential in the entry it writes.
#[derive(Debug, Clone, Copy)]
pub struct Admin<'a> {
    vault: &'a Vault,
    by: &'a str,
}

impl Admin<'_> {
    fn by(&self) -> Result<Option<String>> {
        validate_subject(self.by, true).map_err(|e| Error::Invalid(format!("recorded_by: {e}")))?;
        Ok(Some(self.by.to_string()))
    }

    /// [`Vault::create_credential`], recorded as this admin's.
    pub async fn create_credential(
        &self,
        role: &str,
        name: &str,
    ) -> Result<(String, Zeroizing<String>)> {
        self.vault
            .create_credential_by(role, name, self.by()?)
            .await
    }

    /// [`Vault::create_cert_credential`], recorded as this admin's.
    pub async fn create_cert_credential(
        &self,
        role: &str,
        name: &str,
        cert_sha256: &[u8; 32],
    ) -> Result<String> {
        self.vault
            .create_cert_credential_by(role, name, cert_sha256, self.by()?)
            .await
    }

    /// [`Vault::revoke_credential`], recorded as this admin's.
    pub async fn revoke_credential(&self, id: &str) -> Result<Option<Receipt>> {
        self.vault.revoke_credential_by(id, self.by()?).await
    }

    /// [`Vault::shred`], recorded as this admin's.
    pub async fn shred(&self, subject: &str) -> Result<Receipt> {
        self.vault.shred_by(subject, self.by()?).await
    }

    /// [`Vault::rotate_subject_key`], recorded as this admin's.
    pub async fn rotate_subject_key(&self, subject: &str, reencrypt: bool) -> Result<Rotated> {
        self.vault
            .rotate_subject_key_by(subject, reencrypt, self.by()?)
            .await
    }

    /// [`Vault::rotate_signing_key`], recorded as this admin's.
    pub async fn rotate_signing_key(&self) -> Result<(Receipt, KeyEndorsement)> {
        self.vault.rotate_signing_key_by(self.by()?).await
    }

    /// [`Vault::rotate_master_key`], recorded as this admin's.
    pub async fn rotate_master_key(&self, new_unlock: &Unlock) -> Result<Receipt> {
        self.vault
            .rotate_master_key_by(new_unlock, self.by()?)
            .await
    }
}

/// The entry at `seq` in the log, if any.
fn read_entry(store: &Store, seq: u64) -> Result<Option<StoredEntry>> {
    let Some(bytes) = crate::verify::entry_at(store, seq)? else {
        return Ok(None);
    };
    let e = EntryRef::decode(&bytes)?;
    if e.seq != seq {
        return Err(Error::integrity(seq, Reason::Reordered));
    }
    Ok(Some(StoredEntry {
        kind: e.kind,
        seq: e.seq,
        timestamp_ms: e.timestamp_ms,
        prev_hash: e.prev_hash,
        key_version: e.key_version,
        nonce: e.nonce,
        subject: e.subject.to_string(),
        payload: e.payload.to_vec(),
        hash: entry_hash(&bytes),
        encoded: bytes,
    }))
}

/// Checks that `unlock` opens the sealed master key of the vault in
/// `store` (the staged one when a master rotation reached the log but a
/// crash kept it from being swapped in, as [`Vault::open`] does), without
/// starting anything: `WrongSecret` otherwise. Offline tools that write
/// in a data dir without opening the vault ask for the secret this way.
pub(crate) fn check_unlock(store: &Store, unlock: &Unlock) -> Result<()> {
    let vault_id = store.vault_id()?;
    let name = if rotation_committed(store)? {
        [STAGED, state::MASTER].concat()
    } else {
        state::MASTER.to_vec()
    };
    let sealed = store
        .keys
        .get(name)?
        .ok_or(Error::Malformed("no sealed master key"))?;
    SealedMaster::decode(&sealed)?.unseal(unlock, &vault_id)?;
    Ok(())
}

/// Writes the derived state of the entries after the applied marker (those
/// whose state a crash left in the overlay). The chain was verified before.
fn replay_tail(store: &Store, entries: u64) -> Result<()> {
    let start = store.applied()?.map_or(0, |a| a + 1);
    if start >= entries {
        return Ok(());
    }
    let first_chunk = match store.log.range(..=start.to_be_bytes()).next_back() {
        Some(kv) => kv?.0,
        None => return Ok(()),
    };
    let indexing = store.indexing()?;
    let mut batch = sled::Batch::default();
    let mut waiting = 0usize;
    for kv in store.log.range(first_chunk..) {
        let (_, v) = kv?;
        let chunk = crate::chunk::Chunk::decode(&v)
            .map_err(|_| Error::integrity(start, Reason::CrcMismatch))?;
        for bytes in chunk.entries {
            let e = EntryRef::decode(bytes)?;
            if e.seq < start {
                continue;
            }
            for (k, v) in state::mutations(&e)? {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
                waiting += 1;
            }
            if waiting >= 10_000 || e.seq + 1 == entries {
                batch.insert(state::APPLIED, &e.seq.to_be_bytes());
                if indexing.is_some_and(|i| e.seq >= i) {
                    // A crashed index write's marker goes with the first
                    // batch that reaches it (the last one at the latest:
                    // verify checked it is not past the log): every key
                    // is then at its value at `applied`.
                    batch.remove(state::INDEXING);
                }
                store.state.apply_batch(std::mem::take(&mut batch))?;
                waiting = 0;
            }
        }
    }
    tracing::info!(from = start, to = entries - 1, "replayed derived state");
    Ok(())
}

/// Drops the pending markers, and with each whose group never reached the
/// log the keys it names (a crash stopped that group's commit).
/// Verification has already refused a marker that names a key the log
/// commits to.
fn recover_pending(store: &Store, next_seq: u64) -> Result<()> {
    let markers = pending_markers(&store.keys)?;
    if markers.is_empty() {
        return Ok(());
    }
    let mut kb = sled::Batch::default();
    let mut dropped = 0;
    for m in &markers {
        if m.first_seq >= next_seq {
            for n in &m.keys {
                kb.remove(n.as_slice());
            }
            dropped += m.keys.len();
        }
        kb.remove(m.name.as_slice());
    }
    store.keys.apply_batch(kb)?;
    if dropped > 0 {
        tracing::warn!(
            keys = dropped,
            "removed data keys of a commit group that did not reach the log"
        );
    }
    Ok(())
}

/// Finishes a shred that a crash interrupted: if the `shredding` marker's
/// group reached the log, deletes every key left under the subjects it
/// names; then drops the marker. Verification has already refused a
/// marker naming a subject the log does not shred, so a forged marker
/// cannot make open delete a live subject's keys.
fn recover_shredding(store: &Store, next_seq: u64) -> Result<()> {
    let Some(m) = store.keys.get(SHREDDING)? else {
        return Ok(());
    };
    let (first_seq, subjects) = decode_shredding(&m)?;
    let mut kb = sled::Batch::default();
    let mut deleted = 0usize;
    if first_seq < next_seq {
        for subject in &subjects {
            for kv in store.keys.scan_prefix(state::data_key_prefix(subject)) {
                let (k, _) = kv?;
                kb.remove(k);
                deleted += 1;
            }
        }
    }
    kb.remove(SHREDDING);
    store.keys.apply_batch(kb)?;
    if deleted > 0 {
        // Subject ids are personal data: counts only.
        tracing::warn!(
            subjects = subjects.len(),
            keys = deleted,
            "finished a shred that a crash interrupted: deleted the remaining data keys"
        );
    }
    Ok(())
}

/// The associated data a key in the `keys` tree is wrapped with, from its
/// name; `None` for a name that is not a wrapped key.
fn key_aad(name: &[u8]) -> Option<Vec<u8>> {
    if name == state::MASK {
        return Some(crypto::mask_key_aad());
    }
    if let Some(id) = name.strip_prefix(state::SIGNING_KEY_PREFIX) {
        return Some(signing_key_aad(u32::from_be_bytes(id.try_into().ok()?)));
    }
    let rest = name.strip_prefix(state::DATA_KEY_PREFIX)?;
    let (subject, version) = rest.split_at_checked(rest.len().checked_sub(5)?)?;
    let version = version.strip_prefix(&[0u8])?;
    let subject = std::str::from_utf8(subject).ok()?;
    Some(data_key_aad(
        subject,
        u32::from_be_bytes(version.try_into().ok()?),
    ))
}

/// The masking secret of a vault that never rotated its master key.
fn derive_mask(master: &SecretKey) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(
        "fintrust-vault 2026 mask secret v1",
        master.as_bytes(),
    ))
}

/// Name of the master rotation marker in the `keys` tree: u64 BE first seq
/// of the rotation's group. Written with the staged keys (step 1), removed
/// by the swap (step 3).
pub const ROTATING: &[u8] = b"rotating";
/// Prefix of a master rotation's staged keys: `"next/" name` holds the new
/// value of `name` (the sealed master, every re-wrapped key) until the swap.
pub const STAGED: &[u8] = b"next/";

/// Number of entries in the log, from its last chunk (before verification:
/// a chunk that does not decode counts as nothing, and verify fails later).
fn log_len(store: &Store) -> Result<u64> {
    let Some((_, v)) = store.log.last()? else {
        return Ok(0);
    };
    Ok(crate::chunk::Chunk::decode(&v)
        .map(|c| c.first_seq.saturating_add(c.entries.len() as u64))
        .unwrap_or(0))
}

/// Whether a master rotation's staged keys are the committed ones: its
/// marker names a group that reached the log (and verify then checks the
/// staged keys against the log's commitments).
fn rotation_committed(store: &Store) -> Result<bool> {
    let Some(m) = store.keys.get(ROTATING)? else {
        return Ok(false);
    };
    let first = <[u8; 8]>::try_from(m.as_ref())
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Malformed("rotating marker"))?;
    Ok(first < log_len(store)?)
}

/// Finishes or undoes a master rotation that a crash interrupted: if its
/// group reached the log, moves every staged key over the key it replaces
/// (the swap of step 3); otherwise deletes the staged keys. One batch, so
/// a crash here leaves either state.
fn recover_rotation(store: &Store, next_seq: u64) -> Result<()> {
    let Some(m) = store.keys.get(ROTATING)? else {
        return Ok(());
    };
    let committed = <[u8; 8]>::try_from(m.as_ref())
        .map(u64::from_be_bytes)
        .is_ok_and(|first| first < next_seq);
    let mut kb = sled::Batch::default();
    for kv in store.keys.scan_prefix(STAGED) {
        let (k, v) = kv?;
        if committed {
            kb.insert(&k[STAGED.len()..], v);
        }
        kb.remove(k);
    }
    kb.remove(ROTATING);
    store.keys.apply_batch(kb)?;
    if committed {
        tracing::warn!("finished a master key rotation that a crash interrupted");
    } else {
        tracing::warn!("dropped a master key rotation that did not reach the log");
    }
    Ok(())
}

/// Name of the shredding marker in the `keys` tree: u64 BE first seq of
/// the group that shreds, then for each subject u16 BE length and the
/// subject id. Written with the group's keys (step 1), removed with the
/// shredded keys (step 3).
pub const SHREDDING: &[u8] = b"shredding";

pub(crate) fn encode_shredding(first_seq: u64, subjects: &[String]) -> Vec<u8> {
    let names: Vec<Vec<u8>> = subjects.iter().map(|s| s.as_bytes().to_vec()).collect();
    encode_pending(first_seq, &names)
}

/// Decodes a shredding marker.
pub fn decode_shredding(v: &[u8]) -> Result<(u64, Vec<String>)> {
    let (first, names) = decode_pending(v)?;
    let subjects = names
        .into_iter()
        .map(|n| String::from_utf8(n).map_err(|_| Error::Malformed("shredding marker")))
        .collect::<Result<_>>()?;
    Ok((first, subjects))
}

/// Prefix of the pending markers in the `keys` tree: a group that creates
/// keys writes `"pending/"` + its first seq (u64 BE) before them, valued
/// u64 BE first seq of the group, then for each new key u16 BE length and
/// its name. The writer removes the marker once the group's log chunk is
/// in sled (after it, in sled's order); open removes any left over, with
/// the keys it names when its group never reached the log.
pub const PENDING_PREFIX: &[u8] = b"pending/";

/// The pending marker of a group's first seq.
pub fn pending_name(first_seq: u64) -> Vec<u8> {
    [PENDING_PREFIX, &first_seq.to_be_bytes()].concat()
}

/// The single pending marker of data dirs written before per-group
/// markers (same value; each group that created keys overwrote it). Still
/// read by open and verify.
pub const PENDING: &[u8] = b"pending";

/// Whether a `keys` name is a pending marker, of either kind.
pub fn is_pending_marker(name: &[u8]) -> bool {
    name == PENDING || name.starts_with(PENDING_PREFIX)
}

/// A pending marker found in the `keys` tree.
#[derive(Debug)]
pub struct PendingMarker {
    /// The marker's own name.
    pub name: Vec<u8>,
    /// The first seq of the group that wrote it.
    pub first_seq: u64,
    /// The keys the group created.
    pub keys: Vec<Vec<u8>>,
}

/// Every pending marker in the `keys` tree, of either kind.
pub fn pending_markers(keys: &sled::Tree) -> Result<Vec<PendingMarker>> {
    let mut found = Vec::new();
    let legacy = keys.get(PENDING)?.map(|v| (sled::IVec::from(PENDING), v));
    for kv in legacy
        .into_iter()
        .map(Ok)
        .chain(keys.scan_prefix(PENDING_PREFIX))
    {
        let (name, v) = kv?;
        let (first_seq, names) = decode_pending(&v)?;
        found.push(PendingMarker {
            name: name.to_vec(),
            first_seq,
            keys: names,
        });
    }
    Ok(found)
}

pub(crate) fn encode_pending(first_seq: u64, names: &[Vec<u8>]) -> Vec<u8> {
    let mut v = first_seq.to_be_bytes().to_vec();
    for n in names {
        v.extend_from_slice(&(n.len() as u16).to_be_bytes());
        v.extend_from_slice(n);
    }
    v
}

/// Decodes a pending marker.
pub fn decode_pending(v: &[u8]) -> Result<(u64, Vec<Vec<u8>>)> {
    let mut r = crate::entry::Reader::new(v);
    let first = r.u64()?;
    let mut names = Vec::new();
    while !r.is_empty() {
        let n = r.u16()? as usize;
        names.push(r.take(n)?.to_vec());
    }
    Ok((first, names))
}

#[derive(Debug, Default, Clone, Copy)]
struct ChainPos {
    next_seq: u64,
    last_hash: Hash,
    last_ts: u64,
}

struct Committer {
    store: Arc<Store>,
    master: Arc<SecretKey>,
    signing: SigningKey,
    signing_id: u32,
    pos: ChainPos,
    /// Subjects' current data keys, expanded. Cleared only after a barrier
    /// (every group built before it is published), so a subject missing
    /// here has no key change in a group still on its way to the writer.
    keys: HashMap<String, CachedKey>,
    /// Subjects this committer shredded since the last barrier: their
    /// shreds may not be published yet, so the overlay cannot tell.
    shredded: HashSet<String>,
    /// A failed request emptied the cache while a group was being built:
    /// that group's own key changes (and shreds) were in the cache, and
    /// are in the overlay only once the writer publishes the group, so the
    /// next group waits for that before it is built.
    publish_first: bool,
    /// Records a data key may encrypt before the committer rotates it.
    max_encryptions: u64,
    key_cache: usize,
    max_group: GroupBound,
    nonces: crypto::NonceSource,
    /// Set by a refused redemption of the request being added.
    refusal: Option<TokenRefusal>,
    /// Tokens this committer burned, with the seq of each burn: the
    /// overlay learns of a burn only when the writer publishes its group,
    /// so a burn is forgotten here only once published (never by its
    /// token's expiry: a redemption may come with an earlier time than the
    /// one that would have pruned it).
    burned: HashMap<String, u64>,
    /// Credentials' key hashes and ids (their `h/` and `c/` keys) this
    /// committer changed, with the seq of the change and the value after
    /// it (`None` once revoked): like burns, the overlay learns of them
    /// only when the writer publishes their group. Trimmed of what is
    /// published.
    credentials: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Consents and policies (their `g/` and `p/` keys) this committer
    /// changed, with the seq of the change and the value after it: a
    /// redemption decided in a later group must find a revocation or a
    /// narrowed policy that the writer has not published yet, as it finds
    /// burns and credentials. Trimmed of what is published.
    terms: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Tokens minted (their `t/` keys), likewise: a token a caller minted
    /// with a `token_minted` event of its own may be redeemed in a group
    /// after the one that mints it, before the writer publishes that. One
    /// per authorization: trimmed of what is published once it holds twice
    /// what the last trim left (at least [`MINTED_TRIM`]), so that the
    /// trims cost a constant per mint however far the writer lags.
    minted: HashMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// The size of `minted` at which it is trimmed next.
    minted_trim_at: usize,
    shared: Arc<Shared>,
    /// The write-ahead file, which the committer appends each group's
    /// record to before handing the group to the writer.
    wal: Wal,
    /// The buffer each group's write-ahead record is encoded into.
    record: Vec<u8>,
    /// Where the committer names each segment it wrote a record to.
    syncer: std::sync::mpsc::Sender<ToSyncer>,
    /// Set while a lone request builds its own group: the segment its
    /// record went to is kept in `kept_segment` for that request to sync,
    /// instead of being named to the syncer.
    keep_segment: bool,
    kept_segment: Option<Arc<File>>,
}

/// A subject's current data key in the committer's cache.
struct CachedKey {
    version: u32,
    cipher: crypto::Cipher,
    /// Records encrypted under it: the published count when it was loaded,
    /// plus what this committer encrypted since (a failed request's
    /// records included, so never an undercount of what it saw).
    encryptions: u64,
    /// The key's published count, which the writer adds this committer's
    /// records to as it publishes their groups.
    published: UseCounter,
}

/// A change to the key use that the writer publishes with its group.
enum Usage {
    Created {
        subject: String,
        version: u32,
        seq: u64,
        ts: u64,
        counter: UseCounter,
    },
    /// A record encrypted under the key whose count this is.
    Encrypted(UseCounter),
    Shredded(String),
    MasterRotated {
        seq: u64,
        ts: u64,
    },
    SigningRotated {
        ts: u64,
        endorsement: KeyEndorsement,
    },
}

/// A master rotation's new keys, written by the writer in three steps.
struct MasterSwap {
    master: Arc<SecretKey>,
    /// Every key name with its new value: the re-wrapped keys, the
    /// masking secret, and the sealed master.
    staged: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A group being built.
#[derive(Default)]
struct Group {
    first_seq: u64,
    encoded: Vec<Vec<u8>>,
    hashes: Vec<Hash>,
    state: Vec<state::Mutation>,
    new_keys: Vec<(Vec<u8>, Vec<u8>)>,
    /// Subjects shredded by this group: their keys are deleted after the
    /// log write (step 3).
    shreds: Vec<String>,
    /// A master rotation's keys (the group holds nothing else).
    master_swap: Option<MasterSwap>,
    /// A signing rotation in this group: the new key and its id, which
    /// sign the groups after this one, and the retired key's name, which
    /// the writer deletes after the log write.
    signing_swap: Option<(u32, SigningKey, Vec<u8>)>,
    usage: Vec<Usage>,
    /// A failed request emptied the key cache while this group was built,
    /// after records of the group were encrypted under cached keys.
    cache_emptied: bool,
    /// For each request: its reply and the group indices of its items.
    requests: Vec<(Reply, Result<Vec<usize>>)>,
}

/// The value the group's own mutations last gave `key` (`None` inside
/// for a removal), if they touch it.
fn changed_in<'g>(g: &'g Group, key: &[u8]) -> Option<&'g Option<Vec<u8>>> {
    g.state
        .iter()
        .rev()
        .find(|(k, _)| k.as_slice() == key)
        .map(|(_, v)| v)
}

/// The committer with its channel to the writer, behind the lock that
/// whoever builds the next group holds: the committer's thread, for what
/// it takes from the queue, or a task whose request finds no other in
/// progress and the lock free ([`Vault::lead`]), which then builds its
/// group itself and hands it on as the thread would. The lock is what keeps one chain:
/// groups are built one at a time, in the order their builders take it.
struct Leader {
    committer: Committer,
    writer: std::sync::mpsc::SyncSender<ToWriter>,
}

/// A group that a lone request built: the segment its record is in (none
/// when every item was refused, so nothing was written), and where the
/// writer hands its replies once it is in sled and published.
struct Led {
    segment: Option<Arc<File>>,
    replies: oneshot::Receiver<Synced>,
}

/// Where the [`Leader`] lives; `None` once the committer has stopped.
type LeaderSlot = Arc<Mutex<Option<Leader>>>;

impl Group {
    /// The counter of `subject`'s key `version` if this group created
    /// that key, else a new one (no key reaches the cache otherwise: the
    /// key-use table holds every key a published group created).
    fn counter(&self, subject: &str, version: u32) -> UseCounter {
        self.usage
            .iter()
            .find_map(|u| match u {
                Usage::Created {
                    subject: s,
                    version: v,
                    counter,
                    ..
                } if s == subject && *v == version => Some(counter.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

/// How large a group the committer's thread builds of what is queued
/// (`Options::max_group_entries`, `Options::max_group_bytes`).
#[derive(Debug, Clone, Copy)]
struct GroupBound {
    entries: usize,
    bytes: usize,
}

/// The committer's thread: takes what is queued, up to `max_group`, as
/// one group and builds it under the leader's lock. It ends when the
/// queue closes, or when the leader is gone (the writer stopped, or a
/// builder panicked), and then drops the leader, whose channel's closing
/// stops the writer.
fn run_committer(slot: &LeaderSlot, mut rx: mpsc::Receiver<Request>, max_group: GroupBound) {
    while let Some(first) = rx.blocking_recv() {
        let mut n = first.items.len();
        let mut bytes = first.payload_len();
        let mut reqs = vec![first];
        while n < max_group.entries && bytes < max_group.bytes {
            match rx.try_recv() {
                Ok(r) => {
                    n += r.items.len();
                    bytes += r.payload_len();
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(leader) = guard.as_mut() else {
            break;
        };
        leader
            .committer
            .shared
            .last_group
            .store(reqs.len(), Ordering::Release);
        if !leader.commit(reqs) {
            guard.take();
            break;
        }
    }
    slot.lock().unwrap_or_else(PoisonError::into_inner).take();
}

impl Leader {
    /// Whether a task may build a group of `items` itself: records only
    /// (no shred, rotation or key cache to empty, which wait for the
    /// writer), and a vault that is not poisoned. Redemptions and events
    /// do not lead: they come from the partners' connections and the HTTP
    /// shim, whose runtime threads the build would hold up (redemptions at
    /// 2,000/s had a p50 40–60 µs higher when they led; `benchmarks.md`).
    fn may_lead(&self, items: &[Append]) -> bool {
        let c = &self.committer;
        c.keys.len() <= c.key_cache
            && !c.publish_first
            && !c.shared.poisoned.load(Ordering::Acquire)
            && items.iter().all(|i| matches!(i, Append::Record { .. }))
    }

    /// Builds a lone request's group, writes its record ahead and hands
    /// it to the writer, whose replies come back to the request (not the
    /// syncer); the request then syncs the segment itself. None once the
    /// writer is gone.
    fn lead(&mut self, req: Request) -> Option<Led> {
        let c = &mut self.committer;
        let mut built = c.build(vec![req], &self.writer);
        let (done, replies) = oneshot::channel();
        built.led = Some(done);
        let segment = c.write_ahead_kept(&mut built, &self.writer);
        self.writer.send(ToWriter::Group(Box::new(built))).ok()?;
        Some(Led { segment, replies })
    }

    /// Builds `reqs` as one commit group (a master rotation as a group of
    /// its own) and hands it to the writer. False once the writer is gone.
    fn commit(&mut self, reqs: Vec<Request>) -> bool {
        let writer = &self.writer;
        let this = &mut self.committer;
        if this.shared.poisoned.load(Ordering::Acquire) {
            for r in reqs {
                let _ = r.reply.send(Err(Error::Poisoned));
            }
            return true;
        }
        if this.keys.len() > this.key_cache {
            this.clear_key_cache(writer);
        }
        // A master rotation is a commit group of its own, built after
        // every earlier group is written (so that the key store holds
        // every key it must re-wrap) and swapped in before any later
        // group is built (so that later keys are wrapped under the new
        // master, and unwrapped from the store with it).
        // A signing key rotation takes the group after one that already
        // holds one: a group is signed by one key and endorses at most one.
        let mut normal = Vec::new();
        let mut signs = false;
        for r in reqs {
            let is_rotation = matches!(r.items.as_slice(), [Append::RotateMaster(_)]);
            if !is_rotation {
                let rotates_signing = r
                    .items
                    .iter()
                    .any(|i| matches!(i, Append::RotateSigning { .. }));
                if rotates_signing && signs {
                    let built = this.build(std::mem::take(&mut normal), writer);
                    if !this.hand_over(built, writer) {
                        return false;
                    }
                    signs = false;
                }
                signs |= rotates_signing;
                normal.push(r);
                continue;
            }
            if !normal.is_empty() {
                let built = this.build(std::mem::take(&mut normal), writer);
                if !this.hand_over(built, writer) {
                    return false;
                }
                signs = false;
            }
            Committer::barrier(writer);
            let built = this.build(vec![r], writer);
            let new_master = built.g.master_swap.as_ref().map(|m| m.master.clone());
            if !this.hand_over(built, writer) {
                return false;
            }
            if let Some(m) = new_master {
                Committer::barrier(writer);
                // A failed write poisons the vault: nothing is built
                // after it, so the old master can stay.
                if !this.shared.poisoned.load(Ordering::Acquire) {
                    this.master = m;
                }
            }
        }
        if !normal.is_empty() {
            let built = this.build(normal, writer);
            if !this.hand_over(built, writer) {
                return false;
            }
        }
        true
    }
}

impl Committer {
    /// A group's record: its batches encoded and appended to the
    /// write-ahead file, whose segment the syncer then `fdatasync`s.
    fn write_record(&mut self, g: &Group, first_seq: u64, head: &SignedHead) -> Result<Written> {
        failpoint("commit::before_write")?;
        let s = self.store.clone();
        let mut batches = Vec::new();
        if !g.new_keys.is_empty() || !g.shreds.is_empty() {
            let mut kb = wal::Batch::new(TreeId::Keys);
            if !g.new_keys.is_empty() {
                let names: Vec<Vec<u8>> = g.new_keys.iter().map(|(n, _)| n.clone()).collect();
                kb.insert(pending_name(first_seq), encode_pending(first_seq, &names));
                for (n, w) in &g.new_keys {
                    kb.insert(n.as_slice(), w.as_slice());
                }
            }
            if !g.shreds.is_empty() {
                kb.insert(SHREDDING, encode_shredding(first_seq, &g.shreds));
            }
            batches.push(kb);
        }
        if let Some(m) = &g.master_swap {
            // Step 1 of a master rotation: stage the new keys beside the
            // old ones, with the marker naming the group.
            let mut kb = wal::Batch::new(TreeId::Keys);
            kb.insert(ROTATING, first_seq.to_be_bytes());
            for (n, v) in &m.staged {
                kb.insert([STAGED, n.as_slice()].concat(), v.as_slice());
            }
            batches.push(kb);
        }
        let mut lb = wal::Batch::new(TreeId::Log);
        let mut chunk_first = first_seq;
        let mut start = 0usize;
        let mut bytes = 0usize;
        for i in 0..g.encoded.len() {
            bytes += g.encoded[i].len() + 4;
            let last = i + 1 == g.encoded.len();
            let full = bytes >= CHUNK_TARGET_BYTES || (i + 1 - start) as u32 >= MAX_CHUNK_ENTRIES;
            if last || full {
                let entries: Vec<&[u8]> = g.encoded[start..=i].iter().map(Vec::as_slice).collect();
                let chunk = encode_chunk(chunk_first, &entries, last.then_some(head));
                lb.insert(chunk_first.to_be_bytes(), chunk);
                chunk_first = first_seq + i as u64 + 1;
                start = i + 1;
                bytes = 0;
            }
        }
        batches.push(lb);
        if !g.shreds.is_empty() {
            // Step 3: the shredded subjects' keys go only once their shred
            // entries are in the log; sled recovers a prefix of its
            // writes, so after a crash the keys are gone only if the
            // entries are there, and open finishes an interrupted step 3.
            // The keys are those in sled and those this group's step 1
            // creates (a record of the subject earlier in the group), which
            // sled does not hold yet: the batches are applied only once the
            // whole record is written.
            let mut kb = wal::Batch::new(TreeId::Keys);
            for subject in &g.shreds {
                let prefix = state::data_key_prefix(subject);
                for kv in s.keys.scan_prefix(&prefix) {
                    kb.remove(kv?.0.to_vec());
                }
                for (n, _) in &g.new_keys {
                    if n.starts_with(&prefix) {
                        kb.remove(n.as_slice());
                    }
                }
            }
            kb.remove(SHREDDING);
            batches.push(kb);
        }
        if let Some((_, _, retired)) = &g.signing_swap {
            // The retired signing key goes once the rotation is in the
            // log; after a crash in between, open deletes it.
            let mut kb = wal::Batch::new(TreeId::Keys);
            kb.remove(retired.as_slice());
            batches.push(kb);
        }
        if let Some(m) = &g.master_swap {
            // Step 3: swap the new keys in, in one batch (applied below
            // under the readers' lock, with the master switched).
            let mut kb = wal::Batch::new(TreeId::Keys);
            for (n, v) in &m.staged {
                kb.insert(n.as_slice(), v.as_slice());
                kb.remove([STAGED, n.as_slice()].concat());
            }
            kb.remove(ROTATING);
            batches.push(kb);
        }
        let gw = wal::GroupWrite { first_seq, batches };
        wal::encode_record_into(&gw, &mut self.record)?;
        let shared = &self.shared;
        let (file, closed) = self.wal.append(first_seq, &self.record, |f| {
            sync_under_lock(shared, &[f], false)
        })?;
        if self.record.capacity() > RECORD_BUFFER_KEPT {
            self.record = Vec::new();
        }
        if self.keep_segment {
            self.kept_segment = Some(file);
        } else {
            // Nothing waits for this send: a syncer that is gone fails the
            // group's replies instead.
            let _ = self.syncer.send(ToSyncer::Flush(file));
        }
        Ok(Written {
            batches: gw.batches,
            closed,
        })
    }

    /// Writes a built group ahead and hands it to the writer; false when
    /// the writer is gone.
    fn hand_over(
        &mut self,
        mut built: Built,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> bool {
        self.write_ahead(&mut built, writer);
        writer.send(ToWriter::Group(Box::new(built))).is_ok()
    }

    /// Appends a signed group's record to the write-ahead file and names
    /// the segment to the syncer, so that its `fdatasync` starts before
    /// the writer's thread has the group. A failure poisons the vault at
    /// once: no later record follows it.
    fn write_ahead(&mut self, built: &mut Built, writer: &std::sync::mpsc::SyncSender<ToWriter>) {
        let Some((_, head)) = &built.signed else {
            return;
        };
        if !built.g.shreds.is_empty() {
            // The shred batch names the subjects' keys in sled, where
            // every group built before must be.
            Self::barrier(writer);
        }
        let result = if self.shared.poisoned.load(Ordering::Acquire) {
            Err(Error::Poisoned)
        } else {
            self.write_record(&built.g, built.first_seq, head)
        };
        if let Err(e) = &result {
            if !matches!(e, Error::Poisoned) {
                tracing::error!(error = %e, "writing ahead failed; the vault refuses writes until reopened");
            }
            self.shared.poisoned.store(true, Ordering::Release);
        }
        built.written = Some(result);
    }

    /// [`Committer::write_ahead`], with the segment the record went to
    /// handed back for the caller to sync instead of named to the syncer
    /// (`None` when nothing was written).
    fn write_ahead_kept(
        &mut self,
        built: &mut Built,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> Option<Arc<File>> {
        self.keep_segment = true;
        self.write_ahead(built, writer);
        self.keep_segment = false;
        self.kept_segment.take()
    }

    /// Empties the key cache once the writer has published every group
    /// built so far: until then, keys created by those groups are known
    /// only to the cache, and a lookup would create a second key.
    fn clear_key_cache(&mut self, writer: &std::sync::mpsc::SyncSender<ToWriter>) {
        Self::barrier(writer);
        self.keys.clear();
        // Every shred built so far is published now, or in the group
        // being built (whose own mutations `state_now` sees).
        self.shredded.clear();
    }

    /// Waits until the writer has published every group built so far.
    fn barrier(writer: &std::sync::mpsc::SyncSender<ToWriter>) {
        let (done, wait) = std::sync::mpsc::channel();
        if writer.send(ToWriter::Barrier(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Builds a commit group: seqs, encryption, chaining, Merkle root and
    /// signed head.
    fn build(
        &mut self,
        reqs: Vec<Request>,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> Built {
        if std::mem::take(&mut self.publish_first) {
            Self::barrier(writer);
        }
        let first_seq = self.pos.next_seq;
        let mut g = Group {
            first_seq,
            ..Group::default()
        };
        for req in reqs {
            self.refusal = None;
            let indices = self.add_request(&mut g, req.items, writer);
            // A refused redemption keeps its audit entry in the group and
            // answers with the refusal once that entry is durable.
            let indices = match (indices, self.refusal.take()) {
                (Ok(_), Some(r)) => Err(Error::TokenRefused(r)),
                (other, _) => other,
            };
            g.requests.push((req.reply, indices));
        }
        let signed = (!g.encoded.is_empty()).then(|| {
            let tree = MerkleTree::new(&g.hashes);
            let head = SignedHead::sign(
                &self.signing,
                self.signing_id,
                first_seq,
                self.pos.next_seq - 1,
                self.pos.last_hash,
                tree.root(),
                self.pos.last_ts,
            );
            (tree, head)
        });
        if let Some((id, key, _)) = &g.signing_swap {
            // The group just signed holds the rotation: later ones are
            // signed by the new key.
            self.signing = key.clone();
            self.signing_id = *id;
        }
        Built {
            g,
            first_seq,
            signed,
            written: None,
            led: None,
        }
    }

    /// Adds a request's items to the group, all or none.
    fn add_request(
        &mut self,
        g: &mut Group,
        items: Vec<Append>,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> Result<Vec<usize>> {
        let mark = (
            g.encoded.len(),
            g.hashes.len(),
            g.state.len(),
            g.new_keys.len(),
            self.pos,
            g.shreds.len(),
            g.usage.len(),
            g.signing_swap.is_some(),
        );
        let r = self.try_add(g, items, writer);
        if r.is_ok() {
            self.note_changes(&g.state[mark.2..]);
        } else {
            // Roll back this request's part of the group.
            let made_keys = g.new_keys.len() > mark.3;
            g.new_keys.truncate(mark.3);
            g.encoded.truncate(mark.0);
            g.hashes.truncate(mark.1);
            g.state.truncate(mark.2);
            self.pos = mark.4;
            g.shreds.truncate(mark.5);
            g.usage.truncate(mark.6);
            g.master_swap = None;
            if !mark.7 {
                g.signing_swap = None;
            }
            if made_keys {
                // The cache may hold keys that were rolled back.
                self.clear_key_cache(writer);
                self.publish_first = true;
                g.cache_emptied = true;
            }
        }
        r
    }

    fn try_add(
        &mut self,
        g: &mut Group,
        items: Vec<Append>,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> Result<Vec<usize>> {
        let mut idx = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Append::Record { subject, plaintext } => {
                    idx.push(self.encrypt_record(g, subject, &plaintext)?);
                }
                Append::Event {
                    kind,
                    subject,
                    payload,
                } => {
                    if kind == Kind::TokenMinted
                        && !subject.is_empty()
                        && self.key_state_now(g, &subject)?.is_some_and(|k| k.shredded)
                    {
                        return Err(Error::SubjectShredded(subject));
                    }
                    if kind == Kind::CredentialCreated {
                        self.check_credential_free(g, &payload)?;
                    }
                    idx.push(self.push(g, kind, &subject, 0, [0; 12], &payload)?);
                }
                Append::Redeem {
                    token_hash,
                    partner_id,
                    now_ms,
                    source,
                    proxy,
                    credential,
                } => {
                    if let Some(id) = credential {
                        if !self.credential_live_now(g, &id, &partner_id)? {
                            return Err(Error::CredentialRevoked(id));
                        }
                    }
                    idx.push(self.redeem(g, &token_hash, &partner_id, now_ms, (source, proxy))?)
                }
                Append::Shred { subject, by } => idx.push(self.shred(g, subject, by)?),
                Append::Rotate {
                    subject,
                    reencrypt,
                    by,
                } => idx.extend(self.rotate(g, subject, reencrypt, by, writer)?),
                Append::RotateMaster(change) => idx.push(self.rotate_master(g, *change)?),
                Append::RotateSigning { by } => idx.push(self.rotate_signing(g, by)?),
            }
        }
        Ok(idx)
    }

    /// Encrypts a record under the subject's current key (creating the
    /// subject's first key, or rotating at the encryption limit).
    fn encrypt_record(
        &mut self,
        g: &mut Group,
        subject: String,
        plaintext: &[u8],
    ) -> Result<usize> {
        let (version, used) = self.data_key(g, &subject)?;
        if used >= self.max_encryptions {
            let next = version
                .checked_add(1)
                .ok_or_else(|| Error::Invalid("no key version left".into()))?;
            self.new_key(g, &subject, next, None)?;
            self.data_key(g, &subject)?;
        }
        let seq = self.pos.next_seq;
        let nonce = self.nonces.next_nonce();
        // The key `data_key` left in the cache, used where it lies: no copy
        // of its expanded schedule (and no wipe of that copy) per record.
        let c = self
            .keys
            .get_mut(&subject)
            .ok_or(Error::Malformed("a data key missing from the cache"))?;
        let ct = c
            .cipher
            .seal(&nonce, &record_aad(&subject, seq, c.version), plaintext);
        c.encryptions += 1;
        let (version, published) = (c.version, c.published.clone());
        let i = self.push(g, Kind::Record, &subject, version, nonce, &ct)?;
        g.usage.push(Usage::Encrypted(published));
        Ok(i)
    }

    /// Refuses a `credential_created` whose key hash an active credential
    /// already has, as of this point of the log: the group being built,
    /// then the groups on their way to the writer, then the overlay and
    /// the tree. So two requests for one client certificate cannot both
    /// pass, however close together.
    fn check_credential_free(&self, g: &Group, payload: &[u8]) -> Result<()> {
        let c: CredentialCreated =
            serde_json::from_slice(payload).map_err(|_| Error::Malformed("credential_created"))?;
        let held = |key: &[u8]| -> Result<bool> { Ok(self.state_now(g, key)?.is_some()) };
        if held(&state::key("h/", &c.key_hash))? {
            return Err(Error::Conflict(match c.client_cert_sha256 {
                Some(_) => "an active credential already holds this client certificate".into(),
                None => "an active credential already has this key".into(),
            }));
        }
        // An id is the role and 48 bits of the key's hash: a key made to
        // share them with a live credential's would take its id, and the
        // live credential's key would then be looked up as the new one.
        if held(&state::key(state::CREDENTIAL_PREFIX, &c.id))? {
            return Err(Error::Conflict(format!(
                "an active credential already has the id {}",
                c.id
            )));
        }
        Ok(())
    }

    /// Remembers the credentials a request just added to the group
    /// created or revoked, and the consents and policies it changed (its
    /// derived-state changes `changes`).
    fn note_changes(&mut self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let seq = self.pos.next_seq.saturating_sub(1);
        for (k, v) in changes {
            if k.starts_with(b"h/") || k.starts_with(state::CREDENTIAL_PREFIX.as_bytes()) {
                self.credentials.insert(k.clone(), (seq, v.clone()));
            } else if is_terms_key(k) {
                self.terms.insert(k.clone(), (seq, v.clone()));
            } else if k.starts_with(b"t/") {
                self.minted.insert(k.clone(), (seq, v.clone()));
            }
        }
        if self.minted.len() > self.minted_trim_at {
            if let Ok(Some(published)) = self.published_seq() {
                self.minted.retain(|_, (seq, _)| *seq > published);
            }
            self.minted_trim_at = MINTED_TRIM.max(2 * self.minted.len());
        }
        if self.credentials.len() > 256 || self.terms.len() > 256 {
            if let Ok(Some(published)) = self.published_seq() {
                self.credentials.retain(|_, (seq, _)| *seq > published);
                self.terms.retain(|_, (seq, _)| *seq > published);
            }
        }
    }

    /// The last seq whose derived-state changes the overlay holds (or the
    /// tree already does), where readers find them: what this committer
    /// remembers of its own changes up to it can go.
    fn published_seq(&self) -> Result<Option<u64>> {
        match self.shared.overlay.lock() {
            Ok(o) => Ok(o.last_seq),
            Err(_) => Err(Error::Poisoned),
        }
    }

    /// A subject's key state as of this point of the group being built.
    fn key_state_now(&self, g: &Group, subject: &str) -> Result<Option<KeyState>> {
        if self.shredded.contains(subject) {
            return Ok(Some(KeyState {
                version: 0,
                shredded: true,
            }));
        }
        if let Some(c) = self.keys.get(subject) {
            return Ok(Some(KeyState {
                version: c.version,
                shredded: false,
            }));
        }
        match self.state_now(g, &state::key("k/", subject))? {
            Some(v) => Ok(Some(KeyState::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Appends `subject_shredded` for the subject's current version; the
    /// writer deletes its keys after the log write.
    fn shred(&mut self, g: &mut Group, subject: String, by: Option<String>) -> Result<usize> {
        let ks = self
            .key_state_now(g, &subject)?
            .ok_or_else(|| Error::NoSuchSubject(subject.clone()))?;
        if ks.shredded {
            return Err(Error::SubjectShredded(subject));
        }
        let payload = serde_json::to_vec(&ShredCommit {
            version: ks.version,
            recorded_by: by,
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let i = self.push(g, Kind::SubjectShredded, &subject, 0, [0; 12], &payload)?;
        self.keys.remove(&subject);
        self.shredded.insert(subject.clone());
        g.shreds.push(subject.clone());
        g.usage.push(Usage::Shredded(subject));
        Ok(i)
    }

    /// A new key version for the subject; with `reencrypt`, its latest
    /// record appended again under it.
    fn rotate(
        &mut self,
        g: &mut Group,
        subject: String,
        reencrypt: bool,
        by: Option<String>,
        writer: &std::sync::mpsc::SyncSender<ToWriter>,
    ) -> Result<Vec<usize>> {
        let ks = self
            .key_state_now(g, &subject)?
            .ok_or_else(|| Error::NoSuchSubject(subject.clone()))?;
        if ks.shredded {
            return Err(Error::SubjectShredded(subject));
        }
        let plaintext = if reencrypt {
            // The latest record may be in a group still on its way to the
            // writer: wait until every earlier group is in the log.
            Self::barrier(writer);
            self.latest_plaintext(g, &subject)?
        } else {
            None
        };
        let next = ks
            .version
            .checked_add(1)
            .ok_or_else(|| Error::Invalid("no key version left".into()))?;
        let mut idx = vec![self.new_key(g, &subject, next, by)?];
        if let Some(p) = plaintext {
            idx.push(self.encrypt_record(g, subject, &p)?);
        }
        Ok(idx)
    }

    /// Re-wraps every key in the store under the new master: `rewrap`
    /// entries committing to the new wrapped keys, then the `master`
    /// entry committing to the new sealed master. The group must be empty
    /// and every earlier group written (the caller's barrier); the writer
    /// stages the keys, writes the log, then swaps them in (steps 1 to 3).
    fn rotate_master(&mut self, g: &mut Group, change: MasterChange) -> Result<usize> {
        if !g.encoded.is_empty() {
            return Err(Error::Invalid(
                "a master rotation is a commit group of its own".into(),
            ));
        }
        let MasterChange {
            master,
            sealed,
            mask,
            by,
        } = change;
        let mut staged: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut has_mask = false;
        for kv in self.store.keys.iter() {
            let (name, wrapped) = kv?;
            let name = name.as_ref();
            if name == state::MASTER || name == SHREDDING || is_pending_marker(name) {
                continue;
            }
            let aad = key_aad(name).ok_or_else(|| {
                Error::integrity(
                    self.pos.next_seq,
                    Reason::KeyMismatch(format!(
                        "unexpected key {:?} in the key store",
                        String::from_utf8_lossy(name)
                    )),
                )
            })?;
            has_mask |= name == state::MASK;
            let key = crypto::unwrap_key(&self.master, &aad, &wrapped).ok_or_else(|| {
                Error::integrity(
                    self.pos.next_seq,
                    Reason::KeyMismatch("a key does not unwrap under the master key".into()),
                )
            })?;
            staged.push((name.to_vec(), crypto::wrap(&master, &aad, key.as_bytes())));
        }
        // The whole rotation is one commit group, one write-ahead record
        // of at most 4 GiB, holding each key three times (staged, swapped
        // in, its staged name removed) and its name and hash in a rewrap
        // entry: a key store past that is refused here, before anything
        // is written, rather than failing the record and poisoning the
        // vault.
        let record_bytes: u64 = staged
            .iter()
            .map(|(n, w)| 3 * (n.len() + w.len()) as u64 + 2 * n.len() as u64 + 96)
            .sum();
        if record_bytes > MAX_ROTATION_RECORD_BYTES {
            return Err(Error::Invalid(format!(
                "the key store holds {} keys, about {} MiB to write again in one rotation: \
                 more than the {} MiB a master rotation writes at most",
                staged.len(),
                record_bytes >> 20,
                MAX_ROTATION_RECORD_BYTES >> 20
            )));
        }
        let mut mask_key_hash = None;
        if !has_mask {
            let wrapped = crypto::wrap(&master, &crypto::mask_key_aad(), &mask);
            mask_key_hash = Some(hex::encode(blake3::hash(&wrapped).as_bytes()));
            staged.push((state::MASK.to_vec(), wrapped));
        }
        // Rewrap entries of at most ~32 KiB of payload each (the maximum
        // is 48 KiB; a pair takes at most ~600 bytes).
        let mut batch: Vec<(String, String)> = Vec::new();
        let mut bytes = 0usize;
        let rewrapped = staged
            .iter()
            .filter(|(n, _)| mask_key_hash.is_none() || n != state::MASK);
        let mut count = 0u64;
        let flush = |this: &mut Self, g: &mut Group, batch: &mut Vec<(String, String)>| {
            let payload = serde_json::to_vec(&state::Rewrap {
                key: state::REWRAPPED_KEYS.to_string(),
                keys: std::mem::take(batch),
            })
            .map_err(|e| Error::Invalid(e.to_string()))?;
            this.push(g, Kind::KeyRotated, "", 0, [0; 12], &payload)
        };
        for (name, wrapped) in rewrapped {
            let pair = (
                hex::encode(name),
                hex::encode(blake3::hash(wrapped).as_bytes()),
            );
            bytes += pair.0.len() + pair.1.len() + 8;
            batch.push(pair);
            count += 1;
            if bytes >= 32 * 1024 {
                flush(self, g, &mut batch)?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            flush(self, g, &mut batch)?;
        }
        let payload = serde_json::to_vec(&state::MasterRotation {
            key: state::ROTATED_MASTER_KEY.to_string(),
            sealed_master_hash: hex::encode(blake3::hash(&sealed).as_bytes()),
            rewrapped: count,
            mask_key_hash,
            recorded_by: by,
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let seq = self.pos.next_seq;
        let i = self.push(g, Kind::KeyRotated, "", 0, [0; 12], &payload)?;
        g.usage.push(Usage::MasterRotated {
            seq,
            ts: self.pos.last_ts,
        });
        staged.push((state::MASTER.to_vec(), sealed));
        g.master_swap = Some(MasterSwap { master, staged });
        Ok(i)
    }

    /// A new signing key: wrapped under the master and written before the
    /// group (step 1, like a new data key), endorsed by the current key in
    /// a `key_rotated` entry of this group, which the current key signs;
    /// the committer signs later groups with the new key, and the writer
    /// deletes the old one after the log write (docs/keys.md).
    fn rotate_signing(&mut self, g: &mut Group, by: Option<String>) -> Result<usize> {
        if g.signing_swap.is_some() {
            return Err(Error::Invalid(
                "one signing key rotation per commit group".into(),
            ));
        }
        let key_id = self
            .signing_id
            .checked_add(1)
            .ok_or_else(|| Error::Invalid("no signing key id left".into()))?;
        let new = SigningKey::generate(&mut rand_core::OsRng);
        let seed = Zeroizing::new(new.to_bytes());
        let wrapped = crypto::wrap(&self.master, &signing_key_aad(key_id), &seed);
        let seq = self.pos.next_seq;
        let endorsement = KeyEndorsement::sign(&self.signing, key_id, &new.verifying_key(), seq);
        let payload = serde_json::to_vec(&state::SigningRotation {
            key: state::ROTATED_SIGNING_KEY.to_string(),
            key_id,
            public_key: hex::encode(endorsement.public_key),
            wrapped_hash: hex::encode(blake3::hash(&wrapped).as_bytes()),
            endorsement: hex::encode(endorsement.signature),
            recorded_by: by,
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let i = self.push(g, Kind::KeyRotated, "", 0, [0; 12], &payload)?;
        g.new_keys.push((state::signing_key_name(key_id), wrapped));
        g.usage.push(Usage::SigningRotated {
            ts: self.pos.last_ts,
            endorsement,
        });
        g.signing_swap = Some((key_id, new, state::signing_key_name(self.signing_id)));
        Ok(i)
    }

    /// The subject's latest record, decrypted; every group before this one
    /// must be published (a barrier).
    fn latest_plaintext(&self, g: &Group, subject: &str) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(ptr) = self.state_now(g, &state::key("s/", subject))? else {
            return Ok(None);
        };
        let seq = ptr
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or(Error::Malformed("record pointer"))?;
        let e = if seq >= g.first_seq {
            let bytes = usize::try_from(seq - g.first_seq)
                .ok()
                .and_then(|i| g.encoded.get(i))
                .ok_or(Error::Malformed("record pointer"))?;
            let e = EntryRef::decode(bytes)?;
            (
                e.kind,
                e.subject.to_string(),
                e.key_version,
                e.nonce,
                e.payload.to_vec(),
            )
        } else {
            let e =
                read_entry(&self.store, seq)?.ok_or(Error::integrity(seq, Reason::Truncated))?;
            (e.kind, e.subject, e.key_version, e.nonce, e.payload)
        };
        let (kind, entry_subject, version, nonce, payload) = e;
        if kind != Kind::Record || entry_subject != subject {
            return Err(Error::integrity(
                seq,
                Reason::IndexMismatch("record pointer".into()),
            ));
        }
        let key = self.unwrap_data_key(g, subject, version)?;
        key.open(&nonce, &record_aad(subject, seq, version), &payload)
            .ok_or(Error::Decrypt(seq))
            .map(Some)
    }

    /// A subject's wrapped key of `version`, unwrapped: from this group's
    /// new keys, or the key store.
    fn unwrap_data_key(&self, g: &Group, subject: &str, version: u32) -> Result<SecretKey> {
        let name = state::data_key_name(subject, version);
        let wrapped = match g.new_keys.iter().rev().find(|(n, _)| *n == name) {
            Some((_, w)) => w.clone(),
            None => self
                .store
                .keys
                .get(&name)?
                .ok_or_else(|| Error::SubjectShredded(subject.to_string()))?
                .to_vec(),
        };
        crypto::unwrap_key(&self.master, &data_key_aad(subject, version), &wrapped)
            .ok_or(Error::Decrypt(0))
    }

    /// A derived-state value as of this point of the group being built:
    /// the group's own mutations first, then (for consents, policies and
    /// credentials) those of the groups on their way to the writer, then
    /// the overlay and the tree.
    fn state_now(&self, g: &Group, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = changed_in(g, key) {
            return Ok(v.clone());
        }
        // The three records hold keys of their own prefixes (`note_changes`).
        let recorded = self.terms.get(key);
        if let Some((_, v)) = recorded
            .or_else(|| self.credentials.get(key))
            .or_else(|| self.minted.get(key))
        {
            return Ok(v.clone());
        }
        Ok(self
            .shared
            .state_get(&self.store.state, key)?
            .map(|v| v.to_vec()))
    }

    /// Whether the credential `id` is live, under the name `name`, as of
    /// this point of the group being built: the group's own changes, then
    /// the committer's record of the changes not yet published, then the
    /// overlay and the tree. (A certificate's credential revoked and made
    /// again has the same id, maybe under another name.)
    fn credential_live_now(&self, g: &Group, id: &str, name: &str) -> Result<bool> {
        let key = state::key(state::CREDENTIAL_PREFIX, id);
        let Some(value) = self.state_now(g, &key)? else {
            return Ok(false);
        };
        #[derive(serde::Deserialize)]
        struct Named {
            name: String,
        }
        let held: Named =
            serde_json::from_slice(&value).map_err(|_| Error::Malformed("credential state"))?;
        Ok(held.name == name)
    }

    /// Checks a token and burns it (a `token_redeemed` entry), or records
    /// the refusal (an `access_denied` entry) and remembers it for the
    /// reply. Runs in log order, so two redemptions of one token in any
    /// interleaving find the first one's burn.
    fn redeem(
        &mut self,
        g: &mut Group,
        token_hash: &str,
        partner_id: &str,
        at_ms: Option<u64>,
        (source, proxy): (Option<std::net::IpAddr>, Option<std::net::IpAddr>),
    ) -> Result<usize> {
        // The wall clock the token's expiry and mint time were set by, read
        // as the redemption is decided, not when it was asked.
        let now_ms = at_ms.unwrap_or_else(now_ms);
        let minted: Option<state::TokenMinted> =
            match self.state_now(g, &state::key("t/", token_hash))? {
                Some(v) => {
                    Some(serde_json::from_slice(&v).map_err(|_| Error::Malformed("token state"))?)
                }
                None => None,
            };
        // Burns of groups still on their way to the writer are not in the
        // overlay yet: the committer's own record of burns covers them.
        let spent = self.burned.contains_key(token_hash)
            || self.state_now(g, &state::key("u/", token_hash))?.is_some();
        let refusal = match &minted {
            None => Some(TokenRefusal::Unknown),
            Some(_) if spent => Some(TokenRefusal::Spent),
            Some(t) if t.partner_id != partner_id => Some(TokenRefusal::WrongPartner),
            Some(t) if now_ms >= t.expires_at_ms => Some(TokenRefusal::Expired),
            Some(t) => match self.key_state_now(g, &t.subject)? {
                Some(k) if k.shredded => Some(TokenRefusal::SubjectShredded),
                _ => match self.consent_refusal(g, t, now_ms)? {
                    Some(r) => Some(r),
                    None => self.policy_refusal(g, t, now_ms, source)?,
                },
            },
        };
        let subject = minted
            .as_ref()
            .map_or("", |t| t.subject.as_str())
            .to_string();
        match refusal {
            None => {
                if self.burned.len() >= 100_000 {
                    // Burns the overlay holds are found there.
                    if let Some(published) = self.published_seq()? {
                        self.burned.retain(|_, seq| *seq > published);
                    }
                }
                let seq = self.pos.next_seq;
                let payload = serde_json::to_vec(&state::TokenRedeemed {
                    token_hash: token_hash.to_string(),
                    partner_id: partner_id.to_string(),
                    // The entry is stamped no earlier than the last one.
                    checked_at_ms: (now_ms < self.pos.last_ts).then_some(now_ms),
                })
                .map_err(|e| Error::Invalid(e.to_string()))?;
                let i = self.push(g, Kind::TokenRedeemed, &subject, 0, [0; 12], &payload)?;
                // Once its entry is in the group (a request rolled back
                // leaves no burn behind).
                self.burned.insert(token_hash.to_string(), seq);
                Ok(i)
            }
            Some(r) => {
                let mut payload = serde_json::json!({
                    "action": "redeem",
                    "reason": r.code(),
                    "token_hash": token_hash,
                    "partner_id": partner_id,
                });
                if let Some(ip) = source {
                    payload["source_ip"] = ip.to_string().into();
                }
                if let Some(ip) = proxy {
                    payload["proxy_ip"] = ip.to_string().into();
                }
                let payload = payload.to_string();
                let i = self.push(
                    g,
                    Kind::AccessDenied,
                    &subject,
                    0,
                    [0; 12],
                    payload.as_bytes(),
                )?;
                self.refusal = Some(r);
                Ok(i)
            }
        }
    }

    /// Where the vault holds a consent of the token's subject for its
    /// partner, it must still be in force for the token's purpose: a
    /// revocation, a grant that no longer names the purpose or one that
    /// has lapsed stops the tokens minted before it. A token minted where
    /// the vault holds no consent (by a gateway that keeps consent
    /// elsewhere) is not refused for it.
    fn consent_refusal(
        &self,
        g: &Group,
        t: &state::TokenMinted,
        now_ms: u64,
    ) -> Result<Option<TokenRefusal>> {
        let key = state::consent_key(&t.subject, &t.partner_id);
        let Some(v) = self.state_now(g, &key)? else {
            return Ok(None);
        };
        let (kind, consent) = state::decode_consent(&v)?;
        Ok(match consent.status(kind, &t.purpose, now_ms) {
            state::ConsentStatus::InForce => None,
            state::ConsentStatus::Revoked | state::ConsentStatus::OtherPurposes => {
                Some(TokenRefusal::ConsentRevoked)
            }
            state::ConsentStatus::Expired => Some(TokenRefusal::ConsentExpired),
        })
    }

    /// Where the vault holds a policy for the token's partner, it must
    /// still allow the token ([`state::PolicyTerms::allows`],
    /// [`state::PolicyTerms::allows_age`]): deactivating the partner,
    /// taking out the token's purpose or one of its fields, or shortening
    /// `max_token_ttl_secs` below the token's age stops the tokens minted
    /// before. Then its conditions hold for the redemption as they did for
    /// the grant: the hour ([`state::within_hours`]) and the partner's
    /// address ([`state::source_allowed`]). A token minted where the vault
    /// holds no policy for the partner (by a gateway that keeps policies
    /// elsewhere) is not refused for it.
    fn policy_refusal(
        &self,
        g: &Group,
        t: &state::TokenMinted,
        now_ms: u64,
        source: Option<std::net::IpAddr>,
    ) -> Result<Option<TokenRefusal>> {
        let Some(v) = self.state_now(g, &state::policy_key(&t.partner_id))? else {
            return Ok(None);
        };
        let Some(p) = state::PolicyTerms::decode(&v) else {
            return Ok(Some(TokenRefusal::PolicyChanged));
        };
        Ok(
            if !p.allows(&t.purpose, &t.fields) || !p.allows_age(t.minted_at_ms, now_ms) {
                Some(TokenRefusal::PolicyChanged)
            } else if !state::within_hours(p.allowed_hours_utc, now_ms) {
                Some(TokenRefusal::OutsideAllowedHours)
            } else if !state::source_allowed(&p.source_ips, source) {
                Some(TokenRefusal::SourceNotAllowed)
            } else {
                None
            },
        )
    }

    fn push(
        &mut self,
        g: &mut Group,
        kind: Kind,
        subject: &str,
        key_version: u32,
        nonce: [u8; 12],
        payload: &[u8],
    ) -> Result<usize> {
        // Items are checked before they reach the committer; this stops
        // one that slipped through from failing the encoder's assertion,
        // which would end the committer and close the vault.
        if subject.len() > MAX_SUBJECT_LEN || payload.len() > MAX_PAYLOAD_LEN {
            return Err(Error::Invalid(format!(
                "{} entry of a {}-byte subject id and a {}-byte payload exceeds the entry limits",
                kind.name(),
                subject.len(),
                payload.len()
            )));
        }
        let ts = now_ms().max(self.pos.last_ts);
        let e = EntryRef {
            kind,
            seq: self.pos.next_seq,
            timestamp_ms: ts,
            prev_hash: self.pos.last_hash,
            key_version,
            nonce,
            subject,
            payload,
        };
        state::mutations_into(&e, &mut g.state)?;
        let bytes = e.encode();
        let h = entry_hash(&bytes);
        g.encoded.push(bytes);
        g.hashes.push(h);
        self.pos.next_seq += 1;
        self.pos.last_hash = h;
        self.pos.last_ts = ts;
        Ok(g.encoded.len() - 1)
    }

    /// Puts the subject's current data key in the cache, creating (and
    /// committing) a first key for a new subject, and returns its version
    /// and how many records it encrypted.
    fn data_key(&mut self, g: &mut Group, subject: &str) -> Result<(u32, u64)> {
        if let Some(c) = self.keys.get(subject) {
            return Ok((c.version, c.encryptions));
        }
        match self.key_state_now(g, subject)? {
            Some(ks) if ks.shredded => Err(Error::SubjectShredded(subject.to_string())),
            Some(ks) => {
                let key = self.unwrap_data_key(g, subject, ks.version)?;
                // Not in the cache: no group in flight used this key (the
                // cache is emptied only once the writer has published every
                // group built before), so the published count is current
                // but for this group's own records, if a failed request
                // emptied the cache within it. A key this group created
                // has its counter in the group.
                let published = match self
                    .shared
                    .key_uses
                    .lock()
                    .map_err(|_| Error::Poisoned)?
                    .counter(subject, ks.version)
                {
                    Some(c) => c.clone(),
                    None => g.counter(subject, ks.version),
                };
                // With this group's own records under it, which reach the
                // count only when the group is published (none, unless the
                // cache was emptied within the group).
                let own = if g.cache_emptied {
                    g.usage
                        .iter()
                        .filter(|u| matches!(u, Usage::Encrypted(c) if Arc::ptr_eq(c, &published)))
                        .count() as u64
                } else {
                    0
                };
                let used = published.load(Ordering::Relaxed) + own;
                self.keys.insert(
                    subject.to_string(),
                    CachedKey {
                        version: ks.version,
                        cipher: key.cipher_handle(),
                        encryptions: used,
                        published,
                    },
                );
                Ok((ks.version, used))
            }
            None => {
                self.new_key(g, subject, 1, None)?;
                self.data_key(g, subject)
            }
        }
    }

    /// Creates data key `version` of a subject: wraps it under the master
    /// key and commits to it, with a `subject_key` entry for version 1 and
    /// a `key_rotated` entry for later ones. The wrapped key is written
    /// before the group's chunks (step 1); the key becomes the subject's
    /// current one.
    fn new_key(
        &mut self,
        g: &mut Group,
        subject: &str,
        version: u32,
        by: Option<String>,
    ) -> Result<usize> {
        let key = SecretKey::generate();
        let wrapped = crypto::wrap(
            &self.master,
            &data_key_aad(subject, version),
            key.as_bytes(),
        );
        let wrapped_hash = hex::encode(blake3::hash(&wrapped).as_bytes());
        let (kind, payload) = if version == 1 {
            let c = SubjectKeyCommit {
                version,
                wrapped_hash,
            };
            (Kind::SubjectKey, serde_json::to_vec(&c))
        } else {
            let r = KeyRotation {
                key: state::ROTATED_SUBJECT_KEY.to_string(),
                subject: subject.to_string(),
                version,
                wrapped_hash,
                recorded_by: by,
            };
            (Kind::KeyRotated, serde_json::to_vec(&r))
        };
        let payload = payload.map_err(|e| Error::Invalid(e.to_string()))?;
        let seq = self.pos.next_seq;
        let i = self.push(g, kind, subject, 0, [0; 12], &payload)?;
        g.new_keys
            .push((state::data_key_name(subject, version), wrapped));
        let counter = UseCounter::default();
        g.usage.push(Usage::Created {
            subject: subject.to_string(),
            version,
            seq,
            ts: self.pos.last_ts,
            counter: counter.clone(),
        });
        self.keys.insert(
            subject.to_string(),
            CachedKey {
                version,
                cipher: key.cipher_handle(),
                encryptions: 0,
                published: counter,
            },
        );
        Ok(i)
    }
}

/// What the committer hands to the writer.
enum ToWriter {
    Group(Box<Built>),
    /// Answered once every group sent before it is published.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// A built commit group, ready to be written.
struct Built {
    g: Group,
    first_seq: u64,
    /// The group's Merkle tree and signed head (none when every request failed).
    signed: Option<(MerkleTree, SignedHead)>,
    /// What the committer wrote ahead for a signed group.
    written: Option<Result<Written>>,
    /// Set when a lone request built the group ([`Vault::lead`]): the
    /// writer hands the group's replies there instead of to the syncer,
    /// since that request makes the group durable itself.
    led: Option<oneshot::Sender<Synced>>,
}

/// A group's record in the write-ahead file: the batches the writer
/// applies to sled, the first seqs of its log chunks, and the segment the
/// record's append closed, if it did.
struct Written {
    batches: Vec<wal::Batch>,
    closed: Option<PathBuf>,
}

/// Applies groups written ahead to sled and publishes their derived
/// state, on its own thread so that building and writing ahead the next
/// group overlaps this work.
struct Writer {
    store: Arc<Store>,
    /// The readers' master key, swapped by a master rotation's step 3.
    master: Arc<RwLock<Arc<SecretKey>>>,
    shared: Arc<Shared>,
    index_batch: u64,
    /// Full write-ahead segments go to the checkpointer.
    checkpoint: Option<std::sync::mpsc::Sender<PathBuf>>,
    syncer: std::sync::mpsc::Sender<ToSyncer>,
    /// Bytes of the log chunks waiting in `Store::recent` for sled, and
    /// since when the oldest has waited (see [`Writer::defer`]).
    deferred_bytes: usize,
    deferred_since: Option<Instant>,
    /// The first seqs of the held-back groups that created keys: their
    /// pending markers go once their chunks are in sled.
    deferred_markers: Vec<u64>,
}

/// The writer applies waiting log chunks to sled once they hold this
/// many bytes...
const DEFER_BYTES: usize = 256 << 10;
/// ...or once the oldest has waited this long, whichever comes first.
const DEFER_FOR: Duration = Duration::from_millis(5);

/// The writer keeps its record buffer across groups up to this capacity
/// (groups stop at about 1 MiB of payload by default, unless one request
/// alone is larger).
const RECORD_BUFFER_KEPT: usize = 16 << 20;

impl Writer {
    fn run(mut self, rx: std::sync::mpsc::Receiver<ToWriter>) {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            let msg = match self.deferred_since {
                None => match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => break,
                },
                Some(since) => match rx.recv_timeout(DEFER_FOR.saturating_sub(since.elapsed())) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => {
                        self.apply_deferred_or_poison();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            match msg {
                ToWriter::Group(mut built) => {
                    let led = built.led.take();
                    let done = self.finish(built);
                    match led {
                        // A leader gone (its caller gave up) drops the
                        // replies with it.
                        Some(leader) => drop(leader.send(done)),
                        None => {
                            if self.syncer.send(ToSyncer::Done(done)).is_err() {
                                break;
                            }
                        }
                    }
                }
                ToWriter::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        self.apply_deferred_or_poison();
    }

    /// Holds back a group's log batch, when it is the group's only batch:
    /// its chunks wait in `Store::recent`, where readers find them, and go
    /// to sled together with those of the next groups ([`DEFER_BYTES`],
    /// [`DEFER_FOR`]). Each sled batch seals and writes sled's I/O buffer
    /// twice, two device writes beside every commit's `fdatasync`; one
    /// batch for many groups makes that once per many. The write-ahead
    /// record is what makes the group durable and atomic, and replay
    /// restores any group whose chunks sled lacks after a crash.
    fn defer(&mut self, b: wal::Batch) -> Result<()> {
        let mut chunks = Vec::with_capacity(b.ops.len());
        for (k, v) in b.ops {
            let first = <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Malformed("log key is not a seq"))?;
            let v = v.ok_or(Error::Malformed("a log batch removes a chunk"))?;
            self.deferred_bytes += v.len();
            // Owned as the write-ahead record held it: no copy.
            chunks.push((first, bytes::Bytes::from(v)));
        }
        self.store
            .recent
            .write()
            .map_err(|_| Error::Poisoned)?
            .extend(chunks);
        self.deferred_since.get_or_insert_with(Instant::now);
        if self.deferred_bytes >= DEFER_BYTES {
            self.apply_deferred()?;
        }
        Ok(())
    }

    /// Applies every waiting log chunk to sled in one batch, then drops
    /// them from `Store::recent` (in that order, so that readers always
    /// find each chunk in one or the other).
    fn apply_deferred(&mut self) -> Result<()> {
        failpoint("apply::before_write")?;
        if self.store.apply_recent(None)? > 0 {
            crate::store::release_garbage();
        }
        // After the chunks in sled's order, and their bytes durable: a
        // marker is gone only if its group's log is there (`logfile`).
        if !self.deferred_markers.is_empty() {
            self.store.log.sync()?;
        }
        for seq in self.deferred_markers.drain(..) {
            self.store.keys.remove(pending_name(seq))?;
        }
        self.deferred_bytes = 0;
        self.deferred_since = None;
        Ok(())
    }

    /// [`Writer::apply_deferred`] off the path of a group: a failure
    /// poisons the vault, as a failed group write does (the chunks stay
    /// readable, and the write-ahead file keeps them for the next open),
    /// and the timer stops retrying.
    fn apply_deferred_or_poison(&mut self) {
        if let Err(e) = self.apply_deferred() {
            tracing::error!(error = %e, "applying the log to sled failed; the vault refuses writes until reopened");
            self.shared.poisoned.store(true, Ordering::Release);
            self.deferred_since = None;
        }
    }

    /// Writes a group and prepares its receipts for the syncer.
    fn finish(&mut self, built: Box<Built>) -> Synced {
        let Built {
            mut g,
            first_seq,
            signed,
            written,
            led: _,
        } = *built;
        let Some((tree, head)) = signed else {
            let replies = g
                .requests
                .into_iter()
                .map(|(reply, r)| (reply, r.map(|_| Vec::new())))
                .collect();
            return Synced {
                replies,
                head: None,
            };
        };
        let result = match written {
            Some(Ok(w)) if !self.shared.poisoned.load(Ordering::Acquire) => {
                self.apply(&g, first_seq, w)
            }
            // A failed write-ahead poisoned the vault, and the committer
            // said why.
            _ => Err(Error::Poisoned),
        };
        match result {
            Ok(()) => {}
            Err(e) => {
                if !matches!(e, Error::Poisoned) {
                    tracing::error!(error = %e, "commit failed; the vault refuses writes until reopened");
                }
                self.shared.poisoned.store(true, Ordering::Release);
                let replies = g
                    .requests
                    .into_iter()
                    .map(|(reply, _)| (reply, Err(Error::Poisoned)))
                    .collect();
                return Synced {
                    replies,
                    head: None,
                };
            }
        }
        self.publish(&mut g, head.last_seq);
        let replies = g
            .requests
            .into_iter()
            .map(|(reply, r)| {
                let receipts = r.map(|idx| {
                    idx.into_iter()
                        .map(|i| Receipt {
                            seq: first_seq + i as u64,
                            entry_hash: g.hashes[i],
                            path: tree.path(i),
                            head,
                        })
                        .collect()
                });
                (reply, receipts)
            })
            .collect();
        Synced {
            replies,
            head: Some(head),
        }
    }

    /// Applies a group written ahead to sled, while the syncer makes its
    /// record durable.
    fn apply(&mut self, g: &Group, first_seq: u64, w: Written) -> Result<()> {
        let Written { batches, closed } = w;
        let s = self.store.clone();
        if let Some(path) = closed {
            // The checkpoint makes sled durable with every group of the
            // closed segment, the held-back ones included.
            self.apply_deferred()?;
            if let Some(tx) = &self.checkpoint {
                let _ = tx.send(path);
            }
        }
        if matches!(batches.as_slice(), [b] if b.tree == TreeId::Log) {
            for b in batches {
                self.defer(b)?;
            }
            failpoint("commit::after_write")?;
            return Ok(());
        }
        let only_new_keys = g.shreds.is_empty()
            && g.master_swap.is_none()
            && g.signing_swap.is_none()
            && matches!(batches.as_slice(), [k, l] if k.tree == TreeId::Keys && l.tree == TreeId::Log);
        if only_new_keys {
            // New subjects' keys, key by key (the pending marker first, as
            // the batch lists it): a sled batch would seal and write sled's
            // I/O buffer twice beside this group's `fdatasync`. Before its
            // held-back log chunk in sled's order, so a group whose log
            // sled holds has its keys there too; a crash that keeps some
            // keys but not the group's write-ahead record leaves the
            // group's own marker naming them, which open acts on.
            let mut batches = batches.into_iter();
            for b in batches.by_ref().take(1) {
                for (k, v) in b.ops {
                    match v {
                        Some(v) => s.keys.insert(k, v)?,
                        None => s.keys.remove(k)?,
                    };
                }
            }
            self.deferred_markers.push(first_seq);
            for b in batches {
                self.defer(b)?;
            }
            failpoint("commit::after_write")?;
            return Ok(());
        }
        // Sled receives the log in seq order, and a group's other batches
        // in their place around its log batch (the order recovery relies
        // on): held-back chunks of earlier groups go first.
        self.apply_deferred()?;
        let count = batches.len();
        for (i, b) in batches.into_iter().enumerate() {
            if i + 1 == count {
                if let Some(m) = &g.master_swap {
                    let mut readers = self.master.write().map_err(|_| Error::Poisoned)?;
                    b.apply(&s)?;
                    *readers = m.master.clone();
                    continue;
                }
            }
            let log = b.tree == TreeId::Log;
            b.apply(&s)?;
            if log && (i + 1 < count || !g.new_keys.is_empty()) {
                // What comes after the group's log in sled rests on it:
                // its chunks' bytes durable first (`logfile`).
                s.log.sync()?;
            }
        }
        if !g.new_keys.is_empty() {
            // The group's log is in sled: its marker has done its work.
            s.keys.remove(pending_name(first_seq))?;
        }
        crate::store::release_garbage();
        failpoint("commit::after_write")?;
        Ok(())
    }

    /// Makes a written group's derived state (and key use) visible to
    /// readers.
    fn publish(&self, g: &mut Group, last_seq: u64) {
        if !g.usage.is_empty() {
            let Ok(mut u) = self.shared.key_uses.lock() else {
                self.shared.poisoned.store(true, Ordering::Release);
                return;
            };
            for change in g.usage.drain(..) {
                match change {
                    Usage::Created {
                        subject,
                        version,
                        seq,
                        ts,
                        counter,
                    } => u.created_with(&subject, version, seq, ts, counter),
                    Usage::Encrypted(counter) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Usage::Shredded(subject) => u.shredded(&subject),
                    Usage::MasterRotated { seq, ts } => u.master_rotated(seq, ts),
                    Usage::SigningRotated { ts, endorsement } => {
                        u.signing_rotated(ts);
                        match self.shared.signing_chain.write() {
                            Ok(mut c) => c.push(endorsement),
                            Err(_) => self.shared.poisoned.store(true, Ordering::Release),
                        }
                    }
                }
            }
        }
        let Ok(mut o) = self.shared.overlay.lock() else {
            self.shared.poisoned.store(true, Ordering::Release);
            return;
        };
        let mut revoked = 0;
        for (k, v) in g.state.drain(..) {
            revoked += u64::from(v.is_none() && k.starts_with(state::CREDENTIAL_PREFIX.as_bytes()));
            o.map.insert(k, (last_seq, v));
        }
        o.last_seq = Some(last_seq);
        if revoked > 0 {
            // Under the overlay's lock: a reader that sees the count sees
            // the credential gone.
            self.shared.revocations.fetch_add(revoked, Ordering::AcqRel);
        }
        o.waiting += g.encoded.len() as u64;
        if o.waiting >= self.index_batch {
            self.shared.overlay_full.notify_one();
        }
    }
}

/// Derived-state inserts the indexer makes between two yields of its CPU.
const INDEX_YIELD_EVERY: usize = 16;

/// Derived-state inserts the indexer makes before it rests as long as they
/// took (see [`write_index`]).
const INDEX_PACE_EVERY: usize = 256;

/// Writes the overlay to the state tree, key by key, with its applied
/// marker. The overlay's map is taken whole (readers see it as `frozen`
/// until it is in the tree), so that the committer, which publishes into
/// the overlay after every group, never waits for a copy of it.
///
/// The keys go in their order (consecutive inserts then change the same
/// leaves while they are in the CPU's caches: a fifth less of the
/// indexer's CPU), and at most half a core's worth: after each
/// [`INDEX_PACE_EVERY`] inserts the indexer sleeps as long as they took,
/// unless the vault is closing or more keys wait in the live overlay than
/// this write covers (it would fall behind). On two cores, a write of
/// 40,000 keys at full speed took one core for 450 ms while answering
/// 10,000 authorizations/s needed 1.2, and the requests queued behind it
/// (docs/benchmarks.md, "The indexer at half a core").
fn write_index(store: &Store, shared: &Shared) -> Result<()> {
    let _gate = shared.index_gate.for_indexer();
    let (snapshot, applied) = {
        let mut o = shared.overlay.lock().map_err(|_| Error::Poisoned)?;
        if o.waiting == 0 {
            return Ok(());
        }
        let Some(applied) = o.last_seq else {
            return Ok(());
        };
        o.waiting = 0;
        // The next map starts at this one's size: a steady load then
        // grows none of its shards under the lock (`overlay`).
        let next = o.map.sized_like();
        let mut snap = std::mem::replace(&mut o.map, next);
        // Left by a write that failed (the vault is poisoned then): older.
        if let Some(old) = o.frozen.take() {
            for (k, v) in old.iter() {
                snap.insert_if_absent(k, v);
            }
        }
        let snap = Arc::new(snap);
        o.frozen = Some(snap.clone());
        (snap, applied)
    };
    // Key by key, not in one sled batch: a batch holds sled's process-wide
    // write lock until it is applied (0.9 s for 35,000 keys), stopping every
    // append and read meanwhile, while an insert takes its shared side. The
    // markers bracket the keys: sled recovers a prefix of its writes, so
    // after a crash in between each key holds its value at `applied` or at
    // `indexing` (verify accepts either, open replays from `applied`).
    failpoint("index::before_write")?;
    // The log chunks of the groups covered go to sled first, if the writer
    // still holds them back, with their bytes durable in the chunks file:
    // sled recovers a prefix of its writes, so derived state in sled always
    // has its entries in the log too (`logfile`).
    store.apply_recent(Some(applied))?;
    store.log.sync()?;
    store
        .state
        .insert(state::INDEXING, &applied.to_be_bytes())?;
    type Item<'a> = (usize, (&'a Vec<u8>, &'a Mutation));
    let mut keys: Vec<_> = snapshot.iter().collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let covered = keys.len();
    let mut since = Instant::now();
    let mut write = |(i, (k, (_, v))): Item| -> Result<()> {
        // The threads that answer requests run between inserts: on two
        // cores, a stream of inserts otherwise shows in their tail
        // latency (docs/benchmarks.md, "Longer runs").
        if i % INDEX_YIELD_EVERY == INDEX_YIELD_EVERY - 1 {
            std::thread::yield_now();
        }
        if i % INDEX_PACE_EVERY == INDEX_PACE_EVERY - 1 {
            if index_rests(
                shared.stopping.load(Ordering::Acquire),
                live_keys(shared),
                covered,
            ) {
                std::thread::sleep(since.elapsed());
            }
            since = Instant::now();
        }
        match v {
            Some(v) => store.state.insert(k.as_slice(), v.as_slice())?,
            None => store.state.remove(k.as_slice())?,
        };
        Ok(())
    };
    let half = covered / 2;
    keys.iter()
        .copied()
        .enumerate()
        .take(half)
        .try_for_each(&mut write)?;
    failpoint("index::mid_write")?;
    keys.iter()
        .copied()
        .enumerate()
        .skip(half)
        .try_for_each(&mut write)?;
    let mut batch = sled::Batch::default();
    batch.insert(state::APPLIED, &applied.to_be_bytes());
    batch.remove(state::INDEXING);
    store.state.apply_batch(batch)?;
    shared.counters.indexed(covered);
    failpoint("index::after_write")?;
    crate::store::release_garbage();
    let mut o = shared.overlay.lock().map_err(|_| Error::Poisoned)?;
    o.frozen = None;
    Ok(())
}

/// Keys in the live overlay (not those the indexer is writing).
fn live_keys(shared: &Shared) -> usize {
    shared.overlay.lock().map_or(0, |o| o.map.len())
}

/// Whether the indexer, writing `covered` keys, rests after its last
/// [`INDEX_PACE_EVERY`] inserts: not while the vault closes, and not once
/// as many keys wait in the live overlay (`live`), or it would fall
/// behind a load that outruns half a core and the overlay would grow
/// without bound.
fn index_rests(stopping: bool, live: usize, covered: usize) -> bool {
    !stopping && live < covered
}

/// Every failpoint of the commit path, in the order a commit reaches
/// them: the group's write (to the write-ahead file and sled), the
/// `fdatasync` of its write-ahead record (each before and after), the
/// checkpoint of a full write-ahead segment (before sled's sync), and the
/// indexer's write of derived state (before, halfway through its keys, and
/// after).
pub const FAILPOINTS: &[&str] = &[
    "commit::before_write",
    "commit::after_write",
    "commit::before_flush",
    "commit::after_flush",
    "checkpoint::before_sync",
    "apply::before_write",
    "index::before_write",
    "index::mid_write",
    "index::after_write",
];

/// A consent's or a policy's key in the derived state (`g/`, `p/`).
fn is_terms_key(key: &[u8]) -> bool {
    key.starts_with(b"g/") || key.starts_with(b"p/")
}

/// The least size at which the committer's record of minted tokens is
/// trimmed of what is published (`Committer::minted`).
const MINTED_TRIM: usize = 4096;

/// A failpoint of the commit path, evaluated only in builds with the
/// `failpoints` feature (tests): storage/tests/failpoints.rs makes it
/// panic (a crash at that step) or `return` an I/O error (`return(full)`:
/// the disk is full), which the step then reports like a real failure.
fn failpoint(name: &str) -> Result<()> {
    let _ = name;
    fail::fail_point!(name, |arg: Option<String>| {
        let e = match arg.as_deref() {
            Some("full") => std::io::Error::from(std::io::ErrorKind::StorageFull),
            _ => std::io::Error::other("injected I/O error"),
        };
        Err(Error::Io(e))
    });
    Ok(())
}

/// Writes derived state as soon as entries wait and its last write is
/// done; after an idle spell, the first entries wait up to 5 s (or until
/// `index_batch` of them do), so that a quiet vault writes rarely.
fn run_indexer(store: &Store, shared: &Shared) {
    loop {
        let mut stopping = shared.stopping.load(Ordering::Acquire);
        if let Ok(o) = shared.overlay.lock() {
            // Read under the lock, which `close` takes to wake us: set
            // before this point, or we are waiting when it wakes us.
            stopping = shared.stopping.load(Ordering::Acquire);
            if !stopping && o.waiting == 0 {
                let _ = shared
                    .overlay_full
                    .wait_timeout(o, std::time::Duration::from_secs(5));
            }
        }
        if let Err(e) = write_index(store, shared) {
            tracing::error!(error = %e, "writing derived state failed; the vault refuses writes until reopened");
            shared.poisoned.store(true, Ordering::Release);
            return;
        }
        if stopping {
            return;
        }
    }
}

/// `fdatasync`s each segment once. One at a time in the process (the
/// syncer's, a lone request's ([`Vault::lead`]), or the committer's of a
/// full segment before it closes it), and a failure poisons
/// the vault before the next one starts: an error that one `fdatasync`
/// reports is not reported again to the next, which must then not
/// acknowledge groups written after the failed one.
fn sync_segments(shared: &Shared, segments: &[&Arc<File>]) -> Result<()> {
    let result = sync_under_lock(shared, segments, true);
    if let Err(e) = &result {
        tracing::error!(error = %e, "sync failed; the vault refuses writes until reopened");
    }
    result
}

/// [`sync_segments`] without logging a failure, which the caller reports;
/// with the `commit::*_flush` failpoints when `failpoints` (not for the
/// `fdatasync` that closes a full segment).
fn sync_under_lock(shared: &Shared, segments: &[&Arc<File>], failpoints: bool) -> Result<()> {
    let _one = shared
        .wal_sync
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if shared.poisoned.load(Ordering::Acquire) {
        return Err(Error::Poisoned);
    }
    let point = |name| if failpoints { failpoint(name) } else { Ok(()) };
    let mut synced: Vec<&Arc<File>> = Vec::new();
    let started = Instant::now();
    let result = point("commit::before_flush")
        .and_then(|()| {
            for f in segments {
                if !synced.iter().any(|d| Arc::ptr_eq(d, f)) {
                    f.sync_data()?;
                    synced.push(f);
                }
            }
            Ok(())
        })
        .and_then(|()| point("commit::after_flush"));
    if result.is_ok() {
        shared.counters.synced(started.elapsed());
    } else {
        // Before the lock goes: the next `fdatasync` would not see this
        // one's error again.
        shared.poisoned.store(true, Ordering::Release);
    }
    result
}

/// Answers the groups that a sync covers, with their receipts and the
/// latest head published, or, when it failed, with `Poisoned`.
fn answer(shared: &Shared, synced: Result<()>, done: Vec<Synced>) {
    match synced {
        Ok(()) => {
            shared.counters.groups_answered(done.len());
            if let Some(h) = done.iter().rev().find_map(|s| s.head) {
                if let Ok(mut w) = shared.head.write() {
                    // A lone request's group and the syncer's next ones
                    // may be answered in either order.
                    if w.is_none_or(|old| old.last_seq < h.last_seq) {
                        *w = Some(h);
                    }
                }
            }
            for s in done {
                for (reply, r) in s.replies {
                    let _ = reply.send(r);
                }
            }
        }
        Err(_) => {
            for s in done {
                for (reply, _) in s.replies {
                    let _ = reply.send(Err(Error::Poisoned));
                }
            }
        }
    }
}

/// Checkpoints each full write-ahead segment: makes sled durable (every
/// group of the segment was applied to sled before the writer closed it),
/// then deletes the segment.
fn run_checkpointer(store: &Store, shared: &Shared, rx: std::sync::mpsc::Receiver<PathBuf>) {
    while let Ok(path) = rx.recv() {
        // A poisoned vault keeps its segments: a failed write or sync
        // elsewhere may have left sled, or the chunks file, without what
        // they hold, which the next open replays from them.
        let result = failpoint("checkpoint::before_sync")
            .and_then(|()| store.sync())
            .and_then(|()| {
                if shared.poisoned.load(Ordering::Acquire) {
                    Err(Error::Poisoned)
                } else {
                    std::fs::remove_file(&path).map_err(Error::from)
                }
            });
        if let Err(e) = result {
            tracing::error!(error = %e, "checkpoint failed; the vault refuses writes until reopened");
            shared.poisoned.store(true, Ordering::Release);
            return;
        }
    }
}

/// Takes everything the committer and the writer sent since the last
/// round, `fdatasync`s the segments written to (one `fdatasync` serves
/// every group written meanwhile), then answers the groups that are done.
/// A group's `Flush` (sent by the committer before it hands the group to
/// the writer) comes before its `Done`, so a group answered in a round was
/// synced in that round or an earlier one.
fn run_syncer(shared: &Shared, rx: std::sync::mpsc::Receiver<ToSyncer>) {
    while let Ok(first) = rx.recv() {
        let mut msgs = vec![first];
        while let Ok(more) = rx.try_recv() {
            msgs.push(more);
        }
        let segments: Vec<&Arc<File>> = msgs
            .iter()
            .filter_map(|m| match m {
                ToSyncer::Flush(f) => Some(f),
                ToSyncer::Done(_) => None,
            })
            .collect();
        let result = if shared.poisoned.load(Ordering::Acquire) {
            Err(Error::Poisoned)
        } else if segments.is_empty() {
            Ok(())
        } else {
            sync_segments(shared, &segments)
        };
        drop(segments);
        let done = msgs
            .into_iter()
            .filter_map(|m| match m {
                ToSyncer::Done(s) => Some(s),
                ToSyncer::Flush(_) => None,
            })
            .collect();
        answer(shared, result, done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API keys and tokens are their prefix and 64 lowercase hex digits,
    /// a new 256 bits each time.
    #[test]
    fn secrets_are_a_prefix_and_256_random_bits_in_hex() {
        for prefix in [API_KEY_PREFIX, TOKEN_PREFIX] {
            let a = random_secret(prefix);
            let b = random_secret(prefix);
            for s in [&a, &b] {
                let hex = s.strip_prefix(prefix).expect("the prefix");
                assert_eq!(hex.len(), 64, "{prefix}");
                assert!(hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
            }
            assert_ne!(*a, *b);
        }
    }

    #[test]
    fn the_indexer_rests_only_while_it_keeps_up_and_the_vault_runs() {
        // Keeping up: fewer keys wait than this write covers.
        assert!(index_rests(false, 0, 256));
        assert!(index_rests(false, 255, 256));
        // Falling behind: as many or more wait; full speed.
        assert!(!index_rests(false, 256, 256));
        assert!(!index_rests(false, 10_000, 256));
        // Closing: full speed whatever waits.
        assert!(!index_rests(true, 0, 256));
    }
}
