//! The benchmark's results and their plain-text rendering.

use std::fmt;
use std::time::Duration;

use super::{MachineInfo, Workload};
use crate::round_trip::RoundTrip;

/// Everything one benchmark run measured. `Display` renders it as a table.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Where the benchmark ran.
    pub machine: MachineInfo,
    /// The target names; the first is the baseline the others are compared with.
    pub targets: Vec<String>,
    /// Rounds per workload and target.
    pub rounds: usize,
    /// The length of one round.
    pub round_duration: Duration,
    /// How long each workload ran on each target before the rounds.
    pub warm_up: Duration,
    /// The size of the database the read workloads queried.
    pub read_db_bytes: u64,
    /// The number of rows in that database.
    pub read_db_rows: u64,
    /// One entry per workload, in `Workload::ALL` order.
    pub results: Vec<WorkloadResult>,
    /// What one FUSE lock request costs here, natively, on the mount and on a
    /// null FUSE filesystem.
    pub round_trip: RoundTrip,
    /// The timed clean restart of a large database, when it was asked for.
    pub restart: Option<RestartResult>,
    /// Problems that did not invalidate the figures, e.g. an unclean unmount.
    pub warnings: Vec<String>,
}

/// How long a clean restart of ltxfs took until a large database was ready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartResult {
    /// The database's size.
    pub db_bytes: u64,
    /// From starting ltxfs until the database's position could be read.
    pub ready: Duration,
}

/// The goal for a clean restart: under 2 seconds for 1 GB.
pub const RESTART_GOAL: Duration = Duration::from_secs(2);

/// The figures of one workload on every target.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadResult {
    /// The workload measured.
    pub workload: Workload,
    /// One entry per target, in the order of `BenchReport::targets`.
    pub targets: Vec<TargetResult>,
}

/// The figures of one workload on one target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetResult {
    /// The target's name.
    pub target: String,
    /// Operations per second in each round, in the order they ran.
    pub rounds: Vec<f64>,
    /// The median of `rounds`.
    pub median: f64,
}

impl TargetResult {
    pub(super) fn new(target: &str, rounds: Vec<f64>) -> TargetResult {
        TargetResult {
            target: target.to_string(),
            median: median(&rounds),
            rounds,
        }
    }
}

impl WorkloadResult {
    pub(super) fn new(workload: Workload, targets: Vec<TargetResult>) -> WorkloadResult {
        WorkloadResult { workload, targets }
    }

    /// The median throughput of target `index` divided by that of the baseline
    /// (target 0), or `None` if there is no such target or the baseline measured nothing.
    pub fn ratio(&self, index: usize) -> Option<f64> {
        let baseline = self.targets.first()?.median;
        let target = self.targets.get(index)?.median;
        (baseline > 0.0).then(|| target / baseline)
    }

    /// How much the rounds disagree: the largest (max - min) / median over the
    /// targets. A large spread means the machine was noisy and the ratios are uncertain.
    pub fn spread(&self) -> f64 {
        self.targets
            .iter()
            .filter(|target| target.median > 0.0)
            .map(|target| {
                let max = target.rounds.iter().copied().fold(f64::MIN, f64::max);
                let min = target.rounds.iter().copied().fold(f64::MAX, f64::min);
                (max - min) / target.median
            })
            .fold(0.0, f64::max)
    }

    /// Whether target `index` reached the workload's goal relative to the baseline.
    pub fn goal_met(&self, index: usize) -> Option<bool> {
        self.ratio(index).map(|ratio| ratio >= self.workload.goal())
    }
}

impl BenchReport {
    /// True when every non-baseline target met every goal.
    pub fn all_goals_met(&self) -> bool {
        self.results.iter().all(|result| {
            (1..result.targets.len()).all(|index| result.goal_met(index) == Some(true))
        })
    }
}

/// The median of some figures (the mean of the middle two for an even count), or
/// 0 when there are none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[middle],
        _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let baseline = self.targets.first().map_or("baseline", String::as_str);
        writeln!(f, "machine: {}", self.machine)?;
        writeln!(
            f,
            "method:  median of {} rounds of {:.2} s per target (targets take turns), after a {:.2} s warm-up",
            self.rounds,
            self.round_duration.as_secs_f64(),
            self.warm_up.as_secs_f64()
        )?;
        writeln!(
            f,
            "         inserts: one autocommit single-row INSERT per transaction; selects: random rowids \
             in a {:.1} MiB WAL database of {} rows",
            self.read_db_bytes as f64 / (1024.0 * 1024.0),
            self.read_db_rows
        )?;
        writeln!(f)?;

        let mut header = vec!["workload".to_string()];
        header.extend(self.targets.iter().map(|target| format!("{target} ops/s")));
        for target in self.targets.iter().skip(1) {
            header.push(format!("{target}/{baseline}"));
        }
        header.push("goal".to_string());
        header.push("FUSE best".to_string());
        for target in self.targets.iter().skip(1) {
            header.push(if self.targets.len() > 2 {
                format!("met ({target})")
            } else {
                "met".to_string()
            });
        }
        header.push("spread".to_string());
        let mut rows = vec![header];
        for result in &self.results {
            let mut row = vec![result.workload.name().to_string()];
            row.extend(
                result
                    .targets
                    .iter()
                    .map(|target| format!("{:.0}", target.median)),
            );
            for index in 1..self.targets.len() {
                row.push(
                    result
                        .ratio(index)
                        .map_or("-".to_string(), |ratio| format!("{ratio:.2}")),
                );
            }
            row.push(format!(">= {:.2}", result.workload.goal()));
            row.push(
                result
                    .targets
                    .first()
                    .and_then(|native| {
                        self.round_trip
                            .best_possible_ratio(result.workload, native.median)
                    })
                    .map_or("-".to_string(), |ratio| format!("{ratio:.2}")),
            );
            for index in 1..self.targets.len() {
                row.push(match result.goal_met(index) {
                    Some(true) => "yes".to_string(),
                    Some(false) => "NO".to_string(),
                    None => "-".to_string(),
                });
            }
            row.push(format!("{:.0}%", result.spread() * 100.0));
            rows.push(row);
        }
        write_table(f, &rows)?;

        writeln!(f)?;
        writeln!(
            f,
            "spread: (fastest - slowest round) / median for the noisiest target; a large spread means a noisy machine and uncertain ratios"
        )?;
        let micros = |duration: Duration| duration.as_secs_f64() * 1e6;
        writeln!(
            f,
            "FUSE lock round trip (fcntl F_SETLK, median of {} loops): native {:.1} us, null FUSE filesystem {:.1} us, ltxfs mount {:.1} us",
            super::round_trip::SAMPLES,
            micros(self.round_trip.native),
            micros(self.round_trip.null_fuse),
            micros(self.round_trip.mount),
        )?;
        writeln!(
            f,
            "FUSE best: the highest ratio any FUSE filesystem making the requests the mounts make could reach here: native time plus the workload's FUSE requests at the null filesystem's cost"
        )?;
        if let Some(restart) = &self.restart {
            writeln!(
                f,
                "clean restart with a {:.1} MiB database: ready in {:.3} s (goal < {} s for 1 GiB)",
                restart.db_bytes as f64 / (1024.0 * 1024.0),
                restart.ready.as_secs_f64(),
                RESTART_GOAL.as_secs()
            )?;
        }
        // No newline after the last line, so that `println!` adds exactly one.
        write!(
            f,
            "all goals met: {}",
            if self.all_goals_met() { "yes" } else { "no" }
        )?;
        for warning in &self.warnings {
            write!(f, "\nwarning: {warning}")?;
        }
        Ok(())
    }
}

/// Writes rows of cells with the first column left-aligned and the others
/// right-aligned, each as wide as its widest cell.
pub(super) fn write_table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            let width = widths[column];
            if column == 0 {
                line.push_str(&format!("{cell:<width$}"));
            } else {
                line.push_str(&format!("   {cell:>width$}"));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

/// One row of a benchmark's table of goals: what was measured, the figure, the
/// goal and whether it was met (`None` when there is no goal).
pub(super) struct GoalRow {
    pub(super) measurement: String,
    pub(super) figure: String,
    pub(super) goal: String,
    pub(super) met: Option<bool>,
}

impl GoalRow {
    /// A row without a goal.
    pub(super) fn info(measurement: impl Into<String>, figure: String) -> GoalRow {
        GoalRow {
            measurement: measurement.into(),
            figure,
            goal: String::new(),
            met: None,
        }
    }

    /// A row judged against `goal`.
    pub(super) fn judged(
        measurement: impl Into<String>,
        figure: String,
        goal: String,
        met: bool,
    ) -> GoalRow {
        GoalRow {
            measurement: measurement.into(),
            figure,
            goal,
            met: Some(met),
        }
    }
}

/// Writes `rows` as a table with columns measurement, figure, goal and met.
pub(super) fn write_goal_table(f: &mut fmt::Formatter<'_>, rows: Vec<GoalRow>) -> fmt::Result {
    let mut table = vec![vec![
        "measurement".to_string(),
        "figure".to_string(),
        "goal".to_string(),
        "met".to_string(),
    ]];
    for row in rows {
        table.push(vec![
            row.measurement,
            row.figure,
            if row.goal.is_empty() {
                "-".to_string()
            } else {
                row.goal
            },
            match row.met {
                Some(true) => "yes".to_string(),
                Some(false) => "NO".to_string(),
                None => "-".to_string(),
            },
        ]);
    }
    write_table(f, &table)
}

/// Writes `heading`, then per target the CPU time each process used per
/// transaction.
pub(super) fn write_cpu_per_transaction(
    f: &mut fmt::Formatter<'_>,
    heading: &str,
    targets: &[TargetResult],
    cpu: &[Vec<super::CpuUse>],
) -> fmt::Result {
    writeln!(f, "{heading}")?;
    for (target, uses) in targets.iter().zip(cpu) {
        let uses = uses
            .iter()
            .map(|used| {
                format!(
                    "{} {:.0} us",
                    used.process,
                    used.per_transaction.as_secs_f64() * 1e6
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(f, "  {}: {uses}", target.target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn report() -> BenchReport {
        BenchReport {
            machine: MachineInfo {
                cores: Some(2),
                memory_bytes: Some(8 << 30),
                kernel: Some("Linux 6.1.0 x86_64".to_string()),
                dir: PathBuf::from("/data/ltxfs-bench-1"),
                dir_fs_type: Some("ext4".to_string()),
                sqlite_version: "3.50.0".to_string(),
            },
            targets: vec!["native".to_string(), "mount".to_string()],
            rounds: 3,
            round_duration: Duration::from_secs(1),
            warm_up: Duration::from_millis(500),
            read_db_bytes: 100 << 20,
            read_db_rows: 900_000,
            results: vec![
                WorkloadResult::new(
                    Workload::InsertWalNormal,
                    vec![
                        TargetResult::new("native", vec![1000.0, 3000.0, 2000.0]),
                        TargetResult::new("mount", vec![400.0, 600.0, 500.0]),
                    ],
                ),
                WorkloadResult::new(
                    Workload::SelectBatched,
                    vec![
                        TargetResult::new("native", vec![100.0]),
                        TargetResult::new("mount", vec![50.0]),
                    ],
                ),
            ],
            round_trip: RoundTrip {
                native: Duration::from_micros(1),
                mount: Duration::from_micros(20),
                null_fuse: Duration::from_micros(11),
                locks: crate::LockServer::Ltxfs,
            },
            restart: None,
            warnings: vec![],
        }
    }

    #[test]
    fn median_and_ratio() {
        let report = report();
        let insert = &report.results[0];
        assert_eq!(insert.targets[0].median, 2000.0);
        assert_eq!(insert.ratio(1), Some(0.25));
        assert_eq!(insert.goal_met(1), Some(true));
        assert_eq!(report.results[1].goal_met(1), Some(false));
        assert!(!report.all_goals_met());
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        // Native: (3000 - 1000) / 2000; mount: (600 - 400) / 500.
        assert_eq!(insert.spread(), 1.0);
    }

    #[test]
    fn display_renders_a_table() {
        let text = report().to_string();
        assert!(text.contains("native ops/s"), "{text}");
        assert!(text.contains("mount/native"), "{text}");
        assert!(text.contains("insert, WAL, synchronous=NORMAL"), "{text}");
        assert!(text.contains("0.25"), "{text}");
        assert!(text.contains("NO"), "{text}");
        assert!(text.contains("all goals met: no"), "{text}");
        // 2000 inserts/s natively is 500 µs each; 8 requests (6 of them lock
        // calls, served by ltxfs) add 8 × 10 µs.
        assert!(text.contains("FUSE best"), "{text}");
        assert!(text.contains(&format!("{:.2}", 500.0 / 580.0)), "{text}");
        assert!(text.contains("null FUSE filesystem 11.0 us"), "{text}");
    }
}
