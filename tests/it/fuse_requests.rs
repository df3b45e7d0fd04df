//! How many requests SQLite's work costs on a mount, counted from the requests
//! ltxfs logs with `fuse.debug`.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::common::*;
use rusqlite::Connection;

/// Single-row transactions per sample of write requests.
const SAMPLE_TXNS: usize = 20;

/// Write requests per single-row transaction, over [`SAMPLE_TXNS`] of them,
/// to the file with inode `ino`, or to any file.
fn writes_per_txn(mount: &Mount, conn: &Connection, ino: Option<u64>) -> f64 {
    let needle = match ino {
        Some(ino) => format!("ino {ino:#018x} WRITE"),
        None => " WRITE fh".to_string(),
    };
    let writes = |text: String| text.lines().filter(|line| line.contains(&needle)).count();
    let before = writes(mount.stderr_text());
    for _ in 0..SAMPLE_TXNS {
        conn.execute("INSERT INTO t(v) VALUES ('row')", [])
            .expect("insert");
    }
    let after = writes(mount.stderr_text());
    (after - before) as f64 / SAMPLE_TXNS as f64
}

/// A mount that logs every request, and a connection to a new database
/// `name` on it in journal mode `mode`, with table `t`.
fn logging_mount(name: &str, mode: &str, synchronous: &str) -> (Mount, Connection) {
    let mount = Mount::start(MountOptions {
        extra_yaml: "fuse:\n  debug: true\n".to_string(),
        ..MountOptions::default()
    });
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, mode);
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous};
         CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"
    ))
    .expect("create the table");
    (mount, conn)
}

/// SQLite writes a WAL frame as a 24-byte header and then the page, which
/// therefore starts mid-page of the kernel's cache, and the kernel splits a
/// write where it covers a page it does not hold whole: three requests per
/// frame while the WAL grows. Once SQLite starts the WAL over, ltxfs has the
/// kernel read the WAL in, and a one-page transaction costs two.
#[test]
fn a_restarted_wal_costs_two_write_requests_per_frame() {
    let (mount, conn) = logging_mount("requests.db", "wal", "NORMAL");
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")
        .expect("turn automatic checkpoints off");
    for _ in 0..200 {
        conn.execute("INSERT INTO t(v) VALUES ('row')", [])
            .expect("insert");
    }
    let wal = mount.path().join("requests.db-wal");
    let wal_ino = || Some(std::fs::metadata(&wal).expect("stat the WAL").ino());

    let growing = writes_per_txn(&mount, &conn, wal_ino());
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
            let restarted = writes_per_txn(&mount, &conn, wal_ino());
            if restarted < 2.5 {
                Ok(())
            } else {
                Err(format!("{restarted} per transaction"))
            }
        },
    );
    assert_integrity(&mount.db_path("requests.db"));
}

/// A rollback journal is not cached, so each of SQLite's writes to it is one
/// request: a one-row transaction in DELETE mode writes the journal's header,
/// two page records (page number, page, checksum: three writes each) and the
/// header again, and two database pages: 10 writes. Cached, the kernel would
/// split each journaled page at the page of its cache that it straddles: 12.
#[test]
fn a_rollback_journal_costs_one_write_request_per_sqlite_write() {
    let (mount, conn) = logging_mount("journal.db", "delete", "FULL");
    conn.execute("INSERT INTO t(v) VALUES ('row')", [])
        .expect("insert");

    let writes = writes_per_txn(&mount, &conn, None);
    assert!(
        (9.9..10.5).contains(&writes),
        "{writes} write requests per transaction"
    );
    assert_integrity(&mount.db_path("journal.db"));
}
