//! The one error type of the client crate.
//!
//! Variants are the decisions a caller makes: `Server` is a refusal the
//! server put into words (retry on `rate_limited` and `unavailable`, fix the
//! request on `invalid`, give up on `forbidden`); `Timeout` and `Closed`
//! mean the connection should be replaced; `BadReceipt` and `Rollback`
//! mean the vault cannot be trusted and must not be retried silently;
//! `Config` and `Tls` are local set-up errors that no retry will fix.
//!
//! `Io` and `Protocol` keep the underlying error as `source()` and do not
//! repeat it in their own message; print the chain (`{:#}` with anyhow, or
//! walk `source()`) to see both.

use protocol::receipt::ReceiptError;
use protocol::ErrorCode;

/// Errors of the client crate.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed: connection refused, reset, or a read or write error.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
    /// The TLS handshake or session failed (untrusted certificate, wrong
    /// name, a client certificate the server refused).
    #[error("TLS: {0}")]
    Tls(String),
    /// Bytes that do not decode or encode. A frame from the server that
    /// does not decode puts the stream out of step: the connection is
    /// closed. A blob inside a well-formed answer that does not decode (a
    /// receipt, a head, an endorsement) fails only its request, and a
    /// request too large to encode (`FrameTooLarge`) fails before it is
    /// sent; the connection stays open in both ([`Client::is_closed`]
    /// tells).
    ///
    /// [`Client::is_closed`]: crate::Client::is_closed
    #[error("protocol error")]
    Protocol(#[source] protocol::Error),
    /// The server answered with an `Error` frame.
    #[error("{code}: {message}")]
    Server {
        /// What the refusal means for the caller (see the module doc):
        /// `rate_limited` and `unavailable` are worth a retry later,
        /// `invalid` needs the request fixed, `forbidden` and
        /// `unauthenticated` will not change by retrying.
        code: ErrorCode,
        /// The server's explanation, for a person or a log; match on
        /// `code`, not on this.
        message: String,
    },
    /// The server's first answer is in another protocol: HTTP (the shim's
    /// port, or another service) or TLS (a plaintext connection to a TLS
    /// port). Says which, and what to change.
    #[error("{0}")]
    WrongProtocol(&'static str),
    /// A well-formed answer of the wrong kind; names what was expected.
    #[error("unexpected response: expected {0}")]
    UnexpectedResponse(&'static str),
    /// No answer within [`ClientConfig::timeout`](crate::ClientConfig::timeout),
    /// or the connection was closed because an earlier request timed out
    /// with nothing heard from the server since it was sent.
    #[error("timed out")]
    Timeout,
    /// The connection closed (by the server, after an error, or after a
    /// redemption) while the request was in flight: it may have been
    /// done (a record appended, a token burnt). Connect again, and find
    /// out (a receipt, the log) before sending it again.
    #[error("connection closed")]
    Closed,
    /// The connection was already closed when the request was made (by
    /// the server, after an error, a redemption or a stall): the request
    /// was not sent, so sending it again on a new connection is safe.
    #[error("connection closed before the request was sent")]
    NotSent,
    /// A receipt or signed head does not verify with the vault's public key.
    #[error("receipt does not verify")]
    BadReceipt(#[from] ReceiptError),
    /// The endorsements the server sent do not lead from the pinned key to
    /// the signing key they claim: a forged or broken key chain.
    #[error("the key chain does not verify from the pinned key: {0}")]
    BadKeyChain(protocol::receipt::ChainError),
    /// The server presented a head at `got` that does not extend the head
    /// already seen at `kept`: lower, or the same seq with another hash.
    /// The vault was rolled back to an older copy, or forked.
    #[error(
        "the vault presented a signed head at seq {got} that does not extend the head \
         already seen at seq {kept}: rolled back or forked"
    )]
    Rollback {
        /// `last_seq` of the head already seen (the tracker's newest).
        kept: u64,
        /// `last_seq` of the head presented: lower than `kept`, or equal
        /// with another hash; with
        /// [`Client::observe_head`](crate::Client::observe_head), also
        /// higher, when the vault's entry at `kept` is not the one seen
        /// there or its key chain no longer verifies the kept head.
        got: u64,
    },
    /// The configuration is not usable (empty key, unreadable PEM file, ...).
    #[error("configuration: {0}")]
    Config(String),
}

impl From<protocol::receipt::ChainError> for ClientError {
    fn from(e: protocol::receipt::ChainError) -> Self {
        ClientError::BadKeyChain(e)
    }
}

impl ClientError {
    /// The server's error code, for an `Error` frame.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    /// rustls reports handshake and alert failures through the I/O error of
    /// the stream; those become [`ClientError::Tls`], the rest `Io`.
    fn from(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            // A TLS client's first read of a server that answers in
            // plaintext (a `vaultd --insecure-plaintext`, or another
            // service): say so rather than leave rustls's words alone.
            Some(
                tls @ rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            ) => ClientError::Tls(format!(
                "{tls} (the server does not answer in TLS: does it serve plaintext, \
                 `--insecure-plaintext`?)"
            )),
            Some(tls) => ClientError::Tls(tls.to_string()),
            None => ClientError::Io(e),
        }
    }
}

impl From<protocol::Error> for ClientError {
    /// The codec's transport errors are I/O (or TLS) errors, not protocol
    /// violations.
    fn from(e: protocol::Error) -> Self {
        match e {
            protocol::Error::Io(io) => io.into(),
            other => ClientError::Protocol(other),
        }
    }
}

/// Result alias of the client crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// rustls's words for a server that answers a TLS client in plaintext
    /// get a hint of what is wrong; other TLS failures keep theirs.
    #[test]
    fn a_plaintext_answer_to_tls_is_named() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let plaintext = io(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        match ClientError::from(plaintext) {
            ClientError::Tls(m) => assert!(m.contains("does not answer in TLS"), "{m}"),
            other => panic!("{other:?}"),
        }
        let other = io(rustls::Error::DecryptError);
        match ClientError::from(other) {
            ClientError::Tls(m) => assert!(!m.contains("plaintext"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
