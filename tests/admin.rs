//! `vault-admin` end to end: a real `vaultd dev` on ports the OS chose,
//! the binary run as a process, its exit codes (0 success, 1 local error,
//! 2 refused by the server), its JSON, and what the log says afterwards
//! (`vault-verify` lists the shredded subject).

mod support;

use std::ffi::OsStr;
use std::path::Path;

use serde_json::Value;
use support::{run_bin, run_bin_with_stdin, Run};

/// `vault-admin` with the connection flags after the subcommand (they
/// are global), JSON output.
fn admin(addr: &str, key: &str, args: &[&str]) -> Run {
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "--addr",
        addr,
        "--api-key",
        key,
        "--insecure-plaintext",
        "--format",
        "json",
    ]);
    run_bin("fintrust-server", "vault-admin", all, &[])
}

fn refused(r: &Run, code: &str) {
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains(code), "expected {code}: {r:?}");
}

fn wait_unlocked(dir: &Path) {
    let f = std::fs::File::open(dir.join("db").join("db")).expect("open sled's data file");
    f.lock().expect("wait for sled's lock");
}

#[test]
fn vault_admin_shreds_rotates_and_reports_keys_with_exit_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let dev = support::DevServer::start(&dir);
    let addr = dev.get("vault_addr");
    let key = dev.get("admin_api_key");
    let subject = dev.get("demo_subject_id");
    let public_key = dev.get("public_key");

    // Status and keys: every demo subject has an active version 1.
    let status = admin(&addr, &key, &["status"]).ok_json();
    assert!(status["entries"].as_u64().expect("entries") > 5, "{status}");
    assert_eq!(status["public_key"], public_key.as_str());
    assert!(status["subject_keys"]["active"].as_u64().expect("active") >= 1);
    let keys = admin(&addr, &key, &["keys"]).ok_json();
    let demo: Vec<&Value> = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["subject"] == subject.as_str())
        .collect();
    assert_eq!(demo.len(), 1, "{keys}");
    assert_eq!(demo[0]["state"], "active");
    assert_eq!(demo[0]["version"], 1);
    assert_eq!(keys["encryption_limit"], 1u64 << 32);

    // A shred pinned to a key that is not this vault's is refused before
    // it is sent: the subject's key stays.
    let foreign = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
            .verifying_key()
            .to_bytes(),
    );
    let r = admin(
        &addr,
        &key,
        &["shred", "--subject", &subject, "--public-key", &foreign],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("nothing was sent"), "{r:?}");
    let keys = admin(&addr, &key, &["keys"]).ok_json();
    assert!(
        keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["subject"] == subject.as_str() && k["state"] == "active"),
        "{keys}"
    );

    // Rotate with re-encryption; the env vars work as well as the flags.
    let r = run_bin(
        "fintrust-server",
        "vault-admin",
        [
            "rotate-subject-key",
            "--subject",
            &subject,
            "--reencrypt",
            "--insecure-plaintext",
            "--format",
            "json",
        ],
        &[("FINTRUST_ADDR", &addr), ("FINTRUST_API_KEY", &key)],
    )
    .ok_json();
    assert_eq!(r["version"], 2);
    assert_eq!(
        r["reencrypted_seq"].as_u64(),
        r["seq"].as_u64().map(|s| s + 1)
    );
    let keys = admin(&addr, &key, &["keys"]).ok_json();
    let states: Vec<(u64, String)> = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["subject"] == subject.as_str())
        .map(|k| {
            (
                k["version"].as_u64().expect("version"),
                k["state"].as_str().expect("state").to_string(),
            )
        })
        .collect();
    assert_eq!(states, vec![(1, "retired".into()), (2, "active".into())]);

    // A dry run shows the target and shreds nothing.
    let dry = admin(&addr, &key, &["shred", "--subject", &subject, "--dry-run"]).ok_json();
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["addr"], addr.as_str(), "{dry}");
    let versions: Vec<(u64, &str)> = dry["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["version"].as_u64().expect("v"),
                k["state"].as_str().expect("s"),
            )
        })
        .collect();
    assert_eq!(versions, vec![(1, "retired"), (2, "active")], "{dry}");
    assert_eq!(dry["would"], "shred", "{dry}");

    // Shred, then every refusal exits 2 with its code.
    let shred = admin(&addr, &key, &["shred", "--subject", &subject]).ok_json();
    assert_eq!(shred["shredded"], true);
    refused(
        &admin(&addr, &key, &["shred", "--subject", &subject]),
        "subject_shredded",
    );
    // A dry run says so beforehand.
    let dry = admin(&addr, &key, &["shred", "--subject", &subject, "--dry-run"]).ok_json();
    assert_eq!(dry["would"], "refused: subject_shredded", "{dry}");
    let dry = admin(
        &addr,
        &key,
        &["shred", "--subject", "nobody-at-all", "--dry-run"],
    )
    .ok_json();
    assert_eq!(dry["would"], "refused: not_found", "{dry}");
    refused(
        &admin(&addr, &key, &["rotate-subject-key", "--subject", &subject]),
        "subject_shredded",
    );
    refused(
        &admin(&addr, &key, &["shred", "--subject", "nobody-at-all"]),
        "not_found",
    );
    let keys = admin(&addr, &key, &["keys"]).ok_json();
    assert!(keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["subject"] == subject.as_str())
        .all(|k| k["state"] == "shredded"));

    // Other roles are refused.
    let partner = dev.get("partner_api_key");
    refused(
        &admin(&addr, &partner, &["shred", "--subject", "cust-0002"]),
        "forbidden",
    );
    // So are its reads of the log, which go through the server crate.
    refused(&admin(&addr, &partner, &["audit"]), "forbidden");
    let export = tmp.path().join("refused.export");
    let export = export.to_str().expect("a UTF-8 path");
    refused(
        &admin(&addr, &partner, &["export", "--out", export]),
        "forbidden",
    );

    // Credentials: create an auditor, which may not see key status;
    // revoke it; a second revocation is not found.
    let created = admin(
        &addr,
        &key,
        &[
            "credentials",
            "create",
            "--role",
            "auditor",
            "--name",
            "ops-audit",
        ],
    )
    .ok_json();
    let id = created["id"].as_str().expect("id").to_string();
    let auditor = created["api_key"].as_str().expect("api key").to_string();
    refused(&admin(&addr, &auditor, &["keys"]), "forbidden");
    let revoked = admin(&addr, &key, &["credentials", "revoke", "--id", &id]).ok_json();
    assert_eq!(revoked["revoked"], true);
    refused(
        &admin(&addr, &key, &["credentials", "revoke", "--id", &id]),
        "not_found",
    );

    // Local errors exit 1: no TLS choice, no key, nothing listening.
    let no_tls = run_bin(
        "fintrust-server",
        "vault-admin",
        ["status", "--addr", &addr, "--api-key", &key],
        &[],
    );
    assert_eq!(no_tls.code, 1, "{no_tls:?}");
    let no_key = run_bin(
        "fintrust-server",
        "vault-admin",
        ["status", "--addr", &addr, "--insecure-plaintext"],
        &[],
    );
    assert_eq!(no_key.code, 1, "{no_key:?}");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr").to_string();
        drop(l);
        admin(&a, &key, &["status"])
    };
    assert_eq!(closed.code, 1, "{closed:?}");
    let usage = run_bin("fintrust-server", "vault-admin", ["shred"], &[]);
    assert_eq!(usage.code, 1, "{usage:?}");

    // After a clean stop the log verifies and names the shredded subject.
    let status = dev.stop();
    assert!(status.success(), "{status}");
    let verified = verify_dir(&dir, &public_key);
    assert!(
        verified.stderr.contains(&format!(
            "shredded: 1 subject(s), whose data keys the log records destroyed: {subject}"
        )),
        "{verified:?}"
    );
    let v = verified.ok_json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["shredded"], serde_json::json!([subject]));
}

#[test]
fn vault_admin_rotates_the_signing_and_master_keys_online_and_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let dev = support::DevServer::start(&dir);
    let addr = dev.get("vault_addr");
    let key = dev.get("admin_api_key");
    let writer = dev.get("writer_api_key");
    let public_key = dev.get("public_key");

    // Signing key: the receipt is signed by key 0, the new key is 1.
    let r = admin(
        &addr,
        &key,
        &["rotate-signing-key", "--public-key", &public_key],
    )
    .ok_json();
    assert_eq!(r["key_id"], 1, "{r}");
    let status = admin(&addr, &key, &["status"]).ok_json();
    assert_eq!(status["signing_key_id"], 1, "{status}");
    assert_eq!(
        status["rotation_policy"]["max_signing_key_age_secs"],
        90 * 86_400,
        "vaultd dev's rotation policy"
    );
    assert_eq!(status["warnings"], serde_json::json!([]));
    // A record appended now is signed by key 1; vault-client checks its
    // receipt through the key chain from the pinned key 0.
    let record = tmp.path().join("record.json");
    std::fs::write(&record, r#"{"name":"Ada"}"#).expect("write");
    let append = run_bin(
        "fintrust-client",
        "vault-client",
        [
            "append",
            "--subject",
            "after-rotation",
            "--record-file",
            record.to_str().expect("utf-8"),
            "--addr",
            &addr,
            "--api-key",
            &writer,
            "--insecure-plaintext",
            "--public-key",
            &public_key,
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(append.code, 0, "{append:?}");

    // Master key, online, to a new passphrase file.
    let new_pass = tmp.path().join("new-passphrase");
    std::fs::write(&new_pass, "a new master passphrase\n").expect("write");
    // Never in plaintext to another host: refused before connecting (the
    // address is TEST-NET-1's, which nothing answers), a local error.
    let far = admin(
        "192.0.2.1:9999",
        &key,
        &[
            "rotate-master-key",
            "--new-passphrase-file",
            new_pass.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(far.code, 1, "{far:?}");
    assert!(
        far.stderr.contains("would cross the network in plaintext"),
        "{far:?}"
    );
    // From a pipe, as `--new-passphrase-file <(gpg -d …)` gives it: read
    // once.
    let r = run_bin_with_stdin(
        "fintrust-server",
        "vault-admin",
        [
            "rotate-master-key",
            "--new-passphrase-file",
            "/dev/stdin",
            "--addr",
            &addr,
            "--api-key",
            &key,
            "--insecure-plaintext",
            "--format",
            "json",
        ],
        &[],
        &std::fs::read(&new_pass).expect("read"),
    )
    .ok_json();
    assert_eq!(r["rotated"], "master", "{r}");
    // Without a new secret: a local error, nothing sent.
    let none = admin(&addr, &key, &["rotate-master-key"]);
    assert_eq!(none.code, 1, "{none:?}");
    // A new secret that cannot be read is named before any connection is
    // made: here to a port nothing listens on.
    let unread = admin(
        "127.0.0.1:1",
        &key,
        &[
            "rotate-master-key",
            "--new-passphrase-file",
            "/nonexistent/new-passphrase",
        ],
    );
    assert_eq!(unread.code, 1, "{unread:?}");
    assert!(
        unread.stderr.contains("the new secret") && !unread.stderr.contains("connect"),
        "{unread:?}"
    );
    let status = dev.stop();
    assert!(status.success(), "{status}");

    // Offline, on the stopped data dir: the old dev passphrase is refused,
    // the new one opens it; then a key file.
    wait_unlocked(&dir);
    let dev_pass = dir.join("dev-passphrase");
    let offline = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--format",
            "json",
        ]);
        run_bin("fintrust-server", "vault-admin", all, &[])
    };
    let old = offline(&[
        "rotate-signing-key",
        "--passphrase-file",
        dev_pass.to_str().expect("utf-8"),
    ]);
    assert_eq!(old.code, 1, "the old passphrase no longer opens: {old:?}");
    // A key pinned that is another vault's: nothing is rotated.
    let other = "ab".repeat(32);
    let pass = new_pass.to_str().expect("utf-8");
    for command in [
        &["rotate-signing-key"][..],
        &["rotate-master-key", "--new-passphrase-file", pass],
    ] {
        let mut args = command.to_vec();
        args.extend(["--passphrase-file", pass, "--public-key", &other]);
        let r = offline(&args);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains("not the one --public-key"), "{r:?}");
        wait_unlocked(&dir);
    }
    let r = offline(&[
        "rotate-signing-key",
        "--passphrase-file",
        new_pass.to_str().expect("utf-8"),
        "--public-key",
        &public_key,
    ])
    .ok_json();
    assert_eq!(r["key_id"], 2, "{r}");
    wait_unlocked(&dir);
    let key_file = tmp.path().join("master.key");
    std::fs::write(&key_file, hex_key()).expect("write");
    let r = offline(&[
        "rotate-master-key",
        "--passphrase-file",
        new_pass.to_str().expect("utf-8"),
        "--new-key-file",
        key_file.to_str().expect("utf-8"),
    ])
    .ok_json();
    assert_eq!(r["rotated"], "master", "{r}");

    // The log verifies from the pinned genesis key through keys 1 and 2.
    let v = verify_dir(&dir, &public_key).ok_json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["signing_key_id"], 2, "{v}");
}

/// 64 hex digits of a key file.
fn hex_key() -> String {
    "0f".repeat(32)
}

/// The JSON lines of an `audit` run.
fn lines(r: &Run) -> Vec<Value> {
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// `vault-verify` with `args`: its exit code and output.
fn verify(args: &[&OsStr]) -> Run {
    run_bin("fintrust-server", "vault-verify", args, &[])
}

/// `vault-verify --data-dir DIR --public-key KEY --json`, once the
/// stopped vault's lock is free.
fn verify_dir(dir: &Path, key: &str) -> Run {
    wait_unlocked(dir);
    verify(&[
        OsStr::new("--data-dir"),
        dir.as_os_str(),
        OsStr::new("--public-key"),
        OsStr::new(key),
        OsStr::new("--json"),
    ])
}

/// `vault-verify --file FILE --public-key KEY --json`.
fn verify_file(file: &Path, key: &str) -> Run {
    verify(&[
        OsStr::new("--file"),
        file.as_os_str(),
        OsStr::new("--public-key"),
        OsStr::new(key),
        OsStr::new("--json"),
    ])
}

/// (offset, tag, end) of each record of an export file.
fn export_records(file: &[u8]) -> Vec<(usize, u8, usize)> {
    let mut out = Vec::new();
    let mut at = storage::export::EXPORT_HEADER_LEN;
    while at + 5 <= file.len() {
        let len = u32::from_be_bytes(file[at + 1..at + 5].try_into().expect("4 bytes")) as usize;
        out.push((at, file[at], at + 5 + len));
        at += 5 + len;
    }
    out
}

#[test]
fn vault_admin_lists_credentials_audits_exports_and_reindexes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("dev");
    let dev = support::DevServer::start(&dir);
    let addr = dev.get("vault_addr");
    let key = dev.get("admin_api_key");
    let subject = dev.get("demo_subject_id");
    let public_key = dev.get("public_key");

    // Credentials: a revoked auditor is listed as revoked, a live one as
    // live; no key hash is ever printed.
    let create = |role: &str, name: &str| {
        admin(
            &addr,
            &key,
            &["credentials", "create", "--role", role, "--name", name],
        )
        .ok_json()
    };
    let gone = create("auditor", "old-audit");
    let gone_id = gone["id"].as_str().expect("id").to_string();
    admin(&addr, &key, &["credentials", "revoke", "--id", &gone_id]).ok_json();
    let auditor = create("auditor", "ops-audit");
    let auditor_key = auditor["api_key"].as_str().expect("key").to_string();
    let listed = admin(&addr, &key, &["credentials", "list"]);
    assert!(!listed.stdout.contains("key_hash"), "{listed:?}");
    let listed = listed.ok_json();
    let creds = listed["credentials"].as_array().expect("credentials");
    let by_id = |id: &str| {
        creds
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {listed}"))
    };
    let old = by_id(&gone_id);
    assert_eq!(old["revoked"], true);
    assert_eq!(old["role"], "auditor");
    assert_eq!(old["name"], "old-audit");
    assert!(old["revoked_seq"].as_u64() > old["created_seq"].as_u64());
    let live = by_id(auditor["id"].as_str().expect("id"));
    assert_eq!(live["revoked"], false);
    assert!(live["created_ms"].as_u64().expect("created_ms") > 0);
    // Held by API keys: no certificate named.
    assert!(live["client_cert_sha256"].is_null(), "{live}");
    assert!(old["client_cert_sha256"].is_null(), "{old}");
    assert!(creds.iter().any(|c| c["role"] == "admin"));
    let ids: Vec<&str> = creds.iter().filter_map(|c| c["id"].as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted);
    refused(
        &admin(&addr, &auditor_key, &["credentials", "list"]),
        "forbidden",
    );

    // Audit: JSON lines of every event, no records, no personal data.
    let all = admin(&addr, &auditor_key, &["audit"]);
    for pii in ["Ada Lovelace", "GB33BUKB20201555555555", "ada@example.com"] {
        assert!(!all.stdout.contains(pii), "{pii} in the audit output");
    }
    let all = lines(&all);
    assert!(all.len() > 5, "{all:?}");
    assert_eq!(all[0]["kind"], "genesis");
    assert_eq!(all[0]["seq"], 0);
    assert!(all[0]["payload"]["public_key"] == public_key.as_str());
    assert!(all.iter().all(|l| l["kind"] != "record"));
    let seqs: Vec<u64> = all.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(all.iter().all(|l| l["timestamp_ms"].as_u64().is_some()));
    let revoked = lines(&admin(
        &addr,
        &key,
        &["audit", "--kind", "credential_revoked"],
    ));
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["payload"]["id"], gone_id.as_str());
    let two_kinds = lines(&admin(
        &addr,
        &key,
        &["audit", "--kind", "credential_revoked", "--kind", "genesis"],
    ));
    assert_eq!(two_kinds.len(), 2);
    let limited = lines(&admin(
        &addr,
        &key,
        &["audit", "--from-seq", "1", "--limit", "3"],
    ));
    assert_eq!(limited.len(), 3);
    assert!(limited.iter().all(|l| l["seq"].as_u64() >= Some(1)));
    let records = admin(
        &addr,
        &key,
        &["audit", "--include-records", "--subject", &subject],
    );
    for pii in ["Ada Lovelace", "GB33BUKB20201555555555"] {
        assert!(!records.stdout.contains(pii), "{pii} in the audit output");
    }
    let records = lines(&records);
    assert!(records.iter().all(|l| l["subject"] == subject.as_str()));
    let recs: Vec<&Value> = records.iter().filter(|l| l["kind"] == "record").collect();
    assert!(!recs.is_empty(), "{records:?}");
    for r in recs {
        assert!(r["key_version"].as_u64() >= Some(1), "{r}");
        assert!(r.get("payload").is_none(), "{r}");
    }
    let bad = admin(&addr, &key, &["audit", "--kind", "no_such_kind"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    let bad = admin(&addr, &key, &["audit", "--kind", "record"]);
    assert_eq!(bad.code, 1, "{bad:?}");

    // Export online; vault-verify --file checks it.
    let file = tmp.path().join("vault.export");
    let exported = admin(
        &addr,
        &key,
        &["export", "--out", file.to_str().expect("utf-8")],
    )
    .ok_json();
    assert!(exported["entries"].as_u64() > Some(5), "{exported}");
    let v = verify_file(&file, &public_key);
    let j = v.ok_json();
    assert_eq!(v.code, 0, "{v:?}");
    assert_eq!(j["ok"], true);
    assert_eq!(j["mode"], "file");
    assert_eq!(j["entries"], exported["entries"]);
    let bytes = std::fs::read(&file).expect("read the export");
    let damaged = |name: &str, content: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, content).expect("write");
        p
    };
    let mut flipped = bytes.clone();
    let mid = bytes.len() / 2;
    flipped[mid] ^= 0x01;
    for (name, content) in [
        ("flipped", flipped),
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("headless", bytes[..bytes.len() / 3].to_vec()),
    ] {
        let r = verify_file(&damaged(name, &content), &public_key);
        assert_eq!(r.code, 1, "{name}: {r:?}");
        let j: Value = serde_json::from_str(r.stdout.trim()).expect("json");
        assert_eq!(j["ok"], false, "{name}: {j}");
    }
    let entry = export_records(&bytes)
        .into_iter()
        .filter(|r| r.1 == storage::export::TAG_ENTRY)
        .nth(4)
        .expect("a fifth entry");
    let missing = [&bytes[..entry.0], &bytes[entry.2..]].concat();
    let r = verify_file(&damaged("missing", &missing), &public_key);
    assert_eq!(r.code, 1, "{r:?}");
    let other = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[7; 32])
            .verifying_key()
            .as_bytes(),
    );
    let r = verify_file(&file, &other);
    assert_eq!(r.code, 1, "{r:?}");
    let r = verify_file(
        &damaged("garbage", b"this is not an export at all"),
        &public_key,
    );
    assert_eq!(r.code, 2, "{r:?}");
    let r = verify_file(&tmp.path().join("no-such-file"), &public_key);
    assert_eq!(r.code, 2, "{r:?}");

    // Reindex online: the served state is the log's.
    let online = admin(&addr, &key, &["reindex"]).ok_json();
    assert_eq!(online["differences"], 0, "{online}");
    assert_eq!(online["mode"], "online");
    // The state tree is compared at its `applied` marker: on a young
    // vault the indexer may not have written past the first commit yet.
    assert!(online["entries"].as_u64() >= Some(1), "{online}");
    assert!(online["keys_compared"].as_u64() >= Some(1), "{online}");
    refused(&admin(&addr, &auditor_key, &["reindex"]), "forbidden");
    // `vaultd`'s secret in the environment does not stop an online
    // reindex; given on the command line without --data-dir, it is
    // refused before anything is asked.
    let online = run_bin(
        "fintrust-server",
        "vault-admin",
        [
            "reindex",
            "--addr",
            &addr,
            "--api-key",
            &key,
            "--insecure-plaintext",
            "--format",
            "json",
        ],
        &[("FINTRUST_PASSPHRASE_FILE", "/nonexistent/passphrase")],
    )
    .ok_json();
    assert_eq!(online["mode"], "online", "{online}");
    let r = admin(
        &addr,
        &key,
        &["reindex", "--passphrase-file", "/nonexistent/passphrase"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("needs --data-dir"), "{r:?}");

    // A credential whose key cannot be shown (stdout closed) is revoked
    // again: none is left live that nobody holds the key of.
    // `vault-admin ARGS` online with stdout a closed pipe (`| head -0`).
    let into_closed_pipe = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--addr", &addr, "--api-key", &key, "--insecure-plaintext"]);
        support::run_bin_into_closed_pipe("fintrust-server", "vault-admin", all, &[])
    };
    let r = into_closed_pipe(&[
        "credentials",
        "create",
        "--role",
        "writer",
        "--name",
        "never-shown",
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("was revoked again"), "{r:?}");
    let list = admin(&addr, &key, &["credentials", "list"]).ok_json();
    let never: Vec<&Value> = list["credentials"]
        .as_array()
        .expect("credentials")
        .iter()
        .filter(|c| c["name"] == "never-shown")
        .collect();
    assert_eq!(never.len(), 1, "{list}");
    assert_eq!(never[0]["revoked"], true, "{list}");
    // A rotation made whose answer cannot be printed says it was made: a
    // script that ran it again would rotate twice.
    let before = admin(&addr, &key, &["keys"]).ok_json();
    let r = into_closed_pipe(&["rotate-signing-key"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("the change was made"), "{r:?}");
    let after = admin(&addr, &key, &["keys"]).ok_json();
    let id = |k: &Value| k["signing"]["key_id"].as_u64().expect("a key id");
    assert_eq!(id(&after), id(&before) + 1, "{after}");

    // Offline, on the stopped vault.
    let status = dev.stop();
    assert!(status.success(), "{status}");
    wait_unlocked(&dir);
    let dir_s = dir.to_str().expect("utf-8").to_string();
    let offline = lines(&admin(
        &addr,
        &key,
        &[
            "audit",
            "--data-dir",
            &dir_s,
            "--kind",
            "credential_revoked",
        ],
    ));
    // The same events (the dev server revoked its shim's key on the way out).
    assert_eq!(offline.get(..revoked.len()), Some(revoked.as_slice()));
    let before = support::dir_contents(&dir);
    let read_only = lines(&admin(
        &addr,
        &key,
        &[
            "audit",
            "--data-dir",
            &dir_s,
            "--read-only",
            "--kind",
            "credential_revoked",
        ],
    ));
    assert_eq!(read_only, offline);
    assert_eq!(
        support::dir_contents(&dir),
        before,
        "a read-only audit wrote to the dir"
    );
    let file2 = tmp.path().join("offline.export");
    let exported2 = admin(
        &addr,
        &key,
        &[
            "export",
            "--data-dir",
            &dir_s,
            "--out",
            file2.to_str().expect("utf-8"),
        ],
    )
    .ok_json();
    assert_eq!(exported2["mode"], "offline");
    assert!(exported2["entries"].as_u64() >= exported["entries"].as_u64());
    assert_eq!(verify_file(&file2, &public_key).code, 0);
    // Read-only: the same file, and the data dir as it was.
    let before = support::dir_contents(&dir);
    let file3 = tmp.path().join("read-only.export");
    let exported3 = admin(
        &addr,
        &key,
        &[
            "export",
            "--data-dir",
            &dir_s,
            "--read-only",
            "--out",
            file3.to_str().expect("utf-8"),
        ],
    )
    .ok_json();
    assert_eq!(exported3["entries"], exported2["entries"]);
    assert_eq!(
        std::fs::read(&file3).expect("read"),
        std::fs::read(&file2).expect("read")
    );
    assert_eq!(
        support::dir_contents(&dir),
        before,
        "a read-only export wrote to the dir"
    );

    // A state tree altered by hand: reindex reports it (exit 1), repairs
    // it with --repair, and the data dir verifies again.
    {
        let raw = storage::RawStore::open(&dir).expect("raw trees");
        let k = format!("s/{subject}");
        let mut v = raw
            .state
            .get(k.as_bytes())
            .expect("get")
            .expect("pointer")
            .to_vec();
        v[7] ^= 1;
        raw.state.insert(k.as_bytes(), v).expect("insert");
        raw.flush().expect("flush");
    }
    let pass = dir.join("dev-passphrase");
    let pass_s = pass.to_str().expect("utf-8");
    let found = admin(
        &addr,
        &key,
        &["reindex", "--data-dir", &dir_s, "--passphrase-file", pass_s],
    );
    assert_eq!(found.code, 1, "{found:?}");
    let report: Value = serde_json::from_str(found.stdout.trim()).expect("json");
    assert_eq!(report["differences"], 1, "{report}");
    assert_eq!(report["repaired"], false);
    assert!(report["sample"][0]
        .as_str()
        .is_some_and(|s| s.contains(&subject)));
    let wrong = tmp.path().join("wrong-pass");
    std::fs::write(&wrong, "not the passphrase").expect("write");
    let refused_secret = admin(
        &addr,
        &key,
        &[
            "reindex",
            "--data-dir",
            &dir_s,
            "--passphrase-file",
            wrong.to_str().expect("utf-8"),
            "--repair",
        ],
    );
    assert_eq!(refused_secret.code, 1, "{refused_secret:?}");
    let repaired = admin(
        &addr,
        &key,
        &[
            "reindex",
            "--data-dir",
            &dir_s,
            "--passphrase-file",
            pass_s,
            "--repair",
        ],
    )
    .ok_json();
    assert_eq!(repaired["repaired"], true, "{repaired}");
    let again = admin(
        &addr,
        &key,
        &["reindex", "--data-dir", &dir_s, "--passphrase-file", pass_s],
    )
    .ok_json();
    assert_eq!(again["differences"], 0, "{again}");
    // A --passphrase-file on the command line wins over a key file from
    // the environment (`vaultd`'s, say), as a flag wins everywhere;
    // both on the command line are refused.
    let stray_key = tmp.path().join("stray.key");
    std::fs::write(&stray_key, "00".repeat(32)).expect("write");
    let stray_key = stray_key.to_str().expect("utf-8");
    let reindex = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["reindex", "--data-dir", &dir_s, "--format", "json"];
        all.extend(args);
        run_bin("fintrust-server", "vault-admin", all, env)
    };
    let flag_wins = reindex(
        &["--passphrase-file", pass_s],
        &[("FINTRUST_KEY_FILE", stray_key)],
    )
    .ok_json();
    assert_eq!(flag_wins["differences"], 0, "{flag_wins}");
    let both = reindex(&["--passphrase-file", pass_s, "--key-file", stray_key], &[]);
    assert_eq!(both.code, 1, "{both:?}");
    assert!(both.stderr.contains("not both"), "{both:?}");
    let v = verify_dir(&dir, &public_key).ok_json();
    assert_eq!(v["ok"], true, "{v}");
}

/// `--passphrase-file` or `--key-file` on the command line without
/// `--data-dir` is refused before anything is sent (the rotation would
/// otherwise go to the server and leave the flag unused); the same value
/// from the environment (which `vaultd` reads too) is left alone.
#[test]
fn an_offline_flag_without_a_data_dir_is_refused_before_connecting() {
    // Nothing listens on port 1: a command that connects fails otherwise.
    let addr = "127.0.0.1:1";
    for (command, flag) in [
        ("rotate-signing-key", "--passphrase-file"),
        ("rotate-signing-key", "--key-file"),
        ("rotate-master-key", "--passphrase-file"),
    ] {
        let mut args = vec![command, flag, "/nonexistent/secret"];
        if command == "rotate-master-key" {
            args.extend(["--new-passphrase-file", "/nonexistent/new"]);
        }
        let r = admin(addr, "fvk_unused", &args);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(
            r.stderr.contains(flag) && r.stderr.contains("needs --data-dir"),
            "{r:?}"
        );
    }
    let r = run_bin(
        "fintrust-server",
        "vault-admin",
        [
            "rotate-signing-key",
            "--addr",
            addr,
            "--api-key",
            "fvk_unused",
            "--insecure-plaintext",
        ],
        &[("FINTRUST_PASSPHRASE_FILE", "/nonexistent/secret")],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        !r.stderr.contains("needs --data-dir") && r.stderr.contains(addr),
        "from the environment, the flag is vaultd's: {r:?}"
    );
}

/// An admin key lost: `credentials create --data-dir` makes a new one on
/// the stopped vault with its passphrase (no API key, no server), and
/// `credentials revoke --data-dir` revokes the old one; a served vault
/// then takes the new key and refuses the old. Neither names anyone as
/// `recorded_by` (no credential asked), and the log verifies.
#[test]
fn an_admin_key_is_made_and_revoked_offline_with_the_passphrase() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let pass = tmp.path().join("passphrase");
    std::fs::write(&pass, "an offline recovery passphrase\n").expect("write");
    let init = run_bin(
        "fintrust-server",
        "vaultd",
        [
            "init",
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
            "--json",
        ],
        &[],
    )
    .ok_json();
    let lost = init["admin_api_key"]
        .as_str()
        .expect("admin key")
        .to_string();
    let public_key = init["public_key"].as_str().expect("public key").to_string();
    let offline = |args: &[&str], secret: &Path| {
        let mut all = args.to_vec();
        all.extend([
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--passphrase-file",
            secret.to_str().expect("utf-8"),
            "--public-key",
            &public_key,
            "--format",
            "json",
        ]);
        run_bin("fintrust-server", "vault-admin", all, &[])
    };
    // A wrong passphrase, a role that is none, a name that is no label:
    // local errors, nothing written.
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not the passphrase\n").expect("write");
    let entries = || verify_dir(&dir, &public_key).ok_json()["entries"].clone();
    let before = entries();
    for (args, secret) in [
        (
            &["credentials", "create", "--role", "admin", "--name", "r"][..],
            &wrong,
        ),
        (
            &["credentials", "create", "--role", "root", "--name", "r"][..],
            &pass,
        ),
        (
            &["credentials", "create", "--role", "admin", "--name", ""][..],
            &pass,
        ),
    ] {
        let r = offline(args, secret);
        assert_eq!(r.code, 1, "{r:?}");
        wait_unlocked(&dir);
    }
    assert_eq!(entries(), before);
    // The passphrase flag without --data-dir would go to a server.
    let r = admin(
        "127.0.0.1:1",
        "fvk_unused",
        &[
            "credentials",
            "create",
            "--role",
            "admin",
            "--name",
            "r",
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("needs --data-dir"), "{r:?}");

    let made = offline(
        &[
            "credentials",
            "create",
            "--role",
            "admin",
            "--name",
            "recovery",
        ],
        &pass,
    )
    .ok_json();
    assert_eq!(made["role"], "admin", "{made}");
    let key = made["api_key"].as_str().expect("api key").to_string();
    assert!(key.starts_with("fvk_"), "{made}");
    wait_unlocked(&dir);
    // The lost key's credential, found offline in the log.
    let audit = run_bin(
        "fintrust-server",
        "vault-admin",
        [
            "audit",
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--kind",
            "credential_created",
        ],
        &[],
    );
    assert_eq!(audit.code, 0, "{audit:?}");
    let created = lines(&audit);
    assert_eq!(created.len(), 2, "{created:?}");
    for c in &created {
        assert!(c.to_string().contains("\"role\":\"admin\""), "{c}");
        assert!(!c.to_string().contains("recorded_by"), "{c}");
    }
    let old_id = created[0]["payload"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("an id in {}", created[0]))
        .to_string();
    assert_eq!(created[1]["payload"]["id"], made["id"]);
    wait_unlocked(&dir);
    let r = offline(&["credentials", "revoke", "--id", &old_id], &pass).ok_json();
    assert_eq!(r["revoked"], true, "{r}");
    wait_unlocked(&dir);
    // Revoked already: the vault's refusal.
    let again = offline(&["credentials", "revoke", "--id", &old_id], &pass);
    refused(&again, "not_found");
    wait_unlocked(&dir);

    let mut cmd = std::process::Command::new(support::binary("fintrust-server", "vaultd"));
    support::serve_args(&mut cmd, &dir, &pass, None);
    let served = support::Vaultd::spawn(cmd).unwrap_or_else(|e| panic!("{e}"));
    let status = admin(&served.protocol, &key, &["status"]);
    assert_eq!(status.code, 0, "{status:?}");
    refused(
        &admin(&served.protocol, &lost, &["status"]),
        "unauthenticated",
    );
    let stopped = served.stop();
    assert!(stopped.success(), "{stopped}");
    let v = verify_dir(&dir, &public_key).ok_json();
    assert_eq!(v["ok"], true, "{v}");
}
