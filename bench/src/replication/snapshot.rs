//! Snapshot bootstrap: how fast a new replica gets a large database it has never
//! seen.
//!
//! A database of the requested size is written on a primary (rows of random,
//! incompressible bytes, 100 rows per transaction, then a truncating checkpoint so
//! that all of it is in the database file). Then a fresh replica is started, and
//! the time from starting its process until its `-pos` equals the primary's is the
//! bootstrap time: process start, mount, connecting, the primary spooling the
//! snapshot, the transfer, and the replica logging and applying it.
//!
//! Invariants: the replica is stopped before this returns, also on errors (its
//! [`Node`] is dropped); every wait has a timeout.

use std::path::Path;
use std::time::{Duration, Instant};

use super::ReplicationBenchError;
use super::cluster::{self, Node};
use crate::BenchError;
use crate::workload::{create_database, sql_error};

/// The database the snapshot carries.
pub(super) const SNAPSHOT_DB: &str = "snapshot.db";
/// The bytes of one row.
const ROW_BYTES: u64 = 100_000;
/// Rows per transaction while filling the database.
const ROWS_PER_TRANSACTION: u64 = 100;
/// The least time the new replica is given to catch up.
const MIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest bootstrap waited for, in bytes per second, for larger databases.
const SLOWEST_BYTES_PER_SECOND: u64 = 5 * 1024 * 1024;

/// The figures of one snapshot bootstrap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotResult {
    /// The size of the database file on the primary.
    pub db_bytes: u64,
    /// From starting the replica's process until its mount was ready.
    pub mounted: Duration,
    /// From starting the replica's process until its position equalled the
    /// primary's.
    pub caught_up: Duration,
}

impl SnapshotResult {
    /// The database's size divided by the bootstrap time, in MiB per second.
    pub fn mib_per_second(&self) -> f64 {
        self.db_bytes as f64 / (1024.0 * 1024.0) / self.caught_up.as_secs_f64()
    }
}

/// Writes a database of `size_mb` MiB on `primary` (reachable at `primary_url`),
/// then times a new replica named `replica_name` under `base` until it has it.
/// Returns the figures and, if the replica did not stop cleanly, why.
pub(super) fn measure(
    base: &Path,
    primary: &Node,
    primary_url: &str,
    replica_name: &str,
    size_mb: u64,
) -> Result<(SnapshotResult, Option<String>), ReplicationBenchError> {
    let db_bytes = fill(&primary.db_path(SNAPSHOT_DB), size_mb)?;
    let target =
        primary
            .position(SNAPSHOT_DB)
            .ok_or_else(|| ReplicationBenchError::NoPosition {
                node: primary.name().to_string(),
                database: SNAPSHOT_DB.to_string(),
            })?;
    let timeout = MIN_TIMEOUT.max(Duration::from_secs(db_bytes / SLOWEST_BYTES_PER_SECOND));

    let started = Instant::now();
    let replica = Node::start_replica(base, replica_name, primary_url)?;
    let mounted = started.elapsed();
    cluster::wait_for_position(&replica, SNAPSHOT_DB, &target, timeout, started)?;
    let caught_up = started.elapsed();
    let warning = replica.stop().err().map(|error| error.to_string());
    Ok((
        SnapshotResult {
            db_bytes,
            mounted,
            caught_up,
        },
        warning,
    ))
}

/// Creates the database at `path` with at least `size_mb` MiB of random rows,
/// checkpoints it, and returns the database file's size. `ltxfs bench backup`
/// builds its restore database with it too.
pub(crate) fn fill(path: &Path, size_mb: u64) -> Result<u64, BenchError> {
    let conn = create_database(path, "wal")?;
    let transactions = size_mb
        .saturating_mul(1024 * 1024)
        .div_ceil(ROW_BYTES * ROWS_PER_TRANSACTION);
    let statement = format!(
        "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS_PER_TRANSACTION}) \
         INSERT INTO t(v) SELECT randomblob({ROW_BYTES}) FROM n; COMMIT;"
    );
    for _ in 0..transactions {
        conn.execute_batch(&statement)
            .map_err(|cause| sql_error("fill the database", path, cause))?;
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(|cause| sql_error("checkpoint", path, cause))?;
    drop(conn);
    std::fs::metadata(path)
        .map(|metadata| metadata.len())
        .map_err(|cause| BenchError::Io {
            action: "measure",
            path: path.to_path_buf(),
            cause,
        })
}
