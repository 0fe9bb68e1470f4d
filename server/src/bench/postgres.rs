//! PostgreSQL baselines: what a service would use instead of a vault, a
//! table in PostgreSQL.
//!
//! - Of protocol appends (`run_insert`): `clients` tasks, each on its own
//!   connection, `INSERT` one row at a time into [`TABLE`]. A row is what
//!   the vault stores per record: a `bigint` primary key (the seq), the
//!   subject id, and the record's bytes (`bytea`, random, so that nothing
//!   compresses them).
//! - Of redemptions (`run_delete`): [`TOKENS_TABLE`] is loaded with one
//!   row per token (not timed), keyed as the Redis baseline keys them,
//!   then `clients` tasks on persistent connections burn them one at a
//!   time with `DELETE ... RETURNING` the stored value: a one-time value
//!   deleted as it is read, which is what a token burn is.
//!
//! Each statement is its own transaction: with `fsync` and
//! `synchronous_commit` on, PostgreSQL acknowledges the commit once its WAL
//! record is flushed, and concurrent commits share flushes (its group
//! commit).
//!
//! The server is the caller's (`--postgres CONNINFO`, a libpq connection
//! string or URL); a run
//! - refuses a server that would acknowledge a commit before it is durable
//!   (`fsync` off, `synchronous_commit` off);
//! - creates its table, and refuses to start if one of that name exists (it
//!   never drops a table it did not create);
//! - drops the table at the end, whatever happened.
//!
//! The connection string may hold a password: it is never printed or
//! written to the report ([`Conninfo`] shows only the hosts and ports).
//!
//! The connections are plaintext TCP (`NoTls`; a connection string with
//! `sslmode=require` fails to connect), as are the Redis baselines', and
//! the report says so: next to a `--tls` vault run, the vault's figures
//! carry TLS and the baseline's do not.

use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls, Statement};

use super::{add_histogram, join_each, micros, new_histogram, Latency, Pace, Progress};
use crate::{Error, Result};

/// The table an append baseline creates, fills and drops.
pub const TABLE: &str = "fintrust_bench_records";
/// The table a redemption baseline creates, fills, empties and drops.
pub const TOKENS_TABLE: &str = "fintrust_bench_tokens";

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
        if shown.is_empty() {
            return Err(pg_error(
                "--postgres names no host (host=... or postgresql://HOST)",
            ));
        }
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

/// A timed pass of one statement.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresRun {
    /// The statement timed: "INSERT" or "DELETE RETURNING".
    pub statement: &'static str,
    /// `server_version` of the server.
    pub version: String,
    /// Where it ran: `host:port` (no user, no password).
    pub server: String,
    /// `synchronous_commit` as the server reported it (`on`, or `local`,
    /// `remote_write`, `remote_apply`).
    pub synchronous_commit: String,
    /// Statements run, one row each.
    pub ops: u64,
    pub clients: usize,
    /// Bytes of each row's value.
    pub row_bytes: usize,
    pub elapsed_s: f64,
    pub ops_per_s: f64,
    /// One statement's round trip, commit included; with a rate, from the
    /// due time of a statement that found no connection free.
    pub latency_us: Latency,
    /// With a rate: the statements that found no connection free at their
    /// due time.
    pub behind_schedule: Option<u64>,
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

/// What a run needs of the server: durable commits and no table named
/// `table`. Returns `server_version` and `synchronous_commit`.
async fn check_server(info: &Conninfo, c: &Client, table: &str) -> Result<(String, String)> {
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
        .query_one("SELECT to_regclass($1)::text", &[&table])
        .await
        .map_err(query_error("looking for the table"))?
        .try_get(0)
        .map_err(query_error("looking for the table"))?;
    if exists.is_some() {
        return Err(pg_error(format!(
            "{} already has a table {table}: drop it if an earlier run left it",
            info.shown
        )));
    }
    Ok((show(c, "server_version").await?, synchronous_commit))
}

/// Checks the server before anything else runs, so that a server that is
/// down, not durable, or holding `table` fails the run at once.
pub(super) async fn preflight(info: &Conninfo, table: &str) -> Result<()> {
    let c = connect(info, 1).await?;
    let c = c.first().ok_or_else(|| pg_error("no client"))?;
    check_server(info, c, table).await.map(drop)
}

/// What the timed statements do.
#[derive(Clone)]
enum Op {
    /// `INSERT` row `i`: seq `i`, a subject of `subjects`, `body`.
    Insert { body: Arc<Vec<u8>>, subjects: usize },
    /// `DELETE` token `i`, which must return `value`.
    Delete { value: Arc<Vec<u8>> },
}

impl Op {
    fn statement(&self) -> &'static str {
        match self {
            Op::Insert { .. } => "INSERT",
            Op::Delete { .. } => "DELETE RETURNING",
        }
    }

    /// The table the statements work on.
    fn table(&self) -> &'static str {
        match self {
            Op::Insert { .. } => TABLE,
            Op::Delete { .. } => TOKENS_TABLE,
        }
    }

    fn columns(&self) -> &'static str {
        match self {
            Op::Insert { .. } => {
                "seq bigint PRIMARY KEY, subject text NOT NULL, body bytea NOT NULL"
            }
            Op::Delete { .. } => "token text PRIMARY KEY, data bytea NOT NULL",
        }
    }

    /// Bytes of each row's value.
    fn row_bytes(&self) -> usize {
        match self {
            Op::Insert { body, .. } => body.len(),
            Op::Delete { value } => value.len(),
        }
    }

    /// Fills the table before the timed pass: the `n` tokens a `Delete`
    /// pass burns (nothing for `Insert`).
    async fn load(&self, c: &Client, n: u64) -> Result<()> {
        let Op::Delete { value } = self else {
            return Ok(());
        };
        let n = i64::try_from(n).map_err(|_| pg_error("too many tokens"))?;
        c.execute(
            &format!(
                "INSERT INTO {TOKENS_TABLE} (token, data) \
                 SELECT 'token:' || lpad(g::text, 10, '0'), $1 FROM generate_series(0, $2::bigint - 1) g"
            ),
            &[&value.as_slice(), &n],
        )
        .await
        .map_err(query_error("loading the tokens"))?;
        Ok(())
    }

    fn sql(&self) -> String {
        match self {
            Op::Insert { .. } => {
                format!("INSERT INTO {TABLE} (seq, subject, body) VALUES ($1, $2, $3)")
            }
            Op::Delete { .. } => {
                format!("DELETE FROM {TOKENS_TABLE} WHERE token = $1 RETURNING data")
            }
        }
    }

    /// Runs statement `i` once; fails unless it touched exactly its row.
    async fn run(&self, c: &Client, statement: &Statement, i: u64) -> Result<()> {
        match self {
            Op::Insert { body, subjects } => {
                let seq = i64::try_from(i).map_err(|_| pg_error("seq over i64"))?;
                let subject = super::subject_id(i as usize % (*subjects).max(1));
                let n = c
                    .execute(statement, &[&seq, &subject, &body.as_slice()])
                    .await
                    .map_err(query_error("INSERT"))?;
                if n != 1 {
                    return Err(pg_error(format!("INSERT wrote {n} rows")));
                }
            }
            Op::Delete { value } => {
                let rows = c
                    .query(statement, &[&token_key(i)])
                    .await
                    .map_err(query_error("DELETE"))?;
                let got: Option<&[u8]> = match rows.as_slice() {
                    [row] => row.try_get(0).ok(),
                    _ => None,
                };
                if got != Some(value.as_slice()) {
                    return Err(pg_error(format!(
                        "DELETE of token {i} returned {} rows, not its value",
                        rows.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The key of token `i`, as the Redis baseline names it.
fn token_key(i: u64) -> String {
    format!("token:{i:010}")
}

/// Drops its table when dropped before [`TableGuard::disarm`]: when the
/// run that made it is dropped midway (an interrupt), blocking this
/// thread for the drop, which a multi-threaded runtime allows; otherwise
/// the table is named on stderr for the operator to drop.
struct TableGuard<'a> {
    info: &'a Conninfo,
    table: &'a str,
    armed: bool,
}

impl TableGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TableGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let drop_it = async {
            let c = connect(self.info, 1).await?;
            let c = c.first().ok_or_else(|| pg_error("no client"))?;
            c.batch_execute(&format!("DROP TABLE {}", self.table))
                .await
                .map_err(query_error("dropping the table"))
        };
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let dropped = match handle {
            Some(h) => tokio::task::block_in_place(|| h.block_on(drop_it)),
            None => Err(pg_error("no runtime to drop it from")),
        };
        if let Err(e) = dropped {
            eprintln!(
                "warning: the run stopped midway and its table {} is left in PostgreSQL ({e}): drop it",
                self.table
            );
        }
    }
}

/// Creates `table` with `columns` on `c`, runs `body`, and drops the table
/// whatever happened, on a connection of its own (`c` and the timed ones
/// may be broken by then); when the run is dropped midway, as it drops
/// ([`TableGuard`]).
async fn with_table<T>(
    info: &Conninfo,
    c: &Client,
    table: &str,
    columns: &str,
    body: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    // Without IF NOT EXISTS: an existing table of that name is someone
    // else's, and the run stops here without touching it.
    c.batch_execute(&format!("CREATE TABLE {table} ({columns})"))
        .await
        .map_err(|e| {
            pg_error(format!(
                "creating table {table} (drop it if an earlier run left it): {e}"
            ))
        })?;
    let guard = TableGuard {
        info,
        table,
        armed: true,
    };
    let result = body.await;
    guard.disarm();
    let dropped = async {
        let c = connect(info, 1).await?;
        let c = c.first().ok_or_else(|| pg_error("no client"))?;
        c.batch_execute(&format!("DROP TABLE {table}"))
            .await
            .map_err(query_error("dropping the table"))
    }
    .await;
    let r = result?;
    dropped?;
    Ok(r)
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
    let mut body = vec![0u8; row_bytes];
    storage::crypto::random_bytes(&mut body);
    let op = Op::Insert {
        body: Arc::new(body),
        subjects,
    };
    run(info, op, rows, clients, None, progress).await
}

/// Loads `tokens` rows of `value` into [`TOKENS_TABLE`], then deletes them
/// over `clients` connections (at `rate` per second between them, if
/// given), one statement at a time on each; see the module doc.
pub(super) async fn run_delete(
    info: &Conninfo,
    tokens: u64,
    clients: usize,
    value: &[u8],
    rate: Option<f64>,
    progress: Progress,
) -> Result<PostgresRun> {
    let op = Op::Delete {
        value: Arc::new(value.to_vec()),
    };
    run(info, op, tokens, clients, rate, progress).await
}

/// Checks the server, creates `op`'s table and fills it, times `ops`
/// statements over `clients` connections, and drops the table.
async fn run(
    info: &Conninfo,
    op: Op,
    ops: u64,
    clients: usize,
    rate: Option<f64>,
    progress: Progress,
) -> Result<PostgresRun> {
    let first = connect(info, 1)
        .await?
        .pop()
        .ok_or_else(|| pg_error("no client"))?;
    let (version, synchronous_commit) = check_server(info, &first, op.table()).await?;
    let conns = connect(info, clients).await?;
    let (hist, secs, behind_schedule) = with_table(info, &first, op.table(), op.columns(), async {
        op.load(&first, ops).await?;
        let bar = progress.phase(&format!("postgres {}", op.statement()), ops);
        let timed = drive(conns, ops, rate, op.clone(), &bar).await;
        bar.finish_and_clear();
        timed
    })
    .await?;
    Ok(PostgresRun {
        statement: op.statement(),
        version,
        server: info.shown.clone(),
        synchronous_commit,
        ops: hist.len(),
        clients,
        row_bytes: op.row_bytes(),
        elapsed_s: secs,
        ops_per_s: hist.len() as f64 / secs,
        latency_us: Latency::of(&hist),
        behind_schedule,
    })
}

/// The timed pass: every connection prepares the statement, then takes
/// statements from one [`Pace`] (at `rate` if given) until none is left.
/// Returns the latencies, the seconds it took and, with a rate, how many
/// statements were behind schedule.
async fn drive(
    conns: Vec<Client>,
    ops: u64,
    rate: Option<f64>,
    op: Op,
    bar: &ProgressBar,
) -> Result<(Histogram<u64>, f64, Option<u64>)> {
    let mut prepared = Vec::with_capacity(conns.len());
    for c in conns {
        let statement = c
            .prepare(&op.sql())
            .await
            .map_err(query_error("preparing the statement"))?;
        prepared.push((c, statement));
    }
    let start = Instant::now();
    let pace = Arc::new(Pace::new(rate, ops, start));
    let mut set = JoinSet::new();
    for (c, statement) in prepared {
        let (pace, bar, op) = (pace.clone(), bar.clone(), op.clone());
        set.spawn(async move {
            let mut hist = new_histogram();
            while let Some(turn) = pace.take() {
                let from = turn.start().await;
                op.run(&c, &statement, turn.index).await?;
                hist.saturating_record(micros(from.elapsed()));
                bar.inc(1);
            }
            Ok::<_, Error>(hist)
        });
    }
    let mut hist = new_histogram();
    join_each(set, |h| add_histogram(&mut hist, &h)).await?;
    Ok((hist, start.elapsed().as_secs_f64(), pace.behind_schedule()))
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
    fn a_malformed_or_hostless_conninfo_is_a_usage_error() {
        for s in ["host='unterminated", "user=bench"] {
            let e = Conninfo::parse(s).err();
            assert!(
                matches!(&e, Some(Error::Usage(m)) if m.starts_with("postgres baseline")),
                "{s}: {e:?}"
            );
        }
    }
}
