//! What backups cost commit throughput: the `ltxfs bench` single-row insert
//! workload (WAL, `synchronous=NORMAL`, as fast as it goes) on a mount with
//! backups against one without, side by side.
//!
//! Both mounts are separate `ltxfs mount` processes on the same disk with the
//! same config but for `backup:`. As in `ltxfs bench`, each warms up, then
//! they take turns in rounds (the order alternating) and the report gives
//! each one's median. Each round is preceded by [`LEAD_IN`] of the same
//! writes, not counted: the uploader then has work throughout the measured
//! round, as it has in a steady state, instead of its first sync interval.
//! After every round on the mount with backups the benchmark waits until the
//! bucket holds that round's last TXID, so that no upload spills into the
//! other mount's round; how long that took is reported too. So is the CPU
//! time (`/proc/<pid>/stat`, user + system) the mount, moto and the benchmark
//! used per transaction over each mount's lead-ins, rounds and catching up,
//! which shows where the time goes: moto's share is what a real object store
//! would spend elsewhere.

use std::time::Duration;

use tokio::runtime::Runtime;

use super::{BackupBenchError, LEAD_IN, require_position, wait_backed_up};
use crate::cpu::{CpuMeter, Process};
use crate::mount::MountGuard;
use crate::workload::{ReadDatabase, Session};
use crate::{CpuUse, Plan, Target, TargetResult, Workload, WorkloadResult};
use ltxfs::backup::Destination;
use test_support::Moto;

/// The workload measured.
const WORKLOAD: Workload = Workload::InsertWalNormal;
/// How long the bucket may take to catch up after a round.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// The goal of issue 18: backups cost at most 5 % of commit throughput.
pub const THROUGHPUT_GOAL: f64 = 0.95;

/// The figures of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupThroughput {
    /// Transactions per second without backups (target 0, the baseline) and
    /// with them (target 1).
    pub result: WorkloadResult,
    /// After each round with backups, how long the bucket took to hold its
    /// last TXID.
    pub catch_up: Vec<Duration>,
    /// Per target, the CPU time per transaction of the mount, moto and the
    /// benchmark (SQLite's side) over that target's lead-ins, rounds and
    /// catching up.
    pub cpu: Vec<Vec<CpuUse>>,
}

/// Runs the rounds on `plain` and `backed` (which backs up to `destination`
/// on `moto`).
pub(super) fn compare(
    plain: &MountGuard,
    backed: &MountGuard,
    moto: &Moto,
    destination: &Destination,
    runtime: &Runtime,
    plan: &Plan,
) -> Result<BackupThroughput, BackupBenchError> {
    let mounts = [plain, backed];
    let targets: Vec<Target> = ["no backup", "backup"]
        .into_iter()
        .zip(mounts)
        .map(|(name, mount)| Target {
            name: name.to_string(),
            dir: mount.mount_point().to_path_buf(),
        })
        .collect();
    // The insert workload reads nothing, so it needs no read database.
    let no_read_db = ReadDatabase { rows: 0, bytes: 0 };
    let mut sessions = targets
        .iter()
        .map(|target| Session::open(WORKLOAD, target, &no_read_db))
        .collect::<Result<Vec<_>, _>>()?;
    let catch_up = || -> Result<Duration, BackupBenchError> {
        let (txid, _) = require_position(backed, WORKLOAD.database_name())?;
        wait_backed_up(
            runtime,
            destination,
            WORKLOAD.database_name(),
            txid,
            CATCH_UP_TIMEOUT,
        )
    };
    catch_up()?;
    for session in &mut sessions {
        session.run_for(plan.warm_up)?;
    }
    catch_up()?;

    let mut meters: Vec<CpuMeter> = mounts
        .iter()
        .map(|mount| {
            let processes = [
                ("ltxfs mount", mount.pid()),
                ("moto", Some(moto.pid())),
                ("benchmark", Some(std::process::id())),
            ];
            CpuMeter::new(
                processes
                    .into_iter()
                    .filter_map(|(name, pid)| {
                        pid.map(|pid| Process {
                            name: name.to_string(),
                            pid,
                        })
                    })
                    .collect(),
            )
        })
        .collect();
    let mut rounds = vec![Vec::with_capacity(plan.rounds); targets.len()];
    let mut caught_up = Vec::with_capacity(plan.rounds);
    let mut transactions = vec![0.0; targets.len()];
    for round in 0..plan.rounds {
        // Alternate the order so that neither mount always runs first.
        for turn in 0..targets.len() {
            let index = (turn + round) % targets.len();
            meters[index].start();
            let lead_in = sessions[index].run_for(LEAD_IN)?;
            let rate = sessions[index].run_for(plan.round)?;
            rounds[index].push(rate);
            transactions[index] +=
                lead_in * LEAD_IN.as_secs_f64() + rate * plan.round.as_secs_f64();
            if index == 1 {
                caught_up.push(catch_up()?);
            }
            meters[index].stop();
        }
    }
    let cpu = meters
        .iter()
        .zip(&transactions)
        .map(|(meter, transactions)| meter.per_transaction(*transactions))
        .collect();
    Ok(BackupThroughput {
        result: WorkloadResult::new(
            WORKLOAD,
            targets
                .iter()
                .zip(rounds)
                .map(|(target, rounds)| TargetResult::new(&target.name, rounds))
                .collect(),
        ),
        catch_up: caught_up,
        cpu,
    })
}
