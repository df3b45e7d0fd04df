//! Backups across a node's life: restore-on-boot before the `exec` command
//! starts, a destination that fails for a while and comes back, and a
//! failover (real etcd) after which the new primary continues the same
//! history in the same place.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use crate::support::backup_check::*;
use crate::support::{cluster, etcd};
use test_support::{write_config, yaml_quote};

/// How long the `exec` command of a restore-on-boot mount may run.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The config of candidate `hostname` in a cluster whose lease is
/// `<key_prefix>/primary` in `etcd` with `ttl`, backing up to `url` (with
/// `more` of the `backup:` section).
fn etcd_node_yaml(
    etcd: &etcd::Etcd,
    hostname: &str,
    key_prefix: &str,
    ttl: &str,
    url: &str,
    more: &str,
) -> String {
    format!(
        "lease:\n  type: etcd\n  candidate: true\n  hostname: {hostname}\n  reconnect-delay: 300ms\n  \
         etcd:\n    endpoints: [\"{}\"]\n    key: \"{key_prefix}/primary\"\n    ttl: {ttl}\n{}",
        etcd.url(),
        backup_yaml(url, more)
    )
}

/// Starts a candidate with `yaml`, waits until it is the primary, and commits
/// ten rows to table `t` of [`cluster::DB`]; returns once the backup at `url`
/// holds them.
fn primary_with_ten_backed_up_rows(yaml: String, url: &str) -> Mount {
    let node = Mount::start(MountOptions {
        extra_yaml: yaml,
        ..MountOptions::default()
    });
    cluster::wait_until_primary(&node);
    open_db(&node.db_path(cluster::DB))
        .execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY)")
        .expect("schema");
    cluster::insert(&node.db_path(cluster::DB), 0, 10);
    let (txid, _) = position(&node, cluster::DB);
    wait_for_backup(&["--url", url], cluster::DB, txid, &node);
    node
}

/// Starts a mount that backs up to `url` (with `more` of the `backup:`
/// section), creates table `t` in `app.db` and waits until the backup holds
/// it: every later TXID is restorable.
fn backed_up_mount(url: &str, more: &str) -> (Mount, rusqlite::Connection) {
    let mount = Mount::start(MountOptions {
        extra_yaml: backup_yaml(url, more),
        ..MountOptions::default()
    });
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    connection
        .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);")
        .expect("schema");
    let (txid, _) = position(&mount, "app.db");
    wait_for_backup(&["--url", url], "app.db", txid, &mount);
    (mount, connection)
}

/// [`backed_up_mount`] with `rows` rows inserted, one transaction each;
/// returns once the backup holds all of it.
fn mount_with_rows(url: &str, rows: i64) -> Mount {
    let (mount, connection) = backed_up_mount(url, "");
    for value in 0..rows {
        insert(&connection, &mount, value);
    }
    let (txid, _) = position(&mount, "app.db");
    wait_for_backup(&["--url", url], "app.db", txid, &mount);
    mount
}

#[test]
fn restore_on_boot_fills_an_empty_node_before_exec_and_never_restores_over_data() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let mut first = mount_with_rows(&url, 25);
    let backed_up = fs::read_to_string(first.db_path("app.db-pos")).expect("-pos");
    first.stop();

    // A new node with an empty data dir: the exec command must see the data.
    let (_dir, root) = temp_root("ltxfs-boot-");
    let mnt = root.join("mnt");
    let data = root.join("data");
    let config = root.join("ltxfs.yml");
    let seen = root.join("seen.txt");
    write_config(
        &config,
        &data,
        Some(&mnt),
        &backup_yaml(&url, "  restore-on-boot: true\n"),
    )
    .expect("write ltxfs.yml");
    let script = format!(
        "cat {mnt}/app.db-pos > {seen} && sqlite3 {mnt}/app.db 'SELECT count(*) FROM t; \
         INSERT INTO t(v) VALUES (1000);' >> {seen}",
        mnt = mnt.display(),
        seen = seen.display()
    );
    let run = |script: &str| {
        let mut child = ltxfs_command()
            .args([
                "mount",
                "--config",
                &config.to_string_lossy(),
                "--",
                "sh",
                "-c",
                script,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ltxfs mount");
        let status = wait_timeout(&mut child, BOOT_TIMEOUT);
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        match status {
            Some(status) => (status, stderr),
            None => {
                reap_after_kill(&mut child);
                panic!("ltxfs mount did not finish; stderr:\n{stderr}");
            }
        }
    };
    let (status, stderr) = run(&script);
    assert!(status.success(), "{status}; stderr:\n{stderr}");
    assert!(stderr.contains("restored from the backup"), "{stderr}");
    // The restore's progress is logged, from its start to its end.
    for percent in ["percent=0 ", "percent=100 "] {
        assert!(
            stderr
                .lines()
                .any(|line| line.contains("restoring from the backup") && line.contains(percent)),
            "no {percent}in:\n{stderr}"
        );
    }
    let seen_text = fs::read_to_string(&seen).expect("the exec command ran");
    // The same position as the backed-up node: the history continues.
    assert_eq!(
        seen_text.lines().next(),
        Some(backed_up.trim_end()),
        "{seen_text}"
    );
    assert_eq!(seen_text.lines().nth(1), Some("25"), "{seen_text}");

    // Started again with data in its data dir, it keeps its own (26 rows),
    // even though the backup may not have the last one yet.
    let count = format!(
        "sqlite3 {mnt}/app.db 'SELECT count(*) FROM t' > {seen}",
        mnt = mnt.display(),
        seen = seen.display()
    );
    let (status, stderr) = run(&count);
    assert!(status.success(), "{status}; stderr:\n{stderr}");
    assert!(!stderr.contains("restored from the backup"), "{stderr}");
    assert_eq!(fs::read_to_string(&seen).unwrap().trim(), "26");
}

/// Regression: a candidate that restored its data at boot took a free lease
/// at once, before a candidate that kept its own data (which may hold
/// transactions the backup never received) had restarted; that candidate
/// then joined as a replica and its newer transactions were replaced. A
/// restored node now leaves the lease to such peers for one lease TTL.
#[test]
fn a_restored_node_leaves_the_lease_to_a_peer_that_kept_newer_data() {
    let etcd = etcd::start();
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let (newer, older) = (
        backup_dir.path().join("newer"),
        backup_dir.path().join("older"),
    );
    fs::create_dir(&newer).expect("backup dir");
    let node_yaml = |hostname: &str, backup: &Path, more: &str| {
        etcd_node_yaml(
            &etcd,
            hostname,
            "ltxfs-restored",
            "5s",
            &file_url(backup),
            more,
        )
    };
    // Node B backs up ten rows, then (its backup copied aside as it was)
    // commits ten more.
    let mut node_b =
        primary_with_ten_backed_up_rows(node_yaml("node-b", &newer, ""), &file_url(&newer));
    node_b.stop();
    let copied = std::process::Command::new("cp")
        .args(["-a", &newer.to_string_lossy(), &older.to_string_lossy()])
        .status()
        .expect("cp");
    assert!(copied.success());
    node_b.restart();
    wait_until(
        "node-b to take the lease again",
        cluster::CLUSTER_TIMEOUT,
        || cluster::accepts_writes(&node_b),
    );
    cluster::insert(&node_b.db_path(cluster::DB), 10, 10);
    let newest = position(&node_b, cluster::DB);
    node_b.stop();

    // Every node now backs up to the older copy. Node A, on an empty data
    // dir, restores ten rows; node B comes back with its twenty.
    let config = fs::read_to_string(node_b.config_path()).expect("config");
    fs::write(
        node_b.config_path(),
        config.replace(&*newer.to_string_lossy(), &older.to_string_lossy()),
    )
    .expect("config");
    let node_a = Mount::start(MountOptions {
        extra_yaml: node_yaml("node-a", &older, "  restore-on-boot: true\n"),
        ..MountOptions::default()
    });
    assert!(
        node_a.stderr_text().contains("restored from the backup"),
        "{}",
        node_a.stderr_text()
    );
    node_b.restart();
    let nodes = [("node-a", &node_a), ("node-b", &node_b)];
    assert_eq!(cluster::wait_for_primary(&nodes), "node-b");
    cluster::wait_converged(&node_b, &[&node_a]);
    assert_eq!(position(&node_a, cluster::DB), newest);
    let rows = open_db(&node_a.db_path(cluster::DB))
        .query_row("SELECT count(*) FROM t", [], |row| row.get::<_, i64>(0))
        .expect("count");
    assert_eq!(rows, 20);
}

/// A candidate that starts empty while a primary holds the lease follows that
/// primary: it does not download the backup, which may be older than the
/// primary's data, and it need not wait a lease TTL before it serves.
#[test]
fn an_empty_node_joining_a_live_primary_follows_it_instead_of_restoring() {
    let etcd = etcd::start();
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let node_yaml = |hostname: &str| {
        etcd_node_yaml(
            &etcd,
            hostname,
            "ltxfs-joining",
            "5s",
            &url,
            "  restore-on-boot: true\n",
        )
    };
    let node_b = primary_with_ten_backed_up_rows(node_yaml("node-b"), &url);

    let node_a = Mount::start(MountOptions {
        extra_yaml: node_yaml("node-a"),
        ..MountOptions::default()
    });
    let log = node_a.stderr_text();
    assert!(
        log.contains("a primary holds the lease; this node gets its data from it"),
        "{log}"
    );
    assert!(!log.contains("restored from the backup"), "{log}");
    cluster::wait_converged(&node_b, &[&node_a]);
    let nodes = [("node-a", &node_a), ("node-b", &node_b)];
    assert_eq!(cluster::wait_for_primary(&nodes), "node-b");
    let rows = open_db(&node_a.db_path(cluster::DB))
        .query_row("SELECT count(*) FROM t", [], |row| row.get::<_, i64>(0))
        .expect("count");
    assert_eq!(rows, 10);
}

#[test]
fn a_failing_destination_delays_only_the_backup_and_keeps_its_change_sets() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let root = backup_dir.path().join("dest");
    fs::create_dir(&root).expect("destination dir");
    let url = file_url(&root);
    let mut mount = mount_with_rows(&url, 5);
    // Retention that would merge the change sets of the outage within it.
    fs::write(
        mount.config_path(),
        format!(
            "data:\n  dir: {}\n  retention: 500ms\n  retention-monitor-interval: 100ms\n\
             http:\n  addr: \"127.0.0.1:0\"\n{}",
            yaml_quote(&mount.data_dir().to_string_lossy()),
            backup_yaml(&url, "")
        ),
    )
    .expect("rewrite ltxfs.yml");
    mount.restart();

    // The destination breaks: its directory becomes a plain file. Rounds meanwhile
    // must fail, not take it for an empty destination and replace its history
    // with a snapshot once it is back.
    let away = backup_dir.path().join("away");
    fs::rename(&root, &away).expect("move the destination away");
    fs::write(&root, b"not a directory").expect("block the destination");
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    let mut during = Vec::new();
    for value in 0..40 {
        connection
            .execute("INSERT INTO t(v) VALUES (?1)", [value])
            .expect("a commit while the destination is down");
        during.push(position(&mount, "app.db"));
    }
    wait_until("the failure to be logged", BACKUP_TIMEOUT, || {
        mount.stderr_text().contains("backup failed")
    });
    // Several rounds fail meanwhile (backoff starts at the sync interval), and
    // retention runs several times past its period.
    std::thread::sleep(Duration::from_millis(1500));

    fs::remove_file(&root).expect("unblock the destination");
    fs::rename(&away, &root).expect("bring the destination back");
    let (txid, checksum) = position(&mount, "app.db");
    wait_for_backup(&["--url", &url], "app.db", txid, &mount);
    wait_until("the recovery to be logged", BACKUP_TIMEOUT, || {
        mount
            .stderr_text()
            .contains("backups reach the destination again")
    });
    let log = mount.stderr_text();
    assert_eq!(log.matches("backup failed").count(), 1, "{log}");
    let restored = mount.root().join("restored.db");
    restore(&["--url", &url], "app.db", &restored, &[]);
    assert_eq!(file_checksum(&restored), checksum);
    assert_eq!(count_rows(&restored), 45);
    // The change sets of the outage were kept for the destination: each of
    // them is restorable, and no snapshot replaced them.
    let (txid, checksum) = during[17];
    let output = try_restore(
        &["--url", &url],
        "app.db",
        &restored,
        &["--txid", &txid.to_string()],
    );
    assert!(
        output.status.success(),
        "{}\nobjects: {:#?}\nlog:\n{}",
        text(&output),
        object_files(&root),
        mount.stderr_text()
    );
    assert_eq!(file_checksum(&restored), checksum);
    assert_eq!(count_rows(&restored), 5 + 18);
    let snapshots = fs::read_dir(root.join("app.db").join("snapshots"))
        .expect("snapshots")
        .count();
    assert_eq!(
        snapshots, 1,
        "a snapshot replaced the change sets of the outage"
    );
}

#[test]
fn after_a_failover_the_new_primary_continues_the_same_backup() {
    let etcd = etcd::start();
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let node_yaml =
        |hostname: &str| etcd_node_yaml(&etcd, hostname, "ltxfs-backup", "2s", &url, "");
    let mut node_a = Mount::start(MountOptions {
        extra_yaml: node_yaml("node-a"),
        ..MountOptions::default()
    });
    cluster::wait_until_primary(&node_a);
    let node_b = Mount::start(MountOptions {
        extra_yaml: node_yaml("node-b"),
        ..MountOptions::default()
    });
    let nodes = [("node-a", &node_a), ("node-b", &node_b)];
    assert_eq!(cluster::wait_for_primary(&nodes), "node-a");
    let connection = open_db(&node_a.db_path(cluster::DB));
    connection
        .execute_batch("CREATE TABLE t(seq INTEGER PRIMARY KEY)")
        .expect("schema");
    drop(connection);
    cluster::insert(&node_a.db_path(cluster::DB), 0, 50);
    cluster::wait_converged(&node_a, &[&node_b]);
    let (txid, _) = position(&node_a, cluster::DB);
    wait_for_backup(&["--url", &url], cluster::DB, txid, &node_a);

    node_a.kill9();
    wait_until("node-b to take over", cluster::CLUSTER_TIMEOUT, || {
        cluster::accepts_writes(&node_b)
    });
    cluster::insert(&node_b.db_path(cluster::DB), 50, 30);
    let (txid, checksum) = position(&node_b, cluster::DB);
    wait_for_backup(&["--url", &url], cluster::DB, txid, &node_b);

    let restored = node_b.root().join("restored.db");
    restore(&["--url", &url], cluster::DB, &restored, &[]);
    assert_eq!(file_checksum(&restored), checksum);
    let connection = rusqlite::Connection::open(&restored).expect("open restored");
    assert_eq!(query_i64(&connection, "SELECT count(*) FROM t"), 80);
    // The new primary went on from where the old one stopped: one snapshot,
    // and change objects from both epochs.
    let listing = ltxfs(&["backup", "verify", "--url", &url]);
    assert!(listing.status.success(), "{}", text(&listing));
    let snapshots = fs::read_dir(backup_dir.path().join(cluster::DB).join("snapshots"))
        .expect("snapshots")
        .count();
    assert_eq!(
        snapshots, 1,
        "the new primary uploaded a snapshot instead of continuing"
    );
}

#[test]
fn compaction_merges_objects_and_every_txid_stays_restorable() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let (mount, connection) = backed_up_mount(&url, "  compaction-windows: [400ms, 1600ms]\n");
    let mut history = Vec::new();
    for value in 0..40 {
        connection
            .execute("INSERT INTO t(v) VALUES (?1)", [value])
            .expect("insert");
        history.push(position(&mount, "app.db"));
        std::thread::sleep(Duration::from_millis(60));
    }
    let (txid, _) = position(&mount, "app.db");
    wait_for_backup(&["--url", &url], "app.db", txid, &mount);
    let objects = |folder: &str| {
        fs::read_dir(backup_dir.path().join("app.db").join(folder))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    // Every 1.6 s window that has passed holds one level-2 object.
    wait_until("level-2 objects to appear", BACKUP_TIMEOUT, || {
        objects("changes2") >= 1 && objects("changes") + objects("changes1") <= 6
    });
    let total = objects("changes") + objects("changes1") + objects("changes2");
    assert!(total < 10, "{total} change objects for 40 transactions");
    let scratch = mount.root().join("restored");
    fs::create_dir(&scratch).expect("scratch");
    for (index, (txid, checksum)) in history.iter().enumerate().step_by(3) {
        let output = scratch.join(format!("{txid}.db"));
        restore(
            &["--url", &url],
            "app.db",
            &output,
            &["--txid", &txid.to_string()],
        );
        assert_eq!(file_checksum(&output), *checksum, "TXID {txid}");
        assert_eq!(count_rows(&output), index as i64 + 1, "TXID {txid}");
    }
    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert!(output.status.success(), "{}", text(&output));

    // Once the last window of 1.6 s has passed, one cumulative object spans
    // everything since the snapshot: the newest state restores from two
    // objects, and its pages give the mount's checksum.
    let (_, checksum) = position(&mount, "app.db");
    let latest = scratch.join("latest.db");
    let mut printed = String::new();
    wait_until("a restore from two objects", BACKUP_TIMEOUT, || {
        printed = restore(&["--url", &url], "app.db", &latest, &[]);
        printed.contains("(from 2 objects)")
    });
    assert_eq!(file_checksum(&latest), checksum, "{printed}");
    assert_eq!(count_rows(&latest), 40);
    assert!(objects("cumulative2") >= 1);
}

/// The primary keeps the records it builds cumulative objects from in its
/// data dir: restarted, with a log that retention merged past the snapshot,
/// it goes on from them instead of uploading a new snapshot.
#[test]
fn after_a_restart_cumulative_objects_continue_without_a_new_snapshot() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let mut mount = Mount::start(MountOptions {
        extra_yaml: format!(
            "  retention: 3s\n  retention-monitor-interval: 100ms\n{}",
            backup_yaml(&url, "  compaction-windows: [300ms, 900ms]\n")
        ),
        ..MountOptions::default()
    });
    let scratch = mount.root().join("restored.db");
    let restores_from_two_objects = |mount: &Mount, rows: i64| {
        let (_, checksum) = position(mount, "app.db");
        wait_for("a restore from two objects", BACKUP_TIMEOUT, || {
            let output = try_restore(&["--url", &url], "app.db", &scratch, &[]);
            let printed = text(&output);
            if output.status.success()
                && printed.contains("(from 2 objects)")
                && file_checksum(&scratch) == checksum
            {
                Ok(())
            } else {
                Err(printed)
            }
        });
        assert_eq!(count_rows(&scratch), rows);
    };
    {
        let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
        connection
            .execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);")
            .expect("schema");
        // The snapshot first, so the rows go up as change objects.
        let (txid, _) = position(&mount, "app.db");
        wait_for_backup(&["--url", &url], "app.db", txid, &mount);
        // Over several windows, so a cumulative object spans them.
        for value in 0..10 {
            insert(&connection, &mount, value);
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    restores_from_two_objects(&mount, 10);

    mount.stop();
    mount.restart();
    let (before, _) = position(&mount, "app.db");
    let log = mount.data_dir().join("dbs").join("app.db").join("log");
    wait_until(
        "retention to merge the log up to the restart",
        BACKUP_TIMEOUT,
        || {
            ltxfs::store::log::read_change_sets(&log).is_ok_and(|sets| {
                sets.first()
                    .and_then(|set| {
                        ltxfs::ltx::Header::decode(&set[..ltxfs::ltx::HEADER_SIZE]).ok()
                    })
                    .is_some_and(|base| base.is_snapshot() && base.max_txid.0 == before)
            })
        },
    );
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    for value in 10..20 {
        insert(&connection, &mount, value);
        std::thread::sleep(Duration::from_millis(150));
    }
    restores_from_two_objects(&mount, 20);
    let snapshots = fs::read_dir(backup_dir.path().join("app.db").join("snapshots"))
        .expect("snapshots")
        .count();
    assert_eq!(
        snapshots, 1,
        "the restarted primary uploaded a new snapshot"
    );

    // A kept record damaged while the node was down: it is dropped, with a
    // warning, and a snapshot restarts the cumulative objects (the rounds do
    // not fail on it forever).
    drop(connection);
    mount.stop();
    let kept = mount.data_dir().join("backup-cumulative");
    let mut damaged = 0;
    for destination in fs::read_dir(&kept).expect("kept records") {
        for record in fs::read_dir(destination.unwrap().path().join("app.db")).unwrap() {
            let path = record.unwrap().path();
            let mut bytes = fs::read(&path).unwrap();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
            fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no record was kept");
    mount.restart();
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    for value in 20..30 {
        insert(&connection, &mount, value);
    }
    wait_until("a new snapshot", BACKUP_TIMEOUT, || {
        fs::read_dir(backup_dir.path().join("app.db").join("snapshots"))
            .is_ok_and(|entries| entries.count() == 2)
    });
    // The new snapshot may hold every row so far (when the writes ended
    // before the first round): the rows after it show the cumulative objects
    // going on from it.
    for value in 30..40 {
        insert(&connection, &mount, value);
        std::thread::sleep(Duration::from_millis(150));
    }
    restores_from_two_objects(&mount, 40);
    assert!(
        mount
            .stderr_text()
            .contains("a kept cumulative record is damaged"),
        "{}",
        mount.stderr_text()
    );
}

/// Regression: `backup verify` and `restore` list the objects, then read them;
/// the primary's compaction deletes merged objects meanwhile. Both must plan
/// again (or skip what went away) instead of failing on the missing object.
#[test]
fn verify_and_restore_succeed_while_compaction_deletes_objects() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let (mount, _schema_connection) =
        backed_up_mount(&url, "  compaction-windows: [200ms, 600ms]\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, db) = (stop.clone(), mount.db_path("app.db"));
        std::thread::spawn(move || {
            let connection = rusqlite::Connection::open(db).expect("open");
            let mut value = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                connection
                    .execute("INSERT INTO t(v) VALUES (?1)", [value])
                    .expect("insert");
                value += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let restored = mount.root().join("restored.db");
    let merged = || {
        fs::read_dir(backup_dir.path().join("app.db").join("changes2"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    // Until compaction has merged several windows, and at least 20 rounds.
    let deadline = std::time::Instant::now() + BACKUP_TIMEOUT;
    let mut rounds = 0;
    while rounds < 20 || merged() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "compaction did not run"
        );
        let output = ltxfs(&["backup", "verify", "--url", &url]);
        assert!(output.status.success(), "{}", text(&output));
        restore(&["--url", &url], "app.db", &restored, &[]);
        count_rows(&restored);
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
}

#[test]
fn encrypted_backups_hide_the_pages_and_open_only_with_the_identity() {
    use age::secrecy::ExposeSecret;
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let keys = tempfile::tempdir().expect("keys dir");
    let identity = age::x25519::Identity::generate();
    let key_file = keys.path().join("backup.key");
    fs::write(&key_file, identity.to_string().expose_secret()).expect("write key");
    let wrong_key_file = keys.path().join("other.key");
    fs::write(
        &wrong_key_file,
        age::x25519::Identity::generate()
            .to_string()
            .expose_secret(),
    )
    .expect("write key");
    let encryption = format!(
        "  compaction-windows: [300ms, 900ms]\n  encryption:\n    age-recipients: [\"{}\"]\n",
        identity.to_public()
    );
    let (mount, connection) = backed_up_mount(&url, &encryption);
    connection
        .execute_batch("CREATE TABLE s(x TEXT);")
        .expect("schema");
    for n in 0..30 {
        connection
            .execute("INSERT INTO s(x) VALUES (?1)", [format!("TOPSECRET-{n}")])
            .expect("insert");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (txid, checksum) = position(&mount, "app.db");
    wait_for_backup(&["--url", &url], "app.db", txid, &mount);
    let key = key_file.to_string_lossy().to_string();
    let restored = mount.root().join("restored.db");
    // Change objects merged, and a cumulative object (built on the primary,
    // which holds no identity) over everything since the snapshot.
    let merged = |level: &str| {
        fs::read_dir(backup_dir.path().join("app.db").join(level))
            .is_ok_and(|mut entries| entries.next().is_some())
    };
    let mut printed = String::new();
    wait_until("sealed objects to be merged", BACKUP_TIMEOUT, || {
        printed = restore(
            &["--url", &url],
            "app.db",
            &restored,
            &["--age-identity", &key],
        );
        printed.contains("(from 2 objects)") && (merged("changes1") || merged("changes2"))
    });
    assert_eq!(file_checksum(&restored), checksum, "{printed}");
    for folder in fs::read_dir(backup_dir.path().join("app.db")).expect("folders") {
        for object in fs::read_dir(folder.expect("folder").path()).expect("objects") {
            let bytes = fs::read(object.expect("object").path()).expect("read object");
            for plain in [&b"TOPSECRET"[..], b"SQLite format 3", b"LTX1"] {
                assert!(
                    !bytes.windows(plain.len()).any(|window| window == plain),
                    "an object holds {:?} in the clear",
                    String::from_utf8_lossy(plain)
                );
            }
        }
    }

    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("SHA-256 only"), "{}", text(&output));
    let output = ltxfs(&["backup", "verify", "--url", &url, "--age-identity", &key]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("of 1 databases restores"),
        "{}",
        text(&output)
    );

    let secrets = rusqlite::Connection::open(&restored).expect("open restored");
    assert_eq!(
        query_i64(
            &secrets,
            "SELECT count(*) FROM s WHERE x LIKE 'TOPSECRET-%'"
        ),
        30
    );

    let refused = mount.root().join("refused.db");
    let refused_text = refused.to_string_lossy().to_string();
    let output = ltxfs(&["restore", "--name", "app.db", "--url", &url, &refused_text]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("--age-identity"),
        "{}",
        text(&output)
    );
    let wrong = wrong_key_file.to_string_lossy().to_string();
    let output = ltxfs(&[
        "restore",
        "--name",
        "app.db",
        "--url",
        &url,
        "--age-identity",
        &wrong,
        &refused_text,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(text(&output).contains("wrong key"), "{}", text(&output));
    assert!(
        !refused.exists(),
        "a restore with the wrong key wrote a file"
    );
}

#[test]
fn after_a_sigkill_the_backup_resumes_without_a_gap() {
    let backup_dir = tempfile::tempdir().expect("tempdir");
    let url = file_url(backup_dir.path());
    let (mut mount, connection) = backed_up_mount(&url, "");
    let mut history = Vec::new();
    for value in 0..200 {
        history.push(insert(&connection, &mount, value));
        if value == 120 {
            // Killed while rounds upload (every 100 ms) and commits go on.
            drop(connection);
            mount.kill9();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    mount.restart();
    let (txid, checksum) = position(&mount, "app.db");
    assert!(txid >= history.last().unwrap().0, "the mount lost commits");
    wait_for_backup(&["--url", &url], "app.db", txid, &mount);
    let output = ltxfs(&["backup", "verify", "--url", &url]);
    assert!(output.status.success(), "{}", text(&output));
    let restored = mount.root().join("restored.db");
    restore(&["--url", &url], "app.db", &restored, &[]);
    assert_eq!(file_checksum(&restored), checksum);
    // No gap: every TXID of the run is restorable, and no snapshot was needed.
    for (txid, checksum) in history.iter().step_by(17) {
        restore(
            &["--url", &url],
            "app.db",
            &restored,
            &["--txid", &txid.to_string()],
        );
        assert_eq!(file_checksum(&restored), *checksum, "TXID {txid}");
    }
    let snapshots = fs::read_dir(backup_dir.path().join("app.db").join("snapshots"))
        .expect("snapshots")
        .count();
    assert_eq!(
        snapshots, 1,
        "the restart uploaded a snapshot instead of resuming"
    );
}
