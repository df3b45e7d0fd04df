//! SIGKILL of ltxfs in the middle of a write workload (`synchronous=FULL`): every
//! transaction whose COMMIT returned before the kill must be there after a restart,
//! and the database must be intact. WAL and DELETE journal modes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// Committed rows to wait for before each kill (varied, bounded).
const ROUNDS: [usize; 5] = [25, 300, 1, 120, 60];

/// Inserts sequential ids from `start` in autocommit transactions, printing
/// `COMMITTED <id>` (flushed) after each COMMIT returns. Stops at the first error
/// (expected once ltxfs is killed). Optional `limit`: number of inserts.
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
    let limit: i64 = job.opt("limit").map_or(1_000_000, |l| l.parse().unwrap());
    for id in start..start + limit {
        let result = conn.execute(
            "INSERT INTO t(id, v, pad) VALUES(?1, ?1 * 7, randomblob(100 + ?1 % 1500))",
            [id],
        );
        if let Err(e) = result {
            report(format!("FAILED {id}: {e} ({e:?})"));
            std::process::exit(1);
        }
        report(format!("COMMITTED {id}"));
    }
}

/// Every file under `dir` with its size.
fn data_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) => out.push(format!(
                    "{} {}",
                    path.strip_prefix(dir).unwrap_or(&path).display(),
                    m.len()
                )),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
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
        let mut worker = StreamingWorker::spawn(&worker!(worker_sequential_inserts), &job);
        for _ in 0..target {
            worker.expect_marker_ctx("COMMITTED ", Duration::from_secs(60), || {
                format!("{mode} round {round}; {}", mount.stderr_text())
            });
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

        let context = format!(
            "mount listing {:?}, data dir {:?}; ltxfs stderr:\n{}",
            list_dir(mount.path()),
            data_files(mount.data_dir()),
            mount.stderr_text()
        );
        let conn = open_db(&db);
        let tables = query_i64(&conn, "SELECT count(*) FROM sqlite_master WHERE name = 't'");
        assert_eq!(
            tables, 1,
            "{mode} round {round}: table t is gone; {context}"
        );
        let present = query_i64(
            &conn,
            &format!("SELECT count(*) FROM t WHERE id BETWEEN 1 AND {reported}"),
        );
        let max = query_i64(&conn, "SELECT coalesce(max(id), 0) FROM t");
        let total = query_i64(&conn, "SELECT count(*) FROM t");
        assert_eq!(
            present, reported,
            "{mode} round {round}: {reported} ids reported committed, only {present} present \
             (max {max}); {context}"
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

/// SIGKILL of a *client* (ltxfs keeps running) in the middle of its writes: the
/// kernel drops its POSIX locks, so the next writer is not locked out, the
/// transactions it reported are there and a hot journal is rolled back.
fn client_kill_rounds(mode: &str) {
    let mount = Mount::start(MountOptions::default());
    let db = mount.db_path("client.db");
    {
        let conn = open_db(&db);
        set_journal_mode(&conn, mode);
        conn.execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad BLOB);
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
        let mut worker = StreamingWorker::spawn(&worker!(worker_sequential_inserts), &job);
        for _ in 0..target {
            worker.expect_marker_ctx("COMMITTED ", Duration::from_secs(60), || {
                format!("{mode} round {round}; {}", mount.stderr_text())
            });
        }
        let lines = worker.kill_and_collect();
        let reported = lines
            .iter()
            .filter_map(|l| find_marker(l, "COMMITTED "))
            .map(|s| s.parse::<i64>().unwrap())
            .max()
            .expect("reported ids");
        // A new process must be able to write at once (no lock left behind).
        let probe = Job::new()
            .with("db", db.display())
            .with("mode", mode)
            .with("start", 0)
            .with("limit", 1);
        let out = wait_all(
            spawn_workers(&worker!(worker_sequential_inserts), &[probe]),
            Duration::from_secs(60),
        );
        assert!(
            out[0].marker("COMMITTED 0").is_some(),
            "{mode} round {round}"
        );
        let conn = open_db(&db);
        conn.execute("DELETE FROM t WHERE id = 0", []).unwrap();
        let present = query_i64(
            &conn,
            &format!("SELECT count(*) FROM t WHERE id BETWEEN 1 AND {reported}"),
        );
        let max = query_i64(&conn, "SELECT coalesce(max(id), 0) FROM t");
        assert_eq!(present, reported, "{mode} round {round}");
        assert!(
            max == reported || max == reported + 1,
            "{mode} round {round}"
        );
        assert_eq!(query_i64(&conn, "SELECT count(*) FROM t"), max);
        assert_eq!(integrity_check(&conn), "ok", "{mode} round {round}");
        next = max + 1;
    }
}

#[test]
fn client_sigkill_wal() {
    client_kill_rounds("wal");
}

#[test]
fn client_sigkill_delete() {
    client_kill_rounds("delete");
}

/// Regression: after a SIGKILL the kernel still lists a mount's root from its
/// cache, and the harness took that for a live mount, so a restart's wait for
/// its mount could return before the restart had replaced the dead one.
#[test]
fn a_killed_mount_does_not_count_as_answering() {
    let mut mount = Mount::start(MountOptions::default());
    let parent_dev = std::fs::metadata(mount.root())
        .expect("stat the mount's parent")
        .dev();
    assert_eq!(mount.path().parent(), Some(mount.root()));
    std::fs::read_dir(mount.path())
        .expect("list the mount root")
        .count();
    assert!(test_support::answers(mount.path(), parent_dev));
    mount.kill9();
    assert!(is_mounted(mount.path()), "the dead mount is still there");
    assert!(!test_support::answers(mount.path(), parent_dev));
}

/// Regression: a restart right after a SIGKILL, while the kernel still held
/// the mount root's attributes (1 s), took the stale mount for a live one
/// (`stat` answered from the cache) and exited 2 "already mounted by a
/// running ltxfs". The fault suite found it.
#[test]
fn a_restart_at_once_after_sigkill_cleans_the_stale_mount() {
    let mut mount = Mount::start(MountOptions::default());
    for _ in 0..3 {
        std::fs::metadata(mount.path()).expect("stat the mount root");
        mount.kill9();
        mount.restart();
        assert!(is_mounted(mount.path()));
    }
}
