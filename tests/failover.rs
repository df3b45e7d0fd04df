//! Failover between separate `ltxfs mount` processes electing their primary with a
//! real etcd on loopback: the primary is SIGKILLed during writes, a candidate
//! takes over, and the old primary rejoins as a replica.
//!
//! Clients are worker processes (see `tests/common/mod.rs`); the `worker_*` test
//! does nothing in a normal run.

mod common;
// Shared with the lease tests, which use more of it.
#[allow(dead_code)]
#[path = "support/etcd.rs"]
mod etcd;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rusqlite::{OpenFlags, params};

/// The lease TTL the nodes use (etcd's minimum with the test etcd's timings is 1 s).
const TTL: Duration = Duration::from_secs(2);
const DB: &str = "app.db";
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(20);

fn node_yaml(hostname: &str, etcd_url: &str) -> String {
    format!(
        "lease:\n  type: etcd\n  candidate: true\n  hostname: {hostname}\n  reconnect-delay: 300ms\n  etcd:\n    endpoints: [\"{etcd_url}\"]\n    key: \"ltxfs-failover/primary\"\n    ttl: {}s\n",
        TTL.as_secs()
    )
}

fn start_node(hostname: &str, etcd_url: &str) -> Mount {
    Mount::start(MountOptions {
        extra_yaml: node_yaml(hostname, etcd_url),
        ..MountOptions::default()
    })
}

/// The hostname of the node the others follow, once every other node names it in
/// `.primary` and it has no `.primary` itself.
fn agreed_primary(nodes: &[(&str, &Mount)]) -> Option<String> {
    let named: Vec<Option<String>> = nodes
        .iter()
        .map(|(_, mount)| {
            fs::read_to_string(mount.path().join(".primary"))
                .ok()
                .map(|text| text.trim().to_string())
        })
        .collect();
    let (primary, _) = nodes
        .iter()
        .zip(&named)
        .find(|(_, named)| named.is_none())
        .map(|((name, _), _)| (name.to_string(), ()))?;
    let others_agree = named
        .iter()
        .zip(nodes)
        .filter(|(_, (name, _))| *name != primary)
        .all(|(named, _)| named.as_deref() == Some(primary.as_str()));
    others_agree.then_some(primary)
}

fn wait_for_primary(nodes: &[(&str, &Mount)]) -> String {
    let mut primary = None;
    wait_until("the nodes to agree on a primary", TAKEOVER_TIMEOUT, || {
        primary = agreed_primary(nodes);
        primary.is_some()
    });
    primary.unwrap()
}

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

fn insert(db: &Path, from: i64, count: i64) {
    let conn = open_db(db);
    for seq in from..from + count {
        conn.execute("INSERT INTO t(seq) VALUES(?1)", params![seq])
            .unwrap_or_else(|e| panic!("insert {seq} on {}: {e}", db.display()));
    }
}

fn rows(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    query_i64(&conn, "SELECT count(*) FROM t")
}

fn position(mount: &Mount) -> Option<String> {
    fs::read_to_string(mount.db_path(&format!("{DB}-pos"))).ok()
}

fn wait_converged(primary: &Mount, others: &[&Mount]) {
    wait_until(
        "the replicas to reach the primary",
        TAKEOVER_TIMEOUT,
        || {
            let target = position(primary);
            target.is_some() && others.iter().all(|other| position(other) == target)
        },
    );
}

#[test]
fn a_candidate_takes_over_from_a_killed_primary_and_the_old_one_rejoins() {
    let etcd = etcd::Etcd::start();
    let mut node_a = start_node("node-a", etcd.url());
    let primary = wait_for_primary(&[("node-a", &node_a)]);
    assert_eq!(primary, "node-a");
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
}

#[test]
fn a_clean_shutdown_releases_the_lease_at_once() {
    let etcd = etcd::Etcd::start();
    let mut node_a = start_node("node-a", etcd.url());
    assert_eq!(wait_for_primary(&[("node-a", &node_a)]), "node-a");
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
