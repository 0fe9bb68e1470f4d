//! The protocol server over real TCP on a port the OS chose: authentication,
//! roles, pipelined appends with receipts the client checks, auditor reads,
//! hostile input (garbage, oversized lengths, idle clients), and behind a
//! TCP proxy, the client its PROXY protocol header names.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{ErrorCode, FrameCodec, Message, Record};
use server::serve::ServeConfig;
use storage::Receipt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

mod common;

use common::{start, Server};

type Conn = Framed<TcpStream, FrameCodec>;

async fn connect(s: &Server, key: &str) -> (Conn, Message) {
    let mut conn = say_hello(s.addr, key).await;
    let reply = recv(&mut conn).await.expect("a reply to Hello").1;
    (conn, reply)
}

/// A connection that has sent its `Hello`, its answer not read yet.
async fn say_hello(addr: std::net::SocketAddr, key: &str) -> Conn {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut conn = Framed::new(tcp, FrameCodec::new());
    let hello = Message::Hello {
        api_key: key.into(),
        client: "test".into(),
    };
    conn.send(hello.to_frame(1, 0).expect("frame"))
        .await
        .expect("send");
    conn
}

async fn recv(conn: &mut Conn) -> Option<(u32, Message, bool)> {
    let f = conn.next().await?.ok()?;
    let m = Message::from_frame(&f).expect("server frames decode");
    Some((f.request_id, m, f.is_last()))
}

async fn request(conn: &mut Conn, id: u32, m: &Message) -> Message {
    conn.send(m.to_frame(id, 0).expect("frame"))
        .await
        .expect("send");
    let (rid, reply, _) = recv(conn).await.expect("reply");
    assert_eq!(rid, id);
    reply
}

fn code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn hello_authenticates_with_the_role_of_the_key() {
    let s = start(ServeConfig::default()).await;
    let (_, reply) = connect(&s, &s.writer).await;
    assert!(
        matches!(reply, Message::HelloOk { ref role, .. } if role == "writer"),
        "{reply:?}"
    );
    let (mut conn, reply) = connect(&s, "fvk_not-a-key").await;
    assert_eq!(code(&reply), Some(ErrorCode::Unauthenticated));
    // Its message says what was wrong: the key, not the frame.
    let said = |m: &Message| match m {
        Message::Error { message, .. } => message.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        said(&reply).contains("not one of the vault's live credentials"),
        "{reply:?}"
    );
    assert!(
        recv(&mut conn).await.is_none(),
        "the server closes after a failed Hello"
    );
    // A first frame other than Hello is refused the same way.
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    let mut conn = Framed::new(tcp, FrameCodec::new());
    let reply = request(&mut conn, 3, &Message::Ping).await;
    assert_eq!(code(&reply), Some(ErrorCode::Unauthenticated));
    assert!(said(&reply).contains("must be Hello"), "{reply:?}");
}

#[tokio::test]
async fn pipelined_appends_get_receipts_that_verify() {
    let s = start(ServeConfig::default()).await;
    let key = s.vault.public_key();
    let (mut conn, _) = connect(&s, &s.writer).await;
    for id in 10..60u32 {
        let m = Message::Append {
            subject: format!("cust-{}", id % 7),
            fields: vec![
                ("name".into(), format!("Person {id}")),
                ("iban".into(), "GB33BUKB20201555555555".into()),
            ],
        };
        conn.send(m.to_frame(id, 0).expect("frame"))
            .await
            .expect("send");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 10..60 {
        let (id, reply, _) = recv(&mut conn).await.expect("reply");
        let Message::Receipt { receipt } = reply else {
            panic!("request {id}: {reply:?}");
        };
        let r = Receipt::decode(&receipt).expect("receipt decodes");
        r.verify(&key)
            .expect("receipt verifies with the public key");
        assert!(seen.insert(id), "request {id} answered twice");
    }
    assert_eq!(seen.len(), 50);
    let rec = s
        .vault
        .latest_record("cust-3")
        .expect("read")
        .expect("present");
    let v: serde_json::Value = serde_json::from_slice(&rec.plaintext).expect("json");
    assert_eq!(v["iban"], "GB33BUKB20201555555555");

    let batch = Message::AppendBatch {
        items: (0..5)
            .map(|i| Record {
                subject: format!("b-{i}"),
                fields: vec![("n".into(), i.to_string())],
            })
            .collect(),
    };
    let Message::Receipts { receipts } = request(&mut conn, 99, &batch).await else {
        panic!("no receipts");
    };
    assert_eq!(receipts.len(), 5);
    // A record naming a field twice is refused, and nothing is written.
    let dup = Message::Append {
        subject: "c".into(),
        fields: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
    };
    assert_eq!(
        code(&request(&mut conn, 100, &dup).await),
        Some(ErrorCode::Invalid)
    );
    let bad_subject = Message::Append {
        subject: "has space".into(),
        fields: vec![],
    };
    assert_eq!(
        code(&request(&mut conn, 101, &bad_subject).await),
        Some(ErrorCode::Invalid)
    );
}

/// Appends that arrive in one write go to the engine together: each is
/// still answered on its own, a refused one refuses no other, and their
/// order holds.
#[tokio::test]
async fn appends_read_together_are_each_answered_on_their_own() {
    for max_in_flight in [3, 64] {
        let s = start(ServeConfig {
            max_in_flight,
            ..ServeConfig::default()
        })
        .await;
        let (conn, _) = connect(&s, &s.writer).await;
        let mut tcp = conn.into_inner();
        let append = |subject: &str, fields: &[(&str, &str)]| Message::Append {
            subject: subject.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let burst = [
            (1, append("cust-1", &[("n", "1")])),
            (2, append("has space", &[("n", "2")])),
            (3, append("cust-1", &[("a", "1"), ("a", "2")])),
            (4, append("cust-1", &[("n", "4")])),
            (5, Message::Ping),
            (6, append("cust-2", &[("n", "6")])),
            (7, append("cust-2", &[("n", "7")])),
            (8, append("cust-3", &[("n", "8")])),
            (9, append("cust-3", &[("n", "9")])),
        ];
        let mut bytes = Vec::new();
        for (id, m) in &burst {
            bytes.extend(protocol::encode_frame(*id, m, 0).expect("frame"));
        }
        tcp.write_all(&bytes).await.expect("write");
        let mut conn = Framed::new(tcp, FrameCodec::new());
        let mut answers = std::collections::BTreeMap::new();
        while answers.len() < burst.len() {
            let (id, reply, _) = recv(&mut conn).await.expect("reply");
            assert!(answers.insert(id, reply).is_none(), "{id} answered twice");
        }
        let seq = |id: u32| match &answers[&id] {
            Message::Receipt { receipt } => Receipt::decode(receipt).expect("receipt").seq,
            other => panic!("request {id}: {other:?}"),
        };
        assert!(seq(1) < seq(4), "in the order sent");
        assert!(seq(6) < seq(7) && seq(8) < seq(9), "in the order sent");
        assert_eq!(code(&answers[&2]), Some(ErrorCode::Invalid));
        assert_eq!(code(&answers[&3]), Some(ErrorCode::Invalid));
        assert_eq!(answers[&5], Message::Pong);
        for (subject, n) in [("cust-1", "4"), ("cust-2", "7"), ("cust-3", "9")] {
            let rec = s
                .vault
                .latest_record(subject)
                .expect("read")
                .expect("present");
            let v: serde_json::Value = serde_json::from_slice(&rec.plaintext).expect("json");
            assert_eq!(v["n"], n, "{subject}");
        }
    }
}

#[tokio::test]
async fn the_in_flight_limit_holds_back_reading_the_next_request() {
    // One request in flight: the ping behind a durable append is not even
    // read before the append's receipt is out, so the answers keep order.
    let s = start(ServeConfig {
        max_in_flight: 1,
        ..ServeConfig::default()
    })
    .await;
    let (mut conn, _) = connect(&s, &s.writer).await;
    for round in 0..5u32 {
        let append = Message::Append {
            subject: "cust-1".into(),
            fields: vec![("n".into(), round.to_string())],
        };
        conn.feed(append.to_frame(2 * round + 10, 0).expect("frame"))
            .await
            .expect("feed");
        conn.feed(Message::Ping.to_frame(2 * round + 11, 0).expect("frame"))
            .await
            .expect("feed");
        SinkExt::<protocol::Frame>::flush(&mut conn)
            .await
            .expect("flush");
        let (first, reply, _) = recv(&mut conn).await.expect("reply");
        assert_eq!(first, 2 * round + 10, "{reply:?}");
        assert!(matches!(reply, Message::Receipt { .. }), "{reply:?}");
        let (second, reply, _) = recv(&mut conn).await.expect("reply");
        assert_eq!(second, 2 * round + 11);
        assert_eq!(reply, Message::Pong);
    }
}

#[tokio::test]
async fn requests_read_before_the_client_stops_sending_are_all_answered() {
    let s = start(ServeConfig::default()).await;
    let last_seq = || s.vault.head().map(|h| h.last_seq).expect("a head");
    let before = last_seq();
    let (conn, _) = connect(&s, &s.writer).await;
    let mut tcp = conn.into_inner();
    let mut bytes = Vec::new();
    for id in 1..=40u32 {
        let m = Message::Append {
            subject: format!("cust-{}", id % 3),
            fields: vec![("n".into(), id.to_string())],
        };
        bytes.extend(protocol::encode_frame(id, &m, 0).expect("frame"));
    }
    tcp.write_all(&bytes).await.expect("write");
    // The write half ends: the server reads end-of-stream while appends
    // are still in flight, and answers every one before closing.
    tcp.shutdown().await.expect("shutdown");
    let mut conn = Framed::new(tcp, FrameCodec::new());
    let mut answered = std::collections::HashSet::new();
    while let Some((id, reply, _)) = recv(&mut conn).await {
        assert!(matches!(reply, Message::Receipt { .. }), "{id}: {reply:?}");
        assert!(answered.insert(id), "request {id} answered twice");
    }
    assert_eq!(answered.len(), 40);
    // 40 records, and an entry for each of the 3 subjects' new data keys.
    assert_eq!(last_seq() - before, 43);
}

#[tokio::test]
async fn roles_are_enforced_per_message() {
    let s = start(ServeConfig::default()).await;
    let (mut partner, _) = connect(&s, &s.partner).await;
    let append = Message::Append {
        subject: "x".into(),
        fields: vec![],
    };
    assert_eq!(
        code(&request(&mut partner, 2, &append).await),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(&request(&mut partner, 3, &Message::Head).await),
        Some(ErrorCode::Forbidden)
    );
    // Only the gateway (and admins) learn who holds a key, and a
    // partner's policy and consents.
    let context = Message::Context {
        key_hash: *blake3::hash(s.partner.as_bytes()).as_bytes(),
        subject: "x".into(),
    };
    assert_eq!(
        code(&request(&mut partner, 3, &context).await),
        Some(ErrorCode::Forbidden)
    );
    // The connection stays usable after a refusal.
    assert_eq!(
        request(&mut partner, 4, &Message::Ping).await,
        Message::Pong
    );
    let (mut writer, _) = connect(&s, &s.writer).await;
    assert_eq!(
        code(
            &request(
                &mut writer,
                2,
                &Message::Entries {
                    from_seq: 0,
                    max: 10
                }
            )
            .await
        ),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(&request(&mut writer, 3, &context).await),
        Some(ErrorCode::Forbidden)
    );
    let heads = Message::Heads {
        from_seq: 0,
        max: 10,
    };
    assert_eq!(
        code(&request(&mut writer, 4, &heads).await),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        code(&request(&mut partner, 5, &heads).await),
        Some(ErrorCode::Forbidden)
    );
}

#[tokio::test]
async fn auditor_reads_head_entries_and_proofs() {
    let s = start(ServeConfig::default()).await;
    let (mut writer, _) = connect(&s, &s.writer).await;
    let append = Message::Append {
        subject: "a".into(),
        fields: vec![("k".into(), "v".into())],
    };
    let Message::Receipt { receipt } = request(&mut writer, 2, &append).await else {
        panic!("no receipt");
    };
    let appended = Receipt::decode(&receipt).expect("decodes");
    let (mut admin, _) = connect(&s, &s.admin).await;
    let Message::HeadInfo {
        public_key,
        entries,
        signed_head,
    } = request(&mut admin, 2, &Message::Head).await
    else {
        panic!("no head");
    };
    assert_eq!(public_key, s.vault.public_key().to_bytes());
    assert_eq!(entries, appended.seq + 1);
    let head = storage::SignedHead::decode(&signed_head).expect("head decodes");
    assert!(head.verify(&s.vault.public_key()));
    assert_eq!(head.last_seq, appended.seq);

    admin
        .send(
            Message::Entries {
                from_seq: 0,
                max: 1000,
            }
            .to_frame(3, 0)
            .expect("frame"),
        )
        .await
        .expect("send");
    let mut got = Vec::new();
    loop {
        let (id, m, last) = recv(&mut admin).await.expect("batch");
        assert_eq!(id, 3);
        let Message::EntryBatch { entries } = m else {
            panic!("{m:?}");
        };
        got.extend(entries);
        if last {
            break;
        }
    }
    assert_eq!(got.len() as u64, entries);
    assert_eq!(
        storage::entry::entry_hash(&got[appended.seq as usize]),
        appended.entry_hash
    );

    let Message::ProofInfo { receipt } =
        request(&mut admin, 4, &Message::Proof { seq: appended.seq }).await
    else {
        panic!("no proof");
    };
    let proof = Receipt::decode(&receipt).expect("decodes");
    proof.verify(&s.vault.public_key()).expect("proof verifies");
    assert_eq!(proof.entry_hash, appended.entry_hash);
    assert_eq!(
        code(&request(&mut admin, 5, &Message::Proof { seq: 1 << 40 }).await),
        Some(ErrorCode::NotFound)
    );

    // The groups' heads: the last is the head, each verifies.
    let Message::HeadList { heads } = request(
        &mut admin,
        6,
        &Message::Heads {
            from_seq: 0,
            max: u32::MAX,
        },
    )
    .await
    else {
        panic!("no heads");
    };
    let heads: Vec<storage::SignedHead> = heads
        .iter()
        .map(|h| storage::SignedHead::decode(h).expect("head decodes"))
        .collect();
    assert_eq!(heads.first().map(|h| h.group_first_seq), Some(0));
    assert_eq!(heads.last(), Some(&head));
    assert!(heads.iter().all(|h| h.verify(&s.vault.public_key())));
    assert_eq!(proof.head, head);
    let Message::HeadList { heads } = request(
        &mut admin,
        7,
        &Message::Heads {
            from_seq: 1 << 40,
            max: 10,
        },
    )
    .await
    else {
        panic!("no heads");
    };
    assert!(heads.is_empty());
}

/// Writes `Hello` with `key` (if any) and `bytes` in one write, then
/// reads what the server answers until it closes.
async fn raw_exchange(s: &Server, key: Option<&str>, bytes: &[u8]) -> Vec<u8> {
    let tcp = TcpStream::connect(s.addr).await.expect("connect");
    if let Some(key) = key {
        let mut hello = protocol::encode_frame(
            1,
            &Message::Hello {
                api_key: key.into(),
                client: "raw".into(),
            },
            0,
        )
        .expect("frame");
        hello.extend_from_slice(bytes);
        write_and_read_to_end(tcp, &hello).await
    } else {
        write_and_read_to_end(tcp, bytes).await
    }
}

/// Writes `bytes` on `tcp` and half-closes it, so that the server sees the
/// end of the stream after them; then reads what the server answers until
/// it closes.
async fn write_and_read_to_end(mut tcp: TcpStream, bytes: &[u8]) -> Vec<u8> {
    tcp.write_all(bytes).await.expect("write");
    tcp.shutdown().await.expect("shutdown");
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    out
}

fn frames(mut bytes: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while let Ok(Some((f, used))) = protocol::frame::decode(bytes) {
        out.push(Message::from_frame(&f).expect("decodes"));
        bytes = &bytes[used..];
    }
    out
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_a_typed_error_and_a_close() {
    let s = start(ServeConfig::default()).await;
    // Garbage before Hello, and after it (a partner's connection is
    // served by a path of its own). Past `Hello`, an HTTP request is
    // garbage like any other (before it, see the test of HTTP requests).
    for (key, garbage) in [
        (None, &b"SSH-2.0-OpenSSH_9.6\r\n"[..]),
        (
            Some(s.writer.as_str()),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            Some(s.partner.as_str()),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ] {
        let out = frames(&raw_exchange(&s, key, garbage).await);
        let last = out.last().expect("an answer");
        assert_eq!(code(last), Some(ErrorCode::Malformed), "{out:?}");
    }
    for key in [s.writer.as_str(), s.partner.as_str()] {
        // A header claiming 2^32-1 and max+1 bytes: refused from the
        // header alone.
        for len in [u32::MAX, protocol::MAX_FRAME_LEN as u32 + 1] {
            let mut header = protocol::encode_frame(9, &Message::Ping, 0).expect("frame");
            header[10..14].copy_from_slice(&len.to_be_bytes());
            let out = frames(&raw_exchange(&s, Some(key), &header[..protocol::HEADER_LEN]).await);
            assert_eq!(
                code(out.last().expect("an answer")),
                Some(ErrorCode::FrameTooLarge),
                "{out:?}"
            );
        }
        // A frame whose CRC does not match.
        let mut ping = protocol::encode_frame(9, &Message::Ping, 0).expect("frame");
        ping[14] ^= 1;
        let out = frames(&raw_exchange(&s, Some(key), &ping).await);
        assert_eq!(
            code(out.last().expect("an answer")),
            Some(ErrorCode::Malformed)
        );
    }
    // Before it is authenticated, a connection's frame (its `Hello`) may
    // not pass `MAX_HELLO_LEN`: refused from the header alone, with no
    // payload sent.
    let mut header = protocol::encode_frame(1, &Message::Ping, 0).expect("frame");
    let len = server::serve::MAX_HELLO_LEN as u32 + 1;
    header[10..14].copy_from_slice(&len.to_be_bytes());
    let out = frames(&raw_exchange(&s, None, &header[..protocol::HEADER_LEN]).await);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(code(&out[0]), Some(ErrorCode::FrameTooLarge), "{out:?}");
    // Once it is, frames up to the maximum are read again: a record of
    // 40 KiB (records stop at 48) is appended, its request sent with the
    // `Hello`.
    let big = Message::Append {
        subject: "big".into(),
        fields: vec![("v".into(), "x".repeat(40 * 1024))],
    };
    let big = protocol::encode_frame(2, &big, 0).expect("frame");
    let out = frames(&raw_exchange(&s, Some(&s.writer), &big).await);
    assert!(
        matches!(out.last(), Some(Message::Receipt { .. })),
        "{out:?}"
    );
    // Every truncation of an append, then EOF: no reply but a close, and the
    // server keeps serving.
    let append = protocol::encode_frame(
        5,
        &Message::Append {
            subject: "t".into(),
            fields: vec![("a".into(), "b".into())],
        },
        0,
    )
    .expect("frame");
    for n in 0..append.len() {
        let out = frames(&raw_exchange(&s, Some(&s.writer), &append[..n]).await);
        assert!(
            out.iter().all(|m| !matches!(m, Message::Receipt { .. })),
            "prefix {n}"
        );
    }
    let (mut conn, _) = connect(&s, &s.writer).await;
    assert_eq!(request(&mut conn, 2, &Message::Ping).await, Message::Pong);
}

/// Request id 0 is the server's, for the errors it cannot tie to a
/// request: a request numbered 0, its `Hello` included, is refused as
/// malformed under id 0, and the connection closed, on every role's
/// path. Nothing it asked is done.
#[tokio::test]
async fn a_request_numbered_zero_is_refused_and_the_connection_closed() {
    let s = start(ServeConfig::default()).await;
    let ids = |mut bytes: &[u8]| {
        let mut out = Vec::new();
        while let Ok(Some((f, used))) = protocol::frame::decode(bytes) {
            out.push((f.request_id, Message::from_frame(&f).expect("decodes")));
            bytes = &bytes[used..];
        }
        out
    };
    let refused = |out: &[(u32, Message)]| matches!(out, [.., (0, m)] if code(m) == Some(ErrorCode::Malformed));
    let hello = Message::Hello {
        api_key: s.writer.clone(),
        client: "zero".into(),
    };
    let ping = protocol::encode_frame(3, &Message::Ping, 0).expect("frame");
    let mut bytes = protocol::encode_frame(0, &hello, 0).expect("frame");
    bytes.extend_from_slice(&ping);
    let out = ids(&raw_exchange(&s, None, &bytes).await);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(refused(&out), "{out:?}");
    let before = s.vault.head().map(|h| h.last_seq).expect("a head");
    let append = Message::Append {
        subject: "cust-0".into(),
        fields: vec![("n".into(), "0".into())],
    };
    for (key, m) in [(&s.writer, &append), (&s.partner, &Message::Ping)] {
        let mut bytes = protocol::encode_frame(0, m, 0).expect("frame");
        bytes.extend_from_slice(&ping);
        let out = ids(&raw_exchange(&s, Some(key), &bytes).await);
        // HelloOk (request 1), then the refusal, and nothing after it.
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], (1, Message::HelloOk { .. })), "{out:?}");
        assert!(refused(&out), "{out:?}");
    }
    let after = s.vault.head().map(|h| h.last_seq).expect("a head");
    assert_eq!(after, before, "nothing appended");
}

/// A response type sent by a client decodes, but the client is out of
/// step: it is refused as malformed under its own request id and the
/// connection closed (protocol.md, rule 8), on the pipelined path and on
/// a partner's; nothing behind it is read.
#[tokio::test]
async fn a_response_type_sent_as_a_request_is_malformed_and_closes() {
    let s = start(ServeConfig::default()).await;
    let ping = protocol::encode_frame(4, &Message::Ping, 0).expect("frame");
    for key in [&s.writer, &s.partner, &s.auditor] {
        let mut bytes = protocol::encode_frame(2, &Message::Ping, 0).expect("frame");
        bytes.extend_from_slice(&protocol::encode_frame(3, &Message::Pong, 0).expect("frame"));
        bytes.extend_from_slice(&ping);
        let mut answer: &[u8] = &raw_exchange(&s, Some(key), &bytes).await;
        let mut out = Vec::new();
        while let Ok(Some((f, used))) = protocol::frame::decode(answer) {
            out.push((f.request_id, Message::from_frame(&f).expect("decodes")));
            answer = &answer[used..];
        }
        // HelloOk, the first ping's Pong, the refusal under the id of the
        // frame it refuses, and nothing after it.
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(out[0], (1, Message::HelloOk { .. })), "{out:?}");
        assert_eq!(out[1], (2, Message::Pong), "{out:?}");
        assert_eq!(out[2].0, 3, "{out:?}");
        assert_eq!(code(&out[2].1), Some(ErrorCode::Malformed), "{out:?}");
    }
}

/// A stopping server (SIGINT or SIGTERM to `vaultd`) reads no further
/// request: each connection answers what it has read, then says why it
/// closes (`unavailable` under request id 0) and closes, a writer's
/// pipelined connection and a partner's alike; one still before its
/// `Hello` is closed without a word; and `run` returns once they are
/// done. An append sent just before the stop is answered and durable, or
/// not answered and not done.
#[tokio::test]
async fn a_stopping_server_answers_what_it_read_then_says_why_it_closes() {
    let mut s = start(ServeConfig::default()).await;
    let (mut writer, _) = connect(&s, &s.writer).await;
    let (mut partner, _) = connect(&s, &s.partner).await;
    assert_eq!(request(&mut writer, 2, &Message::Ping).await, Message::Pong);
    assert_eq!(
        request(&mut partner, 2, &Message::Ping).await,
        Message::Pong
    );
    let mut silent = TcpStream::connect(s.addr).await.expect("connect");
    let before = s.vault.durable_len();
    let append = Message::Append {
        subject: "cust-stop".into(),
        fields: vec![("n".into(), "1".into())],
    };
    writer
        .send(append.to_frame(3, 0).expect("frame"))
        .await
        .expect("send");
    s.shut_down().await;
    let mut answered = false;
    for (who, conn) in [("writer", &mut writer), ("partner", &mut partner)] {
        let mut last = None;
        // A guard, not a measure: a server that kept the connection open
        // would hang the test.
        while let Some((id, m, _)) = tokio::time::timeout(Duration::from_secs(60), recv(conn))
            .await
            .unwrap_or_else(|_| panic!("{who}: still open after the stop"))
        {
            match (id, &m) {
                (3, Message::Receipt { .. }) => answered = true,
                (0, _) => assert_eq!(code(&m), Some(ErrorCode::Unavailable), "{who}: {m:?}"),
                _ => panic!("{who}: {id} {m:?}"),
            }
            last = Some(id);
        }
        assert_eq!(last, Some(0), "{who}: the reason is the last frame");
    }
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    let after = s.vault.durable_len();
    assert_eq!(
        after,
        before + u64::from(answered),
        "answered if and only if done"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_a_frame_is_closed() {
    let s = start(ServeConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServeConfig::default()
    })
    .await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    // Half a header, then silence: the server closes the connection.
    tcp.write_all(&[0x46, 0x56, 1]).await.expect("write");
    let mut buf = Vec::new();
    let n = tcp
        .read_to_end(&mut buf)
        .await
        .expect("closed by the server");
    assert_eq!(n, 0);
    // Authenticated but idle: closed too. (A server of its own, whose
    // handshake has the default time: a machine that stalls must not
    // close the connection before its `HelloOk`.)
    let s = start(ServeConfig {
        idle_timeout: Duration::from_millis(300),
        ..ServeConfig::default()
    })
    .await;
    let (mut conn, _) = connect(&s, &s.writer).await;
    assert!(recv(&mut conn).await.is_none());
}

async fn mint(s: &Server, partner: &str, subject: &str, ttl_secs: u32) -> String {
    let (mut gw, _) = connect(s, &s.gateway).await;
    let m = Message::Mint {
        partner_id: partner.into(),
        subject: subject.into(),
        purpose: "credit_check".into(),
        fields: vec![
            ("email".into(), protocol::MaskOp::Partial),
            ("iban".into(), protocol::MaskOp::Partial),
            ("name".into(), protocol::MaskOp::Redact),
            ("income".into(), protocol::MaskOp::Generalize),
        ],
        ttl_secs,
    };
    match request(&mut gw, 2, &m).await {
        Message::Minted { token, .. } => token,
        other => panic!("{other:?}"),
    }
}

async fn seed(s: &Server, subject: &str) {
    let (mut w, _) = connect(s, &s.writer).await;
    let append = Message::Append {
        subject: subject.into(),
        fields: vec![
            ("name".into(), "Jane Doe".into()),
            ("email".into(), "jane.doe@example.com".into()),
            ("iban".into(), "GB33BUKB20201555555555".into()),
            ("income".into(), "84000".into()),
            ("dob".into(), "1980-02-03".into()),
        ],
    };
    assert!(matches!(
        request(&mut w, 2, &append).await,
        Message::Receipt { .. }
    ));
}

async fn redeem(s: &Server, key: &str, token: &str) -> Message {
    let (mut p, _) = connect(s, key).await;
    let reply = request(
        &mut p,
        7,
        &Message::Redeem {
            token: token.into(),
        },
    )
    .await;
    assert!(
        recv(&mut p).await.is_none(),
        "the server closes after a redemption"
    );
    reply
}

/// `ttl_secs` 0 is the default lifetime, 5 minutes: the expiry is 300 s
/// after the server's clock, read between the request and its answer.
#[tokio::test]
async fn a_mint_without_a_lifetime_gets_five_minutes() {
    let s = start(ServeConfig::default()).await;
    let (mut gw, _) = connect(&s, &s.gateway).await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
    };
    let m = Message::Mint {
        partner_id: "demo-lender".into(),
        subject: "cust-7".into(),
        purpose: "credit_check".into(),
        fields: vec![("email".into(), protocol::MaskOp::Partial)],
        ttl_secs: 0,
    };
    let asked = now_ms();
    let reply = request(&mut gw, 2, &m).await;
    let answered = now_ms();
    let Message::Minted { expires_at_ms, .. } = reply else {
        panic!("{reply:?}");
    };
    assert!(
        expires_at_ms >= asked + 300_000 && expires_at_ms <= answered + 300_000,
        "expires {} ms after the request",
        expires_at_ms.saturating_sub(asked)
    );
}

/// The throttle is on the redemption path: after five redemptions from
/// one peer refused for their token, the sixth waits at least 50 ms
/// before it is answered (a lower bound: a wait is never shorter), and
/// is refused as the others were.
#[tokio::test]
async fn a_peer_that_keeps_guessing_tokens_is_slowed_down() {
    let s = start(ServeConfig::default()).await;
    let guess = |i: u32| format!("fvt_{:064x}", i);
    for i in 0..5 {
        let reply = redeem(&s, &s.partner, &guess(i)).await;
        assert_eq!(code(&reply), Some(ErrorCode::TokenUnknown), "{reply:?}");
    }
    let started = std::time::Instant::now();
    let reply = redeem(&s, &s.partner, &guess(5)).await;
    let waited = started.elapsed();
    assert_eq!(code(&reply), Some(ErrorCode::TokenUnknown), "{reply:?}");
    assert!(
        waited >= Duration::from_millis(50),
        "answered after {waited:?}"
    );
    // Every guess is audited: an `access_denied` entry naming the partner,
    // the reason and the source, and the guess only by its hash.
    let guesses: Vec<serde_json::Value> = common::entries_of(&s.vault, storage::Kind::AccessDenied)
        .iter()
        .map(|(_, payload)| serde_json::from_slice(payload).expect("a JSON payload"))
        .collect();
    assert_eq!(guesses.len(), 6, "{guesses:?}");
    let mut hashes = std::collections::HashSet::new();
    for (i, g) in guesses.iter().enumerate() {
        assert_eq!(g["action"], "redeem", "{g}");
        assert_eq!(g["reason"], "token_unknown", "{g}");
        assert_eq!(g["partner_id"], "demo-lender", "{g}");
        assert_eq!(g["source_ip"], "127.0.0.1", "{g}");
        let hash = g["token_hash"].as_str().expect("token_hash");
        assert_eq!(hash, storage::api_key_hash(&guess(i as u32)), "{g}");
        assert!(!g.to_string().contains(&guess(i as u32)[4..]), "{g}");
        hashes.insert(hash.to_string());
    }
    assert_eq!(hashes.len(), 6, "one hash per guess");
}

/// Nine redemptions of guessed tokens from this peer, refused, then
/// `token`'s redemption sent as request 7 on a partner connection of its
/// own, which the server has read 50 ms later and holds for the 800 ms
/// the guesses earned (section 3 of protocol.md): that connection.
async fn redemption_waiting_its_turn(s: &Server, token: &str) -> Conn {
    let guess = |i: u32| format!("fvt_{:064x}", i);
    for i in 0..9 {
        let reply = redeem(s, &s.partner, &guess(i)).await;
        assert_eq!(code(&reply), Some(ErrorCode::TokenUnknown), "{reply:?}");
    }
    let (mut p, _) = connect(s, &s.partner).await;
    p.send(
        Message::Redeem {
            token: token.to_string(),
        }
        .to_frame(7, 0)
        .expect("frame"),
    )
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    p
}

/// A partner revoked while its redemption waits its turn (the throttle of
/// a peer that kept guessing) gets `unauthenticated`, and the token stays
/// unspent: revocation stops a partner's redemptions at once.
#[tokio::test]
async fn a_partner_revoked_while_its_redemption_waits_spends_no_token() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-7").await;
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let id = s
        .vault
        .credential_by_key_hash(&storage::api_key_hash(&s.partner))
        .expect("read")
        .expect("the partner's credential")
        .id;
    // Waiting 800 ms, far longer than the revocation below takes on a
    // machine that stalls for a while.
    let mut p = redemption_waiting_its_turn(&s, &token).await;
    s.vault.revoke_credential(&id).await.expect("revoked");
    let reply = recv(&mut p).await.expect("an answer");
    assert_eq!(
        code(&reply.1),
        Some(ErrorCode::Unauthenticated),
        "{reply:?}"
    );
    // The token is still there for the partner's new credential.
    let (_, key) = s
        .vault
        .create_credential("partner", "demo-lender")
        .await
        .expect("a new key");
    let reply = redeem(&s, &key, &token).await;
    assert!(matches!(reply, Message::Data { .. }), "{reply:?}");
}

/// A server that stops while a redemption waits out the brute-force
/// delay answers it `unavailable` at once, the token not looked at: a burn
/// that began as the shutdown's grace ended would have its answer cut off.
#[tokio::test]
async fn a_stop_ends_a_redemption_waiting_its_turn_with_its_token_unspent() {
    let mut s = start(ServeConfig::default()).await;
    seed(&s, "cust-7").await;
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let mut p = redemption_waiting_its_turn(&s, &token).await;
    s.shut_down().await;
    let reply = recv(&mut p).await.expect("an answer");
    assert_eq!(reply.0, 7, "{reply:?}");
    assert_eq!(code(&reply.1), Some(ErrorCode::Unavailable), "{reply:?}");
    // Not spent: it redeems now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    s.vault
        .redeem(&token, "demo-lender", now, None)
        .await
        .expect("the token is still there");
}

#[tokio::test]
async fn a_token_reveals_one_masked_segment_once() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-7").await;
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    // A recognisable prefix, then 256 random bits in lowercase hex.
    let bits = token.strip_prefix("fvt_").expect("the fvt_ prefix");
    assert!(
        bits.len() == 64
            && bits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{token}"
    );
    let Message::Data {
        subject, fields, ..
    } = redeem(&s, &s.partner, &token).await
    else {
        panic!("no data");
    };
    assert_eq!(subject, "cust-7");
    assert_eq!(
        fields,
        vec![
            ("email".to_string(), "j***@example.com".to_string()),
            ("iban".to_string(), "******************5555".to_string()),
            ("name".to_string(), "[redacted]".to_string()),
            ("income".to_string(), "50000-99999".to_string()),
        ],
        "exactly the minted fields, masked, in order; dob is never sent"
    );
    assert_eq!(
        code(&redeem(&s, &s.partner, &token).await),
        Some(ErrorCode::TokenSpent)
    );
    assert_eq!(
        code(&redeem(&s, &s.partner, "fvt_0000").await),
        Some(ErrorCode::TokenUnknown)
    );
    // The token's secret never reaches the log: only its hash.
    let entries = s.vault.entries_from(0, 10_000).expect("entries");
    assert!(entries
        .iter()
        .all(|e| !e.windows(token.len()).any(|w| w == token.as_bytes())));
}

#[tokio::test]
async fn a_partner_s_pipelined_requests_are_answered_in_order_until_its_redeem() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-7").await;
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let requests = [
        Message::Ping,
        Message::Health,
        Message::Head,
        Message::Redeem { token },
        // After the redemption: never read.
        Message::Ping,
    ];
    let mut bytes = Vec::new();
    for (id, m) in (2..).zip(&requests) {
        bytes.extend(protocol::encode_frame(id, m, 0).expect("frame"));
    }
    let out = frames(&raw_exchange(&s, Some(&s.partner), &bytes).await);
    assert!(
        matches!(
            out.as_slice(),
            [
                Message::HelloOk { .. },
                Message::Pong,
                Message::HealthInfo { .. },
                Message::Error {
                    code: ErrorCode::Forbidden,
                    ..
                },
                Message::Data { .. },
            ]
        ),
        "{out:?}"
    );
    // A partner that waits for each answer before its next request is
    // answered as well (`connect` waits for `HelloOk`).
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    assert!(matches!(
        redeem(&s, &s.partner, &token).await,
        Message::Data { .. }
    ));
}

#[tokio::test]
async fn a_partner_that_sent_part_of_its_next_request_gets_hello_ok_first() {
    let s = start(ServeConfig::default()).await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    let mut bytes = protocol::encode_frame(
        1,
        &Message::Hello {
            api_key: s.partner.clone(),
            client: "raw".into(),
        },
        0,
    )
    .expect("frame");
    let ping = protocol::encode_frame(2, &Message::Ping, 0).expect("frame");
    let (head, rest) = ping.split_at(ping.len() / 2);
    bytes.extend_from_slice(head);
    tcp.write_all(&bytes).await.expect("write");
    // The rest of the Ping only once HelloOk is here: a server that held
    // HelloOk back for the whole Ping would close this idle connection.
    let mut conn = Framed::new(tcp, FrameCodec::new());
    assert!(matches!(
        recv(&mut conn).await,
        Some((1, Message::HelloOk { .. }, _))
    ));
    conn.get_mut().write_all(rest).await.expect("write");
    assert!(matches!(recv(&mut conn).await, Some((2, Message::Pong, _))));
}

#[tokio::test]
async fn a_token_is_bound_to_its_partner_and_refusals_are_audited() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-8").await;
    let token = mint(&s, "another-lender", "cust-8", 0).await;
    assert_eq!(
        code(&redeem(&s, &s.partner, &token).await),
        Some(ErrorCode::WrongPartner)
    );
    // Only partners redeem, and a gateway cannot mint beyond the maximum TTL.
    let (mut w, _) = connect(&s, &s.writer).await;
    assert_eq!(
        code(
            &request(
                &mut w,
                3,
                &Message::Redeem {
                    token: token.clone()
                }
            )
            .await
        ),
        Some(ErrorCode::Forbidden)
    );
    let (mut gw, _) = connect(&s, &s.gateway).await;
    let long = Message::Mint {
        partner_id: "demo-lender".into(),
        subject: "cust-8".into(),
        purpose: "p".into(),
        fields: vec![("name".into(), protocol::MaskOp::Reveal)],
        ttl_secs: 86_400,
    };
    assert_eq!(
        code(&request(&mut gw, 4, &long).await),
        Some(ErrorCode::Invalid)
    );
    let denials = common::entries_of(&s.vault, storage::Kind::AccessDenied).len();
    assert_eq!(denials, 1, "the wrong-partner refusal is in the log");
}

#[tokio::test]
async fn concurrent_redemptions_of_one_token_deliver_once() {
    let s = Arc::new(start(ServeConfig::default()).await);
    seed(&s, "cust-9").await;
    let token = mint(&s, "demo-lender", "cust-9", 0).await;
    let mut tasks = Vec::new();
    for _ in 0..120 {
        let s = s.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(
            async move { redeem(&s, &s.partner, &token).await },
        ));
    }
    let mut data = 0;
    let mut spent = 0;
    for t in tasks {
        match t.await.expect("task") {
            Message::Data { .. } => data += 1,
            m if code(&m) == Some(ErrorCode::TokenSpent) => spent += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((data, spent), (1, 119));
}

/// `n` `Ping` frames in a row.
fn pings(n: usize) -> Vec<u8> {
    repeated(
        &protocol::encode_frame(2, &Message::Ping, 0).expect("frame"),
        n,
    )
}

/// `frame`, `n` times in a row.
fn repeated(frame: &[u8], n: usize) -> Vec<u8> {
    frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * n)
        .collect()
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_hold_up_others() {
    let s = start(ServeConfig::default()).await;
    let (conn, _) = connect(&s, &s.writer).await;
    let mut tcp = conn.into_inner();
    // 20,000 pings (~360 KB) and never a read: the server stops reading
    // once its in-flight limit and the socket buffers are full.
    let burst = pings(20_000);
    let writer = tokio::spawn(async move {
        let _ = tcp.write_all(&burst).await;
        tcp
    });
    // Meanwhile everyone else is served.
    for i in 0..20u32 {
        let (mut other, _) = connect(&s, &s.writer).await;
        assert_eq!(
            request(&mut other, i + 1, &Message::Ping).await,
            Message::Pong
        );
    }
    writer.abort();
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let s = start(ServeConfig {
        max_connections: 2,
        ..ServeConfig::default()
    })
    .await;
    let (first, _) = connect(&s, &s.writer).await;
    let (_second, _) = connect(&s, &s.writer).await;
    let third = tokio::spawn({
        let (addr, key) = (s.addr, s.writer.clone());
        async move { recv(&mut say_hello(addr, &key).await).await.map(|r| r.1) }
    });
    // Not served while two connections are open...
    tokio::task::yield_now().await;
    assert!(!third.is_finished());
    // ...and served as soon as one closes.
    drop(first);
    let reply = third.await.expect("task");
    assert!(matches!(reply, Some(Message::HelloOk { .. })), "{reply:?}");
}

/// One credential holds at most `max_connections_per_credential`
/// connections: one more is refused `unavailable` at once, naming the
/// limit, without waiting for a slot; another credential still gets in,
/// and the credential gets in again once one of its connections closes.
#[tokio::test]
async fn one_credential_holds_at_most_its_share_of_the_connections() {
    let s = start(ServeConfig {
        max_connections_per_credential: 2,
        ..ServeConfig::default()
    })
    .await;
    let before = server::metrics::turned_away_count("protocol", "credential_limit");
    let (first, _) = connect(&s, &s.writer).await;
    let (_second, _) = connect(&s, &s.writer).await;
    let reply = recv(&mut say_hello(s.addr, &s.writer).await)
        .await
        .map(|r| r.1);
    assert!(
        matches!(&reply, Some(Message::Error { code: ErrorCode::Unavailable, message })
            if message.contains("limit of 2 connections")),
        "{reply:?}"
    );
    assert!(server::metrics::turned_away_count("protocol", "credential_limit") > before);
    let (_admin, _) = connect(&s, &s.admin).await;
    drop(first);
    // The slot is given back when the connection's task ends: retried
    // until it is.
    loop {
        let reply = recv(&mut say_hello(s.addr, &s.writer).await)
            .await
            .map(|r| r.1);
        match reply {
            Some(Message::HelloOk { .. }) => break,
            Some(Message::Error {
                code: ErrorCode::Unavailable,
                ..
            }) => tokio::task::yield_now().await,
            other => panic!("{other:?}"),
        }
    }
}

/// An HTTP request sent to the protocol port (curl, a browser, a client of
/// the shim with the wrong port) is answered in HTTP, with what to do
/// instead, and the connection closed; nothing else about it changes.
#[tokio::test]
async fn an_http_request_to_the_protocol_port_is_answered_in_http() {
    let s = start(ServeConfig::default()).await;
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    tcp.write_all(b"GET /v1/health HTTP/1.1\r\nHost: vault\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut answer))
        .await
        .expect("closed")
        .expect("read");
    let answer = String::from_utf8(answer).expect("text");
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    assert!(body.contains("127.0.0.1:8080"), "{body}");
    assert!(
        !body.contains("health"),
        "nothing of the request is repeated"
    );
}

/// A client with a valid key that finds every slot taken waits for one
/// within its handshake's window only: then it is told `unavailable`,
/// and closed, so that waiting connections cannot pile up. The served
/// connection is not disturbed, and the slot it frees goes to the next.
#[tokio::test]
async fn a_connection_that_finds_no_slot_within_its_window_is_told_and_closed() {
    let s = start(ServeConfig {
        max_connections: 1,
        handshake_timeout: Duration::from_secs(2),
        ..ServeConfig::default()
    })
    .await;
    let (mut first, hello) = connect(&s, &s.writer).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    // (Bounded so that the test fails rather than hangs.)
    let (mut second, hello) = tokio::time::timeout(Duration::from_secs(60), connect(&s, &s.writer))
        .await
        .expect("an answer once the window has passed");
    assert_eq!(code(&hello), Some(ErrorCode::Unavailable), "{hello:?}");
    assert!(recv(&mut second).await.is_none(), "closed after its answer");
    let counted = server::metrics::turned_away_count("protocol", "busy");
    assert!(counted >= 1, "counted: {counted}");
    assert_eq!(request(&mut first, 2, &Message::Ping).await, Message::Pong);
    drop(first);
    let (mut third, hello) = connect(&s, &s.writer).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    assert_eq!(request(&mut third, 2, &Message::Ping).await, Message::Pong);
}

/// A connection waiting for a slot still counts among those in their
/// handshake: one more arrival past `max_handshakes` ends the oldest
/// wait, and that client is told `unavailable` before it is closed, not
/// cut off without a word. The newcomer is served once a slot frees.
#[tokio::test]
async fn a_connection_waiting_for_a_slot_is_evicted_with_an_answer() {
    let s = start(ServeConfig {
        max_connections: 1,
        max_handshakes: 1,
        // Longer than the test: only eviction can end the wait.
        handshake_timeout: Duration::from_secs(3600),
        ..ServeConfig::default()
    })
    .await;
    let evicted = || server::metrics::turned_away_count("protocol", "evicted");
    let before = evicted();
    let (mut first, hello) = connect(&s, &s.writer).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    // The second authenticates and waits: its `Hello` has no answer yet.
    // The pause lets the server read and check the `Hello` before the
    // third arrives (a connection still in its handshake would be closed
    // without a word, and the test would say so below).
    let mut second = say_hello(s.addr, &s.writer).await;
    let waited = tokio::time::timeout(Duration::from_secs(3), recv(&mut second)).await;
    assert!(waited.is_err(), "no answer while it waits: {waited:?}");
    // A third arrives: the second's wait ends, with an answer.
    let third = tokio::spawn({
        let (addr, key) = (s.addr, s.writer.clone());
        async move {
            let mut conn = say_hello(addr, &key).await;
            let hello = recv(&mut conn).await.map(|r| r.1);
            (conn, hello)
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(60), recv(&mut second))
        .await
        .expect("an answer once evicted")
        .expect("a frame (none: evicted before its Hello was read)");
    assert_eq!(code(&answer.1), Some(ErrorCode::Unavailable), "{answer:?}");
    assert!(recv(&mut second).await.is_none(), "closed after its answer");
    assert!(evicted() > before, "counted as evicted");
    // The served connection is not disturbed; the slot it frees goes to
    // the third.
    assert_eq!(request(&mut first, 2, &Message::Ping).await, Message::Pong);
    drop(first);
    let (mut third, hello) = tokio::time::timeout(Duration::from_secs(60), third)
        .await
        .expect("served once the slot frees")
        .expect("task");
    assert!(matches!(hello, Some(Message::HelloOk { .. })), "{hello:?}");
    assert_eq!(request(&mut third, 2, &Message::Ping).await, Message::Pong);
}

#[tokio::test]
async fn connections_that_never_authenticate_cannot_keep_a_client_out() {
    // Two slots, four handshakes at most, and a handshake timeout longer
    // than the test: only eviction can let the client in.
    let s = start(ServeConfig {
        max_connections: 2,
        max_handshakes: 4,
        handshake_timeout: Duration::from_secs(3600),
        ..ServeConfig::default()
    })
    .await;
    // Eight slowloris connections: half a frame header each, then silence.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
        tcp.write_all(&[0x46, 0x56, 1]).await.expect("write");
        slow.push(tcp);
    }
    // A real client authenticates and is served, twice over (two slots).
    let (mut a, hello) = connect(&s, &s.writer).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    let (mut b, hello) = connect(&s, &s.writer).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    for conn in [&mut a, &mut b] {
        let m = Message::Append {
            subject: "cust-1".into(),
            fields: vec![("name".into(), "Ada".into())],
        };
        assert!(matches!(
            request(conn, 2, &m).await,
            Message::Receipt { .. }
        ));
    }
    // The oldest slow connections were closed to make room: the first
    // four when the last four came, then one for the first client (the
    // second found a free place: the first had left its handshake).
    for tcp in &mut slow[..5] {
        let mut buf = Vec::new();
        assert_eq!(tcp.read_to_end(&mut buf).await.expect("closed"), 0);
    }
}

#[tokio::test]
async fn direct_connections_are_served_as_sockets_are() {
    use client::Exchange;
    let s = start(ServeConfig::default()).await;
    let local = server::serve::Local::new(s.vault.clone().into(), ServeConfig::default());
    let hello = |key: &str| {
        Message::Hello {
            api_key: key.into(),
            client: "test".into(),
        }
        .to_frame(1, 0)
        .expect("frame")
        .encode()
        .expect("encode")
    };
    let frame = |id: u32, m: &Message| m.to_frame(id, 0).expect("frame").encode().expect("encode");
    let answer = |a: &client::Exchanged| -> Vec<Message> { frames(&a.frames) };

    // A wrong key: refused and closed, as over a socket.
    let conn = local.direct();
    let a = conn.exchange(hello("fvk_wrong")).await;
    assert_eq!(code(&answer(&a)[0]), Some(ErrorCode::Unauthenticated));
    assert!(a.closed);
    let a = conn.exchange(hello(&s.gateway)).await;
    assert!(
        a.closed && a.frames.is_empty(),
        "a closed connection stays closed"
    );

    // Anything but Hello first: refused.
    let conn = local.direct();
    let a = conn.exchange(frame(1, &Message::Ping)).await;
    assert_eq!(code(&answer(&a)[0]), Some(ErrorCode::Unauthenticated));
    assert!(a.closed);

    // The gateway's key: its role, and its requests.
    let conn = local.direct();
    let a = conn.exchange(hello(&s.gateway)).await;
    assert!(matches!(&answer(&a)[0], Message::HelloOk { role, .. } if role == "gateway"));
    let context = Message::Context {
        key_hash: *blake3::hash(s.partner.as_bytes()).as_bytes(),
        subject: "cust-1".into(),
    };
    let a = conn.exchange(frame(2, &context)).await;
    let got = answer(&a);
    let [Message::ContextInfo(c)] = got.as_slice() else {
        panic!("no context");
    };
    assert_eq!(
        (c.role.as_str(), c.name.as_str()),
        ("partner", "demo-lender")
    );
    // A request its role may not send: refused, the connection stays.
    let append = Message::Append {
        subject: "cust-1".into(),
        fields: vec![("name".into(), "Jane".into())],
    };
    let a = conn.exchange(frame(3, &append)).await;
    assert_eq!(code(&answer(&a)[0]), Some(ErrorCode::Forbidden));
    assert!(!a.closed);

    // Garbage, a frame with bytes after it, an oversized length: a typed
    // error each, then the connection is closed.
    let mut oversized = frame(4, &Message::Ping);
    oversized[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut trailing = frame(4, &Message::Ping);
    trailing.extend_from_slice(b"extra");
    for (bytes, want) in [
        (b"GARBAGE GARBAGE GARBAGE".to_vec(), ErrorCode::Malformed),
        (trailing, ErrorCode::Malformed),
        (
            frame(4, &Message::Ping)[..10].to_vec(),
            ErrorCode::Malformed,
        ),
        (oversized, ErrorCode::FrameTooLarge),
    ] {
        let conn = local.direct();
        assert!(!conn.exchange(hello(&s.gateway)).await.closed);
        let a = conn.exchange(bytes).await;
        assert_eq!(code(&answer(&a)[0]), Some(want));
        assert!(a.closed);
    }

    // A partner: only its own requests, and its Redeem ends the connection.
    seed(&s, "cust-9").await;
    let token = mint(&s, "demo-lender", "cust-9", 0).await;
    let conn = local.direct();
    conn.exchange(hello(&s.partner)).await;
    let a = conn.exchange(frame(2, &context)).await;
    assert_eq!(code(&answer(&a)[0]), Some(ErrorCode::Forbidden));
    let a = conn.exchange(frame(3, &Message::Redeem { token })).await;
    assert!(matches!(answer(&a)[0], Message::Data { .. }));
    assert!(a.closed);
    let a = conn.exchange(frame(4, &Message::Ping)).await;
    assert!(a.closed && a.frames.is_empty());

    // An admin: a new master secret is not taken, as from a plaintext
    // connection of another host (the shim forwards what HTTP sent).
    let conn = local.direct();
    conn.exchange(hello(&s.admin)).await;
    let rotate = Message::RotateMasterKey {
        kind: protocol::SecretKind::KeyFile,
        secret: vec![9; 32],
    };
    let a = conn.exchange(frame(2, &rotate)).await;
    assert_eq!(code(&answer(&a)[0]), Some(ErrorCode::Forbidden));
    assert!(!a.closed);
}

#[tokio::test]
async fn a_client_over_a_direct_connection_gets_what_a_socket_gets() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-3").await;
    let local = server::serve::Local::new(s.vault.clone().into(), ServeConfig::default());
    let config = |key: &str| client::ClientConfig {
        api_key: client::Zeroizing::new(key.to_owned()),
        tls: client::Tls::Plaintext,
        ..client::ClientConfig::default()
    };
    let refused = client::Client::direct(local.direct(), &config("fvk_wrong")).await;
    assert!(matches!(
        refused,
        Err(client::ClientError::Server {
            code: ErrorCode::Unauthenticated,
            ..
        })
    ));

    // The admin reads entries in several frames: they arrive as one list.
    let admin = client::Client::direct(local.direct(), &config(&s.admin))
        .await
        .expect("admin");
    assert_eq!(admin.role(), "admin");
    let n = s.vault.durable_len();
    let entries = admin.entries(0, 10_000).await.expect("entries");
    assert_eq!(entries.len() as u64, n);
    // Concurrent requests on one client.
    let (a, b) = tokio::join!(admin.health(), admin.head());
    let (a, b) = (a.expect("health"), b.expect("head"));
    assert_eq!(a.entries, n);
    assert_eq!(b.entries, n);
    // Health's head is the one `Head` answers, checked there.
    assert_eq!(a.head, b.signed_head);
    assert!(a.head.is_some());

    // A gateway mints; the token is redeemed over the network.
    let gateway = client::Client::direct(local.direct(), &config(&s.gateway))
        .await
        .expect("gateway");
    let err = gateway
        .append("cust-3", vec![("name".into(), "x".into())])
        .await
        .expect_err("a gateway may not append");
    assert!(matches!(
        err,
        client::ClientError::Server {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
    assert!(!gateway.is_closed());
    let token = mint(&s, "demo-lender", "cust-3", 0).await;
    assert!(matches!(
        redeem(&s, &s.partner, &token).await,
        Message::Data { .. }
    ));
}

/// A PROXY protocol v2 header naming `client` (TCP over IPv4, to port
/// 9999 of 10.0.0.1).
fn proxy_v2(client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&client);
    h.extend_from_slice(&[10, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&9999u16.to_be_bytes());
    h
}

/// The address the tests' proxy connects from (the other helpers connect
/// from 127.0.0.1).
const PROXY: &str = "127.0.0.2";

/// `prefix`, then the partner's `Hello` and a `Redeem` of `token`, in one
/// write from [`PROXY`]; the frames the server answers until it closes.
async fn redeem_after(s: &Server, prefix: &[u8], token: &str) -> Vec<Message> {
    let mut bytes = prefix.to_vec();
    for (id, m) in [
        (
            1,
            Message::Hello {
                api_key: s.partner.clone(),
                client: "behind a proxy".into(),
            },
        ),
        (
            2,
            Message::Redeem {
                token: token.into(),
            },
        ),
    ] {
        bytes.extend(protocol::encode_frame(id, &m, 0).expect("frame"));
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(PROXY.parse().expect("ip"), 0))
        .expect("bind");
    let tcp = socket.connect(s.addr).await.expect("connect");
    frames(&write_and_read_to_end(tcp, &bytes).await)
}

#[tokio::test]
async fn behind_a_tcp_proxy_the_client_its_header_names_is_checked() {
    let s = start(ServeConfig {
        proxy_protocol_from: server::proxied::TrustedProxies::parse(&[PROXY]).expect("networks"),
        ..ServeConfig::default()
    })
    .await;
    seed(&s, "cust-7").await;
    // demo-lender may redeem from 192.0.2.0/24 only.
    let policy = serde_json::json!({"partner_id": "demo-lender", "policy": {
        "purposes": {"credit_check": {"fields": {
            "email": "partial", "iban": "partial", "name": "redact", "income": "generalize"}}},
        "source_ips": ["192.0.2.0/24"]}});
    s.vault
        .append(storage::Append::event(
            storage::Kind::PolicyChanged,
            "",
            &policy,
        ))
        .await
        .expect("policy");
    let is_data = |got: &[Message]| matches!(got, [Message::HelloOk { .. }, Message::Data { .. }]);
    let refused = |got: &[Message], want: ErrorCode| matches!(got, [Message::HelloOk { .. }, m] if code(m) == Some(want));

    // Connections the proxy does not introduce, or introduces wrongly,
    // are closed before anything is read or answered: the token stays.
    // The last names a client in the policy's network, but its CRC32c
    // TLV (protocol.md's fifth vector with the sum's last byte changed)
    // does not match.
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let mut bad_sum = proxy_v2([192, 0, 2, 7], 56324);
    bad_sum[15] = 0x18;
    bad_sum.extend_from_slice(b"\x03\x00\x04\x4a\x9f\xee\x56\x04\x00\x02\x00\x00");
    for prefix in [
        &b""[..],
        b"PROXY TCP4 192.0.2.7\r\n",
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1234 99999\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04\xc0\x00\x02\x07",
        &bad_sum,
        // A relayed client the proxy cannot name.
        b"PROXY UNKNOWN\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x00\x00\x00",
    ] {
        let got = redeem_after(&s, prefix, &token).await;
        assert!(got.is_empty(), "{prefix:?}: {got:?}");
    }
    // The proxy names a client in the policy's network (v2, then v1).
    let got = redeem_after(&s, &proxy_v2([192, 0, 2, 7], 56324), &token).await;
    assert!(is_data(&got), "{got:?}");
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let v1 = b"PROXY TCP4 192.0.2.9 10.0.0.1 40000 9999\r\n";
    assert!(is_data(&redeem_after(&s, v1, &token).await));
    // A client outside it, and the proxy's own connection (LOCAL), whose
    // address is the peer's: refused by the policy, and audited.
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    for prefix in [&proxy_v2([203, 0, 113, 9], 1)[..], local] {
        let got = redeem_after(&s, prefix, &token).await;
        assert!(refused(&got, ErrorCode::SourceNotAllowed), "{got:?}");
    }
    let denied: Vec<String> = s
        .vault
        .entries_from(0, 10_000)
        .expect("entries")
        .iter()
        .filter_map(|e| {
            let text = String::from_utf8_lossy(e);
            text.contains("source_not_allowed")
                .then(|| text.into_owned())
        })
        .collect();
    assert_eq!(denied.len(), 2, "one access_denied entry each");
    // A probe of the proxy's that connects and closes is counted apart,
    // not refused.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(PROXY.parse().expect("ip"), 0))
        .expect("bind");
    drop(socket.connect(s.addr).await.expect("connect"));
    for _ in 0..1_000 {
        if proxy_headers("closed") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every header counted by its outcome (this is the only test of the
    // binary that trusts a proxy).
    for (outcome, n) in [("refused", 7), ("proxied", 3), ("local", 1), ("closed", 1)] {
        assert_eq!(proxy_headers(outcome), n, "{outcome}");
    }
    // The proxy is named when its header named the client, not for its
    // own (LOCAL) connection.
    assert!(
        denied[0].contains(r#""source_ip":"203.0.113.9""#),
        "{}",
        denied[0]
    );
    assert!(
        denied[0].contains(r#""proxy_ip":"127.0.0.2""#),
        "{}",
        denied[0]
    );
    assert!(
        denied[1].contains(r#""source_ip":"127.0.0.2""#),
        "{}",
        denied[1]
    );
    assert!(!denied[1].contains("proxy_ip"), "{}", denied[1]);
}

/// `fintrust_proxy_headers_total` for `outcome`.
fn proxy_headers(outcome: &str) -> u64 {
    common::counter(&format!(
        "fintrust_proxy_headers_total{{outcome=\"{outcome}\"}}"
    ))
}

#[tokio::test]
async fn a_proxy_header_to_a_server_that_expects_none_is_a_malformed_frame() {
    let s = start(ServeConfig::default()).await;
    seed(&s, "cust-7").await;
    let token = mint(&s, "demo-lender", "cust-7", 0).await;
    for prefix in [
        &proxy_v2([192, 0, 2, 7], 1)[..],
        b"PROXY TCP4 192.0.2.7 10.0.0.1 1 9999\r\n",
    ] {
        let got = redeem_after(&s, prefix, &token).await;
        assert!(
            matches!(&got[..], [m] if code(m) == Some(ErrorCode::Malformed)),
            "{got:?}"
        );
    }
    // The token was never read, so it still redeems.
    assert!(matches!(
        redeem(&s, &s.partner, &token).await,
        Message::Data { .. }
    ));
}

/// What holds each credential, as `vault-admin credentials list` shows
/// it: each credential's creation entry names its certificate (or none),
/// and an entry at a credential's seq that is not its creation is refused.
#[tokio::test]
async fn certificate_holders_come_from_each_credentials_creation_entry() {
    let s = start(ServeConfig::default()).await;
    let sha256 = [7u8; 32];
    let held = s
        .vault
        .create_cert_credential("partner", "by certificate", &sha256)
        .await
        .expect("a credential held by a certificate");
    let local = server::serve::Local::new(s.vault.clone().into(), ServeConfig::default());
    let config = client::ClientConfig {
        api_key: client::Zeroizing::new(s.admin.clone()),
        tls: client::Tls::Plaintext,
        ..client::ClientConfig::default()
    };
    let admin = client::Client::direct(local.direct(), &config)
        .await
        .expect("admin");
    let all = admin.credentials().await.expect("the list");
    let holders = server::admin::certificate_holders(&admin, &all)
        .await
        .expect("holders");
    assert_eq!(holders.len(), all.len());
    for (c, cert) in all.iter().zip(&holders) {
        if c.id == held {
            assert_eq!(cert.as_deref(), Some(hex::encode(sha256).as_str()));
        } else {
            assert!(cert.is_none(), "{c:?}: {cert:?}");
        }
    }

    // The genesis entry at a credential's seq: refused, not read as one.
    let mut moved = all[0].clone();
    moved.created_seq = 0;
    let refused = server::admin::certificate_holders(&admin, &[moved]).await;
    assert!(
        matches!(
            refused,
            Err(server::Error::Client(
                client::ClientError::UnexpectedResponse(_)
            ))
        ),
        "{refused:?}"
    );
}

/// A server whose `Entries` answers hold 64 KiB at most and share a
/// budget of `bytes`, its connections closed after `idle`, and a log of
/// about 200 KiB (answers of 64 KiB); the budget.
async fn budgeted(bytes: usize, idle: Duration) -> (Server, server::serve::EntriesBudget) {
    let config = ServeConfig {
        idle_timeout: idle,
        ..ServeConfig::default()
    };
    budgeted_with(bytes, config).await
}

/// [`budgeted`], the rest of its configuration from `config`.
async fn budgeted_with(
    bytes: usize,
    config: ServeConfig,
) -> (Server, server::serve::EntriesBudget) {
    let budget = server::serve::EntriesBudget::bytes(bytes);
    let s = start(ServeConfig {
        max_entries_bytes: 64 * 1024,
        entries_budget: budget.clone(),
        ..config
    })
    .await;
    let (mut writer, _) = connect(&s, &s.writer).await;
    for i in 0..400u32 {
        let append = Message::Append {
            subject: format!("s{i}"),
            fields: vec![("k".into(), "v".repeat(400))],
        };
        assert!(matches!(
            request(&mut writer, i + 2, &append).await,
            Message::Receipt { .. }
        ));
    }
    (s, budget)
}

/// `Entries` of the whole log (up to 10,000 entries).
const ALL_ENTRIES: Message = Message::Entries {
    from_seq: 0,
    max: 10_000,
};

/// A burst of `Entries` of the whole log.
fn entries_burst() -> Vec<u8> {
    repeated(
        &protocol::encode_frame(2, &ALL_ENTRIES, 0).expect("frame"),
        2_000,
    )
}

/// Waits until `budget` has `at_most` bytes left, bounded so that a
/// budget never spent fails the test rather than hangs it.
async fn until_spent(budget: &server::serve::EntriesBudget, at_most: usize, what: &str) {
    tokio::time::timeout(HANG_BOUND, async {
        while budget.available() > at_most {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

/// A connection of a second auditor's key.
async fn second_auditor(s: &Server) -> Conn {
    let (_, key) = s
        .vault
        .create_credential("auditor", "second-auditor")
        .await
        .expect("a second auditor");
    connect(s, &key).await.0
}

/// Asks `conn` for the log's entries and reads every batch of the answer,
/// each within `HANG_BOUND` (`what` says what a hang means).
async fn all_entries(conn: &mut Conn, what: &str) {
    conn.send(ALL_ENTRIES.to_frame(3, 0).expect("frame"))
        .await
        .expect("send");
    let mut last = false;
    while !last {
        let batch = tokio::time::timeout(HANG_BOUND, recv(conn))
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("a batch");
        assert!(matches!(batch.1, Message::EntryBatch { .. }), "{batch:?}");
        last = batch.2;
    }
}

/// How long a test waits for what must come, so that it fails rather
/// than hangs when it does not.
const HANG_BOUND: Duration = Duration::from_secs(60);

/// `Entries` answers left unread keep their share of the server's
/// `entries_budget` until their connection is closed for it: another
/// auditor's `Entries` waits meanwhile (no more memory is spent on
/// answers), and is answered once the unread connection is closed; the
/// budget is whole again after.
#[tokio::test]
async fn entries_left_unread_hold_the_budget_until_their_connection_closes() {
    let (s, budget) = budgeted(64 * 1024, Duration::from_secs(2)).await;
    let flood = flood_unread(&s, &s.auditor, entries_burst()).await;
    until_spent(&budget, 0, "the unread answers spend the budget").await;
    // Another auditor's key: its share is free, the budget is not.
    let mut other = second_auditor(&s).await;
    all_entries(&mut other, "answered once the unread connection is closed").await;
    tokio::time::timeout(HANG_BOUND, flood)
        .await
        .expect("the unread connection is closed")
        .expect("flood task");
    // Once every answer is read or dropped, the budget is whole again.
    tokio::time::timeout(HANG_BOUND, async {
        while budget.available() < 64 * 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the budget given back");
}

/// An `Entries` that waits for a budget that answers left unread hold
/// waits `entries_wait` at most, then is answered `unavailable`: a client
/// that reads a little now and then could hold the budget for ever.
#[tokio::test]
async fn an_entries_request_waits_for_the_budget_within_a_bound() {
    let config = ServeConfig {
        entries_wait: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(600),
        ..ServeConfig::default()
    };
    let (s, budget) = budgeted_with(64 * 1024, config).await;
    let flood = flood_unread(&s, &s.auditor, entries_burst()).await;
    // Until its answers fill the sockets' buffers: it holds the budget
    // from then on.
    tokio::time::timeout(HANG_BOUND, async {
        let mut spent_since = None;
        loop {
            let spent = budget.available() == 0;
            let since = *spent_since.get_or_insert_with(std::time::Instant::now);
            if !spent {
                spent_since = None;
            } else if since.elapsed() > Duration::from_secs(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the unread answers spend the budget");
    let mut other = second_auditor(&s).await;
    let reply = tokio::time::timeout(HANG_BOUND, request(&mut other, 3, &ALL_ENTRIES))
        .await
        .expect("answered within the bound");
    assert_eq!(code(&reply), Some(ErrorCode::Unavailable), "{reply:?}");
    flood.abort();
}

/// One key holds a quarter of the `entries_budget` at most: while its
/// connections ask and never read, another auditor's key is answered from
/// the rest, before they are closed; the same key's other connections
/// wait for its own share.
#[tokio::test]
async fn a_key_that_never_reads_holds_a_quarter_of_the_budget() {
    let (s, budget) = budgeted(4 * 64 * 1024, Duration::from_secs(600)).await;
    let floods = [
        flood_unread(&s, &s.auditor, entries_burst()).await,
        flood_unread(&s, &s.auditor, entries_burst()).await,
    ];
    until_spent(
        &budget,
        3 * 64 * 1024,
        "the unread answers spend the key's share",
    )
    .await;
    let mut other = second_auditor(&s).await;
    all_entries(&mut other, "answered from the rest of the budget").await;
    assert!(
        floods.iter().all(|f| !f.is_finished()),
        "answered while the unread connections are open"
    );
    // The flooding key goes on asking: it holds its share, no more.
    for _ in 0..50 {
        assert!(
            budget.available() >= 3 * 64 * 1024,
            "{}",
            budget.available()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for f in floods {
        f.abort();
    }
}

/// A connection that asks for entries and never reads them holds up no
/// other connection of its key: the key's reads take turns for the read
/// alone, and the connection's own turn, which it keeps while its answer
/// waits to be written, is its own.
#[tokio::test]
async fn a_connection_that_never_reads_holds_up_none_of_its_key_s_others() {
    let (s, _budget) = budgeted(64 * 64 * 1024, Duration::from_secs(600)).await;
    let flood = flood_unread(&s, &s.auditor, entries_burst()).await;
    // Time for its answers to fill the sockets' buffers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut other, _) = connect(&s, &s.auditor).await;
    all_entries(
        &mut other,
        "answered while the other connection does not read",
    )
    .await;
    assert!(!flood.is_finished(), "the unread connection is still open");
    flood.abort();
}

/// Requests read before a client ends its side are answered, `Entries`
/// ones too when each waits for the budget the answer before it holds
/// until written: the answers are written while the last ones wait.
#[tokio::test]
async fn entries_sent_before_the_end_are_answered_within_the_budget() {
    let s = start(ServeConfig {
        max_entries_bytes: 64 * 1024,
        entries_budget: server::serve::EntriesBudget::bytes(64 * 1024),
        ..ServeConfig::default()
    })
    .await;
    let (mut writer, _) = connect(&s, &s.writer).await;
    let append = Message::Append {
        subject: "s".into(),
        fields: vec![("k".into(), "v".into())],
    };
    assert!(matches!(
        request(&mut writer, 2, &append).await,
        Message::Receipt { .. }
    ));
    let (auditor, _) = connect(&s, &s.auditor).await;
    let mut tcp = auditor.into_inner();
    let mut asks = Vec::new();
    for id in 2..6u32 {
        let entries = Message::Entries {
            from_seq: 0,
            max: 1,
        };
        asks.extend(protocol::encode_frame(id, &entries, 0).expect("frame"));
    }
    tcp.write_all(&asks).await.expect("send");
    tcp.shutdown().await.expect("end of our side");
    // Bounded, so that a connection stuck on its own budget fails the
    // test rather than hangs it.
    let mut answered = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut answered))
        .await
        .expect("every answer, then the end")
        .expect("read");
    let batches = frames(&answered)
        .into_iter()
        .filter(|m| matches!(m, Message::EntryBatch { .. }))
        .count();
    assert_eq!(batches, 4, "one batch for each Entries");
}

/// Connects with `key`, then sends `burst` (pings, say) again and again
/// and never reads an answer. The task ends when a write fails: the
/// server closed the connection.
async fn flood_unread(s: &Server, key: &str, burst: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let (conn, hello) = connect(s, key).await;
    assert!(matches!(hello, Message::HelloOk { .. }), "{hello:?}");
    let mut tcp = conn.into_inner();
    tokio::spawn(async move { while tcp.write_all(&burst).await.is_ok() {} })
}

#[tokio::test]
async fn a_client_that_leaves_its_answers_unread_is_closed_and_frees_its_slot() {
    // A writer's connection (answers through its writer task) and a
    // partner's (answered in turn) alike.
    for role in ["writer", "partner"] {
        let s = start(ServeConfig {
            max_connections: 1,
            // Long enough that the other connection's `Ping`, sent after
            // its `HelloOk`, is not too late on a machine that stalls.
            idle_timeout: Duration::from_millis(1500),
            ..ServeConfig::default()
        })
        .await;
        let key = if role == "writer" {
            &s.writer
        } else {
            &s.partner
        };
        let flood = flood_unread(&s, key, pings(10_000)).await;
        // The one slot is free again once the server gives up writing to
        // a client that does not read (bounded so that the test fails
        // rather than hangs).
        let bound = Duration::from_secs(60);
        let (mut other, hello) = tokio::time::timeout(bound, connect(&s, &s.writer))
            .await
            .unwrap_or_else(|_| panic!("{role}: the unread connection kept its slot"));
        assert!(
            matches!(hello, Message::HelloOk { .. }),
            "{role}: {hello:?}"
        );
        assert_eq!(request(&mut other, 2, &Message::Ping).await, Message::Pong);
        // And the flooding client finds its connection closed.
        tokio::time::timeout(bound, flood)
            .await
            .unwrap_or_else(|_| panic!("{role}: the unread connection stayed open"))
            .expect("flood task");
    }
}

/// A client that leaves its answers unread when the server stops is cut
/// off once the shutdown's grace is over: `run` returns, and nothing of
/// its connection holds the vault any more, which can then be closed.
#[tokio::test]
async fn a_stop_cuts_off_a_client_still_unread_after_the_grace() {
    let mut s = start(ServeConfig {
        // Its unread answers would not close it before the grace ends.
        idle_timeout: Duration::from_secs(120),
        ..ServeConfig::default()
    })
    .await;
    let flood = flood_unread(&s, &s.writer, pings(10_000)).await;
    // Until its answers fill the sockets' buffers, so that the answers
    // to what the server read before the stop cannot all be written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::time::timeout(Duration::from_secs(60), s.shut_down())
        .await
        .expect("run returned");
    assert_eq!(
        Arc::strong_count(&s.vault),
        1,
        "a connection still holds the vault"
    );
    tokio::time::timeout(Duration::from_secs(60), flood)
        .await
        .expect("the flooding client finds its connection closed")
        .expect("flood task");
}

/// A field the token names whose value is not text (a record written
/// through the storage library, not over the protocol) is not masked as
/// its JSON text: the redemption is refused `internal` and nothing is
/// sent. A token that does not name it gets the other fields.
#[tokio::test]
async fn a_field_that_is_not_text_is_never_masked_as_text() {
    let s = start(ServeConfig::default()).await;
    s.vault
        .append_batch(vec![storage::Append::record(
            "cust-n",
            br#"{"name":"Jane Doe","email":true,"iban":"GB33BUKB20201555555555","income":84000}"#
                .to_vec(),
        )])
        .await
        .expect("a record");
    let token = mint(&s, "demo-lender", "cust-n", 0).await;
    match redeem(&s, &s.partner, &token).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Internal),
        other => panic!("{other:?}"),
    }
    let (mut gw, _) = connect(&s, &s.gateway).await;
    let m = Message::Mint {
        partner_id: "demo-lender".into(),
        subject: "cust-n".into(),
        purpose: "credit_check".into(),
        fields: vec![("name".into(), protocol::MaskOp::Partial)],
        ttl_secs: 0,
    };
    let Message::Minted { token, .. } = request(&mut gw, 2, &m).await else {
        panic!("minted");
    };
    match redeem(&s, &s.partner, &token).await {
        Message::Data { fields, .. } => {
            assert_eq!(fields, vec![("name".to_string(), "J***".to_string())])
        }
        other => panic!("{other:?}"),
    }
}
