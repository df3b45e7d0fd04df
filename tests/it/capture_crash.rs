//! Crash safety of change capture: ltxfs is SIGKILLed at random points of a write
//! workload with `synchronous=FULL`, in WAL and DELETE mode. After each restart the
//! database must pass `integrity_check`, hold every row whose COMMIT returned, and
//! the change-set log must replay from empty to exactly the database, with the
//! checksum that `<db>-pos` shows.
//!
//! 30 trials by default; set `LTXFS_CRASH_TRIALS` for more.

use std::fs::OpenOptions;
use std::time::Duration;

use crate::common::{
    self, Job, Mount, MountOptions, StreamingWorker, dump, integrity_check, open_db, send_signal,
    worker,
};
use ltxfs::ltx::{self, Checksum};
use rusqlite::Connection;

/// Inserts sequential ids, one per transaction, printing `COMMITTED <id>` after
/// each COMMIT returns, until ltxfs goes away.
#[test]
fn worker_crash_writer() {
    let Some(job) = common::worker_job() else {
        return;
    };
    let conn = open_db(job.get("db").as_ref());
    conn.execute_batch(&format!(
        "PRAGMA journal_mode={}; PRAGMA synchronous=FULL; \
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);",
        job.get("mode")
    ))
    .unwrap();
    let mut next: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) + 1 FROM t", [], |r| r.get(0))
        .unwrap();
    loop {
        let result = conn.execute(
            "INSERT INTO t(id, v) VALUES (?1, randomblob(300 + ?1 % 5000))",
            [next],
        );
        if result.is_err() {
            return;
        }
        println!("COMMITTED {next}");
        next += 1;
    }
}

/// Replays the whole log from empty and checks it against the live database.
fn check_log_replays_to_database(mount: &Mount, name: &str) {
    let replica_path = mount.root().join("replica.db");
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&replica_path)
        .unwrap();
    let log = mount.data_dir().join("dbs").join(name).join("log");
    let mut last: Option<ltx::ApplyOutcome> = None;
    for (index, set) in ltxfs::store::log::read_change_sets(&log)
        .unwrap()
        .iter()
        .enumerate()
    {
        let expected: Option<Checksum> = last.map(|outcome| outcome.post_apply_checksum);
        let outcome = ltx::apply(set.as_slice(), &replica, expected)
            .unwrap_or_else(|e| panic!("change set {index} of {name} does not apply: {e}"));
        last = Some(outcome);
    }
    let last = last.expect("no change sets captured");
    ltx::verify_database_checksum(
        &replica,
        last.page_size,
        last.commit,
        last.post_apply_checksum,
    )
    .unwrap();
    let pos = std::fs::read_to_string(mount.db_path(&format!("{name}-pos"))).unwrap();
    assert_eq!(
        pos,
        format!(
            "{:016x}/{:016x}\n",
            last.max_txid.0, last.post_apply_checksum.0
        ),
        "the position must be the log's last change set"
    );
    let live = dump(&open_db(&mount.db_path(name)));
    let replayed = dump(
        &Connection::open_with_flags(&replica_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap(),
    );
    assert!(
        live == replayed,
        "the log does not replay to the database: {}",
        common::first_difference(&live, &replayed)
    );
}

#[test]
fn sigkill_during_writes_loses_nothing_and_the_log_replays() {
    let trials: u64 = std::env::var("LTXFS_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut mount = Mount::start(MountOptions {
        deadline: Duration::from_secs(600),
        ..MountOptions::default()
    });
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut committed: Vec<(String, i64)> = Vec::new();
    for trial in 0..trials {
        let (mode, name) = if trial % 2 == 0 {
            ("WAL", "crash-wal.db")
        } else {
            ("DELETE", "crash-delete.db")
        };
        let db = mount.db_path(name);
        let mut worker = StreamingWorker::spawn(
            &worker!(worker_crash_writer),
            &Job::new().with("db", db.display()).with("mode", mode),
        );
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let commits_before_kill = 1 + seed % 40;
        let mut last = 0;
        for _ in 0..commits_before_kill {
            last = worker
                .expect_marker_ctx("COMMITTED ", Duration::from_secs(30), || {
                    mount.stderr_text()
                })
                .trim()
                .parse()
                .unwrap();
        }
        mount.kill9();
        send_signal(worker.pid(), libc::SIGKILL);
        // Every id the worker printed was committed before the kill.
        let _ = common::wait_timeout(&mut worker.child, Duration::from_secs(10));
        committed.push((name.to_string(), last));
        mount.restart();

        // Opening the database lets SQLite roll back a hot journal or recover the WAL.
        let conn = open_db(&db);
        assert_eq!(integrity_check(&conn), "ok", "trial {trial} ({mode})");
        for (db_name, id) in committed.iter().filter(|(db_name, _)| db_name == name) {
            let present: i64 = conn
                .query_row("SELECT count(*) FROM t WHERE id <= ?1", [id], |r| r.get(0))
                .unwrap();
            assert_eq!(
                present, *id,
                "trial {trial}: {db_name} lost committed rows (ids 1..={id} must all be there)"
            );
        }
        drop(conn);
        check_log_replays_to_database(&mount, name);
    }
}

/// Starts a large transaction that spills pages into the database file, reports
/// `SPILLED`, and then waits to be killed.
#[test]
fn worker_spill_then_hang() {
    let Some(job) = common::worker_job() else {
        return;
    };
    let conn = open_db(job.get("db").as_ref());
    conn.execute_batch(
        "PRAGMA journal_mode=DELETE; PRAGMA cache_size=10; BEGIN; \
         UPDATE t SET v = randomblob(3000); INSERT INTO t(v) SELECT randomblob(3000) FROM t;",
    )
    .unwrap();
    println!("SPILLED");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_client_killed_mid_transaction_produces_no_change_set() {
    let mount = Mount::start(MountOptions::default());
    let name = "aborted.db";
    let db = mount.db_path(name);
    {
        let conn = open_db(&db);
        conn.execute_batch(
            "PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); \
             INSERT INTO t(v) SELECT randomblob(3000) FROM (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3) a, \
               (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) b, \
               (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4) c;",
        )
        .unwrap();
    }
    let log = mount.data_dir().join("dbs").join(name).join("log");
    let before = ltxfs::store::log::read_change_sets(&log).unwrap().len();
    let pos_before = std::fs::read_to_string(mount.db_path(&format!("{name}-pos"))).unwrap();
    let mut worker = StreamingWorker::spawn(
        &worker!(worker_spill_then_hang),
        &Job::new().with("db", db.display()),
    );
    worker.expect_marker_ctx("SPILLED", Duration::from_secs(30), || mount.stderr_text());
    assert!(
        mount.db_path(&format!("{name}-journal")).exists(),
        "the spilled transaction must have a hot journal"
    );
    send_signal(worker.pid(), libc::SIGKILL);
    let _ = common::wait_timeout(&mut worker.child, Duration::from_secs(10));

    // The next connection rolls the hot journal back; nothing was committed.
    let conn = open_db(&db);
    assert_eq!(integrity_check(&conn), "ok");
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 48, "the aborted transaction must leave no rows");
    drop(conn);
    assert_eq!(
        ltxfs::store::log::read_change_sets(&log).unwrap().len(),
        before,
        "the aborted transaction and its rollback must not be captured"
    );
    assert_eq!(
        std::fs::read_to_string(mount.db_path(&format!("{name}-pos"))).unwrap(),
        pos_before
    );
    check_log_replays_to_database(&mount, name);
}

/// The decoded header (without its timestamp) and pages of a change set.
fn contents(set: &[u8]) -> (ltx::Header, Vec<(u32, Vec<u8>)>) {
    let mut decoder = ltx::Decoder::new(set).unwrap();
    let mut header = *decoder.header();
    header.timestamp = 0;
    let mut pages = Vec::new();
    while let Some(page) = decoder.next_page().unwrap() {
        pages.push(page);
    }
    decoder.finish().unwrap();
    (header, pages)
}

/// In WAL mode the log is not synced at each commit: the WAL SQLite syncs holds
/// the transaction, and the log is synced before the WAL restarts or is
/// checkpointed. A power failure can therefore cost the log its last change sets;
/// start-up must rebuild exactly those from the WAL. Simulated here by cutting the
/// last change sets off the log of a SIGKILLed ltxfs.
#[test]
fn change_sets_lost_from_the_log_are_rebuilt_from_the_wal() {
    let mut mount = Mount::start(MountOptions::default());
    let name = "rebuild.db";
    let db = mount.db_path(name);
    {
        let conn = open_db(&db);
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; \
             CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        for round in 0..20 {
            conn.execute(
                "INSERT INTO t(v) VALUES (randomblob(700 * ?1))",
                [round % 7 + 1],
            )
            .unwrap();
            if round == 9 {
                // The checkpoint syncs the log first; the WAL keeps its frames.
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .unwrap();
            }
        }
        // Keep the WAL: a connection left open keeps SQLite from removing it on close.
        mount.kill9();
    }
    let log = mount.data_dir().join("dbs").join(name).join("log");
    let original = ltxfs::store::log::read_change_sets(&log).unwrap();
    let lost = 5;
    let keep = original.len() - lost;
    let cut: u64 = original[..keep]
        .iter()
        .map(|set| 8 + set.len() as u64)
        .sum();
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(cut)
        .unwrap();

    mount.restart();
    let rebuilt = ltxfs::store::log::read_change_sets(&log).unwrap();
    assert_eq!(
        rebuilt.len(),
        original.len(),
        "every lost change set is rebuilt"
    );
    for (index, (before, after)) in original.iter().zip(&rebuilt).enumerate().skip(keep) {
        assert_eq!(
            contents(before),
            contents(after),
            "change set {index} must be rebuilt exactly (TXID, checksums, pages)"
        );
    }
    assert!(
        mount
            .stderr_text()
            .contains("rebuilt change sets the log lost from the WAL"),
        "{}",
        mount.stderr_text()
    );
    assert_eq!(integrity_check(&open_db(&db)), "ok");
    check_log_replays_to_database(&mount, name);
}
