//! The node's role loop: follows the lease and makes this node the primary or a
//! replica accordingly.
//!
//! A replica watches the lease (a blocking query or watch, never periodic polling)
//! and follows whoever holds it; a candidate tries to take the lease whenever
//! nobody holds it. Holding the lease makes the node the primary: the store
//! captures local writes under the lease's epoch. The primary renews the lease and,
//! when a renewal has not succeeded by the lease's renewal deadline (which every
//! backend sets well inside the TTL), it stops accepting writes at once — before
//! the lease can have expired anywhere — and turns into a replica.
//!
//! Invariants:
//! - The store is the primary only while this node holds an unexpired lease.
//! - At most one replication client runs, following the current holder.
//! - On shutdown the primary stops accepting writes, then releases the lease so a
//!   candidate can take over without waiting for expiry.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::{HeldLease, Lease, LeaseHolder, LeaseState};
use crate::replication;
use crate::store::{Role, Store};

/// How long one watch of the lease waits for a change before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// The pause after a coordinator error before asking again.
const COORDINATOR_RETRY: Duration = Duration::from_millis(500);

/// What the role loop needs.
#[derive(Debug)]
pub struct NodeSettings {
    /// The node's databases.
    pub store: Arc<Store>,
    /// The coordinator.
    pub lease: Arc<dyn Lease>,
    /// This node, as stored in the lease when it is the primary.
    pub me: LeaseHolder,
    /// Whether this node may become the primary.
    pub candidate: bool,
    /// The longest pause between reconnects to the primary.
    pub reconnect_delay: Duration,
}

/// The replication client following one primary.
struct Following {
    url: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Runs the role loop until `shutdown` is cancelled.
pub async fn run(settings: NodeSettings, shutdown: CancellationToken) {
    let mut node = Node {
        settings,
        following: None,
        index: None,
    };
    loop {
        let held = tokio::select! {
            () = shutdown.cancelled() => None,
            held = node.until_primary() => held,
        };
        let Some(held) = held else {
            node.stop_following().await;
            return;
        };
        node.stop_following().await;
        node.promote(&held);
        let stopped = tokio::select! {
            () = shutdown.cancelled() => true,
            () = node.hold(held.clone()) => false,
        };
        // Either way this node no longer accepts writes.
        node.demote();
        if stopped {
            if let Err(error) = node.settings.lease.release(&held).await {
                tracing::warn!(%error, "could not release the lease; another node takes over when it expires");
            } else {
                tracing::info!("released the lease");
            }
            return;
        }
    }
}

struct Node {
    settings: NodeSettings,
    following: Option<Following>,
    /// The lease state index of the last watch.
    index: Option<u64>,
}

impl Node {
    /// Follows the holder of the lease until this node acquires it.
    async fn until_primary(&mut self) -> Option<HeldLease> {
        let mut failures = 0u32;
        loop {
            let state = match self.settings.lease.watch(self.index, WATCH_WAIT).await {
                Ok(state) => {
                    failures = 0;
                    state
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(%error, failures, "cannot read the lease; still serving reads, retrying");
                    }
                    self.index = None;
                    tokio::time::sleep(COORDINATOR_RETRY).await;
                    continue;
                }
            };
            self.index = Some(state.index);
            if let Some(held) = self.try_acquire(&state).await {
                return Some(held);
            }
            if let Some((holder, _)) = &state.holder {
                if holder.advertise_url != self.settings.me.advertise_url {
                    self.follow(&holder.advertise_url).await;
                }
            }
        }
    }

    /// Takes the lease when this node is a candidate and nobody else holds it.
    async fn try_acquire(&mut self, state: &LeaseState) -> Option<HeldLease> {
        let free = match &state.holder {
            None => true,
            Some((holder, _)) => holder == &self.settings.me,
        };
        if !self.settings.candidate || !free {
            return None;
        }
        match self.settings.lease.try_acquire(&self.settings.me).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, "could not acquire the lease");
                None
            }
        }
    }

    /// Keeps renewing the lease; returns when it is lost or its renewal deadline
    /// passes without a successful renewal.
    async fn hold(&mut self, mut held: HeldLease) {
        let lease = self.settings.lease.clone();
        loop {
            let now = Instant::now();
            let deadline = Instant::from_std(held.renew_by);
            // Renew at a third of the remaining time, so two attempts fit before the
            // deadline.
            let next = now + deadline.saturating_duration_since(now) / 3;
            tokio::time::sleep_until(next).await;
            match tokio::time::timeout_at(deadline, lease.renew(&held)).await {
                Ok(Ok(renewed)) => held = renewed,
                Ok(Err(error)) => {
                    tracing::error!(%error, "lost the lease; no longer accepting writes");
                    return;
                }
                Err(_) => {
                    tracing::error!(
                        "could not renew the lease in time; no longer accepting writes"
                    );
                    return;
                }
            }
        }
    }

    fn promote(&mut self, held: &HeldLease) {
        let store = &self.settings.store;
        store.set_epoch(held.epoch.0);
        store.set_role(Role::Primary);
        tracing::info!(epoch = held.epoch.0, positions = ?store.positions(), "this node is the primary");
    }

    fn demote(&mut self) {
        if self.settings.store.cluster().role() == Role::Primary {
            self.settings.store.set_role(Role::Replica);
            tracing::info!("this node is a replica");
        }
        self.index = None;
    }

    /// Follows the primary at `url`, replacing a client following another one.
    async fn follow(&mut self, url: &str) {
        if self.following.as_ref().is_some_and(|f| f.url == url) {
            return;
        }
        self.stop_following().await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(replication::follow(
            self.settings.store.clone(),
            url.to_string(),
            self.settings.me.hostname.clone(),
            self.settings.reconnect_delay,
            stop.clone(),
        ));
        tracing::info!(primary = url, "following the primary");
        self.following = Some(Following {
            url: url.to_string(),
            stop,
            task,
        });
    }

    async fn stop_following(&mut self) {
        if let Some(following) = self.following.take() {
            following.stop.cancel();
            let _ = following.task.await;
        }
    }
}
