//! `ltxfs bench replication`: how fast replication is and what it costs the
//! primary, measured on one machine with separate `ltxfs mount` processes talking
//! over loopback.
//!
//! One run creates a working directory (as `ltxfs bench` does: by default
//! `./ltxfs-bench-<pid>`, on the disk users keep data on) and starts in it, each
//! with its own mount point, data dir and log, and all with the static lease and
//! `http.addr: 127.0.0.1:0`:
//!
//! * `primary` (`lease.candidate: true`) and `replica-1` and `replica-2`
//!   (`lease.candidate: false`, `lease.advertise-url` naming the address the
//!   primary logged);
//! * `alone`, a second primary that no replica follows: the baseline of the
//!   throughput comparison and the source of the snapshot;
//! * for the snapshot only, `late-replica`, a new replica of `alone`.
//!
//! It then measures, in this order:
//!
//! 1. commit-to-visible lag on `replica-1` at [`PACED_RATE`] transactions per
//!    second and at the primary's maximum rate (see `lag`);
//! 2. snapshot bootstrap throughput, `--snapshot-db-mb` MiB (see `snapshot`);
//!    it runs while `alone` holds no other database, so the snapshot is the
//!    whole bootstrap;
//! 3. the primary's single-row insert throughput with two replicas against none,
//!    and with two replicas under synchronous replication (`synchronous`, with
//!    `synchronous-replica-1` and `-2`), in rotating rounds (see `throughput`).
//!
//! `--seconds` is the measured time of each lag measurement and of each primary
//! in the comparison, as in `ltxfs bench`.
//!
//! Invariants: every node is owned by `run` (or, for the late replica, by
//! `snapshot::measure`), so it is stopped — SIGTERM, SIGKILL after 10 s, then a
//! forced unmount — on every return path, and each node also exits by itself if
//! the benchmark dies; every wait has a timeout; the replicas have caught up
//! before each measurement starts.

mod cluster;
mod lag;
mod placement;
mod report;
mod snapshot;
mod throughput;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use lag::percentile;
pub use report::ReplicationReport;
pub(crate) use snapshot::fill;

use super::{BenchError, BenchOptions, MachineInfo, Plan, Workspace};
use cluster::NodeApi;
pub(crate) use cluster::{Node, wait_converged};
use lag::LagRun;
use throughput::Followed;

/// What the synchronous primary of the throughput comparison adds to its config.
const SYNCHRONOUS_CONFIG: &str = "replication:\n  synchronous: true\n";

/// The name of the cluster whose nodes use the cluster secret and mutual TLS.
const TLS_CLUSTER: &str = "secret + mutual TLS";

/// The paced rate of the first lag measurement, in transactions per second.
pub const PACED_RATE: u32 = 1000;

/// What `ltxfs bench replication` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationOptions {
    /// Where to create the nodes' files. When `None`, a fresh directory
    /// `./ltxfs-bench-<pid>` is created and removed at the end.
    pub dir: Option<PathBuf>,
    /// The measured time of each lag measurement and of each primary in the
    /// throughput comparison.
    pub seconds: u64,
    /// The size of the database the snapshot carries, in MiB; 0 skips it.
    pub snapshot_db_mb: u64,
}

impl Default for ReplicationOptions {
    fn default() -> Self {
        ReplicationOptions {
            dir: None,
            seconds: 5,
            snapshot_db_mb: 200,
        }
    }
}

/// Everything that can stop the replication benchmark.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationBenchError {
    /// Something the benchmarks share failed: options, files, SQLite, a mount.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// A primary did not say where it serves replication.
    #[error("{node} did not log `serving replication address=...` within {} s; see {}", timeout.as_secs(), log.display())]
    NoAddress {
        /// The node's name.
        node: String,
        /// How long the benchmark waited.
        timeout: Duration,
        /// The node's log file.
        log: PathBuf,
    },
    /// A node has no position for a database the benchmark wrote to it.
    #[error("{node} has no position for {database}")]
    NoPosition {
        /// The node's name.
        node: String,
        /// The database.
        database: String,
    },
    /// A replica did not reach the primary's position in time.
    #[error("{replica} did not reach position {target} of {database} within {} s (it is at {}); see its log", timeout.as_secs(), last.as_deref().unwrap_or("no position"))]
    NotConverged {
        /// The replica's name.
        replica: String,
        /// The database.
        database: String,
        /// The primary's position.
        target: String,
        /// The replica's position when the benchmark gave up.
        last: Option<String>,
        /// How long the benchmark waited.
        timeout: Duration,
    },
    /// Threads could not be moved to the CPUs the placed rounds give them.
    #[error("place the benchmark's threads on CPUs: {0}")]
    Placement(std::io::Error),
    /// A measuring thread panicked.
    #[error("the {0} thread panicked")]
    ThreadPanicked(&'static str),
    /// The certificates of the TLS cluster could not be made.
    #[error("make the TLS cluster's certificates: {0}")]
    Certificates(String),
}

/// Runs the whole replication benchmark. Every node is stopped before this
/// returns, also on errors.
pub fn run(options: &ReplicationOptions) -> Result<ReplicationReport, ReplicationBenchError> {
    let plan = Plan::new(&BenchOptions {
        seconds: options.seconds,
        ..BenchOptions::default()
    })?;
    let mut workspace = Workspace::create(options.dir.as_deref())?;
    let machine = MachineInfo::collect(workspace.path());
    let base = workspace.path().to_path_buf();

    // Declared after the workspace, so dropped (stopped) before it is removed.
    let (primary, primary_url) = Node::start_primary(&base, "primary")?;
    let replicas = [
        Node::start_replica(&base, "replica-1", &primary_url)?,
        Node::start_replica(&base, "replica-2", &primary_url)?,
    ];
    let (alone, alone_url) = Node::start_primary(&base, "alone")?;
    let followers: Vec<&Node> = replicas.iter().collect();
    let (synchronous, synchronous_url) =
        Node::start_primary_with(&base, "synchronous", SYNCHRONOUS_CONFIG, &NodeApi::open())?;
    let synchronous_replicas = [
        Node::start_replica(&base, "synchronous-replica-1", &synchronous_url)?,
        Node::start_replica(&base, "synchronous-replica-2", &synchronous_url)?,
    ];
    // The same cluster as `primary`'s, with the cluster secret and mutual TLS.
    let secured = NodeApi::secret_and_mutual_tls(&base)?;
    let (tls_primary, tls_url) = Node::start_primary_with(&base, "tls", "", &secured)?;
    let tls_replicas = [
        Node::start_replica_with(&base, "tls-replica-1", &tls_url, &secured)?,
        Node::start_replica_with(&base, "tls-replica-2", &tls_url, &secured)?,
    ];
    let tls_followers: Vec<&Node> = tls_replicas.iter().collect();

    let measured = plan.round * plan.rounds as u32;
    let mut lags = Vec::with_capacity(2);
    for (cluster, nodes) in [
        ("", (&primary, &followers)),
        (TLS_CLUSTER, (&tls_primary, &tls_followers)),
    ] {
        for (database, rate) in [("lag-paced.db", Some(PACED_RATE)), ("lag-max.db", None)] {
            let run = LagRun {
                cluster,
                database,
                rate,
            };
            let (writer, followers) = nodes;
            lags.push(lag::measure(
                writer,
                followers,
                followers[0],
                run,
                plan.warm_up,
                measured,
            )?);
        }
    }

    let mut warnings = Vec::new();
    let snapshot = match options.snapshot_db_mb {
        0 => None,
        size_mb => {
            let (result, warning) =
                snapshot::measure(&base, &alone, &alone_url, "late-replica", size_mb)?;
            warnings.extend(warning);
            Some(result)
        }
    };

    let throughput = throughput::compare(
        &alone,
        &[
            Followed {
                name: format!("{} replicas", followers.len()),
                primary: &primary,
                replicas: followers.clone(),
            },
            Followed {
                name: format!("{} replicas, synchronous", synchronous_replicas.len()),
                primary: &synchronous,
                replicas: synchronous_replicas.iter().collect(),
            },
            Followed {
                name: format!("{} replicas, {TLS_CLUSTER}", tls_replicas.len()),
                primary: &tls_primary,
                replicas: tls_followers.clone(),
            },
        ],
        &plan,
    )?;

    drop((followers, tls_followers));
    for node in replicas
        .into_iter()
        .chain(synchronous_replicas)
        .chain(tls_replicas)
        .chain([primary, synchronous, tls_primary, alone])
    {
        if let Err(error) = node.stop() {
            warnings.push(error.to_string());
        }
    }
    if let Err(error) = workspace.cleanup() {
        warnings.push(error.to_string());
    }
    Ok(ReplicationReport {
        machine,
        warm_up: plan.warm_up,
        lag_duration: measured,
        rounds: plan.rounds,
        round_duration: plan.round,
        lags,
        snapshot,
        throughput,
        warnings,
    })
}
