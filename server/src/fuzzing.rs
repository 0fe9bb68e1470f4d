//! Entry points for fuzzers and property tests over what the shim parses
//! from operators and the log (policies files in TOML, a policy in JSON) and
//! over the masking operators, which see every record value. Each asserts
//! what must hold whatever the input: no panic; a policy that parses and
//! validates survives a JSON round trip unchanged and still validates;
//! masking returns exactly the requested fields, `reveal` the value itself,
//! and `tokenize` and `hash` the same output for the same input.
//!
//! And over the protocol server itself: [`connection`] runs one client's
//! bytes through `serve_connection` against a real vault, as `vaultd serve`
//! does for each connection, and asserts that the server answers with whole
//! frames, ends the connection and never panics; [`proxy_header`] reads
//! what a trusted TCP proxy sends first, and [`forwarded`] what a trusted
//! HTTP proxy names the client in.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line shims over these
//! functions; the proptests below run them on stable in CI.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use protocol::{frame, MaskOp, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::live::LiveVault;
use crate::mask::{apply, apply_all, MaskKeys};
use crate::serve::{serve_connection, Conn, FailureThrottle, ServeConfig};
use crate::shim::{PoliciesFile, Policy, ShimConfig};

/// The vault the connections talk to, with a key of each role. The fuzz
/// target makes one per process, the proptest one per run: the inputs'
/// appends, mints and rotations add up in it, as on a server that runs
/// for long.
struct Fixture {
    rt: tokio::runtime::Runtime,
    vault: LiveVault,
    /// API keys: admin, writer, partner, gateway, auditor.
    keys: Vec<String>,
    config: Arc<ServeConfig>,
    _dir: tempfile::TempDir,
}

/// Scratch dirs of fixtures are `fintrust-fuzz-<pid>-*`.
const FIXTURE_PREFIX: &str = "fintrust-fuzz-";

/// Removes the scratch dirs in `parent` that fixtures of processes no
/// longer running left: a fuzzer keeps its fixture until it exits, and
/// libFuzzer exits without dropping it. On `/dev/shm` they hold memory.
fn remove_dead_fixtures(parent: &std::path::Path) {
    // Without `/proc`, no process can be told to have ended.
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FIXTURE_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Fixture {
    /// A fresh vault in a scratch dir, which goes when the fixture does.
    fn new() -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // In memory where there is one: every append is synced.
        let shm = std::path::Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        remove_dead_fixtures(&parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{FIXTURE_PREFIX}{}-", std::process::id()))
            .tempdir_in(&parent)
            .expect("a scratch dir");
        let created = storage::Vault::create(
            &dir.path().join("v"),
            &storage::Unlock::passphrase(b"fuzzing".to_vec()),
            storage::Options::default(),
        )
        .expect("a vault");
        let vault = Arc::new(created.vault);
        let mut keys = vec![created.admin_api_key.to_string()];
        for (role, name) in [
            ("writer", "fuzz-writer"),
            ("partner", "demo-lender"),
            ("gateway", "fuzz-gateway"),
            ("auditor", "fuzz-auditor"),
        ] {
            let (_, key) = rt
                .block_on(vault.create_credential(role, name))
                .expect("a credential");
            keys.push(key.to_string());
        }
        Fixture {
            rt,
            vault: vault.into(),
            keys,
            config: Arc::new(ServeConfig::default()),
            _dir: dir,
        }
    }
}

/// One protocol connection, served as `vaultd serve` serves each one
/// (`serve_connection`, over an in-memory pipe) by a real vault. The first
/// byte chooses the caller: admin, writer, partner, gateway or auditor,
/// whose `Hello` goes first, or (any other value) none, so that the bytes
/// must say `Hello` themselves. The second byte says where the rest, the
/// client's bytes, is cut in two writes; then the client closes its side.
/// Whatever the bytes, the server answers with whole frames that decode,
/// ends the connection within a minute, and never panics.
///
/// A fuzzer's process makes one vault and keeps it (statics are never
/// dropped): its scratch dir, `fintrust-fuzz-<pid>-*` in `/dev/shm` or the
/// temp dir, stays after the run, until the next fixture made there
/// removes it.
pub fn connection(data: &[u8]) {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    connection_on(FIXTURE.get_or_init(Fixture::new), data);
}

fn connection_on(f: &Fixture, data: &[u8]) {
    let [who, cut, bytes @ ..] = data else {
        return;
    };
    let mut sent = Vec::new();
    if let Some(key) = f.keys.get(usize::from(*who)) {
        let hello = Message::Hello {
            api_key: key.clone(),
            client: "fuzz".into(),
        };
        sent = protocol::encode_frame(1, &hello, 0).expect("a Hello encodes");
    }
    let first = sent.len() + usize::from(*cut).min(bytes.len());
    sent.extend_from_slice(bytes);
    let answered = f.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(server);
        let conn = Conn {
            vault: f.vault.clone(),
            config: f.config.clone(),
            throttle: Arc::new(FailureThrottle::default()),
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            proxy: None,
            admission: None,
            arrived: tokio::time::Instant::now(),
            client_cert: None,
            tls: false,
            stopping: tokio_util::sync::CancellationToken::new(),
        };
        let served = tokio::spawn(serve_connection(r, w, conn));
        let (mut from, mut to) = tokio::io::split(client);
        let write = async move {
            // The server may close first: a write into a closed pipe fails.
            if to.write_all(&sent[..first]).await.is_ok() {
                tokio::task::yield_now().await;
                let _ = to.write_all(&sent[first..]).await;
            }
            let _ = to.shutdown().await;
        };
        let read = async move {
            let mut answer = Vec::new();
            let _ = from.read_to_end(&mut answer).await;
            answer
        };
        let whole = async { tokio::join!(write, read, served) };
        tokio::time::timeout(Duration::from_secs(60), whole)
            .await
            .expect("the server ends the connection")
    });
    let (_, answer, served) = answered;
    if let Err(e) = served {
        panic!("the server's task failed: {e}");
    }
    if answer.starts_with(b"HTTP/") {
        // An HTTP request in place of `Hello` is answered in HTTP, and
        // with nothing else.
        assert!(f.keys.get(usize::from(*who)).is_none() && crate::serve::is_http_request(bytes));
        assert_eq!(answer, crate::serve::http_answer().as_bytes());
        return;
    }
    let mut rest = &answer[..];
    while !rest.is_empty() {
        let (frame, used) = frame::decode(rest)
            .expect("the server's frames decode")
            .expect("the server sends whole frames");
        Message::from_frame(&frame).expect("the server's messages decode");
        rest = &rest[used..];
    }
}

/// A policies file in TOML, as `vaultd serve --policies` reads it.
pub fn policies_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let max = ShimConfig::default().max_token_ttl_secs;
    let Ok(file) = PoliciesFile::parse(text, max) else {
        return;
    };
    for policy in file.partners.values() {
        round_trip(policy, max);
    }
}

/// A policy in JSON, as `PUT /v1/policies/{partner}` takes it and as the
/// shim reads it back from a `policy_changed` entry.
pub fn policy_json(data: &[u8]) {
    let Ok(policy) = serde_json::from_slice::<Policy>(data) else {
        return;
    };
    let max = ShimConfig::default().max_token_ttl_secs;
    if policy.validate(max).is_ok() {
        round_trip(&policy, max);
    }
}

/// What the log holds is what the shim reads back.
fn round_trip(policy: &Policy, max_ttl_secs: u32) {
    let json = serde_json::to_vec(policy).expect("a policy serializes");
    let back: Policy = serde_json::from_slice(&json).expect("a serialized policy parses");
    assert_eq!(&back, policy);
    assert_eq!(back.validate(max_ttl_secs), Ok(()));
}

/// Separates the parts of a masking input: 0xFF never occurs in UTF-8.
const SEP: u8 = 0xFF;

/// Masking. The input is split at 0xFF bytes: the partner id, then one byte
/// per requested field (operator = byte % 6; field = byte / 6 modulo the
/// record's names plus one, the extra one a name the record lacks), then
/// the record's names and values, alternating (lossily decoded as UTF-8, so
/// arbitrary Unicode and NULs reach the operators).
pub fn mask(data: &[u8]) {
    let mut parts = data.split(|b| *b == SEP);
    let partner = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let picks = parts.next().unwrap_or_default();
    let rest: Vec<String> = parts
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let record: Vec<(String, String)> = rest
        .chunks(2)
        .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
        .collect();
    let ops = MaskOp::ALL;
    let fields: Vec<(String, MaskOp)> = picks
        .iter()
        .map(|b| {
            let op = ops[usize::from(*b) % ops.len()];
            let i = usize::from(*b) / ops.len() % (record.len() + 1);
            let name = record
                .get(i)
                .map_or("absent\u{0}field", |(n, _)| n.as_str());
            (name.to_owned(), op)
        })
        .collect();
    let keys = MaskKeys::new([0x5a; 32]);

    for (name, value) in &record {
        for op in ops {
            let out = apply(op, name, value, &keys, &partner);
            if op == MaskOp::Reveal {
                assert_eq!(out.as_deref(), Ok(value.as_str()));
            }
            if matches!(op, MaskOp::Tokenize | MaskOp::Hash) {
                assert_eq!(out, apply(op, name, value, &keys, &partner));
            }
        }
    }

    if let Ok(out) = apply_all(&fields, &record, &keys, &partner) {
        assert_eq!(out.len(), fields.len());
        for ((name, op), (out_name, out_value)) in fields.iter().zip(&out) {
            assert_eq!(name, out_name);
            let matching: Vec<&String> = record
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v)
                .collect();
            assert_eq!(matching.len(), 1, "a masked field is in the record once");
            assert_eq!(
                apply(*op, name, matching[0], &keys, &partner).as_ref(),
                Ok(out_value)
            );
        }
    }
}

/// A PROXY protocol header, as the protocol server reads one from a
/// trusted TCP proxy's connection ([`crate::proxied::header`]). Whatever
/// the bytes: a verdict (reading a slice never waits), at most the
/// header's bounds read, a header of at least its 15 first bytes, and the
/// same verdict again from exactly the bytes read.
pub fn proxy_header(data: &[u8]) {
    use crate::proxied::header::{self, HeaderError, V2_MAX_LEN};
    use futures_util::FutureExt;
    let mut rest = data;
    let Some(got) = header::read(&mut rest).now_or_never() else {
        panic!("reading from a slice waited");
    };
    let used = data.len() - rest.len();
    assert!(used <= 16 + V2_MAX_LEN, "read {used} bytes");
    match got {
        Ok(h) => {
            assert!(used >= 15, "a header of {used} bytes");
            let mut again = &data[..used];
            let Some(Ok(same)) = header::read(&mut again).now_or_never() else {
                panic!("the header's own bytes do not read again");
            };
            assert_eq!(same, h);
            assert!(again.is_empty());
        }
        Err(HeaderError::Io(e)) => panic!("reading a slice failed: {e}"),
        Err(_) => {}
    }
}

/// A forwarding header from a trusted HTTP proxy, as the shim reads it
/// ([`crate::proxied::forwarded`]): the first byte chooses the header
/// (even: `X-Forwarded-For`, odd: `Forwarded`), the rest are its lines,
/// split at `\n` (those that are not header values are left out), from
/// a peer in the trusted `10.0.0.0/8`. Whatever the lines hold: a client
/// (never an IPv4-mapped address) or a refusal that names the header and
/// at most 64 characters of the entry. And whatever they hold, an element
/// a trusted proxy appends after them, on a line of its own or at the end
/// of their last line, names the client.
pub fn forwarded(data: &[u8]) {
    use crate::proxied::forwarded::ForwardedHeader;
    use crate::proxied::{Source, TrustedProxies};
    use axum::http::{HeaderMap, HeaderValue};
    use std::net::IpAddr;
    let Some((choice, rest)) = data.split_first() else {
        return;
    };
    let header = if choice % 2 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let proxies =
        TrustedProxies::parse(&["10.0.0.0/8", "2001:db8:ffff::/48"]).expect("the networks parse");
    let peer = IpAddr::from([10, 0, 0, 6]);
    let lines: Vec<HeaderValue> = rest
        .split(|b| *b == b'\n')
        .filter_map(|l| HeaderValue::from_bytes(l).ok())
        .collect();
    let read = |lines: &[HeaderValue]| {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(header.header_name(), l.clone());
        }
        proxies.source(peer, &h, header)
    };
    match read(&lines) {
        Ok(source) => {
            assert_eq!(source.client, storage::state::canonical_ip(source.client));
            assert!(source.proxy.is_none() || source.proxy == Some(peer));
        }
        Err(e) => {
            assert_eq!(e.header, header.display_name());
            assert!(e.entry.chars().count() <= 64, "{e}");
        }
    }
    let (element, client): (&[u8], IpAddr) = match header {
        ForwardedHeader::XForwardedFor => (b"203.0.113.9", IpAddr::from([203, 0, 113, 9])),
        ForwardedHeader::Forwarded => (
            b"for=\"[2001:db8::9]:4711\";proto=https",
            IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9]),
        ),
    };
    let appended = Ok(Source {
        client,
        proxy: Some(peer),
    });
    let mut own_line = lines.clone();
    own_line.push(HeaderValue::from_bytes(element).expect("a header value"));
    assert_eq!(read(&own_line), appended, "on a line of its own");
    if let Some(last) = lines.last() {
        let joined = [last.as_bytes(), b", ", element].concat();
        let mut same_line = lines.clone();
        if let (Ok(v), Some(l)) = (HeaderValue::from_bytes(&joined), same_line.last_mut()) {
            *l = v;
            assert_eq!(read(&same_line), appended, "at the end of the last line");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::num::u8::ANY;
    use proptest::prelude::*;
    use protocol::{MaskOp, Message};

    /// TOML-shaped text built from the pieces a policies file is made of,
    /// so that most cases get past the parser to validation.
    fn policies_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("[partners.p1]\n".to_owned()),
            Just("[partners.p1.purposes.credit_check.fields]\n".to_owned()),
            Just("[partners.\"bad name\"]\n".to_owned()),
            Just("active = false\n".to_owned()),
            Just("purposes = {}\n".to_owned()),
            Just("name = \"partial\"\n".to_owned()),
            Just("iban = \"tokenize\"\n".to_owned()),
            Just("dob = \"generalize\"\n".to_owned()),
            Just("x = \"shout\"\n".to_owned()),
            Just("source_ips = [\"10.0.0.0/8\", \"::1\"]\n".to_owned()),
            Just("source_ips = [\"300.1.1.1\"]\n".to_owned()),
            (0u32..5000).prop_map(|n| format!("max_token_ttl_secs = {n}\n")),
            (0u32..3).prop_map(|n| format!("rate_limit_per_minute = {n}\n")),
            (0u8..30, 0u8..30).prop_map(|(a, b)| format!("allowed_hours_utc = [{a}, {b}]\n")),
            "[ -~]{0,20}\n",
        ];
        vec(piece, 0..10).prop_map(|v| v.concat())
    }

    /// A fixture's scratch dir goes once its process has: the next
    /// fixture made beside it removes it, and nothing else.
    #[test]
    fn dirs_of_fixtures_whose_process_ended_are_removed() {
        let parent = tempfile::tempdir().expect("a dir");
        // Above the kernel's largest pid (2^22): no process has it.
        let dead = format!("{}4194305-x", super::FIXTURE_PREFIX);
        let live = format!("{}{}-y", super::FIXTURE_PREFIX, std::process::id());
        for name in [
            &dead,
            &live,
            &"fintrust-fuzz-abc".to_string(),
            &"other".to_string(),
        ] {
            std::fs::create_dir(parent.path().join(name)).expect("a dir");
        }
        super::remove_dead_fixtures(parent.path());
        let mut left: Vec<String> = std::fs::read_dir(parent.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec!["fintrust-fuzz-abc".to_string(), live, "other".to_string()];
        want.sort();
        assert_eq!(left, want);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn proxy_headers_get_a_verdict(
            start in proptest::sample::select(vec![
                &b""[..], b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ",
                b"\r\n\r\n\0\r\nQUIT\n", b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
                b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24",
            ]),
            data in vec(ANY, 0..200),
        ) {
            super::proxy_header(&[start, &data[..]].concat());
        }

        #[test]
        fn forwarding_headers_get_a_verdict(
            start in proptest::sample::select(vec![
                &b"\x00"[..], b"\x01", b"\x01for=", b"\x01for=\"[", b"\x00192.0.2.7, ",
                b"\x01for=192.0.2.7;proto=https, for=\"",
            ]),
            data in vec(proptest::sample::select(
                b"0123456789abcdef.:[]_,;=\" \t\\\nforFOR\x80\xff".to_vec()), 0..80),
        ) {
            super::forwarded(&[start, &data[..]].concat());
        }

        #[test]
        fn policies_toml_never_panics(text in policies_text()) {
            super::policies_toml(text.as_bytes());
        }

        #[test]
        fn policies_toml_random_bytes(data in vec(ANY, 0..200)) {
            super::policies_toml(&data);
        }

        #[test]
        fn policy_json_never_panics(
            ttl in 0u32..5000,
            op in "reveal|redact|partial|tokenize|hash|generalize|shout",
            field in "[ -~]{0,10}",
            ips in vec("[0-9a-f:./]{0,12}", 0..3),
            hours in proptest::option::of((0u8..30, 0u8..30)),
        ) {
            let mut p = serde_json::json!({
                "purposes": {"credit_check": {"fields": {field: op}}},
                "max_token_ttl_secs": ttl,
                "source_ips": ips,
            });
            if let Some((a, b)) = hours {
                p["allowed_hours_utc"] = serde_json::json!([a, b]);
            }
            super::policy_json(p.to_string().as_bytes());
        }

        #[test]
        fn policy_json_random_bytes(data in vec(ANY, 0..200)) {
            super::policy_json(&data);
        }

        #[test]
        fn mask_never_panics(data in vec(prop_oneof![Just(0xFFu8), Just(0u8), ANY], 0..200)) {
            super::mask(&data);
        }
    }

    /// A request of each kind a caller may send, with values that are good
    /// and bad for it.
    fn request() -> impl Strategy<Value = Message> {
        let subject = prop_oneof![Just("cust-1".to_owned()), Just(String::new()), "[ -~]{0,8}"];
        prop_oneof![
            Just(Message::Ping),
            Just(Message::Health),
            Just(Message::Head),
            Just(Message::KeyChain),
            (subject.clone(), "[a-z]{0,4}", "[ -~]{0,12}").prop_map(|(subject, name, value)| {
                Message::Append {
                    subject,
                    fields: vec![(name, value)],
                }
            }),
            (subject.clone(), 0u32..3).prop_map(|(subject, ttl_secs)| Message::Mint {
                partner_id: "demo-lender".into(),
                subject,
                purpose: "credit_check".into(),
                fields: vec![("name".into(), MaskOp::Partial)],
                ttl_secs,
            }),
            "fvt_[0-9a-f]{0,64}".prop_map(|token| Message::Redeem { token }),
            (ANY_U64, 0u32..20).prop_map(|(from_seq, max)| Message::Entries { from_seq, max }),
            (ANY_U64, 0u32..5).prop_map(|(from_seq, max)| Message::Heads { from_seq, max }),
            ANY_U64.prop_map(|seq| Message::Proof { seq }),
            (3u8..15, subject, vec(ANY, 0..20)).prop_map(|(kind, subject, payload)| {
                Message::Event {
                    kind,
                    subject,
                    payload,
                }
            }),
        ]
    }

    const ANY_U64: std::ops::Range<u64> = 0..u64::MAX;

    /// Connections of mixed requests, some with garbage among them, to
    /// one vault made for the test (and removed after it).
    #[test]
    fn a_connection_never_panics_the_server() {
        let f = super::Fixture::new();
        // Each case is a connection to a real vault, its appends synced.
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
        let case = (
            0u8..7,
            ANY,
            vec((request(), 0u32..4), 0..6),
            vec(ANY, 0..24),
            0usize..7,
        );
        runner
            .run(&case, |(who, cut, requests, garbage, garbage_at)| {
                let mut bytes = vec![who, cut];
                for (i, (m, id)) in requests.iter().enumerate() {
                    if i == garbage_at {
                        bytes.extend_from_slice(&garbage);
                    }
                    if let Ok(frame) = protocol::encode_frame(*id + 2, m, 0) {
                        bytes.extend_from_slice(&frame);
                    }
                }
                super::connection_on(&f, &bytes);
                Ok(())
            })
            .expect("every connection ends well");
    }
}
