//! Filesystem semantics of the mount, independent of FUSE so it can be tested
//! without a mount.
//!
//! The mount is one flat directory (inode [`ROOT_INO`]) whose files are the store's
//! nodes; a node's id is its inode number. Open files are numbered handles. This
//! module decides what each operation means (which names exist, which operations are
//! refused, which locks an owner loses when a file is closed); the FUSE adapter only
//! translates arguments and replies.
//!
//! Invariants:
//! - Every error an operation returns is an [`FsError`], and [`FsError::errno`] is the
//!   only place an errno is chosen.
//! - Closing a descriptor (`flush`) drops all POSIX locks its process holds on that
//!   file; releasing the last reference to an open file description drops the OFD
//!   locks taken through it, and cancels its waiting lock requests.
//! - No operation blocks waiting for another FUSE request: a blocking lock request is
//!   queued and completed by the call that frees the lock.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::store::locks::{
    ByteRange, HeldLock, LockError, LockKind, LockOwner, LockRequest, LockServer,
};
use crate::store::{
    Change, Database, FileKind, LAG_FILE, Node, NodeId, PRIMARY_FILE, Store, StoreError, parse_name,
};
use crate::sync::{LockUnpoisoned, RwLockUnpoisoned};

/// The inode number of the mount root.
pub const ROOT_INO: u64 = 1;
/// The inode of `.primary` (node ids start after the reserved ones).
const PRIMARY_INO: u64 = 2;
/// The inode of `.lag`.
const LAG_INO: u64 = 3;

/// What a `setattr` changes; `None` keeps a field.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrChange {
    /// New length (`truncate`).
    pub size: Option<u64>,
    /// New permission bits (`chmod`).
    pub mode: Option<u32>,
    /// New owner (`chown`).
    pub uid: Option<u32>,
    /// New group (`chown`).
    pub gid: Option<u32>,
}

/// Who creates a file, with the permission bits it asked for (the umask
/// already applied).
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    /// Permission bits.
    pub mode: u32,
    /// The creating process's user.
    pub uid: u32,
    /// The creating process's group.
    pub gid: u32,
}

/// Errors of filesystem operations, each mapped to one errno by [`FsError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The core refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No file with that inode number.
    #[error("no file with inode {0}")]
    NoSuchInode(u64),
    /// The handle is not open.
    #[error("no open file with handle {0}")]
    BadHandle(u64),
    /// The parent of a name is not the mount root.
    #[error("the mount root is the only directory")]
    NotADirectory,
    /// The operation needs a file but got the root directory.
    #[error("the mount root is a directory")]
    IsADirectory,
    /// A name that is not valid UTF-8.
    #[error("file names must be UTF-8: {0:?}")]
    NameNotUtf8(std::ffi::OsString),
    /// An operation the flat SQLite-only layout does not offer.
    #[error(
        "{0} is not supported: the mount holds only SQLite databases and their journals, in one flat directory"
    )]
    Unsupported(&'static str),
    /// Extended attributes are not kept.
    #[error("extended attributes are not supported")]
    NoExtendedAttributes,
    /// The kernel serves the locks, so a close needs no flush: `ENOSYS` tells
    /// the kernel to send none again. ltxfs itself keeps descriptors of its
    /// own mount open; a flush at their close, when ltxfs is killed, would
    /// wait forever for the process that is dying to answer it.
    #[error("flush is not used when the kernel serves the locks")]
    NoFlush,
    /// The lock is held by another owner.
    #[error("byte range is locked")]
    WouldBlock,
    /// A waiting lock request was cancelled because its file was closed.
    #[error("lock wait cancelled because the file was closed")]
    LockCancelled,
    /// The files ltxfs generates (`-pos`, `.primary`, `.lag`) cannot be changed.
    #[error("ltxfs's own files (-pos, .primary, .lag) are read-only")]
    ReadOnlyGenerated,
    /// A lock request with a range whose end lies before its start.
    #[error("lock range ends ({end}) before it starts ({start})")]
    BadLockRange {
        /// The first byte.
        start: u64,
        /// The last byte.
        end: u64,
    },
}

impl FsError {
    /// The errno reported to the application. This is the only place errnos are chosen.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Store(StoreError::NotFound(_)) | FsError::NoSuchInode(_) => libc::ENOENT,
            FsError::Store(StoreError::InvalidName { .. }) => libc::EINVAL,
            FsError::Store(StoreError::NotSqlite { .. }) => libc::EINVAL,
            FsError::Store(StoreError::Capture { .. })
            | FsError::Store(StoreError::ChangeSetRejected { .. })
            | FsError::Store(StoreError::NotReplicated { .. }) => libc::EIO,
            FsError::Store(StoreError::ReadOnlyReplica { .. }) => libc::EROFS,
            FsError::Store(StoreError::Io { source, .. }) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            FsError::BadHandle(_) => libc::EBADF,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::NameNotUtf8(_) => libc::EINVAL,
            FsError::Unsupported(_) => libc::EPERM,
            FsError::NoExtendedAttributes | FsError::NoFlush => libc::ENOSYS,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::LockCancelled => libc::EINTR,
            FsError::BadLockRange { .. } => libc::EINVAL,
            FsError::ReadOnlyGenerated => libc::EACCES,
        }
    }

    /// True for errors an application causes by its own input, which deserve a log
    /// line saying why they were refused.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            FsError::Store(StoreError::InvalidName { .. })
                | FsError::Store(StoreError::NotSqlite { .. })
                | FsError::NameNotUtf8(_)
                | FsError::Unsupported(_)
                | FsError::NotADirectory
                | FsError::ReadOnlyGenerated
        )
    }
}

impl From<LockError> for FsError {
    fn from(error: LockError) -> FsError {
        match error {
            LockError::WouldBlock => FsError::WouldBlock,
            LockError::Cancelled => FsError::LockCancelled,
        }
    }
}

/// Whether an inode is the root directory or a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    /// The mount root.
    Directory,
    /// A database or companion file.
    File,
}

/// The attributes reported by `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub size: u64,
    /// Directory or file.
    pub node_type: NodeType,
    /// Permission bits.
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access.
    pub atime: SystemTime,
    /// Last modification.
    pub mtime: SystemTime,
    /// Last status change.
    pub ctime: SystemTime,
}

/// One entry of the root directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Directory or file.
    pub node_type: NodeType,
    /// The name.
    pub name: String,
}

/// A lock operation as `fcntl` asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockCall {
    /// The kernel's lock owner.
    pub owner: LockOwner,
    /// The calling process.
    pub pid: u32,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// `Some` to lock, `None` to unlock.
    pub kind: Option<LockKind>,
}

/// Completes a lock request, possibly later and from another thread.
pub type LockCompletion = Box<dyn FnOnce(Result<(), FsError>) + Send>;

/// What `statfs` reports: the backing filesystem's numbers.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub blocks_free: u64,
    /// Blocks available to unprivileged users.
    pub blocks_available: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub files_free: u64,
    /// Block size.
    pub block_size: u32,
    /// Longest name.
    pub name_max: u32,
}

/// What an open handle refers to.
enum Opened {
    /// A database or companion file.
    File(Arc<Node>),
    /// A database's read-only `-pos` file.
    Position(Arc<Database>),
    /// `.primary` or `.lag`.
    Status(StatusFile),
}

/// The read-only files in the mount root that tell applications about the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFile {
    /// `.primary`: the primary's hostname and a newline, on a replica connected to
    /// a primary; absent on the primary and on a replica that knows no primary
    /// (LiteFS's convention, which write-redirecting middleware relies on).
    Primary,
    /// `.lag`: milliseconds since the primary's last timestamp, in LiteFS's
    /// fixed 11 bytes (see [`lag_text`]).
    Lag,
}

impl StatusFile {
    const ALL: [StatusFile; 2] = [StatusFile::Primary, StatusFile::Lag];

    fn name(self) -> &'static str {
        match self {
            StatusFile::Primary => PRIMARY_FILE,
            StatusFile::Lag => LAG_FILE,
        }
    }

    fn ino(self) -> u64 {
        match self {
            StatusFile::Primary => PRIMARY_INO,
            StatusFile::Lag => LAG_INO,
        }
    }

    fn from_name(name: &str) -> Option<StatusFile> {
        StatusFile::ALL.into_iter().find(|file| file.name() == name)
    }

    fn from_ino(ino: u64) -> Option<StatusFile> {
        StatusFile::ALL.into_iter().find(|file| file.ino() == ino)
    }

    /// The file's content now, or `None` when it does not exist now.
    fn content(self, store: &Store) -> Option<String> {
        let cluster = store.cluster();
        match self {
            StatusFile::Primary => cluster.primary().map(|hostname| format!("{hostname}\n")),
            StatusFile::Lag => Some(lag_text(cluster.lag())),
        }
    }
}

/// `.lag` as LiteFS writes it: `%+010d\n` of the lag in milliseconds (0 on the
/// primary, `i32::MAX` before a replica has heard from a primary), cut to 11
/// bytes, the size LiteFS gives the file.
fn lag_text(lag: Option<std::time::Duration>) -> String {
    const LAG_BYTES: usize = 11;
    let millis = lag.map_or(i32::MAX as u128, |lag| {
        lag.as_millis().min(i32::MAX as u128)
    });
    let mut text = format!("{millis:+010}\n");
    text.truncate(LAG_BYTES);
    text
}

struct OpenFile {
    opened: Opened,
    /// Lock owners that took locks through this handle.
    lock_owners: Mutex<BTreeSet<LockOwner>>,
}

impl OpenFile {
    fn node(&self) -> Result<&Arc<Node>, FsError> {
        match &self.opened {
            Opened::File(node) => Ok(node),
            Opened::Position(_) | Opened::Status(_) => Err(FsError::ReadOnlyGenerated),
        }
    }
}

/// Whether the kernel may keep a file's pages cached across opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Keep cached pages: every change reaches the kernel through the mount.
    KeepCache,
    /// Never cache: every read and write is a request. For generated content
    /// (`-pos`), and for rollback journals ([`Fs::open`]).
    Direct,
}

/// How the kernel may cache a file of `kind`. SQLite writes a rollback
/// journal's page record as a 4-byte page number, the page, and a 4-byte
/// checksum, so each page straddles two pages of the kernel's cache; a journal
/// is new (or emptied) for each transaction, so the kernel holds neither page
/// whole and splits the page's write in two requests. Uncached, each of
/// SQLite's writes is one request. SQLite reads a journal little: 8 bytes past
/// its end before syncing it (a request either way: uncached a read, cached a
/// `getattr` for the size), and all of it to roll back.
fn file_cache_policy(kind: &FileKind) -> CachePolicy {
    match kind {
        FileKind::Journal => CachePolicy::Direct,
        _ => CachePolicy::KeepCache,
    }
}

/// The filesystem: the store plus open handles.
pub struct Fs {
    store: Arc<Store>,
    handles: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next_handle: AtomicU64,
    root_time: SystemTime,
    uid: u32,
    gid: u32,
}

impl Fs {
    /// A filesystem over `store`; the root directory is owned by `uid`/`gid`.
    pub fn new(store: Arc<Store>, uid: u32, gid: u32) -> Fs {
        Fs {
            store,
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            root_time: SystemTime::now(),
            uid,
            gid,
        }
    }

    /// The store behind this filesystem.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Looks a name up in a directory.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        let name = root_child_name(parent, name)?;
        if let Some(database) = self.store.position_file(name) {
            return Ok(self.position_attr(&database));
        }
        if let Some(file) = StatusFile::from_name(name) {
            return self.status_attr(file);
        }
        let node = self
            .store
            .lookup(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        node_attr(&node)
    }

    /// Whether the kernel may keep file attributes (above all the size) for a
    /// while. On a primary every change reaches the kernel through the mount. On
    /// a replica, change sets are applied behind the kernel's back; invalidating
    /// the attributes then proved not enough: under load a reader now and then
    /// got the file size from before an apply together with page 1 from after it
    /// (SQLite's "database disk image is malformed", `nPage > nPageFile`). So a
    /// replica answers every `fstat` itself: it runs while the reader holds its
    /// SQLite lock, which an apply excludes, so the size always matches page 1.
    pub fn attributes_may_be_cached(&self) -> bool {
        self.store.cluster().role() == crate::store::Role::Primary
    }

    /// The attributes of an inode, through the handle when one is given.
    pub fn getattr(&self, ino: u64, handle: Option<u64>) -> Result<Attr, FsError> {
        if ino == ROOT_INO {
            return Ok(self.root_attr());
        }
        match self.resolve(ino, handle)? {
            Opened::File(node) => node_attr(&node),
            Opened::Position(database) => Ok(self.position_attr(&database)),
            Opened::Status(file) => self.status_attr(file),
        }
    }

    /// Changes the length of a file (the only attribute change that has meaning here;
    /// mode, owner and time changes are accepted and ignored, as SQLite needs).
    pub fn setattr(
        &self,
        ino: u64,
        handle: Option<u64>,
        change: AttrChange,
    ) -> Result<Attr, FsError> {
        if ino == ROOT_INO {
            return Ok(self.root_attr());
        }
        let AttrChange {
            size,
            mode,
            uid,
            gid,
        } = change;
        let changes_metadata = mode.is_some() || uid.is_some() || gid.is_some();
        match (self.resolve(ino, handle)?, size) {
            (Opened::Position(_) | Opened::Status(_), _) if changes_metadata => {
                Err(FsError::ReadOnlyGenerated)
            }
            (Opened::File(node), size) => {
                if let Some(mode) = mode {
                    node.set_mode(mode)?;
                }
                if uid.is_some() || gid.is_some() {
                    node.set_owner(uid, gid)?;
                }
                if let Some(size) = size {
                    self.store
                        .make_change(node.database(), file_change(&node), || node.truncate(size))?;
                }
                node_attr(&node)
            }
            (Opened::Position(_) | Opened::Status(_), Some(_)) => Err(FsError::ReadOnlyGenerated),
            (Opened::Position(database), None) => Ok(self.position_attr(&database)),
            (Opened::Status(file), None) => self.status_attr(file),
        }
    }

    /// Lists the root directory.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        if ino != ROOT_INO {
            return Err(FsError::NotADirectory);
        }
        let mut entries = vec![
            DirEntry {
                ino: ROOT_INO,
                node_type: NodeType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT_INO,
                node_type: NodeType::Directory,
                name: "..".into(),
            },
        ];
        for file in StatusFile::ALL {
            if file.content(&self.store).is_some() {
                entries.push(DirEntry {
                    ino: file.ino(),
                    node_type: NodeType::File,
                    name: file.name().to_string(),
                });
            }
        }
        // `-pos` files open by name but are not listed, so that a glob such
        // as `app.db*` (copying or deleting a database with its companions)
        // matches only SQLite's files.
        for node in self.store.list() {
            entries.push(DirEntry {
                ino: node.id().0,
                node_type: NodeType::File,
                name: node.name().to_string(),
            });
        }
        entries.sort_by(|a, b| {
            (a.node_type != NodeType::Directory, &a.name)
                .cmp(&(b.node_type != NodeType::Directory, &b.name))
        });
        Ok(entries)
    }

    /// Creates (or opens, when it exists) a file and opens it, saying how the
    /// kernel may cache it. A new file gets `creator`'s permission bits and,
    /// when this process may give it away, its owner and group.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        creator: Creator,
    ) -> Result<(Attr, u64, CachePolicy), FsError> {
        let name = root_child_name(parent, name)?;
        if StatusFile::from_name(name).is_some() {
            return Err(FsError::ReadOnlyGenerated);
        }
        let new = self.store.lookup(name).is_none();
        if new {
            self.store.check_openable(name, &parse_name(name)?.kind)?;
        }
        let node = self.store.create(name)?;
        if new {
            node.set_mode(creator.mode)?;
            if (creator.uid, creator.gid) != (self.uid, self.gid) {
                match node.set_owner(Some(creator.uid), Some(creator.gid)) {
                    // Not root: the file stays this process's, as ltxfs's own.
                    Err(StoreError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::EPERM) => {}
                    result => result?,
                }
            }
        }
        let attr = node_attr(&node)?;
        let cache = file_cache_policy(node.kind());
        Ok((attr, self.add_handle(Opened::File(node)), cache))
    }

    /// Opens a file (for writing too when `write` is true), saying how the kernel
    /// may cache it. `by_ltxfs`: ltxfs itself opens it, for the locks it takes
    /// on its own mount, which a replica allows on every file.
    pub fn open(
        &self,
        ino: u64,
        write: bool,
        by_ltxfs: bool,
    ) -> Result<(u64, CachePolicy), FsError> {
        if ino == ROOT_INO {
            return Err(FsError::IsADirectory);
        }
        let opened = self.resolve(ino, None)?;
        let cache = match &opened {
            Opened::File(node) => {
                if write && !by_ltxfs {
                    self.store.check_openable(node.name(), node.kind())?;
                }
                file_cache_policy(node.kind())
            }
            Opened::Position(_) | Opened::Status(_) => CachePolicy::Direct,
        };
        Ok((self.add_handle(opened), cache))
    }

    /// Reads from an open file.
    pub fn read(&self, handle: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match &self.handle(handle)?.opened {
            Opened::File(node) => Ok(node.read_at(offset, size as usize)?),
            Opened::Position(database) => Ok(slice_of(
                self.store.visible_position(database).to_pos_file(),
                offset,
                size,
            )),
            Opened::Status(file) => Ok(slice_of(
                file.content(&self.store).unwrap_or_default(),
                offset,
                size,
            )),
        }
    }

    /// Writes to an open file.
    pub fn write(&self, handle: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let open_file = self.handle(handle)?;
        let node = open_file.node()?;
        self.store
            .make_change(node.database(), file_change(node), || {
                node.write_at(offset, data)
            })?;
        self.store.wrote(node, offset, data.len());
        Ok(data.len() as u32)
    }

    /// A descriptor of an open file was closed by `owner` (a process): drop its
    /// POSIX locks on the file, and forget it as an owner of this handle. Like
    /// an unlock, that may end a journal-less transaction, and the close
    /// returns once it is replicated.
    pub fn flush(&self, handle: u64, owner: LockOwner) -> Result<(), FsError> {
        if self.store.lock_server() == LockServer::Kernel {
            return Err(FsError::NoFlush);
        }
        let open_file = self.handle(handle)?;
        if let Opened::File(node) = &open_file.opened {
            lock_owners(&open_file).remove(&owner);
            self.store
                .make_change(node.database(), Change::Unlock, || {
                    node.unlock_all(owner);
                    Ok::<_, StoreError>(())
                })?;
        }
        Ok(())
    }

    /// The last reference to an open file description went away: drop the
    /// locks of the owners that locked through it and never closed it, which
    /// are its OFD locks (a process's POSIX locks went at its `flush`). The
    /// kernel sends this after the close returned, so the process may hold
    /// new locks through another handle by now; those stay. Nothing waits for
    /// this answer, so a transaction it ends is not held for replicas.
    pub fn release(&self, handle: u64) -> Result<(), FsError> {
        let released = self
            .handles
            .write_unpoisoned()
            .remove(&handle)
            .ok_or(FsError::BadHandle(handle))?;
        if let Opened::File(node) = &released.opened {
            let owners = std::mem::take(&mut *lock_owners(&released));
            for owner in owners {
                node.release_owner(owner);
            }
            if self.store.lock_server() == LockServer::Kernel {
                // No flush comes (`FsError::NoFlush`): the writer's close shows
                // here, and may end a journal-less transaction.
                node.closed();
            }
        }
        Ok(())
    }

    /// Flushes a file to stable storage.
    pub fn fsync(&self, handle: u64, data_only: bool) -> Result<(), FsError> {
        match &self.handle(handle)?.opened {
            Opened::File(node) => {
                Ok(self
                    .store
                    .make_change(node.database(), Change::Sync, || node.sync(data_only))?)
            }
            Opened::Position(_) | Opened::Status(_) => Ok(()),
        }
    }

    /// Makes creates and unlinks durable.
    pub fn fsyncdir(&self) -> Result<(), FsError> {
        Ok(self.store.sync_directories()?)
    }

    /// Removes a file.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<NodeId, FsError> {
        let name = root_child_name(parent, name)?;
        if StatusFile::from_name(name).is_some() {
            return Err(FsError::ReadOnlyGenerated);
        }
        let node = self
            .store
            .lookup(name)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let unlinked = self
            .store
            .make_change(node.database(), file_change(&node), || {
                self.store.unlink(name)
            })?;
        Ok(unlinked.id())
    }

    /// Reports the first lock that conflicts with `call` (`F_GETLK`).
    pub fn getlk(&self, handle: u64, call: LockCall) -> Result<Option<HeldLock>, FsError> {
        let request = lock_request(call, call.kind.unwrap_or(LockKind::Read))?;
        Ok(self.handle(handle)?.node()?.locks().conflicting(&request))
    }

    /// Locks or unlocks a range (`F_SETLK`, or `F_SETLKW` when `wait` is true).
    /// `completion` runs exactly once: at once, or later from the thread that frees
    /// the conflicting lock, so the calling thread never blocks.
    pub fn setlk(&self, handle: u64, call: LockCall, wait: bool, completion: LockCompletion) {
        let open_file = match self.handle(handle) {
            Ok(open_file) => open_file,
            Err(error) => return completion(Err(error)),
        };
        let node = match open_file.node() {
            Ok(node) => node,
            Err(error) => return completion(Err(error)),
        };
        let Some(kind) = call.kind else {
            // An unlock ends a transaction of a journal-less mode (MEMORY, OFF).
            let unlocked = self.store.make_change(node.database(), Change::Unlock, || {
                let range = ByteRange::new(call.start, call.end).ok_or(FsError::BadLockRange {
                    start: call.start,
                    end: call.end,
                })?;
                node.unlock(call.owner, range);
                Ok(())
            });
            return completion(unlocked);
        };
        let locks = node.locks();
        let request = match lock_request(call, kind) {
            Ok(request) => request,
            Err(error) => return completion(Err(error)),
        };
        lock_owners(&open_file).insert(call.owner);
        if wait {
            locks.lock_or_queue(
                request,
                Box::new(move |result| completion(result.map_err(FsError::from))),
            );
        } else {
            completion(locks.try_lock(request).map_err(FsError::from));
        }
    }

    /// The backing filesystem's space figures.
    pub fn statfs(&self) -> Result<FsStats, FsError> {
        let stats = self.store.backing_filesystem_stats()?;
        Ok(FsStats {
            blocks: stats.f_blocks,
            blocks_free: stats.f_bfree,
            blocks_available: stats.f_bavail,
            files: stats.f_files,
            files_free: stats.f_ffree,
            block_size: stats.f_bsize as u32,
            name_max: stats.f_namemax as u32,
        })
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_INO,
            size: 0,
            node_type: NodeType::Directory,
            perm: 0o755,
            uid: self.uid,
            gid: self.gid,
            atime: self.root_time,
            mtime: self.root_time,
            ctime: self.root_time,
        }
    }

    fn position_attr(&self, database: &Database) -> Attr {
        Attr {
            ino: database.position_file_id().0,
            size: self.store.visible_position(database).to_pos_file().len() as u64,
            node_type: NodeType::File,
            perm: 0o444,
            uid: self.uid,
            gid: self.gid,
            atime: self.root_time,
            mtime: self.root_time,
            ctime: self.root_time,
        }
    }

    fn status_attr(&self, file: StatusFile) -> Result<Attr, FsError> {
        let content = file
            .content(&self.store)
            .ok_or_else(|| StoreError::NotFound(file.name().to_string()))?;
        // `.lag`'s time is the primary's last timestamp, as in LiteFS (the
        // epoch on the primary and before a replica heard one).
        let mtime = match file {
            StatusFile::Primary => self.root_time,
            StatusFile::Lag => {
                let millis = self.store.cluster().last_primary_timestamp_ms();
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.unwrap_or(0))
            }
        };
        Ok(Attr {
            ino: file.ino(),
            size: content.len() as u64,
            node_type: NodeType::File,
            perm: 0o444,
            uid: self.uid,
            gid: self.gid,
            atime: mtime,
            mtime,
            ctime: mtime,
        })
    }

    fn add_handle(&self, opened: Opened) -> u64 {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let open_file = Arc::new(OpenFile {
            opened,
            lock_owners: Mutex::new(BTreeSet::new()),
        });
        self.handles.write_unpoisoned().insert(handle, open_file);
        handle
    }

    fn handle(&self, handle: u64) -> Result<Arc<OpenFile>, FsError> {
        self.handles
            .read_unpoisoned()
            .get(&handle)
            .cloned()
            .ok_or(FsError::BadHandle(handle))
    }

    /// What an inode is: a file (see [`Fs::node_for`]) or else a `-pos` file.
    fn resolve(&self, ino: u64, handle: Option<u64>) -> Result<Opened, FsError> {
        if let Some(file) = StatusFile::from_ino(ino) {
            return match file.content(&self.store) {
                Some(_) => Ok(Opened::Status(file)),
                None => Err(FsError::NoSuchInode(ino)),
            };
        }
        match self.node_for(ino, handle) {
            Ok(node) => Ok(Opened::File(node)),
            Err(FsError::NoSuchInode(_)) => self
                .store
                .position_file_by_id(NodeId(ino))
                .map(Opened::Position)
                .ok_or(FsError::NoSuchInode(ino)),
            Err(error) => Err(error),
        }
    }

    /// The node of an inode: through the handle when given (it may be unlinked),
    /// else the live node, else any open handle still holding the unlinked node.
    fn node_for(&self, ino: u64, handle: Option<u64>) -> Result<Arc<Node>, FsError> {
        let open_node = |open_file: &OpenFile| match &open_file.opened {
            Opened::File(node) if node.id().0 == ino => Some(node.clone()),
            _ => None,
        };
        if let Some(node) = handle
            .and_then(|h| self.handle(h).ok())
            .and_then(|open_file| open_node(&open_file))
        {
            return Ok(node);
        }
        if let Some(node) = self.store.node(NodeId(ino)) {
            return Ok(node);
        }
        self.handles
            .read_unpoisoned()
            .values()
            .find_map(|open_file| open_node(open_file))
            .ok_or(FsError::NoSuchInode(ino))
    }
}

/// The part of a generated file's `text` that a read at `offset` of `size` bytes gets.
fn slice_of(text: String, offset: u64, size: u32) -> Vec<u8> {
    let text = text.into_bytes();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(text.len());
    let end = start.saturating_add(size as usize).min(text.len());
    text[start..end].to_vec()
}

fn lock_owners(open_file: &OpenFile) -> std::sync::MutexGuard<'_, BTreeSet<LockOwner>> {
    open_file.lock_owners.lock_unpoisoned()
}

/// The change a write, truncation or unlink of `node` is.
fn file_change(node: &Node) -> Change<'_> {
    Change::File {
        name: node.name(),
        kind: node.kind(),
    }
}

fn lock_request(call: LockCall, kind: LockKind) -> Result<LockRequest, FsError> {
    let range = ByteRange::new(call.start, call.end).ok_or(FsError::BadLockRange {
        start: call.start,
        end: call.end,
    })?;
    Ok(LockRequest {
        owner: call.owner,
        pid: call.pid,
        range,
        kind,
    })
}

fn root_child_name(parent: u64, name: &OsStr) -> Result<&str, FsError> {
    if parent != ROOT_INO {
        return Err(FsError::NotADirectory);
    }
    name.to_str()
        .ok_or_else(|| FsError::NameNotUtf8(name.to_os_string()))
}

fn node_attr(node: &Node) -> Result<Attr, FsError> {
    use std::os::unix::fs::MetadataExt;
    let metadata = node.metadata()?;
    let time = |seconds: i64, nanos: i64| {
        std::time::UNIX_EPOCH
            + std::time::Duration::new(seconds.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
    };
    Ok(Attr {
        ino: node.id().0,
        size: metadata.len(),
        node_type: NodeType::File,
        perm: (metadata.mode() & 0o7777) as u16,
        uid: metadata.uid(),
        gid: metadata.gid(),
        atime: time(metadata.atime(), metadata.atime_nsec()),
        mtime: time(metadata.mtime(), metadata.mtime_nsec()),
        ctime: time(metadata.ctime(), metadata.ctime_nsec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn new_fs() -> (tempfile::TempDir, Fs) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(
                dir.path(),
                crate::store::CaptureOptions::default(),
                crate::store::Role::Primary,
            )
            .unwrap(),
        );
        (dir, Fs::new(store, 0, 0))
    }

    /// The files' creator in these tests: the user `new_fs` mounts as.
    const CREATOR: Creator = Creator {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };

    /// A new file takes its creator's mode; `chmod` changes it, and
    /// `chown` to the owner it has is allowed to anyone.
    #[test]
    fn files_keep_the_mode_they_are_created_or_changed_with() {
        let (_dir, fs) = new_fs();
        let creator = Creator {
            mode: 0o600,
            ..CREATOR
        };
        let (attr, _handle, _) = fs.create(ROOT_INO, OsStr::new("app.db"), creator).unwrap();
        assert_eq!(attr.perm, 0o600);
        let change = AttrChange {
            mode: Some(0o640),
            ..AttrChange::default()
        };
        assert_eq!(fs.setattr(attr.ino, None, change).unwrap().perm, 0o640);
        assert_eq!(fs.getattr(attr.ino, None).unwrap().perm, 0o640);
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let change = AttrChange {
            uid: Some(uid),
            gid: Some(gid),
            ..AttrChange::default()
        };
        let attr = fs.setattr(attr.ino, None, change).unwrap();
        assert_eq!((attr.uid, attr.gid), (uid, gid));
        // Opening it again keeps its mode.
        let (attr, _handle, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        assert_eq!(attr.perm, 0o640);
        let position = fs.lookup(ROOT_INO, OsStr::new("app.db-pos")).unwrap();
        let change = AttrChange {
            mode: Some(0o600),
            ..AttrChange::default()
        };
        assert!(matches!(
            fs.setattr(position.ino, None, change),
            Err(FsError::ReadOnlyGenerated)
        ));
    }

    fn call(owner: LockOwner, start: u64, kind: Option<LockKind>) -> LockCall {
        LockCall {
            owner,
            pid: owner as u32,
            start,
            end: start,
            kind,
        }
    }

    fn setlk_now(fs: &Fs, handle: u64, lock: LockCall) -> Result<(), FsError> {
        let (sender, receiver) = mpsc::channel();
        fs.setlk(
            handle,
            lock,
            false,
            Box::new(move |result| sender.send(result).unwrap()),
        );
        receiver.recv().unwrap()
    }

    #[test]
    fn only_the_root_is_a_directory() {
        let (_dir, fs) = new_fs();
        let (attr, _handle, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        assert!(matches!(
            fs.lookup(attr.ino, OsStr::new("x")),
            Err(FsError::NotADirectory)
        ));
        assert!(matches!(
            fs.open(ROOT_INO, true, false),
            Err(FsError::IsADirectory)
        ));
        assert_eq!(
            fs.lookup(ROOT_INO, OsStr::new("app.db")).unwrap().ino,
            attr.ino
        );
        let names: Vec<_> = fs
            .readdir(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec![".", "..", ".lag", "app.db"]);
    }

    #[test]
    fn flush_drops_posix_locks_and_release_drops_ofd_locks() {
        let (_dir, fs) = new_fs();
        let (attr, first, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        let second = fs.open(attr.ino, true, false).unwrap().0;
        setlk_now(&fs, first, call(10, 0, Some(LockKind::Write))).unwrap();
        assert!(matches!(
            setlk_now(&fs, second, call(20, 0, Some(LockKind::Read))),
            Err(FsError::WouldBlock)
        ));
        fs.flush(first, 10).unwrap();
        setlk_now(&fs, second, call(20, 0, Some(LockKind::Read))).unwrap();
        // Owner 20 behaves like an OFD lock owner: it goes away only with its handle.
        fs.flush(second, 99).unwrap();
        assert!(
            fs.getlk(first, call(10, 0, Some(LockKind::Write)))
                .unwrap()
                .is_some()
        );
        fs.release(second).unwrap();
        assert!(
            fs.getlk(first, call(10, 0, Some(LockKind::Write)))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn lag_is_eleven_bytes_as_litefs_writes_it() {
        let millis = std::time::Duration::from_millis;
        assert_eq!(lag_text(Some(millis(0))), "+000000000\n");
        assert_eq!(lag_text(Some(millis(1234))), "+000001234\n");
        assert_eq!(lag_text(None), "+2147483647");
        assert_eq!(lag_text(Some(millis(u64::MAX))), "+2147483647");
        let (_dir, fs) = new_fs();
        let lag = fs.lookup(ROOT_INO, OsStr::new(".lag")).unwrap();
        assert_eq!(lag.size, 11);
        assert_eq!(lag.mtime, std::time::UNIX_EPOCH, "the primary's .lag time");
    }

    #[test]
    fn a_late_release_keeps_the_locks_its_process_took_since_through_another_handle() {
        let (_dir, fs) = new_fs();
        let (attr, first, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        setlk_now(&fs, first, call(10, 0, Some(LockKind::Read))).unwrap();
        fs.flush(first, 10).unwrap();
        let second = fs.open(attr.ino, true, false).unwrap().0;
        setlk_now(&fs, second, call(10, 0, Some(LockKind::Read))).unwrap();
        fs.release(first).unwrap();
        assert!(
            fs.getlk(second, call(20, 0, Some(LockKind::Write)))
                .unwrap()
                .is_some(),
            "the release of a closed handle dropped a lock held through another"
        );
    }

    #[test]
    fn blocking_lock_completes_when_the_holder_closes() {
        let (_dir, fs) = new_fs();
        let (attr, holder, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        let waiter = fs.open(attr.ino, true, false).unwrap().0;
        setlk_now(&fs, holder, call(1, 5, Some(LockKind::Write))).unwrap();
        let (sender, receiver) = mpsc::channel();
        fs.setlk(
            waiter,
            call(2, 5, Some(LockKind::Write)),
            true,
            Box::new(move |r| sender.send(r).unwrap()),
        );
        assert!(
            receiver.try_recv().is_err(),
            "the request must wait, not block or fail"
        );
        fs.flush(holder, 1).unwrap();
        receiver
            .recv_timeout(std::time::Duration::from_secs(1))
            .unwrap()
            .unwrap();
        let conflict = fs
            .getlk(holder, call(1, 5, Some(LockKind::Read)))
            .unwrap()
            .unwrap();
        assert_eq!(conflict.kind, LockKind::Write);
        assert_eq!(conflict.owner, 2);
    }

    #[test]
    fn rollback_journals_alone_are_uncached() {
        let (_dir, fs) = new_fs();
        for (name, expected) in [
            ("app.db", CachePolicy::KeepCache),
            ("app.db-journal", CachePolicy::Direct),
            ("app.db-wal", CachePolicy::KeepCache),
        ] {
            let (attr, _, created) = fs.create(ROOT_INO, OsStr::new(name), CREATOR).unwrap();
            assert_eq!(created, expected, "{name} as created");
            let (_, opened) = fs.open(attr.ino, true, false).unwrap();
            assert_eq!(opened, expected, "{name} as opened");
        }
    }

    #[test]
    fn unlinked_open_file_keeps_its_attributes() {
        let (_dir, fs) = new_fs();
        let (attr, handle, _) = fs
            .create(ROOT_INO, OsStr::new("app.db-journal"), CREATOR)
            .unwrap();
        fs.write(handle, 0, b"abc").unwrap();
        fs.unlink(ROOT_INO, OsStr::new("app.db-journal")).unwrap();
        assert_eq!(fs.getattr(attr.ino, Some(handle)).unwrap().size, 3);
        assert_eq!(fs.getattr(attr.ino, None).unwrap().size, 3);
        fs.release(handle).unwrap();
        assert!(matches!(
            fs.getattr(attr.ino, None),
            Err(FsError::NoSuchInode(_))
        ));
    }

    #[test]
    fn position_file_is_read_only_and_follows_commits() {
        let (_dir, fs) = new_fs();
        assert!(fs.lookup(ROOT_INO, OsStr::new("app.db-pos")).is_err());
        let (_attr, _handle, _) = fs.create(ROOT_INO, OsStr::new("app.db"), CREATOR).unwrap();
        let attr = fs.lookup(ROOT_INO, OsStr::new("app.db-pos")).unwrap();
        assert_eq!(attr.size, 34);
        assert_eq!(attr.perm, 0o444);
        let (handle, cache) = fs.open(attr.ino, true, false).unwrap();
        assert_eq!(cache, CachePolicy::Direct);
        assert_eq!(
            fs.read(handle, 0, 100).unwrap(),
            b"0000000000000000/0000000000000000\n"
        );
        assert_eq!(fs.write(handle, 0, b"x").unwrap_err().errno(), libc::EACCES);
        let names: Vec<_> = fs
            .readdir(ROOT_INO)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec![".", "..", ".lag", "app.db"]);
    }

    #[test]
    fn refusals_map_to_clear_errnos() {
        let (_dir, fs) = new_fs();
        let (_attr, handle, _) = fs
            .create(ROOT_INO, OsStr::new("notes.txt"), CREATOR)
            .unwrap();
        let error = fs.write(handle, 0, b"hello").unwrap_err();
        assert_eq!(error.errno(), libc::EINVAL);
        assert!(error.is_refusal());
        assert!(error.to_string().contains("SQLite header"), "{error}");
        let error = fs
            .create(ROOT_INO, OsStr::new(".primary"), CREATOR)
            .unwrap_err();
        assert_eq!(error.errno(), libc::EACCES);
        let error = fs
            .create(ROOT_INO, OsStr::new(".other"), CREATOR)
            .unwrap_err();
        assert_eq!(error.errno(), libc::EINVAL);
    }
}
