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
//! Before anything else the node checks that its data belongs to the cluster the
//! coordinator serves: the cluster ID kept in the data dir must equal the one
//! stored beside the lease key (a node without one adopts it; the first node of a
//! new cluster stores its own). A mismatch stops the node with a message saying so.
//!
//! Invariants:
//! - The store is the primary only while this node holds an unexpired lease.
//! - At most one replication client runs, following the current holder.
//! - On shutdown the primary stops accepting writes, then releases the lease so a
//!   candidate can take over without waiting for expiry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lease::{HeldLease, Lease, LeaseError, LeaseHolder, LeaseState};
use crate::proxy::WriteGate;
use crate::replication::{
    self, ClientCredentials, ControlRequest, FollowSettings, FollowerState, HANDOFF_TIMEOUT,
    HandoffPhase, Handoffs, KnownPeers, LastHeard, PRESUMED_GONE_AFTER, ReplicationError,
    RoleRefusal,
};
use crate::store::{Role, Store};

/// How long one watch of the lease waits for a change before asking again.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// How long a handoff waits for the writes in the application to finish.
const WRITE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a candidate that took over from a failed primary spends catching
/// up from the other replicas, at most, before it accepts writes.
const PEER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// The file in the data dir that keeps the cluster ID.
    pub cluster_id_path: PathBuf,
    /// The open streams and the handoff phase, shared with the replication server.
    pub handoffs: Arc<Handoffs>,
    /// Requests from the `Handoff` and `Promote` RPCs.
    pub control: mpsc::Receiver<ControlRequest>,
    /// The proxy's writes in the application, which a handoff waits for.
    pub writes: Arc<WriteGate>,
    /// Where the replication client runs: a runtime that runs nothing else, since
    /// the client applies small change sets on its own thread.
    pub replica_runtime: tokio::runtime::Handle,
    /// How calls to other nodes connect (TLS) and prove the cluster secret.
    pub credentials: ClientCredentials,
    /// Before this moment the node takes no free lease: it restored its data
    /// from a backup, and candidates that kept their own data go first.
    pub campaign_from: Option<Instant>,
}

/// Why the role loop stopped the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The operating system gave no random bytes for a new cluster ID.
    #[error("cannot make a cluster ID: no random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    /// The data dir belongs to another cluster than the coordinator's.
    #[error("{0}")]
    ClusterMismatch(LeaseError),
    /// The cluster ID file could not be read or written.
    #[error("cluster ID file {path}: {source}")]
    ClusterIdFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// A new random cluster ID: 16 lower-case hex digits.
fn new_cluster_id() -> Result<String, NodeError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(NodeError::Random)?;
    Ok(format!("{:016x}", u64::from_be_bytes(bytes)))
}

/// The replication client following one primary.
struct Following {
    url: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// What the client says about its stream.
    state: watch::Receiver<FollowerState>,
    /// When the client last heard from the primary.
    last_heard: Arc<LastHeard>,
}

impl Following {
    /// When an open stream will have been silent long enough for its primary to
    /// be presumed gone, if it is open.
    fn presumed_gone_at(&self) -> Option<Instant> {
        if !self.state.borrow().connected {
            return None;
        }
        Some(self.last_heard.at().unwrap_or_else(Instant::now) + PRESUMED_GONE_AFTER)
    }
}

/// Why this node stopped holding the lease.
enum HoldEnd {
    /// A renewal failed or did not succeed by the renewal deadline.
    Lost,
    /// A commit of this term was not replicated (it was held past the renewal
    /// deadline, which a renewal then beat by a hair): changes fail until the
    /// role changes, so the node steps down and frees the lease.
    StepDown,
    /// A candidate replica connected to this primary asked for the role.
    HandOffTo {
        target: String,
        reply: oneshot::Sender<Result<(), RoleRefusal>>,
    },
}

/// What woke a replica's role loop.
enum Event {
    Lease(Result<LeaseState, LeaseError>),
    FollowerChanged,
    Control(ControlRequest),
    HandoffCallEnded(Result<(), RoleRefusal>),
    /// The moment to look at a free lease again has come.
    Recheck,
}

/// Runs the role loop until `shutdown` is cancelled; fails only when this node
/// must not take part in the cluster.
pub async fn run(settings: NodeSettings, shutdown: CancellationToken) -> Result<(), NodeError> {
    let (mut node, cluster_id_path) = Node::new(settings);
    tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        joined = node.join_cluster(&cluster_id_path) => joined?,
    }
    loop {
        let held = tokio::select! {
            () = shutdown.cancelled() => None,
            held = node.until_primary() => held,
        };
        let Some(held) = held else {
            node.stop_following().await;
            node.answer_promotions(Err(RoleRefusal::ShuttingDown));
            return Ok(());
        };
        // A handoff to this node brought it everything the last primary
        // accepted; after a failure, another replica may hold more.
        let handed_to_me = node.handed_off_to_me();
        node.stop_following().await;
        let held = if handed_to_me {
            held
        } else {
            let caught_up = tokio::select! {
                () = shutdown.cancelled() => None,
                caught_up = node.catch_up_from_peers(held.clone()) => Some(caught_up),
            };
            match caught_up {
                Some(Some(held)) => held,
                // The lease was lost while catching up: back to following.
                Some(None) => continue,
                None => {
                    node.release(&held).await;
                    node.answer_promotions(Err(RoleRefusal::ShuttingDown));
                    return Ok(());
                }
            }
        };
        // What SQLite reads must be what the log says before local writes
        // resume (a commit that was not replicated is in the log only).
        let store = node.store.clone();
        let folded = tokio::task::spawn_blocking(move || store.fold_wals_before_leading())
            .await
            .map_err(|error| error.to_string())
            .and_then(|folded| folded.map_err(|error| error.to_string()));
        if let Err(error) = folded {
            tracing::error!(%error, retry_in = ?COORDINATOR_RETRY, "could not move the WAL's transactions into the database file; giving the lease up");
            node.release(&held).await;
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(COORDINATOR_RETRY) => {}
            }
            continue;
        }
        node.promote(&held);
        let end = tokio::select! {
            () = shutdown.cancelled() => None,
            end = node.hold(held.clone()) => Some(end),
        };
        match end {
            Some(HoldEnd::Lost) => node.demote().await,
            Some(HoldEnd::StepDown) => {
                node.demote().await;
                node.release(&held).await;
            }
            Some(HoldEnd::HandOffTo { target, reply }) => {
                let outcome = node.hand_off(&held, &target).await;
                let _ = reply.send(outcome);
            }
            None => {
                match node.handoffs.most_caught_up_candidate() {
                    // Its outcome is logged; either way this node stops now.
                    Some(target) => drop(node.hand_off(&held, &target).await),
                    None => {
                        tracing::info!("no candidate replica is connected: no handoff");
                        node.demote().await;
                        node.release(&held).await;
                    }
                }
                return Ok(());
            }
        }
    }
}

struct Node {
    store: Arc<Store>,
    lease: Arc<dyn Lease>,
    me: LeaseHolder,
    candidate: bool,
    reconnect_delay: Duration,
    handoffs: Arc<Handoffs>,
    control: mpsc::Receiver<ControlRequest>,
    writes: Arc<WriteGate>,
    replica_runtime: tokio::runtime::Handle,
    following: Option<Following>,
    /// The lease state index of the last watch.
    index: Option<u64>,
    /// The hostname of the last primary seen in the lease.
    primary: Option<String>,
    /// `Promote` requests waiting for this node to become the primary.
    promotions: Vec<oneshot::Sender<Result<String, RoleRefusal>>>,
    /// The request to the primary for a handoff to this node, while it runs.
    handoff_call: Option<JoinHandle<Result<(), ReplicationError>>>,
    /// When a free lease this node declined (its stream was still open) should
    /// be looked at again: when the stream will have been silent long enough.
    recheck_at: Option<Instant>,
    /// See [`NodeSettings::campaign_from`].
    campaign_from: Option<Instant>,
    /// The replicas the last primary named, kept across streams.
    known_peers: Arc<KnownPeers>,
    /// How this node's calls to other nodes connect and prove themselves.
    credentials: ClientCredentials,
}

impl Node {
    /// A role loop in its starting state, and where its cluster ID is kept.
    fn new(settings: NodeSettings) -> (Node, PathBuf) {
        let NodeSettings {
            store,
            lease,
            me,
            candidate,
            reconnect_delay,
            cluster_id_path,
            handoffs,
            control,
            writes,
            replica_runtime,
            credentials,
            campaign_from,
        } = settings;
        let node = Node {
            store,
            lease,
            me,
            candidate,
            reconnect_delay,
            handoffs,
            control,
            writes,
            replica_runtime,
            following: None,
            index: None,
            primary: None,
            promotions: Vec::new(),
            handoff_call: None,
            recheck_at: None,
            campaign_from,
            known_peers: Arc::new(KnownPeers::default()),
            credentials,
        };
        (node, cluster_id_path)
    }

    /// Checks (retrying while the coordinator is unreachable) that the data dir
    /// belongs to the coordinator's cluster, adopting its ID when the data dir has
    /// none.
    async fn join_cluster(&mut self, path: &std::path::Path) -> Result<(), NodeError> {
        let file_error = |source| NodeError::ClusterIdFile {
            path: path.to_path_buf(),
            source,
        };
        let local = match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim().to_string()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(file_error(error)),
        };
        let proposed = match &local {
            Some(id) => id.clone(),
            None => new_cluster_id()?,
        };
        let mut failures = 0u32;
        let stored = loop {
            match self.lease.check_cluster_id(&proposed).await {
                Ok(stored) => break stored,
                Err(LeaseError::ClusterMismatch { remote, .. }) if local.is_none() => break remote,
                Err(error @ LeaseError::ClusterMismatch { .. }) => {
                    return Err(NodeError::ClusterMismatch(error));
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(%error, failures, "cannot check the cluster ID; retrying");
                    }
                    tokio::time::sleep(COORDINATOR_RETRY).await;
                }
            }
        };
        if local.as_deref() != Some(stored.as_str()) {
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, format!("{stored}\n"))
                .and_then(|()| std::fs::rename(&temporary, path))
                .map_err(file_error)?;
            tracing::info!(cluster = %stored, "joined the cluster");
        }
        Ok(())
    }

    /// Follows the holder of the lease until this node acquires it, answering
    /// control requests meanwhile.
    async fn until_primary(&mut self) -> Option<HeldLease> {
        let mut failures = 0u32;
        loop {
            let event = tokio::select! {
                watched = self.lease.watch(self.index, WATCH_WAIT) => Event::Lease(watched),
                () = follower_changed(&mut self.following) => Event::FollowerChanged,
                Some(request) = self.control.recv() => Event::Control(request),
                outcome = call_ended(&mut self.handoff_call) => Event::HandoffCallEnded(outcome),
                () = sleep_until(self.recheck_at) => Event::Recheck,
            };
            let state = match event {
                Event::Lease(Ok(state)) => {
                    failures = 0;
                    state
                }
                Event::Lease(Err(error)) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(%error, failures, "cannot read the lease; still serving reads, retrying");
                    }
                    self.index = None;
                    tokio::time::sleep(COORDINATOR_RETRY).await;
                    continue;
                }
                Event::FollowerChanged | Event::Recheck => {
                    // Whether this node may take a free lease may have changed:
                    // read the lease again at once.
                    self.recheck_at = None;
                    self.index = None;
                    continue;
                }
                Event::Control(request) => {
                    self.answer_as_replica(request);
                    continue;
                }
                Event::HandoffCallEnded(outcome) => {
                    if let Err(refusal) = outcome {
                        self.answer_promotions(Err(refusal));
                    }
                    continue;
                }
            };
            self.index = Some(state.index);
            if let Some(held) = self.try_acquire(&state).await {
                return Some(held);
            }
            if let Some((holder, _)) = &state.holder {
                self.primary = Some(holder.hostname.clone());
                if holder.advertise_url != self.me.advertise_url {
                    let url = holder.advertise_url.clone();
                    self.follow(&url).await;
                }
            }
        }
    }

    /// Answers a control request while this node is a replica.
    fn answer_as_replica(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::HandOffTo { reply, .. } => {
                let _ = reply.send(Err(RoleRefusal::NotPrimary));
            }
            ControlRequest::Promote { reply } => {
                let refusal = if !self.candidate {
                    Some(RoleRefusal::NotCandidate)
                } else if let Some(following) = &self.following {
                    if self.handoff_call.is_none() {
                        let (url, hostname) = (following.url.clone(), self.me.hostname.clone());
                        let credentials = self.credentials.clone();
                        tracing::info!(primary = %url, "asking the primary to hand its role to this node");
                        self.handoff_call = Some(tokio::spawn(async move {
                            replication::request_handoff(&url, &credentials, &hostname).await
                        }));
                    }
                    None
                } else {
                    Some(RoleRefusal::NoPrimary)
                };
                match refusal {
                    Some(refusal) => {
                        let _ = reply.send(Err(refusal));
                    }
                    None => self.promotions.push(reply),
                }
            }
        }
    }

    /// Answers every waiting `Promote` request.
    fn answer_promotions(&mut self, outcome: Result<String, RoleRefusal>) {
        for reply in self.promotions.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }

    /// Takes the lease when this node is a candidate, nobody else holds it, and
    /// taking it loses nothing: this node has everything the last primary
    /// accepted (its stream handed off to this node, or it has ended), and no
    /// handoff to another node may still complete.
    async fn try_acquire(&mut self, state: &LeaseState) -> Option<HeldLease> {
        let free = match &state.holder {
            None => true,
            Some((holder, _)) => holder == &self.me,
        };
        if !self.candidate || !free {
            return None;
        }
        if let Some(at) = self.campaign_from.filter(|at| *at > Instant::now()) {
            self.recheck_at = Some(at);
            return None;
        }
        if !self.may_take_free_lease() {
            // Only a moment still to come: one already past means the lease was
            // declined for another reason, and waking at once would spin.
            self.recheck_at = self
                .following
                .as_ref()
                .and_then(Following::presumed_gone_at)
                .filter(|at| *at > Instant::now());
            return None;
        }
        match self.lease.try_acquire(&self.me).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, "could not acquire the lease");
                None
            }
        }
    }

    fn may_take_free_lease(&self) -> bool {
        let Some(following) = &self.following else {
            return true;
        };
        let presumed_gone_at = following.presumed_gone_at();
        let state = following.state.borrow();
        match &state.handoff {
            Some(handoff) if handoff.to == self.me.hostname => true,
            Some(handoff) if handoff.at.elapsed() < HANDOFF_TIMEOUT => false,
            // A stream still open but silent while nobody holds the lease: its
            // primary stopped or was cut off, and nothing more can arrive.
            _ => presumed_gone_at.is_none_or(|at| at <= Instant::now()),
        }
    }

    /// Whether the last primary handed its role to this node: then this node has
    /// everything that primary accepted.
    fn handed_off_to_me(&self) -> bool {
        self.following.as_ref().is_some_and(|following| {
            following
                .state
                .borrow()
                .handoff
                .as_ref()
                .is_some_and(|handoff| handoff.to == self.me.hostname)
        })
    }

    /// Brings this node up to the most advanced replica of the last primary (see
    /// `replication::catch_up_from_peers`) before it accepts writes, for at most
    /// [`PEER_CATCH_UP_TIMEOUT`], renewing the lease meanwhile. Returns the lease
    /// as last renewed, or `None` when it was lost.
    async fn catch_up_from_peers(&mut self, mut held: HeldLease) -> Option<HeldLease> {
        let peers = self.known_peers.get();
        if peers.is_empty() {
            return Some(held);
        }
        let started = Instant::now();
        let catch_up = tokio::time::timeout(
            PEER_CATCH_UP_TIMEOUT,
            replication::catch_up_from_peers(
                &self.store,
                &self.credentials,
                &self.me.hostname,
                &peers,
            ),
        );
        let mut catch_up = std::pin::pin!(catch_up);
        loop {
            tokio::select! {
                caught_up = &mut catch_up => {
                    if caught_up.is_err() {
                        tracing::warn!(timeout = ?PEER_CATCH_UP_TIMEOUT, "catching up from the peers took too long; accepting writes without what they may still hold");
                    }
                    tracing::info!(elapsed = ?started.elapsed(), "done catching up from the peers");
                    return Some(held);
                }
                () = tokio::time::sleep_until(next_renewal(&held)) => {}
            }
            held = renew(self.lease.as_ref(), held).await?;
        }
    }

    /// Keeps renewing the lease, answering control requests; returns when the
    /// lease is lost (or its renewal deadline passes without a successful renewal)
    /// or a replica asks for the primary role.
    async fn hold(&mut self, mut held: HeldLease) -> HoldEnd {
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next_renewal(&held)) => {}
                Some(request) = self.control.recv() => {
                    match request {
                        ControlRequest::HandOffTo { hostname, reply } => {
                            if self.handoffs.candidate_connected(&hostname) {
                                return HoldEnd::HandOffTo { target: hostname, reply };
                            }
                            let _ = reply.send(Err(RoleRefusal::NotConnectedCandidate(hostname)));
                        }
                        ControlRequest::Promote { reply } => {
                            let _ = reply.send(Err(RoleRefusal::AlreadyPrimary));
                        }
                    }
                    continue;
                }
            }
            match renew(self.lease.as_ref(), held).await {
                Some(renewed) => {
                    self.store.set_lease_deadline(renewed.renew_by);
                    held = renewed;
                }
                None => return HoldEnd::Lost,
            }
            if self.store.commit_failed_in_term() {
                tracing::warn!(
                    "a commit of this term was not replicated; stepping down so that writes are accepted again"
                );
                return HoldEnd::StepDown;
            }
        }
    }

    /// Hands the primary role to the candidate replica `target`: stops local
    /// writes, sends every stream up to the final positions and a `Handoff`,
    /// releases the lease, and waits for `target` to take it. This node is a
    /// replica without the lease afterwards, whatever the outcome.
    async fn hand_off(&mut self, held: &HeldLease, target: &str) -> Result<(), RoleRefusal> {
        let target = target.to_string();
        let started = Instant::now();
        tracing::info!(to = %target, "handing the primary role over");
        self.handoffs.set_phase(HandoffPhase::Draining);
        // Writes the proxy passed to the application finish first; new ones wait
        // at the proxy for the new primary.
        let unfinished = self.writes.close_and_drain(WRITE_DRAIN_TIMEOUT).await;
        if unfinished > 0 {
            tracing::warn!(unfinished, timeout = ?WRITE_DRAIN_TIMEOUT, "handing over while writes are still in the application; they may fail");
        }
        self.demote().await;
        let store = self.store.clone();
        let positions = tokio::task::spawn_blocking(move || store.positions())
            .await
            .unwrap_or_default();
        self.handoffs.set_phase(HandoffPhase::HandingOff {
            to: target.clone(),
            positions,
        });
        self.release(held).await;
        let outcome = self.wait_for_holder(&target).await;
        self.handoffs.set_phase(HandoffPhase::Idle);
        match outcome {
            Ok(()) => {
                tracing::info!(to = %target, elapsed = ?started.elapsed(), "handed the primary role over");
                Ok(())
            }
            Err(refusal) => {
                tracing::warn!(to = %target, reason = %refusal, "the handoff did not complete");
                Err(refusal)
            }
        }
    }

    /// Waits (at most [`HANDOFF_TIMEOUT`]) until `hostname` holds the lease.
    async fn wait_for_holder(&mut self, hostname: &str) -> Result<(), RoleRefusal> {
        let deadline = Instant::now() + HANDOFF_TIMEOUT;
        let mut index = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let late = || RoleRefusal::NotTaken {
                hostname: hostname.to_string(),
                timeout: HANDOFF_TIMEOUT,
            };
            if remaining.is_zero() {
                return Err(late());
            }
            match tokio::time::timeout_at(deadline, self.lease.watch(index, remaining)).await {
                Err(_) => return Err(late()),
                Ok(Ok(state)) => {
                    if state
                        .holder
                        .is_some_and(|(holder, _)| holder.hostname == hostname)
                    {
                        return Ok(());
                    }
                    index = Some(state.index);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read the lease during the handoff; retrying");
                    index = None;
                    tokio::time::sleep(COORDINATOR_RETRY.min(remaining)).await;
                }
            }
        }
    }

    async fn release(&self, held: &HeldLease) {
        match self.lease.release(held).await {
            Ok(()) => tracing::info!("released the lease"),
            Err(error) => tracing::warn!(
                %error,
                "could not release the lease; another node takes over when it expires"
            ),
        }
    }

    fn promote(&mut self, held: &HeldLease) {
        // A later takeover asks the peers the next primary names.
        self.known_peers.replace(Vec::new());
        self.store.set_epoch(held.epoch.0);
        self.store.set_lease_deadline(held.renew_by);
        self.writes.open();
        self.store.set_role(Role::Primary);
        tracing::info!(epoch = held.epoch.0, positions = ?self.store.positions(), "this node is the primary");
        if let Some(call) = self.handoff_call.take() {
            call.abort();
        }
        let previous = self.primary.clone().unwrap_or_default();
        self.answer_promotions(Ok(previous));
    }

    /// Stops accepting local writes, waiting for changes being made.
    async fn demote(&mut self) {
        if self.store.cluster().role() == Role::Primary {
            // A later takeover asks this node's replicas: the next primary
            // may name none to it (a replica hears the peers only once its
            // stream has caught up, which a snapshot delays).
            let replicas = self.handoffs.peers();
            if !replicas.is_empty() {
                self.known_peers.replace(replicas);
            }
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.set_role(Role::Replica)).await;
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
        let (state, state_receiver) = watch::channel(FollowerState::default());
        let last_heard = Arc::new(LastHeard::default());
        let task = self.replica_runtime.spawn(replication::follow(
            FollowSettings {
                store: self.store.clone(),
                primary_url: url.to_string(),
                hostname: self.me.hostname.clone(),
                candidate: self.candidate,
                reconnect_delay: self.reconnect_delay,
                last_heard: last_heard.clone(),
                advertise_url: Some(self.me.advertise_url.clone())
                    .filter(|url| url.starts_with("http://") || url.starts_with("https://")),
                known_peers: self.known_peers.clone(),
                credentials: self.credentials.clone(),
            },
            state,
            stop.clone(),
        ));
        tracing::info!(primary = url, "following the primary");
        self.following = Some(Following {
            url: url.to_string(),
            stop,
            task,
            state: state_receiver,
            last_heard,
        });
    }

    async fn stop_following(&mut self) {
        if let Some(following) = self.following.take() {
            following.stop.cancel();
            let _ = following.task.await;
        }
    }
}

/// When to renew `held`: at a third of the time left before its renewal
/// deadline, so two attempts fit before it.
fn next_renewal(held: &HeldLease) -> Instant {
    let now = Instant::now();
    now + Instant::from_std(held.renew_by).saturating_duration_since(now) / 3
}

/// Renews `held` before its renewal deadline: the renewed lease, the same one
/// when the coordinator did not answer (it is still this node's until the
/// deadline, so the caller tries again), or `None` when it is lost.
async fn renew(lease: &dyn Lease, held: HeldLease) -> Option<HeldLease> {
    let deadline = Instant::from_std(held.renew_by);
    match tokio::time::timeout_at(deadline, lease.renew(&held)).await {
        Ok(Ok(renewed)) => Some(renewed),
        Ok(Err(error @ LeaseError::Unavailable { .. })) => {
            tracing::warn!(%error, renew_by = ?deadline.saturating_duration_since(Instant::now()), "could not renew the lease; retrying before the renewal deadline");
            Some(held)
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "lost the lease; no longer accepting writes");
            None
        }
        Err(_) => {
            tracing::error!("could not renew the lease in time; no longer accepting writes");
            None
        }
    }
}

/// Returns when the followed client's state changes; never when nothing is
/// followed.
async fn follower_changed(following: &mut Option<Following>) {
    if let Some(following) = following {
        if following.state.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Returns at `at`; never when there is no such moment.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Returns the outcome of the handoff request to the primary when it ends; never
/// when none runs.
async fn call_ended(
    call: &mut Option<JoinHandle<Result<(), ReplicationError>>>,
) -> Result<(), RoleRefusal> {
    let Some(handle) = call else {
        return std::future::pending().await;
    };
    let outcome = match handle.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(RoleRefusal::HandoffFailed(Arc::new(error))),
        Err(error) => Err(RoleRefusal::HandoffAborted(Arc::new(error))),
    };
    *call = None;
    outcome
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant as StdInstant;

    use super::*;
    use crate::lease::http::HttpError;
    use crate::lease::{Epoch, Unavailability};
    use crate::store::CaptureOptions;

    /// An in-memory lease with the trait's semantics, whose renewals can be made
    /// to fail.
    #[derive(Debug, Default)]
    struct MemoryLease {
        state: Mutex<MemoryState>,
    }

    #[derive(Debug, Default)]
    struct MemoryState {
        holder: Option<(LeaseHolder, Epoch)>,
        epoch: u64,
        index: u64,
        renewals_fail: bool,
        /// How many coming renewals answer "unavailable".
        renewals_unavailable: u32,
        renewals: u64,
        cluster_id: Option<String>,
    }

    const TTL: Duration = Duration::from_millis(600);

    #[async_trait::async_trait]
    impl Lease for MemoryLease {
        fn ttl(&self) -> Duration {
            TTL
        }

        async fn try_acquire(&self, me: &LeaseHolder) -> Result<Option<HeldLease>, LeaseError> {
            let mut state = self.state.lock().unwrap();
            if state.holder.is_some() {
                return Ok(None);
            }
            state.epoch += 1;
            state.index += 1;
            state.holder = Some((me.clone(), Epoch(state.epoch)));
            Ok(Some(HeldLease {
                epoch: Epoch(state.epoch),
                handle: "memory".into(),
                renew_by: StdInstant::now() + TTL / 2,
            }))
        }

        async fn renew(&self, held: &HeldLease) -> Result<HeldLease, LeaseError> {
            let mut state = self.state.lock().unwrap();
            if state.renewals_fail {
                return Err(LeaseError::Lost("renewals fail".into()));
            }
            if state.renewals_unavailable > 0 {
                state.renewals_unavailable -= 1;
                return Err(LeaseError::Unavailable {
                    coordinator: "memory",
                    url: "memory:".into(),
                    reason: Unavailability::NoAnswer(HttpError::Timeout(TTL)),
                });
            }
            state.renewals += 1;
            Ok(HeldLease {
                renew_by: StdInstant::now() + TTL / 2,
                ..held.clone()
            })
        }

        async fn release(&self, _held: &HeldLease) -> Result<(), LeaseError> {
            let mut state = self.state.lock().unwrap();
            state.holder = None;
            state.index += 1;
            Ok(())
        }

        async fn watch(
            &self,
            since: Option<u64>,
            wait: Duration,
        ) -> Result<LeaseState, LeaseError> {
            let deadline = StdInstant::now() + wait;
            loop {
                {
                    let state = self.state.lock().unwrap();
                    if since != Some(state.index) || StdInstant::now() >= deadline {
                        return Ok(LeaseState {
                            holder: state.holder.clone(),
                            index: state.index,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn check_cluster_id(&self, local: &str) -> Result<String, LeaseError> {
            let mut state = self.state.lock().unwrap();
            match &state.cluster_id {
                Some(stored) if stored != local => Err(LeaseError::ClusterMismatch {
                    local: local.to_string(),
                    remote: stored.clone(),
                }),
                Some(stored) => Ok(stored.clone()),
                None => {
                    state.cluster_id = Some(local.to_string());
                    Ok(local.to_string())
                }
            }
        }
    }

    fn settings(dir: &std::path::Path, lease: Arc<MemoryLease>) -> NodeSettings {
        let (handoffs, control) = Handoffs::new();
        NodeSettings {
            store: Arc::new(Store::open(dir, CaptureOptions::default(), Role::Replica).unwrap()),
            lease,
            me: LeaseHolder {
                hostname: "me".into(),
                advertise_url: "http://127.0.0.1:1".into(),
            },
            candidate: true,
            reconnect_delay: Duration::from_millis(100),
            cluster_id_path: dir.join("cluster-id"),
            handoffs: Arc::new(handoffs),
            control,
            writes: Arc::new(WriteGate::new()),
            replica_runtime: tokio::runtime::Handle::current(),
            credentials: ClientCredentials::default(),
            campaign_from: None,
        }
    }

    /// Runs the role loop of a candidate over a fresh memory lease in `dir`, until
    /// it is the primary.
    async fn start_primary(
        dir: &std::path::Path,
    ) -> (
        Arc<MemoryLease>,
        Arc<Store>,
        CancellationToken,
        JoinHandle<Result<(), NodeError>>,
    ) {
        let lease = Arc::new(MemoryLease::default());
        let settings = settings(dir, lease.clone());
        let store = settings.store.clone();
        let shutdown = CancellationToken::new();
        let node = tokio::spawn(run(settings, shutdown.clone()));
        wait_for_role(&store, Role::Primary).await;
        (lease, store, shutdown, node)
    }

    async fn wait_for_role(store: &Store, role: Role) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while store.cluster().role() != role {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the node did not become {}", role.as_str()));
    }

    /// Regression (found by the fault suite): a demoted primary that followed
    /// the next primary only as far as a snapshot had heard no peers from it,
    /// so when that primary failed it took over without asking the replica
    /// that held the failed primary's acknowledged transactions.
    #[tokio::test]
    async fn a_demoted_primary_knows_its_replicas_as_peers() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path(), Arc::new(MemoryLease::default()));
        let handoffs = settings.handoffs.clone();
        let (mut node, _) = Node::new(settings);
        node.store.set_role(Role::Primary);
        let stream = handoffs.register("node-a", true, Some("http://127.0.0.1:2".into()));
        let peer = crate::replication::Peer {
            hostname: "node-a".into(),
            url: "http://127.0.0.1:2".into(),
        };
        stream.caught_up();
        node.demote().await;
        assert_eq!(node.known_peers.get(), vec![peer]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_silent_for_two_heartbeats_no_longer_holds_a_candidate_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut node, _) = Node::new(settings(dir.path(), Arc::new(MemoryLease::default())));
        let (state, receiver) = watch::channel(FollowerState {
            connected: true,
            handoff: None,
        });
        let last_heard = Arc::new(LastHeard::default());
        last_heard.record();
        node.following = Some(Following {
            url: "http://127.0.0.1:1".into(),
            stop: CancellationToken::new(),
            task: tokio::spawn(async {}),
            state: receiver,
            last_heard: last_heard.clone(),
        });
        assert!(
            !node.may_take_free_lease(),
            "the stream was just heard from"
        );
        tokio::time::advance(PRESUMED_GONE_AFTER - Duration::from_millis(1)).await;
        assert!(
            !node.may_take_free_lease(),
            "not yet silent for long enough"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(node.may_take_free_lease(), "silent for two heartbeats");
        last_heard.record();
        assert!(!node.may_take_free_lease(), "heard from again");
        state.send_modify(|state| state.connected = false);
        assert!(node.may_take_free_lease(), "the stream ended");
    }

    #[tokio::test]
    async fn a_candidate_takes_a_free_lease_and_stops_writing_before_it_could_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (lease, store, shutdown, node) = start_primary(dir.path()).await;
        assert!(lease.state.lock().unwrap().cluster_id.is_some());
        // Renewals start failing: the node is a replica again before TTL / 2.
        lease.state.lock().unwrap().renewals_fail = true;
        let lost_at = StdInstant::now();
        wait_for_role(&store, Role::Replica).await;
        assert!(lost_at.elapsed() < TTL / 2 + Duration::from_millis(100));
        shutdown.cancel();
        node.await.unwrap().unwrap();
    }

    /// A commit that failed while the lease was still renewed (its hold saw the
    /// renewal deadline pass just before the renewal's answer moved it) would
    /// fail every change of the term: the node steps down, frees the lease, and
    /// accepts writes again under a new epoch.
    #[tokio::test]
    async fn a_primary_with_a_commit_that_was_not_replicated_steps_down_and_frees_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (lease, store, shutdown, node) = start_primary(dir.path()).await;
        store.set_commit_hold(Arc::new(crate::store::testing::NoReplica));
        let first_epoch = lease.state.lock().unwrap().epoch;
        let db = store.create("app.db").unwrap();
        store.set_lease_deadline(StdInstant::now());
        assert!(crate::store::testing::commit_and_hold(&store, &db, 1).is_err());
        assert!(store.commit_failed_in_term());
        tokio::time::timeout(Duration::from_secs(5), async {
            while lease.state.lock().unwrap().epoch == first_epoch
                || store.cluster().role() != Role::Primary
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the node stepped down and took the lease again");
        assert!(!store.commit_failed_in_term());
        crate::store::testing::commit_and_hold(&store, &db, 2).unwrap();
        shutdown.cancel();
        node.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_handoff_to_a_node_that_is_not_a_connected_candidate_is_refused_and_the_lease_kept() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Arc::new(MemoryLease::default());
        let settings = settings(dir.path(), lease.clone());
        let (store, handoffs) = (settings.store.clone(), settings.handoffs.clone());
        let shutdown = CancellationToken::new();
        let node = tokio::spawn(run(settings, shutdown.clone()));
        wait_for_role(&store, Role::Primary).await;
        let (reply, answer) = oneshot::channel();
        let request = ControlRequest::HandOffTo {
            hostname: "nobody".into(),
            reply,
        };
        assert!(handoffs.request(request).await);
        let refusal = answer.await.unwrap().unwrap_err();
        assert!(
            matches!(&refusal, RoleRefusal::NotConnectedCandidate(hostname) if hostname == "nobody"),
            "{refusal}"
        );
        // Still the primary, renewing, after longer than the lease lasts.
        let renewals = lease.state.lock().unwrap().renewals;
        tokio::time::sleep(TTL * 2).await;
        assert_eq!(store.cluster().role(), Role::Primary);
        assert!(lease.state.lock().unwrap().renewals > renewals + 1);
        shutdown.cancel();
        node.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_unanswered_renewal_is_retried_before_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (lease, store, shutdown, node) = start_primary(dir.path()).await;
        // One renewal goes unanswered; the next one, still before the renewal
        // deadline, succeeds, so the node never stops being the primary.
        let renewals = {
            let mut state = lease.state.lock().unwrap();
            state.renewals_unavailable = 1;
            state.renewals
        };
        let deadline = StdInstant::now() + TTL * 2;
        while StdInstant::now() < deadline {
            assert_eq!(store.cluster().role(), Role::Primary);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            let state = lease.state.lock().unwrap();
            assert_eq!(state.renewals_unavailable, 0);
            assert!(state.renewals > renewals);
        }
        shutdown.cancel();
        node.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_releases_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (lease, store, shutdown, node) = start_primary(dir.path()).await;
        shutdown.cancel();
        node.await.unwrap().unwrap();
        assert_eq!(store.cluster().role(), Role::Replica);
        assert!(lease.state.lock().unwrap().holder.is_none());
    }

    #[tokio::test]
    async fn data_of_another_cluster_refuses_to_join_and_a_new_node_adopts_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Arc::new(MemoryLease::default());
        lease.state.lock().unwrap().cluster_id = Some("aaaa".into());
        // A node without a cluster ID adopts the coordinator's.
        let mut settings_new = settings(dir.path(), lease.clone());
        settings_new.candidate = false;
        let shutdown = CancellationToken::new();
        let node = tokio::spawn(run(settings_new, shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(5), async {
            while std::fs::read_to_string(dir.path().join("cluster-id")).is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        shutdown.cancel();
        node.await.unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cluster-id")).unwrap(),
            "aaaa\n"
        );
        // Data of another cluster is refused.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("cluster-id"), "bbbb\n").unwrap();
        let error = run(settings(other.path(), lease), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("bbbb"), "{error}");
    }
}
