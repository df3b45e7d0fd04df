//! What the replication server and the node's role loop share to move the
//! primary role from one node to another (a handoff).
//!
//! On the primary, [`Handoffs`] knows every open stream (its replica, whether it
//! is a candidate, how far it has been sent) and the handoff phase, which every
//! stream's producer watches:
//!
//! ```text
//!   Idle ──(handoff starts)──▶ Draining ──(writes stopped)──▶ HandingOff { to, positions }
//!    ▲                                                                 │
//!    └─────────────────────────(the new primary holds the lease)──────┘
//! ```
//!
//! - `Draining`: the node is stopping local writes; producers wait instead of
//!   treating the lost primary role as an error.
//! - `HandingOff`: no write is accepted any more and `positions` is where every
//!   database ends; each producer sends what its replica still lacks up to there,
//!   then a `Handoff` naming the replica `to`, and ends its stream.
//!
//! On a replica, the client publishes a [`FollowerState`]: whether it is
//! connected to a primary's stream, and the last `Handoff` it received (after
//! applying everything before it, so the replica is exactly at the handoff's
//! positions). The role loop takes a free lease only when that is safe: not while
//! a live stream may still carry change sets, and not while a handoff to another
//! node may still complete.
//!
//! The registry also publishes the peers: the replicas whose streams have caught
//! up and that said where they can be reached. Every live stream sends them to its
//! replica (`Peers`), so that a candidate taking over after this primary failed
//! knows whom to catch up from.
//!
//! [`ControlRequest`]s carry the `Handoff` and `Promote` RPCs from the server to
//! the role loop, through a channel of [`CONTROL_REQUESTS`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::ltx::TxId;
use crate::store::{CommitHold, Position, Unacknowledged};

use super::peers::{MAX_PEERS, Peer};
use super::proto;
use super::wire::parse_hostname;
use super::{ClientCredentials, ReplicationError, connect, remote_error};
use crate::sync::LockUnpoisoned;

/// How many control requests may wait for the role loop.
pub const CONTROL_REQUESTS: usize = 4;

/// Where a primary's handoff stands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HandoffPhase {
    /// No handoff: a producer on a node that is not the primary stops.
    #[default]
    Idle,
    /// Local writes are being stopped; producers wait for the final positions.
    Draining,
    /// Local writes are stopped: every stream is brought to `positions`, then told
    /// that `to` takes over.
    HandingOff {
        /// The replica that takes the lease.
        to: String,
        /// Where every database ends.
        positions: Vec<(String, Position)>,
    },
}

/// A request from an RPC for the role loop. Each carries where its answer goes.
#[derive(Debug)]
pub enum ControlRequest {
    /// A candidate replica asks this primary to hand the lease to it. Answered
    /// once the replica holds the lease.
    HandOffTo {
        /// The replica's hostname.
        hostname: String,
        /// The outcome: an error says why the handoff did not happen.
        reply: oneshot::Sender<Result<(), RoleRefusal>>,
    },
    /// The operator asks this replica to become the primary. Answered with the
    /// previous primary's hostname once this node is the primary.
    Promote {
        /// The outcome: an error says why this node did not become the primary.
        reply: oneshot::Sender<Result<String, RoleRefusal>>,
    },
}

/// Why the role loop did not hand the primary role over, or take it, as a
/// [`ControlRequest`] asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RoleRefusal {
    /// A handoff was asked of a replica.
    #[error("this node is not the primary")]
    NotPrimary,
    /// A promotion was asked of the primary.
    #[error("this node is already the primary")]
    AlreadyPrimary,
    /// The replica that asked for the role has no candidate stream from this
    /// primary.
    #[error("{0} is not a candidate replica connected to this primary")]
    NotConnectedCandidate(String),
    /// A promotion was asked of a replica that may not be the primary.
    #[error("this node is not a candidate (lease.candidate is false)")]
    NotCandidate,
    /// A promotion was asked of a replica that follows nobody.
    #[error("this node follows no primary to take over from")]
    NoPrimary,
    /// The role loop stopped before answering.
    #[error("this node is shutting down")]
    ShuttingDown,
    /// The lease was released, but the replica did not take it in time.
    #[error("{hostname} did not take the lease within {timeout:?}")]
    NotTaken {
        /// The replica the role was handed to.
        hostname: String,
        /// How long it had.
        timeout: Duration,
    },
    /// The primary did not hand its role over to this replica.
    #[error(transparent)]
    HandoffFailed(Arc<ReplicationError>),
    /// The task asking the primary for the role ended without an answer.
    #[error("the handoff request failed: {0}")]
    HandoffAborted(Arc<tokio::task::JoinError>),
}

/// One open stream, as the handoff sees it.
#[derive(Debug, Clone)]
struct StreamEntry {
    replica: String,
    candidate: bool,
    /// Where other nodes reach the replica, if it said.
    advertise_url: Option<String>,
    /// Whether the stream has sent `Ready`: the replica has everything the
    /// primary had when it connected.
    caught_up: bool,
    /// Per database, the TXID the replica acknowledged having applied.
    acknowledged: BTreeMap<String, TxId>,
    /// The sum of the TXIDs sent on the stream, per database: how far along the
    /// replica will be once it has applied what was sent.
    sent: BTreeMap<String, u64>,
}

/// The primary's side of handoffs: open streams, the phase, and the channel to
/// the role loop.
#[derive(Debug)]
pub struct Handoffs {
    phase: watch::Sender<HandoffPhase>,
    streams: Mutex<BTreeMap<u64, StreamEntry>>,
    /// Per database, the highest TXID a caught-up replica acknowledged on a
    /// stream that has closed since: a replica that leaves right after its
    /// last acknowledgement (a handoff) still counts for the commits held
    /// for it. Locked after `streams`, never before.
    departed_acknowledged: Mutex<BTreeMap<String, TxId>>,
    /// Signalled when a replica acknowledges, or a stream opens or closes: what
    /// commits held for synchronous replication wait on.
    streams_changed: Condvar,
    /// The caught-up replicas that can be reached, as published to every stream.
    peers: watch::Sender<Vec<Peer>>,
    next_stream: AtomicU64,
    control: mpsc::Sender<ControlRequest>,
}

impl Handoffs {
    /// A new registry, and the receiving end of its control requests (for the
    /// role loop).
    pub fn new() -> (Handoffs, mpsc::Receiver<ControlRequest>) {
        let (control, requests) = mpsc::channel(CONTROL_REQUESTS);
        let handoffs = Handoffs {
            phase: watch::Sender::new(HandoffPhase::Idle),
            streams: Mutex::new(BTreeMap::new()),
            departed_acknowledged: Mutex::new(BTreeMap::new()),
            streams_changed: Condvar::new(),
            peers: watch::Sender::new(Vec::new()),
            next_stream: AtomicU64::new(1),
            control,
        };
        (handoffs, requests)
    }

    /// Moves to `phase`; every producer sees it.
    pub fn set_phase(&self, phase: HandoffPhase) {
        self.phase.send_replace(phase);
    }

    /// Watches the phase.
    pub(super) fn watch_phase(&self) -> watch::Receiver<HandoffPhase> {
        self.phase.subscribe()
    }

    /// Records what the replica of stream `stream_id` acknowledged, and wakes
    /// the commits waiting for it. An acknowledgement for a stream that has
    /// closed is ignored.
    pub(super) fn acknowledge(&self, stream_id: u64, positions: &[(String, Position)]) {
        let mut streams = self.streams.lock_unpoisoned();
        if let Some(entry) = streams.get_mut(&stream_id) {
            for (name, position) in positions {
                let acknowledged = entry.acknowledged.entry(name.clone()).or_default();
                *acknowledged = (*acknowledged).max(position.txid);
            }
            self.streams_changed.notify_all();
        }
    }

    /// Watches the peers.
    pub(super) fn watch_peers(&self) -> watch::Receiver<Vec<Peer>> {
        self.peers.subscribe()
    }

    /// The replicas whose streams have caught up and said where they can be
    /// reached, now.
    pub fn peers(&self) -> Vec<Peer> {
        self.peers.borrow().clone()
    }

    /// Publishes the peers `streams` make up, when they changed.
    fn publish_peers(&self, streams: &BTreeMap<u64, StreamEntry>) {
        let peers: BTreeSet<Peer> = streams
            .values()
            .filter(|entry| entry.caught_up)
            .filter_map(|entry| {
                Some(Peer {
                    hostname: entry.replica.clone(),
                    url: entry.advertise_url.clone()?,
                })
            })
            .collect();
        let peers: Vec<Peer> = peers.into_iter().take(MAX_PEERS).collect();
        self.peers.send_if_modified(|published| {
            let changed = *published != peers;
            if changed {
                *published = peers;
            }
            changed
        });
    }

    /// The candidate replica that will be ready soonest: the one whose stream has
    /// been sent the most; `None` when no candidate is connected.
    pub fn most_caught_up_candidate(&self) -> Option<String> {
        let streams = self.streams.lock_unpoisoned();
        streams
            .values()
            .filter(|entry| entry.candidate)
            .max_by_key(|entry| entry.sent.values().sum::<u64>())
            .map(|entry| entry.replica.clone())
    }

    /// How many streams are open.
    pub fn stream_count(&self) -> usize {
        self.streams.lock_unpoisoned().len()
    }

    /// Whether a candidate called `hostname` has a stream open.
    pub fn candidate_connected(&self, hostname: &str) -> bool {
        let streams = self.streams.lock_unpoisoned();
        streams
            .values()
            .any(|entry| entry.candidate && entry.replica == hostname)
    }

    /// Hands a request to the role loop; `false` when the loop has stopped.
    pub async fn request(&self, request: ControlRequest) -> bool {
        self.control.send(request).await.is_ok()
    }

    /// Records a new stream; it is forgotten when the returned guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        replica: &str,
        candidate: bool,
        advertise_url: Option<String>,
    ) -> RegisteredStream {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.streams.lock_unpoisoned().insert(
            id,
            StreamEntry {
                replica: replica.to_string(),
                candidate,
                advertise_url,
                caught_up: false,
                acknowledged: BTreeMap::new(),
                sent: BTreeMap::new(),
            },
        );
        RegisteredStream {
            handoffs: self.clone(),
            id,
        }
    }
}

/// A stream known to [`Handoffs`] while this lives.
pub(crate) struct RegisteredStream {
    handoffs: Arc<Handoffs>,
    id: u64,
}

impl RegisteredStream {
    /// The stream's number, which its replica's acknowledgements name.
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    /// Records that the stream has sent `Ready`: its replica is now a peer, and
    /// one that synchronous commits wait for.
    pub(crate) fn caught_up(&self) {
        let mut streams = self.streams();
        if let Some(entry) = streams.get_mut(&self.id) {
            entry.caught_up = true;
        }
        self.handoffs.publish_peers(&streams);
        self.handoffs.streams_changed.notify_all();
    }

    /// Records that the stream has been sent `name` up to `position`.
    pub(super) fn sent(&self, name: &str, position: Position) {
        if let Some(entry) = self.streams().get_mut(&self.id) {
            entry.sent.insert(name.to_string(), position.txid.0);
        }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, StreamEntry>> {
        self.handoffs.streams.lock_unpoisoned()
    }
}

impl Drop for RegisteredStream {
    fn drop(&mut self) {
        let mut streams = self.streams();
        if let Some(entry) = streams.remove(&self.id)
            && entry.caught_up
        {
            let mut departed = self.handoffs.departed_acknowledged.lock_unpoisoned();
            for (name, txid) in entry.acknowledged {
                let kept = departed.entry(name).or_default();
                *kept = (*kept).max(txid);
            }
        }
        self.handoffs.publish_peers(&streams);
        self.handoffs.streams_changed.notify_all();
    }
}

/// How often a commit held for synchronous replication looks again whether this
/// node is still the primary.
const ROLE_RECHECK: Duration = Duration::from_millis(20);

/// Synchronous replication: a commit waits until one replica whose stream has
/// caught up acknowledges it. With no such replica it stands on this node alone
/// (a cluster of one keeps working; the first replica to catch up is waited for
/// again). Demotion ends the wait with an error, unless the node is handing its
/// role over: then the wait goes on while the streams deliver the last change
/// sets and their replicas acknowledge them.
impl CommitHold for Handoffs {
    fn wait_replicated(
        &self,
        database: &str,
        txid: TxId,
        still_primary: &dyn Fn() -> bool,
    ) -> Result<(), Unacknowledged> {
        let mut streams = self.streams.lock_unpoisoned();
        loop {
            let mut replicas = streams.values().filter(|entry| entry.caught_up).peekable();
            let alone = replicas.peek().is_none();
            if replicas.any(|entry| entry.acknowledged.get(database) >= Some(&txid))
                || self.departed_acknowledged.lock_unpoisoned().get(database) >= Some(&txid)
            {
                return Ok(());
            }
            // Demotion ends the streams too: it is looked at before their
            // absence. A handoff, though, still delivers what was committed, and
            // its streams stay until their replicas have acknowledged it.
            let handing_off = *self.phase.borrow() != HandoffPhase::Idle;
            if !still_primary() && (alone || !handing_off) {
                return Err(Unacknowledged::NoLongerPrimary);
            }
            if alone {
                return Ok(());
            }
            streams = self
                .streams_changed
                .wait_timeout(streams, ROLE_RECHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// What a replica's client tells the role loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowerState {
    /// Whether a stream from the primary is open (between its `Hello` and its
    /// end): change sets may still arrive on it.
    pub connected: bool,
    /// The last `Handoff` received, if any.
    pub handoff: Option<HandoffSeen>,
}

/// When a replica last heard from its primary: the replication client records
/// every message, and the role loop reads it to tell a primary that went silent
/// (stopped or cut off) from one that is still streaming.
#[derive(Debug, Default)]
pub struct LastHeard(Mutex<Option<Instant>>);

impl LastHeard {
    /// Notes that a message arrived now.
    pub fn record(&self) {
        *self.0.lock_unpoisoned() = Some(Instant::now());
    }

    /// When the last message arrived, if one did.
    pub fn at(&self) -> Option<Instant> {
        *self.0.lock_unpoisoned()
    }
}

/// How long a stream may be silent, while nobody holds the lease, before a
/// candidate presumes its primary gone and may take the lease: two heartbeats
/// missed. (A live primary sends at least a heartbeat every
/// [`HEARTBEAT_INTERVAL`](super::HEARTBEAT_INTERVAL); the stream itself is only
/// dropped after [`PRIMARY_SILENCE_TIMEOUT`](super::PRIMARY_SILENCE_TIMEOUT).)
pub const PRESUMED_GONE_AFTER: Duration = Duration::from_secs(2);

/// A `Handoff` a replica received, after applying everything before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffSeen {
    /// The replica that takes the lease.
    pub to: String,
    /// When it arrived.
    pub at: Instant,
}

/// How long a handoff or a promotion may take before the node asking gives up.
/// The old primary waits at most [`HANDOFF_TIMEOUT`] for the new one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a primary handing off waits for the chosen replica to take the lease,
/// and how long other candidates leave a free lease to it.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the primary at `primary_url` to hand the lease to the candidate replica
/// `hostname`; returns once that replica holds it.
pub async fn request_handoff(
    primary_url: &str,
    credentials: &ClientCredentials,
    hostname: &str,
) -> Result<(), ReplicationError> {
    let mut client = connect(primary_url, credentials, Some(REQUEST_TIMEOUT)).await?;
    client
        .handoff(proto::HandoffRequest {
            hostname: hostname.to_string(),
        })
        .await
        .map_err(|status| remote_error(primary_url, &status))?;
    Ok(())
}

/// Asks the candidate replica at `url` to become the primary; returns the
/// previous primary's hostname once it is the primary.
pub async fn request_promote(
    url: &str,
    credentials: &ClientCredentials,
) -> Result<String, ReplicationError> {
    let mut client = connect(url, credentials, Some(REQUEST_TIMEOUT)).await?;
    let response = client
        .promote(proto::PromoteRequest {})
        .await
        .map_err(|status| remote_error(url, &status))?;
    parse_hostname("PromoteResponse", response.into_inner().previous_primary)
}
