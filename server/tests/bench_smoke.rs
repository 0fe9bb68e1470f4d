//! Smoke test of `vault-bench`'s workloads as library calls, at tiny sizes:
//! they complete and count what they did. No timing is asserted; CI
//! machines are too noisy for that, and the figures belong to real runs.

use server::bench::{self, AppendParams, Progress, Report, Target, VerifyParams, Workload};

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
async fn verify_with_baseline_completes_and_counts() {
    let params = VerifyParams {
        entries: 2_000,
        size: 128,
        subjects: 100,
        build_clients: 3,
        build_batch: 64,
        baseline: true,
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
    assert!(r.target.temporary);
    assert!(!std::path::Path::new(&r.target.dir).exists());

    let json = serde_json::to_value(&report).expect("report serializes");
    assert_eq!(json["workload"], "verify");
    assert!(report.table().contains("storage::verify"));
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
