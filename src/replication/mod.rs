//! Replication over gRPC: the primary streams every database's change sets to its
//! replicas, which apply them in order.
//!
//! The wire protocol is `proto/ltxfs/replication/v1/replication.proto` (package
//! `ltxfs.replication.v1`, built by `build.rs`). Its generated types never leave
//! this module: `wire` validates every message from a peer into the domain types
//! the rest of the module works with, and a message that does not validate is a
//! [`ReplicationError`] naming what was wrong.
//!
//! `server` is the primary's side, `client` the replica's; ARCHITECTURE.md
//! maps the other submodules.
//!
//! # Bad input
//!
//! Whatever a peer sends, a replica applies only whole change sets that arrived
//! intact, for the database they were written for, and that follow its position;
//! anything else is refused with a warning naming what was wrong, nothing is
//! applied, and the replica reconnects (with backoff) and sends its position again,
//! from which the primary sends what it needs:
//!
//! - A message that does not decode, or breaks a rule of `wire` or the stream's
//!   order (`client`'s state machine), ends the stream with an error naming it.
//! - A stream that breaks off between the chunks of a change set drops the
//!   incomplete change set ([`ReplicationError::TruncatedChangeSet`]).
//! - A change set whose bytes or database name were damaged, whose chunks were
//!   reordered or repeated, or that is labelled with another database's name fails
//!   its CRC ([`ReplicationError::ChangeSetCrc`]) before the store sees it.
//! - A whole change set that was reordered, repeated, or claims a TXID this replica
//!   is past does not follow the position, and the store refuses it
//!   (`StoreError::ChangeSetRejected`); so does one that does not verify.
//! - A heartbeat claiming a position this replica is not at is
//!   [`ReplicationError::Diverged`]. A primary that is really behind the replica
//!   answers the reconnect with a snapshot (`Database::catch_up`), which the
//!   replica applies, warning that it moves the database back.
//! - A peer of another protocol revision is refused in `Hello` or `StreamRequest`
//!   ([`ReplicationError::ProtocolVersion`]); one of another major version
//!   answers UNIMPLEMENTED ([`ReplicationError::UnsupportedProtocol`]).
//!
//! # Memory per replica stream
//!
//! The primary produces each stream in its own task, writing messages into a
//! bounded channel of [`STREAM_BUFFER_MESSAGES`] that tonic drains into the HTTP/2
//! stream. When a replica reads slowly, HTTP/2 flow control stops the draining, the
//! channel fills and the producer waits; nothing else buffers. A stream therefore
//! holds at most `STREAM_BUFFER_MESSAGES × CHUNK_SIZE` (8 MiB) in its channel, plus
//! the batch of change sets being sent (at most [`MAX_CATCH_UP_BYTES`], or one
//! change set when a single one is larger) or one [`CHUNK_SIZE`] buffer while a
//! snapshot is read back from its spool file, plus the one message tonic is
//! encoding, HTTP/2's send buffer (hyper's default, 400 KiB) and what is in flight within the replica's receive window
//! (`RECEIVE_WINDOW_BYTES`, 4 MiB). Snapshots are spooled to an unnamed file in
//! [`NodeContext::spool_dir`] rather than streamed straight from the database's
//! log, so that a slow replica holds nothing of the primary's but a file. The
//! stream reads the spool file while it is still being written, so spooling and
//! sending overlap.
//!
//! On a replica, one change set is reassembled before it is applied (the store
//! applies whole change sets): in memory up to [`MAX_CHANGE_SET_IN_MEMORY`] bytes,
//! in an unnamed spool file beside the databases beyond that (a snapshot of a
//! large database), so a replica's memory does not grow with its databases;
//! [`MAX_CHANGE_SET_BYTES`] bounds the change set. A
//! replica that hears nothing for [`PRIMARY_SILENCE_TIMEOUT`] drops the stream,
//! and the primary drops connections that stop answering HTTP/2 pings, so a
//! vanished peer never holds a stream open.
//!
//! Errors: [`ReplicationError`] is the one error type; `status_from_error` is
//! the one place a `tonic::Status` is made from it.

mod auth;
#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod bad_input_tests;
mod chunk;
mod client;
mod crc;
mod handoff;
mod peers;
mod precise_timer;
mod server;
mod spool;
mod status;
/// The log capture the in-process tests share with the integration tests.
#[cfg(test)]
#[path = "../../tests/it/support/logs.rs"]
mod test_logs;
mod transport;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use crate::bridge::CommitBridge;
use crate::ltx::{LtxError, TxId};
use crate::store::{Position, Store, StoreError};

pub use auth::{AUTH_HEADER, AUTH_REPLY_HEADER, ClusterKeys, MAX_CLOCK_SKEW};
pub use client::{FollowSettings, follow};
pub use handoff::{
    ControlRequest, FollowerState, HANDOFF_TIMEOUT, HandoffPhase, HandoffSeen, Handoffs, LastHeard,
    PRESUMED_GONE_AFTER, RoleRefusal, request_handoff, request_promote,
};
pub use peers::{KnownPeers, Peer, PeerCatchUp, catch_up_from_peers};
pub use server::serve;
pub use server::{MAX_STREAMS, MAX_STREAMS_PER_ADDRESS, ServerSettings};
pub use status::{DatabaseStatus, NodeStatus, fetch_status};
pub use transport::{
    ClientCredentials, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, server_tls,
};

/// The code generated from the schema; private to this module.
#[allow(clippy::all, clippy::pedantic)]
mod proto {
    tonic::include_proto!("ltxfs.replication.v1");
}

/// The protocol revision within package `ltxfs.replication.v1` that this build
/// speaks. Both sides refuse a peer that sends another.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest piece of a change set in one `LtxChunk` message.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// The largest change set a replica accepts. A snapshot is one change set as
/// large as its database, so this only guards the disk against a runaway peer.
pub const MAX_CHANGE_SET_BYTES: u64 = 1 << 40;

/// How many bytes of one arriving change set a replica holds in memory (plus
/// one chunk); the bytes before them go to a spool file.
pub const MAX_CHANGE_SET_IN_MEMORY: usize = 8 * CHUNK_SIZE;

/// About how many bytes of change sets the primary reads from a log at once.
pub const MAX_CATCH_UP_BYTES: u64 = 4 * 1024 * 1024;

/// The most bytes of change sets a live stream reads from the log on its own
/// task, when the capture lock is free: a commit's change set, just written and
/// still in the page cache, takes microseconds to read, less than a trip to the
/// blocking pool. More is read there.
pub const MAX_INLINE_CATCH_UP_BYTES: u64 = 64 * 1024;

/// How long a live stream waits after its last send before it sends the commits
/// that came since. Commits that follow each other closely then reach a replica
/// together, so the primary's stream and the replica wake once for all of them
/// rather than once each (what that saves: `docs/benchmarks.md`). A commit that comes later than this
/// after the last send goes out at once; one that comes sooner waits at most
/// this long (timed by a `timerfd`, since tokio's timers round up to whole
/// milliseconds). Streams of a synchronous primary never wait: each held commit
/// waits for its own acknowledgement.
pub const LIVE_BATCH_INTERVAL: Duration = Duration::from_millis(1);

/// How many messages the primary queues for one replica before it waits.
pub const STREAM_BUFFER_MESSAGES: usize = 8;

/// How long the primary stays silent on a stream before it sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a replica waits for any message before it gives up on the stream.
pub const PRIMARY_SILENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest gRPC message either side decodes: a chunk with room to spare, or
/// a heartbeat or status listing many databases.
const MAX_MESSAGE_BYTES: usize = 4 * CHUNK_SIZE;

/// How long a node waits for a TCP connection to another.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP/2 receive window a client opens: how much the primary may send
/// before the replica has read it. Larger than the default 64 KiB so a snapshot
/// is not held to one window per round trip.
const RECEIVE_WINDOW_BYTES: u32 = 4 * 1024 * 1024;

/// The longest database name or hostname accepted from a peer (a file name's
/// limit on Linux).
const MAX_NAME_BYTES: usize = 255;

/// What a node serving replication needs.
#[derive(Debug)]
pub struct NodeContext {
    /// The node's databases and its role.
    pub store: Arc<Store>,
    /// This node's name (`lease.hostname`), sent to replicas in `Hello`.
    pub hostname: String,
    /// Wakes streams when a database commits; must be the store's commit listener.
    pub commits: Arc<CommitBridge>,
    /// Where snapshots are spooled before they are sent (on the data dir's disk).
    pub spool_dir: PathBuf,
    /// The open streams and the handoff phase, shared with the role loop.
    pub handoffs: Arc<Handoffs>,
    /// The URL of this node's write-forwarding proxy as other nodes reach it, when
    /// it runs one; sent to replicas in `Hello`.
    pub proxy_url: Option<String>,
    /// Whether commits wait for a replica (synchronous replication): replicas are
    /// then asked to acknowledge what they apply. The store's commit hold must be
    /// `handoffs`.
    pub synchronous: bool,
    /// What the backup uploaders report, for status and metrics.
    pub backups: Arc<crate::backup::BackupStatus>,
}

/// Everything that can go wrong in replication.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The address of a node cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The rejected URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// No connection could be made to a node.
    #[error("could not connect to {url}")]
    Connect {
        /// The node's URL.
        url: String,
        /// What the transport said.
        #[source]
        source: tonic::transport::Error,
    },
    /// The replication server failed.
    #[error("replication server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The peer refused this node's call for want of the cluster secret, or did
    /// not prove it knows it.
    #[error("{url} is not trusted or does not trust this node: {message}")]
    Unauthenticated {
        /// The peer's URL.
        url: String,
        /// Why.
        message: String,
    },
    /// `http.tls` names a file that cannot be used.
    #[error("http.tls: {}: {reason}", .path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The node already serves as many streams as it allows (in total, or to
    /// the caller's address).
    #[error("too many replication streams: {0}")]
    TooManyStreams(String),
    /// The peer answered with a gRPC error.
    #[error("{url} answered {code:?}: {message}")]
    Remote {
        /// The peer's URL.
        url: String,
        /// The gRPC status code.
        code: tonic::Code,
        /// The peer's message.
        message: String,
    },
    /// A `Stream` request reached a node that is not the primary.
    #[error("this node is not the primary{}", primary_hint(.primary))]
    NotPrimary {
        /// The primary this node follows, if it knows one.
        primary: Option<String>,
    },
    /// A message lacks a field that must be set (such as the `oneof`).
    #[error("{message} message has no {field}")]
    MissingField {
        /// The message type.
        message: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A message names a database that cannot exist in the mount root.
    #[error("{message} message names an invalid database {name:?}: {reason}")]
    InvalidDatabaseName {
        /// The message type.
        message: &'static str,
        /// The name as received (cut to a readable length).
        name: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A message lists the same database twice.
    #[error("{message} message lists database {name:?} twice")]
    DuplicateDatabase {
        /// The message type.
        message: &'static str,
        /// The database.
        name: String,
    },
    /// A position that no database can have.
    #[error("{message} message has an invalid position for {database:?}: {reason}")]
    InvalidPosition {
        /// The message type.
        message: &'static str,
        /// The database.
        database: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A hostname that cannot be served in `.primary`.
    #[error("{message} message has an invalid hostname {hostname:?}: {reason}")]
    InvalidHostname {
        /// The message type.
        message: &'static str,
        /// The hostname as received (cut to a readable length).
        hostname: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The peer does not serve this protocol's package: it speaks another major
    /// version, or is not an ltxfs node.
    #[error(
        "{url} does not serve ltxfs.replication.v1 (it answered UNIMPLEMENTED{}); it speaks another major version of the protocol or is not an ltxfs node",
        remote_detail(.message)
    )]
    UnsupportedProtocol {
        /// The peer's URL.
        url: String,
        /// The peer's message.
        message: String,
    },
    /// The peer speaks another revision of the protocol.
    #[error(
        "{message} message speaks protocol version {received}; this node speaks {PROTOCOL_VERSION}"
    )]
    ProtocolVersion {
        /// The message type.
        message: &'static str,
        /// The version the peer sent.
        received: u32,
    },
    /// A `Peers` message names more peers than a node accepts.
    #[error("Peers message names {0} peers; at most {MAX_PEERS} are accepted", MAX_PEERS = peers::MAX_PEERS)]
    TooManyPeers(usize),
    /// A status names a role other than "primary" or "replica".
    #[error("status message has an unknown role {0:?}")]
    UnknownRole(String),
    /// A chunk is larger than [`CHUNK_SIZE`].
    #[error(
        "chunk of {len} bytes for database {database:?} exceeds the chunk size of {CHUNK_SIZE} bytes"
    )]
    OversizedChunk {
        /// The database.
        database: String,
        /// The chunk's length.
        len: usize,
    },
    /// Reassembling a change set would exceed [`MAX_CHANGE_SET_BYTES`].
    #[error("change set for database {database:?} exceeds {MAX_CHANGE_SET_BYTES} bytes")]
    OversizedChangeSet {
        /// The database.
        database: String,
    },
    /// A chunk of one database arrived while a change set of another was incomplete.
    #[error("chunk for database {received:?} while the change set of {pending:?} is incomplete")]
    InterleavedChunk {
        /// The database whose change set is incomplete.
        pending: String,
        /// The database of the chunk that arrived.
        received: String,
    },
    /// A chunk that is not the last of its change set carries a field that
    /// belongs on the last one (`crc64`, `shared_txid`).
    #[error(
        "LtxChunk message for database {database:?} carries {field} but is not the last chunk of its change set"
    )]
    MisplacedLastChunkField {
        /// The database.
        database: String,
        /// The field.
        field: &'static str,
    },
    /// A change set's CRC does not match its bytes and database name.
    #[error(
        "change set for database {database:?} fails its CRC-64: the primary sent {sent:016x} but the name and bytes received give {computed:016x}; it was damaged, reordered or repeated on the way, or belongs to another database"
    )]
    ChangeSetCrc {
        /// The database the change set is labelled with.
        database: String,
        /// The CRC on its last chunk.
        sent: u64,
        /// The CRC of what arrived.
        computed: u64,
    },
    /// The stream failed between the chunks of a change set, which was dropped.
    #[error(
        "the stream broke off after {received} bytes of a change set for database {database:?}, which was dropped"
    )]
    TruncatedChangeSet {
        /// The database.
        database: String,
        /// How many bytes of the change set had arrived.
        received: u64,
        /// Why the stream failed.
        #[source]
        cause: Box<ReplicationError>,
    },
    /// A change set ended without any bytes.
    #[error("empty change set for database {database:?}")]
    EmptyChangeSet {
        /// The database.
        database: String,
    },
    /// A message arrived where the protocol does not allow it.
    #[error("unexpected {message} message while {state}")]
    UnexpectedMessage {
        /// The message type.
        message: &'static str,
        /// What the receiver was doing.
        state: &'static str,
    },
    /// Bytes that should be an LTX change set are not.
    #[error("change set for database {database:?} is not valid LTX")]
    InvalidChangeSet {
        /// The database.
        database: String,
        /// What the LTX decoder found.
        #[source]
        source: LtxError,
    },
    /// A heartbeat says a database is somewhere this replica is not, after this
    /// replica applied everything sent before it.
    #[error(
        "database {database:?} is at TXID {} (checksum {}) here but at TXID {} (checksum {}) on the primary's stream",
        .local.txid, .local.checksum, .primary.txid, .primary.checksum
    )]
    Diverged {
        /// The database.
        database: String,
        /// Its position on this replica.
        local: Position,
        /// Its position according to the primary.
        primary: Position,
    },
    /// The primary sent nothing for [`PRIMARY_SILENCE_TIMEOUT`].
    #[error("the primary sent nothing for {0:?}")]
    PrimarySilent(Duration),
    /// The primary ended the stream.
    #[error("the primary ended the stream")]
    StreamEnded,
    /// The primary handed its role to another node; the stream is over.
    #[error("the primary handed its role to {to}")]
    HandedOff {
        /// The new primary's hostname.
        to: String,
    },
    /// A handoff or promotion was asked for and did not happen.
    #[error(transparent)]
    HandoffRefused(#[from] RoleRefusal),
    /// The primary's own change set ends before a position it claims.
    #[error("database {database:?}: the change set after TXID {after} ends at TXID {max_txid}")]
    NoProgress {
        /// The database.
        database: String,
        /// The position the change set should follow.
        after: TxId,
        /// Where the change set ends.
        max_txid: TxId,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Spooling or reading a snapshot failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// A peer's message after its status code, when it sent one.
fn remote_detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message:?}")
    }
}

fn primary_hint(primary: &Option<String>) -> String {
    match primary {
        Some(primary) => format!("; the primary is {primary}"),
        None => "; no primary is known".to_string(),
    }
}

/// The gRPC status a peer receives for `error`: the one place a status is made.
fn status_from_error(error: &ReplicationError) -> tonic::Status {
    use ReplicationError as E;
    let code = match error {
        E::NotPrimary { .. } | E::HandoffRefused(_) => tonic::Code::FailedPrecondition,
        E::TooManyStreams(_) => tonic::Code::ResourceExhausted,
        E::ProtocolVersion { .. } => tonic::Code::FailedPrecondition,
        E::MissingField { .. }
        | E::InvalidDatabaseName { .. }
        | E::DuplicateDatabase { .. }
        | E::InvalidPosition { .. }
        | E::InvalidHostname { .. } => tonic::Code::InvalidArgument,
        _ => tonic::Code::Internal,
    };
    tonic::Status::new(code, error.to_string())
}

/// The connection settings for the node at `url`: `http://`, or `https://` with
/// `credentials`' TLS settings.
fn endpoint(
    url: &str,
    credentials: &ClientCredentials,
) -> Result<tonic::transport::Endpoint, ReplicationError> {
    let invalid = |reason: String| ReplicationError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let https = url.starts_with("https://");
    if !https && !url.starts_with("http://") {
        return Err(invalid(
            "it must start with http:// or https://".to_string(),
        ));
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|error| invalid(error.to_string()))?;
    if https {
        endpoint = endpoint
            .tls_config(credentials.tls_for_https())
            .map_err(|error| invalid(error.to_string()))?;
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(RECEIVE_WINDOW_BYTES)
        .initial_connection_window_size(RECEIVE_WINDOW_BYTES))
}

/// A client of the node API over a connection that signs every call.
type Client = proto::replication_client::ReplicationClient<auth::Signed<Channel>>;

/// A client of the node at `url`. With `call_timeout`, each call fails after it
/// (for calls with one answer; a stream must not be cut off).
async fn connect(
    url: &str,
    credentials: &ClientCredentials,
    call_timeout: Option<Duration>,
) -> Result<Client, ReplicationError> {
    let mut endpoint = endpoint(url, credentials)?;
    if let Some(timeout) = call_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ReplicationError::Connect {
            url: url.to_string(),
            source,
        })?;
    Ok(
        proto::replication_client::ReplicationClient::new(auth::Signed::new(
            channel,
            credentials.keys.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// The error for a gRPC status a peer at `url` answered with.
fn remote_error(url: &str, status: &tonic::Status) -> ReplicationError {
    if status.code() == tonic::Code::Unauthenticated {
        return ReplicationError::Unauthenticated {
            url: url.to_string(),
            message: status.message().to_string(),
        };
    }
    if status.code() == tonic::Code::Unimplemented {
        return ReplicationError::UnsupportedProtocol {
            url: url.to_string(),
            message: status.message().to_string(),
        };
    }
    ReplicationError::Remote {
        url: url.to_string(),
        code: status.code(),
        message: status.message().to_string(),
    }
}

/// Runs blocking work (file I/O, the store's locks) off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, ReplicationError>
where
    F: FnOnce() -> Result<T, ReplicationError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ReplicationError::Task)?
}
