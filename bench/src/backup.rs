//! `ltxfs bench backup`: continuous backups to object storage, measured against
//! a local S3 server.
//!
//! One run creates a working directory (as `ltxfs bench` does: by default
//! `./ltxfs-bench-<pid>`), starts a private moto S3 server in it on loopback
//! (see `s3`), creates a bucket, and starts two `ltxfs mount` processes with
//! the same config except that `backup` has `backup:` (`sync-interval: 1s`,
//! every other backup setting at its default) and `no-backup` has none. It then
//! measures, in this order:
//!
//! 1. backup lag on `backup`: a writer commits single-row transactions paced at
//!    [`LAG_RATE`] per second while a poller lists the bucket every
//!    [`POLL_INTERVAL`]; a transaction's lag is from its commit until the first
//!    listing that shows an object holding its TXID (see `lag`);
//! 2. what backups cost commit throughput: the `ltxfs bench` single-row insert
//!    workload on `no-backup` and on `backup`, in [`THROUGHPUT_ROUNDS`] rounds
//!    taking turns, each after a [`LEAD_IN`]; after each round on `backup` the
//!    benchmark waits until the bucket has every TXID, so no upload spills into
//!    the other mount's round (see `throughput`);
//! 3. restore: a database of `--restore-db-mb` MiB snapshotted to the bucket,
//!    with a history of small transactions after it; `ltxfs restore` of its
//!    newest state against downloading the same objects with plain GETs, and the
//!    restore process's peak memory (see `restore`).
//!
//! The goals are in `report`.
//!
//! Invariants: moto and every mount are owned by [`run`] (or, for the restore's
//! source mount, by `restore::measure`), declared so that the mounts stop
//! before moto and moto before the working directory is removed, on every
//! return path; all of them also exit by themselves if the benchmark dies (the
//! parent-death signal); every wait has a timeout; a measurement starts only
//! once the bucket holds every TXID written before it.

mod lag;
mod report;
mod restore;
mod s3;
mod throughput;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

pub use report::BackupReport;

use super::mount::MountGuard;
use super::{BenchError, BenchOptions, MachineInfo, Plan, Workspace};
use ltxfs::backup::{BackupError, Destination};
use ltxfs::config::{BackupDestination, Secret};
use ltxfs::store::Position;
use test_support::{Moto, MotoError};

/// `backup.sync-interval` of every mount with backups.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// The rate of the lag measurement's writer, transactions per second.
pub const LAG_RATE: u32 = 1000;
/// How often the lag measurement lists the bucket.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Rounds per mount in the throughput comparison: more than `ltxfs bench`'s,
/// because the effect is small and the machine noisy.
pub const THROUGHPUT_ROUNDS: usize = 5;
/// What each mount writes, uncounted, before each measured round, so that
/// the uploads are under way throughout the round (as in a steady state)
/// rather than starting with it.
pub const LEAD_IN: Duration = Duration::from_millis(1500);

/// The bucket every destination is in.
const BUCKET: &str = "ltxfs-bench";
/// The prefix of the `backup` mount's destination.
const PREFIX: &str = "backup";
/// moto checks no credentials, but the S3 client wants some.
const CREDENTIAL: &str = "testing";
/// The region the S3 client names (moto accepts any).
const REGION: &str = "us-east-1";
/// The mounts of the lag and throughput measurements.
const PLAIN_MOUNT: &str = "no-backup";
const BACKUP_MOUNT: &str = "backup";
/// How often the bucket is listed while waiting for an upload.
const UPLOAD_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What `ltxfs bench backup` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupOptions {
    /// Where to create moto's and the mounts' files. When `None`, a fresh
    /// directory `./ltxfs-bench-<pid>` is created and removed at the end.
    pub dir: Option<PathBuf>,
    /// The measured time of the lag; the throughput comparison runs each
    /// mount for half of it.
    pub seconds: u64,
    /// The size of the restored database, in MiB; 0 skips the restore.
    pub restore_db_mb: u64,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            dir: None,
            seconds: 20,
            restore_db_mb: 1024,
        }
    }
}

/// Everything that can stop the backup benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BackupBenchError {
    /// Something the benchmarks share failed: options, files, SQLite, a mount.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// moto could not be started, or refused the bucket.
    #[error(transparent)]
    Moto(#[from] MotoError),
    /// A request the benchmark made to moto itself failed.
    #[error("S3 request {request} failed: {problem}")]
    S3 {
        /// The method and path.
        request: String,
        /// What went wrong.
        problem: String,
    },
    /// Listing the bucket through ltxfs's client failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The runtime that lists the bucket could not start.
    #[error("could not start a runtime: {0}")]
    Runtime(std::io::Error),
    /// The bucket did not receive a TXID in time.
    #[error("the backup of {database} did not reach TXID {want} within {} s (it holds up to {have}); see the mount's log", timeout.as_secs())]
    NotBackedUp {
        /// The database.
        database: String,
        /// The TXID waited for.
        want: u64,
        /// The highest TXID the bucket held.
        have: u64,
        /// How long the benchmark waited.
        timeout: Duration,
    },
    /// `ltxfs restore` failed or restored something else than expected.
    #[error("ltxfs restore of {database} {problem}; it said: {output}")]
    Restore {
        /// The database.
        database: String,
        /// What went wrong.
        problem: String,
        /// What it printed.
        output: String,
    },
    /// A measuring thread panicked.
    #[error("the {0} thread panicked")]
    ThreadPanicked(&'static str),
}

/// Runs the whole backup benchmark. moto and every mount are stopped before
/// this returns, also on errors.
pub fn run(options: &BackupOptions) -> Result<BackupReport, BackupBenchError> {
    // Checks --seconds, and gives the rounds of the throughput comparison.
    let lag_plan = Plan::new(&BenchOptions {
        seconds: options.seconds,
        ..BenchOptions::default()
    })?;
    let plan = Plan {
        rounds: THROUGHPUT_ROUNDS,
        round: Duration::from_secs(options.seconds) / (2 * THROUGHPUT_ROUNDS as u32),
        ..lag_plan
    };
    let mut workspace = Workspace::create(options.dir.as_deref())?;
    let machine = MachineInfo::collect(workspace.path());
    let base = workspace.path().to_path_buf();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(BackupBenchError::Runtime)?;

    // Declared after the workspace and before the mounts, so dropped after
    // the mounts and before the workspace is removed.
    let moto = Moto::start_in(&base)?;
    moto.create_bucket(BUCKET)?;
    let mut plain = MountGuard::start(&base, PLAIN_MOUNT, true)?;
    let mut backed = MountGuard::start_configured(
        &base,
        BACKUP_MOUNT,
        true,
        &backup_section(&moto.endpoint(), PREFIX),
    )?;
    let destination = open_destination(&moto.endpoint(), PREFIX)?;

    let measured = Duration::from_secs(options.seconds);
    // At least two sync intervals, so the uploader is in its rhythm.
    let warm_up = lag_plan.warm_up.max(SYNC_INTERVAL * 2);
    let lag = lag::measure(&backed, &destination, &runtime, warm_up, measured)?;
    let throughput = throughput::compare(&plain, &backed, &moto, &destination, &runtime, &plan)?;

    let mut warnings = Vec::new();
    for mount in [&mut plain, &mut backed] {
        if let Err(error) = mount.stop() {
            warnings.push(error.to_string());
        }
    }
    let restore = match options.restore_db_mb {
        0 => None,
        size_mb => Some(restore::measure(
            &base,
            &moto,
            &runtime,
            size_mb,
            &mut warnings,
        )?),
    };
    drop(moto);
    if let Err(error) = workspace.cleanup() {
        warnings.push(error.to_string());
    }
    Ok(BackupReport {
        machine,
        sync_interval: SYNC_INTERVAL,
        warm_up,
        lag,
        rounds: plan.rounds,
        round_duration: plan.round,
        throughput_warm_up: plan.warm_up,
        throughput,
        restore,
        warnings,
    })
}

/// The `backup:` section of a mount whose destination is `s3://BUCKET/prefix`
/// on the moto at `endpoint`.
fn backup_section(endpoint: &str, prefix: &str) -> String {
    format!(
        "backup:\n  destinations:\n    - url: \"s3://{BUCKET}/{prefix}\"\n      endpoint: \"{endpoint}\"\n      \
         region: \"{REGION}\"\n      access-key-id: \"{CREDENTIAL}\"\n      secret-access-key: \"{CREDENTIAL}\"\n  \
         sync-interval: {}ms\n",
        SYNC_INTERVAL.as_millis()
    )
}

/// ltxfs's own client for the destination `s3://BUCKET/prefix`, to list it.
fn open_destination(endpoint: &str, prefix: &str) -> Result<Destination, BackupBenchError> {
    Ok(Destination::open(&BackupDestination {
        url: format!("s3://{BUCKET}/{prefix}"),
        endpoint: Some(endpoint.to_string()),
        region: Some(REGION.to_string()),
        access_key_id: Some(Secret::new(CREDENTIAL)),
        secret_access_key: Some(Secret::new(CREDENTIAL)),
        ..BackupDestination::default()
    })?)
}

/// A database's position on a mount: its TXID and checksum (16 hex digits),
/// from its `-pos` file, or `None` while there is none.
fn position(mount_point: &Path, database: &str) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(mount_point.join(format!("{database}-pos"))).ok()?;
    parse_position(&text)
}

fn parse_position(text: &str) -> Option<(u64, String)> {
    Position::from_pos_file(text).map(|position| (position.txid.0, position.checksum.to_string()))
}

/// The position of `database` on `mount`, or an error naming it.
fn require_position(mount: &MountGuard, database: &str) -> Result<(u64, String), BenchError> {
    let path = mount.mount_point().join(format!("{database}-pos"));
    position(mount.mount_point(), database).ok_or_else(|| BenchError::Database {
        path,
        problem: "it has no position".to_string(),
    })
}

/// The highest TXID of `database` any object at `destination` holds.
fn backed_up_txid(
    runtime: &Runtime,
    destination: &Destination,
    database: &str,
) -> Result<u64, BackupBenchError> {
    Ok(runtime
        .block_on(destination.list(Some(database)))?
        .iter()
        .map(|listed| listed.name.max_txid.0)
        .max()
        .unwrap_or(0))
}

/// Waits until `destination` holds TXID `txid` of `database`; returns how long
/// that took.
fn wait_backed_up(
    runtime: &Runtime,
    destination: &Destination,
    database: &str,
    txid: u64,
    timeout: Duration,
) -> Result<Duration, BackupBenchError> {
    let started = Instant::now();
    loop {
        let have = backed_up_txid(runtime, destination, database)?;
        if have >= txid {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return Err(BackupBenchError::NotBackedUp {
                database: database.to_string(),
                want: txid,
                have,
                timeout,
            });
        }
        std::thread::sleep(UPLOAD_POLL_INTERVAL);
    }
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`), in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_bytes(&status, field)
}

fn parse_status_bytes(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .filter_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .filter_map(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_status_fields_parse() {
        assert_eq!(
            parse_position("000000000000000e/991e08fba36d0f43\n"),
            Some((14, "991e08fba36d0f43".to_string()))
        );
        assert_eq!(parse_position("e/short"), None);
        assert_eq!(parse_position(""), None);
        let status = "Name:\tltxfs\nVmHWM:\t   30720 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(parse_status_bytes(status, "VmHWM"), Some(30 << 20));
        assert_eq!(parse_status_bytes(status, "VmRSS"), Some(20 << 20));
        assert_eq!(parse_status_bytes(status, "VmPeak"), None);
    }

    #[test]
    fn the_backup_section_names_the_destination_and_interval() {
        let section = backup_section("http://127.0.0.1:4566", "backup");
        assert!(
            section.contains("url: \"s3://ltxfs-bench/backup\""),
            "{section}"
        );
        assert!(
            section.contains("endpoint: \"http://127.0.0.1:4566\""),
            "{section}"
        );
        assert!(section.contains("sync-interval: 1000ms"), "{section}");
    }
}
