//! Frames: the fixed header, the payload it delimits, and its CRC32.
//!
//! Every message travels in one frame. All integers are big-endian.
//!
//! ```text
//! offset size  field
//!      0    2  magic        0x46 0x56 ("FV")
//!      2    1  version      1
//!      3    1  type         message type (see MessageType)
//!      4    2  flags        bit 0 = LAST (final EntryBatch of a stream); bits 1..15 must be 0
//!      6    4  request_id   chosen by the client, echoed in every response frame
//!     10    4  payload_len  0..=max_frame_len (default MAX_FRAME_LEN = 1 MiB)
//!     14    4  crc32        CRC-32/IEEE over bytes 0..14, then the payload
//!     18    n  payload      the message (see `message`)
//! ```
//!
//! Worked example, `Ping` with request id 1 (no payload):
//!
//! ```text
//! 4656 01 02 0000 00000001 00000000 3f06f132
//! ```
//!
//! Decoding checks each header field as soon as its bytes are in: a stream
//! that is not this protocol (an HTTP request, a TLS handshake sent to a
//! plaintext listener) fails at its first wrong byte, and a length over the maximum
//! fails once 14 bytes are in — before the payload is awaited or any memory
//! is set aside for it. The CRC covers the header too, but it can only be
//! checked once the whole frame is in; a corrupted length is therefore
//! caught by the maximum, or by the CRC when the frame completes.
//!
//! The first three bytes (magic, version) keep their place in every future
//! version, so a peer can always tell which version it was sent.

use bytes::BufMut;
use std::fmt;

use crate::error::{Error, Result};

/// The first two bytes of every frame: "FV".
pub const MAGIC: [u8; 2] = *b"FV";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 18;
/// Default largest payload, in bytes (1 MiB). Large enough for an
/// `EntryBatch` of many maximal entries (storage caps an entry payload at
/// 48 KiB); small enough that a connection costs a bounded buffer.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Flag bit 0: this is the last frame of a stream (an `Entries` response).
pub const FLAG_LAST: u16 = 0x0001;
/// Flags that must be zero in this version.
const RESERVED_FLAGS: u16 = !FLAG_LAST;
/// The header bytes covered by the CRC (all but the CRC itself).
const CRC_COVERED: usize = 14;

/// The type byte of a frame. Requests are below 0x80, responses at or
/// above. The discriminant is the wire byte: never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageType {
    /// Request (any credential): the first frame of every connection,
    /// presenting an API key; answered by `HelloOk`, or by `Error
    /// unauthenticated` and the connection closed. Carries a secret.
    Hello = 0x01,
    /// Request (any role): is the server there; answered by `Pong`.
    Ping = 0x02,
    /// Request (writer, admin): append one record; answered by `Receipt` once
    /// durable.
    Append = 0x03,
    /// Request (writer, admin): append several records in one commit, all or
    /// none; answered by `Receipts` once durable.
    AppendBatch = 0x04,
    /// Request (gateway, admin): a one-time token for a partner; answered by
    /// `Minted`.
    Mint = 0x05,
    /// Request (partner): spend a token; answered by `Data` or `Error`, after
    /// which the server closes the connection. Carries a secret.
    Redeem = 0x06,
    /// Request (auditor, admin): the latest durable signed head; answered by
    /// `HeadInfo`.
    Head = 0x07,
    /// Request (auditor, admin): encoded entries from a seq on; answered by a
    /// stream of `EntryBatch` frames, the last flagged [`FLAG_LAST`].
    Entries = 0x08,
    /// Request (auditor, admin): the receipt of one entry; answered by
    /// `ProofInfo`.
    Proof = 0x09,
    /// Request (any role): the vault's state and durable head; answered by
    /// `HealthInfo`.
    Health = 0x0A,
    /// Request: append a consent (writer, gateway, admin), policy or
    /// `access_denied` entry (gateway, admin); answered by `Receipt` once
    /// durable.
    Event = 0x0B,
    /// Request (gateway, admin): who holds an API key, by its BLAKE3 hash;
    /// answered by `Identity`.
    Whois = 0x0C,
    /// Request (gateway, admin, auditor): a partner's current policy; answered
    /// by `StateValue`.
    GetPolicy = 0x0D,
    /// Request (writer, gateway, admin, auditor): a subject's current consent
    /// for a partner; answered by `StateValue`.
    GetConsent = 0x0E,
    /// Request (admin): a new credential with an API key; answered by
    /// `CredentialKey`.
    CreateCredential = 0x0F,
    /// Request (admin): revoke a credential; answered by `Receipt`.
    RevokeCredential = 0x10,
    /// Request (admin): crypto-shred a subject; answered by `Receipt`.
    Shred = 0x11,
    /// Request (admin): a new data key version for a subject; answered by
    /// `Rotated`.
    RotateSubjectKey = 0x12,
    /// Request (admin): a page of the vault's key status; answered by
    /// `KeyStatusInfo`.
    KeyStatus = 0x13,
    /// Request (admin): a new signing key; answered by `SigningRotated`.
    RotateSigningKey = 0x14,
    /// Request (any role): the endorsements of signing keys 1..; answered by
    /// `KeyChainInfo`.
    KeyChain = 0x15,
    /// Request (admin, over TLS or from a loopback address): re-wrap every key
    /// under a new master key; answered by `Receipt`. Carries a secret.
    RotateMasterKey = 0x16,
    /// Request (admin): a page of the vault's credentials; answered by
    /// `CredentialList`.
    ListCredentials = 0x17,
    /// Request (admin): compare the stored derived state with the log's;
    /// answered by `ReindexReport`.
    Reindex = 0x18,
    /// Request (gateway, admin): a caller's credential, and the policy and
    /// consent that apply to it, in one round trip; answered by `ContextInfo`.
    Context = 0x19,
    /// Request (auditor, admin): the signed heads of the commit groups from a
    /// seq on; answered by `HeadList`.
    Heads = 0x1A,
    /// Request (admin): a new credential held by a client certificate; answered
    /// by `Identity`.
    CreateCertCredential = 0x1B,
    /// Response to `Hello`: authenticated, with the credential's role.
    HelloOk = 0x81,
    /// Response to `Ping`.
    Pong = 0x82,
    /// Response to `Append`, `Event`, `RevokeCredential`, `Shred` and
    /// `RotateMasterKey`: one receipt.
    Receipt = 0x83,
    /// Response to `AppendBatch`: a receipt per record.
    Receipts = 0x84,
    /// Response to `Mint`: the token and when it expires. Carries a secret.
    Minted = 0x85,
    /// Response to `Redeem`: the masked fields, personal data.
    Data = 0x86,
    /// Response to `Head`.
    HeadInfo = 0x87,
    /// Response to `Entries`: one frame of its stream.
    EntryBatch = 0x88,
    /// Response to `Proof`.
    ProofInfo = 0x89,
    /// Response to `Health`.
    HealthInfo = 0x8A,
    /// Response to `Whois` and `CreateCertCredential`: a credential.
    Identity = 0x8B,
    /// Response to `GetPolicy` and `GetConsent`: a derived-state value.
    StateValue = 0x8C,
    /// Response to `CreateCredential`: the new API key, shown once. Carries a
    /// secret.
    CredentialKey = 0x8D,
    /// Response to `RotateSubjectKey`.
    Rotated = 0x8E,
    /// Response to `KeyStatus`.
    KeyStatusInfo = 0x8F,
    /// Response to `RotateSigningKey`.
    SigningRotated = 0x90,
    /// Response to `KeyChain`.
    KeyChainInfo = 0x91,
    /// Response to `ListCredentials`.
    CredentialList = 0x92,
    /// Response to `Reindex`.
    ReindexReport = 0x93,
    /// Response to `Context`.
    ContextInfo = 0x94,
    /// Response to `Heads`.
    HeadList = 0x95,
    /// Response to any request that failed, with an error code; under request
    /// id 0 when the server cannot tie it to a request.
    Error = 0xFF,
}

impl MessageType {
    /// Every type, in byte order.
    pub const ALL: [MessageType; 49] = [
        MessageType::Hello,
        MessageType::Ping,
        MessageType::Append,
        MessageType::AppendBatch,
        MessageType::Mint,
        MessageType::Redeem,
        MessageType::Head,
        MessageType::Entries,
        MessageType::Proof,
        MessageType::Health,
        MessageType::Event,
        MessageType::Whois,
        MessageType::GetPolicy,
        MessageType::GetConsent,
        MessageType::CreateCredential,
        MessageType::RevokeCredential,
        MessageType::Shred,
        MessageType::RotateSubjectKey,
        MessageType::KeyStatus,
        MessageType::RotateSigningKey,
        MessageType::KeyChain,
        MessageType::RotateMasterKey,
        MessageType::ListCredentials,
        MessageType::Reindex,
        MessageType::Context,
        MessageType::Heads,
        MessageType::CreateCertCredential,
        MessageType::HelloOk,
        MessageType::Pong,
        MessageType::Receipt,
        MessageType::Receipts,
        MessageType::Minted,
        MessageType::Data,
        MessageType::HeadInfo,
        MessageType::EntryBatch,
        MessageType::ProofInfo,
        MessageType::HealthInfo,
        MessageType::Identity,
        MessageType::StateValue,
        MessageType::CredentialKey,
        MessageType::Rotated,
        MessageType::KeyStatusInfo,
        MessageType::SigningRotated,
        MessageType::KeyChainInfo,
        MessageType::CredentialList,
        MessageType::ReindexReport,
        MessageType::ContextInfo,
        MessageType::HeadList,
        MessageType::Error,
    ];

    /// Decodes the wire byte.
    pub fn from_u8(b: u8) -> Option<MessageType> {
        MessageType::ALL.into_iter().find(|t| *t as u8 == b)
    }

    /// True for client-to-server types (below 0x80).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }

    /// True for the types whose payload holds a secret: an API key
    /// (`Hello`, `CredentialKey`), a token (`Redeem`, `Minted`) or a new
    /// master secret (`RotateMasterKey`). A [`Frame`] of one is zeroized
    /// when dropped, and a [`crate::FrameCodec`] zeroes the bytes of one
    /// it decoded in its read buffer.
    pub fn carries_secret(self) -> bool {
        matches!(
            self,
            MessageType::Hello
                | MessageType::Redeem
                | MessageType::RotateMasterKey
                | MessageType::Minted
                | MessageType::CredentialKey
        )
    }

    /// A stable snake_case name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "hello",
            MessageType::Ping => "ping",
            MessageType::Append => "append",
            MessageType::AppendBatch => "append_batch",
            MessageType::Mint => "mint",
            MessageType::Redeem => "redeem",
            MessageType::Head => "head",
            MessageType::Entries => "entries",
            MessageType::Proof => "proof",
            MessageType::Health => "health",
            MessageType::Event => "event",
            MessageType::Whois => "whois",
            MessageType::GetPolicy => "get_policy",
            MessageType::GetConsent => "get_consent",
            MessageType::CreateCredential => "create_credential",
            MessageType::RevokeCredential => "revoke_credential",
            MessageType::Shred => "shred",
            MessageType::RotateSubjectKey => "rotate_subject_key",
            MessageType::KeyStatus => "key_status",
            MessageType::RotateSigningKey => "rotate_signing_key",
            MessageType::KeyChain => "key_chain",
            MessageType::RotateMasterKey => "rotate_master_key",
            MessageType::ListCredentials => "list_credentials",
            MessageType::Reindex => "reindex",
            MessageType::Context => "context",
            MessageType::Heads => "heads",
            MessageType::CreateCertCredential => "create_cert_credential",
            MessageType::HelloOk => "hello_ok",
            MessageType::Pong => "pong",
            MessageType::Receipt => "receipt",
            MessageType::Receipts => "receipts",
            MessageType::Minted => "minted",
            MessageType::Data => "data",
            MessageType::HeadInfo => "head_info",
            MessageType::EntryBatch => "entry_batch",
            MessageType::ProofInfo => "proof_info",
            MessageType::HealthInfo => "health_info",
            MessageType::Identity => "identity",
            MessageType::StateValue => "state_value",
            MessageType::CredentialKey => "credential_key",
            MessageType::Rotated => "rotated",
            MessageType::KeyStatusInfo => "key_status_info",
            MessageType::SigningRotated => "signing_rotated",
            MessageType::KeyChainInfo => "key_chain_info",
            MessageType::CredentialList => "credential_list",
            MessageType::ReindexReport => "reindex_report",
            MessageType::ContextInfo => "context_info",
            MessageType::HeadList => "head_list",
            MessageType::Error => "error",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One decoded frame: a checked header and its payload, not yet parsed as
/// a message (see [`crate::Message::from_frame`]).
///
/// Invariant of a decoded frame, checked again by every encode: `flags`
/// has no reserved bit set and `payload.len() <= max_frame_len`.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// The type byte, a known [`MessageType`] once decoded.
    pub msg_type: MessageType,
    /// Only [`FLAG_LAST`] may be set; it means something only on `EntryBatch`.
    pub flags: u16,
    /// Chosen by the client, echoed in every frame answering it; 0 in an error
    /// the server cannot tie to a request.
    pub request_id: u32,
    /// The message, not yet decoded; at most the maximum frame length.
    pub payload: Vec<u8>,
}

impl Frame {
    /// True if [`FLAG_LAST`] is set.
    pub fn is_last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }

    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Encodes the frame, refusing reserved flags and payloads over
    /// [`MAX_FRAME_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out, MAX_FRAME_LEN)?;
        Ok(out)
    }

    /// Appends the encoded frame to `out`, refusing reserved flags and
    /// payloads over `max_frame_len`. Nothing is written on error.
    pub fn encode_into(&self, out: &mut impl BufMut, max_frame_len: usize) -> Result<()> {
        write_frame(
            out,
            self.msg_type,
            self.flags,
            self.request_id,
            &self.payload,
            max_frame_len,
        )
    }
}

/// A payload that holds a secret ([`MessageType::carries_secret`]) is
/// zeroized.
impl Drop for Frame {
    fn drop(&mut self) {
        if self.msg_type.carries_secret() {
            zeroize::Zeroize::zeroize(&mut self.payload);
        }
    }
}

/// Whether an encoded frame (its header at least) is of a type that
/// carries a secret ([`MessageType::carries_secret`]), so that a writer
/// can zeroize its copy once it is written.
pub fn encoded_carries_secret(encoded: &[u8]) -> bool {
    encoded
        .get(3)
        .and_then(|b| MessageType::from_u8(*b))
        .is_some_and(MessageType::carries_secret)
}

/// The payload may hold an API key or personal data: only its length is shown.
impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("msg_type", &self.msg_type)
            .field("flags", &self.flags)
            .field("request_id", &self.request_id)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Refuses reserved flags and payloads over `max_frame_len` (or over the
/// u32 length field); returns the length field.
pub(crate) fn check_encodable(flags: u16, payload_len: usize, max_frame_len: usize) -> Result<u32> {
    if flags & RESERVED_FLAGS != 0 {
        return Err(Error::BadFlags);
    }
    let too_large = || Error::FrameTooLarge {
        len: payload_len,
        max: max_frame_len,
    };
    if payload_len > max_frame_len {
        return Err(too_large());
    }
    u32::try_from(payload_len).map_err(|_| too_large())
}

/// Writes header and payload; the payload is borrowed so that callers
/// holding an encoded message need not build a [`Frame`] around it.
pub(crate) fn write_frame(
    out: &mut impl BufMut,
    msg_type: MessageType,
    flags: u16,
    request_id: u32,
    payload: &[u8],
    max_frame_len: usize,
) -> Result<()> {
    let len = check_encodable(flags, payload.len(), max_frame_len)?;
    let mut header = [0u8; HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC);
    header[2] = VERSION;
    header[3] = msg_type as u8;
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..10].copy_from_slice(&request_id.to_be_bytes());
    header[10..14].copy_from_slice(&len.to_be_bytes());
    let crc = checksum(&header[..CRC_COVERED], payload);
    header[14..18].copy_from_slice(&crc.to_be_bytes());
    out.put_slice(&header);
    out.put_slice(payload);
    Ok(())
}

/// Decodes one frame from the front of `buf` with the default maximum
/// ([`MAX_FRAME_LEN`]); see [`decode_with_max`].
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    decode_with_max(buf, MAX_FRAME_LEN)
}

/// Decodes one frame from the front of `buf`.
///
/// `Ok(None)`: not enough bytes yet, and nothing seen so far is wrong.
/// `Ok(Some((frame, n)))`: a checked frame made of the first `n` bytes;
/// bytes after them (a pipelined next frame) are left alone.
/// `Err`: the stream is not a valid frame; the connection cannot recover.
pub fn decode_with_max(buf: &[u8], max_frame_len: usize) -> Result<Option<(Frame, usize)>> {
    let Some(header) = decode_header(buf, max_frame_len)? else {
        return Ok(None);
    };
    let total = usize::try_from(header.payload_len)
        .ok()
        .and_then(|len| len.checked_add(HEADER_LEN))
        .ok_or(Error::FrameTooLarge {
            len: usize::MAX,
            max: max_frame_len,
        })?;
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let covered = buf.get(..CRC_COVERED).unwrap_or_default();
    if checksum(covered, payload) != header.crc {
        return Err(Error::CrcMismatch);
    }
    let frame = Frame {
        msg_type: header.msg_type,
        flags: header.flags,
        request_id: header.request_id,
        payload: payload.to_vec(),
    };
    Ok(Some((frame, total)))
}

/// The checked fields of a complete header.
#[derive(Debug)]
struct Header {
    msg_type: MessageType,
    flags: u16,
    request_id: u32,
    payload_len: u32,
    crc: u32,
}

/// Checks every header field whose bytes are in `buf` (which may be
/// shorter than a header), and returns the header once all 18 are.
fn decode_header(buf: &[u8], max_frame_len: usize) -> Result<Option<Header>> {
    if buf.iter().zip(MAGIC).any(|(got, want)| *got != want) {
        return Err(Error::BadMagic);
    }
    if let Some(&version) = buf.get(2) {
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
    }
    let msg_type = match buf.get(3) {
        Some(&t) => Some(MessageType::from_u8(t).ok_or(Error::UnknownType(t))?),
        None => None,
    };
    let flags = be_u16(buf, 4);
    if flags.is_some_and(|f| f & RESERVED_FLAGS != 0) {
        return Err(Error::BadFlags);
    }
    let request_id = be_u32(buf, 6);
    let payload_len = be_u32(buf, 10);
    if let Some(len) = payload_len {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > max_frame_len {
            return Err(Error::FrameTooLarge {
                len,
                max: max_frame_len,
            });
        }
    }
    let crc = be_u32(buf, 14);
    match (msg_type, flags, request_id, payload_len, crc) {
        (Some(msg_type), Some(flags), Some(request_id), Some(payload_len), Some(crc)) => {
            Ok(Some(Header {
                msg_type,
                flags,
                request_id,
                payload_len,
                crc,
            }))
        }
        _ => Ok(None),
    }
}

fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

/// CRC-32/IEEE over the first 14 header bytes, then the payload.
fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The types whose frames are zeroized are the ones docs/protocol.md
    /// names (connection rule 10), and an encoded frame tells its type.
    #[test]
    fn the_frames_that_carry_a_secret_are_the_documented_ones() {
        let docs = include_str!("../../docs/protocol.md");
        let rule = docs
            .split("10. **Frames that carry a secret:**")
            .nth(1)
            .and_then(|r| r.split(" (an API key").next())
            .expect("connection rule 10");
        let named: Vec<&str> = rule
            .split(',')
            .map(|n| n.trim().trim_matches('`'))
            .collect();
        let secret: Vec<MessageType> = MessageType::ALL
            .into_iter()
            .filter(|t| t.carries_secret())
            .collect();
        assert_eq!(named.len(), secret.len(), "{named:?} / {secret:?}");
        for t in MessageType::ALL {
            let wire = format!("{t:?}");
            assert_eq!(t.carries_secret(), named.contains(&wire.as_str()), "{wire}");
            let frame = Frame {
                msg_type: t,
                flags: 0,
                request_id: 1,
                payload: vec![1, 2, 3],
            };
            let encoded = frame.encode().expect("encodes");
            assert_eq!(
                encoded_carries_secret(&encoded),
                t.carries_secret(),
                "{wire}"
            );
        }
        assert!(!encoded_carries_secret(b"FV\x01"), "a header cut short");
    }

    fn ping(request_id: u32) -> Frame {
        Frame {
            msg_type: MessageType::Ping,
            flags: 0,
            request_id,
            payload: Vec::new(),
        }
    }

    fn sample() -> Frame {
        Frame {
            msg_type: MessageType::Receipt,
            flags: 0,
            request_id: 0x0102_0304,
            payload: vec![0, 0, 0, 3, 1, 2, 3],
        }
    }

    /// A header claiming `len` payload bytes, and nothing after it. Its
    /// CRC is wrong, but the length is refused or awaited before the CRC
    /// can be checked.
    pub(crate) fn header_claiming(len: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.push(VERSION);
        h.push(MessageType::EntryBatch as u8);
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&9u32.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        h
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        match frame.encode() {
            Ok(bytes) => bytes,
            Err(e) => panic!("sample frame does not encode: {e}"),
        }
    }

    /// The worked example in the module docs.
    #[test]
    fn golden_ping() {
        assert_eq!(
            hex::encode(encoded(&ping(1))),
            concat!("4656", "01", "02", "0000", "00000001", "00000000", "3f06f132")
        );
    }

    #[test]
    fn round_trip_leaves_the_next_frame_alone() {
        let mut bytes = encoded(&sample());
        let first_len = bytes.len();
        bytes.extend_from_slice(&encoded(&ping(2)));
        let Ok(Some((frame, used))) = decode(&bytes) else {
            panic!("first frame does not decode");
        };
        assert_eq!(frame, sample());
        assert_eq!(used, first_len);
        let Ok(Some((frame, used))) = decode(&bytes[used..]) else {
            panic!("second frame does not decode");
        };
        assert_eq!(frame, ping(2));
        assert_eq!(used, HEADER_LEN);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let bytes = encoded(&sample());
        for n in 0..bytes.len() {
            assert!(
                matches!(decode(&bytes[..n]), Ok(None)),
                "prefix {n} was not reported incomplete"
            );
        }
    }

    #[test]
    fn header_fields_are_refused_as_soon_as_they_arrive() {
        assert!(matches!(decode(b"G"), Err(Error::BadMagic)));
        assert!(matches!(decode(b"GET / HTTP/1.1"), Err(Error::BadMagic)));
        assert!(matches!(decode(b"F\x00"), Err(Error::BadMagic)));
        assert!(matches!(
            decode(b"FV\x02"),
            Err(Error::UnsupportedVersion(2))
        ));
        assert!(matches!(decode(b"FV\x01\x00"), Err(Error::UnknownType(0))));
        assert!(matches!(
            decode(b"FV\x01\x7f"),
            Err(Error::UnknownType(0x7f))
        ));
        assert!(matches!(
            decode(b"FV\x01\x80"),
            Err(Error::UnknownType(0x80))
        ));
        assert!(matches!(
            decode(b"FV\x01\x02\x00\x02"),
            Err(Error::BadFlags)
        ));
        assert!(matches!(
            decode(b"FV\x01\x02\x80\x00"),
            Err(Error::BadFlags)
        ));
        assert!(matches!(decode(b"FV\x01\x02\x00\x01"), Ok(None)));
    }

    #[test]
    fn oversized_length_refused_from_the_header_alone() {
        for len in [u32::MAX, (MAX_FRAME_LEN + 1) as u32] {
            let header = header_claiming(len);
            // Refused once the length field is in, and still with the full header.
            for n in [14, HEADER_LEN] {
                match decode(&header[..n]) {
                    Err(Error::FrameTooLarge { len: got, max }) => {
                        assert_eq!(got, len as usize);
                        assert_eq!(max, MAX_FRAME_LEN);
                    }
                    other => panic!("length {len} after {n} bytes: {other:?}"),
                }
            }
        }
        // Exactly the maximum is allowed: the decoder waits for it.
        assert!(matches!(
            decode(&header_claiming(MAX_FRAME_LEN as u32)),
            Ok(None)
        ));
        assert!(matches!(
            decode_with_max(&header_claiming(65), 64),
            Err(Error::FrameTooLarge { len: 65, max: 64 })
        ));
    }

    #[test]
    fn any_flipped_byte_is_caught() {
        let bytes = encoded(&sample());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            match decode(&bad) {
                // A longer length: still waiting for the rest.
                Ok(None) => assert!((10..14).contains(&i), "byte {i}"),
                Ok(Some(_)) => panic!("flipped byte {i} went unnoticed"),
                Err(_) => {}
            }
        }
        let mut bad = bytes.clone();
        bad[8] ^= 0x01; // request_id
        assert!(matches!(decode(&bad), Err(Error::CrcMismatch)));
        let mut bad = bytes;
        bad[HEADER_LEN] ^= 0x01; // payload
        assert!(matches!(decode(&bad), Err(Error::CrcMismatch)));
    }

    #[test]
    fn encode_refuses_what_decode_would() {
        let mut f = sample();
        f.flags = 0x0002;
        assert!(matches!(f.encode(), Err(Error::BadFlags)));
        f.flags = FLAG_LAST;
        assert!(f.encode().is_ok());
        f.payload = vec![0; 65];
        let mut out = Vec::new();
        assert!(matches!(
            f.encode_into(&mut out, 64),
            Err(Error::FrameTooLarge { len: 65, max: 64 })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn type_bytes_are_stable() {
        for t in MessageType::ALL {
            assert_eq!(MessageType::from_u8(t as u8), Some(t));
            assert_eq!(t.is_request(), (t as u8) < 0x80);
        }
        let known: Vec<u8> = MessageType::ALL.iter().map(|t| *t as u8).collect();
        assert_eq!(
            known,
            [
                0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
                0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x81,
                0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x8b, 0x8c, 0x8d, 0x8e, 0x8f,
                0x90, 0x91, 0x92, 0x93, 0x94, 0x95, 0xff
            ]
        );
        let unknown = (0..=255u8)
            .filter(|b| MessageType::from_u8(*b).is_none())
            .count();
        assert_eq!(unknown, 256 - MessageType::ALL.len());
    }

    #[test]
    fn debug_hides_the_payload() {
        let mut f = sample();
        f.payload = b"secret-api-key".to_vec();
        let shown = format!("{f:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("payload_len: 14"), "{shown}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&bytes);
            let _ = decode_with_max(&bytes, 16);
        }

        /// Past the magic, so the later checks are reached too.
        #[test]
        fn random_after_magic_never_panics(
            version in 0u8..3,
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let mut bytes = vec![MAGIC[0], MAGIC[1], version];
            bytes.extend_from_slice(&rest);
            if let Ok(Some((_, used))) = decode(&bytes) {
                proptest::prop_assert!(used <= bytes.len());
            }
        }
    }
}
