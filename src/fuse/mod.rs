//! The thin adapter between the kernel's FUSE protocol (through `fuser`) and [`Fs`].
//!
//! Each callback only translates arguments, calls one [`Fs`] method and replies. The
//! single decision made here is how long the kernel may cache answers: the page cache
//! is kept across opens (`FOPEN_KEEP_CACHE`) and lookups that find nothing are
//! cached too, because on a primary every change reaches the kernel through this
//! mount. Whatever changes files behind the kernel's back must invalidate them.
//! Attributes are the exception: on a replica the kernel gets them anew for every
//! `stat` (see [`Fs::attributes_may_be_cached`]).
//!
//! Errors are turned into errnos by [`FsError::errno`] alone; refusals caused by an
//! application's input are logged here with the reason.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    WriteFlags,
};

use tokio_util::sync::CancellationToken;

use crate::fs::{
    Attr, AttrChange, CachePolicy, Creator, Fs, FsError, LockCall, NodeType, ROOT_INO,
};
use crate::own_mount::{OwnMount, Prefetcher, is_own_thread};
use crate::store::locks::{LockKind, LockServer};
use crate::store::{KernelCache, NodeId};

/// How long the kernel may trust entries, attributes and negative lookups.
const CACHE_TTL: Duration = Duration::from_secs(1);

/// A mounted ltxfs filesystem served by FUSE worker threads.
pub struct MountedSession {
    session: fuser::BackgroundSession,
    mount_point: PathBuf,
    ended: CancellationToken,
    /// ltxfs's own descriptors of the mount, when the kernel serves the locks.
    own_mount: Option<Arc<OwnMount>>,
    prefetcher: Arc<Prefetcher>,
}

impl MountedSession {
    /// Mounts `fs` at `mount_point` and serves it on `threads` threads. The store
    /// gets a [`KernelCache`] so the core can invalidate what the kernel cached.
    /// `ended` is cancelled when the session ends, whoever unmounted it.
    pub fn start(
        fs: Arc<Fs>,
        mount_point: &Path,
        allow_other: bool,
        threads: usize,
        ended: CancellationToken,
    ) -> std::io::Result<MountedSession> {
        let mut options = fuser::Config::default();
        options.mount_options = vec![
            fuser::MountOption::FSName(crate::mountinfo::FS_NAME.to_string()),
            fuser::MountOption::Subtype(crate::mountinfo::FS_NAME.to_string()),
            fuser::MountOption::NoAtime,
        ];
        if allow_other {
            options.acl = fuser::SessionACL::All;
        }
        options.n_threads = Some(threads);
        options.clone_fd = true;
        let store = fs.store().clone();
        let adapter = FuseAdapter {
            locks: store.lock_server(),
            fs,
            ended: ended.clone(),
            stateless_directories: false,
        };
        let prefetcher = Arc::new(Prefetcher::start(mount_point)?);
        let session = fuser::Session::new(adapter, mount_point, &options)?.spawn()?;
        store.set_kernel_cache(Arc::new(KernelNotifier {
            notifier: session.notifier(),
            prefetcher: prefetcher.clone(),
        }));
        let own_mount = match store.lock_server() {
            LockServer::Kernel => {
                let own = Arc::new(OwnMount::new(mount_point)?);
                store.set_kernel_locks(own.clone());
                Some(own)
            }
            LockServer::Ltxfs => None,
        };
        Ok(MountedSession {
            session,
            mount_point: mount_point.to_path_buf(),
            ended,
            own_mount,
            prefetcher,
        })
    }

    /// Unmounts and waits for the worker threads; if a process still has a file
    /// open, detaches the mount instead (the kernel finishes once it is closed).
    pub fn unmount(self) {
        self.prefetcher.stop();
        if let Some(own) = &self.own_mount {
            own.close_all();
        }
        let mount_point = self.mount_point;
        if self.ended.is_cancelled() {
            // Unmounted already, by another process.
            let _ = self.session.join();
            return;
        }
        if let Err(error) = self.session.umount_and_join() {
            tracing::warn!(%error, "unmount failed; detaching the mount lazily");
            if let Err(error) = detach(&mount_point) {
                tracing::error!(%error, mount_point = %mount_point.display(), "could not detach the mount");
            }
        }
        tracing::info!(mount_point = %mount_point.display(), "ltxfs unmounted");
    }
}

/// Lazily unmounts `path`: it disappears now and goes away once nothing uses it.
pub fn detach(path: &Path) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("path contains NUL"))?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the kernel to drop what it cached, through FUSE notifications, and
/// to read files in, through the [`Prefetcher`].
struct KernelNotifier {
    notifier: fuser::Notifier,
    prefetcher: Arc<Prefetcher>,
}

impl KernelCache for KernelNotifier {
    fn invalidate_file(&self, node: NodeId) {
        // Offset 0 with a negative length drops every cached page and the attributes.
        if let Err(error) = self.notifier.inval_inode(INodeNo(node.0), 0, -1) {
            if error.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(%error, node = node.0, "could not invalidate cached pages");
            }
        }
    }

    fn invalidate_pages(&self, node: NodeId, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return self.invalidate_file(node);
        };
        if let Err(error) = self.notifier.inval_inode(INodeNo(node.0), offset, len) {
            if error.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(%error, node = node.0, "could not invalidate cached pages");
            }
        }
    }

    fn invalidate_entry(&self, name: &str) {
        if let Err(error) = self
            .notifier
            .inval_entry(INodeNo(ROOT_INO), OsStr::new(name))
        {
            if error.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(%error, name, "could not invalidate a cached entry");
            }
        }
    }

    fn prefetch(&self, name: &str, len: u64) {
        self.prefetcher.request(name, len);
    }
}

/// The FUSE callbacks of an ltxfs mount.
struct FuseAdapter {
    fs: Arc<Fs>,
    /// Whether the kernel is asked to send lock calls here.
    locks: LockServer,
    /// Cancelled when the session ends.
    ended: CancellationToken,
    /// Whether the kernel opens directories without asking (set at `init`),
    /// which saves SQLite's directory syncs two requests each.
    stateless_directories: bool,
}

impl FuseAdapter {
    /// How long the kernel may keep the attributes it is given now.
    fn attr_ttl(&self) -> Duration {
        if self.fs.attributes_may_be_cached() {
            CACHE_TTL
        } else {
            Duration::ZERO
        }
    }
}

/// Turns an error into the errno the application sees, logging refusals with why.
fn errno(operation: &str, error: FsError) -> Errno {
    if error.is_refusal() {
        tracing::warn!("refused {operation}: {error}");
    } else if matches!(error, FsError::Store(crate::store::StoreError::Io { .. })) {
        tracing::error!("{operation} failed: {error}");
    }
    Errno::from_i32(error.errno())
}

fn file_attr(attr: &Attr) -> FileAttr {
    let (kind, nlink) = match attr.node_type {
        NodeType::Directory => (FileType::Directory, 2),
        NodeType::File => (FileType::RegularFile, 1),
    };
    let perm = match attr.node_type {
        NodeType::Directory => attr.perm,
        NodeType::File => attr.perm & 0o777,
    };
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind,
        perm,
        nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The attributes of "no such file", which the kernel caches as a negative entry.
fn negative_entry() -> FileAttr {
    file_attr(&Attr {
        ino: 0,
        size: 0,
        node_type: NodeType::File,
        perm: 0,
        uid: 0,
        gid: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
    })
}

fn fopen_flags(cache: CachePolicy) -> FopenFlags {
    match cache {
        CachePolicy::KeepCache => FopenFlags::FOPEN_KEEP_CACHE,
        CachePolicy::Direct => FopenFlags::FOPEN_DIRECT_IO,
    }
}

fn lock_kind(typ: i32) -> Option<LockKind> {
    match typ {
        libc::F_RDLCK => Some(LockKind::Read),
        libc::F_WRLCK => Some(LockKind::Write),
        _ => None,
    }
}

fn lock_type(kind: LockKind) -> i32 {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
    }
}

/// Asks the kernel to send POSIX lock calls to the filesystem (ltxfs serves
/// them itself, see the module docs); fails the mount if the kernel cannot.
pub fn request_posix_locks(config: &mut KernelConfig) -> std::io::Result<()> {
    config
        .add_capabilities(InitFlags::FUSE_POSIX_LOCKS)
        .map_err(|_| std::io::Error::other("the kernel does not offer FUSE_POSIX_LOCKS"))?;
    Ok(())
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Directory handles hold nothing: `readdir` lists the root by offset.
        self.stateless_directories = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        match self.locks {
            LockServer::Ltxfs => request_posix_locks(config),
            LockServer::Kernel => Ok(()),
        }
    }

    fn destroy(&mut self) {
        self.ended.cancel();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(attr) => reply.entry_with_ttls(
                &self.attr_ttl(),
                &CACHE_TTL,
                &file_attr(&attr),
                Generation(0),
            ),
            Err(error) if error.errno() == libc::ENOENT => {
                reply.entry(&CACHE_TTL, &negative_entry(), Generation(0))
            }
            Err(error) => reply.error(errno("lookup", error)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|fh| fh.0)) {
            Ok(attr) => reply.attr(&self.attr_ttl(), &file_attr(&attr)),
            Err(error) => reply.error(errno("getattr", error)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            size,
            mode,
            uid,
            gid,
        };
        match self.fs.setattr(ino.0, fh.map(|fh| fh.0), change) {
            Ok(attr) => reply.attr(&CACHE_TTL, &file_attr(&attr)),
            Err(error) => reply.error(errno("setattr", error)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mknod", FsError::Unsupported("mknod")));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        tracing::debug!(?name, "mkdir");
        reply.error(errno(
            "mkdir",
            FsError::Unsupported("creating a subdirectory"),
        ));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name) {
            Ok(_) => reply.ok(),
            Err(error) => reply.error(errno("unlink", error)),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("rmdir", FsError::Unsupported("removing a directory")));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno("symlink", FsError::Unsupported("a symbolic link")));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("rename", FsError::Unsupported("renaming")));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno("link", FsError::Unsupported("a hard link")));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let by_ltxfs = is_own_thread(req.pid());
        match self.fs.open(ino.0, write, write && by_ltxfs) {
            Ok((handle, cache)) => {
                let mut flags = fopen_flags(cache);
                if by_ltxfs {
                    // Closing ltxfs's own descriptors must not wait for the
                    // writeback of pages an application mapped: when ltxfs is
                    // killed, nobody is left to answer it.
                    flags |= FopenFlags::FOPEN_NOFLUSH;
                }
                reply.opened(FileHandle(handle), flags)
            }
            Err(error) => reply.error(errno("open", error)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(error) => reply.error(errno("read", error)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(errno("write", error)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.fs.flush(fh.0, lock_owner.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("flush", error)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("release", error)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("fsync", error)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.stateless_directories {
            // The kernel then stops sending `opendir` and `releasedir`.
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.fs.readdir(ino.0) {
            Ok(entries) => entries,
            Err(error) => return reply.error(errno("readdir", error)),
        };
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match entry.node_type {
                NodeType::Directory => FileType::Directory,
                NodeType::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(entry.ino), index as u64 + 1, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsyncdir() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno("fsyncdir", error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(stats) => reply.statfs(
                stats.blocks,
                stats.blocks_free,
                stats.blocks_available,
                stats.files,
                stats.files_free,
                stats.block_size,
                stats.name_max,
                stats.block_size,
            ),
            Err(error) => reply.error(errno("statfs", error)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(errno("getxattr", FsError::NoExtendedAttributes));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(errno("listxattr", FsError::NoExtendedAttributes));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("setxattr", FsError::NoExtendedAttributes));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("removexattr", FsError::NoExtendedAttributes));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let creator = Creator {
            mode: mode & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.fs.create(parent.0, name, creator) {
            Ok((attr, handle, cache)) => reply.created(
                &CACHE_TTL,
                &file_attr(&attr),
                Generation(0),
                FileHandle(handle),
                fopen_flags(cache),
            ),
            Err(error) => reply.error(errno("create", error)),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let call = LockCall {
            owner: lock_owner.0,
            pid,
            start,
            end,
            kind: lock_kind(typ),
        };
        match self.fs.getlk(fh.0, call) {
            Ok(Some(held)) => reply.locked(
                held.range.start,
                held.range.end,
                lock_type(held.kind),
                held.pid,
            ),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(error) => reply.error(errno("getlk", error)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let call = LockCall {
            owner: lock_owner.0,
            pid,
            start,
            end,
            kind: lock_kind(typ),
        };
        self.fs.setlk(
            fh.0,
            call,
            sleep,
            Box::new(move |result| match result {
                Ok(()) => reply.ok(),
                Err(error) => reply.error(errno("setlk", error)),
            }),
        );
    }
}
