//! The static lease: no coordinator; the config names the primary.
//!
//! The node with `lease.candidate: true` holds the lease forever at epoch 1; every
//! other node sees that primary (from `lease.advertise-url`) and never acquires.

use std::time::{Duration, Instant};

use super::{Epoch, HeldLease, Lease, LeaseError, LeaseHolder, LeaseState};

/// How far ahead a static lease says it must be renewed: it never expires.
const STATIC_RENEWAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// A lease fixed by configuration.
#[derive(Debug, Clone)]
pub struct StaticLease {
    /// Whether this node is the configured primary.
    candidate: bool,
    /// The configured primary.
    primary: LeaseHolder,
}

impl StaticLease {
    /// The epoch of the static primary's change sets.
    pub const EPOCH: Epoch = Epoch(1);

    /// A static lease where `primary` is the primary and this node is it when
    /// `candidate` is true.
    pub fn new(candidate: bool, primary: LeaseHolder) -> StaticLease {
        StaticLease { candidate, primary }
    }
}

#[async_trait::async_trait]
impl Lease for StaticLease {
    fn ttl(&self) -> Duration {
        STATIC_RENEWAL
    }

    async fn try_acquire(&self, _me: &LeaseHolder) -> Result<Option<HeldLease>, LeaseError> {
        Ok(self.candidate.then(|| HeldLease {
            epoch: StaticLease::EPOCH,
            handle: "static".to_string(),
            renew_by: Instant::now() + STATIC_RENEWAL,
        }))
    }

    async fn renew(&self, held: &HeldLease) -> Result<HeldLease, LeaseError> {
        Ok(HeldLease {
            renew_by: Instant::now() + STATIC_RENEWAL,
            ..held.clone()
        })
    }

    async fn release(&self, _held: &HeldLease) -> Result<(), LeaseError> {
        Ok(())
    }

    async fn watch(&self, since: Option<u64>, wait: Duration) -> Result<LeaseState, LeaseError> {
        // The answer never changes, so a watch only waits out its time.
        if since.is_some() {
            tokio::time::sleep(wait).await;
        }
        Ok(LeaseState {
            holder: Some((self.primary.clone(), StaticLease::EPOCH)),
            index: 1,
        })
    }

    async fn check_cluster_id(&self, local: &str) -> Result<String, LeaseError> {
        Ok(local.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str) -> LeaseHolder {
        LeaseHolder {
            hostname: name.to_string(),
            advertise_url: format!("http://{name}:20202"),
        }
    }

    #[tokio::test]
    async fn only_the_candidate_acquires_and_everyone_sees_the_primary() {
        let primary = holder("a");
        let on_primary = StaticLease::new(true, primary.clone());
        let on_replica = StaticLease::new(false, primary.clone());
        let held = on_primary.try_acquire(&primary).await.unwrap().unwrap();
        assert_eq!(held.epoch, Epoch(1));
        assert!(
            on_replica
                .try_acquire(&holder("b"))
                .await
                .unwrap()
                .is_none()
        );
        let state = on_replica.watch(None, Duration::ZERO).await.unwrap();
        assert_eq!(state.holder, Some((primary, Epoch(1))));
    }
}
