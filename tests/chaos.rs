//! The fault suite: three candidates elect their primary with a real etcd,
//! with `replication.synchronous: true`, under a workload of writer processes
//! (each retries on whichever node accepts its write; one that dies of SIGBUS
//! when a killed node's mount vanishes under SQLite's mapped `-shm` is replaced)
//! and reader processes (`sqlite3` on every node), while faults hit one node at a time at random
//! moments: SIGKILL and restart, SIGSTOP and SIGCONT, a partition from etcd and
//! from the other nodes (TCP proxies), an etcd restart, and a full disk on the
//! node whose data dir is a small tmpfs. After each fault heals, the cluster
//! must agree on one primary and converge before the next.
//!
//! At the end: exactly one primary, every node's `-pos` equal, `PRAGMA
//! integrity_check` ok on every node, the history check clean, and every row a
//! writer saw acknowledged present. The seed is printed, and
//! `LTXFS_CHAOS_SEED` replays it; `LTXFS_CHAOS_SECONDS` (default 60) sets how
//! long faults are injected (`scripts/chaos` runs it longer).
//!
//! A binary of its own, not a module of `tests/it`: its minute of faults runs
//! alone, as `scripts/chaos` runs it for longer, rather than beside other tests
//! whose timing it would disturb and which would disturb its recovery deadlines.

// The fault suite uses part of the harness `tests/it` shares.
#[allow(dead_code)]
#[path = "it/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "it/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::OpenFlags;

use common::*;
use support::cluster::*;
use support::etcd;
use support::tcp_proxy::TcpProxy;

/// The lease TTL the nodes use.
const TTL: Duration = Duration::from_secs(2);
/// The data dir of the last node is a tmpfs of this size, filled by the
/// full-disk fault.
const SMALL_DISK_BYTES: u64 = 256 * 1024 * 1024;
/// Writer threads.
const WRITERS: i64 = 2;
/// Rows of writer `w` are `w * WRITER_SPAN + n`.
const WRITER_SPAN: i64 = 1_000_000_000;
/// How long after a fault healed the cluster may take to agree and converge.
const RECOVERY: Duration = Duration::from_secs(60);

/// A small deterministic generator (xorshift64*): the schedule replays from
/// its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// One node and the proxies everything it exchanges with the others goes
/// through.
struct Node {
    name: &'static str,
    mount: Mount,
    etcd_proxy: TcpProxy,
    http_proxy: TcpProxy,
}

fn start_node(name: &'static str, etcd: &etcd::Etcd, small_disk: bool) -> Node {
    let etcd_proxy = TcpProxy::start(loopback_address(etcd.url()));
    let http = free_loopback_address();
    let http_proxy = TcpProxy::start(http);
    let extra_yaml = format!(
        "lease:\n  candidate: true\n  hostname: {name}\n  reconnect-delay: 300ms\n  \
         advertise-url: \"{}\"\n  type: etcd\n  etcd:\n    endpoints: [\"{}\"]\n    \
         key: \"ltxfs-chaos/primary\"\n    ttl: {}s\nhttp:\n  addr: \"{http}\"\n\
         replication:\n  synchronous: true\n",
        http_proxy.url(),
        etcd_proxy.url(),
        TTL.as_secs(),
    );
    let mount = Mount::start(MountOptions {
        extra_yaml,
        deadline: Duration::from_secs(1_800),
        data_dir: if small_disk {
            DataDir::Tmpfs(SMALL_DISK_BYTES)
        } else {
            DataDir::Plain
        },
    });
    Node {
        name,
        mount,
        etcd_proxy,
        http_proxy,
    }
}

/// What the writers saw acknowledged (each row with the node that acknowledged
/// it and when), how often a write was refused, and how often a writer process
/// died (SIGBUS: a node's mount vanished under SQLite's mapped `-shm`).
struct Acknowledged {
    rows: Mutex<BTreeMap<i64, (usize, Duration)>>,
    refused: AtomicU64,
    writers_died: AtomicU64,
    started: Instant,
}

/// Runs writer processes ([`worker_chaos_writer`]) one after another until
/// `stop`, each starting past every row the last one tried, and records what
/// they report. `pid` is the running writer's, for the caller to stop it.
fn supervise_writer(
    writer: i64,
    dbs: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    acked: Arc<Acknowledged>,
    pid: Arc<AtomicU64>,
) {
    use std::io::BufRead;
    let mut next = writer * WRITER_SPAN;
    let mut node = 0;
    while !stop.load(Ordering::Acquire) {
        let job = Job::new()
            .with(
                "dbs",
                dbs.iter()
                    .map(|db| db.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("\t"),
            )
            .with("first", next)
            .with("node", node);
        let mut child = spawn_worker(&worker!(worker_chaos_writer), &job);
        pid.store(u64::from(child.id()), Ordering::Release);
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        for line in stdout.lines().map_while(Result::ok) {
            let mut words = line
                .split_whitespace()
                .skip_while(|word| !matches!(*word, "attempt" | "acked" | "refused"));
            let (Some(what), Some(seq)) = (words.next(), words.next()) else {
                continue;
            };
            let seq: i64 = seq.parse().expect("a row number");
            match what {
                // The row may or may not be committed: never reuse it.
                "attempt" => next = seq + 1,
                "acked" => {
                    node = words.next().and_then(|n| n.parse().ok()).expect("a node");
                    let at = acked.started.elapsed();
                    acked.rows.lock().unwrap().insert(seq, (node, at));
                }
                _ => {
                    acked.refused.fetch_add(1, Ordering::Relaxed);
                    node = (node + 1) % dbs.len();
                }
            }
        }
        let status = child.wait().expect("wait for the writer");
        pid.store(0, Ordering::Release);
        if !stop.load(Ordering::Acquire) {
            assert!(
                status.signal() == Some(libc::SIGBUS),
                "a writer process ended with {status}"
            );
            acked.writers_died.fetch_add(1, Ordering::Relaxed);
            node = (node + 1) % dbs.len();
        }
    }
}

/// A writer process: inserts rows from `first` on whichever node accepts them,
/// one transaction each, saying `attempt N` before and `acked N NODE` or
/// `refused N` after each; a refused or failed write moves on to the next node.
#[test]
fn worker_chaos_writer() {
    let Some(job) = worker_job() else { return };
    let dbs: Vec<PathBuf> = job.get("dbs").split('\t').map(PathBuf::from).collect();
    let mut next: i64 = job.parse("first");
    let mut node: usize = job.parse("node");
    loop {
        println!("attempt {next}");
        // Without SQLITE_OPEN_CREATE: while a killed node's mount is gone, a
        // create would put a new database in the bare mount point, which
        // ltxfs then refuses to mount over.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let attempt = rusqlite::Connection::open_with_flags(&dbs[node], flags).and_then(|conn| {
            conn.busy_timeout(Duration::from_secs(2))?;
            conn.execute("INSERT INTO t(seq) VALUES (?1)", [next])
        });
        match attempt {
            Ok(_) => println!("acked {next} {node}"),
            Err(_) => {
                println!("refused {next}");
                node = (node + 1) % dbs.len();
                thread::sleep(Duration::from_millis(20));
            }
        }
        next += 1;
    }
}

/// Reads with a fresh `sqlite3` process on each node in turn until `stop`;
/// counts reads that answered and reads that failed.
fn read(
    dbs: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let mut node = 0;
    while !stop.load(Ordering::Acquire) {
        let output = std::process::Command::new("sqlite3")
            .arg("-readonly")
            .arg(&dbs[node])
            .arg("SELECT count(*) FROM t")
            .output();
        match output {
            Ok(output) if output.status.success() => answered.fetch_add(1, Ordering::Relaxed),
            _ => failed.fetch_add(1, Ordering::Relaxed),
        };
        node = (node + 1) % dbs.len();
        thread::sleep(Duration::from_millis(50));
    }
}

/// The faults, one node (or etcd) at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Stop,
    Partition,
    EtcdRestart,
    FullDisk,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::Stop,
    Fault::Partition,
    Fault::EtcdRestart,
    Fault::FullDisk,
];

fn mounts(nodes: &[Node]) -> Vec<(&str, &Mount)> {
    nodes.iter().map(|node| (node.name, &node.mount)).collect()
}

/// Why the node refuses a write transaction now (rolled back), if it does.
/// Waits for a writer holding the write lock, so that only a refusal counts.
fn write_refused(mount: &Mount) -> Option<String> {
    let attempt = rusqlite::Connection::open_with_flags(
        mount.db_path(DB),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|conn| {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO t(seq) VALUES(-7); ROLLBACK;")
    });
    attempt.err().map(|error| error.to_string())
}

/// Waits until the nodes agree on a primary that accepts writes and every
/// node has caught up with it; the primary's index.
fn recover(nodes: &[Node]) -> usize {
    let named = mounts(nodes);
    let started = Instant::now();
    let mut last_refusal = None;
    loop {
        if let Some(primary) = agreed_primary(&named) {
            let index = nodes.iter().position(|node| node.name == primary).unwrap();
            last_refusal =
                write_refused(&nodes[index].mount).map(|why| format!("{primary}: {why}"));
            if last_refusal.is_none() {
                let others: Vec<&Mount> = nodes
                    .iter()
                    .filter(|node| node.name != primary)
                    .map(|node| &node.mount)
                    .collect();
                wait_caught_up(&nodes[index].mount, &others);
                return index;
            }
        }
        assert!(
            started.elapsed() < RECOVERY,
            "the cluster did not recover within {RECOVERY:?} (last write refused: {last_refusal:?}); \
             {}\nthreads:\n{}",
            logs(nodes),
            nodes
                .iter()
                .map(|node| format!(
                    "{}:\n{}",
                    node.name,
                    node.mount.pid().map(threads).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("\n")
                + "\nthis test's threads:\n"
                + &threads(std::process::id())
        );
        thread::sleep(POLL);
    }
}

/// Where each thread of process `pid` waits in the kernel (its name, wait
/// channel and stack), to tell a stuck request from a slow one.
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    tasks
        .flatten()
        .map(|task| {
            let read =
                |file: &str| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            format!(
                "thread {} ({}) waits in {}:\n{}",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            )
        })
        .collect()
}

#[test]
fn the_cluster_survives_random_faults_one_node_at_a_time() {
    let seed = std::env::var("LTXFS_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let seconds: u64 = std::env::var("LTXFS_CHAOS_SECONDS")
        .ok()
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or(60);
    report(format!(
        "chaos: seed {seed} (LTXFS_CHAOS_SEED replays it), {seconds} s of faults"
    ));
    let mut rng = Rng::new(seed);

    let mut etcd = etcd::start();
    let mut nodes = vec![start_node("node-a", &etcd, false)];
    wait_until_primary(&nodes[0].mount);
    wait_until("node-a to accept the schema", CLUSTER_TIMEOUT, || {
        rusqlite::Connection::open(nodes[0].mount.db_path(DB)).is_ok_and(|conn| {
            conn.busy_timeout(BUSY_TIMEOUT).is_ok()
                && conn
                    .execute_batch(
                        "PRAGMA journal_mode=wal; CREATE TABLE IF NOT EXISTS t(seq INTEGER PRIMARY KEY)",
                    )
                    .is_ok()
        })
    });
    nodes.push(start_node("node-b", &etcd, false));
    nodes.push(start_node("node-c", &etcd, true));
    recover(&nodes);

    let dbs: Vec<PathBuf> = nodes.iter().map(|node| node.mount.db_path(DB)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Acknowledged {
        rows: Mutex::default(),
        refused: AtomicU64::new(0),
        writers_died: AtomicU64::new(0),
        started: Instant::now(),
    });
    let writer_pids: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::default()).collect();
    let (answered, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (dbs, stop, acked) = (dbs.clone(), stop.clone(), acked.clone());
            let pid = writer_pids[writer as usize].clone();
            thread::spawn(move || supervise_writer(writer, dbs, stop, acked, pid))
        })
        .collect();
    workers.push(thread::spawn({
        let (dbs, stop) = (dbs.clone(), stop.clone());
        let (answered, failed) = (answered.clone(), failed.clone());
        move || read(dbs, stop, answered, failed)
    }));

    let mut injected: Vec<Fault> = Vec::new();
    let chaos_started = acked.started;
    while chaos_started.elapsed() < Duration::from_secs(seconds) {
        thread::sleep(rng.millis(200, 1_500));
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let victim = match fault {
            Fault::FullDisk => 2,
            _ => rng.below(nodes.len() as u64) as usize,
        };
        let hold = rng.millis(500, 3_000);
        let node = &mut nodes[victim];
        report(format!(
            "chaos: {:>6.1} s: {fault:?} on {} for {hold:?}",
            chaos_started.elapsed().as_secs_f64(),
            if fault == Fault::EtcdRestart {
                "etcd"
            } else {
                node.name
            }
        ));
        match fault {
            Fault::Kill => {
                node.mount.kill9();
                thread::sleep(hold);
                node.mount.restart();
            }
            Fault::Stop => {
                let pid = node.mount.pid().expect("running");
                send_signal(pid, libc::SIGSTOP);
                thread::sleep(hold);
                send_signal(pid, libc::SIGCONT);
            }
            Fault::Partition => {
                node.etcd_proxy.partition();
                node.http_proxy.partition();
                thread::sleep(hold);
                node.etcd_proxy.heal();
                node.http_proxy.heal();
            }
            Fault::EtcdRestart => {
                etcd.restart(hold).expect("restart etcd");
            }
            Fault::FullDisk => {
                let filler = node.mount.data_dir().join("filler");
                fill(&filler);
                thread::sleep(hold);
                std::fs::remove_file(&filler).expect("remove the filler");
            }
        }
        injected.push(fault);
        recover(&nodes);
    }
    stop.store(true, Ordering::Release);
    while !workers.iter().all(thread::JoinHandle::is_finished) {
        for pid in &writer_pids {
            match pid.load(Ordering::Acquire) {
                0 => {}
                pid => send_signal(pid as u32, libc::SIGKILL),
            }
        }
        thread::sleep(POLL);
    }
    for worker in workers {
        worker.join().expect("a workload thread panicked");
    }

    let primary = recover(&nodes);
    let named = mounts(&nodes);
    assert_eq!(agreed_primary(&named).as_deref(), Some(nodes[primary].name));
    let others: Vec<&Mount> = (0..nodes.len())
        .filter(|index| *index != primary)
        .map(|index| &nodes[index].mount)
        .collect();
    wait_converged(&nodes[primary].mount, &others);
    for node in &nodes {
        let conn = rusqlite::Connection::open_with_flags(
            node.mount.db_path(DB),
            OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open");
        conn.busy_timeout(BUSY_TIMEOUT).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok", "{}; {}", node.name, logs(&nodes));
    }
    check_history(&named);
    let present = seqs(&nodes[primary].mount);
    let acked_rows = acked.rows.lock().unwrap();
    let lost: Vec<String> = acked_rows
        .iter()
        .filter(|(row, _)| !present.contains(row))
        .map(|(row, (node, at))| {
            format!("{row} ({} at {:.3} s)", nodes[*node].name, at.as_secs_f64())
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for fault in &injected {
        *counts.entry(format!("{fault:?}")).or_insert(0) += 1;
    }
    report(format!(
        "chaos: seed {seed}: {} faults ({counts:?}); {} writes acknowledged, {} refused, \
         {} writer processes killed by SIGBUS; {} reads answered, {} failed; \
         acknowledged rows missing: {}",
        injected.len(),
        acked_rows.len(),
        acked.refused.load(Ordering::Relaxed),
        acked.writers_died.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        lost.len()
    ));
    assert!(
        lost.is_empty(),
        "acknowledged rows are missing: {}; {}",
        lost.join(", "),
        logs(&nodes)
    );
    assert!(!acked_rows.is_empty(), "no write was acknowledged");
}

/// Every node's log, kept in a directory named in the answer (CI shows only
/// the end of a failing test's output) and following it.
fn logs(nodes: &[Node]) -> String {
    let dir = std::env::temp_dir().join(format!("ltxfs-chaos-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the log directory");
    let mut text = format!("the nodes' logs are in {}\n", dir.display());
    for node in nodes {
        let log = node.mount.stderr_text();
        std::fs::write(dir.join(format!("{}.log", node.name)), &log).expect("keep a log");
        text.push_str(&format!("{} log:\n{log}\n", node.name));
    }
    text
}
