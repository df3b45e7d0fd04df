//! The replication protocol in one process, without FUSE: a primary store whose
//! commits are made through the store's API serves replication on a loopback
//! port, and a replica store follows it. The replica must reach the primary's
//! positions and content — first by snapshot, then change set by change set,
//! including a change set larger than one chunk and a database created while the
//! stream is live — and both nodes must report their status.
//!
//! Bad input from the network: a TCP proxy between replica and primary flips a
//! bit in a change set's bytes or cuts the connection in the middle of a change
//! set, and a replica that is ahead of its primary connects. The replica must
//! refuse what is wrong with a log line naming it, apply nothing of it, and
//! converge by itself. These tests run on a current-thread runtime, so the
//! replica's and the primary's log events reach the subscriber each test installs
//! for its own thread. (Bad input that needs precise control over the messages is
//! tested inside the crate, in `src/replication/bad_input_tests.rs`, which can use
//! the generated protocol types.)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::logs::Logs;
use ltxfs::bridge::CommitBridge;
use ltxfs::ltx::TxId;
use ltxfs::replication::{
    self, CHUNK_SIZE, FollowSettings, FollowerState, HandoffPhase, Handoffs, KnownPeers,
    NodeContext, Peer, PeerCatchUp,
};
use ltxfs::store::locks::{ByteRange, LockKind, LockRequest};
use ltxfs::store::{
    CaptureOptions, Change, ChangeSetBytes, FileKind, Position, Role, SQLITE_HEADER_MAGIC, Store,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PAGE_SIZE: usize = 4096;
/// How long a replica may take to catch up in these tests.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// One page of a fake but well-formed SQLite database in rollback mode.
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

/// Page `pgno` full of bytes that do not compress (a xorshift sequence seeded
/// with its number).
fn incompressible_page(pgno: u32) -> Vec<u8> {
    let mut state = u64::from(pgno).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut page: Vec<u8> = (0..PAGE_SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    if pgno == 1 {
        page[..100].copy_from_slice(&self::page(1, 0)[..100]);
    }
    page
}

/// Commits one rollback-journal transaction writing `pages` of database `name`.
fn commit(store: &Store, name: &str, pages: impl IntoIterator<Item = (u32, u8)>) {
    commit_pages(
        store,
        name,
        pages
            .into_iter()
            .map(|(pgno, fill)| (pgno, page(pgno, fill))),
    );
}

/// Commits one rollback-journal transaction writing the given pages of `name`.
fn commit_pages(store: &Store, name: &str, pages: impl IntoIterator<Item = (u32, Vec<u8>)>) {
    let database = store
        .lookup(name)
        .unwrap_or_else(|| store.create(name).unwrap());
    let journal_name = format!("{name}-journal");
    let journal = store.create(&journal_name).unwrap();
    journal
        .write_at(0, &[0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7])
        .unwrap();
    for (pgno, page) in pages {
        database
            .write_at(u64::from(pgno - 1) * PAGE_SIZE as u64, &page)
            .unwrap();
    }
    store.unlink(&journal_name).unwrap();
}

fn content(store: &Store, name: &str) -> Vec<u8> {
    store.lookup(name).unwrap().read_at(0, 64 << 20).unwrap()
}

/// A node: its store, serving replication on a loopback port.
struct Node {
    store: Arc<Store>,
    url: String,
    server: JoinHandle<Result<(), replication::ReplicationError>>,
    handoffs: Arc<Handoffs>,
}

async fn start_node(dir: &Path, role: Role, hostname: &str, shutdown: &CancellationToken) -> Node {
    start_node_with(dir, role, hostname, false, shutdown).await
}

/// [`start_node`], replicating synchronously when `synchronous`.
async fn start_node_with(
    dir: &Path,
    role: Role,
    hostname: &str,
    synchronous: bool,
    shutdown: &CancellationToken,
) -> Node {
    let store = Arc::new(Store::open(dir, CaptureOptions::default(), role).unwrap());
    let commits = Arc::new(CommitBridge::new());
    store.set_commit_listener(commits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handoffs = Arc::new(Handoffs::new().0);
    let context = Arc::new(NodeContext {
        store: store.clone(),
        hostname: hostname.to_string(),
        commits,
        spool_dir: dir.to_path_buf(),
        handoffs: handoffs.clone(),
        proxy_url: None,
        synchronous,
        backups: Default::default(),
    });
    if synchronous {
        store.set_commit_hold(handoffs.clone());
    }
    let server = tokio::spawn(replication::serve(
        listener,
        context,
        Default::default(),
        shutdown.clone(),
    ));
    Node {
        store,
        url,
        server,
        handoffs,
    }
}

/// The body of `GET <url>/metrics`, which must answer 200.
async fn metrics(url: &str) -> String {
    let response = ltxfs::lease::http::HttpClient::new()
        .request(
            hyper::Method::GET,
            &format!("{url}/metrics"),
            &[],
            Default::default(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    String::from_utf8(response.body.to_vec()).unwrap()
}

/// Makes `replica` follow the primary at `url` as the candidate `node-b`; returns
/// the client's task and its state.
fn follow(
    replica: &Node,
    url: &str,
    shutdown: &CancellationToken,
) -> (JoinHandle<()>, watch::Receiver<FollowerState>) {
    let (task, state, _) = follow_as(replica, "node-b", url, shutdown);
    (task, state)
}

/// Makes `replica` follow the primary at `url` as the candidate `hostname`,
/// advertising its own URL; returns the client's task, its state and the peers
/// the primary names to it.
fn follow_as(
    replica: &Node,
    hostname: &str,
    url: &str,
    shutdown: &CancellationToken,
) -> (
    JoinHandle<()>,
    watch::Receiver<FollowerState>,
    Arc<KnownPeers>,
) {
    let known_peers = Arc::new(KnownPeers::default());
    let settings = FollowSettings {
        store: replica.store.clone(),
        primary_url: url.to_string(),
        hostname: hostname.to_string(),
        candidate: true,
        reconnect_delay: Duration::from_millis(200),
        last_heard: Default::default(),
        advertise_url: Some(replica.url.clone()),
        known_peers: known_peers.clone(),
        credentials: Default::default(),
    };
    let (state, receiver) = watch::channel(FollowerState::default());
    let task = tokio::spawn(replication::follow(settings, state, shutdown.clone()));
    (task, receiver, known_peers)
}

/// Every database of `store` with its position and its content.
fn state(store: &Store) -> Vec<(String, Position, Vec<u8>)> {
    store
        .positions()
        .into_iter()
        .map(|(name, position)| {
            let content = content(store, &name);
            (name, position, content)
        })
        .collect()
}

/// Waits until the replica has every database of the primary at the same position.
async fn converge(primary: &Store, replica: &Store) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let want = primary.positions();
        let have = replica.positions();
        if want == have {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica did not converge: primary {want:?}, replica {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_the_primary_and_both_report_their_status() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ltxfs=debug")
        .with_test_writer()
        .try_init();
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();

    let primary = start_node(primary_dir.path(), Role::Primary, "node-a", &shutdown).await;
    // Two transactions before the replica exists: it starts with a snapshot.
    commit(&primary.store, "app.db", [(1, 1), (2, 2), (3, 3)]);
    commit(&primary.store, "app.db", [(2, 20)]);

    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    let follower = follow(&replica, &primary.url, &shutdown).0;
    converge(&primary.store, &replica.store).await;
    assert_eq!(replica.store.cluster().primary().as_deref(), Some("node-a"));

    // Live change sets: a small one, one larger than a chunk, and a new database.
    commit(&primary.store, "app.db", [(3, 30)]);
    let big_pages = (CHUNK_SIZE / PAGE_SIZE) as u32 * 2;
    commit(
        &primary.store,
        "app.db",
        (2..=big_pages).map(|pgno| (pgno, pgno as u8)),
    );
    commit(&primary.store, "other.db", [(1, 0), (2, 9)]);
    converge(&primary.store, &replica.store).await;
    assert_eq!(
        primary.store.database("app.db").unwrap().position().txid,
        TxId(4)
    );
    for name in ["app.db", "other.db"] {
        assert!(
            content(&primary.store, name) == content(&replica.store, name),
            "{name} differs"
        );
    }

    // Idle: heartbeats keep the replica connected (their positions match its own)
    // and its lag small.
    tokio::time::sleep(replication::HEARTBEAT_INTERVAL * 2).await;
    assert_eq!(replica.store.cluster().primary().as_deref(), Some("node-a"));
    let lag = replica.store.cluster().lag().unwrap();
    assert!(lag <= replication::HEARTBEAT_INTERVAL * 2, "lag {lag:?}");

    let status = replication::fetch_status(&primary.url, &Default::default())
        .await
        .unwrap();
    assert_eq!(status.role, Role::Primary);
    assert_eq!(status.primary.as_deref(), Some("node-a"));
    let names: Vec<_> = status.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["app.db", "other.db"]);
    let status = replication::fetch_status(&replica.url, &Default::default())
        .await
        .unwrap();
    assert_eq!(status.role, Role::Replica);
    assert_eq!(status.hostname, "node-b");
    assert_eq!(status.primary.as_deref(), Some("node-a"));
    assert_eq!(
        status.databases[0].position,
        primary.store.database("app.db").unwrap().position()
    );

    // The same figures as Prometheus metrics, over plain HTTP/1.1 on the same port.
    let primary_metrics = metrics(&primary.url).await;
    assert!(
        primary_metrics.contains("\nltxfs_primary 1\n"),
        "{primary_metrics}"
    );
    assert!(
        primary_metrics.contains("\nltxfs_lag_seconds 0.000\n"),
        "{primary_metrics}"
    );
    assert!(
        primary_metrics.contains("\nltxfs_replica_streams 1\n"),
        "{primary_metrics}"
    );
    assert!(
        primary_metrics.contains("\nltxfs_db_txid{db=\"app.db\"} 4\n"),
        "{primary_metrics}"
    );
    let replica_metrics = metrics(&replica.url).await;
    assert!(
        replica_metrics.contains("\nltxfs_primary 0\n"),
        "{replica_metrics}"
    );
    assert!(
        replica_metrics.contains("\nltxfs_replica_streams 0\n"),
        "{replica_metrics}"
    );
    assert!(
        replica_metrics.contains("\nltxfs_db_txid{db=\"other.db\"} 1\n"),
        "{replica_metrics}"
    );
    let lag: f64 = replica_metrics
        .lines()
        .find_map(|line| line.strip_prefix("ltxfs_lag_seconds "))
        .expect("a replica that heard from its primary reports its lag")
        .parse()
        .unwrap();
    assert!(
        lag <= (replication::HEARTBEAT_INTERVAL * 2).as_secs_f64(),
        "lag {lag}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the replica stops promptly on shutdown")
        .unwrap();
    assert_eq!(replica.store.cluster().primary(), None);
    for node in [primary, replica] {
        tokio::time::timeout(Duration::from_secs(5), node.server)
            .await
            .expect("the server stops promptly on shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_sends_everything_accepted_then_names_the_new_primary() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let primary = start_node(primary_dir.path(), Role::Primary, "node-a", &shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    let (_follower, mut state) = follow(&replica, &primary.url, &shutdown);
    converge(&primary.store, &replica.store).await;
    assert_eq!(
        primary.handoffs.most_caught_up_candidate().as_deref(),
        Some("node-b")
    );
    assert!(state.borrow().connected);

    // The handoff starts while the primary still commits; once writes have
    // stopped, its final positions are sent, then the Handoff.
    primary.handoffs.set_phase(HandoffPhase::Draining);
    for value in 3..40u8 {
        commit(
            &primary.store,
            "app.db",
            [(2, value), (u32::from(value), value)],
        );
    }
    commit(&primary.store, "new.db", [(1, 0)]);
    primary.store.set_role(Role::Replica);
    let final_positions = primary.store.positions();
    primary.handoffs.set_phase(HandoffPhase::HandingOff {
        to: "node-b".into(),
        positions: final_positions.clone(),
    });
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|state| state.handoff.is_some()),
    )
    .await
    .expect("the replica receives the handoff")
    .unwrap()
    .clone();
    assert_eq!(seen.handoff.unwrap().to, "node-b");
    // Everything the primary accepted was applied before the Handoff arrived.
    assert_eq!(replica.store.positions(), final_positions);
    for name in ["app.db", "new.db"] {
        assert!(
            content(&primary.store, name) == content(&replica.store, name),
            "{name} differs"
        );
    }
    // The replica leaves the stream; the old primary serves no new one.
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|state| !state.connected),
    )
    .await
    .expect("the replica leaves the stream")
    .unwrap();
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_many_chunks_arrives_whole() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let primary = start_node(primary_dir.path(), Role::Primary, "node-a", &shutdown).await;
    // 24 MiB that do not compress: the snapshot is streamed in many chunks while
    // the primary spools it, and the replica holds only part of it in memory,
    // spooling the rest (MAX_CHANGE_SET_IN_MEMORY).
    let pages = 6000u32;
    assert!(pages as usize * PAGE_SIZE > 2 * replication::MAX_CHANGE_SET_IN_MEMORY);
    commit_pages(
        &primary.store,
        "big.db",
        (1..=pages).map(|pgno| (pgno, incompressible_page(pgno))),
    );
    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    let (_follower, _) = follow(&replica, &primary.url, &shutdown);
    converge(&primary.store, &replica.store).await;
    assert!(
        state(&primary.store) == state(&replica.store),
        "the replica's copy differs"
    );
    shutdown.cancel();
}

/// Polls `condition` until it holds, or fails naming `what`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taking_over_catches_up_from_the_peer_that_is_ahead() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let shutdown = CancellationToken::new();
    let primary_stop = CancellationToken::new();
    let primary = start_node(dirs[0].path(), Role::Primary, "node-a", &primary_stop).await;
    let node_b = start_node(dirs[1].path(), Role::Replica, "node-b", &shutdown).await;
    let node_c = start_node(dirs[2].path(), Role::Replica, "node-c", &shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    let b_stop = CancellationToken::new();
    let (b_task, _, b_peers) = follow_as(&node_b, "node-b", &primary.url, &b_stop);
    let (_c_task, _, _) = follow_as(&node_c, "node-c", &primary.url, &shutdown);
    converge(&primary.store, &node_b.store).await;
    converge(&primary.store, &node_c.store).await;
    // The primary names both caught-up replicas to each of them.
    let both = |peers: &[Peer]| {
        peers
            .iter()
            .map(|peer| peer.hostname.as_str())
            .collect::<Vec<_>>()
            == ["node-b", "node-c"]
    };
    eventually("node-b to hear of node-c", || both(&b_peers.get())).await;
    assert!(b_peers.get().iter().any(|peer| peer.url == node_c.url));

    // node-b falls behind: only node-c receives what the primary commits next,
    // including a new database.
    b_stop.cancel();
    b_task.await.unwrap();
    for value in 3..20u8 {
        commit(
            &primary.store,
            "app.db",
            [(2, value), (u32::from(value), value)],
        );
    }
    commit(&primary.store, "new.db", [(1, 9)]);
    converge(&primary.store, &node_c.store).await;
    let primary_state = state(&primary.store);
    // The primary dies.
    primary_stop.cancel();
    primary.server.await.unwrap().unwrap();
    assert_ne!(node_b.store.positions(), primary.store.positions());

    // node-b takes over: it catches up from node-c, and a peer that cannot be
    // reached is reported, not waited for.
    let mut peers = b_peers.get();
    peers.push(Peer {
        hostname: "node-gone".into(),
        url: "http://127.0.0.1:1".into(),
    });
    let report =
        replication::catch_up_from_peers(&node_b.store, &Default::default(), "node-b", &peers)
            .await;
    assert_eq!(report.caught_up_from, ["node-c"]);
    assert_eq!(report.unreachable, ["node-gone"]);
    assert!(
        state(&node_b.store) == primary_state,
        "node-b differs from the old primary"
    );
    // Nothing more to fetch: asking again catches up from nobody.
    let again =
        replication::catch_up_from_peers(&node_b.store, &Default::default(), "node-b", &peers[..2])
            .await;
    assert_eq!(again, PeerCatchUp::default());
    shutdown.cancel();
}

/// SQLite's SHARED lock range on a database file, which every rollback-mode
/// reader holds while it reads (after the PENDING and RESERVED bytes).
const SHARED_RANGE: ByteRange = ByteRange {
    start: 0x4000_0002,
    end: 0x4000_01ff,
};

/// A reader's lock on SQLite's SHARED range of a database file, released when
/// dropped (also when the test fails, so no apply waits for it forever).
struct SharedLock {
    node: Arc<ltxfs::store::Node>,
    owner: u64,
}

impl SharedLock {
    /// Takes the lock for `owner`, or `None` when another lock or a waiting
    /// apply stands in its way.
    fn try_take(node: &Arc<ltxfs::store::Node>, owner: u64) -> Option<SharedLock> {
        let request = LockRequest {
            owner,
            pid: 1,
            range: SHARED_RANGE,
            kind: LockKind::Read,
        };
        node.locks().try_lock(request).ok()?;
        Some(SharedLock {
            node: node.clone(),
            owner,
        })
    }
}

impl Drop for SharedLock {
    fn drop(&mut self) {
        self.node.locks().unlock(self.owner, SHARED_RANGE);
    }
}

/// Regression (commit 1727619): a node taking over asks a peer that is ahead
/// for what follows its position, but an apply of the last primary's change
/// set, waiting for a reader, lands after the question, so the peer's first
/// change set no longer follows. The node asks that peer again, from its new
/// position, and gets the rest.
#[tokio::test]
async fn a_node_taking_over_asks_a_peer_again_when_its_position_moved_meanwhile() {
    let (logs, _guard) = Logs::capture();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let shutdown = CancellationToken::new();
    // The last primary's history: five transactions.
    let primary = Store::open(dirs[0].path(), CaptureOptions::default(), Role::Primary).unwrap();
    for value in 1..=5u8 {
        commit(
            &primary,
            "app.db",
            [(1, value), (u32::from(value) + 1, value)],
        );
    }
    let primary_state = state(&primary);
    let sets = ltxfs::store::log::read_change_sets(&dirs[0].path().join("dbs/app.db/log")).unwrap();
    assert_eq!(sets.len(), 5);
    let node_b = start_node(dirs[1].path(), Role::Replica, "node-b", &shutdown).await;
    let node_c = start_node(dirs[2].path(), Role::Replica, "node-c", &shutdown).await;
    let apply = |store: Arc<Store>, ltx: Vec<u8>| {
        tokio::task::spawn_blocking(move || {
            store.apply_change_set("app.db", ChangeSetBytes::InMemory(ltx))
        })
    };
    // node-c received all of it.
    for set in &sets {
        apply(node_c.store.clone(), set.clone())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(state(&node_c.store) == primary_state);

    // node-b applied TXID 1; TXID 2 waits for a reader of node-b.
    apply(node_b.store.clone(), sets[0].clone())
        .await
        .unwrap()
        .unwrap();
    let database = node_b.store.lookup("app.db").unwrap();
    let reader = SharedLock::try_take(&database, 1).unwrap();
    let late = apply(node_b.store.clone(), sets[1].clone());
    // Once the apply waits for the reader, other readers wait behind it.
    eventually("the late apply to wait for the reader", || {
        SharedLock::try_take(&database, 2).is_none()
    })
    .await;
    assert_eq!(
        node_b.store.database("app.db").unwrap().position().txid,
        TxId(1)
    );

    let peers = vec![Peer {
        hostname: "node-c".into(),
        url: node_c.url.clone(),
    }];
    let store = node_b.store.clone();
    let taking_over = tokio::spawn(async move {
        replication::catch_up_from_peers(&store, &Default::default(), "node-b", &peers).await
    });
    // node-c has node-b's question, from TXID 1: the late apply lands.
    logs.wait_for(
        "INFO",
        &["a node taking over as the primary catches up from this one"],
    )
    .await;
    drop(reader);
    let landed = late.await.unwrap().unwrap();
    assert_eq!(landed.position.txid, TxId(2));

    let report = taking_over.await.unwrap();
    assert_eq!(report.caught_up_from, ["node-c"], "{}", logs.text());
    assert!(report.unreachable.is_empty(), "{}", logs.text());
    assert!(
        state(&node_b.store) == primary_state,
        "node-b differs from the old primary"
    );
    logs.wait_for(
        "WARN",
        &[
            "refused a change set from peer node-c",
            "does not follow TXID 0000000000000002",
        ],
    )
    .await;
    logs.wait_for(
        "WARN",
        &["catching up from a peer failed; trying again", "attempt=1"],
    )
    .await;
    shutdown.cancel();
}

/// Commits like [`commit`], then holds the commit as the filesystem does after
/// a change (on the calling thread: it may block); returns the TXID committed.
fn commit_and_hold(
    store: &Store,
    name: &str,
    pages: impl IntoIterator<Item = (u32, u8)>,
) -> Result<TxId, ltxfs::store::StoreError> {
    let database = store
        .lookup(name)
        .unwrap_or_else(|| store.create(name).unwrap())
        .database()
        .clone();
    let journal = format!("{name}-journal");
    let change = Change::File {
        name: &journal,
        kind: &FileKind::Journal,
    };
    store.make_change(&database, change, || {
        commit(store, name, pages);
        Ok::<_, ltxfs::store::StoreError>(())
    })?;
    Ok(database.position().txid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_primary_returns_a_commit_once_a_replica_has_it() {
    let primary_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let primary =
        start_node_with(primary_dir.path(), Role::Primary, "node-a", true, &shutdown).await;
    // Without a replica, a commit stands on the primary alone.
    let alone = primary.store.clone();
    tokio::task::spawn_blocking(move || commit_and_hold(&alone, "app.db", [(1, 1), (2, 2)]))
        .await
        .unwrap()
        .unwrap();

    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    let (_follower, _, peers) = follow_as(&replica, "node-b", &primary.url, &shutdown);
    // The primary counts the replica's stream once it has caught up: the replica
    // then hears of itself as a peer.
    eventually("node-b to catch up", || !peers.get().is_empty()).await;
    let (store, replica_store) = (primary.store.clone(), replica.store.clone());
    tokio::task::spawn_blocking(move || {
        for value in 3..30u8 {
            let txid = commit_and_hold(&store, "app.db", [(2, value), (3, value)]).unwrap();
            // The commit returned only once the replica had applied it.
            let reached = replica_store.database("app.db").unwrap().position().txid;
            assert!(
                reached >= txid,
                "commit {txid} returned with the replica at {reached}"
            );
        }
    })
    .await
    .unwrap();
    shutdown.cancel();
}

/// A synchronous primary `node-a` with `app.db`, and a replica `node-b` whose
/// stream has caught up; with their directories and the replica's state.
async fn synchronous_pair(
    shutdown: &CancellationToken,
) -> (
    [tempfile::TempDir; 2],
    Node,
    Node,
    watch::Receiver<FollowerState>,
) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let primary = start_node_with(dirs[0].path(), Role::Primary, "node-a", true, shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    let replica = start_node(dirs[1].path(), Role::Replica, "node-b", shutdown).await;
    let (_, state, peers) = follow_as(&replica, "node-b", &primary.url, shutdown);
    eventually("node-b to catch up", || !peers.get().is_empty()).await;
    (dirs, primary, replica, state)
}

/// Commits on `primary` from a blocking task and checks that the commit is held
/// (no replica can acknowledge it yet).
async fn held_commit(primary: &Arc<Store>) -> JoinHandle<Result<TxId, ltxfs::store::StoreError>> {
    let store = primary.clone();
    let held = tokio::task::spawn_blocking(move || commit_and_hold(&store, "app.db", [(2, 3)]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "the commit returned before a replica had it"
    );
    held
}

/// A reader's SHARED lock on a replica's database, which keeps the replica from
/// applying (and acknowledging) change sets until it is dropped.
struct Reader(Arc<ltxfs::store::Node>, ltxfs::store::locks::ByteRange);

impl Reader {
    const OWNER: u64 = 7;

    fn lock(store: &Store, name: &str) -> Reader {
        let range = ltxfs::store::locks::ByteRange::new(0x4000_0002, 0x4000_0002).unwrap();
        let node = store.lookup(name).unwrap();
        node.locks()
            .try_lock(ltxfs::store::locks::LockRequest {
                owner: Reader::OWNER,
                pid: 7,
                range,
                kind: ltxfs::store::locks::LockKind::Read,
            })
            .unwrap();
        Reader(node, range)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.locks().unlock(Reader::OWNER, self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_when_a_synchronous_primary_hands_off_returns_once_acknowledged() {
    let shutdown = CancellationToken::new();
    let (_dirs, primary, replica, mut state) = synchronous_pair(&shutdown).await;
    let reader = Reader::lock(&replica.store, "app.db");
    let held = held_commit(&primary.store).await;

    // The handoff demotes the primary while the commit is held; the handoff
    // delivers it, and the replica acknowledges it before leaving the stream.
    primary.handoffs.set_phase(HandoffPhase::Draining);
    let demoting = primary.store.clone();
    tokio::task::spawn_blocking(move || demoting.set_role(Role::Replica))
        .await
        .unwrap();
    primary.handoffs.set_phase(HandoffPhase::HandingOff {
        to: "node-b".into(),
        positions: primary.store.positions(),
    });
    drop(reader);
    let txid = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held commit ends")
        .unwrap()
        .expect("the handed-off commit was acknowledged");
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|state| state.handoff.is_some()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        replica.store.database("app.db").unwrap().position().txid,
        txid
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_no_replica_acknowledges_fails_when_the_primary_is_demoted() {
    let shutdown = CancellationToken::new();
    let (_dirs, primary, replica, _) = synchronous_pair(&shutdown).await;
    // A reader on the replica holds its SHARED lock, so the replica cannot apply
    // (and acknowledge) the next commit, as a replica cut off would not.
    let _reader = Reader::lock(&replica.store, "app.db");
    let held = held_commit(&primary.store).await;
    // The primary loses its role: the held commit fails, naming why.
    let demoting = primary.store.clone();
    tokio::task::spawn_blocking(move || demoting.set_role(Role::Replica))
        .await
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held commit ends once the primary is demoted")
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("was not replicated"), "{error}");
    shutdown.cancel();
}

#[tokio::test]
async fn status_of_a_node_that_is_not_listening_names_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let error = replication::fetch_status(&url, &Default::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains(&url), "{error}");
    let error = replication::fetch_status("127.0.0.1:20202", &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, replication::ReplicationError::InvalidUrl { .. }),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------

/// The fill byte of the pages whose bytes the proxy damages; no other page and no
/// protocol message holds a run of it.
const DAMAGED_FILL: u8 = 0xc3;

/// How many equal bytes in a row mark a damaged page's content on the wire.
const RUN: usize = 256;

/// What the proxy does to the primary's bytes on its first connection.
#[derive(Clone, Copy)]
enum Damage {
    /// Flips one bit in the middle of the first run of [`RUN`] bytes equal to
    /// [`DAMAGED_FILL`].
    FlipBit,
    /// Closes the connection once this many bytes equal to [`DAMAGED_FILL`]
    /// have passed.
    CutAfter(usize),
}

/// A TCP proxy between a replica and its primary: damages the primary's bytes on
/// the first connection, and holds every later connection until released.
struct Proxy {
    url: String,
    connections: watch::Receiver<usize>,
    release: CancellationToken,
}

impl Proxy {
    /// A proxy on a free loopback port in front of the node at `upstream`.
    async fn start(upstream: &str, damage: Damage) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_string();
        let (count, connections) = watch::channel(0);
        let release = CancellationToken::new();
        let gate = release.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.send_modify(|count| *count += 1);
                let first = *count.borrow() == 1;
                let upstream = upstream.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    if !first {
                        gate.cancelled().await;
                    }
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    if first {
                        relay_damaged(client, server, damage).await;
                    } else {
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy {
            url,
            connections,
            release,
        }
    }

    /// Waits until the replica has given up the first connection and opened the
    /// next, which the proxy holds until released.
    async fn wait_for_reconnect(&mut self, logs: &Logs) {
        let reconnected = self.connections.wait_for(|&count| count >= 2);
        tokio::time::timeout(CONVERGE_TIMEOUT, reconnected)
            .await
            .unwrap_or_else(|_| panic!("the replica did not reconnect; log:\n{}", logs.text()))
            .unwrap();
    }
}

/// Relays one connection, passing requests unchanged and damaging responses.
async fn relay_damaged(client: TcpStream, server: TcpStream, damage: Damage) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buffer = vec![0u8; 64 * 1024];
    let mut flipped = false;
    let mut fill_seen = 0;
    loop {
        let n = match server_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let bytes = &mut buffer[..n];
        match damage {
            Damage::FlipBit if !flipped => {
                if let Some(start) = run_start(bytes) {
                    bytes[start + RUN / 2] ^= 0x01;
                    flipped = true;
                }
            }
            Damage::FlipBit => {}
            Damage::CutAfter(limit) => {
                fill_seen += bytes.iter().filter(|&&byte| byte == DAMAGED_FILL).count();
                if fill_seen >= limit {
                    break;
                }
            }
        }
        if client_write.write_all(bytes).await.is_err() {
            break;
        }
    }
    let _ = client_write.shutdown().await;
}

/// Where the first run of [`RUN`] bytes equal to [`DAMAGED_FILL`] starts.
fn run_start(bytes: &[u8]) -> Option<usize> {
    let mut run = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        run = if byte == DAMAGED_FILL { run + 1 } else { 0 };
        if run == RUN {
            return Some(index + 1 - RUN);
        }
    }
    None
}

/// A primary with `app.db` at TXID 1, and a replica following it through a proxy
/// that does `damage`; returns once the replica has caught up.
async fn through_proxy(
    damage: Damage,
    primary_dir: &Path,
    replica_dir: &Path,
    shutdown: &CancellationToken,
) -> (Node, Node, Proxy) {
    let primary = start_node(primary_dir, Role::Primary, "node-a", shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    let proxy = Proxy::start(&primary.url, damage).await;
    let replica = start_node(replica_dir, Role::Replica, "node-b", shutdown).await;
    follow(&replica, &proxy.url, shutdown);
    converge(&primary.store, &replica.store).await;
    (primary, replica, proxy)
}

#[tokio::test]
async fn a_bit_flipped_on_the_wire_is_refused_and_never_applied() {
    let (logs, _guard) = Logs::capture();
    let (primary_dir, replica_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shutdown = CancellationToken::new();
    let (primary, replica, mut proxy) = through_proxy(
        Damage::FlipBit,
        primary_dir.path(),
        replica_dir.path(),
        &shutdown,
    )
    .await;
    let before = state(&replica.store);
    commit(
        &primary.store,
        "app.db",
        [(2, DAMAGED_FILL), (3, DAMAGED_FILL)],
    );

    proxy.wait_for_reconnect(&logs).await;
    assert!(state(&replica.store) == before, "nothing was applied");
    logs.wait_for(
        "WARN",
        &[
            "refused a change set from the primary; nothing was applied",
            "change set for database \"app.db\" fails its CRC-64",
        ],
    )
    .await;
    proxy.release.cancel();
    converge(&primary.store, &replica.store).await;
    assert!(state(&replica.store) == state(&primary.store));
    shutdown.cancel();
}

#[tokio::test]
async fn a_connection_cut_in_the_middle_of_a_change_set_applies_nothing() {
    let (logs, _guard) = Logs::capture();
    let (primary_dir, replica_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shutdown = CancellationToken::new();
    // Cut after a chunk and a half of a change set of three chunks.
    let (primary, replica, mut proxy) = through_proxy(
        Damage::CutAfter(CHUNK_SIZE * 3 / 2),
        primary_dir.path(),
        replica_dir.path(),
        &shutdown,
    )
    .await;
    let before = state(&replica.store);
    let pages = (3 * CHUNK_SIZE / PAGE_SIZE) as u32;
    commit(
        &primary.store,
        "app.db",
        (2..=pages).map(|pgno| (pgno, DAMAGED_FILL)),
    );

    proxy.wait_for_reconnect(&logs).await;
    assert!(state(&replica.store) == before, "nothing was applied");
    logs.wait_for(
        "WARN",
        &[
            "not following the primary",
            "the stream broke off after",
            "of a change set for database \"app.db\", which was dropped",
        ],
    )
    .await;
    proxy.release.cancel();
    converge(&primary.store, &replica.store).await;
    assert!(state(&replica.store) == state(&primary.store));
    shutdown.cancel();
}

#[tokio::test]
async fn a_replica_ahead_of_its_primary_is_reset_to_the_primarys_snapshot() {
    let (logs, _guard) = Logs::capture();
    let (primary_dir, replica_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shutdown = CancellationToken::new();
    // The replica's data dir holds three transactions of its own: it is at TXID 3
    // when it connects to a primary at TXID 1.
    {
        let earlier =
            Store::open(replica_dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        commit(&earlier, "app.db", [(1, 7), (2, 7), (3, 7)]);
        commit(&earlier, "app.db", [(4, 8)]);
        commit(&earlier, "app.db", [(5, 9)]);
    }
    let primary = start_node(primary_dir.path(), Role::Primary, "node-a", &shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    assert_eq!(
        replica.store.database("app.db").unwrap().position().txid,
        TxId(3)
    );
    follow(&replica, &primary.url, &shutdown);

    converge(&primary.store, &replica.store).await;
    // Nothing of the replica's own history is left: two pages, the primary's.
    assert!(state(&replica.store) == state(&primary.store));
    assert_eq!(content(&replica.store, "app.db").len(), 2 * PAGE_SIZE);
    logs.wait_for(
        "INFO",
        &[
            "sending a snapshot",
            "the replica is at TXID 0000000000000003 but the primary only at 0000000000000001",
        ],
    )
    .await;
    logs.wait_for(
        "WARN",
        &[
            "discarding this node's transactions that the primary does not have",
            "first=0000000000000002",
            "last=0000000000000003",
        ],
    )
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_diverged_replica_names_exactly_the_transactions_the_snapshot_discards() {
    let (logs, _guard) = Logs::capture();
    let (primary_dir, replica_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shutdown = CancellationToken::new();
    // Both histories hold the same two transactions; then the replica's data dir
    // (an isolated former primary) adds two of its own, and the primary one.
    {
        let earlier =
            Store::open(replica_dir.path(), CaptureOptions::default(), Role::Primary).unwrap();
        commit(&earlier, "app.db", [(1, 1), (2, 2)]);
        commit(&earlier, "app.db", [(3, 3)]);
        commit(&earlier, "app.db", [(4, 8)]);
        commit(&earlier, "app.db", [(5, 9)]);
    }
    let primary = start_node(primary_dir.path(), Role::Primary, "node-a", &shutdown).await;
    commit(&primary.store, "app.db", [(1, 1), (2, 2)]);
    commit(&primary.store, "app.db", [(3, 3)]);
    commit(&primary.store, "app.db", [(4, 4)]);
    let replica = start_node(replica_dir.path(), Role::Replica, "node-b", &shutdown).await;
    follow(&replica, &primary.url, &shutdown);

    converge(&primary.store, &replica.store).await;
    assert!(state(&replica.store) == state(&primary.store));
    logs.wait_for(
        "WARN",
        &[
            "discarding this node's transactions that the primary does not have",
            "first=0000000000000003",
            "last=0000000000000004",
            "discarded=2",
        ],
    )
    .await;
    shutdown.cancel();
}
