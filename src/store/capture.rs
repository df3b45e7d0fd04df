//! Change capture: turns every committed SQLite transaction on a database into one
//! LTX change set in the database's log, and keeps the database's position.
//!
//! The commit moments, as SQLite defines them:
//! - Rollback journal modes: the journal is invalidated — deleted (DELETE),
//!   truncated to zero (TRUNCATE) or its header zeroed (PERSIST, and any mode under
//!   `locking_mode=EXCLUSIVE`). Without a journal (MEMORY, OFF) the transaction
//!   ends when the writer drops its RESERVED lock and no hot journal exists.
//! - WAL: a frame whose header has a non-zero commit size has been written.
//!   SQLite may still give such a transaction up (its fsync failed): it then
//!   writes the next frame over it, and a change set restores what it changed.
//!
//! Pages written to the database file since the last commit are remembered; at the
//! commit they are read back and compared with their checksums, so pages SQLite
//! wrote back unchanged (a rolled-back transaction, a checkpoint) produce nothing,
//! and a transaction that changed nothing produces no change set.
//!
//! Invariants:
//! - `position.checksum` always equals the checksum of the database's logical
//!   content (database file plus committed WAL frames) as of the last change set,
//!   kept incrementally from per-page checksums; the whole database is reread only
//!   at start-up after a crash (or per transaction with `strict-verify`).
//! - TXIDs increase by one per change set, with no gaps. The first change set of a
//!   database is a snapshot holding every page.
//! - If the content differs from the log at start-up (a crash between a commit
//!   and its log append), the difference is recorded as one recovery change set
//!   holding every page, so the log always replays to the database.

mod apply;
pub(super) mod history;

pub use apply::{AppliedChangeSet, ChangeSetBytes, LoggedChangeSet, ReceivedChangeSet};
pub use history::CatchUp;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ltx::{self, Checksum, Encoder, Header, TxId};

use super::locks::LockServer;
use super::log::{ChangeLog, LtxBytes, RetentionPolicy};
use super::wal::{self, FRAME_HEADER_SIZE, FrameHeader, WalHeader};
use super::{FileKind, NodeId, Shared, StoreError, page_size_from_header};
use crate::sync::{LockUnpoisoned, RwLockUnpoisoned};

/// The first eight bytes of a valid rollback journal header.
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
/// Marks the file that saves per-page checksums at a clean shutdown.
const CHECKSUMS_MAGIC: &[u8; 8] = b"LTXFSCK1";

/// Where a database stands: its last change set's TXID and post-apply checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The TXID of the last change set; 0 before the first.
    pub txid: TxId,
    /// The database checksum after it.
    pub checksum: Checksum,
}

impl Position {
    /// No known position: a replica here needs a snapshot.
    pub const UNKNOWN: Position = Position {
        txid: TxId(0),
        checksum: Checksum(0),
    };

    /// The 34-byte text LiteFS serves in `<db>-pos`: `%016x/%016x\n`.
    pub fn to_pos_file(&self) -> String {
        format!("{:016x}/{:016x}\n", self.txid.0, self.checksum.0)
    }

    /// Parses what [`Position::to_pos_file`] writes (the newline optional);
    /// `None` for anything else.
    pub fn from_pos_file(text: &str) -> Option<Position> {
        let hex = |field: &str| {
            (field.len() == 16)
                .then(|| u64::from_str_radix(field, 16).ok())
                .flatten()
        };
        let (txid, checksum) = text.strip_suffix('\n').unwrap_or(text).split_once('/')?;
        Some(Position {
            txid: TxId(hex(txid)?),
            checksum: Checksum(hex(checksum)?),
        })
    }
}

/// Where a change set's transaction sits in the WAL (LTX header fields), so that
/// after a power failure a change set the log lost can be rebuilt from the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WalSpan {
    offset: u64,
    size: u64,
    salt1: u32,
    salt2: u32,
}

/// Capture settings.
#[derive(Debug, Clone, Copy)]
pub struct CaptureOptions {
    /// Record change sets at all. Off only to measure what capture costs
    /// (`ltxfs mount --no-capture`, used by `ltxfs bench`).
    pub enabled: bool,
    /// LZ4-compress page blocks.
    pub compress: bool,
    /// Reread the whole database after each change set and compare checksums.
    pub strict_verify: bool,
    /// Who serves SQLite's locks, which decides how a transaction of a
    /// journal-less mode (MEMORY, OFF) is seen to end.
    pub locks: LockServer,
}

impl Default for CaptureOptions {
    fn default() -> CaptureOptions {
        CaptureOptions {
            enabled: true,
            compress: false,
            strict_verify: false,
            // A store without a mount (the library's own tests and tools)
            // has no kernel to serve its locks.
            locks: LockServer::Ltxfs,
        }
    }
}

/// One database's capture state, shared by the nodes of its files.
pub struct Database {
    name: String,
    dir: PathBuf,
    position_file_id: NodeId,
    options: CaptureOptions,
    shared: Arc<Shared>,
    state: Mutex<CaptureState>,
    /// The TXID of the last transaction captured here (0 before the first): a
    /// change that moves it committed a transaction, which synchronous
    /// replication holds until a replica has it.
    captured_txid: AtomicU64,
    /// Held while retention compacts the log, without the capture lock.
    compacting: Mutex<()>,
    /// A copy of `CaptureState::position` and `commit`, set with the
    /// position, so that they are read without the capture lock, which a
    /// commit, an apply or a snapshot holds for long (async code must never
    /// wait on the store).
    published: std::sync::RwLock<(Position, u32)>,
    /// What the `-pos` file shows: the position every read transaction begun
    /// from now on sees at least, which trails a WAL commit's capture until
    /// SQLite has published it in the wal-index.
    visibility: Mutex<Visibility>,
}

/// The position readers can see, next to a WAL commit they may not see yet.
///
/// SQLite writes a WAL transaction's commit frame (the moment of capture),
/// syncs the WAL, writes the wal-index header that readers begin from, and
/// only then releases the WAL write lock (byte [`WAL_WRITE_LOCK`] of `-shm`).
/// A captured WAL commit is therefore visible once no connection holds that
/// lock; every other position is visible when it is set (a rollback-mode
/// writer keeps readers out until its commit is done, and a replica applies
/// with readers kept out).
#[derive(Debug, Clone, Copy)]
struct Visibility {
    visible: Position,
    /// The newest captured WAL commit not yet known to be visible.
    pending: Option<Position>,
}

/// The byte of `-shm` SQLite's WAL writer locks for the whole of a write
/// transaction (`WALINDEX_LOCK_OFFSET`, SQLite's `WAL_WRITE_LOCK`).
pub(super) const WAL_WRITE_LOCK: super::locks::ByteRange = super::locks::ByteRange {
    start: 120,
    end: 120,
};

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct CaptureState {
    log: ChangeLog,
    position: Position,
    page_size: u32,
    /// Size in pages after the last change set.
    commit: u32,
    /// Page checksums of the logical content, index `pgno - 1`; 0 for the lock page.
    page_checksums: Vec<u64>,
    /// XOR of `page_checksums` (without the flag bit).
    checksum_xor: u64,
    /// The committed page 1 says the database is in WAL mode.
    wal_mode: bool,
    /// Database-file pages written since the last rollback-mode commit.
    dirty_pages: BTreeSet<u32>,
    /// The database file was truncated since the last rollback-mode commit.
    truncated: bool,
    /// A journal-less transaction was seen to end with the database file's
    /// fsync (`synchronous` above OFF), so a write of page 1 no longer counts
    /// as the start of the next one: such a writer may spill page 1 in the
    /// middle of a transaction.
    journal_less_commits_sync: bool,
    /// A change set not derived from the WAL was appended since the log was last
    /// synced; such change sets must be on disk before SQLite's next fsync.
    unsynced_outside_wal: bool,
    /// The state must be recomputed from the file before the next change set
    /// (start-up found a hot journal that SQLite has yet to roll back).
    needs_rescan: bool,
    wal: WalTracker,
    /// The log lost its history (it was damaged and set aside): the next change
    /// set is a snapshot of every page, whatever its TXID.
    snapshot_next: bool,
    database_file: Option<Arc<File>>,
    /// Page size in the database file's header, as last written (0 when empty).
    file_page_size: u32,
    wal_file: Option<Arc<File>>,
    journal_file: Option<Arc<File>>,
}

#[derive(Default)]
struct WalTracker {
    header: Option<WalHeader>,
    /// Frames of this generation whose page has been written: 0..frames_written.
    frames_written: u64,
    /// Pages of the transaction being written: pgno → page data offset.
    transaction: BTreeMap<u32, u64>,
    /// Committed pages of this WAL generation: pgno → page data offset.
    committed: BTreeMap<u32, u64>,
    /// Byte offset just past the last committed frame of this generation.
    committed_end: u64,
    /// The last frame header written whole by a write of its own, and its
    /// offset: SQLite writes a frame's header and then its page, so when the
    /// page's write completes the frame, its header need not be read back.
    /// Dropped when a later write overlaps it in part.
    last_frame_header: Option<(u64, [u8; FRAME_HEADER_SIZE as usize])>,
}

/// The bytes of the write being captured, at their offset in the file.
#[derive(Clone, Copy)]
struct Written<'a> {
    offset: u64,
    data: &'a [u8],
}

impl<'a> Written<'a> {
    /// The `len` bytes at `offset` of the file, when this write holds them
    /// all.
    fn range(&self, offset: u64, len: u64) -> Option<&'a [u8]> {
        let start = usize::try_from(offset.checked_sub(self.offset)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.data.get(start..end)
    }
}

impl WalTracker {
    fn reset(&mut self) {
        *self = WalTracker::default();
    }

    /// Keeps a frame header that `written` wrote whole and alone, and drops
    /// the one kept if `written` overlaps it otherwise.
    fn note_frame_header_write(&mut self, header: &WalHeader, written: Written<'_>) {
        let end = written.offset + written.data.len() as u64;
        if let Some((at, _)) = self.last_frame_header
            && written.offset < at + FRAME_HEADER_SIZE
            && at < end
        {
            self.last_frame_header = None;
        }
        let frame_size = FRAME_HEADER_SIZE + u64::from(header.page_size);
        let is_frame_header = written.data.len() as u64 == FRAME_HEADER_SIZE
            && written.offset >= wal::WAL_HEADER_SIZE
            && (written.offset - wal::WAL_HEADER_SIZE) % frame_size == 0;
        if is_frame_header && let Ok(bytes) = written.data.try_into() {
            self.last_frame_header = Some((written.offset, bytes));
        }
    }
}

impl Database {
    /// Opens a database's capture state from its directory, recovering after a crash.
    pub(super) fn open(
        name: &str,
        dir: &Path,
        options: CaptureOptions,
        position_file_id: NodeId,
        shared: Arc<Shared>,
    ) -> Result<Database, StoreError> {
        let (mut log, tail) = ChangeLog::open(&dir.join("log"))?;
        // A log damaged in the middle was set aside: the content is recorded
        // again as a snapshot after every TXID the old log used, so no TXID is
        // ever reused for other content.
        let damage = log.take_damage();
        let position = match (&damage, tail) {
            (Some(damage), _) => Position {
                txid: damage.last_txid,
                checksum: Checksum(0),
            },
            (None, Some(tail)) => Position {
                txid: tail.header.max_txid,
                checksum: tail.trailer.post_apply_checksum,
            },
            (None, None) => Position::UNKNOWN,
        };
        let state = CaptureState {
            log,
            position,
            page_size: tail.map_or(0, |tail| tail.header.page_size),
            commit: tail.map_or(0, |tail| tail.header.commit),
            page_checksums: Vec::new(),
            checksum_xor: 0,
            wal_mode: false,
            dirty_pages: BTreeSet::new(),
            truncated: false,
            journal_less_commits_sync: false,
            needs_rescan: true,
            unsynced_outside_wal: false,
            wal: WalTracker::default(),
            snapshot_next: damage.is_some(),
            database_file: None,
            file_page_size: 0,
            wal_file: None,
            journal_file: None,
        };
        Ok(Database {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            position_file_id,
            options,
            shared,
            published: std::sync::RwLock::new((state.position, state.commit)),
            visibility: Mutex::new(Visibility {
                visible: state.position,
                pending: None,
            }),
            state: Mutex::new(state),
            captured_txid: AtomicU64::new(0),
            compacting: Mutex::new(()),
        })
    }

    /// The TXID of the last transaction captured on this node, 0 before the first.
    pub fn captured_txid(&self) -> u64 {
        self.captured_txid.load(Ordering::Acquire)
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the database's `-pos` file.
    pub fn position_file_id(&self) -> NodeId {
        self.position_file_id
    }

    /// The last change set's TXID and checksum. Never waits for a commit, an
    /// apply or a snapshot.
    pub fn position(&self) -> Position {
        self.published.read_unpoisoned().0
    }

    /// False once the last change set deleted the database (or before the
    /// first). Never waits, like [`Database::position`].
    pub fn exists(&self) -> bool {
        let (position, commit) = *self.published.read_unpoisoned();
        position.txid.0 > 0 && commit > 0
    }

    /// The position every read transaction begun from now on sees at least:
    /// what the `-pos` file shows. It trails [`Database::position`] while a
    /// WAL writer is between capture and the end of its commit. Never waits,
    /// like [`Database::position`].
    pub fn visible_position(&self) -> Position {
        self.visibility.lock_unpoisoned().visible
    }

    /// Moves the position, and the copies read without the capture lock:
    /// [`Database::position`] (with the size in pages the state has by then)
    /// and [`Database::visible_position`].
    fn set_position(&self, state: &mut CaptureState, position: Position) {
        self.move_position(state, position);
        *self.visibility.lock_unpoisoned() = Visibility {
            visible: position,
            pending: None,
        };
    }

    /// [`Database::set_position`] for a commit captured from a WAL frame, which
    /// readers see once [`Database::publish_wal_commit`] says so.
    fn set_wal_commit_position(&self, state: &mut CaptureState, position: Position) {
        self.move_position(state, position);
        self.visibility.lock_unpoisoned().pending = Some(position);
    }

    fn move_position(&self, state: &mut CaptureState, position: Position) {
        state.position = position;
        *self.published.write_unpoisoned() = (position, state.commit);
    }

    /// Whether a captured WAL commit waits for [`Database::publish_wal_commit`].
    pub(super) fn has_unpublished_wal_commit(&self) -> bool {
        self.visibility.lock_unpoisoned().pending.is_some()
    }

    /// Makes the captured WAL commits visible unless `writer_holds_lock` says a
    /// connection holds the WAL write lock of the database's `-shm` (it never
    /// does without one, as with `locking_mode=EXCLUSIVE`, where no other
    /// connection can read). Asked under the visibility lock, which a capture
    /// takes after its writer took the WAL write lock, so a commit captured
    /// meanwhile is never published early.
    pub(super) fn publish_wal_commit(&self, writer_holds_lock: impl FnOnce() -> bool) {
        let mut visibility = self.visibility.lock_unpoisoned();
        if visibility.pending.is_none() || writer_holds_lock() {
            return;
        }
        if let Some(position) = visibility.pending.take() {
            visibility.visible = position;
        }
    }

    /// Brings the state in line with the files after they were all attached at
    /// start-up: loads saved checksums after a clean shutdown, or rescans.
    pub(super) fn recover(&self, role: super::Role) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        if role == super::Role::Replica {
            return self.repair_replica();
        }
        let mut state = self.lock();
        if state.hot_journal() {
            tracing::info!(database = %self.name, "a hot journal is present; checking the database after SQLite rolls it back");
            return Ok(());
        }
        if let Some(saved) = self.load_saved_checksums(&state) {
            state.apply_saved_checksums(saved);
        } else {
            self.rescan(&mut state)?;
        }
        // No connection is open at start-up: WAL commits replayed from the
        // WAL are what readers will see.
        self.publish_wal_commit(|| false);
        Ok(())
    }

    /// Registers the backing file of one of the database's files.
    pub(super) fn attach(&self, kind: &FileKind, file: &Arc<File>) -> Result<(), StoreError> {
        let mut state = self.lock();
        match kind {
            FileKind::Database => {
                state.database_file = Some(file.clone());
                state.file_page_size = state.read_file_page_size();
            }
            FileKind::Journal => state.journal_file = Some(file.clone()),
            FileKind::Wal => {
                state.wal_file = Some(file.clone());
                state.wal.reset();
                let committed = wal::read_committed(file)
                    .map_err(|source| io_error(&self.name, "read the WAL", source))?;
                state.wal.header = committed.header;
                state.wal.committed = committed.pages();
                state.wal.committed_end = committed.end();
            }
            FileKind::Shm | FileKind::SuperJournal(_) => {}
        }
        Ok(())
    }

    /// Called after bytes were written to one of the database's files.
    pub(super) fn after_write(
        &self,
        kind: &FileKind,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        let result = self.capture_write(&mut state, kind, offset, data);
        state.rescan_after_failure(&result);
        result
    }

    fn capture_write(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        kind: &FileKind,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        match kind {
            FileKind::Database => state.note_database_write(offset, data),
            FileKind::Journal => {
                if offset == 0 && data.len() >= 8 && data[..8].iter().all(|&b| b == 0) {
                    self.commit_rollback(state)?;
                }
            }
            FileKind::Wal => {
                // A WAL write past the captured commits comes from a writer
                // that holds the WAL write lock, so the writer of those commits
                // released it: readers see them. The kernel tells ltxfs of no
                // unlock when it serves the locks, so this is where they show.
                if self.options.locks == LockServer::Kernel && offset >= state.wal.committed_end {
                    self.publish_wal_commit(|| false);
                }
                self.note_wal_write(state, offset, data)?;
            }
            FileKind::Shm | FileKind::SuperJournal(_) => {}
        }
        Ok(())
    }

    /// Called after one of the database's files was truncated.
    pub(super) fn after_truncate(&self, kind: &FileKind, size: u64) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        let result = match kind {
            FileKind::Database if size == 0 || !state.wal_mode => {
                if size == 0 {
                    state.file_page_size = 0;
                }
                state.truncated = true;
                // SQLite cuts the file to the database's size after a commit
                // (VACUUM) or as a journal-less commit's last change; with no
                // unlock to tell, the truncation ends what it belongs to.
                if self.ends_journal_less_transaction(&state, kind) {
                    self.commit_rollback(&mut state)
                } else {
                    Ok(())
                }
            }
            FileKind::Journal if size == 0 => self.commit_rollback(&mut state),
            FileKind::Wal if size == 0 => {
                state.wal.reset();
                Ok(())
            }
            _ => Ok(()),
        };
        state.rescan_after_failure(&result);
        result
    }

    /// Called after one of the database's files was unlinked.
    pub(super) fn after_unlink(&self, kind: &FileKind) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        let result = self.capture_unlink(&mut state, kind);
        state.rescan_after_failure(&result);
        result
    }

    fn capture_unlink(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        kind: &FileKind,
    ) -> Result<(), StoreError> {
        match kind {
            FileKind::Journal => {
                state.journal_file = None;
                self.commit_rollback(state)?;
            }
            FileKind::Wal => {
                state.wal_file = None;
                state.wal.reset();
            }
            FileKind::Database => {
                state.database_file = None;
                state.dirty_pages.clear();
                state.truncated = false;
                state.needs_rescan = false;
                state.file_page_size = 0;
                if state.commit > 0 || state.position.txid.0 > 0 {
                    let page_size = state.page_size.max(512);
                    self.emit(state, page_size, 0, &[], None)?;
                }
            }
            FileKind::Shm | FileKind::SuperJournal(_) => {}
        }
        Ok(())
    }

    /// Called after a lock on the database file was released: a transaction in a
    /// journal-less mode (MEMORY, OFF) ends when no writer lock remains.
    pub(super) fn after_unlock(&self, writer_lock_held: bool) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        if writer_lock_held
            || (state.dirty_pages.is_empty() && !state.truncated)
            || state.hot_journal()
        {
            return Ok(());
        }
        let result = self.commit_rollback(&mut state);
        state.rescan_after_failure(&result);
        result
    }

    /// Called before SQLite's fsync of one of the database's files (`file`, the
    /// kind of file; `None` for the directory), so change sets are durable no
    /// later than the transactions they record. When the kernel serves the
    /// locks, the database file's fsync while no journal is hot ends a
    /// transaction of a journal-less mode (MEMORY, OFF): SQLite syncs the
    /// database once every page of the transaction is written.
    pub(super) fn before_sync(&self, file: Option<&FileKind>) -> Result<(), StoreError> {
        let mut state = self.lock();
        if file.is_some_and(|kind| self.ends_journal_less_transaction(&state, kind)) {
            state.journal_less_commits_sync = true;
            let result = self.commit_rollback(&mut state);
            state.rescan_after_failure(&result);
            result?;
        }
        // Change sets built from WAL frames need no sync here: the WAL that SQLite
        // is making durable holds them, and start-up rebuilds any the log lost
        // (`replay_wal_transactions`). The log is synced before the WAL can lose
        // them (`before_change`).
        if std::mem::take(&mut state.unsynced_outside_wal) {
            if let Err(error) = state.log.sync() {
                state.unsynced_outside_wal = true;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Whether a change to the database file of `kind` shows, when the kernel
    /// serves the locks, that a journal-less transaction's pages are all
    /// written: no journal is hot, pages were written since the last change
    /// set, and the database is not in WAL mode.
    fn ends_journal_less_transaction(&self, state: &CaptureState, kind: &FileKind) -> bool {
        self.options.enabled
            && self.options.locks == LockServer::Kernel
            && *kind == FileKind::Database
            && !state.wal_mode
            && (!state.dirty_pages.is_empty() || state.truncated)
            && !state.hot_journal()
    }

    /// Called before a write, truncate or unlink of one of the database's files:
    /// syncs the log first when the change would destroy WAL frames that change
    /// sets not yet on disk could have to be rebuilt from — a new WAL header (the
    /// WAL restarts), a truncated or deleted WAL, or a checkpoint writing WAL
    /// content into the database file (after which the content before those
    /// transactions could no longer be read back).
    pub(super) fn before_change(
        &self,
        kind: &FileKind,
        write_offset: Option<u64>,
    ) -> Result<(), StoreError> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut state = self.lock();
        // A journal-less transaction writes page 1 first (SQLite writes its
        // pages in order, and page 1 holds the change counter every
        // transaction moves), so with the kernel serving the locks and
        // `synchronous=OFF` a write of page 1 after unrecorded ones begins
        // the next transaction: the previous one is recorded before page 1 is
        // overwritten. Not exact: a transaction larger than SQLite's cache
        // may write page 1 early, and is then recorded in two parts.
        if write_offset == Some(0)
            && !state.journal_less_commits_sync
            && self.ends_journal_less_transaction(&state, kind)
        {
            let result = self.commit_rollback(&mut state);
            state.rescan_after_failure(&result);
            result?;
        }
        let destroys_wal_frames = match kind {
            FileKind::Wal => write_offset.is_none_or(|offset| offset == 0),
            FileKind::Database => state.wal_mode,
            _ => false,
        };
        if destroys_wal_frames {
            state.log.sync()?;
            state.unsynced_outside_wal = false;
        }
        Ok(())
    }

    /// Merges change sets the retention policy no longer keeps; returns how many.
    pub(super) fn enforce_retention(&self, policy: RetentionPolicy) -> Result<usize, StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        // One compaction at a time; commits wait for the database's lock only
        // while the plan is made and while the merged change set is put in place,
        // not while it is merged (the whole database, for a base snapshot).
        let _one_at_a_time = self.compacting.lock_unpoisoned();
        let Some(plan) = self.lock().log.plan_compaction(policy, now)? else {
            return Ok(0);
        };
        let merged = plan.merge(self.options.compress)?;
        self.lock().log.finish_compaction(merged)
    }

    /// Saves per-page checksums so the next start need not reread the database.
    pub(super) fn save_checksums(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.log.sync()?;
        if state.needs_rescan || state.hot_journal() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(32 + state.page_checksums.len() * 8);
        bytes.extend_from_slice(CHECKSUMS_MAGIC);
        bytes.extend_from_slice(&state.position.txid.0.to_be_bytes());
        bytes.extend_from_slice(&state.position.checksum.0.to_be_bytes());
        bytes.extend_from_slice(&state.page_size.to_be_bytes());
        bytes.extend_from_slice(&state.commit.to_be_bytes());
        for checksum in &state.page_checksums {
            bytes.extend_from_slice(&checksum.to_be_bytes());
        }
        let path = self.dir.join("checksums");
        std::fs::write(&path, &bytes)
            .and_then(|()| File::open(&path)?.sync_all())
            .map_err(|source| io_error(&self.name, "save checksums", source))
    }

    fn load_saved_checksums(&self, state: &CaptureState) -> Option<Vec<u64>> {
        let path = self.dir.join("checksums");
        let bytes = std::fs::read(&path).ok()?;
        // The file describes one moment; never trust it after anything changed.
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(%error, "could not remove the saved checksums");
            return None;
        }
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
        };
        let half = |at: usize| {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()))
        };
        if bytes.get(..8)? != CHECKSUMS_MAGIC
            || word(8)? != state.position.txid.0
            || word(16)? != state.position.checksum.0
            || half(24)? != state.page_size
            || half(28)? != state.commit
            || bytes.len() != 32 + state.commit as usize * 8
        {
            return None;
        }
        let checksums: Vec<u64> = (0..state.commit as usize)
            .filter_map(|i| word(32 + i * 8))
            .collect();
        let xor = checksums.iter().fold(0, |acc, c| acc ^ c);
        (Checksum(xor | Checksum::FLAG) == state.position.checksum
            || (state.commit == 0 && state.position.txid.0 == 0))
            .then_some(checksums)
    }

    /// Rereads the logical content, and records any difference from the log as one
    /// recovery change set (or the first snapshot).
    fn rescan(&self, state: &mut MutexGuard<'_, CaptureState>) -> Result<(), StoreError> {
        state.needs_rescan = false;
        let Some((page_size, commit)) = state.logical_size()? else {
            // No database content: nothing to record unless the log says otherwise.
            if state.commit > 0 {
                let page_size = state.page_size.max(512);
                self.emit(state, page_size, 0, &[], None)?;
            }
            return Ok(());
        };
        let lock_page = ltx::lock_page_number(page_size);
        let checksums = state.page_checksums_of_content(page_size, commit)?;
        let xor = checksums.iter().fold(0, |acc, c| acc ^ c);
        let actual = Checksum(xor | Checksum::FLAG);
        if state.position.txid.0 > 0
            && actual == state.position.checksum
            && page_size == state.page_size
            && commit == state.commit
        {
            state.page_checksums = checksums;
            state.checksum_xor = xor;
            state.refresh_wal_mode()?;
            return Ok(());
        }
        if state.position.txid.0 > 0 && !state.snapshot_next {
            if self.replay_wal_transactions(state)? {
                return Ok(());
            }
            tracing::warn!(
                database = %self.name,
                txid = %state.position.txid,
                "the database holds changes its log lacks (ltxfs stopped between a commit and recording it); recording them as one change set of every page"
            );
        }
        let all_pages: Vec<u32> = (1..=commit).filter(|&p| p != lock_page).collect();
        self.emit_pages(state, page_size, commit, &all_pages, None, None)?;
        state.refresh_wal_mode()?;
        Ok(())
    }

    /// Rebuilds, one per transaction, the change sets the log lost in a power
    /// failure from the WAL transactions that follow the log's last change set.
    /// Returns false, changing nothing, when the WAL and the log do not line up that
    /// way (the caller then records the difference as one change set).
    fn replay_wal_transactions(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
    ) -> Result<bool, StoreError> {
        let Some(wal_file) = state.wal_file.clone() else {
            return Ok(false);
        };
        let wal = wal::read_committed(&wal_file)
            .map_err(|source| io_error(&self.name, "read the WAL", source))?;
        let Some(header) = wal.header else {
            return Ok(false);
        };
        // The WAL transactions the log already holds: up to the end of the last
        // change set's span when it belongs to this WAL generation, else none (the
        // log was synced before this generation began).
        let last = state.log.records().last().map(|record| record.header);
        let logged = match last {
            Some(last)
                if last.wal_size > 0
                    && (last.wal_salt1, last.wal_salt2) == (header.salt1, header.salt2) =>
            {
                let end = last.wal_offset + last.wal_size;
                match wal
                    .transactions
                    .iter()
                    .position(|transaction| transaction.end == end)
                {
                    Some(index) => index + 1,
                    None => return Ok(false),
                }
            }
            _ => 0,
        };
        if logged == wal.transactions.len() {
            return Ok(false);
        }
        // The content at the log's position: the database file and the frames of
        // the transactions already logged.
        let full_committed = std::mem::take(&mut state.wal.committed);
        state.wal.transaction.clear();
        for transaction in &wal.transactions[..logged] {
            state
                .wal
                .committed
                .extend(transaction.pages.iter().map(|(&p, &o)| (p, o)));
        }
        let size = match logged {
            0 => state.database_file_size()?,
            _ => Some((header.page_size, wal.transactions[logged - 1].commit)),
        };
        let matches = match size {
            Some((page_size, commit)) if page_size == state.page_size && commit == state.commit => {
                let checksums = state.page_checksums_of_content(page_size, commit)?;
                let xor = checksums.iter().fold(0, |acc, c| acc ^ c);
                let matches = Checksum(xor | Checksum::FLAG) == state.position.checksum;
                if matches {
                    state.page_checksums = checksums;
                    state.checksum_xor = xor;
                }
                matches
            }
            _ => false,
        };
        if !matches {
            state.wal.committed = full_committed;
            return Ok(false);
        }
        let lock_page = ltx::lock_page_number(header.page_size);
        let replayed = wal.transactions.len() - logged;
        for transaction in &wal.transactions[logged..] {
            state
                .wal
                .committed
                .extend(transaction.pages.iter().map(|(&p, &o)| (p, o)));
            let candidates: Vec<u32> = transaction
                .pages
                .keys()
                .copied()
                .filter(|&p| p <= transaction.commit && p != lock_page)
                .collect();
            let span = WalSpan {
                offset: transaction.start,
                size: transaction.end - transaction.start,
                salt1: header.salt1,
                salt2: header.salt2,
            };
            self.emit_pages(
                state,
                header.page_size,
                transaction.commit,
                &candidates,
                Some(span),
                None,
            )?;
        }
        state.wal.header = Some(header);
        state.wal.committed_end = wal.end();
        state.refresh_wal_mode()?;
        tracing::warn!(
            database = %self.name,
            replayed,
            txid = %state.position.txid,
            "rebuilt change sets the log lost from the WAL"
        );
        Ok(true)
    }

    fn commit_rollback(&self, state: &mut MutexGuard<'_, CaptureState>) -> Result<(), StoreError> {
        if state.needs_rescan {
            state.dirty_pages.clear();
            state.truncated = false;
            return self.rescan(state);
        }
        if state.dirty_pages.is_empty() && !state.truncated {
            return Ok(());
        }
        let dirty = std::mem::take(&mut state.dirty_pages);
        state.truncated = false;
        let Some((page_size, commit)) = state.database_file_size()? else {
            return Ok(());
        };
        let lock_page = ltx::lock_page_number(page_size);
        if page_size != state.page_size || state.position.txid.0 == 0 || state.snapshot_next {
            let all_pages: Vec<u32> = (1..=commit).filter(|&p| p != lock_page).collect();
            self.emit_pages(state, page_size, commit, &all_pages, None, None)?;
        } else {
            let candidates: Vec<u32> = dirty
                .into_iter()
                .filter(|&p| p <= commit && p != lock_page)
                .collect();
            self.emit_pages(state, page_size, commit, &candidates, None, None)?;
        }
        state.refresh_wal_mode()
    }

    /// Follows SQLite's WAL writes. The kernel may split one write into several
    /// requests at page-cache boundaries, so frames are recognised by their last
    /// byte: when a write covers the end of a frame, that frame (header and page)
    /// is complete in the file, because SQLite writes each frame front to back.
    ///
    /// When a transaction writes a page twice, SQLite overwrites the earlier frame's
    /// page in place and writes the later frames with zero salts and checksums;
    /// at the commit it rewrites those frames' headers, the commit frame's last. So
    /// a header-only write to a frame already written counts as completing it too.
    fn note_wal_write(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        if offset == 0 {
            state.wal.reset();
            state.wal.header = WalHeader::parse(data);
            state.wal.committed_end = wal::WAL_HEADER_SIZE;
            return Ok(());
        }
        let Some(header) = state.wal.header else {
            return Ok(());
        };
        let frame_size = FRAME_HEADER_SIZE + u64::from(header.page_size);
        let end = offset + data.len() as u64;
        if end <= wal::WAL_HEADER_SIZE {
            return Ok(());
        }
        if offset < state.wal.committed_end {
            self.retract_wal_commits(state, &header, offset)?;
        }
        let written = Written { offset, data };
        state.wal.note_frame_header_write(&header, written);
        let first = (offset.max(wal::WAL_HEADER_SIZE) - wal::WAL_HEADER_SIZE) / frame_size;
        let last = (end - wal::WAL_HEADER_SIZE - 1) / frame_size;
        for index in first..=last {
            let frame_offset = header.frame_offset(index);
            let frame_end = frame_offset + frame_size;
            let header_end = frame_offset + FRAME_HEADER_SIZE;
            let completes_frame = offset < frame_end && frame_end <= end;
            let rewrites_header = offset < header_end
                && header_end <= end
                && frame_end > end
                && index < state.wal.frames_written;
            if completes_frame {
                state.wal.frames_written = state.wal.frames_written.max(index + 1);
            }
            if completes_frame || rewrites_header {
                self.note_wal_frame(state, &header, frame_offset, written)?;
            }
        }
        Ok(())
    }

    /// SQLite writes a frame before the end of what was captured as committed
    /// in this WAL generation only when, for it, those transactions never
    /// committed: the fsync after their commit frame failed, or their writer
    /// died before publishing them in the wal-index. The captured transactions
    /// from `offset` on are already logged (and maybe replicated), so their
    /// pages' content before them is recorded as a change set of its own: the
    /// log again replays to what SQLite reads.
    fn retract_wal_commits(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        header: &WalHeader,
        offset: u64,
    ) -> Result<(), StoreError> {
        let Some(wal_file) = state.wal_file.clone() else {
            return Ok(());
        };
        let mut committed = wal::read_committed(&wal_file)
            .map_err(|source| io_error(&self.name, "read the WAL", source))?;
        committed
            .transactions
            .retain(|transaction| transaction.end <= offset);
        let kept_end = committed.end();
        let commit = match committed.commit() {
            Some(commit) => commit,
            None => state.database_file_size()?.map_or(0, |(_, pages)| pages),
        };
        let lock_page = ltx::lock_page_number(header.page_size);
        let reverted: Vec<u32> = state
            .wal
            .committed
            .iter()
            .filter(|&(&pgno, &page_offset)| {
                page_offset >= kept_end && pgno <= commit && pgno != lock_page
            })
            .map(|(&pgno, _)| pgno)
            .collect();
        tracing::warn!(
            database = %self.name,
            txid = %state.position.txid,
            wal_offset = kept_end,
            "SQLite did not commit the last captured WAL transactions (their fsync \
             failed, or their writer died before publishing them); recording the \
             content they changed as it was before them"
        );
        state.wal.committed = committed.pages();
        state.wal.committed_end = kept_end;
        state.wal.transaction.clear();
        let frame_size = FRAME_HEADER_SIZE + u64::from(header.page_size);
        state.wal.frames_written = (kept_end - wal::WAL_HEADER_SIZE) / frame_size;
        self.emit_pages(state, header.page_size, commit, &reverted, None, None)
    }

    /// Notes the frame at `frame_offset`, which `written` (the write being
    /// captured) completed or whose header it rewrote.
    fn note_wal_frame(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        header: &WalHeader,
        frame_offset: u64,
        written: Written<'_>,
    ) -> Result<(), StoreError> {
        let Some(wal_file) = state.wal_file.clone() else {
            return Ok(());
        };
        let mut frame_header = [0u8; FRAME_HEADER_SIZE as usize];
        if let Some(bytes) = written.range(frame_offset, FRAME_HEADER_SIZE) {
            frame_header.copy_from_slice(bytes);
        } else if let Some((_, bytes)) = state
            .wal
            .last_frame_header
            .filter(|&(at, _)| at == frame_offset)
        {
            frame_header = bytes;
        } else if !wal::read_exact_at(&wal_file, &mut frame_header, frame_offset)
            .map_err(|source| io_error(&self.name, "read the WAL", source))?
        {
            return Ok(());
        }
        let Some(frame) = FrameHeader::parse(&frame_header).filter(|frame| frame.matches(header))
        else {
            return Ok(());
        };
        state
            .wal
            .transaction
            .insert(frame.pgno, frame_offset + FRAME_HEADER_SIZE);
        if frame.commit == 0 {
            return Ok(());
        }
        let transaction = std::mem::take(&mut state.wal.transaction);
        state
            .wal
            .committed
            .extend(transaction.iter().map(|(&pgno, &offset)| (pgno, offset)));
        let frame_end = frame_offset + FRAME_HEADER_SIZE + u64::from(header.page_size);
        let span = WalSpan {
            offset: state.wal.committed_end,
            size: frame_end - state.wal.committed_end,
            salt1: header.salt1,
            salt2: header.salt2,
        };
        state.wal.committed_end = frame_end;
        if state.needs_rescan {
            return self.rescan(state);
        }
        let commit = frame.commit;
        let lock_page = ltx::lock_page_number(header.page_size);
        // The commit frame's page is the last frame of its page number in
        // the transaction, so what the change set holds for that page.
        let in_hand = written
            .range(
                frame_offset + FRAME_HEADER_SIZE,
                u64::from(header.page_size),
            )
            .map(|bytes| (frame.pgno, bytes));
        if header.page_size != state.page_size || state.position.txid.0 == 0 {
            let all_pages: Vec<u32> = (1..=commit).filter(|&p| p != lock_page).collect();
            self.emit_pages(
                state,
                header.page_size,
                commit,
                &all_pages,
                Some(span),
                in_hand,
            )?;
        } else {
            let candidates: Vec<u32> = transaction
                .into_keys()
                .filter(|&p| p <= commit && p != lock_page)
                .collect();
            self.emit_pages(
                state,
                header.page_size,
                commit,
                &candidates,
                Some(span),
                in_hand,
            )?;
        }
        state.wal_mode = true;
        Ok(())
    }

    /// Reads `candidates` (pages that may have changed), keeps those whose checksum
    /// changed, and appends a change set unless nothing changed at all.
    /// `in_hand`: a page number and its content, which need not be read.
    fn emit_pages(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        page_size: u32,
        commit: u32,
        candidates: &[u32],
        wal_span: Option<WalSpan>,
        in_hand: Option<(u32, &[u8])>,
    ) -> Result<(), StoreError> {
        let full =
            page_size != state.page_size || state.position.txid.0 == 0 || state.snapshot_next;
        let mut undo = ChecksumsUndo {
            txid: state.position.txid,
            all: (full || commit == 0).then(|| state.page_checksums.clone()),
            len: state.page_checksums.len(),
            cut: state
                .page_checksums
                .get(commit as usize..)
                .map(<[u64]>::to_vec)
                .unwrap_or_default(),
            xor: state.checksum_xor,
            page_size: state.page_size,
            changed: Vec::new(),
        };
        if full {
            state.page_checksums.clear();
            state.checksum_xor = 0;
            state.page_size = page_size;
        }
        // Pages past the recorded size are new content, written or not (a file
        // SQLite grew by writing only its last page holds zeros there); after a
        // full reset nothing is recorded, so that is every page.
        let lock_page = ltx::lock_page_number(page_size);
        let recorded = state.page_checksums.len() as u32;
        let mut candidates: BTreeSet<u32> = candidates.iter().copied().collect();
        candidates.extend((recorded + 1..=commit).filter(|&pgno| pgno != lock_page));
        let mut changed: Vec<(u32, Vec<u8>)> = Vec::new();
        for pgno in candidates {
            let mut page = vec![0u8; page_size as usize];
            match in_hand {
                Some((in_hand_pgno, bytes))
                    if in_hand_pgno == pgno && bytes.len() == page.len() =>
                {
                    page.copy_from_slice(bytes)
                }
                _ => state.read_logical_page(pgno, page_size, &mut page)?,
            }
            let checksum = ltx::page_checksum(pgno, &page).0;
            let old = state
                .page_checksums
                .get(pgno as usize - 1)
                .copied()
                .unwrap_or(0);
            if full || checksum != old {
                changed.push((pgno, page));
            }
        }
        if !full && changed.is_empty() && commit == state.commit {
            return Ok(());
        }
        // Pages cut off by a shrink leave the checksum; new pages enter it.
        let removed = state
            .page_checksums
            .iter()
            .skip(commit as usize)
            .fold(0, |acc, c| acc ^ c);
        state.checksum_xor ^= removed;
        state.page_checksums.resize(commit as usize, 0);
        for (pgno, page) in &changed {
            let slot = *pgno as usize - 1;
            let checksum = ltx::page_checksum(*pgno, page).0;
            undo.changed.push((slot, state.page_checksums[slot]));
            state.checksum_xor ^= state.page_checksums[slot] ^ checksum;
            state.page_checksums[slot] = checksum;
        }
        let emitted = self.emit(state, page_size, commit, &changed, wal_span);
        if emitted.is_err() && state.position.txid == undo.txid {
            // Nothing was logged: the checksums go back to the logged content,
            // which the next change set is computed against.
            undo.restore(state);
        }
        emitted
    }

    /// Encodes and appends one change set whose pages are already folded into the
    /// page checksums, then advances the position.
    fn emit(
        &self,
        state: &mut MutexGuard<'_, CaptureState>,
        page_size: u32,
        commit: u32,
        pages: &[(u32, Vec<u8>)],
        wal_span: Option<WalSpan>,
    ) -> Result<(), StoreError> {
        if commit == 0 {
            state.page_checksums.clear();
            state.checksum_xor = 0;
        }
        let txid = TxId(state.position.txid.0 + 1);
        let snapshot = txid.0 == 1 || state.snapshot_next;
        let post_apply = Checksum(state.checksum_xor | Checksum::FLAG);
        let header = Header {
            flags: if self.options.compress {
                ltx::FLAG_COMPRESS_LZ4
            } else {
                0
            },
            page_size,
            commit,
            min_txid: if snapshot { TxId(1) } else { txid },
            max_txid: txid,
            timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
            pre_apply_checksum: if snapshot {
                Checksum(0)
            } else {
                state.position.checksum
            },
            wal_offset: wal_span.map_or(0, |span| span.offset),
            wal_size: wal_span.map_or(0, |span| span.size),
            wal_salt1: wal_span.map_or(0, |span| span.salt1),
            wal_salt2: wal_span.map_or(0, |span| span.salt2),
            // The epoch never goes back within a log: change sets rebuilt at
            // start-up, before the lease is known, keep the last logged epoch.
            node_id: self.shared.epoch().max(
                state
                    .log
                    .records()
                    .last()
                    .map_or(0, |record| record.header.node_id),
            ),
        };
        let encode_error = |error: ltx::LtxError| StoreError::Capture {
            database: self.name.clone(),
            message: error.to_string(),
        };
        let mut encoder = Encoder::new(
            Vec::with_capacity(pages.len() * (page_size as usize + 4) + 200),
            header,
        )
        .map_err(encode_error)?;
        for (pgno, page) in pages {
            encoder.encode_page(*pgno, page).map_err(encode_error)?;
        }
        encoder.finish(post_apply).map_err(encode_error)?;
        let bytes = encoder.into_inner();
        state.log.append(header, LtxBytes::Memory(&bytes))?;
        if wal_span.is_none() {
            state.unsynced_outside_wal = true;
        }
        state.commit = commit;
        let position = Position {
            txid,
            checksum: post_apply,
        };
        if wal_span.is_some() {
            self.set_wal_commit_position(state, position);
        } else {
            self.set_position(state, position);
        }
        state.snapshot_next = false;
        state.page_size = page_size;
        if self.options.strict_verify {
            self.verify_strictly(state)?;
        }
        self.captured_txid.store(txid.0, Ordering::Release);
        self.shared.notify(&self.name);
        Ok(())
    }

    fn verify_strictly(&self, state: &mut MutexGuard<'_, CaptureState>) -> Result<(), StoreError> {
        let Some((page_size, commit)) = state.logical_size()? else {
            return Ok(());
        };
        let checksums = state.page_checksums_of_content(page_size, commit)?;
        let xor = checksums.iter().fold(0, |acc, c| acc ^ c);
        let actual = Checksum(xor | Checksum::FLAG);
        if actual != state.position.checksum || commit != state.commit {
            let stale: Vec<usize> = checksums
                .iter()
                .zip(&state.page_checksums)
                .enumerate()
                .filter(|(_, (actual, recorded))| actual != recorded)
                .map(|(index, _)| index + 1)
                .take(16)
                .collect();
            return Err(StoreError::Capture {
                database: self.name.clone(),
                message: format!(
                    "strict-verify: after TXID {} the position checksum is {} over {} pages but the database gives {} over {} pages; pages whose recorded checksum differs: {stale:?}",
                    state.position.txid, state.position.checksum, state.commit, actual, commit
                ),
            });
        }
        Ok(())
    }

    /// Makes appends to the log fail, as on a full disk (tests only).
    #[cfg(test)]
    pub(super) fn fail_log_appends(&self, fail: bool) {
        self.lock().log.fail_appends = fail;
    }

    /// Holds the capture lock, as a long commit would (tests only).
    #[cfg(test)]
    pub(super) fn hold_capture_lock(&self) -> MutexGuard<'_, impl Sized> {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.state.lock_unpoisoned()
    }
}

/// What [`Database::emit_pages`] changed in the page checksums before it tried
/// to log the change set, to put back when that fails.
struct ChecksumsUndo {
    /// The position before.
    txid: TxId,
    /// Every checksum, when all were replaced (a full change set, a deletion).
    all: Option<Vec<u64>>,
    /// How many checksums there were.
    len: usize,
    /// The checksums of the pages a shrink cut off.
    cut: Vec<u64>,
    xor: u64,
    page_size: u32,
    /// Each changed slot and its checksum before.
    changed: Vec<(usize, u64)>,
}

impl ChecksumsUndo {
    fn restore(self, state: &mut CaptureState) {
        if let Some(all) = self.all {
            state.page_checksums = all;
        } else {
            for &(slot, old) in self.changed.iter().rev() {
                state.page_checksums[slot] = old;
            }
            let kept = self.len - self.cut.len();
            state.page_checksums.truncate(kept);
            state.page_checksums.extend_from_slice(&self.cut);
        }
        state.checksum_xor = self.xor;
        state.page_size = self.page_size;
    }
}

impl CaptureState {
    /// After a failed capture the log may lack a committed transaction: reread the
    /// database at the next commit so the difference is recorded.
    fn rescan_after_failure(&mut self, result: &Result<(), StoreError>) {
        if let Err(error) = result {
            tracing::error!(%error, "change capture failed; the next commit rereads the database");
            self.needs_rescan = true;
        }
    }

    fn note_database_write(&mut self, offset: u64, data: &[u8]) {
        // In WAL mode the database file is only written by checkpoints, which copy
        // content already captured from the WAL, except for page 1 switching the
        // database back to (or into) a rollback journal mode inside a journaled
        // transaction.
        let leaves_or_enters_wal =
            offset == 0 && data.len() > 18 && (data[18] == 1 || !self.wal_mode);
        if self.wal_mode && !leaves_or_enters_wal {
            return;
        }
        if offset == 0 {
            if let Ok(size) = page_size_from_header(data) {
                self.file_page_size = size;
            }
        }
        let page_size = self.file_page_size;
        if page_size == 0 {
            return;
        }
        let first = offset / u64::from(page_size) + 1;
        let last = (offset + data.len() as u64).div_ceil(u64::from(page_size));
        self.dirty_pages
            .extend((first..=last).map(|pgno| pgno as u32));
    }

    fn read_file_page_size(&self) -> u32 {
        let mut header = [0u8; 100];
        match &self.database_file {
            Some(file) if wal::read_exact_at(file, &mut header, 0).unwrap_or(false) => {
                page_size_from_header(&header).unwrap_or(0)
            }
            _ => 0,
        }
    }

    fn hot_journal(&self) -> bool {
        let mut magic = [0u8; 8];
        match &self.journal_file {
            Some(file) => {
                wal::read_exact_at(file, &mut magic, 0).unwrap_or(false) && magic == JOURNAL_MAGIC
            }
            None => false,
        }
    }

    fn apply_saved_checksums(&mut self, checksums: Vec<u64>) {
        self.checksum_xor = checksums.iter().fold(0, |acc, c| acc ^ c);
        self.page_checksums = checksums;
        self.needs_rescan = false;
        if let Err(error) = self.refresh_wal_mode() {
            tracing::warn!(%error, "could not read page 1");
        }
    }

    /// Page size and page count of the database file alone (rollback modes).
    fn database_file_size(&self) -> Result<Option<(u32, u32)>, StoreError> {
        let Some(file) = &self.database_file else {
            return Ok(None);
        };
        let size = file
            .metadata()
            .map_err(|source| io_error("database", "stat", source))?
            .len();
        let page_size = self.file_page_size;
        if size == 0 || page_size == 0 {
            return Ok(None);
        }
        Ok(Some((page_size, (size / u64::from(page_size)) as u32)))
    }

    /// Page size and page count of the logical content: the newest committed WAL
    /// commit size when the WAL has committed frames, else the database file.
    fn logical_size(&self) -> Result<Option<(u32, u32)>, StoreError> {
        if let (Some(wal_file), Some(header)) = (&self.wal_file, self.wal.header) {
            let committed = wal::read_committed(wal_file)
                .map_err(|source| io_error("database", "read the WAL", source))?;
            if let Some(commit) = committed.commit() {
                return Ok(Some((header.page_size, commit)));
            }
        }
        self.database_file_size()
    }

    /// Reads a page of the logical content: its newest WAL frame, else the file.
    fn read_logical_page(
        &self,
        pgno: u32,
        page_size: u32,
        page: &mut [u8],
    ) -> Result<(), StoreError> {
        let in_transaction = self.wal.transaction.get(&pgno).copied();
        self.read_page(pgno, page_size, page, in_transaction)
    }

    /// Page `pgno` as the last committed WAL transaction left it (the frames of
    /// one being written are not read), or from the database file; zeros past
    /// its end.
    fn read_committed_page(
        &self,
        pgno: u32,
        page_size: u32,
        page: &mut [u8],
    ) -> Result<(), StoreError> {
        self.read_page(pgno, page_size, page, None)
    }

    /// Reads page `pgno` from the WAL at `wal_offset`, else from the committed
    /// WAL frames, else from the database file.
    fn read_page(
        &self,
        pgno: u32,
        page_size: u32,
        page: &mut [u8],
        wal_offset: Option<u64>,
    ) -> Result<(), StoreError> {
        let wal_offset = wal_offset
            .as_ref()
            .or_else(|| self.wal.committed.get(&pgno));
        let (file, offset) = match (wal_offset, &self.wal_file) {
            (Some(&offset), Some(wal_file)) => (wal_file, offset),
            _ => match &self.database_file {
                Some(file) => (file, u64::from(pgno - 1) * u64::from(page_size)),
                None => {
                    page.fill(0);
                    return Ok(());
                }
            },
        };
        page.fill(0);
        let mut filled = 0;
        while filled < page.len() {
            match file.read_at(&mut page[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(io_error("database", "read a page", source)),
            }
        }
        Ok(())
    }

    /// The page checksums of the logical content's pages 1..=commit (0 for the
    /// lock page), read through [`CaptureState::read_logical_page`].
    fn page_checksums_of_content(
        &self,
        page_size: u32,
        commit: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let lock_page = ltx::lock_page_number(page_size);
        let mut page = vec![0u8; page_size as usize];
        let mut checksums = vec![0u64; commit as usize];
        for pgno in (1..=commit).filter(|&p| p != lock_page) {
            self.read_logical_page(pgno, page_size, &mut page)?;
            checksums[pgno as usize - 1] = ltx::page_checksum(pgno, &page).0;
        }
        Ok(checksums)
    }

    fn refresh_wal_mode(&mut self) -> Result<(), StoreError> {
        if self.page_size == 0 {
            return Ok(());
        }
        let mut page = vec![0u8; self.page_size as usize];
        self.read_logical_page(1, self.page_size, &mut page)?;
        self.wal_mode = page.get(18) == Some(&2);
        Ok(())
    }
}

fn io_error(database: &str, what: &str, source: std::io::Error) -> StoreError {
    StoreError::Io {
        context: format!("{what} of {database}"),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_holds_only_the_ranges_it_covers_whole() {
        let data: Vec<u8> = (0..100).collect();
        let written = Written {
            offset: 1000,
            data: &data,
        };
        assert_eq!(written.range(1000, 100), Some(&data[..]));
        assert_eq!(written.range(1010, 5), Some(&data[10..15]));
        assert_eq!(written.range(999, 10), None, "starts before the write");
        assert_eq!(written.range(1095, 10), None, "ends after the write");
        assert_eq!(written.range(u64::MAX, 2), None);
    }

    #[test]
    fn a_frame_header_is_kept_until_a_write_overlaps_it() {
        let header = WalHeader::parse(&wal::testing::header(512, (7, 8))).unwrap();
        let frame_bytes: Vec<u8> = (0..FRAME_HEADER_SIZE as u8).collect();
        let second_frame = header.frame_offset(1);
        let mut tracker = WalTracker::default();

        // Alone, at a frame's start: kept.
        let write = |offset, data| Written { offset, data };
        tracker.note_frame_header_write(&header, write(second_frame, &frame_bytes));
        assert_eq!(
            tracker
                .last_frame_header
                .map(|(at, bytes)| (at, bytes.to_vec())),
            Some((second_frame, frame_bytes.clone()))
        );
        // The frame's page, after it: the header stays.
        tracker.note_frame_header_write(
            &header,
            write(second_frame + FRAME_HEADER_SIZE, &[0u8; 512]),
        );
        assert!(tracker.last_frame_header.is_some());
        // 24 bytes that are not at a frame's start are not a frame header, and
        // overlapping the kept one, drop it.
        tracker.note_frame_header_write(&header, write(second_frame + 4, &frame_bytes));
        assert_eq!(tracker.last_frame_header, None);
    }
}
