//! The `ltxfs mount` command line: bad input (exit status 2, one line on stderr,
//! nothing changed on disk), signals, `-- CMD` exec, stale mounts, and what the mount
//! refuses (non-SQLite content, subdirectories).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use test_support::{force_unmount, run_bounded, write_config, yaml_quote};

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A temporary directory with a config, for runs not managed by [`Mount`].
struct Scratch {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        require_fuse();
        let (dir, root) = temp_root("ltxfs-cli-");
        Scratch { _dir: dir, root }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Writes `ltxfs.yml` with `data.dir` = `data` and returns its path.
    fn config(&self, data: &Path, fuse_dir: Option<&Path>, extra: &str) -> PathBuf {
        let path = self.path("ltxfs.yml");
        write_config(&path, data, fuse_dir, extra).expect("write ltxfs.yml");
        path
    }

    /// A snapshot of every path under the root (to prove nothing changed).
    fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                let meta = fs::symlink_metadata(&path).unwrap();
                out.push(format!(
                    "{} {}",
                    path.strip_prefix(base).unwrap().display(),
                    meta.len()
                ));
                if meta.is_dir() {
                    walk(&path, base, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = force_unmount(&self.path("mnt"));
        let _ = force_unmount(&self.path("mnt2"));
    }
}

/// Spawns `ltxfs mount <args...>` with piped output.
fn spawn_ltxfs(args: &[&std::ffi::OsStr]) -> Child {
    ltxfs_command()
        .arg("mount")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ltxfs")
}

/// Runs ltxfs to completion (bounded) and returns (exit code, stderr).
fn run_ltxfs(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = wait_all_unchecked(vec![spawn_ltxfs(args)], EXIT_TIMEOUT);
    let out = out.into_iter().next().unwrap();
    (out.status.code(), out.stderr)
}

/// Asserts the bad-input contract: status 2, exactly one non-empty stderr line that
/// mentions one of `mentions` (case-insensitive).
fn assert_usage_error(code: Option<i32>, stderr: &str, mentions: &[&str]) {
    assert_eq!(code, Some(2), "exit status; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr, got:\n{stderr}"
    );
    let lower = lines[0].to_lowercase();
    assert!(
        mentions.iter().any(|m| lower.contains(&m.to_lowercase())),
        "stderr does not mention any of {mentions:?}: {}",
        lines[0]
    );
}

fn os(p: &Path) -> &std::ffi::OsStr {
    p.as_os_str()
}

// ---------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------

#[test]
fn invalid_config_unknown_key() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    let config = s.config(&data, None, "bogus_key: 1\n");
    let before = s.tree();
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert_eq!(s.tree(), before, "something changed on disk");
    assert!(!data.exists() && !mnt.exists());
    // Last, so that a wrong message does not hide the other checks.
    assert_usage_error(code, &stderr, &["bogus_key"]);
}

#[test]
fn invalid_config_unknown_nested_key() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let config = s.path("ltxfs.yml");
    fs::write(
        &config,
        format!(
            "data:\n  dir: {}\n  bogus_nested: true\n",
            yaml_quote(&data.to_string_lossy())
        ),
    )
    .unwrap();
    let before = s.tree();
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert_eq!(s.tree(), before, "something changed on disk");
    assert!(!is_mounted(&mnt));
    // Last, so that a wrong message does not hide the other checks.
    assert_usage_error(code, &stderr, &["bogus_nested"]);
}

#[test]
fn mount_point_is_non_empty_directory() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    fs::write(mnt.join("precious.txt"), "keep me").unwrap();
    let config = s.config(&data, None, "");
    let before = s.tree();
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert!(!is_mounted(&mnt));
    assert_eq!(s.tree(), before, "something changed on disk");
    assert_eq!(
        fs::read_to_string(mnt.join("precious.txt")).unwrap(),
        "keep me"
    );
    // Last, so that a wrong message does not hide the other checks.
    assert_usage_error(
        code,
        &stderr,
        &[&mnt.to_string_lossy(), "empty", "mount point"],
    );
}

#[test]
fn mount_point_is_regular_file() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::write(&mnt, "not a directory").unwrap();
    let config = s.config(&data, None, "");
    let before = s.tree();
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert!(!is_mounted(&mnt));
    assert_eq!(s.tree(), before, "something changed on disk");
    assert_eq!(fs::read_to_string(&mnt).unwrap(), "not a directory");
    // Last, so that a wrong message does not hide the other checks.
    assert_usage_error(
        code,
        &stderr,
        &[&mnt.to_string_lossy(), "directory", "mount point"],
    );
}

#[test]
fn data_dir_not_writable() {
    let s = Scratch::new();
    let blocker = s.path("file");
    fs::write(&blocker, "a regular file").unwrap();
    let data = blocker.join("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let config = s.config(&data, None, "");
    let before = s.tree();
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert!(!is_mounted(&mnt));
    assert_eq!(s.tree(), before, "something changed on disk");
    // Last, so that a wrong message does not hide the other checks.
    assert_usage_error(
        code,
        &stderr,
        &[&blocker.to_string_lossy(), "data", "directory"],
    );
}

#[test]
fn second_process_on_same_data_dir_fails() {
    let mut first = Mount::start(MountOptions::default());
    let db = first.db_path("one.db");
    open_db(&db)
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES(1);")
        .unwrap();

    let s = Scratch::new();
    let mnt2 = s.path("mnt2");
    fs::create_dir(&mnt2).unwrap();
    let config = s.config(first.data_dir(), None, "");
    let data_before = fs::read_dir(first.data_dir()).unwrap().count();
    let (code, stderr) = run_ltxfs(&[os(&mnt2), "--config".as_ref(), os(&config)]);
    assert_eq!(
        code,
        Some(2),
        "second ltxfs on the same data dir; stderr:\n{stderr}"
    );
    assert!(!is_mounted(&mnt2), "the second mount must not be mounted");
    assert!(first.is_running(), "the first ltxfs must keep running");
    assert!(is_mounted(first.path()));
    assert_eq!(fs::read_dir(first.data_dir()).unwrap().count(), data_before);
    let conn = open_db(&db);
    conn.execute("INSERT INTO t VALUES(2)", []).unwrap();
    assert_eq!(query_i64(&conn, "SELECT sum(x) FROM t"), 3);
    drop(conn);
    let status = first.stop();
    assert_eq!(status.code(), Some(0));
    // Last, so that a wrong message does not hide the other checks.
    let data_dir = first.data_dir().to_string_lossy().into_owned();
    assert_usage_error(
        code,
        &stderr,
        &[&data_dir, "data", "lock", "in use", "already"],
    );
}

// ---------------------------------------------------------------------------------
// Signals and exec
// ---------------------------------------------------------------------------------

fn signal_unmounts_cleanly(signal: libc::c_int) {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("keep.db");
    open_db(&db)
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES(42);")
        .unwrap();
    let status = mount.signal_and_wait(signal);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {signal}; stderr:\n{}",
        mount.stderr_text()
    );
    assert!(!anything_mounted(mount.path()), "still mounted after exit");
    mount.restart();
    assert_eq!(query_i64(&open_db(&db), "SELECT x FROM t"), 42);
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    signal_unmounts_cleanly(libc::SIGTERM);
}

/// SIGTERM as soon as the mount is ready (no window where the signal kills ltxfs
/// before its handler is installed).
#[test]
fn sigterm_right_after_ready() {
    let mut mount = Mount::start(MountOptions::default());
    for round in 0..30 {
        let status = mount.stop();
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: {status}; stderr:\n{}",
            mount.stderr_text()
        );
        assert!(
            !anything_mounted(mount.path()),
            "round {round}: still mounted"
        );
        mount.restart();
    }
}

#[test]
fn sigint_unmounts_and_exits_zero() {
    signal_unmounts_cleanly(libc::SIGINT);
}

#[test]
fn exec_exit_code_is_propagated() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let config = s.config(&data, None, "");
    // The command checks that the mount is there while it runs.
    let script = "grep -F \" $1 \" /proc/self/mountinfo | grep -q ' fuse.ltxfs ' || exit 9; exit 7";
    let (code, stderr) = run_ltxfs(&[
        os(&mnt),
        "--config".as_ref(),
        os(&config),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
        "sh".as_ref(),
        os(&mnt),
    ]);
    assert_eq!(code, Some(7), "stderr:\n{stderr}");
    assert!(!anything_mounted(&mnt), "still mounted after exec exit");
}

#[test]
fn exec_receives_forwarded_sigterm() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let config = s.config(&data, None, "");
    let started = s.path("started");
    let script = format!(
        "trap 'exit 3' TERM; : > '{}'; while :; do sleep 0.1; done",
        started.display()
    );
    let mut child = spawn_ltxfs(&[
        os(&mnt),
        "--config".as_ref(),
        os(&config),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
    ]);
    let pid = child.id();
    wait_until("the exec command to start", EXIT_TIMEOUT, || {
        started.exists() || child.try_wait().ok().flatten().is_some()
    });
    assert!(started.exists(), "ltxfs exited before running the command");
    assert!(is_mounted(&mnt), "command runs while mounted");
    send_signal(pid, libc::SIGTERM);
    let out = wait_all_unchecked(vec![child], EXIT_TIMEOUT);
    assert_eq!(out[0].status.code(), Some(3), "stderr:\n{}", out[0].stderr);
    assert!(!anything_mounted(&mnt), "still mounted after exec exit");
}

#[test]
fn mount_point_from_config() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let config = s.config(&data, Some(&mnt), "");
    let (code, stderr) = run_ltxfs(&[
        "--config".as_ref(),
        os(&config),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "grep -F \" $1 \" /proc/self/mountinfo | grep -q ' fuse.ltxfs ' && exit 5; exit 9".as_ref(),
        "sh".as_ref(),
        os(&mnt),
    ]);
    assert_eq!(code, Some(5), "fuse.dir from the config; stderr:\n{stderr}");
    assert!(!anything_mounted(&mnt));
}

// ---------------------------------------------------------------------------------
// Stale mounts
// ---------------------------------------------------------------------------------

#[test]
fn stale_mount_after_sigkill_is_cleaned() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("survivor.db");
    open_db(&db)
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES('still here');")
        .unwrap();
    mount.kill9();
    assert!(
        anything_mounted(mount.path()),
        "expected a stale mount after SIGKILL"
    );
    let probe = mount.path().to_path_buf();
    let listing = run_bounded(Duration::from_secs(10), move || {
        fs::read_dir(probe).map(|_| ())
    });
    assert!(
        !matches!(listing, Some(Ok(()))),
        "the stale mount should not answer"
    );
    mount.restart();
    assert_eq!(query_string(&open_db(&db), "SELECT x FROM t"), "still here");
    let status = mount.stop();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr_text());
    assert!(!anything_mounted(mount.path()));
}

/// A mount whose ltxfs does not answer (here stopped; in the field, one stuck
/// while dying) used to hang the next `ltxfs mount` on that mount point for
/// good, in the `statfs` that tells a stale mount from a live one. It now
/// gives up after a few seconds and says how to free the mount point.
#[test]
fn a_mount_whose_ltxfs_does_not_answer_is_refused_clearly() {
    let mut first = Mount::start(MountOptions::default());
    let pid = first.pid().expect("ltxfs runs");
    send_signal(pid, libc::SIGSTOP);

    let s = Scratch::new();
    let config = s.config(&s.path("data2"), None, "");
    let (code, stderr) = run_ltxfs(&[os(first.path()), "--config".as_ref(), os(&config)]);
    send_signal(pid, libc::SIGCONT);

    assert!(first.is_running(), "the first ltxfs must keep running");
    assert_eq!(first.stop().code(), Some(0));
    assert_usage_error(code, &stderr, &["has not answered"]);
    assert!(stderr.contains("/sys/fs/fuse/connections/"), "{stderr}");
}

// ---------------------------------------------------------------------------------
// What the mount refuses
// ---------------------------------------------------------------------------------

/// Creates `path`, writes `content`, fsyncs; returns the first error.
fn write_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut file = fs::File::create(path)?;
    file.write_all(content)?;
    file.sync_all()?;
    Ok(())
}

#[test]
fn non_sqlite_content_is_refused() {
    let mount = Mount::start(MountOptions::default());
    for name in ["notes.txt", "fake.db"] {
        let path = mount.db_path(name);
        let result = write_file(&path, b"hello");
        assert!(result.is_err(), "writing 'hello' into {name} succeeded");
        if let Ok(content) = fs::read(&path) {
            assert_ne!(content, b"hello", "{name} holds the refused bytes");
        }
    }
    // A real database still works next to the refused files.
    let conn = open_db(&mount.db_path("real.db"));
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES(1);")
        .unwrap();
    assert_eq!(query_i64(&conn, "SELECT x FROM t"), 1);
}

#[test]
fn mkdir_is_refused() {
    let mount = Mount::start(MountOptions::default());
    let sub = mount.db_path("sub");
    assert!(
        fs::create_dir(&sub).is_err(),
        "mkdir in the mount succeeded"
    );
    assert!(!sub.exists());
    assert!(!list_dir(mount.path()).contains(&"sub".to_string()));
}

/// SIGTERM while a client still has a database open: ltxfs still exits 0 in time
/// and the mount is gone (the client's next access fails, it does not hang).
#[test]
fn sigterm_with_open_database() {
    let mut mount = Mount::start(MountOptions::default());
    let db = mount.db_path("busy.db");
    let conn = open_db(&db);
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES(1);")
        .unwrap();
    let status = mount.stop();
    assert_eq!(status.code(), Some(0), "{}", mount.stderr_text());
    assert!(!anything_mounted(mount.path()), "still mounted");
    let result = run_bounded(Duration::from_secs(10), move || {
        conn.execute("INSERT INTO t VALUES(2)", []).map(|_| ())
    });
    assert!(result.is_some(), "a client access hung after ltxfs exited");
    mount.restart();
    assert_eq!(
        query_i64(&open_db(&db), "SELECT count(*) FROM t WHERE x = 1"),
        1
    );
}

#[test]
fn exec_list_runs_in_order_and_stops_at_the_last() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let migrated = s.path("migrated");
    let candidate_only = s.path("candidate-only");
    let extra = format!(
        "exec:\n  \
         - cmd: \"touch {}\"\n  \
         - cmd: \"touch {}\"\n    if-candidate: true\n  \
         - cmd: \"sh -c 'test -f {} && test -f {} && exit 6'\"\n",
        migrated.display(),
        candidate_only.display(),
        migrated.display(),
        candidate_only.display()
    );
    let config = s.config(&data, None, &extra);
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert_eq!(
        code,
        Some(6),
        "the last command's status, after the others ran (the node is a candidate, \
         so the if-candidate command runs too); stderr:\n{stderr}"
    );
    assert!(!anything_mounted(&mnt), "still mounted after exec exit");
}

#[test]
fn an_if_candidate_command_does_not_run_on_a_node_that_may_not_become_primary() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    fs::create_dir(&mnt).unwrap();
    let candidate_only = s.path("candidate-only");
    // exec starts on a replica once it reaches its primary.
    let primary = Mount::start(MountOptions::default());
    let extra = format!(
        "lease:\n  candidate: false\n  advertise-url: \"http://{}\"\n\
         exec:\n  \
         - cmd: \"touch {}\"\n    if-candidate: true\n  \
         - cmd: \"sh -c 'test -f {} || exit 7'\"\n",
        primary.listen_addr(),
        candidate_only.display(),
        candidate_only.display()
    );
    let config = s.config(&data, None, &extra);
    let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
    assert_eq!(
        code,
        Some(7),
        "the if-candidate command ran on a node that is not a candidate; stderr:\n{stderr}"
    );
    assert!(!anything_mounted(&mnt), "still mounted after exec exit");
}

#[test]
fn incomplete_or_contradictory_settings_are_refused() {
    for (extra, mentions) in [
        (
            "lease:\n  type: consul\n  consul:\n    url: \"http://localhost:8500\"\n",
            "lease.consul.key",
        ),
        ("lease:\n  candidate: false\n", "advertise-url"),
        (
            "proxy:\n  addr: \":8080\"\n  target: \"localhost:8081\"\n",
            "proxy",
        ),
    ] {
        let s = Scratch::new();
        let data = s.path("data");
        let mnt = s.path("mnt");
        let config = s.config(&data, None, extra);
        let (code, stderr) = run_ltxfs(&[os(&mnt), "--config".as_ref(), os(&config)]);
        assert_usage_error(code, &stderr, &[mentions]);
        assert!(!data.exists(), "nothing may be created on refusal");
    }
}

#[test]
fn missing_dev_fuse_is_a_usage_error() {
    let s = Scratch::new();
    let data = s.path("data");
    let mnt = s.path("mnt");
    let config = s.config(&data, None, "");
    // A private mount namespace whose /dev is empty: /dev/fuse does not exist there.
    let script = "mount -t tmpfs none /dev && exec \"$0\" mount \"$1\" --config \"$2\"";
    let child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(env!("CARGO_BIN_EXE_ltxfs"))
        .arg(&mnt)
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare (util-linux)");
    let out = wait_all_unchecked(vec![child], EXIT_TIMEOUT)
        .into_iter()
        .next()
        .unwrap();
    assert_usage_error(out.status.code(), &out.stderr, &["/dev/fuse"]);
    assert!(!data.exists() && !mnt.exists(), "nothing may be created");
}

/// An unmount by another process (an operator's `umount`) stops ltxfs with
/// an error: a node with nothing mounted must not go on holding the lease.
#[test]
fn an_unmount_by_another_process_stops_ltxfs_with_an_error() {
    let mut mount = Mount::start(MountOptions::default());
    let status = Command::new("umount")
        .arg(mount.path())
        .status()
        .expect("run umount");
    assert!(status.success(), "umount {}", mount.path().display());
    let exit = mount.wait_for_exit();
    assert_eq!(exit.code(), Some(1), "{}", mount.stderr_text());
    assert!(
        mount.stderr_text().contains("another process unmounted it"),
        "{}",
        mount.stderr_text()
    );
}

/// Databases keep the mode, owner and group they are created or changed
/// with, SQLite gives their journals and WALs the same (as in a plain
/// directory), an application running as another user creates databases it
/// owns, and all of it survives a restart.
#[test]
fn files_keep_their_mode_and_owner_and_companions_follow_the_database() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const NOBODY: u32 = 65534;
    let mut mount = Mount::start(MountOptions {
        extra_yaml: "fuse:\n  allow-other: true\n".to_string(),
        ..MountOptions::default()
    });
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let owner = |path: &Path| {
        let metadata = fs::metadata(path).unwrap();
        (metadata.uid(), metadata.gid())
    };

    // A database made private: its persistent journal and its WAL and
    // wal-index are private too.
    let private = mount.db_path("private.db");
    let conn = open_db(&private);
    conn.execute_batch("CREATE TABLE t(x)").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(mode(&private), 0o600);
    conn.execute_batch("PRAGMA journal_mode=PERSIST; INSERT INTO t VALUES (1)")
        .unwrap();
    assert_eq!(mode(&mount.db_path("private.db-journal")), 0o600);
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("INSERT INTO t VALUES (2)").unwrap();
    assert_eq!(mode(&mount.db_path("private.db-wal")), 0o600);
    assert_eq!(mode(&mount.db_path("private.db-shm")), 0o600);
    drop(conn);

    // A database given to another user: SQLite (running as root here) gives
    // its new WAL the same owner.
    let given = mount.db_path("given.db");
    let conn = open_db(&given);
    conn.execute_batch("CREATE TABLE t(x)").unwrap();
    std::os::unix::fs::chown(&given, Some(NOBODY), Some(NOBODY)).unwrap();
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("INSERT INTO t VALUES (1)").unwrap();
    assert_eq!(owner(&given), (NOBODY, NOBODY));
    assert_eq!(owner(&mount.db_path("given.db-wal")), (NOBODY, NOBODY));
    drop(conn);

    // An application running as nobody (allowed on the mount by
    // `fuse.allow-other`) creates and writes a database of its own.
    fs::set_permissions(mount.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let app = mount.db_path("app.db");
    let output = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "sqlite3",
        ])
        .arg(&app)
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1); SELECT count(*) FROM t;")
        .output()
        .expect("run sqlite3 as nobody");
    assert!(
        output.status.success(),
        "sqlite3 as nobody: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "wal\n1");
    assert_eq!(owner(&app), (NOBODY, NOBODY));

    mount.stop();
    mount.restart();
    assert_eq!(mode(&private), 0o600);
    assert_eq!(owner(&given), (NOBODY, NOBODY));
    assert_eq!(owner(&app), (NOBODY, NOBODY));
}

/// Copying or deleting a database with its companions by a glob works as in
/// a plain directory: `-pos` files are not listed (they still open by
/// name), so `app.db*` matches only SQLite's files.
#[test]
fn globs_over_a_database_and_its_companions_copy_and_delete_it() {
    let mount = Mount::start(MountOptions::default());
    let conn = open_db(&mount.db_path("app.db"));
    set_journal_mode(&conn, "WAL");
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
        .unwrap();
    assert!(fs::read_to_string(mount.db_path("app.db-pos")).is_ok());
    let saved = mount.root().join("saved");
    fs::create_dir(&saved).unwrap();
    let shell = |script: &str| {
        let output = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(mount.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // As SQLite's own tests save and restore a database (tester.tcl's
    // db_save and db_restore), with the connection still open.
    shell(&format!("cp app.db* {}/", saved.display()));
    drop(conn);
    shell("rm -f app.db*");
    assert_eq!(list_dir(mount.path()), vec![".lag"]);
    shell(&format!("cp {}/app.db* .", saved.display()));
    let conn = open_db(&mount.db_path("app.db"));
    assert_eq!(query_i64(&conn, "SELECT count(*) FROM t"), 2);
    assert_eq!(integrity_check(&conn), "ok");
}
