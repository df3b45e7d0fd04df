//! What replicas cost the primary: single-row INSERT transactions per second (WAL,
//! `synchronous=NORMAL`, the `ltxfs bench` workload) on a primary that two
//! replicas follow, against one that no replica follows, side by side.
//!
//! Both primaries are separate `ltxfs mount` processes on the same disk. As in
//! `ltxfs bench`, each warms up, then they take turns in rounds (the order
//! alternating), and the report gives each one's median. After every round on the
//! followed primary the benchmark waits until both replicas have caught up, so that
//! a backlog never spills into the other primary's round; how long that took is
//! reported too. So is the CPU time each process used per transaction, over the
//! rounds and catching up after them, which shows where the time goes.
//!
//! On a machine of two CPUs or more, a second set of rounds compares the lone
//! primary with the first followed one again, with the application's side (the
//! benchmark's SQLite thread and the primaries' FUSE workers) on one CPU and
//! replication on the others (see `placement`): what the primary loses to
//! replication itself, apart from sharing CPUs with it.

use std::time::Duration;

use super::ReplicationBenchError;
use super::cluster::{self, Node};
use super::placement::Placement;
use crate::cpu::{CpuMeter, CpuUse, Process};
use crate::workload::{ReadDatabase, Session};
use crate::{Plan, Target, TargetResult, Workload, WorkloadResult};

/// The workload measured.
const WORKLOAD: Workload = Workload::InsertWalNormal;
/// How long the replicas may take to catch up after a round.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The figures of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputResult {
    /// Transactions per second of the primary alone (target 0, the baseline) and
    /// of each followed one (targets 1 and on).
    pub result: WorkloadResult,
    /// After each round on a followed primary, how long its replicas took to
    /// reach its position.
    pub catch_up: Vec<Duration>,
    /// Per target, the CPU time per transaction of each process involved: the
    /// primary, its replicas, and the benchmark itself (SQLite's side).
    pub cpu: Vec<Vec<CpuUse>>,
    /// The lone primary (target 0) and the first followed one (target 1) again,
    /// with the application's side and replication on CPUs of their own; `None`
    /// on a machine of one CPU.
    pub placed: Option<WorkloadResult>,
}

/// A primary that replicas follow, as the comparison measures it.
pub(super) struct Followed<'a> {
    /// How the report names it.
    pub name: String,
    /// The primary.
    pub primary: &'a Node,
    /// Its replicas.
    pub replicas: Vec<&'a Node>,
}

/// Runs the rounds on `alone` and on each of `followed`.
pub(super) fn compare(
    alone: &Node,
    followed: &[Followed<'_>],
    plan: &Plan,
) -> Result<ThroughputResult, ReplicationBenchError> {
    let targets: Vec<Target> = std::iter::once(Target {
        name: "no replicas".to_string(),
        dir: alone.mount_point().to_path_buf(),
    })
    .chain(followed.iter().map(|followed| Target {
        name: followed.name.clone(),
        dir: followed.primary.mount_point().to_path_buf(),
    }))
    .collect();
    // The insert workload reads nothing, so it needs no read database.
    let no_read_db = ReadDatabase { rows: 0, bytes: 0 };
    let mut sessions = targets
        .iter()
        .map(|target| Session::open(WORKLOAD, target, &no_read_db))
        .collect::<Result<Vec<_>, _>>()?;
    for followed in followed {
        converge(followed)?;
    }
    for session in &mut sessions {
        session.run_for(plan.warm_up)?;
    }
    for followed in followed {
        converge(followed)?;
    }

    let benchmark = Process {
        name: "benchmark".to_string(),
        pid: std::process::id(),
    };
    let mut meters: Vec<CpuMeter> = std::iter::once(CpuMeter::new(
        alone
            .process()
            .into_iter()
            .chain([benchmark.clone()])
            .collect(),
    ))
    .chain(followed.iter().map(|followed| {
        CpuMeter::new(
            std::iter::once(followed.primary)
                .chain(followed.replicas.iter().copied())
                .filter_map(Node::process)
                .chain([benchmark.clone()])
                .collect(),
        )
    }))
    .collect();
    let mut rounds = vec![Vec::with_capacity(plan.rounds); targets.len()];
    let mut catch_up = Vec::with_capacity(plan.rounds * followed.len());
    for round in 0..plan.rounds {
        // Rotate the order so that no primary always runs first.
        for turn in 0..targets.len() {
            let index = (turn + round) % targets.len();
            meters[index].start();
            rounds[index].push(sessions[index].run_for(plan.round)?);
            if let Some(followed) = index.checked_sub(1).map(|at| &followed[at]) {
                catch_up.push(converge(followed)?);
            }
            meters[index].stop();
        }
    }
    let placed = match followed.first() {
        Some(first) => placed_rounds(alone, first, &targets[..2], &mut sessions[..2], plan)?,
        None => None,
    };
    let cpu = meters
        .iter()
        .zip(&rounds)
        .map(|(meter, rates)| {
            let transactions: f64 = rates
                .iter()
                .map(|rate| rate * plan.round.as_secs_f64())
                .sum();
            meter.per_transaction(transactions)
        })
        .collect();
    Ok(ThroughputResult {
        result: workload_result(&targets, rounds),
        catch_up,
        cpu,
        placed,
    })
}

/// Rounds taking turns on `alone` and `followed` (`targets` and `sessions`, in
/// that order) with the application's side on one CPU and replication on the
/// others; `None` on a machine of one CPU.
fn placed_rounds(
    alone: &Node,
    followed: &Followed<'_>,
    targets: &[Target],
    sessions: &mut [Session],
    plan: &Plan,
) -> Result<Option<WorkloadResult>, ReplicationBenchError> {
    let primaries: Vec<Process> = [alone, followed.primary]
        .into_iter()
        .filter_map(Node::process)
        .collect();
    let replicas: Vec<Process> = followed
        .replicas
        .iter()
        .copied()
        .filter_map(Node::process)
        .collect();
    let Some(placement) =
        Placement::apply(&primaries, &replicas).map_err(ReplicationBenchError::Placement)?
    else {
        return Ok(None);
    };
    let mut rounds = vec![Vec::with_capacity(plan.rounds); targets.len()];
    for session in sessions.iter_mut() {
        session.run_for(plan.warm_up)?;
    }
    converge(followed)?;
    for round in 0..plan.rounds {
        for turn in 0..targets.len() {
            let index = (turn + round) % targets.len();
            rounds[index].push(sessions[index].run_for(plan.round)?);
            if index == 1 {
                converge(followed)?;
            }
        }
    }
    drop(placement);
    Ok(Some(workload_result(targets, rounds)))
}

/// Waits until the replicas of `followed` have its position; returns how long
/// that took.
fn converge(followed: &Followed<'_>) -> Result<Duration, ReplicationBenchError> {
    cluster::wait_converged(
        followed.primary,
        &followed.replicas,
        WORKLOAD.database_name(),
        CONVERGE_TIMEOUT,
    )
}

/// Each target's rates in its rounds, as the workload's result.
fn workload_result(targets: &[Target], rounds: Vec<Vec<f64>>) -> WorkloadResult {
    WorkloadResult::new(
        WORKLOAD,
        targets
            .iter()
            .zip(rounds)
            .map(|(target, rounds)| TargetResult::new(&target.name, rounds))
            .collect(),
    )
}
