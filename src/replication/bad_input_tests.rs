//! The replica's defences against bad input, end to end in one process: a primary
//! store serves replication on loopback, the real [`follow`] client applies what it
//! receives to a replica store, and between them a relay speaking the generated
//! protocol tampers with the first stream's messages. Two more tests stand in for
//! a peer of another protocol version. Each test checks that what was wrong was
//! refused with a log line naming it, that nothing of it was applied, and that the
//! replica converges by itself once its next stream goes through untouched.
//!
//! The relay holds every stream after the first until the test has looked at the
//! replica, so the checks see the replica exactly as the bad input left it. The
//! tests run on a current-thread runtime, so the client's and the server's log
//! events reach the subscriber each test installs for its own thread.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::test_logs::Logs;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::bridge::CommitBridge;
use crate::ltx::{HEADER_SIZE, Header, TxId};
use crate::store::{CaptureOptions, Position, Role, SQLITE_HEADER_MAGIC, Store};

use super::proto::replication_client::ReplicationClient;
use super::proto::replication_server::{Replication, ReplicationServer};
use super::proto::stream_message::Message;
use super::proto::{
    self, AcknowledgeRequest, AcknowledgeResponse, HandoffRequest, HandoffResponse, PromoteRequest,
    PromoteResponse, StatusRequest, StatusResponse, StreamMessage, StreamRequest,
};
use super::{
    CHUNK_SIZE, FollowSettings, FollowerState, Handoffs, NodeContext, PROTOCOL_VERSION, follow,
    serve,
};

const PAGE_SIZE: usize = 4096;
/// The longest any one wait in these tests may take.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The replica's longest reconnect delay.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
const DB: &str = "app.db";

// ---------------------------------------------------------------------------------
// Stores
// ---------------------------------------------------------------------------------

/// One page of a well-formed SQLite database in rollback mode.
fn page(pgno: u32, fill: u8) -> Vec<u8> {
    let mut page = vec![fill; PAGE_SIZE];
    if pgno == 1 {
        page[..100].fill(0);
        page[..16].copy_from_slice(SQLITE_HEADER_MAGIC);
        page[16..18].copy_from_slice(&(PAGE_SIZE as u16).to_be_bytes());
        page[18] = 1;
        page[19] = 1;
    }
    page
}

/// Commits one rollback-journal transaction writing `pages` of database `name`.
fn commit(store: &Store, name: &str, pages: impl IntoIterator<Item = (u32, u8)>) {
    let database = store
        .lookup(name)
        .unwrap_or_else(|| store.create(name).unwrap());
    let journal_name = format!("{name}-journal");
    let journal = store.create(&journal_name).unwrap();
    journal
        .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
        .unwrap();
    for (pgno, fill) in pages {
        database
            .write_at(u64::from(pgno - 1) * PAGE_SIZE as u64, &page(pgno, fill))
            .unwrap();
    }
    store.unlink(&journal_name).unwrap();
}

/// Every database of `store` with its position and its content.
fn state(store: &Store) -> Vec<(String, Position, Vec<u8>)> {
    store
        .positions()
        .into_iter()
        .map(|(name, position)| {
            let content = store.lookup(&name).unwrap().read_at(0, 64 << 20).unwrap();
            (name, position, content)
        })
        .collect()
}

/// The position of database `name`, which must exist.
fn position(store: &Store, name: &str) -> Position {
    store.database(name).unwrap().position()
}

/// Opens a primary store in `dir`.
fn primary_store(dir: &Path) -> Arc<Store> {
    Arc::new(Store::open(dir, CaptureOptions::default(), Role::Primary).unwrap())
}

/// The node `node-a` of the primary `store`, spooling to `dir`.
pub(super) fn primary_node(store: &Arc<Store>, dir: &Path) -> Arc<NodeContext> {
    let commits = Arc::new(CommitBridge::new());
    store.set_commit_listener(commits.clone());
    Arc::new(NodeContext {
        store: store.clone(),
        hostname: "node-a".into(),
        commits,
        spool_dir: dir.to_path_buf(),
        handoffs: Arc::new(Handoffs::new().0),
        proxy_url: None,
        synchronous: false,
        backups: Default::default(),
    })
}

/// Serves replication for the primary `store` on `listener`.
fn serve_primary(
    store: &Arc<Store>,
    dir: &Path,
    listener: TcpListener,
    shutdown: &CancellationToken,
) -> JoinHandle<Result<(), super::ReplicationError>> {
    let node = primary_node(store, dir);
    tokio::spawn(serve(listener, node, Default::default(), shutdown.clone()))
}

/// Follows the primary at `url` as the replica `node-b` until `shutdown`.
fn follow_as_node_b(
    replica: &Arc<Store>,
    url: String,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let settings = FollowSettings {
        store: replica.clone(),
        primary_url: url,
        hostname: "node-b".into(),
        candidate: false,
        reconnect_delay: RECONNECT_DELAY,
        last_heard: Default::default(),
        advertise_url: None,
        known_peers: Default::default(),
        credentials: Default::default(),
    };
    let (state, _) = watch::channel(FollowerState::default());
    tokio::spawn(follow(settings, state, shutdown.clone()))
}

/// A loopback listener on a free port, and its URL.
async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// Waits until the replica has every database of the primary at the same
/// position, then checks that the contents are the same too.
async fn converge(primary: &Store, replica: &Store, logs: &Logs) {
    let deadline = Instant::now() + TIMEOUT;
    while primary.positions() != replica.positions() {
        assert!(
            Instant::now() < deadline,
            "the replica did not converge: primary {:?}, replica {:?}; log:\n{}",
            primary.positions(),
            replica.positions(),
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        state(primary) == state(replica),
        "same positions but different content"
    );
}

// ---------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------

/// A message of the first stream as it passes the relay; the chunks of a change
/// set are gathered into one.
enum Passing {
    Message(StreamMessage),
    ChangeSet {
        header: Header,
        chunks: Vec<proto::LtxChunk>,
    },
}

impl Passing {
    /// The messages as the primary sent them.
    fn unchanged(self) -> Tampered {
        Tampered::Send(match self {
            Passing::Message(message) => vec![message],
            Passing::ChangeSet { chunks, .. } => chunk_messages(chunks),
        })
    }
}

fn chunk_messages(chunks: impl IntoIterator<Item = proto::LtxChunk>) -> Vec<StreamMessage> {
    chunks
        .into_iter()
        .map(|chunk| StreamMessage {
            message: Some(Message::LtxChunk(chunk)),
        })
        .collect()
}

/// What the relay sends on in place of what passed.
enum Tampered {
    Send(Vec<StreamMessage>),
    /// Sends these, then ends the stream.
    SendAndEnd(Vec<StreamMessage>),
}

type Tamper = Box<dyn FnMut(Passing) -> Tampered + Send>;

/// Serves `Stream` by opening one to the primary and forwarding its messages: the
/// first stream's through the tamper, later streams' unchanged once released.
struct Relay {
    upstream: String,
    tamper: Mutex<Option<Tamper>>,
    streams: watch::Sender<usize>,
    release: CancellationToken,
}

impl Relay {
    /// A client of the primary.
    async fn upstream(&self) -> ReplicationClient<tonic::transport::Channel> {
        ReplicationClient::connect(self.upstream.clone())
            .await
            .expect("the relay reaches the primary")
    }
}

/// The relay as a gRPC service.
struct RelayService(Arc<Relay>);

#[tonic::async_trait]
impl Replication for RelayService {
    type StreamStream = ReceiverStream<Result<StreamMessage, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let relay = &self.0;
        relay.streams.send_modify(|streams| *streams += 1);
        let tamper = relay.tamper.lock().unwrap().take();
        if tamper.is_none() {
            relay.release.cancelled().await;
        }
        let upstream = relay
            .upstream()
            .await
            .stream(request.into_inner())
            .await?
            .into_inner();
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(forward(upstream, sender, tamper));
        Ok(tonic::Response::new(ReceiverStream::new(receiver)))
    }

    async fn status(
        &self,
        request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        self.0.upstream().await.status(request.into_inner()).await
    }

    async fn handoff(
        &self,
        request: tonic::Request<HandoffRequest>,
    ) -> Result<tonic::Response<HandoffResponse>, tonic::Status> {
        self.0.upstream().await.handoff(request.into_inner()).await
    }

    async fn promote(
        &self,
        request: tonic::Request<PromoteRequest>,
    ) -> Result<tonic::Response<PromoteResponse>, tonic::Status> {
        self.0.upstream().await.promote(request.into_inner()).await
    }

    async fn acknowledge(
        &self,
        request: tonic::Request<AcknowledgeRequest>,
    ) -> Result<tonic::Response<AcknowledgeResponse>, tonic::Status> {
        self.0
            .upstream()
            .await
            .acknowledge(request.into_inner())
            .await
    }
}

/// Forwards the primary's messages on one stream, through `tamper` when given,
/// until either side ends it.
async fn forward(
    mut upstream: tonic::Streaming<StreamMessage>,
    sender: mpsc::Sender<Result<StreamMessage, tonic::Status>>,
    mut tamper: Option<Tamper>,
) {
    let mut gathered = Vec::new();
    loop {
        let message = match upstream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(status) => {
                let _ = sender.send(Err(status)).await;
                return;
            }
        };
        let Some(tamper) = tamper.as_mut() else {
            if sender.send(Ok(message)).await.is_err() {
                return;
            }
            continue;
        };
        let passing = match message.message {
            Some(Message::LtxChunk(chunk)) => {
                let last = chunk.last;
                gathered.push(chunk);
                if !last {
                    continue;
                }
                let chunks = std::mem::take(&mut gathered);
                let header =
                    Header::decode(&chunks[0].data[..HEADER_SIZE]).expect("the primary sends LTX");
                Passing::ChangeSet { header, chunks }
            }
            message => Passing::Message(StreamMessage { message }),
        };
        let (messages, end) = match tamper(passing) {
            Tampered::Send(messages) => (messages, false),
            Tampered::SendAndEnd(messages) => (messages, true),
        };
        for message in messages {
            if sender.send(Ok(message)).await.is_err() {
                return;
            }
        }
        if end {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------
// A primary, a relay and a replica
// ---------------------------------------------------------------------------------

/// A primary, a replica following it through a relay, and the test's log.
struct Cluster {
    primary: Arc<Store>,
    replica: Arc<Store>,
    logs: Logs,
    streams: watch::Receiver<usize>,
    release: CancellationToken,
    shutdown: CancellationToken,
    follower: JoinHandle<()>,
    _log_guard: tracing::subscriber::DefaultGuard,
    _dirs: [TempDir; 2],
}

impl Cluster {
    /// A primary with `app.db` at TXID 1, and a replica following it through a
    /// relay that passes the first stream's messages through `tamper`.
    async fn start(tamper: impl FnMut(Passing) -> Tampered + Send + 'static) -> Cluster {
        let (logs, log_guard) = Logs::capture();
        let shutdown = CancellationToken::new();
        let primary_dir = tempfile::tempdir().unwrap();
        let replica_dir = tempfile::tempdir().unwrap();
        let primary = primary_store(primary_dir.path());
        let (listener, primary_url) = listen().await;
        serve_primary(&primary, primary_dir.path(), listener, &shutdown);
        commit(&primary, DB, [(1, 1), (2, 2)]);

        let (streams, streams_seen) = watch::channel(0);
        let release = CancellationToken::new();
        let relay = Arc::new(Relay {
            upstream: primary_url,
            tamper: Mutex::new(Some(Box::new(tamper))),
            streams,
            release: release.clone(),
        });
        let (listener, relay_url) = listen().await;
        tokio::spawn(
            Server::builder()
                .add_service(ReplicationServer::new(RelayService(relay)))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener),
                    shutdown.clone().cancelled_owned(),
                ),
        );

        let replica = Arc::new(
            Store::open(replica_dir.path(), CaptureOptions::default(), Role::Replica).unwrap(),
        );
        let follower = follow_as_node_b(&replica, relay_url, &shutdown);
        Cluster {
            primary,
            replica,
            logs,
            streams: streams_seen,
            release,
            shutdown,
            follower,
            _log_guard: log_guard,
            _dirs: [primary_dir, replica_dir],
        }
    }

    /// Waits until the replica is where the primary is.
    async fn converge(&self) {
        converge(&self.primary, &self.replica, &self.logs).await;
    }

    /// Waits until the replica has given up the tampered stream and opened the
    /// next, which the relay holds until [`Cluster::release`].
    async fn wait_for_reconnect(&mut self) {
        let reconnected = self.streams.wait_for(|&streams| streams >= 2);
        tokio::time::timeout(TIMEOUT, reconnected)
            .await
            .unwrap_or_else(|_| panic!("the replica did not reconnect; log:\n{}", self.logs.text()))
            .unwrap();
    }

    /// Lets the streams the relay holds through, untouched.
    fn release(&self) {
        self.release.cancel();
    }

    /// Stops the nodes and waits for the replica's client to end.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(TIMEOUT, self.follower)
            .await
            .expect("the replica stops on shutdown")
            .unwrap();
    }
}

/// The first change set of `app.db` after TXID 1 (the snapshot).
fn is_second(header: &Header) -> bool {
    header.min_txid == TxId(2)
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_corrupt_change_set_fails_its_crc_and_is_not_applied() {
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::ChangeSet { header, mut chunks } if is_second(&header) => {
            let data = &mut chunks.last_mut().unwrap().data;
            let middle = data.len() / 2;
            data[middle] ^= 0x04;
            Tampered::Send(chunk_messages(chunks))
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    let before = state(&cluster.replica);
    commit(&cluster.primary, DB, [(2, 0x22)]);

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica) == before, "nothing was applied");
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "refused a change set from the primary; nothing was applied",
                "change set for database \"app.db\" fails its CRC-64",
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_change_set_labelled_with_another_database_is_refused() {
    // The snapshot of `app.db` arrives as `apq.db`: one bit of the name flipped.
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::ChangeSet { header, mut chunks } if header.is_snapshot() => {
            for chunk in &mut chunks {
                chunk.database = "apq.db".into();
            }
            Tampered::Send(chunk_messages(chunks))
        }
        other => other.unchanged(),
    })
    .await;

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica).is_empty(), "nothing was applied");
    assert!(cluster.replica.lookup("apq.db").is_none());
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "refused a change set from the primary",
                "change set for database \"apq.db\" fails its CRC-64",
                "belongs to another database",
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    assert!(cluster.replica.lookup("apq.db").is_none());
    cluster.stop().await;
}

#[tokio::test]
async fn a_change_set_cut_off_between_its_chunks_is_dropped() {
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::ChangeSet { chunks, .. } if chunks.len() > 1 => {
            Tampered::SendAndEnd(chunk_messages(chunks.into_iter().take(1)))
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    let before = state(&cluster.replica);
    let pages = (2 * CHUNK_SIZE / PAGE_SIZE) as u32 + 1;
    commit(&cluster.primary, DB, (2..=pages).map(|pgno| (pgno, 0x33)));

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica) == before, "nothing was applied");
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "not following the primary",
                &format!(
                    "the stream broke off after {CHUNK_SIZE} bytes of a change set for database \"app.db\", which was dropped"
                ),
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn chunks_in_the_wrong_order_fail_the_crc() {
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::ChangeSet { mut chunks, .. } if chunks.len() > 2 => {
            // The first two chunks swap places; the last (with the CRC) stays last.
            chunks.swap(0, 1);
            Tampered::Send(chunk_messages(chunks))
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    let before = state(&cluster.replica);
    let pages = (2 * CHUNK_SIZE / PAGE_SIZE) as u32 + 1;
    commit(&cluster.primary, DB, (2..=pages).map(|pgno| (pgno, 0x33)));

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica) == before, "nothing was applied");
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "refused a change set from the primary",
                "change set for database \"app.db\" fails its CRC-64",
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn change_sets_in_the_wrong_order_are_refused() {
    let mut held = None;
    let mut cluster = Cluster::start(move |passing| match passing {
        Passing::ChangeSet { header, chunks } if is_second(&header) => {
            held = Some(chunks);
            Tampered::Send(Vec::new())
        }
        Passing::ChangeSet { header, chunks } if header.min_txid == TxId(3) => {
            let mut messages = chunk_messages(chunks);
            messages.extend(chunk_messages(held.take().unwrap()));
            Tampered::Send(messages)
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    let before = state(&cluster.replica);
    commit(&cluster.primary, DB, [(2, 0x22)]);
    commit(&cluster.primary, DB, [(2, 0x23)]);

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica) == before, "nothing was applied");
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "refused a change set from the primary",
                "change set 0000000000000003-0000000000000003.ltx does not follow TXID 0000000000000001",
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_duplicated_change_set_is_applied_once() {
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::ChangeSet { header, chunks } if is_second(&header) => {
            let mut messages = chunk_messages(chunks.clone());
            messages.extend(chunk_messages(chunks));
            Tampered::Send(messages)
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    commit(&cluster.primary, DB, [(2, 0x22)]);

    cluster.wait_for_reconnect().await;
    // The first copy was applied, the second refused.
    assert_eq!(position(&cluster.replica, DB).txid, TxId(2));
    assert!(state(&cluster.replica) == state(&cluster.primary));
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "refused a change set from the primary",
                "change set 0000000000000002-0000000000000002.ltx does not follow TXID 0000000000000002",
            ],
        )
        .await;
    cluster.release();
    commit(&cluster.primary, DB, [(3, 0x33)]);
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_heartbeat_claiming_a_txid_the_replica_is_past_is_refused() {
    // The position at TXID 1, which the relay's heartbeat will claim once the
    // replica is at TXID 2.
    let earlier = Arc::new(Mutex::new(None::<Position>));
    let claim = earlier.clone();
    let mut cluster = Cluster::start(move |passing| match passing {
        Passing::Message(StreamMessage {
            message: Some(Message::Heartbeat(mut heartbeat)),
        }) => {
            let earlier = *claim.lock().unwrap();
            for position in &mut heartbeat.positions {
                match earlier {
                    Some(earlier) if position.txid > earlier.txid.0 => {
                        position.txid = earlier.txid.0;
                        position.checksum = earlier.checksum.0;
                    }
                    _ => {}
                }
            }
            Tampered::Send(vec![StreamMessage {
                message: Some(Message::Heartbeat(heartbeat)),
            }])
        }
        other => other.unchanged(),
    })
    .await;
    cluster.converge().await;
    *earlier.lock().unwrap() = Some(position(&cluster.primary, DB));
    commit(&cluster.primary, DB, [(2, 0x22)]);
    cluster.converge().await;
    let before = state(&cluster.replica);

    // The next heartbeat, after a second of silence, claims TXID 1.
    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica) == before, "nothing was applied");
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "not following the primary",
                "database \"app.db\" is at TXID 0000000000000002",
                "here but at TXID 0000000000000001",
            ],
        )
        .await;
    cluster.release();
    commit(&cluster.primary, DB, [(3, 0x33)]);
    cluster.converge().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_primary_speaking_another_protocol_revision_is_refused() {
    let mut cluster = Cluster::start(|passing| match passing {
        Passing::Message(StreamMessage {
            message: Some(Message::Hello(mut hello)),
        }) => {
            hello.protocol_version = PROTOCOL_VERSION + 1;
            Tampered::Send(vec![StreamMessage {
                message: Some(Message::Hello(hello)),
            }])
        }
        other => other.unchanged(),
    })
    .await;

    cluster.wait_for_reconnect().await;
    assert!(state(&cluster.replica).is_empty(), "nothing was applied");
    assert_eq!(cluster.replica.cluster().primary(), None);
    cluster
        .logs
        .wait_for(
            "WARN",
            &[
                "not following the primary",
                "Hello message speaks protocol version 2; this node speaks 1",
            ],
        )
        .await;
    cluster.release();
    cluster.converge().await;
    assert_eq!(
        cluster.replica.cluster().primary().as_deref(),
        Some("node-a")
    );
    cluster.stop().await;
}

#[tokio::test]
async fn a_replica_speaking_another_protocol_revision_is_refused() {
    let (logs, _guard) = Logs::capture();
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_store(dir.path());
    let (listener, url) = listen().await;
    serve_primary(&primary, dir.path(), listener, &shutdown);
    commit(&primary, DB, [(1, 1)]);
    let mut client = ReplicationClient::connect(url).await.unwrap();
    let request = |protocol_version| StreamRequest {
        hostname: "node-z".into(),
        candidate: false,
        positions: Vec::new(),
        protocol_version,
        histories: Vec::new(),
        ..StreamRequest::default()
    };

    let status = client
        .stream(request(PROTOCOL_VERSION + 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        "StreamRequest message speaks protocol version 2; this node speaks 1"
    );
    logs.wait_for(
        "WARN",
        &[
            "refused a replication stream",
            "StreamRequest message speaks protocol version 2",
        ],
    )
    .await;

    // The primary still serves replicas that speak its revision.
    let mut stream = client
        .stream(request(PROTOCOL_VERSION))
        .await
        .unwrap()
        .into_inner();
    let hello = stream.message().await.unwrap().unwrap();
    assert!(matches!(hello.message, Some(Message::Hello(_))));
    shutdown.cancel();
}

#[tokio::test]
async fn a_node_of_another_major_protocol_version_is_named_and_then_followed() {
    let (logs, _guard) = Logs::capture();
    let shutdown = CancellationToken::new();
    // A node that serves no `ltxfs.replication.v1`: every call is UNIMPLEMENTED.
    let (listener, url) = listen().await;
    let address = listener.local_addr().unwrap();
    let other_version = CancellationToken::new();
    let other_node = tokio::spawn(
        Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener),
                other_version.clone().cancelled_owned(),
            ),
    );
    let replica_dir = tempfile::tempdir().unwrap();
    let replica = Arc::new(
        Store::open(replica_dir.path(), CaptureOptions::default(), Role::Replica).unwrap(),
    );
    let follower = follow_as_node_b(&replica, url.clone(), &shutdown);
    logs.wait_for(
        "WARN",
        &[
            "not following the primary",
            &format!("{url} does not serve ltxfs.replication.v1 (it answered UNIMPLEMENTED"),
        ],
    )
    .await;
    assert!(state(&replica).is_empty(), "nothing was applied");
    assert_eq!(replica.cluster().primary(), None);

    // The node is replaced by a primary of this version at the same address.
    other_version.cancel();
    tokio::time::timeout(TIMEOUT, other_node)
        .await
        .expect("the other node stops")
        .unwrap()
        .unwrap();
    let primary_dir = tempfile::tempdir().unwrap();
    let primary = primary_store(primary_dir.path());
    commit(&primary, DB, [(1, 1), (2, 2)]);
    let listener = TcpListener::bind(address).await.unwrap();
    serve_primary(&primary, primary_dir.path(), listener, &shutdown);
    converge(&primary, &replica, &logs).await;
    shutdown.cancel();
    tokio::time::timeout(TIMEOUT, follower)
        .await
        .expect("the replica stops on shutdown")
        .unwrap();
}
