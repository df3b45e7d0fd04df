//! What this node knows about its place in the cluster: whether it is the primary
//! or a replica, which primary it follows, and when it last heard from it.
//!
//! The store keeps this because the filesystem serves it (`.primary`, `.lag`) and
//! because the role decides whether local processes may write databases. The
//! replication client updates it; nothing here does I/O.
//!
//! Invariants: `primary` is `Some` only while a replica is connected to a primary
//! (so `.primary` is never stale); a primary never has one. A primary whose
//! lease deadline passed does not [hold the role](ClusterView::holds_primary),
//! even before the role loop has demoted it (a stopped or cut-off process may
//! resume with its FUSE workers ahead of the role loop).

use crate::sync::LockUnpoisoned;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether local processes may write this node's databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Local writes are captured as change sets.
    Primary,
    /// Databases change only by applying the primary's change sets; local
    /// processes may read them but not open them for writing.
    Replica,
}

impl Role {
    /// The role's name as operators see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// The node's role and its view of the primary.
#[derive(Debug)]
pub struct ClusterView {
    role: AtomicU8,
    primary: Mutex<Option<String>>,
    /// The URL of the primary's write-forwarding proxy, when it runs one.
    primary_proxy_url: Mutex<Option<String>>,
    /// The primary's clock (Unix ms) in its last message; 0 before the first.
    last_primary_timestamp_ms: AtomicU64,
    /// When the lease this node holds as primary must have been renewed by
    /// (`None`: no lease bounds the role, as in a store without a role loop).
    lease_deadline: Mutex<Option<Instant>>,
    /// Counts role changes: a change made in one term is not acknowledged in
    /// another.
    term: AtomicU64,
}

impl ClusterView {
    pub(super) fn new(role: Role) -> ClusterView {
        ClusterView {
            role: AtomicU8::new(role as u8),
            primary: Mutex::new(None),
            primary_proxy_url: Mutex::new(None),
            last_primary_timestamp_ms: AtomicU64::new(0),
            lease_deadline: Mutex::new(None),
            term: AtomicU64::new(0),
        }
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        if self.role.load(Ordering::Acquire) == Role::Primary as u8 {
            Role::Primary
        } else {
            Role::Replica
        }
    }

    /// Whether this node is the primary and its lease is still certainly its
    /// own: after the lease's renewal deadline another node may hold it.
    pub fn holds_primary(&self) -> bool {
        self.role() == Role::Primary
            && self
                .lease_deadline
                .lock_unpoisoned()
                .is_none_or(|deadline| Instant::now() < deadline)
    }

    /// Records when the lease this node holds (or is about to hold) as primary
    /// must be renewed by.
    pub(super) fn set_lease_deadline(&self, deadline: Instant) {
        *self.lease_deadline.lock_unpoisoned() = Some(deadline);
    }

    /// How many times the role was set: the term changes are made in.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Changes this node's role and starts a new term; a primary follows no one.
    pub(super) fn set_role(&self, role: Role) {
        self.term.fetch_add(1, Ordering::AcqRel);
        self.role.store(role as u8, Ordering::Release);
        if role == Role::Primary {
            self.set_primary(None);
        }
    }

    /// The hostname of the primary this replica is connected to, if any.
    pub fn primary(&self) -> Option<String> {
        self.primary.lock_unpoisoned().clone()
    }

    /// Records that this replica is (`Some`) or is no longer (`None`) connected to
    /// a primary ([`super::Store::set_primary`] also refreshes the kernel's view).
    pub(super) fn set_primary(&self, hostname: Option<String>) {
        if hostname.is_none() {
            self.set_primary_proxy_url(None);
        }
        *self.primary.lock_unpoisoned() = hostname;
    }

    /// The URL of the primary's write-forwarding proxy, when this replica is
    /// connected to a primary that runs one.
    pub fn primary_proxy_url(&self) -> Option<String> {
        self.primary_proxy_url.lock_unpoisoned().clone()
    }

    /// Records the primary's proxy URL (from its `Hello`); set before the primary
    /// itself, and forgotten with it.
    pub fn set_primary_proxy_url(&self, url: Option<String>) {
        *self.primary_proxy_url.lock_unpoisoned() = url;
    }

    /// Records the primary's clock from a message it sent.
    pub fn note_primary_timestamp(&self, unix_ms: u64) {
        self.last_primary_timestamp_ms
            .fetch_max(unix_ms, Ordering::AcqRel);
    }

    /// The primary's last timestamp this replica heard, in Unix milliseconds;
    /// `None` on the primary and before a replica has heard one.
    pub fn last_primary_timestamp_ms(&self) -> Option<u64> {
        if self.role() == Role::Primary {
            return None;
        }
        Some(self.last_primary_timestamp_ms.load(Ordering::Acquire)).filter(|&ms| ms != 0)
    }

    /// How far this node is behind the primary: zero on the primary, the time
    /// since the primary's last timestamp on a replica, `None` on a replica that
    /// has not heard from a primary yet.
    pub fn lag(&self) -> Option<Duration> {
        if self.role() == Role::Primary {
            return Some(Duration::ZERO);
        }
        let last = self.last_primary_timestamp_ms.load(Ordering::Acquire);
        if last == 0 {
            return None;
        }
        Some(Duration::from_millis(unix_now_ms().saturating_sub(last)))
    }
}

/// The current time in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_has_no_primary_and_no_lag() {
        let view = ClusterView::new(Role::Replica);
        assert_eq!(view.lag(), None);
        view.set_primary(Some("node-a".into()));
        view.note_primary_timestamp(unix_now_ms());
        assert!(view.lag().unwrap() < Duration::from_secs(5));
        view.set_role(Role::Primary);
        assert_eq!(view.primary(), None);
        assert_eq!(view.lag(), Some(Duration::ZERO));
    }

    #[test]
    fn a_primary_past_its_lease_deadline_no_longer_holds_the_role() {
        let view = ClusterView::new(Role::Primary);
        assert!(view.holds_primary(), "no lease bounds the role");
        view.set_lease_deadline(Instant::now() + Duration::from_secs(60));
        assert!(view.holds_primary());
        view.set_lease_deadline(Instant::now() - Duration::from_millis(1));
        assert!(!view.holds_primary());
        assert_eq!(view.role(), Role::Primary, "the role loop demotes it later");
        view.set_lease_deadline(Instant::now() + Duration::from_secs(60));
        view.set_role(Role::Replica);
        assert!(!view.holds_primary());
    }
}
