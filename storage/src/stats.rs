//! Counters of the commit pipeline, for operators: how many commit groups
//! were made durable, how many `fdatasync`s of the write-ahead file served
//! them and how long each took, and how much derived state the indexer
//! wrote and still holds in memory.
//!
//! A request's latency is mostly the wait for its group's `fdatasync`,
//! and under load one `fdatasync` serves several groups; these counters
//! say which of the two moved when latency does (a slow device, or groups
//! that got smaller), without a profiler. `vaultd` exports them at
//! `GET /metrics`, `vault-bench append` prints them per run.
//!
//! Invariants: every counter only grows, for the life of one open
//! [`Vault`](crate::Vault) (a reopened vault starts again at zero, which
//! Prometheus reads as a counter reset); updating one costs a few relaxed
//! atomic additions on the thread that did the work, never a lock. A
//! snapshot (`Counters::snapshot`, behind [`PipelineStats`]) reads each
//! counter once, so its fields may be a moment apart from each other,
//! never torn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the `fdatasync` duration buckets: 50 µs doubling to
/// about 3.3 s, as the latency buckets of `vaultd`'s other histograms;
/// longer syncs count in the last, unbounded bucket.
pub const SYNC_BUCKET_BOUNDS_S: [f64; 17] = {
    let mut b = [0.0; 17];
    let mut i = 0;
    let mut v = 0.000_05;
    while i < 17 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

/// The counters, shared by the threads of one vault.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    groups: AtomicU64,
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    /// Per bucket of [`SYNC_BUCKET_BOUNDS_S`], then the unbounded one; not
    /// cumulative (the snapshot sums them).
    sync_buckets: [AtomicU64; SYNC_BUCKET_BOUNDS_S.len() + 1],
    index_writes: AtomicU64,
    index_keys: AtomicU64,
}

impl Counters {
    /// `n` commit groups made durable and answered.
    pub(crate) fn groups_answered(&self, n: usize) {
        self.groups.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One `fdatasync` of the write-ahead file (one or more segments)
    /// that succeeded after `took`.
    pub(crate) fn synced(&self, took: Duration) {
        let bucket = SYNC_BUCKET_BOUNDS_S
            .iter()
            .position(|&b| took.as_secs_f64() <= b)
            .unwrap_or(SYNC_BUCKET_BOUNDS_S.len());
        self.sync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// One write of derived state to sled by the indexer, of `keys` keys (each inserted or removed).
    pub(crate) fn indexed(&self, keys: usize) {
        self.index_keys.fetch_add(keys as u64, Ordering::Relaxed);
        self.index_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, with `overlay_keys` (read by the caller under
    /// the overlay's lock).
    pub(crate) fn snapshot(&self, overlay_keys: usize) -> PipelineStats {
        let mut cumulative = 0;
        let sync_buckets = self
            .sync_buckets
            .iter()
            .map(|c| {
                cumulative += c.load(Ordering::Relaxed);
                cumulative
            })
            .collect();
        PipelineStats {
            groups: self.groups.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_seconds: self.sync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            sync_buckets,
            index_writes: self.index_writes.load(Ordering::Relaxed),
            index_keys: self.index_keys.load(Ordering::Relaxed),
            overlay_keys: overlay_keys as u64,
        }
    }
}

/// What [`Vault::pipeline_stats`](crate::Vault::pipeline_stats) reports:
/// counts since the vault was opened, and the overlay's size now.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStats {
    /// Commit groups made durable and answered.
    pub groups: u64,
    /// `fdatasync`s of the write-ahead file that succeeded (each serves
    /// every group written before it started).
    pub syncs: u64,
    /// Their total duration.
    pub sync_seconds: f64,
    /// Cumulative counts of those syncs: element `i` counts the syncs of
    /// at most [`SYNC_BUCKET_BOUNDS_S`]`[i]`; the last element, one past
    /// the bounds, counts them all.
    pub sync_buckets: Vec<u64>,
    /// Writes of derived state to sled by the indexer.
    pub index_writes: u64,
    /// Keys those writes inserted into sled or removed from it.
    pub index_keys: u64,
    /// Keys of derived state waiting in memory for the indexer's next
    /// write (reads find them there first).
    pub overlay_keys: u64,
}

impl PipelineStats {
    /// Mean commit groups per `fdatasync` (0 before the first).
    pub fn groups_per_sync(&self) -> f64 {
        if self.syncs == 0 {
            0.0
        } else {
            self.groups as f64 / self.syncs as f64
        }
    }

    /// Each bucket's own count of syncs (not cumulative), with its upper
    /// bound in seconds (`None` for the last, unbounded one), shortest
    /// first.
    pub fn sync_bucket_counts(&self) -> impl Iterator<Item = (Option<f64>, u64)> + '_ {
        let mut below = 0;
        self.sync_buckets
            .iter()
            .enumerate()
            .map(move |(i, &cumulative)| {
                let own = cumulative.saturating_sub(below);
                below = cumulative;
                (SYNC_BUCKET_BOUNDS_S.get(i).copied(), own)
            })
    }

    /// Mean duration of an `fdatasync` (0 before the first).
    pub fn mean_sync_seconds(&self) -> f64 {
        if self.syncs == 0 {
            0.0
        } else {
            self.sync_seconds / self.syncs as f64
        }
    }

    /// What happened between `earlier` and this snapshot (the overlay's
    /// size is this one's). Counters that went back (another vault) count
    /// from zero.
    pub fn since(&self, earlier: &PipelineStats) -> PipelineStats {
        let d = |now: u64, then: u64| now.checked_sub(then).unwrap_or(now);
        PipelineStats {
            groups: d(self.groups, earlier.groups),
            syncs: d(self.syncs, earlier.syncs),
            sync_seconds: if self.syncs >= earlier.syncs {
                (self.sync_seconds - earlier.sync_seconds).max(0.0)
            } else {
                self.sync_seconds
            },
            sync_buckets: self
                .sync_buckets
                .iter()
                .zip(earlier.sync_buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(&now, &then)| d(now, then))
                .collect(),
            index_writes: d(self.index_writes, earlier.index_writes),
            index_keys: d(self.index_keys, earlier.index_keys),
            overlay_keys: self.overlay_keys,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_from_50_microseconds_as_the_servers_latency_buckets() {
        assert_eq!(SYNC_BUCKET_BOUNDS_S[0], 0.000_05);
        for w in SYNC_BUCKET_BOUNDS_S.windows(2) {
            assert_eq!(w[1], w[0] * 2.0);
        }
        assert!((SYNC_BUCKET_BOUNDS_S[16] - 3.2768).abs() < 1e-9);
    }

    #[test]
    fn a_sync_lands_in_the_first_bucket_that_holds_it_and_the_counts_are_cumulative() {
        let c = Counters::default();
        c.synced(Duration::from_micros(50)); // on the bound: bucket 0
        c.synced(Duration::from_micros(51)); // bucket 1 (100 µs)
        c.synced(Duration::from_millis(3)); // bucket 6 (3.2 ms)
        c.synced(Duration::from_secs(10)); // past the bounds
        c.groups_answered(6);
        c.indexed(300);
        let s = c.snapshot(7);
        assert_eq!(s.syncs, 4);
        assert_eq!(s.groups, 6);
        assert_eq!(s.groups_per_sync(), 1.5);
        assert_eq!(s.sync_buckets.len(), SYNC_BUCKET_BOUNDS_S.len() + 1);
        assert_eq!(&s.sync_buckets[..7], &[1, 2, 2, 2, 2, 2, 3]);
        assert_eq!(s.sync_buckets[16], 3);
        assert_eq!(s.sync_buckets[17], 4, "the last bucket counts every sync");
        let own: Vec<_> = s.sync_bucket_counts().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            own,
            [
                (Some(0.000_05), 1),
                (Some(0.000_1), 1),
                (Some(SYNC_BUCKET_BOUNDS_S[6]), 1),
                (None, 1)
            ]
        );
        assert_eq!(s.sync_bucket_counts().count(), 18);
        assert!((s.sync_seconds - 10.003_101).abs() < 1e-9);
        assert_eq!((s.index_writes, s.index_keys, s.overlay_keys), (1, 300, 7));
    }

    #[test]
    fn a_duration_beyond_u64_nanoseconds_saturates_instead_of_wrapping() {
        let c = Counters::default();
        c.synced(Duration::MAX);
        let s = c.snapshot(0);
        assert_eq!(s.syncs, 1);
        assert_eq!(s.sync_buckets[17], 1);
        assert_eq!(s.sync_seconds, u64::MAX as f64 / 1e9);
    }

    #[test]
    fn the_difference_of_two_snapshots_counts_what_happened_between() {
        let c = Counters::default();
        c.synced(Duration::from_micros(200));
        c.groups_answered(2);
        let before = c.snapshot(5);
        c.synced(Duration::from_micros(400));
        c.groups_answered(3);
        c.indexed(10);
        let d = c.snapshot(1).since(&before);
        assert_eq!(
            (d.syncs, d.groups, d.index_writes, d.index_keys),
            (1, 3, 1, 10)
        );
        assert_eq!(d.overlay_keys, 1);
        assert_eq!(d.sync_buckets[3], 1, "the 400 µs sync");
        assert_eq!(d.sync_buckets[2], 0, "the 200 µs one came before");
        assert!((d.sync_seconds - 0.000_4).abs() < 1e-9);
        // Another vault's counters (smaller): counted from zero.
        let fresh = Counters::default().snapshot(0);
        assert_eq!(fresh.since(&before).syncs, 0);
        assert_eq!(fresh.since(&before).sync_seconds, 0.0);
    }
}
