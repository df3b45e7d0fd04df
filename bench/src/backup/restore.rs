//! Restore: how long `ltxfs restore` of a large database's newest state takes
//! against downloading the same objects with plain GETs, and how much memory
//! it needs.
//!
//! The source is a mount named `restore-source`. It first runs without
//! backups while the benchmark fills [`RESTORE_DB`] with 100 kB random blobs
//! (incompressible) to the size asked for, and creates [`TINY_DB`] with one
//! row; then it is restarted on the same data dir with backups to
//! `s3://ltxfs-bench/restore`, so its first upload is a snapshot of each
//! whole database. Once the bucket holds them, the benchmark writes a history
//! with the shape of a day's: for [`HISTORY`], [`HISTORY_RATE`] transactions a
//! second each rewrite one random row (about 25 pages spread over the file),
//! under compaction windows of [`HISTORY_COMPACTION_WINDOWS`] instead of the
//! default 10 s, 5 min and 1 h, so that it spans several windows of every
//! level, as a day does under the defaults. A restore of the newest state
//! then reads what it would a day after a snapshot: the snapshot, cumulative
//! objects (the pages changed since the snapshot up to the last boundary of
//! the top level, and so on down) and the change objects of the last window.
//! The benchmark waits until the bucket holds the last transaction, and stops
//! the mount, so that nothing changes the objects while they are read.
//!
//! The objects a restore of the newest state reads come from ltxfs's own plan
//! (`backup::layout::plan`) over a listing. Then, in [`ROUNDS`] rounds whose
//! order alternates: the benchmark GETs those objects one after the other
//! into a file (one HTTP connection each; the fsync after them is timed
//! apart, not counted), and runs `ltxfs restore --config restore-source.yml
//! --name restore.db OUTPUT` as a child process, timed from spawn to exit; its
//! peak resident memory is `ru_maxrss` of `wait4`, and its CPU time
//! `ru_utime + ru_stime`. The restored TXID and checksum must be those of the source's
//! `-pos`. Idle memory is the peak of the same command restoring [`TINY_DB`].
//!
//! The source mount's memory while uploading the snapshots is measured too
//! (the issue asks the same bound of it): its `VmHWM` once the snapshots are
//! stored against its `VmRSS` right after it mounted.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

use super::{
    BUCKET, BackupBenchError, backup_section, open_destination, require_position, status_bytes,
    wait_backed_up,
};
use crate::BenchError;
use crate::mount::{MountGuard, ltxfs_binary};
use crate::replication::fill;
use crate::replication::percentile;
use crate::workload::{INSERT, PAYLOAD_BYTES, Rng, create_database, sql_error};
use ltxfs::backup::layout::{self, Target};
use test_support::{Moto, exit_with_parent};

/// The restored database.
pub const RESTORE_DB: &str = "restore.db";
/// The one-row database whose restore gives idle memory.
const TINY_DB: &str = "tiny.db";
/// The source mount, and its destination's prefix.
const SOURCE_MOUNT: &str = "restore-source";
const PREFIX: &str = "restore";
/// How long the history after the snapshot is written: longer than the top
/// compaction window, so that it holds a boundary of every level.
pub const HISTORY: Duration = Duration::from_secs(45);
/// Transactions a second in the history.
const HISTORY_RATE: u32 = 10;
/// The source's compaction windows: three levels, as by default, short
/// enough for [`HISTORY`] to span several windows of the top one.
pub const HISTORY_COMPACTION_WINDOWS: &str = "[3s, 6s, 12s]";
/// How long uploading the snapshots may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long uploading the history may take.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one restore may take.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(900);
/// How often a running restore is checked on.
const RESTORE_POLL: Duration = Duration::from_millis(1);
/// Rounds of GETs and restores; the report gives the medians.
pub const ROUNDS: usize = 3;
/// The goal of issue 18: a restore takes at most 1.5 times the plain GETs.
pub const RESTORE_RATIO_GOAL: f64 = 1.5;
/// The goal of issue 18: a restore needs at most 64 MiB above idle, as does
/// uploading a snapshot.
pub const MEMORY_GOAL_BYTES: u64 = 64 << 20;

/// The figures of the restore measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreResult {
    /// The restored database's size.
    pub db_bytes: u64,
    /// The objects the restore reads.
    pub objects: usize,
    /// Of which cumulative objects.
    pub cumulative_objects: usize,
    /// Of which change objects (merged or not).
    pub change_objects: usize,
    /// The transactions of the history.
    pub history_transactions: u64,
    /// The bytes of those objects.
    pub object_bytes: u64,
    /// Each round's time to GET the objects.
    pub get: Vec<Duration>,
    /// Each round's time to fsync the downloaded bytes afterwards (not part
    /// of `get`; a restore syncs its output before it renames it).
    pub get_fsync: Vec<Duration>,
    /// Each round's time of `ltxfs restore`.
    pub restore: Vec<Duration>,
    /// Each round's CPU time (user + system) of `ltxfs restore`.
    pub restore_cpu: Vec<Duration>,
    /// The largest peak resident memory of the restores.
    pub restore_peak_rss: u64,
    /// The peak resident memory of restoring a one-row database.
    pub idle_rss: u64,
    /// From the restart with backups until the bucket held both snapshots.
    pub snapshot_upload: Duration,
    /// The source mount's resident memory right after it mounted.
    pub mount_idle_rss: u64,
    /// Its peak resident memory once the snapshots were stored.
    pub mount_peak_rss: u64,
}

impl RestoreResult {
    /// The median time to GET the objects.
    pub fn get_median(&self) -> Duration {
        median(&self.get)
    }

    /// The median time to fsync the downloaded bytes.
    pub fn get_fsync_median(&self) -> Duration {
        median(&self.get_fsync)
    }

    /// The median time of a restore.
    pub fn restore_median(&self) -> Duration {
        median(&self.restore)
    }

    /// The median CPU time of a restore.
    pub fn restore_cpu_median(&self) -> Duration {
        median(&self.restore_cpu)
    }

    /// Restore time over GET time, of the medians.
    pub fn ratio(&self) -> f64 {
        self.restore_median().as_secs_f64() / self.get_median().as_secs_f64().max(1e-9)
    }

    /// The median restore against the median GETs plus the median fsync
    /// after them: against downloading the bytes and making them durable,
    /// which a restore must also do.
    pub fn durable_ratio(&self) -> f64 {
        self.restore_median().as_secs_f64()
            / (self.get_median() + self.get_fsync_median())
                .as_secs_f64()
                .max(1e-9)
    }

    /// The restore's peak memory above idle.
    pub fn restore_memory(&self) -> u64 {
        self.restore_peak_rss.saturating_sub(self.idle_rss)
    }

    /// The source mount's peak memory above its memory at start.
    pub fn upload_memory(&self) -> u64 {
        self.mount_peak_rss.saturating_sub(self.mount_idle_rss)
    }
}

fn median(figures: &[Duration]) -> Duration {
    let mut sorted = figures.to_vec();
    sorted.sort_unstable();
    percentile(&sorted, 50)
}

/// Builds the source in `base`, backs it up to `moto`, and measures.
pub(super) fn measure(
    base: &Path,
    moto: &Moto,
    runtime: &Runtime,
    size_mb: u64,
    warnings: &mut Vec<String>,
) -> Result<RestoreResult, BackupBenchError> {
    {
        let mut mount = MountGuard::start(base, SOURCE_MOUNT, true)?;
        fill(&mount.mount_point().join(RESTORE_DB), size_mb)?;
        let tiny = mount.mount_point().join(TINY_DB);
        create_database(&tiny, "wal")?
            .execute(INSERT, [&[1u8; PAYLOAD_BYTES][..]])
            .map_err(|cause| sql_error("insert a row", &tiny, cause))?;
        mount.stop()?;
    }

    let started = Instant::now();
    let mut mount = MountGuard::start_configured(
        base,
        SOURCE_MOUNT,
        true,
        &format!(
            "{}  compaction-windows: {HISTORY_COMPACTION_WINDOWS}\n",
            backup_section(&moto.endpoint(), PREFIX)
        ),
    )?;
    let pid = mount.pid();
    let mount_idle_rss = pid.and_then(|pid| status_bytes(pid, "VmRSS")).unwrap_or(0);
    let destination = open_destination(&moto.endpoint(), PREFIX)?;
    for database in [RESTORE_DB, TINY_DB] {
        let (txid, _) = require_position(&mount, database)?;
        wait_backed_up(runtime, &destination, database, txid, SNAPSHOT_TIMEOUT)?;
    }
    let snapshot_upload = started.elapsed();
    let mount_peak_rss = pid.and_then(|pid| status_bytes(pid, "VmHWM")).unwrap_or(0);

    let path = mount.mount_point().join(RESTORE_DB);
    let history_transactions = write_history(&path)?;
    let db_bytes = file_size(&path)?;
    let (txid, checksum) = require_position(&mount, RESTORE_DB)?;
    wait_backed_up(runtime, &destination, RESTORE_DB, txid, HISTORY_TIMEOUT)?;
    if let Err(error) = mount.stop() {
        warnings.push(error.to_string());
    }

    let listed = runtime.block_on(destination.list(Some(RESTORE_DB)))?;
    let names: Vec<_> = listed.iter().map(|object| object.name.clone()).collect();
    let plan = layout::plan(RESTORE_DB, &names, Target::Latest)
        .map_err(|error| BackupBenchError::Backup(ltxfs::backup::BackupError::Plan(error)))?;
    let objects: Vec<(String, u64)> = plan
        .objects
        .iter()
        .map(|name| {
            let size = listed
                .iter()
                .find(|object| &object.name == name)
                .map_or(0, |object| object.size);
            (format!("{PREFIX}/{}", name.path()), size)
        })
        .collect();

    let config = base.join(format!("{SOURCE_MOUNT}.yml"));
    let output = base.join("restored.db");
    let idle_rss = restore(base, &config, TINY_DB, &output)?.peak_rss;
    remove(&output)?;
    let download = base.join("downloaded.ltx");
    let mut get = Vec::with_capacity(ROUNDS);
    let mut get_fsync = Vec::with_capacity(ROUNDS);
    let mut restores = Vec::with_capacity(ROUNDS);
    let mut restore_cpu = Vec::with_capacity(ROUNDS);
    let mut restore_peak_rss = 0;
    for round in 0..ROUNDS {
        // Alternate the order, so that neither always runs on a warmer cache.
        for step in [round % 2, 1 - round % 2] {
            if step == 0 {
                let (got, synced) = get_all(moto, &objects, &download)?;
                get.push(got);
                get_fsync.push(synced);
                remove(&download)?;
            } else {
                let run = restore(base, &config, RESTORE_DB, &output)?;
                let expected = [format!("TXID {txid:016x}"), format!("checksum {checksum}")];
                if !expected.iter().all(|part| run.output.contains(part)) {
                    return Err(BackupBenchError::Restore {
                        database: RESTORE_DB.to_string(),
                        problem: format!(
                            "did not restore the source's position {txid:016x}/{checksum}"
                        ),
                        output: run.output,
                    });
                }
                restores.push(run.elapsed);
                restore_cpu.push(run.cpu);
                restore_peak_rss = restore_peak_rss.max(run.peak_rss);
                remove(&output)?;
            }
        }
    }
    let in_folder = |folder: &str| {
        plan.objects
            .iter()
            .filter(|name| {
                name.path()
                    .split('/')
                    .nth(1)
                    .is_some_and(|dir| dir.starts_with(folder))
            })
            .count()
    };
    Ok(RestoreResult {
        db_bytes,
        objects: objects.len(),
        cumulative_objects: in_folder("cumulative"),
        change_objects: in_folder("changes"),
        history_transactions,
        object_bytes: objects.iter().map(|(_, size)| size).sum(),
        get,
        get_fsync,
        restore: restores,
        restore_cpu,
        restore_peak_rss,
        idle_rss,
        snapshot_upload,
        mount_idle_rss,
        mount_peak_rss,
    })
}

/// For [`HISTORY`], commits [`HISTORY_RATE`] transactions a second, each
/// rewriting one random row of the fill with a new random blob; returns how
/// many it committed.
fn write_history(path: &Path) -> Result<u64, BenchError> {
    let sql = |action| move |cause| sql_error(action, path, cause);
    let conn = rusqlite::Connection::open(path).map_err(sql("open the database"))?;
    conn.execute_batch("PRAGMA synchronous=NORMAL;")
        .map_err(sql("set synchronous"))?;
    let rows: i64 = conn
        .query_row("SELECT max(id) FROM t", [], |row| row.get(0))
        .map_err(sql("count the rows"))?;
    let rows = u64::try_from(rows).unwrap_or(0);
    let mut update = conn
        .prepare("UPDATE t SET v = randomblob(length(v)) WHERE id = ?1")
        .map_err(sql("prepare the update"))?;
    let mut rng = Rng::new(18);
    let interval = Duration::from_secs(1) / HISTORY_RATE;
    let started = Instant::now();
    let mut due = started;
    let mut committed = 0;
    while started.elapsed() < HISTORY {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        due += interval;
        update
            .execute([rng.id(rows)])
            .map_err(sql("rewrite a row"))?;
        committed += 1;
    }
    Ok(committed)
}

/// GETs `objects` (key and size) from moto one after the other into `path`;
/// returns how long that took, and how long an fsync of the file took after.
fn get_all(
    moto: &Moto,
    objects: &[(String, u64)],
    path: &Path,
) -> Result<(Duration, Duration), BackupBenchError> {
    let io_error = |action| {
        move |cause| BenchError::Io {
            action,
            path: path.to_path_buf(),
            cause,
        }
    };
    let started = Instant::now();
    let mut file =
        BufWriter::with_capacity(1 << 20, File::create(path).map_err(io_error("create"))?);
    for (key, size) in objects {
        let got = super::s3::get(moto, BUCKET, key, &mut file)?;
        if got != *size {
            return Err(BackupBenchError::S3 {
                request: format!("GET /{BUCKET}/{key}"),
                problem: format!("got {got} bytes of an object listed with {size}"),
            });
        }
    }
    let file = file
        .into_inner()
        .map_err(|error| io_error("write")(error.into_error()))?;
    let got = started.elapsed();
    let syncing = Instant::now();
    file.sync_all().map_err(io_error("fsync"))?;
    Ok((got, syncing.elapsed()))
}

/// One finished `ltxfs restore`.
struct RestoreRun {
    elapsed: Duration,
    cpu: Duration,
    peak_rss: u64,
    output: String,
}

/// Runs `ltxfs restore --config CONFIG --name DATABASE OUTPUT` and waits for
/// it, with its output in `<base>/restore.log`.
fn restore(
    base: &Path,
    config: &Path,
    database: &str,
    output: &Path,
) -> Result<RestoreRun, BackupBenchError> {
    let log = base.join("restore.log");
    let log_error = |cause| BenchError::Io {
        action: "create the log file",
        path: log.clone(),
        cause,
    };
    let stdout = File::create(&log).map_err(log_error)?;
    let stderr = stdout.try_clone().map_err(log_error)?;
    let binary = ltxfs_binary()?;
    let mut command = Command::new(&binary);
    command
        .arg("restore")
        .arg("--config")
        .arg(config)
        .arg("--name")
        .arg(database)
        .arg(output)
        // These would take precedence over the config's endpoint.
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    exit_with_parent(&mut command);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|cause| BenchError::Spawn { binary, cause })?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|_| BackupBenchError::Restore {
        database: database.to_string(),
        problem: format!("got pid {}, which does not fit a pid_t", child.id()),
        output: String::new(),
    })?;
    let (status, usage, elapsed) = loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own child, not reaped yet (only this loop reaps
        // it, and `Child` is never waited on), so it names no other process;
        // the pointers are to live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            break (status, usage, started.elapsed());
        }
        if reaped < 0 {
            return Err(BenchError::Io {
                action: "wait for ltxfs restore, logging to",
                path: log.clone(),
                cause: std::io::Error::last_os_error(),
            }
            .into());
        }
        if started.elapsed() >= RESTORE_TIMEOUT {
            // Not reaped yet, so the pid is still the child's.
            let _ = child.kill();
            // SAFETY: as above; this reaps the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            return Err(BackupBenchError::Restore {
                database: database.to_string(),
                problem: format!(
                    "did not finish within {} s and was killed",
                    RESTORE_TIMEOUT.as_secs()
                ),
                output: read_log(&log),
            });
        }
        std::thread::sleep(RESTORE_POLL);
    };
    let output = read_log(&log);
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(BackupBenchError::Restore {
            database: database.to_string(),
            problem: format!("failed (wait status {status})"),
            output,
        });
    }
    let time = |value: libc::timeval| {
        Duration::from_secs(u64::try_from(value.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(value.tv_usec).unwrap_or(0))
    };
    Ok(RestoreRun {
        elapsed,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        // Linux gives ru_maxrss in KiB.
        peak_rss: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        output,
    })
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|error| format!("(could not read {}: {error})", path.display()))
}

fn file_size(path: &Path) -> Result<u64, BenchError> {
    std::fs::metadata(path)
        .map(|metadata| metadata.len())
        .map_err(|cause| BenchError::Io {
            action: "measure",
            path: path.to_path_buf(),
            cause,
        })
}

fn remove(path: &Path) -> Result<(), BenchError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(cause) if cause.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(cause) => Err(BenchError::Io {
            action: "remove",
            path: PathBuf::from(path),
            cause,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(get_ms: [u64; 3], restore_ms: [u64; 3]) -> RestoreResult {
        RestoreResult {
            db_bytes: 1 << 30,
            objects: 8,
            cumulative_objects: 3,
            change_objects: 4,
            history_transactions: 450,
            object_bytes: 1 << 30,
            get: get_ms.into_iter().map(Duration::from_millis).collect(),
            get_fsync: vec![Duration::from_millis(500)],
            restore: restore_ms.into_iter().map(Duration::from_millis).collect(),
            restore_cpu: vec![Duration::from_millis(1500)],
            restore_peak_rss: 40 << 20,
            idle_rss: 20 << 20,
            snapshot_upload: Duration::from_secs(5),
            mount_idle_rss: 30 << 20,
            mount_peak_rss: 50 << 20,
        }
    }

    #[test]
    fn the_ratio_is_of_the_medians() {
        let result = result([3000, 1000, 2000], [3000, 9000, 2800]);
        assert_eq!(result.get_median(), Duration::from_secs(2));
        assert_eq!(result.restore_median(), Duration::from_secs(3));
        assert!((result.ratio() - 1.5).abs() < 1e-9);
        assert_eq!(result.restore_memory(), 20 << 20);
        assert_eq!(result.upload_memory(), 20 << 20);
    }
}
