//! The one error type of the storage crate.
//!
//! Variants are the decisions a caller makes: a wrong secret is the
//! operator's mistake, an integrity failure means the data dir cannot be
//! trusted (and names the first bad seq), an I/O or sled error is the
//! machine's, and a closed or poisoned vault must be reopened.

use std::fmt;

/// Why an integrity check failed. Stable names (see [`Reason::code`]) are
/// printed by `vault-verify` and matched by tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The stored chunk's CRC32 does not match its bytes: storage corruption.
    CrcMismatch,
    /// The chunk or entry does not decode (bad magic, lengths, version).
    Malformed(String),
    /// `entry.prev_hash` is not the hash of the entry before it.
    BadLink,
    /// A signed head's signature does not verify under the pinned key.
    BadSignature,
    /// A signed head does not match the entries it claims to cover.
    HeadMismatch,
    /// A sequence number is missing.
    Gap,
    /// A sequence number appears before one that is lower or equal.
    Reordered,
    /// A sequence number appears twice.
    Duplicate,
    /// The log ends with entries that no signed head covers.
    UnsignedTail,
    /// The first entry is not a well-formed genesis entry.
    BadGenesis(String),
    /// Derived state (indexes) does not match a rebuild from the log.
    IndexMismatch(String),
    /// The key store does not match what the log committed to.
    KeyMismatch(String),
    /// Vault metadata does not match what the genesis entry committed to.
    MetaMismatch(String),
    /// The log is shorter than the derived state says it was, or (remote
    /// verification) than the signed head the server presented.
    Truncated,
    /// Remote verification: a receipt the server sent for an entry does
    /// not prove the entry it served at that seq.
    BadReceipt(String),
    /// The log ends before the seq of a head kept from an earlier
    /// verification: it was rolled back (or truncated) since.
    RolledBack,
    /// A head kept from an earlier verification is not one of this log:
    /// another entry at its seq, or a signature no key of the log's chain
    /// made.
    Forked(String),
}

impl Reason {
    /// A stable machine-readable name for the reason.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::CrcMismatch => "crc_mismatch",
            Reason::Malformed(_) => "malformed",
            Reason::BadLink => "bad_link",
            Reason::BadSignature => "bad_signature",
            Reason::HeadMismatch => "head_mismatch",
            Reason::Gap => "gap",
            Reason::Reordered => "reordered",
            Reason::Duplicate => "duplicate",
            Reason::UnsignedTail => "unsigned_tail",
            Reason::BadGenesis(_) => "bad_genesis",
            Reason::IndexMismatch(_) => "index_mismatch",
            Reason::KeyMismatch(_) => "key_mismatch",
            Reason::MetaMismatch(_) => "meta_mismatch",
            Reason::Truncated => "truncated",
            Reason::BadReceipt(_) => "bad_receipt",
            Reason::RolledBack => "rolled_back",
            Reason::Forked(_) => "forked",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Malformed(s)
            | Reason::BadGenesis(s)
            | Reason::IndexMismatch(s)
            | Reason::KeyMismatch(s)
            | Reason::MetaMismatch(s)
            | Reason::BadReceipt(s)
            | Reason::Forked(s) => write!(f, "{}: {s}", self.code()),
            other => f.write_str(other.code()),
        }
    }
}

/// Errors of the storage crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log (or the data dir around it) failed an integrity check at `seq`.
    #[error("integrity failure at seq {seq}: {reason}")]
    Integrity { seq: u64, reason: Reason },
    /// The passphrase or key file does not open the sealed master key.
    #[error("wrong passphrase or key file: the master key does not unseal")]
    WrongSecret,
    /// Argon2 parameters below the documented floor.
    #[error("key derivation parameters below the floor: {0}")]
    WeakKdf(String),
    /// There is no vault in the directory.
    #[error("no vault at {0} (`vaultd init --data-dir DIR` creates one)")]
    NotFound(String),
    /// The data dir was written in another format than this build's;
    /// refused before anything is written to it.
    #[error("the data dir is of format {found}; this build reads format {supported} only")]
    UnsupportedFormat { found: u32, supported: u32 },
    /// The creation of the vault in this dir did not finish (a crash, a
    /// full disk): it was never handed to anyone, and is not opened;
    /// creating it again starts over ([`crate::Vault::create`]).
    #[error(
        "the creation of the vault at {0} did not finish, so no admin key of it was shown and \
         nothing was stored in it: create it again (`vaultd init` starts over)"
    )]
    Unfinished(String),
    /// `create` was given a dir that is not for a new vault (a dir of
    /// other things, or another vault's leftovers), refused before
    /// anything was made or changed in it.
    #[error("{0}")]
    DirRefused(String),
    /// `create` was asked to overwrite an existing vault.
    #[error("a vault already exists at {0}")]
    AlreadyExists(String),
    /// A token redemption was refused (and the refusal is in the log).
    #[error("token refused: {}", .0.code())]
    TokenRefused(TokenRefusal),
    /// The credential a redemption was made with was revoked before it,
    /// in log order: nothing was written, the token is not spent.
    #[error("credential {0} was revoked")]
    CredentialRevoked(String),
    /// The subject's data key was destroyed by a shred entry.
    #[error("subject {0} has been shredded")]
    SubjectShredded(String),
    /// The subject has no data key: it never had a record.
    #[error("no subject {0} in the vault")]
    NoSuchSubject(String),
    /// A caller-supplied value is out of range (too large, bad subject id, …).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A well-formed request that conflicts with what the vault holds: a
    /// credential for a key or client certificate that an active
    /// credential already holds.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A stored value does not decode (used outside full verification).
    #[error("malformed data: {0}")]
    Malformed(&'static str),
    /// A ciphertext does not decrypt under the key that should open it.
    #[error("decryption failed at seq {0}")]
    Decrypt(u64),
    /// The vault stopped accepting writes after a durability failure; reopen it.
    #[error(
        "vault is poisoned after a failed commit: it takes no more writes until it is opened \
         again; every acknowledged write is durable, and the next open replays the write-ahead \
         file (then vault-verify the data dir)"
    )]
    Poisoned,
    /// The vault is shutting down.
    #[error("vault is closed")]
    Closed,
    /// The data dir is locked by another process.
    #[error(
        "data dir is in use by another process: stop the vaultd that serves it first, \
         or ask that vault over the network (vault-verify --remote, vault-admin without --data-dir)"
    )]
    Locked,
    // The I/O and sled errors are in the message, and so not also a
    // `source()`: an error chain (`vaultd`'s `error: …`) prints each once.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("sled error: {0}")]
    Sled(sled::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            // sled reports a held lock as a plain I/O error with this text.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                Error::Locked
            }
            sled::Error::Io(io) => Error::Io(io),
            other => Error::Sled(other),
        }
    }
}

impl From<protocol::Error> for Error {
    /// The storage formats share the protocol crate's bounds-checked
    /// reader; its errors are malformed stored bytes here.
    fn from(e: protocol::Error) -> Self {
        match e {
            protocol::Error::Malformed(m) => Error::Malformed(m),
            protocol::Error::TrailingBytes => Error::Malformed("trailing bytes"),
            _ => Error::Malformed("malformed"),
        }
    }
}

impl Error {
    pub(crate) fn integrity(seq: u64, reason: Reason) -> Self {
        Error::Integrity { seq, reason }
    }
}

/// Why a token redemption was refused. Each is written to the log as an
/// `access_denied` entry before the caller hears of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with this hash was minted.
    Unknown,
    /// The token's expiry has passed.
    Expired,
    /// The token was already redeemed.
    Spent,
    /// The token was minted for another partner.
    WrongPartner,
    /// The token's subject has been shredded.
    SubjectShredded,
    /// The subject's consent for the token's partner was revoked, or no
    /// longer names the token's purpose.
    ConsentRevoked,
    /// The subject's consent for the token's partner has lapsed.
    ConsentExpired,
    /// The partner's policy no longer allows the token: the partner is
    /// inactive, or the token's purpose, or one of its fields with its
    /// masking, is no longer in the policy.
    PolicyChanged,
    /// The partner's policy does not allow redemptions at this hour
    /// (`allowed_hours_utc`).
    OutsideAllowedHours,
    /// The partner's policy does not allow redemptions from this address
    /// (`source_ips`).
    SourceNotAllowed,
}

impl TokenRefusal {
    /// Every refusal.
    pub const ALL: [TokenRefusal; 10] = [
        TokenRefusal::Unknown,
        TokenRefusal::Expired,
        TokenRefusal::Spent,
        TokenRefusal::WrongPartner,
        TokenRefusal::SubjectShredded,
        TokenRefusal::ConsentRevoked,
        TokenRefusal::ConsentExpired,
        TokenRefusal::PolicyChanged,
        TokenRefusal::OutsideAllowedHours,
        TokenRefusal::SourceNotAllowed,
    ];

    /// Stable name, the same as the wire error code.
    pub fn code(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "token_unknown",
            TokenRefusal::Expired => "token_expired",
            TokenRefusal::Spent => "token_spent",
            TokenRefusal::WrongPartner => "wrong_partner",
            TokenRefusal::SubjectShredded => "subject_shredded",
            TokenRefusal::ConsentRevoked => "consent_revoked",
            TokenRefusal::ConsentExpired => "consent_expired",
            TokenRefusal::PolicyChanged => "policy_changed",
            TokenRefusal::OutsideAllowedHours => "outside_allowed_hours",
            TokenRefusal::SourceNotAllowed => "source_not_allowed",
        }
    }

    /// Words for the partner: what to do differently, and nothing about
    /// the subject or the token's terms beyond what the code says.
    pub fn message(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "no such token",
            TokenRefusal::Expired => "the token has expired; authorize again",
            TokenRefusal::Spent => "the token was already redeemed",
            TokenRefusal::WrongPartner => "the token was granted to another partner",
            TokenRefusal::SubjectShredded => "the subject's data was destroyed",
            TokenRefusal::ConsentRevoked => {
                "the subject's consent no longer covers this token's purpose"
            }
            TokenRefusal::ConsentExpired => "the subject's consent has expired",
            TokenRefusal::PolicyChanged => {
                "the partner's policy no longer allows this token; authorize again"
            }
            TokenRefusal::OutsideAllowedHours => {
                "the partner's policy does not allow redemptions at this hour"
            }
            TokenRefusal::SourceNotAllowed => {
                "the partner's policy does not allow redemptions from this address"
            }
        }
    }
}

/// Result alias of the storage crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
