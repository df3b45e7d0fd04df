//! The primary's side of replication: what a replica at some position needs next,
//! read from the database's change-set log, or a snapshot of the current content.
//!
//! Invariants: change sets are handed out exactly as logged (the replica verifies
//! them); a position is followed from only when the log holds the change set that
//! ends there with the same checksum, otherwise the answer is a snapshot.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::MutexGuard;
use std::time::Duration;

use crate::ltx::{self, Checksum, Encoder, Header, TxId};

use super::{CaptureState, Database, Position};
use crate::store::log::MAX_HISTORY_FOR_SNAPSHOT;
use crate::store::{StoreError, write_all_at_in_pieces};

/// What a replica at some position needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// The change sets that follow the position, oldest first; empty when the
    /// replica is caught up.
    ChangeSets(Vec<Vec<u8>>),
    /// The position is not in this database's history; the replica needs a
    /// snapshot.
    Snapshot {
        /// Why, for the log.
        reason: String,
        /// The newest of the replica's history points that this log shares;
        /// `None` when none is.
        shared_txid: Option<TxId>,
    },
}

impl Database {
    /// The change sets after `from`, up to about `max_bytes` of them (always at
    /// least one when any follow), or why a snapshot is needed instead.
    /// `replica_history` is where the replica's newest change sets end, newest
    /// first (possibly empty); a snapshot's answer says which of them this log
    /// shares.
    pub fn catch_up(
        &self,
        from: Position,
        replica_history: &[Position],
        max_bytes: u64,
    ) -> Result<CatchUp, StoreError> {
        let state = self.lock();
        self.catch_up_locked(&state, from, replica_history, max_bytes)
    }

    /// [`Database::catch_up`] for a replica following live, when it is cheap:
    /// the capture lock is free (it is not waited for) and the change sets after
    /// `from` are in the log and take at most `max_bytes` in all (just written,
    /// so read from the page cache). `None` otherwise, including when a snapshot
    /// would be needed. Lets a stream skip a trip to a thread that may block.
    pub fn try_catch_up_live(
        &self,
        from: Position,
        max_bytes: u64,
    ) -> Option<Result<CatchUp, StoreError>> {
        let state = match self.state.try_lock() {
            Ok(state) => state,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let records = state.log.records();
        let after = records
            .binary_search_by_key(&from.txid, |record| record.header.max_txid)
            .ok()?
            + 1;
        let mut pending = 0u64;
        for record in &records[after..] {
            pending += record.len;
            if pending > max_bytes {
                return None;
            }
        }
        Some(self.catch_up_locked(&state, from, &[], max_bytes))
    }

    fn catch_up_locked(
        &self,
        state: &MutexGuard<'_, CaptureState>,
        from: Position,
        replica_history: &[Position],
        max_bytes: u64,
    ) -> Result<CatchUp, StoreError> {
        let current = state.position;
        if from == current || current.txid.0 == 0 {
            return Ok(CatchUp::ChangeSets(Vec::new()));
        }
        let snapshot = |reason: String| -> Result<CatchUp, StoreError> {
            Ok(CatchUp::Snapshot {
                reason,
                shared_txid: shared_point(state, replica_history)?,
            })
        };
        if from.txid.0 == 0 {
            return snapshot("the replica has no position".into());
        }
        if from.txid > current.txid {
            return snapshot(format!(
                "the replica is at TXID {} but the primary only at {}",
                from.txid, current.txid
            ));
        }
        let records = state.log.records();
        // Records are in TXID order without gaps (the log's invariant), so the
        // one ending at the position is found by binary search.
        let Some(index) = records
            .binary_search_by_key(&from.txid, |record| record.header.max_txid)
            .ok()
        else {
            return snapshot(format!(
                "TXID {} is no longer in the primary's log (retention)",
                from.txid
            ));
        };
        let logged = state.log.post_apply_checksum(&records[index])?;
        if logged != from.checksum {
            return snapshot(format!(
                "at TXID {} the replica's checksum {} differs from the primary's {}",
                from.txid, from.checksum, logged
            ));
        }
        let mut change_sets = Vec::new();
        let mut bytes = 0u64;
        for record in &records[index + 1..] {
            if !change_sets.is_empty() && bytes + record.len > max_bytes {
                break;
            }
            bytes += record.len;
            change_sets.push(state.log.read(record)?);
        }
        Ok(CatchUp::ChangeSets(change_sets))
    }

    /// Where this database's newest change sets (at most `limit`) end, newest
    /// first.
    pub fn history(&self, limit: usize) -> Result<Vec<Position>, StoreError> {
        let state = self.lock();
        state
            .log
            .records()
            .iter()
            .rev()
            .take(limit)
            .map(|record| {
                Ok(Position {
                    txid: record.header.max_txid,
                    checksum: state.log.post_apply_checksum(record)?,
                })
            })
            .collect()
    }

    /// Writes a snapshot of the current content (every page, TXID range 1 to the
    /// current TXID) to `out` and returns the position it brings a replica to.
    /// Commits go on while it is made:
    ///
    /// - from the log, when it starts with a snapshot followed by a short
    ///   history (it always replays to the content): the capture lock is held
    ///   only to note the position and the records;
    /// - otherwise copied from the content into an unnamed spool file,
    ///   [`SNAPSHOT_CHUNK_PAGES`] pages per hold of the capture lock, then made
    ///   whole under the lock by copying again the pages whose checksum no
    ///   longer matches what was copied, and encoded from the spool without
    ///   the lock.
    pub fn write_snapshot(&self, out: &mut dyn Write) -> Result<Position, StoreError> {
        self.write_snapshot_with(out, MAX_HISTORY_FOR_SNAPSHOT, &mut || {})
    }

    /// [`Database::write_snapshot`], compacting from the log up to `max_history`
    /// bytes of change sets, and calling `between_chunks` each time the capture
    /// lock is let go while the content is copied.
    pub(in crate::store) fn write_snapshot_with(
        &self,
        out: &mut dyn Write,
        max_history: u64,
        between_chunks: &mut dyn FnMut(),
    ) -> Result<Position, StoreError> {
        let history = {
            let state = self.lock();
            state
                .log
                .history_until(state.position.txid, state.position.checksum, max_history)?
                .map(|history| (history, state.position))
        };
        if let Some((history, position)) = history {
            let header = history
                .write_snapshot(self.options.compress, self.shared.epoch(), out)
                .map_err(|error| self.named(error))?;
            debug_assert_eq!(header.max_txid, position.txid);
            return Ok(position);
        }
        let copy = self.copy_content(between_chunks)?;
        self.encode_copy(&copy, out)?;
        Ok(copy.position)
    }

    /// A copy of the logical content at one position, made without holding the
    /// capture lock for more than [`SNAPSHOT_CHUNK_PAGES`] pages at a time (but
    /// for the final pass over the pages that changed meanwhile).
    fn copy_content(&self, between_chunks: &mut dyn FnMut()) -> Result<ContentCopy, StoreError> {
        let io = |what: &str, source| StoreError::Io {
            context: format!("{what} for a snapshot of {}", self.name),
            source,
        };
        let spool =
            tempfile::tempfile_in(&self.dir).map_err(|source| io("create a spool", source))?;
        let mut attempts = 0;
        'copy: loop {
            let page_size = self.lock().page_size.max(512);
            let lock_page = ltx::lock_page_number(page_size);
            let mut page = vec![0u8; page_size as usize];
            let offset = |pgno: u32| u64::from(pgno - 1) * u64::from(page_size);
            // The checksum of each page as copied, index `pgno - 1`.
            let mut copied: Vec<u64> = Vec::new();
            loop {
                {
                    let state = self.lock();
                    if state.page_size.max(512) != page_size {
                        continue 'copy;
                    }
                    let first = copied.len() as u32 + 1;
                    let last = state
                        .commit
                        .min(first.saturating_add(SNAPSHOT_CHUNK_PAGES - 1));
                    for pgno in first..=last {
                        if pgno == lock_page {
                            copied.push(0);
                            continue;
                        }
                        state.read_committed_page(pgno, page_size, &mut page)?;
                        copied.push(ltx::page_checksum(pgno, &page).0);
                        write_all_at_in_pieces(&spool, &page, offset(pgno))
                            .map_err(|source| io("write a spool", source))?;
                    }
                    if last >= state.commit {
                        break;
                    }
                }
                between_chunks();
            }
            loop {
                let state = self.lock();
                if state.page_size.max(512) != page_size {
                    continue 'copy;
                }
                let changed: Vec<u32> = (1..=state.commit)
                    .filter(|&pgno| pgno != lock_page)
                    .filter(|&pgno| {
                        copied.get(pgno as usize - 1) != state.page_checksums.get(pgno as usize - 1)
                    })
                    .collect();
                // A rollback-mode transaction in flight holds uncommitted pages in
                // the database file: copy those once it has ended.
                let in_flight = state.needs_rescan
                    || state.truncated
                    || changed.iter().any(|pgno| state.dirty_pages.contains(pgno));
                if !in_flight {
                    for &pgno in &changed {
                        state.read_committed_page(pgno, page_size, &mut page)?;
                        write_all_at_in_pieces(&spool, &page, offset(pgno))
                            .map_err(|source| io("write a spool", source))?;
                    }
                    return Ok(ContentCopy {
                        spool,
                        position: state.position,
                        page_size,
                        commit: state.commit,
                    });
                }
                drop(state);
                attempts += 1;
                if attempts > SNAPSHOT_SETTLE_ATTEMPTS {
                    return Err(StoreError::Capture {
                        database: self.name.clone(),
                        message: format!(
                            "could not write a snapshot: a transaction stayed in flight for {:?}",
                            SNAPSHOT_SETTLE_WAIT * SNAPSHOT_SETTLE_ATTEMPTS
                        ),
                    });
                }
                std::thread::sleep(SNAPSHOT_SETTLE_WAIT);
            }
        }
    }

    /// Encodes `copy` as a snapshot to `out`.
    fn encode_copy(&self, copy: &ContentCopy, out: &mut dyn Write) -> Result<(), StoreError> {
        let encode_error = |error: ltx::LtxError| StoreError::Capture {
            database: self.name.clone(),
            message: format!("could not write a snapshot: {error}"),
        };
        let header = Header {
            flags: if self.options.compress {
                ltx::FLAG_COMPRESS_LZ4
            } else {
                0
            },
            page_size: copy.page_size,
            commit: copy.commit,
            min_txid: TxId(1),
            max_txid: copy.position.txid,
            timestamp: crate::store::cluster::unix_now_ms(),
            pre_apply_checksum: Checksum(0),
            node_id: self.shared.epoch(),
            ..Header::default()
        };
        let mut encoder = Encoder::new(out, header).map_err(encode_error)?;
        let lock_page = ltx::lock_page_number(copy.page_size);
        let mut page = vec![0u8; copy.page_size as usize];
        for pgno in (1..=copy.commit).filter(|&pgno| pgno != lock_page) {
            copy.spool
                .read_exact_at(&mut page, u64::from(pgno - 1) * u64::from(copy.page_size))
                .map_err(|source| StoreError::Io {
                    context: format!("read the spool of a snapshot of {}", self.name),
                    source,
                })?;
            encoder.encode_page(pgno, &page).map_err(encode_error)?;
        }
        encoder
            .finish(copy.position.checksum)
            .map_err(encode_error)?;
        Ok(())
    }

    /// `error` with this database's name where it names none.
    fn named(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Capture { message, .. } => StoreError::Capture {
                database: self.name.clone(),
                message,
            },
            error => error,
        }
    }
}

/// Pages a snapshot copies per hold of the database's capture lock.
pub const SNAPSHOT_CHUNK_PAGES: u32 = 256;

/// How many times, [`SNAPSHOT_SETTLE_WAIT`] apart, a snapshot waits for a
/// rollback-mode transaction in flight to end before it gives up.
const SNAPSHOT_SETTLE_ATTEMPTS: u32 = 500;

/// See [`SNAPSHOT_SETTLE_ATTEMPTS`].
const SNAPSHOT_SETTLE_WAIT: Duration = Duration::from_millis(10);

/// The logical content of a database at one position, page `n` at offset
/// `(n - 1) * page_size` of an unnamed file.
struct ContentCopy {
    spool: File,
    position: Position,
    page_size: u32,
    commit: u32,
}

/// The newest point of `replica_history` (newest first) that this log shares: a
/// change set of the log ends there with the same checksum. `None` when no
/// point is shared (the histories part before the oldest point, or the log no
/// longer reaches back to where they part).
fn shared_point(
    state: &MutexGuard<'_, CaptureState>,
    replica_history: &[Position],
) -> Result<Option<TxId>, StoreError> {
    let records = state.log.records();
    for point in replica_history {
        if let Ok(index) =
            records.binary_search_by_key(&point.txid, |record| record.header.max_txid)
            && state.log.post_apply_checksum(&records[index])? == point.checksum
        {
            return Ok(Some(point.txid));
        }
    }
    Ok(None)
}
