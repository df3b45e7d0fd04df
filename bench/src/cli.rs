//! The command line of `ltxfs-bench`, which `ltxfs bench` runs with its own
//! arguments (and `ltxfs bench` as the program's name, for the usage text).
//! Usage errors exit with status 2, failures with 1, as `ltxfs`'s do.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ltxfs::cli::{EXIT_FAILURE, fail, init_logging, parse_args};
use ltxfs::config::LogConfig;

/// Compare SQLite on the mount against a plain directory on the same disk.
#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Measure something else than SQLite on the mount.
    #[command(subcommand)]
    mode: Option<BenchMode>,
    /// Where to put the benchmark's files (default: a new directory here).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds to measure each workload on each target.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Size of the database for the point-read workload, in MB.
    #[arg(long, default_value_t = 100)]
    read_db_mb: u64,
    /// Also time a clean restart with a database of this many MB (0: skip).
    #[arg(long, default_value_t = 0)]
    restart_db_mb: u64,
    /// Mount with `fuse.locks: ltxfs`: ltxfs serves SQLite's locks itself.
    #[arg(long)]
    ltxfs_locks: bool,
}

/// The other benchmarks.
#[derive(Debug, Subcommand)]
enum BenchMode {
    /// Measure replication between ltxfs processes on loopback: lag, snapshot
    /// bootstrap, and what two replicas cost the primary.
    Replication {
        /// Where to put the benchmark's files (default: a new directory here).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds to measure each lag and each primary's throughput.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Size of the database a new replica bootstraps from, in MB (0: skip).
        #[arg(long, default_value_t = 200)]
        snapshot_db_mb: u64,
    },
    /// Measure backups to a local S3 server (moto, from target/s3-venv): backup
    /// lag, what backups cost commit throughput, and restore time and memory.
    Backup {
        /// Where to put the benchmark's files (default: a new directory here).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds to measure the lag; the throughput comparison runs each mount
        /// for half as long.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Size of the database restored, in MB (0: skip).
        #[arg(long, default_value_t = 1024)]
        restore_db_mb: u64,
    },
    /// Measure handing the primary role between two candidate ltxfs processes
    /// with an etcd lease on loopback: time until the new primary accepts writes.
    Handoff {
        /// Where to put the benchmark's files (default: a new directory here).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Handoffs to measure; the direction alternates.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Measure the latency the proxy adds to a read against calling the
    /// application directly.
    Proxy {
        /// Requests measured per path.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
    },
}

/// Parses `args` and runs the benchmark, with logging to stderr and its report
/// on stdout; returns the exit status.
pub fn run(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli: Cli = match parse_args(args) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    init_logging(&LogConfig::default(), false);
    match cli.mode {
        Some(BenchMode::Replication {
            dir,
            seconds,
            snapshot_db_mb,
        }) => report(crate::replication::run(
            &crate::replication::ReplicationOptions {
                dir,
                seconds,
                snapshot_db_mb,
            },
        )),
        Some(BenchMode::Backup {
            dir,
            seconds,
            restore_db_mb,
        }) => report(crate::backup::run(&crate::backup::BackupOptions {
            dir,
            seconds,
            restore_db_mb,
        })),
        Some(BenchMode::Handoff { dir, rounds }) => {
            report(crate::handoff::run(&crate::handoff::HandoffOptions {
                dir,
                rounds,
            }))
        }
        Some(BenchMode::Proxy { requests }) => {
            report(crate::proxy::run(&crate::proxy::ProxyOptions { requests }))
        }
        None => report(crate::run(&crate::BenchOptions {
            dir: cli.dir,
            seconds: cli.seconds,
            read_db_mb: cli.read_db_mb,
            restart_db_mb: cli.restart_db_mb,
            ltxfs_locks: cli.ltxfs_locks,
        })),
    }
}

/// Prints a benchmark's report, or fails with its error.
fn report<R: std::fmt::Display, E: std::error::Error>(result: Result<R, E>) -> i32 {
    match result {
        Ok(report) => {
            println!("{report}");
            0
        }
        Err(error) => fail(EXIT_FAILURE, &error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ltxfs bench").chain(args.iter().copied()))
    }

    #[test]
    fn replication_is_a_mode_of_the_benchmark() {
        let cli = parse(&["replication", "--seconds", "2"]).expect("parses");
        assert!(matches!(
            cli.mode,
            Some(BenchMode::Replication {
                seconds: 2,
                snapshot_db_mb: 200,
                ..
            })
        ));
        let cli = parse(&["--seconds", "2"]).expect("parses");
        assert!(cli.mode.is_none());
        assert_eq!(cli.seconds, 2);
        // The SQLite benchmark's options do not apply to the replication benchmark.
        assert!(parse(&["--read-db-mb", "5", "replication"]).is_err());
    }

    #[test]
    fn handoff_takes_rounds_and_a_dir() {
        let cli = parse(&["handoff"]).expect("parses");
        assert!(matches!(
            cli.mode,
            Some(BenchMode::Handoff {
                rounds: 20,
                dir: None
            })
        ));
        let cli = parse(&["handoff", "--rounds", "4", "--dir", "x"]).expect("parses");
        assert!(matches!(
            cli.mode,
            Some(BenchMode::Handoff {
                rounds: 4,
                dir: Some(_)
            })
        ));
    }
}
