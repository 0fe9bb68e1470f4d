//! The client of fintrust-vault: a thin async library that services embed
//! to append records and get receipts, auditors use to read the signed head,
//! entries and proofs, gateways use to mint tokens and partners to redeem
//! them. It speaks the wire protocol of [`protocol`] (`docs/protocol.md`)
//! over TCP, inside TLS, and depends on nothing of the server or storage.
//!
//! Modules, in the order a request flows through them:
//!
//! - [`config`]: [`ClientConfig`] and [`Tls`]: address, CA-pinned TLS with
//!   an optional client certificate (or explicit plaintext for loopback
//!   development), API key, timeout. Validated before any I/O.
//! - [`connection`]: [`Connector`] and [`Client`]: connect (one TLS
//!   configuration and session cache per connector), `Hello`, then requests numbered
//!   and pipelined on one connection. A writer task sends frames; a reader
//!   task routes each answer by request id to the caller waiting for it,
//!   so many tasks can share one `Client` and answers may come in any
//!   order. Every call honours the timeout. A partner's redemption needs
//!   no tasks: [`Connector::redeem`] sends `Hello` and `Redeem` in one
//!   write on a connection of its own and reads the two answers.
//! - [`sessions`]: the TLS session cache a connector shares, which keeps
//!   enough TLS 1.3 tickets for many connections opening at once to
//!   resume.
//! - [`verify`]: what the client checks without trusting the server:
//!   [`verify_receipt`] against the vault's public key, and
//!   [`HeadTracker`], which notices a vault rolled back to an older copy
//!   or forked.
//! - [`error`]: the one [`ClientError`], whose variants are the decisions
//!   a caller makes (retry, reconnect, fix the request, stop trusting).
//!
//! The `vault-client` binary (`src/bin/vault-client.rs`) for partners and
//! services, and `vault-admin` (in the server crate, which it needs for
//! its offline `--data-dir` mode) for operators, are these calls plus
//! argument parsing and printing; `cli` holds the connection flags they
//! share with `vault-verify --remote`. Those two, and the dependencies
//! they bring (clap, anyhow, serde_json, hex), are the `cli` feature, on
//! by default: a service that embeds the library turns it off
//! (`default-features = false`) and depends on the protocol crate, TLS and
//! tokio alone.
//!
//! ```no_run
//! use client::{Client, ClientConfig, HeadTracker, Tls, Zeroizing};
//!
//! # async fn demo() -> client::Result<()> {
//! let config = ClientConfig {
//!     addr: "127.0.0.1:9999".into(),
//!     tls: Tls::Plaintext, // loopback development only
//!     api_key: Zeroizing::new("fvk_...".to_string()),
//!     ..ClientConfig::default()
//! };
//! let client = Client::connect(config).await?;
//! let receipt = client
//!     .append("cust-42", vec![("name".into(), "Ada".into())])
//!     .await?;
//! let head = client.head().await?; // admin and auditor roles
//! // Pin this key out of band instead: the server being checked sent it.
//! client.verify_receipt(&receipt, &head.public_key).await?;
//! let mut tracker = HeadTracker::new();
//! tracker.observe(&receipt.head)?;
//! if let Some(h) = &head.signed_head {
//!     tracker.observe(h)?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod connection;
pub mod error;
pub mod secret;
pub mod sessions;
pub mod verify;

pub use config::{ClientConfig, Tls, DEFAULT_TIMEOUT, LONG_REQUEST_TIMEOUT, MAX_TIMEOUT};
pub use connection::{
    AuthorizeContext, Client, Connector, Exchange, Exchanged, HeadInfo, Health, Identity,
    KeyStatus, Redeemed, Redemption, ReindexReport, Rotated, SigningRotated, StateValue, TlsLink,
    MAX_LISTED,
};
pub use error::{ClientError, Result};
pub use secret::Secret;
pub use verify::{verify_receipt, HeadTracker};

pub use protocol::receipt::{
    ChainError, KeyChain, KeyEndorsement, Receipt, ReceiptError, SignedHead,
};
pub use protocol::{CredentialInfo, ErrorCode, KeyLife, MaskOp, Record, SecretKind, SubjectKey};
/// The wrapper of [`ClientConfig::api_key`], re-exported so that callers
/// need not depend on `zeroize`.
pub use zeroize::Zeroizing;
