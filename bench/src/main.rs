//! The benchmark behind `ltxfs bench`: how much SQLite slows down on an ltxfs mount
//! compared with a plain directory on the same disk.
//!
//! One run creates a working directory (by default `./ltxfs-bench-<pid>`, because
//! `/tmp` is often tmpfs and would not be the disk users keep their data on), starts
//! `ltxfs mount` on `<dir>/mnt` as a child process, and measures every workload on
//! each *target*. A target is only a name and a directory in which databases are
//! created, so a further variant (for example a mount with change capture turned
//! off) is one more entry in the target list. The first target, `native` (a plain
//! directory, `<dir>/native`), is the baseline the others are compared with.
//!
//! The workloads are:
//!
//! * single-row INSERT transactions (one autocommit `INSERT` of a 100-byte blob per
//!   transaction) with WAL + `synchronous=NORMAL`, WAL + `synchronous=FULL` and the
//!   DELETE rollback journal + `synchronous=FULL`;
//! * random point SELECTs by rowid on a database of `--read-db-mb` MiB (WAL mode),
//!   once with each SELECT in its own autocommit read transaction and once with 1000
//!   SELECTs per explicit `BEGIN ... COMMIT` read transaction.
//!
//! Every figure is operations per second: committed transactions for the inserts,
//! SELECT statements for the reads (so both read figures are comparable). To damp the
//! noise of a shared machine, each workload first warms up on every target, then runs
//! in rounds in which the targets take turns (the order alternates between rounds);
//! the report gives, per target, the median over the rounds, and the ratio of each
//! target to the baseline. A ratio of 1.0 means "as fast as a plain directory"
//! (goals: `Workload::goal`).
//!
//! `ltxfs bench replication` (the `replication` module) measures replication
//! instead, with the same working directory, mounts and table rendering;
//! `ltxfs bench handoff` (the `handoff` module) times handing the primary role
//! from one candidate to another with the same working directory and nodes;
//! `ltxfs bench proxy` (the `proxy` module) measures what the write-forwarding
//! proxy adds to a read; `ltxfs bench backup` (the `backup` module) measures
//! backups to a local S3 server: lag, cost to commits, restore.

mod backup;
mod cli;
mod cpu;
mod handoff;
mod machine;
mod mount;
mod proxy;
mod replication;
mod report;
mod round_trip;
mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cpu::CpuUse;
use machine::MachineInfo;
use report::{BenchReport, RestartResult, TargetResult, WorkloadResult};
use workload::{LockServer, Workload};

use mount::MountGuard;

fn main() {
    std::process::exit(cli::run(std::env::args_os()));
}

/// How many rounds each workload runs per target; the report gives their median.
pub const ROUNDS: usize = 3;

/// What `ltxfs bench` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Where to create the databases and the mount. When `None`, a fresh directory
    /// `./ltxfs-bench-<pid>` is created and removed at the end.
    pub dir: Option<PathBuf>,
    /// The measured time per workload and target, split evenly over the rounds.
    pub seconds: u64,
    /// The size of the database used by the read workloads, in MiB.
    pub read_db_mb: u64,
    /// The size of the database whose clean restart is timed, in MiB; 0 skips it.
    pub restart_db_mb: u64,
    /// Mount with `fuse.locks: ltxfs`, so ltxfs serves SQLite's locks
    /// (otherwise the default: the kernel does).
    pub ltxfs_locks: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            dir: None,
            seconds: 5,
            read_db_mb: 100,
            restart_db_mb: 0,
            ltxfs_locks: false,
        }
    }
}

/// A place where the workloads create their databases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The name shown in the report, e.g. `native` or `mount`.
    pub name: String,
    /// The directory in which databases are created.
    pub dir: PathBuf,
}

/// Everything that can stop the benchmark. Each message says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An option has a value the benchmark cannot work with.
    #[error("invalid benchmark option: {0}")]
    InvalidOption(String),
    /// A file or directory operation failed.
    #[error("could not {action} {}: {cause}", path.display())]
    Io {
        /// What was being done, e.g. "create the directory".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The error reported by the operating system.
        cause: std::io::Error,
    },
    /// SQLite returned an error.
    #[error("SQLite failed to {action} in {}: {cause}", path.display())]
    Sqlite {
        /// What was being done, e.g. "create the table".
        action: &'static str,
        /// The database file concerned.
        path: PathBuf,
        /// The error reported by SQLite.
        cause: rusqlite::Error,
    },
    /// A database did not behave as the benchmark set it up to.
    #[error("the database {} is not as expected: {problem}", path.display())]
    Database {
        /// The database file concerned.
        path: PathBuf,
        /// What was found instead.
        problem: String,
    },
    /// The ltxfs child process could not be started.
    #[error("could not start {}: {cause}", binary.display())]
    Spawn {
        /// The executable that was run.
        binary: PathBuf,
        /// The error reported by the operating system.
        cause: std::io::Error,
    },
    /// The ltxfs child process exited before its mount appeared.
    #[error("ltxfs exited ({status}) before the mount at {} became ready; ltxfs said: {output}", mount_point.display())]
    MountExited {
        /// The mount point that was requested.
        mount_point: PathBuf,
        /// How the child exited.
        status: String,
        /// The end of what the child wrote to stdout and stderr.
        output: String,
    },
    /// The mount did not appear in time.
    #[error("the ltxfs mount at {} did not become ready within {} s; ltxfs said: {output}", mount_point.display(), timeout.as_secs())]
    MountTimeout {
        /// The mount point that was requested.
        mount_point: PathBuf,
        /// How long the benchmark waited.
        timeout: Duration,
        /// The end of what the child wrote to stdout and stderr.
        output: String,
    },
    /// The mount could not be stopped cleanly. The measurements are still valid, so
    /// `run` reports this as a warning rather than failing.
    #[error("the ltxfs mount at {} did not shut down cleanly: {problem}; ltxfs said: {output}", mount_point.display())]
    Shutdown {
        /// The mount point.
        mount_point: PathBuf,
        /// What went wrong.
        problem: String,
        /// The end of what the child wrote to stdout and stderr.
        output: String,
    },
    /// There is no ltxfs executable to mount with.
    #[error(
        "no ltxfs beside {}: build it there (`cargo build --release`) or name one in LTXFS_BIN",
        beside.display()
    )]
    NoLtxfs {
        /// This program.
        beside: PathBuf,
    },
    /// The kernel's mount table could not be read.
    #[error("could not read /proc/self/mountinfo: {0}")]
    MountTable(std::io::Error),
}

/// The mount points under the workspace: without and with change capture.
const MOUNT_NAMES: [&str; 2] = ["mnt-no-capture", "mnt"];

/// Runs the whole benchmark: a native directory against an ltxfs mount without
/// change capture and one with it.
///
/// The mount is always stopped before this returns, also on errors.
pub fn run(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let plan = Plan::new(options)?;
    let mut workspace = Workspace::create(options.dir.as_deref())?;
    let machine = MachineInfo::collect(workspace.path());

    let native = Target {
        name: "native".to_string(),
        dir: workspace.path().join("native"),
    };
    create_dir(&native.dir)?;
    let [plain_name, capturing_name] = MOUNT_NAMES;
    let (locks_config, locks_name) = match options.ltxfs_locks {
        true => ("fuse:\n  locks: ltxfs\n", ", ltxfs locks"),
        false => ("", ""),
    };
    let mut plain =
        MountGuard::start_configured(workspace.path(), plain_name, false, locks_config)?;
    let mut capturing =
        MountGuard::start_configured(workspace.path(), capturing_name, true, locks_config)?;
    let targets = vec![
        native,
        Target {
            name: format!("mount, no capture{locks_name}"),
            dir: plain.mount_point().to_path_buf(),
        },
        Target {
            name: format!("mount{locks_name}"),
            dir: capturing.mount_point().to_path_buf(),
        },
    ];

    let measured = measure(&targets, &plan)?;
    let locks = match options.ltxfs_locks {
        true => LockServer::Ltxfs,
        false => LockServer::Kernel,
    };
    let round_trip = round_trip::measure(
        workspace.path(),
        &targets[0].dir,
        capturing.mount_point(),
        locks,
    )?;

    let mut warnings = Vec::new();
    if let Err(error) = plain.stop() {
        warnings.push(error.to_string());
    }
    let restart = match options.restart_db_mb {
        0 => {
            if let Err(error) = capturing.stop() {
                warnings.push(error.to_string());
            }
            None
        }
        size_mb => Some(time_restart(
            workspace.path(),
            capturing,
            capturing_name,
            size_mb,
        )?),
    };
    if let Err(error) = workspace.cleanup() {
        warnings.push(error.to_string());
    }
    Ok(BenchReport {
        machine,
        targets: targets.into_iter().map(|target| target.name).collect(),
        rounds: plan.rounds,
        round_duration: plan.round,
        warm_up: plan.warm_up,
        read_db_bytes: measured.read_db.bytes,
        read_db_rows: measured.read_db.rows,
        results: measured.results,
        round_trip,
        restart,
        warnings,
    })
}

/// Fills a database of `size_mb` MiB through the capturing mount, stops ltxfs
/// cleanly, and times a new start until the database's position can be read.
fn time_restart(
    base: &Path,
    mut mount: MountGuard,
    name: &str,
    size_mb: u64,
) -> Result<RestartResult, BenchError> {
    const ROW_BYTES: u64 = 100_000;
    const ROWS_PER_TRANSACTION: u64 = 100;
    let path = mount.mount_point().join("restart.db");
    let sql = |action: &'static str| {
        let path = path.clone();
        move |cause| BenchError::Sqlite {
            action,
            path,
            cause,
        }
    };
    {
        let conn = rusqlite::Connection::open(&path).map_err(sql("open the database"))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);",
        )
        .map_err(sql("create the table"))?;
        let transactions = (size_mb * 1024 * 1024).div_ceil(ROW_BYTES * ROWS_PER_TRANSACTION);
        for _ in 0..transactions {
            conn.execute_batch(&format!(
                "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS_PER_TRANSACTION}) \
                 INSERT INTO t(v) SELECT randomblob({ROW_BYTES}) FROM n; COMMIT;"
            ))
            .map_err(sql("fill the database"))?;
        }
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(sql("checkpoint"))?;
    }
    let db_bytes = std::fs::metadata(&path)
        .map_err(|cause| BenchError::Io {
            action: "measure",
            path: path.clone(),
            cause,
        })?
        .len();
    mount.stop()?;
    let started = Instant::now();
    let mut mount = MountGuard::start(base, name, true)?;
    let position = mount.mount_point().join("restart.db-pos");
    while std::fs::read(&position).map_or(true, |text| text.len() != 34) {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Database {
                path: position,
                problem: "the position did not appear within 60 s of the restart".to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let ready = started.elapsed();
    mount.stop()?;
    Ok(RestartResult { db_bytes, ready })
}

/// How long and how often each workload runs.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: usize,
    round: Duration,
    warm_up: Duration,
    read_db_bytes: u64,
}

impl Plan {
    fn new(options: &BenchOptions) -> Result<Plan, BenchError> {
        if options.seconds == 0 {
            return Err(BenchError::InvalidOption(
                "--seconds must be at least 1".to_string(),
            ));
        }
        if options.read_db_mb == 0 {
            return Err(BenchError::InvalidOption(
                "--read-db-mb must be at least 1".to_string(),
            ));
        }
        let total = Duration::from_secs(options.seconds);
        Ok(Plan {
            rounds: ROUNDS,
            round: total / ROUNDS as u32,
            // A tenth of the measured time, but never less than 0.1 s nor more than 1 s.
            warm_up: (total / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)),
            read_db_bytes: options.read_db_mb.saturating_mul(1024 * 1024),
        })
    }
}

/// The results of all workloads on all targets.
struct Measured {
    results: Vec<WorkloadResult>,
    read_db: workload::ReadDatabase,
}

/// Runs every workload on every target. The read database is built in the first
/// target's directory and copied to the others.
fn measure(targets: &[Target], plan: &Plan) -> Result<Measured, BenchError> {
    let read_db = workload::ReadDatabase::build(targets, plan.read_db_bytes)?;
    let mut results = Vec::with_capacity(Workload::ALL.len());
    for workload in Workload::ALL {
        results.push(measure_workload(workload, targets, plan, &read_db)?);
    }
    Ok(Measured { results, read_db })
}

/// Warms every target up, then runs the rounds with the targets taking turns.
fn measure_workload(
    workload: Workload,
    targets: &[Target],
    plan: &Plan,
    read_db: &workload::ReadDatabase,
) -> Result<WorkloadResult, BenchError> {
    let mut sessions = targets
        .iter()
        .map(|target| workload::Session::open(workload, target, read_db))
        .collect::<Result<Vec<_>, _>>()?;
    for session in &mut sessions {
        session.run_for(plan.warm_up)?;
    }
    let mut rounds = vec![Vec::with_capacity(plan.rounds); targets.len()];
    for round in 0..plan.rounds {
        // Alternate the order so that no target always runs right after another.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..targets.len()).collect()
        } else {
            (0..targets.len()).rev().collect()
        };
        for index in order {
            rounds[index].push(sessions[index].run_for(plan.round)?);
        }
    }
    Ok(WorkloadResult::new(
        workload,
        targets
            .iter()
            .zip(rounds)
            .map(|(target, rounds)| TargetResult::new(&target.name, rounds))
            .collect(),
    ))
}

/// The benchmark's working directory, removed at the end if the benchmark created it.
struct Workspace {
    path: PathBuf,
    remove: bool,
}

impl Workspace {
    fn create(dir: Option<&Path>) -> Result<Workspace, BenchError> {
        let (path, remove) = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|cause| BenchError::Io {
                    action: "create the directory",
                    path: dir.to_path_buf(),
                    cause,
                })?;
                (dir.to_path_buf(), false)
            }
            None => {
                let path = PathBuf::from(format!("ltxfs-bench-{}", std::process::id()));
                // `create_dir` rather than `create_dir_all`: never reuse someone's directory.
                std::fs::create_dir(&path).map_err(|cause| BenchError::Io {
                    action: "create the directory",
                    path: path.clone(),
                    cause,
                })?;
                (path, true)
            }
        };
        // The mount table lists absolute paths, so work with the canonical one.
        let canonical = std::fs::canonicalize(&path).map_err(|cause| BenchError::Io {
            action: "resolve the path of",
            path: path.clone(),
            cause,
        })?;
        Ok(Workspace {
            path: canonical,
            remove,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory if the benchmark created it, but never while something
    /// is still mounted inside it (mount points are its direct entries).
    fn cleanup(&mut self) -> Result<(), BenchError> {
        if !self.remove {
            return Ok(());
        }
        self.remove = false;
        let entries = std::fs::read_dir(&self.path).map_err(|cause| BenchError::Io {
            action: "list the benchmark directory",
            path: self.path.clone(),
            cause,
        })?;
        for entry in entries {
            let mount_point = entry
                .map_err(|cause| BenchError::Io {
                    action: "list the benchmark directory",
                    path: self.path.clone(),
                    cause,
                })?
                .path();
            if ltxfs_mounted(&mount_point)? {
                return Err(BenchError::Io {
                    action: "remove the benchmark directory",
                    path: self.path.clone(),
                    cause: std::io::Error::other(format!(
                        "{} is still mounted",
                        mount_point.display()
                    )),
                });
            }
        }
        std::fs::remove_dir_all(&self.path).map_err(|cause| BenchError::Io {
            action: "remove the benchmark directory",
            path: self.path.clone(),
            cause,
        })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // On the success path `cleanup` has already run and reported any problem.
        let _ = self.cleanup();
    }
}

/// Writes the line a benchmark report ends with, whether every goal was met,
/// then one line per warning. There is no newline after the last line, so that
/// `println!` adds exactly one.
fn write_verdict(
    f: &mut std::fmt::Formatter<'_>,
    all_goals_met: bool,
    warnings: &[String],
) -> std::fmt::Result {
    write!(
        f,
        "all goals met: {}",
        if all_goals_met { "yes" } else { "no" }
    )?;
    for warning in warnings {
        write!(f, "\nwarning: {warning}")?;
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), BenchError> {
    std::fs::create_dir_all(path).map_err(|cause| BenchError::Io {
        action: "create the directory",
        path: path.to_path_buf(),
        cause,
    })
}

fn ltxfs_mounted(path: &Path) -> Result<bool, BenchError> {
    ltxfs::mountinfo::is_ltxfs_mount(path).map_err(BenchError::MountTable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_splits_the_time_over_the_rounds() {
        let plan = Plan::new(&BenchOptions::default()).expect("valid options");
        assert_eq!(plan.rounds, 3);
        assert_eq!(plan.round, Duration::from_secs(5) / 3);
        assert_eq!(plan.warm_up, Duration::from_millis(500));
        assert_eq!(plan.read_db_bytes, 100 * 1024 * 1024);
    }

    #[test]
    fn plan_rejects_zero() {
        let options = BenchOptions {
            seconds: 0,
            ..BenchOptions::default()
        };
        assert!(matches!(
            Plan::new(&options),
            Err(BenchError::InvalidOption(_))
        ));
    }

    #[test]
    fn native_targets_measure_every_workload() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let targets: Vec<Target> = ["native", "other"]
            .into_iter()
            .map(|name| Target {
                name: name.to_string(),
                dir: dir.path().join(name),
            })
            .collect();
        for target in &targets {
            create_dir(&target.dir).expect("target directory");
        }
        let plan = Plan {
            rounds: 3,
            round: Duration::from_millis(60),
            warm_up: Duration::from_millis(20),
            read_db_bytes: 1024 * 1024,
        };
        let measured = measure(&targets, &plan).expect("benchmark runs");
        assert!(measured.read_db.bytes >= 1024 * 1024);
        assert_eq!(measured.results.len(), Workload::ALL.len());
        for result in &measured.results {
            assert_eq!(result.targets.len(), 2);
            for target in &result.targets {
                assert_eq!(target.rounds.len(), 3);
                assert!(target.median > 0.0, "{result:?}");
            }
            assert!(result.ratio(1).is_some());
        }
    }
}
