//! A network partition of the primary: three `ltxfs mount` processes elect their
//! primary with a real etcd on loopback; node-a, the primary, reaches etcd and is
//! reached by the replicas only through TCP proxies (`support/tcp_proxy.rs`).
//! Cutting both proxies cuts node-a off from the coordinator and the replicas: it
//! must stop accepting writes within the lease TTL, and the majority side must
//! elect a new primary that accepts writes. After the heal node-a rejoins as a
//! replica of the new primary; the transactions it accepted after the partition
//! that never reached the others are discarded (replication is asynchronous) and
//! counted. Every node backs up to one destination: node-a keeps uploading while
//! it is cut off (the destination is not), and the backup's newest state is still
//! the new primary's.

// Shared with the failover tests.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::cluster::*;
use crate::support::tcp_proxy::TcpProxy;
use crate::support::{backup_check, etcd};
use ltxfs::replication::PRESUMED_GONE_AFTER;

/// The lease TTL the nodes use.
const TTL: Duration = Duration::from_secs(2);
/// The bound on reaching a state that does not depend on the partition's timings
/// (start-up, agreement, catching up).
const TIMEOUT: Duration = CLUSTER_TIMEOUT;
/// How long after the partition a new primary must be elected and accept writes.
/// Two conditions must both hold before a candidate takes the lease: node-a's
/// lease expired in etcd (at most `TTL` after its last keep-alive, which was
/// before the partition) and the candidate's stream from node-a has been silent
/// for `PRESUMED_GONE_AFTER` (counted from the last message, also before the
/// partition). Both clocks start at the partition, so the longer of the two
/// bounds the later; the margin covers etcd's expiry granularity (it checks
/// leases every 0.5 s), the acquisition (a few loopback requests), the other
/// replica following the new primary, and this test's polling in a debug build.
/// (Before candidates presumed a silent primary gone, they waited for the
/// stream's 5 s silence timeout: about 5 s here.)
const ELECTION_BOUND: Duration = Duration::from_secs(
    if TTL.as_secs() > PRESUMED_GONE_AFTER.as_secs() {
        TTL.as_secs()
    } else {
        PRESUMED_GONE_AFTER.as_secs()
    } + 2,
);
/// The first row node-a's writer inserts.
const FIRST_ON_A: i64 = 1_000;
/// The first row the new primary's writer inserts.
const FIRST_ON_NEW: i64 = 1_000_000;

fn node_yaml(
    hostname: &str,
    etcd_url: &str,
    advertise: Option<(&str, SocketAddr)>,
    synchronous: bool,
    backup_url: &str,
) -> String {
    let (advertise_url, http) = match advertise {
        Some((url, addr)) => (
            format!("  advertise-url: \"{url}\"\n"),
            format!("http:\n  addr: \"{addr}\"\n"),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "lease:\n  candidate: true\n  hostname: {hostname}\n  reconnect-delay: 300ms\n{advertise_url}  type: etcd\n  etcd:\n    endpoints: [\"{etcd_url}\"]\n    key: \"ltxfs-partition/primary\"\n    ttl: {}s\n{http}replication:\n  synchronous: {synchronous}\n{}",
        TTL.as_secs(),
        backup_check::backup_yaml(backup_url, "")
    )
}

/// Creates the table once `mount` accepts writes (a lone node's missing
/// `.primary` does not tell a primary from a node that has not decided yet).
fn create_table_when_writable(mount: &Mount) {
    wait_until("node-a to accept writes", TIMEOUT, || {
        // Before it is the primary, creating the database is refused.
        let Ok(conn) = rusqlite::Connection::open(mount.db_path(DB)) else {
            return false;
        };
        conn.busy_timeout(BUSY_TIMEOUT).unwrap();
        conn.query_row("PRAGMA journal_mode=wal", [], |row| row.get::<_, String>(0))
            .is_ok_and(|mode| mode == "wal")
            && conn
                .execute_batch("CREATE TABLE IF NOT EXISTS t(seq INTEGER PRIMARY KEY)")
                .is_ok()
    });
}

#[test]
fn a_partitioned_primary_stops_writes_and_the_majority_elects_a_new_one() {
    partition(false);
}

/// With synchronous replication the cut-off primary acknowledges nothing more:
/// none of its acknowledged rows is discarded.
#[test]
fn a_partitioned_synchronous_primary_loses_no_acknowledged_write() {
    partition(true);
}

fn partition(synchronous: bool) {
    let etcd = etcd::start();
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let backup_url = format!("file://{}", backup_dir.path().display());
    // Everything between node-a and the rest goes through the two proxies.
    let etcd_proxy = TcpProxy::start(loopback_address(etcd.url()));
    let a_http = free_loopback_address();
    let a_proxy = TcpProxy::start(a_http);
    let node_a = Mount::start(MountOptions {
        extra_yaml: node_yaml(
            "node-a",
            &etcd_proxy.url(),
            Some((&a_proxy.url(), a_http)),
            synchronous,
            &backup_url,
        ),
        ..MountOptions::default()
    });
    wait_until_primary(&node_a);
    create_table_when_writable(&node_a);
    let start = |hostname: &str| {
        Mount::start(MountOptions {
            extra_yaml: node_yaml(hostname, etcd.url(), None, synchronous, &backup_url),
            ..MountOptions::default()
        })
    };
    let node_b = start("node-b");
    let node_c = start("node-c");
    let nodes = [
        ("node-a", &node_a),
        ("node-b", &node_b),
        ("node-c", &node_c),
    ];
    assert_eq!(wait_for_primary(&nodes), "node-a");
    insert(&node_a.db_path(DB), 0, 100);
    wait_converged(&node_a, &[&node_b, &node_c]);

    // node-a commits as fast as it can; the replicas follow it live.
    let writer = Writer::start(node_a.db_path(DB), FIRST_ON_A);
    writer.wait_for(200);
    wait_caught_up(&node_a, &[&node_b, &node_c]);
    writer.wait_for(writer.acknowledged() + 50);

    // The partition: node-a reaches neither etcd nor the replicas, nor they it.
    etcd_proxy.partition();
    a_proxy.partition();
    let partitioned_at = Instant::now();
    let acknowledged_at_partition = writer.acknowledged();

    // node-a stops accepting writes within the TTL.
    let mut refused_after = None;
    wait_until("node-a to refuse writes", TIMEOUT, || {
        let refused = !accepts_writes(&node_a);
        if refused {
            refused_after = Some(partitioned_at.elapsed());
        }
        refused
    });
    let refused_after = refused_after.unwrap();
    let on_a = writer.wait_failed();
    let (failed_at, error) = on_a
        .failure
        .clone()
        .expect("node-a's writer stopped without an error");
    let writer_stopped_after = failed_at.saturating_duration_since(partitioned_at);
    report(format!(
        "partition: node-a's writer failed {writer_stopped_after:?} after the partition ({error}); \
         a probe was refused after {refused_after:?}; TTL {TTL:?}; the writer had {} rows \
         acknowledged at the partition, {} at the end",
        acknowledged_at_partition, on_a.acknowledged
    ));
    assert!(
        error.contains("readonly") || error.contains("disk I/O error"),
        "node-a's writer failed with an unexpected error: {error}"
    );
    assert!(
        writer_stopped_after < TTL && refused_after < TTL,
        "node-a kept accepting writes: the writer failed after {writer_stopped_after:?}, a probe \
         was refused after {refused_after:?} (TTL {TTL:?}); log:\n{}",
        node_a.stderr_text()
    );
    let a_log = node_a.stderr_text();
    let why = a_log
        .lines()
        .find(|line| line.contains("no longer accepting writes"))
        .unwrap_or_else(|| panic!("node-a did not log why it stopped accepting writes:\n{a_log}"));
    report(format!("partition: node-a logged: {why}"));

    // The majority side elects a new primary; node-a stays refused all along, and
    // never two nodes accept writes at once.
    let majority = [("node-b", &node_b), ("node-c", &node_c)];
    let mut writable_at_once = 0;
    let (new_primary, elected_after) = loop {
        let elapsed = partitioned_at.elapsed();
        assert!(
            !accepts_writes(&node_a),
            "node-a accepted a write again while cut off, {elapsed:?} after the partition"
        );
        let (b, c) = (accepts_writes(&node_b), accepts_writes(&node_c));
        writable_at_once = writable_at_once.max(usize::from(b) + usize::from(c));
        let elected =
            agreed_primary(&majority).filter(|primary| if primary == "node-b" { b } else { c });
        if let Some(primary) = elected {
            break (primary, elapsed);
        }
        assert!(
            elapsed < TIMEOUT,
            "no new primary {elapsed:?} after the partition; logs:\nnode-b:\n{}\nnode-c:\n{}",
            node_b.stderr_text(),
            node_c.stderr_text()
        );
        thread::sleep(POLL);
    };
    report(format!(
        "partition: {new_primary} was elected and accepted writes {elected_after:?} after the \
         partition (bound {ELECTION_BOUND:?} = the longer of TTL {TTL:?} and presumed gone \
         after {PRESUMED_GONE_AFTER:?} of silence, + 2 s)"
    ));
    assert!(
        elected_after < ELECTION_BOUND,
        "the election took {elected_after:?}"
    );
    assert_eq!(
        writable_at_once, 1,
        "node-b and node-c accepted writes at once"
    );
    let (new_mount, other) = if new_primary == "node-b" {
        (&node_b, &node_c)
    } else {
        (&node_c, &node_b)
    };

    // Writes resume on the new primary, and continue through the heal.
    let new_writer = Writer::start(new_mount.db_path(DB), FIRST_ON_NEW);
    new_writer.wait_for(200);
    assert!(
        !accepts_writes(&node_a),
        "node-a accepted a write while cut off"
    );

    // The heal: node-a rejoins as a replica of the new primary and converges.
    etcd_proxy.heal();
    a_proxy.heal();
    let healed_at = Instant::now();
    assert_eq!(wait_for_primary(&nodes), new_primary);
    wait_caught_up(new_mount, &[&node_a, other]);
    let rejoined_after = healed_at.elapsed();
    let on_new = new_writer.finish();
    assert!(
        on_new.failure.is_none(),
        "the new primary's writer failed: {:?}",
        on_new.failure
    );
    wait_converged(new_mount, &[&node_a, other]);

    // Every row the new primary has (all its writer's among them) is on node-a.
    let on_new_primary = seqs(new_mount);
    let on_node_a = seqs(&node_a);
    let written_on_new: BTreeSet<i64> =
        (FIRST_ON_NEW..FIRST_ON_NEW + on_new.acknowledged).collect();
    assert!(
        written_on_new.is_subset(&on_new_primary),
        "the new primary lost rows its writer acknowledged"
    );
    assert_eq!(
        on_node_a, on_new_primary,
        "node-a does not have the new primary's rows"
    );
    assert_eq!(seqs(other), on_new_primary);
    // node-a's acknowledged rows that never reached the others were discarded:
    // always the last ones it acknowledged.
    let acknowledged_on_a = FIRST_ON_A..FIRST_ON_A + on_a.acknowledged;
    let discarded: Vec<i64> = acknowledged_on_a
        .clone()
        .filter(|seq| !on_new_primary.contains(seq))
        .collect();
    let kept = on_a.acknowledged - discarded.len() as i64;
    assert!(
        acknowledged_on_a
            .clone()
            .all(|seq| on_new_primary.contains(&seq) == (seq < FIRST_ON_A + kept)),
        "the rows of node-a that were discarded are not its last ones: {discarded:?}"
    );
    assert!(
        !synchronous || discarded.is_empty(),
        "a synchronous primary discarded {} rows it had acknowledged",
        discarded.len()
    );
    let a_log = node_a.stderr_text();
    if !discarded.is_empty() {
        let replaced = a_log
            .lines()
            .find(|line| line.contains("replacing the database with the primary's snapshot"))
            .unwrap_or_else(|| {
                panic!(
                    "node-a discarded {} acknowledged rows without saying so:\n{a_log}",
                    discarded.len()
                )
            });
        // Each of node-a's rows was a transaction of its own, so the TXIDs it
        // names as discarded are exactly its discarded rows.
        assert!(
            replaced.contains(&format!("discarded={}", discarded.len())),
            "node-a discarded {} acknowledged rows but logged: {replaced}",
            discarded.len()
        );
        report(format!("partition: node-a logged: {replaced}"));
    }
    // node-a is a replica: it refuses writes.
    let refusal = open_db(&node_a.db_path(DB))
        .execute("INSERT INTO t(seq) VALUES(-1)", [])
        .unwrap_err();
    assert!(refusal.to_string().contains("readonly"), "{refusal}");
    check_history(&nodes);

    // The backup's newest state is the new primary's, whatever node-a uploaded
    // while it was cut off.
    let (txid, checksum) = backup_check::position(new_mount, DB);
    let source = ["--url", backup_url.as_str()];
    backup_check::wait_for_backup(&source, DB, txid, new_mount);
    let restored = new_mount.root().join("restored.db");
    backup_check::restore(&source, DB, &restored, &[]);
    assert_eq!(backup_check::file_checksum(&restored), checksum);
    let conn = rusqlite::Connection::open(&restored).unwrap();
    let restored_seqs: BTreeSet<i64> = conn
        .prepare("SELECT seq FROM t")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        restored_seqs, on_new_primary,
        "the backup's newest state is not the new primary's"
    );
    let verified = backup_check::ltxfs(&["backup", "verify", "--url", &backup_url]);
    assert!(
        verified.status.success(),
        "{}",
        backup_check::text(&verified)
    );
    let objects_by_epoch = std::fs::read_dir(backup_dir.path().join(DB).join("changes"))
        .map(|entries| {
            let mut epochs = std::collections::BTreeMap::<String, usize>::new();
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if let Some(epoch) = name.split('_').nth(1) {
                    *epochs
                        .entry(epoch.trim_start_matches('0').to_string())
                        .or_default() += 1;
                }
            }
            epochs
        })
        .unwrap_or_default();
    report(format!(
        "partition (synchronous: {synchronous}): level-0 backup objects by lease epoch (hex): \
         {objects_by_epoch:?}; the restored newest state is the new primary's"
    ));
    report(format!(
        "partition (synchronous: {synchronous}): after the heal node-a followed {new_primary} and caught up in \
         {rejoined_after:?}; of the {} rows node-a acknowledged, {} were discarded (the last \
         ones; {} acknowledged after the partition); the new primary's writer committed {} \
         rows, all on node-a; proxies: etcd {:?}, node-a {:?}",
        on_a.acknowledged,
        discarded.len(),
        on_a.acknowledged - acknowledged_at_partition,
        on_new.acknowledged,
        etcd_proxy.stats(),
        a_proxy.stats()
    ));
    for (name, proxy) in [("etcd", &etcd_proxy), ("node-a", &a_proxy)] {
        assert_eq!(
            proxy.stats().refused,
            0,
            "the {name} proxy refused connections: the partition was not faithful"
        );
    }
}
