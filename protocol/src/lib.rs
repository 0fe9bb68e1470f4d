//! The binary wire protocol of fintrust-vault, spoken on TCP port 9999
//! inside TLS. Services append records; a gateway mints one-time tokens;
//! partners redeem a token for exactly one masked data segment; auditors
//! read the signed head and entries.
//!
//! This crate does no I/O and knows nothing of storage or the server: it
//! turns bytes into typed messages and back, and checks receipts. Modules, in the order data
//! flows through them:
//!
//! - [`frame`]: the 18-byte header (magic, version, type, flags, request
//!   id, length, CRC32) and [`frame::decode`], which answers "not enough
//!   bytes yet" with `Ok(None)` and refuses an oversized length from the
//!   header alone.
//! - [`message`]: [`Message`], every request and response, to and from
//!   payload bytes; [`ErrorCode`]; [`encode_frame`].
//! - [`codec`]: tokio-util `Decoder`/`Encoder`s over the two above, for
//!   `Framed` on a TLS stream.
//! - [`error`]: the one [`Error`] type, and the [`ErrorCode`] a server
//!   answers each with.
//! - [`mask`]: the masking operators a `Mint` request names.
//! - [`receipt`]: signed heads, Merkle trees and receipts, which clients
//!   verify with the vault's public key.
//! - [`hashing`]: BLAKE3 of many short inputs side by side, for the
//!   Merkle trees here and the log's entry hashes.
//! - [`fuzzing`]: the decoders above on arbitrary bytes, with the
//!   properties that must hold; shared by the fuzz targets in `fuzz/` and
//!   the proptests.
//!
//! The format, byte by byte, with a golden vector per message and the
//! rules of a connection, is in `docs/protocol.md`.
//!
//! Invariants: decoding never panics and never allocates more than the
//! input holds; a decoded message consumed its whole payload; every golden
//! vector in the tests is also in the docs.
//!
//! ```
//! use protocol::{encode_frame, frame, Message};
//!
//! let bytes = encode_frame(7, &Message::Redeem { token: "tok".into() }, 0)?;
//! assert!(frame::decode(&bytes[..10])?.is_none()); // not all here yet
//! let (frame, used) = frame::decode(&bytes)?.expect("a whole frame");
//! assert_eq!((frame.request_id, used), (7, bytes.len()));
//! assert_eq!(Message::from_frame(&frame)?, Message::Redeem { token: "tok".into() });
//! # Ok::<(), protocol::Error>(())
//! ```

#![warn(missing_docs)]

pub mod codec;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod hashing;
pub mod mask;
pub mod message;
pub mod receipt;
pub mod wire;

pub use codec::{Envelope, FrameCodec, MessageCodec};
pub use error::{Error, Result};
pub use frame::{Frame, MessageType, FLAG_LAST, HEADER_LEN, MAX_FRAME_LEN};
pub use mask::MaskOp;
pub use message::{
    encode_frame, ContextReply, CredentialInfo, ErrorCode, KeyLife, Message, Record, SecretKind,
    SubjectKey, MAX_REINDEX_SAMPLE,
};

/// The TCP port the vault listens on.
pub const DEFAULT_PORT: u16 = 9999;
