//! How many requests SQLite's work costs on a mount, counted from the requests
//! ltxfs logs with `fuse.debug`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use rusqlite::Connection;

/// Single-row transactions per sample of write requests.
const SAMPLE_TXNS: usize = 20;

/// Write requests to the file with inode `ino` in the log lines of `text`.
fn write_requests(text: &str, ino: u64) -> usize {
    let needle = format!("ino {ino:#018x} WRITE");
    text.lines().filter(|line| line.contains(&needle)).count()
}

/// Write requests to any file per single-row transaction, over [`SAMPLE_TXNS`].
fn all_writes_per_txn(mount: &Mount, conn: &Connection) -> f64 {
    let writes = |text: &str| {
        text.lines()
            .filter(|line| line.contains(" WRITE fh"))
            .count()
    };
    let before = writes(&mount.stderr_text());
    for _ in 0..SAMPLE_TXNS {
        conn.execute("INSERT INTO t(v) VALUES ('row')", [])
            .expect("insert");
    }
    let after = writes(&mount.stderr_text());
    (after - before) as f64 / SAMPLE_TXNS as f64
}

/// Write requests to the WAL per single-row transaction, over [`SAMPLE_TXNS`].
fn wal_writes_per_txn(mount: &Mount, conn: &Connection, wal: &Path) -> f64 {
    let ino = std::fs::metadata(wal).expect("stat the WAL").ino();
    let before = write_requests(&mount.stderr_text(), ino);
    for _ in 0..SAMPLE_TXNS {
        conn.execute("INSERT INTO t(v) VALUES ('row')", [])
            .expect("insert");
    }
    let after = write_requests(&mount.stderr_text(), ino);
    (after - before) as f64 / SAMPLE_TXNS as f64
}

/// SQLite writes a WAL frame as a 24-byte header and then the page, which
/// therefore starts mid-page of the kernel's cache, and the kernel splits a
/// write where it covers a page it does not hold whole: three requests per
/// frame while the WAL grows. Once SQLite starts the WAL over, ltxfs has the
/// kernel read the WAL in, and a one-page transaction costs two.
#[test]
fn a_restarted_wal_costs_two_write_requests_per_frame() {
    let mount = Mount::start(MountOptions {
        extra_yaml: "fuse:\n  debug: true\n".to_string(),
        ..MountOptions::default()
    });
    let db = mount.db_path("requests.db");
    let wal = mount.path().join("requests.db-wal");
    let conn = open_db(&db);
    set_journal_mode(&conn, "wal");
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA wal_autocheckpoint = 0;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .expect("create the table");
    for _ in 0..200 {
        conn.execute("INSERT INTO t(v) VALUES ('row')", [])
            .expect("insert");
    }

    let growing = wal_writes_per_txn(&mount, &conn, &wal);
    assert!(
        (2.9..3.5).contains(&growing),
        "a frame appended to the WAL costs three write requests: {growing} per transaction"
    );

    // The WAL's frames are all in the database now; the next transaction
    // writes the WAL from the front.
    let (busy, _, _): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .expect("checkpoint");
    assert_eq!(busy, 0, "the checkpoint was blocked");
    wait_for(
        "two write requests per WAL frame after the WAL restarted",
        Duration::from_secs(20),
        || {
            let restarted = wal_writes_per_txn(&mount, &conn, &wal);
            if restarted < 2.5 {
                Ok(())
            } else {
                Err(format!("{restarted} per transaction"))
            }
        },
    );
    assert_integrity(&db);
}

/// A rollback journal is not cached, so each of SQLite's writes to it is one
/// request: a one-row transaction in DELETE mode writes the journal's header,
/// two page records (page number, page, checksum: three writes each) and the
/// header again, and two database pages: 10 writes. Cached, the kernel would
/// split each journaled page at the page of its cache that it straddles: 12.
#[test]
fn a_rollback_journal_costs_one_write_request_per_sqlite_write() {
    let mount = Mount::start(MountOptions {
        extra_yaml: "fuse:\n  debug: true\n".to_string(),
        ..MountOptions::default()
    });
    let db = mount.db_path("journal.db");
    let conn = open_db(&db);
    set_journal_mode(&conn, "delete");
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .expect("create the table");
    conn.execute("INSERT INTO t(v) VALUES ('row')", [])
        .expect("insert");

    let writes = all_writes_per_txn(&mount, &conn);
    assert!(
        (9.9..10.5).contains(&writes),
        "{writes} write requests per transaction"
    );
    assert_integrity(&db);
}
