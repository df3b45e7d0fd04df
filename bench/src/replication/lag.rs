//! Commit-to-visible lag: how long after COMMIT returns on the primary a reader on
//! a replica sees the transaction.
//!
//! The writer (the calling thread) commits single-row INSERT transactions on the
//! primary (WAL, `synchronous=NORMAL`), paced at a fixed rate or as fast as it can,
//! and notes each row's id with the instant its `INSERT` returned. An observer
//! thread reads `SELECT max(id)` on a replica in a loop, each time in a new read
//! transaction, and notes the instant each new maximum was first seen. Ids grow by
//! one per transaction, so after both threads have finished a transaction's lag is
//! the first sighting of an id at least its own minus its commit instant. The two
//! threads share only two atomics while they run, so the measurement adds no
//! coordination to the path it measures.
//!
//! Invariants: the observer stops at the latest [`DRAIN_TIMEOUT`] after the writer
//! finished, at once if the writer failed, and in any case twice that long after
//! the writer's planned end (so it cannot outlive a writer that never reports);
//! transactions committed during the warm-up are not counted; a transaction the
//! replica never showed is counted as invisible, never given a made-up lag.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::ReplicationBenchError;
use super::cluster::{self, Node};
use crate::BenchError;
use crate::workload::{INSERT, PAYLOAD_BYTES, create_database, sql_error};

/// How long the replicas may take to catch up before and after a run.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the last commit the observer keeps looking for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the observer sleeps between two reads. Reading in a tight loop would
/// keep a CPU busy with the reader and the replica's FUSE threads, taking CPU time
/// from the processes being measured on a small machine; a sleep this short adds
/// about half of itself (plus the timer's slack) to every figure (on 2 cores at
/// 1,000 tx/s: a median of 0.30 ms against 0.25 ms in a tight loop).
const OBSERVER_SLEEP: Duration = Duration::from_micros(100);
/// How long a replica reader waits while the replica applies a change set.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What one lag measurement does.
#[derive(Debug, Clone, Copy)]
pub(super) struct LagRun<'a> {
    /// The cluster measured, for the report ("" for the plain one).
    pub(super) cluster: &'a str,
    /// The database created on the primary for this run.
    pub(super) database: &'a str,
    /// Transactions per second, or `None` for as fast as the primary allows.
    pub(super) rate: Option<u32>,
}

/// The figures of one lag measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct LagResult {
    /// The cluster measured ("" for the plain one).
    pub cluster: String,
    /// The paced rate, or `None` for the primary's maximum rate.
    pub rate: Option<u32>,
    /// Transactions committed in the measured interval.
    pub transactions: usize,
    /// The rate the writer achieved in the measured interval, per second.
    pub achieved_rate: f64,
    /// The median lag of the transactions the replica showed.
    pub p50: Duration,
    /// The 99th percentile (nearest rank) of that lag.
    pub p99: Duration,
    /// The largest lag.
    pub max: Duration,
    /// Measured transactions the replica had not shown [`DRAIN_TIMEOUT`] after
    /// the last commit.
    pub invisible: usize,
    /// The observer's average time from one read of the replica to the next: the
    /// resolution of the figures.
    pub poll_period: Duration,
}

/// Creates `run.database` on `primary`, waits until every replica has it, then
/// writes for `warm_up` and `measured` while a reader on `observed` (one of
/// `replicas`) watches; finally waits until the replicas caught up again.
pub(super) fn measure(
    primary: &Node,
    replicas: &[&Node],
    observed: &Node,
    run: LagRun<'_>,
    warm_up: Duration,
    measured: Duration,
) -> Result<LagResult, ReplicationBenchError> {
    let writer = Writer::create(&primary.db_path(run.database))?;
    cluster::wait_converged(primary, replicas, run.database, CONVERGE_TIMEOUT)?;
    let reader = open_reader(&observed.db_path(run.database))?;

    let finished = Finished::new();
    let give_up = Instant::now() + warm_up + measured + DRAIN_TIMEOUT * 2;
    let (written, observed_ids) = std::thread::scope(|scope| {
        let finished_ref = &finished;
        // The reader moves to the observer and is closed when it returns.
        let observer = scope.spawn(move || observe(reader, finished_ref, give_up));
        let written = writer.write(run.rate, warm_up, measured);
        match &written {
            Ok(written) => finished.writer_done(written.last_id()),
            Err(_) => finished.writer_failed(),
        }
        let observed = observer
            .join()
            .map_err(|_| ReplicationBenchError::ThreadPanicked("lag observer"))
            .and_then(|result| result);
        (written, observed)
    });
    let written = written?;
    let observed_ids = observed_ids?;
    cluster::wait_converged(primary, replicas, run.database, CONVERGE_TIMEOUT)?;

    let (mut lags, invisible) = lags(
        &written.commits[written.measured_from..],
        &observed_ids.seen,
    );
    lags.sort_unstable();
    let transactions = written.commits.len() - written.measured_from;
    Ok(LagResult {
        cluster: run.cluster.to_string(),
        rate: run.rate,
        transactions,
        achieved_rate: transactions as f64 / written.measured.as_secs_f64(),
        p50: percentile(&lags, 50),
        p99: percentile(&lags, 99),
        max: lags.last().copied().unwrap_or_default(),
        invisible,
        poll_period: observed_ids.duration / observed_ids.polls.max(1),
    })
}

/// What the writer tells the observer: the last row id once it is done
/// ([`Finished::WRITING`] until then), or that it failed.
struct Finished {
    last_id: AtomicI64,
    failed: AtomicBool,
}

impl Finished {
    /// The value of `last_id` while the writer writes; row ids are never negative.
    const WRITING: i64 = -1;

    fn new() -> Finished {
        Finished {
            last_id: AtomicI64::new(Finished::WRITING),
            failed: AtomicBool::new(false),
        }
    }

    fn writer_done(&self, last_id: i64) {
        self.last_id.store(last_id, Ordering::Release);
    }

    fn writer_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// The primary's connection to the run's database.
struct Writer {
    conn: Connection,
    path: std::path::PathBuf,
}

/// The commits of one run: row id and the instant its `INSERT` returned.
struct Written {
    commits: Vec<(i64, Instant)>,
    /// The index of the first commit after the warm-up.
    measured_from: usize,
    /// How long the measured interval lasted.
    measured: Duration,
}

impl Written {
    fn last_id(&self) -> i64 {
        self.commits.last().map_or(0, |(id, _)| *id)
    }
}

impl Writer {
    fn create(path: &Path) -> Result<Writer, BenchError> {
        let conn = create_database(path, "wal")?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|cause| sql_error("set synchronous", path, cause))?;
        Ok(Writer {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Commits one-row transactions for `warm_up` and then `measured`, at `rate`
    /// per second or as fast as possible.
    fn write(
        &self,
        rate: Option<u32>,
        warm_up: Duration,
        measured: Duration,
    ) -> Result<Written, BenchError> {
        let path = &self.path;
        let mut insert = self
            .conn
            .prepare_cached(INSERT)
            .map_err(|cause| sql_error("prepare the insert", path, cause))?;
        let payload = [0x5a_u8; PAYLOAD_BYTES];
        let interval = rate.map(|rate| Duration::from_secs(1) / rate.max(1));
        let expected = rate.map_or(1 << 16, |rate| {
            (rate as f64 * (warm_up + measured).as_secs_f64()) as usize + 1
        });
        let mut commits = Vec::with_capacity(expected);
        let started = Instant::now();
        let measure_start = started + warm_up;
        let end = measure_start + measured;
        let mut measured_from = None;
        let mut due = started;
        loop {
            if let Some(interval) = interval {
                // Open loop: a late transaction does not delay the ones after it.
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                due += interval;
            }
            let before = Instant::now();
            if before >= end {
                break;
            }
            if measured_from.is_none() && before >= measure_start {
                measured_from = Some(commits.len());
            }
            insert
                .execute([&payload[..]])
                .map_err(|cause| sql_error("insert a row", path, cause))?;
            commits.push((self.conn.last_insert_rowid(), Instant::now()));
        }
        Ok(Written {
            measured_from: measured_from.unwrap_or(commits.len()),
            commits,
            measured,
        })
    }
}

fn open_reader(path: &Path) -> Result<Connection, BenchError> {
    // A replica refuses to open its databases for writing; SQLite then opens them
    // read-only by itself, while the `-wal` and `-shm` files stay writable.
    let conn = Connection::open(path)
        .map_err(|cause| sql_error("open the replica's copy", path, cause))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|cause| sql_error("set the busy timeout", path, cause))?;
    Ok(conn)
}

/// The observer's notes: each new largest id with the instant it was first read.
struct Observed {
    seen: Vec<(i64, Instant)>,
    polls: u32,
    duration: Duration,
}

/// Reads the largest id on the replica until it reaches the writer's last, the
/// writer fails, [`DRAIN_TIMEOUT`] passes after the writer finished, or `give_up`
/// comes.
fn observe(
    conn: Connection,
    finished: &Finished,
    give_up: Instant,
) -> Result<Observed, ReplicationBenchError> {
    let path = conn
        .path()
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let mut select = conn
        .prepare("SELECT coalesce(max(id), 0) FROM t")
        .map_err(|cause| sql_error("prepare the select", &path, cause))?;
    let mut seen = Vec::with_capacity(1 << 16);
    let mut largest = 0_i64;
    let mut polls = 0_u32;
    let mut drain_deadline = None;
    let started = Instant::now();
    loop {
        let id: i64 = select
            .query_row([], |row| row.get(0))
            .map_err(|cause| sql_error("read the replica's copy", &path, cause))?;
        let now = Instant::now();
        polls = polls.saturating_add(1);
        if id > largest {
            largest = id;
            seen.push((id, now));
        }
        if finished.failed.load(Ordering::Acquire) || now >= give_up {
            break;
        }
        let last_id = finished.last_id.load(Ordering::Acquire);
        if last_id != Finished::WRITING {
            if largest >= last_id {
                break;
            }
            let deadline = *drain_deadline.get_or_insert(now + DRAIN_TIMEOUT);
            if now >= deadline {
                break;
            }
        }
        std::thread::sleep(OBSERVER_SLEEP);
    }
    Ok(Observed {
        seen,
        polls,
        duration: started.elapsed(),
    })
}

/// Each commit's lag: from its commit instant to the first sighting of an id at
/// least as large (0 if that came first, when the replica was faster than the
/// writer thread's return from `INSERT`). Both lists are in increasing id order.
/// Also returns how many commits were never seen.
fn lags(commits: &[(i64, Instant)], seen: &[(i64, Instant)]) -> (Vec<Duration>, usize) {
    let mut lags = Vec::with_capacity(commits.len());
    let mut sightings = seen.iter().peekable();
    let mut invisible = 0;
    for &(id, committed) in commits {
        while sightings.next_if(|(seen_id, _)| *seen_id < id).is_some() {}
        match sightings.peek() {
            Some((_, first_seen)) => lags.push(first_seen.saturating_duration_since(committed)),
            None => invisible += 1,
        }
    }
    (lags, invisible)
}

/// The `p`th percentile of sorted figures by the nearest-rank method, or zero
/// when there are none.
pub(crate) fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_takes_the_first_sighting_of_its_id_or_a_later_one() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let commits = [(1, ms(0)), (2, ms(1)), (3, ms(2)), (4, ms(7)), (5, ms(8))];
        // Ids 1 and 2 appear together, 3 is never read on its own, 4 was seen
        // before its writer returned, 5 never appears.
        let seen = [(2, ms(5)), (4, ms(6))];
        let (lags, invisible) = lags(&commits, &seen);
        assert_eq!(
            lags,
            vec![
                Duration::from_millis(5),
                Duration::from_millis(4),
                Duration::from_millis(4),
                Duration::ZERO
            ]
        );
        assert_eq!(invisible, 1);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let figures: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&figures, 50), Duration::from_millis(100));
        assert_eq!(percentile(&figures, 99), Duration::from_millis(198));
        assert_eq!(percentile(&figures[..1], 99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }
}
