//! Faults a production node meets: its data dir's filesystem fills up, on the
//! primary and on a replica.

use std::fs;
use std::fs::OpenOptions;

use crate::common::*;
use crate::support::etcd;
use ltxfs::ltx;
use test_support::run_bounded;

/// Applies every change set in `data_dir`'s log of `name` to a fresh file and
/// returns the position reached, as a replica would.
fn replay(data_dir: &std::path::Path, name: &str, into: &std::path::Path) -> String {
    let sets = ltxfs::store::log::read_change_sets(&data_dir.join("dbs").join(name).join("log"))
        .expect("the log reads");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(into)
        .unwrap();
    let mut position = None;
    for set in &sets {
        let expected = position.map(|(_, checksum, _, _)| checksum);
        let outcome = ltx::apply(set.as_slice(), &file, expected).expect("the log applies");
        position = Some((
            outcome.max_txid,
            outcome.post_apply_checksum,
            outcome.page_size,
            outcome.commit,
        ));
    }
    let (txid, checksum, page_size, commit) = position.expect("something was captured");
    ltx::verify_database_checksum(&file, page_size, commit, checksum)
        .expect("the replayed database has the logged checksum");
    format!("{:016x}/{:016x}\n", txid.0, checksum.0)
}

#[test]
fn a_full_data_dir_fails_writes_cleanly_and_they_resume_once_space_is_freed() {
    let mut mount = Mount::start(MountOptions {
        data_dir: DataDir::Tmpfs(24 << 20),
        ..MountOptions::default()
    });
    // Room to free later.
    let filler = mount.data_dir().join("filler");
    fs::write(&filler, vec![7u8; 6 << 20]).unwrap();
    let name = "full.db";
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let mut committed = 0;
    let failure = loop {
        match conn.execute("INSERT INTO t(v) VALUES (randomblob(32768))", []) {
            Ok(_) => committed += 1,
            Err(error) => break error,
        }
        assert!(committed < 10_000, "the data dir never filled up");
    };
    assert!(committed > 10, "only {committed} rows fit");
    report(format!(
        "full data dir: {committed} rows of 32 KiB committed, then: {failure}"
    ));
    let code = failure.sqlite_error_code();
    assert!(
        matches!(
            code,
            Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure)
        ),
        "a full disk gave {failure}"
    );
    assert!(mount.is_running(), "ltxfs exited:\n{}", mount.stderr_text());
    assert_eq!(integrity_check(&conn), "ok");
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert!(rows >= committed, "{rows} rows, {committed} committed");

    // Space comes back: writes resume, and the log still replays to the
    // database the mount shows.
    fs::remove_file(&filler).unwrap();
    for _ in 0..20 {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(1000))", [])
            .unwrap_or_else(|e| {
                panic!(
                    "a write after space was freed: {e}\n{}",
                    mount.stderr_text()
                )
            });
    }
    assert_log_replays_to_the_live_database(&mut mount, conn, name);
}

/// When the WAL has room (SQLite reuses its file after a restart) but the log
/// cannot grow, commits fail; SQLite then writes later transactions, of other
/// pages, over the failed commits' frames, and the log must still replay to
/// the live database.
#[test]
fn a_commit_whose_change_set_cannot_be_logged_leaves_the_log_true_to_the_database() {
    let mut mount = Mount::start(MountOptions {
        data_dir: DataDir::Tmpfs(64 << 20),
        ..MountOptions::default()
    });
    let name = "log-full.db";
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch(
        "PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)",
    )
    .unwrap();
    // A WAL of about 10 MiB, then a checkpoint that lets the next writer start
    // it over: its frames go into space the file already has, while the log
    // (preallocated 4 MiB at a time) soon needs more.
    for _ in 0..500 {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(20000))", [])
            .unwrap();
    }
    conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
        .unwrap();
    let filler = mount.data_dir().join("filler");
    fill(&filler);
    let (mut committed, mut failed) = (0, 0);
    while failed < 5 && committed < 200 {
        match conn.execute("UPDATE t SET v = randomblob(3000) WHERE id % 41 = 0", []) {
            Ok(_) => committed += 1,
            Err(_) => failed += 1,
        }
    }
    assert!(failed > 0, "no commit failed while the log could not grow");
    fs::remove_file(&filler).unwrap();
    // Other pages than the failed commits wrote, into the same frames.
    for _ in 0..20 {
        conn.execute("UPDATE t SET v = randomblob(2000) WHERE id % 43 = 1", [])
            .unwrap_or_else(|e| {
                panic!(
                    "a write after space was freed: {e}\n{}",
                    mount.stderr_text()
                )
            });
    }
    report(format!(
        "log full, WAL not: {committed} commits, then {failed} failed"
    ));
    assert_log_replays_to_the_live_database(&mut mount, conn, name);
}

/// The data dir's disk fails writes while SQLite commits in WAL mode: the
/// fsync after each commit frame fails, SQLite fails the commit and writes the
/// next transaction over its frames. ltxfs captured those commits at their
/// commit frame (and may have sent them to replicas), so it must record that
/// they were retracted: the log, and every replica, stay true to what SQLite
/// reads.
#[test]
fn commits_whose_wal_fsync_fails_are_recorded_as_retracted() {
    let mut mount = Mount::start(MountOptions {
        data_dir: DataDir::FailingDisk(48 << 20),
        ..MountOptions::default()
    });
    let name = "failing.db";
    let conn = open_db(&mount.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("PRAGMA synchronous=FULL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    for _ in 0..100 {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap();
    }
    let filler = mount.disk_backing().join("filler");
    fill(&filler);
    // The failed updates change pages that no later transaction touches: had
    // they stayed in the log, the log would replay to their rows. Their change
    // sets soon need more log than was preallocated, so the log's own fsync
    // fails too.
    let (mut committed, mut failed) = (0, 0);
    while failed < 12 && committed < 200 {
        match conn.execute("UPDATE t SET v = randomblob(3000) WHERE id <= 60", []) {
            Ok(_) => committed += 1,
            Err(error) => {
                assert!(
                    matches!(
                        error.sqlite_error_code(),
                        Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull)
                    ),
                    "a failing disk gave {error}"
                );
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no commit failed on a disk that fails writes");
    assert!(mount.is_running(), "ltxfs exited:\n{}", mount.stderr_text());
    fs::remove_file(&filler).unwrap();
    for _ in 0..20 {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))", [])
            .unwrap_or_else(|e| {
                panic!(
                    "a write after the disk recovered: {e}\n{}",
                    mount.stderr_text()
                )
            });
    }
    report(format!(
        "failing disk: {committed} commits, then {failed} failed"
    ));
    assert!(
        mount
            .stderr_text()
            .contains("SQLite did not commit the last captured WAL transactions"),
        "{}",
        mount.stderr_text()
    );
    // The log's own fsync failed too (its preallocated space ran into the
    // failing part of the disk): that commit failed just as cleanly.
    assert!(
        mount
            .stderr_text()
            .contains("/log: No space left on device"),
        "the log's fsync never failed:\n{}",
        mount.stderr_text()
    );
    assert_log_replays_to_the_live_database(&mut mount, conn, name);
}

/// Checkpoints `name` through `conn`, checks its integrity, and checks that its
/// log replays to the position the mount shows and to the very bytes of the
/// live database; then stops the mount.
fn assert_log_replays_to_the_live_database(
    mount: &mut Mount,
    conn: rusqlite::Connection,
    name: &str,
) {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    assert_eq!(integrity_check(&conn), "ok");
    let replayed = replay(mount.data_dir(), name, &mount.root().join("replayed.db"));
    let pos = fs::read_to_string(mount.db_path(&format!("{name}-pos"))).unwrap();
    assert_eq!(
        replayed, pos,
        "the log replays to the position the mount shows"
    );
    drop(conn);
    let live = fs::read(mount.db_path(name)).unwrap();
    let copy = fs::read(mount.root().join("replayed.db")).unwrap();
    assert!(
        live == copy,
        "the replayed database differs from the live one:\n{}",
        mount.stderr_text()
    );
    assert!(mount.stop().success());
}

fn node_yaml(hostname: &str, candidate: bool, primary_url: Option<&str>) -> String {
    let mut yaml = format!(
        "lease:\n  type: static\n  candidate: {candidate}\n  hostname: {hostname}\n  reconnect-delay: 300ms\n"
    );
    if let Some(url) = primary_url {
        yaml.push_str(&format!("  advertise-url: {url}\n"));
    }
    yaml
}

/// Asks the node at `url` for its status; panics unless it answers.
fn assert_status_answers(url: &str, when: &str) {
    let status = ltxfs_command()
        .args(["status", "--url", url])
        .output()
        .expect("ltxfs status");
    assert!(
        status.status.success(),
        "ltxfs status failed {when}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn position(mount: &Mount, name: &str) -> Option<String> {
    fs::read_to_string(mount.db_path(&format!("{name}-pos"))).ok()
}

/// A replica's data dir fills up while it follows a primary that inserts
/// `rows` rows of `blob` (an SQL expression of 32 KiB). While it is full, the
/// replica stays exactly at the position its `-pos` names and keeps answering
/// reads; once space is freed, it catches up.
fn a_replica_whose_disk_fills(blob: &str, rows: i64, failure: &str) {
    let primary = Mount::start(MountOptions {
        extra_yaml: node_yaml("primary", true, None),
        ..MountOptions::default()
    });
    let url = format!("http://{}", primary.listen_addr());
    let mut replica = Mount::start(MountOptions {
        extra_yaml: node_yaml("replica", false, Some(&url)),
        data_dir: DataDir::Tmpfs(128 << 20),
        ..MountOptions::default()
    });
    // 32 MiB are left: not enough for the database and its log.
    let filler = replica.data_dir().join("filler");
    fs::write(&filler, vec![7u8; 96 << 20]).unwrap();
    let name = "big.db";
    let conn = open_db(&primary.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let created = position(&primary, name).unwrap();
    wait_until("the replica to follow", READY_TIMEOUT, || {
        position(&replica, name).as_deref() == Some(created.as_str())
    });
    // An application's connection on the replica, open throughout.
    let reader = rusqlite::Connection::open_with_flags(
        replica.db_path(name),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    reader.busy_timeout(BUSY_TIMEOUT).unwrap();
    assert_eq!(query_i64(&reader, "SELECT count(*) FROM t"), 0);
    // More than the replica can hold beside the filler.
    for _ in 0..rows {
        conn.execute(&format!("INSERT INTO t(v) VALUES ({blob})"), [])
            .unwrap();
    }
    let target = position(&primary, name).unwrap();
    wait_until(
        "the replica to fail for want of space",
        READY_TIMEOUT,
        || {
            let log = replica.stderr_text();
            log.contains("No space left") || log.contains("os error 28")
        },
    );
    assert!(
        replica.is_running(),
        "the replica exited:\n{}",
        replica.stderr_text()
    );
    assert!(
        replica.stderr_text().contains(failure),
        "the replica did not fail to {failure:?}:\n{}",
        replica.stderr_text()
    );
    let pos = position(&replica, name).unwrap();
    assert_ne!(pos, target);
    assert_replica_is_at(&replica, name, &pos, &reader, rows);

    fs::remove_file(&filler).unwrap();
    wait_until(
        "the replica to catch up",
        std::time::Duration::from_secs(60),
        || position(&replica, name).as_deref() == Some(target.as_str()),
    );
    assert_eq!(integrity_check(&reader), "ok");
    assert_eq!(query_i64(&reader, "SELECT count(*) FROM t"), rows);
}

/// Checks that `name` on `replica` is exactly at `pos`, its `-pos`, and not
/// half-applied: its backing file has the checksum `pos` names, `ltxfs export`
/// copies it through the mount at that position, SQLite finds it whole, and
/// `reader` reads every row the copy has.
fn assert_replica_is_at(
    replica: &Mount,
    name: &str,
    pos: &str,
    reader: &rusqlite::Connection,
    rows: i64,
) {
    let parsed =
        ltxfs::store::Position::from_pos_file(pos).unwrap_or_else(|| panic!("-pos reads {pos:?}"));
    assert_ne!(
        parsed.txid.0,
        0,
        "the replica forgot its position:\n{}",
        replica.stderr_text()
    );
    let backing = replica.data_dir().join("dbs").join(name).join("database");
    let file = fs::File::open(&backing).unwrap();
    let mut header = [0u8; 32];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).unwrap();
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u32::from(size),
    };
    let commit = u32::from_be_bytes(header[28..32].try_into().unwrap());
    ltx::verify_database_checksum(&file, page_size, commit, parsed.checksum)
        .unwrap_or_else(|e| panic!("the replica's database is not at {pos:?}: {e}"));

    let copy = replica.root().join("export.db");
    let mut export = ltxfs_command();
    export
        .arg("export")
        .args(["--name", name, "--mount"])
        .arg(replica.path())
        .arg("--config")
        .arg(replica.config_path())
        .arg(&copy);
    let output = run_bounded(READY_TIMEOUT, move || export.output())
        .expect("ltxfs export finished in time")
        .expect("ltxfs export ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ltxfs export failed: {}{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr),
        replica.stderr_text()
    );
    let exported = stdout
        .trim_end()
        .rsplit_once(" at TXID ")
        .and_then(|(_, at)| at.split_once(", checksum "))
        .map(|(txid, checksum)| format!("{txid}/{checksum}\n"))
        .unwrap_or_else(|| panic!("ltxfs export printed {stdout:?}"));
    assert_eq!(exported, pos, "the export is not at the replica's -pos");
    assert_eq!(position(replica, name).as_deref(), Some(pos));

    assert_eq!(integrity_check(reader), "ok");
    let read = query_i64(reader, "SELECT count(*) FROM t");
    assert!(0 < read && read < rows, "{read} of {rows} rows");
    assert_eq!(
        query_i64(reader, "SELECT sum(length(v)) FROM t"),
        read * 32768
    );
    let exported_rows = query_i64(&open_db(&copy), "SELECT count(*) FROM t");
    assert_eq!(read, exported_rows);
    report(format!(
        "a replica with a full disk stays at {}: {read} of {rows} rows",
        pos.trim_end()
    ));
}

/// Incompressible rows: the log, preallocated 4 MiB at a time, cannot grow.
#[test]
fn a_replica_whose_log_cannot_grow_stays_whole_and_catches_up_once_space_is_freed() {
    a_replica_whose_disk_fills("randomblob(32768)", 700, "/log: No space left on device");
}

/// Rows that compress to almost nothing: the log has room for their change
/// sets but the database file cannot grow by their pages.
#[test]
fn a_replica_whose_database_cannot_grow_stays_whole_and_catches_up_once_space_is_freed() {
    a_replica_whose_disk_fills("zeroblob(32768)", 1100, " big.db: No space left on device");
}

/// The resident memory of process `pid`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// Commits single-row transactions on `conn` for `seconds`; returns how many.
fn write_for(conn: &rusqlite::Connection, seconds: f64) -> u64 {
    let started = std::time::Instant::now();
    let mut count = 0;
    while started.elapsed().as_secs_f64() < seconds {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(16000))", [])
            .unwrap();
        count += 1;
    }
    count
}

/// A replica that stops reading (SIGSTOP) must neither grow the primary's
/// memory without bound nor hold up its commits: asynchronously the primary
/// does not wait, and synchronously the other replica's acknowledgement
/// suffices. Once it runs again it catches up.
fn a_stalled_replica(synchronous: bool) {
    let extra = if synchronous {
        "replication:\n  synchronous: true\n"
    } else {
        ""
    };
    let primary = Mount::start(MountOptions {
        extra_yaml: format!("{}{extra}", node_yaml("primary", true, None)),
        ..MountOptions::default()
    });
    let url = format!("http://{}", primary.listen_addr());
    let replicas: Vec<Mount> = ["replica-1", "replica-2"]
        .iter()
        .map(|name| {
            Mount::start(MountOptions {
                extra_yaml: format!("{}{extra}", node_yaml(name, false, Some(&url))),
                ..MountOptions::default()
            })
        })
        .collect();
    let name = "stall.db";
    let conn = open_db(&primary.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let target = position(&primary, name).unwrap();
    for replica in &replicas {
        wait_until("the replicas to follow", READY_TIMEOUT, || {
            position(replica, name).as_deref() == Some(target.as_str())
        });
    }
    let before = write_for(&conn, 1.0);
    let primary_pid = primary.pid().unwrap();
    let memory_before = resident_bytes(primary_pid);

    let stalled = replicas[0].pid().unwrap();
    send_signal(stalled, libc::SIGSTOP);
    let during = write_for(&conn, 3.0) as f64 / 3.0;
    let growth = resident_bytes(primary_pid).saturating_sub(memory_before);
    send_signal(stalled, libc::SIGCONT);
    report(format!(
        "stalled replica (synchronous: {synchronous}): {before} tx/s before, {during:.0} tx/s ({:.0} MiB) while it was stopped; the primary's memory grew {} KiB",
        during * 3.0 * 16000.0 / f64::from(1 << 20),
        growth / 1024
    ));
    assert!(
        during >= before as f64 * 0.3,
        "commits slowed from {before} to {during:.0} tx/s while a replica was stopped"
    );
    assert!(
        growth < 64 << 20,
        "the primary's memory grew {growth} bytes while a replica was stopped"
    );

    let target = position(&primary, name).unwrap();
    for replica in &replicas {
        wait_until(
            "the replicas to catch up",
            std::time::Duration::from_secs(60),
            || position(replica, name).as_deref() == Some(target.as_str()),
        );
    }
}

#[test]
fn a_stalled_replica_neither_grows_the_primary_nor_holds_up_its_commits() {
    a_stalled_replica(false);
}

#[test]
fn a_stalled_replica_of_a_synchronous_primary_is_covered_by_the_other() {
    a_stalled_replica(true);
}

/// With synchronous replication and one replica, a stalled replica holds the
/// primary's commits only until the primary drops its stream (HTTP/2 pings
/// unanswered), then the primary commits alone, as with no replica.
#[test]
fn a_synchronous_primary_whose_only_replica_stalls_waits_a_bounded_time() {
    let extra = "replication:\n  synchronous: true\n";
    let primary = Mount::start(MountOptions {
        extra_yaml: format!("{}{extra}", node_yaml("primary", true, None)),
        ..MountOptions::default()
    });
    let url = format!("http://{}", primary.listen_addr());
    let replica = Mount::start(MountOptions {
        extra_yaml: format!("{}{extra}", node_yaml("replica", false, Some(&url))),
        ..MountOptions::default()
    });
    let name = "only.db";
    let conn = open_db(&primary.db_path(name));
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let target = position(&primary, name).unwrap();
    wait_until("the replica to follow", READY_TIMEOUT, || {
        position(&replica, name).as_deref() == Some(target.as_str())
    });
    let stalled = replica.pid().unwrap();
    send_signal(stalled, libc::SIGSTOP);
    let started = std::time::Instant::now();
    conn.execute("INSERT INTO t(v) VALUES ('held')", [])
        .unwrap();
    let held = started.elapsed();
    // The next commits stand on the primary alone.
    let alone = std::time::Instant::now();
    for _ in 0..10 {
        conn.execute("INSERT INTO t(v) VALUES ('alone')", [])
            .unwrap();
    }
    let after = alone.elapsed();
    send_signal(stalled, libc::SIGCONT);
    report(format!(
        "synchronous primary, only replica stopped: the first commit waited {held:?}, the next ten took {after:?}"
    ));
    assert!(
        held < std::time::Duration::from_secs(45),
        "a commit waited {held:?} for a stopped replica"
    );
    assert!(after < std::time::Duration::from_secs(5), "{after:?}");
    let target = position(&primary, name).unwrap();
    wait_until(
        "the replica to catch up",
        std::time::Duration::from_secs(60),
        || position(&replica, name).as_deref() == Some(target.as_str()),
    );
}

/// A replica bootstraps a large database (a snapshot of every page) from a
/// primary whose lease lives 2 s: the primary must keep its lease, and its
/// node API (positions, status) must keep answering, while the snapshot is
/// read and sent.
#[test]
fn a_primary_keeps_its_lease_while_a_replica_bootstraps_a_large_database() {
    let etcd = etcd::start();
    let yaml = |hostname: &str| {
        format!(
            "lease:\n  type: etcd\n  candidate: true\n  hostname: {hostname}\n  reconnect-delay: 300ms\n  \
             etcd:\n    endpoints: [\"{}\"]\n    key: \"ltxfs-bootstrap/primary\"\n    ttl: 2s\n",
            etcd.url()
        )
    };
    let primary = Mount::start(MountOptions {
        extra_yaml: yaml("node-a"),
        ..MountOptions::default()
    });
    wait_until("node-a to become the primary", READY_TIMEOUT, || {
        primary.stderr_text().contains("this node is the primary")
    });
    let db = primary.db_path("big.db");
    {
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode=wal; CREATE TABLE blobs(id INTEGER PRIMARY KEY, data BLOB);",
        )
        .expect("schema");
        // 256 MiB of incompressible pages, in transactions of 8 MiB.
        let mut seed = 0x1234_5678_9abc_def0_u64;
        for _ in 0..32 {
            let tx = conn.unchecked_transaction().expect("begin");
            for _ in 0..64 {
                let blob: Vec<u8> = (0..128 * 1024)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                tx.execute("INSERT INTO blobs(data) VALUES (?1)", [blob])
                    .expect("insert");
            }
            tx.commit().expect("commit");
        }
        // SQLite's own checkpoint of the 256 MiB is not what the commits
        // below measure.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
    }
    let pos = position(&primary, "big.db").expect("-pos");
    let url = format!("http://{}", primary.listen_addr());
    let replica = Mount::start(MountOptions {
        extra_yaml: yaml("node-b"),
        ..MountOptions::default()
    });
    let txid = |position: &str| u64::from_str_radix(&position[..16], 16).expect("a TXID");
    let conn = rusqlite::Connection::open(&db).expect("open");
    let mut slowest = std::time::Duration::ZERO;
    let mut slowest_commit = std::time::Duration::ZERO;
    let mut answers = 0;
    wait_until("node-b to bootstrap big.db", BOOTSTRAP_TIMEOUT, || {
        let asked = std::time::Instant::now();
        assert_status_answers(&url, "during the bootstrap");
        slowest = slowest.max(asked.elapsed());
        answers += 1;
        let committing = std::time::Instant::now();
        conn.execute("INSERT INTO blobs(data) VALUES (x'01')", [])
            .expect("a commit during the bootstrap");
        slowest_commit = slowest_commit.max(committing.elapsed());
        position(&replica, "big.db").is_some_and(|at| txid(&at) >= txid(&pos))
    });
    report(format!(
        "bootstrap of 256 MiB: {answers} status calls to the primary and commits to big.db, \
         the slowest call {slowest:?}, the slowest commit {slowest_commit:?}"
    ));
    let log = primary.stderr_text();
    assert!(
        !log.contains("no longer accepting writes"),
        "the primary lost its lease during the bootstrap:\n{log}"
    );
    assert!(
        slowest < std::time::Duration::from_secs(2),
        "the primary's node API took {slowest:?} to answer during the bootstrap"
    );
    assert!(
        slowest_commit < std::time::Duration::from_secs(2),
        "a commit to the database being copied took {slowest_commit:?}"
    );
    let primary_at = position(&primary, "big.db").expect("-pos");
    wait_until("node-b to follow the commits", READY_TIMEOUT, || {
        position(&replica, "big.db").as_deref() == Some(primary_at.as_str())
    });
}

/// The bound on a replica's bootstrap of 256 MiB in a debug build.
const BOOTSTRAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The primary's data dir fails under it (`fault`) while an application
/// writes and a replica follows: the application gets errors, ltxfs keeps
/// running and says what failed, the replica keeps every acknowledged row;
/// once an operator has repaired the disk and restarted ltxfs, the database
/// and its log agree, writes resume and the replica follows again.
fn a_failing_data_dir(fault: DiskFault) {
    let api = free_loopback_address();
    let url = format!("http://{api}");
    let mut primary = Mount::start(MountOptions {
        extra_yaml: format!(
            "{}http:\n  addr: \"{api}\"\n",
            node_yaml("primary", true, Some(&url))
        ),
        data_dir: DataDir::Ext4(64 << 20),
        ..MountOptions::default()
    });
    let replica = Mount::start(MountOptions {
        extra_yaml: node_yaml("replica", false, Some(&url)),
        ..MountOptions::default()
    });
    let name = "app.db";
    let conn = open_db(&primary.db_path(name));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("PRAGMA synchronous=FULL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let insert = |conn: &rusqlite::Connection, id: i64| {
        conn.execute(
            "INSERT INTO t(id, v) VALUES (?1, hex(randomblob(512)))",
            [id],
        )
    };
    let acknowledged = 50;
    for id in 1..=acknowledged {
        insert(&conn, id).unwrap();
    }
    let before = position(&primary, name).unwrap();
    wait_until("the replica to follow", READY_TIMEOUT, || {
        position(&replica, name).as_deref() == Some(before.as_str())
    });

    primary.fail_data_disk(fault);
    let mut refused = 0;
    for id in acknowledged + 1..=acknowledged + 20 {
        match insert(&conn, id) {
            Ok(_) => panic!("a write succeeded on a failed disk ({fault:?})"),
            Err(rusqlite::Error::SqliteFailure(error, _)) => {
                // After one I/O error on a disk that reads nothing, SQLite
                // reports its cached pages as malformed: it does the same on
                // such a disk without ltxfs.
                let corrupt_allowed = fault == DiskFault::Shutdown;
                assert!(
                    matches!(
                        error.code,
                        rusqlite::ErrorCode::SystemIoFailure
                            | rusqlite::ErrorCode::ReadOnly
                            | rusqlite::ErrorCode::CannotOpen
                    ) || (corrupt_allowed && error.code == rusqlite::ErrorCode::DatabaseCorrupt),
                    "a write on a failed disk gave {error:?}"
                );
                refused += 1;
            }
            Err(other) => panic!("a write on a failed disk gave {other}"),
        }
    }
    assert_eq!(refused, 20);
    // Reads answer with what was committed, or fail cleanly where the disk
    // cannot be read at all.
    match conn.query_row("SELECT count(*) FROM t", [], |row| row.get::<_, i64>(0)) {
        Ok(rows) => assert_eq!(rows, acknowledged),
        Err(error) => assert_eq!(
            fault,
            DiskFault::Shutdown,
            "a read on a read-only disk failed: {error}"
        ),
    }
    assert!(
        primary.is_running(),
        "ltxfs exited on a failed disk:\n{}",
        primary.stderr_text()
    );
    let what_failed = match fault {
        DiskFault::ReadOnly => "Read-only file system",
        DiskFault::Shutdown => "Input/output error",
    };
    let log = primary.stderr_text();
    assert!(
        log.lines()
            .any(|line| line.contains("ERROR") && line.contains(what_failed)),
        "no error names the fault ({what_failed}):\n{log}"
    );
    assert!(!log.contains("panicked"), "ltxfs panicked:\n{log}");
    assert_status_answers(&url, "on a failed disk");
    assert_eq!(position(&primary, name).as_deref(), Some(before.as_str()));
    assert_eq!(position(&replica, name).as_deref(), Some(before.as_str()));
    let on_replica = open_db(&replica.db_path(name));
    assert_eq!(
        query_i64(&on_replica, "SELECT count(*) FROM t"),
        acknowledged
    );
    drop(on_replica);

    drop(conn);
    let stopped = primary.stop();
    report(format!(
        "ltxfs on a failed disk ({fault:?}) exited with {stopped}"
    ));
    primary.repair_data_disk();
    primary.restart();
    let conn = open_db(&primary.db_path(name));
    assert_eq!(integrity_check(&conn), "ok");
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM t"), acknowledged);
    for id in acknowledged + 1..=acknowledged + 20 {
        insert(&conn, id).unwrap();
    }
    let after = position(&primary, name).unwrap();
    wait_until(
        "the replica to follow the restarted primary",
        READY_TIMEOUT,
        || position(&replica, name).as_deref() == Some(after.as_str()),
    );
    let on_replica = open_db(&replica.db_path(name));
    assert_eq!(
        query_i64(&on_replica, "SELECT count(*) FROM t"),
        acknowledged + 20
    );
    assert_eq!(integrity_check(&on_replica), "ok");
    assert_log_replays_to_the_live_database(&mut primary, conn, name);
}

#[test]
fn a_data_dir_that_turns_read_only_fails_writes_and_keeps_serving_reads() {
    a_failing_data_dir(DiskFault::ReadOnly);
}

#[test]
fn a_data_dir_whose_disk_fails_every_io_fails_cleanly_and_recovers_after_repair() {
    a_failing_data_dir(DiskFault::Shutdown);
}
