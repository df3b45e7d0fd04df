//! SIGKILL of ltxfs in the middle of a write workload (`synchronous=FULL`): every
//! transaction whose COMMIT returned before the kill must be there after a restart,
//! and the database must be intact. WAL and DELETE journal modes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Committed rows to wait for before each kill (varied, bounded).
const ROUNDS: [usize; 3] = [25, 120, 60];

/// Inserts sequential ids from `start` in autocommit transactions, printing
/// `COMMITTED <id>` (flushed) after each COMMIT returns. Stops at the first error
/// (expected once ltxfs is killed).
#[test]
fn worker_sequential_inserts() {
    let Some(job) = worker_job() else { return };
    let conn = open_db(Path::new(job.get("db")));
    set_journal_mode(&conn, job.get("mode"));
    conn.execute_batch("PRAGMA synchronous=FULL").unwrap();
    assert_eq!(
        query_i64(&conn, "PRAGMA synchronous"),
        2,
        "synchronous=FULL"
    );
    let start: i64 = job.parse("start");
    for id in start..start + 1_000_000 {
        let result = conn.execute(
            "INSERT INTO t(id, v, pad) VALUES(?1, ?1 * 7, randomblob(100 + ?1 % 1500))",
            [id],
        );
        if let Err(e) = result {
            report(format!("FAILED {id}: {e}"));
            std::process::exit(1);
        }
        report(format!("COMMITTED {id}"));
    }
}

fn crash_rounds(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("crash.db");
    {
        let conn = open_db(&db);
        set_journal_mode(&conn, mode);
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad BLOB);
             CREATE INDEX t_v ON t(v);",
        )
        .unwrap();
    }
    let mut next = 1i64;
    for (round, target) in ROUNDS.into_iter().enumerate() {
        let job = Job::new()
            .with("db", db.display())
            .with("mode", mode)
            .with("start", next);
        let mut worker = StreamingWorker::spawn("worker_sequential_inserts", &job);
        for _ in 0..target {
            worker.expect_marker("COMMITTED ", Duration::from_secs(60));
        }
        mount.kill9();
        assert!(
            anything_mounted(mount.path()),
            "the stale mount should stay after SIGKILL"
        );
        let lines = worker.kill_and_collect();
        let reported = lines
            .iter()
            .filter_map(|l| find_marker(l, "COMMITTED "))
            .map(|s| s.parse::<i64>().unwrap())
            .max()
            .expect("reported ids");
        mount.restart();

        let conn = open_db(&db);
        let present = query_i64(
            &conn,
            &format!("SELECT count(*) FROM t WHERE id BETWEEN 1 AND {reported}"),
        );
        let max = query_i64(&conn, "SELECT coalesce(max(id), 0) FROM t");
        let total = query_i64(&conn, "SELECT count(*) FROM t");
        assert_eq!(
            present,
            reported,
            "{mode} round {round}: {reported} ids reported committed, only {present} present \
             (max {max}); ltxfs stderr:\n{}",
            mount.stderr_text()
        );
        assert!(
            max == reported || max == reported + 1,
            "{mode} round {round}: max id {max}, reported {reported}"
        );
        assert_eq!(total, max, "ids are dense");
        assert_eq!(
            query_i64(&conn, "SELECT count(*) FROM t WHERE v != id * 7"),
            0,
            "row contents"
        );
        assert_eq!(integrity_check(&conn), "ok", "{mode} round {round}");
        next = max + 1;
    }
}

#[test]
fn sigkill_during_writes_wal() {
    crash_rounds("wal");
}

#[test]
fn sigkill_during_writes_delete() {
    crash_rounds("delete");
}
