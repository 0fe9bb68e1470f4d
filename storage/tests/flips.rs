//! Random byte flips across every file of a closed data dir.
//!
//! A small vault (records of three subjects, an event, a credential, a
//! subject-key rotation, a second signing key) is closed; its files are
//! the population. Every file gets flips, the rest are spread by size.
//! Each flip damages a fresh copy of the data dir, and then:
//!
//! - nothing panics: `verify`, `Vault::open`, reads and the derived-state
//!   check either succeed or return a typed error that names damage
//!   (integrity, decryption, an undecodable value, sled's or the file
//!   system's error), never one of the harness or of the vault's use (a
//!   lock still held, a closed vault), which would count an unnoticed
//!   flip as noticed; a record refused as shredded is a detection only
//!   when the derived-state check finds the state it came from damaged;
//! - no read gives a wrong plaintext: every record that reads is the one
//!   written;
//! - every flip that changes stored content is detected: by `verify`
//!   (pinned key), at open, by a read, by the derived-state check, or by
//!   the head the writer last returned (the "held head": a flip that makes
//!   sled drop the log's tail leaves a shorter, valid log). A flip that
//!   no check notices must have left every tree of the vault exactly as it
//!   was (sled's own free space, or a page it rebuilt from its log).
//!
//! `FINTRUST_FLIPS` sets the number of flips (default 2,000, what CI
//! runs; docs/reliability.md records runs of 10,000 and more), and
//! `FINTRUST_FLIPS_SEED` the seed; the outcome counts are printed
//! (`-- --nocapture`).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use storage::{verify, Append, Kind, Options, RawStore, Unlock, Vault, VerifyOptions};

mod common;
use common::{copy_dir, files, scratch_dir, wait_unlocked};

const KEY_FILE: &[u8] = b"5f1b8e0d2a9c4e7f6a3b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";

fn unlock() -> Unlock {
    Unlock::key_file(KEY_FILE).expect("a 32-byte hex key")
}

fn options() -> Options {
    Options {
        cache_bytes: 4 << 20,
        ..Options::default()
    }
}

/// Everything the writer knew when it closed the vault.
struct Expected {
    key: VerifyingKey,
    /// The held head: the log's length and last entry hash.
    entries: u64,
    head: [u8; 32],
    /// Every record: seq → plaintext.
    records: BTreeMap<u64, Vec<u8>>,
    /// Every key/value of every tree of the vault.
    trees: Trees,
}

type Trees = BTreeMap<(u8, Vec<u8>), Vec<u8>>;

fn dump(dir: &Path) -> storage::Result<Trees> {
    let raw = RawStore::open(dir)?;
    let mut out = BTreeMap::new();
    // Tree 0: the log's chunks as read through their pointers; tree 4:
    // the pointers themselves.
    for kv in raw.log.iter() {
        let (k, v) = kv?;
        out.insert((0, k.to_vec()), v.to_vec());
    }
    for (i, tree) in [
        (1, &raw.state),
        (2, &raw.keys),
        (3, &raw.meta),
        (4, &raw.log.index),
    ] {
        for kv in tree.iter() {
            let (k, v) = kv.map_err(storage::Error::from)?;
            out.insert((i, k.to_vec()), v.to_vec());
        }
    }
    Ok(out)
}

fn build(dir: &Path) -> Expected {
    let created = Vault::create(dir, &unlock(), options()).expect("create");
    let vault = created.vault;
    let mut records = BTreeMap::new();
    let mut record = |vault: &Vault, subject: &str, body: String| {
        let r = vault
            .append_blocking(Append::record(subject, body.clone().into_bytes()))
            .expect("append");
        records.insert(r.seq, body.into_bytes());
    };
    for i in 0..12 {
        let subject = ["alice", "bob", "carol"][i % 3];
        record(
            &vault,
            subject,
            format!(
                "{{\"name\":\"{subject}\",\"n\":\"{i}\",\"pad\":\"{}\"}}",
                "x".repeat(40 * i)
            ),
        );
    }
    vault
        .append_blocking(Append::event(
            Kind::ConsentGranted,
            "alice",
            &serde_json::json!({"partner_id": "lender-1", "purposes": ["kyc"]}),
        ))
        .expect("consent");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        vault
            .create_credential("partner", "lender-1")
            .await
            .expect("credential");
        vault
            .rotate_subject_key("bob", true)
            .await
            .expect("rotate bob's key");
        vault
            .rotate_signing_key()
            .await
            .expect("rotate signing key");
    });
    record(&vault, "bob", "{\"name\":\"bob\",\"n\":\"last\"}".into());
    let key = vault.public_key();
    vault.close().expect("close");
    wait_unlocked(dir);
    // The held head, as verify sees the pristine copy.
    let report = verify(
        dir,
        &VerifyOptions {
            public_key: Some(key),
            progress: None,
            total_hint: None,
            kept_head: None,
            verified_prefix: None,
        },
    )
    .expect("verify the pristine copy");
    assert!(report.ok(), "{:?}", report.failure);
    // Records written by the re-encryption are read back too.
    let vault = Vault::open(dir, &unlock(), options()).expect("reopen");
    for seq in 0..report.entries {
        if let Ok(Some(r)) = vault.record_at(seq) {
            records.entry(seq).or_insert_with(|| r.plaintext.to_vec());
        }
    }
    vault.close().expect("close");
    wait_unlocked(dir);
    Expected {
        key,
        entries: report.entries,
        head: report.head.expect("a head"),
        records,
        trees: dump(dir).expect("dump the pristine trees"),
    }
}

fn copy_tree(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).expect("remove the old copy");
    }
    copy_dir(from, to);
}

/// XORs the byte at `at` of `path` with `mask`, in place.
fn flip(path: &Path, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for the flip");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read the byte");
    b[0] ^= mask;
    f.write_all_at(&b, at).expect("write the byte");
}

/// Every file of `dir` with its length and modification time: equal
/// stamps before and after a check mean the check wrote nothing.
fn stamps(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    files(dir)
        .into_iter()
        .map(|(rel, len)| {
            let modified = std::fs::metadata(dir.join(&rel))
                .and_then(|m| m.modified())
                .expect("mtime");
            (rel, len, modified)
        })
        .collect()
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a flip ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// verify could not run: a typed error (sled or the vault refused).
    VerifyError,
    /// verify ran and named a failure.
    VerifyFailure,
    /// verify passed but the log is not the held head's.
    HeldHead,
    /// The vault refused to open.
    OpenError,
    /// A record read returned an error.
    ReadError,
    /// The derived state differs from a rebuild.
    DerivedState,
    /// No check noticed, and every tree is exactly as before.
    Unchanged,
}

/// Whether `e` is an error a damaged data dir may give: the damage named
/// (integrity, decryption, a value that does not decode, sled's or the
/// file system's error, a sealed key or its parameters that no longer
/// open), not an error of the harness or of the vault's use (a lock still
/// held, a closed or poisoned vault, a refused request), which would pass
/// an undetected flip off as a detection.
fn names_damage(e: &storage::Error) -> bool {
    use storage::Error as E;
    matches!(
        e,
        E::Integrity { .. }
            | E::Decrypt(_)
            | E::Malformed(_)
            | E::Sled(_)
            | E::Io(_)
            | E::WrongSecret
            | E::WeakKdf(_)
            | E::UnsupportedFormat { .. }
            | E::NotFound(_)
            | E::Unfinished(_)
    )
}

/// A flip (file index, offset) and how it ended.
type Flipped = (usize, u64, Result<Outcome, String>);

/// One flip: `Ok(outcome)`, or `Err` for a violation.
fn check(dir: &Path, x: &Expected) -> Result<Outcome, String> {
    // Every tree as sled now presents it: when nothing differs, the flip
    // hit bytes sled does not read back (free space, or a structure it
    // rebuilt), and the vault sees exactly the pristine content.
    let trees = match dump(dir) {
        Ok(trees) if trees == x.trees => return Ok(Outcome::Unchanged),
        Ok(trees) => Some(trees),
        Err(_) => None,
    };
    if dir.join("db").join("db").exists() {
        wait_unlocked(dir);
    }
    let opts = VerifyOptions {
        public_key: Some(x.key),
        progress: None,
        total_hint: None,
        kept_head: None,
        verified_prefix: None,
    };
    let report = match verify(dir, &opts) {
        Err(e) if names_damage(&e) => return Ok(Outcome::VerifyError),
        Err(e) => {
            return Err(format!(
                "verify failed with an error that names no damage: {e}"
            ))
        }
        Ok(r) => r,
    };
    if !report.ok() {
        return Ok(Outcome::VerifyFailure);
    }
    if report.entries != x.entries || report.head != Some(x.head) {
        return Ok(Outcome::HeldHead);
    }
    let vault = match Vault::open(dir, &unlock(), options()) {
        Err(e) if names_damage(&e) => return Ok(Outcome::OpenError),
        Err(e) => {
            return Err(format!(
                "open failed with an error that names no damage: {e}"
            ))
        }
        Ok(v) => v,
    };
    let mut outcome = None;
    for (seq, plaintext) in &x.records {
        match vault.record_at(*seq) {
            Ok(Some(r)) if r.plaintext.as_slice() == plaintext.as_slice() => {}
            Ok(Some(_)) => return Err(format!("record {seq} read a wrong plaintext")),
            Ok(None) => return Err(format!("record {seq} vanished without an error")),
            Err(e) if names_damage(&e) => {
                outcome.get_or_insert(Outcome::ReadError);
            }
            // A record refused as shredded or of no subject is a lie about
            // the vault unless the derived state it came from is found
            // damaged below.
            Err(storage::Error::SubjectShredded(_) | storage::Error::NoSuchSubject(_)) => {}
            Err(e) => {
                return Err(format!(
                    "record {seq} failed with an error that names no damage: {e}"
                ))
            }
        }
    }
    if outcome.is_none() {
        match vault.check_derived_state() {
            Ok(r) if r.differences == 0 => {}
            Ok(_) => outcome = Some(Outcome::DerivedState),
            Err(e) if names_damage(&e) => outcome = Some(Outcome::DerivedState),
            Err(e) => {
                return Err(format!(
                    "the derived-state check failed with an error that names no damage: {e}"
                ))
            }
        }
    }
    vault.close().map_err(|e| format!("close failed: {e}"))?;
    wait_unlocked(dir);
    if let Some(o) = outcome {
        return Ok(o);
    }
    let changed: Vec<String> = match trees {
        None => vec!["the trees did not read".into()],
        Some(trees) => x
            .trees
            .iter()
            .filter(|(k, v)| trees.get(*k) != Some(*v))
            .map(|((t, k), _)| format!("tree {t} key {}", hex::encode(k)))
            .chain(
                trees
                    .keys()
                    .filter(|k| !x.trees.contains_key(*k))
                    .map(|(t, k)| format!("new tree {t} key {}", hex::encode(k))),
            )
            .take(5)
            .collect(),
    };
    Err(format!(
        "stored content changed and no check noticed: {changed:?}"
    ))
}

#[test]
fn random_byte_flips_across_every_file_are_detected_or_harmless() {
    let flips: u64 = std::env::var("FINTRUST_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let seed: u64 = std::env::var("FINTRUST_FLIPS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f11b);
    let tmp = scratch_dir();
    let pristine = tmp.path().join("pristine");
    let x = build(&pristine);
    // Flips need bytes: empty files are not part of the population.
    let population: Vec<_> = files(&pristine)
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .collect();
    let total: u64 = population.iter().map(|(_, n)| n).sum();
    // Most of sled's file is space it has not written yet. Half of the
    // flips go anywhere in a file, half into the 4 KiB blocks that hold
    // written (non-zero) bytes; every file gets at least `PER_FILE` of
    // each, the rest go by size.
    const PER_FILE: usize = 10;
    let written: Vec<Vec<u64>> = population
        .iter()
        .map(|(rel, _)| {
            let bytes = std::fs::read(pristine.join(rel)).expect("read");
            bytes
                .chunks(4096)
                .enumerate()
                .filter(|(_, b)| b.iter().any(|&x| x != 0))
                .map(|(i, _)| i as u64 * 4096)
                .collect()
        })
        .collect();
    let written_total: u64 = written.iter().map(|b| b.len() as u64).sum();
    let mut rng = Rng(seed);
    let mut plan: Vec<(usize, u64, u8)> = Vec::new();
    let in_written = |rng: &mut Rng, i: usize| -> u64 {
        let len = population[i].1;
        let blocks = &written[i];
        if blocks.is_empty() {
            return rng.below(len);
        }
        let start = blocks[rng.below(blocks.len() as u64) as usize];
        (start + rng.below(4096)).min(len - 1)
    };
    for (i, (_, len)) in population.iter().enumerate() {
        for _ in 0..PER_FILE {
            let anywhere = rng.below(*len);
            plan.push((i, anywhere, 1 + rng.below(255) as u8));
            let at = in_written(&mut rng, i);
            plan.push((i, at, 1 + rng.below(255) as u8));
        }
    }
    while (plan.len() as u64) < flips {
        let at = if plan.len().is_multiple_of(2) {
            let mut at = rng.below(total);
            let mut i = 0;
            while at >= population[i].1 {
                at -= population[i].1;
                i += 1;
            }
            (i, at)
        } else {
            let mut b = rng.below(written_total);
            let mut i = 0;
            while b >= written[i].len() as u64 {
                b -= written[i].len() as u64;
                i += 1;
            }
            (i, in_written(&mut rng, i))
        };
        plan.push((at.0, at.1, 1 + rng.below(255) as u8));
    }

    let workers = 2;
    let results: Vec<Vec<Flipped>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (plan, population, x, pristine) = (&plan, &population, &x, &pristine);
                let work = tmp.path().join(format!("work-{w}"));
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut fresh = false;
                    for (i, at, mask) in plan.iter().skip(w).step_by(workers).copied() {
                        if !fresh {
                            copy_tree(pristine, &work);
                        }
                        let path = work.join(&population[i].0);
                        flip(&path, at, mask);
                        let before = stamps(&work);
                        let r = catch_unwind(AssertUnwindSafe(|| check(&work, x))).unwrap_or_else(
                            |p| {
                                Err(format!(
                                    "panic: {}",
                                    p.downcast_ref::<String>()
                                        .map(String::as_str)
                                        .or_else(|| p.downcast_ref::<&str>().copied())
                                        .unwrap_or("?")
                                ))
                            },
                        );
                        // A panic may leave sled's lock with a thread of the
                        // dropped instance; wait for it before the next copy.
                        if work.join("db").join("db").exists() {
                            wait_unlocked(&work);
                        }
                        // Untouched by sled: undo the flip instead of copying
                        // the whole data dir again.
                        fresh = stamps(&work) == before;
                        if fresh {
                            flip(&path, at, mask);
                        }
                        out.push((i, at, r));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });

    let mut counts: BTreeMap<(String, Outcome), u64> = BTreeMap::new();
    let mut violations = Vec::new();
    for (i, at, r) in results.into_iter().flatten() {
        let file = population[i].0.display().to_string();
        match r {
            Ok(o) => *counts.entry((file, o)).or_default() += 1,
            Err(e) => violations.push(format!("{file} byte {at}: {e}")),
        }
    }
    eprintln!(
        "{} flips over {} files ({total} bytes), seed {seed:#x}:",
        plan.len(),
        population.len()
    );
    for ((file, o), n) in &counts {
        eprintln!("  {file:<24} {o:?}: {n}");
    }
    assert!(
        violations.is_empty(),
        "{} of {} flips violated the guarantees; first ones:\n{}",
        violations.len(),
        plan.len(),
        violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
