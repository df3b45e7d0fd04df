//! Reads files of the mount into the kernel's page cache, in the background.
//!
//! The kernel splits a write to the mount wherever it covers a page of its
//! cache only in part and does not hold that page whole; holding the pages
//! whole saves those requests. [`Prefetcher::request`] never blocks (FUSE
//! workers call it): it queues the file's name, or drops the request when
//! [`PREFETCH_QUEUE_CAPACITY`] requests wait already. Its thread reads the
//! file through the mount, which makes requests to the mount, so it must never
//! be a FUSE worker.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use crate::sync::LockUnpoisoned;

/// Prefetches waiting for the thread; more are dropped (the next one asked
/// for the same file does the same work).
pub const PREFETCH_QUEUE_CAPACITY: usize = 16;

/// Bytes read at a time.
const READ_SIZE: usize = 128 << 10;

/// One file to read in: its name in the mount's root and how many bytes.
struct Prefetch {
    name: String,
    len: u64,
}

/// The thread that reads files of one mount into the kernel's cache.
pub struct Prefetcher {
    queue: Mutex<Option<SyncSender<Prefetch>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Prefetcher {
    /// Starts the thread for the mount at `mount_point`.
    pub fn start(mount_point: &Path) -> std::io::Result<Prefetcher> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(PREFETCH_QUEUE_CAPACITY);
        let mount_point = mount_point.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ltxfs-prefetch".to_string())
            .spawn(move || serve(&mount_point, &receiver))?;
        Ok(Prefetcher {
            queue: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for the first `len` bytes of the mount's file `name` to be read
    /// into the kernel's cache. Never waits.
    pub fn request(&self, name: &str, len: u64) {
        let queue = self.queue.lock_unpoisoned();
        let Some(queue) = queue.as_ref() else {
            return;
        };
        let prefetch = Prefetch {
            name: name.to_string(),
            len,
        };
        match queue.try_send(prefetch) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!(file = name, "prefetch queue full; prefetch dropped");
            }
        }
    }

    /// Stops the thread once the prefetch it runs is done, dropping those
    /// that wait; it holds no descriptor of the mount afterwards.
    pub fn stop(&self) {
        self.queue.lock_unpoisoned().take();
        if let Some(thread) = self.thread.lock_unpoisoned().take()
            && thread.join().is_err()
        {
            tracing::error!("the prefetch thread panicked");
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mount_point: &Path, queue: &Receiver<Prefetch>) {
    let mut buffer = vec![0u8; READ_SIZE];
    while let Ok(prefetch) = queue.recv() {
        let path: PathBuf = mount_point.join(&prefetch.name);
        if let Err(error) = read_in(&path, prefetch.len, &mut buffer) {
            // The file may be gone already (SQLite deleted its WAL).
            tracing::debug!(%error, file = %path.display(), "prefetch failed");
        }
    }
}

/// Reads the first `len` bytes of `path` through the mount. Pages the kernel
/// holds whole are copied from its cache; each page it holds in part (written
/// but never read) is read from ltxfs (readahead would skip those).
fn read_in(path: &Path, len: u64, buffer: &mut [u8]) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let mut offset = 0;
    while offset < len {
        let want = buffer
            .len()
            .min(usize::try_from(len - offset).unwrap_or(usize::MAX));
        let read = file.read_at(&mut buffer[..want], offset)?;
        if read == 0 {
            break;
        }
        offset += read as u64;
    }
    Ok(())
}
