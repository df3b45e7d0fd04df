//! Change capture on a real mount: for every journal mode, a random workload of
//! transactions (inserts, updates, deletes, schema changes, VACUUM, checkpoints,
//! rollbacks) runs on the mount. After every step the captured change sets are
//! applied to a replica from empty, which must have the checksum the mount's
//! `<db>-pos` file shows and the same content as the live database. At the end the
//! replica must be byte-identical to the database file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::common::{
    self, KERNEL_LOCKS, LTXFS_LOCKS, Mount, MountOptions, dump, first_difference, open_db,
    set_journal_mode,
};
use ltxfs::ltx::{self, Checksum, TxId};
use rusqlite::Connection;

/// A replica built by applying the mount's change sets in order.
struct Replica {
    log: PathBuf,
    file: File,
    path: PathBuf,
    applied: usize,
    position: Option<(TxId, Checksum, u32, u32)>,
}

impl Replica {
    fn new(mount: &Mount, name: &str) -> Replica {
        let path = mount.root().join(format!("{name}.replica"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        Replica {
            log: mount.data_dir().join("dbs").join(name).join("log"),
            file,
            path,
            applied: 0,
            position: None,
        }
    }

    /// Applies the change sets captured since the last call; returns how many.
    fn catch_up(&mut self) -> usize {
        let sets = ltxfs::store::log::read_change_sets(&self.log).unwrap();
        let new = sets.len() - self.applied;
        for set in &sets[self.applied..] {
            let expected = self.position.map(|(_, checksum, _, _)| checksum);
            let outcome = ltx::apply(set.as_slice(), &self.file, expected)
                .unwrap_or_else(|e| panic!("change set {} does not apply: {e}", self.applied));
            if let Some((txid, ..)) = self.position {
                assert_eq!(outcome.min_txid.0, txid.0 + 1, "TXIDs must have no gaps");
            }
            self.position = Some((
                outcome.max_txid,
                outcome.post_apply_checksum,
                outcome.page_size,
                outcome.commit,
            ));
            self.applied += 1;
        }
        new
    }

    /// Checks the replica's full checksum and the mount's `-pos` file against the
    /// last change set.
    fn verify_position(&self, pos_file: &Path) {
        let (txid, checksum, page_size, commit) = self.position.expect("nothing captured yet");
        ltx::verify_database_checksum(&self.file, page_size, commit, checksum)
            .unwrap_or_else(|e| panic!("replica at TXID {txid}: {e}"));
        let pos = std::fs::read_to_string(pos_file).unwrap();
        assert_eq!(pos, format!("{:016x}/{:016x}\n", txid.0, checksum.0));
    }

    fn dump(&self) -> String {
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        dump(&conn)
    }
}

/// A small deterministic random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs one random step; returns whether it should have produced a change set.
fn random_step(conn: &Connection, rng: &mut Rng, mode: &str, tables: &mut Vec<String>) -> bool {
    let table = tables[rng.below(tables.len() as u64) as usize].clone();
    match rng.below(12) {
        0..=3 => {
            let rows = 1 + rng.below(20);
            let size = 1 + rng.below(3000);
            conn.execute_batch(&format!(
                "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<{rows}) \
                 INSERT INTO {table}(v) SELECT randomblob({size}) FROM n; COMMIT;"
            ))
            .unwrap();
            true
        }
        4 => {
            conn.execute_batch(&format!(
                "UPDATE {table} SET v = randomblob(length(v) + 7) WHERE id % 3 = {}",
                rng.below(3)
            ))
            .unwrap();
            true
        }
        5 => {
            conn.execute_batch(&format!(
                "DELETE FROM {table} WHERE id % 4 = {}",
                rng.below(4)
            ))
            .unwrap();
            true
        }
        6 => {
            // A rolled-back transaction, large enough to spill pages to the file.
            conn.execute_batch(&format!(
                "BEGIN; UPDATE {table} SET v = randomblob(2000); \
                 INSERT INTO {table}(v) SELECT randomblob(4000) FROM {table}; ROLLBACK;"
            ))
            .unwrap();
            false
        }
        7 if tables.len() < 4 => {
            let name = format!("t{}", rng.next() % 1_000_000);
            conn.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {name}(id INTEGER PRIMARY KEY, v BLOB); \
                 CREATE INDEX IF NOT EXISTS {name}_v ON {name}(v);"
            ))
            .unwrap();
            tables.push(name);
            true
        }
        8 if tables.len() > 1 => {
            let index = rng.below(tables.len() as u64) as usize;
            let name = tables.remove(index);
            conn.execute_batch(&format!("DROP TABLE {name}")).unwrap();
            true
        }
        9 => {
            conn.execute_batch("VACUUM").unwrap();
            true
        }
        10 if mode == "WAL" => {
            let kind = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"][rng.below(4) as usize];
            conn.query_row(&format!("PRAGMA wal_checkpoint({kind})"), [], |_| Ok(()))
                .unwrap();
            false
        }
        _ => {
            conn.execute_batch(&format!(
                "INSERT INTO {table}(v) VALUES (randomblob({}))",
                1 + rng.below(100)
            ))
            .unwrap();
            true
        }
    }
}

fn capture_round_trip(mode: &str, seed: u64) {
    capture_round_trip_with(mode, seed, "");
}

fn capture_round_trip_with(mode: &str, seed: u64, extra_yaml: &str) {
    let mount = Mount::start(MountOptions {
        extra_yaml: format!("strict-verify: true\n{extra_yaml}"),
        ..MountOptions::default()
    });
    let name = format!("{}.db", mode.to_lowercase());
    let db = mount.db_path(&name);
    let conn = open_db(&db);
    set_journal_mode(&conn, mode);
    conn.execute_batch("CREATE TABLE t0(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let mut replica = Replica::new(&mount, &name);
    let pos_file = mount.db_path(&format!("{name}-pos"));
    let mut tables = vec!["t0".to_string()];
    let mut rng = Rng(seed);
    replica.catch_up();
    replica.verify_position(&pos_file);
    for step in 0..60 {
        random_step(&conn, &mut rng, mode, &mut tables);
        replica.catch_up();
        replica.verify_position(&pos_file);
        if step % 10 == 9 {
            let live = dump(&conn);
            let copy = replica.dump();
            assert!(
                live == copy,
                "{mode} step {step}: replica differs: {}",
                first_difference(&live, &copy)
            );
        }
    }
    // A rollback with nothing written produces no change set.
    conn.execute_batch(&format!(
        "BEGIN; INSERT INTO {}(v) VALUES (1); ROLLBACK;",
        tables[0]
    ))
    .unwrap();
    assert_eq!(
        replica.catch_up(),
        0,
        "a rolled-back transaction was captured"
    );

    if mode == "WAL" {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    drop(conn);
    let live = std::fs::read(&db).unwrap();
    let replayed = std::fs::read(&replica.path).unwrap();
    assert!(
        live == replayed,
        "{mode}: replaying every change set from empty does not give the database file ({} vs {} bytes)",
        live.len(),
        replayed.len()
    );
}

#[test]
fn capture_round_trip_delete() {
    capture_round_trip("DELETE", 1);
}

#[test]
fn capture_round_trip_truncate() {
    capture_round_trip("TRUNCATE", 2);
}

#[test]
fn capture_round_trip_persist() {
    capture_round_trip("PERSIST", 3);
}

#[test]
fn capture_round_trip_memory() {
    capture_round_trip("MEMORY", 4);
}

#[test]
fn capture_round_trip_off() {
    capture_round_trip("OFF", 5);
}

#[test]
fn capture_round_trip_wal() {
    capture_round_trip("WAL", 6);
}

#[test]
fn capture_round_trips_with_ltxfs_locks() {
    for (seed, mode) in ["DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF", "WAL"]
        .into_iter()
        .enumerate()
    {
        capture_round_trip_with(mode, 11 + seed as u64, LTXFS_LOCKS);
    }
}

/// With the kernel serving the locks and `synchronous=OFF`, a journal-less
/// transaction shows its end only when the next one writes page 1 or the
/// writer closes the database: `-pos` trails by one transaction meanwhile,
/// and never shows part of one. A writer's close reaches ltxfs as the
/// release of its file, after the close returned: with kernel locks no flush
/// is asked for, so that closing ltxfs's own descriptors of its mount never
/// waits for ltxfs.
#[test]
fn journal_less_transactions_without_fsync_are_recorded_by_the_next_or_at_close() {
    let mount = Mount::start(MountOptions {
        extra_yaml: format!("strict-verify: true\n{KERNEL_LOCKS}"),
        ..MountOptions::default()
    });
    let name = "nosync.db";
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, "MEMORY");
    conn.execute_batch("PRAGMA synchronous=OFF; CREATE TABLE t(v INTEGER);")
        .unwrap();
    let mut replica = Replica::new(&mount, name);
    let pos_file = mount.db_path(&format!("{name}-pos"));
    let txid = || {
        let pos = std::fs::read_to_string(&pos_file).unwrap();
        u64::from_str_radix(&pos[..16], 16).unwrap()
    };
    conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
    let after_first = txid();
    for value in 2..=4 {
        conn.execute("INSERT INTO t VALUES (?1)", [value]).unwrap();
        assert_eq!(txid(), after_first + value as u64 - 1, "one behind");
        replica.catch_up();
        replica.verify_position(&pos_file);
    }
    drop(conn);
    // The kernel tells ltxfs of the close after it returned (the release).
    common::wait_until(
        "the close ends the last transaction",
        std::time::Duration::from_secs(10),
        || txid() == after_first + 4,
    );
    replica.catch_up();
    replica.verify_position(&pos_file);
    assert_eq!(
        std::fs::read(mount.db_path(name)).unwrap(),
        std::fs::read(&replica.path).unwrap()
    );
}

#[test]
fn switching_journal_modes_and_deleting_is_captured() {
    let mount = Mount::start(MountOptions::default());
    let db = mount.db_path("switch.db");
    let mut replica = Replica::new(&mount, "switch.db");
    let pos_file = mount.db_path("switch.db-pos");
    {
        let conn = open_db(&db);
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        for mode in ["WAL", "DELETE", "WAL", "TRUNCATE"] {
            set_journal_mode(&conn, mode);
            conn.execute_batch("INSERT INTO t VALUES (2)").unwrap();
            replica.catch_up();
            replica.verify_position(&pos_file);
            assert_eq!(dump(&conn), replica.dump(), "after switching to {mode}");
        }
        // A page-size change by VACUUM (rollback mode only).
        conn.execute_batch("PRAGMA page_size = 1024; VACUUM;")
            .unwrap();
        replica.catch_up();
        replica.verify_position(&pos_file);
        assert_eq!(dump(&conn), replica.dump(), "after changing the page size");
        // auto_vacuum truncation shrinks the file.
        conn.execute_batch(
            "PRAGMA auto_vacuum = FULL; VACUUM; \
             INSERT INTO t SELECT randomblob(5000) FROM t; DELETE FROM t WHERE length(x) > 100;",
        )
        .unwrap();
        replica.catch_up();
        replica.verify_position(&pos_file);
        assert_eq!(dump(&conn), replica.dump(), "after auto_vacuum");
        // A VACUUM to a larger page size writes the new pages in chunks of the old.
        conn.execute_batch("PRAGMA page_size = 8192; VACUUM;")
            .unwrap();
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page_size, 8192);
        replica.catch_up();
        replica.verify_position(&pos_file);
        assert_eq!(dump(&conn), replica.dump(), "after growing the page size");
    }
    let before = replica.applied;
    std::fs::remove_file(&db).unwrap();
    replica.catch_up();
    assert_eq!(replica.applied, before + 1, "a delete is one change set");
    let (_, checksum, _, commit) = replica.position.unwrap();
    assert_eq!(commit, 0, "a delete has commit 0");
    assert_eq!(checksum, Checksum::EMPTY_DATABASE);
    assert!(
        !mount.db_path("switch.db-pos").exists(),
        "a deleted database has no position file"
    );
}

#[test]
fn position_survives_a_clean_restart_without_rereading() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("keep.db");
    {
        let conn = open_db(&db);
        set_journal_mode(&conn, "WAL");
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
            .unwrap();
    }
    let pos_file = mount.db_path("keep.db-pos");
    let before = std::fs::read_to_string(&pos_file).unwrap();
    mount.restart();
    assert_eq!(std::fs::read_to_string(&pos_file).unwrap(), before);
    assert!(
        !mount.stderr_text().contains("holds changes its log lacks"),
        "a clean restart must not need a recovery change set"
    );
    let conn = open_db(&db);
    conn.execute_batch("INSERT INTO t VALUES (3)").unwrap();
    let after = std::fs::read_to_string(&pos_file).unwrap();
    assert_eq!(
        u64::from_str_radix(&after[..16], 16).unwrap(),
        u64::from_str_radix(&before[..16], 16).unwrap() + 1
    );
}

#[test]
fn retention_merges_old_change_sets_and_the_log_still_replays() {
    let mount = Mount::start(MountOptions {
        // Continues the generated `data:` section.
        extra_yaml: "  retention: 1s\n  retention-monitor-interval: 100ms\n".to_string(),
        ..MountOptions::default()
    });
    let db = mount.db_path("old.db");
    let conn = open_db(&db);
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    for _ in 0..30 {
        conn.execute_batch("INSERT INTO t(v) VALUES (randomblob(500))")
            .unwrap();
    }
    let log = mount.data_dir().join("dbs").join("old.db").join("log");
    let captured = ltxfs::store::log::read_change_sets(&log).unwrap().len();
    assert!(
        captured >= 30,
        "expected at least 30 change sets, got {captured}"
    );
    common::wait_until(
        "retention to merge old change sets",
        std::time::Duration::from_secs(20),
        || ltxfs::store::log::read_change_sets(&log).unwrap().len() == 1,
    );
    let sets = ltxfs::store::log::read_change_sets(&log).unwrap();
    let header = *ltx::Decoder::new(sets[0].as_slice()).unwrap().header();
    assert_eq!(header.min_txid.0, 1, "the merged base starts the log");
    assert_eq!(
        header.max_txid.0 as usize, captured,
        "the merged base covers every TXID"
    );

    // New transactions follow the merged base, and the log replays from empty.
    conn.execute_batch("INSERT INTO t(v) VALUES (randomblob(10))")
        .unwrap();
    let mut replica = Replica::new(&mount, "old.db");
    replica.catch_up();
    replica.verify_position(&mount.db_path("old.db-pos"));
    assert_eq!(dump(&conn), replica.dump());
}

/// Regression: a VACUUM that changes the page size is captured as a change set
/// of every page at the new size; retention refused to merge it with the
/// change sets before it ("only a snapshot may change the page size"), so the
/// log kept growing and logged an error every round.
#[test]
fn retention_merges_past_a_change_of_page_size() {
    let mount = Mount::start(MountOptions {
        extra_yaml: "  retention: 1s\n  retention-monitor-interval: 100ms\n".to_string(),
        ..MountOptions::default()
    });
    let conn = open_db(&mount.db_path("resized.db"));
    conn.execute_batch(
        "PRAGMA page_size=1024; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO t(v) VALUES (randomblob(3000));
         PRAGMA page_size=4096; VACUUM;
         INSERT INTO t(v) VALUES (randomblob(3000));",
    )
    .unwrap();
    let log = mount.data_dir().join("dbs").join("resized.db").join("log");
    common::wait_until(
        "retention to merge the change sets around the page size change",
        std::time::Duration::from_secs(20),
        || ltxfs::store::log::read_change_sets(&log).unwrap().len() == 1,
    );
    let sets = ltxfs::store::log::read_change_sets(&log).unwrap();
    let header = *ltx::Decoder::new(sets[0].as_slice()).unwrap().header();
    assert_eq!((header.min_txid.0, header.page_size), (1, 4096));
    assert!(
        !mount.stderr_text().contains("retention failed"),
        "{}",
        mount.stderr_text()
    );
    let mut replica = Replica::new(&mount, "resized.db");
    replica.catch_up();
    replica.verify_position(&mount.db_path("resized.db-pos"));
    assert_eq!(dump(&conn), replica.dump());
}

/// Regression: a WAL transaction larger than the page cache spills frames, and when
/// it writes a spilled page again SQLite overwrites that frame in place, writes the
/// following frames with zero salts and rewrites their headers at the commit. Such
/// commits were missed (their pages lost from the log) until header rewrites were
/// recognised.
#[test]
fn wal_transactions_that_spill_and_rewrite_frames_are_captured() {
    let mount = Mount::start(MountOptions {
        extra_yaml: "strict-verify: true\n".to_string(),
        ..MountOptions::default()
    });
    let db = mount.db_path("spill.db");
    let conn = open_db(&db);
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("PRAGMA cache_size = 20; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    let mut replica = Replica::new(&mount, "spill.db");
    let pos_file = mount.db_path("spill.db-pos");
    replica.catch_up();
    for round in 0..5 {
        conn.execute_batch(
            "BEGIN; \
             INSERT INTO t(v) SELECT randomblob(3000) FROM (SELECT 1 UNION ALL SELECT 2) a, \
               (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5) b, \
               (SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5) c; \
             UPDATE t SET v = randomblob(3000); \
             UPDATE t SET v = randomblob(2000) WHERE id % 2 = 0; \
             COMMIT;",
        )
        .unwrap();
        assert_eq!(
            replica.catch_up(),
            1,
            "round {round}: one change set per transaction"
        );
        replica.verify_position(&pos_file);
        assert_eq!(dump(&conn), replica.dump(), "round {round}");
    }
}

/// `locking_mode=EXCLUSIVE` keeps SQLite's locks for the connection's life: WAL
/// mode then keeps its index in memory, and rollback modes zero the journal header
/// instead of deleting the journal. Both must still be captured per transaction.
#[test]
fn exclusive_locking_mode_is_captured_per_transaction() {
    let mount = Mount::start(MountOptions {
        extra_yaml: "strict-verify: true\n".to_string(),
        ..MountOptions::default()
    });
    for mode in ["WAL", "DELETE", "TRUNCATE"] {
        let name = format!("exclusive-{}.db", mode.to_lowercase());
        let db = mount.db_path(&name);
        let conn = open_db(&db);
        conn.execute_batch("PRAGMA locking_mode=EXCLUSIVE").unwrap();
        set_journal_mode(&conn, mode);
        conn.execute_batch(
            "PRAGMA journal_size_limit = 8192; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        let mut replica = Replica::new(&mount, &name);
        let pos_file = mount.db_path(&format!("{name}-pos"));
        replica.catch_up();
        for step in 0..5 {
            conn.execute_batch(
                "INSERT INTO t(v) SELECT randomblob(2000) FROM (SELECT 1 UNION ALL SELECT 2)",
            )
            .unwrap();
            assert_eq!(
                replica.catch_up(),
                1,
                "{mode} step {step}: one change set per transaction"
            );
            replica.verify_position(&pos_file);
            assert_eq!(dump(&conn), replica.dump(), "{mode} step {step}");
            if mode == "WAL" && step == 2 {
                conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    .unwrap();
            }
        }
    }
}

/// Regression: SQLite grows a database by writing only its new last page when
/// the pages before it are not dirty (`pager_truncate` extending the file), so
/// the file gets pages that were never written: zeros. Their checksums were left
/// out of the position (flaky `capture_round_trip_memory`, whose replicas then
/// failed their checksum), though replicas have those zeros too.
#[test]
fn pages_a_transaction_grows_the_file_by_without_writing_are_captured() {
    const PAGE: usize = 4096;
    const PENDING_BYTE: i64 = 0x4000_0000;
    let mount = Mount::start(MountOptions {
        extra_yaml: "strict-verify: true\n".to_string(),
        ..MountOptions::default()
    });
    let name = "sparse.db";
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mount.db_path(name))
        .unwrap();
    // Writes `pages` under SQLite's writer lock, then syncs and unlocks: the
    // sync ends the transaction when the kernel serves the locks, the unlock
    // when ltxfs does, as in journal mode MEMORY or OFF.
    let transaction = |pages: &[(u32, u8)]| {
        set_lock(&file, libc::F_WRLCK as i16, PENDING_BYTE);
        for &(pgno, fill) in pages {
            let mut page = vec![fill; PAGE];
            if pgno == 1 {
                page[..100].fill(0);
                page[..16].copy_from_slice(b"SQLite format 3\0");
                page[16..18].copy_from_slice(&(PAGE as u16).to_be_bytes());
                page[18] = 1;
                page[19] = 1;
            }
            std::os::unix::fs::FileExt::write_all_at(
                &file,
                &page,
                u64::from(pgno - 1) * PAGE as u64,
            )
            .unwrap();
        }
        file.sync_all().unwrap();
        set_lock(&file, libc::F_UNLCK as i16, PENDING_BYTE);
    };
    let mut replica = Replica::new(&mount, name);
    let pos_file = mount.db_path(&format!("{name}-pos"));
    transaction(&[(1, 1), (2, 2)]);
    replica.catch_up();
    replica.verify_position(&pos_file);
    // Page 5 only: pages 3 and 4 become zeros without being written.
    transaction(&[(2, 3), (5, 5)]);
    assert_eq!(replica.catch_up(), 1);
    replica.verify_position(&pos_file);
    assert!(
        !mount.stderr_text().contains("strict-verify"),
        "{}",
        mount.stderr_text()
    );
    assert_eq!(
        std::fs::read(&replica.path).unwrap(),
        std::fs::read(mount.db_path(name)).unwrap()
    );
}

/// Takes (`F_WRLCK`) or releases (`F_UNLCK`) a POSIX lock on one byte of `file`.
fn set_lock(file: &File, kind: i16, byte: i64) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as i16;
    lock.l_start = byte;
    lock.l_len = 1;
    // SAFETY: the descriptor is open and `lock` outlives the call.
    let result = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) };
    assert_eq!(result, 0, "fcntl: {}", std::io::Error::last_os_error());
}

/// A change set damaged in the middle of the log (not a tail a crash tore) must
/// not silently cut off the change sets after it: the log is set aside, the
/// database is recorded again as one snapshot after every TXID the old log
/// used, and writes go on from there.
#[test]
fn a_log_damaged_in_the_middle_is_set_aside_and_the_database_recorded_anew() {
    let mut mount = Mount::start(MountOptions {
        extra_yaml: "strict-verify: true\n".to_string(),
        ..MountOptions::default()
    });
    let name = "damaged.db";
    let db = mount.db_path(name);
    {
        let conn = open_db(&db);
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        for id in 0..6 {
            conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {id}")])
                .unwrap();
        }
    }
    let before = dump(&open_db(&db));
    let log_dir = mount.data_dir().join("dbs").join(name);
    let last_txid = ltxfs::store::log::read_change_sets(&log_dir.join("log"))
        .unwrap()
        .len() as u64;
    assert!(mount.stop().success());

    // Damage the magic of the third change set.
    let (log, _) = ltxfs::store::log::ChangeLog::open(&log_dir.join("log")).unwrap();
    let third = log.records()[2];
    drop(log);
    let file = OpenOptions::new()
        .write(true)
        .open(log_dir.join("log"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"XXXX", third.offset).unwrap();
    drop(file);

    mount.restart();
    assert!(
        mount.stderr_text().contains("damaged in the middle"),
        "{}",
        mount.stderr_text()
    );
    let set_aside = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("log.damaged-")
        });
    assert!(set_aside, "the damaged log is kept beside");
    assert_eq!(dump(&open_db(&db)), before, "the database is untouched");

    // The new log is one snapshot after the old log's last TXID; it replays to
    // the database, and writes continue from it.
    let sets = ltxfs::store::log::read_change_sets(&log_dir.join("log")).unwrap();
    assert_eq!(sets.len(), 1);
    let header = *ltx::Decoder::new(sets[0].as_slice()).unwrap().header();
    assert_eq!((header.min_txid.0, header.max_txid.0), (1, last_txid + 1));
    open_db(&db)
        .execute("INSERT INTO t(v) VALUES ('after')", [])
        .unwrap();
    let mut replica = Replica::new(&mount, name);
    assert_eq!(replica.catch_up(), 2);
    replica.verify_position(&mount.db_path(&format!("{name}-pos")));
    assert_eq!(replica.dump(), dump(&open_db(&db)));
}
