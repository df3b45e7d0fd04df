//! Backup lag: how long after COMMIT returns the bucket lists an object that
//! holds the transaction.
//!
//! The writer (the calling thread) commits single-row INSERT transactions
//! (WAL, `synchronous=NORMAL`) on the mount with backups, paced at
//! [`LAG_RATE`] per second (open loop: a late transaction does not delay the
//! ones after it), and notes when each `INSERT` returned. Each one is one
//! TXID: the database's TXID before the first plus the row id, which the
//! benchmark checks against the final `-pos`. A poller thread lists the
//! database's objects (ltxfs's own S3 client, ListObjectsV2) every
//! [`POLL_INTERVAL`] and notes, for each object name, when a listing first
//! returned it; the name gives its TXID range. A transaction's lag is the
//! earliest such instant over the objects that hold its TXID (a merged object
//! from compaction may show it again later) minus its commit instant.
//!
//! Invariants: the measurement starts once the bucket holds the new database;
//! the poller stops once the bucket holds the writer's last TXID, at the
//! latest [`DRAIN_TIMEOUT`] after the writer finished, at once if the writer
//! failed, and in any case when the writer should long have finished;
//! transactions committed during the warm-up are not counted; a transaction
//! never listed is counted as missing, never given a made-up lag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::runtime::Runtime;

use super::{
    BackupBenchError, LAG_RATE, POLL_INTERVAL, SYNC_INTERVAL, require_position, wait_backed_up,
};
use crate::BenchError;
use crate::mount::MountGuard;
use crate::replication::percentile;
use crate::workload::{INSERT, PAYLOAD_BYTES, create_database, sql_error};
use ltxfs::backup::Destination;

/// The database the lag is measured on.
const LAG_DB: &str = "lag.db";
/// How long the bucket may take to receive the new database.
const FIRST_UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after the last commit the poller keeps looking for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The figures of the lag measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupLag {
    /// The paced rate asked for, per second.
    pub rate: u32,
    /// Transactions committed in the measured interval.
    pub transactions: usize,
    /// The rate the writer achieved in the measured interval, per second.
    pub achieved_rate: f64,
    /// The median lag of the transactions the bucket listed.
    pub p50: Duration,
    /// The 99th percentile (nearest rank).
    pub p99: Duration,
    /// The largest.
    pub max: Duration,
    /// Measured transactions no listing showed [`DRAIN_TIMEOUT`] after the
    /// last commit.
    pub missing: usize,
    /// Objects that first appeared while the measured transactions were
    /// written or drained.
    pub objects: usize,
    /// The poller's average time from one listing to the next: the
    /// resolution of the figures.
    pub poll_period: Duration,
    /// The mean time between two listings that each showed new TXIDs, over
    /// the measured interval: the uploader's period.
    pub upload_period: Duration,
    /// The longest such time.
    pub upload_period_max: Duration,
}

/// Creates [`LAG_DB`] on `mount` (which backs up to `destination`), waits
/// until the bucket has it, then writes for `warm_up` and `measured` while the
/// poller lists the bucket.
pub(super) fn measure(
    mount: &MountGuard,
    destination: &Destination,
    runtime: &Runtime,
    warm_up: Duration,
    measured: Duration,
) -> Result<BackupLag, BackupBenchError> {
    let path = mount.mount_point().join(LAG_DB);
    let conn = create_database(&path, "wal")?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|cause| sql_error("set synchronous", &path, cause))?;
    let (first_txid, _) = require_position(mount, LAG_DB)?;
    wait_backed_up(
        runtime,
        destination,
        LAG_DB,
        first_txid,
        FIRST_UPLOAD_TIMEOUT,
    )?;

    let finished = Finished::new();
    let give_up = Instant::now() + warm_up + measured + DRAIN_TIMEOUT * 2;
    let (written, observed) = std::thread::scope(|scope| {
        let finished_ref = &finished;
        let poller = scope.spawn(move || poll(runtime, destination, finished_ref, give_up));
        let written = write(&conn, &path, warm_up, measured);
        match &written {
            Ok(written) => finished.writer_done(first_txid + written.commits.len() as u64),
            Err(_) => finished.writer_failed(),
        }
        let observed = poller
            .join()
            .map_err(|_| BackupBenchError::ThreadPanicked("lag poller"))
            .and_then(|result| result);
        (written, observed)
    });
    let written = written?;
    let observed = observed?;
    drop(conn);

    let last_txid = first_txid + written.commits.len() as u64;
    let (final_txid, _) = require_position(mount, LAG_DB)?;
    if final_txid != last_txid {
        return Err(BenchError::Database {
            path,
            problem: format!(
                "its TXID went from {first_txid} to {final_txid} over {} single-row transactions",
                written.commits.len()
            ),
        }
        .into());
    }
    let measured_commits = &written.commits[written.measured_from..];
    let first_measured = first_txid + written.measured_from as u64 + 1;
    let (mut lags, missing) = lags(first_measured, measured_commits, &observed.seen);
    lags.sort_unstable();
    let measured_start = measured_commits.first().copied();
    let periods =
        measured_start.map_or_else(Vec::new, |start| upload_periods(&observed.seen, start));
    Ok(BackupLag {
        rate: LAG_RATE,
        transactions: measured_commits.len(),
        achieved_rate: measured_commits.len() as f64 / written.measured.as_secs_f64(),
        p50: percentile(&lags, 50),
        p99: percentile(&lags, 99),
        max: lags.last().copied().unwrap_or_default(),
        missing,
        objects: observed
            .seen
            .iter()
            .filter(|object| measured_start.is_some_and(|start| object.seen >= start))
            .count(),
        poll_period: observed.duration / observed.polls.max(1),
        upload_period: periods
            .iter()
            .sum::<Duration>()
            .checked_div(periods.len() as u32)
            .unwrap_or_default(),
        upload_period_max: periods.iter().max().copied().unwrap_or_default(),
    })
}

/// The times between two listings that each showed a higher TXID than any
/// before, from `start` on (`seen` is in the order first seen).
fn upload_periods(seen: &[Seen], start: Instant) -> Vec<Duration> {
    let mut highest = 0;
    let mut advances = Vec::new();
    for object in seen {
        if object.max_txid > highest {
            highest = object.max_txid;
            if advances.last() != Some(&object.seen) {
                advances.push(object.seen);
            }
        }
    }
    advances
        .windows(2)
        .filter(|pair| pair[0] >= start)
        .map(|pair| pair[1] - pair[0])
        .collect()
}

/// What the writer tells the poller: its last TXID once it is done (0 until
/// then), or that it failed.
struct Finished {
    last_txid: AtomicU64,
    failed: AtomicBool,
}

impl Finished {
    fn new() -> Finished {
        Finished {
            last_txid: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    fn writer_done(&self, last_txid: u64) {
        self.last_txid.store(last_txid, Ordering::Release);
    }

    fn writer_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// The commits of one run: when each `INSERT` returned, in row id order
/// (row id `n` is at index `n - 1`).
struct Written {
    commits: Vec<Instant>,
    /// The index of the first commit after the warm-up.
    measured_from: usize,
    /// How long the measured interval lasted.
    measured: Duration,
}

/// Commits one-row transactions at [`LAG_RATE`] per second for `warm_up` and
/// then `measured`.
fn write(
    conn: &Connection,
    path: &std::path::Path,
    warm_up: Duration,
    measured: Duration,
) -> Result<Written, BenchError> {
    let mut insert = conn
        .prepare_cached(INSERT)
        .map_err(|cause| sql_error("prepare the insert", path, cause))?;
    let payload = [0x5a_u8; PAYLOAD_BYTES];
    let interval = Duration::from_secs(1) / LAG_RATE;
    let mut commits =
        Vec::with_capacity((f64::from(LAG_RATE) * (warm_up + measured).as_secs_f64()) as usize + 1);
    let started = Instant::now();
    let measure_start = started + warm_up;
    let end = measure_start + measured;
    let mut measured_from = None;
    let mut due = started;
    loop {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        due += interval;
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
        commits.push(Instant::now());
        let rowid = conn.last_insert_rowid();
        if rowid != commits.len() as i64 {
            return Err(BenchError::Database {
                path: path.to_path_buf(),
                problem: format!("row {} got the id {rowid}", commits.len()),
            });
        }
    }
    Ok(Written {
        measured_from: measured_from.unwrap_or(commits.len()),
        commits,
        measured,
    })
}

/// An object as the poller first saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    min_txid: u64,
    max_txid: u64,
    /// When the first listing that returned it came back.
    seen: Instant,
}

/// The poller's notes.
struct Observed {
    seen: Vec<Seen>,
    polls: u32,
    duration: Duration,
}

/// Lists the database's objects every [`POLL_INTERVAL`] until the bucket holds
/// the writer's last TXID, the writer fails, [`DRAIN_TIMEOUT`] passes after
/// the writer finished, or `give_up` comes.
fn poll(
    runtime: &Runtime,
    destination: &Destination,
    finished: &Finished,
    give_up: Instant,
) -> Result<Observed, BackupBenchError> {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut highest = 0;
    let mut polls = 0_u32;
    let mut drain_deadline = None;
    let started = Instant::now();
    let mut next = started;
    loop {
        let listed = runtime.block_on(destination.list(Some(LAG_DB)))?;
        let now = Instant::now();
        polls = polls.saturating_add(1);
        for object in listed {
            highest = highest.max(object.name.max_txid.0);
            seen.entry(object.name.path()).or_insert(Seen {
                min_txid: object.name.min_txid.0,
                max_txid: object.name.max_txid.0,
                seen: now,
            });
        }
        if finished.failed.load(Ordering::Acquire) || now >= give_up {
            break;
        }
        let last_txid = finished.last_txid.load(Ordering::Acquire);
        if last_txid != 0 {
            if highest >= last_txid {
                break;
            }
            if now >= *drain_deadline.get_or_insert(now + DRAIN_TIMEOUT) {
                break;
            }
        }
        next += POLL_INTERVAL;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            // A slow listing: start the next one at once, and keep the rhythm from here.
            next = now;
        }
    }
    let mut seen: Vec<Seen> = seen.into_values().collect();
    seen.sort_by_key(|object| object.seen);
    Ok(Observed {
        seen,
        polls,
        duration: started.elapsed(),
    })
}

/// Each commit's lag (commit `i` holds TXID `first_txid + i`): from its
/// commit instant to the first listing of an object that holds it. Also
/// returns how many commits no listing showed.
fn lags(first_txid: u64, commits: &[Instant], seen: &[Seen]) -> (Vec<Duration>, usize) {
    let mut lags = Vec::with_capacity(commits.len());
    let mut missing = 0;
    for (index, committed) in commits.iter().enumerate() {
        let txid = first_txid + index as u64;
        match seen
            .iter()
            .filter(|object| object.min_txid <= txid && txid <= object.max_txid)
            .map(|object| object.seen)
            .min()
        {
            Some(first_seen) => lags.push(first_seen.saturating_duration_since(*committed)),
            None => missing += 1,
        }
    }
    (lags, missing)
}

/// The goals of issue 18 for the lag, at a sync interval of [`SYNC_INTERVAL`]:
/// p50 at most the interval plus 100 ms, p99 at most twice the interval.
pub(super) fn goals() -> (Duration, Duration) {
    (
        SYNC_INTERVAL + Duration::from_millis(100),
        SYNC_INTERVAL * 2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_takes_the_first_listing_of_any_object_holding_it() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // TXIDs 10 to 14 committed at 0, 1, 2, 3 and 4 ms.
        let commits: Vec<Instant> = (0..5).map(ms).collect();
        let seen = [
            // The snapshot before them, and a merged object listed late.
            Seen {
                min_txid: 1,
                max_txid: 9,
                seen: ms(0),
            },
            Seen {
                min_txid: 10,
                max_txid: 12,
                seen: ms(900),
            },
            Seen {
                min_txid: 10,
                max_txid: 13,
                seen: ms(1500),
            },
            Seen {
                min_txid: 5,
                max_txid: 11,
                seen: ms(2000),
            },
        ];
        let (lags, missing) = lags(10, &commits, &seen);
        assert_eq!(
            lags,
            vec![
                Duration::from_millis(900),
                Duration::from_millis(899),
                Duration::from_millis(898),
                Duration::from_millis(1497),
            ]
        );
        // TXID 14 was never listed.
        assert_eq!(missing, 1);
        // New TXIDs at 0 (the snapshot), 900 and 1500 ms; the last object
        // showed nothing new.
        assert_eq!(
            upload_periods(&seen, ms(0)),
            vec![Duration::from_millis(900), Duration::from_millis(600)]
        );
        assert_eq!(
            upload_periods(&seen, ms(1)),
            vec![Duration::from_millis(600)]
        );
    }

    #[test]
    fn the_goals_follow_the_sync_interval() {
        assert_eq!(
            goals(),
            (Duration::from_millis(1100), Duration::from_millis(2000))
        );
    }
}
