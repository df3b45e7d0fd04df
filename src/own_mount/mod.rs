//! What ltxfs does through its own mount: when the kernel serves SQLite's
//! locks (`fuse.locks: kernel`), the core's [`KernelLocks`], built on
//! descriptors of ltxfs's own on the mount, so the kernel arbitrates ltxfs's
//! locks against the applications' as it does between any two processes;
//! and, whoever serves the locks, the [`Prefetcher`], which reads files into
//! the kernel's cache.
//!
//! Taking a lock here may make requests to the mount, so it runs on the
//! threads that apply change sets, never on a FUSE worker or an async thread;
//! only [`KernelLocks::is_write_locked`] makes none. A FUSE request carries
//! its caller's thread id, which is how the filesystem tells ltxfs's own
//! opens apart ([`is_own_thread`]): a replica lets them open for writing,
//! which a write lock needs.
//!
//! [`KernelLocks`]: crate::store::KernelLocks
//! [`KernelLocks::is_write_locked`]: crate::store::KernelLocks::is_write_locked

mod locks;
mod prefetch;

use std::path::{Path, PathBuf};

pub use locks::is_own_thread;
pub use prefetch::Prefetcher;

/// ltxfs's own descriptors on one mount.
pub struct OwnMount {
    mount_point: PathBuf,
    locks: locks::MountLocks,
}

impl OwnMount {
    /// For the filesystem mounted at `mount_point`.
    pub fn new(mount_point: &Path) -> std::io::Result<OwnMount> {
        Ok(OwnMount {
            mount_point: mount_point.to_path_buf(),
            locks: locks::MountLocks::for_mount(mount_point)?,
        })
    }

    /// Closes every descriptor ltxfs holds on the mount, so it can be
    /// unmounted.
    pub fn close_all(&self) {
        self.locks.close_all();
    }
}
