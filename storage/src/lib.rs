//! The storage engine of fintrust-vault: an append-only log on sled in
//! which every entry is encrypted (records), BLAKE3 hash-chained to the one
//! before, covered by an ed25519-signed head, and CRC32-checked.
//!
//! Modules, in the order data flows through them:
//!
//! - [`entry`]: an entry's canonical encoding and hash (`entry_hash`).
//! - [`crypto`]: master key sealing (argon2id or key file), subject data
//!   keys, AES-256-GCM-SIV with context bound as associated data.
//! - [`chunk`]: how a commit group is stored (chunks with a CRC32), the
//!   signed head over the group's Merkle root, and receipts.
//! - [`store`]: the sled trees and durable flushing (flush + fdatasync).
//! - [`logfile`]: the log's chunks in an append-only file, found through
//!   a sled tree of pointers.
//! - [`wal`]: the write-ahead file that makes a commit group durable with
//!   one `fdatasync`, and its replay into sled at open.
//! - [`state`]: derived state, a pure function of each entry.
//! - [`stats`]: counts of the commit pipeline (groups, `fdatasync`s and
//!   their durations, index writes) for metrics and benchmarks.
//! - [`vault`]: create/open, the group committer, reads; crypto-shredding
//!   and subject key rotation (docs/keys.md).
//! - `overlay`: the derived-state mutations not yet in the state tree,
//!   which every read consults first, in shards.
//! - [`verify`](mod@verify): checks a data dir with nothing but a public key; its
//!   [`verify::StreamCheck`] checks a log read as a stream (remote, files).
//! - [`verified`]: the record of the prefix an open verified, tagged under
//!   the master key, so that the next open checks only the signatures
//!   after it.
//! - [`export`]: export files, the whole log in one signed, portable file,
//!   and their verification with nothing but the public key.
//! - [`reindex`]: rebuilds derived state from the log and compares it
//!   with the stored state (and, offline, repairs it).
//! - [`fuzzing`]: the entry and chunk decoders on arbitrary bytes, shared
//!   by the fuzz targets in `fuzz/` and the proptests.
//!
//! Invariants: entries are never rewritten; seqs are contiguous from 0;
//! `entry[n].prev_hash == hash(entry[n-1])`; every entry is covered by
//! exactly one signed head (the one closing its commit group); an append is
//! acknowledged only once durable; derived state and the key store are
//! functions of the log and are checked against it by `verify`.
//!
//! ```no_run
//! # async fn demo() -> storage::Result<()> {
//! use storage::{Append, Options, Unlock, Vault};
//! let unlock = Unlock::passphrase(b"correct horse battery staple".to_vec());
//! let created = Vault::create("vault-data".as_ref(), &unlock, Options::default())?;
//! let receipt = created.vault.append(Append::record("cust-1", br#"{"name":"Ada"}"#.to_vec())).await?;
//! receipt.verify(&created.vault.public_key()).expect("a receipt checks out");
//! # Ok(()) }
//! ```

pub mod chunk;
pub mod crypto;
pub mod entry;
pub mod error;
pub mod export;
pub mod fuzzing;
pub mod logfile;
mod overlay;
pub mod reindex;
pub mod state;
pub mod stats;
pub mod store;
pub mod vault;
pub mod verified;
pub mod verify;
pub mod wal;

pub use chunk::{KeyChain, KeyEndorsement, Receipt, ReceiptError, SignedHead};
pub use crypto::{KdfParams, Unlock};
pub use entry::{Hash, Kind};
pub use error::{Error, Reason, Result, TokenRefusal};
pub use stats::PipelineStats;
pub use store::{forget_cached_pages, RawStore};
pub use vault::{
    api_key_hash, certificate_key_hash, generate_api_key, Admin, Append, Created, Credential,
    CredentialInfo, KeyLife, KeyStatus, KeyUse, Options, Record, Rotated, StoredEntry,
    SubjectKeyStatus, Vault, DEFAULT_CACHE_BYTES, MAX_ENCRYPTIONS_PER_KEY,
};
pub use verify::{verify, verify_read_only, Report, VerifiedPrefix, VerifyOptions};
