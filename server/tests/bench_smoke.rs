//! Smoke test of `vault-bench`'s workloads as library calls, at tiny sizes:
//! they complete and count what they did. No timing is asserted; CI
//! machines are too noisy for that, and the figures belong to real runs.

mod common;

use server::bench::{
    self, AppendParams, GrowthParams, MixedParams, Progress, Report, Target, VerifyParams, Workload,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_with_baseline_completes_and_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let params = AppendParams {
        records: 500,
        size: 64,
        clients: 4,
        pipeline: 3,
        // 500 is not a multiple of 7: the last claim is a partial batch.
        batch: 7,
        subjects: 50,
        duration: None,
        baseline: true,
        redis: None,
        postgres: None,
    };
    let target = Target::Embedded {
        dir: Some(dir.path().to_path_buf()),
    };
    let report = bench::run(&target, &Workload::Append(params), Progress::hidden())
        .await
        .expect("append bench runs");
    let Report::Append(r) = &report else {
        panic!("an append run reports an append report");
    };
    assert_eq!(r.throughput.records, 500);
    assert_eq!(r.throughput.appends, 500_u64.div_ceil(7));
    assert_eq!(r.latency_us.count, r.throughput.appends);
    // Records, one key entry per subject that got a record, genesis and the admin credential.
    assert!(r.throughput.log_entries > 500 + 2 && r.throughput.log_entries <= 500 + 50 + 2);
    assert!(r.throughput.commit_groups >= 1);
    // The engine's own counts: the run's groups, each made durable by one
    // of the write-ahead file's fdatasyncs.
    let pl = r
        .throughput
        .pipeline
        .as_ref()
        .expect("the vault is in this process");
    assert!(pl.groups >= r.throughput.commit_groups, "{pl:?}");
    assert!(pl.syncs >= 1 && pl.syncs <= pl.groups, "{pl:?}");
    assert!(pl.records_per_sync > 0.0 && pl.mean_sync_ms > 0.0, "{pl:?}");
    assert!(report
        .table()
        .contains("fdatasyncs of the write-ahead file"));
    let baseline = r.baseline.as_ref().expect("baseline was asked for");
    assert_eq!(
        baseline.iter().map(|b| b.sync_every).collect::<Vec<_>>(),
        bench::BASELINE_SYNC_EVERY
    );
    assert!(baseline.iter().all(|b| b.records == 500));
    assert_eq!(baseline[0].sync_latency_us.count, 500);
    assert_eq!(baseline[1].sync_latency_us.count, 2);

    let json = serde_json::to_value(&report).expect("report serializes");
    assert_eq!(json["workload"], "append");
    assert_eq!(json["throughput"]["records"], 500);
    assert!(report.table().contains("sled, sync every 256"));

    // The dir is kept, and a second run into it is refused, not mixed in.
    assert!(dir.path().join("vault").exists());
    let again = bench::run(
        &target,
        &Workload::Append(AppendParams {
            records: 1,
            ..AppendParams::default()
        }),
        Progress::hidden(),
    )
    .await;
    assert!(matches!(again, Err(server::Error::Usage(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_baseline_and_remote_completes_and_counts() {
    let params = VerifyParams {
        entries: 2_000,
        size: 128,
        subjects: 100,
        build_clients: 3,
        build_batch: 64,
        baseline: true,
        remote: true,
    };
    let report = bench::run(
        &Target::Embedded { dir: None },
        &Workload::Verify(params),
        Progress::hidden(),
    )
    .await
    .expect("verify bench runs");
    let Report::Verify(r) = &report else {
        panic!("a verify run reports a verify report");
    };
    assert_eq!(r.build.records, 2_000);
    // Records, up to one key entry per subject, and the two initial entries.
    assert!(r.throughput.entries > 2_002 && r.throughput.entries <= 2_000 + 100 + 2);
    assert!(r.throughput.signed_heads >= 1);
    let b = r.baseline.as_ref().expect("baseline was asked for");
    assert_eq!(b.blake3_hashes, r.throughput.entries);
    assert!(b.verify_strict_calls >= 100);
    // The remote walk checks the same log and the auditor credential's
    // entry made to serve it, every group with its head, and the receipts
    // of a few random entries.
    let remote = r.remote.as_ref().expect("remote was asked for");
    assert_eq!(remote.entries, r.throughput.entries + 1);
    assert!(remote.groups > r.throughput.signed_heads);
    assert!((1..=8).contains(&remote.receipts), "{}", remote.receipts);
    assert!(r.target.temporary);
    assert!(!std::path::Path::new(&r.target.dir).exists());

    let json = serde_json::to_value(&report).expect("report serializes");
    assert_eq!(json["workload"], "verify");
    assert!(report.table().contains("storage::verify"));
    assert!(report.table().contains("vault-verify --remote"));
}

#[tokio::test]
async fn bad_parameters_are_usage_errors() {
    let run = |p: AppendParams| async move {
        bench::run(
            &Target::Embedded { dir: None },
            &Workload::Append(p),
            Progress::hidden(),
        )
        .await
    };
    for p in [
        AppendParams {
            clients: 0,
            ..AppendParams::default()
        },
        AppendParams {
            size: 1 << 20,
            ..AppendParams::default()
        },
        AppendParams {
            records: 0,
            ..AppendParams::default()
        },
    ] {
        assert!(matches!(run(p).await, Err(server::Error::Usage(_))));
    }
}

/// Runs the `vault-bench` binary with `args` and `--format json`; returns
/// the one JSON object it printed.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args(args)
        .args(["--format", "json"])
        .output()
        .expect("vault-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vault-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object on stdout: {stdout}");
    serde_json::from_str(lines[0]).expect("stdout is JSON")
}

fn positive(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut at = v;
    for p in path {
        at = &at[*p];
    }
    let n = at
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is a number in {v}"));
    assert!(n > 0.0, "{path:?} is {n} in {v}");
    n
}

#[test]
fn protocol_appends_with_the_embedded_baseline() {
    for tls in [false, true] {
        let mut args = vec![
            "append",
            "--protocol",
            "--baseline",
            "--records",
            "300",
            "--clients",
            "3",
            "--pipeline",
            "4",
            "--subjects",
            "20",
            "--size",
            "100",
        ];
        if tls {
            args.push("--tls");
        }
        let v = bench_json(&args);
        assert_eq!(v["workload"], "append");
        assert_eq!(v["target"]["kind"], "in-process");
        assert_eq!(v["target"]["tls"], tls);
        assert_eq!(v["throughput"]["records"], 300);
        positive(&v, &["throughput", "records_per_s"]);
        positive(&v, &["latency_us", "p99"]);
        assert_eq!(v["embedded"]["records"], 300);
        positive(&v, &["embedded", "protocol_ratio"]);
        // Raw sled on the same records, each ratio this run's rate over
        // sled's.
        let sled = v["baseline"].as_array().expect("sled baselines");
        assert_eq!(sled.len(), 2, "{v}");
        for run in sled {
            let per_s = positive(run, &["records_per_s"]);
            let ratio = positive(run, &["vault_ratio"]);
            let protocol = positive(&v, &["throughput", "records_per_s"]);
            assert!((ratio - protocol / per_s).abs() < 1e-6 * ratio, "{run}");
        }
        // The in-process server's vault reports its commit pipeline.
        positive(&v, &["throughput", "pipeline", "syncs"]);
        positive(&v, &["throughput", "pipeline", "mean_sync_ms"]);
    }
}

#[test]
fn protocol_appends_in_batches_to_a_running_vaultd_by_address() {
    // `--addr` with a server this test starts: an in-process run's JSON
    // gives no key, so the library starts one and the binary targets it.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(common::start(server::serve::ServeConfig::default()));
    let (addr, key) = (server.addr.to_string(), server.writer.clone());
    let v = bench_json(&[
        "append",
        "--addr",
        &addr,
        "--api-key",
        &key,
        "--insecure-plaintext",
        "--records",
        "200",
        "--batch",
        "7",
        "--clients",
        "2",
    ]);
    assert_eq!(v["target"]["kind"], "remote");
    assert_eq!(v["throughput"]["records"], 200);
    assert_eq!(v["throughput"]["appends"], 200_u64.div_ceil(7));
    positive(&v, &["throughput", "records_per_s"]);
    // A key the server refuses is a refusal (exit 2), not a local error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args(["append", "--addr", &addr, "--api-key", "fvk_not_a_key"])
        .args([
            "--insecure-plaintext",
            "--records",
            "10",
            "--format",
            "json",
        ])
        .output()
        .expect("vault-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unauthenticated"), "{stderr}");
    // The key from a file named in the environment; and none at all.
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{key}\n")).expect("key file");
    let run = |env: &[(&str, &std::path::Path)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"));
        cmd.args(["append", "--addr", &addr, "--insecure-plaintext"])
            .args(["--records", "10", "--clients", "1", "--format", "json"])
            .env_remove("FINTRUST_API_KEY")
            .env_remove("FINTRUST_API_KEY_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("vault-bench runs")
    };
    let out = run(&[("FINTRUST_API_KEY_FILE", &key_file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--addr needs --api-key"), "{stderr}");
    drop(server);
}

/// `redeem --addr` against a running vaultd, with an admin's key: it makes
/// a partner, a gateway and a subject of its own, redeems, then revokes
/// both credentials and shreds the subject. Another role's key is refused
/// before anything is made.
#[test]
fn redemptions_at_a_running_vaultd_by_address_clean_up_after_themselves() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(common::start(server::serve::ServeConfig::default()));
    let (addr, vault) = (server.addr.to_string(), server.vault.clone());
    let (admin, writer) = (server.admin.clone(), server.writer.clone());
    let run = |key: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
            .args(["redeem", "--addr", &addr, "--api-key", key])
            .args(["--insecure-plaintext", "--tokens", "40", "--clients", "4"])
            .args(["--format", "json"])
            .output()
            .expect("vault-bench runs")
    };
    let made = |vault: &storage::Vault| {
        vault
            .credentials(None, 1_000)
            .expect("credentials")
            .0
            .into_iter()
            .filter(|c| c.name.starts_with("vault-bench"))
            .collect::<Vec<_>>()
    };
    let out = run(&writer);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("takes an admin's API key"), "{stderr}");
    assert!(made(&vault).is_empty(), "nothing made for a refused run");

    let out = run(&admin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["target"]["kind"], "remote");
    assert_eq!(v["runs"][0]["mode"], "plaintext");
    assert_eq!(v["runs"][0]["redemptions"], 40);
    positive(&v["runs"][0], &["redemptions_per_s"]);
    // Its two credentials, both revoked; its subject, shredded.
    let creds = made(&vault);
    assert_eq!(creds.len(), 2, "{creds:?}");
    assert!(creds.iter().all(|c| c.revoked_seq.is_some()), "{creds:?}");
    let partner = creds
        .iter()
        .find(|c| c.role == "partner")
        .expect("the run's partner");
    let shredded: Vec<String> = common::entries_of(&vault, storage::Kind::SubjectShredded)
        .into_iter()
        .map(|(subject, _)| subject)
        .collect();
    assert_eq!(shredded, std::slice::from_ref(&partner.name));
    drop(server);
}

/// The binary's own flags for `append --duration` and `--embedded DIR`,
/// and for `verify` (its build's clients and batches, and the baseline):
/// the run ends at its time with its data kept in DIR, and the verify
/// run checks what it built.
#[test]
fn the_binary_bounds_appends_by_time_keeps_a_dir_and_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("kept");
    let dir_arg = dir.to_str().expect("utf-8");
    let v = bench_json(&[
        "append",
        "--records",
        "100000000",
        "--duration",
        "0.3",
        "--clients",
        "2",
        "--embedded",
        dir_arg,
    ]);
    assert_eq!(v["params"]["duration_s"], 0.3);
    let records = v["throughput"]["records"].as_u64().expect("records");
    assert!(records > 0 && records < 100_000_000, "{v}");
    assert_eq!(v["target"]["dir"], dir_arg);
    assert_eq!(v["target"]["temporary"], false);
    assert!(dir.exists(), "the data dir is kept");

    let v = bench_json(&[
        "verify",
        "--entries",
        "3000",
        "--subjects",
        "10",
        "--clients",
        "2",
        "--batch",
        "64",
        "--baseline",
    ]);
    assert_eq!(v["workload"], "verify");
    let entries = v["throughput"]["entries"].as_u64().expect("entries");
    assert!(entries >= 3000, "{v}");
    positive(&v, &["throughput", "entries_per_s"]);
    positive(&v, &["baseline", "blake3_per_s"]);
    positive(&v, &["baseline", "verify_strict_per_s"]);
}

/// A pass's `tail` (`server::bench::tail`): its threshold is the pass's
/// p99, its windows hold no more slow requests than it counts, most first,
/// each no more than began in it.
fn tail_fits_its_pass(run: &serde_json::Value) {
    let t = &run["tail"];
    assert_eq!(t["over_us"], run["latency_us"]["p99"], "{run}");
    let slow = t["slow"].as_u64().expect("a count of slow requests");
    let windows = t["windows"].as_array().expect("windows");
    let in_windows: u64 = windows.iter().filter_map(|w| w["slow"].as_u64()).sum();
    assert_eq!(t["in_windows"], in_windows, "{run}");
    assert!(in_windows <= slow && slow <= run["latency_us"]["count"].as_u64().unwrap_or(0));
    assert!(windows.len() <= 8);
    assert!(windows
        .windows(2)
        .all(|w| w[0]["slow"].as_u64() >= w[1]["slow"].as_u64()));
    for w in windows {
        assert!(w["slow"].as_u64() <= w["started"].as_u64(), "{w}");
        assert!(w["max_us"].as_u64() > t["over_us"].as_u64(), "{w}");
        // With a device traced, each window says what it did.
        assert_eq!(w["device"].is_null(), t["device"].is_null(), "{run}");
    }
}

#[test]
fn redeem_plaintext_and_tls_with_resumption() {
    let v = bench_json(&["redeem", "--tokens", "40", "--clients", "4"]);
    assert_eq!(v["workload"], "redeem");
    assert_eq!(v["setup"]["tokens"], 40);
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["mode"], "plaintext");
    assert_eq!(runs[0]["redemptions"], 40);
    positive(&runs[0], &["redemptions_per_s"]);
    positive(&runs[0], &["latency_us", "p50"]);
    // Each redemption burns its token durably: the run's fdatasyncs, and
    // their durations in buckets that count them all.
    let syncs = positive(&runs[0], &["pipeline", "syncs"]);
    let in_buckets: f64 = runs[0]["pipeline"]["sync_buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .filter_map(|b| b["count"].as_f64())
        .sum();
    assert_eq!(in_buckets, syncs, "{v}");

    let v = bench_json(&["redeem", "--tls", "--tokens", "40", "--clients", "2"]);
    let runs = v["runs"].as_array().expect("runs");
    let modes: Vec<&str> = runs.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["tls-full-handshake", "tls-resumed"]);
    assert_eq!(runs[0]["resumed_handshakes"], 0);
    // One shared client configuration resumes sessions: after the first
    // full handshakes, connections resume.
    positive(&runs[1], &["resumed_handshakes"]);
    for r in runs {
        assert_eq!(r["redemptions"], 40);
        positive(r, &["redemptions_per_s"]);
    }
    assert!(runs[0]["behind_schedule"].is_null(), "no rate, no schedule");

    // On a schedule: every token is redeemed, and the redemptions that
    // found no client free are counted.
    let v = bench_json(&[
        "redeem",
        "--tokens",
        "30",
        "--clients",
        "2",
        "--rate",
        "300",
    ]);
    assert_eq!(v["params"]["rate"], 300.0);
    let run = &v["runs"][0];
    assert_eq!(run["redemptions"], 30);
    assert_eq!(run["latency_us"]["count"], 30);
    assert!(
        run["behind_schedule"].as_u64().is_some_and(|n| n <= 30),
        "{v}"
    );
    tail_fits_its_pass(run);
}

#[test]
fn redeem_next_to_redis_getdel_when_redis_is_installed() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if server::bench::redis::find_on_path("redis-server", &path).is_none() {
        eprintln!("note: redis-server is not on PATH; the Redis baseline test is skipped");
        return;
    }
    let v = bench_json(&["redeem", "--redis", "--tokens", "50", "--clients", "3"]);
    assert_eq!(v["redis"]["ops"], 50);
    positive(&v, &["redis", "ops_per_s"]);
    positive(&v["runs"][0], &["p99_vs_redis"]);
    assert!(v["redis"]["behind_schedule"].is_null());

    // At a rate, Redis's GETDELs keep the same schedule.
    let v = bench_json(&[
        "redeem",
        "--redis",
        "--tokens",
        "30",
        "--clients",
        "2",
        "--rate",
        "300",
    ]);
    assert_eq!(v["redis"]["ops"], 30);
    assert_eq!(v["redis"]["latency_us"]["count"], 30);
    assert!(v["redis"]["behind_schedule"].as_u64().is_some(), "{v}");
    tail_fits_its_pass(&v["redis"]);
}

#[test]
fn redis_flag_without_redis_on_path_skips_the_baseline_with_a_note() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args([
            "redeem",
            "--redis",
            "--tokens",
            "10",
            "--clients",
            "2",
            "--format",
            "json",
        ])
        .env("PATH", "")
        .output()
        .expect("vault-bench runs");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("redis-server is not on PATH"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["redis"].is_null(), "{v}");
}

#[test]
fn authorize_against_health_writes_one_audit_entry_per_grant() {
    let v = bench_json(&["authorize", "--requests", "60", "--clients", "4"]);
    assert_eq!(v["workload"], "authorize");
    assert_eq!(v["authorize"]["requests"], 60);
    assert_eq!(v["health"]["requests"], 60);
    positive(&v, &["authorize", "requests_per_s"]);
    positive(&v, &["health", "requests_per_s"]);
    positive(&v, &["ratio_vs_health"]);
    // One token_minted entry per grant, nothing else.
    assert_eq!(v["audit_entries"], 60);
    // Each grant is made durable before its token goes out.
    positive(&v, &["pipeline", "syncs"]);
    positive(&v, &["pipeline", "groups"]);
    // Without a rate each connection sends on its last answer.
    assert!(v["params"]["rate"].is_null(), "{v}");
    assert!(v["authorize"]["behind_schedule"].is_null(), "{v}");
}

#[test]
fn authorize_on_a_schedule_sends_every_request_and_counts_those_behind_it() {
    let v = bench_json(&[
        "authorize",
        "--requests",
        "40",
        "--clients",
        "2",
        "--rate",
        "400",
    ]);
    assert_eq!(v["params"]["rate"], 400.0);
    for phase in ["authorize", "health"] {
        assert_eq!(v[phase]["requests"], 40, "{phase}");
        assert_eq!(v[phase]["latency_us"]["count"], 40, "{phase}");
        let behind = v[phase]["behind_schedule"]
            .as_u64()
            .unwrap_or_else(|| panic!("{phase} counts requests behind schedule: {v}"));
        assert!(behind <= 40, "{phase}: {behind}");
        tail_fits_its_pass(&v[phase]);
    }
    assert_eq!(v["audit_entries"], 40);
}

/// `--duration` bounds each phase by time: on a schedule of 200/s, 0.2 s
/// holds exactly the 40 requests due before its end.
#[test]
fn authorize_for_a_duration_ends_each_phase_at_its_time() {
    let v = bench_json(&[
        "authorize",
        "--clients",
        "2",
        "--rate",
        "200",
        "--duration",
        "0.2",
    ]);
    assert_eq!(v["params"]["duration_s"], 0.2);
    for phase in ["authorize", "health"] {
        assert_eq!(v[phase]["requests"], 40, "{phase}: {v}");
    }
    assert_eq!(v["audit_entries"], 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_with_baseline_counts_each_kind_in_the_ratio() {
    let params = MixedParams {
        ratio: "2:1:1".parse().expect("valid ratio"),
        clients: 3,
        requests: 40,
        duration: None,
        size: 64,
        subjects: 10,
        baseline: true,
        ..MixedParams::default()
    };
    let report = bench::run(
        &Target::InProcess {
            dir: None,
            tls: false,
        },
        &Workload::Mixed(params),
        Progress::hidden(),
    )
    .await
    .expect("mixed bench runs");
    let Report::Mixed(r) = &report else {
        panic!("a mixed run reports a mixed report");
    };
    let counts: Vec<(&str, u64)> = r.ops.iter().map(|o| (o.op, o.count)).collect();
    assert_eq!(
        counts,
        [
            ("append", 20),
            ("redeem", 10),
            ("authorize", 10),
            ("all", 40)
        ]
    );
    for o in &r.ops {
        assert_eq!(o.latency_us.count, o.count, "{}", o.op);
        assert!(o.per_s > 0.0, "{}", o.op);
    }
    assert!(r.append_commit_groups >= 1);
    assert_eq!(r.mint_latency_us.map(|l| l.count), Some(10));
    let pure = r.baseline.as_ref().expect("baseline was asked for");
    let pure: Vec<(&str, u64, usize)> = pure.iter().map(|b| (b.op, b.count, b.clients)).collect();
    assert_eq!(
        pure,
        [("append", 20, 3), ("redeem", 10, 3), ("authorize", 10, 3)]
    );
    assert!(r.ops[..3]
        .iter()
        .all(|o| o.vs_pure.is_some_and(|x| x > 0.0)));

    let json = serde_json::to_value(&report).expect("report serializes");
    assert_eq!(json["workload"], "mixed");
    assert_eq!(json["params"]["ratio"]["append"], 2);
    assert_eq!(json["ops"][3]["op"], "all");
    let table = report.table();
    assert!(
        table.contains("vs pure") && table.contains("its mint"),
        "{table}"
    );
}

#[test]
fn mixed_again_under_slowloris_reports_each_kind_and_its_p99_ratio() {
    // Twice the connection limit of slow clients on each port.
    let v = bench_json(&[
        "mixed",
        "--requests",
        "40",
        "--clients",
        "2",
        "--max-connections",
        "6",
        "--slowloris",
        "12",
        "--slowloris-interval",
        "0.2",
    ]);
    let s = &v["slowloris"];
    assert_eq!(s["per_port"], 12, "{v}");
    assert_eq!(s["attack"]["open_protocol"], 12, "{v}");
    assert_eq!(s["attack"]["open_http"], 12, "{v}");
    let ops = s["ops"].as_array().expect("ops under attack");
    let names: Vec<&str> = ops.iter().filter_map(|o| o["op"].as_str()).collect();
    assert_eq!(names, ["append", "redeem", "authorize", "all"]);
    let counts: u64 = ops[..3].iter().filter_map(|o| o["count"].as_u64()).sum();
    assert_eq!(counts, 40);
    for o in ops {
        assert!(o["p99_vs_normal"].as_f64().is_some_and(|x| x > 0.0), "{o}");
        assert!(o["vs_pure"].is_null(), "{o}");
    }
}

#[test]
fn mixed_redemptions_alone_over_tls() {
    let v = bench_json(&[
        "mixed",
        "--ratio",
        "0:1:0",
        "--tls",
        "--requests",
        "12",
        "--clients",
        "2",
    ]);
    assert_eq!(v["workload"], "mixed");
    assert_eq!(v["target"]["tls"], true);
    let ops = v["ops"].as_array().expect("ops");
    let names: Vec<&str> = ops.iter().filter_map(|o| o["op"].as_str()).collect();
    assert_eq!(names, ["redeem", "all"]);
    assert_eq!(ops[0]["count"], 12);
    positive(&ops[0], &["latency_us", "p50"]);
    assert!(v["baseline"].is_null());
}

#[test]
fn mixed_appends_for_a_duration() {
    let v = bench_json(&[
        "mixed",
        "--ratio",
        "1:0:0",
        "--duration",
        "0.3",
        "--clients",
        "2",
        "--size",
        "64",
    ]);
    let ops = v["ops"].as_array().expect("ops");
    assert_eq!(ops[0]["op"], "append");
    positive(&ops[0], &["count"]);
    assert_eq!(ops[0]["count"], ops[1]["count"]);
    assert!(v["mint_latency_us"].is_null());
}

#[test]
fn bad_mixed_ratios_and_tls_with_authorize_fail_clearly() {
    for (args, expected) in [
        (&["mixed", "--ratio", "a:b"][..], "three parts"),
        (&["mixed", "--ratio", "0:0:0"][..], "runs nothing"),
        (&["mixed", "--ratio", "1:x:1"][..], "not a whole number"),
        (&["mixed", "--ratio", "1:1:1:1"][..], "three parts"),
        (&["mixed", "--tls", "--requests", "5"][..], "drop --tls"),
        (&["authorize", "--rate", "0"][..], "--rate must be between"),
        (
            &["authorize", "--rate", "NaN"][..],
            "--rate must be between",
        ),
        (&["redeem", "--rate", "0.5"][..], "--rate must be between"),
        // Minted first, the last tokens would expire before their turn.
        (
            &["redeem", "--rate", "1", "--tokens", "4000"][..],
            "past their 3600 s lifetime",
        ),
        // Past the clock's range, a deadline would overflow.
        (&["append", "--duration", "1e19"][..], "at most 86400"),
        (&["mixed", "--duration", "86401"][..], "at most 86400"),
        // Each client's connections must fit the server's limit.
        (&["mixed", "--clients", "400"][..], "at most 341 --clients"),
        (
            &["mixed", "--clients", "30", "--max-connections", "64"][..],
            "at most 21 --clients",
        ),
        (
            &["authorize", "--clients", "1024"][..],
            "between 1 and 1023",
        ),
        // A batch is at most one protocol frame of records, embedded too.
        (
            &["append", "--batch", "65536", "--size", "48000"][..],
            "one protocol frame",
        ),
        (
            &["verify", "--batch", "4096", "--size", "4096"][..],
            "one protocol frame",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
            .args(args)
            .output()
            .expect("vault-bench runs");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn single_client_appends_next_to_redis_set_when_redis_is_installed() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if server::bench::redis::find_on_path("redis-server", &path).is_none() {
        eprintln!("note: redis-server is not on PATH; the Redis SET baseline test is skipped");
        return;
    }
    let v = bench_json(&[
        "append",
        "--protocol",
        "--redis",
        "--clients",
        "1",
        "--pipeline",
        "1",
        "--records",
        "40",
        "--size",
        "100",
    ]);
    assert_eq!(v["throughput"]["records"], 40);
    assert_eq!(v["redis"]["command"], "SET");
    assert_eq!(v["redis"]["ops"], 40);
    assert_eq!(v["redis"]["value_bytes"], 100);
    positive(&v, &["redis", "latency_us", "p50"]);
    positive(&v, &["redis", "p50_ratio"]);
    positive(&v, &["redis", "p99_ratio"]);
}

#[test]
fn append_redis_baseline_is_skipped_with_a_note_without_redis() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args([
            "append",
            "--protocol",
            "--redis",
            "--clients",
            "1",
            "--pipeline",
            "1",
            "--records",
            "10",
            "--format",
            "json",
        ])
        .env("PATH", "")
        .output()
        .expect("vault-bench runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Redis SET baseline is skipped"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(v["throughput"]["records"], 10);
    assert!(v["redis"].is_null());

    // Pipelined appends are not compared with one SET at a time.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args([
            "append",
            "--protocol",
            "--redis",
            "--pipeline",
            "8",
            "--records",
            "10",
        ])
        .output()
        .expect("vault-bench runs");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn growth_measures_at_each_size_of_one_growing_vault() {
    let v = bench_json(&[
        "growth",
        "--sizes",
        "200,400",
        "--window",
        "200",
        "--redemptions",
        "5",
        "--clients",
        "2",
        "--pipeline",
        "4",
        "--size",
        "64",
    ]);
    assert_eq!(v["workload"], "growth");
    assert_eq!(v["target"]["kind"], "in-process");
    assert_eq!(v["params"]["sizes"], serde_json::json!([200, 400]));
    let levels = v["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2, "{v}");
    let mut last = 0;
    for (l, target) in levels.iter().zip([200, 400]) {
        assert_eq!(l["target_entries"], target);
        let entries = l["entries"].as_u64().expect("entries");
        // One vault that grows: at least the size asked for, and more
        // than the level before.
        assert!(entries >= target && entries > last, "{l}");
        last = entries;
        assert_eq!(l["appends"]["records"], 200);
        // A key entry for each new subject among them, never more.
        let keys = l["appends"]["key_entries"].as_u64().expect("key_entries");
        assert!(keys <= 200, "{l}");
        assert_eq!(l["appends"]["latency_us"]["count"], 200);
        positive(l, &["appends", "records_per_s"]);
        positive(l, &["vs_first"]);
        assert_eq!(l["redemptions"]["cycles"], 5);
        assert_eq!(l["redemptions"]["redeem_latency_us"]["count"], 5);
        assert_eq!(l["redemptions"]["mint_latency_us"]["count"], 5);
        if cfg!(target_os = "linux") {
            positive(l, &["memory", "rss_mib"]);
            positive(l, &["memory", "peak_mib"]);
        }
    }
    // The first level was filled; the second may have been passed by the
    // first's window already.
    positive(&levels[0], &["fill", "records"]);
    assert_eq!(levels[0]["vs_first"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_table_has_one_row_per_size() {
    let params = GrowthParams {
        sizes: vec![50, 300],
        size: 32,
        clients: 2,
        pipeline: 2,
        window: 30,
        redemptions: 3,
    };
    let report = bench::run(
        &Target::InProcess {
            dir: None,
            tls: false,
        },
        &Workload::Growth(params),
        Progress::hidden(),
    )
    .await
    .expect("growth bench runs");
    let Report::Growth(r) = &report else {
        panic!("a growth run reports a growth report");
    };
    assert_eq!(r.levels.len(), 2);
    let table = report.table();
    assert!(table.contains("vs first"), "{table}");
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");

    // Sizes out of order, TLS and a remote target are refused up front.
    for (target, sizes) in [
        (
            Target::InProcess {
                dir: None,
                tls: false,
            },
            vec![300, 50],
        ),
        (
            Target::InProcess {
                dir: None,
                tls: true,
            },
            vec![50],
        ),
        (Target::Embedded { dir: None }, vec![50]),
    ] {
        let p = GrowthParams {
            sizes,
            ..GrowthParams::default()
        };
        let r = bench::run(&target, &Workload::Growth(p), Progress::hidden()).await;
        assert!(matches!(r, Err(server::Error::Usage(_))));
    }
}

#[tokio::test]
async fn a_postgres_baseline_that_cannot_run_fails_before_the_vault_does() {
    // A port that was free a moment ago: nothing answers there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let params = AppendParams {
        records: 10,
        pipeline: 1,
        postgres: Some(
            bench::postgres::Conninfo::parse(&format!(
                "host=127.0.0.1 port={port} user=bench password=hunter2"
            ))
            .expect("a connection string"),
        ),
        ..AppendParams::default()
    };
    let target = Target::InProcess {
        dir: Some(dir.path().to_path_buf()),
        tls: false,
    };
    let r = bench::run(&target, &Workload::Append(params), Progress::hidden()).await;
    match &r {
        Err(server::Error::Usage(m)) => {
            assert!(
                m.contains(&format!("connecting to 127.0.0.1:{port}")),
                "{m}"
            );
            assert!(!m.contains("hunter2"), "{m}");
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
    assert!(!dir.path().join("vault").exists(), "no vault was created");

    // The same for redemptions.
    let params = server::bench::RedeemParams {
        tokens: 10,
        postgres: Some(
            bench::postgres::Conninfo::parse(&format!("host=127.0.0.1 port={port}"))
                .expect("a connection string"),
        ),
        ..Default::default()
    };
    let r = bench::run(&target, &Workload::Redeem(params), Progress::hidden()).await;
    assert!(
        matches!(&r, Err(server::Error::Usage(m)) if m.contains("connecting to")),
        "{:?}",
        r.err()
    );
    assert!(!dir.path().join("vault").exists(), "no vault was created");

    // The binary's own refusals, before anything runs.
    for (args, says) in [
        (
            vec!["--postgres", "host=127.0.0.1"],
            "add --protocol or --addr",
        ),
        (
            vec![
                "--protocol",
                "--pipeline",
                "8",
                "--postgres",
                "host=127.0.0.1",
            ],
            "use --pipeline 1",
        ),
        (
            vec![
                "--protocol",
                "--pipeline",
                "1",
                "--postgres",
                "host='unterminated",
            ],
            "not a connection string",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
            .arg("append")
            .args(&args)
            .args(["--records", "10"])
            .output()
            .expect("vault-bench runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// Runs appends and redemptions against the PostgreSQL server that
/// `FINTRUST_BENCH_POSTGRES` names (a connection string); skipped without
/// one. docs/benchmarks.md says how
/// to start a scratch server.
#[tokio::test]
async fn appends_and_redemptions_next_to_postgres_when_a_server_is_given() {
    let Ok(conninfo) = std::env::var("FINTRUST_BENCH_POSTGRES") else {
        eprintln!(
            "note: FINTRUST_BENCH_POSTGRES is not set; the PostgreSQL baseline test is skipped"
        );
        return;
    };
    let v = bench_json(&[
        "append",
        "--protocol",
        "--postgres",
        &conninfo,
        "--clients",
        "2",
        "--pipeline",
        "1",
        "--records",
        "40",
        "--size",
        "100",
    ]);
    assert_eq!(v["throughput"]["records"], 40);
    assert_eq!(v["postgres"]["statement"], "INSERT");
    assert_eq!(v["postgres"]["ops"], 40);
    assert_eq!(v["postgres"]["row_bytes"], 100);
    assert_eq!(v["postgres"]["clients"], 2);
    assert_ne!(v["postgres"]["synchronous_commit"], "off");
    positive(&v, &["postgres", "latency_us", "p50"]);
    positive(&v, &["postgres", "rate_ratio"]);
    assert!(v["params"].get("postgres").is_none(), "{v}");

    // Redemptions, on a schedule: as many rows burnt, each returning its value.
    let v = bench_json(&[
        "redeem",
        "--postgres",
        &conninfo,
        "--clients",
        "3",
        "--tokens",
        "30",
        "--rate",
        "300",
    ]);
    assert_eq!(v["postgres"]["statement"], "DELETE RETURNING");
    assert_eq!(v["postgres"]["ops"], 30);
    assert!(v["postgres"]["behind_schedule"].as_u64().is_some(), "{v}");
    positive(&v["runs"][0], &["p99_vs_postgres"]);
    positive(&v["runs"][0], &["rate_vs_postgres"]);

    // Both tables are gone again.
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    for table in [
        server::bench::postgres::TABLE,
        server::bench::postgres::TOKENS_TABLE,
    ] {
        let left: Option<String> = c
            .query_one("SELECT to_regclass($1)::text", &[&table])
            .await
            .expect("query")
            .get(0);
        assert_eq!(left, None, "{table}");
    }
}

/// An interrupt ends an in-process run cleanly: exit 1 with a note, and
/// the temporary data dir it made is removed (not left behind, GBs after
/// a long run).
#[test]
fn an_interrupted_run_removes_its_temporary_dir() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vault-bench"))
        .args([
            "append",
            "--protocol",
            "--records",
            "100000000",
            "--duration",
            "600",
            "--clients",
            "2",
        ])
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vault-bench runs");
    // Its data dir, once the vault in it is made.
    let made = || {
        std::fs::read_dir(tmp.path())
            .expect("read")
            .filter_map(|e| e.ok())
            .any(|e| e.path().join("vault").exists())
    };
    let mut waited = 0;
    while !made() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "ended before it ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
        waited += 1;
        assert!(waited < 2_400, "no data dir after 2 min");
    }
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -INT");
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(out.stdout.is_empty());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
