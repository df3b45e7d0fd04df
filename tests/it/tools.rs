//! `ltxfs::tools::export` and `ltxfs::tools::import` against a real mount: an export
//! taken while a writer keeps committing is a consistent, standalone copy; an import
//! replaces a database as exactly one change set; bad input is refused with an error
//! naming the file and nothing on the mount changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use ltxfs::ltx;
use ltxfs::tools::{self, ToolError};
use test_support::run_bounded;

/// The longest a tool call may take in these tests.
const TOOL_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest the background writer may take to stop.
const WRITER_STOP_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// The TXID in `<mount>/<name>-pos`, checking the file's `%016x/%016x\n` shape.
fn pos_txid(mount: &Mount, name: &str) -> u64 {
    let path = mount.path().join(format!("{name}-pos"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(text.len(), 34, "shape of {text:?}");
    let (txid, _checksum) = text.trim_end().split_once('/').expect("TXID/checksum");
    u64::from_str_radix(txid, 16).expect("hex TXID")
}

/// The whole `-pos` text (TXID and checksum), to prove nothing changed.
fn pos_text(mount: &Mount, name: &str) -> String {
    let path = mount.path().join(format!("{name}-pos"));
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Creates `path` (outside the mount) with `rows` rows of `payload_len` bytes.
fn make_source(path: &Path, page_size: u32, rows: i64, payload_len: i64) {
    let conn = open_db(path);
    conn.execute_batch(&format!("PRAGMA page_size={page_size};"))
        .expect("page_size");
    set_journal_mode(&conn, "delete");
    conn.execute_batch(&format!(
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB);
         CREATE INDEX items_name ON items(name);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
         INSERT INTO items(name, payload) SELECT 'item-' || i, randomblob({payload_len}) FROM n;"
    ))
    .expect("fill source");
}

/// Creates database `name` on the mount with a small `old` table.
fn make_destination(mount: &Mount, name: &str, mode: &str) {
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, mode);
    conn.execute_batch(
        "CREATE TABLE old(x INTEGER PRIMARY KEY, y TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
         INSERT INTO old(y) SELECT 'old-' || i FROM n;",
    )
    .expect("fill destination");
}

fn dump_of(path: &Path) -> String {
    dump(&open_db(path))
}

fn export_bounded(
    mount: &Path,
    name: &str,
    dest: &Path,
) -> Result<tools::ExportSummary, ToolError> {
    let (mount, name, dest) = (mount.to_path_buf(), name.to_string(), dest.to_path_buf());
    run_bounded(TOOL_TIMEOUT, move || tools::export(&mount, &name, &dest))
        .unwrap_or_else(|| panic!("export did not finish within {TOOL_TIMEOUT:?}"))
}

fn import_bounded(
    mount: &Path,
    name: &str,
    source: &Path,
) -> Result<tools::ImportSummary, ToolError> {
    let (mount, name, source) = (mount.to_path_buf(), name.to_string(), source.to_path_buf());
    run_bounded(TOOL_TIMEOUT, move || tools::import(&mount, &name, &source))
        .unwrap_or_else(|| panic!("import did not finish within {TOOL_TIMEOUT:?}"))
}

/// A thread committing one-row transactions on its own connection until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    done: mpsc::Receiver<Result<(), String>>,
}

impl Writer {
    fn start(db: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (tx, done) = mpsc::channel();
        let (thread_stop, thread_committed) = (Arc::clone(&stop), Arc::clone(&committed));
        thread::spawn(move || {
            let deadline = Instant::now() + TOOL_TIMEOUT;
            let conn = open_db(&db);
            let mut result = Ok(());
            while !thread_stop.load(Ordering::Acquire) && Instant::now() < deadline {
                if let Err(error) =
                    conn.execute("INSERT INTO t(payload) VALUES (randomblob(1500))", [])
                {
                    result = Err(error.to_string());
                    break;
                }
                thread_committed.fetch_add(1, Ordering::AcqRel);
            }
            let _ = tx.send(result);
        });
        Writer {
            stop,
            committed,
            done,
        }
    }

    /// Waits (bounded) until the writer has committed at least `n` transactions.
    fn wait_for(&self, n: u64) {
        wait_until("the writer's commits", Duration::from_secs(30), || {
            self.committed.load(Ordering::Acquire) >= n
        });
    }

    /// Stops the writer and checks it never failed.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        match self.done.recv_timeout(WRITER_STOP_TIMEOUT) {
            Ok(Ok(())) => self.committed.load(Ordering::Acquire),
            Ok(Err(error)) => panic!("the writer failed: {error}"),
            Err(_) => panic!("the writer did not stop within {WRITER_STOP_TIMEOUT:?}"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------

/// Exports `app.db` (in journal mode `mode`, several export steps large) while a
/// writer thread keeps inserting, and checks the copy.
fn export_while_writing(mode: &str) {
    let mount = Mount::start(MountOptions::default());
    let db = mount.db_path("app.db");
    {
        let conn = open_db(&db);
        set_journal_mode(&conn, mode);
        // About 3000 pages of 4 KiB: an export takes several steps.
        conn.execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, payload BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
             INSERT INTO t(payload) SELECT randomblob(2000) FROM n;",
        )
        .expect("fill app.db");
    }

    let writer = Writer::start(db.clone());
    writer.wait_for(5);
    let reader = open_db(&db);
    let before = query_i64(&reader, "SELECT count(*) FROM t");
    let dest = mount.root().join("export").join("copy.db");
    fs::create_dir(dest.parent().unwrap()).unwrap();
    let summary = export_bounded(mount.path(), "app.db", &dest).expect("export");
    let after = query_i64(&reader, "SELECT count(*) FROM t");
    drop(reader);
    let committed = writer.stop();
    assert!(
        after > before,
        "the writer did not commit during the export ({before} rows before and after; \
         {committed} commits in all)"
    );

    // The copy holds the database's very pages at the TXID it names: its
    // checksum is the one -pos showed, and it keeps the database's format
    // bytes.
    assert_eq!(list_dir(dest.parent().unwrap()), vec!["copy.db"]);
    let header = fs::read(&dest).expect("read copy");
    assert_eq!(&header[..16], b"SQLite format 3\0");
    let format = if mode == "wal" { [2, 2] } else { [1, 1] };
    assert_eq!(&header[18..20], &format, "file format bytes");
    let page_size = u32::from(u16::from_be_bytes([header[16], header[17]]));
    ltx::verify_database_checksum(
        &fs::File::open(&dest).unwrap(),
        page_size,
        (header.len() / page_size as usize) as u32,
        ltx::Checksum(summary.checksum),
    )
    .expect("the copy has the checksum of its TXID");
    let copy = open_db(&dest);
    assert_eq!(integrity_check(&copy), "ok");
    let exported = query_i64(&copy, "SELECT count(*) FROM t");
    assert!(
        (before..=after).contains(&exported),
        "the copy has {exported} rows, not between {before} and {after}"
    );
    let pages = query_i64(&copy, "PRAGMA page_count") as u64;
    drop(copy);
    assert_eq!(list_dir(dest.parent().unwrap()), vec!["copy.db"]);

    // The summary.
    assert_eq!(summary.name, "app.db");
    assert_eq!(summary.destination, dest);
    assert_eq!(summary.pages, pages);
    assert!(summary.txid <= pos_txid(&mount, "app.db"), "{summary:?}");
    let line = summary.to_string();
    assert!(
        line.starts_with(&format!(
            "exported {pages} pages of app.db to {}",
            dest.display()
        )),
        "{line}"
    );
    assert!(!line.contains('\n'), "{line}");

    // The mount is unharmed.
    assert_integrity(&db);
}

#[test]
fn export_while_writing_wal() {
    export_while_writing("wal");
}

#[test]
fn export_while_writing_rollback() {
    export_while_writing("delete");
}

#[test]
fn export_replaces_an_existing_file_and_refuses_bad_destinations() {
    let mount = Mount::start(MountOptions::default());
    make_destination(&mount, "app.db", "wal");
    let dest = mount.root().join("copy.db");
    fs::write(&dest, b"old content").unwrap();

    let summary = export_bounded(mount.path(), "app.db", &dest).expect("export");
    assert_eq!(
        format!("{:016x}/{:016x}\n", summary.txid, summary.checksum),
        pos_text(&mount, "app.db")
    );
    assert!(
        summary.to_string().ends_with(&format!(
            "at TXID {:016x}, checksum {:016x}",
            summary.txid, summary.checksum
        )),
        "{summary}"
    );
    assert_eq!(dump_of(&dest), dump_of(&mount.db_path("app.db")));

    // A database that does not exist.
    let err = export_bounded(mount.path(), "missing.db", &mount.root().join("m.db")).unwrap_err();
    assert!(matches!(err, ToolError::NoSuchDatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.db"), "{err}");
    assert!(!mount.root().join("m.db").exists());

    // A destination that is a directory, or whose directory does not exist.
    let err = export_bounded(mount.path(), "app.db", mount.root()).unwrap_err();
    assert!(matches!(err, ToolError::InvalidDestination { .. }), "{err}");
    let nowhere = mount.root().join("no-such-dir").join("c.db");
    let err = export_bounded(mount.path(), "app.db", &nowhere).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A destination inside the mount.
    let err = export_bounded(mount.path(), "app.db", &mount.db_path("copy.db")).unwrap_err();
    assert!(err.to_string().contains("inside the mount"), "{err}");
    assert_eq!(list_dir(mount.path()), vec![".lag", "app.db"]);

    // A destination with a leftover WAL beside it is refused and left alone.
    let other = mount.root().join("other.db");
    fs::write(mount.root().join("other.db-wal"), b"stale").unwrap();
    let err = export_bounded(mount.path(), "app.db", &other).unwrap_err();
    assert!(err.to_string().contains("other.db-wal"), "{err}");
    assert!(!other.exists());
    assert_eq!(
        fs::read(mount.root().join("other.db-wal")).unwrap(),
        b"stale"
    );
}

// ---------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------

/// Imports a 4 KiB-page file into `app.db` (in journal mode `mode`) and checks the
/// content and that exactly one change set was captured.
fn import_replaces(mode: &str) {
    let mount = Mount::start(MountOptions::default());
    make_destination(&mount, "app.db", mode);
    let source = mount.root().join("seed.db");
    make_source(&source, 4096, 800, 300);
    let source_dump = dump_of(&source);

    // A connection that stays open across the import sees the new content.
    let live = open_db(&mount.db_path("app.db"));
    assert_eq!(query_i64(&live, "SELECT count(*) FROM old"), 50);

    let txid_before = pos_txid(&mount, "app.db");
    let summary = import_bounded(mount.path(), "app.db", &source).expect("import");
    let txid_after = pos_txid(&mount, "app.db");
    assert_eq!(txid_after, txid_before + 1, "one change set");
    assert_eq!(summary.txid, txid_after);
    assert_eq!(summary.name, "app.db");
    assert_eq!(
        summary.to_string(),
        format!(
            "imported {} pages into app.db at TXID {txid_after:016x}",
            summary.pages
        )
    );

    assert_eq!(query_i64(&live, "SELECT count(*) FROM items"), 800);
    drop(live);
    let conn = open_db(&mount.db_path("app.db"));
    assert_eq!(integrity_check(&conn), "ok");
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM items"), 800);
    assert_eq!(
        query_i64(
            &conn,
            "SELECT count(*) FROM sqlite_master WHERE name = 'old'"
        ),
        0
    );
    assert_eq!(query_i64(&conn, "PRAGMA page_count") as u64, summary.pages);
    assert_eq!(query_string(&conn, "PRAGMA journal_mode"), mode);
    let dest_dump = dump(&conn);
    drop(conn);
    assert!(
        dest_dump == source_dump,
        "content differs from the source: {}",
        first_difference(&dest_dump, &source_dump)
    );
    // The source is untouched and still valid.
    assert_eq!(dump_of(&source), source_dump);
}

#[test]
fn import_replaces_a_rollback_database() {
    import_replaces("delete");
}

#[test]
fn import_replaces_a_wal_database() {
    import_replaces("wal");
}

#[test]
fn import_creates_a_missing_database() {
    let mount = Mount::start(MountOptions::default());
    let source = mount.root().join("seed.db");
    make_source(&source, 1024, 100, 100);
    let summary = import_bounded(mount.path(), "new.db", &source).expect("import");
    assert_eq!(summary.txid, pos_txid(&mount, "new.db"));
    assert_eq!(dump_of(&mount.db_path("new.db")), dump_of(&source));
    assert_integrity(&mount.db_path("new.db"));
}

#[test]
fn import_with_another_page_size_into_wal_is_refused() {
    let mount = Mount::start(MountOptions::default());
    make_destination(&mount, "app.db", "wal");
    let source = mount.root().join("small-pages.db");
    make_source(&source, 1024, 100, 100);
    let pos = pos_text(&mount, "app.db");
    let content = dump_of(&mount.db_path("app.db"));

    let err = import_bounded(mount.path(), "app.db", &source).unwrap_err();
    assert!(matches!(err, ToolError::PageSizeMismatch { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        source.display().to_string(),
        "1024".into(),
        "4096".into(),
        "VACUUM".into(),
    ] {
        assert!(message.contains(&part), "{message:?} lacks {part:?}");
    }
    assert_eq!(pos_text(&mount, "app.db"), pos);
    assert_eq!(dump_of(&mount.db_path("app.db")), content);
}

#[test]
fn import_refuses_files_that_are_not_valid_databases() {
    let mount = Mount::start(MountOptions::default());
    make_destination(&mount, "app.db", "delete");
    let pos = pos_text(&mount, "app.db");
    let content = dump_of(&mount.db_path("app.db"));
    let root = mount.root();

    let good = root.join("good.db");
    make_source(&good, 4096, 400, 500);
    let good_bytes = fs::read(&good).unwrap();
    assert!(good_bytes.len() > 8 * 4096);

    let hello = root.join("hello.txt");
    fs::write(&hello, b"hello").unwrap();
    let empty = root.join("empty.db");
    fs::write(&empty, b"").unwrap();
    // Cut in the middle of a page.
    let torn = root.join("torn.db");
    fs::write(&torn, &good_bytes[..good_bytes.len() / 2 + 100]).unwrap();
    // Cut at a page boundary: the header still counts the missing pages.
    let short = root.join("short.db");
    fs::write(&short, &good_bytes[..4 * 4096]).unwrap();
    // Just the header.
    let header_only = root.join("header-only.db");
    fs::write(&header_only, &good_bytes[..60]).unwrap();
    // Whole and the right size, but an interior page overwritten with garbage.
    let corrupt = root.join("corrupt.db");
    let mut bytes = good_bytes.clone();
    let mut rng = Rng::new(7);
    for page in [2usize, 5] {
        let garbage = rng.bytes(4096);
        bytes[(page - 1) * 4096..page * 4096].copy_from_slice(&garbage);
    }
    fs::write(&corrupt, &bytes).unwrap();
    let missing = root.join("missing.db");

    let cases: [(&Path, &str); 7] = [
        (&hello, "not a SQLite database"),
        (&empty, "not a SQLite database"),
        (&torn, "truncated"),
        (&short, "truncated"),
        (&header_only, "truncated"),
        (&corrupt, "quick_check"),
        (&missing, "does not exist"),
    ];
    for (path, expected) in cases {
        let err = import_bounded(mount.path(), "app.db", path)
            .expect_err(&format!("importing {} must fail", path.display()));
        assert!(matches!(err, ToolError::InvalidSource { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "error for {}: {message:?} (expected it to name the file and say {expected:?})",
            path.display()
        );
        assert_eq!(pos_text(&mount, "app.db"), pos, "after {}", path.display());
        assert_eq!(
            dump_of(&mount.db_path("app.db")),
            content,
            "after {}",
            path.display()
        );
    }
    // The database itself.
    let err = import_bounded(mount.path(), "app.db", &mount.db_path("app.db")).unwrap_err();
    assert!(err.to_string().contains("itself"), "{err}");
    // Refused names never touch anything either.
    for name in [
        "app.db-wal",
        "app.db-journal",
        "app.db-shm",
        "app.db-pos",
        "a/b",
        "",
    ] {
        let err = import_bounded(mount.path(), name, &good).unwrap_err();
        assert!(
            matches!(err, ToolError::InvalidName { .. }),
            "{name}: {err:?}"
        );
    }
    assert_eq!(pos_text(&mount, "app.db"), pos);
    assert_eq!(list_dir(mount.path()), vec![".lag", "app.db"]);

    // The good file still imports.
    let summary = import_bounded(mount.path(), "app.db", &good).expect("import good.db");
    assert_eq!(summary.txid, pos_txid(&mount, "app.db"));
}

// ---------------------------------------------------------------------------------
// Not a mount
// ---------------------------------------------------------------------------------

#[test]
fn tools_refuse_a_directory_that_is_not_a_mount() {
    let (_dir, root) = temp_root("ltxfs-tools-");
    let plain = root.join("plain");
    fs::create_dir(&plain).unwrap();
    let source = root.join("seed.db");
    make_source(&source, 4096, 10, 10);
    let dest = root.join("copy.db");

    for mount_dir in [plain.clone(), root.join("absent")] {
        let err = tools::export(&mount_dir, "app.db", &dest).unwrap_err();
        assert!(matches!(err, ToolError::NotMounted { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not an ltxfs mount: start `ltxfs mount` first or pass --mount",
                mount_dir.display()
            )
        );
        let err = tools::import(&mount_dir, "app.db", &source).unwrap_err();
        assert!(matches!(err, ToolError::NotMounted { .. }), "{err:?}");
        assert!(err.to_string().contains("is not an ltxfs mount"), "{err}");
    }
    // A relative path is reported as the absolute directory it names.
    let err = tools::export(Path::new("surely-not-mounted"), "app.db", &dest).unwrap_err();
    let cwd = std::env::current_dir().unwrap();
    assert!(
        err.to_string()
            .starts_with(&cwd.join("surely-not-mounted").display().to_string()),
        "{err}"
    );
    assert!(!dest.exists());
    assert_eq!(list_dir(&plain), Vec::<String>::new());

    // Names are checked first, with a message saying why.
    let err = tools::export(&plain, "app.db-wal", &dest).unwrap_err();
    assert!(err.to_string().contains("app.db-wal"), "{err}");
    assert!(err.to_string().contains("companion"), "{err}");
    assert_eq!(
        err.to_string(),
        "invalid database name \"app.db-wal\": it names a companion file of database \
         \"app.db\", not a database"
    );
    let err = tools::import(&plain, "dir/app.db", &source).unwrap_err();
    assert!(matches!(err, ToolError::InvalidName { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid database name \"dir/app.db\": not a file name"
    );
}

#[test]
fn import_with_another_page_size_into_a_rollback_database() {
    let mount = Mount::start(MountOptions::default());

    // Smaller pages: SQLite rewrites the file with the new page size.
    make_destination(&mount, "small.db", "delete");
    let source = mount.root().join("seed-1024.db");
    make_source(&source, 1024, 300, 700);
    let txid_before = pos_txid(&mount, "small.db");
    let summary = import_bounded(mount.path(), "small.db", &source).expect("import");
    assert_eq!(summary.txid, txid_before + 1, "one change set");
    assert_eq!(pos_txid(&mount, "small.db"), txid_before + 1);
    let conn = open_db(&mount.db_path("small.db"));
    assert_eq!(integrity_check(&conn), "ok");
    assert_eq!(query_i64(&conn, "PRAGMA page_size"), 1024);
    drop(conn);
    assert_eq!(dump_of(&mount.db_path("small.db")), dump_of(&source));

    // Larger pages would reach the mount as partial pages: refused up front.
    make_destination(&mount, "large.db", "delete");
    let source = mount.root().join("seed-16384.db");
    make_source(&source, 16384, 300, 700);
    let pos = pos_text(&mount, "large.db");
    let content = dump_of(&mount.db_path("large.db"));
    let err = import_bounded(mount.path(), "large.db", &source).unwrap_err();
    assert!(matches!(err, ToolError::PageSizeMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("PRAGMA page_size=4096; VACUUM"),
        "{err}"
    );
    assert_eq!(pos_text(&mount, "large.db"), pos);
    assert_eq!(dump_of(&mount.db_path("large.db")), content);
    assert!(!mount.db_path("large.db-journal").exists());
}

/// The backup API gives a rollback-mode destination the source's file-format bytes:
/// importing a WAL-mode file switches the database to WAL mode, still as one change
/// set, and the database keeps working.
#[test]
fn import_of_a_wal_file_into_a_rollback_database_switches_it_to_wal() {
    let mount = Mount::start(MountOptions::default());
    make_destination(&mount, "app.db", "delete");
    let source = mount.root().join("wal-seed.db");
    make_source(&source, 4096, 200, 300);
    set_journal_mode(&open_db(&source), "wal");
    assert_eq!(&fs::read(&source).unwrap()[18..20], &[2, 2]);

    let txid_before = pos_txid(&mount, "app.db");
    let summary = import_bounded(mount.path(), "app.db", &source).expect("import");
    assert_eq!(summary.txid, txid_before + 1, "one change set");
    let conn = open_db(&mount.db_path("app.db"));
    assert_eq!(integrity_check(&conn), "ok");
    assert_eq!(query_string(&conn, "PRAGMA journal_mode"), "wal");
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM items"), 200);
    conn.execute("INSERT INTO items(name) VALUES ('after')", [])
        .expect("write after the import");
    drop(conn);
    assert_eq!(pos_txid(&mount, "app.db"), txid_before + 2);
    assert_integrity(&mount.db_path("app.db"));
}

/// An import that meets a write transaction in progress in another process waits for
/// it (the backup step is retried while SQLite reports the database busy) and then
/// commits as the next change set.
#[test]
fn import_waits_for_a_transaction_in_progress() {
    for mode in ["delete", "wal"] {
        let mount = Mount::start(MountOptions::default());
        make_destination(&mount, "app.db", mode);
        let source = mount.root().join("seed.db");
        make_source(&source, 4096, 300, 200);
        let txid_before = pos_txid(&mount, "app.db");

        let job = Job::new().with("db", mount.db_path("app.db").display());
        let mut holder = StreamingWorker::spawn(&worker!(worker_hold_write_transaction), &job);
        holder.expect_marker("HELD", Duration::from_secs(30));
        let (mnt, src) = (mount.path().to_path_buf(), source.clone());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(tools::import(&mnt, "app.db", &src));
        });
        thread::sleep(Duration::from_millis(1500));
        assert!(
            rx.try_recv().is_err(),
            "{mode}: the import finished while a write transaction was open"
        );
        holder.send_line("commit");
        holder.expect_marker("COMMITTED", Duration::from_secs(30));
        let (status, _, stderr) = holder.finish(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "holder: {status:?} {stderr}"
        );

        let summary = rx
            .recv_timeout(TOOL_TIMEOUT)
            .expect("the import finished in time")
            .expect("import");
        assert_eq!(
            summary.txid,
            txid_before + 2,
            "{mode}: held commit, then import"
        );
        assert_eq!(pos_txid(&mount, "app.db"), txid_before + 2);
        assert_eq!(
            dump_of(&mount.db_path("app.db")),
            dump_of(&source),
            "{mode}"
        );
    }
}

/// Worker: opens a write transaction, reports HELD, commits when a line arrives on
/// stdin (or stdin closes), reports COMMITTED.
#[test]
fn worker_hold_write_transaction() {
    let Some(job) = worker_job() else { return };
    let conn = open_db(Path::new(job.get("db")));
    conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO old(y) VALUES ('held');")
        .expect("start the held transaction");
    report("HELD");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    conn.execute_batch("COMMIT").expect("commit");
    report("COMMITTED");
}
