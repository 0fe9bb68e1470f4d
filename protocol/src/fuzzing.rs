//! Entry points for fuzzers and property tests: each takes arbitrary bytes,
//! runs one decoder over them, and asserts what must hold whatever the
//! input (no panic; whatever decodes re-encodes to the same bytes; a
//! receipt that verifies really is covered by its head).
//!
//! The cargo-fuzz targets in `fuzz/` are one-line shims over these
//! functions, and the proptests below call them with random input, so CI
//! exercises the same code on stable without a fuzzer.

use bytes::BytesMut;
use ed25519_dalek::{SigningKey, VerifyingKey};
use tokio_util::codec::Decoder;

use crate::codec::{FrameCodec, MessageCodec};
use crate::frame::{self, Frame, MessageType};
use crate::message::{ErrorCode, Message};
use crate::receipt::{KeyEndorsement, Receipt, SignedHead};

/// Frame decoding: raw bytes through [`frame::decode`] (and a small
/// maximum), the same bytes fed to both codecs in two pieces split where the
/// first byte says, and every decoded frame's payload through
/// [`Message::from_frame`].
pub fn frame(data: &[u8]) {
    for max in [frame::MAX_FRAME_LEN, 16] {
        if let Ok(Some((f, used))) = frame::decode_with_max(data, max) {
            assert!(used <= data.len());
            assert!(f.payload.len() <= max);
            // A checked frame re-encodes to exactly the bytes it came from.
            assert_eq!(f.encode().ok().as_deref(), Some(&data[..used]));
            let _ = Message::from_frame(&f);
        }
    }
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (a, b) = data.split_at(split);
    let mut codec = FrameCodec::new();
    let mut src = BytesMut::from(a);
    let mut frames = Vec::new();
    let mut failed = false;
    for piece in [b, &[][..]] {
        loop {
            match codec.decode(&mut src) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            break;
        }
        src.extend_from_slice(piece);
    }
    for f in &frames {
        let _ = Message::from_frame(f);
    }
    let mut src = BytesMut::from(data);
    while let Ok(Some(_)) = MessageCodec::new().decode(&mut src) {}
}

/// Message decoding behind a valid frame header: the first byte picks the
/// message type, the rest is the payload. Whatever decodes re-encodes to the
/// same payload, and survives a whole frame round trip.
pub fn message(data: &[u8]) {
    let Some((&t, payload)) = data.split_first() else {
        return;
    };
    let msg_type = MessageType::ALL[usize::from(t) % MessageType::ALL.len()];
    let Ok(m) = Message::decode(msg_type, payload) else {
        return;
    };
    assert_eq!(m.message_type(), msg_type);
    let unrecognized = matches!(
        m,
        Message::Error {
            code: ErrorCode::Unrecognized,
            ..
        }
    );
    if unrecognized && payload.get(..2) != Some(&[0xff, 0xff]) {
        // A code this build does not know is sent on as the reserved
        // value, which decodes to the same message.
        let again = m.encode_payload().expect("a decoded message encodes");
        assert_eq!(Message::decode(msg_type, &again).ok(), Some(m));
        return;
    }
    assert_eq!(m.encode_payload().ok().as_deref(), Some(payload));
    let f = Frame {
        msg_type,
        flags: 0,
        request_id: 7,
        payload: payload.to_vec(),
    };
    if let Ok(bytes) = f.encode() {
        let (back, used) = frame::decode(&bytes)
            .ok()
            .flatten()
            .expect("an encoded frame decodes");
        assert_eq!(used, bytes.len());
        assert_eq!(Message::from_frame(&back).ok(), Some(m));
    }
}

/// The key [`receipt`] re-signs heads with, so that verification gets past
/// the signature to the Merkle path checks.
fn fuzz_key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

/// Receipt, signed-head and key-endorsement decoding, then verification: as
/// decoded (the signature almost never holds), and with the head re-signed
/// by a known key so that the coverage and Merkle path checks see arbitrary
/// seqs, group bounds and paths. A receipt that verifies must be covered by
/// its head; an endorsement re-signed by the known key verifies under it.
pub fn receipt(data: &[u8]) {
    let key = fuzz_key();
    let vk = key.verifying_key();
    if let Ok(e) = KeyEndorsement::decode(data) {
        assert_eq!(e.encode(), data);
        let _ = e.verify(&vk);
        if let Ok(new) = VerifyingKey::from_bytes(&e.public_key) {
            assert!(KeyEndorsement::sign(&key, e.key_id, &new, e.seq).verify(&vk));
        }
    }
    if let Ok(h) = SignedHead::decode(data) {
        assert_eq!(h.encode(), data);
        assert!(h.group_first_seq <= h.last_seq);
        let _ = h.verify(&vk);
    }
    let Ok(mut r) = Receipt::decode(data) else {
        return;
    };
    assert_eq!(r.encode(), data);
    let _ = r.verify(&vk);
    let h = r.head;
    r.head = SignedHead::sign(
        &key,
        h.key_id,
        h.group_first_seq,
        h.last_seq,
        h.last_hash,
        h.group_root,
        h.timestamp_ms,
    );
    if r.verify(&vk).is_ok() {
        assert!(r.head.group_first_seq <= r.seq && r.seq <= r.head.last_seq);
    }
    // The same check a server's answer goes through, with the entry as the
    // group's only member, so the path must be empty and the root the leaf.
    let single = Receipt {
        seq: h.last_seq,
        entry_hash: h.last_hash,
        path: Vec::new(),
        head: SignedHead::sign(
            &key,
            h.key_id,
            h.last_seq,
            h.last_seq,
            h.last_hash,
            crate::receipt::merkle_root(&[h.last_hash]),
            h.timestamp_ms,
        ),
    };
    assert_eq!(single.verify(&vk), Ok(()));
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::num::u8::ANY;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn frame_never_panics(data in vec(ANY, 0..300)) {
            super::frame(&data);
        }

        #[test]
        fn message_never_panics(data in vec(ANY, 0..300)) {
            super::message(&data);
        }

        /// An endorsement's length, so that every input decodes.
        #[test]
        fn endorsement_never_panics(data in vec(ANY, 108)) {
            super::receipt(&data);
        }

        /// Lengths around a receipt's (1 + 8 + 32 + 1 + 32n + 157), so that
        /// whole receipts with short paths decode and are verified.
        #[test]
        fn receipt_never_panics(data in vec(ANY, 150..300)) {
            let mut data = data;
            // Version bytes of receipt and head, path length 0..3.
            data[0] = 1;
            data[41] %= 4;
            let head_at = 42 + 32 * usize::from(data[41]);
            if let Some(b) = data.get_mut(head_at) {
                *b = 1;
            }
            let end = (head_at + 157).min(data.len());
            super::receipt(&data[..end]);
            super::receipt(&data);
        }
    }
}
