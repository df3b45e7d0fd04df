//! SQLite's locks on the mount: what processes hold, from `/proc/locks`, and
//! the locks ltxfs takes for itself, as open file description locks on
//! descriptors of the mount it keeps open. Reading `/proc/locks` makes no
//! request to the mount, so a FUSE worker may ask.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::OwnMount;
use crate::store::locks::ByteRange;
use crate::store::{KernelLock, KernelLocks, NodeId};
use crate::sync::LockUnpoisoned;

/// The locks of one mount.
pub(super) struct MountLocks {
    /// The mount's device, as `/proc/locks` writes it (`major:minor`, hex).
    device: String,
    /// ltxfs's descriptors, by name in the mount root.
    files: Mutex<HashMap<String, Arc<File>>>,
}

impl MountLocks {
    /// The locks of the filesystem mounted at `mount_point`.
    pub(super) fn for_mount(mount_point: &Path) -> std::io::Result<MountLocks> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(mount_point)?.dev();
        Ok(MountLocks {
            device: format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev)),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Closes every descriptor ltxfs holds on the mount.
    pub(super) fn close_all(&self) {
        self.files.lock_unpoisoned().clear();
    }

    /// ltxfs's descriptor of `name`, if it has one open.
    fn open_file(&self, name: &str) -> Option<Arc<File>> {
        self.files.lock_unpoisoned().get(name).cloned()
    }

    /// ltxfs's descriptor of `name`, opened (for writing, which a write lock
    /// needs) when there is none yet.
    fn file(&self, mount_point: &Path, name: &str) -> std::io::Result<Arc<File>> {
        if let Some(file) = self.open_file(name) {
            return Ok(file);
        }
        // Opened without the map's lock: the open is a request to this mount.
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(mount_point.join(name))?,
        );
        Ok(self
            .files
            .lock_unpoisoned()
            .entry(name.to_string())
            .or_insert(file)
            .clone())
    }
}

impl KernelLocks for OwnMount {
    fn is_write_locked(&self, node: NodeId, range: ByteRange) -> bool {
        match std::fs::read_to_string("/proc/locks") {
            Ok(text) => write_locked_in(&text, &self.locks.device, node.0, range),
            // Unknown counts as held: a commit is then shown later, never early.
            Err(error) => {
                tracing::warn!(%error, "could not read /proc/locks");
                true
            }
        }
    }

    fn lock(
        &self,
        name: &str,
        range: ByteRange,
        wait: bool,
    ) -> std::io::Result<Option<KernelLock>> {
        let file = match wait {
            true => self.locks.file(&self.mount_point, name)?,
            false => match self.locks.open_file(name) {
                Some(file) => file,
                None => return Ok(None),
            },
        };
        if !set_ofd_lock(&file, libc::F_WRLCK, range, wait)? {
            return Ok(None);
        }
        Ok(Some(KernelLock(Box::new(OfdLock { file, range }))))
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.locks
            .file(&self.mount_point, name)?
            .write_all_at(data, offset)
    }

    fn forget(&self, name: &str) {
        self.locks.files.lock_unpoisoned().remove(name);
    }
}

/// An open file description lock ltxfs holds until dropped.
struct OfdLock {
    file: Arc<File>,
    range: ByteRange,
}

impl Drop for OfdLock {
    fn drop(&mut self) {
        if let Err(error) = set_ofd_lock(&self.file, libc::F_UNLCK, self.range, false) {
            tracing::error!(%error, "could not release a lock ltxfs held on its mount");
        }
    }
}

/// Sets (`F_WRLCK`, `F_RDLCK`) or releases (`F_UNLCK`) an open file
/// description lock on `range` of `file`; false when it is held elsewhere
/// and `wait` is false.
fn set_ofd_lock(file: &File, kind: i32, range: ByteRange, wait: bool) -> std::io::Result<bool> {
    let len = if range.end >= i64::MAX as u64 {
        0
    } else {
        (range.end - range.start + 1) as i64
    };
    // SAFETY: an all-zero `flock` is valid; the fields that matter are set.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    lock.l_start = range.start as i64;
    lock.l_len = len;
    let command = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: the descriptor is open and `lock` is a valid `flock`.
        if unsafe { libc::fcntl(file.as_raw_fd(), command, &lock) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) if !wait => return Ok(false),
            _ => return Err(error),
        }
    }
}

/// Whether the thread of a FUSE request's `pid` (the kernel passes the
/// caller's thread id) is one of this process's.
pub fn is_own_thread(pid: u32) -> bool {
    Path::new(&format!("/proc/self/task/{pid}")).exists()
}

/// Whether `/proc/locks` text `text` holds a granted write lock on part of
/// `range` of inode `inode` of device `device`. Its lines read
/// `1: POSIX  ADVISORY  WRITE 2277 00:2f:1050 120 120`; those of waiters
/// have `->` after the number and hold nothing.
fn write_locked_in(text: &str, device: &str, inode: u64, range: ByteRange) -> bool {
    let file = format!("{device}:{inode}");
    text.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, kind, _, access, _, id, start, end] = fields[..] else {
            return false;
        };
        if kind == "->" || access != "WRITE" || id != file {
            return false;
        }
        let start: u64 = match start.parse() {
            Ok(start) => start,
            Err(_) => return false,
        };
        let end: u64 = if end == "EOF" {
            u64::MAX
        } else {
            match end.parse() {
                Ok(end) => end,
                Err(_) => return false,
            }
        };
        start <= range.end && range.start <= end
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 2277 00:2f:7 120 120
1: -> POSIX  ADVISORY  WRITE 2290 00:2f:9 120 120
2: OFDLCK ADVISORY  READ  -1 00:2f:9 120 127
3: POSIX  ADVISORY  WRITE 2277 00:30:9 120 120
4: FLOCK  ADVISORY  WRITE 1079 00:2f:11 0 EOF
5: POSIX  ADVISORY  WRITE 2277 00:2f:12 1073741824 1073741824
";

    fn locked(inode: u64, start: u64, end: u64) -> bool {
        write_locked_in(LOCKS, "00:2f", inode, ByteRange { start, end })
    }

    #[test]
    fn finds_granted_write_locks_of_the_mount_only() {
        assert!(locked(7, 120, 120));
        assert!(locked(7, 100, 200));
        assert!(!locked(7, 121, 127));
        // A waiter holds nothing, a read lock is not a write lock, and the same
        // inode number on another device is another file.
        assert!(!locked(9, 120, 127));
        // `EOF` reaches to the end of the file.
        assert!(locked(11, 1 << 40, 1 << 40));
        assert!(locked(12, 1 << 30, 1 << 30));
        assert!(!locked(12, 0, (1 << 30) - 1));
    }
}
