//! tokio-util codecs: thin wrappers over [`frame::decode_with_max`],
//! [`Message::decode`] and the frame encoder, for `Framed` on a TLS stream.
//!
//! [`FrameCodec`] yields raw [`Frame`]s; a server uses it so that it still
//! knows the request id when a payload turns out to be malformed, and
//! answers with [`Message::from_frame`]'s error. [`MessageCodec`] yields
//! decoded [`Envelope`]s and is what a client wants.
//!
//! The decoder reserves nothing ahead of the bytes that actually arrive:
//! even a length within the maximum could be a peer's claim it never
//! fulfils, and reserving it would let each idle connection pin
//! `max_frame_len` bytes with an 18-byte header. The buffer grows as the
//! payload is read; a length over the maximum is refused from the header.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{Error, Result};
use crate::frame::{self, Frame, FLAG_LAST, MAX_FRAME_LEN};
use crate::message::Message;

/// Frames in, frames out, with a configurable maximum payload length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameCodec {
    max_frame_len: usize,
}

impl FrameCodec {
    /// A codec with the default maximum, [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        FrameCodec::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A codec that refuses payloads over `max_frame_len` bytes, both
    /// ways. Both ends must agree: a peer with a larger maximum may send
    /// frames this end refuses.
    pub fn with_max_frame_len(max_frame_len: usize) -> Self {
        FrameCodec { max_frame_len }
    }

    /// The largest payload accepted or sent.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new()
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        match frame::decode_with_max(src, self.max_frame_len)? {
            Some((frame, used)) => {
                // The frame has its own copy: the secret leaves the read
                // buffer, whose memory is reused and freed unzeroed.
                if frame.msg_type.carries_secret() {
                    if let Some(read) = src.get_mut(..used) {
                        zeroize::Zeroize::zeroize(read);
                    }
                }
                src.advance(used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        frame.encode_into(dst, self.max_frame_len)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<()> {
        self.encode(&frame, dst)
    }
}

/// A message with the frame fields that matter above the frame layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The client's id for the request; a response echoes it.
    pub request_id: u32,
    /// [`FLAG_LAST`]: this `EntryBatch` ends its stream. False elsewhere.
    pub last: bool,
    /// The message the frame carries.
    pub message: Message,
}

impl Envelope {
    /// An envelope without the LAST flag.
    pub fn new(request_id: u32, message: Message) -> Self {
        Envelope {
            request_id,
            last: false,
            message,
        }
    }

    /// An envelope with the LAST flag (the final `EntryBatch` of a stream).
    pub fn last(request_id: u32, message: Message) -> Self {
        Envelope {
            request_id,
            last: true,
            message,
        }
    }

    fn flags(&self) -> u16 {
        if self.last {
            FLAG_LAST
        } else {
            0
        }
    }
}

impl From<(u32, Message)> for Envelope {
    fn from((request_id, message): (u32, Message)) -> Self {
        Envelope::new(request_id, message)
    }
}

/// Decoded messages in, messages out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageCodec {
    frames: FrameCodec,
}

impl MessageCodec {
    /// A codec with the default maximum, [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        MessageCodec::default()
    }

    /// A codec that refuses payloads over `max_frame_len` bytes, both ways.
    pub fn with_max_frame_len(max_frame_len: usize) -> Self {
        MessageCodec {
            frames: FrameCodec::with_max_frame_len(max_frame_len),
        }
    }

    /// The largest payload accepted or sent.
    pub fn max_frame_len(&self) -> usize {
        self.frames.max_frame_len()
    }
}

impl Decoder for MessageCodec {
    type Item = Envelope;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Envelope>> {
        let Some(frame) = self.frames.decode(src)? else {
            return Ok(None);
        };
        Ok(Some(Envelope {
            request_id: frame.request_id,
            last: frame.is_last(),
            message: Message::from_frame(&frame)?,
        }))
    }
}

impl Encoder<&Envelope> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, envelope: &Envelope, dst: &mut BytesMut) -> Result<()> {
        envelope.message.with_payload(|payload| {
            frame::write_frame(
                dst,
                envelope.message.message_type(),
                envelope.flags(),
                envelope.request_id,
                payload,
                self.max_frame_len(),
            )
        })
    }
}

impl Encoder<Envelope> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, envelope: Envelope, dst: &mut BytesMut) -> Result<()> {
        self.encode(&envelope, dst)
    }
}

impl Encoder<(u32, Message)> for MessageCodec {
    type Error = Error;

    fn encode(&mut self, item: (u32, Message), dst: &mut BytesMut) -> Result<()> {
        self.encode(&Envelope::from(item), dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::header_claiming;
    use crate::frame::HEADER_LEN;
    use crate::message::tests::golden;
    use crate::MessageType;

    fn encode(codec: &mut MessageCodec, envelope: &Envelope) -> BytesMut {
        let mut buf = BytesMut::new();
        if let Err(e) = codec.encode(envelope, &mut buf) {
            panic!("{envelope:?} does not encode: {e}");
        }
        buf
    }

    fn envelope(request_id: u32, message: Message) -> Envelope {
        let last = matches!(message, Message::EntryBatch { .. });
        Envelope {
            request_id,
            last,
            message,
        }
    }

    #[test]
    fn one_byte_at_a_time_yields_the_same_message() {
        let mut codec = MessageCodec::new();
        for (i, g) in golden().into_iter().enumerate() {
            let sent = envelope(i as u32 + 1, g.message);
            let bytes = encode(&mut codec, &sent);
            let mut src = BytesMut::new();
            for (n, b) in bytes.iter().enumerate() {
                src.extend_from_slice(&[*b]);
                match codec.decode(&mut src) {
                    Ok(None) if n + 1 < bytes.len() => {}
                    Ok(Some(got)) if n + 1 == bytes.len() => assert_eq!(got, sent),
                    other => panic!("{sent:?} after {} bytes: {other:?}", n + 1),
                }
            }
            assert!(src.is_empty(), "the frame was not consumed");
        }
    }

    #[test]
    fn pipelined_frames_decode_in_order() {
        let mut codec = MessageCodec::new();
        let sent: Vec<Envelope> = golden()
            .into_iter()
            .enumerate()
            .map(|(i, g)| envelope(i as u32, g.message))
            .collect();
        let mut src = BytesMut::new();
        for e in &sent {
            src.extend_from_slice(&encode(&mut codec, e));
        }
        let mut got = Vec::new();
        while let Ok(Some(e)) = codec.decode(&mut src) {
            got.push(e);
        }
        assert_eq!(got, sent);
        assert!(src.is_empty());
    }

    #[test]
    fn tuple_and_frame_encoders_agree_with_encode_frame() {
        let mut codec = MessageCodec::new();
        let mut frames = FrameCodec::new();
        for g in golden() {
            let mut a = BytesMut::new();
            let mut b = BytesMut::new();
            let frame = match g.message.to_frame(1, 0) {
                Ok(frame) => frame,
                Err(e) => panic!("{:?}: {e}", g.message),
            };
            let expected = crate::encode_frame(1, &g.message, 0).ok();
            assert!(codec.encode((1, g.message), &mut a).is_ok());
            assert!(frames.encode(frame, &mut b).is_ok());
            assert_eq!(Some(a.to_vec()), expected);
            assert_eq!(Some(b.to_vec()), expected);
        }
    }

    #[test]
    fn oversized_length_fails_on_the_header_without_reserving() {
        for (codec_max, claimed) in [
            (MAX_FRAME_LEN, u32::MAX),
            (MAX_FRAME_LEN, MAX_FRAME_LEN as u32 + 1),
            (64, 65),
        ] {
            let mut codec = MessageCodec::with_max_frame_len(codec_max);
            let mut src = BytesMut::from(&header_claiming(claimed)[..]);
            let before = src.capacity();
            match codec.decode(&mut src) {
                Err(Error::FrameTooLarge { len, max }) => {
                    assert_eq!(len, claimed as usize);
                    assert_eq!(max, codec_max);
                }
                other => panic!("claimed {claimed}: {other:?}"),
            }
            assert_eq!(src.capacity(), before);
            assert!(src.capacity() < claimed as usize);
        }
    }

    #[test]
    fn a_length_within_the_maximum_reserves_nothing_ahead() {
        let mut codec = FrameCodec::new();
        let mut src = BytesMut::from(&header_claiming(MAX_FRAME_LEN as u32)[..]);
        let before = src.capacity();
        assert!(matches!(codec.decode(&mut src), Ok(None)));
        assert_eq!(src.capacity(), before);
        assert_eq!(src.len(), HEADER_LEN);
    }

    #[test]
    fn a_trailing_byte_inside_the_payload_is_refused() {
        let mut codec = MessageCodec::new();
        for g in golden() {
            let Ok(mut payload) = g.message.encode_payload() else {
                panic!("{:?} does not encode", g.message);
            };
            payload.push(0);
            let frame = Frame {
                msg_type: g.message.message_type(),
                flags: 0,
                request_id: 3,
                payload,
            };
            let mut src = BytesMut::new();
            assert!(FrameCodec::new().encode(&frame, &mut src).is_ok());
            assert!(
                matches!(codec.decode(&mut src), Err(Error::TrailingBytes)),
                "{:?}",
                g.message
            );
        }
    }

    #[test]
    fn encoder_refuses_frames_over_its_maximum() {
        let mut codec = MessageCodec::with_max_frame_len(8);
        let mut dst = BytesMut::new();
        let big = Message::Receipt {
            receipt: vec![0; 5],
        };
        assert!(matches!(
            codec.encode((1, big), &mut dst),
            Err(Error::FrameTooLarge { len: 9, max: 8 })
        ));
        assert!(dst.is_empty());
    }

    proptest::proptest! {
        /// Frames with a valid header and CRC around random payloads: every
        /// message decoder is reached, and none panics.
        #[test]
        fn random_payloads_in_valid_frames_never_panic(
            type_index in 0..MessageType::ALL.len(),
            last in proptest::bool::ANY,
            request_id in proptest::num::u32::ANY,
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let frame = Frame {
                msg_type: MessageType::ALL[type_index],
                flags: if last { FLAG_LAST } else { 0 },
                request_id,
                payload,
            };
            let mut src = BytesMut::new();
            proptest::prop_assert!(FrameCodec::new().encode(&frame, &mut src).is_ok());
            if let Ok(Some(e)) = MessageCodec::new().decode(&mut src) {
                proptest::prop_assert_eq!(e.request_id, request_id);
                proptest::prop_assert_eq!(e.last, last);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut src = BytesMut::from(&bytes[..]);
            let _ = MessageCodec::new().decode(&mut src);
        }
    }
}
