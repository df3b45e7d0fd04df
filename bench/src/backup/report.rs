//! The backup benchmark's results, its goals (issue 18), and their plain-text
//! rendering.

use std::fmt;
use std::time::Duration;

use super::lag::{self, BackupLag};
use super::restore::{
    HISTORY, HISTORY_COMPACTION_WINDOWS, MEMORY_GOAL_BYTES, RESTORE_DB, RESTORE_RATIO_GOAL, ROUNDS,
    RestoreResult,
};
use super::throughput::{BackupThroughput, THROUGHPUT_GOAL};
use super::{LAG_RATE, LEAD_IN, POLL_INTERVAL};
use crate::report::{GoalRow, write_cpu_per_transaction, write_goal_table};
use crate::{MachineInfo, write_verdict};

/// Everything one run of `ltxfs bench backup` measured. `Display` renders it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupReport {
    /// Where the benchmark ran.
    pub machine: MachineInfo,
    /// `backup.sync-interval` of the mounts with backups.
    pub sync_interval: Duration,
    /// How long the lag's writer wrote before it was measured.
    pub warm_up: Duration,
    /// The lag at the paced rate.
    pub lag: BackupLag,
    /// Rounds per mount in the throughput comparison.
    pub rounds: usize,
    /// The length of one round.
    pub round_duration: Duration,
    /// How long each mount wrote before the rounds.
    pub throughput_warm_up: Duration,
    /// Commit throughput with and without backups.
    pub throughput: BackupThroughput,
    /// The restore, when it was asked for.
    pub restore: Option<RestoreResult>,
    /// Problems that did not invalidate the figures, e.g. an unclean unmount.
    pub warnings: Vec<String>,
}

impl BackupReport {
    /// The rows of the table, in the order measured.
    fn rows(&self) -> Vec<GoalRow> {
        let mut rows = Vec::new();
        let lag = &self.lag;
        let (p50_goal, p99_goal) = lag::goals();
        // A figure is only meaningful when every transaction was listed.
        let complete = lag.missing == 0;
        let label = format!("lag at {} tx/s", lag.rate);
        rows.push(GoalRow::info(
            format!("{label}: rate achieved"),
            format!("{:.0} tx/s", lag.achieved_rate),
        ));
        rows.push(GoalRow::judged(
            format!("{label}: p50"),
            milliseconds(lag.p50),
            format!("<= {} ms", p50_goal.as_millis()),
            complete && lag.p50 <= p50_goal,
        ));
        rows.push(GoalRow::judged(
            format!("{label}: p99"),
            milliseconds(lag.p99),
            format!("<= {} ms", p99_goal.as_millis()),
            complete && lag.p99 <= p99_goal,
        ));
        rows.push(GoalRow::info(
            format!("{label}: max"),
            milliseconds(lag.max),
        ));
        rows.push(GoalRow::info(
            format!("{label}: objects listed"),
            format!("{}", lag.objects),
        ));
        rows.push(GoalRow::info(
            format!("{label}: time between listings"),
            milliseconds(lag.poll_period),
        ));
        rows.push(GoalRow::info(
            format!("{label}: time between uploads, mean / max"),
            format!(
                "{} / {}",
                milliseconds(lag.upload_period),
                milliseconds(lag.upload_period_max)
            ),
        ));
        if !complete {
            rows.push(GoalRow::judged(
                format!("{label}: never listed"),
                format!("{} of {} tx", lag.missing, lag.transactions),
                "0".to_string(),
                false,
            ));
        }

        let result = &self.throughput.result;
        for target in &result.targets {
            rows.push(GoalRow::info(
                format!("inserts, {}", target.target),
                format!("{:.0} tx/s", target.median),
            ));
        }
        let ratio = result.ratio(1);
        rows.push(GoalRow::judged(
            "with backup / without",
            ratio.map_or("-".to_string(), |ratio| format!("{ratio:.2}")),
            format!(">= {THROUGHPUT_GOAL:.2}"),
            ratio.is_some_and(|ratio| ratio >= THROUGHPUT_GOAL),
        ));

        if let Some(restore) = &self.restore {
            let rate = |duration: Duration| {
                format!(
                    "{:.2} s ({:.0} MiB/s)",
                    duration.as_secs_f64(),
                    mib(restore.object_bytes) / duration.as_secs_f64().max(1e-9)
                )
            };
            rows.push(GoalRow::info(
                format!(
                    "GET of the {} objects ({:.1} MiB)",
                    restore.objects,
                    mib(restore.object_bytes)
                ),
                rate(restore.get_median()),
            ));
            rows.push(GoalRow::info(
                format!("ltxfs restore of {:.1} MiB", mib(restore.db_bytes)),
                rate(restore.restore_median()),
            ));
            rows.push(GoalRow::judged(
                "restore / GET",
                format!("{:.2}", restore.ratio()),
                format!("<= {RESTORE_RATIO_GOAL:.2}"),
                restore.ratio() <= RESTORE_RATIO_GOAL,
            ));
            rows.push(GoalRow::info(
                "fsync of the downloaded bytes, after the GETs",
                format!("{:.2} s", restore.get_fsync_median().as_secs_f64()),
            ));
            rows.push(GoalRow::info(
                "restore / (GET + fsync)",
                format!("{:.2}", restore.durable_ratio()),
            ));
            rows.push(GoalRow::info(
                "restore CPU time (user + system)",
                format!("{:.2} s", restore.restore_cpu_median().as_secs_f64()),
            ));
            rows.push(GoalRow::judged(
                "restore memory above idle",
                format!(
                    "{:.1} MiB (peak {:.1}, idle {:.1})",
                    mib(restore.restore_memory()),
                    mib(restore.restore_peak_rss),
                    mib(restore.idle_rss)
                ),
                format!("<= {:.0} MiB", mib(MEMORY_GOAL_BYTES)),
                restore.restore_memory() <= MEMORY_GOAL_BYTES,
            ));
            rows.push(GoalRow::info(
                "snapshot upload, from restart to stored",
                format!("{:.2} s", restore.snapshot_upload.as_secs_f64()),
            ));
            rows.push(GoalRow::judged(
                "snapshot upload: mount memory above start",
                format!(
                    "{:.1} MiB (peak {:.1}, start {:.1})",
                    mib(restore.upload_memory()),
                    mib(restore.mount_peak_rss),
                    mib(restore.mount_idle_rss)
                ),
                format!("<= {:.0} MiB", mib(MEMORY_GOAL_BYTES)),
                restore.upload_memory() <= MEMORY_GOAL_BYTES,
            ));
        }
        rows
    }

    /// True when every figure that has a goal met it.
    pub fn all_goals_met(&self) -> bool {
        self.rows().iter().all(|row| row.met != Some(false))
    }
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn seconds(durations: &[Duration]) -> String {
    durations
        .iter()
        .map(|duration| format!("{:.2}", duration.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "method:  a local moto S3 server on loopback; ltxfs mounts with backup.sync-interval {} ms \
             (other backup settings at their defaults) or without backup;",
            self.sync_interval.as_millis()
        )?;
        writeln!(
            f,
            "         one autocommit single-row INSERT per transaction, WAL, synchronous=NORMAL"
        )?;
        writeln!(
            f,
            "         lag: from INSERT returning until a listing of the bucket (every {} ms) shows an object \
             holding its TXID; {} tx/s for {:.2} s after a {:.2} s warm-up",
            POLL_INTERVAL.as_millis(),
            LAG_RATE,
            self.lag.transactions as f64 / self.lag.achieved_rate.max(1e-9),
            self.warm_up.as_secs_f64()
        )?;
        writeln!(
            f,
            "         throughput: median of {} rounds of {:.2} s per mount (taking turns, each after an uncounted \
             {:.2} s lead-in) after a {:.2} s warm-up, spread {:.0}%;",
            self.rounds,
            self.round_duration.as_secs_f64(),
            LEAD_IN.as_secs_f64(),
            self.throughput_warm_up.as_secs_f64(),
            self.throughput.result.spread() * 100.0,
        )?;
        writeln!(
            f,
            "         the bucket caught up {} s after each round with backup",
            seconds(&self.throughput.catch_up)
        )?;
        for target in &self.throughput.result.targets {
            let rates = target
                .rounds
                .iter()
                .map(|rate| format!("{rate:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(f, "         rounds, {}: {rates} tx/s", target.target)?;
        }
        if let Some(restore) = &self.restore {
            writeln!(
                f,
                "         restore: {RESTORE_DB} of random blobs snapshotted by a mount restarted with backup, then \
                 {} transactions rewriting a random row over {} s (compaction windows {HISTORY_COMPACTION_WINDOWS}); \
                 the newest state: a snapshot, {} cumulative and {} change objects;",
                restore.history_transactions,
                HISTORY.as_secs(),
                restore.cumulative_objects,
                restore.change_objects
            )?;
            writeln!(
                f,
                "         {ROUNDS} rounds (order alternating) of sequential plain GETs of those objects into a file \
                 and of `ltxfs restore` (spawn to exit); memory: ru_maxrss, idle = restoring a one-row database"
            )?;
            writeln!(
                f,
                "         rounds, GET: {} s (then fsync {} s); restore: {} s",
                seconds(&restore.get),
                seconds(&restore.get_fsync),
                seconds(&restore.restore)
            )?;
        }
        writeln!(f)?;

        write_goal_table(f, self.rows())?;
        writeln!(f)?;
        write_cpu_per_transaction(
            f,
            "CPU time per transaction in the throughput rounds (user + system, including lead-ins and catching up):",
            &self.throughput.result.targets,
            &self.throughput.cpu,
        )?;
        writeln!(f)?;
        write_verdict(f, self.all_goals_met(), &self.warnings)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{CpuUse, TargetResult, Workload, WorkloadResult};

    fn report(p50_ms: u64, with_backup_tx: f64, restore_ms: u64) -> BackupReport {
        BackupReport {
            machine: MachineInfo {
                cores: Some(2),
                memory_bytes: Some(8 << 30),
                kernel: Some("Linux 6.1.0 x86_64".to_string()),
                dir: PathBuf::from("/data/ltxfs-bench-1"),
                dir_fs_type: Some("ext4".to_string()),
                sqlite_version: "3.50.0".to_string(),
            },
            sync_interval: Duration::from_secs(1),
            warm_up: Duration::from_secs(2),
            lag: BackupLag {
                rate: 1000,
                transactions: 20_000,
                achieved_rate: 1000.0,
                p50: Duration::from_millis(p50_ms),
                p99: Duration::from_millis(p50_ms + 500),
                max: Duration::from_millis(p50_ms + 600),
                missing: 0,
                objects: 20,
                poll_period: Duration::from_millis(21),
                upload_period: Duration::from_millis(1050),
                upload_period_max: Duration::from_millis(1200),
            },
            rounds: 3,
            round_duration: Duration::from_secs(3),
            throughput_warm_up: Duration::from_secs(1),
            throughput: BackupThroughput {
                result: WorkloadResult::new(
                    Workload::InsertWalNormal,
                    vec![
                        TargetResult::new("no backup", vec![1000.0]),
                        TargetResult::new("backup", vec![with_backup_tx]),
                    ],
                ),
                catch_up: vec![Duration::from_millis(800)],
                cpu: vec![
                    vec![CpuUse {
                        process: "ltxfs mount".to_string(),
                        per_transaction: Duration::from_micros(60),
                    }],
                    vec![CpuUse {
                        process: "ltxfs mount".to_string(),
                        per_transaction: Duration::from_micros(70),
                    }],
                ],
            },
            restore: Some(RestoreResult {
                db_bytes: 1 << 30,
                objects: 8,
                cumulative_objects: 3,
                change_objects: 4,
                history_transactions: 450,
                object_bytes: 1 << 30,
                get: vec![Duration::from_secs(2)],
                get_fsync: vec![Duration::from_millis(500)],
                restore: vec![Duration::from_millis(restore_ms)],
                restore_cpu: vec![Duration::from_millis(1500)],
                restore_peak_rss: 40 << 20,
                idle_rss: 20 << 20,
                snapshot_upload: Duration::from_secs(9),
                mount_idle_rss: 30 << 20,
                mount_peak_rss: 60 << 20,
            }),
            warnings: vec![],
        }
    }

    #[test]
    fn every_goal_is_judged() {
        let good = report(600, 980.0, 2500);
        let text = good.to_string();
        assert!(good.all_goals_met(), "{text}");
        assert!(text.contains("lag at 1000 tx/s: p50"), "{text}");
        assert!(text.contains("<= 1100 ms"), "{text}");
        assert!(text.contains("<= 2000 ms"), "{text}");
        assert!(text.contains("0.98"), "{text}");
        assert!(text.contains("1.25"), "{text}");
        assert!(text.contains("20.0 MiB (peak 40.0, idle 20.0)"), "{text}");
        assert!(text.contains("backup: ltxfs mount 70 us"), "{text}");
        assert!(text.ends_with("all goals met: yes"), "{text}");

        assert!(!report(1200, 980.0, 2500).all_goals_met());
        assert!(!report(600, 940.0, 2500).all_goals_met());
        assert!(!report(600, 980.0, 3100).all_goals_met());
    }

    #[test]
    fn transactions_never_listed_fail_the_goals() {
        let mut report = report(600, 980.0, 2500);
        report.lag.missing = 7;
        assert!(!report.all_goals_met());
        assert!(report.to_string().contains("7 of 20000 tx"));
    }
}
