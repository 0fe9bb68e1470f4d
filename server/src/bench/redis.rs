//! Redis baselines, against a store that fsyncs every write (`appendfsync
//! always`):
//!
//! - of the redeem workload (`run`): a one-time value deleted as it is
//!   read (`GETDEL`), which is what a token burn is. `N` keys are loaded
//!   with pipelined `SET`s (not timed), then `clients` tasks on persistent
//!   connections run `GETDEL` one at a time until every key is gone;
//! - of protocol appends (`run_set`): `clients` tasks on persistent
//!   connections `SET` `N` distinct keys to record-sized values, one at a
//!   time each, which is what one durable append is.
//!
//! Either way `redis-server` is started on a free loopback port with a
//! scratch dir, and stopped by its pid at the end, and on any error (the
//! child is killed when dropped).
//!
//! The RESP here is the least that serves: commands as arrays of bulk
//! strings, and the simple, error and bulk replies these commands get.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::tail::{DiskTrace, Recorder, Tail};
use super::{join_each, Latency, Pace, Progress};
use crate::{Error, Result};

/// The stored value: about the size of a redeemed `Data` frame. The
/// PostgreSQL baseline stores the same bytes.
pub(super) const VALUE: &[u8] = br#"{"name":"A** L*******","iban":"GB33 **** **** **** 5555","dob":"1810-1819","income":"80000-89999"}"#;
/// Keys per pipelined `SET` burst while loading.
const LOAD_CHUNK: u64 = 1_000;
/// How long `redis-server` may take to answer its first `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply accepted (a bulk string's declared length).
const MAX_REPLY: usize = 1 << 20;

/// A timed Redis pass: `GETDEL` next to the vault's redemptions, or `SET`
/// next to its appends.
#[derive(Debug, Clone, Serialize)]
pub struct RedisRun {
    /// The command timed: "GETDEL" or "SET".
    pub command: &'static str,
    /// `redis_version` from `INFO server`.
    pub version: String,
    pub keys: u64,
    /// Bytes of each value stored.
    pub value_bytes: usize,
    pub ops: u64,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    /// One command's round trip; with a rate, from the due time of a
    /// command that found no connection free.
    pub latency_us: Latency,
    /// With a rate: the commands that found no connection free at their
    /// due time.
    pub behind_schedule: Option<u64>,
    /// The commands slower than the p99: when they began, and what the
    /// disk under Redis's dir did meanwhile ([`super::tail`]).
    pub tail: Tail,
}

/// The first file named `name` in the `:`-separated `path` (the value of
/// `PATH`, read by the caller).
pub fn find_on_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Starts `bin` under `dir`, loads `keys`, deletes them with `clients`
/// connections (at `rate` per second between them, if given), stops it.
pub(super) async fn run(
    bin: &Path,
    dir: &Path,
    keys: u64,
    clients: usize,
    rate: Option<f64>,
    progress: Progress,
) -> Result<RedisRun> {
    with_server(bin, dir, async |addr| {
        load(addr, keys, progress).await?;
        let bar = progress.phase("redis GETDEL", keys);
        let disk = DiskTrace::start(dir);
        drive(
            addr,
            Load {
                commands: keys,
                value_bytes: VALUE.len(),
                clients,
                rate,
                disk,
            },
            &bar,
            "GETDEL",
            |i| vec![b"GETDEL".to_vec(), key(i)],
            |r| matches!(r, Reply::Bulk(Some(v)) if v == VALUE),
        )
        .await
    })
    .await
}

/// The baseline of single-client durable appends: starts `bin` under
/// `dir`, then `clients` persistent connections `SET` `keys` distinct keys
/// to values of `value_len` random bytes, one command at a time each;
/// stops it.
pub(super) async fn run_set(
    bin: &Path,
    dir: &Path,
    keys: u64,
    clients: usize,
    value_len: usize,
    progress: Progress,
) -> Result<RedisRun> {
    let mut value = vec![0u8; value_len];
    storage::crypto::random_bytes(&mut value);
    with_server(bin, dir, async |addr| {
        let bar = progress.phase("redis SET", keys);
        let disk = DiskTrace::start(dir);
        drive(
            addr,
            Load {
                commands: keys,
                value_bytes: value_len,
                clients,
                rate: None,
                disk,
            },
            &bar,
            "SET",
            move |i| {
                vec![
                    b"SET".to_vec(),
                    format!("record:{i:010}").into_bytes(),
                    value.clone(),
                ]
            },
            |r| matches!(r, Reply::Simple(s) if s == "OK"),
        )
        .await
    })
    .await
}

/// Runs `body` against a `redis-server` started from `bin` on a free
/// loopback port, data under `dir`, fsyncing every write (`appendfsync
/// always`, no snapshots); stops the server by its pid afterwards, whatever
/// happened, and fills in the run's `version`.
async fn with_server(
    bin: &Path,
    dir: &Path,
    body: impl AsyncFnOnce(&str) -> Result<RedisRun>,
) -> Result<RedisRun> {
    std::fs::create_dir_all(dir).map_err(|source| Error::File {
        path: dir.display().to_string(),
        error: source,
    })?;
    let port = free_port().await?;
    let mut child = tokio::process::Command::new(bin)
        .args(["--bind", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .arg("--dir")
        .arg(dir)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::File {
            path: bin.display().to_string(),
            error: source,
        })?;
    let addr = format!("127.0.0.1:{port}");
    let result = async {
        let version = wait_ready(&addr, &mut child).await?;
        let mut r = body(&addr).await?;
        r.version = version;
        Ok(r)
    }
    .await;
    // Stopped by its pid whatever happened.
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

fn redis_error(what: impl Into<String>) -> Error {
    Error::Usage(format!("redis baseline: {}", what.into()))
}

fn io_error(addr: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: format!("redis at {addr}"),
        error: source,
    }
}

/// A port that was free a moment ago (the usual race is acceptable for a
/// loopback benchmark; a taken port fails the start clearly).
async fn free_port() -> Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_error("127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(io_error("127.0.0.1:0"))?.port())
}

/// Waits for `PING` to answer; returns the server's version.
async fn wait_ready(addr: &str, child: &mut tokio::process::Child) -> Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(redis_error(format!(
                "redis-server exited at start ({status})"
            )));
        }
        if let Ok(tcp) = TcpStream::connect(addr).await {
            let mut c = Conn::new(tcp);
            c.command(&[b"PING"]).await?;
            if let Reply::Simple(s) = c.reply().await? {
                if s == "PONG" {
                    c.command(&[b"INFO", b"server"]).await?;
                    let version = match c.reply().await? {
                        Reply::Bulk(Some(info)) => String::from_utf8_lossy(&info)
                            .lines()
                            .find_map(|l| l.strip_prefix("redis_version:"))
                            .unwrap_or("unknown")
                            .trim()
                            .to_string(),
                        _ => "unknown".into(),
                    };
                    return Ok(version);
                }
            }
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(redis_error("redis-server did not answer PING"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("token:{i:010}").into_bytes()
}

/// `SET` every key, in pipelined bursts on a few connections.
async fn load(addr: &str, keys: u64, progress: Progress) -> Result<()> {
    let bar = progress.phase("redis SET (load)", keys);
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..4 {
        let (addr, next, bar) = (addr.to_string(), next.clone(), bar.clone());
        set.spawn(async move {
            let tcp = TcpStream::connect(&addr).await.map_err(io_error(&addr))?;
            let mut c = Conn::new(tcp);
            loop {
                let from = next.fetch_add(LOAD_CHUNK, Ordering::Relaxed);
                if from >= keys {
                    return Ok::<(), Error>(());
                }
                let to = (from + LOAD_CHUNK).min(keys);
                for i in from..to {
                    c.command(&[b"SET", &key(i), VALUE]).await?;
                }
                for _ in from..to {
                    match c.reply().await? {
                        Reply::Simple(s) if s == "OK" => {}
                        other => return Err(redis_error(format!("SET answered {other:?}"))),
                    }
                }
                bar.inc(to - from);
            }
        });
    }
    join_each(set, |()| {}).await?;
    bar.finish_and_clear();
    Ok(())
}

/// How many commands a timed pass sends, of values of how many bytes,
/// over how many connections, and at what rate if any.
struct Load {
    commands: u64,
    value_bytes: usize,
    clients: usize,
    rate: Option<f64>,
    /// The device under the server's dir, if there is one to trace.
    disk: Option<Arc<DiskTrace>>,
}

/// `load.clients` persistent connections sending `load.commands` commands
/// between them, one at a time on each, paced by a [`Pace`] (at
/// `load.rate` if given): command `i` is `command(i)`, built before its
/// clock starts, and its reply must pass `expect`. Latency is one round
/// trip, and with a rate the wait for a free connection of a command that
/// found none at its due time.
async fn drive(
    addr: &str,
    load: Load,
    bar: &ProgressBar,
    name: &'static str,
    command: impl Fn(u64) -> Vec<Vec<u8>> + Send + Sync + 'static,
    expect: impl Fn(&Reply) -> bool + Send + Sync + 'static,
) -> Result<RedisRun> {
    let (command, expect) = (Arc::new(command), Arc::new(expect));
    let mut conns = Vec::with_capacity(load.clients);
    for _ in 0..load.clients {
        let tcp = TcpStream::connect(addr).await.map_err(io_error(addr))?;
        tcp.set_nodelay(true).map_err(io_error(addr))?;
        conns.push(Conn::new(tcp));
    }
    let start = Instant::now();
    let pace = Arc::new(Pace::new(load.rate, load.commands, start));
    let mut set = JoinSet::new();
    for mut c in conns {
        let (pace, bar) = (pace.clone(), bar.clone());
        let (command, expect) = (command.clone(), expect.clone());
        set.spawn(async move {
            let mut rec = Recorder::new(start);
            while let Some(turn) = pace.take() {
                let args = command(turn.index);
                let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
                let from = turn.start().await;
                c.command(&args).await?;
                let reply = c.reply().await?;
                if !expect(&reply) {
                    return Err(redis_error(format!("{name} answered {reply:?}")));
                }
                rec.record(from);
                bar.inc(1);
            }
            Ok::<_, Error>(rec)
        });
    }
    let mut rec = Recorder::new(start);
    join_each(set, |r| rec.merge(r)).await?;
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let hist = &rec.hist;
    let latency_us = Latency::of(hist);
    Ok(RedisRun {
        command: name,
        version: String::new(),
        keys: load.commands,
        value_bytes: load.value_bytes,
        ops: hist.len(),
        elapsed_s: secs,
        ops_per_s: hist.len() as f64 / secs,
        latency_us,
        behind_schedule: pace.behind_schedule(),
        tail: rec.tail(load.disk.as_deref()),
    })
}

/// A RESP reply of the kinds `PING`, `INFO`, `SET` and `GETDEL` get (an
/// error reply is an `Err`).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Bulk(Option<Vec<u8>>),
}

/// One connection: commands are buffered and flushed before a reply is read.
struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
}

impl Conn {
    fn new(tcp: TcpStream) -> Self {
        let (r, w) = tcp.into_split();
        Conn {
            r: BufReader::new(r),
            w: BufWriter::new(w),
        }
    }

    async fn command(&mut self, args: &[&[u8]]) -> Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w
            .write_all(&out)
            .await
            .map_err(|e| redis_error(e.to_string()))
    }

    async fn reply(&mut self) -> Result<Reply> {
        self.w
            .flush()
            .await
            .map_err(|e| redis_error(e.to_string()))?;
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .await
            .map_err(|e| redis_error(e.to_string()))?;
        if n == 0 {
            return Err(redis_error("connection closed"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => return Err(redis_error(format!("redis-server said: {rest}"))),
            "$" => {
                let len: i64 = rest
                    .parse()
                    .map_err(|_| redis_error(format!("bad bulk length {rest:?}")))?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    if len > MAX_REPLY {
                        return Err(redis_error("reply over 1 MiB"));
                    }
                    let mut buf = vec![0u8; len + 2];
                    self.r
                        .read_exact(&mut buf)
                        .await
                        .map_err(|e| redis_error(e.to_string()))?;
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            }
            _ => return Err(redis_error(format!("unexpected reply {line:?}"))),
        })
    }
}
