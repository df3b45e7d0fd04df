//! Shared harness of the tests that mount ltxfs.
//!
//! # Mounts
//!
//! [`Mount::start`] creates a private temporary directory under
//! `std::env::temp_dir()`, writes `ltxfs.yml` there (with `data.dir` = `<tmp>/data`),
//! spawns `ltxfs mount <tmp>/mnt --config <tmp>/ltxfs.yml` with stdout and stderr
//! captured to files, and waits (polling every 10 ms, at most 20 s) until the mount
//! point is an ltxfs mount that answers. It panics with the child's stderr when the
//! child exits first or the wait times out. Dropping a [`Mount`] sends SIGTERM, waits
//! at most 10 s, then SIGKILLs and lazily unmounts (`umount -l`), so no test leaves a
//! mount behind, whatever happened.
//!
//! Every mount also has a watchdog: if the test is still running after
//! [`MountOptions::deadline`], the watchdog SIGKILLs the ltxfs process. That aborts
//! the FUSE connection, so any system call stuck in the mount (in the test process or
//! in a worker) returns `ENOTCONN` and the test fails instead of hanging.
//!
//! A machine where mounting is impossible (no `/dev/fuse`, no right to mount) makes
//! the tests fail with a clear message — with or without the `CI` variable; they never
//! pass silently.
//!
//! # Worker processes (re-exec pattern)
//!
//! SQLite must never be used across `fork` with an open connection, so concurrent
//! clients are fresh processes: the test binary runs *itself* (`/proc/self/exe`, the
//! running file even if a concurrent build replaced it) with `--exact <worker> --nocapture --test-threads=1`
//! and the job in the environment variable [`WORKER_ENV`] (`LTXFS_WORKER_JOB`).
//! `<worker>` is the test's full name in its binary, which [`worker!`] gives.
//!
//! A worker is an ordinary `#[test]` function whose name starts with `worker_` and
//! whose first line is
//!
//! ```ignore
//! let Some(job) = common::worker_job() else { return };
//! ```
//!
//! so that in a normal test run (variable absent) it returns at once and shows up as a
//! trivially passing test. In a worker process the variable is present and the
//! function does the job. A worker reports through stdout lines (libtest's own lines
//! are mixed in, so look for a marker with [`find_marker`]) and fails by panicking,
//! which makes the process exit non-zero.
//!
//! Every wait in this module is bounded in time.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use test_support::{NotMounted, force_unmount, write_config};

/// How long a mount may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long ltxfs may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling interval for the mount table and child state.
pub const POLL: Duration = Duration::from_millis(10);
/// Environment variable carrying a worker's job.
pub const WORKER_ENV: &str = "LTXFS_WORKER_JOB";
/// The busy timeout every SQLite connection of the tests uses.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------

/// Panics with a clear message when this machine cannot mount FUSE at all.
pub fn require_fuse() {
    let problem = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => return,
        Err(err) if err.kind() == io::ErrorKind::NotFound => "/dev/fuse does not exist".to_string(),
        Err(err) => format!("/dev/fuse cannot be opened: {err}"),
    };
    let ci = std::env::var_os("CI").is_some();
    panic!(
        "cannot mount ltxfs on this machine: {problem}. The mount tests need /dev/fuse and \
         the right to mount (root, or fusermount3). {}",
        if ci {
            "CI is set: the CI runner must provide FUSE (e.g. docker --device /dev/fuse --cap-add SYS_ADMIN)."
        } else {
            "Refusing to pass silently; run them where FUSE is available."
        }
    );
}

/// A command running the ltxfs binary under test.
pub fn ltxfs_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ltxfs"))
}

/// A fresh temporary directory under `std::env::temp_dir()`, canonicalised path.
pub fn temp_root(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::temp_dir())
        .expect("create temp dir");
    let path = fs::canonicalize(dir.path()).expect("canonicalize temp dir");
    (dir, path)
}

/// True when `path` is currently an ltxfs mount point (panics if the mount table
/// cannot be read).
pub fn is_mounted(path: &Path) -> bool {
    ltxfs::mountinfo::is_ltxfs_mount(path).expect("read /proc/self/mountinfo")
}

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_address() -> SocketAddr {
    let [address] = test_support::free_loopback_addresses().expect("find a free loopback port");
    address
}

/// True when anything at all is mounted on `path`.
pub fn anything_mounted(path: &Path) -> bool {
    ltxfs::mountinfo::find(path)
        .expect("read /proc/self/mountinfo")
        .is_some()
}

/// Mounts a tmpfs of `bytes` on `path`.
fn mount_tmpfs(path: &Path, bytes: u64) {
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path),
    );
}

/// Runs `command`, panicking with its output unless it succeeds.
fn run_ok(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The folder under a mount's root that holds a [`DataDir::FailingDisk`]'s image.
const DISK_BACKING: &str = "disk-backing";

/// The image file of a [`DataDir::Ext4`] data dir, under a mount's root.
const EXT4_IMAGE: &str = "ext4.img";

/// Mounts the ext4 `image` on `path` through a loop device, read-only on error.
fn mount_ext4_image(image: &Path, path: &Path) {
    run_ok(
        Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image)
            .arg(path),
    );
}

/// Sends `signal` to the process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            panic!("kill({pid}, {signal}): {err}");
        }
    }
}

/// Waits for `child` at most `timeout`; on timeout SIGKILLs and reaps it and returns
/// `None`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let status = test_support::wait_timeout(child, timeout).expect("try_wait");
    if status.is_none() {
        let _ = child.kill();
        let _ = reap_after_kill(child);
    }
    status
}

/// After SIGKILL, waits at most 10 s for `child` to go. A process stuck in an
/// uninterruptible wait (e.g. a FUSE request the server never answers) does not die
/// on SIGKILL; it is then left behind (`None`) instead of hanging the test.
pub fn reap_after_kill(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "process {} did not die within 10 s of SIGKILL (state: {})",
                child.id(),
                process_state(child.id())
            );
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Config for a mount whose locks the kernel serves (`fuse.locks: kernel`,
/// the default, written out where a test depends on it).
pub const KERNEL_LOCKS: &str = "fuse:\n  locks: kernel\n";
/// Config for a mount whose locks ltxfs serves from its lock table.
pub const LTXFS_LOCKS: &str = "fuse:\n  locks: ltxfs\n";

/// The FUSE connection of the filesystem mounted at `mount_point`, in the
/// kernel's control directory (`/sys/fs/fuse/connections/<minor device>`).
pub fn fuse_connection(mount_point: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let device = fs::metadata(mount_point)
        .expect("stat the mount point")
        .dev();
    let connection = Path::new("/sys/fs/fuse/connections").join(libc::minor(device).to_string());
    if !connection.exists() {
        // The control filesystem is not mounted everywhere by default.
        let mounted = Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
        assert!(
            connection.exists(),
            "no {} (mounting fusectl: {mounted:?})",
            connection.display()
        );
    }
    connection
}

/// The state of every thread of `pid` from `/proc/<pid>/task/*/status` (e.g.
/// `1234: D (disk sleep)`), plus its kernel wait channel.
pub fn process_state(pid: u32) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut states = Vec::new();
    for task in tasks.flatten() {
        let state = fs::read_to_string(task.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("State:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_default();
        let wchan = fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
        states.push(format!(
            "{}: {state} wchan={wchan}",
            task.file_name().to_string_lossy()
        ));
    }
    states.join(", ")
}

/// Polls `cond` every 10 ms until it is true; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || {
        if cond() { Ok(()) } else { Err(String::new()) }
    });
}

/// Polls `check` every 10 ms until it is `Ok`; panics after `timeout` with
/// `what` and the last reason `check` gave.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    while let Err(reason) = check() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {reason}");
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------------

#[derive(Default)]
struct WatchState {
    pid: u32,
    cancelled: bool,
}

struct Watchdog {
    state: Arc<(Mutex<WatchState>, Condvar)>,
}

impl Watchdog {
    fn new(deadline: Duration, label: String) -> Self {
        let state = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let shared = Arc::clone(&state);
        thread::spawn(move || {
            let (lock, cvar) = &*shared;
            let end = Instant::now() + deadline;
            let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if guard.cancelled {
                    return;
                }
                let now = Instant::now();
                if now >= end {
                    break;
                }
                guard = cvar
                    .wait_timeout(guard, end - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if guard.pid != 0 {
                eprintln!(
                    "ltxfs test watchdog: {label} still running after {deadline:?}; \
                     SIGKILLing ltxfs (pid {}) so that nothing hangs",
                    guard.pid
                );
                // SAFETY: kill(2) has no memory-safety preconditions; the pid is not
                // reaped while it is registered here (see Mount::reap).
                unsafe { libc::kill(guard.pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        Watchdog { state }
    }

    fn set_pid(&self, pid: u32) {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).pid = pid;
    }

    fn cancel(&self) {
        let (lock, cvar) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).cancelled = true;
        cvar.notify_all();
    }
}

// ---------------------------------------------------------------------------------
// Mount
// ---------------------------------------------------------------------------------

/// Options for [`Mount::start`].
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Raw top-level YAML appended to the generated `ltxfs.yml`.
    pub extra_yaml: String,
    /// After this long the watchdog SIGKILLs ltxfs (see module docs).
    pub deadline: Duration,
    /// Where the data dir lives.
    pub data_dir: DataDir,
}

/// Where a test mount's data dir lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// In the test's temporary directory.
    Plain,
    /// On a tmpfs of this many bytes, to fill it.
    Tmpfs(u64),
    /// On an ext4 filesystem (no journal) in a loop device whose sparse
    /// image lives on a tmpfs of this many bytes ([`Mount::disk_backing`]).
    /// Filling that tmpfs makes the disk fail writes: the kernel reports the
    /// error at writeback, so `fsync` fails while the filesystem still shows
    /// free space, as on a failing disk.
    FailingDisk(u64),
    /// On a journalled ext4 filesystem of this many bytes in a loop device
    /// (`errors=remount-ro`), for [`Mount::fail_data_disk`].
    Ext4(u64),
}

/// A fault of the filesystem under a [`DataDir::Ext4`] data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// An ext4 error: the filesystem turns read-only, reads still work.
    ReadOnly,
    /// A forced shutdown (`EXT4_IOC_SHUTDOWN`): every read and write fails
    /// with EIO, as when the device under it is gone.
    Shutdown,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            extra_yaml: String::new(),
            deadline: Duration::from_secs(150),
            data_dir: DataDir::Plain,
        }
    }
}

/// A running ltxfs mount in a private temporary directory.
pub struct Mount {
    // Dropped last (fields drop in order): the directory outlives the unmount.
    child: Option<Child>,
    watchdog: Watchdog,
    root: PathBuf,
    mnt: PathBuf,
    data: PathBuf,
    config: PathBuf,
    starts: usize,
    _dir: tempfile::TempDir,
}

impl Mount {
    /// Creates the directories and config, starts ltxfs and waits until it is ready.
    pub fn start(options: MountOptions) -> Mount {
        require_fuse();
        let (dir, root) = temp_root("ltxfs-test-");
        let mnt = root.join("mnt");
        let data = root.join("data");
        let config = root.join("ltxfs.yml");
        fs::create_dir(&mnt).expect("create mount point");
        match options.data_dir {
            DataDir::Plain => {}
            DataDir::Tmpfs(bytes) => {
                fs::create_dir(&data).expect("create the data dir");
                mount_tmpfs(&data, bytes);
            }
            DataDir::FailingDisk(backing_bytes) => {
                let backing = root.join(DISK_BACKING);
                fs::create_dir(&backing).expect("create the disk's backing dir");
                mount_tmpfs(&backing, backing_bytes);
                let image = backing.join("disk.img");
                File::create(&image)
                    .and_then(|file| file.set_len(4 * backing_bytes))
                    .expect("create the disk image");
                run_ok(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-O", "^has_journal"])
                        .arg(&image),
                );
                fs::create_dir(&data).expect("create the data dir");
                run_ok(
                    Command::new("mount")
                        .args(["-o", "loop,errors=continue"])
                        .arg(&image)
                        .arg(&data),
                );
            }
            DataDir::Ext4(bytes) => {
                let image = root.join(EXT4_IMAGE);
                File::create(&image)
                    .and_then(|file| file.set_len(bytes))
                    .expect("create the disk image");
                run_ok(Command::new("mkfs.ext4").arg("-q").arg(&image));
                fs::create_dir(&data).expect("create the data dir");
                mount_ext4_image(&image, &data);
            }
        }
        write_config(&config, &data, None, &options.extra_yaml).expect("write ltxfs.yml");
        let label = format!(
            "test {:?}",
            thread::current().name().unwrap_or("<unnamed>").to_string()
        );
        let mut mount = Mount {
            child: None,
            watchdog: Watchdog::new(options.deadline, label),
            root,
            mnt,
            data,
            config,
            starts: 0,
            _dir: dir,
        };
        mount.spawn_and_wait();
        mount
    }

    /// The mount point (absolute, canonical).
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `<mount>/<name>`.
    pub fn db_path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// The private temporary directory (outside the mount) holding mnt, data, config
    /// and logs. Tests may put their own scratch files here.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a [`DataDir::FailingDisk`]'s image lives: fill it to make the
    /// disk fail writes.
    pub fn disk_backing(&self) -> PathBuf {
        self.root.join(DISK_BACKING)
    }

    /// Makes the [`DataDir::Ext4`] filesystem under the data dir fail as
    /// `fault` says, until [`Mount::repair_data_disk`].
    pub fn fail_data_disk(&self, fault: DiskFault) {
        match fault {
            DiskFault::ReadOnly => {
                let source = ltxfs::mountinfo::find(&self.data)
                    .expect("read /proc/self/mountinfo")
                    .expect("the data dir is a mount")
                    .source;
                let device = Path::new(&source)
                    .file_name()
                    .expect("a loop device")
                    .to_owned();
                let trigger = Path::new("/sys/fs/ext4")
                    .join(device)
                    .join("trigger_fs_error");
                fs::write(&trigger, "ltxfs test: a disk error\n")
                    .unwrap_or_else(|e| panic!("write {}: {e}", trigger.display()));
            }
            DiskFault::Shutdown => {
                /// `EXT4_IOC_SHUTDOWN`, `_IOR('X', 125, __u32)`.
                const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
                /// Flush the journal first, as a device failing after a commit would.
                const EXT4_GOING_FLAGS_LOGFLUSH: u32 = 1;
                let dir = File::open(&self.data).expect("open the data dir");
                let flags = EXT4_GOING_FLAGS_LOGFLUSH;
                // SAFETY: the ioctl reads one u32 through a pointer to a live local.
                let rc = unsafe {
                    libc::ioctl(
                        std::os::fd::AsRawFd::as_raw_fd(&dir),
                        EXT4_IOC_SHUTDOWN,
                        &flags as *const u32,
                    )
                };
                assert_eq!(rc, 0, "EXT4_IOC_SHUTDOWN: {}", io::Error::last_os_error());
            }
        }
    }

    /// Ends a [`Mount::fail_data_disk`] fault as an operator would, with ltxfs
    /// stopped: unmounts the filesystem, checks and repairs it, and mounts it
    /// again.
    pub fn repair_data_disk(&self) {
        assert!(self.child.is_none(), "stop ltxfs before repairing its disk");
        run_ok(Command::new("umount").arg(&self.data));
        let image = self.root.join(EXT4_IMAGE);
        let status = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run e2fsck");
        // 0: nothing to fix; 1: errors fixed.
        assert!(
            matches!(status.code(), Some(0 | 1)),
            "e2fsck could not repair the disk: {status}"
        );
        mount_ext4_image(&image, &self.data);
    }

    /// The data directory of ltxfs.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The pid of the running ltxfs process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the ltxfs process has not exited.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        if child.try_wait().expect("try_wait").is_none() {
            return true;
        }
        // Reaped: its pid may be reused, so the watchdog must forget it.
        self.watchdog.set_pid(0);
        false
    }

    /// Everything ltxfs wrote to stderr, over all starts.
    pub fn stderr_text(&self) -> String {
        let mut text = String::new();
        for n in 1..=self.starts {
            let path = self.root.join(format!("ltxfs-{n}.stderr"));
            if let Ok(part) = fs::read_to_string(&path) {
                text.push_str(&format!("--- ltxfs start #{n} stderr ---\n{part}"));
            }
        }
        text
    }

    /// The address this node's replication server listens on (of its latest
    /// start), from its log.
    pub fn listen_addr(&self) -> String {
        let mut found = None;
        wait_until(
            "the node's listen address in its log",
            READY_TIMEOUT,
            || {
                found = self
                    .stderr_text()
                    .rsplit("--- ltxfs start #")
                    .next()
                    .into_iter()
                    .flat_map(str::lines)
                    .filter(|line| line.contains("serving replication"))
                    .filter_map(|line| line.split("address=").nth(1))
                    .filter_map(|rest| rest.split_whitespace().next())
                    .next_back()
                    .map(str::to_string);
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// SIGKILLs ltxfs and reaps it, leaving the (now stale) mount in place.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_ref() {
            send_signal(child.id(), libc::SIGKILL);
        }
        self.reap(STOP_TIMEOUT);
    }

    /// Waits at most 10 s for ltxfs to exit by itself; returns its status.
    /// Panics (with stderr) if it does not exit in time.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        match self.reap(STOP_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "ltxfs did not exit within {STOP_TIMEOUT:?}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Sends SIGTERM and waits at most 10 s for ltxfs to exit; returns its status.
    /// Panics (with stderr) if it does not exit in time.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// Sends `signal` and waits at most 10 s for ltxfs to exit; returns its status.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        let pid = self.child.as_ref().expect("ltxfs is not running").id();
        send_signal(pid, signal);
        match self.reap(STOP_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "ltxfs did not exit within {STOP_TIMEOUT:?} after signal {signal}; stderr:\n{}",
                self.stderr_text()
            ),
        }
    }

    /// Starts ltxfs again on the same mount point and data dir. A running ltxfs is
    /// first stopped cleanly (SIGTERM, must exit 0). After [`Mount::kill9`] the stale
    /// mount is left for ltxfs to clean.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.stop();
            assert!(
                status.success(),
                "ltxfs exited with {status} on SIGTERM; stderr:\n{}",
                self.stderr_text()
            );
            assert!(
                !is_mounted(&self.mnt),
                "still mounted after ltxfs exited on SIGTERM"
            );
        }
        self.spawn_and_wait();
    }

    /// Waits (bounded) for the running child to exit, unregistering it from the
    /// watchdog first so that its pid is never signalled after being reaped.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.watchdog.set_pid(0);
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            eprintln!("ltxfs (pid {}) had to be SIGKILLed", child.id());
        }
        status
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "ltxfs is already running");
        self.starts += 1;
        let n = self.starts;
        let stderr = File::create(self.root.join(format!("ltxfs-{n}.stderr"))).expect("log");
        let stdout = File::create(self.root.join(format!("ltxfs-{n}.stdout"))).expect("log");
        let child = ltxfs_command()
            .arg("mount")
            .arg(&self.mnt)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ltxfs");
        self.watchdog.set_pid(child.id());
        self.child = Some(child);
        self.wait_ready();
    }

    /// Ready: the mount serves (see [`test_support::wait_until_mounted`]).
    fn wait_ready(&mut self) {
        let child = self.child.as_mut().expect("child");
        let problem = match test_support::wait_until_mounted(child, &self.mnt, READY_TIMEOUT) {
            Ok(()) => return,
            Err(NotMounted::Exited(status)) => {
                self.child = None;
                self.watchdog.set_pid(0);
                format!("ltxfs exited ({status}) before it served")
            }
            Err(NotMounted::TimedOut) => format!("it did not serve within {READY_TIMEOUT:?}"),
            Err(NotMounted::Io(error)) => format!("checking on it failed: {error}"),
        };
        panic!(
            "mounting {}: {problem}; stderr:\n{}",
            self.mnt.display(),
            self.stderr_text()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            send_signal(child.id(), libc::SIGTERM);
            if self.reap(STOP_TIMEOUT).is_none() {
                eprintln!(
                    "ltxfs did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr_text()
                );
            }
        }
        self.watchdog.cancel();
        // What `MountOptions::data_dir` mounted too, the data dir first.
        for path in [&self.mnt, &self.data, &self.root.join(DISK_BACKING)] {
            if let Err(problem) = force_unmount(path) {
                eprintln!("{problem}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------

/// A worker's job: string keys and values (newline-separated `key=value` in the
/// environment, so values must not contain newlines).
#[derive(Debug, Clone, Default)]
pub struct Job {
    fields: BTreeMap<String, String>,
}

impl Job {
    pub fn new() -> Job {
        Job::default()
    }

    /// Adds `key=value` (builder style).
    pub fn with(mut self, key: &str, value: impl Display) -> Job {
        let value = value.to_string();
        assert!(!key.contains(['=', '\n']) && !value.contains('\n'));
        self.fields.insert(key.to_string(), value);
        self
    }

    /// The value of `key`; panics when it is missing.
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("job has no {key:?}: {self:?}"))
    }

    /// The value of `key`, if present.
    pub fn opt(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The value of `key` parsed as `T`.
    pub fn parse<T: FromStr>(&self, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.get(key)
            .parse()
            .unwrap_or_else(|e| panic!("job field {key:?}: {e:?}"))
    }

    pub fn encode(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn decode(text: &str) -> Job {
        let mut job = Job::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once('=').expect("job line without '='");
            job.fields.insert(k.to_string(), v.to_string());
        }
        job
    }
}

/// The job of this process when it runs as a worker; `None` in a normal test run.
/// Every `worker_*` test starts with `let Some(job) = worker_job() else { return };`.
pub fn worker_job() -> Option<Job> {
    std::env::var(WORKER_ENV).ok().map(|s| Job::decode(&s))
}

/// The name libtest knows the worker test `$worker` (a `worker_*` function in
/// scope) by: its module path without the crate's name, as [`spawn_worker`]
/// needs it. Naming the function makes a renamed worker a compile error.
macro_rules! worker {
    ($worker:ident) => {{
        let _: fn() = $worker;
        $crate::common::test_name(module_path!(), stringify!($worker))
    }};
}
pub(crate) use worker;

/// `function`'s test name in a binary, given its `module_path!()`.
pub fn test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, module)) => format!("{module}::{function}"),
        None => function.to_string(),
    }
}

/// Spawns one worker: this test binary running only the test `worker` (a name
/// from [`worker!`]) with `job`. stdin, stdout and stderr are pipes.
pub fn spawn_worker(worker: &str, job: &Job) -> Child {
    assert!(
        worker.rsplit("::").next().unwrap().starts_with("worker_"),
        "worker tests are named worker_*"
    );
    // /proc/self/exe, not current_exe(): another cargo building in the same target
    // dir may replace the test binary's file while this test runs.
    Command::new("/proc/self/exe")
        .args(["--exact", worker, "--nocapture", "--test-threads=1"])
        .env(WORKER_ENV, job.encode())
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

/// Spawns one worker per job.
pub fn spawn_workers(worker: &str, jobs: &[Job]) -> Vec<Child> {
    jobs.iter().map(|job| spawn_worker(worker, job)).collect()
}

/// What a finished worker printed.
#[derive(Debug)]
pub struct WorkerOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl WorkerOutput {
    /// The text after the first occurrence of `marker` on a stdout line.
    pub fn marker(&self, marker: &str) -> Option<String> {
        find_marker(&self.stdout, marker)
    }
}

/// Finds `marker` in `text` and returns the rest of that line, trimmed. libtest may
/// print `test worker_x ... ` on the same line before a worker's first output.
pub fn find_marker(text: &str, marker: &str) -> Option<String> {
    text.lines().find_map(|line| {
        line.find(marker)
            .map(|i| line[i + marker.len()..].trim().to_string())
    })
}

fn read_all_in_thread(pipe: Option<impl Read + Send + 'static>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut text);
        }
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    rx
}

/// Waits for all `children` (at most `timeout` in total). Fails with every worker's
/// output if one exits non-zero or the time runs out (the rest are then killed).
pub fn wait_all(children: Vec<Child>, timeout: Duration) -> Vec<WorkerOutput> {
    let outputs = wait_all_unchecked(children, timeout);
    let failed: Vec<_> = outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.status.success())
        .collect();
    if !failed.is_empty() {
        let mut report = String::new();
        for (i, o) in &failed {
            report.push_str(&format!(
                "\n=== worker #{i}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                o.status, o.stdout, o.stderr
            ));
        }
        panic!("{} worker(s) failed:{report}", failed.len());
    }
    outputs
}

/// Like [`wait_all`] but returns failing outputs instead of panicking on them (a
/// timeout still panics).
pub fn wait_all_unchecked(mut children: Vec<Child>, timeout: Duration) -> Vec<WorkerOutput> {
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            drop(c.stdin.take());
            (
                read_all_in_thread(c.stdout.take()),
                read_all_in_thread(c.stderr.take()),
            )
        })
        .collect();
    let deadline = Instant::now() + timeout;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut timed_out = false;
    while statuses.iter().any(Option::is_none) {
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().expect("try_wait");
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
                if status.is_none() {
                    let _ = child.kill();
                    *status = reap_after_kill(child);
                }
            }
            break;
        }
        thread::sleep(POLL);
    }
    let collected: Vec<(Option<ExitStatus>, String, String)> = readers
        .into_iter()
        .zip(statuses)
        .map(|((out, err), status)| {
            let wait = Duration::from_secs(if status.is_some() { 10 } else { 1 });
            (
                status,
                out.recv_timeout(wait).unwrap_or_default(),
                err.recv_timeout(wait).unwrap_or_default(),
            )
        })
        .collect();
    if timed_out {
        let mut report = String::new();
        for (i, (status, stdout, stderr)) in collected.iter().enumerate() {
            let status = status.map_or("unkillable".to_string(), |s| s.to_string());
            report.push_str(&format!(
                "\n=== worker #{i}: {status}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ));
        }
        panic!("workers did not finish within {timeout:?}:{report}");
    }
    collected
        .into_iter()
        .map(|(status, stdout, stderr)| WorkerOutput {
            status: status.expect("exited"),
            stdout,
            stderr,
        })
        .collect()
}

/// A worker whose stdout is read line by line while it runs.
pub struct StreamingWorker {
    pub child: Child,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl StreamingWorker {
    pub fn spawn(worker: &str, job: &Job) -> StreamingWorker {
        let mut child = spawn_worker(worker, job);
        let lines = line_channel(child.stdout.take().expect("stdout"));
        let stderr = read_all_in_thread(child.stderr.take());
        StreamingWorker {
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes a line to the worker's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to worker stdin");
        stdin.flush().expect("flush worker stdin");
    }

    /// Closes the worker's stdin.
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits (bounded) for the next stdout line containing `marker`; returns the rest
    /// of that line after the marker. Panics with the output so far on timeout or
    /// when the worker's stdout ends first.
    pub fn expect_marker(&mut self, marker: &str, timeout: Duration) -> String {
        self.expect_marker_ctx(marker, timeout, String::new)
    }

    /// [`StreamingWorker::expect_marker`], adding `context()` (e.g. ltxfs's stderr)
    /// to the failure message.
    pub fn expect_marker_ctx(
        &mut self,
        marker: &str,
        timeout: Duration,
        context: impl Fn() -> String,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = find_marker(&line, marker);
                    self.seen.push(line);
                    if let Some(rest) = found {
                        return rest;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {marker:?} from worker within {timeout:?}; stdout so far:\n{}\n{}",
                        self.seen.join("\n"),
                        context()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = wait_timeout(&mut self.child, Duration::from_secs(10));
                    let stderr = self
                        .stderr
                        .recv_timeout(Duration::from_secs(5))
                        .unwrap_or_default();
                    panic!(
                        "worker ended ({status:?}) before printing {marker:?}; stdout:\n{}\nstderr:\n{stderr}\n{}",
                        self.seen.join("\n"),
                        context()
                    )
                }
            }
        }
    }

    /// Returns the next stdout line if one arrives within `timeout`; `None` on timeout
    /// or end of output.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// SIGKILLs the worker, reaps it and returns all stdout lines it printed,
    /// including those not consumed yet (bounded wait).
    pub fn kill_and_collect(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        self.drain()
    }

    /// Waits at most `timeout` for the worker to exit (killing it on timeout); returns
    /// status (None on timeout), all stdout lines and stderr.
    pub fn finish(mut self, timeout: Duration) -> (Option<ExitStatus>, Vec<String>, String) {
        self.close_stdin();
        let status = wait_timeout(&mut self.child, timeout);
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default();
        (status, self.drain(), stderr)
    }

    fn drain(mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return std::mem::take(&mut self.seen),
            }
        }
    }
}

impl Drop for StreamingWorker {
    /// A worker abandoned by a failing test is killed, not left running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        }
    }
}

/// Sends each line of `stdout` over a channel (reader thread ends at EOF).
pub fn line_channel(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Prints a worker report line and flushes stdout at once.
pub fn report(line: impl Display) {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("flush stdout");
}

// ---------------------------------------------------------------------------------
// SQLite helpers
// ---------------------------------------------------------------------------------

/// Opens `path` with a 10 s busy timeout.
pub fn open_db(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(BUSY_TIMEOUT).expect("busy_timeout");
    conn
}

/// Sets the journal mode and checks SQLite accepted it.
pub fn set_journal_mode(conn: &Connection, mode: &str) {
    let got: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("PRAGMA journal_mode={mode}: {e}"));
    assert_eq!(got.to_lowercase(), mode.to_lowercase(), "journal_mode");
}

/// `PRAGMA integrity_check` rows joined by newlines ("ok" when healthy).
pub fn integrity_check(conn: &Connection) -> String {
    let mut stmt = conn.prepare("PRAGMA integrity_check").expect("prepare");
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .expect("integrity_check")
        .collect::<Result<Vec<_>, _>>()
        .expect("integrity_check rows");
    rows.join("\n")
}

/// Asserts `PRAGMA integrity_check` is ok on a fresh connection to `path`.
pub fn assert_integrity(path: &Path) {
    let conn = open_db(path);
    let result = integrity_check(&conn);
    assert_eq!(result, "ok", "integrity_check of {}", path.display());
}

/// One integer from a query.
pub fn query_i64(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One text value from a query.
pub fn query_string(conn: &Connection, sql: &str) -> String {
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Formats one SQLite value as SQL-ish text.
pub fn format_value(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => format!("{f:?}"),
        ValueRef::Text(t) => format!("'{}'", String::from_utf8_lossy(t).replace('\'', "''")),
        ValueRef::Blob(b) => format!("X'{}'", hex(b)),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A `.dump`-like text of a database: every `sqlite_master` row (ordered by type and
/// name), then every table's rows ordered by rowid (WITHOUT ROWID tables by all
/// columns).
pub fn dump(conn: &Connection) -> String {
    let mut out = String::new();
    let mut tables = Vec::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT type, name, tbl_name, sql FROM sqlite_master \
                 ORDER BY type, name",
            )
            .expect("prepare sqlite_master");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .expect("query sqlite_master");
        for row in rows {
            let (kind, name, tbl, sql) = row.expect("sqlite_master row");
            out.push_str(&format!(
                "{kind} {name} ON {tbl}: {}\n",
                sql.clone().unwrap_or_else(|| "NULL".into())
            ));
            if kind == "table" {
                let without_rowid = sql
                    .as_deref()
                    .is_some_and(|s| s.to_uppercase().contains("WITHOUT ROWID"));
                tables.push((name, without_rowid));
            }
        }
    }
    for (name, without_rowid) in tables {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let sql = if without_rowid {
            let ncols = {
                let stmt = conn
                    .prepare(&format!("SELECT * FROM {quoted}"))
                    .expect("prepare");
                stmt.column_count()
            };
            let order: Vec<String> = (1..=ncols).map(|i| i.to_string()).collect();
            format!("SELECT * FROM {quoted} ORDER BY {}", order.join(","))
        } else {
            format!("SELECT rowid, * FROM {quoted} ORDER BY rowid")
        };
        out.push_str(&format!("-- rows of {quoted}\n"));
        let mut stmt = conn.prepare(&sql).expect("prepare table scan");
        let ncols = stmt.column_count();
        let mut rows = stmt.query([]).expect("scan");
        while let Some(row) = rows.next().expect("row") {
            let values: Vec<String> = (0..ncols)
                .map(|i| format_value(row.get_ref(i).expect("value")))
                .collect();
            out.push_str(&values.join("|"));
            out.push('\n');
        }
    }
    out
}

/// Index of the first differing line of two texts, with both lines, for messages.
pub fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            let clip = |s: &str| s.chars().take(300).collect::<String>();
            return format!("line {}: {:?}\n  vs {:?}", i + 1, clip(x), clip(y));
        }
    }
    format!(
        "one is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

/// Names in a directory, sorted.
pub fn list_dir(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------

/// xorshift64* — small, seeded, no dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix the seed so that small seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// FNV-1a 64 of `text` (to compare dumps across processes via one stdout line).
pub fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fills the filesystem of `path` with one file, up to the last block.
pub fn fill(path: &Path) {
    let mut file = File::create(path).expect("create the filler");
    let block = vec![0u8; 1 << 20];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(error) => panic!("fill {}: {error}", path.display()),
        }
    }
    // The last partial block.
    while file.write(&[0u8; 4096]).is_ok_and(|written| written > 0) {}
}
