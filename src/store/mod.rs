//! The synchronous core: owns the databases' backing files, their names and locks.
//!
//! The mount root is flat. Every name in it is either a database or one of SQLite's
//! companion files for a database (`-journal`, `-wal`, `-shm`, super-journals
//! `-mj…`). The store keeps each database and its companions in one directory of the
//! data dir (`dbs/<database name>/`), so that a later capability can keep a
//! database's change-set log and position beside it.
//!
//! Invariants:
//! - A database file only ever holds SQLite content: its first page carries the
//!   SQLite header and every write is whole pages at page offsets. Anything else is
//!   refused with [`StoreError::NotSqlite`] before a byte reaches the disk.
//! - Each name maps to at most one live [`Node`]; an unlinked node stays usable by
//!   the handles that still have it open, as on a local filesystem.
//! - Node ids are never reused within one process, so the FUSE layer can use them as
//!   inode numbers.
//!
//! The store never imports the FUSE layer.

mod capture;
pub mod cluster;
pub mod locks;
pub mod log;
mod names;
mod replica;
pub mod seed;
mod wal;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

pub use capture::{
    AppliedChangeSet, CaptureOptions, CatchUp, ChangeSetBytes, Database, LoggedChangeSet, Position,
    ReceivedChangeSet,
};
pub use cluster::{ClusterView, Role};
pub use names::{FileKind, ParsedName, parse_name};
pub use replica::{ChangeSetSpool, LTXFS_LOCK_OWNER, PendingChangeSet, TryApply};

use crate::ltx::{TxId, is_valid_page_size};
use crate::sync::{LockUnpoisoned, RwLockUnpoisoned};
use locks::{ByteRange, LockOwner, LockServer, LockTable};

/// SQLite's PENDING lock byte; RESERVED is the byte after it. A write lock on
/// either means a writer is in a transaction.
const PENDING_BYTE: u64 = 0x4000_0000;

/// The suffix of the read-only file that shows a database's position.
pub const POSITION_SUFFIX: &str = "-pos";

/// The first 16 bytes of every SQLite database file.
pub const SQLITE_HEADER_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The most bytes ltxfs writes with one system call into the files it fills in
/// bulk: the change-set log, snapshot spools, and the runs of pages a replica
/// writes into a database file; larger writes are split. The kernel sizes the
/// page cache's folios after the writes that create them; large folios are slow
/// to get, and every later small write into one does work for all of it
/// (figures in `docs/benchmarks.md`).
pub const WRITE_PIECE_BYTES: usize = 64 << 10;

/// Writes all of `bytes` into `file` at `offset`, at most [`WRITE_PIECE_BYTES`]
/// per system call.
pub fn write_all_at_in_pieces(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    let mut at = offset;
    for piece in bytes.chunks(WRITE_PIECE_BYTES) {
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
    }
    Ok(())
}

/// Errors of the core, at the boundary to the filesystem layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No file has that name.
    #[error("no such file: {0}")]
    NotFound(String),
    /// The name cannot be used for a file in the mount root.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A write or truncate would put content that is not SQLite's into a database file.
    #[error("refused non-SQLite content in database {name:?}: {reason}")]
    NotSqlite {
        /// The database file's name.
        name: String,
        /// What was wrong with the content.
        reason: String,
    },
    /// Change capture could not record a transaction.
    #[error("change capture of database {database:?} failed: {message}")]
    Capture {
        /// The database.
        database: String,
        /// What went wrong.
        message: String,
    },
    /// A change set from the primary does not follow this replica's position or
    /// fails verification; nothing was applied.
    #[error("change set for database {database:?} rejected: {reason}")]
    ChangeSetRejected {
        /// The database.
        database: String,
        /// What did not match.
        reason: String,
    },
    /// A transaction committed here, but the node stopped being the primary
    /// before a replica had it: the application must not count on it.
    #[error(
        "database {database:?}: transaction {txid} committed on this node but was not replicated: {reason}"
    )]
    NotReplicated {
        /// The database.
        database: String,
        /// The transaction.
        txid: TxId,
        /// Why.
        reason: Unacknowledged,
    },
    /// Local processes may not change databases on a replica.
    #[error("{name:?} is read-only on a replica; write on the primary")]
    ReadOnlyReplica {
        /// The file.
        name: String,
    },
    /// The backing filesystem failed.
    #[error("{context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What the kernel may have cached about the mount, which the core must drop when
/// it changes a file behind the kernel's back (a replica applying a change set).
/// The core owns this trait; the FUSE layer implements it.
pub trait KernelCache: Send + Sync {
    /// Drops every cached page and the attributes of a file.
    fn invalidate_file(&self, node: NodeId);
    /// Drops the cached pages of `len` bytes at `offset` (to the end of the file
    /// when `len` is 0) and the file's attributes.
    fn invalidate_pages(&self, node: NodeId, offset: u64, len: u64);
    /// Drops the cached directory entry (positive or negative) for a name.
    fn invalidate_entry(&self, name: &str);
    /// Asks the kernel to read the first `len` bytes of the mount's file
    /// `name` into its cache, in the background. Never waits.
    fn prefetch(&self, name: &str, len: u64);
}

/// What the kernel knows of the locks on the mount's files, when it serves
/// them ([`LockServer::Kernel`]). The core owns this trait; the FUSE layer
/// implements it.
pub trait KernelLocks: Send + Sync {
    /// Whether any process holds a write lock on part of `range` of file `node`.
    fn is_write_locked(&self, node: NodeId, range: ByteRange) -> bool;
    /// Takes, for ltxfs, a write lock on `range` of the mount's file `name`:
    /// an open file description lock on a descriptor ltxfs keeps open on its
    /// mount, so the kernel arbitrates it against the applications' locks.
    /// With `wait`, waits for the processes that hold part of it (so never on
    /// a FUSE worker or an async thread); without, `Ok(None)` when it is held
    /// or ltxfs has no descriptor of the file open yet.
    fn lock(&self, name: &str, range: ByteRange, wait: bool)
    -> std::io::Result<Option<KernelLock>>;
    /// Writes `data` at `offset` of the mount's file `name` through ltxfs's
    /// descriptor of it, so that processes which map the file see it at once.
    /// Makes requests to the mount, like a waiting [`KernelLocks::lock`].
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Closes ltxfs's descriptor of `name`, whose file is gone.
    fn forget(&self, name: &str);
}

/// A lock the kernel holds for ltxfs ([`KernelLocks::lock`]) until dropped.
pub struct KernelLock(pub Box<dyn Send + Sync>);

/// Where a database stood before a local change: what [`Store::hold_commit`]
/// compares with after it.
#[derive(Debug, Clone, Copy)]
pub struct CommitMark {
    /// The TXID captured last.
    captured: u64,
    /// The role's term ([`ClusterView::term`]).
    term: u64,
}

/// A commit no replica acknowledged.
#[derive(Debug)]
struct Unreplicated {
    database: String,
    txid: TxId,
    term: u64,
}

/// Permission to make one local change under the current role; a role change
/// waits until it is dropped.
#[must_use = "hold the permit while the change is made"]
struct WritePermit<'a> {
    _gate: RwLockReadGuard<'a, ()>,
}

/// A local change to a database's files, as [`Store::make_change`] makes it.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A write, truncation or unlink of file `name`: allowed only under a
    /// role that may change it (see [`Store::make_change`]).
    File {
        /// The file's name in the mount root.
        name: &'a str,
        /// What the file is to its database.
        kind: &'a FileKind,
    },
    /// The release of a lock, which may end a journal-less transaction:
    /// always allowed.
    Unlock,
    /// An fsync of one of the database's files, which ends a journal-less
    /// transaction when the kernel serves the locks: always allowed.
    Sync,
}

/// Hears about every new position of every database: a change set captured on the
/// primary or applied on a replica. Called with the database's capture lock held,
/// so it must return at once (the replication bridge wakes async tasks).
pub trait CommitListener: Send + Sync {
    /// Database `name` has a new position.
    fn committed(&self, name: &str);

    /// The node's role, or the primary it follows, changed.
    fn cluster_changed(&self) {}
}

/// Why a commit was not replicated ([`StoreError::NotReplicated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unacknowledged {
    /// The node stopped being the primary before a replica acknowledged it.
    #[error("this node stopped being the primary before a replica acknowledged it")]
    NoLongerPrimary,
    /// An earlier commit of the same term was not replicated, and the node is
    /// giving up the primary role.
    #[error("an earlier commit was not replicated, and this node is giving up the primary role")]
    EarlierCommitNotReplicated,
}

/// Holds a local change that committed a transaction until a replica has the
/// transaction (synchronous replication). Called on a FUSE worker thread with no
/// store lock held, so it may block; it must return once it is no use waiting.
pub trait CommitHold: Send + Sync {
    /// Blocks until a replica has `database` up to `txid` (`Ok`), or no replica
    /// is there to wait for (`Ok`: the commit stands on this node alone), or no
    /// replica will acknowledge it now that `still_primary` turned false (`Err`).
    fn wait_replicated(
        &self,
        database: &str,
        txid: TxId,
        still_primary: &dyn Fn() -> bool,
    ) -> Result<(), Unacknowledged>;
}

/// What the store shares with every database: the [`CommitListener`] and the
/// lease epoch under which this node writes change sets.
#[derive(Default)]
pub(crate) struct Shared {
    listener: RwLock<Option<Arc<dyn CommitListener>>>,
    /// Stored in every change set captured here (the LTX header's node ID field),
    /// so replicas can refuse an older primary's change sets (fencing).
    epoch: AtomicU64,
}

impl Shared {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn notify(&self, name: &str) {
        if let Some(listener) = self.listener() {
            listener.committed(name);
        }
    }

    fn notify_cluster_change(&self) {
        if let Some(listener) = self.listener() {
            listener.cluster_changed();
        }
    }

    fn listener(&self) -> Option<Arc<dyn CommitListener>> {
        self.listener.read_unpoisoned().clone()
    }
}

/// A unique id for a file, stable for the lifetime of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

/// One file in the mount root, backed by one file in the data dir.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    kind: FileKind,
    file: Arc<File>,
    database: Arc<Database>,
    locks: LockTable,
    /// For a database file: the page size from its header, or 0 while it is empty.
    page_size: AtomicU32,
    /// For a database file: the page size before the last change of page size.
    previous_page_size: AtomicU32,
}

impl Node {
    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The name in the mount root.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What kind of file this is.
    pub fn kind(&self) -> &FileKind {
        &self.kind
    }

    /// The file's byte-range locks.
    pub fn locks(&self) -> &LockTable {
        &self.locks
    }

    /// The database this file belongs to.
    pub fn database(&self) -> &Arc<Database> {
        &self.database
    }

    /// Releases `owner`'s locks on `range`.
    pub fn unlock(&self, owner: LockOwner, range: ByteRange) {
        self.locks.unlock(owner, range);
        self.after_unlock();
    }

    /// Releases all of `owner`'s locks (a descriptor of its process was closed).
    pub fn unlock_all(&self, owner: LockOwner) {
        self.locks.unlock_all(owner);
        self.after_unlock();
    }

    /// Releases all of `owner`'s locks and cancels its waits (its open file
    /// description is gone).
    pub fn release_owner(&self, owner: LockOwner) {
        self.locks.release_owner(owner);
        self.after_unlock();
    }

    /// The last descriptor of an open file description of this file was
    /// closed; with the kernel serving the locks, a writer's close may end a
    /// transaction of a journal-less mode.
    pub fn closed(&self) {
        self.after_unlock();
    }

    /// A released database lock may end a transaction of a journal-less mode;
    /// a released `-shm` lock may end a WAL commit, which readers then see.
    fn after_unlock(&self) {
        if self.kind == FileKind::Shm {
            self.database
                .publish_wal_commit(|| self.locks.is_write_locked(capture::WAL_WRITE_LOCK));
            return;
        }
        if self.kind != FileKind::Database {
            return;
        }
        let writer_bytes = ByteRange {
            start: PENDING_BYTE,
            end: PENDING_BYTE + 1,
        };
        let writer_lock_held = self.locks.is_write_locked(writer_bytes);
        // An unlock cannot fail; a capture failure is logged and recovered from by
        // rereading the database at the next commit.
        let _ = self.database.after_unlock(writer_lock_held);
    }

    /// The backing file's metadata (size, times, owner).
    pub fn metadata(&self) -> Result<std::fs::Metadata, StoreError> {
        self.file
            .metadata()
            .map_err(|source| StoreError::io(format!("stat {}", self.name), source))
    }

    /// Sets the backing file's permission bits (`chmod`); they are kept
    /// across restarts with the file.
    pub fn set_mode(&self, mode: u32) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|source| StoreError::io(format!("chmod {}", self.name), source))
    }

    /// Sets the backing file's owner and group (`chown`); `None` keeps one.
    pub fn set_owner(&self, uid: Option<u32>, gid: Option<u32>) -> Result<(), StoreError> {
        std::os::unix::fs::fchown(self.file.as_ref(), uid, gid)
            .map_err(|source| StoreError::io(format!("chown {}", self.name), source))
    }

    /// Reads up to `size` bytes at `offset`; shorter only at the end of the file.
    pub fn read_at(&self, offset: u64, size: usize) -> Result<Vec<u8>, StoreError> {
        let mut buffer = vec![0u8; size];
        let mut filled = 0;
        while filled < size {
            match self
                .file
                .read_at(&mut buffer[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StoreError::io(format!("read {}", self.name), source));
                }
            }
        }
        buffer.truncate(filled);
        Ok(buffer)
    }

    /// Writes `data` at `offset`, refusing content that is not SQLite's in a database.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let new_page_size = if self.kind == FileKind::Database {
            Some(self.check_database_write(offset, data)?)
        } else {
            None
        };
        self.database.before_change(&self.kind, Some(offset))?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| StoreError::io(format!("write {}", self.name), source))?;
        if let Some(page_size) = new_page_size.filter(|&size| size != 0) {
            let old = self.page_size.swap(page_size, Ordering::AcqRel);
            if old != page_size && old != 0 {
                self.previous_page_size.store(old, Ordering::Release);
            }
        }
        self.database.after_write(&self.kind, offset, data)
    }

    /// Sets the file's length, refusing a database length that is not whole pages.
    pub fn truncate(&self, size: u64) -> Result<(), StoreError> {
        if self.kind == FileKind::Database && size != 0 {
            let page_size = self.page_size.load(Ordering::Acquire);
            if page_size == 0 {
                return Err(self.not_sqlite(format!(
                    "cannot extend an empty database to {size} bytes before page 1 is written"
                )));
            }
            if size % u64::from(page_size) != 0 {
                return Err(self.not_sqlite(format!(
                    "length {size} is not a multiple of the page size {page_size}"
                )));
            }
        }
        self.database.before_change(&self.kind, None)?;
        self.file
            .set_len(size)
            .map_err(|source| StoreError::io(format!("truncate {}", self.name), source))?;
        if self.kind == FileKind::Database && size == 0 {
            self.page_size.store(0, Ordering::Release);
        }
        self.database.after_truncate(&self.kind, size)
    }

    /// Flushes the backing file to stable storage.
    pub fn sync(&self, data_only: bool) -> Result<(), StoreError> {
        // The log first: a change set is durable no later than its transaction.
        self.database.before_sync(Some(&self.kind))?;
        let result = if data_only {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        };
        result.map_err(|source| StoreError::io(format!("fsync {}", self.name), source))
    }

    /// Checks a write to a database file and returns the page size it implies (0
    /// while page 1 has not been written).
    fn check_database_write(&self, offset: u64, data: &[u8]) -> Result<u32, StoreError> {
        let current = self.page_size.load(Ordering::Acquire);
        let previous = self.previous_page_size.load(Ordering::Acquire);
        let len = data.len() as u64;
        let whole_pages =
            |size: u32| size != 0 && offset % u64::from(size) == 0 && len % u64::from(size) == 0;
        let declared = if offset == 0 {
            Some(
                page_size_from_header(data)
                    .map_err(|reason| self.not_sqlite(reason.to_string()))?,
            )
        } else {
            None
        };
        // VACUUM that changes the page size writes the new content in pages of the
        // old size, so during a change both sizes are whole pages.
        match (declared, current) {
            (Some(new), _) if whole_pages(new) || whole_pages(current) => Ok(new),
            // SQLite may spill later pages of a new database before page 1; the page
            // size is then only known from the write's own shape.
            (None, 0) if is_plausible_page(offset, data.len()) => Ok(0),
            (None, _) if whole_pages(current) || whole_pages(previous) => Ok(current),
            (None, 0) => Err(self.not_sqlite(format!(
                "write of {len} bytes at offset {offset} before page 1 is not one whole page"
            ))),
            _ => Err(self.not_sqlite(format!(
                "write of {len} bytes at offset {offset} is not whole {}-byte pages",
                declared.unwrap_or(current)
            ))),
        }
    }

    fn not_sqlite(&self, reason: String) -> StoreError {
        StoreError::NotSqlite {
            name: self.name.clone(),
            reason,
        }
    }
}

/// True when process `pid` no longer exists, is exiting, or has a SIGKILL pending.
fn process_is_gone(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        // The kernel gave no process for this request; never cancel it.
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    status.lines().any(|line| {
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.trim();
        match key {
            "State" => value.starts_with('Z') || value.starts_with('X'),
            "SigPnd" | "ShdPnd" => {
                u64::from_str_radix(value, 16).is_ok_and(|mask| mask & SIGKILL_BIT != 0)
            }
            _ => false,
        }
    })
}

/// True when a write could be one page of some valid SQLite page size.
fn is_plausible_page(offset: u64, len: usize) -> bool {
    u32::try_from(len).is_ok_and(is_valid_page_size) && offset % len as u64 == 0
}

/// Why the start of page 1 is not a SQLite database header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    /// The first 16 bytes are not [`SQLITE_HEADER_MAGIC`].
    #[error("page 1 does not start with the SQLite header")]
    NotSqlite,
    /// The magic is there but the 100-byte header is cut short.
    #[error("page 1 is {0} bytes, shorter than the 100-byte SQLite header")]
    Truncated(usize),
    /// The page size field holds no valid page size.
    #[error("page 1 declares an invalid page size {0}")]
    InvalidPageSize(u32),
}

/// Reads the page size from the start of page 1, checking the SQLite header.
pub(crate) fn page_size_from_header(page_one: &[u8]) -> Result<u32, HeaderError> {
    if !page_one.starts_with(SQLITE_HEADER_MAGIC) {
        return Err(HeaderError::NotSqlite);
    }
    if page_one.len() < 100 {
        return Err(HeaderError::Truncated(page_one.len()));
    }
    let page_size = match u16::from_be_bytes([page_one[16], page_one[17]]) {
        1 => 65536,
        size => u32::from(size),
    };
    if !is_valid_page_size(page_size) {
        return Err(HeaderError::InvalidPageSize(page_size));
    }
    Ok(page_size)
}

#[derive(Default)]
struct Namespace {
    by_name: BTreeMap<String, Arc<Node>>,
    by_id: HashMap<NodeId, Arc<Node>>,
}

/// What change sets the log must keep for a backup: retention does not merge
/// away, for their age, the change sets after this TXID (a destination does
/// not have them yet). Implemented by the backup uploaders.
pub trait RetentionPins: Send + Sync {
    /// The TXID after which `database`'s change sets must be kept, if any.
    fn keep_after(&self, database: &str) -> Option<TxId>;
}

/// The set of databases under one data dir.
pub struct Store {
    dbs_dir: PathBuf,
    capture: CaptureOptions,
    namespace: RwLock<Namespace>,
    databases: Mutex<BTreeMap<String, Arc<Database>>>,
    kernel_cache: RwLock<Option<Arc<dyn KernelCache>>>,
    kernel_locks: RwLock<Option<Arc<dyn KernelLocks>>>,
    /// Synchronous replication's hold on commits, when it is on.
    commit_hold: RwLock<Option<Arc<dyn CommitHold>>>,
    /// The first commit no replica acknowledged, with the term it was made in:
    /// every later change of that term fails with it, so a retried write
    /// cannot pass a commit that failed.
    unreplicated: Mutex<Option<Unreplicated>>,
    retention_pins: RwLock<Option<Arc<dyn RetentionPins>>>,
    shared: Arc<Shared>,
    cluster: ClusterView,
    /// Held by the one change set being applied on a replica.
    applying: Mutex<()>,
    /// Read-held by every local change while it is made, write-held while the
    /// role changes: once [`Store::set_role`] returns, no change that was allowed
    /// under the old role is still being made.
    role_gate: RwLock<()>,
    next_id: AtomicU64,
    /// Directories whose entries changed since the last directory sync.
    dirty_dirs: Mutex<BTreeSet<PathBuf>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dbs_dir", &self.dbs_dir)
            .finish_non_exhaustive()
    }
}

/// The first node id; 1 is the FUSE root directory, 2 and 3 the `.primary` and
/// `.lag` files.
const FIRST_NODE_ID: u64 = 4;

/// The file in the mount root that names the primary on a replica.
pub const PRIMARY_FILE: &str = ".primary";
/// The file in the mount root that gives the replication lag in milliseconds.
pub const LAG_FILE: &str = ".lag";

impl Store {
    /// Opens the store kept in `data_dir`, creating its layout if needed, and loads
    /// every file already there.
    pub fn open(data_dir: &Path, capture: CaptureOptions, role: Role) -> Result<Store, StoreError> {
        let dbs_dir = data_dir.join("dbs");
        std::fs::create_dir_all(&dbs_dir)
            .map_err(|source| StoreError::io(format!("create {}", dbs_dir.display()), source))?;
        let store = Store {
            dbs_dir,
            capture,
            namespace: RwLock::new(Namespace::default()),
            databases: Mutex::new(BTreeMap::new()),
            kernel_cache: RwLock::new(None),
            kernel_locks: RwLock::new(None),
            commit_hold: RwLock::new(None),
            retention_pins: RwLock::new(None),
            shared: Arc::new(Shared::default()),
            cluster: ClusterView::new(role),
            applying: Mutex::new(()),
            role_gate: RwLock::new(()),
            unreplicated: Mutex::new(None),
            next_id: AtomicU64::new(FIRST_NODE_ID),
            dirty_dirs: Mutex::new(BTreeSet::new()),
        };
        store.load_existing()?;
        Ok(store)
    }

    fn load_existing(&self) -> Result<(), StoreError> {
        let read_dir = |dir: &Path| {
            std::fs::read_dir(dir)
                .map_err(|source| StoreError::io(format!("list {}", dir.display()), source))
        };
        let mut namespace = self.write_namespace();
        for db_entry in read_dir(&self.dbs_dir)? {
            let db_entry = db_entry.map_err(|source| StoreError::io("list databases", source))?;
            let Some(database) = db_entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(dir = ?db_entry.path(), "skipping a database directory whose name is not UTF-8");
                continue;
            };
            let capture = self.open_database(&database)?;
            for file_entry in read_dir(&db_entry.path())? {
                let file_entry =
                    file_entry.map_err(|source| StoreError::io("list database files", source))?;
                let backing_name = file_entry.file_name();
                let Some(kind) = backing_name.to_str().and_then(FileKind::from_backing_name) else {
                    continue;
                };
                let name = kind.root_name(&database);
                if kind == FileKind::Shm && self.cluster.role() == Role::Replica {
                    // A replica's readers must rebuild the wal-index from its content
                    // (its WAL is folded into the database below); no process can
                    // have it open before the mount exists.
                    File::options()
                        .write(true)
                        .open(file_entry.path())
                        .and_then(|file| file.set_len(0))
                        .map_err(|source| StoreError::io("reset the wal-index", source))?;
                }
                let node = self.open_node(&name, kind, &file_entry.path(), false, &capture)?;
                namespace.by_id.insert(node.id, node.clone());
                namespace.by_name.insert(name, node);
            }
            capture.recover(self.cluster.role())?;
        }
        Ok(())
    }

    /// The capture state of `name`, opened (and recovered) on first use.
    fn open_database(&self, name: &str) -> Result<Arc<Database>, StoreError> {
        let mut databases = self.databases.lock_unpoisoned();
        if let Some(database) = databases.get(name) {
            return Ok(database.clone());
        }
        let position_file_id = NodeId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let database = Arc::new(Database::open(
            name,
            &self.dbs_dir.join(name),
            self.capture,
            position_file_id,
            self.shared.clone(),
        )?);
        databases.insert(name.to_string(), database.clone());
        Ok(database)
    }

    /// The capture state of database `name`, if it was ever created.
    pub fn database(&self, name: &str) -> Option<Arc<Database>> {
        self.databases.lock_unpoisoned().get(name).cloned()
    }

    /// Who serves SQLite's locks on the mount.
    pub fn lock_server(&self) -> LockServer {
        self.capture.locks
    }

    /// This node's role and its view of the primary.
    pub fn cluster(&self) -> &ClusterView {
        &self.cluster
    }

    /// Turns synchronous replication on: every local change that commits a
    /// transaction waits in [`Store::hold_commit`] for `hold`.
    pub fn set_commit_hold(&self, hold: Arc<dyn CommitHold>) {
        *self.commit_hold.write_unpoisoned() = Some(hold);
    }

    /// Makes a local change to one of `database`'s files (`make`), the one
    /// way every write, truncation, unlink and unlock of the mount is made:
    /// marks where the database stands, makes the change under a
    /// [`WritePermit`] (but an unlock, which needs none), drops the permit so
    /// that a role change never waits for a replica, then holds until a
    /// replica has what the change committed ([`Store::hold_commit`]).
    pub fn make_change<T, E: From<StoreError>>(
        &self,
        database: &Database,
        change: Change<'_>,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mark = self.commit_mark(database);
        let made = match change {
            Change::File { name, kind } => {
                let _permit = self.permit_change(name, kind)?;
                make()?
            }
            Change::Unlock | Change::Sync => make()?,
        };
        if self.capture.locks == LockServer::Ltxfs {
            // Without WAL-index locks (`locking_mode=EXCLUSIVE`) no unlock
            // of `-shm` will publish the commit.
            self.publish_wal_commit(database);
        }
        self.hold_commit(database, mark)?;
        Ok(made)
    }

    /// After a write of `len` bytes at `offset` of `node`, through the mount.
    /// A WAL header written over a longer WAL starts the WAL over: SQLite
    /// writes its frames again from the front. A frame is a 24-byte header
    /// and then a page, so its page starts mid-page of the kernel's cache, and
    /// the kernel splits a write where it covers a page it does not hold whole:
    /// a frame costs three write requests instead of two until the kernel holds
    /// the WAL's pages. It is asked to read them in (writes keep them whole
    /// once it does).
    pub fn wrote(&self, node: &Node, offset: u64, len: usize) {
        if *node.kind() != FileKind::Wal || offset != 0 || len as u64 != wal::WAL_HEADER_SIZE {
            return;
        }
        let Ok(metadata) = node.file.metadata() else {
            return;
        };
        if metadata.len() > wal::WAL_HEADER_SIZE
            && let Some(cache) = self.kernel_cache()
        {
            cache.prefetch(node.name(), metadata.len());
        }
    }

    /// Publishes `database`'s captured WAL commit once its writer released
    /// the WAL write lock of `-shm` (at once when there is no `-shm`).
    fn publish_wal_commit(&self, database: &Database) {
        if !database.has_unpublished_wal_commit() {
            return;
        }
        let shm = self.lookup(&format!("{}-shm", database.name()));
        let Some(shm) = shm else {
            database.publish_wal_commit(|| false);
            return;
        };
        match self.capture.locks {
            LockServer::Ltxfs => {
                database.publish_wal_commit(|| shm.locks.is_write_locked(capture::WAL_WRITE_LOCK))
            }
            LockServer::Kernel => {
                let kernel_locks = self.kernel_locks();
                database.publish_wal_commit(|| {
                    // Before the mount, no application holds a lock.
                    kernel_locks.is_some_and(|locks| {
                        locks.is_write_locked(shm.id(), capture::WAL_WRITE_LOCK)
                    })
                })
            }
        }
    }

    /// The position every read transaction of `database` begun from now on
    /// sees at least: what its `-pos` file shows.
    pub fn visible_position(&self, database: &Database) -> Position {
        if self.capture.locks == LockServer::Kernel {
            // No unlock reaches ltxfs: whether the last WAL commit's writer is
            // done is asked when someone looks.
            self.publish_wal_commit(database);
        }
        database.visible_position()
    }

    /// Marks where `database` stands before a local change, for
    /// [`Store::hold_commit`] after it.
    fn commit_mark(&self, database: &Database) -> CommitMark {
        CommitMark {
            captured: database.captured_txid(),
            term: self.cluster.term(),
        }
    }

    /// After a local change to one of `database`'s files, made while its
    /// [`WritePermit`] was held and finished now that the permit is dropped (a
    /// role change must not wait for a replica): when the change committed a
    /// transaction (the captured TXID moved from `mark`'s), waits until a
    /// replica has it, if synchronous replication is on. The wait fails once
    /// this node is no longer certainly the primary of `mark`'s term.
    ///
    /// Once a commit was not replicated, [`Store::permit_change`] refuses every
    /// later change of its term, before it is made. The kernel may split a
    /// write into several requests and reports a short write when a later one
    /// fails; SQLite writes the rest again, and that request commits nothing
    /// new, so it would succeed and SQLite would report the commit done.
    fn hold_commit(&self, database: &Database, mark: CommitMark) -> Result<(), StoreError> {
        let hold = self.commit_hold.read_unpoisoned().clone();
        let Some(hold) = hold else {
            return Ok(());
        };
        let captured = database.captured_txid();
        if captured == mark.captured {
            return Ok(());
        }
        let still_primary = || self.cluster.holds_primary() && self.cluster.term() == mark.term;
        let txid = TxId(captured);
        hold.wait_replicated(database.name(), txid, &still_primary)
            .map_err(|reason| {
                tracing::warn!(database = %database.name(), %txid, %reason, "a commit was not replicated; the application got an I/O error");
                let mut failed = self.unreplicated();
                if failed.as_ref().is_none_or(|failed| failed.term < mark.term) {
                    *failed = Some(Unreplicated {
                        database: database.name().to_string(),
                        txid,
                        term: mark.term,
                    });
                }
                StoreError::NotReplicated {
                    database: database.name().to_string(),
                    txid,
                    reason,
                }
            })
    }

    /// Whether a commit of the current term was not replicated: changes fail
    /// until the role changes, so the role loop steps down.
    pub fn commit_failed_in_term(&self) -> bool {
        self.unreplicated()
            .as_ref()
            .is_some_and(|failed| failed.term == self.cluster.term())
    }

    fn unreplicated(&self) -> std::sync::MutexGuard<'_, Option<Unreplicated>> {
        self.unreplicated.lock_unpoisoned()
    }

    /// Sets what retention must keep for backups.
    pub fn set_retention_pins(&self, pins: Arc<dyn RetentionPins>) {
        *self.retention_pins.write_unpoisoned() = Some(pins);
    }

    /// Sets who hears about new positions (replaces any earlier listener).
    pub fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) {
        *self.shared.listener.write_unpoisoned() = Some(listener);
    }

    /// Records when the lease this node holds as primary must be renewed by: a
    /// commit held for synchronous replication is not acknowledged after it.
    pub fn set_lease_deadline(&self, deadline: std::time::Instant) {
        self.cluster.set_lease_deadline(deadline);
    }

    /// Records that this replica is (`Some`) or is no longer (`None`) connected to
    /// the primary called `hostname`, and makes the kernel forget `.primary`'s
    /// cached directory entry so applications never read a stale answer.
    pub fn set_primary(&self, hostname: Option<String>) {
        self.cluster.set_primary(hostname);
        if let Some(cache) = self.kernel_cache() {
            cache.invalidate_entry(PRIMARY_FILE);
        }
        self.shared.notify_cluster_change();
    }

    /// Refuses, on a replica, to open or create a file for writing, except `-shm`
    /// (which readers need for their read marks) and `-wal` (which SQLite's readers
    /// create; writing it is refused by [`Store::permit_change`], so a connection
    /// opened while this node was primary cannot commit after it became a replica).
    pub fn check_openable(&self, name: &str, kind: &FileKind) -> Result<(), StoreError> {
        let allowed = matches!(kind, FileKind::Shm | FileKind::Wal);
        self.check_role(name, allowed)
    }

    /// Permission to change (write, truncate or unlink) a file: refused on a
    /// replica for every file but `-shm`, and likewise on a primary once a commit
    /// of the current term was not replicated (SQLite was told that commit failed
    /// but its WAL frames are in the log; a later write would overwrite them
    /// before the WAL is folded into the database file at the next role change).
    /// The permit must be held while the change is made, so that a role change
    /// waits for it.
    fn permit_change(&self, name: &str, kind: &FileKind) -> Result<WritePermit<'_>, StoreError> {
        let gate = self.role_gate.read_unpoisoned();
        let shm = *kind == FileKind::Shm;
        self.check_role(name, shm)?;
        if !shm {
            self.check_no_failed_commit(self.cluster.term())?;
        }
        Ok(WritePermit { _gate: gate })
    }

    /// Fails with the commit of term `term` that was not replicated, if any.
    fn check_no_failed_commit(&self, term: u64) -> Result<(), StoreError> {
        match self.unreplicated().as_ref() {
            Some(failed) if failed.term == term => Err(StoreError::NotReplicated {
                database: failed.database.clone(),
                txid: failed.txid,
                reason: Unacknowledged::EarlierCommitNotReplicated,
            }),
            _ => Ok(()),
        }
    }

    fn check_role(&self, name: &str, allowed_on_a_replica: bool) -> Result<(), StoreError> {
        if self.cluster.role() == Role::Replica && !allowed_on_a_replica {
            return Err(StoreError::ReadOnlyReplica {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Makes this node the primary (local writes are captured) or a replica (local
    /// writes are refused), and drops the kernel's cached `.primary` entry. Waits
    /// for local changes being made under the old role, so a new replica's
    /// positions are final when this returns.
    pub fn set_role(&self, role: Role) {
        {
            let _gate = self.role_gate.write_unpoisoned();
            self.cluster.set_role(role);
        }
        self.shared.notify_cluster_change();
        if let Some(cache) = self.kernel_cache() {
            cache.invalidate_entry(PRIMARY_FILE);
        }
    }

    /// Sets the lease epoch stored in the change sets this node captures from now on.
    pub fn set_epoch(&self, epoch: u64) {
        self.shared.epoch.store(epoch, Ordering::Release);
    }

    /// The lease epoch change sets are stamped with (0 before the first).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch()
    }

    /// Every database that has a position, with it, ordered by name. Never
    /// waits for a commit, an apply or a snapshot (see [`Database::position`]).
    pub fn positions(&self) -> Vec<(String, Position)> {
        self.all_databases()
            .into_iter()
            .map(|database| (database.name().to_string(), database.position()))
            .filter(|(_, position)| position.txid.0 > 0)
            .collect()
    }

    /// Like [`Store::positions`], without the databases that were deleted
    /// (whose last change set has no pages): what status output and metrics
    /// show. Never waits.
    pub fn existing_positions(&self) -> Vec<(String, Position)> {
        self.all_databases()
            .into_iter()
            .filter(|database| database.exists())
            .map(|database| (database.name().to_string(), database.position()))
            .collect()
    }

    /// Per database with a position, where its newest change sets (at most
    /// `limit`) end, newest first: what a replica shows the primary so that,
    /// when their histories diverged, it can say where.
    pub fn histories(&self, limit: usize) -> Result<Vec<(String, Vec<Position>)>, StoreError> {
        self.all_databases()
            .into_iter()
            .filter(|database| database.position().txid.0 > 0)
            .map(|database| Ok((database.name().to_string(), database.history(limit)?)))
            .collect()
    }

    /// Connects the store to the kernel's cache of the mount.
    pub fn set_kernel_cache(&self, cache: Arc<dyn KernelCache>) {
        *self.kernel_cache.write_unpoisoned() = Some(cache);
    }

    /// Gives the core the kernel's view of the mount's locks, which it asks
    /// when the kernel serves them.
    pub fn set_kernel_locks(&self, locks: Arc<dyn KernelLocks>) {
        *self.kernel_locks.write_unpoisoned() = Some(locks);
    }

    /// The kernel's view of the mount's locks, when the kernel serves them
    /// and the mount is up.
    fn kernel_locks(&self) -> Option<Arc<dyn KernelLocks>> {
        match self.capture.locks {
            LockServer::Kernel => self.kernel_locks.read_unpoisoned().clone(),
            LockServer::Ltxfs => None,
        }
    }

    /// Where a replica apply takes the locks that keep readers out.
    fn apply_locks(&self) -> replica::ApplyLocks {
        match (self.capture.locks, self.kernel_locks()) {
            (LockServer::Ltxfs, _) => replica::ApplyLocks::Table,
            (LockServer::Kernel, Some(locks)) => replica::ApplyLocks::Kernel(locks),
            (LockServer::Kernel, None) => replica::ApplyLocks::Unmounted,
        }
    }

    fn kernel_cache(&self) -> Option<Arc<dyn KernelCache>> {
        self.kernel_cache.read_unpoisoned().clone()
    }

    /// Makes the kernel forget what it cached of file `name` (its pages, attributes
    /// and directory entry), so readers see what the core wrote behind its back.
    pub fn invalidate(&self, name: &str) {
        let Some(cache) = self.kernel_cache() else {
            return;
        };
        if let Some(node) = self.lookup(name) {
            cache.invalidate_file(node.id());
        }
        cache.invalidate_entry(name);
    }

    /// The database whose `-pos` file is called `name`; only databases whose
    /// database file exists have one.
    pub fn position_file(&self, name: &str) -> Option<Arc<Database>> {
        let database = name.strip_suffix(POSITION_SUFFIX)?;
        self.lookup(database)?;
        self.database(database)
    }

    /// The database whose `-pos` file has id `id`.
    pub fn position_file_by_id(&self, id: NodeId) -> Option<Arc<Database>> {
        let database = self
            .databases
            .lock_unpoisoned()
            .values()
            .find(|database| database.position_file_id() == id)
            .cloned()?;
        self.lookup(database.name())?;
        Some(database)
    }

    /// Applies the retention policy to every database's log; returns how many
    /// change sets were merged away. A failure on one database is logged and the
    /// others are still handled.
    pub fn enforce_retention(&self, policy: log::RetentionPolicy) -> usize {
        let databases = self.all_databases();
        // Only the primary uploads backups, so only its log keeps change sets
        // for them.
        let pins = self
            .retention_pins
            .read_unpoisoned()
            .clone()
            .filter(|_| self.cluster.role() == Role::Primary);
        databases
            .iter()
            .map(|database| log::RetentionPolicy {
                keep_after: pins
                    .as_ref()
                    .and_then(|pins| pins.keep_after(database.name())),
                ..policy
            })
            .zip(&databases)
            .map(
                |(policy, database)| match database.enforce_retention(policy) {
                    Ok(merged) => merged,
                    Err(error) => {
                        tracing::error!(database = %database.name(), %error, "retention failed");
                        0
                    }
                },
            )
            .sum()
    }

    /// Cancels blocking lock requests whose process has died or been killed while
    /// waiting. FUSE does not tell ltxfs (the kernel's interrupt is not passed on),
    /// and a killed process cannot exit until its request is answered.
    pub fn cancel_abandoned_lock_waits(&self) -> usize {
        self.list()
            .iter()
            .map(|node| {
                node.locks()
                    .cancel_waiters(|request| process_is_gone(request.pid))
            })
            .sum()
    }

    /// Every database's capture state (a snapshot of the list).
    fn all_databases(&self) -> Vec<Arc<Database>> {
        self.databases.lock_unpoisoned().values().cloned().collect()
    }

    /// Flushes every log and saves checksums so the next start is fast.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        let databases = self.all_databases();
        for database in databases {
            database.save_checksums()?;
        }
        Ok(())
    }

    /// The file called `name`, if it exists.
    pub fn lookup(&self, name: &str) -> Option<Arc<Node>> {
        self.read_namespace().by_name.get(name).cloned()
    }

    /// The live file with id `id`, if it has not been unlinked.
    pub fn node(&self, id: NodeId) -> Option<Arc<Node>> {
        self.read_namespace().by_id.get(&id).cloned()
    }

    /// Every live file, ordered by name.
    pub fn list(&self) -> Vec<Arc<Node>> {
        self.read_namespace().by_name.values().cloned().collect()
    }

    /// Creates the file `name` (or returns it when it already exists).
    pub fn create(&self, name: &str) -> Result<Arc<Node>, StoreError> {
        let parsed = parse_name(name)?;
        let mut namespace = self.write_namespace();
        if let Some(existing) = namespace.by_name.get(name) {
            return Ok(existing.clone());
        }
        let db_dir = self.dbs_dir.join(&parsed.database);
        let new_database = !db_dir.exists();
        if new_database {
            std::fs::create_dir(&db_dir)
                .map_err(|source| StoreError::io(format!("create {}", db_dir.display()), source))?;
            self.mark_dir_dirty(&self.dbs_dir);
        }
        let capture = self.open_database(&parsed.database)?;
        if new_database {
            capture.recover(self.cluster.role())?;
        }
        let node = self.open_node(
            name,
            parsed.kind.clone(),
            &db_dir.join(parsed.kind.backing_name()),
            true,
            &capture,
        )?;
        self.mark_dir_dirty(&db_dir);
        namespace.by_id.insert(node.id, node.clone());
        namespace.by_name.insert(name.to_string(), node.clone());
        Ok(node)
    }

    /// Removes the file `name`; handles that have it open keep working.
    pub fn unlink(&self, name: &str) -> Result<Arc<Node>, StoreError> {
        let parsed = parse_name(name)?;
        let not_found = || StoreError::NotFound(name.to_string());
        // Syncing the log before a WAL goes away can wait on a commit and an
        // fsync: done before the namespace lock, so lookups never wait for it.
        let node = self.lookup(name).ok_or_else(not_found)?;
        node.database.before_change(&node.kind, None)?;
        let mut namespace = self.write_namespace();
        let node = namespace.by_name.get(name).cloned().ok_or_else(not_found)?;
        let db_dir = self.dbs_dir.join(&parsed.database);
        let backing = db_dir.join(parsed.kind.backing_name());
        // Cheap unless a commit came in meanwhile (or the name is a new file).
        node.database.before_change(&node.kind, None)?;
        std::fs::remove_file(&backing)
            .map_err(|source| StoreError::io(format!("remove {}", backing.display()), source))?;
        self.mark_dir_dirty(&db_dir);
        namespace.by_name.remove(name);
        namespace.by_id.remove(&node.id);
        drop(namespace);
        node.database.after_unlink(&node.kind)?;
        Ok(node)
    }

    /// Makes every create and unlink so far durable (SQLite's directory fsync, which
    /// `synchronous=EXTRA` uses to make a journal's deletion, the commit, durable).
    /// The change-set logs are synced first, so no commit is durable before its
    /// change set.
    pub fn sync_directories(&self) -> Result<(), StoreError> {
        let databases = self.all_databases();
        for database in databases {
            database.before_sync(None)?;
        }
        let dirs = std::mem::take(&mut *self.dirty_dirs.lock_unpoisoned());
        for dir in dirs.iter().rev() {
            File::open(dir)
                .and_then(|handle| handle.sync_all())
                .map_err(|source| StoreError::io(format!("fsync {}", dir.display()), source))?;
        }
        Ok(())
    }

    /// Free and total space of the backing filesystem, for `statfs`.
    pub fn backing_filesystem_stats(&self) -> Result<libc::statvfs, StoreError> {
        let path = std::ffi::CString::new(self.dbs_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| StoreError::io("statfs", io::Error::other("path contains NUL")))?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `path` is a valid NUL-terminated string and `stats` points to
        // writable memory of the right size.
        let rc = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
        if rc != 0 {
            return Err(StoreError::io("statfs", io::Error::last_os_error()));
        }
        // SAFETY: statvfs returned 0, so it filled the struct.
        Ok(unsafe { stats.assume_init() })
    }

    fn open_node(
        &self,
        name: &str,
        kind: FileKind,
        backing: &Path,
        create: bool,
        database: &Arc<Database>,
    ) -> Result<Arc<Node>, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(backing)
            .map_err(|source| StoreError::io(format!("open {}", backing.display()), source))?;
        let page_size = if kind == FileKind::Database {
            read_page_size(&file, name)?
        } else {
            0
        };
        let file = Arc::new(file);
        database.attach(&kind, &file)?;
        Ok(Arc::new(Node {
            id: NodeId(self.next_id.fetch_add(1, Ordering::Relaxed)),
            name: name.to_string(),
            kind,
            file,
            database: database.clone(),
            locks: LockTable::default(),
            page_size: AtomicU32::new(page_size),
            previous_page_size: AtomicU32::new(0),
        }))
    }

    fn mark_dir_dirty(&self, dir: &Path) {
        self.dirty_dirs.lock_unpoisoned().insert(dir.to_path_buf());
    }

    fn read_namespace(&self) -> std::sync::RwLockReadGuard<'_, Namespace> {
        self.namespace.read_unpoisoned()
    }

    fn write_namespace(&self) -> std::sync::RwLockWriteGuard<'_, Namespace> {
        self.namespace.write_unpoisoned()
    }
}

/// Reads the page size of an existing database file; 0 when it is empty.
fn read_page_size(file: &File, name: &str) -> Result<u32, StoreError> {
    let mut header = [0u8; 100];
    let mut filled = 0;
    while filled < header.len() {
        match file.read_at(&mut header[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(StoreError::io(format!("read header of {name}"), source)),
        }
    }
    if filled == 0 {
        return Ok(0);
    }
    page_size_from_header(&header[..filled]).map_err(|reason| StoreError::NotSqlite {
        name: name.to_string(),
        reason: format!("the stored file is damaged: {reason}"),
    })
}

/// What tests of the store and of its users share.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn page_one(page_size: u32) -> Vec<u8> {
        let mut page = vec![0u8; page_size as usize];
        page[..16].copy_from_slice(SQLITE_HEADER_MAGIC);
        let encoded = if page_size == 65536 {
            1
        } else {
            page_size as u16
        };
        page[16..18].copy_from_slice(&encoded.to_be_bytes());
        page
    }

    /// Synchronous replication with no replica connected: a commit stands
    /// alone while this node is the primary, and fails once it is not.
    pub(crate) struct NoReplica;

    impl CommitHold for NoReplica {
        fn wait_replicated(
            &self,
            _database: &str,
            _txid: TxId,
            still_primary: &dyn Fn() -> bool,
        ) -> Result<(), Unacknowledged> {
            if still_primary() {
                Ok(())
            } else {
                Err(Unacknowledged::NoLongerPrimary)
            }
        }
    }

    /// Commits a transaction in DELETE mode that writes `byte` into page 1;
    /// returns the mark taken before.
    pub(crate) fn commit_once(store: &Store, db: &Arc<Node>, byte: u8) -> CommitMark {
        let mark = store.commit_mark(db.database());
        let mut page = page_one(512);
        page[200] = byte;
        db.write_at(0, &page).unwrap();
        let journal = store.create("app.db-journal").unwrap();
        journal
            .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
            .unwrap();
        store.unlink("app.db-journal").unwrap();
        mark
    }

    /// [`commit_once`], then the hold that follows every commit of the mount.
    pub(crate) fn commit_and_hold(
        store: &Store,
        db: &Arc<Node>,
        byte: u8,
    ) -> Result<(), StoreError> {
        let mark = commit_once(store, db, byte);
        store.hold_commit(db.database(), mark)
    }
}

#[cfg(test)]
mod tests {
    use super::locks::{LockKind, LockRequest};
    use super::testing::*;
    use super::*;

    #[test]
    fn writes_in_pieces_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        for len in [0, 1, WRITE_PIECE_BYTES, 3 * WRITE_PIECE_BYTES + 7] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            write_all_at_in_pieces(&file, &bytes, 5).unwrap();
            let mut back = vec![0u8; len];
            file.read_exact_at(&mut back, 5).unwrap();
            assert_eq!(back, bytes, "{len} bytes");
        }
    }

    /// A WAL-mode `app.db` of one page, with its WAL begun (salts `salts`).
    fn wal_database(store: &Store, salts: (u32, u32)) -> Arc<Node> {
        let db = store.create("app.db").unwrap();
        db.write_at(0, &wal_mode_page_one(0)).unwrap();
        db.unlock_all(1);
        let wal = store.create("app.db-wal").unwrap();
        wal.write_at(0, &wal::testing::header(512, salts)).unwrap();
        db
    }

    fn wal_mode_page_one(byte: u8) -> Vec<u8> {
        let mut page = page_one(512);
        page[18..20].copy_from_slice(&[2, 2]);
        page[200] = byte;
        page
    }

    /// Writes, as the mount does, a WAL frame committing a changed page 1;
    /// returns the position before and after.
    fn commit_wal_frame(store: &Store, db: &Node, salts: (u32, u32)) -> (Position, Position) {
        let before = db.database().position();
        write_wal_frame(store, db, salts, 0, true);
        let captured = db.database().position();
        assert!(captured.txid > before.txid, "{captured:?}");
        (before, captured)
    }

    /// Writes, as the mount does, frame `index` of the WAL: page 1 changed,
    /// committing when `commit`.
    fn write_wal_frame(store: &Store, db: &Node, salts: (u32, u32), index: u64, commit: bool) {
        let page = wal_mode_page_one(index as u8 + 1);
        let frame = wal::testing::frame(1, u32::from(commit), salts, &page);
        let wal = store.lookup("app.db-wal").unwrap();
        let change = Change::File {
            name: "app.db-wal",
            kind: &FileKind::Wal,
        };
        let offset = wal::WAL_HEADER_SIZE + index * frame.len() as u64;
        store
            .make_change(db.database(), change, || wal.write_at(offset, &frame))
            .unwrap();
    }

    /// Regression: `-pos` showed a WAL commit from the moment its commit
    /// frame was written, before SQLite put it in the wal-index, so a reader
    /// that read `-pos` and then began a transaction could see the one before
    /// (`ltxfs export` then failed its checksum).
    #[test]
    fn a_wal_commit_is_visible_once_its_writer_releases_the_wal_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let salts = (11, 12);
        let db = wal_database(&store, salts);
        let shm = store.create("app.db-shm").unwrap();
        let lock = |owner, range, kind| LockRequest {
            owner,
            pid: 1,
            range,
            kind,
        };
        let writer = lock(7, capture::WAL_WRITE_LOCK, LockKind::Write);
        shm.locks().try_lock(writer).unwrap();
        let (before, captured) = commit_wal_frame(&store, &db, salts);
        assert_eq!(db.database().visible_position(), before);

        // A reader's lock coming and going publishes nothing while the
        // writer holds its lock.
        let reader = lock(8, ByteRange::new(123, 123).unwrap(), LockKind::Read);
        shm.locks().try_lock(reader).unwrap();
        shm.unlock(8, reader.range);
        assert_eq!(db.database().visible_position(), before);

        shm.unlock(7, capture::WAL_WRITE_LOCK);
        assert_eq!(db.database().visible_position(), captured);
    }

    /// The kernel's locks as a test sets them: whether a writer holds the
    /// WAL write lock.
    struct FakeKernelLocks(std::sync::atomic::AtomicBool);

    impl KernelLocks for FakeKernelLocks {
        fn is_write_locked(&self, _node: NodeId, range: ByteRange) -> bool {
            range == capture::WAL_WRITE_LOCK && self.0.load(Ordering::Acquire)
        }

        fn lock(&self, _: &str, _: ByteRange, _: bool) -> std::io::Result<Option<KernelLock>> {
            unreachable!("a primary takes no locks")
        }

        fn write(&self, _: &str, _: u64, _: &[u8]) -> std::io::Result<()> {
            unreachable!("a primary writes through SQLite's requests")
        }

        fn forget(&self, _: &str) {}
    }

    /// When the kernel serves the locks, no unlock reaches ltxfs: `-pos` asks
    /// the kernel whether the writer still holds the WAL write lock, and a
    /// later WAL write (whose writer holds that lock, so the first released
    /// it) shows the commit too.
    #[test]
    fn with_kernel_locks_a_wal_commit_is_visible_once_the_kernel_says_its_writer_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let options = CaptureOptions {
            locks: LockServer::Kernel,
            ..CaptureOptions::default()
        };
        let store = Store::open(dir.path(), options, Role::Primary).unwrap();
        let kernel = Arc::new(FakeKernelLocks(true.into()));
        store.set_kernel_locks(kernel.clone());
        let salts = (31, 32);
        let db = wal_database(&store, salts);
        store.create("app.db-shm").unwrap();
        let (before, captured) = commit_wal_frame(&store, &db, salts);
        assert_eq!(store.visible_position(db.database()), before);
        kernel.0.store(false, Ordering::Release);
        assert_eq!(store.visible_position(db.database()), captured);

        // The next transaction's first frame shows the one before it, even
        // while its own writer holds the lock.
        kernel.0.store(true, Ordering::Release);
        write_wal_frame(&store, &db, salts, 1, true);
        let second = db.database().position();
        assert!(second.txid > captured.txid);
        assert_eq!(store.visible_position(db.database()), captured);
        write_wal_frame(&store, &db, salts, 2, false);
        assert_eq!(store.visible_position(db.database()), second);
    }

    /// Without WAL-index locks (`locking_mode=EXCLUSIVE`) a WAL commit is
    /// visible as soon as it is captured: no other connection can read.
    #[test]
    fn a_wal_commit_without_wal_index_locks_is_visible_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let salts = (21, 22);
        let db = wal_database(&store, salts);
        let (_, captured) = commit_wal_frame(&store, &db, salts);
        assert_eq!(db.database().visible_position(), captured);
    }

    /// Regression: unlinking a WAL syncs the database's log first, which waits
    /// for the database's capture lock; it did so holding the namespace lock, so
    /// a slow commit or fsync stalled every lookup on the mount.
    #[test]
    fn unlinking_a_wal_does_not_hold_up_lookups_while_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let db = store.create("app.db").unwrap();
        db.write_at(0, &page_one(512)).unwrap();
        store.create("app.db-wal").unwrap();
        store.create("other.db").unwrap();
        let held = db.database().hold_capture_lock();
        let unlinking = std::thread::spawn({
            let store = store.clone();
            move || store.unlink("app.db-wal").map(|_| ())
        });
        // The unlink is now waiting for the capture lock.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (found, answered) = std::sync::mpsc::channel();
        std::thread::spawn({
            let store = store.clone();
            move || {
                let _ = found.send(store.lookup("other.db").is_some());
            }
        });
        let lookup = answered.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        assert_eq!(lookup, Ok(true), "a lookup waited for the unlink");
        unlinking.join().unwrap().unwrap();
        assert!(store.lookup("app.db-wal").is_none());
    }

    #[test]
    fn pos_file_text_parses_back_and_nothing_else_does() {
        let position = Position {
            txid: TxId(0x1d),
            checksum: crate::ltx::Checksum(0x8000_0000_0000_00ff),
        };
        let text = position.to_pos_file();
        assert_eq!(Position::from_pos_file(&text), Some(position));
        assert_eq!(Position::from_pos_file(text.trim_end()), Some(position));
        for bad in [
            "",
            "1d/ff\n",
            "000000000000001d\n",
            "000000000000001d/zz00000000000000\n",
        ] {
            assert_eq!(Position::from_pos_file(bad), None, "{bad:?}");
        }
    }

    /// Status output and metrics list the databases that exist: a deleted one
    /// keeps its position (replicas still need its last change set) but is
    /// left out, and shows up again when it is created anew.
    #[test]
    fn deleted_databases_are_left_out_of_existing_positions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let names = |positions: Vec<(String, Position)>| -> Vec<String> {
            positions.into_iter().map(|(name, _)| name).collect()
        };
        // A database created in one DELETE-mode transaction.
        let create = |name: &str| {
            let db = store.create(name).unwrap();
            db.write_at(0, &page_one(512)).unwrap();
            let journal = format!("{name}-journal");
            store
                .create(&journal)
                .unwrap()
                .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
                .unwrap();
            store.unlink(&journal).unwrap();
        };
        create("app.db");
        create("gone.db");
        assert_eq!(names(store.existing_positions()), ["app.db", "gone.db"]);
        store.unlink("gone.db").unwrap();
        assert_eq!(names(store.positions()), ["app.db", "gone.db"]);
        assert_eq!(names(store.existing_positions()), ["app.db"]);
        create("gone.db");
        assert_eq!(names(store.existing_positions()), ["app.db", "gone.db"]);
    }

    /// Regression: positions were read under the capture lock, which a commit,
    /// an apply or a snapshot for a new replica holds for long, so async code
    /// reading them (the proxy's `__txid`, replication streams) stalled the
    /// runtime that also renews the lease.
    #[test]
    fn positions_are_read_while_the_capture_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let db = store.create("app.db").unwrap();
        db.write_at(0, &page_one(512)).unwrap();
        let journal = store.create("app.db-journal").unwrap();
        journal
            .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
            .unwrap();
        store.unlink("app.db-journal").unwrap();
        let position = db.database().position();
        assert_eq!(position.txid.0, 1);
        let held = db.database().hold_capture_lock();
        let (read, answered) = std::sync::mpsc::channel();
        std::thread::spawn({
            let store = store.clone();
            move || {
                let _ = read.send(store.positions());
            }
        });
        let positions = answered.recv_timeout(std::time::Duration::from_secs(5));
        drop(held);
        assert_eq!(positions, Ok(vec![("app.db".to_string(), position)]));
    }

    fn not_replicated(result: Result<(), StoreError>) -> Option<TxId> {
        match result {
            Err(StoreError::NotReplicated { txid, .. }) => Some(txid),
            _ => None,
        }
    }

    /// Regression: a primary resumed after its lease ran out (a stopped
    /// process) acknowledged a commit as standing alone before its role loop
    /// demoted it; and when the kernel had split the commit's write, SQLite's
    /// retry of the rest committed nothing new and succeeded, so the
    /// application was told the failed commit was done.
    #[test]
    fn a_commit_past_the_lease_deadline_fails_and_so_does_every_later_change_of_its_term() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        store.set_commit_hold(Arc::new(NoReplica));
        let db = store.create("app.db").unwrap();
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        store.set_lease_deadline(later);
        commit_and_hold(&store, &db, 1).unwrap();

        store.set_lease_deadline(std::time::Instant::now());
        let held = commit_and_hold(&store, &db, 2);
        let failed = TxId(db.database().captured_txid());
        assert_eq!(not_replicated(held), Some(failed));
        // A later change, even with the lease renewed in the meantime, is
        // refused before it is made, but for the wal-index's.
        store.set_lease_deadline(later);
        let refused = store.permit_change("app.db-wal", &FileKind::Wal).map(drop);
        assert_eq!(not_replicated(refused), Some(failed));
        drop(store.permit_change("app.db-shm", &FileKind::Shm).unwrap());
        // Changes of a later term are not.
        store.set_role(Role::Replica);
        store.set_role(Role::Primary);
        let mark = store.commit_mark(db.database());
        store.hold_commit(db.database(), mark).unwrap();
        drop(store.permit_change("app.db-wal", &FileKind::Wal).unwrap());
    }

    /// A commit held while the node is demoted and promoted again would wait
    /// for an acknowledgement of the earlier term, which replicas that already
    /// have the transaction never send, keeping SQLite's write lock (the likely
    /// cause of a fault-suite run whose cluster stopped accepting writes).
    #[test]
    fn a_commit_of_an_earlier_term_is_not_acknowledged_in_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        store.set_commit_hold(Arc::new(NoReplica));
        let db = store.create("app.db").unwrap();
        let mark = commit_once(&store, &db, 1);
        store.set_role(Role::Replica);
        store.set_role(Role::Primary);
        let committed = TxId(db.database().captured_txid());
        assert_eq!(
            not_replicated(store.hold_commit(db.database(), mark)),
            Some(committed)
        );
    }

    /// Blocks in its first write until told to go on, after saying so.
    struct GateWriter {
        entered: Option<std::sync::mpsc::Sender<()>>,
        release: std::sync::mpsc::Receiver<()>,
        written: Vec<u8>,
    }

    impl io::Write for GateWriter {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
                let _ = self.release.recv();
            }
            self.written.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Regression: a snapshot for a new replica (or a backup) was encoded under
    /// the database's capture lock, so commits waited for the whole database to
    /// be read and written out.
    #[test]
    fn commits_go_on_while_a_snapshot_is_written() {
        // Compacted from the log's short history, and copied from the content.
        for max_history in [log::MAX_HISTORY_FOR_SNAPSHOT, 0] {
            commits_go_on_while_a_snapshot_is_written_with(max_history);
        }
    }

    fn commits_go_on_while_a_snapshot_is_written_with(max_history: u64) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let db = store.create("app.db").unwrap();
        let commit = {
            let (store, db) = (store.clone(), db.clone());
            move |fill: u8| {
                let journal = store.create("app.db-journal").unwrap();
                journal
                    .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
                    .unwrap();
                let mut page = page_one(512);
                page[200] = fill;
                db.write_at(0, &page).unwrap();
                db.write_at(512, &[fill; 512]).unwrap();
                store.unlink("app.db-journal").unwrap();
            }
        };
        commit(1);
        commit(2);
        let before = db.database().position();
        let (entered, writing) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel();
        let snapshot = std::thread::spawn({
            let database = db.database().clone();
            move || {
                let mut out = GateWriter {
                    entered: Some(entered),
                    release: released,
                    written: Vec::new(),
                };
                let position = database
                    .write_snapshot_with(&mut out, max_history, &mut || {})
                    .unwrap();
                (position, out.written)
            }
        });
        writing.recv().unwrap();
        // The snapshot is being written out: a commit must not wait for it.
        let (committed, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            commit(3);
            let _ = committed.send(());
        });
        let result = done.recv_timeout(std::time::Duration::from_secs(5));
        release.send(()).unwrap();
        let (position, bytes) = snapshot.join().unwrap();
        assert_eq!(result, Ok(()), "a commit waited for a snapshot");
        assert_eq!(
            position, before,
            "the snapshot is of the position it started at"
        );
        let mut decoder = crate::ltx::Decoder::new(bytes.as_slice()).unwrap();
        assert!(decoder.header().is_snapshot());
        assert_eq!(decoder.header().max_txid, before.txid);
        let mut page = vec![0u8; 512];
        while decoder.next_page_into(&mut page).unwrap().is_some() {}
        assert_eq!(
            decoder.finish().unwrap().post_apply_checksum,
            before.checksum
        );
    }

    /// Regression: a snapshot of a database with a long history was read under
    /// the capture lock from the first page to the last, so commits (and, on
    /// async threads, everything that read a position) waited for it. It is now
    /// copied a chunk at a time; what is committed between chunks, a database
    /// that grows, and a transaction still in flight at the end are taken in.
    #[test]
    fn a_snapshot_copied_in_chunks_takes_in_what_was_committed_meanwhile() {
        const PAGE: u32 = 512;
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let db = store.create("app.db").unwrap();
        let write = |pgno: u32, fill: u8| {
            let page = if pgno == 1 {
                let mut page = page_one(PAGE);
                page[200] = fill;
                page
            } else {
                vec![fill; PAGE as usize]
            };
            db.write_at(u64::from(pgno - 1) * u64::from(PAGE), &page)
                .unwrap();
        };
        let begin = || {
            store
                .create("app.db-journal")
                .unwrap()
                .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
                .unwrap();
        };
        let commit = || {
            store.unlink("app.db-journal").unwrap();
        };
        let pages = 3 * capture::history::SNAPSHOT_CHUNK_PAGES - 24;
        begin();
        for pgno in 1..=pages {
            write(pgno, 1);
        }
        commit();
        // A history after the log's base snapshot, which the snapshot does not
        // compact from (`max_history` 0).
        begin();
        write(2, 5);
        commit();
        let mut chunks_copied = 0;
        let mut in_flight = None;
        let mut encoded = Vec::new();
        let position = db
            .database()
            .write_snapshot_with(&mut encoded, 0, &mut || {
                chunks_copied += 1;
                match chunks_copied {
                    // Pages already copied and pages not yet copied change.
                    1 => {
                        begin();
                        for pgno in [1, 3, pages - 10] {
                            write(pgno, 2);
                        }
                        commit();
                    }
                    // The database grows.
                    2 => {
                        begin();
                        for pgno in pages + 1..=pages + 100 {
                            write(pgno, 3);
                        }
                        commit();
                    }
                    // A transaction that changes an already copied page is
                    // still in flight when the last chunk is copied; it
                    // commits a little later.
                    _ => {
                        begin();
                        write(3, 4);
                        let store = store.clone();
                        in_flight = Some(std::thread::spawn(move || {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            store.unlink("app.db-journal").unwrap();
                        }));
                    }
                }
            })
            .unwrap();
        in_flight.expect("a third chunk").join().unwrap();
        assert_eq!(chunks_copied, 3);
        assert_eq!(position, db.database().position());

        let copy = tempfile::tempfile().unwrap();
        let applied = crate::ltx::apply(encoded.as_slice(), &copy, None).unwrap();
        assert_eq!(applied.post_apply_checksum, position.checksum);
        let mut content = vec![0u8; ((pages + 100) * PAGE) as usize];
        copy.read_exact_at(&mut content, 0).unwrap();
        assert!(
            content == db.read_at(0, content.len()).unwrap(),
            "the snapshot differs from the database"
        );
        assert_eq!(content[PAGE as usize], 5);
        assert_eq!(content[2 * PAGE as usize], 4);
    }

    /// Regression (found by the fault suite, on a primary whose disk filled):
    /// a change set that could not be logged left its pages' checksums in the
    /// page checksums, so the next change set left those pages out while its
    /// checksum counted them, and every replica refused it.
    #[test]
    fn a_change_set_that_cannot_be_logged_leaves_the_next_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let db = store.create("app.db").unwrap();
        let commit = |pages: &[(u32, u8)]| {
            let journal = store.create("app.db-journal").unwrap();
            journal
                .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
                .unwrap();
            for &(pgno, fill) in pages {
                let page = if pgno == 1 {
                    let mut page = page_one(512);
                    page[200] = fill;
                    page
                } else {
                    vec![fill; 512]
                };
                db.write_at(u64::from(pgno - 1) * 512, &page).unwrap();
            }
            store.unlink("app.db-journal")
        };
        commit(&[(1, 1), (2, 1), (3, 1)]).unwrap();
        db.database().fail_log_appends(true);
        assert!(commit(&[(2, 2)]).is_err(), "the change set was logged");
        db.database().fail_log_appends(false);
        commit(&[(3, 3)]).unwrap();

        let copy = tempfile::tempfile().unwrap();
        let mut checksum = None;
        let log = dir.path().join("dbs/app.db/log");
        for set in log::read_change_sets(&log).unwrap() {
            checksum = Some(
                crate::ltx::apply(set.as_slice(), &copy, checksum)
                    .expect("every logged change set applies")
                    .post_apply_checksum,
            );
        }
        assert_eq!(checksum, Some(db.database().position().checksum));
        let mut content = vec![0u8; 3 * 512];
        copy.read_exact_at(&mut content, 0).unwrap();
        assert!(content == db.read_at(0, 3 * 512).unwrap());
        assert_eq!((content[512], content[1024]), (2, 3));
    }

    #[test]
    fn database_writes_must_be_sqlite_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let db = store.create("app.db").unwrap();
        assert!(matches!(
            db.write_at(0, b"hello world"),
            Err(StoreError::NotSqlite { .. })
        ));
        assert!(matches!(
            db.write_at(4096, &[0u8; 100]),
            Err(StoreError::NotSqlite { .. })
        ));
        // A spilled page before page 1 is accepted when it has the shape of a page.
        db.write_at(8192, &[0u8; 4096]).unwrap();
        db.write_at(0, &page_one(4096)).unwrap();
        db.write_at(4096, &[7u8; 4096]).unwrap();
        assert!(matches!(
            db.write_at(4096, &[7u8; 100]),
            Err(StoreError::NotSqlite { .. })
        ));
        assert!(matches!(
            db.truncate(5000),
            Err(StoreError::NotSqlite { .. })
        ));
        db.truncate(4096).unwrap();
        assert_eq!(db.metadata().unwrap().len(), 4096);
    }

    #[test]
    fn companions_take_any_bytes_and_files_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
            store
                .create("app.db")
                .unwrap()
                .write_at(0, &page_one(512))
                .unwrap();
            store
                .create("app.db-wal")
                .unwrap()
                .write_at(3, b"abc")
                .unwrap();
        }
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let names: Vec<_> = store.list().iter().map(|n| n.name().to_string()).collect();
        assert_eq!(names, vec!["app.db", "app.db-wal"]);
        let db = store.lookup("app.db").unwrap();
        db.write_at(512, &[1u8; 512]).unwrap();
        assert_eq!(
            store.lookup("app.db-wal").unwrap().read_at(0, 10).unwrap(),
            b"\0\0\0abc"
        );
    }

    #[test]
    fn unlinked_node_stays_readable_and_name_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let journal = store.create("app.db-journal").unwrap();
        journal.write_at(0, b"journal").unwrap();
        let removed = store.unlink("app.db-journal").unwrap();
        assert_eq!(removed.id(), journal.id());
        assert!(store.lookup("app.db-journal").is_none());
        assert!(store.node(journal.id()).is_none());
        assert_eq!(journal.read_at(0, 7).unwrap(), b"journal");
        let again = store.create("app.db-journal").unwrap();
        assert_ne!(again.id(), journal.id());
        store.sync_directories().unwrap();
    }
}
