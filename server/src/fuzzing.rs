//! Entry points for fuzzers and property tests over what the shim parses
//! from operators and the log (policies files in TOML, a policy in JSON) and
//! over the masking operators, which see every record value. Each asserts
//! what must hold whatever the input: no panic; a policy that parses and
//! validates survives a JSON round trip unchanged and still validates;
//! masking returns exactly the requested fields, `reveal` the value itself,
//! and `tokenize` and `hash` the same output for the same input.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line shims over these
//! functions; the proptests below run them on stable in CI.

use protocol::MaskOp;

use crate::mask::{apply, apply_all, MaskKeys};
use crate::shim::{PoliciesFile, Policy, ShimConfig};

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

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::num::u8::ANY;
    use proptest::prelude::*;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

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
}
