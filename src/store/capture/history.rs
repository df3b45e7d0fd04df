//! The primary's side of replication: what a replica at some position needs next,
//! read from the database's change-set log, or a snapshot of the current content.
//!
//! Invariants: change sets are handed out exactly as logged (the replica verifies
//! them); a position is followed from only when the log holds the change set that
//! ends there with the same checksum, otherwise the answer is a snapshot.

use std::io::Write;
use std::sync::MutexGuard;

use crate::ltx::{self, Checksum, Encoder, Header, TxId};

use super::{CaptureState, Database, Position};
use crate::store::StoreError;

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
    ///
    /// Made from the log when it starts with a snapshot followed by a short
    /// history (it always replays to the content): the capture lock is held only
    /// to note the position and the records, so commits go on while the
    /// snapshot is written. Otherwise the content is read under the lock, so
    /// commits wait; memory use is then one page.
    pub fn write_snapshot(&self, out: &mut dyn Write) -> Result<Position, StoreError> {
        let history = {
            let state = self.lock();
            state
                .log
                .history_until(state.position.txid, state.position.checksum)?
                .map(|history| (history, state.position))
        };
        if let Some((history, position)) = history {
            let header = history
                .write_snapshot(self.options.compress, self.shared.epoch(), out)
                .map_err(|error| match error {
                    StoreError::Capture { message, .. } => StoreError::Capture {
                        database: self.name.clone(),
                        message,
                    },
                    error => error,
                })?;
            debug_assert_eq!(header.max_txid, position.txid);
            return Ok(position);
        }
        let state = self.lock();
        self.encode_snapshot(&state, out)?;
        Ok(state.position)
    }

    fn encode_snapshot(
        &self,
        state: &MutexGuard<'_, CaptureState>,
        out: &mut dyn Write,
    ) -> Result<(), StoreError> {
        let position = state.position;
        let page_size = state.page_size.max(512);
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
            page_size,
            commit: state.commit,
            min_txid: TxId(1),
            max_txid: position.txid,
            timestamp: crate::store::cluster::unix_now_ms(),
            pre_apply_checksum: Checksum(0),
            node_id: self.shared.epoch(),
            ..Header::default()
        };
        let mut encoder = Encoder::new(out, header).map_err(encode_error)?;
        let lock_page = ltx::lock_page_number(page_size);
        let mut page = vec![0u8; page_size as usize];
        for pgno in (1..=state.commit).filter(|&pgno| pgno != lock_page) {
            state.read_logical_page(pgno, page_size, &mut page)?;
            encoder.encode_page(pgno, &page).map_err(encode_error)?;
        }
        encoder.finish(position.checksum).map_err(encode_error)?;
        Ok(())
    }
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
