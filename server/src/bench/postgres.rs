//! PostgreSQL baseline of protocol appends: what a service would do that
//! kept its customer records in a table instead.
//!
//! `clients` tasks, each on its own connection, `INSERT` one row at a time
//! into a table of their own, each statement its own transaction: with
//! `fsync` and `synchronous_commit` on, PostgreSQL acknowledges the commit
//! once its WAL record is flushed, and concurrent commits share flushes (its
//! group commit). A row is what the vault stores per record: a `bigint`
//! primary key (the seq), the subject id, and the record's bytes (`bytea`,
//! random, so that nothing compresses them).
//!
//! The server is the caller's (`--postgres CONNINFO`, a libpq connection
//! string or URL); the run
//! - refuses a server that would acknowledge a commit before it is durable
//!   (`fsync` off, `synchronous_commit` off);
//! - creates its table, [`TABLE`], and refuses to start if one of that name
//!   exists (it never drops a table it did not create);
//! - drops the table at the end, whatever happened.
//!
//! The connection string may hold a password: it is never printed or
//! written to the report ([`Conninfo`] shows only the hosts and ports).

use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};

use super::{join_error, micros, new_histogram, Latency, Pace, Progress};
use crate::{Error, Result};

/// The table a run creates, fills and drops.
pub const TABLE: &str = "fintrust_bench_records";

/// A PostgreSQL connection string, parsed when it is given; it prints only
/// where it points, never a password.
#[derive(Clone)]
pub struct Conninfo {
    /// Boxed: a `Config` is a few hundred bytes, and parameters are moved
    /// around by value.
    config: Box<tokio_postgres::Config>,
    /// `host:port` of each host, for messages and the report.
    shown: String,
}

impl Conninfo {
    /// Parses a libpq connection string (`host=... port=... user=...`) or a
    /// `postgresql://` URL.
    pub fn parse(s: &str) -> Result<Conninfo> {
        let config: tokio_postgres::Config = s
            .parse()
            .map_err(|e| pg_error(format!("--postgres is not a connection string: {e}")))?;
        let ports = config.get_ports();
        let shown = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{host}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",");
        Ok(Conninfo {
            config: Box::new(config),
            shown,
        })
    }

    /// Where it points: `host:port` of each host.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl std::fmt::Debug for Conninfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conninfo({})", self.shown)
    }
}

/// The timed pass of `INSERT`s.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresRun {
    /// `server_version` of the server.
    pub version: String,
    /// Where it ran: `host:port` (no user, no password).
    pub server: String,
    /// `synchronous_commit` as the server reported it (`on`, or `local`,
    /// `remote_write`, `remote_apply`).
    pub synchronous_commit: String,
    pub rows: u64,
    pub clients: usize,
    pub row_bytes: usize,
    pub elapsed_s: f64,
    pub rows_per_s: f64,
    /// One `INSERT`'s round trip, commit included.
    pub latency_us: Latency,
}

fn pg_error(what: impl Into<String>) -> Error {
    Error::Usage(format!("postgres baseline: {}", what.into()))
}

fn query_error(what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| pg_error(format!("{what}: {e}"))
}

/// Connects `n` clients; each connection is driven by a task of its own,
/// which ends when its client is dropped.
async fn connect(info: &Conninfo, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, connection) = info
            .config
            .connect(NoTls)
            .await
            .map_err(|e| pg_error(format!("connecting to {}: {e}", info.shown)))?;
        tokio::spawn(async move {
            // An error here surfaces as the client's next query failing.
            let _ = connection.await;
        });
        clients.push(client);
    }
    Ok(clients)
}

/// A setting's value (`SHOW`).
async fn show(c: &Client, name: &'static str) -> Result<String> {
    let row = c
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .map_err(query_error(name))?;
    row.try_get(0).map_err(query_error(name))
}

/// What a run needs of the server: durable commits and no table of
/// [`TABLE`]'s name. Returns `server_version` and `synchronous_commit`.
async fn check_server(info: &Conninfo, c: &Client) -> Result<(String, String)> {
    if show(c, "fsync").await? != "on" {
        return Err(pg_error(format!(
            "{} runs with fsync off: its commits are not durable, so it is no baseline",
            info.shown
        )));
    }
    let synchronous_commit = show(c, "synchronous_commit").await?;
    if synchronous_commit == "off" {
        return Err(pg_error(format!(
            "{} runs with synchronous_commit off: it acknowledges commits before they are durable",
            info.shown
        )));
    }
    let exists: Option<String> = c
        .query_one("SELECT to_regclass($1)::text", &[&TABLE])
        .await
        .map_err(query_error("looking for the table"))?
        .try_get(0)
        .map_err(query_error("looking for the table"))?;
    if exists.is_some() {
        return Err(pg_error(format!(
            "{} already has a table {TABLE}: drop it if an earlier run left it",
            info.shown
        )));
    }
    Ok((show(c, "server_version").await?, synchronous_commit))
}

/// Checks the server before anything else runs, so that a server that is
/// down, not durable, or holding the table fails the run at once.
pub(super) async fn preflight(info: &Conninfo) -> Result<()> {
    let c = connect(info, 1).await?;
    let c = c.first().ok_or_else(|| pg_error("no client"))?;
    check_server(info, c).await.map(drop)
}

/// Inserts `rows` rows of `row_bytes` random bytes over `clients`
/// connections, one statement at a time on each; see the module doc.
pub(super) async fn run_insert(
    info: &Conninfo,
    rows: u64,
    clients: usize,
    row_bytes: usize,
    subjects: usize,
    progress: Progress,
) -> Result<PostgresRun> {
    let conns = connect(info, clients).await?;
    let Some(first) = conns.first() else {
        return Err(pg_error("no clients"));
    };
    let (version, synchronous_commit) = check_server(info, first).await?;
    // Without IF NOT EXISTS: an existing table of that name is someone
    // else's, and the run stops here without touching it.
    first
        .batch_execute(&format!(
            "CREATE TABLE {TABLE} (seq bigint PRIMARY KEY, subject text NOT NULL, body bytea NOT NULL)"
        ))
        .await
        .map_err(|e| {
            pg_error(format!(
                "creating table {TABLE} (drop it if an earlier run left it): {e}"
            ))
        })?;
    let bar = progress.phase("postgres INSERT", rows);
    let timed = drive(conns, rows, row_bytes, subjects, &bar).await;
    bar.finish_and_clear();
    // Dropped whatever happened, on a connection of its own: the timed ones
    // may be broken.
    let dropped = async {
        let c = connect(info, 1).await?;
        let c = c.first().ok_or_else(|| pg_error("no client"))?;
        c.batch_execute(&format!("DROP TABLE {TABLE}"))
            .await
            .map_err(query_error("dropping the table"))
    }
    .await;
    let (hist, secs) = timed?;
    dropped?;
    Ok(PostgresRun {
        version,
        server: info.shown.clone(),
        synchronous_commit,
        rows: hist.len(),
        clients,
        row_bytes,
        elapsed_s: secs,
        rows_per_s: hist.len() as f64 / secs,
        latency_us: Latency::of(&hist),
    })
}

/// The timed pass: every connection prepares the statement, then takes
/// rows from one [`Pace`] until none is left.
async fn drive(
    conns: Vec<Client>,
    rows: u64,
    row_bytes: usize,
    subjects: usize,
    bar: &ProgressBar,
) -> Result<(hdrhistogram::Histogram<u64>, f64)> {
    let mut body = vec![0u8; row_bytes];
    storage::crypto::random_bytes(&mut body);
    let body = Arc::new(body);
    let mut prepared = Vec::with_capacity(conns.len());
    for c in conns {
        let statement = c
            .prepare(&format!(
                "INSERT INTO {TABLE} (seq, subject, body) VALUES ($1, $2, $3)"
            ))
            .await
            .map_err(query_error("preparing the INSERT"))?;
        prepared.push((c, statement));
    }
    let start = Instant::now();
    let pace = Arc::new(Pace::new(None, rows, start));
    let mut set = JoinSet::new();
    for (c, statement) in prepared {
        let (pace, bar, body) = (pace.clone(), bar.clone(), body.clone());
        set.spawn(async move {
            let mut hist = new_histogram();
            while let Some(turn) = pace.take() {
                let seq = i64::try_from(turn.index).map_err(|_| pg_error("seq over i64"))?;
                let subject = super::subject_id(turn.index as usize % subjects.max(1));
                let from = turn.start().await;
                let n = c
                    .execute(&statement, &[&seq, &subject, &body.as_slice()])
                    .await
                    .map_err(query_error("INSERT"))?;
                if n != 1 {
                    return Err(pg_error(format!("INSERT wrote {n} rows")));
                }
                hist.saturating_record(micros(from.elapsed()));
                bar.inc(1);
            }
            Ok::<_, Error>(hist)
        });
    }
    let mut hist = new_histogram();
    while let Some(r) = set.join_next().await {
        hist.add(&r.map_err(join_error)??)
            .map_err(|e| pg_error(format!("histograms: {e}")))?;
    }
    Ok((hist, start.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conninfo_shows_where_it_points_and_never_its_password() {
        for s in [
            "host=db.example port=5433 user=bench password=hunter2",
            "postgresql://bench:hunter2@db.example:5433/postgres",
        ] {
            let c = Conninfo::parse(s).expect("parses");
            assert_eq!(c.shown(), "db.example:5433");
            assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        }
        assert_eq!(
            Conninfo::parse("host=/run/postgresql")
                .expect("parses")
                .shown(),
            "/run/postgresql:5432"
        );
    }

    #[test]
    fn a_malformed_conninfo_is_a_usage_error() {
        let e = Conninfo::parse("host='unterminated").err();
        assert!(
            matches!(&e, Some(Error::Usage(m)) if m.starts_with("postgres baseline")),
            "{e:?}"
        );
    }
}
