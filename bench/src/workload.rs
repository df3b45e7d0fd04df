//! The SQLite workloads the benchmark measures. Each one only needs a directory to
//! create its database in, so it runs unchanged on every target.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::backup::{Backup, StepResult};

use super::{BenchError, Target};

/// The size of the value stored in each row.
pub(super) const PAYLOAD_BYTES: usize = 100;
/// The database used by the read workloads, in each target's directory.
const READ_DB: &str = "read.db";
/// Rows inserted per step while building the read database.
const BUILD_CHUNK_ROWS: u64 = 10_000;
/// SELECTs per explicit read transaction in `Workload::SelectBatched`.
const SELECTS_PER_TRANSACTION: u64 = 1000;
/// SELECTs between two looks at the clock in `Workload::SelectPerTransaction`.
const SELECTS_PER_CLOCK_CHECK: u64 = 100;
/// How long a connection waits for a lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const CREATE_TABLE: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB NOT NULL)";
pub(super) const INSERT: &str = "INSERT INTO t(v) VALUES (?1)";
const SELECT: &str = "SELECT v FROM t WHERE id = ?1";

/// Who serves SQLite's locks on the measured mounts (`fuse.locks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockServer {
    /// The kernel, the default: lock calls make no FUSE request.
    Kernel,
    /// ltxfs itself: every lock call is a FUSE request.
    Ltxfs,
}

/// One measured workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// One autocommit INSERT per transaction, WAL journal, `synchronous=NORMAL`.
    InsertWalNormal,
    /// One autocommit INSERT per transaction, WAL journal, `synchronous=FULL`.
    InsertWalFull,
    /// One autocommit INSERT per transaction, DELETE journal, `synchronous=FULL`.
    InsertDeleteFull,
    /// Random point SELECTs by rowid, each in its own autocommit read transaction.
    SelectPerTransaction,
    /// Random point SELECTs by rowid, 1000 per explicit read transaction.
    SelectBatched,
}

impl Workload {
    /// Every workload, in the order they run and are reported.
    pub const ALL: [Workload; 5] = [
        Workload::InsertWalNormal,
        Workload::InsertWalFull,
        Workload::InsertDeleteFull,
        Workload::SelectPerTransaction,
        Workload::SelectBatched,
    ];

    /// A short description for the report.
    pub fn name(self) -> &'static str {
        match self {
            Workload::InsertWalNormal => "insert, WAL, synchronous=NORMAL",
            Workload::InsertWalFull => "insert, WAL, synchronous=FULL",
            Workload::InsertDeleteFull => "insert, DELETE, synchronous=FULL",
            Workload::SelectPerTransaction => "point select, 1 per read txn",
            Workload::SelectBatched => "point select, 1000 per read txn",
        }
    }

    /// The lowest acceptable ratio of mount to native throughput.
    pub fn goal(self) -> f64 {
        match self {
            Workload::InsertWalNormal => 0.2,
            Workload::InsertWalFull | Workload::InsertDeleteFull => 0.6,
            Workload::SelectPerTransaction => 0.5,
            Workload::SelectBatched => 0.95,
        }
    }

    /// How many FUSE requests one operation makes (a SELECT, for the read
    /// workloads) when `locks` serves SQLite's locks, counted from ltxfs's
    /// `fuse.debug` log. Lookups and attribute reads the kernel may answer
    /// from its cache, and reads of pages it holds, are not counted.
    pub fn fuse_requests(self, locks: LockServer) -> f64 {
        // Six `fcntl` lock calls on the `-shm` file when ltxfs serves them (take
        // and release a read mark exclusively to advance it, take it shared, take
        // and release the writer lock, release the read mark).
        let wal_locks = match locks {
            LockServer::Kernel => 0.0,
            LockServer::Ltxfs => 6.0,
        };
        match self {
            // Two writes: SQLite writes a WAL frame's header and its page
            // separately. (Three while a new WAL grows: the kernel splits the
            // page's write at the page of its cache that the write only partly
            // covers, until ltxfs has it read the WAL when the WAL restarts.)
            Workload::InsertWalNormal => wal_locks + 2.0,
            // The same and the WAL's `fsync`.
            Workload::InsertWalFull => wal_locks + 3.0,
            // Ten writes (the journal is not cached, so each of SQLite's writes
            // is one), three `fsync`s (the journal twice, the database), the
            // directory's sync, two `getattr`s, a read past the journal's end,
            // the journal's lookup, create, `fchown`, `unlink`, release and
            // forget; and, when ltxfs serves them, nine lock calls on the
            // database and the journal's flush.
            Workload::InsertDeleteFull => match locks {
                LockServer::Kernel => 23.0,
                LockServer::Ltxfs => 33.0,
            },
            // Taking and releasing a read mark.
            Workload::SelectPerTransaction => match locks {
                LockServer::Kernel => 0.0,
                LockServer::Ltxfs => 2.0,
            },
            Workload::SelectBatched => match locks {
                LockServer::Kernel => 0.0,
                LockServer::Ltxfs => 2.0 / SELECTS_PER_TRANSACTION as f64,
            },
        }
    }

    /// The journal mode and `synchronous` setting of an insert workload.
    fn insert_settings(self) -> Option<(&'static str, &'static str)> {
        match self {
            Workload::InsertWalNormal => Some(("wal", "NORMAL")),
            Workload::InsertWalFull => Some(("wal", "FULL")),
            Workload::InsertDeleteFull => Some(("delete", "FULL")),
            Workload::SelectPerTransaction | Workload::SelectBatched => None,
        }
    }

    /// The file name of the workload's database in a target's directory.
    pub(super) fn database_name(self) -> &'static str {
        match self {
            Workload::InsertWalNormal => "insert-wal-normal.db",
            Workload::InsertWalFull => "insert-wal-full.db",
            Workload::InsertDeleteFull => "insert-delete-full.db",
            Workload::SelectPerTransaction | Workload::SelectBatched => READ_DB,
        }
    }
}

/// The database the read workloads query, present in every target's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReadDatabase {
    /// Rows in table `t`, with ids 1 to `rows`.
    pub(super) rows: u64,
    /// The size of the database file.
    pub(super) bytes: u64,
}

impl ReadDatabase {
    /// Builds the database in the first target's directory with one bulk insert, in
    /// WAL mode, until it holds at least `target_bytes`, then copies it page for page
    /// into the other targets with SQLite's backup API.
    ///
    /// The copy goes through SQLite rather than `std::fs::copy` so that a
    /// replicating filesystem sees ordinary transactions; the pages, and so the
    /// layout the reads walk through, are the same.
    pub(super) fn build(targets: &[Target], target_bytes: u64) -> Result<ReadDatabase, BenchError> {
        let Some((first, others)) = targets.split_first() else {
            return Ok(ReadDatabase { rows: 0, bytes: 0 });
        };
        let path_buf = first.dir.join(READ_DB);
        let path = path_buf.as_path();
        let conn = create_database(path, "wal")?;
        let sql = |action| move |cause| sql_error(action, path, cause);
        conn.execute_batch("BEGIN")
            .map_err(sql("begin the bulk insert"))?;
        let mut rng = Rng::new(1);
        let mut payload = [0u8; PAYLOAD_BYTES];
        let mut rows = 0;
        // Every row takes more than PAYLOAD_BYTES, so this many chunks always suffice.
        let max_chunks = target_bytes / (BUILD_CHUNK_ROWS * PAYLOAD_BYTES as u64) + 1;
        {
            let mut insert = conn.prepare(INSERT).map_err(sql("prepare the insert"))?;
            for _ in 0..max_chunks {
                for _ in 0..BUILD_CHUNK_ROWS {
                    rng.fill(&mut payload);
                    insert
                        .execute([&payload[..]])
                        .map_err(sql("insert a row"))?;
                }
                rows += BUILD_CHUNK_ROWS;
                if database_bytes(&conn, path)? >= target_bytes {
                    break;
                }
            }
        }
        conn.execute_batch("COMMIT")
            .map_err(sql("commit the bulk insert"))?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(sql("checkpoint"))?;
        let bytes = database_bytes(&conn, path)?;
        for target in others {
            copy_database(&conn, path, &target.dir.join(READ_DB), rows)?;
        }
        Ok(ReadDatabase { rows, bytes })
    }
}

/// An open database on one target, ready to run one workload repeatedly.
pub(super) struct Session {
    workload: Workload,
    conn: Connection,
    path: PathBuf,
    rows: u64,
    payload: [u8; PAYLOAD_BYTES],
    rng: Rng,
}

impl Session {
    /// Opens the workload's database on `target`: a fresh empty one for the insert
    /// workloads, the read database (built beforehand) for the read workloads.
    pub(super) fn open(
        workload: Workload,
        target: &Target,
        read_db: &ReadDatabase,
    ) -> Result<Session, BenchError> {
        let path = target.dir.join(workload.database_name());
        let mut rng = Rng::new(2);
        let mut payload = [0u8; PAYLOAD_BYTES];
        rng.fill(&mut payload);
        let conn = match workload.insert_settings() {
            Some((journal_mode, synchronous)) => {
                let conn = create_database(&path, journal_mode)?;
                conn.pragma_update(None, "synchronous", synchronous)
                    .map_err(|cause| sql_error("set synchronous", &path, cause))?;
                conn
            }
            None => {
                let conn = open_database(&path)?;
                expect_journal_mode(&conn, &path, "wal")?;
                conn
            }
        };
        Ok(Session {
            workload,
            conn,
            path,
            rows: read_db.rows,
            payload,
            rng,
        })
    }

    /// Runs the workload for about `duration` and returns operations per second:
    /// committed transactions for inserts, SELECT statements for reads.
    pub(super) fn run_for(&mut self, duration: Duration) -> Result<f64, BenchError> {
        let path = &self.path;
        let sql = |action| move |cause| sql_error(action, path, cause);
        let started = Instant::now();
        let deadline = started + duration;
        let mut operations: u64 = 0;
        match self.workload {
            Workload::InsertWalNormal | Workload::InsertWalFull | Workload::InsertDeleteFull => {
                let mut insert = self
                    .conn
                    .prepare_cached(INSERT)
                    .map_err(sql("prepare the insert"))?;
                while Instant::now() < deadline {
                    insert
                        .execute([&self.payload[..]])
                        .map_err(sql("insert a row"))?;
                    operations += 1;
                }
            }
            Workload::SelectPerTransaction => {
                let mut select = self
                    .conn
                    .prepare_cached(SELECT)
                    .map_err(sql("prepare the select"))?;
                while Instant::now() < deadline {
                    for _ in 0..SELECTS_PER_CLOCK_CHECK {
                        select_one(&mut select, self.rng.id(self.rows))
                            .map_err(sql("select a row"))?;
                    }
                    operations += SELECTS_PER_CLOCK_CHECK;
                }
            }
            Workload::SelectBatched => {
                let mut select = self
                    .conn
                    .prepare_cached(SELECT)
                    .map_err(sql("prepare the select"))?;
                while Instant::now() < deadline {
                    self.conn
                        .execute_batch("BEGIN")
                        .map_err(sql("begin a read transaction"))?;
                    for _ in 0..SELECTS_PER_TRANSACTION {
                        select_one(&mut select, self.rng.id(self.rows))
                            .map_err(sql("select a row"))?;
                    }
                    self.conn
                        .execute_batch("COMMIT")
                        .map_err(sql("end a read transaction"))?;
                    operations += SELECTS_PER_TRANSACTION;
                }
            }
        }
        Ok(operations as f64 / started.elapsed().as_secs_f64())
    }
}

/// Reads one row's value and checks that it exists.
fn select_one(select: &mut rusqlite::CachedStatement<'_>, id: i64) -> rusqlite::Result<usize> {
    select.query_row([id], |row| Ok(row.get_ref(0)?.as_blob()?.len()))
}

/// Removes any earlier copy of the database, then creates it with table `t`.
pub(super) fn create_database(path: &Path, journal_mode: &str) -> Result<Connection, BenchError> {
    remove_database(path)?;
    let conn = open_database(path)?;
    set_journal_mode(&conn, path, journal_mode)?;
    conn.execute_batch(CREATE_TABLE)
        .map_err(|cause| sql_error("create the table", path, cause))?;
    Ok(conn)
}

/// Sets the journal mode and checks that SQLite accepted it.
fn set_journal_mode(conn: &Connection, path: &Path, journal_mode: &str) -> Result<(), BenchError> {
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", journal_mode, |row| row.get(0))
        .map_err(|cause| sql_error("set the journal mode", path, cause))?;
    if mode.eq_ignore_ascii_case(journal_mode) {
        Ok(())
    } else {
        Err(BenchError::Database {
            path: path.to_path_buf(),
            problem: format!("asked for journal_mode={journal_mode}, SQLite chose {mode}"),
        })
    }
}

fn open_database(path: &Path) -> Result<Connection, BenchError> {
    let conn =
        Connection::open(path).map_err(|cause| sql_error("open the database", path, cause))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|cause| sql_error("set the busy timeout", path, cause))?;
    Ok(conn)
}

/// Deletes a database and the files SQLite keeps beside it, if they exist.
fn remove_database(path: &Path) -> Result<(), BenchError> {
    for suffix in ["", "-journal", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let file = PathBuf::from(file);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(cause) => {
                return Err(BenchError::Io {
                    action: "remove the old database file",
                    path: file,
                    cause,
                });
            }
        }
    }
    Ok(())
}

fn expect_journal_mode(conn: &Connection, path: &Path, expected: &str) -> Result<(), BenchError> {
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .map_err(|cause| sql_error("read the journal mode", path, cause))?;
    if mode.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(BenchError::Database {
            path: path.to_path_buf(),
            problem: format!("journal_mode is {mode}, expected {expected}"),
        })
    }
}

/// The database's size as SQLite sees it, including uncommitted pages.
fn database_bytes(conn: &Connection, path: &Path) -> Result<u64, BenchError> {
    let (pages, page_size): (i64, i64) = conn
        .query_row(
            "SELECT page_count, page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(|cause| sql_error("read the database size", path, cause))?;
    // SQLite reports both as non-negative numbers; treat anything else as empty.
    Ok(u64::try_from(pages.saturating_mul(page_size)).unwrap_or(0))
}

/// Copies the database behind `source` to `destination` with the backup API, then
/// checks that the copy has all rows.
///
/// The destination is switched to WAL before the copy, so the copied pages first go
/// to the WAL and reach the database file at the checkpoint, in page order starting
/// with page 1. In rollback mode SQLite would spill later pages of a copy larger than
/// its cache into the new file before page 1, which ltxfs refuses as non-SQLite
/// content.
fn copy_database(
    source: &Connection,
    source_path: &Path,
    destination: &Path,
    rows: u64,
) -> Result<(), BenchError> {
    remove_database(destination)?;
    let mut conn = open_database(destination)?;
    set_journal_mode(&conn, destination, "wal")?;
    {
        let backup = Backup::new(source, &mut conn)
            .map_err(|cause| sql_error("start copying the read database", destination, cause))?;
        // A negative page count copies every page in one step.
        let step = backup
            .step(-1)
            .map_err(|cause| sql_error("copy the read database", destination, cause))?;
        if step != StepResult::Done {
            return Err(BenchError::Database {
                path: destination.to_path_buf(),
                problem: format!("copying {} stopped early ({step:?})", source_path.display()),
            });
        }
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .map_err(|cause| sql_error("checkpoint the copy", destination, cause))?;
    let copied: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .map_err(|cause| sql_error("count the copied rows", destination, cause))?;
    if u64::try_from(copied) != Ok(rows) {
        return Err(BenchError::Database {
            path: destination.to_path_buf(),
            problem: format!("the copy has {copied} rows, expected {rows}"),
        });
    }
    expect_journal_mode(&conn, destination, "wal")
}

pub(super) fn sql_error(action: &'static str, path: &Path, cause: rusqlite::Error) -> BenchError {
    BenchError::Sqlite {
        action,
        path: path.to_path_buf(),
        cause,
    }
}

/// A small deterministic pseudo-random generator (SplitMix64); good enough to pick
/// rows and fill payloads, and it keeps the benchmark free of extra dependencies.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A row id between 1 and `rows` (1 when there are no rows).
    pub(crate) fn id(&mut self, rows: u64) -> i64 {
        let id = self.next() % rows.max(1) + 1;
        i64::try_from(id).unwrap_or(i64::MAX)
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let random = self.next().to_le_bytes();
            chunk.copy_from_slice(&random[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_in_range() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            let id = rng.id(10);
            assert!((1..=10).contains(&id));
        }
    }

    #[test]
    fn workloads_have_distinct_names() {
        let mut names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Workload::ALL.len());
    }
}
