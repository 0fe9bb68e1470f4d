//! Micro-benchmarks of the wire protocol and the per-request work of the
//! servers: frame and message encode/decode (a 512-byte append, a masked
//! data answer), every masking operator, and the hashes of tokens and API
//! keys. `cargo bench --bench protocol`; figures in docs/benchmarks.md.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use protocol::{encode_frame, Envelope, MaskOp, Message, MessageCodec};
use server::mask::{apply, apply_all, MaskKeys};
use std::hint::black_box;
use tokio_util::codec::{Decoder, Encoder};

/// A 512-byte record of five fields, as the append benchmarks send.
fn record() -> Vec<(String, String)> {
    let mut fields = vec![
        ("name".to_string(), "Ada Lovelace".to_string()),
        ("email".to_string(), "ada@example.com".to_string()),
        ("iban".to_string(), "GB33BUKB20201555555555".to_string()),
        ("dob".to_string(), "1815-12-10".to_string()),
    ];
    let used: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    fields.push(("notes".to_string(), "x".repeat(512 - used - 5)));
    fields
}

fn frames(c: &mut Criterion) {
    let append = Message::Append {
        subject: "cust-0001".into(),
        fields: record(),
    };
    let bytes = encode_frame(7, &append, 0).expect("encode");
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode append 512 B", |b| {
        b.iter(|| encode_frame(black_box(7), black_box(&append), 0).expect("encode"))
    });
    g.bench_function("decode append 512 B (codec)", |b| {
        let mut codec = MessageCodec::new();
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&bytes[..]));
            codec
                .decode(&mut buf)
                .expect("decode")
                .expect("a whole frame")
        })
    });
    let data = Message::Data {
        subject: "cust-0001".into(),
        seq: 42,
        fields: record(),
    };
    g.bench_function("encode data 512 B (codec)", |b| {
        let mut codec = MessageCodec::new();
        let mut out = BytesMut::with_capacity(1024);
        b.iter(|| {
            out.clear();
            codec
                .encode(Envelope::last(1, black_box(data.clone())), &mut out)
                .expect("encode");
        })
    });
    g.finish();
}

fn masking(c: &mut Criterion) {
    let keys = MaskKeys::derive_from(&[7u8; 32]);
    let mut g = c.benchmark_group("mask");
    g.throughput(Throughput::Elements(1));
    let cases = [
        (MaskOp::Reveal, "name", "Ada Lovelace"),
        (MaskOp::Redact, "name", "Ada Lovelace"),
        (MaskOp::Partial, "email", "ada@example.com"),
        (MaskOp::Partial, "iban", "GB33BUKB20201555555555"),
        (MaskOp::Tokenize, "iban", "GB33BUKB20201555555555"),
        (MaskOp::Hash, "iban", "GB33BUKB20201555555555"),
        (MaskOp::Generalize, "dob", "1815-12-10"),
        (MaskOp::Generalize, "income", "84000"),
    ];
    for (op, field, value) in cases {
        g.bench_function(format!("{} {field}", op.name()), |b| {
            b.iter(|| {
                apply(black_box(op), field, black_box(value), &keys, "demo-lender").expect("mask")
            })
        });
    }
    let fields = record();
    let wanted: Vec<(String, MaskOp)> = [
        ("name", MaskOp::Partial),
        ("email", MaskOp::Partial),
        ("iban", MaskOp::Tokenize),
        ("dob", MaskOp::Generalize),
    ]
    .iter()
    .map(|(f, op)| (f.to_string(), *op))
    .collect();
    g.bench_function("apply_all, 4 of 5 fields", |b| {
        b.iter(|| {
            apply_all(black_box(&wanted), black_box(&fields), &keys, "demo-lender").expect("mask")
        })
    });
    g.bench_function("derive partner keys", |b| {
        b.iter(|| MaskKeys::derive_from(black_box(&[7u8; 32])))
    });
    g.finish();
}

fn token_hashing(c: &mut Criterion) {
    let token = format!("{}{}", storage::vault::TOKEN_PREFIX, "ab".repeat(32));
    c.bench_function("token hash (api_key_hash of a token)", |b| {
        b.iter(|| storage::api_key_hash(black_box(&token)))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = frames, masking, token_hashing
}
criterion_main!(benches);
