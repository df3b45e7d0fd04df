//! Helpers of the cluster tests (`failover`, `partition`): several `ltxfs mount`
//! processes sharing one database, `app.db`, whose table `t(seq)` the tests
//! write; every wait is bounded by [`CLUSTER_TIMEOUT`].

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{OpenFlags, params};

use crate::common::{BUSY_TIMEOUT, Mount, POLL, open_db, report, wait_until};
use crate::support::history;

/// The database every cluster test uses.
pub const DB: &str = "app.db";
/// How long a cluster may take to agree, converge or catch up.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);

/// The hostname of the node the others follow, once every other node names it in
/// `.primary` and it has no `.primary` itself.
pub fn agreed_primary(nodes: &[(&str, &Mount)]) -> Option<String> {
    let named: Vec<Option<String>> = nodes
        .iter()
        .map(|(_, mount)| {
            fs::read_to_string(mount.path().join(".primary"))
                .ok()
                .map(|text| text.trim().to_string())
        })
        .collect();
    let primary = nodes
        .iter()
        .zip(&named)
        .find(|(_, named)| named.is_none())
        .map(|((name, _), _)| name.to_string())?;
    let others_agree = named
        .iter()
        .zip(nodes)
        .filter(|(_, (name, _))| *name != primary)
        .all(|(named, _)| named.as_deref() == Some(primary.as_str()));
    others_agree.then_some(primary)
}

/// Waits until the nodes agree on a primary; its hostname.
pub fn wait_for_primary(nodes: &[(&str, &Mount)]) -> String {
    let mut primary = None;
    wait_until("the nodes to agree on a primary", CLUSTER_TIMEOUT, || {
        primary = agreed_primary(nodes);
        primary.is_some()
    });
    primary.unwrap()
}

/// Waits until `mount` logged that it became the primary. A lone node's missing
/// `.primary` does not say so: a node that has not taken the lease yet has none
/// either, and a node started next could take the lease first.
pub fn wait_until_primary(mount: &Mount) {
    wait_until("the node to become the primary", CLUSTER_TIMEOUT, || {
        mount.stderr_text().contains("this node is the primary")
    });
}

/// Whether the node accepts a write transaction now (rolled back). Waits for a
/// writer holding the write lock, so that only a refusal counts as one.
pub fn accepts_writes(mount: &Mount) -> bool {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        mount.db_path(DB),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return false;
    };
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO t(seq) VALUES(-7); ROLLBACK;")
        .is_ok()
}

/// Inserts rows `from .. from + count`, one transaction each.
pub fn insert(db: &Path, from: i64, count: i64) {
    let conn = open_db(db);
    for seq in from..from + count {
        conn.execute("INSERT INTO t(seq) VALUES(?1)", params![seq])
            .unwrap_or_else(|e| panic!("insert {seq} on {}: {e}", db.display()));
    }
}

/// The text of the node's `app.db-pos`.
pub fn position(mount: &Mount) -> Option<String> {
    fs::read_to_string(mount.db_path(&format!("{DB}-pos"))).ok()
}

/// The TXID in a `-pos` file's text.
pub fn txid_of(position: &str) -> u64 {
    u64::from_str_radix(position.split('/').next().unwrap_or_default(), 16).unwrap_or(0)
}

/// Waits, while writes go on, until every one of `others` has reached the TXID
/// `primary` is at now.
pub fn wait_caught_up(primary: &Mount, others: &[&Mount]) {
    let target = position(primary).map_or(0, |text| txid_of(&text));
    wait_until("the replicas to catch up", CLUSTER_TIMEOUT, || {
        others
            .iter()
            .all(|other| position(other).is_some_and(|text| txid_of(&text) >= target))
    });
}

/// Waits until every one of `others` is at `primary`'s position; on timeout,
/// fails with every node's position and log.
pub fn wait_converged(primary: &Mount, others: &[&Mount]) {
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let target = position(primary);
        if target.is_some() && others.iter().all(|other| position(other) == target) {
            return;
        }
        if Instant::now() >= deadline {
            let mut report = format!("the replicas did not reach the primary at {target:?}\n");
            for other in others {
                report.push_str(&format!(
                    "replica at {:?}, log:\n{}\n",
                    position(other),
                    other.stderr_text()
                ));
            }
            report.push_str(&format!("primary log:\n{}", primary.stderr_text()));
            panic!("{report}");
        }
        thread::sleep(POLL);
    }
}

/// The history check (see `support/history.rs`) over `nodes`' data dirs: fails
/// on a TXID accepted with different content, and when the nodes share no
/// transaction to compare.
pub fn check_history(nodes: &[(&str, &Mount)]) {
    let histories: Vec<_> = nodes
        .iter()
        .map(|(name, mount)| (*name, history::read_history(mount.data_dir())))
        .collect();
    let comparison = history::check_histories(&histories);
    report(format!(
        "history check: {} transactions compared across nodes, none accepted twice with different content",
        comparison.compared
    ));
    for difference in &comparison.epoch_differences {
        report(format!("history check: epochs differ: {difference}"));
    }
    assert!(
        comparison.compared > 0,
        "the nodes share no transaction to compare"
    );
}

/// How a [`Writer`] ended.
pub struct WriterEnd {
    /// Rows SQLite reported committed: `first .. first + acknowledged`.
    pub acknowledged: i64,
    /// When the first insert failed, and its error.
    pub failure: Option<(Instant, String)>,
}

/// Inserts rows `first`, `first + 1`, ... into a database on one connection,
/// as fast as it can, until it is told to stop or an insert fails.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicI64>,
    thread: thread::JoinHandle<Option<(Instant, String)>>,
}

impl Writer {
    pub fn start(db: PathBuf, first: i64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicI64::new(0));
        let thread = thread::spawn({
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            move || {
                let conn = open_db(&db);
                let mut committed = 0;
                while !stop.load(Ordering::Acquire) {
                    let seq = first + committed;
                    if let Err(error) = conn.execute("INSERT INTO t(seq) VALUES(?1)", params![seq])
                    {
                        return Some((Instant::now(), error.to_string()));
                    }
                    committed += 1;
                    acknowledged.store(committed, Ordering::Release);
                }
                None
            }
        });
        Writer {
            stop,
            acknowledged,
            thread,
        }
    }

    pub fn acknowledged(&self) -> i64 {
        self.acknowledged.load(Ordering::Acquire)
    }

    /// Waits until `rows` rows are acknowledged; panics if the writer failed.
    pub fn wait_for(&self, rows: i64) {
        wait_until("the writer to commit rows", CLUSTER_TIMEOUT, || {
            self.acknowledged() >= rows || self.thread.is_finished()
        });
        assert!(self.acknowledged() >= rows, "the writer stopped early");
    }

    /// Waits until the writer fails by itself.
    pub fn wait_failed(self) -> WriterEnd {
        wait_until("the writer to fail", CLUSTER_TIMEOUT, || {
            self.thread.is_finished()
        });
        self.finish()
    }

    /// Stops the writer; says how many rows it committed and how it failed, if
    /// it did.
    pub fn finish(self) -> WriterEnd {
        self.stop.store(true, Ordering::Release);
        let failure = self.thread.join().expect("the writer thread panicked");
        WriterEnd {
            acknowledged: self.acknowledged.load(Ordering::Acquire),
            failure,
        }
    }
}

/// Every row in the node's table.
pub fn seqs(mount: &Mount) -> std::collections::BTreeSet<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(mount.db_path(DB), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    let mut statement = conn.prepare("SELECT seq FROM t").unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The address of an `http://address` URL.
pub fn loopback_address(url: &str) -> std::net::SocketAddr {
    url.strip_prefix("http://")
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("not an http://address URL: {url}"))
}
