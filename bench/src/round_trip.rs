//! What one FUSE request costs on this machine, and what that allows at best.
//!
//! SQLite takes and releases POSIX locks around every transaction, and with
//! `FUSE_POSIX_LOCKS` (which ltxfs needs in order to see lock transitions) each of
//! those `fcntl` calls is a request the kernel sends to the filesystem process and
//! waits for. This module times a tight loop of `fcntl(F_SETLK)` lock and unlock
//! calls on three files, taking turns:
//!
//! * one in the plain directory (the kernel answers by itself);
//! * one on the ltxfs mount being measured;
//! * one on a *null* FUSE filesystem served by this process, which answers every
//!   lock request at once without doing anything. It is the cheapest a FUSE
//!   filesystem that serves locks can be here: whatever it costs is the kernel's
//!   hand-off to the filesystem process and back, not ltxfs's work.
//!
//! From the null filesystem's cost, the native rate of each workload and the
//! number of FUSE requests the workload makes on the measured mounts
//! ([`Workload::fuse_requests`]: fewer when the kernel serves the locks), the
//! report derives the best ratio to native any FUSE filesystem making those
//! requests could reach here.
//!
//! The null filesystem is mounted inside the benchmark's working directory and
//! unmounted when [`NullMount`] is dropped, on every return path.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, Request,
};

use super::{BenchError, LockServer, Workload};

/// Lock and unlock calls per timed loop; each loop is one sample.
const CALLS_PER_SAMPLE: u32 = 20_000;
/// Samples per file; the report gives the median.
pub(super) const SAMPLES: usize = 3;
/// The inode of the null filesystem's only file.
const NULL_FILE_INO: u64 = 2;
/// The name of that file.
const NULL_FILE_NAME: &str = "lock";
/// How long the kernel may cache the null filesystem's entries and attributes.
const NULL_TTL: Duration = Duration::from_secs(3600);
/// The byte range the loop locks: one byte, as SQLite's locks are.
const LOCKED_BYTE: i64 = 100;

/// The measured cost of one `fcntl` lock call on each file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTrip {
    /// In the plain directory.
    pub native: Duration,
    /// On the ltxfs mount.
    pub mount: Duration,
    /// On the null FUSE filesystem.
    pub null_fuse: Duration,
    /// Who served the locks on the measured mounts, which sets how many
    /// requests each workload makes.
    pub locks: LockServer,
}

impl RoundTrip {
    /// The highest ratio to native any FUSE filesystem making the requests the
    /// measured mounts make could reach for `workload` here: its native time
    /// per operation plus its FUSE requests at the null filesystem's cost (less
    /// what the same call costs natively).
    pub fn best_possible_ratio(
        &self,
        workload: Workload,
        native_ops_per_second: f64,
    ) -> Option<f64> {
        if native_ops_per_second <= 0.0 {
            return None;
        }
        let native_op = 1.0 / native_ops_per_second;
        let added = workload.fuse_requests(self.locks)
            * self.null_fuse.saturating_sub(self.native).as_secs_f64();
        Some(native_op / (native_op + added))
    }
}

/// Times lock calls on a file in `native_dir`, on `mount_dir` (the ltxfs mount),
/// and on a null FUSE filesystem mounted at `<base>/mnt-null`, taking turns.
pub fn measure(
    base: &Path,
    native_dir: &Path,
    mount_dir: &Path,
    locks: LockServer,
) -> Result<RoundTrip, BenchError> {
    let null = NullMount::start(&base.join("mnt-null"))?;
    let paths = [
        native_dir.join("round-trip"),
        mount_dir.join("round-trip.db"),
        null.mount_point.join(NULL_FILE_NAME),
    ];
    let files = [
        open_lock_file(&paths[0])?,
        open_lock_file(&paths[1])?,
        open_lock_file(&paths[2])?,
    ];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for sample in 0..SAMPLES {
        for index in 0..files.len() {
            // Alternate the order so that no file always runs right after another.
            let index = if sample % 2 == 0 {
                index
            } else {
                files.len() - 1 - index
            };
            samples[index].push(time_lock_calls(&files[index], &paths[index])?);
        }
    }
    let [native, mount, null_fuse] = samples.map(median);
    Ok(RoundTrip {
        native,
        mount,
        null_fuse,
        locks,
    })
}

fn open_lock_file(path: &Path) -> Result<File, BenchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|cause| BenchError::Io {
            action: "open the lock file",
            path: path.to_path_buf(),
            cause,
        })
}

/// Takes and releases a write lock on one byte [`CALLS_PER_SAMPLE`] / 2 times and
/// returns the time per call.
fn time_lock_calls(file: &File, path: &Path) -> Result<Duration, BenchError> {
    let started = Instant::now();
    for _ in 0..CALLS_PER_SAMPLE / 2 {
        set_lock(file, path, libc::F_WRLCK)?;
        set_lock(file, path, libc::F_UNLCK)?;
    }
    Ok(started.elapsed() / CALLS_PER_SAMPLE)
}

fn set_lock(file: &File, path: &Path, kind: libc::c_int) -> Result<(), BenchError> {
    // SAFETY: an all-zero `flock` is a valid value of the plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = LOCKED_BYTE;
    lock.l_len = 1;
    // SAFETY: the descriptor is open for the call and `lock` is a valid `flock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } == -1 {
        return Err(BenchError::Io {
            action: "lock a byte of",
            path: path.to_path_buf(),
            cause: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// The null filesystem, mounted until dropped.
struct NullMount {
    session: Option<fuser::BackgroundSession>,
    mount_point: PathBuf,
}

impl NullMount {
    fn start(mount_point: &Path) -> Result<NullMount, BenchError> {
        super::create_dir(mount_point)?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("ltxfs-bench-null".to_string())];
        // Served like ltxfs's mount: several threads, each with its own descriptor.
        config.n_threads = Some(ltxfs::mount::FUSE_WORKER_THREADS);
        config.clone_fd = true;
        let session = fuser::Session::new(NullFs, mount_point, &config)
            .and_then(fuser::Session::spawn)
            .map_err(|cause| BenchError::Io {
                action: "mount the null FUSE filesystem on",
                path: mount_point.to_path_buf(),
                cause,
            })?;
        Ok(NullMount {
            session: Some(session),
            mount_point: mount_point.to_path_buf(),
        })
    }
}

impl Drop for NullMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && let Err(error) = session.umount_and_join()
        {
            // As ltxfs's own mount does: detach it, so none is left behind.
            tracing::warn!(%error, mount_point = %self.mount_point.display(), "could not unmount the null FUSE filesystem; detaching it");
            if let Err(error) = ltxfs::fuse::detach(&self.mount_point) {
                tracing::error!(%error, mount_point = %self.mount_point.display(), "could not detach the null FUSE filesystem");
            }
        }
    }
}

/// A filesystem of one empty file that grants every lock request at once.
struct NullFs;

impl NullFs {
    fn attr(ino: u64) -> FileAttr {
        let (kind, perm) = if ino == NULL_FILE_INO {
            (FileType::RegularFile, 0o600)
        } else {
            (FileType::Directory, 0o700)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl fuser::Filesystem for NullFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        ltxfs::fuse::request_posix_locks(config)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == NULL_FILE_NAME {
            reply.entry(&NULL_TTL, &NullFs::attr(NULL_FILE_INO), Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&NULL_TTL, &NullFs::attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        start: u64,
        end: u64,
        _typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        reply.locked(start, end, libc::F_UNLCK, 0);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_possible_ratio_adds_the_requests_to_the_native_time() {
        let mut round_trip = RoundTrip {
            native: Duration::from_micros(1),
            mount: Duration::from_micros(20),
            null_fuse: Duration::from_micros(11),
            locks: LockServer::Kernel,
        };
        // 100,000 ops/s natively is 10 µs each; 2 requests add 2 × 10 µs, and
        // the 6 lock calls ltxfs serves 6 × 10 µs more.
        for (locks, added) in [(LockServer::Kernel, 20.0), (LockServer::Ltxfs, 80.0)] {
            round_trip.locks = locks;
            let ratio = round_trip
                .best_possible_ratio(Workload::InsertWalNormal, 100_000.0)
                .unwrap();
            assert!((ratio - 10.0 / (10.0 + added)).abs() < 1e-9, "{ratio}");
        }
        assert_eq!(
            round_trip.best_possible_ratio(Workload::InsertWalNormal, 0.0),
            None
        );
    }

    /// Serves the null filesystem for real; both other "files" are in plain
    /// directories. A FUSE request cannot be cheaper than the kernel answering
    /// by itself, and the null filesystem must be unmounted afterwards.
    #[test]
    fn measures_a_real_null_mount_and_unmounts_it() {
        let base = tempfile::tempdir().unwrap();
        let result = measure(base.path(), base.path(), base.path(), LockServer::Ltxfs).unwrap();
        assert!(
            result.null_fuse > result.native,
            "a FUSE round trip measured cheaper than a native lock call: {result:?}"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let null_mount = base.path().join("mnt-null");
        assert!(
            !mounts.contains(null_mount.to_str().unwrap()),
            "the null filesystem is still mounted:\n{mounts}"
        );
    }

    #[test]
    fn median_of_samples() {
        let micros = |values: &[u64]| values.iter().map(|&v| Duration::from_micros(v)).collect();
        assert_eq!(median(micros(&[5, 1, 3])), Duration::from_micros(3));
        assert_eq!(median(Vec::new()), Duration::ZERO);
    }
}
