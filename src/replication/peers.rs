//! Catching up from the other replicas before taking over from a primary that
//! failed.
//!
//! Replication is asynchronous: when a primary dies, each replica holds the change
//! sets that reached it, and the candidate that takes the lease may hold fewer
//! than another replica. Were it to accept writes at once, the other replica's
//! extra change sets (which the old primary had acknowledged) would conflict with
//! the new primary's, and that replica would discard them for a snapshot. So:
//!
//! - a primary names its replicas to each of them (`Peers`): those whose stream
//!   has caught up and that said where they can be reached;
//! - every replica keeps the latest list in [`KnownPeers`];
//! - a candidate that takes the lease after its primary failed (not by a handoff,
//!   which brings it everything) runs [`catch_up_from_peers`] before it accepts
//!   writes. It asks every known peer for its status at once, each within
//!   [`PEER_STATUS_TIMEOUT`]; a peer is ahead on a database when its TXID is
//!   higher than this node's, or this node lacks the database. From each peer
//!   that is ahead, most advanced first, it opens a catch-up stream for the
//!   databases on which the peer is still ahead, and applies what the peer sends:
//!   the change sets that follow this node's positions, from the peer's log, or a
//!   snapshot of a database this node lacks or whose position the peer cannot
//!   follow.
//!
//! The peers all followed the same primary, and a replica is named only once its
//! stream has caught up (after the snapshot that resynchronised it, if it needed
//! one), so their histories are prefixes of one another and the most advanced
//! peer's is the longest. A write the old primary acknowledged is therefore lost
//! only when no surviving node received it, or when the peer that has it cannot be
//! reached within the time the role loop allows.
//!
//! Invariants: at most [`MAX_PEERS`] peers are named or asked; every change set a
//! peer sends goes through the same checks as the primary's (its CRC, then the
//! store's position and checksum checks), so a peer can send nothing that does
//! not follow this node's history except a snapshot, whose discards are logged by
//! TXID.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::ltx::TxId;
use crate::store::Store;

use super::status::fetch_status;
use super::{ClientCredentials, ReplicationError, blocking, client};
use crate::sync::LockUnpoisoned;

/// The most peers a primary names, and a new primary asks.
pub const MAX_PEERS: usize = 256;

/// How long a node taking over waits for each peer's status.
pub const PEER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// How many times a catch-up from one peer is tried before the node gives up
/// on what that peer holds.
const CATCH_UP_ATTEMPTS: u32 = 3;

/// A replica of the same primary, as that primary named it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    /// Its hostname.
    pub hostname: String,
    /// Where it serves replication (its advertised URL).
    pub url: String,
}

/// The peers a replica's last primary named; kept when the stream ends, so that
/// they are known when the primary has failed.
#[derive(Debug, Default)]
pub struct KnownPeers(Mutex<Vec<Peer>>);

impl KnownPeers {
    /// Replaces the list with the one the primary just sent.
    pub fn replace(&self, peers: Vec<Peer>) {
        *self.0.lock_unpoisoned() = peers;
    }

    /// The peers last named.
    pub fn get(&self) -> Vec<Peer> {
        self.0.lock_unpoisoned().clone()
    }
}

/// What [`catch_up_from_peers`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerCatchUp {
    /// The peers this node caught up from.
    pub caught_up_from: Vec<String>,
    /// The peers that did not answer, or failed while sending; they may hold
    /// change sets this node lacks.
    pub unreachable: Vec<String>,
}

/// Brings this node (`hostname`, whose store is still a replica's) up to the most
/// advanced of `peers` (see the module docs). Logs what it does; never fails: a
/// peer that cannot be reached is reported in [`PeerCatchUp::unreachable`].
pub async fn catch_up_from_peers(
    store: &Arc<Store>,
    credentials: &ClientCredentials,
    hostname: &str,
    peers: &[Peer],
) -> PeerCatchUp {
    let mut report = PeerCatchUp::default();
    let mut asking = JoinSet::new();
    for peer in peers
        .iter()
        .filter(|peer| peer.hostname != hostname)
        .take(MAX_PEERS)
    {
        let peer = peer.clone();
        let credentials = credentials.clone();
        asking.spawn(async move {
            let answer =
                tokio::time::timeout(PEER_STATUS_TIMEOUT, fetch_status(&peer.url, &credentials))
                    .await;
            (peer, answer)
        });
    }
    // Per peer that answered, the TXID of each of its databases.
    let mut answered: Vec<(Peer, BTreeMap<String, TxId>)> = Vec::new();
    while let Some(joined) = asking.join_next().await {
        let Ok((peer, answer)) = joined else {
            continue;
        };
        match answer {
            Ok(Ok(status)) => {
                let txids = status
                    .databases
                    .into_iter()
                    .map(|database| (database.name, database.position.txid))
                    .collect();
                answered.push((peer, txids));
            }
            Ok(Err(error)) => {
                let error: &dyn std::error::Error = &error;
                tracing::warn!(peer = %peer.hostname, url = %peer.url, error, "cannot ask a peer whether it holds change sets this node lacks");
                report.unreachable.push(peer.hostname);
            }
            Err(_) => {
                tracing::warn!(peer = %peer.hostname, url = %peer.url, timeout = ?PEER_STATUS_TIMEOUT, "a peer did not say in time whether it holds change sets this node lacks");
                report.unreachable.push(peer.hostname);
            }
        }
    }
    // The most advanced first: after it, the others are rarely still ahead.
    answered.sort_by_key(|(peer, txids)| {
        let total: u64 = txids.values().map(|txid| txid.0).sum();
        (std::cmp::Reverse(total), peer.hostname.clone())
    });
    for (peer, txids) in answered {
        let local = match local_txids(store).await {
            Ok(local) => local,
            Err(error) => {
                let error: &dyn std::error::Error = &error;
                tracing::error!(
                    error,
                    "cannot read this node's positions to catch up from peers"
                );
                break;
            }
        };
        let behind = databases_behind(&local, &txids);
        if behind.is_empty() {
            continue;
        }
        tracing::info!(peer = %peer.hostname, databases = ?behind, "catching up from a peer that is ahead of this node before accepting writes");
        let mut attempt = 1;
        loop {
            let caught_up = client::catch_up_from(
                store,
                credentials,
                &peer.hostname,
                &peer.url,
                hostname,
                behind.clone(),
            )
            .await;
            let error = match caught_up {
                Ok(()) => {
                    report.caught_up_from.push(peer.hostname);
                    break;
                }
                Err(error) => error,
            };
            let error: &dyn std::error::Error = &error;
            if attempt < CATCH_UP_ATTEMPTS {
                // A change set refused because this node moved meanwhile (an
                // apply of the last primary's stream finishing late) is sent
                // again from the new position.
                tracing::warn!(peer = %peer.hostname, url = %peer.url, error, attempt, "catching up from a peer failed; trying again");
                attempt += 1;
                continue;
            }
            tracing::warn!(peer = %peer.hostname, url = %peer.url, error, "could not catch up from a peer; it may hold change sets this node lacks");
            report.unreachable.push(peer.hostname);
            break;
        }
    }
    if let Ok(local) = local_txids(store).await {
        tracing::info!(positions = ?local, caught_up_from = ?report.caught_up_from, unreachable = ?report.unreachable, "caught up from the peers");
    }
    report
}

/// The TXID of each of this node's databases.
async fn local_txids(store: &Arc<Store>) -> Result<BTreeMap<String, TxId>, ReplicationError> {
    let store = store.clone();
    blocking(move || {
        Ok(store
            .positions()
            .into_iter()
            .map(|(name, position)| (name, position.txid))
            .collect())
    })
    .await
}

/// The databases on which a peer at `peer` is ahead of this node at `local`.
fn databases_behind(local: &BTreeMap<String, TxId>, peer: &BTreeMap<String, TxId>) -> Vec<String> {
    peer.iter()
        .filter(|(name, txid)| local.get(*name).is_none_or(|local| local < *txid))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txids(entries: &[(&str, u64)]) -> BTreeMap<String, TxId> {
        entries
            .iter()
            .map(|(name, txid)| (name.to_string(), TxId(*txid)))
            .collect()
    }

    #[test]
    fn a_peer_is_ahead_on_higher_txids_and_on_databases_this_node_lacks() {
        let local = txids(&[("a.db", 5), ("b.db", 9), ("c.db", 3)]);
        let peer = txids(&[("a.db", 7), ("b.db", 9), ("c.db", 2), ("d.db", 1)]);
        assert_eq!(databases_behind(&local, &peer), vec!["a.db", "d.db"]);
        assert!(databases_behind(&peer, &peer).is_empty());
    }
}
