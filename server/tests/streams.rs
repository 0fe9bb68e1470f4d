//! Random request streams against a live protocol server, written in
//! random pieces with random pauses between them, so the server reads them
//! in every grouping (a request split across reads, many whole in one
//! read, a fault in the same read as the requests before it).
//!
//! A writer's stream: pipelined appends (valid or refused), batches, pings
//! and a request the role may not send, then perhaps one fault (garbage,
//! an oversized length, a bad CRC, an unknown type, version 2, a payload
//! that ends early, a frame cut short), and appends behind it. The server
//! must answer every request before the fault exactly once, as the model
//! says (a receipt that verifies with the vault's public key, or the
//! refused request's error); answer the fault last, with its typed error
//! where it has one; answer and write nothing behind it; and lose nothing
//! acknowledged: each subject's latest record is its acknowledged write
//! with the highest seq.
//!
//! A partner's stream: pings, health, key chain and a forbidden request,
//! then a `Redeem` or a fault, and requests behind it (a second token's
//! `Redeem` among them). The server answers each in order, the `Redeem`
//! with the masked data, the fault with its error, then nothing more; the
//! stream's token is spent only if it was redeemed, the second never.
//!
//! An auditor's stream: `Head`, and `Entries`, `Proof` and `Heads` at seqs
//! around the log's ends and beyond (up to `u64::MAX`), with any `max`.
//! Each is answered: the head; a proof that verifies for its seq, or
//! `not_found` past the end; entries in order from the seq asked, no more
//! than asked or than 10,000, in batches the last of which is flagged
//! LAST; signed heads that verify, the first the one of the group holding
//! the seq asked, each starting after the one before, no more than asked
//! or than 1,000, and none past the end.
//!
//! None may panic anywhere (a panic hook counts them).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use protocol::{ErrorCode, Message, Record};
use server::serve::ServeConfig;
use storage::Receipt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A subject of the case (`c<case>-s<n>`), or one the vault refuses.
#[derive(Debug, Clone, Copy)]
enum Subject {
    Good(u8),
    Bad,
}

/// A record: one field `id` (the request's id, so the record read back
/// tells which write it was), then more fields, whose names may repeat
/// (a record that names a field twice is refused).
#[derive(Debug, Clone)]
struct Rec {
    subject: Subject,
    more: Vec<(&'static str, String)>,
}

#[derive(Debug, Clone)]
enum Req {
    Append(Rec),
    Batch(Vec<Rec>),
    Ping,
    /// A `Mint`, which a writer may not send.
    Forbidden,
}

#[derive(Debug, Clone)]
enum Fault {
    /// The stream ends cleanly.
    None,
    /// Bytes that are not this protocol ("GET ..." and random bytes).
    Garbage(Vec<u8>),
    /// A header whose length is over the maximum.
    Oversized,
    /// A whole `Ping` frame whose CRC does not match.
    BadCrc,
    /// A frame with a correct CRC and an unknown message type.
    UnknownType,
    /// A frame of version 2.
    Version2,
    /// An append whose payload ends one byte early, in a frame with a
    /// correct length and CRC.
    BadPayload,
    /// The first `n` bytes of an append's frame (at least 1, fewer than
    /// all), then the end of the stream.
    CutShort(usize),
}

#[derive(Debug, Clone)]
struct Stream {
    before: Vec<Req>,
    fault: Fault,
    /// Valid appends sent after the fault.
    after: usize,
    /// Where the bytes are cut into writes (fractions of the length).
    cuts: Vec<f64>,
    /// Pause after each write, µs (0 = a yield).
    pauses: Vec<u16>,
}

fn rec() -> impl Strategy<Value = Rec> {
    let subject = prop_oneof![
        9 => (0u8..3).prop_map(Subject::Good),
        1 => Just(Subject::Bad),
    ];
    let field = (prop_oneof![Just("a"), Just("b"), Just("id")], "[ -~]{0,24}");
    (subject, proptest::collection::vec(field, 0..3))
        .prop_map(|(subject, more)| Rec { subject, more })
}

fn stream() -> impl Strategy<Value = Stream> {
    let req = prop_oneof![
        12 => rec().prop_map(Req::Append),
        2 => proptest::collection::vec(rec(), 1..4).prop_map(Req::Batch),
        2 => Just(Req::Ping),
        1 => Just(Req::Forbidden),
    ];
    let fault = prop_oneof![
        3 => Just(Fault::None),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Fault::Garbage),
        1 => Just(Fault::Oversized),
        1 => Just(Fault::BadCrc),
        1 => Just(Fault::UnknownType),
        1 => Just(Fault::Version2),
        1 => Just(Fault::BadPayload),
        1 => (1usize..10_000).prop_map(Fault::CutShort),
    ];
    (
        proptest::collection::vec(req, 0..40),
        fault,
        0usize..4,
        proptest::collection::vec(0.0f64..1.0, 0..12),
        proptest::collection::vec(0u16..400, 13),
    )
        .prop_map(|(before, fault, after, cuts, pauses)| Stream {
            before,
            fault,
            after,
            cuts,
            pauses,
        })
}

/// What the model expects of one request before the fault.
#[derive(Debug)]
enum Expect {
    /// Receipts for these (subject, record id) writes, in order.
    Written(Vec<(String, u32)>),
    Refused(ErrorCode),
    Pong,
}

fn subject_name(case: u32, s: Subject) -> String {
    match s {
        Subject::Good(n) => format!("c{case}-s{n}"),
        Subject::Bad => "has space".to_string(),
    }
}

/// The record as sent, and whether the vault takes it.
fn record(case: u32, id: u32, r: &Rec) -> (Record, bool) {
    let mut fields = vec![("id".to_string(), id.to_string())];
    fields.extend(r.more.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let mut names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    let distinct = names.windows(2).all(|w| w[0] != w[1]);
    let ok = distinct && matches!(r.subject, Subject::Good(_));
    let subject = subject_name(case, r.subject);
    (Record { subject, fields }, ok)
}

/// The request's message and what the model expects of it.
fn model(case: u32, id: u32, req: &Req) -> (Message, Expect) {
    match req {
        Req::Append(r) => {
            let (Record { subject, fields }, ok) = record(case, id, r);
            let expect = if ok {
                Expect::Written(vec![(subject.clone(), id)])
            } else {
                Expect::Refused(ErrorCode::Invalid)
            };
            (Message::Append { subject, fields }, expect)
        }
        Req::Batch(items) => {
            let mut all_ok = true;
            let mut records = Vec::new();
            let mut written = Vec::new();
            for r in items {
                let (record, ok) = record(case, id, r);
                all_ok &= ok;
                written.push((record.subject.clone(), id));
                records.push(record);
            }
            let expect = if all_ok {
                Expect::Written(written)
            } else {
                Expect::Refused(ErrorCode::Invalid)
            };
            (Message::AppendBatch { items: records }, expect)
        }
        Req::Ping => (Message::Ping, Expect::Pong),
        Req::Forbidden => (
            Message::Mint {
                partner_id: "p".into(),
                subject: subject_name(case, Subject::Good(0)),
                purpose: "x".into(),
                fields: vec![("id".into(), protocol::MaskOp::Reveal)],
                ttl_secs: 60,
            },
            Expect::Refused(ErrorCode::Forbidden),
        ),
    }
}

/// The fault's bytes, and the request id and error code it must be
/// answered with, if any: id 0 for a frame that does not decode, the
/// frame's own for a payload that does not (`docs/protocol.md`, rule 8).
fn fault_bytes(f: &Fault) -> (Vec<u8>, Option<(u32, ErrorCode)>) {
    let ping = |id| protocol::encode_frame(id, &Message::Ping, 0).expect("frame");
    match f {
        Fault::None => (Vec::new(), None),
        Fault::Garbage(tail) => {
            let mut b = b"GET / HTTP/1.1\r\n".to_vec();
            b.extend_from_slice(tail);
            (b, Some((0, ErrorCode::Malformed)))
        }
        Fault::Oversized => {
            let mut b = ping(7_000);
            let len = protocol::MAX_FRAME_LEN as u32 + 1;
            b[10..14].copy_from_slice(&len.to_be_bytes());
            b.truncate(protocol::HEADER_LEN);
            (b, Some((0, ErrorCode::FrameTooLarge)))
        }
        Fault::BadCrc => {
            let mut b = ping(7_001);
            b[14] ^= 0x20;
            (b, Some((0, ErrorCode::Malformed)))
        }
        Fault::UnknownType => {
            let mut b = ping(7_002);
            b[3] = 0x7e;
            (with_crc(b), Some((0, ErrorCode::Malformed)))
        }
        Fault::Version2 => {
            let mut b = ping(7_003);
            b[2] = 2;
            (with_crc(b), Some((0, ErrorCode::UnsupportedVersion)))
        }
        Fault::BadPayload => {
            let m = Message::Append {
                subject: "cut".into(),
                fields: vec![("a".into(), "b".into())],
            };
            let mut b = protocol::encode_frame(7_004, &m, 0).expect("frame");
            b.pop();
            let len = (b.len() - protocol::HEADER_LEN) as u32;
            b[10..14].copy_from_slice(&len.to_be_bytes());
            (with_crc(b), Some((7_004, ErrorCode::Malformed)))
        }
        Fault::CutShort(n) => {
            let m = Message::Append {
                subject: "cut".into(),
                fields: vec![("a".into(), "b".into())],
            };
            let b = protocol::encode_frame(7_005, &m, 0).expect("frame");
            let n = 1 + n % (b.len() - 1);
            // The end of the stream inside a frame has no answer.
            (b[..n].to_vec(), None)
        }
    }
}

/// `frame` with its CRC made right for its bytes as they are.
fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..14]);
    crc.update(&frame[protocol::HEADER_LEN..]);
    frame[14..18].copy_from_slice(&crc.finalize().to_be_bytes());
    frame
}

mod common;

use common::Server;

/// A server whose in-flight limit is small enough that long streams meet
/// it too, with a partner's record to redeem.
async fn start() -> Server {
    let s = common::start(ServeConfig {
        max_in_flight: 16,
        ..ServeConfig::default()
    })
    .await;
    let record = br#"{"iban":"GB33BUKB20201555555555","name":"Jane Doe"}"#;
    s.vault
        .append(storage::Append::record("cust-p", record.to_vec()))
        .await
        .expect("seed");
    s
}

/// A `Hello` with `key`, request id 1: the first frame of a stream.
fn hello(key: &str) -> Vec<u8> {
    let m = Message::Hello {
        api_key: key.to_string(),
        client: "streams".into(),
    };
    protocol::encode_frame(1, &m, 0).expect("frame")
}

/// Every frame in `bytes`, decoded (the server's answers).
fn answers(mut bytes: &[u8]) -> Result<Vec<(u32, Message)>, TestCaseError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Ok(Some((f, used))) = protocol::frame::decode(bytes) else {
            return Err(TestCaseError::fail(
                "the server wrote bytes that are not a frame",
            ));
        };
        let m = Message::from_frame(&f)
            .map_err(|e| TestCaseError::fail(format!("an answer does not decode: {e}")))?;
        out.push((f.request_id, m));
        bytes = &bytes[used..];
    }
    Ok(out)
}

/// Writes `bytes` to a new connection in pieces cut at `cuts` (fractions
/// of the length), pausing after each (µs, 0 = a yield), then ends the
/// write half; reads everything the server writes until it closes.
async fn exchange(
    s: &Server,
    bytes: &[u8],
    cuts: &[f64],
    pauses: &[u16],
) -> Result<Vec<u8>, TestCaseError> {
    let mut ends: Vec<usize> = cuts
        .iter()
        .map(|c| (c * bytes.len() as f64) as usize)
        .collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.split();
    let reading = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let writing = async {
        let mut at = 0;
        for (i, &end) in ends.iter().enumerate() {
            // The server may close once it has answered a fault; what is
            // left unwritten then is not an error of the server.
            if wr.write_all(&bytes[at..end]).await.is_err() {
                return;
            }
            at = end;
            match pauses.get(i % pauses.len().max(1)).copied().unwrap_or(0) {
                0 => tokio::task::yield_now().await,
                us => tokio::time::sleep(Duration::from_micros(u64::from(us))).await,
            }
        }
        let _ = wr.shutdown().await;
    };
    // Not a limit on speed: a stream the server never finishes answering
    // is a hang.
    let (out, ()) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(reading, writing)
    })
    .await
    .map_err(|_| TestCaseError::fail("the server neither answered nor closed"))?;
    Ok(out)
}

async fn run_case(s: &Server, case: u32, st: &Stream) -> Result<(), TestCaseError> {
    let key = s.vault.public_key();
    let mut bytes = hello(&s.writer);
    let mut expect = BTreeMap::new();
    for (i, req) in st.before.iter().enumerate() {
        let id = 100 + i as u32;
        let (m, e) = model(case, id, req);
        bytes.extend(protocol::encode_frame(id, &m, 0).expect("frame"));
        expect.insert(id, e);
    }
    let (fault, fault_code) = fault_bytes(&st.fault);
    bytes.extend_from_slice(&fault);
    let after_subject = format!("c{case}-after");
    if !matches!(st.fault, Fault::None | Fault::CutShort(_)) {
        for i in 0..st.after {
            let m = Message::Append {
                subject: after_subject.clone(),
                fields: vec![("n".into(), i.to_string())],
            };
            bytes.extend(protocol::encode_frame(9_000 + i as u32, &m, 0).expect("frame"));
        }
    }

    let out = exchange(s, &bytes, &st.cuts, &st.pauses).await?;

    let mut got = answers(&out)?;
    prop_assert!(
        matches!(got.first(), Some((1, Message::HelloOk { .. }))),
        "Hello first: {:?}",
        got.first()
    );
    got.remove(0);
    // The fault's answer is the last one, when it has one.
    if let Some((id, code)) = fault_code {
        let last = got.pop();
        prop_assert!(
            matches!(&last, Some((i, Message::Error { code: c, .. })) if *c == code && *i == id),
            "the fault answered last, with request id {id} and {code:?}: {last:?}"
        );
    }
    let mut answered = HashMap::new();
    for (id, m) in got {
        prop_assert!(
            expect.contains_key(&id),
            "request {id} answered, not expected: {m:?}"
        );
        prop_assert!(
            answered.insert(id, m).is_none(),
            "request {id} answered twice"
        );
    }
    prop_assert_eq!(
        answered.len(),
        expect.len(),
        "every request before the fault answered"
    );

    // Each subject's acknowledged write with the highest seq.
    let mut latest: HashMap<String, (u64, u32)> = HashMap::new();
    for (id, e) in &expect {
        let m = &answered[id];
        let receipts: Vec<Vec<u8>> = match (e, m) {
            (Expect::Pong, Message::Pong) => continue,
            (Expect::Refused(c), Message::Error { code, .. }) if c == code => continue,
            (Expect::Written(w), Message::Receipt { receipt }) if w.len() == 1 => {
                vec![receipt.clone()]
            }
            (Expect::Written(w), Message::Receipts { receipts }) if receipts.len() == w.len() => {
                receipts.clone()
            }
            _ => {
                return Err(TestCaseError::fail(format!(
                    "request {id}: expected {e:?}, got {m:?}"
                )))
            }
        };
        let Expect::Written(w) = e else {
            unreachable!("matched above")
        };
        for ((subject, rid), blob) in w.iter().zip(receipts) {
            let r = Receipt::decode(&blob)
                .map_err(|e| TestCaseError::fail(format!("receipt {id}: {e}")))?;
            r.verify(&key)
                .map_err(|e| TestCaseError::fail(format!("receipt {id} does not verify: {e}")))?;
            let slot = latest.entry(subject.clone()).or_insert((r.seq, *rid));
            if r.seq >= slot.0 {
                *slot = (r.seq, *rid);
            }
        }
    }
    for n in 0..3 {
        let subject = subject_name(case, Subject::Good(n));
        let rec = s.vault.latest_record(&subject).expect("read");
        match (latest.get(&subject), rec) {
            (None, None) => {}
            (Some((_, rid)), Some(rec)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&rec.plaintext).expect("a record is JSON");
                prop_assert_eq!(&v["id"], &serde_json::json!(rid.to_string()), "{}", subject);
            }
            (want, got) => {
                return Err(TestCaseError::fail(format!(
                    "{subject}: acknowledged {want:?}, stored {:?}",
                    got.map(|r| r.seq)
                )))
            }
        }
    }
    prop_assert!(
        s.vault
            .latest_record(&after_subject)
            .expect("read")
            .is_none(),
        "nothing after the fault is written"
    );
    Ok(())
}

/// A request a partner sends before its `Redeem`.
#[derive(Debug, Clone, Copy)]
enum PartnerReq {
    Ping,
    Health,
    KeyChain,
    /// An `Append`, which a partner may not send.
    Forbidden,
}

/// How a partner's stream ends.
#[derive(Debug, Clone)]
enum PartnerEnd {
    /// A `Redeem` of a fresh token.
    Redeem,
    /// A fault (`Fault::None`: the stream ends with no `Redeem`).
    Fault(Fault),
}

#[derive(Debug, Clone)]
struct PartnerStream {
    before: Vec<PartnerReq>,
    end: PartnerEnd,
    /// Requests after the end: pings, then a `Redeem` of a second token.
    after: usize,
    cuts: Vec<f64>,
    pauses: Vec<u16>,
}

fn partner_stream() -> impl Strategy<Value = PartnerStream> {
    let req = prop_oneof![
        Just(PartnerReq::Ping),
        Just(PartnerReq::Health),
        Just(PartnerReq::KeyChain),
        Just(PartnerReq::Forbidden),
    ];
    let end = prop_oneof![
        3 => Just(PartnerEnd::Redeem),
        1 => Just(PartnerEnd::Fault(Fault::None)),
        1 => proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|g| PartnerEnd::Fault(Fault::Garbage(g))),
        1 => Just(PartnerEnd::Fault(Fault::Oversized)),
        1 => Just(PartnerEnd::Fault(Fault::BadCrc)),
        1 => Just(PartnerEnd::Fault(Fault::UnknownType)),
        1 => Just(PartnerEnd::Fault(Fault::Version2)),
        1 => Just(PartnerEnd::Fault(Fault::BadPayload)),
        1 => (1usize..10_000).prop_map(|n| PartnerEnd::Fault(Fault::CutShort(n))),
    ];
    (
        proptest::collection::vec(req, 0..6),
        end,
        0usize..3,
        proptest::collection::vec(0.0f64..1.0, 0..8),
        proptest::collection::vec(0u16..400, 9),
    )
        .prop_map(|(before, end, after, cuts, pauses)| PartnerStream {
            before,
            end,
            after,
            cuts,
            pauses,
        })
}

/// Two fresh tokens for the partner, minted over the protocol.
async fn mint_two(s: &Server) -> Result<(String, String), TestCaseError> {
    let mut bytes = hello(&s.gateway);
    for id in [2, 3] {
        let m = Message::Mint {
            partner_id: "demo-lender".into(),
            subject: "cust-p".into(),
            purpose: "credit_check".into(),
            fields: vec![
                ("iban".into(), protocol::MaskOp::Partial),
                ("name".into(), protocol::MaskOp::Redact),
            ],
            ttl_secs: 300,
        };
        bytes.extend(protocol::encode_frame(id, &m, 0).expect("frame"));
    }
    let out = exchange(s, &bytes, &[], &[]).await?;
    let mut tokens = BTreeMap::new();
    for (id, m) in answers(&out)? {
        if let Message::Minted { token, .. } = m {
            tokens.insert(id, token);
        }
    }
    match (tokens.remove(&2), tokens.remove(&3)) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(TestCaseError::fail("two tokens minted")),
    }
}

/// The masked data a token of `mint_two` reveals.
fn is_the_data(m: &Message) -> bool {
    matches!(m, Message::Data { subject, fields, .. }
        if subject == "cust-p"
            && fields.iter().any(|(k, v)| k == "iban" && v.ends_with("5555") && v.contains('*')))
}

async fn run_partner_case(s: &Server, st: &PartnerStream) -> Result<(), TestCaseError> {
    let (token, second) = mint_two(s).await?;
    let mut bytes = hello(&s.partner);
    let mut expected = Vec::new();
    for (i, req) in st.before.iter().enumerate() {
        let id = 100 + i as u32;
        let m = match req {
            PartnerReq::Ping => Message::Ping,
            PartnerReq::Health => Message::Health,
            PartnerReq::KeyChain => Message::KeyChain,
            PartnerReq::Forbidden => Message::Append {
                subject: "cust-p".into(),
                fields: vec![("name".into(), "x".into())],
            },
        };
        bytes.extend(protocol::encode_frame(id, &m, 0).expect("frame"));
        expected.push((id, *req));
    }
    let (end_bytes, fault_code) = match &st.end {
        PartnerEnd::Redeem => {
            let m = Message::Redeem {
                token: token.clone(),
            };
            (protocol::encode_frame(50, &m, 0).expect("frame"), None)
        }
        PartnerEnd::Fault(f) => fault_bytes(f),
    };
    bytes.extend_from_slice(&end_bytes);
    let cut_short = matches!(st.end, PartnerEnd::Fault(Fault::None | Fault::CutShort(_)));
    if !cut_short {
        for i in 0..st.after {
            let m = if i + 1 == st.after {
                Message::Redeem {
                    token: second.clone(),
                }
            } else {
                Message::Ping
            };
            bytes.extend(protocol::encode_frame(9_000 + i as u32, &m, 0).expect("frame"));
        }
    }
    let out = exchange(s, &bytes, &st.cuts, &st.pauses).await?;
    let mut got = answers(&out)?.into_iter();
    prop_assert!(
        matches!(got.next(), Some((1, Message::HelloOk { .. }))),
        "Hello first"
    );
    // A partner's requests are answered one at a time, in order.
    for (id, req) in expected {
        let a = got.next();
        let ok = match (&a, req) {
            (Some((i, m)), r) if *i == id => match (m, r) {
                (Message::Pong, PartnerReq::Ping) => true,
                (Message::HealthInfo { status, .. }, PartnerReq::Health) => status == "ok",
                (Message::KeyChainInfo { .. }, PartnerReq::KeyChain) => true,
                (Message::Error { code, .. }, PartnerReq::Forbidden) => {
                    *code == ErrorCode::Forbidden
                }
                _ => false,
            },
            _ => false,
        };
        prop_assert!(ok, "request {id} ({req:?}) answered in order: {a:?}");
    }
    match (&st.end, fault_code) {
        (PartnerEnd::Redeem, _) => {
            let a = got.next();
            prop_assert!(
                matches!(&a, Some((50, m)) if is_the_data(m)),
                "the redemption's data: {a:?}"
            );
        }
        (_, Some((id, code))) => {
            let a = got.next();
            prop_assert!(
                matches!(&a, Some((i, Message::Error { code: c, .. })) if *i == id && *c == code),
                "the fault answered with request id {id} and {code:?}: {a:?}"
            );
        }
        (_, None) => {}
    }
    let rest: Vec<_> = got.collect();
    prop_assert!(rest.is_empty(), "nothing answered after the end: {rest:?}");
    // The token of the stream is spent only if it was redeemed; the second
    // one, sent after the end, never is.
    let spent = |t: &str| {
        let t = t.to_string();
        async move {
            let mut b = hello(&s.partner);
            b.extend(protocol::encode_frame(2, &Message::Redeem { token: t }, 0).expect("frame"));
            let out = exchange(s, &b, &[], &[]).await?;
            let last = answers(&out)?.pop();
            match last {
                Some((2, m)) if is_the_data(&m) => Ok(false),
                Some((
                    2,
                    Message::Error {
                        code: ErrorCode::TokenSpent,
                        ..
                    },
                )) => Ok(true),
                other => Err(TestCaseError::fail(format!("a redemption: {other:?}"))),
            }
        }
    };
    let redeemed = matches!(st.end, PartnerEnd::Redeem);
    prop_assert_eq!(spent(&token).await?, redeemed, "the stream's token");
    prop_assert!(!spent(&second).await?, "the token sent after the end");
    Ok(())
}

/// An auditor's request: `Head`, or `Entries`/`Proof`/`Heads` at a seq
/// picked from around the log's ends and beyond.
#[derive(Debug, Clone, Copy)]
enum AuditReq {
    Head,
    Entries(Seq, u32),
    Proof(Seq),
    Heads(Seq, u32),
}

#[derive(Debug, Clone, Copy)]
enum Seq {
    Zero,
    /// Counted back from the log's length (1 = the last entry).
    FromEnd(u64),
    Max,
    Any(u64),
}

fn audit_stream() -> impl Strategy<Value = (Vec<AuditReq>, Vec<f64>, Vec<u16>)> {
    let seq = prop_oneof![
        Just(Seq::Zero),
        (0u64..4).prop_map(Seq::FromEnd),
        Just(Seq::Max),
        any::<u64>().prop_map(Seq::Any),
    ];
    let max = prop_oneof![
        Just(0u32),
        Just(1),
        Just(7),
        Just(1_000),
        Just(1_001),
        Just(10_000),
        Just(10_001),
        Just(u32::MAX)
    ];
    let req = prop_oneof![
        1 => Just(AuditReq::Head),
        3 => (seq.clone(), max.clone()).prop_map(|(s, m)| AuditReq::Entries(s, m)),
        2 => seq.clone().prop_map(AuditReq::Proof),
        2 => (seq, max).prop_map(|(s, m)| AuditReq::Heads(s, m)),
    ];
    (
        proptest::collection::vec(req, 1..12),
        proptest::collection::vec(0.0f64..1.0, 0..8),
        proptest::collection::vec(0u16..300, 9),
    )
}

/// Every frame in `bytes` with its LAST flag.
fn flagged(mut bytes: &[u8]) -> Result<Vec<(u32, Message, bool)>, TestCaseError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Ok(Some((f, used))) = protocol::frame::decode(bytes) else {
            return Err(TestCaseError::fail(
                "the server wrote bytes that are not a frame",
            ));
        };
        let m = Message::from_frame(&f)
            .map_err(|e| TestCaseError::fail(format!("an answer does not decode: {e}")))?;
        out.push((f.request_id, m, f.is_last()));
        bytes = &bytes[used..];
    }
    Ok(out)
}

async fn run_audit_case(
    s: &Server,
    (reqs, cuts, pauses): &(Vec<AuditReq>, Vec<f64>, Vec<u16>),
) -> Result<(), TestCaseError> {
    let key = s.vault.public_key();
    let len = s.vault.durable_len();
    let at = |q: Seq| match q {
        Seq::Zero => 0,
        Seq::FromEnd(n) => len.saturating_sub(n),
        Seq::Max => u64::MAX,
        Seq::Any(n) => n,
    };
    let mut bytes = hello(&s.auditor);
    for (i, r) in reqs.iter().enumerate() {
        let m = match *r {
            AuditReq::Head => Message::Head,
            AuditReq::Entries(q, max) => Message::Entries {
                from_seq: at(q),
                max,
            },
            AuditReq::Proof(q) => Message::Proof { seq: at(q) },
            AuditReq::Heads(q, max) => Message::Heads {
                from_seq: at(q),
                max,
            },
        };
        bytes.extend(protocol::encode_frame(100 + i as u32, &m, 0).expect("frame"));
    }
    let out = exchange(s, &bytes, cuts, pauses).await?;
    let mut by_id: BTreeMap<u32, Vec<(Message, bool)>> = BTreeMap::new();
    for (id, m, last) in flagged(&out)? {
        by_id.entry(id).or_default().push((m, last));
    }
    prop_assert!(
        matches!(
            by_id.remove(&1).as_deref(),
            Some([(Message::HelloOk { .. }, _)])
        ),
        "Hello first"
    );
    for (i, r) in reqs.iter().enumerate() {
        let id = 100 + i as u32;
        let got = by_id.remove(&id).unwrap_or_default();
        match (*r, got.as_slice()) {
            (AuditReq::Head, [(Message::HeadInfo { entries, .. }, _)]) => {
                prop_assert!(
                    *entries >= len,
                    "head of {} entries, {} durable",
                    entries,
                    len
                );
            }
            (AuditReq::Proof(q), [(Message::ProofInfo { receipt }, _)]) => {
                let r = Receipt::decode(receipt)
                    .map_err(|e| TestCaseError::fail(format!("proof {id}: {e}")))?;
                prop_assert_eq!(r.seq, at(q));
                r.verify(&key)
                    .map_err(|e| TestCaseError::fail(format!("proof {id}: {e}")))?;
            }
            (AuditReq::Proof(q), [(Message::Error { code, .. }, _)]) => {
                prop_assert_eq!(*code, ErrorCode::NotFound, "proof of {}", at(q));
                prop_assert!(at(q) >= len, "no proof of {} in a log of {}", at(q), len);
            }
            (AuditReq::Heads(q, max), [(Message::HeadList { heads }, _)]) => {
                let from = at(q);
                prop_assert!(
                    heads.len() <= max.min(1_000) as usize,
                    "{} heads, max {}",
                    heads.len(),
                    max
                );
                let mut next: Option<u64> = None;
                for h in heads {
                    let h = storage::SignedHead::decode(h)
                        .map_err(|e| TestCaseError::fail(format!("heads {id}: {e}")))?;
                    prop_assert!(h.verify(&key), "heads {}: a head that verifies", id);
                    match next {
                        None => prop_assert!(
                            h.group_first_seq <= from && from <= h.last_seq,
                            "the first head holds {}: {:?}",
                            from,
                            h
                        ),
                        Some(n) => prop_assert_eq!(h.group_first_seq, n, "heads in order"),
                    }
                    next = Some(h.last_seq + 1);
                }
                if from >= len {
                    prop_assert!(heads.is_empty(), "no head past the end ({})", from);
                } else if max > 0 {
                    prop_assert!(!heads.is_empty(), "heads from {} of {}", from, len);
                }
            }
            (AuditReq::Entries(q, max), frames) => {
                // Batches, the last flagged LAST; or one error.
                let mut count = 0u64;
                for (k, (m, last)) in frames.iter().enumerate() {
                    let end = k + 1 == frames.len();
                    match m {
                        Message::EntryBatch { entries } => {
                            prop_assert_eq!(*last, end, "LAST on the last batch only");
                            for e in entries {
                                let seq = storage::entry::EntryRef::decode(e)
                                    .map_err(|e| TestCaseError::fail(format!("entry: {e}")))?
                                    .seq;
                                prop_assert_eq!(seq, at(q) + count, "entries in order");
                                count += 1;
                            }
                        }
                        Message::Error { .. } => prop_assert!(end, "an error ends the stream"),
                        other => {
                            return Err(TestCaseError::fail(format!("entries {id}: {other:?}")))
                        }
                    }
                }
                prop_assert!(!frames.is_empty(), "entries {} answered", id);
                prop_assert!(
                    count <= u64::from(max.min(10_000)),
                    "{} entries, max {}",
                    count,
                    max
                );
                if max > 0
                    && at(q) < len
                    && frames
                        .iter()
                        .all(|(m, _)| !matches!(m, Message::Error { .. }))
                {
                    prop_assert!(count >= 1, "entries from {} of {}", at(q), len);
                }
            }
            (_, other) => return Err(TestCaseError::fail(format!("{r:?}: {other:?}"))),
        }
    }
    prop_assert!(by_id.is_empty(), "answers to no request: {:?}", by_id);
    Ok(())
}

#[test]
fn random_auditor_streams_read_the_log_within_their_bounds() {
    let rt = runtime();
    let s = rt.block_on(async {
        let s = start().await;
        for i in 0..40 {
            let m = storage::Append::record(format!("a{}", i % 7), b"{}".to_vec());
            s.vault.append(m).await.expect("append");
        }
        s
    });
    check_cases(64, audit_stream(), |st| {
        rt.block_on(run_audit_case(&s, &st))
    });
}

/// A runtime of two workers, as `vaultd` has on this machine kind.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Checks `cases` inputs of `strategy` (`PROPTEST_CASES=N` runs N),
/// failing with the smallest failing input it finds, or if anything in
/// the process panicked meanwhile (the server's tasks included).
fn check_cases<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let panics = panics();
    let mut runner = TestRunner::new(Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{e}");
    }
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a panic in the server");
}

/// Panics anywhere in the process (the server's tasks included), counted
/// from the first call on.
fn panics() -> &'static AtomicUsize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            hook(info);
        }));
    });
    &PANICS
}

#[test]
fn random_partner_streams_end_at_their_redeem_or_fault() {
    let rt = runtime();
    let s = rt.block_on(start());
    check_cases(64, partner_stream(), |st| {
        rt.block_on(run_partner_case(&s, &st))
    });
}

#[test]
fn random_streams_with_faults_are_answered_as_the_model_says() {
    let rt = runtime();
    let s = rt.block_on(start());
    // A case's subjects are its own, shrinking runs included.
    let cases = std::sync::atomic::AtomicU32::new(0);
    check_cases(256, stream(), |st| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        rt.block_on(run_case(&s, case, &st))
    });
    // The server still serves.
    let pong = rt.block_on(async {
        let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
        let mut b = hello(&s.writer);
        b.extend(protocol::encode_frame(2, &Message::Ping, 0).expect("frame"));
        tcp.write_all(&b).await.expect("write");
        tcp.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.expect("read");
        answers(&out).expect("frames")
    });
    assert!(matches!(pong.last(), Some((2, Message::Pong))), "{pong:?}");
}
