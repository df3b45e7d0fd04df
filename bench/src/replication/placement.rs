//! Where the threads of the throughput comparison run in its second set of
//! rounds: the primaries' FUSE workers and the benchmark's SQLite thread on the
//! first CPU, and every other thread (the primaries' async threads and blocking
//! pools, every thread of every replica) on the others. The application and the
//! FUSE requests it makes then share no CPU with replication, as on a primary
//! whose replicas run on other machines and whose streams run on other cores.
//!
//! Invariant: a [`Placement`] puts every thread it moved back on every CPU when
//! it is dropped, so the rounds after it run unplaced. Threads that start while
//! it is in force inherit the CPUs of the thread that starts them (tokio starts
//! blocking-pool threads from its async threads), so they land with their kind.

use std::io;
use std::path::Path;

use crate::cpu::Process;

/// The CPU of the application's side: the benchmark's SQLite thread and the
/// primaries' FUSE workers.
const WORKLOAD_CPU: usize = 0;

/// How the FUSE library names the threads that serve FUSE requests.
const FUSE_THREAD_PREFIX: &str = "fuser";

/// Threads moved to chosen CPUs until dropped.
#[derive(Debug)]
pub(super) struct Placement {
    /// The id of every thread moved.
    moved: Vec<u32>,
    /// Every CPU this process could use before.
    all: libc::cpu_set_t,
}

impl Placement {
    /// Places the threads of `primaries` (FUSE workers on the workload CPU, the
    /// rest on the others), every thread of `replicas` on the others, and the
    /// calling thread on the workload CPU. `None` on a machine of one CPU.
    pub(super) fn apply(
        primaries: &[Process],
        replicas: &[Process],
    ) -> io::Result<Option<Placement>> {
        let all = affinity_of(0)?;
        // SAFETY: CPU_COUNT only reads the set.
        let cpus = unsafe { libc::CPU_COUNT(&all) };
        // SAFETY: CPU_ISSET only reads the set.
        if cpus < 2 || !unsafe { libc::CPU_ISSET(WORKLOAD_CPU, &all) } {
            return Ok(None);
        }
        let workload = only(WORKLOAD_CPU);
        let mut others = all;
        // SAFETY: CPU_CLR only writes within the set.
        unsafe { libc::CPU_CLR(WORKLOAD_CPU, &mut others) };
        let mut placement = Placement {
            moved: Vec::new(),
            all,
        };
        for process in primaries {
            for (thread, name) in threads(process.pid)? {
                let cpus = if name.starts_with(FUSE_THREAD_PREFIX) {
                    &workload
                } else {
                    &others
                };
                placement.pin(process.pid, thread, cpus)?;
            }
        }
        for process in replicas {
            for (thread, _) in threads(process.pid)? {
                placement.pin(process.pid, thread, &others)?;
            }
        }
        placement.pin(std::process::id(), 0, &workload)?;
        Ok(Some(placement))
    }

    fn pin(&mut self, pid: u32, thread: u32, cpus: &libc::cpu_set_t) -> io::Result<()> {
        match set_affinity(thread, cpus) {
            Ok(()) => {
                self.moved.push(thread);
                Ok(())
            }
            // A thread that ended meanwhile needs no place.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(error) => Err(io::Error::new(
                error.kind(),
                format!("pin thread {thread} of process {pid}: {error}"),
            )),
        }
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        for &thread in &self.moved {
            // A thread that ended since needs nothing; the others cannot fail
            // to get back CPUs they had.
            let _ = set_affinity(thread, &self.all);
        }
    }
}

/// The threads of process `pid`, as (thread id, name).
fn threads(pid: u32) -> io::Result<Vec<(u32, String)>> {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(|error| io::Error::new(error.kind(), format!("list {}: {error}", dir.display())))?
    {
        let entry = entry?;
        let Some(thread) = entry.file_name().to_str().and_then(|id| id.parse().ok()) else {
            continue;
        };
        // A thread that ended between listing and reading is skipped.
        if let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) {
            threads.push((thread, name.trim_end().to_string()));
        }
    }
    Ok(threads)
}

/// A set of the one CPU `cpu`.
fn only(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only writes within the set (`cpu` is below its size, as
    // the caller checked that the set of every CPU holds it).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set
}

/// The CPUs thread `thread` may run on (0: the calling thread).
fn affinity_of(thread: u32) -> io::Result<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let result = unsafe {
        libc::sched_getaffinity(
            thread as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(set)
}

/// Lets thread `thread` (0: the calling thread) run only on `cpus`.
fn set_affinity(thread: u32, cpus: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `cpus` is a valid cpu_set_t of the size passed.
    let result = unsafe {
        libc::sched_setaffinity(
            thread as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            cpus,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_moves_the_calling_thread_to_the_workload_cpu_and_back() {
        let before = affinity_of(0).unwrap();
        // With no processes, only the calling thread moves: the test runner's
        // other threads are left alone.
        let Some(placement) = Placement::apply(&[], &[]).unwrap() else {
            // SAFETY: CPU_COUNT only reads the set.
            assert!(unsafe { libc::CPU_COUNT(&before) } < 2);
            return;
        };
        let during = affinity_of(0).unwrap();
        // SAFETY: CPU_COUNT and CPU_ISSET only read the set.
        unsafe {
            assert_eq!(libc::CPU_COUNT(&during), 1);
            assert!(libc::CPU_ISSET(WORKLOAD_CPU, &during));
        }
        drop(placement);
        let after = affinity_of(0).unwrap();
        // SAFETY: CPU_EQUAL only reads the sets.
        assert!(unsafe { libc::CPU_EQUAL(&before, &after) });
    }

    #[test]
    fn threads_are_listed_with_their_names() {
        std::thread::Builder::new()
            .name("placement-test".to_string())
            .spawn(|| {
                let listed = threads(std::process::id()).unwrap();
                assert!(listed.iter().any(|(_, name)| name == "placement-test"));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
