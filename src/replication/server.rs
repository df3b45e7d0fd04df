//! The primary's side: the gRPC server answering `Stream`, `Status`, and the
//! `Handoff` and `Promote` requests (which it passes to the role loop).
//!
//! Each `Stream` gets its own producer task, which sends, in order:
//! 1. `Hello` with this node's hostname and clock;
//! 2. for every database the primary has, what the replica needs from the
//!    position it sent (`Database::catch_up`, in batches of at most
//!    [`MAX_CATCH_UP_BYTES`]), or a snapshot when that position cannot be
//!    followed, repeated until nothing more is needed;
//! 3. `Ready`, then `Peers`: the replicas that have caught up and can be
//!    reached, sent again whenever that list changes;
//! 4. then, woken by the [`CommitBridge`](crate::bridge::CommitBridge) or by the
//!    heartbeat timer, whatever any database needs from the position last sent on
//!    this stream (a database that appears later starts from no position, so it
//!    gets a snapshot), and a `Heartbeat` whenever the stream has been silent for
//!    [`HEARTBEAT_INTERVAL`]; a commit within [`LIVE_BATCH_INTERVAL`] of the last
//!    send waits for the rest of that interval, so close commits go out together
//!    (never with synchronous replication); after a send the stream looks again
//!    when the interval is over instead of being woken by each commit;
//! 5. when the primary hands its role over (see `handoff`), what the replica
//!    lacks up to the final positions, then `Handoff`, and the stream ends.
//!
//! A request naming `catch_up_databases` comes from a node that took the lease
//! after its primary failed and catches up from this one: every node answers it,
//! whatever its role, with steps 1–3 for those databases only, and the stream
//! ends after `Ready`. It is not a replica's stream: it is neither a candidate
//! for a handoff nor a peer.
//!
//! Invariants: the chunks of one change set are consecutive, and the last carries
//! the change set's CRC over the database's name and its bytes; the producer keeps,
//! per database, the position the replica reaches after the last change set sent,
//! and every heartbeat carries exactly these; the producer writes into a channel
//! of [`STREAM_BUFFER_MESSAGES`], so a slow replica makes it wait rather than
//! buffer (see the module docs of `replication` for the memory bound); every call
//! into the store runs on the blocking pool; the producer stops when the replica
//! goes away, on shutdown, or when this node stops being the primary (after the
//! `Handoff`, when it hands the role over).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::service::Routes;
use tonic::transport::Server;

use crate::ltx::{HEADER_SIZE, Header, TRAILER_SIZE, Trailer, TxId};
use crate::store::cluster::unix_now_ms;
use crate::store::{CatchUp, Position, Role};

use super::auth::{self, ClusterKeys, ReplayGuard, ServerAuth};
use super::chunk::Pieces;
use super::crc::ChangeSetCrc;
use super::handoff::{ControlRequest, HandoffPhase, RegisteredStream, RoleRefusal};
use super::peers::Peer;
use super::precise_timer::PreciseTimer;
use super::proto::replication_server::{Replication, ReplicationServer};
use super::proto::{
    AcknowledgeRequest, AcknowledgeResponse, HandoffRequest, HandoffResponse, PromoteRequest,
    PromoteResponse, StatusRequest, StatusResponse, StreamMessage, StreamRequest,
};
use super::transport::{self, AddressSlots, Slot};
use super::wire;
use super::{
    CHUNK_SIZE, HEARTBEAT_INTERVAL, LIVE_BATCH_INTERVAL, MAX_CATCH_UP_BYTES,
    MAX_INLINE_CATCH_UP_BYTES, MAX_MESSAGE_BYTES, NodeContext, ReplicationError,
    STREAM_BUFFER_MESSAGES, blocking, status, status_from_error,
};

/// The buffer between the store's snapshot encoder and the spool file: one
/// write's worth (see [`crate::store::WRITE_PIECE_BYTES`]).
const SPOOL_BUFFER_BYTES: usize = crate::store::WRITE_PIECE_BYTES;

/// How long a stream that sent its `Handoff` waits for the replica to leave it.
const HANDOFF_LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a failing stream tries to tell its replica why.
const FAILURE_REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the server pings an idle HTTP/2 connection, and how long it waits
/// for the answer before dropping the connection and the streams on it: a
/// replica whose machine vanished must not keep a producer waiting forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The most replication streams a node serves at once.
pub const MAX_STREAMS: usize = 256;
/// The most replication streams a node serves to one IP address.
pub const MAX_STREAMS_PER_ADDRESS: usize = 8;
/// The most calls a node serves at once on one connection.
const MAX_CALLS_PER_CONNECTION: u32 = 64;

/// How the node API is served: TLS, and the secret calls must prove.
#[derive(Clone, Default)]
pub struct ServerSettings {
    /// The cluster's secrets; none: calls are not checked.
    pub keys: ClusterKeys,
    /// TLS (`http.tls`), mutual when it verifies client certificates.
    pub tls: Option<TlsAcceptor>,
    /// `GET /metrics` needs the secret as a bearer token too.
    pub metrics_secret: bool,
}

/// Serves replication on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    node: Arc<NodeContext>,
    settings: ServerSettings,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(
            %address,
            hostname = %node.hostname,
            tls = settings.tls.is_some(),
            authenticated = settings.keys.is_enabled(),
            "serving replication"
        );
    }
    let service = ReplicationService {
        node,
        shutdown: shutdown.clone(),
        streams: AddressSlots::new(MAX_STREAMS, MAX_STREAMS_PER_ADDRESS),
    };
    let incoming = transport::accept(listener, settings.tls.clone(), shutdown.clone());
    let metrics_node = service.node.clone();
    let grpc = ReplicationServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server_auth = ServerAuth {
        keys: settings.keys.clone(),
        replays: Arc::new(ReplayGuard::default()),
    };
    let metrics_keys = settings.metrics_secret.then(|| settings.keys.clone());
    let routes = Routes::new(grpc)
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(
            server_auth,
            auth::authenticate,
        ))
        .route(
            METRICS_PATH,
            axum::routing::get(move |headers: http::HeaderMap| {
                metrics(metrics_node.clone(), metrics_keys.clone(), headers)
            }),
        );
    Server::builder()
        // Plain HTTP/1.1 for `GET /metrics`; gRPC uses HTTP/2 on the same port.
        .accept_http1(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CALLS_PER_CONNECTION))
        .add_routes(Routes::from(routes))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await
        .map_err(ReplicationError::Serve)
}

/// Where the node's Prometheus metrics are served.
pub const METRICS_PATH: &str = "/metrics";

/// Answers `GET /metrics` (see `status::local_metrics`); with `keys`, only to a
/// bearer of the cluster secret.
async fn metrics(
    node: Arc<NodeContext>,
    keys: Option<ClusterKeys>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(keys) = keys {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if !token.is_some_and(|token| keys.accepts_bearer(token)) {
            return (
                http::StatusCode::UNAUTHORIZED,
                [(http::header::WWW_AUTHENTICATE, "Bearer")],
                "metrics need `Authorization: Bearer <cluster secret>` (http.metrics-secret)\n",
            )
                .into_response();
        }
    }
    match blocking(move || Ok(status::local_metrics(&node))).await {
        Ok(text) => (
            http::StatusCode::OK,
            [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        Err(error) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            [(http::header::CONTENT_TYPE, "text/plain")],
            error.to_string(),
        )
            .into_response(),
    }
}

struct ReplicationService {
    node: Arc<NodeContext>,
    shutdown: CancellationToken,
    /// The streams open, bounded in total and per address.
    streams: Arc<AddressSlots>,
}

type MessageSender = mpsc::Sender<Result<StreamMessage, tonic::Status>>;

#[tonic::async_trait]
impl Replication for ReplicationService {
    type StreamStream = ReceiverStream<Result<StreamMessage, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let address = request.remote_addr();
        self.open_stream(request.into_inner(), address)
            .map(tonic::Response::new)
            .map_err(|error| status_from_error(&error))
    }

    async fn status(
        &self,
        _request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        let node = self.node.clone();
        let status = blocking(move || Ok(status::local_status(&node)))
            .await
            .map_err(|error| status_from_error(&error))?;
        Ok(tonic::Response::new(status::to_proto(&status)))
    }

    async fn acknowledge(
        &self,
        request: tonic::Request<AcknowledgeRequest>,
    ) -> Result<tonic::Response<AcknowledgeResponse>, tonic::Status> {
        let (stream_id, positions) = wire::parse_acknowledgement(request.into_inner())
            .map_err(|error| status_from_error(&error))?;
        let positions: Vec<(String, Position)> = positions
            .into_iter()
            .map(|(name, position)| (name.as_str().to_string(), position))
            .collect();
        self.node.handoffs.acknowledge(stream_id, &positions);
        Ok(tonic::Response::new(AcknowledgeResponse {}))
    }

    async fn handoff(
        &self,
        request: tonic::Request<HandoffRequest>,
    ) -> Result<tonic::Response<HandoffResponse>, tonic::Status> {
        let hostname = wire::parse_hostname("HandoffRequest", request.into_inner().hostname)
            .map_err(|error| status_from_error(&error))?;
        tracing::info!(replica = %hostname, "a replica asks for the primary role");
        let (reply, answer) = oneshot::channel();
        self.ask_role_loop(ControlRequest::HandOffTo { hostname, reply }, answer)
            .await?;
        Ok(tonic::Response::new(HandoffResponse {}))
    }

    async fn promote(
        &self,
        _request: tonic::Request<PromoteRequest>,
    ) -> Result<tonic::Response<PromoteResponse>, tonic::Status> {
        tracing::info!("asked to become the primary");
        let (reply, answer) = oneshot::channel();
        let previous_primary = self
            .ask_role_loop(ControlRequest::Promote { reply }, answer)
            .await?;
        Ok(tonic::Response::new(PromoteResponse { previous_primary }))
    }
}

impl ReplicationService {
    /// Hands `request` to the role loop and waits for its answer.
    async fn ask_role_loop<T>(
        &self,
        request: ControlRequest,
        answer: oneshot::Receiver<Result<T, RoleRefusal>>,
    ) -> Result<T, tonic::Status> {
        if !self.node.handoffs.request(request).await {
            return Err(status_from_error(&RoleRefusal::ShuttingDown.into()));
        }
        match answer.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(refusal)) => Err(status_from_error(&refusal.into())),
            Err(_) => Err(status_from_error(&RoleRefusal::ShuttingDown.into())),
        }
    }
}

impl ReplicationService {
    fn open_stream(
        &self,
        request: StreamRequest,
        address: Option<std::net::SocketAddr>,
    ) -> Result<ReceiverStream<Result<StreamMessage, tonic::Status>>, ReplicationError> {
        let peer =
            address.map_or_else(|| "an unknown address".to_string(), |addr| addr.to_string());
        let ip = address.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |addr| addr.ip());
        let slot = AddressSlots::take(&self.streams, ip).map_err(|reason| {
            tracing::warn!(%peer, "refused a replication stream: too many streams ({reason})");
            ReplicationError::TooManyStreams(reason)
        })?;
        let open = match wire::parse_stream_request(request) {
            Ok(open) => open,
            Err(error) => {
                let error_ref: &dyn std::error::Error = &error;
                tracing::warn!(%peer, error = error_ref, "refused a replication stream");
                return Err(error);
            }
        };
        let purpose = if open.catch_up_databases.is_empty() {
            let cluster = self.node.store.cluster();
            if cluster.role() != Role::Primary {
                return Err(ReplicationError::NotPrimary {
                    primary: cluster.primary(),
                });
            }
            tracing::info!(replica = %open.hostname, %peer, databases = open.positions.len(), "replica connected");
            Purpose::Follow {
                registered: self.node.handoffs.register(
                    &open.hostname,
                    open.candidate,
                    open.advertise_url,
                ),
                peers: self.node.handoffs.watch_peers(),
            }
        } else {
            tracing::info!(node = %open.hostname, %peer, databases = open.catch_up_databases.len(), "a node taking over as the primary catches up from this one");
            Purpose::CatchUp {
                databases: open
                    .catch_up_databases
                    .into_iter()
                    .map(|name| name.as_str().to_string())
                    .collect(),
            }
        };
        let (messages, receiver) = mpsc::channel(STREAM_BUFFER_MESSAGES);
        let producer = Producer {
            node: self.node.clone(),
            purpose,
            handoff: self.node.handoffs.watch_phase(),
            replica: open.hostname,
            messages,
            initial: open
                .positions
                .into_iter()
                .map(|(name, position)| (name.as_str().to_string(), position))
                .collect(),
            histories: open.histories,
            sent: BTreeMap::new(),
            last_sent: Instant::now(),
            _slot: slot,
        };
        tokio::spawn(producer.run(self.shutdown.clone()));
        Ok(ReceiverStream::new(receiver))
    }
}

/// What a stream is for.
enum Purpose {
    /// A replica follows this primary.
    Follow {
        /// The stream in the handoff registry.
        registered: RegisteredStream,
        /// The peers to tell the replica about.
        peers: watch::Receiver<Vec<Peer>>,
    },
    /// A node that took over the lease catches up on these databases from this
    /// one (which need not be the primary); the stream ends at `Ready`.
    CatchUp { databases: BTreeSet<String> },
}

/// What a database needs next on a stream: the change sets after its position,
/// each with its CRC, or a snapshot (and why).
enum Next {
    ChangeSets(Vec<(Vec<u8>, u64)>),
    Snapshot {
        reason: String,
        shared_txid: Option<TxId>,
    },
}

impl Next {
    /// What `catch_up` says database `name` needs, with each change set's CRC.
    fn of(catch_up: CatchUp, name: &str) -> Next {
        match catch_up {
            CatchUp::ChangeSets(change_sets) => Next::ChangeSets(
                change_sets
                    .into_iter()
                    .map(|ltx| {
                        let crc = ChangeSetCrc::of(name, &ltx);
                        (ltx, crc)
                    })
                    .collect(),
            ),
            CatchUp::Snapshot {
                reason,
                shared_txid,
            } => Next::Snapshot {
                reason,
                shared_txid,
            },
        }
    }
}

/// Why a producer stopped early.
enum Stop {
    /// The replica went away (the response stream was dropped).
    ReplicaGone,
    /// Something failed; the replica is told.
    Failed(ReplicationError),
}

impl From<ReplicationError> for Stop {
    fn from(error: ReplicationError) -> Stop {
        Stop::Failed(error)
    }
}

/// Produces one replica's stream.
struct Producer {
    node: Arc<NodeContext>,
    purpose: Purpose,
    /// The handoff phase.
    handoff: watch::Receiver<HandoffPhase>,
    /// The replica's hostname, for logs.
    replica: String,
    messages: MessageSender,
    /// The positions the replica had when it connected.
    initial: BTreeMap<String, Position>,
    /// Where the replica's newest change sets ended when it connected.
    histories: BTreeMap<String, Vec<Position>>,
    /// Per database, the position the replica reaches after what was sent.
    sent: BTreeMap<String, Position>,
    /// When the last message was queued.
    last_sent: Instant,
    /// The stream's place in the limits, given back when the stream ends.
    _slot: Slot,
}

impl Producer {
    async fn run(mut self, shutdown: CancellationToken) {
        let messages = self.messages.clone();
        let outcome = tokio::select! {
            outcome = self.produce() => outcome,
            () = messages.closed() => Err(Stop::ReplicaGone),
            () = shutdown.cancelled() => Ok(()),
        };
        match outcome {
            Ok(()) => tracing::info!(replica = %self.replica, "replication stream closed"),
            Err(Stop::ReplicaGone) => {
                tracing::info!(replica = %self.replica, "replica disconnected")
            }
            Err(Stop::Failed(error)) => {
                {
                    let error: &dyn std::error::Error = &error;
                    tracing::warn!(replica = %self.replica, error, "replication stream failed");
                }
                // Tell the replica why, unless it is gone or stalled.
                let report = messages.send(Err(status_from_error(&error)));
                let _ = tokio::time::timeout(FAILURE_REPORT_TIMEOUT, report).await;
            }
        }
    }

    async fn produce(&mut self) -> Result<(), Stop> {
        let acknowledge_stream = match &self.purpose {
            Purpose::Follow { registered, .. } if self.node.synchronous => Some(registered.id()),
            _ => None,
        };
        self.send(wire::hello(
            &self.node.hostname,
            unix_now_ms(),
            self.node.proxy_url.as_deref(),
            acknowledge_stream,
        ))
        .await?;
        let mut commits = self.node.commits.subscribe();
        commits.mark_seen();
        // Catching up means reaching where every database was when the stream
        // started; commits during the catch-up are sent too, but not waited for.
        let store = self.node.store.clone();
        let targets: BTreeMap<String, Position> = blocking(move || Ok(store.positions()))
            .await?
            .into_iter()
            .filter(|(name, _)| match &self.purpose {
                Purpose::Follow { .. } => true,
                Purpose::CatchUp { databases } => databases.contains(name),
            })
            .collect();
        while self.round(Some(&targets)).await?.sent_any() && !self.reached(&targets) {}
        self.send(wire::ready()).await?;
        let mut peers = match &mut self.purpose {
            Purpose::CatchUp { .. } => {
                tracing::info!(node = %self.replica, "the node taking over has what this one had");
                return Ok(());
            }
            Purpose::Follow { registered, peers } => {
                registered.caught_up();
                peers.clone()
            }
        };
        tracing::info!(replica = %self.replica, "replica caught up");
        // Commits close to the last send wait to go out together; a held
        // synchronous commit never waits.
        let mut batch_timer = if self.node.synchronous {
            None
        } else {
            Some(PreciseTimer::new().map_err(|source| ReplicationError::Io {
                context: "create the stream's batching timer".to_string(),
                source,
            })?)
        };
        // The peers last sent; the replica hears the list at once, then each
        // change.
        let mut peers_sent = None;
        loop {
            let current = peers.borrow_and_update().clone();
            if peers_sent.as_ref() != Some(&current) {
                self.send(wire::peers(&current)).await?;
                peers_sent = Some(current);
            }
            let phase = self.handoff.borrow_and_update().clone();
            match phase {
                HandoffPhase::HandingOff { to, positions } => {
                    return self.hand_off(&to, &positions).await;
                }
                HandoffPhase::Draining => {}
                HandoffPhase::Idle => {
                    let cluster = self.node.store.cluster();
                    if cluster.role() != Role::Primary {
                        return Err(Stop::Failed(ReplicationError::NotPrimary {
                            primary: cluster.primary(),
                        }));
                    }
                }
            }
            commits.mark_seen();
            // After a send, a batching stream looks again when the interval is
            // over rather than being woken by each commit meanwhile, so under
            // load a commit wakes no async task, and the stream wakes once per
            // interval. A stream that found nothing waits for the next commit.
            let waiting_out_batch = match self.round(None).await? {
                Round::Nothing => false,
                Round::SentAll if batch_timer.is_some() => true,
                Round::SentAll | Round::SentSome => continue,
            };
            let batch_end = (self.last_sent + LIVE_BATCH_INTERVAL).into_std();
            let heartbeat_due = self.heartbeat_due();
            tokio::select! {
                waited = wait_batch(&mut batch_timer, batch_end), if waiting_out_batch => waited?,
                () = commits.changed(), if !waiting_out_batch => {
                    wait_batch(&mut batch_timer, batch_end).await?;
                }
                _ = self.handoff.changed() => {}
                _ = peers.changed() => {}
                () = tokio::time::sleep_until(heartbeat_due) => self.heartbeat().await?,
            }
        }
    }

    /// Sends what the replica lacks up to `positions` (where the primary stopped
    /// accepting writes), then the `Handoff` naming `to`; the stream ends there.
    async fn hand_off(&mut self, to: &str, positions: &[(String, Position)]) -> Result<(), Stop> {
        let targets: BTreeMap<String, Position> = positions.iter().cloned().collect();
        while !self.reached(&targets) && self.round(Some(&targets)).await?.sent_any() {}
        self.send(wire::handoff(to, positions)).await?;
        tracing::info!(replica = %self.replica, new_primary = to, "sent the handoff");
        // The stream stays registered until the replica leaves it, so that its
        // last acknowledgement still counts for commits held for it.
        let _ = tokio::time::timeout(HANDOFF_LEAVE_TIMEOUT, self.messages.closed()).await;
        Ok(())
    }

    /// Sends the next batch of every database (of `only`, when given) that is not
    /// where this stream left it; says whether that brought every database to
    /// where it stood when the round began.
    async fn round(&mut self, only: Option<&BTreeMap<String, Position>>) -> Result<Round, Stop> {
        // The positions are published without the capture lock: read here.
        let current = self.node.store.positions();
        let mut progressed = false;
        let mut behind = false;
        for (name, position) in current {
            if only.is_some_and(|only| !only.contains_key(&name)) {
                continue;
            }
            let from = self.from(&name);
            if position == from {
                self.record_sent(&name, from);
                continue;
            }
            progressed |= self.send_next(&name, from).await?;
            behind |= self.from(&name) != position;
        }
        Ok(match (progressed, behind) {
            (false, _) => Round::Nothing,
            (true, false) => Round::SentAll,
            (true, true) => Round::SentSome,
        })
    }

    /// Records that the replica reaches `position` of `name` with what was sent.
    fn record_sent(&mut self, name: &str, position: Position) {
        if self.sent.insert(name.to_string(), position) != Some(position) {
            if let Purpose::Follow { registered, .. } = &self.purpose {
                registered.sent(name, position);
            }
        }
    }

    /// Whether this stream has brought every database at least to `targets`.
    fn reached(&self, targets: &BTreeMap<String, Position>) -> bool {
        targets.iter().all(|(name, target)| {
            self.sent
                .get(name)
                .is_some_and(|sent| sent.txid >= target.txid)
        })
    }

    /// Where the replica stands on `name`, as far as this stream knows.
    fn from(&self, name: &str) -> Position {
        self.sent
            .get(name)
            .or_else(|| self.initial.get(name))
            .copied()
            .unwrap_or(Position::UNKNOWN)
    }

    /// Sends one batch of change sets of `name` after `from`, or a snapshot;
    /// returns whether anything was sent.
    async fn send_next(&mut self, name: &str, from: Position) -> Result<bool, Stop> {
        let Some(database) = self.node.store.database(name) else {
            return Ok(false);
        };
        let crc_name = name.to_string();
        // The replica's history describes where it stood when it connected.
        let history = if self.sent.contains_key(name) {
            Vec::new()
        } else {
            self.histories.remove(name).unwrap_or_default()
        };
        // Following live, a commit's few bytes are read here; the rest, and
        // anything that waits for the capture lock, on the blocking pool.
        let live = history
            .is_empty()
            .then(|| database.try_catch_up_live(from, MAX_INLINE_CATCH_UP_BYTES))
            .flatten();
        let answer = match live {
            Some(catch_up) => Next::of(catch_up.map_err(|error| Stop::Failed(error.into()))?, name),
            None => {
                self.beating(blocking(move || {
                    let catch_up = database.catch_up(from, &history, MAX_CATCH_UP_BYTES)?;
                    Ok(Next::of(catch_up, &crc_name))
                }))
                .await?
            }
        };
        match answer {
            Next::ChangeSets(change_sets) => {
                let sent_any = !change_sets.is_empty();
                let mut position = from;
                for (change_set, crc) in change_sets {
                    position = end_position(name, position, &change_set)?;
                    for (piece, last) in Pieces::new(change_set) {
                        self.send(wire::ltx_chunk(name, piece, last.then_some(crc), None))
                            .await?;
                    }
                    self.record_sent(name, position);
                }
                Ok(sent_any)
            }
            Next::Snapshot {
                reason,
                shared_txid,
            } => {
                tracing::info!(replica = %self.replica, database = name, %reason, shared_txid = shared_txid.map(|txid| txid.0), "sending a snapshot");
                self.send_snapshot(name, shared_txid).await?;
                Ok(true)
            }
        }
    }

    /// Spools a snapshot of `name` to a file and streams it in chunks as the file
    /// grows; the last says which TXID the replica's history shares with this
    /// one, if known. A chunk goes out only once the bytes after it exist or the
    /// spool is complete, so the last chunk is always known to be the last.
    /// Heartbeats are sent while the first chunk is awaited, never between the
    /// chunks.
    async fn send_snapshot(&mut self, name: &str, shared_txid: Option<TxId>) -> Result<(), Stop> {
        let Some(database) = self.node.store.database(name) else {
            return Ok(());
        };
        let dir = self.node.spool_dir.clone();
        let io = |context: String| move |source| ReplicationError::Io { context, source };
        let file = Arc::new(tempfile::tempfile_in(&dir).map_err(io(format!(
            "create a snapshot spool file in {}",
            dir.display()
        )))?);
        let (progress, mut spooled) = watch::channel(0u64);
        let spool_file = file.clone();
        let spooling = tokio::task::spawn_blocking(move || {
            let mut counting = CountingWriter {
                file: &spool_file,
                written: 0,
                progress,
            };
            let mut writer = BufWriter::with_capacity(SPOOL_BUFFER_BYTES, &mut counting);
            let position = database.write_snapshot(&mut writer)?;
            writer
                .flush()
                .map_err(io("write a snapshot spool file".to_string()))?;
            drop(writer);
            Ok::<_, ReplicationError>((counting.written, position))
        });
        let mut spooling = std::pin::pin!(spooling);
        let mut done: Option<(u64, Position)> = None;
        let mut offset = 0u64;
        let mut crc = ChangeSetCrc::new(name);
        loop {
            while done.is_none() && *spooled.borrow() <= offset + CHUNK_SIZE as u64 {
                tokio::select! {
                    biased;
                    finished = &mut spooling => {
                        done = Some(finished.map_err(ReplicationError::Task)??);
                    }
                    _ = spooled.changed() => {}
                    () = tokio::time::sleep_until(self.heartbeat_due()), if offset == 0 => {
                        self.heartbeat().await?;
                    }
                }
            }
            let available = done.map_or_else(|| *spooled.borrow(), |(len, _)| len);
            let size = (available - offset).min(CHUNK_SIZE as u64);
            let piece;
            (piece, crc) = read_piece(file.clone(), offset, size, crc).await?;
            offset += size;
            let last = done.is_some_and(|(len, _)| offset == len);
            self.send(wire::ltx_chunk(
                name,
                piece,
                last.then(|| crc.value()),
                shared_txid.filter(|_| last),
            ))
            .await?;
            if let Some((len, position)) = done.filter(|_| last) {
                tracing::debug!(replica = %self.replica, database = name, bytes = len, txid = %position.txid, "snapshot sent");
                self.record_sent(name, position);
                return Ok(());
            }
        }
    }

    /// Runs `work` (which must not send), sending heartbeats while it takes long.
    /// Never called between the chunks of one change set.
    async fn beating<T>(
        &mut self,
        work: impl Future<Output = Result<T, ReplicationError>>,
    ) -> Result<T, Stop> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => return result.map_err(Stop::Failed),
                () = tokio::time::sleep_until(self.heartbeat_due()) => self.heartbeat().await?,
            }
        }
    }

    fn heartbeat_due(&self) -> Instant {
        self.last_sent + HEARTBEAT_INTERVAL
    }

    async fn heartbeat(&mut self) -> Result<(), Stop> {
        let message = wire::heartbeat(unix_now_ms(), &self.sent);
        self.send(message).await
    }

    /// Queues a message, waiting while the replica is behind.
    async fn send(&mut self, message: StreamMessage) -> Result<(), Stop> {
        self.messages
            .send(Ok(message))
            .await
            .map_err(|_| Stop::ReplicaGone)?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// What one round of a stream sent.
enum Round {
    /// Every database was where the stream had left it.
    Nothing,
    /// Every database is now where it stood when the round began.
    SentAll,
    /// Something was sent, and some database has more to send.
    SentSome,
}

impl Round {
    fn sent_any(&self) -> bool {
        !matches!(self, Round::Nothing)
    }
}

/// Waits until `batch_end` on a batching stream's timer; returns at once on a
/// stream that does not batch.
async fn wait_batch(
    timer: &mut Option<PreciseTimer>,
    batch_end: std::time::Instant,
) -> Result<(), Stop> {
    let Some(timer) = timer else {
        return Ok(());
    };
    timer.sleep_until(batch_end).await.map_err(|source| {
        Stop::Failed(ReplicationError::Io {
            context: "wait on the stream's batching timer".to_string(),
            source,
        })
    })
}

/// Writes a snapshot into its spool file, publishing how many bytes the file
/// holds after each write, so the stream can send them while the rest is written.
struct CountingWriter<'a> {
    file: &'a File,
    written: u64,
    progress: watch::Sender<u64>,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let count = self.file.write(bytes)?;
        self.written += count as u64;
        self.progress.send_replace(self.written);
        Ok(count)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads `size` bytes at `offset` of a spooled snapshot, and continues the
/// snapshot's `crc` over them.
async fn read_piece(
    file: Arc<File>,
    offset: u64,
    size: u64,
    mut crc: ChangeSetCrc,
) -> Result<(Vec<u8>, ChangeSetCrc), ReplicationError> {
    blocking(move || {
        let mut piece = vec![0u8; size as usize];
        file.read_exact_at(&mut piece, offset)
            .map_err(|source| ReplicationError::Io {
                context: format!("read a snapshot spool file at offset {offset}"),
                source,
            })?;
        crc.update(&piece);
        Ok((piece, crc))
    })
    .await
}

/// The position a replica at `from` reaches by applying `change_set` (of the
/// primary's own log): its header's last TXID and its trailer's checksum.
fn end_position(
    name: &str,
    from: Position,
    change_set: &[u8],
) -> Result<Position, ReplicationError> {
    let invalid = |source| ReplicationError::InvalidChangeSet {
        database: name.to_string(),
        source,
    };
    let header =
        Header::decode(change_set.get(..HEADER_SIZE).unwrap_or(change_set)).map_err(invalid)?;
    let trailer_start = change_set.len().saturating_sub(TRAILER_SIZE);
    let trailer = Trailer::decode(&change_set[trailer_start..]).map_err(invalid)?;
    if header.max_txid <= from.txid {
        return Err(ReplicationError::NoProgress {
            database: name.to_string(),
            after: from.txid,
            max_txid: header.max_txid,
        });
    }
    Ok(Position {
        txid: header.max_txid,
        checksum: trailer.post_apply_checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::CommitBridge;
    use crate::ltx::{Checksum, DatabaseChecksum, Encoder, TxId};
    use crate::replication::Handoffs;
    use crate::store::{CaptureOptions, Store};

    #[tokio::test]
    async fn a_replica_refuses_streams_and_names_its_primary() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Replica).unwrap());
        store.set_primary(Some("node-a".into()));
        let service = ReplicationService {
            node: Arc::new(NodeContext {
                store,
                hostname: "node-b".into(),
                commits: Arc::new(CommitBridge::new()),
                spool_dir: dir.path().to_path_buf(),
                handoffs: Arc::new(Handoffs::new().0),
                proxy_url: None,
                synchronous: false,
                backups: Default::default(),
            }),
            shutdown: CancellationToken::new(),
            streams: AddressSlots::new(MAX_STREAMS, MAX_STREAMS_PER_ADDRESS),
        };
        let request = tonic::Request::new(wire::stream_request(
            &wire::test_asker("node-c", false),
            &[],
            &[],
            &[],
        ));
        let Err(status) = service.stream(request).await else {
            panic!("a replica must not serve a stream");
        };
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "this node is not the primary; the primary is node-a"
        );
        let answer = service
            .status(tonic::Request::new(StatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (answer.role.as_str(), answer.primary.as_str()),
            ("replica", "node-a")
        );
    }

    #[tokio::test]
    async fn a_bad_stream_request_is_an_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let service = ReplicationService {
            node: Arc::new(NodeContext {
                store,
                hostname: "node-a".into(),
                commits: Arc::new(CommitBridge::new()),
                spool_dir: dir.path().to_path_buf(),
                handoffs: Arc::new(Handoffs::new().0),
                proxy_url: None,
                synchronous: false,
                backups: Default::default(),
            }),
            shutdown: CancellationToken::new(),
            streams: AddressSlots::new(MAX_STREAMS, MAX_STREAMS_PER_ADDRESS),
        };
        let mut request = wire::stream_request(&wire::test_asker("node-c", false), &[], &[], &[]);
        request
            .positions
            .push(wire::position_to_proto("app.db-wal", Position::UNKNOWN));
        let Err(status) = service.stream(tonic::Request::new(request)).await else {
            panic!("an invalid request must be refused");
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("app.db-wal"),
            "{}",
            status.message()
        );
    }

    fn change_set(min: u64, max: u64) -> (Vec<u8>, Checksum) {
        let page = vec![7u8; 512];
        let mut checksum = DatabaseChecksum::new(512).unwrap();
        checksum.add_page(1, &page);
        let header = Header {
            page_size: 512,
            commit: 1,
            min_txid: TxId(min),
            max_txid: TxId(max),
            timestamp: 1,
            pre_apply_checksum: if min == 1 {
                Checksum::ZERO
            } else {
                Checksum(Checksum::FLAG | 5)
            },
            ..Header::default()
        };
        let mut bytes = Vec::new();
        let mut encoder = Encoder::new(&mut bytes, header).unwrap();
        encoder.encode_page(1, &page).unwrap();
        encoder.finish(checksum.value()).unwrap();
        (bytes, checksum.value())
    }

    #[test]
    fn the_end_position_comes_from_header_and_trailer() {
        let (bytes, checksum) = change_set(3, 4);
        let from = Position {
            txid: TxId(2),
            checksum: Checksum(Checksum::FLAG | 5),
        };
        assert_eq!(
            end_position("app.db", from, &bytes).unwrap(),
            Position {
                txid: TxId(4),
                checksum
            }
        );
        let at_four = Position {
            txid: TxId(4),
            checksum,
        };
        assert!(matches!(
            end_position("app.db", at_four, &bytes),
            Err(ReplicationError::NoProgress { .. })
        ));
        assert!(matches!(
            end_position("app.db", from, &bytes[..50]),
            Err(ReplicationError::InvalidChangeSet { .. })
        ));
    }
}
