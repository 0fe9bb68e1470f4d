//! The fuzz targets' committed seeds (`fuzz/corpus/<target>/seed-*`) hold
//! the golden vectors of the docs, as `fuzz/seeds.py` writes them.
//!
//! The fuzz crate is not a member of the workspace, so nothing else notices
//! when a new message type or a new encoding leaves its seeds behind: a
//! fuzzer started from stale seeds spends its time finding again what the
//! docs already show. This test reads the docs the way `seeds.py` does and
//! names each seed that is missing or differs; run `python3 seeds.py` in
//! `fuzz/` to write them again.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc(name: &str) -> String {
    let path = root().join("docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode(s).ok()
}

/// The lines of `protocol.md` that `seeds.py` takes as golden frames:
/// `Name   header HEX` with an optional ` payload HEX`.
fn golden_frames(protocol: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    protocol
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(' ')?;
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            let rest = rest.trim_start().strip_prefix("header ")?;
            let (header, payload) = match rest.split_once(" payload ") {
                Some((h, p)) => (hex(h)?, hex(p)?),
                None => (hex(rest)?, Vec::new()),
            };
            Some((name.to_string(), header, payload))
        })
        .collect()
}

/// The forwarding headers of `http.md`, "Behind a reverse proxy", as the
/// `forwarded` target takes them: a byte for the header (0:
/// `X-Forwarded-For`, 1: `Forwarded`), then the value (each vector line is
/// `NAME: VALUE`, then two or more spaces and the result).
fn forwarding_vectors(http: &str) -> Vec<Vec<u8>> {
    let block = http
        .split_once("Test vectors (checked by `server::proxied::forwarded`")
        .and_then(|(_, rest)| rest.split_once("```text\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("http.md has the forwarding vectors");
    block
        .lines()
        .map(|line| {
            let (name, rest) = line.split_once(": ").expect("NAME: VALUE");
            let (value, _) = rest.rsplit_once("  ").expect("VALUE  RESULT");
            let choice = u8::from(name == "Forwarded");
            [&[choice][..], value.trim().as_bytes()].concat()
        })
        .collect()
}

/// The PROXY protocol headers of `protocol.md`, "Behind a TCP proxy": in
/// its block of vectors, a line ending in ':' names the next one, whose hex
/// may run over several lines.
fn proxy_headers(protocol: &str) -> Vec<Vec<u8>> {
    let block = protocol
        .split_once("Test vectors (checked by `server::proxied::header`")
        .and_then(|(_, rest)| rest.split_once("```text\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("protocol.md has the PROXY header vectors");
    let mut headers: Vec<String> = Vec::new();
    for line in block.lines() {
        match headers.last_mut() {
            _ if line.ends_with(':') => headers.push(String::new()),
            Some(h) => h.extend(line.split_whitespace()),
            None => panic!("a PROXY vector without its name: {line}"),
        }
    }
    headers
        .iter()
        .map(|h| hex(h).unwrap_or_else(|| panic!("not hex: {h}")))
        .collect()
}

/// The `NAME HEX` lines of `storage.md`.
fn storage_vector(storage: &str, name: &str) -> Vec<u8> {
    storage
        .lines()
        .find_map(|line| hex(line.strip_prefix(name)?.strip_prefix(' ')?))
        .unwrap_or_else(|| panic!("storage.md has no {name} vector"))
}

/// The payload target's seeds, as `seeds.py` writes them: for each
/// schema of section 3 of `storage.md`, the kind's byte, flags (0 for the
/// genesis at seq 0; 1, seq 1 without a subject, for the key rotations
/// other than a subject key's; else 3, seq 1 with the subject `cust-42`)
/// and the schema with its placeholders filled in. Named by kind and
/// variant.
fn payload_seeds(storage: &str) -> Vec<(String, Vec<u8>)> {
    let kinds_table = storage
        .split_once("### Kinds")
        .and_then(|(_, rest)| rest.split_once("Payload schemas"))
        .map(|(table, _)| table)
        .expect("storage.md has the table of kinds");
    let kind_byte = |kind: &str| {
        kinds_table.lines().find_map(|line| {
            let (byte, rest) = line.strip_prefix("| ")?.split_once(" | `")?;
            (rest.split_once('`')?.0 == kind).then(|| byte.parse::<u8>().ok())?
        })
    };
    let seeds: Vec<(String, Vec<u8>)> = storage
        .lines()
        .filter_map(|line| {
            let (kind, rest) = line.strip_prefix("| `")?.split_once('`')?;
            if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                return None;
            }
            let (variant, rest) = match rest.strip_prefix(" (") {
                Some(r) => {
                    let (v, r) = r.split_once(')')?;
                    (Some(v), r)
                }
                None => (None, rest),
            };
            let schema = rest.strip_prefix(" | `{")?.split_once("}`")?.0;
            let mut schema = format!("{{{schema}}}");
            for (hole, fill) in [
                // A subject key's rotation names the entry's subject and
                // a version after the first.
                ("\"subject\":\"\u{2026}\"", "\"subject\":\"cust-42\"".into()),
                ("\"version\":<u32>", "\"version\":2".into()),
                ("<64 hex>", "ab".repeat(32)),
                ("<32 hex>", "cd".repeat(16)),
                ("<128 hex>", "ef".repeat(64)),
                ("<hex of a key name>", "6d61736b".into()),
                ("<u32>", "1".into()),
                ("<u64>", "1".into()),
                (",\u{2026}]", "]".into()),
                ("\u{2026}", "x".into()),
            ] {
                schema = schema.replace(hole, &fill);
            }
            let name = match variant {
                Some(v) => format!("{kind}-{}", v.replace(' ', "_").replace('-', "")),
                None => kind.to_string(),
            };
            // Key rotations other than a subject key's have no subject.
            let flags = match (kind, variant) {
                ("genesis", _) => 0,
                ("key_rotated", Some(v)) if v != "subject key" => 1,
                _ => 3,
            };
            let byte = kind_byte(kind).unwrap_or_else(|| panic!("no byte for kind {kind}"));
            Some((name, [&[byte, flags][..], schema.as_bytes()].concat()))
        })
        .collect();
    assert_eq!(seeds.len(), 11, "payload schemas read: {seeds:?}");
    seeds
}

fn check(stale: &mut Vec<String>, target: &str, name: &str, want: &[u8]) {
    let path: PathBuf = Path::new("fuzz/corpus")
        .join(target)
        .join(format!("seed-{name}"));
    match std::fs::read(root().join(&path)) {
        Ok(have) if have == want => {}
        Ok(_) => stale.push(format!("{} differs", path.display())),
        Err(e) => stale.push(format!("{}: {e}", path.display())),
    }
}

#[test]
fn the_fuzz_seeds_hold_the_golden_vectors_of_the_docs() {
    let mut stale = Vec::new();

    let frames = golden_frames(&doc("protocol.md"));
    assert!(
        frames.len() >= 30,
        "only {} golden frames read",
        frames.len()
    );
    for (name, header, payload) in &frames {
        check(&mut stale, "frame", name, &[&header[..], payload].concat());
        check(
            &mut stale,
            "message",
            name,
            &[&[header[3]][..], payload].concat(),
        );
    }
    let pipelined: Vec<u8> = frames[..3]
        .iter()
        .flat_map(|(_, h, p)| h.iter().chain(p).copied())
        .collect();
    check(&mut stale, "frame", "pipelined", &pipelined);
    // The connection target: caller 0 (admin), no cut, then the frame.
    for (name, header, payload) in &frames {
        let seed = [&[0u8, 0][..], header, payload].concat();
        check(&mut stale, "connection", name, &seed);
    }
    // And an HTTP request where `Hello` would be, with no caller.
    let http = b"GET /v1/health HTTP/1.1\r\nHost: vault\r\n\r\n";
    check(
        &mut stale,
        "connection",
        "http",
        &[&[0xffu8, 0xff][..], http].concat(),
    );
    let headers = proxy_headers(&doc("protocol.md"));
    assert_eq!(headers.len(), 5, "PROXY headers read: {headers:?}");
    for (i, h) in headers.iter().enumerate() {
        check(&mut stale, "proxy_header", &format!("vector{i}"), h);
    }

    let storage = doc("storage.md");
    for name in ["ENTRY_RS_GOLDEN", "ENTRY6", "ENTRY7"] {
        let seed = name.to_ascii_lowercase();
        check(&mut stale, "entry", &seed, &storage_vector(&storage, name));
    }
    let chunk = storage_vector(&storage, "CHUNK");
    // The chunk target appends the CRC itself.
    check(&mut stale, "chunk", "golden", &chunk[..chunk.len() - 4]);
    // Seeds that are a vector as it stands.
    for (target, seed, name) in [
        ("receipt", "golden", "RECEIPT"),
        ("receipt", "head", "HEAD"),
        ("receipt", "endorsement", "ENDORSEMENT"),
        ("wal", "golden", "WAL_SEGMENT"),
    ] {
        check(&mut stale, target, seed, &storage_vector(&storage, name));
    }
    // The keys target's first byte chooses the format.
    for (seed, which, name) in [
        ("sealed_passphrase", 0u8, "SEALED_MASTER_PASSPHRASE"),
        ("sealed_key_file", 0, "SEALED_MASTER_KEY_FILE"),
        ("pending", 1, "PENDING_MARKER"),
        ("shredding", 2, "PENDING_MARKER"),
    ] {
        let want = [&[which][..], &storage_vector(&storage, name)].concat();
        check(&mut stale, "keys", seed, &want);
    }
    let verified: String = storage
        .split_once("verified::tests::golden_vector")
        .and_then(|(_, rest)| rest.split_once("```text\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block.split_whitespace().collect())
        .expect("storage.md has the verified-prefix vector");
    let verified = hex(&verified).expect("the verified-prefix vector is hex");
    check(
        &mut stale,
        "keys",
        "verified",
        &[&[3u8][..], &verified].concat(),
    );
    let export = storage
        .lines()
        .filter(|line| line.starts_with("46564558504f5254"))
        .find_map(hex)
        .expect("storage.md has the export vector on one line");
    check(&mut stale, "export", "golden", &export);

    for (name, seed) in payload_seeds(&storage) {
        check(&mut stale, "payload", &name, &seed);
    }

    let http = doc("http.md");
    let toml = http
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(toml, _)| toml)
        .expect("http.md has a toml block");
    check(&mut stale, "policies_toml", "demo", toml.as_bytes());
    let forwarding = forwarding_vectors(&http);
    assert_eq!(
        forwarding.len(),
        12,
        "forwarding vectors read: {forwarding:?}"
    );
    for (i, seed) in forwarding.iter().enumerate() {
        check(&mut stale, "forwarded", &format!("vector{i}"), seed);
    }

    assert!(
        stale.is_empty(),
        "run `python3 seeds.py` in fuzz/ (the seeds follow the docs):\n{}",
        stale.join("\n")
    );
}

/// The payload target's seeds are valid entries, so that the fuzzer
/// starts from inputs that reach every kind's schema and key commitments
/// rather than being refused at the genesis position: the genesis at seq
/// 0, every other kind at seq 1 with a subject.
#[test]
fn the_payload_seeds_pass_the_checks_the_target_fuzzes() {
    let mut refused = Vec::new();
    for (name, seed) in payload_seeds(&doc("storage.md")) {
        let e =
            storage::fuzzing::payload_entry(&seed).unwrap_or_else(|| panic!("{name}: no entry"));
        assert_eq!(
            e.seq == 0,
            e.kind == storage::Kind::Genesis,
            "{name}: seq {}",
            e.seq
        );
        if let Err(why) = storage::verify::check_entry_content(&e) {
            refused.push(format!("{name}: {why:?}"));
        }
    }
    assert!(refused.is_empty(), "{refused:#?}");
}
