//! POSIX byte-range locks, kept by ltxfs itself rather than by the kernel.
//!
//! The FUSE layer forwards every `fcntl` lock request here (the mount requests
//! `FUSE_POSIX_LOCKS`), so the core sees each lock transition: later capabilities use
//! that to detect commits, to keep readers out while a replica applies a change set,
//! and to hold a commit until replicas acknowledge it.
//!
//! Invariants:
//! - Locks of one owner never overlap each other: a new lock replaces the owner's
//!   coverage of its range, and adjacent ranges of the same kind are merged.
//! - Two different owners never hold overlapping locks unless both are read locks.
//! - A blocking request never blocks the calling thread: it is queued with a callback
//!   that runs, on whichever thread released the conflicting lock, once it is granted.
//! - Callbacks always run after the table's mutex is released, so they may re-enter.

use crate::sync::LockUnpoisoned;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Who arbitrates the `fcntl` locks SQLite takes on the mount's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockServer {
    /// The kernel: the mount does not ask for `FUSE_POSIX_LOCKS`, so no lock
    /// call reaches ltxfs, and ltxfs takes the locks it needs itself as open
    /// file description locks on its own descriptors of the mount.
    Kernel,
    /// ltxfs, from the [`LockTable`] of each file.
    Ltxfs,
}

/// The end of a range that reaches to the end of the file (the kernel's `OFFSET_MAX`).
pub const END_OF_FILE: u64 = i64::MAX as u64;

/// Who holds a lock: the kernel's lock owner id (a process for classic POSIX locks,
/// an open file description for OFD locks).
pub type LockOwner = u64;

/// The two kinds of byte-range lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A shared lock (`F_RDLCK`).
    Read,
    /// An exclusive lock (`F_WRLCK`).
    Write,
}

/// An inclusive byte range `[start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte of the range.
    pub start: u64,
    /// Last byte of the range (inclusive); [`END_OF_FILE`] for "to the end".
    pub end: u64,
}

impl ByteRange {
    /// Builds a range; `None` when `end < start`.
    pub fn new(start: u64, end: u64) -> Option<ByteRange> {
        (start <= end).then_some(ByteRange { start, end })
    }

    fn overlaps(&self, other: &ByteRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

/// A lock held by an owner, as reported to `F_GETLK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLock {
    /// The owner holding the lock.
    pub owner: LockOwner,
    /// The process id the kernel reported when the lock was taken.
    pub pid: u32,
    /// The locked bytes.
    pub range: ByteRange,
    /// Read or write.
    pub kind: LockKind,
}

/// A request to lock a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// Who asks.
    pub owner: LockOwner,
    /// The process id to report to `F_GETLK` callers.
    pub pid: u32,
    /// The bytes to lock.
    pub range: ByteRange,
    /// Read or write.
    pub kind: LockKind,
}

/// Why a lock could not be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// A conflicting lock is held and the caller did not want to wait.
    #[error("the byte range is locked by another owner")]
    WouldBlock,
    /// The waiter was cancelled because its file was closed.
    #[error("the lock wait was cancelled")]
    Cancelled,
}

/// What happened to a lock request that was allowed to wait.
#[derive(Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// The lock was granted at once; the callback has already run.
    Granted,
    /// The request waits; its callback runs once it is granted.
    Queued,
}

/// The callback of a queued blocking request.
pub type OnGranted = Box<dyn FnOnce(Result<(), LockError>) + Send>;

struct Waiter {
    request: LockRequest,
    on_granted: OnGranted,
    /// ltxfs's own request to keep readers out (replica apply): while it waits, no
    /// other owner is granted an overlapping lock, so a stream of short readers
    /// cannot starve it.
    priority: bool,
}

#[derive(Default)]
struct LockState {
    held: Vec<HeldLock>,
    waiters: VecDeque<Waiter>,
}

/// The byte-range locks of one file.
#[derive(Default)]
pub struct LockTable {
    state: Mutex<LockState>,
}

impl std::fmt::Debug for LockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock_state();
        f.debug_struct("LockTable")
            .field("held", &state.held)
            .field("waiters", &state.waiters.len())
            .finish()
    }
}

impl LockTable {
    /// Returns the first lock that would conflict with `request`, as `F_GETLK` does.
    pub fn conflicting(&self, request: &LockRequest) -> Option<HeldLock> {
        self.lock_state().first_conflict(request)
    }

    /// Takes a lock without waiting.
    pub fn try_lock(&self, request: LockRequest) -> Result<(), LockError> {
        let mut state = self.lock_state();
        if state.first_conflict(&request).is_some() || state.fenced(&request) {
            return Err(LockError::WouldBlock);
        }
        state.set(request);
        Ok(())
    }

    /// Takes a lock, or queues the request. `on_granted` runs exactly once: at once
    /// when the lock is free, otherwise on the thread that later makes it free (or
    /// with [`LockError::Cancelled`] when the owner goes away first).
    pub fn lock_or_queue(&self, request: LockRequest, on_granted: OnGranted) -> LockOutcome {
        self.enqueue(request, on_granted, false)
    }

    /// Takes a lock for ltxfs itself, blocking the calling thread until it is
    /// granted. While it waits, other owners' new overlapping requests wait behind
    /// it (a non-blocking one fails), so readers that come and go cannot starve it.
    /// Never call this on a FUSE worker thread: it waits for other requests.
    pub fn lock_with_priority(&self, request: LockRequest) {
        let (granted_tx, granted_rx) = std::sync::mpsc::sync_channel(1);
        let on_granted: OnGranted = Box::new(move |result| {
            let _ = granted_tx.send(result);
        });
        self.enqueue(request, on_granted, true);
        // A priority waiter is never cancelled: its owner is not a kernel lock
        // owner, so no close or reaper can match it.
        let _ = granted_rx.recv();
    }

    fn enqueue(&self, request: LockRequest, on_granted: OnGranted, priority: bool) -> LockOutcome {
        let mut state = self.lock_state();
        if state.first_conflict(&request).is_none() && !state.fenced(&request) {
            state.set(request);
            drop(state);
            on_granted(Ok(()));
            return LockOutcome::Granted;
        }
        let waiter = Waiter {
            request,
            on_granted,
            priority,
        };
        if priority {
            // Ahead of ordinary waiters, behind earlier priority ones.
            let at = state
                .waiters
                .iter()
                .position(|waiter| !waiter.priority)
                .unwrap_or(state.waiters.len());
            state.waiters.insert(at, waiter);
        } else {
            state.waiters.push_back(waiter);
        }
        LockOutcome::Queued
    }

    /// Releases `owner`'s locks on `range` (which may split a held lock in two).
    pub fn unlock(&self, owner: LockOwner, range: ByteRange) {
        let granted = {
            let mut state = self.lock_state();
            state.remove(owner, range);
            state.grant_waiters()
        };
        run_callbacks(granted);
    }

    /// Releases every lock of `owner` but leaves its queued requests waiting (POSIX
    /// close semantics: closing any descriptor drops the process's locks).
    pub fn unlock_all(&self, owner: LockOwner) {
        let granted = {
            let mut state = self.lock_state();
            state.held.retain(|lock| lock.owner != owner);
            state.grant_waiters()
        };
        run_callbacks(granted);
    }

    /// Releases every lock of `owner` and cancels its queued requests (the owner's
    /// open file description is gone).
    pub fn release_owner(&self, owner: LockOwner) {
        let (granted, cancelled) = {
            let mut state = self.lock_state();
            state.held.retain(|lock| lock.owner != owner);
            let (cancelled, kept): (VecDeque<Waiter>, VecDeque<Waiter>) = state
                .waiters
                .drain(..)
                .partition(|waiter| waiter.request.owner == owner);
            state.waiters = kept;
            (state.grant_waiters(), cancelled)
        };
        for waiter in cancelled {
            (waiter.on_granted)(Err(LockError::Cancelled));
        }
        run_callbacks(granted);
    }

    /// Cancels the queued requests for which `is_abandoned` is true (their process
    /// died while waiting) and returns how many were cancelled.
    pub fn cancel_waiters(&self, is_abandoned: impl Fn(&LockRequest) -> bool) -> usize {
        let cancelled: VecDeque<Waiter> = {
            let mut state = self.lock_state();
            if state.waiters.is_empty() {
                return 0;
            }
            let (cancelled, kept) = state
                .waiters
                .drain(..)
                .partition(|waiter| is_abandoned(&waiter.request));
            state.waiters = kept;
            cancelled
        };
        let count = cancelled.len();
        for waiter in cancelled {
            (waiter.on_granted)(Err(LockError::Cancelled));
        }
        count
    }

    /// True when any owner holds a write lock on a byte of `range`.
    pub fn is_write_locked(&self, range: ByteRange) -> bool {
        self.lock_state()
            .held
            .iter()
            .any(|lock| lock.kind == LockKind::Write && lock.range.overlaps(&range))
    }

    /// True when `owner` holds any lock in this table.
    #[cfg(test)]
    pub fn holds_any(&self, owner: LockOwner) -> bool {
        self.lock_state()
            .held
            .iter()
            .any(|lock| lock.owner == owner)
    }

    /// A copy of the locks currently held, ordered by owner then start.
    #[cfg(test)]
    pub fn held(&self) -> Vec<HeldLock> {
        let mut held = self.lock_state().held.clone();
        held.sort_by_key(|lock| (lock.owner, lock.range.start));
        held
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, LockState> {
        // A panic while holding this mutex cannot leave the lock list half-edited in a
        // way that matters more than losing every lock, so recover the data.
        self.state.lock_unpoisoned()
    }
}

fn run_callbacks(granted: Vec<OnGranted>) {
    for on_granted in granted {
        on_granted(Ok(()));
    }
}

impl LockState {
    /// True when a waiting priority request of another owner overlaps `request`.
    fn fenced(&self, request: &LockRequest) -> bool {
        self.waiters.iter().any(|waiter| {
            waiter.priority
                && waiter.request.owner != request.owner
                && waiter.request.range.overlaps(&request.range)
        })
    }

    fn first_conflict(&self, request: &LockRequest) -> Option<HeldLock> {
        self.held
            .iter()
            .find(|lock| {
                lock.owner != request.owner
                    && lock.range.overlaps(&request.range)
                    && (lock.kind == LockKind::Write || request.kind == LockKind::Write)
            })
            .copied()
    }

    /// Replaces the owner's coverage of the range with the requested lock, then
    /// merges it with adjacent or overlapping locks of the same owner and kind.
    fn set(&mut self, request: LockRequest) {
        self.remove(request.owner, request.range);
        let mut merged = HeldLock {
            owner: request.owner,
            pid: request.pid,
            range: request.range,
            kind: request.kind,
        };
        self.held.retain(|lock| {
            let touches = lock.range.end.saturating_add(1) >= merged.range.start
                && merged.range.end.saturating_add(1) >= lock.range.start;
            if lock.owner == merged.owner && lock.kind == merged.kind && touches {
                merged.range.start = merged.range.start.min(lock.range.start);
                merged.range.end = merged.range.end.max(lock.range.end);
                false
            } else {
                true
            }
        });
        self.held.push(merged);
    }

    /// Removes the owner's coverage of `range`, splitting locks that stick out of it.
    fn remove(&mut self, owner: LockOwner, range: ByteRange) {
        let mut kept = Vec::with_capacity(self.held.len() + 1);
        for lock in self.held.drain(..) {
            if lock.owner != owner || !lock.range.overlaps(&range) {
                kept.push(lock);
                continue;
            }
            if lock.range.start < range.start {
                kept.push(HeldLock {
                    range: ByteRange {
                        start: lock.range.start,
                        end: range.start - 1,
                    },
                    ..lock
                });
            }
            if lock.range.end > range.end {
                kept.push(HeldLock {
                    range: ByteRange {
                        start: range.end + 1,
                        end: lock.range.end,
                    },
                    ..lock
                });
            }
        }
        self.held = kept;
    }

    /// Grants queued requests that no longer conflict, in arrival order, and returns
    /// their callbacks for the caller to run after unlocking.
    fn grant_waiters(&mut self) -> Vec<OnGranted> {
        let mut granted = Vec::new();
        let mut still_waiting = VecDeque::with_capacity(self.waiters.len());
        while let Some(waiter) = self.waiters.pop_front() {
            let fenced = !waiter.priority
                && still_waiting.iter().any(|earlier: &Waiter| {
                    earlier.priority
                        && earlier.request.owner != waiter.request.owner
                        && earlier.request.range.overlaps(&waiter.request.range)
                });
            if !fenced && self.first_conflict(&waiter.request).is_none() {
                self.set(waiter.request);
                granted.push(waiter.on_granted);
            } else {
                still_waiting.push_back(waiter);
            }
        }
        self.waiters = still_waiting;
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn request(owner: LockOwner, start: u64, end: u64, kind: LockKind) -> LockRequest {
        LockRequest {
            owner,
            pid: owner as u32,
            range: ByteRange::new(start, end).unwrap(),
            kind,
        }
    }

    #[test]
    fn read_locks_share_and_write_locks_exclude() {
        let table = LockTable::default();
        table.try_lock(request(1, 0, 9, LockKind::Read)).unwrap();
        table.try_lock(request(2, 5, 14, LockKind::Read)).unwrap();
        assert_eq!(
            table.try_lock(request(3, 8, 8, LockKind::Write)),
            Err(LockError::WouldBlock)
        );
        table.try_lock(request(3, 15, 20, LockKind::Write)).unwrap();
    }

    #[test]
    fn write_locked_sees_only_write_locks_on_the_range() {
        let table = LockTable::default();
        let writer_bytes = ByteRange::new(10, 11).unwrap();
        table.try_lock(request(1, 0, 20, LockKind::Read)).unwrap();
        assert!(!table.is_write_locked(writer_bytes));
        table.try_lock(request(1, 11, 11, LockKind::Write)).unwrap();
        assert!(table.is_write_locked(writer_bytes));
        table.unlock(1, ByteRange::new(11, 11).unwrap());
        assert!(!table.is_write_locked(writer_bytes));
    }

    #[test]
    fn conflicting_reports_the_holders_kind_and_range() {
        let table = LockTable::default();
        table
            .try_lock(request(1, 100, 100, LockKind::Write))
            .unwrap();
        let conflict = table
            .conflicting(&request(2, 0, END_OF_FILE, LockKind::Read))
            .unwrap();
        assert_eq!(conflict.kind, LockKind::Write);
        assert_eq!(conflict.range, ByteRange::new(100, 100).unwrap());
        assert_eq!(conflict.pid, 1);
        assert!(
            table
                .conflicting(&request(1, 0, END_OF_FILE, LockKind::Write))
                .is_none(),
            "an owner never conflicts with itself"
        );
    }

    #[test]
    fn unlock_splits_and_upgrade_replaces() {
        let table = LockTable::default();
        table.try_lock(request(1, 0, 99, LockKind::Read)).unwrap();
        table.unlock(1, ByteRange::new(40, 59).unwrap());
        let ranges: Vec<_> = table.held().iter().map(|lock| lock.range).collect();
        assert_eq!(
            ranges,
            vec![
                ByteRange::new(0, 39).unwrap(),
                ByteRange::new(60, 99).unwrap()
            ]
        );
        table.try_lock(request(1, 30, 70, LockKind::Write)).unwrap();
        let held = table.held();
        assert_eq!(held.len(), 3);
        assert!(
            held.iter()
                .any(|lock| lock.kind == LockKind::Write && lock.range.start == 30)
        );
        table.try_lock(request(1, 0, 99, LockKind::Read)).unwrap();
        assert_eq!(table.held().len(), 1, "same-kind ranges merge");
    }

    #[test]
    fn queued_request_is_granted_from_the_releasing_call() {
        let table = LockTable::default();
        table.try_lock(request(1, 0, 0, LockKind::Write)).unwrap();
        let granted = Arc::new(AtomicUsize::new(0));
        let seen = granted.clone();
        let outcome = table.lock_or_queue(
            request(2, 0, 0, LockKind::Write),
            Box::new(move |result| {
                assert_eq!(result, Ok(()));
                seen.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(outcome, LockOutcome::Queued);
        assert_eq!(granted.load(Ordering::SeqCst), 0);
        table.unlock_all(1);
        assert_eq!(granted.load(Ordering::SeqCst), 1);
        assert!(table.holds_any(2));
    }

    #[test]
    fn abandoned_waiters_are_cancelled_and_others_keep_waiting() {
        let table = LockTable::default();
        table.try_lock(request(1, 0, 0, LockKind::Write)).unwrap();
        let results = Arc::new(std::sync::Mutex::new(Vec::new()));
        for owner in [2, 3] {
            let results = results.clone();
            table.lock_or_queue(
                request(owner, 0, 0, LockKind::Write),
                Box::new(move |result| results.lock().unwrap().push((owner, result))),
            );
        }
        assert_eq!(table.cancel_waiters(|request| request.owner == 2), 1);
        assert_eq!(
            *results.lock().unwrap(),
            vec![(2, Err(LockError::Cancelled))]
        );
        table.unlock_all(1);
        assert_eq!(results.lock().unwrap()[1], (3, Ok(())));
    }

    #[test]
    fn releasing_an_owner_cancels_its_waiters() {
        let table = LockTable::default();
        table.try_lock(request(1, 0, 0, LockKind::Write)).unwrap();
        let cancelled = Arc::new(AtomicUsize::new(0));
        let seen = cancelled.clone();
        table.lock_or_queue(
            request(2, 0, 0, LockKind::Read),
            Box::new(move |result| {
                assert_eq!(result, Err(LockError::Cancelled));
                seen.fetch_add(1, Ordering::SeqCst);
            }),
        );
        table.release_owner(2);
        assert_eq!(cancelled.load(Ordering::SeqCst), 1);
        assert!(table.holds_any(1));
    }
}
