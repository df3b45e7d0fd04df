//! The replica's side: one stream to the primary, applied message by message.
//!
//! The client is a small state machine:
//!
//! ```text
//!   Disconnected ──(backoff elapsed)──▶ Connecting ──(Hello)──▶ CatchingUp ──(Ready)──▶ Live
//!        ▲                                  │                       │                    │
//!        └──────────── the stream fails, ends, goes silent, or sends something invalid ◀─┘
//! ```
//!
//! - `Disconnected`: not connected; `.primary` is absent. Waits out the backoff
//!   (100 ms, doubling up to the configured reconnect delay).
//! - `Connecting`: connects and sends this replica's position for every database;
//!   the only message accepted now is `Hello`, which names the primary (served in
//!   `.primary` from then on) and resets the backoff.
//! - `CatchingUp`: applies change sets until `Ready`.
//! - `Live`: applies change sets as they commit on the primary, until a
//!   `Handoff`: the primary has stopped accepting writes and sent everything it
//!   accepted. The client checks that its positions equal the handoff's, publishes
//!   the handoff in its [`FollowerState`] (the role loop of the replica named in it
//!   takes the lease), and leaves the stream.
//!
//! In `Live`, `Peers` messages name the primary's other replicas; the client
//! keeps the latest list in [`KnownPeers`] for the role loop, which asks them for
//! what this node lacks if it takes over after the primary failed.
//! [`catch_up_from`] runs that catch-up: one stream to a peer, through the same
//! state machine from `Connecting` to `Ready`, applying what it sends.
//!
//! When the primary's `Hello` asks for acknowledgements (synchronous
//! replication), an `Acknowledger` task tells the primary where each database
//! stands after every change set applied from the stream, coalescing while a call
//! is on its way; on a `Handoff` the client sends a last one and waits for its
//! answer before it leaves, so commits the primary holds for the last change sets
//! are released.
//!
//! The [`FollowerState`] also says whether a stream is open (from `Hello` to its
//! end), so the role loop never takes a free lease while change sets may still
//! arrive.
//!
//! In every connected state heartbeats update the lag, and a heartbeat's positions
//! must equal this replica's own (everything sent before it has been applied);
//! chunks of one change set are collected until the last, then the whole change set
//! is checked against the CRC on its last chunk and applied: on the client's own
//! thread when it is small and no reader holds a lock the apply takes (the follow
//! loop has a runtime of its own, so a live change set goes from the socket to the
//! database without changing threads), otherwise on the blocking pool (the store
//! keeps readers out while it writes, not while bytes travel the network). A
//! change set that fails its CRC, or that the store rejects (it does not follow
//! this replica's position, or does not verify), is never applied: the
//! client logs why and reconnects, and the primary sends what this replica's
//! position needs (a snapshot when it cannot follow it). A stream that breaks off
//! between the chunks of a change set drops that change set and names it.
//!
//! Invariants: `.primary` names a primary only between its `Hello` and the end
//! of that stream; nothing from the network reaches the store before [`wire`]
//! validated it and its CRC matched; cancellation stops the client at its next
//! await.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ltx::{Header, TxId};
use crate::store::{AppliedChangeSet, ChangeSetBytes, Position, Store, StoreError, TryApply};

use super::chunk::{ChangeSet, Pushed, Reassembler};
use super::handoff::{FollowerState, HandoffSeen, LastHeard};
use super::peers::{KnownPeers, Peer};
use super::proto;
use super::spool::{ArrivedChangeSet, IncomingSpool};
use super::wire::{self, DatabaseName, PrimaryMessage, StreamAsker};
use super::{
    Client, ClientCredentials, MAX_CHANGE_SET_BYTES, MAX_CHANGE_SET_IN_MEMORY,
    PRIMARY_SILENCE_TIMEOUT, ReplicationError, blocking, remote_error,
};

/// The first reconnect delay; it doubles after each failed attempt.
const INITIAL_RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// What a replica needs to follow a primary.
#[derive(Debug, Clone)]
pub struct FollowSettings {
    /// The replica's databases.
    pub store: Arc<Store>,
    /// The primary's address.
    pub primary_url: String,
    /// This replica's name, for the primary's logs.
    pub hostname: String,
    /// Whether this replica may become the primary (the primary hands its role
    /// only to candidates).
    pub candidate: bool,
    /// The longest pause between reconnects.
    pub reconnect_delay: Duration,
    /// Where the client notes each message from the primary.
    pub last_heard: Arc<LastHeard>,
    /// Where other nodes reach this replica (`lease.advertise-url`), which the
    /// primary passes on to its other replicas.
    pub advertise_url: Option<String>,
    /// Where the client keeps the peers the primary names.
    pub known_peers: Arc<KnownPeers>,
    /// The TLS settings and cluster secret the client connects with.
    pub credentials: ClientCredentials,
}

/// Follows the primary until `shutdown` is cancelled: applies its change sets,
/// reconnecting with backoff, and publishes in `state` whether a stream is open
/// and the last `Handoff` received.
pub async fn follow(
    settings: FollowSettings,
    state: watch::Sender<FollowerState>,
    shutdown: CancellationToken,
) {
    let mut replica = Replica {
        spool: IncomingSpool::new(settings.store.clone()),
        store: settings.store,
        url: settings.primary_url,
        hostname: settings.hostname,
        candidate: settings.candidate,
        advertise_url: settings.advertise_url,
        session: Session::new(MAX_CHANGE_SET_BYTES),
        backoff: Backoff::new(settings.reconnect_delay),
        state,
        last_heard: settings.last_heard,
        known_peers: settings.known_peers,
        credentials: settings.credentials,
    };
    // The last failure logged as a warning: the same failure again (the primary
    // is still down) is only logged at debug level.
    let mut last_warning = None;
    loop {
        replica.session.enter(State::Connecting);
        let ended = tokio::select! {
            error = replica.run_stream() => error,
            () = shutdown.cancelled() => break,
        };
        let was_following = replica.session.state != State::Connecting;
        replica.disconnect();
        let delay = replica.backoff.next_delay();
        let message = ended.to_string();
        {
            let error: &dyn std::error::Error = &ended;
            if was_following || last_warning.as_ref() != Some(&message) {
                tracing::warn!(primary = %replica.url, error, retry_in = ?delay, "not following the primary");
            } else {
                tracing::debug!(primary = %replica.url, error, retry_in = ?delay, "not following the primary");
            }
        }
        last_warning = Some(message);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => break,
        }
    }
    replica.disconnect();
    tracing::info!(primary = %replica.url, "stopped following the primary");
}

/// Where the client is (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disconnected,
    Connecting,
    CatchingUp,
    Live,
}

/// What the client must do for a message.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A stream began: `hostname` is now the primary.
    Connected {
        hostname: String,
        timestamp_ms: u64,
        proxy_url: Option<String>,
        /// The stream to name in acknowledgements, when the primary wants them.
        acknowledge_stream: Option<u64>,
    },
    /// A change set is complete: verify and apply it.
    Apply(ChangeSet),
    /// Part of a change set arrived, more than may be held in memory: spool it.
    Spill(Vec<u8>),
    /// Part of a change set arrived; nothing to do yet.
    Collecting,
    /// The replica has caught up.
    CaughtUp,
    /// The primary is idle; its clock and where each database stands.
    Heartbeat {
        timestamp_ms: u64,
        positions: Vec<(DatabaseName, Position)>,
    },
    /// The primary's other replicas.
    Peers(Vec<Peer>),
    /// The primary hands its role to `to`; every database must be at `positions`.
    HandedOff {
        to: String,
        positions: Vec<(DatabaseName, Position)>,
    },
}

/// The protocol rules a stream must follow, without any I/O.
#[derive(Debug)]
struct Session {
    state: State,
    chunks: Reassembler,
}

impl Session {
    fn new(max_change_set_bytes: u64) -> Session {
        Session {
            state: State::Disconnected,
            chunks: Reassembler::new(max_change_set_bytes, MAX_CHANGE_SET_IN_MEMORY),
        }
    }

    fn enter(&mut self, state: State) {
        if state != self.state {
            tracing::debug!(from = ?self.state, to = ?state, "replication state");
        }
        if matches!(state, State::Disconnected | State::Connecting) {
            self.chunks.clear();
        }
        self.state = state;
    }

    /// Checks that `message` may come now and says what to do with it.
    fn receive(&mut self, message: PrimaryMessage) -> Result<Step, ReplicationError> {
        let unexpected = |message: &PrimaryMessage, state| ReplicationError::UnexpectedMessage {
            message: message.kind(),
            state,
        };
        match (self.state, message) {
            (State::Disconnected, message) => Err(unexpected(&message, "disconnected")),
            (
                State::Connecting,
                PrimaryMessage::Hello {
                    hostname,
                    timestamp_ms,
                    proxy_url,
                    acknowledge_stream,
                },
            ) => {
                self.enter(State::CatchingUp);
                Ok(Step::Connected {
                    hostname,
                    timestamp_ms,
                    proxy_url,
                    acknowledge_stream,
                })
            }
            (State::Connecting, message) => Err(unexpected(&message, "waiting for Hello")),
            (_, PrimaryMessage::Chunk(chunk)) => Ok(match self.chunks.push(chunk)? {
                Pushed::Complete(change_set) => Step::Apply(change_set),
                Pushed::Spill(bytes) => Step::Spill(bytes),
                Pushed::Incomplete => Step::Collecting,
            }),
            (_, message) if self.chunks.pending().is_some() => {
                Err(unexpected(&message, "receiving the chunks of a change set"))
            }
            (_, message @ PrimaryMessage::Hello { .. }) => {
                Err(unexpected(&message, "already connected"))
            }
            (State::CatchingUp, PrimaryMessage::Ready) => {
                self.enter(State::Live);
                Ok(Step::CaughtUp)
            }
            (_, message @ PrimaryMessage::Ready) => Err(unexpected(&message, "already live")),
            (
                _,
                PrimaryMessage::Heartbeat {
                    timestamp_ms,
                    positions,
                },
            ) => Ok(Step::Heartbeat {
                timestamp_ms,
                positions,
            }),
            (State::Live, PrimaryMessage::Handoff { to, positions }) => {
                Ok(Step::HandedOff { to, positions })
            }
            (State::Live, PrimaryMessage::Peers(peers)) => Ok(Step::Peers(peers)),
            (_, message @ PrimaryMessage::Peers(_)) => Err(unexpected(&message, "catching up")),
            (_, message @ PrimaryMessage::Handoff { .. }) => {
                Err(unexpected(&message, "catching up"))
            }
        }
    }

    /// Why the stream stopped, naming the change set it cut short, if any.
    fn interrupted(&self, cause: ReplicationError) -> ReplicationError {
        match self.chunks.pending() {
            Some((database, received)) => ReplicationError::TruncatedChangeSet {
                database: database.as_str().to_string(),
                received,
                cause: Box::new(cause),
            },
            None => cause,
        }
    }
}

/// The reconnect delays: from [`INITIAL_RECONNECT_DELAY`], doubling up to a
/// maximum, back to the start after a successful `Hello`.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: INITIAL_RECONNECT_DELAY.min(max),
            max,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = INITIAL_RECONNECT_DELAY.min(self.max);
    }
}

/// A replica following one primary.
struct Replica {
    store: Arc<Store>,
    url: String,
    hostname: String,
    candidate: bool,
    advertise_url: Option<String>,
    session: Session,
    /// Where a change set too large for memory collects.
    spool: IncomingSpool,
    backoff: Backoff,
    state: watch::Sender<FollowerState>,
    last_heard: Arc<LastHeard>,
    known_peers: Arc<KnownPeers>,
    credentials: ClientCredentials,
}

impl Replica {
    /// Connects and applies the stream until it ends; returns why it ended.
    async fn run_stream(&mut self) -> ReplicationError {
        match self.try_run_stream().await {
            Ok(never) => match never {},
            Err(error) => error,
        }
    }

    async fn try_run_stream(&mut self) -> Result<std::convert::Infallible, ReplicationError> {
        let asker = StreamAsker {
            hostname: &self.hostname,
            candidate: self.candidate,
            advertise_url: self.advertise_url.as_deref(),
        };
        let (client, mut stream) =
            open_stream(&self.store, &self.credentials, &self.url, asker, None).await?;
        // Sends acknowledgements while the stream lasts, if the primary wants them.
        let mut acknowledger = None;
        loop {
            let message = next_message(&mut stream, &self.session, &self.url).await?;
            self.last_heard.record();
            match self.session.receive(message)? {
                Step::Connected {
                    hostname,
                    timestamp_ms,
                    proxy_url,
                    acknowledge_stream,
                } => {
                    tracing::info!(primary = %hostname, url = %self.url, synchronous = acknowledge_stream.is_some(), "following the primary");
                    acknowledger = acknowledge_stream
                        .map(|stream_id| Acknowledger::start(client.clone(), &self.url, stream_id));
                    self.store.cluster().set_primary_proxy_url(proxy_url);
                    self.store.set_primary(Some(hostname));
                    self.store.cluster().note_primary_timestamp(timestamp_ms);
                    self.backoff.reset();
                    self.state.send_modify(|state| state.connected = true);
                }
                Step::Spill(bytes) => self.spool.append(bytes).await?,
                Step::Apply(change_set) => {
                    let database = change_set.database.as_str().to_string();
                    let change_set = self.spool.complete(change_set).await?;
                    let (header, position) = apply(
                        &self.store,
                        "the primary",
                        &self.url,
                        change_set,
                        ApplyOn::ClientThread,
                    )
                    .await?;
                    if let Some(acknowledger) = &acknowledger {
                        acknowledger.applied(&database, position);
                    }
                    // The change set's timestamp is when it committed on the primary.
                    self.store
                        .cluster()
                        .note_primary_timestamp(header.timestamp);
                }
                Step::Collecting => {}
                Step::CaughtUp => {
                    tracing::info!(primary = %self.url, "caught up with the primary");
                }
                Step::Heartbeat {
                    timestamp_ms,
                    positions,
                } => {
                    self.store.cluster().note_primary_timestamp(timestamp_ms);
                    let store = self.store.clone();
                    blocking(move || check_positions(&store, positions)).await?;
                }
                Step::Peers(peers) => {
                    tracing::info!(primary = %self.url, peers = ?peers.iter().map(|peer| &peer.hostname).collect::<Vec<_>>(), "the primary's replicas");
                    self.known_peers.replace(peers);
                }
                Step::HandedOff { to, positions } => {
                    // Everything the primary accepted was applied before this
                    // message; the positions prove it.
                    let store = self.store.clone();
                    blocking(move || check_positions(&store, positions)).await?;
                    tracing::info!(primary = %self.url, new_primary = %to, "the primary hands its role over");
                    self.state.send_modify(|state| {
                        state.handoff = Some(HandoffSeen {
                            to: to.clone(),
                            at: Instant::now(),
                        });
                    });
                    // A synchronous primary may hold commits the last change
                    // sets carried: they are acknowledged before the stream ends.
                    if let Some(acknowledger) = acknowledger.take() {
                        acknowledger.flush(&self.url).await;
                    }
                    return Err(ReplicationError::HandedOff { to });
                }
            }
        }
    }

    /// Leaves the stream: this replica no longer has a primary.
    fn disconnect(&mut self) {
        self.store.set_primary(None);
        self.session.enter(State::Disconnected);
        self.spool.clear();
        self.state.send_modify(|state| state.connected = false);
    }
}

/// Catches `databases` up from the node at `url` (a peer of this node's last
/// primary, which need not be a primary itself): applies the change sets that
/// follow this node's positions, or a snapshot of a database it lacks, until the
/// peer's `Ready`. `peer` is its hostname, for the logs; `hostname` this node's.
pub(super) async fn catch_up_from(
    store: &Arc<Store>,
    credentials: &ClientCredentials,
    peer: &str,
    url: &str,
    hostname: &str,
    databases: Vec<String>,
) -> Result<(), ReplicationError> {
    let asker = StreamAsker {
        hostname,
        candidate: true,
        advertise_url: None,
    };
    let (_, mut stream) = open_stream(store, credentials, url, asker, Some(databases)).await?;
    let source = format!("peer {peer}");
    let mut session = Session::new(MAX_CHANGE_SET_BYTES);
    let mut spool = IncomingSpool::new(store.clone());
    session.enter(State::Connecting);
    loop {
        let message = next_message(&mut stream, &session, url).await?;
        match session.receive(message)? {
            Step::Connected { .. } | Step::Collecting | Step::Heartbeat { .. } => {}
            Step::Spill(bytes) => spool.append(bytes).await?,
            Step::Apply(change_set) => {
                let change_set = spool.complete(change_set).await?;
                apply(store, &source, url, change_set, ApplyOn::BlockingPool).await?;
            }
            Step::CaughtUp => return Ok(()),
            Step::Peers(_) | Step::HandedOff { .. } => {
                return Err(ReplicationError::UnexpectedMessage {
                    message: "Peers or Handoff",
                    state: "catching up from a peer",
                });
            }
        }
    }
}

/// Connects to the node at `url` and opens a stream from this node's positions:
/// of every database to follow a primary, or of `catch_up` only. Returns the
/// client too, for other calls on the same connection.
async fn open_stream(
    store: &Arc<Store>,
    credentials: &ClientCredentials,
    url: &str,
    asker: StreamAsker<'_>,
    catch_up: Option<Vec<String>>,
) -> Result<(Client, tonic::Streaming<proto::StreamMessage>), ReplicationError> {
    let mut client = super::connect(url, credentials, None).await?;
    let store = store.clone();
    let only = catch_up.clone();
    let (positions, histories) = blocking(move || {
        let mut positions = store.positions();
        if let Some(only) = &only {
            positions.retain(|(name, _)| only.contains(name));
        }
        let limit = wire::history_points_per_database(positions.len());
        let mut histories = store.histories(limit)?;
        if let Some(only) = &only {
            histories.retain(|(name, _)| only.contains(name));
        }
        Ok((positions, histories))
    })
    .await?;
    let request = wire::stream_request(
        &asker,
        &positions,
        &histories,
        catch_up.as_deref().unwrap_or_default(),
    );
    let stream = client
        .stream(request)
        .await
        .map_err(|status| remote_error(url, &status))?
        .into_inner();
    Ok((client, stream))
}

/// How long a replica waits before it sends an acknowledgement again after one
/// failed.
const ACKNOWLEDGE_RETRY: Duration = Duration::from_millis(100);

/// Tells a synchronous primary, from a task of its own, where this replica's
/// databases stand after what it applied from one stream. Acknowledgements
/// coalesce: while one is on its way, later applies only update the next. The
/// task stops when this is dropped (the stream ended).
struct Acknowledger {
    applied: watch::Sender<BTreeMap<String, Position>>,
    task: tokio::task::JoinHandle<()>,
    client: Client,
    stream_id: u64,
}

/// How long a replica handed off by a synchronous primary tries to send its last
/// acknowledgement.
const FINAL_ACKNOWLEDGEMENT_TIMEOUT: Duration = Duration::from_secs(1);

impl Acknowledger {
    fn start(client: Client, url: &str, stream_id: u64) -> Acknowledger {
        let (applied, mut receiver) = watch::channel(BTreeMap::new());
        let url = url.to_string();
        let mut task_client = client.clone();
        let task = tokio::spawn(async move {
            while receiver.changed().await.is_ok() {
                loop {
                    let request = wire::acknowledgement(stream_id, &receiver.borrow_and_update());
                    match task_client.acknowledge(request).await {
                        Ok(_) => break,
                        Err(status) => {
                            let error = remote_error(&url, &status);
                            tracing::debug!(%error, "could not acknowledge; retrying");
                            tokio::time::sleep(ACKNOWLEDGE_RETRY).await;
                        }
                    }
                }
            }
        });
        Acknowledger {
            applied,
            task,
            client,
            stream_id,
        }
    }

    /// Sends where every database stands now and waits for the primary's answer
    /// (at most [`FINAL_ACKNOWLEDGEMENT_TIMEOUT`]), then stops.
    async fn flush(mut self, url: &str) {
        let request = wire::acknowledgement(self.stream_id, &self.applied.borrow());
        let sent = tokio::time::timeout(
            FINAL_ACKNOWLEDGEMENT_TIMEOUT,
            self.client.acknowledge(request),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                let error = remote_error(url, &status);
                tracing::warn!(%error, "could not send the last acknowledgement");
            }
            Err(_) => tracing::warn!(
                primary = url,
                "the last acknowledgement was not answered in time"
            ),
        }
    }

    /// Notes that a change set brought `database` to `position`.
    fn applied(&self, database: &str, position: Position) {
        self.applied.send_modify(|applied| {
            applied.insert(database.to_string(), position);
        });
    }
}

impl Drop for Acknowledger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The next message on `stream`, validated; an error names what ended the
/// stream, and the change set it cut short.
async fn next_message(
    stream: &mut tonic::Streaming<proto::StreamMessage>,
    session: &Session,
    url: &str,
) -> Result<PrimaryMessage, ReplicationError> {
    let message = match tokio::time::timeout(PRIMARY_SILENCE_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => return Err(session.interrupted(ReplicationError::StreamEnded)),
        Ok(Err(status)) => return Err(session.interrupted(remote_error(url, &status))),
        Err(_) => {
            return Err(
                session.interrupted(ReplicationError::PrimarySilent(PRIMARY_SILENCE_TIMEOUT))
            );
        }
    };
    wire::parse_primary_message(message)
}

/// The largest change set the follow loop applies on its own thread; larger ones
/// (a snapshot, a long catch-up) go to the blocking pool, so the stream's
/// connection keeps being served while they are written.
const MAX_INLINE_APPLY_BYTES: usize = 256 * 1024;

/// Where [`apply`] runs the store's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApplyOn {
    /// On the calling task's thread, when the change set is small and applying
    /// it needs no waiting (see [`Store::try_apply_change_set`]). Only for the
    /// follow loop, whose runtime
    /// ([`crate::node::NodeSettings::replica_runtime`]) runs nothing else: a
    /// change set then goes from the socket to the database on one thread,
    /// without a hand-off to the blocking pool and back.
    ClientThread,
    /// Always on the blocking pool (a catch-up from a peer runs on the shared
    /// runtime, whose workers must not block).
    BlockingPool,
}

/// Verifies and applies one whole change set from `source` (such as "the
/// primary"), at `url`, where `on` says; returns its header and the database's
/// position after it.
async fn apply(
    store: &Arc<Store>,
    source: &str,
    url: &str,
    change_set: ArrivedChangeSet,
    on: ApplyOn,
) -> Result<(Header, Position), ReplicationError> {
    let database = change_set.database.as_str().to_string();
    let small = matches!(&change_set.bytes, ChangeSetBytes::InMemory(bytes) if bytes.len() <= MAX_INLINE_APPLY_BYTES);
    let applied = if on == ApplyOn::ClientThread && small {
        verify_and_apply_here(store, change_set).await
    } else {
        let applying = store.clone();
        blocking(move || verify_and_apply(&applying, change_set)).await
    };
    match applied {
        Ok(Applied {
            header,
            before,
            shared_txid,
            applied,
        }) => {
            if header.is_snapshot() {
                log_replaced(&database, source, before, shared_txid, applied.position);
            }
            tracing::debug!(
                database,
                from = url,
                min_txid = %header.min_txid,
                max_txid = %header.max_txid,
                pages = applied.pages.len(),
                "applied a change set"
            );
            Ok((header, applied.position))
        }
        Err(
            error @ (ReplicationError::ChangeSetCrc { .. }
            | ReplicationError::InvalidChangeSet { .. }
            | ReplicationError::Store(StoreError::ChangeSetRejected { .. })),
        ) => {
            {
                let error: &dyn std::error::Error = &error;
                tracing::warn!(
                    database,
                    url,
                    error,
                    "refused a change set from {source}; nothing was applied; reconnecting to resynchronise"
                );
            }
            Err(error)
        }
        Err(error) => Err(error),
    }
}

/// Says what replacing `database` (at `before`) with the primary's snapshot
/// (reaching `after`) discarded: this node's transactions after the newest TXID
/// its history shares with the primary's, when the primary could tell.
fn log_replaced(
    database: &str,
    source: &str,
    before: Option<Position>,
    shared_txid: Option<TxId>,
    after: Position,
) {
    let Some(before) = before.filter(|before| before.txid.0 > 0) else {
        return;
    };
    match shared_txid {
        Some(shared) if shared < before.txid => tracing::warn!(
            database,
            first = %TxId(shared.0 + 1),
            last = %before.txid,
            discarded = before.txid.0 - shared.0,
            snapshot_txid = %after.txid,
            "discarding this node's transactions that {source} does not have; replacing the database with {source}'s snapshot"
        ),
        Some(_) => tracing::info!(
            database,
            local_txid = %before.txid,
            snapshot_txid = %after.txid,
            "replacing the database with {source}'s snapshot; this node's history is part of {source}'s"
        ),
        None if before.txid > after.txid => tracing::warn!(
            database,
            first = %TxId(after.txid.0 + 1),
            last = %before.txid,
            "discarding this node's transactions that {source} does not have (at least these: {source} could not say where the histories part); replacing the database with {source}'s snapshot"
        ),
        None => tracing::warn!(
            database,
            local_txid = %before.txid,
            snapshot_txid = %after.txid,
            "replacing the database with {source}'s snapshot; {source} could not say where the histories part, so this node's transactions it lacks cannot be named"
        ),
    }
}

/// What applying a change set did.
struct Applied {
    /// The change set's header.
    header: Header,
    /// The database's position before, if it existed.
    before: Option<Position>,
    /// For a snapshot, the newest TXID this node's history shares with the
    /// primary's, if the primary could tell.
    shared_txid: Option<TxId>,
    /// What the store did.
    applied: AppliedChangeSet,
}

/// A change set whose CRC checked out, and what the follow loop reports about it
/// once it is applied.
struct Verified {
    header: Header,
    before: Option<Position>,
    shared_txid: Option<TxId>,
}

impl Verified {
    fn applied(self, applied: AppliedChangeSet) -> Applied {
        Applied {
            header: self.header,
            before: self.before,
            shared_txid: self.shared_txid,
            applied,
        }
    }
}

/// Checks a change set's CRC and reads its header (from its file, for one in a
/// file) and where the database stands; returns the bytes to apply. A change
/// set whose CRC differs never reaches the store.
fn verify(
    store: &Store,
    change_set: ArrivedChangeSet,
) -> Result<(Verified, ChangeSetBytes), ReplicationError> {
    let ArrivedChangeSet {
        database,
        bytes,
        crc64,
        computed_crc64,
        shared_txid,
    } = change_set;
    let name = database.as_str();
    if computed_crc64 != crc64 {
        return Err(ReplicationError::ChangeSetCrc {
            database: name.to_string(),
            sent: crc64,
            computed: computed_crc64,
        });
    }
    let header = bytes.header(name)?;
    let before = store.database(name).map(|database| database.position());
    let verified = Verified {
        header,
        before,
        shared_txid,
    };
    Ok((verified, bytes))
}

/// Verifies and applies a change set (blocks: call it on the blocking pool).
fn verify_and_apply(
    store: &Store,
    change_set: ArrivedChangeSet,
) -> Result<Applied, ReplicationError> {
    let name = change_set.database.as_str().to_string();
    let (verified, bytes) = verify(store, change_set)?;
    let applied = store.apply_change_set(&name, bytes)?;
    Ok(verified.applied(applied))
}

/// Verifies and applies a change set in memory on the calling task's thread,
/// unless applying would wait (for a reader, say): then the store hands it back
/// and it is applied on the blocking pool, so this thread never waits for a
/// reader's transaction.
async fn verify_and_apply_here(
    store: &Arc<Store>,
    change_set: ArrivedChangeSet,
) -> Result<Applied, ReplicationError> {
    let name = change_set.database.as_str().to_string();
    let (verified, bytes) = verify(store, change_set)?;
    let applied = match store.try_apply_change_set(&name, bytes)? {
        TryApply::Applied(applied) => applied,
        TryApply::WouldWait(pending) => {
            let store = store.clone();
            blocking(move || Ok(store.apply_pending_change_set(pending)?)).await?
        }
    };
    Ok(verified.applied(applied))
}

/// Checks that every database is where the primary's heartbeat says it is.
fn check_positions(
    store: &Store,
    positions: Vec<(DatabaseName, Position)>,
) -> Result<(), ReplicationError> {
    for (name, primary) in positions {
        let local = store
            .database(name.as_str())
            .map_or(Position::UNKNOWN, |database| database.position());
        if local != primary {
            return Err(ReplicationError::Diverged {
                database: name.as_str().to_string(),
                local,
                primary,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{Checksum, TxId};
    use crate::replication::CHUNK_SIZE;
    use crate::replication::crc::ChangeSetCrc;
    use crate::replication::wire::Chunk;

    fn name(name: &str) -> DatabaseName {
        DatabaseName::parse("test", name.to_string()).unwrap()
    }

    fn hello() -> PrimaryMessage {
        PrimaryMessage::Hello {
            hostname: "node-a".into(),
            timestamp_ms: 5,
            proxy_url: None,
            acknowledge_stream: None,
        }
    }

    /// A chunk; the last carries the CRC 7.
    fn chunk(database: &str, data: Vec<u8>, last: bool) -> PrimaryMessage {
        PrimaryMessage::Chunk(Chunk {
            database: name(database),
            data,
            crc64: last.then_some(7),
            shared_txid: None,
        })
    }

    fn apply(database: &str, ltx: Vec<u8>) -> Step {
        Step::Apply(ChangeSet {
            database: name(database),
            computed_crc64: ChangeSetCrc::of(database, &ltx),
            ltx,
            spilled: 0,
            crc64: 7,
            shared_txid: None,
        })
    }

    fn heartbeat() -> PrimaryMessage {
        PrimaryMessage::Heartbeat {
            timestamp_ms: 9,
            positions: Vec::new(),
        }
    }

    fn connected() -> Session {
        let mut session = Session::new(MAX_CHANGE_SET_BYTES);
        session.enter(State::Connecting);
        session.receive(hello()).unwrap();
        session
    }

    #[test]
    fn the_backoff_doubles_up_to_the_reconnect_delay_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));

        let mut short = Backoff::new(Duration::from_millis(30));
        assert_eq!(short.next_delay(), Duration::from_millis(30));
        assert_eq!(short.next_delay(), Duration::from_millis(30));
    }

    #[test]
    fn a_stream_goes_from_connecting_through_catching_up_to_live() {
        let mut session = Session::new(MAX_CHANGE_SET_BYTES);
        session.enter(State::Connecting);
        assert_eq!(
            session.receive(hello()).unwrap(),
            Step::Connected {
                hostname: "node-a".into(),
                timestamp_ms: 5,
                proxy_url: None,
                acknowledge_stream: None,
            }
        );
        assert_eq!(session.state, State::CatchingUp);
        assert_eq!(
            session.receive(chunk("app.db", vec![1; 3], true)).unwrap(),
            apply("app.db", vec![1; 3])
        );
        assert!(matches!(
            session.receive(heartbeat()).unwrap(),
            Step::Heartbeat {
                timestamp_ms: 9,
                ..
            }
        ));
        assert_eq!(
            session.receive(PrimaryMessage::Ready).unwrap(),
            Step::CaughtUp
        );
        assert_eq!(session.state, State::Live);
        assert_eq!(
            session.receive(chunk("app.db", vec![2], false)).unwrap(),
            Step::Collecting
        );
        assert_eq!(
            session.receive(chunk("app.db", vec![3], true)).unwrap(),
            apply("app.db", vec![2, 3])
        );
    }

    #[test]
    fn messages_out_of_order_are_rejected() {
        let mut session = Session::new(MAX_CHANGE_SET_BYTES);
        session.enter(State::Connecting);
        for message in [
            PrimaryMessage::Ready,
            heartbeat(),
            chunk("a.db", vec![1], true),
        ] {
            assert!(matches!(
                session.receive(message),
                Err(ReplicationError::UnexpectedMessage {
                    state: "waiting for Hello",
                    ..
                })
            ));
        }

        let mut session = connected();
        assert!(matches!(
            session.receive(hello()),
            Err(ReplicationError::UnexpectedMessage {
                message: "Hello",
                ..
            })
        ));
        // Peers come after Ready only.
        assert!(matches!(
            session.receive(PrimaryMessage::Peers(Vec::new())),
            Err(ReplicationError::UnexpectedMessage {
                message: "Peers",
                state: "catching up"
            })
        ));
        session.receive(PrimaryMessage::Ready).unwrap();
        assert!(matches!(
            session.receive(PrimaryMessage::Ready),
            Err(ReplicationError::UnexpectedMessage {
                message: "Ready",
                state: "already live"
            })
        ));
        assert_eq!(
            session.receive(PrimaryMessage::Peers(Vec::new())).unwrap(),
            Step::Peers(Vec::new())
        );

        let mut session = connected();
        session.receive(chunk("a.db", vec![1], false)).unwrap();
        assert!(matches!(
            session.receive(heartbeat()),
            Err(ReplicationError::UnexpectedMessage {
                message: "Heartbeat",
                state: "receiving the chunks of a change set"
            })
        ));
    }

    #[test]
    fn a_reconnect_forgets_an_incomplete_change_set() {
        let mut session = connected();
        session
            .receive(chunk("a.db", vec![1; CHUNK_SIZE], false))
            .unwrap();
        session.enter(State::Disconnected);
        session.enter(State::Connecting);
        session.receive(hello()).unwrap();
        assert_eq!(
            session.receive(chunk("b.db", vec![2], true)).unwrap(),
            apply("b.db", vec![2])
        );
    }

    #[test]
    fn a_stream_that_stops_between_chunks_names_the_dropped_change_set() {
        let mut session = connected();
        let error = session.interrupted(ReplicationError::StreamEnded);
        assert!(matches!(error, ReplicationError::StreamEnded));
        session
            .receive(chunk("a.db", vec![1; CHUNK_SIZE], false))
            .unwrap();
        let error = session.interrupted(ReplicationError::StreamEnded);
        assert_eq!(
            error.to_string(),
            format!(
                "the stream broke off after {CHUNK_SIZE} bytes of a change set for database \"a.db\", which was dropped"
            )
        );
        assert_eq!(
            std::error::Error::source(&error).map(ToString::to_string),
            Some("the primary ended the stream".to_string())
        );
    }

    #[test]
    fn an_oversized_change_set_is_refused() {
        let mut session = Session::new(4);
        session.enter(State::Connecting);
        session.receive(hello()).unwrap();
        session.receive(chunk("a.db", vec![1; 3], false)).unwrap();
        assert!(matches!(
            session.receive(chunk("a.db", vec![1; 3], true)),
            Err(ReplicationError::OversizedChangeSet { .. })
        ));
    }

    #[test]
    fn a_heartbeat_position_that_differs_is_divergence() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            crate::store::CaptureOptions::default(),
            crate::store::Role::Replica,
        )
        .unwrap();
        let claimed = Position {
            txid: TxId(3),
            checksum: Checksum(Checksum::FLAG | 1),
        };
        let error = check_positions(&store, vec![(name("app.db"), claimed)]).unwrap_err();
        assert!(matches!(
            error,
            ReplicationError::Diverged { ref database, local, primary }
                if database == "app.db" && local == Position::UNKNOWN && primary == claimed
        ));
        assert!(check_positions(&store, Vec::new()).is_ok());
    }
}
