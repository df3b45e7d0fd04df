//! `ltxfs bench handoff`: how long a handoff of the primary role takes, from
//! asking a candidate replica to become the primary until it accepts a write.
//!
//! One run creates a working directory (as `ltxfs bench` does: by default
//! `./ltxfs-bench-<pid>`), starts a private etcd in it on loopback (free ports,
//! its data in `<dir>/etcd-data`, its output in `<dir>/etcd.log`), and two
//! candidate `ltxfs mount` nodes, `node-a` and `node-b`, whose lease is a key in
//! that etcd with a [`LEASE_TTL`] time to live. `node-a` starts first and creates
//! a WAL-mode database; `node-b` then follows it.
//!
//! Each round, a writer thread commits single-row INSERT transactions on the
//! current primary as fast as it can. Once it has committed a few, the benchmark
//! notes t0 and calls [`request_promote`] on the replica (the `Promote` RPC that
//! `ltxfs promote` makes); when that returns, it tries a write transaction on the
//! new primary's mount (a new connection each time, a short busy timeout, retried
//! at once) until one commits, at t1. The round's *handoff to first write* is
//! t1 - t0. The benchmark also reads the handoff's duration from the old
//! primary's log line `handed the primary role over ... elapsed=...`, and counts
//! on the new primary the rows the writer had acknowledged. The direction
//! alternates every round.
//!
//! Invariants: etcd and both nodes are owned by [`run`], declared so that the
//! nodes stop before etcd and etcd stops before the working directory is
//! removed, on every return path (a node: SIGTERM, SIGKILL after 10 s, then a
//! forced unmount; etcd: SIGKILL). The nodes and etcd also exit by themselves
//! if the benchmark dies (the parent-death signal). Every SQLite connection to a
//! mount is closed before its node stops (a connection left open would fault on
//! its `-shm` mapping); every wait has a timeout; a round starts only once the
//! replica has the primary's position, so it is a connected candidate the
//! primary can hand its role to.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use tokio::runtime::Runtime;

use super::replication::{Node, ReplicationBenchError, percentile, wait_converged};
use super::workload::{INSERT, PAYLOAD_BYTES, create_database, sql_error};
use super::{BenchError, MachineInfo, Workspace, write_verdict};
use ltxfs::replication::{ClientCredentials, ReplicationError, request_promote};
use test_support::{Etcd, EtcdError};

/// At most this long from the start of a handoff until the new primary accepts
/// writes, on loopback.
pub const GOAL_FIRST_WRITE: Duration = Duration::from_millis(100);
/// The lease's time to live: short, as a deployment that wants quick failover
/// would set it; a handoff does not wait for it to expire.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// The database the writer and the first writes go to.
const DB: &str = "handoff.db";
/// The table the first write on a new primary inserts into, so that its rows
/// never take the ids of the writer's rows in `t`.
const CREATE_PROBE_TABLE: &str = "CREATE TABLE probe(round INTEGER NOT NULL)";
/// The first write on a new primary.
const PROBE_INSERT: &str = "INSERT INTO probe(round) VALUES (?1)";
/// The etcd key the nodes' lease lives under.
const LEASE_KEY: &str = "ltxfs-bench-handoff/primary";
/// What the old primary logs once the new one holds the lease.
const HANDED_OVER_LINE: &str = "handed the primary role over";
/// The node names; `NODES[0]` starts first and is the first primary.
const NODES: [&str; 2] = ["node-a", "node-b"];

/// How long the first node may take to hold the lease and accept the database.
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to reach the primary's position.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows the writer commits before the handoff starts, so that it is really
/// writing when the primary stops accepting writes.
const WRITER_ROWS_BEFORE_HANDOFF: u64 = 50;
/// How long the writer may take to commit those rows.
const WRITER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the writer waits for a lock; a primary that is handing its role over
/// refuses writes rather than making them wait, so this is rarely reached.
const WRITER_BUSY_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the new primary may take to accept a write after `Promote` returned.
const FIRST_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one attempt to write on the new primary waits for a lock.
const FIRST_WRITE_BUSY_TIMEOUT: Duration = Duration::from_millis(5);
/// The pause between two attempts to write on the new primary.
const FIRST_WRITE_RETRY_INTERVAL: Duration = Duration::from_millis(1);
/// How long the old primary may take to log the end of the handoff.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the old primary's log is read while waiting for that line.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long a reader waits for a lock while counting the writer's rows.
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What `ltxfs bench handoff` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffOptions {
    /// Where to create etcd's and the nodes' files. When `None`, a fresh
    /// directory `./ltxfs-bench-<pid>` is created and removed at the end.
    pub dir: Option<PathBuf>,
    /// How many handoffs to measure; the direction alternates.
    pub rounds: usize,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        HandoffOptions {
            dir: None,
            rounds: 20,
        }
    }
}

/// Everything that can stop the handoff benchmark. Each message names what was
/// being done and, where there is one, the file to look at.
#[derive(Debug, thiserror::Error)]
pub enum HandoffBenchError {
    /// Something the benchmarks share failed: options, files, SQLite, a mount.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// Starting a node, learning its address or waiting for a replica failed.
    #[error(transparent)]
    Cluster(#[from] ReplicationBenchError),
    /// The private etcd the nodes' lease lives in could not be started.
    #[error("the handoff benchmark runs a private etcd for the nodes' lease: {0}")]
    Etcd(#[from] EtcdError),
    /// The runtime that makes the calls to the nodes could not start.
    #[error("could not start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The first node did not accept the database in time.
    #[error("{node} did not accept writes within {} s of starting (it never became the primary?); last error: {last_error}", timeout.as_secs())]
    NoPrimary {
        /// The node's name.
        node: String,
        /// How long the benchmark waited.
        timeout: Duration,
        /// What the last attempt to create the database said.
        last_error: String,
    },
    /// The writer failed while the primary should still have accepted writes.
    #[error("round {round}: the writer on {node} failed before the handoff started: {error}")]
    WriterFailed {
        /// The round, counted from 1.
        round: usize,
        /// The primary it wrote to.
        node: String,
        /// What SQLite said.
        error: String,
    },
    /// The writer committed too few rows before the handoff could start.
    #[error("round {round}: the writer on {node} committed only {rows} of {WRITER_ROWS_BEFORE_HANDOFF} rows within {} s", timeout.as_secs())]
    WriterStalled {
        /// The round, counted from 1.
        round: usize,
        /// The primary it wrote to.
        node: String,
        /// The rows it committed.
        rows: u64,
        /// How long the benchmark waited.
        timeout: Duration,
    },
    /// The `Promote` call to the replica failed.
    #[error("round {round}: asking {node} at {url} to become the primary failed: {source}")]
    Promote {
        /// The round, counted from 1.
        round: usize,
        /// The replica asked.
        node: String,
        /// Its replication address.
        url: String,
        /// What went wrong (boxed: it is large and rare).
        #[source]
        source: Box<ReplicationError>,
    },
    /// The replica took over from another node than the benchmark's primary.
    #[error("round {round}: {node} took over from {previous}, but the primary was {expected}")]
    UnexpectedPrevious {
        /// The round, counted from 1.
        round: usize,
        /// The new primary.
        node: String,
        /// The primary the benchmark handed over from.
        expected: String,
        /// The primary the new one named.
        previous: String,
    },
    /// The new primary did not accept a write in time.
    #[error("round {round}: {node} did not accept a write transaction within {} s of becoming the primary ({attempts} attempts); last error: {last_error}", timeout.as_secs())]
    NotWritable {
        /// The round, counted from 1.
        round: usize,
        /// The new primary.
        node: String,
        /// How long the benchmark tried.
        timeout: Duration,
        /// How many write transactions it tried.
        attempts: u32,
        /// What SQLite said to the last one.
        last_error: String,
    },
    /// The old primary did not log the end of the handoff in time.
    #[error("round {round}: {node} did not log `{HANDED_OVER_LINE}` within {} s; see {}", timeout.as_secs(), log.display())]
    NoLoggedHandoff {
        /// The round, counted from 1.
        round: usize,
        /// The old primary.
        node: String,
        /// How long the benchmark waited.
        timeout: Duration,
        /// The old primary's log.
        log: PathBuf,
    },
    /// The old primary's handoff line has no readable `elapsed=` duration.
    #[error("round {round}: {node} logged a handoff without a readable elapsed= duration: {line}")]
    UnreadableLoggedHandoff {
        /// The round, counted from 1.
        round: usize,
        /// The old primary.
        node: String,
        /// The line.
        line: String,
    },
    /// The writer thread panicked.
    #[error("the writer thread panicked")]
    WriterPanicked,
}

/// The figures of one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffRound {
    /// The old primary.
    pub from: String,
    /// The new primary.
    pub to: String,
    /// From calling `Promote` on the replica until it returned.
    pub promote: Duration,
    /// From calling `Promote` until a write transaction committed on the new
    /// primary.
    pub first_write: Duration,
    /// The handoff's duration as the old primary logged it: from its decision
    /// to hand over until it saw the new primary hold the lease.
    pub logged: Duration,
    /// Write transactions tried on the new primary until one committed.
    pub write_attempts: u32,
    /// Rows the writer had acknowledged on the old primary.
    pub acknowledged: u64,
    /// Of those, rows the new primary did not have.
    pub missing: u64,
}

/// The p50, p90 and maximum of one figure over the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    /// The median (nearest rank).
    pub p50: Duration,
    /// The 90th percentile (nearest rank).
    pub p90: Duration,
    /// The largest.
    pub max: Duration,
}

impl Percentiles {
    /// The spread of `figures`, in any order; zero when there are none.
    pub fn of(mut figures: Vec<Duration>) -> Percentiles {
        figures.sort_unstable();
        Percentiles {
            p50: percentile(&figures, 50),
            p90: percentile(&figures, 90),
            max: figures.last().copied().unwrap_or_default(),
        }
    }
}

/// Everything one run of `ltxfs bench handoff` measured. `Display` renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoffReport {
    /// Where the benchmark ran.
    pub machine: MachineInfo,
    /// The lease's time to live.
    pub ttl: Duration,
    /// The handoffs, in the order measured.
    pub rounds: Vec<HandoffRound>,
    /// Problems that did not invalidate the figures, e.g. an unclean unmount.
    pub warnings: Vec<String>,
}

impl HandoffReport {
    /// Handoff to first write over the rounds.
    pub fn first_write(&self) -> Percentiles {
        Percentiles::of(self.rounds.iter().map(|round| round.first_write).collect())
    }

    /// The `Promote` call's duration over the rounds.
    pub fn promote(&self) -> Percentiles {
        Percentiles::of(self.rounds.iter().map(|round| round.promote).collect())
    }

    /// The old primaries' logged handoff durations over the rounds.
    pub fn logged(&self) -> Percentiles {
        Percentiles::of(self.rounds.iter().map(|round| round.logged).collect())
    }

    /// Acknowledged rows over all rounds.
    pub fn acknowledged(&self) -> u64 {
        self.rounds.iter().map(|round| round.acknowledged).sum()
    }

    /// Acknowledged rows a new primary lacked, over all rounds.
    pub fn missing(&self) -> u64 {
        self.rounds.iter().map(|round| round.missing).sum()
    }

    /// True when every handoff met the goal and no acknowledged row was lost.
    pub fn all_goals_met(&self) -> bool {
        !self.rounds.is_empty() && self.first_write().max <= GOAL_FIRST_WRITE && self.missing() == 0
    }
}

/// Runs the whole handoff benchmark. etcd and every node are stopped before this
/// returns, also on errors.
pub fn run(options: &HandoffOptions) -> Result<HandoffReport, HandoffBenchError> {
    if options.rounds == 0 {
        return Err(BenchError::InvalidOption("--rounds must be at least 1".to_string()).into());
    }
    let mut workspace = Workspace::create(options.dir.as_deref())?;
    let machine = MachineInfo::collect(workspace.path());
    let base = workspace.path().to_path_buf();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HandoffBenchError::Runtime)?;

    // Declared after the workspace and before the nodes, so on an early return
    // the nodes stop first, then etcd, then the workspace is removed.
    let etcd = Etcd::start_in(&base)?;
    let [name_a, name_b] = NODES;
    let node_a = Node::start(&base, name_a, &lease_section(name_a, etcd.url()))?;
    create_database_on_primary(&node_a)?;
    let node_b = Node::start(&base, name_b, &lease_section(name_b, etcd.url()))?;
    let urls = [node_a.wait_for_url()?, node_b.wait_for_url()?];
    let nodes = [node_a, node_b];

    let mut rounds = Vec::with_capacity(options.rounds);
    for round in 0..options.rounds {
        let (from, to) = (round % 2, 1 - round % 2);
        rounds.push(measure_round(
            &runtime,
            round + 1,
            &nodes[from],
            &nodes[to],
            &urls[to],
        )?);
    }

    // The replica stops first, so the primary has no candidate to hand its role
    // to when it stops and only releases the lease.
    let [node_a, node_b] = nodes;
    let (primary, replica) = if options.rounds % 2 == 0 {
        (node_a, node_b)
    } else {
        (node_b, node_a)
    };
    let mut warnings = Vec::new();
    for node in [replica, primary] {
        if let Err(error) = node.stop() {
            warnings.push(error.to_string());
        }
    }
    drop(etcd);
    if let Err(error) = workspace.cleanup() {
        warnings.push(error.to_string());
    }
    Ok(HandoffReport {
        machine,
        ttl: LEASE_TTL,
        rounds,
        warnings,
    })
}

/// The `lease:` section of a candidate node named `hostname` using the etcd at
/// `etcd_url`.
fn lease_section(hostname: &str, etcd_url: &str) -> String {
    format!(
        "lease:\n  type: etcd\n  candidate: true\n  hostname: {hostname}\n  reconnect-delay: 300ms\n  \
         etcd:\n    endpoints: [\"{etcd_url}\"]\n    key: \"{LEASE_KEY}\"\n    ttl: {}s\n",
        LEASE_TTL.as_secs()
    )
}

/// Creates the database (WAL mode, the writer's table `t` and the first
/// writes' table) on `node` once it accepts writes, that is once it holds the
/// lease.
fn create_database_on_primary(node: &Node) -> Result<(), HandoffBenchError> {
    let path = node.db_path(DB);
    let started = Instant::now();
    loop {
        let created = create_database(&path, "wal").and_then(|conn| {
            conn.execute_batch(CREATE_PROBE_TABLE)
                .map_err(|cause| sql_error("create the probe table", &path, cause))
        });
        match created {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() >= PRIMARY_TIMEOUT => {
                return Err(HandoffBenchError::NoPrimary {
                    node: node.name().to_string(),
                    timeout: PRIMARY_TIMEOUT,
                    last_error: error.to_string(),
                });
            }
            // Not the primary yet: the mount refuses to create the file.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Measures one handoff from `from` (the primary) to `to` (a candidate replica
/// reached at `to_url`) while a writer commits on `from`.
fn measure_round(
    runtime: &Runtime,
    round: usize,
    from: &Node,
    to: &Node,
    to_url: &str,
) -> Result<HandoffRound, HandoffBenchError> {
    // The replica has the primary's position, so it streams from the primary
    // and the primary counts it as a connected candidate.
    wait_converged(from, &[to], DB, CONVERGE_TIMEOUT)?;
    let handoffs_before = handoff_lines(&read_log(from.log_path())).len();

    let shared = WriterShared::default();
    let path = from.db_path(DB);
    let (timing, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_until_stopped(round, from.name(), &path, &shared));
        let timing = hand_over(runtime, round, from, to, to_url, &shared);
        shared.stop.store(true, Ordering::Release);
        let written = writer
            .join()
            .map_err(|_| HandoffBenchError::WriterPanicked)
            .and_then(|written| written);
        (timing, written)
    });
    // A writer that failed early explains a failed handoff better than the other way round.
    let written = written?;
    let timing = timing?;

    let present = match written.ids {
        Some(ids) => count_rows(&to.db_path(DB), ids)?,
        None => 0,
    };
    let logged = wait_for_logged_handoff(round, from, handoffs_before)?;
    Ok(HandoffRound {
        from: from.name().to_string(),
        to: to.name().to_string(),
        promote: timing.promote,
        first_write: timing.first_write,
        logged,
        write_attempts: timing.write_attempts,
        acknowledged: written.acknowledged,
        missing: written.acknowledged.saturating_sub(present),
    })
}

/// What the writer thread and the measuring thread share during a round.
#[derive(Default)]
struct WriterShared {
    /// Set by the measuring thread when the writer is to stop.
    stop: AtomicBool,
    /// Set just before the handoff starts; a failed write after it is expected.
    handoff_started: AtomicBool,
    /// Rows acknowledged so far.
    acknowledged: AtomicU64,
    /// Set by the writer when it returns.
    finished: AtomicBool,
}

/// The writer's record of one round.
struct Written {
    /// Rows whose INSERT returned successfully.
    acknowledged: u64,
    /// The ids of the first and the last acknowledged row. Only the writer
    /// inserts into `t`, so every id between them is an acknowledged row.
    ids: Option<(i64, i64)>,
}

/// Commits single-row INSERT transactions on the primary's copy at `path` until
/// told to stop or, once the handoff has started, until a write fails.
fn write_until_stopped(
    round: usize,
    node: &str,
    path: &Path,
    shared: &WriterShared,
) -> Result<Written, HandoffBenchError> {
    let written = write_rows(round, node, path, shared);
    shared.finished.store(true, Ordering::Release);
    written
}

fn write_rows(
    round: usize,
    node: &str,
    path: &Path,
    shared: &WriterShared,
) -> Result<Written, HandoffBenchError> {
    let conn = open_connection(path, WRITER_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|cause| sql_error("set synchronous", path, cause))?;
    let mut insert = conn
        .prepare_cached(INSERT)
        .map_err(|cause| sql_error("prepare the insert", path, cause))?;
    let payload = [0x5a_u8; PAYLOAD_BYTES];
    let mut written = Written {
        acknowledged: 0,
        ids: None,
    };
    while !shared.stop.load(Ordering::Acquire) {
        match insert.execute([&payload[..]]) {
            Ok(_) => {
                let id = conn.last_insert_rowid();
                written.ids = Some(written.ids.map_or((id, id), |(first, _)| (first, id)));
                written.acknowledged += 1;
                shared
                    .acknowledged
                    .store(written.acknowledged, Ordering::Release);
            }
            // The old primary refuses writes once it hands its role over.
            Err(_) if shared.handoff_started.load(Ordering::Acquire) => break,
            Err(error) => {
                return Err(HandoffBenchError::WriterFailed {
                    round,
                    node: node.to_string(),
                    error: error.to_string(),
                });
            }
        }
    }
    Ok(written)
}

/// The timed part of a round.
struct Timing {
    promote: Duration,
    first_write: Duration,
    write_attempts: u32,
}

/// Waits until the writer is committing, then asks `to` to become the primary
/// and writes on it until a write commits.
fn hand_over(
    runtime: &Runtime,
    round: usize,
    from: &Node,
    to: &Node,
    to_url: &str,
    shared: &WriterShared,
) -> Result<Timing, HandoffBenchError> {
    let waiting = Instant::now();
    loop {
        let rows = shared.acknowledged.load(Ordering::Acquire);
        if rows >= WRITER_ROWS_BEFORE_HANDOFF {
            break;
        }
        if shared.finished.load(Ordering::Acquire) || waiting.elapsed() >= WRITER_START_TIMEOUT {
            return Err(HandoffBenchError::WriterStalled {
                round,
                node: from.name().to_string(),
                rows,
                timeout: WRITER_START_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    shared.handoff_started.store(true, Ordering::Release);
    let started = Instant::now();
    let previous = runtime
        .block_on(request_promote(to_url, &ClientCredentials::default()))
        .map_err(|source| HandoffBenchError::Promote {
            round,
            node: to.name().to_string(),
            url: to_url.to_string(),
            source: Box::new(source),
        })?;
    let promote = started.elapsed();
    if previous != from.name() {
        return Err(HandoffBenchError::UnexpectedPrevious {
            round,
            node: to.name().to_string(),
            expected: from.name().to_string(),
            previous,
        });
    }
    let write_attempts = first_write(round, to)?;
    Ok(Timing {
        promote,
        first_write: started.elapsed(),
        write_attempts,
    })
}

/// Tries write transactions on `node` until one commits; returns how many it
/// took.
fn first_write(round: usize, node: &Node) -> Result<u32, HandoffBenchError> {
    let path = node.db_path(DB);
    let started = Instant::now();
    let mut attempts = 0_u32;
    loop {
        attempts += 1;
        let last_error = match try_write(&path, round) {
            Ok(()) => return Ok(attempts),
            Err(error) => error,
        };
        if started.elapsed() >= FIRST_WRITE_TIMEOUT {
            return Err(HandoffBenchError::NotWritable {
                round,
                node: node.name().to_string(),
                timeout: FIRST_WRITE_TIMEOUT,
                attempts,
                last_error: last_error.to_string(),
            });
        }
        std::thread::sleep(FIRST_WRITE_RETRY_INTERVAL);
    }
}

/// One write transaction on a new connection. A connection opened while the
/// node was still a replica would stay read-only (SQLite falls back to opening
/// the file read-only when the mount refuses writing), so every attempt opens
/// its own.
fn try_write(path: &Path, round: usize) -> Result<(), BenchError> {
    let conn = open_connection(path, FIRST_WRITE_BUSY_TIMEOUT)?;
    let round = i64::try_from(round).unwrap_or(i64::MAX);
    conn.pragma_update(None, "synchronous", "NORMAL")
        .and_then(|()| conn.execute_batch("BEGIN IMMEDIATE"))
        .and_then(|()| conn.execute(PROBE_INSERT, [round]))
        .and_then(|_| conn.execute_batch("COMMIT"))
        .map_err(|cause| sql_error("commit a write transaction", path, cause))
}

/// Opens the database at `path` with a busy timeout.
fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, BenchError> {
    let conn =
        Connection::open(path).map_err(|cause| sql_error("open the database", path, cause))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|cause| sql_error("set the busy timeout", path, cause))?;
    Ok(conn)
}

/// How many rows of `t` with an id in `ids` (inclusive) the database at `path`
/// has.
fn count_rows(path: &Path, (first, last): (i64, i64)) -> Result<u64, BenchError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|cause| sql_error("open the database", path, cause))?;
    conn.busy_timeout(READ_BUSY_TIMEOUT)
        .map_err(|cause| sql_error("set the busy timeout", path, cause))?;
    let count: i64 = conn
        .query_row(
            "SELECT count(*) FROM t WHERE id BETWEEN ?1 AND ?2",
            [first, last],
            |row| row.get(0),
        )
        .map_err(|cause| sql_error("count the acknowledged rows", path, cause))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Waits until `node`'s log has more than `before` handoff lines and returns
/// the duration logged in the first new one.
fn wait_for_logged_handoff(
    round: usize,
    node: &Node,
    before: usize,
) -> Result<Duration, HandoffBenchError> {
    let started = Instant::now();
    loop {
        let log = read_log(node.log_path());
        if let Some(line) = handoff_lines(&log).get(before) {
            return logged_elapsed(line).ok_or_else(|| {
                HandoffBenchError::UnreadableLoggedHandoff {
                    round,
                    node: node.name().to_string(),
                    line: line.trim().to_string(),
                }
            });
        }
        if started.elapsed() >= LOG_TIMEOUT {
            return Err(HandoffBenchError::NoLoggedHandoff {
                round,
                node: node.name().to_string(),
                timeout: LOG_TIMEOUT,
                log: node.log_path().to_path_buf(),
            });
        }
        std::thread::sleep(LOG_POLL_INTERVAL);
    }
}

/// A node's log so far. A log that cannot be read yet is the same as an empty
/// one: the caller waits with a timeout and then names the file.
fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The lines of a log that end a handoff, in order.
fn handoff_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(HANDED_OVER_LINE))
        .collect()
}

/// The `elapsed=` field of a handoff line.
fn logged_elapsed(line: &str) -> Option<Duration> {
    let field = line.split(" elapsed=").nth(1)?.split_whitespace().next()?;
    parse_debug_duration(field)
}

/// Reads a duration as Rust's `Debug` for `Duration` writes it: a decimal
/// number and one of the units `ns`, `µs`, `ms` or `s` (e.g. `13.4ms`). The
/// number is read exactly, without going through floating point.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    const UNITS: [(&str, u128); 5] = [
        ("ns", 1),
        ("µs", 1_000),
        ("us", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
    ];
    let (number, nanos_per_unit) = UNITS
        .iter()
        .find_map(|(unit, nanos)| Some((text.strip_suffix(unit)?, *nanos)))?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, "0"));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return None;
    }
    let scale = 10_u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let nanos = whole.parse::<u128>().ok()?.checked_mul(nanos_per_unit)?
        + fraction.parse::<u128>().ok()?.checked_mul(nanos_per_unit)? / scale;
    Some(Duration::from_nanos(u64::try_from(nanos).ok()?))
}

/// A duration in milliseconds with one decimal.
fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

impl fmt::Display for HandoffReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "method:  two candidate ltxfs processes ({}) on loopback, lease in a private etcd (ttl {} s);",
            NODES.join(", "),
            self.ttl.as_secs_f64()
        )?;
        writeln!(
            f,
            "         {} handoffs, alternating direction; each while a writer commits single-row INSERTs \
             (WAL, synchronous=NORMAL) on the primary as fast as it can",
            self.rounds.len()
        )?;
        writeln!(
            f,
            "         first write: from calling Promote on the replica until BEGIN IMMEDIATE; INSERT; COMMIT \
             commits on its mount (new connection per try, {} ms busy timeout, retried after {} ms)",
            FIRST_WRITE_BUSY_TIMEOUT.as_millis(),
            FIRST_WRITE_RETRY_INTERVAL.as_millis()
        )?;
        writeln!(
            f,
            "         logged: the old primary's `{HANDED_OVER_LINE} elapsed=...` (from deciding to hand over \
             until it sees the new primary hold the lease)"
        )?;
        writeln!(f)?;

        let first_write = self.first_write();
        let met = first_write.max <= GOAL_FIRST_WRITE;
        writeln!(f, "| measurement | p50 | p90 | max | goal | met |")?;
        writeln!(f, "|---|---:|---:|---:|---|---|")?;
        writeln!(
            f,
            "| handoff to first write | {} | {} | {} | ≤ {} ms, every round | {} |",
            ms(first_write.p50),
            ms(first_write.p90),
            ms(first_write.max),
            GOAL_FIRST_WRITE.as_millis(),
            if met { "yes" } else { "**no**" }
        )?;
        for (name, spread) in [
            ("Promote call returned", self.promote()),
            ("handoff logged by the old primary", self.logged()),
        ] {
            writeln!(
                f,
                "| {name} | {} | {} | {} | | |",
                ms(spread.p50),
                ms(spread.p90),
                ms(spread.max)
            )?;
        }
        writeln!(f)?;
        let missing = self.missing();
        writeln!(
            f,
            "acknowledged rows missing on the new primary: {missing} of {} (goal 0: {})",
            self.acknowledged(),
            if missing == 0 { "met" } else { "NOT met" }
        )?;
        let attempts = self
            .rounds
            .iter()
            .map(|round| round.write_attempts)
            .max()
            .unwrap_or(0);
        writeln!(f, "most write attempts in one round: {attempts}")?;
        writeln!(f, "rounds (first write / logged):")?;
        for (index, round) in self.rounds.iter().enumerate() {
            writeln!(
                f,
                "  {:>2}. {} -> {}: {} / {}, {} rows acknowledged",
                index + 1,
                round.from,
                round.to,
                ms(round.first_write),
                ms(round.logged),
                round.acknowledged
            )?;
        }
        writeln!(f)?;
        write_verdict(f, self.all_goals_met(), &self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_durations_parse_in_every_unit() {
        let cases = [
            ("13.4ms", Duration::from_micros(13_400)),
            ("950µs", Duration::from_micros(950)),
            ("950us", Duration::from_micros(950)),
            ("120ns", Duration::from_nanos(120)),
            ("1.5s", Duration::from_millis(1500)),
            ("0ns", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_debug_duration(text), Some(expected), "{text}");
        }
        // What `Debug` writes reads back exactly.
        for duration in [
            Duration::from_nanos(13_437_123),
            Duration::from_nanos(1_000_000_001),
            Duration::from_micros(7),
        ] {
            assert_eq!(
                parse_debug_duration(&format!("{duration:?}")),
                Some(duration)
            );
        }
        for bad in [
            "", "ms", "12", "-3ms", "1e3ms", "3 ms", "12min", "NaNs", "1.ms", ".5ms",
        ] {
            assert_eq!(parse_debug_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_logged_handoff_comes_from_its_elapsed_field() {
        let log = "\
2026-12-05T10:00:00.000000Z  INFO ltxfs::node: handing the primary role over to=node-b
2026-12-05T10:00:00.010000Z  INFO ltxfs::node: released the lease
2026-12-05T10:00:00.013000Z  INFO ltxfs::node: handed the primary role over to=node-b elapsed=13.4ms
2026-12-05T10:00:01.000000Z  INFO ltxfs::node: handed the primary role over to=node-b elapsed=2.1s
";
        let lines = handoff_lines(log);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            logged_elapsed(lines[0]),
            Some(Duration::from_micros(13_400))
        );
        assert_eq!(logged_elapsed(lines[1]), Some(Duration::from_millis(2100)));
        assert_eq!(
            logged_elapsed("INFO ltxfs::node: handed the primary role over to=node-b"),
            None
        );
    }

    #[test]
    fn the_lease_section_names_etcd_and_the_ttl() {
        let section = lease_section("node-a", "http://127.0.0.1:2379");
        assert!(section.starts_with("lease:\n  type: etcd\n"), "{section}");
        assert!(section.contains("hostname: node-a\n"), "{section}");
        assert!(
            section.contains("endpoints: [\"http://127.0.0.1:2379\"]"),
            "{section}"
        );
        assert!(section.contains("ttl: 2s\n"), "{section}");
    }

    fn round(first_write_ms: u64, missing: u64) -> HandoffRound {
        HandoffRound {
            from: "node-a".to_string(),
            to: "node-b".to_string(),
            promote: Duration::from_millis(first_write_ms / 2),
            first_write: Duration::from_millis(first_write_ms),
            logged: Duration::from_millis(first_write_ms / 3),
            write_attempts: 1,
            acknowledged: 100,
            missing,
        }
    }

    fn report(rounds: Vec<HandoffRound>) -> HandoffReport {
        HandoffReport {
            machine: MachineInfo::collect(Path::new("/")),
            ttl: LEASE_TTL,
            rounds,
            warnings: vec![],
        }
    }

    #[test]
    fn the_goal_applies_to_every_round_and_to_lost_rows() {
        let good = report((1..=10).map(|ms| round(10 * ms, 0)).collect());
        let spread = good.first_write();
        assert_eq!(spread.p50, Duration::from_millis(50));
        assert_eq!(spread.p90, Duration::from_millis(90));
        assert_eq!(spread.max, Duration::from_millis(100));
        assert!(good.all_goals_met(), "{good}");
        let text = good.to_string();
        assert!(
            text.contains("| handoff to first write | 50.0 ms | 90.0 ms | 100.0 ms |"),
            "{text}"
        );
        assert!(
            text.contains("missing on the new primary: 0 of 1000"),
            "{text}"
        );
        assert!(
            text.contains("10. node-a -> node-b: 100.0 ms / 33.0 ms"),
            "{text}"
        );
        assert!(text.ends_with("all goals met: yes"), "{text}");

        let slow = report(vec![round(20, 0), round(101, 0)]);
        assert!(!slow.all_goals_met());
        let lossy = report(vec![round(20, 1)]);
        assert!(!lossy.all_goals_met());
        assert!(lossy.to_string().contains("1 of 100 (goal 0: NOT met)"));
        assert!(!report(vec![]).all_goals_met());
    }
}
