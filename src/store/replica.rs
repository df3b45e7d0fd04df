//! Applying the primary's change sets on a replica while local processes read.
//!
//! Readers are kept out only while pages are written locally, never while a change
//! set travels the network: the caller hands over a complete change set, which is
//! decoded and verified before any lock is taken. ltxfs then takes, for itself,
//! the SQLite locks every reader needs — in WAL mode the wal-index read marks and
//! writer locks in `-shm`, in rollback modes the database file's PENDING, RESERVED
//! and SHARED bytes — with priority over new readers, so a stream of short read
//! transactions cannot starve it. The locks are in the files' lock tables, or,
//! when the kernel serves the locks, the kernel's (`KernelLocks`), where the
//! priority comes from SQLite's own protocol: PENDING taken first in rollback
//! modes, a wal-index marked as being rebuilt in WAL mode
//! (`keep_wal_readers_out`). A reader that finds them taken gets `SQLITE_BUSY`
//! and retries within its busy timeout, as it would behind a local writer.
//!
//! Before the locks are released the kernel's cached pages of the database are
//! dropped and, in WAL mode, the wal-index header is advanced, so every reader's
//! next transaction sees the new content and drops its own page cache.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::locks::{ByteRange, LockKind, LockOwner, LockRequest};
use super::log::ChangeLog;
use super::wal::{WAL_INDEX_FIRST_IS_INIT, WAL_INDEX_PREFIX, wal_index_after_apply};
use super::{
    AppliedChangeSet, ChangeSetBytes, FileKind, KernelLock, KernelLocks, LoggedChangeSet, Node,
    PENDING_BYTE, POSITION_SUFFIX, ReceivedChangeSet, Role, Store, StoreError, parse_name,
};
use crate::sync::LockUnpoisoned;

/// The lock owner ltxfs itself uses. Kernel lock owners are hashed pointers, so
/// this value does not collide with an application's.
pub const LTXFS_LOCK_OWNER: LockOwner = u64::MAX;

/// The wal-index locks every WAL-mode reader and writer takes in `-shm`: the
/// writer, checkpointer and recovery locks and the five read marks. The "DMS" byte
/// after them, which connections hold for as long as they are open, is left alone.
const WAL_INDEX_LOCKS: ByteRange = ByteRange {
    start: 120,
    end: 127,
};

/// The writer, checkpointer and recovery locks of the wal-index, which
/// readers take only to rebuild the index.
const WAL_WRITER_LOCKS: ByteRange = ByteRange {
    start: 120,
    end: 122,
};

/// The five read marks, one of which every WAL reader holds while it reads.
const WAL_READ_MARKS: ByteRange = ByteRange {
    start: 123,
    end: 127,
};

/// The rollback-mode locks of the database file: PENDING, RESERVED and the SHARED
/// range that every reader locks.
const DATABASE_LOCKS: ByteRange = ByteRange {
    start: PENDING_BYTE,
    end: PENDING_BYTE + 511,
};

/// A lock ltxfs holds on a file until dropped: in the file's lock table, or
/// in the kernel's when the kernel serves the locks.
enum HeldByLtxfs {
    Table {
        node: Arc<Node>,
        range: ByteRange,
    },
    Kernel {
        _lock: KernelLock,
    },
    /// The kernel serves the locks but the mount is not up: no process can
    /// hold any.
    Unmounted,
}

impl HeldByLtxfs {
    /// Blocks until ltxfs holds an exclusive lock on each of `ranges` of
    /// `node`, taken in order.
    fn take(
        locks: &ApplyLocks,
        node: &Arc<Node>,
        ranges: &[ByteRange],
    ) -> Result<Vec<HeldByLtxfs>, StoreError> {
        ranges
            .iter()
            .map(|&range| match locks {
                ApplyLocks::Table => {
                    node.locks().lock_with_priority(LockRequest {
                        owner: LTXFS_LOCK_OWNER,
                        pid: 0,
                        range,
                        kind: LockKind::Write,
                    });
                    Ok(HeldByLtxfs::Table {
                        node: node.clone(),
                        range,
                    })
                }
                ApplyLocks::Unmounted => Ok(HeldByLtxfs::Unmounted),
                ApplyLocks::Kernel(locks) => match locks.lock(node.name(), range, true) {
                    Ok(Some(held)) => Ok(HeldByLtxfs::Kernel { _lock: held }),
                    Ok(None) => Err(StoreError::io(
                        format!("lock {} for an apply", node.name()),
                        std::io::Error::from(std::io::ErrorKind::WouldBlock),
                    )),
                    Err(source) => Err(StoreError::io(
                        format!("lock {} for an apply", node.name()),
                        source,
                    )),
                },
            })
            .collect()
    }

    /// Takes the locks if nobody else holds any part of them, no priority
    /// waiter is queued for them, and (kernel) ltxfs has a descriptor open.
    fn try_take(
        locks: &ApplyLocks,
        node: &Arc<Node>,
        ranges: &[ByteRange],
    ) -> Option<Vec<HeldByLtxfs>> {
        ranges
            .iter()
            .map(|&range| match locks {
                ApplyLocks::Table => {
                    node.locks()
                        .try_lock(LockRequest {
                            owner: LTXFS_LOCK_OWNER,
                            pid: 0,
                            range,
                            kind: LockKind::Write,
                        })
                        .ok()?;
                    Some(HeldByLtxfs::Table {
                        node: node.clone(),
                        range,
                    })
                }
                ApplyLocks::Unmounted => Some(HeldByLtxfs::Unmounted),
                ApplyLocks::Kernel(locks) => locks
                    .lock(node.name(), range, false)
                    .ok()
                    .flatten()
                    .map(|held| HeldByLtxfs::Kernel { _lock: held }),
            })
            .collect()
    }
}

/// Where an apply takes its locks.
pub(super) enum ApplyLocks {
    /// In the files' lock tables.
    Table,
    /// In the kernel, on ltxfs's own descriptors of the mount.
    Kernel(Arc<dyn KernelLocks>),
    /// Nowhere: the kernel serves the locks but the mount is not up.
    Unmounted,
}

impl Drop for HeldByLtxfs {
    fn drop(&mut self) {
        if let HeldByLtxfs::Table { node, range } = self {
            node.locks().unlock(LTXFS_LOCK_OWNER, *range);
        }
    }
}

/// A change set [`Store::try_apply_change_set`] left unapplied, decoded and
/// verified, for [`Store::apply_pending_change_set`].
#[derive(Debug)]
pub struct PendingChangeSet {
    name: String,
    received: ReceivedChangeSet,
}

/// What [`Store::try_apply_change_set`] did.
#[derive(Debug)]
pub enum TryApply {
    /// The change set is applied.
    Applied(AppliedChangeSet),
    /// Applying would have waited; nothing changed.
    WouldWait(PendingChangeSet),
}

/// The files one apply changes.
struct ApplyTarget {
    /// The database's name.
    name: String,
    database_node: Arc<Node>,
    /// Its `-shm`, when the database is or becomes WAL mode.
    index_node: Option<Arc<Node>>,
    /// Whether the database was in WAL mode before the change set.
    wal_before: bool,
    /// Names the apply made exist, for the kernel to forget its failed lookups.
    changed_entries: Vec<String>,
    database_created: bool,
}

impl ApplyTarget {
    /// The locks readers take, waiting for those who hold them: the wal-index's
    /// first ([`keep_wal_readers_out`]), then (when readers use them) the
    /// database file's; released in the same order when the result is dropped.
    fn keep_readers_out(&self, locks: &ApplyLocks) -> Result<Vec<HeldByLtxfs>, StoreError> {
        let mut held = Vec::new();
        if let Some(index_node) = &self.index_node {
            held.extend(keep_wal_readers_out(locks, index_node)?);
        }
        if let Some((node, ranges)) = self.database_locks(locks) {
            held.extend(HeldByLtxfs::take(locks, &node, &ranges)?);
        }
        Ok(held)
    }

    /// The same locks, or none when anyone else holds one of them.
    fn try_keep_readers_out(&self, locks: &ApplyLocks) -> Option<Vec<HeldByLtxfs>> {
        let mut held = Vec::new();
        if let Some(index_node) = &self.index_node {
            held.extend(HeldByLtxfs::try_take(
                locks,
                index_node,
                &[WAL_INDEX_LOCKS],
            )?);
        }
        if let Some((node, ranges)) = self.database_locks(locks) {
            held.extend(HeldByLtxfs::try_take(locks, &node, &ranges)?);
        }
        Some(held)
    }

    /// The database file's locks to take, in order, when readers use them
    /// (rollback modes). The kernel gives a waiting lock no priority, so there
    /// ltxfs takes PENDING first, as SQLite's writers do: new readers then stay
    /// out (SQLite checks PENDING before it takes SHARED) while those inside
    /// finish.
    fn database_locks(&self, locks: &ApplyLocks) -> Option<(Arc<Node>, Vec<ByteRange>)> {
        if self.wal_before {
            return None;
        }
        let ranges = if matches!(locks, ApplyLocks::Kernel(_)) {
            vec![
                ByteRange::new(PENDING_BYTE, PENDING_BYTE).expect("one byte"),
                ByteRange::new(PENDING_BYTE + 1, DATABASE_LOCKS.end).expect("ordered"),
            ]
        } else {
            vec![DATABASE_LOCKS]
        };
        Some((self.database_node.clone(), ranges))
    }
}

/// Takes the wal-index locks of `index_node` that every reader needs, waiting
/// for those who hold them. The kernel gives a waiting lock no priority, and
/// readers sharing a read mark could hold it forever; so ltxfs first takes the
/// writer and recovery locks, then marks the index's first header copy
/// uninitialised, which makes every new reader wait as behind a writer
/// (`SQLITE_BUSY_RECOVERY`, retried within its busy timeout), and then waits
/// for the readers inside a transaction to finish. The apply's new header
/// ([`wal_index_after_apply`]) lets them in again; should the apply fail, the
/// first reader after it rebuilds the index from the WAL, as SQLite does.
fn keep_wal_readers_out(
    locks: &ApplyLocks,
    index_node: &Arc<Node>,
) -> Result<Vec<HeldByLtxfs>, StoreError> {
    let ApplyLocks::Kernel(kernel) = locks else {
        return HeldByLtxfs::take(locks, index_node, &[WAL_INDEX_LOCKS]);
    };
    let mut held = HeldByLtxfs::take(locks, index_node, &[WAL_WRITER_LOCKS])?;
    if index_node.metadata()?.len() >= WAL_INDEX_PREFIX as u64 {
        kernel
            .write(index_node.name(), WAL_INDEX_FIRST_IS_INIT, &[0])
            .map_err(|source| {
                StoreError::io(
                    format!("hold new readers of {} off", index_node.name()),
                    source,
                )
            })?;
    }
    held.extend(HeldByLtxfs::take(locks, index_node, &[WAL_READ_MARKS])?);
    Ok(held)
}

/// Whether the database of `database_node` is in WAL mode before `received`, and
/// whether its `-shm` takes part in applying it (WAL mode before or after).
fn wal_modes(database_node: &Node, received: &ReceivedChangeSet) -> (bool, bool) {
    let wal_before = database_node.database().is_wal_mode();
    let wal_after = received.wal_mode_after().unwrap_or(wal_before);
    (wal_before, wal_before || wal_after)
}

/// A file for a change set that arrives in pieces, made by
/// [`Store::change_set_spool`]: append its bytes, then hand it over as
/// [`ChangeSetBytes::InFile`] from offset `start`.
#[derive(Debug)]
pub struct ChangeSetSpool {
    /// The file, positioned at `start`.
    pub file: std::fs::File,
    /// Where the change set's bytes begin.
    pub start: u64,
}

impl Store {
    /// An unnamed file beside the databases, for a change set that arrives in
    /// pieces too large to hold in memory; it disappears once closed. The change
    /// set goes after [`ChangeSetSpool::start`] bytes, room the store keeps so
    /// that a snapshot's spool can become its database's log without a copy.
    pub fn change_set_spool(&self) -> Result<ChangeSetSpool, StoreError> {
        use std::io::Write;
        let context = || {
            format!(
                "create a file for an incoming change set in {}",
                self.dbs_dir.display()
            )
        };
        let mut file = tempfile::tempfile_in(&self.dbs_dir).map_err(|source| StoreError::Io {
            context: context(),
            source,
        })?;
        let start = ChangeLog::RECORD_PREFIX;
        file.write_all(&vec![0; start as usize])
            .map_err(|source| StoreError::Io {
                context: context(),
                source,
            })?;
        Ok(ChangeSetSpool { file, start })
    }

    /// Applies one change set from the primary to database `name`, creating the
    /// database when it is new. Blocks while readers finish their transactions, so
    /// never call it on a FUSE worker thread.
    pub fn apply_change_set(
        &self,
        name: &str,
        ltx: ChangeSetBytes,
    ) -> Result<AppliedChangeSet, StoreError> {
        let received = self.receive(name, ltx)?;
        self.apply_received(name, received)
    }

    /// Applies one change set like [`Store::apply_change_set`] if that needs no
    /// waiting: not for a reader's (or local writer's) transaction, not for
    /// another apply, not for creating the database or folding this node's own
    /// WAL transactions first, and not for syncing a snapshot's log. Otherwise
    /// it changes nothing and hands the change set, decoded and verified, back
    /// for [`Store::apply_pending_change_set`].
    pub fn try_apply_change_set(
        &self,
        name: &str,
        ltx: ChangeSetBytes,
    ) -> Result<TryApply, StoreError> {
        let received = self.receive(name, ltx)?;
        let would_wait = |received| {
            Ok(TryApply::WouldWait(PendingChangeSet {
                name: name.to_string(),
                received,
            }))
        };
        // A snapshot's log is synced, which is done before readers are kept out.
        if received.header().is_snapshot() {
            return would_wait(received);
        }
        let _one_at_a_time = match self.applying.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return would_wait(received),
        };
        let Some(target) = self.existing_target(name, &received) else {
            return would_wait(received);
        };
        if target.database_node.database().has_wal_transactions() {
            return would_wait(received);
        }
        let Some(held) = target.try_keep_readers_out(&self.apply_locks()) else {
            return would_wait(received);
        };
        // Nothing that can fail comes between logging and writing the pages.
        let logged = target.database_node.database().log_received(received)?;
        self.write_and_publish(target, logged, held)
            .map(TryApply::Applied)
    }

    /// Before this node leads: moves each database's WAL transactions, as this
    /// node captured them, into the database file, so that what SQLite reads is
    /// what the log says. The two differ after a commit that was not replicated:
    /// SQLite was told it failed and does not count its WAL frames, while the log
    /// (and maybe a replica) has the transaction; the next transaction would
    /// overwrite those frames and leave the log describing pages SQLite never
    /// had. Called while this node is still a replica, so nothing writes
    /// meanwhile.
    pub fn fold_wals_before_leading(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.applying.lock_unpoisoned();
        for (name, _) in self.positions() {
            if let (Some(database_node), Some(index_node)) =
                (self.lookup(&name), self.lookup(&format!("{name}-shm")))
            {
                self.fold_own_wal(&name, &database_node, &index_node)?;
            }
        }
        Ok(())
    }

    /// Moves the WAL transactions this node committed as the primary into the
    /// database file, with readers kept out, and tells readers through the
    /// wal-index; nothing when the WAL holds none.
    fn fold_own_wal(
        &self,
        name: &str,
        database_node: &Arc<Node>,
        index_node: &Arc<Node>,
    ) -> Result<(), StoreError> {
        let database = database_node.database();
        if !database.has_wal_transactions() {
            return Ok(());
        }
        let _readers_out = keep_wal_readers_out(&self.apply_locks(), index_node)?;
        if let Some(folded) = database.fold_wal()? {
            self.drop_cached_pages(database_node, &folded);
            self.invalidate(&format!("{name}-wal"));
            self.advance_wal_index(index_node, &folded)?;
        }
        Ok(())
    }

    /// Applies a change set [`Store::try_apply_change_set`] handed back, waiting as
    /// [`Store::apply_change_set`] does.
    pub fn apply_pending_change_set(
        &self,
        pending: PendingChangeSet,
    ) -> Result<AppliedChangeSet, StoreError> {
        self.apply_received(&pending.name, pending.received)
    }

    /// Checks that this node may apply a change set to `name`, then decodes and
    /// verifies `ltx`, before any lock is taken.
    fn receive(&self, name: &str, ltx: ChangeSetBytes) -> Result<ReceivedChangeSet, StoreError> {
        let rejected = |reason: &str| StoreError::ChangeSetRejected {
            database: name.to_string(),
            reason: reason.to_string(),
        };
        if self.cluster.role() != Role::Replica {
            return Err(rejected("this node is the primary"));
        }
        if parse_name(name)?.kind != FileKind::Database {
            return Err(rejected("the name is not a database's"));
        }
        ReceivedChangeSet::decode(name, ltx)
    }

    /// Applies a decoded change set, waiting for whatever it must.
    fn apply_received(
        &self,
        name: &str,
        received: ReceivedChangeSet,
    ) -> Result<AppliedChangeSet, StoreError> {
        let _one_at_a_time = self.applying.lock_unpoisoned();
        // A stream cancelled at a promotion may hand its last change set to the
        // blocking pool; it must not land once this node leads.
        if self.cluster.role() != Role::Replica {
            return Err(StoreError::ChangeSetRejected {
                database: name.to_string(),
                reason: "this node is the primary".to_string(),
            });
        }
        let target = self.create_target(name, &received)?;
        let database = target.database_node.database().clone();
        if let Some(index_node) = &target.index_node {
            // This node wrote in WAL mode as the primary: its own transactions move
            // into the database file before the primary's are written there.
            self.fold_own_wal(name, &target.database_node, index_node)?;
        }
        // The log first, before readers are kept out (a snapshot's log is synced).
        // Nothing that can fail comes between this and writing the pages.
        let logged = database.log_received(received)?;
        let held = target.keep_readers_out(&self.apply_locks())?;
        self.write_and_publish(target, logged, held)
    }

    /// The files an apply of `received` to `name` changes, when they all exist.
    fn existing_target(&self, name: &str, received: &ReceivedChangeSet) -> Option<ApplyTarget> {
        let database_node = self.lookup(name)?;
        let (wal_before, uses_index) = wal_modes(&database_node, received);
        let index_node = if uses_index {
            Some(self.lookup(&format!("{name}-shm"))?)
        } else {
            None
        };
        Some(ApplyTarget {
            name: name.to_string(),
            database_node,
            index_node,
            wal_before,
            changed_entries: Vec::new(),
            database_created: false,
        })
    }

    /// The files an apply of `received` to `name` changes, creating those that
    /// do not exist yet.
    fn create_target(
        &self,
        name: &str,
        received: &ReceivedChangeSet,
    ) -> Result<ApplyTarget, StoreError> {
        // The names this change set makes exist or vanish: the kernel caches
        // lookups, failed ones too, so it is told to forget them afterwards.
        let mut changed_entries = Vec::new();
        let (database_node, database_created) = match self.lookup(name) {
            Some(node) => (node, false),
            None => {
                changed_entries.push(name.to_string());
                (self.create(name)?, true)
            }
        };
        let (wal_before, uses_index) = wal_modes(&database_node, received);
        let index_node = if uses_index {
            let shm = format!("{name}-shm");
            Some(match self.lookup(&shm) {
                Some(node) => node,
                None => {
                    let node = self.create(&shm)?;
                    changed_entries.push(shm);
                    node
                }
            })
        } else {
            None
        };
        Ok(ApplyTarget {
            name: name.to_string(),
            database_node,
            index_node,
            wal_before,
            changed_entries,
            database_created,
        })
    }

    /// Writes a logged change set's pages while readers are kept out (`held`),
    /// makes readers see them, lets readers in again, and then makes the files
    /// the change set created or deleted appear or vanish.
    fn write_and_publish(
        &self,
        mut target: ApplyTarget,
        logged: LoggedChangeSet,
        held: Vec<HeldByLtxfs>,
    ) -> Result<AppliedChangeSet, StoreError> {
        let database_node = &target.database_node;
        let applied = database_node.database().write_logged(logged)?;
        // The page size a local write of page 1 would have recorded, which local
        // changes are checked against once this node is the primary.
        let page_size = if applied.commit == 0 {
            0
        } else {
            applied.page_size
        };
        database_node
            .page_size
            .store(page_size, std::sync::atomic::Ordering::Release);
        self.drop_cached_pages(database_node, &applied);
        if let Some(index_node) = &target.index_node {
            // Also when the change set leaves WAL mode: connections still in WAL
            // mode must notice that the content changed.
            self.advance_wal_index(index_node, &applied)?;
        }
        drop(held);
        if applied.commit == 0 {
            // The primary deleted the database: its file disappears here too (the
            // log stays, so the position is kept).
            self.remove_applied_file(database_node)?;
        }
        // The `-pos` file exists while the database file does.
        if applied.commit == 0 || target.database_created {
            target
                .changed_entries
                .push(format!("{}{POSITION_SUFFIX}", target.name));
        }
        if let Some(cache) = self.kernel_cache() {
            for name in &target.changed_entries {
                cache.invalidate_entry(name);
            }
        }
        Ok(applied)
    }

    /// Removes a database file the primary deleted, without recording anything.
    fn remove_applied_file(&self, node: &Node) -> Result<(), StoreError> {
        let parsed = parse_name(&node.name)?;
        let backing = self
            .dbs_dir
            .join(&parsed.database)
            .join(parsed.kind.backing_name());
        if let Some(locks) = self.kernel_locks() {
            locks.forget(&node.name);
        }
        {
            let mut namespace = self.write_namespace();
            std::fs::remove_file(&backing).map_err(|source| {
                StoreError::io(format!("remove {}", backing.display()), source)
            })?;
            namespace.by_name.remove(&node.name);
            namespace.by_id.remove(&node.id);
        }
        self.mark_dir_dirty(backing.parent().unwrap_or(&self.dbs_dir));
        if let Some(cache) = self.kernel_cache() {
            cache.invalidate_entry(&node.name);
        }
        Ok(())
    }

    /// Makes the kernel drop its cached copies of the pages a change set wrote
    /// (and the file's attributes, since its size may have changed).
    fn drop_cached_pages(&self, node: &Node, applied: &AppliedChangeSet) {
        let Some(cache) = self.kernel_cache() else {
            return;
        };
        let page_size = u64::from(applied.page_size);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for &pgno in &applied.pages {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == pgno => *last = pgno,
                _ => runs.push((pgno, pgno)),
            }
        }
        // Pages past the new end were cut off; a length of 0 means "to the end".
        runs.push((applied.commit + 1, 0));
        for (first, last) in runs {
            let offset = u64::from(first - 1) * page_size;
            let len = if last == 0 {
                0
            } else {
                u64::from(last - first + 1) * page_size
            };
            cache.invalidate_pages(node.id(), offset, len);
        }
    }

    /// Advances the wal-index header so WAL-mode readers see the new content. The
    /// kernel's copy of `-shm` (which readers map) is written back and dropped
    /// first, and dropped again after the backing file changed.
    fn advance_wal_index(
        &self,
        index_node: &Node,
        applied: &AppliedChangeSet,
    ) -> Result<(), StoreError> {
        let cache = self.kernel_cache();
        if let Some(cache) = &cache {
            cache.invalidate_file(index_node.id());
        }
        let prefix = index_node.read_at(0, WAL_INDEX_PREFIX)?;
        if let Some(new) = wal_index_after_apply(&prefix, applied.page_size, applied.commit) {
            index_node
                .file
                .write_all_at(&new, 0)
                .map_err(|source| StoreError::io(format!("write {}", index_node.name), source))?;
        }
        if let Some(cache) = &cache {
            cache.invalidate_file(index_node.id());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::ltx::{Checksum, DatabaseChecksum, Encoder, Header, TxId};
    use crate::store::{CaptureOptions, CatchUp, Position, SQLITE_HEADER_MAGIC};

    const PAGE_SIZE: u32 = 512;

    /// A database of `pages` pages where page `n` is filled with `fill(n)`, page 1
    /// carrying the SQLite header (rollback mode).
    fn page(pgno: u32, fill: u8) -> Vec<u8> {
        let mut page = vec![fill; PAGE_SIZE as usize];
        if pgno == 1 {
            page[..16].copy_from_slice(SQLITE_HEADER_MAGIC);
            page[16..18].copy_from_slice(&(PAGE_SIZE as u16).to_be_bytes());
            page[18] = 1;
            page[19] = 1;
        }
        page
    }

    /// Builds change sets the way the primary would, keeping the checksum.
    #[derive(Clone)]
    struct History {
        pages: Vec<Vec<u8>>,
        txid: u64,
        checksum: Checksum,
        epoch: u64,
        /// Whether page 1, when written, says WAL mode.
        wal: bool,
    }

    impl History {
        fn new() -> History {
            History {
                pages: Vec::new(),
                txid: 0,
                checksum: Checksum(0),
                epoch: 1,
                wal: false,
            }
        }

        fn commit(&mut self, changes: &[(u32, u8)], commit: u32) -> Vec<u8> {
            for &(pgno, fill) in changes {
                let slot = pgno as usize - 1;
                if self.pages.len() <= slot {
                    self.pages.resize(slot + 1, vec![0; PAGE_SIZE as usize]);
                }
                self.pages[slot] = page(pgno, fill);
                if pgno == 1 && self.wal {
                    self.pages[slot][18..20].copy_from_slice(&[2, 2]);
                }
            }
            self.pages.truncate(commit as usize);
            let mut database = DatabaseChecksum::new(PAGE_SIZE).unwrap();
            for (index, page) in self.pages.iter().enumerate() {
                database.add_page(index as u32 + 1, page);
            }
            self.txid += 1;
            let header = Header {
                page_size: PAGE_SIZE,
                commit,
                min_txid: TxId(self.txid),
                max_txid: TxId(self.txid),
                timestamp: 1,
                pre_apply_checksum: self.checksum,
                node_id: self.epoch,
                ..Header::default()
            };
            let mut bytes = Vec::new();
            let mut encoder = Encoder::new(&mut bytes, header).unwrap();
            let mut sorted: Vec<u32> = changes.iter().map(|&(pgno, _)| pgno).collect();
            sorted.sort_unstable();
            sorted.dedup();
            for pgno in sorted.into_iter().filter(|&pgno| pgno <= commit) {
                encoder
                    .encode_page(pgno, &self.pages[pgno as usize - 1])
                    .unwrap();
            }
            self.checksum = database.value();
            encoder.finish(self.checksum).unwrap();
            bytes
        }

        fn position(&self) -> Position {
            Position {
                txid: TxId(self.txid),
                checksum: self.checksum,
            }
        }

        fn content(&self) -> Vec<u8> {
            self.pages.concat()
        }
    }

    fn replica(dir: &std::path::Path) -> Store {
        Store::open(dir, CaptureOptions::default(), Role::Replica).unwrap()
    }

    #[test]
    fn a_snapshot_for_a_diverged_replica_names_the_newest_shared_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let primary = replica(&dir.path().join("primary"));
        let diverged = replica(&dir.path().join("diverged"));
        let mut history = History::new();
        for changes in [&[(1, 1), (2, 2)][..], &[(1, 3)], &[(2, 4)]] {
            let change_set = history.commit(changes, 2);
            primary
                .apply_change_set("app.db", ChangeSetBytes::InMemory(change_set.clone()))
                .unwrap();
            diverged
                .apply_change_set("app.db", ChangeSetBytes::InMemory(change_set))
                .unwrap();
        }
        // TXIDs 1-3 are shared; then the two histories part, as when an isolated
        // primary goes on writing while another node takes over.
        let mut isolated = history.clone();
        for fill in [5, 6] {
            let change_set = history.commit(&[(2, fill)], 2);
            primary
                .apply_change_set("app.db", ChangeSetBytes::InMemory(change_set))
                .unwrap();
        }
        for fill in [7, 8, 9] {
            let change_set = isolated.commit(&[(2, fill)], 2);
            diverged
                .apply_change_set("app.db", ChangeSetBytes::InMemory(change_set))
                .unwrap();
        }
        let histories = diverged.histories(100).unwrap();
        let [(name, points)] = histories.as_slice() else {
            panic!("one database has a history: {histories:?}");
        };
        assert_eq!(name, "app.db");
        assert_eq!(points.len(), 6);
        assert_eq!(points[0], isolated.position(), "newest first");

        let database = primary.database("app.db").unwrap();
        let shared_txid = |points: &[Position]| match database
            .catch_up(isolated.position(), points, u64::MAX)
            .unwrap()
        {
            CatchUp::Snapshot { shared_txid, .. } => shared_txid,
            other => panic!("a snapshot was not asked for: {other:?}"),
        };
        assert_eq!(shared_txid(points), Some(TxId(3)));
        // Without the replica's history, or with only its own tail, nothing is
        // known to be shared.
        assert_eq!(shared_txid(&[]), None);
        assert_eq!(shared_txid(&points[..3]), None);
    }

    #[test]
    fn a_database_created_by_a_snapshot_takes_local_changes_after_promotion() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        let snapshot = history.commit(&[(1, 1), (2, 2)], 2);
        store
            .apply_change_set("app.db", ChangeSetBytes::InMemory(snapshot))
            .unwrap();
        store.set_role(Role::Primary);
        // SQLite's size hint extends the file before it writes the new page.
        let node = store.lookup("app.db").unwrap();
        node.truncate(3 * u64::from(PAGE_SIZE)).unwrap();
        node.write_at(2 * u64::from(PAGE_SIZE), &page(3, 3))
            .unwrap();
    }

    #[test]
    fn a_live_catch_up_is_answered_without_waiting_only_when_it_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        let mut positions = Vec::new();
        for fill in 1..=4 {
            let change_set = history.commit(&[(1, fill), (2, fill)], 2);
            store
                .apply_change_set("app.db", ChangeSetBytes::InMemory(change_set))
                .unwrap();
            positions.push(history.position());
        }
        let database = store.database("app.db").unwrap();
        let change_sets = |answer: Option<Result<CatchUp, StoreError>>| match answer {
            Some(Ok(CatchUp::ChangeSets(change_sets))) => Some(change_sets.len()),
            None => None,
            other => panic!("unexpected answer {other:?}"),
        };
        // The change sets after the position, as logged.
        let small = database.try_catch_up_live(positions[1], u64::MAX);
        assert_eq!(change_sets(small), Some(2));
        let logged =
            crate::store::log::read_change_sets(&dir.path().join("dbs").join("app.db").join("log"))
                .unwrap();
        assert_eq!(
            database
                .try_catch_up_live(positions[1], u64::MAX)
                .unwrap()
                .unwrap(),
            CatchUp::ChangeSets(logged[2..].to_vec())
        );
        assert_eq!(
            change_sets(database.try_catch_up_live(positions[3], 0)),
            Some(0)
        );
        // More than allowed, a position the log lacks, or the lock taken: the
        // caller goes to the blocking path.
        assert_eq!(
            change_sets(database.try_catch_up_live(positions[1], 10)),
            None
        );
        assert_eq!(
            change_sets(database.try_catch_up_live(Position::UNKNOWN, u64::MAX)),
            None
        );
        // While a commit or an apply holds the capture lock, the live path
        // answers nothing.
        let held = database.hold_capture_lock();
        assert_eq!(
            change_sets(database.try_catch_up_live(positions[1], u64::MAX)),
            None
        );
        drop(held);
    }

    /// `ltx` in a file, between other bytes, as a replica's spool or log holds it.
    fn in_file(ltx: &[u8]) -> ChangeSetBytes {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0xAA; 10]).unwrap();
        file.write_all(ltx).unwrap();
        file.write_all(&[0xBB; 10]).unwrap();
        ChangeSetBytes::InFile {
            file,
            offset: 10,
            len: ltx.len() as u64,
        }
    }

    #[test]
    fn change_sets_in_a_file_apply_like_those_in_memory_and_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        let snapshot = history.commit(&[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], 5);
        // The snapshot in a spool the store made: the spool becomes the log.
        let mut spool = store.change_set_spool().unwrap();
        std::io::Write::write_all(&mut spool.file, &snapshot).unwrap();
        let spooled = ChangeSetBytes::InFile {
            file: spool.file,
            offset: spool.start,
            len: snapshot.len() as u64,
        };
        store.apply_change_set("app.db", spooled).unwrap();
        // Pages 2, 3 and 5: two runs of consecutive pages, and a longer database.
        let next = history.commit(&[(2, 6), (3, 7), (5, 8), (6, 9)], 6);
        let applied = store.apply_change_set("app.db", in_file(&next)).unwrap();
        assert_eq!(applied.pages, [2, 3, 5, 6]);
        assert_eq!(applied.position, history.position());
        let node = store.lookup("app.db").unwrap();
        assert_eq!(node.read_at(0, 1 << 20).unwrap(), history.content());
        // A corrupted change set in a file is refused before anything is written.
        let (position_before, content_before) = (history.position(), history.content());
        let mut corrupt = history.commit(&[(1, 3)], 6);
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 1;
        assert!(matches!(
            store.apply_change_set("app.db", in_file(&corrupt)),
            Err(StoreError::ChangeSetRejected { .. })
        ));
        assert_eq!(node.read_at(0, 1 << 20).unwrap(), content_before);
        drop(node);
        drop(store);
        // The log holds both change sets: a restart finds the same position.
        let store = replica(dir.path());
        assert_eq!(
            store.database("app.db").unwrap().position(),
            position_before
        );
        assert_eq!(
            store.lookup("app.db").unwrap().read_at(0, 1 << 20).unwrap(),
            content_before
        );
    }

    #[test]
    fn applies_change_sets_in_order_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        let snapshot = history.commit(&[(1, 1), (2, 2), (3, 3)], 3);
        store
            .apply_change_set("app.db", ChangeSetBytes::InMemory(snapshot))
            .unwrap();
        let second = history.commit(&[(2, 9)], 3);
        let third = history.commit(&[(1, 4), (4, 4)], 4);
        // Out of order: nothing changes.
        assert!(matches!(
            store.apply_change_set("app.db", ChangeSetBytes::InMemory(third.clone())),
            Err(StoreError::ChangeSetRejected { .. })
        ));
        store
            .apply_change_set("app.db", ChangeSetBytes::InMemory(second))
            .unwrap();
        let applied = store
            .apply_change_set("app.db", ChangeSetBytes::InMemory(third))
            .unwrap();
        assert_eq!(applied.position, history.position());
        assert_eq!(
            store.database("app.db").unwrap().position(),
            history.position()
        );
        let node = store.lookup("app.db").unwrap();
        assert_eq!(node.read_at(0, 1 << 20).unwrap(), history.content());
        // A corrupted change set is refused before anything is written.
        let mut corrupt = history.commit(&[(3, 7)], 4);
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 1;
        assert!(
            store
                .apply_change_set("app.db", ChangeSetBytes::InMemory(corrupt))
                .is_err()
        );
        assert_eq!(
            node.read_at(0, 1 << 20).unwrap().len(),
            4 * PAGE_SIZE as usize
        );
    }

    #[test]
    fn a_restarted_replica_resumes_and_repairs_an_interrupted_apply() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::new();
        {
            let store = replica(dir.path());
            store
                .apply_change_set(
                    "app.db",
                    ChangeSetBytes::InMemory(history.commit(&[(1, 1), (2, 2)], 2)),
                )
                .unwrap();
            store
                .apply_change_set(
                    "app.db",
                    ChangeSetBytes::InMemory(history.commit(&[(2, 5), (3, 6)], 3)),
                )
                .unwrap();
            // A crash after the log append, part-way through writing the pages.
            store.lookup("app.db").unwrap().file.set_len(512).unwrap();
        }
        let store = replica(dir.path());
        assert_eq!(
            store.database("app.db").unwrap().position(),
            history.position()
        );
        assert_eq!(
            store.lookup("app.db").unwrap().read_at(0, 1 << 20).unwrap(),
            history.content()
        );
        store
            .apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(history.commit(&[(3, 8)], 3)),
            )
            .unwrap();
    }

    #[test]
    fn a_database_that_matches_nothing_asks_for_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::new();
        {
            let store = replica(dir.path());
            store
                .apply_change_set(
                    "app.db",
                    ChangeSetBytes::InMemory(history.commit(&[(1, 1), (2, 2)], 2)),
                )
                .unwrap();
            store
                .apply_change_set(
                    "app.db",
                    ChangeSetBytes::InMemory(history.commit(&[(1, 3)], 2)),
                )
                .unwrap();
            store
                .lookup("app.db")
                .unwrap()
                .file
                .write_all_at(&[0xee; 512], 512)
                .unwrap();
        }
        let store = replica(dir.path());
        let database = store.database("app.db").unwrap();
        // Applying the last change set again does not help: page 2 is not in it.
        assert_eq!(database.position(), Position::UNKNOWN);
    }

    #[test]
    fn change_sets_of_an_older_lease_epoch_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        history.epoch = 2;
        store
            .apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(history.commit(&[(1, 1)], 1)),
            )
            .unwrap();
        let mut old_primary = History {
            pages: history.pages.clone(),
            txid: history.txid,
            checksum: history.checksum,
            epoch: 1,
            wal: false,
        };
        let error = store
            .apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(old_primary.commit(&[(1, 9)], 1)),
            )
            .unwrap_err();
        assert!(error.to_string().contains("epoch"), "{error}");
        history.epoch = 3;
        store
            .apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(history.commit(&[(1, 2)], 1)),
            )
            .unwrap();
    }

    #[test]
    fn the_primary_refuses_change_sets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        let mut history = History::new();
        assert!(matches!(
            store.apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(history.commit(&[(1, 1)], 1))
            ),
            Err(StoreError::ChangeSetRejected { .. })
        ));
    }

    /// A change set a replica's stream handed to the blocking pool (an apply
    /// that would wait) may finish after the stream was cancelled and the node
    /// promoted; it must not move a new primary's position under it.
    #[test]
    fn a_change_set_handed_back_before_a_promotion_is_refused_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        let first = history.commit(&[(1, 1)], 1);
        let pending = try_apply(&store, &first).expect("a new database is created on the pool");
        store.set_role(Role::Primary);
        assert!(matches!(
            store.apply_pending_change_set(pending),
            Err(StoreError::ChangeSetRejected { .. })
        ));
        assert!(store.lookup("app.db").is_none());
    }

    /// Tries to apply `change_set`; returns whether it was applied. One that was
    /// not must have changed nothing.
    fn try_apply(store: &Store, change_set: &[u8]) -> Option<PendingChangeSet> {
        let before = store.database("app.db").map(|database| database.position());
        let content = store
            .lookup("app.db")
            .map(|node| node.read_at(0, 1 << 20).unwrap());
        match store
            .try_apply_change_set("app.db", ChangeSetBytes::InMemory(change_set.to_vec()))
            .unwrap()
        {
            TryApply::Applied(_) => None,
            TryApply::WouldWait(pending) => {
                let after = store.database("app.db").map(|database| database.position());
                assert_eq!(after, before, "a change set handed back moved the position");
                let now = store
                    .lookup("app.db")
                    .map(|node| node.read_at(0, 1 << 20).unwrap());
                assert_eq!(
                    now, content,
                    "a change set handed back changed the database"
                );
                Some(pending)
            }
        }
    }

    #[test]
    fn an_apply_that_would_wait_changes_nothing_and_is_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = replica(dir.path());
        let mut history = History::new();
        // A new database is created on the blocking path.
        let first = history.commit(&[(1, 1)], 1);
        let pending = try_apply(&store, &first).expect("a new database was created in place");
        assert!(store.lookup("app.db").is_none());
        store.apply_pending_change_set(pending).unwrap();
        assert!(try_apply(&store, &history.commit(&[(1, 2)], 1)).is_none());
        assert_eq!(
            store.lookup("app.db").unwrap().read_at(0, 512).unwrap(),
            page(1, 2)
        );

        // A rollback-mode reader's SHARED lock.
        let node = store.lookup("app.db").unwrap();
        let everything = ByteRange::new(0, u64::MAX >> 1).unwrap();
        let reader = LockRequest {
            owner: 1,
            pid: 1,
            range: ByteRange::new(PENDING_BYTE + 2, PENDING_BYTE + 2).unwrap(),
            kind: LockKind::Read,
        };
        node.locks().try_lock(reader).unwrap();
        let pending = try_apply(&store, &history.commit(&[(1, 3)], 1))
            .expect("applied while a reader held SHARED");
        node.locks().unlock(1, everything);
        store.apply_pending_change_set(pending).unwrap();
        assert_eq!(node.read_at(0, 512).unwrap(), page(1, 3));

        // Another apply in progress.
        let busy = store.applying.lock().unwrap();
        let pending = try_apply(&store, &history.commit(&[(1, 4)], 1))
            .expect("applied while another apply ran");
        drop(busy);
        store.apply_pending_change_set(pending).unwrap();

        // A WAL-mode reader's read mark in `-shm`: `-shm` joins the apply once
        // the database is in WAL mode.
        history.wal = true;
        let pending = try_apply(&store, &history.commit(&[(1, 5)], 1))
            .expect("the first WAL-mode change set created -shm in place");
        store.apply_pending_change_set(pending).unwrap();
        let shm = store.lookup("app.db-shm").unwrap();
        shm.locks()
            .try_lock(LockRequest {
                range: ByteRange::new(123, 123).unwrap(),
                ..reader
            })
            .unwrap();
        let pending = try_apply(&store, &history.commit(&[(1, 6)], 1))
            .expect("applied while a WAL reader held a read mark");
        shm.locks().unlock(1, everything);
        store.apply_pending_change_set(pending).unwrap();
        assert!(try_apply(&store, &history.commit(&[(1, 7)], 1)).is_none());
        assert_eq!(node.read_at(0, 512).unwrap(), history.pages[0]);
    }

    #[test]
    fn readers_are_kept_out_while_pages_are_written_and_cannot_starve_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(replica(dir.path()));
        let mut history = History::new();
        store
            .apply_change_set(
                "app.db",
                ChangeSetBytes::InMemory(history.commit(&[(1, 1)], 1)),
            )
            .unwrap();
        let node = store.lookup("app.db").unwrap();
        let shared = |owner| LockRequest {
            owner,
            pid: owner as u32,
            range: ByteRange::new(PENDING_BYTE + 2, PENDING_BYTE + 2).unwrap(),
            kind: LockKind::Read,
        };
        // A reader in a transaction holds SHARED; the apply waits for it.
        node.locks().try_lock(shared(1)).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let applier = {
            let store = store.clone();
            let change_set = history.commit(&[(1, 2)], 1);
            std::thread::spawn(move || {
                let result = store.apply_change_set("app.db", ChangeSetBytes::InMemory(change_set));
                done_tx.send(()).unwrap();
                result
            })
        };
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
        // While the apply waits, a new reader is turned away (it retries later).
        let waiting = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            let refused = node.locks().try_lock(shared(2)).is_err();
            node.locks()
                .unlock(2, ByteRange::new(0, u64::MAX >> 1).unwrap());
            refused
        });
        assert!(waiting, "a new reader got in ahead of the waiting apply");
        node.locks()
            .unlock(1, ByteRange::new(0, u64::MAX >> 1).unwrap());
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        applier.join().unwrap().unwrap();
        node.locks().try_lock(shared(2)).unwrap();
        assert_eq!(node.read_at(0, 512).unwrap(), page(1, 2));
    }
}
