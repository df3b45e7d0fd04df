//! The one bridge between the FUSE threads and the async tasks: commits captured
//! (or applied) by the store, and changes of the node's role or primary, wake the
//! async tasks waiting for them (replication streams, the proxy).
//!
//! The store calls [`CommitBridge::committed`] on a FUSE thread while it holds a
//! database's capture lock, so it must never block or wait for an async task. It
//! only bumps a counter in a `tokio::sync::watch` channel: a short critical
//! section shared with subscribers that copy the counter, never held across an
//! await. Subscribers ([`CommitWatch`]) are woken by the change; they learn that
//! something committed since they last looked, not what: each stream then asks
//! the store for every database's position, so a burst of commits costs one
//! wake-up, and no commit is ever missed.

use tokio::sync::watch;

use crate::store::CommitListener;

/// Turns the store's commit notifications into wake-ups for async tasks.
/// Install it with `Store::set_commit_listener`.
#[derive(Debug)]
pub struct CommitBridge {
    commits: watch::Sender<u64>,
}

impl CommitBridge {
    /// A bridge nobody listens to yet.
    pub fn new() -> CommitBridge {
        CommitBridge {
            commits: watch::Sender::new(0),
        }
    }

    /// A new subscriber, which has seen every commit so far.
    pub fn subscribe(&self) -> CommitWatch {
        CommitWatch {
            commits: self.commits.subscribe(),
        }
    }
}

impl Default for CommitBridge {
    fn default() -> CommitBridge {
        CommitBridge::new()
    }
}

impl CommitListener for CommitBridge {
    fn committed(&self, _name: &str) {
        // Never blocks: the watch's lock is only ever held to change or copy a u64.
        self.commits
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A role or primary change wakes subscribers too: they look again at what
    /// they wait for.
    fn cluster_changed(&self) {
        self.committed("");
    }
}

/// One async task's view of the commits.
#[derive(Debug)]
pub struct CommitWatch {
    commits: watch::Receiver<u64>,
}

impl CommitWatch {
    /// Marks every commit so far as seen. Call it before looking at the store's
    /// positions, so that a commit racing with the look wakes the next
    /// [`CommitWatch::changed`].
    pub fn mark_seen(&mut self) {
        self.commits.borrow_and_update();
    }

    /// Waits until something commits after the last [`CommitWatch::mark_seen`]
    /// (returns at once if something already has), and marks it seen.
    pub async fn changed(&mut self) {
        if self.commits.changed().await.is_err() {
            // The bridge is gone, so nothing will ever commit through it again.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_commit_wakes_a_waiting_subscriber() {
        let bridge = std::sync::Arc::new(CommitBridge::new());
        let mut watch = bridge.subscribe();
        let waiter = tokio::spawn(async move {
            watch.changed().await;
        });
        tokio::task::yield_now().await;
        let from_thread = bridge.clone();
        std::thread::spawn(move || from_thread.committed("app.db"))
            .join()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[tokio::test]
    async fn a_commit_before_waiting_is_not_missed_and_seen_commits_do_not_wake() {
        let bridge = CommitBridge::new();
        let mut watch = bridge.subscribe();
        bridge.committed("a.db");
        bridge.committed("b.db");
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("a commit before the wait still wakes it");

        bridge.committed("a.db");
        watch.mark_seen();
        let waited = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
        assert!(waited.is_err(), "a commit already seen must not wake");
    }
}
