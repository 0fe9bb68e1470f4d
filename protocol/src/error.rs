//! The one error type of the protocol crate.
//!
//! Variants are the decisions a caller makes. A frame error (`FrameTooLarge`,
//! `BadMagic`, `UnsupportedVersion`, `UnknownType`, `BadFlags`,
//! `CrcMismatch`) means the byte stream can no longer be trusted to be in
//! step, so the connection is answered with an `Error` frame and closed. A
//! payload error (`Malformed`, `TrailingBytes`) arrives inside a frame that
//! checked out, so the request id is known. `Io` is the socket's, and only
//! the codec produces it. [`Error::wire_code`] maps each variant to the
//! [`ErrorCode`] a server sends back.

use crate::message::ErrorCode;

/// Errors of the protocol crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A payload length over the maximum: rejected from the header alone,
    /// before the payload is read or any memory is reserved for it.
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The payload length, in bytes: the one the header claims, or the
        /// one a message to send would take.
        len: usize,
        /// The maximum payload length in force, in bytes.
        max: usize,
    },
    /// The first two bytes are not `FV`: not this protocol at all.
    #[error("bad magic: not a fintrust-vault frame")]
    BadMagic,
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A message type byte with no meaning in this version.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// A reserved flag bit is set.
    #[error("reserved frame flags are set")]
    BadFlags,
    /// The CRC32 over header and payload does not match.
    #[error("frame CRC32 mismatch")]
    CrcMismatch,
    /// The payload does not decode (truncated, bad UTF-8, unknown enum
    /// value), or a message is too big for its length prefixes to encode.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The payload decoded as a whole message with bytes left over.
    #[error("trailing bytes after message")]
    TrailingBytes,
    /// The transport failed (codec only). The I/O error is in the message,
    /// and so not also a `source()`: a chain prints it once.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

impl Error {
    /// The code a server answers this error with, or `None` for `Io` (the
    /// connection is gone; there is no one to answer).
    pub fn wire_code(&self) -> Option<ErrorCode> {
        match self {
            Error::FrameTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            Error::UnsupportedVersion(_) => Some(ErrorCode::UnsupportedVersion),
            Error::BadMagic
            | Error::UnknownType(_)
            | Error::BadFlags
            | Error::CrcMismatch
            | Error::Malformed(_)
            | Error::TrailingBytes => Some(ErrorCode::Malformed),
            Error::Io(_) => None,
        }
    }
}

/// Result alias of the protocol crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
