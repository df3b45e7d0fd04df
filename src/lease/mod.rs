//! Primary election: one trait over the coordinators that decide which node is
//! the primary (static config, Consul, etcd).
//!
//! A lease is held by at most one node at a time. Holding it makes a node the
//! primary; every acquisition gets an [`Epoch`] larger than every earlier one, which
//! change sets carry so replicas can refuse an old primary's writes (fencing).
//!
//! Invariants every implementation keeps (checked by one conformance suite):
//! - `try_acquire` succeeds for at most one holder until that holder releases the
//!   lease or it expires; a holder that fails to renew before
//!   [`HeldLease::renew_by`] must assume it lost the lease.
//! - Epochs only grow, across holders and across expiries.
//! - `watch` returns when the holder changes (a blocking query or a watch, never
//!   periodic polling), or after its timeout with the same answer.
//! - Lease values read from the coordinator are validated: a malformed value is a
//!   [`LeaseError::MalformedValue`], never a panic or a silently wrong primary.

pub mod consul;
pub mod etcd;
pub mod http;
pub mod static_lease;

use std::time::{Duration, Instant};

use hyper::StatusCode;

use http::HttpError;

/// The node that holds, or asks for, the lease: what replicas need to reach it.
/// Stored in the coordinator as JSON `{"hostname": ..., "advertise-url": ...}`
/// (LiteFS's format).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseHolder {
    /// The node's name (on Fly.io, the machine id).
    pub hostname: String,
    /// The URL replicas connect to.
    #[serde(rename = "advertise-url")]
    pub advertise_url: String,
}

/// A fencing token: grows with every acquisition of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// A lease this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    /// The epoch of this acquisition.
    pub epoch: Epoch,
    /// The coordinator's handle for the lease (Consul session id, etcd lease id).
    pub handle: String,
    /// Renew before this instant; after it, the lease may have expired elsewhere,
    /// so the node must stop acting as primary.
    pub renew_by: Instant,
}

/// What the coordinator says about the lease right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The current holder and its epoch, if anyone holds it.
    pub holder: Option<(LeaseHolder, Epoch)>,
    /// Opaque position for the next [`Lease::watch`] (Consul's `X-Consul-Index`,
    /// etcd's revision).
    pub index: u64,
}

/// Errors of the lease layer.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The coordinator could not be reached or answered with an error.
    #[error("the {coordinator} coordinator at {url} is unavailable: {reason}")]
    Unavailable {
        /// "consul" or "etcd".
        coordinator: &'static str,
        /// Where it was asked.
        url: String,
        /// What went wrong.
        reason: Unavailability,
    },
    /// The lease this node held is gone (expired, or taken after expiry).
    #[error("the lease was lost: {0}")]
    Lost(String),
    /// The value stored under the lease key is not a valid lease value.
    #[error("malformed lease value under {key:?}: {reason}")]
    MalformedValue {
        /// The key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The coordinator's cluster ID is not this node's data's.
    #[error(
        "this node's data belongs to cluster {local} but the coordinator's key belongs to cluster {remote}; refusing to join"
    )]
    ClusterMismatch {
        /// The cluster ID in the data dir.
        local: String,
        /// The cluster ID beside the lease key.
        remote: String,
    },
    /// The operation is not possible with this kind of lease.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Why a coordinator gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum Unavailability {
    /// No complete answer: connecting, sending or receiving failed, or took too
    /// long.
    #[error(transparent)]
    NoAnswer(HttpError),
    /// An HTTP status other than the success the coordinator's API documents.
    #[error("HTTP {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the answer's body, as the coordinator wrote it.
        body: String,
    },
    /// The coordinator refused the request with a gRPC status (etcd).
    #[error("etcd refused the request: {message} (gRPC code {code})")]
    Refused {
        /// The gRPC status code.
        code: i64,
        /// The coordinator's message.
        message: String,
    },
    /// An answer that is not what the coordinator's API documents.
    #[error("{0}")]
    BadAnswer(String),
    /// The streamed answer of a watch broke off (etcd).
    #[error("the watch failed: {0}")]
    Watch(etcd::StreamReadError),
    /// Every endpoint failed (etcd tries each in turn): each one's failure, in
    /// the order tried.
    #[error("{}", endpoint_failures(.0))]
    AllEndpoints(Vec<(String, Unavailability)>),
    /// The cluster ID key vanished after each attempt to create it.
    #[error("the cluster ID key kept disappearing ({attempts} attempts)")]
    KeyKeptDisappearing {
        /// How many attempts were made.
        attempts: usize,
    },
}

/// `endpoint: failure` for each endpoint, joined by `; `.
fn endpoint_failures(failures: &[(String, Unavailability)]) -> String {
    failures
        .iter()
        .map(|(endpoint, failure)| format!("{endpoint}: {failure}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A coordinator that decides which node is the primary.
#[async_trait::async_trait]
pub trait Lease: Send + Sync + std::fmt::Debug {
    /// How long a lease lasts without renewal.
    fn ttl(&self) -> Duration;

    /// Tries to take the lease for `me`: `Some` when this node now holds it, `None`
    /// when another node does (or a lock-delay is in force).
    async fn try_acquire(&self, me: &LeaseHolder) -> Result<Option<HeldLease>, LeaseError>;

    /// Extends the lease; [`LeaseError::Lost`] when it is no longer held.
    async fn renew(&self, held: &HeldLease) -> Result<HeldLease, LeaseError>;

    /// Gives the lease up at once, so another candidate can take it without
    /// waiting for expiry (clean shutdown, handoff).
    async fn release(&self, held: &HeldLease) -> Result<(), LeaseError>;

    /// The lease's state, waiting up to `wait` for it to change from `since`
    /// (a [`LeaseState::index`] from an earlier call; `None` answers at once).
    async fn watch(&self, since: Option<u64>, wait: Duration) -> Result<LeaseState, LeaseError>;

    /// Stores `local` as the cluster ID beside the lease key when none is stored,
    /// and returns the stored one; [`LeaseError::ClusterMismatch`] when it differs.
    async fn check_cluster_id(&self, local: &str) -> Result<String, LeaseError>;
}
