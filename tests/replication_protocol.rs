//! The replication protocol in one process, without FUSE: a primary store whose
//! commits are made through the store's API serves replication on a loopback
//! port, and a replica store follows it. The replica must reach the primary's
//! positions and content — first by snapshot, then change set by change set,
//! including a change set larger than one chunk and a database created while the
//! stream is live — and both nodes must report their status.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ltxfs::bridge::CommitBridge;
use ltxfs::ltx::TxId;
use ltxfs::replication::{self, CHUNK_SIZE, NodeContext};
use ltxfs::store::{CaptureOptions, Role, SQLITE_HEADER_MAGIC, Store};
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

fn content(store: &Store, name: &str) -> Vec<u8> {
    store.lookup(name).unwrap().read_at(0, 64 << 20).unwrap()
}

/// A node: its store, serving replication on a loopback port.
struct Node {
    store: Arc<Store>,
    url: String,
    server: tokio::task::JoinHandle<Result<(), replication::ReplicationError>>,
}

async fn start_node(dir: &Path, role: Role, hostname: &str, shutdown: &CancellationToken) -> Node {
    let store = Arc::new(Store::open(dir, CaptureOptions::default(), role).unwrap());
    let commits = Arc::new(CommitBridge::new());
    store.set_commit_listener(commits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let context = Arc::new(NodeContext {
        store: store.clone(),
        hostname: hostname.to_string(),
        commits,
        spool_dir: dir.to_path_buf(),
    });
    let server = tokio::spawn(replication::serve(listener, context, shutdown.clone()));
    Node { store, url, server }
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
    let follower = tokio::spawn(replication::follow(
        replica.store.clone(),
        primary.url.clone(),
        "node-b".to_string(),
        Duration::from_millis(200),
        shutdown.clone(),
    ));
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

    let status = replication::fetch_status(&primary.url).await.unwrap();
    assert_eq!(status.role, Role::Primary);
    assert_eq!(status.primary.as_deref(), Some("node-a"));
    let names: Vec<_> = status.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["app.db", "other.db"]);
    let status = replication::fetch_status(&replica.url).await.unwrap();
    assert_eq!(status.role, Role::Replica);
    assert_eq!(status.hostname, "node-b");
    assert_eq!(status.primary.as_deref(), Some("node-a"));
    assert_eq!(
        status.databases[0].position,
        primary.store.database("app.db").unwrap().position()
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

#[tokio::test]
async fn status_of_a_node_that_is_not_listening_names_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let error = replication::fetch_status(&url).await.unwrap_err();
    assert!(error.to_string().contains(&url), "{error}");
    let error = replication::fetch_status("127.0.0.1:20202")
        .await
        .unwrap_err();
    assert!(
        matches!(error, replication::ReplicationError::InvalidUrl { .. }),
        "{error}"
    );
}
