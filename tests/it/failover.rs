//! Failover between separate `ltxfs mount` processes electing their primary with a
//! real etcd on loopback: the primary is SIGKILLed during writes, a candidate
//! takes over, and the old primary rejoins as a replica; a primary stopped with
//! SIGTERM, or asked by `ltxfs promote`, hands its role to a candidate without
//! losing a write it acknowledged.
//!
//! Clients are worker processes (see `tests/it/common.rs`); the `worker_*` test
//! does nothing in a normal run.

// Shared with the partition test, which uses more of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::cluster::*;
use crate::support::{etcd, fake_consul, history};
use rusqlite::{OpenFlags, params};

/// The lease TTL the nodes use (etcd's minimum with the test etcd's timings is 1 s).
const TTL: Duration = Duration::from_secs(2);
const TAKEOVER_TIMEOUT: Duration = CLUSTER_TIMEOUT;

fn node_yaml(hostname: &str, candidate: bool, coordinator_url: &str) -> String {
    let coordinator = match coordinator_url.strip_prefix("consul+") {
        // Consul's shortest session TTL is 10 s.
        Some(consul_url) => format!(
            "type: consul\n  consul:\n    url: \"{consul_url}\"\n    key: \"ltxfs-failover/primary\"\n    ttl: 10s\n    lock-delay: 1s\n"
        ),
        None => format!(
            "type: etcd\n  etcd:\n    endpoints: [\"{coordinator_url}\"]\n    key: \"ltxfs-failover/primary\"\n    ttl: {}s\n",
            TTL.as_secs()
        ),
    };
    format!(
        "lease:\n  candidate: {candidate}\n  hostname: {hostname}\n  reconnect-delay: 300ms\n  {coordinator}"
    )
}

/// Starts a candidate node; `coordinator_url` is etcd's URL, or Consul's prefixed
/// with `consul+`.
fn start_node(hostname: &str, coordinator_url: &str) -> Mount {
    start_node_as(hostname, true, coordinator_url)
}

fn start_node_as(hostname: &str, candidate: bool, coordinator_url: &str) -> Mount {
    start_node_with(hostname, candidate, coordinator_url, "")
}

/// [`start_node_as`] with more of the config file.
fn start_node_with(hostname: &str, candidate: bool, coordinator_url: &str, more: &str) -> Mount {
    Mount::start(MountOptions {
        extra_yaml: format!("{}{more}", node_yaml(hostname, candidate, coordinator_url)),
        ..MountOptions::default()
    })
}

/// The config that turns synchronous replication on.
const SYNCHRONOUS: &str = "replication:\n  synchronous: true\n";

/// Waits until `mount` accepts a write transaction (it is the primary); a lone
/// node's missing `.primary` does not tell a primary from a replica that lost its
/// primary.
fn wait_writable(mount: &Mount) {
    wait_until("the node to accept writes", TAKEOVER_TIMEOUT, || {
        open_db(&mount.db_path(DB))
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t(seq) VALUES(-1); ROLLBACK;")
            .is_ok()
    });
}

fn rows(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    query_i64(&conn, "SELECT count(*) FROM t")
}

#[test]
fn a_candidate_takes_over_from_a_killed_primary_and_the_old_one_rejoins() {
    let etcd = etcd::start();
    let mut node_a = start_node("node-a", etcd.url());
    wait_until_primary(&node_a);
    let node_b = start_node("node-b", etcd.url());
    let node_c = start_node("node-c", etcd.url());
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    assert_eq!(wait_for_primary(&nodes), "node-a");

    let conn = open_db(&node_a.db_path(DB));
    set_journal_mode(&conn, "wal");
    conn.execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY)")
        .unwrap();
    drop(conn);
    insert(&node_a.db_path(DB), 0, 100);
    wait_converged(&node_a, &[&node_b, &node_c]);

    // The primary dies; a candidate takes over within the TTL (plus detection).
    node_a.kill9();
    let killed_at = Instant::now();
    let survivors = [("node-b", &node_b), ("node-c", &node_c)];
    let new_primary = wait_for_primary(&survivors);
    let takeover = killed_at.elapsed();
    report(format!("takeover after {takeover:?} with a {TTL:?} TTL"));
    assert!(
        takeover < TTL * 2 + Duration::from_secs(2),
        "takeover took {takeover:?}"
    );
    let (new_mount, other) = if new_primary == "node-b" {
        (&node_b, &node_c)
    } else {
        (&node_c, &node_b)
    };
    // Writes resume on the new primary, and nothing acknowledged is lost.
    insert(&new_mount.db_path(DB), 100, 50);
    assert_eq!(rows(&new_mount.db_path(DB)), 150);
    wait_converged(new_mount, &[other]);

    // The old primary comes back as a replica of the new one.
    node_a.restart();
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    assert_eq!(wait_for_primary(&nodes), new_primary);
    wait_converged(new_mount, &[&node_a, other]);
    assert_eq!(rows(&node_a.db_path(DB)), 150);
    // A replica refuses writes.
    let error = open_db(&node_a.db_path(DB))
        .execute("INSERT INTO t(seq) VALUES(-1)", [])
        .unwrap_err();
    assert!(error.to_string().contains("readonly"), "{error}");
    check_history(&nodes);
}

/// Starts node-a as the primary, then the candidate node-b and node-c, which
/// may never become the primary; returns once all three agree on node-a.
fn start_a_with_b_and_follower_c(etcd_url: &str, more_config: &str) -> [Mount; 3] {
    let node_a = start_node_with("node-a", true, etcd_url, more_config);
    wait_until_primary(&node_a);
    let node_b = start_node_with("node-b", true, etcd_url, more_config);
    let node_c = start_node_with("node-c", false, etcd_url, more_config);
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    assert_eq!(wait_for_primary(&nodes), "node-a");
    [node_a, node_b, node_c]
}

/// A node's process stopped with SIGSTOP until this is dropped (SIGCONT), even
/// when the test fails meanwhile.
struct Frozen(u32);

impl Frozen {
    fn freeze(mount: &Mount) -> Frozen {
        let pid = mount.pid().expect("the node runs");
        send_signal(pid, libc::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        send_signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn a_candidate_behind_another_replica_catches_up_from_it_before_taking_writes() {
    let etcd = etcd::start();
    // node-b is the only other candidate, so it takes over; node-c only follows.
    let [mut node_a, node_b, node_c] = start_a_with_b_and_follower_c(etcd.url(), "");
    let conn = open_db(&node_a.db_path(DB));
    set_journal_mode(&conn, "wal");
    conn.execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY, pad BLOB)")
        .unwrap();
    insert(&node_a.db_path(DB), 0, 10);
    wait_converged(&node_a, &[&node_b, &node_c]);
    wait_until("node-b to hear of node-c", CLUSTER_TIMEOUT, || {
        node_b
            .stderr_text()
            .lines()
            .any(|line| line.contains("the primary's replicas") && line.contains("node-c"))
    });

    // node-b stops reading its stream, so it falls far behind (more than the
    // stream's buffers and window hold), while node-c keeps up. Every row is
    // acknowledged on node-a before it dies.
    let frozen = Frozen::freeze(&node_b);
    const ROWS_WHILE_BEHIND: i64 = 200;
    for seq in 10..10 + ROWS_WHILE_BEHIND {
        conn.execute(
            "INSERT INTO t(seq, pad) VALUES(?1, randomblob(65536))",
            params![seq],
        )
        .unwrap();
    }
    drop(conn);
    let acknowledged = 10 + ROWS_WHILE_BEHIND;
    wait_converged(&node_a, &[&node_c]);
    node_a.kill9();
    drop(frozen);

    // node-b takes the lease, but accepts writes only once it has what node-c
    // has: nothing node-a acknowledged is lost, and node-c discards nothing.
    let survivors = [("node-b", &node_b), ("node-c", &node_c)];
    assert_eq!(wait_for_primary(&survivors), "node-b");
    wait_writable(&node_b);
    assert_eq!(rows(&node_b.db_path(DB)), acknowledged);
    let logs = node_b.stderr_text();
    assert!(
        logs.contains("catching up from a peer that is ahead of this node"),
        "node-b did not catch up from node-c:\n{logs}"
    );
    if let Some(done) = logs
        .lines()
        .find(|line| line.contains("done catching up from the peers"))
    {
        report(format!("node-b: {}", done.trim()));
    }
    insert(&node_b.db_path(DB), acknowledged, 5);
    wait_converged(&node_b, &[&node_c]);
    assert_eq!(rows(&node_c.db_path(DB)), acknowledged + 5);
    let logs = node_c.stderr_text();
    assert!(
        !logs.contains("discarding this node's transactions"),
        "node-c discarded transactions:\n{logs}"
    );
    check_history(&[
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ]);
}

#[test]
fn with_synchronous_replication_a_killed_primary_loses_no_acknowledged_write_in_wal_mode() {
    a_killed_synchronous_primary_loses_no_acknowledged_write("wal");
}

#[test]
fn with_synchronous_replication_a_killed_primary_loses_no_acknowledged_write_in_delete_mode() {
    a_killed_synchronous_primary_loses_no_acknowledged_write("delete");
}

/// The commit is held where it happens: a WAL commit frame's write, a journal's
/// deletion, or the unlock that ends a journal-less transaction.
#[test]
fn with_synchronous_replication_a_killed_primary_loses_no_acknowledged_write_in_memory_mode() {
    a_killed_synchronous_primary_loses_no_acknowledged_write("memory");
}

fn a_killed_synchronous_primary_loses_no_acknowledged_write(journal_mode: &str) {
    let etcd = etcd::start();
    let [mut node_a, node_b, node_c] = start_a_with_b_and_follower_c(etcd.url(), SYNCHRONOUS);
    let conn = open_db(&node_a.db_path(DB));
    set_journal_mode(&conn, journal_mode);
    conn.execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY, pad BLOB)")
        .unwrap();
    drop(conn);
    wait_converged(&node_a, &[&node_b, &node_c]);
    // Commits wait for replicas whose streams have caught up; the primary names
    // those to its replicas.
    wait_until("node-a to count both replicas", CLUSTER_TIMEOUT, || {
        node_b.stderr_text().lines().any(|line| {
            line.contains("the primary's replicas")
                && line.contains("node-b")
                && line.contains("node-c")
        })
    });
    // Rows of 64 KiB, so that what the replicas' connections can buffer is soon
    // exceeded.
    let acknowledged = Arc::new(AtomicI64::new(0));
    let writer = thread::spawn({
        let (db, acknowledged) = (node_a.db_path(DB), acknowledged.clone());
        let journal_mode = journal_mode.to_string();
        move || {
            let conn = open_db(&db);
            // MEMORY is a per-connection mode.
            set_journal_mode(&conn, &journal_mode);
            for seq in 0.. {
                let insert = "INSERT INTO t(seq, pad) VALUES(?1, randomblob(65536))";
                if conn.execute(insert, params![seq]).is_err() {
                    return;
                }
                acknowledged.store(seq + 1, Ordering::Release);
            }
        }
    });
    wait_until("the first rows", CLUSTER_TIMEOUT, || {
        acknowledged.load(Ordering::Acquire) >= 20
    });
    // Both replicas stop taking anything in, then the primary dies. Without
    // synchronous replication the writer would go on being acknowledged for
    // rows no replica receives.
    let frozen = [Frozen::freeze(&node_b), Frozen::freeze(&node_c)];
    thread::sleep(Duration::from_millis(1500));
    node_a.kill9();
    let killed_at = Instant::now();
    writer.join().unwrap();
    drop(frozen);
    let acknowledged = acknowledged.load(Ordering::Acquire);
    // A candidate takes over within the TTL (plus detection), and writes resume.
    let survivors = [("node-b", &node_b), ("node-c", &node_c)];
    assert_eq!(wait_for_primary(&survivors), "node-b");
    wait_writable(&node_b);
    let takeover = killed_at.elapsed();
    report(format!(
        "synchronous, {journal_mode} mode: {acknowledged} rows acknowledged before the primary \
         was killed; node-b accepted writes {takeover:?} after the kill (TTL {TTL:?})"
    ));
    assert!(
        takeover < TTL * 2 + Duration::from_secs(2),
        "takeover took {takeover:?}"
    );
    assert_has_rows(&node_b.db_path(DB), 0, acknowledged);
    // The commit in flight when the primary died may have reached a replica:
    // its application got an error, but the transaction can still be there.
    let before = rows(&node_b.db_path(DB));
    insert(&node_b.db_path(DB), 1_000_000, 5);
    wait_converged(&node_b, &[&node_c]);
    assert_eq!(rows(&node_c.db_path(DB)), before + 5);
}

/// A primary stopped (SIGSTOP) past its lease while a commit waits for a replica:
/// a candidate takes over, the replicas leave the old primary's streams, and when
/// it resumes, that commit must not be acknowledged as standing alone (its lease
/// is gone even before its role loop notices). Three rounds, each stopping the
/// current primary, since the resumed node's threads race each other.
#[test]
fn with_synchronous_replication_a_primary_resumed_after_losing_its_lease_acknowledges_nothing_more()
{
    let etcd = etcd::start();
    let [node_a, node_b, node_c] = start_a_with_b_and_follower_c(etcd.url(), SYNCHRONOUS);
    create_table(&node_a);
    wait_converged(&node_a, &[&node_b, &node_c]);
    let named = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    let acknowledged: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let (mut primary, mut other) = (&node_a, &node_b);
    for round in 0..3_i64 {
        let writer = thread::spawn({
            let (db, acknowledged) = (primary.db_path(DB), acknowledged.clone());
            move || {
                let conn = open_db(&db);
                for seq in round * 1_000_000.. {
                    if conn
                        .execute("INSERT INTO t(seq) VALUES(?1)", params![seq])
                        .is_err()
                    {
                        return;
                    }
                    acknowledged.lock().unwrap().push(seq);
                }
            }
        });
        wait_until("rows this round", CLUSTER_TIMEOUT, || {
            acknowledged.lock().unwrap().len() as i64 >= 20 * (round + 1)
        });
        let frozen = Frozen::freeze(primary);
        let survivors: Vec<(&str, &Mount)> = named
            .iter()
            .copied()
            .filter(|(_, mount)| !std::ptr::eq(*mount, primary))
            .collect();
        wait_until("the other candidate to take over", TAKEOVER_TIMEOUT, || {
            agreed_primary(&survivors).is_some()
        });
        wait_writable(other);
        drop(frozen);
        writer.join().unwrap();
        wait_converged(other, &[primary, &node_c]);
        let present = seqs(other);
        let lost: Vec<i64> = acknowledged
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|seq| !present.contains(seq))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: acknowledged rows are missing: {lost:?}\n{}",
            named
                .iter()
                .map(|(name, mount)| format!("{name} log:\n{}", mount.stderr_text()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::mem::swap(&mut primary, &mut other);
    }
    check_history(&named);
}

#[test]
fn a_clean_shutdown_releases_the_lease_at_once() {
    let etcd = etcd::start();
    let mut node_a = start_node("node-a", etcd.url());
    wait_until_primary(&node_a);
    let node_b = start_node("node-b", etcd.url());
    assert_eq!(
        wait_for_primary(&[("node-a", &node_a), ("node-b", &node_b)]),
        "node-a"
    );
    let conn = open_db(&node_a.db_path(DB));
    conn.execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY)")
        .unwrap();
    drop(conn);
    insert(&node_a.db_path(DB), 0, 20);
    wait_converged(&node_a, &[&node_b]);
    let stopped_at = Instant::now();
    assert!(node_a.stop().success());
    wait_writable(&node_b);
    let takeover = stopped_at.elapsed();
    report(format!("takeover after a clean stop: {takeover:?}"));
    assert!(takeover < TTL, "the lease was not released: {takeover:?}");
    insert(&node_b.db_path(DB), 20, 5);
    assert_eq!(rows(&node_b.db_path(DB)), 25);
}

/// Checks that the `acknowledged` rows from `first` on are all in `db`.
fn assert_has_rows(db: &Path, first: i64, acknowledged: i64) {
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    let present = query_i64(
        &conn,
        &format!(
            "SELECT count(*) FROM t WHERE seq BETWEEN {first} AND {}",
            first + acknowledged - 1
        ),
    );
    assert_eq!(present, acknowledged, "acknowledged rows are missing");
}

/// The handoff's duration as the old primary logged it, in milliseconds.
fn logged_handoff(mount: &Mount) -> Option<f64> {
    let text = mount.stderr_text();
    let line = text
        .lines()
        .rfind(|line| line.contains("handed the primary role over"))?;
    let elapsed = line.split("elapsed=").nth(1)?.split_whitespace().next()?;
    let (number, scale) = if let Some(ms) = elapsed.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(us) = elapsed.strip_suffix("µs") {
        (us, 0.001)
    } else {
        (elapsed.strip_suffix('s')?, 1000.0)
    };
    number.parse::<f64>().ok().map(|value| value * scale)
}

fn create_table(mount: &Mount) {
    let conn = open_db(&mount.db_path(DB));
    set_journal_mode(&conn, "wal");
    conn.execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY)")
        .unwrap();
}

#[test]
fn sigterm_hands_the_role_to_the_candidate_without_losing_an_acknowledged_write() {
    let etcd = etcd::start();
    sigterm_hands_the_role_over(etcd.url());
}

#[test]
fn sigterm_hands_the_role_over_with_consul_too() {
    let consul = fake_consul::FakeConsul::start(fake_consul::Options::default());
    sigterm_hands_the_role_over(&format!("consul+{}", consul.url()));
}

/// SIGTERM to the primary while it commits: the candidate takes over at once and
/// has every acknowledged write; the replica that is not a candidate follows it.
fn sigterm_hands_the_role_over(coordinator_url: &str) {
    let mut node_a = start_node("node-a", coordinator_url);
    wait_until_primary(&node_a);
    // node-c is not a candidate: the handoff must go to node-b.
    let node_c = start_node_as("node-c", false, coordinator_url);
    let node_b = start_node("node-b", coordinator_url);
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    assert_eq!(wait_for_primary(&nodes), "node-a");
    create_table(&node_a);
    wait_converged(&node_a, &[&node_b, &node_c]);

    // SIGTERM while a writer commits as fast as it can.
    let writer = Writer::start(node_a.db_path(DB), 0);
    writer.wait_for(200);
    let signalled_at = Instant::now();
    send_signal(node_a.pid().unwrap(), libc::SIGTERM);
    wait_writable(&node_b);
    let takeover = signalled_at.elapsed();
    let WriterEnd {
        acknowledged,
        failure,
    } = writer.finish();
    let error = failure.map(|(_, error)| error);
    let status = node_a.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{}", node_a.stderr_text());
    let handoff_ms = logged_handoff(&node_a)
        .unwrap_or_else(|| panic!("node-a logged no handoff:\n{}", node_a.stderr_text()));
    let coordinator = if coordinator_url.starts_with("consul+") {
        "consul"
    } else {
        "etcd"
    };
    report(format!(
        "{coordinator}: SIGTERM to writes on node-b: {takeover:?}; node-a's handoff took {handoff_ms:.1} ms; \
         {acknowledged} rows acknowledged; the writer stopped with {error:?}"
    ));
    assert!(takeover < TTL, "the handoff took {takeover:?}");

    // Every acknowledged write is on the new primary and on the other replica.
    assert_has_rows(&node_b.db_path(DB), 0, acknowledged);
    assert_eq!(
        wait_for_primary(&[("node-b", &node_b), ("node-c", &node_c)]),
        "node-b"
    );
    insert(&node_b.db_path(DB), 1_000_000, 10);
    // The promoted replica knew its content exactly: it captures without
    // rereading the database or "recovering" change sets.
    let log = node_b.stderr_text();
    assert!(
        !log.contains("rebuilt change sets") && !log.contains("changes its log lacks"),
        "{log}"
    );
    wait_converged(&node_b, &[&node_c]);
    assert_has_rows(&node_c.db_path(DB), 0, acknowledged);
    check_history(&[
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ]);
}

#[test]
fn promote_moves_the_role_to_a_replica_and_the_old_primary_follows_it() {
    let etcd = etcd::start();
    let [node_a, node_b, node_c] = start_a_with_b_and_follower_c(etcd.url(), "");
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    create_table(&node_a);
    insert(&node_a.db_path(DB), 0, 50);
    wait_converged(&node_a, &[&node_b, &node_c]);

    // A replica that is not a candidate refuses, saying why.
    let refused = ltxfs_command()
        .args([
            "promote",
            "--url",
            &format!("http://{}", node_c.listen_addr()),
        ])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not a candidate"), "{stderr}");

    let mut durations = Vec::new();
    let rounds = [
        (("node-a", &node_a), ("node-b", &node_b)),
        (("node-b", &node_b), ("node-a", &node_a)),
    ];
    for (round, ((_, from), (to_name, to))) in rounds.into_iter().enumerate() {
        let first = 1000 * (round as i64 + 1);
        let writer = Writer::start(from.db_path(DB), first);
        writer.wait_for(100);
        let started = Instant::now();
        let promoted = ltxfs_command()
            .args(["promote", "--url", &format!("http://{}", to.listen_addr())])
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        let stdout = String::from_utf8_lossy(&promoted.stdout);
        assert!(
            promoted.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&promoted.stderr)
        );
        assert!(stdout.contains("this node is the primary"), "{stdout}");
        // The new primary accepts writes at once and has every acknowledged one.
        insert(&to.db_path(DB), -1 - round as i64, 1);
        let acknowledged = writer.finish().acknowledged;
        assert_has_rows(&to.db_path(DB), first, acknowledged);
        durations.push((elapsed, logged_handoff(from)));
        // The old primary and the other replica follow the new one.
        assert_eq!(wait_for_primary(&nodes), to_name);
        wait_converged(to, &[from, &node_c]);
        let error = open_db(&from.db_path(DB))
            .execute("INSERT INTO t(seq) VALUES(-100)", [])
            .unwrap_err();
        assert!(error.to_string().contains("readonly"), "{error}");
    }
    report(format!(
        "ltxfs promote (command run time, logged handoff ms): {durations:?}"
    ));
    check_history(&nodes);
}

/// Writes through whichever node is the primary, as an application behind a
/// write-forwarding proxy would: it keeps a connection to a node whose `.primary`
/// is absent and inserts one row at a time; after a failure it looks for the
/// primary again. Records every acknowledged row and the longest time without a
/// successful write. Like a load balancer, it stops using a node before that
/// node is stopped ([`ClusterWriter::drain`]): a connection left open on a mount
/// whose ltxfs exits would fault on its memory-mapped `-shm`.
struct ClusterWriter {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicI64>,
    /// 1 + the index of the mount not to use; 0 for none.
    drained: Arc<AtomicUsize>,
    /// Counts the writer's iterations, so `drain` knows it was seen.
    iterations: Arc<AtomicUsize>,
    thread: thread::JoinHandle<ClusterWrites>,
}

/// The pause between a [`ClusterWriter`]'s writes.
const WRITE_PAUSE: Duration = Duration::from_millis(1);

/// What a [`ClusterWriter`] did.
#[derive(Debug)]
struct ClusterWrites {
    acknowledged: Vec<i64>,
    attempts: i64,
    longest_outage: Duration,
}

impl ClusterWriter {
    fn start(mounts: Vec<PathBuf>) -> ClusterWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicI64::new(0));
        let drained = Arc::new(AtomicUsize::new(0));
        let iterations = Arc::new(AtomicUsize::new(0));
        let thread = thread::spawn({
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            let (drained, iterations) = (drained.clone(), iterations.clone());
            move || {
                let mut writes = ClusterWrites {
                    acknowledged: Vec::new(),
                    attempts: 0,
                    longest_outage: Duration::ZERO,
                };
                let mut last_success = Instant::now();
                let mut primary: Option<(usize, rusqlite::Connection)> = None;
                while !stop.load(Ordering::Acquire) {
                    let usable = |index: usize| drained.load(Ordering::Acquire) != index + 1;
                    let seq = writes.attempts;
                    writes.attempts += 1;
                    let conn = primary
                        .take()
                        .filter(|(index, _)| usable(*index))
                        .or_else(|| {
                            (0..mounts.len())
                                .filter(|index| usable(*index))
                                .find_map(|index| Some((index, open_primary(&mounts[index])?)))
                        });
                    let committed = conn.filter(|(_, conn)| {
                        conn.execute("INSERT INTO t(seq) VALUES(?1)", params![seq])
                            .is_ok()
                    });
                    if let Some(conn) = committed {
                        primary = Some(conn);
                        writes.acknowledged.push(seq);
                        acknowledged.fetch_add(1, Ordering::AcqRel);
                        last_success = Instant::now();
                        // A steady load the debug build's replicas keep up with.
                        thread::sleep(WRITE_PAUSE);
                    } else {
                        writes.longest_outage = writes.longest_outage.max(last_success.elapsed());
                        thread::sleep(Duration::from_millis(1));
                    }
                    iterations.fetch_add(1, Ordering::AcqRel);
                }
                writes
            }
        });
        ClusterWriter {
            stop,
            acknowledged,
            drained,
            iterations,
            thread,
        }
    }

    /// Stops using mount `index` (closing a connection to it) before returning;
    /// `None` uses every mount again.
    fn drain(&self, index: Option<usize>) {
        self.drained
            .store(index.map_or(0, |index| index + 1), Ordering::Release);
        // Two iterations later, the one running during the store has ended too.
        let seen = self.iterations.load(Ordering::Acquire) + 2;
        wait_until(
            "the cluster writer to drain a node",
            TAKEOVER_TIMEOUT,
            || self.iterations.load(Ordering::Acquire) >= seen || self.thread.is_finished(),
        );
    }

    /// Waits until `more` rows beyond those acknowledged now are acknowledged.
    fn wait_for_more(&self, more: i64) {
        let target = self.acknowledged.load(Ordering::Acquire) + more;
        wait_until(
            "the cluster writer to commit more rows",
            TAKEOVER_TIMEOUT,
            || self.acknowledged.load(Ordering::Acquire) >= target,
        );
    }

    fn finish(self) -> ClusterWrites {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the cluster writer panicked")
    }
}

/// A connection to the database on `mount` when that node looks like the
/// primary (no `.primary`).
fn open_primary(mount: &Path) -> Option<rusqlite::Connection> {
    if mount.join(".primary").exists() {
        return None;
    }
    // Never create the file: a stopped node's mount point is a plain directory.
    let conn = rusqlite::Connection::open_with_flags(
        mount.join(DB),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_millis(200)).ok()?;
    Some(conn)
}

#[test]
fn a_rolling_restart_of_every_node_loses_no_acknowledged_write() {
    let etcd = etcd::start();
    let mut node_a = start_node("node-a", etcd.url());
    wait_until_primary(&node_a);
    let mut node_b = start_node("node-b", etcd.url());
    let mut node_c = start_node("node-c", etcd.url());
    create_table(&node_a);
    wait_converged(&node_a, &[&node_b, &node_c]);

    let writer = ClusterWriter::start(vec![
        node_a.path().to_path_buf(),
        node_b.path().to_path_buf(),
        node_c.path().to_path_buf(),
    ]);
    let mut primaries = Vec::new();
    for (index, restarted) in ["node-a", "node-b", "node-c"].into_iter().enumerate() {
        writer.wait_for_more(200);
        let mount = match restarted {
            "node-a" => &mut node_a,
            "node-b" => &mut node_b,
            _ => &mut node_c,
        };
        // Restart stops the node with SIGTERM (it must exit 0) and starts it again.
        writer.drain(Some(index));
        mount.restart();
        writer.drain(None);
        let nodes = [
            ("node-a", &node_a),
            ("node-b", &node_b),
            ("node-c", &node_c),
        ];
        primaries.push(wait_for_primary(&nodes));
        let primary = nodes
            .iter()
            .find(|(name, _)| *name == primaries.last().unwrap())
            .unwrap()
            .1;
        let others: Vec<&Mount> = nodes
            .iter()
            .filter(|(name, _)| name != primaries.last().unwrap())
            .map(|(_, mount)| *mount)
            .collect();
        wait_caught_up(primary, &others);
    }
    writer.wait_for_more(200);
    let writes = writer.finish();
    report(format!(
        "rolling restart: primaries after each restart {primaries:?}; {} of {} writes acknowledged; longest time without a write {:?}",
        writes.acknowledged.len(),
        writes.attempts,
        writes.longest_outage
    ));
    assert!(
        writes.longest_outage < Duration::from_secs(1),
        "writes failed for {:?}",
        writes.longest_outage
    );
    // Every acknowledged row is on every node.
    let nodes = [&node_a, &node_b, &node_c];
    let primary = nodes
        .iter()
        .find(|node| !node.path().join(".primary").exists())
        .unwrap();
    let others: Vec<&Mount> = nodes
        .iter()
        .copied()
        .filter(|node| node.path() != primary.path())
        .collect();
    wait_converged(primary, &others);
    for node in nodes {
        let conn = rusqlite::Connection::open_with_flags(
            node.db_path(DB),
            OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut statement = conn.prepare("SELECT seq FROM t").unwrap();
        let present: std::collections::BTreeSet<i64> = statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let missing: Vec<_> = writes
            .acknowledged
            .iter()
            .filter(|seq| !present.contains(seq))
            .collect();
        assert!(
            missing.is_empty(),
            "{} lacks acknowledged rows {missing:?}",
            node.path().display()
        );
    }
    check_history(&[
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ]);
}

#[test]
#[should_panic(expected = "app.db TXID 7 was accepted with different content")]
fn the_history_check_catches_a_txid_accepted_twice_with_different_content() {
    let accepted = |epoch, checksum| history::Accepted { epoch, checksum };
    let node_a =
        history::History::from([((DB.to_string(), 7), accepted(3, 0x8000_0000_0000_0001))]);
    let node_b =
        history::History::from([((DB.to_string(), 7), accepted(4, 0x8000_0000_0000_0002))]);
    history::check_histories(&[("node-a", node_a), ("node-b", node_b)]);
}

#[test]
fn the_history_check_reports_equal_content_under_different_epochs() {
    let accepted = |epoch, checksum| history::Accepted { epoch, checksum };
    let node_a =
        history::History::from([((DB.to_string(), 7), accepted(3, 0x8000_0000_0000_0001))]);
    let node_b =
        history::History::from([((DB.to_string(), 7), accepted(5, 0x8000_0000_0000_0001))]);
    let comparison = history::check_histories(&[("node-a", node_a), ("node-b", node_b)]);
    assert_eq!(comparison.compared, 1);
    assert_eq!(
        comparison.epoch_differences,
        ["app.db TXID 7: node-a has epoch 3, node-b has epoch 5 (same checksum 8000000000000001)"]
    );
}

#[test]
fn a_stalled_coordinator_stops_writes_before_expiry_and_never_makes_two_primaries() {
    let consul = fake_consul::FakeConsul::start(fake_consul::Options {
        // Sessions end exactly at their TTL, the soonest Consul allows.
        expiry_factor: 1.0,
        ..fake_consul::Options::default()
    });
    let url = format!("consul+{}", consul.url());
    let node_a = start_node("node-a", &url);
    wait_until_primary(&node_a);
    let node_b = start_node("node-b", &url);
    assert_eq!(
        wait_for_primary(&[("node-a", &node_a), ("node-b", &node_b)]),
        "node-a"
    );
    create_table(&node_a);
    insert(&node_a.db_path(DB), 0, 10);
    wait_converged(&node_a, &[&node_b]);

    // Consul stops answering: every request hangs.
    consul.set_stalled(true);
    let stalled_at = Instant::now();
    let mut writable_at_once = 0;
    let mut a_stopped = None;
    let mut b_read = 0;
    while stalled_at.elapsed() < Duration::from_secs(8) {
        let (a, b) = (accepts_writes(&node_a), accepts_writes(&node_b));
        writable_at_once = writable_at_once.max(usize::from(a) + usize::from(b));
        if !a && a_stopped.is_none() {
            a_stopped = Some(stalled_at.elapsed());
        }
        // The replica keeps serving reads.
        b_read = b_read.max(rows(&node_b.db_path(DB)));
        thread::sleep(Duration::from_millis(50));
    }
    let a_stopped = a_stopped.expect("node-a kept accepting writes without its lease");
    // Consul's TTL is 10 s; the primary must stop well before it could expire.
    assert!(
        a_stopped < Duration::from_secs(6),
        "node-a stopped after {a_stopped:?}"
    );
    assert_eq!(b_read, 10);

    // Consul answers again: one node becomes the primary (once node-a's session
    // expired and the lock-delay passed), never two.
    consul.set_stalled(false);
    let healed_at = Instant::now();
    let nodes = [("node-a", &node_a), ("node-b", &node_b)];
    let mut primary = None;
    while primary.is_none() {
        assert!(
            healed_at.elapsed() < TAKEOVER_TIMEOUT,
            "no primary after the stall"
        );
        let (a, b) = (accepts_writes(&node_a), accepts_writes(&node_b));
        writable_at_once = writable_at_once.max(usize::from(a) + usize::from(b));
        primary = agreed_primary(&nodes).filter(|_| a || b);
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(writable_at_once, 1, "two nodes accepted writes at once");
    report(format!(
        "stalled Consul: node-a stopped writes {a_stopped:?} after the stall (TTL 10 s); {} took over {:?} after Consul answered again",
        primary.as_deref().unwrap_or_default(),
        healed_at.elapsed()
    ));
    let primary_mount = if primary.as_deref() == Some("node-a") {
        &node_a
    } else {
        &node_b
    };
    insert(&primary_mount.db_path(DB), 10, 5);
    let other = if primary.as_deref() == Some("node-a") {
        &node_b
    } else {
        &node_a
    };
    wait_converged(primary_mount, &[other]);
    assert_eq!(rows(&other.db_path(DB)), 15);
    check_history(&nodes);
}
