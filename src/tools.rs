//! `ltxfs export` and `ltxfs import`: copy one database out of a running mount, or
//! replace one database on it, with SQLite's online backup API.
//!
//! Both tools work *through the mount* (`<mount>/<name>`), as ordinary SQLite
//! clients, so SQLite's own locking keeps them consistent with the applications that
//! use the database at the same time, and change capture sees an import exactly as
//! it sees any other transaction.
//!
//! Invariants:
//! - Nothing is changed before every check that can fail on bad input has passed: the
//!   name, the mount, and (for an import) the source file's header, size,
//!   `PRAGMA quick_check` and page size. (An import into a database that does not
//!   exist yet creates it, empty, before reading its format.)
//! - An export never leaves a half-written destination: the copy is written to a
//!   temporary file beside the destination, converted to a standalone database
//!   (journal mode DELETE), synced, and only then renamed into place; the directory
//!   is synced after the rename. On any failure the temporary file is removed.
//! - An export is a consistent snapshot: the backup API restarts from the first page
//!   whenever another connection changes the database between steps. When the
//!   database changes so often that the stepwise copy keeps restarting, the rest is
//!   copied in one step, inside one read transaction.
//! - An import is one write transaction on the destination (a single backup step
//!   over all pages), so the mount captures it as exactly one change set.
//! - An import never changes a database's page size in a way that cannot work:
//!   SQLite refuses another page size in WAL mode, and the mount only accepts whole
//!   pages, so a larger source page size is refused for a non-empty database in any
//!   mode (a smaller one is fine in rollback mode; an empty database takes the
//!   source's page size). The error says how to convert the file.
//! - Waiting for locks is bounded: a tool that cannot get its locks for
//!   [`LOCK_WAIT_LIMIT`] gives up with [`ToolError::Busy`] instead of hanging.
//! - The tools print nothing; they return a one-line summary for the caller to show.
//!
//! Known behaviour of the backup API worth knowing: when the destination of an
//! import is not in WAL mode, it takes the source's file-format bytes, so importing a
//! WAL-mode file switches the database to WAL mode (SQLite's applications follow
//! such a switch by themselves). Files written by `ltxfs export` are in DELETE mode.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use crate::mountinfo;
use crate::store::{
    FileKind, HeaderError, POSITION_SUFFIX, Position, StoreError, page_size_from_header, parse_name,
};

/// How long a tool keeps retrying when SQLite reports the database busy or locked.
pub const LOCK_WAIT_LIMIT: Duration = Duration::from_secs(30);

/// The busy timeout of the tools' connections: one attempt's wait for a lock.
/// Retries beyond it are counted against [`LOCK_WAIT_LIMIT`].
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);
/// How many times an export copies a database whose copy does not match the
/// checksum `-pos` showed, before it reports the mismatch: a commit slips in
/// only within microseconds of SQLite's own (see `copy_pages_at_one_position`).
const COPY_ATTEMPTS: u32 = 3;

/// The pause before retrying a busy or locked step.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Why an export or import failed. Every message names the file or database
/// concerned and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The database name cannot name a database in the mount root.
    #[error("invalid database name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The directory is not an ltxfs mount.
    #[error("{} is not an ltxfs mount: start `ltxfs mount` first or pass --mount", path.display())]
    NotMounted {
        /// The directory that was checked.
        path: PathBuf,
    },
    /// The database to export does not exist on the mount.
    #[error("database {name:?} does not exist in {}", mount.display())]
    NoSuchDatabase {
        /// The database name.
        name: String,
        /// The mount directory.
        mount: PathBuf,
    },
    /// The file to import is not a usable SQLite database.
    #[error("cannot import {}: {reason}", path.display())]
    InvalidSource {
        /// The file given to import.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The export destination cannot be used.
    #[error("cannot export to {}: {reason}", path.display())]
    InvalidDestination {
        /// The destination path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The source has another page size than the destination, and the copy cannot
    /// change it: SQLite's backup cannot write another page size into a WAL-mode
    /// database, and the mount cannot grow a database's page size in place (the
    /// larger pages would reach it as partial pages).
    #[error(
        "cannot import {} into {name}: its page size is {source_page_size} but {name} uses \
         {destination_page_size} ({why}); convert the file first with \
         `sqlite3 {} 'PRAGMA journal_mode=DELETE; PRAGMA page_size={destination_page_size}; VACUUM;'`",
        path.display(),
        path.display()
    )]
    PageSizeMismatch {
        /// The file given to import.
        path: PathBuf,
        /// The destination database.
        name: String,
        /// The page size of the file.
        source_page_size: u32,
        /// The page size of the destination database.
        destination_page_size: u32,
        /// Why the page sizes must match here.
        why: &'static str,
    },
    /// The locks needed were not available within [`LOCK_WAIT_LIMIT`].
    #[error("gave up {what} after waiting {waited:?} for the database to be unlocked")]
    Busy {
        /// What the tool was doing.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
    /// An export's pages do not give the checksum `-pos` showed for their TXID.
    #[error("the copy of {name} does not match TXID {txid:016x}: {reason}")]
    CopyMismatch {
        /// The database.
        name: String,
        /// The TXID the copy was taken at.
        txid: u64,
        /// What differed.
        reason: String,
    },
    /// A `-pos` file could not be read or parsed.
    #[error("cannot read the position of {name} from {}: {reason}", path.display())]
    Position {
        /// The database.
        name: String,
        /// The `-pos` file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// SQLite failed.
    #[error("{context}: {source}")]
    Sqlite {
        /// What the tool was doing.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The filesystem failed.
    #[error("{context}: {source}")]
    Io {
        /// What the tool was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ToolError {
    fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> ToolError {
        let context = context.into();
        move |source| ToolError::Sqlite { context, source }
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ToolError {
        let context = context.into();
        move |source| ToolError::Io { context, source }
    }
}

/// What an export did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The exported database.
    pub name: String,
    /// Where the copy was written (absolute).
    pub destination: PathBuf,
    /// Pages in the copy.
    pub pages: u64,
    /// The TXID the copy holds the database at.
    pub txid: u64,
    /// The database's LTX checksum at that TXID, which the copy has (as `-pos`
    /// showed it).
    pub checksum: u64,
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exported {} pages of {} to {} at TXID {:016x}, checksum {:016x}",
            self.pages,
            self.name,
            self.destination.display(),
            self.txid,
            self.checksum
        )
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// The replaced database.
    pub name: String,
    /// The imported file.
    pub source: PathBuf,
    /// Pages copied.
    pub pages: u64,
    /// The database's TXID read just after the import.
    pub txid: u64,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} pages into {} at TXID {:016x}",
            self.pages, self.name, self.txid
        )
    }
}

/// Writes a copy of database `name` on the mount at `mount_dir` to
/// `destination`, while applications keep writing to it: exactly the pages the
/// database has at one TXID, so its LTX checksum is the one `-pos` showed for
/// that TXID (checked before the copy is kept).
///
/// `destination` is replaced atomically, and only once the copy is complete and
/// synced. Refuses when a `-wal`, `-journal` or `-shm` file sits beside
/// `destination`, since SQLite would apply it to the new file.
pub fn export(
    mount_dir: &Path,
    name: &str,
    destination: &Path,
) -> Result<ExportSummary, ToolError> {
    check_name(name)?;
    let mount = check_mount(mount_dir)?;
    let db_path = mount.join(name);
    match fs::metadata(&db_path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => {
            return Err(ToolError::NoSuchDatabase {
                name: name.to_string(),
                mount,
            });
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(ToolError::NoSuchDatabase {
                name: name.to_string(),
                mount,
            });
        }
        Err(error) => {
            return Err(ToolError::Io {
                context: format!("cannot stat {}", db_path.display()),
                source: error,
            });
        }
    }
    let destination = check_destination(destination)?;
    if is_same_file(&parent_dir(&destination), &mount) {
        return Err(ToolError::InvalidDestination {
            path: destination,
            reason: "it is inside the mount; export to a directory outside it".to_string(),
        });
    }

    // The source is opened read-only: the export must never write to the mount, not
    // even a checkpoint when its connection closes.
    let source = Connection::open_with_flags(
        &db_path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ToolError::sqlite(format!(
        "cannot open {}",
        db_path.display()
    )))?;
    source
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(ToolError::sqlite("cannot set the busy timeout"))?;

    let temp = TempFile::create_beside(&destination)?;
    let (pages, position) = copy_pages_at_one_position(&source, &mount, name, &temp.path)?;
    drop(source);

    temp.persist(&destination)?;
    tracing::debug!(name, destination = %destination.display(), pages, "exported");
    Ok(ExportSummary {
        name: name.to_string(),
        destination,
        pages,
        txid: position.txid.0,
        checksum: position.checksum.0,
    })
}

/// Replaces database `name` on the mount at `mount_dir` with the content of the
/// SQLite file `source`, as one transaction (one change set). Creates the database
/// when it does not exist yet.
///
/// `source` must start with the SQLite header, be whole pages long, open read-only
/// and pass `PRAGMA quick_check`; otherwise nothing is changed. When the database is
/// in WAL mode the page sizes must match.
pub fn import(mount_dir: &Path, name: &str, source: &Path) -> Result<ImportSummary, ToolError> {
    check_name(name)?;
    let mount = check_mount(mount_dir)?;
    let source_path = std::path::absolute(source)
        .map_err(ToolError::io(format!("bad path {}", source.display())))?;
    let source_page_size = check_source_file(&source_path)?;
    let source_db = open_checked_source(&source_path)?;

    let db_path = mount.join(name);
    if is_same_file(&source_path, &db_path) {
        return Err(ToolError::InvalidSource {
            path: source_path,
            reason: format!("it is the database {name} itself"),
        });
    }
    let mut destination = Connection::open_with_flags(
        &db_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(ToolError::sqlite(format!(
        "cannot open {}",
        db_path.display()
    )))?;
    destination
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(ToolError::sqlite("cannot set the busy timeout"))?;

    let format = destination_format(&destination, name)?;
    let destination_page_size = format.page_size;
    let mismatch = |why| ToolError::PageSizeMismatch {
        path: source_path.clone(),
        name: name.to_string(),
        source_page_size,
        destination_page_size,
        why,
    };
    // An empty database takes the source's page size; otherwise only a WAL-mode
    // database with the same page size, or a rollback-mode one with the same or a
    // larger page size, can be copied into.
    if format.pages > 0 && source_page_size != destination_page_size {
        if format.wal {
            return Err(mismatch(WAL_PAGE_SIZE_REASON));
        }
        if source_page_size > destination_page_size {
            return Err(mismatch(LARGER_PAGE_SIZE_REASON));
        }
    }

    let pages = {
        let backup = Backup::new(&source_db, &mut destination).map_err(ToolError::sqlite(
            format!("cannot start copying {} into {name}", source_path.display()),
        ))?;
        let what = format!("importing {} into {name}", source_path.display());
        // One step over all pages: SQLite copies them in one write transaction.
        match step_with_retry(&backup, -1, &what) {
            Ok(_) => {}
            Err(ToolError::Sqlite {
                source: rusqlite::Error::SqliteFailure(error, _),
                ..
            }) if error.code == rusqlite::ErrorCode::ReadOnly
                && destination_page_size != source_page_size =>
            {
                // The database switched to WAL mode after the check above.
                return Err(mismatch(WAL_PAGE_SIZE_REASON));
            }
            Err(error) => return Err(error),
        }
        page_count(&backup)
    };
    destination
        .close()
        .map_err(|(_, error)| ToolError::Sqlite {
            context: format!("cannot close {}", db_path.display()),
            source: error,
        })?;
    drop(source_db);

    let txid = read_txid(&mount, name)?;
    tracing::debug!(name, source = %source_path.display(), pages, "imported");
    Ok(ImportSummary {
        name: name.to_string(),
        source: source_path,
        pages,
        txid,
    })
}

/// Refuses names that cannot name a database in the mount root: the mount's own
/// naming rule decides, and every companion (`-wal`, `-shm`, `-journal`, `-mj…`) and
/// reserved name (`-pos`, leading `.`) is refused.
fn check_name(name: &str) -> Result<(), ToolError> {
    let invalid = |reason: String| ToolError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let parsed = parse_name(name).map_err(|error| match error {
        StoreError::InvalidName { reason, .. } => invalid(reason.to_string()),
        other => invalid(other.to_string()),
    })?;
    if parsed.kind != FileKind::Database {
        return Err(invalid(format!(
            "it names a companion file of database {:?}, not a database",
            parsed.database
        )));
    }
    Ok(())
}

/// Returns the absolute mount directory after checking that it is an ltxfs mount.
fn check_mount(mount_dir: &Path) -> Result<PathBuf, ToolError> {
    let absolute = std::path::absolute(mount_dir)
        .map_err(ToolError::io(format!("bad path {}", mount_dir.display())))?;
    // The mount table holds canonical paths; a path through a symlink is resolved
    // first. A dead mount cannot be resolved (ENOTCONN), so the plain absolute path
    // is tried too.
    let mut candidates = vec![absolute.clone()];
    if let Ok(canonical) = fs::canonicalize(&absolute)
        && canonical != absolute
    {
        candidates.push(canonical);
    }
    for candidate in candidates {
        let mounted = mountinfo::is_ltxfs_mount(&candidate)
            .map_err(ToolError::io("cannot read /proc/self/mountinfo"))?;
        if mounted {
            return Ok(candidate);
        }
    }
    Err(ToolError::NotMounted { path: absolute })
}

/// Checks that `destination` can receive an export and returns it absolute.
fn check_destination(destination: &Path) -> Result<PathBuf, ToolError> {
    let invalid = |reason: String| ToolError::InvalidDestination {
        path: destination.to_path_buf(),
        reason,
    };
    let absolute = std::path::absolute(destination).map_err(|error| invalid(error.to_string()))?;
    if absolute.file_name().is_none() {
        return Err(invalid("it does not name a file".to_string()));
    }
    if let Ok(meta) = fs::metadata(&absolute)
        && meta.is_dir()
    {
        return Err(invalid(
            "it is a directory; give the path of the file to write".to_string(),
        ));
    }
    let parent = parent_dir(&absolute);
    if !parent.is_dir() {
        return Err(invalid(format!(
            "the directory {} does not exist",
            parent.display()
        )));
    }
    for suffix in ["-wal", "-journal", "-shm"] {
        let companion = companion_path(&absolute, suffix);
        if fs::symlink_metadata(&companion).is_ok() {
            return Err(invalid(format!(
                "{} exists and SQLite would apply it to the new file; remove it or choose \
                 another path",
                companion.display()
            )));
        }
    }
    Ok(absolute)
}

/// Checks the header and size of a file to import; returns its page size.
fn check_source_file(path: &Path) -> Result<u32, ToolError> {
    let invalid = |reason: String| ToolError::InvalidSource {
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|error| {
        if error.kind() == io::ErrorKind::NotFound {
            invalid("the file does not exist".to_string())
        } else {
            invalid(format!("cannot stat it: {error}"))
        }
    })?;
    if !meta.is_file() {
        return Err(invalid("it is not a regular file".to_string()));
    }
    let mut header = Vec::with_capacity(100);
    File::open(path)
        .and_then(|file| file.take(100).read_to_end(&mut header))
        .map_err(|error| invalid(format!("cannot read it: {error}")))?;
    let page_size = page_size_from_header(&header).map_err(|error| {
        invalid(match error {
            HeaderError::NotSqlite => "it is not a SQLite database (it does not start with the \
                                       header \"SQLite format 3\\0\")"
                .to_string(),
            HeaderError::Truncated(len) => {
                format!("it is truncated: {len} bytes, shorter than the 100-byte SQLite header")
            }
            HeaderError::InvalidPageSize(size) => {
                format!("it is corrupt: the header declares an invalid page size {size}")
            }
        })
    })?;
    // With a WAL beside it, the file may legitimately lag behind its header (a
    // checkpoint was interrupted), and the WAL holds the rest; quick_check decides.
    if fs::symlink_metadata(companion_path(path, "-wal")).is_err() {
        let len = meta.len();
        let page = u64::from(page_size);
        if len % page != 0 {
            return Err(invalid(format!(
                "it is truncated or corrupt: its {len} bytes are not a whole number of \
                 {page_size}-byte pages"
            )));
        }
        let header_pages = u32::from_be_bytes([header[28], header[29], header[30], header[31]]);
        let change_counter = &header[24..28];
        let valid_for = &header[92..96];
        if header_pages != 0 && change_counter == valid_for && u64::from(header_pages) * page > len
        {
            return Err(invalid(format!(
                "it is truncated: its header says {header_pages} pages but the file holds \
                 only {}",
                len / page
            )));
        }
    }
    Ok(page_size)
}

/// Opens the file to import read-only and runs `PRAGMA quick_check` on it.
fn open_checked_source(path: &Path) -> Result<Connection, ToolError> {
    let invalid = |reason: String| ToolError::InvalidSource {
        path: path.to_path_buf(),
        reason,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|error| invalid(format!("SQLite cannot open it: {error}")))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(ToolError::sqlite("cannot set the busy timeout"))?;
    let rows: Vec<String> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|error| invalid(format!("PRAGMA quick_check failed: {error}")))?;
    if rows != ["ok"] {
        let mut problems: Vec<String> = rows.iter().take(3).cloned().collect();
        if rows.len() > 3 {
            problems.push(format!("and {} more", rows.len() - 3));
        }
        return Err(invalid(format!(
            "PRAGMA quick_check reports: {}",
            problems.join("; ")
        )));
    }
    Ok(conn)
}

/// What an import must know about its destination before copying.
struct DestinationFormat {
    /// The database is in WAL mode.
    wal: bool,
    /// Its page size.
    page_size: u32,
    /// Its size in pages (0 for a new, empty database).
    pages: u64,
}

/// Why page sizes must match when the destination is in WAL mode.
const WAL_PAGE_SIZE_REASON: &str = "SQLite cannot copy another page size into a WAL-mode database";
/// Why the source's page size must not be larger in rollback mode.
const LARGER_PAGE_SIZE_REASON: &str =
    "the mount cannot enlarge the page size of a database in place";

/// Reads the destination's journal mode, page size and page count. Reads the schema
/// first, so that the connection has seen page 1 and knows whether the file is in
/// WAL mode.
fn destination_format(conn: &Connection, name: &str) -> Result<DestinationFormat, ToolError> {
    let context = format!("cannot read the format of {name}");
    let deadline = Instant::now() + LOCK_WAIT_LIMIT;
    let read = || -> rusqlite::Result<DestinationFormat> {
        let tx = conn.unchecked_transaction()?;
        tx.query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        })?;
        let mode: String = tx.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
        let page_size: u32 = tx.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        let pages: i64 = tx.query_row("PRAGMA page_count", [], |row| row.get(0))?;
        tx.finish()?;
        Ok(DestinationFormat {
            wal: mode.eq_ignore_ascii_case("wal"),
            page_size,
            pages: u64::try_from(pages).unwrap_or(0),
        })
    };
    loop {
        match read() {
            Ok(format) => return Ok(format),
            Err(error) if is_busy(&error) && Instant::now() < deadline => {
                thread::sleep(RETRY_PAUSE);
            }
            Err(error) if is_busy(&error) => {
                return Err(ToolError::Busy {
                    what: context,
                    waited: LOCK_WAIT_LIMIT,
                });
            }
            Err(error) => return Err(ToolError::sqlite(context)(error)),
        }
    }
}

/// True for SQLite's transient lock errors (`SQLITE_BUSY`, `SQLITE_LOCKED`).
fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _)
            if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Writes the pages of `name` (open as `source`), exactly as of one TXID, to
/// the empty file at `temp`; returns how many, and the TXID and
/// checksum from `-pos`, which the copy is checked against.
///
/// The pages are read in one read transaction. `-pos` shows the position
/// every read transaction begun after it sees at least, so when it reads the
/// same just before the transaction starts and just after, the transaction
/// holds that TXID, unless a WAL writer published a commit in the wal-index
/// and had not yet ended its write transaction: the copy is checked against
/// the checksum, and taken again (up to [`COPY_ATTEMPTS`] times) when it
/// differs. In WAL mode writers go on meanwhile; in rollback modes they wait
/// until the pages are read.
fn copy_pages_at_one_position(
    source: &Connection,
    mount: &Path,
    name: &str,
    temp: &Path,
) -> Result<(u64, Position), ToolError> {
    let what = format!("copying {name} to {}", temp.display());
    let sqlite = |error| ToolError::sqlite(format!("failed {what}"))(error);
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        let before = read_position(mount, name)?;
        source.execute_batch("BEGIN").map_err(sqlite)?;
        let snapshot = source.query_row("SELECT count(*) FROM sqlite_master", [], |row| {
            row.get::<_, i64>(0)
        });
        let consistent = match snapshot {
            Ok(_) => read_position(mount, name)? == before,
            Err(error) if is_busy(&error) => false,
            Err(error) => return Err(sqlite(error)),
        };
        if !consistent {
            source.execute_batch("ROLLBACK").map_err(sqlite)?;
            let waited = started.elapsed();
            if waited >= LOCK_WAIT_LIMIT {
                return Err(ToolError::Busy { what, waited });
            }
            thread::sleep(RETRY_PAUSE);
            continue;
        }
        let copied = write_pages(source, temp);
        source.execute_batch("ROLLBACK").map_err(sqlite)?;
        let (file, pages, page_size) = copied.map_err(|error| match error {
            PageCopyError::Sqlite(error) => sqlite(error),
            PageCopyError::Io(source) => ToolError::Io {
                context: format!("cannot write {}", temp.display()),
                source,
            },
        })?;
        if pages > 0 {
            let commit = u32::try_from(pages).unwrap_or(u32::MAX);
            let verified =
                crate::ltx::verify_database_checksum(&file, page_size, commit, before.checksum);
            attempts += 1;
            match verified {
                Ok(()) => {}
                Err(_) if attempts < COPY_ATTEMPTS => continue,
                Err(error) => {
                    return Err(ToolError::CopyMismatch {
                        name: name.to_string(),
                        txid: before.txid.0,
                        reason: format!("{error} ({attempts} copies)"),
                    });
                }
            }
        }
        return Ok((pages, before));
    }
}

/// Why [`write_pages`] failed.
enum PageCopyError {
    Sqlite(rusqlite::Error),
    Io(io::Error),
}

/// Writes every page `source`'s read transaction sees, from `sqlite_dbpage`,
/// to `temp`; returns the file, the number of pages and the page size.
fn write_pages(source: &Connection, temp: &Path) -> Result<(File, u64, u32), PageCopyError> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .truncate(true)
        .open(temp)
        .map_err(PageCopyError::Io)?;
    let mut statement = source
        .prepare("SELECT pgno, data FROM sqlite_dbpage")
        .map_err(PageCopyError::Sqlite)?;
    let mut rows = statement.query([]).map_err(PageCopyError::Sqlite)?;
    let (mut pages, mut page_size) = (0u64, 0u32);
    while let Some(row) = rows.next().map_err(PageCopyError::Sqlite)? {
        let pgno: i64 = row.get(0).map_err(PageCopyError::Sqlite)?;
        let pgno = u64::try_from(pgno).unwrap_or(0).max(1);
        let data = row
            .get_ref(1)
            .and_then(|value| value.as_blob().map_err(Into::into))
            .map_err(PageCopyError::Sqlite)?;
        page_size = u32::try_from(data.len()).unwrap_or(0);
        file.write_all_at(data, (pgno - 1) * data.len() as u64)
            .map_err(PageCopyError::Io)?;
        pages = pages.max(pgno);
    }
    Ok((file, pages, page_size))
}

/// Runs one backup step, retrying while SQLite reports busy or locked, for at most
/// [`LOCK_WAIT_LIMIT`]. Returns `Done` or `More`.
fn step_with_retry(
    backup: &Backup<'_, '_>,
    pages: i32,
    what: &str,
) -> Result<StepResult, ToolError> {
    let started = Instant::now();
    loop {
        match backup
            .step(pages)
            .map_err(ToolError::sqlite(format!("failed {what}")))?
        {
            StepResult::Busy | StepResult::Locked => {
                let waited = started.elapsed();
                if waited >= LOCK_WAIT_LIMIT {
                    return Err(ToolError::Busy {
                        what: what.to_string(),
                        waited,
                    });
                }
                thread::sleep(RETRY_PAUSE);
            }
            result => return Ok(result),
        }
    }
}

/// Pages in the source as of the last step; an empty source still gives one page.
fn page_count(backup: &Backup<'_, '_>) -> u64 {
    u64::try_from(backup.progress().pagecount)
        .unwrap_or(0)
        .max(1)
}

/// Reads the TXID from `<mount>/<name>-pos` (`%016x/%016x\n`).
fn read_txid(mount: &Path, name: &str) -> Result<u64, ToolError> {
    read_position(mount, name).map(|position| position.txid.0)
}

/// Reads the position in `<mount>/<name>-pos`.
fn read_position(mount: &Path, name: &str) -> Result<Position, ToolError> {
    let path = mount.join(format!("{name}{POSITION_SUFFIX}"));
    let failed = |reason: String| ToolError::Position {
        name: name.to_string(),
        path: path.clone(),
        reason,
    };
    let text = fs::read_to_string(&path).map_err(|error| failed(error.to_string()))?;
    Position::from_pos_file(&text).ok_or_else(|| failed(format!("unexpected content {text:?}")))
}

/// True when both paths exist and are the same file (same device and inode).
fn is_same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `<path><suffix>`, e.g. the `-wal` file of a database.
fn companion_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary database file beside a destination, removed (with any companion
/// files SQLite left) unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates a new, empty file with a unique name in the directory of
    /// `destination`, so the final rename stays within one filesystem.
    fn create_beside(destination: &Path) -> Result<TempFile, ToolError> {
        let parent = parent_dir(destination);
        let base = destination
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut attempt = 0u32;
        loop {
            let path = parent.join(format!(
                ".{base}.ltxfs-export-{}-{nanos:08x}-{attempt}",
                std::process::id()
            ));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => {
                    return Ok(TempFile {
                        path,
                        persisted: false,
                    });
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                    attempt += 1;
                }
                Err(error) => {
                    return Err(ToolError::Io {
                        context: format!("cannot create a temporary file in {}", parent.display()),
                        source: error,
                    });
                }
            }
        }
    }

    /// Syncs the file, renames it to `destination` and syncs the directory.
    fn persist(mut self, destination: &Path) -> Result<(), ToolError> {
        File::open(&self.path)
            .and_then(|file| file.sync_all())
            .map_err(ToolError::io(format!(
                "cannot sync {}",
                self.path.display()
            )))?;
        fs::rename(&self.path, destination).map_err(ToolError::io(format!(
            "cannot rename {} to {}",
            self.path.display(),
            destination.display()
        )))?;
        self.persisted = true;
        let parent = parent_dir(destination);
        File::open(&parent)
            .and_then(|dir| dir.sync_all())
            .map_err(ToolError::io(format!(
                "cannot sync the directory {}",
                parent.display()
            )))?;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.persisted {
            return;
        }
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let _ = fs::remove_file(companion_path(&self.path, suffix));
        }
    }
}
