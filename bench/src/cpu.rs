//! CPU time used by processes, from `/proc/<pid>/stat`, to show where the time of
//! a transaction goes: ltxfs processes, a storage server, or the benchmark's own
//! SQLite. Shared by `ltxfs bench replication` and `ltxfs bench backup`.

use std::time::Duration;

/// One process whose CPU time is measured.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    /// The name shown in the report.
    pub(crate) name: String,
    /// The process id.
    pub(crate) pid: u32,
}

/// The CPU time a process used per transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuUse {
    /// The process's name, e.g. `primary` or `benchmark`.
    pub process: String,
    /// User plus system time divided by the transactions committed.
    pub per_transaction: Duration,
}

/// Sums the CPU time processes use over several intervals.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    processes: Vec<Process>,
    /// Per process: the CPU time at the start of the current interval, if it
    /// could be read, and the total over the intervals so far.
    readings: Vec<(Option<Duration>, Duration)>,
}

impl CpuMeter {
    pub(crate) fn new(processes: Vec<Process>) -> CpuMeter {
        let readings = vec![(None, Duration::ZERO); processes.len()];
        CpuMeter {
            processes,
            readings,
        }
    }

    /// Starts an interval.
    pub(crate) fn start(&mut self) {
        for (process, reading) in self.processes.iter().zip(&mut self.readings) {
            reading.0 = cpu_time(process.pid);
        }
    }

    /// Ends the interval that [`CpuMeter::start`] began and adds it to the totals.
    pub(crate) fn stop(&mut self) {
        for (process, reading) in self.processes.iter().zip(&mut self.readings) {
            if let (Some(start), Some(end)) = (reading.0.take(), cpu_time(process.pid)) {
                reading.1 += end.saturating_sub(start);
            }
        }
    }

    /// Each process's total CPU time divided by `transactions`.
    pub(crate) fn per_transaction(&self, transactions: f64) -> Vec<CpuUse> {
        self.processes
            .iter()
            .zip(&self.readings)
            .map(|(process, (_, total))| CpuUse {
                process: process.name.clone(),
                per_transaction: if transactions > 0.0 {
                    total.div_f64(transactions)
                } else {
                    Duration::ZERO
                },
            })
            .collect()
    }
}

/// The user plus system time of every thread of process `pid` so far, or `None`
/// if it cannot be read.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: `sysconf` has no memory-safety preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_cpu_ticks(&stat).and_then(|ticks| {
        let ticks_per_second = u64::try_from(ticks_per_second).ok().filter(|&t| t > 0)?;
        Some(Duration::from_secs_f64(
            ticks as f64 / ticks_per_second as f64,
        ))
    })
}

/// The sum of `utime` and `stime` (fields 14 and 15 of proc_pid_stat(5)), in
/// clock ticks. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted from its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_counted_after_the_command_name() {
        let stat = "4242 (ltx fs) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 125 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(375));
        assert_eq!(parse_cpu_ticks("4242 (ltxfs) S 1"), None);
    }

    #[test]
    fn this_process_uses_some_cpu() {
        let mut meter = CpuMeter::new(vec![Process {
            name: "benchmark".to_string(),
            pid: std::process::id(),
        }]);
        meter.start();
        let started = std::time::Instant::now();
        let mut spin = 0_u64;
        while started.elapsed() < Duration::from_millis(200) {
            spin = spin.wrapping_add(1);
        }
        meter.stop();
        let used = meter.per_transaction(1.0);
        assert_eq!(used[0].process, "benchmark");
        assert!(spin > 0 && used[0].per_transaction > Duration::ZERO);
    }
}
