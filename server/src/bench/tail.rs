//! Where a run's slowest requests began, and what the data dir's disk did
//! while they waited.
//!
//! A p99 set by a few stalls (one device flush held for a few hundred
//! milliseconds stops every durable commit behind it) and a p99 spread
//! over the whole run look the same in a histogram, and call for
//! different fixes. So each timed request's start and latency are kept
//! beside the histogram ([`Recorder`]); the requests slower than the run's
//! p99 are grouped by the [`WINDOW_MS`] window they began in; and the
//! windows that hold the most of them are listed ([`Tail`]), each with the
//! device flushes that ended between the window's start and the end of its
//! slowest request.
//!
//! The device counters come from `/proc/diskstats` ([`DiskTrace`], sampled
//! every [`SAMPLE`] while a run lasts), for the block device that holds the
//! data dir (found by the dir's `st_dev`; for a partition, the whole disk
//! it is on, since the kernel counts flushes only for whole disks, so its
//! counters include the disk's other partitions). Where there is none (tmpfs, an
//! overlay, a target on another machine, a system without
//! `/proc/diskstats`) the windows come without device figures. A flush is
//! counted when it ends, with the whole time it took, so a flush held for
//! 300 ms shows as 300 ms in the window where it ended; a window's span
//! runs to the end of its slowest request to catch it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{add_histogram, micros, new_histogram};

/// The width of a tail window.
pub const WINDOW_MS: u64 = 100;
/// How often [`DiskTrace`] reads the device's counters.
pub const SAMPLE: Duration = Duration::from_millis(20);
/// Most windows a [`Tail`] lists.
pub const MAX_WINDOWS: usize = 8;

/// A pass's latencies, and when each request began.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    pub hist: Histogram<u64>,
    /// (µs from the pass's start to the request's, latency in µs).
    requests: Vec<(u64, u64)>,
}

impl Recorder {
    /// A recorder for a pass that started at `start`.
    pub fn new(start: Instant) -> Self {
        Recorder {
            start,
            hist: new_histogram(),
            requests: Vec::new(),
        }
    }

    /// A request that began at `from` (its latency's start) and has just
    /// ended.
    pub fn record(&mut self, from: Instant) {
        let latency = micros(from.elapsed());
        self.hist.saturating_record(latency);
        let at = u64::try_from(from.saturating_duration_since(self.start).as_micros())
            .unwrap_or(u64::MAX);
        self.requests.push((at, latency));
    }

    /// Adds another task's requests of the same pass.
    pub fn merge(&mut self, other: Recorder) {
        add_histogram(&mut self.hist, &other.hist);
        self.requests.extend(other.requests);
    }

    /// The requests slower than the pass's p99, by window, with the
    /// device's flushes from `disk` where there is one.
    pub fn tail(&self, disk: Option<&DiskTrace>) -> Tail {
        self.tail_over(self.hist.value_at_quantile(0.99), disk)
    }

    /// [`Recorder::tail`] with the threshold given: the requests slower
    /// than `over_us`.
    fn tail_over(&self, over_us: u64, disk: Option<&DiskTrace>) -> Tail {
        let samples = disk.map(|d| d.samples());
        let mut by_start: BTreeMap<u64, TailWindow> = BTreeMap::new();
        let mut slow = 0u64;
        for &(at, latency) in &self.requests {
            let from_ms = at / 1000 / WINDOW_MS * WINDOW_MS;
            let w = by_start
                .entry(from_ms)
                .or_insert_with(|| TailWindow::new(from_ms));
            w.started += 1;
            if latency > over_us {
                w.slow += 1;
                slow += 1;
            }
            w.max_us = w.max_us.max(latency);
        }
        let mut windows: Vec<TailWindow> = by_start.into_values().filter(|w| w.slow > 0).collect();
        windows.sort_by(|a, b| b.slow.cmp(&a.slow).then(a.from_ms.cmp(&b.from_ms)));
        windows.truncate(MAX_WINDOWS);
        if let Some(samples) = &samples {
            for w in &mut windows {
                let from = self.start + Duration::from_millis(w.from_ms);
                let to = from + Duration::from_millis(WINDOW_MS) + Duration::from_micros(w.max_us);
                w.device = Some(Device::between(samples, from, to));
            }
        }
        Tail {
            over_us,
            slow,
            window_ms: WINDOW_MS,
            in_windows: windows.iter().map(|w| w.slow).sum(),
            windows,
            device: disk.map(|d| d.name.clone()),
        }
    }
}

/// The requests slower than a pass's p99, by the window they began in.
#[derive(Debug, Clone, Serialize)]
pub struct Tail {
    /// The pass's p99, µs.
    pub over_us: u64,
    /// Requests that took longer.
    pub slow: u64,
    pub window_ms: u64,
    /// How many of them began in the windows listed.
    pub in_windows: u64,
    /// The windows that hold the most of them (at most [`MAX_WINDOWS`]),
    /// most first.
    pub windows: Vec<TailWindow>,
    /// The block device of the data dir (`/proc/diskstats` name), if one
    /// was traced.
    pub device: Option<String>,
}

/// Windows a [`Tail::describe`] prints (JSON has all of them).
const WINDOWS_PRINTED: usize = 3;

impl Tail {
    /// Lines for a report's text: how the slow requests of the pass
    /// `name` spread, and the windows that hold the most of them.
    pub fn describe(&self, name: &str) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        if self.slow == 0 {
            return s;
        }
        let _ = write!(
            s,
            "  {name}: {} over the p99 ({:.1} ms); {} of them began in {} window{} of {} ms",
            super::thousands(self.slow),
            self.over_us as f64 / 1000.0,
            super::thousands(self.in_windows),
            self.windows.len(),
            if self.windows.len() == 1 { "" } else { "s" },
            self.window_ms,
        );
        for w in self.windows.iter().take(WINDOWS_PRINTED) {
            let _ = write!(
                s,
                "\n    at {:.1} s: {} of {}, the slowest {:.1} ms",
                w.from_ms as f64 / 1000.0,
                super::thousands(w.slow),
                super::thousands(w.started),
                w.max_us as f64 / 1000.0,
            );
            if let (Some(d), Some(name)) = (&w.device, &self.device) {
                let _ = write!(
                    s,
                    "; {name} until then: {} flushes taking {} ms, {:.1} MB written",
                    super::thousands(d.flushes),
                    super::thousands(d.flush_ms),
                    d.written_bytes as f64 / 1e6,
                );
            }
        }
        s
    }
}

/// The part of a report's text on its passes' tails (each from
/// [`Tail::describe`]): a heading and their lines, or nothing when no pass
/// had a slow request.
pub fn section(described: impl IntoIterator<Item = String>) -> String {
    let lines: Vec<String> = described.into_iter().filter(|t| !t.is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n  the slowest 1% (when they began; the data dir's disk from then until the slowest was done):\n{}",
        lines.join("\n")
    )
}

/// One window of a [`Tail`].
#[derive(Debug, Clone, Serialize)]
pub struct TailWindow {
    /// Where it starts, ms from the pass's start.
    pub from_ms: u64,
    /// Requests that began in it.
    pub started: u64,
    /// Of them, those slower than the pass's p99.
    pub slow: u64,
    /// The slowest of them, µs.
    pub max_us: u64,
    /// What the device did from the window's start to its slowest
    /// request's end.
    pub device: Option<Device>,
}

impl TailWindow {
    fn new(from_ms: u64) -> Self {
        TailWindow {
            from_ms,
            started: 0,
            slow: 0,
            max_us: 0,
            device: None,
        }
    }
}

/// A block device's activity over a span (differences of its counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Device {
    /// Cache flushes that ended in the span.
    pub flushes: u64,
    /// The time they took, ms, summed.
    pub flush_ms: u64,
    /// Writes that ended in the span.
    pub writes: u64,
    /// Bytes they wrote.
    pub written_bytes: u64,
    /// Discards that ended in the span, and the time they took, ms.
    pub discards: u64,
    pub discard_ms: u64,
}

impl Device {
    /// The counters' growth from the last sample at or before `from` (or
    /// the first) to the first at or after `to` (or the last).
    fn between(samples: &[(Instant, Counters)], from: Instant, to: Instant) -> Device {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return Device::default();
        };
        let a = samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .unwrap_or(first);
        let b = samples.iter().find(|(t, _)| *t >= to).unwrap_or(last);
        b.1.since(&a.1)
    }
}

/// The cumulative counters of one `/proc/diskstats` line that a [`Device`]
/// reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    writes: u64,
    sectors_written: u64,
    discards: u64,
    discard_ms: u64,
    flushes: u64,
    flush_ms: u64,
}

impl Counters {
    fn since(&self, before: &Counters) -> Device {
        Device {
            flushes: self.flushes.saturating_sub(before.flushes),
            flush_ms: self.flush_ms.saturating_sub(before.flush_ms),
            writes: self.writes.saturating_sub(before.writes),
            written_bytes: self
                .sectors_written
                .saturating_sub(before.sectors_written)
                .saturating_mul(512),
            discards: self.discards.saturating_sub(before.discards),
            discard_ms: self.discard_ms.saturating_sub(before.discard_ms),
        }
    }
}

/// The name and counters of the device `major:minor` in the text of
/// `/proc/diskstats` (the kernel's `Documentation/admin-guide/iostats.rst`:
/// after major, minor and name, field 5 is writes completed, 7 sectors
/// written, 12 discards completed, 15 ms discarding, 16 flushes completed,
/// 17 ms flushing). Kernels before 4.18 have no discard fields and before
/// 5.5 no flush fields: those read as zero.
pub fn parse_diskstats(text: &str, major: u64, minor: u64) -> Option<(String, Counters)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if num(0)? != major || num(1)? != minor {
            return None;
        }
        // Fields counted from 1 after the name (f[2]).
        let field = |k: usize| num(2 + k).unwrap_or(0);
        Some((
            f.get(2)?.to_string(),
            Counters {
                writes: field(5),
                sectors_written: field(7),
                discards: field(12),
                discard_ms: field(15),
                flushes: field(16),
                flush_ms: field(17),
            },
        ))
    })
}

/// The whole disk that holds the block device `major:minor`: itself,
/// unless sysfs (`sys` is its `/sys/dev/block`) says it is a partition
/// (`M:m/partition`), whose parent's numbers are in `M:m/../dev`. The
/// kernel counts flushes only for whole disks: a partition's flush fields
/// stay 0.
pub fn whole_disk(sys: &Path, major: u64, minor: u64) -> (u64, u64) {
    let node = sys.join(format!("{major}:{minor}"));
    if !node.join("partition").exists() {
        return (major, minor);
    }
    let parent = std::fs::read_to_string(node.join("../dev")).ok();
    parent
        .as_deref()
        .and_then(|t| t.trim().split_once(':'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .unwrap_or((major, minor))
}

/// The major and minor numbers of a Linux `st_dev` (glibc's
/// `gnu_dev_major` and `gnu_dev_minor`).
pub fn dev_numbers(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// Samples of one block device's counters, taken every [`SAMPLE`] by a
/// task that ends when the trace is dropped.
#[derive(Debug)]
pub struct DiskTrace {
    name: String,
    major: u64,
    minor: u64,
    samples: Mutex<Vec<(Instant, Counters)>>,
}

impl DiskTrace {
    /// Starts tracing the block device that holds `dir`; `None` where
    /// there is none to trace (see the module doc).
    pub fn start(dir: &Path) -> Option<Arc<DiskTrace>> {
        use std::os::unix::fs::MetadataExt;
        let (major, minor) = dev_numbers(std::fs::metadata(dir).ok()?.dev());
        if major == 0 {
            // Anonymous devices: tmpfs, overlay, and other file systems
            // without a block device.
            return None;
        }
        let (major, minor) = whole_disk(Path::new("/sys/dev/block"), major, minor);
        let (name, first) = read_diskstats(major, minor)?;
        let trace = Arc::new(DiskTrace {
            name,
            major,
            minor,
            samples: Mutex::new(vec![(Instant::now(), first)]),
        });
        let weak: Weak<DiskTrace> = Arc::downgrade(&trace);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(t) = weak.upgrade() else { break };
                t.sample();
            }
        });
        Some(trace)
    }

    fn sample(&self) {
        if let Some((_, c)) = read_diskstats(self.major, self.minor) {
            let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            s.push((Instant::now(), c));
        }
    }

    /// Every sample so far, with one taken now.
    fn samples(&self) -> Vec<(Instant, Counters)> {
        self.sample();
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn read_diskstats(major: u64, minor: u64) -> Option<(String, Counters)> {
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    parse_diskstats(&text, major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two lines of a 6.x kernel's `/proc/diskstats` (20 fields after the
    /// name) and one of a 4.x kernel's (11).
    const DISKSTATS: &str = "\
 254       0 vda 1629877 42066 72923402 2254841 3602759 295452 1215807088 6815158 0 1653816 10145318 256447 94 519306800 334295 1119299 741022
 254       1 vda1 1600000 42000 72900000 2250000 3600000 295000 1215000000 6810000 0 1650000 10140000 256000 90 519000000 334000 0 0
   8      16 sdb 100 2 300 4 500 6 700 8 0 10 11
";

    /// A partition is traced as the disk it is on, found as sysfs links
    /// it (`/sys/dev/block/M:m` → `…/block/vda/vda1`); a whole disk, or
    /// a device sysfs does not list, as itself.
    #[test]
    fn a_partition_is_traced_as_its_whole_disk() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let disk = tmp.path().join("devices/block/vda");
        std::fs::create_dir_all(disk.join("vda1")).expect("mkdir");
        std::fs::write(disk.join("dev"), "254:0\n").expect("write");
        std::fs::write(disk.join("vda1/partition"), "1\n").expect("write");
        std::fs::write(disk.join("vda1/dev"), "254:1\n").expect("write");
        let sys = tmp.path().join("dev/block");
        std::fs::create_dir_all(&sys).expect("mkdir");
        std::os::unix::fs::symlink(disk.join("vda1"), sys.join("254:1")).expect("link");
        std::os::unix::fs::symlink(&disk, sys.join("254:0")).expect("link");
        assert_eq!(whole_disk(&sys, 254, 1), (254, 0));
        assert_eq!(whole_disk(&sys, 254, 0), (254, 0));
        assert_eq!(whole_disk(&sys, 8, 16), (8, 16));
    }

    #[test]
    fn diskstats_fields_are_read_by_position() {
        let (name, c) = parse_diskstats(DISKSTATS, 254, 0).expect("vda is listed");
        assert_eq!(name, "vda");
        assert_eq!(
            c,
            Counters {
                writes: 3_602_759,
                sectors_written: 1_215_807_088,
                discards: 256_447,
                discard_ms: 334_295,
                flushes: 1_119_299,
                flush_ms: 741_022,
            }
        );
        let (name, c) = parse_diskstats(DISKSTATS, 254, 1).expect("vda1 is listed");
        assert_eq!((name.as_str(), c.flushes), ("vda1", 0));
        // An old kernel's line: the fields it lacks read as zero.
        let (_, c) = parse_diskstats(DISKSTATS, 8, 16).expect("sdb is listed");
        assert_eq!((c.writes, c.sectors_written, c.flushes), (500, 700, 0));
        assert_eq!(parse_diskstats(DISKSTATS, 8, 0), None);
        assert_eq!(parse_diskstats("garbage\n\n 1 x\n", 1, 0), None);
    }

    #[test]
    fn device_numbers_split_as_glibc_does() {
        // glibc's makedev(254, 1) and makedev(259, 65537).
        assert_eq!(dev_numbers(0xfe01), (254, 1));
        assert_eq!(dev_numbers(0x1001_0301), (259, 65537));
        assert_eq!(dev_numbers(0), (0, 0));
    }

    fn counters(flushes: u64, flush_ms: u64) -> Counters {
        Counters {
            flushes,
            flush_ms,
            ..Counters::default()
        }
    }

    #[test]
    fn slow_requests_are_grouped_by_the_window_they_began_in() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        // 1,000 quick requests over a second, then a stall: the ten that
        // began at 420–429 ms took 300 ms, and two at 900 ms took 50 ms.
        for i in 0..1000u64 {
            let latency = match i {
                420..=429 => 300_000,
                900 | 901 => 50_000,
                _ => 800,
            };
            r.requests.push((i * 1000, latency));
            r.hist.saturating_record(latency);
        }
        // The threshold a run would take from its p99.
        let over = 10_000;
        let samples = vec![
            (start, counters(10, 5)),
            (start + Duration::from_millis(400), counters(50, 25)),
            (start + Duration::from_millis(800), counters(60, 330)),
            (start + Duration::from_millis(1100), counters(70, 335)),
        ];
        let trace = DiskTrace {
            name: "vda".into(),
            major: 0,
            minor: 0,
            samples: Mutex::new(samples),
        };
        let t = r.tail_over(over, Some(&trace));
        assert_eq!((t.slow, t.in_windows, t.windows.len()), (12, 12, 2));
        let w = &t.windows[0];
        assert_eq!(
            (w.from_ms, w.started, w.slow, w.max_us),
            (400, 100, 10, 300_000)
        );
        // 400 ms to 800 ms (the window and its slowest request's 300 ms):
        // the samples at 400 and 800 ms.
        assert_eq!(w.device.map(|d| (d.flushes, d.flush_ms)), Some((10, 305)));
        let w = &t.windows[1];
        assert_eq!((w.from_ms, w.slow, w.max_us), (900, 2, 50_000));
        // From the sample at 800 ms to the last one.
        assert_eq!(w.device.map(|d| d.flush_ms), Some(5));
        assert_eq!(t.device.as_deref(), Some("vda"));

        let quiet = r.tail_over(u64::MAX, None);
        assert_eq!((quiet.slow, quiet.windows.len()), (0, 0));
    }

    #[test]
    fn a_window_list_is_bounded_and_ordered_by_its_slow_requests() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        // Window k (k = 0..20) holds k + 1 slow requests.
        for k in 0..20u64 {
            for j in 0..=k {
                r.requests.push((k * WINDOW_MS * 1000 + j, 10_000));
            }
        }
        let t = r.tail_over(1_000, None);
        assert_eq!(t.windows.len(), MAX_WINDOWS);
        let firsts: Vec<u64> = t.windows.iter().map(|w| w.from_ms).collect();
        assert_eq!(firsts, vec![1900, 1800, 1700, 1600, 1500, 1400, 1300, 1200]);
        assert_eq!(t.slow, 210);
        assert_eq!(t.in_windows, (13..=20).sum::<u64>());
        assert!(t.windows.iter().all(|w| w.device.is_none()));
    }

    #[test]
    fn a_report_names_the_windows_and_what_the_device_did() {
        let t = Tail {
            over_us: 4_600,
            slow: 200,
            window_ms: WINDOW_MS,
            in_windows: 70,
            windows: vec![TailWindow {
                from_ms: 4_400,
                started: 200,
                slow: 70,
                max_us: 31_100,
                device: Some(Device {
                    flushes: 131,
                    flush_ms: 33,
                    written_bytes: 15_500_000,
                    ..Device::default()
                }),
            }],
            device: Some("vda".into()),
        };
        assert_eq!(
            section([t.describe("redeem"), String::new()]),
            "\n  the slowest 1% (when they began; the data dir's disk from then until the slowest was done):\n  \
             redeem: 200 over the p99 (4.6 ms); 70 of them began in 1 window of 100 ms\n    \
             at 4.4 s: 70 of 200, the slowest 31.1 ms; vda until then: 131 flushes taking 33 ms, 15.5 MB written"
        );
        let quiet = Tail {
            slow: 0,
            in_windows: 0,
            windows: Vec::new(),
            ..t
        };
        assert_eq!(quiet.describe("redeem"), "");
        assert_eq!(section([quiet.describe("redeem")]), "");
    }

    #[tokio::test]
    async fn a_trace_of_the_temp_dir_samples_until_dropped() {
        let dir = std::env::temp_dir();
        // Whatever holds it here: a block device is traced, anything else
        // gives none; both are fine, neither may fail.
        if let Some(t) = DiskTrace::start(&dir) {
            let from = Instant::now();
            tokio::time::sleep(SAMPLE * 3).await;
            let samples = t.samples();
            // The first at the start, the sampler's, and one taken now.
            assert!(samples.len() >= 3, "{} samples", samples.len());
            let d = Device::between(&samples, from, Instant::now());
            assert!(d.flush_ms <= 60_000);
            assert!(!t.name.is_empty());
        }
    }
}
