//! Micro-benchmarks of the storage engine's building blocks: what the
//! committer spends per entry and per group, and what verify spends per
//! entry and per head. Each is kept short (2 s, 20 samples) so that
//! `cargo bench` finishes in a few minutes; `vault-bench` measures the
//! whole engine.
//!
//! ```text
//! cargo bench --bench storage                 # all
//! cargo bench --bench storage -- merkle       # those whose name contains "merkle"
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use storage::chunk::{encode_chunk, Chunk, MerkleTree, SignedHead};
use storage::crypto::{record_aad, SecretKey};
use storage::entry::{entry_hash, entry_hashes, EntryRef, Hash, Kind};

const PAYLOAD: usize = 512;

/// A deterministic, incompressible-looking payload.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0x5a)
        .collect()
}

/// A record entry with a 512-byte payload (the size of a sealed record of
/// 496 plaintext bytes), as the committer builds it.
fn entry<'a>(seq: u64, subject: &'a str, payload: &'a [u8]) -> EntryRef<'a> {
    EntryRef {
        kind: Kind::Record,
        seq,
        timestamp_ms: 1_700_000_000_000 + seq,
        prev_hash: [seq as u8; 32],
        key_version: 1,
        nonce: [7; 12],
        subject,
        payload,
    }
}

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn head(key: &SigningKey) -> SignedHead {
    SignedHead::sign(key, 0, 1000, 1063, [1; 32], [2; 32], 1_700_000_000_000)
}

fn entry_encode_hash(c: &mut Criterion) {
    let p = payload(PAYLOAD, 1);
    let mut g = c.benchmark_group("entry");
    g.throughput(Throughput::Bytes(
        entry(0, "cust-000001", &p).encoded_len() as u64
    ));
    g.bench_function("encode+hash 512 B", |b| {
        let mut seq = 0u64;
        b.iter(|| {
            seq += 1;
            let bytes = entry(black_box(seq), "cust-000001", &p).encode();
            black_box(entry_hash(&bytes))
        })
    });
    // A verifier's view: the entries of a chunk, hashed one after the
    // other or side by side (`entry_hashes`).
    let chunk: Vec<Vec<u8>> = (0..64)
        .map(|i| entry(1000 + i, "cust-000001", &p).encode())
        .collect();
    let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
    g.throughput(Throughput::Elements(refs.len() as u64));
    g.bench_function("hash 64 x 512 B one by one", |b| {
        b.iter(|| {
            black_box(
                black_box(&refs)
                    .iter()
                    .map(|e| entry_hash(e))
                    .collect::<Vec<Hash>>(),
            )
        })
    });
    g.bench_function("hash 64 x 512 B side by side", |b| {
        b.iter(|| black_box(entry_hashes(black_box(&refs))))
    });
    g.throughput(Throughput::Bytes(
        entry(0, "cust-000001", &p).encoded_len() as u64
    ));
    g.bench_function("decode 512 B", |b| {
        let bytes = entry(5, "cust-000001", &p).encode();
        b.iter(|| {
            black_box(EntryRef::decode(black_box(&bytes)).expect("a valid entry decodes"));
        })
    });
    g.finish();
}

fn chunk_encode_decode(c: &mut Criterion) {
    let p = payload(PAYLOAD, 2);
    let encoded: Vec<Vec<u8>> = (0..64)
        .map(|i| entry(1000 + i, "cust-000001", &p).encode())
        .collect();
    let entries: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let key = signing_key();
    let h = head(&key);
    let chunk = encode_chunk(1000, &entries, Some(&h));
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("encode 64 entries", |b| {
        b.iter(|| black_box(encode_chunk(1000, black_box(&entries), Some(&h))))
    });
    g.bench_function("decode 64 entries", |b| {
        b.iter(|| {
            let c = Chunk::decode(black_box(&chunk)).expect("a valid chunk decodes");
            black_box(c.entries.len())
        })
    });
    g.finish();
}

fn aead(c: &mut Criterion) {
    let key = SecretKey::generate();
    let msg = payload(PAYLOAD, 3);
    let aad = record_aad("cust-000001", 12345, 1);
    let (nonce, ct) = key.seal(&aad, &msg);
    let mut g = c.benchmark_group("aes-256-gcm-siv");
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    // SecretKey::seal draws a random nonce and expands the key per call,
    // as the key-wrapping paths do.
    g.bench_function("seal 512 B", |b| {
        b.iter(|| black_box(key.seal(black_box(&aad), black_box(&msg))))
    });
    g.bench_function("open 512 B", |b| {
        b.iter(|| {
            black_box(
                key.open(&nonce, black_box(&aad), black_box(&ct))
                    .expect("the sealed message opens"),
            )
        })
    });
    g.finish();
}

fn signed_head(c: &mut Criterion) {
    let key = signing_key();
    let public = key.verifying_key();
    let h = head(&key);
    let mut g = c.benchmark_group("signed head");
    g.bench_function("sign", |b| {
        let mut last = 1063u64;
        b.iter(|| {
            last += 1;
            black_box(SignedHead::sign(
                &key,
                0,
                1000,
                black_box(last),
                [1; 32],
                [2; 32],
                1_700_000_000_000,
            ))
        })
    });
    g.bench_function("verify (strict)", |b| {
        b.iter(|| assert!(black_box(&h).verify(&public)))
    });
    g.finish();
}

fn merkle(c: &mut Criterion) {
    let leaves: Vec<Hash> = (0..256u32).map(|i| entry_hash(&i.to_be_bytes())).collect();
    let mut g = c.benchmark_group("merkle 256 leaves");
    g.throughput(Throughput::Elements(256));
    g.bench_function("new", |b| {
        b.iter(|| black_box(MerkleTree::new(black_box(&leaves))))
    });
    g.bench_function("new + every path", |b| {
        b.iter(|| {
            let t = MerkleTree::new(black_box(&leaves));
            let n: usize = (0..leaves.len()).map(|i| t.path(i).len()).sum();
            black_box((t.root(), n))
        })
    });
    let tree = MerkleTree::new(&leaves);
    g.bench_function("every path of a built tree", |b| {
        b.iter(|| {
            let n: usize = (0..leaves.len())
                .map(|i| tree.path(black_box(i)).len())
                .sum();
            black_box(n)
        })
    });
    g.finish();
}

fn api_key(c: &mut Criterion) {
    let key = storage::generate_api_key();
    c.bench_function("api_key_hash", |b| {
        b.iter(|| black_box(storage::api_key_hash(black_box(&key))))
    });
}

/// What the committer does with a partner's stored policy for each
/// redemption: parse it, then check the token's purpose, fields and age,
/// the hour and the source address. A policy of three purposes, without
/// conditions, and with hours and 16 source networks (the address in the
/// last one).
fn policy_at_redemption(c: &mut Criterion) {
    use storage::state::{source_allowed, within_hours, PolicyTerms};
    let mut g = c.benchmark_group("policy at redemption");
    let purposes = serde_json::json!({
        "credit_check": {"fields": {"name": "partial", "income": "generalize", "iban": "redact"}},
        "kyc": {"fields": {"name": "reveal", "dob": "generalize", "email": "partial"}},
        "marketing": {"fields": {"email": "tokenize"}}
    });
    let networks: Vec<String> = (0..16).map(|i| format!("10.{i}.0.0/16")).collect();
    let fields = vec![
        ("name".to_string(), "partial".to_string()),
        ("income".to_string(), "generalize".to_string()),
    ];
    let source = Some(std::net::IpAddr::from([10, 15, 3, 4]));
    for (name, policy) in [
        (
            "no conditions",
            serde_json::json!({"purposes": purposes, "rate_limit_per_minute": 600}),
        ),
        (
            "hours and 16 networks",
            serde_json::json!({"purposes": purposes, "rate_limit_per_minute": 600,
                "allowed_hours_utc": [0, 24], "source_ips": networks}),
        ),
    ] {
        let stored = serde_json::json!({"partner_id": "lender-1", "policy": policy,
            "recorded_by": "admin-1"})
        .to_string()
        .into_bytes();
        g.bench_function(name, |b| {
            b.iter(|| {
                let p = PolicyTerms::decode(black_box(&stored)).expect("policy");
                black_box(
                    p.allows("credit_check", &fields)
                        && p.allows_age(Some(1_000), 2_000)
                        && within_hours(p.allowed_hours_utc, 2_000)
                        && source_allowed(&p.source_ips, source),
                )
            })
        });
    }
    g.finish();
}

/// One sled insert into a `state`-like tree of 100,000 keys, by the form
/// of the key and value: a minted token's derived state is `"t/"` and
/// 64 hex digits with its JSON payload (~300 B); the same state could be
/// keyed by the 32 raw bytes and hold the mint's seq (8 B). The indexer
/// writes one such key per minted token (docs/benchmarks.md, "Longer
/// runs").
fn derived_state_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("sled insert into 100,000 keys");
    for (name, hex, value_len) in [
        ("hex key, 300 B value", true, 300),
        ("raw key, 300 B value", false, 300),
        ("hex key, 8 B value", true, 8),
        ("raw key, 8 B value", false, 8),
    ] {
        let key = |i: u64| -> Vec<u8> {
            let h = blake3::hash(&i.to_le_bytes());
            if hex {
                format!("t/{}", h.to_hex()).into_bytes()
            } else {
                [b"t/".as_slice(), h.as_bytes()].concat()
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("sled");
        let tree = db.open_tree("state").expect("tree");
        let value = payload(value_len, 3);
        for i in 0..100_000 {
            tree.insert(key(i), value.as_slice()).expect("insert");
        }
        let mut next = 100_000;
        g.bench_function(name, |b| {
            b.iter(|| {
                next += 1;
                tree.insert(key(next), value.as_slice()).expect("insert")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    targets = entry_encode_hash, chunk_encode_decode, aead, signed_head, merkle, api_key,
        policy_at_redemption, derived_state_insert
}
criterion_main!(benches);
