//! Backups to object storage, end to end: a real mount backs up to a local
//! directory (`file://`) and to a real S3 server (moto, started by the test),
//! and `ltxfs restore`, `ltxfs backup list` and `ltxfs backup verify` run as
//! separate processes with no node. Restored databases are checked against the
//! mount's `-pos` checksum, recomputed here from the restored file's pages.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::backup_check::*;
use test_support::{Moto, yaml_quote};

/// A mount backing up to a new local directory, with table `t` created in
/// `app.db` (in `journal_mode`) and backed up: every later TXID is
/// restorable.
struct FileBackup {
    mount: Mount,
    url: String,
    connection: rusqlite::Connection,
    dir: tempfile::TempDir,
}

impl FileBackup {
    fn start(journal_mode: &str) -> FileBackup {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        // No compaction window ends during a test: the tests that damage or
        // remove an object need the restore to read it, not a merged copy.
        let mount = Mount::start(MountOptions {
            extra_yaml: backup_yaml(&url, "  compaction-windows: [1h]\n"),
            ..MountOptions::default()
        });
        let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
        connection
            .execute_batch(&format!(
                "PRAGMA journal_mode={journal_mode}; \
                 CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);"
            ))
            .expect("schema");
        let (schema_txid, _) = position(&mount, "app.db");
        wait_for_backup(&["--url", &url], "app.db", schema_txid, &mount);
        FileBackup {
            mount,
            url,
            connection,
            dir,
        }
    }

    fn source(&self) -> [&str; 2] {
        ["--url", self.url.as_str()]
    }
}

#[test]
fn a_file_backup_restores_the_latest_state_a_txid_and_a_time() {
    let backup = FileBackup::start("WAL");
    let (mount, connection, source) = (&backup.mount, &backup.connection, backup.source());
    let url = backup.url.clone();
    let mut history = Vec::new();
    for round in 0..6 {
        for value in 0..5 {
            history.push((
                insert(connection, mount, round * 10 + value),
                Instant::now(),
            ));
        }
        // Let a sync interval pass, so the rows span several objects and
        // commit times.
        std::thread::sleep(Duration::from_millis(250));
    }
    let (latest_txid, latest_checksum) = position(mount, "app.db");
    wait_for_backup(&source, "app.db", latest_txid, mount);
    check_status_and_metrics(mount, &url, latest_txid);

    let scratch = mount.root().join("restored");
    fs::create_dir(&scratch).expect("scratch dir");
    let latest = scratch.join("latest.db");
    let printed = restore(&source, "app.db", &latest, &[]);
    assert!(
        printed.contains(&format!("{latest_txid:016x}")),
        "{printed}"
    );
    assert_eq!(file_checksum(&latest), latest_checksum);
    assert_eq!(count_rows(&latest), 30);

    // Each TXID of the history restores to exactly its rows.
    for (index, ((txid, checksum), _)) in history.iter().enumerate().step_by(7) {
        let output = scratch.join(format!("txid-{txid}.db"));
        restore(&source, "app.db", &output, &["--txid", &txid.to_string()]);
        assert_eq!(file_checksum(&output), *checksum, "TXID {txid}");
        assert_eq!(count_rows(&output), index as i64 + 1, "TXID {txid}");
    }

    // A time between two rounds restores the rows committed before it.
    let system_now = std::time::SystemTime::now();
    let instant_now = Instant::now();
    let (_, middle) = history[14];
    let middle_time: chrono::DateTime<chrono::Utc> =
        (system_now - instant_now.duration_since(middle) + Duration::from_millis(120)).into();
    let at_time = scratch.join("at-time.db");
    restore(
        &source,
        "app.db",
        &at_time,
        &["--timestamp", &middle_time.to_rfc3339()],
    );
    assert_eq!(count_rows(&at_time), 15);

    // On a terminal, a restore shows its progress in whole percent of the
    // bytes it downloads, never going back, ending at 100 % of every object
    // (`script` gives it a terminal).
    let on_terminal = scratch.join("on-terminal.db");
    let (status, shown) = restore_on_a_terminal(&url, &on_terminal);
    assert!(status.success(), "{shown}");
    let percents: Vec<u64> = shown
        .split("restoring app.db: ")
        .skip(1)
        .map(|line| {
            let percent = line.split('%').next().unwrap_or_default();
            percent
                .parse()
                .unwrap_or_else(|_| panic!("{line:?} in {shown}"))
        })
        .collect();
    assert!(percents.len() >= 2, "{shown}");
    assert!(percents.is_sorted(), "{percents:?} in {shown}");
    assert_eq!(percents.last(), Some(&100), "{shown}");
    let last = shown
        .rsplit("restoring app.db: ")
        .next()
        .unwrap_or_default();
    let (done, planned) = last
        .split(", ")
        .nth(1)
        .and_then(|objects| objects.split(" objects").next())
        .and_then(|objects| objects.split_once('/'))
        .unwrap_or_else(|| panic!("{last:?}"));
    assert_eq!(done, planned, "{last:?}");
    assert_eq!(file_checksum(&on_terminal), latest_checksum);

    // --if-not-exists leaves an existing file alone.
    fs::write(&at_time, b"keep").expect("overwrite");
    let printed = restore(&source, "app.db", &at_time, &["--if-not-exists"]);
    assert!(printed.contains("nothing restored"), "{printed}");
    assert_eq!(fs::read(&at_time).unwrap(), b"keep");

    // A TXID past the end is refused with the restorable range.
    let beyond = (latest_txid + 100).to_string();
    let output = try_restore(
        &source,
        "app.db",
        &scratch.join("beyond.db"),
        &["--txid", &beyond],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("restorable are TXIDs"),
        "{}",
        text(&output)
    );
    assert!(!scratch.join("beyond.db").exists());
}

/// `ltxfs status` and `/metrics` report the backed-up TXID per destination,
/// once the node has seen that the destination holds `txid`.
fn check_status_and_metrics(mount: &Mount, url: &str, txid: u64) {
    let address = mount.listen_addr();
    let node_url = format!("http://{address}");
    let mut status = serde_json::Value::Null;
    wait_until("status to show the backup", BACKUP_TIMEOUT, || {
        let output = ltxfs(&["status", "--json", "--url", &node_url]);
        assert!(output.status.success(), "{}", text(&output));
        status = serde_json::from_slice(&output.stdout).expect("JSON");
        status["backups"][0]["txid"] == txid
    });
    let backup = &status["backups"][0];
    assert_eq!(backup["destination"], url, "{status}");
    assert_eq!(backup["database"], "app.db", "{status}");
    assert_eq!(backup["lag_ms"], 0, "{status}");
    assert_eq!(backup["failing"], false, "{status}");

    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .expect("ask for metrics");
    let mut metrics = String::new();
    stream.read_to_string(&mut metrics).expect("read metrics");
    let sample = format!("ltxfs_backup_txid{{db=\"app.db\",destination=\"{url}\"}} {txid}");
    assert!(metrics.contains(&sample), "{sample} not in:\n{metrics}");
    assert!(metrics.contains("ltxfs_backup_lag_seconds{"), "{metrics}");
    assert!(
        metrics.contains(&format!("ltxfs_backup_errors{{destination=\"{url}\"}} 0")),
        "{metrics}"
    );
}

/// A database that grows, shrinks (VACUUM after a large DELETE) and grows
/// again restores at each of those TXIDs: the restore takes the checksums of
/// pages that a record replaces or cuts off from the file it writes.
#[test]
fn restores_follow_a_database_that_shrinks_and_grows_again() {
    let backup = FileBackup::start("DELETE");
    let (mount, connection, source) = (&backup.mount, &backup.connection, backup.source());
    connection
        .execute_batch("ALTER TABLE t ADD COLUMN b BLOB")
        .expect("alter");
    let filled = |rows: i64| {
        connection
            .execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                 INSERT INTO t(v, b) SELECT i, randomblob(3000) FROM n",
                [rows],
            )
            .expect("insert");
        position(mount, "app.db")
    };
    let grown = filled(300);
    connection
        .execute("DELETE FROM t WHERE id > 20", [])
        .expect("delete");
    connection.execute_batch("VACUUM").expect("vacuum");
    let shrunk = position(mount, "app.db");
    let grown_again = filled(50);
    wait_for_backup(&source, "app.db", grown_again.0, mount);
    let pages = |path: &Path| fs::metadata(path).expect("restored").len() / 4096;
    let output = mount.root().join("restored.db");
    let mut sizes = Vec::new();
    for (txid, checksum) in [grown, shrunk, grown_again] {
        restore(&source, "app.db", &output, &["--txid", &txid.to_string()]);
        assert_eq!(file_checksum(&output), checksum, "TXID {txid}");
        sizes.push(pages(&output));
    }
    assert!(
        sizes[1] < sizes[0] / 4,
        "the VACUUM shrank it: {sizes:?} pages"
    );
    assert!(sizes[2] > sizes[1], "{sizes:?} pages");
}

/// Runs `ltxfs restore --name app.db --url URL OUTPUT` with a terminal for
/// its output (`script` gives it one): its exit status and what it showed.
fn restore_on_a_terminal(url: &str, output: &Path) -> (std::process::ExitStatus, String) {
    let command = format!(
        "{} restore --name app.db --url {url} {}",
        env!("CARGO_BIN_EXE_ltxfs"),
        output.display()
    );
    let ran = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("run script");
    (
        ran.status,
        String::from_utf8_lossy(&ran.stdout).into_owned(),
    )
}

#[test]
fn verify_and_restore_name_a_damaged_object() {
    let backup = FileBackup::start("DELETE");
    let (mount, connection, source) = (&backup.mount, &backup.connection, backup.source());
    let url = backup.url.clone();
    for value in 0..20 {
        insert(connection, mount, value);
    }
    let (txid, _) = position(mount, "app.db");
    wait_for_backup(&source, "app.db", txid, mount);
    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("are sound"), "{}", text(&output));

    // Flip one byte in the middle of the newest object.
    let objects = object_files(backup.dir.path());
    let victim = objects
        .iter()
        .filter(|path| path.to_string_lossy().contains("/changes/"))
        .max()
        .expect("a changes object")
        .clone();
    let mut bytes = fs::read(&victim).expect("read object");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&victim, &bytes).expect("damage object");
    let victim_name = victim.file_name().unwrap().to_string_lossy().to_string();

    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains(&victim_name), "{}", text(&output));

    let restored = mount.root().join("restored.db");
    let output = try_restore(&source, "app.db", &restored, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains(&victim_name), "{}", text(&output));
    assert!(!restored.exists(), "a wrong database was written");

    // On a terminal the error starts a line of its own, after the progress.
    let (status, shown) = restore_on_a_terminal(&url, &restored);
    assert!(!status.success(), "{shown}");
    assert!(shown.contains("restoring app.db: "), "{shown}");
    let error_line = shown
        .lines()
        .find(|line| line.contains("error"))
        .unwrap_or_else(|| panic!("no error in {shown:?}"));
    assert!(error_line.starts_with("ltxfs: error"), "{shown:?}");
    assert!(!restored.exists(), "a wrong database was written");
}

#[test]
fn verify_and_restore_name_the_object_after_a_missing_one() {
    let backup = FileBackup::start("WAL");
    let (mount, connection, source) = (&backup.mount, &backup.connection, backup.source());
    let url = backup.url.clone();
    // Three rounds, so there are at least three change objects.
    let mut history = Vec::new();
    for round in 0..3 {
        for value in 0..5 {
            history.push(insert(connection, mount, round * 10 + value));
        }
        let (txid, _) = position(mount, "app.db");
        wait_for_backup(&source, "app.db", txid, mount);
    }
    let changes: Vec<PathBuf> = object_files(backup.dir.path())
        .into_iter()
        .filter(|path| path.to_string_lossy().contains("/changes/"))
        .collect();
    assert!(changes.len() >= 3, "{changes:?}");
    fs::remove_file(&changes[1]).expect("lose the middle object");
    let after_gap = changes[2]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();

    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains(&after_gap), "{}", text(&output));
    assert!(
        text(&output).contains("missing an object"),
        "{}",
        text(&output)
    );
    let restored = mount.root().join("restored.db");
    let output = try_restore(&source, "app.db", &restored, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains(&after_gap), "{}", text(&output));
    assert!(
        !restored.exists(),
        "an older state was written as the latest"
    );
    // What comes before the gap is still restorable: up to the end of the
    // first object (its name starts `<min>-<max>_`).
    let first = changes[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let end = u64::from_str_radix(&first[17..33], 16).expect("hex TXID");
    let (txid, checksum) = *history
        .iter()
        .find(|(txid, _)| *txid == end)
        .expect("the first object ends at a TXID of the run");
    restore(&source, "app.db", &restored, &["--txid", &txid.to_string()]);
    assert_eq!(file_checksum(&restored), checksum);

    // The primary, started again, finds the gap and uploads a snapshot: the
    // newest state restores again.
    let FileBackup {
        mut mount,
        connection,
        dir: _dir,
        ..
    } = backup;
    drop(connection);
    mount.restart();
    let (txid, checksum) = position(&mount, "app.db");
    wait_until("a new snapshot to heal the gap", BACKUP_TIMEOUT, || {
        try_restore(&["--url", &url], "app.db", &restored, &[])
            .status
            .success()
    });
    assert_eq!(file_checksum(&restored), checksum, "TXID {txid}");
    assert!(mount.stderr_text().contains("uploading a new snapshot"));
}

/// Starts a moto S3 server logging into a temporary dir; panics, saying how
/// to install it, when it cannot.
fn start_moto() -> (tempfile::TempDir, Moto) {
    let (dir, root) = temp_root("ltxfs-s3-");
    let moto = Moto::start_in(&root).unwrap_or_else(|error| panic!("{error}"));
    (dir, moto)
}

#[test]
fn an_s3_backup_rides_out_an_outage_and_restores_every_commit() {
    let (_moto_dir, server) = start_moto();
    server
        .create_bucket("backups")
        .unwrap_or_else(|error| panic!("{error}\n{}", server.log()));
    let destination = format!(
        "      endpoint: {}\n      region: us-east-1\n      access-key-id: testing\n      secret-access-key: testing\n",
        yaml_quote(&server.endpoint())
    );
    let mount = Mount::start(MountOptions {
        extra_yaml: backup_yaml("s3://backups/prod", &destination),
        ..MountOptions::default()
    });
    let config = mount.config_path().to_string_lossy().to_string();
    let source = ["--config", config.as_str()];
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    connection
        .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);")
        .expect("schema");
    for value in 0..10 {
        insert(&connection, &mount, value);
    }
    let (txid, _) = position(&mount, "app.db");
    wait_for_backup(&source, "app.db", txid, &mount);

    // The destination stops answering: commits go on, at local speed.
    server.pause().expect("pause moto");
    let started = Instant::now();
    for value in 10..60 {
        insert(&connection, &mount, value);
    }
    let during_outage = started.elapsed();
    assert!(
        during_outage < Duration::from_secs(5),
        "50 commits took {during_outage:?} while the destination was down"
    );
    std::thread::sleep(Duration::from_millis(500));
    server.resume().expect("resume moto");
    let (txid, checksum) = position(&mount, "app.db");
    wait_for_backup(&source, "app.db", txid, &mount);
    let restored = mount.root().join("restored.db");
    restore(&source, "app.db", &restored, &[]);
    assert_eq!(file_checksum(&restored), checksum);
    assert_eq!(count_rows(&restored), 60);
    let output = ltxfs(&["backup", "verify", "--config", &config]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        !mount.stderr_text().contains("testing\""),
        "a secret reached the log:\n{}",
        mount.stderr_text()
    );
}

#[test]
fn a_destination_that_cannot_work_stops_the_mount_before_it_starts() {
    let (_moto_dir, server) = start_moto();
    let (_dir, root) = temp_root("ltxfs-backup-bad-");
    let destination = format!(
        "      endpoint: {}\n      region: us-east-1\n      access-key-id: testing\n      secret-access-key: hunter2-secret\n",
        yaml_quote(&server.endpoint())
    );
    // The bucket does not exist.
    let output = refused_mount(&root, &backup_yaml("s3://missing-bucket/x", &destination));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("s3://missing-bucket/x"), "{stderr}");
    assert!(!stderr.contains("hunter2-secret"), "{stderr}");

    // An unknown scheme is a config error naming the key.
    let output = refused_mount(&root, &backup_yaml("ftp://host/x", ""));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("backup.destinations[0].url"),
        "{}",
        text(&output)
    );
}
