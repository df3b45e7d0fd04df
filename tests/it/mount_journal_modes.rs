//! SQLite journal modes, WAL shared memory, page sizes, VACUUM, exclusive locking,
//! multi-database transactions and POSIX byte-range locks on an ltxfs mount.
//!
//! Concurrent clients are worker processes (see `tests/it/common.rs`): the
//! `worker_*` tests below do nothing in a normal run.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use rusqlite::{Connection, ErrorCode, params};

const WORKERS: usize = 4;
const TXNS: usize = 200;
const WORKER_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn create_counter_schema(db: &Path, mode: &str) {
    let conn = open_db(db);
    set_journal_mode(&conn, mode);
    conn.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, worker INTEGER NOT NULL, seq INTEGER NOT NULL,
                        payload BLOB, UNIQUE(worker, seq));
         CREATE TABLE counter(n INTEGER NOT NULL);
         INSERT INTO counter VALUES(0);",
    )
    .expect("create schema");
}

/// Checks, from a fresh connection, that `workers` workers each committed exactly
/// `txns` transactions and that the database is intact.
fn verify_counter(db: &Path, workers: usize, txns: usize) {
    let conn = open_db(db);
    let total = (workers * txns) as i64;
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM t"), total, "rows");
    assert_eq!(query_i64(&conn, "SELECT n FROM counter"), total, "counter");
    let mut stmt = conn
        .prepare("SELECT worker, count(*), count(DISTINCT seq), min(seq), max(seq) FROM t GROUP BY worker ORDER BY worker")
        .unwrap();
    let per_worker: Vec<(i64, i64, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<(i64, i64, i64, i64, i64)> = (0..workers as i64)
        .map(|w| (w, txns as i64, txns as i64, 0, txns as i64 - 1))
        .collect();
    assert_eq!(per_worker, expected, "per-worker rows");
    assert_eq!(integrity_check(&conn), "ok");
}

fn txn_jobs(db: &Path, mode: &str, workers: usize, txns: usize) -> Vec<Job> {
    (0..workers)
        .map(|w| {
            Job::new()
                .with("db", db.display())
                .with("mode", mode)
                .with("worker", w)
                .with("count", txns)
        })
        .collect()
}

fn stop_file_exists(job: &Job) -> bool {
    Path::new(job.get("stop")).exists()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

fn fill_blobs(conn: &Connection, rows: i64, size: i64) {
    conn.execute_batch("BEGIN").unwrap();
    for i in 0..rows {
        conn.execute(
            "INSERT INTO t(b, s) VALUES(randomblob(?1), ?2)",
            params![size + (i * 13) % 97, format!("row {i}")],
        )
        .unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
}

// ---------------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------------

/// `BEGIN IMMEDIATE; INSERT; UPDATE counter; COMMIT` for `worker`'s `seq`.
fn counted_insert(conn: &Connection, worker: i64, seq: i64) {
    let step = |sql: &str| {
        conn.execute_batch(sql)
            .unwrap_or_else(|e| panic!("worker {worker} seq {seq}: {sql}: {e}"))
    };
    step("BEGIN IMMEDIATE");
    conn.execute(
        "INSERT INTO t(worker, seq, payload) VALUES(?1, ?2, randomblob(?3))",
        params![worker, seq, 50 + (seq * 37 + worker * 11) % 700],
    )
    .unwrap_or_else(|e| panic!("worker {worker} seq {seq}: insert: {e}"));
    step("UPDATE counter SET n = n + 1");
    step("COMMIT");
}

/// `count` counted inserts through one connection.
#[test]
fn worker_txn_loop() {
    let Some(job) = worker_job() else { return };
    let db = PathBuf::from(job.get("db"));
    let worker: i64 = job.parse("worker");
    let count: i64 = job.parse("count");
    let conn = open_db(&db);
    set_journal_mode(&conn, job.get("mode"));
    for seq in 0..count {
        counted_insert(&conn, worker, seq);
    }
    report(format!("DONE {count}"));
}

/// `count` counted inserts, each through a connection of its own that is
/// closed after the commit (as a web app that connects per request).
#[test]
fn worker_txn_per_connection() {
    let Some(job) = worker_job() else { return };
    let db = PathBuf::from(job.get("db"));
    let worker: i64 = job.parse("worker");
    let count: i64 = job.parse("count");
    for seq in 0..count {
        let conn = open_db(&db);
        counted_insert(&conn, worker, seq);
        conn.close().expect("close");
    }
    report(format!("DONE {count}"));
}

/// Reads `count(*)` and the counter in one read transaction until the stop file
/// appears; they must always agree and never go backwards.
#[test]
fn worker_wal_reader() {
    let Some(job) = worker_job() else { return };
    let conn = open_db(Path::new(job.get("db")));
    if job.opt("mmap") == Some("1") {
        let size: i64 = query_i64(&conn, "PRAGMA mmap_size=268435456");
        assert_eq!(size, 268_435_456, "mmap_size");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    let mut reads = 0u64;
    let mut last = -1i64;
    loop {
        conn.execute_batch("BEGIN").unwrap();
        let rows = query_i64(&conn, "SELECT count(*) FROM t");
        let counter = query_i64(&conn, "SELECT n FROM counter");
        let blob_bytes = query_i64(&conn, "SELECT coalesce(sum(length(payload)), 0) FROM t");
        conn.execute_batch("COMMIT").unwrap();
        assert_eq!(rows, counter, "snapshot: rows vs counter");
        assert!(rows >= last, "went backwards: {rows} < {last}");
        assert!(blob_bytes >= rows * 50, "payload sizes");
        last = rows;
        reads += 1;
        if reads == 1 {
            report("STARTED");
        }
        if stop_file_exists(&job) || std::time::Instant::now() >= deadline {
            break;
        }
    }
    report(format!("READS {reads}"));
}

/// Cycles `PRAGMA wal_checkpoint(FULL|RESTART|TRUNCATE|PASSIVE)` until the stop file
/// appears.
#[test]
fn worker_checkpointer() {
    let Some(job) = worker_job() else { return };
    let conn = Connection::open(job.get("db")).unwrap();
    conn.busy_timeout(Duration::from_secs(2)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(100);
    let (mut done, mut busy) = (0u64, 0u64);
    'outer: while std::time::Instant::now() < deadline {
        for mode in ["FULL", "RESTART", "TRUNCATE", "PASSIVE"] {
            if stop_file_exists(&job) {
                break 'outer;
            }
            let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            });
            match result {
                Ok((0, log, ckpt)) => {
                    assert!(ckpt <= log, "{mode}: checkpointed {ckpt} > log {log}");
                    done += 1;
                }
                Ok(_) => busy += 1,
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => busy += 1,
                Err(e) => panic!("wal_checkpoint({mode}): {e}"),
            }
            if done + busy == 1 {
                report("STARTED");
            }
            // Throttle so that the writers get the (two) CPUs too.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    report(format!("CHECKPOINTS {done} BUSY {busy}"));
}

/// Prints the hash of the dump of `db` (read with mmap if `mmap=1`).
#[test]
fn worker_dump_hash() {
    let Some(job) = worker_job() else { return };
    let conn = open_db(Path::new(job.get("db")));
    if job.opt("mmap") == Some("1") {
        assert_eq!(query_i64(&conn, "PRAGMA mmap_size=268435456"), 268_435_456);
    }
    report(format!("DUMPHASH {}", fnv64(&dump(&conn))));
}

/// Tries to read `db` with a short busy timeout and reports BUSY or the row count.
#[test]
fn worker_probe_read() {
    let Some(job) = worker_job() else { return };
    let conn = Connection::open(job.get("db")).unwrap();
    conn.busy_timeout(Duration::from_millis(job.parse("busy_ms")))
        .unwrap();
    match conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)) {
        Ok(n) => report(format!("PROBE COUNT {n}")),
        Err(e) if e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy) => report("PROBE BUSY"),
        Err(e) => report(format!("PROBE ERROR {e}")),
    }
}

/// Multi-database transactions (main + attached `other`) with sequential ids,
/// printing `COMMITTED <id>` after each COMMIT returns.
#[test]
fn worker_multi_db() {
    let Some(job) = worker_job() else { return };
    let conn = open_db(Path::new(job.get("a")));
    set_journal_mode(&conn, "delete");
    conn.execute("ATTACH ?1 AS other", [job.get("b")]).unwrap();
    let mode: String = conn
        .query_row("PRAGMA other.journal_mode=DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    let start: i64 = job.parse("start");
    for id in start..start + 100_000 {
        conn.execute_batch("BEGIN").unwrap();
        conn.execute(
            "INSERT INTO main.t(id, v, pad) VALUES(?1, ?1, randomblob(3000))",
            [id],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO other.t(id, v, pad) VALUES(?1, ?1, randomblob(3000))",
            [id],
        )
        .unwrap();
        conn.execute_batch("COMMIT").unwrap();
        report(format!("COMMITTED {id}"));
    }
}

fn flock(kind: libc::c_short, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

fn fcntl_lock(fd: i32, cmd: libc::c_int, fl: &mut libc::flock) -> std::io::Result<()> {
    // SAFETY: fd is an open descriptor and fl points to a valid flock.
    let rc = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_rw(path: &str) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
}

/// Holds a write lock on bytes 1000..1010 and a read lock on 3000..3005 until told
/// to release (a line on stdin, or EOF), then closes the file.
#[test]
fn worker_lock_holder() {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let Some(job) = worker_job() else { return };
    let file = open_rw(job.get("path"));
    let fd = file.as_raw_fd();
    fcntl_lock(fd, libc::F_SETLK, &mut flock(libc::F_WRLCK as _, 1000, 10))
        .expect("F_SETLK write lock");
    fcntl_lock(fd, libc::F_SETLK, &mut flock(libc::F_RDLCK as _, 3000, 5))
        .expect("F_SETLK read lock");
    report(format!("LOCKED {}", std::process::id()));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(file);
    report("RELEASED");
}

/// Probes the holder's locks with F_GETLK and conflicting F_SETLK.
#[test]
fn worker_lock_prober() {
    use std::os::fd::AsRawFd;
    let Some(job) = worker_job() else { return };
    let holder: i32 = job.parse("holder_pid");
    let file = open_rw(job.get("path"));
    let fd = file.as_raw_fd();
    let unlck = libc::F_UNLCK as libc::c_short;
    let wrlck = libc::F_WRLCK as libc::c_short;
    let rdlck = libc::F_RDLCK as libc::c_short;
    // (query type, start, len) -> expected (type, start, len) of the reported lock.
    let cases: [(libc::c_short, i64, i64, libc::c_short, i64, i64); 5] = [
        (wrlck, 990, 20, wrlck, 1000, 10),
        (rdlck, 1009, 1, wrlck, 1000, 10),
        (wrlck, 3002, 1, rdlck, 3000, 5),
        (rdlck, 3000, 5, unlck, 0, 0),
        (wrlck, 5000, 10, unlck, 0, 0),
    ];
    for (kind, start, len, want_kind, want_start, want_len) in cases {
        let mut fl = flock(kind, start, len);
        fcntl_lock(fd, libc::F_GETLK, &mut fl).expect("F_GETLK");
        #[allow(clippy::unnecessary_cast)] // off_t is not i64 everywhere
        let got = (fl.l_type, fl.l_start as i64, fl.l_len as i64);
        if want_kind == unlck {
            assert_eq!(
                fl.l_type, unlck,
                "F_GETLK({kind}, {start}, {len}) = {got:?}"
            );
        } else {
            assert_eq!(
                got,
                (want_kind, want_start, want_len),
                "F_GETLK(type {kind}, {start}, {len})"
            );
            if fl.l_pid != holder {
                report(format!(
                    "PIDMISMATCH F_GETLK reported pid {} instead of holder {holder}",
                    fl.l_pid
                ));
            }
        }
    }
    let err = fcntl_lock(fd, libc::F_SETLK, &mut flock(wrlck, 1005, 1))
        .expect_err("conflicting F_SETLK succeeded");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EAGAIN),
        "conflicting F_SETLK: {err}"
    );
    fcntl_lock(fd, libc::F_SETLK, &mut flock(rdlck, 3001, 1)).expect("shared read lock");
    fcntl_lock(fd, libc::F_SETLK, &mut flock(unlck, 3001, 1)).expect("unlock");
    fcntl_lock(fd, libc::F_SETLK, &mut flock(wrlck, 2000, 1)).expect("disjoint write lock");
    report("PROBE OK");
}

/// Blocks in F_SETLKW for bytes 1000..1010 and reports when it gets the lock.
#[test]
fn worker_lock_waiter() {
    use std::os::fd::AsRawFd;
    let Some(job) = worker_job() else { return };
    let file = open_rw(job.get("path"));
    let fd = file.as_raw_fd();
    report("WAITING");
    fcntl_lock(fd, libc::F_SETLKW, &mut flock(libc::F_WRLCK as _, 1000, 10)).expect("F_SETLKW");
    report("ACQUIRED");
    fcntl_lock(fd, libc::F_SETLK, &mut flock(libc::F_UNLCK as _, 1000, 10)).expect("unlock");
}

/// Tries F_SETLK for a write lock on bytes 1000..1010; reports `TRY OK` or the error.
#[test]
fn worker_lock_try() {
    use std::os::fd::AsRawFd;
    let Some(job) = worker_job() else { return };
    let file = open_rw(job.get("path"));
    match fcntl_lock(
        file.as_raw_fd(),
        libc::F_SETLK,
        &mut flock(libc::F_WRLCK as _, 1000, 10),
    ) {
        Ok(()) => report("TRY OK"),
        Err(e) => report(format!("TRY {e}")),
    }
}

// ---------------------------------------------------------------------------------
// Concurrent writers per journal mode
// ---------------------------------------------------------------------------------

fn concurrent_transactions(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("app.db");
    create_counter_schema(&db, mode);
    let jobs = txn_jobs(&db, mode, WORKERS, TXNS);
    wait_all(
        spawn_workers(&worker!(worker_txn_loop), &jobs),
        WORKER_TIMEOUT,
    );
    verify_counter(&db, WORKERS, TXNS);
    mount.restart();
    verify_counter(&db, WORKERS, TXNS);
}

#[test]
fn concurrent_writers_delete() {
    concurrent_transactions("delete");
}

#[test]
fn concurrent_writers_truncate() {
    concurrent_transactions("truncate");
}

#[test]
fn concurrent_writers_persist() {
    concurrent_transactions("persist");
}

#[test]
fn concurrent_writers_memory() {
    concurrent_transactions("memory");
}

#[test]
fn concurrent_writers_wal() {
    concurrent_transactions("wal");
}

/// Processes that open a connection per transaction: each connection takes
/// its locks through a new handle while the kernel may still be releasing
/// the process's previous one, and the last connection to close checkpoints
/// and deletes the WAL and `-shm`. A release that dropped the new handle's
/// locks let another process delete them under a live connection, which
/// then committed into the deleted WAL (acknowledged, then lost).
#[test]
fn wal_writers_connecting_per_transaction_lose_nothing() {
    const PROCESSES: usize = 2;
    const PER_PROCESS: usize = 2500;
    let mount = Mount::start(MountOptions::default());
    let db = mount.db_path("app.db");
    create_counter_schema(&db, "wal");
    let jobs = txn_jobs(&db, "wal", PROCESSES, PER_PROCESS);
    wait_all(
        spawn_workers(&worker!(worker_txn_per_connection), &jobs),
        WORKER_TIMEOUT,
    );
    verify_counter(&db, PROCESSES, PER_PROCESS);
}

/// journal_mode=OFF has no rollback, so concurrent writers are unsafe by SQLite's
/// own rules: one process, sequential transactions.
#[test]
fn journal_mode_off_single_process() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("off.db");
    create_counter_schema(&db, "off");
    let jobs = txn_jobs(&db, "off", 1, TXNS);
    wait_all(
        spawn_workers(&worker!(worker_txn_loop), &jobs),
        WORKER_TIMEOUT,
    );
    verify_counter(&db, 1, TXNS);
    mount.restart();
    verify_counter(&db, 1, TXNS);
}

// ---------------------------------------------------------------------------------
// WAL: shared memory and checkpoints
// ---------------------------------------------------------------------------------

#[test]
fn wal_checkpoints_while_processes_share_shm() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("wal.db");
    create_counter_schema(&db, "wal");
    let stop = mount.root().join("stop-readers");
    let side = Job::new()
        .with("db", db.display())
        .with("stop", stop.display());
    // Reader and checkpointer run before, during and after the writers.
    let mut reader =
        StreamingWorker::spawn(&worker!(worker_wal_reader), &side.clone().with("mmap", 1));
    let mut checkpointer = StreamingWorker::spawn(&worker!(worker_checkpointer), &side);
    reader.expect_marker("STARTED", Duration::from_secs(30));
    checkpointer.expect_marker("STARTED", Duration::from_secs(30));
    let writers = spawn_workers(&worker!(worker_txn_loop), &txn_jobs(&db, "wal", 2, 150));
    let written = wait_all(writers, WORKER_TIMEOUT);
    assert!(written.iter().all(|o| o.marker("DONE").is_some()));
    fs::write(&stop, "stop").unwrap();
    let mut reports = Vec::new();
    for (name, worker) in [("reader", reader), ("checkpointer", checkpointer)] {
        let (status, lines, stderr) = worker.finish(Duration::from_secs(60));
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} failed ({status:?}):\n{}\n{stderr}",
            lines.join("\n")
        );
        reports.push(lines.join("\n"));
    }
    let reads: u64 = find_marker(&reports[0], "READS ")
        .expect("reader report")
        .parse()
        .unwrap();
    let checkpoints = find_marker(&reports[1], "CHECKPOINTS ").expect("checkpointer report");
    eprintln!("checkpointer: {checkpoints}, reader: {reads} reads");
    verify_counter(&db, 2, 150);

    // A final TRUNCATE checkpoint empties the WAL file.
    {
        let conn = open_db(&db);
        conn.execute_batch("CREATE TABLE side(x); INSERT INTO side VALUES(1);")
            .unwrap();
        let wal = mount.db_path("wal.db-wal");
        assert!(file_len(&wal) > 0, "WAL should hold the last transaction");
        let (busy, _log, _ckpt): (i64, i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(busy, 0, "TRUNCATE checkpoint was blocked");
        assert_eq!(file_len(&wal), 0, "WAL not truncated");
        assert!(mount.path().join("wal.db-shm").exists(), "-shm exists");
    }
    mount.restart();
    verify_counter(&db, 2, 150);
}

// ---------------------------------------------------------------------------------
// mmap reads
// ---------------------------------------------------------------------------------

fn mmap_reads(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("mmap.db");
    let a = open_db(&db);
    set_journal_mode(&a, mode);
    a.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT)")
        .unwrap();
    fill_blobs(&a, 1500, 300);
    let b = open_db(&db);
    assert_eq!(
        query_i64(&b, "PRAGMA mmap_size=268435456"),
        268_435_456,
        "mmap_size"
    );
    assert_eq!(dump(&a), dump(&b), "mmap reader sees the same data");

    // Writes by the plain connection are seen by the mmap reader.
    a.execute_batch(
        "UPDATE t SET b = randomblob(500) WHERE id % 7 = 0; DELETE FROM t WHERE id % 11 = 0;",
    )
    .unwrap();
    let expected = dump(&a);
    assert_eq!(expected, dump(&b), "after update by the other connection");

    // Writes by the mmap connection are seen by the plain one.
    fill_blobs(&b, 200, 800);
    b.execute_batch("UPDATE t SET s = s || '!' WHERE id % 5 = 0")
        .unwrap();
    let expected = dump(&b);
    assert_eq!(expected, dump(&a), "after writes by the mmap connection");
    assert_eq!(integrity_check(&b), "ok");

    // Another process, reading with mmap, sees the same bytes.
    let job = Job::new().with("db", db.display()).with("mmap", 1);
    let out = wait_all(
        spawn_workers(&worker!(worker_dump_hash), &[job]),
        Duration::from_secs(60),
    );
    assert_eq!(
        out[0].marker("DUMPHASH ").expect("hash"),
        fnv64(&expected).to_string(),
        "mmap reader in another process"
    );
    drop((a, b));
    mount.restart();
    let c = open_db(&db);
    assert_eq!(query_i64(&c, "PRAGMA mmap_size=268435456"), 268_435_456);
    assert_eq!(dump(&c), expected, "after remount");
    assert_eq!(integrity_check(&c), "ok");
}

#[test]
fn mmap_reads_delete() {
    mmap_reads("delete");
}

#[test]
fn mmap_reads_wal() {
    mmap_reads("wal");
}

// ---------------------------------------------------------------------------------
// VACUUM, auto_vacuum, page sizes
// ---------------------------------------------------------------------------------

fn vacuum(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("vacuum.db");
    let conn = open_db(&db);
    set_journal_mode(&conn, mode);
    conn.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT); CREATE INDEX t_s ON t(s);",
    )
    .unwrap();
    fill_blobs(&conn, 2000, 400);
    conn.execute_batch("DELETE FROM t WHERE id % 3 != 0")
        .unwrap();
    let before = dump(&conn);
    let pages_before = query_i64(&conn, "PRAGMA page_count");
    conn.execute_batch("VACUUM").unwrap();
    let pages_after = query_i64(&conn, "PRAGMA page_count");
    assert!(
        pages_after < pages_before * 2 / 3,
        "VACUUM did not shrink: {pages_before} -> {pages_after} pages"
    );
    assert_eq!(dump(&conn), before, "VACUUM changed the content");
    assert_eq!(integrity_check(&conn), "ok");
    if mode == "wal" {
        let busy = query_i64(&conn, "PRAGMA wal_checkpoint(TRUNCATE)");
        assert_eq!(busy, 0);
    }
    let page_size = query_i64(&conn, "PRAGMA page_size");
    assert_eq!(
        file_len(&db) as i64,
        pages_after * page_size,
        "file size after VACUUM"
    );
    drop(conn);
    mount.restart();
    let conn = open_db(&db);
    assert_eq!(dump(&conn), before, "after remount");
    assert_eq!(integrity_check(&conn), "ok");
}

#[test]
fn vacuum_delete() {
    vacuum("delete");
}

#[test]
fn vacuum_wal() {
    vacuum("wal");
}

#[test]
fn auto_vacuum_full_shrinks_file() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("autovac.db");
    let conn = open_db(&db);
    conn.execute_batch("PRAGMA auto_vacuum=FULL").unwrap();
    set_journal_mode(&conn, "delete");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT)")
        .unwrap();
    assert_eq!(
        query_i64(&conn, "PRAGMA auto_vacuum"),
        1,
        "auto_vacuum=FULL"
    );
    fill_blobs(&conn, 500, 4000);
    let size_full = file_len(&db);
    assert!(size_full > 2_000_000, "file only {size_full} bytes");
    conn.execute_batch("DELETE FROM t WHERE id % 10 != 0")
        .unwrap();
    let size_after = file_len(&db);
    assert!(
        size_after < size_full / 4,
        "auto_vacuum did not shrink the file: {size_full} -> {size_after}"
    );
    assert_eq!(query_i64(&conn, "PRAGMA freelist_count"), 0);
    let page_size = query_i64(&conn, "PRAGMA page_size");
    assert_eq!(
        size_after as i64,
        query_i64(&conn, "PRAGMA page_count") * page_size
    );
    assert_eq!(integrity_check(&conn), "ok");
    let expected = dump(&conn);
    drop(conn);
    mount.restart();
    let conn = open_db(&db);
    assert_eq!(dump(&conn), expected);
    assert_eq!(file_len(&db), size_after);
    assert_eq!(integrity_check(&conn), "ok");
}

#[test]
fn page_sizes() {
    let mut mount = Mount::start(MountOptions::default());
    let mut expected = Vec::new();
    for page_size in [512i64, 4096, 65536] {
        for mode in ["delete", "wal"] {
            let db = mount.db_path(&format!("ps{page_size}-{mode}.db"));
            let conn = open_db(&db);
            conn.execute_batch(&format!("PRAGMA page_size={page_size}"))
                .unwrap();
            set_journal_mode(&conn, mode);
            conn.execute_batch(
                "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT); CREATE INDEX t_s ON t(s);",
            )
            .unwrap();
            fill_blobs(&conn, 300, 100);
            fill_blobs(&conn, 20, 150_000);
            conn.execute_batch(
                "DELETE FROM t WHERE id % 4 = 0; UPDATE t SET s = 'u' || s WHERE id % 3 = 0;",
            )
            .unwrap();
            assert_eq!(query_i64(&conn, "PRAGMA page_size"), page_size, "{mode}");
            assert_eq!(integrity_check(&conn), "ok", "{mode} {page_size}");
            let text = dump(&conn);
            drop(conn);
            // A fresh connection reads the same.
            let conn = open_db(&db);
            assert_eq!(dump(&conn), text, "{mode} {page_size} reopened");
            expected.push((db, page_size, text));
        }
    }
    mount.restart();
    for (db, page_size, text) in expected {
        let conn = open_db(&db);
        assert_eq!(query_i64(&conn, "PRAGMA page_size"), page_size);
        assert_eq!(dump(&conn), text, "{} after remount", db.display());
        assert_eq!(integrity_check(&conn), "ok");
    }
}

#[test]
fn page_size_change_by_vacuum_in_rollback_mode() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("resize.db");
    let conn = open_db(&db);
    conn.execute_batch("PRAGMA page_size=4096").unwrap();
    set_journal_mode(&conn, "delete");
    conn.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT); CREATE INDEX t_s ON t(s);",
    )
    .unwrap();
    fill_blobs(&conn, 800, 700);
    let expected = dump(&conn);
    for new_size in [16384i64, 1024, 8192] {
        conn.execute_batch(&format!("PRAGMA page_size={new_size}; VACUUM;"))
            .unwrap_or_else(|e| {
                panic!(
                    "VACUUM to page size {new_size}: {e}; ltxfs stderr:\n{}",
                    mount.stderr_text()
                )
            });
        assert_eq!(query_i64(&conn, "PRAGMA page_size"), new_size);
        assert_eq!(dump(&conn), expected, "content after VACUUM to {new_size}");
        assert_eq!(integrity_check(&conn), "ok");
        assert_eq!(
            file_len(&db) as i64,
            query_i64(&conn, "PRAGMA page_count") * new_size
        );
        let fresh = open_db(&db);
        assert_eq!(query_i64(&fresh, "PRAGMA page_size"), new_size);
        assert_eq!(dump(&fresh), expected);
    }
    drop(conn);
    mount.restart();
    let conn = open_db(&db);
    assert_eq!(query_i64(&conn, "PRAGMA page_size"), 8192);
    assert_eq!(dump(&conn), expected);
    assert_eq!(integrity_check(&conn), "ok");
}

// ---------------------------------------------------------------------------------
// locking_mode=EXCLUSIVE
// ---------------------------------------------------------------------------------

fn probe(db: &Path) -> String {
    let job = Job::new().with("db", db.display()).with("busy_ms", 300);
    let out = wait_all(
        spawn_workers(&worker!(worker_probe_read), &[job]),
        Duration::from_secs(60),
    );
    out[0].marker("PROBE ").expect("probe report")
}

fn exclusive_locking(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("excl.db");
    let conn = open_db(&db);
    let lm: String = conn
        .query_row("PRAGMA locking_mode=EXCLUSIVE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(lm, "exclusive");
    set_journal_mode(&conn, mode);
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT)")
        .unwrap();
    fill_blobs(&conn, 100, 200);
    conn.execute("INSERT INTO t(b, s) VALUES(x'00', 'one more')", [])
        .unwrap();
    // Another process is locked out while this connection lives.
    assert_eq!(probe(&db), "BUSY", "{mode}: exclusive lock not enforced");
    fill_blobs(&conn, 50, 200);
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM t"), 151);
    assert_eq!(integrity_check(&conn), "ok");
    if mode == "wal" {
        assert!(
            !mount.path().join("excl.db-shm").exists(),
            "exclusive WAL mode keeps the wal-index in heap memory"
        );
    }
    drop(conn);
    assert_eq!(
        probe(&db),
        "COUNT 151",
        "{mode}: after the exclusive connection closed"
    );
    mount.restart();
    assert_eq!(probe(&db), "COUNT 151");
    assert_integrity(&db);
}

#[test]
fn exclusive_locking_mode_rollback() {
    exclusive_locking("delete");
}

#[test]
fn exclusive_locking_mode_wal() {
    exclusive_locking("wal");
}

// ---------------------------------------------------------------------------------
// Multi-database transactions (super-journal)
// ---------------------------------------------------------------------------------

fn check_multi(a: &Path, b: &Path) -> i64 {
    let conn = open_db(a);
    conn.execute("ATTACH ?1 AS other", [b.display().to_string()])
        .unwrap();
    let na = query_i64(&conn, "SELECT count(*) FROM main.t");
    let nb = query_i64(&conn, "SELECT count(*) FROM other.t");
    let both = query_i64(
        &conn,
        "SELECT count(*) FROM main.t m JOIN other.t o ON o.id = m.id AND o.v = m.v",
    );
    assert_eq!(
        (na, nb),
        (both, both),
        "transaction not atomic across databases"
    );
    let max = query_i64(&conn, "SELECT coalesce(max(id), 0) FROM main.t");
    assert_eq!(na, max, "ids are dense");
    assert_eq!(query_string(&conn, "PRAGMA main.integrity_check"), "ok");
    assert_eq!(query_string(&conn, "PRAGMA other.integrity_check"), "ok");
    max
}

#[test]
fn multi_database_transaction_is_atomic() {
    let mut mount = Mount::start(MountOptions::default());
    let a = mount.db_path("main.db");
    let b = mount.db_path("other.db");
    {
        let conn = open_db(&a);
        set_journal_mode(&conn, "delete");
        conn.execute("ATTACH ?1 AS other", [b.display().to_string()])
            .unwrap();
        let mode: String = conn
            .query_row("PRAGMA other.journal_mode=DELETE", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
        conn.execute_batch(
            "CREATE TABLE main.t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB);
             CREATE TABLE other.t(id INTEGER PRIMARY KEY, v INTEGER, pad BLOB);",
        )
        .unwrap();
        for id in 1..=30 {
            conn.execute_batch(&format!(
                "BEGIN; INSERT INTO main.t VALUES({id}, {id}, randomblob(2000));
                 INSERT INTO other.t VALUES({id}, {id}, randomblob(2000)); COMMIT;"
            ))
            .unwrap();
        }
        conn.execute_batch(
            "BEGIN; INSERT INTO main.t VALUES(1000, 0, NULL); INSERT INTO other.t VALUES(1000, 0, NULL); ROLLBACK;",
        )
        .unwrap();
        let leftovers: Vec<String> = list_dir(mount.path())
            .into_iter()
            .filter(|n| n.contains("-mj") || n.contains("-journal"))
            .collect();
        assert!(leftovers.is_empty(), "left after commit: {leftovers:?}");
    }
    assert_eq!(check_multi(&a, &b), 30);

    // Kill the writing process at arbitrary points of multi-database commits: the
    // next reader must roll back (or keep) both databases together.
    let mut next = 31;
    for target in [7usize, 25, 3, 40] {
        let job = Job::new()
            .with("a", a.display())
            .with("b", b.display())
            .with("start", next);
        let mut worker = StreamingWorker::spawn(&worker!(worker_multi_db), &job);
        for _ in 0..target {
            worker.expect_marker("COMMITTED ", Duration::from_secs(60));
        }
        let lines = worker.kill_and_collect();
        let reported = lines
            .iter()
            .filter_map(|l| find_marker(l, "COMMITTED "))
            .map(|s| s.parse::<i64>().unwrap())
            .max()
            .unwrap();
        let max = check_multi(&a, &b);
        assert!(
            max == reported || max == reported + 1,
            "reported {reported} committed, databases hold {max}"
        );
        next = max + 1;
    }
    mount.restart();
    check_multi(&a, &b);
}

// ---------------------------------------------------------------------------------
// POSIX byte-range locks
// ---------------------------------------------------------------------------------

/// True when some thread of `pid` is inside fcntl(2).
fn in_fcntl(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        fs::read_to_string(task.path().join("syscall"))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .is_some_and(|nr| nr == libc::SYS_fcntl.to_string())
    })
}

/// A mount configured with `extra_yaml` holding `locks.db`, and that file's path.
fn mount_with_lock_db(extra_yaml: &str) -> (Mount, String) {
    let mount = Mount::start(MountOptions {
        extra_yaml: extra_yaml.to_string(),
        ..MountOptions::default()
    });
    let db = mount.db_path("locks.db");
    open_db(&db)
        .execute_batch("CREATE TABLE x(a); INSERT INTO x VALUES(1);")
        .unwrap();
    (mount, db.display().to_string())
}

#[test]
fn posix_locks_across_processes() {
    posix_locks_across_processes_with("");
}

#[test]
fn posix_locks_across_processes_with_ltxfs_locks() {
    posix_locks_across_processes_with(LTXFS_LOCKS);
}

fn posix_locks_across_processes_with(extra_yaml: &str) {
    let (_mount, path) = mount_with_lock_db(extra_yaml);

    let mut holder = StreamingWorker::spawn(
        &worker!(worker_lock_holder),
        &Job::new().with("path", &path),
    );
    let holder_pid = holder.expect_marker("LOCKED ", Duration::from_secs(30));
    assert_eq!(holder_pid, holder.pid().to_string());

    let prober = Job::new()
        .with("path", &path)
        .with("holder_pid", &holder_pid);
    let out = wait_all(
        spawn_workers(&worker!(worker_lock_prober), &[prober]),
        Duration::from_secs(60),
    );
    assert!(out[0].marker("PROBE OK").is_some(), "{out:?}");
    if let Some(msg) = out[0].marker("PIDMISMATCH ") {
        eprintln!("note: {msg}");
    }

    let mut waiter = start_blocked_waiter(&path);

    holder.send_line("release");
    holder.expect_marker("RELEASED", Duration::from_secs(20));
    waiter.expect_marker("ACQUIRED", Duration::from_secs(20));
    let (status, _, stderr) = waiter.finish(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "waiter: {stderr}");
    let (status, _, stderr) = holder.finish(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "holder: {stderr}");

    // Nobody holds the range any more.
    let out = wait_all(
        spawn_workers(&worker!(worker_lock_try), &[Job::new().with("path", &path)]),
        Duration::from_secs(30),
    );
    assert_eq!(out[0].marker("TRY ").as_deref(), Some("OK"), "{out:?}");
}

/// A process SIGKILLed while blocked in F_SETLKW dies promptly, never gets the
/// lock, and does not keep it from the next process once the holder releases
/// it. With ltxfs's lock table that takes its reaper: fuser does not pass on
/// the kernel's FUSE_INTERRUPT.
#[test]
fn posix_lock_waiter_killed_while_blocked() {
    posix_lock_waiter_killed_while_blocked_with("");
}

#[test]
fn posix_lock_waiter_killed_while_blocked_with_ltxfs_locks() {
    posix_lock_waiter_killed_while_blocked_with(LTXFS_LOCKS);
}

fn posix_lock_waiter_killed_while_blocked_with(extra_yaml: &str) {
    let (mount, path) = mount_with_lock_db(extra_yaml);
    let mut holder = StreamingWorker::spawn(
        &worker!(worker_lock_holder),
        &Job::new().with("path", &path),
    );
    holder.expect_marker("LOCKED ", Duration::from_secs(30));

    let mut doomed = start_blocked_waiter(&path);
    let pid = doomed.pid();
    send_signal(pid, libc::SIGKILL);
    let status = reap_after_kill(&mut doomed.child);
    assert!(
        status.is_some(),
        "a process SIGKILLed while blocked in F_SETLKW on the mount did not die within 10 s \
         (state {}); ltxfs stderr:\n{}",
        process_state(pid),
        mount.stderr_text()
    );
    let lines = doomed.kill_and_collect();
    assert!(
        !lines.iter().any(|l| l.contains("ACQUIRED")),
        "killed waiter got the lock: {lines:?}"
    );

    holder.send_line("release");
    holder.expect_marker("RELEASED", Duration::from_secs(20));
    let (status, _, stderr) = holder.finish(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "holder: {stderr}");
    let out = wait_all(
        spawn_workers(&worker!(worker_lock_try), &[Job::new().with("path", &path)]),
        Duration::from_secs(30),
    );
    assert_eq!(
        out[0].marker("TRY ").as_deref(),
        Some("OK"),
        "the range is still locked after the holder released it and the waiter died"
    );
}

/// Spawns a `worker_lock_waiter` and waits until it is blocked in F_SETLKW.
fn start_blocked_waiter(path: &str) -> StreamingWorker {
    let mut waiter =
        StreamingWorker::spawn(&worker!(worker_lock_waiter), &Job::new().with("path", path));
    waiter.expect_marker("WAITING", Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !in_fcntl(waiter.pid()) {
        if let Some(line) = waiter.next_line(POLL) {
            panic!("F_SETLKW returned while a conflicting lock was held: {line}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never blocked in fcntl"
        );
    }
    waiter
}

// ---------------------------------------------------------------------------------
// Cache spills and journal mode changes
// ---------------------------------------------------------------------------------

/// A transaction bigger than the page cache spills pages to the database (rollback
/// modes) or to the WAL before COMMIT; ROLLBACK must still restore everything.
fn cache_spill(mode: &str) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("spill.db");
    let conn = open_db(&db);
    set_journal_mode(&conn, mode);
    conn.execute_batch(
        "PRAGMA cache_size=10; CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT); CREATE INDEX t_s ON t(s);",
    )
    .unwrap();
    fill_blobs(&conn, 1000, 1000);
    let before = dump(&conn);
    conn.execute_batch(
        "BEGIN;
         UPDATE t SET b = randomblob(1200);
         INSERT INTO t(b, s) SELECT randomblob(900), 'new ' || id FROM t WHERE id % 2 = 0;
         DELETE FROM t WHERE id % 3 = 0;
         ROLLBACK;",
    )
    .unwrap();
    assert_eq!(
        dump(&conn),
        before,
        "{mode}: ROLLBACK of a spilled transaction"
    );
    assert_eq!(
        dump(&open_db(&db)),
        before,
        "{mode}: seen by a fresh connection"
    );
    assert_eq!(integrity_check(&conn), "ok");
    conn.execute_batch(
        "BEGIN;
         UPDATE t SET s = s || '!', b = randomblob(700) WHERE id % 2 = 1;
         INSERT INTO t(b, s) SELECT randomblob(1100), 'copy ' || id FROM t WHERE id % 5 = 0;
         COMMIT;",
    )
    .unwrap();
    let after = dump(&conn);
    assert_eq!(dump(&open_db(&db)), after, "{mode}: committed spill");
    drop(conn);
    mount.restart();
    let conn = open_db(&db);
    assert_eq!(dump(&conn), after, "{mode}: after remount");
    assert_eq!(integrity_check(&conn), "ok");
}

#[test]
fn cache_spill_rollback_delete() {
    cache_spill("delete");
}

#[test]
fn cache_spill_rollback_wal() {
    cache_spill("wal");
}

#[test]
fn journal_mode_switching() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("switch.db");
    let conn = open_db(&db);
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB, s TEXT)")
        .unwrap();
    let modes = [
        "delete", "wal", "truncate", "wal", "persist", "memory", "wal", "delete",
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        set_journal_mode(&conn, mode);
        fill_blobs(&conn, 50, 300 + i as i64 * 100);
        conn.execute("UPDATE t SET s = s || ?1 WHERE id % 4 = 0", [mode])
            .unwrap();
        assert_eq!(
            query_i64(&conn, "SELECT count(*) FROM t"),
            50 * (i as i64 + 1)
        );
        let fresh = open_db(&db);
        assert_eq!(dump(&fresh), dump(&conn), "after switching to {mode}");
    }
    assert_eq!(integrity_check(&conn), "ok");
    let expected = dump(&conn);
    let names = list_dir(mount.path());
    assert!(
        !names.iter().any(|n| n.ends_with("-wal")),
        "WAL file left after leaving WAL mode: {names:?}"
    );
    drop(conn);
    mount.restart();
    let conn = open_db(&db);
    assert_eq!(dump(&conn), expected);
    assert_eq!(integrity_check(&conn), "ok");
}
