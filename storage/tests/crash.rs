//! Crash safety: a child process appends from many tasks and prints every
//! acknowledged receipt; the parent kills it with SIGKILL at a random
//! moment, reopens the vault, and checks that every acknowledged append is
//! present and unchanged, seqs have no gaps, and the log verifies.
//!
//! The child is this same test binary, re-run with an environment variable
//! that makes `crash_child` do the work instead of returning at once.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use storage::{verify, Append, Options, Unlock, Vault, VerifyOptions};

const CHILD_ENV: &str = "FINTRUST_TEST_CRASH_CHILD_DIR";

fn unlock() -> Unlock {
    Unlock::passphrase(b"crash test".to_vec())
}

/// Runs only as the child: appends until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let vault = std::sync::Arc::new(
            Vault::open(Path::new(&dir), &unlock(), Options::default()).expect("child open"),
        );
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let v = vault.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    // New subjects keep appearing, so key creation is under test too.
                    let subject = format!("c{t}-{}", i / 3);
                    let body = format!("t{t}i{i}");
                    let r = v
                        .append(Append::record(subject.clone(), body.into_bytes()))
                        .await
                        .expect("append");
                    println!(
                        "ack {} {} {} t{t}i{i}",
                        r.seq,
                        hex::encode(r.entry_hash),
                        subject
                    );
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("v");
    let created = Vault::create(&dir, &unlock(), Options::default()).expect("create");
    let key = created.vault.public_key();
    created.vault.close().expect("close");
    let exe = std::env::current_exe().expect("test binary");
    // (seq, entry hash, subject, record) of each acknowledged append.
    let mut acked: Vec<(u64, String, String, String)> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for cycle in 0..5 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 50 + (rng % 400) as usize;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < kill_after {
            let Some(Ok(line)) = lines.next() else { break };
            if line.starts_with("ack ") {
                acked.push(parse_ack(&line).unwrap_or_else(|| panic!("a whole line: {line}")));
                seen += 1;
            }
        }
        // SIGKILL: no destructors, no flush.
        child.kill().expect("kill");
        let _ = child.wait();
        // Lines printed before the kill but not yet read are acknowledged too.
        acked.extend(lines.map_while(Result::ok).filter_map(|l| parse_ack(&l)));
        assert!(seen > 0, "cycle {cycle}: child acknowledged nothing");

        let vault = Vault::open(&dir, &unlock(), Options::default()).expect("reopen after kill");
        for (seq, hash, subject, body) in &acked {
            let e = vault
                .entry(*seq)
                .expect("read")
                .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged seq {seq} lost"));
            assert_eq!(
                &hex::encode(e.hash),
                hash,
                "cycle {cycle}: seq {seq} changed"
            );
            assert_eq!(&e.subject, subject);
            // It decrypts to what was appended, and the subject's latest
            // record is it or a later one.
            let record = vault.record_at(*seq).expect("decrypts").expect("a record");
            assert_eq!(
                record.plaintext.as_slice(),
                body.as_bytes(),
                "cycle {cycle}: seq {seq}"
            );
            let latest = vault
                .latest_record(subject)
                .expect("decrypts")
                .expect("a latest record");
            assert!(
                latest.seq >= *seq,
                "cycle {cycle}: {subject}'s latest went back"
            );
        }
        vault.close().expect("close");
        let report = verify(
            &dir,
            &VerifyOptions {
                public_key: Some(key),
                ..Default::default()
            },
        )
        .expect("verify runs");
        assert!(report.ok(), "cycle {cycle}: {:?}", report.failure);
    }
    let mut seqs: Vec<u64> = acked.iter().map(|a| a.0).collect();
    seqs.sort_unstable();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a seq was acknowledged twice");
}

/// An `ack SEQ HASH SUBJECT BODY` line of the child: what it was told
/// is durable.
fn parse_ack(line: &str) -> Option<(u64, String, String, String)> {
    let mut parts = line.strip_prefix("ack ")?.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let (hash, subject, body) = (parts.next()?, parts.next()?, parts.next()?);
    Some((seq, hash.to_string(), subject.to_string(), body.to_string()))
}
